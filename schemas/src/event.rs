//! `RequestEvent` v1: the one record a gateway emits per request, and its JSON codec.
//!
//! Decoding is strict: unknown fields, a wrong version, a malformed id, timestamp or trace id are
//! errors (the collector sends such messages to its dead-letter destination, it never drops them).

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// What happened to a request. Closed set: the JSON Schema's `outcome` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    UpstreamError,
    Timeout,
    Unauthorized,
    RateLimited,
    QuotaExceeded,
    NotFound,
    BadRequest,
}

impl Outcome {
    /// Every outcome, in schema order.
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::UpstreamError,
        Outcome::Timeout,
        Outcome::Unauthorized,
        Outcome::RateLimited,
        Outcome::QuotaExceeded,
        Outcome::NotFound,
        Outcome::BadRequest,
    ];

    /// The wire name (`"upstream_error"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Timeout => "timeout",
            Outcome::Unauthorized => "unauthorized",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExceeded => "quota_exceeded",
            Outcome::NotFound => "not_found",
            Outcome::BadRequest => "bad_request",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }
}

/// One request seen by a gateway. Field order and meaning: DESIGN.md, "RequestEvent v1".
/// Decoded with [`RequestEvent::from_json`] (or [`RequestEvent::decode_into`]), which read the
/// wire form (`Wire`) and validate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestEvent {
    /// Schema version, always 1.
    pub v: u8,
    /// UUIDv7, unique per event.
    pub id: Uuid,
    /// Request start (UTC, microsecond precision on the wire).
    #[serde(serialize_with = "ser_ts")]
    pub ts: DateTime<Utc>,
    /// Gateway instance id.
    pub gateway: String,
    /// Route id, `None` when no route matched.
    pub route: Option<String>,
    pub method: String,
    /// Path as received, without the query string.
    pub path: String,
    /// Status sent to the client.
    pub status: u16,
    pub latency_us: u64,
    pub upstream_latency_us: Option<u64>,
    pub req_bytes: u64,
    pub resp_bytes: u64,
    pub consumer: Option<String>,
    pub plan: Option<String>,
    pub outcome: Outcome,
    pub billable: bool,
    pub trace_id: Option<String>,
}

/// A `RequestEvent` whose strings are borrowed: what an encoder that does not own them (a
/// gateway worker, encoding from its request's context) serializes. `RequestEvent::to_json`
/// goes through it too, so both write the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RequestEventRef<'a> {
    pub v: u8,
    pub id: Uuid,
    #[serde(serialize_with = "ser_ts")]
    pub ts: DateTime<Utc>,
    pub gateway: &'a str,
    pub route: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub latency_us: u64,
    pub upstream_latency_us: Option<u64>,
    pub req_bytes: u64,
    pub resp_bytes: u64,
    pub consumer: Option<&'a str>,
    pub plan: Option<&'a str>,
    pub outcome: Outcome,
    pub billable: bool,
    pub trace_id: Option<&'a str>,
}

impl RequestEventRef<'_> {
    /// Appends the event as one JSON object (one bus message) to `out`: the bytes
    /// `serde_json` writes for it ([`crate::canonical::encode`]).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        crate::canonical::encode(self, out);
    }

    /// The Kafka key: consumer id, or route id when anonymous, or empty.
    pub fn key(&self) -> &str {
        self.consumer.or(self.route).unwrap_or("")
    }
}

/// The decoder's view of an event: the fields of [`RequestEvent`], every string borrowed from
/// the input unless it had to be unescaped. Decoding into a [`RequestEvent`] whose strings are
/// reused ([`RequestEvent::decode_into`]) then allocates nothing: the collector decodes every
/// event it consumes, and each of an event's seven strings cost it a `malloc` and, after the
/// append, a `free` (BENCHMARKS.md, 2026-11-30).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire<'a> {
    v: u8,
    id: Uuid,
    #[serde(deserialize_with = "de_ts")]
    ts: DateTime<Utc>,
    #[serde(borrow)]
    gateway: Text<'a>,
    #[serde(borrow)]
    route: Option<Text<'a>>,
    #[serde(borrow)]
    method: Text<'a>,
    #[serde(borrow)]
    path: Text<'a>,
    status: u16,
    latency_us: u64,
    upstream_latency_us: Option<u64>,
    req_bytes: u64,
    resp_bytes: u64,
    #[serde(borrow)]
    consumer: Option<Text<'a>>,
    #[serde(borrow)]
    plan: Option<Text<'a>>,
    outcome: Outcome,
    billable: bool,
    #[serde(borrow)]
    trace_id: Option<Text<'a>>,
}

