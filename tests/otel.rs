//! Request spans over OTLP: the real `tollgate up` binary exports to an OTLP/HTTP receiver in
//! this test (protobuf bodies, decoded with the OpenTelemetry protocol types), in front of an
//! upstream that notes the `traceparent` it receives. Checked: the server span continues the
//! caller's trace, the phases and the upstream attempt are its children, the upstream's parent
//! is the upstream span, the sampler follows the caller and samples nothing else at ratio 0.
#![cfg(feature = "otel")]

mod common;
use common::free_port;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// (path, traceparent) of each request the upstream received.
type Received = Arc<Mutex<Vec<(String, Option<String>)>>>;

#[derive(Clone, Default)]
struct Seen {
    spans: Arc<Mutex<Vec<Span>>>,
    services: Arc<Mutex<Vec<String>>>,
    upstream: Received,
}

async fn receiver(seen: Seen) -> SocketAddr {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let seen = seen.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
                for rs in req.resource_spans {
                    for kv in rs.resource.map(|r| r.attributes).unwrap_or_default() {
                        if kv.key == "service.name"
                            && let Some(AnyValue::StringValue(s)) = kv.value.and_then(|v| v.value)
                        {
                            seen.services.lock().unwrap().push(s);
                        }
                    }
                    for ss in rs.scope_spans {
                        seen.spans.lock().unwrap().extend(ss.spans);
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    serve(app).await
}

async fn upstream(seen: Seen) -> SocketAddr {
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let seen = seen.clone();
        async move {
            let tp = req
                .headers()
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_string());
            seen.upstream
                .lock()
                .unwrap()
                .push((req.uri().path().to_string(), tp));
            "ok"
        }
    });
    serve(app).await
}

async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    let v = span.attributes.iter().find(|kv| kv.key == key)?;
    match v.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// GET `path` through the gateway with `headers`; the status.
async fn get(gw: u16, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw))
        .await
        .unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out[9..12].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_an_otlp_receiver_with_their_parentage() {
    let seen = Seen::default();
    let otlp = receiver(seen.clone()).await;
    let app = upstream(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, api) = (free_port(), free_port());
    let config = format!(
        r#"
gateway:
  listen: 127.0.0.1:{gw}
  upstreams:
    app: {{ targets: ["http://{app}"] }}
  routes:
    - {{ id: orders, methods: [GET], path: "/orders/{{id}}", upstream: app }}
  auth:
    api_key: {{ header: x-api-key }}
consumers:
  - {{ id: alpha, plan: gold, api_keys: ["{key}"] }}
plans:
  gold: {{ rate_limit: {{ per_second: 1000, burst: 1000 }} }}
query_api: {{ listen: 127.0.0.1:{api}, admin_tokens: ["otel-admin-token-0123456789"] }}
telemetry:
  otlp: {{ endpoint: "http://{otlp}", sample_ratio: 0.0 }}
  log_format: json
"#,
        key = tollgate_schemas::keys::hash_key("key-alpha"),
    );
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(&path, config).unwrap();
    let _tollgate = common::Up::start(
        &path,
        &dir.path().join("data"),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    common::wait_for_listener(gw).await;

    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let refused_trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let refused = format!("00-{refused_trace}-{CALLER_SPAN}-01");
    let key = ("x-api-key", "key-alpha");
    assert_eq!(
        get(gw, "/orders/1", &[key, ("traceparent", &caller)]).await,
        200
    );
    assert_eq!(get(gw, "/orders/2", &[key]).await, 200);
    assert_eq!(
        get(
            gw,
            "/orders/3",
            &[("x-api-key", "wrong"), ("traceparent", &refused)]
        )
        .await,
        401
    );

    // Both sampled requests' server spans arrive (the batch leaves every 100 ms here).
    let server_of = |trace: &str| {
        seen.spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| hex(&s.trace_id) == trace && s.kind == 2)
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while server_of(CALLER_TRACE).is_none() || server_of(refused_trace).is_none() {
        assert!(
            Instant::now() < deadline,
            "no server spans arrived: {:?}",
            seen.spans.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spans = seen.spans.lock().unwrap().clone();
    let upstream = seen.upstream.lock().unwrap().clone();
    assert!(
        seen.services
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == "tollgate-gateway")
    );

    // The forwarded request: the server span under the caller's span, the phases and the
    // upstream attempt under it, and the upstream's parent is the upstream span.
    let server = server_of(CALLER_TRACE).unwrap();
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN);
    assert_eq!(server.name, "GET orders");
    assert_eq!(attr(&server, "http.route").as_deref(), Some("orders"));
    assert_eq!(attr(&server, "tollgate.consumer").as_deref(), Some("alpha"));
    assert_eq!(
        attr(&server, "http.response.status_code").as_deref(),
        Some("200")
    );
    let children: HashMap<String, Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == CALLER_TRACE && s.span_id != server.span_id)
        .map(|s| (s.name.clone(), s.clone()))
        .collect();
    let mut names: Vec<&str> = children.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["auth", "limits", "upstream"]);
    for child in children.values() {
        assert_eq!(child.parent_span_id, server.span_id, "{}", child.name);
        assert!(child.start_time_unix_nano >= server.start_time_unix_nano);
        assert!(child.end_time_unix_nano <= server.end_time_unix_nano);
    }
    let up = &children["upstream"];
    assert_eq!(up.kind, 3, "a client span");
    let (_, received) = upstream.iter().find(|(p, _)| p == "/orders/1").unwrap();
    assert_eq!(
        received.as_deref(),
        Some(format!("00-{CALLER_TRACE}-{}-01", hex(&up.span_id)).as_str())
    );

    // The refused request: a server span with its status and an auth span, nothing upstream.
    let refused = server_of(refused_trace).unwrap();
    assert_eq!(
        attr(&refused, "http.response.status_code").as_deref(),
        Some("401")
    );
    let refused_children: Vec<&str> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == refused_trace && s.span_id != refused.span_id)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(refused_children, ["auth"]);

    // The request without a trace: a new trace, not sampled at ratio 0, still propagated.
    let (_, received) = upstream.iter().find(|(p, _)| p == "/orders/2").unwrap();
    let received = received.as_deref().expect("a traceparent for a new trace");
    let parts: Vec<&str> = received.split('-').collect();
    assert_eq!(
        (parts.len(), parts[0], parts[3]),
        (4, "00", "00"),
        "{received}"
    );
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) != parts[1]),
        "an unsampled trace was exported"
    );
}
