//! The body types on the request path, the request-body size limit, and the
//! plumbing of body filters: [`Filtered`] runs a chain's body and trailer phases
//! on chunks as they pass (streamed mode), [`collect_capped`] reads a whole body
//! under a cap for buffered mode, and [`whole`] is the body that results;
//! [`known_empty`] tells a body that turned out empty before its head goes out;
//! [`Replay`] keeps a copy of a request body streaming upstream for a retry.
//!
//! Bodies are boxed once at the edge of the proxy so every stage passes one type.
//! They are `!Send` on purpose: each worker owns its requests from accept to
//! response (see ARCHITECTURE.md), so nothing needs to cross threads.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};

/// The error type of boxed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body anywhere in the proxy: a boxed body that need not be
/// `Send` (http-body-util's boxes all require `Send`).
pub struct Body(Pin<Box<dyn HttpBody<Data = Bytes, Error = BoxError>>>);

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.as_mut().poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// A body with these bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    boxed(Full::new(b.into()))
}

/// An empty body.
pub fn empty() -> Body {
    boxed(Empty::<Bytes>::new())
}

/// An empty body that does not say so up front (`is_end_stream` is false,
/// its length unknown): the body of an HTTP/1.1 `304` that keeps the
/// `content-length` it came with. hyper's HTTP/1.1 server drops that field
/// from a response whose body it knows is empty (unless the request was a
/// `HEAD`), though RFC 9110 §8.6 lets a 304 carry it (the length of the
/// representation it stands for); with a body of unknown length it writes the
/// field as it is, sends no body (a 304 has none) and drops this one unpolled.
pub fn unannounced_empty() -> Body {
    struct Unannounced;
    impl HttpBody for Unannounced {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(None)
        }
    }
    Body(Box::pin(Unannounced))
}

/// `b` with its length unknown (its size hint cleared, its frames as they
/// are): a request body whose head lost its `content-length` to a filter (the
/// grpc-web plugin removes it, as Envoy's grpc_web filter does). hyper's
/// client writes a length for a body of exact size when the head has none,
/// which would put back what the filter removed; without one it frames the
/// body as Envoy's codec does: chunked on HTTP/1.1, no `content-length` on
/// HTTP/2.
pub fn without_length(b: Body) -> Body {
    struct Unsized(Body);
    impl HttpBody for Unsized {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_end_stream()
        }
    }
    Body(Box::pin(Unsized(b)))
}

/// `body` as a request goes upstream under head `h`: a body of a known,
/// non-zero length whose head has no `content-length` (nor
/// `transfer-encoding`) goes without one ([`without_length`]), as Envoy sends
/// a request whose head has none. Such a head lost its length to a filter (the
/// grpc-web plugin removes it), or never had one (a chunked HTTP/1.1 request:
/// hop-by-hop fields went before the filters; HTTP/2 DATA frames without
/// `content-length`), and a body read whole (a filter's stream, the retry
/// buffer, a mirror's copy) would otherwise get from hyper the length the head
/// does not give: the request goes framed as its head says, whether it streams
/// or is replayed.
pub fn framed_by_head(h: &HeaderMap, body: Body) -> Body {
    let known = body.size_hint().exact().is_some_and(|n| n > 0);
    if known
        && !h.contains_key(http::header::CONTENT_LENGTH)
        && !h.contains_key(http::header::TRANSFER_ENCODING)
    {
        without_length(body)
    } else {
        body
    }
}

/// Boxes any body whose error converts to [`BoxError`].
pub fn boxed<B>(b: B) -> Body
where
    B: HttpBody<Data = Bytes> + 'static,
    B::Error: Into<BoxError>,
{
    Body(Box::pin(b.map_err(Into::into)))
}

/// Sees a body's frames as they pass: the one wrapper behind the request-body
/// limit, returning pooled connections, and end-of-request bookkeeping.
pub trait Watch {
    /// Sees each frame (and may fix it up); an error fails the body with it.
    fn frame(&mut self, _frame: &mut Frame<Bytes>) -> Result<(), BoxError> {
        Ok(())
    }
    /// The body is over: `complete` after its last frame, not on an error. A
    /// body dropped before its end just drops the watcher.
    fn end(self, _complete: bool)
    where
        Self: Sized,
    {
    }
    /// The error the body fails with when the inner body failed with `e`.
    fn error(&mut self, e: BoxError) -> BoxError {
        e
    }
}

