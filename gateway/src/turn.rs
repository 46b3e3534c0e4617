//! Requests to the upstream sent together at the end of a worker's turn.
//!
//! A worker wakes with several connections ready (a request head here, an answer there), runs
//! each one's task in turn, and parks once none is left. Each request used to go to the upstream
//! as soon as its task had built it, so the first send of a turn woke the upstream, which often
//! took the core right then and served that one request before the worker sent the next. Now a
//! task that has built an upstream request waits ([`end_of_turn`]) until the worker has run every
//! other task that was ready, and the requests of the turn leave one after another just before
//! the worker would park ([`release`], the runtime's park hook): the upstream finds them queued
//! together when it wakes.
//!
//! What it costs a request: the rest of its worker's turn, which is the other ready tasks' work
//! until each reaches its own next wait (a few microseconds each). That wait is bounded: at most
//! [`MOST_WAITING`] sends wait on a worker; the one after that goes at once and takes the
//! waiting ones with it. A worker whose run queue never empties still releases them through that
//! bound, and a worker that parks always releases them first.
//!
//! Measured on the two-core reference machine, where the load generator and the upstream share
//! the gateway's cores (BENCHMARKS.md, twenty-eighth round):
//! - The upstream's CPU fell from 5.93–6.04 to 5.63–5.88 µs a request, the whole machine's
//!   kernel time by 0.8 µs.
//! - Requests/s rose by 1–2.5 % at the medians: the new build was higher in 21 of 31
//!   alternating rounds.
//! - The cost: the worker now often parks right after a turn's sends, before their answers
//!   are back, where it used to serve other connections meanwhile. Its voluntary context
//!   switches rose slightly in some runs (0.068 to 0.072 a request at the medians of six
//!   rounds).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// At most this many tasks wait for the end of their worker's turn. More than a worker serves
/// in one turn at the benchmark's load (8–16 ready connections per wake-up), few enough that a
/// release never takes long.
pub const MOST_WAITING: usize = 32;

thread_local! {
    /// Whether this thread's runtime releases the waiting tasks before it parks
    /// ([`worker_runtime`]).
    static ON: Cell<bool> = const { Cell::new(false) };
    /// This worker's tasks waiting for the end of the turn.
    static WAITING: RefCell<Vec<Waker>> = const { RefCell::new(Vec::new()) };
    /// The list a release empties, kept with its capacity and swapped with [`WAITING`]'s, so
    /// that a warm worker allocates nothing here.
    static RELEASING: RefCell<Vec<Waker>> = const { RefCell::new(Vec::new()) };
}

/// A worker's runtime, for the calling thread: single-threaded, releasing the turn's waits
/// before it parks, and with [`end_of_turn`] waiting on this thread (on any other it is ready
/// at once: a task there would otherwise wait until [`MOST_WAITING`] others did).
pub fn worker_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    ON.with(|on| on.set(true));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(release)
        .build()
}

/// Waits until the calling task's worker has run every other task that is ready, or until
/// [`MOST_WAITING`] wait (see the module's docs). Ready at once on a thread that is not a
/// worker ([`worker_runtime`]).
pub fn end_of_turn() -> EndOfTurn {
    EndOfTurn { waited: false }
}

/// See [`end_of_turn`].
pub struct EndOfTurn {
    waited: bool,
}

impl Future for EndOfTurn {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.waited || !ON.with(Cell::get) {
            // Polled again: released, or woken by something else its task waits on (its
            // deadline's timer). Either way it goes now; a later release wakes it for nothing.
            return Poll::Ready(());
        }
        let full = WAITING.with(|waiting| {
            let mut waiting = waiting.borrow_mut();
            if waiting.len() >= MOST_WAITING {
                return true;
            }
            waiting.push(cx.waker().clone());
            false
        });
        if full {
            // This one goes now, and those waiting go next.
            release();
            return Poll::Ready(());
        }
        self.waited = true;
        Poll::Pending
    }
}

/// Wakes every task of this thread waiting for the end of its turn. The worker's runtime calls
/// it before parking; the woken tasks keep it from parking until they have run.
pub fn release() {
    let mut releasing = RELEASING.with(|r| std::mem::take(&mut *r.borrow_mut()));
    WAITING.with(|waiting| std::mem::swap(&mut *waiting.borrow_mut(), &mut releasing));
    // Woken outside the borrow: a wake-up only schedules its task, but nothing here relies on
    // that.
    for waker in releasing.drain(..) {
        waker.wake();
    }
    RELEASING.with(|r| *r.borrow_mut() = releasing);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A worker's runtime, or one that lets this thread's tasks wait but never releases them.
    fn runtime(with_release: bool) -> tokio::runtime::Runtime {
        if with_release {
            return worker_runtime().expect("runtime");
        }
        ON.with(|on| on.set(true));
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_waiting_task_goes_on_after_the_other_ready_ones_have_run() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let note = |log: &Arc<Mutex<Vec<&'static str>>>, what| log.lock().unwrap().push(what);
        runtime(true).block_on(async {
            let waiting = {
                let log = log.clone();
                tokio::spawn(async move {
                    note(&log, "built");
                    end_of_turn().await;
                    note(&log, "sent");
                })
            };
            let other = {
                let log = log.clone();
                tokio::spawn(async move { note(&log, "other") })
            };
            waiting.await.unwrap();
            other.await.unwrap();
        });
        assert_eq!(*log.lock().unwrap(), ["built", "other", "sent"]);
    }

    #[test]
    fn too_many_waiting_go_without_the_park_hook() {
        // No release hook: only the bound can end the waits.
        let done = runtime(false).block_on(async {
            let tasks: Vec<_> = (0..=MOST_WAITING)
                .map(|_| tokio::spawn(end_of_turn()))
                .collect();
            tokio::time::timeout(std::time::Duration::from_secs(10), async {
                for t in tasks {
                    t.await.unwrap();
                }
            })
            .await
        });
        assert!(done.is_ok(), "the waits did not end");
        assert!(WAITING.with(|w| w.borrow().is_empty()));
    }

    #[test]
    fn off_a_worker_thread_nothing_waits() {
        // Not a worker's runtime: a lone request must not wait for 31 more.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let done = runtime.block_on(async {
            let task = tokio::spawn(end_of_turn());
            tokio::time::timeout(std::time::Duration::from_secs(10), task).await
        });
        assert!(done.is_ok(), "a request off a worker thread waited");
    }
}
