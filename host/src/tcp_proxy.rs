//! TCP proxy listeners (L4): each downstream connection is forwarded byte for byte
//! to an endpoint of the listener's cluster, with a connect retry across endpoints,
//! an idle timeout and byte counters. A listener with `tcp.filters` runs each
//! connection through its network filter chain ([`crate::network_filter`]):
//! `on_new_connection` before the connect, data and close callbacks after; one
//! without filters keeps the plain `copy_bidirectional` path. A connection
//! of a listener that stopped (drain, reload) is closed `drain_timeout` later
//! ([`ListenerCtx::drained`]).
//!
//! The listener's `rx_bytes`/`tx_bytes` counters grow as the bytes move (one
//! atomic add per read or write, [`Metered`]), not when the connection ends. A
//! session that got past its TLS handshake (when the listener terminates TLS)
//! writes one access-log line when it ends ([`Session`]): the same
//! [`access_log::Line`] as HTTP's, `protocol` `"TCP"`, an nginx `stream`-like
//! `status` (200 once the upstream was reached, 502 when it could not be, 503
//! when the cluster refused, 403 when a filter closed before the connect) and a
//! `cause` saying what ended it. Failures are otherwise only at debug level
//! (Envoy's `tcp_proxy` logs them at debug too): the line, and the cluster's
//! and listener's counters, are how an operator sees them.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::access_log;
use crate::cluster::outlier::Outcome;
use crate::error::{Kind, ProxyError};
use crate::filter::{ConnFacts, TlsFacts};
use crate::io::{Activity, Conn, Tracked, Verdict};
use crate::listener::ListenerCtx;
use crate::network_filter::{self, Ending, NetChain};
use crate::stats::Counter;
use crate::tls::TlsInfo;
use crate::upstream::{open_stream, Target};
use crate::worker::Worker;

/// Causes of the access log for a TCP session: what ended it.
mod cause {
    /// The client closed (or reset) its side first.
    pub const DOWNSTREAM_CLOSE: &str = "downstream_close";
    /// The upstream closed (or reset) its side first.
    pub const UPSTREAM_CLOSE: &str = "upstream_close";
    /// `tcp.idle_timeout` passed with no byte either way.
    pub const IDLE_TIMEOUT: &str = "idle_timeout";
    /// The listener stopped and `drain_timeout` passed (HTTP's name for it).
    pub const DRAIN_TIMEOUT: &str = "drain_timeout";
    /// A network filter closed the connection.
    pub const FILTER_CLOSE: &str = "filter_close";
    /// The last connect failed (refused, reset, TLS handshake) (HTTP's name).
    pub const CONNECT_FAILURE: &str = "upstream_connect_failure";
    /// The last connect did not complete within the cluster's `connect_timeout`.
    pub const CONNECT_TIMEOUT: &str = "upstream_connect_timeout";
    /// The cluster's circuit breakers refused the connection (HTTP's name).
    pub const OVERLOADED: &str = "overloaded";
    /// The cluster had no endpoint to pick (HTTP's name).
    pub const NO_HEALTHY_UPSTREAM: &str = "no_healthy_upstream";
    /// An `original_dst` cluster, and the connection had no original destination.
    pub const NO_ORIGINAL_DESTINATION: &str = "no_original_destination";
}

/// What a session's access-log line says, gathered as it goes.
struct Session<'a> {
    ctx: &'a ListenerCtx,
    cluster: &'a str,
    peer: SocketAddr,
    /// The address the client connected to (`%DOWNSTREAM_LOCAL_ADDRESS%`).
    local: SocketAddr,
    start: SystemTime,
    started: Instant,
    /// The downstream TLS session, kept for the line only with an access log
    /// (and for filters).
    tls: Option<TlsInfo>,
    /// The endpoint connected to, or the last one tried.
    upstream: Option<SocketAddr>,
    /// Connects tried.
    attempts: u32,
    status: u16,
    cause: Option<&'static str>,
    transport_failure: Option<String>,
    /// The downstream byte counts, once the connection was made.
    activity: Option<Arc<Activity>>,
}

