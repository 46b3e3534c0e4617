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

use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;

/// How long background work runs before it offers its core to waiting threads.
pub const SLICE: Duration = Duration::from_micros(500);

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

    /// Yields the thread if a [`SLICE`] has passed since the last yield (or since `new`).
    /// Returns whether it did.
    pub fn tick(&mut self) -> bool {
        if self.since.elapsed() < SLICE {
            return false;
        }
        std::thread::yield_now();
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
}
