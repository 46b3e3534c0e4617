//! The scaled deployment end to end, as separate processes against real services: a tansu
//! broker and a ClickHouse server started here, two gateways, two collectors and a query API
//! (the real `tollgate` binary, each its own process). Mid-stream one collector is killed with
//! SIGKILL and the broker is frozen for a while; afterwards every request sent is in ClickHouse
//! exactly once and the query API's usage is exact.
#![cfg(all(feature = "kafka", feature = "clickhouse"))]

mod common;
use common::{Http, free_port, start_upstream};

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tollgate_testkit::{Broker, ClickHouse};

const ADMIN: &str = "scaled-admin-token-0123456789";

fn write_config(
    dir: &Path,
    upstream: std::net::SocketAddr,
    broker: &Broker,
    ch: &ClickHouse,
    api: u16,
) -> std::path::PathBuf {
    let text = format!(
        r#"
gateway:
  upstreams:
    app: {{ targets: ["http://{upstream}"], timeout_ms: 2000 }}
  routes:
    - {{ id: fast, methods: [GET], path: /fast, upstream: app }}
    - {{ id: fail, methods: [GET], path: /fail, upstream: app }}
  auth:
    api_key: {{ header: x-api-key }}
consumers:
  - {{ id: alpha, plan: gold, api_keys: ["{a}"] }}
  - {{ id: beta, plan: gold, api_keys: ["{b}"] }}
plans:
  gold: {{ quota: {{ period: month, requests: 100000000 }} }}
bus:
  kind: kafka
  brokers: "{broker}"
  topic: scaled.events
  partitions: 6
  properties: {{ "session.timeout.ms": "6000", "heartbeat.interval.ms": "500" }}
store: {{ kind: clickhouse, url: "{ch}", database: scaled }}
collector: {{ linger_ms: 20 }}
query_api: {{ listen: 127.0.0.1:{api}, admin_tokens: ["{ADMIN}"] }}
"#,
        a = tollgate_schemas::keys::hash_key("key-alpha"),
        b = tollgate_schemas::keys::hash_key("key-beta"),
        broker = broker.addr(),
        ch = ch.url(),
    );
    let path = dir.join("tollgate.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// One `tollgate <part>` process.
struct Part {
    child: Child,
}

impl Part {
    fn start(part: &str, config: &Path, data: &Path, env: &[(&str, String)]) -> Part {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg(part)
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Part {
            child: cmd.spawn().expect("tollgate binary starts"),
        }
    }

    fn sigkill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_ok(http: &Http, url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http.get(url, &[]).await, Ok((StatusCode::OK, _))) {
        assert!(
            Instant::now() < deadline,
            "{what} did not become ready ({url})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `n` requests spread over the gateways; returns (consumer, route, status) counts.
async fn traffic(
    http: &Http,
    gateways: &[u16],
    from: usize,
    n: usize,
    sent: &mut BTreeMap<(String, String, u16), u64>,
) {
    for i in from..from + n {
        let gw = gateways[i % gateways.len()];
        let (consumer, key, path) = match i % 10 {
            0 => ("-", None, "/fast"),
            1..=6 => ("alpha", Some("key-alpha"), "/fast"),
            _ => ("beta", Some("key-beta"), "/fail"),
        };
        let headers: Vec<(&str, &str)> = key.iter().map(|k| ("x-api-key", *k)).collect();
        let (status, _) = http
            .get(&format!("http://127.0.0.1:{gw}{path}"), &headers)
            .await
            .unwrap_or_else(|e| panic!("gateway {gw} did not answer request {i}: {e}"));
        let route = if consumer == "-" { "-" } else { &path[1..] };
        let route = if status == StatusCode::UNAUTHORIZED {
            "fast"
        } else {
            route
        };
        *sent
            .entry((consumer.to_string(), route.to_string(), status.as_u16()))
            .or_default() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_two_collectors_survive_a_sigkill_and_a_frozen_broker() {
    let ch = ClickHouse::start();
    let broker = Broker::start();
    let upstream = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let api = free_port();
    let config = write_config(dir.path(), upstream, &broker, &ch, api);
    let http = Http::new();

    let _query_api = Part::start("query-api", &config, &dir.path().join("q"), &[]);
    wait_ok(
        &http,
        &format!("http://127.0.0.1:{api}/readyz"),
        "the query API",
    )
    .await;
    let mut collectors = Vec::new();
    let mut collector_admin = Vec::new();
    for i in 0..2 {
        let admin = free_port();
        collector_admin.push(admin);
        collectors.push(Part::start(
            "collector",
            &config,
            &dir.path().join(format!("c{i}")),
            &[(
                "TOLLGATE_COLLECTOR__ADMIN_LISTEN",
                format!("127.0.0.1:{admin}"),
            )],
        ));
    }
    let mut gateways = Vec::new();
    let mut gateway_ports = Vec::new();
    let mut gateway_admin = Vec::new();
    for i in 0..2 {
        let (port, admin) = (free_port(), free_port());
        gateway_ports.push(port);
        gateway_admin.push(admin);
        gateways.push(Part::start(
            "gateway",
            &config,
            &dir.path().join(format!("g{i}")),
            &[
                ("TOLLGATE_GATEWAY__LISTEN", format!("127.0.0.1:{port}")),
                (
                    "TOLLGATE_GATEWAY__ADMIN_LISTEN",
                    format!("127.0.0.1:{admin}"),
                ),
                ("TOLLGATE_GATEWAY__ID", format!("gw-{i}")),
                // Spool early, so that the frozen broker sends events through the disk spool.
                (
                    "TOLLGATE_GATEWAY__SPOOL__HIGH_WATER_EVENTS",
                    "50".to_string(),
                ),
            ],
        ));
    }
    for admin in gateway_admin.iter().chain(&collector_admin) {
        wait_ok(
            &http,
            &format!("http://127.0.0.1:{admin}/healthz"),
            "a part",
        )
        .await;
    }
    for port in &gateway_ports {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", *port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "gateway {port} not listening");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let mut sent = BTreeMap::new();
    traffic(&http, &gateway_ports, 0, 600, &mut sent).await;
    #[cfg(target_os = "linux")]
    for gateway in &gateways {
        request_path_alone_in_the_normal_class(gateway.child.id()).await;
    }
    // Wait until the first collector has stored something, then kill it mid-stream.
    let deadline = Instant::now() + Duration::from_secs(90);
    while ch.query("SELECT count() FROM scaled.events").trim() == "0" {
        assert!(Instant::now() < deadline, "nothing reached ClickHouse");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    collectors[0].sigkill();
    traffic(&http, &gateway_ports, 600, 400, &mut sent).await;

    // The broker freezes; the gateways keep answering (events wait in the producers).
    broker.freeze();
    traffic(&http, &gateway_ports, 1000, 400, &mut sent).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.thaw();
    traffic(&http, &gateway_ports, 1400, 600, &mut sent).await;
    let total: u64 = sent.values().sum();
    assert_eq!(total, 2000);

    // Every request, exactly once.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let stored: u64 = ch
            .query("SELECT count() FROM scaled.events")
            .trim()
            .parse()
            .unwrap();
        if stored >= total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ClickHouse holds {stored} of {total} events"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Give a late duplicate the chance to show up before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let row = ch.query(
        "SELECT count(), uniqExact(id), uniqExact(bus_partition, bus_offset) FROM scaled.events",
    );
    assert_eq!(
        row.trim(),
        format!("{total}\t{total}\t{total}"),
        "count, distinct ids, distinct positions"
    );
    let mut stored = BTreeMap::new();
    for line in ch
        .query("SELECT ifNull(consumer, '-') AS c, ifNull(route, '-') AS r, status AS s, count() FROM scaled.events GROUP BY c, r, s")
        .lines()
    {
        let f: Vec<&str> = line.split('\t').collect();
        stored.insert(
            (f[0].to_string(), f[1].to_string(), f[2].parse::<u16>().unwrap()),
            f[3].parse::<u64>().unwrap(),
        );
    }
    assert_eq!(stored, sent, "stored events by consumer, route and status");

    // Every partition's collector (the survivor holds all six now) records how far the store
    // holds the bus: the billing watermark passes the time all of the above was stored.
    let stored_by = chrono::Utc::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = http
            .ok_json(
                &format!("http://127.0.0.1:{api}/v1/billing/exports"),
                Some(ADMIN),
            )
            .await;
        // The API reports it less the default two minutes allowed for an event's trip.
        let through = v["complete_through"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc) + chrono::Duration::seconds(120));
        if through.is_some_and(|t| t >= stored_by) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the billing watermark did not pass {stored_by}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The query API (rollups and raw edges) agrees exactly.
    let v = http
        .ok_json(
            &format!("http://127.0.0.1:{api}/v1/usage?from=0&group_by=consumer"),
            Some(ADMIN),
        )
        .await;
    let requests = |c: &str| -> u64 { sent.iter().filter(|(k, _)| k.0 == c).map(|(_, n)| n).sum() };
    for r in v["rows"].as_array().unwrap() {
        let c = r["consumer"].as_str().unwrap_or("-");
        assert_eq!(r["requests"].as_u64().unwrap(), requests(c), "{c}: {r}");
    }
    // No gateway dropped an event, and the survivor collector took over the partitions.
    for admin in &gateway_admin {
        let (_, body) = http
            .get(&format!("http://127.0.0.1:{admin}/metrics"), &[])
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("tollgate_gateway_events_dropped_total{")
                    && !l.ends_with(" 0")),
            "{text}"
        );
    }
    let url = format!("http://127.0.0.1:{}/metrics", collector_admin[1]);
    let (_, body) = http.get(&url, &[]).await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("tollgate_collector_events_appended_total"),
        "{text}"
    );
    // Waits until a collector reports no lag on any partition it owns: it has stored (and
    // committed) through the end offsets it last read. The lag is read at its flush interval,
    // so polled; a record already on the bus when that collector started is behind it then.
    let stored_to_end = async |admin: u16, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let url = format!("http://127.0.0.1:{admin}/metrics");
            let (_, body) = http.get(&url, &[]).await.unwrap();
            let text = String::from_utf8_lossy(&body);
            let lags: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("tollgate_collector_lag_events{"))
                .collect();
            if !lags.is_empty() && lags.iter().all(|l| l.ends_with(" 0")) {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: lag stays: {lags:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    // Everything is stored.
    stored_to_end(collector_admin[1], "the survivor").await;

    // An event the bus holds twice (what a producer's rare paths write: the same record at two
    // positions) is stored once; the survivor drops the copy by its id and counts it.
    let bus: tollgate_bus::BusConfig = serde_yaml_ng::from_str(&format!(
        "{{ kind: kafka, brokers: \"{}\", topic: scaled.events }}",
        broker.addr()
    ))
    .unwrap();
    let publisher = bus.open().await.unwrap().publisher().unwrap();
    let twice = tollgate_schemas::RequestEvent {
        v: 1,
        id: uuid::Uuid::now_v7(),
        ts: chrono::Utc::now(),
        gateway: "gw-test".into(),
        route: Some("fast".into()),
        method: "GET".into(),
        path: "/fast".into(),
        status: 200,
        latency_us: 100,
        upstream_latency_us: Some(90),
        req_bytes: 0,
        resp_bytes: 2,
        consumer: Some("alpha".into()),
        plan: Some("gold".into()),
        outcome: tollgate_schemas::Outcome::Ok,
        billable: true,
        trace_id: None,
    };
    let record = tollgate_bus::Record {
        key: bytes::Bytes::from("alpha"),
        payload: bytes::Bytes::from(twice.to_json()),
    };
    for _ in 0..2 {
        publisher.publish(vec![record.clone()]).await.unwrap();
        publisher.flush(Duration::from_secs(30)).await.unwrap();
    }
    let duplicates = |admin: u16| {
        let http = &http;
        async move {
            let url = format!("http://127.0.0.1:{admin}/metrics");
            let (_, body) = http.get(&url, &[]).await.ok()?;
            String::from_utf8_lossy(&body)
                .lines()
                .find_map(|l| l.strip_prefix("tollgate_collector_duplicates_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        }
    };
    // The first copy's batch may still be lingering when the second is dropped: polled until
    // the event is there, then it must be there once.
    let stored_once = async || {
        let by_id = format!(
            "SELECT count(), uniqExact(bus_partition) FROM scaled.events WHERE id = '{}'",
            twice.id
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut row = ch.query(&by_id);
        while row.trim() == "0\t0" && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            row = ch.query(&by_id);
        }
        assert_eq!(row.trim(), "1\t1", "stored once");
        assert_eq!(
            ch.query("SELECT count() FROM scaled.events").trim(),
            (total + 1).to_string(),
        );
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while duplicates(collector_admin[1]).await != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the copy was not dropped: duplicates {:?}",
            duplicates(collector_admin[1]).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stored_once().await;

    // A collector that takes the partition over after the first copy was stored (here: the
    // survivor killed, a new one started) seeds its window from ClickHouse and drops a copy
    // too. The third copy is on the bus before it starts, so once its lag reads 0 it has
    // consumed it. It may drop the second copy again as well: the survivor commits past a
    // dropped copy at its next flush, and it may have been killed before that.
    collectors[1].sigkill();
    publisher.publish(vec![record]).await.unwrap();
    publisher.flush(Duration::from_secs(30)).await.unwrap();
    let admin = free_port();
    let _successor = Part::start(
        "collector",
        &config,
        &dir.path().join("c2"),
        &[(
            "TOLLGATE_COLLECTOR__ADMIN_LISTEN",
            format!("127.0.0.1:{admin}"),
        )],
    );
    wait_ok(
        &http,
        &format!("http://127.0.0.1:{admin}/healthz"),
        "the new collector",
    )
    .await;
    stored_to_end(admin, "the new collector").await;
    let dropped = duplicates(admin).await;
    assert!(
        matches!(dropped, Some(1 | 2)),
        "the new collector did not drop the copies: duplicates {dropped:?}"
    );
    stored_once().await;
}

/// In a `tollgate gateway` that has produced to the broker, the gateway's workers keep the
/// normal scheduling class, the Kafka client's threads (`rdk:main`, a broker thread per broker,
/// started as the client needs them) run on idle cores while nothing waits for delivery, and
/// every other thread runs as batch work: the runtime's and the one driving the process
/// (`src/sched.rs`). Where the process may not leave `SCHED_IDLE`, the client's threads are
/// batch work too.
#[cfg(target_os = "linux")]
async fn request_path_alone_in_the_normal_class(pid: u32) {
    use common::{SCHED_BATCH, SCHED_IDLE, SCHED_OTHER, thread_policies};
    let client = if common::may_leave_sched_idle() {
        SCHED_IDLE
    } else {
        SCHED_BATCH
    };
    let expected = |name: &str| {
        if name.starts_with("tollgate-gw-") {
            SCHED_OTHER
        } else if name.starts_with("rdk:") {
            client
        } else {
            SCHED_BATCH
        }
    };
    // The client starts a broker's thread once it has learnt of the broker, and the gateway
    // moves the client's threads once a second while nothing waits: wait for both.
    let deadline = Instant::now() + Duration::from_secs(30);
    let threads = loop {
        let threads = thread_policies(pid);
        let settled = threads.iter().any(|(n, _)| n.starts_with("rdk:broker"))
            && threads.iter().all(|(n, p)| *p == expected(n));
        if settled || Instant::now() > deadline {
            break threads;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        threads.iter().any(|(n, _)| n.starts_with("rdk:broker")),
        "no Kafka broker thread: {threads:?}"
    );
    for (name, policy) in &threads {
        assert_eq!(*policy, expected(name), "thread {name}: {threads:?}");
    }
}
