//! `/v1/latency` and `/v1/usage` (revenue is `revenue.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::auth::Scope;
use axum::Json;
use axum::extract::{Query, State};
use serde::Serialize;
use tollgate_store::{Filter, GroupKey, KeyValue, LatencyQuery};

use crate::AppState;
use crate::error::ApiError;
use crate::params::{Params, parse_quantiles, parse_step, rfc3339};

pub(crate) type Raw = Query<HashMap<String, String>>;

/// The query parameters of each `/v1` endpoint: what its handler accepts, and what the OpenAPI
/// document lists (a test compares them).
pub(crate) const LATENCY_PARAMS: &[&str] = &[
    "from",
    "to",
    "step",
    "route",
    "consumer",
    "quantiles",
    "group_by",
];
pub(crate) const USAGE_PARAMS: &[&str] = &["from", "to", "consumer", "route", "group_by"];

/// A row's group keys, each present when grouped by it; `null` where the key has no value
/// (anonymous requests have no consumer, unmatched ones no route).
#[derive(Debug, Default, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupKeys {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, nullable))]
    pub consumer: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, nullable))]
    pub route: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, nullable))]
    pub plan: Option<Option<String>>,
    /// UTC date, `YYYY-MM-DD`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    /// HTTP status sent to the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<i64>,
    /// Start of the hour, `YYYY-MM-DDTHH:00:00Z`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hour: Option<String>,
    /// Start of the minute, `YYYY-MM-DDTHH:MM:00Z`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minute: Option<String>,
}

impl GroupKeys {
    /// The keys of a row grouped by `group`.
    pub(crate) fn of(group: &[GroupKey], keys: &[KeyValue]) -> GroupKeys {
        let text = |v: &KeyValue| match v {
            KeyValue::Text(s) => Some(s.clone()),
            KeyValue::Int(i) => Some(i.to_string()),
            KeyValue::Null => None,
        };
        let mut out = GroupKeys::default();
        for (k, v) in group.iter().zip(keys) {
            match k {
                GroupKey::Consumer => out.consumer = Some(text(v)),
                GroupKey::Route => out.route = Some(text(v)),
                GroupKey::Plan => out.plan = Some(text(v)),
                GroupKey::Day => out.day = text(v),
                GroupKey::Hour => out.hour = text(v),
                GroupKey::Minute => out.minute = text(v),
                GroupKey::Status => {
                    out.status = match v {
                        KeyValue::Int(i) => Some(*i),
                        other => text(other).and_then(|t| t.parse().ok()),
                    }
                }
            }
        }
        out
    }
}

/// The body of `/v1/usage`.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageAnswer {
    from: String,
    to: String,
    rows: Vec<UsageRow>,
}

/// Exact counts of one group.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageRow {
    #[serde(flatten)]
    keys: GroupKeys,
    requests: u64,
    billable_requests: u64,
    req_bytes: u64,
    resp_bytes: u64,
}

/// Most hours or minutes a usage window grouped by them may hold (a week of minutes).
const MAX_PERIODS: i64 = 10_080;

/// Most points one latency answer may hold.
const MAX_POINTS: i64 = 10_000;

pub async fn latency(
    State(s): State<Arc<AppState>>,
    Scope(consumer): Scope,
    Query(raw): Raw,
) -> Result<Json<LatencyAnswer>, ApiError> {
    let p = Params::new(raw, LATENCY_PARAMS)?;
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LatencyAnswer {
    from: String,
    to: String,
    step_ms: Option<i64>,
    relative_error: f64,
    series: Vec<Series>,
}

#[derive(Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
struct Series {
    route: String,
    consumer: Option<String>,
    points: Vec<Point>,
}

#[derive(Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
struct Point {
    /// Start of the bucket (RFC 3339).
    t: String,
    count: u64,
    /// Responses with status >= 500.
    errors: u64,
    /// Each asked quantile in ms, `null` for a bucket without requests.
    #[cfg_attr(feature = "openapi", schema(value_type = std::collections::BTreeMap<String, Option<f64>>))]
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
) -> Result<Json<UsageAnswer>, ApiError> {
    let p = Params::new(raw, USAGE_PARAMS)?;
    let (from_us, to_us) = p.window()?;
    let group = p.group_by(
        &[
            GroupKey::Consumer,
            GroupKey::Route,
            GroupKey::Day,
            GroupKey::Status,
            GroupKey::Plan,
            GroupKey::Hour,
            GroupKey::Minute,
        ],
        &[GroupKey::Consumer],
    )?;
    // Days are never too many (`from=0&group_by=day` is a whole history); hours and minutes
    // can be.
    if let Some(period) = GroupKey::finest_period(&group)
        && period < tollgate_store::time::DAY_US
        && (to_us - from_us) / period > MAX_PERIODS
    {
        return Err(ApiError::bad(
            "group_by",
            format!(
                "the window holds more than {MAX_PERIODS} periods of the finest time key: shorten it or group by a coarser one (minute, hour, day)"
            ),
        ));
    }
    let filter = Filter {
        from_us,
        to_us,
        consumer,
        route: p.get("route").map(str::to_owned),
    };
    let rows = s.store.usage(&filter, &group).await?;
    let rows = rows
        .into_iter()
        .map(|r| UsageRow {
            keys: GroupKeys::of(&group, &r.keys),
            requests: r.requests,
            billable_requests: r.billable_requests,
            req_bytes: r.req_bytes,
            resp_bytes: r.resp_bytes,
        })
        .collect();
    Ok(Json(UsageAnswer {
        from: rfc3339(from_us),
        to: rfc3339(to_us),
        rows,
    }))
}
