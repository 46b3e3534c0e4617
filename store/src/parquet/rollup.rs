//! Per-minute rollups of the Parquet store, the same shape as ClickHouse's `usage_1m` and
//! `latency_1m`: written beside each flushed events file (same day, same manifest commit) and
//! merged by compaction, so a query over whole minutes reads a few rows per minute instead of
//! every event. Rows are sums; a query sums them again, so files never need re-aggregating.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::prelude::{SessionConfig, SessionContext};

use super::manifest::FileKind;
use crate::StoreError;
use crate::sketch::ln_gamma;
use crate::time::MINUTE_US;

/// Schema of the `usage_1m` files.
pub fn usage_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("minute_us", DataType::Int64, true),
        Field::new("consumer", DataType::Utf8, true),
        Field::new("route", DataType::Utf8, true),
        Field::new("plan", DataType::Utf8, true),
        Field::new("status", DataType::Int64, true),
        Field::new("requests", DataType::Int64, true),
        Field::new("billable_requests", DataType::Int64, true),
        Field::new("req_bytes", DataType::Int64, true),
        Field::new("resp_bytes", DataType::Int64, true),
    ]))
}

/// Schema of the `latency_1m` files.
pub fn latency_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("minute_us", DataType::Int64, true),
        Field::new("route", DataType::Utf8, true),
        Field::new("consumer", DataType::Utf8, true),
        Field::new("bucket", DataType::Int64, true),
        Field::new("n", DataType::Int64, true),
        Field::new("errors", DataType::Int64, true),
    ]))
}

/// The schema of a file kind.
pub fn schema_of(kind: FileKind) -> SchemaRef {
    match kind {
        FileKind::Events => tollgate_schemas::arrow::schema(),
        FileKind::Usage1m => usage_schema(),
        FileKind::Latency1m => latency_schema(),
    }
}

/// The sketch bucket of `latency_us` in DataFusion SQL (as `sketch::bucket_of`).
pub fn bucket_sql() -> String {
    format!(
        "CAST(ceil(ln(CAST(CASE WHEN latency_us < 1 THEN 1 ELSE latency_us END AS DOUBLE)) / {:.17}) AS BIGINT)",
        ln_gamma()
    )
}

fn minute_sql() -> String {
    format!("(CAST(ts AS BIGINT) / {MINUTE_US}) * {MINUTE_US}")
}

/// The SQL that rolls the `events` table up into `kind`.
fn rollup_sql(kind: FileKind) -> String {
    let minute = minute_sql();
    match kind {
        FileKind::Usage1m => format!(
            "SELECT {minute} AS minute_us, consumer, route, plan, CAST(status AS BIGINT) AS status, \
             COUNT(*) AS requests, SUM(CASE WHEN billable THEN 1 ELSE 0 END) AS billable_requests, \
             SUM(CAST(req_bytes AS BIGINT)) AS req_bytes, SUM(CAST(resp_bytes AS BIGINT)) AS resp_bytes \
             FROM events GROUP BY {minute}, consumer, route, plan, CAST(status AS BIGINT)"
        ),
        FileKind::Latency1m => {
            let bucket = bucket_sql();
            format!(
                "SELECT {minute} AS minute_us, route, consumer, {bucket} AS bucket, COUNT(*) AS n, \
                 SUM(CASE WHEN status >= 500 THEN 1 ELSE 0 END) AS errors \
                 FROM events WHERE route IS NOT NULL AND upstream_latency_us IS NOT NULL \
                 GROUP BY {minute}, route, consumer, {bucket}"
            )
        }
        FileKind::Events => unreachable!("events are not a rollup"),
    }
}

/// Rolls up the events registered as `events` in `ctx` into one batch of `kind` (with the
/// kind's schema).
pub async fn roll_up(ctx: &SessionContext, kind: FileKind) -> Result<RecordBatch, StoreError> {
    let schema = schema_of(kind);
    let batches = ctx.sql(&rollup_sql(kind)).await?.collect().await?;
    let batches: Vec<RecordBatch> = batches
        .into_iter()
        .map(|b| {
            RecordBatch::try_new(schema.clone(), b.columns().to_vec())
                .map_err(|e| StoreError::Corrupt(format!("rollup columns: {e}")))
        })
        .collect::<Result<_, _>>()?;
    datafusion::arrow::compute::concat_batches(&schema, &batches)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Both rollups of an in-memory batch of events.
pub async fn roll_up_batch(
    events: &RecordBatch,
) -> Result<[(FileKind, RecordBatch); 2], StoreError> {
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    ctx.register_batch("events", events.clone())?;
    Ok([
        (FileKind::Usage1m, roll_up(&ctx, FileKind::Usage1m).await?),
        (
            FileKind::Latency1m,
            roll_up(&ctx, FileKind::Latency1m).await?,
        ),
    ])
}

/// The minute span `[min, max]` of a rollup batch (`None` when empty).
pub fn minute_span(batch: &RecordBatch) -> Option<(i64, i64)> {
    let col = batch
        .column_by_name("minute_us")?
        .as_any()
        .downcast_ref::<datafusion::arrow::array::Int64Array>()?;
    let min = col.iter().flatten().min()?;
    let max = col.iter().flatten().max()?;
    Some((min, max))
}
