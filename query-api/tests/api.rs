//! The query API over a real store seeded with known events: revenue over arbitrary windows
//! (tiers cumulative within a month, reset at the month), billing exports in every format, quota
//! state, and the error rules. Every test runs on the Parquet store and, with the `clickhouse`
//! feature, on a ClickHouse server: counts and money must be identical.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use rust_decimal::Decimal;
use serde_json::Value;
use tollgate_query_api::{AppState, QueryApiConfig, router};
use tollgate_schemas::config::{Charge, Consumer, Plan, Pricing, Quota, Tier, TierMode};
use tollgate_schemas::{Outcome, RequestEvent};
use tollgate_store::{ParquetConfig, StoreConfig};
use tower::ServiceExt;

const ADMIN: &str = "admin-token-0123456789";

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn event(ts: &str, consumer: &str, plan: &str, billable: bool) -> RequestEvent {
    RequestEvent {
        v: 1,
        id: uuid::Uuid::now_v7(),
        ts: chrono::DateTime::parse_from_rfc3339(ts)
            .unwrap()
            .with_timezone(&chrono::Utc),
        gateway: "gw".into(),
        route: Some("r".into()),
        method: "GET".into(),
        path: "/r".into(),
        status: if billable { 200 } else { 503 },
        latency_us: 1000,
        upstream_latency_us: Some(900),
        req_bytes: 0,
        resp_bytes: 2,
        consumer: Some(consumer.into()),
        plan: Some(plan.into()),
        outcome: if billable {
            Outcome::Ok
        } else {
            Outcome::UpstreamError
        },
        billable,
        trace_id: None,
    }
}

/// The store a test runs against: every test runs on both, with the same expectations.
#[derive(Clone, Copy)]
enum Backend {
    Parquet,
    #[cfg(feature = "clickhouse")]
    ClickHouse,
}

/// What keeps a backend alive for the test (a temp dir, a server).
type Guard = Box<dyn std::any::Any + Send>;

async fn open(backend: Backend) -> (tollgate_store::Store, Guard) {
    match backend {
        Backend::Parquet => {
            let dir = tempfile::tempdir().unwrap();
            let store = StoreConfig::Parquet(ParquetConfig {
                dir: dir.path().to_path_buf(),
                ..Default::default()
            })
            .open()
            .await
            .unwrap();
            (store, Box::new(dir))
        }
        #[cfg(feature = "clickhouse")]
        Backend::ClickHouse => {
            let server = tollgate_testkit::ClickHouse::start();
            let store = StoreConfig::Clickhouse(tollgate_store::ClickHouseConfig {
                url: server.url(),
                database: "api".into(),
                user: None,
                password: None,
                compression: tollgate_store::ClickHouseCompression::Lz4,
            })
            .open()
            .await
            .unwrap();
            (store, Box::new(server))
        }
    }
}

/// Events seeded by `seeded`, at offsets 0 to 47 of partition 0.
const SEEDED: u64 = 48;

fn us(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_micros()
}

/// Records that the one bus partition was stored to its end at `at` (what a collector does).
async fn caught_up(store: &tollgate_store::Store, at: &str) {
    store
        .writer
        .record_progress(&[tollgate_store::PartitionProgress {
            partition: 0,
            partitions: 1,
            caught_up_us: us(at),
        }])
        .await
        .unwrap();
}

async fn app(backend: Backend) -> (axum::Router, Guard) {
    let (app, _store, guard) = seeded(backend).await;
    (app, guard)
}

