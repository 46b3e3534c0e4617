//! The Grafana dashboards (`dashboards/grafana/*.json`): every panel's query runs against a
//! ClickHouse server holding test events written by the store (its migrations and rollups), with
//! the data source's time macros expanded as the plugin does, and returns rows.
#![cfg(feature = "clickhouse")]

use std::path::PathBuf;

use tollgate_schemas::{Outcome, RequestEvent};
use tollgate_store::{ClickHouseCompression, ClickHouseConfig, EventBatch, StoreConfig};

fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn event(i: u64, now: chrono::DateTime<chrono::Utc>) -> RequestEvent {
    let routes = ["orders-get", "search", "payments"];
    let status = if i.is_multiple_of(7) { 503 } else { 200 };
    RequestEvent {
        v: 1,
        id: uuid::Uuid::now_v7(),
        ts: now - chrono::Duration::seconds(10 + (i as i64 * 37) % 3000),
        gateway: "gw".into(),
        route: Some(routes[(i % 3) as usize].into()),
        method: "GET".into(),
        path: "/x".into(),
        status,
        latency_us: 500 + (i * 7_919) % 90_000,
        upstream_latency_us: Some(400),
        req_bytes: 10,
        resp_bytes: 100,
        consumer: Some(format!("c{}", i % 4)),
        plan: Some(if i.is_multiple_of(2) { "pro" } else { "free" }.into()),
        outcome: if status < 500 {
            Outcome::Ok
        } else {
            Outcome::UpstreamError
        },
        billable: status < 500,
        trace_id: None,
    }
}

#[tokio::test]
async fn every_grafana_panel_query_returns_rows() {
    let server = tollgate_testkit::ClickHouse::start();
    let store = StoreConfig::Clickhouse(ClickHouseConfig {
        url: server.url(),
        database: "grafana".into(),
        user: None,
        password: None,
        compression: ClickHouseCompression::Lz4,
    })
    .open()
    .await
    .unwrap();
    let now = chrono::Utc::now();
    let events: Vec<RequestEvent> = (0..500).map(|i| event(i, now)).collect();
    store
        .writer
        .append(&EventBatch::consecutive(events, 0, 500))
        .await
        .unwrap();
    store.writer.flush().await.unwrap();

    // The plugin's `$__fromTime` / `$__toTime`: the dashboard's range as DateTime literals.
    let (from, to) = (now.timestamp() - 6 * 3600, now.timestamp() + 60);
    let mut panels = 0;
    let dir = root().join("dashboards/grafana");
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in d["panels"].as_array().unwrap() {
            assert_eq!(
                panel["datasource"]["uid"],
                "tollgate-clickhouse",
                "{}: {}",
                path.display(),
                panel["title"]
            );
            for target in panel["targets"].as_array().unwrap() {
                let sql = target["rawSql"]
                    .as_str()
                    .unwrap()
                    .replace("$__fromTime", &format!("toDateTime({from})"))
                    .replace("$__toTime", &format!("toDateTime({to})"));
                let rows = server.query_in("grafana", &sql);
                assert!(
                    !rows.trim().is_empty(),
                    "{} / {}: no rows from\n{sql}",
                    path.display(),
                    panel["title"]
                );
                panels += 1;
            }
        }
    }
    assert!(panels >= 10, "only {panels} panel queries found");
}
