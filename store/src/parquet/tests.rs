//! Crash-safety tests of the Parquet store's write path.

use super::*;
use crate::{Filter, GroupKey, UsageQuery};
use datafusion::arrow::compute::concat_batches;
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
    // Each flush writes, per day, the events and their six rollups.
    assert_eq!(m.files.len(), 56);
    assert_eq!(events_files(&m), 8);
    assert!(m.files.iter().all(|f| f.path.starts_with("day=")));
    let before = store
        .usage(&all(), &[crate::GroupKey::Day, crate::GroupKey::Consumer])
        .await
        .unwrap();
    assert_eq!(store.compact().await.unwrap(), 56);
    assert_eq!(store.manifest().files.len(), 14);
    assert_eq!(events_files(&store.manifest()), 2);
    let after = store
        .usage(&all(), &[crate::GroupKey::Day, crate::GroupKey::Consumer])
        .await
        .unwrap();
    assert_eq!(before, after);
    assert_eq!(after.iter().map(|r| r.requests).sum::<u64>(), 8);
    // Replaced files go on the next round; a reopen never sees them as data.
    store.compact().await.unwrap();
    let parquet_files = walk(dir.path());
    assert_eq!(parquet_files, 14, "old files deleted");
    drop(store);
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    assert_eq!(total(&store).await, 8);
}

/// A flush writes the batches it holds as they are: each day's events of every batch go into
/// one file of that day, with the day's rows, time range and rollups.
#[tokio::test]
async fn a_flush_of_several_batches_writes_one_file_a_day_with_all_of_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    let batches = [
        vec![(T0 + 5, "a"), (T0 + 1, "a"), (T0 + 9, "b")],
        vec![
            (T0 + DAY + 3, "b"),
            (T0 + 2, "a"),
            (T0 + 20, "b"),
            (T0 + DAY + 1, "a"),
        ],
        vec![(T0 + DAY + 7, "a")],
    ];
    let mut at = 0;
    for b in &batches {
        let evs: Vec<_> = b.iter().map(|(t, c)| event(*t, c, "r", 100)).collect();
        at += evs.len() as u64;
        store
            .append(&crate::EventBatch::consecutive(evs, 0, at))
            .await
            .unwrap();
    }
    assert_eq!(store.flush().await.unwrap(), cp(8));
    let m = store.manifest();
    let mut events: Vec<(i64, u64, i64, i64)> = m
        .files
        .iter()
        .filter(|f| f.kind == FileKind::Events)
        .map(|f| (f.day, f.rows, f.min_ts_us, f.max_ts_us))
        .collect();
    events.sort();
    assert_eq!(
        events,
        [
            (T0 / DAY, 5, T0 + 1, T0 + 20),
            (T0 / DAY + 1, 3, T0 + DAY + 1, T0 + DAY + 7)
        ]
    );
    for f in m.files.iter().filter(|f| f.kind == FileKind::Events) {
        assert_eq!(
            read_file(&dir.path().join(&f.path)).num_rows() as u64,
            f.rows
        );
    }
    // Answered from the rollups (whole days) and from the events, before and after a reopen.
    let by_day_and_consumer = async |store: &ParquetStore| {
        let mut rows: Vec<(String, u64)> = store
            .usage(&all(), &[GroupKey::Day, GroupKey::Consumer])
            .await
            .unwrap()
            .into_iter()
            .map(|r| (format!("{:?}", r.keys), r.requests))
            .collect();
        rows.sort();
        rows
    };
    let flushed = by_day_and_consumer(&store).await;
    assert_eq!(
        flushed.iter().map(|(_, n)| n).collect::<Vec<_>>(),
        [&3, &2, &2, &1],
        "{flushed:?}"
    );
    drop(store);
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    assert_eq!(by_day_and_consumer(&store).await, flushed);
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
    // The flush wrote the events and their six rollups; then the orphan.
    assert_eq!(walk(dir.path()), 8);
    drop(store);
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    assert_eq!(walk(dir.path()), 7);
    assert_eq!(total(&store).await, 3);
}

fn events_files(m: &Manifest) -> usize {
    m.files
        .iter()
        .filter(|f| f.kind == FileKind::Events)
        .count()
}

