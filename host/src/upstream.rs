//! The upstream connection pool: one per worker, no locks.
//!
//! A [`Pool`] owns every upstream connection its worker opened: idle HTTP/1.1
//! keep-alive connections per (cluster, endpoint), and the multiplexed HTTP/2
//! connections per (cluster, endpoint): one, and more while every one has
//! `max_concurrent_streams` streams open. [`UpstreamSettings`] (built once per
//! cluster when config is applied) carry the protocol, TLS, timeouts and limits.
//!
//! An endpoint is its address, and also its host name when that is the TLS name
//! (TLS without a fixed `tls.sni`): two endpoints naming one address under two
//! names (virtual hosts of one server) never share a connection whose SNI and
//! certificate check were for the other, as Envoy keys its pools by transport
//! socket options. Plaintext and fixed-SNI clusters share by address.
//!
//! An attempt takes a stream on the first HTTP/2 connection with one free (the
//! oldest first, so that the others go idle and close when the load drops). With
//! none free, it waits for a connection being opened that has streams left to
//! promise (as Envoy queues attempts on a connecting connection's capacity), else
//! opens one: a burst opens one connection per `max_concurrent_streams` attempts;
//! if opening one fails, its waiting attempts all fail with its error. The limit
//! is the cluster's setting, or the upstream's own SETTINGS_MAX_CONCURRENT_STREAMS
//! when lower (as Envoy): hyper reports that only on the connection's driver
//! (`Connection::current_max_send_streams`), which the pool shares with the
//! task polling it, and only once the frame arrived, after the handshake the
//! waiting attempts were promised streams at; so a connection being opened
//! promises what the key's open connections were allowed. When
//! `max_connections` refuses another connection (counted as an overflow), the
//! attempt shares the least loaded one, where hyper queues the stream until one of
//! its streams ends. A worker with no connection to a key (open or opening) opens
//! one whatever `max_connections` says (counted as an overflow too), as Envoy's
//! per-worker pools do: the limit is shared by every worker and endpoint, and
//! connections another worker keeps idle must not refuse this one's requests. An HTTP/2
//! connection with no stream open for its cluster's `idle_timeout` is dropped from
//! the pool: hyper then closes it (streams still open would finish first). The pool
//! is keyed by settings, which a reload renews, so connections of a changed or
//! removed cluster are never used again and go the same way.
//!
//! An HTTP/1.1 connection goes back to the idle list only after its response body has
//! been read to the end, so a reused connection is always between messages. If a
//! pooled connection turns out closed before the request was written, hyper hands the
//! request back and it is sent on a new connection: keep-alive races never reach the
//! client.

use rustc_hash::FxHashMap;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response, Uri, Version};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::TlsStream;

use crate::body::{self, Body};
use crate::cluster::{ActiveConnection, Cluster, ConnectFailure, ConnectPermit};
use crate::config::{self, UpstreamProtocol};
use crate::error::{Kind, ProxyError};
use crate::io::Conn;
use crate::worker::LocalExec;

static NEXT_SETTINGS_ID: AtomicU64 = AtomicU64::new(1);

/// The largest response head an upstream may send: 60 KiB, Envoy's default
/// for upstream responses (`max_response_headers_kb`) and Legate's for
/// requests (`max_request_headers_size`). On HTTP/2 the HPACK-decoded header
/// list (hyper's client default, 16 KiB, failed responses Envoy passes: a few
/// large cookies); on HTTP/1.1 the head as sent, status line included (hyper
/// bounds it otherwise only by its read buffer, ~400 KiB). Its trailers have
/// the same limit. The field count is hyper's HTTP/1.1 default, 100, which is
/// Envoy's `max_headers_count` default too (setting it would move hyper's
/// header array from the stack to the heap on every response).
const MAX_RESPONSE_HEADERS_SIZE: u32 = 60 * 1024;

/// How to talk to one cluster's endpoints; built when config is applied.
pub struct UpstreamSettings {
    /// `proxy_protocol.version`: the PROXY header written first on each connection.
    proxy_protocol: Option<u8>,
    /// Distinguishes pools of clusters with the same endpoint but other settings
    /// (and of the same cluster across config reloads).
    id: u64,
    protocol: UpstreamProtocol,
    tls: Option<UpstreamTls>,
    /// [`crate::tls::upstream_files_digest`] of the files `tls` was built from.
    tls_files: Option<[u8; 32]>,
    connect_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
    /// Streams an HTTP/2 connection takes before another one is opened.
    max_streams: usize,
    /// HTTP/2 flow-control windows of a stream and of a connection
    /// ([`config::Cluster::stream_window`], [`config::Cluster::connection_window`]).
    stream_window: u32,
    connection_window: u32,
    /// HTTP/2 keep-alive PINGs: interval and answer timeout (`None`: no PINGs).
    keepalive: Option<(Duration, Duration)>,
}

struct UpstreamTls {
    connector: TlsConnector,
    /// What it presents and trusts, for `GET /certs` and the expiry series.
    certificates: Arc<[crate::tls::LoadedCerts]>,
    /// Configured SNI; `None` = the endpoint's host.
    sni: Option<ServerName<'static>>,
}

impl UpstreamSettings {
    /// The certificates its TLS presents and trusts (its files; not the
    /// built-in roots): none without TLS.
    pub fn tls_certificates(&self) -> Option<Arc<[crate::tls::LoadedCerts]>> {
        self.tls.as_ref().map(|t| t.certificates.clone())
    }

    /// Settings for `cluster`, loading its TLS files.
    pub fn new(cluster: &config::Cluster) -> anyhow::Result<Self> {
        // Digested before reading, as for listeners.
        let tls_files = cluster.tls.as_ref().map(crate::tls::upstream_files_digest);
        let tls = match &cluster.tls {
            None => None,
            Some(t) => {
                let alpn: &[&[u8]] = match cluster.protocol {
                    UpstreamProtocol::Http1 => &[b"http/1.1"],
                    UpstreamProtocol::H2 => &[b"h2"],
                    UpstreamProtocol::Auto => &[b"h2", b"http/1.1"],
                };
                let (cfg, certificates) = crate::tls::client_parts(t, alpn)?;
                let sni = match &t.sni {
                    Some(s) => Some(ServerName::try_from(s.clone()).map_err(|e| {
                        anyhow::anyhow!(
                            "cluster `{}`: tls.sni `{s}` is not a valid name: {e}",
                            cluster.name
                        )
                    })?),
                    None => None,
                };
                Some(UpstreamTls {
                    connector: TlsConnector::from(cfg),
                    certificates: certificates.into(),
                    sni,
                })
            }
        };
        Ok(UpstreamSettings {
            proxy_protocol: cluster.proxy_protocol.as_ref().map(|p| p.version),
            id: NEXT_SETTINGS_ID.fetch_add(1, Ordering::Relaxed),
            protocol: cluster.protocol,
            tls,
            tls_files,
            connect_timeout: cluster.connect_timeout.get(),
            max_idle: cluster.max_idle_per_endpoint as usize,
            idle_timeout: cluster.idle_timeout.get(),
            max_streams: cluster.max_concurrent_streams as usize,
            stream_window: cluster.stream_window(),
            connection_window: cluster.connection_window(),
            keepalive: cluster
                .connection_keepalive
                .as_ref()
                .map(|k| (k.interval.get(), k.timeout.get())),
        })
    }

