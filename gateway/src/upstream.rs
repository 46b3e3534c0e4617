//! Upstreams: their targets (round robin), the request target each forwarded request gets, and
//! new connections. Idle connections are kept per worker (`conn::Pool`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use tokio::net::TcpStream;

use crate::conn::Side;

/// One upstream target: `http://host:port[/base]`, numbered across all upstreams so that a
/// worker's pool can index its idle connections by it.
pub struct Target {
    pub id: usize,
    /// `host:port`: connected to, and sent as `Host`.
    pub authority: Bytes,
    /// The target's own path without its trailing slash (usually empty).
    base: String,
}

/// One upstream: its targets (round robin) and timeout.
pub struct Upstream {
    targets: Vec<Target>,
    next: AtomicU64,
    pub timeout: Duration,
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
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Upstream {
            targets,
            next: AtomicU64::new(0),
            timeout: Duration::from_millis(config.timeout_ms),
        })
    }

    /// How many targets this upstream has.
    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// The next target, round robin.
    pub fn pick(&self) -> &Target {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.targets.len();
        &self.targets[i]
    }
}

impl Target {
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
                targets: vec![t.into()],
                timeout_ms: 1000,
            },
            0,
        )
        .unwrap();
        let target = up.pick();
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
                targets: vec!["http://a:1".into(), "http://b:2".into()],
                timeout_ms: 1000,
            },
            5,
        )
        .unwrap();
        let ids: Vec<usize> = (0..4).map(|_| up.pick().id).collect();
        assert_eq!(ids, [5, 6, 5, 6]);
        assert!(
            Upstream::new(
                &crate::config::UpstreamConfig {
                    targets: vec!["https://a:1".into()],
                    timeout_ms: 1
                },
                0
            )
            .is_err()
        );
    }
}
