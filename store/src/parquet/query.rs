//! `UsageQuery` over the embedded store, with DataFusion SQL over one snapshot of the store:
//! `events` (the Parquet files overlapping the window plus the in-memory batches), `mem_events`
//! (the in-memory batches alone) and the per-minute rollups `usage_1m` and `latency_1m`. As with
//! ClickHouse, whole minutes of a window are read from the rollups (plus the not yet flushed
//! events, which have no rollups yet) and the partial minutes at its edges from raw events.
//! Window bounds and filters are bound as typed parameters, never spliced into the SQL.

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::datatypes::{Int32Type, Int64Type};
use datafusion::common::ScalarValue;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};

use super::manifest::FileKind;
use super::{ParquetStore, rollup};
use crate::merge::{LatencyGroups, UsageSums};
use crate::time::{DAY_US, MINUTE_US, split_minutes};
use crate::{
    Filter, GroupKey, KeyValue, LatencyQuery, LatencyRow, StoreError, UsageQuery, UsageRow,
    day_string,
};

/// Which table a part of a window is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// `events`: raw rows, files and memory.
    Raw,
    /// The rollup table, for flushed rows.
    Rollup,
    /// `mem_events`: raw rows not yet flushed (so without rollups).
    Memory,
}

impl Source {
    fn is_raw(self) -> bool {
        self != Source::Rollup
    }

    /// The time column as microseconds.
    fn time(self) -> &'static str {
        if self.is_raw() {
            "CAST(ts AS BIGINT)"
        } else {
            "minute_us"
        }
    }
}

/// SQL expression of each group key.
fn key_expr(k: GroupKey, source: Source) -> String {
    match k {
        GroupKey::Consumer => "consumer".into(),
        GroupKey::Route => "route".into(),
        GroupKey::Plan => "plan".into(),
        GroupKey::Status => "CAST(status AS BIGINT)".into(),
        GroupKey::Day => format!("{} / {DAY_US}", source.time()),
    }
}

/// The parts of `[from, to)` and where each is read from: whole minutes from rollups (and
/// memory), the edges raw. Rollups serve only when time buckets never cut a minute.
fn plan(from: i64, to: i64, step: Option<i64>, rollups: bool) -> Vec<(Source, i64, i64)> {
    let whole_minutes = step.is_none_or(|s| s % MINUTE_US == 0);
    if !rollups || !whole_minutes {
        return vec![(Source::Raw, from, to)];
    }
    let (head, body, tail) = split_minutes(from, to);
    let mut out = Vec::new();
    out.extend(head.map(|(a, b)| (Source::Raw, a, b)));
    if let Some((a, b)) = body {
        out.push((Source::Rollup, a, b));
        out.push((Source::Memory, a, b));
    }
    out.extend(tail.map(|(a, b)| (Source::Raw, a, b)));
    out
}

/// `WHERE` clause and its parameters for a filter over `[from, to)` of `source`.
fn where_clause(f: &Filter, source: Source, from: i64, to: i64) -> (String, Vec<ScalarValue>) {
    let (mut params, mut sql) = if source.is_raw() {
        let ts = |v| ScalarValue::TimestampMicrosecond(Some(v), Some("UTC".into()));
        (vec![ts(from), ts(to)], "ts >= $1 AND ts < $2".to_string())
    } else {
        (
            vec![ScalarValue::Int64(Some(from)), ScalarValue::Int64(Some(to))],
            "minute_us >= $1 AND minute_us < $2".to_string(),
        )
    };
    for (col, value) in [("consumer", &f.consumer), ("route", &f.route)] {
        if let Some(v) = value {
            params.push(ScalarValue::Utf8(Some(v.clone())));
            sql.push_str(&format!(" AND {col} = ${}", params.len()));
        }
    }
    (sql, params)
}

/// One consistent view of the store for a query.
struct Snapshot {
    ctx: SessionContext,
    rollups: bool,
    route_sketches: bool,
}

impl Snapshot {
    async fn run(
        &self,
        sql: &str,
        params: Vec<ScalarValue>,
    ) -> Result<Vec<RecordBatch>, StoreError> {
        let df = self.ctx.sql(sql).await?.with_param_values(params)?;
        Ok(df.collect().await?)
    }
}

