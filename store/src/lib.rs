//! The analytics store: `EventWriter` (the collector's side) and `UsageQuery` (the query API's
//! side), with the embedded Parquet + DataFusion backend. The ClickHouse backend plugs in behind
//! the same traits and passes the same data-driven conformance suite (`tests/conformance.rs`).
//!
//! The store answers small, exact primitives — counts and byte sums by group keys, and latency
//! histograms — and the query API builds reports, prices and quantiles on top of them, so every
//! backend gives the same answers by construction.

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tollgate_schemas::RequestEvent;

pub mod clickhouse;
pub mod cpu;
pub mod ledger;
pub mod merge;
pub mod parquet;
/// The latency sketch lives with the schemas: its byte form is a storage format every backend
/// shares, and its decoding loop is the hot part of latency queries, so it is compiled at full
/// optimisation while this crate is built for build time (see the release profile).
pub use tollgate_schemas::sketch;
pub mod time;

pub use clickhouse::{ClickHouseConfig, Compression as ClickHouseCompression};
pub use ledger::{PartitionProgress, StoredExport};
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
    /// The ClickHouse server refused or could not be reached.
    #[error("clickhouse: {0}")]
    ClickHouse(String),
    /// The backend is compiled out of this build.
    #[error("store.kind: `{kind}` is not in this build; rebuild with `--features {feature}`")]
    NotBuilt {
        kind: &'static str,
        feature: &'static str,
    },
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Io { .. } | StoreError::Query(_) | StoreError::ClickHouse(_)
        )
    }

    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Where one consumed record sits on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

/// Consumed events on their way into the store: each with its bus position, and the checkpoint
/// just after the last consumed record (dead-lettered records included).
#[derive(Debug, Clone, Default)]
pub struct EventBatch {
    pub events: Vec<RequestEvent>,
    pub positions: Vec<Position>,
    pub through: Checkpoint,
}

impl EventBatch {
    /// Events read from one partition at consecutive offsets ending just before `through`
    /// (the shape of most tests).
    pub fn consecutive(events: Vec<RequestEvent>, partition: u32, through: u64) -> EventBatch {
        let first = through - events.len() as u64;
        let positions = (0..events.len() as u64)
            .map(|i| Position {
                partition,
                offset: first + i,
            })
            .collect();
        EventBatch {
            events,
            positions,
            through: Checkpoint([(partition, through)].into()),
        }
    }
}

/// Where a collector resumes a partition it was just assigned: every offset below
/// `stored_through` is in the store, and so is every offset in `stored_after`; the rest is read
/// from the bus and written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    pub stored_through: u64,
    pub stored_after: std::collections::BTreeSet<u64>,
}

impl Resume {
    /// Whether the record at `offset` is already stored.
    pub fn is_stored(&self, offset: u64) -> bool {
        offset < self.stored_through || self.stored_after.contains(&offset)
    }
}

