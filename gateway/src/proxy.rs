//! The request path, as phases over one request's context (`Ctx`), in the spirit of Pingora's
//! `ProxyHttp`: [`Worker::route`], [`Worker::authenticate`], [`Worker::admit`] (rate limit, then
//! quota), [`Worker::upstream_request`] (the head the upstream receives), [`Worker::forward`]
//! (send, and read the answer's head), then [`Worker::respond`] (stream the answer back). A
//! phase either moves the request on or ends it with a [`Rejection`], which [`Worker::reject`]
//! turns into the gateway's own JSON answer.
//!
//! Every request that reaches the phases — rejected ones included — produces exactly one event:
//! its `Ctx` records it when dropped, after the last byte of the answer was written (or the
//! exchange broke off), so `latency_us` spans first byte in to last byte out.
//!
//! Heads are written straight into the connection's output buffer from the parsed request's
//! offsets: no header map, no copy of a header the upstream receives unchanged.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use opentelemetry::trace::TraceContextExt;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::Outcome;

use crate::Shared;
use crate::auth::Identity;
use crate::config::RouteConfig;
use crate::config::WhenStale;
use crate::conn::{self, After, Broken, Pool, Side};
use crate::deadline::Deadline;
use crate::h1::{
    self, Entry, Fields, Framing, Known, Parsed, RequestHead, ResponseHead, put_field,
};
use crate::quota::{Reservation, Staleness};
use crate::recorder::{Draft, Measured, Recorder};
use crate::trace::{self, RequestSpans};
use crate::upstream::{Target, Upstream};

/// Identity header only the gateway may set.
const CONSUMER_HEADER: &str = Known::Consumer.name();
const REQUEST_ID: &str = Known::RequestId.name();
const FORWARDED_FOR: &str = Known::ForwardedFor.name();

/// The longest client-sent `x-request-id` passed on; a longer one is replaced by the event id.
const MAX_REQUEST_ID: usize = 128;

/// Whether `v` can be sent as a header value as it is (visible ASCII, spaces and tabs).
fn is_field_value(v: &[u8]) -> bool {
    v.iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
}

/// Appends `x-forwarded-for` with `peer` after what the client sent.
fn put_forwarded_for(out: &mut Vec<u8>, prev: Option<&[u8]>, peer: SocketAddr) {
    out.extend_from_slice(FORWARDED_FOR.as_bytes());
    out.extend_from_slice(b": ");
    if let Some(p) = prev {
        out.extend_from_slice(p);
        out.extend_from_slice(b", ");
    }
    put_ip(out, peer.ip());
    out.extend_from_slice(b"\r\n");
}

/// Appends `ip` as text. An IPv4 address is written octet by octet: through `Display` (the
/// formatter's machinery for four numbers) it was 0.35 % of a gateway worker's CPU under load,
/// once per request (BENCHMARKS.md, twentieth round). IPv6 keeps `Display`'s canonical form.
fn put_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// A UUIDv7 for an event starting at `ts`, its random bits from the thread's userspace
/// generator: `Uuid::now_v7` asks the kernel (`getrandom`) for every id, one system call per
/// request.
/// The wall-clock time of `at`, an instant of this thread's recent past (a request's start):
/// from a pair of readings of both clocks taken on this thread at most a second before, so
/// that a request reads the monotonic clock only. (Reading both per request was two of the
/// dozen clock reads a proxied request made, BENCHMARKS.md.) A step of the system clock shows
/// within a second; a slew (at most 0.05 %) moves a timestamp by half a millisecond at most.
fn wall_clock(at: Instant) -> chrono::DateTime<chrono::Utc> {
    use std::cell::Cell;
    thread_local! {
        static ANCHOR: Cell<Option<(Instant, chrono::DateTime<chrono::Utc>)>> =
            const { Cell::new(None) };
    }
    const FRESH: std::time::Duration = std::time::Duration::from_secs(1);
    ANCHOR.with(|anchor| {
        let (mono, wall) = match anchor.get() {
            Some((mono, wall)) if at >= mono && at - mono < FRESH => (mono, wall),
            _ => {
                let now = (Instant::now(), chrono::Utc::now());
                anchor.set(Some(now));
                now
            }
        };
        let since = |d: std::time::Duration| chrono::TimeDelta::from_std(d).unwrap_or_default();
        if at >= mono {
            wall + since(at - mono)
        } else {
            wall - since(mono - at)
        }
    })
}

