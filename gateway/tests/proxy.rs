//! The gateway in process, over a real embedded bus log: every phase of the request path and the
//! event each request leaves behind.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tollgate_schemas::quota::{QuotaEntry, QuotaLevel, QuotaSnapshot};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tollgate_bus::{EmbeddedConfig, EmbeddedLog, Subscriber};
use tollgate_gateway::config::{
    ApiKeyConfig, AuthConfig, QuotaFeedConfig, RouteConfig, UpstreamConfig,
};
use tollgate_gateway::{Gateway, GatewayConfig, GatewayMetrics};
use tollgate_schemas::config::{Plan, RateLimit};
use tollgate_schemas::{Outcome, RequestEvent};

/// Echoes what it received as JSON; `/slow` takes 500 ms.
async fn serve_json(handler: fn(&Request<hyper::body::Incoming>) -> (u64, Value)) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    let (delay_ms, body) = handler(&req);
                    let _ = req.into_body().collect().await;
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        body.to_string(),
                    ))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn echo(req: &Request<hyper::body::Incoming>) -> (u64, Value) {
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let delay = if req.uri().path() == "/slow" { 500 } else { 0 };
    (
        delay,
        json!({"path": req.uri().path(), "query": req.uri().query(), "headers": headers}),
    )
}

fn quota_exhausted(_: &Request<hyper::body::Incoming>) -> (u64, Value) {
    let end = (chrono::Utc::now() + chrono::Duration::days(2)).to_rfc3339();
    let snapshot = QuotaSnapshot {
        version: 1,
        epoch: 1,
        full: true,
        consumers: vec![QuotaEntry {
            consumer: "limited".into(),
            plan: Some("p".into()),
            period: "2026-11".into(),
            period_end: end,
            limit: Some(10),
            used: 10,
            remaining: Some(0),
            state: QuotaLevel::Exceeded,
        }],
    };
    (0, serde_json::to_value(snapshot).unwrap())
}

