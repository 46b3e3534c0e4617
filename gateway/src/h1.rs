//! HTTP/1.1 on the wire, as the gateway speaks it on both sides: request and response heads
//! parsed in place (httparse) into offsets over their own bytes, the framing rules of RFC 9112
//! §6 applied strictly, a streaming chunked decoder, and the writers of the heads the gateway
//! sends. Nothing here does I/O; the connection loop (`conn.rs`) feeds it bytes.
//!
//! Why not hyper: a proxy built on hyper's server and client pays for a `HeaderMap` per message
//! on both sides, a channel and a task between the request and its upstream connection, and a
//! pool checkout through shared state. Measured on this project's two-core machine, a bare
//! hyper proxy reached 0.78 of nginx's requests/s at 26 µs of CPU per request, while the same
//! proxy on parsed offsets reached 1.03–1.10 at 14 µs (BENCHMARKS.md). The gateway's goal is at
//! least nginx's rate with authentication, limits and metering on top, which only the second
//! shape leaves room for.
//!
//! The rules, where a proxy has to be stricter than a server (request smuggling):
//! - `Content-Length` must be digits only; a second one, equal or not, is refused;
//! - `Transfer-Encoding` is accepted only as exactly `chunked`, once, in HTTP/1.1, and never
//!   with `Content-Length`;
//! - obsolete line folding and a space before the colon are refused by the parser; an
//!   HTTP/1.1 request needs exactly one `Host`; every head is written anew with CRLF line ends;
//! - chunk sizes are hex digits, at most 16 of them; chunk extensions and trailers are read and
//!   dropped, so the upstream sees chunk framing the gateway wrote itself;
//! - the path is normalised once ([`normalized`]) and that path is what routing,
//!   authentication, the event and the upstream all see.
//!
//! Each refusal is a status and a message naming the problem; the connection closes after it.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode, Uri};

/// The most header fields a request or response may have.
pub const MAX_HEADERS: usize = 100;
/// The largest request or response head (start line and header fields).
pub const MAX_HEAD: usize = 64 * 1024;
/// The longest request line.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// The longest chunk-size line, chunk extensions included, and the most trailer bytes.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 64 * 1024;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// Why a message is refused: the status to answer with and a message that names the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: &'static str,
}

fn bad(message: &'static str) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        message,
    }
}

/// The header fields the codec and the gateway act on, known by name once, when the head is
/// parsed: every later question about a field ("is it hop-by-hop?", "is it the request id?")
/// is then a comparison of this tag, not of the name's bytes, however many fields a head has.
/// Before, each proxied request compared each field's name with each of a dozen names in turn,
/// in four places (about 900 instructions a request with two fields, `callgrind`,
/// BENCHMARKS.md, twenty-fourth round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Any other field.
    Other,
    // Hop-by-hop fields (RFC 9110 §7.6.1), and the framing fields the gateway writes itself.
    Connection,
    KeepAlive,
    ProxyConnection,
    Te,
    Trailer,
    TransferEncoding,
    Upgrade,
    ProxyAuthorization,
    ContentLength,
    Expect,
    // End to end, read or written by the gateway.
    Host,
    /// `x-request-id`: the request's id, the client's or the gateway's.
    RequestId,
    /// `x-tollgate-consumer`: the authenticated consumer, for the upstream.
    Consumer,
    /// `x-forwarded-for`.
    ForwardedFor,
    /// W3C trace context.
    TraceParent,
    TraceState,
}

impl Known {
    /// Every known field, for [`Known::of`]'s test.
    pub const ALL: [Known; 16] = [
        Known::Connection,
        Known::KeepAlive,
        Known::ProxyConnection,
        Known::Te,
        Known::Trailer,
        Known::TransferEncoding,
        Known::Upgrade,
        Known::ProxyAuthorization,
        Known::ContentLength,
        Known::Expect,
        Known::Host,
        Known::RequestId,
        Known::Consumer,
        Known::ForwardedFor,
        Known::TraceParent,
        Known::TraceState,
    ];

