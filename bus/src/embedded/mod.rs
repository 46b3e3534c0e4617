//! The embedded bus: a durable append-only log on local disk for the one-process deployment.
//!
//! One partition (0). A `publish` encodes its records into memory under a mutex (offsets are
//! given there) and returns once they are durable. Group commits make them so: at most one runs
//! at a time, at most one starts per `sync_interval_ms`, and each writes every record encoded
//! before it began in one `write` and then syncs it with one `fdatasync`, so publishes that
//! arrive meanwhile share it (the gateway's batching task also publishes many events per call).
//! A record becomes visible to subscribers only after it is durable. Without `fsync`, a publish
//! writes its records at once and they are visible at once.
//!
//! Why one write per group commit: the log wrote each publish as it came, on a blocking thread
//! woken for it, while the last sync was still running; those writes took 3.6 % of
//! `tollgate up`'s samples under load, most of it copying into pages being written back.
//!
//! Why an interval: `tollgate up` under load synced after every publish, about 470 times a second
//! at 40,000 requests/s, and the writes and syncs were the largest cost outside the gateway's own
//! threads (about 6 % of the process's CPU, BENCHMARKS.md). A record waits at most one interval
//! longer to become visible; nothing acknowledged is less durable.
//!
//! Why 50 ms by default: every sync makes new records visible, and the collector wakes, reads
//! and decodes them: the pipeline behind the gateway ran 100 times a second at 10 ms, on the
//! cores serving requests. At 50 ms, `tollgate up` served 4-7 % more requests per second against
//! nginx in the same run (BENCHMARKS.md, "Publishes that overlap"). What it costs: an event
//! reaches the store's queries up to 40 ms later, and a machine that loses power (not a
//! process that crashes: the records are already written) loses up to 50 ms more of events.
//! Publishes overlap (`tollgate_gateway::events::channel`), so the interval does not bound how
//! many events a second the log takes.
//!
//! Consumer groups keep their committed offset in `offsets/<group>.json`, replaced atomically
//! (write, fsync, rename). Segments whose records every known group has committed are deleted,
//! except the active one.
//!
//! No existing crate gave us checksummed segments with torn-tail truncation and explicit offset
//! commits without pulling in a whole database, so the format is kept small here: `segment.rs`.

mod offsets;
pub mod segment;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{AssignmentChange, Bus, BusError, Checkpoint, Message, Publisher, Record, Subscriber};
use segment::SegmentReader;

/// The `bus:` section for `kind: embedded`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Directory of the log (segments and consumer offsets). Unset: a folder of `--data-dir`
    /// (default `./data`); a relative path is relative to the working directory.
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    /// A segment rolls over once it holds this many bytes.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// fsync after every publish (true) or leave flushing to the OS (false: faster, a machine
    /// crash may lose the last events; a process crash loses nothing either way).
    #[serde(default = "default_true")]
    pub fsync: bool,
    /// With `fsync`, the least time between the starts of two syncs, in milliseconds (group
    /// commit: publishes that arrive meanwhile share the next sync). A publish waits at most
    /// this long beyond its sync; 0 syncs as soon as the last sync is done.
    #[serde(default = "default_sync_interval_ms")]
    pub sync_interval_ms: u64,
}

fn default_dir() -> PathBuf {
    PathBuf::new()
}
fn default_segment_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_true() -> bool {
    true
}
fn default_sync_interval_ms() -> u64 {
    50
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            dir: default_dir(),
            segment_bytes: default_segment_bytes(),
            fsync: true,
            sync_interval_ms: default_sync_interval_ms(),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BusError + '_ {
    move |source| BusError::Io {
        path: path.display().to_string(),
        source,
    }
}

struct Writer {
    /// Shared with a sync in flight, which runs without the writer's lock.
    file: Arc<File>,
    base: u64,
    /// Bytes written to the active segment.
    len: u64,
    /// Offset of the next record to append (records in `pending` included).
    next: u64,
    /// Offset after the last record written to a segment: where `pending` starts.
    written: u64,
    /// Records encoded and not yet written (with `fsync`, the next group commit writes them).
    pending: Vec<u8>,
    /// The buffer the last group commit wrote, kept to encode into again.
    spare: Vec<u8>,
}

