//! A scripted HTTP/1.1 upstream that reports what it received (so a test sees both sides of the
//! gateway), and the test gateway in front of it: `/open/*` anonymous and `/keyed/*` with an
//! API key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate_gateway::GatewayConfig;
use tollgate_gateway::config::{ApiKeyConfig, AuthConfig, RouteAuth, RouteConfig, UpstreamConfig};
use tollgate_gateway::h1::{self, Chunk, ChunkedDecoder, Framing, Parsed};
use tollgate_schemas::config::Plan;

/// Reads one whole message body framed as `framing` from `sock` (bytes after the head in `buf`).
pub async fn read_body(sock: &mut TcpStream, buf: &mut BytesMut, framing: Framing) -> Vec<u8> {
    let mut body = Vec::new();
    let mut decoder = ChunkedDecoder::default();
    loop {
        match framing {
            Framing::Empty => return body,
            Framing::Length(n) if buf.len() as u64 >= n => {
                return buf.split_to(n as usize).to_vec();
            }
            Framing::Chunked => loop {
                match decoder.next(buf).expect("valid chunked coding") {
                    Chunk::Data(d) => body.extend_from_slice(&d),
                    Chunk::End => return body,
                    Chunk::Partial => break,
                }
            },
            _ => {}
        }
        if sock.read_buf(buf).await.unwrap() == 0 {
            assert_eq!(framing, Framing::Close, "the message ended early");
            return buf.split().to_vec();
        }
    }
}

/// Whether the scripted upstream has received a `/slow` request.
pub static SLOW_STARTED: AtomicBool = AtomicBool::new(false);

/// `/slow` requests the scripted upstream has received.
pub static SLOW_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Connections the scripted upstream closed after a `/drop` answer.
pub static DROPPED: AtomicUsize = AtomicUsize::new(0);

/// The scripted upstream: answers each request with what it received, as JSON; the path says
/// how it frames the answer and whether it keeps the connection.
pub async fn upstream() -> SocketAddr {
    upstream_with(Arc::new(AtomicBool::new(true))).await
}

/// The scripted upstream, whose `/health` answers 200 while `healthy` holds, else 503.
pub async fn upstream_with(healthy: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let healthy = healthy.clone();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                loop {
                    let head = loop {
                        if let Ok(Parsed::Head(h)) = h1::parse_request(&mut buf) {
                            break h;
                        }
                        if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    };
                    if head.websocket {
                        // Accept the handshake, then echo every byte until the client closes.
                        sock.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n").await.unwrap();
                        sock.write_all(&buf.split()).await.unwrap();
                        let mut chunk = [0u8; 1024];
                        loop {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => sock.write_all(&chunk[..n]).await.unwrap(),
                            }
                        }
                    }
                    if head.uri.path() == "/health" {
                        let status = if healthy.load(Ordering::SeqCst) {
                            "200 OK"
                        } else {
                            "503 Service Unavailable"
                        };
                        let _ = sock
                            .write_all(
                                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n")
                                    .as_bytes(),
                            )
                            .await;
                        continue;
                    }
                    let body = read_body(&mut sock, &mut buf, head.framing).await;
                    let field = |n: &str| {
                        head.fields
                            .get(n)
                            .map(|v| String::from_utf8_lossy(v).to_string())
                    };
                    let report = serde_json::json!({
                        "target": head.uri.to_string(),
                        "upstream": addr.port(),
                        "body": String::from_utf8_lossy(&body),
                        "content-length": field("content-length"),
                        "transfer-encoding": field("transfer-encoding"),
                        "expect": field("expect"),
                        "x-forwarded-for": field("x-forwarded-for"),
                    })
                    .to_string();
                    let path = head.uri.path().to_string();
                    if path.ends_with("/slow") {
                        SLOW_STARTED.store(true, Ordering::SeqCst);
                        SLOW_COUNT.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let answer = if head.method == http::Method::HEAD {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                            report.len()
                        )
                    } else if path.ends_with("/chunked") {
                        format!(
                            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{report}\r\n0\r\n\r\n",
                            report.len()
                        )
                    } else if path.ends_with("/until-close") {
                        format!("HTTP/1.1 200 OK\r\n\r\n{report}")
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{report}",
                            report.len()
                        )
                    };
                    if sock.write_all(answer.as_bytes()).await.is_err() {
                        return; // the gateway gave up on the request
                    }
                    // `until-close` ends its body by closing; `drop` closes a connection it
                    // announced as kept, as an upstream's idle timeout does.
                    if path.ends_with("/until-close") {
                        return;
                    }
                    if path.ends_with("/drop") {
                        drop(sock);
                        DROPPED.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    });
    addr
}

pub async fn gateway() -> super::Running {
    gateway_with(|_| {}).await
}

/// The test gateway (routes `/open/*` anonymous and `/keyed/*` with an API key, both to the
/// scripted upstream), after `adjust` has changed its configuration.
pub async fn gateway_with(adjust: impl FnOnce(&mut GatewayConfig)) -> super::Running {
    let up = upstream().await;
    let route = |id: &str, path: &str, auth: bool| RouteConfig {
        id: id.into(),
        methods: vec![],
        hosts: vec![],
        path: path.into(),
        upstream: "app".into(),
        strip_prefix: None,
        auth: RouteAuth::All(auth),
        rate_limit: None,
        timeout_ms: None,
    };
    let mut config = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        id: Some("gw-wire".into()),
        upstreams: [(
            "app".to_string(),
            UpstreamConfig {
                timeout_ms: 2000,
                ..UpstreamConfig::targets(vec![format!("http://{up}")])
            },
        )]
        .into(),
        routes: vec![
            route("open", "/open/{*rest}", false),
            route("keyed", "/keyed/{*rest}", true),
        ],
        auth: AuthConfig {
            api_key: Some(ApiKeyConfig {
                header: "x-api-key".into(),
            }),
            jwt: None,
        },
        ..Default::default()
    };
    adjust(&mut config);
    let consumers = vec![
        super::consumer("acme", "open", "k-acme"),
        super::consumer("metered", "metered", "k-metered"),
    ];
    let metered = Plan {
        quota: Some(tollgate_schemas::config::Quota {
            period: Default::default(),
            requests: 1_000_000,
        }),
        ..Default::default()
    };
    let plans = [
        ("open".to_string(), Plan::default()),
        ("metered".to_string(), metered),
    ]
    .into();
    super::start(config, &consumers, &plans).await
}