/// A JSON string, borrowed from the input when it has no escapes. (`Cow<str>` always decodes
/// to an owned string inside an `Option`; this borrows there too.)
struct Text<'a>(std::borrow::Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(std::borrow::Cow::Owned(v)))
            }
        }
        d.deserialize_str(Visit)
    }
}

impl Text<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
}

/// Sets `slot` to `v`, reusing its allocation.
pub(crate) fn set_text(slot: &mut String, v: &str) {
    slot.clear();
    slot.push_str(v);
}

/// Sets `slot` to `v`, reusing the string it holds, if any.
pub(crate) fn set_opt_text(slot: &mut Option<String>, v: Option<&str>) {
    match (slot.as_mut(), v) {
        (Some(s), Some(v)) => set_text(s, v),
        (_, v) => *slot = v.map(str::to_owned),
    }
}

/// Why bytes are not a valid `RequestEvent` v1.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("not a RequestEvent v1: {0}")]
    Json(#[from] serde_json::Error),
    #[error("field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// Whether `s` is `len` lowercase hex digits (trace and span ids).
pub fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn invalid(field: &'static str, message: impl Into<String>) -> SchemaError {
    SchemaError::Invalid {
        field,
        message: message.into(),
    }
}

fn ser_ts<S: Serializer>(ts: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    if (0..=9999).contains(&ts.year()) {
        // Written straight into the output: no string per event.
        s.collect_str(&WireTs(ts))
    } else {
        s.serialize_str(&format_ts(ts))
    }
}

/// `format_ts` as a `Display`, for years 0 to 9999 (four digits, no sign).
struct WireTs<'a>(&'a DateTime<Utc>);

impl std::fmt::Display for WireTs<'_> {
    /// Digits written in place: `write!` with padded fields was about a percent of a gateway
    /// worker's CPU under load, once per event.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match wire_ts_digits(self.0) {
            Some(b) => f.write_str(std::str::from_utf8(&b).expect("ASCII digits")),
            None => f.write_str(&format_ts(self.0)),
        }
    }
}

/// `format_ts(t)` as 27 bytes, written digit by digit, for years 0 to 9999; `None` for a leap
/// second (chrono carries it as a second fraction past one) or a year out of four digits,
/// which are left to chrono's formatting.
///
/// The date and time up to the second are kept per thread with the second they are for: a
/// gateway worker's events mostly share their second with the one before, and working out the
/// calendar date and time of day from a timestamp was about 500 instructions of each event
/// (`callgrind`, BENCHMARKS.md, twenty-third round).
pub(crate) fn wire_ts_digits(t: &DateTime<Utc>) -> Option<[u8; 27]> {
    use std::cell::Cell;
    thread_local! {
        static LAST_SECOND: Cell<(i64, [u8; 19])> = const { Cell::new((i64::MIN, [0; 19])) };
    }
    let micros = t.timestamp_subsec_micros();
    if micros >= 1_000_000 || !(0..=9999).contains(&t.year()) {
        return None;
    }
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    let second = t.timestamp();
    let (cached, prefix) = LAST_SECOND.get();
    if cached == second {
        b[..19].copy_from_slice(&prefix);
    } else {
        for (range, v) in [
            (0..4, t.year() as u32),
            (5..7, t.month()),
            (8..10, t.day()),
            (11..13, t.hour()),
            (14..16, t.minute()),
            (17..19, t.second()),
        ] {
            put_digits(&mut b[range], v);
        }
        let mut prefix = [0; 19];
        prefix.copy_from_slice(&b[..19]);
        LAST_SECOND.set((second, prefix));
    }
    put_digits(&mut b[20..26], micros);
    Some(b)
}

/// `v` in decimal, right-aligned in `out` (its high digits cut off if it is too long).
fn put_digits(out: &mut [u8], mut v: u32) {
    for d in out.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

fn de_ts<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    DateTime::parse_from_rfc3339(&s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| serde::de::Error::custom(format!("ts `{s}` is not RFC 3339: {e}")))
}

