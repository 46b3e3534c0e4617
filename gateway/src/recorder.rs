//! What a finished request needs to be recorded, and nothing more: its route's metric handles
//! and its worker's event buffer. Response bodies hold one of these (per worker thread), not the
//! gateway's whole state.

use std::time::Duration;

use tollgate_schemas::RequestEvent;

use crate::events::LocalSink;
use crate::metrics::{GatewayMetrics, RouteMetrics};

pub struct Recorder {
    /// By route position in the configuration; the last one is for requests no route matched.
    routes: Vec<RouteMetrics>,
    events: LocalSink,
}

impl Recorder {
    /// A recorder for routes `route_ids` (in configuration order).
    pub fn new<'a>(
        metrics: &GatewayMetrics,
        route_ids: impl Iterator<Item = &'a str>,
        events: LocalSink,
    ) -> Recorder {
        let mut routes: Vec<RouteMetrics> = route_ids.map(|id| metrics.route(id)).collect();
        routes.push(metrics.route("none"));
        Recorder { routes, events }
    }

    /// Counts a finished request under its route (`None`: no route matched) and emits its event.
    pub fn record(&self, route: Option<usize>, event: RequestEvent, elapsed: Duration) {
        let none = self.routes.len() - 1;
        let metrics = &self.routes[route.unwrap_or(none).min(none)];
        metrics.observe(event.outcome, elapsed.as_secs_f64());
        self.events.emit(event);
    }
}
