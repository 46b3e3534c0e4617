//! The ClickHouse backend against a real server: the exactly-once resume, migrations on an
//! existing database, and the DDL checked against the JSON Schema.
#![cfg(feature = "clickhouse")]

use tollgate_schemas::{Outcome, RequestEvent};
use tollgate_store::clickhouse::{ClickHouseConfig, MIGRATIONS, migrations};
use tollgate_store::{EventBatch, Position, StoreConfig};

fn config(server: &tollgate_testkit::ClickHouse, db: &str) -> StoreConfig {
    StoreConfig::Clickhouse(ClickHouseConfig {
        url: server.url(),
        database: db.into(),
        user: None,
        password: None,
        compression: tollgate_store::ClickHouseCompression::None,
    })
}

fn event(i: u64) -> RequestEvent {
    RequestEvent {
        v: 1,
        id: uuid::Uuid::now_v7(),
        ts: chrono::DateTime::from_timestamp_micros(1_790_000_000_000_000 + i as i64 * 1000)
            .unwrap(),
        gateway: "g".into(),
        route: Some("r".into()),
        method: "GET".into(),
        path: "/".into(),
        status: 200,
        latency_us: 1000 + i,
        upstream_latency_us: Some(900),
        req_bytes: 1,
        resp_bytes: 2,
        consumer: Some("c".into()),
        plan: Some("p".into()),
        outcome: Outcome::Ok,
        billable: true,
        trace_id: None,
    }
}

fn batch(partition: u32, offsets: std::ops::Range<u64>) -> EventBatch {
    let events: Vec<RequestEvent> = offsets.clone().map(event).collect();
    let positions = offsets
        .clone()
        .map(|offset| Position { partition, offset })
        .collect();
    EventBatch {
        events,
        positions,
        through: tollgate_schemas::Checkpoint([(partition, offsets.end)].into()),
    }
}

#[tokio::test]
async fn resume_reports_exactly_the_stored_positions() {
    let server = tollgate_testkit::ClickHouse::start();
    let store = config(&server, "resume").open().await.unwrap();
    store.writer.append(&batch(3, 0..10)).await.unwrap();
    // A batch after a gap (what a killed collector's successor can leave behind).
    store.writer.append(&batch(3, 15..20)).await.unwrap();
    store.writer.append(&batch(4, 0..5)).await.unwrap();

    let r = store.writer.resume(3, 0).await.unwrap();
    assert_eq!(r.stored_through, 10);
    assert_eq!(r.stored_after, (15..20).collect());
    assert!(r.is_stored(9) && !r.is_stored(10) && r.is_stored(16) && !r.is_stored(20));
    // The bus commit ahead of the contiguous run: start there.
    let r = store.writer.resume(3, 12).await.unwrap();
    assert_eq!((r.stored_through, r.stored_after.len()), (12, 5));
    let r = store.writer.resume(7, 0).await.unwrap();
    assert_eq!((r.stored_through, r.stored_after.len()), (0, 0));
    assert!(store.writer.durable_on_append());
    assert_eq!(
        store.writer.flush().await.unwrap(),
        tollgate_schemas::Checkpoint([(3, 20), (4, 5)].into())
    );
    assert_eq!(
        server.query("SELECT count() FROM resume.events").trim(),
        "20"
    );
}

/// A collector taking a partition over seeds its deduplication window with the ids stored
/// just before where it resumes: read by position, oldest first, that partition's only.
#[tokio::test]
async fn recent_ids_are_the_stored_ones_just_before_a_position() {
    let server = tollgate_testkit::ClickHouse::start();
    let store = config(&server, "recent").open().await.unwrap();
    let first = batch(3, 0..10);
    store.writer.append(&first).await.unwrap();
    store.writer.append(&batch(4, 0..10)).await.unwrap();
    let ids = |r: std::ops::Range<usize>| -> Vec<u128> {
        first.events[r].iter().map(|e| e.id.as_u128()).collect()
    };
    assert_eq!(store.writer.recent_ids(3, 10, 4).await.unwrap(), ids(6..10));
    assert_eq!(store.writer.recent_ids(3, 7, 3).await.unwrap(), ids(4..7));
    assert_eq!(store.writer.recent_ids(3, 3, 100).await.unwrap(), ids(0..3));
    assert_eq!(
        store.writer.recent_ids(3, 0, 5).await.unwrap(),
        Vec::<u128>::new()
    );
    assert_eq!(
        store.writer.recent_ids(5, 10, 5).await.unwrap(),
        Vec::<u128>::new()
    );
}

