//! Listeners: binding, the per-worker accept loop, the per-listener connection limit
//! and listener stats. An accepted connection goes to [`crate::connection`] (HTTP) or
//! [`crate::tcp_proxy`] (TCP).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::{ArcSwap, ArcSwapOption};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::config::{self, Name};
use crate::stats::{Counter, Gauge, Stats};
use crate::worker::Worker;

/// Listener counters (labelled `listener=NAME`).
pub struct ListenerStats {
    /// Connections accepted.
    pub cx_total: Counter,
    /// Connections open.
    pub cx_active: Gauge,
    /// Connections refused by `max_connections`.
    pub cx_overflow: Counter,
    /// HTTP/1.1 connections that ended with a lingering close
    /// ([`crate::connection::Linger`]).
    pub cx_lingering: Counter,
    /// TLS handshakes that failed or timed out.
    pub cx_tls_error: Counter,
    /// TLS handshakes that resumed a session, by a ticket or from the
    /// session cache (Envoy's `ssl.session_reused`).
    pub cx_tls_resumed: Counter,
    /// Connections closed for a missing, malformed or late PROXY protocol
    /// header (Envoy's `downstream_cx_proxy_proto_error`).
    pub cx_proxy_proto_error: Counter,
    /// Response compression (`http.compression`).
    pub compression: crate::compress::CompressionStats,
    /// HTTP connections closed hard because their graceful close (after the
    /// idle timeout, or in a drain) stalled for another idle timeout
    /// ([`crate::connection::serve`]).
    pub cx_close_timeout: Counter,
    /// TCP proxy connections and WebSocket tunnels closed because their
    /// listener stopped (a drain, or a reload that replaced or removed it) and
    /// `drain_timeout` passed ([`ListenerCtx::drained`]).
    pub cx_drain_close: Counter,
    /// HTTP connections closed gracefully for `limits.max_requests_per_connection`
    /// (Envoy's `downstream_cx_max_requests_reached`).
    pub cx_max_requests: Counter,
    /// HTTP connections closed gracefully for `limits.max_connection_duration`
    /// (Envoy's `downstream_cx_max_duration_reached`).
    pub cx_max_duration: Counter,
    /// Downstream requests by status class (1xx..5xx).
    pub rq_by_class: [Counter; 5],
    /// Requests in flight.
    pub rq_active: Gauge,
    /// Responses that carried the `x-legate-debug-*` headers.
    pub debug_responses: Counter,
    /// HTTP/1.1 upgrades refused (403) because neither `http.upgrades` nor the
    /// route allows their type (Envoy's `downstream_rq_ws_on_non_ws_route`).
    pub upgrades_refused: Counter,
    /// Allowed HTTP/1.1 upgrades answered 502 because their upstream
    /// connection is HTTP/2, which cannot carry them (no extended CONNECT).
    pub upgrades_failed: Counter,
    /// Requests refused (400) for their path: a malformed escape or `%00` under
    /// `http.normalize_path`, an escaped slash under `path_with_escaped_slashes:
    /// reject` (Envoy's `downstream_rq_failed_path_normalization`).
    pub paths_rejected: Counter,
    /// Request headers removed for a `_` in their name under
    /// `http.headers_with_underscores: drop` (Envoy's
    /// `dropped_headers_with_underscores`).
    pub underscore_headers_dropped: Counter,
    /// Requests refused (400) for a header with `_` in its name under
    /// `http.headers_with_underscores: reject` (Envoy's
    /// `requests_rejected_with_underscores_in_headers`).
    pub underscore_headers_rejected: Counter,
    /// Requests ended by the stream idle timeout (`http.stream_idle_timeout`,
    /// a route's `idle_timeout`): a 408 or a reset stream.
    pub stream_idle_timeouts: Counter,
    /// Requests whose response a filter answered after its head had gone to
    /// the client: the stream was reset instead (Envoy's `sendLocalReply`
    /// once headers are sent).
    pub late_local_replies: Counter,
    /// Requests a route's `fault.delay` held (Envoy's `fault.delays_injected`).
    pub fault_delays: Counter,
    /// Requests a route's `fault.abort` answered (Envoy's `fault.aborts_injected`).
    pub fault_aborts: Counter,
    /// Bytes received from downstream (TCP listeners), added as they are read.
    pub rx_bytes: Counter,
    /// Bytes sent to downstream (TCP listeners), added as they are written.
    pub tx_bytes: Counter,
    /// TCP proxy connections closed by `tcp.idle_timeout` (Envoy's
    /// `tcp.<stat_prefix>.idle_timeout`).
    pub tcp_idle_timeouts: Counter,
    /// Requests the client abandoned before their response ended: an
    /// HTTP/2 `RST_STREAM`, or the connection closed (Envoy's
    /// `downstream_rq_rx_reset`).
    pub rx_resets: Counter,
    /// Requests whose response Legate cut after its head (an HTTP/2 reset,
    /// an HTTP/1.1 connection closed): the upstream reset its body, the
    /// stream idle timeout, a filter's failure or late answer (Envoy's
    /// `downstream_rq_tx_reset`).
    pub tx_resets: Counter,
}