    /// Whether the TLS files `cluster` names still hold what these settings were
    /// built from (else a reload renews them: [`crate::server::ClusterEntry::renewed`]).
    pub fn same_tls_files(&self, cluster: &config::Cluster) -> bool {
        self.tls_files == cluster.tls.as_ref().map(crate::tls::upstream_files_digest)
    }

    /// Whether requests to this cluster go over HTTP/2 from the start.
    pub fn is_h2(&self) -> bool {
        self.protocol == UpstreamProtocol::H2
    }

    /// Whether a new connection may speak HTTP/2 (`auto` only with TLS: ALPN
    /// decides; plaintext `auto` is HTTP/1.1).
    fn may_be_h2(&self) -> bool {
        match self.protocol {
            UpstreamProtocol::H2 => true,
            UpstreamProtocol::Auto => self.tls.is_some(),
            UpstreamProtocol::Http1 => false,
        }
    }
}

/// What a pooled connection can be reused for.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    /// [`UpstreamSettings::id`].
    settings: u64,
    addr: SocketAddr,
    /// The endpoint's host when it is the connection's TLS name (TLS without a
    /// fixed `tls.sni`): endpoints naming one address under two names (virtual
    /// hosts of one server) must not share connections, whose SNI and certificate
    /// check were for one of them. Shared with the endpoint, so keying costs no copy.
    host: Option<Arc<str>>,
}

impl Key {
    fn new(s: &UpstreamSettings, target: &Target<'_>) -> Key {
        let by_host = s.tls.as_ref().is_some_and(|t| t.sni.is_none());
        Key {
            settings: s.id,
            addr: target.addr,
            host: by_host.then(|| target.host.clone()),
        }
    }
}

struct Idle {
    sender: http1::SendRequest<Body>,
    /// Its key's connections (carried, not looked up per request).
    conns: Arc<KeyConnections>,
    since: Instant,
    /// Its cluster's idle timeout (of the settings it was opened with).
    idle_timeout: Duration,
}

/// The HTTP/2 connections of a key: open ones (oldest first), and those being
/// opened, each by one attempt.
#[derive(Default)]
struct H2Set {
    ready: Vec<H2Conn>,
    opening: Vec<Opening>,
}

impl H2Set {
    /// The streams each connection takes: the least any of them was allowed
    /// ([`H2Usage::cap`]) applies to all, since one too new to have the
    /// upstream's SETTINGS yet reads h2's initial 100, and the same upstream
    /// most likely sends it the same limit.
    fn cap(&self, max: usize) -> usize {
        self.ready.iter().fold(max, |m, c| c.usage.cap(m))
    }
}

/// An HTTP/2 connection being opened.
struct Opening {
    /// Other attempts wait on it; `None` until the opening attempt is done (a
    /// closed channel: it was abandoned).
    rx: watch::Receiver<Option<Opened>>,
    /// Attempts counting on it: the one opening it and those waiting. Only
    /// `max_concurrent_streams` wait; more open another connection. (A waiter
    /// cancelled meanwhile still counts: at worst one more connection opens.)
    claimed: usize,
}

/// An open HTTP/2 connection.
struct H2Conn {
    sender: http2::SendRequest<Body>,
    usage: Rc<H2Usage>,
    /// The idle timeout of the settings it was opened with (kept so that the
    /// connections of settings a reload replaced still time out).
    idle_timeout: Duration,
}

impl H2Conn {
    /// No stream open for its idle timeout.
    fn is_idle_past(&self, now: Instant) -> bool {
        self.usage.streams.get() == 0
            && now.saturating_duration_since(self.usage.idle_since.get()) >= self.idle_timeout
    }
}

/// An HTTP/2 connection's streams, counted by the pool: the attempts using it,
/// until their response bodies end or are dropped.
struct H2Usage {
    streams: Cell<usize>,
    /// When the last stream ended (or the connection opened).
    idle_since: Cell<Instant>,
    /// The connection's driver, shared with the task that polls it: the only
    /// place hyper reports the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`.
    /// `None` once it ended: it is dropped then, as the streams still open on
    /// it (which hold this) learn of the connection's end only from its drop.
    driver: Rc<RefCell<Option<H2Driver>>>,
}

/// An upstream HTTP/2 connection's hyper task.
type H2Driver = std::pin::Pin<Box<http2::Connection<TokioIo<Conn>, Body, LocalExec>>>;

impl H2Usage {
    /// Streams the connection takes: the cluster's `max_concurrent_streams`,
    /// or fewer if the upstream allows fewer (Envoy does the same). The
    /// upstream's value is h2's initial 100 until its SETTINGS frame arrived.
    fn cap(&self, max: usize) -> usize {
        // Never borrowed across an await: only while its task polls it, which
        // does not run while the pool looks.
        match self.driver.try_borrow().as_deref() {
            Ok(Some(d)) => max.min(d.current_max_send_streams()),
            _ => max,
        }
    }
}

/// One stream on an HTTP/2 connection, counted in its [`H2Usage`] until dropped.
struct H2Stream(Rc<H2Usage>);

impl H2Stream {
    fn new(usage: Rc<H2Usage>) -> Self {
        usage.streams.set(usage.streams.get() + 1);
        H2Stream(usage)
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        let n = self.0.streams.get().saturating_sub(1);
        self.0.streams.set(n);
        if n == 0 {
            self.0.idle_since.set(Instant::now());
        }
    }
}

/// Ends with the response body (at its end, on an error or when dropped).
impl body::Watch for H2Stream {
    /// The failure of an upstream's response body as Legate's own error, not
    /// h2's: hyper's server resets the client's stream with the reason of an
    /// h2 error under the body's, so the upstream's `RST_STREAM` code went on
    /// to the client. After the head that misleads it: `REFUSED_STREAM` says
    /// the request was not processed (curl and gRPC clients send it again,
    /// though the upstream answered it), `PROTOCOL_ERROR` blames the client.
    /// The client's stream is reset `INTERNAL_ERROR`, hyper's reason for any
    /// other failure, as Envoy resets it with its own code, not the upstream's.
    fn error(&mut self, e: body::BoxError) -> body::BoxError {
        Box::new(ProxyError::new(
            Kind::UpstreamReset,
            format!("upstream response body: {e}"),
        ))
    }
}

/// What the attempts waiting for an HTTP/2 connection being opened get.
#[derive(Clone)]
enum Opened {
    H2(http2::SendRequest<Body>, Rc<H2Usage>),
    /// ALPN chose HTTP/1.1 (`protocol: auto`): each attempt opens its own.
    Http1,
    /// Opening failed: each waiting attempt fails with this error.
    Failed(Kind, String),
}

/// The attempt opening an HTTP/2 connection of a key. Dropped (finished: the
/// connection is in [`H2Set::ready`] by then, or failed), it removes its
/// [`Opening`]; dropped unfinished (the attempt was cancelled), it also closes the
/// channel, so the waiting attempts look again and one of them opens a connection.
struct Opener {
    pool: Rc<PoolInner>,
    key: Key,
    tx: watch::Sender<Option<Opened>>,
    /// Identifies this opening's map entry.
    rx: watch::Receiver<Option<Opened>>,
}

