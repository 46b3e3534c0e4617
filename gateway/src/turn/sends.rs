//! A turn's upstream requests sent in one system call, through an io_uring of the worker's own.
//!
//! Why: each `send` to an idle upstream wakes it, and on return from that system call the woken
//! upstream usually takes the worker's core at once (the kernel preempts on the way back to user
//! space), serves the one request it found and sleeps again; then the worker sends the next.
//! Gathering a turn's sends ([`super::end_of_turn`]) did not change that: they still left one
//! system call at a time. Made as one `io_uring_enter`, every send of the turn is in the
//! upstream's socket buffers before the worker leaves the kernel, so the upstream wakes once
//! and finds them all. Measured on the two-core reference machine (BENCHMARKS.md, thirty-sixth
//! round, `wrk -t1 -c64`): the upstream's wake-ups fell from 0.27–0.29 to 0.05–0.06 a request,
//! the workers' context switches from 0.35–0.37 to 0.09–0.12 (nginx's: 0.28–0.35), and
//! requests/s rose by 8–10 % in three rounds of four, to 1.01–1.10 of nginx's.
//!
//! How: a task queues its request's bytes (copied into the ring's arena: the queue owns what the
//! kernel reads) with the socket's descriptor, and waits for the end of the turn as
//! [`super::end_of_turn`] does. Before the worker parks, [`flush`] submits one `IORING_OP_SEND`
//! per queued request and waits for all of them in the same call. Each send carries
//! `MSG_DONTWAIT`, so it completes within that call: a socket whose buffer is full answers
//! `EAGAIN` at once instead of waiting, and the task then writes what is left itself, through
//! the runtime, as before. A task that stops waiting (its request dropped) marks its entry
//! cancelled before its socket can close, and a cancelled entry is not sent: nothing runs
//! between that mark and [`flush`] but this thread's own code.
//!
//! Where the kernel has no io_uring for the process (a kernel without it, `kernel.io_uring_disabled`,
//! a container's seccomp filter), or `gateway.io_uring: off`, the ring is not made and each task
//! sends its own request after the turn, as before.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use io_uring::{IoUring, opcode, types};

/// Entries of a ring: more than the sends a turn can queue ([`super::MOST_WAITING`]).
const ENTRIES: u32 = 64;

/// What became of a queued send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not sent yet.
    Waiting,
    /// Its task stopped waiting: not to be sent.
    Cancelled,
    /// Sent this many bytes (0: none, the socket's buffer was full).
    Sent(usize),
    /// The send failed with this `errno`.
    Failed(i32),
}

/// A queued send's state, shared by the queue and the waiting task. An atomic rather than a
/// `Cell` only because tasks must be `Send`; both sides stay on the worker's thread.
#[derive(Debug)]
pub struct Slot(AtomicI64);

const WAITING: i64 = i64::MIN;
const CANCELLED: i64 = i64::MIN + 1;

impl Slot {
    fn new() -> Slot {
        Slot(AtomicI64::new(WAITING))
    }

    pub fn get(&self) -> State {
        match self.0.load(Ordering::Relaxed) {
            WAITING => State::Waiting,
            CANCELLED => State::Cancelled,
            n if n >= 0 => State::Sent(n as usize),
            e => State::Failed(i32::try_from(-e).unwrap_or(libc::EIO)),
        }
    }

    pub fn set(&self, state: State) {
        let v = match state {
            State::Waiting => WAITING,
            State::Cancelled => CANCELLED,
            State::Sent(n) => n as i64,
            State::Failed(errno) => -i64::from(errno.max(1)),
        };
        self.0.store(v, Ordering::Relaxed);
    }
}

/// A queued send: its socket, where its bytes lie in the arena, and its state.
struct Queued {
    fd: RawFd,
    start: usize,
    len: usize,
    slot: Arc<Slot>,
}

/// A worker's ring and what waits to be sent through it.
struct Ring {
    ring: IoUring,
    /// The queued requests' bytes, one after another; emptied by each [`flush`].
    arena: Vec<u8>,
    queued: Vec<Queued>,
    /// Slots of sends made, reused once their task has let go of them (a warm worker allocates
    /// nothing per request: `tests/alloc.rs`).
    spare: Vec<Arc<Slot>>,
}

thread_local! {
    static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
}

