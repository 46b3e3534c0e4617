//! The configured consumers as one compact table, built once per process from the
//! `consumers:` section and shared (behind an `Arc`) by the parts that need them: the
//! gateway's API-key and JWT authentication, and the query API's bearer tokens, quota state,
//! reports and plans.
//!
//! Why one table: with 100,000 consumers, each part used to keep its own copy (the parsed list
//! of ids, plans and key hashes as text; a key map per part holding a whole identity per key).
//! Those copies were about 40 MB of a one-process deployment's heap. Here a consumer costs
//! its id's bytes, a plan number, a position in the by-id index, and one key-map slot per key:
//! about 70 bytes.
//!
//! The ids are one string, not one allocation each. The table is built right after the
//! configuration is read, when the heap is full of that reading's garbage: 100,000 small
//! allocations landed all over it, and once the garbage was freed they kept most of those
//! pages from being handed back to the system (a few live bytes per page).
//!
//! A consumer is known by its position in the configuration, which is what per-consumer
//! state elsewhere (rate-limit buckets, quota counts) is indexed by.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Consumer;
use crate::keys::{DigestMap, digest};

/// Consumers by position, by id and by key digest.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Directory {
    /// Every id, one after the other.
    ids: String,
    /// Where each id ends in `ids`.
    ends: Vec<u32>,
    /// Each consumer's plan, as a position in `plans`.
    plan_of: Vec<u32>,
    plans: Vec<Arc<str>>,
    /// Positions sorted by id: lookups by id are a binary search (rare: quota updates, reports).
    by_id: Vec<u32>,
    /// Key digests to positions: one probe per request whatever the number of keys (see
    /// `keys` for why this leaks nothing through timing).
    keys: DigestMap<u32>,
}

impl Directory {
    /// Builds the table. Errors name the problem: a malformed key hash, a key listed by two
    /// consumers (it would authenticate as whichever came last), an id listed twice.
    pub fn new(consumers: &[Consumer]) -> Result<Directory, String> {
        let n = consumers.len();
        if u32::try_from(n).is_err() {
            return Err(format!("more than {} consumers", u32::MAX));
        }
        let mut plan_index: HashMap<&str, u32> = HashMap::new();
        let mut plans: Vec<Arc<str>> = Vec::new();
        let keys = key_owners(consumers)?;
        let bytes: usize = consumers.iter().map(|c| c.id.len()).sum();
        if u32::try_from(bytes).is_err() {
            return Err(format!(
                "the consumers' ids add up to more than {} bytes",
                u32::MAX
            ));
        }
        let mut ids = String::with_capacity(bytes);
        let mut ends = Vec::with_capacity(n);
        let mut plan_of = Vec::with_capacity(n);
        for c in consumers {
            let plan = *plan_index.entry(&c.plan).or_insert_with(|| {
                plans.push(c.plan.as_str().into());
                (plans.len() - 1) as u32
            });
            ids.push_str(&c.id);
            ends.push(ids.len() as u32);
            plan_of.push(plan);
        }
        let mut d = Directory {
            ids,
            ends,
            plan_of,
            plans,
            by_id: (0..n as u32).collect(),
            keys,
        };
        let mut by_id = std::mem::take(&mut d.by_id);
        by_id.sort_unstable_by(|a, b| d.id(*a as usize).cmp(d.id(*b as usize)));
        if let Some(w) = by_id
            .windows(2)
            .find(|w| d.id(w[0] as usize) == d.id(w[1] as usize))
        {
            return Err(format!(
                "consumer `{}` is listed twice",
                d.id(w[0] as usize)
            ));
        }
        d.by_id = by_id;
        Ok(d)
    }

    /// How many consumers.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Whether any consumer has an API key.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The id of the consumer at `position` (panics past the end, like indexing).
    pub fn id(&self, position: usize) -> &str {
        let start = match position {
            0 => 0,
            p => self.ends[p - 1] as usize,
        };
        &self.ids[start..self.ends[position] as usize]
    }

    /// The id of the consumer at `position`, if there is one.
    pub fn get(&self, position: usize) -> Option<&str> {
        (position < self.len()).then(|| self.id(position))
    }

    /// The plan of the consumer at `position`.
    pub fn plan(&self, position: usize) -> &Arc<str> {
        &self.plans[self.plan_of[position] as usize]
    }

    /// The number of the plan of the consumer at `position` (its place in [`Directory::plans`]),
    /// if there is such a consumer.
    pub fn plan_number(&self, position: usize) -> Option<usize> {
        self.plan_of.get(position).map(|p| *p as usize)
    }

