//! Revenue for business reports (`/v1/revenue`): exact decimal charges per consumer, plan, route
//! and day, from the plans' pricing (`pricing.rs`) applied to billable usage, with graduated tiers
//! cumulative from the start of each month. Billing exports (`billing.rs`) use the same decimal
//! form ([`money`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use rust_decimal::Decimal;
use serde::Serialize;
use tollgate_store::{Filter, GroupKey, KeyValue};

use crate::AppState;
use crate::auth::Scope;
use crate::error::ApiError;
use crate::params::{Params, period_name, period_of, rfc3339};
use crate::pricing;
use crate::reports::{GroupKeys, Raw};

/// The query parameters `/v1/revenue` accepts.
pub(crate) const REVENUE_PARAMS: &[&str] = &["from", "to", "consumer", "route", "group_by", "top"];

/// The body of `/v1/revenue`.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevenueAnswer {
    from: String,
    to: String,
    /// The one currency every priced plan uses; `null` when plans use several (see each row).
    currency: Option<String>,
    rows: Vec<RevenueRow>,
}

/// Billable requests and exact revenue of one group.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevenueRow {
    #[serde(flatten)]
    keys: GroupKeys,
    billable_requests: u64,
    /// Exact decimal.
    #[cfg_attr(feature = "openapi", schema(pattern = "^-?[0-9]+(\\.[0-9]+)?$"))]
    revenue: String,
    currency: Option<String>,
}

/// Billable requests and revenue of one consumer × plan × route on one day.
#[derive(Debug, Clone)]
pub(crate) struct Priced {
    pub consumer: String,
    /// The plan the usage was served under (the consumer's configured one for events without).
    pub plan: Option<String>,
    pub route: Option<String>,
    pub day: KeyValue,
    pub billable: u64,
    pub revenue: Decimal,
    pub currency: Option<String>,
}

fn text(k: &KeyValue) -> Option<String> {
    match k {
        KeyValue::Text(s) => Some(s.clone()),
        _ => None,
    }
}

/// Revenue over `[from, to)`, exact: within each calendar month, the charge of the usage up to a
/// day's end minus the charge of the usage up to its start, with tiers cumulative per consumer ×
/// plan × route from the start of the month.
///
/// Two store queries whatever the window's length: the usage of the first month before `from`
/// (the tiers' starting point), and the usage within the window by day. Later months start from
/// zero, and their days arrive in order.
pub(crate) async fn priced(
    s: &AppState,
    from_us: i64,
    to_us: i64,
    consumer: Option<String>,
    route: Option<String>,
) -> Result<Vec<Priced>, ApiError> {
    let filter = |from_us, to_us| Filter {
        from_us,
        to_us,
        consumer: consumer.clone(),
        route: route.clone(),
    };
    type Line = (String, Option<String>, Option<String>);
    let (first_month_start, _) = period_of(from_us);
    let first_month = period_name(first_month_start);
    // Billable usage of each line since the start of the month being walked: (month, count).
    let mut cumulative: HashMap<Line, (String, u64)> = HashMap::new();
    if from_us > first_month_start {
        let keys = [GroupKey::Consumer, GroupKey::Plan, GroupKey::Route];
        for r in s
            .store
            .usage(&filter(first_month_start, from_us), &keys)
            .await?
        {
            if let Some(c) = text(&r.keys[0]) {
                cumulative.insert(
                    (c, text(&r.keys[1]), text(&r.keys[2])),
                    (first_month.clone(), r.billable_requests),
                );
            }
        }
    }
    // Sorted by consumer, plan, route, then day: tiers advance in time order.
    let keys = [
        GroupKey::Consumer,
        GroupKey::Plan,
        GroupKey::Route,
        GroupKey::Day,
    ];
    let rows = s.store.usage(&filter(from_us, to_us), &keys).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(c) = text(&r.keys[0]) else { continue }; // anonymous traffic is never billed
        let plan = text(&r.keys[1]);
        let route = text(&r.keys[2]);
        let month = text(&r.keys[3])
            .map(|d| d[..7].to_string())
            .unwrap_or_default();
        let entry = cumulative
            .entry((c.clone(), plan.clone(), route.clone()))
            .or_insert_with(|| (month.clone(), 0));
        if entry.0 != month {
            *entry = (month, 0); // a new month: tiers start again
        }
        let resolved = s.plan(plan.as_deref(), Some(&c));
        let pricing = resolved.and_then(|(_, p)| p.pricing.as_ref());
        let charge = pricing.and_then(|p| p.charge_for(route.as_deref().unwrap_or("default")));
        let revenue = charge
            .map(|ch| pricing::incremental(ch, entry.1, r.billable_requests))
            .unwrap_or_default();
        entry.1 += r.billable_requests;
        out.push(Priced {
            consumer: c,
            plan: resolved.map(|(n, _)| n.to_string()).or(plan),
            route,
            day: r.keys[3].clone(),
            billable: r.billable_requests,
            revenue,
            currency: pricing.map(|p| p.currency.clone()),
        });
    }
    Ok(out)
}

