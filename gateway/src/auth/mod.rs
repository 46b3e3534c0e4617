//! Authentication of the request path: a chain of authenticators per route
//! ([`Authenticators`]), each of which finds no credential, grants an [`Identity`] or refuses.
//! API keys are looked up in the consumer table (`tollgate_schemas::directory`, by the key's
//! sha256 digest); JWT bearer tokens are verified by `jwt` (the `jwt` cargo feature). A new
//! method is a new module and one [`AuthMethod`] variant.

use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use tollgate_schemas::directory::Directory;
use tollgate_schemas::keys;

use crate::config::{AuthMethod, GatewayConfig, RouteAuth};

#[cfg(feature = "jwt")]
pub mod jwt;

/// An authenticated consumer: a position in the consumer table it was found in (whose id
/// it reads from there; a request's identity costs no allocation).
#[derive(Clone)]
pub struct Identity {
    pub directory: Arc<Directory>,
    /// Shared by every consumer of the plan.
    pub plan: Arc<str>,
    /// The consumer's position in the configuration: what per-consumer state is indexed by.
    pub index: usize,
    /// The plan came from the caller's token (`gateway.auth.jwt.plan_claim`) and is not the
    /// consumer's configured one: its rate limit is kept apart (`limits::RateLimits`).
    pub claimed_plan: bool,
}

/// Where authenticators read a request's header fields: the gateway's parsed heads, and
/// `http::HeaderMap` (tests, other front ends).
pub trait Headers {
    /// The first value of field `name` (lowercase).
    fn header(&self, name: &str) -> Option<&[u8]>;
}

impl Headers for HeaderMap {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }
}

impl Headers for crate::h1::Fields {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.get(name)
    }
}

/// Every consumer key, granting that consumer's identity.
pub struct KeyTable {
    directory: Arc<Directory>,
}

impl KeyTable {
    pub fn new(directory: Arc<Directory>) -> KeyTable {
        KeyTable { directory }
    }

    /// The consumer owning `key`, if any.
    pub fn authenticate(&self, key: &[u8]) -> Option<Identity> {
        self.directory
            .find_key(key)
            .map(|i| Identity::configured(&self.directory, i))
    }
}

pub use keys::hash_key;

/// What one authenticator concluded about a request.
#[derive(Debug)]
pub enum Verdict {
    /// No credential of this kind was presented: the next link of the chain decides.
    Absent,
    Granted(Identity),
    /// A credential was presented and refused, with why (sent to the client).
    Denied(String),
}

/// The gateway's authenticators and each route's chain of them.
pub struct Authenticators {
    api_key: Option<(HeaderName, KeyTable)>,
    #[cfg(feature = "jwt")]
    jwt: Option<Arc<jwt::JwtAuth>>,
    /// By route position.
    chains: Vec<Vec<AuthMethod>>,
}

impl Identity {
    /// The identity of the consumer at `position` with its configured plan.
    pub fn configured(directory: &Arc<Directory>, position: usize) -> Identity {
        Identity {
            directory: directory.clone(),
            plan: directory.plan(position).clone(),
            index: position,
            claimed_plan: false,
        }
    }

    /// The consumer's id.
    pub fn consumer(&self) -> &str {
        self.directory.id(self.index)
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Identity) -> bool {
        self.consumer() == other.consumer()
            && self.plan == other.plan
            && self.index == other.index
            && self.claimed_plan == other.claimed_plan
    }
}

impl Eq for Identity {}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("consumer", &self.directory.get(self.index))
            .field("plan", &self.plan)
            .field("index", &self.index)
            .field("claimed_plan", &self.claimed_plan)
            .finish()
    }
}