/// The collector's side of the store.
///
/// Exactly-once contract: the store is the record of which bus positions it holds. `append`
/// makes events visible to queries; `flush` makes every appended event durable and returns the
/// checkpoint it reaches, which the collector then commits to the bus. When a partition is
/// assigned (at start, or after a rebalance or a crash), `resume` says which of its records the
/// store already holds, so the collector skips them: nothing is written twice, and nothing the
/// store lacks is skipped, whatever the bus commit says.
#[async_trait]
pub trait EventWriter: Send + Sync {
    /// Adds a batch of events.
    async fn append(&self, batch: &EventBatch) -> Result<(), StoreError>;
    /// Makes everything appended so far durable; returns the durable checkpoint.
    async fn flush(&self) -> Result<Checkpoint, StoreError>;
    /// What the store holds of `partition`, given the bus commit `committed` of the group.
    async fn resume(&self, partition: u32, committed: u64) -> Result<Resume, StoreError>;
    /// Forgets events appended but not yet durable: what a collector calls when it (re)starts,
    /// so that re-reading them cannot count an event twice, even when the store outlived a
    /// failed collector in the same process.
    async fn reset(&self) -> Result<(), StoreError>;
    /// True when `append` is already durable (`flush` then only reports the checkpoint), so the
    /// collector commits after every append.
    fn durable_on_append(&self) -> bool {
        false
    }
    /// How many events an append should carry when the collector's configuration does not
    /// say: what suits the backend's writes.
    fn preferred_batch_events(&self) -> usize {
        10_000
    }
    /// Records that these partitions were stored up to their end at the given times (see
    /// `ledger`); an earlier time than the one known for a partition changes nothing.
    async fn record_progress(&self, progress: &[PartitionProgress]) -> Result<(), StoreError>;
    /// The ids of the events the store holds from the `n` bus positions of `partition` just
    /// before `before`, oldest first: what a collector that takes the partition over seeds
    /// its deduplication window with (`tollgate-collector`'s `recent.rs`). A backend that
    /// cannot look events up by position returns none (the embedded store: its bus never
    /// holds a record twice).
    async fn recent_ids(
        &self,
        _partition: u32,
        _before: u64,
        _n: usize,
    ) -> Result<Vec<u128>, StoreError> {
        Ok(Vec::new())
    }
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
    /// The hour, as `YYYY-MM-DDTHH:00:00Z`.
    Hour,
    /// The minute, as `YYYY-MM-DDTHH:MM:00Z`.
    Minute,
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
            "hour" => GroupKey::Hour,
            "minute" => GroupKey::Minute,
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
            GroupKey::Hour => "hour",
            GroupKey::Minute => "minute",
        }
    }

    /// The length of the period a time key groups by (`None` for the other keys).
    pub fn period_us(self) -> Option<i64> {
        match self {
            GroupKey::Day => Some(time::DAY_US),
            GroupKey::Hour => Some(time::HOUR_US),
            GroupKey::Minute => Some(time::MINUTE_US),
            _ => None,
        }
    }

    /// The finest period of the time keys in `keys`: rollups coarser than it cannot answer.
    pub fn finest_period(keys: &[GroupKey]) -> Option<i64> {
        keys.iter().filter_map(|k| k.period_us()).min()
    }

    /// A time key's value for the period numbered `units` (of its length since the epoch).
    pub fn period_value(self, units: i64) -> KeyValue {
        match self {
            GroupKey::Day => KeyValue::Text(day_string(units)),
            k => KeyValue::Text(time::period_string(
                units,
                k.period_us().expect("a time key"),
            )),
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

/// Latency of one group and time bucket (requests forwarded upstream only).
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyRow {
    pub route: String,
    /// Set when grouped by consumer.
    pub consumer: Option<String>,
    /// Start of the time bucket (µs); the window start when no step was asked.
    pub t_us: i64,
    /// Requests in the bucket.
    pub count: u64,
    /// Requests with a status >= 500.
    pub errors: u64,
    /// The asked quantiles, in µs and in the order asked: the nearest-rank quantile of the
    /// group's sketch buckets (see `sketch`), so every backend reports the same value.
    pub quantiles_us: Vec<f64>,
}

/// What `latency` groups by and how it buckets time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyQuery {
    pub filter: Filter,
    /// Bucket width in µs; `None`: one bucket for the whole window.
    pub step_us: Option<i64>,
    /// Split each route's series by consumer.
    pub by_consumer: bool,
    /// Quantiles to report, each in `[0, 1]`. The store computes them next to the data (a
    /// month of per-minute sketches is millions of bucket counts; the answer is a few numbers).
    pub quantiles: Vec<f64>,
}

impl LatencyQuery {
    /// Whether the answer needs the consumer key (grouped or filtered by it); when it does
    /// not, the per-route rollups answer, which are much smaller.
    pub fn needs_consumer(&self) -> bool {
        self.by_consumer || self.filter.consumer.is_some()
    }

    /// Checks what a backend relies on.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.step_us.is_some_and(|s| s <= 0) {
            return Err(StoreError::BadRequest("step must be positive".into()));
        }
        if let Some(q) = self.quantiles.iter().find(|q| !(0.0..=1.0).contains(*q)) {
            return Err(StoreError::BadRequest(format!(
                "quantile {q} is not between 0 and 1"
            )));
        }
        Ok(())
    }
}

