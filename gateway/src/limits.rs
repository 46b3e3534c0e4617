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
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use tollgate_schemas::config::Plan;

/// Token buckets per consumer, keyed by the consumer's position in the configuration, one
/// keyed limiter per plan (a request hashes its plan's name and its position). A bucket is
/// made on a consumer's first request and dropped once full again ([`RateLimits::evict_idle`]),
/// so memory follows the consumers active within a refill period, not every configured one
/// (with 100,000 configured consumers, a bucket each held 8 MB whether they called or not).
/// A dropped bucket is a full one, so eviction never changes what is admitted.
pub struct RateLimits {
    /// Per plan with a rate limit: its consumers' buckets and its requests per second.
    by_plan: HashMap<String, (governor::DefaultKeyedRateLimiter<u32>, u32)>,
    /// For callers whose token names another plan (`plan_claim`): that plan's buckets, by
    /// consumer position, kept apart from the buckets of the consumer's own plan.
    claimed: HashMap<String, (governor::DefaultKeyedRateLimiter<u32>, u32)>,
    clock: DefaultClock,
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
    pub fn new(plans: &std::collections::BTreeMap<String, Plan>) -> RateLimits {
        let keyed = || {
            plans
                .iter()
                .filter_map(|(name, p)| {
                    let (quota, per_second) = bucket(p.rate_limit.as_ref()?);
                    Some((name.clone(), (RateLimiter::keyed(quota), per_second)))
                })
                .collect()
        };
        RateLimits {
            by_plan: keyed(),
            claimed: keyed(),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(wait)` when the caller is over its plan's rate limit: its bucket of its own plan,
    /// or of the plan its token names.
    pub fn check(&self, id: &crate::auth::Identity) -> Result<(), OverLimit> {
        let plans = if id.claimed_plan {
            &self.claimed
        } else {
            &self.by_plan
        };
        match plans.get(&*id.plan) {
            None => Ok(()),
            Some((l, per_second)) => l.check_key(&(id.index as u32)).map_err(|n| OverLimit {
                wait: n.wait_time_from(self.clock.now()),
                limit: u64::from(*per_second),
            }),
        }
    }

    /// Drops the buckets that are full again.
    pub fn evict_idle(&self) {
        for (l, _) in self.by_plan.values().chain(self.claimed.values()) {
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
        let rl = RateLimits::new(&plans);
        let d =
            std::sync::Arc::new(tollgate_schemas::directory::Directory::new(&consumers).unwrap());
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
