//! The ids of the events a collector stored last, to drop an event the bus holds twice.
//!
//! The collector is exactly once per bus position (the crate's docs), but a bus may hold one
//! event at two positions: Kafka's producer writes a record twice on a few rare paths (a
//! producer replaced after the broker fenced it, a gateway stopped or crashed during an outage
//! whose spool then replays what may have landed, a `message.timeout.ms` set by hand:
//! `tollgate_bus`'s Kafka docs). Both copies carry the same event id and the same key, so they
//! reach the same partition, the second after the first. A collector that remembers the ids of
//! the last `collector.dedup_window_events` events it consumed drops the second copy
//! (`tollgate_collector_duplicates_total`) instead of counting it twice. This is what metering
//! pipelines on Kafka do (OpenMeter deduplicates by event id within a window too).
//!
//! What the window does not catch, and why it never drops an event that was not stored:
//! - copies further apart than the window: the default, a million events, is a minute of
//!   16,000 events a second. A full window of a million takes 53 MB, and a lookup with its
//!   insertion and eviction 76 ns (ten million random ids through a window of a million, one
//!   core of the reference machine; the same structures in a scratch program). Each 16-byte id
//!   lies in the hash table (sized to the next power of two, one control byte more) and in the
//!   order of arrival;
//! - a first copy consumed before this collector started, or by another member of the group
//!   (a rebalance moved its partition): the window is this run's memory only;
//! - on a revocation the window is emptied: the revoked partitions' events not yet stored are
//!   dropped for their next owner, and their ids must not make this collector skip them if it
//!   gets them back. A failed append or flush ends the run, and with it the window.
//! - records the store already held when their partition was assigned are skipped by position
//!   without being decoded, so their ids are not noted.
//!
//! The embedded log never holds a record twice (a failed publish leaves none of its records in
//! it), so the window is off there by default: it would cost ingest a lookup per event and
//! `tollgate up` its memory for nothing.

use std::collections::{HashSet, VecDeque};

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
    pub fn new(cap: usize) -> Option<Recent> {
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

    /// Forgets every id, and the memory they took.
    pub fn clear(&mut self) {
        *self = Recent {
            ids: HashSet::default(),
            order: VecDeque::new(),
            cap: self.cap,
        };
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
        w.clear();
        assert_eq!(w.len(), 0);
        assert!(!w.seen(4), "forgotten");
    }
}