    /// The field's name, lowercase (`""` for [`Known::Other`]).
    pub const fn name(self) -> &'static str {
        match self {
            Known::Other => "",
            Known::Connection => "connection",
            Known::KeepAlive => "keep-alive",
            Known::ProxyConnection => "proxy-connection",
            Known::Te => "te",
            Known::Trailer => "trailer",
            Known::TransferEncoding => "transfer-encoding",
            Known::Upgrade => "upgrade",
            Known::ProxyAuthorization => "proxy-authorization",
            Known::ContentLength => "content-length",
            Known::Expect => "expect",
            Known::Host => "host",
            Known::RequestId => "x-request-id",
            Known::Consumer => "x-tollgate-consumer",
            Known::ForwardedFor => "x-forwarded-for",
            Known::TraceParent => "traceparent",
            Known::TraceState => "tracestate",
        }
    }

    /// Which field `name` is, in any case: its length picks the names it can be, and each is
    /// compared a word at a time (a byte-wise case-insensitive comparison cost about 90
    /// instructions a field; every head has several).
    pub fn of(name: &[u8]) -> Known {
        let candidates: &[Known] = match name.len() {
            2 => &[Known::Te],
            4 => &[Known::Host],
            6 => &[Known::Expect],
            7 => &[Known::Trailer, Known::Upgrade],
            10 => &[Known::Connection, Known::KeepAlive, Known::TraceState],
            11 => &[Known::TraceParent],
            12 => &[Known::RequestId],
            14 => &[Known::ContentLength],
            15 => &[Known::ForwardedFor],
            16 => &[Known::ProxyConnection],
            17 => &[Known::TransferEncoding],
            19 => &[Known::ProxyAuthorization, Known::Consumer],
            _ => return Known::Other,
        };
        candidates
            .iter()
            .copied()
            .find(|k| FOLDED[*k as usize].matches(name))
            .unwrap_or(Known::Other)
    }

    /// Whether the field describes the connection rather than the message, or is framing
    /// the gateway writes itself: never passed on as it came.
    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Known::Connection
                | Known::KeepAlive
                | Known::ProxyConnection
                | Known::Te
                | Known::Trailer
                | Known::TransferEncoding
                | Known::Upgrade
                | Known::ProxyAuthorization
                | Known::ContentLength
                | Known::Expect
        )
    }
}

/// A name as three words that together cover its bytes (it may be up to 24 bytes long): from
/// 8 bytes on, its first eight, its last eight and, past 16 bytes, its second eight; from 4
/// bytes on, its first and last four; else its bytes. Two names of one length are equal when
/// their keys are: the words overlap, but every byte is in one of them.
type Key = [u64; 3];

/// [`Key`] of `b`, at compile time.
const fn key_of(b: &[u8]) -> Key {
    const fn word(b: &[u8], at: usize, n: usize) -> u64 {
        let mut w = 0;
        let mut i = n;
        while i > 0 {
            i -= 1;
            w = (w << 8) | b[at + i] as u64;
        }
        w
    }
    let len = b.len();
    if len >= 8 {
        let second = if len > 16 { word(b, 8, 8) } else { 0 };
        [word(b, 0, 8), word(b, len - 8, 8), second]
    } else if len >= 4 {
        [word(b, 0, 4), word(b, len - 4, 4), 0]
    } else {
        [word(b, 0, len), 0, 0]
    }
}

/// [`Key`] of `b` (at most 24 bytes), read in place.
fn key(b: &[u8]) -> Key {
    let at8 = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("eight bytes"));
    let at4 = |i: usize| u64::from(u32::from_le_bytes(b[i..i + 4].try_into().expect("four")));
    let len = b.len();
    if len >= 8 {
        [at8(0), at8(len - 8), if len > 16 { at8(8) } else { 0 }]
    } else if len >= 4 {
        [at4(0), at4(len - 4), 0]
    } else {
        [
            b.iter().rev().fold(0, |w, b| (w << 8) | u64::from(*b)),
            0,
            0,
        ]
    }
}