/// gold: 10 free, then 0.5 up to 20, then 0.25. October: 12 billable. November: 3 a day on the
/// 1st to the 10th (30), plus 2 failed requests on the 5th. Also `now`: 4 for `quota-user`.
/// The collectors have stored everything through November 15th: October is complete.
async fn seeded(backend: Backend) -> (axum::Router, tollgate_store::Store, Guard) {
    let (store, guard) = open(backend).await;
    let mut evs: Vec<RequestEvent> = (0..12)
        .map(|i| event(&format!("2026-10-31T20:{i:02}:00Z"), "a", "gold", true))
        .collect();
    for day in 1..=10 {
        for h in 0..3 {
            evs.push(event(
                &format!("2026-11-{day:02}T1{h}:00:00Z"),
                "a",
                "gold",
                true,
            ));
        }
    }
    evs.push(event("2026-11-05T12:30:00Z", "a", "gold", false));
    evs.push(event("2026-11-05T12:31:00Z", "a", "gold", false));
    let now = chrono::Utc::now().to_rfc3339();
    evs.extend((0..4).map(|_| event(&now, "quota-user", "small", true)));
    store
        .writer
        .append(&tollgate_store::EventBatch::consecutive(
            evs.clone(),
            0,
            evs.len() as u64,
        ))
        .await
        .unwrap();
    store.writer.flush().await.unwrap();
    assert_eq!(evs.len() as u64, SEEDED);
    caught_up(&store, "2026-11-15T00:00:00Z").await;

    let tiers = vec![
        Tier {
            up_to: Some(10),
            unit_price: d("0"),
        },
        Tier {
            up_to: Some(20),
            unit_price: d("0.5"),
        },
        Tier {
            up_to: None,
            unit_price: d("0.25"),
        },
    ];
    let gold = Plan {
        pricing: Some(Pricing {
            currency: "EUR".into(),
            charges: [(
                "default".to_string(),
                Charge {
                    unit_price: None,
                    mode: TierMode::Graduated,
                    tiers: Some(tiers),
                    included: 0,
                },
            )]
            .into(),
            minimum: None,
        }),
        ..Default::default()
    };
    let small = Plan {
        quota: Some(Quota {
            period: Default::default(),
            requests: 5,
        }),
        ..Default::default()
    };
    let plans: BTreeMap<String, Plan> =
        [("gold".to_string(), gold), ("small".to_string(), small)].into();
    let consumers = vec![
        Consumer {
            id: "a".into(),
            plan: "gold".into(),
            api_keys: vec![tollgate_schemas::keys::hash_key("key-a")],
        },
        Consumer {
            id: "quota-user".into(),
            plan: "small".into(),
            api_keys: vec![],
        },
    ];
    (router_for(&store, consumers, plans), store, guard)
}

/// The API over `store` with an admin token.
fn router_for(
    store: &tollgate_store::Store,
    consumers: Vec<Consumer>,
    plans: BTreeMap<String, Plan>,
) -> axum::Router {
    let config = QueryApiConfig {
        admin_tokens: vec![ADMIN.into()],
        ..Default::default()
    };
    let state = AppState::new(
        &config,
        store.query.clone(),
        Arc::new(tollgate_schemas::directory::Directory::new(&consumers).unwrap()),
        plans,
        Registry::default(),
    );
    router(Arc::new(state))
}

async fn call(app: &axum::Router, uri: &str, token: Option<&str>) -> (StatusCode, bytes::Bytes) {
    let (status, _, body) = call_with_headers(app, uri, token).await;
    (status, body)
}

async fn call_with_headers(
    app: &axum::Router,
    uri: &str,
    token: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, bytes::Bytes) {
    let mut req = Request::get(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (
        status,
        headers,
        resp.into_body().collect().await.unwrap().to_bytes(),
    )
}

async fn json(app: &axum::Router, uri: &str) -> Value {
    let (s, b) = call(app, uri, Some(ADMIN)).await;
    assert_eq!(s, StatusCode::OK, "{uri}: {}", String::from_utf8_lossy(&b));
    serde_json::from_slice(&b).unwrap()
}

fn revenue_by(v: &Value, key: &str) -> BTreeMap<String, (u64, Decimal)> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[key].as_str().unwrap().to_string(),
                (
                    r["billable_requests"].as_u64().unwrap(),
                    d(r["revenue"].as_str().unwrap()),
                ),
            )
        })
        .collect()
}

