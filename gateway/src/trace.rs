//! W3C trace context and request spans, with the OpenTelemetry crates.
//!
//! A request's trace id goes into its event when it has one: the caller's (a well-formed
//! `traceparent`, read by the standard `TraceContextPropagator`), or the one the gateway
//! starts when it records spans. DESIGN.md: `trace_id` "when present".
//!
//! Without a tracer (`telemetry.otlp` absent) the gateway records no spans, but every request still
//! goes upstream with a trace context (DESIGN.md: the upstream receives `traceparent`): the
//! caller's `traceparent` and `tracestate` unchanged, or, for a caller that sent none well formed,
//! a trace the gateway starts as the request goes upstream ([`root`]; a request the gateway answers
//! itself propagates none and its event names none). That trace's id is the event id's 128 bits: a
//! UUIDv7 is a millisecond timestamp followed by 74 random bits, so its rightmost seven bytes are
//! random, which is what W3C Trace Context asks of a trace id that samplers read (level 2's
//! "random" rule; OpenTelemetry's ratio sampler reads those bytes). Nothing new is drawn per
//! request, and the trace id, the event id and `x-request-id` (unless the client sent its own) name
//! the same request: a trace found in the upstream's tracing backend leads to its event by id, and
//! back. The event's `trace_id` is that id in both cases.
//!
//! With a tracer, the request is a server span (`http.route`, `tollgate.consumer`, status and
//! outcome attributes) with child spans `auth`, `limits` and `upstream` (a client span, one per
//! attempt); the `traceparent` sent upstream names the `upstream` span as parent. The sampler
//! follows the caller's decision and samples new traces at `sample_ratio`. Spans of phases that
//! took no part (a request refused before its limits) are not made; a span that is not
//! recorded costs its ids and nothing else. Ended spans go to the exporter's batch queue
//! (bounded, dropped when full), never awaited on the request path.

use std::time::SystemTime;

use opentelemetry::Context;
use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceState, Tracer as _,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SamplingDecision, ShouldSample};

use crate::h1::{Fields, put_field};
use crate::recorder::{Draft, TraceId};

/// The tracer request spans are made with (an SDK tracer: sampling and export are its
/// provider's).
pub type Tracer = opentelemetry_sdk::trace::SdkTracer;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// A request's header fields, as the propagator reads them.
struct FieldsExtractor<'a>(&'a Fields);

impl Extractor for FieldsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        std::str::from_utf8(self.0.get(key)?).ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter_map(|(name, _)| std::str::from_utf8(name).ok())
            .collect()
    }
}

/// The caller's span context, when its `traceparent` is well formed.
pub fn extract(fields: &Fields) -> Option<Context> {
    if !fields.has(crate::h1::Known::TraceParent) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&FieldsExtractor(fields));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Writes `traceparent` (and `tracestate`, when there is one) naming `span` as the parent,
/// exactly as `TraceContextPropagator::inject_context` writes them (a test compares the two),
/// without the `Context` and the strings it allocates for every request.
///
/// The ids are written digit by digit: `write!` with the ids' `Display` was 2 % of a gateway
/// worker's samples, on every proxied request (BENCHMARKS.md).
pub fn inject(span: &SpanContext, out: &mut Vec<u8>) {
    out.extend_from_slice(TRACEPARENT.as_bytes());
    out.extend_from_slice(b": 00-");
    put_hex(out, &span.trace_id().to_bytes());
    out.push(b'-');
    put_hex(out, &span.span_id().to_bytes());
    out.push(b'-');
    put_hex(out, &[(span.trace_flags() & TraceFlags::SAMPLED).to_u8()]);
    out.extend_from_slice(b"\r\n");
    if span.trace_state() != &TraceState::NONE {
        let state = span.trace_state().header();
        if !state.is_empty() {
            put_field(out, TRACESTATE.as_bytes(), state.as_bytes());
        }
    }
}

