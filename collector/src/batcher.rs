//! Batching by size and time: events accumulate until the batch is full or its first event has
//! waited `linger`; the batch carries the bus checkpoint just after its last message.

use std::time::Duration;

use tokio::time::Instant;
use tollgate_schemas::{Checkpoint, RequestEvent, SchemaError};
use tollgate_store::{EventBatch, Position};

/// Accumulates consumed messages into store batches.
#[derive(Debug)]
pub struct Batcher {
    max: usize,
    linger: Duration,
    /// The batch's events are the first `filled`; those after them are spares, events of a
    /// batch the store is done with, decoded into again where they lie (their strings reused).
    events: Vec<RequestEvent>,
    filled: usize,
    positions: Vec<Position>,
    /// Messages taken in (valid or not) since the last batch.
    messages: usize,
    through: Checkpoint,
    since: Option<Instant>,
}

impl Batcher {
    pub fn new(max: usize, linger: Duration) -> Batcher {
        Batcher {
            max: max.max(1),
            linger,
            events: Vec::new(),
            filled: 0,
            positions: Vec::new(),
            messages: 0,
            through: Checkpoint::default(),
            since: None,
        }
    }

    /// How many more messages fit.
    pub fn room(&self) -> usize {
        self.max.saturating_sub(self.messages).max(1)
    }

    /// Adds a valid event consumed at `partition`/`offset`.
    pub fn push(&mut self, ev: RequestEvent, partition: u32, offset: u64, now: Instant) {
        match self.events.get_mut(self.filled) {
            Some(spare) => *spare = ev,
            None => self.events.push(ev),
        }
        self.place(partition, offset, now);
    }

    /// Adds the event just placed at `events[filled]` (by [`Self::decode`], or `push`),
    /// consumed at `partition`/`offset`.
    pub fn place(&mut self, partition: u32, offset: u64, now: Instant) {
        self.filled += 1;
        self.positions.push(Position { partition, offset });
        self.skip(partition, offset, now);
    }

    /// [`Self::decode`] and [`Self::place`]: an invalid message adds nothing and is not
    /// accounted for.
    #[cfg(test)]
    fn push_json(
        &mut self,
        json: &[u8],
        partition: u32,
        offset: u64,
        now: Instant,
    ) -> Result<(), SchemaError> {
        self.decode(json)?;
        self.place(partition, offset, now);
        Ok(())
    }

    /// Decodes a consumed message into the next spare ([`RequestEvent::decode_into`], where it
    /// lies), without adding it to the batch yet: [`Self::place`] adds it, [`Self::skip`]
    /// leaves it a spare (a duplicate the collector drops, an invalid message).
    ///
    /// Decoding in place: taking a spare out of a vector of its own and pushing the decoded
    /// event onto the batch's moved each event's 280 bytes twice through memory a flush no
    /// longer had in cache (a batch is up to 100,000 events), about 4 % of the collector's CPU
    /// while it drained a backlog (BENCHMARKS.md).
    pub fn decode(&mut self, json: &[u8]) -> Result<&RequestEvent, SchemaError> {
        if self.filled < self.events.len() {
            // A spare a failed decode left half written is still a spare: decoding into it
            // again overwrites every field.
            self.events[self.filled].decode_into(json)?;
        } else {
            self.events.push(RequestEvent::from_json(json)?);
        }
        Ok(&self.events[self.filled])
    }

    /// Accounts for a consumed message that produced no event (dead-lettered, or a copy the
    /// collector dropped).
    pub fn skip(&mut self, partition: u32, offset: u64, now: Instant) {
        self.messages += 1;
        self.through.advance(partition, offset);
        self.since.get_or_insert(now);
    }

    /// Time until the current batch is due; `None` when empty.
    pub fn time_left(&self, now: Instant) -> Option<Duration> {
        self.since
            .map(|s| (s + self.linger).saturating_duration_since(now))
    }