impl ParquetStore {
    /// The store as of now, as tables for `[from, to)`: files are taken under the same lock as
    /// the in-memory batches, so no event is seen twice or missed across a concurrent flush.
    async fn snapshot(&self, from_us: i64, to_us: i64) -> Result<Snapshot, StoreError> {
        let (raw, usage, latency, sketches, mem, rollups, route_sketches) = {
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
            (
                paths(FileKind::Events),
                paths(FileKind::Usage1m),
                paths(FileKind::Latency1m),
                paths(FileKind::LatencyRoute1m),
                mem,
                state.manifest.rollups,
                state.manifest.rollups && state.manifest.route_sketches,
            )
        };
        let config = SessionConfig::new()
            .with_target_partitions(2)
            .with_information_schema(false);
        let ctx = SessionContext::new_with_config(config);
        let schema = tollgate_schemas::arrow::schema();
        let memory = if mem.is_empty() {
            ctx.read_batch(RecordBatch::new_empty(schema.clone()))?
        } else {
            ctx.read_batches(mem)?
        };
        ctx.register_table("mem_events", memory.clone().into_view())?;
        let mut events = memory;
        if !raw.is_empty() {
            let files = ctx
                .read_parquet(raw, ParquetReadOptions::default().schema(&schema))
                .await?;
            events = files.union(events)?;
        }
        ctx.register_table("events", events.into_view())?;
        for (name, paths, schema) in [
            ("usage_1m", usage, rollup::usage_schema()),
            ("latency_1m", latency, rollup::latency_schema()),
            ("latency_route_1m", sketches, rollup::route_sketch_schema()),
        ] {
            let table = if paths.is_empty() {
                ctx.read_batch(RecordBatch::new_empty(schema))?
            } else {
                ctx.read_parquet(paths, ParquetReadOptions::default().schema(&schema))
                    .await?
            };
            ctx.register_table(name, table.into_view())?;
        }
        Ok(Snapshot {
            ctx,
            rollups,
            route_sketches,
        })
    }
}

/// Adds the rows of a `latency_route_1m` batch (one whole sketch per row) to `groups`.
fn add_sketches(
    groups: &mut LatencyGroups,
    b: &RecordBatch,
    bucket_t: &impl Fn(i64) -> i64,
) -> Result<(), StoreError> {
    let route = strs(b, "route")?;
    let minute = i64s(b, "minute_us")?;
    let errors = i64s(b, "errors")?;
    let list = |name: &str| {
        b.column_by_name(name)
            .and_then(|c| c.as_list_opt::<i32>())
            .ok_or_else(|| StoreError::Corrupt(format!("latency_route_1m has no list {name}")))
    };
    let (buckets, counts) = (list("buckets")?, list("counts")?);
    let bucket_values = buckets.values().as_primitive::<Int32Type>();
    let count_values = counts.values().as_primitive::<Int64Type>();
    for i in 0..b.num_rows() {
        let (bs, be) = (
            buckets.value_offsets()[i] as usize,
            buckets.value_offsets()[i + 1] as usize,
        );
        let cs = counts.value_offsets()[i] as usize;
        let pairs = (bs..be).map(|j| {
            (
                bucket_values.value(j),
                count_values.value(cs + j - bs).max(0) as u64,
            )
        });
        groups.add_sketch(
            route.value(i),
            None,
            bucket_t(minute.value(i)),
            nonneg(&errors, i),
            pairs,
        );
    }
    Ok(())
}