/// A known name's [`Key`], and the key of its case bits (0x20 where it has a letter): a name
/// of the same length is it, in any case, when `key(name) | case == words`, word by word.
/// Exact: a letter's two cases differ only in that bit, and the other bytes (`-`) are compared
/// as they are.
struct Folded {
    words: Key,
    case: Key,
}

impl Folded {
    const fn of(name: &str) -> Folded {
        let b = name.as_bytes();
        let mut case = [0u8; 24];
        let mut i = 0;
        while i < b.len() {
            if b[i].is_ascii_lowercase() {
                case[i] = 0x20;
            }
            i += 1;
        }
        let (case, _) = case.split_at(b.len());
        Folded {
            words: key_of(b),
            case: key_of(case),
        }
    }

    /// Whether `name`, as long as this name, is this name in any case.
    fn matches(&self, name: &[u8]) -> bool {
        let k = key(name);
        (0..3).all(|i| k[i] | self.case[i] == self.words[i])
    }
}

/// Each known name folded, by `Known as usize`.
const FOLDED: [Folded; 17] = {
    let mut folded = [const { Folded::of("") }; 17];
    let mut i = 0;
    while i < Known::ALL.len() {
        let known = Known::ALL[i];
        folded[known as usize] = Folded::of(known.name());
        i += 1;
    }
    folded
};

/// A header field as offsets into its head's bytes, and which field it is.
#[derive(Debug, Clone)]
struct Field {
    name: Range<usize>,
    value: Range<usize>,
    known: Known,
}

/// One field of a head, as [`Fields::entries`] hands it out.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub known: Known,
    pub name: &'a [u8],
    pub value: &'a [u8],
}

