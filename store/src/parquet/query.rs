//! `UsageQuery` over the embedded store: a snapshot of the Parquet files that overlap the window
//! plus the in-memory batches, registered as one `events` table and queried with DataFusion SQL.
//! Window bounds and filters are bound as typed parameters, never spliced into the SQL.

use async_trait::async_trait;
use datafusion::arrow::array::{Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};

use super::ParquetStore;
use crate::sketch::{LogHistogram, ln_gamma};
use crate::{
    Filter, GroupKey, KeyValue, LatencyQuery, LatencyRow, StoreError, UsageQuery, UsageRow,
    day_string,
};

/// SQL expression of each group key.
fn key_expr(k: GroupKey) -> &'static str {
    match k {
        GroupKey::Consumer => "consumer",
        GroupKey::Route => "route",
        GroupKey::Plan => "plan",
        GroupKey::Status => "CAST(status AS BIGINT)",
        GroupKey::Day => "CAST(ts AS BIGINT) / 86400000000",
    }
}

/// `WHERE` clause and its parameters for a filter.
fn where_clause(f: &Filter) -> (String, Vec<ScalarValue>) {
    let ts = |v| ScalarValue::TimestampMicrosecond(Some(v), Some("UTC".into()));
    let mut params = vec![ts(f.from_us), ts(f.to_us)];
    let mut sql = "ts >= $1 AND ts < $2".to_string();
    for (col, value) in [("consumer", &f.consumer), ("route", &f.route)] {
        if let Some(v) = value {
            params.push(ScalarValue::Utf8(Some(v.clone())));
            sql.push_str(&format!(" AND {col} = ${}", params.len()));
        }
    }
    (sql, params)
}

impl ParquetStore {
    /// A DataFusion context whose `events` table is the snapshot relevant to `[from, to)`.
    async fn context(&self, from_us: i64, to_us: i64) -> Result<SessionContext, StoreError> {
        let (paths, mem) = {
            let state = self.read_state();
            let paths: Vec<String> = state
                .manifest
                .files
                .iter()
                .filter(|f| f.max_ts_us >= from_us && f.min_ts_us < to_us)
                .map(|f| self.inner.dir.join(&f.path).display().to_string())
                .collect();
            let mem: Vec<RecordBatch> = state.mem.iter().map(|(b, _)| b.clone()).collect();
            (paths, mem)
        };
        let config = SessionConfig::new()
            .with_target_partitions(2)
            .with_information_schema(false);
        let ctx = SessionContext::new_with_config(config);
        let schema = tollgate_schemas::arrow::schema();
        let mut df = ctx.read_batches(mem)?;
        if df.schema().fields().is_empty() {
            df = ctx.read_batch(RecordBatch::new_empty(schema.clone()))?;
        }
        if !paths.is_empty() {
            let files = ctx
                .read_parquet(paths, ParquetReadOptions::default().schema(&schema))
                .await?;
            df = files.union(df)?;
        }
        ctx.register_table("events", df.into_view())?;
        Ok(ctx)
    }

    async fn run(
        &self,
        f: &Filter,
        sql: &str,
        params: Vec<ScalarValue>,
    ) -> Result<Vec<RecordBatch>, StoreError> {
        let ctx = self.context(f.from_us, f.to_us).await?;
        let df = ctx.sql(sql).await?.with_param_values(params)?;
        Ok(df.collect().await?)
    }
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
        let (cond, params) = where_clause(filter);
        let keys: Vec<String> = group_by
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{} AS k{i}", key_expr(*k)))
            .collect();
        let group: Vec<&str> = group_by.iter().map(|k| key_expr(*k)).collect();
        let mut select = keys.join(", ");
        if !select.is_empty() {
            select.push_str(", ");
        }
        let sql = format!(
            "SELECT {select}COUNT(*) AS requests, \
             SUM(CASE WHEN billable THEN 1 ELSE 0 END) AS billable_requests, \
             SUM(CAST(req_bytes AS BIGINT)) AS req_bytes, SUM(CAST(resp_bytes AS BIGINT)) AS resp_bytes \
             FROM events WHERE {cond}{}",
            if group.is_empty() {
                String::new()
            } else {
                format!(" GROUP BY {}", group.join(", "))
            }
        );
        let mut rows = Vec::new();
        for b in self.run(filter, &sql, params).await? {
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
                    .map(|(k, col)| {
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
                    })
                    .collect();
                rows.push(UsageRow {
                    keys,
                    requests: nonneg(&requests, i),
                    billable_requests: nonneg(&billable, i),
                    req_bytes: nonneg(&req, i),
                    resp_bytes: nonneg(&resp, i),
                });
            }
        }
        rows.sort();
        Ok(rows)
    }

    async fn latency(&self, q: &LatencyQuery) -> Result<Vec<LatencyRow>, StoreError> {
        let (cond, params) = where_clause(&q.filter);
        let t = match q.step_us {
            Some(step) if step > 0 => format!("(CAST(ts AS BIGINT) / {step}) * {step}"),
            Some(_) => return Err(StoreError::BadRequest("step must be positive".into())),
            None => format!("CAST({} AS BIGINT)", q.filter.from_us),
        };
        let consumer = if q.by_consumer {
            "consumer"
        } else {
            "CAST(NULL AS VARCHAR)"
        };
        let bucket = format!(
            "CAST(ceil(ln(CAST(CASE WHEN latency_us < 1 THEN 1 ELSE latency_us END AS DOUBLE)) / {:.17}) AS BIGINT)",
            ln_gamma()
        );
        let sql = format!(
            "SELECT route, {consumer} AS consumer, {t} AS t, {bucket} AS bucket, COUNT(*) AS n, \
             SUM(CASE WHEN status >= 500 THEN 1 ELSE 0 END) AS errors \
             FROM events WHERE {cond} AND route IS NOT NULL AND upstream_latency_us IS NOT NULL \
             GROUP BY 1, 2, 3, 4"
        );
        let mut groups: std::collections::BTreeMap<
            (String, Option<String>, i64),
            (u64, LogHistogram),
        > = Default::default();
        for b in self.run(&q.filter, &sql, params).await? {
            let route = strs(&b, "route")?;
            let consumer = strs(&b, "consumer")?;
            let t = i64s(&b, "t")?;
            let bucket = i64s(&b, "bucket")?;
            let n = i64s(&b, "n")?;
            let errors = i64s(&b, "errors")?;
            for i in 0..b.num_rows() {
                let key = (
                    route.value(i).to_string(),
                    consumer.is_valid(i).then(|| consumer.value(i).to_string()),
                    t.value(i),
                );
                let g = groups.entry(key).or_default();
                g.0 += nonneg(&errors, i);
                g.1.add_bucket(bucket.value(i) as i32, nonneg(&n, i));
            }
        }
        Ok(groups
            .into_iter()
            .map(
                |((route, consumer, t_us), (errors, histogram))| LatencyRow {
                    route,
                    consumer,
                    t_us,
                    errors,
                    histogram,
                },
            )
            .collect())
    }

    async fn ready(&self) -> bool {
        self.inner.dir.is_dir()
    }
}
