//! The data-driven store conformance suite: each file in `tests/cases/` seeds events and lists
//! the exact rows (and latency quantiles, within the sketch's stated error) every query must
//! return. It runs against each backend and storage path: the Parquet store answering from
//! memory (before a flush), from Parquet files (after a flush), and from compacted files.

use serde::Deserialize;
use serde_json::Value;
use tollgate_schemas::{Checkpoint, Outcome, RequestEvent};
use tollgate_store::sketch::RELATIVE_ERROR;
use tollgate_store::{
    EventBatch, EventWriter, Filter, GroupKey, KeyValue, LatencyQuery, ParquetConfig, ParquetStore,
    UsageQuery,
};

#[derive(Deserialize)]
struct Case {
    events: Vec<EventSpec>,
    usage: Vec<UsageCase>,
    latency: Vec<LatencyCase>,
}

#[derive(Deserialize)]
struct EventSpec {
    ts: String,
    consumer: Option<String>,
    plan: Option<String>,
    route: Option<String>,
    status: u16,
    latency_us: u64,
    #[serde(default)]
    req_bytes: u64,
    #[serde(default)]
    resp_bytes: u64,
    #[serde(default = "yes")]
    billable: bool,
    #[serde(default = "yes")]
    forwarded: bool,
    #[serde(default = "one")]
    repeat: usize,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}

#[derive(Deserialize)]
struct UsageCase {
    from: String,
    to: String,
    consumer: Option<String>,
    route: Option<String>,
    group_by: Vec<GroupKey>,
    rows: Vec<Value>,
}

#[derive(Deserialize)]
struct LatencyCase {
    from: String,
    to: String,
    route: Option<String>,
    step_s: Option<i64>,
    #[serde(default)]
    by_consumer: bool,
    expect: Vec<LatencyExpect>,
}

#[derive(Deserialize)]
struct LatencyExpect {
    route: String,
    consumer: Option<String>,
    t: String,
    count: u64,
    errors: u64,
    quantiles_us: std::collections::BTreeMap<String, f64>,
}

fn us(t: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(t)
        .unwrap()
        .timestamp_micros()
}

fn events(case: &Case) -> Vec<RequestEvent> {
    let mut out = Vec::new();
    for e in &case.events {
        for _ in 0..e.repeat {
            let outcome = match e.status {
                404 => Outcome::NotFound,
                401 => Outcome::Unauthorized,
                s if s >= 500 => Outcome::UpstreamError,
                _ => Outcome::Ok,
            };
            out.push(RequestEvent {
                v: 1,
                id: uuid::Uuid::now_v7(),
                ts: chrono::DateTime::from_timestamp_micros(us(&e.ts)).unwrap(),
                gateway: "conformance".into(),
                route: e.route.clone(),
                method: "GET".into(),
                path: "/".into(),
                status: e.status,
                latency_us: e.latency_us,
                upstream_latency_us: e.forwarded.then_some(e.latency_us),
                req_bytes: e.req_bytes,
                resp_bytes: e.resp_bytes,
                consumer: e.consumer.clone(),
                plan: e.plan.clone(),
                outcome,
                billable: e.billable,
                trace_id: None,
            });
        }
    }
    out
}

fn key_json(k: &KeyValue) -> Value {
    match k {
        KeyValue::Null => Value::Null,
        KeyValue::Text(s) => s.clone().into(),
        KeyValue::Int(i) => (*i).into(),
    }
}

async fn check(name: &str, store: &dyn UsageQuery, case: &Case) {
    for (i, u) in case.usage.iter().enumerate() {
        let f = Filter {
            from_us: us(&u.from),
            to_us: us(&u.to),
            consumer: u.consumer.clone(),
            route: u.route.clone(),
        };
        let rows = store.usage(&f, &u.group_by).await.unwrap();
        let got: Vec<Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "keys": r.keys.iter().map(key_json).collect::<Vec<_>>(),
                    "requests": r.requests, "billable_requests": r.billable_requests,
                    "req_bytes": r.req_bytes, "resp_bytes": r.resp_bytes,
                })
            })
            .collect();
        assert_eq!(got, u.rows, "{name}: usage query #{i}");
        // The quota's tally of the same window: `usage` by consumer, anonymous left out.
        let (from_us, to_us) = (f.from_us, f.to_us);
        let window = Filter {
            from_us,
            to_us,
            consumer: None,
            route: None,
        };
        let by_consumer = store.usage(&window, &[GroupKey::Consumer]).await.unwrap();
        let want = tollgate_store::billable_of_consumers(by_consumer);
        let tally = store.billable_by_consumer(from_us, to_us).await.unwrap();
        assert_eq!(
            *tally, want,
            "{name}: billable by consumer, usage query #{i}"
        );
    }
    for (i, l) in case.latency.iter().enumerate() {
        let q = LatencyQuery {
            filter: Filter {
                from_us: us(&l.from),
                to_us: us(&l.to),
                consumer: None,
                route: l.route.clone(),
            },
            step_us: l.step_s.map(|s| s * 1_000_000),
            by_consumer: l.by_consumer,
            quantiles: asked(&l.expect),
        };
        let rows = store.latency(&q).await.unwrap();
        assert_eq!(
            rows.len(),
            l.expect.len(),
            "{name}: latency query #{i}: {rows:?}"
        );
        for (r, e) in rows.iter().zip(&l.expect) {
            assert_eq!(
                (&r.route, &r.consumer, r.t_us),
                (&e.route, &e.consumer, us(&e.t)),
                "{name}: latency #{i}"
            );
            assert_eq!(
                (r.count, r.errors),
                (e.count, e.errors),
                "{name}: latency #{i} {}",
                e.route
            );
            for (level, want) in &e.quantiles_us {
                let level: f64 = level.parse().unwrap();
                let at = q.quantiles.iter().position(|x| *x == level).unwrap();
                let got = r.quantiles_us[at];
                assert!(
                    (got - want).abs() <= want * RELATIVE_ERROR,
                    "{name}: latency #{i} {} p{level}: {got} vs {want}",
                    e.route
                );
            }
        }
    }
}