fn column_as(
    batch: &RecordBatch,
    name: &str,
    to: &DataType,
) -> Result<std::sync::Arc<dyn Array>, StoreError> {
    let c = batch
        .column_by_name(name)
        .ok_or_else(|| StoreError::Corrupt(format!("query result has no column {name}")))?;
    cast(c, to).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn i64s(batch: &RecordBatch, name: &str) -> Result<Int64Array, StoreError> {
    let a = column_as(batch, name, &DataType::Int64)?;
    Ok(a.as_any()
        .downcast_ref::<Int64Array>()
        .expect("cast to Int64")
        .clone())
}

fn strs(batch: &RecordBatch, name: &str) -> Result<StringArray, StoreError> {
    let a = column_as(batch, name, &DataType::Utf8)?;
    Ok(a.as_any()
        .downcast_ref::<StringArray>()
        .expect("cast to Utf8")
        .clone())
}

/// The group key value of row `i` of a key column.
fn key_value(k: GroupKey, col: &dyn Array, i: usize) -> KeyValue {
    if col.is_null(i) {
        return KeyValue::Null;
    }
    match k {
        GroupKey::Day => KeyValue::Text(day_string(
            col.as_any()
                .downcast_ref::<Int64Array>()
                .expect("i64")
                .value(i),
        )),
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
        for (source, from, to) in plan(filter.from_us, filter.to_us, None, snap.rollups) {
            let (cond, params) = where_clause(filter, source, from, to);
            let keys: Vec<String> = group_by
                .iter()
                .enumerate()
                .map(|(i, k)| format!("{} AS k{i}", key_expr(*k, source)))
                .collect();
            let group: Vec<String> = group_by.iter().map(|k| key_expr(*k, source)).collect();
            let mut select = keys.join(", ");
            if !select.is_empty() {
                select.push_str(", ");
            }
            let (table, sums_sql) = match source {
                Source::Rollup => (
                    "usage_1m",
                    "SUM(requests) AS requests, SUM(billable_requests) AS billable_requests, \
                     SUM(req_bytes) AS req_bytes, SUM(resp_bytes) AS resp_bytes",
                ),
                raw => (
                    if raw == Source::Memory {
                        "mem_events"
                    } else {
                        "events"
                    },
                    "COUNT(*) AS requests, SUM(CASE WHEN billable THEN 1 ELSE 0 END) AS billable_requests, \
                     SUM(CAST(req_bytes AS BIGINT)) AS req_bytes, SUM(CAST(resp_bytes AS BIGINT)) AS resp_bytes",
                ),
            };
            let sql = format!(
                "SELECT {select}{sums_sql} FROM {table} WHERE {cond}{}",
                if group.is_empty() {
                    String::new()
                } else {
                    format!(" GROUP BY {}", group.join(", "))
                }
            );
            for b in snap.run(&sql, params).await? {
                let requests = i64s(&b, "requests")?;
                let billable = i64s(&b, "billable_requests")?;
                let req = i64s(&b, "req_bytes")?;
                let resp = i64s(&b, "resp_bytes")?;
                let key_cols: Vec<(GroupKey, std::sync::Arc<dyn Array>)> = group_by
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        let ty = if matches!(k, GroupKey::Day | GroupKey::Status) {
                            DataType::Int64
                        } else {
                            DataType::Utf8
                        };
                        Ok((*k, column_as(&b, &format!("k{i}"), &ty)?))
                    })
                    .collect::<Result<_, StoreError>>()?;
                for i in 0..b.num_rows() {
                    if nonneg(&requests, i) == 0 {
                        continue; // an aggregate over no rows (no GROUP BY, empty window)
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
        for (source, from, to) in plan(f.from_us, f.to_us, q.step_us, snap.rollups) {
            let (cond, params) = where_clause(f, source, from, to);
            if source == Source::Rollup && snap.route_sketches && !q.needs_consumer() {
                let sql = format!(
                    "SELECT route, minute_us, errors, buckets, counts FROM latency_route_1m WHERE {cond}"
                );
                for b in snap.run(&sql, params).await? {
                    add_sketches(&mut groups, &b, &bucket_t)?;
                }
                continue;
            }
            let time = source.time();
            let t = match q.step_us {
                Some(step) => format!("({time} / {step}) * {step}"),
                None => format!("CAST({} AS BIGINT)", f.from_us),
            };
            let consumer = if q.by_consumer {
                "consumer"
            } else {
                "CAST(NULL AS VARCHAR)"
            };
            let sql = match source {
                Source::Rollup => format!(
                    "SELECT route, {consumer} AS consumer, {t} AS t, bucket, SUM(n) AS n, \
                     SUM(errors) AS errors FROM latency_1m WHERE {cond} GROUP BY 1, 2, 3, 4"
                ),
                raw => format!(
                    "SELECT route, {consumer} AS consumer, {t} AS t, {} AS bucket, COUNT(*) AS n, \
                     SUM(CASE WHEN status >= 500 THEN 1 ELSE 0 END) AS errors \
                     FROM {} WHERE {cond} AND route IS NOT NULL AND upstream_latency_us IS NOT NULL \
                     GROUP BY 1, 2, 3, 4",
                    rollup::bucket_sql(),
                    if raw == Source::Memory {
                        "mem_events"
                    } else {
                        "events"
                    },
                ),
            };
            for b in snap.run(&sql, params).await? {
                let route = strs(&b, "route")?;
                let consumer = strs(&b, "consumer")?;
                let t = i64s(&b, "t")?;
                let bucket = i64s(&b, "bucket")?;
                let n = i64s(&b, "n")?;
                let errors = i64s(&b, "errors")?;
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
        Ok(groups.rows(&q.quantiles))
    }

    async fn ready(&self) -> bool {
        self.inner.dir.is_dir()
    }
}
