//! The gateway's disk spool for a remote bus: while the bus cannot keep up (Kafka unreachable or
//! frozen, so records pile up undelivered), new records go to a durable log on local disk
//! instead of memory; a replay task sends them on, in order, once the bus delivers again, and
//! the spool's segments are deleted as they are replayed.
//!
//! - Order: once spooling starts, every record goes through the spool until it has drained, so
//!   records reach the bus in the order they were published.
//! - Bounded: a record that would grow the spool past `max_bytes` is dropped and counted
//!   (`SpoolStats::dropped`); nothing else is ever dropped.
//! - Durable: the spool is the embedded log (fsynced appends, checksummed segments), and its
//!   replay position is committed only after the bus confirmed delivery, so a gateway restarted
//!   mid-outage replays what it had spooled (at least once: a crash between delivery and the
//!   commit replays a batch again).
//! - Stopped mid-outage: the last `flush` takes back what the bus client still holds (records
//!   below the high-water mark wait in its memory, never spooled) and writes it to the spool,
//!   so the next start replays it too (at least once: a record that was in flight may have been
//!   written all the same).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::embedded::{EmbeddedConfig, EmbeddedLog};
use crate::{BusError, Checkpoint, Publisher, Record, Subscriber};

/// Where and how much to spool.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory of the spool's segments.
    pub dir: PathBuf,
    /// Largest size of the spool on disk; records beyond it are dropped and counted.
    pub max_bytes: u64,
    /// Spooling starts once this many records wait for delivery in the bus client.
    pub high_water: u64,
}

/// What the spool did (read by the gateway's metrics).
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Records written to the spool.
    pub spooled: AtomicU64,
    /// Records replayed from the spool to the bus.
    pub replayed: AtomicU64,
    /// Records dropped because the spool was full.
    pub dropped: AtomicU64,
    /// Bytes of spool segments on disk.
    pub disk_bytes: AtomicU64,
}

/// A publisher that spools to disk while `inner` cannot deliver.
pub struct SpoolingPublisher {
    inner: Arc<dyn Publisher>,
    log: EmbeddedLog,
    config: SpoolConfig,
    /// `true` while records go to the spool; the lock also orders publishing and replay.
    spooling: tokio::sync::Mutex<bool>,
    /// The records of the replay in flight (sent to the bus, not yet delivered).
    replaying: std::sync::Mutex<Vec<Record>>,
    stats: Arc<SpoolStats>,
}

const GROUP: &str = "replay";

impl SpoolingPublisher {
    /// Opens (or recovers) the spool in `config.dir` and starts its replay task, which runs as
    /// long as the returned publisher lives.
    pub fn open(
        inner: Arc<dyn Publisher>,
        config: SpoolConfig,
    ) -> Result<Arc<SpoolingPublisher>, BusError> {
        let log = EmbeddedLog::open(EmbeddedConfig {
            dir: config.dir.clone(),
            segment_bytes: (config.max_bytes / 8).clamp(1 << 20, 64 << 20),
            // Spooled publishes run one at a time (they keep the order of the records), so
            // each waits for its own sync: a short interval keeps the spool's rate up.
            sync_interval_ms: 10,
            ..Default::default()
        })?;
        let replay = log.subscribe(GROUP)?;
        let pending = log.end_offset() > replay.committed().0.get(&0).copied().unwrap_or(0);
        if pending {
            tracing::warn!(dir = %config.dir.display(), "the event spool holds records from before a restart; replaying them");
        }
        let spool = Arc::new(SpoolingPublisher {
            inner,
            log,
            config,
            spooling: tokio::sync::Mutex::new(pending),
            replaying: std::sync::Mutex::new(Vec::new()),
            stats: Arc::new(SpoolStats::default()),
        });
        spool
            .stats
            .disk_bytes
            .store(spool.log.disk_bytes(), Ordering::Relaxed);
        tokio::spawn(replay_loop(Arc::downgrade(&spool), replay));
        Ok(spool)
    }

    /// Counters for metrics.
    pub fn stats(&self) -> Arc<SpoolStats> {
        self.stats.clone()
    }

