//! `UsageQuery` over ClickHouse: whole minutes of a window from the per-minute rollups, the
//! partial minutes at its edges from the raw table, summed here. The store returns the same
//! primitives as every backend (exact counts, sketch buckets); filters are bound parameters.

use async_trait::async_trait;
use serde::Deserialize;

use super::{ClickHouseStore, ch_err};
use crate::merge::{LatencyGroups, UsageSums};
use crate::time::{DAY_US, MINUTE_US, split_minutes};
use crate::{
    Filter, GroupKey, KeyValue, LatencyQuery, LatencyRow, StoreError, UsageQuery, UsageRow,
    day_string,
};

/// Which table a part of the window is read from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Raw,
    Rollup,
}

impl Source {
    fn time_column(self) -> &'static str {
        match self {
            Source::Raw => "ts_us",
            Source::Rollup => "minute_us",
        }
    }

    /// A text-valued key expression ('' for null).
    fn key(self, k: GroupKey) -> String {
        let t = self.time_column();
        match (self, k) {
            (Source::Raw, GroupKey::Consumer) => "ifNull(consumer, '')".into(),
            (Source::Raw, GroupKey::Route) => "ifNull(route, '')".into(),
            (Source::Raw, GroupKey::Plan) => "ifNull(plan, '')".into(),
            (Source::Raw, GroupKey::Status) => "toString(status)".into(),
            (Source::Rollup, GroupKey::Consumer) => "consumer_key".into(),
            (Source::Rollup, GroupKey::Route) => "route_key".into(),
            (Source::Rollup, GroupKey::Plan) => "plan_key".into(),
            (Source::Rollup, GroupKey::Status) => "toString(status_code)".into(),
            (_, GroupKey::Day) => format!("toString(intDiv({t}, {DAY_US}))"),
        }
    }

    /// `WHERE` conditions for the filter's consumer and route.
    fn filters(self, f: &Filter) -> (String, Vec<String>) {
        let mut sql = String::new();
        let mut binds = Vec::new();
        let (consumer, route) = match self {
            Source::Raw => ("consumer", "route"),
            Source::Rollup => ("consumer_key", "route_key"),
        };
        for (col, v) in [(consumer, &f.consumer), (route, &f.route)] {
            if let Some(v) = v {
                sql.push_str(&format!(" AND {col} = ?"));
                binds.push(v.clone());
            }
        }
        (sql, binds)
    }
}

#[derive(clickhouse::Row, Deserialize)]
struct UsageRowSums {
    keys: Vec<String>,
    requests_n: u64,
    billable_n: u64,
    req_bytes_n: u64,
    resp_bytes_n: u64,
}

#[derive(clickhouse::Row, Deserialize)]
struct LatencyBucket {
    route_k: String,
    consumer_k: String,
    t_us: i64,
    bucket_k: i32,
    count_n: u64,
    errors_n: u64,
}

/// The parts of `[from, to)` and where each is read from. A rollup can answer a part only when
/// time buckets never cut a minute (`step` a whole number of minutes, or no step).
fn parts(from: i64, to: i64, step: Option<i64>) -> Vec<(Source, i64, i64)> {
    let rollup_ok = step.is_none_or(|s| s % MINUTE_US == 0);
    if !rollup_ok {
        return if from < to {
            vec![(Source::Raw, from, to)]
        } else {
            vec![]
        };
    }
    let (head, body, tail) = split_minutes(from, to);
    let mut out = Vec::new();
    out.extend(head.map(|(a, b)| (Source::Raw, a, b)));
    out.extend(body.map(|(a, b)| (Source::Rollup, a, b)));
    out.extend(tail.map(|(a, b)| (Source::Raw, a, b)));
    out
}

fn key_value(k: GroupKey, s: &str) -> KeyValue {
    if s.is_empty() {
        return KeyValue::Null;
    }
    match k {
        GroupKey::Day => s
            .parse()
            .map(|d| KeyValue::Text(day_string(d)))
            .unwrap_or(KeyValue::Null),
        GroupKey::Status => s.parse().map(KeyValue::Int).unwrap_or(KeyValue::Null),
        _ => KeyValue::Text(s.to_string()),
    }
}

