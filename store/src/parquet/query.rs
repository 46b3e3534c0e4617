//! `UsageQuery` over the embedded store, with DataFusion plans over one snapshot of the store:
//! `events` (the Parquet files overlapping the window plus the in-memory batches), `mem_events`
//! (the in-memory batches alone) and one table per rollup kind (`usage_1m`, `usage_1h`,
//! `usage_1d`, `latency_1m`, `route_sketch_1m`, `route_sketch_1h`). As with ClickHouse, a
//! window is cut by `time::plan`: aligned days, hours and minutes are read from the coarsest
//! rollup that has them (plus the not yet flushed events, which have no rollups yet), the partial
//! minutes at its edges from raw events.
//!
//! The plans are built with DataFusion's `DataFrame` API (filter, then aggregate), not SQL
//! text: the queries are a handful of fixed shapes, window bounds and filters are typed
//! literals, and leaving out DataFusion's SQL front end (`sqlparser`, `datafusion-sql`) takes
//! a long serial chain out of the demo's first build.

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::functions_aggregate::expr_fn::sum;
use datafusion::prelude::{
    Expr, ParquetReadOptions, SessionConfig, SessionContext, cast, col, lit,
};

use super::manifest::FileKind;
use super::{ParquetStore, rollup};
use crate::merge::{LatencyGroups, UsageSums};
use crate::time::Grain;
use crate::{
    Filter, GroupKey, KeyValue, LatencyQuery, LatencyRow, StoreError, UsageQuery, UsageRow,
};

/// Which table a part of a window is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// `events`: raw rows, files and memory.
    Raw,
    /// A rollup table, for flushed rows.
    Rollup(FileKind),
    /// `mem_events`: raw rows not yet flushed (so without rollups).
    Memory,
}

impl Source {
    /// The time column as microseconds.
    fn time(self) -> Expr {
        match self {
            Source::Rollup(kind) => col(kind.period().map_or("minute_us", |(t, _)| t)),
            _ => rollup::ts_us(),
        }
    }

    /// The table registered for this source.
    fn table(self) -> &'static str {
        match self {
            Source::Rollup(kind) => kind.prefix(),
            Source::Memory => "mem_events",
            Source::Raw => "events",
        }
    }

    fn is_raw(self) -> bool {
        !matches!(self, Source::Rollup(_))
    }
}

/// The expression of each group key.
fn key_expr(k: GroupKey, source: Source) -> Expr {
    match k {
        GroupKey::Consumer => col("consumer"),
        GroupKey::Route => col("route"),
        GroupKey::Plan => col("plan"),
        GroupKey::Status => cast(col("status"), DataType::Int64),
        GroupKey::Day | GroupKey::Hour | GroupKey::Minute => {
            source.time() / lit(k.period_us().expect("a time key"))
        }
    }
}

/// The parts of `[from, to)` and where each is read from: aligned spans from the coarsest of
/// `kinds` (ordered coarse to fine) that the store has complete and whose periods `step` does
/// not cut, each with the in-memory events of the same span; the rest raw.
pub(super) fn plan(
    from: i64,
    to: i64,
    step: Option<i64>,
    kinds: &[FileKind],
    complete: &[FileKind],
) -> Vec<(Source, i64, i64)> {
    let usable: Vec<(FileKind, Grain)> = kinds
        .iter()
        .filter(|k| complete.contains(k))
        .filter_map(|k| k.period().map(|(_, size)| (*k, Grain::always(size))))
        .filter(|(_, g)| g.fits_step(step))
        .collect();
    let grains: Vec<Grain> = usable.iter().map(|(_, g)| *g).collect();
    let mut out = Vec::new();
    for (i, a, b) in crate::time::plan(from, to, &grains) {
        match i {
            Some(i) => {
                out.push((Source::Rollup(usable[i].0), a, b));
                out.push((Source::Memory, a, b));
            }
            None => out.push((Source::Raw, a, b)),
        }
    }
    out
}

/// The filter of `f` over `[from, to)` of `source`.
fn where_clause(f: &Filter, source: Source, from: i64, to: i64) -> Expr {
    let mut cond = if source.is_raw() {
        let ts = |v| {
            lit(ScalarValue::TimestampMicrosecond(
                Some(v),
                Some("UTC".into()),
            ))
        };
        col("ts").gt_eq(ts(from)).and(col("ts").lt(ts(to)))
    } else {
        let t = source.time();
        t.clone().gt_eq(lit(from)).and(t.lt(lit(to)))
    };
    for (name, value) in [("consumer", &f.consumer), ("route", &f.route)] {
        if let Some(v) = value {
            cond = cond.and(col(name).eq(lit(v.as_str())));
        }
    }
    cond
}

