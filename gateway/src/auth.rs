//! API-key authentication of the request path: the consumer key table of
//! `tollgate_schemas::keys` (sha256, constant-time, no early exit), granting an identity.

use std::collections::HashMap;
use std::sync::Arc;

use tollgate_schemas::config::Consumer;
use tollgate_schemas::keys;

/// An authenticated consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub consumer: Arc<str>,
    /// Shared by every consumer of the plan.
    pub plan: Arc<str>,
    /// The consumer's position in the configuration: what per-consumer state is indexed by.
    pub index: usize,
}

/// Every consumer key, granting that consumer's identity.
pub struct KeyTable {
    keys: keys::KeyTable<Identity>,
}

impl KeyTable {
    /// Builds the table; consumers were validated with the configuration.
    pub fn new(consumers: &[Consumer]) -> Result<KeyTable, String> {
        let mut plans: HashMap<&str, Arc<str>> = HashMap::new();
        for c in consumers {
            plans
                .entry(&c.plan)
                .or_insert_with(|| c.plan.as_str().into());
        }
        let keys = keys::KeyTable::for_consumers(consumers, |index, c| Identity {
            consumer: c.id.as_str().into(),
            plan: plans[c.plan.as_str()].clone(),
            index,
        })?;
        Ok(KeyTable { keys })
    }

    /// The consumer owning `key`, if any.
    pub fn authenticate(&self, key: &[u8]) -> Option<Identity> {
        self.keys.find(key).cloned()
    }
}

pub use keys::hash_key;

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
        assert_eq!(t.authenticate(b"k-zeta").unwrap().index, 1);
        assert!(t.authenticate(b"k-nobody").is_none());
        assert!(t.authenticate(b"").is_none());
    }
}
