//! gRPC for proxy-wasm filters, over the host's callouts: the request head and
//! message framing and the status mapping shared by unary calls
//! (`proxy_grpc_call`) and streams, and the streams themselves
//! (`proxy_grpc_stream`, `_send`, `_close`, `_cancel`).
//!
//! A stream is an HTTP/2 callout whose request body is fed by the filter
//! ([`ChannelBody`]) and whose response is read as it arrives ([`drive`]): each
//! event (initial metadata, message, trailing metadata, close with a status) is
//! delivered to the VM by the filter (`ProxyWasmFilter::stream_event`) as
//! Envoy's `proxy_on_grpc_receive_initial_metadata` / `_receive` /
//! `_receive_trailing_metadata` / `proxy_on_grpc_close`. Streams belong to the
//! VM (its root context's task on the worker's `LocalSet`, as callouts from
//! ticks); the [`Stream`] handle in the store aborts the task when dropped, so
//! a cancelled stream, a deleted HTTP context's streams and a failed or
//! replaced VM's streams end at once.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderValue;
use http::HeaderMap;
use http_body::Frame;
use tokio::sync::{mpsc, oneshot};

use super::abi::status;
use super::state::PwState;
use crate::filter::{CalloutError, CalloutRequest, CalloutResult, CalloutSender};
use crate::stats::Gauge;

/// Streams one VM (plugin instance on a worker) may have open at once; one more
/// is `INTERNAL_FAILURE` (the Rust SDK returns it as `Err(InternalFailure)`).
pub const MAX_STREAMS_PER_INSTANCE: usize = 64;

/// Bytes a filter may have sent on one stream that the upstream has not taken
/// yet (HTTP/2 flow control); a send over it is `BAD_ARGUMENT`.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;

/// The largest message a stream receives; a larger one closes the stream with
/// 8 `RESOURCE_EXHAUSTED` (as a unary response over the callout cap).
pub const MAX_MESSAGE: usize = crate::wasm::host::CALLOUT_MAX_RESPONSE;

/// Streams closed by the server but not (yet) by the filter that the VM still
/// answers `OK` for (`proxy_grpc_close`/`_cancel`, as Envoy, whose SDK-side
/// wrappers unwrap); older ones are forgotten (their token is `NOT_FOUND`).
pub const MAX_REMOTE_CLOSED: usize = 256;

const UNKNOWN: u32 = 2;
const RESOURCE_EXHAUSTED: u32 = 8;
const INTERNAL: u32 = 13;
const UNAVAILABLE: u32 = 14;