/// Formats a timestamp as the wire wants it: RFC 3339, UTC, microseconds, `Z`.
pub fn format_ts(ts: &DateTime<Utc>) -> String {
    ts.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl RequestEvent {
    /// Encodes as one JSON object (one bus message).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(384);
        self.borrowed().write_json(&mut out);
        out
    }

    /// The same event with borrowed strings.
    pub fn borrowed(&self) -> RequestEventRef<'_> {
        RequestEventRef {
            v: self.v,
            id: self.id,
            ts: self.ts,
            gateway: &self.gateway,
            route: self.route.as_deref(),
            method: &self.method,
            path: &self.path,
            status: self.status,
            latency_us: self.latency_us,
            upstream_latency_us: self.upstream_latency_us,
            req_bytes: self.req_bytes,
            resp_bytes: self.resp_bytes,
            consumer: self.consumer.as_deref(),
            plan: self.plan.as_deref(),
            outcome: self.outcome,
            billable: self.billable,
            trace_id: self.trace_id.as_deref(),
        }
    }

    /// Decodes and validates one bus message.
    pub fn from_json(bytes: &[u8]) -> Result<RequestEvent, SchemaError> {
        // Every field is set by the decoding; these are only its starting point.
        let mut ev = RequestEvent {
            v: 0,
            id: Uuid::nil(),
            ts: DateTime::UNIX_EPOCH,
            gateway: String::new(),
            route: None,
            method: String::new(),
            path: String::new(),
            status: 0,
            latency_us: 0,
            upstream_latency_us: None,
            req_bytes: 0,
            resp_bytes: 0,
            consumer: None,
            plan: None,
            outcome: Outcome::Ok,
            billable: false,
            trace_id: None,
        };
        ev.decode_into(bytes)?;
        Ok(ev)
    }

    /// Decodes `bytes` into `self`, reusing its strings' allocations ([`Self::from_json`]
    /// decodes into a fresh event through it: same checks, same errors). On an error `self` holds no meaningful event: the
    /// caller keeps it only to decode into again.
    ///
    /// Messages in the form the gateway writes are read field by field in their known order
    /// (`canonical`); any other JSON goes through the generic decoder. Both fill the same event.
    pub fn decode_into(&mut self, bytes: &[u8]) -> Result<(), SchemaError> {
        if crate::canonical::decode(self, bytes).is_none() {
            self.decode_generic(bytes)?;
        }
        self.validate()
    }

    /// [`Self::decode_into`] without the canonical form's shortcut, and without validating.
    pub(crate) fn decode_generic(&mut self, bytes: &[u8]) -> Result<(), SchemaError> {
        let w: Wire<'_> = serde_json::from_slice(bytes)?;
        (self.v, self.id, self.ts, self.status) = (w.v, w.id, w.ts, w.status);
        (self.latency_us, self.upstream_latency_us) = (w.latency_us, w.upstream_latency_us);
        (self.req_bytes, self.resp_bytes) = (w.req_bytes, w.resp_bytes);
        (self.outcome, self.billable) = (w.outcome, w.billable);
        set_text(&mut self.gateway, w.gateway.as_str());
        set_text(&mut self.method, w.method.as_str());
        set_text(&mut self.path, w.path.as_str());
        set_opt_text(&mut self.route, w.route.as_ref().map(Text::as_str));
        set_opt_text(&mut self.consumer, w.consumer.as_ref().map(Text::as_str));
        set_opt_text(&mut self.plan, w.plan.as_ref().map(Text::as_str));
        set_opt_text(&mut self.trace_id, w.trace_id.as_ref().map(Text::as_str));
        Ok(())
    }

    /// Checks the constraints of the JSON Schema that the Rust types do not carry.
    pub fn validate(&self) -> Result<(), SchemaError> {
        if self.v != 1 {
            return Err(invalid("v", format!("version {} is not 1", self.v)));
        }
        if self.id.get_version_num() != 7 {
            return Err(invalid("id", "must be a UUIDv7"));
        }
        if self.gateway.is_empty() {
            return Err(invalid("gateway", "must not be empty"));
        }
        if self.method.is_empty() {
            return Err(invalid("method", "must not be empty"));
        }
        if self.status < 100 {
            return Err(invalid(
                "status",
                format!("{} is not an HTTP status", self.status),
            ));
        }
        for (field, value) in [
            ("route", &self.route),
            ("consumer", &self.consumer),
            ("plan", &self.plan),
        ] {
            if value.as_deref() == Some("") {
                return Err(invalid(field, "must be null or non-empty"));
            }
        }
        if let Some(t) = &self.trace_id
            && !is_lower_hex(t, 32)
        {
            return Err(invalid("trace_id", "must be 32 lowercase hex digits"));
        }
        Ok(())
    }

    /// The Kafka key: consumer id, or route id when anonymous, or empty.
    pub fn key(&self) -> &str {
        self.consumer
            .as_deref()
            .or(self.route.as_deref())
            .unwrap_or("")
    }

    /// Request start in microseconds since the Unix epoch.
    pub fn ts_micros(&self) -> i64 {
        self.ts.timestamp_micros()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn timestamps_in_one_second_and_across_seconds_are_written_as_chrono_formats_them() {
        // 2025-12-31T23:59:59.999 UTC: the next millisecond is a new second, day and year.
        let base = 1_767_225_599_999_000_i64;
        for micros in [
            base,
            base + 1,
            base + 999,
            base + 1_000,
            base + 1_001,
            base - 5_000_000,
            base + 1_000,
            base + 86_400_000_000,
            base + 1,
        ] {
            let t = DateTime::from_timestamp_micros(micros).unwrap();
            let ours = wire_ts_digits(&t).map(|b| String::from_utf8(b.to_vec()).unwrap());
            assert_eq!(ours, Some(format_ts(&t)), "{micros}");
        }
    }

    pub(crate) fn sample() -> RequestEvent {
        RequestEvent {
            v: 1,
            id: Uuid::now_v7(),
            ts: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            gateway: "gw-1".into(),
            route: Some("orders-get".into()),
            method: "GET".into(),
            path: "/v1/orders/42".into(),
            status: 200,
            latency_us: 1234,
            upstream_latency_us: Some(1000),
            req_bytes: 0,
            resp_bytes: 512,
            consumer: Some("acme".into()),
            plan: Some("pro".into()),
            outcome: Outcome::Ok,
            billable: true,
            trace_id: Some("0af7651916cd43dd8448eb211c80319c".into()),
        }
    }

    #[test]
    fn timestamps_are_written_as_format_ts_writes_them() {
        for us in [
            0,
            1_764_000_000_123_456,
            1_764_000_000_000_000,
            253_402_300_799_999_999,
            -62_167_219_200_000_000,
        ] {
            let ts = DateTime::from_timestamp_micros(us).unwrap();
            assert_eq!(WireTs(&ts).to_string(), format_ts(&ts), "{us}");
        }
        for k in 0..2_000i64 {
            let us = (k * 126_701_150_399_999) % 253_402_300_799_999_999; // spread over 0..=9999
            let ts = DateTime::from_timestamp_micros(us).unwrap();
            assert_eq!(WireTs(&ts).to_string(), format_ts(&ts), "{us}");
        }
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_micro_opt(23, 59, 59, 1_234_567))
            .unwrap()
            .and_utc();
        assert_eq!(WireTs(&leap).to_string(), format_ts(&leap));
        let far = DateTime::from_timestamp_micros(300_000_000_000_000_000).unwrap();
        let json = serde_json::to_string(&RequestEvent {
            ts: far,
            ..sample()
        })
        .unwrap();
        assert!(json.contains(&format_ts(&far)), "{json}");
    }

    #[test]
    fn the_borrowed_encoder_writes_what_the_owned_type_serializes_to() {
        let mut anonymous = sample();
        (anonymous.consumer, anonymous.plan, anonymous.trace_id) = (None, None, None);
        for ev in [sample(), anonymous] {
            assert_eq!(ev.to_json(), serde_json::to_vec(&ev).unwrap());
            assert_eq!(ev.borrowed().key(), ev.key());
        }
    }

    #[test]
    fn round_trips_with_microsecond_timestamps() {
        let ev = sample();
        let json = ev.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(
            text.contains(r#""ts":"2025-11-24T16:00:00.123456Z""#),
            "{text}"
        );
        assert_eq!(RequestEvent::from_json(&json).unwrap(), ev);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["extra"] = 1.into();
        assert!(RequestEvent::from_json(v.to_string().as_bytes()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["v"] = 2.into();
        let err = RequestEvent::from_json(v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("`v`"), "{err}");
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["outcome"] = "great".into();
        assert!(RequestEvent::from_json(v.to_string().as_bytes()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["trace_id"] = "XYZ".into();
        assert!(RequestEvent::from_json(v.to_string().as_bytes()).is_err());
        assert!(RequestEvent::from_json(b"{not json").is_err());
    }

    #[test]
    fn decoding_into_a_used_event_gives_what_decoding_afresh_gives() {
        let mut anonymous = sample();
        (anonymous.consumer, anonymous.plan, anonymous.trace_id) = (None, None, None);
        anonymous.route = Some("a\"quoted\\route\u{e9}".into()); // escaped on the wire
        anonymous.path = "/caf\u{e9}/\"x\"\n".into();
        let mut slot = sample();
        for ev in [anonymous.clone(), sample(), anonymous, sample()] {
            let json = ev.to_json();
            slot.decode_into(&json).unwrap();
            assert_eq!(slot, ev);
            assert_eq!(RequestEvent::from_json(&json).unwrap(), ev);
        }
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["plan"] = "".into();
        let (a, b) = (
            RequestEvent::from_json(v.to_string().as_bytes()).unwrap_err(),
            slot.decode_into(v.to_string().as_bytes()).unwrap_err(),
        );
        assert_eq!(a.to_string(), b.to_string());
        assert!(a.to_string().contains("`plan`"), "{a}");
        v["plan"] = 7.into();
        assert!(slot.decode_into(v.to_string().as_bytes()).is_err());
        v["plan"] = serde_json::Value::Null;
        v["extra"] = 1.into();
        assert!(slot.decode_into(v.to_string().as_bytes()).is_err());
    }

    #[test]
    fn outcome_names_round_trip() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
    }
}
