//! Compacted per-route latency sketches (migration 0004): the upkeep that writes them and the
//! read the latency query makes of them.
//!
//! Once a period (a minute or an hour of one route) has ended, the upkeep reads its buckets from
//! `latency_route_1m` / `_1h`, encodes them (`sketch::encode`, the Parquet store's byte form) and
//! writes one `route_sketch` row with their total. It writes the row only when that total equals
//! the period's count in `route_count_1m` read *after* the buckets, so a row holds the events the
//! count had then. A query uses a row only when the period's count now still equals the row's
//! total; every other period (not compacted yet, or changed by late events since) is answered
//! from its buckets, in the same answer. Counts only grow, so a row that matches the current
//! count holds the current events: answers are the same whether or not, and whenever,
//! compaction ran (the conformance suite checks both).
//!
//! Each collector runs the upkeep. Two collectors compacting the same period write the same row
//! twice; the table's merges fold such rows into one and a query uses one of them. A round in
//! which nothing changed costs two small reads (the counts and the sketches' totals of the look-
//! back window, a few thousand rows a day per route).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio_util::sync::CancellationToken;

use super::{ClickHouseStore, ch_err};
use crate::StoreError;
use crate::merge::LatencyGroups;
use crate::sketch;
use crate::time::{DAY_US, HOUR_US, MINUTE_US};

/// How often the upkeep looks for periods to compact.
const COMPACT_EVERY: Duration = Duration::from_secs(10);
/// How far back it looks: late events older than this leave their periods to the bucket
/// rollups (still exact, only slower to read).
const LOOKBACK_US: i64 = 7 * DAY_US;
/// How long after a period ends it is compacted: events still in flight land first.
const SETTLE_US: i64 = MINUTE_US;
/// At most this many periods per grain and round (the newest first): a first round over a
/// week of many routes is spread over several.
const MAX_PERIODS_PER_ROUND: usize = 20_000;
/// Buckets of the periods to read are fetched in time runs; a gap of more than this many
/// periods between two of them starts a new run.
const RUN_GAP_PERIODS: i64 = 60;

/// The grains that get compacted sketches, with the bucket rollup each is built from and its
/// time column.
const GRAINS: [(i64, &str, &str); 2] = [
    (MINUTE_US, "latency_route_1m", "minute_us"),
    (HOUR_US, "latency_route_1h", "hour_us"),
];

/// A route and the start of one of its periods.
type Period = (String, i64);

#[derive(clickhouse::Row, Deserialize)]
struct PeriodCount {
    route_key: String,
    t_us: i64,
    n: u64,
}

#[derive(clickhouse::Row, Deserialize)]
struct SketchTotal {
    route_key: String,
    t_us: i64,
    n: u64,
}

#[derive(clickhouse::Row, Deserialize)]
struct StoredSketch {
    route_key: String,
    t_us: i64,
    n: u64,
    errors: u64,
    #[serde(deserialize_with = "byte_string")]
    sketch: Vec<u8>,
}

#[derive(clickhouse::Row, Deserialize)]
struct StoredQuantiles {
    route_key: String,
    t_us: i64,
    n: u64,
    errors: u64,
    quantile_buckets: Vec<i32>,
}

#[derive(clickhouse::Row, Serialize)]
struct NewSketch<'a> {
    grain_us: i64,
    route_key: &'a str,
    t_us: i64,
    n: u64,
    errors: u64,
    #[serde(serialize_with = "as_byte_string")]
    sketch: &'a [u8],
    quantile_buckets: &'a [i32],
}

#[derive(clickhouse::Row, Deserialize)]
struct PeriodBuckets {
    route_key: String,
    t_us: i64,
    buckets: Vec<i32>,
    counts: Vec<u64>,
    errors: u64,
}

/// A `String` column holding bytes (RowBinary writes a String as its length and bytes).
fn as_byte_string<S: Serializer>(v: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(v)
}

fn byte_string<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct Bytes;
    impl serde::de::Visitor<'_> for Bytes {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
    d.deserialize_byte_buf(Bytes)
}

