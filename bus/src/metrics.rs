//! Bus metrics, read from the bus's own counters at scrape time (a Prometheus collector):
//! the gateway's disk spool and the Kafka producer's deliveries.

use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::spool::SpoolStats;

/// Counters of a publisher that delivers in the background.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Records the bus confirmed.
    pub delivered: std::sync::atomic::AtomicU64,
    /// Records whose delivery failed and that were queued again.
    pub requeued: std::sync::atomic::AtomicU64,
    /// Records accepted and not yet confirmed.
    pub backlog: std::sync::atomic::AtomicU64,
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (result, v) in values {
        let labels = [("result", *result)];
        ConstCounter::new(*v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for SpoolStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            &mut encoder,
            "tollgate_gateway_spool_bytes",
            "Bytes of the disk spool (events waiting for an unreachable bus)",
            get(&self.disk_bytes) as i64,
        )?;
        counter(
            &mut encoder,
            "tollgate_gateway_spool_events",
            "Events through the disk spool: spooled, replayed to the bus, dropped because it was full",
            &[
                ("spooled", get(&self.spooled)),
                ("replayed", get(&self.replayed)),
                ("dropped", get(&self.dropped)),
            ],
        )
    }
}

impl Collector for DeliveryStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            &mut encoder,
            "tollgate_bus_backlog_events",
            "Events handed to the bus client and not yet confirmed by the brokers",
            get(&self.backlog) as i64,
        )?;
        counter(
            &mut encoder,
            "tollgate_bus_deliveries",
            "Event deliveries to the brokers: delivered, or failed and queued again",
            &[
                ("delivered", get(&self.delivered)),
                ("requeued", get(&self.requeued)),
            ],
        )
    }
}
