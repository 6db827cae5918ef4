//! The host side of HTTP filters: the [`HttpFilter`] trait every filter implements
//! (Wasm components today; native and proxy-wasm filters plug in here too), the
//! [`Exchange`] a filter sees, the per-config [`Filters`] (listener chains and
//! per-route overrides) and the per-request [`Chain`] that runs them.
//!
//! Order (abi/README.md §1, §3): request phases run in chain order, response phases
//! in reverse; a local response from filter *k* is seen only by the filters before
//! *k* (proxy-wasm filters, as Envoy's, also by *k* and those after it that its
//! request reached: [`HttpFilter::sees_own_local_response`]). A filter that changes the request head makes the route be selected again
//! (Envoy's `clearRouteCache`): route overrides and `exchange.route-name()` always
//! answer for the head as it is now.
//!
//! Callouts (abi/README.md §5.8): a filter queues [`CalloutRequest`]s on the
//! [`Exchange`] during a call; the chain sends them with the [`CalloutSender`] the
//! proxy gave it, each as a task on the worker's `LocalSet`, and delivers each
//! result to the filter's [`HttpFilter::on_callout_response`]. A filter that returns
//! [`Verdict::Pause`] holds the chain: the chain awaits results (the worker runs
//! other exchanges meanwhile) until the paused filter's callout response resumes or
//! answers. That works from the headers phases and, when the host holds the whole
//! message (buffered mode, [`Chain::on_whole_body`]), from the body and trailers
//! phases. A streamed body runs its phases from a stream's poll, which cannot
//! wait: a pause there with a callout in flight stops the run
//! ([`BodyStep::Held`] on a chunk, [`EndStep::Held`] at the end of the message:
//! its last body call, its trailers); the stream then takes the chain out and
//! awaits [`Chain::resume`], the same `Chain::wait` as the other pauses, and
//! reads nothing more of that body until it resumes (backpressure). Component
//! filters may pause on any streamed call ([`ExchangeData::hold_stream`]);
//! proxy-wasm filters only at the end ([`ExchangeData::hold_end`]): mid-stream
//! they buffer paused chunks themselves, as Envoy does. A proxy-wasm filter
//! that holds the head while its body streams (Envoy's `StopIteration`)
//! stops the run of its direction there ([`Stop`]): the filters after it
//! get the head, then the body, only once it lets go
//! ([`Chain::run_stopped`]).
//! Dropping a [`Chain`] (the client went away) aborts its callouts and still
//! runs `on-log`/`on-done`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, StatusCode, Uri, Version};
use rand::Rng;

use crate::config::{Config, Name};
use crate::error::{Kind, ProxyError};
pub use crate::head::{BodyBuf, Head};
use crate::router::{Action, RouteInput, RouteTable};
use crate::stats::Stats;
use crate::tls::{PeerCert, TlsInfo};
use crate::wasm::kv::{KvCall, KvResult};

/// The phases a filter wants (the WIT `phases` flags, same bit order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases(pub u8);

impl Phases {
    /// `on-request-headers`.
    pub const REQUEST_HEADERS: Phases = Phases(1);
    /// `on-request-body`.
    pub const REQUEST_BODY: Phases = Phases(1 << 1);
    /// `on-request-trailers`.
    pub const REQUEST_TRAILERS: Phases = Phases(1 << 2);
    /// `on-response-headers`.
    pub const RESPONSE_HEADERS: Phases = Phases(1 << 3);
    /// `on-response-body`.
    pub const RESPONSE_BODY: Phases = Phases(1 << 4);
    /// `on-response-trailers`.
    pub const RESPONSE_TRAILERS: Phases = Phases(1 << 5);
    /// `on-log`.
    pub const LOG: Phases = Phases(1 << 6);
    /// `on-done`.
    pub const DONE: Phases = Phases(1 << 7);