impl ListenerStats {
    fn new(stats: &Stats, name: &str) -> Self {
        let l = [("listener", name)];
        let class = |c| {
            stats.counter(
                "legate_listener_requests_total",
                "Downstream requests by response status class.",
                &[("listener", name), ("class", c)],
            )
        };
        ListenerStats {
            cx_total: stats.counter(
                "legate_listener_connections_total",
                "Downstream connections accepted.",
                &l,
            ),
            cx_active: stats.gauge(
                "legate_listener_connections_active",
                "Downstream connections open.",
                &l,
            ),
            cx_overflow: stats.counter(
                "legate_listener_connections_overflow_total",
                "Connections closed at accept because max_connections was reached.",
                &l,
            ),
            cx_lingering: stats.counter(
                "legate_listener_lingering_closes_total",
                "HTTP/1.1 connections closed with a lingering close (the client might still be sending).",
                &l,
            ),
            cx_tls_error: stats.counter(
                "legate_listener_tls_errors_total",
                "TLS handshakes that failed or timed out.",
                &l,
            ),
            cx_tls_resumed: stats.counter(
                "legate_listener_tls_session_reused_total",
                "TLS handshakes that resumed a session (a session ticket, or the session cache).",
                &l,
            ),
            cx_proxy_proto_error: stats.counter(
                "legate_listener_proxy_protocol_errors_total",
                "Connections closed for a missing, malformed or late PROXY protocol header.",
                &l,
            ),
            compression: crate::compress::CompressionStats {
                compressed: stats.counter(
                    "legate_listener_compressed_total",
                    "Responses compressed (gzip or brotli) by http.compression.",
                    &l,
                ),
                not_accepted: stats.counter(
                    "legate_listener_compression_not_accepted_total",
                    "Compressible responses sent uncompressed: the client accepted no coding offered.",
                    &l,
                ),
                bytes_in: stats.counter(
                    "legate_listener_compression_bytes_in_total",
                    "Body bytes of the compressed responses before compression.",
                    &l,
                ),
                bytes_out: stats.counter(
                    "legate_listener_compression_bytes_out_total",
                    "Body bytes of the compressed responses after compression.",
                    &l,
                ),
            },
            cx_close_timeout: stats.counter(
                "legate_listener_close_timeouts_total",
                "HTTP connections closed hard: their graceful close (idle timeout, drain) stalled for another idle timeout.",
                &l,
            ),
            cx_drain_close: stats.counter(
                "legate_listener_drain_closes_total",
                "TCP connections and WebSocket tunnels closed drain_timeout after their listener stopped (drain, or a reload replaced or removed it).",
                &l,
            ),
            cx_max_requests: stats.counter(
                "legate_listener_max_requests_reached_total",
                "HTTP connections closed gracefully after limits.max_requests_per_connection requests.",
                &l,
            ),
            cx_max_duration: stats.counter(
                "legate_listener_max_duration_reached_total",
                "HTTP connections closed gracefully at limits.max_connection_duration.",
                &l,
            ),
            rq_by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(class),
            rq_active: stats.gauge(
                "legate_listener_requests_active",
                "Downstream requests in flight.",
                &l,
            ),
            debug_responses: stats.counter(
                "legate_debug_responses_total",
                "Responses carrying x-legate-debug-* headers (trusted x-legate-debug: 1).",
                &l,
            ),
            upgrades_refused: stats.counter(
                "legate_listener_upgrades_refused_total",
                "HTTP/1.1 upgrades refused with 403: type not in http.upgrades nor enabled by the route.",
                &l,
            ),
            upgrades_failed: stats.counter(
                "legate_listener_upgrades_failed_total",
                "Allowed HTTP/1.1 upgrades answered 502 upgrade_failed: the upstream connection is HTTP/2.",
                &l,
            ),
            paths_rejected: stats.counter(
                "legate_listener_paths_rejected_total",
                "Requests refused with 400 for their path (bad escape, %00, or an escaped slash under reject).",
                &l,
            ),
            underscore_headers_dropped: stats.counter(
                "legate_listener_underscore_headers_dropped_total",
                "Request headers removed for a _ in their name (http.headers_with_underscores: drop).",
                &l,
            ),
            underscore_headers_rejected: stats.counter(
                "legate_listener_underscore_headers_rejected_total",
                "Requests refused with 400 for a header with _ in its name (http.headers_with_underscores: reject).",
                &l,
            ),
            stream_idle_timeouts: stats.counter(
                "legate_listener_stream_idle_timeouts_total",
                "Requests ended by the stream idle timeout: 408 before the response head, a reset stream after it.",
                &l,
            ),
            late_local_replies: stats.counter(
                "legate_listener_late_local_replies_total",
                "Local responses a filter sent after the response head had gone to the client: the stream was reset instead.",
                &l,
            ),
            fault_delays: stats.counter(
                "legate_listener_fault_delays_injected_total",
                "Requests a route's fault.delay held before they went upstream.",
                &l,
            ),
            fault_aborts: stats.counter(
                "legate_listener_fault_aborts_injected_total",
                "Requests a route's fault.abort answered instead of forwarding them.",
                &l,
            ),
            rx_bytes: stats.counter(
                "legate_listener_rx_bytes_total",
                "Bytes received from downstream (TCP proxy).",
                &l,
            ),
            tx_bytes: stats.counter(
                "legate_listener_tx_bytes_total",
                "Bytes sent to downstream (TCP proxy).",
                &l,
            ),
            tcp_idle_timeouts: stats.counter(
                "legate_listener_tcp_idle_timeouts_total",
                "TCP proxy connections closed by tcp.idle_timeout (no bytes either way).",
                &l,
            ),
            rx_resets: stats.counter(
                "legate_listener_rx_resets_total",
                "Requests the client abandoned before their response ended (RST_STREAM, or its connection closed).",
                &l,
            ),
            tx_resets: stats.counter(
                "legate_listener_tx_resets_total",
                "Requests whose response Legate cut after its head (reset stream, or HTTP/1.1 connection closed).",
                &l,
            ),
        }
    }
}

