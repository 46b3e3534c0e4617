//! Local enforcement: a governor token bucket per consumer (rate limits), and the last known
//! quota state from the query API plus what this gateway admitted since (quotas).
//!
//! Quota enforcement is eventually consistent: the state is as fresh as the last poll plus the
//! pipeline's freshness (about a second), so a consumer can overshoot by what it sends in that
//! time. When the query API is unreachable the last known state stays in force, unless
//! `gateway.quota.stale_after_s` is set: past that age the state is stale, and `when_stale`
//! says whether quotas are then not enforced (`open`) or their consumers refused (`closed`).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use tollgate_schemas::config::Plan;

use crate::config::WhenStale;

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

pub use tollgate_schemas::quota::{QuotaEntry, QuotaSnapshot};

/// What one period's entries share (every consumer of a plan, usually): held once, not per
/// consumer, so the state of 100,000 consumers stays a few megabytes.
#[derive(Debug, PartialEq, Eq)]
struct Period {
    plan: Option<String>,
    name: String,
    /// As received (RFC 3339), for the state kept on disk.
    end_text: String,
    end: Option<chrono::DateTime<chrono::Utc>>,
}

struct Known {
    /// The entry's limit, present (entries without one are not kept).
    limit: u64,
    /// Billable requests the store had counted at the last update.
    used: u64,
    /// Billable requests this gateway admitted that the store had not counted at the last
    /// update. Shared with the entry that replaces this one (see `QuotaState::update`).
    admitted_since: Arc<AtomicU64>,
    period: Arc<Period>,
}

impl Known {
    /// `None` for an entry without a limit (nothing to enforce). `previous` is the entry it
    /// replaces: within the same period its local count carries over, less what the store
    /// counted since (`used` grew by it), so requests still on their way through the bus
    /// stay counted. Taking the growth off this gateway's count is exact with one gateway;
    /// with several, the others' requests are taken off too, which can only let a consumer
    /// overshoot by what is in flight, never stop it early. `periods` holds the periods seen
    /// in this update, so that entries share them.
    fn of(
        entry: QuotaEntry,
        previous: Option<&Known>,
        periods: &mut Vec<Arc<Period>>,
    ) -> Option<Known> {
        let limit = entry.limit?;
        let same = |p: &Period| {
            p.plan == entry.plan && p.name == entry.period && p.end_text == entry.period_end
        };
        let period = match previous
            .map(|k| &k.period)
            .filter(|p| same(p))
            .or_else(|| periods.iter().find(|p| same(p)))
        {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(Period {
                    end: chrono::DateTime::parse_from_rfc3339(&entry.period_end)
                        .ok()
                        .map(|t| t.with_timezone(&chrono::Utc)),
                    plan: entry.plan,
                    name: entry.period,
                    end_text: entry.period_end,
                });
                periods.push(p.clone());
                p
            }
        };
        let admitted_since = match previous {
            Some(p) if p.period.end == period.end => {
                let counted = entry.used.saturating_sub(p.used);
                let _ = p
                    .admitted_since
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                        Some(a.saturating_sub(counted))
                    });
                p.admitted_since.clone()
            }
            _ => Arc::new(AtomicU64::new(0)),
        };
        Some(Known {
            limit,
            used: entry.used,
            admitted_since,
            period,
        })
    }

    /// The entry as received (what is kept on disk).
    fn entry(&self, consumer: &str) -> QuotaEntry {
        QuotaEntry::new(
            consumer.to_string(),
            self.period.plan.clone(),
            self.period.name.clone(),
            self.period.end_text.clone(),
            Some(self.limit),
            self.used,
        )
    }
}

/// The quota state this gateway enforces: the consumers with a limit.
#[derive(Default)]
pub struct QuotaState {
    /// By consumer id. The entries are held in the map itself, not each in an allocation of
    /// its own: with 100,000 consumers that was 6 MB.
    known: RwLock<HashMap<Box<str>, Known>>,
    /// `(version, epoch)` of the last answer applied, for the next poll's `since`.
    position: std::sync::Mutex<Option<(i64, u64)>>,
    /// Unix seconds of the last successful update (0: never).
    pub updated_at: AtomicU64,
    /// `gateway.quota.stale_after_s` and `when_stale`.
    stale: Option<(u64, WhenStale)>,
}

