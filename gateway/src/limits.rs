//! Local enforcement: a governor token bucket per consumer (rate limits), and the last known
//! quota state from the query API plus what this gateway admitted since (quotas, in
//! `crate::quota`).
//!
//! Quota enforcement is eventually consistent: the state is as fresh as the last poll plus the
//! pipeline's freshness (about a second), so a consumer can overshoot by what it sends in that
//! time. When the query API is unreachable the last known state stays in force, unless
//! `gateway.quota.stale_after_s` is set: past that age the state is stale, and `when_stale`
//! says whether quotas are then not enforced (`open`) or their consumers refused (`closed`).

use std::collections::HashMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use tollgate_schemas::config::Plan;
use tollgate_schemas::directory::Directory;

/// Token buckets per consumer. A consumer calling with its own plan has one word of state at
/// its position in the consumer table ([`Cells`]), which every plan's limiter shares (a
/// consumer has one plan): finding it is an index, where a keyed limiter hashed the plan's
/// name, hashed the position and locked a shard of its map on every request (about 350 of the
/// 500 instructions a check took, `callgrind`, BENCHMARKS.md, twenty-third round). It costs
/// 8 bytes per configured consumer, 800 kB for 100,000, whether they call or not; a keyed
/// bucket was about 80 bytes per consumer that had called within a refill period.
///
/// A caller whose token names another plan (`plan_claim`) gets that plan's bucket, kept
/// apart from the one of its own plan: those are keyed by position, made on a consumer's first
/// such request and dropped once full again ([`RateLimits::evict_idle`]). A dropped bucket is
/// a full one, so eviction never changes what is admitted.
pub struct RateLimits {
    /// By plan number in `directory`: the plan's limiter over the shared cells, and its
    /// requests per second; `None` for a plan without a rate limit.
    by_plan: Vec<Option<(PlanLimiter, u32)>>,
    /// The consumer table the cells are laid out by.
    directory: Arc<Directory>,
    /// For callers whose token names another plan (`plan_claim`): that plan's buckets, by
    /// consumer position.
    claimed: HashMap<String, (governor::DefaultKeyedRateLimiter<u32>, u32)>,
    clock: DefaultClock,
}

/// A plan's limiter over the consumers' shared cells.
type PlanLimiter = RateLimiter<u32, Cells, DefaultClock>;

/// One word of rate-limit state per consumer position (governor's theoretical arrival time,
/// 0 for a full bucket, as its own in-memory state keeps it), shared by the limiters of every
/// plan. A position past the end (no such consumer) gets a full bucket on every request.
#[derive(Clone)]
struct Cells(Arc<[AtomicU64]>);

impl StateStore for Cells {
    type Key = u32;

    fn measure_and_replace<T, F, E>(&self, key: &u32, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let Some(cell) = self.0.get(*key as usize) else {
            return f(None).map(|(t, _)| t);
        };
        let mut prev = cell.load(Ordering::Acquire);
        loop {
            let (t, next) = f(NonZeroU64::new(prev).map(|n| Nanos::from(n.get())))?;
            match cell.compare_exchange_weak(
                prev,
                u64::from(next),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(t),
                Err(now) => prev = now,
            }
        }
    }
}

/// A configured rate limit as a governor quota (burst defaults to the rate), and its rate.
fn bucket(rl: &tollgate_schemas::config::RateLimit) -> (Quota, u32) {
    let per_second = NonZeroU32::new(rl.per_second).unwrap_or(NonZeroU32::MIN);
    let burst = rl.burst.and_then(NonZeroU32::new).unwrap_or(per_second);
    (
        Quota::per_second(per_second).allow_burst(burst),
        per_second.get(),
    )
}

/// A request over a limit: how long until one would be admitted, and the limit (requests per
/// second for a rate limit, per period for a quota), for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    pub wait: Duration,
    pub limit: u64,
}