/// A listener's TLS material as read from its files, with their digest
/// ([`ListenerCtx::load_tls`]).
pub struct RenewedTls {
    acceptor: Option<crate::tls::ServerTls>,
    files: Option<[u8; 32]>,
}

/// A bound listener, shared read-only by all workers.
pub struct ListenerCtx {
    /// Listener name.
    pub name: Name,
    /// Its config.
    pub cfg: config::Listener,
    /// The bound address.
    pub local_addr: SocketAddr,
    /// TLS termination, if configured. Swapped in place when a reload finds
    /// only the certificate files changed ([`ListenerCtx::renew_tls`]): new
    /// connections get the new certificate, open ones go on.
    pub tls: ArcSwapOption<crate::tls::ServerTls>,
    /// [`crate::tls::files_digest`] of the files `tls` was built from: a reload
    /// renews `tls` when they changed (a renewed certificate).
    tls_files: std::sync::Mutex<Option<[u8; 32]>>,
    /// Connections open across workers (for `max_connections`), shared with the
    /// listeners this one replaced on the same socket ([`ListenerCtx::succeed`]):
    /// their connections still draining count against the limit too.
    open: Arc<AtomicUsize>,
    /// Counters.
    pub stats: ListenerStats,
    /// The access logs its requests and sessions are written to (its own or
    /// the top level's, [`crate::access_log::for_listener`]); `None`: none,
    /// and no line is built.
    pub access_log: Option<Arc<crate::access_log::Logs>>,
    /// Turns true when this listener stops: the process drains, or a reload removed
    /// or replaced it. Accept loops stop; its connections close gracefully.
    closing: watch::Sender<bool>,
    /// The config a reload replaced this listener in ([`ListenerCtx::retire`]),
    /// while connections that may still send requests are open.
    retired: ArcSwapOption<crate::server::Snapshot>,
    /// Connections that may still send requests ([`ListenerCtx::serving`]):
    /// open HTTP connections, not counting those that became tunnels.
    serving: AtomicUsize,
}

