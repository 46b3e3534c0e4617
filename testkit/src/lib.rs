//! Real services for tests: a private ClickHouse server and a Kafka-protocol broker (tansu),
//! each started on free loopback ports in a temp directory and stopped when dropped. No mock
//! stands in for them; when one cannot be found the test fails with the command that installs
//! it (`./scripts/test.sh` installs both).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("bound")
        .port()
}

/// Polls `ok` until it holds or `limit` passes; panics with `what` then.
pub fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn find(env: &str, candidates: &[PathBuf], name: &str, install: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    for c in candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "{name} is missing: {install} (./scripts/test.sh installs it), or set {env} to its path"
    );
}

fn tools_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(".cache/tollgate-tools")
}

/// A private ClickHouse server.
pub struct ClickHouse {
    child: Child,
    dir: tempfile::TempDir,
    pub http_port: u16,
}

impl ClickHouse {
    /// Starts `clickhouse-server` in a temp dir and waits until `/ping` answers.
    pub fn start() -> ClickHouse {
        let bin = find(
            "TOLLGATE_CLICKHOUSE_SERVER",
            &[
                PathBuf::from("/usr/sbin/clickhouse-server"),
                PathBuf::from("/usr/bin/clickhouse-server"),
            ],
            "clickhouse-server",
            "apt-get install -y clickhouse-server",
        );
        let dir = tempfile::tempdir().expect("temp dir");
        for sub in ["data", "tmp", "user_files", "log"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("dirs");
        }
        let users = dir.path().join("users.xml");
        std::fs::write(&users, USERS_XML).expect("users.xml");
        let http_port = free_port();
        let tcp_port = free_port();
        let d = dir.path().display();
        let config = format!(
            "<yandex>\n<logger><level>warning</level><log>{d}/log/server.log</log><errorlog>{d}/log/error.log</errorlog></logger>\n\
             <http_port>{http_port}</http_port><tcp_port>{tcp_port}</tcp_port><listen_host>127.0.0.1</listen_host>\n\
             <path>{d}/data/</path><tmp_path>{d}/tmp/</tmp_path><user_files_path>{d}/user_files/</user_files_path>\n\
             <users_config>{}</users_config><default_profile>default</default_profile><default_database>default</default_database>\n\
             <mark_cache_size>5368709120</mark_cache_size>\n</yandex>\n",
            users.display()
        );
        let config_path = dir.path().join("config.xml");
        std::fs::write(&config_path, config).expect("config.xml");
        let child = Command::new(&bin)
            .arg(format!("--config-file={}", config_path.display()))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let ch = ClickHouse {
            child,
            dir,
            http_port,
        };
        wait_until(
            "ClickHouse to answer /ping",
            Duration::from_secs(60),
            || ch.ping(),
        );
        ch
    }

    /// The HTTP interface's URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn ping(&self) -> bool {
        http_get(self.http_port, "/ping").is_some_and(|b| b.starts_with("Ok."))
    }

    /// Runs `sql` over HTTP and returns the body (TSV by default).
    pub fn query(&self, sql: &str) -> String {
        http_post(self.http_port, "/", sql)
            .unwrap_or_else(|e| panic!("ClickHouse query `{sql}`: {e}"))
    }

    /// Runs `sql` with `database` as the default database (what a client such as Grafana's
    /// data source sets) and returns the body.
    pub fn query_in(&self, database: &str, sql: &str) -> String {
        http_post(self.http_port, &format!("/?database={database}"), sql)
            .unwrap_or_else(|e| panic!("ClickHouse query `{sql}`: {e}"))
    }

    /// Where the server's logs are.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("log")
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Kafka-protocol broker (tansu, in-memory storage).
pub struct Broker {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
}

impl Broker {
    /// Starts tansu on a free port and waits until it accepts connections.
    pub fn start() -> Broker {
        let bin = find(
            "TOLLGATE_TANSU",
            &[tools_dir().join("tansu")],
            "tansu",
            "run ./scripts/install-test-services.sh",
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("tansu.log")).expect("log file");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        wait_until(
            "the broker to accept connections",
            Duration::from_secs(30),
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        Broker {
            child,
            _dir: dir,
            port,
        }
    }

    /// `host:port` for `bus.brokers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Freezes the broker (SIGSTOP): an outage that keeps its log.
    pub fn freeze(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Lets a frozen broker run again (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.id(), "CONT");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        signal(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal by name with `kill(1)` (the workspace forbids `unsafe`).
pub fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{name} {pid} failed");
}

fn http_get(port: u16, path: &str) -> Option<String> {
    http(
        port,
        &format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"),
    )
    .ok()
}

fn http_post(port: u16, path: &str, body: &str) -> Result<String, String> {
    http(
        port,
        &format!(
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// A minimal HTTP/1.0 exchange (no client dependency for a test helper).
fn http(port: u16, request: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "{}: {body}",
            head.lines().next().unwrap_or_default()
        ));
    }
    Ok(body.to_string())
}

const USERS_XML: &str = r#"<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
"#;
