//! Keeps the quota state fresh by polling the query API's `/v1/quota` with the version of the
//! state it holds (`since`, `epoch`), so each poll carries only the consumers whose entry
//! changed. Failures keep the last known state in force; its age is exported as
//! `tollgate_gateway_quota_state_age_seconds`. The state is also written to `quota-state.json`
//! in the gateway's state directory (after a change, at most every [`PERSIST_EVERY`]), and a
//! gateway that starts while the query API is down enforces that file's state.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;
use crate::quota::QuotaState;

/// How often at most a changed state is written to disk (the whole state: with 100,000
/// consumers, megabytes).
pub const PERSIST_EVERY: Duration = Duration::from_secs(10);

pub struct QuotaFeed {
    pub url: String,
    /// Where the last known state is kept (`None`: memory only).
    pub persist: Option<std::path::PathBuf>,
    pub token: Option<String>,
    pub poll: Duration,
    pub state: Arc<QuotaState>,
    pub metrics: GatewayMetrics,
}

impl QuotaFeed {
    /// Loads the last known state from disk, if any (called before serving).
    pub fn load_persisted(&self) {
        let Some(path) = &self.persist else { return };
        let Ok(bytes) = std::fs::read(path) else {
            return;
        };
        match self.state.update_json(&bytes) {
            Ok(_) => {
                let at = self
                    .state
                    .position()
                    .map_or(0, |(version, _)| version / 1000);
                tracing::info!(file = %path.display(), "starting from the last known quota state");
                self.state
                    .updated_at
                    .store(at.max(0) as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable quota state file")
            }
        }
    }

    /// Writes the state to its file on a blocking thread: with 100,000 consumers it is
    /// megabytes of JSON and a sync, which would otherwise hold a runtime thread (the event
    /// publisher's, say) for as long.
    async fn persist(&self) {
        let Some(path) = self.persist.clone() else {
            return;
        };
        let state = self.state.clone();
        let written = tokio::task::spawn_blocking(move || {
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| {
                    tollgate_schemas::fsutil::write_atomic_with(&path, |out| {
                        state.write_snapshot(out)
                    })
                });
            (path, written)
        })
        .await;
        if let Ok((path, Err(e))) = written {
            tracing::warn!(file = %path.display(), error = %e, "cannot keep the quota state on disk");
        }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut failing = false;
        let (mut dirty, mut persisted_at) = (false, None::<std::time::Instant>);
        loop {
            match self.fetch(&client).await {
                Ok(changed) => {
                    if failing {
                        tracing::info!(url = %self.url, "quota state reachable again");
                        failing = false;
                    }
                    dirty |= changed;
                }
                Err(e) if !failing => {
                    tracing::warn!(url = %self.url, error = %e, "cannot refresh quota state; enforcing the last known state");
                    failing = true;
                }
                Err(_) => {}
            }
            if dirty && persisted_at.is_none_or(|t| t.elapsed() >= PERSIST_EVERY) {
                self.persist().await;
                (dirty, persisted_at) = (false, Some(std::time::Instant::now()));
            }
            let updated = self.state.updated_at.load(Ordering::Relaxed);
            if updated > 0 {
                let now = chrono::Utc::now().timestamp().max(0) as u64;
                self.metrics
                    .quota_state_age
                    .set(now.saturating_sub(updated) as i64);
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if dirty {
                        self.persist().await;
                    }
                    return;
                }
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    /// The URL of the next poll: with the held state's position, if any.
    fn poll_url(&self) -> String {
        match self.state.position() {
            Some((version, epoch)) => {
                let sep = if self.url.contains('?') { '&' } else { '?' };
                format!("{}{sep}since={version}&epoch={epoch}", self.url)
            }
            None => self.url.clone(),
        }
    }

    /// Polls once and applies the answer; `Ok(true)` when it changed the state held.
    async fn fetch(
        &self,
        client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    ) -> Result<bool, String> {
        let mut req = http::Request::get(self.poll_url());
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        self.state
            .update_json(&body)
            .map_err(|e| format!("not a quota answer: {e}"))
    }
}