#[tokio::test]
async fn migrations_upgrade_an_existing_database_once() {
    let server = tollgate_testkit::ClickHouse::start();
    // A database at migration 1 (an older release), holding data.
    server.query("CREATE DATABASE up");
    server.query(
        "CREATE TABLE up.tollgate_migrations (version UInt32, name String, applied_at DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY version",
    );
    for s in migrations::statements(MIGRATIONS[0].2, "up") {
        server.query(&s);
    }
    server.query("INSERT INTO up.tollgate_migrations (version, name) VALUES (1, 'events')");
    let store = config(&server, "up").open().await.unwrap();
    store.writer.append(&batch(0, 0..3)).await.unwrap();
    let versions = server.query("SELECT version FROM up.tollgate_migrations ORDER BY version");
    let want: Vec<String> = MIGRATIONS.iter().map(|m| m.0.to_string()).collect();
    assert_eq!(versions.lines().collect::<Vec<_>>(), want);
    // The rollups of the new migration fill from then on.
    assert_eq!(
        server.query("SELECT sum(requests) FROM up.usage_1m").trim(),
        "3"
    );
    // Opening again applies nothing twice.
    drop(store);
    config(&server, "up").open().await.unwrap();
    let again = server.query("SELECT count() FROM up.tollgate_migrations");
    assert_eq!(again.trim(), MIGRATIONS.len().to_string());
}

/// A database that held events before the coarse rollups (migration 0003) existed: the new
/// views take events from the next midnight on, windows before it are answered from the
/// per-minute rollups, and every event counts exactly once.
#[tokio::test]
async fn coarse_rollups_added_to_a_database_with_events_count_each_event_once() {
    use tollgate_store::{Filter, GroupKey, LatencyQuery};
    let server = tollgate_testkit::ClickHouse::start();
    server.query("CREATE DATABASE old");
    server.query(
        "CREATE TABLE old.tollgate_migrations (version UInt32, name String, applied_at DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY version",
    );
    for (version, name, sql) in &MIGRATIONS[..2] {
        for s in migrations::statements(sql, "old") {
            server.query(&s);
        }
        server.query(&format!(
            "INSERT INTO old.tollgate_migrations (version, name) VALUES ({version}, '{name}')"
        ));
    }
    server.query(
        "INSERT INTO old.events (bus_partition, bus_offset, v, id, ts_us, gateway, route, method, path, \
         status, latency_us, upstream_latency_us, req_bytes, resp_bytes, consumer, plan, outcome, billable, \
         latency_bucket) VALUES (1, 0, 1, 'e0', 1790000000000000, 'g', 'r', 'GET', '/', 200, 1000, 900, \
         1, 2, 'c', 'p', 'ok', 1, 691)",
    );
    let store = config(&server, "old").open().await.unwrap();
    let since: i64 = server
        .query("SELECT max(since_us) FROM old.tollgate_rollup_since")
        .trim()
        .parse()
        .unwrap();
    let now = chrono::Utc::now().timestamp_micros();
    assert!(since > now && since - now <= 86_400_000_000, "{since}");
    assert_eq!(since % 86_400_000_000, 0);
    // Three events before that midnight, four after it.
    store.writer.append(&batch(0, 0..3)).await.unwrap();
    let mut later = batch(2, 0..4);
    for (i, e) in later.events.iter_mut().enumerate() {
        e.ts = chrono::DateTime::from_timestamp_micros(since + 3_600_000_000 + i as i64).unwrap();
    }
    store.writer.append(&later).await.unwrap();
    assert_eq!(
        server
            .query("SELECT sum(requests) FROM old.usage_1d")
            .trim(),
        "4",
        "the day rollup holds only what came after `since`"
    );
    let window = Filter {
        from_us: 0,
        to_us: since + 2 * 86_400_000_000,
        ..Default::default()
    };
    let usage = store
        .query
        .usage(&window, &[GroupKey::Consumer])
        .await
        .unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!((usage[0].requests, usage[0].req_bytes), (8, 8));
    let latency = store
        .query
        .latency(&LatencyQuery {
            filter: window,
            step_us: Some(86_400_000_000),
            by_consumer: false,
            quantiles: vec![0.0, 1.0],
        })
        .await
        .unwrap();
    let counts: Vec<u64> = latency.iter().map(|r| r.count).collect();
    assert_eq!(counts.iter().sum::<u64>(), 8, "{latency:?}");
    assert_eq!(latency.last().unwrap().count, 4, "the day after `since`");
}

