//! Writing and reading the Parquet files of the store: one file per UTC day per flush, merged by
//! compaction.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{BooleanArray, RecordBatch, TimestampMicrosecondArray};
use datafusion::arrow::compute::{
    concat_batches, filter_record_batch, sort_to_indices, take_record_batch,
};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::manifest::{FileEntry, sync_dir};
use crate::StoreError;

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

/// Writes `batch` (all of one day) as a new Parquet file under `dir`, fsynced.
pub fn write_file(dir: &Path, day: i64, batch: &RecordBatch) -> Result<FileEntry, StoreError> {
    let rel = format!(
        "day={}/part-{}.parquet",
        crate::day_string(day),
        uuid::Uuid::now_v7()
    );
    let path = dir.join(&rel);
    let parent = path.parent().expect("has a parent");
    std::fs::create_dir_all(parent).map_err(StoreError::io(parent))?;
    let file = std::fs::File::create(&path).map_err(StoreError::io(&path))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(1 << 20))
        .build();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props))?;
    writer.write(batch)?;
    let file = writer.into_inner()?;
    file.sync_all().map_err(StoreError::io(&path))?;
    sync_dir(parent)?;
    let ts = ts_column(batch)?;
    let min = ts.values().iter().min().copied().unwrap_or(day * DAY_US);
    let max = ts.values().iter().max().copied().unwrap_or(day * DAY_US);
    let bytes = file.metadata().map_err(StoreError::io(&path))?.len();
    Ok(FileEntry {
        path: rel,
        day,
        rows: batch.num_rows() as u64,
        bytes,
        min_ts_us: min,
        max_ts_us: max,
    })
}

/// Reads whole files back into one batch sorted by `ts` (for compaction).
pub fn read_sorted(
    dir: &Path,
    files: &[FileEntry],
    schema: &Arc<datafusion::arrow::datatypes::Schema>,
) -> Result<RecordBatch, StoreError> {
    let mut batches = Vec::new();
    for f in files {
        let path = dir.join(&f.path);
        let file = std::fs::File::open(&path).map_err(StoreError::io(&path))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)?
            .with_batch_size(64 * 1024)
            .build()?;
        for b in reader {
            batches.push(b.map_err(arrow_err)?);
        }
    }
    let all = concat_batches(schema, &batches).map_err(arrow_err)?;
    let order =
        sort_to_indices(all.column_by_name("ts").expect("ts"), None, None).map_err(arrow_err)?;
    take_record_batch(&all, &order).map_err(arrow_err)
}
