//! The phases' pure parts: ids, trace context, forwarding headers, outcomes, own answers.

use super::answer::classify;
use super::*;

#[test]
fn event_ids_are_distinct_uuid_v7_carrying_the_request_time() {
    let ts = chrono::Utc::now();
    let a = event_id(&ts);
    let b = event_id(&ts);
    assert_ne!(a, b);
    assert_eq!(a.get_version_num(), 7);
    let (secs, nanos) = a.get_timestamp().expect("v7 has a timestamp").to_unix();
    assert_eq!(
        secs as i64 * 1000 + i64::from(nanos / 1_000_000),
        ts.timestamp_millis()
    );
}

fn fields(text: &str) -> Fields {
    let mut buf =
        bytes::BytesMut::from(format!("GET / HTTP/1.1\r\nHost: a\r\n{text}\r\n").as_bytes());
    match h1::parse_request(&mut buf).unwrap() {
        Parsed::Head(h) => h.fields,
        Parsed::Partial => panic!("partial"),
    }
}

#[test]
fn traceparent_is_read_only_when_well_formed_and_new_ones_are_valid() {
    let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    assert_eq!(
        trace_id_of(&fields(&format!("traceparent: {good}\r\n")))
            .as_ref()
            .map(TraceId::as_str),
        Some("0af7651916cd43dd8448eb211c80319c")
    );
    for bad in [
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-ff",
    ] {
        assert_eq!(
            trace_id_of(&fields(&format!("traceparent: {bad}\r\n"))),
            None,
            "{bad}"
        );
    }
    let (header, trace) = new_traceparent();
    let header = std::str::from_utf8(&header).unwrap();
    assert_eq!(
        trace_id_of(&fields(&format!("traceparent: {header}\r\n"))),
        Some(trace)
    );
}

#[test]
fn forwarded_for_appends_the_peer() {
    let line = |prev: Option<&[u8]>, peer: &str| {
        let mut out = Vec::new();
        put_forwarded_for(&mut out, prev, peer.parse().unwrap());
        String::from_utf8(out).unwrap()
    };
    assert_eq!(
        line(None, "192.0.2.7:5000"),
        "x-forwarded-for: 192.0.2.7\r\n"
    );
    assert_eq!(
        line(Some(b"203.0.113.1"), "192.0.2.7:5000"),
        "x-forwarded-for: 203.0.113.1, 192.0.2.7\r\n"
    );
    assert_eq!(
        line(None, "[2001:db8::1]:80"),
        "x-forwarded-for: 2001:db8::1\r\n"
    );
}

#[test]
fn only_upstream_server_errors_are_unbillable() {
    assert_eq!(classify(StatusCode::OK), (Outcome::Ok, true));
    assert_eq!(classify(StatusCode::NOT_FOUND), (Outcome::Ok, true));
    assert_eq!(
        classify(StatusCode::SERVICE_UNAVAILABLE),
        (Outcome::UpstreamError, false)
    );
}

#[test]
fn own_answers_are_framed_json_with_their_extra_fields() {
    let mut out = Vec::new();
    let n = own_answer(
        &mut out,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "no key",
        true,
        |out| {
            put_field(out, b"www-authenticate", b"Bearer");
        },
    );
    let text = String::from_utf8(out).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}\r\n", body.len())),
        "{head}"
    );
    assert!(
        head.contains("\r\ndate: ")
            && head.contains("www-authenticate: Bearer")
            && head.ends_with("connection: close"),
        "{head}"
    );
    assert_eq!(n as usize, body.len());
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["message"], "no key");
}

#[test]
fn field_values_with_control_bytes_are_not_written() {
    assert!(is_field_value(b"acme corp\t1"));
    assert!(!is_field_value(b"evil\r\nx-injected: 1"));
}
