//! HTTP/2 from clients (RFC 9113), with the `http2` cargo feature: h2c with prior knowledge on
//! the plain listener (a connection that opens with the HTTP/2 preface), and HTTP/2 over TLS
//! when ALPN picks `h2` (`gateway.tls`). Frames, HPACK and flow control are the `h2` crate's;
//! each stream becomes a request head like an HTTP/1.1 one (`h1::RequestHead`) and runs the same
//! phases (`proxy.rs`): routing, authentication, limits, metering, one event per stream.
//! Upstreams are spoken to in HTTP/1.1, from the worker's pool, as for every other request.
//!
//! Not served: h2c by `Upgrade: h2c` (deprecated by RFC 9113 §3.1), WebSocket over HTTP/2
//! (extended CONNECT, RFC 8441), CONNECT, and trailers (gRPC needs HTTP/2 to the upstream).
//!
//! Limits against the known HTTP/2 attacks:
//! - at most [`MAX_STREAMS`] concurrent streams (`SETTINGS_MAX_CONCURRENT_STREAMS`), and at most
//!   as many of a connection's requests in the gateway at once, whether or not the client still
//!   wants them: a stream past that is refused (`REFUSED_STREAM`);
//! - rapid reset (CVE-2023-44487): a client that resets, or makes the gateway refuse, half of
//!   its streams once it has opened [`RESET_FLOOR`] gets `GOAWAY` with `ENHANCE_YOUR_CALM`
//!   and the connection closes; streams reset before they were even accepted are capped by
//!   `h2` itself (20 pending);
//! - CONTINUATION flood (CVE-2024-27316): a header block is bounded by
//!   `SETTINGS_MAX_HEADER_LIST_SIZE` ([`h1::MAX_HEAD`]) however many frames carry it;
//! - the handshake must complete within `head_timeout_ms`, and a connection with no open
//!   stream for `idle_timeout_ms` is closed with `GOAWAY`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::conn::{Broken, Sink, Stream};
use crate::h1::{self, Fields, Framing, RequestHead};
use crate::metrics::DropLabels;
use crate::reload::WorkerSlot;

/// The most streams a client may have open, and the most of its requests in the gateway.
pub const MAX_STREAMS: u32 = 128;
/// Streams a connection must have opened before its resets are judged.
const RESET_FLOOR: u64 = 100;
/// Flow-control windows: a stream's, and the connection's (what a client may send unread).
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether `buf` starts with the HTTP/2 connection preface: `None` while it is a prefix of it.
pub fn preface(buf: &[u8]) -> Option<bool> {
    let n = buf.len().min(PREFACE.len());
    if buf[..n] != PREFACE[..n] {
        Some(false)
    } else if n < PREFACE.len() {
        None
    } else {
        Some(true)
    }
}

/// A connection's bytes with what was already read from it put back in front.
pub struct Prefixed {
    prefix: BytesMut,
    inner: Stream,
}

impl Prefixed {
    pub fn new(prefix: BytesMut, inner: Stream) -> Prefixed {
        Prefixed { prefix, inner }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = buf.remaining().min(this.prefix.len());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How a connection's clients have treated their streams.
#[derive(Default)]
pub struct Conduct {
    streams: AtomicU64,
    /// Streams the client reset before its answer was whole, or that were refused.
    abandoned: AtomicU64,
}

impl Conduct {
    /// Counts a stream the client gave up on (or that had to be refused).
    pub fn abandoned(&self) {
        self.abandoned.fetch_add(1, Ordering::Relaxed);
    }

    fn abusive(&self) -> bool {
        let streams = self.streams.load(Ordering::Relaxed);
        let abandoned = self.abandoned.load(Ordering::Relaxed);
        streams >= RESET_FLOOR && abandoned * 2 >= streams
    }
}

/// Where one stream's answer goes, and its connection's record of conduct. The exchange and
/// the watch for the client's reset share it (each holds the lock only inside a poll).
pub struct Answering {
    respond: Mutex<h2::server::SendResponse<Bytes>>,
    pub conduct: Arc<Conduct>,
}

impl Answering {
    pub fn respond(&self) -> MutexGuard<'_, h2::server::SendResponse<Bytes>> {
        self.respond.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves when the client resets the stream.
    pub async fn reset(&self) {
        let _ = std::future::poll_fn(|cx| self.respond().poll_reset(cx)).await;
    }
}

/// Serves one HTTP/2 connection (its preface already checked, or chosen by ALPN) until it
/// closes, goes idle, misbehaves, or the worker shuts down.
pub async fn serve<S>(slot: Arc<WorkerSlot>, io: S, peer: SocketAddr, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeouts = slot.worker().shared.timeouts;
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(h1::MAX_HEAD as u32)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(256 * 1024)
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(timeouts.head, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, %peer, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => return,
    };
    let conduct = Arc::new(Conduct::default());
    let streams = tokio_util::task::TaskTracker::new();
    let mut closing = false;
    loop {
        let idle = streams.is_empty() && !closing;
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !closing => {
                conn.graceful_shutdown();
                closing = true;
                continue;
            }
            _ = tokio::time::sleep(timeouts.idle), if idle => {
                conn.graceful_shutdown();
                closing = true;
                continue;
            }
            next = conn.accept() => next,
        };
        let (request, mut respond) = match next {
            None => break,
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                if e.is_go_away() && !e.is_remote() {
                    slot.metrics()
                        .abusive_connections
                        .get_or_create(&DropLabels {
                            reason: "http2_protocol",
                        })
                        .inc();
                }
                tracing::debug!(error = %e, %peer, "HTTP/2 connection ended");
                break;
            }
        };
        conduct.streams.fetch_add(1, Ordering::Relaxed);
        let full = streams.len() >= MAX_STREAMS as usize;
        if full {
            respond.send_reset(Reason::REFUSED_STREAM);
            conduct.abandoned();
        }
        if conduct.abusive() {
            tracing::info!(%peer, "HTTP/2 client resets most of its streams; closing (ENHANCE_YOUR_CALM)");
            conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
            slot.metrics()
                .abusive_connections
                .get_or_create(&DropLabels {
                    reason: "http2_resets",
                })
                .inc();
            closing = true;
            continue;
        }
        if full {
            continue;
        }
        let worker = slot.worker();
        let shutdown = shutdown.clone();
        let (parts, body) = request.into_parts();
        let answer = Answering {
            respond: Mutex::new(respond),
            conduct: conduct.clone(),
        };
        streams.spawn(async move {
            worker
                .exchange_h2(body, answer, parts, Instant::now(), peer, &shutdown)
                .await;
        });
    }
    streams.close();
    streams.wait().await;
}