impl Opener {
    /// Starts opening a connection of `key`, which other attempts may wait for.
    fn start(pool: &Rc<PoolInner>, key: &Key) -> Opener {
        let (tx, rx) = watch::channel(None);
        let opening = Opening {
            rx: rx.clone(),
            claimed: 1,
        };
        pool.h2
            .borrow_mut()
            .entry(key.clone())
            .or_default()
            .opening
            .push(opening);
        Opener {
            pool: pool.clone(),
            key: key.clone(),
            tx,
            rx,
        }
    }

    fn finish(self, opened: Opened) {
        self.tx.send_replace(Some(opened));
    }
}

impl Drop for Opener {
    fn drop(&mut self) {
        let mut h2 = self.pool.h2.borrow_mut();
        if let Some(set) = h2.get_mut(&self.key) {
            set.opening.retain(|o| !o.rx.same_channel(&self.rx));
            if set.ready.is_empty() && set.opening.is_empty() {
                h2.remove(&self.key);
            }
        }
    }
}

#[derive(Default)]
struct PoolInner {
    // Fx: looked up several times per request with keys from the config.
    idle: RefCell<FxHashMap<Key, Vec<Idle>>>,
    h2: RefCell<FxHashMap<Key, H2Set>>,
    /// This worker's connections per key, opening or open (idle, busy, or
    /// carrying an upgraded tunnel): a key with none may open one over
    /// `max_connections` ([`crate::cluster::Cluster::connect_permit_for`]).
    /// Looked up only when a connection is opened.
    live: RefCell<FxHashMap<Key, Arc<KeyConnections>>>,
}

/// A worker's connections to one key: how many are opening or open, and the
/// HTTP/1.1 attempts waiting over `max_connections` for one of them to come free.
#[derive(Default)]
struct KeyConnections {
    count: AtomicUsize,
    /// HTTP/1.1 requests in flight on them (from the send to their response's
    /// end): what a waiting attempt waits for. A tunnel (after a 101) is not
    /// one, so no attempt waits behind connections that are all tunnels.
    busy: AtomicUsize,
    /// Notified (one waiter, oldest first) when a connection goes back to the
    /// idle pool or closes; every waiter when the last one closes.
    freed: tokio::sync::Notify,
}

/// An HTTP/1.1 request in flight on a key's connection, counted in
/// [`KeyConnections::busy`] until dropped.
struct Busy(Arc<KeyConnections>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One of a worker's connections to a key, opening or open: counted in
/// [`PoolInner::live`] until dropped, with the socket. Atomics, not a `Cell`,
/// because an upgraded socket must be `Send`.
struct Live(Arc<KeyConnections>);

impl Drop for Live {
    fn drop(&mut self) {
        // Its `max_connections` slot is free (the socket's counter guard
        // dropped first): a waiting attempt may open one. The last one gone,
        // every waiter looks again (none is left to wake them later).
        if self.0.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.freed.notify_waiters();
        } else {
            self.0.freed.notify_one();
        }
    }
}

/// A worker's upstream connections.
#[derive(Clone, Default)]
pub struct Pool {
    inner: Rc<PoolInner>,
}

/// One established connection, ready for a request.
enum Sender {
    H1(http1::SendRequest<Body>, Arc<KeyConnections>),
    H2(http2::SendRequest<Body>, Rc<H2Usage>),
}

/// What [`Pool::lookup_h2`] found for a key.
enum H2Found {
    /// A connection with a stream free.
    Ready(http2::SendRequest<Body>, Rc<H2Usage>),
    /// A connection being opened, with a stream promised to this attempt.
    Opening(watch::Receiver<Option<Opened>>),
    /// Every connection is full (or promised): open another under this permit.
    Open(ConnectPermit),
    /// No connection, none being opened.
    None,
}

/// How a response's request got its connection, as a response extension set by
/// [`Pool::send`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionUse {
    /// A pooled connection (HTTP/1.1 keep-alive or a shared HTTP/2 one).
    Reused,
    /// A connection opened for this request (or an HTTP/2 one another request was
    /// opening, which this one waited for), `connect` after the attempt asked for
    /// it (TCP connect, TLS and HTTP handshakes).
    New {
        /// Time to open the connection.
        connect: Duration,
    },
}

/// Where an attempt goes.
pub struct Target<'a> {
    /// Endpoint address.
    pub addr: SocketAddr,
    /// Endpoint host as configured (the default TLS SNI).
    pub host: &'a Arc<str>,
    /// The cluster, whose connection counters the pool keeps.
    pub cluster: &'a Arc<Cluster>,
    /// The endpoint's index in the cluster (`None` for original-destination).
    pub endpoint: Option<usize>,
    /// The client's and the local address of the connection proxied, for a
    /// cluster that sends a PROXY protocol header (TCP proxying); `None`: a
    /// connection of Legate's own (a health check), which sends `LOCAL`.
    pub proxied: Option<(SocketAddr, SocketAddr)>,
}

impl Pool {
    /// A new, empty pool.
    pub fn new() -> Self {
        Pool::default()
    }

    /// Sends `req` to `target`, reusing a pooled connection when one is usable.
    /// The response body returns the connection to the pool when read to its end.
    /// The response carries a [`ConnectionUse`] extension: whether the connection
    /// was reused or opened for it, and how long opening took.
    pub async fn send(
        &self,
        s: &UpstreamSettings,
        target: Target<'_>,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let key = Key::new(s, &target);
        // An upgrade (a WebSocket) is not queued over `max_connections`: the
        // connection it would wait for may be another's tunnel, for hours.
        let may_wait = req.extensions().get::<UpgradeRequest>().is_none();
        // hyper picks the wire format from the version field; h2 wants absolute URIs
        // with scheme+authority, h1 an origin-form path (set by the caller).
        let (sender, used) = self.acquire(s, &key, &target, true, may_wait).await?;
        let (sender, used) = match self.try_send(&key, s, sender, req, target.addr).await {
            Ok(mut resp) => {
                resp.extensions_mut().insert(used);
                return Ok(resp);
            }
            Err(SendError::Failed(e)) => return Err(note_refused_handshake(&target, e)),
            // A pooled connection closed under us: once more, on a fresh one.
            Err(SendError::NotSent(back)) if used == ConnectionUse::Reused => {
                req = *back;
                self.acquire(s, &key, &target, false, may_wait).await?
            }
            Err(SendError::NotSent(_)) => return Err(closed_before_sent(target.addr)),
        };
        match self.try_send(&key, s, sender, req, target.addr).await {
            Ok(mut resp) => {
                resp.extensions_mut().insert(used);
                Ok(resp)
            }
            Err(SendError::NotSent(_)) => Err(closed_before_sent(target.addr)),
            Err(SendError::Failed(e)) => Err(note_refused_handshake(&target, e)),
        }
    }

