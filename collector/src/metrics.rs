//! Collector metrics, registered next to the code that updates them.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// `append` or `flush`.
    pub op: &'static str,
}

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
    /// Events dropped because the collector had consumed the same event id within its window
    /// (`collector.dedup_window_events`): a record the bus holds twice.
    pub duplicates: Counter,
    /// Partition assignment changes (rebalances).
    pub rebalances: Counter,
    pub append_seconds: Histogram,
    pub flush_seconds: Histogram,
    /// Events per appended batch.
    pub batch_events: Histogram,
    /// Store operations that failed, by operation.
    pub store_errors: Family<OpLabels, Counter>,
    /// Records of each owned partition not yet stored: the bus's end offset less what the
    /// store holds durably, read at every flush interval.
    pub lag: Family<PartitionLabels, Gauge>,
    /// The time of the newest event appended (Unix seconds): now less this is how stale the
    /// store is.
    pub newest_event: Gauge<f64, AtomicU64>,
    /// When a poll of the bus last came back with less than it asked for, that is, when the
    /// collector last reached the end of what the bus held (Unix seconds). A collector that is
    /// behind, or not running, leaves it in the past: `tollgate up` reads it to decide whether
    /// the collector may keep to idle cores (`sched::CatchUp`).
    pub caught_up: Gauge<f64, AtomicU64>,
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
            duplicates: Counter::default(),
            rebalances: Counter::default(),
            append_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            flush_seconds: Histogram::new(exponential_buckets(0.001, 4.0, 10)),
            batch_events: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            store_errors: Family::default(),
            lag: Family::default(),
            newest_event: Gauge::default(),
            caught_up: Gauge::default(),
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
            "duplicates",
            "Events dropped because their id was consumed within the deduplication window (a record the bus holds twice)",
            m.duplicates.clone(),
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
        r.register(
            "batch_events",
            "Events per batch appended to the store",
            m.batch_events.clone(),
        );
        r.register(
            "store_errors",
            "Store operations that failed, by operation (the collector then restarts)",
            m.store_errors.clone(),
        );
        r.register(
            "lag_events",
            "Records of each owned partition on the bus and not yet stored durably",
            m.lag.clone(),
        );
        r.register(
            "newest_event_timestamp_seconds",
            "Time of the newest event appended to the store (Unix seconds)",
            m.newest_event.clone(),
        );
        r.register(
            "caught_up_timestamp_seconds",
            "When the collector last reached the end of what the bus held (Unix seconds)",
            m.caught_up.clone(),
        );
        m
    }

    /// Metrics that are not exported anywhere (tests, tools).
    pub fn unregistered() -> CollectorMetrics {
        CollectorMetrics::register(&mut Registry::default())
    }
}
