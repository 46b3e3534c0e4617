//! Body wrappers that meter bytes: `CountingBody` for request bodies on their way upstream, and
//! `MeteredBody` for responses, which emits the request's event when the last byte has gone out
//! (or the client went away), so `latency_us` spans first byte in to last byte out.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use crate::recorder::{Draft, Measured, Recorder};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Counts the data bytes of a request body into a shared counter.
pub struct CountingBody {
    inner: hyper::body::Incoming,
    count: Arc<AtomicU64>,
}

impl CountingBody {
    pub fn new(inner: hyper::body::Incoming, count: Arc<AtomicU64>) -> CountingBody {
        CountingBody { inner, count }
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The event of a request in flight, completed when its response body ends.
pub struct Pending {
    pub event: Draft,
    pub start: Instant,
    pub req_bytes: Arc<AtomicU64>,
    /// The matched route's position in the configuration (`None`: no route matched).
    pub route: Option<usize>,
    pub recorder: Arc<Recorder>,
    /// The request's unit of quota: kept when the answer is billable, else given back.
    pub quota: Option<crate::limits::Reservation>,
}

impl Pending {
    fn finish(mut self, resp_bytes: u64) {
        if self.event.billable
            && let Some(r) = self.quota.take()
        {
            r.keep();
        }
        let measured = Measured {
            elapsed: self.start.elapsed(),
            req_bytes: self.req_bytes.load(Ordering::Relaxed),
            resp_bytes,
        };
        self.recorder.record(self.route, &self.event, measured);
    }
}

/// What a response carries: the upstream's body, or the gateway's own answer. An enum rather
/// than a boxed body: one allocation less per request.
enum Inner {
    Upstream(hyper::body::Incoming),
    Own(Full<Bytes>),
}

/// A response body that meters itself and emits the request's event at its end.
pub struct MeteredBody {
    inner: Inner,
    sent: u64,
    pending: Option<Pending>,
}

impl MeteredBody {
    /// The upstream's response body.
    pub fn upstream(inner: hyper::body::Incoming, pending: Pending) -> MeteredBody {
        MeteredBody {
            inner: Inner::Upstream(inner),
            sent: 0,
            pending: Some(pending),
        }
    }

    /// A body the gateway answers with itself.
    pub fn own(inner: Full<Bytes>, pending: Pending) -> MeteredBody {
        MeteredBody {
            inner: Inner::Own(inner),
            sent: 0,
            pending: Some(pending),
        }
    }

    fn finish(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(self.sent);
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match &mut self.inner {
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            Inner::Own(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if self.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Own(b) => b.size_hint(),
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        self.finish();
    }
}
