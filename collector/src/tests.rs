//! The collector over the real embedded log and Parquet store, including crashes at each step.

use std::time::Duration;

use bytes::Bytes;
use tollgate_bus::{EmbeddedConfig, EmbeddedLog, Publisher, Record};
use tollgate_schemas::{Outcome, RequestEvent};
use tollgate_store::{Filter, ParquetConfig, ParquetStore, UsageQuery};

use super::*;

fn event(i: u64) -> RequestEvent {
    RequestEvent {
        v: 1,
        id: uuid::Uuid::now_v7(),
        ts: chrono::Utc::now(),
        gateway: "gw".into(),
        route: Some("r".into()),
        method: "GET".into(),
        path: format!("/r/{i}"),
        status: 200,
        latency_us: 100 + i,
        upstream_latency_us: Some(90),
        req_bytes: 0,
        resp_bytes: 5,
        consumer: Some("acme".into()),
        plan: Some("pro".into()),
        outcome: Outcome::Ok,
        billable: true,
        trace_id: None,
    }
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn log(&self) -> EmbeddedLog {
        EmbeddedLog::open(EmbeddedConfig {
            dir: self.dir.path().join("bus"),
            ..Default::default()
        })
        .unwrap()
    }
    fn store(&self) -> ParquetStore {
        ParquetStore::open(ParquetConfig {
            dir: self.dir.path().join("store"),
            ..Default::default()
        })
        .unwrap()
    }
    fn config(&self, flush_ms: u64) -> CollectorConfig {
        CollectorConfig {
            linger_ms: 5,
            flush_interval_ms: flush_ms,
            dead_letter_dir: self.dir.path().join("dlq"),
            ..Default::default()
        }
    }
}

async fn publish(log: &EmbeddedLog, range: std::ops::Range<u64>) {
    let recs = range
        .map(|i| Record {
            key: Bytes::from("acme"),
            payload: Bytes::from(event(i).to_json()),
        })
        .collect();
    log.publish(recs).await.unwrap();
}

async fn count(store: &ParquetStore) -> u64 {
    let f = Filter {
        from_us: 0,
        to_us: i64::MAX / 2,
        ..Default::default()
    };
    store
        .usage(&f, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.requests)
        .sum()
}

async fn wait_for_count(store: &ParquetStore, n: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let c = count(store).await;
        if c == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "store holds {c} events, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn start(
    env: &Env,
    log: &EmbeddedLog,
    store: &ParquetStore,
    flush_ms: u64,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), CollectorError>>,
) {
    start_with(log, store, env.config(flush_ms))
}

fn start_with(
    log: &EmbeddedLog,
    store: &ParquetStore,
    config: CollectorConfig,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), CollectorError>>,
) {
    let (_, shutdown, handle) = start_metered(log, store, config);
    (shutdown, handle)
}

/// A collector in consumer group `config.group`, with the metrics it counts into.
fn start_metered(
    log: &EmbeddedLog,
    store: &ParquetStore,
    config: CollectorConfig,
) -> (
    CollectorMetrics,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), CollectorError>>,
) {
    let metrics = CollectorMetrics::unregistered();
    let shutdown = CancellationToken::new();
    let sub = Box::new(log.subscribe(&config.group).unwrap());
    let dead = DeadLetter::open(&config.dead_letter_dir).unwrap();
    let handle = tokio::spawn(run(
        config,
        sub,
        Arc::new(store.clone()),
        dead,
        metrics.clone(),
        shutdown.clone(),
    ));
    (metrics, shutdown, handle)
}

