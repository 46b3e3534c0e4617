//! The Kafka bus (rdkafka, librdkafka built from source), for the scaled deployment: gateways
//! publish with an idempotent, batching, compressing producer; collectors read in a consumer
//! group whose partitions move between members on every rebalance.
//!
//! - Records are keyed as DESIGN.md says (consumer id, or route id when anonymous), so one
//!   consumer's events stay in order within one partition.
//! - The topic is created when missing (`partitions`, `replication_factor`); its dead-letter
//!   companion `<topic>.dead-letter` too.
//! - Every librdkafka property can be set under `bus.properties` (TLS, SASL, tuning); they are
//!   applied last, so they override the defaults chosen here.
//! - The consumer commits only what the collector says the store holds (`enable.auto.commit` is
//!   off). Assignment changes are reported through `Subscriber::take_changes`, in order with the
//!   records, so the collector can resume each partition where the store's data ends.
//!
//! - The producer writes each record once in its normal paths: it is idempotent (librdkafka's
//!   retries carry sequence numbers the broker deduplicates) and gives records no delivery
//!   timeout, so through an outage they wait rather than fail and get queued again. Three rare
//!   paths can write a record twice: a `message.timeout.ms` set in `properties` (a record that
//!   timed out in flight may have been written anyway), a producer replaced after the broker
//!   fenced it (its in-flight records are purged and queued on the new one), and a gateway that
//!   stops or crashes during an outage or while its disk spool replays (`crate::spool`, at
//!   least once). The collector, exactly once per bus position, also drops an event whose id is
//!   among the last `collector.dedup_window_events` of its partition (a million by default on
//!   this bus, seeded from the store on every assignment; `tollgate-collector`'s `recent.rs`
//!   says what that window does not catch).
//!
//! The configuration is always compiled (so `check-config` and the error that names the missing
//! feature work in every build); the client code needs the `kafka` cargo feature.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[cfg(feature = "kafka")]
mod client;
#[cfg(feature = "kafka")]
mod logs;
#[cfg(feature = "kafka")]
mod producer;

/// The `bus:` section for `kind: kafka`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// The events topic.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Partitions of the topic when Tollgate creates it (an existing topic is left as it is).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of the topic when Tollgate creates it.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Create the topics when missing (off where topics are managed by other means).
    #[serde(default = "default_true")]
    pub create_topics: bool,
    /// Producer compression: `lz4` (default), `zstd`, `snappy`, `gzip` or `none`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// How long the producer waits to fill a batch (milliseconds).
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u32,
    /// librdkafka properties passed through as they are (e.g. `security.protocol: SASL_SSL`,
    /// `sasl.mechanism`, `sasl.username`, `ssl.ca.location`), applied after Tollgate's own.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_topic() -> String {
    "tollgate.events".into()
}
fn default_partitions() -> i32 {
    12
}
fn default_replication() -> i32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_compression() -> String {
    "lz4".into()
}
fn default_linger_ms() -> u32 {
    5
}

impl KafkaConfig {
    /// Checks the section without I/O; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("bus.brokers: must name at least one broker (host:port)".into());
        }
        if self.topic.is_empty()
            || !self
                .topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(format!(
                "bus.topic: `{}` is not a Kafka topic name (letters, digits, `.`, `_`, `-`)",
                self.topic
            ));
        }
        if self.partitions < 1 {
            return Err("bus.partitions: must be at least 1".into());
        }
        if self.replication_factor < 1 {
            return Err("bus.replication_factor: must be at least 1".into());
        }
        if !["lz4", "zstd", "snappy", "gzip", "none"].contains(&self.compression.as_str()) {
            return Err(format!(
                "bus.compression: `{}` is not one of lz4, zstd, snappy, gzip, none",
                self.compression
            ));
        }
        for key in self.properties.keys() {
            if ["enable.auto.commit", "group.id", "enable.idempotence"].contains(&key.as_str()) {
                return Err(format!(
                    "bus.properties.{key}: set by Tollgate for exactly-once delivery; it cannot be overridden"
                ));
            }
        }
        Ok(())
    }

    /// The dead-letter topic: events that fail validation, with the reason.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dead-letter", self.topic)
    }
}

/// Connects to the cluster, creating the topics when missing.
#[cfg(feature = "kafka")]
pub(crate) async fn open(
    config: &KafkaConfig,
) -> Result<std::sync::Arc<dyn crate::Bus>, crate::BusError> {
    Ok(std::sync::Arc::new(
        client::KafkaBus::connect(config.clone()).await?,
    ))
}

#[cfg(not(feature = "kafka"))]
pub(crate) async fn open(
    _config: &KafkaConfig,
) -> Result<std::sync::Arc<dyn crate::Bus>, crate::BusError> {
    Err(crate::BusError::NotBuilt {
        kind: "kafka",
        feature: "kafka",
    })
}