/// Every quantile a latency case's expectations name, once each.
fn asked(expect: &[LatencyExpect]) -> Vec<f64> {
    let mut levels: Vec<f64> = expect
        .iter()
        .flat_map(|e| e.quantiles_us.keys().map(|k| k.parse::<f64>().unwrap()))
        .collect();
    levels.sort_by(f64::total_cmp);
    levels.dedup();
    levels
}

#[tokio::test]
async fn parquet_store_passes_every_case() {
    for path in case_files() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let case: Case = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let evs = events(&case);
        let open = |dir: &std::path::Path| {
            ParquetStore::open(ParquetConfig {
                dir: dir.to_path_buf(),
                compact_min_files: 2,
                compact_max_rows: 1_000_000,
            })
            .unwrap()
        };
        let tmp = tempfile::tempdir().unwrap();
        let memory_only = open(&tmp.path().join("memory"));
        memory_only
            .append(&EventBatch {
                events: evs.to_vec(),
                positions: vec![],
                through: Checkpoint([(0, 1)].into()),
            })
            .await
            .unwrap();
        check(&format!("{name} (memory)"), &memory_only, &case).await;

        let store = open(&tmp.path().join("files"));
        // Two appends, so that compaction has files to merge.
        let (a, b) = evs.split_at(evs.len() / 2);
        store
            .append(&EventBatch {
                events: a.to_vec(),
                positions: vec![],
                through: Checkpoint([(0, 1)].into()),
            })
            .await
            .unwrap();
        store.flush().await.unwrap();
        store
            .append(&EventBatch {
                events: b.to_vec(),
                positions: vec![],
                through: Checkpoint([(0, 2)].into()),
            })
            .await
            .unwrap();
        check(&format!("{name} (parquet + memory)"), &store, &case).await;
        store.flush().await.unwrap();
        check(&format!("{name} (parquet)"), &store, &case).await;
        store.compact().await.unwrap();
        check(&format!("{name} (compacted)"), &store, &case).await;
    }
}

/// The same cases against a real ClickHouse server (Debian's 18.16 here): rollups answer whole
/// minutes, the raw table the edges; one database per case.
#[cfg(feature = "clickhouse")]
#[tokio::test]
async fn clickhouse_store_passes_every_case() {
    use tollgate_store::StoreConfig;
    use tollgate_store::clickhouse::ClickHouseConfig;

    let server = tollgate_testkit::ClickHouse::start();
    for (i, path) in case_files().into_iter().enumerate() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let case: Case = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let evs = events(&case);
        let store = StoreConfig::Clickhouse(ClickHouseConfig {
            url: server.url(),
            database: format!("conformance_{i}"),
            user: None,
            password: None,
            compression: tollgate_store::ClickHouseCompression::Lz4,
        })
        .open()
        .await
        .unwrap();
        // Two batches on two partitions, as two collectors would write them.
        let (a, b) = evs.split_at(evs.len() / 2);
        let first = EventBatch::consecutive(a.to_vec(), 0, a.len() as u64);
        let second = EventBatch::consecutive(b.to_vec(), 1, b.len() as u64);
        store.writer.append(&first).await.unwrap();
        store.writer.append(&second).await.unwrap();
        check(&format!("{name} (clickhouse)"), &*store.query, &case).await;
        // The same answers once every period has its compacted sketch (what the collectors'
        // upkeep builds), and again once a compacted period changed after compaction.
        let compactor = tollgate_store::clickhouse::ClickHouseStore::connect(&ClickHouseConfig {
            url: server.url(),
            database: format!("conformance_{i}"),
            user: None,
            password: None,
            compression: tollgate_store::ClickHouseCompression::None,
        })
        .await
        .unwrap();
        compactor
            .compact_sketches(i64::MIN, i64::MAX)
            .await
            .unwrap();
        check(
            &format!("{name} (clickhouse, compacted)"),
            &*store.query,
            &case,
        )
        .await;
    }
}

fn case_files() -> Vec<std::path::PathBuf> {
    // The runner's CARGO_MANIFEST_DIR first: a test binary built in another checkout and found
    // fresh would carry that checkout's path in `env!`.
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .join("tests/cases");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}
