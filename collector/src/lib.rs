//! The collector: bus → batches → store, with offsets committed only after the store confirms.
//!
//! # Exactly-once, and why a crash anywhere loses nothing and counts nothing twice
//!
//! The store is the record of which bus positions it holds; the bus commit only says where
//! reading may start. Each time a partition is assigned to this collector (at start, on every
//! consumer-group rebalance), it asks the store (`EventWriter::resume`) which of that
//! partition's records it already holds from the group's commit on, seeks past them and skips
//! any others it meets. Records are appended in batches; `flush` makes them durable and the
//! collector commits the checkpoint `flush` returns *after* it returns. So:
//!
//! - crash before a flush completes: the store holds nothing past its last durable point, and
//!   the bus commit is no further, so the lost events are read again;
//! - crash after the flush, before the bus commit: the store says it holds them, so they are
//!   skipped instead of written twice;
//! - crash after the commit: both agree.
//! - rebalance: the old owner drops what it had not appended for a revoked partition and
//!   flushes and commits the rest; appends happen between polls, so they are finished before
//!   the rebalance completes, and the new owner's `resume` sees them.
//!
//! How each store knows what it holds: the Parquet store commits the bus checkpoint in the same
//! manifest as the files; ClickHouse keeps each row's bus position and is looked up by it (see
//! `tollgate-store`'s backend docs).
//!
//! Exactly once per bus position is not exactly once per event when the bus holds one event at
//! two positions, which Kafka's producer does on a few rare paths. The collector drops an event
//! whose id is among the last `dedup_window_events` it consumed, seeded from the store when it
//! takes a partition over (`recent.rs`: the window, and the copies it does not catch).
//!
//! Invalid messages go to the dead-letter sink (fsynced before the flush that covers them) and are
//! counted; they are at-least-once there, since a crash can replay them.

mod batcher;
mod dead_letter;
mod metrics;
mod progress;
mod recent;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_bus::{AssignmentChange, BusError, Subscriber};
use tollgate_schemas::Checkpoint;
use tollgate_store::cpu;
use tollgate_store::{EventBatch, EventWriter, Resume, StoreError};

pub use batcher::Batcher;
pub use dead_letter::DeadLetter;
pub use metrics::CollectorMetrics;
use progress::Progress;
use recent::Recent;

/// How long a poll with nothing batched waits for records. A poll returns as soon as records
/// arrive, so this only sets how often an idle collector wakes: it was 50 ms, 20 wake-ups a
/// second of an idle `tollgate up`. At most a second, so that an idle collector still notes
/// that it is caught up (`CollectorMetrics::caught_up`) well within any lag bound.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// The `collector:` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Consumer group on the bus.
    #[serde(default = "default_group")]
    pub group: String,
    /// A batch goes to the store once it holds this many events (unset: what the store
    /// prefers, 10,000 for Parquet and 50,000 for ClickHouse)...
    #[serde(default)]
    pub batch_max_events: Option<usize>,
    /// ...or once its first event has waited this long (milliseconds).
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// How often the store makes appended batches durable and offsets are committed (ms)...
    #[serde(default = "default_flush_ms")]
    pub flush_interval_ms: u64,
    /// ...or as soon as this many events were appended since the last flush: what an embedded
    /// store holds in memory between flushes stays bounded however fast events arrive.
    #[serde(default = "default_flush_max_events")]
    pub flush_max_events: usize,
    /// Directory of the dead-letter files (invalid events). Unset: a folder of `--data-dir`
    /// (default `./data`); a relative path is relative to the working directory.
    #[serde(default = "default_dead_letter")]
    pub dead_letter_dir: PathBuf,
    /// Address of `/metrics`, `/healthz` and `/readyz` when the collector runs as its own
    /// process (`tollgate collector`).
    #[serde(default = "default_admin_listen")]
    pub admin_listen: std::net::SocketAddr,
    /// In `tollgate up` on the embedded bus, where the collector shares the cores with the
    /// gateway: it runs on cores the request path leaves idle until it has been this long
    /// (milliseconds) without reaching the end of the bus, then at its fair share until it
    /// has caught up. 0: always at its fair share. Events wait in the bus meanwhile; nothing
    /// is dropped. Not used by a collector running as its own process, nor with Kafka.
    #[serde(default = "default_yield_until_lag_ms")]
    pub yield_until_lag_ms: u64,
    /// How many of the last event ids the collector remembers (of all the partitions it owns;
    /// seeded from the store when it takes partitions over), to drop an event the bus holds
    /// twice (`recent.rs` says when that happens and what the window does not catch). Unset:
    /// 1,000,000 on a bus that may hold a record twice (Kafka), off on the embedded log, which
    /// never does. 0: off. About 57 MB for a full window of a million.
    #[serde(default)]
    pub dedup_window_events: Option<usize>,
}

