//! `/v1/quota`: each consumer's billable requests in the current period against its plan's
//! quota, the state every gateway enforces.
//!
//! The state is computed at most once per [`REFRESH`] whatever the number of callers, and kept
//! with the version at which each consumer's entry last changed. A gateway asks with the
//! `since` version and `epoch` of its last answer and gets only what changed after it, so with
//! 100,000 consumers an idle deployment moves a few bytes a second instead of rebuilding
//! megabytes of JSON on both sides. Any other `since` (none, or from another query-API process
//! or one this process no longer knows) gets the whole state.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::Scope;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tollgate_schemas::config::Plan;
use tollgate_schemas::directory::Directory;
use tollgate_schemas::quota::{QuotaEntryRef, write_snapshot};

use crate::AppState;
use crate::error::ApiError;
use crate::params::{Params, period_name, period_of, rfc3339};

/// How old the computed state may be before a request recomputes it.
pub const REFRESH: Duration = Duration::from_millis(250);

/// Full answers of more entries than this are sent as they are written ([`streamed`]).
const STREAM_ABOVE: usize = 4096;
/// The bytes of JSON a streamed answer sends at a time.
const CHUNK: usize = 64 * 1024;

/// The last computed state, shared by every caller. Per consumer it holds two numbers, not an
/// entry: the JSON entries are built for the consumers an answer carries (with 100,000
/// consumers, a few per second once the gateways are in step), so a refresh allocates nothing
/// per consumer and the cache costs 16 bytes per consumer.
#[derive(Debug, Clone)]
pub struct QuotaCache {
    /// Random per process: versions of another process do not compare.
    epoch: u64,
    /// The first version this process computed: a `since` before it is unknown here.
    base: Option<i64>,
    version: i64,
    computed_at: Option<Instant>,
    /// The store's `data_version` the counts were computed at, when it tells one.
    data_version: Option<u64>,
    /// The billing period the counts are of, `[start, end)` in microseconds.
    period: (i64, i64),
    /// The consumers the counts are of (a reload of `tollgate up` can replace them).
    consumers: Arc<Directory>,
    /// Per consumer of `consumers`, in its order.
    counts: Vec<Count>,
    /// The latest version at which any count changed: a caller that has it gets no entries,
    /// without a look at every consumer's count. (The gateways poll every second; with
    /// 100,000 consumers the look took about 1 % of a core while nothing changed.)
    latest_change: i64,
}

/// One consumer's billable requests in the period, and the version at which that last changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Count {
    used: u64,
    changed: i64,
}

impl Default for QuotaCache {
    fn default() -> Self {
        QuotaCache {
            epoch: rand_epoch(),
            base: None,
            version: 0,
            computed_at: None,
            data_version: None,
            period: (0, 0),
            consumers: Arc::default(),
            counts: Vec::new(),
            latest_change: 0,
        }
    }
}

fn rand_epoch() -> u64 {
    // The low half of a v7 UUID is random (62 bits): enough to tell processes apart.
    uuid::Uuid::now_v7().as_u64_pair().1
}

impl QuotaCache {
    /// Whether the answer for a caller holding the state at `since` of `epoch` is the whole
    /// state: the caller's version is of another process, or older than this one's first.
    fn known(&self, since: Option<(i64, u64)>, scope: Option<&str>) -> Option<(i64, u64)> {
        since.filter(|(v, e)| {
            *e == self.epoch && scope.is_none() && self.base.is_some_and(|b| *v >= b)
        })
    }

    /// Writes the answer (its JSON) for a caller holding the state at `since` of `epoch`,
    /// scoped to `scope`, to `out`, entry by entry from the counts: a full answer for 100,000
    /// consumers builds no entries (and their 400,000 strings) first.
    fn write_answer(
        &self,
        out: impl std::io::Write,
        plans: &BTreeMap<String, Plan>,
        since: Option<(i64, u64)>,
        scope: Option<&str>,
    ) -> std::io::Result<()> {
        let known = self.known(since, scope);
        let (period, period_end) = (period_name(self.period.0), rfc3339(self.period.1));
        let unchanged = known.is_some_and(|(since, _)| since >= self.latest_change);
        let entries = self
            .consumers
            .iter()
            .zip(&self.counts)
            .take(if unchanged { 0 } else { usize::MAX })
            .filter(|((id, _), n)| {
                scope.is_none_or(|sc| sc == *id) && known.is_none_or(|(since, _)| n.changed > since)
            })
            .map(|((id, plan), n)| {
                let limit = plans
                    .get(&**plan)
                    .and_then(|p| p.quota.as_ref())
                    .map(|q| q.requests);
                QuotaEntryRef::new(id, Some(plan), &period, &period_end, limit, n.used)
            });
        write_snapshot(out, self.version, self.epoch, known.is_none(), entries)
    }

