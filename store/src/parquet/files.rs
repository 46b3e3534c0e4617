//! Writing and reading the Parquet files of the store: one file per UTC day per flush, merged by
//! compaction.

use std::collections::BTreeMap;
use std::path::Path;

use datafusion::arrow::array::{BooleanArray, RecordBatch, TimestampMicrosecondArray};
use datafusion::arrow::compute::filter_record_batch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::arrow_writer::{ArrowColumnWriter, ArrowRowGroupWriterFactory, compute_leaves};
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::ColumnPath;

use super::manifest::{FileEntry, FileKind, sync_dir};
use crate::StoreError;
use crate::cpu::{self, STEP_ROWS};

pub use crate::time::DAY_US;

fn ts_column(batch: &RecordBatch) -> Result<&TimestampMicrosecondArray, StoreError> {
    batch
        .column_by_name("ts")
        .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
        .ok_or_else(|| StoreError::Corrupt("batch has no microsecond `ts` column".into()))
}

/// Splits rows by UTC day of `ts`.
pub fn split_by_day(batch: &RecordBatch) -> Result<BTreeMap<i64, RecordBatch>, StoreError> {
    let ts = ts_column(batch)?;
    let days: Vec<i64> = ts.values().iter().map(|t| t.div_euclid(DAY_US)).collect();
    let mut distinct = days.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() == 1 {
        return Ok([(distinct[0], batch.clone())].into());
    }
    distinct
        .into_iter()
        .map(|d| {
            let mask: BooleanArray = days.iter().map(|x| Some(*x == d)).collect();
            Ok((d, filter_record_batch(batch, &mask).map_err(arrow_err)?))
        })
        .collect()
}

fn arrow_err(e: datafusion::arrow::error::ArrowError) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// Where a new file of `kind` for `day` goes, relative to the store directory.
fn new_path(kind: FileKind, day: i64) -> String {
    format!(
        "day={}/{}-{}.parquet",
        crate::day_string(day),
        kind.prefix(),
        uuid::Uuid::now_v7()
    )
}

/// Columns whose values are (nearly) unique per row: written without a dictionary. A name
/// that a file's schema does not have (rollups) is ignored.
const UNIQUE_COLUMNS: &[&str] = &["id", "trace_id"];

/// Integer columns of the events whose values are (nearly) unique per row and close to their
/// neighbours': written without a dictionary, as deltas (`DELTA_BINARY_PACKED`, which every
/// Parquet reader of the last years reads, DuckDB included). With a dictionary the writer
/// hashed every timestamp and latency into it (each distinct, so the dictionary grew to its
/// page limit before the writer gave up on it), the largest part of a flush's time. See
/// `store/examples/flush_encoding.rs` and BENCHMARKS.md.
const DELTA_COLUMNS: &[&str] = &["ts", "latency_us", "upstream_latency_us"];

/// Text columns no query filters on (queries filter on `ts`, `route` and `consumer`): written
/// without statistics. Their minimum and maximum, per page and per row group, prune nothing
/// (an id's or a path's range covers every value a filter could ask for), and computing them
/// (comparing every string, building the page index) was a sixth of the Parquet encoding's
/// time (`store/examples/flush_encoding.rs`: 0.34 against 0.28 µs per event).
const UNFILTERED_TEXT_COLUMNS: &[&str] = &[
    "id", "trace_id", "path", "gateway", "method", "plan", "outcome",
];

/// Columns of random identifiers (W3C trace ids: 128 random bits as hex), written without
/// compression. Snappy finds next to nothing to take out of them (a tenth of the column) and
/// spent a quarter of the encoding's time trying: `store/examples/flush_encoding.rs`, 0.29
/// against 0.22 µs per event for 7 % larger files.
const RANDOM_COLUMNS: &[&str] = &["trace_id"];

/// The size at which a column's data page is cut: 64 KiB instead of the writer's 1 MiB.
///
/// A page is compressed in one call when it is cut, and with 1 MiB pages that call was the
/// longest stretch ingest ran without an offer of the core: Snappy over a full page of a
/// column without a dictionary took 1–3 ms, inside one column's write of a step (a profile of
/// ingest's runs longer than 1 ms under `tollgate up` at 19,500 requests/s; BENCHMARKS.md,
/// "Ingest's longest runs"). Snappy compresses in 64 KiB blocks anyway, so smaller pages
/// compress as well; each page costs a header of a few bytes and an entry in the page index.
pub(super) const DATA_PAGE_BYTES: usize = 64 * 1024;