/// A store written before rollups existed (its manifest names only events files) answers from
/// raw events until the first upkeep round builds the rollups; the answers never change.
#[tokio::test]
async fn rollups_are_built_for_a_store_written_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    let evs: Vec<_> = (0..300)
        .map(|i| {
            event(
                T0 + i * 1_000_000,
                if i % 3 == 0 { "a" } else { "b" },
                "r",
                100 + i as u64,
            )
        })
        .collect();
    store
        .append(&crate::EventBatch::consecutive(evs, 0, 300))
        .await
        .unwrap();
    store.flush().await.unwrap();
    let window = Filter {
        from_us: T0 + 30_500_000,
        to_us: T0 + 250_000_001,
        ..Default::default()
    };
    let group = [crate::GroupKey::Consumer, crate::GroupKey::Route];
    let with_rollups = store.usage(&window, &group).await.unwrap();
    let latency_query = crate::LatencyQuery {
        filter: window.clone(),
        step_us: Some(60_000_000),
        by_consumer: true,
        quantiles: vec![0.5, 0.99],
    };
    let latency = store.latency(&latency_query).await.unwrap();
    let per_route = crate::LatencyQuery {
        by_consumer: false,
        ..latency_query.clone()
    };
    let route_latency = store.latency(&per_route).await.unwrap();
    assert_eq!(route_latency.iter().map(|r| r.count).sum::<u64>(), 220);
    drop(store);
    // A store from before some rollup kinds: upkeep builds them, the answers stay the same.
    let mut m = manifest::load(dir.path()).unwrap();
    m.files.retain(|f| {
        !matches!(
            f.kind,
            FileKind::RouteSketch1m | FileKind::RouteSketch1h | FileKind::Usage1h
        )
    });
    m.rollup_kinds = vec![FileKind::Usage1m, FileKind::Latency1m, FileKind::Usage1d];
    // ... and with a file of the retired list-column sketch layout, which upkeep drops.
    let legacy_schema = rollup::schema_of(FileKind::LatencyRoute1m);
    let legacy = files::write_kind(
        dir.path(),
        FileKind::LatencyRoute1m,
        m.files[0].day,
        &RecordBatch::new_empty(legacy_schema),
        m.files[0].min_ts_us,
        m.files[0].max_ts_us,
    )
    .unwrap();
    m.files.push(legacy.clone());
    m.rollup_kinds.push(FileKind::LatencyRoute1m);
    manifest::store(dir.path(), &m).unwrap();
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    assert_eq!(store.latency(&per_route).await.unwrap(), route_latency);
    store.compact().await.unwrap();
    let m = store.manifest();
    assert!(m.missing_rollups().is_empty());
    assert!(m.files.iter().all(|f| !f.kind.is_retired()));
    assert!(m.rollup_kinds.iter().all(|k| !k.is_retired()));
    assert_eq!(store.latency(&per_route).await.unwrap(), route_latency);
    store.compact().await.unwrap();
    assert!(
        !dir.path().join(&legacy.path).exists(),
        "retired file deleted"
    );
    drop(store);
    // Turn the manifest into an old one: events files only, no rollups.
    let mut m = manifest::load(dir.path()).unwrap();
    m.files.retain(|f| f.kind == FileKind::Events);
    m.rollups = false;
    m.rollup_kinds.clear();
    manifest::store(dir.path(), &m).unwrap();
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    assert_eq!(store.usage(&window, &group).await.unwrap(), with_rollups);
    store.compact().await.unwrap();
    let m = store.manifest();
    assert!(m.rollups);
    assert_eq!(
        m.files
            .iter()
            .filter(|f| f.kind == FileKind::Usage1m)
            .count(),
        1
    );
    assert_eq!(store.usage(&window, &group).await.unwrap(), with_rollups);
    assert_eq!(store.latency(&latency_query).await.unwrap(), latency);
    assert_eq!(store.latency(&per_route).await.unwrap(), route_latency);
    let total: u64 = with_rollups.iter().map(|r| r.requests).sum();
    assert_eq!(total, 220, "events from second 31 to second 250");
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|d| d.path().is_dir())
        .map(|d| std::fs::read_dir(d.path()).unwrap().count())
        .sum()
}