    /// Writes `records` to the spool, or drops and counts them when they would grow it past
    /// its bound.
    async fn append(&self, records: Vec<Record>) -> Result<(), BusError> {
        let size: u64 = records
            .iter()
            .map(|r| (r.key.len() + r.payload.len() + 32) as u64)
            .sum();
        let on_disk = self.log.disk_bytes();
        if on_disk + size > self.config.max_bytes {
            self.stats
                .dropped
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        let n = records.len() as u64;
        self.log.publish(records).await?;
        self.stats.spooled.fetch_add(n, Ordering::Relaxed);
        self.stats
            .disk_bytes
            .store(self.log.disk_bytes(), Ordering::Relaxed);
        Ok(())
    }

    fn replaying(&self) -> std::sync::MutexGuard<'_, Vec<Record>> {
        self.replaying.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether records are going to disk now.
    pub async fn is_spooling(&self) -> bool {
        *self.spooling.lock().await
    }
}

#[async_trait]
impl Publisher for SpoolingPublisher {
    async fn publish(&self, records: Vec<Record>) -> Result<(), BusError> {
        let mut spooling = self.spooling.lock().await;
        if !*spooling && self.inner.backlog() < self.config.high_water {
            return self.inner.publish(records).await;
        }
        if !*spooling {
            tracing::warn!(
                backlog = self.inner.backlog(),
                "the bus is not delivering; spooling events to disk"
            );
            *spooling = true;
        }
        self.append(records).await
    }

    /// Waits for the spool to drain and the bus to deliver. When that does not happen in
    /// time (the gateway stops while the bus is away), what the bus client still holds is
    /// taken back and written to the spool, to be replayed at the next start: it would
    /// otherwise be lost, every record below the high-water mark waiting in the client's
    /// memory. Records of a replay in flight are left out: they are still in the spool, not
    /// yet committed, and replay again anyway.
    async fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        while *self.spooling.lock().await && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let why = if *self.spooling.lock().await {
            "events remain in the disk spool; they are replayed at the next start".to_string()
        } else {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.inner.flush(left).await {
                Ok(()) => return Ok(()),
                Err(e) => e.to_string(),
            }
        };
        let taken = self.inner.take_undelivered(Duration::from_secs(10)).await;
        let replaying = std::mem::take(&mut *self.replaying());
        let replayed: std::collections::HashSet<&[u8]> =
            replaying.iter().map(|r| &r.payload[..]).collect();
        let kept: Vec<Record> = taken
            .into_iter()
            .filter(|r| !replayed.contains(&r.payload[..]))
            .collect();
        let message = if kept.is_empty() {
            why
        } else {
            let n = kept.len();
            let _one_at_a_time = self.spooling.lock().await;
            self.append(kept).await?;
            format!(
                "{why}; {n} events the bus had not delivered were moved to the disk spool, to be replayed at the next start"
            )
        };
        Err(BusError::Broker {
            message,
            retryable: true,
        })
    }

    fn backlog(&self) -> u64 {
        self.inner.backlog()
    }
}

