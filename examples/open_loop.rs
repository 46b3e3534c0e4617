//! An open-loop HTTP/1.1 load generator: requests are sent on a fixed schedule (RATE per second
//! over CONNS keep-alive connections, connection `k` taking every CONNS-th slot), whatever the
//! server's speed, and each latency runs from the request's *scheduled* time to the end of its
//! response. A server that falls behind therefore shows its queueing in the latencies instead of
//! slowing the load down (closed-loop tools such as wrk do the latter: "coordinated omission").
//! `scripts/bench-gateway.sh` uses it for the latency a proxy adds at a given rate.
//!
//! The schedule is kept with tokio's timer (1 ms resolution): requests due within the same
//! millisecond leave together, which every target measured at the same rate pays alike. The
//! timer's own lateness is not counted: a request sent on time is measured from when it was
//! sent, one sent late because its connection was still waiting for an earlier answer from its
//! scheduled time.
//!
//! Usage: `open_loop URL RATE SECONDS CONNS [HEADER: VALUE]`; prints one line:
//! `sent ok non2xx errors achieved_rate p50_ms p90_ms p99_ms p999_ms max_ms`.
//!
//! With `OPEN_LOOP_TIMELINE=FILE` it also writes where in the run the slow answers were: one
//! line per 100 ms of the schedule, `offset_ms requests max_ms over_5ms`, the wall-clock
//! time of the run's start (`start_unix_ms`) first, to line a tail up with what else ran.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

#[derive(Default)]
struct Tally {
    /// Microseconds to the response's last byte, for answered requests.
    latencies_us: Vec<u64>,
    /// Each answered request's scheduled time (milliseconds after the start), in the order of
    /// `latencies_us`.
    due_ms: Vec<u32>,
    ok: u64,
    non2xx: u64,
    errors: u64,
}

async fn connection(
    url: http::Uri,
    header: Option<(http::HeaderName, http::HeaderValue)>,
    first: u64,
    step: u64,
    interval: Duration,
    start: Instant,
    end: Instant,
) -> anyhow::Result<Tally> {
    let authority = url.authority().expect("URL has host:port").clone();
    let mut sender = connect(&authority).await?;
    let mut tally = Tally::default();
    let mut slot = first;
    loop {
        let due = start + interval * u32::try_from(slot).expect("slot fits");
        if due >= end {
            break;
        }
        // Measured from the scheduled time when this connection is behind its schedule (the
        // server's queueing), else from when the timer woke us (its lateness is ours).
        let from = if Instant::now() < due {
            tokio::time::sleep_until(due).await;
            Instant::now()
        } else {
            due
        };
        let mut req = http::Request::get(url.clone())
            .header(http::header::HOST, authority.as_str())
            .body(Empty::new())?;
        if let Some((k, v)) = &header {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        // A server may close a keep-alive connection between requests (nginx does after
        // 1,000): then the request goes on a new connection, its time counted.
        if sender.ready().await.is_err() {
            sender = connect(&authority).await?;
        }
        let answered = match sender.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                resp.into_body().collect().await.ok().map(|_| status)
            }
            Err(_) => None,
        };
        match answered {
            Some(status) => {
                tally
                    .latencies_us
                    .push(Instant::now().duration_since(from).as_micros() as u64);
                tally
                    .due_ms
                    .push(due.duration_since(start).as_millis() as u32);
                if status.is_success() {
                    tally.ok += 1;
                } else {
                    tally.non2xx += 1;
                }
            }
            None => {
                tally.errors += 1;
                sender = connect(&authority).await?;
            }
        }
        slot += step;
    }
    Ok(tally)
}

async fn connect(
    authority: &http::uri::Authority,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
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
    let header = match args.get(5) {
        Some(h) => {
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("header `{h}` is not `name: value`"))?;
            Some((k.trim().parse()?, v.trim().parse()?))
        }
        None => None,
    };
    let interval = Duration::from_secs_f64(1.0 / rate);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Connections start a little ahead of the schedule, so connecting is not measured.
    let lead = Duration::from_millis(200);
    let started_unix_ms = (std::time::SystemTime::now() + lead)
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let tally = runtime.block_on(async move {
        let start = Instant::now() + lead;
        let end = start + Duration::from_secs_f64(seconds);
        let tasks: Vec<_> = (0..conns)
            .map(|k| {
                tokio::spawn(connection(
                    url.clone(),
                    header.clone(),
                    k,
                    conns,
                    interval,
                    start,
                    end,
                ))
            })
            .collect();
        let mut all = Tally::default();
        for t in tasks {
            let t = t.await??;
            all.latencies_us.extend(t.latencies_us);
            all.due_ms.extend(t.due_ms);
            all.ok += t.ok;
            all.non2xx += t.non2xx;
            all.errors += t.errors;
        }
        anyhow::Ok(all)
    })?;
    if let Some(path) = std::env::var_os("OPEN_LOOP_TIMELINE") {
        write_timeline(&path, started_unix_ms, &tally.due_ms, &tally.latencies_us)?;
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
    due_ms: &[u32],
    latencies_us: &[u64],
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let slots = due_ms.iter().max().map_or(0, |m| *m as usize / 100 + 1);
    let mut per = vec![(0u64, 0u64, 0u64); slots];
    for (due, us) in due_ms.iter().zip(latencies_us) {
        let slot = &mut per[*due as usize / 100];
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