/// A body with a [`Watch`].
pub struct Watched<B, W: Watch> {
    inner: B,
    watch: Option<W>,
}

impl<B: HttpBody, W: Watch> Watched<B, W> {
    /// Wraps `inner`. A body that is already at its end (hyper may never poll it)
    /// ends the watch at once.
    pub fn new(inner: B, watch: W) -> Self {
        let mut w = Watched {
            inner,
            watch: Some(watch),
        };
        if w.inner.is_end_stream() {
            w.finish(true);
        }
        w
    }

    fn finish(&mut self, complete: bool) {
        if let Some(w) = self.watch.take() {
            w.end(complete);
        }
    }
}

impl<B, W> HttpBody for Watched<B, W>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    W: Watch + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(w) = &mut this.watch {
                    if let Err(e) = w.frame(&mut frame) {
                        this.finish(false);
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e = match &mut this.watch {
                    Some(w) => w.error(e.into()),
                    None => e.into(),
                };
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a body fails with once it passes the route's `max_request_body`.
#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body larger than the route's max_request_body")
    }
}
impl std::error::Error for BodyTooLarge {}

/// Where a watcher of the client's request body notes the client's fault that
/// failed it (over `max_request_body`, a refused trailer), so that the upstream
/// error it causes is reported as the client's: an HTTP/1.1 upstream request
/// carries the body's error as its source, but an HTTP/2 one only says its
/// stream was reset, which would be a 502 and a failure of the endpoint.
#[derive(Clone, Default)]
pub struct ClientFault(Rc<RefCell<Option<crate::error::ProxyError>>>);

impl ClientFault {
    /// Notes `e` (the first fault stands).
    pub fn set(&self, e: crate::error::ProxyError) {
        self.0.borrow_mut().get_or_insert(e);
    }

    /// The fault noted, if any.
    pub fn take(&self) -> Option<crate::error::ProxyError> {
        self.0.borrow_mut().take()
    }
}

/// Fails a streamed body once more than its limit has gone by; the error is found
/// in the failure's source chain by [`crate::error::ProxyError::request_body`], and
/// noted in `fault`, so the client gets 413 instead of 502.
pub struct Limit {
    /// Bytes still allowed.
    pub remaining: u64,
    /// Where the 413 is noted.
    pub fault: ClientFault,
}

impl Watch for Limit {
    fn frame(&mut self, frame: &mut Frame<Bytes>) -> Result<(), BoxError> {
        let n = frame.data_ref().map_or(0, |d| d.len() as u64);
        match self.remaining.checked_sub(n) {
            Some(left) => self.remaining = left,
            None => {
                self.fault.set(crate::error::ProxyError::new(
                    crate::error::Kind::BodyTooLarge,
                    BodyTooLarge.to_string(),
                ));
                return Err(BodyTooLarge.into());
            }
        }
        Ok(())
    }
}

/// Why [`collect_capped`] stopped.
#[derive(Debug)]
pub enum CollectError {
    /// More than the cap arrived; this many bytes had been read.
    OverCap(usize),
    /// The body failed.
    Read(BoxError),
}

/// Reads a whole body (data and trailers), failing once more than `cap` bytes of
/// data arrived: the buffered body mode never holds more than a plugin's cap.
pub async fn collect_capped(
    mut body: Body,
    cap: usize,
) -> Result<(Bytes, Option<HeaderMap>), CollectError> {
    let mut data = BytesMut::new();
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(CollectError::Read)?;
        match frame.into_data() {
            Ok(d) => {
                if data.len() + d.len() > cap {
                    return Err(CollectError::OverCap(data.len() + d.len()));
                }
                data.extend_from_slice(&d);
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    match &mut trailers {
                        Some(all) => all.extend(t),
                        None => trailers = Some(t),
                    }
                }
            }
        }
    }
    Ok((data.freeze(), trailers))
}

/// Whether `body` is known to be empty with what has already arrived, so its
/// head can go out without a body framing: a body at its end, or one whose
/// frames ready now (read without waiting) are empty data up to its end, as
/// an HTTP/2 request whose `END_STREAM` came on an empty DATA frame after the
/// HEADERS. Frames read are not lost: an empty body becomes [`empty`], any
/// other first frame is given back ahead of the rest. Never waits: what has
/// not arrived is not known (the body then goes with a framing for a body).
pub fn known_empty(body: &mut Body) -> bool {
    if body.is_end_stream() {
        return true;
    }
    // Polled with a no-op waker: the next poll (the upstream connection's,
    // with its own waker) registers again, so no wake-up is lost.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    loop {
        match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Pending => return false,
            Poll::Ready(None) => {
                *body = empty();
                return true;
            }
            Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(Bytes::is_empty) => {
                if body.is_end_stream() {
                    *body = empty();
                    return true;
                }
            }
            Poll::Ready(Some(first)) => {
                let rest = std::mem::replace(body, empty());
                *body = Prefixed::body([first], rest);
                return false;
            }
        }
    }
}