/// A Parquet file being written: its path relative to the store, the file's writer, and the
/// column writers of the row group being filled.
///
/// Written column by column with the parquet crate's column writers rather than through
/// `ArrowWriter`, which encodes every column of a step in one call and, when a row group is
/// complete, closes all its columns and copies their pages into the file in one more. On a
/// thread that shares the cores with the gateway that last call was the longest run without an
/// offer of the core: 4–6 ms for a flush of 80,000 events
/// (`store/examples/flush_encoding.rs`), and ingest's threads ran for up to 3.7 ms in one go
/// in a flush's events file (BENCHMARKS.md, "Ingest's longest runs"). Here each column of a
/// step, and each column's close and copy, is a step of its own with a [`cpu::tick`] after
/// it. The file is the one `ArrowWriter` writes: same schema, properties and row groups.
struct NewFile {
    rel: String,
    path: std::path::PathBuf,
    file: SerializedFileWriter<std::fs::File>,
    columns: ArrowRowGroupWriterFactory,
    schema: datafusion::arrow::datatypes::SchemaRef,
    /// Rows per row group.
    row_group: usize,
    /// The row group being filled: its column writers and rows so far.
    group: Option<(Vec<ArrowColumnWriter>, usize)>,
    /// Row groups written so far.
    groups: usize,
}

impl NewFile {
    /// Creates a new file of `kind` for `day` (snappy, `row_group` rows per row group).
    fn create(
        dir: &Path,
        kind: FileKind,
        day: i64,
        schema: datafusion::arrow::datatypes::SchemaRef,
        row_group: usize,
    ) -> Result<NewFile, StoreError> {
        let (rel, path, file) = create_file(dir, kind, day)?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_data_page_size_limit(DATA_PAGE_BYTES);
        // Values unique per event gain nothing from a dictionary: the writer hashed and
        // compared every one into it (its interner was among the largest entries of the
        // flushes' profile under load), then fell back to plain pages once it filled.
        for unique in UNIQUE_COLUMNS.iter().chain(DELTA_COLUMNS) {
            props = props.set_column_dictionary_enabled(ColumnPath::from(*unique), false);
        }
        for random in RANDOM_COLUMNS {
            props =
                props.set_column_compression(ColumnPath::from(*random), Compression::UNCOMPRESSED);
        }
        for text in UNFILTERED_TEXT_COLUMNS {
            props = props
                .set_column_statistics_enabled(ColumnPath::from(*text), EnabledStatistics::None);
        }
        for delta in DELTA_COLUMNS {
            props =
                props.set_column_encoding(ColumnPath::from(*delta), Encoding::DELTA_BINARY_PACKED);
        }
        let props = props.build();
        // The writer converts the schema and puts the Arrow schema in the footer's metadata, as
        // for any file it writes; rows go through the column writers (see the type's docs).
        let (file, columns) =
            ArrowWriter::try_new(file, schema.clone(), Some(props))?.into_serialized_writer()?;
        Ok(NewFile {
            rel,
            path,
            file,
            columns,
            schema,
            row_group: row_group.max(1),
            group: None,
            groups: 0,
        })
    }

    /// Appends `batch` a few thousand rows and one column at a time, offering the core between
    /// steps (see the type's docs and [`crate::cpu`]).
    fn write(&mut self, batch: &RecordBatch) -> Result<(), StoreError> {
        if batch.num_columns() != self.schema.fields().len() {
            return Err(StoreError::Corrupt(format!(
                "a batch of {} columns for a file of {}",
                batch.num_columns(),
                self.schema.fields().len()
            )));
        }
        let mut at = 0;
        while at < batch.num_rows() {
            let (writers, rows) = match &mut self.group {
                Some(group) => group,
                empty => empty.insert((self.columns.create_column_writers(self.groups)?, 0)),
            };
            let len = STEP_ROWS
                .min(self.row_group - *rows)
                .min(batch.num_rows() - at);
            let step = batch.slice(at, len);
            let mut writers = writers.iter_mut();
            for (field, column) in self.schema.fields().iter().zip(step.columns()) {
                for leaf in compute_leaves(field, column)? {
                    writers
                        .next()
                        .ok_or_else(|| StoreError::Corrupt("more leaves than columns".into()))?
                        .write(&leaf)?;
                }
                cpu::tick();
            }
            *rows += len;
            at += len;
            if *rows == self.row_group {
                self.close_group()?;
            }
        }
        Ok(())
    }

