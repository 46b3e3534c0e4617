//! The request path, as phases over one request's context (`Ctx`), in the spirit of Pingora's
//! `ProxyHttp`: [`Worker::route`], [`Worker::authenticate`], [`Worker::admit`] (rate limit, then
//! quota), [`Worker::upstream_request`] (URI rewrite and header policy), [`Worker::forward`],
//! then [`Worker::respond`] (outcome classification). A phase either moves the request on or
//! ends it with a [`Rejection`], which [`Worker::reject`] turns into the gateway's own JSON
//! answer. Every request — rejected ones included — produces exactly one event, emitted by its
//! response body when the last byte has been sent.
//!
//! The common case allocates little: the forwarded URI reuses the request's path and query
//! when no prefix is stripped, trace and span ids are written as hex on the stack, and the
//! route's upstream is found by position, not by name.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use tollgate_schemas::Outcome;
use tollgate_schemas::event::is_lower_hex;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::Shared;
use crate::auth::Identity;
use crate::body::{CountingBody, MeteredBody, Pending};
use crate::config::RouteConfig;
use crate::limits::Reservation;
use crate::recorder::{Draft, Recorder, TraceId};

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Identity headers only the gateway may set.
const CONSUMER_HEADER: HeaderName = HeaderName::from_static("x-tollgate-consumer");
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
// Header names the gateway sets, made once: inserting by `&str` allocates a name per call for
// names that are not standard ones.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The longest client-sent `x-request-id` passed on; a longer one is replaced by the event id.
const MAX_REQUEST_ID: usize = 128;

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // A clone of the value shares its bytes (no copy), so the map can be changed meanwhile.
    if let Some(extra) = headers.get(http::header::CONNECTION).cloned()
        && let Ok(extra) = extra.to_str()
    {
        for name in extra.split(',') {
            headers.remove(name.trim());
        }
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
}

/// A W3C `traceparent`'s trace id, when the header is well formed.
fn trace_id_of(headers: &HeaderMap) -> Option<TraceId> {
    let v = headers.get(TRACEPARENT)?.to_str().ok()?;
    let mut parts = v.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || !is_lower_hex(version, 2)
        || !is_lower_hex(span, 16)
        || !is_lower_hex(flags, 2)
    {
        return None;
    }
    TraceId::parse(trace)
}

