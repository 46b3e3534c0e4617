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
    tx: mpsc::UnboundedSender<Handed>,
    /// Events queued and not yet taken by the publisher; bounded by `capacity`. The metric is
    /// the counter itself (`tollgate_gateway_event_queue_depth`).
    queued: Gauge,
    capacity: usize,
    metrics: GatewayMetrics,
}

/// What goes over the queue: records, or a worker's buffer of encoded events ([`Sealed`]),
/// made into records on the publisher's side.
enum Handed {
    Records(Vec<Record>),
    Sealed(Sealed),
}

impl Handed {
    fn len(&self) -> usize {
        match self {
            Handed::Records(r) => r.len(),
            Handed::Sealed(s) => s.spans.len(),
        }
    }

    fn truncate(&mut self, n: usize) {
        match self {
            Handed::Records(r) => r.truncate(n),
            Handed::Sealed(s) => s.spans.truncate(n),
        }
    }
}

impl EventSink {
    /// Queues a batch of encoded events (one wake-up of the publisher at most), dropping and
    /// counting the events that do not fit.
    pub fn emit_batch(&self, events: Vec<Record>) {
        self.enqueue(Handed::Records(events));
    }

    /// Queues a worker's buffer of encoded events, as [`EventSink::emit_batch`].
    fn emit_sealed(&self, sealed: Sealed) {
        self.enqueue(Handed::Sealed(sealed));
    }

    fn enqueue(&self, mut events: Handed) {
        let n = events.len();
        if n == 0 {
            return;
        }
        let before = usize::try_from(self.queued.inc_by(n as i64)).unwrap_or(0);
        let room = self.capacity.saturating_sub(before);
        if room < n {
            self.queued.dec_by((n - room) as i64);
            events.truncate(room);
            self.count_dropped("queue_full", (n - room) as u64);
        }
        let kept = events.len();
        if kept == 0 {
            return;
        }
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
/// The fewest events a new batch buffer has room for (a batch that outgrows it continues in
/// another buffer).
const MIN_RESERVE_EVENTS: usize = 32;

/// Where an encoded event lies in its buffer: its key's start, its JSON's start, its end.
type Span = (usize, usize, usize);

/// At most this many emptied buffers (and span lists) wait per worker to be encoded into again;
/// more are freed.
const SPARES: usize = 4;

/// Emptied buffers, and emptied span lists.
type SpareLists = (Vec<Vec<u8>>, Vec<Vec<Span>>);

/// A worker's buffers and span lists that came back from the publisher, emptied.
#[derive(Default)]
struct Spares(std::sync::Mutex<SpareLists>);

impl Spares {
    fn lock(&self) -> std::sync::MutexGuard<'_, SpareLists> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps an emptied buffer for its worker, or frees it (without the lock held) when
    /// enough wait.
    fn give_buffer(&self, buf: Vec<u8>) {
        self.give(buf, |spares| &mut spares.0);
    }

    /// As [`Spares::give_buffer`], for a span list.
    fn give_spans(&self, spans: Vec<Span>) {
        self.give(spans, |spares| &mut spares.1);
    }

    fn give<T>(&self, mut list: Vec<T>, kind: impl FnOnce(&mut SpareLists) -> &mut Vec<Vec<T>>) {
        list.clear();
        let mut spares = self.lock();
        let kept = kind(&mut spares);
        if kept.len() < SPARES {
            kept.push(list);
            return;
        }
        drop(spares);
        drop(list);
    }
}

/// A worker's buffer of encoded events, handed to the publisher as it is. The publisher makes
/// the records (slices of the buffer, [`SealedRecords`]) on its own thread; the span list goes
/// back to the worker once read, and the buffer once its last record is dropped ([`Returned`]).
///
/// Why: the worker allocated the buffer, the `Bytes` header over it and the vector of records
/// for every batch, and the publisher's thread freed all three, so none came back to the
/// worker's thread cache and each was taken from the worker's malloc arena under its lock.
/// glibc's arenas are shared with the other threads (`src/alloc.rs` limits them), and an
/// ingest thread in the idle class that is preempted while it holds that lock keeps it until
/// its next turn: in open-loop runs near saturation, the workers slept on arena locks for up to
/// 27 ms, 14 times in 15 at this hand-over (BENCHMARKS.md, twenty-third round). Now a worker in
/// steady state allocates nothing per batch.
struct Sealed {
    buf: Vec<u8>,
    spans: Vec<Span>,
    home: Arc<Spares>,
}

impl Sealed {
    /// Its records, made on the caller's thread.
    fn records(self) -> SealedRecords {
        let Sealed { buf, spans, home } = self;
        SealedRecords {
            bytes: bytes::Bytes::from_owner(Returned {
                buf,
                home: home.clone(),
            }),
            spans,
            next: 0,
            home,
        }
    }
}

/// The records of a [`Sealed`] buffer, in order; the span list goes back to its worker when
/// this is dropped.
struct SealedRecords {
    bytes: bytes::Bytes,
    spans: Vec<Span>,
    next: usize,
    home: Arc<Spares>,
}

impl Iterator for SealedRecords {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        let (start, key_end, end) = *self.spans.get(self.next)?;
        self.next += 1;
        Some(Record {
            key: self.bytes.slice(start..key_end),
            payload: self.bytes.slice(key_end..end),
        })
    }
}

impl Drop for SealedRecords {
    fn drop(&mut self) {
        self.home.give_spans(std::mem::take(&mut self.spans));
    }
}

/// A sealed buffer's bytes, going back to its worker when the last record over them is dropped.
struct Returned {
    buf: Vec<u8>,
    home: Arc<Spares>,
}

impl AsRef<[u8]> for Returned {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Returned {
    fn drop(&mut self) {
        self.home.give_buffer(std::mem::take(&mut self.buf));
    }
}

/// Events encoded into a buffer: each is its key's bytes, then its JSON. A buffer without room
/// for another event is sealed and handed over, and another taken: one that came back from the
/// publisher, or a new one. A buffer is never grown, which copied every event already in it
/// (`realloc`, 0.6 % of a gateway worker's CPU under load, BENCHMARKS.md, twenty-third round).
struct Batch {
    bytes: Vec<u8>,
    spans: Vec<Span>,
    spares: Arc<Spares>,
}

impl Batch {
    fn new(events: usize) -> Batch {
        Batch {
            bytes: Vec::with_capacity(Self::first_capacity(events)),
            spans: Vec::with_capacity(events.min(MIN_RESERVE_EVENTS)),
            spares: Arc::default(),
        }
    }