/// `[from, to)` shrunk to whole periods of `grain`.
fn whole_periods(from: i64, to: i64, grain: i64) -> (i64, i64) {
    let start = from.div_euclid(grain) * grain;
    let start = if start < from { start + grain } else { start };
    (start, to.div_euclid(grain) * grain)
}

/// ` AND route_key = ?` when one route is asked (bound by [`ClickHouseStore::window_query`]).
fn route_cond(route: Option<&str>) -> &'static str {
    if route.is_some() {
        " AND route_key = ?"
    } else {
        ""
    }
}

impl ClickHouseStore {
    /// `sql` (with `?` for the window's start and end, then [`route_cond`]'s route) with its
    /// values bound.
    fn window_query(
        &self,
        sql: &str,
        (from, to): (i64, i64),
        route: Option<&str>,
    ) -> clickhouse::query::Query {
        let q = self.client.query(sql).bind(from).bind(to);
        match route {
            Some(r) => q.bind(r),
            None => q,
        }
    }

    /// Where compacted sketches can exist: from where both the per-route rollups (0003) and
    /// the counts (0004) start.
    pub(super) fn sketches_since(&self) -> i64 {
        self.coarse_since_us.max(self.sketch_since_us)
    }

    /// The event count of every period of `grain` in `[from, to)` (aligned), of one route or
    /// all.
    async fn period_counts(
        &self,
        grain: i64,
        from: i64,
        to: i64,
        route: Option<&str>,
    ) -> Result<HashMap<Period, u64>, StoreError> {
        let q = self.window_query(
            &format!(
                "SELECT route_key, intDiv(minute_us, {grain}) * {grain} AS t_us, sum(n) AS n \
                 FROM {} WHERE minute_us >= ? AND minute_us < ?{} GROUP BY route_key, t_us",
                self.table("route_count_1m"),
                route_cond(route)
            ),
            (from, to),
            route,
        );
        let rows = q.fetch_all::<PeriodCount>().await.map_err(ch_err)?;
        Ok(rows
            .into_iter()
            .map(|r| ((r.route_key, r.t_us), r.n))
            .collect())
    }

    /// The buckets of `periods` (of `grain`), read in time runs; one row per period, in which a
    /// bucket repeats when the rollup's parts are not merged yet. (Summing per bucket in the
    /// server instead costs a hash table of every distinct bucket: 1.2 s instead of 0.2 s for a
    /// day of 5,760 route-minutes on 18.16.)
    async fn period_buckets(
        &self,
        grain: i64,
        periods: &HashSet<Period>,
        route: Option<&str>,
    ) -> Result<Vec<PeriodBuckets>, StoreError> {
        let (_, table, time) = GRAINS
            .iter()
            .find(|(g, _, _)| *g == grain)
            .copied()
            .ok_or_else(|| StoreError::BadRequest(format!("no sketches of grain {grain}")))?;
        let mut starts: Vec<i64> = periods.iter().map(|(_, t)| *t).collect();
        starts.sort_unstable();
        starts.dedup();
        let mut runs: Vec<(i64, i64)> = Vec::new();
        for t in starts {
            match runs.last_mut() {
                Some((_, end)) if t - *end <= RUN_GAP_PERIODS * grain => *end = t + grain,
                _ => runs.push((t, t + grain)),
            }
        }
        let mut out = Vec::new();
        for (from, to) in runs {
            let q = self.window_query(
                &format!(
                    "SELECT route_key, {time} AS t_us, groupArray(toInt32(bucket)) AS buckets, \
                     groupArray(n) AS counts, sum(errors) AS errors FROM {} \
                     WHERE {time} >= ? AND {time} < ?{} GROUP BY route_key, t_us",
                    self.table(table),
                    route_cond(route)
                ),
                (from, to),
                route,
            );
            let rows = q.fetch_all::<PeriodBuckets>().await.map_err(ch_err)?;
            out.extend(
                rows.into_iter()
                    .filter(|r| periods.contains(&(r.route_key.clone(), r.t_us))),
            );
        }
        Ok(out)
    }

