//! Tests of the embedded log: ordering, durability of commits, segment roll, crash recovery.

use super::*;
use crate::{Publisher, Subscriber};
use bytes::Bytes;

fn cfg(dir: &Path, segment_bytes: u64) -> EmbeddedConfig {
    EmbeddedConfig {
        dir: dir.to_path_buf(),
        segment_bytes,
        ..Default::default()
    }
}

fn rec(i: u64) -> Record {
    Record {
        key: Bytes::from(format!("k{i}")),
        payload: Bytes::from(format!("event-{i}")),
    }
}

async fn drain(sub: &mut EmbeddedSubscriber, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    while out.len() < n {
        let got = sub.poll(1000, Duration::from_secs(5)).await.unwrap();
        assert!(
            !got.is_empty(),
            "timed out after {} of {n} messages",
            out.len()
        );
        out.extend(got);
    }
    out
}

#[tokio::test]
async fn publishes_and_reads_in_order_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(cfg(dir.path(), 200)).unwrap();
    for chunk in (0..100u64).collect::<Vec<_>>().chunks(7) {
        log.publish(chunk.iter().map(|i| rec(*i)).collect())
            .await
            .unwrap();
    }
    assert!(
        segment::list_segments(&dir.path().join("segments"))
            .unwrap()
            .len()
            > 3
    );
    let mut sub = log.subscribe("c").unwrap();
    let got = drain(&mut sub, 100).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.offset, i as u64);
        assert_eq!(m.payload, Bytes::from(format!("event-{i}")));
    }
}

#[tokio::test]
async fn committed_offset_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(cfg(dir.path(), 1 << 20)).unwrap();
        log.publish((0..10).map(rec).collect()).await.unwrap();
        let mut sub = log.subscribe("c").unwrap();
        let got = drain(&mut sub, 10).await;
        let mut cp = Checkpoint::default();
        got[..6]
            .iter()
            .for_each(|m| cp.advance(m.partition, m.offset));
        sub.commit(&cp).await.unwrap();
    }
    let log = EmbeddedLog::open(cfg(dir.path(), 1 << 20)).unwrap();
    assert_eq!(log.end_offset(), 10);
    let mut sub = log.subscribe("c").unwrap();
    assert_eq!(sub.committed(), Checkpoint([(0, 6)].into()));
    let got = drain(&mut sub, 4).await;
    assert_eq!(
        got.iter().map(|m| m.offset).collect::<Vec<_>>(),
        vec![6, 7, 8, 9]
    );
}

#[tokio::test]
async fn torn_tail_is_dropped_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(cfg(dir.path(), 1 << 20)).unwrap();
        log.publish((0..5).map(rec).collect()).await.unwrap();
    }
    // A crash in the middle of a write: half a frame at the end of the segment.
    let seg = segment::segment_path(&dir.path().join("segments"), 0);
    let mut half = Vec::new();
    segment::encode(&mut half, 5, b"k", b"never-acknowledged");
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&half[..half.len() / 2]).unwrap();
    drop(f);

    let log = EmbeddedLog::open(cfg(dir.path(), 1 << 20)).unwrap();
    assert_eq!(log.end_offset(), 5);
    log.publish(vec![rec(5)]).await.unwrap();
    let mut sub = log.subscribe("c").unwrap();
    let got = drain(&mut sub, 6).await;
    assert_eq!(got[5].payload, Bytes::from("event-5"));
    assert!(got.iter().all(|m| !m.payload.starts_with(b"never")));
}

#[tokio::test]
async fn poll_waits_for_new_records() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(cfg(dir.path(), 1 << 20)).unwrap();
    let mut sub = log.subscribe("c").unwrap();
    assert!(
        sub.poll(10, Duration::from_millis(10))
            .await
            .unwrap()
            .is_empty()
    );
    let publisher = log.clone();
    let handle = tokio::spawn(async move { sub.poll(10, Duration::from_secs(10)).await });
    publisher.publish(vec![rec(0)]).await.unwrap();
    let got = handle.await.unwrap().unwrap();
    assert_eq!(got.len(), 1);
}

