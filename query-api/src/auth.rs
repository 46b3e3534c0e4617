//! Who is calling: an admin (sees everything) or a consumer (sees only its own data).

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tollgate_schemas::config::Consumer;

use crate::error::ApiError;

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
    admin: Vec<[u8; 32]>,
    keys: Vec<([u8; 32], String)>,
}

impl Authenticator {
    pub fn new(admin_tokens: &[String], consumers: &[Consumer]) -> Result<Authenticator, String> {
        let admin = admin_tokens
            .iter()
            .map(|t| Sha256::digest(t.as_bytes()).into())
            .collect();
        let mut keys = Vec::new();
        for c in consumers {
            for h in c.key_hashes()? {
                keys.push((h, c.id.clone()));
            }
        }
        Ok(Authenticator { admin, keys })
    }

    /// The caller, or 401. With no admin token configured, everyone is an admin.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        if self.admin.is_empty() {
            return Ok(Caller::Admin);
        }
        let Some(token) = token else {
            return Err(ApiError::Unauthorized(
                "missing `Authorization: Bearer <token>`",
            ));
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut admin = false;
        for a in &self.admin {
            admin |= bool::from(a.ct_eq(&digest));
        }
        if admin {
            return Ok(Caller::Admin);
        }
        let mut found = None;
        for (h, id) in &self.keys {
            if bool::from(h.ct_eq(&digest)) {
                found = Some(id);
            }
        }
        found
            .map(|c| Caller::Consumer(c.clone()))
            .ok_or(ApiError::Unauthorized("unknown token"))
    }
}
