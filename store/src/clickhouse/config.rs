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
            .finish()
    }
}

impl ClickHouseConfig {
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
        };
        assert!(c.validate().unwrap_err().contains("store.database"));
        c.database = "tollgate_1".into();
        c.validate().unwrap();
        c.url = "h:8123".into();
        assert!(c.validate().unwrap_err().contains("store.url"));
    }
}
