//! The `tollgate` command: composes the gateway, bus, collector, store and query API, either all
//! in one process (`up`, on the embedded bus and store) or one part per process.

mod admin;
mod alloc;
mod config;
mod demo;
mod sched;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tollgate_bus::{Bus, BusError};
use tollgate_gateway::Directory;
use tollgate_store::{EventWriter, StoreError};

use crate::config::{Config, ConfigError};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "API gateway with built-in usage metering, billing and observability"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process: gateway, embedded bus, collector, Parquet store, query API.
    Up {
        /// Configuration file (default: the built-in demo configuration).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also run a demo upstream and a traffic generator with several partners.
        #[arg(long)]
        demo: bool,
        /// Where the bus log, the store and the dead letters live.
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Only the gateway (scaled deployment: Kafka bus).
    Gateway {
        #[arg(long)]
        config: PathBuf,
        /// The gateway's local state (last known quota state).
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Only a collector (scaled deployment: Kafka bus, ClickHouse store).
    Collector {
        #[arg(long)]
        config: PathBuf,
        /// The collector's local state (dead letters when the bus has no topic for them).
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Only the query API and dashboards (scaled deployment: ClickHouse store).
    QueryApi {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Validates a configuration file; errors name the key and line.
    CheckConfig { file: PathBuf },
    /// Prints the `sha256:...` form of an API key for the `consumers:` section.
    HashKey { key: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Processes that hold a store (see `alloc`); a standalone gateway keeps glibc's defaults,
    // its request path and librdkafka's threads allocate on many threads at once (with up to
    // eight arenas per core, a fixed 8 MiB trim threshold would let each keep that much).
    if matches!(
        cli.command,
        Command::Up { .. } | Command::Collector { .. } | Command::QueryApi { .. }
    ) {
        alloc::limit_arenas();
        alloc::fix_thresholds();
    }
    // Logging starts once the configuration (which says how to log) is read; errors before
    // that are printed as they are.
    let result = match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                for w in config.warnings() {
                    eprintln!("warning: {w}");
                }
                println!("{}: ok", file.display());
                return ExitCode::SUCCESS;
            }
            Err(e) => Err(e.into()),
        },
        Command::HashKey { key } => {
            println!("{}", tollgate_schemas::keys::hash_key(&key));
            return ExitCode::SUCCESS;
        }
        Command::Up {
            config,
            demo,
            data_dir,
        } => config
            .as_deref()
            .map(Config::load)
            .transpose()
            .map_err(anyhow::Error::from)
            .and_then(|loaded| {
                start_logging(loaded.as_ref());
                run_process(up(loaded, config, demo, data_dir), true)
            }),
        Command::Gateway { config, data_dir } => load_part(&config, &data_dir, Part::Gateway)
            .and_then(|c| {
                start_logging(Some(&c));
                run_process(gateway(c, config, data_dir), true)
            }),
        Command::Collector { config, data_dir } => load_part(&config, &data_dir, Part::Collector)
            .and_then(|c| {
                start_logging(Some(&c));
                run_process(collector(c), false)
            }),
        Command::QueryApi { config, data_dir } => load_part(&config, &data_dir, Part::QueryApi)
            .and_then(|c| {
                start_logging(Some(&c));
                run_process(query_api(c), false)
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Starts logging as `config` says (the default without one), then logs its warnings.
fn start_logging(config: Option<&Config>) {
    let format = config.map_or(Default::default(), |c| c.telemetry.log_format);
    telemetry::init_logging(format);
    for w in config.map(Config::warnings).unwrap_or_default() {
        tracing::warn!("{w}");
    }
}

/// Runs a long-lived part to its end on a new runtime, handing free memory back to the system
/// every few seconds meanwhile (`alloc::trim_every`). In a process with a request path
/// (`with_gateway`), the runtime's threads are background work (`sched`).
fn run_process(
    part: impl Future<Output = anyhow::Result<()>>,
    with_gateway: bool,
) -> anyhow::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if with_gateway {
        runtime.on_thread_start(sched::background);
        // This thread drives `part`, which opens the bus: the Kafka client's threads are
        // started from it or from each other, and inherit its class (`sched`).
        sched::background();
    }
    let runtime = runtime.build().expect("tokio runtime");
    runtime.block_on(async {
        let trimmer = tokio::spawn(alloc::trim_every(alloc::TRIM_PERIOD));
        let result = part.await;
        trimmer.abort();
        result
    })
}

/// The parts that run as their own process.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Gateway,
    Collector,
    QueryApi,
    /// Every part in one process (`tollgate up`): embedded backends are fine.
    All,
}

/// Loads the configuration of one part and checks that what it shares with the other parts
/// (bus, store) can be shared between processes.
fn load_part(
    path: &std::path::Path,
    data_dir: &std::path::Path,
    part: Part,
) -> anyhow::Result<Config> {
    let mut config = Config::load(path)?;
    config.resolve_paths(data_dir);
    let needs_bus = matches!(part, Part::Gateway | Part::Collector);
    let needs_store = matches!(part, Part::Collector | Part::QueryApi);
    if needs_bus && !config.bus.is_shared() {
        return Err(ConfigError(
            "bus.kind: `embedded` lives inside one process; run the parts separately on `kafka`, or everything with `tollgate up`".into(),
        )
        .into());
    }
    if needs_store && !config.store.is_shared() {
        return Err(ConfigError(
            "store.kind: `parquet` lives inside one process; run the parts separately on `clickhouse`, or everything with `tollgate up`".into(),
        )
        .into());
    }
    Ok(config)
}

/// A backend compiled out of this build is a configuration error (exit 2) that names the
/// feature; other failures to open are run-time errors.
/// The configured consumers as the table every part shares, taking them out of `config`: the
/// parsed list is not needed again (a reload reads the file anew), and with 100,000
/// consumers it is tens of megabytes.
fn take_consumers(config: &mut Config) -> Result<Arc<Directory>, ConfigError> {
    let consumers = std::mem::take(&mut config.consumers);
    Directory::new(&consumers)
        .map(Arc::new)
        .map_err(|e| ConfigError(format!("consumers: {e}")))
}

fn bus_error(e: BusError) -> anyhow::Error {
    match e {
        BusError::NotBuilt { .. } => ConfigError(e.to_string()).into(),
        e => anyhow::Error::from(e).context("opening the bus"),
    }
}

/// A gateway section the gateway refuses (bad keys, JWT in a build without it) is a
/// configuration error (exit 2); failing to listen is not.
fn gateway_error(e: tollgate_gateway::GatewayError) -> anyhow::Error {
    match e {
        tollgate_gateway::GatewayError::Config(_) => ConfigError(e.to_string()).into(),
        e => e.into(),
    }
}

fn store_error(e: StoreError) -> anyhow::Error {
    match e {
        StoreError::NotBuilt { .. } => ConfigError(e.to_string()).into(),
        e => anyhow::Error::from(e).context("opening the store"),
    }
}

/// The quota feed defaults to the query API this configuration names.
fn default_quota_feed(config: &mut Config, api_addr: std::net::SocketAddr) {
    if config.gateway.quota.url.is_none() {
        config.gateway.quota.url = Some(format!("http://{api_addr}/v1/quota"));
        config.gateway.quota.token = config.query_api.admin_tokens.first().cloned();
    }
}

/// The gateway's publisher: a remote bus gets the disk spool in front of it, and its delivery
/// and spool counters go to `registry`.
fn gateway_publisher(
    config: &Config,
    bus: &dyn Bus,
    registry: &mut Registry,
) -> anyhow::Result<Arc<dyn tollgate_bus::Publisher>> {
    let publisher = bus.publisher().map_err(bus_error)?;
    if !config.bus.is_shared() {
        return Ok(publisher); // the embedded log is on local disk already
    }
    if let Some(stats) = bus.delivery_stats() {
        registry.register_collector(Box::new(stats));
    }
    let spool = tollgate_bus::spool::SpoolingPublisher::open(
        publisher,
        tollgate_bus::spool::SpoolConfig {
            dir: config.gateway.state_dir.join("spool"),
            max_bytes: config.gateway.spool.max_bytes,
            high_water: config.gateway.spool.high_water_events,
        },
    )
    .map_err(bus_error)?;
    registry.register_collector(Box::new(spool.stats()));
    Ok(spool)
}

async fn gateway(
    mut config: Config,
    path: std::path::PathBuf,
    data_dir: std::path::PathBuf,
) -> anyhow::Result<()> {
    let bus = config.bus.open().await.map_err(bus_error)?;
    let api_addr = config.query_api.listen;
    default_quota_feed(&mut config, api_addr);
    let mut registry = Registry::default();
    let publisher = gateway_publisher(&config, &*bus, &mut registry)?;
    let metrics = tollgate_gateway::GatewayMetrics::register(&mut registry);
    let stop = CancellationToken::new();
    let gateway = tollgate_gateway::Gateway::bind(
        config.gateway.clone(),
        take_consumers(&mut config)?,
        &config.plans,
        publisher,
        metrics,
    )
    .await
    .map_err(gateway_error)?;
    let gateway = gateway.with_worker_start(sched::request_path);
    tokio::spawn(sched::pin_while_busy(stop.clone()));
    // The producer's threads on idle cores while the bus keeps up (`sched`'s module docs).
    if let Some(stats) = bus.delivery_stats() {
        tokio::spawn(sched::kafka_client_on_idle_cores(
            move || stats.backlog.load(std::sync::atomic::Ordering::Relaxed),
            config.gateway.spool.high_water_events,
            stop.clone(),
        ));
    }
    let (gateway, spans) = with_span_export(gateway, &config)?;
    let admin = admin::serve(
        "gateway.admin_listen",
        config.gateway.admin_listen,
        Arc::new(registry),
        // A gateway serves while the bus is down (it spools; `/metrics` shows the backlog), so
        // it is ready as soon as it listens.
        Arc::new(|| Box::pin(async { Ok(()) })),
        stop.clone(),
    )
    .await?;
    alloc::release_free_memory();
    let stopping = shutdown_signal();
    tracing::info!(
        proxy = %format!("http://{}", gateway.local_addr()),
        admin = %config.gateway.admin_listen,
        "tollgate gateway started (admin listener: /metrics, /healthz, /readyz)"
    );
    let reloads = tokio::spawn(reload_on_change(
        gateway.reloader(),
        (path, data_dir, Part::Gateway),
        (api_addr, None),
        stop.clone(),
    ));
    let serving = tokio::spawn(gateway.run(stop.clone()));
    stopping.await;
    tracing::info!("shutting down: draining requests and delivering their events");
    reloads.abort();
    stop.cancel();
    let _ = serving.await;
    let _ = admin.await;
    if let Some(spans) = spans {
        spans.shutdown();
    }
    Ok(())
}

/// The gateway with its request spans exported, when `telemetry.otlp` asks for it.
fn with_span_export(
    gateway: tollgate_gateway::Gateway,
    config: &Config,
) -> anyhow::Result<(tollgate_gateway::Gateway, Option<telemetry::SpanExport>)> {
    let Some(otlp) = &config.telemetry.otlp else {
        return Ok((gateway, None));
    };
    let export = telemetry::export_spans(otlp, &config.gateway.instance_id())?;
    Ok((gateway.with_tracer(export.tracer.clone()), Some(export)))
}

async fn collector(config: Config) -> anyhow::Result<()> {
    let bus = config.bus.open().await.map_err(bus_error)?;
    let mut store = config.store.open().await.map_err(store_error)?;
    let mut registry = Registry::default();
    let metrics = tollgate_collector::CollectorMetrics::register(&mut registry);
    let stop = CancellationToken::new();
    let (ready_bus, ready_store) = (bus.clone(), store.query.clone());
    let admin = admin::serve(
        "collector.admin_listen",
        config.collector.admin_listen,
        Arc::new(registry),
        Arc::new(move || {
            let (bus, store) = (ready_bus.clone(), ready_store.clone());
            Box::pin(async move {
                if !bus.ready().await {
                    return Err("bus unreachable".to_string());
                }
                if !store.ready().await {
                    return Err("store unreachable".to_string());
                }
                Ok(())
            })
        }),
        stop.clone(),
    )
    .await?;
    let upkeep_stop = stop.clone();
    let writer = store.writer.clone();
    let upkeep = tokio::spawn(async move { store.upkeep(upkeep_stop).await });
    let running = tokio::spawn(supervise_collector(
        config.collector.clone(),
        bus,
        writer,
        metrics,
        stop.clone(),
    ));
    let stopping = shutdown_signal();
    tracing::info!(
        group = %config.collector.group,
        admin = %config.collector.admin_listen,
        "tollgate collector started (admin listener: /metrics, /healthz, /readyz)"
    );
    stopping.await;
    tracing::info!("shutting down: flushing the last batch and committing");
    stop.cancel();
    let result = running.await;
    let _ = upkeep.await;
    let _ = admin.await;
    result.context("collector task")?
}

async fn query_api(mut config: Config) -> anyhow::Result<()> {
    let store = config.store.open().await.map_err(store_error)?;
    let listener = tollgate_query_api::bind(&config.query_api)
        .await
        .map_err(ConfigError)?;
    let addr = listener.local_addr()?;
    let consumers = take_consumers(&mut config)?;
    let state = tollgate_query_api::AppState::new(
        &config.query_api,
        store.query.clone(),
        consumers,
        config.plans.clone(),
        Registry::default(),
    );
    alloc::release_free_memory();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(tollgate_query_api::serve(
        listener,
        Arc::new(state),
        stop.clone(),
    ));
    let stopping = shutdown_signal();
    tracing::info!(url = %format!("http://{addr}/"), "tollgate query API and dashboards started");
    stopping.await;
    stop.cancel();
    serving.await.context("query API task")??;
    Ok(())
}

/// Reloads the gateway's configuration on SIGHUP, and when the file's modification time
/// changes (checked every 2 s). The file is read as at start-up (environment overrides
/// included); a file that does not load or validate leaves the running configuration in force,
/// says why in the log, and sets `tollgate_gateway_config_reload_failed`.
async fn reload_on_change(
    reloader: tollgate_gateway::Reloader,
    (path, data_dir, part): (std::path::PathBuf, std::path::PathBuf, Part),
    (api_addr, api): (
        std::net::SocketAddr,
        Option<Arc<tollgate_query_api::AppState>>,
    ),
    stop: CancellationToken,
) {
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = modified(&path);
    #[cfg(unix)]
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; the configuration reloads on file change only");
            None
        }
    };
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            _ = hangup => {
                seen = modified(&path);
                "SIGHUP"
            }
            // Every two seconds, with the process's other samplers (`pace`).
            _ = tollgate_gateway::pace::tick(std::time::Duration::from_secs(2)) => {
                let now = modified(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                "the file changed"
            }
        };
        let loaded = match load_part(&path, &data_dir, part) {
            Ok(mut c) => {
                default_quota_feed(&mut c, api_addr);
                reloader
                    .reload(&c.gateway, &c.consumers, &c.plans)
                    .map(|consumers| {
                        // One consumer table: the query API computes the quota state the
                        // gateway enforces for the consumers the gateway now knows.
                        if let Some(api) = &api {
                            api.set_consumers(consumers);
                        }
                    })
                    .map_err(|e| anyhow::anyhow!(e))
            }
            Err(e) => {
                reloader.refused();
                Err(e)
            }
        };
        match loaded {
            Ok(()) => {
                tracing::info!(file = %path.display(), trigger = why, "configuration reloaded")
            }
            Err(e) => tracing::error!(
                file = %path.display(),
                trigger = why,
                error = %format!("{e:#}"),
                "configuration refused; the running one stays"
            ),
        }
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the
/// future is first awaited: a signal that arrives right after start-up is a clean shutdown too.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        async move {
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The built-in demo configuration, its upstream pointed at `demo_upstream`.
fn demo_config(demo_upstream: Option<std::net::SocketAddr>) -> Result<Config, ConfigError> {
    let addr = demo_upstream
        .map(|a| a.to_string())
        .unwrap_or_else(|| "127.0.0.1:9".into());
    Config::parse(
        &demo::CONFIG.replace("DEMO_UPSTREAM", &addr),
        "built-in demo configuration",
        std::env::vars(),
    )
}

async fn up(
    from_file: Option<Config>,
    config_path: Option<PathBuf>,
    demo: bool,
    data_dir: PathBuf,
) -> anyhow::Result<()> {
    let stop_traffic = CancellationToken::new();
    let demo_upstream = if demo {
        Some(
            demo::start_upstream(stop_traffic.clone())
                .await
                .context("starting the demo upstream")?,
        )
    } else {
        None
    };
    let mut config = match from_file {
        Some(c) => c,
        None => demo_config(demo_upstream)?,
    };
    config.resolve_paths(&data_dir);

    let mut registry = Registry::default();
    let gateway_metrics = tollgate_gateway::GatewayMetrics::register(&mut registry);
    let collector_metrics = tollgate_collector::CollectorMetrics::register(&mut registry);

    let bus = config.bus.open().await.map_err(bus_error)?;
    let mut store = config.store.open().await.map_err(store_error)?;
    let publisher = gateway_publisher(&config, &*bus, &mut registry)?;

    // Query API first: the gateway polls it for quota state.
    let api_listener = tollgate_query_api::bind(&config.query_api)
        .await
        .map_err(ConfigError)?;
    let api_addr = api_listener.local_addr()?;
    default_quota_feed(&mut config, api_addr);

    let stop_gateway = CancellationToken::new();
    // One consumer table for the gateway and the query API.
    let consumers = take_consumers(&mut config)?;
    let gateway = tollgate_gateway::Gateway::bind(
        config.gateway.clone(),
        consumers.clone(),
        &config.plans,
        publisher,
        gateway_metrics,
    )
    .await
    .map_err(gateway_error)?;
    let gateway = gateway.with_worker_start(sched::request_path);
    tokio::spawn(sched::pin_while_busy(stop_gateway.clone()));
    let (gateway, spans) = with_span_export(gateway, &config)?;
    let gateway_addr = gateway.local_addr();

    let state = tollgate_query_api::AppState::new(
        &config.query_api,
        store.query.clone(),
        consumers,
        config.plans.clone(),
        registry,
    );
    alloc::release_free_memory();
    let state = Arc::new(state);
    let stop_api = CancellationToken::new();
    let api = tokio::spawn(tollgate_query_api::serve(
        api_listener,
        state.clone(),
        stop_api.clone(),
    ));

    // The collector and the store's upkeep on threads of their own, on idle cores while the
    // collector keeps up (`sched::CatchUp`). Not with a Kafka bus: its client's threads, which
    // the consumer starts, would stay in the class they started in.
    let bound = Duration::from_millis(config.collector.yield_until_lag_ms);
    let embedded = matches!(config.bus, tollgate_bus::BusConfig::Embedded(_));
    let ingest = sched::CatchUp::start(embedded && !bound.is_zero())
        .context("starting the ingest thread")?;
    let stop_collector = CancellationToken::new();
    let caught_up = collector_metrics.caught_up.clone();
    tokio::spawn(ingest.governor(move || caught_up.get(), bound, stop_collector.clone()));
    let collector = ingest.spawn(supervise_collector(
        config.collector.clone(),
        bus.clone(),
        store.writer.clone(),
        collector_metrics,
        stop_collector.clone(),
    ));
    let compactor = {
        let stop = stop_collector.clone();
        ingest.spawn(async move { store.upkeep(stop).await })
    };
    // With a configuration file, the gateway reloads as `tollgate gateway` does, and the
    // query API takes the gateway's new consumer table (quota state, consumer keys). The other
    // parts keep what they started with: the plans (prices, quotas) change on a restart.
    let reloads = config_path.map(|path| {
        tokio::spawn(reload_on_change(
            gateway.reloader(),
            (path, data_dir.clone(), Part::All),
            (api_addr, Some(state.clone())),
            stop_gateway.clone(),
        ))
    });
    let gateway = tokio::spawn(gateway.run(stop_gateway.clone()));

    if demo {
        tokio::spawn(demo::run_traffic(gateway_addr, stop_traffic.clone()));
    }
    let stopping = shutdown_signal();
    tracing::info!(
        gateway = %format!("http://{gateway_addr}"),
        dashboards = %format!("http://{api_addr}/"),
        demo,
        "tollgate is up"
    );
    // A person at a terminal also gets the addresses to try; logs read by machines do not.
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("\nTollgate is up.");
        eprintln!("  gateway     http://{gateway_addr}");
        eprintln!("  dashboards  http://{api_addr}/");
        eprintln!("  query API   http://{api_addr}/v1/usage?group_by=consumer,route");
        if demo {
            eprintln!(
                "  demo traffic from 4 partners is flowing; try: curl -H 'x-api-key: demo-acme-key' http://{gateway_addr}/v1/orders/42"
            );
        }
        eprintln!("Press Ctrl-C to stop.\n");
    }

    stopping.await;
    tracing::info!("shutting down: draining the gateway, then flushing the collector");
    stop_traffic.cancel();
    if let Some(r) = reloads {
        r.abort();
    }
    stop_gateway.cancel();
    let _ = gateway.await;
    stop_collector.cancel();
    let collected = collector.await;
    let _ = compactor.await;
    drop(ingest);
    stop_api.cancel();
    let _ = api.await;
    if let Some(spans) = spans {
        spans.shutdown();
    }
    match collected {
        Ok(r) => r.context("collector")?,
        Err(e) => anyhow::bail!("collector task failed: {e}"),
    }
    Ok(())
}

/// Runs the collector, restarting it with backoff after a failure (a full disk, an unreachable
/// store). Meanwhile the gateway keeps serving and events wait in the bus; each restart resumes
/// exactly where the store's data ends (`EventWriter::reset` and `resume`), so nothing is lost
/// or counted twice.
async fn supervise_collector(
    config: tollgate_collector::CollectorConfig,
    bus: Arc<dyn Bus>,
    store: Arc<dyn EventWriter>,
    metrics: tollgate_collector::CollectorMetrics,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let attempt = async {
            let subscriber = bus.subscribe(&config.group).await?;
            let dead = match bus.dead_letters()? {
                Some(publisher) => tollgate_collector::DeadLetter::to_bus(publisher),
                None => tollgate_collector::DeadLetter::open(&config.dead_letter_dir)
                    .map_err(tollgate_collector::CollectorError::DeadLetter)?,
            };
            tollgate_collector::run(
                config.clone(),
                subscriber,
                store.clone(),
                dead,
                metrics.clone(),
                stop.clone(),
            )
            .await
        };
        let e: tollgate_collector::CollectorError = match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        metrics.restarts.inc();
        tracing::error!(error = %e, retry_in = ?backoff, "collector failed; the gateway keeps serving and events wait in the bus");
        tokio::select! {
            _ = stop.cancelled() => return Err(e.into()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
