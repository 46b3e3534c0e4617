//! Crash-safety tests of the Parquet store's write path.

use super::*;
use crate::{Filter, UsageQuery};
use tollgate_schemas::{Outcome, RequestEvent};

pub(crate) fn event(ts_us: i64, consumer: &str, route: &str, latency_us: u64) -> RequestEvent {
    RequestEvent {
        v: 1,
        id: uuid::Uuid::now_v7(),
        ts: chrono::DateTime::from_timestamp_micros(ts_us).unwrap(),
        gateway: "gw".into(),
        route: Some(route.into()),
        method: "GET".into(),
        path: "/x".into(),
        status: 200,
        latency_us,
        upstream_latency_us: Some(latency_us),
        req_bytes: 1,
        resp_bytes: 10,
        consumer: Some(consumer.into()),
        plan: Some("pro".into()),
        outcome: Outcome::Ok,
        billable: true,
        trace_id: None,
    }
}

fn cfg(dir: &std::path::Path) -> ParquetConfig {
    ParquetConfig {
        dir: dir.to_path_buf(),
        compact_min_files: 3,
        compact_max_rows: 1_000_000,
    }
}

fn cp(n: u64) -> Checkpoint {
    Checkpoint([(0, n)].into())
}

const DAY: i64 = 86_400_000_000;
const T0: i64 = 20_000 * DAY;

fn all() -> Filter {
    Filter {
        from_us: 0,
        to_us: i64::MAX / 2,
        ..Default::default()
    }
}

async fn total(store: &ParquetStore) -> u64 {
    store
        .usage(&all(), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.requests)
        .sum()
}

#[tokio::test]
async fn appended_events_are_queryable_before_flush_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    let evs: Vec<_> = (0..10).map(|i| event(T0 + i, "a", "r", 100)).collect();
    store
        .append(&crate::EventBatch::consecutive(evs.clone(), 0, 10))
        .await
        .unwrap();
    assert_eq!(total(&store).await, 10);
    assert_eq!(store.resume(0, 0).await.unwrap().stored_through, 0);
    assert_eq!(store.flush().await.unwrap(), cp(10));
    assert_eq!(total(&store).await, 10);
    // Unflushed events are gone after a "crash"; the checkpoint says where to resume.
    let more: Vec<_> = (0..5).map(|i| event(T0 + 100 + i, "a", "r", 100)).collect();
    store
        .append(&crate::EventBatch::consecutive(more.clone(), 0, 15))
        .await
        .unwrap();
    drop(store);
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    assert_eq!(total(&store).await, 10);
    assert_eq!(store.resume(0, 0).await.unwrap().stored_through, 10);
    assert_eq!(store.resume(0, 12).await.unwrap().stored_through, 12);
}

#[tokio::test]
async fn flush_splits_by_day_and_compaction_merges_without_changing_answers() {
    let dir = tempfile::tempdir().unwrap();
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    for i in 0..4u64 {
        // Each flush touches two days.
        let evs = vec![
            event(T0 + i as i64, "a", "r", 100),
            event(T0 + DAY + i as i64, "b", "r", 100),
        ];
        store
            .append(&crate::EventBatch::consecutive(evs.clone(), 0, 2 * i + 2))
            .await
            .unwrap();
        store.flush().await.unwrap();
    }
    let m = store.manifest();
    assert_eq!(m.files.len(), 8);
    assert!(m.files.iter().all(|f| f.path.starts_with("day=")));
    let before = store
        .usage(&all(), &[crate::GroupKey::Day, crate::GroupKey::Consumer])
        .await
        .unwrap();
    assert_eq!(store.compact().await.unwrap(), 8);
    assert_eq!(store.manifest().files.len(), 2);
    let after = store
        .usage(&all(), &[crate::GroupKey::Day, crate::GroupKey::Consumer])
        .await
        .unwrap();
    assert_eq!(before, after);
    assert_eq!(after.iter().map(|r| r.requests).sum::<u64>(), 8);
    // Replaced files go on the next round; a reopen never sees them as data.
    store.compact().await.unwrap();
    let parquet_files = walk(dir.path());
    assert_eq!(parquet_files, 2, "old files deleted");
    drop(store);
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    assert_eq!(total(&store).await, 8);
}

#[tokio::test]
async fn orphan_files_from_an_interrupted_flush_are_ignored_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    let evs: Vec<_> = (0..3).map(|i| event(T0 + i, "a", "r", 100)).collect();
    store
        .append(&crate::EventBatch::consecutive(evs.clone(), 0, 3))
        .await
        .unwrap();
    store.flush().await.unwrap();
    // A file written but never committed to the manifest.
    files::write_file(
        dir.path(),
        T0 / DAY,
        &tollgate_schemas::arrow::to_batch(&evs),
    )
    .unwrap();
    assert_eq!(walk(dir.path()), 2);
    drop(store);
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    assert_eq!(walk(dir.path()), 1);
    assert_eq!(total(&store).await, 3);
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|d| d.path().is_dir())
        .map(|d| std::fs::read_dir(d.path()).unwrap().count())
        .sum()
}