    /// Whether every phase of `other` is in `self`.
    pub fn contains(self, other: Phases) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Which way a message flows (the WIT `direction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Downstream to upstream.
    Request,
    /// Upstream to downstream.
    Response,
}

impl Direction {
    /// 0 for the request, 1 for the response (index of per-direction arrays).
    pub fn idx(self) -> usize {
        match self {
            Direction::Request => 0,
            Direction::Response => 1,
        }
    }

    /// `request` / `response`, for logs and stats labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }

    fn body_phase(self) -> Phases {
        match self {
            Direction::Request => Phases::REQUEST_BODY,
            Direction::Response => Phases::RESPONSE_BODY,
        }
    }

    fn trailers_phase(self) -> Phases {
        match self {
            Direction::Request => Phases::REQUEST_TRAILERS,
            Direction::Response => Phases::RESPONSE_TRAILERS,
        }
    }
}

/// How a filter receives a body in one direction (the WIT `body-mode`,
/// abi/README.md §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BodyMode {
    /// No body calls; the body passes untouched.
    #[default]
    Skipped,
    /// One call per chunk as it arrives.
    Streamed,
    /// One call with the whole body (up to the plugin's cap); the head of that
    /// direction is held (writable) until it returns.
    Buffered,
}

/// One filter's body settings for one exchange: its declared default modes,
/// overridable by `set-body-mode` until the body of that direction starts, and
/// whether it detached (`exchange.detach`). The chain keeps one per filter and
/// swaps it into [`ExchangeData::body_ctl`] for each call into that filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BodyCtl {
    /// The mode per direction ([`Direction::idx`]).
    pub modes: [BodyMode; 2],
    /// Whether the body phase of that direction was declared.
    pub declared: [bool; 2],
    /// Whether the body of that direction started flowing (too late to change
    /// the mode).
    pub started: [bool; 2],
    /// The filter detached from the exchange: no more calls into it, not even
    /// `on-log` or its guest's `on-done` (abi/README.md §3.2).
    pub detached: bool,
    /// The filter holds the head of that direction while its body streams
    /// through it, chunk by chunk (proxy-wasm's `StopIteration` from a headers
    /// callback, as Envoy: the head goes on with the first chunk the filter
    /// continues, or the end of the body). Writable meanwhile.
    pub holds_head: [bool; 2],
}

impl BodyCtl {
    fn of(f: &dyn HttpFilter) -> Self {
        let p = f.phases();
        let mut c = BodyCtl::default();
        for d in [Direction::Request, Direction::Response] {
            let declared = p.contains(d.body_phase());
            c.declared[d.idx()] = declared;
            c.modes[d.idx()] = if declared {
                f.body_mode(d)
            } else {
                BodyMode::Skipped
            };
        }
        c
    }

    /// Whether this filter gets body calls in direction `d`.
    pub fn wants(&self, d: Direction) -> bool {
        !self.detached && self.declared[d.idx()] && self.modes[d.idx()] != BodyMode::Skipped
    }
}

/// The default per-plugin cap of a buffered body (`limits.body`), which the
/// SDK's harness applies too.
pub use legate_abi_rules::limits::DEFAULT_BODY_LIMIT;

/// The default bound of one pause (`limits.pause`): Envoy's
/// `stream_idle_timeout`.
pub const DEFAULT_PAUSE_LIMIT: Duration = Duration::from_secs(300);

/// What a filter tells the host after a phase.
#[derive(Debug)]
pub enum Verdict {
    /// Pass the message part on.
    Continue,
    /// Answer locally instead.
    Respond(LocalResponse),
    /// Keep holding the message part until a callout response resumes it (the
    /// filter has at least one callout outstanding).
    Pause,
}

/// A callout a filter asked for during a call, queued on [`ExchangeData::callouts`].
#[derive(Debug, Clone)]
pub struct CalloutRequest {
    /// The id the filter knows it by (unique in its instance).
    pub id: u64,
    /// The target cluster (granted to the filter).
    pub cluster: String,
    /// Method.
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// Host/`:authority`: the cluster name if `None`.
    pub authority: Option<String>,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Bytes,
    /// The whole callout (connect, send, read the response) must finish in this.
    pub timeout: Duration,
    /// A larger response body is [`CalloutError::LimitExceeded`].
    pub max_response_body: usize,
}

/// A callout's response (any status).
#[derive(Debug, Clone)]
pub struct CalloutResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// The trailers, if any (a gRPC call's status is there).
    pub trailers: HeaderMap,
}

/// Why a callout has no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutError {
    /// Its timeout passed.
    Timeout,
    /// No healthy endpoint, a connect failure, a reset, an unknown cluster.
    Unavailable,
    /// The response body is over the cap.
    LimitExceeded,
}

/// A callout's outcome.
pub type CalloutResult = Result<CalloutResponse, CalloutError>;

thread_local! {
    /// The callout sender of the chain started last on this worker thread, for
    /// plugin-level callouts (from `on-tick`), which have no chain of their own.
    static WORKER_CALLOUTS: std::cell::RefCell<Option<Rc<dyn CalloutSender>>> =
        const { std::cell::RefCell::new(None) };
}

/// This worker's callout sender for plugin-level callouts (`None` before the
/// worker took its first config, see [`crate::worker::start_plugins`]).
pub fn worker_callouts() -> Option<Rc<dyn CalloutSender>> {
    WORKER_CALLOUTS.with(|c| c.borrow().clone())
}

/// Sends a plugin-level callout (from a tick or a root context) through this
/// worker's sender; `Unavailable` before the worker has one.
pub async fn send_from_worker(req: CalloutRequest) -> CalloutResult {
    match worker_callouts() {
        Some(sender) => sender.send(req).await,
        None => Err(CalloutError::Unavailable),
    }
}

/// Makes `sender` this worker's sender for plugin-level callouts (each config
/// that goes live on the worker does, and so do a TCP connection with network
/// filters and a filtered exchange).
pub fn set_worker_callouts(sender: Rc<dyn CalloutSender>) {
    WORKER_CALLOUTS.with(|c| *c.borrow_mut() = Some(sender));
}

/// The instance side of [`InstanceGone`]: kept with a plugin instance, and
/// dropped with it (a trap, abi/README.md §9), which wakes every waiter.
pub struct InstanceAlive(tokio::sync::watch::Sender<()>);

impl InstanceAlive {
    /// A live instance's token.
    pub fn new() -> Self {
        InstanceAlive(tokio::sync::watch::channel(()).0)
    }

    /// A waiter for this instance's end.
    pub fn watch(&self) -> InstanceGone {
        InstanceGone(self.0.subscribe())
    }
}

impl Default for InstanceAlive {
    fn default() -> Self {
        Self::new()
    }
}

/// Resolves once a plugin instance is gone ([`HttpFilter::instance_gone`]):
/// a pause waiting in that instance then fails at once, instead of when its
/// callouts come back to a dead instance.
pub struct InstanceGone(tokio::sync::watch::Receiver<()>);

impl InstanceGone {
    /// Already gone (the exchange's context is not live in any instance).
    pub fn now() -> Self {
        InstanceGone(tokio::sync::watch::channel(()).1)
    }

    /// Waits until the instance is dropped.
    pub async fn wait(mut self) {
        // Nothing is ever sent: `changed` ends only with the sender.
        while self.0.changed().await.is_ok() {}
    }
}

/// A callout in flight.
pub type CalloutFuture = Pin<Box<dyn Future<Output = CalloutResult>>>;

/// A streaming callout's response head, its body still arriving.
pub type CalloutStreamFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<crate::body::Body>, CalloutError>>>>;

/// Abort handles of callout tasks by key, so that a cancel can abort one
/// (pruned of finished tasks as new ones are added).
pub struct Aborts<K>(Vec<(K, tokio::task::AbortHandle)>);

impl<K: PartialEq> Aborts<K> {
    /// None.
    pub const fn new() -> Self {
        Aborts(Vec::new())
    }

    /// Keeps `task`'s handle under `key`.
    pub fn push(&mut self, key: K, task: tokio::task::AbortHandle) {
        self.0.retain(|(_, h)| !h.is_finished());
        self.0.push((key, task));
    }

    /// Aborts the task of `key`: `None` if unknown, else whether it was still
    /// running (it will deliver nothing).
    pub fn abort(&mut self, key: &K) -> Option<bool> {
        let k = self.0.iter().position(|(c, _)| c == key)?;
        let (_, h) = self.0.swap_remove(k);
        let running = !h.is_finished();
        h.abort();
        Some(running)
    }

    /// Aborts every task whose key `matches` (they will deliver nothing).
    pub fn abort_all(&mut self, matches: impl Fn(&K) -> bool) {
        self.0.retain(|(k, h)| {
            if matches(k) {
                h.abort();
                false
            } else {
                true
            }
        });
    }
}

impl<K: PartialEq> Default for Aborts<K> {
    fn default() -> Self {
        Self::new()
    }
}

/// Callouts in flight, each a task on the worker's `LocalSet` that the filter
/// which sent it can abort ([`ExchangeData::cancelled`]). Dropping the set
/// aborts them all. The [`JoinSet`](tokio::task::JoinSet) is made with the
/// first task: making one allocates, and most exchanges send no callout.
pub struct Inflight<T> {
    tasks: Option<tokio::task::JoinSet<T>>,
    /// Tasks whose results are delivered as they arrive
    /// ([`HttpFilter::delivers_on_arrival`]), apart so that they can be
    /// joined without the others ([`Inflight::try_join_eager`]).
    eager: Option<tokio::task::JoinSet<T>>,
    /// By (filter index, callout id).
    handles: Aborts<(usize, u64)>,
}

impl<T: 'static> Inflight<T> {
    /// No callouts.
    pub const fn new() -> Self {
        Inflight {
            tasks: None,
            eager: None,
            handles: Aborts::new(),
        }
    }

    /// Runs `task`, filter `i`'s callout `id`.
    pub fn spawn(&mut self, i: usize, id: u64, task: impl Future<Output = T> + 'static) {
        let h = self
            .tasks
            .get_or_insert_with(tokio::task::JoinSet::new)
            .spawn_local(task);
        self.handles.push((i, id), h);
    }

    /// Runs `task` as [`Inflight::spawn`], among the tasks whose results are
    /// delivered as they arrive ([`Inflight::try_join_eager`]).
    pub fn spawn_eager(&mut self, i: usize, id: u64, task: impl Future<Output = T> + 'static) {
        let h = self
            .eager
            .get_or_insert_with(tokio::task::JoinSet::new)
            .spawn_local(task);
        self.handles.push((i, id), h);
    }

    /// A task of [`Inflight::spawn_eager`] that has finished, if any, without
    /// waiting.
    pub fn try_join_eager(&mut self) -> Option<Result<T, tokio::task::JoinError>> {
        self.eager.as_mut()?.try_join_next()
    }

    /// Aborts filter `i`'s callout `id`: `true` if its task had not finished
    /// (it will deliver nothing), `false` if it is unknown or already done.
    pub fn cancel(&mut self, i: usize, id: u64) -> bool {
        self.handles.abort(&(i, id)) == Some(true)
    }

    /// Aborts every callout (and wake-up) of filter `i`.
    pub fn cancel_filter(&mut self, i: usize) {
        self.handles.abort_all(|(f, _)| *f == i);
    }

    /// Whether no task is left (finished ones not yet joined count).
    pub fn is_empty(&self) -> bool {
        let empty = |t: &Option<tokio::task::JoinSet<T>>| {
            t.as_ref().is_none_or(tokio::task::JoinSet::is_empty)
        };
        empty(&self.tasks) && empty(&self.eager)
    }

    /// The next task to finish, of either kind
    /// ([`JoinSet::join_next`](tokio::task::JoinSet::join_next)); `None` at
    /// once if there is none.
    pub async fn join_next(&mut self) -> Option<Result<T, tokio::task::JoinError>> {
        // An empty set answers `None` at once: it must not win the race.
        fn live<T>(
            t: &mut Option<tokio::task::JoinSet<T>>,
        ) -> Option<&mut tokio::task::JoinSet<T>> {
            t.as_mut().filter(|t| !t.is_empty())
        }
        match (live(&mut self.tasks), live(&mut self.eager)) {
            (None, None) => None,
            (Some(t), None) | (None, Some(t)) => t.join_next().await,
            // (`join_next` is cancel safe: the loser keeps its result.)
            (Some(t), Some(e)) => tokio::select! {
                r = t.join_next() => r,
                r = e.join_next() => r,
            },
        }
    }

    /// A task that has finished, if any, of either kind, without waiting.
    pub fn try_join_next(&mut self) -> Option<Result<T, tokio::task::JoinError>> {
        match self
            .tasks
            .as_mut()
            .and_then(tokio::task::JoinSet::try_join_next)
        {
            Some(r) => Some(r),
            None => self.try_join_eager(),
        }
    }

    /// Aborts every task.
    pub fn abort_all(&mut self) {
        for t in [&mut self.tasks, &mut self.eager].into_iter().flatten() {
            t.abort_all();
        }
    }
}

impl<T: 'static> Default for Inflight<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Sends callouts for a chain: the proxy's implementation goes through the worker's
/// upstream pool and the clusters of the exchange's config snapshot.
pub trait CalloutSender {
    /// Sends `req`; the future resolves with the response or the error (its own
    /// timeout included).
    fn send(&self, req: CalloutRequest) -> CalloutFuture;

    /// Opens a streaming callout (proxy-wasm gRPC streams): `body` replaces
    /// `req.body` and is sent as it is produced; the future resolves with the
    /// response head, whose body the caller reads as it arrives. No timeout and
    /// no size cap apply (the caller bounds what it keeps); `req.timeout` and
    /// `req.max_response_body` are ignored. Senders that cannot stream answer
    /// [`CalloutError::Unavailable`].
    fn open_stream(&self, req: CalloutRequest, body: crate::body::Body) -> CalloutStreamFuture {
        let _ = (req, body);
        Box::pin(async { Err(CalloutError::Unavailable) })
    }
}

/// A response produced by a filter.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    /// Status (200..=599, checked by the filter implementation).
    pub status: StatusCode,
    /// Headers; the host drops hop-by-hop fields and sets `content-length`.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// A short token for logs.
    pub details: String,
    /// The gRPC status a filter asked for (proxy-wasm's `grpc_status`): the
    /// answer's `grpc-status` if the request is gRPC ([`crate::local_reply`]),
    /// ignored otherwise. `None`: mapped from `status`.
    pub grpc_status: Option<u32>,
}

/// A connection id no other connection of this process has (from 1): taken
/// when a connection's facts are first made, which only a connection a
/// filter sees needs.
pub fn next_connection_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The `details` of the answer a filter gives for a body it held over its cap
/// (`413`/`502`): the host's answer, made in the filter's name, which the
/// filter itself does not see (abi/README.md §3.6), even one that sees its own
/// local responses ([`HttpFilter::sees_own_local_response`]).
pub const BUFFER_LIMIT_DETAILS: &str = "plugin_buffer_limit";

/// Facts about the downstream connection, shared by its requests.
#[derive(Debug, Clone)]
pub struct ConnFacts {
    /// Unique in this process ([`next_connection_id`]): proxy-wasm's
    /// `connection.id`, Envoy's downstream connection id.
    pub id: u64,
    /// The client.
    pub source: SocketAddr,
    /// Our address the client connected to.
    pub destination: SocketAddr,
    /// TLS facts for TLS connections.
    pub tls: Option<TlsFacts>,
}

impl ConnFacts {
    /// `Some(true)` for TLS 1.3, `Some(false)` for 1.2, `None` for plaintext.
    pub fn tls13(&self) -> Option<bool> {
        self.tls.as_ref().map(|t| t.tls13)
    }

    /// The SNI the client sent, if any.
    pub fn sni(&self) -> Option<String> {
        self.tls.as_ref().and_then(|t| t.sni.clone())
    }

    /// A client certificate was presented and verified.
    pub fn peer_cert_present(&self) -> bool {
        self.peer_cert().is_some()
    }

    /// The client certificate's subject (RFC 4514), if any.
    pub fn peer_subject(&self) -> Option<String> {
        self.peer_cert().and_then(|p| p.subject.clone())
    }

    /// The client's verified certificate, if any.
    pub fn peer_cert(&self) -> Option<&PeerCert> {
        self.tls.as_ref().and_then(|t| t.peer.as_deref())
    }
}

/// TLS facts of a connection.
#[derive(Debug, Clone)]
pub struct TlsFacts {
    /// TLS 1.3 (else 1.2).
    pub tls13: bool,
    /// SNI sent by the client.
    pub sni: Option<String>,
    /// The client certificate, presented and verified.
    pub peer: Option<Arc<PeerCert>>,
}

impl TlsFacts {
    /// The facts of a downstream TLS session filters may learn.
    pub fn of(t: &TlsInfo) -> Self {
        TlsFacts {
            tls13: t.version == "TLSv1.3",
            sni: t.sni.clone(),
            peer: t.peer.clone(),
        }
    }
}

/// The request's route as last selected.
#[derive(Debug, Clone, Default)]
struct Routing {
    valid: bool,
    route: Option<Arc<str>>,
    cluster: Option<String>,
}

/// A byte counter the proxy keeps and filters read as it goes. Atomic only
/// because a Wasm store's data must be `Send`: one thread writes it (the
/// exchange's worker), so it is a plain load and store, no locked add.
#[derive(Clone, Debug, Default)]
pub struct ByteCount(Arc<std::sync::atomic::AtomicU64>);

impl ByteCount {
    /// The bytes counted so far.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the count.
    pub fn set(&self, n: u64) {
        self.0.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts `n` more bytes.
    pub fn add(&self, n: u64) {
        self.set(self.get().saturating_add(n));
    }
}

/// An exchange's body bytes so far, counted by the proxy: received from the
/// client (as each chunk arrives, before the filters see it) and sent to it
/// (as each chunk leaves, after them), as Envoy's `bytesReceived()` and
/// `bytesSent()`. Shared with the proxy's counters, so every callback reads
/// the count of the moment.
#[derive(Clone, Debug, Default)]
pub struct BodyBytes {
    /// `None`: the request has no body (nothing to count).
    pub received: Option<ByteCount>,
    /// `None`: the proxy set no counter (no response body has begun).
    pub sent: Option<ByteCount>,
}

impl BodyBytes {
    /// The request body bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.as_ref().map_or(0, ByteCount::get)
    }

    /// The response body bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.as_ref().map_or(0, ByteCount::get)
    }
}

/// One HTTP exchange as filters see it ([`ExchangeData`], reached through `Deref`).
/// Boxed because a Wasm store holds the exchange for the duration of each guest
/// call: swapping it in and out moves a pointer instead of copying the whole
/// struct twice per call (a proxy-wasm filter makes four such calls per request).
#[derive(Debug)]
pub struct Exchange(Box<ExchangeData>);

impl std::ops::Deref for Exchange {
    type Target = ExchangeData;
    fn deref(&self) -> &ExchangeData {
        &self.0
    }
}

impl std::ops::DerefMut for Exchange {
    fn deref_mut(&mut self) -> &mut ExchangeData {
        &mut self.0
    }
}

/// The fields of an [`Exchange`]. Plain data (`Send`), so a Wasm store can hold it
/// while the guest runs; the proxy moves the request head in before the request
/// phases and out after.
#[derive(Debug)]
pub struct ExchangeData {
    /// The id filters key per-exchange state by (unique in the process).
    pub context: u64,
    /// Request method.
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// Host and optional port.
    pub authority: String,
    /// The downstream connection is TLS.
    pub https: bool,
    /// Downstream protocol.
    pub version: Version,
    /// Request headers; filters reach them through
    /// [`ExchangeData::request_headers`], which hides `host` (the authority is
    /// [`ExchangeData::authority`]). Once the request went upstream, a snapshot
    /// of them as sent, if a filter may still read them.
    request_headers: Head,
    /// Response status, once a response head exists.
    pub status: Option<StatusCode>,
    /// Response headers, once a response head exists; once it went to the
    /// client, a snapshot of it as sent, if a filter may still read it.
    pub response_headers: Option<Head>,
    /// The connection.
    pub conn: Arc<ConnFacts>,
    /// `x-request-id`: the request's header value itself (its bytes shared,
    /// not copied); filters read it as text ([`ExchangeData::request_id_str`]).
    pub request_id: http::HeaderValue,
    /// When the request head was received.
    pub start: SystemTime,
    /// The upstream endpoint of the last attempt.
    pub upstream: Option<SocketAddr>,
    /// The access-log cause of a failed exchange.
    pub cause: Option<String>,
    /// The body bytes received from the client and sent to it so far (the
    /// proxy's counters): proxy-wasm's `request.size` and `response.size`
    /// without a `content-length`, in every callback, as Envoy's.
    pub body_bytes: BodyBytes,
    /// Callouts queued by the current call, sent by the chain after it returns.
    pub callouts: Vec<CalloutRequest>,
    /// Ids of the calling filter's callouts it cancelled in the current call
    /// (proxy-wasm's `proxy_grpc_cancel`): the chain aborts them after it
    /// returns, which resets their upstream requests.
    pub cancelled: Vec<u64>,
    /// Wake-ups the calling filter armed in the current call, by id (unique
    /// among its callouts): each is delivered like a callout response (with
    /// the id, to `on_callout_response`) once its sender fires, and keeps a
    /// pause waiting as an outstanding callout does. proxy-wasm filters wait
    /// on their gRPC streams with them (HTTP exchanges only).
    pub wakes: Vec<(u64, tokio::sync::oneshot::Receiver<CalloutResult>)>,
    /// Asynchronous KV calls the calling filter started in the current call
    /// (`kv.namespace.start-*`), by id (from its callout ids' sequence): run by
    /// the chain after it returns, their replies delivered to
    /// [`HttpFilter::on_kv_response`]; they keep a pause waiting as callouts do.
    pub kv_calls: Vec<KvCall>,
    /// The body data held for the filter being called, per direction
    /// ([`Direction::idx`]): the chunk or the whole buffered body; `None` outside
    /// body phases (bodies are not kept after they are forwarded).
    /// A chunk is lent as it arrived until a filter writes it.
    pub bodies: [Option<BodyBuf>; 2],
    /// The trailers per direction, once they arrived (kept for later phases).
    pub trailers: [Option<HeaderMap>; 2],
    /// The body settings of the filter being called.
    pub body_ctl: BodyCtl,
    /// Whether this is the chain's first call into the filter being called for
    /// this exchange (its instance learns the context then; any later call on an
    /// instance that does not know it means that instance was replaced).
    pub first_call: bool,
    /// Whether the current body or trailers call may return pause: the host holds
    /// the whole message (buffered mode) and waits a pause out. For a streamed
    /// message see [`ExchangeData::hold_stream`] and [`ExchangeData::hold_end`].
    pub hold_body: bool,
    /// Whether the current call is the end of a streamed message (its last body
    /// call, its trailers), where a filter Envoy would let hold the rest of the
    /// message (proxy-wasm, a call outstanding) may return pause: the body
    /// stream then waits for the call's callback ([`Chain::resume`]).
    pub hold_end: bool,
    /// Whether the current call is a body or trailers call of a streamed
    /// message (a chunk, or its end) that the chain can hold: a component
    /// filter may pause there with a callout outstanding (abi/README.md §3.3),
    /// and the body stream stops reading that body until the filter resumes
    /// ([`Chain::resume`]). proxy-wasm filters read [`ExchangeData::hold_end`]
    /// instead: mid-stream they hold paused chunks themselves (Envoy's
    /// `StopIterationAndBuffer`).
    pub hold_stream: bool,
    /// A filter reset the stream (proxy-wasm's `proxy_close_stream`, Envoy's
    /// `resetStream`): its own outcome, not a failure. The chain ends the
    /// exchange with a reset whatever the filter's failure policy
    /// ([`Chain::fail`]); the filter's call returns an error that says so.
    pub reset: bool,
    /// The current call is a callout's result delivered between the
    /// exchange's phases, as it arrived ([`HttpFilter::delivers_on_arrival`]):
    /// no part of the exchange is held for it, the heads went on as the
    /// filters left them, and writes to them go nowhere.
    pub idle: bool,
    /// The values proxy-wasm filters set with `proxy_set_property` (Envoy's
    /// filter state, keys `wasm.<path>`): the exchange's (a TCP connection's
    /// for network filters), so every proxy-wasm filter of the chain — other
    /// plugins, other VMs — reads what an earlier one set, until the exchange
    /// ends (its `on_log` included). Capped per exchange
    /// ([`crate::wasm::proxy_wasm::properties::MAX_PROPS`]). Boxed, made at
    /// the first set: most exchanges have none, and the exchange must stay
    /// small (`an_exchange_fits_a_small_allocation`).
    pub wasm_props: Option<Box<crate::wasm::proxy_wasm::properties::Props>>,
    /// Where the client's `host` header is. It stays in `request_headers` until
    /// something reaches the head through [`ExchangeData::request_headers`]:
    /// moving it out and back costs two header-map operations (~0.4k
    /// instructions) that a filter which never looks at the head (most
    /// request-header phases of most filters) should not pay.
    host: ClientHost,
    table: Option<Arc<RouteTable>>,
    routing: Routing,
}

/// Where an exchange's client `host` header is (see `ExchangeData::host`).
#[derive(Debug)]
pub enum ClientHost {
    /// Still in the request head, if the client sent one.
    InHead,
    /// Taken out of the head: the header, if there was one.
    Taken(Option<http::HeaderValue>),
}

/// The request head moved out of an exchange for the request sent on
/// ([`ExchangeData::take_request_head`]).
#[derive(Debug)]
pub struct RequestHead {
    /// The fields as the filters left them.
    pub headers: HeaderMap,
    /// Where the client's `host` is: still in `headers` (no filter reached the
    /// head), or taken out (then `headers` has none).
    pub host: ClientHost,
}

/// How many fields of `map` a filter sees: all but `host` if `hides_host`
/// (a request head that still holds the client's, see
/// [`ExchangeData::request_headers_with_host`]).
pub fn visible_len(map: &HeaderMap, hides_host: bool) -> usize {
    let hidden = if hides_host {
        map.get_all(http::header::HOST).iter().count()
    } else {
        0
    };
    map.len() - hidden
}

impl ExchangeData {
    /// The request id as filters see it (empty if it is not visible ASCII).
    pub fn request_id_str(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }

    /// The request headers as filters see them: without `host` (the authority
    /// is [`ExchangeData::authority`]).
    pub fn request_headers(&mut self) -> &mut Head {
        if matches!(self.host, ClientHost::InHead) {
            self.host = ClientHost::Taken(self.request_headers.remove(http::header::HOST));
        }
        &mut self.request_headers
    }

    /// The request headers as they are, and whether the client's `host` may
    /// still be in them (`true`): for a caller that hides `host` itself, so
    /// that reading another field, or writing one (`host` is not writable),
    /// does not move it out.
    pub fn request_headers_with_host(&mut self) -> (&mut Head, bool) {
        let in_head = matches!(self.host, ClientHost::InHead);
        (&mut self.request_headers, in_head)
    }

    /// How many request headers filters see (without `host`), without moving
    /// the client's `host` out of the head to count them.
    pub fn request_header_count(&self) -> usize {
        visible_len(
            &self.request_headers,
            matches!(self.host, ClientHost::InHead),
        )
    }

    /// Moves the request head out for the request sent on. If `keep`, a
    /// snapshot of it (without `host`) stays for filters that read it later.
    pub fn take_request_head(&mut self, keep: bool) -> RequestHead {
        let headers = self.request_headers.take();
        if keep {
            // The client's `host` may be in `headers` still: skipped.
            self.request_headers = Head::snapshot_without(&headers, Some(&http::header::HOST));
        }
        RequestHead {
            headers,
            host: std::mem::replace(&mut self.host, ClientHost::Taken(None)),
        }
    }
}

static NEXT_CONTEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Exchange {
    /// A new exchange for a request head.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        method: Method,
        path: String,
        authority: String,
        version: Version,
        request_headers: HeaderMap,
        conn: Arc<ConnFacts>,
        request_id: http::HeaderValue,
        table: Option<Arc<RouteTable>>,
    ) -> Self {
        Exchange(Box::new(ExchangeData {
            context: NEXT_CONTEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            method,
            path,
            authority,
            https: conn.tls.is_some(),
            version,
            request_headers: request_headers.into(),
            status: None,
            response_headers: None,
            conn,
            request_id,
            start: SystemTime::now(),
            upstream: None,
            cause: None,
            body_bytes: BodyBytes::default(),
            callouts: Vec::new(),
            cancelled: Vec::new(),
            wakes: Vec::new(),
            kv_calls: Vec::new(),
            bodies: [None, None],
            trailers: [None, None],
            body_ctl: BodyCtl::default(),
            first_call: false,
            hold_body: false,
            hold_end: false,
            hold_stream: false,
            reset: false,
            idle: false,
            wasm_props: None,
            host: ClientHost::InHead,
            table,
            routing: Routing::default(),
        }))
    }

    /// An empty exchange (context 0, never live): the stand-in a Wasm store holds
    /// between calls, swapped with the real one for the duration of a call.
    pub fn placeholder() -> Self {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        Exchange(Box::new(ExchangeData {
            context: 0,
            method: Method::GET,
            path: String::new(),
            authority: String::new(),
            https: false,
            version: Version::HTTP_11,
            request_headers: Head::default(),
            status: None,
            response_headers: None,
            conn: Arc::new(ConnFacts {
                id: 0,
                source: unspecified,
                destination: unspecified,
                tls: None,
            }),
            request_id: http::HeaderValue::from_static(""),
            start: SystemTime::UNIX_EPOCH,
            upstream: None,
            cause: None,
            body_bytes: BodyBytes::default(),
            callouts: Vec::new(),
            cancelled: Vec::new(),
            wakes: Vec::new(),
            kv_calls: Vec::new(),
            bodies: [None, None],
            trailers: [None, None],
            body_ctl: BodyCtl::default(),
            first_call: false,
            hold_body: false,
            hold_end: false,
            hold_stream: false,
            reset: false,
            idle: false,
            wasm_props: None,
            host: ClientHost::Taken(None),
            table: None,
            routing: Routing::default(),
        }))
    }

    /// Records that the request head changed: the route is selected again.
    pub fn head_changed(&mut self) {
        self.routing.valid = false;
    }

    fn routing(&mut self) -> &Routing {
        if !self.routing.valid {
            self.routing = self.select_route();
        }
        &self.routing
    }

    fn select_route(&self) -> Routing {
        let mut r = Routing {
            valid: true,
            ..Routing::default()
        };
        let Some(table) = &self.table else { return r };
        let Ok(uri) = self.path.parse::<Uri>() else {
            return r;
        };
        let input = RouteInput {
            method: &self.method,
            uri: &uri,
            authority: &self.authority,
            headers: &self.request_headers,
            scheme_https: self.https,
            client_cert: self.conn.peer_cert(),
            client_ip: self.conn.source.ip(),
        };
        if let Some(m) = table.route(&input) {
            r.route = Some(m.route.name.clone());
            r.cluster = match &m.route.action {
                Action::Cluster(n) => Some(n.to_string()),
                Action::Weighted(w) => Some(w.pick(rand::rng().random()).to_string()),
                Action::Redirect(_) | Action::Direct { .. } | Action::Health(_) => None,
            };
        }
        r
    }

    /// The route selected for the current head.
    pub fn route_name(&mut self) -> Option<Arc<str>> {
        self.routing().route.clone()
    }

    /// The cluster the current head goes to (`None` for local answers).
    pub fn cluster(&mut self) -> Option<String> {
        self.routing().cluster.clone()
    }
}

/// An HTTP filter: one loaded plugin (configured), shared by every worker. An
/// implementation keeps its per-worker state (Wasm instances) itself, keyed by the
/// `worker` index it is called with; calls for one worker come from that worker's
/// thread only.
pub trait HttpFilter: Send + Sync {
    /// The plugin name (stats, logs, the 503 body).
    fn name(&self) -> &str;
    /// The phases it declared.
    fn phases(&self) -> Phases;
    /// `fail: open`: a failure skips the filter instead of failing the request.
    fn fail_open(&self) -> bool;
    /// The request head. `Err` is a failure (trap, deadline, invalid return).
    fn on_request_headers(
        &self,
        worker: usize,
        x: &mut Exchange,
        end_of_stream: bool,
    ) -> Result<Verdict, String>;
    /// The response head (`x.status`, `x.response_headers` are set).
    fn on_response_headers(
        &self,
        worker: usize,
        x: &mut Exchange,
        end_of_stream: bool,
    ) -> Result<Verdict, String>;
    /// The result of callout `id`, which this filter queued for exchange `x`.
    /// `paused`: the filter is paused (in the phase it returned [`Verdict::Pause`]
    /// from); the verdict then resumes it, answers, or keeps it paused. Not paused,
    /// `Continue` and `Pause` mean nothing to do. Filters that never queue callouts
    /// need not implement it.
    fn on_callout_response(
        &self,
        worker: usize,
        x: &mut Exchange,
        id: u64,
        result: CalloutResult,
        paused: bool,
    ) -> Result<Verdict, String> {
        let _ = (worker, x, id, result, paused);
        Ok(Verdict::Continue)
    }
    /// The reply to KV call `id` (`kv.namespace.start-*`), which this filter
    /// started for exchange `x`; `paused` as for
    /// [`HttpFilter::on_callout_response`]. Filters that never start one need
    /// not implement it.
    fn on_kv_response(
        &self,
        worker: usize,
        x: &mut Exchange,
        id: u64,
        result: KvResult,
        paused: bool,
    ) -> Result<Verdict, String> {
        let _ = (worker, x, id, result, paused);
        Ok(Verdict::Continue)
    }
    /// Request headers this filter owns (a Wasm plugin's
    /// `sanitize-request-headers`): removed from every request of a chain
    /// that lists it, before the chain's first filter, on every route — also
    /// where a route disables it or overrides its config.
    fn sanitized_request_headers(&self) -> &[HeaderName] {
        &[]
    }
    /// Whether it reads the exchange's body byte counts as they grow
    /// ([`ExchangeData::body_bytes`]: proxy-wasm's `request.size` and
    /// `response.size`). The proxy keeps them for a chain with such a filter
    /// only, so other chains pay nothing for them.
    fn reads_body_sizes(&self) -> bool {
        false
    }
    /// The chain found this filter failed without a failing call: it paused
    /// where nothing can end the pause (no callout in flight, or a streamed
    /// part the host cannot hold). For the filter's stats, as its own failures.
    fn host_failure(&self) {}
    /// The chain gave up this filter's pause (past its `limits.pause`): its
    /// callouts were aborted and will deliver nothing; the filter drops what
    /// it kept for the pause.
    fn pause_abandoned(&self, worker: usize, x: &mut Exchange) {
        let _ = (worker, x);
    }
    /// For a pause of this filter: resolves once the instance holding the
    /// context of exchange `context` on `worker` is gone (it trapped in
    /// another call, abi/README.md §9), so that the pause fails at once;
    /// `None` for a filter whose pauses cannot lose their instance.
    fn instance_gone(&self, worker: usize, context: u64) -> Option<InstanceGone> {
        let _ = (worker, context);
        None
    }
    /// Whether the results of this filter's callouts and wake-ups are
    /// delivered as they arrive, also while it is not paused: between the
    /// exchange's phases (with [`ExchangeData::idle`] set), as Envoy runs a
    /// proxy-wasm filter's callbacks when the response arrives, whatever the
    /// stream's state; one that arrived but was not delivered yet when the
    /// exchange ends is delivered before `on-log`. Otherwise (the component
    /// ABI, abi/README.md §5.8) a result for a filter that is not paused waits
    /// until the exchange next waits on a pause or reaches its response
    /// phase, and is dropped if the exchange ends first.
    fn delivers_on_arrival(&self) -> bool {
        false
    }
    /// Whether this filter's own local response from a request phase (or
    /// from a callout result before the response exists) runs through its own
    /// response phases, and those of the filters after it whose request
    /// headers phase ran and that say so too: Envoy's
    /// `sendLocalReplyViaFilterChain`, which encodes the answer through every
    /// encoder filter, a proxy-wasm filter's context taking part once it was
    /// created (its request headers came). Otherwise (the component ABI,
    /// abi/README.md §3.5) the answer enters the response path right after
    /// the filter that made it.
    fn sees_own_local_response(&self) -> bool {
        false
    }
    /// The default body mode of direction `d` (meaningful only if that body phase
    /// is declared).
    fn body_mode(&self, d: Direction) -> BodyMode {
        let _ = d;
        BodyMode::Skipped
    }
    /// The cap of a body this filter has buffered (`limits.body`).
    fn body_limit(&self) -> usize {
        DEFAULT_BODY_LIMIT
    }
    /// How long one pause of this filter may hold the exchange (`limits.pause`);
    /// `None`: no bound.
    fn pause_limit(&self) -> Option<Duration> {
        Some(DEFAULT_PAUSE_LIMIT)
    }
    /// A body of direction `d` went over this filter's cap (for its stats).
    fn body_limit_exceeded(&self, d: Direction) {
        let _ = d;
    }
    /// Body data of direction `d`, in `x.bodies[d.idx()]` (the filter may change
    /// it); `end_of_stream`: no more body data follows. Called only for filters that
    /// declared the phase and whose mode is not skipped.
    fn on_body(
        &self,
        worker: usize,
        x: &mut Exchange,
        d: Direction,
        end_of_stream: bool,
    ) -> Result<Verdict, String> {
        let _ = (worker, x, d, end_of_stream);
        Ok(Verdict::Continue)
    }
    /// The trailers of direction `d`, in `x.trailers[d.idx()]` (writable). Called
    /// only for filters that declared the phase.
    fn on_trailers(
        &self,
        worker: usize,
        x: &mut Exchange,
        d: Direction,
    ) -> Result<Verdict, String> {
        let _ = (worker, x, d);
        Ok(Verdict::Continue)
    }
    /// This plugin as a network (L4) filter for TCP listeners, if it is one
    /// (`crate::network_filter`); HTTP-only filters are not.
    fn network(self: Arc<Self>) -> Option<Arc<dyn crate::network_filter::NetworkFilter>> {
        None
    }
    /// After the response (read-only).
    fn on_log(&self, worker: usize, x: &mut Exchange);
    /// The exchange is over; always called for a filter that saw the exchange, so
    /// the implementation can free per-exchange state (it calls the guest only if
    /// the `done` phase was declared and the filter did not `detached` itself).
    fn on_done(&self, worker: usize, context: u64, detached: bool);
    /// The config holding this filter went live on `worker` (at start, after a
    /// reload). A filter with work of its own, not driven by exchanges (a Wasm
    /// plugin that ticks), starts its per-worker state here, as Envoy starts
    /// each worker's VM with the config; others wait for their first exchange.
    /// Must not fail the worker: a failure is the filter's to log and retry.
    fn start_on_worker(&self, worker: usize) {
        let _ = worker;
    }
}

/// Loads filters for a config. The Wasm host registers itself here; tests and native
/// filters can use any other implementation.
pub type Loader =
    fn(&Config, &Arc<Stats>) -> anyhow::Result<HashMap<FilterKey, Arc<dyn HttpFilter>>>;

/// A filter instance set: a plugin, with the route's `config` override if any.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FilterKey {
    /// Plugin name.
    pub plugin: Name,
    /// `None`: the plugin's own config; `Some(json)`: a route's override.
    pub config_override: Option<String>,
}

/// What a route does with one filter of the chain.
#[derive(Clone)]
enum RouteChoice {
    Disabled,
    Use(Arc<dyn HttpFilter>),
}

/// One entry of a listener's chain.
#[derive(Clone)]
struct Slot {
    filter: Arc<dyn HttpFilter>,
    /// By route name.
    routes: HashMap<Arc<str>, RouteChoice>,
}

impl Slot {
    fn resolve(&self, route: Option<&Arc<str>>) -> Option<Arc<dyn HttpFilter>> {
        match route.and_then(|r| self.routes.get(r)) {
            Some(RouteChoice::Disabled) => None,
            Some(RouteChoice::Use(f)) => Some(f.clone()),
            None => Some(self.filter.clone()),
        }
    }
}

/// The filter chains of one config version: per listener, with route overrides.
#[derive(Default)]
pub struct Filters {
    chains: rustc_hash::FxHashMap<Name, ListenerChain>,
}

/// One listener's chain.
struct ListenerChain {
    slots: Arc<[Slot]>,
    /// The request headers its plugins own
    /// ([`HttpFilter::sanitized_request_headers`], route overrides' configs
    /// included), each once: removed from every request before the chain's
    /// first filter.
    sanitize: Box<[HeaderName]>,
}

impl Filters {
    /// Builds the chains from the config, loading every plugin with `load`.
    pub fn build(config: &Config, stats: &Arc<Stats>, load: Loader) -> anyhow::Result<Self> {
        if config.plugins.is_empty() {
            return Ok(Filters::default());
        }
        let loaded = load(config, stats)?;
        // Route overrides by plugin: route name → choice.
        let mut overrides: HashMap<&Name, HashMap<Arc<str>, RouteChoice>> = HashMap::new();
        for t in &config.routes {
            for vh in &t.value.virtual_hosts {
                for (i, r) in vh.value.routes.iter().enumerate() {
                    let route_name: Arc<str> = match &r.value.name {
                        Some(n) => n.as_str().into(),
                        None => format!("{}/{i}", vh.value.name).into(),
                    };
                    for (plugin, f) in &r.value.filters {
                        let choice = if f.disabled {
                            RouteChoice::Disabled
                        } else {
                            let key = FilterKey {
                                plugin: plugin.clone(),
                                config_override: f.config.as_ref().map(|c| c.to_string()),
                            };
                            match loaded.get(&key) {
                                Some(f) => RouteChoice::Use(f.clone()),
                                None => continue,
                            }
                        };
                        overrides
                            .entry(plugin)
                            .or_default()
                            .insert(route_name.clone(), choice);
                    }
                }
            }
        }
        let mut chains = rustc_hash::FxHashMap::default();
        for l in &config.listeners {
            let Some(http) = &l.value.http else { continue };
            if http.filters.is_empty() {
                continue;
            }
            let mut slots = Vec::new();
            let mut sanitize: Vec<HeaderName> = Vec::new();
            for f in &http.filters {
                let name = &f.value.plugin.value;
                let key = FilterKey {
                    plugin: name.clone(),
                    config_override: None,
                };
                let filter = loaded
                    .get(&key)
                    .ok_or_else(|| anyhow::anyhow!("plugin `{name}` was not loaded"))?
                    .clone();
                let routes = overrides.get(name).cloned().unwrap_or_default();
                // A route that disables the plugin or gives it another config
                // still loses the headers it owns: else a client's forged
                // identity would reach that route's upstream.
                let owned = std::iter::once(&filter)
                    .chain(routes.values().filter_map(|c| match c {
                        RouteChoice::Use(f) => Some(f),
                        RouteChoice::Disabled => None,
                    }))
                    .flat_map(|f| f.sanitized_request_headers());
                for h in owned {
                    if !sanitize.contains(h) {
                        sanitize.push(h.clone());
                    }
                }
                slots.push(Slot { filter, routes });
            }
            chains.insert(
                l.value.name.clone(),
                ListenerChain {
                    slots: slots.into(),
                    sanitize: sanitize.into(),
                },
            );
        }
        Ok(Filters { chains })
    }

    /// Starts the chain of `listener` for one exchange; `None` if it has no filters.
    /// `x` makes the exchange and `callouts` the sender of the callouts its filters
    /// queue: both only when there is a chain, so a listener without filters pays
    /// nothing for them.
    pub fn start(
        &self,
        listener: &Name,
        worker: usize,
        x: impl FnOnce() -> Exchange,
        callouts: impl FnOnce() -> Rc<dyn CalloutSender>,
    ) -> Option<Box<Chain>> {
        let chain = self.chains.get(listener)?;
        let slots = chain.slots.clone();
        let mut x = x();
        if !chain.sanitize.is_empty() {
            // `host` is never among them (host-owned, refused at declaration).
            let (head, _) = x.request_headers_with_host();
            for h in &chain.sanitize {
                head.remove(h);
            }
        }
        let callouts = callouts();
        WORKER_CALLOUTS.with(|c| *c.borrow_mut() = Some(callouts.clone()));
        let n = slots.len();
        // Boxed where it is made: it is shared boxed (`SharedChain`), and a
        // chain moved by value is copied at each move.
        Some(Box::new(Chain {
            worker,
            slots,
            x,
            entered: PerFilter::with_capacity(n),
            ctl: PerFilter::with_capacity(n),
            called: PerFilter::with_capacity(n),
            skipped: Vec::new(),
            responded: None,
            self_answered: false,
            replaced_response: None,
            callouts,
            inflight: Inflight::new(),
            finished: false,
            shared: std::rc::Weak::new(),
            deferred: None,
            grpc: false,
            bodyless: [false; 2],
            pump: None,
            failed: None,
            answer_from: None,
            stopped: [None; 2],
            reached: 0,
            resized: [(None, None); 2],
        }))
    }
}

/// How a body goes through a chain (see [`Chain::body_plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyPlan {
    /// `Some(cap)`: a filter buffers, so the host reads the whole body (at most
    /// `cap` bytes, the smallest cap of the buffering filters) and calls the body
    /// phases once; `None`: chunks go through as they arrive.
    pub buffer_cap: Option<usize>,
    /// Chunks go through as they arrive but a filter holds the head
    /// ([`BodyCtl::holds_head`]): it waits for them, written back when the
    /// filter lets it go.
    pub holds_head: bool,
}

/// The outcome of the end of a message run over the chain (its last body call
/// and its trailers phases).
#[derive(Debug)]
pub enum EndStep {
    /// Forward this data, then these trailers (`None`: the body ends with its
    /// data).
    Done(Bytes, Option<HeaderMap>),
    /// A filter answered locally.
    Respond(LocalResponse),
    /// A filter of a streamed message paused with a callout in flight: the
    /// rest of the message is held until [`Chain::resume`] resolves.
    Held,
}

/// What [`Chain::run_stopped`] gives.
#[derive(Debug)]
pub enum StoppedRun {
    /// What passed the filters that had their part of the message now, and
    /// the trailers it ended with: to send on once no filter holds the head.
    Passed(Bytes, Option<HeaderMap>),
    /// A filter that buffers this body (at most this many bytes) had its
    /// headers phase: nothing ran over the data, which waits with the rest of
    /// the body, read to its end with the head held.
    Whole(usize),
    /// A filter answered.
    Respond(LocalResponse),
}

/// What [`Chain::resume`] gives once the pause a streamed run stopped on ends.
#[derive(Debug)]
pub enum Resumed {
    /// The held chunk's run: never [`BodyStep::Held`] (later pauses are waited
    /// out in place).
    Chunk(BodyStep),
    /// The held end's run: never [`EndStep::Held`].
    End(EndStep),
}

/// How a body or trailers run treats a filter's pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hold {
    /// The host holds the whole message (buffered): waited out in place.
    Wait,
    /// A streamed chunk before the end, run from a body stream's poll: a pause
    /// (accepted by component filters, [`ExchangeData::hold_stream`]) with a
    /// callout in flight stops the run ([`Deferred`]).
    Chunk,
    /// The same, resumed in the stream's future ([`Chain::resume`]): waited out
    /// in place.
    ChunkWait,
    /// The end of a streamed message, run from a body stream's poll: a pause
    /// (accepted by component filters and by proxy-wasm filters that can be
    /// resumed, [`ExchangeData::hold_end`]) with a callout in flight stops the
    /// run ([`Deferred`]).
    Defer,
    /// The same, resumed in the stream's future ([`Chain::resume`]): waited
    /// out in place.
    EndWait,
}

/// Where a run of a streamed body stopped on a pause.
struct Deferred {
    d: Direction,
    /// The filters of the stage, in order, and the position of the paused one.
    order: Vec<usize>,
    at: usize,
    stage: Stage,
}

/// The stage a [`Deferred`] run stopped in.
enum Stage {
    /// A body call over a chunk before the end (the chunk is on the exchange).
    Chunk,
    /// The last body call (the body is on the exchange); `folding`: trailers
    /// follow (on the exchange).
    Body { folding: bool },
    /// The trailers phases (the trailers are on the exchange), after the body
    /// call left `data`.
    Trailers { data: Bytes },
}

/// The outcome of a body phase run over the chain.
#[derive(Debug)]
pub enum BodyStep {
    /// Forward this data.
    Continue(Bytes),
    /// A filter answered locally.
    Respond(LocalResponse),
    /// A filter paused with a callout in flight: the chunk (on the exchange)
    /// and the rest of the body are held until [`Chain::resume`] resolves.
    Held,
}

/// A chain shared by the proxy and the body streams that run body phases as
/// chunks pass. Synchronous calls borrow it for the call; an async phase (which
/// may wait out a pause) takes it out and puts it back, so no borrow is held
/// across an await. A body stream of the other direction that wants to run its
/// phases while the chain is out (a full-duplex exchange paused in another
/// phase) waits for it ([`SharedChain::poll_available`]) without reading its
/// peer, which is backpressure (abi/README.md §3.3): it is woken when the chain
/// is put back, or when the exchange ends.
#[derive(Clone)]
pub struct SharedChain(Rc<SharedInner>);

struct SharedInner {
    /// Boxed: the chain (with its exchange) moves out and back around every async
    /// phase, and a pointer moves cheaper than the whole struct.
    chain: std::cell::RefCell<Option<Box<Chain>>>,
    /// The exchange is over (`finish` ran): request data still streaming is cut
    /// (`body::Filtered`: nothing may pass a filter unseen), the end passes.
    finished: std::cell::Cell<bool>,
    /// A local response from a streamed request body phase, for the proxy to send
    /// in place of the upstream's.
    local: std::cell::RefCell<Option<LocalResponse>>,
    /// The details of the last local response from a response phase (it
    /// replaced the response, or reset the exchange), for the access log.
    answered: std::cell::RefCell<Option<String>>,
    /// Body streams waiting for the chain to come back from an async phase.
    waiters: std::cell::RefCell<Vec<std::task::Waker>>,
    /// The chain was dropped while out (the exchange was abandoned mid-phase,
    /// e.g. the client went away during a pause): waiting streams must stop,
    /// not pass data unfiltered.
    aborted: std::cell::Cell<bool>,
    /// The final status and cause, when the exchange ended while the chain was
    /// out (a route timeout while a filter held the end of the request): given
    /// to the chain when it finishes after all, so `on-log` sees them.
    ended: std::cell::RefCell<Option<(Option<StatusCode>, Option<String>)>>,
    /// How long body streams held the chain for callouts so far
    /// ([`SharedChain::add_held`]): time that is not the client's.
    held: std::cell::Cell<Duration>,
    /// A filter reset the stream ([`ExchangeData::reset`]): the proxy resets
    /// the downstream stream instead of answering ([`StreamReset`]).
    reset: std::cell::Cell<bool>,
    /// The proxy waiting for a local response a filter may send between
    /// phases ([`SharedChain::poll_answered`]): woken when one comes.
    answer_waker: std::cell::RefCell<Option<std::task::Waker>>,
    /// The response head went to the client ([`SharedChain::head_sent`]): a
    /// local response between phases can no longer be sent; it resets the
    /// stream instead ([`SharedChain::poll_cut`]).
    head_sent: std::cell::Cell<bool>,
    /// A filter answered after the response head went to the client: the
    /// response is cut (its stream reset), as Envoy's `sendLocalReply` once
    /// headers are sent.
    cut: std::cell::Cell<bool>,
    /// The response body waiting for a cut ([`SharedChain::poll_cut`]).
    cut_waker: std::cell::RefCell<Option<std::task::Waker>>,
}

impl SharedInner {
    fn wake_waiters(&self) {
        // Nearly always none: a stream waits only while a phase is paused.
        if self.waiters.borrow().is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for w in waiters {
            w.wake();
        }
    }
}

/// What a local response between phases did
/// ([`SharedChain::answer_between_phases`]).
enum Between {
    /// It answers the exchange (the proxy takes it).
    Answers,
    /// It came after the response head went to the client: the response is
    /// cut instead.
    Resets,
}

/// Why a body stream could not run its phases.
#[derive(Debug)]
pub enum SharedError {
    /// The exchange is over.
    Finished,
    /// The chain is out in an async phase.
    Busy,
    /// The chain was dropped while out in an async phase: the exchange is gone.
    Aborted,
}

impl SharedChain {
    /// Shares `chain`.
    pub fn new(mut chain: Box<Chain>) -> Self {
        SharedChain(Rc::new_cyclic(|me| {
            chain.shared = me.clone();
            SharedInner {
                chain: std::cell::RefCell::new(Some(chain)),
                finished: std::cell::Cell::new(false),
                local: std::cell::RefCell::new(None),
                answered: std::cell::RefCell::new(None),
                waiters: std::cell::RefCell::new(Vec::new()),
                aborted: std::cell::Cell::new(false),
                ended: std::cell::RefCell::new(None),
                held: std::cell::Cell::new(Duration::ZERO),
                reset: std::cell::Cell::new(false),
                answer_waker: std::cell::RefCell::new(None),
                head_sent: std::cell::Cell::new(false),
                cut: std::cell::Cell::new(false),
                cut_waker: std::cell::RefCell::new(None),
            }
        }))
    }