    /// [`QuotaCache::write_answer`] into memory. A partial answer is small; a full one is
    /// sized for every consumer at once (a large buffer grown by doubling leaves its smaller
    /// copies behind in the allocator's heap).
    fn answer(
        &self,
        plans: &BTreeMap<String, Plan>,
        since: Option<(i64, u64)>,
        scope: Option<&str>,
    ) -> Vec<u8> {
        let expected = match (self.known(since, scope), scope) {
            (None, None) => self.counts.len(),
            _ => 1,
        };
        let mut out = Vec::with_capacity(64 + expected * 200);
        self.write_answer(&mut out, plans, since, scope)
            .expect("writing JSON into memory does not fail");
        out
    }

    /// Takes the counts of `period` (`used` gives each consumer's of `consumers`, in their
    /// order) at `version`: an entry changes when its count does, every entry when the period
    /// or the consumers do.
    fn update(
        &mut self,
        version: i64,
        period: (i64, i64),
        consumers: &Arc<Directory>,
        used: impl ExactSizeIterator<Item = u64>,
    ) {
        let same_period = self.period == period
            && Arc::ptr_eq(&self.consumers, consumers)
            && self.counts.len() == used.len();
        self.consumers = consumers.clone();
        if !same_period {
            self.counts.clear();
        }
        self.counts.resize(
            used.len(),
            Count {
                used: 0,
                changed: version,
            },
        );
        for (n, used) in self.counts.iter_mut().zip(used) {
            if !same_period || n.used != used {
                *n = Count {
                    used,
                    changed: version,
                };
                self.latest_change = version;
            }
        }
        if !same_period {
            self.latest_change = version;
        }
        self.period = period;
        self.version = version;
        self.base.get_or_insert(version);
        self.computed_at = Some(Instant::now());
    }
}

/// Recomputes the state when it is older than [`REFRESH`] and the store's data may have changed
/// since (an idle deployment queries nothing: the gateways' polls are answered from the cache).
async fn refresh(s: &AppState, cache: &mut QuotaCache) -> Result<(), ApiError> {
    if cache.computed_at.is_some_and(|t| t.elapsed() < REFRESH) {
        return Ok(());
    }
    let now = chrono::Utc::now().timestamp_micros();
    let (start, end) = period_of(now);
    let data_version = s.store.data_version();
    let consumers = s.consumers();
    if cache.computed_at.is_some()
        && data_version.is_some()
        && data_version == cache.data_version
        && cache.period == (start, end)
        && Arc::ptr_eq(&cache.consumers, &consumers)
    {
        return Ok(());
    }
    let used = s.store.billable_by_consumer(start, end).await?;
    let version = (now / 1000).max(cache.version + 1);
    cache.data_version = data_version;
    cache.update(
        version,
        (start, end),
        &consumers,
        consumers
            .iter()
            .map(|(id, _)| used.get(id).copied().unwrap_or(0)),
    );
    Ok(())
}

/// The query parameters `/v1/quota` accepts.
pub(crate) const QUOTA_PARAMS: &[&str] = &["consumer", "since", "epoch"];

pub async fn quota(
    State(s): State<Arc<AppState>>,
    Scope(scope): Scope,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let p = Params::new(raw, QUOTA_PARAMS)?;
    let since: Option<i64> = integer(&p, "since")?;
    let epoch: Option<u64> = integer(&p, "epoch")?;
    if since.is_some() != epoch.is_some() {
        return Err(ApiError::bad("since", "`since` and `epoch` go together"));
    }
    let since = since.zip(epoch);
    let mut cache = s.quota.lock().await;
    refresh(&s, &mut cache).await?;
    let json = [(header::CONTENT_TYPE, "application/json")];
    if scope.is_none() && cache.known(since, None).is_none() && cache.counts.len() > STREAM_ABOVE {
        // The whole state: written from a copy of the counts (16 bytes a consumer) as it is
        // sent, never all in memory (17 MB of JSON for 100,000 consumers).
        let (cache, s) = (cache.clone(), s.clone());
        let body = streamed(move |out| cache.write_answer(out, &s.plans, since, None));
        return Ok((json, body).into_response());
    }
    let body = cache.answer(&s.plans, since, scope.as_deref());
    Ok((json, body).into_response())
}

/// A body whose bytes `write` writes on a blocking thread, sent [`CHUNK`] bytes at a time as
/// they are written: at most two chunks wait for the connection. A failure while writing
/// ends the body with an error, which cuts the connection, so the client cannot take a
/// truncated answer for a whole one; so does a client that takes no chunk for [`STALL`]
/// (the writer gives up rather than hold its thread for as long as the connection lasts).
fn streamed(
    write: impl FnOnce(&mut ChunkWriter) -> std::io::Result<()> + Send + 'static,
) -> axum::body::Body {
    streamed_with(STALL, write)
}

