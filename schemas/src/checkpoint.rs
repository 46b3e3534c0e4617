//! A position in the event stream: per bus partition, the offset of the next record to consume.
//! The bus commits it; the store keeps it beside the data it made durable (exactly-once).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Per partition, the offset of the next record to consume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint(pub BTreeMap<u32, u64>);

impl Checkpoint {
    /// Advances past the record at `offset` of `partition` (never moves backwards).
    pub fn advance(&mut self, partition: u32, offset: u64) {
        let next = self.0.entry(partition).or_insert(0);
        *next = (*next).max(offset + 1);
    }

    /// The per-partition maximum of two checkpoints.
    pub fn max(&self, other: &Checkpoint) -> Checkpoint {
        let mut out = self.clone();
        for (p, o) in &other.0 {
            let e = out.0.entry(*p).or_insert(0);
            *e = (*e).max(*o);
        }
        out
    }
}