    /// Room for a new buffer: what the last one held plus a quarter, at least
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

    /// How many events the current buffer holds.
    fn len(&self) -> usize {
        self.spans.len()
    }

    /// Encodes `ev`; when the buffer had no room left, what it held comes back sealed, to be
    /// handed over.
    fn push(&mut self, ev: &RequestEventRef<'_>, events: usize) -> Option<Sealed> {
        let full = (self.bytes.capacity() - self.bytes.len() < EVENT_BYTES
            && !self.spans.is_empty())
        .then(|| self.seal(events));
        let start = self.bytes.len();
        self.bytes.extend_from_slice(ev.key().as_bytes());
        let key_end = self.bytes.len();
        ev.write_json(&mut self.bytes);
        self.spans.push((start, key_end, self.bytes.len()));
        // The next event's lines, fetched for this core while the next request is served:
        // the buffer was last read on the publisher's core (`crate::prefetch`).
        let room = self.bytes.spare_capacity_mut();
        crate::prefetch::for_write(&room[..room.len().min(EVENT_BYTES)]);
        let spans = self.spans.spare_capacity_mut();
        crate::prefetch::for_write(&spans[..spans.len().min(1)]);
        full
    }

    /// What the buffer holds, sealed, leaving the batch with another buffer; `None` when it
    /// holds nothing.
    fn take(&mut self, events: usize) -> Option<Sealed> {
        (!self.spans.is_empty()).then(|| self.seal(events))
    }

    /// The current buffer and its spans, sealed; a spare buffer and span list (or new ones)
    /// take their place.
    ///
    /// A spare buffer is taken only when it has room for what the last one held and a quarter
    /// ([`Batch::capacity_after`]); a smaller one is freed, here on the thread that allocated
    /// it, and a new one of that size made. Taken whatever its size, the first buffers (room
    /// for `MIN_RESERVE_EVENTS` events) came back again and again under load, so a loaded
    /// worker handed over about 40 events at a time instead of a batch: behind a Kafka bus,
    /// whose publishes return at once, each hand-over woke the publisher's thread, about 1,350
    /// times a second at 84,000 requests/s (BENCHMARKS.md, thirty-first round).
    fn seal(&mut self, events: usize) -> Sealed {
        let capacity = Self::capacity_after(self.bytes.len(), events);
        let (buf, spans) = {
            let mut spares = self.spares.lock();
            (spares.0.pop(), spares.1.pop())
        };
        let buf = match buf {
            Some(spare) if spare.capacity() >= capacity => spare,
            _ => Vec::with_capacity(capacity),
        };
        let spans = spans.unwrap_or_else(|| Vec::with_capacity(events.min(MIN_RESERVE_EVENTS)));
        Sealed {
            buf: std::mem::replace(&mut self.bytes, buf),
            spans: std::mem::replace(&mut self.spans, spans),
            home: self.spares.clone(),
        }
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
        if let Some(sealed) = self
            .buf
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take(batch)
        {
            self.sink.emit_sealed(sealed);
        }
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
        let batch = self.inner.batch;
        let (filled, full) = {
            let mut buf = self.buf();
            let filled = buf.push(ev, batch);
            if buf.len() == 1 {
                self.inner.first.notify_one();
            }
            let full = if buf.len() >= batch {
                buf.take(batch)
            } else {
                None
            };
            (filled, full)
        };
        for sealed in [filled, full].into_iter().flatten() {
            self.inner.sink.emit_sealed(sealed);
        }
    }

