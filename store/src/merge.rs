//! Summing the parts of one answer: a window is read in parts (raw edges, whole minutes from
//! rollups, events not yet flushed), and every backend adds the parts up here, the same way.

use std::collections::{BTreeMap, HashMap};

use crate::sketch::{bucket_value, nearest_rank};
use crate::{KeyValue, LatencyRow, UsageRow};

/// Usage sums by group key values.
#[derive(Debug, Default)]
pub struct UsageSums(BTreeMap<Vec<KeyValue>, [u64; 4]>);

impl UsageSums {
    /// Adds one row of a part.
    pub fn add(&mut self, keys: Vec<KeyValue>, requests: u64, billable: u64, req: u64, resp: u64) {
        let s = self.0.entry(keys).or_default();
        s[0] += requests;
        s[1] += billable;
        s[2] += req;
        s[3] += resp;
    }

    /// The rows, sorted by keys.
    pub fn rows(self) -> Vec<UsageRow> {
        self.0
            .into_iter()
            .map(|(keys, s)| UsageRow {
                keys,
                requests: s[0],
                billable_requests: s[1],
                req_bytes: s[2],
                resp_bytes: s[3],
            })
            .collect()
    }
}

/// Latency sketch buckets by (route, consumer, time bucket), gathered from every part of a
/// window (raw bucket rows and whole per-minute sketches alike) and turned into quantiles once.
#[derive(Debug, Default)]
pub struct LatencyGroups(HashMap<(String, Option<String>, i64), Group>);

#[derive(Debug, Default)]
struct Group {
    errors: u64,
    /// `(bucket, count)`, unsorted, buckets may repeat.
    buckets: Vec<(i32, u64)>,
}

impl LatencyGroups {
    fn group(&mut self, route: &str, consumer: Option<&str>, t_us: i64) -> &mut Group {
        let key = (route.to_string(), consumer.map(str::to_string), t_us);
        self.0.entry(key).or_default()
    }

    /// Adds `n` observations in sketch bucket `bucket`, `errors` of them 5xx.
    pub fn add(
        &mut self,
        route: &str,
        consumer: Option<&str>,
        t_us: i64,
        bucket: i32,
        n: u64,
        errors: u64,
    ) {
        let g = self.group(route, consumer, t_us);
        g.errors += errors;
        g.buckets.push((bucket, n));
    }

    /// Adds a whole sketch (parallel bucket and count slices).
    pub fn add_sketch(
        &mut self,
        route: &str,
        consumer: Option<&str>,
        t_us: i64,
        errors: u64,
        buckets: impl Iterator<Item = (i32, u64)>,
    ) {
        let g = self.group(route, consumer, t_us);
        g.errors += errors;
        g.buckets.extend(buckets);
    }

    /// The rows, sorted by route, consumer and time, with `quantiles` of each group.
    pub fn rows(self, quantiles: &[f64]) -> Vec<LatencyRow> {
        let mut rows: Vec<LatencyRow> = self
            .0
            .into_iter()
            .map(|((route, consumer, t_us), mut g)| {
                g.buckets.sort_unstable_by_key(|(b, _)| *b);
                let count = g.buckets.iter().map(|(_, n)| n).sum();
                LatencyRow {
                    route,
                    consumer,
                    t_us,
                    count,
                    errors: g.errors,
                    quantiles_us: quantiles
                        .iter()
                        .map(|q| nearest_rank(&g.buckets, count, *q).map_or(f64::NAN, bucket_value))
                        .collect(),
                }
            })
            .filter(|r| r.count > 0)
            .collect();
        rows.sort_by(|a, b| (&a.route, &a.consumer, a.t_us).cmp(&(&b.route, &b.consumer, b.t_us)));
        rows
    }
}
