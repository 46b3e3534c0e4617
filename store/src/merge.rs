//! Summing the parts of one answer: a window is read in parts (raw edges, whole minutes from
//! rollups, events not yet flushed), and every backend adds the parts up here, the same way.

use std::collections::BTreeMap;

use crate::sketch::LogHistogram;
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

/// Latency histograms by (route, consumer, time bucket).
#[derive(Debug, Default)]
pub struct LatencyGroups(BTreeMap<(String, Option<String>, i64), (u64, LogHistogram)>);

impl LatencyGroups {
    /// Adds `n` observations in sketch bucket `bucket`, `errors` of them 5xx.
    pub fn add(
        &mut self,
        route: String,
        consumer: Option<String>,
        t_us: i64,
        bucket: i32,
        n: u64,
        errors: u64,
    ) {
        let g = self.0.entry((route, consumer, t_us)).or_default();
        g.0 += errors;
        g.1.add_bucket(bucket, n);
    }

    /// The rows, sorted by route, consumer and time, with `quantiles` of each histogram.
    pub fn rows(self, quantiles: &[f64]) -> Vec<LatencyRow> {
        self.0
            .into_iter()
            .map(
                |((route, consumer, t_us), (errors, histogram))| LatencyRow {
                    route,
                    consumer,
                    t_us,
                    count: histogram.count(),
                    errors,
                    quantiles_us: quantiles
                        .iter()
                        .map(|q| histogram.quantile(*q).unwrap_or(f64::NAN))
                        .collect(),
                },
            )
            .collect()
    }
}
