//! Upstreams: their targets, how a request's target is chosen (round robin, or the less busy
//! of two: least request), the load shedding of `max_in_flight`, passive outlier ejection, the
//! request target each forwarded request gets, and new connections. Idle connections are kept
//! per worker (`conn::Pool`).
//!
//! Passive outlier ejection: a target that refuses [`EJECT_AFTER`] connections in a row (or
//! closes new ones without answering) sits out [`EJECT_FOR`], unless every target of its
//! upstream is out, in which case they are all tried as usual. Active health checks
//! ([`Upstream::check_health`], `health_check` in the configuration) take a target out while it
//! fails them, on the same terms.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use tokio::net::TcpStream;

use crate::config::Balance;
use crate::conn::Side;

/// Failures in a row that eject a target.
pub const EJECT_AFTER: u32 = 5;
/// How long an ejected target sits out.
pub const EJECT_FOR: Duration = Duration::from_secs(10);

/// Milliseconds since the first call: a cheap shared clock for ejection deadlines.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One upstream target: `http://host:port[/base]`, numbered across all upstreams so that a
/// worker's pool can index its idle connections by it.
pub struct Target {
    pub id: usize,
    /// `host:port`: connected to, and sent as `Host`.
    pub authority: Bytes,
    /// The target's own path without its trailing slash (usually empty).
    base: String,
    /// Requests this gateway has in flight to the target (least request).
    in_flight: AtomicU64,
    /// Connection failures in a row.
    failures: AtomicU32,
    /// Until when (`now_ms`) the target is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    /// Whether the target passes its active health checks (always, without them).
    healthy: std::sync::atomic::AtomicBool,
}

/// One upstream: its targets, how they are chosen, and its limit.
pub struct Upstream {
    targets: Vec<Target>,
    next: AtomicU64,
    pub timeout: Duration,
    balance: Balance,
    max_in_flight: u64,
    in_flight: AtomicU64,
    /// Whether requests in flight are counted (a limit, or least request).
    counted: bool,
    health_check: Option<crate::config::HealthCheck>,
    /// Retry budget in thousandths of a retry: each request adds `retry_share`, a retry takes
    /// 1,000; at most `RETRY_BUDGET_MAX` saved (a burst of retries after a quiet spell).
    retry_budget: AtomicU64,
    /// `retry_budget_percent` × 10; 0: no retries.
    retry_share: u64,
    /// `retry_on_status`.
    retry_on_status: Vec<u16>,
    /// `try_timeout_ms`.
    pub try_timeout: Option<Duration>,
}

/// The most retries a quiet upstream saves up, in thousandths.
const RETRY_BUDGET_MAX: u64 = 10_000;

/// A request in flight to an upstream (and, once chosen, to one of its targets): counted
/// until dropped.
pub struct InFlight<'u> {
    /// `None` when the upstream does not count its requests.
    upstream: Option<&'u Upstream>,
    target: Option<&'u Target>,
}