/// Frames already read (read ahead by [`known_empty`], or kept for a retry),
/// then the rest of the body.
pub struct Prefixed {
    head: VecDeque<Result<Frame<Bytes>, BoxError>>,
    rest: Body,
}

impl Prefixed {
    /// `head`, then `rest`.
    pub fn body(
        head: impl IntoIterator<Item = Result<Frame<Bytes>, BoxError>>,
        rest: Body,
    ) -> Body {
        boxed(Prefixed {
            head: head.into_iter().collect(),
            rest,
        })
    }
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.head.pop_front() {
            return Poll::Ready(Some(f));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let head: u64 = self
            .head
            .iter()
            .filter_map(|f| f.as_ref().ok()?.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let rest = self.rest.size_hint();
        // A fresh hint: raising `lower` before `upper` on the old one would trip
        // http-body's lower <= upper assertion for exact sizes.
        let mut h = SizeHint::new();
        h.set_lower(rest.lower() + head);
        if let Some(u) = rest.upper() {
            h.set_upper(u + head);
        }
        h
    }
}

/// A request body that streams to the attempt as the client sends it while
/// a copy of it is kept, up to a limit, for a retry to replay: Envoy's retry
/// buffer. A retry's body is the copy, then the rest as it comes, so a
/// request whose body has not ended (a gRPC client or bidirectional stream,
/// a slow upload) is neither held back until its end nor denied its retry.
/// Past the limit nothing more is kept and the request is not retried
/// ([`Replay::replayable`]).
pub struct Replay(Rc<RefCell<ReplayState>>);

struct ReplayState {
    /// The frames read so far (empty data chunks left out), while they fit.
    kept: Vec<Kept>,
    kept_bytes: u64,
    limit: u64,
    /// Past `limit`, or the client's body failed: the copy is gone.
    spoiled: bool,
    /// The client's body not read yet; `None` once it ended.
    rest: Option<Body>,
    /// The attempt whose body may read on: the latest. An earlier attempt's
    /// body (hyper may still poll it after its attempt failed) fails instead,
    /// so it can never take frames from the client that the retry needs.
    reader: u32,
}

enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Kept {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Kept::Data(d) => Frame::data(d.clone()),
            Kept::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

impl Replay {
    /// Keeps up to `limit` bytes of `body` as it streams.
    pub fn new(body: Body, limit: u64) -> Replay {
        Replay(Rc::new(RefCell::new(ReplayState {
            kept: Vec::new(),
            kept_bytes: 0,
            limit,
            spoiled: false,
            rest: Some(body),
            reader: 0,
        })))
    }

    /// Whether another attempt can have the whole body: nothing was lost yet.
    pub fn replayable(&self) -> bool {
        !self.0.borrow().spoiled
    }

    /// The body of the next attempt: what was kept, then the rest of the
    /// client's body as it comes. Earlier attempts' bodies fail from now on.
    pub fn attempt(&self) -> Body {
        let reader = {
            let mut s = self.0.borrow_mut();
            s.reader = s.reader.wrapping_add(1);
            s.reader
        };
        boxed(ReplayBody {
            state: self.0.clone(),
            reader,
            next: 0,
        })
    }

    /// Wraps the part of the body not read yet (`f` gets it unless it ended).
    pub fn map_rest<T>(&self, f: impl FnOnce(Body) -> (Body, Option<T>)) -> Option<T> {
        let mut s = self.0.borrow_mut();
        let (b, t) = f(s.rest.take()?);
        s.rest = Some(b);
        t
    }
}

/// An error of a retry's superseded attempt body (never seen by a client).
#[derive(Debug)]
struct Superseded;

impl std::fmt::Display for Superseded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body taken over by a retry")
    }
}

impl std::error::Error for Superseded {}

