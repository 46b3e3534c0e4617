//! The Kafka bus against a real Kafka-protocol broker (tansu, started by the test): keyed
//! publishing, consumer-group assignment with committed offsets, and two members sharing the
//! partitions of one topic; a full producer queue and refused records; a broker frozen (SIGSTOP)
//! briefly and past the delivery timeout. Faults a real broker
//! cannot be told to have (brokers down cleanly, a leader moving) use librdkafka's mock cluster.
#![cfg(feature = "kafka")]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tollgate_bus::{
    AssignmentChange, Bus, BusConfig, Checkpoint, KafkaConfig, Message, Record, Subscriber,
};

fn config(broker: &tollgate_testkit::Broker, topic: &str) -> BusConfig {
    config_with(broker, topic, &[])
}

/// `config` with librdkafka `properties` of the test's own besides.
fn config_with(
    broker: &tollgate_testkit::Broker,
    topic: &str,
    properties: &[(&str, &str)],
) -> BusConfig {
    let mut all = vec![
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
    ];
    all.extend_from_slice(properties);
    BusConfig::Kafka(KafkaConfig {
        brokers: broker.addr(),
        topic: topic.into(),
        partitions: 4,
        replication_factor: 1,
        create_topics: true,
        compression: "lz4".into(),
        linger_ms: 5,
        properties: all
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
}

/// A bus on `broker` (its topic `topic`, librdkafka `properties` of the test's own besides),
/// its publisher and the publisher's delivery counts.
async fn open_publisher(
    broker: &tollgate_testkit::Broker,
    topic: &str,
    properties: &[(&str, &str)],
) -> (
    std::sync::Arc<dyn Bus>,
    std::sync::Arc<dyn tollgate_bus::Publisher>,
    std::sync::Arc<tollgate_bus::metrics::DeliveryStats>,
) {
    let bus = config_with(broker, topic, properties).open().await.unwrap();
    let publisher = bus.publisher().unwrap();
    let stats = bus
        .delivery_stats()
        .expect("the Kafka publisher counts deliveries");
    (bus, publisher, stats)
}

fn records(n: usize) -> Vec<Record> {
    records_from(0, n)
}

/// Records numbered `from` to `from + n - 1` (the payload), keyed by one of seven consumers.
fn records_from(from: usize, n: usize) -> Vec<Record> {
    (from..from + n)
        .map(|i| Record {
            key: Bytes::from(format!("consumer-{}", i % 7)),
            payload: Bytes::from(format!("{i}")),
        })
        .collect()
}

/// A bus on librdkafka's mock cluster `cluster`, whose topic `topic` it already holds.
fn mock_config(
    cluster: &rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    partitions: i32,
    replication_factor: i32,
    message_timeout_ms: u32,
) -> BusConfig {
    BusConfig::Kafka(KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        topic: topic.into(),
        partitions,
        replication_factor,
        create_topics: false,
        compression: "lz4".into(),
        linger_ms: 5,
        properties: [(
            "message.timeout.ms".to_string(),
            message_timeout_ms.to_string(),
        )]
        .into(),
    })
}

/// Polls until `n` messages arrived (assignment changes are collected too).
async fn drain(
    sub: &mut dyn Subscriber,
    n: usize,
    changes: &mut Vec<AssignmentChange>,
) -> Vec<Message> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "got {} of {n} messages",
            out.len()
        );
        changes.extend(sub.take_changes());
        out.extend(sub.poll(1000, Duration::from_millis(200)).await.unwrap());
    }
    changes.extend(sub.take_changes());
    out
}

/// Checks that `numbers` (ascending) are `0..n`, each once.
fn assert_each_once(numbers: &[u64], n: u64) {
    assert_eq!(
        numbers,
        (0..n).collect::<Vec<u64>>(),
        "every record exactly once"
    );
}

