//! Billable requests per consumer over a window, read straight from the store's Parquet files
//! and in-memory batches: the count the quota state is made of, asked every second while
//! events arrive.
//!
//! The window is cut as `usage` cuts it (`query::plan`: the coarsest complete usage rollup for
//! aligned spans, with the in-memory events beside it, raw events at ragged edges), and the
//! answer is the same as `usage` grouped by consumer (a test compares them). It is read without
//! a DataFusion session: planning a query every second kept the whole query engine's code and
//! its session's allocations in the RSS of a `tollgate up` that no one asked an analytics
//! question (BENCHMARKS.md, "Many consumers"). Each source needs three columns, summed into
//! one map keyed by consumer.
//!
//! The window is read once; then appends keep its counts ([`Running`]), so each later call
//! costs what arrived since the one before, whatever the window holds.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::ParquetStore;
use super::manifest::{FileEntry, FileKind};
use super::query::{Source, plan};
use crate::StoreError;
use crate::cpu::{self, STEP_ROWS};

/// The usage rollups a tally may read, coarse to fine.
const USAGE: [FileKind; 3] = [FileKind::Usage1d, FileKind::Usage1h, FileKind::Usage1m];

/// Counts per consumer, as a tally answers them.
pub type Counts = HashMap<String, u64>;

/// The tally of one window kept up to date by appends, so that a refresh costs what arrived
/// since the last one instead of reading the window's files again: with 100,000 consumers a
/// month of `usage_1d` rows is millions of rows, and the quota state asks every second while
/// events arrive.
///
/// Exactness: the window's files and in-memory batches are read from a snapshot taken under
/// the same locks that start `delta`, so every event is counted either by the snapshot or by
/// the appends after it, never by both. Flushes and compactions move events between memory
/// and files without changing any count. A reset (unflushed events dropped, to be appended
/// again) ends the running tally, and the next call reads the window anew.
#[derive(Debug)]
pub(super) struct Running {
    window: (i64, i64),
    /// Which read of the window this is: a read installs its counts only if no other read
    /// started after it.
    generation: u64,
    /// The window's counts as of the snapshot plus what was folded in since; `None` while the
    /// snapshot is being read.
    base: Option<Arc<Counts>>,
    /// Billable requests appended since `base` last took them in.
    delta: Counts,
}

impl ParquetStore {
    /// Billable requests per consumer (anonymous requests left out) in `[from_us, to_us)`:
    /// the running tally of that window (see [`Running`]), read from the store the first time
    /// and after a reset or another window.
    pub(super) async fn tally_billable(
        &self,
        from_us: i64,
        to_us: i64,
    ) -> Result<Arc<Counts>, StoreError> {
        let window = (from_us, to_us);
        let (generation, files, mem, complete) = {
            let mut running = self.running();
            if let Some(r) = running.as_mut().filter(|r| r.window == window)
                && let Some(base) = r.base.as_mut()
            {
                if !r.delta.is_empty() {
                    add_all(Arc::make_mut(base), r.delta.drain());
                }
                return Ok(base.clone());
            }
            let generation = running.as_ref().map_or(0, |r| r.generation + 1);
            let state = self.read_state();
            let files: Vec<FileEntry> = state
                .manifest
                .files
                .iter()
                .filter(|f| f.kind == FileKind::Events || USAGE.contains(&f.kind))
                .filter(|f| f.max_ts_us >= from_us && f.min_ts_us < to_us)
                .cloned()
                .collect();
            let mem: Vec<RecordBatch> = state.mem.iter().map(|(b, _)| b.clone()).collect();
            *running = Some(Running {
                window,
                generation,
                base: None,
                delta: Counts::new(),
            });
            (generation, files, mem, state.manifest.complete_rollups())
        };
        let dir = self.inner.dir.clone();
        let mut counts = tokio::task::spawn_blocking(move || {
            let mut tally = Tally::new();
            for (source, from, to) in plan(from_us, to_us, None, &USAGE, &complete) {
                let kind = match source {
                    Source::Rollup(kind) => kind,
                    Source::Raw | Source::Memory => FileKind::Events,
                };
                if source != Source::Memory {
                    let overlapping = files
                        .iter()
                        .filter(|f| f.kind == kind && f.max_ts_us >= from && f.min_ts_us < to);
                    for f in overlapping {
                        tally.file(&dir, f, (from, to))?;
                    }
                }
                if matches!(source, Source::Raw | Source::Memory) {
                    for b in &mem {
                        tally.batch(FileKind::Events, b, (from, to))?;
                    }
                }
            }
            Ok::<_, StoreError>(tally.counts)
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("tally task failed: {e}")))??;
        let mut running = self.running();
        match running.as_mut() {
            Some(r) if r.generation == generation && r.base.is_none() => {
                add_all(&mut counts, r.delta.drain());
                let counts = Arc::new(counts);
                r.base = Some(counts.clone());
                Ok(counts)
            }
            // A reset or a later read came in between: this answer is as of the snapshot, and
            // the next call reads the window again.
            _ => Ok(Arc::new(counts)),
        }
    }
}

