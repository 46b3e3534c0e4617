//! What billing needs of the store beyond counts: how far the stored events are complete, and
//! the billing exports once published.
//!
//! # Completeness
//!
//! Collectors probe each partition they own: at wall-clock time `t` they read the partition's
//! end offset, and once the store's durable checkpoint reaches that offset they record that the
//! partition was *caught up at `t`*: every record the bus held at `t` is stored. The store keeps
//! the latest such time per partition, with the topic's partition count. The events are
//! complete through the earliest of those times over every partition of the topic (none when a
//! partition has never been recorded, say while its collector is down); the query API subtracts
//! how late an event may still reach the bus (the longest request, batching, clock skew between
//! gateways and collectors: `query_api.billing.event_delay_ms`) before it calls a period
//! complete. A partition whose collector is gone stops the watermark: nothing is called complete
//! that may not be.
//!
//! # Published exports
//!
//! A complete period's export is computed once and stored: its manifest and its lines, as the
//! query API made them (JSON, opaque to the store). Every later download is rendered from the
//! stored lines, so it has the same bytes; late events never change it (the query API turns
//! them into adjustment lines of a later period). When two query APIs publish one period at
//! once, both exports are stored and the one with the earliest `(generated_at_us, id)` is the
//! period's export for every reader.

use serde::{Deserialize, Serialize};

/// The latest time one bus partition was known to be stored up to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionProgress {
    pub partition: u32,
    /// Partitions of the topic when this was recorded.
    pub partitions: u32,
    /// Wall-clock time (µs since the epoch) at which the partition's end was read.
    pub caught_up_us: i64,
}

/// The time through which every partition's records are stored: the earliest caught-up time
/// over partitions `0..n`, where `n` is the partition count last recorded. `None` when some
/// partition has no record yet.
pub fn complete_through(progress: &[PartitionProgress]) -> Option<i64> {
    let latest = progress.iter().max_by_key(|p| p.caught_up_us)?;
    (0..latest.partitions)
        .map(|p| {
            progress
                .iter()
                .filter(|r| r.partition == p)
                .map(|r| r.caught_up_us)
                .max()
        })
        .try_fold(i64::MAX, |min, t| t.map(|t| min.min(t)))
}

/// Keeps, per partition, the latest of `incoming` and `known` (what a backend merges on write).
pub fn merge_progress(known: &mut Vec<PartitionProgress>, incoming: &[PartitionProgress]) {
    for p in incoming {
        match known.iter_mut().find(|k| k.partition == p.partition) {
            Some(k) if k.caught_up_us >= p.caught_up_us => {}
            Some(k) => *k = *p,
            None => known.push(*p),
        }
    }
    known.sort_by_key(|p| p.partition);
}

/// A published billing export as stored: the query API's manifest and lines, opaque here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredExport {
    pub id: String,
    /// The billing period, `YYYY-MM`.
    pub period: String,
    pub generated_at_us: i64,
    /// The manifest, a JSON object.
    pub manifest: String,
    /// The lines, one JSON object per line.
    pub lines: String,
}

impl StoredExport {
    /// The order that picks a period's export among concurrent publications: earliest first.
    pub fn precedence(&self) -> (i64, &str) {
        (self.generated_at_us, &self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(partition: u32, partitions: u32, caught_up_us: i64) -> PartitionProgress {
        PartitionProgress {
            partition,
            partitions,
            caught_up_us,
        }
    }

    #[test]
    fn complete_through_is_the_earliest_partition_and_needs_all_of_them() {
        assert_eq!(complete_through(&[]), None);
        assert_eq!(complete_through(&[p(0, 2, 50)]), None);
        assert_eq!(complete_through(&[p(0, 2, 50), p(1, 2, 40)]), Some(40));
        // More partitions recorded later: the new one must report too.
        assert_eq!(complete_through(&[p(0, 2, 50), p(1, 3, 60)]), None);
        assert_eq!(
            complete_through(&[p(0, 3, 50), p(1, 3, 60), p(2, 3, 70)]),
            Some(50)
        );
    }

    #[test]
    fn merging_keeps_the_latest_per_partition() {
        let mut known = vec![p(0, 2, 50), p(1, 2, 40)];
        merge_progress(&mut known, &[p(1, 2, 45), p(0, 2, 10), p(2, 3, 5)]);
        assert_eq!(known, vec![p(0, 2, 50), p(1, 2, 45), p(2, 3, 5)]);
    }
}
