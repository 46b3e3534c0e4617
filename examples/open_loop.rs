//! An open-loop HTTP/1.1 load generator: requests are sent on a fixed schedule (RATE per second
//! over CONNS keep-alive connections, connection `k` taking every CONNS-th slot), whatever the
//! server's speed, and each latency runs from the request's *scheduled* time to the end of its
//! response. A server that falls behind therefore shows its queueing in the latencies instead of
//! slowing the load down (closed-loop tools such as wrk do the latter: "coordinated omission").
//! `scripts/bench-gateway.sh` uses it for the latency a proxy adds at a given rate.
//!
//! The schedule is kept by a `timerfd` ticking every `OPEN_LOOP_TICK_US` microseconds (default
//! 500): each tick releases the slots that have come due, about ten at 20,000 requests/s. The
//! tick trades the generator's precision against its own cost on the cores it shares with what
//! it measures (straight to an nginx upstream at 19,500 requests/s, BENCHMARKS.md,
//! thirty-seventh round):
//! - 100 µs: a median of 0.12 ms, but 35–38 µs of CPU a request, each request waking the
//!   upstream and each answer the generator on its own;
//! - 500 µs: a median of 0.19–0.20 ms and a p99 of 0.36–0.38 ms for 15–16 µs a request;
//! - tokio's 1 ms timer, one sleep per connection (what this used before): a median of
//!   0.48–0.76 ms and a p99 of 1.04–1.23 ms for 13–16 µs a request.
//!
//! Each connection speaks HTTP/1.1 itself: one request's bytes, built once, written whole; the
//! answer's head parsed with `httparse` and its body read to its end (`content-length`, chunks,
//! or the connection's close) and dropped. It used hyper's client, whose dispatch task per
//! connection, header maps and body frames cost more than the rest of the generator's user
//! time. The generator shares two cores with what it measures, and at half the gateway's
//! maximum rate its own cost decides how much room is left when the machine stalls
//! (BENCHMARKS.md, thirty-eighth round): straight to the upstream at 19,500 requests/s it
//! takes about 12.5 µs of CPU a request against about 17 with hyper's client.
//!
//! The timer's own lateness is not counted: a request sent as soon as it was released is
//! measured from its release, one sent late because its connection was still waiting for an
//! earlier answer from its scheduled time.
//!
//! Usage: `open_loop URL RATE SECONDS CONNS [HEADER: VALUE]`; prints one line:
//! `sent ok non2xx errors achieved_rate p50_ms p90_ms p99_ms p999_ms max_ms`.
//!
//! `OPEN_LOOP_THREADS=N` runs it on N threads instead of one. It does not lower the tail on
//! the two-core reference machine: in two alternating passes of three rounds at 25,000
//! requests/s, two threads gave nginx and `tollgate up` added p99s as high as one thread did
//! (BENCHMARKS.md, forty-first round). One thread stays the default, for its lower cost.
//!
//! With `OPEN_LOOP_TIMELINE=FILE` it also writes where in the run the slow answers were: one
//! line per 100 ms of the schedule, `offset_ms requests max_ms over_5ms`, the wall-clock
//! time of the run's start (`start_unix_ms`) first, to line a tail up with what else ran.
//! With `OPEN_LOOP_SAMPLES=FILE` it writes every answered request, `due_us latency_us` in the
//! schedule's order, after a first line with the run's start on `CLOCK_MONOTONIC`
//! (`start_monotonic_us`), the clock `perf record -k CLOCK_MONOTONIC` stamps its events with:
//! `scripts/bench-stalls.sh` lines each slow answer up with what the cores ran meanwhile.

use std::time::Duration;

use std::io::Read as _;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Default)]
struct Tally {
    /// Microseconds to the response's last byte, for answered requests.
    latencies_us: Vec<u64>,
    /// Each answered request's scheduled time (microseconds after the start), in the order of
    /// `latencies_us`.
    due_us: Vec<u64>,
    ok: u64,
    non2xx: u64,
    errors: u64,
    /// What the first failed exchange met, for the report.
    first_error: Option<String>,
}

/// A slot of the schedule, as the pacer hands it to its connection.
struct Release {
    /// When the request was scheduled.
    due: Instant,
    /// When the pacer released it (the tick that found it due).
    at: Instant,
}