    /// Closes the row group being filled, if any, and copies it into the file, column by
    /// column.
    fn close_group(&mut self) -> Result<(), StoreError> {
        let Some((writers, _)) = self.group.take() else {
            return Ok(());
        };
        let mut group = self.file.next_row_group()?;
        for writer in writers {
            let chunk = writer.close()?;
            cpu::tick();
            chunk.append_to_row_group(&mut group)?;
            cpu::tick();
        }
        group.close()?;
        self.groups += 1;
        Ok(())
    }

    /// Closes and fsyncs the file and its folder; returns its relative path and size.
    fn finish(mut self) -> Result<(String, u64), StoreError> {
        self.close_group()?;
        let file = self.file.into_inner()?;
        let bytes = sync_file(&self.path, &file)?;
        Ok((self.rel, bytes))
    }
}

/// Creates a new file of `kind` for `day` under `dir`: its path relative to `dir`, its path and
/// the file.
fn create_file(
    dir: &Path,
    kind: FileKind,
    day: i64,
) -> Result<(String, std::path::PathBuf, std::fs::File), StoreError> {
    let rel = new_path(kind, day);
    let path = dir.join(&rel);
    let parent = path.parent().expect("has a parent");
    std::fs::create_dir_all(parent).map_err(StoreError::io(parent))?;
    let file = std::fs::File::create(&path).map_err(StoreError::io(&path))?;
    Ok((rel, path, file))
}

/// Fsyncs a written file and its folder; returns its size.
fn sync_file(path: &Path, file: &std::fs::File) -> Result<u64, StoreError> {
    file.sync_all().map_err(StoreError::io(path))?;
    sync_dir(path.parent().expect("has a parent"))?;
    Ok(file.metadata().map_err(StoreError::io(path))?.len())
}

/// Writes `batch` (events, all of one day) as a new Parquet file under `dir`, fsynced: the
/// tests' shorthand for [`write_events`] of one batch.
#[cfg(test)]
pub fn write_file(dir: &Path, day: i64, batch: &RecordBatch) -> Result<FileEntry, StoreError> {
    write_events(dir, day, std::slice::from_ref(batch))
}

/// Writes the events of `batches` (of one `day`, the events schema) as one new file, batch
/// after batch: a flush writes what it holds in memory without first copying it into one
/// batch.
pub fn write_events(
    dir: &Path,
    day: i64,
    batches: &[RecordBatch],
) -> Result<FileEntry, StoreError> {
    let (mut min, mut max) = (i64::MAX, i64::MIN);
    for batch in batches {
        for t in ts_column(batch)?.values().iter() {
            min = min.min(*t);
            max = max.max(*t);
        }
    }
    if min > max {
        (min, max) = (day * DAY_US, day * DAY_US);
    }
    let schema = batches
        .first()
        .map_or_else(tollgate_schemas::arrow::schema, |b| b.schema());
    let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
    let mut out = NewFile::create(dir, FileKind::Events, day, schema, flush_row_group(rows))?;
    for batch in batches {
        out.write(batch)?;
    }
    let (rel, bytes) = out.finish()?;
    Ok(FileEntry {
        path: rel,
        kind: FileKind::Events,
        day,
        rows,
        bytes,
        min_ts_us: min,
        max_ts_us: max,
    })
}

/// Writes `batch` as a new file of `kind` for `day`, whose rows lie in `[min_ts, max_ts]`.
pub fn write_kind(
    dir: &Path,
    kind: FileKind,
    day: i64,
    batch: &RecordBatch,
    min_ts_us: i64,
    max_ts_us: i64,
) -> Result<FileEntry, StoreError> {
    let mut out = NewFile::create(dir, kind, day, batch.schema(), 1 << 20)?;
    out.write(batch)?;
    let (rel, bytes) = out.finish()?;
    Ok(FileEntry {
        path: rel,
        kind,
        day,
        rows: batch.num_rows() as u64,
        bytes,
        min_ts_us,
        max_ts_us,
    })
}

/// Rows per row group of a compacted file that is encoded anew: what the writer buffers before
/// it writes one, so compaction's memory stays bounded whatever the day holds.
const COMPACT_ROW_GROUP: usize = 128 * 1024;

