//! The process's allocator settings, applied first thing in `main`.
//!
//! glibc's malloc gives each thread that meets contention its own arena, up to eight per core,
//! and memory freed into one arena is not reused by another. The store's work runs on tokio's
//! blocking threads (flushes, compaction, Parquet and DataFusion), so a process that ingests
//! and compacts at full speed spread its allocations over many arenas and held about twice the
//! memory it used: 442 MiB peak RSS for ten million events through `tollgate up`, 206 MiB with
//! arenas limited to two on the two-core reference machine (BENCHMARKS.md). So the arenas are
//! limited to the number of cores (at least 2, at most 8), which keeps one arena per busy
//! worker thread, in the processes that hold a store (`up`, `collector`, `query-api`).
//! `MALLOC_ARENA_MAX` in the environment still wins (glibc reads it before `main`; this does
//! not override a value set there).

/// Limits glibc's malloc arenas (see the module docs). A no-op on other C libraries.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = cores.clamp(2, 8) as libc::c_int;
        // SAFETY: `mallopt` only sets a tuning parameter of glibc's allocator; it is called
        // before this process starts any thread, and M_ARENA_MAX takes any positive count.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}