/// How long a streamed answer's writer waits for the client to take a chunk.
const STALL: Duration = Duration::from_secs(60);

fn streamed_with(
    stall: Duration,
    write: impl FnOnce(&mut ChunkWriter) -> std::io::Result<()> + Send + 'static,
) -> axum::body::Body {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = finished.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = ChunkWriter {
            chunk: Vec::with_capacity(CHUNK),
            tx,
            stall,
            runtime: tokio::runtime::Handle::current(),
        };
        match write(&mut out).and_then(|()| std::io::Write::flush(&mut out)) {
            Ok(()) => done.store(true, std::sync::atomic::Ordering::Release),
            // Best effort: the body ends with an error whether or not this one gets through.
            Err(e) => drop(out.tx.try_send(Err(e))),
        }
    });
    let chunks = futures::stream::unfold(Some(rx), move |rx| {
        let finished = finished.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(chunk) => Some((chunk, Some(rx))),
                None if finished.load(std::sync::atomic::Ordering::Acquire) => None,
                None => Some((Err(std::io::Error::other("the answer was cut short")), None)),
            }
        }
    });
    axum::body::Body::from_stream(chunks)
}

/// Sends what is written to it in chunks of about [`CHUNK`] bytes (see [`streamed`]).
struct ChunkWriter {
    chunk: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
    stall: Duration,
    runtime: tokio::runtime::Handle,
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.chunk.extend_from_slice(buf);
        if self.chunk.len() >= CHUNK {
            self.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        let sent = self.runtime.block_on(tokio::time::timeout(
            self.stall,
            self.tx.send(Ok(chunk.into())),
        ));
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the caller left",
            )),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the caller took nothing",
            )),
        }
    }
}

