//! What a finished request needs to be recorded, and nothing more: its route's metric handles
//! and its worker's event buffer. Response bodies hold one of these (per worker thread), not the
//! gateway's whole state.
//!
//! While a request is in flight its event is a [`Draft`]: the parts only the request knows,
//! held without copying strings (the consumer's and plan's shared names, the request's own
//! URI bytes, the trace id inline). When the response ends, the recorder adds what it knows
//! (the gateway's id, the route's id) and encodes the event once, on the worker's thread, into
//! the worker's batch buffer. So an event costs no allocation of its own, and nothing is freed
//! on another thread than the one that allocated it.

use std::time::Duration;

use tollgate_schemas::event::is_lower_hex;
use tollgate_schemas::{Outcome, RequestEventRef};

use crate::auth::Identity;
use crate::events::LocalSink;
use crate::metrics::{GatewayMetrics, RouteMetrics};
use crate::trace::{RequestSpans, Tracing};

/// A W3C trace id: 32 lowercase hex digits, held inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceId([u8; 32]);

impl TraceId {
    /// `s` if it is 32 lowercase hex digits, not all zero.
    pub fn parse(s: &str) -> Option<TraceId> {
        let bytes: [u8; 32] = s.as_bytes().try_into().ok()?;
        (is_lower_hex(s, 32) && bytes.iter().any(|b| *b != b'0')).then_some(TraceId(bytes))
    }

    /// The id `v` as 32 lowercase hex digits (`None` for zero, which W3C forbids).
    pub fn from_u128(v: u128) -> Option<TraceId> {
        if v == 0 {
            return None;
        }
        let mut out = [0; 32];
        hex::encode_to_slice(v.to_be_bytes(), &mut out).expect("two digits a byte");
        Some(TraceId(out))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }

    /// The digits as bytes, for a header (no check that they are text).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// A request's event as the request path knows it, until its response ends.
#[derive(Debug, Clone)]
pub struct Draft {
    pub id: uuid::Uuid,
    pub ts: chrono::DateTime<chrono::Utc>,
    pub method: http::Method,
    /// The request's URI as received (shares the request's bytes); its path is the event's.
    pub uri: http::Uri,
    pub identity: Option<Identity>,
    pub trace_id: Option<TraceId>,
    pub status: u16,
    pub upstream_latency_us: Option<u64>,
    pub outcome: Outcome,
    pub billable: bool,
}

/// What the response body measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub elapsed: Duration,
    pub req_bytes: u64,
    pub resp_bytes: u64,
}

pub struct Recorder {
    gateway: String,
    /// By route position in the configuration.
    route_ids: Vec<String>,
    /// By route position; the last one is for requests no route matched.
    routes: Vec<RouteMetrics>,
    events: LocalSink,
    /// Makes the requests' spans (`telemetry.otlp`).
    tracer: Option<Tracing>,
}

impl Recorder {
    /// A recorder for gateway `gateway` with routes `route_ids` (in configuration order).
    pub fn new<'a>(
        gateway: &str,
        metrics: &GatewayMetrics,
        route_ids: impl Iterator<Item = &'a str>,
        events: LocalSink,
        tracer: Option<Tracing>,
    ) -> Recorder {
        let route_ids: Vec<String> = route_ids.map(str::to_string).collect();
        let mut routes: Vec<RouteMetrics> = route_ids.iter().map(|id| metrics.route(id)).collect();
        routes.push(metrics.route("none"));
        Recorder {
            gateway: gateway.to_string(),
            route_ids,
            routes,
            events,
            tracer,
        }
    }

    /// The tracer requests make their spans with, when spans are exported.
    pub fn tracer(&self) -> Option<&Tracing> {
        self.tracer.as_ref()
    }

    /// Counts a finished request under its route (`None`: no route matched), ends its spans
    /// and emits its event.
    pub fn record(
        &self,
        route: Option<usize>,
        draft: &Draft,
        m: Measured,
        spans: Option<RequestSpans<'_>>,
    ) {
        let route_id = route
            .and_then(|i| self.route_ids.get(i))
            .map(String::as_str);
        if let Some(spans) = spans {
            spans.finish(route_id, draft);
        }
        let none = self.routes.len() - 1;
        let metrics = &self.routes[route.unwrap_or(none).min(none)];
        metrics.observe(
            draft.outcome,
            draft.status,
            m.elapsed.as_secs_f64(),
            draft.upstream_latency_us.map(|us| us as f64 / 1e6),
        );
        self.events.emit(&RequestEventRef {
            v: 1,
            id: draft.id,
            ts: draft.ts,
            gateway: &self.gateway,
            route: route_id,
            method: draft.method.as_str(),
            path: draft.uri.path(),
            status: draft.status,
            latency_us: m.elapsed.as_micros() as u64,
            upstream_latency_us: draft.upstream_latency_us,
            req_bytes: m.req_bytes,
            resp_bytes: m.resp_bytes,
            consumer: draft.identity.as_ref().map(|i| i.consumer()),
            plan: draft.identity.as_ref().map(|i| &*i.plan),
            outcome: draft.outcome,
            billable: draft.billable,
            trace_id: draft.trace_id.as_ref().map(TraceId::as_str),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_are_32_lowercase_hex_digits_not_all_zero() {
        let id = "0af7651916cd43dd8448eb211c80319c";
        assert_eq!(TraceId::parse(id).unwrap().as_str(), id);
        assert!(TraceId::parse(&"0".repeat(32)).is_none());
        assert!(TraceId::parse(&id.to_uppercase()).is_none());
        assert!(TraceId::parse(&id[1..]).is_none());
        assert!(TraceId::parse(&format!("{id}0")).is_none());
        assert_eq!(
            TraceId::from_u128(0x0af7651916cd43dd8448eb211c80319c).unwrap(),
            TraceId::parse(id).unwrap()
        );
        assert_eq!(
            TraceId::from_u128(1).unwrap().as_str(),
            format!("{:032x}", 1)
        );
        assert!(TraceId::from_u128(0).is_none());
    }
}