thread_local! {
    /// Field lists of heads this thread has dropped, emptied, for the next heads it parses.
    /// Parsing allocated a list for every request and every answer, the request path's only
    /// allocations per request; a worker now reuses a handful. (Holding the fields inline in
    /// the head instead made every head 256 bytes larger and the workers' CPU per request 6 to
    /// 11 % higher, BENCHMARKS.md.)
    static SPARE_FIELDS: std::cell::RefCell<Vec<Vec<Field>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// At most this many spare lists per thread (a worker has about as many heads alive as
/// requests in flight).
const SPARE_LISTS: usize = 1024;

/// A list longer than this is freed rather than kept.
const SPARE_CAPACITY: usize = 64;

/// An empty field list: a spare one when this thread has one.
fn field_list() -> Vec<Field> {
    SPARE_FIELDS
        .try_with(|s| s.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The header fields of one head, over the head's bytes (shared, not copied).
#[derive(Debug, Clone)]
pub struct Fields {
    raw: Bytes,
    fields: Vec<Field>,
    /// Names listed in `Connection` are hop-by-hop too (RFC 9110 §7.6.1).
    connection: Vec<Range<usize>>,
}

impl Drop for Fields {
    /// Hands the field list to this thread's spares.
    fn drop(&mut self) {
        let mut list = std::mem::take(&mut self.fields);
        if list.capacity() == 0 || list.capacity() > SPARE_CAPACITY {
            return;
        }
        list.clear();
        let _ = SPARE_FIELDS.try_with(|s| {
            let mut spares = s.borrow_mut();
            if spares.len() < SPARE_LISTS {
                spares.push(list);
            }
        });
    }
}

impl Fields {
    /// Fields over a buffer of their own, for a head that did not arrive as HTTP/1.1 bytes
    /// (HTTP/2's, where no `Connection` field can be among them).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Fields {
        let mut raw = Vec::new();
        let mut fields = Vec::new();
        for (name, value) in pairs {
            let n = raw.len()..raw.len() + name.len();
            raw.extend_from_slice(name);
            let v = raw.len()..raw.len() + value.len();
            raw.extend_from_slice(value);
            fields.push(Field {
                name: n,
                value: v,
                known: Known::of(name),
            });
        }
        Fields {
            raw: raw.into(),
            fields,
            connection: Vec::new(),
        }
    }

    /// The first field that `name` (lowercase) names.
    fn find(&self, name: &str) -> Option<&Field> {
        match Known::of(name.as_bytes()) {
            Known::Other => self
                .fields
                .iter()
                .find(|f| self.raw[f.name.clone()].eq_ignore_ascii_case(name.as_bytes())),
            known => self.fields.iter().find(|f| f.known == known),
        }
    }

    /// The first value of header `name` (lowercase).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.find(name).map(|f| &self.raw[f.value.clone()])
    }

    /// The first value of header `name` (lowercase), sharing the head's bytes.
    pub fn get_shared(&self, name: &str) -> Option<Bytes> {
        self.find(name).map(|f| self.raw.slice(f.value.clone()))
    }

    /// The first value of the known field `known`, sharing the head's bytes.
    pub fn get_known(&self, known: Known) -> Option<Bytes> {
        self.fields
            .iter()
            .find(|f| f.known == known)
            .map(|f| self.raw.slice(f.value.clone()))
    }

    /// Whether a field of `known` is present.
    pub fn has(&self, known: Known) -> bool {
        self.fields.iter().any(|f| f.known == known)
    }

    /// Every field, in order, as (name, value).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries().map(|e| (e.name, e.value))
    }

    /// Every field, in order, with which field it is.
    pub fn entries(&self) -> impl Iterator<Item = Entry<'_>> {
        self.fields.iter().map(|f| Entry {
            known: f.known,
            name: &self.raw[f.name.clone()],
            value: &self.raw[f.value.clone()],
        })
    }

    /// Whether `name` describes the connection rather than the message: the fixed hop-by-hop
    /// names, and those listed in `Connection`.
    pub fn is_hop_by_hop(&self, name: &[u8]) -> bool {
        self.entry_is_hop_by_hop(Known::of(name), name)
    }

    /// [`Fields::is_hop_by_hop`] for a field already known as `known`.
    pub fn entry_is_hop_by_hop(&self, known: Known, name: &[u8]) -> bool {
        known.is_hop_by_hop()
            || self
                .connection
                .iter()
                .any(|r| name.eq_ignore_ascii_case(&self.raw[r.clone()]))
    }
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    /// The request target (origin or absolute form), sharing the head's bytes.
    pub uri: Uri,
    /// HTTP/1.0 rather than HTTP/1.1.
    pub http10: bool,
    pub fields: Fields,
    pub framing: Framing,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// A WebSocket handshake: `GET` over HTTP/1.1 with `Connection: upgrade` and
    /// `Upgrade: websocket`. Other upgrades are not passed on (the fields are hop-by-hop).
    pub websocket: bool,
}

/// What parsing a message head at the start of a buffer found.
pub enum Parsed<T> {
    /// A whole head, split off the buffer.
    Head(T),
    /// More bytes are needed.
    Partial,
}

/// Start-line-and-fields checks common to both directions.
struct Scan {
    fields: Vec<Field>,
    connection: Vec<Range<usize>>,
    content_length: Option<u64>,
    chunked: bool,
    other_coding: bool,
    close: bool,
    keep_alive: bool,
    /// `Connection` names `upgrade`.
    upgrade: bool,
    hosts: usize,
    expect: Option<Range<usize>>,
}

fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

