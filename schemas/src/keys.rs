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
use std::hash::{BuildHasher, Hasher};

use sha2::{Digest, Sha256};

/// Key digests to what they grant, hashed by [`DigestState`].
pub type DigestMap<V> = HashMap<[u8; 32], V, DigestState>;

/// Hashes a key digest by folding its bytes, eight at a time, with a seed of the map's own:
/// a SHA-256 digest is spread uniformly already, and a caller cannot insert into these maps
/// (they are built from the configuration), so there is no flooding for SipHash to resist.
/// SipHash over the 32 bytes was about 270 instructions of every authenticated request
/// (`callgrind`, BENCHMARKS.md, twenty-third round).
#[derive(Debug, Clone)]
pub struct DigestState(u64);

impl Default for DigestState {
    fn default() -> Self {
        DigestState(std::collections::hash_map::RandomState::new().hash_one(0u8))
    }
}

impl BuildHasher for DigestState {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(self.0)
    }
}

/// See [`DigestState`].
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(23) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

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
    keys: DigestMap<T>,
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

    #[test]
    fn a_digest_map_finds_each_of_many_digests_and_nothing_else() {
        let n = 20_000u32;
        let map: DigestMap<u32> = (0..n).map(|i| (digest(&i.to_le_bytes()), i)).collect();
        assert_eq!(map.len(), n as usize);
        for i in 0..n {
            assert_eq!(map.get(&digest(&i.to_le_bytes())), Some(&i));
        }
        for i in n..2 * n {
            assert_eq!(map.get(&digest(&i.to_le_bytes())), None);
        }
    }
}