struct ReplayBody {
    state: Rc<RefCell<ReplayState>>,
    reader: u32,
    /// The next kept frame to send.
    next: usize,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut s = this.state.borrow_mut();
        if s.reader != this.reader {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if let Some(k) = s.kept.get(this.next) {
            this.next += 1;
            return Poll::Ready(Some(Ok(k.frame())));
        }
        let Some(rest) = s.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(rest).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => s.rest = None,
            Poll::Ready(Some(Ok(f))) if !s.spoiled => {
                let kept = match (f.data_ref(), f.trailers_ref()) {
                    (Some(d), _) if d.is_empty() => None,
                    (Some(d), _) => Some(Kept::Data(d.clone())),
                    (None, Some(t)) => Some(Kept::Trailers(t.clone())),
                    (None, None) => None,
                };
                if let Some(k) = kept {
                    let n = f.data_ref().map_or(0, |d| d.len() as u64);
                    if s.kept_bytes + n > s.limit {
                        // Too large to replay: free the copy. No other
                        // attempt will read it (this one read it all).
                        s.spoiled = true;
                        s.kept = Vec::new();
                    } else {
                        s.kept_bytes += n;
                        s.kept.push(k);
                    }
                    this.next = s.kept.len();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                s.spoiled = true;
                s.kept = Vec::new();
                this.next = 0;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let s = self.state.borrow();
        s.reader == self.reader
            && self.next >= s.kept.len()
            && s.rest.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.state.borrow();
        let kept: u64 = s
            .kept
            .get(self.next..)
            .unwrap_or_default()
            .iter()
            .map(|k| match k {
                Kept::Data(d) => d.len() as u64,
                Kept::Trailers(_) => 0,
            })
            .sum();
        let rest = s
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint);
        let mut h = SizeHint::new();
        h.set_lower(rest.lower() + kept);
        if let Some(u) = rest.upper() {
            h.set_upper(u + kept);
        }
        h
    }
}

/// A body of `data` then `trailers` (if any): what a buffered body phase passes on.
pub fn whole(data: Bytes, trailers: Option<HeaderMap>) -> Body {
    match trailers {
        None => full(data),
        Some(t) => boxed(Whole {
            data: (!data.is_empty()).then_some(data),
            trailers: Some(t),
        }),
    }
}

struct Whole {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl HttpBody for Whole {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// The error a streamed body fails with when a filter's body phase cannot pass it
/// on (a local response, a failure): the peer sees a reset, the only honest end
/// of a message whose head is out (abi/README.md §3.5).
#[derive(Debug)]
pub struct FilterStopped(pub String);

impl std::fmt::Display for FilterStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "body stopped by a filter: {}", self.0)
    }
}
impl std::error::Error for FilterStopped {}

/// A part of a message held for a callout ([`crate::filter::BodyStep::Held`],
/// [`crate::filter::EndStep::Held`]): resolves when the paused filter's callout
/// callback resumes or answers.
type Held = Pin<Box<dyn Future<Output = Result<crate::filter::Resumed, crate::error::ProxyError>>>>;

/// A body whose chunks go through a chain's body phases as they arrive (streamed
/// mode, abi/README.md §4), then its trailers phases. The end of the body is
/// signalled to the filters exactly once: with the last data frame when the inner
/// body knows it is the last, else with an empty chunk when the trailers or the
/// end arrive. `content-length` is the filters' business: the size hint is
/// unknown, so a filter that removed the header gets chunked encoding.
///
/// One the head went on with is held to (abi/README.md §4, "Rewriting a
/// streamed body"): the bytes passed on are counted, and a filter's rewrite
/// that makes them more than it says, or fewer at the end, fails the body
/// (before the data over it, or the end, goes out) with the
/// `plugin_failure` of the filter that resized it, logged and counted as
/// that filter's failure ([`crate::filter::Chain::length_broken`]). Neither
/// HTTP library would: hyper's HTTP/1.1 encoder cuts what is over the
/// length, and waits for what is short of it. A request then fails with
/// `503 plugin_failure` (the upstream request is reset; not the upstream's
/// failure), a response's stream is reset (its head is out). A body whose
/// head a filter held while it streamed ([`Filtered::holding_head`]) is not
/// counted: what passed during the hold may have been rewritten again by
/// the filters after the holding one before it went out.
///
/// A filter may hold a chunk, or the end of the message, for a callout
/// (abi/README.md §3.3; proxy-wasm only at the end, Envoy's way): the chain is
/// taken out of its [`crate::filter::SharedChain`] and the held part waits in
/// `Filtered::held` until the callout's callback resumes or answers. The inner
/// body is not read meanwhile (backpressure on its sender), nor is the peer of
/// the other direction, which finds the chain out.
pub struct Filtered {
    inner: Body,
    chain: crate::filter::SharedChain,
    dir: crate::filter::Direction,
    /// The filters saw end-of-stream.
    ended: bool,
    /// Trailers to send after the data of the end-of-stream call.
    trailers: Option<HeaderMap>,
    done: bool,
    /// A chunk or the end of the message, held for a callout (boxed only then).
    held: Option<Held>,
    /// A filter holds the head of this direction (see
    /// `crate::filter::BodyCtl::holds_head`): a local response replaces the
    /// message instead of resetting it.
    head_held: bool,
    /// Data bytes passed on so far.
    forwarded: u64,
    /// The `content-length` they must come to.
    length: Length,
}