/// `bytes` as lowercase hex digits.
fn put_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut digits = [0; 32];
    for chunk in bytes.chunks(16) {
        let digits = &mut digits[..2 * chunk.len()];
        hex::encode_to_slice(chunk, digits).expect("two digits a byte");
        out.extend_from_slice(digits);
    }
}

/// The trace a request starts when it came without one and the gateway records no spans (see
/// the module's docs): its trace id, the event id's bits, and the parent id the upstream
/// receives, derived from the same bits (both halves folded, so it is as random as their
/// random part) and so the same on a retry.
pub fn root(event_id: uuid::Uuid) -> (TraceId, u64) {
    let bits = event_id.as_u128();
    let parent = ((bits >> 64) as u64 ^ bits as u64).rotate_left(17) | 1;
    // A UUIDv7's version nibble is never zero, so neither are its bits.
    let trace = TraceId::from_u128(bits).expect("a UUIDv7 is not zero");
    (trace, parent)
}

/// Writes the `traceparent` of a trace [`root`] started: `trace` with `parent` as the parent
/// id, sampled (so the upstream may record it), and no `tracestate`.
pub fn put_root(trace: &TraceId, parent: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(TRACEPARENT.as_bytes());
    out.extend_from_slice(b": 00-");
    out.extend_from_slice(trace.as_bytes());
    out.push(b'-');
    put_hex(out, &parent.to_be_bytes());
    out.extend_from_slice(b"-01\r\n");
}

/// The trace id of a span context, as the event carries it.
pub fn trace_id(span: &SpanContext) -> Option<TraceId> {
    TraceId::from_u128(u128::from_be_bytes(span.trace_id().to_bytes()))
}

/// What request spans are made with: the SDK's tracer, and the sampler the gateway asks first,
/// so that a request that is not sampled costs no span object (the SDK's spans each hold a
/// clone of the tracer: an atomic count shared by every worker thread). The tracer's own
/// provider should sample everything it is asked to make (`Sampler::AlwaysOn`): the decision is
/// made here.
#[derive(Clone, Debug)]
pub struct Tracing {
    tracer: Tracer,
    sampler: Sampler,
}

impl Tracing {
    /// Spans made with `tracer`, following the caller's sampling decision and sampling new
    /// traces at `ratio`.
    pub fn new(tracer: Tracer, ratio: f64) -> Tracing {
        Tracing {
            tracer,
            sampler: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
        }
    }
}

/// A span context under `parent` for a span that is not recorded: a new span id, the parent's
/// trace, flags and state.
fn unrecorded_child(parent: &SpanContext) -> SpanContext {
    SpanContext::new(
        parent.trace_id(),
        opentelemetry::trace::SpanId::from(rand::random::<u64>() | 1),
        parent.trace_flags(),
        false,
        parent.trace_state().clone(),
    )
}

/// A request's spans while it is in flight.
pub struct RequestSpans<'t> {
    tracing: &'t Tracing,
    /// The request's span context: its server span's, or a stand-in when it is not recorded.
    context: SpanContext,
    /// The server span, as a context children are made in (recorded requests only).
    server: Option<Context>,
    /// The upstream span of the attempt in flight (recorded requests only).
    upstream: Option<Context>,
}