    /// The batch, if full or lingered long enough.
    pub fn take_if_due(&mut self, now: Instant) -> Option<EventBatch> {
        let due = self.messages >= self.max || self.time_left(now).is_some_and(|d| d.is_zero());
        if due { self.take() } else { None }
    }

    /// The batch, whatever its size (`None` when nothing was consumed).
    pub fn take(&mut self) -> Option<EventBatch> {
        self.since.take()?;
        self.messages = 0;
        self.events.truncate(std::mem::take(&mut self.filled));
        Some(EventBatch {
            events: std::mem::take(&mut self.events),
            positions: std::mem::take(&mut self.positions),
            through: self.through.clone(),
        })
    }

    /// Takes back a batch the store is done with, to fill its vectors again: a batch of tens
    /// of thousands of events is megabytes, and growing fresh vectors for each one (copies,
    /// page faults) was a tenth of a collector's CPU while it drained a backlog. What the
    /// vectors keep is bounded by the batch size.
    ///
    /// The batch's events themselves become the spares that [`Self::decode`] decodes into,
    /// so their strings are reused rather than freed and allocated again, and their vector
    /// holds the next batch. (Taken only while no event of the next batch has come in yet,
    /// as in the collector, which recycles a batch right after appending it.)
    pub fn recycle(&mut self, batch: EventBatch) {
        let (events, mut positions) = (batch.events, batch.positions);
        if self.events.is_empty() {
            self.events = events;
        }
        if self.positions.is_empty() && positions.capacity() > self.positions.capacity() {
            positions.clear();
            self.positions = positions;
        }
    }

    /// Frees the spares and the vectors' spare room, once the collector has had nothing to
    /// store for a while. A batch's worth of spares is megabytes, and their strings lie among
    /// the allocator's pages of everything else freed since: kept through an idle stretch,
    /// they hold those pages, which `malloc_trim` can hand back only when wholly free. The
    /// next busy stretch grows fresh vectors once.
    pub fn release_spares(&mut self) {
        self.events.truncate(self.filled);
        self.events.shrink_to_fit();
        self.positions.shrink_to_fit();
    }

