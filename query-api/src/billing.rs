//! `/v1/billing/export` (one line item per consumer × route for a calendar month, as CSV, JSON
//! lines, Parquet or Arrow IPC).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, Decimal128Builder, RecordBatch, StringBuilder, UInt64Builder};
use arrow::datatypes::{DataType, Field, Schema};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, header};

use crate::auth::Scope;
use axum::response::{IntoResponse, Response};
use rust_decimal::Decimal;
use serde_json::json;
use tollgate_store::{Filter, GroupKey, KeyValue};

use crate::AppState;
use crate::error::ApiError;
use crate::params::{Params, parse_period};
use crate::pricing;
use crate::revenue::money;

/// Scale of `amount` in Parquet and Arrow exports (Decimal128(38, 12)).
const AMOUNT_SCALE: u32 = 12;

/// One billing line item.
struct Line {
    consumer: String,
    plan: String,
    route: String,
    quantity: u64,
    amount: Decimal,
    currency: String,
}

async fn lines(
    s: &AppState,
    start: i64,
    end: i64,
    consumer: Option<String>,
) -> Result<Vec<Line>, ApiError> {
    let filter = Filter {
        from_us: start,
        to_us: end,
        consumer,
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
        let route = match route {
            KeyValue::Text(r) => r.clone(),
            _ => continue, // unmatched requests are never billed
        };
        let resolved = s.plan(plan, Some(consumer));
        let pricing = resolved.and_then(|(_, p)| p.pricing.as_ref());
        let amount = pricing
            .and_then(|p| p.charge_for(&route))
            .map(|c| pricing::charge(c, r.billable_requests))
            .unwrap_or_default();
        out.push(Line {
            consumer: consumer.clone(),
            plan: resolved
                .map(|(n, _)| n.to_string())
                .or(plan.map(str::to_owned))
                .unwrap_or_default(),
            route,
            quantity: r.billable_requests,
            amount,
            // A free plan has no currency of its own: its zero is in the deployment's currency.
            currency: pricing
                .map(|p| p.currency.clone())
                .or_else(|| s.deployment_currency())
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn batch(period: &str, lines: &[Line]) -> Result<RecordBatch, ApiError> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("period", DataType::Utf8, false),
        Field::new("consumer", DataType::Utf8, false),
        Field::new("plan", DataType::Utf8, false),
        Field::new("route", DataType::Utf8, false),
        Field::new("quantity", DataType::UInt64, false),
        Field::new(
            "amount",
            DataType::Decimal128(38, AMOUNT_SCALE as i8),
            false,
        ),
        Field::new("currency", DataType::Utf8, false),
    ]));
    let mut cols: [StringBuilder; 5] = Default::default();
    let mut quantity = UInt64Builder::new();
    let mut amount = Decimal128Builder::new()
        .with_precision_and_scale(38, AMOUNT_SCALE as i8)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    for l in lines {
        let mut a = l.amount;
        if a.scale() > AMOUNT_SCALE {
            return Err(ApiError::Internal(format!(
                "amount {a} has more than {AMOUNT_SCALE} decimal places"
            )));
        }
        a.rescale(AMOUNT_SCALE);
        cols[0].append_value(period);
        cols[1].append_value(&l.consumer);
        cols[2].append_value(&l.plan);
        cols[3].append_value(&l.route);
        cols[4].append_value(&l.currency);
        quantity.append_value(l.quantity);
        amount.append_value(a.mantissa());
    }
    let [mut p, mut c, mut pl, mut r, mut cur] = cols;
    let arrays: Vec<ArrayRef> = vec![
        Arc::new(p.finish()),
        Arc::new(c.finish()),
        Arc::new(pl.finish()),
        Arc::new(r.finish()),
        Arc::new(quantity.finish()),
        Arc::new(amount.finish()),
        Arc::new(cur.finish()),
    ];
    RecordBatch::try_new(schema, arrays).map_err(|e| ApiError::Internal(e.to_string()))
}

fn file_response(body: Vec<u8>, content_type: &'static str, filename: String) -> Response {
    let disposition =
        HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")).expect("ascii");
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response()
}

pub async fn export(
    State(s): State<Arc<AppState>>,
    Scope(consumer): Scope,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let p = Params::new(raw, &["period", "format", "consumer"])?;
    let period = p
        .get("period")
        .ok_or_else(|| ApiError::bad("period", "required, a month like 2026-11"))?
        .to_string();
    let (start, end) = parse_period(&period)?;
    let format = p.get("format").unwrap_or("csv");
    let lines = lines(&s, start, end, consumer).await?;
    let name = format!("tollgate-billing-{period}");
    match format {
        "csv" => {
            let mut out = String::from("period,consumer,plan,route,quantity,amount,currency\n");
            for l in &lines {
                out.push_str(&format!(
                    "{},{},{},{},{},{},{}\n",
                    period,
                    csv_field(&l.consumer),
                    csv_field(&l.plan),
                    csv_field(&l.route),
                    l.quantity,
                    money(l.amount),
                    csv_field(&l.currency)
                ));
            }
            Ok(file_response(
                out.into_bytes(),
                "text/csv; charset=utf-8",
                format!("{name}.csv"),
            ))
        }
        "jsonl" => {
            let mut out = String::new();
            for l in &lines {
                let v = json!({"period": period, "consumer": l.consumer, "plan": l.plan, "route": l.route,
                               "quantity": l.quantity, "amount": money(l.amount), "currency": l.currency});
                out.push_str(&v.to_string());
                out.push('\n');
            }
            Ok(file_response(
                out.into_bytes(),
                "application/x-ndjson",
                format!("{name}.jsonl"),
            ))
        }
        "parquet" => {
            let b = batch(&period, &lines)?;
            let mut buf = Vec::new();
            let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, b.schema(), None)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            w.write(&b).map_err(|e| ApiError::Internal(e.to_string()))?;
            w.close().map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(file_response(
                buf,
                "application/vnd.apache.parquet",
                format!("{name}.parquet"),
            ))
        }
        "arrow" => {
            let b = batch(&period, &lines)?;
            let mut buf = Vec::new();
            {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, &b.schema())
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                w.write(&b).map_err(|e| ApiError::Internal(e.to_string()))?;
                w.finish().map_err(|e| ApiError::Internal(e.to_string()))?;
            }
            Ok(file_response(
                buf,
                "application/vnd.apache.arrow.stream",
                format!("{name}.arrow"),
            ))
        }
        other => Err(ApiError::bad(
            "format",
            format!("`{other}` is not one of csv, jsonl, parquet, arrow"),
        )),
    }
}
