//! The data plane: routing, proxying, API-key auth, rate limits, quotas and event emission.
//!
//! The request path never waits on analytics: events go through a bounded queue to a batching
//! task (`events.rs`); quota state is read from memory and refreshed in the background
//! (`quota_feed.rs`). When the query API or the bus is down, the gateway keeps routing with what
//! it last knew, and says so in its logs and metrics.

pub mod auth;
pub mod body;
pub mod config;
pub mod events;
pub mod limits;
pub mod metrics;
mod proxy;
mod quota_feed;
pub mod router;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HeaderName;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_bus::Publisher;
use tollgate_schemas::config::{Consumer, Plan};
use tracing::Instrument;

pub use config::GatewayConfig;
pub use metrics::GatewayMetrics;

use crate::body::CountingBody;

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
    keys: auth::KeyTable,
    api_key_header: Option<HeaderName>,
    rate_limits: limits::RateLimits,
    quota: Arc<limits::QuotaState>,
    upstreams: HashMap<String, proxy::Upstream>,
    client: Client<HttpConnector, CountingBody>,
    sink: events::EventSink,
    metrics: GatewayMetrics,
}

/// A gateway bound to its listener, ready to serve.
pub struct Gateway {
    listener: TcpListener,
    shared: Arc<Shared>,
    publisher: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    feed: Option<quota_feed::QuotaFeed>,
}

impl Gateway {
    /// Validates, binds the listener and builds the state (no traffic yet).
    pub async fn bind(
        config: GatewayConfig,
        consumers: &[Consumer],
        plans: &BTreeMap<String, Plan>,
        bus: Arc<dyn Publisher>,
        metrics: GatewayMetrics,
    ) -> Result<Gateway, GatewayError> {
        config.validate().map_err(GatewayError::Config)?;
        if config.auth.jwt.is_some() {
            tracing::warn!(
                "gateway.auth.jwt is configured but JWT verification is not implemented yet; only API keys authenticate"
            );
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| GatewayError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .build(connector);
        let (sink, publisher) = events::channel(
            config.events.queue_capacity,
            config.events.batch_max,
            bus,
            metrics.clone(),
        );
        let quota = Arc::new(limits::QuotaState::default());
        let feed = config.quota.url.as_ref().map(|url| quota_feed::QuotaFeed {
            url: url.clone(),
            persist: (!config.state_dir.as_os_str().is_empty())
                .then(|| config.state_dir.join("quota-state.json")),
            token: config.quota.token.clone(),
            poll: std::time::Duration::from_millis(config.quota.poll_ms.unwrap_or(1000)),
            state: quota.clone(),
            metrics: metrics.clone(),
        });
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
            None if consumers.iter().any(|c| !c.api_keys.is_empty()) => {
                tracing::info!(
                    "gateway.auth.api_key is not set; checking API keys in the default header x-api-key"
                );
                Some(HeaderName::from_static("x-api-key"))
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            gateway_id: config.instance_id(),
            router: router::Router::build(&config.routes).map_err(GatewayError::Config)?,
            keys: auth::KeyTable::new(consumers).map_err(GatewayError::Config)?,
            api_key_header,
            rate_limits: limits::RateLimits::new(consumers, plans),
            quota,
            upstreams: config
                .upstreams
                .iter()
                .map(|(k, v)| (k.clone(), proxy::Upstream::new(v)))
                .collect(),
            client,
            sink,
            metrics,
        });
        Ok(Gateway {
            listener,
            shared,
            publisher: Box::pin(publisher),
            feed,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves until `shutdown`, then stops accepting, lets open requests finish, and drains the
    /// event queue to the bus.
    pub async fn run(self, shutdown: CancellationToken) {
        let Gateway {
            listener,
            shared,
            publisher,
            feed,
        } = self;
        let publisher = tokio::spawn(publisher);
        if let Some(feed) = feed {
            feed.load_persisted();
            tokio::spawn(feed.run(shutdown.clone()));
        }
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "gateway listening");
        let tracker = tokio_util::task::TaskTracker::new();
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
            let shared = shared.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let shared = shared.clone();
                    // One span per request (debug level: free unless asked for with RUST_LOG).
                    let span = tracing::debug_span!("request", method = %req.method(), path = %req.uri().path(), peer = %peer);
                    async move { Ok::<_, std::convert::Infallible>(shared.handle(req, peer).await) }.instrument(span)
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(30))
                    .serve_connection(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
        drop(listener);
        tracker.close();
        tracker.wait().await;
        drop(shared); // the last event sink goes with it; the publisher drains and stops
        let _ = publisher.await;
        tracing::info!("gateway stopped");
    }
}