impl<'t> RequestSpans<'t> {
    /// Starts the request's spans at `start`, under the caller's span (`parent`) or as a new
    /// trace. Only a sampled request gets span objects.
    pub fn start(tracing: &'t Tracing, parent: Option<&Context>, start: SystemTime) -> Self {
        let trace_id = parent.map_or_else(
            || opentelemetry::trace::TraceId::from(rand::random::<u128>() | 1),
            |cx| cx.span().span_context().trace_id(),
        );
        let decision = tracing
            .sampler
            .should_sample(parent, trace_id, "request", &SpanKind::Server, &[], &[])
            .decision;
        if decision != SamplingDecision::RecordAndSample {
            let state = parent.map_or(TraceState::NONE, |cx| {
                cx.span().span_context().trace_state().clone()
            });
            let context = SpanContext::new(
                trace_id,
                opentelemetry::trace::SpanId::from(rand::random::<u64>() | 1),
                TraceFlags::NOT_SAMPLED,
                false,
                state,
            );
            return RequestSpans {
                tracing,
                context,
                server: None,
                upstream: None,
            };
        }
        let root = Context::new();
        let span = tracing
            .tracer
            .span_builder("request")
            .with_kind(SpanKind::Server)
            .with_start_time(start)
            .start_with_context(&tracing.tracer, parent.unwrap_or(&root));
        let server = Context::new().with_span(span);
        RequestSpans {
            tracing,
            context: server.span().span_context().clone(),
            server: Some(server),
            upstream: None,
        }
    }

    /// Whether the spans are recorded (sampled).
    pub fn recording(&self) -> bool {
        self.server.is_some()
    }

    /// The request's span context.
    pub fn server(&self) -> &SpanContext {
        &self.context
    }

    /// Records a phase that ran from `start` until now, as a child of the server span.
    pub fn phase(&self, name: &'static str, start: SystemTime) {
        let Some(server) = &self.server else { return };
        let tracer = &self.tracing.tracer;
        let mut span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .start_with_context(tracer, server);
        opentelemetry::trace::Span::end(&mut span);
    }

