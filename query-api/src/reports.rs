//! `/v1/latency` and `/v1/usage` (revenue is `revenue.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::auth::Scope;
use axum::Json;
use axum::extract::{Query, State};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tollgate_store::{Filter, GroupKey, KeyValue, LatencyQuery};

use crate::AppState;
use crate::error::ApiError;
use crate::params::{Params, parse_quantiles, parse_step, rfc3339};

pub(crate) type Raw = Query<HashMap<String, String>>;

fn key_json(k: &KeyValue) -> Value {
    match k {
        KeyValue::Null => Value::Null,
        KeyValue::Text(s) => Value::String(s.clone()),
        KeyValue::Int(i) => Value::from(*i),
    }
}

/// A row's group keys as a JSON object: `{"consumer": .., "day": ..}`.
pub(crate) fn keys_object(group: &[GroupKey], keys: &[KeyValue]) -> Map<String, Value> {
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
