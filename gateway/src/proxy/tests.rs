//! The phases' pure parts: ids, forwarding headers, outcomes, own answers.

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
fn ip_addresses_are_written_as_display_writes_them() {
    let octets = [0u8, 7, 9, 10, 42, 99, 100, 199, 200, 255];
    let mut ips: Vec<std::net::IpAddr> = octets
        .iter()
        .map(|&o| std::net::Ipv4Addr::new(o, 255 - o, o / 2, 9).into())
        .collect();
    ips.extend(
        ["::1", "::ffff:192.0.2.7", "2001:db8::8a2e:370:7334"]
            .map(|a| a.parse::<std::net::IpAddr>().unwrap()),
    );
    for ip in ips {
        let mut out = Vec::new();
        put_ip(&mut out, ip);
        assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
    }
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

#[test]
fn a_recent_instant_has_the_wall_clock_time_of_its_moment() {
    let now = Instant::now();
    // Before and after the thread's anchor is set, and from well before it.
    for back_ms in [0u64, 10, 900, 1_500, 30_000, 5] {
        let at = now - std::time::Duration::from_millis(back_ms);
        let expected = chrono::Utc::now()
            - chrono::TimeDelta::milliseconds(back_ms as i64)
            - chrono::TimeDelta::from_std(now.elapsed()).unwrap();
        let got = super::wall_clock(at);
        let off = (got - expected).num_milliseconds().abs();
        assert!(off <= 5, "{back_ms} ms ago: {got} against {expected}");
    }
}