    /// The plans the consumers have, each once, by number.
    pub fn plans(&self) -> &[Arc<str>] {
        &self.plans
    }

    /// The position of consumer `id`.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.by_id
            .binary_search_by(|p| self.id(*p as usize).cmp(id))
            .ok()
            .map(|i| self.by_id[i] as usize)
    }

    /// The position of the consumer owning API key `key` (the key itself, not its hash).
    pub fn find_key(&self, key: &[u8]) -> Option<usize> {
        self.keys.get(&digest(key)).map(|p| *p as usize)
    }

    /// Every consumer's id and plan, in configuration order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Arc<str>)> {
        (0..self.len()).map(|i| (self.id(i), self.plan(i)))
    }
}

/// Every consumer's key digests, each to its owner's position. A key listed by two consumers
/// is an error: it would authenticate as whichever came last. (The configuration's validation
/// calls this alone.)
pub fn key_owners(consumers: &[Consumer]) -> Result<DigestMap<u32>, String> {
    let mut keys = DigestMap::with_capacity_and_hasher(
        consumers.iter().map(|c| c.api_keys.len()).sum(),
        Default::default(),
    );
    for (i, c) in consumers.iter().enumerate() {
        for h in c.key_hashes()? {
            if let Some(first) = keys.insert(h, i as u32) {
                return Err(format!(
                    "consumer `{}` lists a key that consumer `{}` lists too",
                    c.id, consumers[first as usize].id
                ));
            }
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::hash_key;

    fn consumer(id: &str, plan: &str, keys: &[&str]) -> Consumer {
        Consumer {
            id: id.into(),
            plan: plan.into(),
            api_keys: keys.iter().map(|k| hash_key(k)).collect(),
        }
    }

    #[test]
    fn finds_consumers_by_position_id_and_key() {
        let d = Directory::new(&[
            consumer("zeta", "free", &["k-zeta", "k-zeta-2"]),
            consumer("acme", "pro", &["k-acme"]),
            consumer("mid", "free", &[]),
        ])
        .unwrap();
        assert_eq!(d.len(), 3);
        assert!(d.has_keys());
        assert_eq!((d.id(0), &**d.plan(0)), ("zeta", "free"));
        assert_eq!((d.id(1), &**d.plan(1)), ("acme", "pro"));
        // Consumers of one plan share its name.
        assert!(Arc::ptr_eq(d.plan(0), d.plan(2)));
        assert_eq!(d.position("acme"), Some(1));
        assert_eq!(d.position("mid"), Some(2));
        assert_eq!(d.position("zeta"), Some(0));
        assert_eq!(d.position("nobody"), None);
        assert_eq!(d.find_key(b"k-zeta-2"), Some(0));
        assert_eq!(d.find_key(b"k-acme"), Some(1));
        assert_eq!(d.find_key(b"k-nobody"), None);
        assert_eq!(d.find_key(b""), None);
        let listed: Vec<(&str, &str)> = d.iter().map(|(i, p)| (i, &**p)).collect();
        assert_eq!(listed, [("zeta", "free"), ("acme", "pro"), ("mid", "free")]);
        assert!(
            !Directory::new(&[consumer("a", "p", &[])])
                .unwrap()
                .has_keys()
        );
    }

    #[test]
    fn refuses_a_key_of_two_consumers_and_an_id_listed_twice() {
        let err = Directory::new(&[consumer("acme", "p", &["k"]), consumer("zeta", "p", &["k"])])
            .unwrap_err();
        assert!(err.contains("`zeta`") && err.contains("`acme`"), "{err}");
        let err =
            Directory::new(&[consumer("acme", "p", &[]), consumer("acme", "q", &[])]).unwrap_err();
        assert!(err.contains("`acme` is listed twice"), "{err}");
        let bad = Consumer {
            api_keys: vec!["md5:00".into()],
            ..consumer("acme", "p", &[])
        };
        assert!(Directory::new(&[bad]).unwrap_err().contains("sha256:"));
    }

    #[test]
    fn finds_every_one_of_many_consumers() {
        let many: Vec<Consumer> = (0..1000)
            .map(|i| consumer(&format!("c{i}"), "p", &[&format!("key-{i}")]))
            .collect();
        let d = Directory::new(&many).unwrap();
        for i in 0..1000 {
            assert_eq!(d.position(&format!("c{i}")), Some(i));
            assert_eq!(d.find_key(format!("key-{i}").as_bytes()), Some(i));
        }
    }
}