    /// Whether a filter reset the stream ([`ExchangeData::reset`]): the
    /// answer must not be sent, the downstream stream is reset instead.
    pub fn was_reset(&self) -> bool {
        self.0.reset.get()
    }

    /// Whether a body stream can run its phases now: `Pending` while the chain
    /// is out in an async phase (another phase is paused), with `cx` woken when
    /// it is back or the exchange ended. A stream polls this before reading its
    /// peer, so data is left unread (backpressure) rather than refused.
    pub fn poll_available(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let out = !self.0.finished.get() && self.0.chain.try_borrow().is_ok_and(|c| c.is_none());
        if !out {
            return std::task::Poll::Ready(());
        }
        let mut waiters = self.0.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
            waiters.push(cx.waker().clone());
        }
        std::task::Poll::Pending
    }

    /// Counts `d` as time a body stream held the chain for a callout (a paused
    /// chunk or end of a streamed body).
    pub fn add_held(&self, d: Duration) {
        self.0.held.set(self.0.held.get() + d);
    }

    /// How long body streams held the chain for callouts so far: a bound on
    /// the client's time (reading a request body) leaves it out.
    pub fn held_time(&self) -> Duration {
        self.0.held.get()
    }

    /// Takes the chain out for an async phase; put it back with [`Self::put`].
    pub fn take(&self) -> Option<Box<Chain>> {
        self.0.chain.borrow_mut().take()
    }

