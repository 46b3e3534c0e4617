//! `tollgate up --demo`: a demo upstream with realistic latency distributions and some 5xx, and
//! a traffic generator playing several partners on different plans (one of them pushing past its
//! rate limit, one past its monthly quota, plus some anonymous and unknown-route traffic).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The built-in demo configuration (`DEMO_UPSTREAM` is replaced with the upstream's address).
pub const CONFIG: &str = include_str!("demo.yaml");

/// Median latency (ms), log-normal sigma, and the share of 5xx answers of each demo endpoint.
fn profile(method: &hyper::Method, path: &str) -> (f64, f64, f64) {
    match (method.as_str(), path) {
        ("GET", "/v1/orders") => (25.0, 0.35, 0.002),
        ("POST", "/v1/orders") => (60.0, 0.45, 0.02),
        ("GET", p) if p.starts_with("/v1/orders/") => (12.0, 0.30, 0.001),
        ("GET", "/v1/search") => (90.0, 0.65, 0.01),
        ("POST", "/v1/payments") => (180.0, 0.40, 0.005),
        _ => (2.0, 0.2, 0.0),
    }
}

fn lognormal(rng: &mut impl Rng, median: f64, sigma: f64) -> f64 {
    // Box–Muller for a standard normal.
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    median * (sigma * z).exp()
}

/// Starts the demo upstream on an ephemeral loopback port; returns its address.
pub async fn start_upstream(shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let (median, sigma, fail) = profile(req.method(), req.uri().path());
                    let (delay, failed) = {
                        let mut rng = rand::rng();
                        (
                            lognormal(&mut rng, median, sigma).min(median * 20.0),
                            rng.random_bool(fail),
                        )
                    };
                    let _ = req.into_body().collect().await;
                    tokio::time::sleep(Duration::from_micros((delay * 1000.0) as u64)).await;
                    let (status, body) = if failed {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            r#"{"error":"upstream overloaded"}"#.to_string(),
                        )
                    } else {
                        (
                            StatusCode::OK,
                            format!(r#"{{"ok":true,"served_in_ms":{delay:.1}}}"#),
                        )
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    Ok::<_, Infallible>(resp)
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// One simulated partner: its key, requests per second, and what it calls.
struct Partner {
    key: Option<&'static str>,
    rps: f64,
    calls: &'static [(&'static str, &'static str)],
}

const PARTNERS: &[Partner] = &[
    Partner {
        key: Some("demo-acme-key"),
        rps: 30.0,
        calls: &[
            ("GET", "/v1/orders"),
            ("GET", "/v1/orders/{n}"),
            ("GET", "/v1/orders/{n}"),
            ("GET", "/v1/search"),
            ("POST", "/v1/payments"),
            ("POST", "/v1/orders"),
        ],
    },
    Partner {
        key: Some("demo-globex-key"),
        rps: 15.0,
        calls: &[
            ("GET", "/v1/orders"),
            ("GET", "/v1/orders/{n}"),
            ("POST", "/v1/orders"),
            ("GET", "/v1/search"),
        ],
    },
    // Above its plan's 8/s: some answers are 429 rate_limited.
    Partner {
        key: Some("demo-initech-key"),
        rps: 11.0,
        calls: &[("GET", "/v1/orders/{n}"), ("GET", "/v1/search")],
    },
    // A free plan with a 500-request monthly quota: runs into 429 quota_exceeded.
    Partner {
        key: Some("demo-umbrella-key"),
        rps: 3.0,
        calls: &[("GET", "/v1/orders"), ("GET", "/v1/orders/{n}")],
    },
    // Bad keys, unknown routes and public health checks.
    Partner {
        key: Some("not-a-real-key"),
        rps: 0.5,
        calls: &[("GET", "/v1/orders")],
    },
    Partner {
        key: None,
        rps: 1.0,
        calls: &[("GET", "/status"), ("GET", "/v2/unknown")],
    },
];

/// Sends demo traffic to the gateway at `gateway` until `shutdown`.
pub async fn run_traffic(gateway: SocketAddr, shutdown: CancellationToken) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    for p in PARTNERS {
        let client = client.clone();
        let shutdown = shutdown.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / p.rps));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    continue;
                };
                let (method, path) = {
                    let mut rng = rand::rng();
                    let (m, path) = p.calls[rng.random_range(0..p.calls.len())];
                    (
                        m,
                        path.replace("{n}", &rng.random_range(1..5000).to_string()),
                    )
                };
                let body = if method == "POST" {
                    r#"{"item":"demo","qty":1}"#
                } else {
                    ""
                };
                let mut req = Request::builder()
                    .method(method)
                    .uri(format!("http://{gateway}{path}"));
                if let Some(k) = p.key {
                    req = req.header("x-api-key", k);
                }
                let req = req
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .expect("valid request");
                let client = client.clone();
                tokio::spawn(async move {
                    if let Ok(resp) = client.request(req).await {
                        let _ = resp.into_body().collect().await;
                    }
                    drop(permit);
                });
            }
        });
    }
}