/// The deduplication window on a bus that may hold a record twice, unless configured.
pub const DEFAULT_DEDUP_WINDOW_EVENTS: usize = 1_000_000;

fn default_yield_until_lag_ms() -> u64 {
    5_000
}

fn default_admin_listen() -> std::net::SocketAddr {
    "127.0.0.1:8082".parse().expect("valid")
}

fn default_group() -> String {
    "tollgate-collector".into()
}
fn default_linger_ms() -> u64 {
    50
}
fn default_flush_ms() -> u64 {
    2_000
}
fn default_flush_max_events() -> usize {
    100_000
}
fn default_dead_letter() -> PathBuf {
    PathBuf::new()
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            group: default_group(),
            batch_max_events: None,
            linger_ms: default_linger_ms(),
            flush_interval_ms: default_flush_ms(),
            flush_max_events: default_flush_max_events(),
            dead_letter_dir: default_dead_letter(),
            admin_listen: default_admin_listen(),
            yield_until_lag_ms: default_yield_until_lag_ms(),
            dedup_window_events: None,
        }
    }
}

impl CollectorConfig {
    /// Checks values without I/O; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_max_events == Some(0) {
            return Err("collector.batch_max_events: must be at least 1".into());
        }
        if self.flush_interval_ms == 0 {
            return Err("collector.flush_interval_ms: must be at least 1".into());
        }
        if self.flush_max_events == 0 {
            return Err("collector.flush_max_events: must be at least 1".into());
        }
        Ok(())
    }
}

/// Collector errors.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("dead-letter sink: {0}")]
    DeadLetter(std::io::Error),
}

impl CollectorError {
    /// Whether trying again later may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            CollectorError::Bus(e) => e.retryable(),
            CollectorError::Store(e) => e.retryable(),
            CollectorError::DeadLetter(_) => true,
        }
    }
}

