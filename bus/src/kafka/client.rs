//! The rdkafka side of the Kafka bus: topic creation, the producer behind `Publisher` and the
//! consumer-group member behind `Subscriber`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::KafkaConfig;
use super::producer::{Batch, PolledProducer, ends_producer};
use crate::metrics::DeliveryStats;
use crate::{AssignmentChange, Bus, BusError, Checkpoint, Message, Publisher, Record, Subscriber};

fn broker_err(e: KafkaError) -> BusError {
    let retryable = !matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::Fatal | RDKafkaErrorCode::InvalidConfig)
    );
    BusError::Broker {
        message: e.to_string(),
        retryable,
    }
}

/// librdkafka settings common to producers and consumers, then the user's passthrough.
fn client_config(config: &KafkaConfig, own: &[(&str, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set_log_level(super::logs::level());
    c.set("bootstrap.servers", &config.brokers);
    for (k, v) in own {
        c.set(*k, v);
    }
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

/// A connected Kafka bus.
pub struct KafkaBus {
    config: KafkaConfig,
    producer: Mutex<Option<Arc<KafkaPublisher>>>,
}

impl KafkaBus {
    /// Checks the cluster answers and creates the topics when missing.
    pub async fn connect(config: KafkaConfig) -> Result<KafkaBus, BusError> {
        if config.create_topics {
            create_topics(&config).await?;
        }
        Ok(KafkaBus {
            config,
            producer: Mutex::new(None),
        })
    }

    /// The one producer of the events topic, created on first use.
    fn shared_publisher(&self) -> Result<Arc<KafkaPublisher>, BusError> {
        let mut slot = self.producer.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(self.publisher_for(self.config.topic.clone())?);
        }
        Ok(slot.clone().expect("set above"))
    }

    fn publisher_for(&self, topic: String) -> Result<Arc<KafkaPublisher>, BusError> {
        let compression = if self.config.compression == "none" {
            "none".to_string()
        } else {
            self.config.compression.clone()
        };
        let config = client_config(
            &self.config,
            &[
                ("enable.idempotence", "true".into()),
                ("acks", "all".into()),
                ("compression.type", compression),
                ("linger.ms", self.config.linger_ms.to_string()),
                ("batch.num.messages", "10000".into()),
                // No record times out in librdkafka: one that timed out while in flight may
                // have been written anyway, and queueing it again would write it twice (the
                // collector counts by bus position, not by event id). Without a timeout,
                // librdkafka sends timed-out requests again with their sequence numbers, which
                // the broker deduplicates. An outage piles records up in librdkafka's queue,
                // and the gateway's disk spool takes new ones past its high-water mark.
                ("message.timeout.ms", "0".into()),
                ("queue.buffering.max.messages", "2000000".into()),
            ],
        );
        Ok(Arc::new(KafkaPublisher::new(config, topic)?))
    }
}

async fn create_topics(config: &KafkaConfig) -> Result<(), BusError> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(config, &[]).create().map_err(broker_err)?;
    let dead = config.dead_letter_topic();
    let topics = [
        NewTopic::new(
            &config.topic,
            config.partitions,
            TopicReplication::Fixed(config.replication_factor),
        ),
        NewTopic::new(&dead, 1, TopicReplication::Fixed(config.replication_factor)),
    ];
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results =
        tokio::time::timeout(Duration::from_secs(30), admin.create_topics(&topics, &opts))
            .await
            .map_err(|_| BusError::Broker {
                message: format!(
                    "no answer from the brokers at {} within 30 s (bus.brokers)",
                    config.brokers
                ),
                retryable: true,
            })?
            .map_err(broker_err)?;
    for r in results {
        match r {
            Ok(topic) => tracing::info!(%topic, "created Kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(BusError::Broker {
                    message: format!("cannot create topic {topic}: {code}"),
                    retryable: false,
                });
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Bus for KafkaBus {
    fn publisher(&self) -> Result<Arc<dyn Publisher>, BusError> {
        Ok(self.shared_publisher()?)
    }

    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscriber>, BusError> {
        Ok(Box::new(KafkaSubscriber::new(&self.config, group)?))
    }

    fn dead_letters(&self) -> Result<Option<Arc<dyn Publisher>>, BusError> {
        Ok(Some(self.publisher_for(self.config.dead_letter_topic())?))
    }

    fn delivery_stats(&self) -> Option<Arc<DeliveryStats>> {
        self.shared_publisher().ok().map(|p| p.stats.clone())
    }

    async fn ready(&self) -> bool {
        let Ok(p) = self.shared_publisher() else {
            return false;
        };
        let topic = self.config.topic.clone();
        let (producer, _) = p.producers.current();
        tokio::task::spawn_blocking(move || producer.reaches(&topic, Duration::from_secs(2)))
            .await
            .unwrap_or(false)
    }
}

/// The gateway's producer: idempotent (no duplicates from librdkafka's retries), batched,
/// compressed.
///
/// `publish` returns once the records are queued in librdkafka (in order, so per-key order is
/// kept); deliveries are awaited by a background task, one per batch. A record whose delivery
/// fails (past a `message.timeout.ms` set in `bus.properties`, or purged from a replaced
/// producer) is queued again, so an outage costs memory, not events; a full librdkafka queue
/// makes `publish` wait, and the gateway's own bounded queue then drops and counts. `flush`
/// waits until every queued record is delivered. Clones share the producer and the counts.
///
/// A producer that can deliver nothing more (fenced by the broker, or failed fatally; see
/// [`ends_producer`]) is replaced by a new one, which gets a producer id of its own; the old
/// one's records fail as purged and are queued again on the new one.
#[derive(Clone)]
pub struct KafkaPublisher {
    producers: Arc<Producers>,
    /// Records queued and not yet delivered.
    in_flight: Arc<tokio::sync::watch::Sender<u64>>,
    stats: Arc<DeliveryStats>,
    /// Set by `take_undelivered`: publishes fail, and failed records are given back instead
    /// of queued again.
    closing: Arc<Closing>,
}

/// A publisher giving its records back (`take_undelivered`).
#[derive(Default)]
struct Closing {
    set: AtomicBool,
    /// Wakes deliveries waiting to queue failed records again.
    notify: tokio::sync::Notify,
    /// The records given back so far.
    taken: Mutex<Vec<Record>>,
}

impl Closing {
    fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }
}

/// The producer in use, and what makes a new one.
struct Producers {
    config: ClientConfig,
    topic: String,
    /// The producer and its generation (how many producers it replaced).
    current: Mutex<(PolledProducer, u64)>,
}

impl Producers {
    fn current(&self) -> (PolledProducer, u64) {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the producer of generation `stale` (unless another task already did) and
    /// retires the old one off the runtime. When no new producer can be made, the old one
    /// stays and the next failure tries again.
    fn renew(&self, stale: u64) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.1 != stale {
            return;
        }
        match PolledProducer::create(&self.config, &self.topic, stale + 1) {
            Ok(fresh) => {
                let old = std::mem::replace(&mut current.0, fresh);
                current.1 += 1;
                tracing::warn!(
                    generation = current.1,
                    "the Kafka producer can deliver nothing more (fenced or failed); replaced by a new one"
                );
                tokio::task::spawn_blocking(move || old.retire());
            }
            Err(e) => tracing::error!(error = %e, "cannot replace the Kafka producer"),
        }
    }
}

impl KafkaPublisher {
    fn new(config: ClientConfig, topic: String) -> Result<KafkaPublisher, BusError> {
        let producer = PolledProducer::create(&config, &topic, 0).map_err(broker_err)?;
        Ok(KafkaPublisher {
            producers: Arc::new(Producers {
                config,
                topic,
                current: Mutex::new((producer, 0)),
            }),
            in_flight: Arc::new(tokio::sync::watch::channel(0).0),
            stats: Arc::new(DeliveryStats::default()),
            closing: Arc::default(),
        })
    }

    /// Queues `records` in librdkafka in order, their reports counted by `batch` (not yet
    /// sealed), waiting while its queue is full. Returns the records refused for any other
    /// reason (their index and the error); every other record is queued. A producer that
    /// refuses because it failed fatally is replaced, once per call, and the rest go to the new
    /// one.
    async fn enqueue(&self, batch: &Arc<Batch>, records: &[Record]) -> Vec<(usize, BusError)> {
        let mut refused = Vec::new();
        let mut from = 0;
        let mut renewed = false;
        loop {
            if from >= records.len() {
                return refused;
            }
            let (producer, generation) = self.producers.current();
            let mut resume_at = None;
            for (i, code) in producer.send_batch(&records[from..], batch) {
                if code == RDKafkaErrorCode::QueueFull {
                    // This record and every one after it: librdkafka refuses the rest of a
                    // batch once its queue is full.
                    resume_at = Some((from + i, Duration::from_millis(5)));
                    break;
                }
                if ends_producer(code) && !renewed {
                    // So will every record after it, from this producer.
                    self.producers.renew(generation);
                    renewed = true;
                    resume_at = Some((from + i, Duration::ZERO));
                    break;
                }
                refused.push((from + i, broker_err(KafkaError::MessageProduction(code))));
            }
            match resume_at {
                Some((at, pause)) => {
                    from = at;
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                None => return refused,
            }
        }
    }

    /// While closing, gives `records` (failed) back instead of queueing them again: they leave
    /// the backlog. Whether it did.
    fn give_back_if_closing(&self, records: &[Record]) -> bool {
        if !self.closing.is_set() {
            return false;
        }
        let mut taken = self.closing.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken.extend_from_slice(records);
        drop(taken);
        self.settle(records.len() as u64, false);
        true
    }

    /// `n` records left the backlog: delivered, or dropped.
    fn settle(&self, n: u64, delivered: bool) {
        if n == 0 {
            return;
        }
        if delivered {
            self.stats.delivered.fetch_add(n, Ordering::Relaxed);
        }
        self.stats.backlog.fetch_sub(n, Ordering::Relaxed);
        self.in_flight.send_modify(|v| *v -= n);
    }

    /// Waits for a batch's reports and queues its failed records again (with a growing pause
    /// between rounds) until every record is delivered or refused by librdkafka itself.
    async fn deliver(self, mut batch: Arc<Batch>, mut queued: usize) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let failed = batch.settled().await;
            self.settle((queued - failed.len()) as u64, true);
            let Some(e) = failed.first().map(|(_, e)| e.clone()) else {
                return;
            };
            let records: Vec<Record> = failed.into_iter().map(|(r, _)| r).collect();
            if self.give_back_if_closing(&records) {
                return;
            }
            if let Some(stale) = batch.stale() {
                self.producers.renew(stale);
            }
            tracing::warn!(records = records.len(), error = %e, "Kafka delivery failed; queueing the records again");
            self.stats
                .requeued
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            let closed = self.closing.notify.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if !self.closing.is_set() {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = closed => {}
                }
            }
            if self.give_back_if_closing(&records) {
                return;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            batch = Batch::new();
            let refused = self.enqueue(&batch, &records).await;
            batch.seal();
            if let Some((_, e)) = refused.first() {
                tracing::error!(records = refused.len(), error = %e, "Kafka records cannot be queued; dropped");
                self.settle(refused.len() as u64, false);
            }
            queued = records.len() - refused.len();
        }
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    /// Queues the batch and returns; a task awaits its delivery (`deliver`). When librdkafka
    /// refuses every record the call fails (and may be retried without doubling any); records
    /// it refuses beside others that it queues are queued again with the failed deliveries.
    async fn publish(&self, records: Vec<Record>) -> Result<(), BusError> {
        if self.closing.is_set() {
            return Err(BusError::Broker {
                message: "the Kafka publisher has given its records back and takes no more".into(),
                retryable: true,
            });
        }
        let batch = Batch::new();
        let refused = self.enqueue(&batch, &records).await;
        if refused.len() == records.len() {
            batch.seal();
            return refused.into_iter().next().map_or(Ok(()), |(_, e)| Err(e));
        }
        for (i, e) in refused {
            batch.fail(records[i].clone(), e.to_string());
        }
        batch.seal();
        let n = records.len() as u64;
        self.in_flight.send_modify(|v| *v += n);
        self.stats.backlog.fetch_add(n, Ordering::Relaxed);
        tokio::spawn(self.clone().deliver(batch, records.len()));
        Ok(())
    }

    fn backlog(&self) -> u64 {
        *self.in_flight.borrow()
    }

    async fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        let mut rx = self.in_flight.subscribe();
        let done = tokio::time::timeout(timeout, rx.wait_for(|n| *n == 0))
            .await
            .is_ok();
        let left = *self.in_flight.borrow();
        if self.closing.is_set() {
            // The backlog emptied because the records were given back, not delivered.
            return Err(BusError::Broker {
                message: "the Kafka publisher gave its undelivered records back".into(),
                retryable: true,
            });
        }
        match done {
            true => Ok(()),
            false => Err(BusError::Broker {
                message: format!("{left} events not yet delivered to Kafka after {timeout:?}"),
                retryable: true,
            }),
        }
    }

    /// Purges librdkafka's queue and what is in flight; every record's failed report gives it
    /// back instead of queueing it again, and so do deliveries waiting to queue theirs again.
    async fn take_undelivered(&self, timeout: Duration) -> Vec<Record> {
        self.closing.set.store(true, Ordering::Release);
        self.closing.notify.notify_waiters();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.in_flight.subscribe();
        // Purged again until none is out: a delivery that was queueing its failed records
        // again when the flag went up may queue them after a purge.
        loop {
            let (producer, _) = self.producers.current();
            let _ = tokio::task::spawn_blocking(move || producer.purge()).await;
            let round = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .min(Duration::from_millis(200));
            if tokio::time::timeout(round, rx.wait_for(|n| *n == 0))
                .await
                .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    left = *self.in_flight.borrow(),
                    "Kafka records still out after purging them"
                );
                break;
            }
        }
        std::mem::take(&mut *self.closing.taken.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// What the rebalance callback saw, for the subscriber to turn into `AssignmentChange`s.
#[derive(Default)]
struct GroupEvents {
    /// Set by the callback; tells the poll loop to return.
    changed: AtomicBool,
    /// Raw changes: `true` = assigned.
    raw: Mutex<Vec<(bool, Vec<u32>)>>,
}

struct GroupContext {
    events: Arc<GroupEvents>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        super::logs::line(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        super::logs::error(error, reason);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Everything the collector stored has its commit requested (after each store write,
        // asynchronously: a commit still in flight only costs the next owner a re-read of what
        // the store already holds); what it holds in memory for these partitions is dropped
        // when it sees this.
        if let Rebalance::Revoke(tpl) = rebalance {
            self.push(false, tpl);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.push(true, tpl),
            Rebalance::Error(e) => tracing::warn!(error = %e, "Kafka rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "Kafka offset commit failed; the next owner resumes from the store");
        }
    }
}

impl GroupContext {
    fn push(&self, assigned: bool, tpl: &TopicPartitionList) {
        let parts: Vec<u32> = tpl
            .elements()
            .iter()
            .map(|e| e.partition().max(0) as u32)
            .collect();
        tracing::info!(assigned, partitions = ?parts, "Kafka partition assignment changed");
        self.events
            .raw
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((assigned, parts));
        self.events.changed.store(true, Ordering::Release);
    }
}

/// A collector's consumer-group member.
pub struct KafkaSubscriber {
    consumer: Arc<BaseConsumer<GroupContext>>,
    events: Arc<GroupEvents>,
    topic: String,
    owned: BTreeSet<u32>,
    committed: Checkpoint,
    /// A record that arrived in the same librdkafka poll as an assignment change: it belongs
    /// after that change, so it is returned by the next `poll`.
    carried: Option<Message>,
    changes: Vec<AssignmentChange>,
    /// A client of its own for the end-offset queries (no group, no fetches): on the group
    /// consumer's connection each query waited behind the fetch long-poll (about 100 ms), and
    /// the 13 requests of a collector's progress step (a metadata request and a watermark
    /// query per partition) took 1.25 s, which the collector's loop spent polling nothing:
    /// a freshness stall every flush interval (BENCHMARKS.md, "Freshness again").
    queries: Arc<BaseConsumer>,
}

impl KafkaSubscriber {
    fn new(config: &KafkaConfig, group: &str) -> Result<KafkaSubscriber, BusError> {
        let events = Arc::new(GroupEvents::default());
        let consumer: BaseConsumer<GroupContext> = client_config(
            config,
            &[
                ("group.id", group.to_string()),
                ("enable.auto.commit", "false".into()),
                ("auto.offset.reset", "earliest".into()),
                ("enable.partition.eof", "false".into()),
                // A killed collector's partitions move to the others within 10 s (Kafka's own
                // default is 45 s); `bus.properties` can change both.
                ("session.timeout.ms", "10000".into()),
                ("heartbeat.interval.ms", "1000".into()),
                // Fresh dashboards: a fetch waits at most 100 ms for data (librdkafka: 500 ms).
                ("fetch.wait.max.ms", "100".into()),
            ],
        )
        .create_with_context(GroupContext {
            events: events.clone(),
        })
        .map_err(broker_err)?;
        consumer.subscribe(&[&config.topic]).map_err(broker_err)?;
        let queries: BaseConsumer =
            client_config(config, &[("enable.auto.commit", "false".into())])
                .create()
                .map_err(broker_err)?;
        Ok(KafkaSubscriber {
            queries: Arc::new(queries),
            consumer: Arc::new(consumer),
            events,
            topic: config.topic.clone(),
            owned: BTreeSet::new(),
            committed: Checkpoint::default(),
            carried: None,
            changes: Vec::new(),
        })
    }

    /// Turns the callback's raw changes into `AssignmentChange`s with committed offsets.
    async fn collect_changes(&mut self) -> Result<(), BusError> {
        let raw = std::mem::take(&mut *self.events.raw.lock().unwrap_or_else(|p| p.into_inner()));
        for (assigned, parts) in raw {
            if !assigned {
                for p in &parts {
                    self.owned.remove(p);
                    self.committed.0.remove(p);
                }
                self.changes.push(AssignmentChange::Revoked(parts));
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            for p in &parts {
                tpl.add_partition(&self.topic, *p as i32);
            }
            let consumer = self.consumer.clone();
            let committed = tokio::task::spawn_blocking(move || {
                consumer.committed_offsets(tpl, Duration::from_secs(10))
            })
            .await
            .map_err(|_| BusError::Closed)?
            .map_err(broker_err)?;
            let mut out = Vec::new();
            for e in committed.elements() {
                let p = e.partition().max(0) as u32;
                let offset = match e.offset() {
                    Offset::Offset(o) if o >= 0 => o as u64,
                    _ => 0,
                };
                self.owned.insert(p);
                self.committed.0.insert(p, offset);
                out.push((p, offset));
            }
            self.changes.push(AssignmentChange::Assigned(out));
        }
        Ok(())
    }
}

/// Room for this many records is reserved when a poll starts (it grows past it if more come).
const POLL_CAPACITY: usize = 8192;

/// Records of one poll, copied out of librdkafka's buffers into one shared arena: one
/// allocation per chunk of records instead of two per record (a key and a payload), which was a
/// tenth of a collector's CPU time while it drained a backlog.
struct Arena {
    buf: BytesMut,
}

impl Arena {
    /// Bytes reserved at a time; a record larger than this gets a chunk of its own size.
    const CHUNK: usize = 1 << 20;

    fn new() -> Arena {
        Arena {
            buf: BytesMut::new(),
        }
    }

    fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.is_empty() {
            return Bytes::new();
        }
        if self.buf.capacity() - self.buf.len() < bytes.len() {
            // A new chunk; the records already handed out keep the old one alive.
            self.buf = BytesMut::with_capacity(Self::CHUNK.max(bytes.len()));
        }
        self.buf.extend_from_slice(bytes);
        self.buf.split().freeze()
    }

    fn message(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) -> Message {
        Message {
            partition: m.partition().max(0) as u32,
            offset: m.offset().max(0) as u64,
            key: self.copy(m.key().unwrap_or_default()),
            payload: self.copy(m.payload().unwrap_or_default()),
        }
    }
}

#[async_trait]
impl Subscriber for KafkaSubscriber {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Message>, BusError> {
        let mut out: Vec<Message> = self.carried.take().into_iter().collect();
        let consumer = self.consumer.clone();
        let events = self.events.clone();
        let max = max.max(1);
        let (got, carried) = tokio::task::spawn_blocking(move || {
            let mut arena = Arena::new();
            let mut got = Vec::with_capacity(max.min(POLL_CAPACITY));
            let deadline = Instant::now() + wait;
            loop {
                // Once records arrived, take only what is already fetched.
                let timeout = if got.is_empty() {
                    deadline
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(100))
                } else {
                    Duration::ZERO
                };
                let polled = consumer.poll(timeout);
                let changed = events.changed.swap(false, Ordering::AcqRel);
                match polled {
                    Some(Ok(m)) if changed => return Ok((got, Some(arena.message(&m)))),
                    Some(Ok(m)) => got.push(arena.message(&m)),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "Kafka consumer error");
                        if changed {
                            return Ok((got, None));
                        }
                        if got.is_empty() && Instant::now() >= deadline {
                            return Ok((got, None));
                        }
                    }
                    None if changed => return Ok((got, None)),
                    None if !got.is_empty() || Instant::now() >= deadline => {
                        return Ok((got, None));
                    }
                    None => {}
                }
                if got.len() >= max {
                    return Ok((got, None));
                }
            }
        })
        .await
        .map_err(|_| BusError::Closed)?
        .map_err(broker_err)?;
        out.extend(got);
        self.carried = carried;
        self.collect_changes().await?;
        Ok(out)
    }

    fn take_changes(&mut self) -> Vec<AssignmentChange> {
        std::mem::take(&mut self.changes)
    }

    async fn commit(&mut self, checkpoint: &Checkpoint) -> Result<(), BusError> {
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &checkpoint.0 {
            if self.owned.contains(p) && self.committed.0.get(p).is_none_or(|c| next > c) {
                tpl.add_partition_offset(&self.topic, *p as i32, Offset::Offset(*next as i64))
                    .map_err(broker_err)?;
            }
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        // Asynchronous: the request is queued and the collector goes on reading. Nothing
        // depends on the commit landing (exactly-once comes from the store's positions; see
        // the stores' docs): a lost or late commit only makes the next owner re-read and skip
        // what is already stored. A failure is logged by the commit callback.
        match self.consumer.commit(&tpl, CommitMode::Async) {
            Ok(()) => {
                for e in tpl.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        self.committed.0.insert(e.partition() as u32, o as u64);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Kafka offset commit failed; the next owner resumes from the store");
            }
        }
        Ok(())
    }

    fn committed(&self) -> Checkpoint {
        self.committed.clone()
    }

    async fn seek(&mut self, partition: u32, offset: u64) -> Result<(), BusError> {
        if !self.owned.contains(&partition) {
            return Ok(());
        }
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let result = tokio::task::spawn_blocking(move || {
            consumer.seek(
                &topic,
                partition as i32,
                Offset::Offset(offset as i64),
                Duration::from_secs(10),
            )
        })
        .await
        .map_err(|_| BusError::Closed)?;
        if let Err(e) = result {
            // Not fatal: the collector skips records the store already holds.
            tracing::warn!(partition, offset, error = %e, "Kafka seek failed; reading from the committed offset");
        }
        Ok(())
    }
    async fn end_offsets(&mut self) -> Result<(Checkpoint, u32), BusError> {
        let consumer = self.queries.clone();
        let topic = self.topic.clone();
        let owned: Vec<u32> = self.owned.iter().copied().collect();
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(5);
            let meta = consumer
                .fetch_metadata(Some(&topic), timeout)
                .map_err(broker_err)?;
            let partitions = meta
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map_or(0, |t| t.partitions().len() as u32);
            let mut ends = Checkpoint::default();
            for p in owned {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p as i32, timeout)
                    .map_err(broker_err)?;
                ends.0.insert(p, high.max(0) as u64);
            }
            Ok((ends, partitions))
        })
        .await
        .map_err(|_| BusError::Closed)?
    }

    /// The producer's rare paths can write a record twice (the module's docs).
    fn may_repeat_records(&self) -> bool {
        true
    }
}