async fn revenue_over_a_window_is_the_difference_of_period_charges_on(backend: Backend) {
    let (app, _guard) = app(backend).await;
    // Before Nov 3 the month has 6 billable; the window adds 3 a day: 6→9 free, 9→12, 12→15.
    let v = json(
        &app,
        "/v1/revenue?from=2026-11-03T00:00:00Z&to=2026-11-06T00:00:00Z&group_by=day",
    )
    .await;
    assert_eq!(v["currency"], "EUR");
    let want: BTreeMap<String, (u64, Decimal)> = [
        ("2026-11-03".to_string(), (3, d("0"))),
        ("2026-11-04".to_string(), (3, d("1"))),
        ("2026-11-05".to_string(), (3, d("1.5"))),
    ]
    .into();
    assert_eq!(revenue_by(&v, "day"), want);
    // A window not on day boundaries: Nov 4 11:00 (cumulative 10) to Nov 4 12:00 (11) → 0.5.
    let v = json(
        &app,
        "/v1/revenue?from=2026-11-04T11:00:00Z&to=2026-11-04T12:00:00Z",
    )
    .await;
    assert_eq!(revenue_by(&v, "consumer")["a"], (1, d("0.5")));
    // Across the month boundary, tiers restart: Oct has 12 (→ 1.0), Nov 1 starts from zero again.
    let v = json(
        &app,
        "/v1/revenue?from=2026-10-01T00:00:00Z&to=2026-11-02T00:00:00Z&group_by=day",
    )
    .await;
    let rows = revenue_by(&v, "day");
    assert_eq!(rows["2026-10-31"], (12, d("1")));
    assert_eq!(rows["2026-11-01"], (3, d("0")));
    // Windows that tile the month add up to the month's charge: 10 free + 10 × 0.5 + 10 × 0.25.
    let mut total = Decimal::ZERO;
    for (from, to) in [
        ("2026-11-01", "2026-11-04T07:00:00Z"),
        ("2026-11-04T07:00:00Z", "2026-11-09"),
        ("2026-11-09", "2026-12-01"),
    ] {
        let from = if from.len() == 10 {
            format!("{from}T00:00:00Z")
        } else {
            from.to_string()
        };
        let to = if to.len() == 10 {
            format!("{to}T00:00:00Z")
        } else {
            to.to_string()
        };
        let v = json(&app, &format!("/v1/revenue?from={from}&to={to}")).await;
        total += revenue_by(&v, "consumer")
            .get("a")
            .map(|r| r.1)
            .unwrap_or_default();
    }
    assert_eq!(total, d("7.5"));
}

async fn billing_export_is_exact_in_every_format_on(backend: Backend) {
    let (app, _guard) = app(backend).await;
    let (s, csv) = call(
        &app,
        "/v1/billing/export?period=2026-11&format=csv&consumer=a&preliminary=true",
        Some(ADMIN),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        String::from_utf8(csv.to_vec()).unwrap(),
        format!("{HEADER}2026-11,a,gold,r,30,7.5,EUR,usage,2026-11,preliminary\n")
    );
    let v = json(&app, "/v1/billing/export?period=2026-10&format=jsonl").await;
    assert_eq!(
        (v["quantity"].as_u64(), v["amount"].as_str()),
        (Some(12), Some("1"))
    );

    let (_, pq) = call(
        &app,
        "/v1/billing/export?period=2026-11&format=parquet&preliminary=true",
        Some(ADMIN),
    )
    .await;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(pq)
        .unwrap()
        .build()
        .unwrap();
    let batch = reader.map(|b| b.unwrap()).next().unwrap();
    let amount = batch
        .column_by_name("amount")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::Decimal128Array>()
        .unwrap();
    assert_eq!(Decimal::from_i128_with_scale(amount.value(0), 12), d("7.5"));

    let (_, ipc) = call(
        &app,
        "/v1/billing/export?period=2026-11&format=arrow&preliminary=true",
        Some(ADMIN),
    )
    .await;
    let mut reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(ipc.to_vec()), None)
            .unwrap();
    let batch = reader.next().unwrap().unwrap();
    let quantity = batch
        .column_by_name("quantity")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::UInt64Array>()
        .unwrap();
    assert_eq!(quantity.value(0), 30);
}

const HEADER: &str = "period,consumer,plan,route,quantity,amount,currency,kind,for_period,status\n";

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// A late event, at the next offset after `before` stored events.
async fn late_event(store: &tollgate_store::Store, ev: RequestEvent, before: u64) {
    store
        .writer
        .append(&tollgate_store::EventBatch::consecutive(
            vec![ev],
            0,
            before + 1,
        ))
        .await
        .unwrap();
    store.writer.flush().await.unwrap();
}

/// Consumer `a`'s lines of an export as CSV (`quota-user`'s requests are made at the time the
/// test runs, so their period depends on the date).
async fn csv_of(app: &axum::Router, query: &str) -> (StatusCode, axum::http::HeaderMap, String) {
    csv_of_all(app, &format!("consumer=a&{query}")).await
}

