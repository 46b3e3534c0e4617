//! The wire rules, probe by probe: each smuggling and limit case the gateway refuses, and the
//! framing it derives from heads it accepts.

use super::*;

fn request(text: &str) -> Result<RequestHead, Refusal> {
    let mut buf = BytesMut::from(text.as_bytes());
    match parse_request(&mut buf)? {
        Parsed::Head(h) => Ok(h),
        Parsed::Partial => panic!("partial: {text:?}"),
    }
}

fn refused(text: &str) -> Refusal {
    request(text).expect_err(text)
}

#[test]
fn a_plain_request_parses_into_offsets_over_its_own_bytes() {
    let mut buf = BytesMut::from(
        &b"GET /v1/items/7?x=1 HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\nConnection: x-extra\r\n\r\nNEXT"[..],
    );
    let Parsed::Head(h) = parse_request(&mut buf).unwrap() else {
        panic!("partial")
    };
    assert_eq!(&buf[..], b"NEXT", "the head is split off, the rest stays");
    assert_eq!(h.method, Method::GET);
    assert_eq!(h.uri.path(), "/v1/items/7");
    assert_eq!(h.uri.query(), Some("x=1"));
    assert_eq!(h.fields.get("x-api-key"), Some(&b"k"[..]));
    assert_eq!(h.framing, Framing::Empty);
    assert!(h.keep_alive);
    assert!(h.fields.is_hop_by_hop(b"X-Extra"), "named in Connection");
    assert!(h.fields.is_hop_by_hop(b"transfer-encoding"));
    assert!(!h.fields.is_hop_by_hop(b"x-api-key"));
}

#[test]
fn known_fields_are_told_by_name_in_any_case_and_no_other_name_is_one() {
    for known in Known::ALL {
        let name = known.name();
        assert_eq!(Known::of(name.as_bytes()), known, "{name}");
        assert_eq!(
            Known::of(name.to_ascii_uppercase().as_bytes()),
            known,
            "{name}"
        );
        // One byte off, wherever it is, or one byte more or fewer, is another field.
        for at in 0..name.len() {
            let mut off = name.as_bytes().to_vec();
            off[at] ^= 0x01;
            assert_eq!(
                Known::of(&off),
                Known::Other,
                "{name} with byte {at} changed"
            );
        }
        assert_eq!(Known::of(&name.as_bytes()[1..]), Known::Other, "{name}");
        assert_eq!(
            Known::of(format!("{name}s").as_bytes()),
            Known::Other,
            "{name}"
        );
    }
    assert_eq!(Known::of(b"x-api-key"), Known::Other);
    assert_eq!(Known::of(b""), Known::Other);
    let hop: Vec<&str> = Known::ALL
        .iter()
        .filter(|k| k.is_hop_by_hop())
        .map(|k| k.name())
        .collect();
    assert_eq!(
        hop,
        [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "content-length",
            "expect"
        ]
    );
}

#[test]
fn a_name_key_read_in_place_is_the_one_made_at_compile_time() {
    let text = b"abcdefghijklmnopqrstuvwx";
    for len in 0..=24 {
        assert_eq!(key(&text[..len]), key_of(&text[..len]), "{len} bytes");
    }
}

#[test]
fn fields_are_found_by_name_and_by_kind_and_keep_their_order() {
    let h = request(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: r1\r\nx-api-key: k\r\nX-REQUEST-ID: r2\r\n\r\n",
    )
    .unwrap();
    assert_eq!(
        h.fields.get("x-request-id"),
        Some(&b"r1"[..]),
        "the first of two"
    );
    assert_eq!(
        h.fields.get_known(Known::RequestId).as_deref(),
        Some(&b"r1"[..])
    );
    assert_eq!(h.fields.get("x-api-key"), Some(&b"k"[..]));
    assert!(h.fields.has(Known::Host));
    assert!(!h.fields.has(Known::ContentLength));
    let entries: Vec<(Known, &[u8], &[u8])> = h
        .fields
        .entries()
        .map(|e| (e.known, e.name, e.value))
        .collect();
    assert_eq!(
        entries,
        [
            (Known::Host, &b"Host"[..], &b"a"[..]),
            (Known::RequestId, b"X-Request-Id", b"r1"),
            (Known::Other, b"x-api-key", b"k"),
            (Known::RequestId, b"X-REQUEST-ID", b"r2"),
        ]
    );
    let pairs = Fields::from_pairs([(&b"te"[..], &b"trailers"[..]), (b"x-k", b"v")]);
    assert!(pairs.is_hop_by_hop(b"te"));
    assert_eq!(pairs.entries().next().map(|e| e.known), Some(Known::Te));
}

