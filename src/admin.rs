//! The admin listener of a part running as its own process (`tollgate gateway`, `tollgate
//! collector`): `/metrics` (Prometheus text), `/healthz` (the process is up) and `/readyz` (its
//! bus and store answer). In `tollgate up` the query API serves these for every part.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Says whether the part can do its work.
pub type Readiness = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Binds `addr` (errors name `key`) and serves until `shutdown`.
pub async fn serve(
    key: &str,
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Readiness,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, crate::config::ConfigError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| crate::config::ConfigError(format!("{key}: cannot listen on {addr}: {e}")))?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready().await {
                        Ok(()) => (StatusCode::OK, "ready".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
                        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
                    }
                    let ct = HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    );
                    ([(header::CONTENT_TYPE, ct)], out).into_response()
                }
            }),
        );
    tracing::info!(%addr, "admin listener (/metrics, /healthz, /readyz)");
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    }))
}