/// The `content-length` a [`Filtered`] body is held to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Length {
    /// Not read yet: the head may not be out (or the chain was).
    Unread,
    /// None to hold to (the head has none, a filter held the head, or a
    /// mismatch was already reported).
    Unchecked,
    /// This many bytes.
    Is(u64),
}

impl Filtered {
    /// Runs `chain`'s phases of direction `dir` over `inner`.
    pub fn new(
        inner: Body,
        chain: crate::filter::SharedChain,
        dir: crate::filter::Direction,
    ) -> Self {
        Filtered {
            inner,
            chain,
            dir,
            ended: false,
            trailers: None,
            done: false,
            held: None,
            head_held: false,
            forwarded: 0,
            length: Length::Unread,
        }
    }

    /// The same, read first by the proxy while a filter holds the head
    /// ([`Filtered::head_out`] once it goes out). Its length is not checked
    /// (see [`Filtered`]).
    pub fn holding_head(mut self) -> Self {
        self.head_held = true;
        self.length = Length::Unchecked;
        self
    }

    /// The head went out: a local response can no longer replace the message.
    pub fn head_out(&mut self) {
        self.head_held = false;
    }

    /// Whether the end of the message reached the chain: what is left comes
    /// from it (held data, trailers), not from the peer.
    pub fn ended(&self) -> bool {
        self.ended
    }

    fn stopped(&self, why: String) -> BoxError {
        Box::new(FilterStopped(why))
    }

    /// Counts `out`, data about to be passed on (empty at the end), against
    /// the `content-length` the head went on with: more than it, or short of
    /// it at the end (`self.done`), is the error the body fails with instead.
    /// One add and a compare per chunk; the length is read from the chain's
    /// copy of the head once, at the first data.
    fn counted(&mut self, out: Bytes) -> Result<Bytes, BoxError> {
        self.forwarded += out.len() as u64;
        if self.length == Length::Unread {
            let dir = self.dir;
            self.length = match self.chain.with(|c| c.sent_length(dir)) {
                Ok(Some(n)) => Length::Is(n),
                Ok(None) | Err(crate::filter::SharedError::Finished) => Length::Unchecked,
                // Out for a callout (or in use): read at the next data.
                Err(_) => Length::Unread,
            };
        }
        match self.length {
            Length::Is(n) if self.forwarded > n || (self.done && self.forwarded < n) => {
                Err(self.length_broken(n))
            }
            _ => Ok(out),
        }
    }

    /// The error for a body whose filters broke its `content-length` of
    /// `declared`: logged once, named after the filter that resized it (and
    /// counted as its failure).
    fn length_broken(&mut self, declared: u64) -> BoxError {
        self.length = Length::Unchecked;
        let grew = self.forwarded > declared;
        let dir = self.dir;
        let plugin = self
            .chain
            .with(|c| c.length_broken(dir, grew))
            .ok()
            .flatten()
            .unwrap_or_else(|| "a filter".to_string());
        let (what, seen) = if grew {
            ("more than", format!("at least {}", self.forwarded))
        } else {
            ("fewer than", self.forwarded.to_string())
        };
        tracing::warn!(
            plugin = %plugin,
            direction = dir.as_str(),
            "a streamed {} body rewritten to {what} the content-length its head went on with \
             ({seen} bytes for {declared}; a filter that resizes a streamed body must remove \
             content-length in its headers phase): the {}",
            dir.as_str(),
            match dir {
                crate::filter::Direction::Request => "exchange fails, the upstream request is reset",
                crate::filter::Direction::Response => "stream is reset",
            }
        );
        Box::new(crate::error::ProxyError::new(
            crate::error::Kind::PluginFailure,
            plugin,
        ))
    }