    /// Moves what is buffered to the shared queue.
    pub fn flush(&self) {
        let sealed = self.buf().take(self.inner.batch);
        if let Some(sealed) = sealed {
            self.inner.sink.emit_sealed(sealed);
        }
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
/// Publishes go in rounds. A publish to the embedded log returns once its records are durable
/// (the log's group commit, one sync per `sync_interval_ms` at most). While a round is in
/// flight, the workers' hand-overs wait in the queue, unread; once the round has ended, the
/// publisher takes everything queued and publishes it at once, in batches of `batch_max`, which
/// share the next sync. So nothing caps the events per sync interval (one publish of
/// `batch_max` at a time would: about 100,000 events/s with the defaults), and a partial batch
/// goes at once when nothing is in flight, so an idle gateway's event is not held back.
///
/// Why the queue is not read during a round: every hand-over read wakes the publisher's
/// thread. Reading each as it came (and publishing each full batch beside those in flight)
/// woke it about 800 times a second under load on the two-core reference machine, 0.008
/// context switches a request; reading once per round, about 100 (BENCHMARKS.md, twenty-ninth
/// round). What it costs: an event handed over during a round waits for that round's sync
/// before it is written, so it is durable (and readable) up to one more sync interval later,
/// 50 ms by default.
///
/// An event counts against `capacity` until its publish has ended, so events waiting and in
/// flight are bounded by the queue's capacity. Batches of one round may reach the bus in
/// either order: every event is counted on its own, by its id, so nothing downstream relies on
/// the order of events across batches.
pub fn channel(
    capacity: usize,
    batch_max: usize,
    bus: Arc<dyn Publisher>,
    metrics: GatewayMetrics,
) -> (EventSink, impl std::future::Future<Output = ()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Handed>();
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
                // Read only between rounds (see above): then everything queued.
                n = rx.recv_many(&mut batches, 64), if open && in_flight.is_empty() => {
                    open = n > 0;
                    while open && !rx.is_empty() && batches.len() < 4096 {
                        rx.recv_many(&mut batches, 64).await;
                    }
                    let mut take = |record: Record| {
                        buf.push(record);
                        if buf.len() >= batch_max {
                            in_flight.spawn(publish(std::mem::take(&mut buf)));
                        }
                    };
                    for handed in batches.drain(..) {
                        match handed {
                            Handed::Records(records) => records.into_iter().for_each(&mut take),
                            Handed::Sealed(sealed) => sealed.records().for_each(&mut take),
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
            // What is left of the round's events goes too, as a partial batch.
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

    /// A loaded worker's buffers grow to a whole batch although smaller ones come back: a
    /// spare buffer too small for what the last one held is not encoded into again.
    #[test]
    fn buffers_grow_under_load_though_smaller_ones_come_back() {
        let mut batch = Batch::new(256);
        let e = event(1, Some("acme"));
        let mut held = Vec::new();
        for _ in 0..20 {
            let sealed = (0..1000)
                .find_map(|_| batch.push(&e.borrowed(), 256))
                .expect("a buffer sealed within 1,000 events");
            // Read and dropped at once, as a publish to Kafka does: the buffer comes back
            // before the next one fills.
            held.push(sealed.spans.len());
            drop(records([sealed]));
        }
        let mut encoded = e.borrowed().key().as_bytes().to_vec();
        e.borrowed().write_json(&mut encoded);
        let full_batch = 256 * EVENT_BYTES / encoded.len();
        assert!(
            *held.last().unwrap() >= full_batch * 9 / 10,
            "events per hand-over: {held:?} (a whole batch's buffer holds about {full_batch})"
        );
        assert!(held.windows(2).all(|w| w[1] >= w[0]), "{held:?}");
    }

    /// Every record of `sealed`, as the publisher makes them.
    fn records(sealed: impl IntoIterator<Item = Sealed>) -> Vec<Record> {
        sealed.into_iter().flat_map(Sealed::records).collect()
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
        let mut sealed: Vec<Sealed> = sent
            .iter()
            .filter_map(|e| batch.push(&e.borrowed(), 2))
            .collect();
        sealed.extend(batch.take(2));
        assert_eq!(batch.len(), 0);
        assert!(batch.take(2).is_none(), "nothing held, nothing handed on");
        let records = records(sealed);
        assert_eq!(records.len(), 9);
        for (r, e) in records.iter().zip(&sent) {
            assert_eq!(&r.key[..], e.borrowed().key().as_bytes());
            assert_eq!(RequestEvent::from_json(&r.payload).unwrap(), *e);
        }
    }

    #[test]
    fn buffers_and_span_lists_come_back_to_their_worker_once_read() {
        let mut batch = Batch::new(4);
        let e = event(1, Some("acme"));
        let fill = |batch: &mut Batch| {
            for _ in 0..4 {
                assert!(batch.push(&e.borrowed(), 4).is_none());
            }
            batch.take(4).unwrap()
        };
        let spare_count = |batch: &Batch| {
            let spares = batch.spares.lock();
            (spares.0.len(), spares.1.len())
        };
        let first = fill(&mut batch);
        let held = first.buf.as_ptr();
        assert_eq!(spare_count(&batch), (0, 0));
        let mut made = first.records();
        let one = made.next().unwrap();
        let rest: Vec<Record> = made.collect();
        assert_eq!(spare_count(&batch), (0, 1), "the span list, once read");
        drop(rest);
        assert_eq!(
            spare_count(&batch),
            (0, 1),
            "a record still holds the buffer"
        );
        drop(one);
        assert_eq!(spare_count(&batch), (1, 1));
        // The buffer in use is a new one; sealing it takes the spares, and the next batch is
        // encoded into the buffer that came back.
        let second = fill(&mut batch);
        assert_eq!(spare_count(&batch), (0, 0));
        let third = fill(&mut batch);
        assert_eq!(third.buf.as_ptr(), held, "encoded into the returned buffer");
        let records = records([second, third]);
        assert_eq!(RequestEvent::from_json(&records[7].payload).unwrap(), e);
        drop(records);
        // At most SPARES of each wait; the rest are freed.
        let many: Vec<Sealed> = (0..SPARES + 3).map(|_| fill(&mut batch)).collect();
        drop(self::records(many));
        assert_eq!(spare_count(&batch), (SPARES, SPARES));
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
        let mut got = latencies_held(&bus);
        got.sort();
        assert_eq!(got, [0, 1, 2, 3, 4, 5]);
        assert_eq!(metrics.events_published.get(), 6);
        assert_eq!(metrics.event_queue.get(), 0);
    }

    /// Hand-overs that come while a round is in flight are read when it ends, and published
    /// together then: all of them in flight at once, none before.
    #[tokio::test]
    async fn hand_overs_during_a_round_wait_for_it_and_then_go_together() {
        use std::sync::atomic::Ordering::SeqCst;
        let bus = Arc::new(Held::default());
        let metrics = GatewayMetrics::unregistered();
        let (sink, task) = channel(100, 1, bus.clone(), metrics.clone());
        let task = tokio::spawn(task);
        let record = |i: u64| Record {
            key: bytes::Bytes::new(),
            payload: event(i, None).to_json().into(),
        };
        // Runs the publisher (this runtime's only other task) until it waits.
        let settle = || async {
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
        };
        sink.emit_batch(vec![record(0)]);
        settle().await;
        assert_eq!(bus.in_flight.load(SeqCst), 1);
        for i in 1..4 {
            sink.emit_batch(vec![record(i)]);
        }
        settle().await;
        assert_eq!(
            bus.in_flight.load(SeqCst),
            1,
            "hand-overs read while a round was in flight"
        );
        assert_eq!(metrics.event_queue.get(), 4);
        bus.release.notify_waiters();
        settle().await;
        assert_eq!(
            bus.in_flight.load(SeqCst),
            3,
            "the next round: every batch queued"
        );
        assert_eq!(latencies_held(&bus), [0]);
        drop(sink);
        bus.release.notify_waiters();
        task.await.unwrap();
        let mut got = latencies_held(&bus);
        got.sort();
        assert_eq!(got, [0, 1, 2, 3]);
        assert_eq!(metrics.event_queue.get(), 0);
    }

    fn latencies_held(bus: &Held) -> Vec<u64> {
        bus.got
            .lock()
            .unwrap()
            .iter()
            .map(|r| RequestEvent::from_json(&r.payload).unwrap().latency_us)
            .collect()
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
