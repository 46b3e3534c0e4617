//! `UsageQuery` over ClickHouse. A window is cut into parts (`time::plan`): aligned days, hours
//! and minutes from the rollups, the partial minutes at its edges from the raw table. Usage
//! parts go to the server as one `UNION ALL`, summed there.
//!
//! Latency per route merges, here, the compacted sketch of each whole minute or hour that has a
//! current one (`sketches.rs`) with the buckets of everything else (summed per time bucket in
//! the server), and takes quantiles with `merge::LatencyGroups`, the code the Parquet store
//! uses. Latency per consumer is computed in the server with `quantilesExactWeighted` over the
//! sketch buckets (the nearest-rank rule of `sketch::LogHistogram::quantile`: the smallest
//! bucket whose cumulative count reaches `ceil(q·n)`), turned into microseconds here with
//! `sketch::bucket_value`. Either way ClickHouse and the embedded store report the same value
//! for the same events. Filters are bound
//! parameters; only numbers the store produced itself are spliced into the SQL.

use async_trait::async_trait;
use serde::Deserialize;

use super::{ClickHouseStore, ch_err};
use crate::merge::{LatencyGroups, UsageSums};
use crate::sketch::bucket_value;
use crate::time::{DAY_US, Grain, HOUR_US, MINUTE_US, plan};
use crate::{
    Filter, GroupKey, KeyValue, LatencyQuery, LatencyRow, StoreError, UsageQuery, UsageRow,
};

/// Where a part of a window is read from: the raw table or one rollup table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Raw,
    Rollup {
        table: &'static str,
        time: &'static str,
    },
}

/// A rollup table and its time column.
const fn rollup(table: &'static str, time: &'static str) -> Source {
    Source::Rollup { table, time }
}