/// Reads the fields httparse found: their offsets, and the framing and connection fields.
fn scan(base: &[u8], headers: &[httparse::Header<'_>]) -> Result<Scan, &'static str> {
    let mut s = Scan {
        fields: field_list(),
        connection: Vec::new(),
        content_length: None,
        chunked: false,
        other_coding: false,
        close: false,
        keep_alive: false,
        upgrade: false,
        hosts: 0,
        expect: None,
    };
    let mut codings = 0;
    for h in headers {
        let name = offset(base, h.name.as_bytes());
        let value = offset(base, h.value);
        let known = Known::of(h.name.as_bytes());
        if known == Known::ContentLength {
            let v = h.value;
            if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
                return Err("Content-Length must be a decimal number");
            }
            if s.content_length.is_some() {
                return Err("more than one Content-Length");
            }
            // At most 18 digits: no overflow.
            s.content_length = Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')));
        } else if known == Known::TransferEncoding {
            codings += 1;
            if h.value.eq_ignore_ascii_case(b"chunked") && codings == 1 {
                s.chunked = true;
            } else {
                s.other_coding = true;
            }
        } else if known == Known::Connection {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    s.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    s.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    s.upgrade = true;
                } else if !token.is_empty() {
                    s.connection.push(offset(base, token));
                }
            }
        } else if known == Known::Host {
            s.hosts += 1;
        } else if known == Known::Expect {
            s.expect = Some(value.clone());
        }
        s.fields.push(Field { name, value, known });
    }
    Ok(s)
}

/// Room for a head's fields, left uninitialised: httparse writes the fields it finds and
/// hands back only those. Filling 100 empty fields (3.2 kB) before every parse was about 500
/// instructions a head, more than parsing a short one.
fn uninit_headers<'b>() -> [std::mem::MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Parses the request head at the start of `buf`, splitting it off when complete.
pub fn parse_request(buf: &mut BytesMut) -> Result<Parsed<RequestHead>, Refusal> {
    let mut headers = uninit_headers();
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return partial_request(buf),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                message: "too many header fields",
            });
        }
        Err(httparse::Error::Version) => {
            return Err(Refusal {
                status: StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                message: "only HTTP/1.0 and HTTP/1.1 are served on this port",
            });
        }
        Err(_) => return Err(bad("malformed request head")),
    };
    if len > MAX_HEAD {
        return Err(Refusal {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            message: "request header fields too large",
        });
    }
    if buf
        .iter()
        .take(len)
        .position(|b| *b == b'\n')
        .unwrap_or(len)
        > MAX_REQUEST_LINE
    {
        return Err(Refusal {
            status: StatusCode::URI_TOO_LONG,
            message: "request line too long",
        });
    }
    let http10 = req.version == Some(0);
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("malformed method"))?;
    let target = offset(buf, req.path.unwrap_or("").as_bytes());
    let s = scan(buf, req.headers).map_err(bad)?;
    if s.other_coding || (s.chunked && http10) {
        return Err(Refusal {
            status: StatusCode::NOT_IMPLEMENTED,
            message: "Transfer-Encoding other than a single `chunked` is not accepted",
        });
    }
    if s.chunked && s.content_length.is_some() {
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    if !http10 && s.hosts != 1 {
        return Err(bad("an HTTP/1.1 request needs exactly one Host header"));
    }
    let expect_continue = match &s.expect {
        None => false,
        Some(r) if buf[r.clone()].eq_ignore_ascii_case(b"100-continue") => true,
        Some(_) => {
            return Err(Refusal {
                status: StatusCode::EXPECTATION_FAILED,
                message: "only `Expect: 100-continue` is understood",
            });
        }
    };
    let framing = if s.chunked {
        Framing::Chunked
    } else {
        match s.content_length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    };
    let websocket = s.upgrade
        && !http10
        && method == Method::GET
        && s.fields.iter().any(|f| {
            f.known == Known::Upgrade && buf[f.value.clone()].eq_ignore_ascii_case(b"websocket")
        });
    let raw = buf.split_to(len).freeze();
    let uri =
        Uri::from_maybe_shared(raw.slice(target)).map_err(|_| bad("malformed request target"))?;
    let uri = normalized(uri).map_err(bad)?;
    Ok(Parsed::Head(RequestHead {
        method,
        uri,
        http10,
        fields: Fields {
            raw,
            fields: s.fields,
            connection: s.connection,
        },
        framing,
        keep_alive: if http10 { s.keep_alive } else { !s.close },
        expect_continue,
        websocket,
    }))
}

