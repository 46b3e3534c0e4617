//! `/v1/latency`, `/v1/usage` and `/v1/revenue`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};
use tollgate_store::{Filter, GroupKey, KeyValue, LatencyQuery};

use crate::AppState;
use crate::error::ApiError;
use crate::params::{Params, parse_quantiles, parse_step, period_of, rfc3339};
use crate::pricing;

type Raw = Query<HashMap<String, String>>;

fn key_json(k: &KeyValue) -> Value {
    match k {
        KeyValue::Null => Value::Null,
        KeyValue::Text(s) => Value::String(s.clone()),
        KeyValue::Int(i) => Value::from(*i),
    }
}

/// Most points one latency answer may hold.
const MAX_POINTS: i64 = 10_000;

pub async fn latency(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(raw): Raw,
) -> Result<Json<Value>, ApiError> {
    let caller = s.auth.caller(&headers)?;
    let p = Params::new(
        raw,
        &[
            "from",
            "to",
            "step",
            "route",
            "consumer",
            "quantiles",
            "group_by",
        ],
    )?;
    let (from_us, to_us) = p.window()?;
    let step_us = p.get("step").map(parse_step).transpose()?;
    if let Some(step) = step_us
        && (to_us - from_us) / step > MAX_POINTS
    {
        return Err(ApiError::bad(
            "step",
            format!("too small for this window: more than {MAX_POINTS} points"),
        ));
    }
    let quantiles = parse_quantiles(p.get("quantiles"))?;
    let group = p.group_by(&[GroupKey::Route, GroupKey::Consumer], &[GroupKey::Route])?;
    if !group.contains(&GroupKey::Route) {
        return Err(ApiError::bad(
            "group_by",
            "latency series are always per route: use `route` or `route,consumer`",
        ));
    }
    let consumer = caller.scope(p.get("consumer"))?;
    let query = LatencyQuery {
        filter: Filter {
            from_us,
            to_us,
            consumer: consumer.clone(),
            route: p.get("route").map(str::to_owned),
        },
        step_us,
        by_consumer: group.contains(&GroupKey::Consumer),
    };
    let rows = s.store.latency(&query).await?;
    let mut series: BTreeMap<(String, Option<String>), Vec<Value>> = BTreeMap::new();
    for r in rows {
        let mut qs = Map::new();
        for q in &quantiles {
            let v = r
                .histogram
                .quantile(*q)
                .map(|us| (us / 1000.0 * 1000.0).round() / 1000.0);
            qs.insert(format!("{q}"), json!(v));
        }
        let point = json!({
            "t": rfc3339(r.t_us),
            "count": r.histogram.count(),
            "errors": r.errors,
            "quantiles_ms": qs,
        });
        let series_consumer = r.consumer.or_else(|| consumer.clone());
        series
            .entry((r.route, series_consumer))
            .or_default()
            .push(point);
    }
    let series: Vec<Value> = series
        .into_iter()
        .map(|((route, consumer), points)| json!({"route": route, "consumer": consumer, "points": points}))
        .collect();
    Ok(Json(json!({
        "from": rfc3339(from_us),
        "to": rfc3339(to_us),
        "step_ms": step_us.map(|s| s / 1000),
        "relative_error": tollgate_store::sketch::RELATIVE_ERROR,
        "series": series,
    })))
}

pub async fn usage(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(raw): Raw,
) -> Result<Json<Value>, ApiError> {
    let caller = s.auth.caller(&headers)?;
    let p = Params::new(raw, &["from", "to", "consumer", "route", "group_by"])?;
    let (from_us, to_us) = p.window()?;
    let group = p.group_by(
        &[
            GroupKey::Consumer,
            GroupKey::Route,
            GroupKey::Day,
            GroupKey::Status,
            GroupKey::Plan,
        ],
        &[GroupKey::Consumer],
    )?;
    let filter = Filter {
        from_us,
        to_us,
        consumer: caller.scope(p.get("consumer"))?,
        route: p.get("route").map(str::to_owned),
    };
    let rows = s.store.usage(&filter, &group).await?;
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            let mut o = Map::new();
            for (k, v) in group.iter().zip(&r.keys) {
                o.insert(k.as_str().into(), key_json(v));
            }
            o.insert("requests".into(), r.requests.into());
            o.insert("billable_requests".into(), r.billable_requests.into());
            o.insert("req_bytes".into(), r.req_bytes.into());
            o.insert("resp_bytes".into(), r.resp_bytes.into());
            Value::Object(o)
        })
        .collect();
    Ok(Json(
        json!({"from": rfc3339(from_us), "to": rfc3339(to_us), "rows": rows}),
    ))
}

