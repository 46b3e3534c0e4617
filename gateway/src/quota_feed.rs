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
use futures::StreamExt;
use http_body_util::{BodyDataStream, BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::io::{StreamReader, SyncIoBridge};
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;
use crate::quota::QuotaState;

/// How often at most a changed state is written to disk (the whole state: with 100,000
/// consumers, megabytes).
pub const PERSIST_EVERY: Duration = Duration::from_secs(10);

/// How long an answer may take by default: a full answer for 100,000 consumers arrives in
/// under a second on one machine.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Answers of a known length up to this are read whole on the runtime's thread (what a poll
/// brings once the gateway is in step: the few entries that changed); longer ones, or of no
/// stated length (a full answer, which the query API sends as it writes it), are read as
/// they arrive on a blocking thread, which a poll a second would otherwise keep busy.
const READ_WHOLE: u64 = 1 << 20;

pub struct QuotaFeed {
    pub url: String,
    /// How long an answer may take, from the request to its last byte ([`ANSWER_TIMEOUT`]
    /// unless a test says otherwise): a query API that stops sending halfway must not hold
    /// the feed, and with it every later poll, for good.
    pub answer_timeout: Duration,
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
        let Ok(file) = std::fs::File::open(path) else {
            return;
        };
        match self.state.update_reader(std::io::BufReader::new(file)) {
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
                // On the poll's whole multiples, with the process's other samplers (`pace`).
                _ = crate::pace::tick(self.poll) => {}
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
        let (limit, deadline) = (
            self.answer_timeout,
            tokio::time::Instant::now() + self.answer_timeout,
        );
        let late = move || format!("no whole answer within {limit:?}");
        let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let small = http_body::Body::size_hint(resp.body())
            .exact()
            .is_some_and(|n| n <= READ_WHOLE);
        if !status.is_success() || small {
            let body = tokio::time::timeout_at(deadline, resp.into_body().collect())
                .await
                .map_err(|_| late())?
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!(
                    "status {status}: {}",
                    String::from_utf8_lossy(&body)
                ));
            }
            return self
                .state
                .update_json(&body)
                .map_err(|e| format!("not a quota answer: {e}"));
        }
        // Read as it arrives, on a blocking thread (see `QuotaState::update_reader`). Past the
        // deadline the body ends with an error, which fails the parse and ends the thread.
        let body = futures::stream::unfold(
            Some(BodyDataStream::new(resp.into_body())),
            move |body| async move {
                let mut body = body?;
                match tokio::time::timeout_at(deadline, body.next()).await {
                    Ok(Some(chunk)) => Some((chunk.map_err(std::io::Error::other), Some(body))),
                    Ok(None) => None,
                    Err(_) => Some((
                        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, late())),
                        None,
                    )),
                }
            },
        );
        let body = SyncIoBridge::new(StreamReader::new(Box::pin(body)));
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || state.update_reader(std::io::BufReader::new(body)))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("not a quota answer: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tollgate_schemas::config::Consumer;
    use tollgate_schemas::directory::Directory;
    use tollgate_schemas::quota::{QuotaEntry, QuotaSnapshot};

    /// Serves one HTTP/1.1 response per connection: `head`, then `body` in pieces of `piece`
    /// bytes written one at a time, then closes.
    async fn serve(head: String, body: Vec<u8>, piece: usize) -> String {
        serve_then(head, body, piece, false).await
    }

    /// [`serve`], and with `stall` the connection is then held open without another byte.
    async fn serve_then(head: String, body: Vec<u8>, piece: usize, stall: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let (head, body) = (head.clone(), body.clone());
                tokio::spawn(async move {
                    let mut req = [0u8; 4096];
                    let _ = conn.read(&mut req).await;
                    conn.write_all(head.as_bytes()).await.unwrap();
                    for p in body.chunks(piece) {
                        if conn.write_all(p).await.is_err() {
                            return;
                        }
                        conn.flush().await.unwrap();
                        tokio::task::yield_now().await;
                    }
                    if stall {
                        // Until the client gives up and closes.
                        let _ = conn.read(&mut req).await;
                    }
                });
            }
        });
        format!("http://{addr}/v1/quota")
    }

    fn feed(url: String, ids: &[String]) -> QuotaFeed {
        let consumers: Vec<Consumer> = ids
            .iter()
            .map(|id| Consumer {
                id: id.clone(),
                plan: "p".into(),
                api_keys: vec![],
            })
            .collect();
        let directory = Arc::new(Directory::new(&consumers).unwrap());
        QuotaFeed {
            url,
            answer_timeout: Duration::from_secs(2),
            persist: None,
            token: None,
            poll: Duration::from_secs(1),
            state: Arc::new(QuotaState::new(directory, None, Default::default())),
            metrics: GatewayMetrics::unregistered(),
        }
    }

    /// A full answer for `ids`, each with 10 requests a month and `used(i)` used.
    fn answer(ids: &[String], used: impl Fn(usize) -> u64) -> Vec<u8> {
        let end = (chrono::Utc::now() + chrono::Duration::days(3)).to_rfc3339();
        let snap = QuotaSnapshot {
            version: 5,
            epoch: 6,
            full: true,
            consumers: ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    QuotaEntry::new(
                        id.clone(),
                        Some("p".into()),
                        "2026-11".into(),
                        end.clone(),
                        Some(10),
                        used(i),
                    )
                })
                .collect(),
        };
        serde_json::to_vec(&snap).unwrap()
    }

    fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    #[tokio::test]
    async fn a_large_answer_is_applied_as_it_arrives() {
        let ids: Vec<String> = (0..20_000).map(|i| format!("consumer-{i}")).collect();
        let body = answer(&ids, |i| if i % 1000 == 0 { 10 } else { 1 });
        let chunked = {
            // Chunked transfer coding, as a streamed answer of the query API comes.
            let mut out = Vec::new();
            for c in body.chunks(3000) {
                out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                out.extend_from_slice(c);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        };
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
        let f = feed(serve(head.into(), chunked, 1500).await, &ids);
        assert_eq!(f.fetch(&client()).await, Ok(true));
        assert_eq!(f.state.position(), Some((5, 6)));
        let exceeded = f
            .state
            .snapshot()
            .consumers
            .iter()
            .filter(|e| e.used >= 10)
            .count();
        assert_eq!(exceeded, 20, "every 1000th consumer used its 10");
        assert_eq!(f.state.snapshot().consumers.len(), 20_000);
    }

    #[tokio::test]
    async fn an_answer_that_stops_halfway_times_out_and_changes_nothing() {
        let ids: Vec<String> = (0..2_000).map(|i| format!("consumer-{i}")).collect();
        let body = answer(&ids, |_| 10);
        let half = body[..body.len() / 2].to_vec();
        let sized = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        // Chunked: one chunk announced whole, half of it sent.
        let chunked = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_string();
        let mut first = format!("{:x}\r\n", body.len()).into_bytes();
        first.extend_from_slice(&half);
        for (head, sent) in [(sized, half.clone()), (chunked, first)] {
            let f = feed(serve_then(head, sent, 4096, true).await, &ids);
            let started = std::time::Instant::now();
            let err = f.fetch(&client()).await.unwrap_err();
            assert!(err.contains("no whole answer within 2s"), "{err}");
            assert!(started.elapsed() < Duration::from_secs(10));
            assert_eq!(f.state.position(), None);
        }
    }

    #[tokio::test]
    async fn an_answer_cut_short_changes_nothing_and_says_why() {
        // Read whole (a few entries) and read as it arrives (more than READ_WHOLE bytes).
        for n in [20, 10_000] {
            let ids: Vec<String> = (0..n).map(|i| format!("consumer-{i}")).collect();
            let body = answer(&ids, |_| 10);
            assert_eq!(body.len() as u64 > READ_WHOLE, n > 20);
            // The connection closes 100 bytes before the length it announced.
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let f = feed(
                serve(head, body[..body.len() - 100].to_vec(), 4096).await,
                &ids,
            );
            let err = f.fetch(&client()).await.unwrap_err();
            assert!(!err.is_empty());
            assert_eq!(f.state.position(), None, "{err}");
            assert!(f.state.snapshot().consumers.is_empty());
            // Whole, the same answer is taken either way.
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let f = feed(serve(head, body.clone(), 4096).await, &ids);
            assert_eq!(f.fetch(&client()).await, Ok(true));
            assert_eq!(f.state.snapshot().consumers.len(), n);
        }
        // What `status` with `body` makes of a poll.
        let poll = |status: &'static str, body: &'static [u8]| async move {
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let f = feed(serve(head, body.to_vec(), 4).await, &["a".to_string()]);
            f.fetch(&client()).await
        };
        let err = poll("200 OK", b"[]").await.unwrap_err();
        assert!(err.starts_with("not a quota answer"), "{err}");
        assert_eq!(
            poll("503 Service Unavailable", b"busy").await,
            Err("status 503 Service Unavailable: busy".into())
        );
    }
}
