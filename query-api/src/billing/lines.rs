//! The line items of a billing period: one per consumer × plan × route with the period's
//! billable quantity and its charge, plus adjustment lines for late events of periods whose
//! export was already published.
//!
//! # Adjustments
//!
//! A published export never changes. An event that reaches the store after its period's export
//! was published (a gateway's spool replayed after a long broker outage, say) is billed in the
//! next export made: its adjustment lines carry the period they belong to (`for_period`). For
//! every published period `X` before the export's period `T`, each consumer × plan × route gets
//! `now − billed` units, where `billed` is `X`'s published quantity plus the adjustments for `X`
//! in the published exports between `X` and `T`, priced as the charge of `now` minus the charge
//! of `billed` under `X`'s tiers: the units continue `X`'s cumulative count, so the period's
//! total charge is what it would have been had every event been on time.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tollgate_store::{Filter, GroupKey, KeyValue, StoredExport};

use crate::AppState;
use crate::error::ApiError;
use crate::pricing;

/// What a line bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// The period's own usage.
    Usage,
    /// Late usage of an earlier period whose export was already published.
    Adjustment,
}

impl LineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::Usage => "usage",
            LineKind::Adjustment => "adjustment",
        }
    }
}

/// One billing line item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub consumer: String,
    pub plan: String,
    pub route: String,
    pub quantity: u64,
    /// Exact decimal (a string in JSON).
    pub amount: Decimal,
    pub currency: String,
    pub kind: LineKind,
    /// The period the quantity was used in: the export's own for usage lines.
    pub for_period: String,
}

/// The charge of `quantity` units of `route` under `plan` for `consumer`'s lines, and the
/// currency it is in.
fn price(s: &AppState, consumer: &str, plan: Option<&str>, route: &str) -> PriceOf {
    let resolved = s.plan(plan, Some(consumer));
    let pricing = resolved.and_then(|(_, p)| p.pricing.as_ref());
    PriceOf {
        plan: resolved
            .map(|(n, _)| n.to_string())
            .or(plan.map(str::to_owned))
            .unwrap_or_default(),
        charge: pricing.and_then(|p| p.charge_for(route)).cloned(),
        // A free plan has no currency of its own: its zero is in the deployment's currency.
        currency: pricing
            .map(|p| p.currency.clone())
            .or_else(|| s.deployment_currency())
            .unwrap_or_default(),
    }
}

struct PriceOf {
    plan: String,
    charge: Option<tollgate_schemas::config::Charge>,
    currency: String,
}

impl PriceOf {
    fn charge(&self, quantity: u64) -> Decimal {
        self.charge
            .as_ref()
            .map(|c| pricing::charge(c, quantity))
            .unwrap_or_default()
    }
}

/// The usage lines of the period `[start, end)` named `period`, every consumer, sorted by
/// consumer, plan and route.
pub async fn usage_lines(
    s: &AppState,
    period: &str,
    start: i64,
    end: i64,
) -> Result<Vec<Line>, ApiError> {
    let filter = Filter {
        from_us: start,
        to_us: end,
        consumer: None,
        route: None,
    };
    let rows = s
        .store
        .usage(
            &filter,
            &[GroupKey::Consumer, GroupKey::Plan, GroupKey::Route],
        )
        .await?;
    let mut out = Vec::new();
    for r in rows {
        let (KeyValue::Text(consumer), plan, route) = (&r.keys[0], &r.keys[1], &r.keys[2]) else {
            continue;
        };
        let plan = match plan {
            KeyValue::Text(p) => Some(p.as_str()),
            _ => None,
        };
        let KeyValue::Text(route) = route else {
            continue; // unmatched requests are never billed
        };
        let p = price(s, consumer, plan, route);
        out.push(Line {
            consumer: consumer.clone(),
            plan: p.plan.clone(),
            route: route.clone(),
            quantity: r.billable_requests,
            amount: p.charge(r.billable_requests),
            currency: p.currency,
            kind: LineKind::Usage,
            for_period: period.to_string(),
        });
    }
    Ok(out)
}

/// The lines of a published export.
pub fn parse_lines(export: &StoredExport) -> Result<Vec<Line>, ApiError> {
    export
        .lines
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| {
                ApiError::Internal(format!(
                    "published export {} of {} has a bad line: {e}",
                    export.id, export.period
                ))
            })
        })
        .collect()
}

type Key = (String, String, String);

/// Adjustment lines for an export of `period`: late usage of every earlier published period
/// (see the module docs), sorted by period, consumer, plan and route.
pub async fn adjustments(s: &AppState, period: &str) -> Result<Vec<Line>, ApiError> {
    let mut published = Vec::new();
    for e in s.store.published_exports().await? {
        if e.period.as_str() >= period {
            continue;
        }
        let Some(full) = s.store.published_export(&e.period).await? else {
            continue;
        };
        published.push((e.period.clone(), parse_lines(&full)?));
    }
    let mut out = Vec::new();
    for (x, _) in &published {
        // What was billed for `x`: its own usage lines and the adjustments for it since.
        let mut billed: BTreeMap<Key, u64> = BTreeMap::new();
        for (y, lines) in &published {
            for l in lines.iter().filter(|l| &l.for_period == x) {
                if y == x || l.kind == LineKind::Adjustment {
                    *billed
                        .entry((l.consumer.clone(), l.plan.clone(), l.route.clone()))
                        .or_default() += l.quantity;
                }
            }
        }
        let (start, end) = crate::params::parse_period(x)?;
        for now in usage_lines(s, x, start, end).await? {
            let key = (now.consumer.clone(), now.plan.clone(), now.route.clone());
            let before = billed.get(&key).copied().unwrap_or(0);
            if now.quantity <= before {
                continue;
            }
            let p = price(s, &now.consumer, Some(&now.plan), &now.route);
            out.push(Line {
                quantity: now.quantity - before,
                amount: p.charge(now.quantity) - p.charge(before),
                kind: LineKind::Adjustment,
                ..now
            });
        }
    }
    Ok(out)
}

/// Totals per consumer and currency, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Total {
    pub consumer: String,
    pub currency: String,
    pub quantity: u64,
    pub amount: Decimal,
}

pub fn totals(lines: &[Line]) -> Vec<Total> {
    let mut sums: BTreeMap<(String, String), (u64, Decimal)> = BTreeMap::new();
    for l in lines {
        let e = sums
            .entry((l.consumer.clone(), l.currency.clone()))
            .or_default();
        e.0 += l.quantity;
        e.1 += l.amount;
    }
    sums.into_iter()
        .map(|((consumer, currency), (quantity, amount))| Total {
            consumer,
            currency,
            quantity,
            amount: amount.normalize(),
        })
        .collect()
}
