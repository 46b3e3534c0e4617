//! The embedded bus: a durable append-only log on local disk for the one-process deployment.
//!
//! One partition (0). Appends are serialized by a mutex and written at once; a `publish` returns
//! once its records are durable. Syncs are group commits: at most one `fdatasync` runs at a time,
//! at most one starts per `sync_interval_ms`, and each covers every record written before it
//! began, so publishes that arrive meanwhile share it (the gateway's batching task also publishes
//! many events per call). A record becomes visible to subscribers only after it is durable.
//!
//! Why an interval: `tollgate up` under load synced after every publish, about 470 times a second
//! at 40,000 requests/s, and the writes and syncs were the largest cost outside the gateway's own
//! threads (about 6 % of the process's CPU, BENCHMARKS.md). A record waits at most one interval
//! longer to become visible; nothing acknowledged is less durable.
//!
//! Why 50 ms by default: every sync makes new records visible, and the collector wakes, reads
//! and decodes them: the pipeline behind the gateway ran 100 times a second at 10 ms, on the
//! cores serving requests. At 50 ms, `tollgate up` served 0.76–0.87 of nginx's requests per
//! second, against 0.70–0.81 at 10 ms, in the same three rounds (BENCHMARKS.md, "Publishes that
//! overlap"). What it costs: an event reaches the store's queries up to 40 ms later, and a
//! machine that loses power loses up to 50 ms more of events. A process that crashes loses
//! nothing more: each publish is written (to the page cache) as it comes, before its sync.
//! Publishes overlap (`tollgate_gateway::events::channel`), so the interval does not bound how
//! many events a second the log takes. Shorter intervals (smaller bursts of writes and ingest
//! after each sync) did not move `tollgate up`'s p99 at half its maximum rate: 10 and 20 ms
//! were within noise of 50 in eighteen paired rounds (BENCHMARKS.md, forty-third round), so a
//! deployment that wants events visible sooner can set 10 without a tail cost measured so far.
//! Not syncing at all (`fsync: false`) did not measurably move it either (eight paired rounds,
//! forty-fourth round); the log and the store on tmpfs lowered it by about 0.13 ms.
//!
//! Tried and not kept: writing the records of a group commit in one `write` just before its
//! sync. It saved about 1.5 % of the process's samples under load, but records waited in memory
//! until then, so a process crash lost up to one more interval of events.
//!
//! ## Failed writes and syncs
//!
//! A publish that fails is sent again (the gateway's publisher retries, then spools), so a
//! failed publish must leave none of its records in the log: each would be counted twice.
//! - A write that fails (a full disk) may have put part of its batch in the file. The active
//!   segment is truncated back to where the write started before anything else is written;
//!   the next write truncates first if that failed too.
//! - A sync that fails leaves unknown what reached the disk, and the records written since the
//!   last successful sync (this publish's and those of publishes waiting for the next sync)
//!   would otherwise become visible with the next sync that succeeds. So the active segment is
//!   truncated back to the last durable record (the last successful sync's end, or the start of
//!   a segment rolled over since: a roll syncs the segment it closes), and every publish whose
//!   records were cut fails. The writes before the cut form a generation; a publish of an
//!   ended generation learns from where records were discarded (`Synced::discarded_from`).
//! - Subscribers read ahead (a 256 KiB buffer) past the durable end; after a truncation they
//!   drop that buffer and read again from the file.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
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
    len: u64,
    next: u64,
    buf: Vec<u8>,
    /// The file may hold bytes past `len` that a failed write or sync left and a truncation
    /// could not remove yet: the next write truncates first (see "Failed writes and syncs").
    torn: bool,
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
    /// Records discarded after a failed sync so far (each one ends a generation of writes);
    /// changed under the writer's lock.
    rollbacks: AtomicU64,
    /// Truncations of the active segment so far (after failed syncs or failed writes):
    /// subscribers drop what they read ahead when it changes.
    rewinds: AtomicU64,
    #[cfg(test)]
    faults: tests::Faults,
}

/// What the syncs have made durable so far.
struct Synced {
    /// Every record below this offset is durable.
    through: u64,
    /// Where `through` lies: the segment and its length in bytes then.
    base: u64,
    len: u64,
    /// When the last sync started.
    last: Option<tokio::time::Instant>,
    /// Per rollback, in order: the offset from which it discarded records. Writes of
    /// generation `g` (made before rollback `g`) are durable up to `discarded_from[g]` and
    /// lost from there.
    discarded_from: Vec<u64>,
}