/// An optional integer parameter.
fn integer<T: std::str::FromStr>(p: &Params, name: &'static str) -> Result<Option<T>, ApiError> {
    p.get(name)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad(name, format!("`{v}` is not an integer")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_schemas::quota::{QuotaLevel, QuotaSnapshot};

    fn directory(ids: &[&str]) -> Arc<Directory> {
        let consumers: Vec<_> = ids
            .iter()
            .map(|id| tollgate_schemas::config::Consumer {
                id: id.to_string(),
                plan: "p".into(),
                api_keys: vec![],
            })
            .collect();
        Arc::new(Directory::new(&consumers).unwrap())
    }

    fn setup() -> (Arc<Directory>, BTreeMap<String, Plan>) {
        let consumers = directory(&["a", "b", "c"]);
        let plan: Plan = serde_json::from_value(serde_json::json!({"quota": {"requests": 10}}))
            .expect("a plan with a quota");
        (consumers, [("p".to_string(), plan)].into())
    }

    const NOV: (i64, i64) = (1_761_955_200_000_000, 1_764_547_200_000_000);

    /// A cache of epoch 7 that took `counts` (of consumers a, b, c) at versions 100, 200, ...
    fn counted(counts: &[[u64; 3]]) -> (QuotaCache, BTreeMap<String, Plan>) {
        let (consumers, plans) = setup();
        let mut cache = QuotaCache {
            epoch: 7,
            ..Default::default()
        };
        for (i, c) in counts.iter().enumerate() {
            cache.update(100 * (i as i64 + 1), NOV, &consumers, c.iter().copied());
        }
        (cache, plans)
    }

    #[test]
    fn a_caller_gets_what_changed_since_its_version_of_this_epoch_and_otherwise_everything() {
        let (cache, plans) = counted(&[[1, 2, 3], [1, 4, 3], [1, 4, 5]]);
        let answer = |since, scope| -> QuotaSnapshot {
            serde_json::from_slice(&cache.answer(&plans, since, scope)).unwrap()
        };
        let names = |s: &QuotaSnapshot| -> Vec<String> {
            s.consumers.iter().map(|e| e.consumer.clone()).collect()
        };
        let delta = answer(Some((200, 7)), None);
        assert!(!delta.full);
        assert_eq!(names(&delta), ["c"]);
        assert_eq!(delta.version, 300);
        let c = &delta.consumers[0];
        assert_eq!(
            (c.used, c.limit, c.remaining, c.state),
            (5, Some(10), Some(5), QuotaLevel::Ok)
        );
        assert_eq!(
            (c.period.as_str(), c.period_end.as_str()),
            ("2025-11", "2025-12-01T00:00:00.000Z")
        );
        assert_eq!(names(&answer(Some((100, 7)), None)), ["b", "c"]);
        assert!(answer(Some((300, 7)), None).consumers.is_empty());
        for full in [
            answer(None, None),
            answer(Some((200, 8)), None), // another process
            answer(Some((50, 7)), None),  // before this process knew
        ] {
            assert!(full.full);
            assert_eq!(names(&full), ["a", "b", "c"]);
        }
        let own = answer(Some((200, 7)), Some("a"));
        assert!(own.full);
        assert_eq!(names(&own), ["a"]);
    }

    #[test]
    fn a_caller_with_the_latest_change_gets_nothing_however_many_recomputes_since() {
        // Recomputed at 300 with nothing changed.
        let (cache, plans) = counted(&[[1, 2, 3], [1, 4, 3], [1, 4, 3]]);
        assert_eq!(cache.latest_change, 200);
        let answer = |since| -> QuotaSnapshot {
            serde_json::from_slice(&cache.answer(&plans, Some((since, 7)), None)).unwrap()
        };
        for since in [200, 250, 300] {
            let nothing = answer(since);
            assert!(!nothing.full && nothing.consumers.is_empty(), "{since}");
            assert_eq!(nothing.version, 300);
        }
        let changed = answer(199);
        assert_eq!(changed.consumers.len(), 1);
        assert_eq!(changed.consumers[0].consumer, "b");
    }

    /// The bytes of a body, or the error that ended it.
    async fn body_bytes(body: axum::body::Body) -> Result<Vec<u8>, String> {
        use http_body_util::BodyExt;
        body.collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn a_streamed_answer_is_the_answer_written_whole() {
        let ids: Vec<String> = (0..STREAM_ABOVE * 3).map(|i| format!("c{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let (_, plans) = setup();
        let consumers = directory(&refs);
        let mut cache = QuotaCache::default();
        cache.update(100, NOV, &consumers, (0..ids.len()).map(|i| i as u64 % 13));
        let whole = cache.answer(&plans, None, None);
        assert!(whole.len() > 4 * CHUNK, "several chunks");
        let (copy, p) = (cache.clone(), plans.clone());
        let sent = body_bytes(streamed(move |out| copy.write_answer(out, &p, None, None)))
            .await
            .unwrap();
        assert!(sent == whole, "the same bytes");
        let snap: QuotaSnapshot = serde_json::from_slice(&sent).unwrap();
        assert!(snap.full && snap.consumers.len() == ids.len());
        assert_eq!(snap.consumers[14].used, 1);

        // A failure while writing ends the body with an error, after what was sent.
        let failed = body_bytes(streamed(|out| {
            std::io::Write::write_all(out, &vec![b' '; 3 * CHUNK])?;
            Err(std::io::Error::other("the store went away"))
        }))
        .await;
        assert!(failed.unwrap_err().contains("the store went away"));
    }

    #[tokio::test]
    async fn a_writer_whose_caller_takes_nothing_gives_up() {
        let gave_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = gave_up.clone();
        let body = streamed_with(Duration::from_millis(200), move |out| {
            let chunk = vec![b' '; CHUNK];
            let written = (0..10).try_for_each(|_| std::io::Write::write_all(out, &chunk));
            flag.store(written.is_err(), std::sync::atomic::Ordering::Release);
            written
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gave_up.load(std::sync::atomic::Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the writer still waits");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // What was queued before it gave up, then an error (its own did not fit in the full
        // queue): never a whole-looking answer.
        let err = body_bytes(body).await.unwrap_err();
        assert!(err.contains("cut short"), "{err}");
    }

    #[test]
    fn a_new_period_changes_every_entry() {
        let (consumers, plans) = setup();
        let mut cache = QuotaCache::default();
        let epoch = cache.epoch;
        cache.update(100, NOV, &consumers, [1, 2, 3].into_iter());
        cache.update(200, (NOV.1, NOV.1 + 1), &consumers, [0, 0, 0].into_iter());
        let delta: QuotaSnapshot =
            serde_json::from_slice(&cache.answer(&plans, Some((100, epoch)), None)).unwrap();
        assert_eq!(delta.consumers.len(), 3);
        assert!(
            delta
                .consumers
                .iter()
                .all(|e| e.used == 0 && e.period == "2025-12")
        );
    }

    #[test]
    fn other_consumers_change_every_entry() {
        let (consumers, plans) = setup();
        let mut cache = QuotaCache::default();
        let epoch = cache.epoch;
        cache.update(100, NOV, &consumers, [1, 2, 3].into_iter());
        // As many consumers, in other positions: b left, d came.
        let reloaded = directory(&["a", "d", "c"]);
        cache.update(200, NOV, &reloaded, [1, 0, 3].into_iter());
        let delta: QuotaSnapshot =
            serde_json::from_slice(&cache.answer(&plans, Some((100, epoch)), None)).unwrap();
        let names: Vec<&str> = delta.consumers.iter().map(|e| &*e.consumer).collect();
        assert_eq!(names, ["a", "d", "c"]);
        assert!(!delta.full);
    }
}