impl Session<'_> {
    /// Writes the line, if there is an access log.
    fn log(self, log: Option<&access_log::Logs>) {
        let Some(log) = log else { return };
        let (rx, tx) = self.activity.as_ref().map_or((0, 0), |a| a.bytes());
        log.write(&access_log::Line {
            time: access_log::timestamp(SystemTime::now()),
            start_time: access_log::timestamp(self.start),
            listener: self.ctx.name.as_str(),
            client: self.peer.to_string(),
            peer: None,
            method: None,
            path: None,
            protocol: Some("TCP".to_string()),
            authority: None,
            user_agent: None,
            status: self.status,
            bytes_sent: tx,
            bytes_received: rx,
            duration_ms: access_log::millis(self.started.elapsed()),
            response_duration_ms: None,
            referer: None,
            x_forwarded_for: None,
            route: None,
            route_table: None,
            virtual_host: None,
            cluster: Some(self.cluster),
            upstream: self.upstream.map(|a| a.to_string()),
            attempts: self.attempts,
            cause: self.cause,
            request_id: None,
            requested_server_name: self.tls.as_ref().and_then(|t| t.sni.as_deref()),
            downstream_peer_subject: self.tls.as_ref().and_then(TlsInfo::peer_subject),
            upstream_transport_failure_reason: self.transport_failure.as_deref(),
            facts: access_log::Facts {
                start: Some(self.start),
                local: Some(self.local),
                tls: self.tls.as_ref().map(|t| (t.version, t.cipher)),
                ..access_log::Facts::default()
            },
        });
    }

    /// The session never reached the upstream: `status` and `cause` say why.
    fn refused(&mut self, status: u16, cause: &'static str) {
        self.status = status;
        self.cause = Some(cause);
    }
}

/// One side of a proxied connection: adds the bytes it moves to the
/// listener's counters as they move (the downstream side), and records in
/// `first` whether it was the first side to end (a read saw EOF, or a read or
/// write failed).
struct Metered<'a, S> {
    inner: S,
    /// `(rx, tx)`: bytes read from and written to this side.
    counters: Option<(&'a Counter, &'a Counter)>,
    /// This side's cause when it ends first.
    ends: &'static str,
    first: &'a Cell<Option<&'static str>>,
    /// The upstream side: where a TLS alert on its first read goes (see
    /// [`crate::upstream::tls_alert`]): the upstream refused the handshake
    /// (with TLS 1.3, Legate's client certificate) after Legate's side
    /// completed it.
    refused: Option<&'a RefCell<Option<String>>>,
    /// A read returned bytes.
    read_any: bool,
}

impl<S> Metered<'_, S> {
    fn ended(&self) {
        if self.first.get().is_none() {
            self.first.set(Some(self.ends));
        }
    }

    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) => {
                if let Some((_, tx)) = self.counters {
                    tx.add(*n as u64);
                }
            }
            Poll::Ready(Err(_)) => self.ended(),
            Poll::Pending => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len().saturating_sub(before);
                if n > 0 {
                    this.read_any = true;
                    if let Some((rx, _)) = this.counters {
                        rx.add(n as u64);
                    }
                } else if room {
                    this.ended();
                }
            }
            Poll::Ready(Err(e)) => {
                this.ended();
                if let (Some(cell), false) = (this.refused, this.read_any) {
                    if let Some(alert) = crate::upstream::tls_alert(e) {
                        *cell.borrow_mut() = Some(alert);
                    }
                }
            }
            Poll::Pending => {}
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.wrote(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Err(_)) = r {
            this.ended();
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        if let Poll::Ready(Err(_)) = r {
            this.ended();
        }
        r
    }
}

/// Proxies one accepted connection until either side closes or it idles out,
/// then writes its access-log line.
pub async fn serve(
    worker: Rc<Worker>,
    ctx: Arc<ListenerCtx>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    original_dst: Option<SocketAddr>,
) {
    let Some(tcp) = &ctx.cfg.tcp else { return };
    let mut session = Session {
        ctx: &ctx,
        cluster: tcp.cluster.value.as_str(),
        peer,
        // What the client connected to: a redirected connection's original
        // destination (as HTTP lines log it).
        local: original_dst.unwrap_or(local),
        start: SystemTime::now(),
        started: Instant::now(),
        tls: None,
        upstream: None,
        attempts: 0,
        status: 200,
        cause: None,
        transport_failure: None,
        activity: None,
    };
    // A TLS handshake that failed logs nothing (counted in `tls_errors`), as
    // an HTTP connection closed without a request does not.
    if run(&worker, &ctx, stream, local, original_dst, &mut session).await {
        session.log(ctx.access_log.as_deref());
    }
}

