//! Scheduling classes of a process that carries the gateway's request path (`tollgate up`,
//! `tollgate gateway`).
//!
//! Beside the gateway's worker threads, such a process runs work that is throughput, not
//! latency: the event publisher, the embedded log's writes and syncs, the collector, the
//! store's flushes and merges, the quota feed, the query API. Those threads run as
//! `SCHED_BATCH`; the gateway's workers stay `SCHED_OTHER`. A batch thread gets the same share
//! of the cores at the same nice level, so nothing starves; what changes is that its wake-ups do
//! not preempt the thread on the core (the kernel treats it as CPU-bound and lets the tick
//! decide). Before, each hand-over from a worker to the publisher, each sync completing and each
//! step of a flush could preempt whatever ran on the core, a gateway worker included.
//!
//! Measured on the two-core reference machine against the build before (BENCHMARKS.md):
//! - `scripts/bench-cpu-per-request.sh` at a fixed 20,000 requests/s, six alternating rounds:
//!   the other threads' CPU per request fell from 4.14 to 3.81 µs (median); the gateway's
//!   workers' did not move (22.37 and 22.41 µs).
//! - `scripts/bench-gateway.sh` (wrk, 64 connections, 1 KiB answers), where the load generator
//!   and the upstream share the two cores, three runs: the median ratio to nginx moved from
//!   0.80 to 0.80, 0.81 to 0.85 and 0.91 to 0.87; the single counted run was higher in all
//!   three (0.85 to 0.90, 0.83 to 0.87, 0.91 to 0.96). Within the script's spread.
//! - `scripts/bench-open-loop.sh` at 20,000 requests/s, four 20 s rounds on fresh processes:
//!   p99 4.46 ms against 6.26 ms (medians).
//!
//! The query API of `tollgate up` is among the batch threads: a dashboard's query may wait for
//! the next tick (a few milliseconds) on a saturated machine before it runs, instead of
//! preempting the request path. The collector and the query API as processes of their own keep
//! the default class: they have no request path beside them to yield to.
//!
//! ## Ingest on idle cores, within a bound ([`CatchUp`])
//!
//! In `tollgate up` the collector and the store's upkeep (decoding, Arrow batches, rollups,
//! Parquet files, merges) run on threads of their own, `tollgate-ingest`, in `SCHED_IDLE`: they
//! get a core only when no other thread wants it, and a request path that wakes takes the core
//! back at once. Events wait in the durable log meanwhile, and the gateway's quota counts what
//! it admitted until the store has counted it (`tollgate_gateway::quota`), so nothing is lost
//! or enforced late; only the store's freshness waits. The bound is
//! `collector.yield_until_lag_ms` (default 5 s): once the collector has not reached the end of
//! the bus for that long (`tollgate_collector_caught_up_timestamp_seconds`), its threads go to
//! `SCHED_BATCH`, their fair share, until it has caught up; then back to idle cores. So under a
//! load that leaves no core idle for long the store trails by about the bound at most, and a
//! load that leaves some idle time is stored in it without taking any from requests.
//!
//! An idle-class thread still holds up the other core's threads: a core that runs it is not
//! idle, so it does not take work queued on the other core until the periodic balancing
//! does. So while the ingest threads are in the idle class, the store's and the collector's
//! long loops offer their core by leaving it idle for a moment instead of `sched_yield`
//! (`tollgate_store::cpu`, with the measurements).
//!
//! The event publisher and the log's writes stay batch work: they must keep up with the
//! gateway, whose queue drops what does not fit. With a Kafka bus, ingest stays batch work
//! too: the Kafka client's own threads, which the consumer starts, would keep the class they
//! started in and could not be moved with the others.
//!
//! The Kafka client's threads (`rdk:main`, one `rdk:broker…` per broker) are started by the
//! client as it needs them, from the thread that made the client or from its own threads, and
//! each inherits its creator's class. So the thread that drives the process's top-level
//! future (the one calling `block_on`, which opens the bus) is batch work too: before, it kept
//! the normal class, the producer's broker thread of `tollgate gateway` inherited it, and its
//! wake-ups (a few hundred a second under load, each batch of messages to send) could preempt
//! a gateway worker. The gateway's workers are started from it and take the normal class back
//! first thing ([`request_path`]).
//!
//! ## The Kafka producer of `tollgate gateway` on idle cores, within a bound
//!
//! In `tollgate gateway` the producer's threads go further: `rdk:main` and the `rdk:broker…`
//! threads (which batch, compress and send the events) run in `SCHED_IDLE` while the bus takes
//! the events as fast as they come, found by name in `/proc/self/task` and moved there by
//! [`kafka_client_on_idle_cores`], which looks again four times a second (once a second while
//! nothing waits), since the client starts a broker's thread when it first connects to it.
//! Events wait in the client meanwhile, as they wait for `bus.linger_ms` anyway. The bound is
//! the spool's: once more than a quarter of `gateway.spool.high_water_events` (25,000 records
//! by default) wait for delivery, the threads go back to `SCHED_BATCH` until fewer than a
//! twentieth do, so a saturated gateway's producer keeps up at its fair share well before the
//! spool would start writing events to disk (at the whole high-water mark). The trade: what
//! the client holds in memory, which a killed gateway loses as before (the durability rules
//! cover the collector's side), is now up to that bound, where it was about the last few
//! milliseconds' events; and it takes memory (13 MiB more at the peak, measured). Where the
//! process may not leave `SCHED_IDLE`, the threads stay batch work.
//!
//! Measured (BENCHMARKS.md, fortieth round): with the producer batch work, the saturated
//! closed loop left the cores idle 5–9 % of the time where `tollgate up` (whose ingest is
//! idle-class work) left under 3 %, most likely because the producer's wake-ups and sends
//! held a core the request path then waited for; with the producer on idle cores the gateway
//! served 1.076 times as many requests a second in the same rounds. `tollgate up` with a Kafka
//! bus runs a consumer's threads of the same name beside the producer's, so it keeps them all as
//! batch work.
//!
//! What an idle-class thread holds it can hold for long on a saturated machine. Ingest takes
//! the store's state lock, which queries read under, for short steps: an append's push, and a
//! flush's swap of the manifest (one small file written and synced). A query that arrives
//! during one waits for the next slice the scheduler gives the ingest thread, milliseconds to
//! a few hundred on a saturated machine; the files themselves are written without the lock.
//!
//! The same holds for a lock that is not ours: glibc's malloc arenas, which the process limits
//! to two per core (`src/alloc.rs`), so ingest threads share them with the gateway's workers
//! and the publisher. A thread that needs an arena an ingest thread holds waits until that
//! thread runs again: at once if a core goes idle, after the idle class's next turn if none
//! does. Stopping the ingest threads with ptrace (5 s of every 6, under saturation) made a
//! gateway worker and two runtime threads wait on one arena's lock (their futex lay in the
//! arena's header), and the gateway dropped 247,650 events (`queue_full`) while the publisher
//! waited. Without such stops, 15 s of the workers' and runtime threads' switches under
//! saturation show no wait on any futex of the allocator (BENCHMARKS.md, twelfth round). The
//! dependency is still there. Tried and taken out again (BENCHMARKS.md, thirteenth round):
//! mimalloc for every thread but the main thread and the
//! ingest threads removed the drops under the same stops, but held the query API's and the
//! runtime's memory in its heaps (peak RSS 270 MiB against 144 MiB for ten million events,
//! over the store's 256 MiB goal). mimalloc for the workers and the publisher alone did not
//! remove them: while events were dropped, the publisher waited on a futex in memory the main
//! thread had allocated at start-up (a lock it shares with the runtime's threads) and a
//! runtime thread waited on an arena's lock.
//!
//! Leaving `SCHED_IDLE` needs a nice value of 0 to be allowed: root, `CAP_SYS_NICE`, or an
//! `RLIMIT_NICE` of at least 20 (systemd: `LimitNICE=+0`). A process without it runs ingest as
//! batch work from the start and says so in its log; it never puts a thread in a class it could
//! not take it out of.
//!
//! Measured on the reference machine (`tollgate up`, wrk with 64 connections, 1 KiB answers,
//! BENCHMARKS.md "Ingest on idle cores"): see there for the figures against nginx and the store's
//! lag under a load that saturates both cores.
//!
//! ## Classes are relative to the process's scheduling group
//!
//! Linux schedules groups before threads: the processes of one session (autogroups, on by
//! default) or of one cgroup with the `cpu` controller (a systemd service) compete as one
//! entity against other groups, and the classes above order the threads only inside it. So
//! `SCHED_IDLE` puts ingest below the gateway's workers and anything else in the same group,
//! while ingest's CPU time still counts against the group's share where it competes with other
//! groups (other services, an upstream on the same host). Nothing here changes groups: that is
//! the service manager's business. Where the group boundary lies also decides who preempts
//! whom on wake-up. Traced at 35,000 requests/s on the reference machine (BENCHMARKS.md,
//! "Scheduling groups"): started from the load generator's shell, a client woken by a worker's
//! answer waited for that worker (median 123 µs), where nginx's workers, in a session of their
//! own, were preempted at once (5 µs); in a session of its own (`setsid`) the gateway's workers
//! were preempted at once too (5 µs), and the time a request spends in the gateway doubled at
//! its p99 (0.03 to 0.07–0.09 ms), the client now taking the core mid-request.
//!
//! ## Workers bound to their cores while the cores are busy
//!
//! With one gateway worker per core, each may be bound to its own core ([`request_path`], as
//! `gateway.pin_workers` says); every other thread keeps the process's cores, so the
//! background and idle-class work goes wherever a core is free. `always` binds for good.
//! `auto` (the default) binds only while the workers' cores are busy ([`pin_while_busy`]):
//! four times a second it reads how long those cores were idle (`/proc/stat`), binds the
//! workers when that was under a fifth of the time and frees them again when it was over
//! 35 %. While the workers are free and their cores at least 90 % idle, it reads once a
//! second instead (`tollgate_gateway::pace`: an idle process wakes as little as it can). The two settings differ where the cores are shared with busy processes:
//! - saturated, free workers could queue on one core while the other idled (runs at 0.79 of
//!   nginx's requests/s with the cores 9–12 % idle); bound, no run lost that time;
//! - at half the load, a bound worker could not leave its core when the scheduler put the
//!   load generator and the upstream on it too: the added p99 at half the maximum rate was
//!   5–13 ms bound against 1.6–2.1 ms free in the same rounds.
//!
//! The idle time read is the kernel's: what the idle-class ingest threads run counts as busy,
//! though a worker may take it at once. So while ingest catches up on a backlog (after a burst
//! that saturated the cores) the workers stay bound until it has, even at half the load.
//!
//! Measured in BENCHMARKS.md, "Workers bound to their cores" and "Bound while the cores are
//! busy".