async fn periods_publish_once_complete_and_late_events_become_adjustments_on(backend: Backend) {
    let (app, store, _guard) = seeded(backend).await;

    // November is not complete: the store holds everything only through Nov 15th, less the
    // two minutes an event may take to reach the bus.
    let (s, _, body) = csv_of(&app, "period=2026-11").await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "period_incomplete");
    assert_eq!(v["error"]["complete_through"], "2026-11-14T23:58:00.000Z");
    // The same watermark in /metrics, in unix seconds.
    let (_, m) = call(&app, "/metrics", None).await;
    let want = format!(
        "tollgate_billing_complete_through_seconds {}",
        us("2026-11-14T23:58:00Z") / 1_000_000
    );
    assert!(String::from_utf8_lossy(&m).contains(&want), "{want}");
    let (s, h, body) = csv_of(&app, "period=2026-11&preliminary=true").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["x-tollgate-export-status"], "preliminary");
    assert_eq!(
        body,
        format!("{HEADER}2026-11,a,gold,r,30,7.5,EUR,usage,2026-11,preliminary\n")
    );

    // October is complete: published on the first download, the same bytes after.
    let (s, h, october) = csv_of(&app, "period=2026-10").await;
    assert_eq!(s, StatusCode::OK, "{october}");
    assert_eq!(h["x-tollgate-export-status"], "final");
    assert_eq!(
        october,
        format!("{HEADER}2026-10,a,gold,r,12,1,EUR,usage,2026-10,final\n")
    );
    let october_id = h["x-tollgate-export-id"].to_str().unwrap().to_string();
    assert_eq!(
        h["x-tollgate-export-sha256"].to_str().unwrap(),
        sha256_hex(october.as_bytes())
    );
    let (_, all_of_october) = call(&app, "/v1/billing/export?period=2026-10", Some(ADMIN)).await;
    assert_eq!(all_of_october, october.as_bytes(), "only `a` used October");

    // A late October event: October's export does not change; it is billed as an adjustment
    // in November's, continuing October's tiers (the 13th unit, at 0.5).
    late_event(
        &store,
        event("2026-10-31T23:59:00Z", "a", "gold", true),
        SEEDED,
    )
    .await;
    let (_, h, again) = csv_of(&app, "period=2026-10").await;
    assert_eq!(again, october);
    assert_eq!(h["x-tollgate-export-id"], october_id.as_str());
    let (_, _, body) = csv_of(&app, "period=2026-11&preliminary=true").await;
    assert_eq!(
        body,
        format!(
            "{HEADER}2026-11,a,gold,r,30,7.5,EUR,usage,2026-11,preliminary\n\
             2026-11,a,gold,r,1,0.5,EUR,adjustment,2026-10,preliminary\n"
        )
    );

    // November completes and is published with the adjustment. A second late October event
    // goes to December, and only it: the first was billed in November.
    caught_up(&store, "2026-12-02T00:00:00Z").await;
    let (s, _, november) = csv_of(&app, "period=2026-11").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        november,
        format!(
            "{HEADER}2026-11,a,gold,r,30,7.5,EUR,usage,2026-11,final\n\
             2026-11,a,gold,r,1,0.5,EUR,adjustment,2026-10,final\n"
        )
    );
    late_event(
        &store,
        event("2026-10-31T23:59:30Z", "a", "gold", true),
        SEEDED + 1,
    )
    .await;
    assert_eq!(csv_of(&app, "period=2026-11").await.2, november);
    assert_eq!(csv_of(&app, "period=2026-10").await.2, october);
    let (_, _, december) = csv_of(&app, "period=2026-12&preliminary=true").await;
    assert_eq!(
        december,
        format!("{HEADER}2026-12,a,gold,r,1,0.5,EUR,adjustment,2026-10,preliminary\n")
    );

    // The manifests: one per published period, with the SHA-256 of the bytes served.
    let v = json(&app, "/v1/billing/exports").await;
    let exports = v["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 2, "{v}");
    assert_eq!(exports[0]["period"], "2026-10");
    assert_eq!(exports[0]["id"], october_id.as_str());
    assert_eq!(exports[0]["rows"], 1);
    assert_eq!(exports[0]["sha256"]["csv"], sha256_hex(october.as_bytes()));
    assert_eq!(
        exports[1]["totals"][0],
        serde_json::json!({"consumer": "a", "currency": "EUR", "quantity": 31, "amount": "8"})
    );
    assert_eq!(v["complete_through"], "2026-12-01T23:58:00.000Z");
    // Every format of a published export is the bytes its manifest names.
    for f in ["csv", "jsonl", "parquet", "arrow"] {
        let (s, b) = call(
            &app,
            &format!("/v1/billing/export?period=2026-11&format={f}"),
            Some(ADMIN),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(exports[1]["sha256"][f], sha256_hex(&b), "{f}");
    }
}

fn priced(currency: &str, minimum: Option<&str>, charges: &[(&str, Charge)]) -> Plan {
    Plan {
        pricing: Some(Pricing {
            currency: currency.into(),
            charges: charges
                .iter()
                .map(|(r, c)| (r.to_string(), c.clone()))
                .collect(),
            minimum: minimum.map(d),
        }),
        ..Default::default()
    }
}

fn flat(price: &str, included: u64) -> Charge {
    Charge {
        unit_price: Some(d(price)),
        mode: TierMode::Graduated,
        tiers: None,
        included,
    }
}

/// A consumer that moves from `basic` to `pro` in October: each plan prices its own part (its
/// included units and tiers counted from zero), `basic`'s part falls short of its minimum; the
/// revenue report and the export agree; late usage of `basic` revisits the minimum.
async fn plan_changes_minimums_and_included_units_on(backend: Backend) {
    let (store, _guard) = open(backend).await;
    let mut evs = Vec::new();
    for i in 0..5 {
        evs.push(event(
            &format!("2026-10-03T10:0{i}:00Z"),
            "p",
            "basic",
            true,
        ));
    }
    for i in 0..30 {
        evs.push(event(
            &format!("2026-10-20T10:{i:02}:00Z"),
            "p",
            "pro",
            true,
        ));
    }
    for i in 0..2 {
        let mut e = event(&format!("2026-10-21T10:0{i}:00Z"), "p", "pro", true);
        e.route = Some("s".into());
        evs.push(e);
    }
    let n = evs.len() as u64;
    store
        .writer
        .append(&tollgate_store::EventBatch::consecutive(evs, 0, n))
        .await
        .unwrap();
    store.writer.flush().await.unwrap();
    caught_up(&store, "2026-11-15T00:00:00Z").await;
    let tiers = Charge {
        unit_price: None,
        mode: TierMode::Graduated,
        tiers: Some(vec![
            Tier {
                up_to: Some(10),
                unit_price: d("0.5"),
            },
            Tier {
                up_to: None,
                unit_price: d("0.1"),
            },
        ]),
        included: 0,
    };
    let plans: BTreeMap<String, Plan> = [
        (
            "basic".to_string(),
            priced("USD", Some("10"), &[("default", flat("1", 3))]),
        ),
        (
            "pro".to_string(),
            priced("USD", Some("5"), &[("r", tiers), ("default", flat("2", 1))]),
        ),
    ]
    .into();
    let consumers = vec![Consumer {
        id: "p".into(),
        plan: "pro".into(),
        api_keys: vec![],
    }];
    let app = router_for(&store, consumers, plans);

    // basic: 5 units, 3 included, 2 at 1 = 2, short of its minimum 10 by 8. pro: r at 10 x 0.5
    // + 20 x 0.1 = 7; s: 2 units, 1 included, 1 at 2 = 2; 9 is above pro's minimum of 5.
    let (s, _, october) = csv_of_all(&app, "period=2026-10").await;
    assert_eq!(s, StatusCode::OK, "{october}");
    assert_eq!(
        october,
        format!(
            "{HEADER}2026-10,p,basic,r,5,2,USD,usage,2026-10,final\n\
             2026-10,p,pro,r,30,7,USD,usage,2026-10,final\n\
             2026-10,p,pro,s,2,2,USD,usage,2026-10,final\n\
             2026-10,p,basic,,0,8,USD,minimum,2026-10,final\n"
        )
    );
    // The revenue report prices the same usage to the same amounts (minimums are billing's).
    let v = json(
        &app,
        "/v1/revenue?from=2026-10-01T00:00:00Z&to=2026-11-01T00:00:00Z&group_by=route",
    )
    .await;
    let by_route = revenue_by(&v, "route");
    assert_eq!(by_route["r"], (35, d("9")), "{v}");
    assert_eq!(by_route["s"], (2, d("2")), "{v}");
    let window = "from=2026-10-01T00:00:00Z&to=2026-11-01T00:00:00Z";
    let by_plan = revenue_by(
        &json(&app, &format!("/v1/revenue?{window}&group_by=plan")).await,
        "plan",
    );
    assert_eq!(by_plan["basic"], (5, d("2")));
    assert_eq!(by_plan["pro"], (32, d("9")));
    // Per consumer, the report is the sum of the export's usage lines.
    let usage_total: Decimal = october
        .lines()
        .skip(1)
        .filter(|l| l.contains(",usage,"))
        .map(|l| d(l.split(',').nth(5).unwrap()))
        .sum();
    let by_consumer = revenue_by(
        &json(&app, &format!("/v1/revenue?{window}")).await,
        "consumer",
    );
    assert_eq!(by_consumer["p"].1, usage_total);
    // The top route by revenue.
    let v = json(&app, &format!("/v1/revenue?{window}&group_by=route&top=1")).await;
    assert_eq!(v["rows"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["rows"][0]["route"], "r");

    // A late basic request: one more unit at 1, and the minimum line shrinks by as much.
    late_event(&store, event("2026-10-31T23:00:00Z", "p", "basic", true), n).await;
    assert_eq!(csv_of_all(&app, "period=2026-10").await.2, october);
    let (_, _, november) = csv_of_all(&app, "period=2026-11&preliminary=true").await;
    assert_eq!(
        november,
        format!(
            "{HEADER}2026-11,p,basic,r,1,1,USD,adjustment,2026-10,preliminary\n\
             2026-11,p,basic,,0,-1,USD,minimum_adjustment,2026-10,preliminary\n"
        )
    );
}

async fn csv_of_all(
    app: &axum::Router,
    query: &str,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let (s, h, b) = call_with_headers(
        app,
        &format!("/v1/billing/export?format=csv&{query}"),
        Some(ADMIN),
    )
    .await;
    (s, h, String::from_utf8(b.to_vec()).unwrap())
}

async fn quota_and_access_rules_on(backend: Backend) {
    let (app, _guard) = app(backend).await;
    let v = json(&app, "/v1/quota").await;
    let q = v["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["consumer"] == "quota-user")
        .unwrap()
        .clone();
    assert_eq!(
        (
            q["limit"].as_u64(),
            q["used"].as_u64(),
            q["remaining"].as_u64(),
            q["state"].as_str()
        ),
        (Some(5), Some(4), Some(1), Some("warning"))
    );

    assert_eq!(
        call(&app, "/v1/quota", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&app, "/v1/quota", Some("not-a-token")).await.0,
        StatusCode::UNAUTHORIZED
    );
    // A partner's own key sees only itself.
    let (s, b) = call(&app, "/v1/quota", Some("key-a")).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["consumers"].as_array().unwrap().len(), 1);
    // Days over a whole history are fine; hours and minutes, the periods that hold traffic,
    // named by their start.
    let v = json(&app, "/v1/usage?from=0&group_by=day").await;
    assert!(!v["rows"].as_array().unwrap().is_empty(), "{v}");
    let v = json(
        &app,
        "/v1/usage?from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z&group_by=hour,consumer",
    )
    .await;
    let hours: Vec<(&str, u64)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["hour"].as_str().unwrap(), r["requests"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        hours,
        [
            ("2026-11-01T10:00:00Z", 1),
            ("2026-11-01T11:00:00Z", 1),
            ("2026-11-01T12:00:00Z", 1)
        ],
        "{v}"
    );
    let v = json(
        &app,
        "/v1/usage?from=2026-10-31T20:00:00Z&to=2026-10-31T20:03:00Z&group_by=minute",
    )
    .await;
    let minutes: Vec<&str> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["minute"].as_str().unwrap())
        .collect();
    assert_eq!(
        minutes,
        [
            "2026-10-31T20:00:00Z",
            "2026-10-31T20:01:00Z",
            "2026-10-31T20:02:00Z"
        ],
        "{v}"
    );
    // Every `/v1` endpoint: another partner's id in the parameters is a 403, and without it a
    // partner's key sees its own rows only.
    let endpoints = [
        "/v1/latency?from=2026-11-01T00:00:00Z&to=2026-11-12T00:00:00Z&group_by=route,consumer",
        "/v1/usage?from=2026-10-01T00:00:00Z&to=2026-12-01T00:00:00Z&group_by=consumer,route",
        "/v1/revenue?from=2026-10-01T00:00:00Z&to=2026-12-01T00:00:00Z&group_by=consumer",
        "/v1/billing/export?period=2026-10&format=jsonl",
        "/v1/billing/exports",
        "/v1/quota",
    ];
    for uri in endpoints {
        let sep = if uri.contains('?') { '&' } else { '?' };
        let (s, b) = call(
            &app,
            &format!("{uri}{sep}consumer=quota-user"),
            Some("key-a"),
        )
        .await;
        assert_eq!(
            s,
            StatusCode::FORBIDDEN,
            "{uri}: {}",
            String::from_utf8_lossy(&b)
        );
        let (s, b) = call(&app, uri, Some("key-a")).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {}", String::from_utf8_lossy(&b));
        let text = String::from_utf8_lossy(&b);
        assert!(
            !text.contains("quota-user"),
            "{uri} shows another consumer: {text}"
        );
        assert!(
            text.contains("\"a\""),
            "{uri} shows the partner's own rows: {text}"
        );
        // The admin sees the other consumer through the same endpoint.
        let (s, b) = call(&app, &format!("{uri}{sep}consumer=quota-user"), Some(ADMIN)).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
        assert!(
            !String::from_utf8_lossy(&b).contains("\"a\""),
            "{uri}: admin's filter"
        );
    }

    for (uri, param) in [
        ("/v1/billing/export?period=2026-13", "period"),
        ("/v1/billing/export", "period"),
        ("/v1/billing/export?period=2026-11&format=xlsx", "format"),
        (
            "/v1/billing/export?period=2026-11&preliminary=yes",
            "preliminary",
        ),
        ("/v1/latency?step=0s", "step"),
        ("/v1/latency?quantiles=1.5", "quantiles"),
        (
            "/v1/usage?from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z",
            "from",
        ),
        ("/v1/revenue?group_by=status", "group_by"),
        (
            "/v1/usage?from=2026-10-01T00:00:00Z&to=2026-11-01T00:00:00Z&group_by=minute",
            "group_by",
        ),
        ("/v1/revenue?top=0", "top"),
        ("/v1/usage?frm=1", "query"),
        ("/v1/usage?to=", "to"),
        ("/v1/quota?consumer=", "consumer"),
    ] {
        let (s, b) = call(&app, uri, Some(ADMIN)).await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some(param)),
            "{uri}: {v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("`{param}`"))
                || param == "query",
            "{uri}: {v}"
        );
    }
}