/// Billable requests and revenue of one consumer × plan × route on one day.
#[derive(Debug, Clone)]
pub(crate) struct Priced {
    pub consumer: String,
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
/// route from the start of the month.
pub(crate) async fn priced(
    s: &AppState,
    from_us: i64,
    to_us: i64,
    consumer: Option<String>,
    route: Option<String>,
) -> Result<Vec<Priced>, ApiError> {
    let mut out = Vec::new();
    let mut cursor = from_us;
    while cursor < to_us {
        let (ps, pe) = period_of(cursor);
        let (a, b) = (cursor, to_us.min(pe));
        let filter = |from_us, to_us| Filter {
            from_us,
            to_us,
            consumer: consumer.clone(),
            route: route.clone(),
        };
        let mut cumulative: HashMap<(String, Option<String>, Option<String>), u64> = HashMap::new();
        if a > ps {
            for r in s
                .store
                .usage(
                    &filter(ps, a),
                    &[GroupKey::Consumer, GroupKey::Plan, GroupKey::Route],
                )
                .await?
            {
                if let Some(c) = text(&r.keys[0]) {
                    cumulative.insert((c, text(&r.keys[1]), text(&r.keys[2])), r.billable_requests);
                }
            }
        }
        // Sorted by consumer, plan, route, then day: tiers advance in time order.
        let rows = s
            .store
            .usage(
                &filter(a, b),
                &[
                    GroupKey::Consumer,
                    GroupKey::Plan,
                    GroupKey::Route,
                    GroupKey::Day,
                ],
            )
            .await?;
        for r in rows {
            let Some(c) = text(&r.keys[0]) else { continue }; // anonymous traffic is never billed
            let plan = text(&r.keys[1]);
            let route = text(&r.keys[2]);
            let before = cumulative
                .entry((c.clone(), plan.clone(), route.clone()))
                .or_insert(0);
            let pricing = s
                .plan(plan.as_deref(), Some(&c))
                .and_then(|(_, p)| p.pricing.as_ref());
            let charge = pricing.and_then(|p| p.charge_for(route.as_deref().unwrap_or("default")));
            let revenue = charge
                .map(|ch| pricing::incremental(ch, *before, r.billable_requests))
                .unwrap_or_default();
            *before += r.billable_requests;
            out.push(Priced {
                consumer: c,
                route,
                day: r.keys[3].clone(),
                billable: r.billable_requests,
                revenue,
                currency: pricing.map(|p| p.currency.clone()),
            });
        }
        cursor = b;
    }
    Ok(out)
}

/// A decimal as the API writes money: exact, without trailing zeros.
pub(crate) fn money(d: Decimal) -> String {
    d.normalize().to_string()
}

pub async fn revenue(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(raw): Raw,
) -> Result<Json<Value>, ApiError> {
    let caller = s.auth.caller(&headers)?;
    let p = Params::new(raw, &["from", "to", "consumer", "route", "group_by"])?;
    let (from_us, to_us) = p.window()?;
    let group = p.group_by(
        &[GroupKey::Consumer, GroupKey::Route, GroupKey::Day],
        &[GroupKey::Consumer],
    )?;
    let consumer = caller.scope(p.get("consumer"))?;
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
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|(keys, (billable, revenue, cur))| {
            let mut o = Map::new();
            for (k, v) in group.iter().zip(&keys) {
                o.insert(k.as_str().into(), key_json(v));
            }
            o.insert("billable_requests".into(), billable.into());
            o.insert("revenue".into(), money(revenue).into());
            o.insert("currency".into(), json!(cur.or_else(|| currency.clone())));
            Value::Object(o)
        })
        .collect();
    Ok(Json(
        json!({"from": rfc3339(from_us), "to": rfc3339(to_us), "currency": currency, "rows": rows}),
    ))
}
