//! What the gateway's integration tests share: a gateway serving over an embedded bus log in a
//! temp dir, and the events it wrote there.
#![allow(dead_code)] // each test binary uses its own part

pub mod scripted;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate_bus::{EmbeddedConfig, EmbeddedLog, Subscriber};
use tollgate_gateway::{Gateway, GatewayConfig, GatewayMetrics};
use tollgate_schemas::RequestEvent;
use tollgate_schemas::config::{Consumer, Plan};

/// A gateway serving on a free port until `shutdown`.
pub struct Running {
    pub addr: SocketAddr,
    /// What it was started with, to reload it with changes.
    pub config: GatewayConfig,
    pub consumers: Vec<Consumer>,
    pub plans: BTreeMap<String, Plan>,
    pub reloader: tollgate_gateway::Reloader,
    pub metrics: GatewayMetrics,
    pub log: EmbeddedLog,
    pub shutdown: CancellationToken,
    pub running: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// Binds `config` (its `listen` is replaced by a free loopback port) and serves it.
pub async fn start(
    mut config: GatewayConfig,
    consumers: &[Consumer],
    plans: &BTreeMap<String, Plan>,
) -> Running {
    config.listen = "127.0.0.1:0".parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(EmbeddedConfig {
        dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    let metrics = GatewayMetrics::unregistered();
    let gw = Gateway::bind(
        config.clone(),
        Arc::new(tollgate_gateway::Directory::new(consumers).unwrap()),
        plans,
        Arc::new(log.clone()),
        metrics.clone(),
    )
    .await
    .unwrap();
    let addr = gw.local_addr();
    let reloader = gw.reloader();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(gw.run(shutdown.clone()));
    Running {
        addr,
        config,
        consumers: consumers.to_vec(),
        plans: plans.clone(),
        reloader,
        metrics,
        log,
        shutdown,
        running,
        _dir: dir,
    }
}

/// A consumer of `plan` whose API key is `key`.
pub fn consumer(id: &str, plan: &str, key: &str) -> Consumer {
    Consumer {
        id: id.into(),
        plan: plan.into(),
        api_keys: vec![tollgate_gateway::auth::hash_key(key)],
    }
}

/// The next `n` events on the bus (waits for them with a deadline), in the order their
/// requests began. The bus holds them in the order the worker threads handed their batches
/// over: a test's sequential requests on connections that landed on different workers can
/// reach it in another order (the order across workers is not a promise; `ts` is).
pub async fn events(sub: &mut dyn Subscriber, n: usize) -> Vec<RequestEvent> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} events arrived",
            out.len()
        );
        for m in sub
            .poll(n - out.len(), Duration::from_millis(100))
            .await
            .unwrap()
        {
            out.push(RequestEvent::from_json(&m.payload).unwrap());
        }
    }
    // Stable: events of one instant keep the bus's order.
    out.sort_by_key(|e| e.ts);
    out
}
