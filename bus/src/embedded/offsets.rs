//! Durable committed offsets of consumer groups: one small JSON file per group, replaced
//! atomically (write to a temp file, fsync, rename, fsync the directory).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::BusError;

#[derive(Serialize, Deserialize)]
struct Committed {
    next_offset: u64,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> BusError + '_ {
    move |source| BusError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The committed next offset of `group` (`None` when it never committed).
pub fn load(dir: &Path, group: &str) -> Result<Option<u64>, BusError> {
    let path = dir.join(format!("{group}.json"));
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<Committed>(&bytes)
            .map(|c| Some(c.next_offset))
            .map_err(|e| {
                BusError::Config(format!("{} is not an offsets file: {e}", path.display()))
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(&path)(e)),
    }
}

/// Durably records that `group` has processed everything before `next_offset`.
pub fn store(dir: &Path, group: &str, next_offset: u64) -> Result<(), BusError> {
    let path = dir.join(format!("{group}.json"));
    let body = serde_json::to_vec(&Committed { next_offset }).expect("serializes");
    tollgate_schemas::fsutil::write_atomic(&path, &body).map_err(err(&path))
}

/// The lowest committed offset over every group, `None` when no group has committed.
pub fn min_committed(dir: &Path) -> Result<Option<u64>, BusError> {
    let mut min = None;
    for entry in std::fs::read_dir(dir).map_err(err(dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(group) = name.strip_suffix(".json")
            && !name.starts_with('.')
            && let Some(o) = load(dir, group)?
        {
            min = Some(min.map_or(o, |m: u64| m.min(o)));
        }
    }
    Ok(min)
}
