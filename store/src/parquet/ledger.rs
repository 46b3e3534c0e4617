//! Completeness and published exports of the embedded store (see `crate::ledger`), as small
//! files beside the Parquet data: `progress.json` (replaced atomically) and one
//! `exports/<period>.json` per published export, created once and never rewritten.

use std::path::{Path, PathBuf};

use super::ParquetStore;
use crate::ledger::merge_progress;
use crate::{PartitionProgress, StoreError, StoredExport};

const PROGRESS_FILE: &str = "progress.json";
const EXPORTS_DIR: &str = "exports";

fn corrupt(path: &Path, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!("{}: {e}", path.display()))
}

/// Reads the recorded progress (none when the file does not exist yet).
pub(super) fn load_progress(dir: &Path) -> Result<Vec<PartitionProgress>, StoreError> {
    let path = dir.join(PROGRESS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::io(&path)(e)),
    }
}

fn export_path(dir: &Path, period: &str) -> Result<PathBuf, StoreError> {
    // Periods are `YYYY-MM` (the query API parses them); anything else must not become a path.
    if period.is_empty() || !period.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return Err(StoreError::BadRequest(format!(
            "`{period}` is not a billing period"
        )));
    }
    Ok(dir.join(EXPORTS_DIR).join(format!("{period}.json")))
}

fn read_export(path: &Path) -> Result<Option<StoredExport>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| corrupt(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(path)(e)),
    }
}

impl ParquetStore {
    /// Merges `progress` into what is recorded: written to `progress.json` (fsynced) first,
    /// then made visible to readers, who never wait for the write.
    pub(super) fn record_progress_now(
        &self,
        progress: &[PartitionProgress],
    ) -> Result<(), StoreError> {
        let _writer = self
            .inner
            .progress_writer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let before = self.progress_now();
        let mut known = before.clone();
        merge_progress(&mut known, progress);
        if known == before {
            return Ok(());
        }
        let path = self.inner.dir.join(PROGRESS_FILE);
        let bytes = serde_json::to_vec(&known).expect("progress serializes");
        tollgate_schemas::fsutil::write_atomic(&path, &bytes).map_err(StoreError::io(&path))?;
        *self
            .inner
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = known;
        Ok(())
    }

    pub(super) fn progress_now(&self) -> Vec<PartitionProgress> {
        self.inner
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Creates the period's file unless it exists (a hard link of a complete, fsynced temp
    /// file: no reader ever sees a partial export), then reads back what the period holds.
    pub(super) fn publish_export_now(
        &self,
        export: &StoredExport,
    ) -> Result<StoredExport, StoreError> {
        let path = export_path(&self.inner.dir, &export.period)?;
        let dir = path.parent().expect("under the store");
        std::fs::create_dir_all(dir).map_err(StoreError::io(dir))?;
        let tmp = dir.join(format!(".{}.{}.tmp", export.period, export.id));
        let bytes = serde_json::to_vec(export).expect("export serializes");
        tollgate_schemas::fsutil::write_atomic(&tmp, &bytes).map_err(StoreError::io(&tmp))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(StoreError::io(dir))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io(&path)(e)),
        }
        read_export(&path)?.ok_or_else(|| {
            StoreError::Corrupt(format!("{} vanished after publishing", path.display()))
        })
    }

    pub(super) fn published_export_now(
        &self,
        period: &str,
    ) -> Result<Option<StoredExport>, StoreError> {
        read_export(&export_path(&self.inner.dir, period)?)
    }

    pub(super) fn published_exports_now(&self) -> Result<Vec<StoredExport>, StoreError> {
        let dir = self.inner.dir.join(EXPORTS_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io(&dir)(e)),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            if let Some(mut x) = read_export(&e.path())? {
                x.lines.clear();
                out.push(x);
            }
        }
        out.sort_by(|a, b| a.period.cmp(&b.period));
        Ok(out)
    }
}

/// Runs file work of the ledger on a blocking thread.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))?
}