    /// A connection for one attempt: the key's HTTP/2 connection (waiting for it if
    /// another attempt is opening it), an idle HTTP/1.1 one if `idle_ok`, else a
    /// new one; over `max_connections`, if `may_wait`, an HTTP/1.1 one that comes
    /// free, else a 503 `overloaded` error.
    async fn acquire(
        &self,
        s: &UpstreamSettings,
        key: &Key,
        target: &Target<'_>,
        mut idle_ok: bool,
        may_wait: bool,
    ) -> Result<(Sender, ConnectionUse), ProxyError> {
        let asked = Instant::now();
        // The attempt's `max_pending_requests` slot while it waits for another's
        // opening (one that opens its own takes one with its connect permit).
        let mut pending = None;
        loop {
            // Taken here when every HTTP/2 connection is full (else in `open_counted`).
            let mut permit = None;
            if s.protocol != UpstreamProtocol::Http1 {
                // Its connect permit, if it opens one, counts it as pending from here.
                let waited = pending.take().is_some();
                match self.lookup_h2(key, s.max_streams, target.cluster) {
                    H2Found::Ready(sr, usage) => {
                        let used = match waited {
                            // Opened while this attempt waited (it was abandoned
                            // by the attempt it waited for, then reopened).
                            true => ConnectionUse::New {
                                connect: asked.elapsed(),
                            },
                            false => ConnectionUse::Reused,
                        };
                        return Ok((Sender::H2(sr, usage), used));
                    }
                    H2Found::Opening(mut rx) => {
                        // Counted as pending, as an attempt opening its own is.
                        pending = Some(target.cluster.pending_permit()?);
                        let opened = rx
                            .wait_for(Option::is_some)
                            .await
                            .ok()
                            .and_then(|v| v.clone());
                        let connect = asked.elapsed();
                        match opened {
                            // Unless attempts that came after it was opened
                            // took its streams first: then look again. Its
                            // limit is the key's, as `lookup_h2` counts it (its
                            // own reads h2's initial 100 until the upstream's
                            // SETTINGS arrive).
                            Some(Opened::H2(sr, usage))
                                if usage.streams.get() < self.key_cap(key, s.max_streams) =>
                            {
                                let used = ConnectionUse::New { connect };
                                return Ok((Sender::H2(sr, usage), used));
                            }
                            Some(Opened::H2(..)) => continue,
                            Some(Opened::Failed(kind, detail)) => {
                                return Err(ProxyError::new(kind, detail))
                            }
                            // Opening it was abandoned: look again, maybe open it.
                            None => continue,
                            Some(Opened::Http1) => {
                                drop(pending);
                                let started = Instant::now();
                                let sender =
                                    Box::pin(self.connect(s, key, target, None, None)).await?;
                                let connect = started.elapsed();
                                return Ok((sender, ConnectionUse::New { connect }));
                            }
                        }
                    }
                    H2Found::Open(p) => permit = Some(p),
                    H2Found::None => {}
                }
            }
            if permit.is_none() && idle_ok && s.protocol != UpstreamProtocol::H2 {
                if let Some((sender, conns)) = self.checkout_h1(s, key).await {
                    return Ok((Sender::H1(sender, conns), ConnectionUse::Reused));
                }
                // Checking them out may have awaited: look at the map again.
                idle_ok = false;
                continue;
            }
            if permit.is_none() && may_wait && s.protocol == UpstreamProtocol::Http1 {
                let first = !self.has_live(key);
                // Its own pending slot goes to the permit's.
                let waited = pending.take().is_some();
                let conns = self.connections(key);
                // A waiter that fails passes on the wake-up it may have taken.
                let failed = |e: ProxyError| {
                    conns.freed.notify_one();
                    e
                };
                match target
                    .cluster
                    .try_connect_permit(first, !waited)
                    .map_err(failed)?
                {
                    Some(p) => permit = Some(p),
                    // Nothing of this worker's will come free (its connections
                    // to the endpoint are tunnels, or are being opened).
                    None if conns.busy.load(Ordering::Relaxed) == 0 => {
                        return Err(target.cluster.max_connections_reached());
                    }
                    None => {
                        // Over `max_connections`, every connection of this
                        // worker's to the endpoint busy: wait as a pending
                        // request, as in Envoy's pool, until one goes back
                        // to the pool (take it) or closes (open one).
                        pending = Some(target.cluster.pending_permit().map_err(failed)?);
                        conns.freed.notified().await;
                        idle_ok = true;
                        continue;
                    }
                }
            }
            let opener = s.may_be_h2().then(|| Opener::start(&self.inner, key));
            drop(pending);
            // Measured here, where the connection is made: TCP, TLS and the HTTP
            // handshake (what a debug response reports as `connect`).
            let started = Instant::now();
            // Boxed (here and above): connecting (TCP, TLS, the handshake) is
            // the largest future under a request's and runs once per
            // connection; inline, every request's future would carry its
            // size, and that future is moved whole into its box per request.
            let sender = Box::pin(self.connect(s, key, target, opener, permit)).await?;
            let connect = started.elapsed();
            return Ok((sender, ConnectionUse::New { connect }));
        }
    }

    /// A stream for an attempt on one of the key's HTTP/2 connections: the oldest
    /// with fewer than `max` streams open (or than the upstream's own limit, if
    /// lower: [`H2Usage::cap`]), else a promise of one on a connection
    /// being opened, else the permit to open another. When `cluster`'s circuit
    /// breakers refuse that (counted as an overflow), a stream anyway: on the least
    /// loaded connection, where hyper holds it back until one of its streams ends,
    /// or the least promised opening. Drops connections that closed or were idle
    /// past their timeout (the upstream may be closing them).
    fn lookup_h2(&self, key: &Key, max: usize, cluster: &Arc<Cluster>) -> H2Found {
        let mut h2 = self.inner.h2.borrow_mut();
        let Some(set) = h2.get_mut(key) else {
            return H2Found::None;
        };
        let now = Instant::now();
        set.ready
            .retain(|c| !c.sender.is_closed() && !c.is_idle_past(now));
        let cap = set.cap(max);
        if let Some(c) = set.ready.iter().find(|c| c.usage.streams.get() < cap) {
            return H2Found::Ready(c.sender.clone(), c.usage.clone());
        }
        // A connection being opened is promised as many.
        if let Some(o) = set.opening.iter_mut().find(|o| o.claimed < cap) {
            o.claimed += 1;
            return H2Found::Opening(o.rx.clone());
        }
        if set.ready.is_empty() && set.opening.is_empty() {
            h2.remove(key);
            return H2Found::None;
        }
        if let Ok(p) = cluster.connect_permit() {
            return H2Found::Open(p);
        }
        if let Some(c) = set.ready.iter().min_by_key(|c| c.usage.streams.get()) {
            return H2Found::Ready(c.sender.clone(), c.usage.clone());
        }
        match set.opening.iter_mut().min_by_key(|o| o.claimed) {
            Some(o) => {
                o.claimed += 1;
                H2Found::Opening(o.rx.clone())
            }
            None => H2Found::None,
        }
    }

    /// The streams each of `key`'s HTTP/2 connections takes ([`H2Set::cap`]).
    fn key_cap(&self, key: &Key, max: usize) -> usize {
        self.inner
            .h2
            .borrow()
            .get(key)
            .map_or(max, |set| set.cap(max))
    }

