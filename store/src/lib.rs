//! The analytics store: `EventWriter` (the collector's side) and `UsageQuery` (the query API's
//! side), with the embedded Parquet + DataFusion backend. The ClickHouse backend plugs in behind
//! the same traits and passes the same data-driven conformance suite (`tests/conformance.rs`).
//!
//! The store answers small, exact primitives — counts and byte sums by group keys, and latency
//! histograms — and the query API builds reports, prices and quantiles on top of them, so every
//! backend gives the same answers by construction.

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};

pub mod parquet;
pub mod sketch;

pub use parquet::{ParquetConfig, ParquetStore};
pub use tollgate_schemas::Checkpoint;

/// Store errors; `retryable` tells a transient condition from a fatal one.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("store query failed: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
    #[error("parquet: {0}")]
    Parquet(#[from] ::parquet::errors::ParquetError),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("bad store request: {0}")]
    BadRequest(String),
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, StoreError::Io { .. } | StoreError::Query(_))
    }

    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// The collector's side of the store.
///
/// Exactly-once contract: `append` makes events visible to queries at once; `flush` makes every
/// appended event durable *together with* the checkpoint passed with the last append, and returns
/// that checkpoint. After a crash, `durable_checkpoint` tells the collector where the durable data
/// ends, so it resumes there: events after it are read again from the bus, events before it are
/// never written twice.
#[async_trait]
pub trait EventWriter: Send + Sync {
    /// Adds a batch of `RequestEvent` rows; `through` is the bus position just after them.
    async fn append(&self, batch: RecordBatch, through: &Checkpoint) -> Result<(), StoreError>;
    /// Makes everything appended so far durable; returns the durable checkpoint.
    async fn flush(&self) -> Result<Checkpoint, StoreError>;
    /// The checkpoint of the durable data (what survived the last crash).
    async fn durable_checkpoint(&self) -> Result<Checkpoint, StoreError>;
    /// Forgets events appended but not yet durable and returns the durable checkpoint: what a
    /// collector calls when it (re)starts, so that re-reading from that checkpoint cannot count
    /// an event twice, even when the store outlived a failed collector in the same process.
    async fn reset(&self) -> Result<Checkpoint, StoreError>;
}

/// A time window `[from, to)` in microseconds since the epoch, and optional filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub from_us: i64,
    pub to_us: i64,
    pub consumer: Option<String>,
    pub route: Option<String>,
}

/// Keys usage can be grouped by. Closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupKey {
    Consumer,
    Route,
    Plan,
    Day,
    Status,
}

impl GroupKey {
    /// Parses a `group_by` item.
    pub fn parse(s: &str) -> Option<GroupKey> {
        Some(match s {
            "consumer" => GroupKey::Consumer,
            "route" => GroupKey::Route,
            "plan" => GroupKey::Plan,
            "day" => GroupKey::Day,
            "status" => GroupKey::Status,
            _ => return None,
        })
    }

    /// The name used in requests and responses.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupKey::Consumer => "consumer",
            GroupKey::Route => "route",
            GroupKey::Plan => "plan",
            GroupKey::Day => "day",
            GroupKey::Status => "status",
        }
    }
}

/// The value of one group key in a row. `Day` is a UTC date `YYYY-MM-DD`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KeyValue {
    Null,
    Text(String),
    Int(i64),
}

/// One row of usage: the group key values (in the order asked) and exact sums.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UsageRow {
    pub keys: Vec<KeyValue>,
    pub requests: u64,
    pub billable_requests: u64,
    pub req_bytes: u64,
    pub resp_bytes: u64,
}

/// Latency histogram of one group and time bucket (requests forwarded upstream only).
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyRow {
    pub route: String,
    /// Set when grouped by consumer.
    pub consumer: Option<String>,
    /// Start of the time bucket (µs); the window start when no step was asked.
    pub t_us: i64,
    /// Requests with a status >= 500.
    pub errors: u64,
    pub histogram: sketch::LogHistogram,
}

/// What `latency` groups by and how it buckets time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyQuery {
    pub filter: Filter,
    /// Bucket width in µs; `None`: one bucket for the whole window.
    pub step_us: Option<i64>,
    /// Split each route's series by consumer.
    pub by_consumer: bool,
}

/// The query API's side of the store.
#[async_trait]
pub trait UsageQuery: Send + Sync {
    /// Exact request counts and byte sums grouped by `group_by` (in that order), sorted by keys.
    async fn usage(
        &self,
        filter: &Filter,
        group_by: &[GroupKey],
    ) -> Result<Vec<UsageRow>, StoreError>;
    /// Latency histograms per route (and consumer), per time bucket.
    async fn latency(&self, query: &LatencyQuery) -> Result<Vec<LatencyRow>, StoreError>;
    /// True when the store can answer queries.
    async fn ready(&self) -> bool;
}

/// Which store backend to use: the `store:` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    /// Arrow in memory plus Parquet files on disk, queried with DataFusion.
    Parquet(ParquetConfig),
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Parquet(ParquetConfig::default())
    }
}

/// Formats a day number (days since the epoch) as `YYYY-MM-DD`.
pub fn day_string(day: i64) -> String {
    let date = chrono::DateTime::from_timestamp(day * 86_400, 0)
        .expect("day in range")
        .date_naive();
    date.format("%Y-%m-%d").to_string()
}