/// Where a write ended, and the generation it belongs to (rollbacks so far when it was made).
#[derive(Debug, Clone, Copy)]
struct Written {
    end: u64,
    generation: u64,
}

/// Cuts the active segment back to `w.len` if it may hold more (`w.torn`), and tells
/// subscribers to drop what they read ahead. On failure `w.torn` stays set and the next write
/// tries again before writing.
fn truncate(w: &mut Writer, rewinds: &AtomicU64) -> std::io::Result<()> {
    if !w.torn {
        return Ok(());
    }
    w.file.set_len(w.len)?;
    w.torn = false;
    rewinds.fetch_add(1, Ordering::Relaxed);
    Ok(())
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
            buf: Vec::new(),
            torn: false,
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
                    base,
                    len: rec.valid_len,
                    last: None,
                    discarded_from: Vec::new(),
                }),
                high_water,
                syncs: Default::default(),
                rollbacks: Default::default(),
                rewinds: Default::default(),
                #[cfg(test)]
                faults: Default::default(),
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
        self.inner.syncs.load(Ordering::Relaxed)
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
            rewinds: self.inner.rewinds.load(Ordering::Relaxed),
            changes: vec![AssignmentChange::Assigned(vec![(0, committed)])],
        })
    }

    /// Writes `records` (not yet durable unless `fsync` is off) and returns the offset after
    /// the last of them, with the generation of the write (see "Failed writes and syncs").
    fn write_blocking(&self, records: &[Record]) -> Result<Written, BusError> {
        let inner = &self.inner;
        let mut w = self.writer();
        // What a failed write or sync left behind goes first (nothing when the file is whole).
        truncate(&mut w, &inner.rewinds)
            .map_err(io_err(&segment::segment_path(&inner.dir, w.base)))?;
        if w.len >= inner.config.segment_bytes {
            self.roll(&mut w)?;
        }
        let mut buf = std::mem::take(&mut w.buf);
        buf.clear();
        let mut next = w.next;
        for r in records {
            segment::encode(&mut buf, next, &r.key, &r.payload);
            next += 1;
        }
        let path = segment::segment_path(&inner.dir, w.base);
        let written = self.write_all(&w.file, &buf);
        w.buf = buf;
        if let Err(e) = written {
            // Part of the batch may be in the file: take it out, so that the next write
            // starts where this one did and nothing reads or recovers a half-written batch.
            w.torn = true;
            let _ = truncate(&mut w, &inner.rewinds);
            return Err(io_err(&path)(e));
        }
        w.len += w.buf.len() as u64;
        w.next = next;
        if !inner.config.fsync {
            inner.high_water.send_replace(next);
        }
        Ok(Written {
            end: next,
            generation: inner.rollbacks.load(Ordering::Relaxed),
        })
    }

    /// `buf` to the end of `file` (tests can make it fail half-way).
    fn write_all(&self, file: &File, buf: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if self.inner.faults.fail_write.swap(false, Ordering::Relaxed) {
            (&*file).write_all(&buf[..buf.len() / 2])?;
            return Err(std::io::Error::other("injected write failure"));
        }
        (&*file).write_all(buf)
    }

    /// Syncs the active segment's data (tests can make it fail).
    fn sync_data(&self, file: &File) -> std::io::Result<()> {
        #[cfg(test)]
        if self.inner.faults.fail_sync.swap(false, Ordering::Relaxed) {
            return Err(std::io::Error::other("injected sync failure"));
        }
        file.sync_data()
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.inner.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once every record below `written.end` is durable and visible: joins the sync in
    /// flight or starts the next one (at most one per `sync_interval_ms`). Fails if the sync
    /// fails, or if a failed sync discarded these records meanwhile: then none of them is
    /// visible, ever, and the caller publishes them again.
    async fn sync_through(&self, written: Written) -> Result<(), BusError> {
        let inner = &self.inner;
        let mut synced = inner.sync.lock().await;
        if let Some(from) = synced.discarded_from.get(written.generation as usize) {
            return if written.end <= *from {
                Ok(()) // made durable before the sync that failed
            } else {
                Err(BusError::Io {
                    path: inner.dir.display().to_string(),
                    source: std::io::Error::other(
                        "a sync of the log failed and these records were taken out of it; publish them again",
                    ),
                })
            };
        }
        if synced.through >= written.end {
            return Ok(()); // a sync that started after our write covered it
        }
        if let Some(last) = synced.last {
            let interval = Duration::from_millis(inner.config.sync_interval_ms);
            tokio::time::sleep_until(last + interval).await;
        }
        // Everything written so far: records of segments rolled over since were synced by the
        // roll, so syncing the active segment makes every record below `through` durable.
        let (file, through, base, len, path) = {
            let w = self.writer();
            let path = segment::segment_path(&inner.dir, w.base);
            (Arc::clone(&w.file), w.next, w.base, w.len, path)
        };
        synced.last = Some(tokio::time::Instant::now());
        inner.syncs.fetch_add(1, Ordering::Relaxed);
        let log = self.clone();
        let result = tokio::task::spawn_blocking(move || log.sync_data(&file))
            .await
            .map_err(|_| BusError::Closed)?;
        if let Err(e) = result {
            self.roll_back(&mut synced);
            return Err(io_err(&path)(e));
        }
        (synced.through, synced.base, synced.len) = (through, base, len);
        inner.high_water.send_replace(through);
        Ok(())
    }

    /// After a failed sync: takes every record not known to be durable out of the active
    /// segment, so that none of them becomes visible through a later sync while its publish
    /// failed (the publisher sends it again: it would be counted twice). Durable are the
    /// records of the last successful sync and those of segments rolled over since (a roll
    /// syncs the segment it closes). Ends the writes' generation: publishes of it that wait
    /// for a sync learn what was discarded (`sync_through`).
    fn roll_back(&self, synced: &mut Synced) {
        let mut w = self.writer();
        let (through, len) = if w.base == synced.base {
            (synced.through, synced.len)
        } else {
            (w.base, 0)
        };
        tracing::error!(
            dir = %self.inner.dir.display(),
            discarded = w.next - through,
            "a sync of the bus log failed; records not yet durable were taken out and their publishes fail (they are sent again)"
        );
        (w.next, w.len, w.torn) = (through, len, true);
        let _ = truncate(&mut w, &self.inner.rewinds);
        synced.discarded_from.push(through);
        self.inner.rollbacks.fetch_add(1, Ordering::Relaxed);
        (synced.through, synced.base, synced.len) = (through, w.base, len);
        self.inner.high_water.send_replace(through);
    }

    fn roll(&self, w: &mut Writer) -> Result<(), BusError> {
        let old = segment::segment_path(&self.inner.dir, w.base);
        w.file.sync_all().map_err(io_err(&old))?;
        let path = segment::segment_path(&self.inner.dir, w.next);
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
            base: w.next,
            len: 0,
            next: w.next,
            buf: std::mem::take(&mut w.buf),
            torn: false,
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
        let log = self.clone();
        let written = tokio::task::spawn_blocking(move || log.write_blocking(&records))
            .await
            .map_err(|_| BusError::Closed)??;
        if self.inner.config.fsync {
            self.sync_through(written).await?;
        }
        Ok(())
    }
}

/// Reads the embedded log for one consumer group.
pub struct EmbeddedSubscriber {
    log: EmbeddedLog,
    group: String,
    committed: u64,
    position: u64,
    reader: Option<SegmentReader>,
    /// The log's truncations when `reader` was last checked: after one, what the reader read
    /// ahead past the durable end may be gone or rewritten.
    rewinds: u64,
    /// The one assignment (partition 0), reported once.
    changes: Vec<AssignmentChange>,
}

impl EmbeddedSubscriber {
    fn read_blocking(&mut self, max: usize, high_water: u64) -> Result<Vec<Message>, BusError> {
        let dir = self.log.inner.dir.clone();
        let rewinds = self.log.inner.rewinds.load(Ordering::Relaxed);
        if rewinds != self.rewinds {
            // Records below `high_water` are never truncated; bytes the buffer holds past it
            // may have been. Read again from the file.
            self.reader = None;
            self.rewinds = rewinds;
        }
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
                        key: f.key,
                        payload: f.payload,
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
