//! Event emission off the request path. Each worker thread encodes its finished requests'
//! events into its own batch buffer (`LocalSink`) and hands them over a batch at a time
//! (`EventSink`) to one task that publishes them to the bus, retrying transient failures with
//! backoff. Handing over never blocks: the queue holds at most `queue_capacity` events, and what
//! does not fit is dropped and counted, so the request never waits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tollgate_bus::{Publisher, Record};
use tollgate_schemas::RequestEventRef;

use crate::metrics::GatewayMetrics;
use prometheus_client::metrics::gauge::Gauge;

/// The handle worker threads hand batches to: never blocks.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::UnboundedSender<Vec<Record>>,
    /// Events queued and not yet taken by the publisher; bounded by `capacity`. The metric is
    /// the counter itself (`tollgate_gateway_event_queue_depth`).
    queued: Gauge,
    capacity: usize,
    metrics: GatewayMetrics,
}

impl EventSink {
    /// Queues a batch of encoded events (one wake-up of the publisher at most), dropping and
    /// counting the events that do not fit.
    pub fn emit_batch(&self, mut events: Vec<Record>) {
        if events.is_empty() {
            return;
        }
        let n = events.len();
        let before = usize::try_from(self.queued.inc_by(n as i64)).unwrap_or(0);
        let room = self.capacity.saturating_sub(before);
        if room < n {
            self.queued.dec_by((n - room) as i64);
            events.truncate(room);
            self.count_dropped("queue_full", (n - room) as u64);
        }
        if events.is_empty() {
            return;
        }
        let kept = events.len();
        if self.tx.send(events).is_err() {
            // The publisher is gone (shutting down after its last sender): nothing can send.
            self.queued.dec_by(kept as i64);
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

/// Room reserved per event in a batch buffer (an encoded event is 300–450 bytes).
const EVENT_BYTES: usize = 512;
/// The fewest events a fresh batch buffer has room for (it grows past that as needed).
const MIN_RESERVE_EVENTS: usize = 32;

/// Events encoded into buffers: each is its key's bytes, then its JSON. A buffer without room
/// for another event is sealed (its events become records, slices of it) and a fresh one
/// taken: it is never grown, which copied every event already in it (`realloc`, 0.6 % of a
/// gateway worker's CPU under load, BENCHMARKS.md, twenty-third round).
struct Batch {
    bytes: Vec<u8>,
    /// Per event in `bytes`: where its key starts, where its JSON starts, where it ends.
    spans: Vec<(usize, usize, usize)>,
    /// The events of the buffers sealed since the last `take`.
    sealed: Vec<Record>,
}

impl Batch {
    fn new(events: usize) -> Batch {
        Batch {
            bytes: Vec::with_capacity(Self::first_capacity(events)),
            spans: Vec::with_capacity(events.min(MIN_RESERVE_EVENTS)),
            sealed: Vec::new(),
        }
    }

    /// Room for a fresh buffer: what the last batch held plus a quarter, at least
    /// `MIN_RESERVE_EVENTS` events and at most a full batch. Reserving a full batch (256 events,
    /// 128 KiB) for every few milliseconds of a worker's traffic kept tens of megabytes of
    /// buffers in flight to the publisher and in the workers' malloc arenas, most of it never
    /// written.
    fn capacity_after(last_bytes: usize, events: usize) -> usize {
        (last_bytes + last_bytes / 4).clamp(
            Self::first_capacity(events),
            events.max(MIN_RESERVE_EVENTS) * EVENT_BYTES,
        )
    }

    fn first_capacity(events: usize) -> usize {
        events.min(MIN_RESERVE_EVENTS) * EVENT_BYTES
    }

    /// How many events the batch holds.
    fn len(&self) -> usize {
        self.sealed.len() + self.spans.len()
    }

    fn push(&mut self, ev: &RequestEventRef<'_>, events: usize) {
        if self.bytes.capacity() - self.bytes.len() < EVENT_BYTES && !self.spans.is_empty() {
            let held = self.bytes.len();
            self.seal(Self::capacity_after(held, events));
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(ev.key().as_bytes());
        let key_end = self.bytes.len();
        ev.write_json(&mut self.bytes);
        self.spans.push((start, key_end, self.bytes.len()));
    }

    /// Turns the events in the current buffer into records and starts a buffer of
    /// `capacity` bytes.
    fn seal(&mut self, capacity: usize) {
        let bytes = bytes::Bytes::from(std::mem::replace(
            &mut self.bytes,
            Vec::with_capacity(capacity),
        ));
        self.sealed
            .extend(self.spans.drain(..).map(|(start, key_end, end)| Record {
                key: bytes.slice(start..key_end),
                payload: bytes.slice(key_end..end),
            }));
    }

    /// The records held, leaving the batch empty with room for about as many more.
    fn take(&mut self, events: usize) -> Vec<Record> {
        if !self.spans.is_empty() {
            let held = self.bytes.len();
            self.seal(Self::capacity_after(held, events));
        }
        std::mem::take(&mut self.sealed)
    }
}

/// A worker thread's event buffer in front of the shared queue. Finished requests are encoded
/// into it; it moves to the queue when it holds `batch` events, or `linger` after its first
/// event, so the publisher (on another thread) is woken once per batch instead of once per
/// request. The lock is only ever taken by the worker's own thread (uncontended: no system
/// call); it is a lock rather than a `RefCell` so that response bodies stay `Send`.
#[derive(Clone)]
pub struct LocalSink {
    inner: Arc<LocalInner>,
}

struct LocalInner {
    buf: std::sync::Mutex<Batch>,
    /// Wakes the flusher when the buffer gets its first event.
    first: tokio::sync::Notify,
    batch: usize,
    sink: EventSink,
}

impl Drop for LocalInner {
    /// Whatever is still buffered when the last handle goes is handed on, not lost.
    fn drop(&mut self) {
        let batch = self.batch;
        let events = self
            .buf
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take(batch);
        self.sink.emit_batch(events);
    }
}

impl LocalSink {
    /// A buffer of `batch` events in front of `sink`.
    pub fn new(sink: EventSink, batch: usize) -> LocalSink {
        let batch = batch.max(1);
        LocalSink {
            inner: Arc::new(LocalInner {
                buf: std::sync::Mutex::new(Batch::new(batch)),
                first: tokio::sync::Notify::new(),
                batch,
                sink,
            }),
        }
    }

    /// Encodes an event into the buffer (never blocks the request path).
    pub fn emit(&self, ev: &RequestEventRef<'_>) {
        let full = {
            let mut buf = self.buf();
            buf.push(ev, self.inner.batch);
            if buf.len() == 1 {
                self.inner.first.notify_one();
            }
            (buf.len() >= self.inner.batch).then(|| buf.take(self.inner.batch))
        };
        if let Some(events) = full {
            self.inner.sink.emit_batch(events);
        }
    }

    /// Moves what is buffered to the shared queue.
    pub fn flush(&self) {
        let events = self.buf().take(self.inner.batch);
        self.inner.sink.emit_batch(events);
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

    fn buf(&self) -> std::sync::MutexGuard<'_, Batch> {
        self.inner.buf.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Creates the queue. The returned future publishes until every `EventSink` is gone — that is,
/// until the server has drained its last request — so no event of a finishing request is lost.
///
/// Publishes overlap: a publish to the embedded log returns once its records are durable (the
/// log's group commit, one sync per `sync_interval_ms` at most), so one publish at a time would
/// cap the gateway at `batch_max` events per sync interval (about 100,000 events/s with the
/// defaults) and drop the rest once the queue filled. Instead each batch is published as soon
/// as it is full, beside those still waiting for their sync, and they all share the next one; a
/// partial batch goes once nothing is in flight, with what gathered meanwhile. (Publishing every
/// hand-off at once would be about a thousand publishes a second at half the gateway's maximum
/// rate, two workers each handing over every 10 ms, each publish waking a thread.) An event counts
/// against `capacity` until its publish has ended, so events in flight are bounded by the
/// queue's capacity too. Batches in flight together may reach the bus in either order: every
/// event is counted on its own, by its id, so nothing downstream relies on the order of events
/// across batches.
pub fn channel(
    capacity: usize,
    batch_max: usize,
    bus: Arc<dyn Publisher>,
    metrics: GatewayMetrics,
) -> (EventSink, impl std::future::Future<Output = ()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Record>>();
    let queued = metrics.event_queue.clone();
    let sink = EventSink {
        tx,
        queued: queued.clone(),
        capacity,
        metrics: metrics.clone(),
    };
    let task = async move {
        let mut buf = Vec::with_capacity(batch_max);
        let mut batches = Vec::new();
        let mut in_flight = tokio::task::JoinSet::new();
        let publish = |records: Vec<Record>| {
            let (bus, metrics, queued) = (bus.clone(), metrics.clone(), queued.clone());
            async move {
                let n = records.len();
                publish_with_retry(&*bus, records, &metrics).await;
                queued.dec_by(n as i64);
            }
        };
        let mut open = true;
        while open || !in_flight.is_empty() || !buf.is_empty() {
            tokio::select! {
                // `0` only once every sender is dropped and the queue is empty.
                n = rx.recv_many(&mut batches, 64), if open => {
                    open = n > 0;
                    for record in batches.drain(..).flatten() {
                        buf.push(record);
                        if buf.len() >= batch_max {
                            in_flight.spawn(publish(std::mem::take(&mut buf)));
                        }
                    }
                }
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "an event publish task failed");
                    }
                }
                else => {}
            }
            // A partial batch waits for the publishes in flight (their sync), gathering what
            // comes meanwhile: at a moderate rate, one publish per sync instead of one per
            // worker hand-off.
            if in_flight.is_empty() && !buf.is_empty() {
                in_flight.spawn(publish(std::mem::take(&mut buf)));
            }
        }
        // Backends that deliver in the background (Kafka) get a bounded time to finish.
        if let Err(e) = bus.flush(Duration::from_secs(30)).await {
            tracing::error!(error = %e, "events not delivered at shutdown");
        }
    };
    (sink, task)
}

async fn publish_with_retry(bus: &dyn Publisher, records: Vec<Record>, metrics: &GatewayMetrics) {
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

    #[test]
    fn batch_buffers_are_sized_by_what_the_last_batch_held() {
        let full = 256 * EVENT_BYTES;
        assert_eq!(Batch::new(256).bytes.capacity(), 32 * EVENT_BYTES);
        assert_eq!(
            Batch::capacity_after(0, 256),
            32 * EVENT_BYTES,
            "at least the minimum"
        );
        assert_eq!(
            Batch::capacity_after(40_000, 256),
            50_000,
            "the last batch and a quarter"
        );
        assert_eq!(
            Batch::capacity_after(10 * full, 256),
            full,
            "at most a full batch"
        );
        assert_eq!(
            Batch::capacity_after(0, 4),
            4 * EVENT_BYTES,
            "small batches stay small"
        );
    }

    #[test]
    fn a_batch_larger_than_its_buffer_keeps_every_event_whole_and_in_order() {
        // Two events fit the first buffer of a two-event batch (2 × EVENT_BYTES); the rest
        // go to buffers of their own, and a long path makes one event larger than a buffer.
        let mut batch = Batch::new(2);
        let long = "/x".repeat(EVENT_BYTES);
        let sent: Vec<RequestEvent> = (0..9)
            .map(|i| {
                let mut e = event(i, (i % 3 != 0).then_some("acme"));
                if i == 4 {
                    e.path = long.clone();
                }
                e
            })
            .collect();
        for e in &sent {
            batch.push(&e.borrowed(), 2);
        }
        assert_eq!(batch.len(), 9);
        let records = batch.take(2);
        assert_eq!(batch.len(), 0);
        assert_eq!(records.len(), 9);
        for (r, e) in records.iter().zip(&sent) {
            assert_eq!(&r.key[..], e.borrowed().key().as_bytes());
            assert_eq!(RequestEvent::from_json(&r.payload).unwrap(), *e);
        }
        assert!(batch.take(2).is_empty(), "nothing held, nothing handed on");
    }
    use std::sync::Mutex;
    use tollgate_bus::BusError;
    use tollgate_schemas::RequestEvent;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Record>>);

    #[async_trait::async_trait]
    impl Publisher for Collect {
        async fn publish(&self, records: Vec<Record>) -> Result<(), BusError> {
            self.0.lock().unwrap().extend(records);
            Ok(())
        }
    }

    fn event(n: u64, consumer: Option<&str>) -> RequestEvent {
        let ts = chrono::DateTime::from_timestamp_micros(1_764_000_000_000_000).unwrap();
        RequestEvent {
            v: 1,
            id: uuid::Uuid::now_v7(),
            ts,
            gateway: "gw".into(),
            route: Some("r".into()),
            method: "GET".into(),
            path: "/".into(),
            status: 200,
            latency_us: n,
            upstream_latency_us: None,
            req_bytes: 0,
            resp_bytes: 0,
            consumer: consumer.map(Into::into),
            plan: None,
            outcome: tollgate_schemas::Outcome::Ok,
            billable: true,
            trace_id: None,
        }
    }

    fn latencies(bus: &Collect) -> Vec<u64> {
        bus.0
            .lock()
            .unwrap()
            .iter()
            .map(|r| RequestEvent::from_json(&r.payload).unwrap().latency_us)
            .collect()
    }

    #[tokio::test]
    async fn workers_encode_events_with_their_keys_and_batches_arrive_in_order() {
        let bus = Arc::new(Collect::default());
        let metrics = GatewayMetrics::unregistered();
        let (sink, task) = channel(100, 4, bus.clone(), metrics.clone());
        let local = LocalSink::new(sink.clone(), 3);
        let sent: Vec<RequestEvent> = (0..7)
            .map(|i| event(i, (i % 2 == 0).then_some("acme")))
            .collect();
        for ev in &sent {
            local.emit(&ev.borrowed());
        }
        drop((local, sink)); // hands the last, partial batch on
        task.await;
        let got = bus.0.lock().unwrap().clone();
        assert_eq!(got.len(), 7);
        for (record, ev) in got.iter().zip(&sent) {
            assert_eq!(&record.payload[..], &ev.to_json()[..]);
            assert_eq!(&record.key[..], ev.key().as_bytes());
        }
        assert_eq!(metrics.events_published.get(), 7);
    }

    /// Holds every publish until released, counting those in flight.
    #[derive(Default)]
    struct Held {
        in_flight: std::sync::atomic::AtomicUsize,
        release: tokio::sync::Notify,
        got: Mutex<Vec<Record>>,
    }

    #[async_trait::async_trait]
    impl Publisher for Held {
        async fn publish(&self, records: Vec<Record>) -> Result<(), BusError> {
            use std::sync::atomic::Ordering::SeqCst;
            let released = self.release.notified();
            self.in_flight.fetch_add(1, SeqCst);
            released.await;
            self.in_flight.fetch_sub(1, SeqCst);
            self.got.lock().unwrap().extend(records);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_publish_waiting_for_the_bus_does_not_hold_back_the_next_batches() {
        use std::sync::atomic::Ordering::SeqCst;
        let bus = Arc::new(Held::default());
        let metrics = GatewayMetrics::unregistered();
        let (sink, task) = channel(100, 2, bus.clone(), metrics.clone());
        let task = tokio::spawn(task);
        let record = |i: u64| Record {
            key: bytes::Bytes::new(),
            payload: event(i, None).to_json().into(),
        };
        for i in 0..3 {
            sink.emit_batch(vec![record(2 * i), record(2 * i + 1)]);
        }
        // Three batches of `batch_max`: all three published at once, none waiting for another.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while bus.in_flight.load(SeqCst) < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "publishes in flight: {} of 3",
                bus.in_flight.load(SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Events in flight still count against the queue's capacity.
        assert_eq!(metrics.event_queue.get(), 6);
        drop(sink);
        bus.release.notify_waiters();
        task.await.unwrap();
        let mut got: Vec<u64> = bus
            .got
            .lock()
            .unwrap()
            .iter()
            .map(|r| RequestEvent::from_json(&r.payload).unwrap().latency_us)
            .collect();
        got.sort();
        assert_eq!(got, [0, 1, 2, 3, 4, 5]);
        assert_eq!(metrics.events_published.get(), 6);
        assert_eq!(metrics.event_queue.get(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_what_does_not_fit_and_publishes_the_rest_in_order() {
        let bus = Arc::new(Collect::default());
        let metrics = GatewayMetrics::unregistered();
        let (sink, task) = channel(5, 2, bus.clone(), metrics.clone());
        let batch = |r: std::ops::Range<u64>| -> Vec<Record> {
            r.map(|i| Record {
                key: bytes::Bytes::new(),
                payload: event(i, None).to_json().into(),
            })
            .collect()
        };
        sink.emit_batch(batch(0..3));
        sink.emit_batch(batch(3..6));
        sink.emit_batch(batch(6..7));
        drop(sink);
        task.await;
        assert_eq!(latencies(&bus), [0, 1, 2, 3, 4]);
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