fn event_id(ts: &chrono::DateTime<chrono::Utc>) -> uuid::Uuid {
    let ms = u64::try_from(ts.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(ms, &rand::random::<[u8; 10]>()).into_uuid()
}

/// Why the gateway answers a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub outcome: Outcome,
    pub message: Cow<'static, str>,
    /// `Retry-After` and the `RateLimit-*` headers, for limits.
    pub over: Option<crate::limits::OverLimit>,
    /// `Retry-After` alone (seconds), for load shedding.
    pub retry_after: Option<u64>,
    /// The upstream closed or reset a new connection before any answer: an idempotent request
    /// sent whole may be retried.
    pub retryable: bool,
}

impl Rejection {
    fn new(status: StatusCode, outcome: Outcome, message: impl Into<Cow<'static, str>>) -> Self {
        Rejection {
            status,
            outcome,
            message: message.into(),
            over: None,
            retry_after: None,
            retryable: false,
        }
    }

    fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    fn over_limit(mut self, over: crate::limits::OverLimit) -> Self {
        self.over = Some(over);
        self
    }

    fn bad_gateway(message: &'static str) -> Self {
        Rejection::new(StatusCode::BAD_GATEWAY, Outcome::UpstreamError, message)
    }
}

/// The client's side of one exchange: an HTTP/1.1 connection, or one HTTP/2 stream.
pub enum Client<'c> {
    H1(&'c mut Side),
    #[cfg(feature = "http2")]
    H2 {
        body: &'c mut h2::RecvStream,
        answer: &'c crate::http2::Answering,
    },
}

/// A connection to a target, and whether it came from the pool (it may have been closed by
/// the upstream meanwhile).
pub struct Conn {
    side: Side,
    reused: bool,
}

/// Methods a retry cannot repeat the effect of (RFC 9110 §9.2.2).
fn is_idempotent(m: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(m)
}

fn too_large() -> Rejection {
    Rejection::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        Outcome::BadRequest,
        "the request body is larger than gateway.connections.max_body_bytes",
    )
}

fn timed_out() -> Rejection {
    Rejection::new(
        StatusCode::GATEWAY_TIMEOUT,
        Outcome::Timeout,
        "upstream did not answer in time",
    )
}

/// How much of the request body has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyRead {
    Untouched,
    Partly,
    Done,
}

/// One request's context, carried through the phases; records the request's event when
/// dropped.
pub struct Ctx<'w> {
    recorder: &'w Recorder,
    start: Instant,
    /// The event as known so far.
    event: Draft,
    /// The matched route's position in the configuration.
    route: Option<usize>,
    /// The request's unit of quota, given back unless the answer is billable.
    reservation: Option<Reservation>,
    /// The client's `x-request-id`, when it is kept (else the event id is the request's id).
    client_request_id: Option<Bytes>,
    /// Whether the request id is sent back (once the request went upstream).
    has_request_id: bool,
    /// The event id as text, once written (for the upstream, then for the answer).
    id_text: Option<[u8; 36]>,
    body: BodyRead,
    /// A body that arrived whole, kept until the answer in case the request is sent again.
    staged_body: Option<Bytes>,
    /// The request's spans, when the gateway records them (`telemetry.otlp`).
    spans: Option<RequestSpans<'w>>,
    /// Whether the request gets a trace the gateway starts when it goes upstream
    /// (`trace::root`): the caller sent no well-formed `traceparent`, and the gateway records
    /// no spans. A request answered by the gateway itself propagates no trace, so its event
    /// names none.
    starts_trace: bool,
    req_bytes: u64,
    resp_bytes: u64,
}

