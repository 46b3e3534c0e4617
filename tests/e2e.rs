//! End to end, across processes: the real `tollgate up` binary in front of a test upstream with
//! known latencies and errors, real traffic from several partners, then the query API's answers
//! checked exactly — and again after a SIGKILL and restart on the same data.

mod common;
#[cfg(target_os = "linux")]
use common::thread_policies;
use common::{Http, Up, free_port, start_upstream};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::Value;

const ADMIN: &str = "e2e-admin-token-0123456789";

fn write_config(dir: &Path, upstream: SocketAddr, gw: u16, api: u16) -> std::path::PathBuf {
    let text = format!(
        r#"
gateway:
  listen: 127.0.0.1:{gw}
  upstreams:
    app: {{ targets: ["http://{upstream}"], timeout_ms: 2000 }}
  routes:
    - {{ id: fast, methods: [GET], path: /fast, upstream: app }}
    - {{ id: slow, methods: [GET], path: "/slow/{{id}}", upstream: app }}
    - {{ id: fail, methods: [GET], path: /fail, upstream: app }}
  auth:
    api_key: {{ header: x-api-key }}
consumers:
  - {{ id: alpha, plan: gold, api_keys: ["{a}"] }}
  - {{ id: beta, plan: silver, api_keys: ["{b}"] }}
plans:
  gold:
    pricing:
      currency: USD
      charges:
        default: {{ tiers: [ {{ up_to: 5, unit_price: "0" }}, {{ up_to: null, unit_price: "0.01" }} ] }}
  silver:
    pricing: {{ currency: USD, charges: {{ default: {{ unit_price: "0.002" }} }} }}
# Flushes never come due during the test: after the SIGKILL, every event must come back from
# the bus log, exactly once.
collector: {{ linger_ms: 20, flush_interval_ms: 600000 }}
query_api: {{ listen: 127.0.0.1:{api}, admin_tokens: ["{ADMIN}"] }}
"#,
        a = tollgate_schemas::keys::hash_key("key-alpha"),
        b = tollgate_schemas::keys::hash_key("key-beta"),
    );
    let path = dir.join("tollgate.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn wait_ready(http: &Http, api: u16, gw: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let api_ok = matches!(
            http.get(&format!("http://127.0.0.1:{api}/readyz"), &[])
                .await,
            Ok((StatusCode::OK, _))
        );
        // A TCP connect, not a request: every request is metered.
        let gw_ok = tokio::net::TcpStream::connect(("127.0.0.1", gw))
            .await
            .is_ok();
        if api_ok && gw_ok {
            return;
        }
        assert!(Instant::now() < deadline, "tollgate did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (consumer, route) → (requests, billable) from `/v1/usage`.
type Usage = BTreeMap<(String, String), (u64, u64)>;

async fn usage(http: &Http, api: u16) -> Usage {
    let v = http
        .ok_json(
            &format!("http://127.0.0.1:{api}/v1/usage?from=0&group_by=consumer,route"),
            Some(ADMIN),
        )
        .await;
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
            (
                (s("consumer"), s("route")),
                (
                    r["requests"].as_u64().unwrap(),
                    r["billable_requests"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

async fn wait_for_usage(http: &Http, api: u16, want: &Usage) -> Duration {
    let started = Instant::now();
    loop {
        let got = usage(http, api).await;
        if &got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "usage never matched:\n got  {got:?}\n want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn send(http: &Http, gw: u16, path: &str, key: Option<&str>, n: usize) -> Vec<StatusCode> {
    let mut out = Vec::new();
    for _ in 0..n {
        let headers: Vec<(&str, &str)> = key.iter().map(|k| ("x-api-key", *k)).collect();
        let (s, body) = http
            .get(&format!("http://127.0.0.1:{gw}{path}"), &headers)
            .await
            .unwrap();
        if s == StatusCode::OK {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                v["leaked_key"], false,
                "the API key must not reach the upstream"
            );
        }
        out.push(s);
    }
    out
}

fn expected(extra_alpha_fast: u64) -> Usage {
    let k = |c: &str, r: &str| (c.to_string(), r.to_string());
    [
        (
            k("alpha", "fast"),
            (20 + extra_alpha_fast, 20 + extra_alpha_fast),
        ),
        (k("alpha", "slow"), (10, 10)),
        (k("alpha", "fail"), (3, 0)),
        (k("beta", "fast"), (7, 7)),
        (k("-", "fast"), (2, 0)), // bad key: 401, no consumer
        (k("-", "-"), (3, 0)),    // no route: 404
    ]
    .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_prices_and_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = start_upstream().await;
    let (gw, api) = (free_port(), free_port());
    let config = write_config(dir.path(), upstream, gw, api);
    let data = dir.path().join("data");
    let http = Http::new();

    let tollgate = Up::start(&config, &data, &[]);
    wait_ready(&http, api, gw).await;

    assert!(
        send(&http, gw, "/fast", Some("key-alpha"), 20)
            .await
            .iter()
            .all(|s| *s == StatusCode::OK)
    );
    // Each slow request timed as the client saw it: the gateway's own latency of a request
    // (first byte in to last byte out) lies within it.
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let sent = Instant::now();
        let status = send(&http, gw, "/slow/42", Some("key-alpha"), 1).await;
        slowest = slowest.max(sent.elapsed());
        assert_eq!(status, [StatusCode::OK]);
    }
    assert!(
        send(&http, gw, "/fail", Some("key-alpha"), 3)
            .await
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE)
    );
    assert!(
        send(&http, gw, "/fast", Some("key-beta"), 7)
            .await
            .iter()
            .all(|s| *s == StatusCode::OK)
    );
    assert!(
        send(&http, gw, "/fast", Some("wrong-key"), 2)
            .await
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED)
    );
    assert!(
        send(&http, gw, "/nowhere", Some("key-alpha"), 3)
            .await
            .iter()
            .all(|s| *s == StatusCode::NOT_FOUND)
    );
    let freshness = wait_for_usage(&http, api, &expected(0)).await;
    eprintln!("freshness: counts complete {freshness:?} after the last response");

    // Revenue: alpha's graduated tiers run per route (first 5 free, then 0.01); beta is flat.
    let (s, rev) = http
        .json(
            &format!("http://127.0.0.1:{api}/v1/revenue?from=0&group_by=consumer,route"),
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let revenue: BTreeMap<String, String> = rev["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                format!(
                    "{}/{}",
                    r["consumer"].as_str().unwrap(),
                    r["route"].as_str().unwrap()
                ),
                r["revenue"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeMap<String, String> = [
        ("alpha/fail", "0"),
        ("alpha/fast", "0.15"),
        ("alpha/slow", "0.05"),
        ("beta/fast", "0.014"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(revenue, want);

    // Billing export of this month, exact.
    let period = chrono::Utc::now().format("%Y-%m").to_string();
    let auth = format!("Bearer {ADMIN}");
    let (s, csv) = http
        .get(
            // The month is still open: its lines so far.
            &format!(
                "http://127.0.0.1:{api}/v1/billing/export?period={period}&format=csv&preliminary=true"
            ),
            &[("authorization", &auth)],
        )
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    let csv = String::from_utf8(csv.to_vec()).unwrap();
    let want_csv = format!(
        "period,consumer,plan,route,quantity,amount,currency,kind,for_period,status\n\
         {p},alpha,gold,fail,0,0,USD,usage,{p},preliminary\n\
         {p},alpha,gold,fast,20,0.15,USD,usage,{p},preliminary\n\
         {p},alpha,gold,slow,10,0.05,USD,usage,{p},preliminary\n\
         {p},beta,silver,fast,7,0.014,USD,usage,{p},preliminary\n",
        p = period
    );
    assert_eq!(csv, want_csv);
    // Without `preliminary` the open month is refused. (This collector never flushes, so the
    // store has no durable progress and no period is complete: `complete_through` is null.)
    let (s, body) = http
        .get(
            &format!("http://127.0.0.1:{api}/v1/billing/export?period={period}"),
            &[("authorization", &auth)],
        )
        .await
        .unwrap();
    assert_eq!(s, StatusCode::CONFLICT);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "period_incomplete");
    assert!(v["error"]["complete_through"].is_null(), "{v}");

    // Latency: the slow route's p50 and p99 are its 50 ms plus the gateway's own time, so at
    // least 50 ms and at most the slowest answer the client saw, within the sketch's 1 %. (A
    // fixed allowance for the gateway's time failed once when parallel tests held the cores.)
    // The gateway's clock for a request stops when its worker runs again after writing the
    // last byte, and the client the write woke may run first: with the tests' processes on
    // the same cores the client once saw its slowest answer 0.8 ms before the gateway's
    // clock stopped (56.5 against 57.3 ms). So the upper bound allows the worker's wait for a
    // core.
    const WAIT_FOR_A_CORE_MS: f64 = 10.0;
    let (_, lat) = http
        .json(
            &format!("http://127.0.0.1:{api}/v1/latency?from=0&route=slow&quantiles=0.5,0.99"),
            Some(ADMIN),
        )
        .await;
    let point = &lat["series"][0]["points"][0];
    assert_eq!(point["count"], 10);
    for q in ["0.5", "0.99"] {
        let ms = point["quantiles_ms"][q].as_f64().unwrap();
        let most = (slowest.as_secs_f64() * 1000.0 + WAIT_FOR_A_CORE_MS) * 1.01;
        assert!(
            (50.0 * 0.995..=most).contains(&ms),
            "p{q} of slow = {ms} ms, outside 49.75..={most:.3} ms"
        );
    }
    let (_, lat) = http
        .json(
            &format!("http://127.0.0.1:{api}/v1/latency?from=0&route=fail"),
            Some(ADMIN),
        )
        .await;
    assert_eq!(lat["series"][0]["points"][0]["errors"], 3);

    // Access rules.
    let base = format!("http://127.0.0.1:{api}");
    let (s, v) = http.json(&format!("{base}/v1/usage?from=0"), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    let (s, v) = http
        .json(
            &format!("{base}/v1/usage?from=0&group_by=consumer"),
            Some("key-beta"),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        v["rows"].as_array().unwrap().len(),
        1,
        "a partner sees only itself: {v}"
    );
    assert_eq!(v["rows"][0]["consumer"], "beta");
    let (s, _) = http
        .json(
            &format!("{base}/v1/usage?from=0&consumer=alpha"),
            Some("key-beta"),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = http
        .json(&format!("{base}/v1/usage?from=yesterday"), Some(ADMIN))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["param"], "from", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("from"));
    let (s, v) = http
        .json(&format!("{base}/v1/usage?group_by=colour"), Some(ADMIN))
        .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("group_by"))
    );

    // The metrics of every part are exported.
    let (_, m) = http.get(&format!("{base}/metrics"), &[]).await.unwrap();
    let m = String::from_utf8(m.to_vec()).unwrap();
    assert!(
        m.contains("tollgate_gateway_requests_total{route=\"fast\",outcome=\"ok\"} 27"),
        "{m}"
    );
    assert!(
        m.contains("tollgate_collector_events_appended_total 45"),
        "{m}"
    );
    // By status class, next to the outcomes: 27 answered, 2 refused keys, 3 upstream 503s.
    for line in [
        "tollgate_gateway_responses_total{route=\"fast\",class=\"2xx\"} 27",
        "tollgate_gateway_responses_total{route=\"fast\",class=\"4xx\"} 2",
        "tollgate_gateway_responses_total{route=\"fail\",class=\"5xx\"} 3",
        "tollgate_gateway_request_duration_seconds_count{route=\"fast\"} 29",
        // Every event was published (the usage is complete), so none waits.
        "tollgate_gateway_event_queue_depth 0",
        // Batch sizes add up to the events appended.
        "tollgate_collector_batch_events_sum 45.0",
    ] {
        assert!(m.lines().any(|l| l == line), "{line}\n{m}");
    }
    let newest: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_collector_newest_event_timestamp_seconds "))
        .expect("the newest event's time")
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - 120.0..=now).contains(&newest), "{newest} vs {now}");
    assert!(
        m.contains("tollgate_query_api_requests_total{endpoint=\"/v1/usage\",status=\"401\"} 1"),
        "{m}"
    );

    // SIGKILL with nothing flushed to Parquet yet: after restart, every event is back once.
    tollgate.sigkill();
    let _tollgate = Up::start(&config, &data, &[]);
    wait_ready(&http, api, gw).await;
    wait_for_usage(&http, api, &expected(0)).await;
    assert!(
        send(&http, gw, "/fast", Some("key-alpha"), 5)
            .await
            .iter()
            .all(|s| *s == StatusCode::OK)
    );
    wait_for_usage(&http, api, &expected(5)).await;
    // And it stays exact: no late duplicates while the collector keeps running.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert_eq!(usage(&http, api).await, expected(5));
    }
}

/// The `gateway:` section of the quota tests: API keys, one route `/fast` to `upstream`, and
/// `quota` as the quota feed's settings.
fn fast_route_gateway(gw: u16, upstream: SocketAddr, quota: &str) -> String {
    format!(
        r#"
gateway:
  listen: 127.0.0.1:{gw}
  upstreams: {{ app: {{ targets: ["http://{upstream}"] }} }}
  routes: [ {{ id: fast, methods: [GET], path: /fast, upstream: app }} ]
  auth: {{ api_key: {{ header: x-api-key }} }}
  quota: {{ {quota} }}"#
    )
}

/// The quota state travels between the query API and the gateway as changes: an answer to
/// `since` names only the consumers whose entry changed, and the gateway, fed such answers,
/// still stops a consumer at its quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_state_travels_as_changes_and_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = start_upstream().await;
    let (gw, api) = (free_port(), free_port());
    let config = dir.path().join("tollgate.yaml");
    std::fs::write(
        &config,
        format!(
            r#"{gateway}
consumers:
  - {{ id: capped, plan: small, api_keys: ["{c}"] }}
  - {{ id: other, plan: small, api_keys: ["{o}"] }}
  - {{ id: burst, plan: small, api_keys: ["{b}"] }}
plans:
  small: {{ quota: {{ period: month, requests: 30 }} }}
collector: {{ linger_ms: 5 }}
query_api: {{ listen: 127.0.0.1:{api}, admin_tokens: ["{ADMIN}"] }}
"#,
            gateway = fast_route_gateway(gw, upstream, "poll_ms: 100"),
            c = tollgate_schemas::keys::hash_key("key-capped"),
            o = tollgate_schemas::keys::hash_key("key-other"),
            b = tollgate_schemas::keys::hash_key("key-burst"),
        ),
    )
    .unwrap();
    let http = Http::new();
    let _tollgate = Up::start(&config, &dir.path().join("data"), &[]);
    wait_ready(&http, api, gw).await;
    let quota = |query: String| {
        let url = format!("http://127.0.0.1:{api}/v1/quota{query}");
        let http = &http;
        async move { http.ok_json(&url, Some(ADMIN)).await }
    };
    let names = |v: &Value| -> Vec<String> {
        v["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["consumer"].as_str().unwrap().to_string())
            .collect()
    };

    let full = quota(String::new()).await;
    assert_eq!(full["full"], true);
    assert_eq!(names(&full), ["capped", "other", "burst"]);
    let (v0, epoch) = (
        full["version"].as_i64().unwrap(),
        full["epoch"].as_u64().unwrap(),
    );

    // One request of `other`: the next answers to v0 name `other` alone.
    assert_eq!(
        send(&http, gw, "/fast", Some("key-other"), 1).await,
        [StatusCode::OK]
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let changed = loop {
        let v = quota(format!("?since={v0}&epoch={epoch}")).await;
        assert_eq!(v["full"], false, "{v}");
        if v["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["used"] == 1)
        {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "other's request never counted: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(names(&changed), ["other"]);
    let v1 = changed["version"].as_i64().unwrap();
    assert!(v1 > v0);
    let idle = quota(format!("?since={v1}&epoch={epoch}")).await;
    assert_eq!(
        (idle["full"].clone(), names(&idle)),
        (Value::Bool(false), vec![])
    );
    let foreign = quota(format!("?since={v1}&epoch={}", epoch.wrapping_add(1))).await;
    assert_eq!(
        foreign["full"], true,
        "another process's version gets everything"
    );
    assert_eq!(names(&foreign), ["capped", "other", "burst"]);
    let (s, _) = http
        .json(
            &format!("http://127.0.0.1:{api}/v1/quota?since={v1}"),
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "since without epoch");

    // `capped` is stopped at its quota by a gateway that only ever got partial answers after
    // its first poll. One gateway, one request at a time: exactly at the quota, as its local
    // count covers what the store has not counted yet.
    let mut admitted = 0;
    loop {
        let s = send(&http, gw, "/fast", Some("key-capped"), 1).await[0];
        if s == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        assert_eq!(s, StatusCode::OK);
        admitted += 1;
        assert!(admitted < 230, "the quota of 30 was never enforced");
    }
    assert_eq!(admitted, 30, "admitted against a quota of 30");
    // 80 requests of `burst` at once: each is counted when admitted, so exactly 30 pass.
    let url = format!("http://127.0.0.1:{gw}/fast");
    let answers =
        futures::future::join_all((0..80).map(|_| http.get(&url, &[("x-api-key", "key-burst")])))
            .await;
    let ok = answers
        .iter()
        .filter(|a| matches!(a, Ok((StatusCode::OK, _))))
        .count();
    let refused = answers
        .iter()
        .filter(|a| matches!(a, Ok((StatusCode::TOO_MANY_REQUESTS, _))))
        .count();
    assert_eq!(
        (ok, refused),
        (30, 50),
        "concurrent requests against a quota of 30"
    );
    // `other` is unaffected.
    assert_eq!(
        send(&http, gw, "/fast", Some("key-other"), 1).await,
        [StatusCode::OK]
    );
}

/// With thousands of consumers the configuration is read as it is parsed, the query API sends
/// the whole quota state as it writes it and the gateway applies it as it arrives: a consumer
/// whose limit only that full answer carries is stopped exactly at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_quota_state_of_thousands_of_consumers_is_enforced() {
    const CONSUMERS: usize = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let upstream = start_upstream().await;
    let (gw, api) = (free_port(), free_port());
    let mut yaml = format!(
        r#"{gateway}
plans:
  open: {{ quota: {{ period: month, requests: 1000000 }} }}
  small: {{ quota: {{ period: month, requests: 25 }} }}
query_api: {{ listen: 127.0.0.1:{api}, admin_tokens: ["{ADMIN}"] }}
consumers:
"#,
        gateway = fast_route_gateway(
            gw,
            upstream,
            "poll_ms: 100, stale_after_s: 3600, when_stale: closed"
        ),
    );
    for i in 0..CONSUMERS {
        let key = tollgate_schemas::keys::hash_key(&format!("key-{i}"));
        yaml.push_str(&format!(
            "  - {{ id: c{i}, plan: open, api_keys: [\"{key}\"] }}\n"
        ));
    }
    let capped = tollgate_schemas::keys::hash_key("key-capped");
    yaml.push_str(&format!(
        "  - {{ id: capped, plan: small, api_keys: [\"{capped}\"] }}\n"
    ));
    let config = dir.path().join("tollgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let http = Http::new();
    let _tollgate = Up::start(&config, &dir.path().join("data"), &[]);
    wait_ready(&http, api, gw).await;

    let full = http
        .ok_json(&format!("http://127.0.0.1:{api}/v1/quota"), Some(ADMIN))
        .await;
    assert_eq!(full["full"], true);
    let entries = full["consumers"].as_array().unwrap();
    assert_eq!(entries.len(), CONSUMERS + 1);
    assert_eq!(entries[CONSUMERS]["consumer"], "capped");
    assert_eq!(entries[CONSUMERS]["limit"], 25);

    // Closed while stale: 503 until the gateway holds the state, then exactly 25 pass.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut admitted = 0;
    loop {
        let s = send(&http, gw, "/fast", Some("key-capped"), 1).await[0];
        match s {
            StatusCode::SERVICE_UNAVAILABLE if admitted == 0 => {
                assert!(Instant::now() < deadline, "the quota state never arrived");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => break,
            other => panic!("unexpected {other} after {admitted} admitted"),
        }
        assert!(admitted < 200, "the quota of 25 was never enforced");
    }
    assert_eq!(admitted, 25, "admitted against a quota of 25");
    assert_eq!(
        send(&http, gw, "/fast", Some("key-4999"), 1).await,
        [StatusCode::OK],
        "the last of the others is known and under its quota"
    );
}

/// `tollgate up` with nothing but its listeners configured, `gateway_extra` added to the
/// gateway's settings (`", workers: 2"`), once both listen. The directory holds its data.
async fn up_with_gateway(gateway_extra: &str) -> (tempfile::TempDir, Up) {
    let dir = tempfile::tempdir().unwrap();
    let (gw, api) = (free_port(), free_port());
    let config = dir.path().join("tollgate.yaml");
    std::fs::write(
        &config,
        format!(
            "gateway: {{ listen: 127.0.0.1:{gw}{gateway_extra} }}\nquery_api: {{ listen: 127.0.0.1:{api} }}\n"
        ),
    )
    .unwrap();
    let tollgate = Up::start(&config, &dir.path().join("data"), &[]);
    common::wait_for_listener(api).await;
    common::wait_for_listener(gw).await;
    (dir, tollgate)
}

/// With `pin_workers: auto` (the default) the workers are bound to their cores only while the
/// cores are busy: `tollgate up` with nothing to serve leaves them to the scheduler, on every
/// core the process may use. (It binds them at start, one per core, and frees them once two
/// looks at the cores' idle time, a quarter of a second apart, found them idle; while other
/// tests keep the cores busy, it may take longer.)
#[cfg(target_os = "linux")]
#[tokio::test]
async fn idle_workers_under_pin_workers_auto_are_left_to_the_scheduler() {
    let (_dir, tollgate) = up_with_gateway("").await;
    let ours = common::cores_allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let cores = common::thread_cores(tollgate.id());
        let workers: Vec<&(String, String)> = cores
            .iter()
            .filter(|(n, _)| n.starts_with("tollgate-gw-"))
            .collect();
        if !workers.is_empty() && workers.iter().all(|(_, c)| *c == ours) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle workers still bound after 60 s (the process may use {ours}): {workers:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// In `tollgate up`, the gateway's workers keep the normal scheduling class, the threads
/// beside them (the runtime's: publisher, log, quota feed, query API) run as batch work, whose
/// wake-ups do not preempt the request path, and the ingest threads (collector, store) run on
/// idle cores while the collector keeps up, where the process may take them back out of it.
/// With `pin_workers: always`, each worker is bound to a core of its own (in turn over the
/// process's cores) and no other thread is bound.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_request_path_keeps_the_normal_class_and_the_rest_runs_as_batch() {
    use common::{SCHED_BATCH, SCHED_IDLE, SCHED_OTHER};
    let (_dir, tollgate) = up_with_gateway(", workers: 2, pin_workers: always").await;
    let expected_ingest = if common::may_leave_sched_idle() {
        SCHED_IDLE
    } else {
        SCHED_BATCH
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let threads = loop {
        let threads = thread_policies(tollgate.id());
        let workers = threads
            .iter()
            .filter(|(n, _)| n.starts_with("tollgate-gw-"));
        let settled = workers.clone().count() == 2
            && workers.clone().all(|(_, p)| *p == SCHED_OTHER)
            && threads.iter().any(|(n, _)| n == "tokio-rt-worker")
            && threads.iter().any(|(n, _)| n == "tollgate-events")
            && threads
                .iter()
                .any(|(n, p)| n == "tollgate-ingest" && *p == expected_ingest);
        if settled || Instant::now() > deadline {
            break threads;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let of = |name: &str| -> Vec<u32> {
        threads
            .iter()
            .filter(|(n, _)| n.starts_with(name))
            .map(|(_, p)| *p)
            .collect()
    };
    assert_eq!(of("tollgate-gw-"), [SCHED_OTHER; 2], "{threads:?}");
    let runtime = of("tokio-rt-worker");
    assert!(!runtime.is_empty(), "{threads:?}");
    assert!(runtime.iter().all(|p| *p == SCHED_BATCH), "{threads:?}");
    // The event publisher's thread is background work too.
    assert_eq!(of("tollgate-events"), [SCHED_BATCH], "{threads:?}");
    // Nothing is sent: the collector is caught up from its first poll.
    let ingest = of("tollgate-ingest");
    assert!(!ingest.is_empty(), "{threads:?}");
    assert!(ingest.iter().all(|p| *p == expected_ingest), "{threads:?}");

    // The test's own cores are the process's: it inherits them.
    let ours = common::cores_allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
    let cores = common::thread_cores(tollgate.id());
    let mut bound: Vec<&str> = cores
        .iter()
        .filter(|(n, _)| n.starts_with("tollgate-gw-"))
        .map(|(_, c)| c.as_str())
        .collect();
    bound.sort();
    assert_eq!(bound.len(), 2, "{cores:?}");
    assert!(
        bound.iter().all(|c| c.parse::<usize>().is_ok()),
        "each worker on one core: {cores:?}"
    );
    if ours.contains(['-', ',']) {
        assert_ne!(bound[0], bound[1], "two cores, one each: {cores:?}");
    }
    assert!(
        cores
            .iter()
            .filter(|(n, _)| !n.starts_with("tollgate-gw-"))
            .all(|(_, c)| *c == ours),
        "no other thread bound (the test's cores are {ours}): {cores:?}"
    );
}
