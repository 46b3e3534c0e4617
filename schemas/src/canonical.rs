//! The canonical form of an event: the exact bytes `RequestEventRef::write_json` produces
//! (serde_json's compact output, fields in schema order, the timestamp as
//! `YYYY-MM-DDTHH:MM:SS.ffffffZ`). [`encode`] writes it; [`decode`] reads it when its strings
//! have no escapes.
//!
//! Why an encoder of its own: every gateway worker encodes every request's event, and
//! serde_json's derived serializer (each string checked for escapes through its formatter,
//! numbers and the id through `fmt`) was 3 % of a worker's CPU under load (BENCHMARKS.md).
//! [`encode`] writes the same bytes: a string that needs an escape goes through serde_json
//! itself, and a test compares both encoders on random events.
//!
//! Why: the collector decodes every event it consumes, and the generic decoder took about
//! 0.8 µs per event (serde_json matching each field name, `Option` and `Uuid` visitors, chrono's
//! RFC 3339 parser), the largest single cost of the pipeline behind the gateway (BENCHMARKS.md,
//! "Publishes that overlap"). Reading the fields in their known order takes a fraction of that.
//!
//! The rule that keeps it safe: [`decode`] either fills the event exactly as the generic decoder
//! would, or declines (`None`) without deciding anything, and the generic decoder then reads
//! the message, with its errors. It declines on any byte that is not where the canonical form
//! puts it: another field order, whitespace, an escape or a control character in a string, a
//! number with a leading zero or out of range, a timestamp in another RFC 3339 form. A test
//! compares both decoders on random events and on random corruptions of them.

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use crate::event::{Outcome, RequestEvent, RequestEventRef, set_opt_text, set_text};

/// Appends `ev` in the canonical form to `out`: what `serde_json::to_writer(out, ev)` writes.
///
/// It appends to a `Vec<u8>`, not through `std::io::Write`: each of an event's fifty-odd
/// pieces then compiles to a capacity check and a copy of a known length, where a
/// `write_all` through `bytes`' `Writer` called `memcpy` for each (1.3 % of a gateway
/// worker's CPU under load, BENCHMARKS.md, twenty-third round).
pub(crate) fn encode(ev: &RequestEventRef<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"v\":");
    put_decimal(out, u64::from(ev.v));
    out.extend_from_slice(b",\"id\":\"");
    out.extend_from_slice(
        ev.id
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"ts\":");
    match crate::event::wire_ts_digits(&ev.ts) {
        Some(digits) => {
            out.push(b'"');
            out.extend_from_slice(&digits);
            out.push(b'"');
        }
        None => string(out, &crate::event::format_ts(&ev.ts)),
    }
    out.extend_from_slice(b",\"gateway\":");
    string(out, ev.gateway);
    out.extend_from_slice(b",\"route\":");
    opt_string(out, ev.route);
    out.extend_from_slice(b",\"method\":");
    string(out, ev.method);
    out.extend_from_slice(b",\"path\":");
    string(out, ev.path);
    out.extend_from_slice(b",\"status\":");
    put_decimal(out, u64::from(ev.status));
    out.extend_from_slice(b",\"latency_us\":");
    put_decimal(out, ev.latency_us);
    out.extend_from_slice(b",\"upstream_latency_us\":");
    match ev.upstream_latency_us {
        Some(us) => put_decimal(out, us),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"req_bytes\":");
    put_decimal(out, ev.req_bytes);
    out.extend_from_slice(b",\"resp_bytes\":");
    put_decimal(out, ev.resp_bytes);
    out.extend_from_slice(b",\"consumer\":");
    opt_string(out, ev.consumer);
    out.extend_from_slice(b",\"plan\":");
    opt_string(out, ev.plan);
    out.extend_from_slice(b",\"outcome\":\"");
    out.extend_from_slice(ev.outcome.as_str().as_bytes());
    out.extend_from_slice(if ev.billable {
        b"\",\"billable\":true,\"trace_id\":"
    } else {
        b"\",\"billable\":false,\"trace_id\":"
    });
    opt_string(out, ev.trace_id);
    out.push(b'}');
}

