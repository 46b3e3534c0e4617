//! HTTP/2 from clients (h2c with prior knowledge, and over TLS by ALPN) and TLS on the listener,
//! against the scripted upstream that reports what it received; and the HTTP/2 floods a public
//! listener meets: rapid reset and CONTINUATION.
#![cfg(feature = "http2")]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::scripted::{SLOW_COUNT, gateway_with};
use h2::Reason;
use http::{Method, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_schemas::RequestEvent;

/// An HTTP/2 client on `io` (h2c or TLS), its connection driven in the background; the
/// connection's end (an error names a GOAWAY) comes out of the returned handle.
async fn h2_client<T>(
    io: T,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client, conn) = h2::client::handshake(io).await.expect("HTTP/2 handshake");
    (client, tokio::spawn(conn))
}

/// What one request got: status, headers, body.
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn report(&self) -> serde_json::Value {
        assert_eq!(
            self.status,
            200,
            "{:?}",
            String::from_utf8_lossy(&self.body)
        );
        serde_json::from_slice(&self.body).expect("the upstream's report")
    }
}

/// Sends `method path` with `headers` and `body` (in the given DATA frames; none: the HEADERS
/// frame ends the stream) and reads the whole answer.
async fn call(
    client: &mut h2::client::SendRequest<Bytes>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &[&str],
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://localhost{path}"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let mut ready = client
        .clone()
        .ready()
        .await
        .expect("the connection takes a stream");
    let (response, mut send) = ready
        .send_request(req.body(()).unwrap(), body.is_empty())
        .expect("a stream");
    for (i, part) in body.iter().enumerate() {
        // The gateway may answer (413, 401) and end the stream before the body is sent: the
        // answer is what the test reads.
        if send
            .send_data(Bytes::from(part.to_string()), i + 1 == body.len())
            .is_err()
        {
            break;
        }
    }
    let read = async {
        let response = response.await.expect("an answer");
        let (parts, mut recv) = response.into_parts();
        let mut body = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.expect("a whole body");
            let _ = recv.flow_control().release_capacity(chunk.len());
            body.extend_from_slice(&chunk);
        }
        Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("an answer in time")
}

