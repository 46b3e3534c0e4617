//! The gateway reloads its configuration, as a process: `tollgate gateway` against a real
//! broker, where SIGHUP puts a new route in force and a broken file written over it is refused
//! on the next file check, with the metric set and the running routes still answering; and
//! `tollgate up --config`, whose gateway follows its file the same way, and whose query API
//! takes the new consumers (a consumer added by a reload is held to its quota).

mod common;
use common::{Http, free_port, start_upstream};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyper::StatusCode;

const SLOW_ROUTE: &str =
    "    - { id: slow, methods: [GET], path: \"/slow/{id}\", upstream: app, auth: false }";

/// A configuration with route `/fast` (and `extra_route`) to `upstream`, then `rest`.
fn write_config(path: &Path, upstream: std::net::SocketAddr, rest: &str, extra_route: &str) {
    let text = format!(
        r#"
gateway:
  upstreams:
    app: {{ targets: ["http://{upstream}"], timeout_ms: 2000 }}
  routes:
    - {{ id: fast, methods: [GET], path: /fast, upstream: app, auth: false }}
{extra_route}
{rest}
"#,
    );
    std::fs::write(path, text).unwrap();
}

/// A started `tollgate` process, killed when dropped (also when a test fails before its end).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tollgate COMMAND --config CONFIG` with its data in `dir`, its gateway on `port`, and one
/// more listener: `(key, port)`, the key as in `TOLLGATE_<key>`.
fn spawn(
    command: &str,
    config: &Path,
    dir: &Path,
    port: u16,
    (key, other): (&str, u16),
) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg(command)
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("TOLLGATE_GATEWAY__LISTEN", format!("127.0.0.1:{port}"))
        .env(format!("TOLLGATE_{key}"), format!("127.0.0.1:{other}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tollgate binary starts");
    Running(child)
}

/// The status of `GET path` on the gateway at `port`, if it answered.
async fn status(http: &Http, port: u16, path: &str) -> Option<StatusCode> {
    http.get(&format!("http://127.0.0.1:{port}{path}"), &[])
        .await
        .map(|(s, _)| s)
        .ok()
}

/// Writes a broken file over `config`: the metrics on `metrics_port` say it was refused, and
/// the gateway on `port` still serves the route the last good file added.
async fn broken_file_changes_nothing(http: &Http, config: &Path, metrics_port: u16, port: u16) {
    std::fs::write(config, "gateway: { routes: [ broken").unwrap();
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    eventually("the broken file was not noticed", || async {
        http.get(&metrics, &[]).await.is_ok_and(|(_, body)| {
            String::from_utf8_lossy(&body).contains("tollgate_gateway_config_reload_failed 1")
        })
    })
    .await;
    assert_eq!(
        status(http, port, "/slow/2").await,
        Some(StatusCode::OK),
        "the running configuration stays"
    );
}

