//! The ids of the events a collector stored last, to drop an event the bus holds twice.
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
//! The window is per partition (both copies reach the same one), `dedup_window_events` shared
//! evenly among the partitions the collector owns. When it takes a partition over (at start,
//! on a rebalance) it seeds the partition's window with the ids of the events the store holds
//! just before where it resumes (`EventWriter::recent_ids`: ClickHouse reads them by bus
//! position, a primary-key range), so a copy whose first was stored by a collector that has
//! since stopped, crashed or lost the partition is dropped too. What still gets through:
//! - copies further apart than the partition's share of the window: the default, a million
//!   events, is a minute of 16,000 events a second. A full window of a million takes 53 MB,
//!   and a lookup with its insertion and eviction 76 ns (ten million random ids through a
//!   window of a million, one core of the reference machine; the same structures in a scratch
//!   program). Each 16-byte id lies in the hash table (sized to the next power of two, one
//!   control byte more) and in the order of arrival;
//! - with a store that cannot look ids up by position (the Parquet store, whose embedded bus
//!   never repeats a record), a first copy consumed before this collector took the partition;
//! - a copy that reached another partition: the topic's partition count changed between them.
//!
//! Why it never drops an event that was not stored: ids come from the store, or are noted as
//! events are consumed; a revoked partition's window goes with its events not yet stored (they
//! are dropped for the next owner), and a failed append or flush ends the run and with it the
//! windows. Records the store already held when their partition was assigned are skipped by
//! position without being decoded.
//!
//! The embedded log never holds a record twice (a failed publish leaves none of its records in
//! it), so the window is off there by default: it would cost ingest a lookup per event and
//! `tollgate up` its memory for nothing.

use std::collections::{HashMap, HashSet, VecDeque};

/// The windows of the partitions a collector owns, `total` ids shared evenly among them.
#[derive(Debug)]
pub struct Windows {
    total: usize,
    by_partition: HashMap<u32, Recent>,
}

impl Windows {
    /// `None` for a total of 0 (off).
    pub fn new(total: usize) -> Option<Windows> {
        (total > 0).then(|| Windows {
            total,
            by_partition: HashMap::new(),
        })
    }

    /// Takes `parts` over with empty windows and shares the total anew among every owned
    /// partition (a window over its new share forgets its oldest ids); returns the share, how
    /// many ids to seed each new window with.
    pub fn assign(&mut self, parts: &[u32]) -> usize {
        for p in parts {
            self.by_partition.entry(*p).or_insert_with(|| Recent {
                ids: HashSet::default(),
                order: VecDeque::new(),
                cap: 1,
            });
        }
        let share = (self.total / self.by_partition.len().max(1)).max(1);
        for w in self.by_partition.values_mut() {
            w.set_cap(share);
        }
        share
    }

    /// Notes `ids` (oldest first) in `partition`'s window, as if consumed before anything else.
    pub fn seed(&mut self, partition: u32, ids: &[u128]) {
        if let Some(w) = self.by_partition.get_mut(&partition) {
            for id in ids {
                w.seen(*id);
            }
        }
    }

    /// Drops the windows of partitions that went to another member.
    pub fn revoke(&mut self, parts: &[u32]) {
        for p in parts {
            self.by_partition.remove(p);
        }
    }

    /// Whether `id` is in `partition`'s window; notes it if not. A partition no assignment
    /// announced gets a window of its own first.
    pub fn seen(&mut self, partition: u32, id: u128) -> bool {
        if !self.by_partition.contains_key(&partition) {
            self.assign(&[partition]);
        }
        self.by_partition
            .get_mut(&partition)
            .is_some_and(|w| w.seen(id))
    }
}

/// The ids of the last `cap` events noted.
#[derive(Debug)]
pub struct Recent {
    ids: HashSet<u128, foldhash::fast::RandomState>,
    /// The same ids, oldest first: what leaves the window next.
    order: VecDeque<u128>,
    cap: usize,
}

impl Recent {
    /// A window of `cap` ids; `None` for 0 (off). Its memory grows with what it holds.
    #[cfg(test)]
    fn new(cap: usize) -> Option<Recent> {
        (cap > 0).then(|| Recent {
            ids: HashSet::default(),
            order: VecDeque::new(),
            cap,
        })
    }

    /// Whether `id` is in the window; notes it (the oldest id leaves a full window) if not.
    pub fn seen(&mut self, id: u128) -> bool {
        if !self.ids.insert(id) {
            return true;
        }
        self.order.push_back(id);
        if self.order.len() > self.cap
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        false
    }

    /// Holds at most `cap` ids from now on, forgetting the oldest beyond it.
    fn set_cap(&mut self, cap: usize) {
        self.cap = cap.max(1);
        while self.order.len() > self.cap {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_seen_again_until_it_leaves_a_full_window() {
        assert!(Recent::new(0).is_none(), "0 turns it off");
        let mut w = Recent::new(3).unwrap();
        assert!(!w.seen(1) && !w.seen(2));
        assert!(w.seen(1), "a repeat within the window");
        assert!(!w.seen(3) && !w.seen(4), "4 pushes 1 out");
        assert_eq!(w.len(), 3);
        assert!(!w.seen(1), "1 had left the window");
        assert!(w.seen(4) && w.seen(3), "the newest stay");
        assert!(!w.seen(2), "2 left when 1 came back");
        w.set_cap(1);
        assert_eq!(w.len(), 1);
        assert!(w.seen(2) && !w.seen(4), "only the newest is kept");
    }

    #[test]
    fn partitions_share_the_total_and_keep_their_own_ids() {
        assert!(Windows::new(0).is_none(), "0 turns it off");
        let mut w = Windows::new(4).unwrap();
        assert_eq!(w.assign(&[0]), 4);
        w.seed(0, &[1, 2, 3, 4]);
        assert!(w.seen(0, 1) && w.seen(0, 4), "seeded ids are known");
        assert!(
            !w.seen(1, 1),
            "another partition's window (an unannounced partition gets one)"
        );
        assert_eq!(w.assign(&[2]), 1, "three partitions share four ids");
        assert!(
            w.seen(0, 4) && !w.seen(0, 3),
            "a window over its share keeps its newest"
        );
        w.revoke(&[0]);
        assert!(!w.seen(0, 3), "a revoked partition's ids are forgotten");
    }
}