/// Runs the collector until `shutdown`, then appends what it holds, flushes and commits.
///
/// Dead letters go to `dead` (see `DeadLetter`). Partition assignments can change at any poll
/// (Kafka rebalances); each assigned partition resumes where the store's data ends, and a
/// revoked partition's records not yet appended are dropped for its next owner to read.
pub async fn run(
    config: CollectorConfig,
    mut bus: Box<dyn Subscriber>,
    store: Arc<dyn EventWriter>,
    mut dead: DeadLetter,
    metrics: CollectorMetrics,
    shutdown: CancellationToken,
) -> Result<(), CollectorError> {
    // Whatever a failed predecessor in this process appended but did not flush is forgotten:
    // it is read again from the bus (see the crate docs).
    store.reset().await?;
    let mut resume: HashMap<u32, Resume> = HashMap::new();

    let linger = Duration::from_millis(config.linger_ms);
    let flush_every = Duration::from_millis(config.flush_interval_ms);
    let batch_max = config
        .batch_max_events
        .unwrap_or_else(|| store.preferred_batch_events());
    let mut batcher = Batcher::new(batch_max, linger);
    let mut recent = Recent::new(config.dedup_window_events.unwrap_or(
        if bus.may_repeat_records() {
            DEFAULT_DEDUP_WINDOW_EVENTS
        } else {
            0
        },
    ));
    let mut next_flush = Instant::now() + flush_every;
    let mut appended_since_flush = false;
    // Whether a batch was appended since the last flush interval began: one with none
    // releases the batcher's spares (`Batcher::release_spares`).
    let mut appended_this_interval = false;
    let mut events_since_flush = 0usize;
    let mut progress = Progress::default();
    loop {
        // Changes seen by the last poll come after the records it returned (trait contract).
        for change in bus.take_changes() {
            metrics.rebalances.inc();
            match change {
                AssignmentChange::Assigned(parts) => {
                    let mut taken = Vec::with_capacity(parts.len());
                    for (p, committed) in parts {
                        let r = assign(&*store, &mut *bus, p, committed).await?;
                        progress.stored(&Checkpoint([(p, r.stored_through)].into()));
                        taken.push((p, r.stored_through));
                        resume.insert(p, r);
                    }
                    if let Some(w) = &mut recent {
                        for (p, at, n) in recent::seed_shares(w.cap(), &taken) {
                            w.seed(p, &store.recent_ids(p, at, n).await?);
                        }
                    }
                }
                AssignmentChange::Revoked(parts) => {
                    tracing::info!(partitions = ?parts, "partitions revoked; dropping what was not stored");
                    batcher.drop_partitions(&parts);
                    // Ids of the dropped events must not make this collector skip them if the
                    // partitions come back (`recent.rs`).
                    if let Some(w) = &mut recent {
                        w.revoke(&parts);
                    }
                    for p in &parts {
                        resume.remove(p);
                        progress.revoked(*p);
                        metrics
                            .lag
                            .remove(&metrics::PartitionLabels { partition: *p });
                    }
                    if appended_since_flush {
                        progress.stored(&flush(&*store, &mut *bus, &mut dead, &metrics).await?);
                        appended_since_flush = false;
                        events_since_flush = 0;
                    }
                }
            }
        }
        let now = Instant::now();
        let wait = batcher
            .time_left(now)
            .unwrap_or(IDLE_POLL)
            .min(next_flush.saturating_duration_since(now));
        let room = batcher.room();
        let messages = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = bus.poll(room, wait) => r?,
        };
        if messages.len() < room {
            metrics
                .caught_up
                .set(unix_seconds(std::time::SystemTime::now()));
        }
        let now = Instant::now();
        for (i, msg) in messages.into_iter().enumerate() {
            // A poll returns up to a batch of messages, which took up to 10 ms to decode in
            // one go: decode them a step at a time (`tollgate_store::cpu`).
            cpu::tick_at(i);
            metrics.consumed.inc();
            let r = match resume.get(&msg.partition) {
                Some(r) => r,
                None => {
                    // Not announced (should not happen): resume it as if just assigned.
                    let committed = bus.committed().0.get(&msg.partition).copied().unwrap_or(0);
                    let r = assign(&*store, &mut *bus, msg.partition, committed).await?;
                    if let Some(w) = &mut recent {
                        let n = w.cap() / (resume.len() + 1);
                        w.seed(
                            msg.partition,
                            &store.recent_ids(msg.partition, r.stored_through, n).await?,
                        );
                    }
                    resume.entry(msg.partition).or_insert(r)
                }
            };
            if r.is_stored(msg.offset) {
                metrics.already_stored.inc();
                batcher.skip(msg.partition, msg.offset, now);
                continue;
            }
            match batcher.decode(&msg.payload) {
                Ok(ev) => {
                    if let Some(w) = &mut recent
                        && w.seen(msg.partition, ev.id.as_u128())
                    {
                        metrics.duplicates.inc();
                        tracing::debug!(partition = msg.partition, offset = msg.offset, id = %ev.id, "dropped an event consumed before (a record the bus holds twice)");
                        batcher.skip(msg.partition, msg.offset, now);
                    } else {
                        batcher.place(msg.partition, msg.offset, now);
                    }
                }
                Err(e) => {
                    metrics.dead_lettered.inc();
                    tracing::warn!(partition = msg.partition, offset = msg.offset, error = %e, "invalid event sent to dead letter");
                    dead.write(&msg, &e.to_string())
                        .map_err(CollectorError::DeadLetter)?;
                    batcher.skip(msg.partition, msg.offset, now);
                }
            }
        }
        if let Some(batch) = batcher.take_if_due(Instant::now()) {
            append(&*store, &batch, &metrics).await?;
            appended_since_flush = true;
            appended_this_interval = true;
            events_since_flush += batch.events.len();
            batcher.recycle(batch);
            if store.durable_on_append() || events_since_flush >= config.flush_max_events {
                // Durable on append: commit now, so a rebalance re-reads as little as possible.
                // Otherwise enough is held in memory: make it durable before taking more.
                progress.stored(&flush(&*store, &mut *bus, &mut dead, &metrics).await?);
                appended_since_flush = false;
                events_since_flush = 0;
            }
        }
        if Instant::now() >= next_flush {
            if appended_since_flush {
                progress.stored(&flush(&*store, &mut *bus, &mut dead, &metrics).await?);
                appended_since_flush = false;
                events_since_flush = 0;
            }
            let owned: HashSet<u32> = resume.keys().copied().collect();
            progress.step(&owned, &mut *bus, &*store, &metrics).await;
            if !std::mem::take(&mut appended_this_interval) {
                batcher.release_spares();
            }
            next_flush = Instant::now() + flush_every;
        }
    }
    if let Some(batch) = batcher.take() {
        append(&*store, &batch, &metrics).await?;
    }
    progress.stored(&flush(&*store, &mut *bus, &mut dead, &metrics).await?);
    let owned: HashSet<u32> = resume.keys().copied().collect();
    progress.step(&owned, &mut *bus, &*store, &metrics).await;
    tracing::info!("collector stopped after a final flush");
    Ok(())
}