/// Every property of the JSON Schema is a column of `events` with a type that holds it, and
/// nothing else is there but the bus position and the sketch bucket.
#[tokio::test]
async fn the_events_table_agrees_with_the_json_schema() {
    let server = tollgate_testkit::ClickHouse::start();
    config(&server, "ddl").open().await.unwrap();
    let columns: std::collections::BTreeMap<String, String> = server
        .query("SELECT name, type FROM system.columns WHERE database = 'ddl' AND table = 'events'")
        .lines()
        .map(|l| {
            let (n, t) = l.split_once('\t').unwrap();
            (n.to_string(), t.to_string())
        })
        .collect();
    let schema: serde_json::Value =
        serde_json::from_str(tollgate_schemas::REQUEST_EVENT_V1_SCHEMA).unwrap();
    let props = schema["properties"].as_object().unwrap();
    for (name, spec) in props {
        // `ts` is an RFC 3339 string on the wire and microseconds (`ts_us`) in the table.
        if name == "ts" {
            continue;
        }
        let ty = columns
            .get(name)
            .unwrap_or_else(|| panic!("schema property `{name}` has no column"));
        let (json_ty, nullable) = match &spec["type"] {
            serde_json::Value::String(t) => (t.as_str(), false),
            serde_json::Value::Array(ts) => (
                ts.iter()
                    .find(|t| *t != "null")
                    .and_then(|t| t.as_str())
                    .unwrap(),
                ts.iter().any(|t| t == "null"),
            ),
            other => panic!("{name}: unexpected type {other}"),
        };
        assert_eq!(ty.starts_with("Nullable("), nullable, "{name}: {ty}");
        let inner = ty.trim_start_matches("Nullable(").trim_end_matches(')');
        let max = spec["maximum"].as_f64();
        let ok = match json_ty {
            "string" => inner == "String",
            "boolean" => inner == "UInt8",
            "integer" => match max {
                Some(m) if m <= 255.0 => inner == "UInt8",
                Some(m) if m <= 65535.0 => inner == "UInt16",
                _ => inner == "UInt64",
            },
            _ => false,
        };
        assert!(
            ok,
            "{name}: JSON type {json_ty} (max {max:?}) stored as {ty}"
        );
    }
    assert_eq!(columns.get("ts_us").map(String::as_str), Some("Int64"));
    let extra: Vec<&String> = columns
        .keys()
        .filter(|c| !props.contains_key(c.as_str()))
        .collect();
    assert_eq!(
        extra,
        ["bus_offset", "bus_partition", "latency_bucket", "ts_us"],
        "columns beyond the schema"
    );
}

/// An event of route `r` at `minute` (minutes after a fixed UTC midnight) with this latency.
fn timed(minute: i64, latency_us: u64) -> RequestEvent {
    let mut e = event(0);
    e.ts = chrono::DateTime::from_timestamp_micros(MIDNIGHT_US + minute * 60_000_000 + 7).unwrap();
    e.latency_us = latency_us;
    e
}

const MIDNIGHT_US: i64 = 1_790_035_200_000_000; // 2026-09-22T00:00:00Z

/// The latency per minute that every backend must report: the sketch of all `events`.
fn expected(events: &[RequestEvent], levels: &[f64]) -> Vec<(i64, u64, Vec<f64>)> {
    let mut per_minute: std::collections::BTreeMap<i64, tollgate_store::sketch::LogHistogram> =
        Default::default();
    for e in events {
        let t = e.ts.timestamp_micros().div_euclid(60_000_000) * 60_000_000;
        per_minute.entry(t).or_default().record(e.latency_us);
    }
    per_minute
        .into_iter()
        .map(|(t, h)| {
            let q = levels.iter().map(|l| h.quantile(*l).unwrap()).collect();
            (t, h.count(), q)
        })
        .collect()
}