#[tokio::test]
async fn fully_consumed_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(cfg(dir.path(), 100)).unwrap();
    let mut sub = log.subscribe("c").unwrap();
    log.publish((0..20).map(rec).collect()).await.unwrap();
    let got = drain(&mut sub, 20).await;
    let mut cp = Checkpoint::default();
    got.iter().for_each(|m| cp.advance(m.partition, m.offset));
    sub.commit(&cp).await.unwrap();
    // Roll twice more; everything before offset 20 may go.
    log.publish(vec![rec(20)]).await.unwrap();
    log.publish(vec![rec(21)]).await.unwrap();
    let bases = segment::list_segments(&dir.path().join("segments")).unwrap();
    assert!(bases.iter().all(|b| *b >= 20), "{bases:?}");
    // A group that never committed starts at the oldest event still held, not at offset 0.
    let mut late = log.subscribe("late").unwrap();
    let got = drain(&mut late, 2).await;
    assert_eq!(got.iter().map(|m| m.offset).collect::<Vec<_>>(), [20, 21]);
}

#[tokio::test]
async fn concurrent_publishes_share_a_sync_and_each_returns_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(EmbeddedConfig {
        sync_interval_ms: 300,
        ..cfg(dir.path(), 1 << 20)
    })
    .unwrap();
    let publishes = (0..10u64).map(|i| {
        let log = log.clone();
        tokio::spawn(async move { log.publish(vec![rec(i)]).await })
    });
    for p in publishes.collect::<Vec<_>>() {
        p.await.unwrap().unwrap();
    }
    // The first sync starts at once; every write that missed it waits for the next, which
    // starts an interval later and covers them all.
    assert!(log.syncs() <= 3, "{} syncs for 10 publishes", log.syncs());
    assert_eq!(log.end_offset(), 10, "every returned publish is visible");
    let mut keys: Vec<_> = drain(&mut log.subscribe("c").unwrap(), 10)
        .await
        .into_iter()
        .map(|m| m.key)
        .collect();
    keys.sort();
    let mut want: Vec<_> = (0..10).map(|i| rec(i).key).collect();
    want.sort();
    assert_eq!(keys, want);
}

#[tokio::test]
async fn without_fsync_a_write_is_visible_at_once_and_nothing_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(EmbeddedConfig {
        fsync: false,
        ..cfg(dir.path(), 1 << 20)
    })
    .unwrap();
    log.publish(vec![rec(0), rec(1)]).await.unwrap();
    assert_eq!(log.end_offset(), 2);
    assert_eq!(log.syncs(), 0);
}

#[tokio::test]
async fn publishes_during_group_commits_and_segment_rolls_keep_every_record_once() {
    let dir = tempfile::tempdir().unwrap();
    // Segments of about three records, a sync as soon as the last is done: records are
    // encoded while commits write and segments roll over.
    let config = EmbeddedConfig {
        sync_interval_ms: 0,
        ..cfg(dir.path(), 64)
    };
    let log = EmbeddedLog::open(config.clone()).unwrap();
    // Four waves of five concurrent publishes of five records: four group commits at least.
    for wave in 0..4u64 {
        let publishes: Vec<_> = (0..5u64)
            .map(|p| {
                let log = log.clone();
                let first = 25 * wave + 5 * p;
                tokio::spawn(
                    async move { log.publish((first..first + 5).map(rec).collect()).await },
                )
            })
            .collect();
        for p in publishes {
            p.await.unwrap().unwrap();
        }
    }
    assert_eq!(log.end_offset(), 100);
    let segments = segment::list_segments(&dir.path().join("segments")).unwrap();
    assert!(segments.len() >= 4, "segments: {segments:?}");
    let read = |log: &EmbeddedLog| {
        let mut sub = log.subscribe("c").unwrap();
        async move {
            let got = drain(&mut sub, 100).await;
            // Offsets 0 to 99 in order, each record once.
            assert_eq!(
                got.iter().map(|m| m.offset).collect::<Vec<_>>(),
                (0..100).collect::<Vec<_>>()
            );
            let mut keys: Vec<_> = got.into_iter().map(|m| m.key).collect();
            keys.sort();
            let mut want: Vec<_> = (0..100).map(|i| rec(i).key).collect();
            want.sort();
            assert_eq!(keys, want);
        }
    };
    read(&log).await;
    drop(log);
    // Reopened, the log holds the same records and appends after them.
    let log = EmbeddedLog::open(config).unwrap();
    assert_eq!(log.end_offset(), 100);
    read(&log).await;
    log.publish(vec![rec(100)]).await.unwrap();
    assert_eq!(log.end_offset(), 101);
}

/// Failures the tests can inject into the log's writes and syncs.
#[derive(Default)]
pub(super) struct Faults {
    /// The next sync fails.
    pub fail_sync: std::sync::atomic::AtomicBool,
    /// The next write puts half its batch in the file, then fails.
    pub fail_write: std::sync::atomic::AtomicBool,
}

fn no_interval(dir: &Path, segment_bytes: u64) -> EmbeddedConfig {
    EmbeddedConfig {
        sync_interval_ms: 0,
        ..cfg(dir, segment_bytes)
    }
}