/// Whether the quota state can be enforced as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    Fresh,
    /// Older than `stale_after_s`: the policy says what to do.
    Stale(WhenStale),
}

impl QuotaState {
    /// An empty state that turns stale `stale_after_s` seconds after its last update.
    pub fn with_staleness(stale_after_s: Option<u64>, when: WhenStale) -> QuotaState {
        QuotaState {
            stale: stale_after_s.map(|s| (s, when)),
            ..Default::default()
        }
    }

    /// Whether the state is older than `stale_after_s` (never, when that is unset).
    pub fn staleness(&self) -> Staleness {
        let Some((after, when)) = self.stale else {
            return Staleness::Fresh;
        };
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let updated = self.updated_at.load(Ordering::Relaxed);
        if updated == 0 || now.saturating_sub(updated) > after {
            Staleness::Stale(when)
        } else {
            Staleness::Fresh
        }
    }

    /// Applies an answer of `/v1/quota`: a full one replaces the state, a partial one
    /// (`full: false`, the entries that changed) is merged into it. A consumer's local count
    /// carries over, less what the store counted meanwhile (see `Known::of`).
    pub fn update(&self, snap: QuotaSnapshot) {
        let (version, epoch) = (snap.version, snap.epoch);
        let mut periods = Vec::new();
        if snap.full {
            // Full answers are rare (a gateway's first poll, a new query-API process): the
            // rebuild holds the lock.
            let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
            let old = std::mem::take(&mut *known);
            // Sized once: with 100,000 consumers, growing by doubling left 5 MB of freed
            // tables behind.
            known.reserve(snap.consumers.len());
            for mut e in snap.consumers {
                let consumer = std::mem::take(&mut e.consumer);
                if let Some(k) = Known::of(e, old.get(consumer.as_str()), &mut periods) {
                    known.insert(consumer.into_boxed_str(), k);
                }
            }
        } else if !snap.consumers.is_empty() {
            let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
            for mut e in snap.consumers {
                let consumer = std::mem::take(&mut e.consumer);
                match Known::of(e, known.get(consumer.as_str()), &mut periods) {
                    Some(k) => known.insert(consumer.into_boxed_str(), k),
                    None => known.remove(consumer.as_str()),
                };
            }
        }
        *self.position.lock().unwrap_or_else(|p| p.into_inner()) = Some((version, epoch));
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        self.updated_at.store(now, Ordering::Relaxed);
    }

    /// `(version, epoch)` of the state held, if any.
    pub fn position(&self) -> Option<(i64, u64)> {
        *self.position.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The whole state held, as a full answer (what is kept on disk).
    pub fn snapshot(&self) -> QuotaSnapshot {
        let (version, epoch) = self.position().unwrap_or_default();
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        QuotaSnapshot {
            version,
            epoch,
            full: true,
            consumers: known.iter().map(|(c, k)| k.entry(c)).collect(),
        }
    }

    /// The whole state held as the JSON of a full answer (what is kept on disk), written
    /// entry by entry: with 100,000 consumers the entries are never all built at once.
    pub fn snapshot_json(&self) -> Vec<u8> {
        use serde::ser::{SerializeStruct, Serializer};
        struct Entries<'a>(&'a HashMap<Box<str>, Known>);
        impl serde::Serialize for Entries<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(self.0.iter().map(|(c, k)| k.entry(c)))
            }
        }
        let (version, epoch) = self.position().unwrap_or_default();
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(64 + known.len() * 200);
        let mut ser = serde_json::Serializer::new(&mut out);
        let written: Result<(), serde_json::Error> = (|| {
            // The fields of `QuotaSnapshot`, in its order.
            let mut s = (&mut ser).serialize_struct("QuotaSnapshot", 4)?;
            s.serialize_field("version", &version)?;
            s.serialize_field("epoch", &epoch)?;
            s.serialize_field("full", &true)?;
            s.serialize_field("consumers", &Entries(&known))?;
            s.end()
        })();
        written.expect("writing JSON into memory does not fail");
        out
    }

    /// Admits one request of `consumer` against its quota: counts it locally at once (so
    /// concurrent requests cannot all pass the last unit) and returns the count's handle,
    /// which gives the unit back when dropped unless the request turned out billable
    /// ([`Reservation::keep`]). `Err(retry_after)` when the quota for the period is used up;
    /// `Ok(None)` for a consumer without a known limit. `now` is the request's start (its
    /// event's `ts`): the period a request counts in is the one its event is counted in by
    /// the store, and the request path reads no clock of its own for it.
    pub fn reserve(
        &self,
        consumer: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<Reservation>, OverLimit> {
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        let Some(k) = known.get(consumer) else {
            return Ok(None);
        };
        if k.period.end.is_some_and(|end| now >= end) {
            return Ok(None); // a new period began since the last poll
        }
        let free = |a: u64| (k.used.saturating_add(a) < k.limit).then_some(a + 1);
        match k
            .admitted_since
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, free)
        {
            Ok(_) => Ok(Some(Reservation {
                count: Some(k.admitted_since.clone()),
            })),
            Err(_) => Err(OverLimit {
                wait: k
                    .period
                    .end
                    .map(|end| (end - now).to_std().unwrap_or_default())
                    .unwrap_or(Duration::from_secs(60)),
                limit: k.limit,
            }),
        }
    }
}