/// Row groups of at least this many rows are copied into a merged file as they are (their
/// column chunks' bytes, statistics and page indexes), never decoded and encoded again.
///
/// Why: decoding a file and encoding it again cost about 1.1 µs of CPU per row (BENCHMARKS.md,
/// "The long-lived tail: compaction"), as much as storing the event in the first place, and
/// size-tiered compaction rewrites a row once per tier it climbs. Under load, when that CPU is
/// taken from the gateway on the same cores, the flushes' files are large (a flush is due at
/// `collector.flush_max_events`, 100,000 events, or every 2 s): their row groups are copied,
/// which costs a read and a write of the compressed bytes. Small row groups (a quiet gateway's
/// flushes) are still encoded anew into large ones, or a day would end up as thousands of
/// tiny row groups; that is cheap because there are few rows. A merged file whose inputs were
/// copied keeps their row groups (at least this many rows each); one encoded anew has row
/// groups of equal size (`balanced_row_group`), so it can be copied by the next tier up.
pub const COPY_MIN_ROWS: usize = 32 * 1024;

/// The row group size that splits `rows` into groups of at most [`COMPACT_ROW_GROUP`] rows and
/// equal size: 140,000 rows become two groups of 70,000, not 131,072 and 8,928, whose small
/// remainder would make the file too fine-grained to be copied by a later merge.
pub(super) fn balanced_row_group(rows: u64) -> usize {
    balanced(rows, COMPACT_ROW_GROUP)
}

/// Rows per row group of a flush's events file: at most twice [`COPY_MIN_ROWS`], in groups of
/// equal size, so every group of a flush of more than that is still large enough to be copied
/// by compaction (100,000 events: two groups of 50,000).
///
/// Why not one group for the whole flush: the writer holds a row group's encoded pages and
/// its dictionaries in memory until the group is complete, about 170 bytes an event, beside
/// the events the flush writes. With one group a flush of 100,000 events held 17 MB of it at
/// its peak (BENCHMARKS.md, "Memory under load").
pub(super) fn flush_row_group(rows: u64) -> usize {
    balanced(rows, 2 * COPY_MIN_ROWS)
}

/// The row group size that splits `rows` into groups of at most `max` rows and equal size.
fn balanced(rows: u64, max: usize) -> usize {
    let max = max as u64;
    let groups = rows.div_ceil(max).max(1);
    rows.div_ceil(groups).clamp(1, max) as usize
}

/// An input of a merge: its open file and its footer, page indexes included when it has them.
struct MergeInput<'a> {
    entry: &'a FileEntry,
    path: std::path::PathBuf,
    file: std::fs::File,
    meta: parquet::file::metadata::ParquetMetaData,
}

impl MergeInput<'_> {
    fn open<'a>(dir: &Path, entry: &'a FileEntry) -> Result<MergeInput<'a>, StoreError> {
        use parquet::file::metadata::{PageIndexPolicy, ParquetMetaDataReader};
        let path = dir.join(&entry.path);
        let file = std::fs::File::open(&path).map_err(StoreError::io(&path))?;
        let meta = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Optional)
            .parse_and_finish(&file)?;
        Ok(MergeInput {
            entry,
            path,
            file,
            meta,
        })
    }
}

/// Merges `files` (all of day `day`, all of one kind with the schema `schema`) into one new
/// file under `dir`, fsynced. Inputs are taken in order of their earliest row, so a day's rows
/// stay roughly in time order. Rollup rows are not re-aggregated: queries sum them anyway.
///
/// When every input has `schema` and row groups of at least `copy_min_rows` rows, their row
/// groups are copied as they are ([`COPY_MIN_ROWS`] says why); otherwise every row is decoded
/// and encoded again, streaming: one batch read and one row group buffered at a time, never
/// the whole day. `pause` is slept after each batch or row group (tests slow a merge with it).
pub fn merge_files(
    dir: &Path,
    day: i64,
    files: &[FileEntry],
    schema: datafusion::arrow::datatypes::SchemaRef,
    pause: std::time::Duration,
    copy_min_rows: usize,
) -> Result<FileEntry, StoreError> {
    let kind = files.first().map(|f| f.kind).unwrap_or_default();
    let mut inputs = files
        .iter()
        .map(|f| MergeInput::open(dir, f))
        .collect::<Result<Vec<_>, _>>()?;
    inputs.sort_by(|a, b| {
        (a.entry.min_ts_us, &a.entry.path).cmp(&(b.entry.min_ts_us, &b.entry.path))
    });
    let parquet_schema = parquet::arrow::ArrowSchemaConverter::new().convert(&schema)?;
    let copyable = !inputs.is_empty()
        && inputs.iter().all(|i| {
            i.meta.file_metadata().schema_descr().root_schema() == parquet_schema.root_schema()
                && i.meta
                    .row_groups()
                    .iter()
                    .all(|rg| rg.num_rows() >= copy_min_rows as i64)
        });
    let (rel, bytes, rows) = if copyable {
        copy_row_groups(dir, kind, day, &inputs, pause)?
    } else {
        encode_anew(dir, kind, day, &inputs, schema, pause)?
    };
    // An empty merge's file spans the day's first instant, as an empty flush's does.
    let span = |ts: Option<i64>| ts.filter(|_| rows > 0).unwrap_or(day * DAY_US);
    Ok(FileEntry {
        path: rel,
        kind,
        day,
        rows,
        bytes,
        min_ts_us: span(inputs.iter().map(|i| i.entry.min_ts_us).min()),
        max_ts_us: span(inputs.iter().map(|i| i.entry.max_ts_us).max()),
    })
}