use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tollgate_gateway::{PinWorkers, WorkerSeat, pace};

/// Puts the calling thread in `SCHED_BATCH`: the threads of the process's tokio runtime
/// (workers and blocking threads), from `on_thread_start`, and the thread that drives the
/// runtime's top-level future. Threads they spawn inherit it.
pub fn background() {
    set_policy(Policy::Batch);
}

/// Puts the calling thread back in `SCHED_OTHER`: each gateway worker thread, first thing (it
/// is spawned from a runtime thread, whose class it would inherit). Then binds it to its core
/// as `gateway.pin_workers` says ([`tollgate_gateway::PinWorkers`]); under `auto` it takes its
/// seat, bound or free as [`pin_while_busy`] last decided (bound until it first decides).
pub fn request_path(seat: WorkerSeat) {
    set_policy(Policy::Other);
    let allowed = match allowed_cores() {
        Ok(allowed) => allowed,
        Err(error) => {
            tracing::debug!(%error, "cannot read the cores this process may run on; the worker is not bound to one");
            return;
        }
    };
    let Some(core) = seat.pin.core_for(seat.index, seat.workers, &allowed) else {
        return;
    };
    // Held while binding, so that `pin_while_busy` cannot change its mind in between.
    let mut seats = lock_seats();
    if seat.pin == PinWorkers::Auto {
        seats.seated.push(Seated {
            tid: thread_id(),
            core,
            allowed,
        });
        UNSEAT.with(|u| u.0.set(true));
        if !seats.bound {
            return;
        }
    }
    match set_affinity(0, &[core]) {
        Ok(()) => tracing::debug!(
            worker = seat.index,
            core,
            "gateway worker bound to its core"
        ),
        // A seccomp filter or a cpuset changed since: the worker serves unbound.
        Err(error) => {
            tracing::warn!(%error, worker = seat.index, core, "cannot bind the gateway worker to its core; it runs unbound")
        }
    }
}

