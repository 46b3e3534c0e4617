//! Event emission off the request path: `try_send` into a bounded queue (a full queue drops the
//! event and counts it — the request never waits), and one task that drains the queue in batches
//! and publishes them to the bus, retrying transient failures with backoff.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tollgate_bus::{Publisher, Record};
use tollgate_schemas::RequestEvent;

use crate::metrics::GatewayMetrics;

/// The request path's handle: never blocks.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<RequestEvent>,
    metrics: GatewayMetrics,
}

impl EventSink {
    /// Queues an event, or drops and counts it when the queue is full.
    pub fn emit(&self, ev: RequestEvent) {
        if self.tx.try_send(ev).is_err() {
            self.metrics
                .events_dropped
                .get_or_create(&crate::metrics::DropLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }
}

/// Creates the queue. The returned future publishes until every `EventSink` is gone — that is,
/// until the server has drained its last request — so no event of a finishing request is lost.
pub fn channel(
    capacity: usize,
    batch_max: usize,
    bus: Arc<dyn Publisher>,
    metrics: GatewayMetrics,
) -> (EventSink, impl std::future::Future<Output = ()>) {
    let (tx, mut rx) = mpsc::channel::<RequestEvent>(capacity);
    let sink = EventSink {
        tx,
        metrics: metrics.clone(),
    };
    let task = async move {
        let mut buf = Vec::with_capacity(batch_max);
        loop {
            // Zero only once every sender is dropped and the queue is empty.
            if rx.recv_many(&mut buf, batch_max).await == 0 {
                break;
            }
            publish_with_retry(&*bus, &mut buf, &metrics).await;
        }
        // Backends that deliver in the background (Kafka) get a bounded time to finish.
        if let Err(e) = bus.flush(Duration::from_secs(30)).await {
            tracing::error!(error = %e, "events not delivered at shutdown");
        }
    };
    (sink, task)
}

async fn publish_with_retry(
    bus: &dyn Publisher,
    buf: &mut Vec<RequestEvent>,
    metrics: &GatewayMetrics,
) {
    let records: Vec<Record> = buf
        .drain(..)
        .map(|e| Record {
            key: Bytes::copy_from_slice(e.key().as_bytes()),
            payload: Bytes::from(e.to_json()),
        })
        .collect();
    let n = records.len() as u64;
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=5 {
        match bus.publish(records.clone()).await {
            Ok(()) => {
                metrics.events_published.inc_by(n);
                return;
            }
            Err(e) if e.retryable() && attempt < 5 => {
                tracing::warn!(error = %e, attempt, "bus publish failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                tracing::error!(error = %e, events = n, "bus publish failed; events dropped");
                metrics
                    .events_dropped
                    .get_or_create(&crate::metrics::DropLabels {
                        reason: "bus_error",
                    })
                    .inc_by(n);
                return;
            }
        }
    }
}
