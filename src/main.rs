//! The `tollgate` command: composes the gateway, bus, collector, store and query API, either all
//! in one process (`up`, on the embedded bus and store) or one part per process.

mod config;
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tollgate_bus::{BusConfig, EmbeddedLog};
use tollgate_store::{ParquetStore, StoreConfig};

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
    /// Only the gateway (scaled deployment).
    Gateway {
        #[arg(long)]
        config: PathBuf,
    },
    /// Only the collector (scaled deployment).
    Collector {
        #[arg(long)]
        config: PathBuf,
    },
    /// Only the query API and dashboards (scaled deployment).
    QueryApi {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validates a configuration file; errors name the key and line.
    CheckConfig { file: PathBuf },
    /// Prints the `sha256:...` form of an API key for the `consumers:` section.
    HashKey { key: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
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
        } => runtime().block_on(up(config, demo, data_dir)),
        Command::Gateway { config }
        | Command::Collector { config }
        | Command::QueryApi { config } => Config::load(&config)
            .map_err(anyhow::Error::from)
            .and_then(|c| scaled_unavailable(&c)),
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The one-part commands need a bus and a store shared between processes (Kafka, ClickHouse).
fn scaled_unavailable(config: &Config) -> anyhow::Result<()> {
    let (BusConfig::Embedded(_), StoreConfig::Parquet(_)) = (&config.bus, &config.store);
    Err(ConfigError(
        "bus.kind: `embedded` (and store.kind: `parquet`) live inside one process; run the parts separately on `kafka` and `clickhouse`, or run everything with `tollgate up`"
            .into(),
    )
    .into())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
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

async fn up(config_path: Option<PathBuf>, demo: bool, data_dir: PathBuf) -> anyhow::Result<()> {
    let stop_traffic = CancellationToken::new();
    // A configuration file is read and validated once, before anything starts.
    let from_file = config_path.as_deref().map(Config::load).transpose()?;
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

    let BusConfig::Embedded(bus_config) = config.bus.clone();
    let log = EmbeddedLog::open(bus_config).context("opening the bus log")?;
    let StoreConfig::Parquet(store_config) = config.store.clone();
    let store = ParquetStore::open(store_config).context("opening the store")?;

    // Query API first: the gateway polls it for quota state.
    let api_listener = tollgate_query_api::bind(&config.query_api)
        .await
        .map_err(ConfigError)?;
    let api_addr = api_listener.local_addr()?;
    if config.gateway.quota.url.is_none() {
        config.gateway.quota.url = Some(format!("http://{api_addr}/v1/quota"));
        config.gateway.quota.token = config.query_api.admin_tokens.first().cloned();
    }

    let stop_gateway = CancellationToken::new();
    let gateway = tollgate_gateway::Gateway::bind(
        config.gateway.clone(),
        &config.consumers,
        &config.plans,
        Arc::new(log.clone()),
        gateway_metrics,
    )
    .await?;
    let gateway_addr = gateway.local_addr();

    let state = tollgate_query_api::AppState::new(
        &config.query_api,
        Arc::new(store.clone()),
        config.consumers.clone(),
        config.plans.clone(),
        registry,
    )
    .map_err(ConfigError)?;
    let stop_api = CancellationToken::new();
    let api = tokio::spawn(tollgate_query_api::serve(
        api_listener,
        Arc::new(state),
        stop_api.clone(),
    ));

    let stop_collector = CancellationToken::new();
    let collector = tokio::spawn(supervise_collector(
        config.collector.clone(),
        log.clone(),
        store.clone(),
        collector_metrics,
        stop_collector.clone(),
    ));
    let compactor = {
        let store = store.clone();
        let stop = stop_collector.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                if let Err(e) = store.compact().await {
                    tracing::warn!(error = %e, "compaction failed; will retry");
                }
            }
        })
    };
    let gateway = tokio::spawn(gateway.run(stop_gateway.clone()));

    if demo {
        tokio::spawn(demo::run_traffic(gateway_addr, stop_traffic.clone()));
    }
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

    shutdown_signal().await;
    tracing::info!("shutting down: draining the gateway, then flushing the collector");
    stop_traffic.cancel();
    stop_gateway.cancel();
    let _ = gateway.await;
    stop_collector.cancel();
    let collected = collector.await;
    let _ = compactor.await;
    stop_api.cancel();
    let _ = api.await;
    match collected {
        Ok(r) => r.context("collector")?,
        Err(e) => anyhow::bail!("collector task failed: {e}"),
    }
    Ok(())
}

/// Runs the collector, restarting it with backoff after a failure (a full disk, say). Meanwhile
/// the gateway keeps serving and events wait in the bus log; each restart resumes exactly where
/// the store's durable data ends (`EventWriter::reset`), so nothing is lost or counted twice.
async fn supervise_collector(
    config: tollgate_collector::CollectorConfig,
    log: EmbeddedLog,
    store: ParquetStore,
    metrics: tollgate_collector::CollectorMetrics,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let subscriber = Box::new(log.subscribe(&config.group)?);
        let run = tollgate_collector::run(
            config.clone(),
            subscriber,
            Arc::new(store.clone()),
            metrics.clone(),
            stop.clone(),
        );
        let Err(e) = run.await else { return Ok(()) };
        metrics.restarts.inc();
        tracing::error!(error = %e, retry_in = ?backoff, "collector failed; the gateway keeps serving and events wait in the bus log");
        tokio::select! {
            _ = stop.cancelled() => return Err(e.into()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