/// Polls `ok` until it holds, or fails naming `what` after 20 s.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut ok: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_gateway_and_a_broken_file_changes_nothing() {
    use tollgate_testkit::{Broker, signal};
    let broker = Broker::start();
    let bus = format!(
        "bus: {{ kind: kafka, brokers: \"{}\", topic: reload.events, partitions: 2 }}",
        broker.addr()
    );
    let upstream = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.yaml");
    write_config(&config, upstream, &bus, "");
    let (port, admin) = (free_port(), free_port());
    let child = spawn(
        "gateway",
        &config,
        dir.path(),
        port,
        ("GATEWAY__ADMIN_LISTEN", admin),
    );
    let http = Http::new();
    let status = |path: &'static str| status(&http, port, path);
    eventually("the gateway did not start", || async {
        status("/fast").await == Some(StatusCode::OK)
    })
    .await;
    assert_eq!(status("/slow/1").await, Some(StatusCode::NOT_FOUND));

    // The new file keeps the old one's modification time, so that only SIGHUP can load it.
    let before = dir.path().join("before.yaml");
    std::fs::copy(&config, &before).unwrap();
    let same_mtime = |from: &Path, to: &Path| {
        let ok = Command::new("touch").arg("-r").arg(from).arg(to).status();
        assert!(ok.is_ok_and(|s| s.success()), "touch -r");
    };
    same_mtime(&config, &before);
    write_config(&config, upstream, &bus, SLOW_ROUTE);
    same_mtime(&before, &config);
    // A file check passes meanwhile (every 2 s) and finds nothing new.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        status("/slow/1").await,
        Some(StatusCode::NOT_FOUND),
        "no reload without a trigger"
    );
    signal(child.0.id(), "HUP");
    eventually("SIGHUP did not put the new route in force", || async {
        status("/slow/1").await == Some(StatusCode::OK)
    })
    .await;

    broken_file_changes_nothing(&http, &config, admin, port).await;
    assert_eq!(status("/fast").await, Some(StatusCode::OK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tollgate_up_with_a_file_reloads_its_gateway_when_the_file_changes() {
    let upstream = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.yaml");
    write_config(&config, upstream, "", "");
    let (port, api) = (free_port(), free_port());
    let _up = spawn("up", &config, dir.path(), port, ("QUERY_API__LISTEN", api));
    let http = Http::new();
    let status = |path: &'static str| status(&http, port, path);
    eventually("tollgate up did not start", || async {
        status("/fast").await == Some(StatusCode::OK)
    })
    .await;
    assert_eq!(status("/slow/1").await, Some(StatusCode::NOT_FOUND));
    write_config(&config, upstream, "", SLOW_ROUTE);
    eventually(
        "the changed file did not put the new route in force",
        || async { status("/slow/1").await == Some(StatusCode::OK) },
    )
    .await;
    broken_file_changes_nothing(&http, &config, api, port).await;
}

/// A consumer added by a reload of `tollgate up` is held to its plan's quota: the query API
/// takes the gateway's new consumer table, so the quota state the gateway polls includes it.
/// (Before, the query API kept the consumers it started with, and the new one was unlimited
/// until a restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tollgate_up_holds_a_consumer_added_by_a_reload_to_its_quota() {
    let upstream = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.yaml");
    // An authenticated route (the upstream answers `/slow/…` with 200: billable).
    let paid = "    - { id: paid, methods: [GET], path: \"/slow/{id}\", upstream: app }";
    let consumers = |ids: &[&str]| {
        let mut rest = String::from("plans: { capped: { quota: { requests: 3 } } }\nconsumers:\n");
        for id in ids {
            rest += &format!(
                "  - {{ id: {id}, plan: capped, api_keys: [\"{}\"] }}\n",
                tollgate_schemas::keys::hash_key(&format!("key-{id}"))
            );
        }
        rest
    };
    write_config(&config, upstream, &consumers(&["a"]), paid);
    let (port, api) = (free_port(), free_port());
    let _up = spawn("up", &config, dir.path(), port, ("QUERY_API__LISTEN", api));
    let http = Http::new();
    let as_b = || async {
        http.get(
            &format!("http://127.0.0.1:{port}/slow/1"),
            &[("x-api-key", "key-b")],
        )
        .await
        .map(|(s, _)| s)
        .ok()
    };
    eventually("tollgate up did not start", || async {
        status(&http, port, "/fast").await == Some(StatusCode::OK)
    })
    .await;
    assert_eq!(
        as_b().await,
        Some(StatusCode::UNAUTHORIZED),
        "b is not configured yet"
    );
    write_config(&config, upstream, &consumers(&["a", "b"]), paid);
    eventually("the reload did not add consumer b", || async {
        as_b().await == Some(StatusCode::OK)
    })
    .await;
    let admitted = std::cell::Cell::new(1);
    eventually("b was never held to its quota of 3", || async {
        match as_b().await {
            Some(StatusCode::OK) => {
                admitted.set(admitted.get() + 1);
                false
            }
            other => other == Some(StatusCode::TOO_MANY_REQUESTS),
        }
    })
    .await;
    // The gateway learns b's entry within a poll (1 s) of the reload; what b sent before that
    // went through unchecked, and is counted against it since.
    assert!(admitted.get() >= 3, "{} admitted", admitted.get());
}