/// Makes this thread's ring; false (and the reason logged once per thread) when the kernel
/// refuses one.
pub fn init() -> bool {
    match IoUring::new(ENTRIES) {
        Ok(ring) => {
            RING.with(|r| {
                *r.borrow_mut() = Some(Ring {
                    ring,
                    arena: Vec::with_capacity(16 * 1024),
                    queued: Vec::with_capacity(ENTRIES as usize),
                    spare: Vec::with_capacity(ENTRIES as usize),
                })
            });
            true
        }
        Err(e) => {
            tracing::info!(
                error = %e,
                "no io_uring for this worker: its upstream requests are sent one system call each"
            );
            false
        }
    }
}

/// Queues a copy of `data` to be sent on `fd` at the next [`flush`]; `None` when this thread has
/// no ring or its queue is full.
pub fn queue(fd: RawFd, data: &[u8]) -> Option<Arc<Slot>> {
    RING.with(|r| {
        let mut r = r.borrow_mut();
        let ring = r.as_mut()?;
        if ring.queued.len() >= ENTRIES as usize || u32::try_from(data.len()).is_err() {
            return None;
        }
        let slot = match ring.spare.iter().position(|s| Arc::strong_count(s) == 1) {
            Some(i) => {
                let slot = ring.spare.swap_remove(i);
                slot.set(State::Waiting);
                slot
            }
            None => Arc::new(Slot::new()),
        };
        let start = ring.arena.len();
        ring.arena.extend_from_slice(data);
        ring.queued.push(Queued {
            fd,
            start,
            len: data.len(),
            slot: slot.clone(),
        });
        Some(slot)
    })
}

/// Sends every queued request that was not cancelled, in one system call, and sets each one's
/// state. Each send completes within the call (`MSG_DONTWAIT`).
pub fn flush() {
    RING.with(|r| {
        let mut r = r.borrow_mut();
        let Some(ring) = r.as_mut() else { return };
        if ring.queued.is_empty() {
            return;
        }
        match ring.send_all() {
            Ok(()) => {
                for q in ring.queued.drain(..) {
                    if ring.spare.len() < ENTRIES as usize {
                        ring.spare.push(q.slot);
                    }
                }
                ring.arena.clear();
            }
            Err(e) => {
                // Not seen in practice: the ring is given up on this thread, the sends it may
                // still hold in flight keep their bytes (the ring and its arena are leaked), and
                // the requests not known to be sent fail as a broken connection would.
                tracing::error!(
                    error = %e,
                    "io_uring failed: upstream requests are sent one by one from now on"
                );
                for q in &ring.queued {
                    if q.slot.get() == State::Waiting {
                        q.slot.set(State::Failed(libc::EIO));
                    }
                }
                std::mem::forget(r.take());
            }
        }
    })
}

impl Ring {
    fn send_all(&mut self) -> io::Result<()> {
        let mut submitted = 0;
        {
            let mut sq = self.ring.submission();
            for (i, q) in self.queued.iter().enumerate() {
                if q.slot.get() != State::Waiting {
                    continue;
                }
                let entry = opcode::Send::new(
                    types::Fd(q.fd),
                    self.arena[q.start..q.start + q.len].as_ptr(),
                    q.len as u32,
                )
                .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                .build()
                .user_data(i as u64);
                // SAFETY: the entry points into `self.arena`, which is neither changed nor freed
                // until every submitted entry has completed (the loop below waits for all of
                // them; on an error the ring and the arena are leaked, never freed), and at
                // `q.len` bytes it stays within it. The descriptor is the socket of a task still
                // waiting for this send (a cancelled entry is skipped above), so it is open.
                #[allow(unsafe_code)]
                let pushed = unsafe { sq.push(&entry) };
                if pushed.is_err() {
                    // More than ENTRIES queued, which `queue` prevents: the task sends it itself.
                    q.slot.set(State::Sent(0));
                    continue;
                }
                submitted += 1;
            }
        }
        let mut done = 0;
        while done < submitted {
            match self.ring.submit_and_wait(submitted - done) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                let Some(q) = usize::try_from(cqe.user_data())
                    .ok()
                    .and_then(|i| self.queued.get(i))
                else {
                    continue;
                };
                let res = cqe.result();
                q.slot.set(match res {
                    n if n >= 0 => State::Sent(n as usize),
                    e if -e == libc::EAGAIN => State::Sent(0),
                    e => State::Failed(-e),
                });
                done += 1;
            }
        }
        Ok(())
    }
}