struct Harness {
    gw: common::Running,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Harness {
    async fn start() -> Harness {
        let upstream = serve_json(echo).await;
        let quota = serve_json(quota_exhausted).await;
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap(); // closed once dropped
        let route = |id: &str, path: &str, upstream: &str| RouteConfig {
            id: id.into(),
            methods: vec![],
            hosts: vec![],
            path: path.into(),
            upstream: upstream.into(),
            strip_prefix: None,
            auth: tollgate_gateway::config::RouteAuth::All(true),
            rate_limit: None,
            timeout_ms: None,
        };
        let mut api = route("api", "/api/{*rest}", "app");
        api.strip_prefix = Some("/api".into());
        let config = GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            id: Some("gw-test".into()),
            upstreams: [
                (
                    "app".to_string(),
                    UpstreamConfig {
                        timeout_ms: 200,
                        ..UpstreamConfig::targets(vec![format!("http://{upstream}")])
                    },
                ),
                (
                    "down".to_string(),
                    UpstreamConfig {
                        timeout_ms: 200,
                        ..UpstreamConfig::targets(vec![format!("http://{dead}")])
                    },
                ),
            ]
            .into(),
            routes: vec![
                route("echo", "/echo/{id}", "app"),
                route("slow", "/slow", "app"),
                route("down", "/down", "down"),
                api,
            ],
            auth: AuthConfig {
                api_key: Some(ApiKeyConfig {
                    header: "x-api-key".into(),
                }),
                jwt: None,
            },
            events: Default::default(),
            quota: QuotaFeedConfig {
                url: Some(format!("http://{quota}/v1/quota")),
                token: None,
                poll_ms: Some(20),
                ..Default::default()
            },
            ..Default::default()
        };
        let consumers = vec![
            common::consumer("acme", "open", "k-acme"),
            common::consumer("tight", "tight", "k-tight"),
            common::consumer("limited", "open", "k-limited"),
        ];
        let plans: BTreeMap<String, Plan> = [
            ("open".to_string(), Plan::default()),
            (
                "tight".to_string(),
                Plan {
                    rate_limit: Some(RateLimit {
                        per_second: 1,
                        burst: Some(2),
                    }),
                    ..Default::default()
                },
            ),
        ]
        .into();
        Harness {
            gw: common::start(config, &consumers, &plans).await,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static str,
    ) -> (StatusCode, http::HeaderMap, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.gw.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .client
            .request(
                req.body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap(),
            )
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn events(&self, sub: &mut dyn Subscriber, n: usize) -> Vec<RequestEvent> {
        common::events(sub, n).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_with_identity_headers_and_meters_bytes() {
    let h = Harness::start().await;
    let mut sub = h.gw.log.subscribe("t").unwrap();
    let (s, headers, body) = h
        .call(
            "POST",
            "/echo/7?x=1",
            &[
                ("x-api-key", "k-acme"),
                ("x-tollgate-consumer", "spoofed"),
                ("connection", "keep-alive"),
            ],
            "hello",
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["path"], "/echo/7");
    assert_eq!(body["query"], "x=1");
    let up = &body["headers"];
    assert_eq!(
        up["x-tollgate-consumer"], "acme",
        "identity is set by the gateway, never by the client"
    );
    assert!(
        up.get("x-api-key").is_none(),
        "credentials stay at the gateway"
    );
    let request_id = headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(up["x-request-id"], request_id);
    // A request without a trace gets one the gateway starts, named by the request's id.
    let started = up["traceparent"].as_str().expect("a traceparent upstream");
    let parts: Vec<&str> = started.split('-').collect();
    assert_eq!(
        (parts.len(), parts[0], parts[1], parts[2].len(), parts[3]),
        (4, "00", request_id.replace('-', "").as_str(), 16, "01"),
        "{started}"
    );

    // A caller's trace context goes upstream as it came, and its trace id into the event.
    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (s, _, body) = h
        .call(
            "GET",
            "/api/v2/items",
            &[
                ("x-api-key", "k-acme"),
                ("traceparent", caller),
                ("tracestate", "vendor=1"),
            ],
            "",
        )
        .await;
    assert_eq!(
        (s, body["path"].as_str()),
        (StatusCode::OK, Some("/v2/items")),
        "strip_prefix"
    );
    assert_eq!(
        (
            &body["headers"]["traceparent"],
            &body["headers"]["tracestate"]
        ),
        (&serde_json::json!(caller), &serde_json::json!("vendor=1"))
    );
    // One that is not well formed is replaced by a trace the gateway starts.
    let (_, _, body) = h
        .call(
            "GET",
            "/echo/8",
            &[
                ("x-api-key", "k-acme"),
                ("traceparent", "00-not-a-trace-01"),
            ],
            "",
        )
        .await;
    let replaced = body["headers"]["traceparent"].as_str().unwrap_or_default();
    assert!(
        replaced.starts_with("00-") && replaced.len() == 55,
        "{replaced}"
    );

    let evs = h.events(&mut sub, 3).await;
    let e = &evs[0];
    assert_eq!(
        (e.route.as_deref(), e.consumer.as_deref(), e.plan.as_deref()),
        (Some("echo"), Some("acme"), Some("open"))
    );
    assert_eq!((e.status, e.outcome, e.billable), (200, Outcome::Ok, true));
    assert_eq!(e.path, "/echo/7");
    assert_eq!(e.req_bytes, 5);
    assert!(e.resp_bytes > 50 && e.latency_us >= e.upstream_latency_us.unwrap());
    assert_eq!(e.id.to_string(), request_id);
    assert_eq!(
        e.trace_id.as_deref(),
        Some(parts[1]),
        "the started trace's id"
    );
    assert_eq!(evs[1].route.as_deref(), Some("api"));
    assert_eq!(
        evs[1].trace_id.as_deref(),
        Some("0af7651916cd43dd8448eb211c80319c")
    );
    assert_eq!(evs[2].trace_id.as_deref(), replaced.get(3..35));
    h.gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_with_the_right_status_and_still_meters() {
    let h = Harness::start().await;
    let mut sub = h.gw.log.subscribe("t").unwrap();
    assert_eq!(
        h.call("GET", "/nowhere", &[], "").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.call("GET", "/echo/1", &[], "").await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, headers, _) = h
        .call("GET", "/echo/1", &[("x-api-key", "wrong")], "")
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(headers.contains_key("www-authenticate"));
    // Burst of 2, then 429 with Retry-After.
    for _ in 0..2 {
        assert_eq!(
            h.call("GET", "/echo/1", &[("x-api-key", "k-tight")], "")
                .await
                .0,
            StatusCode::OK
        );
    }
    let (s, headers, body) = h
        .call("GET", "/echo/1", &[("x-api-key", "k-tight")], "")
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(body["error"]["code"], "rate_limited");
    // The draft RateLimit fields: 1 request per second, none left, reset with Retry-After.
    assert_eq!(headers["ratelimit-limit"], "1");
    assert_eq!(headers["ratelimit-remaining"], "0");
    assert_eq!(headers["ratelimit-reset"], headers["retry-after"]);
    assert_eq!(
        h.call("GET", "/slow", &[("x-api-key", "k-acme")], "")
            .await
            .0,
        StatusCode::GATEWAY_TIMEOUT
    );
    assert_eq!(
        h.call("GET", "/down", &[("x-api-key", "k-acme")], "")
            .await
            .0,
        StatusCode::BAD_GATEWAY
    );
    // The quota feed says `limited` used its 10 requests: 429 once the state has arrived.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut quota_calls = 0;
    loop {
        quota_calls += 1;
        let (s, headers, _) = h
            .call("GET", "/echo/1", &[("x-api-key", "k-limited")], "")
            .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert!(
                headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    > 86_400
            );
            assert_eq!(headers["ratelimit-limit"], "10");
            assert_eq!(headers["ratelimit-remaining"], "0");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "quota never enforced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let evs = h.events(&mut sub, 9 + quota_calls - 1).await;
    let outcomes: Vec<(Option<&str>, Outcome, bool)> = evs
        .iter()
        .map(|e| (e.consumer.as_deref(), e.outcome, e.billable))
        .collect();
    assert_eq!(
        &outcomes[..8],
        &[
            (None, Outcome::NotFound, false),
            (None, Outcome::Unauthorized, false),
            (None, Outcome::Unauthorized, false),
            (Some("tight"), Outcome::Ok, true),
            (Some("tight"), Outcome::Ok, true),
            (Some("tight"), Outcome::RateLimited, false),
            (Some("acme"), Outcome::Timeout, false),
            (Some("acme"), Outcome::UpstreamError, false),
        ]
    );
    assert_eq!(evs[0].route, None);
    assert_eq!(
        evs[0].trace_id, None,
        "answered by the gateway: no trace went anywhere"
    );
    assert_eq!(evs[6].status, 504);
    assert!(
        evs[6].upstream_latency_us.unwrap() >= 200_000,
        "a timeout waited the whole timeout"
    );
    assert_eq!(evs[0].upstream_latency_us, None, "not forwarded");
    assert_eq!(evs.last().unwrap().outcome, Outcome::QuotaExceeded);
    h.gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight_and_their_events() {
    let mut h = Harness::start().await;
    let mut sub = h.gw.log.subscribe("t").unwrap();
    let url = format!("http://{}/slow", h.gw.addr);
    let client = h.client.clone();
    let in_flight = tokio::spawn(async move {
        let req = Request::get(url)
            .header("x-api-key", "k-acme")
            .body(Full::new(Bytes::new()))
            .unwrap();
        client.request(req).await.map(|r| r.status())
    });
    // Shut down while the request waits on its upstream.
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.gw.shutdown.cancel();
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        StatusCode::GATEWAY_TIMEOUT,
        "the request was allowed to finish"
    );
    tokio::time::timeout(Duration::from_secs(10), &mut h.gw.running)
        .await
        .expect("gateway stops")
        .unwrap();
    let evs = h.events(&mut sub, 1).await;
    assert_eq!(
        (evs[0].route.as_deref(), evs[0].outcome),
        (Some("slow"), Outcome::Timeout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_in_the_default_header_when_auth_is_not_configured() {
    let upstream = serve_json(echo).await;
    let config = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstreams: [(
            "app".to_string(),
            UpstreamConfig {
                timeout_ms: 1000,
                ..UpstreamConfig::targets(vec![format!("http://{upstream}")])
            },
        )]
        .into(),
        routes: vec![RouteConfig {
            id: "echo".into(),
            methods: vec![],
            hosts: vec![],
            path: "/echo".into(),
            upstream: "app".into(),
            strip_prefix: None,
            auth: tollgate_gateway::config::RouteAuth::All(true),
            rate_limit: None,
            timeout_ms: None,
        }],
        ..Default::default()
    };
    assert_eq!(config.auth, AuthConfig::default());
    let consumers = vec![common::consumer("acme", "open", "k-acme")];
    let plans: BTreeMap<String, Plan> = [("open".to_string(), Plan::default())].into();
    let gw = common::start(config, &consumers, &plans).await;
    let addr = gw.addr;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let status = |key: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut req = Request::get(format!("http://{addr}/echo"));
            if let Some(k) = key {
                req = req.header("x-api-key", k);
            }
            client
                .request(req.body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(status(None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(Some("k-acme")).await, StatusCode::OK);
    gw.shutdown.cancel();
}

/// The workers share their port through SO_REUSEPORT, which must not let a second gateway (or
/// anything else) join a port that is already taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_address_is_refused_even_with_several_workers() {
    let bind = |listen: SocketAddr, dir: &std::path::Path| {
        let log = EmbeddedLog::open(EmbeddedConfig {
            dir: dir.to_path_buf(),
            ..Default::default()
        })
        .unwrap();
        let config = GatewayConfig {
            listen,
            workers: 2,
            ..Default::default()
        };
        async move {
            Gateway::bind(
                config,
                Default::default(),
                &BTreeMap::new(),
                Arc::new(log),
                GatewayMetrics::unregistered(),
            )
            .await
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let first = bind("127.0.0.1:0".parse().unwrap(), &dir.path().join("a"))
        .await
        .unwrap();
    let taken = first.local_addr();
    match bind(taken, &dir.path().join("b")).await {
        Err(tollgate_gateway::GatewayError::Bind { addr, .. }) => assert_eq!(addr, taken),
        Err(e) => panic!("expected a bind error, got {e}"),
        Ok(_) => panic!("a second gateway was allowed to listen on {taken}"),
    }
}

/// A smuggling probe: `Content-Length` and `Transfer-Encoding` together is refused with 400
/// (RFC 9112 §6.3 lets a server either refuse it or let `Transfer-Encoding` decide and close),
/// and the connection closes, so the bytes after the chunked body are never read as a second
/// request. `tests/wire.rs` has the other probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_a_400_and_a_closed_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start().await;
    let mut sock = tokio::net::TcpStream::connect(h.gw.addr).await.unwrap();
    sock.write_all(
        b"POST /echo/1 HTTP/1.1\r\nHost: x\r\nx-api-key: k-acme\r\nContent-Length: 4\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /echo/2 HTTP/1.1\r\nHost: x\r\nx-api-key: k-acme\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "one answer only: {text}"
    );
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(
        !text.contains("/echo/2"),
        "the smuggled request never reached the upstream: {text}"
    );
    h.gw.shutdown.cancel();
}
