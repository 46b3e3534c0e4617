//! The `store:` section for `kind: clickhouse`. Credentials come from the file or, by the one
//! override rule, from `TOLLGATE_STORE__USER` / `TOLLGATE_STORE__PASSWORD`; `Debug` never shows
//! the password, so it cannot reach a log.

use serde::{Deserialize, Serialize};

/// Connection to a ClickHouse server.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP(S) endpoint, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    /// Database holding Tollgate's tables; created when missing.
    #[serde(default = "default_database")]
    pub database: String,
    /// User name (ClickHouse's `default` when unset).
    #[serde(default)]
    pub user: Option<String>,
    /// Password; prefer `TOLLGATE_STORE__PASSWORD` to writing it in the file.
    #[serde(default)]
    pub password: Option<String>,
    /// Compression of inserts and query answers on the wire: `auto` (the default), `lz4` or
    /// `none`. lz4 costs CPU on both ends and saves network, which pays off across a network
    /// and not on one host: `auto` is `none` when the URL's host is a loopback address or
    /// `localhost`, `lz4` otherwise (`clickhouse-client` decides the same way).
    #[serde(default)]
    pub compression: Compression,
}

/// See [`ClickHouseConfig::compression`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Auto,
    Lz4,
    None,
}

fn default_database() -> String {
    "tollgate".into()
}

impl std::fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("compression", &self.compression)
            .finish()
    }
}

impl ClickHouseConfig {
    /// `compression` with `auto` decided by the URL's host.
    pub fn wire_compression(&self) -> Compression {
        match self.compression {
            Compression::Auto if self.is_loopback() => Compression::None,
            Compression::Auto => Compression::Lz4,
            c => c,
        }
    }

    fn is_loopback(&self) -> bool {
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = match host_port.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host_port.split(':').next().unwrap_or_default(),
        };
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// Checks the section without I/O; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!(
                "store.url: `{}` is not an http:// or https:// URL of ClickHouse's HTTP interface",
                self.url
            ));
        }
        if self.url.starts_with("https://") {
            return Err(
                "store.url: https is not in this build (ClickHouse's TLS client is not compiled in); use http:// behind a TLS-terminating proxy".into(),
            );
        }
        let db = &self.database;
        if db.is_empty()
            || !db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            || db.as_bytes()[0].is_ascii_digit()
        {
            return Err(format!(
                "store.database: `{db}` is not a plain identifier (letters, digits, `_`)"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_password() {
        let c = ClickHouseConfig {
            url: "http://h:8123".into(),
            database: "tollgate".into(),
            user: Some("u".into()),
            password: Some("s3cret".into()),
            compression: Compression::Lz4,
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn database_must_be_an_identifier() {
        let mut c = ClickHouseConfig {
            url: "http://h:8123".into(),
            database: "x; DROP".into(),
            user: None,
            password: None,
            compression: Compression::None,
        };
        assert!(c.validate().unwrap_err().contains("store.database"));
        c.database = "tollgate_1".into();
        c.validate().unwrap();
        c.url = "h:8123".into();
        assert!(c.validate().unwrap_err().contains("store.url"));
    }

    #[test]
    fn auto_compression_is_off_on_loopback_only() {
        let mut c = ClickHouseConfig {
            url: String::new(),
            database: "tollgate".into(),
            user: None,
            password: None,
            compression: Compression::Auto,
        };
        for (url, want) in [
            ("http://127.0.0.1:8123", Compression::None),
            ("http://localhost:8123/", Compression::None),
            ("http://[::1]:8123", Compression::None),
            ("http://user@127.0.0.2", Compression::None),
            ("http://clickhouse:8123", Compression::Lz4),
            ("http://10.0.0.7:8123", Compression::Lz4),
            ("http://[2001:db8::1]:8123", Compression::Lz4),
            ("http://localhost.example.com", Compression::Lz4),
        ] {
            c.url = url.into();
            assert_eq!(c.wire_compression(), want, "{url}");
        }
        c.compression = Compression::Lz4;
        c.url = "http://127.0.0.1:8123".into();
        assert_eq!(c.wire_compression(), Compression::Lz4);
    }
}