/// One consistent view of the store for a query.
struct Snapshot {
    ctx: SessionContext,
    /// The rollup kinds every flushed events file has.
    complete: Vec<FileKind>,
}

impl Snapshot {
    /// `source`'s rows that match `cond`, grouped by `group`: the group columns in order, then
    /// `sums`.
    async fn aggregate(
        &self,
        source: Source,
        cond: Expr,
        group: Vec<Expr>,
        sums: Vec<Expr>,
    ) -> Result<Vec<RecordBatch>, StoreError> {
        let df = self.ctx.table(source.table()).await?.filter(cond)?;
        Ok(df.aggregate(group, sums)?.collect().await?)
    }
}

impl ParquetStore {
    /// The store as of now, as tables for `[from, to)`: files are taken under the same lock as
    /// the in-memory batches, so no event is seen twice or missed across a concurrent flush.
    async fn snapshot(&self, from_us: i64, to_us: i64) -> Result<Snapshot, StoreError> {
        let (raw, rollups, mem, complete) = {
            let state = self.read_state();
            let paths = |kind: FileKind| -> Vec<String> {
                state
                    .manifest
                    .files
                    .iter()
                    .filter(|f| f.kind == kind && f.max_ts_us >= from_us && f.min_ts_us < to_us)
                    .map(|f| self.inner.dir.join(&f.path).display().to_string())
                    .collect()
            };
            let mem: Vec<RecordBatch> = state.mem.iter().map(|(b, _)| b.clone()).collect();
            let rollups: Vec<(FileKind, Vec<String>)> = FileKind::ROLLUPS
                .into_iter()
                .map(|k| (k, paths(k)))
                .collect();
            (
                paths(FileKind::Events),
                rollups,
                mem,
                state.manifest.complete_rollups(),
            )
        };
        let config = SessionConfig::new()
            .with_target_partitions(2)
            .with_information_schema(false);
        let ctx = SessionContext::new_with_config(config);
        let schema = tollgate_schemas::arrow::schema();
        let memory = ctx.read_table(rollup::stepped_table(schema.clone(), mem)?)?;
        ctx.register_table("mem_events", memory.clone().into_view())?;
        let mut events = memory;
        if !raw.is_empty() {
            let files = ctx
                .read_parquet(raw, ParquetReadOptions::default().schema(&schema))
                .await?;
            events = files.union(events)?;
        }
        ctx.register_table("events", events.into_view())?;
        for (kind, paths) in rollups {
            let (name, schema) = (kind.prefix(), rollup::schema_of(kind));
            let table = if paths.is_empty() {
                ctx.read_batch(RecordBatch::new_empty(schema))?
            } else {
                ctx.read_parquet(paths, ParquetReadOptions::default().schema(&schema))
                    .await?
            };
            ctx.register_table(name, table.into_view())?;
        }
        Ok(Snapshot { ctx, complete })
    }
}

/// Adds the rows of a per-route sketch batch (one encoded sketch per row, the period start in
/// column `t`) to `groups`.
fn add_sketches(
    groups: &mut LatencyGroups,
    b: &RecordBatch,
    bucket_t: &impl Fn(i64) -> i64,
) -> Result<(), StoreError> {
    let route = strs_at(b, index_of(b, "route")?)?;
    let minute = i64s_at(b, index_of(b, "t")?)?;
    let errors = i64s_at(b, index_of(b, "errors")?)?;
    let sketch = b
        .column_by_name("sketch")
        .and_then(|c| c.as_binary_opt::<i32>())
        .ok_or_else(|| StoreError::Corrupt("latency sketches have no binary sketch".into()))?;
    for i in 0..b.num_rows() {
        groups.add_encoded(
            route.value(i),
            None,
            bucket_t(minute.value(i)),
            nonneg(&errors, i),
            sketch.value(i),
        );
    }
    Ok(())
}

