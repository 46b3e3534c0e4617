//! The gateway's HTTP/1.1 on real sockets, byte by byte: bodies re-framed between the two sides,
//! pipelining, keep-alive after an early answer, smuggling and size probes, and pooled upstream
//! connections the upstream has closed. The upstream is a scripted TCP server that reports what
//! it received, so each test sees both sides of the gateway.

mod common;

use common::scripted::{
    DROPPED, SLOW_STARTED, gateway, gateway_with, read_body, upstream, upstream_with,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate_bus::EmbeddedLog;
use tollgate_gateway::GatewayConfig;
use tollgate_gateway::config::ConnectionSettings;
use tollgate_gateway::h1::{self, Parsed};
use tollgate_schemas::RequestEvent;

/// A client connection that reads answers one at a time.
struct Client {
    sock: TcpStream,
    buf: BytesMut,
}

impl Client {
    async fn connect(gw: &common::Running) -> Client {
        Client {
            sock: TcpStream::connect(gw.addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).await.unwrap();
    }

    /// The next answer: status, head text, body.
    async fn answer(&mut self, method: &http::Method) -> (u16, String, Vec<u8>) {
        let read = async {
            let head = loop {
                if let Parsed::Head(h) = h1::parse_response(&mut self.buf, method).unwrap() {
                    break h;
                }
                assert!(
                    self.sock.read_buf(&mut self.buf).await.unwrap() > 0,
                    "closed before an answer"
                );
            };
            let text: String = head
                .fields
                .iter()
                .map(|(n, v)| {
                    format!(
                        "{}: {}\n",
                        String::from_utf8_lossy(n).to_lowercase(),
                        String::from_utf8_lossy(v)
                    )
                })
                .collect();
            let body = read_body(&mut self.sock, &mut self.buf, head.framing).await;
            (head.status.as_u16(), text, body)
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("an answer in time")
    }

    async fn report(&mut self) -> serde_json::Value {
        let (status, head, body) = self.answer(&http::Method::POST).await;
        assert_eq!(status, 200, "{head}");
        serde_json::from_slice(&body).unwrap()
    }

    /// Whether the gateway closed the connection (within a deadline).
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.sock.read_to_end(&mut rest)).await,
            Ok(Ok(_)) | Ok(Err(_))
        ) && rest.is_empty()
    }
}

/// A `/open/slow` request, once the upstream has it (it answers 300 ms later).
async fn slow_in_flight(gw: &common::Running) -> Client {
    let mut slow = Client::connect(gw).await;
    slow.send(b"GET /open/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !SLOW_STARTED.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow request never arrived"
        );
        tokio::task::yield_now().await;
    }
    slow
}

/// The answer to `GET path` with `headers` (each line ending in CRLF), on a new connection.
async fn get(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, Vec<u8>) {
    let mut c = Client {
        sock: TcpStream::connect(addr).await.unwrap(),
        buf: BytesMut::new(),
    };
    c.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes())
        .await;
    c.answer(&http::Method::GET).await
}