impl Source {
    fn time_column(self) -> &'static str {
        match self {
            Source::Raw => "ts_us",
            Source::Rollup { time, .. } => time,
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
            (Source::Rollup { .. }, GroupKey::Consumer) => "consumer_key".into(),
            (Source::Rollup { .. }, GroupKey::Route) => "route_key".into(),
            (Source::Rollup { .. }, GroupKey::Plan) => "plan_key".into(),
            (Source::Rollup { .. }, GroupKey::Status) => "toString(status_code)".into(),
            (_, GroupKey::Day | GroupKey::Hour | GroupKey::Minute) => format!(
                "toString(intDiv({t}, {}))",
                k.period_us().expect("a time key")
            ),
        }
    }

    /// `WHERE` conditions for the filter's consumer and route, with their values.
    fn filters(self, f: &Filter) -> (String, Vec<String>) {
        let mut sql = String::new();
        let mut binds = Vec::new();
        let (consumer, route) = match self {
            Source::Raw => ("consumer", "route"),
            Source::Rollup { .. } => ("consumer_key", "route_key"),
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

/// One time bucket of a route: its sketch buckets and their weights.
#[derive(clickhouse::Row, Deserialize)]
struct RoutePoint {
    route_k: String,
    t_us: i64,
    buckets: Vec<i32>,
    counts: Vec<u64>,
    errors_n: u64,
}

#[derive(clickhouse::Row, Deserialize)]
struct LatencyPoint {
    route_k: String,
    consumer_k: String,
    t_us: i64,
    count_n: u64,
    errors_n: u64,
    buckets: Vec<i32>,
}

fn key_value(k: GroupKey, s: &str) -> KeyValue {
    if s.is_empty() {
        return KeyValue::Null;
    }
    match k {
        GroupKey::Day | GroupKey::Hour | GroupKey::Minute => s
            .parse()
            .map(|units| k.period_value(units))
            .unwrap_or(KeyValue::Null),
        GroupKey::Status => s.parse().map(KeyValue::Int).unwrap_or(KeyValue::Null),
        _ => KeyValue::Text(s.to_string()),
    }
}

/// SQL assembled from parts, with its bound values in order.
#[derive(Default)]
struct Union {
    parts: Vec<String>,
    binds: Vec<Bind>,
}

enum Bind {
    Int(i64),
    Text(String),
}

impl Union {
    fn push(&mut self, sql: String, from: i64, to: i64, filters: Vec<String>) {
        self.parts.push(sql);
        self.binds.push(Bind::Int(from));
        self.binds.push(Bind::Int(to));
        self.binds.extend(filters.into_iter().map(Bind::Text));
    }

    fn query(
        self,
        client: &clickhouse::Client,
        outer: impl FnOnce(&str) -> String,
    ) -> clickhouse::query::Query {
        let inner = self.parts.join(" UNION ALL ");
        let mut q = client.query(&outer(&inner));
        for b in self.binds {
            q = match b {
                Bind::Int(v) => q.bind(v),
                Bind::Text(v) => q.bind(v),
            };
        }
        q
    }
}

impl ClickHouseStore {
    /// A grain of the coarse rollups (migration 0003), which start at `coarse_since_us`.
    fn coarse(&self, size_us: i64) -> Grain {
        Grain {
            size_us,
            since_us: self.coarse_since_us,
        }
    }

    /// The rollup grains for usage, coarse to fine.
    fn usage_grains(&self) -> [(Source, Grain); 3] {
        [
            (rollup("usage_1d", "day_us"), self.coarse(DAY_US)),
            (rollup("usage_1h", "hour_us"), self.coarse(HOUR_US)),
            (rollup("usage_1m", "minute_us"), Grain::always(MINUTE_US)),
        ]
    }

    /// The rollup grains for latency: per route when the consumer is not needed.
    fn latency_grains(&self, q: &LatencyQuery) -> Vec<(Source, Grain)> {
        let mut grains = Vec::new();
        if !q.needs_consumer() {
            grains.push((rollup("latency_route_1h", "hour_us"), self.coarse(HOUR_US)));
            grains.push((
                rollup("latency_route_1m", "minute_us"),
                self.coarse(MINUTE_US),
            ));
        }
        grains.push((rollup("latency_1m", "minute_us"), Grain::always(MINUTE_US)));
        grains.retain(|(_, g)| g.fits_step(q.step_us));
        grains
    }
}

impl ClickHouseStore {
    /// The parts of a latency query as one `UNION ALL` of `(route_k, consumer_k, t_us, b, w,
    /// e)`: the time bucket, the sketch bucket, its weight and 5xx count.
    fn latency_union(&self, q: &LatencyQuery, parts: Vec<(Source, i64, i64)>) -> Union {
        let f = &q.filter;
        let mut union = Union::default();
        for (source, from, to) in parts {
            let t = source.time_column();
            let bucket_t = match q.step_us {
                Some(step) => format!("intDiv({t}, {step}) * {step}"),
                None => format!("toInt64({})", f.from_us),
            };
            let by_consumer = |c: &'static str| if q.by_consumer { c } else { "''" };
            let (route, consumer, table, bucket, n, errors, forwarded) = match source {
                Source::Raw => (
                    "ifNull(route, '')",
                    by_consumer("ifNull(consumer, '')"),
                    self.table("events"),
                    "latency_bucket",
                    "toUInt64(1)",
                    "toUInt64(status >= 500)",
                    " AND isNotNull(route) AND isNotNull(upstream_latency_us)",
                ),
                Source::Rollup { table, .. } => (
                    "route_key",
                    by_consumer("consumer_key"),
                    self.table(table),
                    "bucket",
                    "n",
                    "errors",
                    "",
                ),
            };
            let (cond, binds) = source.filters(f);
            union.push(
                format!(
                    "SELECT {route} AS route_k, {consumer} AS consumer_k, {bucket_t} AS t_us, \
                     toInt32({bucket}) AS b, {n} AS w, {errors} AS e \
                     FROM {table} WHERE {t} >= ? AND {t} < ?{forwarded}{cond}"
                ),
                from,
                to,
                binds,
            );
        }
        union
    }

    /// Latency with the quantiles computed in the server, for queries that need the consumer
    /// (the per-consumer rollup has no compacted sketches).
    async fn latency_in_server(&self, q: &LatencyQuery) -> Result<Vec<LatencyRow>, StoreError> {
        let f = &q.filter;
        let union = self.latency_union(q, parts(f.from_us, f.to_us, &self.latency_grains(q)));
        if union.parts.is_empty() {
            return Ok(Vec::new());
        }
        let levels: Vec<String> = q.quantiles.iter().map(|l| format!("{l:?}")).collect();
        let buckets = if levels.is_empty() {
            "emptyArrayInt32()".to_string()
        } else {
            format!("quantilesExactWeighted({})(b, w)", levels.join(", "))
        };
        let points = union
            .query(&self.client, |inner| {
                format!(
                    "SELECT route_k, consumer_k, t_us, sum(w) AS count_n, sum(e) AS errors_n, \
                     {buckets} AS buckets FROM ({inner}) WHERE w > 0 \
                     GROUP BY route_k, consumer_k, t_us ORDER BY route_k, consumer_k, t_us"
                )
            })
            .fetch_all::<LatencyPoint>()
            .await
            .map_err(ch_err)?;
        Ok(points
            .into_iter()
            .map(|p| LatencyRow {
                route: p.route_k,
                consumer: (!p.consumer_k.is_empty()).then_some(p.consumer_k),
                t_us: p.t_us,
                count: p.count_n,
                errors: p.errors_n,
                quantiles_us: p.buckets.into_iter().map(bucket_value).collect(),
            })
            .collect())
    }
}

/// The parts of `[from, to)` with the source each is read from.
fn parts(from: i64, to: i64, grains: &[(Source, Grain)]) -> Vec<(Source, i64, i64)> {
    let g: Vec<Grain> = grains.iter().map(|(_, g)| *g).collect();
    plan(from, to, &g)
        .into_iter()
        .map(|(i, a, b)| (i.map_or(Source::Raw, |i| grains[i].0), a, b))
        .collect()
}

#[async_trait]
impl UsageQuery for ClickHouseStore {
    async fn usage(
        &self,
        filter: &Filter,
        group_by: &[GroupKey],
    ) -> Result<Vec<UsageRow>, StoreError> {
        let mut union = Union::default();
        // A rollup coarser than the finest time key cannot be cut into its periods.
        let step = GroupKey::finest_period(group_by);
        let mut grains = self.usage_grains().to_vec();
        grains.retain(|(_, g)| g.fits_step(step));
        for (source, from, to) in parts(filter.from_us, filter.to_us, &grains) {
            let keys = if group_by.is_empty() {
                "emptyArrayString()".to_string()
            } else {
                let k: Vec<String> = group_by.iter().map(|k| source.key(*k)).collect();
                format!("[{}]", k.join(", "))
            };
            let (table, sums) = match source {
                Source::Raw => (
                    self.table("events"),
                    "toUInt64(1) AS r, toUInt64(billable) AS bl, toUInt64(req_bytes) AS rq, \
                     toUInt64(resp_bytes) AS rs",
                ),
                Source::Rollup { table, .. } => (
                    self.table(table),
                    "requests AS r, billable_requests AS bl, req_bytes_total AS rq, \
                     resp_bytes_total AS rs",
                ),
            };
            let t = source.time_column();
            let (cond, binds) = source.filters(filter);
            union.push(
                format!(
                    "SELECT {keys} AS keys, {sums} FROM {table} WHERE {t} >= ? AND {t} < ?{cond}"
                ),
                from,
                to,
                binds,
            );
        }
        if union.parts.is_empty() {
            return Ok(Vec::new());
        }
        let rows = union
            .query(&self.client, |inner| {
                format!(
                    "SELECT keys, sum(r) AS requests_n, sum(bl) AS billable_n, sum(rq) AS req_bytes_n, \
                     sum(rs) AS resp_bytes_n FROM ({inner}) GROUP BY keys"
                )
            })
            .fetch_all::<UsageRowSums>()
            .await
            .map_err(ch_err)?;
        let mut sums = UsageSums::default();
        for row in rows {
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
        Ok(sums.rows())
    }

    async fn latency(&self, q: &LatencyQuery) -> Result<Vec<LatencyRow>, StoreError> {
        q.validate()?;
        if q.needs_consumer() {
            return self.latency_in_server(q).await;
        }
        // Per route: compacted sketches where current, buckets elsewhere, merged here.
        let f = &q.filter;
        let point = |t: i64| {
            q.step_us
                .map_or(f.from_us, |step| t.div_euclid(step) * step)
        };
        let since = self.sketches_since();
        let levels = crate::sketch::standard_positions(&q.quantiles);
        let mut groups = LatencyGroups::default();
        let mut rest = Vec::new();
        for (source, from, to) in parts(f.from_us, f.to_us, &self.latency_grains(q)) {
            let grain = match source {
                Source::Rollup {
                    table: "latency_route_1m",
                    ..
                } => Some(MINUTE_US),
                Source::Rollup {
                    table: "latency_route_1h",
                    ..
                } => Some(HOUR_US),
                _ => None,
            };
            match grain {
                // `since` is a UTC midnight (or 0): cutting there keeps both sides aligned.
                Some(grain) if to > since => {
                    let cut = from.max(since);
                    if from < cut {
                        rest.push((source, from, cut));
                    }
                    // Each period its own point: precomputed quantiles may answer it.
                    let precomputed = levels.as_deref().filter(|_| q.step_us == Some(grain));
                    self.add_route_periods(
                        &mut groups,
                        (grain, cut, to),
                        f.route.as_deref(),
                        &point,
                        precomputed,
                    )
                    .await?;
                }
                _ => rest.push((source, from, to)),
            }
        }
        if !rest.is_empty() {
            let rows = self
                .latency_union(q, rest)
                .query(&self.client, |inner| {
                    format!(
                        "SELECT route_k, t_us, groupArray(b) AS buckets, groupArray(w) AS counts, \
                         sum(e) AS errors_n FROM ({inner}) WHERE w > 0 GROUP BY route_k, t_us"
                    )
                })
                .fetch_all::<RoutePoint>()
                .await
                .map_err(ch_err)?;
            for p in rows {
                groups.add_pairs(
                    &p.route_k,
                    None,
                    p.t_us,
                    p.errors_n,
                    p.buckets.into_iter().zip(p.counts),
                );
            }
        }
        groups
            .rows(&q.quantiles)
            .map_err(|e| StoreError::Corrupt(format!("latency sketch: {e}")))
    }

    async fn ready(&self) -> bool {
        self.client.query("SELECT 1").execute().await.is_ok()
    }

    async fn progress(&self) -> Result<Vec<crate::PartitionProgress>, StoreError> {
        self.read_progress().await
    }

    async fn publish_export(
        &self,
        export: &crate::StoredExport,
    ) -> Result<crate::StoredExport, StoreError> {
        self.insert_export(export).await
    }

    async fn published_export(
        &self,
        period: &str,
    ) -> Result<Option<crate::StoredExport>, StoreError> {
        self.read_export(period).await
    }

    async fn published_exports(&self) -> Result<Vec<crate::StoredExport>, StoreError> {
        self.list_exports().await
    }
}