impl RateLimits {
    /// The limits of `plans` for the consumers of `directory`.
    pub fn new(
        plans: &std::collections::BTreeMap<String, Plan>,
        directory: &Arc<Directory>,
    ) -> RateLimits {
        let limit = |name: &str| plans.get(name).and_then(|p| p.rate_limit.as_ref());
        let any = directory.plans().iter().any(|p| limit(p).is_some());
        let cells = Cells(if any {
            (0..directory.len()).map(|_| AtomicU64::new(0)).collect()
        } else {
            Arc::new([])
        });
        let clock = DefaultClock::default();
        RateLimits {
            by_plan: directory
                .plans()
                .iter()
                .map(|name| {
                    let (quota, per_second) = bucket(limit(name)?);
                    Some((
                        RateLimiter::new(quota, cells.clone(), clock.clone()),
                        per_second,
                    ))
                })
                .collect(),
            directory: directory.clone(),
            claimed: plans
                .iter()
                .filter_map(|(name, p)| {
                    let (quota, per_second) = bucket(p.rate_limit.as_ref()?);
                    Some((name.clone(), (RateLimiter::keyed(quota), per_second)))
                })
                .collect(),
            clock,
        }
    }

    /// `Err(wait)` when the caller is over its plan's rate limit: its bucket of its own plan,
    /// or of the plan its token names.
    pub fn check(&self, id: &crate::auth::Identity) -> Result<(), OverLimit> {
        let over = |n: governor::NotUntil<_>, per_second: u32| OverLimit {
            wait: n.wait_time_from(self.clock.now()),
            limit: u64::from(per_second),
        };
        if id.claimed_plan {
            return match self.claimed.get(&*id.plan) {
                None => Ok(()),
                Some((l, per_second)) => l
                    .check_key(&(id.index as u32))
                    .map_err(|n| over(n, *per_second)),
            };
        }
        // Its position here: its own, unless it was authenticated against another table (a
        // request that began before a reload), then looked up by id.
        let at = if Arc::ptr_eq(&id.directory, &self.directory) {
            Some(id.index)
        } else {
            self.directory.position(id.consumer())
        };
        let Some(at) = at else { return Ok(()) };
        let Some(plan) = self.directory.plan_number(at) else {
            return Ok(());
        };
        match self.by_plan.get(plan).and_then(Option::as_ref) {
            None => Ok(()),
            Some((l, per_second)) => l.check_key(&(at as u32)).map_err(|n| over(n, *per_second)),
        }
    }

