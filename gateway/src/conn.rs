//! The connections of one worker thread: the client connection loop (read a head, run the
//! exchange, repeat while keep-alive holds), the worker's pool of idle upstream connections, and
//! the body copy between the two, re-framed where the two sides differ.
//!
//! Timeouts, where a peer can hold a connection (`gateway.connections`, [`Timeouts`]):
//! - a keep-alive connection may sit idle for `idle` between requests (60 s by default);
//! - once a request's first byte has arrived, its whole head must follow within `head` (30 s;
//!   slowloris), or the answer is 408 and the connection closes;
//! - each read of a body and each write to either side must progress within `io` (30 s).
//!
//! A connection the gateway closes with unread input is closed gracefully (write side first,
//! then the input drained for a moment), so that the client reads the answer rather than a
//! reset.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::closing::{Closing, Waiter};
use crate::deadline::Deadline;
use crate::h1::{self, Chunk, ChunkedDecoder, Framing, Parsed, RequestHead};
use crate::reload::WorkerSlot;

/// The connection timeouts, from `gateway.connections`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub head: Duration,
    pub idle: Duration,
    pub io: Duration,
    /// `max_body_bytes`: not a timeout, but a limit of the same connection settings.
    pub max_body: u64,
}

impl From<crate::config::ConnectionSettings> for Timeouts {
    fn from(c: crate::config::ConnectionSettings) -> Self {
        Timeouts {
            head: Duration::from_millis(c.head_timeout_ms),
            idle: Duration::from_millis(c.idle_timeout_ms),
            io: Duration::from_millis(c.io_timeout_ms),
            max_body: c.max_body_bytes,
        }
    }
}
/// How long an idle upstream connection is kept for reuse.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// The most idle connections kept per upstream target and worker.
const POOL_MAX: usize = 1024;

/// A connection's bytes: plain TCP, or TLS over TCP (client connections under `gateway.tls`).
/// An enum rather than a trait object: the plain case, the one benchmarks run, pays one
/// branch per read or write.
pub enum Stream {
    Tcp(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP stream, when no TLS is over it.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(tcp) => Some(tcp),
            #[cfg(feature = "tls")]
            Stream::Tls(_) => None,
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Tcp(s)
    }
}