/// The billable requests per consumer of `events` (the events schema) in `window`: an
/// append's share of the running tally.
pub(super) fn batch_counts(events: &RecordBatch, window: (i64, i64)) -> Result<Counts, StoreError> {
    let mut tally = Tally::new();
    tally.batch(FileKind::Events, events, window)?;
    Ok(tally.counts)
}

/// Adds `from`'s counts to `into`'s.
fn add_all(into: &mut Counts, from: impl IntoIterator<Item = (String, u64)>) {
    for (consumer, n) in from {
        *into.entry(consumer).or_default() += n;
    }
}

impl Running {
    /// The window `[from, to)` this tally counts.
    pub(super) fn window(&self) -> (i64, i64) {
        self.window
    }

    /// Takes in an appended batch, `counted` being its counts for the window they were taken
    /// for: counted again (under the caller's lock) if that is no longer this tally's window.
    pub(super) fn add(
        &mut self,
        rows: &RecordBatch,
        counted: Option<((i64, i64), Counts)>,
    ) -> Result<(), StoreError> {
        let counts = match counted {
            Some((window, counts)) if window == self.window => counts,
            _ => batch_counts(rows, self.window)?,
        };
        add_all(&mut self.delta, counts);
        Ok(())
    }
}

/// The columns a tally reads from a source of `kind`: its time, the consumer and the billable
/// count (a flag per event, a sum per rollup row).
fn columns(kind: FileKind) -> [&'static str; 3] {
    match kind.period() {
        Some((time, _)) => [time, "consumer", "billable_requests"],
        None => ["ts", "consumer", "billable"],
    }
}

struct Tally {
    counts: Counts,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            counts: Counts::new(),
        }
    }

    /// Adds the rows of file `f` (in the store at `dir`) whose time is in `window`, reading
    /// only the columns summed.
    fn file(&mut self, dir: &Path, f: &FileEntry, window: (i64, i64)) -> Result<(), StoreError> {
        let path = dir.join(&f.path);
        for b in read_columns(&path, &columns(f.kind))? {
            self.batch(f.kind, &b?, window)?;
        }
        Ok(())
    }

    /// Adds the rows of `b` (a batch of `kind`, whole or projected) whose time is in `window`.
    fn batch(
        &mut self,
        kind: FileKind,
        b: &RecordBatch,
        (from, to): (i64, i64),
    ) -> Result<(), StoreError> {
        let [time, consumer, billable] = columns(kind).map(|name| {
            b.column_by_name(name)
                .ok_or_else(|| StoreError::Corrupt(format!("{kind:?} batch has no {name}")))
        });
        let (time, consumer, billable) = (time?, consumer?, billable?);
        let corrupt = |name: &str| StoreError::Corrupt(format!("{kind:?}: bad column {name}"));
        let consumer = consumer
            .as_string_opt::<i32>()
            .ok_or_else(|| corrupt("consumer"))?;
        let time: &[i64] = match kind {
            FileKind::Events => time
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(|| corrupt("ts"))?
                .values(),
            _ => time
                .as_primitive_opt::<Int64Type>()
                .ok_or_else(|| corrupt("period"))?
                .values(),
        };
        let flags = billable.as_boolean_opt();
        let sums = billable.as_primitive_opt::<Int64Type>();
        if flags.is_none() && sums.is_none() {
            return Err(corrupt("billable"));
        }
        let count = |i: usize| match (flags, sums) {
            (Some(flags), _) => u64::from(flags.value(i)),
            (_, Some(sums)) => sums.value(i).max(0) as u64,
            _ => 0,
        };
        for (i, t) in time.iter().enumerate() {
            cpu::tick_at(i);
            if !(from..to).contains(t) || consumer.is_null(i) || billable.is_null(i) {
                continue;
            }
            let n = count(i);
            match self.counts.get_mut(consumer.value(i)) {
                Some(total) => *total += n,
                None => {
                    self.counts.insert(consumer.value(i).to_owned(), n);
                }
            }
        }
        Ok(())
    }
}

/// The batches of the Parquet file at `path`, with only the named top-level columns.
fn read_columns(
    path: &Path,
    names: &[&str],
) -> Result<impl Iterator<Item = Result<RecordBatch, StoreError>>, StoreError> {
    let file = std::fs::File::open(path).map_err(StoreError::io(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?.with_batch_size(STEP_ROWS);
    let schema = builder.schema().clone();
    let roots = names
        .iter()
        .map(|n| {
            schema
                .index_of(n)
                .map_err(|_| StoreError::Corrupt(format!("{} has no column {n}", path.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder.with_projection(mask).build()?;
    Ok(reader.map(|b| b.map_err(|e| StoreError::Corrupt(e.to_string()))))
}