impl ListenerCtx {
    /// Binds the listener's socket and loads its TLS material.
    pub fn bind(
        cfg: &config::Listener,
        stats: &Stats,
        logs: Option<Arc<crate::access_log::Logs>>,
    ) -> anyhow::Result<(Self, std::net::TcpListener)> {
        let socket = bind_socket(cfg)?;
        let ctx = Self::adopt(cfg, stats, &socket, logs)?;
        Ok((ctx, socket))
    }

    /// A listener serving on an already bound and listening socket (kept across a
    /// reload, or inherited from the previous process on a hot restart).
    pub fn adopt(
        cfg: &config::Listener,
        stats: &Stats,
        socket: &std::net::TcpListener,
        logs: Option<Arc<crate::access_log::Logs>>,
    ) -> anyhow::Result<Self> {
        Self::adopt_after(cfg, stats, socket, logs, None)
    }

    /// [`ListenerCtx::adopt`], taking over from `previous` (the listener a
    /// reload replaces): its random session ticket key is kept when the
    /// `tls` settings are the same ([`crate::tls::ServerTls::new`]).
    fn adopt_after(
        cfg: &config::Listener,
        stats: &Stats,
        socket: &std::net::TcpListener,
        logs: Option<Arc<crate::access_log::Logs>>,
        previous: Option<&ListenerCtx>,
    ) -> anyhow::Result<Self> {
        socket.set_nonblocking(true)?;
        let local_addr = socket.local_addr()?;
        let RenewedTls { acceptor, files } = Self::load_tls(cfg, previous)?;
        Ok(ListenerCtx {
            name: cfg.name.clone(),
            cfg: cfg.clone(),
            local_addr,
            tls: ArcSwapOption::new(acceptor.map(Arc::new)),
            tls_files: std::sync::Mutex::new(files),
            open: Arc::default(),
            stats: ListenerStats::new(stats, cfg.name.as_str()),
            access_log: logs,
            closing: watch::channel(false).0,
            retired: ArcSwapOption::empty(),
            serving: AtomicUsize::new(0),
        })
    }

    /// Reads and checks the TLS material of `cfg` (none without `tls`), for
    /// the listener `previous` (a renewal, a reload), whose random session
    /// ticket key it keeps when the `tls` settings are the same.
    pub fn load_tls(
        cfg: &config::Listener,
        previous: Option<&ListenerCtx>,
    ) -> anyhow::Result<RenewedTls> {
        // Digested before reading: a file replaced meanwhile makes the next reload
        // renew again rather than keep a stale certificate.
        let files = cfg.tls.as_ref().map(crate::tls::files_digest);
        let acceptor = match &cfg.tls {
            Some(t) => {
                let alpn: &[&[u8]] = if cfg.http.is_some() {
                    &[b"h2", b"http/1.1"]
                } else {
                    &[]
                };
                let previous = previous.and_then(|p| p.tls.load_full());
                Some(crate::tls::ServerTls::new(t, alpn, previous.as_deref())?)
            }
            None => None,
        };
        Ok(RenewedTls { acceptor, files })
    }