    /// Puts the chain back after an async phase; body streams waiting for it
    /// go on.
    pub fn put(&self, chain: Box<Chain>) {
        if self.0.finished.get() {
            // The exchange ended while the chain was out (the response was
            // answered meanwhile): nothing will finish it later, so it
            // finishes now (on drop).
            drop(chain);
            return;
        }
        // What arrived while the chain was out, after its wait ended, is
        // delivered now.
        let ready = chain.pump.as_ref().map(|p| p.ready.clone());
        *self.0.chain.borrow_mut() = Some(chain);
        if let Some(ready) = ready {
            ready.notify_one();
        }
        self.0.wake_waiters();
    }

    /// Runs a synchronous step on the chain.
    pub fn with<R>(&self, f: impl FnOnce(&mut Chain) -> R) -> Result<R, SharedError> {
        if self.0.aborted.get() {
            return Err(SharedError::Aborted);
        }
        if self.0.finished.get() {
            return Err(SharedError::Finished);
        }
        let Ok(mut guard) = self.0.chain.try_borrow_mut() else {
            return Err(SharedError::Busy);
        };
        match guard.as_mut() {
            Some(c) => Ok(f(c)),
            None => Err(SharedError::Busy),
        }
    }

    /// Records a local response from a streamed request body phase.
    pub fn set_local(&self, lr: LocalResponse) {
        *self.0.local.borrow_mut() = Some(lr);
    }

    /// The local response a streamed request body phase answered with, if any.
    pub fn take_local(&self) -> Option<LocalResponse> {
        self.0.local.borrow_mut().take()
    }

    /// `Ready` once a local response waits for the proxy ([`Self::take_local`])
    /// and the chain is in (not out in an async phase, whose future must not
    /// be dropped): a filter answered between phases (a callout's result
    /// delivered as it arrived, [`HttpFilter::delivers_on_arrival`]), or from
    /// a streamed request body phase. What the proxy waits on meanwhile (the
    /// upstream, a held head's body) is then dropped for the answer, as
    /// Envoy's `sendLocalReply` answers at once.
    pub fn poll_answered(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0.local.borrow().is_none() {
            let mut w = self.0.answer_waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
            return std::task::Poll::Pending;
        }
        // Out: woken with the body streams when it is back.
        self.poll_available(cx)
    }

    /// [`Self::poll_answered`] as a future.
    pub fn answered(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.poll_answered(cx))
    }

    /// The response head went to the client: a local response a filter sends
    /// between phases from now on can only reset the stream
    /// ([`Self::poll_cut`]).
    pub fn head_sent(&self) {
        self.0.head_sent.set(true);
    }

    /// A local response from a callout's result delivered between phases:
    /// before the response head went to the client, kept for the proxy,
    /// which is woken ([`Between::Answers`]); after it, the response is cut
    /// ([`Between::Resets`], [`Self::cut`]). `None` if the exchange is over
    /// or another answer came first (it stands, as Envoy sends the first).
    fn answer_between_phases(&self, lr: LocalResponse) -> Option<Between> {
        if self.0.finished.get() || self.0.local.borrow().is_some() || self.0.cut.get() {
            return None;
        }
        if self.0.head_sent.get() {
            self.cut(&lr.details);
            return Some(Between::Resets);
        }
        *self.0.local.borrow_mut() = Some(lr);
        if let Some(w) = self.0.answer_waker.borrow_mut().take() {
            w.wake();
        }
        Some(Between::Answers)
    }

    /// A filter answered (with `details`) after the response head went to
    /// the client: nothing can be answered any more, so the response is cut
    /// (the body fails: an HTTP/2 `RST_STREAM`, an HTTP/1.1 connection closed
    /// before the body's end), as Envoy resets the stream when
    /// `sendLocalReply` comes after the response headers. The details stay
    /// for the access log and `on-log` ([`Self::take_answered`]).
    pub fn cut(&self, details: &str) {
        self.set_answered(details);
        self.0.cut.set(true);
        if let Some(w) = self.0.cut_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Whether a filter's answer cut the response ([`Self::cut`]).
    pub fn was_cut(&self) -> bool {
        self.0.cut.get()
    }

    /// `Ready` once a filter's answer cut the response ([`Self::cut`]);
    /// else `cx` is woken when one does. The response body polls this
    /// (`body::Cuttable`), so a cut from a callout's callback between two
    /// chunks reaches the client while the body waits for its upstream.
    pub fn poll_cut(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0.cut.get() {
            return std::task::Poll::Ready(());
        }
        let mut w = self.0.cut_waker.borrow_mut();
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
        std::task::Poll::Pending
    }

    /// Whether a filter of the exchange may answer after the response head
    /// went to the client, from a callout's result delivered as it arrives
    /// ([`HttpFilter::delivers_on_arrival`]): the response body must then
    /// watch for a cut ([`Self::poll_cut`]). Out in an async phase: maybe.
    pub fn may_answer_late(&self) -> bool {
        match self
            .with(|c| (0..c.entered.len()).any(|i| c.live(i) && c.entered[i].delivers_on_arrival()))
        {
            Ok(may) => may,
            Err(SharedError::Busy) => true,
            Err(SharedError::Finished | SharedError::Aborted) => false,
        }
    }

    /// Records the `details` of a local response from a response phase (it
    /// replaced the response, or reset the exchange whose head was out).
    pub fn set_answered(&self, details: &str) {
        self.0.answered.replace(Some(details.to_string()));
    }

    /// The details of the last local response from a response phase, if any:
    /// the access log's `plugin:<details>` (abi/README.md §3.5).
    pub fn take_answered(&self) -> Option<String> {
        self.0.answered.borrow_mut().take()
    }

    /// Ends the exchange: `finish` on the chain (if it is not out), with the
    /// final status (`None`: no response was sent, the client went away first)
    /// and cause. Request data still streaming is not forwarded from now on
    /// (`body::Filtered`); the end of a body passes.
    pub fn finish(&self, status: Option<StatusCode>, cause: Option<&str>) {
        self.0.finished.set(true);
        let chain = self
            .0
            .chain
            .try_borrow_mut()
            .ok()
            .and_then(|mut c| c.take());
        match chain {
            Some(mut chain) => {
                chain.x.status = status;
                chain.x.cause = cause.map(str::to_string);
                chain.run_finish();
            }
            None => *self.0.ended.borrow_mut() = Some((status, cause.map(str::to_string))),
        }
        self.0.wake_waiters();
    }
}

/// Chains up to this long keep their per-filter state inline ([`PerFilter`]).
const INLINE_FILTERS: usize = 4;

/// A chain's per-filter state, inline for short chains.
type PerFilter<T> = smallvec::SmallVec<[T; INLINE_FILTERS]>;

/// A callout result on its way back: the index of the filter (in `entered`) that
/// sent it, its id, the outcome.
type Delivery = (usize, u64, Reply);

/// What a filter waits for: a callout's response or a KV call's reply.
pub enum Reply {
    /// To [`HttpFilter::on_callout_response`].
    Callout(CalloutResult),
    /// To [`HttpFilter::on_kv_response`].
    Kv(KvResult),
}

impl Reply {
    /// The callback's name, for logs.
    fn phase(&self) -> &'static str {
        match self {
            Reply::Callout(_) => "callout_response",
            Reply::Kv(_) => "kv_response",
        }
    }

    /// Hands the reply to `f`'s callback for its kind.
    fn deliver(
        self,
        f: &dyn HttpFilter,
        worker: usize,
        x: &mut Exchange,
        id: u64,
        paused: bool,
    ) -> Result<Verdict, String> {
        match self {
            Reply::Callout(r) => f.on_callout_response(worker, x, id, r, paused),
            Reply::Kv(r) => f.on_kv_response(worker, x, id, r, paused),
        }
    }
}

/// One exchange's run through a listener's chain.
pub struct Chain {
    worker: usize,
    slots: Arc<[Slot]>,
    /// The exchange.
    pub x: Exchange,
    /// Filters that took part (not disabled by the route), in chain order; response
    /// phases run over them in reverse. These three per-filter lists are inline
    /// up to [`INLINE_FILTERS`] filters: three allocations per exchange fewer.
    entered: PerFilter<Arc<dyn HttpFilter>>,
    /// Each entered filter's body settings for this exchange.
    ctl: PerFilter<BodyCtl>,
    /// Whether each entered filter was called for this exchange yet.
    called: PerFilter<bool>,
    /// Indices into `entered` of filters bypassed after a fail-open failure.
    skipped: Vec<usize>,
    /// The filter that answered from a request phase: it and the filters after it
    /// get no response phase (except those that see their own local response,
    /// [`HttpFilter::sees_own_local_response`], when `self_answered`).
    responded: Option<usize>,
    /// `responded` answered with its own local response (not the host's
    /// answer for it: a failure, a body over its cap).
    self_answered: bool,
    /// The filter that last replaced the response from its response-headers
    /// phase: it and the filters after it (which saw the upstream's head) get no
    /// body or trailers phase of the local response (abi/README.md §3.5).
    replaced_response: Option<usize>,
    callouts: Rc<dyn CalloutSender>,
    /// Callouts in flight, as tasks on the worker's `LocalSet`: dropping the set
    /// (the chain) aborts them, so a gone exchange gets no deliveries.
    inflight: Inflight<Delivery>,
    /// `on-log`/`on-done` ran.
    finished: bool,
    /// The [`SharedChain`] holding this chain, told if the chain is dropped
    /// while out in an async phase.
    shared: std::rc::Weak<SharedInner>,
    /// A streamed run stopped on a pause ([`BodyStep::Held`], [`EndStep::Held`]).
    deferred: Option<Deferred>,
    /// The request is gRPC: a local response from a response phase takes
    /// gRPC's form ([`crate::local_reply`]) before the filters before it see it.
    pub grpc: bool,
    /// Per direction: the message has no body ([`Chain::set_bodyless`]).
    bodyless: [bool; 2],
    /// Delivers the results of filters that take them as they arrive
    /// ([`HttpFilter::delivers_on_arrival`]) between phases: made with the
    /// first such callout.
    pump: Option<Pump>,
    /// A failure (failed closed, or a reset) in a delivery between phases,
    /// where nothing could return it: the chain's next step returns it.
    failed: Option<ProxyError>,
    /// The filter whose local response a pause of another filter returned
    /// ([`Chain::wait`]): the answer is its own ([`Chain::answerer`]).
    answer_from: Option<usize>,
    /// Per direction: a filter holds the head while its body streams
    /// ([`BodyCtl::holds_head`]), so the filters after it have not had their
    /// part of the message yet ([`Stop`]).
    stopped: [Option<Stop>; 2],
    /// The slots the request-headers run reached (entered, or skipped on
    /// this route): the filters of those after it never had a call, and get
    /// only `on-log` ([`Chain::enter_unreached_loggers`]).
    reached: usize,
    /// Per direction: the entered filter whose body call last returned more
    /// (`.0`) or less (`.1`) data than it was given, for the name a streamed
    /// body that broke its `content-length` is blamed on
    /// ([`Chain::length_broken`]).
    resized: [(Option<u16>, Option<u16>); 2],
}

/// Where a direction's run stopped at a filter that holds the head while its
/// body streams through it (proxy-wasm's `StopIteration`, as Envoy): the
/// filters after it get their headers phase only once it lets the head go,
/// with the head as it left it, then what passed it of the body
/// ([`Chain::run_stopped`]). Meanwhile they take no part in the body runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stop {
    /// The first position in the direction's order ([`Chain::pos`]) of a
    /// filter that has not had this message's body: it and those after it
    /// are out of the streamed runs.
    body_at: usize,
    /// The headers phases still to run: for the request, from this slot on
    /// (those filters are not entered yet); for the response, of the entered
    /// filters below this index.
    headers: Option<usize>,
    /// A filter that had its headers phase buffers this body: the head is
    /// held to the end, when the body goes to it whole.
    whole: bool,
}

