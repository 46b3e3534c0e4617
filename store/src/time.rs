//! Time units the stores share: microseconds since the epoch, the rollup grains (minute, hour,
//! day) and UTC days (the `day` group key and the Parquet partitioning), and the planner that
//! cuts a query window into parts each read from the coarsest rollup that can answer it.

/// One minute in microseconds: the grain of the per-minute rollups.
pub const MINUTE_US: i64 = 60_000_000;
/// One hour in microseconds.
pub const HOUR_US: i64 = 3_600_000_000;
/// One UTC day in microseconds.
pub const DAY_US: i64 = 86_400_000_000;

/// A rollup's time grain: it answers `[a, b)` when `a` and `b` are multiples of `size_us` and
/// `a >= since_us` (a rollup added to a database that already held events covers only what came
/// after it; see the ClickHouse migration 0003).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grain {
    pub size_us: i64,
    pub since_us: i64,
}

impl Grain {
    /// A grain that covers all time.
    pub const fn always(size_us: i64) -> Grain {
        Grain {
            size_us,
            since_us: i64::MIN,
        }
    }

    /// Whether time buckets of `step` (none: one bucket) never cut one of this grain's periods.
    pub fn fits_step(&self, step: Option<i64>) -> bool {
        step.is_none_or(|s| s % self.size_us == 0)
    }
}

/// Cuts `[from, to)` into consecutive parts, each answered by one of `grains` (ordered coarse
/// to fine, the index returned) or by raw events (`None`): the coarsest grain takes the widest
/// aligned span it can, the finer ones the edges around it, and raw events what no grain can.
pub fn plan(from: i64, to: i64, grains: &[Grain]) -> Vec<(Option<usize>, i64, i64)> {
    fn go(
        a: i64,
        b: i64,
        grains: &[Grain],
        index: usize,
        out: &mut Vec<(Option<usize>, i64, i64)>,
    ) {
        if a >= b {
            return;
        }
        let Some((g, finer)) = grains.split_first() else {
            out.push((None, a, b));
            return;
        };
        let lo = a.max(g.since_us);
        let start = lo.div_euclid(g.size_us) * g.size_us;
        let start = if start < lo {
            start.saturating_add(g.size_us)
        } else {
            start
        };
        let end = b.div_euclid(g.size_us) * g.size_us;
        if start >= end {
            return go(a, b, finer, index + 1, out);
        }
        go(a, start, finer, index + 1, out);
        out.push((Some(index), start, end));
        go(end, b, finer, index + 1, out);
    }
    let mut out = Vec::new();
    go(from, to, grains, 0, &mut out);
    out
}

/// Formats a day number (days since the epoch) as `YYYY-MM-DD`.
pub fn day_string(day: i64) -> String {
    let date = chrono::DateTime::from_timestamp(day * 86_400, 0)
        .expect("day in range")
        .date_naive();
    date.format("%Y-%m-%d").to_string()
}

/// Formats the start of an hour or a minute (`units` of `size_us` since the epoch) as RFC 3339
/// in UTC: `YYYY-MM-DDTHH:MM:00Z`.
pub fn period_string(units: i64, size_us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(units * size_us)
        .expect("time in range")
        .format("%Y-%m-%dT%H:%M:00Z")
        .to_string()
}

