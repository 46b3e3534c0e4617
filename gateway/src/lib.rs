//! The data plane: routing, proxying, API-key auth, rate limits, quotas and event emission.
//!
//! The data plane is a thread per core (`gateway.workers`), in the way nginx and Pingora are
//! built: each worker thread runs its own single-threaded runtime, accepts on its own
//! SO_REUSEPORT socket, forwards through its own pool of idle upstream connections and buffers
//! its own events, so a request stays on one thread from accept to record. What the workers
//! share (routes, keys, rate limits, quota state) is read-mostly. HTTP/1.1 is spoken by the
//! gateway's own codec on both sides (`h1.rs`, `conn.rs`): one task per client connection, which
//! reads a request head, runs the phases (`proxy.rs`) and writes the upstream's request and the
//! client's answer straight from the parsed offsets.
//!
//! The request path never waits on analytics: events go from the worker's buffer through a
//! bounded queue to a batching task (`events.rs`); quota state is read from memory and
//! refreshed in the background (`quota_feed.rs`). When the query API or the bus is down, the
//! gateway keeps routing with what it last knew, and says so in its logs and metrics.

pub mod auth;
mod closing;
pub mod config;
mod conn;
mod deadline;
pub mod events;
pub mod h1;
#[cfg(feature = "http2")]
mod http2;
pub mod limits;
pub mod metrics;
pub mod pace;
mod prefetch;
mod proxy;
pub mod quota;
mod quota_feed;
mod recorder;
mod reload;
pub mod router;
#[cfg(feature = "tls")]
mod tls;
pub mod trace;
mod turn;
mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_bus::Publisher;
use tollgate_schemas::config::Plan;
pub use tollgate_schemas::directory::Directory;

pub use config::{GatewayConfig, IoUringSetting, PinWorkers};
pub use metrics::GatewayMetrics;
pub use reload::Reloader;

/// Gateway errors.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// State shared by every request.
pub struct Shared {
    gateway_id: String,
    router: router::Router,
    auth: auth::Authenticators,
    rate_limits: limits::RateLimits,
    /// `routes[].rate_limit`, by route position.
    route_limits: limits::RouteLimits,
    quota: Arc<quota::QuotaState>,
    /// Each route's upstream, by the route's position in the configuration.
    route_upstreams: Vec<Arc<upstream::Upstream>>,
    /// Plans with a quota: whose consumers a stale quota state refuses under `when_stale:
    /// closed`.
    quota_plans: std::collections::HashSet<String>,
    /// How many upstream targets there are (they are numbered from 0).
    targets: usize,
    timeouts: conn::Timeouts,
    /// `gateway.trust_forwarded_for`.
    trust_forwarded_for: bool,
    /// `gateway.tls`: the listener's certificate, read when this state was built.
    #[cfg(feature = "tls")]
    tls: Option<Arc<tls::Acceptor>>,
}

/// Each route's upstream, in route order (routes of one upstream share it, and its round
/// robin), and the number of targets.
fn route_upstreams(
    config: &GatewayConfig,
) -> Result<(Vec<Arc<upstream::Upstream>>, usize), GatewayError> {
    let mut by_name = HashMap::new();
    let mut targets = 0;
    for (name, u) in &config.upstreams {
        let upstream = upstream::Upstream::new(u, targets)
            .map_err(|e| GatewayError::Config(format!("gateway.upstreams.{name}: {e}")))?;
        targets += upstream.target_count();
        by_name.insert(name.as_str(), Arc::new(upstream));
    }
    // `bind` validated the configuration: every route names a configured upstream.
    let routes = config
        .routes
        .iter()
        .map(|r| by_name[r.upstream.as_str()].clone())
        .collect();
    Ok((routes, targets))
}

/// A gateway bound to its listeners, ready to serve.
pub struct Gateway {
    /// One listening socket per worker thread, all on the same address (SO_REUSEPORT).
    listeners: Vec<std::net::TcpListener>,
    addr: SocketAddr,
    live: Arc<reload::Live>,
    /// The configuration it was bound with (what a reload may not change).
    started: Arc<GatewayConfig>,
    sink: events::EventSink,
    /// Events a worker buffers before handing them to the publisher.
    worker_batch: usize,
    metrics: GatewayMetrics,
    publisher: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    feed: Option<quota_feed::QuotaFeed>,
    /// Makes request spans, when they are exported (`with_tracer`).
    tracer: Option<trace::Tracing>,
    /// Runs first on each worker thread (`with_worker_start`).
    worker_start: Option<fn(WorkerSeat)>,
}

/// Which worker a worker thread is, handed to the start hook ([`Gateway::with_worker_start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSeat {
    /// This worker's number, from 0.
    pub index: usize,
    /// How many workers the gateway runs.
    pub workers: usize,
    /// `gateway.pin_workers`: whether to bind the thread to a core.
    pub pin: PinWorkers,
}

