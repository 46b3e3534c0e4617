//! The contract every Tollgate part agrees on: the `RequestEvent` v1 record, its JSON codec, its
//! Arrow schema, and the consumer / plan / pricing model that the gateway enforces and the query
//! API prices with.
//!
//! `request_event.v1.schema.json` beside this crate is the source of truth; `tests/drift.rs`
//! fails when the Rust codec or the Arrow schema stops agreeing with it.

pub mod arrow;
mod canonical;
pub mod checkpoint;
pub mod config;
pub mod directory;
pub mod event;
pub mod fsutil;
pub mod keys;
pub mod quota;
pub mod sketch;

pub use canonical::put_decimal;
pub use checkpoint::Checkpoint;
pub use event::{Outcome, RequestEvent, RequestEventRef, SchemaError};

/// The JSON Schema of `RequestEvent` v1, as shipped (the source of truth).
pub const REQUEST_EVENT_V1_SCHEMA: &str = include_str!("../request_event.v1.schema.json");