    /// The digest of the TLS files the listener's certificate came from.
    pub fn tls_files(&self) -> Option<[u8; 32]> {
        *self
            .tls_files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts renewed TLS material in place (Envoy's SDS rotation): connections
    /// accepted from now on get it; open ones keep theirs and are not drained.
    pub fn renew_tls(&self, renewed: RenewedTls) {
        self.tls.store(renewed.acceptor.map(Arc::new));
        *self
            .tls_files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = renewed.files;
    }

    /// A listener on `previous`'s socket that takes over from it (a reload
    /// changed its settings, or renamed it): it counts `previous`'s connections,
    /// which drain meanwhile, toward its own `max_connections`, so the handover
    /// never lets more than the limit be open on the socket.
    pub fn succeed(
        cfg: &config::Listener,
        stats: &Stats,
        socket: &std::net::TcpListener,
        previous: &ListenerCtx,
        logs: Option<Arc<crate::access_log::Logs>>,
    ) -> anyhow::Result<Self> {
        let mut ctx = Self::adopt_after(cfg, stats, socket, logs, Some(previous))?;
        ctx.open = previous.open.clone();
        Ok(ctx)
    }

    /// Stops this listener: accept loops end, connections close gracefully
    /// (idempotent).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Stops this listener because a reload replaced or removed it: its
    /// connections still open finish with `last`, the config they came in on.
    /// The new config may name this listener's routes, filter chain or cluster
    /// differently or not at all, and a request of an old connection looked
    /// up there would miss its chain (skipping its filters, auth included) or
    /// its route table (a 500).
    /// (HTTP only: a TCP connection looks its config up once, when it starts,
    /// and must not keep a whole old config alive for its lifetime.)
    /// Kept only while such connections remain: a WebSocket tunnel that
    /// outlives them must not keep a whole old config alive.
    pub fn retire(&self, last: Arc<crate::server::Snapshot>) {
        if self.cfg.http.is_some() {
            self.retired.store(Some(last));
            if self.serving.load(Ordering::SeqCst) == 0 {
                self.retired.store(None);
            }
        }
        self.close();
    }

    /// Counts a connection that may send requests until the guard drops.
    pub fn serving(self: &Arc<Self>) -> Serving {
        self.serving.fetch_add(1, Ordering::SeqCst);
        Serving(self.clone())
    }

    /// The config a request or connection of this listener runs with: the
    /// current one, or the one it was retired from.
    pub fn snapshot(
        &self,
        current: &ArcSwap<crate::server::Snapshot>,
    ) -> Arc<crate::server::Snapshot> {
        match self.retired.load_full() {
            Some(last) => last,
            None => current.load_full(),
        }
    }

    /// Whether [`ListenerCtx::close`] was called.
    pub fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// A receiver that turns true when the listener stops.
    pub fn closing_signal(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Resolves `drain_timeout` (of the config in force then) after this
    /// listener stops: a drain, or a reload that replaced or removed it. A
    /// connection with no request to end it (a TCP proxy connection, a
    /// WebSocket tunnel) is closed then, as Envoy closes a draining listener's
    /// connections at the end of its drain time: otherwise one that keeps
    /// moving bytes outlives a reload forever, on a listener (and a cluster)
    /// the config no longer has. A process drain cuts it at the same time
    /// (`server::run_worker`). Counted in `legate_listener_drain_closes_total`
    /// when it resolves: callers poll it only while the connection is open and
    /// close the connection when it does.
    pub async fn drained(&self, snapshot: &ArcSwap<crate::server::Snapshot>) {
        let mut closing = self.closing_signal();
        if closing.wait_for(|c| *c).await.is_err() {
            // (Not before `self` goes: it holds the sender.)
            std::future::pending::<()>().await;
        }
        let timeout = snapshot.load().config.drain_timeout.get();
        tokio::time::sleep(timeout).await;
        self.stats.cx_drain_close.inc();
    }
}

/// Binds and listens on a listener's address.
pub fn bind_socket(cfg: &config::Listener) -> anyhow::Result<std::net::TcpListener> {
    let addr: SocketAddr = cfg.address.value.parse().context("listener address")?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR lets a restarted Legate bind while old connections sit in
    // TIME_WAIT; it does not allow two live listeners on one port.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into()).map_err(|e| {
        let hint = bind_hint(e.kind(), addr);
        anyhow::Error::new(e).context(format!("cannot bind {addr}{hint}"))
    })?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The likely cause of a bind error of kind `kind` at `addr`, as ` (…)` after
/// the address, or nothing when there is no better guess than the error itself.
fn bind_hint(kind: std::io::ErrorKind, addr: SocketAddr) -> &'static str {
    match kind {
        std::io::ErrorKind::AddrInUse => " (is another process using it?)",
        std::io::ErrorKind::AddrNotAvailable if addr.is_ipv4() => {
            " (the address is not one of this host's: listen on one it has, or on `0.0.0.0`)"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            " (the address is not one of this host's: listen on one it has, or on `[::]`)"
        }
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            " (ports below 1024 need root or the CAP_NET_BIND_SERVICE capability)"
        }
        _ => "",
    }
}