#[test]
fn unique_columns_are_written_without_a_dictionary() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let dir = tempfile::tempdir().unwrap();
    let events: Vec<RequestEvent> = (0..100)
        .map(|i| RequestEvent {
            trace_id: Some(format!("{i:032x}")),
            ..event(1_764_000_000_000_000 + i, "acme", "orders", 5)
        })
        .collect();
    let batch = tollgate_schemas::arrow::to_batch(&events);
    let entry = files::write_file(dir.path(), 20_416, &batch).unwrap();
    let file = std::fs::File::open(dir.path().join(&entry.path)).unwrap();
    let reader = SerializedFileReader::new(file).unwrap();
    let group = reader.metadata().row_group(0);
    let dictionary = |name: &str| {
        let column = (0..group.num_columns())
            .map(|i| group.column(i))
            .find(|c| c.column_path().string() == name)
            .unwrap_or_else(|| panic!("no column {name}"));
        column.dictionary_page_offset().is_some()
    };
    assert!(!dictionary("id"));
    assert!(!dictionary("trace_id"));
    assert!(dictionary("route"), "repeated values keep theirs");
    assert!(dictionary("consumer"));
}

/// Parquet files under `dir`, at any depth.
fn parquet_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => parquet_files(&e.path()),
                    _ => usize::from(e.path().extension().is_some_and(|x| x == "parquet")),
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn a_flush_does_not_wait_for_a_merge_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let store = ParquetStore::open(cfg(dir.path()))
        .unwrap()
        .with_merge_pause(std::time::Duration::from_millis(100));
    let mut offset = 0;
    for f in 0..3i64 {
        let evs: Vec<_> = (0..6_000)
            .map(|i| event(T0 + f * 10_000 + i, "a", "r", 100))
            .collect();
        offset += evs.len() as u64;
        store
            .append(&crate::EventBatch::consecutive(evs, 0, offset))
            .await
            .unwrap();
        store.flush().await.unwrap();
    }
    let before = parquet_files(dir.path());
    let compaction = tokio::spawn({
        let store = store.clone();
        async move { store.compact().await }
    });
    // The first merge has written its output file: compaction is under way.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while parquet_files(dir.path()) <= before {
        assert!(std::time::Instant::now() < deadline, "no merge started");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let more = vec![event(T0 + 50_000, "b", "r", 100)];
    store
        .append(&crate::EventBatch::consecutive(more, 0, offset + 1))
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert!(
        !compaction.is_finished(),
        "the flush waited for the whole compaction"
    );
    assert!(compaction.await.unwrap().unwrap() > 0);
    assert_eq!(total(&store).await, offset + 1);
    assert_eq!(store.manifest().checkpoint, cp(offset + 1));
}

/// `n` events over a few minutes, three consumers, two routes, some server errors and some
/// not forwarded (no upstream latency).
fn varied_events(n: usize) -> Vec<RequestEvent> {
    (0..n)
        .map(|i| {
            let consumer = ["acme", "globex", "initech"][i % 3];
            let route = ["orders", "items"][i % 2];
            let mut e = event(
                T0 + i as i64 * 97_000,
                consumer,
                route,
                100 + (i as u64 * 37) % 5_000,
            );
            if i % 7 == 0 {
                e.status = 503;
                e.billable = false;
            }
            if i % 11 == 0 {
                e.upstream_latency_us = None;
            }
            e
        })
        .collect()
}

/// The rows of `batch` as sorted lines: rollup rows come in no particular order.
fn sorted_rows(batch: &RecordBatch) -> Vec<String> {
    let text = datafusion::arrow::util::pretty::pretty_format_batches(std::slice::from_ref(batch))
        .unwrap()
        .to_string();
    let mut rows: Vec<String> = text.lines().skip(3).map(str::to_owned).collect();
    rows.sort();
    rows
}

