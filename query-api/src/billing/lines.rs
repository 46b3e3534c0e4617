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
//! total charge is what it would have been had every event been on time. When a consumer × plan
//! of `X` has late usage and the plan has a minimum, its minimum line is recomputed the same way
//! (`minimum_adjustment`, the difference from what was billed).
//!
//! # Plan changes and minimums
//!
//! Events carry the plan they were served under, so a consumer that changes plan inside a
//! period has lines under each plan: each plan prices its own part, its tiers counting from
//! zero, and each part's minimum applies to it.

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
    /// What a consumer pays on top of its charges to reach its plan's minimum for the period
    /// (`pricing.minimum`); `route` is empty and `quantity` 0.
    Minimum,
    /// A change of an earlier published period's minimum line that late usage made (negative
    /// when the late usage counts towards the minimum already paid).
    MinimumAdjustment,
}

impl LineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::Usage => "usage",
            LineKind::Adjustment => "adjustment",
            LineKind::Minimum => "minimum",
            LineKind::MinimumAdjustment => "minimum_adjustment",
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
        // What was billed for `x`: units per consumer × plan × route, and minimum amounts per
        // consumer × plan, from its own export and the adjustments for it since.
        let mut billed: BTreeMap<Key, u64> = BTreeMap::new();
        let mut billed_minimum: BTreeMap<(String, String), Decimal> = BTreeMap::new();
        for (y, lines) in &published {
            for l in lines.iter().filter(|l| &l.for_period == x) {
                let own = y == x;
                match l.kind {
                    LineKind::Usage if own => {}
                    LineKind::Adjustment => {}
                    LineKind::Minimum if own => {
                        *billed_minimum
                            .entry((l.consumer.clone(), l.plan.clone()))
                            .or_default() += l.amount;
                        continue;
                    }
                    LineKind::MinimumAdjustment => {
                        *billed_minimum
                            .entry((l.consumer.clone(), l.plan.clone()))
                            .or_default() += l.amount;
                        continue;
                    }
                    _ => continue,
                }
                *billed
                    .entry((l.consumer.clone(), l.plan.clone(), l.route.clone()))
                    .or_default() += l.quantity;
            }
        }
        let (start, end) = crate::params::parse_period(x)?;
        let now_lines = period_lines(s, x, start, end).await?;
        let mut changed: std::collections::BTreeSet<(String, String)> = Default::default();
        for now in now_lines.iter().filter(|l| l.kind == LineKind::Usage) {
            let key = (now.consumer.clone(), now.plan.clone(), now.route.clone());
            let before = billed.get(&key).copied().unwrap_or(0);
            if now.quantity <= before {
                continue;
            }
            let p = price(s, &now.consumer, Some(&now.plan), &now.route);
            changed.insert((now.consumer.clone(), now.plan.clone()));
            out.push(Line {
                quantity: now.quantity - before,
                amount: p.charge(now.quantity) - p.charge(before),
                kind: LineKind::Adjustment,
                ..now.clone()
            });
        }
        // A minimum is revisited only where late usage changed the charges (a pricing change
        // made after publishing never rewrites what was billed).
        for (consumer, plan) in changed {
            let now_minimum = now_lines
                .iter()
                .find(|l| l.kind == LineKind::Minimum && l.consumer == consumer && l.plan == plan)
                .map_or(Decimal::ZERO, |l| l.amount);
            let before = billed_minimum
                .get(&(consumer.clone(), plan.clone()))
                .copied()
                .unwrap_or_default();
            if now_minimum == before {
                continue;
            }
            let currency = price(s, &consumer, Some(&plan), "").currency;
            out.push(Line {
                consumer,
                plan,
                route: String::new(),
                quantity: 0,
                amount: now_minimum - before,
                currency,
                kind: LineKind::MinimumAdjustment,
                for_period: x.clone(),
            });
        }
    }
    Ok(out)
}

/// The period's lines: its usage, and a minimum line per consumer × plan whose charges fall
/// short of the plan's minimum.
pub async fn period_lines(
    s: &AppState,
    period: &str,
    start: i64,
    end: i64,
) -> Result<Vec<Line>, ApiError> {
    let mut lines = usage_lines(s, period, start, end).await?;
    let minimums = minimum_lines(s, &lines);
    lines.extend(minimums);
    Ok(lines)
}

/// A minimum line for each consumer × plan of `usage` (one period's usage lines) whose
/// charges add up to less than its plan's `pricing.minimum`.
fn minimum_lines(s: &AppState, usage: &[Line]) -> Vec<Line> {
    let mut sums: BTreeMap<(&str, &str), (Decimal, &Line)> = BTreeMap::new();
    for l in usage.iter().filter(|l| l.kind == LineKind::Usage) {
        sums.entry((&l.consumer, &l.plan))
            .or_insert((Decimal::ZERO, l))
            .0 += l.amount;
    }
    let mut out = Vec::new();
    for ((consumer, plan), (sum, first)) in sums {
        let Some(pricing) = s.plans.get(plan).and_then(|p| p.pricing.as_ref()) else {
            continue;
        };
        let Some(minimum) = pricing.minimum.filter(|m| sum < *m) else {
            continue;
        };
        out.push(Line {
            consumer: consumer.to_string(),
            plan: plan.to_string(),
            route: String::new(),
            quantity: 0,
            amount: minimum - sum,
            currency: pricing.currency.clone(),
            kind: LineKind::Minimum,
            for_period: first.for_period.clone(),
        });
    }
    out
}

/// Totals per consumer and currency, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Total {
    pub consumer: String,
    pub currency: String,
    pub quantity: u64,
    /// Exact decimal.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
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