/// The task that delivers callout results as they arrive while the chain is
/// in its [`SharedChain`] (between phases); while the chain is out in an
/// async phase, that phase's `Chain::wait` delivers them instead. Each
/// result's task wakes it; putting the chain back does too (what arrived
/// while it was out but after the wait ended). Aborted with the chain.
struct Pump {
    ready: Rc<tokio::sync::Notify>,
    task: tokio::task::AbortHandle,
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The [`Pump`]'s task: on each wake-up, the results that arrived are
/// delivered if the chain is in its slot; it ends with the exchange.
async fn pump(shared: std::rc::Weak<SharedInner>, ready: Rc<tokio::sync::Notify>) {
    loop {
        ready.notified().await;
        let Some(inner) = shared.upgrade() else {
            return;
        };
        match SharedChain(inner).with(Chain::deliver_arrived) {
            // Busy: out in an async phase, whose wait delivers them (and
            // the chain wakes this task again when it is put back).
            Ok(()) | Err(SharedError::Busy) => {}
            Err(SharedError::Finished | SharedError::Aborted) => return,
        }
    }
}

/// Marks a response the downstream must not get: a filter reset the stream
/// ([`ExchangeData::reset`]). The connection's service turns it into a
/// reset (an HTTP/2 `RST_STREAM`, an HTTP/1.1 connection closed without an
/// answer), as Envoy's `resetStream` before the response head.
#[derive(Clone, Copy, Debug)]
pub struct StreamReset;

impl std::fmt::Display for StreamReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a filter reset the stream")
    }
}
impl std::error::Error for StreamReset {}

/// The cause an exchange a filter reset before its response head
/// ([`StreamReset`]) is logged with, in the access log and for `on-log`:
/// Envoy's response code details for proxy-wasm's `proxy_close_stream`.
pub const RESET_CAUSE: &str = "wasm_close_stream";

/// The failure policy applied to a failed call: `Ok(())` if the filter is skipped
/// (fail open), the request's error otherwise.
fn failure(f: &dyn HttpFilter, phase: &str, why: &str) -> Result<(), ProxyError> {
    tracing::warn!(plugin = f.name(), phase, "plugin failure: {why}");
    if f.fail_open() {
        Ok(())
    } else {
        Err(ProxyError::new(Kind::PluginFailure, f.name()))
    }
}

/// What ended a wait in [`Chain::wait`].
enum Woke<T> {
    /// A callout or KV reply (`None`: nothing is in flight).
    Reply(T),
    /// The pause outlived the filter's `limits.pause`.
    PauseLimit,
    /// The paused filter's instance died.
    InstanceGone,
}

/// Why a pause fails when no callout can end it.
const NOTHING_IN_FLIGHT: &str = "paused with no callout in flight";

impl Chain {
    /// Whether a filter of the chain reads the exchange's body byte counts
    /// ([`HttpFilter::reads_body_sizes`]).
    pub fn reads_body_sizes(&self) -> bool {
        self.slots.iter().any(|s| s.filter.reads_body_sizes())
    }

    /// A call of `f` returned an error (`why`): if the filter reset the stream
    /// ([`ExchangeData::reset`]), the exchange ends with a reset whatever its
    /// failure policy (not a failure: Envoy resets the stream); else the
    /// failure policy.
    fn fail(&self, f: &dyn HttpFilter, phase: &str, why: &str) -> Result<(), ProxyError> {
        if !self.x.reset {
            return failure(f, phase, why);
        }
        tracing::debug!(plugin = f.name(), phase, "the filter reset the stream");
        if let Some(shared) = self.shared.upgrade() {
            shared.reset.set(true);
        }
        // No answer goes out (the proxy resets the stream), so no response
        // filter sees one either.
        Err(ProxyError::new(
            Kind::DownstreamReset,
            format!("plugin `{}` reset the stream", f.name()),
        ))
    }

    /// A pause of entered filter `i` the chain refuses (`why`): counted as the
    /// filter's failure, as failures of its own calls are.
    fn refused_pause(&self, i: usize, why: String) -> String {
        self.entered[i].host_failure();
        why
    }

    /// Calls entered filter `i` with its body settings swapped into the exchange.
    fn call<R>(
        &mut self,
        i: usize,
        call: impl FnOnce(&dyn HttpFilter, usize, &mut Exchange) -> R,
    ) -> R {
        let f = self.entered[i].clone();
        self.x.body_ctl = self.ctl[i];
        self.x.first_call = !std::mem::replace(&mut self.called[i], true);
        let r = call(&*f, self.worker, &mut self.x);
        self.ctl[i] = self.x.body_ctl;
        r
    }

    /// Whether entered filter `i` still gets calls: it neither failed open
    /// (skipped) nor detached.
    fn live(&self, i: usize) -> bool {
        !self.skipped.contains(&i) && !self.ctl[i].detached
    }

    /// Whether entered filter `i` takes part in the response path.
    fn in_response(&self, i: usize) -> bool {
        self.live(i)
            && self.responded.is_none_or(|k| i < k || self.sees_answer(i))
            && self.replaced_response.is_none_or(|k| i < k)
    }

    /// Whether entered filter `i`, the one that answered from a request
    /// phase or after it, sees that answer in its response phases
    /// ([`HttpFilter::sees_own_local_response`]: Envoy's local reply through
    /// the filter chain reaches every proxy-wasm context its request headers
    /// created).
    fn sees_answer(&self, i: usize) -> bool {
        self.self_answered && self.called[i] && self.entered[i].sees_own_local_response()
    }

    /// Sends the callouts filter `i` queued in its last call.
    fn dispatch(&mut self, i: usize) {
        // The common call asked for nothing: three empty checks instead of
        // taking and dropping three vectors.
        if self.x.callouts.is_empty()
            && self.x.wakes.is_empty()
            && self.x.cancelled.is_empty()
            && self.x.kv_calls.is_empty()
        {
            return;
        }
        let ready = self.on_arrival(i);
        for req in std::mem::take(&mut self.x.callouts) {
            let id = req.id;
            let fut = self.callouts.send(req);
            self.spawn_reply(
                i,
                id,
                ready.as_ref(),
                async move { Reply::Callout(fut.await) },
            );
        }
        for (id, wake) in std::mem::take(&mut self.x.wakes) {
            // A dropped sender (the filter gave the wait up) still wakes: the
            // filter answers a stale id as nothing to do.
            self.spawn_reply(i, id, ready.as_ref(), async move {
                Reply::Callout(wake.await.unwrap_or(Err(CalloutError::Unavailable)))
            });
        }
        for KvCall { id, future } in std::mem::take(&mut self.x.kv_calls) {
            self.spawn_reply(
                i,
                id,
                ready.as_ref(),
                async move { Reply::Kv(future.await) },
            );
        }
        for id in std::mem::take(&mut self.x.cancelled) {
            self.inflight.cancel(i, id);
        }
    }

    /// For entered filter `i` whose results are delivered as they arrive
    /// ([`HttpFilter::delivers_on_arrival`]): what wakes the [`Pump`] (made
    /// now if need be). `None` for other filters, and for a chain that is
    /// not shared (its results are delivered by its waits only).
    fn on_arrival(&mut self, i: usize) -> Option<Rc<tokio::sync::Notify>> {
        if !self.entered[i].delivers_on_arrival() {
            return None;
        }
        if let Some(p) = &self.pump {
            return Some(p.ready.clone());
        }
        if self.shared.strong_count() == 0 {
            return None;
        }
        let ready = Rc::new(tokio::sync::Notify::new());
        let task = tokio::task::spawn_local(pump(self.shared.clone(), ready.clone()));
        self.pump = Some(Pump {
            ready: ready.clone(),
            task: task.abort_handle(),
        });
        Some(ready)
    }

    /// Runs `reply`, filter `i`'s call `id`; with `ready`, among the results
    /// delivered as they arrive, waking the [`Pump`] when it is in.
    fn spawn_reply(
        &mut self,
        i: usize,
        id: u64,
        ready: Option<&Rc<tokio::sync::Notify>>,
        reply: impl Future<Output = Reply> + 'static,
    ) {
        match ready {
            None => self
                .inflight
                .spawn(i, id, async move { (i, id, reply.await) }),
            Some(ready) => {
                let ready = ready.clone();
                self.inflight.spawn_eager(i, id, async move {
                    let r = reply.await;
                    // The task is finished (its result joinable) before the
                    // pump runs: it is woken now, runs later.
                    ready.notify_one();
                    (i, id, r)
                });
            }
        }
    }

    /// Waits while filter `k` is paused: delivers callout results (to whichever
    /// filter sent them) until `k`'s own delivery returns a verdict other than
    /// `Pause`. Results for other filters are delivered as not paused; a failure of
    /// one of them applies its failure policy (the outer `Err`: it failed closed).
    async fn wait(&mut self, k: usize, phase: &str) -> Result<Result<Verdict, String>, ProxyError> {
        // Callouts time out on their own; a gRPC stream may stay open and
        // silent, so the pause as a whole is bounded too.
        let limit = self.entered[k].pause_limit();
        // One timer for the whole wait, not one per delivery: a filter that
        // pauses again after a reply loops here, and arming a timer costs a
        // registration and a removal.
        let mut deadline = std::pin::pin!(limit.map(|d| tokio::time::sleep(d)));
        // The instance the pause waits in may die meanwhile (a trap in another
        // exchange's call or a tick): then nothing can resume the pause, and
        // the exchange gets the failure policy at once (abi/README.md §9).
        let gone = self.entered[k].instance_gone(self.worker, self.x.context);
        let mut gone = std::pin::pin!(async move {
            match gone {
                Some(g) => g.wait().await,
                None => std::future::pending().await,
            }
        });
        loop {
            let next = self.inflight.join_next();
            let timer = async {
                match deadline.as_mut().as_pin_mut() {
                    Some(timer) => timer.await,
                    None => std::future::pending().await,
                }
            };
            // The reply first, as `timeout` polls: one that is ready when the
            // time is up still counts.
            let woke = tokio::select! {
                biased;
                done = next => Woke::Reply(done),
                () = timer => Woke::PauseLimit,
                () = &mut gone => Woke::InstanceGone,
            };
            let done = match woke {
                Woke::Reply(done) => done,
                Woke::PauseLimit => {
                    // Nothing may deliver to the abandoned pause later (a
                    // wake-up in flight would also keep a later filter's
                    // pause from failing as nothing-in-flight).
                    self.inflight.cancel_filter(k);
                    let f = self.entered[k].clone();
                    f.pause_abandoned(self.worker, &mut self.x);
                    self.dispatch(k);
                    let why = format!(
                        "paused in {phase} for longer than its `limits.pause` ({:?}) without \
                         being resumed",
                        limit.unwrap_or_default()
                    );
                    return Ok(Err(self.refused_pause(k, why)));
                }
                Woke::InstanceGone => {
                    // Its callouts would be delivered to no one.
                    self.inflight.cancel_filter(k);
                    return Ok(Err(format!(
                        "the instance this exchange was paused in (in {phase}) failed in \
                         another call"
                    )));
                }
            };
            let Some(done) = done else {
                return Ok(Err(self.refused_pause(k, NOTHING_IN_FLIGHT.to_string())));
            };
            // A task only ends early when aborted: with the chain, or
            // cancelled by its filter (which expects no delivery).
            let Ok((i, id, result)) = done else { continue };
            if i != k {
                if let Some(lr) = self.deliver_unpaused(i, id, result, phase)? {
                    // Filter `i` answered while `k`'s pause holds the
                    // exchange: as Envoy's `sendLocalReply`, whatever other
                    // filters' pause state, the answer stands and `k`'s
                    // pending work is abandoned (its callouts cancelled:
                    // Envoy cancels them with the stream).
                    self.inflight.cancel_filter(k);
                    let f = self.entered[k].clone();
                    f.pause_abandoned(self.worker, &mut self.x);
                    self.dispatch(k);
                    self.answer_from = Some(i);
                    return Ok(Ok(Verdict::Respond(lr)));
                }
                continue;
            }
            if !self.live(i) {
                continue;
            }
            let v = self.call(i, |f, w, x| result.deliver(f, w, x, id, true));
            self.dispatch(i);
            match v {
                Ok(Verdict::Pause) => continue,
                other => return Ok(other),
            }
        }
    }

    /// Delivers a callout result to filter `i`, which is not paused: `continue` and
    /// `pause` mean nothing; a local response between phases
    /// ([`ExchangeData::idle`]) answers the exchange, or cuts the response
    /// if its head went to the client ([`Chain::answer_between_phases`]);
    /// one while another filter's pause holds the exchange is returned, for
    /// that pause to end with it ([`Chain::wait`]); a failure applies the
    /// filter's failure policy.
    fn deliver_unpaused(
        &mut self,
        i: usize,
        id: u64,
        result: Reply,
        phase: &str,
    ) -> Result<Option<LocalResponse>, ProxyError> {
        let Some(f) = self.entered.get(i).cloned() else {
            return Ok(None);
        };
        if !self.live(i) {
            return Ok(None);
        }
        let what = result.phase();
        let v = self.call(i, |f, w, x| result.deliver(f, w, x, id, false));
        self.dispatch(i);
        match v {
            Ok(Verdict::Continue | Verdict::Pause) => Ok(None),
            Ok(Verdict::Respond(lr)) if !self.x.idle => Ok(Some(lr)),
            Ok(Verdict::Respond(lr)) => {
                if !self.answer_between_phases(i, lr) {
                    tracing::debug!(
                        plugin = f.name(),
                        phase,
                        "a local response from a callout response of a filter that is not \
                         paused is ignored: another answer came first, or the exchange is over"
                    );
                }
                Ok(None)
            }
            Err(why) => self.failed_call(i, what, &why).map(|()| None),
        }
    }

    /// A call of entered filter `i` failed (`why`): it gets no more calls
    /// ([`Chain::fail`] for the outcome), except a filter that reset the
    /// stream ([`ExchangeData::reset`]): that is its own outcome, not a
    /// failure, and it still gets `on-log` (with the details of the reset),
    /// as Envoy logs every filter of a reset stream.
    fn failed_call(&mut self, i: usize, phase: &str, why: &str) -> Result<(), ProxyError> {
        if !self.x.reset {
            self.skipped.push(i);
        }
        let f = self.entered[i].clone();
        self.fail(&*f, phase, why)
    }

    /// The filter a local response returned by a phase of entered filter
    /// `k` comes from: `k`, or the filter that answered while `k`'s pause
    /// held the exchange ([`Chain::wait`]).
    fn answerer(&mut self, k: usize) -> usize {
        self.answer_from.take().unwrap_or(k)
    }

    /// Filter `i` answered with `lr` from a callout result delivered between
    /// phases, as Envoy's `sendLocalReply` from a filter that is not paused:
    /// before the response exists, as from its request headers phase (the
    /// filters before it see the answer in their response phases; the
    /// upstream request, if any, is aborted); once it exists but before its
    /// head went to the client (its response headers phase, a head held
    /// while its body streams, a buffered body), the answer replaces it.
    /// The proxy takes it ([`SharedChain::poll_answered`]). Once the head
    /// went to the client, the answer cuts the response instead (its stream
    /// is reset, [`SharedChain::cut`]), as Envoy's. `false`: a second answer,
    /// or the exchange is over; ignored.
    fn answer_between_phases(&mut self, i: usize, lr: LocalResponse) -> bool {
        let Some(shared) = self.shared.upgrade() else {
            return false;
        };
        let details = lr.details.clone();
        match SharedChain(shared).answer_between_phases(lr) {
            None => return false,
            Some(Between::Resets) => {
                tracing::debug!(
                    plugin = self.entered[i].name(),
                    "a local response after the response head went to the client: the \
                     stream is reset"
                );
            }
            Some(Between::Answers) if self.x.status.is_none() => {
                if self.responded.is_none() {
                    self.responded = Some(i);
                    self.self_answered = true;
                }
            }
            Some(Between::Answers) => {
                self.replaced_response.get_or_insert(i);
            }
        }
        self.x.cause = Some(plugin_cause(&details));
        true
    }

    /// Delivers the callout results that arrived while no filter was paused.
    fn deliver_ready(&mut self, phase: &str) -> Result<(), ProxyError> {
        self.take_failed()?;
        while let Some(done) = self.inflight.try_join_next() {
            if let Ok((i, id, result)) = done {
                if self.deliver_unpaused(i, id, result, phase)?.is_some() {
                    tracing::debug!(
                        plugin = self.entered[i].name(),
                        phase,
                        "a local response from a callout response delivered with the next \
                         phase is ignored"
                    );
                }
            }
        }
        Ok(())
    }

    /// Delivers, between phases, the results that arrived for filters that
    /// take them as they arrive ([`HttpFilter::delivers_on_arrival`]), with
    /// [`ExchangeData::idle`] set. A failure that ends the exchange is kept
    /// for the chain's next step ([`Chain::take_failed`]).
    fn deliver_arrived(&mut self) {
        while let Some(done) = self.inflight.try_join_eager() {
            // (Aborted: cancelled by its filter, which expects nothing.)
            let Ok((i, id, result)) = done else { continue };
            self.x.idle = true;
            let r = self.deliver_unpaused(i, id, result, "callout_response");
            self.x.idle = false;
            if let Err(e) = r {
                // The first stands: it ended the exchange.
                if self.failed.is_none() {
                    self.failed = Some(e);
                }
            }
        }
    }

    /// Before a step of the chain between phases (a streamed body's chunk,
    /// its end, a buffered body): the results that arrived are delivered,
    /// and a failure kept from a delivery is the step's error.
    fn between_steps(&mut self) -> Result<(), ProxyError> {
        self.deliver_arrived();
        self.take_failed()
    }

