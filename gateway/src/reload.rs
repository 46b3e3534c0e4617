//! Configuration reload: a new routing, authentication, limits and upstreams state, validated
//! and built whole before it replaces the one in force, so a reload never drops a request and
//! a refused file keeps the old configuration serving.
//!
//! How the swap reaches the worker threads: the state in force ([`Shared`]) sits in [`Live`]
//! with a generation number. Each worker thread holds its own `proxy::Worker` (the state, plus
//! the thread's idle upstream connections and its recorder) and, for every request, compares
//! its generation with the live one (one atomic load of a line that only changes on reload).
//! On a change it builds a new `proxy::Worker` for the new state: connections already inside
//! an exchange finish on the state they started with, and the old pool's idle connections are
//! closed when its last request ends.
//!
//! What a reload cannot change (it needs a restart, and the reload is refused with the key's
//! name): `listen`, `workers`, `pin_workers`, `io_uring`, `admin_listen`, `events`, `quota` (the feed and
//! its state survive a reload: quotas stay exact), `state_dir`, `spool`. Rate-limit buckets
//! start full after a reload.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::header::HeaderName;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::config::{Consumer, Plan};
use tollgate_schemas::directory::Directory;

use crate::metrics::ResultLabels;
use crate::{GatewayConfig, GatewayError, GatewayMetrics, Shared, auth, limits, router};

/// Builds the state for `config` (validated already), sharing `quota` with the one before.
pub(crate) fn build_shared(
    config: &GatewayConfig,
    directory: Arc<Directory>,
    plans: &BTreeMap<String, Plan>,
    metrics: &GatewayMetrics,
    quota: Arc<crate::quota::QuotaState>,
) -> Result<Shared, GatewayError> {
    let api_key_header = match &config.auth.api_key {
        Some(k) => Some(
            HeaderName::from_bytes(k.header.to_ascii_lowercase().as_bytes()).map_err(|_| {
                GatewayError::Config(format!(
                    "gateway.auth.api_key.header: `{}` is not a header name",
                    k.header
                ))
            })?,
        ),
        // Consumers with keys but no `auth.api_key` section: keys are still checked, in the
        // default header, rather than letting every caller through anonymously.
        None if directory.has_keys() => {
            tracing::info!(
                "gateway.auth.api_key is not set; checking API keys in the default header x-api-key"
            );
            Some(HeaderName::from_static("x-api-key"))
        }
        None => None,
    };
    let (route_upstreams, targets) = crate::route_upstreams(config)?;
    Ok(Shared {
        gateway_id: config.instance_id(),
        router: router::Router::build(&config.routes).map_err(GatewayError::Config)?,
        auth: auth::Authenticators::new(config, &directory, plans, api_key_header, metrics)
            .map_err(GatewayError::Config)?,
        rate_limits: limits::RateLimits::new(plans, &directory),
        route_limits: limits::RouteLimits::new(&config.routes),
        quota,
        route_upstreams,
        quota_plans: plans
            .iter()
            .filter(|(_, p)| p.quota.is_some())
            .map(|(name, _)| name.clone())
            .collect(),
        targets,
        timeouts: config.connections.into(),
        trust_forwarded_for: config.trust_forwarded_for,
        #[cfg(feature = "tls")]
        tls: match &config.tls {
            Some(t) => Some(Arc::new(
                crate::tls::Acceptor::new(t).map_err(GatewayError::Config)?,
            )),
            None => None,
        },
    })
}

/// The state in force, and its generation.
pub(crate) struct Live {
    generation: AtomicU64,
    shared: Mutex<Arc<Shared>>,
    /// Cancels the background tasks of the state in force (health checks, JWKS refresh).
    tasks: Mutex<Option<CancellationToken>>,
    /// The gateway's shutdown, once it runs: the parent of every generation's tasks.
    shutdown: Mutex<Option<CancellationToken>>,
}

impl Live {
    pub(crate) fn new(shared: Arc<Shared>) -> Live {
        Live {
            generation: AtomicU64::new(0),
            shared: Mutex::new(shared),
            tasks: Mutex::new(None),
            shutdown: Mutex::new(None),
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn current(&self) -> (u64, Arc<Shared>) {
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        (self.generation(), shared.clone())
    }

    /// Starts the background tasks of the state in force under `shutdown` (once serving).
    pub(crate) fn start(&self, shutdown: CancellationToken) {
        *self.shutdown.lock().unwrap_or_else(|p| p.into_inner()) = Some(shutdown);
        self.restart_tasks();
    }

    fn restart_tasks(&self) {
        let Some(parent) = self
            .shutdown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return; // not serving yet: `start` will
        };
        let token = parent.child_token();
        if let Some(old) = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(token.clone())
        {
            old.cancel();
        }
        let (_, shared) = self.current();
        #[cfg(feature = "jwt")]
        if let Some(jwt) = shared.auth.jwt() {
            tokio::spawn(jwt.refresh_every(token.clone()));
        }
        // Idle per-route buckets go every minute.
        let evicting = shared.clone();
        let stop = token.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        evicting.route_limits.evict_idle();
                        evicting.rate_limits.evict_idle();
                    }
                    _ = stop.cancelled() => return,
                }
            }
        });
        // Routes of one upstream share it: one checker per upstream.
        let mut checked: Vec<&Arc<crate::upstream::Upstream>> = Vec::new();
        for u in &shared.route_upstreams {
            if !checked.iter().any(|c| Arc::ptr_eq(c, u)) {
                checked.push(u);
                tokio::spawn(u.clone().check_health(token.clone()));
            }
        }
    }

    fn swap(&self, shared: Arc<Shared>) {
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = shared;
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.restart_tasks();
    }
}

