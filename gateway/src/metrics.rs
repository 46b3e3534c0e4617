//! Gateway metrics (`tollgate_gateway_*`), registered next to the code that updates them. Label
//! values are bounded: route ids come from the configuration (`none` when no route matched),
//! outcomes are a closed set.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub route: String,
    /// `1xx` ... `5xx`.
    pub class: &'static str,
}

/// The status classes, by `status / 100 - 1`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// One route's request counters (by outcome, in `Outcome::ALL` order; by status class),
/// and latency histogram.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    pub requests: [Counter; tollgate_schemas::Outcome::ALL.len()],
    pub responses: [Counter; CLASSES.len()],
    pub duration: Histogram,
    pub overhead: Histogram,
}

impl RouteMetrics {
    /// Counts a request that ended with `outcome` and `status` (a status outside 100–599,
    /// such as none at all, counts under no class) after `seconds`, of which `upstream`
    /// waiting for the upstream's answer (when it was forwarded).
    pub fn observe(
        &self,
        outcome: tollgate_schemas::Outcome,
        status: u16,
        seconds: f64,
        upstream: Option<f64>,
    ) {
        let i = tollgate_schemas::Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("every outcome is in ALL");
        self.requests[i].inc();
        if let Some(c) = usize::from(status / 100)
            .checked_sub(1)
            .and_then(|i| self.responses.get(i))
        {
            c.inc();
        }
        self.duration.observe(seconds);
        if let Some(up) = upstream {
            self.overhead.observe((seconds - up).max(0.0));
        }
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// 10 µs to 80 ms: the gateway's own share of a request.
fn overhead_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00001, 2.0, 14))
}

/// Every gateway metric.
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub responses: Family<ClassLabels, Counter>,
    pub duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Forwarded requests' time outside the wait for the upstream's answer head.
    pub overhead: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub events_published: Counter,
    pub events_dropped: Family<DropLabels, Counter>,
    /// Events the workers handed on that the publisher has not taken yet (the queue's own
    /// counter, bounded by `gateway.events.queue_capacity`).
    pub event_queue: Gauge,
    /// Seconds since the quota state was last refreshed (-1: never).
    pub quota_state_age: Gauge,
    /// JWKS fetches by result (`ok`, `error`).
    pub jwks_fetches: Family<ResultLabels, Counter>,
    /// Signing keys held from the JWKS (current and still-accepted retired ones).
    pub jwks_keys: Gauge,
    /// Configuration reloads by result (`ok`, `error`).
    pub config_reloads: Family<ResultLabels, Counter>,
    /// 1 while the configuration last offered was refused (the one before it still serves).
    pub config_reload_failed: Gauge,
    /// Client connections the gateway closed for misbehaving, by reason: `http2_resets` (rapid
    /// reset), `http2_protocol` (any other HTTP/2 violation or flood, answered with GOAWAY).
    pub abusive_connections: Family<DropLabels, Counter>,
}

impl GatewayMetrics {
    pub fn register(registry: &mut Registry) -> GatewayMetrics {
        let m = GatewayMetrics {
            requests: Family::default(),
            responses: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            overhead: Family::new_with_constructor(overhead_histogram),
            events_published: Counter::default(),
            events_dropped: Family::default(),
            event_queue: Gauge::default(),
            quota_state_age: Gauge::default(),
            jwks_fetches: Family::default(),
            jwks_keys: Gauge::default(),
            config_reloads: Family::default(),
            config_reload_failed: Gauge::default(),
            abusive_connections: Family::default(),
        };
        m.quota_state_age.set(-1);
        let r = registry.sub_registry_with_prefix("tollgate_gateway");
        r.register(
            "requests",
            "Requests by route and outcome",
            m.requests.clone(),
        );
        r.register(
            "responses",
            "Requests by route and status class of the answer",
            m.responses.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Total request latency, first byte in to last byte out",
            m.duration.clone(),
        );
        r.register(
            "overhead_seconds",
            "Forwarded requests' time outside the wait for the upstream's answer head: the gateway's own work, plus streaming the answer's body",
            m.overhead.clone(),
        );
        r.register(
            "events_published",
            "Request events published to the bus",
            m.events_published.clone(),
        );
        r.register(
            "events_dropped",
            "Request events dropped, by reason",
            m.events_dropped.clone(),
        );
        r.register(
            "event_queue_depth",
            "Events waiting between the worker threads and the bus publisher",
            m.event_queue.clone(),
        );
        r.register(
            "quota_state_age_seconds",
            "Age of the quota state in force (-1: never received)",
            m.quota_state_age.clone(),
        );
        r.register(
            "jwks_fetches",
            "JWKS fetches by result",
            m.jwks_fetches.clone(),
        );
        r.register(
            "jwks_keys",
            "Signing keys held from the JWKS",
            m.jwks_keys.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads by result",
            m.config_reloads.clone(),
        );
        r.register(
            "config_reload_failed",
            "1 while the last configuration offered was refused and the one before it serves",
            m.config_reload_failed.clone(),
        );
        r.register(
            "abusive_connections",
            "Client connections closed for misbehaving, by reason",
            m.abusive_connections.clone(),
        );
        m
    }

    /// The handles of one route's series (`route` is a route id, or `none`), created now so
    /// that a request updates them without building labels or looking them up.
    pub fn route(&self, route: &str) -> RouteMetrics {
        RouteMetrics {
            requests: tollgate_schemas::Outcome::ALL.map(|outcome| {
                self.requests
                    .get_or_create(&RequestLabels {
                        route: route.to_string(),
                        outcome: outcome.as_str(),
                    })
                    .clone()
            }),
            responses: CLASSES.map(|class| {
                self.responses
                    .get_or_create(&ClassLabels {
                        route: route.to_string(),
                        class,
                    })
                    .clone()
            }),
            duration: self
                .duration
                .get_or_create(&RouteLabels {
                    route: route.to_string(),
                })
                .clone(),
            overhead: self
                .overhead
                .get_or_create(&RouteLabels {
                    route: route.to_string(),
                })
                .clone(),
        }
    }

    pub fn unregistered() -> GatewayMetrics {
        GatewayMetrics::register(&mut Registry::default())
    }
}