async fn connection(
    authority: String,
    request: std::sync::Arc<[u8]>,
    mut slots: mpsc::UnboundedReceiver<Release>,
    start: Instant,
) -> anyhow::Result<Tally> {
    let mut stream = Some(connect(&authority).await?);
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut tally = Tally::default();
    // Since when this connection has had no request outstanding.
    let mut idle_since = start;
    while let Some(Release { due, at }) = slots.recv().await {
        // Measured from its release when the connection was free by then, else from its
        // scheduled time: the connection was behind its schedule (the server's queueing).
        let from = if idle_since <= at { at } else { due };
        // A server may close a keep-alive connection between requests (nginx does after
        // 1,000, saying so in the last answer): then the request goes on a new connection,
        // its time counted. One that closed without saying so fails the exchange before any
        // byte of the answer, and the request is sent once more on a new connection.
        let mut answered = Err(Failed::BeforeAnswer(
            std::io::ErrorKind::NotConnected.into(),
        ));
        for _ in 0..2 {
            let reused = stream.is_some();
            let s = match &mut stream {
                Some(s) => s,
                None => stream.insert(connect(&authority).await?),
            };
            answered = exchange(s, &request, &mut buf).await;
            match &answered {
                Err(Failed::BeforeAnswer(_)) if reused => stream = None,
                _ => break,
            }
        }
        idle_since = Instant::now();
        match answered {
            Ok(Answer { status, close }) => {
                tally
                    .latencies_us
                    .push(idle_since.duration_since(from).as_micros() as u64);
                tally
                    .due_us
                    .push(due.duration_since(start).as_micros() as u64);
                if (200..300).contains(&status) {
                    tally.ok += 1;
                } else {
                    tally.non2xx += 1;
                }
                if close {
                    stream = None;
                }
            }
            Err(Failed::BeforeAnswer(e) | Failed::Midway(e)) => {
                tally.errors += 1;
                tally.first_error.get_or_insert_with(|| e.to_string());
                stream = None;
            }
        }
    }
    Ok(tally)
}

/// What an exchange read: the answer's status, and whether the server closes the connection
/// after it.
struct Answer {
    status: u16,
    close: bool,
}

enum Failed {
    /// The connection failed before any byte of the answer came: a keep-alive connection the
    /// server had closed, if it was not a new one.
    BeforeAnswer(std::io::Error),
    /// It failed after part of the answer, or the answer was not HTTP/1.1.
    Midway(std::io::Error),
}

impl From<std::io::Error> for Failed {
    fn from(e: std::io::Error) -> Failed {
        Failed::BeforeAnswer(e)
    }
}

