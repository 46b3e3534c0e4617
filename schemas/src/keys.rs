//! API keys as the configuration stores them (`sha256:<hex>`), and how presented keys are found:
//! the key is hashed and its digest looked up in a hash map, one probe whatever the number of
//! keys (consumers' keys in `directory::Directory`, admin tokens in a [`KeyTable`]).
//!
//! Timing: the lookup's time may depend on the digest (which bucket, how many bytes match
//! before a difference), but the digest of a guess is something the guesser computes anyway,
//! and learning how close a guess's SHA-256 lands to a stored one says nothing about the key
//! (preimage resistance), so this leaks nothing a constant-time scan would hide. The scan it
//! replaces compared every stored hash on every request, which made authentication cost grow
//! with the number of consumers (440 requests/s with 100,000 keys).

use std::collections::HashMap;

use sha2::{Digest, Sha256};

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
    fn finds_a_secret_and_nothing_else() {
        let admin = KeyTable::from_secrets([("admin-token", ())]);
        assert!(admin.find(b"admin-token").is_some() && admin.find(b"admin").is_none());
        assert!(admin.find(b"").is_none());
        assert!(KeyTable::<()>::from_secrets([]).is_empty());
        assert_eq!(
            hash_key("k"),
            format!("sha256:{}", hex::encode(digest(b"k")))
        );
    }
}