async fn events(log: &EmbeddedLog, n: usize) -> Vec<RequestEvent> {
    common::events(&mut log.subscribe("wire").unwrap(), n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_reframed_between_the_sides_and_metered_as_data() {
    let gw = gateway().await;
    let mut c = Client::connect(&gw).await;
    // A chunked request body reaches the upstream chunked by the gateway (extensions and
    // trailers dropped), its data counted once.
    c.send(b"POST /open/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n").await;
    let r = c.report().await;
    assert_eq!(
        (r["body"].as_str(), r["transfer-encoding"].as_str()),
        (Some("hello world"), Some("chunked"))
    );
    // Expect: 100-continue is answered by the gateway, not passed on.
    c.send(
        b"POST /open/b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    let (status, _, _) = c.answer(&http::Method::POST).await;
    assert_eq!(status, 100);
    c.send(b"abc").await;
    let r = c.report().await;
    assert_eq!(
        (
            r["body"].as_str(),
            r["expect"].as_str(),
            r["content-length"].as_str()
        ),
        (Some("abc"), None, Some("3"))
    );
    // An answer delimited by the upstream closing its connection goes to an HTTP/1.1 client
    // chunked, and the client's connection stays open.
    c.send(b"GET /open/until-close HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (status, head, body) = c.answer(&http::Method::GET).await;
    assert_eq!(status, 200);
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let until_close_len = body.len() as u64;
    assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
    // A chunked answer stays chunked, and HEAD gets no body.
    c.send(
        b"GET /open/chunked HTTP/1.1\r\nHost: x\r\n\r\nHEAD /open/h HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let (_, head, body) = c.answer(&http::Method::GET).await;
    assert!(
        head.contains("transfer-encoding: chunked") && !body.is_empty(),
        "{head}"
    );
    let (status, head, body) = c.answer(&http::Method::HEAD).await;
    assert!(
        status == 200 && body.is_empty() && head.contains("content-length:"),
        "{head}"
    );
    // An HTTP/1.0 client gets the close-delimited answer as it is, then the connection ends.
    let mut old = Client::connect(&gw).await;
    old.send(b"GET /open/until-close HTTP/1.0\r\n\r\n").await;
    let (status, head, body) = old.answer(&http::Method::GET).await;
    assert!(
        status == 200 && !head.contains("transfer-encoding") && !body.is_empty(),
        "{head}"
    );

    let evs = events(&gw.log, 6).await;
    let at = |path: &str| {
        evs.iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no event for {path}"))
    };
    assert_eq!(
        (at("/open/a").req_bytes, at("/open/b").req_bytes),
        (11, 3),
        "data bytes, not framing"
    );
    assert!(
        evs.iter()
            .filter(|e| e.path == "/open/until-close")
            .any(|e| e.resp_bytes == until_close_len)
    );
    assert!(
        evs.iter()
            .all(|e| e.status == 200 && e.route.as_deref() == Some("open"))
    );
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_and_an_early_401_keeps_the_connection() {
    let gw = gateway().await;
    let mut c = Client::connect(&gw).await;
    let hidden = "GET /open/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    c.send(
        format!(
            "POST /open/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nA\
             POST /keyed/2 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{hidden}\
             GET /open/3 HTTP/1.1\r\nHost: x\r\n\r\n",
            hidden.len()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.report().await["target"], "/open/1");
    // The refused request's body was read whole, so the connection carries on, and the body
    // (which looks like a request) is never taken for one.
    let (status, head, _) = c.answer(&http::Method::POST).await;
    assert!(
        status == 401 && !head.contains("connection: close"),
        "{head}"
    );
    assert_eq!(c.report().await["target"], "/open/3");
    // A refused request whose body has not arrived: the answer says close, and the
    // connection ends, so an unread body can never become a request.
    c.send(b"POST /keyed/4 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
        .await;
    let (status, head, _) = c.answer(&http::Method::POST).await;
    assert!(
        status == 401 && head.contains("connection: close"),
        "{head}"
    );
    assert!(c.closed().await);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_size_probes_get_a_named_refusal_and_a_closed_connection() {
    let gw = gateway().await;
    let long_target = format!(
        "GET /open/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(h1::MAX_REQUEST_LINE)
    );
    let big_head = format!(
        "GET /open/a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(h1::MAX_HEAD)
    );
    let probes: Vec<(&str, Vec<u8>, u16)> = vec![
        ("CL with TE", b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /open/smuggled HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), 400),
        ("two CL", b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd".to_vec(), 400),
        ("signed CL", b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nabcd".to_vec(), 400),
        ("obfuscated TE", b"POST /open/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".to_vec(), 501),
        ("space before colon", b"POST /open/a HTTP/1.1\r\nHost: x\r\nContent-Length : 4\r\n\r\nabcd".to_vec(), 400),
        ("obs-fold", b"GET /open/a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n 2\r\n\r\n".to_vec(), 400),
        ("bad chunk size", b"POST /open/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(), 400),
        ("request line", long_target.into_bytes(), 414),
        ("head size", big_head.into_bytes(), 431),
    ];
    for (name, bytes, status) in probes {
        let mut c = Client::connect(&gw).await;
        c.send(&bytes).await;
        let (got, head, body) = c.answer(&http::Method::POST).await;
        assert_eq!(got, status, "{name}: {head}");
        assert!(head.contains("connection: close"), "{name}: {head}");
        let why: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            why["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert!(
            c.closed().await,
            "{name}: one answer, then the connection ends"
        );
    }
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_replaced_without_an_error() {
    let gw = gateway().await;
    // Every answer on /drop comes on a connection the upstream then closes, though it did not
    // say so: each next request finds its pooled connection dead and must be sent again on a
    // new one, invisibly to the client.
    for i in 0..20 {
        let mut c = Client::connect(&gw).await;
        c.send(format!("GET /open/{i}/drop HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        assert_eq!(c.report().await["target"], format!("/open/{i}/drop"));
        // The upstream has closed the connection the gateway keeps for the next request.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while DROPPED.load(Ordering::SeqCst) <= i {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the upstream did not close"
            );
            tokio::task::yield_now().await;
        }
    }
    let evs = events(&gw.log, 20).await;
    assert!(
        evs.iter().all(|e| e.status == 200),
        "{:?}",
        evs.iter().map(|e| e.status).collect::<Vec<_>>()
    );
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_gets_408_and_an_idle_connection_is_closed() {
    let gw = gateway_with(|c| {
        c.connections = ConnectionSettings {
            head_timeout_ms: 300,
            idle_timeout_ms: 600,
            io_timeout_ms: 1000,
            ..Default::default()
        }
    })
    .await;
    // Slowloris: the head starts and never ends, a byte now and then keeping it alive.
    let mut slow = Client::connect(&gw).await;
    slow.send(b"GET /open/a HTTP/1.1\r\nHost: x\r\n").await;
    let trickle = async {
        for _ in 0..20 {
            if slow.sock.write_all(b"X").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(400), trickle).await;
    let (status, head, _) = slow.answer(&http::Method::GET).await;
    assert!(
        status == 408 && head.contains("connection: close"),
        "{head}"
    );
    // A keep-alive connection that sends nothing after its answer is closed without a word.
    let mut idle = Client::connect(&gw).await;
    idle.send(b"GET /open/b HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(idle.report().await["target"], "/open/b");
    assert!(idle.closed().await, "closed after the idle timeout");
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_idle_connections_close_at_once_and_an_exchange_finishes() {
    // The idle timeout is a minute and the upstream's 30 s (a connection's one timer may
    // still be set to its last answer's deadline): a connection closed within `closed`'s 5 s
    // was closed by the shutdown.
    let gw = gateway_with(|c| c.upstreams.get_mut("app").unwrap().timeout_ms = 30_000).await;
    let mut idle = Vec::new();
    for path in ["/open/a", "/open/b", "/open/c"] {
        let mut c = Client::connect(&gw).await;
        // Two requests each: a connection waits between them as it does after its last.
        for _ in 0..2 {
            c.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await;
            assert_eq!(c.report().await["target"], path);
        }
        idle.push(c);
    }
    let mut slow = slow_in_flight(&gw).await;
    gw.shutdown.cancel();
    for mut c in idle {
        assert!(
            c.closed().await,
            "an idle connection stayed open after shutdown"
        );
    }
    let (status, head, _) = slow.answer(&http::Method::POST).await;
    assert!(
        status == 200 && head.contains("connection: close"),
        "the exchange under way is answered, and its connection closed: {status} {head}"
    );
    assert!(slow.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_busy_for_longer_than_the_idle_timeout_stays_open() {
    // The connection's one timer (`deadline.rs`) first fires at the idle deadline of its first
    // wait, long after later requests moved the deadline on: it must follow, not close.
    let gw = gateway_with(|c| {
        c.connections = ConnectionSettings {
            head_timeout_ms: 250,
            idle_timeout_ms: 300,
            io_timeout_ms: 1000,
            ..Default::default()
        }
    })
    .await;
    let mut c = Client::connect(&gw).await;
    let began = std::time::Instant::now();
    for i in 0..8 {
        c.send(format!("GET /open/k{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        assert_eq!(
            c.report().await["target"],
            format!("/open/k{i}"),
            "request {i}"
        );
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    assert!(began.elapsed() > Duration::from_millis(900));
    // Then idle: closed once the idle timeout has passed since the last answer.
    assert!(c.closed().await, "closed after the idle timeout");
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_tunnelled_and_metered_once_when_it_closes() {
    let gw = gateway().await;
    let mut c = Client::connect(&gw).await;
    // The handshake, with a first frame right behind it.
    c.send(b"GET /open/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\nping").await;
    let (status, head, _) = c.answer(&http::Method::GET).await;
    assert!(
        status == 101
            && head.contains("upgrade: websocket")
            && head.contains("sec-websocket-accept: x"),
        "{head}"
    );
    let mut echoed = c.buf.split().to_vec();
    while echoed.len() < 4 {
        let mut more = [0u8; 64];
        let n = c.sock.read(&mut more).await.unwrap();
        assert!(n > 0, "closed early");
        echoed.extend_from_slice(&more[..n]);
    }
    assert_eq!(echoed, b"ping");
    c.send(b"hello!").await;
    let mut back = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), c.sock.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"hello!");
    // The client closes; the tunnel closes both ways and the event is written.
    c.sock.shutdown().await.unwrap();
    assert!(c.closed().await);
    let evs = events(&gw.log, 1).await;
    let e = &evs[0];
    assert_eq!(
        (e.status, e.path.as_str(), e.req_bytes, e.resp_bytes),
        (101, "/open/ws", 10, 10)
    );
    assert!(e.latency_us >= e.upstream_latency_us.unwrap());
    // Without `Connection: upgrade` the same request is a plain GET: the upgrade is not passed on.
    let mut plain = Client::connect(&gw).await;
    plain
        .send(b"GET /open/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        .await;
    assert_eq!(plain.report().await["target"], "/open/ws");
    // An open WebSocket does not hold up shutdown: it is closed, and metered.
    let mut open = Client::connect(&gw).await;
    open.send(
        b"GET /open/ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: WebSocket\r\n\r\n",
    )
    .await;
    assert_eq!(open.answer(&http::Method::GET).await.0, 101);
    gw.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), gw.running)
        .await
        .expect("the gateway stops with a WebSocket open")
        .unwrap();
    assert!(open.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_target_is_skipped_and_max_in_flight_sheds_load_with_503() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap(); // closed once dropped
    let gw = gateway_with(|c| {
        let app = c.upstreams.get_mut("app").unwrap();
        app.targets.insert(0, format!("http://{dead}"));
        app.balance = tollgate_gateway::config::Balance::LeastRequest;
    })
    .await;
    // Every request gets through although one target of two refuses connections.
    for i in 0..12 {
        let mut c = Client::connect(&gw).await;
        c.send(format!("GET /open/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        assert_eq!(c.report().await["target"], format!("/open/{i}"));
    }
    gw.shutdown.cancel();

    // One request in flight is the limit: while it is, the next is shed at once.
    let gw = gateway_with(|c| c.upstreams.get_mut("app").unwrap().max_in_flight = Some(1)).await;
    let mut slow = slow_in_flight(&gw).await;
    let mut c = Client::connect(&gw).await;
    c.send(b"GET /open/now HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (status, head, body) = c.answer(&http::Method::GET).await;
    assert!(
        status == 503 && head.contains("retry-after: 1"),
        "{status} {head}"
    );
    assert!(String::from_utf8_lossy(&body).contains("max_in_flight"));
    assert_eq!(slow.report().await["target"], "/open/slow");
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_quota_state_fails_open_or_closed_as_configured() {
    use tollgate_gateway::config::WhenStale;
    // The query API is unreachable: the quota state is never fetched, so it is stale at once.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let status = |gw: &common::Running, key: &'static str| {
        let addr = gw.addr;
        async move { get(addr, "/keyed/x", &format!("x-api-key: {key}\r\n")).await }
    };
    for when in [WhenStale::Closed, WhenStale::Open] {
        let gw = gateway_with(|c| {
            c.quota.url = Some(format!("http://{dead}/v1/quota"));
            c.quota.stale_after_s = Some(30);
            c.quota.when_stale = when;
        })
        .await;
        let (got, head, body) = status(&gw, "k-metered").await;
        match when {
            WhenStale::Closed => {
                assert!(
                    got == 503 && head.contains("retry-after: 1"),
                    "{got} {head}"
                );
                assert!(String::from_utf8_lossy(&body).contains("stale_after_s"));
            }
            WhenStale::Open => assert_eq!(got, 200, "not enforced while stale"),
        }
        assert_eq!(
            status(&gw, "k-acme").await.0,
            200,
            "a plan without a quota is never refused for it"
        );
        gw.shutdown.cancel();
    }
}

/// A stand-in for the query API's `/v1/quota`: every request gets `body` (JSON).
async fn quota_answering(body: String) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if sock.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// The gateway keeps the last quota state it received in its state directory, and a gateway
/// started while the query API is unreachable enforces what that file holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_enforces_the_quota_state_it_kept_on_disk() {
    let end = (chrono::Utc::now() + chrono::Duration::days(2)).to_rfc3339();
    let exhausted = serde_json::json!({
        "version": 1, "epoch": 1, "full": true,
        "consumers": [{
            "consumer": "metered", "plan": "metered", "period": "2026-11", "period_end": end,
            "limit": 10, "used": 10, "remaining": 0, "state": "exceeded"
        }]
    });
    let quota = quota_answering(exhausted.to_string()).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let metered = |gw: &common::Running| {
        let addr = gw.addr;
        async move { get(addr, "/keyed/x", "x-api-key: k-metered\r\n").await.0 }
    };

    let first = gateway_with(|c| {
        c.quota.url = Some(format!("http://{quota}/v1/quota"));
        c.quota.poll_ms = Some(20);
        c.state_dir = state.path().to_path_buf();
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metered(&first).await != 429 || !state.path().join("quota-state.json").exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the quota state was never enforced and kept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.shutdown.cancel();
    first.running.await.unwrap();

    let restarted = gateway_with(|c| {
        c.quota.url = Some(format!("http://{dead}/v1/quota"));
        c.state_dir = state.path().to_path_buf();
    })
    .await;
    assert_eq!(metered(&restarted).await, 429, "the kept state is enforced");
    assert_eq!(
        get(restarted.addr, "/keyed/x", "x-api-key: k-acme\r\n")
            .await
            .0,
        200,
        "a consumer without a quota is not refused"
    );
    restarted.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_failing_its_health_checks_gets_no_requests_until_it_passes() {
    let a_ok = Arc::new(AtomicBool::new(true));
    let a = upstream_with(a_ok.clone()).await;
    let b = upstream().await;
    let gw = gateway_with(|c| {
        let app = c.upstreams.get_mut("app").unwrap();
        app.targets = vec![format!("http://{a}"), format!("http://{b}")];
        app.health_check = Some(tollgate_gateway::config::HealthCheck {
            path: "/health".into(),
            interval_ms: 20,
            timeout_ms: 500,
            unhealthy_after: 1,
            healthy_after: 1,
        });
    })
    .await;
    // Which targets answer ten requests in a row.
    let served = || async {
        let mut ports = std::collections::HashSet::new();
        for i in 0..10 {
            let mut c = Client::connect(&gw).await;
            c.send(format!("GET /open/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await;
            ports.insert(c.report().await["upstream"].as_u64().unwrap() as u16);
        }
        ports
    };
    assert_eq!(served().await.len(), 2, "both healthy: both serve");
    a_ok.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while served().await != [b.port()].into() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failing target still gets requests"
        );
    }
    a_ok.store(true, Ordering::SeqCst);
    while !served().await.contains(&a.port()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the target never came back"
        );
    }
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_routes_without_dropping_a_request_and_a_bad_file_changes_nothing() {
    use tollgate_gateway::metrics::ResultLabels;
    let gw = gateway().await;
    let status = |path: &'static str| {
        let addr = gw.addr;
        async move { get(addr, path, "").await.0 }
    };
    assert_eq!(status("/v2/a").await, 404);
    // A request in flight while the configuration changes finishes on the one it started with.
    let mut slow = slow_in_flight(&gw).await;
    let mut config = gw.config.clone();
    let mut v2 = config.routes[0].clone();
    v2.id = "v2".into();
    v2.path = "/v2/{*rest}".into();
    config.routes.push(v2);
    let consumers = gw
        .reloader
        .reload(&config, &gw.consumers, &gw.plans)
        .unwrap();
    let again = gw
        .reloader
        .reload(&config, &gw.consumers, &gw.plans)
        .unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&consumers, &again),
        "the same consumers keep their table (and their quota state)"
    );
    assert_eq!(slow.report().await["target"], "/open/slow");
    assert_eq!(status("/v2/a").await, 200, "the new route serves");
    // Refused: the running configuration stays, and the error names the key.
    let mut bad = config.clone();
    bad.routes[0].upstream = "nowhere".into();
    let err = gw
        .reloader
        .reload(&bad, &gw.consumers, &gw.plans)
        .unwrap_err();
    assert!(
        err.contains("gateway.routes[0]") && err.contains("nowhere"),
        "{err}"
    );
    let mut moved = config.clone();
    moved.listen = "127.0.0.1:1".parse().unwrap();
    let err = gw
        .reloader
        .reload(&moved, &gw.consumers, &gw.plans)
        .unwrap_err();
    assert!(
        err.contains("gateway.listen") && err.contains("restart"),
        "{err}"
    );
    assert_eq!(status("/v2/a").await, 200);
    assert_eq!(status("/open/b").await, 200);
    let count = |result| {
        gw.metrics
            .config_reloads
            .get_or_create(&ResultLabels { result })
            .get()
    };
    assert_eq!((count("ok"), count("error")), (2, 2));
    assert_eq!(gw.metrics.config_reload_failed.get(), 1);
    let evs = events(&gw.log, 4).await;
    assert!(evs.iter().any(|e| e.route.as_deref() == Some("v2")));
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_and_paths_are_decided_once() {
    let gw = gateway_with(|c| c.connections.max_body_bytes = 100).await;
    // A declared length over the limit: refused before a byte of the body is read.
    let mut c = Client::connect(&gw).await;
    c.send(b"POST /open/big HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        .await;
    let (status, head, _) = c.answer(&http::Method::POST).await;
    assert!(
        status == 413 && head.contains("connection: close"),
        "{head}"
    );
    // A chunked body that grows past it.
    let mut c = Client::connect(&gw).await;
    let chunk = format!("3c\r\n{}\r\n", "z".repeat(60));
    c.send(format!("POST /open/big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}{chunk}0\r\n\r\n").as_bytes()).await;
    let (status, head, _) = c.answer(&http::Method::POST).await;
    assert!(
        status == 413 && head.contains("connection: close"),
        "{head}"
    );
    // Under the limit, fine.
    let mut c = Client::connect(&gw).await;
    c.send(b"POST /open/small HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    assert_eq!(c.report().await["body"], "hello");
    // The path is normalised once: routing and the upstream see the same one.
    let report = |path: &'static str| {
        let addr = gw.addr;
        async move {
            let (status, _, body) = get(addr, path, "").await;
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default(),
            )
        }
    };
    let (status, r) = report("/open/x/../y").await;
    assert_eq!((status, r["target"].as_str()), (200, Some("/open/y")));
    let (status, r) = report("/keyed/%2e%2e/open/z").await;
    assert_eq!(
        (status, r["target"].as_str()),
        (200, Some("/open/z")),
        "routed as /open/z, no key needed"
    );
    assert_eq!(report("//open//w").await.1["target"], "/open/w");
    assert_eq!(report("/open/a%2Fb").await.0, 400);
    assert_eq!(report("/open/../../etc/passwd").await.0, 400);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_from_clients_is_kept_only_when_trusted() {
    for trust in [false, true] {
        let gw = gateway_with(|c| c.trust_forwarded_for = trust).await;
        let (_, _, body) = get(gw.addr, "/open/a", "X-Forwarded-For: 203.0.113.9\r\n").await;
        let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let want = if trust {
            "203.0.113.9, 127.0.0.1"
        } else {
            "127.0.0.1"
        };
        assert_eq!(r["x-forwarded-for"], want, "trust_forwarded_for: {trust}");
        gw.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_limit_applies_per_consumer_on_that_route_only() {
    let gw = gateway_with(|c| {
        let keyed = c.routes.iter_mut().find(|r| r.id == "keyed").unwrap();
        keyed.rate_limit = Some(tollgate_schemas::config::RateLimit {
            per_second: 1,
            burst: Some(2),
        });
    })
    .await;
    let call = |path: &'static str, key: &'static str| {
        let addr = gw.addr;
        async move { get(addr, path, &format!("x-api-key: {key}\r\n")).await }
    };
    assert_eq!(call("/keyed/1", "k-acme").await.0, 200);
    assert_eq!(call("/keyed/2", "k-acme").await.0, 200);
    let (status, head, _) = call("/keyed/3", "k-acme").await;
    assert!(
        status == 429 && head.contains("ratelimit-limit: 1") && head.contains("retry-after: 1"),
        "{head}"
    );
    assert_eq!(
        call("/keyed/4", "k-metered").await.0,
        200,
        "another consumer has its own bucket"
    );
    assert_eq!(
        call("/open/5", "k-acme").await.0,
        200,
        "other routes are not limited"
    );
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_413_and_429_on_a_keep_alive_post_never_read_the_body_as_a_request() {
    let gw = gateway_with(|c| {
        c.connections.max_body_bytes = 100;
        let keyed = c.routes.iter_mut().find(|r| r.id == "keyed").unwrap();
        keyed.rate_limit = Some(tollgate_schemas::config::RateLimit {
            per_second: 1,
            burst: Some(1),
        });
    })
    .await;
    // Each refused body looks like a request; the gateway must skip it whole.
    let hidden = format!(
        "GET /open/smuggled HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(80)
    );
    let post = |path: &str, key: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\nContent-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        )
    };
    let mut c = Client::connect(&gw).await;
    c.send(
        format!(
            "{}{}GET /open/after HTTP/1.1\r\nHost: x\r\n\r\n",
            post("/open/big", "k-acme"),
            post("/keyed/1", "k-acme")
        )
        .as_bytes(),
    )
    .await;
    let (status, head, _) = c.answer(&http::Method::POST).await;
    assert!(
        status == 413 && !head.contains("connection: close"),
        "{head}"
    );
    let (status, _, _) = c.answer(&http::Method::POST).await;
    assert_eq!(status, 413, "this body is over the limit too");
    assert_eq!(
        c.report().await["target"],
        "/open/after",
        "the next real request, not the hidden one"
    );
    // 429: a buffered body under the limit is skipped after the refusal too.
    let small = "GET /open/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let small_post = |n: u32| {
        format!(
            "POST /keyed/{n} HTTP/1.1\r\nHost: x\r\nx-api-key: k-acme\r\nContent-Length: {}\r\n\r\n{small}",
            small.len()
        )
    };
    let mut c = Client::connect(&gw).await;
    let posts: String = (1..=3).map(small_post).collect();
    c.send(format!("{posts}GET /open/after2 HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let mut refused = 0;
    for _ in 0..3 {
        let (status, head, _) = c.answer(&http::Method::POST).await;
        assert!(status == 200 || status == 429, "{status} {head}");
        assert!(!head.contains("connection: close"), "{head}");
        refused += usize::from(status == 429);
    }
    assert!(
        refused >= 1,
        "three requests within a second against a bucket of one"
    );
    assert_eq!(c.report().await["target"], "/open/after2");
    gw.shutdown.cancel();
}

/// An upstream that reads a request and closes the connection without answering.
async fn resetting_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
            });
        }
    });
    addr
}

/// The statuses of two GETs of `/open/<prefix>N`, sorted.
async fn two_gets(gw: &common::Running, prefix: &str) -> Vec<u16> {
    let mut statuses = Vec::new();
    for i in 0..2 {
        statuses.push(get(gw.addr, &format!("/open/{prefix}{i}"), "").await.0);
    }
    statuses.sort();
    statuses
}

/// The statuses of two POSTs (not idempotent: never retried), sorted.
async fn two_posts(gw: &common::Running) -> Vec<u16> {
    let mut posts = Vec::new();
    for i in 0..2 {
        let mut c = Client::connect(gw).await;
        c.send(
            format!("POST /open/p{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx").as_bytes(),
        )
        .await;
        posts.push(c.answer(&http::Method::POST).await.0);
    }
    posts.sort();
    posts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_on_another_target_within_the_budget() {
    let bad = resetting_upstream().await;
    let good = upstream().await;
    let with = |budget: Option<u32>| {
        move |c: &mut GatewayConfig| {
            let app = c.upstreams.get_mut("app").unwrap();
            app.targets = vec![format!("http://{bad}"), format!("http://{good}")];
            app.retry_budget_percent = budget;
        }
    };
    let gw = gateway_with(with(Some(100))).await;
    // Round robin over a target that drops every request and one that answers: a POST that
    // lands on the bad one is not retried (not idempotent); a GET always gets through.
    let posts = two_posts(&gw).await;
    assert_eq!(posts, [200, 502], "one POST each way");
    for i in 0..4 {
        let (status, _, _) = get(gw.addr, &format!("/open/g{i}"), "").await;
        assert_eq!(status, 200, "GET {i} was retried");
    }
    let evs = events(&gw.log, 6).await;
    let traced = evs.iter().filter(|e| e.path.starts_with("/open/g")).count();
    assert_eq!(traced, 4, "one event per request, retries included");
    gw.shutdown.cancel();
    // Without a budget nothing is retried: some GET meets the bad target.
    let gw = gateway_with(with(None)).await;
    assert_eq!(two_gets(&gw, "n").await, [200, 502]);
    gw.shutdown.cancel();
}

/// An upstream that reads each request's head and then answers `answer` (`None`: never
/// answers, holding the connection).
async fn fixed_upstream(answer: Option<&'static str>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                loop {
                    while !matches!(h1::parse_request(&mut buf), Ok(Parsed::Head(_))) {
                        if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                    match answer {
                        Some(a) => {
                            if sock.write_all(a.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        None => std::future::pending::<()>().await,
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_in_retry_on_status_and_attempts_out_of_time_are_retried_elsewhere() {
    let busy = fixed_upstream(Some(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy",
    ))
    .await;
    let good = upstream().await;
    let gw = gateway_with(|c| {
        let app = c.upstreams.get_mut("app").unwrap();
        app.targets = vec![format!("http://{busy}"), format!("http://{good}")];
        app.retry_budget_percent = Some(100);
        app.retry_on_status = vec![503];
    })
    .await;
    for i in 0..4 {
        let (status, _, _) = get(gw.addr, &format!("/open/s{i}"), "").await;
        assert_eq!(status, 200, "GET {i} was retried past the 503");
    }
    let posts = two_posts(&gw).await;
    assert_eq!(posts, [200, 503], "a POST keeps the answer it got");
    gw.shutdown.cancel();

    // A target that never answers: with `try_timeout_ms` the attempt gives up in time for
    // another; without it the request's whole timeout goes to the first attempt.
    let stalled = fixed_upstream(None).await;
    let with = |try_timeout_ms: Option<u64>| {
        move |c: &mut GatewayConfig| {
            let app = c.upstreams.get_mut("app").unwrap();
            app.targets = vec![format!("http://{stalled}"), format!("http://{good}")];
            app.retry_budget_percent = Some(100);
            app.timeout_ms = 1_000;
            app.try_timeout_ms = try_timeout_ms;
        }
    };
    let gw = gateway_with(with(Some(200))).await;
    for i in 0..4 {
        let (status, _, _) = get(gw.addr, &format!("/open/t{i}"), "").await;
        assert_eq!(status, 200, "GET {i} was retried after its attempt ran out");
    }
    gw.shutdown.cancel();
    let gw = gateway_with(with(None)).await;
    assert_eq!(two_gets(&gw, "u").await, [200, 504]);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_overrides_its_upstreams() {
    let gw = gateway_with(|c| {
        let open = c.routes.iter_mut().find(|r| r.id == "open").unwrap();
        open.timeout_ms = Some(100);
    })
    .await;
    let (status, _, body) = get(gw.addr, "/open/slow", "").await;
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = get(gw.addr, "/keyed/slow", "x-api-key: k-acme\r\n").await;
    assert_eq!(
        status, 200,
        "the upstream's own 2 s still applies elsewhere"
    );
    gw.shutdown.cancel();
}
