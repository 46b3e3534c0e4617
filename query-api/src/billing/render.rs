//! Billing exports as bytes: CSV, JSON lines, Parquet and Arrow IPC, with the same columns and
//! decimal amounts in each. The rendering is a pure function of the lines, so a published
//! export has the same bytes on every download (its SHA-256 is in the manifest).
//!
//! Columns: `period,consumer,plan,route,quantity,amount,currency` (the first seven, as before
//! adjustments existed), then `kind` (`usage`, `adjustment`, `minimum`, `minimum_adjustment`:
//! see `lines.rs`), `for_period` (the period the quantity was used in) and `status` (`final`
//! for a published export, `preliminary` for a period not yet complete).

use std::sync::Arc;

use arrow::array::{ArrayRef, Decimal128Builder, RecordBatch, StringBuilder, UInt64Builder};
use arrow::datatypes::{DataType, Field, Schema};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::lines::Line;
use crate::error::ApiError;
use crate::revenue::money;

/// Scale of `amount` in Parquet and Arrow exports (Decimal128(38, 12)).
const AMOUNT_SCALE: u32 = 12;

/// An export's file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
    Parquet,
    Arrow,
}

impl Format {
    pub const ALL: [Format; 4] = [Format::Csv, Format::Jsonl, Format::Parquet, Format::Arrow];

    pub fn parse(v: &str) -> Result<Format, ApiError> {
        Ok(match v {
            "csv" => Format::Csv,
            "jsonl" => Format::Jsonl,
            "parquet" => Format::Parquet,
            "arrow" => Format::Arrow,
            other => {
                return Err(ApiError::bad(
                    "format",
                    format!("`{other}` is not one of csv, jsonl, parquet, arrow"),
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
            Format::Arrow => "arrow",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Jsonl => "application/x-ndjson",
            Format::Parquet => "application/vnd.apache.parquet",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

/// Whether the lines are final (published) or preliminary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Final,
    Preliminary,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Final => "final",
            Status::Preliminary => "preliminary",
        }
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The export of `period` in `format`.
pub fn render(
    format: Format,
    period: &str,
    status: Status,
    lines: &[&Line],
) -> Result<Vec<u8>, ApiError> {
    match format {
        Format::Csv => {
            let mut out = String::from(
                "period,consumer,plan,route,quantity,amount,currency,kind,for_period,status\n",
            );
            for l in lines {
                out.push_str(&format!(
                    "{},{},{},{},{},{},{},{},{},{}\n",
                    period,
                    csv_field(&l.consumer),
                    csv_field(&l.plan),
                    csv_field(&l.route),
                    l.quantity,
                    money(l.amount),
                    csv_field(&l.currency),
                    l.kind.as_str(),
                    l.for_period,
                    status.as_str(),
                ));
            }
            Ok(out.into_bytes())
        }
        Format::Jsonl => {
            let mut out = String::new();
            for l in lines {
                let v = json!({"period": period, "consumer": l.consumer, "plan": l.plan,
                               "route": l.route, "quantity": l.quantity, "amount": money(l.amount),
                               "currency": l.currency, "kind": l.kind.as_str(),
                               "for_period": l.for_period, "status": status.as_str()});
                out.push_str(&v.to_string());
                out.push('\n');
            }
            Ok(out.into_bytes())
        }
        Format::Parquet => {
            let b = batch(period, status, lines)?;
            let mut buf = Vec::new();
            let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, b.schema(), None)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            w.write(&b).map_err(|e| ApiError::Internal(e.to_string()))?;
            w.close().map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(buf)
        }
        Format::Arrow => {
            let b = batch(period, status, lines)?;
            let mut buf = Vec::new();
            {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, &b.schema())
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                w.write(&b).map_err(|e| ApiError::Internal(e.to_string()))?;
                w.finish().map_err(|e| ApiError::Internal(e.to_string()))?;
            }
            Ok(buf)
        }
    }
}

fn batch(period: &str, status: Status, lines: &[&Line]) -> Result<RecordBatch, ApiError> {
    let text = |name| Field::new(name, DataType::Utf8, false);
    let schema = Arc::new(Schema::new(vec![
        text("period"),
        text("consumer"),
        text("plan"),
        text("route"),
        Field::new("quantity", DataType::UInt64, false),
        Field::new(
            "amount",
            DataType::Decimal128(38, AMOUNT_SCALE as i8),
            false,
        ),
        text("currency"),
        text("kind"),
        text("for_period"),
        text("status"),
    ]));
    let mut cols: [StringBuilder; 8] = Default::default();
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
        for (col, v) in cols.iter_mut().zip([
            period,
            &l.consumer,
            &l.plan,
            &l.route,
            &l.currency,
            l.kind.as_str(),
            &l.for_period,
            status.as_str(),
        ]) {
            col.append_value(v);
        }
        quantity.append_value(l.quantity);
        amount.append_value(a.mantissa());
    }
    let [mut p, mut c, mut pl, mut r, mut cur, mut k, mut f, mut st] = cols;
    let arrays: Vec<ArrayRef> = vec![
        Arc::new(p.finish()),
        Arc::new(c.finish()),
        Arc::new(pl.finish()),
        Arc::new(r.finish()),
        Arc::new(quantity.finish()),
        Arc::new(amount.finish()),
        Arc::new(cur.finish()),
        Arc::new(k.finish()),
        Arc::new(f.finish()),
        Arc::new(st.finish()),
    ];
    RecordBatch::try_new(schema, arrays).map_err(|e| ApiError::Internal(e.to_string()))
}

/// The file as a download, with the headers billing systems check.
pub fn file_response(
    body: Vec<u8>,
    format: Format,
    period: &str,
    headers: &[(&'static str, String)],
) -> Response {
    let filename = format!("tollgate-billing-{period}.{}", format.as_str());
    let disposition =
        HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")).expect("ascii");
    let mut resp = (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            ),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        body,
    )
        .into_response();
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            resp.headers_mut().insert(*name, v);
        }
    }
    resp
}