impl Authenticators {
    /// Builds the authenticators `config` names (`api_key_header`: where API keys are read,
    /// when they are) and resolves each route's chain. Errors name the key.
    pub fn new(
        config: &GatewayConfig,
        directory: &Arc<Directory>,
        plans: &std::collections::BTreeMap<String, tollgate_schemas::config::Plan>,
        api_key_header: Option<HeaderName>,
        metrics: &crate::GatewayMetrics,
    ) -> Result<Authenticators, String> {
        let api_key = api_key_header.map(|h| (h, KeyTable::new(directory.clone())));
        #[cfg(feature = "jwt")]
        let jwt = match &config.auth.jwt {
            Some(j) => Some(Arc::new(
                jwt::JwtAuth::new(j, directory.clone(), metrics.clone())?.with_plans(plans.keys()),
            )),
            None => None,
        };
        #[cfg(not(feature = "jwt"))]
        let _ = (metrics, plans);
        #[cfg(not(feature = "jwt"))]
        if config.auth.jwt.is_some() {
            return Err("gateway.auth.jwt: JWT verification is not in this build; rebuild with `--features jwt`".into());
        }
        let configured = |m: AuthMethod| match m {
            AuthMethod::ApiKey => api_key.is_some(),
            AuthMethod::Jwt => config.auth.jwt.is_some(),
            AuthMethod::Anonymous => true,
        };
        let mut chains = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            let chain = match &r.auth {
                RouteAuth::All(false) => vec![AuthMethod::Anonymous],
                RouteAuth::All(true) => {
                    let all: Vec<AuthMethod> = [AuthMethod::ApiKey, AuthMethod::Jwt]
                        .into_iter()
                        .filter(|m| configured(*m))
                        .collect();
                    // Nothing to check credentials against: the route is open, as before
                    // any method is configured.
                    if all.is_empty() {
                        vec![AuthMethod::Anonymous]
                    } else {
                        all
                    }
                }
                RouteAuth::Chain(list) => {
                    if let Some(m) = list.iter().find(|m| !configured(**m)) {
                        return Err(format!(
                            "gateway.routes[{i}].auth: `{m:?}` is not configured (see gateway.auth)"
                        ));
                    }
                    list.clone()
                }
            };
            chains.push(chain);
        }
        Ok(Authenticators {
            api_key,
            #[cfg(feature = "jwt")]
            jwt,
            chains,
        })
    }

    /// The header API keys are read from (removed before forwarding), if any.
    pub fn api_key_header(&self) -> Option<&HeaderName> {
        self.api_key.as_ref().map(|(h, _)| h)
    }

    /// The JWT authenticator, for its key refresh.
    #[cfg(feature = "jwt")]
    pub fn jwt(&self) -> Option<Arc<jwt::JwtAuth>> {
        self.jwt.clone()
    }

    /// Runs route `route`'s chain over the request headers: the caller's identity, `None` for
    /// an anonymous caller the chain admits, or why the caller is refused.
    pub async fn authenticate<H: Headers + Sync + ?Sized>(
        &self,
        route: usize,
        headers: &H,
    ) -> Result<Option<Identity>, String> {
        let chain = self.chains.get(route).map_or(&[][..], Vec::as_slice);
        for method in chain {
            let verdict = match method {
                AuthMethod::Anonymous => return Ok(None),
                AuthMethod::ApiKey => self.api_key_verdict(headers),
                AuthMethod::Jwt => self.jwt_verdict(headers).await,
            };
            match verdict {
                Verdict::Absent => continue,
                Verdict::Granted(id) => return Ok(Some(id)),
                Verdict::Denied(why) => return Err(why),
            }
        }
        Err(self.missing(chain))
    }

    fn api_key_verdict<H: Headers + ?Sized>(&self, headers: &H) -> Verdict {
        let Some((h, table)) = &self.api_key else {
            return Verdict::Absent;
        };
        match headers.header(h.as_str()) {
            None => Verdict::Absent,
            Some(v) => match table.authenticate(v) {
                Some(id) => Verdict::Granted(id),
                None => Verdict::Denied(format!("missing or unknown API key in header `{h}`")),
            },
        }
    }

    #[cfg(feature = "jwt")]
    async fn jwt_verdict<H: Headers + Sync + ?Sized>(&self, headers: &H) -> Verdict {
        match &self.jwt {
            Some(j) => j.verdict(headers).await,
            None => Verdict::Absent,
        }
    }

    #[cfg(not(feature = "jwt"))]
    async fn jwt_verdict<H: Headers + Sync + ?Sized>(&self, _headers: &H) -> Verdict {
        Verdict::Absent
    }

    /// Why a caller who presented none of the chain's credentials is refused.
    fn missing(&self, chain: &[AuthMethod]) -> String {
        if let ([AuthMethod::ApiKey], Some(h)) = (chain, self.api_key_header()) {
            return format!("missing or unknown API key in header `{h}`");
        }
        let wanted: Vec<String> = chain
            .iter()
            .filter_map(|m| match m {
                AuthMethod::ApiKey => self
                    .api_key_header()
                    .map(|h| format!("an API key in header `{h}`")),
                AuthMethod::Jwt => Some("a bearer token (`Authorization: Bearer`)".into()),
                AuthMethod::Anonymous => None,
            })
            .collect();
        if wanted.is_empty() {
            return "no authentication method is configured for this route".into();
        }
        format!("missing credentials: {}", wanted.join(" or "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_schemas::config::Consumer;

    #[test]
    fn finds_the_owner_of_a_key_and_nobody_else() {
        let consumers = vec![
            Consumer {
                id: "acme".into(),
                plan: "pro".into(),
                api_keys: vec![hash_key("k-acme")],
            },
            Consumer {
                id: "zeta".into(),
                plan: "free".into(),
                api_keys: vec![hash_key("k-zeta"), hash_key("k-zeta-2")],
            },
        ];
        let t = KeyTable::new(Arc::new(Directory::new(&consumers).unwrap()));
        assert_eq!(t.authenticate(b"k-acme").unwrap().consumer(), "acme");
        assert_eq!(&*t.authenticate(b"k-zeta-2").unwrap().plan, "free");
        assert_eq!(t.authenticate(b"k-zeta").unwrap().index, 1);
        assert!(t.authenticate(b"k-nobody").is_none());
        assert!(t.authenticate(b"").is_none());
    }
}