impl Drop for Ctx<'_> {
    fn drop(&mut self) {
        if self.event.billable
            && let Some(r) = self.reservation.take()
        {
            r.keep();
        }
        let measured = Measured {
            elapsed: self.start.elapsed(),
            req_bytes: self.req_bytes,
            resp_bytes: self.resp_bytes,
        };
        self.recorder
            .record(self.route, &self.event, measured, self.spans.take());
    }
}

impl Ctx<'_> {
    /// When a phase starts, if its span is recorded.
    fn phase_start(&self) -> Option<SystemTime> {
        self.spans
            .as_ref()
            .filter(|s| s.recording())
            .map(|_| SystemTime::now())
    }

    /// Records phase `name`, started at `start` (see `phase_start`).
    fn phase_end(&self, name: &'static str, start: Option<SystemTime>) {
        if let (Some(spans), Some(start)) = (&self.spans, start) {
            spans.phase(name, start);
        }
    }

    /// Writes the trace context the upstream receives: the gateway's upstream span as parent
    /// when it records spans; else, for a caller that sent none, the trace the gateway started
    /// (`trace::root`, the same on a retry). A caller's own `traceparent` is passed on with its
    /// other fields.
    fn put_trace_context(&mut self, target: &Target, out: &mut Vec<u8>) {
        if let Some(spans) = &mut self.spans {
            let parent = spans.start_upstream(&target.authority);
            trace::inject(&parent, out);
        } else if self.starts_trace {
            let (trace, parent) = trace::root(self.event.id);
            self.event.trace_id = Some(trace);
            trace::put_root(&trace, parent, out);
        }
    }

    /// Appends `x-request-id`: the client's, or the event id.
    fn put_request_id(&self, out: &mut Vec<u8>) {
        self.with_request_id(|id| put_field(out, REQUEST_ID.as_bytes(), id));
    }

    /// Calls `f` with the request's id: the client's, or the event id.
    fn with_request_id<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match &self.client_request_id {
            Some(id) => f(id),
            None => match &self.id_text {
                Some(text) => f(text),
                None => {
                    let mut buf = uuid::Uuid::encode_buffer();
                    f(self.event.id.hyphenated().encode_lower(&mut buf).as_bytes())
                }
            },
        }
    }
}

/// One worker thread's view of the gateway: the shared state, plus what the thread owns (its
/// idle upstream connections and its recorder).
pub struct Worker {
    pub shared: Arc<Shared>,
    pub pool: Pool,
    pub recorder: Recorder,
}

impl Worker {
    /// Serves one request whose head was read on `client`, `out` being the connection's
    /// output buffer and `deadline` its timer. Says whether the connection can serve another.
    #[allow(clippy::too_many_arguments)]
    pub async fn exchange(
        &self,
        client: &mut Side,
        head: RequestHead,
        started: Instant,
        peer: SocketAddr,
        out: &mut Vec<u8>,
        shutdown: &CancellationToken,
        deadline: &mut Deadline,
    ) -> After {
        let mut ctx = self.begin(&head, started);
        match self
            .proxy(
                &mut ctx,
                &mut Client::H1(client),
                &head,
                peer,
                out,
                shutdown,
                Some(deadline),
            )
            .await
        {
            Ok(after) => after,
            Err(rejection) => {
                self.reject(&mut ctx, client, &head, rejection, out, shutdown)
                    .await
            }
        }
    }