    /// Starts the span of one upstream attempt and returns its context, which the upstream
    /// request names as its parent. An attempt still open is ended first.
    pub fn start_upstream(&mut self, target: &[u8]) -> SpanContext {
        self.end_upstream(None);
        let Some(server) = &self.server else {
            return unrecorded_child(&self.context);
        };
        let tracer = &self.tracing.tracer;
        let address = String::from_utf8_lossy(target).into_owned();
        let span = tracer
            .span_builder("upstream")
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("server.address", address)])
            .start_with_context(tracer, server);
        let cx = server.with_span(span);
        let sc = cx.span().span_context().clone();
        self.upstream = Some(cx);
        sc
    }

    /// Ends the upstream attempt in flight, with the status it answered (`None`: no answer).
    pub fn end_upstream(&mut self, status: Option<u16>) {
        if let Some(cx) = self.upstream.take() {
            let span = cx.span();
            match status {
                Some(s) => {
                    span.set_attribute(KeyValue::new("http.response.status_code", i64::from(s)));
                    if s >= 500 {
                        span.set_status(Status::error(""));
                    }
                }
                None => span.set_status(Status::error("no answer")),
            }
            span.end();
        }
    }

    /// Ends the request's spans with what the request came to (`route`: the matched route's
    /// id).
    pub fn finish(mut self, route: Option<&str>, draft: &Draft) {
        self.end_upstream(None);
        let Some(server) = &self.server else { return };
        let span = server.span();
        let method = draft.method.as_str();
        let mut attributes = vec![
            KeyValue::new("http.request.method", method.to_string()),
            KeyValue::new("url.path", draft.uri.path().to_string()),
            KeyValue::new("http.response.status_code", i64::from(draft.status)),
            KeyValue::new("tollgate.outcome", draft.outcome.as_str()),
        ];
        match route {
            Some(route) => {
                attributes.push(KeyValue::new("http.route", route.to_string()));
                span.update_name(format!("{method} {route}"));
            }
            None => span.update_name(method.to_string()),
        }
        if let Some(id) = &draft.identity {
            attributes.push(KeyValue::new(
                "tollgate.consumer",
                id.consumer().to_string(),
            ));
        }
        span.set_attributes(attributes);
        if draft.status >= 500 {
            span.set_status(Status::error(draft.outcome.as_str()));
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

    use super::*;
    use crate::h1::{self, Parsed};

    fn fields(text: &str) -> Fields {
        let mut buf =
            bytes::BytesMut::from(format!("GET / HTTP/1.1\r\nHost: a\r\n{text}\r\n").as_bytes());
        match h1::parse_request(&mut buf).unwrap() {
            Parsed::Head(h) => h.fields,
            Parsed::Partial => panic!("partial"),
        }
    }

    fn trace_of(text: &str) -> Option<String> {
        let cx = extract(&fields(text))?;
        Some(trace_id(cx.span().span_context())?.as_str().to_string())
    }

    #[test]
    fn a_traceparent_is_continued_only_when_well_formed() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(
            trace_of(&format!("traceparent: {good}\r\n")).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(trace_of(""), None);
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-ff",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        ] {
            assert_eq!(trace_of(&format!("traceparent: {bad}\r\n")), None, "{bad}");
        }
    }

    /// A new trace's root: random ids, sampled.
    fn new_root() -> SpanContext {
        SpanContext::new(
            opentelemetry::trace::TraceId::from(rand::random::<u128>() | 1),
            opentelemetry::trace::SpanId::from(rand::random::<u64>() | 1),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    }

    #[test]
    fn a_new_root_is_written_as_a_sampled_traceparent_without_tracestate() {
        let root = new_root();
        let mut out = Vec::new();
        inject(&root, &mut out);
        let text = String::from_utf8(out).unwrap();
        let expected = format!(
            "traceparent: 00-{}-{}-01\r\n",
            root.trace_id(),
            root.span_id()
        );
        assert_eq!(text, expected);
        assert_eq!(
            trace_of(&text).as_deref(),
            trace_id(&root).as_ref().map(TraceId::as_str)
        );
    }

    #[test]
    fn a_root_started_from_an_event_id_is_a_valid_sampled_trace_named_by_that_id() {
        for _ in 0..100 {
            let id = uuid::Uuid::now_v7();
            let (trace, parent) = root(id);
            assert_eq!(
                trace.as_str(),
                id.simple().to_string(),
                "the trace id is the event id"
            );
            assert_eq!(root(id), (trace, parent), "the same on a retry");
            let mut out = Vec::new();
            put_root(&trace, parent, &mut out);
            let span = SpanContext::new(
                opentelemetry::trace::TraceId::from(id.as_u128()),
                opentelemetry::trace::SpanId::from(parent),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            );
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text, propagator_writes(&span));
            assert_eq!(
                trace_of(&text).as_deref(),
                Some(trace.as_str()),
                "well formed"
            );
        }
    }

    /// The propagator's own output, as `name: value` lines.
    fn propagator_writes(span: &SpanContext) -> String {
        let mut fields = std::collections::HashMap::<String, String>::new();
        let cx = Context::new().with_remote_span_context(span.clone());
        TraceContextPropagator::new().inject_context(&cx, &mut fields);
        ["traceparent", "tracestate"]
            .iter()
            .filter_map(|k| {
                fields
                    .get(*k)
                    .filter(|v| !v.is_empty())
                    .map(|v| format!("{k}: {v}\r\n"))
            })
            .collect()
    }

    #[test]
    fn inject_writes_what_the_propagator_writes() {
        let with_state = SpanContext::new(
            opentelemetry::trace::TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128),
            opentelemetry::trace::SpanId::from(0x00f067aa0ba902b7_u64),
            TraceFlags::NOT_SAMPLED,
            true,
            "vendor=1,other=x".parse().unwrap(),
        );
        for span in [new_root(), with_state] {
            let mut out = Vec::new();
            inject(&span, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), propagator_writes(&span));
        }
    }

    /// Keeps what it is given.
    #[derive(Debug, Clone, Default)]
    struct Kept(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Kept {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    fn tracing(ratio: f64) -> (Tracing, Kept) {
        let kept = Kept::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(kept.clone())
            .with_sampler(Sampler::AlwaysOn)
            .build();
        (Tracing::new(provider.tracer("test"), ratio), kept)
    }

    fn draft() -> Draft {
        Draft {
            id: uuid::Uuid::now_v7(),
            ts: chrono::Utc::now(),
            method: http::Method::GET,
            uri: "/orders/1".parse().unwrap(),
            identity: None,
            trace_id: None,
            status: 502,
            upstream_latency_us: None,
            outcome: tollgate_schemas::Outcome::UpstreamError,
            billable: false,
        }
    }

    #[test]
    fn phases_and_upstream_attempts_are_children_of_the_server_span_under_the_caller() {
        let (tracing, kept) = tracing(0.0);
        let caller = extract(&fields(
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\ntracestate: vendor=1\r\n",
        ))
        .unwrap();
        let mut spans = RequestSpans::start(&tracing, Some(&caller), SystemTime::now());
        assert!(
            spans.recording(),
            "a sampled caller is followed whatever the ratio"
        );
        let server = spans.server().clone();
        spans.phase("auth", SystemTime::now());
        let first = spans.start_upstream(b"127.0.0.1:1");
        let second = spans.start_upstream(b"127.0.0.1:2");
        spans.end_upstream(Some(502));
        let mut out = Vec::new();
        inject(&second, &mut out);
        spans.finish(Some("orders"), &draft());

        let kept = kept.0.lock().unwrap();
        let by_name = |n: &str| kept.iter().filter(|s| s.name == n).collect::<Vec<_>>();
        assert_eq!(kept.len(), 4, "{kept:?}");
        let root = by_name("GET orders");
        assert_eq!(root.len(), 1);
        assert_eq!(root[0].parent_span_id.to_string(), "b7ad6b7169203331");
        assert_eq!(root[0].span_context, server);
        assert_eq!(root[0].status, Status::error("upstream_error"));
        for s in by_name("auth").into_iter().chain(by_name("upstream")) {
            assert_eq!(s.parent_span_id, server.span_id());
            assert_eq!(s.span_context.trace_id(), server.trace_id());
        }
        let attempts: Vec<_> = by_name("upstream")
            .iter()
            .map(|s| s.span_context.span_id())
            .collect();
        assert_eq!(attempts, vec![first.span_id(), second.span_id()]);
        // The upstream sees the second attempt's span as its parent, and the caller's state.
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "traceparent: 00-0af7651916cd43dd8448eb211c80319c-{}-01\r\ntracestate: vendor=1\r\n",
                second.span_id()
            )
        );
    }

    #[test]
    fn unsampled_requests_record_nothing_but_still_carry_a_trace() {
        let (tracing, kept) = tracing(0.0);
        let mut spans = RequestSpans::start(&tracing, None, SystemTime::now());
        assert!(!spans.recording());
        let upstream = spans.start_upstream(b"127.0.0.1:1");
        assert!(upstream.is_valid());
        assert!(!upstream.is_sampled());
        assert_eq!(upstream.trace_id(), spans.server().trace_id());
        spans.finish(None, &draft());
        assert!(kept.0.lock().unwrap().is_empty());
    }

    #[test]
    fn new_traces_are_sampled_at_the_ratio_and_a_callers_no_is_followed() {
        let (tracing, kept) = tracing(1.0);
        let spans = RequestSpans::start(&tracing, None, SystemTime::now());
        assert!(spans.recording() && spans.server().is_sampled());
        spans.finish(Some("orders"), &draft());
        let root = kept.0.lock().unwrap().pop().unwrap();
        assert_eq!(root.name, "GET orders");
        assert_eq!(root.parent_span_id, opentelemetry::trace::SpanId::INVALID);
        let caller = extract(&fields(
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00\r\n",
        ))
        .unwrap();
        let spans = RequestSpans::start(&tracing, Some(&caller), SystemTime::now());
        assert!(!spans.recording(), "the caller did not sample this trace");
        assert_eq!(
            spans.server().trace_id(),
            caller.span().span_context().trace_id()
        );
    }
}