/// A log (one large segment, no sync interval) holding records 0 to 4, durable.
async fn log_of_five(dir: &Path) -> EmbeddedLog {
    let log = EmbeddedLog::open(no_interval(dir, 1 << 20)).unwrap();
    log.publish(records(0..5)).await.unwrap();
    log
}

fn records(range: std::ops::Range<u64>) -> Vec<Record> {
    range.map(rec).collect()
}

/// Every record a new group reads, as payloads.
async fn all_payloads(log: &EmbeddedLog, group: &str) -> Vec<String> {
    let mut sub = log.subscribe(group).unwrap();
    let n = (log.end_offset() - sub.position) as usize;
    let got = drain(&mut sub, n).await;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.offset, i as u64, "offsets run on without a gap");
    }
    got.iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect()
}

fn events(ids: impl IntoIterator<Item = u64>) -> Vec<String> {
    ids.into_iter().map(|i| format!("event-{i}")).collect()
}

/// Two publishes wait for the same sync, which fails: both fail, and none of their records is
/// ever read, not after the next successful sync, nor after a restart. What they publish again
/// is read once.
#[tokio::test]
async fn a_failed_sync_takes_out_what_was_not_durable_and_each_publish_it_covered_fails() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_of_five(dir.path()).await;
    // Told apart from what is published after the failure by their numbers.
    let a = log.write_blocking(&records(100..103)).unwrap();
    let b = log.write_blocking(&records(103..105)).unwrap();
    log.inner.faults.fail_sync.store(true, Ordering::Relaxed);
    assert!(log.sync_through(a).await.is_err());
    assert!(
        log.sync_through(b).await.is_err(),
        "a publish whose records the failed sync discarded must fail too"
    );
    // What is published next is all that is read after the first five.
    log.publish(records(5..10)).await.unwrap();
    log.publish(records(10..12)).await.unwrap();
    let expected = events(0..12);
    assert_eq!(all_payloads(&log, "g1").await, expected);
    drop(log);
    let reopened = EmbeddedLog::open(no_interval(dir.path(), 1 << 20)).unwrap();
    assert_eq!(all_payloads(&reopened, "g2").await, expected);
}

/// A publish whose records a segment roll already made durable succeeds though the sync it
/// waits for fails; the publish written after the roll fails and is taken out.
#[tokio::test]
async fn a_failed_sync_keeps_what_a_roll_made_durable() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(no_interval(dir.path(), 100)).unwrap();
    let a = log.write_blocking(&records(0..8)).unwrap();
    // Over 100 bytes: this write rolls the segment (syncing the first) before writing.
    let b = log.write_blocking(&records(8..10)).unwrap();
    assert!(
        segment::list_segments(&dir.path().join("segments"))
            .unwrap()
            .len()
            > 1
    );
    log.inner.faults.fail_sync.store(true, Ordering::Relaxed);
    assert!(log.sync_through(b).await.is_err());
    log.sync_through(a).await.unwrap();
    assert_eq!(all_payloads(&log, "g").await, events(0..8));
}

/// A write that fails half-way leaves nothing of its batch: its retry is read once, and a
/// restart recovers no half-written record either.
#[tokio::test]
async fn a_failed_write_leaves_nothing_of_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_of_five(dir.path()).await;
    log.inner.faults.fail_write.store(true, Ordering::Relaxed);
    assert!(log.publish(records(5..10)).await.is_err());
    log.publish(records(5..10)).await.unwrap();
    assert_eq!(all_payloads(&log, "g1").await, events(0..10));
    drop(log);
    let reopened = EmbeddedLog::open(no_interval(dir.path(), 1 << 20)).unwrap();
    assert_eq!(all_payloads(&reopened, "g2").await, events(0..10));
}

/// A subscriber that read ahead over records a failed sync then took out reads what was
/// written in their place, not what it had buffered.
#[tokio::test]
async fn a_subscriber_drops_what_it_read_ahead_when_the_log_is_cut_back() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_of_five(dir.path()).await;
    let discarded = log.write_blocking(&records(100..103)).unwrap();
    let mut sub = log.subscribe("g").unwrap();
    // Its buffer now holds the unsynced records too (one read of the whole file).
    assert_eq!(drain(&mut sub, 5).await.len(), 5);
    log.inner.faults.fail_sync.store(true, Ordering::Relaxed);
    assert!(log.sync_through(discarded).await.is_err());
    log.publish(records(5..8)).await.unwrap();
    let got = drain(&mut sub, 3).await;
    let payloads: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(payloads, events(5..8));
}