    /// The phases in order; the first rejection ends the request. `timer` is the client
    /// connection's, when it has one (HTTP/1.1) for the wait for the upstream's answer.
    #[allow(clippy::too_many_arguments)]
    async fn proxy(
        &self,
        ctx: &mut Ctx<'_>,
        client: &mut Client<'_>,
        head: &RequestHead,
        peer: SocketAddr,
        out: &mut Vec<u8>,
        shutdown: &CancellationToken,
        mut timer: Option<&mut Deadline>,
    ) -> Result<After, Rejection> {
        let (index, route) = self.route(ctx, head)?;
        let t = ctx.phase_start();
        let identity = self.authenticate(index, &head.fields).await;
        ctx.phase_end("auth", t);
        let t = ctx.phase_start();
        let admitted = identity.and_then(|identity| self.admit(ctx, identity));
        if ctx.event.identity.is_some() {
            ctx.phase_end("limits", t);
        }
        admitted?;
        if let Framing::Length(n) = head.framing
            && n > self.shared.timeouts.max_body
        {
            return Err(too_large());
        }
        let upstream = &*self.shared.route_upstreams[index];
        let mut slot = upstream.admit().ok_or_else(|| {
            Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Outcome::UpstreamError,
                "the upstream has as many requests in flight as it is allowed (max_in_flight)",
            )
            .retry_after(1)
        })?;
        let started = Instant::now();
        let timeout = route
            .timeout_ms
            .map_or(upstream.timeout, std::time::Duration::from_millis);
        let deadline = tokio::time::Instant::from_std(started + timeout);
        let mut avoid = None;
        // A second attempt: once, for an idempotent request sent whole, within the budget.
        let may_retry = |ctx: &Ctx<'_>, avoid: Option<usize>| {
            avoid.is_none()
                && is_idempotent(&head.method)
                && (head.framing == Framing::Empty || ctx.staged_body.is_some())
                && upstream.may_retry()
        };
        loop {
            // An idle pooled connection is taken at once; only a new one is waited for within
            // the deadline (a timer armed for a connection already there cost every request).
            let target = upstream.pick(avoid);
            let connected = match self.pool.take(target.id, started) {
                Some(side) => Ok(Ok((target, Conn { side, reused: true }))),
                None => {
                    tokio::time::timeout_at(deadline, self.connect(ctx, upstream, target, started))
                        .await
                }
            };
            let (target, conn) = match connected {
                Ok(Ok(c)) => c,
                Ok(Err(rejection)) => return Err(rejection),
                Err(_) => return Err(timed_out()),
            };
            slot.on(target);
            self.upstream_request(ctx, route, target, head, peer, out);
            let attempt = upstream
                .try_timeout
                .map_or(deadline, |t| deadline.min(tokio::time::Instant::now() + t));
            let answered = self
                .forward(
                    ctx,
                    client,
                    head,
                    target,
                    conn,
                    out,
                    (started, attempt),
                    timer.as_deref_mut(),
                )
                .await;
            if let Some(spans) = &mut ctx.spans {
                spans.end_upstream(answered.as_ref().ok().map(|(r, _)| r.status.as_u16()));
            }
            match answered {
                // An answer the upstream retries elsewhere: dropped unread (with its connection).
                Ok((resp, _)) if upstream.retries_status(resp.status) && may_retry(ctx, avoid) => {
                    tracing::debug!(route = ?ctx.route, status = %resp.status, "retrying on another target");
                    avoid = Some(target.id);
                }
                Ok((resp, up)) => {
                    return Ok(match client {
                        Client::H1(client) => {
                            self.respond(ctx, client, head, resp, up, target, out, shutdown)
                                .await
                        }
                        #[cfg(feature = "http2")]
                        Client::H2 { answer, .. } => {
                            self.respond_h2(ctx, answer, head, resp, up, target, out)
                                .await
                        }
                    });
                }
                // A closed or reset connection, or an attempt out of time while the request
                // has some left.
                Err(r)
                    if (r.retryable || (r.outcome == Outcome::Timeout && attempt < deadline))
                        && may_retry(ctx, avoid) =>
                {
                    tracing::debug!(route = ?ctx.route, why = %r.message, "retrying on another target");
                    avoid = Some(target.id);
                }
                Err(r) => return Err(r),
            }
        }
    }

    /// The context of a request whose head just arrived (its first byte at `started`).
    fn begin(&self, head: &RequestHead, started: Instant) -> Ctx<'_> {
        let ts = wall_clock(started);
        let caller = trace::extract(&head.fields);
        let spans = self
            .recorder
            .tracer()
            .map(|tracing| RequestSpans::start(tracing, caller.as_ref(), ts.into()));
        let trace_id = match (&spans, &caller) {
            (Some(s), _) => trace::trace_id(s.server()),
            (None, Some(cx)) => trace::trace_id(cx.span().span_context()),
            (None, None) => None,
        };
        let starts_trace = spans.is_none() && caller.is_none();
        Ctx {
            recorder: &self.recorder,
            start: started,
            event: Draft {
                id: event_id(&ts),
                ts,
                method: head.method.clone(),
                uri: head.uri.clone(),
                identity: None,
                trace_id,
                status: 0,
                upstream_latency_us: None,
                outcome: Outcome::Ok,
                billable: false,
            },
            route: None,
            reservation: None,
            client_request_id: None,
            has_request_id: false,
            id_text: None,
            body: BodyRead::Untouched,
            staged_body: None,
            spans,
            starts_trace,
            req_bytes: 0,
            resp_bytes: 0,
        }
    }

    /// Phase 1: the route for the request's host, method and path, with its position.
    fn route<'s>(
        &'s self,
        ctx: &mut Ctx<'_>,
        head: &RequestHead,
    ) -> Result<(usize, &'s RouteConfig), Rejection> {
        let host = || {
            head.uri.host().or_else(|| {
                head.fields
                    .get("host")
                    .and_then(|h| std::str::from_utf8(h).ok())
            })
        };
        let Some((index, route)) =
            self.shared
                .router
                .find(host, head.method.as_str(), head.uri.path())
        else {
            return Err(Rejection::new(
                StatusCode::NOT_FOUND,
                Outcome::NotFound,
                "no route matches this host, method and path",
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
        fields: &Fields,
    ) -> Result<Option<Identity>, Rejection> {
        self.shared
            .auth
            .authenticate(route, fields)
            .await
            .map_err(|why| Rejection::new(StatusCode::UNAUTHORIZED, Outcome::Unauthorized, why))
    }

    /// Phase 3: the consumer's rate limit, then the route's limit for the consumer, then its
    /// quota (a unit is reserved, kept only if
    /// the answer is billable). A stale quota state is not enforced (`when_stale: open`), or
    /// refuses consumers whose plan has a quota with 503 (`closed`).
    fn admit(&self, ctx: &mut Ctx<'_>, identity: Option<Identity>) -> Result<(), Rejection> {
        let Some(id) = identity else { return Ok(()) };
        let id = &*ctx.event.identity.insert(id);
        self.shared.rate_limits.check(id).map_err(|over| {
            Rejection::new(
                StatusCode::TOO_MANY_REQUESTS,
                Outcome::RateLimited,
                "rate limit exceeded",
            )
            .over_limit(over)
        })?;
        match self.shared.quota.staleness() {
            Staleness::Fresh => {}
            Staleness::Stale(WhenStale::Open) => return Ok(()),
            Staleness::Stale(WhenStale::Closed) if self.shared.quota_plans.contains(&*id.plan) => {
                return Err(Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Outcome::QuotaExceeded,
                    "the quota state is older than gateway.quota.stale_after_s and this gateway fails closed",
                )
                .retry_after(1));
            }
            Staleness::Stale(WhenStale::Closed) => return Ok(()),
        }
        if let Some(route) = ctx.route {
            self.shared
                .route_limits
                .check(route, id.index)
                .map_err(|over| {
                    Rejection::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        Outcome::RateLimited,
                        "rate limit of this route exceeded",
                    )
                    .over_limit(over)
                })?;
        }
        ctx.reservation = self
            .shared
            .quota
            .reserve(id, ctx.event.ts)
            .map_err(|over| {
                Rejection::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    Outcome::QuotaExceeded,
                    "quota for this period is used up",
                )
                .over_limit(over)
            })?;
        Ok(())
    }

    /// Phase 4: the head the upstream receives, written into `out`. The target is rewritten;
    /// hop-by-hop fields, `Host`, the API key and any client-sent identity are left out; the
    /// gateway sets `Host`, `x-request-id` (the client's, or the event id), `traceparent`
    /// (when the client sent none that is well formed), the consumer and `x-forwarded-for`,
    /// and frames the body itself.
    fn upstream_request(
        &self,
        ctx: &mut Ctx<'_>,
        route: &RouteConfig,
        target: &Target,
        head: &RequestHead,
        peer: SocketAddr,
        out: &mut Vec<u8>,
    ) {
        out.clear();
        out.extend_from_slice(head.method.as_str().as_bytes());
        out.push(b' ');
        target.put_path(out, route.strip_prefix.as_deref(), &head.uri);
        out.extend_from_slice(b" HTTP/1.1\r\n");
        put_field(out, b"host", &target.authority);
        let api_key = self
            .shared
            .auth
            .api_key_header()
            .map(|h| h.as_str().as_bytes());
        // The gateway writes the trace context itself when it records spans or started the
        // trace (a `traceparent` that is not well formed is replaced); else it passes the
        // caller's on as it came.
        let own_trace = ctx.spans.is_some() || ctx.starts_trace;
        let mut forwarded_for = None;
        for Entry { known, name, value } in head.fields.entries() {
            let drop = match known {
                Known::Host | Known::Consumer | Known::RequestId => true,
                Known::TraceParent | Known::TraceState => own_trace,
                Known::ForwardedFor => {
                    if self.shared.trust_forwarded_for {
                        forwarded_for.get_or_insert(value);
                    }
                    true
                }
                _ => {
                    head.fields.entry_is_hop_by_hop(known, name)
                        || api_key.is_some_and(|k| name.eq_ignore_ascii_case(k))
                }
            };
            if !drop {
                put_field(out, name, value);
            }
        }
        ctx.client_request_id = head
            .fields
            .get_known(Known::RequestId)
            .filter(|v| v.len() <= MAX_REQUEST_ID);
        ctx.has_request_id = true;
        if ctx.client_request_id.is_none() && ctx.id_text.is_none() {
            let mut text = [0u8; 36];
            ctx.event.id.hyphenated().encode_lower(&mut text);
            ctx.id_text = Some(text);
        }
        ctx.put_request_id(out);
        ctx.put_trace_context(target, out);
        if let Some(id) = &ctx.event.identity
            && is_field_value(id.consumer().as_bytes())
        {
            put_field(out, CONSUMER_HEADER.as_bytes(), id.consumer().as_bytes());
        }
        put_forwarded_for(out, forwarded_for, peer);
        if head.websocket {
            put_field(out, b"connection", b"upgrade");
            put_field(out, b"upgrade", b"websocket");
        }
        match head.framing {
            Framing::Length(n) => {
                h1::put_number_field(out, b"content-length", n);
            }
            Framing::Chunked => put_field(out, b"transfer-encoding", b"chunked"),
            // A `Content-Length: 0` the client sent is kept: some servers want one on a POST.
            Framing::Empty | Framing::Close => {
                if head.fields.has(Known::ContentLength) {
                    put_field(out, b"content-length", b"0");
                }
            }
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Phase 4b: a connection to `target`, one of the upstream's targets, for which this
    /// worker had no idle connection: an idle one of this worker's, or a new one. A target
    /// that refuses the connection counts a failure (see `upstream.rs` on ejection), and the
    /// next target is tried once: nothing was sent, so this is safe for every method.
    async fn connect<'u>(
        &self,
        ctx: &Ctx<'_>,
        upstream: &'u Upstream,
        mut target: &'u Target,
        now: Instant,
    ) -> Result<(&'u Target, Conn), Rejection> {
        for attempt in 0..2 {
            if attempt > 0
                && let Some(side) = self.pool.take(target.id, now)
            {
                return Ok((target, Conn { side, reused: true }));
            }
            match target.connect(self.shared.timeouts.io).await {
                Ok(side) => {
                    target.succeeded();
                    return Ok((
                        target,
                        Conn {
                            side,
                            reused: false,
                        },
                    ));
                }
                Err(e) => {
                    target.failed();
                    tracing::debug!(error = %e, route = ?ctx.route, "upstream connect failed");
                    if attempt == 0 && upstream.target_count() > 1 {
                        target = upstream.pick(Some(target.id));
                        continue;
                    }
                }
            }
        }
        Err(Rejection::bad_gateway("upstream unreachable"))
    }

    /// Phase 5: sends the request on `conn` and reads the answer's head, by `deadline` (the
    /// upstream's timeout from `started`, when the connection was sought), on `timer` when
    /// given. The wait counts as upstream latency whatever the result, so timeouts show in the
    /// tail.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        ctx: &mut Ctx<'_>,
        client: &mut Client<'_>,
        head: &RequestHead,
        target: &Target,
        conn: Conn,
        out: &mut Vec<u8>,
        (started, deadline): (Instant, tokio::time::Instant),
        timer: Option<&mut Deadline>,
    ) -> Result<(ResponseHead, Side), Rejection> {
        let client_gone = || {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                Outcome::BadRequest,
                "the client went away",
            )
        };
        if let Client::H1(client) = client
            && head.expect_continue
            && head.framing != Framing::Empty
            && ctx.body == BodyRead::Untouched
        {
            client
                .write(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|_| client_gone())?;
        }
        // A body that has arrived whole goes out with the head, and the request can be sent
        // again if a pooled connection turns out to be closed. (An HTTP/2 body is streamed.)
        let buffered = match client {
            Client::H1(c) => Some(&mut c.buf),
            #[cfg(feature = "http2")]
            Client::H2 { .. } => None,
        };
        let staged = match (head.framing, &ctx.staged_body, buffered) {
            (Framing::Empty, _, _) => true,
            (_, Some(body), _) => {
                out.extend_from_slice(body);
                true
            }
            (Framing::Length(n), None, Some(buf)) if buf.len() as u64 >= n => {
                let body = buf.split_to(n as usize).freeze();
                out.extend_from_slice(&body);
                ctx.staged_body = Some(body);
                ctx.req_bytes = n;
                true
            }
            _ => false,
        };
        if staged {
            ctx.body = BodyRead::Done;
        }
        let sent = self.send(ctx, client, head, target, conn, out, staged);
        let result = match timer {
            Some(timer) => timer.run(deadline, sent).await,
            None => tokio::time::timeout_at(deadline, sent).await.ok(),
        };
        ctx.event.upstream_latency_us = Some(started.elapsed().as_micros() as u64);
        result.unwrap_or_else(|| Err(timed_out()))
    }

    /// Writes the request and reads the answer's head. A pooled connection the upstream has
    /// closed meanwhile fails before any answer; the request is then sent once more on a new
    /// connection when it was sent whole (nothing of it can have been acted on).
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        ctx: &mut Ctx<'_>,
        client: &mut Client<'_>,
        head: &RequestHead,
        target: &Target,
        conn: Conn,
        out: &[u8],
        staged: bool,
    ) -> Result<(ResponseHead, Side), Rejection> {
        let unreachable = || Rejection::bad_gateway("upstream unreachable");
        let mut first = Some(conn);
        'attempt: for attempt in 0..2 {
            // The second attempt is on a new connection: another pooled one may be as stale.
            let (mut up, reused) = match first.take() {
                Some(Conn { side, reused }) => (side, reused),
                None => match target.connect(self.shared.timeouts.io).await {
                    Ok(side) => (side, false),
                    Err(e) => {
                        target.failed();
                        tracing::debug!(error = %e, route = ?ctx.route, "upstream connect failed");
                        return Err(unreachable());
                    }
                },
            };
            let may_retry = reused && staged && attempt == 0;
            let mut rest = out;
            if attempt == 0 {
                // With the other requests of this worker's turn (`turn.rs`), in one system call
                // where the worker has an io_uring.
                match crate::turn::send_at_end_of_turn(up.stream.tcp(), out).await {
                    Ok(n) => rest = &out[n..],
                    Err(_) if may_retry => continue,
                    Err(_) => return Err(unreachable().retryable()),
                }
            }
            if !rest.is_empty() && up.write(rest).await.is_err() {
                if may_retry {
                    continue;
                }
                return Err(unreachable().retryable());
            }
            if !staged {
                ctx.body = BodyRead::Partly;
                let mut scratch = Vec::new();
                let limit = self.shared.timeouts.max_body;
                let copied = match client {
                    Client::H1(client) => {
                        let chunked = head.framing == Framing::Chunked;
                        conn::copy_body(
                            client,
                            head.framing,
                            &mut up.stream,
                            chunked,
                            &mut scratch,
                            &mut ctx.req_bytes,
                            limit,
                        )
                        .await
                    }
                    #[cfg(feature = "http2")]
                    Client::H2 { body, .. } => {
                        crate::http2::copy_request_body(
                            body,
                            head.framing,
                            &mut up.stream,
                            &mut scratch,
                            &mut ctx.req_bytes,
                            limit,
                            self.shared.timeouts.io,
                        )
                        .await
                    }
                };
                match copied {
                    Ok(()) => ctx.body = BodyRead::Done,
                    Err(Broken::TooLarge) => return Err(too_large()),
                    Err(Broken::Read) => {
                        return Err(Rejection::new(
                            StatusCode::BAD_REQUEST,
                            Outcome::BadRequest,
                            "the request body ended early or is not valid chunked coding",
                        ));
                    }
                    Err(Broken::Write) => return Err(unreachable()),
                }
            }
            loop {
                match h1::parse_response(&mut up.buf, &head.method) {
                    Ok(Parsed::Head(resp))
                        if resp.status == StatusCode::SWITCHING_PROTOCOLS && head.websocket =>
                    {
                        return Ok((resp, up));
                    }
                    Ok(Parsed::Head(resp)) if resp.status == StatusCode::SWITCHING_PROTOCOLS => {
                        return Err(Rejection::bad_gateway(
                            "the upstream switched protocols, which this route does not pass on",
                        ));
                    }
                    // An interim answer (100 Continue, 103 Early Hints): the final one follows.
                    Ok(Parsed::Head(resp)) if resp.status.is_informational() => continue,
                    Ok(Parsed::Head(resp)) => return Ok((resp, up)),
                    Ok(Parsed::Partial) => {}
                    Err(why) => return Err(Rejection::bad_gateway(why)),
                }
                match up.read_more().await {
                    Ok(n) if n > 0 => {}
                    _ if may_retry && up.buf.is_empty() => continue 'attempt,
                    _ if !reused && up.buf.is_empty() => {
                        target.failed();
                        return Err(Rejection::bad_gateway(
                            "the upstream closed the connection without answering",
                        )
                        .retryable());
                    }
                    _ => {
                        return Err(Rejection::bad_gateway(
                            "the upstream closed the connection without answering",
                        ));
                    }
                }
            }
        }
        Err(unreachable())
    }
}

mod answer;
#[cfg(feature = "http2")]
mod answer_h2;

pub use answer::own_answer;

#[cfg(test)]
mod tests;