/// A flush builds the per-hour sketches from its per-minute ones, and those by route number:
/// both must equal the sketches built from every event by route name, over events spanning
/// several hours and routes, some without a route or an upstream latency.
#[tokio::test]
async fn hourly_sketches_from_the_minutes_equal_those_from_the_events() {
    let mut events = varied_events(4_000);
    for (i, e) in events.iter_mut().enumerate() {
        e.ts = chrono::DateTime::from_timestamp_micros(T0 + i as i64 * 3_100_000).unwrap();
        if i % 17 == 0 {
            e.route = None;
        }
    }
    let batch = tollgate_schemas::arrow::to_batch(&events);
    let rollups = rollup::roll_up_batch(&batch).unwrap();
    let hours = |kind| {
        rollups
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, rows)| rows.clone())
            .unwrap()
    };
    let mut direct = rollup::RouteSketches::new(FileKind::RouteSketch1h);
    direct.add(&batch).unwrap();
    let direct = direct.finish();
    assert!(direct.num_rows() >= 6, "{} rows", direct.num_rows());
    assert_eq!(hours(FileKind::RouteSketch1h), direct);
    assert!(hours(FileKind::RouteSketch1m).num_rows() > direct.num_rows());
    // The flush groups minutes by route number; the same as from the events by name.
    let mut minutes = rollup::RouteSketches::new(FileKind::RouteSketch1m);
    minutes.add(&batch).unwrap();
    assert_eq!(hours(FileKind::RouteSketch1m), minutes.finish());
}

/// The flush's rollups are aggregated by hand; they must hold the rows of the SQL rollups over
/// the same events, for events over several hours and days (the coarse grains are summed from
/// the minutes), with anonymous and unrouted requests (null keys) among them.
#[tokio::test]
async fn rollups_built_by_hand_equal_the_sql_rollups() {
    let mut events = varied_events(3 * crate::cpu::STEP_ROWS + 5);
    for (i, e) in events.iter_mut().enumerate() {
        // Some minutes, then some hours, then some days apart, in no order.
        let step = [97_000, 1_900_000_000, 30_000_000_000][i % 3];
        e.ts =
            chrono::DateTime::from_timestamp_micros(T0 + (i as i64 * 7_919 % 400) * step).unwrap();
        e.req_bytes = i as u64 * 13;
        e.resp_bytes = i as u64 * 1_000_003;
        if i % 5 == 0 {
            // A consumer on two plans in one minute: one latency row, two usage rows.
            e.plan = Some("basic".into());
        }
        if i % 13 == 0 {
            (e.consumer, e.plan) = (None, None);
        }
        if i % 17 == 0 {
            e.route = None;
        }
    }
    let batch = tollgate_schemas::arrow::to_batch(&events);
    let by_hand = rollup::roll_up_batch(&batch).unwrap();
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_batch("events", batch.clone()).unwrap();
    let mut compared = 0;
    for (kind, rows) in by_hand {
        if rollup::is_sketch(kind) {
            continue; // compared with the sketches of every event by the test above
        }
        let sql = rollup::roll_up(&ctx, kind).await.unwrap();
        assert!(rows.num_rows() > 1, "{kind:?}: {} rows", rows.num_rows());
        assert_eq!(sorted_rows(&rows), sorted_rows(&sql), "{kind:?}");
        compared += 1;
    }
    assert_eq!(
        compared, 4,
        "usage by minute, hour and day, and latency by minute"
    );
}

#[test]
fn a_file_written_in_steps_reads_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let batch = tollgate_schemas::arrow::to_batch(&varied_events(2 * crate::cpu::STEP_ROWS + 3));
    let entry = files::write_file(dir.path(), T0 / DAY, &batch).unwrap();
    assert_eq!(entry.rows, batch.num_rows() as u64);
    let file = std::fs::File::open(dir.path().join(&entry.path)).unwrap();
    let read: Vec<RecordBatch> =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let read = concat_batches(&batch.schema(), &read).unwrap();
    assert_eq!(read, batch);
}

/// The column chunks of the first row group of a flushed file of `n` varied events.
fn flushed_columns(n: usize) -> Vec<parquet::file::metadata::ColumnChunkMetaData> {
    let dir = tempfile::tempdir().unwrap();
    let batch = tollgate_schemas::arrow::to_batch(&varied_events(n));
    let entry = files::write_file(dir.path(), T0 / DAY, &batch).unwrap();
    let file = std::fs::File::open(dir.path().join(&entry.path)).unwrap();
    let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
    let meta = parquet::file::reader::FileReader::metadata(&reader);
    meta.row_group(0).columns().to_vec()
}