    async fn checkout_h1(
        &self,
        s: &UpstreamSettings,
        key: &Key,
    ) -> Option<(http1::SendRequest<Body>, Arc<KeyConnections>)> {
        loop {
            let candidate = {
                let mut idle = self.inner.idle.borrow_mut();
                let list = idle.get_mut(key)?;
                let c = list.pop();
                if list.is_empty() {
                    idle.remove(key);
                }
                c?
            };
            if candidate.since.elapsed() >= s.idle_timeout || candidate.sender.is_closed() {
                continue;
            }
            let mut sender = candidate.sender;
            // Returned connections are between messages; ready() only waits for the
            // connection task to notice, and fails if the upstream has closed it.
            if sender.ready().await.is_ok() {
                return Some((sender, candidate.conns));
            }
        }
    }

    /// Opens a connection (under `permit` if the attempt took one already). An
    /// HTTP/2 one goes into the pool, and to the attempts waiting on `opener`
    /// (which also learn of a failure).
    async fn connect(
        &self,
        s: &UpstreamSettings,
        key: &Key,
        target: &Target<'_>,
        opener: Option<Opener>,
        permit: Option<ConnectPermit>,
    ) -> Result<Sender, ProxyError> {
        let result = self.open_sender(s, key, target, permit).await;
        if let Some(o) = opener {
            o.finish(match &result {
                Ok(Sender::H2(sr, usage)) => Opened::H2(sr.clone(), usage.clone()),
                Ok(Sender::H1(..)) => Opened::Http1,
                Err(e) => Opened::Failed(e.kind, e.detail.clone()),
            });
        }
        result
    }

    async fn open_sender(
        &self,
        s: &UpstreamSettings,
        key: &Key,
        target: &Target<'_>,
        permit: Option<ConnectPermit>,
    ) -> Result<Sender, ProxyError> {
        // Whether this worker has no connection to the key yet, counted before
        // this one is (it is, from here, so that a concurrent attempt of this
        // worker is held to the limit).
        let first = !self.has_live(key);
        let live = self.live(key);
        let permit = match permit {
            Some(p) => p,
            None => target.cluster.connect_permit_for(first)?,
        };
        let (io, h2, guard) = open_counted(s, target, Some(permit)).await?;
        let handshake_err = |e: hyper::Error| {
            ProxyError::new(
                Kind::ConnectFailed,
                format!("handshake with {}: {e}", target.addr),
            )
        };
        if h2 {
            let mut builder = http2::Builder::new(LocalExec);
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                // Fixed windows (not hyper's adaptive ones, which grow with the
                // bandwidth-delay product and ping to measure it). What a stream
                // receives waits in h2 until the response body forwards it, so the
                // stream window bounds what a client that stops reading makes
                // Legate hold; the connection window is large enough for every
                // stream's (hyper's default, 5 MiB, filled by three stalled 2 MiB
                // streams: the connection's other streams then got no data at
                // all), as Envoy's 256 MiB windows.
                .adaptive_window(false)
                .initial_stream_window_size(s.stream_window)
                .initial_connection_window_size(s.connection_window)
                .max_header_list_size(MAX_RESPONSE_HEADERS_SIZE);
            // No PINGs unless configured, as Envoy: a gRPC server's default
            // policy (grpc-go: one every 5 minutes at most) answers more
            // frequent ones with GOAWAY `too_many_pings`, ending a quiet stream.
            if let Some((interval, timeout)) = s.keepalive {
                builder
                    .keep_alive_interval(interval)
                    .keep_alive_timeout(timeout);
            }
            let (sender, conn) = builder
                .handshake(TokioIo::new(io))
                .await
                .map_err(handshake_err)?;
            let driver: Rc<RefCell<Option<H2Driver>>> = Rc::new(RefCell::new(Some(Box::pin(conn))));
            let usage = Rc::new(H2Usage {
                streams: Cell::new(0),
                idle_since: Cell::new(Instant::now()),
                driver: driver.clone(),
            });
            tokio::task::spawn_local(async move {
                let _counted = (guard, live);
                let ended = std::future::poll_fn(|cx| {
                    let mut slot = driver.borrow_mut();
                    let Some(d) = slot.as_mut() else {
                        return std::task::Poll::Ready(Ok(()));
                    };
                    let r = std::future::Future::poll(d.as_mut(), cx);
                    if r.is_ready() {
                        *slot = None;
                    }
                    r
                })
                .await;
                if let Err(e) = ended {
                    tracing::debug!("upstream h2 connection ended: {e}");
                }
            });
            self.inner
                .h2
                .borrow_mut()
                .entry(key.clone())
                .or_default()
                .ready
                .push(H2Conn {
                    sender: sender.clone(),
                    usage: usage.clone(),
                    idle_timeout: s.idle_timeout,
                });
            Ok(Sender::H2(sender, usage))
        } else {
            // The counter guard goes with the socket: dropped with the
            // connection task, or, after a 101, with the upgraded stream when
            // the tunnel ends (hyper hands the socket over and ends the task).
            let conns = live.0.clone();
            let io = TokioIo::new(Counted {
                io,
                _counted: guard,
                _live: live,
            });
            let (sender, conn) = http1::Builder::new()
                .max_header_size(MAX_RESPONSE_HEADERS_SIZE as usize)
                .handshake(io)
                .await
                .map_err(handshake_err)?;
            tokio::task::spawn_local(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!("upstream h1 connection ended: {e}");
                }
            });
            Ok(Sender::H1(sender, conns))
        }
    }

    async fn try_send(
        &self,
        key: &Key,
        s: &UpstreamSettings,
        sender: Sender,
        mut req: Request<Body>,
        addr: SocketAddr,
    ) -> Result<Response<Body>, SendError> {
        match sender {
            Sender::H2(mut sr, usage) => {
                if req.extensions().get::<UpgradeRequest>().is_some() {
                    return Err(SendError::Failed(crate::proxy::upgrade_over_h2()));
                }
                to_h2_form(&mut req, s.tls.is_some()).map_err(SendError::Failed)?;
                // Open from here until the response body ends or is dropped.
                let stream = H2Stream::new(usage);
                match sr.try_send_request(req).await {
                    Ok(resp) => Ok(resp.map(|b| body::boxed(body::Watched::new(b, stream)))),
                    Err(mut e) => match e.take_message() {
                        Some(_) if tls_alert(e.error()).is_some() => {
                            Err(SendError::Failed(map_hyper_error(e.error(), addr)))
                        }
                        Some(back) => {
                            let mut h2 = self.inner.h2.borrow_mut();
                            if let Some(set) = h2.get_mut(key) {
                                set.ready.retain(|c| !Rc::ptr_eq(&c.usage, &stream.0));
                                if set.ready.is_empty() && set.opening.is_empty() {
                                    h2.remove(key);
                                }
                            }
                            Err(SendError::NotSent(Box::new(back)))
                        }
                        None => Err(SendError::Failed(map_hyper_error(e.error(), addr))),
                    },
                }
            }
            Sender::H1(mut sr, conns) => {
                to_h1_form(&mut req);
                conns.busy.fetch_add(1, Ordering::Relaxed);
                let busy = Busy(conns);
                let upload = Rc::new(Upload::default());
                if http_body::Body::is_end_stream(req.body()) {
                    upload.sent.set(true);
                } else {
                    let watch = UploadWatch(upload.clone());
                    req = req.map(|b| body::boxed(body::Watched::new(b, watch)));
                }
                match sr.try_send_request(req).await {
                    Ok(resp) => {
                        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                            // The connection now belongs to the upgraded stream.
                            drop(busy);
                            return Ok(resp.map(body::boxed));
                        }
                        let ret = Return {
                            pool: Rc::downgrade(&self.inner),
                            key: key.clone(),
                            upload,
                            sender: sr,
                            max_idle: s.max_idle,
                            idle_timeout: s.idle_timeout,
                            busy,
                        };
                        Ok(resp.map(|b| body::boxed(body::Watched::new(b, ret))))
                    }
                    Err(mut e) => match e.take_message() {
                        Some(_) if tls_alert(e.error()).is_some() => {
                            Err(SendError::Failed(map_hyper_error(e.error(), addr)))
                        }
                        Some(back) => Err(SendError::NotSent(Box::new(back))),
                        None => Err(SendError::Failed(map_hyper_error(e.error(), addr))),
                    },
                }
            }
        }
    }

    /// Drops idle HTTP/1.1 connections older than their cluster's idle timeout (or
    /// `max_age`, the longest of any current cluster), and HTTP/2
    /// connections that closed or had no stream open for their cluster's idle
    /// timeout: hyper closes a connection once the pool no longer holds it (after
    /// its streams, if any were still open). Called periodically by the worker.
    pub fn sweep(&self, max_age: Duration) {
        self.inner.idle.borrow_mut().retain(|_, list| {
            list.retain(|c| {
                c.since.elapsed() < c.idle_timeout.min(max_age) && !c.sender.is_closed()
            });
            !list.is_empty()
        });
        let now = Instant::now();
        self.inner.h2.borrow_mut().retain(|_, set| {
            set.ready
                .retain(|c| !c.sender.is_closed() && !c.is_idle_past(now));
            !set.ready.is_empty() || !set.opening.is_empty()
        });
        // Kept while attempts wait on it (they hold it): a new entry would
        // have another `Notify`, which they would never hear.
        self.inner
            .live
            .borrow_mut()
            .retain(|_, n| n.count.load(Ordering::Relaxed) > 0 || Arc::strong_count(n) > 1);
    }

    /// Whether this worker has a connection to `key`, opening or open.
    fn has_live(&self, key: &Key) -> bool {
        self.inner
            .live
            .borrow()
            .get(key)
            .is_some_and(|n| n.count.load(Ordering::Relaxed) > 0)
    }

    /// Counts a connection to `key` being opened, until the guard drops.
    fn live(&self, key: &Key) -> Live {
        let n = self.connections(key);
        n.count.fetch_add(1, Ordering::Relaxed);
        Live(n)
    }

    /// This worker's connections to `key`.
    fn connections(&self, key: &Key) -> Arc<KeyConnections> {
        let mut live = self.inner.live.borrow_mut();
        live.entry(key.clone()).or_default().clone()
    }

    /// Number of idle HTTP/1.1 connections (for tests and stats).
    pub fn idle_count(&self) -> usize {
        self.inner.idle.borrow().values().map(Vec::len).sum()
    }
}