    /// The failure a delivery between phases kept ([`Chain::deliver_arrived`]),
    /// as the error of the step that finds it.
    fn take_failed(&mut self) -> Result<(), ProxyError> {
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs the request-headers phase of every filter in chain order, waiting out
    /// pauses. `Some` is a local response that replaces the upstream (the filters
    /// before the one that answered will see it in their response phases).
    ///
    /// A filter that holds the head while the body streams through it
    /// ([`BodyCtl::holds_head`]) stops the run, as Envoy's `StopIteration`:
    /// the filters after it get their headers phase once it lets the head go
    /// ([`Chain::run_stopped`]).
    pub async fn on_request_headers(
        &mut self,
        end_of_stream: bool,
    ) -> Result<Option<LocalResponse>, ProxyError> {
        self.request_headers_from(0, end_of_stream).await
    }

    /// The request-headers phases of the filters of the slots from `from` on.
    async fn request_headers_from(
        &mut self,
        from: usize,
        end_of_stream: bool,
    ) -> Result<Option<LocalResponse>, ProxyError> {
        let slots = self.slots.clone();
        for (s, slot) in slots.iter().enumerate().skip(from) {
            self.reached = s + 1;
            let Some(f) = self.slot_filter(slot) else {
                continue;
            };
            // Entered whatever happens, so `finish` frees its context.
            let k = self.enter(&f);
            if !f.phases().contains(Phases::REQUEST_HEADERS) {
                continue;
            }
            let mut v = self.call(k, |f, w, x| f.on_request_headers(w, x, end_of_stream));
            self.dispatch(k);
            if let Ok(Verdict::Pause) = v {
                v = self.wait(k, "request_headers").await?;
            }
            match v {
                Ok(Verdict::Continue) if self.ctl[k].holds_head[Direction::Request.idx()] => {
                    if s + 1 < slots.len() {
                        self.stopped[Direction::Request.idx()] = Some(Stop {
                            body_at: k + 1,
                            headers: Some(s + 1),
                            whole: false,
                        });
                        return Ok(None);
                    }
                }
                Ok(Verdict::Continue) => {}
                Ok(Verdict::Pause) => unreachable_pause(),
                Ok(Verdict::Respond(lr)) => {
                    // The filter that answered never sees its own local
                    // response (unless it is one that does,
                    // [`HttpFilter::sees_own_local_response`]); it still gets
                    // log/done.
                    self.responded = Some(self.answerer(k));
                    self.self_answered = true;
                    self.x.cause = Some(plugin_cause(&lr.details));
                    return Ok(Some(lr));
                }
                Err(why) => self.failed_call(k, "request_headers", &why)?,
            }
        }
        Ok(None)
    }

    /// The filter of `slot` on this exchange's route (`None`: disabled there).
    fn slot_filter(&mut self, slot: &Slot) -> Option<Arc<dyn HttpFilter>> {
        // The route is selected only for a filter that has route overrides.
        if slot.routes.is_empty() {
            Some(slot.filter.clone())
        } else {
            let route = self.x.route_name();
            slot.resolve(route.as_ref())
        }
    }

    /// Adds `f` to the entered filters; returns its index.
    fn enter(&mut self, f: &Arc<dyn HttpFilter>) -> usize {
        self.entered.push(f.clone());
        self.ctl.push(BodyCtl::of(&**f));
        self.called.push(false);
        self.entered.len() - 1
    }

    /// Enters the filters the request never reached (one before them
    /// answered, failed closed or held the head to the end, or the exchange
    /// ended before the filters ran) that declare `on-log`: they get it, as
    /// every filter of Envoy's chain is logged (proxy-wasm's `onLog`, its
    /// context made for it) and as abi/README.md §3 promises (`on-log`
    /// exactly once if declared); `on-done` then frees the context.
    fn enter_unreached_loggers(&mut self) {
        let slots = self.slots.clone();
        for slot in slots.iter().skip(self.reached) {
            if let Some(f) = self.slot_filter(slot) {
                if f.phases().contains(Phases::LOG) {
                    self.enter(&f);
                }
            }
        }
        self.reached = slots.len();
    }

    /// Runs the response-headers phase in reverse chain order over the response head
    /// in `x.status`/`x.response_headers`, waiting out pauses. `Some` is a local
    /// response replacing the response (status and headers are already in `x`; the
    /// body is returned).
    pub async fn on_response_headers(
        &mut self,
        end_of_stream: bool,
    ) -> Result<Option<Bytes>, ProxyError> {
        let mut replaced = None;
        let mut eos = end_of_stream;
        // Those delivered as they arrive first, as between phases (the pump
        // may not have run yet); then the others'.
        self.deliver_arrived();
        self.deliver_ready("response_headers")?;
        // A filter answered between phases (before or in what came just
        // now): its answer replaces the response, and the filters before it
        // see it here ([`Chain::answer_between_phases`]).
        if let Some(shared) = self.shared.upgrade().map(SharedChain) {
            if let Some(lr) = shared.take_local() {
                shared.set_answered(&lr.details);
                let lr = lr.for_client(self.grpc);
                eos = lr.body.is_empty();
                self.x.status = Some(lr.status);
                self.x.response_headers = Some(lr.headers.into());
                replaced = Some(lr.body);
            }
        }
        let n = self.entered.len();
        let mut answer = replaced.map(|b| (b, String::new()));
        self.response_headers_below(n, &mut eos, &mut answer)
            .await?;
        Ok(answer.map(|(b, _)| b))
    }

    /// The response-headers phases of the entered filters below `below`, in
    /// reverse chain order, over the head in `x` (`eos`: it ends the
    /// message). A local response replaces the head there, and its body is
    /// put in `replaced` with its details (`eos` as it). A filter that holds the head while the
    /// body streams through it stops the run, as in
    /// [`Chain::on_request_headers`].
    async fn response_headers_below(
        &mut self,
        below: usize,
        eos: &mut bool,
        replaced: &mut Option<(Bytes, String)>,
    ) -> Result<(), ProxyError> {
        let n = self.entered.len();
        for i in (0..below).rev() {
            if !self.in_response(i) {
                continue;
            }
            let f = self.entered[i].clone();
            if !f.phases().contains(Phases::RESPONSE_HEADERS) {
                continue;
            }
            let end = *eos;
            let mut v = self.call(i, |f, w, x| f.on_response_headers(w, x, end));
            self.dispatch(i);
            if let Ok(Verdict::Pause) = v {
                v = self.wait(i, "response_headers").await?;
            }
            match v {
                Ok(Verdict::Continue) if self.ctl[i].holds_head[Direction::Response.idx()] => {
                    if i > 0 {
                        self.stopped[Direction::Response.idx()] = Some(Stop {
                            body_at: n - i,
                            headers: Some(i),
                            whole: false,
                        });
                        return Ok(());
                    }
                }
                Ok(Verdict::Continue) => {}
                Ok(Verdict::Pause) => unreachable_pause(),
                Ok(Verdict::Respond(lr)) => {
                    if let Some(shared) = self.shared.upgrade() {
                        shared.answered.replace(Some(lr.details.clone()));
                    }
                    self.x.cause = Some(plugin_cause(&lr.details));
                    let lr = lr.for_client(self.grpc);
                    *eos = lr.body.is_empty();
                    self.x.status = Some(lr.status);
                    self.x.response_headers = Some(lr.headers.into());
                    *replaced = Some((lr.body, lr.details));
                    self.replaced_response = Some(self.answerer(i));
                }
                // Skipped first: failed closed, it gets no `on-log` either
                // (abi/README.md §9), as in the other phases.
                Err(why) => self.failed_call(i, "response_headers", &why)?,
            }
        }
        Ok(())
    }

    /// The response-side work of this exchange's filters: whether any filter
    /// taking part in the response has a response phase (headers, body, trailers)
    /// or `on-log`, and whether any reads the response head after its headers
    /// phase (in a body, trailers or log call). Lets the proxy skip the response
    /// path, or move the head instead of copying it, when no filter needs it.
    ///
    /// A failure or a local response from a callback delivered between phases
    /// (delivered here if it just arrived) is the response headers phase's to
    /// return even when no filter is left to call there: the failed filter is
    /// skipped, and it may have been the only one with a response phase (its
    /// failure then went nowhere, the response passed).
    pub fn response_interest(&mut self) -> (bool, bool) {
        // Only a filter that takes its results on arrival has a pump, and
        // only its deliveries can fail or answer between phases.
        let mut answered = false;
        if self.pump.is_some() {
            self.deliver_arrived();
            answered = self
                .shared
                .upgrade()
                .is_some_and(|s| s.local.borrow().is_some());
        }
        let later = Phases(Phases::RESPONSE_BODY.0 | Phases::RESPONSE_TRAILERS.0 | Phases::LOG.0);
        let (mut any, mut after) = (self.failed.is_some() || answered, false);
        for (i, f) in self.entered.iter().enumerate() {
            if !self.in_response(i) {
                continue;
            }
            let p = f.phases();
            any |= p.0 & (Phases::RESPONSE_HEADERS.0 | later.0) != 0;
            after |= p.0 & later.0 != 0;
        }
        // Filters the request never reached get `on-log`
        // ([`Chain::enter_unreached_loggers`]), which reads the response
        // head: kept for them (one with route overrides may be one).
        if self.slots[self.reached.min(self.slots.len())..]
            .iter()
            .any(|s| !s.routes.is_empty() || s.filter.phases().contains(Phases::LOG))
        {
            (any, after) = (true, true);
        }
        (any, after)
    }

    /// Whether a filter still taking part in the response has a response body
    /// phase, which may change the body's size.
    pub fn response_body_filtered(&self) -> bool {
        self.order(Direction::Response)
            .any(|i| self.entered[i].phases().contains(Phases::RESPONSE_BODY))
    }

    /// Whether a filter that ran may still read the request head after the
    /// request-headers phase: one with any later phase (request body or
    /// trailers, the response, `on-log`, `on-done`). When none may, the proxy
    /// moves the head out of the exchange instead of copying it.
    pub fn request_head_read_later(&self) -> bool {
        self.entered
            .iter()
            .zip(&self.ctl)
            .any(|(f, c)| !c.detached && f.phases().0 & !Phases::REQUEST_HEADERS.0 != 0)
    }

    /// Whether entered filter `i` takes part in direction `d`.
    fn takes_part(&self, d: Direction, i: usize) -> bool {
        let part = match d {
            Direction::Request => self.responded.is_none() && self.live(i),
            Direction::Response => self.in_response(i),
        };
        // Not yet, past a filter that holds the head ([`Stop`]).
        part && self.stopped[d.idx()].is_none_or(|s| self.pos(d, i) < s.body_at)
    }

    /// The position of entered filter `i` in direction `d`'s order.
    fn pos(&self, d: Direction, i: usize) -> usize {
        match d {
            Direction::Request => i,
            Direction::Response => self.entered.len() - 1 - i,
        }
    }

    /// Entered filters in direction `d`'s order that take part in it (an
    /// iterator: the checks every exchange makes, such as [`Chain::buffers`],
    /// allocate nothing).
    fn order(&self, d: Direction) -> impl Iterator<Item = usize> + '_ {
        let n = self.entered.len();
        (0..n)
            .map(move |k| match d {
                Direction::Request => k,
                Direction::Response => n - 1 - k,
            })
            .filter(move |&i| self.takes_part(d, i))
    }

    /// How the body of direction `d` must go through the chain; `None` if no
    /// filter has a body or trailers phase for it, so the body streams straight
    /// through at no cost. From here on the body of `d` has started: a
    /// `set-body-mode` for it is too late.
    pub fn body_plan(&mut self, d: Direction) -> Option<BodyPlan> {
        let mut plan: Option<BodyPlan> = None;
        // In any order: the plan is the same either way.
        for i in 0..self.entered.len() {
            if !self.takes_part(d, i) {
                continue;
            }
            self.ctl[i].started[d.idx()] = true;
            let f = &self.entered[i];
            let c = self.ctl[i];
            let trailers = f.phases().contains(d.trailers_phase());
            if !c.wants(d) && !trailers {
                continue;
            }
            let p = plan.get_or_insert(BodyPlan {
                buffer_cap: None,
                holds_head: false,
            });
            p.holds_head |= c.wants(d) && c.holds_head[d.idx()];
            if c.wants(d) && c.modes[d.idx()] == BodyMode::Buffered {
                let cap = f.body_limit();
                p.buffer_cap = Some(p.buffer_cap.map_or(cap, |m| m.min(cap)));
            }
        }
        plan
    }

    /// The head of direction `d` went on (a filter held it while its body
    /// streamed, and let it go or the body ended): no filter holds it any
    /// more, so a callout result delivered later finds it out of reach.
    pub fn head_out(&mut self, d: Direction) {
        for c in self.ctl.iter_mut() {
            c.holds_head[d.idx()] = false;
        }
    }

    /// The `content-length` the head of direction `d` went on with, as the
    /// filters left it, if its message may carry a body: what a streamed body
    /// must come to (abi/README.md §4, [`crate::body::Filtered`]). `None`
    /// without one, for a message that has no body whatever its head says
    /// (a response to `HEAD`, a 1xx, 204 or 304), and if the head was not
    /// kept on the exchange (no filter reads it after its headers phase).
    pub fn sent_length(&mut self, d: Direction) -> Option<u64> {
        let head: &Head = match d {
            Direction::Request => self.x.request_headers_with_host().0,
            Direction::Response => {
                let s = self.x.status?;
                if self.x.method == Method::HEAD
                    || s.is_informational()
                    || matches!(s, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
                {
                    return None;
                }
                self.x.response_headers.as_ref()?
            }
        };
        let mut values = head.get_all(http::header::CONTENT_LENGTH).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => v.to_str().ok()?.trim().parse().ok(),
            _ => None,
        }
    }

    /// A streamed body of direction `d` broke the `content-length` its head
    /// went on with: more data (`grew`) or less. Blamed on the filter whose
    /// body call last grew (or shrank) what it was given, counted as its
    /// failure ([`HttpFilter::host_failure`]); its name, or `None` if no
    /// filter resized any.
    pub fn length_broken(&self, d: Direction, grew: bool) -> Option<String> {
        let (g, s) = self.resized[d.idx()];
        let i = usize::from(if grew { g.or(s) } else { s.or(g) }?);
        let f = self.entered.get(i)?;
        f.host_failure();
        Some(f.name().to_string())
    }

    /// Whether a filter taking part in direction `d` still holds its head
    /// ([`BodyCtl::holds_head`]).
    pub fn holds_head(&self, d: Direction) -> bool {
        self.stopped[d.idx()].is_some_and(|s| s.whole)
            || self.order(d).any(|i| {
                let c = self.ctl[i];
                c.wants(d) && c.holds_head[d.idx()]
            })
    }

    /// The message of direction `d` has no body: it goes through the body
    /// phases only for the filters that buffer it (abi/README.md §4), and a
    /// `streamed` filter, whose headers phase had `end-of-stream`, gets no
    /// body call unless a filter before it gave the message a body (as
    /// Envoy's filters see data a filter adds to a headers-only stream).
    pub fn set_bodyless(&mut self, d: Direction) {
        self.bodyless[d.idx()] = true;
    }

    /// Whether a filter takes part in direction `d` with a `buffered` body phase:
    /// then even a body-less message of `d` gets its one body call (with an empty
    /// buffer), so such a filter can give it a body.
    pub fn buffers(&self, d: Direction) -> bool {
        self.order(d).any(|i| {
            let c = self.ctl[i];
            c.wants(d) && c.modes[d.idx()] == BodyMode::Buffered
        })
    }

    /// A body of direction `d` reached `len` bytes: counted on every buffering
    /// filter whose cap that exceeds. For a request, the first of them (chain
    /// order) is where the exchange stops: the `413` enters the response path
    /// right after it (abi/README.md §3.2), so it and the filters after it do
    /// not see it.
    pub fn body_limit_exceeded(&mut self, d: Direction, len: usize) {
        let mut first = None;
        // Those past a filter that held the head too, once they wait for the
        // whole body ([`Stop::whole`]): it is what went over.
        let stop = self.stopped[d.idx()];
        if stop.is_some_and(|s| s.whole) {
            self.stopped[d.idx()] = None;
        }
        let order: Vec<usize> = self.order(d).collect();
        self.stopped[d.idx()] = stop;
        for i in order {
            let f = &self.entered[i];
            let c = self.ctl[i];
            if c.wants(d) && c.modes[d.idx()] == BodyMode::Buffered && len > f.body_limit() {
                f.body_limit_exceeded(d);
                first.get_or_insert(i);
            }
        }
        if d == Direction::Request && first.is_some() {
            self.responded = first;
            self.self_answered = false;
        }
    }

    /// Applies a body or trailers phase verdict other than continue and pause (a
    /// pause was waited out or refused by [`Chain::run_part`]): a local response
    /// from filter `i` is `Some`, a failure applies the failure policy.
    fn body_verdict(
        &mut self,
        i: usize,
        d: Direction,
        phase: &str,
        v: Result<Verdict, String>,
    ) -> Result<Option<LocalResponse>, ProxyError> {
        let why = match v {
            Ok(Verdict::Continue) => return Ok(None),
            Ok(Verdict::Respond(lr)) => {
                let by = self.answerer(i);
                if d == Direction::Request {
                    self.responded = Some(by);
                    self.self_answered = lr.details != BUFFER_LIMIT_DETAILS;
                }
                self.x.cause = Some(plugin_cause(&lr.details));
                return Ok(Some(lr));
            }
            // `run_calls` never passes one; treated as refused rather than a panic.
            Ok(Verdict::Pause) => self.refused_pause(i, UNHELD_PAUSE.to_string()),
            Err(why) => why,
        };
        if let Err(e) = self.failed_call(i, phase, &why) {
            if d == Direction::Request {
                // Failed closed while it held the request: the `503` enters
                // the response path right after it (abi/README.md §3.2).
                self.responded = Some(i);
                self.self_answered = false;
            }
            return Err(e);
        }
        Ok(None)
    }

