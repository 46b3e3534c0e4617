//! The Arrow schema of `RequestEvent` v1 and the conversion of events to and from record batches.
//! Column names, types and nullability follow the JSON Schema (checked by `tests/drift.rs`).

use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMicrosecondArray, TimestampMicrosecondBuilder, UInt8Array, UInt8Builder, UInt16Array,
    UInt16Builder, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use chrono::DateTime;

use crate::event::{Outcome, RequestEvent};

/// The timezone of the `ts` column.
pub const TS_TIMEZONE: &str = "UTC";

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let s = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    let u64f = |name: &str, nullable| Field::new(name, DataType::UInt64, nullable);
    Arc::new(Schema::new(vec![
        Field::new("v", DataType::UInt8, false),
        s("id", false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some(TS_TIMEZONE.into())),
            false,
        ),
        s("gateway", false),
        s("route", true),
        s("method", false),
        s("path", false),
        Field::new("status", DataType::UInt16, false),
        u64f("latency_us", false),
        u64f("upstream_latency_us", true),
        u64f("req_bytes", false),
        u64f("resp_bytes", false),
        s("consumer", true),
        s("plan", true),
        s("outcome", false),
        Field::new("billable", DataType::Boolean, false),
        s("trace_id", true),
    ]))
});

/// The Arrow schema of `RequestEvent` v1 (one column per JSON property, same order).
pub fn schema() -> SchemaRef {
    SCHEMA.clone()
}

/// Builds one record batch from events, in order.
pub fn to_batch(events: &[RequestEvent]) -> RecordBatch {
    to_batch_offering(events, || {})
}

/// Events [`to_batch_offering`] converts between two calls of its `offer`: tens of
/// microseconds of work.
pub const OFFER_EVERY: usize = 256;

/// [`to_batch`], calling `offer` after every [`OFFER_EVERY`] events: a background thread
/// that shares the cores with a latency-sensitive one gives its core away there (the store's
/// append, `tollgate_store::cpu`). A batch of a few thousand events is a millisecond or more
/// of copying.
pub fn to_batch_offering(events: &[RequestEvent], mut offer: impl FnMut()) -> RecordBatch {
    let n = events.len();
    let mut v = UInt8Builder::with_capacity(n);
    let mut id = StringBuilder::with_capacity(n, n * 36);
    let mut ts = TimestampMicrosecondBuilder::with_capacity(n).with_timezone(TS_TIMEZONE);
    // Text columns sized up front from the batch's own lengths: grown by doubling, their
    // buffers were reallocated and copied several times per batch (the collector's profile).
    let bytes = |f: fn(&RequestEvent) -> usize| events.iter().map(f).sum::<usize>();
    let text = |f: fn(&RequestEvent) -> usize| StringBuilder::with_capacity(n, bytes(f));
    let mut gateway = text(|e| e.gateway.len());
    let mut route = text(|e| e.route.as_ref().map_or(0, String::len));
    let mut method = text(|e| e.method.len());
    let mut path = text(|e| e.path.len());
    let mut status = UInt16Builder::with_capacity(n);
    let mut latency = UInt64Builder::with_capacity(n);
    let mut up_latency = UInt64Builder::with_capacity(n);
    let mut req_bytes = UInt64Builder::with_capacity(n);
    let mut resp_bytes = UInt64Builder::with_capacity(n);
    let mut consumer = text(|e| e.consumer.as_ref().map_or(0, String::len));
    let mut plan = text(|e| e.plan.as_ref().map_or(0, String::len));
    let mut outcome = text(|e| e.outcome.as_str().len());
    let mut billable = BooleanBuilder::with_capacity(n);
    let mut trace = text(|e| e.trace_id.as_ref().map_or(0, String::len));
    let mut buf = uuid::Uuid::encode_buffer();
    for (i, e) in events.iter().enumerate() {
        if i % OFFER_EVERY == OFFER_EVERY - 1 {
            offer();
        }
        v.append_value(e.v);
        id.append_value(e.id.hyphenated().encode_lower(&mut buf));
        ts.append_value(e.ts_micros());
        gateway.append_value(&e.gateway);
        route.append_option(e.route.as_deref());
        method.append_value(&e.method);
        path.append_value(&e.path);
        status.append_value(e.status);
        latency.append_value(e.latency_us);
        up_latency.append_option(e.upstream_latency_us);
        req_bytes.append_value(e.req_bytes);
        resp_bytes.append_value(e.resp_bytes);
        consumer.append_option(e.consumer.as_deref());
        plan.append_option(e.plan.as_deref());
        outcome.append_value(e.outcome.as_str());
        billable.append_value(e.billable);
        trace.append_option(e.trace_id.as_deref());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(v.finish()),
        Arc::new(id.finish()),
        Arc::new(ts.finish()),
        Arc::new(gateway.finish()),
        Arc::new(route.finish()),
        Arc::new(method.finish()),
        Arc::new(path.finish()),
        Arc::new(status.finish()),
        Arc::new(latency.finish()),
        Arc::new(up_latency.finish()),
        Arc::new(req_bytes.finish()),
        Arc::new(resp_bytes.finish()),
        Arc::new(consumer.finish()),
        Arc::new(plan.finish()),
        Arc::new(outcome.finish()),
        Arc::new(billable.finish()),
        Arc::new(trace.finish()),
    ];
    RecordBatch::try_new(schema(), columns).expect("columns match the schema")
}