    /// Forgets everything taken in from `partitions` (revoked: their new owner reads it again).
    pub fn drop_partitions(&mut self, partitions: &[u32]) {
        self.events.truncate(self.filled);
        let keep: Vec<bool> = self
            .positions
            .iter()
            .map(|p| !partitions.contains(&p.partition))
            .collect();
        let mut k = keep.iter();
        self.events
            .retain(|_| *k.next().expect("one flag per event"));
        let mut k = keep.iter();
        self.positions
            .retain(|_| *k.next().expect("one flag per position"));
        for p in partitions {
            self.through.0.remove(p);
        }
        self.filled = self.events.len();
        self.messages = self.events.len();
        if self.events.is_empty() && self.through.0.is_empty() {
            self.since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tollgate_schemas::Outcome;

    fn ev(n: u64) -> RequestEvent {
        RequestEvent {
            v: 1,
            id: uuid::Uuid::now_v7(),
            ts: chrono::Utc::now(),
            gateway: "g".into(),
            route: None,
            method: "GET".into(),
            path: "/".into(),
            status: 404,
            latency_us: n,
            upstream_latency_us: None,
            req_bytes: 0,
            resp_bytes: 0,
            consumer: None,
            plan: None,
            outcome: Outcome::NotFound,
            billable: false,
            trace_id: None,
        }
    }

    #[test]
    fn recycled_events_are_decoded_into_again_and_their_vector_holds_a_later_batch() {
        let now = Instant::now();
        let mut b = Batcher::new(3, Duration::from_millis(10));
        let json = |n: u64| ev(n).to_json();
        for o in 0..3 {
            b.push_json(&json(o), 0, o, now).unwrap();
        }
        let first = b.take_if_due(now).expect("full");
        let strings: std::collections::HashSet<*const u8> =
            first.events.iter().map(|e| e.path.as_ptr()).collect();
        b.recycle(first);
        assert!(b.push_json(b"{not json", 0, 3, now).is_err());
        b.skip(0, 3, now);
        for o in 4..7 {
            b.push_json(&json(o), 0, o, now).unwrap();
        }
        let second = b.take_if_due(now).expect("full");
        let latencies: Vec<u64> = second.events.iter().map(|e| e.latency_us).collect();
        assert_eq!(latencies, [4, 5, 6]);
        assert_eq!(second.through.0[&0], 7);
        for e in &second.events {
            assert_eq!(
                e,
                &RequestEvent {
                    ts: e.ts,
                    id: e.id,
                    ..ev(e.latency_us)
                }
            );
            assert!(
                strings.contains(&e.path.as_ptr()),
                "a spare's string is reused"
            );
        }
        b.recycle(second);
        assert_eq!((b.events.len(), b.filled), (3, 0), "three spares, no event");
        b.push(ev(7), 0, 7, now);
        let third = b.take().expect("one event");
        assert_eq!(third.events.len(), 1);
        assert_eq!(third.events[0].latency_us, 7);
        assert_eq!(third.through.0[&0], 8);
    }

    #[test]
    fn released_spares_free_their_room_and_batching_goes_on() {
        let now = Instant::now();
        let mut b = Batcher::new(4, Duration::from_millis(10));
        for o in 0..4 {
            b.push(ev(o), 0, o, now);
        }
        let batch = b.take_if_due(now).expect("full");
        b.recycle(batch);
        b.push(ev(4), 0, 4, now);
        assert_eq!(b.events.len(), 4, "one event and three spares");
        b.release_spares();
        assert_eq!((b.events.len(), b.events.capacity()), (1, 1));
        assert_eq!(b.positions.capacity(), 1);
        b.push(ev(5), 0, 5, now);
        let batch = b.take().expect("two events");
        let latencies: Vec<u64> = batch.events.iter().map(|e| e.latency_us).collect();
        assert_eq!(latencies, [4, 5]);
        assert_eq!(batch.through.0[&0], 6);
    }

    proptest! {
        /// Every message lands in exactly one batch, in order; no batch exceeds `max`; every batch's
        /// checkpoint is just past its last message; nothing waits longer than `linger` once time
        /// is checked.
        #[test]
        fn batches_preserve_order_size_and_checkpoints(
            max in 1usize..50,
            linger_ms in 1u64..100,
            steps in proptest::collection::vec((0usize..20, 0u64..60, proptest::bool::ANY), 1..60),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut b = Batcher::new(max, Duration::from_millis(linger_ms));
            let mut offset = 0u64;
            let mut out: Vec<(Vec<RequestEvent>, Checkpoint)> = Vec::new();
            let as_pair = |b: EventBatch| (b.events, b.through);
            let mut valid_offsets = Vec::new();
            for (n, gap_ms, invalid) in steps {
                now += Duration::from_millis(gap_ms);
                if let Some(batch) = b.take_if_due(now) { out.push(as_pair(batch)); }
                let n = n.min(b.room());
                for _ in 0..n {
                    if invalid { b.skip(0, offset, now) } else { b.push(ev(offset), 0, offset, now); valid_offsets.push(offset) }
                    offset += 1;
                }
                prop_assert!(b.messages <= max);
                if let Some(batch) = b.take_if_due(now) { out.push(as_pair(batch)); }
                if let Some(left) = b.time_left(now) { prop_assert!(left <= Duration::from_millis(linger_ms)); }
            }
            if let Some(batch) = b.take() { out.push(as_pair(batch)); }
            let seen: Vec<u64> = out.iter().flat_map(|(e, _)| e.iter().map(|e| e.latency_us)).collect();
            prop_assert_eq!(seen, valid_offsets);
            for w in out.windows(2) { prop_assert!(w[0].1.0[&0] <= w[1].1.0[&0]); }
            if offset > 0 { prop_assert_eq!(out.last().unwrap().1.0[&0], offset); }
            for (e, _) in &out { prop_assert!(e.len() <= max); }
        }
    }
}
