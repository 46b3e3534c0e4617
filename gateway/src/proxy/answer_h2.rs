//! The phases' ends for an HTTP/2 stream (`http2.rs`): the stream's request as a head, the
//! upstream's HTTP/1.1 answer turned into HTTP/2 HEADERS and DATA, and the gateway's own
//! answers. Everything in between (routing, authentication, limits, the upstream call, the
//! event) is the same code as for HTTP/1.1.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use h2::Reason;
use http::header::{CONTENT_LENGTH, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

use super::answer::{classify, own_answer, rejection_fields};
use super::{Client, Ctx, REQUEST_ID, Rejection, Worker};
use crate::conn::{self, After, Side};
use crate::h1::{self, Entry, Framing, Known, Parsed, RequestHead, ResponseHead};
use crate::http2::{self, Answering};
use crate::upstream::Target;

/// An HTTP/1.1 response head as HTTP/2 HEADERS: hop-by-hop fields dropped (RFC 9113 §8.2.2),
/// names lowercased, `content-length` from the framing (or the upstream's own, with
/// `own_length`: HEAD, 204, 304).
fn h2_head(resp: &ResponseHead, own_length: bool) -> http::Response<()> {
    let mut out = http::Response::new(());
    *out.status_mut() = resp.status;
    let headers = out.headers_mut();
    for Entry { known, name, value } in resp.fields.entries() {
        let pass = match known {
            Known::ContentLength => own_length,
            Known::RequestId => false,
            _ => !resp.fields.entry_is_hop_by_hop(known, name),
        };
        if !pass {
            continue;
        }
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    if let Framing::Length(n) = resp.framing {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    }
    out
}

impl Ctx<'_> {
    fn put_request_id_h2(&self, response: &mut http::Response<()>) {
        if let Some(v) = self.with_request_id(|id| HeaderValue::from_bytes(id).ok()) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(REQUEST_ID), v);
        }
    }
}

/// Sends one of the gateway's own answers, written as HTTP/1.1 bytes by `own_answer`, on a
/// stream.
async fn send_own(answer: &Answering, bytes: &[u8]) {
    let mut buf = BytesMut::from(bytes);
    let Ok(Parsed::Head(head)) = h1::parse_response(&mut buf, &Method::GET) else {
        answer.respond().send_reset(Reason::INTERNAL_ERROR);
        return;
    };
    let body = buf.freeze();
    let sent = answer
        .respond()
        .send_response(h2_head(&head, false), body.is_empty());
    match sent {
        Ok(mut send) => {
            if http2::send_data(&mut send, body, true).await.is_err() {
                answer.conduct.abandoned();
            }
        }
        Err(_) => answer.conduct.abandoned(),
    }
}

impl Worker {
    /// Serves one HTTP/2 stream whose HEADERS arrived at `started`. A client that resets the
    /// stream ends the exchange at once (the upstream call is dropped), and counts against its
    /// connection (`http2::Conduct`).
    pub(crate) async fn exchange_h2(
        &self,
        mut body: h2::RecvStream,
        answer: Answering,
        parts: http::request::Parts,
        started: Instant,
        peer: SocketAddr,
        shutdown: &CancellationToken,
    ) {
        let mut out = Vec::with_capacity(1024);
        let head = match http2::request_head(&parts, body.is_end_stream()) {
            Ok(head) => head,
            Err(refusal) => {
                own_answer(
                    &mut out,
                    refusal.status,
                    "bad_request",
                    refusal.message,
                    false,
                    |_| {},
                );
                return send_own(&answer, &out).await;
            }
        };
        let mut ctx = self.begin(&head, started);
        let mut client = Client::H2 {
            body: &mut body,
            answer: &answer,
        };
        let result = tokio::select! {
            biased;
            r = self.proxy(
                &mut ctx,
                &mut client,
                &head,
                peer,
                &mut out,
                shutdown,
                None,
            ) => Some(r),
            _ = answer.reset() => None,
        };
        match result {
            Some(Ok(_)) => {}
            Some(Err(r)) => self.reject_h2(&mut ctx, &answer, r, &mut out).await,
            None => {
                answer.conduct.abandoned();
                if ctx.event.status == 0 {
                    // As for an HTTP/1.1 client that goes away before its answer.
                    ctx.event.status = StatusCode::BAD_REQUEST.as_u16();
                    ctx.event.outcome = tollgate_schemas::Outcome::BadRequest;
                }
                ctx.event.billable = false;
            }
        }
    }

    /// Phase 6 on a stream: the upstream's answer as HEADERS, its body as DATA frames as the
    /// client's flow control allows. A client that resets the stream meanwhile counts against
    /// its connection (`http2::Conduct`); an upstream that breaks off mid-body resets the
    /// stream (`INTERNAL_ERROR`), so the client cannot take a cut body for a whole one.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn respond_h2(
        &self,
        ctx: &mut Ctx<'_>,
        answer: &Answering,
        head: &RequestHead,
        resp: ResponseHead,
        mut up: Side,
        target: &Target,
        out: &mut Vec<u8>,
    ) -> After {
        ctx.event.status = resp.status.as_u16();
        (ctx.event.outcome, ctx.event.billable) = classify(resp.status);
        let own_length = head.method == Method::HEAD
            || resp.status == StatusCode::NO_CONTENT
            || resp.status == StatusCode::NOT_MODIFIED;
        let mut response = h2_head(&resp, own_length);
        ctx.put_request_id_h2(&mut response);
        let end = resp.framing == Framing::Empty;
        let sent = answer.respond().send_response(response, end);
        let mut send = match sent {
            Ok(send) => send,
            Err(_) => {
                answer.conduct.abandoned();
                return After::Close;
            }
        };
        if end {
            if resp.keep_alive {
                self.pool.put(target.id, up, ctx.start);
            }
            return After::KeepAlive;
        }
        out.clear();
        let copied = conn::copy_body(
            &mut up,
            resp.framing,
            &mut http2::Body { send: &mut send },
            false,
            out,
            &mut ctx.resp_bytes,
            u64::MAX,
        )
        .await;
        out.clear();
        match copied {
            Ok(()) => {
                if http2::send_data(&mut send, Bytes::new(), true)
                    .await
                    .is_err()
                {
                    answer.conduct.abandoned();
                }
                if resp.keep_alive {
                    self.pool.put(target.id, up, ctx.start);
                }
            }
            Err(conn::Broken::Write) => answer.conduct.abandoned(),
            Err(_) => send.send_reset(Reason::INTERNAL_ERROR),
        }
        After::KeepAlive
    }

    /// The gateway's own answer to a rejected stream (see `reject` for HTTP/1.1).
    async fn reject_h2(
        &self,
        ctx: &mut Ctx<'_>,
        answer: &Answering,
        r: Rejection,
        out: &mut Vec<u8>,
    ) {
        ctx.event.status = r.status.as_u16();
        ctx.event.outcome = r.outcome;
        ctx.event.billable = false;
        out.clear();
        ctx.resp_bytes = own_answer(
            out,
            r.status,
            r.outcome.as_str(),
            &r.message,
            false,
            |out| rejection_fields(ctx, &r, out),
        );
        send_own(answer, out).await;
    }
}
