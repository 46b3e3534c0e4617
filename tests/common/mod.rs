//! Helpers shared by the tests that run the `tollgate` binary: a test upstream and an HTTP
//! client. (Each test crate uses some of them.)
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

pub use tollgate_testkit::free_port;

/// `tollgate up --config CONFIG --data-dir DATA` with `env` (and `RUST_LOG=warn`), killed when
/// dropped.
pub struct Up(std::process::Child);

impl Up {
    pub fn start(config: &std::path::Path, data: &std::path::Path, env: &[(&str, &str)]) -> Up {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(["up", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        Up(cmd.spawn().expect("the tollgate binary starts"))
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn sigkill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

/// Waits (60 s at most) until something listens on `port`: a TCP connect, not a request (every
/// request through a gateway is metered).
pub async fn wait_for_listener(port: u16) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The upstream: `/fast` answers in 10 ms, `/slow/{id}` in 50 ms, `/fail` with a 503.
pub async fn start_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let consumer = req
                        .headers()
                        .get("x-tollgate-consumer")
                        .map(|v| v.to_str().unwrap().to_string());
                    let leaked_key = req.headers().contains_key("x-api-key");
                    let (delay, status) = match path.as_str() {
                        "/fast" => (10, StatusCode::OK),
                        p if p.starts_with("/slow/") => (50, StatusCode::OK),
                        _ => (0, StatusCode::SERVICE_UNAVAILABLE),
                    };
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let body = serde_json::json!({"consumer": consumer, "leaked_key": leaked_key})
                        .to_string();
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub fn new() -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes), String> {
        let mut req = Request::get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }

    /// The JSON body of a GET that must answer 200 (the body is in the failure message).
    pub async fn ok_json(&self, url: &str, token: Option<&str>) -> Value {
        let (s, v) = self.json(url, token).await;
        assert_eq!(s, StatusCode::OK, "GET {url}: {v}");
        v
    }

    pub async fn json(&self, url: &str, token: Option<&str>) -> (StatusCode, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let (s, b) = self.get(url, &headers).await.unwrap();
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }
}

/// Each thread of `pid` that is still there: its name, and `read(file)` of its `/proc` folder
/// for the file named.
#[cfg(target_os = "linux")]
fn each_thread<T>(pid: u32, file: &str, read: impl Fn(&str) -> T) -> Vec<(String, T)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            // None: the thread ended meanwhile.
            let text = std::fs::read_to_string(task.path().join(file)).ok()?;
            Some((comm.trim().to_string(), read(&text)))
        })
        .collect()
}

/// Whether a thread of this process may go to `SCHED_IDLE` and come back (root,
/// `CAP_SYS_NICE`, `RLIMIT_NICE` of 20 or more), tried on a thread of its own.
#[cfg(target_os = "linux")]
pub fn may_leave_sched_idle() -> bool {
    std::thread::spawn(|| {
        let set = |policy| {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: sets the calling thread's class; `param` is a valid struct on the stack.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
            rc == 0
        };
        set(libc::SCHED_IDLE) && set(libc::SCHED_BATCH)
    })
    .join()
    .unwrap()
}

/// The scheduling class (`policy`, field 41 of `/proc/PID/task/TID/stat`) of each thread of
/// `pid`, with the thread's name.
#[cfg(target_os = "linux")]
pub fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    each_thread(pid, "stat", |stat| {
        // The fields after the name (which may hold spaces) start at field 3.
        let after_name = &stat[stat.rfind(')').expect("stat has the name in parentheses") + 2..];
        after_name
            .split(' ')
            .nth(41 - 3)
            .and_then(|p| p.parse().ok())
            .expect("stat has a policy field")
    })
}

/// The cores each thread of process `pid` may run on (`Cpus_allowed_list` of its status, as
/// the kernel writes it: `0-3`, `1`, `0,2`), by thread name.
#[cfg(target_os = "linux")]
pub fn thread_cores(pid: u32) -> Vec<(String, String)> {
    each_thread(pid, "status", cores_allowed)
}

/// `Cpus_allowed_list` of a `/proc/.../status` text.
pub fn cores_allowed(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("status has Cpus_allowed_list")
        .trim()
        .to_string()
}

/// The scheduling classes `thread_policies` reports.
pub const SCHED_OTHER: u32 = 0;
pub const SCHED_BATCH: u32 = 3;
pub const SCHED_IDLE: u32 = 5;