fn col<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T, ArrowError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| ArrowError::SchemaError(format!("column `{name}` missing or mistyped")))
}

fn opt_str(a: &StringArray, i: usize) -> Option<String> {
    a.is_valid(i).then(|| a.value(i).to_string())
}

/// Reads events back from a batch with this schema (tests, exports, re-ingestion).
pub fn from_batch(batch: &RecordBatch) -> Result<Vec<RequestEvent>, ArrowError> {
    let v = col::<UInt8Array>(batch, "v")?;
    let id = col::<StringArray>(batch, "id")?;
    let ts = col::<TimestampMicrosecondArray>(batch, "ts")?;
    let gateway = col::<StringArray>(batch, "gateway")?;
    let route = col::<StringArray>(batch, "route")?;
    let method = col::<StringArray>(batch, "method")?;
    let path = col::<StringArray>(batch, "path")?;
    let status = col::<UInt16Array>(batch, "status")?;
    let latency = col::<UInt64Array>(batch, "latency_us")?;
    let up = col::<UInt64Array>(batch, "upstream_latency_us")?;
    let req = col::<UInt64Array>(batch, "req_bytes")?;
    let resp = col::<UInt64Array>(batch, "resp_bytes")?;
    let consumer = col::<StringArray>(batch, "consumer")?;
    let plan = col::<StringArray>(batch, "plan")?;
    let outcome = col::<StringArray>(batch, "outcome")?;
    let billable = col::<BooleanArray>(batch, "billable")?;
    let trace = col::<StringArray>(batch, "trace_id")?;
    let bad = |what: &str| ArrowError::InvalidArgumentError(what.to_string());
    (0..batch.num_rows())
        .map(|i| {
            Ok(RequestEvent {
                v: v.value(i),
                id: id.value(i).parse().map_err(|_| bad("id is not a UUID"))?,
                ts: DateTime::from_timestamp_micros(ts.value(i)).ok_or_else(|| bad("ts"))?,
                gateway: gateway.value(i).to_string(),
                route: opt_str(route, i),
                method: method.value(i).to_string(),
                path: path.value(i).to_string(),
                status: status.value(i),
                latency_us: latency.value(i),
                upstream_latency_us: up.is_valid(i).then(|| up.value(i)),
                req_bytes: req.value(i),
                resp_bytes: resp.value(i),
                consumer: opt_str(consumer, i),
                plan: opt_str(plan, i),
                outcome: Outcome::parse(outcome.value(i)).ok_or_else(|| bad("outcome"))?,
                billable: billable.value(i),
                trace_id: opt_str(trace, i),
            })
        })
        .collect()
}
