//! Writes synthetic `RequestEvent`s spread evenly over one UTC day (or DAYS days) into an
//! embedded bus log, as if gateways had sent them: the input of `scripts/bench-embedded.sh` and
//! `scripts/bench-export.sh`, which then let `tollgate up` ingest them and measure memory and
//! query times. 1,000 consumers (`c0`..`c999`) on plan `p`, four routes, one request in 50 a 503.
//!
//! With `SEED_SPAN_S` set, the events are spread over that many seconds from the day's start
//! instead, as a gateway's would be during a burst (`scripts/bench-ingest.sh`).
//!
//! Usage: `cargo run --release --example seed_bus -- BUS_DIR EVENTS DAY_START_UNIX_SECONDS [DAYS]`

use bytes::Bytes;
use tollgate_bus::{EmbeddedConfig, EmbeddedLog, Publisher, Record};
use tollgate_schemas::{Outcome, RequestEvent};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4 || args.len() == 5,
        "usage: seed_bus BUS_DIR EVENTS DAY_START_UNIX_SECONDS [DAYS]"
    );
    let (dir, n, day): (std::path::PathBuf, u64, i64) =
        (args[1].clone().into(), args[2].parse()?, args[3].parse()?);
    let days: i64 = args.get(4).map_or(Ok(1), |d| d.parse())?;
    let log = EmbeddedLog::open(EmbeddedConfig {
        dir,
        fsync: false,
        ..Default::default()
    })?;
    let routes = ["orders-list", "orders-get", "search", "checkout"];
    let span_us = match std::env::var("SEED_SPAN_S") {
        Ok(s) => s.parse::<i64>()? * 1_000_000,
        Err(_) => days * 86_400_000_000,
    };
    let step_us = (span_us / n as i64).max(1);
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let status = if i % 50 == 0 { 503 } else { 200 };
        let latency = 1_000 + (i * 7_919) % 200_000;
        let consumer = format!("c{}", i % 1_000);
        let ev = RequestEvent {
            v: 1,
            id: uuid::Uuid::now_v7(),
            ts: chrono::DateTime::from_timestamp_micros(day * 1_000_000 + i as i64 * step_us)
                .expect("in range"),
            gateway: "seed".into(),
            route: Some(routes[(i % 4) as usize].into()),
            method: "GET".into(),
            path: "/x".into(),
            status,
            latency_us: latency,
            upstream_latency_us: Some(latency - 100),
            req_bytes: 0,
            resp_bytes: 100,
            consumer: Some(consumer.clone()),
            plan: Some("p".into()),
            outcome: if status < 500 {
                Outcome::Ok
            } else {
                Outcome::UpstreamError
            },
            billable: status < 500,
            trace_id: None,
        };
        batch.push(Record {
            key: Bytes::from(consumer),
            payload: Bytes::from(ev.to_json()),
        });
        if batch.len() == 10_000 {
            log.publish(std::mem::take(&mut batch)).await?;
        }
    }
    log.publish(batch).await?;
    eprintln!("{n} events in the bus log");
    Ok(())
}
