//! Writing and reading the Parquet files of the store: one file per UTC day per flush, merged by
//! compaction.

use std::collections::BTreeMap;
use std::path::Path;

use datafusion::arrow::array::{BooleanArray, RecordBatch, TimestampMicrosecondArray};
use datafusion::arrow::compute::filter_record_batch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::manifest::{FileEntry, FileKind, sync_dir};
use crate::StoreError;
use crate::cpu::{self, STEP_ROWS, Yielder};

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

/// A Parquet file being written: its path relative to the store and its writer.
struct NewFile {
    rel: String,
    path: std::path::PathBuf,
    writer: ArrowWriter<std::fs::File>,
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
        let rel = new_path(kind, day);
        let path = dir.join(&rel);
        let parent = path.parent().expect("has a parent");
        std::fs::create_dir_all(parent).map_err(StoreError::io(parent))?;
        let file = std::fs::File::create(&path).map_err(StoreError::io(&path))?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(row_group));
        // Values unique per event gain nothing from a dictionary: the writer hashed and
        // compared every one into it (its interner was among the largest entries of the
        // flushes' profile under load), then fell back to plain pages once it filled.
        for unique in UNIQUE_COLUMNS.iter().chain(DELTA_COLUMNS) {
            props = props.set_column_dictionary_enabled(ColumnPath::from(*unique), false);
        }
        for delta in DELTA_COLUMNS {
            props =
                props.set_column_encoding(ColumnPath::from(*delta), Encoding::DELTA_BINARY_PACKED);
        }
        let props = props.build();
        let writer = ArrowWriter::try_new(file, schema, Some(props))?;
        Ok(NewFile { rel, path, writer })
    }

    /// Appends `batch` a few thousand rows at a time, offering the core between steps (the
    /// writer encodes and compresses as rows arrive; see [`crate::cpu`]).
    fn write(&mut self, batch: &RecordBatch, cpu: &mut Yielder) -> Result<(), StoreError> {
        for step in cpu::steps(batch) {
            self.writer.write(&step)?;
            cpu.tick();
        }
        Ok(())
    }

    /// Closes and fsyncs the file and its folder; returns its relative path and size.
    fn finish(self) -> Result<(String, u64), StoreError> {
        let file = self.writer.into_inner()?;
        file.sync_all().map_err(StoreError::io(&self.path))?;
        sync_dir(self.path.parent().expect("has a parent"))?;
        let bytes = file.metadata().map_err(StoreError::io(&self.path))?.len();
        Ok((self.rel, bytes))
    }
}

/// Writes `batch` (events, all of one day) as a new Parquet file under `dir`, fsynced.
pub fn write_file(dir: &Path, day: i64, batch: &RecordBatch) -> Result<FileEntry, StoreError> {
    let ts = ts_column(batch)?;
    let min = ts.values().iter().min().copied().unwrap_or(day * DAY_US);
    let max = ts.values().iter().max().copied().unwrap_or(day * DAY_US);
    write_kind(dir, FileKind::Events, day, batch, min, max)
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
    out.write(batch, &mut Yielder::new())?;
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

/// Rows per row group of a compacted file: what the writer buffers before it writes one, so
/// compaction's memory stays bounded whatever the day holds.
const COMPACT_ROW_GROUP: usize = 128 * 1024;

/// Merges `files` (all of day `day`, all of one kind with the schema `schema`) into one new
/// file under `dir`, fsynced, streaming: one batch read and one row group buffered at a time,
/// never the whole day. Inputs are taken in order of their earliest row, so a day's rows stay
/// roughly in time order. Rollup rows are not re-aggregated: queries sum them anyway.
pub fn merge_files(
    dir: &Path,
    day: i64,
    files: &[FileEntry],
    schema: datafusion::arrow::datatypes::SchemaRef,
    pause: std::time::Duration,
) -> Result<FileEntry, StoreError> {
    let kind = files.first().map(|f| f.kind).unwrap_or_default();
    let mut out = NewFile::create(dir, kind, day, schema, COMPACT_ROW_GROUP)?;
    let mut inputs: Vec<&FileEntry> = files.iter().collect();
    inputs.sort_by_key(|f| (f.min_ts_us, f.path.clone()));
    let (mut rows, mut min, mut max) = (0u64, i64::MAX, i64::MIN);
    let mut cpu = Yielder::new();
    for f in inputs {
        let input = dir.join(&f.path);
        let file = std::fs::File::open(&input).map_err(StoreError::io(&input))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)?
            .with_batch_size(STEP_ROWS)
            .build()?;
        for b in reader {
            let b = b.map_err(arrow_err)?;
            rows += b.num_rows() as u64;
            min = min.min(f.min_ts_us);
            max = max.max(f.max_ts_us);
            out.write(&b, &mut cpu)?;
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    }
    let (rel, bytes) = out.finish()?;
    Ok(FileEntry {
        path: rel,
        kind,
        day,
        rows,
        bytes,
        min_ts_us: if rows == 0 { day * DAY_US } else { min },
        max_ts_us: if rows == 0 { day * DAY_US } else { max },
    })
}
