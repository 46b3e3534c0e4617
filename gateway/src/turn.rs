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
//!
//! On Linux the turn's sends leave in one system call, through an io_uring of the worker's
//! own ([`send_at_end_of_turn`], `turn/sends.rs`): sent one by one, the first still woke the
//! upstream, which then took the worker's core on the way back from that `send` and served
//! that one request alone.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[cfg(target_os = "linux")]
mod sends;

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
///
/// With `ring`, the worker also sends its turn's upstream requests in one system call
/// ([`send_at_end_of_turn`]) if the kernel gives it an io_uring; the return says whether it
/// does.
pub fn worker_runtime(ring: bool) -> std::io::Result<(tokio::runtime::Runtime, bool)> {
    ON.with(|on| on.set(true));
    #[cfg(target_os = "linux")]
    let ring = ring && sends::init();
    #[cfg(not(target_os = "linux"))]
    let ring = ring && false;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(release)
        .build()
        .map(|rt| (rt, ring))
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
        if !wait_for_release(cx) {
            // This one goes now, and those waiting go next.
            release();
            return Poll::Ready(());
        }
        self.waited = true;
        Poll::Pending
    }
}

/// Puts the polling task among those the end of the turn wakes; false (and nothing done) when
/// [`MOST_WAITING`] already wait.
fn wait_for_release(cx: &Context<'_>) -> bool {
    WAITING.with(|waiting| {
        let mut waiting = waiting.borrow_mut();
        if waiting.len() >= MOST_WAITING {
            return false;
        }
        waiting.push(cx.waker().clone());
        true
    })
}

/// Sends `data` on `tcp` with the other upstream requests of the worker's turn, in one system
/// call where the worker has an io_uring (`sends.rs`); else (no ring, not TCP, not Linux) waits
/// for the end of the turn as [`end_of_turn`] does and sends nothing. Returns the bytes sent:
/// the caller writes the rest (all of it when 0) itself. An error is the socket's (a
/// connection the upstream reset).
pub async fn send_at_end_of_turn(
    tcp: Option<&tokio::net::TcpStream>,
    data: &[u8],
) -> std::io::Result<usize> {
    #[cfg(target_os = "linux")]
    if let Some(tcp) = tcp
        && ON.with(Cell::get)
        && WAITING.with(|w| w.borrow().len() < MOST_WAITING)
        && let Some(slot) = sends::queue(std::os::fd::AsRawFd::as_raw_fd(tcp), data)
    {
        // The borrow of `tcp` lasts as long as the wait, so the socket stays open while the
        // send is queued; a wait dropped early cancels it.
        return SendWait { slot }.await;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (tcp, data);
    end_of_turn().await;
    Ok(0)
}

/// A task's wait for its queued send.
#[cfg(target_os = "linux")]
struct SendWait {
    slot: std::sync::Arc<sends::Slot>,
}

#[cfg(target_os = "linux")]
impl Future for SendWait {
    type Output = std::io::Result<usize>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.slot.get() {
            sends::State::Sent(n) => Poll::Ready(Ok(n)),
            sends::State::Failed(errno) => {
                Poll::Ready(Err(std::io::Error::from_raw_os_error(errno)))
            }
            sends::State::Cancelled => Poll::Ready(Ok(0)),
            sends::State::Waiting => {
                // Polled again before the release (its waker already waits), or waiting now.
                let waiting = WAITING.with(|w| w.borrow().iter().any(|k| k.will_wake(cx.waker())));
                if waiting || wait_for_release(cx) {
                    return Poll::Pending;
                }
                // As many wait as may: this one goes now, with those queued before it.
                release();
                self.poll(cx)
            }
        }
    }
}

#[cfg(target_os = "linux")]
impl Drop for SendWait {
    fn drop(&mut self) {
        if self.slot.get() == sends::State::Waiting {
            self.slot.set(sends::State::Cancelled);
        }
    }
}

