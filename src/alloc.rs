//! The process's allocator settings, applied first thing in `main`.
//!
//! glibc's malloc gives each thread that meets contention its own arena, up to eight per core,
//! and memory freed into one arena is not reused by another. The store's work runs on tokio's
//! blocking threads (flushes, compaction, Parquet and DataFusion), so a process that ingests
//! and compacts at full speed spread its allocations over many arenas and held about twice the
//! memory it used: 442 MiB peak RSS for ten million events through `tollgate up`, 206 MiB with
//! arenas limited to two on the two-core reference machine (BENCHMARKS.md). So the arenas are
//! limited, in the processes that hold a store (`up`, `collector`, `query-api`).
//!
//! The limit is two per core (at least 2, at most 16): one for each of the store's busy
//! threads and one for each of the gateway's worker threads (one per core). With one per core,
//! the gateway's threads in `tollgate up` waited on arena locks: 6.4 system calls per proxied
//! request instead of 4.5, and 9–13 % fewer requests/s. On the two-core machine, four arenas
//! kept ten million events' ingest and compaction at 216 MiB peak RSS (196 MiB with two).
//! `MALLOC_ARENA_MAX` in the environment still wins (glibc reads it before `main`; this does
//! not override a value set there).
//!
//! glibc's mmap threshold and trim threshold are fixed at 4 MiB and 8 MiB in the same
//! processes ([`fix_thresholds`]). Left to glibc, the mmap threshold rises to the size of the
//! largest mapped block freed so far (up to 32 MiB) and the trim threshold to twice that. With
//! 100,000 consumers, start-up frees blocks of 12–17 MB (the configuration file, the first
//! full quota answer), after which every block under that size came from the heaps, and a
//! thread arena kept up to 40 MB of free memory at its top: glibc hands an arena's top back
//! only on a `free` that leaves more than the trim threshold there, and `malloc_trim` does
//! not touch the top of any arena but the main one. `tollgate up` with 100,001 consumers held
//! 20–57 MiB of anonymous memory 15 s after `/readyz`; with the thresholds fixed, 15–17 MiB
//! (BENCHMARKS.md, "Many consumers").
//!
//! Why 4 MiB and not lower: held at 256 KiB, every large Arrow buffer of the store's flushes
//! and compactions was an `mmap` and a `munmap`: compactions took 1.7 times as long, and a
//! long-lived `tollgate up` under steady load answered its slowest requests in 126 ms to
//! 2.2 s instead of 50–80 ms (`scripts/bench-open-loop.sh`, BENCHMARKS.md). Held at 32 MiB
//! with glibc's default trim threshold (128 KiB), the heaps' tops were handed back and taken
//! again at every flush, and the tail was as bad. Buffers under 4 MiB (a flush's columns, a
//! compaction's pages) come from the heaps as they did, and tops up to 8 MiB stay, as glibc's
//! own rule (trim at twice the mmap threshold) has it.

/// Limits glibc's malloc arenas (see the module docs). A no-op on other C libraries.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = (2 * cores).clamp(2, 16) as libc::c_int;
        // SAFETY: `mallopt` only sets a tuning parameter of glibc's allocator; it is called
        // before this process starts any thread, and M_ARENA_MAX takes any positive count.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Blocks of at least this size are mapped on their own, and unmapped when freed.
const MMAP_THRESHOLD: libc::c_int = 4 << 20;

/// An arena's free top is handed back once it exceeds this.
const TRIM_THRESHOLD: libc::c_int = 2 * MMAP_THRESHOLD;

/// Fixes glibc's mmap and trim thresholds (see the module docs), unless the environment sets
/// them (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES`). A no-op on
/// other C libraries.
pub fn fix_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("threshold"));
        if tuned {
            return;
        }
        // SAFETY: `mallopt` only sets tuning parameters of glibc's allocator; it is called
        // before this process starts any thread, and both take any positive size.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// Hands memory freed during start-up back to the system. Reading a large configuration