/// The session: false when it ended before there was one to log.
async fn run(
    worker: &Rc<Worker>,
    ctx: &ListenerCtx,
    stream: TcpStream,
    local: SocketAddr,
    original_dst: Option<SocketAddr>,
    session: &mut Session<'_>,
) -> bool {
    let Some(tcp) = &ctx.cfg.tcp else {
        return false;
    };
    let peer = session.peer;
    let snapshot = ctx.snapshot(&worker.shared.snapshot);
    let Some(entry) = snapshot.clusters.get(&tcp.cluster.value).cloned() else {
        tracing::error!(listener = %ctx.name, "cluster `{}` missing from the snapshot", tcp.cluster.value);
        return false;
    };
    // Looked up once; the facts filters see are gathered only when there are
    // filters, so the plain path makes no extra syscall or allocation.
    let filters = snapshot.network.get(&ctx.name);
    let logged = ctx.access_log.is_some();
    let downstream = match ctx.tls.load_full() {
        None => Conn::Plain(stream),
        Some(server_tls) => {
            let hs = tokio::time::timeout(
                ctx.cfg.limits.header_read_timeout.get(),
                server_tls.acceptor.accept(stream),
            );
            match hs.await {
                Ok(Ok(s)) => {
                    crate::tls::count_resumed(s.get_ref().1, &ctx.stats);
                    if filters.is_some() || logged {
                        session.tls = Some(crate::tls::tls_info(s.get_ref().1));
                    }
                    Conn::Tls(Box::new(tokio_rustls::TlsStream::Server(s)))
                }
                _ => {
                    ctx.stats.cx_tls_error.inc();
                    return false;
                }
            }
        }
    };

    // Network filters: `on_new_connection` (which may pause for a callout or
    // close) before the connect.
    let mut filtered = None;
    if let Some(filters) = filters {
        let facts = Arc::new(ConnFacts {
            id: crate::filter::next_connection_id(),
            source: peer,
            destination: local,
            tls: session.tls.as_ref().map(TlsFacts::of),
        });
        let x = network_filter::connection(facts, &ctx.name, &tcp.cluster.value);
        let callouts = crate::proxy::callout_sender(worker, &snapshot);
        crate::filter::set_worker_callouts(callouts.clone());
        let (mut chain, mut rx) = NetChain::new(worker.id, filters, x, callouts);
        if !network_filter::start(&mut chain, &mut rx).await {
            tracing::debug!(listener = %ctx.name, %peer, "a network filter closed the connection");
            network_filter::finish_unconnected(&mut chain);
            // nginx `stream`'s status for a session its access rules refused.
            session.refused(403, cause::FILTER_CLOSE);
            return true;
        }
        filtered = Some((chain, rx));
    }
    // What the connection needs is held (its cluster, its filters); the rest
    // of the config goes with the next reload instead of living as long as the
    // connection: a long-lived connection would otherwise keep every plugin
    // instance of its config version on every worker.
    drop(snapshot);

    // Connect, trying each endpoint once on failure.
    let cluster = &entry.cluster();
    let balancer = worker.balancer(cluster);
    let hash = cluster.hash_key(&http::HeaderMap::new(), peer.ip());
    let connect_timeout = cluster.config.connect_timeout.get();
    let mut tried = Vec::new();
    let attempts = if cluster.config.original_dst {
        1
    } else {
        cluster.endpoints.len().max(1)
    };
    let mut upstream = None;
    session.refused(503, cause::NO_HEALTHY_UPSTREAM);
    for _ in 0..attempts {
        let (addr, host, index) = if cluster.config.original_dst {
            let Some(a) = original_dst else {
                tracing::debug!(listener = %ctx.name, %peer, "no original destination; closing");
                session.refused(502, cause::NO_ORIGINAL_DESTINATION);
                break;
            };
            (a, Arc::<str>::from(a.ip().to_string()), None)
        } else {
            let Some(i) = balancer.pick(hash, &tried) else {
                break;
            };
            tried.push(i);
            let ep = &cluster.endpoints[i];
            (ep.address, ep.host.clone(), Some(i))
        };
        let target = Target {
            addr,
            host: &host,
            cluster,
            endpoint: index,
            proxied: Some((peer, local)),
        };
        session.attempts += 1;
        session.upstream = Some(addr);
        let connecting = Instant::now();
        let result = open_stream(&entry.upstream, &target).await;
        // Connects are all a TCP proxy learns about an endpoint: outlier detection
        // counts them (a refused or timed-out connect is a gateway failure).
        if let (
            Some(i),
            Ok(_)
            | Err(ProxyError {
                kind: Kind::ConnectFailed,
                ..
            }),
        ) = (index, &result)
        {
            let outcome = if result.is_ok() {
                Outcome::Success
            } else {
                Outcome::LocalFailure
            };
            cluster.outlier_record(i, outcome);
        }
        match result {
            Ok((conn, counted)) => {
                upstream = Some((conn, counted, index, addr));
                break;
            }
            Err(e) => {
                tracing::debug!(listener = %ctx.name, "tcp upstream {addr}: {e}");
                session.transport_failure = e.transport_failure;
                if e.kind == Kind::Overloaded {
                    // The circuit breakers are the cluster's: another
                    // endpoint would be refused (and counted) the same way.
                    session.refused(503, cause::OVERLOADED);
                    break;
                }
                let timed_out = connecting.elapsed() >= connect_timeout;
                session.refused(
                    502,
                    if timed_out {
                        cause::CONNECT_TIMEOUT
                    } else {
                        cause::CONNECT_FAILURE
                    },
                );
            }
        }
    }
    let Some((upstream, _counted, index, addr)) = upstream else {
        tracing::debug!(listener = %ctx.name, %peer, "no upstream reachable; closing");
        if let Some((mut chain, _)) = filtered {
            network_filter::finish_unconnected(&mut chain);
        }
        return true;
    };
    session.status = 200;
    session.cause = None;
    session.transport_failure = None;
    let _active = cluster.start_request(index);

    let activity = Arc::new(Activity::default());
    session.activity = Some(activity.clone());
    let first = Cell::new(None);
    let refused = RefCell::new(None);
    let mut down = Metered {
        inner: Tracked::new(downstream, activity.clone()),
        counters: Some((&ctx.stats.rx_bytes, &ctx.stats.tx_bytes)),
        ends: cause::DOWNSTREAM_CLOSE,
        first: &first,
        refused: None,
        read_any: false,
    };
    // Upstream bytes count as activity too (not as the client's bytes): a
    // filter may hold what the upstream sends, or a slow upstream take an
    // upload, with nothing moving on the client's side meanwhile.
    let mut up = Metered {
        inner: Tracked::other(upstream, activity.clone()),
        counters: None,
        ends: cause::UPSTREAM_CLOSE,
        first: &first,
        refused: Some(&refused),
        read_any: false,
    };
    let idle = tcp.idle_timeout.get();
    // Once the listener stops (a drain, or a reload that replaced or removed
    // it), the connection has `drain_timeout` left.
    let drained = ctx.drained(&worker.shared.snapshot);
    tokio::pin!(drained);
    let ending = if let Some((mut chain, rx)) = filtered {
        chain.x.upstream = Some(addr);
        network_filter::serve(chain, rx, down, up, &activity, idle, drained).await
    } else {
        copy(
            &mut down,
            &mut up,
            &activity,
            idle,
            drained.as_mut(),
            ctx,
            peer,
        )
        .await
    };
    session.cause = Some(match ending {
        Ending::Idle => {
            ctx.stats.tcp_idle_timeouts.inc();
            cause::IDLE_TIMEOUT
        }
        Ending::Drain => cause::DRAIN_TIMEOUT,
        Ending::Filter => cause::FILTER_CLOSE,
        // Both sides are done: the one that ended first ended the session.
        Ending::Peers => first.get().unwrap_or(cause::DOWNSTREAM_CLOSE),
    });
    // The upstream refused the TLS handshake on its first read: a connect
    // failure, as when it refuses during the handshake.
    if let Some(alert) = refused.take() {
        let e = crate::upstream::refused_handshake(addr, alert);
        tracing::debug!(listener = %ctx.name, "tcp upstream {addr}: {}", e.detail);
        cluster.record_handshake_refused(index, &e.detail);
        session.status = 502;
        session.cause = Some(cause::CONNECT_FAILURE);
        session.transport_failure = e.transport_failure;
    }
    true
}

/// The plain path: copies both ways until both sides are done, the idle
/// timeout or the drain.
async fn copy(
    down: &mut Metered<'_, Tracked<Conn>>,
    up: &mut Metered<'_, Tracked<Conn>>,
    activity: &Activity,
    idle: std::time::Duration,
    mut drained: Pin<&mut impl std::future::Future<Output = ()>>,
    ctx: &ListenerCtx,
    peer: SocketAddr,
) -> Ending {
    let copy = tokio::io::copy_bidirectional(down, up);
    tokio::pin!(copy);
    loop {
        let deadline = match activity.check(idle, None) {
            Verdict::WaitUntil(t) => t,
            _ => {
                tracing::debug!(listener = %ctx.name, %peer, "tcp connection idle for {idle:?}; closing");
                return Ending::Idle;
            }
        };
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(listener = %ctx.name, %peer, "tcp proxy ended: {e}");
                }
                return Ending::Peers;
            }
            () = drained.as_mut() => {
                tracing::debug!(listener = %ctx.name, %peer, "listener closed and drain timeout passed; closing");
                return Ending::Drain;
            }
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}
