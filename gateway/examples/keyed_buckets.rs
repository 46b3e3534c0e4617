//! Memory of the per-route rate-limit buckets (`routes[].rate_limit`) with many distinct
//! consumers: how much one bucket costs while it is held, and what is left once the buckets
//! have refilled and the minute's eviction ran. Buckets are keyed by the position of an
//! authenticated consumer, so only configured consumers can make one (unauthenticated traffic
//! makes none); this measures the worst case, every consumer active on one route at once.
//!
//! `cargo run --release -p tollgate-gateway --example keyed_buckets -- [CONSUMERS]`

use std::time::{Duration, Instant};

use tollgate_gateway::config::{RouteAuth, RouteConfig};
use tollgate_gateway::limits::RouteLimits;
use tollgate_schemas::config::RateLimit;

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let consumers: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let route = RouteConfig {
        id: "search".into(),
        methods: vec![],
        hosts: vec![],
        path: "/search".into(),
        upstream: "app".into(),
        strip_prefix: None,
        auth: RouteAuth::All(true),
        // Refills in 50 ms, so that the eviction below finds every bucket full again.
        rate_limit: Some(RateLimit {
            per_second: 100,
            burst: Some(5),
        }),
        timeout_ms: None,
    };
    let limits = RouteLimits::new(std::slice::from_ref(&route));
    let before = rss_kib();
    let start = Instant::now();
    for consumer in 0..consumers as usize {
        assert!(limits.check(0, consumer).is_ok());
    }
    let filled = start.elapsed();
    let held = rss_kib();
    println!(
        "{consumers} consumers on one route: {} buckets, RSS +{} KiB ({:.0} bytes a bucket), {:.0} ns a first check",
        limits.len(),
        held.saturating_sub(before),
        (held.saturating_sub(before) * 1024) as f64 / f64::from(consumers),
        filled.as_nanos() as f64 / f64::from(consumers),
    );
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    limits.evict_idle();
    println!(
        "after refill and eviction ({:?}): {} buckets, RSS +{} KiB over the start",
        start.elapsed(),
        limits.len(),
        rss_kib().saturating_sub(before),
    );
}
