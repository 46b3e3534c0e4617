//! When the process's periodic tasks wake: on whole multiples of their periods since the Unix
//! epoch, so that tasks of the same period, or of periods that divide each other, wake at the
//! same moment, and the runtime serves them in one wake-up of one thread instead of one each.
//!
//! Why: an idle `tollgate up` woke its runtime's threads about 15 times a second for the
//! samplers that watch it: binding the workers (4 a second), the ingest threads' class (2), the
//! allocator's trim (2), the configuration file (0.5), the quota feed (1) and the query API
//! answering it. On the two-core reference VM, a thread's wake-up from idle is charged 0.1–1 ms
//! of CPU, whatever it then does (a Rust thread that only sleeps 100 ms at a time uses 0.12 ms
//! a wake-up), so the idle process used 1–2 % of a core (BENCHMARKS.md, thirty-fourth round).
//! The samplers also look less often while there is nothing to see ([`QUIET`]).

use std::time::{Duration, SystemTime};

/// How often a sampler looks while the process is quiet; every faster period used with
/// [`tick`] divides it, so a quiet process's samplers wake together once a second.
pub const QUIET: Duration = Duration::from_secs(1);

/// Sleeps until the next whole multiple of `period` since the Unix epoch (a full `period` when
/// called right on one). A wall clock set back or forward moves the next tick by at most
/// `period`.
pub async fn tick(period: Duration) {
    tokio::time::sleep(until_next(SystemTime::now(), period)).await;
}

/// The time from `now` to the next whole multiple of `period` since the Unix epoch.
fn until_next(now: SystemTime, period: Duration) -> Duration {
    let period_ns = period.as_nanos().max(1);
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let left = period_ns - since % period_ns;
    Duration::from_nanos(u64::try_from(left).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn ticks_fall_on_whole_multiples_of_the_period() {
        let ms = Duration::from_millis;
        assert_eq!(until_next(at(1_000_100), ms(250)), ms(150));
        assert_eq!(until_next(at(1_000_100), ms(1_000)), ms(900));
        assert_eq!(
            until_next(at(1_000_000), ms(1_000)),
            ms(1_000),
            "right on one: the next"
        );
        assert_eq!(until_next(at(1_000_999), ms(500)), ms(1));
    }

    #[test]
    fn periods_that_divide_each_other_share_their_ticks() {
        // From any moment, a 250 ms sampler and a 1 s one both wake at the next whole second
        // (the faster one also at the quarters before it).
        for start in [1_000_001u64, 1_000_260, 1_000_749, 1_000_999] {
            let now = at(start);
            let second = now + until_next(now, QUIET);
            let mut quarter = now;
            while quarter < second {
                quarter += until_next(quarter, Duration::from_millis(250));
            }
            assert_eq!(quarter, second, "from {start} ms");
        }
    }
}
