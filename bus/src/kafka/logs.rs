//! librdkafka's own log lines and client errors, as `tracing` events of target `librdkafka`.
//!
//! rdkafka's default context writes them to the `log` crate, which this process does not
//! listen to, so a broker that refused connections, a cluster that went away or an idempotent
//! producer that hit a fatal error was never reported. The producer's and the consumers'
//! contexts forward them here instead. (The short-lived admin client that creates the topics
//! is left as it is: rdkafka never serves the queue its lines go to, and its errors come back
//! as the calls' results.) librdkafka's `debug` property (`bus.properties`) adds its debug
//! lines, shown with `RUST_LOG=librdkafka=debug`.

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// The most detailed of librdkafka's levels that this process shows (librdkafka filters by it
/// itself; rdkafka would ask the `log` crate, which says nothing is shown).
pub(super) fn level() -> RDKafkaLogLevel {
    if tracing::enabled!(target: "librdkafka", tracing::Level::DEBUG) {
        RDKafkaLogLevel::Debug
    } else if tracing::enabled!(target: "librdkafka", tracing::Level::INFO) {
        RDKafkaLogLevel::Info
    } else {
        RDKafkaLogLevel::Warning
    }
}

/// One of librdkafka's log lines: `facility` is its subsystem (`FAIL`, `REQTMOUT`, ...).
pub(super) fn line(level: RDKafkaLogLevel, facility: &str, message: &str) {
    use RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        Notice | Info => tracing::info!(target: "librdkafka", facility, "{message}"),
        Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

/// A client-level error librdkafka reports (all brokers down, a fatal producer error, ...).
pub(super) fn error(error: KafkaError, reason: &str) {
    tracing::error!(target: "librdkafka", %error, "{reason}");
}