/// A stream's request as a head the phases understand. The pseudo-header `:authority` becomes
/// the `host` field (a client's own `host` is dropped then); `cookie` fields split by HPACK (RFC 9113 §8.2.3) are joined again for the
/// HTTP/1.1 upstream. The body is `Empty` when the HEADERS frame ended the stream, else it has
/// the client's `content-length`, else it is sent upstream chunked.
pub fn request_head(
    parts: &http::request::Parts,
    end_stream: bool,
) -> Result<RequestHead, h1::Refusal> {
    let bad = |message| h1::Refusal {
        status: http::StatusCode::BAD_REQUEST,
        message,
    };
    if parts.method == http::Method::CONNECT {
        return Err(h1::Refusal {
            status: http::StatusCode::NOT_IMPLEMENTED,
            message: "CONNECT is not served",
        });
    }
    let mut content_length = None;
    let mut cookies: Vec<u8> = Vec::new();
    let mut pairs = Vec::with_capacity(parts.headers.len() + 1);
    for (name, value) in &parts.headers {
        let v = value.as_bytes();
        if v.iter().any(|b| *b == b'\r' || *b == b'\n' || *b == 0) {
            return Err(bad("a header value holds CR, LF or NUL"));
        }
        match name.as_str() {
            "content-length" => {
                if content_length.is_some()
                    || v.is_empty()
                    || v.len() > 18
                    || !v.iter().all(u8::is_ascii_digit)
                {
                    return Err(bad("Content-Length must be one decimal number"));
                }
                content_length = std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
                pairs.push((name.as_str().as_bytes(), v));
            }
            // `:authority` speaks for the host (RFC 9113 §8.3.1); it is added below.
            "host" if parts.uri.authority().is_some() => {}
            "cookie" => {
                if !cookies.is_empty() {
                    cookies.extend_from_slice(b"; ");
                }
                cookies.extend_from_slice(v);
            }
            _ => pairs.push((name.as_str().as_bytes(), v)),
        }
    }
    if !cookies.is_empty() {
        pairs.push((&b"cookie"[..], &cookies[..]));
    }
    if let Some(authority) = parts.uri.authority() {
        pairs.push((&b"host"[..], authority.as_str().as_bytes()));
    }
    let uri = h1::normalized(parts.uri.clone()).map_err(bad)?;
    let framing = match (end_stream, content_length) {
        (true, _) | (false, Some(0)) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Chunked,
    };
    Ok(RequestHead {
        method: parts.method.clone(),
        uri,
        http10: false,
        fields: Fields::from_pairs(pairs),
        framing,
        keep_alive: true,
        expect_continue: false,
        websocket: false,
    })
}

/// Sends `data` on a stream as flow control allows, ending the stream after it when `end`.
pub async fn send_data(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        if end {
            send.send_data(data, true)?;
        }
        return Ok(());
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(Reason::STREAM_CLOSED)),
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, end && data.is_empty())?;
    }
    Ok(())
}

/// A stream's answer body, as a destination of `conn::copy_body`.
pub struct Body<'a> {
    pub send: &'a mut SendStream<Bytes>,
}

