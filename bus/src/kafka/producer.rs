//! The Kafka producer, served by the gateway's runtime when librdkafka has something for it.
//!
//! librdkafka hands delivery reports (and its logs and errors) to the application through a
//! queue that someone must poll. rdkafka's `FutureProducer` polls it from a thread of its own
//! with `poll(100 ms)` in a loop, and rdkafka 0.39 passes what is left of that deadline to
//! librdkafka in whole milliseconds: once less than one is left it polls with a zero timeout
//! until the deadline has passed. An idle `tollgate gateway` spent 0.9 % of a core there
//! (BENCHMARKS.md, "The gateway on its own again").
//!
//! So the queue is polled only when librdkafka says it has an event: it writes a byte to a
//! socket (`rd_kafka_queue_io_event_enable`) when an event arrives on the queue after it was
//! last served, and a task of the runtime waits for that byte, then serves every event queued.
//! An idle producer costs nothing.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::util::IntoOpaque;
use tokio::sync::Notify;

use crate::Record;

/// The delivery reports of one batch of records, gathered as librdkafka hands them over.
///
/// Each record queued carries a clone of the batch's `Arc` as its opaque (one atomic
/// increment, no allocation); its report counts it off and, when it failed, copies the record
/// back out of the report (librdkafka keeps its own copy of every record until its report, so
/// the batch holds none). One wake-up per batch, when its last report arrives: a record of its
/// own channel, task wake-up and backlog update cost the gateway's runtime thread 0.8–0.9 µs
/// per event, counting by batch 0.55, and queueing the batch in one call 0.39 (BENCHMARKS.md,
/// "The gateway's Kafka producer").
#[derive(Default)]
pub(super) struct Batch {
    /// Records queued whose report has not arrived, plus one while records are still being
    /// queued (so the count cannot reach zero before the last is queued).
    left: AtomicUsize,
    /// The records whose delivery failed, with librdkafka's reason.
    failed: Mutex<Vec<(Record, String)>>,
    /// A report said the producer that queued it can deliver nothing more
    /// ([`ends_producer`]): that producer's generation plus one (0: none did).
    stale: AtomicU64,
    settled: Notify,
}

/// Whether a delivery failed with `code` because its producer can deliver nothing more: the
/// broker fenced its producer id (`ProducerFenced`, `InvalidProducerEpoch`), or librdkafka
/// raised a fatal error (`Fatal`). Only a new producer, with a producer id of its own, gets
/// records through again.
///
/// A broker frozen past a `message.timeout.ms` (set in `bus.properties`; none by default)
/// causes the first: librdkafka then bumps the idempotent producer's epoch on its own
/// (KIP-360), which Kafka accepts and some Kafka-protocol brokers (tansu) answer with
/// `ProducerFenced` for every request after, so the records queued again failed until the
/// gateway restarted (`bus/tests/kafka.rs`).
pub(super) fn ends_producer(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::Fatal
    )
}

impl Batch {
    /// A batch about to be queued: settled once `sealed` and every queued record reported.
    pub(super) fn new() -> Arc<Batch> {
        let batch = Arc::new(Batch::default());
        batch.left.store(1, Ordering::Relaxed);
        batch
    }

    /// No more records will be queued with this batch.
    pub(super) fn seal(&self) {
        self.count_off();
    }