/// The workers `pin_workers: auto` binds, and whether they are bound now.
static SEATS: Mutex<Seats> = Mutex::new(Seats {
    bound: true,
    seated: Vec::new(),
});

struct Seats {
    /// Whether the seated workers are bound now; a worker that starts takes this state.
    bound: bool,
    seated: Vec<Seated>,
}

/// A worker thread under `pin_workers: auto`.
struct Seated {
    tid: i32,
    /// Its core while bound.
    core: usize,
    /// The cores the process could run on when it started: its mask while free.
    allowed: Vec<usize>,
}

fn lock_seats() -> MutexGuard<'static, Seats> {
    SEATS.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// Takes a seated worker off the seats when its thread ends, so that a thread id the
    /// kernel hands out again is never bound as a worker.
    static UNSEAT: Unseat = const { Unseat(Cell::new(false)) };
}

struct Unseat(Cell<bool>);

impl Drop for Unseat {
    fn drop(&mut self) {
        if self.0.get() {
            let tid = thread_id();
            lock_seats().seated.retain(|s| s.tid != tid);
        }
    }
}

/// How often [`pin_while_busy`] reads the cores' idle time, unless they are quiet...
const PIN_SAMPLE: Duration = Duration::from_millis(250);
/// ...that is, idle at least this share of the last sample with the workers free: then once a
/// second ([`pace::QUIET`]). A load that starts is seen within that second; the workers are
/// bound at the next sample that finds the cores busy, as before.
const QUIET_IDLE: f64 = 0.9;
/// The workers are bound once their cores were idle less than this share of a sample...
const BIND_BELOW_IDLE: f64 = 0.20;
/// ...and freed once they were idle more than this.
const FREE_ABOVE_IDLE: f64 = 0.35;

/// Keeps the workers of `pin_workers: auto` bound to their cores while those cores are busy
/// and free while they have room (the module docs say why), until `stop`. To be spawned on the
/// process's runtime once the gateway's workers start; where `/proc/stat` cannot be read it
/// leaves them as they are (bound) and ends.
pub async fn pin_while_busy(stop: tokio_util::sync::CancellationToken) {
    let mut last: Option<(Vec<usize>, CoreTimes)> = None;
    let mut quiet = false;
    loop {
        tokio::select! {
            _ = pace::tick(if quiet { pace::QUIET } else { PIN_SAMPLE }) => {}
            _ = stop.cancelled() => return,
        }
        let cores = {
            let seats = lock_seats();
            let mut cores: Vec<usize> = seats.seated.iter().map(|s| s.core).collect();
            cores.sort_unstable();
            cores.dedup();
            cores
        };
        if cores.is_empty() {
            // No worker seated (yet): nothing to watch but when one is.
            (last, quiet) = (None, true);
            continue;
        }
        let read = std::fs::read_to_string("/proc/stat");
        let Some(now) = read.ok().and_then(|stat| core_times(&stat, &cores)) else {
            tracing::debug!(
                "cannot read the workers' cores' times from /proc/stat; they stay bound"
            );
            return;
        };
        if let Some((before, then)) = &last
            && *before == cores
            && let Some(idle) = now.idle_share_since(then)
        {
            let bound = lock_seats().bound;
            if let Some(bind) = next_binding(bound, idle) {
                set_bound(bind);
                tracing::debug!(bound = bind, idle, "gateway workers' binding changed");
            }
            quiet = idle >= QUIET_IDLE && !lock_seats().bound;
        }
        last = Some((cores, now));
    }
}

