//! Scheduling classes of a process that carries the gateway's request path (`tollgate up`,
//! `tollgate gateway`).
//!
//! Beside the gateway's worker threads, such a process runs work that is throughput, not
//! latency: the event publisher, the embedded log's writes and syncs, the collector, the
//! store's flushes and merges, the quota feed, the query API. Those threads run as
//! `SCHED_BATCH`; the gateway's workers stay `SCHED_OTHER`. A batch thread gets the same share
//! of the cores at the same nice level, so nothing starves; what changes is that its wake-ups do
//! not preempt the thread on the core (the kernel treats it as CPU-bound and lets the tick
//! decide). Each hand-over from a worker to the publisher, each sync completing and each
//! flush's step used to preempt whatever ran there, a gateway worker included, and the woken
//! thread then ran a little at a time between preemptions.
//!
//! Measured on the two-core reference machine (`scripts/bench-cpu-per-request.sh`,
//! `scripts/bench-gateway.sh`, BENCHMARKS.md): CPU per request at a fixed 20,000 requests/s
//! fell by about 4 % in the gateway's workers and 10 % in the other threads.
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