/// Timestamps and latencies are written as deltas, without a dictionary (distinct per row, they
/// only cost the writer its hashing); the rest of the low-cardinality columns keep theirs.
#[test]
fn timestamps_and_latencies_are_written_as_deltas_without_a_dictionary() {
    use parquet::basic::Encoding;
    let columns = flushed_columns(3_000);
    let encodings = |name: &str| {
        let c = columns
            .iter()
            .find(|c| c.column_path().string() == name)
            .unwrap_or_else(|| panic!("no column {name}"));
        (
            c.encodings().collect::<Vec<_>>(),
            c.dictionary_page_offset().is_some(),
        )
    };
    for name in ["ts", "latency_us", "upstream_latency_us"] {
        let (encodings, dictionary) = encodings(name);
        assert!(
            encodings.contains(&Encoding::DELTA_BINARY_PACKED),
            "{name}: {encodings:?}"
        );
        assert!(!dictionary, "{name} has a dictionary page");
    }
    for name in ["consumer", "route", "status"] {
        assert!(encodings(name).1, "{name} has no dictionary page");
    }
}

/// The quota's running tally, kept by appends, must always equal the window's billable
/// requests by consumer as `usage` reads them from the store: through appends before and after
/// it starts, flushes, compactions, a reset (unflushed events dropped and appended again) and
/// a change of window.
#[tokio::test]
async fn the_running_tally_equals_the_usage_through_flushes_compactions_and_resets() {
    let dir = tempfile::tempdir().unwrap();
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    let window = (T0 - DAY, T0 + 3 * DAY);
    let by_usage = |store: ParquetStore, (from_us, to_us): (i64, i64)| async move {
        let filter = Filter {
            from_us,
            to_us,
            consumer: None,
            route: None,
        };
        let rows = store.usage(&filter, &[GroupKey::Consumer]).await.unwrap();
        crate::billable_of_consumers(rows)
    };
    let mut offset = 0u64;
    let mut append = |n: usize, first: i64| {
        let mut events = varied_events(n);
        for (i, e) in events.iter_mut().enumerate() {
            // Inside the window and on both sides of it; some anonymous.
            let t = first + (i as i64 * 7_919 % 500) * 1_000_000_000;
            e.ts = chrono::DateTime::from_timestamp_micros(t).unwrap();
            if i % 13 == 0 {
                e.consumer = None;
            }
        }
        offset += n as u64;
        crate::EventBatch::consecutive(events, 0, offset)
    };
    let check = |store: &ParquetStore, what: &'static str| {
        let store = store.clone();
        async move {
            let running = store
                .billable_by_consumer(window.0, window.1)
                .await
                .unwrap();
            let want = by_usage(store.clone(), window).await;
            assert!(!want.is_empty(), "{what}: nothing counted");
            assert_eq!(*running, want, "{what}");
        }
    };
    store.append(&append(500, T0 - 2 * DAY)).await.unwrap();
    store.flush().await.unwrap();
    store.append(&append(300, T0)).await.unwrap();
    check(&store, "read from files and memory").await;
    store.append(&append(400, T0 + DAY)).await.unwrap();
    check(&store, "appends after the read").await;
    store.flush().await.unwrap();
    store.append(&append(200, T0 + 2 * DAY)).await.unwrap();
    check(&store, "after a flush").await;
    for _ in 0..3 {
        store.append(&append(100, T0)).await.unwrap();
        store.flush().await.unwrap();
    }
    assert!(store.compact().await.unwrap() > 0, "nothing merged");
    check(&store, "after a compaction").await;
    store.append(&append(250, T0)).await.unwrap();
    store.reset().await.unwrap();
    check(&store, "after a reset dropped unflushed events").await;
    store.append(&append(250, T0)).await.unwrap();
    check(&store, "the dropped events appended again").await;
    let other = (T0, T0 + DAY);
    let running = store.billable_by_consumer(other.0, other.1).await.unwrap();
    assert_eq!(
        *running,
        by_usage(store.clone(), other).await,
        "another window"
    );
    store.append(&append(100, T0)).await.unwrap();
    check(&store, "back to the first window").await;
}

/// `events` as files of `per_file` rows each (one row group each), in reverse time order.
fn files_of(dir: &std::path::Path, events: &[RequestEvent], per_file: usize) -> Vec<FileEntry> {
    let mut entries: Vec<FileEntry> = events
        .chunks(per_file)
        .map(|chunk| {
            let batch = tollgate_schemas::arrow::to_batch(chunk);
            files::write_file(dir, T0 / DAY, &batch).unwrap()
        })
        .collect();
    entries.reverse();
    entries
}