/// Column `i` of a query result, cast to `to`.
fn column_at(
    batch: &RecordBatch,
    i: usize,
    to: &DataType,
) -> Result<std::sync::Arc<dyn Array>, StoreError> {
    if i >= batch.num_columns() {
        return Err(StoreError::Corrupt(format!(
            "query result has no column {i}"
        )));
    }
    datafusion::arrow::compute::cast(batch.column(i), to)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn i64s_at(batch: &RecordBatch, i: usize) -> Result<Int64Array, StoreError> {
    let a = column_at(batch, i, &DataType::Int64)?;
    Ok(a.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .clone())
}

fn strs_at(batch: &RecordBatch, i: usize) -> Result<StringArray, StoreError> {
    let a = column_at(batch, i, &DataType::Utf8)?;
    Ok(a.as_string::<i32>().clone())
}

/// The position of column `name` in a query result.
fn index_of(batch: &RecordBatch, name: &str) -> Result<usize, StoreError> {
    batch
        .schema()
        .index_of(name)
        .map_err(|_| StoreError::Corrupt(format!("query result has no column {name}")))
}

/// The group key value of row `i` of a key column.
fn key_value(k: GroupKey, col: &dyn Array, i: usize) -> KeyValue {
    if col.is_null(i) {
        return KeyValue::Null;
    }
    match k {
        GroupKey::Day | GroupKey::Hour | GroupKey::Minute => k.period_value(
            col.as_any()
                .downcast_ref::<Int64Array>()
                .expect("i64")
                .value(i),
        ),
        GroupKey::Status => KeyValue::Int(
            col.as_any()
                .downcast_ref::<Int64Array>()
                .expect("i64")
                .value(i),
        ),
        _ => KeyValue::Text(
            col.as_any()
                .downcast_ref::<StringArray>()
                .expect("utf8")
                .value(i)
                .to_string(),
        ),
    }
}

fn nonneg(a: &Int64Array, i: usize) -> u64 {
    if a.is_valid(i) {
        a.value(i).max(0) as u64
    } else {
        0
    }
}

#[async_trait]
impl UsageQuery for ParquetStore {
    async fn usage(
        &self,
        filter: &Filter,
        group_by: &[GroupKey],
    ) -> Result<Vec<UsageRow>, StoreError> {
        let snap = self.snapshot(filter.from_us, filter.to_us).await?;
        let mut sums = UsageSums::default();
        let kinds = [FileKind::Usage1d, FileKind::Usage1h, FileKind::Usage1m];
        // A rollup coarser than the finest time key cannot be cut into its periods.
        let step = GroupKey::finest_period(group_by);
        for (source, from, to) in plan(filter.from_us, filter.to_us, step, &kinds, &snap.complete) {
            let cond = where_clause(filter, source, from, to);
            let group: Vec<Expr> = group_by.iter().map(|k| key_expr(*k, source)).collect();
            let totals = match source {
                Source::Rollup(_) => rollup::usage_sums_of_rollups(),
                _ => rollup::usage_sums_of_events()?,
            };
            let n = group_by.len();
            for b in snap.aggregate(source, cond, group, totals).await? {
                let [requests, billable, req, resp] =
                    [n, n + 1, n + 2, n + 3].map(|i| i64s_at(&b, i));
                let (requests, billable, req, resp) = (requests?, billable?, req?, resp?);
                let key_cols: Vec<(GroupKey, std::sync::Arc<dyn Array>)> = group_by
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        let ty = if k.period_us().is_some() || *k == GroupKey::Status {
                            DataType::Int64
                        } else {
                            DataType::Utf8
                        };
                        Ok((*k, column_at(&b, i, &ty)?))
                    })
                    .collect::<Result<_, StoreError>>()?;
                for i in 0..b.num_rows() {
                    if nonneg(&requests, i) == 0 {
                        continue; // an aggregate over no rows (no grouping, empty window)
                    }
                    let keys = key_cols
                        .iter()
                        .map(|(k, col)| key_value(*k, col.as_ref(), i))
                        .collect();
                    sums.add(
                        keys,
                        nonneg(&requests, i),
                        nonneg(&billable, i),
                        nonneg(&req, i),
                        nonneg(&resp, i),
                    );
                }
            }
        }
        Ok(sums.rows())
    }

    async fn latency(&self, q: &LatencyQuery) -> Result<Vec<LatencyRow>, StoreError> {
        q.validate()?;
        let snap = self.snapshot(q.filter.from_us, q.filter.to_us).await?;
        let mut groups = LatencyGroups::default();
        let f = &q.filter;
        let bucket_t = |t: i64| q.step_us.map_or(f.from_us, |step| (t / step) * step);
        let kinds: &[FileKind] = if q.needs_consumer() {
            &[FileKind::Latency1m]
        } else {
            &[
                FileKind::RouteSketch1h,
                FileKind::RouteSketch1m,
                FileKind::Latency1m,
            ]
        };
        for (source, from, to) in plan(f.from_us, f.to_us, q.step_us, kinds, &snap.complete) {
            let cond = where_clause(f, source, from, to);
            if let Source::Rollup(kind) = source
                && rollup::is_sketch(kind)
            {
                let df = snap
                    .ctx
                    .table(source.table())
                    .await?
                    .filter(cond)?
                    .select(vec![
                        col("route"),
                        source.time().alias("t"),
                        col("errors"),
                        col("sketch"),
                    ])?;
                for b in df.collect().await? {
                    add_sketches(&mut groups, &b, &bucket_t)?;
                }
                continue;
            }
            let t = match q.step_us {
                Some(step) => rollup::period_of(source.time(), step),
                None => lit(f.from_us),
            };
            let consumer = if q.by_consumer {
                col("consumer")
            } else {
                lit(ScalarValue::Utf8(None))
            };
            let (cond, bucket, totals) = match source {
                Source::Rollup(_) => (
                    cond,
                    col("bucket"),
                    vec![sum(col("n")).alias("n"), sum(col("errors")).alias("errors")],
                ),
                _ => (
                    cond.and(rollup::has_latency()),
                    rollup::bucket_expr()?,
                    rollup::latency_sums_of_events()?,
                ),
            };
            let group = vec![col("route"), consumer, t, bucket];
            for b in snap.aggregate(source, cond, group, totals).await? {
                let route = strs_at(&b, 0)?;
                let consumer = strs_at(&b, 1)?;
                let [t, bucket, n, errors] = [2, 3, 4, 5].map(|i| i64s_at(&b, i));
                let (t, bucket, n, errors) = (t?, bucket?, n?, errors?);
                for i in 0..b.num_rows() {
                    groups.add(
                        route.value(i),
                        consumer.is_valid(i).then(|| consumer.value(i)),
                        t.value(i),
                        bucket.value(i) as i32,
                        nonneg(&n, i),
                        nonneg(&errors, i),
                    );
                }
            }
        }
        groups
            .rows(&q.quantiles)
            .map_err(|e| StoreError::Corrupt(format!("latency sketch: {e}")))
    }

    async fn ready(&self) -> bool {
        self.inner.dir.is_dir()
    }

    async fn progress(&self) -> Result<Vec<crate::PartitionProgress>, StoreError> {
        Ok(self.progress_now())
    }

    /// Appends, flushes, compactions and resets change the state queries read; nothing else
    /// writes it (one process owns the directory).
    fn data_version(&self) -> Option<u64> {
        Some(self.changes())
    }

    async fn billable_by_consumer(
        &self,
        from_us: i64,
        to_us: i64,
    ) -> Result<std::sync::Arc<std::collections::HashMap<String, u64>>, StoreError> {
        self.tally_billable(from_us, to_us).await
    }

    async fn publish_export(
        &self,
        export: &crate::StoredExport,
    ) -> Result<crate::StoredExport, StoreError> {
        let (store, export) = (self.clone(), export.clone());
        super::ledger::blocking(move || store.publish_export_now(&export)).await
    }

    async fn published_export(
        &self,
        period: &str,
    ) -> Result<Option<crate::StoredExport>, StoreError> {
        let (store, period) = (self.clone(), period.to_string());
        super::ledger::blocking(move || store.published_export_now(&period)).await
    }

    async fn published_exports(&self) -> Result<Vec<crate::StoredExport>, StoreError> {
        let store = self.clone();
        super::ledger::blocking(move || store.published_exports_now()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{DAY_US, HOUR_US, MINUTE_US};

    const USAGE: [FileKind; 3] = [FileKind::Usage1d, FileKind::Usage1h, FileKind::Usage1m];

    #[test]
    fn a_window_reads_the_coarsest_complete_rollup_with_memory_beside_it() {
        let day = 20_000 * DAY_US;
        let all = FileKind::ROLLUPS;
        assert_eq!(
            plan(day, day + DAY_US, None, &USAGE, &all),
            vec![
                (Source::Rollup(FileKind::Usage1d), day, day + DAY_US),
                (Source::Memory, day, day + DAY_US),
            ]
        );
        // A store whose day rollups are not built yet reads hours; edges stay raw.
        let (from, to) = (day + 5, day + 2 * HOUR_US + MINUTE_US);
        let hours_and_minutes = [FileKind::Usage1h, FileKind::Usage1m];
        assert_eq!(
            plan(from, to, None, &USAGE, &hours_and_minutes),
            vec![
                (Source::Raw, from, day + MINUTE_US),
                (
                    Source::Rollup(FileKind::Usage1m),
                    day + MINUTE_US,
                    day + HOUR_US
                ),
                (Source::Memory, day + MINUTE_US, day + HOUR_US),
                (
                    Source::Rollup(FileKind::Usage1h),
                    day + HOUR_US,
                    day + 2 * HOUR_US
                ),
                (Source::Memory, day + HOUR_US, day + 2 * HOUR_US),
                (Source::Rollup(FileKind::Usage1m), day + 2 * HOUR_US, to),
                (Source::Memory, day + 2 * HOUR_US, to),
            ]
        );
        // A step of 5 minutes cannot use hours; no rollups at all: raw.
        assert!(
            plan(day, day + DAY_US, Some(5 * MINUTE_US), &USAGE, &all)
                .iter()
                .all(|(s, _, _)| *s != Source::Rollup(FileKind::Usage1h))
        );
        assert_eq!(
            plan(day, day + DAY_US, None, &USAGE, &[]),
            vec![(Source::Raw, day, day + DAY_US)]
        );
    }
}
