//! The query API: an axum HTTP API over `UsageQuery` — latency, usage, revenue, billing exports
//! and quota state — plus the dashboards, the OpenAPI spec, health and Prometheus metrics.
//!
//! Authentication: `Authorization: Bearer <token>`. An admin token (`query_api.admin_tokens`)
//! sees everything; a consumer's own API key sees only that consumer's data. With no admin token
//! configured the API is open, and then it refuses to listen on anything but loopback.

mod auth;
mod billing;
pub mod error;
pub mod metrics;
#[cfg(feature = "openapi")]
pub mod openapi;
mod params;
pub mod pricing;
mod quota;
mod reports;
mod revenue;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tollgate_schemas::config::Plan;
use tollgate_schemas::directory::Directory;
use tollgate_store::UsageQuery;

pub use error::ApiError;

/// The `query_api:` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryApiConfig {
    /// Address of the API and dashboards.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer tokens that see everything. Empty: the API is open (loopback only).
    #[serde(default)]
    pub admin_tokens: Vec<String>,
    /// When billing periods count as complete (see `billing`).
    #[serde(default)]
    pub billing: BillingConfig,
}

/// The `query_api.billing:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// How long after a request starts its event may still reach the bus: the longest request
    /// (upstream timeouts and retries), the gateways' batching, and clock skew between gateways
    /// and collectors. A period is complete once the collectors have stored everything the bus
    /// held this long after its end. Events later than that (a spool replayed after a long
    /// broker outage) are billed as adjustments in the next export. Default two minutes.
    #[serde(default = "default_event_delay_ms")]
    pub event_delay_ms: u64,
}

fn default_event_delay_ms() -> u64 {
    120_000
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            event_delay_ms: default_event_delay_ms(),
        }
    }
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:9090".parse().expect("valid")
}

impl Default for QueryApiConfig {
    fn default() -> Self {
        QueryApiConfig {
            listen: default_listen(),
            admin_tokens: Vec::new(),
            billing: BillingConfig::default(),
        }
    }
}

impl QueryApiConfig {
    /// Checks the section without I/O; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.admin_tokens.is_empty() && !self.listen.ip().is_loopback() {
            return Err(format!(
                "query_api.listen: {} is not loopback, and with no query_api.admin_tokens the API would be open to everyone; add an admin token or listen on 127.0.0.1",
                self.listen
            ));
        }
        if let Some(i) = self.admin_tokens.iter().position(|t| t.trim().is_empty()) {
            return Err(format!("query_api.admin_tokens[{i}]: must not be empty"));
        }
        if let Some(i) = self.admin_tokens.iter().position(|t| t.len() < 16) {
            tracing::warn!(
                "query_api.admin_tokens[{i}] is shorter than 16 characters; use a long random token"
            );
        }
        Ok(())
    }
}

/// The consumer table in force. `tollgate up` replaces it when a reload changes the consumers
/// (with the gateway's, so that a consumer added by a reload is in the quota state the gateway
/// enforces); a query-API process keeps the one it started with.
#[derive(Debug)]
pub struct Consumers(std::sync::RwLock<Arc<Directory>>);

impl Consumers {
    pub fn new(directory: Arc<Directory>) -> Consumers {
        Consumers(std::sync::RwLock::new(directory))
    }

    /// The table in force.
    pub fn get(&self) -> Arc<Directory> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, directory: Arc<Directory>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = directory;
    }
}

/// What every handler shares.
pub struct AppState {
    pub store: Arc<dyn UsageQuery>,
    /// The configured consumers (shared with the gateway in a one-process deployment).
    consumers: Arc<Consumers>,
    /// The plans it started with: prices and quotas change on a restart (a report over a
    /// past window is priced as it was when the process started, not by a half-applied edit).
    pub plans: BTreeMap<String, Plan>,
    pub auth: auth::Authenticator,
    /// Every component's metrics, exposed at `/metrics`.
    pub registry: Arc<Registry>,
    /// This API's own metrics (registered in `registry`).
    pub metrics: Arc<metrics::ApiMetrics>,
    /// When billing periods are complete.
    pub billing: BillingConfig,
    /// The quota state, computed at most once per `quota::REFRESH` for every caller.
    quota: tokio::sync::Mutex<quota::QuotaCache>,
}