#[test]
fn keep_alive_follows_the_version_and_connection() {
    assert!(
        !request("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap()
            .keep_alive
    );
    assert!(!request("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
    assert!(
        request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .keep_alive
    );
}

#[test]
fn framing_comes_from_content_length_or_chunked() {
    let h = request("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n").unwrap();
    assert_eq!(h.framing, Framing::Length(12));
    let h = request("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
    assert_eq!(h.framing, Framing::Chunked);
    let h =
        request("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
            .unwrap();
    assert!(h.expect_continue);
}

#[test]
fn smuggling_probes_are_refused_with_the_reason() {
    let cases = [
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "both",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
            400,
            "more than one",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
            400,
            "more than one",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            400,
            "decimal",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\n",
            400,
            "decimal",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            501,
            "chunked",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            501,
            "chunked",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            501,
            "chunked",
        ),
        (
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            501,
            "chunked",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\n",
            400,
            "malformed",
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
            400,
            "malformed",
        ),
        ("GET / HTTP/1.1\r\n\r\n", 400, "Host"),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "Host"),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nExpect: something\r\n\r\n",
            417,
            "Expect",
        ),
        ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "HTTP/1"),
    ];
    for (text, status, why) in cases {
        let r = refused(text);
        assert_eq!(r.status.as_u16(), status, "{text:?}: {r:?}");
        assert!(r.message.contains(why), "{text:?}: {r:?}");
    }
}

#[test]
fn oversized_heads_are_refused_only_once_past_the_limits() {
    let mut buf = BytesMut::from(format!("GET /{} HTTP/1.1\r\n", "a".repeat(100)).as_bytes());
    assert!(matches!(parse_request(&mut buf), Ok(Parsed::Partial)));
    let mut buf = BytesMut::from(format!("GET /{}", "a".repeat(MAX_REQUEST_LINE)).as_bytes());
    assert_eq!(
        parse_request(&mut buf).err().unwrap().status,
        StatusCode::URI_TOO_LONG
    );
    let mut buf = BytesMut::from(
        format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}",
            "b".repeat(MAX_HEAD)
        )
        .as_bytes(),
    );
    assert_eq!(
        parse_request(&mut buf).err().unwrap().status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
    let r = refused(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n"));
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
}

fn response(text: &str, method: &Method) -> ResponseHead {
    let mut buf = BytesMut::from(text.as_bytes());
    match parse_response(&mut buf, method).unwrap() {
        Parsed::Head(h) => h,
        Parsed::Partial => panic!("partial"),
    }
}

#[test]
fn response_framing_follows_rfc_9112_section_6_3() {
    let get = Method::GET;
    let r = response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", &get);
    assert_eq!((r.framing, r.keep_alive), (Framing::Length(3), true));
    let r = response(
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
        &Method::HEAD,
    );
    assert_eq!(r.framing, Framing::Empty, "no body to HEAD");
    let r = response("HTTP/1.1 204 No Content\r\n\r\n", &get);
    assert_eq!((r.framing, r.keep_alive), (Framing::Empty, true));
    let r = response(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        &get,
    );
    assert_eq!(r.framing, Framing::Chunked);
    let r = response(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        &get,
    );
    assert_eq!(
        (r.framing, r.keep_alive),
        (Framing::Chunked, false),
        "TE wins, connection not reused"
    );
    let r = response("HTTP/1.1 200 OK\r\n\r\n", &get);
    assert_eq!((r.framing, r.keep_alive), (Framing::Close, false));
    let r = response("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", &get);
    assert!(!r.keep_alive);
    let r = response(
        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
        &get,
    );
    assert!(!r.keep_alive);
    let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..]);
    assert!(parse_response(&mut buf, &get).is_err());
}

