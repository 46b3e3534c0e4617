//! The request path, in phases: match a route, authenticate, enforce rate limit and quota, then
//! forward to an upstream target with a pooled hyper client. Every request — rejected ones
//! included — produces exactly one event, emitted when its response body has been sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tollgate_schemas::{Outcome, RequestEvent};

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::Shared;
use crate::auth::Identity;
use crate::body::{CountingBody, MeteredBody, Pending};
use crate::recorder::Recorder;

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
const CONSUMER_HEADER: &str = "x-tollgate-consumer";

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(extra) = headers
        .get(http::header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
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
fn trace_id_of(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("traceparent")?.to_str().ok()?;
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "0".repeat(32))
    .then(|| parts[1].to_string())
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
        let shared = &*self.shared;
        let start = Instant::now();
        let ts = chrono::Utc::now();
        let id = event_id(&ts);
        let method = req.method().as_str().to_string();
        let path = req.uri().path().to_string();
        let mut event = RequestEvent {
            v: 1,
            id,
            ts,
            gateway: shared.gateway_id.clone(),
            route: None,
            method,
            path,
            status: 0,
            latency_us: 0,
            upstream_latency_us: None,
            req_bytes: 0,
            resp_bytes: 0,
            consumer: None,
            plan: None,
            outcome: Outcome::Ok,
            billable: false,
            trace_id: trace_id_of(req.headers()),
        };
        let req_bytes = Arc::new(AtomicU64::new(0));
        let mut route_index = None;
        let reject = |mut event: RequestEvent,
                      route: Option<usize>,
                      status: StatusCode,
                      outcome: Outcome,
                      message: &str,
                      retry: Option<Duration>| {
            event.status = status.as_u16();
            event.outcome = outcome;
            let pending = Pending {
                event,
                start,
                req_bytes: req_bytes.clone(),
                route,
                recorder: self.recorder.clone(),
                quota: None,
            };
            let mut resp = Response::new(MeteredBody::new(
                error_body(outcome.as_str(), message),
                pending,
            ));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(wait) = retry {
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, retry_after_secs(wait));
            }
            resp
        };

        // Phase 1: route.
        let Some((index, route)) = shared.router.find(req.method().as_str(), req.uri().path())
        else {
            return reject(
                event,
                route_index,
                StatusCode::NOT_FOUND,
                Outcome::NotFound,
                "no route matches this method and path",
                None,
            );
        };
        event.route = Some(route.id.clone());
        route_index = Some(index);

        // Phase 2: authenticate.
        let identity: Option<Identity> = match (&shared.api_key_header, route.auth) {
            (_, false) => None,
            (None, true) => None,
            (Some(h), true) => match req
                .headers()
                .get(h)
                .and_then(|v| shared.keys.authenticate(v.as_bytes()))
            {
                Some(id) => Some(id),
                None => {
                    let msg = format!("missing or unknown API key in header `{h}`");
                    return reject(
                        event,
                        route_index,
                        StatusCode::UNAUTHORIZED,
                        Outcome::Unauthorized,
                        &msg,
                        None,
                    );
                }
            },
        };
        // The request's unit of quota, given back if it ends without a billable answer (any
        // early return below drops it).
        let mut reservation = None;
        if let Some(id) = &identity {
            event.consumer = Some(id.consumer.to_string());
            event.plan = Some(id.plan.to_string());

            // Phase 3: rate limit, then quota.
            if let Err(wait) = shared.rate_limits.check(&id.consumer) {
                return reject(
                    event,
                    route_index,
                    StatusCode::TOO_MANY_REQUESTS,
                    Outcome::RateLimited,
                    "rate limit exceeded",
                    Some(wait),
                );
            }
            match shared.quota.reserve(&id.consumer) {
                Ok(r) => reservation = r,
                Err(wait) => {
                    return reject(
                        event,
                        route_index,
                        StatusCode::TOO_MANY_REQUESTS,
                        Outcome::QuotaExceeded,
                        "quota for this period is used up",
                        Some(wait),
                    );
                }
            }
        }

        // Phase 4: forward.
        let upstream = &shared.upstreams[&route.upstream];
        let target = upstream.pick();
        let mut path = req.uri().path();
        if let Some(prefix) = &route.strip_prefix
            && let Some(rest) = path.strip_prefix(prefix.as_str())
        {
            path = if rest.is_empty() { "/" } else { rest };
        }
        let path_and_query = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let uri: Uri = match format!("{target}{path_and_query}").parse() {
            Ok(u) => u,
            Err(_) => {
                return reject(
                    event,
                    route_index,
                    StatusCode::BAD_REQUEST,
                    Outcome::BadRequest,
                    "request path cannot be forwarded",
                    None,
                );
            }
        };
        let (mut parts, body) = req.into_parts();
        parts.uri = uri;
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        headers.remove(http::header::HOST);
        headers.remove(CONSUMER_HEADER);
        if let Some(h) = &shared.api_key_header {
            headers.remove(h);
        }
        let request_id = headers
            .get("x-request-id")
            .filter(|v| v.len() <= 128)
            .cloned()
            .unwrap_or_else(|| {
                HeaderValue::from_str(&id.to_string()).expect("uuid is a header value")
            });
        headers.insert("x-request-id", request_id.clone());
        if event.trace_id.is_none() {
            let trace = format!("{:032x}", rand::random::<u128>() | 1);
            let span = format!("{:016x}", rand::random::<u64>() | 1);
            headers.insert(
                "traceparent",
                HeaderValue::from_str(&format!("00-{trace}-{span}-01")).expect("hex"),
            );
            event.trace_id = Some(trace);
        }
        if let Some(v) = event
            .consumer
            .as_deref()
            .and_then(|c| HeaderValue::from_str(c).ok())
        {
            headers.insert(CONSUMER_HEADER, v);
        }
        let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        let upstream_req = Request::from_parts(parts, CountingBody::new(body, req_bytes.clone()));
        let sent = Instant::now();
        let result =
            tokio::time::timeout(upstream.timeout, self.client.request(upstream_req)).await;
        match result {
            Err(_) => {
                // Forwarded, never answered: the wait counts, so timeouts show in the tail.
                event.upstream_latency_us = Some(sent.elapsed().as_micros() as u64);
                reject(
                    event,
                    route_index,
                    StatusCode::GATEWAY_TIMEOUT,
                    Outcome::Timeout,
                    "upstream did not answer in time",
                    None,
                )
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, route = %route.id, "upstream request failed");
                event.upstream_latency_us = Some(sent.elapsed().as_micros() as u64);
                reject(
                    event,
                    route_index,
                    StatusCode::BAD_GATEWAY,
                    Outcome::UpstreamError,
                    "upstream unreachable",
                    None,
                )
            }
            Ok(Ok(resp)) => {
                event.upstream_latency_us = Some(sent.elapsed().as_micros() as u64);
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.headers.insert("x-request-id", request_id);
                event.status = parts.status.as_u16();
                let server_error = parts.status.is_server_error();
                event.outcome = if server_error {
                    Outcome::UpstreamError
                } else {
                    Outcome::Ok
                };
                event.billable = !server_error;
                let pending = Pending {
                    event,
                    start,
                    req_bytes,
                    route: route_index,
                    recorder: self.recorder.clone(),
                    quota: reservation,
                };
                Response::from_parts(parts, MeteredBody::new(body.boxed(), pending))
            }
        }
    }
}

/// One upstream: its targets (round robin) and timeout.
pub struct Upstream {
    targets: Vec<String>,
    next: AtomicU64,
    pub timeout: Duration,
}

impl Upstream {
    pub fn new(config: &crate::config::UpstreamConfig) -> Upstream {
        Upstream {
            targets: config
                .targets
                .iter()
                .map(|t| t.trim_end_matches('/').to_string())
                .collect(),
            next: AtomicU64::new(0),
            timeout: Duration::from_millis(config.timeout_ms),
        }
    }

    fn pick(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.targets.len();
        &self.targets[i]
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
}