/// A gRPC call's request head: the cluster, `/SERVICE/METHOD` and the headers
/// (`content-type: application/grpc`, `te: trailers`, `grpc-timeout` when
/// `timeout_ms` > 0, and the metadata). `upstream` is a granted cluster's name
/// or Envoy's serialized `GrpcService` naming one; anything wrong is
/// `PARSE_FAILURE`, Envoy's answer for an upstream it cannot use and the one
/// the Rust SDK returns as an error (it panics on `BAD_ARGUMENT` here).
pub fn request_head(
    s: &PwState,
    upstream: &[u8],
    service: &str,
    method: &str,
    metadata: &[(Vec<u8>, Vec<u8>)],
    timeout_ms: u32,
) -> Result<(String, String, HeaderMap), i32> {
    let cluster = cluster_of(upstream).ok_or(status::PARSE_FAILURE)?;
    if !s.meta.clusters.contains(&cluster) {
        tracing::warn!(
            plugin = &*s.meta.name,
            "a gRPC call to cluster `{cluster}`, which the plugin is not granted: add it \
             to the plugin's `capabilities.clusters`"
        );
        return Err(status::PARSE_FAILURE);
    }
    let path = format!("/{service}/{method}");
    if service.is_empty() || method.is_empty() || path.parse::<http::Uri>().is_err() {
        return Err(status::PARSE_FAILURE);
    }
    let mut headers = HeaderMap::new();
    for (k, v) in metadata {
        // Fields the host owns are dropped, as for `proxy_http_call`.
        match super::imports::callout_field(k, v).ok_or(status::PARSE_FAILURE)? {
            Some((name, value)) => {
                crate::wasm::host::put_field(&mut headers, name, value, false)
                    .map_err(|_| status::PARSE_FAILURE)?;
            }
            None => tracing::debug!(plugin = &*s.meta.name, "gRPC metadata dropped"),
        }
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    if timeout_ms > 0 {
        if let Ok(v) = HeaderValue::from_str(&format!("{timeout_ms}m")) {
            headers.insert("grpc-timeout", v);
        }
    }
    Ok((cluster, path, headers))
}

/// The cluster a gRPC call names: the bytes as a name, or the
/// `envoy_grpc.cluster_name` (field 1 of field 1) of a serialized `GrpcService`.
pub fn cluster_of(upstream: &[u8]) -> Option<String> {
    let name = match upstream {
        [0x0a, n, rest @ ..] if usize::from(*n) == rest.len() => match rest {
            [0x0a, m, name @ ..] if usize::from(*m) <= name.len() => &name[..usize::from(*m)],
            _ => return None,
        },
        _ => upstream,
    };
    let name = std::str::from_utf8(name).ok()?;
    crate::config::Name::new(name).ok().map(|n| n.to_string())
}

/// One message framed for the wire (uncompressed flag, big-endian length).
pub fn frame(message: &[u8]) -> Option<Bytes> {
    let len = u32::try_from(message.len()).ok()?;
    let mut out = BytesMut::with_capacity(message.len() + 5);
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    Some(out.freeze())
}

/// gRPC's HTTP-to-status mapping (doc/http-grpc-status-mapping.md), for an
/// answer that is not `200`.
pub fn http_status(code: http::StatusCode) -> (u32, String) {
    let c = legate_abi_rules::grpc::status_of_http(code.as_u16());
    (c, format!("HTTP status {}", code.as_u16()))
}

/// The status a callout that got no answer is reported with.
pub fn callout_error_status(e: CalloutError) -> (u32, String) {
    match e {
        CalloutError::Timeout => (4, "gRPC call timed out".into()),
        CalloutError::Unavailable => (UNAVAILABLE, "upstream unavailable".into()),
        CalloutError::LimitExceeded => (
            RESOURCE_EXHAUSTED,
            "gRPC response over the callout limit".into(),
        ),
    }
}

/// The `grpc-status` and (percent-decoded) `grpc-message` of trailers, or of
/// the head of a trailers-only answer; `UNKNOWN` when there is no valid status.
pub fn trailer_status(primary: &HeaderMap, fallback: Option<&HeaderMap>) -> (u32, String) {
    let field = |name: &str| {
        primary
            .get(name)
            .or_else(|| fallback.and_then(|h| h.get(name)))
            .and_then(|v| v.to_str().ok())
    };
    let code = match field("grpc-status").map(str::parse::<u32>) {
        Some(Ok(c)) => c,
        _ => return (UNKNOWN, "the answer has no valid grpc-status".into()),
    };
    // Percent-encoded (gRPC over HTTP/2, "Responses"); `+` is not a space.
    let message = field("grpc-message")
        .map(|m| {
            String::from_utf8_lossy(&crate::router::percent_decode_with(m, false)).into_owned()
        })
        .unwrap_or_default();
    (code, message)
}

/// The next whole message of `buf` (`Ok(None)`: not all there yet), or the
/// status that ends the stream (compressed, malformed or too large).
fn next_message(buf: &mut BytesMut) -> Result<Option<Bytes>, (u32, String)> {
    let Some(head) = buf.get(..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    match head[0] {
        0 => {}
        1 => {
            return Err((
                INTERNAL,
                "compressed gRPC responses are not supported".into(),
            ))
        }
        f => return Err((INTERNAL, format!("bad gRPC frame flag {f}"))),
    }
    if len > MAX_MESSAGE {
        return Err((
            RESOURCE_EXHAUSTED,
            format!("a gRPC message of {len} bytes is over the cap of {MAX_MESSAGE}"),
        ));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).freeze()))
}