/// A JSON string: as it is when nothing in it needs an escape, else as serde_json escapes it.
fn string(out: &mut Vec<u8>, s: &str) {
    // Eight bytes at a time: an event's strings are short (4 to 60 bytes), so a byte-wise
    // check (even one the compiler vectorises for long runs) spent about 120 instructions on
    // each of them (`callgrind`, BENCHMARKS.md, twenty-fourth round).
    if needs_escape(s.as_bytes()) {
        serde_json::to_writer(out, s).expect("a string serializes into memory");
        return;
    }
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends `v` in decimal digits: what the event encoder and the gateway's HTTP/1.1 writer
/// (`Content-Length`, chunk sizes) put out, without `fmt`. `itoa` writes two digits per
/// division (a digit at a time, an event's six numbers took about 230 instructions).
pub fn put_decimal(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Fills `ev` from `bytes` if they are in the canonical form; `None` (with `ev` partly
/// overwritten, to be decoded into again) otherwise.
pub(crate) fn decode(ev: &mut RequestEvent, bytes: &[u8]) -> Option<()> {
    // The whole message is checked to be UTF-8 once; each string is then a slice of it
    // between two quotes (ASCII, so on character boundaries). Checking each string on its
    // own cost the collector about 950 instructions an event (`callgrind`, BENCHMARKS.md,
    // twenty-third round): they are short, and the check's fast path wants long runs.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut c = Cursor {
        s: text,
        b: bytes,
        i: 0,
    };
    c.lit(b"{\"v\":")?;
    ev.v = u8::try_from(c.u64()?).ok()?;
    c.lit(b",\"id\":")?;
    ev.id = Uuid::try_parse(c.str()?).ok()?;
    c.lit(b",\"ts\":")?;
    ev.ts = ts(c.str()?)?;
    c.lit(b",\"gateway\":")?;
    set_text(&mut ev.gateway, c.str()?);
    c.lit(b",\"route\":")?;
    set_opt_text(&mut ev.route, c.opt_str()?);
    c.lit(b",\"method\":")?;
    set_text(&mut ev.method, c.str()?);
    c.lit(b",\"path\":")?;
    set_text(&mut ev.path, c.str()?);
    c.lit(b",\"status\":")?;
    ev.status = u16::try_from(c.u64()?).ok()?;
    c.lit(b",\"latency_us\":")?;
    ev.latency_us = c.u64()?;
    c.lit(b",\"upstream_latency_us\":")?;
    ev.upstream_latency_us = if c.null() { None } else { Some(c.u64()?) };
    c.lit(b",\"req_bytes\":")?;
    ev.req_bytes = c.u64()?;
    c.lit(b",\"resp_bytes\":")?;
    ev.resp_bytes = c.u64()?;
    c.lit(b",\"consumer\":")?;
    set_opt_text(&mut ev.consumer, c.opt_str()?);
    c.lit(b",\"plan\":")?;
    set_opt_text(&mut ev.plan, c.opt_str()?);
    c.lit(b",\"outcome\":")?;
    ev.outcome = Outcome::parse(c.str()?)?;
    c.lit(b",\"billable\":")?;
    ev.billable = if c.lit(b"true").is_some() {
        true
    } else {
        c.lit(b"false")?;
        false
    };
    c.lit(b",\"trace_id\":")?;
    set_opt_text(&mut ev.trace_id, c.opt_str()?);
    c.lit(b"}")?;
    (c.i == bytes.len()).then_some(())
}

struct Cursor<'a> {
    /// The message, and the same as bytes.
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

/// The lanes of `v` that hold a `"`, a `\\` or a control character: each such lane's high bit
/// set, and perhaps lanes above one (see [`string_end`]).
fn escape_lanes(v: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH;
    below(v, 0x20)
        | below(v ^ (ONES * u64::from(b'"')), 1)
        | below(v ^ (ONES * u64::from(b'\\')), 1)
}

/// Whether JSON needs an escape for any byte of `b`: whole words, then the last word again
/// (overlapping) or, for a string under eight bytes, [`short_word`].
fn needs_escape(b: &[u8]) -> bool {
    let word = |w: &[u8]| u64::from_le_bytes(w.try_into().expect("eight bytes"));
    let mut words = b.chunks_exact(8);
    let mut lanes = (&mut words).fold(0, |lanes, w| lanes | escape_lanes(word(w)));
    if !words.remainder().is_empty() {
        lanes |= escape_lanes(if b.len() >= 8 {
            word(&b[b.len() - 8..])
        } else {
            short_word(b)
        });
    }
    lanes != 0
}

/// A word whose lanes are bytes of `b` (1 to 7 of them), each byte in at least one lane, the
/// lanes left over `A`: two overlapping 4-byte loads for 4 to 7 bytes, the first, middle and
/// last byte for 1 to 3.
///
/// Why not the bytes copied into a word of `A`s: the copy was a call to `memcpy`, whose small
/// stores the word's load then read back, and two thirds of this encoder's string samples on a
/// gateway worker under load sat on that load (`perf annotate`, BENCHMARKS.md, twenty-fifth
/// round). Without the copy the samples moved to the next locked instruction: what they
/// measured was the event's stores waiting for their cache lines, which the gateway now
/// prefetches (`tollgate_gateway`'s `prefetch`). The loads stay: they need no call.
fn short_word(b: &[u8]) -> u64 {
    let n = b.len();
    debug_assert!((1..8).contains(&n));
    let half = |at: usize| u64::from(u32::from_le_bytes(b[at..at + 4].try_into().expect("4")));
    if n >= 4 {
        half(0) | half(n - 4) << 32
    } else {
        u64::from(b[0])
            | u64::from(b[n / 2]) << 8
            | u64::from(b[n - 1]) << 16
            | 0x4141_4141_4100_0000
    }
}

/// Where the first `"`, `\\` or control character of `b` is, if any: eight bytes at a time,
/// each word tested with the usual word-at-a-time arithmetic (a byte below `n` sets the high
/// bit of its lane; a borrow can only set lanes above a true one, so the lowest set lane is
/// exact).
fn string_end(b: &[u8]) -> Option<usize> {
    let mut words = b.chunks_exact(8);
    let mut at = 0;
    for w in &mut words {
        let hits = escape_lanes(u64::from_le_bytes(w.try_into().expect("eight bytes")));
        if hits != 0 {
            return Some(at + hits.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|p| at + p)
}

impl<'a> Cursor<'a> {
    /// Consumes `s` if the input continues with it.
    fn lit(&mut self, s: &[u8]) -> Option<()> {
        let end = self.i + s.len();
        (self.b.get(self.i..end)? == s).then(|| self.i = end)
    }

    /// Consumes `null` if the input continues with it.
    fn null(&mut self) -> bool {
        self.lit(b"null").is_some()
    }

    /// A string without escapes or control characters (what JSON needs escaped), as UTF-8.
    fn str(&mut self) -> Option<&'a str> {
        self.lit(b"\"")?;
        let len = string_end(&self.b[self.i..])?;
        if self.b[self.i + len] != b'"' {
            return None;
        }
        let s = self.s.get(self.i..self.i + len)?;
        self.i += len + 1;
        Some(s)
    }

    fn opt_str(&mut self) -> Option<Option<&'a str>> {
        if self.null() {
            Some(None)
        } else {
            self.str().map(Some)
        }
    }

    /// An unsigned integer as JSON writes it: no sign, no leading zero, no fraction or exponent.
    fn u64(&mut self) -> Option<u64> {
        // One pass: the digits are read as they are counted.
        let start = self.i;
        let mut v: u64 = 0;
        while let Some(d) = self.b.get(self.i).filter(|d| d.is_ascii_digit()) {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.i += 1;
        }
        let digits = self.i - start;
        if digits == 0 || (digits > 1 && self.b[start] == b'0') {
            return None;
        }
        if matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(v)
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, the one form the gateway writes (`format_ts`).
fn ts(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    if b.len() != 27 || b[26] != b'Z' {
        return None;
    }
    for (at, sep) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ] {
        if b[at] != sep {
            return None;
        }
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |v, &d| {
            d.is_ascii_digit().then(|| v * 10 + u32::from(d - b'0'))
        })
    };
    let date = NaiveDate::from_ymd_opt(i32::try_from(num(0..4)?).ok()?, num(5..7)?, num(8..10)?)?;
    // Seconds 0 to 59 only: a leap second (`:60`) is left to chrono's parser.
    let t = date.and_hms_micro_opt(num(11..13)?, num(14..16)?, num(17..19)?, num(20..26)?)?;
    Some(t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SchemaError;
    use proptest::prelude::*;

    /// What the generic decoder makes of `bytes` (validated, as `decode_into` does).
    fn generic(bytes: &[u8]) -> Result<RequestEvent, String> {
        let mut ev = crate::event::tests::sample();
        ev.decode_generic(bytes)
            .and_then(|()| ev.validate())
            .map(|()| ev)
            .map_err(|e: SchemaError| e.to_string())
    }

    /// What `decode_into` makes of `bytes`, decoding into an event that held another one.
    fn either(bytes: &[u8]) -> Result<RequestEvent, String> {
        let mut ev = crate::event::tests::sample();
        ev.route = None;
        ev.decode_into(bytes)
            .map(|()| ev)
            .map_err(|e| e.to_string())
    }

    fn text() -> impl Strategy<Value = String> {
        // Mostly plain text, sometimes what JSON must escape, sometimes beyond ASCII.
        prop_oneof!["[a-z0-9/_.-]{1,24}", "[a-z\"\\\\\u{1}\u{7f}é€😀 ]{1,12}",]
    }

    fn events() -> impl Strategy<Value = RequestEvent> {
        (
            (
                text(),
                proptest::option::of(text()),
                text(),
                text(),
                100u16..600,
            ),
            (
                any::<u64>(),
                proptest::option::of(any::<u64>()),
                any::<u64>(),
                any::<u64>(),
            ),
            (
                proptest::option::of(text()),
                proptest::option::of(text()),
                0..8usize,
                any::<bool>(),
            ),
            (
                proptest::option::of("[0-9a-f]{32}"),
                -62_000_000_000_000_000i64..253_000_000_000_000_000,
            ),
        )
            .prop_map(
                |(
                    (gateway, route, method, path, status),
                    (lat, up, rq, rs),
                    (consumer, plan, o, billable),
                    (trace, micros),
                )| {
                    RequestEvent {
                        v: 1,
                        id: Uuid::now_v7(),
                        ts: DateTime::from_timestamp_micros(micros).expect("in range"),
                        gateway,
                        route,
                        method,
                        path,
                        status,
                        latency_us: lat,
                        upstream_latency_us: up,
                        req_bytes: rq,
                        resp_bytes: rs,
                        consumer,
                        plan,
                        outcome: Outcome::ALL[o],
                        billable,
                        trace_id: trace,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn writes_what_serde_json_writes(ev in events()) {
            let mut ours = Vec::new();
            encode(&ev.borrowed(), &mut ours);
            prop_assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&ev.borrowed()).unwrap()
            );
        }

        #[test]
        fn reads_what_the_gateway_writes_as_the_generic_decoder_does(ev in events()) {
            let json = ev.to_json();
            prop_assert_eq!(either(&json), generic(&json));
            prop_assert_eq!(either(&json), Ok(ev.clone()));
            // The shortcut is taken whenever nothing in the message needs unescaping.
            let plain = !String::from_utf8_lossy(&json).contains('\\')
                && (0..=9999).contains(&chrono::Datelike::year(&ev.ts));
            let mut into = crate::event::tests::sample();
            prop_assert_eq!(decode(&mut into, &json).is_some(), plain);
        }

        #[test]
        fn a_corrupted_message_decodes_or_fails_as_with_the_generic_decoder(
            ev in events(),
            at in any::<prop::sample::Index>(),
            byte in prop_oneof![Just(b' '), Just(b'0'), Just(b'9'), Just(b'"'), Just(b'\\'), Just(b'-'), Just(b'.'), Just(b'e'), Just(b'n'), Just(b','), Just(b'}'), any::<u8>()],
            cut in any::<bool>(),
        ) {
            let mut json = ev.to_json();
            let i = at.index(json.len());
            if cut { json.truncate(i) } else { json[i] = byte }
            prop_assert_eq!(either(&json), generic(&json));
        }
    }

    #[test]
    fn a_string_ends_at_its_first_quote_backslash_or_control_character() {
        assert!(!needs_escape(b""));
        for len in 0..24 {
            for at in 0..len {
                for b in [b'"', b'\\', 0, 0x1f, b' ', b'a', 0x7f, 0x80, 0xff] {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    let ends = b == b'"' || b == b'\\' || b < 0x20;
                    assert_eq!(
                        string_end(&s),
                        ends.then_some(at),
                        "{b:#x} at {at} of {len}"
                    );
                    assert_eq!(needs_escape(&s), ends, "{b:#x} at {at} of {len}");
                    // A later stop does not hide an earlier one.
                    s.push(b'"');
                    assert_eq!(string_end(&s), Some(if ends { at } else { len }));
                }
            }
        }
    }

    #[test]
    fn writes_timestamps_chrono_formats_as_serde_json_does() {
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_micro_opt(23, 59, 59, 1_234_567))
            .unwrap()
            .and_utc();
        let far = DateTime::from_timestamp_micros(300_000_000_000_000_000).unwrap();
        let before_year_zero = DateTime::from_timestamp_micros(-62_200_000_000_000_000).unwrap();
        for ts in [leap, far, before_year_zero] {
            let ev = RequestEvent {
                ts,
                ..crate::event::tests::sample()
            };
            let mut ours = Vec::new();
            encode(&ev.borrowed(), &mut ours);
            assert_eq!(ours, serde_json::to_vec(&ev.borrowed()).unwrap(), "{ts:?}");
        }
    }

    #[test]
    fn other_forms_of_the_same_event_are_left_to_the_generic_decoder() {
        let ev = crate::event::tests::sample();
        let canonical = String::from_utf8(ev.to_json()).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&canonical).unwrap();
        for other in [
            serde_json::to_string_pretty(&value).unwrap(),
            canonical.replace("Z\"", "+00:00\""),
            format!("{canonical} "),
            {
                // Fields in another order.
                let obj = value.as_object_mut().unwrap();
                let v = obj.remove("v").unwrap();
                obj.insert("v".into(), v);
                serde_json::to_string(&value).unwrap()
            },
        ] {
            let mut into = crate::event::tests::sample();
            assert!(decode(&mut into, other.as_bytes()).is_none(), "{other}");
            assert_eq!(either(other.as_bytes()), Ok(ev.clone()), "{other}");
        }
    }
}