    /// Drops the buckets of claimed plans that are full again.
    pub fn evict_idle(&self) {
        for (l, _) in self.claimed.values() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// Token buckets per route and consumer (`routes[].rate_limit`), made on a consumer's first
/// request on the route and evicted once idle ([`RouteLimits::evict_idle`]): memory follows
/// the consumers active on each route, not every configured one, and anonymous callers (who
/// never reach a limit) make none.
pub struct RouteLimits {
    by_route: Vec<Option<(governor::DefaultKeyedRateLimiter<u32>, u32)>>,
    clock: DefaultClock,
}

impl RouteLimits {
    pub fn new(routes: &[crate::config::RouteConfig]) -> RouteLimits {
        RouteLimits {
            by_route: routes
                .iter()
                .map(|r| {
                    let (quota, per_second) = bucket(r.rate_limit.as_ref()?);
                    Some((RateLimiter::keyed(quota), per_second))
                })
                .collect(),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(wait)` when consumer `consumer` is over route `route`'s limit.
    pub fn check(&self, route: usize, consumer: usize) -> Result<(), OverLimit> {
        match self.by_route.get(route).and_then(Option::as_ref) {
            None => Ok(()),
            Some((l, per_second)) => {
                l.check_key(&(consumer as u32))
                    .map_err(|not_until| OverLimit {
                        wait: not_until.wait_time_from(self.clock.now()),
                        limit: u64::from(*per_second),
                    })
            }
        }
    }

    /// Drops the buckets that are full again (a fresh one would be the same).
    pub fn evict_idle(&self) {
        for (l, _) in self.by_route.iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Buckets held, over every route.
    pub fn len(&self) -> usize {
        self.by_route.iter().flatten().map(|(l, _)| l.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_schemas::config::{Consumer, RateLimit};

    #[test]
    fn rate_limit_allows_the_burst_then_refuses_with_a_wait() {
        let consumers = vec![
            Consumer {
                id: "a".into(),
                plan: "p".into(),
                api_keys: vec![],
            },
            Consumer {
                id: "unlimited".into(),
                plan: "free".into(),
                api_keys: vec![],
            },
        ];
        let plans = [(
            "p".to_string(),
            Plan {
                rate_limit: Some(RateLimit {
                    per_second: 1,
                    burst: Some(3),
                }),
                ..Default::default()
            },
        )]
        .into();
        let d =
            std::sync::Arc::new(tollgate_schemas::directory::Directory::new(&consumers).unwrap());
        let rl = RateLimits::new(&plans, &d);
        let a = &crate::auth::Identity::configured(&d, 0);
        let unlimited = &crate::auth::Identity::configured(&d, 1);
        for _ in 0..3 {
            assert!(rl.check(a).is_ok());
        }
        let over = rl.check(a).unwrap_err();
        let wait = over.wait;
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(rl.check(unlimited).is_ok(), "a plan without a rate limit");
        let nobody = crate::auth::Identity {
            index: 7,
            ..unlimited.clone()
        };
        assert!(rl.check(&nobody).is_ok(), "no such consumer");
        // The unlimited consumer with a token naming plan `p`: p's limit, in a bucket of its
        // own (not consumer a's, which is empty now).
        let claimed = crate::auth::Identity {
            plan: "p".into(),
            claimed_plan: true,
            ..unlimited.clone()
        };
        for _ in 0..3 {
            assert!(rl.check(&claimed).is_ok());
        }
        assert_eq!(rl.check(&claimed).unwrap_err().limit, 1);
        // Eviction drops full buckets only: the emptied ones stay and keep refusing.
        rl.evict_idle();
        assert!(rl.check(a).is_err() && rl.check(&claimed).is_err());
    }

    #[test]
    fn each_consumer_has_a_bucket_of_its_own_found_by_id_across_a_reload() {
        let consumer = |id: &str, plan: &str| Consumer {
            id: id.into(),
            plan: plan.into(),
            api_keys: vec![],
        };
        let limited = Plan {
            rate_limit: Some(RateLimit {
                per_second: 1,
                burst: Some(2),
            }),
            ..Default::default()
        };
        let plans = [
            ("p".to_string(), limited.clone()),
            ("q".to_string(), limited),
        ]
        .into();
        let before = std::sync::Arc::new(
            tollgate_schemas::directory::Directory::new(&[
                consumer("a", "p"),
                consumer("b", "q"),
                consumer("c", "p"),
            ])
            .unwrap(),
        );
        let rl = RateLimits::new(&plans, &before);
        let id = |d: &std::sync::Arc<_>, at| crate::auth::Identity::configured(d, at);
        for at in 0..3 {
            assert!(rl.check(&id(&before, at)).is_ok() && rl.check(&id(&before, at)).is_ok());
        }
        for at in 0..3 {
            assert_eq!(rl.check(&id(&before, at)).unwrap_err().limit, 1, "{at}");
        }
        // A request authenticated against the table a reload replaced: the same consumer by
        // id (`c` is at 0 there), whose bucket is empty; one unknown here is not limited.
        let other = std::sync::Arc::new(
            tollgate_schemas::directory::Directory::new(&[consumer("c", "p"), consumer("z", "p")])
                .unwrap(),
        );
        assert!(rl.check(&id(&other, 0)).is_err());
        for _ in 0..5 {
            assert!(rl.check(&id(&other, 1)).is_ok());
        }
    }

    #[test]
    fn route_limits_are_per_consumer_and_idle_buckets_are_evicted() {
        let mut limited = crate::config::RouteConfig {
            id: "r".into(),
            methods: vec![],
            hosts: vec![],
            path: "/r".into(),
            upstream: "u".into(),
            strip_prefix: None,
            auth: crate::config::RouteAuth::All(true),
            rate_limit: Some(tollgate_schemas::config::RateLimit {
                per_second: 1000,
                burst: Some(2),
            }),
            timeout_ms: None,
        };
        let mut open = limited.clone();
        open.rate_limit = None;
        limited.id = "limited".into();
        let limits = RouteLimits::new(&[open, limited]);
        assert!(
            limits.check(0, 7).is_ok() && limits.is_empty(),
            "an unlimited route holds nothing"
        );
        assert!(limits.check(1, 7).is_ok() && limits.check(1, 7).is_ok());
        let over = limits.check(1, 7).unwrap_err();
        assert_eq!(over.limit, 1000);
        assert!(
            limits.check(1, 8).is_ok(),
            "another consumer has its own bucket"
        );
        assert_eq!(limits.len(), 2);
        // At 1,000/s the buckets refill within milliseconds; then they are evicted.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !limits.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} buckets still held",
                limits.len()
            );
            limits.evict_idle();
            std::thread::yield_now();
        }
    }
}