    /// Calls the body (`Some(end_of_stream)`) or trailers (`None`) phase of
    /// direction `d` in the filters `order[from..]`, over the part already on
    /// the exchange; `hold` says what a pause does. `Ran::Paused` (only with
    /// [`Hold::Chunk`] and [`Hold::Defer`]) is where the run stopped.
    async fn run_part(
        &mut self,
        d: Direction,
        body_eos: Option<bool>,
        order: &[usize],
        from: usize,
        hold: Hold,
    ) -> Result<Ran, ProxyError> {
        self.set_hold(Some(hold));
        let r = self.run_calls(d, body_eos, order, from, hold).await;
        self.set_hold(None);
        r
    }

    /// Tells the filters what a pause in the coming calls does (`None`: no
    /// body or trailers run): the exchange's hold flags, from `hold`.
    fn set_hold(&mut self, hold: Option<Hold>) {
        self.x.hold_body = hold == Some(Hold::Wait);
        self.x.hold_end = matches!(hold, Some(Hold::Defer | Hold::EndWait));
        self.x.hold_stream = hold.is_some_and(|h| h != Hold::Wait);
    }

    /// The calls of [`Chain::run_part`].
    async fn run_calls(
        &mut self,
        d: Direction,
        body_eos: Option<bool>,
        order: &[usize],
        from: usize,
        hold: Hold,
    ) -> Result<Ran, ProxyError> {
        let phase = part_phase(d, body_eos.is_some());
        for (at, &i) in order.iter().enumerate().skip(from) {
            // The order was made before the run: while an earlier filter was
            // paused, this one may have detached or failed open in a callout
            // delivery, and then gets no more calls.
            if !self.live(i) {
                continue;
            }
            if body_eos.is_some()
                && self.bodyless[d.idx()]
                && self.ctl[i].modes[d.idx()] != BodyMode::Buffered
                && self.x.bodies[d.idx()]
                    .as_deref()
                    .is_none_or(<[u8]>::is_empty)
            {
                continue;
            }
            let len = |x: &Exchange| x.bodies[d.idx()].as_deref().map_or(0, <[u8]>::len);
            let before = len(&self.x);
            let mut v = match body_eos {
                Some(eos) => self.call(i, |f, w, x| f.on_body(w, x, d, eos)),
                None => self.call(i, |f, w, x| f.on_trailers(w, x, d)),
            };
            let after = len(&self.x);
            if after != before {
                let by = u16::try_from(i).ok();
                let r = &mut self.resized[d.idx()];
                if after > before {
                    r.0 = by;
                } else {
                    r.1 = by;
                }
            }
            self.dispatch(i);
            if let Ok(Verdict::Pause) = v {
                v = match hold {
                    // The part stays on the exchange, held and writable, for the
                    // callout responses (abi/README.md §3.3).
                    Hold::Wait | Hold::ChunkWait | Hold::EndWait => self.wait(i, phase).await?,
                    // A body stream's poll cannot wait: it resumes the run as
                    // a future (`resume`).
                    Hold::Chunk | Hold::Defer if !self.inflight.is_empty() => {
                        return Ok(Ran::Paused(at))
                    }
                    Hold::Chunk | Hold::Defer => {
                        Err(self.refused_pause(i, NOTHING_IN_FLIGHT.to_string()))
                    }
                };
            }
            if let Some(lr) = self.body_verdict(i, d, phase, v)? {
                return Ok(Ran::Respond(lr));
            }
        }
        Ok(Ran::Through)
    }

    /// Filters of direction `d` that get its body calls, in its order.
    fn body_order(&self, d: Direction) -> Vec<usize> {
        self.order(d).filter(|&i| self.ctl[i].wants(d)).collect()
    }

    /// Filters of direction `d` that declared its trailers phase, in its order.
    fn trailers_order(&self, d: Direction) -> Vec<usize> {
        self.order(d)
            .filter(|&i| self.entered[i].phases().contains(d.trailers_phase()))
            .collect()
    }

    /// Runs the body phase of direction `d` over one chunk `data` (not the
    /// last) in the filters `order[from..]` that want it (chain order for the
    /// request, reverse for the response): the data as the filters left it, a
    /// filter's local response, or a hold (`hold` as in [`Chain::run_part`]).
    async fn chunk_part(
        &mut self,
        d: Direction,
        order: Vec<usize>,
        from: usize,
        hold: Hold,
    ) -> Result<BodyStep, ProxyError> {
        let r = self.run_part(d, Some(false), &order, from, hold).await;
        if let Ok(Ran::Paused(at)) = r {
            // Held: the chunk stays on the exchange for the callout's callback.
            self.deferred = Some(Deferred {
                d,
                order,
                at,
                stage: Stage::Chunk,
            });
            return Ok(BodyStep::Held);
        }
        let out = self.x.bodies[d.idx()].take().unwrap_or_default();
        Ok(match r? {
            Ran::Respond(lr) => BodyStep::Respond(lr),
            Ran::Through | Ran::Paused(_) => BodyStep::Continue(out.into_bytes()),
        })
    }

    /// The end of a message of direction `d`: its last body call over `data`,
    /// with the `trailers` it ends with if any (see [`Chain::on_body_end`]),
    /// then the trailers phases over what the body phases left of them.
    async fn end_part(
        &mut self,
        d: Direction,
        data: Bytes,
        trailers: Option<HeaderMap>,
        hold: Hold,
    ) -> Result<EndStep, ProxyError> {
        let folding = trailers.is_some();
        if folding {
            self.x.trailers[d.idx()] = trailers;
        }
        let order = self.body_order(d);
        if order.is_empty() {
            return self.after_body(d, data, folding, hold).await;
        }
        self.x.bodies[d.idx()] = Some(data.into());
        self.end_body(d, order, 0, folding, hold).await
    }

    /// The last body call of direction `d` over the body on the exchange, in
    /// the filters `order[from..]`; then [`Chain::after_body`].
    async fn end_body(
        &mut self,
        d: Direction,
        order: Vec<usize>,
        from: usize,
        folding: bool,
        hold: Hold,
    ) -> Result<EndStep, ProxyError> {
        let r = self.run_part(d, Some(true), &order, from, hold).await;
        if let Ok(Ran::Paused(at)) = r {
            // Held: the body stays on the exchange for the callout's callback.
            self.deferred = Some(Deferred {
                d,
                order,
                at,
                stage: Stage::Body { folding },
            });
            return Ok(EndStep::Held);
        }
        let out = self.x.bodies[d.idx()]
            .take()
            .unwrap_or_default()
            .into_bytes();
        match r? {
            Ran::Respond(lr) => Ok(EndStep::Respond(lr)),
            Ran::Through | Ran::Paused(_) => self.after_body(d, out, folding, hold).await,
        }
    }

    /// After the last body call left `data`: the trailers phases if the
    /// message ends with trailers (`folding`) the body calls did not empty.
    async fn after_body(
        &mut self,
        d: Direction,
        data: Bytes,
        folding: bool,
        hold: Hold,
    ) -> Result<EndStep, ProxyError> {
        if !folding {
            return Ok(EndStep::Done(data, None));
        }
        let trailers = self.x.trailers[d.idx()].take().unwrap_or_default();
        if trailers.is_empty() {
            return Ok(EndStep::Done(data, None));
        }
        self.x.trailers[d.idx()] = Some(trailers);
        let order = self.trailers_order(d);
        self.end_trailers(d, data, order, 0, hold).await
    }

    /// The trailers phases of direction `d` over the trailers on the exchange
    /// (kept there for later reads), in the filters `order[from..]`; `data` is
    /// what the body calls left, sent before them.
    async fn end_trailers(
        &mut self,
        d: Direction,
        data: Bytes,
        order: Vec<usize>,
        from: usize,
        hold: Hold,
    ) -> Result<EndStep, ProxyError> {
        match self.run_part(d, None, &order, from, hold).await? {
            Ran::Paused(at) => {
                self.deferred = Some(Deferred {
                    d,
                    order,
                    at,
                    stage: Stage::Trailers { data },
                });
                Ok(EndStep::Held)
            }
            Ran::Respond(lr) => Ok(EndStep::Respond(lr)),
            Ran::Through => Ok(EndStep::Done(
                data,
                Some(self.x.trailers[d.idx()].clone().unwrap_or_default()),
            )),
        }
    }

    /// Runs the body phase of direction `d` over one streamed chunk `data` that
    /// is not the last, in every filter that wants it. A component filter's
    /// pause with a callout in flight is [`BodyStep::Held`]: the stream takes
    /// the chain out and awaits [`Chain::resume`] before it reads more of the
    /// body; any other pause is a failure (proxy-wasm filters hold chunks
    /// themselves, as Envoy's `StopIterationAndBuffer`).
    pub fn on_body(&mut self, d: Direction, data: Bytes) -> Result<BodyStep, ProxyError> {
        self.between_steps()?;
        let order = self.body_order(d);
        if order.is_empty() {
            return Ok(BodyStep::Continue(data));
        }
        self.x.bodies[d.idx()] = Some(data.into());
        now(self.chunk_part(d, order, 0, Hold::Chunk))
    }

    /// The last body call of direction `d` for a streamed message, over `data`,
    /// with the `trailers` the message ends with (abi/README.md §4): the
    /// trailers are on the exchange, readable and writable, during this
    /// end-of-stream body call, so a filter can fold them into the body
    /// (gRPC-Web). Then the trailers phases run over what is left, unless the
    /// filters emptied the map: the message then ends with its body and has no
    /// trailers. A pause of a filter that can be resumed, with a callout in
    /// flight, is [`EndStep::Held`]: the stream takes the chain out and awaits
    /// [`Chain::resume`]; any other pause is a failure.
    pub fn on_body_end(
        &mut self,
        d: Direction,
        data: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Result<EndStep, ProxyError> {
        self.between_steps()?;
        now(self.end_part(d, data, trailers, Hold::Defer))
    }

    /// Runs the trailers phase of direction `d` over the `trailers` of a
    /// streamed message whose last body call already ran; pauses as in
    /// [`Chain::on_body_end`].
    pub fn on_trailers(
        &mut self,
        d: Direction,
        trailers: HeaderMap,
    ) -> Result<EndStep, ProxyError> {
        self.between_steps()?;
        self.x.trailers[d.idx()] = Some(trailers);
        let order = self.trailers_order(d);
        now(self.end_trailers(d, Bytes::new(), order, 0, Hold::Defer))
    }

    /// Waits out the pause a run of a streamed body stopped on
    /// ([`BodyStep::Held`], [`EndStep::Held`]), with `Chain::wait` as the other
    /// pauses (the worker serves other exchanges meanwhile; the chain must be
    /// out of its [`SharedChain`]), then runs the rest of it: the filters after
    /// the paused one, and the trailers phases after the last body call. The
    /// held part is on the exchange meanwhile, readable and writable from the
    /// callout's callback.
    pub async fn resume(&mut self) -> Result<Resumed, ProxyError> {
        let bug = |what: &str| ProxyError::new(Kind::Internal, format!("bug: {what}"));
        // Left in place during the wait, for `abandon_hold`.
        let Some(p) = self.deferred.as_ref() else {
            return Err(bug("resumed a streamed body that is not held"));
        };
        let d = p.d;
        let body = !matches!(p.stage, Stage::Trailers { .. });
        let chunk = matches!(p.stage, Stage::Chunk);
        let phase = part_phase(d, body);
        let Some(&i) = p.order.get(p.at) else {
            return Err(bug("a held body's filter is not in its order"));
        };
        self.set_hold(Some(if chunk {
            Hold::ChunkWait
        } else {
            Hold::EndWait
        }));
        let v = self.wait(i, phase).await;
        self.set_hold(None);
        let Some(p) = self.deferred.take() else {
            return Err(bug("a held body's run went missing"));
        };
        let r = v.and_then(|v| self.body_verdict(i, d, phase, v));
        if body && !matches!(r, Ok(None)) {
            // Answered or failed: the held body is not forwarded, nor seen by
            // later phases.
            self.x.bodies[d.idx()] = None;
        }
        match r {
            Ok(None) => {}
            Err(e) => return Err(e),
            Ok(Some(lr)) => {
                return Ok(if chunk {
                    Resumed::Chunk(BodyStep::Respond(lr))
                } else {
                    Resumed::End(EndStep::Respond(lr))
                });
            }
        }
        Ok(match p.stage {
            Stage::Chunk => Resumed::Chunk(
                self.chunk_part(d, p.order, p.at + 1, Hold::ChunkWait)
                    .await?,
            ),
            Stage::Body { folding } => Resumed::End(
                self.end_body(d, p.order, p.at + 1, folding, Hold::EndWait)
                    .await?,
            ),
            Stage::Trailers { data } => Resumed::End(
                self.end_trailers(d, data, p.order, p.at + 1, Hold::EndWait)
                    .await?,
            ),
        })
    }

    /// The body stream holding a streamed run ([`BodyStep::Held`],
    /// [`EndStep::Held`]) was dropped while its filter was paused: the
    /// upstream request ended under it (the upstream answered and stopped
    /// reading, or failed) or the exchange is gone. The pause ends without a
    /// verdict (not a failure of the filter): its callouts are cancelled, the
    /// held part is discarded, and the chain goes on with the response.
    pub fn abandon_hold(&mut self) {
        self.set_hold(None);
        let Some(p) = self.deferred.take() else {
            return;
        };
        if let Some(&k) = p.order.get(p.at) {
            self.inflight.cancel_filter(k);
            let f = self.entered[k].clone();
            f.pause_abandoned(self.worker, &mut self.x);
        }
        if !matches!(p.stage, Stage::Trailers { .. }) {
            self.x.bodies[p.d.idx()] = None;
        }
    }

    /// Buffered mode: the one body call of direction `d` over the whole body
    /// `data`, then, if the message ends with `trailers`, the trailers phases
    /// (folding as in [`Chain::on_body_end`]). The host holds the whole message,
    /// so a filter may pause in these phases: the call waits out the pause (the
    /// worker serves other exchanges meanwhile), so the chain must be out of its
    /// [`SharedChain`] ([`SharedChain::take`]).
    pub async fn on_whole_body(
        &mut self,
        d: Direction,
        data: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Result<Result<(Bytes, Option<HeaderMap>), LocalResponse>, ProxyError> {
        self.between_steps()?;
        match self.end_part(d, data, trailers, Hold::Wait).await? {
            EndStep::Done(data, trailers) => Ok(Ok((data, trailers))),
            EndStep::Respond(lr) => Ok(Err(lr)),
            // `Hold::Wait` waits every pause out.
            EndStep::Held => Err(ProxyError::new(
                Kind::Internal,
                "bug: a buffered body run stopped on a pause",
            )),
        }
    }

    /// Whether a filter of direction `d` stopped the run there ([`Stop`]):
    /// the filters after it still wait for the head (and the body that
    /// passed it), which [`Chain::run_stopped`] gives them.
    pub fn stopped(&self, d: Direction) -> bool {
        self.stopped[d.idx()].is_some()
    }

    /// The filter that stopped direction `d` ([`Stop`]) let its head go (or
    /// the message ended, `ended`), having passed `data` (and the
    /// `trailers` the message ended with): as Envoy's `continueDecoding` /
    /// `continueEncoding`, the filters after it get their headers phase, with
    /// the head as it is now (`end-of-stream` if nothing more comes), then
    /// `data` in one body call (`end-of-stream` if `ended`; the trailers
    /// folded there, then the trailers phases). A filter among them that
    /// holds the head in turn stops the run again, until its own body call
    /// lets it go (or the end); one that buffers this body makes the rest of
    /// it be read first, the head held ([`StoppedRun::Whole`]). The host holds
    /// all of it here, so pauses are waited out in place (the chain must be
    /// out of its [`SharedChain`]).
    pub async fn run_stopped(
        &mut self,
        d: Direction,
        mut data: Bytes,
        mut trailers: Option<HeaderMap>,
        ended: bool,
    ) -> Result<StoppedRun, ProxyError> {
        self.between_steps()?;
        while let Some(stop) = self.stopped[d.idx()] {
            if !ended && self.holds_head(d) {
                // The filter the run stopped at holds the head still.
                break;
            }
            self.stopped[d.idx()] = None;
            let eos = ended && data.is_empty() && trailers.is_none();
            match (d, stop.headers) {
                (_, None) => {}
                (Direction::Request, Some(slot)) => {
                    if let Some(lr) = self.request_headers_from(slot, eos).await? {
                        return Ok(StoppedRun::Respond(lr));
                    }
                }
                (Direction::Response, Some(below)) => {
                    let mut end = eos;
                    let mut answer = None;
                    self.response_headers_below(below, &mut end, &mut answer)
                        .await?;
                    if let Some((body, details)) = answer {
                        // The head is still held: the answer replaces the
                        // response, as from a body phase.
                        return Ok(StoppedRun::Respond(LocalResponse {
                            status: self.x.status.unwrap_or(StatusCode::OK),
                            headers: self
                                .x
                                .response_headers
                                .as_deref()
                                .cloned()
                                .unwrap_or_default(),
                            body,
                            details,
                            grpc_status: None,
                        }));
                    }
                }
            }
            // The filters that got the head now (up to one that stopped the
            // run again, which is in: it gets what passed so far).
            let new: Vec<usize> = self
                .order(d)
                .filter(|&i| self.pos(d, i) >= stop.body_at)
                .collect();
            for &i in &new {
                self.ctl[i].started[d.idx()] = true;
            }
            let body_order: Vec<usize> = new
                .iter()
                .copied()
                .filter(|&i| self.ctl[i].wants(d))
                .collect();
            let buffering = body_order
                .iter()
                .filter(|&&i| self.ctl[i].modes[d.idx()] == BodyMode::Buffered)
                .map(|&i| self.entered[i].body_limit())
                .min();
            if let (false, Some(cap)) = (ended, buffering) {
                // One of them buffers this body: the rest is read first.
                let next = self.stopped[d.idx()];
                self.stopped[d.idx()] = Some(Stop {
                    body_at: stop.body_at,
                    headers: next.and_then(|s| s.headers),
                    whole: true,
                });
                return Ok(StoppedRun::Whole(cap));
            }
            let trailers_order: Vec<usize> = new
                .iter()
                .copied()
                .filter(|&i| self.entered[i].phases().contains(d.trailers_phase()))
                .collect();
            if !eos && (ended || !data.is_empty()) && !body_order.is_empty() {
                let folding = ended && trailers.is_some();
                if folding {
                    self.x.trailers[d.idx()] = trailers.take();
                }
                self.x.bodies[d.idx()] = Some(data.into());
                let hold = if ended { Hold::Wait } else { Hold::ChunkWait };
                let r = self.run_part(d, Some(ended), &body_order, 0, hold).await;
                data = self.x.bodies[d.idx()]
                    .take()
                    .unwrap_or_default()
                    .into_bytes();
                if folding {
                    trailers = self.x.trailers[d.idx()].take();
                }
                match r? {
                    Ran::Respond(lr) => return Ok(StoppedRun::Respond(lr)),
                    Ran::Through | Ran::Paused(_) => {}
                }
            }
            // Emptied by the body calls: the body ends with its data.
            if let Some(t) = trailers.take().filter(|t| !t.is_empty()) {
                self.x.trailers[d.idx()] = Some(t);
                if let Ran::Respond(lr) = self
                    .run_part(d, None, &trailers_order, 0, Hold::Wait)
                    .await?
                {
                    return Ok(StoppedRun::Respond(lr));
                }
                // Kept on the exchange for later reads.
                trailers = self.x.trailers[d.idx()].clone();
            }
        }
        Ok(StoppedRun::Passed(data, trailers))
    }

    /// The exchange is over: `on-log` then `on-done` for every filter that took part
    /// (in chain order, as Envoy's access loggers run). Callouts still in flight are
    /// aborted and never delivered.
    pub fn finish(mut self) {
        self.run_finish();
    }

    fn run_finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        // Results that arrived for filters that take them as they arrive,
        // but were not delivered yet: before `on-log`, as Envoy ran their
        // callbacks when they came. What fails now ends nothing more.
        self.deliver_arrived();
        if let Some(e) = self.failed.take() {
            tracing::debug!("a callout delivery as the exchange ended failed: {e}");
        }
        self.pump = None;
        self.inflight.abort_all();
        self.enter_unreached_loggers();
        for i in 0..self.entered.len() {
            if self.live(i) && self.entered[i].phases().contains(Phases::LOG) {
                // Through `call`: a filter whose first call this is (it declared
                // only `on-log`, or the exchange ended before its other phases)
                // gets its context made here.
                self.call(i, |f, worker, x| f.on_log(worker, x));
            }
        }
        for (f, c) in self.entered.iter().zip(&self.ctl) {
            f.on_done(self.worker, self.x.context, c.detached);
        }
    }
}

/// Why a pause the chain could not hold fails (a host bug: every body and
/// trailers run sets one of the hold flags, [`ExchangeData::hold_body`],
/// [`ExchangeData::hold_stream`]).
pub const UNHELD_PAUSE: &str =
    "returned `pause` from a body or trailers call the host could not hold";

/// How far a run of body or trailers phases got.
enum Ran {
    /// Through every filter.
    Through,
    /// A filter answered locally.
    Respond(LocalResponse),
    /// Stopped on a pause at this position of the order ([`Hold::Chunk`],
    /// [`Hold::Defer`]).
    Paused(usize),
}

/// The phase name (stats, logs) of a body (`body`) or trailers run of `d`.
fn part_phase(d: Direction, body: bool) -> &'static str {
    match (d, body) {
        (Direction::Request, true) => "request_body",
        (Direction::Response, true) => "response_body",
        (Direction::Request, false) => "request_trailers",
        (Direction::Response, false) => "response_trailers",
    }
}