    /// A local response from a body or trailers phase: the request's replaces
    /// the upstream's answer (the proxy sends it), as does the response's
    /// while its head is held; else the response's details are kept for the
    /// access log. Either way this stream ends with an error (the upstream
    /// request is aborted; a response whose head is out is reset).
    fn respond(&self, lr: crate::filter::LocalResponse, what: &str) -> BoxError {
        let why = format!(
            "local response {} from {what} {} phase",
            lr.status,
            self.dir.as_str()
        );
        if self.dir == crate::filter::Direction::Request || self.head_held {
            self.chain.set_local(lr);
        } else {
            self.chain.cut(&lr.details);
        }
        self.stopped(why)
    }

    /// Request data (or trailers) arriving after the exchange ended (its
    /// response is complete and its filters finished) is not forwarded:
    /// nothing filters it any more, and the upstream has answered (Envoy
    /// resets such an upstream request). The error stops the upload; the
    /// end of the body alone goes on.
    fn unfiltered(&self, data: &Bytes, trailers: bool) -> Option<BoxError> {
        let rest = !data.is_empty() || trailers;
        (rest && self.dir == crate::filter::Direction::Request).then(|| {
            self.stopped(
                "request body data after the response ended: not forwarded unfiltered".into(),
            )
        })
    }

    /// One body call over the chain, for a chunk that is not the last.
    fn step(&mut self, data: Bytes) -> Result<Bytes, BoxError> {
        use crate::filter::SharedError;
        let mut slot = Some(data);
        let dir = self.dir;
        let r = self
            .chain
            .with(|c| c.on_body(dir, slot.take().unwrap_or_default()));
        match r {
            Err(SharedError::Finished) => {
                let data = slot.take().unwrap_or_default();
                match self.unfiltered(&data, false) {
                    Some(e) => Err(e),
                    None => Ok(data),
                }
            }
            // `poll_frame` waits for the chain before reading (see
            // `SharedChain::poll_available`): out here means it is in use.
            Err(SharedError::Busy) => {
                Err(self.stopped("body data arrived while the filter chain was in use".into()))
            }
            Err(SharedError::Aborted) => Err(aborted()),
            Ok(r) => self.stepped(r),
        }
    }

    /// What a body call over a chunk gave: data to send, a local response, or
    /// a hold.
    fn stepped(
        &mut self,
        r: Result<crate::filter::BodyStep, crate::error::ProxyError>,
    ) -> Result<Bytes, BoxError> {
        use crate::filter::BodyStep;
        match r {
            Err(e) => Err(Box::new(e)),
            Ok(BodyStep::Continue(b)) => Ok(b),
            Ok(BodyStep::Respond(lr)) => Err(self.respond(lr, "a body")),
            Ok(BodyStep::Held) => self.hold(),
        }
    }

    /// A filter paused on a streamed call with a callout in flight: the chain
    /// goes out with the future that waits for the callout and runs the rest
    /// of the held part; nothing is sent meanwhile.
    fn hold(&mut self) -> Result<Bytes, BoxError> {
        let Some(chain) = self.chain.take() else {
            return Err(self.stopped("the filter chain was in use at a hold".into()));
        };
        let mut holding = Holding {
            chain: Some(chain),
            shared: self.chain.clone(),
            since: std::time::Instant::now(),
        };
        self.held = Some(Box::pin(async move {
            let r = match holding.chain.as_mut() {
                Some(chain) => chain.resume().await,
                None => Ok(crate::filter::Resumed::Chunk(
                    crate::filter::BodyStep::Continue(Bytes::new()),
                )),
            };
            holding.release();
            r
        }));
        Ok(Bytes::new())
    }