/// Counts a worker's open connections so a drain can wait for them.
#[derive(Clone, Default)]
pub struct ConnTracker {
    inner: Rc<(Cell<usize>, Notify)>,
}

impl ConnTracker {
    /// Open connections.
    pub fn count(&self) -> usize {
        self.inner.0.get()
    }

    /// Resolves when no connection is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.1.notified();
            if self.inner.0.get() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn enter(&self) -> TrackGuard {
        self.inner.0.set(self.inner.0.get() + 1);
        TrackGuard(self.clone())
    }
}

/// Held by a connection task; marks it closed on drop.
pub struct TrackGuard(ConnTracker);

impl Drop for TrackGuard {
    fn drop(&mut self) {
        let c = &self.0.inner;
        c.0.set(c.0.get().saturating_sub(1));
        if c.0.get() == 0 {
            c.1.notify_waiters();
        }
    }
}

/// A connection of a listener that may still send requests
/// ([`ListenerCtx::serving`]); the last one to go lets a retired listener's
/// config go.
pub struct Serving(Arc<ListenerCtx>);

impl Drop for Serving {
    fn drop(&mut self) {
        if self.0.serving.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.retired.store(None);
        }
    }
}

/// Releases a `max_connections` slot and the active gauge on drop.
struct Slot(Arc<ListenerCtx>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.stats.cx_active.dec();
    }
}