async fn per_minute(
    query: &dyn tollgate_store::UsageQuery,
    levels: &[f64],
) -> Vec<(i64, u64, Vec<f64>)> {
    let q = tollgate_store::LatencyQuery {
        filter: tollgate_store::Filter {
            from_us: MIDNIGHT_US,
            to_us: MIDNIGHT_US + 86_400_000_000,
            consumer: None,
            route: None,
        },
        step_us: Some(60_000_000),
        by_consumer: false,
        quantiles: levels.to_vec(),
    };
    query
        .latency(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.t_us, r.count, r.quantiles_us))
        .collect()
}

/// Per-minute quantiles at levels that are all precomputed in compacted sketches, and at
/// levels that are not (read from the sketches themselves).
const PRECOMPUTED: [f64; 3] = [0.5, 0.9, 0.99];
const OTHER: [f64; 3] = [0.25, 0.5, 0.999];

#[tokio::test]
async fn compacted_sketches_answer_only_while_they_match_the_counts() {
    let server = tollgate_testkit::ClickHouse::start();
    let cfg = ClickHouseConfig {
        url: server.url(),
        database: "sketches".into(),
        user: None,
        password: None,
        compression: tollgate_store::ClickHouseCompression::None,
    };
    let store = StoreConfig::Clickhouse(cfg.clone()).open().await.unwrap();
    let compactor = tollgate_store::clickhouse::ClickHouseStore::connect(&cfg)
        .await
        .unwrap();
    let answers =
        |events: &[RequestEvent]| (expected(events, &PRECOMPUTED), expected(events, &OTHER));
    let query = || async {
        (
            per_minute(&*store.query, &PRECOMPUTED).await,
            per_minute(&*store.query, &OTHER).await,
        )
    };
    // Three minutes and, in the next hour, a fourth, with latencies spread over many buckets.
    let mut events: Vec<RequestEvent> = (0..600u64)
        .map(|i| timed([0, 1, 2, 61][i as usize % 4], 1_000 + i * 397 % 90_000))
        .collect();
    let n = events.len() as u64;
    store
        .writer
        .append(&EventBatch::consecutive(events.clone(), 0, n))
        .await
        .unwrap();
    let want = answers(&events);
    assert_eq!(want.0.len(), 4);
    assert_eq!(query().await, want, "from buckets");

    // Four minutes and two hours compacted; the same answers.
    assert_eq!(
        compactor
            .compact_sketches(i64::MIN, i64::MAX)
            .await
            .unwrap(),
        6
    );
    assert_eq!(
        compactor
            .compact_sketches(i64::MIN, i64::MAX)
            .await
            .unwrap(),
        0
    );
    assert_eq!(query().await, want, "from sketches");

    // The compacted rows are what answers: one replaced by a different one with the same total
    // is reported (only a test can make a sketch disagree with its buckets).
    let total = want.0[0].1;
    let fake = tollgate_store::sketch::encode([(100i32, total)]);
    let hex: String = fake.iter().map(|b| format!("{b:02x}")).collect();
    server.query(&format!(
        "INSERT INTO sketches.route_sketch SELECT 60000000, 'r', {MIDNIGHT_US}, {total}, 0, \
         unhex('{hex}'), [100, 100, 100, 100, 100, 100]"
    ));
    server.query("OPTIMIZE TABLE sketches.route_sketch FINAL");
    let (precomputed, other) = query().await;
    let faked = vec![tollgate_store::sketch::bucket_value(100); 3];
    assert_eq!((&precomputed[0].2, &other[0].2), (&faked, &faked));
    assert_eq!(
        (&precomputed[1..], &other[1..]),
        (&want.0[1..], &want.1[1..])
    );

    // Late events into the first minute: its sketch no longer matches, buckets answer it.
    let late: Vec<RequestEvent> = (0..50u64).map(|i| timed(0, 150_000 + i * 1_000)).collect();
    store
        .writer
        .append(&EventBatch::consecutive(late.clone(), 1, 50))
        .await
        .unwrap();
    events.extend(late);
    let want = answers(&events);
    assert_eq!(query().await, want, "late events");
    // The next round rebuilds that minute and its hour only.
    assert_eq!(
        compactor
            .compact_sketches(i64::MIN, i64::MAX)
            .await
            .unwrap(),
        2
    );
    assert_eq!(query().await, want, "recompacted");
}