/// `t` as Unix seconds (0 before the epoch), the unit of the collector's timestamp gauges
/// (`tollgate_collector_caught_up_timestamp_seconds`, which `tollgate up` compares with now).
pub fn unix_seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Resumes a newly assigned partition after what the store holds of it.
async fn assign(
    store: &dyn EventWriter,
    bus: &mut dyn Subscriber,
    partition: u32,
    committed: u64,
) -> Result<Resume, CollectorError> {
    let r = store.resume(partition, committed).await?;
    if r.stored_through > committed {
        bus.seek(partition, r.stored_through).await?;
        bus.commit(&Checkpoint([(partition, r.stored_through)].into()))
            .await?;
    }
    tracing::info!(
        partition,
        committed,
        resume_at = r.stored_through,
        stored_beyond = r.stored_after.len(),
        "partition assigned; resuming after what the store holds"
    );
    Ok(r)
}

async fn append(
    store: &dyn EventWriter,
    batch: &EventBatch,
    metrics: &CollectorMetrics,
) -> Result<(), CollectorError> {
    let started = std::time::Instant::now();
    if let Err(e) = store.append(batch).await {
        count_store_error(metrics, "append");
        return Err(e.into());
    }
    metrics.appended.inc_by(batch.events.len() as u64);
    metrics.batches.inc();
    metrics
        .append_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.batch_events.observe(batch.events.len() as f64);
    if let Some(newest) = batch.events.iter().map(|e| e.ts).max() {
        let seconds = newest.timestamp_micros() as f64 / 1e6;
        if seconds > metrics.newest_event.get() {
            metrics.newest_event.set(seconds);
        }
    }
    Ok(())
}

fn count_store_error(metrics: &CollectorMetrics, op: &'static str) {
    metrics
        .store_errors
        .get_or_create(&metrics::OpLabels { op })
        .inc();
}

/// Makes what was appended durable and commits it; returns the store's durable checkpoint.
async fn flush(
    store: &dyn EventWriter,
    bus: &mut dyn Subscriber,
    dead: &mut DeadLetter,
    metrics: &CollectorMetrics,
) -> Result<Checkpoint, CollectorError> {
    let started = std::time::Instant::now();
    dead.sync().await.map_err(CollectorError::DeadLetter)?;
    let durable = store
        .flush()
        .await
        .inspect_err(|_| count_store_error(metrics, "flush"))?;
    bus.commit(&durable).await?;
    metrics
        .flush_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(durable)
}

#[cfg(test)]
mod tests;