/// Sends the request and reads one whole answer into `buf`. The answer is framed by its
/// `content-length`, by chunks, or (neither) by the end of the connection; its body is read
/// and dropped. No request is pipelined, so nothing follows an answer on the connection.
async fn exchange(
    stream: &mut tokio::net::TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Answer, Failed> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request).await?;
    buf.clear();
    let midway = |e: std::io::Error| Failed::Midway(e);
    let bad =
        |what: String| Failed::Midway(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
    // The head.
    let (status, head_len, framing, mut close) = loop {
        buf.reserve(8 * 1024);
        let read = stream.read_buf(buf).await;
        if !matches!(read, Ok(n) if n > 0) {
            let e = read
                .err()
                .unwrap_or_else(|| std::io::ErrorKind::UnexpectedEof.into());
            return Err(if buf.is_empty() {
                Failed::BeforeAnswer(e)
            } else {
                midway(e)
            });
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut head = httparse::Response::new(&mut headers);
        match head.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = head.code.unwrap_or(0);
                let mut framing = Framing::UntilClose;
                let mut close = head.version == Some(0);
                for h in head.headers.iter() {
                    let value = std::str::from_utf8(h.value).unwrap_or("").trim();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let n = value
                            .parse()
                            .map_err(|_| bad(format!("content-length `{value}`")))?;
                        framing = Framing::Length(n);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                        && value.eq_ignore_ascii_case("chunked")
                    {
                        framing = Framing::Chunked;
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close = value.eq_ignore_ascii_case("close");
                    }
                }
                if status == 204 || status == 304 {
                    framing = Framing::Length(0);
                }
                break (status, len, framing, close);
            }
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(bad(format!("answer's head: {e}"))),
        }
    };
    // The body.
    loop {
        let done = match framing {
            Framing::Length(n) => buf.len() >= head_len + n,
            Framing::Chunked => chunks_end(&buf[head_len..]).map_err(bad)?,
            Framing::UntilClose => false,
        };
        if done {
            return Ok(Answer { status, close });
        }
        buf.reserve(8 * 1024);
        if stream.read_buf(buf).await.map_err(midway)? == 0 {
            if matches!(framing, Framing::UntilClose) {
                close = true;
                return Ok(Answer { status, close });
            }
            return Err(midway(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

#[derive(Clone, Copy)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Whether `body` holds a whole chunked body (its last chunk and the trailers' end).
fn chunks_end(mut body: &[u8]) -> Result<bool, String> {
    loop {
        let (skip, size) = match httparse::parse_chunk_size(body) {
            Ok(httparse::Status::Complete(c)) => c,
            Ok(httparse::Status::Partial) => return Ok(false),
            Err(_) => return Err("a chunk's size".to_owned()),
        };
        body = &body[skip..];
        if size == 0 {
            // Trailers, if any, then an empty line.
            return Ok(body.starts_with(b"\r\n") || body.windows(4).any(|w| w == b"\r\n\r\n"));
        }
        let Some(rest) = usize::try_from(size).ok().and_then(|n| body.get(n + 2..)) else {
            return Ok(false);
        };
        body = rest;
    }
}

/// Releases the schedule's slots to their connections, `slots` in all, slot `n` due at
/// `start + n * interval`, on each tick of `timer` (which first fires at `start`).
async fn pace(
    timer: AsyncFd<std::fs::File>,
    start: Instant,
    interval: Duration,
    slots: u64,
    conns: Vec<mpsc::UnboundedSender<Release>>,
) -> anyhow::Result<()> {
    let mut next = 0u64;
    while next < slots {
        let mut ready = timer.readable().await?;
        let mut expirations = [0u8; 8];
        match ready.try_io(|t| t.get_ref().read(&mut expirations)) {
            Ok(read) => {
                read?;
            }
            Err(_would_block) => continue,
        }
        let now = Instant::now();
        loop {
            let due = start + interval * u32::try_from(next).expect("slot fits");
            if next >= slots || due > now {
                break;
            }
            let conn = &conns[(next % conns.len() as u64) as usize];
            if conn.send(Release { due, at: now }).is_err() {
                // That connection failed: the schedule stops here, and joining its task
                // reports why.
                return Ok(());
            }
            next += 1;
        }
    }
    Ok(())
}

/// A monotonic `timerfd` that fires first after `first`, then every `every`.
fn ticker(first: Duration, every: Duration) -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let spec = |d: Duration| libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
    };
    // SAFETY: `timerfd_create` takes no pointers; a non-negative result is a new descriptor
    // that nothing else owns.
    #[allow(unsafe_code)]
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created above and is owned by nothing else.
    #[allow(unsafe_code)]
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let value = libc::itimerspec {
        it_interval: spec(every),
        it_value: spec(first),
    };
    // SAFETY: `value` lives on this stack for the call; the old value is not asked for (null).
    #[allow(unsafe_code)]
    let rc = unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &value, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::fs::File::from(fd))
}

async fn connect(authority: &str) -> anyhow::Result<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        (5..=6).contains(&args.len()),
        "usage: open_loop URL RATE SECONDS CONNS ['HEADER: VALUE']"
    );
    let url: http::Uri = args[1].parse()?;
    let rate: f64 = args[2].parse()?;
    let seconds: f64 = args[3].parse()?;
    let conns: u64 = args[4].parse()?;
    anyhow::ensure!(
        rate > 0.0 && seconds > 0.0 && conns > 0,
        "RATE, SECONDS and CONNS must be positive"
    );
    // Every request is the same bytes, written once here.
    let authority = url
        .authority()
        .ok_or_else(|| anyhow::anyhow!("URL `{url}` has no host:port"))?
        .to_string();
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\n");
    if let Some(h) = args.get(5) {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("header `{h}` is not `name: value`"))?;
        let name: http::HeaderName = k.trim().parse()?;
        let value: http::HeaderValue = v.trim().parse()?;
        let value = value
            .to_str()
            .map_err(|_| anyhow::anyhow!("header `{h}`: not visible ASCII"))?;
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let request: std::sync::Arc<[u8]> = request.into_bytes().into();
    let interval = Duration::from_secs_f64(1.0 / rate);
    // OPEN_LOOP_THREADS (default 1): the runtime's threads. One keeps the generator's own cost
    // lowest; more let a backlog after a stall drain on every core instead of one.
    let threads: usize = match std::env::var("OPEN_LOOP_THREADS") {
        Ok(n) => n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| anyhow::anyhow!("OPEN_LOOP_THREADS={n}: not a positive integer"))?,
        Err(_) => 1,
    };
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    // Connections start a little ahead of the schedule, so connecting is not measured.
    let lead = Duration::from_millis(200);
    let started_unix_ms = (std::time::SystemTime::now() + lead)
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let tick = match std::env::var("OPEN_LOOP_TICK_US") {
        Ok(us) => Duration::from_micros(
            us.parse()
                .ok()
                .filter(|us| *us > 0)
                .ok_or_else(|| anyhow::anyhow!("OPEN_LOOP_TICK_US={us}: not a positive integer"))?,
        ),
        Err(_) => Duration::from_micros(500),
    };
    let slots = (seconds * rate).ceil() as u64;
    let tally = runtime.block_on(async move {
        // SAFETY: the `File` owns the timer's descriptor, and the `AsyncFd` owns the `File`
        // until both are dropped together: the descriptor stays open and the same meanwhile.
        #[allow(unsafe_code)]
        let timer =
            unsafe { AsyncFd::register_with_interest(ticker(lead, tick)?, Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("registering the timer: {e}"))?;
        let start = Instant::now() + lead;
        let start_mono_us = monotonic_us() + lead.as_micros() as u64;
        let (senders, tasks): (Vec<_>, Vec<_>) = (0..conns)
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(connection(authority.clone(), request.clone(), rx, start));
                (tx, task)
            })
            .unzip();
        pace(timer, start, interval, slots, senders).await?;
        let mut all = Tally::default();
        for t in tasks {
            let t = t.await??;
            all.latencies_us.extend(t.latencies_us);
            all.due_us.extend(t.due_us);
            all.ok += t.ok;
            all.non2xx += t.non2xx;
            all.errors += t.errors;
            if all.first_error.is_none() {
                all.first_error = t.first_error;
            }
        }
        anyhow::Ok((all, start_mono_us))
    })?;
    let (tally, start_mono_us) = tally;
    if let Some(path) = std::env::var_os("OPEN_LOOP_TIMELINE") {
        write_timeline(&path, started_unix_ms, &tally.due_us, &tally.latencies_us)?;
    }
    if let Some(path) = std::env::var_os("OPEN_LOOP_SAMPLES") {
        write_samples(&path, start_mono_us, &tally.due_us, &tally.latencies_us)?;
    }
    let mut l = tally.latencies_us;
    l.sort_unstable();
    let q = |p: f64| -> f64 {
        if l.is_empty() {
            return f64::NAN;
        }
        let i = ((p * l.len() as f64).ceil() as usize).clamp(1, l.len()) - 1;
        l[i] as f64 / 1000.0
    };
    if let Some(e) = &tally.first_error {
        eprintln!("{} requests failed; the first: {e}", tally.errors);
    }
    let sent = tally.ok + tally.non2xx + tally.errors;
    println!(
        "{sent} {} {} {} {:.0} {:.3} {:.3} {:.3} {:.3} {:.3}",
        tally.ok,
        tally.non2xx,
        tally.errors,
        (tally.ok + tally.non2xx) as f64 / seconds,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        q(1.0)
    );
    Ok(())
}