/// Writes `v` as `out.len()` lowercase hex digits (the low bits of `v`).
fn write_hex(out: &mut [u8], mut v: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// A new W3C `traceparent` (sampled) and its trace id. Neither id is zero.
fn new_traceparent() -> (HeaderValue, TraceId) {
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-01";
    write_hex(&mut buf[3..35], rand::random::<u128>() | 1);
    write_hex(&mut buf[36..52], u128::from(rand::random::<u64>() | 1));
    let trace = std::str::from_utf8(&buf[3..35])
        .ok()
        .and_then(TraceId::parse)
        .expect("a non-zero hex id");
    let header = HeaderValue::from_bytes(&buf).expect("hex is a header value");
    (header, trace)
}

/// `x-forwarded-for` with `peer` appended to what the client sent.
fn forwarded_for(prev: Option<&HeaderValue>, peer: SocketAddr) -> Option<HeaderValue> {
    use std::io::Write as _;
    let mut out = BytesMut::with_capacity(prev.map_or(0, |p| p.len() + 2) + 39).writer();
    if let Some(p) = prev {
        out.get_mut().put_slice(p.as_bytes());
        out.get_mut().put_slice(b", ");
    }
    write!(out, "{}", peer.ip()).ok()?;
    HeaderValue::from_maybe_shared(out.into_inner().freeze()).ok()
}

/// A UUIDv7 for an event starting at `ts`, its random bits from the thread's userspace
/// generator: `Uuid::now_v7` asks the kernel (`getrandom`) for every id, one system call per
/// request.
fn event_id(ts: &chrono::DateTime<chrono::Utc>) -> uuid::Uuid {
    let ms = u64::try_from(ts.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(ms, &rand::random::<[u8; 10]>()).into_uuid()
}

fn error_body(code: &str, message: &str) -> Full<Bytes> {
    Full::new(Bytes::from(
        serde_json::json!({"error": {"code": code, "message": message}}).to_string(),
    ))
}

fn retry_after_secs(wait: Duration) -> HeaderValue {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

/// What an upstream's answer means for the event: its outcome, and whether it is billable
/// (every answer the upstream gave, except its server errors).
fn classify(status: StatusCode) -> (Outcome, bool) {
    if status.is_server_error() {
        (Outcome::UpstreamError, false)
    } else {
        (Outcome::Ok, true)
    }
}

/// Why the gateway answers a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub outcome: Outcome,
    pub message: Cow<'static, str>,
    /// `Retry-After` and the `RateLimit-*` headers, for limits.
    pub over: Option<crate::limits::OverLimit>,
}

impl Rejection {
    fn new(status: StatusCode, outcome: Outcome, message: impl Into<Cow<'static, str>>) -> Self {
        Rejection {
            status,
            outcome,
            message: message.into(),
            over: None,
        }
    }

    fn over_limit(mut self, over: crate::limits::OverLimit) -> Self {
        self.over = Some(over);
        self
    }
}

/// One request's context, carried through the phases.
pub struct Ctx {
    start: Instant,
    /// The event as known so far; completed by the response body.
    event: Draft,
    /// Request body bytes, counted as they are forwarded.
    req_bytes: Arc<AtomicU64>,
    /// The matched route's position in the configuration.
    route: Option<usize>,
    /// The request's unit of quota, given back unless the answer is billable.
    reservation: Option<Reservation>,
    /// Sent upstream and back to the client.
    request_id: Option<HeaderValue>,
}

/// One upstream target, split for building URIs without parsing: `base` is the target's own
/// path without its trailing slash (usually empty).
struct Target {
    scheme: Scheme,
    authority: Authority,
    base: String,
}

/// One upstream: its targets (round robin) and timeout.
pub struct Upstream {
    targets: Vec<Target>,
    next: AtomicU64,
    pub timeout: Duration,
}

impl Upstream {
    /// Targets were validated with the configuration (`http://host:port[/base]`).
    pub fn new(config: &crate::config::UpstreamConfig) -> Result<Upstream, String> {
        let targets = config
            .targets
            .iter()
            .map(|t| {
                let uri: Uri = t
                    .parse()
                    .map_err(|e| format!("upstream target `{t}` is not a URL: {e}"))?;
                let parts = uri.into_parts();
                match (parts.scheme, parts.authority) {
                    (Some(scheme), Some(authority)) => Ok(Target {
                        scheme,
                        authority,
                        base: parts
                            .path_and_query
                            .map(|p| p.path().trim_end_matches('/').to_string())
                            .unwrap_or_default(),
                    }),
                    _ => Err(format!("upstream target `{t}` must be http://host:port")),
                }
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Upstream {
            targets,
            next: AtomicU64::new(0),
            timeout: Duration::from_millis(config.timeout_ms),
        })
    }

    fn pick(&self) -> &Target {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.targets.len();
        &self.targets[i]
    }
}

/// The URI a request is forwarded to: `target`'s scheme, authority and base path, then the
/// request's path with `strip_prefix` removed (an emptied path becomes `/`), then its query.
/// `None` when the result is not a valid URI.
fn upstream_uri(target: &Target, strip_prefix: Option<&str>, uri: &Uri) -> Option<Uri> {
    let path = uri.path();
    let stripped = strip_prefix.and_then(|p| path.strip_prefix(p));
    let path_and_query = match (stripped, target.base.is_empty()) {
        // The common case: the request's own path and query, shared, not copied.
        (None, true) => uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        (rest, _) => {
            let path = match rest {
                Some("") => "/",
                Some(rest) => rest,
                None => path,
            };
            let query = uri.query();
            let mut s = BytesMut::with_capacity(
                target.base.len() + path.len() + query.map_or(0, |q| q.len() + 1),
            );
            s.put_slice(target.base.as_bytes());
            s.put_slice(path.as_bytes());
            if let Some(q) = query {
                s.put_u8(b'?');
                s.put_slice(q.as_bytes());
            }
            PathAndQuery::from_maybe_shared(s.freeze()).ok()?
        }
    };
    Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .ok()
}

/// One worker thread's view of the gateway: the shared state, plus what the thread owns (its
/// upstream connection pool and its recorder).
pub struct Worker {
    pub shared: Arc<Shared>,
    pub client: Client<HttpConnector, CountingBody>,
    pub recorder: Arc<Recorder>,
}

impl Worker {
    /// Handles one request end to end.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<MeteredBody> {
        let mut ctx = self.begin(&req);
        match self.proxy(&mut ctx, req, peer).await {
            Ok(resp) => self.respond(ctx, resp),
            Err(rejection) => self.reject(ctx, rejection),
        }
    }

    /// The phases in order; the first rejection ends the request.
    async fn proxy(
        &self,
        ctx: &mut Ctx,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Incoming>, Rejection> {
        let (index, route) = self.route(ctx, &req)?;
        let identity = self.authenticate(index, req.headers()).await?;
        self.admit(ctx, identity)?;
        let upstream = &*self.shared.route_upstreams[index];
        let upstream_req = self.upstream_request(ctx, route, upstream, req, peer)?;
        self.forward(ctx, upstream, upstream_req).await
    }

    /// The context of a request that just arrived.
    fn begin(&self, req: &Request<Incoming>) -> Ctx {
        let ts = chrono::Utc::now();
        Ctx {
            start: Instant::now(),
            event: Draft {
                id: event_id(&ts),
                ts,
                method: req.method().clone(),
                uri: req.uri().clone(),
                identity: None,
                trace_id: trace_id_of(req.headers()),
                status: 0,
                upstream_latency_us: None,
                outcome: Outcome::Ok,
                billable: false,
            },
            req_bytes: Arc::new(AtomicU64::new(0)),
            route: None,
            reservation: None,
            request_id: None,
        }
    }

    /// Phase 1: the route for the request's method and path, with its position.
    fn route<'s>(
        &'s self,
        ctx: &mut Ctx,
        req: &Request<Incoming>,
    ) -> Result<(usize, &'s RouteConfig), Rejection> {
        let Some((index, route)) = self
            .shared
            .router
            .find(req.method().as_str(), req.uri().path())
        else {
            return Err(Rejection::new(
                StatusCode::NOT_FOUND,
                Outcome::NotFound,
                "no route matches this method and path",
            ));
        };
        ctx.route = Some(index);
        Ok((index, route))
    }

    /// Phase 2: who is calling, by the route's chain of authenticators (`auth`): `None` for
    /// an anonymous caller the chain admits; a missing or refused credential is a 401.
    async fn authenticate(
        &self,
        route: usize,
        headers: &HeaderMap,
    ) -> Result<Option<Identity>, Rejection> {
        self.shared
            .auth
            .authenticate(route, headers)
            .await
            .map_err(|why| Rejection::new(StatusCode::UNAUTHORIZED, Outcome::Unauthorized, why))
    }

    /// Phase 3: the consumer's rate limit, then its quota (a unit is reserved, kept only if
    /// the answer is billable).
    fn admit(&self, ctx: &mut Ctx, identity: Option<Identity>) -> Result<(), Rejection> {
        let Some(id) = identity else { return Ok(()) };
        let id = &*ctx.event.identity.insert(id);
        self.shared.rate_limits.check(id.index).map_err(|over| {
            Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                Outcome::RateLimited,
                "rate limit exceeded",
            )
            .over_limit(over)
        })?;
        ctx.reservation = self.shared.quota.reserve(&id.consumer).map_err(|over| {
            Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                Outcome::QuotaExceeded,
                "quota for this period is used up",
            )
            .over_limit(over)
        })?;
        Ok(())
    }

    /// Phase 4: the request as the upstream receives it. The URI is rewritten for the target;
    /// hop-by-hop headers, `Host`, the API key and any client-sent identity are removed; the
    /// gateway sets `x-request-id` (the client's, or the event id), `traceparent` (when the
    /// client sent none), the consumer and `x-forwarded-for`.
    fn upstream_request(
        &self,
        ctx: &mut Ctx,
        route: &RouteConfig,
        upstream: &Upstream,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Request<CountingBody>, Rejection> {
        let uri = upstream_uri(upstream.pick(), route.strip_prefix.as_deref(), req.uri())
            .ok_or_else(|| {
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    Outcome::BadRequest,
                    "request path cannot be forwarded",
                )
            })?;
        let (mut parts, body) = req.into_parts();
        parts.uri = uri;
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        headers.remove(http::header::HOST);
        headers.remove(CONSUMER_HEADER);
        if let Some(h) = self.shared.auth.api_key_header() {
            headers.remove(h);
        }
        let request_id = headers
            .get(REQUEST_ID)
            .filter(|v| v.len() <= MAX_REQUEST_ID)
            .cloned()
            .unwrap_or_else(|| {
                let mut buf = uuid::Uuid::encode_buffer();
                HeaderValue::from_str(ctx.event.id.hyphenated().encode_lower(&mut buf))
                    .expect("uuid is a header value")
            });
        headers.insert(REQUEST_ID, request_id.clone());
        ctx.request_id = Some(request_id);
        if ctx.event.trace_id.is_none() {
            let (header, trace) = new_traceparent();
            headers.insert(TRACEPARENT, header);
            ctx.event.trace_id = Some(trace);
        }
        if let Some(v) = ctx
            .event
            .identity
            .as_ref()
            .and_then(|id| HeaderValue::from_str(&id.consumer).ok())
        {
            headers.insert(CONSUMER_HEADER, v);
        }
        if let Some(v) = forwarded_for(headers.get(FORWARDED_FOR), peer) {
            headers.insert(FORWARDED_FOR, v);
        }
        Ok(Request::from_parts(
            parts,
            CountingBody::new(body, ctx.req_bytes.clone()),
        ))
    }

    /// Phase 5: sends the request on this worker's connection pool, within the upstream's
    /// timeout. The wait counts as upstream latency whatever the result, so timeouts show in
    /// the tail.
    async fn forward(
        &self,
        ctx: &mut Ctx,
        upstream: &Upstream,
        req: Request<CountingBody>,
    ) -> Result<Response<Incoming>, Rejection> {
        let sent = Instant::now();
        let result = tokio::time::timeout(upstream.timeout, self.client.request(req)).await;
        ctx.event.upstream_latency_us = Some(sent.elapsed().as_micros() as u64);
        match result {
            Err(_) => Err(Rejection::new(
                StatusCode::GATEWAY_TIMEOUT,
                Outcome::Timeout,
                "upstream did not answer in time",
            )),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, route = ?ctx.route, "upstream request failed");
                Err(Rejection::new(
                    StatusCode::BAD_GATEWAY,
                    Outcome::UpstreamError,
                    "upstream unreachable",
                ))
            }
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Phase 6: the upstream's answer, passed on with its outcome recorded.
    fn respond(&self, mut ctx: Ctx, resp: Response<Incoming>) -> Response<MeteredBody> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(id) = ctx.request_id.take() {
            parts.headers.insert(REQUEST_ID, id);
        }
        ctx.event.status = parts.status.as_u16();
        (ctx.event.outcome, ctx.event.billable) = classify(parts.status);
        Response::from_parts(parts, MeteredBody::upstream(body, self.pending(ctx)))
    }

    /// The gateway's own answer to a rejected request: JSON naming the problem.
    fn reject(&self, mut ctx: Ctx, r: Rejection) -> Response<MeteredBody> {
        ctx.event.status = r.status.as_u16();
        ctx.event.outcome = r.outcome;
        ctx.event.billable = false;
        let body = error_body(r.outcome.as_str(), &r.message);
        let mut resp = Response::new(MeteredBody::own(body, self.pending(ctx)));
        *resp.status_mut() = r.status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let h = resp.headers_mut();
        if let Some(over) = r.over {
            // RFC 9110 `Retry-After`, and the IETF draft's `RateLimit-*` fields.
            let reset = retry_after_secs(over.wait);
            h.insert(http::header::RETRY_AFTER, reset.clone());
            h.insert(RATELIMIT_LIMIT, HeaderValue::from(over.limit));
            h.insert(RATELIMIT_REMAINING, HeaderValue::from_static("0"));
            h.insert(RATELIMIT_RESET, reset);
        }
        if r.status == StatusCode::UNAUTHORIZED {
            h.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tollgate\""),
            );
        }
        resp
    }

    /// What the response body needs to complete and record the event.
    fn pending(&self, ctx: Ctx) -> Pending {
        Pending {
            event: ctx.event,
            start: ctx.start,
            req_bytes: ctx.req_bytes,
            route: ctx.route,
            recorder: self.recorder.clone(),
            quota: ctx.reservation,
        }
    }
}

