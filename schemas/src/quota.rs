//! The quota state: what the query API computes from the store and serves at `/v1/quota`, and
//! what every gateway reads, enforces and keeps on disk as its last known state. One type for
//! both sides of the wire.

use serde::{Deserialize, Serialize};

/// `/v1/quota`.
///
/// Gateways poll it with `?since=<version>&epoch=<epoch>` from their last answer and get only
/// the consumers whose entry changed after that version (`full: false`), so an idle deployment
/// with 100,000 consumers sends next to nothing. Versions are comparable only within one
/// query-API process (`epoch`); an answer to any other `since` is the whole state
/// (`full: true`), which replaces what the caller held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = Quota))]
pub struct QuotaSnapshot {
    /// When the state was computed (unix milliseconds); newer snapshots have larger versions.
    pub version: i64,
    /// The query-API process that computed it (random per start); `since` only applies to the
    /// same epoch.
    #[serde(default)]
    pub epoch: u64,
    /// True: every consumer (replace the state). False: only the entries that changed after
    /// the requested `since` (merge them; an entry without a limit removes one).
    #[serde(default = "full_by_default")]
    pub full: bool,
    pub consumers: Vec<QuotaEntry>,
}

fn full_by_default() -> bool {
    true
}

impl Default for QuotaSnapshot {
    fn default() -> Self {
        QuotaSnapshot {
            version: 0,
            epoch: 0,
            full: true,
            consumers: Vec::new(),
        }
    }
}

/// One consumer's quota in the current period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QuotaEntry {
    pub consumer: String,
    /// The consumer's plan.
    #[serde(default)]
    pub plan: Option<String>,
    /// The billing period, `YYYY-MM`.
    pub period: String,
    /// End of the period (RFC 3339, exclusive): the quota resets then.
    pub period_end: String,
    /// Billable requests allowed in the period; `None`: unlimited.
    pub limit: Option<u64>,
    /// Billable requests counted so far in the period.
    pub used: u64,
    /// `limit - used`, never negative; `None` when unlimited.
    pub remaining: Option<u64>,
    pub state: QuotaLevel,
}

impl QuotaEntry {
    /// An entry whose `remaining` and `state` follow from `limit` and `used`.
    pub fn new(
        consumer: String,
        plan: Option<String>,
        period: String,
        period_end: String,
        limit: Option<u64>,
        used: u64,
    ) -> QuotaEntry {
        QuotaEntry {
            consumer,
            plan,
            period,
            period_end,
            limit,
            used,
            remaining: limit.map(|l| l.saturating_sub(used)),
            state: QuotaLevel::of(limit, used),
        }
    }
}

/// How close a consumer is to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum QuotaLevel {
    Unlimited,
    Ok,
    /// 80 % or more used.
    Warning,
    Exceeded,
}

impl QuotaLevel {
    /// The level of `used` against `limit`.
    pub fn of(limit: Option<u64>, used: u64) -> QuotaLevel {
        match limit {
            None => QuotaLevel::Unlimited,
            Some(l) if used >= l => QuotaLevel::Exceeded,
            Some(l) if used.saturating_mul(5) >= l.saturating_mul(4) => QuotaLevel::Warning,
            Some(_) => QuotaLevel::Ok,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_thresholds() {
        assert_eq!(QuotaLevel::of(None, 5), QuotaLevel::Unlimited);
        assert_eq!(QuotaLevel::of(Some(10), 7), QuotaLevel::Ok);
        assert_eq!(QuotaLevel::of(Some(10), 8), QuotaLevel::Warning);
        assert_eq!(QuotaLevel::of(Some(10), 10), QuotaLevel::Exceeded);
    }

    #[test]
    fn round_trips_through_json() {
        let s = QuotaSnapshot {
            version: 7,
            epoch: 3,
            full: false,
            consumers: vec![QuotaEntry {
                consumer: "a".into(),
                plan: Some("pro".into()),
                period: "2026-11".into(),
                period_end: "2026-12-01T00:00:00Z".into(),
                limit: Some(10),
                used: 3,
                remaining: Some(7),
                state: QuotaLevel::Ok,
            }],
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"state\":\"ok\""), "{json}");
        assert_eq!(serde_json::from_str::<QuotaSnapshot>(&json).unwrap(), s);
    }
}
