//! Event emission off the request path: `try_send` into a bounded queue (a full queue drops the
//! event and counts it — the request never waits), and one task that drains the queue in batches
//! and publishes them to the bus, retrying transient failures with backoff.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tollgate_bus::{Publisher, Record};
use tollgate_schemas::RequestEvent;

use crate::metrics::GatewayMetrics;

/// The request path's handle: never blocks.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<RequestEvent>,
    metrics: GatewayMetrics,
}

impl EventSink {
    /// Queues an event, or drops and counts it when the queue is full.
    pub fn emit(&self, ev: RequestEvent) {
        if self.tx.try_send(ev).is_err() {
            self.metrics
                .events_dropped
                .get_or_create(&crate::metrics::DropLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }
}

/// A worker thread's event buffer in front of the shared queue. Finished requests push onto a
/// local vector; the buffer moves to the queue when it holds `batch` events, or `linger` after
/// its first event, so the publisher (on another thread) is woken once per batch instead of once
/// per request. The lock is only ever taken by the worker's own thread (uncontended: no system
/// call); it is a lock rather than a `RefCell` so that response bodies stay `Send`.
#[derive(Clone)]
pub struct LocalSink {
    inner: Arc<LocalInner>,
}

struct LocalInner {
    buf: std::sync::Mutex<Vec<RequestEvent>>,
    /// Wakes the flusher when the buffer gets its first event.
    first: tokio::sync::Notify,
    batch: usize,
    sink: EventSink,
}

impl LocalInner {
    /// Hands events to the shared queue.
    fn send(&self, events: Vec<RequestEvent>) {
        for ev in events {
            self.sink.emit(ev);
        }
    }

    /// What `buf` holds, leaving it empty with room for a batch.
    fn take(&self, buf: &mut Vec<RequestEvent>) -> Vec<RequestEvent> {
        std::mem::replace(buf, Vec::with_capacity(self.batch))
    }
}

impl Drop for LocalInner {
    /// Whatever is still buffered when the last handle goes is handed on, not lost.
    fn drop(&mut self) {
        let events = std::mem::take(self.buf.get_mut().unwrap_or_else(|p| p.into_inner()));
        self.send(events);
    }
}

impl LocalSink {
    /// A buffer of `batch` events in front of `sink`.
    pub fn new(sink: EventSink, batch: usize) -> LocalSink {
        LocalSink {
            inner: Arc::new(LocalInner {
                buf: std::sync::Mutex::new(Vec::with_capacity(batch)),
                first: tokio::sync::Notify::new(),
                batch: batch.max(1),
                sink,
            }),
        }
    }

    /// Buffers an event (never blocks the request path).
    pub fn emit(&self, ev: RequestEvent) {
        let full = {
            let mut buf = self.buf();
            buf.push(ev);
            if buf.len() == 1 {
                self.inner.first.notify_one();
            }
            (buf.len() >= self.inner.batch).then(|| self.inner.take(&mut buf))
        };
        if let Some(events) = full {
            self.inner.send(events);
        }
    }

    /// Moves what is buffered to the shared queue.
    pub fn flush(&self) {
        let events = self.inner.take(&mut self.buf());
        self.inner.send(events);
    }

    /// Flushes `linger` after each first event, until `stop`; then flushes what is left.
    pub async fn run_flusher(self, linger: Duration, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = self.inner.first.notified() => {}
                _ = stop.cancelled() => break,
            }
            tokio::select! {
                _ = tokio::time::sleep(linger) => {}
                _ = stop.cancelled() => break,
            }
            self.flush();
        }
        self.flush();
    }

    fn buf(&self) -> std::sync::MutexGuard<'_, Vec<RequestEvent>> {
        self.inner.buf.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Creates the queue. The returned future publishes until every `EventSink` is gone — that is,
/// until the server has drained its last request — so no event of a finishing request is lost.
pub fn channel(
    capacity: usize,
    batch_max: usize,
    bus: Arc<dyn Publisher>,
    metrics: GatewayMetrics,
) -> (EventSink, impl std::future::Future<Output = ()>) {
    let (tx, mut rx) = mpsc::channel::<RequestEvent>(capacity);
    let sink = EventSink {
        tx,
        metrics: metrics.clone(),
    };
    let task = async move {
        let mut buf = Vec::with_capacity(batch_max);
        loop {
            // Zero only once every sender is dropped and the queue is empty.
            if rx.recv_many(&mut buf, batch_max).await == 0 {
                break;
            }
            publish_with_retry(&*bus, &mut buf, &metrics).await;
        }
        // Backends that deliver in the background (Kafka) get a bounded time to finish.
        if let Err(e) = bus.flush(Duration::from_secs(30)).await {
            tracing::error!(error = %e, "events not delivered at shutdown");
        }
    };
    (sink, task)
}

async fn publish_with_retry(
    bus: &dyn Publisher,
    buf: &mut Vec<RequestEvent>,
    metrics: &GatewayMetrics,
) {
    let records: Vec<Record> = buf
        .drain(..)
        .map(|e| Record {
            key: Bytes::copy_from_slice(e.key().as_bytes()),
            payload: Bytes::from(e.to_json()),
        })
        .collect();
    let n = records.len() as u64;
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=5 {
        match bus.publish(records.clone()).await {
            Ok(()) => {
                metrics.events_published.inc_by(n);
                return;
            }
            Err(e) if e.retryable() && attempt < 5 => {
                tracing::warn!(error = %e, attempt, "bus publish failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                tracing::error!(error = %e, events = n, "bus publish failed; events dropped");
                metrics
                    .events_dropped
                    .get_or_create(&crate::metrics::DropLabels {
                        reason: "bus_error",
                    })
                    .inc_by(n);
                return;
            }
        }
    }
}
