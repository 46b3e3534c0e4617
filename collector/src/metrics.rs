//! Collector metrics, registered next to the code that updates them.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Counters and timings of one collector.
#[derive(Clone, Debug)]
pub struct CollectorMetrics {
    pub consumed: Counter,
    pub appended: Counter,
    pub batches: Counter,
    pub dead_lettered: Counter,
    /// Restarts after a failure (by whoever supervises the collector).
    pub restarts: Counter,
    /// Records skipped because the store already held them (after a crash or a rebalance).
    pub already_stored: Counter,
    /// Partition assignment changes (rebalances).
    pub rebalances: Counter,
    pub append_seconds: Histogram,
    pub flush_seconds: Histogram,
}

impl CollectorMetrics {
    /// Creates the metrics and registers them under `tollgate_collector_*`.
    pub fn register(registry: &mut Registry) -> CollectorMetrics {
        let m = CollectorMetrics {
            consumed: Counter::default(),
            appended: Counter::default(),
            batches: Counter::default(),
            dead_lettered: Counter::default(),
            restarts: Counter::default(),
            already_stored: Counter::default(),
            rebalances: Counter::default(),
            append_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            flush_seconds: Histogram::new(exponential_buckets(0.001, 4.0, 10)),
        };
        let r = registry.sub_registry_with_prefix("tollgate_collector");
        r.register(
            "messages_consumed",
            "Bus messages consumed",
            m.consumed.clone(),
        );
        r.register(
            "restarts",
            "Collector restarts after a failure",
            m.restarts.clone(),
        );
        r.register(
            "events_appended",
            "Valid events appended to the store",
            m.appended.clone(),
        );
        r.register(
            "batches",
            "Batches appended to the store",
            m.batches.clone(),
        );
        r.register(
            "dead_letter_events",
            "Invalid messages sent to the dead-letter sink",
            m.dead_lettered.clone(),
        );
        r.register(
            "already_stored",
            "Bus messages skipped because the store already held them (after a crash or rebalance)",
            m.already_stored.clone(),
        );
        r.register(
            "assignment_changes",
            "Partition assignment changes seen (consumer-group rebalances)",
            m.rebalances.clone(),
        );
        r.register(
            "append_seconds",
            "Time to append one batch to the store",
            m.append_seconds.clone(),
        );
        r.register(
            "flush_seconds",
            "Time to make the store durable and commit offsets",
            m.flush_seconds.clone(),
        );
        m
    }

    /// Metrics that are not exported anywhere (tests, tools).
    pub fn unregistered() -> CollectorMetrics {
        CollectorMetrics::register(&mut Registry::default())
    }
}