/// One request counted against a quota before it is forwarded; see [`QuotaState::reserve`].
#[derive(Debug)]
pub struct Reservation {
    count: Option<Arc<AtomicU64>>,
}

impl Reservation {
    /// The request was billable: it stays counted until the store counts it.
    pub fn keep(mut self) {
        self.count = None;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(c) = self.count.take() {
            let _ = c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                Some(a.saturating_sub(1))
            });
        }
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
        let d = tollgate_schemas::directory::Directory::new(&consumers).unwrap();
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

    fn entry(limit: u64, used: u64, period_end: &str) -> QuotaEntry {
        QuotaEntry {
            consumer: "a".into(),
            plan: None,
            period: "2026-11".into(),
            period_end: period_end.into(),
            limit: Some(limit),
            used,
            remaining: Some(limit.saturating_sub(used)),
            state: tollgate_schemas::quota::QuotaLevel::of(Some(limit), used),
        }
    }

    #[test]
    fn the_state_kept_on_disk_is_what_was_received_and_entries_share_their_period() {
        let q = QuotaState::default();
        let end = "2026-12-01T00:00:00.000Z";
        let mut sent: Vec<QuotaEntry> = (0..3)
            .map(|i| QuotaEntry {
                consumer: format!("c{i}"),
                plan: Some("pro".into()),
                ..entry(10, i, end)
            })
            .collect();
        sent.push(QuotaEntry {
            consumer: "free".into(),
            plan: Some("free".into()),
            ..entry(5, 5, end)
        });
        q.update(QuotaSnapshot {
            version: 1,
            epoch: 2,
            full: true,
            consumers: sent.clone(),
        });
        let mut kept = q.snapshot().consumers;
        let from_json: QuotaSnapshot = serde_json::from_slice(&q.snapshot_json()).unwrap();
        assert_eq!(
            from_json,
            q.snapshot(),
            "the file says what the state holds"
        );
        kept.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        sent.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        assert_eq!(kept, sent);
        let known = q.known.read().unwrap();
        assert!(Arc::ptr_eq(&known["c0"].period, &known["c2"].period));
        assert!(!Arc::ptr_eq(&known["c0"].period, &known["free"].period));
    }

    #[test]
    fn quota_counts_local_admissions_until_the_next_poll() {
        let q = QuotaState::default();
        let end = (chrono::Utc::now() + chrono::Duration::days(3)).to_rfc3339();
        q.update(QuotaSnapshot {
            version: 1,
            consumers: vec![entry(5, 3, &end)],
            ..Default::default()
        });
        q.reserve("a", chrono::Utc::now()).unwrap().unwrap().keep();
        q.reserve("a", chrono::Utc::now()).unwrap().unwrap().keep();
        let over = q.reserve("a", chrono::Utc::now()).unwrap_err();
        assert!(over.wait > Duration::from_secs(2 * 86_400));
        assert_eq!(over.limit, 5);
        q.update(QuotaSnapshot {
            version: 2,
            consumers: vec![entry(10, 5, &end)],
            ..Default::default()
        });
        assert!(q.reserve("a", chrono::Utc::now()).unwrap().is_some());
    }

    #[test]
    fn requests_not_yet_counted_by_the_store_stay_counted_across_updates() {
        let q = QuotaState::default();
        let end = (chrono::Utc::now() + chrono::Duration::days(3)).to_rfc3339();
        let snap = |version, used, period_end: &str| QuotaSnapshot {
            version,
            full: version == 1,
            consumers: vec![entry(10, used, period_end)],
            ..Default::default()
        };
        q.update(snap(1, 0, &end));
        (0..6).for_each(|_| q.reserve("a", chrono::Utc::now()).unwrap().unwrap().keep());
        // The store has counted 4 of the 6: 2 are still on their way.
        q.update(snap(2, 4, &end));
        (0..3).for_each(|_| q.reserve("a", chrono::Utc::now()).unwrap().unwrap().keep());
        // A request that was not billable gives its unit back.
        drop(q.reserve("a", chrono::Utc::now()).unwrap().unwrap());
        q.reserve("a", chrono::Utc::now()).unwrap().unwrap().keep();
        assert!(
            q.reserve("a", chrono::Utc::now()).is_err(),
            "4 counted + 6 in flight = 10"
        );
        // A new period starts the local count afresh.
        let next = (chrono::Utc::now() + chrono::Duration::days(33)).to_rfc3339();
        q.update(snap(3, 0, &next));
        assert!(q.reserve("a", chrono::Utc::now()).unwrap().is_some());
    }

    #[test]
    fn a_partial_answer_changes_only_the_consumers_it_names() {
        let q = QuotaState::default();
        let end = (chrono::Utc::now() + chrono::Duration::days(3)).to_rfc3339();
        let named = |consumer: &str, limit: Option<u64>, used: u64| QuotaEntry {
            consumer: consumer.into(),
            limit,
            ..entry(limit.unwrap_or(0), used, &end)
        };
        q.update(QuotaSnapshot {
            version: 1,
            epoch: 9,
            full: true,
            consumers: vec![named("a", Some(5), 5), named("b", Some(5), 5)],
        });
        assert!(
            q.reserve("a", chrono::Utc::now()).is_err()
                && q.reserve("b", chrono::Utc::now()).is_err()
        );
        q.update(QuotaSnapshot {
            version: 2,
            epoch: 9,
            full: false,
            consumers: vec![named("a", Some(10), 5)],
        });
        assert!(
            q.reserve("a", chrono::Utc::now()).is_ok(),
            "a's new limit applies"
        );
        assert!(
            q.reserve("b", chrono::Utc::now()).is_err(),
            "b is unchanged"
        );
        assert_eq!(q.position(), Some((2, 9)));
        q.update(QuotaSnapshot {
            version: 3,
            epoch: 9,
            full: false,
            consumers: vec![named("b", None, 5)],
        });
        assert!(
            q.reserve("b", chrono::Utc::now()).is_ok(),
            "an entry without a limit removes b"
        );
        let kept = q.snapshot();
        assert!(kept.full && kept.version == 3 && kept.consumers.len() == 1);
        // A full answer replaces everything.
        q.update(QuotaSnapshot {
            version: 1,
            epoch: 10,
            full: true,
            consumers: vec![],
        });
        assert!(q.reserve("a", chrono::Utc::now()).is_ok() && q.snapshot().consumers.is_empty());
    }

    #[test]
    fn the_state_turns_stale_past_its_age_limit_and_fresh_on_update() {
        let now = chrono::Utc::now().timestamp() as u64;
        assert_eq!(
            QuotaState::default().staleness(),
            Staleness::Fresh,
            "no limit: never stale"
        );
        let q = QuotaState::with_staleness(Some(30), WhenStale::Closed);
        assert_eq!(
            q.staleness(),
            Staleness::Stale(WhenStale::Closed),
            "never fetched"
        );
        q.updated_at.store(now - 10, Ordering::Relaxed);
        assert_eq!(q.staleness(), Staleness::Fresh);
        q.updated_at.store(now - 31, Ordering::Relaxed);
        assert_eq!(q.staleness(), Staleness::Stale(WhenStale::Closed));
        q.update(QuotaSnapshot {
            version: 1,
            epoch: 1,
            full: true,
            consumers: vec![],
        });
        assert_eq!(q.staleness(), Staleness::Fresh, "a poll makes it fresh");
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
