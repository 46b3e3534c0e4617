//! The configuration file: one YAML document whose sections each part reads. Loading parses
//! (errors name the key and line), applies `TOLLGATE_SECTION__KEY` environment overrides (errors
//! name the variable), then validates without I/O (errors name the key).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;
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
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Config::parse(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses YAML text (`origin` names it in errors), applies overrides from `env`, validates.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .location()
                .map(|l| format!(" (line {})", l.line()))
                .unwrap_or_default();
            ConfigError(format!(
                "{origin}: `{path}`{line}: {}",
                strip_location(&inner.to_string())
            ))
        })?;
        let overrides: Vec<(String, String)> = env
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
            .collect();
        let config = if overrides.is_empty() {
            config
        } else {
            apply_overrides(&config, &overrides)?
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

/// serde_yaml_ng appends "at line X column Y"; we print the line ourselves.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn apply_overrides(config: &Config, overrides: &[(String, String)]) -> Result<Config, ConfigError> {
    let mut root = serde_yaml_ng::to_value(config).map_err(|e| ConfigError(e.to_string()))?;
    for (var, raw) in overrides {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        let value: Value =
            serde_yaml_ng::from_str(raw).unwrap_or_else(|_| Value::String(raw.clone()));
        let mut node = &mut root;
        for (i, key) in path.iter().enumerate() {
            let Value::Mapping(map) = node else {
                return Err(ConfigError(format!(
                    "{var}: `{}` is not a section",
                    path[..i].join(".")
                )));
            };
            let k = Value::String(key.clone());
            if i + 1 == path.len() {
                map.insert(k, value.clone());
                break;
            }
            node = map
                .entry(k)
                .or_insert_with(|| Value::Mapping(Default::default()));
        }
    }
    serde_path_to_error::deserialize(root).map_err(|e| {
        let path = e.path().to_string();
        ConfigError(format!(
            "environment override: `{path}`: {}",
            e.into_inner()
        ))
    })
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