#[tokio::test]
async fn revenue_over_a_window_is_the_difference_of_period_charges() {
    revenue_over_a_window_is_the_difference_of_period_charges_on(Backend::Parquet).await;
}

#[cfg(feature = "clickhouse")]
#[tokio::test]
async fn revenue_over_a_window_is_the_difference_of_period_charges_on_clickhouse() {
    revenue_over_a_window_is_the_difference_of_period_charges_on(Backend::ClickHouse).await;
}

#[tokio::test]
async fn billing_export_is_exact_in_every_format() {
    billing_export_is_exact_in_every_format_on(Backend::Parquet).await;
}

#[cfg(feature = "clickhouse")]
#[tokio::test]
async fn billing_export_is_exact_in_every_format_on_clickhouse() {
    billing_export_is_exact_in_every_format_on(Backend::ClickHouse).await;
}

#[tokio::test]
async fn quota_and_access_rules() {
    quota_and_access_rules_on(Backend::Parquet).await;
}

#[cfg(feature = "clickhouse")]
#[tokio::test]
async fn quota_and_access_rules_on_clickhouse() {
    quota_and_access_rules_on(Backend::ClickHouse).await;
}

#[tokio::test]
async fn periods_publish_once_complete_and_late_events_become_adjustments() {
    periods_publish_once_complete_and_late_events_become_adjustments_on(Backend::Parquet).await;
}