/// Wakes every task of this thread waiting for the end of its turn. The worker's runtime calls
/// it before parking; the woken tasks keep it from parking until they have run.
pub fn release() {
    #[cfg(target_os = "linux")]
    sends::flush();
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
            return worker_runtime(false).expect("runtime").0;
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

    /// A connected pair of loopback sockets: (ours, the peer's).
    #[cfg(target_os = "linux")]
    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (ours, listener.accept().await.unwrap().0)
    }

    /// Reads exactly `n` bytes from `peer`, within 10 s.
    #[cfg(target_os = "linux")]
    async fn read_n(peer: &mut tokio::net::TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0; n];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            peer.read_exact(&mut got),
        )
        .await
        .expect("the bytes arrive")
        .unwrap();
        got
    }

    /// A worker's runtime with its ring, and whether the kernel gave it one. Without (a kernel
    /// or sandbox refusing io_uring), the tests check the fallback instead: nothing is sent by
    /// the turn, the caller writes it all. The reference machine gives one.
    #[cfg(target_os = "linux")]
    fn ring_runtime() -> (tokio::runtime::Runtime, bool) {
        let (rt, ring) = worker_runtime(true).expect("runtime");
        if !ring {
            eprintln!("no io_uring here: checking the fallback (one send per request) instead");
        }
        (rt, ring)
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_turns_sends_arrive_whole_and_after_the_other_ready_tasks() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (rt, ring) = ring_runtime();
        rt.block_on(async {
            let mut pairs = Vec::new();
            for _ in 0..8 {
                pairs.push(pair().await);
            }
            // Spawned with no wait between them, so that all are ready in one turn.
            let mut tasks = Vec::new();
            let mut peers = Vec::new();
            for (i, (ours, peer)) in (0..8u8).zip(pairs) {
                peers.push(peer);
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    let data = vec![b'a' + i; 100 + usize::from(i)];
                    let sent = send_at_end_of_turn(Some(&ours), &data).await.unwrap();
                    log.lock().unwrap().push(format!("sent {i}"));
                    (ours, sent, data.len())
                }));
            }
            let other = {
                let log = log.clone();
                tokio::spawn(async move { log.lock().unwrap().push("other".to_string()) })
            };
            other.await.unwrap();
            let mut kept = Vec::new();
            for (i, (task, mut peer)) in tasks.into_iter().zip(peers).enumerate() {
                let (mut ours, sent, len) = task.await.unwrap();
                let want = vec![b'a' + i as u8; len];
                if ring {
                    assert_eq!(sent, len, "a small request goes whole through the ring");
                } else {
                    assert_eq!(sent, 0, "without a ring the caller sends");
                    tokio::io::AsyncWriteExt::write_all(&mut ours, &want)
                        .await
                        .unwrap();
                }
                assert_eq!(read_n(&mut peer, len).await, want, "task {i}'s own bytes");
                kept.push((ours, peer));
            }
        });
        let log = log.lock().unwrap();
        assert_eq!(log[0], "other", "{log:?}");
        assert_eq!(log.len(), 9, "{log:?}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_send_too_large_for_the_socket_returns_what_went_and_never_blocks() {
        use tokio::io::AsyncWriteExt;
        let (rt, ring) = ring_runtime();
        rt.block_on(async {
            let (mut ours, mut peer) = pair().await;
            // Far more than a loopback socket's buffers take before the peer reads.
            let data: Vec<u8> = (0..32 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
            let sent = send_at_end_of_turn(Some(&ours), &data).await.unwrap();
            assert!(sent < data.len(), "{sent} of {} sent at once", data.len());
            assert!(ring || sent == 0, "without a ring the caller sends");
            let len = data.len();
            let reader = tokio::spawn(async move { read_n(&mut peer, len).await });
            ours.write_all(&data[sent..]).await.unwrap();
            assert!(
                reader.await.unwrap() == data,
                "the bytes arrive whole and in order"
            );
        });
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_send_whose_wait_was_dropped_is_not_made() {
        use tokio::io::AsyncWriteExt;
        ring_runtime().0.block_on(async {
            let (mut ours, mut peer) = pair().await;
            // Queued, then dropped before the turn ends.
            tokio::select! {
                biased;
                _ = send_at_end_of_turn(Some(&ours), b"dropped") => panic!("sent within the turn"),
                _ = std::future::ready(()) => {}
            }
            // Let the turn end: the worker parks, which releases (and would send) what waits.
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            ours.write_all(b"kept").await.unwrap();
            assert_eq!(read_n(&mut peer, 4).await, b"kept");
        });
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_send_on_a_closed_connection_fails() {
        let (rt, ring) = ring_runtime();
        if !ring {
            return; // the error comes from the ring's send; without one the caller's write sees it
        }
        rt.block_on(async {
            let (ours, peer) = pair().await;
            let linger = socket2::SockRef::from(&peer);
            linger.set_linger(Some(std::time::Duration::ZERO)).unwrap();
            drop(peer); // a reset: the next sends fail
            let data = vec![b'x'; 1000];
            let mut failed = false;
            for _ in 0..100 {
                match send_at_end_of_turn(Some(&ours), &data).await {
                    Err(_) => {
                        failed = true;
                        break;
                    }
                    Ok(_) => tokio::task::yield_now().await,
                }
            }
            assert!(failed, "a send on a reset connection should fail");
        });
    }
}
