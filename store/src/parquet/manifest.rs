//! The manifest: the one file that says which Parquet files hold the store's data and up to which
//! bus checkpoint. Replacing it (write, fsync, rename, fsync dir) is the commit point of every
//! flush and compaction, so a crash leaves either the old or the new set of files, never both.
//! Files on disk that the manifest does not name are leftovers of an interrupted write; they are
//! deleted at open.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Checkpoint, StoreError};

pub const FILE: &str = "manifest.json";

/// The committed state of the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Increments with every commit.
    pub version: u64,
    /// Bus position just after the last event in these files.
    pub checkpoint: Checkpoint,
    pub files: Vec<FileEntry>,
    /// True when every events file has its per-minute rollups `Usage1m` and `Latency1m` (the
    /// first rollups; stores written before them get them built by the first upkeep round,
    /// until then queries read raw events).
    #[serde(default)]
    pub rollups: bool,
    /// The rollup kinds every events file has, when more than those two (later kinds are built
    /// by upkeep for older stores the same way). See [`Manifest::complete_rollups`].
    #[serde(default)]
    pub rollup_kinds: Vec<FileKind>,
}

impl Manifest {
    /// The rollup kinds a query may read: those every events file has.
    pub fn complete_rollups(&self) -> Vec<FileKind> {
        if !self.rollup_kinds.is_empty() {
            let live = self.rollup_kinds.iter().filter(|k| !k.is_retired());
            live.copied().collect()
        } else if self.rollups {
            vec![FileKind::Usage1m, FileKind::Latency1m]
        } else {
            Vec::new()
        }
    }

    /// Rollup kinds this store still has to build for its existing files.
    pub fn missing_rollups(&self) -> Vec<FileKind> {
        let have = self.complete_rollups();
        FileKind::ROLLUPS
            .into_iter()
            .filter(|k| !have.contains(k))
            .collect()
    }
}

/// What a Parquet file holds.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// Raw `RequestEvent` rows.
    #[default]
    Events,
    /// Per-minute usage sums (see `rollup.rs`).
    Usage1m,
    /// Per-minute latency-sketch buckets (see `rollup.rs`).
    Latency1m,
    /// Retired: per-minute, per-route sketches in list columns, slow to decode. Replaced by
    /// `RouteSketch1m`; upkeep deletes these files and builds the new kind from the events.
    LatencyRoute1m,
    /// Hourly usage sums.
    Usage1h,
    /// Daily usage sums.
    Usage1d,
    /// Retired: hourly sketches in list columns (see `LatencyRoute1m`).
    LatencyRoute1h,
    /// Per-minute, per-route latency sketches, one encoded sketch per row (see `rollup.rs`).
    RouteSketch1m,
    /// Hourly, per-route latency sketches.
    RouteSketch1h,
}

impl FileKind {
    /// File name prefix inside a day folder.
    pub fn prefix(self) -> &'static str {
        match self {
            FileKind::Events => "part",
            FileKind::Usage1m => "usage_1m",
            FileKind::Latency1m => "latency_1m",
            FileKind::LatencyRoute1m => "latency_route_1m",
            FileKind::Usage1h => "usage_1h",
            FileKind::Usage1d => "usage_1d",
            FileKind::LatencyRoute1h => "latency_route_1h",
            FileKind::RouteSketch1m => "route_sketch_1m",
            FileKind::RouteSketch1h => "route_sketch_1h",
        }
    }

    /// Every rollup kind, in the order a flush writes them.
    pub const ROLLUPS: [FileKind; 6] = [
        FileKind::Usage1m,
        FileKind::Usage1h,
        FileKind::Usage1d,
        FileKind::Latency1m,
        FileKind::RouteSketch1m,
        FileKind::RouteSketch1h,
    ];

    /// Kinds no longer written or read: their files are deleted by upkeep.
    pub fn is_retired(self) -> bool {
        matches!(self, FileKind::LatencyRoute1m | FileKind::LatencyRoute1h)
    }

    /// The name of a rollup's time column and the length of its periods (µs).
    pub fn period(self) -> Option<(&'static str, i64)> {
        use crate::time::{DAY_US, HOUR_US, MINUTE_US};
        match self {
            FileKind::Events => None,
            FileKind::Usage1m
            | FileKind::Latency1m
            | FileKind::LatencyRoute1m
            | FileKind::RouteSketch1m => Some(("minute_us", MINUTE_US)),
            FileKind::Usage1h | FileKind::LatencyRoute1h | FileKind::RouteSketch1h => {
                Some(("hour_us", HOUR_US))
            }
            FileKind::Usage1d => Some(("day_us", DAY_US)),
        }
    }
}

/// One Parquet file, all of one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the store directory: `day=YYYY-MM-DD/<kind prefix>-<uuid>.parquet`.
    pub path: String,
    #[serde(default)]
    pub kind: FileKind,
    /// Days since the epoch (UTC).
    pub day: i64,
    pub rows: u64,
    pub bytes: u64,
    pub min_ts_us: i64,
    pub max_ts_us: i64,
}

/// Loads the manifest, or an empty one for a new store.
pub fn load(dir: &Path) -> Result<Manifest, StoreError> {
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest {
            rollups: true,
            rollup_kinds: FileKind::ROLLUPS.to_vec(),
            ..Manifest::default()
        }),
        Err(e) => Err(StoreError::io(&path)(e)),
    }
}

/// Atomically replaces the manifest.
pub fn store(dir: &Path, manifest: &Manifest) -> Result<(), StoreError> {
    let path = dir.join(FILE);
    let body = serde_json::to_vec_pretty(manifest).expect("manifest serializes");
    tollgate_schemas::fsutil::write_atomic(&path, &body).map_err(StoreError::io(&path))
}

/// fsyncs a directory so that a rename or a new file in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(dir))
}
