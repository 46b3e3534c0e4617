//! The configuration file: one YAML document whose sections each part reads. Loading parses
//! (errors name the key and line), applies `TOLLGATE_SECTION__KEY` environment overrides (errors
//! name the variable), then validates without I/O (errors name the key).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tollgate_bus::BusConfig;
use tollgate_collector::CollectorConfig;
use tollgate_gateway::GatewayConfig;
use tollgate_query_api::QueryApiConfig;
use tollgate_schemas::config::{Consumer, Plan, validate_consumers};
use tollgate_store::StoreConfig;

use crate::telemetry::TelemetryConfig;

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The data plane.
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// API consumers (partners), with sha256 hashes of their keys.
    #[serde(default)]
    pub consumers: Vec<Consumer>,
    /// Plans by name: rate limit, quota, pricing.
    #[serde(default)]
    pub plans: BTreeMap<String, Plan>,
    /// The event bus.
    #[serde(default)]
    pub bus: BusConfig,
    /// The analytics store.
    #[serde(default)]
    pub store: StoreConfig,
    /// Bus → store.
    #[serde(default)]
    pub collector: CollectorConfig,
    /// The query API and dashboards.
    #[serde(default)]
    pub query_api: QueryApiConfig,
    /// Logs and request spans.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// A configuration error; the message names the key (and line) or the variable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Prefix of environment overrides: `TOLLGATE_GATEWAY__LISTEN=0.0.0.0:8080`.
const ENV_PREFIX: &str = "TOLLGATE_";

impl Config {
    /// Reads, overrides from the environment, and validates `path`.
    ///
    /// The file is parsed as it is read: with 100,001 consumers its 11.8 MB of text beside the
    /// consumers being built were the largest part of start-up's peak (BENCHMARKS.md, "Many
    /// consumers"). Only an error reads it again, to quote the line.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let io_error = |e: std::io::Error| ConfigError(format!("{}: {e}", path.display()));
        let file = std::fs::File::open(path).map_err(io_error)?;
        let len = file.metadata().map_err(io_error)?.len();
        Config::parse_from(
            std::io::BufReader::new(file),
            usize::try_from(len).unwrap_or(usize::MAX),
            &path.display().to_string(),
            std::env::vars(),
            || std::fs::read_to_string(path).unwrap_or_default(),
        )
    }

    /// Parses YAML text (`origin` names it in errors), applies overrides from `env`, validates.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Config::parse_from(text.as_bytes(), text.len(), origin, env, || text.to_owned())
    }

    /// [`Config::parse`] of the `len` bytes `yaml` reads; `text` gives them again for an
    /// error's quote.
    ///
    /// The document is deserialized as it is parsed (serde-saphyr), never held as a tree of
    /// events first: with 100,001 consumers (an 11.8 MB file) the loader used before held 100 MB
    /// of events beside the text, and start-up peaked at 176 MB RSS for a process that then
    /// serves in under 64 MiB (BENCHMARKS.md, "Memory under load").
    fn parse_from(
        yaml: impl std::io::Read,
        len: usize,
        origin: &str,
        env: impl Iterator<Item = (String, String)>,
        text: impl FnOnce() -> String,
    ) -> Result<Config, ConfigError> {
        let mut path = None;
        let parsed = serde_saphyr::with_deserializer_from_reader_with_options(
            yaml,
            yaml_options(len),
            |de| {
                serde_path_to_error::deserialize(de).map_err(|e| {
                    path = Some(e.path().to_string());
                    e.into_inner()
                })
            },
        );
        let config: Config =
            parsed.map_err(|e| yaml_error(&text(), origin, path.as_deref(), &e))?;
        let overrides: Vec<(String, String)> = env
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
            .collect();
        let config = if overrides.is_empty() {
            config
        } else {
            apply_overrides(config, &overrides)?
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the whole configuration without I/O.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = |m: String| ConfigError(m);
        self.gateway.validate().map_err(e)?;
        validate_consumers(&self.consumers, &self.plans).map_err(e)?;
        self.collector.validate().map_err(e)?;
        self.bus.validate().map_err(e)?;
        self.store.validate().map_err(e)?;
        self.query_api.validate().map_err(e)?;
        self.telemetry.validate().map_err(e)?;
        for (name, plan) in &self.plans {
            if let Some(pricing) = &plan.pricing
                && (pricing.currency.len() != 3
                    || !pricing.currency.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err(e(format!(
                    "plans.{name}.pricing.currency: `{}` is not an ISO 4217 code like USD",
                    pricing.currency
                )));
            }
        }
        Ok(())
    }

    /// What is valid but probably not meant (logged at start-up, printed by `check-config`).
    pub fn warnings(&self) -> Vec<String> {
        let route_ids: Vec<&str> = self.gateway.routes.iter().map(|r| r.id.as_str()).collect();
        let mut out = Vec::new();
        for (name, plan) in &self.plans {
            let Some(pricing) = &plan.pricing else {
                continue;
            };
            for route in pricing.charges.keys() {
                if route != "default" && !route_ids.contains(&route.as_str()) {
                    out.push(format!(
                        "plans.{name}.pricing.charges.{route}: no route with id `{route}` in gateway.routes; this charge applies to nothing"
                    ));
                }
            }
        }
        out
    }

    /// Puts every data folder the configuration leaves unset under `data_dir`.
    pub fn resolve_paths(&mut self, data_dir: &Path) {
        let resolve = |p: &mut PathBuf, name: &str| {
            if p.as_os_str().is_empty() {
                *p = data_dir.join(name);
            }
        };
        if let BusConfig::Embedded(bus) = &mut self.bus {
            resolve(&mut bus.dir, "bus");
        }
        if let StoreConfig::Parquet(store) = &mut self.store {
            resolve(&mut store.dir, "store");
        }
        resolve(&mut self.collector.dead_letter_dir, "dead-letter");
        resolve(&mut self.gateway.state_dir, "gateway");
    }
}

