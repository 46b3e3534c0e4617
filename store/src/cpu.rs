//! Background work that gives the cores back often.
//!
//! In one process (`tollgate up`) the store's flushes, rollups and merges and the collector's
//! decoding share the cores with the gateway's workers. Each is a burst of CPU: a flush every
//! 2 s at 19,000 requests/s wrote a 40,000-row events file in about 33 ms and built its
//! rollups in about 25 ms, each without a break. On two cores, requests that arrive during
//! such a burst wait behind it, and the scheduler did not cut it short. Beside an nginx proxy
//! under a fixed request rate (`scripts/bench-bursts.sh`), 8 ms bursts every 50 ms took its p99
//! from 1.2–2.5 ms to 4.8–5.5 ms; at the lowest priority (`SCHED_IDLE`, or nice 19) the same
//! bursts still gave 4.4–7.4 ms, while the same work handing the core back every half
//! millisecond (`sched_yield`) gave 2.1–2.8 ms in three runs of four (5.5 in the fourth;
//! BENCHMARKS.md). Measured on `tollgate up` itself, the change is within the spread of its
//! runs.
//!
//! So long background loops call [`Yielder::tick`] between small steps: once [`SLICE`] has
//! passed since the last yield it calls `sched_yield`, which lets any thread waiting for this
//! core run first and costs about a microsecond when none is.
//!
//! ## In the idle class: leave the core idle for a moment ([`offer_by_pausing`])
//!
//! `sched_yield` only lets the threads queued on this core run. A thread in `SCHED_IDLE`
//! (where `tollgate up` runs ingest while it keeps up, `src/sched.rs`) costs the others more
//! than that: a core that runs it is not idle, so it never pulls work queued on the other
//! core, which is what a core does the moment it goes idle; only the periodic balancing moves
//! it, milliseconds later. Beside nginx as a proxy under a fixed rate (35,000 requests/s, the
//! open-loop generator of `scripts/bench-open-loop.sh`, three rounds each), one
//! `SCHED_IDLE` thread that never sleeps took nginx's p99 from 2.0–2.7 ms to 12–40 ms;
//! calling `sched_yield` every half millisecond, to 7.1–9.0 ms; sleeping about 70 µs every
//! half millisecond, to 3.3–3.5 ms (16 in one round). Two such threads that never sleep gave
//! 48–58 ms (BENCHMARKS.md, "idle-class work and the other core").
//!
//! So while the ingest threads are in the idle class, [`Yielder::tick`] sleeps for [`PAUSE`]
//! instead: the core goes idle, takes whatever waits elsewhere, and the loop goes on when the
//! core is free again. At most that could cost ingest a sixth of its speed where no other
//! thread wants the core; `scripts/bench-ingest.sh` measured no difference (a million events
//! stored in 1.54–1.55 s, against 1.25–1.56 s before), and at a fixed rate on `tollgate up`
//! the tail moved within the machine's spread. At its fair share (batch class, or a
//! collector of its own) it yields as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;

/// How long background work runs before it offers its core to waiting threads.
pub const SLICE: Duration = Duration::from_micros(500);

/// How long [`Yielder::tick`] leaves the core idle while [`offer_by_pausing`] is on (the
/// kernel's timer slack, 50 µs by default, comes on top).
pub const PAUSE: Duration = Duration::from_micros(50);

/// Whether [`Yielder::tick`] sleeps for [`PAUSE`] instead of calling `sched_yield`.
static PAUSING: AtomicBool = AtomicBool::new(false);

/// Makes background loops offer their core by leaving it idle for [`PAUSE`] (`true`), or by
/// `sched_yield` (`false`, the default): set by the process as it moves the threads that run
/// them into the idle scheduling class and out of it (see the module docs).
pub fn offer_by_pausing(on: bool) {
    PAUSING.store(on, Ordering::Relaxed);
}

/// Whether background loops offer their core by pausing now (see [`offer_by_pausing`]).
pub fn offers_by_pausing() -> bool {
    PAUSING.load(Ordering::Relaxed)
}

/// Rows a background loop handles between two [`Yielder::tick`]s: well under a [`SLICE`] of
/// encoding, aggregating or decoding.
pub const STEP_ROWS: usize = 2048;

/// Tracks the time since a background loop last offered its core; see the module docs.
#[derive(Debug)]
pub struct Yielder {
    since: Instant,
}

impl Default for Yielder {
    fn default() -> Self {
        Yielder::new()
    }
}

impl Yielder {
    pub fn new() -> Yielder {
        Yielder {
            since: Instant::now(),
        }
    }

    /// Offers the core if a [`SLICE`] has passed since the last offer (or since `new`): a
    /// [`PAUSE`] or a `sched_yield` (see [`offer_by_pausing`]). Returns whether it did.
    pub fn tick(&mut self) -> bool {
        if self.since.elapsed() < SLICE {
            return false;
        }
        if offers_by_pausing() {
            std::thread::sleep(PAUSE);
        } else {
            std::thread::yield_now();
        }
        self.since = Instant::now();
        true
    }
}

/// `batch` as consecutive slices of at most [`STEP_ROWS`] rows (views, no copies).
pub fn steps(batch: &RecordBatch) -> impl Iterator<Item = RecordBatch> + '_ {
    let rows = batch.num_rows();
    (0..rows)
        .step_by(STEP_ROWS)
        .map(move |at| batch.slice(at, STEP_ROWS.min(rows - at)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yields_at_most_once_per_slice_and_after_a_slice() {
        let mut y = Yielder::new();
        let started = Instant::now();
        let mut yields = 0u32;
        while started.elapsed() < SLICE * 5 {
            yields += u32::from(y.tick());
        }
        let slices = (started.elapsed().as_micros() / SLICE.as_micros()) as u32;
        assert!(yields >= 1, "five slices of work never yielded");
        assert!(yields <= slices, "{yields} yields in {slices} slices");
    }

    /// Pausing is process-wide; the test runner gives each test a process of its own.
    #[test]
    fn a_pausing_offer_leaves_the_core_for_at_least_the_pause() {
        offer_by_pausing(true);
        let mut y = Yielder::new();
        std::thread::sleep(SLICE);
        let before = Instant::now();
        assert!(y.tick());
        assert!(
            before.elapsed() >= PAUSE,
            "offered for {:?}",
            before.elapsed()
        );
        offer_by_pausing(false);
        assert!(!offers_by_pausing());
    }
}