/// Replaces a serving gateway's configuration (see the module docs).
#[derive(Clone)]
pub struct Reloader {
    pub(crate) live: Arc<Live>,
    /// The configuration the gateway started with: what a reload may not change.
    pub(crate) started: Arc<GatewayConfig>,
    pub(crate) metrics: GatewayMetrics,
}

impl Reloader {
    /// Validates `config`, builds its state and puts it in force; on any error the state in
    /// force stays, and the error names the key. Counted in
    /// `tollgate_gateway_config_reloads_total{result}`. Returns the consumer table now in
    /// force, for the parts of the process that share it (`tollgate up`'s query API).
    pub fn reload(
        &self,
        config: &GatewayConfig,
        consumers: &[Consumer],
        plans: &BTreeMap<String, Plan>,
    ) -> Result<Arc<Directory>, String> {
        let result = self.try_reload(config, consumers, plans);
        let label = ResultLabels {
            result: if result.is_ok() { "ok" } else { "error" },
        };
        self.metrics.config_reloads.get_or_create(&label).inc();
        self.metrics
            .config_reload_failed
            .set(i64::from(result.is_err()));
        result
    }

    /// Counts a configuration that could not even be read (a YAML or validation error found
    /// before `reload`): the running one stays.
    pub fn refused(&self) {
        let label = ResultLabels { result: "error" };
        self.metrics.config_reloads.get_or_create(&label).inc();
        self.metrics.config_reload_failed.set(1);
    }

    fn try_reload(
        &self,
        config: &GatewayConfig,
        consumers: &[Consumer],
        plans: &BTreeMap<String, Plan>,
    ) -> Result<Arc<Directory>, String> {
        config.validate()?;
        let s = &self.started;
        let fixed = [
            ("listen", config.listen == s.listen),
            ("workers", config.workers == s.workers),
            ("pin_workers", config.pin_workers == s.pin_workers),
            ("io_uring", config.io_uring == s.io_uring),
            ("admin_listen", config.admin_listen == s.admin_listen),
            ("events", config.events == s.events),
            ("quota", config.quota == s.quota),
            ("state_dir", config.state_dir == s.state_dir),
            ("spool", config.spool == s.spool),
        ];
        if let Some((key, _)) = fixed.iter().find(|(_, same)| !same) {
            return Err(format!(
                "gateway.{key} changed; it takes effect only on a restart (the running configuration stays)"
            ));
        }
        let (_, old) = self.live.current();
        // The same consumers keep their table, so that a reload of routes alone changes no
        // quota state (a new table makes the query API send every consumer's entry again).
        let directory = match (Directory::new(consumers)?, old.quota.directory()) {
            (new, current) if new == *current => current,
            (new, _) => Arc::new(new),
        };
        let shared = build_shared(
            config,
            directory.clone(),
            plans,
            &self.metrics,
            old.quota.clone(),
        )
        .map_err(|e| match e {
            GatewayError::Config(m) => m,
            other => other.to_string(),
        })?;
        // Requests authenticated against the old consumers until the swap find their quota
        // entry by id.
        old.quota.rebind(directory.clone());
        self.live.swap(Arc::new(shared));
        Ok(directory)
    }
}

/// One worker thread's view of the live state: its own `proxy::Worker` for the generation in
/// force, rebuilt when the generation changes.
pub(crate) struct WorkerSlot {
    live: Arc<Live>,
    current: Mutex<(u64, Arc<crate::proxy::Worker>)>,
    events: crate::events::LocalSink,
    metrics: GatewayMetrics,
    tracer: Option<crate::trace::Tracing>,
}

impl WorkerSlot {
    pub(crate) fn new(
        live: Arc<Live>,
        events: crate::events::LocalSink,
        metrics: GatewayMetrics,
        tracer: Option<crate::trace::Tracing>,
    ) -> WorkerSlot {
        let (generation, shared) = live.current();
        let worker = Self::build(shared, &events, &metrics, &tracer);
        WorkerSlot {
            live,
            current: Mutex::new((generation, Arc::new(worker))),
            events,
            metrics,
            tracer,
        }
    }

    fn build(
        shared: Arc<Shared>,
        events: &crate::events::LocalSink,
        metrics: &GatewayMetrics,
        tracer: &Option<crate::trace::Tracing>,
    ) -> crate::proxy::Worker {
        let recorder = crate::recorder::Recorder::new(
            &shared.gateway_id,
            metrics,
            shared.router.ids(),
            events.clone(),
            tracer.clone(),
        );
        crate::proxy::Worker {
            pool: crate::conn::Pool::new(shared.targets),
            shared,
            recorder,
        }
    }

    #[cfg(feature = "http2")]
    pub(crate) fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    /// The worker for the state in force. The lock is only ever taken by this slot's own
    /// thread (uncontended).
    pub(crate) fn worker(&self) -> Arc<crate::proxy::Worker> {
        let live = self.live.generation();
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != live {
            let (generation, shared) = self.live.current();
            *current = (
                generation,
                Arc::new(Self::build(
                    shared,
                    &self.events,
                    &self.metrics,
                    &self.tracer,
                )),
            );
        }
        current.1.clone()
    }
}