    /// Adds to `groups` (at `point(period start)`) every period of `grain` in `[from, to)`:
    /// its compacted sketch when that is current, else its buckets. When each period is a point
    /// of its own and every asked level is one of `sketch::STANDARD_LEVELS`, a current period
    /// is added as its precomputed quantiles instead of its sketch. `[from, to)` is aligned to
    /// `grain` and starts at or after [`sketches_since`](Self::sketches_since).
    pub(super) async fn add_route_periods(
        &self,
        groups: &mut LatencyGroups,
        (grain, from, to): (i64, i64, i64),
        route: Option<&str>,
        point: &(impl Fn(i64) -> i64 + Sync),
        precomputed: Option<&[usize]>,
    ) -> Result<(), StoreError> {
        let columns = match precomputed {
            Some(_) => "quantile_buckets",
            None => "sketch",
        };
        let query = || {
            self.window_query(
                &format!(
                    "SELECT route_key, t_us, n, errors, {columns} FROM {} \
                     WHERE grain_us = {grain} AND t_us >= ? AND t_us < ?{}",
                    self.table("route_sketch"),
                    route_cond(route)
                ),
                (from, to),
                route,
            )
        };
        let counts = self.period_counts(grain, from, to, route);
        // `remove`: of two copies of one period's row, one is used.
        let pending = match precomputed {
            Some(levels) => {
                let (mut pending, rows) = tokio::try_join!(counts, async {
                    query().fetch_all::<StoredQuantiles>().await.map_err(ch_err)
                })?;
                for s in rows {
                    let key = (s.route_key, s.t_us);
                    if pending.get(&key) == Some(&s.n) {
                        pending.remove(&key);
                        let buckets = levels
                            .iter()
                            .map(|i| s.quantile_buckets.get(*i).copied())
                            .collect::<Option<Vec<i32>>>()
                            .ok_or_else(|| {
                                StoreError::Corrupt(format!(
                                    "route_sketch of {} at {} lacks quantile buckets",
                                    key.0, key.1
                                ))
                            })?;
                        groups.add_answered(&key.0, None, point(key.1), (s.n, s.errors), buckets);
                    }
                }
                pending
            }
            None => {
                let (mut pending, rows) = tokio::try_join!(counts, async {
                    query().fetch_all::<StoredSketch>().await.map_err(ch_err)
                })?;
                for s in rows {
                    let key = (s.route_key, s.t_us);
                    if pending.get(&key) == Some(&s.n) {
                        pending.remove(&key);
                        groups.add_encoded_owned(&key.0, None, point(key.1), s.errors, s.sketch);
                    }
                }
                pending
            }
        };
        if pending.is_empty() {
            return Ok(());
        }
        let periods: HashSet<Period> = pending.into_keys().collect();
        for p in self.period_buckets(grain, &periods, route).await? {
            groups.add_pairs(
                &p.route_key,
                None,
                point(p.t_us),
                p.errors,
                p.buckets.into_iter().zip(p.counts),
            );
        }
        Ok(())
    }

