//! A connection's one timer, moved from wait to wait without touching the runtime's timer wheel.
//!
//! A keep-alive connection waits on a timeout at least twice per request: for the next request
//! (idle, then head) and for the upstream's answer. With a `tokio::time::timeout` per wait,
//! each wait that does not complete at once inserts an entry into the runtime's timer wheel and
//! removes it again when the wait ends: two insertions, two removals and a clock read per
//! request. An experiment build without any timeouts spent about 1.5 µs less per proxied
//! request (of the workers' 13 µs) on the benchmark's machine; this timer saves 0.4–0.5 µs
//! of that (BENCHMARKS.md, "A faster machine, a bare proxy for a floor, and one timer per
//! connection").
//!
//! A [`Deadline`] keeps one entry in the wheel for the connection's life. Setting a later
//! deadline than the entry's leaves the entry where it is: when it fires, the deadline is
//! checked, and the entry moves to it. Only a deadline earlier than the entry's moves the entry
//! at once. Since every wait's deadline is its start plus a timeout, and the entry sits at the
//! earliest deadline set since it last fired, the entry moves about once per firing: once per
//! shortest timeout in use (5 s with the default upstream timeout) on a busy connection, not
//! twice per request. A wait still ends at its own deadline, not later: the entry fires at or
//! before it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

/// One timer for a connection's successive waits (see the module's docs).
pub struct Deadline {
    /// The entry in the runtime's timer wheel.
    sleep: Pin<Box<Sleep>>,
    /// When the entry fires: at or before `at`.
    armed: Instant,
    /// When the wait in progress times out.
    at: Instant,
    /// The waker the entry holds, from the last poll of it that was pending; `None` once it
    /// fired or moved. While the connection's task polls with that waker and the entry has not
    /// fired, the entry need not be polled again: it will wake that waker. (Polling it on
    /// every wait was about 250 instructions a request: the task budget, the entry's state.)
    registered: Option<Waker>,
}

impl Deadline {
    /// A timer whose first wait times out at `at`.
    pub fn new(at: Instant) -> Deadline {
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            armed: at,
            at,
            registered: None,
        }
    }

    /// The wait that follows times out at `at`. The timer's entry moves only when `at` is
    /// earlier than it.
    pub fn set(&mut self, at: Instant) {
        self.at = at;
        if at < self.armed {
            self.armed = at;
            self.sleep.as_mut().reset(at);
            self.registered = None;
        }
    }

    /// Ready once the deadline set last has passed.
    fn poll_passed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
            && !self.sleep.is_elapsed()
        {
            return Poll::Pending;
        }
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                self.registered = Some(cx.waker().clone());
                return Poll::Pending;
            }
            self.registered = None;
            if self.at <= self.armed {
                return Poll::Ready(());
            }
            // The deadline moved on since the entry was placed: follow it.
            self.armed = self.at;
            self.sleep.as_mut().reset(self.at);
        }
    }

    /// Runs `f` until it completes (`Some` of its output) or `at` passes (`None`), whichever
    /// comes first; `f` is polled first, so one that is ready at once never times out.
    pub async fn run<F: Future>(&mut self, at: Instant, f: F) -> Option<F::Output> {
        self.set(at);
        let mut f = std::pin::pin!(f);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = f.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            self.poll_passed(cx).map(|()| None)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn a_wait_ends_at_its_deadline_or_with_its_output() {
        let start = Instant::now();
        let mut d = Deadline::new(start + ms(10_000));
        assert_eq!(d.run(start + ms(10_000), async { 7 }).await, Some(7));
        let out = d.run(start + ms(50), std::future::pending::<()>()).await;
        assert_eq!(out, None);
        let waited = start.elapsed();
        assert!(waited >= ms(50), "timed out early, after {waited:?}");
        assert!(waited < ms(5_000), "timed out late, after {waited:?}");
    }

    #[tokio::test]
    async fn a_deadline_moved_later_does_not_end_the_wait_at_the_earlier_one() {
        let start = Instant::now();
        let mut d = Deadline::new(start + ms(40));
        // The entry sits at 40 ms; the wait's deadline is 300 ms.
        let waited = d.run(start + ms(300), async {
            tokio::time::sleep(ms(150)).await;
            "done"
        });
        assert_eq!(
            waited.await,
            Some("done"),
            "the entry's firing at 40 ms ended the wait"
        );
        assert!(start.elapsed() >= ms(150));
        // The entry followed the deadline on: a wait for longer than its deadline times out
        // at that deadline, after the entry fired at least once on the way.
        let out = d.run(start + ms(400), std::future::pending::<()>()).await;
        assert_eq!(out, None);
        assert!(start.elapsed() >= ms(400));
    }

    /// Waits after the first do not poll the entry again (it holds the task's waker): the
    /// entry's firing must still end the wait that is on when it fires.
    #[tokio::test]
    async fn a_wait_that_never_polled_the_entry_still_ends_when_it_fires() {
        let start = Instant::now();
        let mut d = Deadline::new(start + ms(200));
        for _ in 0..3 {
            // Pending first, so the entry is polled (the first time) or skipped (after).
            let out = d.run(start + ms(200), tokio::time::sleep(ms(5))).await;
            assert_eq!(out, Some(()));
        }
        assert!(d.registered.is_some(), "the entry holds the task's waker");
        let timed_out = tokio::time::timeout(
            ms(5_000),
            d.run(start + ms(200), std::future::pending::<()>()),
        )
        .await;
        assert_eq!(
            timed_out,
            Ok(None),
            "the wait did not end at the entry's firing"
        );
        assert!(start.elapsed() >= ms(200));
        assert!(d.registered.is_none(), "a fired entry holds no waker");
    }

    #[tokio::test]
    async fn a_deadline_moved_earlier_ends_the_wait_then() {
        let start = Instant::now();
        let mut d = Deadline::new(start + ms(60_000));
        let out = d.run(start + ms(50), std::future::pending::<()>()).await;
        assert_eq!(out, None);
        let waited = start.elapsed();
        assert!(
            waited >= ms(50) && waited < ms(30_000),
            "the entry did not move earlier: {waited:?}"
        );
    }
}