    /// The end of the message over the chain: the end-of-stream body call over
    /// `data` with the `trailers` the message ends with, writable there (unless
    /// the body call already ran: `trailers_only`), then the trailers phases.
    /// Returns the data to send now; the trailers and the end follow from
    /// `self.trailers` and `self.done`, or from `self.held`.
    fn end(
        &mut self,
        data: Bytes,
        trailers: Option<HeaderMap>,
        trailers_only: bool,
    ) -> Result<Bytes, BoxError> {
        use crate::filter::SharedError;
        self.ended = true;
        let dir = self.dir;
        let mut slot = Some((data, trailers));
        let r = self.chain.with(|c| {
            let (data, trailers) = slot.take().unwrap_or_default();
            match trailers {
                Some(t) if trailers_only => c.on_trailers(dir, t),
                t => c.on_body_end(dir, data, t),
            }
        });
        match r {
            Err(SharedError::Finished) => {
                let (data, trailers) = slot.take().unwrap_or_default();
                if let Some(e) = self.unfiltered(&data, trailers.is_some()) {
                    return Err(e);
                }
                self.done = true;
                self.trailers = trailers;
                Ok(data)
            }
            Err(SharedError::Busy) => Err(self
                .stopped("the end of the body arrived while the filter chain was in use".into())),
            Err(SharedError::Aborted) => Err(aborted()),
            Ok(r) => self.ended_with(r),
        }
    }

    /// What the end of the message over the chain gave: data to send (then
    /// trailers, the end), a local response, or a hold (the chain goes out
    /// with the future that waits for the callout).
    fn ended_with(
        &mut self,
        r: Result<crate::filter::EndStep, crate::error::ProxyError>,
    ) -> Result<Bytes, BoxError> {
        use crate::filter::EndStep;
        match r {
            Err(e) => Err(Box::new(e)),
            Ok(EndStep::Done(data, trailers)) => {
                // No trailers left (folded into the body): the body ends with
                // its data.
                self.done = true;
                self.trailers = trailers;
                Ok(data)
            }
            Ok(EndStep::Respond(lr)) => Err(self.respond(lr, "the last body or trailers")),
            Ok(EndStep::Held) => self.hold(),
        }
    }
}

/// The chain, out with a held part of a body until its filter resumes. Dropped
/// before (hyper dropped the body: the upstream request ended under it, or
/// the exchange is gone), the hold is abandoned and the chain goes back, so
/// the response still goes through the filters (and a gone exchange still
/// finishes them).
struct Holding {
    chain: Option<Box<crate::filter::Chain>>,
    shared: crate::filter::SharedChain,
    since: std::time::Instant,
}

impl Holding {
    /// Puts the chain back; the time it was out was not the client's.
    fn release(&mut self) {
        if let Some(chain) = self.chain.take() {
            self.shared.add_held(self.since.elapsed());
            self.shared.put(chain);
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        if let Some(chain) = self.chain.as_mut() {
            chain.abandon_hold();
        }
        self.release();
    }
}

/// A response body whose exchange has a filter that may answer after the
/// head went to the client ([`crate::filter::SharedChain::may_answer_late`]):
/// such an answer cuts it ([`crate::filter::SharedChain::cut`]). The body then
/// fails, at once if it waits for its upstream, so hyper resets the stream
/// (HTTP/2 `RST_STREAM`) or closes the connection before the body's end
/// (HTTP/1.1: short of its `content-length`, or with no last chunk), and the
/// client can tell the response is incomplete.
pub struct Cuttable {
    inner: Body,
    chain: crate::filter::SharedChain,
}

impl Cuttable {
    /// Wraps `inner`, the response body of the exchange `chain` runs.
    pub fn new(inner: Body, chain: crate::filter::SharedChain) -> Self {
        Cuttable { inner, chain }
    }

