//! A mergeable latency sketch: a log-bucketed histogram with a bounded relative error (the
//! DDSketch construction). Every backend returns bucket counts; quantiles are computed here, so
//! all backends agree exactly on the same events.
//!
//! Bucket `i` holds values in `(γ^(i-1), γ^i]` with `γ = (1+α)/(1-α)`; reporting
//! `2γ^i/(γ+1)` for it is within relative error `α` of every value in the bucket. Quantiles use
//! the nearest-rank definition (the smallest value with at least `q·n` values at or below it), so
//! a reported quantile is within `α` of an actual observed latency.

use std::collections::BTreeMap;

/// Relative accuracy of reported quantiles: 0.5 %.
pub const RELATIVE_ERROR: f64 = 0.005;

/// `γ` for [`RELATIVE_ERROR`].
pub fn gamma() -> f64 {
    (1.0 + RELATIVE_ERROR) / (1.0 - RELATIVE_ERROR)
}

/// `ln γ`, the divisor backends use in SQL: `bucket = ceil(ln(max(latency_us, 1)) / ln γ)`.
pub fn ln_gamma() -> f64 {
    gamma().ln()
}

/// The bucket of a latency in microseconds (values below 1 µs count as 1 µs).
pub fn bucket_of(latency_us: u64) -> i32 {
    ((latency_us.max(1) as f64).ln() / ln_gamma()).ceil() as i32
}

/// The value reported for bucket `i`, in microseconds.
pub fn bucket_value(i: i32) -> f64 {
    let g = gamma();
    2.0 * g.powi(i) / (g + 1.0)
}

/// Bucket counts of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogHistogram {
    pub buckets: BTreeMap<i32, u64>,
}

impl LogHistogram {
    /// Adds one observation.
    pub fn record(&mut self, latency_us: u64) {
        *self.buckets.entry(bucket_of(latency_us)).or_default() += 1;
    }

    /// Adds `n` observations to bucket `i`.
    pub fn add_bucket(&mut self, i: i32, n: u64) {
        *self.buckets.entry(i).or_default() += n;
    }

    /// Merges another histogram into this one.
    pub fn merge(&mut self, other: &LogHistogram) {
        for (i, n) in &other.buckets {
            self.add_bucket(*i, *n);
        }
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.values().sum()
    }

    /// The `q` quantile (0 ≤ q ≤ 1) in microseconds; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let pairs: Vec<(i32, u64)> = self.buckets.iter().map(|(i, n)| (*i, *n)).collect();
        nearest_rank(&pairs, self.count(), q).map(bucket_value)
    }
}

/// The bucket holding the `q` quantile (0 ≤ q ≤ 1) of `n` observations given as `(bucket,
/// count)` pairs sorted by bucket (a bucket may repeat): the first bucket at which the running
/// count reaches `max(1, ceil(q·n))`. This is the one rule every backend follows (ClickHouse's
/// `quantileExactWeighted` computes the same threshold, in the same floating point).
pub fn nearest_rank(sorted: &[(i32, u64)], n: u64, q: f64) -> Option<i32> {
    if n == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in sorted {
        seen += c;
        if seen >= rank {
            return Some(*i);
        }
    }
    sorted.last().map(|(i, _)| *i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact(values: &mut [u64], q: f64) -> f64 {
        values.sort_unstable();
        let rank = ((q * values.len() as f64).ceil() as usize).max(1);
        values[rank - 1].max(1) as f64
    }

    proptest! {
        #[test]
        fn quantiles_are_within_the_stated_relative_error(
            mut values in proptest::collection::vec(0u64..60_000_000, 1..500),
            q in 0.0f64..=1.0,
        ) {
            let mut h = LogHistogram::default();
            values.iter().for_each(|v| h.record(*v));
            let got = h.quantile(q).unwrap();
            let want = exact(&mut values, q);
            prop_assert!((got - want).abs() <= want * RELATIVE_ERROR * 1.000001, "got {got}, want {want}");
        }

        #[test]
        fn merging_equals_recording_everything(
            a in proptest::collection::vec(0u64..10_000_000, 0..200),
            b in proptest::collection::vec(0u64..10_000_000, 0..200),
        ) {
            let (mut ha, mut hb, mut all) = Default::default();
            let _: (&LogHistogram, &LogHistogram, &LogHistogram) = (&ha, &hb, &all);
            a.iter().for_each(|v| { LogHistogram::record(&mut ha, *v); LogHistogram::record(&mut all, *v) });
            b.iter().for_each(|v| { LogHistogram::record(&mut hb, *v); LogHistogram::record(&mut all, *v) });
            LogHistogram::merge(&mut ha, &hb);
            prop_assert_eq!(ha, all);
        }
    }
}
