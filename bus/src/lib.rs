//! The event bus between gateways and collectors: `Publisher` and `Subscriber` traits with an
//! explicit commit of consumed offsets, and the embedded backend (a durable append-only log on
//! local disk). The Kafka backend plugs in behind the same traits.
//!
//! Delivery contract: a subscriber sees every published record at least once, in order per
//! partition; what it has *committed* is never redelivered to its group after a restart. The
//! collector makes the pipeline exactly-once on top of this by storing its own checkpoint with the
//! data (see the `tollgate-collector` docs).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub mod embedded;
pub mod kafka;
pub mod metrics;
pub mod spool;

pub use embedded::{EmbeddedConfig, EmbeddedLog};
pub use kafka::KafkaConfig;

/// One record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Partitioning key (consumer id, or route id when anonymous).
    pub key: Bytes,
    /// One encoded `RequestEvent`.
    pub payload: Bytes,
}

/// One consumed record and where it sits in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub partition: u32,
    pub offset: u64,
    pub key: Bytes,
    pub payload: Bytes,
}

pub use tollgate_schemas::Checkpoint;

/// Bus errors; `retryable` tells a transient condition from a fatal one.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bus is closed")]
    Closed,
    #[error("bus configuration: {0}")]
    Config(String),
    /// The backend is compiled out of this build.
    #[error("bus.kind: `{kind}` is not in this build; rebuild with `--features {feature}`")]
    NotBuilt {
        kind: &'static str,
        feature: &'static str,
    },
    /// A broker-side failure (Kafka).
    #[error("bus broker error: {message}")]
    Broker { message: String, retryable: bool },
}

impl BusError {
    /// Whether trying again later may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            BusError::Io { .. } => true,
            BusError::Broker { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// Appends records to the bus. Implementations are cheap to share (`Arc<dyn Publisher>`).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Appends the records in order: durably on return (embedded), or queued for delivery in
    /// the background, which `flush` waits for (Kafka).
    async fn publish(&self, records: Vec<Record>) -> Result<(), BusError>;
    /// Waits until everything published is delivered (backends that deliver in the background).
    async fn flush(&self, _timeout: Duration) -> Result<(), BusError> {
        Ok(())
    }
    /// Records accepted and not yet delivered (0 for backends that deliver before returning).
    fn backlog(&self) -> u64 {
        0
    }
    /// Takes back every record accepted and not yet delivered, waiting at most `timeout` for
    /// them, so that they can be kept elsewhere (the gateway's disk spool, when it stops while
    /// the bus is away): the backend delivers none of them after. At least once: a record that
    /// was in flight may have been written all the same. Backends that deliver before
    /// returning have nothing to give back.
    async fn take_undelivered(&self, _timeout: Duration) -> Vec<Record> {
        Vec::new()
    }
}

/// A change of the partitions a subscriber reads (a consumer-group rebalance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentChange {
    /// These partitions are now read by this subscriber, each starting at the group's committed
    /// offset (0 when the group has none).
    Assigned(Vec<(u32, u64)>),
    /// These partitions went to another member; records of them not yet stored must be dropped
    /// (the new owner reads them again from the last commit).
    Revoked(Vec<u32>),
}

/// Reads records for one consumer group and commits what has been processed.
///
/// Partition ownership can move (Kafka consumer-group rebalances). Every change is reported by
/// `take_changes`, and every record returned by a `poll` precedes the changes reported by the
/// next `take_changes`: a caller that drains the changes before each `poll` sees records and
/// changes in the order they happened.
#[async_trait]
pub trait Subscriber: Send {
    /// Up to `max` records after the current positions, waiting at most `wait` for the first.
    /// Returns early (maybe with no records) when the assignment changes.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Message>, BusError>;
    /// Assignment changes since the last call, oldest first.
    fn take_changes(&mut self) -> Vec<AssignmentChange>;
    /// Records durably that everything before `checkpoint` is processed. Partitions this
    /// subscriber does not own (any more) are ignored.
    async fn commit(&mut self, checkpoint: &Checkpoint) -> Result<(), BusError>;
    /// The last committed checkpoint of this group, for the partitions it knows of.
    fn committed(&self) -> Checkpoint;
    /// Moves the read position of `partition` to `offset`.
    async fn seek(&mut self, partition: u32, offset: u64) -> Result<(), BusError>;
    /// The end of each partition this subscriber owns (the offset the next record written to
    /// it will get), and how many partitions the topic has.
    async fn end_offsets(&mut self) -> Result<(Checkpoint, u32), BusError>;
    /// Whether one published record may be held at two positions (a producer's rare paths,
    /// as on Kafka); the collector then drops an event whose id it has just consumed. False:
    /// every publish lands once or not at all.
    fn may_repeat_records(&self) -> bool {
        false
    }
}

/// A bus opened from its configuration: what gateways publish to and collectors subscribe to.
#[async_trait]
pub trait Bus: Send + Sync {
    /// A publisher (shared by all of a gateway's tasks).
    fn publisher(&self) -> Result<std::sync::Arc<dyn Publisher>, BusError>;
    /// A subscriber in consumer group `group`.
    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscriber>, BusError>;
    /// Where invalid events go, when the bus has a place for them (Kafka: the dead-letter
    /// topic); `None`: the collector keeps them in a local file.
    fn dead_letters(&self) -> Result<Option<std::sync::Arc<dyn Publisher>>, BusError> {
        Ok(None)
    }
    /// True when the bus is reachable (for `/readyz`).
    async fn ready(&self) -> bool;
    /// Delivery counters of this bus's publisher, for `/metrics` (backends that deliver in the
    /// background).
    fn delivery_stats(&self) -> Option<std::sync::Arc<metrics::DeliveryStats>> {
        None
    }
}

/// Which bus backend to use: the `bus:` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BusConfig {
    /// Durable log on local disk (one process).
    Embedded(EmbeddedConfig),
    /// A Kafka cluster (the scaled deployment); needs the `kafka` cargo feature.
    Kafka(KafkaConfig),
}

impl BusConfig {
    /// Checks the section without I/O; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            BusConfig::Embedded(_) => Ok(()),
            BusConfig::Kafka(k) => k.validate(),
        }
    }

    /// Opens the configured backend: the one place that knows every backend.
    pub async fn open(&self) -> Result<std::sync::Arc<dyn Bus>, BusError> {
        match self {
            BusConfig::Embedded(c) => Ok(std::sync::Arc::new(EmbeddedLog::open(c.clone())?)),
            BusConfig::Kafka(c) => kafka::open(c).await,
        }
    }

    /// Whether the bus can be shared between processes (every backend but the embedded log).
    pub fn is_shared(&self) -> bool {
        !matches!(self, BusConfig::Embedded(_))
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig::Embedded(EmbeddedConfig::default())
    }
}