/// How the configuration is parsed: no snippet in messages (the error names the key and line
/// itself), booleans only as `true` or `false` (as before: `yes` is not a boolean), and a
/// budget that admits any document of this length written out in full (100,001 consumers are a
/// million parser events) while still refusing one that expands aliases past it.
fn yaml_options(len: usize) -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = budget.max_events.max(len.saturating_mul(2));
    budget.max_nodes = budget.max_nodes.max(len);
    budget.max_total_scalar_bytes = budget.max_total_scalar_bytes.max(len);
    serde_saphyr::options! {
        budget: Some(budget),
        with_snippet: false,
        strict_booleans: true,
    }
}

/// The error of a document that did not parse into a [`Config`]: the origin, the key's `path`
/// (`serde_path_to_error`'s), the line, the message, and the line's text.
fn yaml_error(
    text: &str,
    origin: &str,
    path: Option<&str>,
    e: &serde_saphyr::Error,
) -> ConfigError {
    let path = match path {
        None | Some("?") => ".",
        Some(p) => p,
    };
    let message = yaml_message(e);
    let Some(line) = e.location().and_then(|l| usize::try_from(l.line()).ok()) else {
        return ConfigError(format!("{origin}: `{path}`: {message}"));
    };
    let source = text
        .lines()
        .nth(line.saturating_sub(1))
        .unwrap_or("")
        .trim();
    let source: String = source.chars().take(80).collect();
    ConfigError(format!(
        "{origin}: `{path}` (line {line}): {message}: `{source}`"
    ))
}

/// A YAML error's message in serde-saphyr's wording for users, without a location or a
/// snippet: the caller names the key and the line, and quotes the line.
fn yaml_message(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::MessageFormatter;
    serde_saphyr::UserMessageFormatter
        .format_message(e)
        .into_owned()
}