/// Marks a request (an extension) as an HTTP/1.1 upgrade the proxy tunnels: an
/// HTTP/2 connection refuses it (HTTP/2 has no `Upgrade`; hyper would drop the
/// header and send a plain request) with [`crate::proxy::upgrade_over_h2`]'s
/// error, whatever chose h2 (`protocol: auto` and ALPN, too).
#[derive(Clone, Copy, Debug)]
pub struct UpgradeRequest;

/// Rewrites an HTTP/1.1-form request (origin-form URI + Host) into HTTP/2 form:
/// scheme and authority in the URI (hyper sends them as `:scheme`/`:authority`),
/// no Host header.
fn to_h2_form(req: &mut Request<Body>, tls: bool) -> Result<(), ProxyError> {
    *req.version_mut() = Version::HTTP_2;
    if req.uri().authority().is_some() {
        return Ok(());
    }
    let host = req
        .headers_mut()
        .remove(http::header::HOST)
        .ok_or_else(|| ProxyError::new(Kind::Internal, "upstream request without Host"))?;
    let authority = http::uri::Authority::try_from(host.as_bytes())
        .map_err(|e| ProxyError::new(Kind::BadRequest, format!("invalid authority: {e}")))?;
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(if tls {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    });
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts)
        .map_err(|e| ProxyError::new(Kind::BadRequest, format!("invalid upstream URI: {e}")))?;
    Ok(())
}

/// The HTTP/1.1 form of a request: the inverse of [`to_h2_form`] (for a request
/// handed back by an h2 connection and re-sent on a new HTTP/1.1 one,
/// `protocol: auto`), and its framing.
fn to_h1_form(req: &mut Request<Body>) {
    *req.version_mut() = Version::HTTP_11;
    use hyper::body::Body as _;
    let framed = req.headers().contains_key(http::header::CONTENT_LENGTH)
        || req.headers().contains_key(http::header::TRANSFER_ENCODING);
    if !framed && req.body().size_hint().exact().is_none() {
        if body::known_empty(req.body_mut()) {
            // Empty (perhaps only now: an HTTP/2 END_STREAM on an empty DATA
            // frame): no body framing, as Envoy's codec for a request that
            // ends with its headers; `content-length: 0` only for a method
            // whose request has a body's meaning (RFC 9110 §8.6).
            if !matches!(
                *req.method(),
                Method::GET | Method::HEAD | Method::DELETE | Method::TRACE | Method::CONNECT
            ) {
                req.headers_mut().insert(
                    http::header::CONTENT_LENGTH,
                    http::HeaderValue::from_static("0"),
                );
            }
        } else {
            // A body of unknown length goes chunked whatever the method:
            // without a length, hyper frames GET, HEAD and CONNECT as bodiless
            // and would drop it (a GET with a body over HTTP/2, or chunked
            // over HTTP/1.1).
            req.headers_mut().insert(
                http::header::TRANSFER_ENCODING,
                http::HeaderValue::from_static("chunked"),
            );
        }
    }
    list_te_in_connection(req.headers_mut());
    let Some(authority) = req.uri().authority().cloned() else {
        return;
    };
    if let Ok(host) = http::HeaderValue::from_str(authority.as_str()) {
        req.headers_mut().insert(http::header::HOST, host);
    }
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(pq);
}

/// RFC 9110 §10.1.4: an HTTP/1.1 sender of `TE` (here `trailers`, the one
/// value the proxy passes on) must name it in `Connection`, so that a further
/// intermediary drops it rather than forward a promise it cannot keep.
fn list_te_in_connection(h: &mut http::HeaderMap) {
    if !h.contains_key(http::header::TE) {
        return;
    }
    let value = match h.get(http::header::CONNECTION).map(|v| v.as_bytes()) {
        None => http::HeaderValue::from_static("te"),
        Some(v)
            if v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"te")) =>
        {
            return
        }
        Some(v) => match http::HeaderValue::from_bytes(&[v, b", te"].concat()) {
            Ok(v) => v,
            Err(_) => return,
        },
    };
    h.insert(http::header::CONNECTION, value);
}

