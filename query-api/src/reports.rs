//! `/v1/latency`, `/v1/usage` and `/v1/revenue`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::auth::Scope;
use axum::Json;
use axum::extract::{Query, State};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tollgate_store::{Filter, GroupKey, KeyValue, LatencyQuery};

use crate::AppState;
use crate::error::ApiError;
use crate::params::{Params, parse_quantiles, parse_step, period_name, period_of, rfc3339};
use crate::pricing;

type Raw = Query<HashMap<String, String>>;

fn key_json(k: &KeyValue) -> Value {
    match k {
        KeyValue::Null => Value::Null,
        KeyValue::Text(s) => Value::String(s.clone()),
        KeyValue::Int(i) => Value::from(*i),
    }
}

/// A row's group keys as a JSON object: `{"consumer": .., "day": ..}`.
fn keys_object(group: &[GroupKey], keys: &[KeyValue]) -> Map<String, Value> {
    group
        .iter()
        .zip(keys)
        .map(|(k, v)| (k.as_str().to_string(), key_json(v)))
        .collect()
}

/// Most points one latency answer may hold.
const MAX_POINTS: i64 = 10_000;

pub async fn latency(
    State(s): State<Arc<AppState>>,
    Scope(consumer): Scope,
    Query(raw): Raw,
) -> Result<Json<LatencyAnswer>, ApiError> {
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
    let query = LatencyQuery {
        filter: Filter {
            from_us,
            to_us,
            consumer: consumer.clone(),
            route: p.get("route").map(str::to_owned),
        },
        step_us,
        by_consumer: group.contains(&GroupKey::Consumer),
        quantiles: quantiles.clone(),
    };
    let rows = s.store.latency(&query).await?;
    // Typed rows serialized straight to the body: a day per minute is thousands of points, and
    // building them as `serde_json::Value` trees first cost more than the query.
    let levels: Arc<[String]> = quantiles.iter().map(|q| format!("{q}")).collect();
    let mut series: Vec<Series> = Vec::new();
    for r in rows {
        let series_consumer = r.consumer.or_else(|| consumer.clone());
        if series
            .last()
            .is_none_or(|s| s.route != r.route || s.consumer != series_consumer)
        {
            series.push(Series {
                route: r.route,
                consumer: series_consumer,
                points: Vec::new(),
            });
        }
        let quantiles_ms = r
            .quantiles_us
            .iter()
            .map(|us| {
                us.is_finite()
                    .then(|| (us / 1000.0 * 1000.0).round() / 1000.0)
            })
            .collect();
        let current = series.last_mut().expect("pushed above");
        current.points.push(Point {
            t: rfc3339(r.t_us),
            count: r.count,
            errors: r.errors,
            quantiles_ms: Quantiles {
                levels: levels.clone(),
                values: quantiles_ms,
            },
        });
    }
    Ok(Json(LatencyAnswer {
        from: rfc3339(from_us),
        to: rfc3339(to_us),
        step_ms: step_us.map(|s| s / 1000),
        relative_error: tollgate_store::sketch::RELATIVE_ERROR,
        series,
    }))
}

/// The body of `/v1/latency`.
#[derive(Serialize)]
pub struct LatencyAnswer {
    from: String,
    to: String,
    step_ms: Option<i64>,
    relative_error: f64,
    series: Vec<Series>,
}

#[derive(Serialize)]
struct Series {
    route: String,
    consumer: Option<String>,
    points: Vec<Point>,
}

#[derive(Serialize)]
struct Point {
    t: String,
    count: u64,
    errors: u64,
    quantiles_ms: Quantiles,
}

/// `{"0.5": ms, "0.99": ms}` in the order the levels were asked for (`null` when empty).
struct Quantiles {
    levels: Arc<[String]>,
    values: Vec<Option<f64>>,
}

impl serde::Serialize for Quantiles {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.values.len()))?;
        for (level, v) in self.levels.iter().zip(&self.values) {
            m.serialize_entry(level, v)?;
        }
        m.end()
    }
}

pub async fn usage(
    State(s): State<Arc<AppState>>,
    Scope(consumer): Scope,
    Query(raw): Raw,
) -> Result<Json<Value>, ApiError> {
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
        consumer,
        route: p.get("route").map(str::to_owned),
    };
    let rows = s.store.usage(&filter, &group).await?;
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            let mut o = keys_object(&group, &r.keys);
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
        let pricing = s
            .plan(plan.as_deref(), Some(&c))
            .and_then(|(_, p)| p.pricing.as_ref());
        let charge = pricing.and_then(|p| p.charge_for(route.as_deref().unwrap_or("default")));
        let revenue = charge
            .map(|ch| pricing::incremental(ch, entry.1, r.billable_requests))
            .unwrap_or_default();
        entry.1 += r.billable_requests;
        out.push(Priced {
            consumer: c,
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
) -> Result<Json<Value>, ApiError> {
    let p = Params::new(raw, &["from", "to", "consumer", "route", "group_by"])?;
    let (from_us, to_us) = p.window()?;
    let group = p.group_by(
        &[GroupKey::Consumer, GroupKey::Route, GroupKey::Day],
        &[GroupKey::Consumer],
    )?;
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
            let mut o = keys_object(&group, &keys);
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
