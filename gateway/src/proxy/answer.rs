//! Phase 6, the answers: the upstream's, streamed back to the client (or a WebSocket tunnel
//! once the upstream switched protocols), and the gateway's own JSON answer to a rejected
//! request. Each decides whether the client's connection serves another request.

use http::{Method, StatusCode};
use tokio_util::sync::CancellationToken;
use tollgate_schemas::Outcome;

use super::{BodyRead, Ctx, Rejection, Worker};
use crate::conn::{self, After, Side};
use crate::h1::{self, Entry, Framing, Known, RequestHead, ResponseHead, put_field};
use crate::upstream::Target;

thread_local! {
    /// This thread's `Date` value and the second it was made for.
    static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

/// Appends a `Date` field (RFC 9110 §6.6.1), formatted at most once a second per thread.
fn put_date(out: &mut Vec<u8>) {
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        put_field(out, b"date", text.as_bytes());
    });
}

/// Writes one of the gateway's own answers: a JSON error naming the problem. `fields` adds
/// header fields before the head ends.
pub fn own_answer(
    out: &mut Vec<u8>,
    status: StatusCode,
    code: &str,
    message: &str,
    close: bool,
    fields: impl FnOnce(&mut Vec<u8>),
) -> u64 {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    h1::put_status_line(out, status);
    put_field(out, b"content-type", b"application/json");
    h1::put_number_field(out, b"content-length", body.len() as u64);
    put_date(out);
    fields(out);
    if close {
        put_field(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    body.len() as u64
}

fn retry_after_secs(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// What an upstream's answer means for the event: its outcome, and whether it is billable
/// (every answer the upstream gave, except its server errors).
pub(super) fn classify(status: StatusCode) -> (Outcome, bool) {
    if status.is_server_error() {
        (Outcome::UpstreamError, false)
    } else {
        (Outcome::Ok, true)
    }
}

/// The header fields of a rejection: `Retry-After` and the `RateLimit-*` fields for limits,
/// `WWW-Authenticate` for a 401, and the request id once the request had one.
pub(super) fn rejection_fields(ctx: &Ctx<'_>, r: &Rejection, out: &mut Vec<u8>) {
    if let Some(over) = r.over {
        // RFC 9110 `Retry-After`, and the IETF draft's `RateLimit-*` fields.
        let reset = retry_after_secs(over.wait);
        for (name, n) in [
            (&b"retry-after"[..], reset),
            (b"ratelimit-limit", over.limit),
            (b"ratelimit-remaining", 0),
            (b"ratelimit-reset", reset),
        ] {
            h1::put_number_field(out, name, n);
        }
    }
    if let (None, Some(secs)) = (r.over, r.retry_after) {
        h1::put_number_field(out, b"retry-after", secs);
    }
    if r.status == StatusCode::UNAUTHORIZED {
        put_field(out, b"www-authenticate", b"Bearer realm=\"tollgate\"");
    }
    if ctx.has_request_id {
        ctx.put_request_id(out);
    }
}

impl Worker {
    /// Phase 6: the upstream's answer, streamed back with its outcome recorded. Its body keeps
    /// its length when it has one; otherwise it is sent chunked (or, to an HTTP/1.0 client,
    /// until the connection closes).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn respond(
        &self,
        ctx: &mut Ctx<'_>,
        client: &mut Side,
        head: &RequestHead,
        resp: ResponseHead,
        mut up: Side,
        target: &Target,
        out: &mut Vec<u8>,
        shutdown: &CancellationToken,
    ) -> After {
        ctx.event.status = resp.status.as_u16();
        (ctx.event.outcome, ctx.event.billable) = classify(resp.status);
        if resp.status == StatusCode::SWITCHING_PROTOCOLS {
            return self.tunnel(ctx, client, resp, up, out, shutdown).await;
        }
        let unframed = matches!(resp.framing, Framing::Chunked | Framing::Close);
        let chunked = unframed && !head.http10;
        let keep = head.keep_alive
            && ctx.body == BodyRead::Done
            && !(unframed && head.http10)
            && !shutdown.is_cancelled();
        // The answer to HEAD, 204 and 304 keep the upstream's own `Content-Length`.
        let own_length = head.method == Method::HEAD
            || resp.status == StatusCode::NO_CONTENT
            || resp.status == StatusCode::NOT_MODIFIED;
        out.clear();
        h1::put_status_line(out, resp.status);
        for Entry { known, name, value } in resp.fields.entries() {
            let keep = match known {
                Known::ContentLength => own_length,
                Known::RequestId => false,
                _ => !resp.fields.entry_is_hop_by_hop(known, name),
            };
            if keep {
                put_field(out, name, value);
            }
        }
        ctx.put_request_id(out);
        match resp.framing {
            Framing::Length(n) => {
                h1::put_number_field(out, b"content-length", n);
            }
            Framing::Empty if !own_length => put_field(out, b"content-length", b"0"),
            Framing::Chunked | Framing::Close if chunked => {
                put_field(out, b"transfer-encoding", b"chunked")
            }
            _ => {}
        }
        if !keep {
            put_field(out, b"connection", b"close");
        } else if head.http10 {
            put_field(out, b"connection", b"keep-alive");
        }
        out.extend_from_slice(b"\r\n");
        let copied = conn::copy_body(
            &mut up,
            resp.framing,
            &mut client.stream,
            chunked,
            out,
            &mut ctx.resp_bytes,
            u64::MAX,
        )
        .await;
        out.clear();
        match copied {
            Ok(()) => {
                if resp.keep_alive {
                    self.pool.put(target.id, up, ctx.start);
                }
                if keep { After::KeepAlive } else { After::Close }
            }
            Err(_) => After::Close,
        }
    }

    /// Phase 6 of a WebSocket handshake the upstream accepted: its 101 goes to the client, then
    /// bytes flow both ways until both sides have closed (or the gateway shuts down). The
    /// connection is metered as one event when it ends: its duration, and the bytes each way.
    /// No idle timeout applies: WebSocket connections are long-lived, and the application's
    /// own pings keep or end them.
    async fn tunnel(
        &self,
        ctx: &mut Ctx<'_>,
        client: &mut Side,
        resp: ResponseHead,
        mut up: Side,
        out: &mut Vec<u8>,
        shutdown: &CancellationToken,
    ) -> After {
        out.clear();
        h1::put_status_line(out, resp.status);
        for Entry { known, name, value } in resp.fields.entries() {
            if known != Known::RequestId && !resp.fields.entry_is_hop_by_hop(known, name) {
                put_field(out, name, value);
            }
        }
        ctx.put_request_id(out);
        put_field(out, b"connection", b"upgrade");
        put_field(out, b"upgrade", b"websocket");
        out.extend_from_slice(b"\r\n");
        // Frames that came with the handshake, either way.
        ctx.resp_bytes += up.buf.len() as u64;
        out.extend_from_slice(&up.buf);
        up.buf.clear();
        let written = client.write(out).await;
        out.clear();
        if written.is_err() {
            return After::Close;
        }
        if !client.buf.is_empty() {
            ctx.req_bytes += client.buf.len() as u64;
            if up.write(&client.buf).await.is_err() {
                return After::Close;
            }
            client.buf.clear();
        }
        let (mut sent, mut received) = (0u64, 0u64);
        {
            let (mut from_client, mut to_client) = tokio::io::split(&mut client.stream);
            let (mut from_up, mut to_up) = tokio::io::split(&mut up.stream);
            let both = async {
                tokio::try_join!(
                    conn::pump(&mut from_client, &mut to_up, &mut sent),
                    conn::pump(&mut from_up, &mut to_client, &mut received),
                )
            };
            tokio::select! {
                _ = both => {}
                _ = shutdown.cancelled() => {}
            }
        }
        ctx.req_bytes += sent;
        ctx.resp_bytes += received;
        After::Close
    }

    /// The gateway's own answer to a rejected request: JSON naming the problem. The connection
    /// stays open when the request's body was read, or is already buffered whole.
    pub(super) async fn reject(
        &self,
        ctx: &mut Ctx<'_>,
        client: &mut Side,
        head: &RequestHead,
        r: Rejection,
        out: &mut Vec<u8>,
        shutdown: &CancellationToken,
    ) -> After {
        ctx.event.status = r.status.as_u16();
        ctx.event.outcome = r.outcome;
        ctx.event.billable = false;
        let body_read = match ctx.body {
            BodyRead::Done => true,
            BodyRead::Partly => false,
            BodyRead::Untouched => conn::skip_buffered_body(client, head.framing),
        };
        let keep = head.keep_alive && body_read && !shutdown.is_cancelled();
        out.clear();
        let sent = own_answer(
            out,
            r.status,
            r.outcome.as_str(),
            &r.message,
            !keep,
            |out| {
                rejection_fields(ctx, &r, out);
                if keep && head.http10 {
                    put_field(out, b"connection", b"keep-alive");
                }
            },
        );
        ctx.resp_bytes = sent;
        let written = client.write(out).await;
        out.clear();
        match (written, keep, body_read) {
            (Err(_), _, _) => After::Close,
            (Ok(()), true, _) => After::KeepAlive,
            (Ok(()), false, true) => After::Close,
            (Ok(()), false, false) => After::Linger,
        }
    }
}
