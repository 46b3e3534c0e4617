//! A worker's keep-alive connections, woken when the gateway shuts down.
//!
//! Between two requests a connection waits for the next head or for shutdown, whichever comes
//! first: an idle connection is closed at once when the gateway stops. That wait used to be the
//! cancellation token's own future, made anew for every request: it put a waiter into the
//! token's list and took it out again after each head, under the list's lock (about 400
//! instructions a request, `callgrind`, BENCHMARKS.md, twenty-fourth round). Here a connection
//! takes a place in its worker's list once, at its first wait, and keeps it until it closes;
//! each later wait reads one flag and compares its waker with the one in place.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// One worker's shutdown, as its connections between requests wait for it.
#[derive(Debug, Default)]
pub struct Closing {
    closed: AtomicBool,
    /// The wakers of the connections waiting; a slot is `None` once its connection has gone.
    waiting: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Closing {
    pub fn new() -> Arc<Closing> {
        Arc::default()
    }

    /// Marks the worker as closing and wakes every connection waiting for it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for waker in self.slots().wakers.iter().flatten() {
            waker.wake_by_ref();
        }
    }

    /// A connection's place in the list, taken at its first wait.
    pub fn waiter(self: &Arc<Closing>) -> Waiter {
        Waiter {
            closing: self.clone(),
            place: None,
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        // A panic while the lock was held left nothing half-done: a slot is one store.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's wait for its worker's shutdown.
#[derive(Debug)]
pub struct Waiter {
    closing: Arc<Closing>,
    /// Its slot, and the waker in it.
    place: Option<(usize, Waker)>,
}

impl Waiter {
    /// Completes once the worker is closing.
    pub async fn closed(&mut self) {
        poll_fn(|cx| self.poll_closed(cx)).await
    }

    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.closing.is_closed() {
            return Poll::Ready(());
        }
        match &mut self.place {
            Some((_, waker)) if waker.will_wake(cx.waker()) => return Poll::Pending,
            Some((slot, waker)) => {
                waker.clone_from(cx.waker());
                self.closing.slots().wakers[*slot] = Some(waker.clone());
            }
            None => {
                let waker = cx.waker().clone();
                let mut slots = self.closing.slots();
                let slot = match slots.free.pop() {
                    Some(slot) => {
                        slots.wakers[slot] = Some(waker.clone());
                        slot
                    }
                    None => {
                        slots.wakers.push(Some(waker.clone()));
                        slots.wakers.len() - 1
                    }
                };
                self.place = Some((slot, waker));
            }
        }
        // `close` may have run while the waker went in, after it read the list: the flag it
        // set first is seen here then.
        if self.closing.is_closed() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some((slot, _)) = self.place.take() {
            let mut slots = self.closing.slots();
            slots.wakers[slot] = None;
            slots.free.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// On this test's one thread a task runs only while the test awaits, so once the test
    /// sees every task at its last wait, each has polled that wait and gone to sleep: only
    /// `close` can wake it.
    #[tokio::test(flavor = "current_thread")]
    async fn waiters_wake_on_close_and_give_their_places_back() {
        use std::sync::atomic::AtomicUsize;
        let closing = Closing::new();
        let waiting = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let mut waiter = closing.waiter();
            let waiting = waiting.clone();
            tasks.push(tokio::spawn(async move {
                // Waits more than once, as a keep-alive connection does between requests.
                for _ in 0..3 {
                    let _ = tokio::time::timeout(Duration::from_millis(1), waiter.closed()).await;
                }
                waiting.fetch_add(1, Ordering::SeqCst);
                waiter.closed().await;
            }));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while waiting.load(Ordering::SeqCst) < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the waiters never got to wait"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            closing.slots().wakers.len(),
            3,
            "one place each, kept between waits"
        );
        assert!(tasks.iter().all(|t| !t.is_finished()));
        closing.close();
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("a waiter was not woken")
                .unwrap();
        }
        let slots = closing.slots();
        assert!(slots.wakers.iter().all(Option::is_none));
        assert_eq!(slots.free.len(), 3);
    }

    #[tokio::test]
    async fn a_wait_that_begins_after_close_ends_at_once() {
        let closing = Closing::new();
        closing.close();
        let mut waiter = closing.waiter();
        tokio::time::timeout(Duration::from_secs(10), waiter.closed())
            .await
            .expect("closed already");
    }
}
