//! Fails when the JSON Schema (source of truth), the Rust codec and the Arrow schema drift apart.

use arrow::datatypes::{DataType, Field, TimeUnit};
use serde_json::Value;
use tollgate_schemas::{Outcome, REQUEST_EVENT_V1_SCHEMA, RequestEvent, arrow as ev_arrow};

fn json_schema() -> Value {
    serde_json::from_str(REQUEST_EVENT_V1_SCHEMA).expect("schema file is JSON")
}

/// The Arrow field a JSON Schema property maps to: integers by their declared range, strings with
/// `format: date-time` to microsecond UTC timestamps, nullability from a `null` in `type`.
fn arrow_field_for(name: &str, prop: &Value) -> Field {
    let types: Vec<&str> = match &prop["type"] {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().map(|t| t.as_str().unwrap()).collect(),
        other => panic!("property {name}: unsupported type {other}"),
    };
    let nullable = types.contains(&"null");
    let base = types
        .iter()
        .find(|t| **t != "null")
        .expect("a non-null type");
    let dt = match *base {
        "boolean" => DataType::Boolean,
        "string" if prop["format"] == "date-time" => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        }
        "string" => DataType::Utf8,
        "integer" => {
            assert!(
                prop["minimum"].as_u64().is_some(),
                "{name}: integers need a minimum"
            );
            match prop["maximum"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: needs a maximum"))
            {
                m if m <= u8::MAX as u64 => DataType::UInt8,
                m if m <= u16::MAX as u64 => DataType::UInt16,
                m if m <= u32::MAX as u64 => DataType::UInt32,
                _ => DataType::UInt64,
            }
        }
        other => panic!("property {name}: unmapped type {other}"),
    };
    Field::new(name, dt, nullable)
}

#[test]
fn arrow_schema_matches_json_schema() {
    let schema = json_schema();
    let props = schema["properties"].as_object().unwrap();
    // serde_json sorts object keys, so compare in name order.
    let expected: Vec<Field> = props.iter().map(|(n, p)| arrow_field_for(n, p)).collect();
    let actual = ev_arrow::schema();
    let mut actual: Vec<Field> = actual.fields().iter().map(|f| f.as_ref().clone()).collect();
    actual.sort_by(|a, b| a.name().cmp(b.name()));
    assert_eq!(
        actual, expected,
        "Arrow schema drifted from request_event.v1.schema.json"
    );
}

#[test]
fn every_property_is_required_and_closed() {
    let schema = json_schema();
    let props: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
    let mut required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    required.sort();
    assert_eq!(props, required);
    assert_eq!(schema["additionalProperties"], false);
}

#[test]
fn codec_emits_exactly_the_schema_properties() {
    let schema = json_schema();
    let props: Vec<String> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let ev = RequestEvent {
        v: 1,
        id: uuid::Uuid::now_v7(),
        ts: chrono::Utc::now(),
        gateway: "gw".into(),
        route: None,
        method: "GET".into(),
        path: "/".into(),
        status: 404,
        latency_us: 10,
        upstream_latency_us: None,
        req_bytes: 0,
        resp_bytes: 9,
        consumer: None,
        plan: None,
        outcome: Outcome::NotFound,
        billable: false,
        trace_id: None,
    };
    let v: Value = serde_json::from_slice(&ev.to_json()).unwrap();
    let keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    let mut sorted_props = props.clone();
    sorted_props.sort();
    let mut sorted_keys = keys;
    sorted_keys.sort();
    assert_eq!(
        sorted_keys, sorted_props,
        "codec fields drifted from the JSON Schema"
    );
    // Arrow round trip keeps every value.
    let batch = ev_arrow::to_batch(std::slice::from_ref(&ev));
    let back = ev_arrow::from_batch(&batch).unwrap();
    let mut ev_us = ev.clone();
    ev_us.ts = chrono::DateTime::from_timestamp_micros(ev.ts_micros()).unwrap();
    assert_eq!(back, vec![ev_us]);
}

#[test]
fn outcome_enum_matches_json_schema() {
    let schema = json_schema();
    let names: Vec<&str> = schema["properties"]["outcome"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let ours: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    assert_eq!(ours, names);
}

#[test]
fn a_batch_built_in_steps_is_the_batch_built_at_once() {
    let events: Vec<RequestEvent> = (0..1_000u64)
        .map(|i| RequestEvent {
            v: 1,
            id: uuid::Uuid::now_v7(),
            ts: chrono::DateTime::from_timestamp_micros(1_700_000_000_000_000 + i as i64).unwrap(),
            gateway: "gw".into(),
            route: (i % 3 != 0).then(|| format!("route-{}", i % 7)),
            method: "GET".into(),
            path: format!("/v1/items/{i}"),
            status: 200,
            latency_us: i,
            upstream_latency_us: (i % 5 != 0).then_some(i / 2),
            req_bytes: i * 3,
            resp_bytes: i * 11,
            consumer: (i % 2 == 0).then(|| format!("c{}", i % 13)),
            plan: None,
            outcome: Outcome::Ok,
            billable: i % 2 == 0,
            trace_id: None,
        })
        .collect();
    let mut offers = 0;
    let stepped = ev_arrow::to_batch_offering(&events, || offers += 1);
    assert_eq!(offers, events.len() / ev_arrow::OFFER_EVERY);
    assert_eq!(stepped, ev_arrow::to_batch(&events));
    assert_eq!(ev_arrow::from_batch(&stepped).unwrap(), events);
}