/// Sends spooled records on whenever the bus delivers again; stops with the publisher.
async fn replay_loop(
    spool: std::sync::Weak<SpoolingPublisher>,
    mut sub: crate::embedded::EmbeddedSubscriber,
) {
    let mut position = sub.committed().0.get(&0).copied().unwrap_or(0);
    loop {
        let Some(s) = spool.upgrade() else { return };
        // Replay only while the bus keeps up (its backlog is low again).
        if s.inner.backlog() > s.config.high_water / 2 {
            drop(s);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        // Not held while waiting: the publisher may go meanwhile. A poll returns as soon as
        // something is spooled; the wait only sets how often an idle gateway wakes here.
        drop(s);
        let msgs = match sub.poll(5_000, Duration::from_secs(1)).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the event spool");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(s) = spool.upgrade() else { return };
        if msgs.is_empty() {
            let mut spooling = s.spooling.lock().await;
            if *spooling && position >= s.log.end_offset() {
                *spooling = false;
                tracing::info!("the event spool has drained; publishing directly again");
            }
            continue;
        }
        let n = msgs.len() as u64;
        let next = msgs.last().map_or(position, |m| m.offset + 1);
        let records: Vec<Record> = msgs
            .into_iter()
            .map(|m| Record {
                key: m.key,
                payload: m.payload,
            })
            .collect();
        // Delivered before the spool position moves: a crash replays, never loses.
        *s.replaying() = records.clone();
        let delivered = match s.inner.publish(records).await {
            Ok(()) => s.inner.flush(Duration::from_secs(300)).await,
            Err(e) => Err(e),
        };
        s.replaying().clear();
        match delivered {
            Ok(()) => {
                position = next;
                if let Err(e) = sub.commit(&Checkpoint([(0, next)].into())).await {
                    tracing::error!(error = %e, "cannot record the spool's replay position");
                }
                s.stats.replayed.fetch_add(n, Ordering::Relaxed);
                s.stats
                    .disk_bytes
                    .store(s.log.disk_bytes(), Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "replaying the event spool failed; retrying");
                let _ = sub.seek(0, position).await;
                drop(s);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    use bytes::Bytes;

    use super::*;

    /// A bus whose delivery can be stalled: while stalled it reports a large backlog and keeps
    /// what it is given in memory, as librdkafka does with an unreachable broker.
    #[derive(Default)]
    struct Stallable {
        stalled: AtomicBool,
        got: Mutex<Vec<Bytes>>,
    }

    #[async_trait]
    impl Publisher for Stallable {
        async fn publish(&self, records: Vec<Record>) -> Result<(), BusError> {
            let mut got = self.got.lock().unwrap();
            got.extend(records.into_iter().map(|r| r.payload));
            Ok(())
        }
        fn backlog(&self) -> u64 {
            if self.stalled.load(Ordering::Relaxed) {
                1_000
            } else {
                0
            }
        }
    }

    fn batch(range: std::ops::Range<u64>) -> Vec<Record> {
        range
            .map(|i| Record {
                key: Bytes::from_static(b"k"),
                payload: Bytes::from(i.to_string()),
            })
            .collect()
    }

    /// The numbers of the records a fake bus delivered, in the order it got them.
    fn received(got: &Mutex<Vec<Bytes>>) -> Vec<u64> {
        got.lock()
            .unwrap()
            .iter()
            .map(|p| String::from_utf8_lossy(p).parse().unwrap())
            .collect()
    }

    fn open<B: Publisher + 'static>(
        bus: &Arc<B>,
        dir: &std::path::Path,
        max_bytes: u64,
    ) -> Arc<SpoolingPublisher> {
        SpoolingPublisher::open(
            bus.clone(),
            SpoolConfig {
                dir: dir.to_path_buf(),
                max_bytes,
                high_water: 10,
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn spools_while_stalled_then_replays_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(Stallable::default());
        let spool = open(&bus, dir.path(), 1 << 30);
        spool.publish(batch(0..5)).await.unwrap();
        bus.stalled.store(true, Ordering::Relaxed);
        for i in 0..10 {
            spool.publish(batch(5 + i * 10..15 + i * 10)).await.unwrap();
        }
        assert!(spool.is_spooling().await);
        assert_eq!(
            received(&bus.got),
            (0..5).collect::<Vec<_>>(),
            "nothing sent while stalled"
        );
        assert_eq!(spool.stats().spooled.load(Ordering::Relaxed), 100);
        bus.stalled.store(false, Ordering::Relaxed);
        // New records keep their place behind the spooled ones.
        spool.publish(batch(105..110)).await.unwrap();
        spool.flush(Duration::from_secs(10)).await.unwrap();
        assert!(!spool.is_spooling().await);
        spool.publish(batch(110..120)).await.unwrap();
        assert_eq!(received(&bus.got), (0..120).collect::<Vec<_>>());
        assert_eq!(spool.stats().dropped.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_full_spool_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(Stallable::default());
        bus.stalled.store(true, Ordering::Relaxed);
        let spool = open(&bus, dir.path(), 4_000);
        for i in 0..20 {
            spool.publish(batch(i * 10..i * 10 + 10)).await.unwrap();
        }
        let stats = spool.stats();
        let (spooled, dropped) = (
            stats.spooled.load(Ordering::Relaxed),
            stats.dropped.load(Ordering::Relaxed),
        );
        assert!(
            spooled > 0 && dropped > 0,
            "{spooled} spooled, {dropped} dropped"
        );
        assert_eq!(spooled + dropped, 200);
        assert!(stats.disk_bytes.load(Ordering::Relaxed) <= 4_000);
        bus.stalled.store(false, Ordering::Relaxed);
        spool.flush(Duration::from_secs(10)).await.unwrap();
        assert_eq!(received(&bus.got).len() as u64, spooled);
    }

    /// A bus that keeps what it is given undelivered while stalled (as librdkafka does with
    /// an unreachable broker) and gives it back when asked.
    #[derive(Default)]
    struct Holding {
        stalled: AtomicBool,
        held: Mutex<Vec<Record>>,
        got: Mutex<Vec<Bytes>>,
    }

    #[async_trait]
    impl Publisher for Holding {
        async fn publish(&self, records: Vec<Record>) -> Result<(), BusError> {
            if self.stalled.load(Ordering::Relaxed) {
                self.held.lock().unwrap().extend(records);
            } else {
                let mut got = self.got.lock().unwrap();
                got.extend(records.into_iter().map(|r| r.payload));
            }
            Ok(())
        }
        async fn flush(&self, _timeout: Duration) -> Result<(), BusError> {
            match self.backlog() {
                0 => Ok(()),
                n => Err(BusError::Broker {
                    message: format!("{n} undelivered"),
                    retryable: true,
                }),
            }
        }
        fn backlog(&self) -> u64 {
            self.held.lock().unwrap().len() as u64
        }
        async fn take_undelivered(&self, _timeout: Duration) -> Vec<Record> {
            std::mem::take(&mut *self.held.lock().unwrap())
        }
    }

    /// A gateway stopped while the bus is away: what the bus client still held (below the
    /// high-water mark, never spooled) is moved to the spool by the last flush, and the next
    /// start replays it with the rest: every record once.
    #[tokio::test]
    async fn a_gateway_stopped_while_the_bus_is_away_spools_what_the_bus_held() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(Holding::default());
        bus.stalled.store(true, Ordering::Relaxed);
        let spool = open(&bus, dir.path(), 1 << 30);
        spool.publish(batch(0..8)).await.unwrap();
        spool.publish(batch(8..12)).await.unwrap();
        spool.publish(batch(12..20)).await.unwrap();
        assert_eq!(
            bus.backlog(),
            12,
            "below the high-water mark: to the bus client"
        );
        assert_eq!(spool.stats().spooled.load(Ordering::Relaxed), 8);
        let e = spool.flush(Duration::from_millis(100)).await.unwrap_err();
        assert!(e.to_string().contains("12 events"), "{e}");
        assert_eq!(bus.backlog(), 0);
        drop(spool);

        let bus = Arc::new(Holding::default());
        let spool = open(&bus, dir.path(), 1 << 30);
        spool.flush(Duration::from_secs(10)).await.unwrap();
        let mut got = received(&bus.got);
        got.sort_unstable();
        assert_eq!(got, (0..20).collect::<Vec<_>>(), "every record once");
    }

    #[tokio::test]
    async fn a_restarted_gateway_replays_what_it_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Arc::new(Stallable::default());
        bus.stalled.store(true, Ordering::Relaxed);
        let spool = open(&bus, dir.path(), 1 << 30);
        spool.publish(batch(0..30)).await.unwrap();
        drop(spool); // the gateway stops with the bus still down
        let bus = Arc::new(Stallable::default());
        let spool = open(&bus, dir.path(), 1 << 30);
        assert!(spool.is_spooling().await);
        spool.flush(Duration::from_secs(10)).await.unwrap();
        assert_eq!(received(&bus.got), (0..30).collect::<Vec<_>>());
    }
}