/// Runs a chain future that never waits (pauses refused or deferred), so its
/// first poll completes it.
fn now<T>(f: impl Future<Output = Result<T, ProxyError>>) -> Result<T, ProxyError> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => Err(ProxyError::new(
            Kind::Internal,
            "bug: a streamed body phase run waited on a pause",
        )),
    }
}

/// The access-log cause of a filter's local response, which the filters'
/// later phases see as `exchange.cause()` (abi/README.md §3.5).
pub(crate) fn plugin_cause(details: &str) -> String {
    format!("plugin:{details}")
}

/// `wait` never returns `Pause`; kept as a no-op rather than a panic.
fn unreachable_pause() {
    tracing::error!("bug: a paused filter's wait returned `pause`");
}

impl Drop for Chain {
    /// A chain dropped before `finish` (the client went away mid-exchange, e.g.
    /// while a filter was paused) still frees its filters' contexts.
    fn drop(&mut self) {
        let shared = self.shared.upgrade();
        let ended = shared.as_ref().and_then(|s| s.ended.borrow_mut().take());
        let over = ended.is_some();
        if let Some((status, cause)) = ended {
            // The exchange ended while this chain was out (see `SharedChain::finish`).
            self.x.status = status;
            self.x.cause = cause;
        }
        if !self.finished {
            if !over {
                // As the access log has it (proxy.rs `InFlight`): the client
                // went away, whatever failed before; no response was sent.
                self.x.cause = Some("downstream_disconnect".to_string());
                self.x.status = None;
            }
            self.run_finish();
        }
        // Dropped while out of its shared slot (the future holding it in an
        // async phase was dropped): body streams waiting for it must end.
        // Dropped with the slot itself, the upgrade fails and nothing waits.
        if let Some(shared) = shared {
            let out = shared.chain.try_borrow().is_ok_and(|c| c.is_none());
            if out && !shared.finished.get() {
                shared.aborted.set(true);
                shared.finished.set(true);
                shared.wake_waiters();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use http_body::Body as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};

    #[test]
    fn an_exchange_fits_a_small_allocation() {
        // mimalloc serves blocks up to 1 KiB from per-size free lists; a bigger
        // exchange took its generic path (~0.2k more instructions per request
        // with any filter) and was copied at that size on creation.
        let size = std::mem::size_of::<ExchangeData>();
        assert!(
            size <= 1024,
            "ExchangeData is {size} bytes; box its rare fields"
        );
    }

    struct NoCallouts;
    impl CalloutSender for NoCallouts {
        fn send(&self, _req: CalloutRequest) -> CalloutFuture {
            Box::pin(async { Err(CalloutError::Unavailable) })
        }
    }

    /// A chain with no filter: body phases pass data as it is.
    fn chain() -> Chain {
        Chain {
            worker: 0,
            slots: Arc::from(Vec::<Slot>::new()),
            x: Exchange::placeholder(),
            entered: PerFilter::new(),
            ctl: PerFilter::new(),
            called: PerFilter::new(),
            skipped: Vec::new(),
            responded: None,
            self_answered: false,
            replaced_response: None,
            callouts: Rc::new(NoCallouts),
            inflight: Inflight::new(),
            finished: false,
            shared: std::rc::Weak::new(),
            deferred: None,
            grpc: false,
            bodyless: [false; 2],
            pump: None,
            failed: None,
            answer_from: None,
            stopped: [None; 2],
            reached: 0,
            resized: [(None, None); 2],
        }
    }

    /// Counts its wakes.
    struct Wakes(AtomicUsize);
    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn streamed(shared: &SharedChain) -> crate::body::Filtered {
        crate::body::Filtered::new(
            crate::body::full("chunk"),
            shared.clone(),
            Direction::Request,
        )
    }

    /// Pauses the last request body call with a callout in flight (where the
    /// host can hold it, `hold_end`); the callout's response replaces the
    /// held body and resumes.
    struct EndPauser;
    impl HttpFilter for EndPauser {
        fn name(&self) -> &str {
            "end-pauser"
        }
        fn phases(&self) -> Phases {
            Phases::REQUEST_BODY
        }
        fn fail_open(&self) -> bool {
            false
        }
        fn on_request_headers(
            &self,
            _: usize,
            _: &mut Exchange,
            _: bool,
        ) -> Result<Verdict, String> {
            Ok(Verdict::Continue)
        }
        fn on_response_headers(
            &self,
            _: usize,
            _: &mut Exchange,
            _: bool,
        ) -> Result<Verdict, String> {
            Ok(Verdict::Continue)
        }
        fn body_mode(&self, _: Direction) -> BodyMode {
            BodyMode::Streamed
        }
        fn on_body(
            &self,
            _: usize,
            x: &mut Exchange,
            _: Direction,
            eos: bool,
        ) -> Result<Verdict, String> {
            if !eos {
                return Ok(Verdict::Continue);
            }
            if !x.hold_end {
                return Err("the end of a streamed body cannot be held".into());
            }
            x.callouts.push(CalloutRequest {
                id: 7,
                cluster: "authz".into(),
                method: Method::POST,
                path: "/check".into(),
                authority: None,
                headers: HeaderMap::new(),
                body: Bytes::new(),
                timeout: Duration::from_secs(1),
                max_response_body: 1024,
            });
            Ok(Verdict::Pause)
        }
        fn on_callout_response(
            &self,
            _: usize,
            x: &mut Exchange,
            _: u64,
            _: CalloutResult,
            paused: bool,
        ) -> Result<Verdict, String> {
            assert!(paused);
            let held = x.bodies[0].take().unwrap();
            let mut body = b"checked:".to_vec();
            body.extend_from_slice(&held);
            x.bodies[0] = Some(body.into());
            Ok(Verdict::Continue)
        }
        fn on_log(&self, _: usize, _: &mut Exchange) {}
        fn on_done(&self, _: usize, _: u64, _: bool) {}
    }

    /// Answers each callout when its gate opens.
    struct Gated(std::cell::RefCell<Option<tokio::sync::oneshot::Receiver<()>>>);
    impl CalloutSender for Gated {
        fn send(&self, _req: CalloutRequest) -> CalloutFuture {
            let gate = self.0.borrow_mut().take();
            Box::pin(async move {
                if let Some(g) = gate {
                    let _ = g.await;
                }
                Ok(CalloutResponse {
                    status: StatusCode::OK,
                    headers: HeaderMap::new(),
                    body: Bytes::new(),
                    trailers: HeaderMap::new(),
                })
            })
        }
    }

    #[tokio::test]
    async fn the_end_of_a_streamed_body_is_held_until_the_callout_resumes() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let (open, gate) = tokio::sync::oneshot::channel();
                let mut c = chain();
                c.callouts = Rc::new(Gated(std::cell::RefCell::new(Some(gate))));
                let f: Arc<dyn HttpFilter> = Arc::new(EndPauser);
                c.ctl.push(BodyCtl::of(&*f));
                c.entered.push(f);
                c.called.push(false);
                let shared = SharedChain::new(Box::new(c));
                let mut body = std::pin::pin!(streamed(&shared));
                let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
                let waker = Waker::from(wakes.clone());
                let mut cx = Context::from_waker(&waker);

                // Held: nothing sent, the chain is out with the wait.
                assert!(body.as_mut().poll_frame(&mut cx).is_pending());
                assert!(matches!(shared.with(|_| ()), Err(SharedError::Busy)));
                assert!(!body.is_end_stream());

                // The callout answers: the rewritten body, then the end; the
                // chain is back.
                open.send(()).unwrap();
                let data = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
                let data = data.unwrap().unwrap().into_data().unwrap();
                assert_eq!(data, "checked:chunk");
                assert!(body.as_mut().poll_frame(&mut cx).is_ready());
                assert!(shared.with(|_| ()).is_ok());
            })
            .await;
    }

    /// Takes its callouts' results as they arrive
    /// ([`HttpFilter::delivers_on_arrival`]): counts them (each must come
    /// between phases, not paused) and, in `on-log`, records how many came
    /// before it.
    struct OnArrival {
        delivered: Arc<AtomicUsize>,
        before_log: Arc<AtomicUsize>,
    }
    impl HttpFilter for OnArrival {
        fn name(&self) -> &str {
            "on-arrival"
        }
        fn phases(&self) -> Phases {
            Phases(Phases::REQUEST_HEADERS.0 | Phases::LOG.0)
        }
        fn fail_open(&self) -> bool {
            false
        }
        fn on_request_headers(
            &self,
            _: usize,
            _: &mut Exchange,
            _: bool,
        ) -> Result<Verdict, String> {
            Ok(Verdict::Continue)
        }
        fn on_response_headers(
            &self,
            _: usize,
            _: &mut Exchange,
            _: bool,
        ) -> Result<Verdict, String> {
            Ok(Verdict::Continue)
        }
        fn delivers_on_arrival(&self) -> bool {
            true
        }
        fn on_callout_response(
            &self,
            _: usize,
            x: &mut Exchange,
            _: u64,
            _: CalloutResult,
            paused: bool,
        ) -> Result<Verdict, String> {
            if !paused && x.idle {
                self.delivered.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Verdict::Continue)
        }
        fn on_log(&self, _: usize, _: &mut Exchange) {
            let n = self.delivered.load(Ordering::SeqCst);
            self.before_log.store(n, Ordering::SeqCst);
        }
        fn on_done(&self, _: usize, _: u64, _: bool) {}
    }

    /// A chain of one [`OnArrival`] filter, shared, whose callouts wait for
    /// `gate`; its counters.
    fn on_arrival_chain(
        gate: tokio::sync::oneshot::Receiver<()>,
    ) -> (SharedChain, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let delivered = Arc::new(AtomicUsize::new(0));
        let before_log = Arc::new(AtomicUsize::new(usize::MAX));
        let mut c = chain();
        c.callouts = Rc::new(Gated(std::cell::RefCell::new(Some(gate))));
        let f: Arc<dyn HttpFilter> = Arc::new(OnArrival {
            delivered: delivered.clone(),
            before_log: before_log.clone(),
        });
        c.ctl.push(BodyCtl::of(&*f));
        c.entered.push(f);
        c.called.push(true);
        let shared = SharedChain::new(Box::new(c));
        shared
            .with(|c| {
                c.x.callouts.push(CalloutRequest {
                    id: 1,
                    cluster: "authz".into(),
                    method: Method::GET,
                    path: "/check".into(),
                    authority: None,
                    headers: HeaderMap::new(),
                    body: Bytes::new(),
                    timeout: Duration::from_secs(1),
                    max_response_body: 1024,
                });
                c.dispatch(0);
            })
            .unwrap();
        (shared, delivered, before_log)
    }

    #[tokio::test]
    async fn a_result_is_delivered_as_it_arrives_between_phases() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let (open, gate) = tokio::sync::oneshot::channel();
                let (shared, delivered, _) = on_arrival_chain(gate);
                // Nothing came yet; then, with no step of the chain, it is
                // delivered as it arrives (the chain sits in its slot).
                tokio::task::yield_now().await;
                assert_eq!(delivered.load(Ordering::SeqCst), 0);
                open.send(()).unwrap();
                for _ in 0..100 {
                    if delivered.load(Ordering::SeqCst) == 1 {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                assert_eq!(delivered.load(Ordering::SeqCst), 1);
                shared.finish(Some(StatusCode::OK), None);
            })
            .await;
    }

    #[tokio::test]
    async fn a_result_that_arrived_is_delivered_before_on_log() {
        tokio::task::LocalSet::new()
            .run_until(async {
                let (open, gate) = tokio::sync::oneshot::channel();
                let (shared, delivered, before_log) = on_arrival_chain(gate);
                // The chain is out (an async phase) when the result arrives:
                // not delivered then; the exchange ends before it is back.
                let c = shared.take().unwrap();
                open.send(()).unwrap();
                for _ in 0..100 {
                    tokio::task::yield_now().await;
                }
                assert_eq!(delivered.load(Ordering::SeqCst), 0);
                shared.finish(Some(StatusCode::OK), None);
                drop(c);
                assert_eq!(before_log.load(Ordering::SeqCst), 1);
            })
            .await;
    }

    #[tokio::test]
    async fn a_stream_waits_while_another_phase_holds_the_chain() {
        let shared = SharedChain::new(Box::new(chain()));
        let mut body = std::pin::pin!(streamed(&shared));
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);

        // Out in an async phase (a pause): the chunk is left unread, no error.
        let out = shared.take().unwrap();
        assert!(body.as_mut().poll_frame(&mut cx).is_pending());
        assert!(body.as_mut().poll_frame(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);

        // Back: the stream is woken (once) and the chunk goes through.
        shared.put(out);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => assert_eq!(f.into_data().unwrap(), "chunk"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_waiting_stream_ends_when_the_exchange_is_abandoned() {
        let shared = SharedChain::new(Box::new(chain()));
        let mut body = std::pin::pin!(streamed(&shared));
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);

        let out = shared.take().unwrap();
        assert!(body.as_mut().poll_frame(&mut cx).is_pending());
        // The future holding the chain is dropped (the client went away).
        drop(out);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Err(e))) => assert!(e.to_string().contains("abandoned"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_finished_exchange_wakes_waiting_streams() {
        let shared = SharedChain::new(Box::new(chain()));
        let mut body = std::pin::pin!(streamed(&shared));
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let out = shared.take().unwrap();
        assert!(body.as_mut().poll_frame(&mut cx).is_pending());
        // Put back and finished normally (the response ended): the stream is
        // woken, and request data no filter can see any more is not
        // forwarded (abi/README.md §4).
        shared.put(out);
        shared.finish(Some(StatusCode::OK), None);
        assert!(wakes.0.load(Ordering::SeqCst) >= 1);
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Err(e))) => {
                assert!(e.to_string().contains("after the response ended"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        // The end alone (no data after the response ended) passes: the body ends.
        let shared = SharedChain::new(Box::new(chain()));
        shared.finish(Some(StatusCode::OK), None);
        let mut empty = std::pin::pin!(crate::body::Filtered::new(
            crate::body::empty(),
            shared.clone(),
            Direction::Request,
        ));
        assert!(matches!(
            empty.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
    }
}