#[cfg(feature = "clickhouse")]
#[tokio::test]
async fn periods_publish_once_complete_and_late_events_become_adjustments_on_clickhouse() {
    periods_publish_once_complete_and_late_events_become_adjustments_on(Backend::ClickHouse).await;
}

#[tokio::test]
async fn plan_changes_minimums_and_included_units() {
    plan_changes_minimums_and_included_units_on(Backend::Parquet).await;
}

#[cfg(feature = "clickhouse")]
#[tokio::test]
async fn plan_changes_minimums_and_included_units_on_clickhouse() {
    plan_changes_minimums_and_included_units_on(Backend::ClickHouse).await;
}

/// The store, counting the usage queries asked of it.
struct Counting {
    inner: Arc<dyn tollgate_store::UsageQuery>,
    usage: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl tollgate_store::UsageQuery for Counting {
    async fn usage(
        &self,
        filter: &tollgate_store::Filter,
        group_by: &[tollgate_store::GroupKey],
    ) -> Result<Vec<tollgate_store::UsageRow>, tollgate_store::StoreError> {
        self.usage.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.usage(filter, group_by).await
    }
    async fn latency(
        &self,
        query: &tollgate_store::LatencyQuery,
    ) -> Result<Vec<tollgate_store::LatencyRow>, tollgate_store::StoreError> {
        self.inner.latency(query).await
    }
    async fn ready(&self) -> bool {
        self.inner.ready().await
    }
    fn data_version(&self) -> Option<u64> {
        self.inner.data_version()
    }
    async fn progress(
        &self,
    ) -> Result<Vec<tollgate_store::PartitionProgress>, tollgate_store::StoreError> {
        self.inner.progress().await
    }
    async fn publish_export(
        &self,
        export: &tollgate_store::StoredExport,
    ) -> Result<tollgate_store::StoredExport, tollgate_store::StoreError> {
        self.inner.publish_export(export).await
    }
    async fn published_export(
        &self,
        period: &str,
    ) -> Result<Option<tollgate_store::StoredExport>, tollgate_store::StoreError> {
        self.inner.published_export(period).await
    }
    async fn published_exports(
        &self,
    ) -> Result<Vec<tollgate_store::StoredExport>, tollgate_store::StoreError> {
        self.inner.published_exports().await
    }
}

/// Gateways poll the quota state every second; while nothing new is stored, the answers come
/// from the cache without a query (an idle deployment with 100,000 consumers used to count
/// every consumer's month once a second), and a stored event is counted at the next refresh.
#[tokio::test]
async fn quota_state_is_queried_again_only_when_the_store_changes() {
    let (store, _guard) = open(Backend::Parquet).await;
    let now = || chrono::Utc::now().to_rfc3339();
    let evs: Vec<RequestEvent> = (0..4).map(|_| event(&now(), "q", "small", true)).collect();
    store
        .writer
        .append(&tollgate_store::EventBatch::consecutive(evs, 0, 4))
        .await
        .unwrap();
    let counting = Arc::new(Counting {
        inner: store.query.clone(),
        usage: Default::default(),
    });
    let small = Plan {
        quota: Some(Quota {
            period: Default::default(),
            requests: 5,
        }),
        ..Default::default()
    };
    let consumers = [Consumer {
        id: "q".into(),
        plan: "small".into(),
        api_keys: vec![],
    }];
    let state = AppState::new(
        &QueryApiConfig {
            admin_tokens: vec![ADMIN.into()],
            ..Default::default()
        },
        counting.clone(),
        Arc::new(tollgate_schemas::directory::Directory::new(&consumers).unwrap()),
        [("small".to_string(), small)].into(),
        Registry::default(),
    );
    let app = router(Arc::new(state));
    let queries = || counting.usage.load(std::sync::atomic::Ordering::SeqCst);
    let used = |v: Value| v["consumers"][0]["used"].as_u64();
    // Past the cache's own refresh interval (250 ms), so only the store's version decides.
    let past_refresh = || tokio::time::sleep(std::time::Duration::from_millis(300));

    assert_eq!(used(json(&app, "/v1/quota").await), Some(4));
    assert_eq!(queries(), 1);
    past_refresh().await;
    assert_eq!(used(json(&app, "/v1/quota").await), Some(4));
    assert_eq!(
        queries(),
        1,
        "nothing stored since: answered from the cache"
    );

    store
        .writer
        .append(&tollgate_store::EventBatch::consecutive(
            vec![event(&now(), "q", "small", true)],
            0,
            5,
        ))
        .await
        .unwrap();
    past_refresh().await;
    assert_eq!(used(json(&app, "/v1/quota").await), Some(5));
    assert_eq!(queries(), 2);
    // A flush changes where the events are, not the answer; it is queried again all the same.
    store.writer.flush().await.unwrap();
    past_refresh().await;
    assert_eq!(used(json(&app, "/v1/quota").await), Some(5));
    assert_eq!(queries(), 3);
}