fn read_file(path: &std::path::Path) -> RecordBatch {
    let file = std::fs::File::open(path).unwrap();
    let builder =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder.build().unwrap().collect::<Result<_, _>>().unwrap();
    concat_batches(&schema, &batches).unwrap()
}

fn row_groups(path: &std::path::Path) -> Vec<i64> {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
    parquet::file::reader::FileReader::metadata(&reader)
        .row_groups()
        .iter()
        .map(|rg| rg.num_rows())
        .collect()
}

/// 3,000 varied events written as three files of 1,000 rows (one row group each), merged with
/// `copy_min_rows`: the events, the merged file's entry and the path of the merged file.
fn merged_three_files(
    dir: &std::path::Path,
    copy_min_rows: usize,
) -> (Vec<RequestEvent>, FileEntry, std::path::PathBuf) {
    let events = varied_events(3_000);
    let inputs = files_of(dir, &events, 1_000);
    let schema = tollgate_schemas::arrow::schema();
    let merged = files::merge_files(
        dir,
        T0 / DAY,
        &inputs,
        schema,
        Default::default(),
        copy_min_rows,
    )
    .unwrap();
    let path = dir.join(&merged.path);
    (events, merged, path)
}

/// Large row groups are copied into a merged file as they are (no decoding, `COPY_MIN_ROWS`),
/// in time order, with statistics and page indexes that still point at their pages: a reader
/// that skips pages by the offset index reads the right rows.
#[test]
fn merges_of_large_row_groups_copy_them_with_their_page_indexes() {
    use parquet::arrow::arrow_reader::{
        ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
    };
    let dir = tempfile::tempdir().unwrap();
    let (events, merged, path) = merged_three_files(dir.path(), 1_000);
    assert_eq!(
        row_groups(&path),
        vec![1_000; 3],
        "the row groups were not copied"
    );
    assert_eq!(merged.rows, 3_000);
    assert_eq!(merged.min_ts_us, T0);
    assert_eq!(merged.max_ts_us, T0 + 2_999 * 97_000);
    let whole = tollgate_schemas::arrow::to_batch(&events);
    assert_eq!(read_file(&path), whole);

    // The second row group's `ts` statistics are its own rows'.
    let file = std::fs::File::open(&path).unwrap();
    let options = ArrowReaderOptions::new()
        .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Required);
    let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options).unwrap();
    let meta = builder.metadata().clone();
    let ts = meta
        .row_group(1)
        .columns()
        .iter()
        .position(|c| c.column_path().string() == "ts");
    let stats = meta.row_group(1).column(ts.unwrap()).statistics().unwrap();
    let min = T0 + 1_000 * 97_000;
    assert_eq!(stats.min_bytes_opt().unwrap(), min.to_le_bytes());
    assert_eq!(
        meta.offset_index().map(|o| o.len()),
        Some(3),
        "no offset index"
    );
    assert!(meta.column_index().is_some(), "no column index");

    // Rows 1,500..1,600 read through the offset index (whole pages skipped).
    let selection = RowSelection::from(vec![RowSelector::skip(1_500), RowSelector::select(100)]);
    let read: Vec<RecordBatch> = builder
        .with_row_selection(selection)
        .build()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let read = concat_batches(&whole.schema(), &read).unwrap();
    assert_eq!(read, whole.slice(1_500, 100));
}

/// Small row groups are decoded and encoded anew, into row groups of equal size that a later
/// merge can copy.
#[test]
fn merges_of_small_row_groups_are_encoded_anew_in_equal_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let (events, _, path) = merged_three_files(dir.path(), 1_001);
    assert_eq!(row_groups(&path), vec![3_000]);
    assert_eq!(read_file(&path), tollgate_schemas::arrow::to_batch(&events));
    assert_eq!(files::balanced_row_group(140_000), 70_000);
    assert_eq!(files::balanced_row_group(128 * 1024), 128 * 1024);
    assert_eq!(files::balanced_row_group(3 * 128 * 1024 + 1), 98_305);
    assert_eq!(files::balanced_row_group(0), 1);
}

