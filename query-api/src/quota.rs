//! `/v1/quota`: each consumer's billable requests in the current period against its plan's
//! quota, the state every gateway enforces.
//!
//! The state is computed at most once per [`REFRESH`] whatever the number of callers, and kept
//! with the version at which each consumer's entry last changed. A gateway asks with the
//! `since` version and `epoch` of its last answer and gets only what changed after it, so with
//! 100,000 consumers an idle deployment moves a few bytes a second instead of rebuilding
//! megabytes of JSON on both sides. Any other `since` (none, or from another query-API process
//! or one this process no longer knows) gets the whole state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use tollgate_schemas::quota::{QuotaEntry, QuotaLevel, QuotaSnapshot};
use tollgate_store::{Filter, GroupKey, KeyValue};

use crate::AppState;
use crate::error::ApiError;
use crate::params::{Params, period_name, period_of, rfc3339};

/// How old the computed state may be before a request recomputes it.
pub const REFRESH: Duration = Duration::from_millis(250);

/// The last computed state, shared by every caller.
#[derive(Debug)]
pub struct QuotaCache {
    /// Random per process: versions of another process do not compare.
    epoch: u64,
    /// The first version this process computed: a `since` before it is unknown here.
    base: Option<i64>,
    version: i64,
    computed_at: Option<Instant>,
    /// Per configured consumer (same order): its entry and the version it last changed at.
    entries: Vec<(QuotaEntry, i64)>,
}

impl Default for QuotaCache {
    fn default() -> Self {
        QuotaCache {
            epoch: rand_epoch(),
            base: None,
            version: 0,
            computed_at: None,
            entries: Vec::new(),
        }
    }
}

fn rand_epoch() -> u64 {
    // The low half of a v7 UUID is random (62 bits): enough to tell processes apart.
    uuid::Uuid::now_v7().as_u64_pair().1
}

impl QuotaCache {
    /// The answer for a caller holding the state at `since` of `epoch`, scoped to `scope`.
    fn answer(&self, since: Option<(i64, u64)>, scope: Option<&str>) -> QuotaSnapshot {
        let known = since.filter(|(v, e)| {
            *e == self.epoch && scope.is_none() && self.base.is_some_and(|b| *v >= b)
        });
        let consumers = self
            .entries
            .iter()
            .filter(|(e, changed)| {
                scope.is_none_or(|sc| sc == e.consumer)
                    && known.is_none_or(|(since, _)| *changed > since)
            })
            .map(|(e, _)| e.clone())
            .collect();
        QuotaSnapshot {
            version: self.version,
            epoch: self.epoch,
            full: known.is_none(),
            consumers,
        }
    }
}

/// Recomputes the state when it is older than [`REFRESH`].
async fn refresh(s: &AppState, cache: &mut QuotaCache) -> Result<(), ApiError> {
    if cache.computed_at.is_some_and(|t| t.elapsed() < REFRESH) {
        return Ok(());
    }
    let now = chrono::Utc::now().timestamp_micros();
    let (start, end) = period_of(now);
    let filter = Filter {
        from_us: start,
        to_us: end,
        consumer: None,
        route: None,
    };
    let used: HashMap<String, u64> = s
        .store
        .usage(&filter, &[GroupKey::Consumer])
        .await?
        .into_iter()
        .filter_map(|r| match &r.keys[0] {
            KeyValue::Text(c) => Some((c.clone(), r.billable_requests)),
            _ => None,
        })
        .collect();
    let version = (now / 1000).max(cache.version + 1);
    let (period, period_end) = (period_name(start), rfc3339(end));
    let fresh: Vec<QuotaEntry> = s
        .consumers
        .iter()
        .map(|c| {
            let limit = s
                .plans
                .get(&c.plan)
                .and_then(|p| p.quota.as_ref())
                .map(|q| q.requests);
            let used = used.get(&c.id).copied().unwrap_or(0);
            QuotaEntry {
                consumer: c.id.clone(),
                plan: Some(c.plan.clone()),
                period: period.clone(),
                period_end: period_end.clone(),
                limit,
                used,
                remaining: limit.map(|l| l.saturating_sub(used)),
                state: QuotaLevel::of(limit, used),
            }
        })
        .collect();
    let old = std::mem::take(&mut cache.entries);
    cache.entries = fresh
        .into_iter()
        .enumerate()
        .map(|(i, e)| match old.get(i) {
            Some((prev, changed)) if *prev == e => (e, *changed),
            _ => (e, version),
        })
        .collect();
    cache.version = version;
    cache.base.get_or_insert(version);
    cache.computed_at = Some(Instant::now());
    Ok(())
}

pub async fn quota(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Json<QuotaSnapshot>, ApiError> {
    let caller = s.auth.caller(&headers)?;
    let p = Params::new(raw, &["consumer", "since", "epoch"])?;
    let scope = caller.scope(p.get("consumer"))?;
    let since: Option<i64> = integer(&p, "since")?;
    let epoch: Option<u64> = integer(&p, "epoch")?;
    if since.is_some() != epoch.is_some() {
        return Err(ApiError::bad("since", "`since` and `epoch` go together"));
    }
    let mut cache = s.quota.lock().await;
    refresh(&s, &mut cache).await?;
    Ok(Json(cache.answer(since.zip(epoch), scope.as_deref())))
}

/// An optional integer parameter.
fn integer<T: std::str::FromStr>(p: &Params, name: &'static str) -> Result<Option<T>, ApiError> {
    p.get(name)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad(name, format!("`{v}` is not an integer")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(consumer: &str, used: u64) -> QuotaEntry {
        QuotaEntry {
            consumer: consumer.into(),
            plan: None,
            period: "2026-11".into(),
            period_end: "2026-12-01T00:00:00.000Z".into(),
            limit: Some(10),
            used,
            remaining: Some(10 - used),
            state: QuotaLevel::of(Some(10), used),
        }
    }

    #[test]
    fn a_caller_gets_what_changed_since_its_version_of_this_epoch_and_otherwise_everything() {
        let cache = QuotaCache {
            epoch: 7,
            base: Some(100),
            version: 300,
            computed_at: None,
            entries: vec![
                (entry("a", 1), 100),
                (entry("b", 2), 200),
                (entry("c", 3), 300),
            ],
        };
        let names = |s: &QuotaSnapshot| -> Vec<String> {
            s.consumers.iter().map(|e| e.consumer.clone()).collect()
        };
        let delta = cache.answer(Some((200, 7)), None);
        assert!(!delta.full);
        assert_eq!(names(&delta), ["c"]);
        assert_eq!(delta.version, 300);
        assert!(cache.answer(Some((300, 7)), None).consumers.is_empty());
        for full in [
            cache.answer(None, None),
            cache.answer(Some((200, 8)), None), // another process
            cache.answer(Some((50, 7)), None),  // before this process knew
        ] {
            assert!(full.full);
            assert_eq!(names(&full), ["a", "b", "c"]);
        }
        let own = cache.answer(Some((200, 7)), Some("a"));
        assert!(own.full);
        assert_eq!(names(&own), ["a"]);
    }
}