fn closed_before_sent(addr: SocketAddr) -> ProxyError {
    ProxyError::new(
        Kind::UpstreamReset,
        format!("new connection to {addr} closed before the request was sent"),
    )
}

enum SendError {
    /// The request was not written; it can go on another connection.
    NotSent(Box<Request<Body>>),
    Failed(ProxyError),
}

/// Counts a TLS handshake the upstream refused on the first read (see
/// [`refused_handshake`]) as the connect failure it is.
fn note_refused_handshake(target: &Target<'_>, e: ProxyError) -> ProxyError {
    if e.kind == Kind::ConnectFailed && e.transport_failure.is_some() {
        target
            .cluster
            .record_handshake_refused(target.endpoint, &e.detail);
    }
    e
}

/// The TLS alert an upstream sent, in the words of the TLS library
/// (`received fatal alert: CertificateRequired`), if `e` or an error under it
/// is one. h2 keeps only the words of the I/O error that ended a connection.
pub fn tls_alert(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    fn rustls_alert(e: &(dyn std::error::Error + 'static)) -> Option<String> {
        match e.downcast_ref::<rustls::Error>() {
            Some(a @ rustls::Error::AlertReceived(_)) => Some(a.to_string()),
            _ => None,
        }
    }
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(a) = rustls_alert(err) {
            return Some(a);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(a) = io.get_ref().and_then(|i| rustls_alert(i)) {
                return Some(a);
            }
        }
        if let Some(io) = err.downcast_ref::<h2::Error>().and_then(h2::Error::get_io) {
            let words = io.to_string();
            if words.starts_with("received fatal alert: ") {
                return Some(words);
            }
        }
        cur = err.source();
    }
    None
}

/// A TLS alert on a connection's first read: the upstream refused the
/// handshake after it completed on Legate's side. With TLS 1.3 the client
/// finishes first and the server checks the client certificate last, so an
/// upstream that refuses Legate's (none, expired, from a CA it does not
/// trust) says so only then. It is a TLS handshake failure, as Envoy's
/// `TLS error: ...` transport failure: a connect failure (nothing was
/// processed), with the alert as the transport failure reason.
pub(crate) fn refused_handshake(addr: SocketAddr, alert: String) -> ProxyError {
    ProxyError::new(
        Kind::ConnectFailed,
        format!(
            "TLS handshake with {addr}: {alert} (the upstream refused the handshake \
             after Legate's side completed it, as a TLS 1.3 server refusing the client \
             certificate does: check the cluster's `tls.client_cert` against the CA \
             the upstream trusts)"
        ),
    )
    .with_transport_failure(alert)
}

fn map_hyper_error(e: &hyper::Error, addr: SocketAddr) -> ProxyError {
    if let Some(alert) = tls_alert(e) {
        return refused_handshake(addr, alert);
    }
    // A failure of the request body we were sending is the client's: hyper wraps
    // the body's own error (ours around the downstream's) as the source.
    if e.is_user() {
        if let Some(cause) = std::error::Error::source(e) {
            return ProxyError::request_body(cause);
        }
    }
    // A head over the limits (size or field count) is a reset, as on HTTP/2,
    // where h2 refuses the stream (REFUSED_STREAM) whose head is too large.
    if e.is_parse_too_large() {
        ProxyError::new(Kind::UpstreamReset, e.to_string())
    } else if e.is_parse() {
        ProxyError::new(Kind::UpstreamProtocol, e.to_string())
    } else if let Some(h2e) = h2_error(e) {
        let detail = format!("{e}: {h2e}");
        if h2_unprocessed(h2e) {
            return ProxyError::new(Kind::UpstreamReset, detail).with_unprocessed();
        }
        // Not told apart by h2's reason: h2 resets a malformed response head
        // and one over `max_header_list_size` alike (PROTOCOL_ERROR, its own),
        // and the latter is `upstream_reset` on either protocol.
        ProxyError::new(Kind::UpstreamReset, detail)
    } else {
        ProxyError::new(Kind::UpstreamReset, e.to_string())
    }
}

/// The HTTP/2 error under hyper's, if the failure was one.
fn h2_error(e: &hyper::Error) -> Option<&h2::Error> {
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return Some(h2e);
        }
        src = s.source();
    }
    None
}

/// Whether the upstream told that it did not process the stream (RFC 9113
/// §8.7): it reset it with `REFUSED_STREAM`, or sent a GOAWAY whose last
/// stream is below it. h2 fails the streams above a GOAWAY's last stream with
/// its error code at once, and those below only when the connection ends; a
/// graceful GOAWAY (`NO_ERROR`) lets those finish or fail otherwise, so an
/// error from it is that of a stream above. After an error GOAWAY both kinds
/// fail with its code, and the stream may have been processed: not marked.
fn h2_unprocessed(e: &h2::Error) -> bool {
    if !e.is_remote() {
        return false;
    }
    match e.reason() {
        Some(h2::Reason::REFUSED_STREAM) => e.is_reset(),
        Some(h2::Reason::NO_ERROR) => e.is_go_away(),
        _ => false,
    }
}

/// How far an HTTP/1.1 request body got: hyper goes on writing it after the
/// response came, so a connection is between messages only once both ended.
#[derive(Default)]
struct Upload {
    /// The body's last frame was handed to hyper.
    sent: Cell<bool>,
    /// The response ended first: the rest of the upload is cut (as Envoy resets
    /// the upstream request), failing the connection instead of finishing it.
    abandoned: Cell<bool>,
}

/// Watches a request body for [`Upload`].
struct UploadWatch(Rc<Upload>);

impl body::Watch for UploadWatch {
    fn frame(
        &mut self,
        _frame: &mut hyper::body::Frame<bytes::Bytes>,
    ) -> Result<(), body::BoxError> {
        if self.0.abandoned.get() {
            return Err("the response ended before the request body was sent".into());
        }
        Ok(())
    }

    fn end(self, complete: bool) {
        self.0.sent.set(complete);
    }
}

/// A connection on its way back to the pool.
struct Return {
    pool: Weak<PoolInner>,
    key: Key,
    upload: Rc<Upload>,
    sender: http1::SendRequest<Body>,
    max_idle: usize,
    idle_timeout: Duration,
    /// The request counted busy on the key's connections until its response
    /// ends (and the key's connections, to pool it with).
    busy: Busy,
}

impl body::Watch for Return {
    /// A response read to its end leaves the connection between messages (once
    /// the request body was sent too): pool it. An errored or abandoned one is
    /// dropped with its sender; a request still uploading, too: a request taking
    /// the connection would wait behind that upload (the client's pace).
    fn end(self, complete: bool) {
        if !self.upload.sent.get() {
            self.upload.abandoned.set(true);
            return;
        }
        if !complete || self.sender.is_closed() {
            return;
        }
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        let mut idle = pool.idle.borrow_mut();
        let list = idle.entry(self.key).or_default();
        if list.len() < self.max_idle {
            list.push(Idle {
                sender: self.sender,
                conns: self.busy.0.clone(),
                since: Instant::now(),
                idle_timeout: self.idle_timeout,
            });
            drop(idle);
            // An attempt waiting over `max_connections` takes it. (One not
            // pooled closes, and its `Live` tells them.)
            self.busy.0.freed.notify_one();
        }
    }
}