#[cfg(test)]
mod tests {
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

    fn target(t: &str) -> Target {
        Upstream::new(&crate::config::UpstreamConfig {
            targets: vec![t.into()],
            timeout_ms: 1000,
        })
        .unwrap()
        .targets
        .remove(0)
    }

    fn rewritten(t: &str, strip: Option<&str>, uri: &str) -> Option<String> {
        upstream_uri(&target(t), strip, &uri.parse().unwrap()).map(|u| u.to_string())
    }

    #[test]
    fn the_upstream_uri_keeps_path_and_query_and_applies_base_and_prefix() {
        let t = "http://10.0.0.1:9000";
        assert_eq!(
            rewritten(t, None, "/v1/orders/42?x=1&y").as_deref(),
            Some("http://10.0.0.1:9000/v1/orders/42?x=1&y")
        );
        assert_eq!(
            rewritten(t, Some("/api"), "/api/v2/items?q=a").as_deref(),
            Some("http://10.0.0.1:9000/v2/items?q=a")
        );
        assert_eq!(
            rewritten(t, Some("/api"), "/api").as_deref(),
            Some("http://10.0.0.1:9000/"),
            "an emptied path becomes /"
        );
        assert_eq!(
            rewritten(t, Some("/api"), "/other?q").as_deref(),
            Some("http://10.0.0.1:9000/other?q"),
            "a prefix that does not match is left alone"
        );
        assert_eq!(
            rewritten("http://h:1/base/", None, "/x?y=1").as_deref(),
            Some("http://h:1/base/x?y=1")
        );
        assert_eq!(
            rewritten("http://h:1/base", Some("/api"), "/api/x").as_deref(),
            Some("http://h:1/base/x")
        );
    }

    #[test]
    fn traceparent_is_read_only_when_well_formed_and_new_ones_are_valid() {
        let mut h = HeaderMap::new();
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        h.insert("traceparent", HeaderValue::from_static(good));
        assert_eq!(
            trace_id_of(&h).as_ref().map(TraceId::as_str),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-ff",
        ] {
            h.insert("traceparent", HeaderValue::from_static(bad));
            assert_eq!(trace_id_of(&h), None, "{bad}");
        }
        let (header, trace) = new_traceparent();
        h.insert("traceparent", header);
        assert_eq!(trace_id_of(&h), Some(trace));
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let peer: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        assert_eq!(forwarded_for(None, peer).unwrap(), "192.0.2.7");
        let prev = HeaderValue::from_static("203.0.113.1");
        assert_eq!(
            forwarded_for(Some(&prev), peer).unwrap(),
            "203.0.113.1, 192.0.2.7"
        );
        let v6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert_eq!(forwarded_for(None, v6).unwrap(), "2001:db8::1");
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
}