/// `[from, to)` cut where whole minutes begin and end: `(head, body, tail)`, where `body` is
/// the minute-aligned middle a rollup can answer and `head`/`tail` the partial minutes around it
/// that only raw events can. Empty parts are `None`.
#[allow(clippy::type_complexity)]
pub fn split_minutes(
    from: i64,
    to: i64,
) -> (Option<(i64, i64)>, Option<(i64, i64)>, Option<(i64, i64)>) {
    if from >= to {
        return (None, None, None);
    }
    let first = from.div_euclid(MINUTE_US) * MINUTE_US;
    let start = if first == from {
        from
    } else {
        first + MINUTE_US
    };
    let end = to.div_euclid(MINUTE_US) * MINUTE_US;
    if start >= end {
        return (Some((from, to)), None, None);
    }
    let part = |a: i64, b: i64| (a < b).then_some((a, b));
    (part(from, start), Some((start, end)), part(end, to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_day_with_ragged_edges_reads_days_hours_minutes_and_raw() {
        let grains = [
            Grain::always(DAY_US),
            Grain::always(HOUR_US),
            Grain::always(MINUTE_US),
        ];
        let from = DAY_US - HOUR_US - MINUTE_US - 5;
        let to = 2 * DAY_US + HOUR_US + MINUTE_US + 5;
        let got = plan(from, to, &grains);
        let want = vec![
            (None, from, from + 5),
            (Some(2), from + 5, DAY_US - HOUR_US),
            (Some(1), DAY_US - HOUR_US, DAY_US),
            (Some(0), DAY_US, 2 * DAY_US),
            (Some(1), 2 * DAY_US, 2 * DAY_US + HOUR_US),
            (
                Some(2),
                2 * DAY_US + HOUR_US,
                2 * DAY_US + HOUR_US + MINUTE_US,
            ),
            (None, 2 * DAY_US + HOUR_US + MINUTE_US, to),
        ];
        assert_eq!(got, want);
        // Before `since` only the finer grain answers.
        let late = [
            Grain {
                size_us: HOUR_US,
                since_us: DAY_US,
            },
            Grain::always(MINUTE_US),
        ];
        assert_eq!(
            plan(0, DAY_US + HOUR_US, &late),
            vec![(Some(1), 0, DAY_US), (Some(0), DAY_US, DAY_US + HOUR_US)]
        );
    }

    proptest! {
        #[test]
        fn the_parts_tile_the_window_and_the_body_is_aligned(from in -1_000_000_000_000i64..1_000_000_000_000, len in 0i64..10_000_000_000) {
            let to = from + len;
            let (h, b, t) = split_minutes(from, to);
            let parts: Vec<(i64, i64)> = [h, b, t].into_iter().flatten().collect();
            let mut at = from;
            for (a, z) in &parts {
                prop_assert_eq!(*a, at);
                prop_assert!(a < z);
                at = *z;
            }
            prop_assert_eq!(at, if len == 0 { from } else { to });
            if let Some((a, z)) = b {
                prop_assert_eq!(a.rem_euclid(MINUTE_US), 0);
                prop_assert_eq!(z.rem_euclid(MINUTE_US), 0);
            }
            for p in [h, t].into_iter().flatten() {
                prop_assert!(p.1 - p.0 < MINUTE_US || b.is_none());
            }
        }

        #[test]
        fn a_plan_tiles_the_window_with_aligned_parts_each_grain_may_answer(
            from in -10 * DAY_US..10 * DAY_US,
            len in 0i64..5 * DAY_US,
            since in prop_oneof![Just(i64::MIN), (-5i64..5).prop_map(|d| d * DAY_US)],
        ) {
            let to = from + len;
            let grains = [
                Grain { size_us: DAY_US, since_us: since },
                Grain { size_us: HOUR_US, since_us: since },
                Grain::always(MINUTE_US),
            ];
            let parts = plan(from, to, &grains);
            let mut at = from;
            for (g, a, z) in &parts {
                prop_assert_eq!(*a, at);
                prop_assert!(a < z);
                at = *z;
                if let Some(i) = g {
                    let g = grains[*i];
                    prop_assert!(*a >= g.since_us);
                    prop_assert_eq!(a.rem_euclid(g.size_us), 0);
                    prop_assert_eq!(z.rem_euclid(g.size_us), 0);
                } else {
                    prop_assert!(z - a < 2 * MINUTE_US, "raw part {a}..{z}");
                }
            }
            prop_assert_eq!(at, if len == 0 { from } else { to });
        }
    }
}