    /// Waits until every record queued with the batch has its report; returns the failed ones.
    pub(super) async fn settled(&self) -> Vec<(Record, String)> {
        while self.left.load(Ordering::Acquire) > 0 {
            // `notify_one` keeps a permit when nobody waits yet, so a report between the
            // check and this wait is not missed.
            self.settled.notified().await;
        }
        std::mem::take(&mut *self.failed.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The generation of a producer that a report said can deliver nothing more
    /// ([`ends_producer`]), if one did.
    pub(super) fn stale(&self) -> Option<u64> {
        self.stale.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Adds a failed record, to be queued again with the others: one librdkafka refused to
    /// queue (before the batch is sealed) or one whose report failed (before that report
    /// counts it off). `settled` takes the list once every record is counted off.
    pub(super) fn fail(&self, record: Record, reason: String) {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((record, reason));
    }

    fn count_off(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_one();
        }
    }
}

/// Counts each record's delivery report off its batch; `generation` is its producer's (how
/// many producers it replaced).
struct Deliveries {
    generation: u64,
}

impl ClientContext for Deliveries {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        super::logs::line(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        super::logs::error(error, reason);
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Arc<Batch>;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: Self::DeliveryOpaque) {
        if let Err((e, message)) = result {
            if e.rdkafka_error_code().is_some_and(ends_producer) {
                batch.stale.store(self.generation + 1, Ordering::Relaxed);
            }
            let record = Record {
                key: Bytes::copy_from_slice(message.key().unwrap_or_default()),
                payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            };
            batch.fail(record, e.to_string());
        }
        batch.count_off();
    }
}

/// A handle on librdkafka's main queue of a client (the one `BaseProducer::poll` serves).
struct MainQueue(*mut rdkafka::bindings::rd_kafka_queue_t);

// SAFETY: librdkafka's queue handles may be used from any thread; this one is only read for its
// length and given to `rd_kafka_queue_io_event_enable`, both thread-safe calls.
#[allow(unsafe_code)]
unsafe impl Send for MainQueue {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for MainQueue {}

impl MainQueue {
    fn len(&self) -> usize {
        // SAFETY: `self.0` is a live handle until `drop`.
        #[allow(unsafe_code)]
        unsafe {
            rdkafka::bindings::rd_kafka_queue_length(self.0)
        }
    }
}

impl Drop for MainQueue {
    fn drop(&mut self) {
        // SAFETY: the handle was obtained with `rd_kafka_queue_get_main` and is destroyed once.
        #[allow(unsafe_code)]
        unsafe {
            rdkafka::bindings::rd_kafka_queue_destroy(self.0)
        }
    }
}

/// librdkafka's handle on the one topic a producer writes to, taken once: producing by name
/// looks the topic up (a lock and a string comparison) for every record.
struct TopicHandle(*mut rdkafka::bindings::rd_kafka_topic_t);

// SAFETY: librdkafka's topic handles may be used from any thread (`rd_kafka_produce_batch`
// takes the topic's own lock).
#[allow(unsafe_code)]
unsafe impl Send for TopicHandle {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for TopicHandle {}

impl Drop for TopicHandle {
    fn drop(&mut self) {
        // SAFETY: the handle was obtained with `rd_kafka_topic_new` and is destroyed once,
        // before the client it belongs to (`Inner`'s field order).
        #[allow(unsafe_code)]
        unsafe {
            rdkafka::bindings::rd_kafka_topic_destroy(self.0)
        }
    }
}

struct Inner {
    /// Declared first: dropped before the producer's client, whose queues must be gone first.
    queue: MainQueue,
    /// Dropped before the producer's client too.
    topic: TopicHandle,
    producer: BaseProducer<Deliveries>,
    /// The end librdkafka writes to; open for as long as it may write (see `Drop`).
    _wake: std::os::unix::net::UnixStream,
}

impl Drop for Inner {
    /// Tells librdkafka to stop writing to the socket before it is closed (fields drop after
    /// this), so it never writes to a descriptor number reused meanwhile.
    fn drop(&mut self) {
        // SAFETY: `queue` is live; a descriptor of -1 disables the event.
        #[allow(unsafe_code)]
        unsafe {
            rdkafka::bindings::rd_kafka_queue_io_event_enable(self.queue.0, -1, std::ptr::null(), 0)
        }
    }
}

/// Stops the serving task once the last handle of the producer is gone.
struct StopServing(tokio::task::AbortHandle);

impl Drop for StopServing {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A Kafka producer whose queue is served by a task of the current tokio runtime. Clones share
/// it.
#[derive(Clone)]
pub(super) struct PolledProducer {
    inner: Arc<Inner>,
    _serving: Arc<StopServing>,
}

impl PolledProducer {
    /// Creates the producer of `topic`, the `generation`th (how many it replaces); must be
    /// called within a tokio runtime, which serves its queue.
    pub(super) fn create(
        config: &ClientConfig,
        topic: &str,
        generation: u64,
    ) -> Result<PolledProducer, KafkaError> {
        let producer: BaseProducer<Deliveries> =
            config.create_with_context(Deliveries { generation })?;
        let name = std::ffi::CString::new(topic)
            .map_err(|_| KafkaError::ClientCreation(format!("topic name `{topic}`")))?;
        // SAFETY: the client pointer is live (owned by `producer`); a null configuration takes
        // the defaults; the handle is destroyed by `TopicHandle::drop`.
        #[allow(unsafe_code)]
        let topic = TopicHandle(unsafe {
            rdkafka::bindings::rd_kafka_topic_new(
                producer.client().native_ptr(),
                name.as_ptr(),
                std::ptr::null_mut(),
            )
        });
        if topic.0.is_null() {
            return Err(KafkaError::ClientCreation(format!(
                "cannot open topic `{}`",
                name.to_string_lossy()
            )));
        }
        let (wake, woken) = std::os::unix::net::UnixStream::pair()
            .and_then(|(a, b)| {
                a.set_nonblocking(true)?;
                b.set_nonblocking(true)?;
                Ok((a, b))
            })
            .map_err(|e| KafkaError::ClientCreation(format!("event socket: {e}")))?;
        let woken = tokio::net::UnixStream::from_std(woken)
            .map_err(|e| KafkaError::ClientCreation(format!("event socket: {e}")))?;
        // SAFETY: the client pointer is live (owned by `producer`); the returned handle is
        // destroyed by `MainQueue::drop`. The payload is a static byte, copied by librdkafka;
        // the descriptor stays open until the event is disabled again (`Inner::drop`).
        #[allow(unsafe_code)]
        let queue = unsafe {
            let queue = MainQueue(rdkafka::bindings::rd_kafka_queue_get_main(
                producer.client().native_ptr(),
            ));
            rdkafka::bindings::rd_kafka_queue_io_event_enable(
                queue.0,
                std::os::fd::AsRawFd::as_raw_fd(&wake),
                b"1".as_ptr().cast(),
                1,
            );
            queue
        };
        let inner = Arc::new(Inner {
            queue,
            topic,
            producer,
            _wake: wake,
        });
        let task = tokio::spawn(serve(inner.clone(), woken));
        Ok(PolledProducer {
            inner,
            _serving: Arc::new(StopServing(task.abort_handle())),
        })
    }

    /// Queues `records` in order, each record's delivery report counted by `batch` (not yet
    /// sealed), with one `rd_kafka_produce_batch` call: one lock of the topic and one clock
    /// read for all of them, where producing record by record took both per record. Returns
    /// the records librdkafka refused (index and reason), in order; once its queue is full it
    /// refuses every record after (`QueueFull`: try those again later).
    pub(super) fn send_batch(
        &self,
        records: &[Record],
        batch: &Arc<Batch>,
    ) -> Vec<(usize, RDKafkaErrorCode)> {
        use rdkafka::bindings as rd;
        fn bytes(b: &[u8]) -> (*mut std::ffi::c_void, usize) {
            match b.is_empty() {
                true => (std::ptr::null_mut(), 0),
                false => (b.as_ptr().cast_mut().cast(), b.len()),
            }
        }
        if records.is_empty() {
            return Vec::new();
        }
        batch.left.fetch_add(records.len(), Ordering::Relaxed);
        let mut messages: Vec<rd::rd_kafka_message_t> = records
            .iter()
            .map(|r| {
                let (payload, len) = bytes(&r.payload);
                let (key, key_len) = bytes(&r.key);
                rd::rd_kafka_message_t {
                    err: rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR,
                    rkt: std::ptr::null_mut(),
                    partition: -1, // RD_KAFKA_PARTITION_UA: the partitioner picks by key
                    payload,
                    len,
                    key,
                    key_len,
                    offset: 0,
                    _private: IntoOpaque::into_ptr(batch.clone()),
                }
            })
            .collect();
        let count = std::ffi::c_int::try_from(messages.len()).unwrap_or(std::ffi::c_int::MAX);
        // SAFETY: the topic handle is live (owned by `self.inner`); `messages` holds `count`
        // initialised entries whose key and payload point into `records`, alive for the call;
        // with `RD_KAFKA_MSG_F_COPY` librdkafka copies them before returning. Each entry's
        // `_private` is an `Arc` reference that librdkafka hands back with the record's
        // delivery report (`Deliveries::delivery`) or, for a refused record, is released below.
        #[allow(unsafe_code)]
        let queued = unsafe {
            rd::rd_kafka_produce_batch(
                self.inner.topic.0,
                -1,
                rd::RD_KAFKA_MSG_F_COPY,
                messages.as_mut_ptr(),
                count,
            )
        };
        let mut refused = Vec::new();
        if usize::try_from(queued).ok() != Some(messages.len()) {
            for (i, m) in messages.iter().enumerate() {
                if i >= count as usize
                    || m.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                {
                    // SAFETY: librdkafka did not take this record, so it holds no reference
                    // to `_private`, made by `into_ptr` above and released once here.
                    #[allow(unsafe_code)]
                    drop(unsafe { <Arc<Batch> as IntoOpaque>::from_ptr(m._private) });
                    batch.count_off();
                    let code = match i >= count as usize {
                        true => RDKafkaErrorCode::QueueFull,
                        false => RDKafkaErrorCode::from(m.err),
                    };
                    refused.push((i, code));
                }
            }
        }
        refused
    }

    /// Takes every record back out of this producer, queued or in flight, and waits (at most
    /// a second) for their reports: they fail as purged and are queued again by whoever
    /// awaits their batch. Blocks; the producer is then dropped.
    pub(super) fn retire(self) {
        self.purge();
        if let Err(e) = self.inner.producer.flush(Duration::from_secs(1)) {
            tracing::warn!(error = %e, "a retired Kafka producer still held records");
        }
    }

    /// Takes every record back out of librdkafka, queued or in flight: each gets a failed
    /// report (purged). Blocks briefly.
    pub(super) fn purge(&self) {
        use rdkafka::producer::PurgeConfig;
        self.inner
            .producer
            .purge(PurgeConfig::default().queue().inflight());
    }

    /// Whether the brokers answer for `topic`'s metadata within `timeout` (blocks).
    pub(super) fn reaches(&self, topic: &str, timeout: Duration) -> bool {
        self.inner
            .producer
            .client()
            .fetch_metadata(Some(topic), timeout)
            .is_ok()
    }
}

/// Serves the queue whenever librdkafka says it has events, until the socket closes or the
/// task is aborted. librdkafka writes again only for an event that arrives after the queue was
/// last served, so each wake-up serves until the queue is empty.
async fn serve(inner: Arc<Inner>, woken: tokio::net::UnixStream) {
    let mut bytes = [0u8; 64];
    loop {
        while inner.queue.len() > 0 {
            inner.producer.poll(Duration::ZERO);
        }
        if woken.readable().await.is_err() {
            return;
        }
        loop {
            match woken.try_read(&mut bytes) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
    }
}
