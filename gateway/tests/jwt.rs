//! JWT bearer tokens through the whole request path: each route's chain of authenticators
//! (`auth: true`, `[jwt]`, `[jwt, anonymous]`), the identity a token grants, and the event it
//! leaves behind.
#![cfg(feature = "jwt")]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

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
const RSA1: &str = include_str!("fixtures/jwt/rsa1.key");
const RSA1_PUB: &str = include_str!("fixtures/jwt/rsa1.pub");
const RSA2: &str = include_str!("fixtures/jwt/rsa2.key");

/// Requests the upstream has received.
static UPSTREAM_CALLS: AtomicUsize = AtomicUsize::new(0);

/// Answers with the headers it received.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    UPSTREAM_CALLS.fetch_add(1, Ordering::SeqCst);
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

/// A gateway with routes `/both` (`auth: true`), `/jwt` (`[jwt]`) and `/maybe`
/// (`[jwt, anonymous]`), keys `ec1` (ES256) and `rsa1` (RS256), plans `p` and `p2` (named by
/// the `plan` claim), consumers `acme` (with an API key) and `zeta`.
async fn gateway() -> common::Running {
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
                jwks_ca_path: None,
                keys: vec![
                    JwtKeyConfig {
                        kid: Some("ec1".into()),
                        alg: "ES256".into(),
                        pem: Some(EC1_PUB.into()),
                        secret: None,
                    },
                    JwtKeyConfig {
                        kid: Some("rsa1".into()),
                        alg: "RS256".into(),
                        pem: Some(RSA1_PUB.into()),
                        secret: None,
                    },
                ],
                consumer_claim: "sub".into(),
                plan_claim: Some("plan".into()),
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
    let plans: BTreeMap<String, Plan> = [
        ("p".to_string(), Plan::default()),
        ("p2".to_string(), Plan::default()),
    ]
    .into();
    common::start(config, &consumers, &plans).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_runs_its_chain_of_authenticators() {
    let gw = gateway().await;
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

/// `v` as JSON in unpadded base64url, as a JWT part.
fn b64(v: &Value) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = v.to_string().into_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_stale_tokens_get_401_through_the_proxy_and_never_reach_the_upstream() {
    let gw = gateway().await;
    let now = chrono::Utc::now().timestamp();
    let good = json!({"sub": "acme", "iss": "https://issuer.example", "aud": "orders-api", "exp": now + 600});
    let with = |changes: Value| {
        let mut c = good.clone();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let rs = |header: Header, claims: &Value, pem: &str| {
        encode(
            &header,
            claims,
            &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let rs256 = |kid: &str| {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.into());
        h
    };
    // What an attacker controls: its own RSA key (rsa2), and what is public (rsa1's public key).
    let attacker_jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(
        &EncodingKey::from_rsa_pem(RSA2.as_bytes()).unwrap(),
        Algorithm::RS256,
    )
    .unwrap();
    let valid = rs(rs256("rsa1"), &good, RSA1);
    let [_, _, valid_sig]: [&str; 3] = valid.split('.').collect::<Vec<_>>().try_into().unwrap();
    let forged: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&good)
            ),
        ),
        (
            "alg none, kid of a real key",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "kid": "rsa1"})),
                b64(&good)
            ),
        ),
        ("HS256 keyed with the RSA public key", {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("rsa1".into());
            encode(&h, &good, &EncodingKey::from_secret(RSA1_PUB.as_bytes())).unwrap()
        }),
        (
            "signed by another key under a known kid",
            rs(rs256("rsa1"), &good, RSA2),
        ),
        ("its own key embedded as jwk", {
            let mut h = rs256("attacker");
            h.jwk = Some(attacker_jwk.clone());
            rs(h, &good, RSA2)
        }),
        ("jku and x5u pointing at the attacker", {
            let mut h = rs256("rsa1");
            h.jku = Some("http://127.0.0.1:9/jwks.json".into());
            h.x5u = Some("http://127.0.0.1:9/cert.pem".into());
            rs(h, &good, RSA2)
        }),
        ("kid as a path", {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("../../../../dev/null".into());
            encode(&h, &good, &EncodingKey::from_secret(b"")).unwrap()
        }),
        (
            "payload swapped under a valid signature",
            format!(
                "{}.{}.{valid_sig}",
                b64(&json!({"alg": "RS256", "typ": "JWT", "kid": "rsa1"})),
                b64(&with(json!({"sub": "zeta"}))),
            ),
        ),
        (
            "expired",
            rs(rs256("rsa1"), &with(json!({"exp": now - 3600})), RSA1),
        ),
        (
            "not yet valid",
            rs(rs256("rsa1"), &with(json!({"nbf": now + 3600})), RSA1),
        ),
        (
            "no exp",
            rs(rs256("rsa1"), &with(json!({"exp": null})), RSA1),
        ),
        (
            "another issuer",
            rs(
                rs256("rsa1"),
                &with(json!({"iss": "https://evil.example"})),
                RSA1,
            ),
        ),
        (
            "another audience",
            rs(rs256("rsa1"), &with(json!({"aud": "billing-api"})), RSA1),
        ),
        (
            "an unknown plan",
            rs(rs256("rsa1"), &with(json!({"plan": "platinum"})), RSA1),
        ),
        ("not a JWT", "Zm9v.YmFy".into()),
    ];
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let call = |token: String| {
        let client = client.clone();
        let addr = gw.addr;
        async move {
            let req = Request::get(format!("http://{addr}/jwt"))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::default())
                .unwrap();
            let resp = client.request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let before = UPSTREAM_CALLS.load(Ordering::SeqCst);
    for (what, token) in &forged {
        let (status, body) = call(token.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert!(body.contains("invalid bearer token"), "{what}: {body}");
    }
    assert_eq!(
        UPSTREAM_CALLS.load(Ordering::SeqCst),
        before,
        "a forged token got through"
    );

    // The real token passes; one naming plan p2 is metered under it.
    assert_eq!(call(valid).await.0, StatusCode::OK);
    let on_p2 = rs(rs256("rsa1"), &with(json!({"plan": "p2"})), RSA1);
    assert_eq!(call(on_p2).await.0, StatusCode::OK);
    let n = forged.len() + 2;
    let events = common::events(&mut gw.log.subscribe("t").unwrap(), n).await;
    let refused = events
        .iter()
        .filter(|e| e.status == 401 && !e.billable)
        .count();
    assert_eq!(refused, forged.len(), "each refusal is metered, not billed");
    let plans: Vec<_> = events
        .iter()
        .filter(|e| e.status == 200)
        .map(|e| e.plan.clone())
        .collect();
    assert!(
        plans.contains(&Some("p".into())) && plans.contains(&Some("p2".into())),
        "{plans:?}"
    );
    gw.shutdown.cancel();
}