/// (100,000 consumers: a 12 MB YAML file, parsed into a tree of events first) frees tens of
/// megabytes that glibc keeps in its arenas; without this, they stay in the process's RSS.
/// A no-op on other C libraries.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` only returns free pages of glibc's heaps to the kernel; it
        // takes the arenas' locks itself and is safe to call from any thread at any time.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// A trim that holds the allocator longer than this is logged (at debug level:
/// `RUST_LOG=tollgate::alloc=debug`). In a `tollgate up` that had stored over a million events
/// at 40,000 requests/s, trims took 6–13 ms (BENCHMARKS.md).
const SLOW_TRIM: std::time::Duration = std::time::Duration::from_millis(5);

/// The process counts as quiet over a period when it used less than this share of one core.
const QUIET_CPU: f64 = 0.05;

/// Under load, a trim runs at most this often: each held the allocator for about 4 ms in a
/// `tollgate up` at 19,000 requests/s, and a gateway worker that allocated meanwhile waited
/// as long (`perf sched`, BENCHMARKS.md). Free chunks are reused within seconds under steady
/// load anyway; after a burst the first quiet period hands them back.
const TRIM_UNDER_LOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Quiet time after the trim that ends a busy spell until a second one. Work winds down after
/// the load: the collector releases its spare events after a flush interval (2 s by default)
/// without events, which can come after the first quiet period. Their pages are free only
/// then; without this second trim an idle `tollgate up` kept them (BENCHMARKS.md).
const FOLLOW_UP_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// When to trim, from the process's CPU use over each period: once when a busy spell ends
/// (the first quiet period after one) and again after [`FOLLOW_UP_AFTER`] of quiet periods,
/// and every [`TRIM_UNDER_LOAD_EVERY`] while it lasts. An idle process is not trimmed again
/// and again: it allocated nothing to hand back.
#[derive(Debug, Default)]
struct TrimPolicy {
    /// A period at or over [`QUIET_CPU`] since the last trim.
    busy_since_trim: bool,
    /// Time since the last trim or the start of the busy spell, summed over periods.
    since_trim: std::time::Duration,
    /// Quiet time left until the follow-up trim of a spell that ended.
    follow_up: Option<std::time::Duration>,
}

impl TrimPolicy {
    /// After a `period` in which the process used `busy` of a core: whether to trim now.
    fn after(&mut self, period: std::time::Duration, busy: f64) -> bool {
        let quiet = busy < QUIET_CPU;
        if !quiet && !self.busy_since_trim {
            // A busy spell begins: its minute counts from here, not from an idle stretch.
            self.busy_since_trim = true;
            self.since_trim = std::time::Duration::ZERO;
        }
        self.since_trim += period;
        let due = self.busy_since_trim && (quiet || self.since_trim >= TRIM_UNDER_LOAD_EVERY);
        if due {
            *self = TrimPolicy {
                follow_up: quiet.then_some(FOLLOW_UP_AFTER),
                ..TrimPolicy::default()
            };
            return true;
        }
        match self.follow_up.as_mut() {
            Some(left) if quiet => {
                *left = left.saturating_sub(period);
                let now = left.is_zero();
                if now {
                    self.follow_up = None;
                }
                now
            }
            _ => false,
        }
    }
}

/// CPU time (user and system) this process has used so far; `None` if unknown.
fn cpu_time() -> Option<std::time::Duration> {
    #[cfg(unix)]
    {
        // SAFETY: `getrusage` fills the struct it is given and nothing else; an all-zero
        // `rusage` is a valid value of that plain C struct.
        #[allow(unsafe_code)]
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
                return None;
            }
            usage
        };
        let tv = |t: libc::timeval| {
            std::time::Duration::from_secs(t.tv_sec as u64)
                + std::time::Duration::from_micros(t.tv_usec as u64)
        };
        Some(tv(usage.ru_utime) + tv(usage.ru_stime))
    }
    #[cfg(not(unix))]
    None
}