/// A flush's events file is written in row groups of at most twice `COPY_MIN_ROWS`, of equal
/// size, so the writer never holds a whole large flush encoded, and every group is still large
/// enough for compaction to copy.
#[test]
fn a_large_flush_is_written_in_equal_row_groups_that_compaction_copies() {
    assert_eq!(files::flush_row_group(100_000), 50_000);
    assert_eq!(files::flush_row_group(64 * 1024), 64 * 1024);
    assert_eq!(files::flush_row_group(64 * 1024 + 1), 32 * 1024 + 1);
    assert_eq!(files::flush_row_group(10), 10);
    assert_eq!(files::flush_row_group(0), 1);

    let dir = tempfile::tempdir().unwrap();
    let events = varied_events(66_000);
    let batches = [
        tollgate_schemas::arrow::to_batch(&events[..40_000]),
        tollgate_schemas::arrow::to_batch(&events[40_000..]),
    ];
    let entry = files::write_events(dir.path(), T0 / DAY, &batches).unwrap();
    let path = dir.path().join(&entry.path);
    assert_eq!(row_groups(&path), vec![33_000, 33_000]);
    const { assert!(33_000 >= files::COPY_MIN_ROWS) };
    assert_eq!(entry.rows, 66_000);
    assert_eq!(read_file(&path), tollgate_schemas::arrow::to_batch(&events));
}

/// A flush's data pages are cut at about `DATA_PAGE_BYTES`, not the writer's default of 1 MiB:
/// each page is compressed in one call, and a large page was the longest run ingest made
/// without offering its core. A page may pass the limit by what the writer adds before it
/// looks again (up to 1,024 values), so the bound checked is twice the limit.
#[test]
fn a_flush_cuts_its_data_pages_small() {
    use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
    let dir = tempfile::tempdir().unwrap();
    let events = varied_events(40_000);
    let batches = [tollgate_schemas::arrow::to_batch(&events)];
    let entry = files::write_events(dir.path(), T0 / DAY, &batches).unwrap();
    let file = std::fs::File::open(dir.path().join(&entry.path)).unwrap();
    let options = ArrowReaderOptions::new()
        .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Required);
    let meta = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)
        .unwrap()
        .metadata()
        .clone();
    let columns = meta.row_group(0).columns();
    let offsets = &meta.offset_index().expect("no offset index")[0];
    let mut pages = 0;
    for (column, index) in columns.iter().zip(offsets) {
        for page in index.page_locations() {
            pages += 1;
            assert!(
                page.compressed_page_size as usize <= 2 * files::DATA_PAGE_BYTES,
                "a page of {} bytes in {}",
                page.compressed_page_size,
                column.column_path().string()
            );
        }
    }
    // Some column is large enough to need several pages, so the bound says something.
    assert!(
        pages > columns.len(),
        "{pages} pages for {} columns",
        columns.len()
    );
}

/// Statistics are kept on the columns queries filter on (`ts`, `route`, `consumer`) and left
/// out of text columns no query filters on, where computing them only cost the flush.
#[test]
fn statistics_are_written_only_where_queries_filter() {
    let columns = flushed_columns(1_000);
    let has_statistics = |name: &str| {
        columns
            .iter()
            .find(|c| c.column_path().string() == name)
            .unwrap_or_else(|| panic!("no column {name}"))
            .statistics()
            .is_some_and(|s| s.min_bytes_opt().is_some())
    };
    for name in ["ts", "route", "consumer", "status"] {
        assert!(has_statistics(name), "{name} has no statistics");
    }
    for name in ["id", "path", "trace_id", "outcome"] {
        assert!(!has_statistics(name), "{name} has statistics");
    }
}

/// Recorded progress is in `progress.json` before readers see it, survives a reopen, and only
/// moves forward.
#[tokio::test]
async fn recorded_progress_persists_and_only_moves_forward() {
    use crate::{EventWriter, PartitionProgress, UsageQuery};
    let dir = tempfile::tempdir().unwrap();
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    let at = |partition, caught_up_us| PartitionProgress {
        partition,
        partitions: 2,
        caught_up_us,
    };
    store
        .record_progress(&[at(0, 100), at(1, 50)])
        .await
        .unwrap();
    store.record_progress(&[at(0, 90)]).await.unwrap();
    let mut seen = store.progress().await.unwrap();
    seen.sort_by_key(|p| p.partition);
    assert_eq!(seen, vec![at(0, 100), at(1, 50)]);
    drop(store);
    let store = ParquetStore::open(cfg(dir.path())).unwrap();
    let mut reopened = store.progress().await.unwrap();
    reopened.sort_by_key(|p| p.partition);
    assert_eq!(reopened, seen);
}
