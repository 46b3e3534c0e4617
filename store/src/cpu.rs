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
//! So long background loops call [`tick`] between small steps: once [`SLICE`] has
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
//! So while the ingest threads are in the idle class, [`tick`] sleeps for [`PAUSE`]
//! instead: the core goes idle, takes whatever waits elsewhere, and the loop goes on when the
//! core is free again. At its fair share (batch class, or a collector of its own) it yields.
//!
//! ## How long a slice
//!
//! [`SLICE`] was half a millisecond, and the clock was each loop's own; the work between two
//! loops (an append's Arrow batch, a rollup's set-up, closing a Parquet file's columns) was
//! not counted, and ingest's threads ran for up to about 3 ms between offers. With the clock made
//! the thread's and every step bounded, the added p99 of `tollgate up` at 19,500 requests/s
//! fell from 0.59–0.77 ms to 0.40–0.60 ms (six rounds each, nginx 0.20–0.28 ms in the same
//! rounds); a slice of 200 µs instead of 500 took it to 0.40–0.47 ms against 0.46–0.57 (five
//! rounds), and 100 µs gave no more (0.41–0.44). The price is where no other thread wants
//! the cores: a backlog of a million events was stored in 2.23–2.24 s instead of 1.93
//! (`scripts/bench-ingest.sh`), about 450,000 events a second, at the same CPU per event
//! (BENCHMARKS.md, "Ingest's longest runs").

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::RecordBatch;

/// How long background work runs before it offers its core to waiting threads.
pub const SLICE: Duration = Duration::from_micros(200);

/// How long [`tick`] leaves the core idle while [`offer_by_pausing`] is on (the
/// kernel's timer slack, 50 µs by default, comes on top).
pub const PAUSE: Duration = Duration::from_micros(50);

/// Whether [`tick`] sleeps for [`PAUSE`] instead of calling `sched_yield`.
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

/// Rows a background loop handles between two looks at the clock ([`tick_at`]): tens of
/// microseconds of encoding, aggregating or decoding, so that no step runs far past a
/// [`SLICE`].
pub const TICK_ROWS: usize = 256;

/// Rows per piece where work is handed on in pieces (the Parquet writer's input, the readers'
/// batches), with a [`tick`] between pieces.
pub const STEP_ROWS: usize = 2048;

thread_local! {
    /// When this thread last offered its core or slept ([`tick`], [`rested`]).
    static SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Offers the core if a [`SLICE`] has passed since this thread last offered it or slept: a
/// [`PAUSE`] or a `sched_yield` (see [`offer_by_pausing`]). Returns whether it did.
///
/// The clock is the thread's, not the loop's: a loop that started its own clock (as this
/// module's first version did, one per loop) did not count the work before it, and the
/// collector's threads ran for up to about 3 ms between two offers, in the Arrow batch of an
/// append, a rollup's set-up and the steps of a Parquet file (BENCHMARKS.md, "Ingest's
/// longest runs"). A thread's first call starts its clock.
pub fn tick() -> bool {
    let now = Instant::now();
    SINCE.with(|since| match since.get() {
        Some(start) if now.duration_since(start) >= SLICE => {
            if offers_by_pausing() {
                std::thread::sleep(PAUSE);
            } else {
                std::thread::yield_now();
            }
            since.set(Some(Instant::now()));
            true
        }
        Some(_) => false,
        None => {
            since.set(Some(now));
            false
        }
    })
}

/// [`tick`] after every [`TICK_ROWS`]th row `i` of a loop (counting from 0).
pub fn tick_at(i: usize) -> bool {
    i % TICK_ROWS == TICK_ROWS - 1 && tick()
}

/// Restarts this thread's clock, as if it had just offered its core.
#[cfg(test)]
fn rested() {
    SINCE.with(|since| since.set(Some(Instant::now())));
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
        rested();
        let started = Instant::now();
        let mut yields = 0u32;
        while started.elapsed() < SLICE * 5 {
            yields += u32::from(tick());
        }
        let slices = (started.elapsed().as_micros() / SLICE.as_micros()) as u32;
        assert!(yields >= 1, "five slices of work never yielded");
        assert!(yields <= slices, "{yields} yields in {slices} slices");
    }

    /// Pausing is process-wide; the test runner gives each test a process of its own.
    #[test]
    fn a_pausing_offer_leaves_the_core_for_at_least_the_pause() {
        offer_by_pausing(true);
        rested();
        std::thread::sleep(SLICE);
        let before = Instant::now();
        assert!(tick());
        assert!(
            before.elapsed() >= PAUSE,
            "offered for {:?}",
            before.elapsed()
        );
        offer_by_pausing(false);
        assert!(!offers_by_pausing());
    }

    #[test]
    fn a_threads_first_tick_starts_its_clock_and_work_before_a_loop_counts() {
        std::thread::spawn(|| {
            assert!(!tick(), "a thread's first tick offered its core");
            // Work outside any loop of rows, then a loop: its first tick offers at once.
            let spun = Instant::now();
            while spun.elapsed() < SLICE {}
            assert!(tick_at(TICK_ROWS - 1));
            assert!(
                !tick_at(TICK_ROWS),
                "offered between two of every TICK_ROWS rows"
            );
        })
        .join()
        .expect("the test thread");
    }
}