impl ClickHouseStore {
    async fn usage_part(
        &self,
        source: Source,
        from: i64,
        to: i64,
        filter: &Filter,
        group_by: &[GroupKey],
    ) -> Result<Vec<UsageRowSums>, StoreError> {
        let keys = if group_by.is_empty() {
            "emptyArrayString()".to_string()
        } else {
            let k: Vec<String> = group_by.iter().map(|k| source.key(*k)).collect();
            format!("[{}]", k.join(", "))
        };
        let (table, sums) = match source {
            Source::Raw => (
                self.table("events"),
                "count() AS requests_n, sum(toUInt64(billable)) AS billable_n, \
                 sum(req_bytes) AS req_bytes_n, sum(resp_bytes) AS resp_bytes_n",
            ),
            Source::Rollup => (
                self.table("usage_1m"),
                "sum(requests) AS requests_n, sum(billable_requests) AS billable_n, \
                 sum(req_bytes_total) AS req_bytes_n, sum(resp_bytes_total) AS resp_bytes_n",
            ),
        };
        let t = source.time_column();
        let (cond, binds) = source.filters(filter);
        let group = if group_by.is_empty() {
            ""
        } else {
            " GROUP BY keys"
        };
        let sql = format!(
            "SELECT {keys} AS keys, {sums} FROM {table} WHERE {t} >= ? AND {t} < ?{cond}{group}"
        );
        let mut q = self.client.query(&sql).bind(from).bind(to);
        for b in binds {
            q = q.bind(b);
        }
        q.fetch_all::<UsageRowSums>().await.map_err(ch_err)
    }

    async fn latency_part(
        &self,
        source: Source,
        from: i64,
        to: i64,
        q: &LatencyQuery,
    ) -> Result<Vec<LatencyBucket>, StoreError> {
        let t = source.time_column();
        let bucket_t = match q.step_us {
            Some(step) => format!("intDiv({t}, {step}) * {step}"),
            None => format!("toInt64({})", q.filter.from_us),
        };
        let (route, consumer, table, bucket, n, errors, forwarded) = match source {
            Source::Raw => (
                "ifNull(route, '')",
                "ifNull(consumer, '')",
                self.table("events"),
                "toInt32(latency_bucket)",
                "count()",
                "sum(toUInt64(status >= 500))",
                " AND isNotNull(route) AND isNotNull(upstream_latency_us)",
            ),
            Source::Rollup => (
                "route_key",
                "consumer_key",
                self.table("latency_1m"),
                "toInt32(bucket)",
                "sum(n)",
                "sum(errors)",
                "",
            ),
        };
        let consumer = if q.by_consumer { consumer } else { "''" };
        let (cond, binds) = source.filters(&q.filter);
        let sql = format!(
            "SELECT {route} AS route_k, {consumer} AS consumer_k, {bucket_t} AS t_us, \
             {bucket} AS bucket_k, {n} AS count_n, {errors} AS errors_n \
             FROM {table} WHERE {t} >= ? AND {t} < ?{forwarded}{cond} \
             GROUP BY route_k, consumer_k, t_us, bucket_k"
        );
        let mut query = self.client.query(&sql).bind(from).bind(to);
        for b in binds {
            query = query.bind(b);
        }
        query.fetch_all::<LatencyBucket>().await.map_err(ch_err)
    }
}

#[async_trait]
impl UsageQuery for ClickHouseStore {
    async fn usage(
        &self,
        filter: &Filter,
        group_by: &[GroupKey],
    ) -> Result<Vec<UsageRow>, StoreError> {
        let mut sums = UsageSums::default();
        for (source, from, to) in parts(filter.from_us, filter.to_us, None) {
            for row in self.usage_part(source, from, to, filter, group_by).await? {
                if row.requests_n == 0 {
                    continue; // an aggregate over no rows (no GROUP BY)
                }
                let keys = group_by
                    .iter()
                    .zip(&row.keys)
                    .map(|(k, v)| key_value(*k, v))
                    .collect();
                sums.add(
                    keys,
                    row.requests_n,
                    row.billable_n,
                    row.req_bytes_n,
                    row.resp_bytes_n,
                );
            }
        }
        Ok(sums.rows())
    }

    async fn latency(&self, q: &LatencyQuery) -> Result<Vec<LatencyRow>, StoreError> {
        if q.step_us.is_some_and(|s| s <= 0) {
            return Err(StoreError::BadRequest("step must be positive".into()));
        }
        let mut groups = LatencyGroups::default();
        for (source, from, to) in parts(q.filter.from_us, q.filter.to_us, q.step_us) {
            for b in self.latency_part(source, from, to, q).await? {
                let consumer = (!b.consumer_k.is_empty()).then_some(b.consumer_k);
                groups.add(
                    b.route_k, consumer, b.t_us, b.bucket_k, b.count_n, b.errors_n,
                );
            }
        }
        Ok(groups.rows())
    }

    async fn ready(&self) -> bool {
        self.client.query("SELECT 1").execute().await.is_ok()
    }
}
