//! Time units the stores share: microseconds since the epoch, whole minutes (the rollup grain)
//! and UTC days (the `day` group key and the Parquet partitioning).

/// One minute in microseconds: the grain of the per-minute rollups.
pub const MINUTE_US: i64 = 60_000_000;
/// One UTC day in microseconds.
pub const DAY_US: i64 = 86_400_000_000;

/// Formats a day number (days since the epoch) as `YYYY-MM-DD`.
pub fn day_string(day: i64) -> String {
    let date = chrono::DateTime::from_timestamp(day * 86_400, 0)
        .expect("day in range")
        .date_naive();
    date.format("%Y-%m-%d").to_string()
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
    }
}
