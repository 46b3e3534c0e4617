//! API-key authentication: the presented key is hashed with sha256 and compared, in constant
//! time, against every configured hash (no early exit, so timing says nothing about which keys
//! exist).

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tollgate_schemas::config::Consumer;

/// An authenticated consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub consumer: Arc<str>,
    pub plan: Arc<str>,
}

/// All key hashes, each with its consumer.
pub struct KeyTable {
    keys: Vec<([u8; 32], Identity)>,
}

impl KeyTable {
    /// Builds the table; consumers were validated with the configuration.
    pub fn new(consumers: &[Consumer]) -> Result<KeyTable, String> {
        let mut keys = Vec::new();
        for c in consumers {
            let id = Identity {
                consumer: c.id.as_str().into(),
                plan: c.plan.as_str().into(),
            };
            for h in c.key_hashes()? {
                keys.push((h, id.clone()));
            }
        }
        Ok(KeyTable { keys })
    }

    /// The consumer owning `key`, if any.
    pub fn authenticate(&self, key: &[u8]) -> Option<Identity> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        let mut found: Option<&Identity> = None;
        for (hash, id) in &self.keys {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(id);
            }
        }
        found.cloned()
    }
}

/// `sha256:<hex>` of a key, as written in the configuration.
pub fn hash_key(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let t = KeyTable::new(&consumers).unwrap();
        assert_eq!(&*t.authenticate(b"k-acme").unwrap().consumer, "acme");
        assert_eq!(&*t.authenticate(b"k-zeta-2").unwrap().plan, "free");
        assert!(t.authenticate(b"k-nobody").is_none());
        assert!(t.authenticate(b"").is_none());
    }
}