/// A decimal as the API writes money: exact, without trailing zeros.
pub(crate) fn money(d: Decimal) -> String {
    d.normalize().to_string()
}

pub async fn revenue(
    State(s): State<Arc<AppState>>,
    Scope(consumer): Scope,
    Query(raw): Raw,
) -> Result<Json<RevenueAnswer>, ApiError> {
    let p = Params::new(raw, REVENUE_PARAMS)?;
    let (from_us, to_us) = p.window()?;
    let group = p.group_by(
        &[
            GroupKey::Consumer,
            GroupKey::Route,
            GroupKey::Plan,
            GroupKey::Day,
        ],
        &[GroupKey::Consumer],
    )?;
    let top = match p.get("top") {
        None => None,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=10_000).contains(&n) => Some(n),
            _ => {
                return Err(ApiError::bad(
                    "top",
                    format!("`{v}` is not a whole number from 1 to 10000"),
                ));
            }
        },
    };
    let atoms = priced(
        &s,
        from_us,
        to_us,
        consumer,
        p.get("route").map(str::to_owned),
    )
    .await?;
    let mut rows: BTreeMap<Vec<KeyValue>, (u64, Decimal, Option<String>)> = BTreeMap::new();
    for a in atoms {
        let key: Vec<KeyValue> = group
            .iter()
            .map(|k| match k {
                GroupKey::Consumer => KeyValue::Text(a.consumer.clone()),
                GroupKey::Route => a
                    .route
                    .clone()
                    .map(KeyValue::Text)
                    .unwrap_or(KeyValue::Null),
                GroupKey::Plan => a.plan.clone().map(KeyValue::Text).unwrap_or(KeyValue::Null),
                _ => a.day.clone(),
            })
            .collect();
        let e = rows
            .entry(key)
            .or_insert((0, Decimal::ZERO, a.currency.clone()));
        e.0 += a.billable;
        e.1 += a.revenue;
        if e.2 != a.currency {
            e.2 = e.2.take().or(a.currency);
        }
    }
    let currency = s.deployment_currency();
    let mut rows: Vec<_> = rows.into_iter().collect();
    if let Some(n) = top {
        // The top rows by revenue (highest first; equal revenue by keys), e.g. top consumers.
        rows.sort_by(|a, b| b.1.1.cmp(&a.1.1).then_with(|| a.0.cmp(&b.0)));
        rows.truncate(n);
    }
    let rows = rows
        .into_iter()
        .map(|(keys, (billable, revenue, cur))| RevenueRow {
            keys: GroupKeys::of(&group, &keys),
            billable_requests: billable,
            revenue: money(revenue),
            currency: cur.or_else(|| currency.clone()),
        })
        .collect();
    Ok(Json(RevenueAnswer {
        from: rfc3339(from_us),
        to: rfc3339(to_us),
        currency,
        rows,
    }))
}