/// The request target with its path normalised, once, for everything after (routing,
/// authentication, the event and the upstream): `//` merged, `.` and `..` segments resolved (a
/// percent-encoded dot counts as a dot), the query kept. An encoded `/` or `\\` in the path, a
/// `..` above the root, or a path that does not start with `/` is refused: a proxy and its
/// upstream must never disagree on which resource a path names.
pub fn normalized(uri: Uri) -> Result<Uri, &'static str> {
    if uri.path() == "*" && uri.query().is_none() {
        return Ok(uri); // OPTIONS * (no route matches it)
    }
    let path = uri.path();
    if !path.starts_with('/') {
        return Err("the request path must start with /");
    }
    // Checked on every request: one scan of the path, no copy of it. It refuses an encoded
    // `/` or `\\` and a `\\`, and notes whether there is anything to resolve: `//`, `/.`,
    // or an encoded dot.
    let bytes = path.as_bytes();
    let mut plain = true;
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return Err("an encoded / or \\ in the request path is not accepted"),
            b'%' => match bytes
                .get(i + 1..i + 3)
                .map(|c| (c[0], c[1].to_ascii_lowercase()))
            {
                Some((b'2', b'f') | (b'5', b'c')) => {
                    return Err("an encoded / or \\ in the request path is not accepted");
                }
                Some((b'2', b'e')) => plain = false,
                _ => {}
            },
            b'/' if matches!(bytes.get(i + 1), Some(b'/' | b'.')) => plain = false,
            _ => {}
        }
    }
    if plain {
        return Ok(uri); // the common case: nothing to do, nothing copied
    }
    let mut segments: Vec<&str> = Vec::new();
    let is_dots = |s: &str, n: usize| {
        let s = s.to_ascii_lowercase().replace("%2e", ".");
        s.len() == n && s.bytes().all(|b| b == b'.')
    };
    // A path ending in a segment that resolves away (`/`, `/.`, `/..`, encoded or not) names
    // a directory.
    let last = path.rsplit('/').next().unwrap_or("");
    let trailing = last.is_empty() || is_dots(last, 1) || is_dots(last, 2);
    for seg in path.split('/').skip(1) {
        if seg.is_empty() || is_dots(seg, 1) {
            continue;
        }
        if is_dots(seg, 2) {
            if segments.pop().is_none() {
                return Err("the request path climbs above the root");
            }
            continue;
        }
        segments.push(seg);
    }
    let mut out = String::with_capacity(path.len() + uri.query().map_or(0, |q| q.len() + 1));
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push('/');
    }
    if let Some(q) = uri.query() {
        out.push('?');
        out.push_str(q);
    }
    Uri::from_maybe_shared(Bytes::from(out)).map_err(|_| "malformed request target")
}

/// An incomplete request head: fine while within the limits.
fn partial_request(buf: &BytesMut) -> Result<Parsed<RequestHead>, Refusal> {
    let line_ended = buf.iter().take(MAX_REQUEST_LINE).any(|b| *b == b'\n');
    if !line_ended && buf.len() >= MAX_REQUEST_LINE {
        return Err(Refusal {
            status: StatusCode::URI_TOO_LONG,
            message: "request line too long",
        });
    }
    if buf.len() >= MAX_HEAD {
        return Err(Refusal {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            message: "request header fields too large",
        });
    }
    Ok(Parsed::Partial)
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub fields: Fields,
    pub framing: Framing,
    /// The upstream keeps the connection open after this response.
    pub keep_alive: bool,
}