/// Idle and total time of some cores, in the kernel's ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CoreTimes {
    idle: u64,
    total: u64,
}

impl CoreTimes {
    /// The share of the time since `then` that the cores were idle; `None` if no time passed.
    fn idle_share_since(&self, then: &CoreTimes) -> Option<f64> {
        let total = self.total.checked_sub(then.total).filter(|t| *t > 0)?;
        Some(self.idle.saturating_sub(then.idle) as f64 / total as f64)
    }
}

/// The summed times of `cores` from the text of `/proc/stat` (`cpuN user nice system idle
/// iowait irq softirq steal ...`: idle and iowait count as idle; guest time is already in
/// user and nice). `None` unless every core has a line.
fn core_times(stat: &str, cores: &[usize]) -> Option<CoreTimes> {
    let mut sum = CoreTimes { idle: 0, total: 0 };
    let mut found = 0;
    for line in stat.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(core) = fields.next().and_then(|f| f.strip_prefix("cpu")) else {
            continue;
        };
        if !core.parse().is_ok_and(|c: usize| cores.contains(&c)) {
            continue;
        }
        let times: Vec<u64> = fields.take(8).map_while(|f| f.parse().ok()).collect();
        if times.len() < 5 {
            return None;
        }
        sum.idle += times[3] + times[4];
        sum.total += times.iter().sum::<u64>();
        found += 1;
    }
    (found == cores.len()).then_some(sum)
}

/// Whether to bind (`Some(true)`) or free (`Some(false)`) the workers, bound now or not, after
/// a sample in which their cores were idle `idle` of the time; `None`: leave them.
fn next_binding(bound: bool, idle: f64) -> Option<bool> {
    if bound && idle > FREE_ABOVE_IDLE {
        Some(false)
    } else if !bound && idle < BIND_BELOW_IDLE {
        Some(true)
    } else {
        None
    }
}

/// Binds every seated worker to its core, or frees it to the process's cores.
fn set_bound(bound: bool) {
    let mut seats = lock_seats();
    seats.bound = bound;
    for s in &seats.seated {
        let cores = if bound {
            std::slice::from_ref(&s.core)
        } else {
            &s.allowed[..]
        };
        if let Err(error) = set_affinity(s.tid, cores) {
            tracing::debug!(%error, tid = s.tid, bound, "cannot change a gateway worker's cores");
        }
    }
}

/// The cores the calling thread may run on (its affinity mask), in order.
fn allowed_cores() -> std::io::Result<Vec<usize>> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: an all-zero `cpu_set_t` is a valid, empty set (a plain bit array).
        #[allow(unsafe_code)]
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `sched_getaffinity` writes at most `size_of::<cpu_set_t>()` bytes into `set`,
        // which lives on this stack for the call; pid 0 is the calling thread.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let cores = (0..libc::CPU_SETSIZE as usize)
            .filter(|c| {
                // SAFETY: `CPU_ISSET` reads bit `c` of `set`, within its `CPU_SETSIZE` bits.
                #[allow(unsafe_code)]
                unsafe {
                    libc::CPU_ISSET(*c, &set)
                }
            })
            .collect();
        Ok(cores)
    }
    #[cfg(not(target_os = "linux"))]
    Ok(Vec::new())
}

/// Sets the cores thread `tid` of this process may run on (0: the calling thread).
fn set_affinity(tid: i32, cores: &[usize]) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        if cores.iter().any(|c| *c >= libc::CPU_SETSIZE as usize) {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        // SAFETY: an all-zero `cpu_set_t` is a valid, empty set (a plain bit array).
        #[allow(unsafe_code)]
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for core in cores {
            // SAFETY: `CPU_SET` sets bit `core` of `set`, checked above to be within its
            // `CPU_SETSIZE` bits.
            #[allow(unsafe_code)]
            unsafe {
                libc::CPU_SET(*core, &mut set)
            };
        }
        // SAFETY: `sched_setaffinity` reads `size_of::<cpu_set_t>()` bytes of `set`, a valid set
        // on this stack, and changes only the mask of the thread given: the calling one (0), or
        // a worker that registered itself and is still running (`Unseat` takes it off the
        // seats, under the lock this is called with, before its thread ends).
        #[allow(unsafe_code)]
        let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (tid, cores);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Other,
    Batch,
    Idle,
}

/// Sets the calling thread's policy; see [`set_policy_of`].
fn set_policy(policy: Policy) {
    if let Err(error) = set_policy_of(0, policy) {
        tracing::debug!(%error, ?policy, "cannot set this thread's scheduling class; it keeps the one it has");
    }
}