async fn events(gw: &common::Running, n: usize) -> Vec<RequestEvent> {
    common::events(&mut gw.log.subscribe("h2").unwrap(), n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_streams_run_the_same_phases_and_are_metered_one_event_each() {
    let gw = gateway_with(|_| {}).await;
    let (mut client, _conn) = h2_client(TcpStream::connect(gw.addr).await.unwrap()).await;

    // No body: the HEADERS frame ends the stream; the upstream gets an HTTP/1.1 request.
    let a = call(&mut client, Method::GET, "/open/plain?q=1", &[], &[]).await;
    let r = a.report();
    assert_eq!(r["target"], "/open/plain?q=1");
    assert!(r["content-length"].is_null() && r["transfer-encoding"].is_null());
    assert!(a.headers.contains_key("x-request-id"));

    // A body of a declared length keeps it; one without is sent chunked.
    let r = call(
        &mut client,
        Method::POST,
        "/open/sized",
        &[("content-length", "11")],
        &["hello", " world"],
    )
    .await
    .report();
    assert_eq!(
        (r["body"].as_str(), r["content-length"].as_str()),
        (Some("hello world"), Some("11"))
    );
    let r = call(
        &mut client,
        Method::POST,
        "/open/streamed",
        &[],
        &["ab", "cd", "ef"],
    )
    .await
    .report();
    assert_eq!(r["body"], "abcdef");
    assert_eq!(r["transfer-encoding"], "chunked");

    // A chunked answer arrives as DATA, with no framing fields.
    let a = call(&mut client, Method::GET, "/open/chunked", &[], &[]).await;
    assert_eq!(a.report()["target"], "/open/chunked");
    assert!(!a.headers.contains_key("transfer-encoding"));

    // Authentication and the gateway's own answers.
    let a = call(&mut client, Method::GET, "/keyed/x", &[], &[]).await;
    assert_eq!(a.status, 401);
    assert!(String::from_utf8_lossy(&a.body).contains("unauthorized"));
    assert!(a.headers.contains_key("www-authenticate"));
    let a = call(
        &mut client,
        Method::GET,
        "/keyed/x",
        &[("x-api-key", "k-acme")],
        &[],
    )
    .await;
    assert_eq!(a.report()["target"], "/keyed/x");
    let a = call(&mut client, Method::GET, "/nowhere", &[], &[]).await;
    assert_eq!(a.status, 404);

    // Many streams at once on one connection.
    let calls = (0..40).map(|i| {
        let mut c = client.clone();
        async move { call(&mut c, Method::GET, &format!("/open/many/{i}"), &[], &[]).await }
    });
    let answers = futures::future::join_all(calls).await;
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.report()["target"], format!("/open/many/{i}"));
    }

    let evs = events(&gw, 47).await;
    assert_eq!(
        evs.iter()
            .filter(|e| e.route.as_deref() == Some("open"))
            .count(),
        44
    );
    let keyed: Vec<_> = evs
        .iter()
        .filter(|e| e.route.as_deref() == Some("keyed"))
        .collect();
    assert_eq!(keyed.len(), 2);
    assert!(keyed.iter().any(|e| e.status == 401));
    assert!(
        keyed
            .iter()
            .any(|e| e.status == 200 && e.consumer.as_deref() == Some("acme"))
    );
    let sized = evs.iter().find(|e| e.path == "/open/sized").unwrap();
    assert_eq!(sized.req_bytes, 11);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_body_over_the_limit_gets_413_and_the_connection_serves_on() {
    let gw = gateway_with(|c| c.connections.max_body_bytes = 8).await;
    let (mut client, _conn) = h2_client(TcpStream::connect(gw.addr).await.unwrap()).await;
    let a = call(
        &mut client,
        Method::POST,
        "/open/big",
        &[("content-length", "9")],
        &["123456789"],
    )
    .await;
    assert_eq!(a.status, 413);
    let a = call(
        &mut client,
        Method::POST,
        "/open/big",
        &[],
        &["12345", "6789"],
    )
    .await;
    assert_eq!(a.status, 413);
    let a = call(&mut client, Method::GET, "/open/after", &[], &[]).await;
    assert_eq!(a.report()["target"], "/open/after");
    gw.shutdown.cancel();
}

/// How many connections the gateway closed for misbehaving, by `reason`.
fn abusive(gw: &common::Running, reason: &'static str) -> u64 {
    gw.metrics
        .abusive_connections
        .get_or_create(&tollgate_gateway::metrics::DropLabels { reason })
        .get()
}

/// Waits for `condition`, with a deadline.
async fn until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reset_while_the_upstream_works_are_dropped_and_the_connection_closed() {
    let gw = gateway_with(|_| {}).await;
    let (client, conn) = h2_client(TcpStream::connect(gw.addr).await.unwrap()).await;
    // Each stream is reset only once the gateway has it at the upstream (which answers /slow
    // after 300 ms): past h2's own check of streams reset before they are accepted.
    // The 100th stream is where the gateway starts judging (RESET_FLOOR).
    for i in 0..99 {
        let mut ready = client
            .clone()
            .ready()
            .await
            .expect("the connection takes a stream");
        let req = Request::builder()
            .uri(format!("http://localhost/open/{i}/slow"))
            .body(())
            .unwrap();
        let (_, mut send) = ready.send_request(req, true).unwrap();
        until(&format!("request {i} reaches the upstream"), || {
            SLOW_COUNT.load(std::sync::atomic::Ordering::SeqCst) == i + 1
        })
        .await;
        send.send_reset(Reason::CANCEL);
    }
    // Each reset ended its exchange at once: 99 events, none waiting for its answer.
    let evs = events(&gw, 99).await;
    assert!(
        evs.iter().all(|e| e.status == 400 && !e.billable),
        "{:?}",
        evs[0]
    );
    assert!(
        evs.iter().all(|e| e.latency_us < 300_000),
        "a reset stream waited for its answer"
    );
    // The next stream finds the connection closed for its conduct.
    let next = async {
        loop {
            let Ok(mut ready) = client.clone().ready().await else {
                return;
            };
            let req = Request::builder()
                .uri("http://localhost/open/x")
                .body(())
                .unwrap();
            let Ok((response, _)) = ready.send_request(req, true) else {
                return;
            };
            if response.await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("the connection is closed");
    let ended = conn.await.unwrap().expect_err("closed by the gateway");
    assert_eq!(ended.reason(), Some(Reason::ENHANCE_YOUR_CALM), "{ended}");
    assert_eq!(abusive(&gw, "http2_resets"), 1);
    gw.shutdown.cancel();
}

/// Opens streams and resets each at once, until the gateway ends the connection. When the
/// client still reads it, the GOAWAY says `ENHANCE_YOUR_CALM`; a client still writing may see
/// the close as a reset instead.
async fn rapid_reset(addr: SocketAddr) {
    let (client, conn) = h2_client(TcpStream::connect(addr).await.unwrap()).await;
    let flood = async {
        for i in 0..100_000 {
            let Ok(mut ready) = client.clone().ready().await else {
                return;
            };
            let req = Request::builder()
                .uri(format!("http://localhost/open/slow/{i}"))
                .body(())
                .unwrap();
            let Ok((_, mut send)) = ready.send_request(req, true) else {
                return;
            };
            send.send_reset(Reason::CANCEL);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), flood)
        .await
        .expect("the gateway ends the flood in time");
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the connection ends")
        .unwrap();
    let e = ended.expect_err("the connection ends with an error");
    if e.is_go_away() {
        assert_eq!(e.reason(), Some(Reason::ENHANCE_YOUR_CALM), "{e}");
    } else {
        assert!(e.is_io(), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_and_the_gateway_serves_others_on() {
    let gw = gateway_with(|_| {}).await;
    rapid_reset(gw.addr).await;
    until("the flooding connection is counted", || {
        abusive(&gw, "http2_resets") + abusive(&gw, "http2_protocol") == 1
    })
    .await;
    let (mut client, _conn) = h2_client(TcpStream::connect(gw.addr).await.unwrap()).await;
    let a = call(&mut client, Method::GET, "/open/after", &[], &[]).await;
    assert_eq!(a.report()["target"], "/open/after");
    gw.shutdown.cancel();
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK literal field (not indexed, new name) whose value is `len` bytes.
fn literal(name: &[u8], len: usize) -> Vec<u8> {
    assert!(name.len() < 127 && (127..127 + (1 << 14)).contains(&len));
    let mut out = vec![0x00, name.len() as u8];
    out.extend_from_slice(name);
    let rest = len - 127;
    out.extend_from_slice(&[0x7f, 0x80 | (rest & 0x7f) as u8, (rest >> 7) as u8]);
    out.extend(std::iter::repeat_n(b'a', len));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off_long_before_memory_grows() {
    let gw = gateway_with(|_| {}).await;
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    sock.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    sock.write_all(&frame(0x4, 0, 0, &[])).await.unwrap(); // SETTINGS
    // HEADERS (GET http /) without END_HEADERS, then CONTINUATION frames of 16 KB each.
    let mut head = vec![0x82, 0x86, 0x84];
    head.extend(literal(b"x-first", 1000));
    sock.write_all(&frame(0x1, 0x1, 1, &head)).await.unwrap();
    let (mut rd, mut wr) = sock.into_split();
    let continuation = frame(0x9, 0, 1, &literal(b"x-more", 16_000));
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        while sent < 64 * 1024 * 1024 {
            if wr.write_all(&continuation).await.is_err() {
                break;
            }
            sent += continuation.len();
        }
        sent
    });
    // The gateway answers with GOAWAY (or a reset) and closes: read until the end.
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut seen)).await;
    assert!(
        read.is_ok(),
        "the gateway kept the flooding connection open"
    );
    let sent = writer.await.unwrap();
    assert!(
        sent < 16 * 1024 * 1024,
        "the gateway read {sent} bytes of one header block before closing"
    );
    // A GOAWAY frame (type 7) came before the close.
    let mut at = 0;
    let mut goaway = false;
    while at + 9 <= seen.len() {
        let len = u32::from_be_bytes([0, seen[at], seen[at + 1], seen[at + 2]]) as usize;
        goaway |= seen[at + 3] == 0x7;
        at += 9 + len;
    }
    assert!(goaway, "no GOAWAY among {} bytes", seen.len());
    assert_eq!(abusive(&gw, "http2_protocol"), 1);
    // And the gateway serves the next client.
    let (mut client, _conn) = h2_client(TcpStream::connect(gw.addr).await.unwrap()).await;
    let a = call(&mut client, Method::GET, "/open/after", &[], &[]).await;
    assert_eq!(a.report()["target"], "/open/after");
    gw.shutdown.cancel();
}

#[cfg(feature = "tls")]
mod tls {
    use std::path::PathBuf;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::client::TlsStream;

    use super::*;

    /// The runner's CARGO_MANIFEST_DIR first: a test binary built in another checkout and
    /// found fresh carries that checkout's path in `env!`.
    fn fixture(name: &str) -> PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
            .join("tests/fixtures")
            .join(name)
    }

    /// A TLS connection that trusts the test CA, offering `alpn`.
    async fn connect(addr: SocketAddr, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(fixture("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("a TLS handshake with the test certificate")
    }

    async fn tls_gateway() -> common::Running {
        gateway_with(|c| {
            c.tls = Some(tollgate_gateway::config::TlsConfig {
                cert_path: fixture("server.pem"),
                key_path: fixture("server.key"),
            })
        })
        .await
    }

    /// An HTTP/1.1 GET over `io`; the whole answer's text.
    async fn h1_get(mut io: TlsStream<TcpStream>, path: &str) -> String {
        io.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut out))
            .await
            .expect("an answer in time")
            .ok();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_serves_http2_and_http1_by_alpn() {
        let gw = tls_gateway().await;
        let io = connect(gw.addr, &[b"h2", b"http/1.1"]).await;
        assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut client, _conn) = h2_client(io).await;
        let a = call(
            &mut client,
            Method::GET,
            "/keyed/over-h2",
            &[("x-api-key", "k-acme")],
            &[],
        )
        .await;
        assert_eq!(a.report()["target"], "/keyed/over-h2");

        let io = connect(gw.addr, &[b"http/1.1"]).await;
        assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let text = h1_get(io, "/open/over-h1").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("/open/over-h1"), "{text}");

        // No ALPN at all: HTTP/1.1.
        let text = h1_get(connect(gw.addr, &[]).await, "/open/no-alpn").await;
        assert!(text.contains("/open/no-alpn"), "{text}");

        // A plain-text request on the TLS port gets no HTTP answer.
        let mut plain = TcpStream::connect(gw.addr).await.unwrap();
        plain
            .write_all(b"GET /open/x HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut out)).await;
        assert!(!String::from_utf8_lossy(&out).contains("/open/x"));

        let evs = events(&gw, 3).await;
        assert_eq!(evs.iter().filter(|e| e.status == 200).count(), 3);
        gw.shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_certificate_is_a_startup_error_that_names_the_key() {
        let mut config = tollgate_gateway::GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: Some(tollgate_gateway::config::TlsConfig {
                cert_path: fixture("missing.pem"),
                key_path: fixture("server.key"),
            }),
            ..Default::default()
        };
        config.id = Some("gw-tls".into());
        let log = tollgate_bus::EmbeddedLog::open(tollgate_bus::EmbeddedConfig {
            dir: tempfile::tempdir().unwrap().keep(),
            ..Default::default()
        })
        .unwrap();
        let err = tollgate_gateway::Gateway::bind(
            config,
            Default::default(),
            &Default::default(),
            Arc::new(log),
            tollgate_gateway::GatewayMetrics::unregistered(),
        )
        .await
        .err()
        .expect("a missing certificate is refused");
        assert!(err.to_string().contains("gateway.tls.cert_path"), "{err}");
    }
}
