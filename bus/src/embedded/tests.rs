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