/// Reads `n` records as a new consumer group `group`: the messages, and their payloads'
/// numbers in ascending order.
async fn read_numbers(bus: &dyn Bus, group: &str, n: usize) -> (Vec<Message>, Vec<u64>) {
    let mut sub = bus.subscribe(group).await.unwrap();
    let got = drain(&mut *sub, n, &mut Vec::new()).await;
    let mut numbers: Vec<u64> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).parse().unwrap())
        .collect();
    numbers.sort_unstable();
    (got, numbers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_keyed_and_a_group_resumes_at_its_commit() {
    let broker = tollgate_testkit::Broker::start();
    let bus = config(&broker, "keyed").open().await.unwrap();
    let publisher = bus.publisher().unwrap();
    publisher.publish(records(2000)).await.unwrap();
    publisher.flush(Duration::from_secs(30)).await.unwrap();

    let mut sub = bus.subscribe("g1").await.unwrap();
    let mut changes = Vec::new();
    let got = drain(&mut *sub, 2000, &mut changes).await;
    assert!(
        matches!(changes.first(), Some(AssignmentChange::Assigned(p)) if p.len() == 4),
        "{changes:?}"
    );
    let positions: BTreeSet<(u32, u64)> = got.iter().map(|m| (m.partition, m.offset)).collect();
    assert_eq!(positions.len(), 2000, "every record once");
    // One key, one partition, in publish order.
    let mut by_key: BTreeMap<Bytes, (u32, Vec<u64>)> = BTreeMap::new();
    for m in &got {
        let e = by_key
            .entry(m.key.clone())
            .or_insert((m.partition, Vec::new()));
        assert_eq!(e.0, m.partition, "a key stays on one partition");
        e.1.push(String::from_utf8_lossy(&m.payload).parse().unwrap());
    }
    for (_, (_, seq)) in by_key {
        assert!(seq.windows(2).all(|w| w[0] < w[1]), "per-key order kept");
    }
    let mut ends = Checkpoint::default();
    for m in &got {
        ends.advance(m.partition, m.offset);
    }
    // The end offsets of the owned partitions, asked on a client of their own. (tansu answers
    // a watermark query with 1 for these partitions, so the values are not checked here.)
    let (end_offsets, partitions) = sub.end_offsets().await.unwrap();
    let owned: Vec<u32> = end_offsets.0.keys().copied().collect();
    assert_eq!((owned, partitions), (vec![0, 1, 2, 3], 4));
    sub.commit(&ends).await.unwrap();
    drop(sub);

    // A new member of the group is told the committed offsets with its assignment.
    let mut again = bus.subscribe("g1").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let assigned = loop {
        assert!(Instant::now() < deadline, "no assignment");
        again.poll(100, Duration::from_millis(200)).await.unwrap();
        if let Some(AssignmentChange::Assigned(p)) = again
            .take_changes()
            .into_iter()
            .find(|c| matches!(c, AssignmentChange::Assigned(_)))
        {
            break p;
        }
    };
    let committed: Checkpoint = Checkpoint(assigned.into_iter().collect());
    assert_eq!(committed, ends);
    // Invalid events have a topic of their own.
    let dead = bus.dead_letters().unwrap().expect("a dead-letter topic");
    dead.publish(records(1)).await.unwrap();
    dead.flush(Duration::from_secs(30)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_share_the_partitions() {
    let broker = tollgate_testkit::Broker::start();
    let bus = config(&broker, "shared").open().await.unwrap();
    let mut a = bus.subscribe("g2").await.unwrap();
    let mut owned_a: BTreeSet<u32> = BTreeSet::new();
    let mut owned_b: BTreeSet<u32> = BTreeSet::new();
    let apply = |owned: &mut BTreeSet<u32>, changes: Vec<AssignmentChange>| {
        for c in changes {
            match c {
                AssignmentChange::Assigned(p) => owned.extend(p.into_iter().map(|(p, _)| p)),
                AssignmentChange::Revoked(p) => p.iter().for_each(|p| {
                    owned.remove(p);
                }),
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while owned_a.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the first member never got the partitions"
        );
        a.poll(10, Duration::from_millis(200)).await.unwrap();
        apply(&mut owned_a, a.take_changes());
    }
    let mut b = bus.subscribe("g2").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "the partitions were never shared: {owned_a:?} / {owned_b:?}"
        );
        let (ra, rb) = tokio::join!(
            a.poll(10, Duration::from_millis(200)),
            b.poll(10, Duration::from_millis(200))
        );
        ra.unwrap();
        rb.unwrap();
        apply(&mut owned_a, a.take_changes());
        apply(&mut owned_b, b.take_changes());
        if !owned_a.is_empty() && !owned_b.is_empty() && owned_a.len() + owned_b.len() == 4 {
            break;
        }
    }
    assert!(owned_a.is_disjoint(&owned_b), "{owned_a:?} / {owned_b:?}");
}

/// librdkafka's in-process mock cluster, for faults a real broker cannot be told to have: every
/// broker down (the gateway spools to disk), then a partition leader moving under load. Nothing
/// is lost, nothing is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_and_leader_loss_lose_nothing() {
    use std::sync::Arc;
    use tollgate_bus::Publisher;
    use tollgate_bus::spool::{SpoolConfig, SpoolingPublisher};

    let cluster = rdkafka::mocking::MockCluster::new(3).unwrap();
    cluster.create_topic("faults", 4, 3).unwrap();
    let config = mock_config(&cluster, "faults", 4, 3, 3000);
    let bus = config.open().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = SpoolingPublisher::open(
        bus.publisher().unwrap(),
        SpoolConfig {
            dir: dir.path().to_path_buf(),
            max_bytes: 1 << 30,
            high_water: 100,
        },
    )
    .unwrap();
    let stats = spool.stats();
    let batch = |from: usize| records_from(from, 100);
    spool.publish(batch(0)).await.unwrap();
    spool.flush(Duration::from_secs(30)).await.unwrap();

    // Every broker down: records pile up in librdkafka, then go to the disk spool.
    for b in 1..=3 {
        cluster.broker_down(b).unwrap();
    }
    for i in 1..10 {
        spool.publish(batch(i * 100)).await.unwrap();
    }
    assert!(
        spool.is_spooling().await,
        "an unreachable cluster must make the gateway spool"
    );
    for b in 1..=3 {
        cluster.broker_up(b).unwrap();
    }
    // A leader moves while the spool replays.
    cluster.partition_leader("faults", 0, Some(2)).unwrap();
    for i in 10..15 {
        spool.publish(batch(i * 100)).await.unwrap();
    }
    spool.flush(Duration::from_secs(60)).await.unwrap();
    let spooled = stats.spooled.load(std::sync::atomic::Ordering::Relaxed);
    assert!(spooled > 0);
    assert_eq!(
        spooled,
        stats.replayed.load(std::sync::atomic::Ordering::Relaxed)
    );

    let (_, seen) = read_numbers(&*bus, "faults-check", 1500).await;
    assert_each_once(&seen, 1500);
    drop(Arc::clone(&spool));
}

/// Deliveries that fail (every broker down for longer than `message.timeout.ms`; librdkafka's
/// mock cluster, whose brokers can be taken down cleanly) are queued again by the publisher
/// itself, and land once the brokers are back: every record exactly once, the counters agree,
/// and `flush` waits for the last of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deliveries_are_queued_again_until_they_land() {
    use std::sync::atomic::Ordering::Relaxed;

    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    cluster.create_topic("requeue", 4, 1).unwrap();
    let config = mock_config(&cluster, "requeue", 4, 1, 500);
    let bus = config.open().await.unwrap();
    let publisher = bus.publisher().unwrap();
    let stats = bus
        .delivery_stats()
        .expect("the Kafka publisher counts deliveries");
    publisher.publish(records(100)).await.unwrap();
    publisher.flush(Duration::from_secs(30)).await.unwrap();
    assert_eq!(stats.delivered.load(Relaxed), 100);

    cluster.broker_down(1).unwrap();
    let batch = |from: usize| records_from(from, 250);
    for i in 0..4 {
        publisher.publish(batch(100 + i * 250)).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats.requeued.load(Relaxed) < 1000 {
        assert!(
            Instant::now() < deadline,
            "deliveries to a downed cluster never failed ({} requeued)",
            stats.requeued.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        publisher.backlog(),
        1000,
        "failed records stay in the backlog"
    );
    assert!(
        publisher.flush(Duration::from_millis(200)).await.is_err(),
        "flush cannot succeed while records are undelivered"
    );
    cluster.broker_up(1).unwrap();
    publisher.flush(Duration::from_secs(60)).await.unwrap();
    assert_eq!(publisher.backlog(), 0);
    assert_eq!(stats.delivered.load(Relaxed), 1100);
    assert_eq!(stats.backlog.load(Relaxed), 0);

    let (got, seen) = read_numbers(&*bus, "requeue-check", 1100).await;
    assert_each_once(&seen, 1100);
    for m in &got {
        let i: u64 = String::from_utf8_lossy(&m.payload).parse().unwrap();
        assert_eq!(
            m.key,
            format!("consumer-{}", i % 7),
            "a requeued record keeps its key"
        );
    }
}

/// A librdkafka queue far smaller than a batch: the publisher waits for room and queues the
/// rest of the batch where the full queue stopped it, so every record arrives once and each
/// key's records stay in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_delays_the_rest_of_a_batch_in_order() {
    let broker = tollgate_testkit::Broker::start();
    let (bus, publisher, stats) = open_publisher(
        &broker,
        "small-queue",
        &[("queue.buffering.max.messages", "64")],
    )
    .await;
    publisher.publish(records(3000)).await.unwrap();
    publisher.flush(Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
        3000
    );

    let (got, seen) = read_numbers(&*bus, "small-queue-check", 3000).await;
    let mut by_key: BTreeMap<Bytes, Vec<u64>> = BTreeMap::new();
    for m in &got {
        let i: u64 = String::from_utf8_lossy(&m.payload).parse().unwrap();
        by_key.entry(m.key.clone()).or_default().push(i);
    }
    for (key, seq) in &by_key {
        assert!(seq.windows(2).all(|w| w[0] < w[1]), "{key:?} out of order");
    }
    assert_each_once(&seen, 3000);
}

/// A record librdkafka refuses to queue (larger than `message.max.bytes`) among others: the
/// others are delivered, the refused one is tried once more and then dropped and counted out
/// of the backlog, and the publish succeeds (a retry of it would queue the others twice). A
/// batch refused whole fails the publish, with nothing queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_neither_fails_its_batch_nor_stays_in_the_backlog() {
    use std::sync::atomic::Ordering::Relaxed;

    let broker = tollgate_testkit::Broker::start();
    let (bus, publisher, stats) =
        open_publisher(&broker, "refusals", &[("message.max.bytes", "1000")]).await;
    let mut batch = records(10);
    batch[4].payload = Bytes::from(vec![b'x'; 4000]);
    publisher.publish(batch).await.unwrap();
    publisher.flush(Duration::from_secs(30)).await.unwrap();
    assert_eq!(stats.delivered.load(Relaxed), 9);
    assert_eq!(stats.requeued.load(Relaxed), 1);
    assert_eq!(stats.backlog.load(Relaxed), 0);
    assert_eq!(publisher.backlog(), 0);

    let whole = vec![Record {
        key: Bytes::from_static(b"consumer-0"),
        payload: Bytes::from(vec![b'x'; 4000]),
    }];
    assert!(publisher.publish(whole).await.is_err());
    assert_eq!(publisher.backlog(), 0);

    let (_, seen) = read_numbers(&*bus, "refusals-check", 9).await;
    assert_eq!(seen, vec![0, 1, 2, 3, 5, 6, 7, 8, 9]);
}