/// The collector notes when it reaches the end of the bus, and keeps noting it while it waits
/// there: what `tollgate up` reads to tell a collector that is behind from one with nothing
/// to do.
#[tokio::test]
async fn notes_when_it_reaches_the_end_of_the_bus_and_while_it_waits_there() {
    let env = Env::new();
    let log = env.log();
    let store = env.store();
    // Polls of ten: a thousand of them before the end.
    const EVENTS: u64 = 10_000;
    publish(&log, 0..EVENTS).await;
    let before = unix_seconds(std::time::SystemTime::now());
    let config = CollectorConfig {
        batch_max_events: Some(10),
        ..env.config(3_600_000)
    };
    let (metrics, shutdown, handle) = start_metered(&log, &store, config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let caught_up = metrics.caught_up.get() >= before;
        let consumed = metrics.consumed.get();
        // Reaching the end means having read everything before it.
        assert!(
            !caught_up || consumed == EVENTS,
            "noted as caught up with {consumed} of {EVENTS} read"
        );
        if caught_up {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never caught up");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let first = metrics.caught_up.get();
    while metrics.caught_up.get() <= first {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an idle collector stopped noting that it is caught up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    handle.await.unwrap().unwrap();
}

#[tokio::test]
async fn stores_valid_events_and_dead_letters_the_rest() {
    let env = Env::new();
    let log = env.log();
    let store = env.store();
    publish(&log, 0..50).await;
    log.publish(vec![Record {
        key: Bytes::new(),
        payload: Bytes::from_static(b"{\"v\":1}"),
    }])
    .await
    .unwrap();
    publish(&log, 50..60).await;
    let (shutdown, handle) = start(&env, &log, &store, 20);
    wait_for_count(&store, 60).await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    let sub = log.subscribe("tollgate-collector").unwrap();
    assert_eq!(
        sub.committed().0[&0],
        61,
        "offsets committed after the final flush"
    );
    let dlq = std::fs::read_to_string(env.dir.path().join("dlq/events.jsonl")).unwrap();
    assert_eq!(dlq.lines().count(), 1);
    assert!(dlq.contains("\"offset\":50"), "{dlq}");
    // Everything is durable: a fresh store sees all of it.
    assert_eq!(count(&env.store()).await, 60);
}

/// An event the bus holds twice (the same id at two positions, as Kafka's producer writes on
/// rare paths) is stored once when the copies are within the window, and twice without one or
/// beyond it: the window, not anything else, is what drops the copy.
#[tokio::test]
async fn an_event_the_bus_holds_twice_is_stored_once_within_the_window() {
    // (window, events stored, duplicates dropped); the copies come 15 to 20 events after
    // their first.
    for (window, stored, dropped) in [
        (Some(100), 25, 5),
        (None, 30, 0), // the embedded log never repeats a record: off by default
        (Some(0), 30, 0),
        (Some(3), 30, 0),
    ] {
        let env = Env::new();
        let log = env.log();
        let store = env.store();
        let records: Vec<Record> = (0..25)
            .map(|i| Record {
                key: Bytes::from("acme"),
                payload: Bytes::from(event(i).to_json()),
            })
            .collect();
        log.publish(records[..20].to_vec()).await.unwrap();
        log.publish(records[..5].to_vec()).await.unwrap();
        log.publish(records[20..].to_vec()).await.unwrap();
        let config = CollectorConfig {
            dedup_window_events: window,
            ..env.config(20)
        };
        let (metrics, shutdown, handle) = start_metered(&log, &store, config);
        wait_for_count(&store, stored).await;
        shutdown.cancel();
        handle.await.unwrap().unwrap();
        assert_eq!(
            (metrics.consumed.get(), metrics.duplicates.get()),
            (30, dropped),
            "window {window:?}"
        );
        assert_eq!(
            count(&env.store()).await,
            stored,
            "window {window:?}, durably"
        );
        let sub = log.subscribe("tollgate-collector").unwrap();
        assert_eq!(
            sub.committed().0[&0],
            30,
            "a dropped copy is committed past"
        );
    }
}

/// The collector records how far its partitions are durably stored: after events published at
/// `t`, the store's watermark reaches `t` once they are flushed.
#[tokio::test]
async fn durable_progress_moves_the_completeness_watermark() {
    let env = Env::new();
    let log = env.log();
    let store = env.store();
    let (shutdown, handle) = start(&env, &log, &store, 20);
    publish(&log, 0..10).await;
    // Every record was on the bus by now.
    let published_at = chrono::Utc::now().timestamp_micros();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let p = store.progress().await.unwrap();
        let through = tollgate_store::ledger::complete_through(&p);
        if through.is_some_and(|t| t >= published_at) {
            assert_eq!(count(&store).await, 10, "complete means stored");
            assert_eq!(store.manifest().checkpoint.0[&0], 10, "and durable");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watermark {through:?} did not pass {published_at}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    // What was recorded survives a restart of the store.
    let again = tollgate_store::ledger::complete_through(&env.store().progress().await.unwrap());
    assert!(again.is_some_and(|t| t >= published_at));
}

/// However long the flush interval, what the store holds in memory is flushed once it reaches
/// `flush_max_events`: a crash then re-reads nothing that was already durable.
#[tokio::test]
async fn a_flush_comes_due_by_size_as_well_as_by_time() {
    let env = Env::new();
    let log = env.log();
    publish(&log, 0..30).await;
    let store = env.store();
    let config = CollectorConfig {
        flush_max_events: 10,
        ..env.config(3_600_000)
    };
    let (_shutdown, handle) = start_with(&log, &store, config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // The manifest is what a restart sees: it must cover all 30 before any interval passed.
    while store.manifest().checkpoint.0.get(&0).copied().unwrap_or(0) < 30 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing flushed by size"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handle.abort(); // a crash: what a fresh open sees was durable before it
    let _ = handle.await;
    assert_eq!(count(&env.store()).await, 30);
}

#[tokio::test]
async fn crash_before_flush_rereads_from_the_bus() {
    let env = Env::new();
    let log = env.log();
    publish(&log, 0..30).await;
    {
        let store = env.store();
        // Flushes never come due: the events sit in memory only.
        let (_shutdown, handle) = start(&env, &log, &store, 3_600_000);
        wait_for_count(&store, 30).await;
        handle.abort(); // the crash: no final flush, no commit
        let _ = handle.await;
    }
    let store = env.store();
    assert_eq!(count(&store).await, 0, "nothing was durable");
    let (shutdown, handle) = start(&env, &log, &store, 20);
    wait_for_count(&store, 30).await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(count(&env.store()).await, 30);
}

#[tokio::test]
async fn crash_between_store_flush_and_bus_commit_counts_nothing_twice() {
    let env = Env::new();
    let log = env.log();
    publish(&log, 0..10).await;
    {
        // The store made the first 10 durable, the bus commit never happened.
        let store = env.store();
        let events: Vec<RequestEvent> = (0..10).map(event).collect();
        store
            .append(&tollgate_store::EventBatch::consecutive(events, 0, 10))
            .await
            .unwrap();
        store.flush().await.unwrap();
    }
    assert_eq!(
        log.subscribe("tollgate-collector").unwrap().committed().0[&0],
        0
    );
    let store = env.store();
    let (shutdown, handle) = start(&env, &log, &store, 20);
    publish(&log, 10..15).await;
    wait_for_count(&store, 15).await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(count(&env.store()).await, 15);
}

#[tokio::test]
async fn a_restart_in_the_same_process_counts_nothing_twice() {
    let env = Env::new();
    let log = env.log();
    let store = env.store();
    publish(&log, 0..25).await;
    // First run: events appended to the store's memory, never flushed; then the run dies.
    let (_shutdown, handle) = start(&env, &log, &store, 3_600_000);
    wait_for_count(&store, 25).await;
    handle.abort();
    let _ = handle.await;
    // The same store object (the process lives on) serves the next run.
    let (shutdown, handle) = start(&env, &log, &store, 20);
    publish(&log, 25..30).await;
    wait_for_count(&store, 30).await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(count(&store).await, 30);
    assert_eq!(count(&env.store()).await, 30);
}