/// How long a worker holds its first buffered event before handing the buffer on: bounds what
/// buffering adds to freshness.
///
/// Each hand-over wakes the publisher's thread (a futex or eventfd wake-up and a context
/// switch, sometimes a sleeping core's too). At 2 ms, the two workers of a loaded `tollgate up`
/// woke the runtime's threads about 500 times a second whatever their batches held; at 10 ms,
/// about 280 (`perf record -e sched:sched_wakeup`, BENCHMARKS.md). A loaded worker now hands
/// over a full batch (`events.batch_max`, at most 256) or every 10 ms. An event waits at most 10 ms
/// more here, and usually less in all: the publisher holds a partial batch until the publish in
/// flight is durable (the embedded log syncs every 50 ms), gathering what comes meanwhile.
const WORKER_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// `n` listening sockets on `addr` with SO_REUSEPORT, so that the kernel spreads incoming
/// connections over the worker threads (port 0: the first socket picks the port, the others
/// join it).
///
/// SO_REUSEPORT would also let this process share a port another process of the same user
/// already listens on with it (a second gateway started by mistake would silently take half
/// the connections). So the address is first bound without it: a port in use fails here with
/// "address in use", as a plain listener would.
fn listeners(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut at = std::net::TcpListener::bind(addr)?.local_addr()?;
    for _ in 0..n {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(at),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&at.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        at = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

impl Gateway {
    /// Validates, binds the listener and builds the state (no traffic yet).
    pub async fn bind(
        config: GatewayConfig,
        directory: Arc<Directory>,
        plans: &BTreeMap<String, Plan>,
        bus: Arc<dyn Publisher>,
        metrics: GatewayMetrics,
    ) -> Result<Gateway, GatewayError> {
        config.validate().map_err(GatewayError::Config)?;
        let listeners = listeners(config.listen, config.worker_threads()).map_err(|source| {
            GatewayError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let addr = listeners[0]
            .local_addr()
            .map_err(|source| GatewayError::Bind {
                addr: config.listen,
                source,
            })?;
        let (sink, publisher) = events::channel(
            config.events.queue_capacity,
            config.events.batch_max,
            bus,
            metrics.clone(),
        );
        let quota = Arc::new(quota::QuotaState::new(
            directory.clone(),
            config.quota.stale_after_s,
            config.quota.when_stale,
        ));
        let feed = config.quota.url.as_ref().map(|url| quota_feed::QuotaFeed {
            url: url.clone(),
            answer_timeout: quota_feed::ANSWER_TIMEOUT,
            persist: (!config.state_dir.as_os_str().is_empty())
                .then(|| config.state_dir.join("quota-state.json")),
            token: config.quota.token.clone(),
            poll: std::time::Duration::from_millis(config.quota.poll_ms.unwrap_or(1000)),
            state: quota.clone(),
            metrics: metrics.clone(),
        });
        let shared = Arc::new(reload::build_shared(
            &config, directory, plans, &metrics, quota,
        )?);
        Ok(Gateway {
            listeners,
            addr,
            live: Arc::new(reload::Live::new(shared)),
            started: Arc::new(config.clone()),
            sink,
            worker_batch: config.events.batch_max.clamp(1, 256),
            metrics,
            publisher: Box::pin(publisher),
            feed,
            tracer: None,
            worker_start: None,
        })
    }

    /// Records a span per request and per phase with `tracer` (see `trace`).
    pub fn with_tracer(mut self, tracer: trace::Tracing) -> Gateway {
        self.tracer = Some(tracer);
        self
    }

    /// Runs `start` first on each worker thread, before its runtime is built. The binary sets
    /// the thread's scheduling class with it (the workers are spawned from a runtime thread of
    /// the background class and would otherwise inherit it) and binds the thread to its core
    /// as `gateway.pin_workers` says; this crate holds no `unsafe` for it.
    pub fn with_worker_start(mut self, start: fn(WorkerSeat)) -> Gateway {
        self.worker_start = Some(start);
        self
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that replaces this gateway's configuration while it serves.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            live: self.live.clone(),
            started: self.started.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Serves until `shutdown`: one thread per listener, each running a single-threaded runtime
    /// that accepts, forwards and records its connections' requests. Then stops accepting, lets
    /// open requests finish, and drains the event queue to the bus.
    pub async fn run(self, shutdown: CancellationToken) {
        let Gateway {
            listeners,
            addr,
            live,
            started,
            sink,
            worker_batch,
            metrics,
            publisher,
            feed,
            tracer,
            worker_start,
        } = self;
        let publisher = spawn_publisher(publisher);
        live.start(shutdown.clone());
        if let Some(feed) = feed {
            feed.load_persisted();
            tokio::spawn(feed.run(shutdown.clone()));
        }
        let count = listeners.len();
        tracing::info!(
            %addr,
            workers = count,
            pin_workers = started.pin_workers.as_str(),
            io_uring = started.io_uring.as_str(),
            "gateway listening"
        );
        let ring = started.io_uring != config::IoUringSetting::Off;
        let mut workers = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let seat = WorkerSeat {
                index: i,
                workers: count,
                pin: started.pin_workers,
            };
            let start = WorkerStart {
                live: live.clone(),
                events: events::LocalSink::new(sink.clone(), worker_batch),
                metrics: metrics.clone(),
                tracer: tracer.clone(),
                shutdown: shutdown.clone(),
            };
            let (done, finished) = tokio::sync::oneshot::channel::<()>();
            let spawned = std::thread::Builder::new()
                .name(format!("tollgate-gw-{i}"))
                .spawn(move || {
                    if let Some(start) = worker_start {
                        start(seat);
                    }
                    // Its turn's upstream requests leave together before it parks.
                    match turn::worker_runtime(ring) {
                        Ok((rt, _)) => rt.block_on(serve(listener, start)),
                        Err(e) => tracing::error!(error = %e, "gateway worker runtime failed"),
                    }
                    let _ = done.send(());
                });
            match spawned {
                Ok(_) => workers.push(finished),
                Err(e) => tracing::error!(error = %e, worker = i, "gateway worker thread failed"),
            }
        }
        drop(sink); // the workers hold the remaining senders; the publisher ends after them
        drop(live);
        for w in workers {
            let _ = w.await;
        }
        let _ = publisher.await;
        tracing::info!("gateway stopped");
    }
}

/// The name of the thread that publishes the workers' events to the bus.
pub const PUBLISHER_THREAD: &str = "tollgate-events";

/// Runs the publisher (`events::channel`) on a thread of its own, on a single-threaded runtime;
/// the receiver resolves once it has published the last event (or could not start).
///
/// Why not on the process's shared runtime: there each hand-over from a worker woke one of that
/// runtime's threads, which often woke another to share the work, and each publish's write and
/// sync went through the blocking pool and back, every hop a wake-up and a context switch. On
/// the two-core reference machine under load that was about 1,300 context switches a second,
/// 0.02 per request, for work that needs one thread (BENCHMARKS.md, twenty-ninth round).
fn spawn_publisher(
    publisher: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) -> tokio::sync::oneshot::Receiver<()> {
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name(PUBLISHER_THREAD.into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(publisher),
                Err(e) => tracing::error!(error = %e, "event publisher runtime failed"),
            }
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "event publisher thread failed");
    }
    finished
}

/// What a worker thread starts from.
struct WorkerStart {
    live: Arc<reload::Live>,
    events: events::LocalSink,
    metrics: GatewayMetrics,
    tracer: Option<trace::Tracing>,
    shutdown: CancellationToken,
}

/// One worker: accepts on its own listener until shutdown, serves each connection on this
/// thread, then waits for open requests to finish and hands its buffered events on.
async fn serve(listener: std::net::TcpListener, start: WorkerStart) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "gateway worker cannot use its listener");
            return;
        }
    };
    let WorkerStart {
        live,
        events,
        metrics,
        tracer,
        shutdown,
    } = start;
    // This worker's own cancellation node: each connection waiting for its next request
    // registers with it, so the workers do not contend on one shared waiter list.
    let shutdown = shutdown.child_token();
    let stop_flusher = CancellationToken::new();
    let flusher = tokio::spawn(
        events
            .clone()
            .run_flusher(WORKER_LINGER, stop_flusher.clone()),
    );
    let slot = Arc::new(reload::WorkerSlot::new(live, events, metrics, tracer));
    let tracker = tokio_util::task::TaskTracker::new();
    let closing = closing::Closing::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(accept(
            slot.clone(),
            stream,
            peer,
            shutdown.clone(),
            closing.clone(),
        ));
    }
    // Connections between requests close now; those in an exchange finish it first.
    closing.close();
    drop(listener);
    tracker.close();
    tracker.wait().await;
    stop_flusher.cancel();
    let _ = flusher.await;
}

/// Serves an accepted connection: TLS first when `gateway.tls` is set (HTTP/2 when ALPN chose
/// it), else plain HTTP/1.1 (or h2c, by its preface).
async fn accept(
    slot: Arc<reload::WorkerSlot>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    closing: Arc<closing::Closing>,
) {
    #[cfg(feature = "tls")]
    {
        let worker = slot.worker();
        if let Some(tls) = worker.shared.tls.clone() {
            let within = worker.shared.timeouts.head;
            drop(worker);
            let Some(accepted) = tls.accept(stream, within).await else {
                return;
            };
            #[cfg(feature = "http2")]
            if accepted.h2 {
                return http2::serve(slot, accepted.stream, peer, shutdown).await;
            }
            let stream = conn::Stream::Tls(Box::new(accepted.stream));
            return conn::serve(slot, stream, peer, shutdown, &closing).await;
        }
    }
    conn::serve(slot, stream.into(), peer, shutdown, &closing).await
}