fn decode_all(input: &[u8]) -> Result<(Vec<u8>, bool), &'static str> {
    let mut d = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    // One byte at a time: every state must resume where the previous read stopped.
    for b in input {
        buf.extend_from_slice(&[*b]);
        loop {
            match d.next(&mut buf)? {
                Chunk::Data(d) => out.extend_from_slice(&d),
                Chunk::Partial => break,
                Chunk::End => return Ok((out, true)),
            }
        }
    }
    Ok((out, false))
}

#[test]
fn chunked_bodies_decode_byte_by_byte_and_bad_framing_is_an_error() {
    let (data, ended) =
        decode_all(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n").unwrap();
    assert_eq!((data.as_slice(), ended), (&b"hello world"[..], true));
    let (data, ended) = decode_all(b"A\r\n0123456789\r\n").unwrap();
    assert_eq!((data.len(), ended), (10, false));
    assert!(
        decode_all(b"5\r\nhelloXX").is_err(),
        "data not followed by CRLF"
    );
    assert!(decode_all(b"zz\r\n").is_err());
    assert!(decode_all(b"+5\r\n").is_err());
    assert!(decode_all(b"5\nhello").is_err(), "bare LF");
    assert!(
        decode_all(b"11111111111111111\r\n").is_err(),
        "more than 16 digits"
    );
}

#[test]
fn writers_frame_what_they_write() {
    let mut out = Vec::new();
    put_decimal(&mut out, 0);
    out.push(b' ');
    put_decimal(&mut out, 1234567890);
    assert_eq!(out, b"0 1234567890");
    let mut out = Vec::new();
    put_chunk(&mut out, b"");
    put_chunk(&mut out, &[b'x'; 26]);
    out.extend_from_slice(LAST_CHUNK);
    assert_eq!(&out[..4], b"1a\r\n");
    let (data, ended) = decode_all(&out).unwrap();
    assert_eq!((data.len(), ended), (26, true));
    let mut out = Vec::new();
    put_status_line(&mut out, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(out, b"HTTP/1.1 429 Too Many Requests\r\n");
}

#[test]
fn paths_are_normalised_once_and_ambiguous_ones_refused() {
    let norm = |p: &str| normalized(p.parse().unwrap()).map(|u| u.to_string());
    assert_eq!(norm("/v1/items?x=1").unwrap(), "/v1/items?x=1");
    assert_eq!(norm("/v1/../admin").unwrap(), "/admin");
    assert_eq!(norm("/v1/%2e%2e/admin").unwrap(), "/admin");
    assert_eq!(
        norm("/v1/%2E./admin?q=..").unwrap(),
        "/admin?q=..",
        "the query is not a path"
    );
    assert_eq!(norm("//v1//items/").unwrap(), "/v1/items/");
    assert_eq!(norm("/v1/./items/.").unwrap(), "/v1/items/");
    assert_eq!(norm("/a/b/..").unwrap(), "/a/");
    assert_eq!(norm("/.").unwrap(), "/");
    assert_eq!(norm("/v1/...").unwrap(), "/v1/...", "three dots are a name");
    assert!(norm("/..").is_err());
    assert!(norm("/v1/../../etc").is_err());
    assert!(norm("/v1%2Fadmin").is_err());
    assert!(norm("/v1%2fadmin").is_err());
    assert!(norm("/v1%5Cadmin").is_err());
    assert!(norm("/v1%5cadmin").is_err());
    assert_eq!(norm("/v1/items.json").unwrap(), "/v1/items.json");
    assert_eq!(norm("/v1/.well-known/x").unwrap(), "/v1/.well-known/x");
    assert_eq!(norm("/v1/x/%2E%2e").unwrap(), "/v1/");
    assert_eq!(
        norm("/v1/a%2").unwrap(),
        "/v1/a%2",
        "a short escape at the end"
    );
    assert_eq!(norm("/v1/a%25").unwrap(), "/v1/a%25");
    let h = request("GET /v1/../admin HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    assert_eq!(
        h.uri.path(),
        "/admin",
        "the parsed head carries the normalised path"
    );
    assert_eq!(
        refused("GET /v1%2Fx HTTP/1.1\r\nHost: a\r\n\r\n").status,
        StatusCode::BAD_REQUEST
    );
}