/// The request body of a stream: the frames the filter sent, ending when it
/// half-closes (the sender is dropped).
pub struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => {
                self.queued.fetch_sub(b.len(), Relaxed);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A stream's handle in the VM's store. Dropping it aborts the stream's task
/// (the HTTP/2 stream is reset) and counts it closed.
pub struct Stream {
    /// The proxy-wasm context that opened it (root or HTTP).
    pub context: u32,
    /// The request body's sender; `None` once half-closed.
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    queued: Arc<AtomicUsize>,
    /// The task reading the response (set once spawned).
    pub task: Option<tokio::task::AbortHandle>,
    /// `proxy_grpc_close` was called.
    pub closed_by_guest: bool,
    /// `proxy_on_grpc_close` was delivered: no callbacks follow.
    pub remote_closed: bool,
    open: Gauge,
}

impl Stream {
    /// Marks the stream over for `legate_plugin_grpc_streams_open`, once.
    fn ended(&mut self) {
        if !self.remote_closed {
            self.remote_closed = true;
            self.open.dec();
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        self.ended();
    }
}

/// A stream opened during the current call, started by the filter after it
/// (the task needs the filter and the worker).
pub struct Pending {
    /// Its token.
    pub token: u32,
    /// The root context of the plugin that opened it (whose filter starts it
    /// and gets its events).
    pub root: u32,
    /// The request head (its body is `body`).
    pub req: CalloutRequest,
    /// The request body.
    pub body: ChannelBody,
}

/// `proxy_grpc_stream`: checks the upstream and the cap, registers the stream
/// for `context` and queues its start; its token.
pub fn open(
    s: &mut PwState,
    context: u32,
    upstream: &[u8],
    service: &str,
    method: &str,
    metadata: &[(Vec<u8>, Vec<u8>)],
) -> Result<u32, i32> {
    let (cluster, path, headers) = request_head(s, upstream, service, method, metadata, 0)?;
    let open = s.streams.values().filter(|st| !st.remote_closed).count();
    if open >= MAX_STREAMS_PER_INSTANCE {
        tracing::warn!(
            plugin = &*s.meta.name,
            "proxy_grpc_stream: {open} gRPC streams already open on this VM (the cap is \
             {MAX_STREAMS_PER_INSTANCE}); close or cancel some first"
        );
        return Err(status::INTERNAL_FAILURE);
    }
    let token = s.new_token();
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let req = CalloutRequest {
        id: u64::from(token),
        cluster,
        method: http::Method::POST,
        path,
        authority: None,
        headers,
        body: Bytes::new(),
        timeout: crate::wasm::host::CALLOUT_DEFAULT_TIMEOUT,
        max_response_body: MAX_MESSAGE,
    };
    s.meta.grpc_streams.inc();
    s.meta.grpc_streams_open.inc();
    s.streams.insert(
        token,
        Stream {
            context,
            tx: Some(tx),
            queued: queued.clone(),
            task: None,
            closed_by_guest: false,
            remote_closed: false,
            open: s.meta.grpc_streams_open.clone(),
        },
    );
    s.new_streams.push(Pending {
        token,
        root: s.root,
        req,
        body: ChannelBody { rx, queued },
    });
    Ok(token)
}

/// `proxy_grpc_send`: frames and queues `message` (an empty one too, as
/// Envoy); `end_stream` half-closes after it (use `proxy_grpc_close` to
/// half-close without sending).
/// As in Envoy, a stream that can no longer send (half-closed, or closed by the
/// server) takes the message as `OK` and drops it (the SDK's `Context` wrapper
/// unwraps the result). `NOT_FOUND` for an unknown token, `BAD_ARGUMENT` for a
/// unary call's token or over [`MAX_QUEUED_BYTES`] not yet sent.
pub fn send(s: &mut PwState, token: u32, message: &[u8], end_stream: bool) -> Result<(), i32> {
    let unary = s.grpc_calls.contains(&token);
    let name = s.meta.name.clone();
    let Some(st) = s.streams.get_mut(&token) else {
        return Err(if unary {
            status::BAD_ARGUMENT
        } else {
            status::NOT_FOUND
        });
    };
    let Some(tx) = &st.tx else {
        tracing::debug!(
            plugin = &*name,
            "proxy_grpc_send on gRPC stream {token}, already half-closed: dropped"
        );
        return Ok(());
    };
    // Always a message, even an empty one with `end_stream` (Envoy frames
    // whatever it is given).
    let framed = frame(message).ok_or(status::BAD_ARGUMENT)?;
    let queued = st.queued.load(Relaxed);
    if queued.saturating_add(framed.len()) > MAX_QUEUED_BYTES {
        tracing::warn!(
            plugin = &*name,
            "proxy_grpc_send: over {MAX_QUEUED_BYTES} bytes the upstream has not taken \
             yet on gRPC stream {token}"
        );
        return Err(status::BAD_ARGUMENT);
    }
    st.queued.fetch_add(framed.len(), Relaxed);
    // A closed receiver: the stream is over (its close is on its way).
    let _ = tx.send(framed);
    if end_stream {
        st.tx = None;
    }
    Ok(())
}

/// `proxy_grpc_close`: Envoy's local close: the request side ends (half-close)
/// and the callbacks go on until the server closes; a stream the server closed
/// already is forgotten. `NOT_FOUND` for an unknown token.
pub fn close(s: &mut PwState, token: u32) -> Result<(), i32> {
    let st = s.streams.get_mut(&token).ok_or(status::NOT_FOUND)?;
    st.tx = None;
    st.closed_by_guest = true;
    if st.remote_closed {
        forget(s, token);
    }
    Ok(())
}

/// Drops stream `token` (resetting it if it is still open). A context paused
/// with no stream left still waits: as in Envoy, another callback (a tick, a
/// queue event, a call's callback) may resume it, and its `limits.pause`
/// bounds the wait.
fn forget(s: &mut PwState, token: u32) -> Option<Stream> {
    let st = s.streams.remove(&token)?;
    if st.remote_closed {
        s.remote_closed.retain(|t| *t != token);
    }
    Some(st)
}

/// `proxy_grpc_cancel`: resets a stream, or cancels a unary call as Envoy
/// does: its callback never comes, and its request is aborted (an HTTP/2
/// stream is reset, an HTTP/1.1 connection closed). The abort needs the task
/// that runs the call: the calling context's own calls (its exchange's chain
/// aborts them after this call) and root-context calls; a call of another
/// context is only forgotten, its result dropped when it arrives. No callback
/// follows. `NOT_FOUND` for an unknown token.
pub fn cancel(s: &mut PwState, token: u32) -> Result<(), i32> {
    if s.grpc_calls.remove(&token) {
        let context = s.outstanding.remove(&token);
        if s.root_tasks.abort(&token).is_none() {
            if s.root_callouts
                .iter()
                .any(|(_, r)| r.id == u64::from(token))
            {
                // Queued in this call, not started yet.
                s.root_callouts.retain(|(_, r)| r.id != u64::from(token));
            } else if s.x_context != 0 && context == Some(s.x_context) {
                s.x.cancelled.push(u64::from(token));
            }
        }
        return Ok(());
    }
    match forget(s, token) {
        Some(_reset_on_drop) => Ok(()),
        None => Err(status::NOT_FOUND),
    }
}

/// The server closed stream `token` (`proxy_on_grpc_close` is being
/// delivered): forgotten if the filter closed it too, else remembered (within
/// [`MAX_REMOTE_CLOSED`]) so its `proxy_grpc_close` still answers `OK`.
pub fn remote_closed(s: &mut PwState, token: u32) {
    let Some(st) = s.streams.get_mut(&token) else {
        return;
    };
    st.ended();
    if st.closed_by_guest {
        s.streams.remove(&token);
        return;
    }
    s.remote_closed.push_back(token);
    while s.remote_closed.len() > MAX_REMOTE_CLOSED {
        if let Some(old) = s.remote_closed.pop_front() {
            if s.streams.get(&old).is_some_and(|st| st.remote_closed) {
                s.streams.remove(&old);
            }
        }
    }
}

/// Drops the streams context `context` opened (Envoy resets them when the
/// context is destroyed).
pub fn drop_context(streams: &mut rustc_hash::FxHashMap<u32, Stream>, context: u32) {
    streams.retain(|_, st| st.context != context);
}

/// An HTTP context paused (`Pause` from a headers callback, or at the end of
/// a message, the chain holding the exchange). As in Envoy, a callback of the
/// VM may then resume the exchange (`proxy_continue_stream`), answer it or
/// reset it: a callback of one of the context's gRPC streams (which may also
/// edit the head), or any other callback after
/// `proxy_set_effective_context` to this context (a root context's tick,
/// queue event or callout response; typically a filter that lets waiting
/// requests through at a rate). The events of the context's streams are
/// held here, and what other callbacks asked is kept in `PwState::pending_*`;
/// either wakes the chain to deliver them with the exchange
/// (`ProxyWasmFilter::stream_wake`). The wait is armed at every such pause,
/// so the chain holds the exchange (up to the plugin's `limits.pause`) even
/// with no call or stream outstanding, as Envoy does.
pub struct StreamWait {
    /// The wake-up's id in the chain (a token: unique among the VM's calls).
    pub id: u32,
    /// Fires the wake-up at the first held event or request.
    pub wake: Option<oneshot::Sender<CalloutResult>>,
    /// Events held for delivery, in arrival order, with their stream's token.
    pub held: VecDeque<(u32, Event)>,
}

/// The chain id of stream wake-up `token`: above every callout token, so a
/// delivery tells the two apart without a lookup.
pub const WAKE: u64 = 1 << 32;

/// Makes context `ctx`, which is pausing (or stays paused), wait: a wake-up
/// for the chain (on the exchange in the store) and a [`StreamWait`] that
/// holds its streams' events. Fired at once if events are held already.
pub fn arm_wait(s: &mut PwState, ctx: u32) {
    let id = s.new_token();
    let (tx, rx) = oneshot::channel();
    s.x.wakes.push((WAKE | u64::from(id), rx));
    // Events held for an earlier wait not delivered yet stay first.
    let held = s
        .stream_waits
        .remove(&ctx)
        .map(|w| w.held)
        .unwrap_or_default();
    let mut wait = StreamWait {
        id,
        wake: Some(tx),
        held,
    };
    let asked = (!s.pending_local.is_empty() && s.pending_local.contains_key(&ctx))
        || (!s.pending_close.is_empty() && s.pending_close.contains(&ctx))
        || (!s.pending_resume.is_empty() && s.pending_resume.contains_key(&ctx));
    if !wait.held.is_empty() || asked {
        wait.fire();
    }
    s.stream_waits.insert(ctx, wait);
}

impl StreamWait {
    /// Wakes the chain (once): held events, or what another callback asked
    /// of the context, are ready.
    pub fn fire(&mut self) {
        if let Some(tx) = self.wake.take() {
            // The result is not read (the id says it is a wake-up); the chain
            // being gone is no error.
            let _ = tx.send(Err(CalloutError::Unavailable));
        }
    }
}

/// What the server sent on a stream, in Envoy's order.
pub enum Event {
    /// The response head: its status (`None` for a trailers-only answer, whose
    /// head is empty) and fields.
    InitialMetadata(Option<http::StatusCode>, HeaderMap),
    /// One message.
    Message(Bytes),
    /// The trailers.
    TrailingMetadata(HeaderMap),
    /// The stream is over, with this status code and message.
    Close(u32, String),
}

/// Runs stream `p` on `sender` and hands each event to `deliver` as it comes,
/// the way Envoy's gRPC async client reports them: initial metadata first
/// (the head with `:status`; empty for a trailers-only answer), each message as it is complete, then the
/// trailing metadata and the close with `grpc-status`. A non-200 answer closes
/// with gRPC's HTTP mapping; no answer closes with 14 `UNAVAILABLE` (or the
/// callout's error); a reset mid-stream with 13 `INTERNAL`; a stream that ends
/// without trailers with 2 `UNKNOWN`. `deliver` returns `false` to stop (the
/// stream was cancelled or its VM is gone); dropping the response resets it.
pub async fn drive(
    sender: Option<Rc<dyn CalloutSender>>,
    p: Pending,
    mut deliver: impl FnMut(Event) -> bool,
) {
    use http_body_util::BodyExt;
    let close = |deliver: &mut dyn FnMut(Event) -> bool, (code, msg): (u32, String)| {
        deliver(Event::Close(code, msg));
    };
    let Some(sender) = sender else {
        close(
            &mut deliver,
            callout_error_status(CalloutError::Unavailable),
        );
        return;
    };
    let resp = match sender.open_stream(p.req, crate::body::boxed(p.body)).await {
        Ok(r) => r,
        Err(e) => return close(&mut deliver, callout_error_status(e)),
    };
    let (parts, mut body) = resp.into_parts();
    let ended = http_body::Body::is_end_stream(&body);
    let initial = if ended {
        Event::InitialMetadata(None, HeaderMap::new())
    } else {
        Event::InitialMetadata(Some(parts.status), parts.headers.clone())
    };
    if !deliver(initial) {
        return;
    }
    let trailers_only = ended && parts.headers.contains_key("grpc-status");
    if parts.status != http::StatusCode::OK && !trailers_only {
        return close(&mut deliver, http_status(parts.status));
    }
    if ended {
        let st = trailer_status(&parts.headers, None);
        if deliver(Event::TrailingMetadata(parts.headers)) {
            close(&mut deliver, st);
        }
        return;
    }
    let mut buf = BytesMut::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    buf.extend_from_slice(&data);
                    loop {
                        match next_message(&mut buf) {
                            Ok(Some(m)) => {
                                if !deliver(Event::Message(m)) {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(st) => return close(&mut deliver, st),
                        }
                    }
                }
                Err(frame) => {
                    let trailers = frame.into_trailers().unwrap_or_default();
                    let st = if buf.is_empty() {
                        trailer_status(&trailers, None)
                    } else {
                        (INTERNAL, "the stream ended inside a gRPC message".into())
                    };
                    if deliver(Event::TrailingMetadata(trailers)) {
                        close(&mut deliver, st);
                    }
                    return;
                }
            },
            Some(Err(_)) => return close(&mut deliver, (INTERNAL, "the stream was reset".into())),
            None => {
                if deliver(Event::TrailingMetadata(HeaderMap::new())) {
                    close(
                        &mut deliver,
                        (UNKNOWN, "the stream ended without grpc-status".into()),
                    );
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn messages_are_cut_at_their_length_prefix() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(b"one").unwrap());
        buf.extend_from_slice(&frame(b"").unwrap());
        let two = frame(b"two").unwrap();
        buf.extend_from_slice(&two[..6]);
        assert_eq!(next_message(&mut buf).unwrap().unwrap(), &b"one"[..]);
        assert_eq!(next_message(&mut buf).unwrap().unwrap(), &b""[..]);
        assert_eq!(next_message(&mut buf).unwrap(), None);
        buf.extend_from_slice(&two[6..]);
        assert_eq!(next_message(&mut buf).unwrap().unwrap(), &b"two"[..]);
        assert!(buf.is_empty());
        buf.extend_from_slice(&[1, 0, 0, 0, 1, 9]);
        assert_eq!(next_message(&mut buf).unwrap_err().0, INTERNAL);
        let mut big = BytesMut::from(&[0u8, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(next_message(&mut big).unwrap_err().0, RESOURCE_EXHAUSTED);
    }

    #[test]
    fn upstreams_are_names_or_serialized_grpc_services() {
        assert_eq!(cluster_of(b"grpc").as_deref(), Some("grpc"));
        // GrpcService { envoy_grpc { cluster_name: "grpc" } }
        assert_eq!(
            cluster_of(&[0x0a, 6, 0x0a, 4, b'g', b'r', b'p', b'c']).as_deref(),
            Some("grpc")
        );
        assert_eq!(cluster_of(b"bogus service string"), None);
    }
}
