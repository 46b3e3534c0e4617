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

/// Puts the calling thread in `SCHED_BATCH`: the threads of the process's tokio runtime
/// (workers and blocking threads), from `on_thread_start`. Threads they spawn inherit it.
pub fn background() {
    set_policy(Policy::Batch);
}

/// Puts the calling thread back in `SCHED_OTHER`: each gateway worker thread, first thing (it
/// is spawned from a runtime thread, whose class it would inherit).
pub fn request_path() {
    set_policy(Policy::Other);
}

#[derive(Debug, Clone, Copy)]
enum Policy {
    Other,
    Batch,
}

/// Sets the calling thread's policy at priority 0 (the only one these policies take). A failure
/// (a seccomp filter, another kernel) is logged and otherwise ignored: the class is a tuning,
/// not a condition for serving.
fn set_policy(policy: Policy) {
    #[cfg(target_os = "linux")]
    {
        let policy = match policy {
            Policy::Other => libc::SCHED_OTHER,
            Policy::Batch => libc::SCHED_BATCH,
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `sched_setscheduler` reads `param` (a valid, initialized struct on this
        // stack) and changes only the scheduling class of the thread given; pid 0 is the
        // calling thread on Linux. Priority 0 is the one SCHED_OTHER and SCHED_BATCH take, and
        // moving between them needs no privilege.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                policy,
                "cannot set this thread's scheduling class; it keeps the one it has"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = policy;
}
