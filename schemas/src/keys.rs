//! API keys as the configuration stores them (`sha256:<hex>`), and the one lookup that both the
//! gateway (`x-api-key`) and the query API (bearer tokens) use: the presented key is hashed and
//! its digest looked up in a hash map, one probe whatever the number of keys.
//!
//! Timing: the lookup's time may depend on the digest (which bucket, how many bytes match
//! before a difference), but the digest of a guess is something the guesser computes anyway,
//! and learning how close a guess's SHA-256 lands to a stored one says nothing about the key
//! (preimage resistance), so this leaks nothing a constant-time scan would hide. The scan it
//! replaces compared every stored hash on every request, which made authentication cost grow
//! with the number of consumers (440 requests/s with 100,000 keys).

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::config::Consumer;

/// The sha256 digest of a key.
pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// `sha256:<hex>` of a key, as written in the `consumers:` section.
pub fn hash_key(key: &str) -> String {
    format!("sha256:{}", hex::encode(digest(key.as_bytes())))
}

/// Key digests, each with what it grants.
#[derive(Debug, Clone)]
pub struct KeyTable<T> {
    keys: HashMap<[u8; 32], T>,
}

impl<T> KeyTable<T> {
    /// A table of plain secrets (admin tokens, say), stored as their digests.
    pub fn from_secrets<'a>(secrets: impl IntoIterator<Item = (&'a str, T)>) -> KeyTable<T> {
        KeyTable {
            keys: secrets
                .into_iter()
                .map(|(s, v)| (digest(s.as_bytes()), v))
                .collect(),
        }
    }

    /// Every key of every consumer, granting `grant(position, consumer)`. A key listed twice is an error:
    /// it would authenticate as whichever consumer came last.
    pub fn for_consumers(
        consumers: &[Consumer],
        grant: impl Fn(usize, &Consumer) -> T,
    ) -> Result<KeyTable<T>, String>
    where
        T: Clone,
    {
        let mut keys = HashMap::new();
        let mut owner: HashMap<[u8; 32], &str> = HashMap::new();
        for (i, c) in consumers.iter().enumerate() {
            let value = grant(i, c);
            for h in c.key_hashes()? {
                if let Some(first) = owner.insert(h, &c.id) {
                    return Err(format!(
                        "consumer `{}` lists a key that consumer `{first}` lists too",
                        c.id
                    ));
                }
                keys.insert(h, value.clone());
            }
        }
        Ok(KeyTable { keys })
    }

    /// Whether the table holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// What `key` grants, if it is in the table.
    pub fn find(&self, key: &[u8]) -> Option<&T> {
        self.keys.get(&digest(key))
    }
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
        let t = KeyTable::for_consumers(&consumers, |_, c| c.id.clone()).unwrap();
        assert_eq!(t.find(b"k-acme").map(String::as_str), Some("acme"));
        assert_eq!(t.find(b"k-zeta-2").map(String::as_str), Some("zeta"));
        assert!(t.find(b"k-nobody").is_none());
        assert!(t.find(b"").is_none());
        let admin = KeyTable::from_secrets([("admin-token", ())]);
        assert!(admin.find(b"admin-token").is_some() && admin.find(b"admin").is_none());
        assert!(KeyTable::<()>::from_secrets([]).is_empty());
    }

    #[test]
    fn a_key_listed_for_two_consumers_is_refused() {
        let consumer = |id: &str, key: &str| Consumer {
            id: id.into(),
            plan: "pro".into(),
            api_keys: vec![hash_key(key)],
        };
        let both = [consumer("acme", "k-1"), consumer("zeta", "k-1")];
        let err = KeyTable::for_consumers(&both, |_, c| c.id.clone()).unwrap_err();
        assert!(err.contains("`zeta`") && err.contains("`acme`"), "{err}");
    }
}