/// Sets the policy of thread `tid` of this process (0: the calling thread) at priority 0, the
/// only one these policies take. A failure (a seccomp filter, another kernel, no right to leave
/// `SCHED_IDLE`) leaves the class as it was: the class is a tuning, not a condition for serving.
fn set_policy_of(tid: i32, policy: Policy) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let policy = match policy {
            Policy::Other => libc::SCHED_OTHER,
            Policy::Batch => libc::SCHED_BATCH,
            Policy::Idle => libc::SCHED_IDLE,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `sched_setscheduler` reads `param` (a valid, initialized struct on this
        // stack) and changes only the scheduling class of the thread given (pid 0 is the
        // calling thread on Linux; any other id is a thread of this process that registered
        // itself or that `move_named_threads` just found under `/proc/self/task`, or one that
        // ended, which the call reports as ESRCH). Priority 0 is the one these three policies
        // take.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (tid, policy);
    Ok(())
}

/// The calling thread's id, for [`set_policy_of`] from another thread.
fn thread_id() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `gettid` takes no argument and cannot fail.
        #[allow(unsafe_code)]
        unsafe {
            libc::gettid()
        }
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// Whether a thread of this process may go to `SCHED_IDLE` and come back: tried on a thread
/// made for the purpose, so no thread that does work is left in a class it cannot leave.
fn can_leave_idle() -> bool {
    if !cfg!(target_os = "linux") {
        return false;
    }
    std::thread::Builder::new()
        .name("tollgate-probe".into())
        .spawn(|| set_policy_of(0, Policy::Idle).is_ok() && set_policy_of(0, Policy::Batch).is_ok())
        .ok()
        .and_then(|t| t.join().ok())
        .unwrap_or(false)
}

/// The threads of the ingest runtime and the class they share.
struct Threads {
    /// Thread ids, each added by the thread itself as it starts and removed as it stops.
    tids: Mutex<Vec<i32>>,
    /// The class now: `Idle` while the collector keeps up, `Batch` while it is behind.
    policy: Mutex<Policy>,
    /// Whether the threads may go to idle cores at all (see the module docs).
    can_idle: bool,
}

impl Threads {
    fn lock_tids(&self) -> std::sync::MutexGuard<'_, Vec<i32>> {
        self.tids.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_policy(&self) -> std::sync::MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by each thread as it starts: joins the list in the class of the moment.
    fn join(&self) {
        let policy = self.lock_policy();
        let tid = thread_id();
        self.lock_tids().push(tid);
        set_policy(*policy);
    }

    fn leave(&self) {
        let tid = thread_id();
        self.lock_tids().retain(|t| *t != tid);
    }

    /// Moves every thread to `policy` (if it may: see `can_idle`). Returns whether the class
    /// changed.
    fn set(&self, policy: Policy) -> bool {
        if policy == Policy::Idle && !self.can_idle {
            return false;
        }
        let mut now = self.lock_policy();
        if *now == policy {
            return false;
        }
        *now = policy;
        tollgate_store::cpu::offer_by_pausing(policy == Policy::Idle);
        for tid in self.lock_tids().iter() {
            if let Err(error) = set_policy_of(*tid, policy) {
                tracing::debug!(%error, tid, ?policy, "cannot move an ingest thread");
            }
        }
        true
    }
}

/// The runtime the collector and the store's upkeep run on in `tollgate up`: one thread for
/// their tasks and the blocking threads of their flushes and merges, all named
/// `tollgate-ingest`, in `SCHED_IDLE` while the collector keeps up (see the module docs).
pub struct CatchUp {
    handle: tokio::runtime::Handle,
    threads: Arc<Threads>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The name of the ingest runtime's threads (at most 15 bytes, the kernel's limit).
pub const INGEST_THREAD: &str = "tollgate-ingest";

impl CatchUp {
    /// Starts the runtime. With `yield_to_requests` false, or without the right to leave
    /// `SCHED_IDLE`, its threads are batch work throughout.
    pub fn start(yield_to_requests: bool) -> std::io::Result<CatchUp> {
        let can_idle = yield_to_requests && can_leave_idle();
        if yield_to_requests && !can_idle {
            tracing::info!(
                "ingest runs as batch work beside the gateway: this process may not take a thread back out of SCHED_IDLE (needs root, CAP_SYS_NICE or RLIMIT_NICE >= 20, e.g. systemd's LimitNICE=+0)"
            );
        }
        // Background loops leave the core idle when they offer it while in the idle class
        // (`tollgate_store::cpu`): a core running an idle-class thread does not take work
        // waiting on the other core.
        tollgate_store::cpu::offer_by_pausing(can_idle);
        let threads = Arc::new(Threads {
            tids: Mutex::new(Vec::new()),
            policy: Mutex::new(if can_idle {
                Policy::Idle
            } else {
                Policy::Batch
            }),
            can_idle,
        });
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let on_start = threads.clone();
        let on_stop = threads.clone();
        let main = threads.clone();
        let thread = std::thread::Builder::new()
            .name(INGEST_THREAD.into())
            .spawn(move || {
                main.join();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name(INGEST_THREAD)
                    .on_thread_start(move || on_start.join())
                    .on_thread_stop(move || on_stop.leave())
                    .build();
                let runtime = match runtime {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                main.leave();
            })?;
        let handle = handle_rx.recv().map_err(|_| {
            std::io::Error::other("the ingest thread ended before its runtime started")
        })??;
        Ok(CatchUp {
            handle,
            threads,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `task` on the ingest runtime.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }

    /// A task that keeps the ingest threads on idle cores while the collector keeps up, and at
    /// their fair share while it is `bound` or more behind, until `stop`. `caught_up` gives
    /// when the collector last reached the end of the bus (Unix seconds; before it first does,
    /// the time the task started counts instead). To be spawned on the
    /// main runtime (batch work, which idle threads cannot hold up); it checks ten times per
    /// `bound` (five while the collector is less than half of it behind, as it is when idle:
    /// once a second with the default bound, with the process's other samplers, `pace`), at
    /// most once per 100 ms and at least once a second, and ends at once where the threads may
    /// not use idle cores.
    pub fn governor(
        &self,
        caught_up: impl Fn() -> f64 + Send + 'static,
        bound: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let threads = self.threads.clone();
        async move {
            if !threads.can_idle {
                return;
            }
            // A collector that has not caught up yet is behind since ingest started.
            let started = tollgate_collector::unix_seconds(std::time::SystemTime::now());
            let every = (bound / 10).clamp(Duration::from_millis(100), pace::QUIET);
            let keeping_up_every = (bound / 5).clamp(every, pace::QUIET);
            let mut keeping_up = false;
            loop {
                tokio::select! {
                    _ = pace::tick(if keeping_up { keeping_up_every } else { every }) => {}
                    _ = stop.cancelled() => return,
                }
                let behind = behind(caught_up().max(started), std::time::SystemTime::now());
                keeping_up = behind < bound / 2;
                let now = *threads.lock_policy();
                if let Some(policy) = next_policy(now, behind, bound)
                    && threads.set(policy)
                {
                    tracing::debug!(
                        ?policy,
                        behind_s = behind.as_secs_f64(),
                        "ingest threads moved"
                    );
                }
            }
        }
    }

    /// Whether the ingest threads are on idle cores now (false where they may never be).
    #[cfg(test)]
    fn on_idle_cores(&self) -> bool {
        *self.threads.lock_policy() == Policy::Idle
    }
}

impl Drop for CatchUp {
    /// Stops the runtime and waits for its thread: whatever was spawned on it is dropped.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The prefix librdkafka gives its threads' names (`rdk:main`, `rdk:broker…`).
const KAFKA_CLIENT_THREADS: &str = "rdk:";
/// How often [`kafka_client_on_idle_cores`] looks while records wait for delivery.
const CLIENT_SAMPLE: Duration = Duration::from_millis(250);

/// Keeps the Kafka client's threads of `tollgate gateway` on idle cores while the bus takes the
/// events as fast as they come, and at their fair share while more wait (see
/// [`next_client_policy`]), until `stop` (the module docs say why). `backlog` gives the records
/// accepted and not yet delivered; `high_water` is the spool's mark. To be spawned on the
/// process's runtime (batch work, which idle threads cannot hold up); it ends at once where
/// the process may not take a thread back out of `SCHED_IDLE`.
pub async fn kafka_client_on_idle_cores(
    backlog: impl Fn() -> u64,
    high_water: u64,
    stop: tokio_util::sync::CancellationToken,
) {
    if !can_leave_idle() {
        tracing::info!(
            "the Kafka client's threads run as batch work: this process may not take a thread back out of SCHED_IDLE (needs root, CAP_SYS_NICE or RLIMIT_NICE >= 20, e.g. systemd's LimitNICE=+0)"
        );
        return;
    }
    let mut policy = Policy::Idle;
    loop {
        let waiting = backlog();
        if let Some(next) = next_client_policy(policy, waiting, high_water) {
            policy = next;
            tracing::debug!(?policy, waiting, "Kafka client threads moved");
        }
        // Every time, not only on a change: the client starts a thread as it needs one (a
        // broker's, on its first connection), in the class of the thread that starts it.
        move_named_threads(KAFKA_CLIENT_THREADS, policy);
        let quiet = waiting == 0 && policy == Policy::Idle;
        tokio::select! {
            _ = pace::tick(if quiet { pace::QUIET } else { CLIENT_SAMPLE }) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The class the Kafka client's threads should move to, if any, with `waiting` records not yet
/// delivered: batch once more than a quarter of the spool's `high_water` wait, idle again once
/// fewer than a twentieth do (so a backlog near the bound does not flip them at every look).
fn next_client_policy(now: Policy, waiting: u64, high_water: u64) -> Option<Policy> {
    match now {
        Policy::Idle if waiting > high_water / 4 => Some(Policy::Batch),
        Policy::Batch if waiting < high_water / 20 => Some(Policy::Idle),
        _ => None,
    }
}

/// Moves every thread of this process whose name starts with `prefix` to `policy`, found in
/// `/proc/self/task`. A thread that ends meanwhile is skipped.
fn move_named_threads(prefix: &str, policy: Policy) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(name) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        if !name.starts_with(prefix) {
            continue;
        }
        if let Err(error) = set_policy_of(tid, policy) {
            tracing::debug!(%error, tid, ?policy, "cannot move a thread");
        }
    }
}

/// How long before `now` the collector last caught up (`caught_up` in Unix seconds; zero
/// when `caught_up` is in the future).
fn behind(caught_up: f64, now: std::time::SystemTime) -> Duration {
    Duration::try_from_secs_f64(tollgate_collector::unix_seconds(now) - caught_up)
        .unwrap_or(Duration::ZERO)
}

/// The class the ingest threads should move to, if any: batch once `behind` reaches `bound`,
/// idle again once it is under half of it (so a collector near the bound does not flip back
/// and forth at every check).
fn next_policy(now: Policy, behind: Duration, bound: Duration) -> Option<Policy> {
    match now {
        Policy::Idle if behind >= bound => Some(Policy::Batch),
        Policy::Batch if behind < bound / 2 => Some(Policy::Idle),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that seat workers run one at a time: the seats are the process's.
    fn serial() -> MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        SERIAL.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `request_path` for `seat` on a new thread; returns that thread's cores after it.
    fn cores_of_worker(seat: WorkerSeat) -> Vec<usize> {
        std::thread::spawn(move || {
            request_path(seat);
            allowed_cores().unwrap()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_worker_thread_is_bound_to_its_core_as_pin_workers_says() {
        use tollgate_gateway::PinWorkers;
        let _serial = serial();
        let allowed = allowed_cores().unwrap();
        assert!(!allowed.is_empty());
        let n = allowed.len();
        let seat = |index, workers, pin| WorkerSeat {
            index,
            workers,
            pin,
        };
        assert_eq!(
            cores_of_worker(seat(n - 1, n, PinWorkers::Auto)),
            [allowed[n - 1]]
        );
        assert_eq!(
            cores_of_worker(seat(n, n + 1, PinWorkers::Always)),
            [allowed[0]]
        );
        assert_eq!(cores_of_worker(seat(0, n + 1, PinWorkers::Auto)), allowed);
        assert_eq!(cores_of_worker(seat(0, n, PinWorkers::Never)), allowed);
        assert_eq!(
            allowed_cores().unwrap(),
            allowed,
            "only the worker's thread is bound"
        );
    }

    #[test]
    fn workers_are_bound_below_a_fifth_idle_and_freed_above_35_percent() {
        assert_eq!(next_binding(true, 0.02), None);
        assert_eq!(
            next_binding(true, 0.30),
            None,
            "within the band: as they are"
        );
        assert_eq!(next_binding(true, 0.50), Some(false));
        assert_eq!(next_binding(false, 0.50), None);
        assert_eq!(
            next_binding(false, 0.30),
            None,
            "within the band: as they are"
        );
        assert_eq!(next_binding(false, 0.10), Some(true));
    }

    #[test]
    fn the_cores_idle_share_is_read_from_proc_stat() {
        let before = "cpu  300 0 300 1000 0 0 0 0 0 0\n\
                      cpu0 100 0 100 500 0 0 0 0 0 0\n\
                      cpu1 200 0 200 500 0 0 0 0 0 0\n\
                      intr 12345\n";
        // Core 0: 100 ticks, 50 of them idle or waiting for I/O; core 1: 100 ticks, none idle.
        let after = "cpu  400 0 400 1050 0 0 0 0 0 0\n\
                     cpu0 125 0 120 540 10 3 2 0 0 0\n\
                     cpu1 300 0 200 500 0 0 0 0 0 0\n";
        let share = |cores: &[usize]| {
            let then = core_times(before, cores).unwrap();
            core_times(after, cores)
                .unwrap()
                .idle_share_since(&then)
                .unwrap()
        };
        assert_eq!(share(&[0]), 0.5);
        assert_eq!(share(&[1]), 0.0);
        assert_eq!(share(&[0, 1]), 0.25);
        assert_eq!(core_times(before, &[2]), None, "a core without a line");
        let then = core_times(before, &[0]).unwrap();
        assert_eq!(then.idle_share_since(&then), None, "no time passed");
        // This machine's own file has a line for each core this process may run on.
        let stat = std::fs::read_to_string("/proc/stat").unwrap();
        assert!(core_times(&stat, &allowed_cores().unwrap()).is_some());
    }

    /// A worker under `pin_workers: auto` is bound and freed as the seats say, from another
    /// thread, and leaves its seat when its thread ends.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_auto_worker_is_bound_while_busy_and_freed_when_not() {
        use tollgate_gateway::PinWorkers;
        let _serial = serial();
        let allowed = allowed_cores().unwrap();
        let n = allowed.len();
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let (tell, told) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            request_path(WorkerSeat {
                index: n - 1,
                workers: n,
                pin: PinWorkers::Auto,
            });
            while asked.recv().is_ok() {
                tell.send(allowed_cores().unwrap()).unwrap();
            }
        });
        let cores = || {
            ask.send(()).unwrap();
            told.recv().unwrap()
        };
        assert_eq!(cores(), [allowed[n - 1]], "bound from the start");
        assert_eq!(lock_seats().seated.len(), 1);
        set_bound(false);
        assert_eq!(cores(), allowed, "freed");
        set_bound(true);
        assert_eq!(cores(), [allowed[n - 1]], "bound again");
        assert_eq!(
            allowed_cores().unwrap(),
            allowed,
            "only the worker's thread"
        );
        drop(ask);
        worker.join().unwrap();
        assert!(
            lock_seats().seated.is_empty(),
            "its seat left with its thread"
        );
    }

    #[test]
    fn ingest_leaves_idle_cores_at_the_bound_and_returns_under_half_of_it() {
        let bound = Duration::from_secs(5);
        let s = Duration::from_secs;
        assert_eq!(next_policy(Policy::Idle, s(4), bound), None);
        assert_eq!(next_policy(Policy::Idle, s(5), bound), Some(Policy::Batch));
        assert_eq!(next_policy(Policy::Batch, s(3), bound), None);
        assert_eq!(
            next_policy(Policy::Batch, Duration::from_millis(2_400), bound),
            Some(Policy::Idle)
        );
    }

    #[test]
    fn the_kafka_client_leaves_idle_cores_past_a_quarter_of_the_high_water_mark() {
        assert_eq!(next_client_policy(Policy::Idle, 25_000, 100_000), None);
        assert_eq!(
            next_client_policy(Policy::Idle, 25_001, 100_000),
            Some(Policy::Batch)
        );
        assert_eq!(next_client_policy(Policy::Batch, 5_000, 100_000), None);
        assert_eq!(
            next_client_policy(Policy::Batch, 4_999, 100_000),
            Some(Policy::Idle)
        );
    }

    /// Threads named as the Kafka client names its own (`rdk:…`) go to `SCHED_IDLE` while
    /// nothing waits for delivery, to `SCHED_BATCH` past the bound and back once it drains; a
    /// thread of another name keeps its class throughout. Where the process may not leave
    /// `SCHED_IDLE`, nothing moves.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_kafka_client_threads_follow_the_backlog() {
        use std::sync::atomic::{AtomicU64, Ordering};
        // A thread of the given name that reports its id and waits until told to end.
        let named = |name: &str| {
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    tid_tx.send(thread_id()).unwrap();
                    let _ = end_rx.recv();
                })
                .unwrap();
            (tid_rx.recv().unwrap(), end_tx, thread)
        };
        let (client, end_client, client_thread) = named("rdk:broker1");
        let (other, end_other, other_thread) = named("rdk-not-kafka");
        let start = policy_of(other);
        let may_idle = can_leave_idle();

        let backlog = Arc::new(AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let governed = {
            let backlog = backlog.clone();
            kafka_client_on_idle_cores(move || backlog.load(Ordering::Relaxed), 100, stop.clone())
        };
        let check = async {
            if may_idle {
                wait_until(|| policy_of(client) == libc::SCHED_IDLE).await;
                backlog.store(26, Ordering::Relaxed);
                wait_until(|| policy_of(client) == libc::SCHED_BATCH).await;
                backlog.store(4, Ordering::Relaxed);
                wait_until(|| policy_of(client) == libc::SCHED_IDLE).await;
            } else {
                assert_eq!(policy_of(client), start);
            }
            assert_eq!(
                policy_of(other),
                start,
                "a thread of another name keeps its class"
            );
            stop.cancel();
        };
        tokio::join!(governed, check);
        drop((end_client, end_other));
        client_thread.join().unwrap();
        other_thread.join().unwrap();
    }

    #[test]
    fn behind_is_the_time_since_the_collector_caught_up() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(behind(990.0, now), Duration::from_secs(10));
        assert_eq!(behind(1_001.0, now), Duration::ZERO, "a clock step back");
        assert_eq!(
            behind(0.0, now),
            Duration::from_secs(1_000),
            "never caught up"
        );
    }

    /// The class of thread `tid` of this process, from `/proc` (field 41 of its `stat`).
    #[cfg(target_os = "linux")]
    fn policy_of(tid: i32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split(' ').nth(41 - 3).unwrap().parse().unwrap()
    }

    /// Tasks on the ingest runtime, its blocking threads among them, run in `SCHED_IDLE` while
    /// the collector is caught up and in `SCHED_BATCH` once it is behind by the bound; where
    /// the process may not leave `SCHED_IDLE`, in `SCHED_BATCH` throughout.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_ingest_threads_follow_the_collector_s_lag() {
        let catch_up = CatchUp::start(true).unwrap();
        let may_idle = can_leave_idle();
        let expected = |idle: bool| {
            if idle && may_idle {
                libc::SCHED_IDLE
            } else {
                libc::SCHED_BATCH
            }
        };
        // Each thread's class, as the thread itself and a blocking thread of it read it.
        let classes = |catch_up: &CatchUp| {
            catch_up.spawn(async {
                let own = policy_of(thread_id());
                let blocking = tokio::task::spawn_blocking(|| policy_of(thread_id()))
                    .await
                    .unwrap();
                (own, blocking)
            })
        };
        let (own, blocking) = classes(&catch_up).await.unwrap();
        assert_eq!((own, blocking), (expected(true), expected(true)));
        // Their loops leave the core idle when they offer it only while in the idle class.
        assert_eq!(tollgate_store::cpu::offers_by_pausing(), may_idle);

        let caught_up = Arc::new(Mutex::new(now_seconds()));
        let stop = tokio_util::sync::CancellationToken::new();
        let bound = Duration::from_millis(500);
        let governed = {
            let caught_up = caught_up.clone();
            catch_up.governor(move || *caught_up.lock().unwrap(), bound, stop.clone())
        };
        let check = async {
            // Behind: the collector last caught up a minute ago.
            *caught_up.lock().unwrap() = now_seconds() - 60.0;
            wait_until(|| !catch_up.on_idle_cores()).await;
            assert_eq!(
                classes(&catch_up).await.unwrap(),
                (expected(false), expected(false))
            );
            assert!(!tollgate_store::cpu::offers_by_pausing());
            // Caught up again.
            *caught_up.lock().unwrap() = now_seconds();
            if may_idle {
                wait_until(|| catch_up.on_idle_cores()).await;
            }
            assert_eq!(
                classes(&catch_up).await.unwrap(),
                (expected(true), expected(true))
            );
            assert_eq!(tollgate_store::cpu::offers_by_pausing(), may_idle);
            stop.cancel();
        };
        tokio::join!(governed, check);
    }

    fn now_seconds() -> f64 {
        tollgate_collector::unix_seconds(std::time::SystemTime::now())
    }

    async fn wait_until(condition: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