impl<'u> InFlight<'u> {
    /// Counts the request against `target` too (least request).
    pub fn on(&mut self, target: &'u Target) {
        if self.upstream.is_none() {
            return;
        }
        if let Some(old) = self.target.replace(target) {
            old.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        target.in_flight.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(u) = self.upstream {
            u.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(t) = self.target {
            t.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Upstream {
    /// Targets were validated with the configuration (`http://host:port[/base]`); they are
    /// numbered from `first_id`.
    pub fn new(
        config: &crate::config::UpstreamConfig,
        first_id: usize,
    ) -> Result<Upstream, String> {
        let targets = config
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let uri: Uri = t
                    .parse()
                    .map_err(|e| format!("upstream target `{t}` is not a URL: {e}"))?;
                if uri.scheme_str() != Some("http") {
                    return Err(format!("upstream target `{t}` must be http://host:port"));
                }
                let Some(authority) = uri.authority() else {
                    return Err(format!("upstream target `{t}` must be http://host:port"));
                };
                Ok(Target {
                    id: first_id + i,
                    authority: Bytes::copy_from_slice(authority.as_str().as_bytes()),
                    base: uri.path().trim_end_matches('/').to_string(),
                    in_flight: AtomicU64::new(0),
                    failures: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                    healthy: std::sync::atomic::AtomicBool::new(true),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Upstream {
            targets,
            next: AtomicU64::new(0),
            timeout: Duration::from_millis(config.timeout_ms),
            balance: config.balance,
            max_in_flight: config.max_in_flight.unwrap_or(u64::MAX),
            in_flight: AtomicU64::new(0),
            counted: config.max_in_flight.is_some()
                || config.balance == Balance::LeastRequest
                || config.retry_budget_percent.is_some(),
            health_check: config.health_check.clone(),
            retry_budget: AtomicU64::new(0),
            retry_share: u64::from(config.retry_budget_percent.unwrap_or(0).min(100)) * 10,
            retry_on_status: config.retry_on_status.clone(),
            try_timeout: config.try_timeout_ms.map(Duration::from_millis),
        })
    }

    /// How many targets this upstream has.
    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// A place for one more request, unless `max_in_flight` are already in flight. Requests
    /// are counted only when something reads the counts (a limit, or least request): the
    /// counters are shared by every worker thread, and an uncounted request touches none.
    pub fn admit(&self) -> Option<InFlight<'_>> {
        if !self.counted {
            return Some(InFlight {
                upstream: None,
                target: None,
            });
        }
        if self.retry_share > 0 {
            let _ = self
                .retry_budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some((b + self.retry_share).min(RETRY_BUDGET_MAX))
                });
        }
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight {
            upstream: Some(self),
            target: None,
        })
    }

    /// Whether an answer with `status` is retried (`retry_on_status`).
    pub fn retries_status(&self, status: http::StatusCode) -> bool {
        self.retry_on_status.contains(&status.as_u16())
    }

    /// Whether a retry fits in the budget (and takes its share of it).
    pub fn may_retry(&self) -> bool {
        self.retry_share > 0
            && self
                .retry_budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    b.checked_sub(1_000)
                })
                .is_ok()
    }

    /// The target for the next request, leaving out `not` (a target that just failed) and
    /// ejected targets while any other is left.
    pub fn pick(&self, not: Option<usize>) -> &Target {
        let usable =
            |t: &Target| Some(t.id) != not && t.healthy.load(Ordering::Relaxed) && !t.ejected();
        let n = self.targets.len();
        match self.balance {
            Balance::RoundRobin => {
                for _ in 0..n {
                    let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % n;
                    if usable(&self.targets[i]) {
                        return &self.targets[i];
                    }
                }
            }
            Balance::LeastRequest => {
                let candidates: [usize; 2] = if n <= 1 {
                    [0, 0]
                } else {
                    let a = rand::random_range(0..n);
                    let b = (a + 1 + rand::random_range(0..n - 1)) % n;
                    [a, b]
                };
                let load = |i: usize| self.targets[i].in_flight.load(Ordering::Relaxed);
                let [a, b] = candidates;
                let (first, second) = if load(b) < load(a) { (b, a) } else { (a, b) };
                for i in [first, second] {
                    if usable(&self.targets[i]) {
                        return &self.targets[i];
                    }
                }
                if let Some(t) = self.targets.iter().find(|t| usable(t)) {
                    return t;
                }
            }
        }
        // Nothing usable: every target is out (or the only one just failed). Try them anyway.
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % n;
        &self.targets[i]
    }
}

impl Upstream {
    /// Checks every target's health every `interval_ms` until `shutdown`, when the upstream
    /// has `health_check` (returns at once otherwise).
    pub async fn check_health(
        self: std::sync::Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let Some(check) = self.health_check.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_millis(check.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Passes (positive) or failures (negative) in a row, per target.
        let mut streak = vec![0i64; self.targets.len()];
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            for (t, streak) in self.targets.iter().zip(streak.iter_mut()) {
                let timeout = Duration::from_millis(check.timeout_ms);
                let probed = tokio::time::timeout(timeout, t.probe(&check.path)).await;
                let passed = matches!(probed, Ok(Ok(s)) if (200..300).contains(&s));
                *streak = match (passed, *streak > 0) {
                    (true, true) => *streak + 1,
                    (true, false) => 1,
                    (false, true) => -1,
                    (false, false) => *streak - 1,
                };
                let healthy = t.healthy.load(Ordering::Relaxed);
                let authority = String::from_utf8_lossy(&t.authority);
                if healthy && -*streak >= i64::from(check.unhealthy_after) {
                    t.healthy.store(false, Ordering::Relaxed);
                    tracing::warn!(upstream_target = %authority, path = %check.path, "upstream target failed its health checks; taken out");
                } else if !healthy && *streak >= i64::from(check.healthy_after) {
                    t.healthy.store(true, Ordering::Relaxed);
                    tracing::info!(upstream_target = %authority, "upstream target passes its health checks again");
                }
            }
        }
    }
}

