//! JWT bearer tokens through the whole request path: each route's chain of authenticators
//! (`auth: true`, `[jwt]`, `[jwt, anonymous]`), the identity a token grants, and the event it
//! leaves behind.
#![cfg(feature = "jwt")]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tollgate_gateway::GatewayConfig;
use tollgate_gateway::config::{
    ApiKeyConfig, AuthConfig, AuthMethod, JwtConfig, JwtKeyConfig, RouteAuth, RouteConfig,
    UpstreamConfig,
};
use tollgate_schemas::config::{Consumer, Plan};

const EC1: &str = include_str!("fixtures/jwt/ec1.key");
const EC1_PUB: &str = include_str!("fixtures/jwt/ec1.pub");

/// Answers with the headers it received.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let headers: BTreeMap<String, String> = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                        .collect();
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        json!({ "headers": headers }).to_string(),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn token(sub: &str) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("ec1".into());
    let claims = json!({
        "sub": sub, "iss": "https://issuer.example", "aud": "orders-api",
        "exp": chrono::Utc::now().timestamp() + 600,
    });
    encode(
        &h,
        &claims,
        &EncodingKey::from_ec_pem(EC1.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_runs_its_chain_of_authenticators() {
    let up = upstream().await;
    let route = |id: &str, auth: RouteAuth| RouteConfig {
        id: id.into(),
        methods: vec![],
        hosts: vec![],
        path: format!("/{id}"),
        upstream: "app".into(),
        strip_prefix: None,
        auth,
        rate_limit: None,
        timeout_ms: None,
    };
    let config = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        id: Some("gw-jwt".into()),
        upstreams: [(
            "app".to_string(),
            UpstreamConfig {
                timeout_ms: 1000,
                ..UpstreamConfig::targets(vec![format!("http://{up}")])
            },
        )]
        .into(),
        routes: vec![
            route("both", RouteAuth::All(true)),
            route("jwt", RouteAuth::Chain(vec![AuthMethod::Jwt])),
            route(
                "maybe",
                RouteAuth::Chain(vec![AuthMethod::Jwt, AuthMethod::Anonymous]),
            ),
        ],
        auth: AuthConfig {
            api_key: Some(ApiKeyConfig {
                header: "x-api-key".into(),
            }),
            jwt: Some(JwtConfig {
                issuer: "https://issuer.example".into(),
                audience: "orders-api".into(),
                jwks_url: None,
                keys: vec![JwtKeyConfig {
                    kid: Some("ec1".into()),
                    alg: "ES256".into(),
                    pem: Some(EC1_PUB.into()),
                    secret: None,
                }],
                consumer_claim: "sub".into(),
                leeway_s: 5,
                jwks_refresh_s: 300,
                jwks_min_interval_s: 10,
            }),
        },
        ..Default::default()
    };
    let consumers = vec![
        common::consumer("acme", "p", "k-acme"),
        Consumer {
            id: "zeta".into(),
            plan: "p".into(),
            api_keys: vec![],
        },
    ];
    let plans: BTreeMap<String, Plan> = [("p".to_string(), Plan::default())].into();
    let gw = common::start(config, &consumers, &plans).await;
    let (addr, log) = (gw.addr, gw.log.clone());
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let call = |path: &'static str, headers: Vec<(&'static str, String)>| {
        let client = client.clone();
        async move {
            let mut req = Request::get(format!("http://{addr}{path}"));
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let resp = client
                .request(req.body(Full::default()).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
            )
        }
    };
    let bearer = |sub: &str| vec![("authorization", format!("Bearer {}", token(sub)))];
    let key = || vec![("x-api-key", "k-acme".to_string())];

    // `auth: true`: either credential.
    let (s, body) = call("/both", key()).await;
    assert_eq!(
        (s, &body["headers"]["x-tollgate-consumer"]),
        (StatusCode::OK, &json!("acme"))
    );
    let (s, body) = call("/both", bearer("zeta")).await;
    assert_eq!(
        (s, &body["headers"]["x-tollgate-consumer"]),
        (StatusCode::OK, &json!("zeta"))
    );
    let (s, body) = call("/both", vec![]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing credentials"),
        "{body}"
    );
    // The chain stops at the first method that finds its credential: with a valid API key
    // (first in `auth: true`) the bearer token beside it is not looked at.
    let mut both = key();
    both.push(("authorization", "Bearer nonsense".into()));
    assert_eq!(call("/both", both).await.0, StatusCode::OK);
    // An unknown consumer in a valid token.
    let (s, body) = call("/both", bearer("nobody")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no known consumer"),
        "{body}"
    );

    // `[jwt]`: an API key is not enough.
    assert_eq!(call("/jwt", key()).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call("/jwt", bearer("acme")).await.0, StatusCode::OK);

    // `[jwt, anonymous]`: no credential passes anonymously, a bad one does not.
    let (s, body) = call("/maybe", vec![]).await;
    assert_eq!(
        (s, body["headers"].get("x-tollgate-consumer")),
        (StatusCode::OK, None)
    );
    let bad = vec![("authorization", "Bearer x.y.z".to_string())];
    assert_eq!(call("/maybe", bad).await.0, StatusCode::UNAUTHORIZED);

    // Each of the nine requests left its event; the token's consumer is metered.
    let events = common::events(&mut log.subscribe("t").unwrap(), 9).await;
    let zeta = events
        .iter()
        .find(|e| e.route.as_deref() == Some("both") && e.consumer.as_deref() == Some("zeta"))
        .expect("the token's consumer is metered");
    assert_eq!(
        (zeta.status, zeta.billable, zeta.plan.as_deref()),
        (200, true, Some("p"))
    );
    gw.shutdown.cancel();
    gw.running.await.unwrap();
}