/// Applies `TOLLGATE_SECTION__KEY=value` overrides: the value is read as YAML (a number, a
/// boolean, a list), or else taken as a string.
///
/// The configuration goes through a JSON tree for this, without its consumers: a list no
/// override can address (`TOLLGATE_CONSUMERS__...` names no section), and a tree of 100,001 of
/// them took more memory than the process then serves with.
fn apply_overrides(
    mut config: Config,
    overrides: &[(String, String)],
) -> Result<Config, ConfigError> {
    let consumers = std::mem::take(&mut config.consumers);
    let mut root = serde_json::to_value(&config).map_err(|e| ConfigError(e.to_string()))?;
    for (var, raw) in overrides {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        let value: Value =
            serde_saphyr::from_str(raw).unwrap_or_else(|_| Value::String(raw.clone()));
        let mut node = &mut root;
        for (i, key) in path.iter().enumerate() {
            let Value::Object(map) = node else {
                return Err(ConfigError(format!(
                    "{var}: `{}` is not a section",
                    path[..i].join(".")
                )));
            };
            if i + 1 == path.len() {
                map.insert(key.clone(), value.clone());
                break;
            }
            node = map
                .entry(key.clone())
                .or_insert_with(|| Value::Object(Default::default()));
        }
    }
    let mut config: Config = serde_path_to_error::deserialize(root).map_err(|e| {
        let path = e.path().to_string();
        ConfigError(format!(
            "environment override: `{path}`: {}",
            e.into_inner()
        ))
    })?;
    config.consumers = consumers;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = include_str!("demo.yaml");

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::parse(
            text,
            "test.yaml",
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn the_demo_configuration_is_valid() {
        let c = parse(&DEMO.replace("DEMO_UPSTREAM", "127.0.0.1:9"), &[]).unwrap();
        assert_eq!(c.consumers.len(), 4);
        assert_eq!(c.gateway.routes.len(), 6);
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let err = parse("gateway:\n  listen: 127.0.0.1:1\n  lisen: 1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gateway") && err.contains("lisen") && err.contains("line 3"),
            "{err}"
        );
        let err = parse("plans:\n  p:\n    pricing: { currency: USD, charges: { default: { unit_price: 0.5 } } }\n", &[]).unwrap_err().to_string();
        assert!(
            err.contains("plans.p.pricing.charges.default.unit_price"),
            "{err}"
        );
        let err = parse("plans:\n  p:\n    pricing: { currency: USD, minimum: \"-1\", charges: { default: { unit_price: \"1\", included: 10 } } }\n", &[]).unwrap_err().to_string();
        assert!(err.contains("plans.p.pricing.minimum"), "{err}");
    }

    #[test]
    fn pin_workers_takes_its_three_words_and_names_itself_otherwise() {
        use tollgate_gateway::PinWorkers;
        let c = parse("gateway:\n  listen: 127.0.0.1:1\n", &[]).unwrap();
        assert_eq!(c.gateway.pin_workers, PinWorkers::Auto);
        for (word, want) in [
            ("auto", PinWorkers::Auto),
            ("always", PinWorkers::Always),
            ("never", PinWorkers::Never),
        ] {
            let c = parse(&format!("gateway:\n  pin_workers: {word}\n"), &[]).unwrap();
            assert_eq!(c.gateway.pin_workers, want);
            assert_eq!(want.as_str(), word, "the log spells it as the file does");
        }
        let err = parse("gateway:\n  pin_workers: yes\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("gateway.pin_workers"), "{err}");
    }

    #[test]
    fn io_uring_is_auto_unless_turned_off() {
        use tollgate_gateway::IoUringSetting;
        let c = parse("gateway:\n  listen: 127.0.0.1:1\n", &[]).unwrap();
        assert_eq!(c.gateway.io_uring, IoUringSetting::Auto);
        for (word, want) in [("auto", IoUringSetting::Auto), ("off", IoUringSetting::Off)] {
            let c = parse(&format!("gateway:\n  io_uring: {word}\n"), &[]).unwrap();
            assert_eq!(c.gateway.io_uring, want);
            assert_eq!(want.as_str(), word, "the log spells it as the file does");
        }
        let err = parse("gateway:\n  io_uring: on\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("gateway.io_uring"), "{err}");
    }

    #[test]
    fn a_file_is_read_as_it_is_parsed_and_its_errors_quote_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.yaml");
        let key = tollgate_schemas::keys::hash_key("k");
        std::fs::write(
            &path,
            format!(
                "consumers:\n  - {{ id: a, plan: p, api_keys: [\"{key}\"] }}\n  - {{ id: b, plan: p, api_keys: [\"{key}x\", \"{key}y\"] }}\nplans:\n  p: {{}}\n"
            ),
        )
        .unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("consumers"), "{err}");
        std::fs::write(
            &path,
            format!("consumers:\n  - {{ id: a, plan: p, api_keys: [\"{key}\"] }}\nplans:\n  p: {{}}\ncollector:\n  flush_interval_ms: soon\n"),
        )
        .unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{}: `collector.flush_interval_ms` (line 6)",
                path.display()
            )) && err.ends_with("`flush_interval_ms: soon`"),
            "{err}"
        );
        std::fs::write(
            &path,
            format!("consumers:\n  - {{ id: a, plan: p, api_keys: [\"{key}\"] }}\n  - {{ id: b, plan: p }}\nplans:\n  p: {{}}\n"),
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        // One key, a vector of one: not of the four a vector grown by pushing has room for.
        assert_eq!(
            (
                c.consumers[0].api_keys.len(),
                c.consumers[0].api_keys.capacity()
            ),
            (1, 1)
        );
        assert!(c.consumers[1].api_keys.is_empty());
        let err = Config::load(&dir.path().join("missing.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.yaml"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let text = DEMO.replace("DEMO_UPSTREAM", "127.0.0.1:9").replace(
            "upstream: shop, auth: false",
            "upstream: nowhere, auth: false",
        );
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("gateway.routes[5].upstream"), "{err}");
        let text = DEMO
            .replace("DEMO_UPSTREAM", "127.0.0.1:9")
            .replace("plan: free,", "plan: platinum,");
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("consumers[3].plan"), "{err}");
    }

    #[test]
    fn auth_chains_and_jwt_settings_are_checked() {
        let demo = DEMO.replace("DEMO_UPSTREAM", "127.0.0.1:9");
        let with = |auth: &str, route_auth: &str| {
            let text = demo
                .replace(
                    "  auth:\n    api_key: { header: x-api-key }\n",
                    &format!("  auth: {auth}\n"),
                )
                .replace(
                    "upstream: shop, auth: false",
                    &format!("upstream: shop, auth: {route_auth}"),
                );
            parse(&text, &[]).map(|_| ()).map_err(|e| e.to_string())
        };
        let jwt = |extra: &str| format!("{{ jwt: {{ issuer: i, audience: a{extra} }} }}");
        let key = ", keys: [ { alg: RS256, pem: x } ]";
        assert_eq!(with(&jwt(key), "[jwt, anonymous]"), Ok(()));
        let cases = [
            (jwt(key), "[]".to_string(), "gateway.routes[5].auth"),
            (
                "{}".to_string(),
                "[jwt]".to_string(),
                "needs a gateway.auth.jwt section",
            ),
            (jwt(key), "[jwt, nobody]".to_string(), "gateway"),
            (jwt(""), "true".to_string(), "needs `jwks_url` or `keys`"),
            (
                jwt(", jwks_url: \"ftp://idp/jwks\""),
                "true".to_string(),
                "must be https://host[:port]/path or http://host[:port]/path",
            ),
            (
                jwt(", keys: [ { alg: none, pem: x } ]"),
                "true".to_string(),
                "keys[0].alg",
            ),
            (
                jwt(", keys: [ { alg: HS256, secret: short } ]"),
                "true".to_string(),
                "at least 32 bytes",
            ),
            (
                jwt(", keys: [ { alg: RS256, secret: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx } ]"),
                "true".to_string(),
                "needs `pem`",
            ),
        ];
        for (auth, route, want) in cases {
            let err = with(&auth, &route).unwrap_err();
            assert!(err.contains(want), "{auth} / {route}: {err}");
        }
    }

    #[test]
    fn environment_overrides_follow_section_key() {
        let text = DEMO.replace("DEMO_UPSTREAM", "127.0.0.1:9");
        let c = parse(
            &text,
            &[
                ("TOLLGATE_GATEWAY__LISTEN", "127.0.0.1:18080"),
                ("TOLLGATE_COLLECTOR__LINGER_MS", "7"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.gateway.listen.port(), 18080);
        assert_eq!(c.collector.linger_ms, 7);
        let err = parse(&text, &[("TOLLGATE_GATEWAY__LISTEN", "not-an-address")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("gateway.listen"), "{err}");
    }

    /// A configuration of tens of thousands of consumers is read whole (past the parser's
    /// default budget of 250,000 nodes), and environment overrides keep its consumers.
    #[test]
    fn many_consumers_parse_and_survive_overrides() {
        let mut text = String::from("plans: { p: { quota: { requests: 10 } } }\nconsumers:\n");
        for i in 0..60_000 {
            text.push_str(&format!(
                "  - {{ id: c{i}, plan: p, api_keys: [\"sha256:{i:064x}\"] }}\n"
            ));
        }
        let c = parse(&text, &[("TOLLGATE_COLLECTOR__LINGER_MS", "7")]).unwrap();
        assert_eq!(c.collector.linger_ms, 7);
        assert_eq!(c.consumers.len(), 60_000);
        assert_eq!(c.consumers[59_999].id, "c59999");
        let err = parse(&text, &[("TOLLGATE_CONSUMERS__0", "x")]).unwrap_err();
        assert!(err.to_string().contains("not a section"), "{err}");
    }

    #[test]
    fn booleans_are_true_or_false() {
        let ok = parse("gateway: { trust_forwarded_for: true }\n", &[]).unwrap();
        assert!(ok.gateway.trust_forwarded_for);
        let err = parse("gateway: { trust_forwarded_for: yes }\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("gateway.trust_forwarded_for"), "{err}");
    }

    #[test]
    fn an_open_api_must_stay_on_loopback() {
        let err = parse("query_api: { listen: 0.0.0.0:9090 }\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("query_api.listen"), "{err}");
        assert!(
            parse(
                "query_api: { listen: 0.0.0.0:9090, admin_tokens: [\"0123456789abcdef0\"] }\n",
                &[]
            )
            .is_ok()
        );
    }
}