/// Reads records as a new consumer group `group` until each of `0..n` arrived at least once;
/// returns the numbers of every record read, duplicates included, in ascending order.
async fn read_all_of(bus: &dyn Bus, group: &str, n: u64) -> Vec<u64> {
    let mut sub = bus.subscribe(group).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut numbers = Vec::new();
    let mut distinct = BTreeSet::new();
    while (distinct.len() as u64) < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} records arrived",
            distinct.len()
        );
        for m in sub.poll(1000, Duration::from_millis(200)).await.unwrap() {
            let i: u64 = String::from_utf8_lossy(&m.payload).parse().unwrap();
            distinct.insert(i);
            numbers.push(i);
        }
    }
    // Whatever else is already there (duplicates written after the last number needed).
    for _ in 0..3 {
        for m in sub.poll(1000, Duration::from_millis(200)).await.unwrap() {
            numbers.push(String::from_utf8_lossy(&m.payload).parse().unwrap());
        }
    }
    numbers.sort_unstable();
    numbers
}

/// Publishes 100 records, freezes the broker (SIGSTOP), publishes 1,000 more, waits until
/// `frozen` says enough happened, thaws the broker, and waits for every record's delivery.
async fn publish_across_a_freeze(
    broker: &tollgate_testkit::Broker,
    publisher: &dyn tollgate_bus::Publisher,
    frozen: impl AsyncFn() -> bool,
) {
    publisher.publish(records(100)).await.unwrap();
    publisher.flush(Duration::from_secs(30)).await.unwrap();
    broker.freeze();
    for i in 0..4 {
        publisher
            .publish(records_from(100 + i * 250, 250))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !frozen().await {
        assert!(Instant::now() < deadline, "the freeze did not take effect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.thaw();
    publisher.flush(Duration::from_secs(60)).await.unwrap();
    assert_eq!(publisher.backlog(), 0);
}

/// A real broker frozen for longer than a request may take: with the production settings no
/// delivery times out (no `message.timeout.ms`), so nothing is queued again by the publisher;
/// librdkafka sends the timed-out requests again itself, idempotently, and every record lands
/// exactly once. (With a two-second delivery timeout, records are queued again here, 2,000 times.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_broker_gets_every_record_once_after_it_thaws() {
    use std::sync::atomic::Ordering::Relaxed;

    let broker = tollgate_testkit::Broker::start();
    // Requests time out (and are sent again) after a second, well within the freeze.
    let (bus, publisher, stats) =
        open_publisher(&broker, "frozen", &[("request.timeout.ms", "1000")]).await;
    let started = Instant::now();
    publish_across_a_freeze(&broker, &*publisher, async || {
        started.elapsed() > Duration::from_secs(4)
    })
    .await;
    assert_eq!(stats.requeued.load(Relaxed), 0, "no delivery failed");
    assert_eq!(stats.delivered.load(Relaxed), 1100);
    let numbers = read_all_of(&*bus, "frozen-check", 1100).await;
    assert_each_once(&numbers, 1100);
}

/// A real broker frozen past `message.timeout.ms`: librdkafka fails the deliveries and bumps
/// its producer's epoch on its own, which the broker (tansu) then fences. The publisher
/// replaces the fenced producer and queues the records again on the new one, so every record
/// lands (at least once: a request in flight at the freeze may be written after the thaw as
/// well as queued again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_fenced_after_a_long_freeze_is_replaced_and_every_record_lands() {
    use std::sync::atomic::Ordering::Relaxed;

    let broker = tollgate_testkit::Broker::start();
    let (bus, publisher, stats) =
        open_publisher(&broker, "fenced", &[("message.timeout.ms", "2000")]).await;
    publish_across_a_freeze(&broker, &*publisher, async || {
        stats.requeued.load(Relaxed) >= 1000
    })
    .await;
    assert_eq!(stats.delivered.load(Relaxed), 1100);
    let numbers = read_all_of(&*bus, "fenced-check", 1100).await;
    let mut distinct = numbers.clone();
    distinct.dedup();
    assert_eq!(
        distinct,
        (0..1100).collect::<Vec<u64>>(),
        "every record at least once"
    );
    assert!(
        numbers.len() - distinct.len() <= 1000,
        "only records that were in flight at the freeze are written twice ({} duplicates)",
        numbers.len() - distinct.len()
    );
}

/// A gateway that stops while the broker is frozen takes its undelivered records back out of
/// librdkafka (to its disk spool): every one of them, queued or in flight, and then the
/// publisher takes no more and says its records were not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_records_are_given_back_while_the_broker_is_frozen() {
    let broker = tollgate_testkit::Broker::start();
    let (_bus, publisher, _) = open_publisher(&broker, "given-back", &[]).await;
    publisher.publish(records(100)).await.unwrap();
    publisher.flush(Duration::from_secs(30)).await.unwrap();
    broker.freeze();
    for i in 0..4 {
        publisher
            .publish(records_from(100 + i * 250, 250))
            .await
            .unwrap();
    }
    assert!(publisher.flush(Duration::from_millis(300)).await.is_err());
    let taken = publisher.take_undelivered(Duration::from_secs(10)).await;
    let mut numbers: Vec<u64> = taken
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).parse().unwrap())
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (100..1100).collect::<Vec<u64>>());
    assert!(
        taken.iter().all(|r| r.key
            == format!(
                "consumer-{}",
                String::from_utf8_lossy(&r.payload).parse::<u64>().unwrap() % 7
            )),
        "each record keeps its key"
    );
    assert_eq!(publisher.backlog(), 0);
    assert!(
        publisher.publish(records(1)).await.is_err(),
        "it takes no more"
    );
    assert!(
        publisher.flush(Duration::from_secs(1)).await.is_err(),
        "given back is not delivered"
    );
    broker.thaw();
}

/// What the process logs, for the test that checks librdkafka's lines reach it.
#[derive(Clone, Default)]
struct Logged(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// librdkafka's warnings reach the process's log (target `librdkafka`): a consumer property
/// given to the publisher's producer (`session.timeout.ms`, which every test's configuration
/// sets) is warned about. (Each test runs in a process of its own, so the global subscriber is
/// this test's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_warnings_are_logged() {
    let logged = Logged::default();
    let sink = logged.clone();
    tracing_subscriber::fmt()
        .with_env_filter("librdkafka=warn")
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();
    let broker = tollgate_testkit::Broker::start();
    let (_bus, publisher, _) = open_publisher(&broker, "logged", &[]).await;
    publisher.publish(records(1)).await.unwrap();
    publisher.flush(Duration::from_secs(30)).await.unwrap();
    let warned = || {
        String::from_utf8_lossy(&logged.0.lock().unwrap())
            .lines()
            .filter(|l| {
                l.contains("WARN") && l.contains("session.timeout.ms is a consumer property")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while warned() < 1 {
        assert!(
            Instant::now() < deadline,
            "librdkafka's warnings were not logged:\n{}",
            String::from_utf8_lossy(&logged.0.lock().unwrap())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