macro_rules! each_stream {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => $e,
            #[cfg(feature = "tls")]
            Stream::Tls($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each_stream!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_stream!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(self, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_stream!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Where a body copy writes: a connection (HTTP/1.1), or an HTTP/2 stream.
pub trait Sink {
    /// Sends what `out` holds, within `within`, and empties it.
    fn put(
        &mut self,
        out: &mut Vec<u8>,
        within: Duration,
    ) -> impl std::future::Future<Output = Result<(), Broken>> + Send;
}

impl Sink for Stream {
    async fn put(&mut self, out: &mut Vec<u8>, within: Duration) -> Result<(), Broken> {
        if !out.is_empty() {
            write(self, out, within).await.map_err(|_| Broken::Write)?;
            out.clear();
        }
        Ok(())
    }
}

/// One side of an exchange: a connection and the bytes read from it, not yet used.
pub struct Side {
    pub stream: Stream,
    pub buf: BytesMut,
    /// How long one write, or one read of a body, may wait.
    pub io: Duration,
}

impl Side {
    pub fn new(stream: impl Into<Stream>, io: Duration) -> Side {
        Side {
            stream: stream.into(),
            buf: BytesMut::with_capacity(8 * 1024),
            io,
        }
    }

    /// Room for the next read. An empty buffer starts again at the front of its allocation
    /// when nothing else holds a part of it (the heads and bodies split off it are gone):
    /// each exchange then reads into the same few cache lines as the last. Without this, reads
    /// moved on through the buffer (about 32 KiB once grown) until it filled, so every request
    /// and answer landed on lines the core had not touched for many exchanges; with 64 client
    /// and 64 upstream connections that was some 3.5–4 MiB of buffers cycled through the caches.
    /// Reading from the front took 1–4.5 % off the workers' CPU per request at a fixed rate
    /// (BENCHMARKS.md, twenty-sixth round). A buffer with less than 2 KiB free gets 16 KiB
    /// more, as before.
    fn make_room(&mut self) {
        if self.buf.is_empty() {
            // Never allocates: only moves the start back (see `BytesMut::try_reclaim`).
            let _ = self.buf.try_reclaim(self.buf.capacity() + 1);
        }
        if self.buf.capacity() - self.buf.len() < 2048 {
            self.buf.reserve(16 * 1024);
        }
    }

    /// Reads what has arrived into the buffer: the count, 0 at the end of the input.
    pub async fn fill(&mut self, within: Duration) -> io::Result<usize> {
        self.make_room();
        match tokio::time::timeout(within, self.stream.read_buf(&mut self.buf)).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// Reads what has arrived into the buffer, without a timeout of its own (the caller has
    /// one): the count, 0 at the end of the input.
    pub async fn read_more(&mut self) -> io::Result<usize> {
        self.make_room();
        self.stream.read_buf(&mut self.buf).await
    }

    /// Writes all of `data`.
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        write(&mut self.stream, data, self.io).await
    }

    /// Closes gracefully: no more output, then what the peer still sends is read and dropped
    /// for a moment, so that it reads the last answer instead of a reset.
    pub async fn linger_close(mut self) {
        let _ = self.stream.shutdown().await;
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut drained = 0usize;
        while drained < 256 * 1024 {
            self.buf.clear();
            match self
                .fill(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Ok(n) if n > 0 => drained += n,
                _ => break,
            }
        }
    }
}

/// Writes all of `data` and flushes it (a no-op on TCP; TLS may hold the last record back).
///
/// On TCP the write is tried first without a timer: it nearly always fits the socket's buffer
/// at once, and a timeout costs a clock read and a timer of its own even when it never fires
/// (two of the dozen clock reads a proxied request made, BENCHMARKS.md). Only what is left
/// after the socket's buffer filled waits, within `within`.
async fn write(stream: &mut Stream, mut data: &[u8], within: Duration) -> io::Result<()> {
    let tcp = match stream {
        Stream::Tcp(tcp) => Some(tcp),
        #[cfg(feature = "tls")]
        Stream::Tls(_) => None,
    };
    if let Some(tcp) = tcp {
        while !data.is_empty() {
            match tcp.try_write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if data.is_empty() {
            return Ok(());
        }
    }
    let all = async {
        stream.write_all(data).await?;
        stream.flush().await
    };
    match tokio::time::timeout(within, all).await {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Serves one client connection until it closes, goes idle, breaks, or the worker shuts down.
pub async fn serve(
    slot: Arc<WorkerSlot>,
    stream: Stream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    closing: &Arc<Closing>,
) {
    let timeouts = slot.worker().shared.timeouts;
    let mut waiter = closing.waiter();
    let mut client = Side::new(stream, timeouts.io);
    let mut out = Vec::with_capacity(4 * 1024);
    let mut first = true;
    // The connection's one timer, for its idle and head waits and the upstream's answers.
    let mut deadline = Deadline::new(tokio::time::Instant::now() + timeouts.idle);
    loop {
        let next = read_head(&mut client, timeouts, &mut waiter, first, &mut deadline).await;
        first = false;
        let (head, started) = match next {
            Next::Head(head, started) => (head, started),
            Next::Closed => return,
            #[cfg(feature = "http2")]
            Next::Http2 => {
                let io = crate::http2::Prefixed::new(client.buf, client.stream);
                return crate::http2::serve(slot, io, peer, shutdown).await;
            }
            Next::Refused(r) => {
                out.clear();
                crate::proxy::own_answer(
                    &mut out,
                    r.status,
                    "bad_request",
                    r.message,
                    true,
                    |_| {},
                );
                if client.write(&out).await.is_ok() {
                    client.linger_close().await;
                }
                return;
            }
        };
        // The worker of the configuration in force for this request (a reload changes it).
        let worker = slot.worker();
        match worker
            .exchange(
                &mut client,
                head,
                started,
                peer,
                &mut out,
                &shutdown,
                &mut deadline,
            )
            .await
        {
            After::KeepAlive => {}
            After::Close => return,
            After::Linger => return client.linger_close().await,
        }
    }
}

/// What a connection does after an exchange.
pub enum After {
    KeepAlive,
    Close,
    /// Close gracefully: the client may still be sending.
    Linger,
}

#[allow(clippy::large_enum_variant)] // one per request, moved once
enum Next {
    Head(RequestHead, Instant),
    Closed,
    Refused(h1::Refusal),
    /// The connection opened with HTTP/2's preface (h2c with prior knowledge, RFC 9113 §3.3).
    #[cfg(feature = "http2")]
    Http2,
}

/// Waits for the next request head: bytes already buffered (pipelined) first. On a
/// connection's `first` request, HTTP/2's preface hands the connection to `http2.rs`.
async fn read_head(
    client: &mut Side,
    timeouts: Timeouts,
    closing: &mut Waiter,
    first: bool,
    deadline: &mut Deadline,
) -> Next {
    let mut started: Option<Instant> = None;
    // The idle wait counts from when it begins; a pipelined request never waits.
    let mut idle_until = None;
    loop {
        if !client.buf.is_empty() {
            let t = *started.get_or_insert_with(Instant::now);
            // A connection's first bytes may be HTTP/2's preface, or a prefix of it (read on).
            #[cfg(feature = "http2")]
            let undecided = match first.then(|| crate::http2::preface(&client.buf)) {
                Some(Some(true)) => return Next::Http2,
                Some(None) => true,
                _ => false,
            };
            #[cfg(not(feature = "http2"))]
            let undecided = {
                let _ = first; // only HTTP/2 has a preface to look for
                false
            };
            if !undecided {
                match h1::parse_request(&mut client.buf) {
                    Ok(Parsed::Head(head)) => return Next::Head(head, t),
                    Ok(Parsed::Partial) => {}
                    Err(r) => return Next::Refused(r),
                }
            }
        }
        let until = match started {
            None => *idle_until.get_or_insert_with(|| tokio::time::Instant::now() + timeouts.idle),
            Some(t) => tokio::time::Instant::from_std(t + timeouts.head),
        };
        let read = tokio::select! {
            biased;
            r = deadline.run(until, client.read_more()) => r,
            _ = closing.closed(), if started.is_none() => return Next::Closed,
        };
        match read {
            Some(Ok(0)) => return Next::Closed,
            Some(Ok(_)) => {}
            None if started.is_some() => {
                return Next::Refused(h1::Refusal {
                    status: http::StatusCode::REQUEST_TIMEOUT,
                    message: "the request head did not arrive in time",
                });
            }
            None | Some(Err(_)) => return Next::Closed,
        }
    }
}

/// Which side of a body copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// The source ended early, sent bad framing, or timed out.
    Read,
    /// The destination went away or timed out.
    Write,
    /// The body grew past the limit it was copied under.
    TooLarge,
}

/// Copies a body framed as `framing` from `src` to `dst`: as chunks when `chunked` is set,
/// else as the bare bytes. `out` holds bytes already staged for `dst` (a head), sent with the
/// first body bytes. `total` counts the body bytes taken from `src`.
pub async fn copy_body(
    src: &mut Side,
    framing: Framing,
    dst: &mut impl Sink,
    chunked: bool,
    out: &mut Vec<u8>,
    total: &mut u64,
    limit: u64,
) -> Result<(), Broken> {
    let start = *total;
    let stage = |out: &mut Vec<u8>, data: &[u8]| {
        if chunked {
            h1::put_chunk(out, data);
        } else {
            out.extend_from_slice(data);
        }
    };
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => loop {
            let take = (n - (*total - start)).min(src.buf.len() as u64) as usize;
            stage(out, &src.buf[..take]);
            src.buf.advance(take);
            *total += take as u64;
            if *total - start == n {
                break;
            }
            dst.put(out, src.io).await?;
            if src.fill(src.io).await.map_err(|_| Broken::Read)? == 0 {
                return Err(Broken::Read);
            }
        },
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::default();
            loop {
                match decoder.next(&mut src.buf).map_err(|_| Broken::Read)? {
                    Chunk::Data(data) => {
                        *total += data.len() as u64;
                        if *total - start > limit {
                            return Err(Broken::TooLarge);
                        }
                        stage(out, &data);
                    }
                    Chunk::End => break,
                    Chunk::Partial => {
                        dst.put(out, src.io).await?;
                        if src.fill(src.io).await.map_err(|_| Broken::Read)? == 0 {
                            return Err(Broken::Read);
                        }
                    }
                }
            }
        }
        Framing::Close => loop {
            *total += src.buf.len() as u64;
            stage(out, &src.buf);
            src.buf.clear();
            dst.put(out, src.io).await?;
            if src.fill(src.io).await.map_err(|_| Broken::Read)? == 0 {
                break;
            }
        },
    }
    if chunked {
        out.extend_from_slice(h1::LAST_CHUNK);
    }
    dst.put(out, src.io).await
}

/// Copies bytes from `from` to `to` until `from` ends, then ends `to` (a half close), counting
/// them into `count`. One direction of a tunnel.
pub async fn pump(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    count: &mut u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
}

/// Whether the rest of a request body is already buffered; if so it is consumed, so that
/// the connection can serve its next request after an answer that did not read it.
pub fn skip_buffered_body(client: &mut Side, framing: Framing) -> bool {
    match framing {
        Framing::Empty => true,
        Framing::Length(n) if client.buf.len() as u64 >= n => {
            client.buf.advance(n as usize);
            true
        }
        Framing::Length(_) | Framing::Close => false,
        Framing::Chunked => {
            let mut probe = client.buf.clone();
            let mut decoder = ChunkedDecoder::default();
            loop {
                match decoder.next(&mut probe) {
                    Ok(Chunk::Data(_)) => {}
                    Ok(Chunk::End) => {
                        client.buf = probe;
                        return true;
                    }
                    Ok(Chunk::Partial) | Err(_) => return false,
                }
            }
        }
    }
}

/// One worker's idle upstream connections, by target.
pub struct Pool {
    idle: Vec<Mutex<Vec<(Side, Instant)>>>,
}

impl Pool {
    /// A pool for `targets` upstream targets (numbered from 0).
    pub fn new(targets: usize) -> Pool {
        Pool {
            idle: (0..targets).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// The most recently used idle connection to `target`, if one has been idle less than
    /// [`POOL_IDLE`] at `now` (the request path's own reading of the clock, a moment ago).
    pub fn take(&self, target: usize, now: Instant) -> Option<Side> {
        let mut idle = self.idle[target].lock().unwrap_or_else(|e| e.into_inner());
        while let Some((side, since)) = idle.pop() {
            if now.saturating_duration_since(since) < POOL_IDLE {
                return Some(side);
            }
        }
        None
    }

    /// Keeps a connection whose last exchange ended cleanly, counted idle from `since`: the
    /// start of the request it served, not a clock read of its own (earlier than the truth,
    /// so a connection is given up sooner, never later).
    pub fn put(&self, target: usize, side: Side, since: Instant) {
        if !side.buf.is_empty() {
            return; // the upstream sent more than its answer: not to be trusted again
        }
        let mut idle = self.idle[target].lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < POOL_MAX {
            idle.push((side, since));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Once what was read is taken and let go, the next read lands at the front of the buffer
    /// again; while a part is still held elsewhere, the buffer is left where it is.
    #[tokio::test]
    async fn an_emptied_buffer_is_read_into_from_its_front() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut side = Side::new(listener.accept().await.unwrap().0, Duration::from_secs(5));
        let read = async |side: &mut Side, peer: &mut TcpStream, what: &[u8]| {
            peer.write_all(what).await.unwrap();
            while side.buf.len() < what.len() {
                assert!(side.fill(Duration::from_secs(5)).await.unwrap() > 0);
            }
            side.buf.split_to(what.len()).freeze()
        };
        let first = read(&mut side, &mut peer, b"GET /a HTTP/1.1\r\n\r\n").await;
        let front = first.as_ptr();
        let second = read(&mut side, &mut peer, b"GET /b HTTP/1.1\r\n\r\n").await;
        assert_ne!(second.as_ptr(), front, "`first` still held: read after it");
        drop((first, second));
        let third = read(&mut side, &mut peer, b"GET /c HTTP/1.1\r\n\r\n").await;
        assert_eq!(third.as_ptr(), front, "read into the front again");
        assert_eq!(&third[..], b"GET /c HTTP/1.1\r\n\r\n");
    }
}