/// The slow answers by where in the schedule they fell: per 100 ms, the requests, the slowest
/// and how many took over 5 ms.
fn write_timeline(
    path: &std::ffi::OsStr,
    started_unix_ms: u128,
    due_us: &[u64],
    latencies_us: &[u64],
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let slots = due_us.iter().max().map_or(0, |m| *m as usize / 100_000 + 1);
    let mut per = vec![(0u64, 0u64, 0u64); slots];
    for (due, us) in due_us.iter().zip(latencies_us) {
        let slot = &mut per[*due as usize / 100_000];
        slot.0 += 1;
        slot.1 = slot.1.max(*us);
        slot.2 += u64::from(*us > 5_000);
    }
    let mut out = format!("start_unix_ms {started_unix_ms}\n");
    for (i, (n, max, over)) in per.iter().enumerate() {
        writeln!(out, "{} {n} {:.3} {over}", i * 100, *max as f64 / 1000.0)?;
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// Every answered request, `due_us latency_us` per line in the schedule's order, for looking at
/// how the slow ones cluster in time.
fn write_samples(
    path: &std::ffi::OsStr,
    start_mono_us: u64,
    due_us: &[u64],
    latencies_us: &[u64],
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut rows: Vec<(u64, u64)> = due_us
        .iter()
        .copied()
        .zip(latencies_us.iter().copied())
        .collect();
    rows.sort_unstable();
    let mut out = String::with_capacity(rows.len() * 16);
    writeln!(out, "start_monotonic_us {start_mono_us}")?;
    for (due, us) in rows {
        writeln!(out, "{due} {us}")?;
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// `CLOCK_MONOTONIC` in microseconds, the clock `perf record -k CLOCK_MONOTONIC` stamps with.
fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` lives on this stack for the call, which only writes it.
    #[allow(unsafe_code)]
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}