/// The billable requests of each consumer from `usage` rows grouped by consumer alone
/// (anonymous requests left out): what `UsageQuery::billable_by_consumer` answers.
pub fn billable_of_consumers(rows: Vec<UsageRow>) -> std::collections::HashMap<String, u64> {
    rows.into_iter()
        .filter_map(|r| match r.keys.into_iter().next() {
            Some(KeyValue::Text(c)) => Some((c, r.billable_requests)),
            _ => None,
        })
        .collect()
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
    /// Latency quantiles per route (and consumer), per time bucket, sorted by route, consumer
    /// and time.
    async fn latency(&self, query: &LatencyQuery) -> Result<Vec<LatencyRow>, StoreError>;
    /// True when the store can answer queries.
    async fn ready(&self) -> bool;
    /// A number that changes whenever an answer may: callers that cache answers (the quota
    /// state) skip a query while it stays the same. `None`: the store cannot tell (its data
    /// changes outside this process), so every answer must be queried.
    fn data_version(&self) -> Option<u64> {
        None
    }
    /// Billable requests per consumer in `[from_us, to_us)`, anonymous requests left out: the
    /// counts of the quota state, the same as `usage` grouped by consumer, which is what this
    /// default asks. A store may answer it more cheaply (the embedded one reads three columns
    /// without planning a query).
    async fn billable_by_consumer(
        &self,
        from_us: i64,
        to_us: i64,
    ) -> Result<std::sync::Arc<std::collections::HashMap<String, u64>>, StoreError> {
        let filter = Filter {
            from_us,
            to_us,
            consumer: None,
            route: None,
        };
        let rows = self.usage(&filter, &[GroupKey::Consumer]).await?;
        Ok(std::sync::Arc::new(billable_of_consumers(rows)))
    }
    /// What the collectors recorded of each partition (see `ledger`).
    async fn progress(&self) -> Result<Vec<PartitionProgress>, StoreError>;
    /// Stores a published export and returns the period's export: this one, or one published
    /// before it (see `ledger`).
    async fn publish_export(&self, export: &StoredExport) -> Result<StoredExport, StoreError>;
    /// The published export of `period`, if any.
    async fn published_export(&self, period: &str) -> Result<Option<StoredExport>, StoreError>;
    /// Every period's published export, without lines (`lines` is empty), by period.
    async fn published_exports(&self) -> Result<Vec<StoredExport>, StoreError>;
}

/// Which store backend to use: the `store:` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    /// Arrow in memory plus Parquet files on disk, queried with DataFusion.
    Parquet(ParquetConfig),
    /// A ClickHouse server (the scaled deployment); needs the `clickhouse` cargo feature.
    Clickhouse(ClickHouseConfig),
}

/// Background work a backend owns, run until its token is cancelled.
pub(crate) type Upkeep =
    Box<dyn FnOnce(CancellationToken) -> futures::future::BoxFuture<'static, ()> + Send>;

/// A store opened from its configuration: the collector's and the query API's sides, and the
/// background upkeep the backend owns (Parquet: compaction and rollups; ClickHouse, which
/// merges by itself: compacted latency sketches). Collectors run the upkeep; a query API does
/// not (it may hold read-only credentials).
pub struct Store {
    pub writer: Arc<dyn EventWriter>,
    pub query: Arc<dyn UsageQuery>,
    upkeep: Option<Upkeep>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Runs the backend's upkeep until `shutdown` (returns at once when it has none).
    pub async fn upkeep(&mut self, shutdown: CancellationToken) {
        if let Some(run) = self.upkeep.take() {
            run(shutdown).await;
        }
    }
}

impl StoreConfig {
    /// Checks the section without I/O; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            StoreConfig::Parquet(_) => Ok(()),
            StoreConfig::Clickhouse(c) => c.validate(),
        }
    }

    /// Whether the store can be shared between processes (every backend but Parquet files).
    pub fn is_shared(&self) -> bool {
        !matches!(self, StoreConfig::Parquet(_))
    }

    /// Opens the configured backend (connects, applies migrations): the one place that knows
    /// every backend.
    pub async fn open(&self) -> Result<Store, StoreError> {
        match self {
            StoreConfig::Parquet(c) => {
                let store = ParquetStore::open(c.clone())?;
                let upkeep = store.clone();
                Ok(Store {
                    writer: Arc::new(store.clone()),
                    query: Arc::new(store),
                    upkeep: Some(Box::new(move |stop| {
                        Box::pin(async move { upkeep.compact_every(stop).await })
                    })),
                })
            }
            StoreConfig::Clickhouse(c) => {
                let (writer, query, upkeep) = clickhouse::open(c).await?;
                Ok(Store {
                    writer,
                    query,
                    upkeep: Some(upkeep),
                })
            }
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Parquet(ParquetConfig::default())
    }
}

pub use time::day_string;
