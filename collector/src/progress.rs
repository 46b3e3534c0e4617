//! How far each owned partition is stored, probed for billing completeness (see
//! `tollgate_store::ledger`): the collector notes the wall-clock time, reads the end offsets of
//! its partitions, and once what it has stored reaches them, records that those partitions were
//! caught up at that time. Then it starts the next probe. The end offsets read at each step
//! also give each partition's lag (`tollgate_collector_lag_events`).
//!
//! Every caught-up probe is recorded, also on a quiet bus, where a record only moves the
//! caught-up time forward. So an idle `tollgate up` rewrites and syncs its store's
//! `progress.json` once per flush interval (2 s by default; about 2 KB/s of writes). Recording
//! quiet probes less often was considered and left: a record every 15 intervals would let the
//! billing watermark lag real time by up to 30 s on a quiet bus, and `tests/scaled.rs` (like a
//! billing system waiting for a period to close) waits at most 30 s for it to pass the time
//! the last events were stored. The flush interval is the knob.

use std::collections::HashSet;

use tollgate_bus::Subscriber;
use tollgate_schemas::Checkpoint;
use tollgate_store::{EventWriter, PartitionProgress};

use crate::metrics::{CollectorMetrics, PartitionLabels};

/// The open probe: when it started and the end offsets it read.
struct Probe {
    started_us: i64,
    ends: Checkpoint,
    partitions: u32,
}

/// The collector's side of completeness.
#[derive(Default)]
pub(crate) struct Progress {
    probe: Option<Probe>,
    /// What the store holds of each partition, as far as this collector knows: the durable
    /// checkpoints of its flushes and where each assigned partition resumed.
    stored: Checkpoint,
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl Progress {
    /// Notes a durable checkpoint of the store.
    pub(crate) fn stored(&mut self, durable: &Checkpoint) {
        self.stored = self.stored.max(durable);
    }

    /// Forgets a partition that went to another collector.
    pub(crate) fn revoked(&mut self, partition: u32) {
        self.stored.0.remove(&partition);
        if let Some(p) = &mut self.probe {
            p.ends.0.remove(&partition);
        }
    }

    /// Records the open probe once every partition it covers (and this collector still owns)
    /// is stored to its end; then reads the end offsets of the owned partitions, which set
    /// each one's lag and open the next probe if none is open. Failures to read the bus or to
    /// record are logged and retried at the next step: completeness waits, nothing else does.
    pub(crate) async fn step(
        &mut self,
        owned: &HashSet<u32>,
        bus: &mut dyn Subscriber,
        store: &dyn EventWriter,
        metrics: &CollectorMetrics,
    ) {
        if let Some(probe) = &self.probe {
            let caught_up = probe.ends.0.iter().all(|(p, end)| {
                !owned.contains(p) || self.stored.0.get(p).copied().unwrap_or(0) >= *end
            });
            if caught_up {
                let rows: Vec<PartitionProgress> = probe
                    .ends
                    .0
                    .keys()
                    .filter(|p| owned.contains(p))
                    .map(|p| PartitionProgress {
                        partition: *p,
                        partitions: probe.partitions,
                        caught_up_us: probe.started_us,
                    })
                    .collect();
                match store.record_progress(&rows).await {
                    Ok(()) => self.probe = None,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not record how far partitions are stored; billing completeness waits");
                    }
                }
            }
        }
        if owned.is_empty() {
            return;
        }
        let started_us = now_us();
        match bus.end_offsets().await {
            Ok((mut ends, partitions)) => {
                ends.0.retain(|p, _| owned.contains(p));
                for (p, end) in &ends.0 {
                    let stored = self.stored.0.get(p).copied().unwrap_or(0);
                    metrics
                        .lag
                        .get_or_create(&PartitionLabels { partition: *p })
                        .set(end.saturating_sub(stored) as i64);
                }
                if self.probe.is_none() {
                    self.probe = Some(Probe {
                        started_us,
                        ends,
                        partitions,
                    });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the bus's end offsets; billing completeness waits");
            }
        }
    }
}
