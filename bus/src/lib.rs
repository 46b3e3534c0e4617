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

pub use embedded::{EmbeddedConfig, EmbeddedLog};

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
}

impl BusError {
    /// Whether trying again later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, BusError::Io { .. })
    }
}

/// Appends records to the bus. Implementations are cheap to share (`Arc<dyn Publisher>`).
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Appends the records durably (per the backend's durability setting), in order.
    async fn publish(&self, records: Vec<Record>) -> Result<(), BusError>;
}

/// Reads records for one consumer group and commits what has been processed.
#[async_trait]
pub trait Subscriber: Send {
    /// Up to `max` records after the current position, waiting at most `wait` for the first.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Message>, BusError>;
    /// Records durably that everything before `checkpoint` is processed.
    async fn commit(&mut self, checkpoint: &Checkpoint) -> Result<(), BusError>;
    /// The last committed checkpoint of this group.
    fn committed(&self) -> Checkpoint;
    /// Moves the read position to `checkpoint` (partitions not named keep their position).
    async fn seek(&mut self, checkpoint: &Checkpoint) -> Result<(), BusError>;
}

/// Which bus backend to use: the `bus:` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BusConfig {
    /// Durable log on local disk (one process).
    Embedded(EmbeddedConfig),
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig::Embedded(EmbeddedConfig::default())
    }
}