struct Inner {
    dir: PathBuf,
    offsets_dir: PathBuf,
    config: EmbeddedConfig,
    writer: Mutex<Writer>,
    /// The group commit: held by the one sync in flight (see the module docs).
    sync: tokio::sync::Mutex<Synced>,
    /// Offset of the next record to append = end of the durable, readable log.
    high_water: watch::Sender<u64>,
    /// Syncs started by publishes.
    syncs: std::sync::atomic::AtomicU64,
}

/// What the syncs have made durable so far.
struct Synced {
    /// Every record below this offset is durable.
    through: u64,
    /// When the last sync started.
    last: Option<tokio::time::Instant>,
}

/// A handle to the log; clones share it.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

impl EmbeddedLog {
    /// Opens (or creates) the log, recovering from a torn tail.
    pub fn open(config: EmbeddedConfig) -> Result<EmbeddedLog, BusError> {
        let dir = config.dir.join("segments");
        let offsets_dir = config.dir.join("offsets");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        std::fs::create_dir_all(&offsets_dir).map_err(io_err(&offsets_dir))?;
        let bases = segment::list_segments(&dir).map_err(io_err(&dir))?;
        let base = bases.last().copied().unwrap_or(0);
        let path = segment::segment_path(&dir, base);
        if !path.exists() {
            File::create(&path).map_err(io_err(&path))?;
        }
        let rec = segment::recover(&path, base).map_err(io_err(&path))?;
        if rec.truncated > 0 {
            tracing::warn!(
                segment = %path.display(),
                truncated_bytes = rec.truncated,
                next_offset = rec.next_offset,
                "bus log had a torn tail after a crash; truncated it"
            );
        }
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let writer = Writer {
            file: Arc::new(file),
            base,
            len: rec.valid_len,
            next: rec.next_offset,
            written: rec.next_offset,
            pending: Vec::new(),
            spare: Vec::new(),
        };
        let (high_water, _) = watch::channel(rec.next_offset);
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                dir,
                offsets_dir,
                config,
                writer: Mutex::new(writer),
                sync: tokio::sync::Mutex::new(Synced {
                    through: rec.next_offset,
                    last: None,
                }),
                high_water,
                syncs: Default::default(),
            }),
        })
    }

    /// Offset of the next record to be appended.
    pub fn end_offset(&self) -> u64 {
        *self.inner.high_water.borrow()
    }

    /// How many syncs publishes have started (with `fsync`; each covers every record written
    /// before it).
    pub fn syncs(&self) -> u64 {
        self.inner.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of the log's segments on disk.
    pub fn disk_bytes(&self) -> u64 {
        let dir = &self.inner.dir;
        segment::list_segments(dir)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|b| std::fs::metadata(segment::segment_path(dir, b)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// A subscriber for `group`, positioned at the group's committed offset.
    pub fn subscribe(&self, group: &str) -> Result<EmbeddedSubscriber, BusError> {
        // A group that never committed starts at the oldest event the log still holds, as
        // Kafka's `auto.offset.reset=earliest` does: segments every other group had consumed
        // may be gone (a store rebuilt from the log after its offsets were wiped, say). A group
        // that did commit resumes exactly there, and a commit below the log's start is an error
        // when read, never silently skipped.
        let committed = match offsets::load(&self.inner.offsets_dir, group)? {
            Some(next) => next,
            None => {
                let start = segment::list_segments(&self.inner.dir)
                    .map_err(io_err(&self.inner.dir))?
                    .first()
                    .copied()
                    .unwrap_or(0);
                if start > 0 {
                    tracing::warn!(
                        group,
                        start,
                        "new consumer group: events before offset {start} were already deleted; starting there"
                    );
                }
                start
            }
        };
        Ok(EmbeddedSubscriber {
            log: self.clone(),
            group: group.to_string(),
            committed,
            position: committed,
            reader: None,
            changes: vec![AssignmentChange::Assigned(vec![(0, committed)])],
        })
    }

    /// Encodes `records` after those already pending and returns the offset after the last of
    /// them (written to a segment by the next group commit, or at once by `write_pending`).
    fn encode(&self, records: &[Record]) -> u64 {
        let mut w = self.writer();
        let mut next = w.next;
        for r in records {
            segment::encode(&mut w.pending, next, &r.key, &r.payload);
            next += 1;
        }
        w.next = next;
        next
    }

    /// Without `fsync`: writes what is pending to the active segment (rolling it over first if
    /// full); the records are readable at once.
    fn write_pending(&self) -> Result<(), BusError> {
        let mut w = self.writer();
        if w.len >= self.inner.config.segment_bytes {
            self.roll(&mut w)?;
        }
        let path = segment::segment_path(&self.inner.dir, w.base);
        (&*w.file).write_all(&w.pending).map_err(io_err(&path))?;
        w.len += w.pending.len() as u64;
        w.pending.clear();
        w.written = w.next;
        self.inner.high_water.send_replace(w.next);
        Ok(())
    }

    /// With `fsync`, one group commit: rolls the active segment over if it is full, writes every
    /// pending record to it in one call and makes them durable. Returns the offset they reach.
    /// Publishes keep encoding meanwhile: the writer's lock is held only to take the pending
    /// records (and to roll a segment over).
    fn commit_blocking(&self) -> Result<u64, BusError> {
        let (file, bytes, through, path) = {
            let mut w = self.writer();
            if w.len >= self.inner.config.segment_bytes {
                self.roll(&mut w)?;
            }
            let spare = std::mem::take(&mut w.spare);
            let bytes = std::mem::replace(&mut w.pending, spare);
            w.len += bytes.len() as u64;
            w.written = w.next;
            let path = segment::segment_path(&self.inner.dir, w.base);
            (Arc::clone(&w.file), bytes, w.next, path)
        };
        (&*file).write_all(&bytes).map_err(io_err(&path))?;
        file.sync_data().map_err(io_err(&path))?;
        let mut w = self.writer();
        if w.spare.capacity() < bytes.capacity() {
            w.spare = bytes;
            w.spare.clear();
        }
        Ok(through)
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.inner.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once every record below `end` is durable and visible: joins the group commit in
    /// flight or starts the next one (at most one per `sync_interval_ms`).
    async fn sync_through(&self, end: u64) -> Result<(), BusError> {
        let inner = &self.inner;
        let mut synced = inner.sync.lock().await;
        if synced.through >= end {
            return Ok(()); // a sync that started after our write covered it
        }
        if let Some(last) = synced.last {
            let interval = Duration::from_millis(inner.config.sync_interval_ms);
            tokio::time::sleep_until(last + interval).await;
        }
        // Every record encoded so far, ours included: earlier segments were synced when they
        // rolled over, so writing and syncing the active one makes all below `through` durable.
        synced.last = Some(tokio::time::Instant::now());
        inner
            .syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.clone();
        let through = tokio::task::spawn_blocking(move || log.commit_blocking())
            .await
            .map_err(|_| BusError::Closed)??;
        synced.through = through;
        inner.high_water.send_replace(through);
        Ok(())
    }

    fn roll(&self, w: &mut Writer) -> Result<(), BusError> {
        let old = segment::segment_path(&self.inner.dir, w.base);
        w.file.sync_all().map_err(io_err(&old))?;
        // Records still pending (encoded during a group commit) go to the new segment.
        let path = segment::segment_path(&self.inner.dir, w.written);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let file = Arc::new(file);
        File::open(&self.inner.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.inner.dir))?;
        *w = Writer {
            file,
            base: w.written,
            len: 0,
            next: w.next,
            written: w.written,
            pending: std::mem::take(&mut w.pending),
            spare: std::mem::take(&mut w.spare),
        };
        self.delete_consumed_segments();
        Ok(())
    }

    /// Deletes segments below the lowest offset every known group has committed.
    fn delete_consumed_segments(&self) {
        let Ok(min) = offsets::min_committed(&self.inner.offsets_dir) else {
            return;
        };
        let Some(min) = min else { return };
        let Ok(bases) = segment::list_segments(&self.inner.dir) else {
            return;
        };
        // Segment i is wholly consumed when the next segment starts at or below `min`.
        for pair in bases.windows(2) {
            if pair[1] <= min {
                let path = segment::segment_path(&self.inner.dir, pair[0]);
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(segment = %path.display(), error = %e, "could not delete consumed segment");
                }
            }
        }
    }
}

#[async_trait]
impl Publisher for EmbeddedLog {
    async fn publish(&self, records: Vec<Record>) -> Result<(), BusError> {
        if records.is_empty() {
            return Ok(());
        }
        // Encoding is a copy into memory: done here, no thread hand-off. With `fsync` the next
        // group commit writes and syncs it; without, it is written at once.
        let end = self.encode(&records);
        if self.inner.config.fsync {
            self.sync_through(end).await
        } else {
            let log = self.clone();
            tokio::task::spawn_blocking(move || log.write_pending())
                .await
                .map_err(|_| BusError::Closed)?
        }
    }
}

/// Reads the embedded log for one consumer group.
pub struct EmbeddedSubscriber {
    log: EmbeddedLog,
    group: String,
    committed: u64,
    position: u64,
    reader: Option<SegmentReader>,
    /// The one assignment (partition 0), reported once.
    changes: Vec<AssignmentChange>,
}

impl EmbeddedSubscriber {
    fn read_blocking(&mut self, max: usize, high_water: u64) -> Result<Vec<Message>, BusError> {
        let dir = self.log.inner.dir.clone();
        let mut out = Vec::new();
        let mut fresh = false;
        while out.len() < max && self.position < high_water {
            if self.reader.is_none() {
                let bases = segment::list_segments(&dir).map_err(io_err(&dir))?;
                let base = bases
                    .iter()
                    .rev()
                    .find(|b| **b <= self.position)
                    .copied()
                    .ok_or_else(|| {
                        BusError::Config(format!(
                            "offset {} of group `{}` is no longer in the log",
                            self.position, self.group
                        ))
                    })?;
                let reader =
                    SegmentReader::open_at(&dir, base, self.position).map_err(io_err(&dir))?;
                self.reader = Some(reader);
                fresh = true;
            }
            let reader = self.reader.as_mut().expect("opened above");
            match reader.next_frame().map_err(io_err(&dir))? {
                Some(f) if f.offset == self.position => {
                    out.push(Message {
                        partition: 0,
                        offset: f.offset,
                        key: Bytes::from(f.key),
                        payload: Bytes::from(f.payload),
                    });
                    self.position += 1;
                    fresh = false;
                }
                // A segment just opened at our position has nothing: below the high-water mark
                // that means the log is damaged, not that data is still coming.
                _ if fresh => {
                    return Err(BusError::Config(format!(
                        "bus log has no record at offset {} below its end {high_water}",
                        self.position
                    )));
                }
                // End of this segment: the next one starts at our position.
                _ => self.reader = None,
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Subscriber for EmbeddedSubscriber {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Message>, BusError> {
        let mut hw_rx = self.log.inner.high_water.subscribe();
        let position = self.position;
        let _ = tokio::time::timeout(wait, hw_rx.wait_for(|hw| *hw > position)).await;
        let high_water = *hw_rx.borrow();
        if high_water <= self.position {
            return Ok(Vec::new());
        }
        // Reads are short, sequential and usually served from the page cache.
        self.read_blocking(max, high_water)
    }

    async fn commit(&mut self, checkpoint: &Checkpoint) -> Result<(), BusError> {
        let Some(next) = checkpoint.0.get(&0).copied() else {
            return Ok(());
        };
        if next <= self.committed {
            return Ok(());
        }
        let dir = self.log.inner.offsets_dir.clone();
        let group = self.group.clone();
        tokio::task::spawn_blocking(move || offsets::store(&dir, &group, next))
            .await
            .map_err(|_| BusError::Closed)??;
        self.committed = next;
        Ok(())
    }

    fn committed(&self) -> Checkpoint {
        Checkpoint([(0, self.committed)].into())
    }

    fn take_changes(&mut self) -> Vec<AssignmentChange> {
        std::mem::take(&mut self.changes)
    }

    async fn seek(&mut self, partition: u32, offset: u64) -> Result<(), BusError> {
        if partition == 0 {
            self.position = offset;
            self.reader = None;
        }
        Ok(())
    }

    async fn end_offsets(&mut self) -> Result<(Checkpoint, u32), BusError> {
        let end = *self.log.inner.high_water.borrow();
        Ok((Checkpoint([(0, end)].into()), 1))
    }
}

#[async_trait]
impl Bus for EmbeddedLog {
    fn publisher(&self) -> Result<Arc<dyn Publisher>, BusError> {
        Ok(Arc::new(self.clone()))
    }

    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscriber>, BusError> {
        Ok(Box::new(EmbeddedLog::subscribe(self, group)?))
    }

    async fn ready(&self) -> bool {
        self.inner.dir.is_dir()
    }
}

#[cfg(test)]
mod tests;
