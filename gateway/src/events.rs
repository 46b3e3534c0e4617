//! Event emission off the request path. Each worker thread buffers its finished requests'
//! events (`LocalSink`) and hands them over a batch at a time (`EventSink`) to one task that
//! encodes and publishes them to the bus, retrying transient failures with backoff. Handing over
//! never blocks: the queue holds at most `queue_capacity` events, and what does not fit is
//! dropped and counted, so the request never waits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tollgate_bus::{Publisher, Record};
use tollgate_schemas::RequestEvent;

use crate::metrics::GatewayMetrics;

/// The handle worker threads hand batches to: never blocks.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::UnboundedSender<Vec<RequestEvent>>,
    /// Events queued and not yet taken by the publisher; bounded by `capacity`.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    metrics: GatewayMetrics,
}

impl EventSink {
    /// Queues a batch (one wake-up of the publisher at most), dropping and counting the events
    /// that do not fit.
    pub fn emit_batch(&self, mut events: Vec<RequestEvent>) {
        if events.is_empty() {
            return;
        }
        let n = events.len();
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        let room = self.capacity.saturating_sub(before);
        if room < n {
            self.queued.fetch_sub(n - room, Ordering::AcqRel);
            events.truncate(room);
            self.count_dropped("queue_full", (n - room) as u64);
        }
        if events.is_empty() {
            return;
        }
        let kept = events.len();
        if self.tx.send(events).is_err() {
            // The publisher is gone (shutting down after its last sender): nothing can send.
            self.queued.fetch_sub(kept, Ordering::AcqRel);
            self.count_dropped("queue_full", kept as u64);
        }
    }

    fn count_dropped(&self, reason: &'static str, n: u64) {
        self.metrics
            .events_dropped
            .get_or_create(&crate::metrics::DropLabels { reason })
            .inc_by(n);
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
        self.sink.emit_batch(events);
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
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<RequestEvent>>();
    let queued = Arc::new(AtomicUsize::new(0));
    let sink = EventSink {
        tx,
        queued: queued.clone(),
        capacity,
        metrics: metrics.clone(),
    };
    let task = async move {
        let mut buf = Vec::with_capacity(batch_max);
        let mut batches = Vec::new();
        // `None` only once every sender is dropped and the queue is empty.
        while rx.recv_many(&mut batches, 64).await > 0 {
            for batch in batches.drain(..) {
                queued.fetch_sub(batch.len(), Ordering::AcqRel);
                for ev in batch {
                    buf.push(ev);
                    if buf.len() >= batch_max {
                        publish_with_retry(&*bus, &mut buf, &metrics).await;
                    }
                }
            }
            if !buf.is_empty() {
                publish_with_retry(&*bus, &mut buf, &metrics).await;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tollgate_bus::BusError;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Record>>);

    #[async_trait::async_trait]
    impl Publisher for Collect {
        async fn publish(&self, records: Vec<Record>) -> Result<(), BusError> {
            self.0.lock().unwrap().extend(records);
            Ok(())
        }
    }

    fn event(n: u64) -> RequestEvent {
        let ts = chrono::DateTime::from_timestamp_micros(1_764_000_000_000_000).unwrap();
        RequestEvent {
            v: 1,
            id: uuid::Uuid::now_v7(),
            ts,
            gateway: "gw".into(),
            route: None,
            method: "GET".into(),
            path: "/".into(),
            status: 404,
            latency_us: n,
            upstream_latency_us: None,
            req_bytes: 0,
            resp_bytes: 0,
            consumer: None,
            plan: None,
            outcome: tollgate_schemas::Outcome::NotFound,
            billable: false,
            trace_id: None,
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_what_does_not_fit_and_publishes_the_rest_in_order() {
        let bus = Arc::new(Collect::default());
        let metrics = GatewayMetrics::register(&mut Default::default());
        let (sink, task) = channel(5, 2, bus.clone(), metrics.clone());
        sink.emit_batch((0..3).map(event).collect());
        sink.emit_batch((3..6).map(event).collect());
        sink.emit_batch((6..7).map(event).collect());
        drop(sink);
        task.await;
        let got: Vec<u64> = bus
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|r| RequestEvent::from_json(&r.payload).unwrap().latency_us)
            .collect();
        assert_eq!(got, [0, 1, 2, 3, 4]);
        assert_eq!(metrics.events_published.get(), 5);
        let dropped = metrics
            .events_dropped
            .get_or_create(&crate::metrics::DropLabels {
                reason: "queue_full",
            })
            .get();
        assert_eq!(dropped, 2);
    }
}