    fn cut() -> BoxError {
        Box::new(FilterStopped(
            "a filter answered after the response head was sent: the stream is reset".into(),
        ))
    }
}

impl HttpBody for Cuttable {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.chain.poll_cut(cx).is_ready() {
            return Poll::Ready(Some(Err(Self::cut())));
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        // The answer may come with this frame (a result delivered before its
        // body call): the frame is not sent after it.
        if matches!(frame, Poll::Ready(Some(Ok(_)))) && self.chain.was_cut() {
            return Poll::Ready(Some(Err(Self::cut())));
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error of a stream whose exchange was abandoned while it waited.
fn aborted() -> BoxError {
    Box::new(FilterStopped(
        "the exchange was abandoned while another phase was paused".into(),
    ))
}

impl HttpBody for Filtered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let out = if let Some(held) = this.held.as_mut() {
                // A chunk or the end of the message waits for a callout.
                let r = match held.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                };
                this.held = None;
                match r {
                    Ok(crate::filter::Resumed::Chunk(s)) => this.stepped(Ok(s)),
                    Ok(crate::filter::Resumed::End(s)) => this.ended_with(Ok(s)),
                    Err(e) => Err(Box::new(e) as BoxError),
                }
            } else {
                if let Some(t) = this.trailers.take() {
                    this.done = true;
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                if this.done {
                    return Poll::Ready(None);
                }
                // Another phase of the exchange is paused (full duplex): leave the
                // peer's data unread until it resumes, so the chunk is neither
                // refused nor buffered here, and the peer gets backpressure.
                if this.chain.poll_available(cx).is_pending() {
                    return Poll::Pending;
                }
                let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(f) => f,
                };
                match frame {
                    Some(Err(e)) => {
                        this.done = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Some(Ok(f)) => match f.into_data() {
                        Ok(data) if this.inner.is_end_stream() => this.end(data, None, false),
                        Ok(data) => this.step(data),
                        Err(f) => {
                            let Ok(t) = f.into_trailers() else { continue };
                            let ended = this.ended;
                            this.end(Bytes::new(), Some(t), ended)
                        }
                    },
                    None if this.ended => {
                        this.done = true;
                        if let Err(e) = this.counted(Bytes::new()) {
                            return Poll::Ready(Some(Err(e)));
                        }
                        return Poll::Ready(None);
                    }
                    None => this.end(Bytes::new(), None, false),
                }
            };
            match out.and_then(|out| this.counted(out)) {
                Err(e) => {
                    this.done = true;
                    this.trailers = None;
                    return Poll::Ready(Some(Err(e)));
                }
                // An empty chunk is not sent: on HTTP/1.1 it would end the
                // chunked body.
                Ok(out) if out.is_empty() => {}
                Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none() && self.held.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limit_fails_the_body() {
        let b = Watched::new(
            full(vec![0u8; 10]),
            Limit {
                remaining: 5,
                fault: ClientFault::default(),
            },
        );
        let err = b.collect().await.err().map(|e| e.is::<BodyTooLarge>());
        assert_eq!(err, Some(true));

        let b = Watched::new(
            full(vec![0u8; 5]),
            Limit {
                remaining: 5,
                fault: ClientFault::default(),
            },
        );
        assert_eq!(b.collect().await.map(|c| c.to_bytes().len()).ok(), Some(5));
    }

    #[tokio::test]
    async fn collect_capped_stops_past_the_cap_and_keeps_trailers() {
        let mut t = HeaderMap::new();
        t.insert("x-t", http::HeaderValue::from_static("1"));
        let (data, trailers) = collect_capped(whole(Bytes::from("abc"), Some(t)), 3)
            .await
            .unwrap();
        assert_eq!(data, "abc");
        assert_eq!(trailers.unwrap()["x-t"], "1");

        let r = collect_capped(full(vec![0u8; 10]), 9).await;
        assert!(matches!(r, Err(CollectError::OverCap(10))), "{r:?}");
    }

    #[tokio::test]
    async fn known_empty_reads_only_what_is_ready() {
        // An empty data frame ending the body (HTTP/2: END_STREAM on an empty
        // DATA frame after the HEADERS): known empty, and left empty.
        let frames = vec![Ok::<_, BoxError>(Frame::data(Bytes::new()))];
        let mut b = boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        assert!(!b.is_end_stream());
        assert!(known_empty(&mut b));
        assert!(b.is_end_stream());

        // Data: not empty, and the frame read ahead is still there.
        let frames = vec![Ok::<_, BoxError>(Frame::data(Bytes::from("ab")))];
        let mut b = boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        assert!(!known_empty(&mut b));
        assert_eq!(b.collect().await.unwrap().to_bytes(), "ab");

        // Nothing arrived yet: not known, nothing read.
        let mut b = boxed(http_body_util::StreamBody::new(
            futures_util::stream::pending::<Result<Frame<Bytes>, BoxError>>(),
        ));
        assert!(!known_empty(&mut b));
    }

    struct Ends(std::rc::Rc<std::cell::Cell<Option<bool>>>);
    impl Watch for Ends {
        fn end(self, complete: bool) {
            self.0.set(Some(complete));
        }
    }

    #[tokio::test]
    async fn watch_sees_the_end() {
        let seen = std::rc::Rc::new(std::cell::Cell::new(None));
        // An empty body ends at once: hyper may never poll it.
        let _b = Watched::new(empty(), Ends(seen.clone()));
        assert_eq!(seen.get(), Some(true));

        let seen = std::rc::Rc::new(std::cell::Cell::new(None));
        let b = Watched::new(full("abc"), Ends(seen.clone()));
        assert_eq!(seen.get(), None);
        let _ = b.collect().await;
        assert_eq!(seen.get(), Some(true));
    }
}
