//! The collector: bus → batches → store, with offsets committed only after the store confirms.
//!
//! # Exactly-once, and why a crash anywhere loses nothing and counts nothing twice
//!
//! The store keeps, atomically with the data it makes durable, the bus checkpoint just after the
//! last event in that data (`EventWriter::flush` returns it). The collector commits that same
//! checkpoint to the bus *after* the flush returns. On start it resumes from the later of the bus
//! commit and the store checkpoint:
//!
//! - crash before a flush completes: the store's durable checkpoint and the bus commit are both
//!   behind the lost in-memory events, so they are read again;
//! - crash after the flush, before the bus commit: the store checkpoint is ahead, so the
//!   collector seeks past events already stored instead of writing them again;
//! - crash after the commit: both agree.
//!
//! Invalid messages go to the dead-letter sink (fsynced before the flush that covers them) and are
//! counted; they are at-least-once there, since a crash can replay them.

mod batcher;
mod dead_letter;
mod metrics;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_bus::{BusError, Subscriber};
use tollgate_schemas::RequestEvent;
use tollgate_store::{EventWriter, StoreError};

pub use batcher::Batcher;
pub use dead_letter::DeadLetter;
pub use metrics::CollectorMetrics;

/// The `collector:` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Consumer group on the bus.
    #[serde(default = "default_group")]
    pub group: String,
    /// A batch goes to the store once it holds this many events...
    #[serde(default = "default_batch_max")]
    pub batch_max_events: usize,
    /// ...or once its first event has waited this long (milliseconds).
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// How often the store makes appended batches durable and offsets are committed (ms).
    #[serde(default = "default_flush_ms")]
    pub flush_interval_ms: u64,
    /// Directory of the dead-letter files (invalid events). Unset: a folder of `--data-dir`
    /// (default `./data`); a relative path is relative to the working directory.
    #[serde(default = "default_dead_letter")]
    pub dead_letter_dir: PathBuf,
}

fn default_group() -> String {
    "tollgate-collector".into()
}
fn default_batch_max() -> usize {
    10_000
}
fn default_linger_ms() -> u64 {
    50
}
fn default_flush_ms() -> u64 {
    2_000
}
fn default_dead_letter() -> PathBuf {
    PathBuf::new()
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            group: default_group(),
            batch_max_events: default_batch_max(),
            linger_ms: default_linger_ms(),
            flush_interval_ms: default_flush_ms(),
            dead_letter_dir: default_dead_letter(),
        }
    }
}

impl CollectorConfig {
    /// Checks values without I/O; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_max_events == 0 {
            return Err("collector.batch_max_events: must be at least 1".into());
        }
        if self.flush_interval_ms == 0 {
            return Err("collector.flush_interval_ms: must be at least 1".into());
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
pub async fn run(
    config: CollectorConfig,
    mut bus: Box<dyn Subscriber>,
    store: Arc<dyn EventWriter>,
    metrics: CollectorMetrics,
    shutdown: CancellationToken,
) -> Result<(), CollectorError> {
    let mut dead = DeadLetter::open(&config.dead_letter_dir).map_err(CollectorError::DeadLetter)?;
    // Resume after whatever is already durable in the store (see the crate docs).
    let durable = store.reset().await?;
    let start = bus.committed().max(&durable);
    bus.seek(&start).await?;
    if start != bus.committed() {
        bus.commit(&start).await?;
    }
    tracing::info!(checkpoint = ?start.0, "collector resuming");

    let linger = Duration::from_millis(config.linger_ms);
    let flush_every = Duration::from_millis(config.flush_interval_ms);
    let mut batcher = Batcher::new(config.batch_max_events, linger);
    let mut next_flush = Instant::now() + flush_every;
    let mut appended_since_flush = false;
    loop {
        let now = Instant::now();
        let wait = batcher
            .time_left(now)
            .unwrap_or(linger.max(Duration::from_millis(50)))
            .min(next_flush.saturating_duration_since(now));
        let messages = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = bus.poll(batcher.room(), wait) => r?,
        };
        let now = Instant::now();
        for msg in messages {
            metrics.consumed.inc();
            match RequestEvent::from_json(&msg.payload) {
                Ok(ev) => batcher.push(ev, msg.partition, msg.offset, now),
                Err(e) => {
                    metrics.dead_lettered.inc();
                    tracing::warn!(offset = msg.offset, error = %e, "invalid event sent to dead letter");
                    dead.write(&msg, &e.to_string())
                        .map_err(CollectorError::DeadLetter)?;
                    batcher.skip(msg.partition, msg.offset, now);
                }
            }
        }
        if let Some((events, through)) = batcher.take_if_due(Instant::now()) {
            append(&*store, &events, &through, &metrics).await?;
            appended_since_flush = true;
        }
        if Instant::now() >= next_flush {
            if appended_since_flush {
                flush(&*store, &mut *bus, &mut dead, &metrics).await?;
                appended_since_flush = false;
            }
            next_flush = Instant::now() + flush_every;
        }
    }
    if let Some((events, through)) = batcher.take() {
        append(&*store, &events, &through, &metrics).await?;
    }
    flush(&*store, &mut *bus, &mut dead, &metrics).await?;
    tracing::info!("collector stopped after a final flush");
    Ok(())
}

async fn append(
    store: &dyn EventWriter,
    events: &[RequestEvent],
    through: &tollgate_schemas::Checkpoint,
    metrics: &CollectorMetrics,
) -> Result<(), CollectorError> {
    let started = std::time::Instant::now();
    store
        .append(tollgate_schemas::arrow::to_batch(events), through)
        .await?;
    metrics.appended.inc_by(events.len() as u64);
    metrics.batches.inc();
    metrics
        .append_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(())
}

async fn flush(
    store: &dyn EventWriter,
    bus: &mut dyn Subscriber,
    dead: &mut DeadLetter,
    metrics: &CollectorMetrics,
) -> Result<(), CollectorError> {
    let started = std::time::Instant::now();
    dead.sync().map_err(CollectorError::DeadLetter)?;
    let durable = store.flush().await?;
    bus.commit(&durable).await?;
    metrics
        .flush_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests;