/// How often [`trim_every`] looks at the process's CPU use during a busy spell: a trim follows
/// the end of a burst within this much, once the process has wound down (the CPU use is one
/// `getrusage` call). Outside a busy spell it looks once a second, with the process's other
/// samplers (`tollgate_gateway::pace`), so a burst is seen within a second of its start. It
/// was 2 s: `tollgate up` with 100,001 consumers
/// still held 97 MiB 3.5 s after a load ended, and 43 MiB from the trim on (BENCHMARKS.md,
/// "Memory under load").
pub const TRIM_PERIOD: std::time::Duration = std::time::Duration::from_millis(500);

/// Hands free memory back to the system once a busy spell is over (the first `period` under
/// [`QUIET_CPU`] of a core after one), and every [`TRIM_UNDER_LOAD_EVERY`] while it lasts
/// ([`TrimPolicy`]), for as long as the runtime runs.
///
/// glibc returns the top of its main heap by itself, but not free pages inside its heaps nor
/// anything of the per-thread arenas: a gateway that served a burst on 64 connections kept two
/// arenas of 16–21 MiB each after the load, most of it free (BENCHMARKS.md, "Many consumers").
/// `malloc_trim` walks every arena and releases the free pages. Each call takes the arenas'
/// locks in turn for the walk (well under a millisecond at these sizes; 4–13 ms in a
/// `tollgate up` under load, see `SLOW_TRIM`), so a thread that allocates at that moment waits
/// that long; pages reused afterwards cost one page fault each. Hence trims wait for a quiet
/// period unless memory has not been handed back for a minute. It runs on a blocking thread,
/// never on a worker of the request path.
pub async fn trim_every(period: std::time::Duration) {
    use tollgate_gateway::pace;
    let mut cpu_before = cpu_time();
    let mut looked = std::time::Instant::now();
    let mut policy = TrimPolicy::default();
    loop {
        pace::tick(if policy.busy_since_trim {
            period
        } else {
            period.max(pace::QUIET)
        })
        .await;
        let (cpu_now, now) = (cpu_time(), std::time::Instant::now());
        let elapsed = now.duration_since(looked);
        let busy = match (cpu_before, cpu_now) {
            (Some(a), Some(b)) if !elapsed.is_zero() => {
                b.saturating_sub(a).as_secs_f64() / elapsed.as_secs_f64()
            }
            _ => 1.0, // unknown: counted busy, so trims still come once a minute
        };
        (cpu_before, looked) = (cpu_now, now);
        if !policy.after(elapsed, busy) {
            continue;
        }
        let took = tokio::task::spawn_blocking(|| {
            let started = std::time::Instant::now();
            release_free_memory();
            started.elapsed()
        })
        .await;
        match took {
            Err(_) => return,
            Ok(t) if t > SLOW_TRIM => {
                tracing::debug!(
                    ms = t.as_millis() as u64,
                    busy,
                    "handing free memory back held the allocator"
                );
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn trims_once_a_burst_is_over_and_once_a_minute_during_one() {
        let period = Duration::from_millis(500);
        let mut p = TrimPolicy::default();
        assert!(
            !p.after(period, 0.0),
            "idle from the start: nothing to hand back"
        );
        assert!(!p.after(period, 0.9), "busy, after two idle minutes");
        assert!(!p.after(period, 0.9), "still busy");
        assert!(
            p.after(period, 0.01),
            "the first quiet period after a burst"
        );
        for _ in 0..5 {
            assert!(!p.after(period, 0.01), "quiet again: trimmed already");
        }
        assert!(
            p.after(period, 0.01),
            "the follow-up, 3 s of quiet periods after the first trim"
        );
        for _ in 0..10 {
            assert!(!p.after(period, 0.01), "idle: nothing more to hand back");
        }
        let mut trims = 0;
        for _ in 0..(120 * 2) {
            trims += u32::from(p.after(period, 0.9));
        }
        assert_eq!(trims, 2, "two minutes of steady load trim twice");
    }

    #[test]
    fn the_process_cpu_time_advances_with_work() {
        let before = cpu_time().expect("getrusage works here");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cpu_time().unwrap() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "10 s of spinning used no CPU time"
            );
            std::hint::spin_loop();
        }
    }
}
