//! Summing the parts of one answer: a window is read in parts (raw edges, whole minutes from
//! rollups, events not yet flushed), and every backend adds the parts up here, the same way.

use std::collections::{BTreeMap, HashMap};

use crate::sketch::{bucket_value, decode_into, encoded_quantiles, nearest_rank};
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
    /// Whole sketches in their byte form (`sketch::encode`), decoded only when there is more
    /// than one part: one sketch alone (a per-minute point from the per-minute rollup, the
    /// common case of a dashboard) is answered in one pass over its bytes.
    encoded: Vec<Vec<u8>>,
    /// The whole group already answered: its count and the bucket of each asked level.
    answered: Option<(u64, Vec<i32>)>,
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

    /// Adds `(bucket, count)` pairs of one group, `errors` of them 5xx.
    pub fn add_pairs(
        &mut self,
        route: &str,
        consumer: Option<&str>,
        t_us: i64,
        errors: u64,
        pairs: impl IntoIterator<Item = (i32, u64)>,
    ) {
        let g = self.group(route, consumer, t_us);
        g.errors += errors;
        g.buckets.extend(pairs);
    }

    /// Sets a group whose answer was computed elsewhere (a compacted period's precomputed
    /// quantiles): its count, 5xx count and the bucket of each asked level, in order. Nothing
    /// else may be added to that group.
    pub fn add_answered(
        &mut self,
        route: &str,
        consumer: Option<&str>,
        t_us: i64,
        (count, errors): (u64, u64),
        buckets: Vec<i32>,
    ) {
        let g = self.group(route, consumer, t_us);
        g.errors += errors;
        g.answered = Some((count, buckets));
    }

    /// Adds a whole sketch in its byte form (`sketch::encode`).
    pub fn add_encoded(
        &mut self,
        route: &str,
        consumer: Option<&str>,
        t_us: i64,
        errors: u64,
        sketch: &[u8],
    ) {
        self.add_encoded_owned(route, consumer, t_us, errors, sketch.to_vec());
    }

    /// [`add_encoded`](Self::add_encoded) for a sketch already owned.
    pub fn add_encoded_owned(
        &mut self,
        route: &str,
        consumer: Option<&str>,
        t_us: i64,
        errors: u64,
        sketch: Vec<u8>,
    ) {
        let g = self.group(route, consumer, t_us);
        g.errors += errors;
        g.encoded.push(sketch);
    }

    /// The rows, sorted by route, consumer and time, with `quantiles` of each group. Fails on
    /// a sketch whose bytes do not decode.
    pub fn rows(self, quantiles: &[f64]) -> Result<Vec<LatencyRow>, String> {
        let mut rows = Vec::with_capacity(self.0.len());
        for ((route, consumer, t_us), mut g) in self.0 {
            let (count, found) = match (g.answered, g.encoded.as_slice()) {
                (Some((count, buckets)), []) if g.buckets.is_empty() => {
                    (count, buckets.into_iter().map(Some).collect())
                }
                (Some(_), _) => {
                    return Err(format!(
                        "time bucket {t_us} of route {route} mixes a precomputed answer with sketches"
                    ));
                }
                (None, [one]) if g.buckets.is_empty() => encoded_quantiles(one, quantiles)?,
                (None, parts) => {
                    for p in parts {
                        decode_into(p, &mut g.buckets)?;
                    }
                    // Stable sort: decoded sketches are ascending runs, which it merges in
                    // linear time.
                    g.buckets.sort_by_key(|(b, _)| *b);
                    let count = g.buckets.iter().map(|(_, n)| n).sum();
                    let found = quantiles
                        .iter()
                        .map(|q| nearest_rank(&g.buckets, count, *q))
                        .collect();
                    (count, found)
                }
            };
            if count == 0 {
                continue;
            }
            rows.push(LatencyRow {
                route,
                consumer,
                t_us,
                count,
                errors: g.errors,
                quantiles_us: found
                    .into_iter()
                    .map(|b| b.map_or(f64::NAN, bucket_value))
                    .collect(),
            });
        }
        rows.sort_by(|a, b| (&a.route, &a.consumer, a.t_us).cmp(&(&b.route, &b.consumer, b.t_us)));
        Ok(rows)
    }
}