impl AppState {
    pub fn new(
        config: &QueryApiConfig,
        store: Arc<dyn UsageQuery>,
        consumers: Arc<Directory>,
        plans: BTreeMap<String, Plan>,
        mut registry: Registry,
    ) -> AppState {
        let consumers = Arc::new(Consumers::new(consumers));
        let auth = auth::Authenticator::new(&config.admin_tokens, consumers.clone());
        let metrics = Arc::new(metrics::ApiMetrics::register(&mut registry));
        AppState {
            store,
            consumers,
            plans,
            auth,
            registry: Arc::new(registry),
            metrics,
            billing: config.billing.clone(),
            quota: Default::default(),
        }
    }

    /// The consumer table in force.
    pub fn consumers(&self) -> Arc<Directory> {
        self.consumers.get()
    }

    /// Puts `directory` in force (a reload of `tollgate up` that changed the consumers): the
    /// next quota state is computed for its consumers, and their keys sign in.
    pub fn set_consumers(&self, directory: Arc<Directory>) {
        self.consumers.set(directory);
    }

    /// The one currency every priced plan uses, if there is exactly one.
    pub(crate) fn deployment_currency(&self) -> Option<String> {
        let currencies: std::collections::BTreeSet<&str> = self
            .plans
            .values()
            .filter_map(|p| p.pricing.as_ref())
            .map(|p| p.currency.as_str())
            .collect();
        (currencies.len() == 1)
            .then(|| currencies.into_iter().next().map(str::to_owned))
            .flatten()
    }

    /// The plan named `plan`, falling back to the consumer's configured plan.
    pub(crate) fn plan(&self, plan: Option<&str>, consumer: Option<&str>) -> Option<(&str, &Plan)> {
        let consumers;
        let name = match plan {
            Some(p) => p,
            None => {
                consumers = self.consumers.get();
                &**consumers.plan(consumers.position(consumer?)?)
            }
        };
        self.plans.get_key_value(name).map(|(k, v)| (k.as_str(), v))
    }
}

const OPENAPI: &str = include_str!("../openapi.json");
const DASHBOARD: &str = include_str!("../../dashboards/index.html");
const BUSINESS: &str = include_str!("../../dashboards/business.html");
const PARTNER: &str = include_str!("../../dashboards/partner.html");
const COMMON_JS: &str = include_str!("../../dashboards/tollgate.js");
const COMMON_CSS: &str = include_str!("../../dashboards/tollgate.css");
const UPLOT_JS: &str = include_str!("../../dashboards/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../dashboards/vendor/uPlot.min.css");

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/business", get(|| async { Html(BUSINESS) }))
        .route("/partner", get(|| async { Html(PARTNER) }))
        .route(
            "/assets/tollgate.js",
            get(|| async { asset(COMMON_JS, "text/javascript") }),
        )
        .route(
            "/assets/tollgate.css",
            get(|| async { asset(COMMON_CSS, "text/css") }),
        )
        .route(
            "/assets/uPlot.iife.min.js",
            get(|| async { asset(UPLOT_JS, "text/javascript") }),
        )
        .route(
            "/assets/uPlot.min.css",
            get(|| async { asset(UPLOT_CSS, "text/css") }),
        )
        .route(
            "/openapi.json",
            get(|| async { asset(OPENAPI, "application/json") }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/latency", get(reports::latency))
        .route("/v1/usage", get(reports::usage))
        .route("/v1/revenue", get(revenue::revenue))
        .route("/v1/billing/export", get(billing::export))
        .route("/v1/billing/exports", get(billing::exports))
        .route("/v1/quota", get(quota::quota))
        .fallback(|| async { ApiError::NotFound("no such endpoint; see /openapi.json".into()) })
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::track,
        ))
        .with_state(state)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.store.ready().await {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store not ready").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // The billing watermark, as of this scrape (a store that cannot say leaves the last value).
    if let Ok(Some(t)) = billing::complete_through(&state).await {
        state.metrics.complete_through.set(t.div_euclid(1_000_000));
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &state.registry) {
        return ApiError::Internal(format!("encoding metrics: {e}")).into_response();
    }
    let ct = HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");
    ([(header::CONTENT_TYPE, ct)], out).into_response()
}

/// Binds the listener (so callers learn the port before serving).
pub async fn bind(config: &QueryApiConfig) -> Result<tokio::net::TcpListener, String> {
    config.validate()?;
    tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("query_api.listen: cannot listen on {}: {e}", config.listen))
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "query API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