/// Sleeps `pause` between a merge's steps (tests slow a merge with it).
fn rest(pause: std::time::Duration) {
    if !pause.is_zero() {
        std::thread::sleep(pause);
    }
}

/// The merge that decodes every row and encodes it again, in row groups of equal size.
fn encode_anew(
    dir: &Path,
    kind: FileKind,
    day: i64,
    inputs: &[MergeInput<'_>],
    schema: datafusion::arrow::datatypes::SchemaRef,
    pause: std::time::Duration,
) -> Result<(String, u64, u64), StoreError> {
    let total: u64 = inputs
        .iter()
        .map(|i| i.meta.file_metadata().num_rows() as u64)
        .sum();
    let mut out = NewFile::create(dir, kind, day, schema, balanced_row_group(total))?;
    let mut rows = 0u64;
    for input in inputs {
        let file = input
            .file
            .try_clone()
            .map_err(StoreError::io(&input.path))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)?
            .with_batch_size(STEP_ROWS)
            .build()?;
        for b in reader {
            let b = b.map_err(arrow_err)?;
            rows += b.num_rows() as u64;
            out.write(&b)?;
            rest(pause);
        }
    }
    let (rel, bytes) = out.finish()?;
    Ok((rel, bytes, rows))
}

/// The merge that copies the inputs' row groups: each column chunk's bytes spliced into the new
/// file with its statistics and page indexes, offsets moved to where it now lies. The footer's
/// key-value metadata (the Arrow schema) is the first input's; every input has the same schema.
fn copy_row_groups(
    dir: &Path,
    kind: FileKind,
    day: i64,
    inputs: &[MergeInput<'_>],
    pause: std::time::Duration,
) -> Result<(String, u64, u64), StoreError> {
    use parquet::column::writer::ColumnCloseResult;
    use parquet::file::writer::SerializedFileWriter;
    let Some(first) = inputs.first() else {
        return Err(StoreError::Corrupt("a merge without inputs".into()));
    };
    let (rel, path, file) = create_file(dir, kind, day)?;
    let props = WriterProperties::builder()
        .set_key_value_metadata(first.meta.file_metadata().key_value_metadata().cloned())
        .build();
    let root = first.meta.file_metadata().schema_descr().root_schema_ptr();
    let mut writer = SerializedFileWriter::new(file, root, std::sync::Arc::new(props))?;
    let mut rows = 0u64;
    for input in inputs {
        let column_indexes = input.meta.column_index();
        let offset_indexes = input.meta.offset_index();
        for (g, rg) in input.meta.row_groups().iter().enumerate() {
            let mut out = writer.next_row_group()?;
            for (c, column) in rg.columns().iter().enumerate() {
                out.append_column(
                    &input.file,
                    ColumnCloseResult {
                        bytes_written: column.compressed_size() as u64,
                        rows_written: rg.num_rows() as u64,
                        metadata: column.clone(),
                        bloom_filter: None,
                        column_index: column_indexes.and_then(|i| i.get(g)?.get(c).cloned()),
                        offset_index: offset_indexes.and_then(|i| i.get(g)?.get(c).cloned()),
                    },
                )?;
            }
            out.close()?;
            rows += rg.num_rows() as u64;
            cpu::tick();
            rest(pause);
        }
    }
    let file = writer.into_inner()?;
    let bytes = sync_file(&path, &file)?;
    Ok((rel, bytes, rows))
}