    /// Writes the sketch of every period in `[from, to)` (whole minutes and hours) whose
    /// compacted sketch is missing or no longer matches its count, the newest first and at most
    /// [`MAX_PERIODS_PER_ROUND`] per grain. Returns how many it wrote.
    pub async fn compact_sketches(&self, from: i64, to: i64) -> Result<usize, StoreError> {
        let mut written = 0;
        for (grain, _, _) in GRAINS {
            let (from, to) = whole_periods(from.max(self.sketches_since()), to, grain);
            if from >= to {
                continue;
            }
            let totals = async {
                self.client
                    .query(&format!(
                        "SELECT route_key, t_us, n FROM {} \
                         WHERE grain_us = {grain} AND t_us >= ? AND t_us < ?",
                        self.table("route_sketch")
                    ))
                    .bind(from)
                    .bind(to)
                    .fetch_all::<SketchTotal>()
                    .await
                    .map_err(ch_err)
            };
            let (counts, totals) =
                tokio::try_join!(self.period_counts(grain, from, to, None), totals)?;
            let current: HashSet<(String, i64, u64)> = totals
                .into_iter()
                .map(|s| (s.route_key, s.t_us, s.n))
                .collect();
            let mut stale: Vec<Period> = counts
                .into_iter()
                .filter(|((r, t), n)| !current.contains(&(r.clone(), *t, *n)))
                .map(|(p, _)| p)
                .collect();
            if stale.is_empty() {
                continue;
            }
            stale.sort_unstable_by_key(|(_, t)| std::cmp::Reverse(*t));
            stale.truncate(MAX_PERIODS_PER_ROUND);
            let (lo, hi) = stale.iter().fold((i64::MAX, i64::MIN), |(lo, hi), (_, t)| {
                (lo.min(*t), hi.max(*t))
            });
            let stale: HashSet<Period> = stale.into_iter().collect();
            let buckets = self.period_buckets(grain, &stale, None).await?;
            // Counted after the buckets were read: a sketch is written only when it holds
            // exactly the events counted.
            let after = self.period_counts(grain, lo, hi + grain, None).await?;
            let mut rows = Vec::with_capacity(buckets.len());
            for p in buckets {
                let mut pairs: Vec<(i32, u64)> = p.buckets.into_iter().zip(p.counts).collect();
                pairs.sort_unstable();
                pairs.dedup_by(|later, kept| {
                    let same = later.0 == kept.0;
                    if same {
                        kept.1 += later.1;
                    }
                    same
                });
                let n: u64 = pairs.iter().map(|(_, c)| c).sum();
                if after.get(&(p.route_key.clone(), p.t_us)) == Some(&n) {
                    let bytes = sketch::encode(pairs.iter().copied());
                    let quantiles = sketch::STANDARD_LEVELS
                        .iter()
                        .map(|q| sketch::nearest_rank(&pairs, n, *q).unwrap_or_default())
                        .collect::<Vec<i32>>();
                    rows.push((p.route_key, p.t_us, n, p.errors, bytes, quantiles));
                }
            }
            if rows.is_empty() {
                continue;
            }
            let mut insert = self
                .client
                .insert::<NewSketch<'_>>("route_sketch")
                .await
                .map_err(ch_err)?;
            for (route_key, t_us, n, errors, bytes, quantiles) in &rows {
                insert
                    .write(&NewSketch {
                        grain_us: grain,
                        route_key,
                        t_us: *t_us,
                        n: *n,
                        errors: *errors,
                        sketch: bytes,
                        quantile_buckets: quantiles,
                    })
                    .await
                    .map_err(ch_err)?;
            }
            insert.end().await.map_err(ch_err)?;
            written += rows.len();
        }
        Ok(written)
    }

    /// The upkeep: compacts the periods of the last [`LOOKBACK_US`] that ended at least
    /// [`SETTLE_US`] ago, every [`COMPACT_EVERY`], until `stop`. Failures are logged and the
    /// round is tried again: queries stay exact without it.
    pub(super) async fn compact_every(self, stop: CancellationToken) {
        loop {
            let now = chrono::Utc::now().timestamp_micros();
            match self
                .compact_sketches(now - LOOKBACK_US, now - SETTLE_US)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!(periods = n, "compacted latency sketches"),
                Err(e) => {
                    tracing::warn!(error = %e, "compacting latency sketches failed; retrying")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(COMPACT_EVERY) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_periods_round_inwards() {
        assert_eq!(
            whole_periods(0, 3 * MINUTE_US, MINUTE_US),
            (0, 3 * MINUTE_US)
        );
        assert_eq!(
            whole_periods(1, 3 * MINUTE_US - 1, MINUTE_US),
            (MINUTE_US, 2 * MINUTE_US)
        );
        assert_eq!(whole_periods(5, HOUR_US - 1, HOUR_US), (HOUR_US, 0));
    }
}
