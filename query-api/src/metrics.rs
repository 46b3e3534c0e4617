//! Query API metrics (`tollgate_query_api_*`): requests by endpoint and status, and their
//! latency. Endpoint labels are the matched route templates, a bounded set. Plus
//! `tollgate_billing_complete_through_seconds`: how far the stored events are complete (the
//! billing watermark, read from the store at each scrape).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointOnly {
    pub endpoint: String,
}

fn histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Query API metrics.
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    pub requests: Family<EndpointLabels, Counter>,
    pub duration: Family<EndpointOnly, Histogram, fn() -> Histogram>,
    /// Unix seconds through which every event is stored, less the allowed event delay (0 until
    /// a collector reports): billing periods ending before it are complete.
    pub complete_through: Gauge,
}

impl ApiMetrics {
    pub fn register(registry: &mut Registry) -> ApiMetrics {
        let m = ApiMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
            complete_through: Gauge::default(),
        };
        registry.register(
            "tollgate_billing_complete_through_seconds",
            "Unix time through which the store holds every event, less the allowed event delay; billing periods ending before it are complete",
            m.complete_through.clone(),
        );
        let r = registry.sub_registry_with_prefix("tollgate_query_api");
        r.register(
            "requests",
            "API requests by endpoint and status",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "API request latency by endpoint",
            m.duration.clone(),
        );
        m
    }
}

/// Counts and times every request.
pub async fn track(State(m): State<Arc<ApiMetrics>>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let resp = next.run(req).await;
    m.requests
        .get_or_create(&EndpointLabels {
            endpoint: endpoint.clone(),
            status: resp.status().as_u16(),
        })
        .inc();
    m.duration
        .get_or_create(&EndpointOnly { endpoint })
        .observe(started.elapsed().as_secs_f64());
    resp
}