/// Accepts connections until the listener closes (drain, or removed by a reload).
pub async fn accept_loop(
    worker: Rc<Worker>,
    ctx: Arc<ListenerCtx>,
    listener: TcpListener,
    tracker: ConnTracker,
) {
    let mut drain = ctx.closing_signal();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning; the
                // connection stays in the kernel queue and is retried.
                tracing::warn!(listener = %ctx.name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let max = ctx.cfg.limits.max_connections as usize;
        if ctx.open.fetch_add(1, Ordering::Relaxed) >= max {
            ctx.open.fetch_sub(1, Ordering::Relaxed);
            ctx.stats.cx_overflow.inc();
            drop(stream);
            continue;
        }
        ctx.stats.cx_total.inc();
        ctx.stats.cx_active.inc();
        let slot = Slot(ctx.clone());
        let guard = tracker.enter();
        let _ = stream.set_nodelay(true);
        let original_dst = if ctx.cfg.original_destination {
            // A client that connects to the listener itself (no REDIRECT) reports
            // the listener as its original destination; proxying there would
            // loop back into Legate forever.
            original_dst(&stream, peer).filter(|d| Some(*d) != stream.local_addr().ok())
        } else {
            None
        };
        let worker = worker.clone();
        let ctx = ctx.clone();
        // Counted from the accept: a reload retiring the listener before the
        // connection's first request keeps its config for it too.
        let serving = ctx.cfg.tcp.is_none().then(|| ctx.serving());
        tokio::task::spawn_local(async move {
            let _slot = slot;
            let mut stream = stream;
            let Some((peer, local)) = proxied_addresses(&ctx, &mut stream, peer).await else {
                return;
            };
            let linger = if ctx.cfg.tcp.is_some() {
                crate::tcp_proxy::serve(worker, ctx, stream, peer, local, original_dst).await;
                None
            } else {
                crate::connection::serve(worker, ctx, serving, stream, peer, local, original_dst)
                    .await
            };
            // A lingering close serves no more requests: a drain does not wait
            // for it (if the process exits first, its client sees the close it
            // would have seen without lingering). It keeps its slot: it is still
            // an open socket, bounded in time, and the gauge says so.
            drop(guard);
            if let Some(linger) = linger {
                linger.run().await;
            }
        });
    }
    tracing::debug!(listener = %ctx.name, worker = worker.id, "stopped accepting (listener closed)");
}

/// The connection's client and local addresses: its own, or those of its PROXY
/// protocol header when the listener reads one (within `header_read_timeout`).
/// `None`: the header was missing, malformed or late; the connection is closed
/// (counted, logged at debug).
async fn proxied_addresses(
    ctx: &ListenerCtx,
    stream: &mut tokio::net::TcpStream,
    peer: SocketAddr,
) -> Option<(SocketAddr, SocketAddr)> {
    let local = stream.local_addr().unwrap_or(ctx.local_addr);
    let Some(pp) = &ctx.cfg.proxy_protocol else {
        return Some((peer, local));
    };
    let read = crate::proxy_protocol::read(stream, pp.required);
    let why = match tokio::time::timeout(ctx.cfg.limits.header_read_timeout.get(), read).await {
        Ok(Ok(crate::proxy_protocol::Header::Proxied {
            source,
            destination,
        })) => return Some((source, destination)),
        Ok(Ok(_)) => return Some((peer, local)),
        Ok(Err(why)) => why,
        Err(_) => "no PROXY protocol header within header_read_timeout".to_string(),
    };
    ctx.stats.cx_proxy_proto_error.inc();
    tracing::debug!(listener = %ctx.name, %peer, "{why}; closing");
    None
}

/// The destination a connection had before an iptables `REDIRECT` (SO_ORIGINAL_DST).
fn original_dst(stream: &tokio::net::TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let res = if peer.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    match res {
        Ok(a) => a.as_socket(),
        Err(e) => {
            tracing::debug!("SO_ORIGINAL_DST unavailable: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener of a minimal config, at `address`.
    fn listener_at(address: &str) -> config::Listener {
        let src = "version: 1
listeners:
  - name: web
    address: 127.0.0.1:8080
    http: { routes: main }
routes:
  - name: main
    virtual_hosts:
      - name: default
        domains: [\"*\"]
        routes:
          - match: { prefix: / }
            direct_response: { status: 200 }
";
        let cfg = config::parse_str("test.yaml", src, std::path::Path::new("."))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut l = cfg.listeners[0].value.clone();
        l.address.value = address.to_string();
        l
    }

    #[test]
    fn bind_errors_name_the_cause_of_their_kind() {
        // An address this host does not have (TEST-NET-1): not a port conflict.
        let err = bind_socket(&listener_at("192.0.2.1:8080")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("not one of this host's"), "{msg}");
        assert!(!msg.contains("another process"), "{msg}");
        // A port in use: that one is.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let msg = format!("{:#}", bind_socket(&listener_at(&addr)).unwrap_err());
        assert!(msg.contains("is another process using it?"), "{msg}");
    }
}