impl Target {
    /// One health check: `GET path` on a new connection; the answer's status.
    async fn probe(&self, path: &str) -> std::io::Result<u16> {
        let mut side = self.connect(Duration::from_secs(5)).await?;
        let mut req = Vec::with_capacity(128);
        req.extend_from_slice(b"GET ");
        req.extend_from_slice(self.base.as_bytes());
        req.extend_from_slice(path.as_bytes());
        req.extend_from_slice(b" HTTP/1.1\r\n");
        crate::h1::put_field(&mut req, b"host", &self.authority);
        crate::h1::put_field(&mut req, b"user-agent", b"tollgate-health-check");
        crate::h1::put_field(&mut req, b"connection", b"close");
        req.extend_from_slice(b"\r\n");
        side.write(&req).await?;
        loop {
            match crate::h1::parse_response(&mut side.buf, &http::Method::GET) {
                Ok(crate::h1::Parsed::Head(head)) => return Ok(head.status.as_u16()),
                Ok(crate::h1::Parsed::Partial) => {}
                Err(why) => return Err(std::io::Error::other(why)),
            }
            if side.read_more().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Whether the target sits out an ejection. The clock is read only while one is set: a
    /// target that was never ejected (or whose ejection ran out) costs one atomic load.
    fn ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if until > now_ms() {
            return true;
        }
        let _ = self
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    /// A connection that worked: the failures in a row start again.
    pub fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A connection that failed; the `EJECT_AFTER`th in a row ejects the target.
    pub fn failed(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= EJECT_AFTER {
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_until
                .store(now_ms() + EJECT_FOR.as_millis() as u64, Ordering::Relaxed);
            tracing::warn!(
                upstream_target = %String::from_utf8_lossy(&self.authority),
                seconds = EJECT_FOR.as_secs(),
                "upstream target failed {EJECT_AFTER} connections in a row; ejected"
            );
        }
    }

    /// A new connection to this target, with Nagle's algorithm off; `io` bounds each of its
    /// body reads and writes.
    pub async fn connect(&self, io: Duration) -> std::io::Result<Side> {
        let authority = std::str::from_utf8(&self.authority).map_err(std::io::Error::other)?;
        let stream = TcpStream::connect(authority).await?;
        stream.set_nodelay(true)?;
        Ok(Side::new(stream, io))
    }

    /// Appends the request target the upstream receives: the target's base path, then the
    /// request's path with `strip_prefix` removed (an emptied path becomes `/`), then its query.
    pub fn put_path(&self, out: &mut Vec<u8>, strip_prefix: Option<&str>, uri: &Uri) {
        let path = uri.path();
        let path = match strip_prefix.and_then(|p| path.strip_prefix(p)) {
            Some("") => "/",
            Some(rest) => rest,
            None => path,
        };
        out.extend_from_slice(self.base.as_bytes());
        if !path.starts_with('/') {
            out.push(b'/');
        }
        out.extend_from_slice(path.as_bytes());
        if let Some(q) = uri.query() {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(t: &str, strip: Option<&str>, uri: &str) -> String {
        let up = Upstream::new(
            &crate::config::UpstreamConfig {
                timeout_ms: 1000,
                ..crate::config::UpstreamConfig::targets(vec![t.into()])
            },
            0,
        )
        .unwrap();
        let target = up.pick(None);
        let mut out = b"http://".to_vec();
        out.extend_from_slice(&target.authority);
        target.put_path(&mut out, strip, &uri.parse().unwrap());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_forwarded_target_keeps_path_and_query_and_applies_base_and_prefix() {
        let t = "http://10.0.0.1:9000";
        assert_eq!(
            rewritten(t, None, "/v1/orders/42?x=1&y"),
            "http://10.0.0.1:9000/v1/orders/42?x=1&y"
        );
        assert_eq!(
            rewritten(t, Some("/api"), "/api/v2/items?q=a"),
            "http://10.0.0.1:9000/v2/items?q=a"
        );
        assert_eq!(
            rewritten(t, Some("/api"), "/api"),
            "http://10.0.0.1:9000/",
            "an emptied path becomes /"
        );
        assert_eq!(
            rewritten(t, Some("/api"), "/other?q"),
            "http://10.0.0.1:9000/other?q",
            "a prefix that does not match is left alone"
        );
        assert_eq!(
            rewritten("http://h:1/base/", None, "/x?y=1"),
            "http://h:1/base/x?y=1"
        );
        assert_eq!(
            rewritten("http://h:1/base", Some("/api"), "/api/x"),
            "http://h:1/base/x"
        );
        assert_eq!(
            rewritten(t, None, "http://client.example/abs?z"),
            "http://10.0.0.1:9000/abs?z",
            "an absolute-form target is sent in origin form"
        );
    }

    #[test]
    fn targets_are_numbered_and_used_round_robin() {
        let up = Upstream::new(
            &crate::config::UpstreamConfig {
                timeout_ms: 1000,
                ..crate::config::UpstreamConfig::targets(vec![
                    "http://a:1".into(),
                    "http://b:2".into(),
                ])
            },
            5,
        )
        .unwrap();
        let ids: Vec<usize> = (0..4).map(|_| up.pick(None).id).collect();
        assert_eq!(ids, [5, 6, 5, 6]);
        assert!(
            Upstream::new(
                &crate::config::UpstreamConfig {
                    timeout_ms: 1,
                    ..crate::config::UpstreamConfig::targets(vec!["https://a:1".into()])
                },
                0
            )
            .is_err()
        );
    }

    fn upstream(targets: usize, balance: Balance) -> Upstream {
        Upstream::new(
            &crate::config::UpstreamConfig {
                targets: (0..targets).map(|i| format!("http://t{i}:80")).collect(),
                timeout_ms: 1000,
                balance,
                max_in_flight: Some(2),
                retry_on_status: Vec::new(),
                try_timeout_ms: None,
                health_check: None,
                retry_budget_percent: None,
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn least_request_prefers_the_less_busy_of_two() {
        let up = upstream(2, Balance::LeastRequest);
        let mut busy = up.admit().unwrap();
        busy.on(&up.targets[0]);
        assert!(
            (0..50).all(|_| up.pick(None).id == 1),
            "two targets: always the idle one"
        );
        drop(busy);
        let ids: std::collections::HashSet<usize> = (0..200).map(|_| up.pick(None).id).collect();
        assert_eq!(ids.len(), 2, "equal load: both are used");
    }

    #[test]
    fn admission_stops_at_max_in_flight_and_frees_on_drop() {
        let up = upstream(1, Balance::RoundRobin);
        let a = up.admit().unwrap();
        let b = up.admit().unwrap();
        assert!(up.admit().is_none());
        drop(a);
        assert!(up.admit().is_some());
        drop(b);
    }

    #[test]
    fn a_target_failing_in_a_row_is_ejected_while_another_is_usable() {
        let up = upstream(2, Balance::RoundRobin);
        for _ in 0..EJECT_AFTER - 1 {
            up.targets[0].failed();
        }
        up.targets[0].succeeded();
        up.targets[0].failed();
        assert!(
            (0..4).any(|_| up.pick(None).id == 0),
            "not in a row: still used"
        );
        for _ in 0..EJECT_AFTER {
            up.targets[0].failed();
        }
        assert!((0..10).all(|_| up.pick(None).id == 1), "ejected");
        up.targets[1]
            .ejected_until
            .store(u64::MAX, Ordering::Relaxed);
        assert!(
            (0..4).any(|_| up.pick(None).id == 0),
            "all out: tried anyway"
        );
        assert_eq!(
            up.pick(Some(0)).id,
            1,
            "the one that just failed is left out when possible"
        );
    }
}
