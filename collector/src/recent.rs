//! The ids of the events a collector consumed last, to drop an event the bus holds twice.
//!
//! The collector is exactly once per bus position (the crate's docs), but a bus may hold one
//! event at two positions: Kafka's producer writes a record twice on a few rare paths (a
//! producer replaced after the broker fenced it, a gateway stopped or crashed during an outage
//! whose spool then replays what may have landed, a `message.timeout.ms` set by hand:
//! `tollgate_bus`'s Kafka docs). Both copies carry the same event id and the same key, so they
//! reach the same partition, the second after the first. A collector that remembers the ids of
//! the last `collector.dedup_window_events` events drops the second copy
//! (`tollgate_collector_duplicates_total`) instead of counting it twice. This is what metering
//! pipelines on Kafka do (OpenMeter deduplicates by event id within a window too).
//!
//! One window serves every partition the collector owns, so a partition holding most of the
//! traffic (all of one consumer's events go to one) has most of it. When the collector takes
//! partitions over (at start, on a rebalance) it seeds the window with the ids of the events
//! the store holds just before where each resumes (`EventWriter::recent_ids`: ClickHouse reads
//! them by bus position, a primary-key range), the window shared among the new partitions in
//! proportion to the records each has held (its resume position), so a copy whose first was
//! stored by a collector that has since stopped, crashed or lost the partition is dropped too.
//! What still gets through:
//! - copies further apart than the window (across all of the collector's partitions): the
//!   default, a million events, is a minute of 16,000 events a second. A full window of a
//!   million takes 57 MB, and a lookup with its insertion and eviction 81–85 ns (ten
//!   million random ids through a window of a million, one core of the reference machine; the
//!   same structures in a scratch program). Each 16-byte id lies in the hash table (sized to
//!   the next power of two, one control byte more) and in the order of arrival, with its
//!   partition;
//! - after a takeover, copies further apart than the new partition's share of the seed;
//! - with a store that cannot look ids up by position (the Parquet store, whose embedded bus
//!   never repeats a record), a first copy consumed before this collector took the partition;
//! - a copy that reached another partition: the topic's partition count changed between them.
//!
//! Why it never drops an event that was not stored: ids come from the store, or are noted as
//! events are consumed; a revoked partition's ids leave the window with its events not yet
//! stored (they are dropped for the next owner), and a failed append or flush ends the run,
//! and the window with it. Records the store already held when their partition was assigned
//! are skipped by position without being decoded.
//!
//! The embedded log never holds a record twice (a failed publish leaves none of its records in
//! it), so the window is off there by default: it would cost ingest a lookup per event and
//! `tollgate up` its memory for nothing.

use std::collections::{HashSet, VecDeque};

/// The ids of the last `cap` events noted, with the partition of each.
#[derive(Debug)]
pub struct Recent {
    ids: HashSet<u128, foldhash::fast::RandomState>,
    /// The same ids, oldest first: what leaves the window next...
    order: VecDeque<u128>,
    /// ...and the partition of each.
    partitions: VecDeque<u32>,
    cap: usize,
}

impl Recent {
    /// A window of `cap` ids; `None` for 0 (off). Its memory grows with what it holds.
    pub fn new(cap: usize) -> Option<Recent> {
        (cap > 0).then(|| Recent {
            ids: HashSet::default(),
            order: VecDeque::new(),
            partitions: VecDeque::new(),
            cap,
        })
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Whether `id` is in the window; notes it, of `partition`, if not (the oldest id leaves a
    /// full window).
    pub fn seen(&mut self, partition: u32, id: u128) -> bool {
        if !self.ids.insert(id) {
            return true;
        }
        self.order.push_back(id);
        self.partitions.push_back(partition);
        if self.order.len() > self.cap
            && let Some(oldest) = self.order.pop_front()
        {
            self.partitions.pop_front();
            self.ids.remove(&oldest);
        }
        false
    }

    /// Notes `ids` of `partition` (oldest first), read from the store.
    pub fn seed(&mut self, partition: u32, ids: &[u128]) {
        for id in ids {
            self.seen(partition, *id);
        }
    }

    /// Forgets the ids of partitions that went to another member.
    pub fn revoke(&mut self, parts: &[u32]) {
        let mut order = VecDeque::with_capacity(self.order.len());
        let mut partitions = VecDeque::with_capacity(self.order.len());
        for (id, p) in self.order.drain(..).zip(self.partitions.drain(..)) {
            if parts.contains(&p) {
                self.ids.remove(&id);
            } else {
                order.push_back(id);
                partitions.push_back(p);
            }
        }
        (self.order, self.partitions) = (order, partitions);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len()
    }
}

/// How many ids to seed the window with for each partition taken over, given where each
/// resumes: `cap` shared in proportion to those positions (the records each partition has
/// held, a stand-in for its share of the traffic), as (partition, resume position, ids).
pub fn seed_shares(cap: usize, taken: &[(u32, u64)]) -> Vec<(u32, u64, usize)> {
    let sum: u128 = taken.iter().map(|(_, at)| u128::from(*at)).sum();
    taken
        .iter()
        .filter(|(_, at)| *at > 0)
        .map(|(p, at)| {
            let n = (cap as u128 * u128::from(*at)).div_ceil(sum.max(1));
            (*p, *at, usize::try_from(n).unwrap_or(cap).min(cap))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_seen_again_until_it_leaves_a_full_window() {
        assert!(Recent::new(0).is_none(), "0 turns it off");
        let mut w = Recent::new(3).unwrap();
        assert!(!w.seen(0, 1) && !w.seen(1, 2));
        assert!(w.seen(0, 1), "a repeat within the window");
        assert!(w.seen(5, 1), "whatever the partition");
        assert!(!w.seen(0, 3) && !w.seen(0, 4), "4 pushes 1 out");
        assert_eq!(w.len(), 3);
        assert!(!w.seen(0, 1), "1 had left the window");
        assert!(w.seen(0, 4) && w.seen(0, 3), "the newest stay");
        assert!(!w.seen(0, 2), "2 left when 1 came back");
    }

    #[test]
    fn a_revoked_partition_takes_its_ids_along_and_seeds_add_the_stored_ones() {
        let mut w = Recent::new(10).unwrap();
        w.seed(7, &[1, 2, 3]);
        assert!(!w.seen(8, 4) && !w.seen(7, 5));
        assert!(w.seen(0, 2), "seeded ids are known");
        w.revoke(&[7]);
        assert_eq!(w.len(), 1);
        assert!(w.seen(0, 4), "another partition's id stays");
        assert!(
            !w.seen(7, 1) && !w.seen(7, 5),
            "a revoked partition's ids are forgotten"
        );
    }

    #[test]
    fn seeds_are_shared_by_how_many_records_each_partition_held() {
        assert_eq!(
            seed_shares(1000, &[(0, 900), (1, 100), (2, 0)]),
            [(0, 900, 900), (1, 100, 100)],
            "a partition that held nothing needs no seed"
        );
        assert_eq!(seed_shares(10, &[(3, 5_000_000)]), [(3, 5_000_000, 10)]);
        assert_eq!(seed_shares(10, &[(0, 1), (1, 2)]), [(0, 1, 4), (1, 2, 7)]);
        assert!(seed_shares(10, &[]).is_empty());
    }
}