/// Parses the response head at the start of `buf` (the answer to a request with method
/// `method`), splitting it off when complete. The framing follows RFC 9112 §6.3.
pub fn parse_response(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Parsed<ResponseHead>, &'static str> {
    let mut headers = uninit_headers();
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err("the upstream's response head is too large");
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(_) => return Err("the upstream's response head is malformed"),
    };
    let http10 = resp.version == Some(0);
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|_| "the upstream's status code is invalid")?;
    let s = scan(buf, resp.headers)?;
    let no_body = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Empty
    } else if s.chunked && !s.other_coding {
        Framing::Chunked
    } else if s.chunked || s.other_coding {
        Framing::Close
    } else {
        match s.content_length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let keep_alive = framing != Framing::Close
        && !(s.chunked && s.content_length.is_some())
        && if http10 { s.keep_alive } else { !s.close };
    let raw = buf.split_to(len).freeze();
    Ok(Parsed::Head(ResponseHead {
        status,
        fields: Fields {
            raw,
            fields: s.fields,
            connection: s.connection,
        },
        framing,
        keep_alive,
    }))
}

/// What the chunked decoder found next in its buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Body bytes (split off the buffer).
    Data(Bytes),
    /// More bytes are needed.
    Partial,
    /// The last chunk and the trailers have been read.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

/// A streaming decoder of the chunked transfer coding (RFC 9112 §7.1).
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
        }
    }
}

/// The line at the start of `buf`, without its CRLF, and the line's length with it.
fn line(buf: &[u8], limit: usize) -> Result<Option<(&[u8], usize)>, &'static str> {
    match buf.iter().take(limit).position(|b| *b == b'\n') {
        Some(lf) if lf > 0 && buf[lf - 1] == b'\r' => Ok(Some((&buf[..lf - 1], lf + 1))),
        Some(_) => Err("a chunked body line does not end with CRLF"),
        None if buf.len() >= limit => Err("a chunked body line is too long"),
        None => Ok(None),
    }
}

impl ChunkedDecoder {
    /// Decodes from the start of `buf`, consuming what it decodes.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Chunk, &'static str> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some((text, used)) = line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Chunk::Partial);
                    };
                    let digits = text
                        .iter()
                        .position(|b| !b.is_ascii_hexdigit())
                        .unwrap_or(text.len());
                    let rest = &text[digits..];
                    if digits == 0
                        || digits > 16
                        || !(rest.is_empty()
                            || rest[0] == b';'
                            || rest[0] == b' '
                            || rest[0] == b'\t')
                    {
                        return Err("a chunk size is not hex digits");
                    }
                    let size = text[..digits].iter().fold(0u64, |n, d| {
                        (n << 4) | u64::from((*d as char).to_digit(16).unwrap_or(0))
                    });
                    let _ = buf.split_to(used);
                    self.state = if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Chunk::Partial);
                    }
                    let n = left.min(buf.len() as u64) as usize;
                    self.state = if n as u64 == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n as u64)
                    };
                    return Ok(Chunk::Data(buf.split_to(n).freeze()));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Chunk::Partial);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("a chunk's data is not followed by CRLF");
                    }
                    let _ = buf.split_to(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers(seen) => {
                    let Some((text, used)) = line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Chunk::Partial);
                    };
                    let empty = text.is_empty();
                    let _ = buf.split_to(used);
                    if empty {
                        self.state = ChunkState::Done;
                        return Ok(Chunk::End);
                    }
                    if seen + used > MAX_TRAILERS {
                        return Err("chunked trailers are too large");
                    }
                    self.state = ChunkState::Trailers(seen + used);
                }
                ChunkState::Done => return Ok(Chunk::End),
            }
        }
    }
}

/// Appends `n` in decimal: the event encoder's writer, shared.
pub use tollgate_schemas::put_decimal;

/// Appends one chunk of the chunked coding holding `data` (nothing for empty data).
pub fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut hex = [0u8; 16];
    let mut i = hex.len();
    let mut v = data.len();
    loop {
        i -= 1;
        hex[i] = b"0123456789abcdef"[v & 0xf];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&hex[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Appends a header field line.
pub fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends a header field line whose value is a decimal number.
pub fn put_number_field(out: &mut Vec<u8>, name: &[u8], n: u64) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    put_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Appends an HTTP/1.1 status line.
pub fn put_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests;