impl Sink for Body<'_> {
    async fn put(&mut self, out: &mut Vec<u8>, within: Duration) -> Result<(), Broken> {
        if out.is_empty() {
            return Ok(());
        }
        let data = Bytes::copy_from_slice(out);
        out.clear();
        match tokio::time::timeout(within, send_data(self.send, data, false)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(Broken::Write),
        }
    }
}

/// Copies a stream's request body to the upstream, framed as `framing` says (bare bytes of a
/// known length, or chunks); `out` holds the upstream's request head, sent with the first
/// bytes. `total` counts the body's bytes.
pub async fn copy_request_body(
    body: &mut RecvStream,
    framing: Framing,
    dst: &mut Stream,
    out: &mut Vec<u8>,
    total: &mut u64,
    limit: u64,
    within: Duration,
) -> Result<(), Broken> {
    let chunked = framing == Framing::Chunked;
    let start = *total;
    loop {
        let next = tokio::time::timeout(within, body.data())
            .await
            .map_err(|_| Broken::Read)?;
        let data = match next {
            None => break,
            Some(Err(_)) => return Err(Broken::Read),
            Some(Ok(data)) => data,
        };
        let _ = body.flow_control().release_capacity(data.len());
        if data.is_empty() {
            continue;
        }
        *total += data.len() as u64;
        if *total - start > limit {
            return Err(Broken::TooLarge);
        }
        if chunked {
            h1::put_chunk(out, &data);
        } else {
            out.extend_from_slice(&data);
        }
        dst.put(out, within).await?;
    }
    if let Framing::Length(n) = framing
        && *total - start != n
    {
        return Err(Broken::Read);
    }
    if chunked {
        out.extend_from_slice(h1::LAST_CHUNK);
    }
    dst.put(out, within).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_is_recognised_only_whole_and_only_at_the_start() {
        assert_eq!(preface(PREFACE), Some(true));
        assert_eq!(preface(&[PREFACE, b"\0\0\0\x04"].concat()), Some(true));
        assert_eq!(preface(b"PRI * HT"), None);
        assert_eq!(preface(b"GET / HTTP/1.1\r\n"), Some(false));
        assert_eq!(preface(b"PRI * HTTP/1.1\r\n"), Some(false));
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut req = http::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_stream_becomes_a_head_with_framing_joined_cookies_and_a_normalised_path() {
        let p = parts(
            "POST",
            "http://api.example/a/./b//c?x=1",
            &[
                ("cookie", "a=1"),
                ("x-k", "v"),
                ("cookie", "b=2"),
                ("content-length", "5"),
            ],
        );
        let head = request_head(&p, false).unwrap();
        assert_eq!(head.uri.path(), "/a/b/c");
        assert_eq!(head.fields.get("host"), Some(&b"api.example"[..]));
        assert_eq!(head.framing, Framing::Length(5));
        assert_eq!(head.fields.get("cookie"), Some(&b"a=1; b=2"[..]));
        assert_eq!(head.fields.get("x-k"), Some(&b"v"[..]));
        assert!(head.keep_alive && !head.websocket && !head.http10);

        let unsized_body = request_head(&parts("POST", "http://h/x", &[]), false).unwrap();
        assert_eq!(unsized_body.framing, Framing::Chunked);
        let ended = request_head(
            &parts("POST", "http://h/x", &[("content-length", "5")]),
            true,
        );
        assert_eq!(ended.unwrap().framing, Framing::Empty);
    }

    #[test]
    fn bad_streams_are_refused_with_a_named_reason() {
        let two = parts(
            "POST",
            "http://h/x",
            &[("content-length", "5"), ("content-length", "5")],
        );
        assert_eq!(request_head(&two, false).unwrap_err().status, 400);
        let signed = parts("POST", "http://h/x", &[("content-length", "+5")]);
        assert_eq!(request_head(&signed, false).unwrap_err().status, 400);
        let escape = parts("GET", "http://h/%2e%2e/b", &[]);
        assert_eq!(request_head(&escape, true).unwrap_err().status, 400);
        let connect = parts("CONNECT", "h:443", &[]);
        assert_eq!(request_head(&connect, true).unwrap_err().status, 501);
    }

    #[test]
    fn a_connection_is_abusive_once_half_its_streams_were_abandoned_past_the_floor() {
        let c = Conduct::default();
        for _ in 0..RESET_FLOOR - 1 {
            c.streams.fetch_add(1, Ordering::Relaxed);
            c.abandoned();
        }
        assert!(!c.abusive(), "below the floor nothing is judged");
        c.streams.fetch_add(1, Ordering::Relaxed);
        assert!(c.abusive());
        let fair = Conduct::default();
        fair.streams.store(10_000, Ordering::Relaxed);
        fair.abandoned.store(4_999, Ordering::Relaxed);
        assert!(
            !fair.abusive(),
            "a browser cancelling some requests is fine"
        );
    }
}
