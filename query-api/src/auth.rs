//! Who is calling: an admin (sees everything) or a consumer (sees only its own data), and the
//! [`Scope`] every `/v1` handler takes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Query};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use tollgate_schemas::keys::KeyTable;

use crate::AppState;
use crate::error::ApiError;

/// Whose data one `/v1` request may see, from its bearer token and its `consumer` parameter:
/// `None` for an admin who did not narrow it, else one consumer (a partner's key sees only
/// itself, and naming another consumer is a 403). It is an extractor that every `/v1` handler
/// takes, so an endpoint cannot forget to apply it: a handler without it does not compile
/// against the filters, which take the scope's consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope(pub Option<String>);

impl FromRequestParts<Arc<AppState>> for Scope {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Scope, ApiError> {
        let caller = state.auth.caller(&parts.headers)?;
        // A query string that does not parse names no consumer here; the handler's own
        // parameter check refuses it.
        let asked = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
            .ok()
            .and_then(|Query(mut q)| q.remove("consumer"));
        caller.scope(asked.as_deref()).map(Scope)
    }
}

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Consumer(String),
}

impl Caller {
    /// The consumer filter to apply: a consumer may only ask for itself.
    pub fn scope(&self, asked: Option<&str>) -> Result<Option<String>, ApiError> {
        match (self, asked) {
            (Caller::Admin, a) => Ok(a.map(str::to_owned)),
            (Caller::Consumer(me), None) => Ok(Some(me.clone())),
            (Caller::Consumer(me), Some(a)) if a == me => Ok(Some(me.clone())),
            (Caller::Consumer(_), Some(_)) => Err(ApiError::Forbidden(
                "a consumer key sees only its own consumer's data".into(),
            )),
        }
    }
}

/// Checks bearer tokens in constant time against admin tokens and consumer key hashes.
pub struct Authenticator {
    admin: KeyTable<()>,
    /// The consumers, whose API keys are also their bearer tokens here.
    consumers: Arc<crate::Consumers>,
}

impl Authenticator {
    pub fn new(admin_tokens: &[String], consumers: Arc<crate::Consumers>) -> Authenticator {
        Authenticator {
            admin: KeyTable::from_secrets(admin_tokens.iter().map(|t| (t.as_str(), ()))),
            consumers,
        }
    }

    /// The caller, or 401. With no admin token configured, any caller but a partner presenting
    /// its own key is an admin.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let open = self.admin.is_empty();
        // No admin token configured: the API is open (loopback only), but a partner presenting
        // its own key still gets its own scope.
        let Some(token) = token else {
            return if open {
                Ok(Caller::Admin)
            } else {
                Err(ApiError::Unauthorized(
                    "missing `Authorization: Bearer <token>`",
                ))
            };
        };
        if self.admin.find(token.as_bytes()).is_some() {
            return Ok(Caller::Admin);
        }
        let consumers = self.consumers.get();
        match consumers.find_key(token.as_bytes()) {
            Some(i) => Ok(Caller::Consumer(consumers.id(i).to_owned())),
            None if open => Ok(Caller::Admin),
            None => Err(ApiError::Unauthorized("unknown token")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_schemas::directory::Directory;

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert(
                axum::http::header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        h
    }

    fn consumers() -> Arc<crate::Consumers> {
        let hash = tollgate_schemas::keys::hash_key("partner-key");
        let consumers = [tollgate_schemas::config::Consumer {
            id: "p".into(),
            plan: "x".into(),
            api_keys: vec![hash],
        }];
        Arc::new(crate::Consumers::new(Arc::new(
            Directory::new(&consumers).unwrap(),
        )))
    }

    #[test]
    fn admin_tokens_partner_keys_and_the_open_mode() {
        let closed = Authenticator::new(&["admin-token-123456".into()], consumers());
        assert_eq!(
            closed.caller(&headers(Some("admin-token-123456"))).unwrap(),
            Caller::Admin
        );
        assert_eq!(
            closed.caller(&headers(Some("partner-key"))).unwrap(),
            Caller::Consumer("p".into())
        );
        assert!(matches!(
            closed.caller(&headers(None)),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            closed.caller(&headers(Some("guess"))),
            Err(ApiError::Unauthorized(_))
        ));

        let open = Authenticator::new(&[], consumers());
        assert_eq!(open.caller(&headers(None)).unwrap(), Caller::Admin);
        assert_eq!(
            open.caller(&headers(Some("partner-key"))).unwrap(),
            Caller::Consumer("p".into())
        );
        assert_eq!(
            open.caller(&headers(Some("whatever"))).unwrap(),
            Caller::Admin
        );
    }

    #[test]
    fn a_partner_may_only_ask_for_itself() {
        let me = Caller::Consumer("p".into());
        assert_eq!(me.scope(None).unwrap(), Some("p".into()));
        assert_eq!(me.scope(Some("p")).unwrap(), Some("p".into()));
        assert!(matches!(me.scope(Some("q")), Err(ApiError::Forbidden(_))));
        assert_eq!(Caller::Admin.scope(None).unwrap(), None);
    }
}