/// An HTTP/1.1 upstream socket with its [`ActiveConnection`]: counted open
/// (`upstream_cx_active`, the endpoint's `cx_active`, its `max_connections`
/// slot) for as long as the socket lives, also once a `101 Switching Protocols`
/// moved it into an upgraded stream (a WebSocket tunnel), as Envoy counts an
/// upgraded connection until the tunnel closes.
struct Counted {
    io: Conn,
    _counted: ActiveConnection,
    /// Its place in its worker's [`PoolInner::live`].
    _live: Live,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Opens a byte stream (TCP, and TLS if the cluster says so) to `target` within the
/// cluster's connect timeout, for the TCP proxy. The guard counts the connection as
/// open in the cluster's stats until dropped.
pub async fn open_stream(
    s: &UpstreamSettings,
    target: &Target<'_>,
) -> Result<(Conn, ActiveConnection), ProxyError> {
    open_counted(s, target, None).await.map(|(c, _, g)| (c, g))
}

/// Opens a connection for a health check: under the connect timeout, but not
/// pooled, not counted in the cluster's connection stats and not subject to its
/// circuit breakers. Returns the stream and whether to speak h2.
pub async fn open_unpooled(
    s: &UpstreamSettings,
    target: &Target<'_>,
) -> Result<(Conn, bool), ProxyError> {
    tokio::time::timeout(s.connect_timeout, open(s, target))
        .await
        .unwrap_or_else(|_| {
            Err(ProxyError::new(
                Kind::ConnectFailed,
                format!(
                    "connect to {} timed out after {:?}",
                    target.addr, s.connect_timeout
                ),
            ))
        })
}

/// [`open`] under the connect timeout and the cluster's circuit breakers (`permit`,
/// if the caller took it already), with the cluster's connection counters.
async fn open_counted(
    s: &UpstreamSettings,
    target: &Target<'_>,
    permit: Option<ConnectPermit>,
) -> Result<(Conn, bool, ActiveConnection), ProxyError> {
    let permit = match permit {
        Some(p) => p,
        None => target.cluster.connect_permit()?,
    };
    match tokio::time::timeout(s.connect_timeout, open(s, target)).await {
        Ok(Ok((c, h2))) => Ok((c, h2, permit.established(target.endpoint))),
        Ok(Err(e)) => {
            let how = match e.transport_failure {
                Some(_) => ConnectFailure::Tls,
                None => ConnectFailure::Failed,
            };
            target
                .cluster
                .record_connect_failure(target.endpoint, &e.detail, how);
            Err(e)
        }
        Err(_) => {
            let e = ProxyError::new(
                Kind::ConnectFailed,
                format!(
                    "connect to {} timed out after {:?}",
                    target.addr, s.connect_timeout
                ),
            );
            target.cluster.record_connect_failure(
                target.endpoint,
                &e.detail,
                ConnectFailure::TimedOut,
            );
            Err(e)
        }
    }
}

/// What to do about a TLS handshake failure whose cause the TLS library names
/// only by its code, for the logged detail (the access log's transport failure
/// reason keeps the library's words). A CA certificate (`CA:TRUE`) served as
/// the upstream's own certificate is refused even when `tls.ca` names it
/// (a self-signed CA certificate used as a server's): a server certificate is
/// a leaf.
fn tls_hint(e: &std::io::Error) -> &'static str {
    let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) =
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    else {
        return "";
    };
    match other.0.downcast_ref::<webpki::Error>() {
        Some(webpki::Error::CaUsedAsEndEntity) => {
            " (the upstream's certificate is a CA certificate, basicConstraints CA:TRUE, \
             and a server certificate must be a leaf, CA:FALSE: issue the upstream a leaf \
             certificate from a CA and name that CA in the cluster's `tls.ca`, rather than \
             trusting a self-signed CA certificate that the upstream serves as its own)"
        }
        _ => "",
    }
}

/// Opens TCP (and TLS) to the target; returns the stream and whether to speak h2.
async fn open(s: &UpstreamSettings, target: &Target<'_>) -> Result<(Conn, bool), ProxyError> {
    let tcp = TcpStream::connect(target.addr).await.map_err(|e| {
        ProxyError::new(
            Kind::ConnectFailed,
            format!("connect to {}: {e}", target.addr),
        )
    })?;
    let _ = tcp.set_nodelay(true);
    let mut tcp = tcp;
    if let Some(version) = s.proxy_protocol {
        let header = match target.proxied {
            Some((source, destination)) => {
                crate::proxy_protocol::header(version, source, destination)
            }
            None => crate::proxy_protocol::local_header(version),
        };
        tcp.write_all(&header).await.map_err(|e| {
            ProxyError::new(
                Kind::ConnectFailed,
                format!("sending the PROXY protocol header to {}: {e}", target.addr),
            )
        })?;
    }
    let Some(tls) = &s.tls else {
        return Ok((Conn::Plain(tcp), s.protocol == UpstreamProtocol::H2));
    };
    let name = match &tls.sni {
        Some(n) => n.clone(),
        None => ServerName::try_from(target.host.to_string()).map_err(|e| {
            ProxyError::new(
                Kind::ConnectFailed,
                format!(
                    "endpoint host `{}` is not a valid TLS name: {e}",
                    target.host
                ),
            )
        })?,
    };
    let stream = tls.connector.connect(name, tcp).await.map_err(|e| {
        ProxyError::new(
            Kind::ConnectFailed,
            format!("TLS handshake with {}: {e}{}", target.addr, tls_hint(&e)),
        )
        .with_transport_failure(e.to_string())
    })?;
    let h2 = match s.protocol {
        UpstreamProtocol::H2 => true,
        UpstreamProtocol::Http1 => false,
        UpstreamProtocol::Auto => stream.get_ref().1.alpn_protocol() == Some(b"h2"),
    };
    Ok((Conn::Tls(Box::new(TlsStream::Client(stream))), h2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_error(cause: webpki::Error) -> std::io::Error {
        let other = rustls::OtherError(Arc::new(cause));
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other));
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    /// An upstream's TLS alert is found under the I/O error that carries
    /// it; another error is no alert.
    #[test]
    fn a_tls_alert_is_found_under_the_error() {
        let alert = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
            )
        };
        let words = Some("received fatal alert: CertificateRequired".to_string());
        assert_eq!(tls_alert(&alert()), words);
        let e = refused_handshake("127.0.0.1:1".parse().unwrap(), words.clone().unwrap());
        assert_eq!(e.kind, Kind::ConnectFailed);
        assert_eq!(e.transport_failure, words);
        assert_eq!(tls_alert(&std::io::Error::other("connection reset")), None);
        let other =
            std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert_eq!(tls_alert(&other), None);
    }

    #[test]
    fn a_ca_certificate_served_as_a_leaf_gets_a_hint() {
        let hint = tls_hint(&tls_error(webpki::Error::CaUsedAsEndEntity));
        assert!(hint.contains("CA:FALSE"), "{hint}");
        assert!(hint.contains("tls.ca"), "{hint}");
        assert_eq!(tls_hint(&tls_error(webpki::Error::UnknownIssuer)), "");
        let plain = std::io::Error::other("connection reset");
        assert_eq!(tls_hint(&plain), "");
    }
}
