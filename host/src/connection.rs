//! A downstream HTTP connection: TLS handshake, HTTP/1.1 or HTTP/2 (h2c prior
//! knowledge or ALPN), the connection limits, idle and header-read timeouts,
//! the stream idle timeout of a response being sent ([`crate::idle::Watching`]
//! around the connection, and around each HTTP/2 stream's task),
//! graceful close on drain (and its hard close when the client leaves a
//! graceful close hanging), and the lingering close of an HTTP/1.1 connection
//! whose client may still be sending ([`Linger`]). Each request is handed to
//! [`crate::proxy::handle`].

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::io::{Activity, Conn, Reclaim, Tracked, Verdict};
use crate::listener::ListenerCtx;
use crate::tls::TlsInfo;
use crate::worker::Worker;

/// What a request knows about the connection it came on.
pub struct ConnCtx {
    /// The worker.
    pub worker: Rc<Worker>,
    /// The listener.
    pub listener: Arc<ListenerCtx>,
    /// Client address.
    pub peer: SocketAddr,
    /// The client IP as `x-forwarded-for` writes it (formatted once).
    pub forwarded_for: crate::proxy_headers::ForwardedFor,
    /// Our address the client connected to.
    pub local: SocketAddr,
    /// TLS session facts, when the listener terminates TLS.
    pub tls: Option<TlsInfo>,
    /// The pre-REDIRECT destination, for transparent listeners.
    pub original_dst: Option<SocketAddr>,
    /// Activity, for the timeouts.
    pub activity: Arc<Activity>,
    /// The connection as filters see it, made by the first exchange that has a
    /// filter chain and shared by the connection's later ones.
    pub facts: std::cell::OnceCell<Arc<crate::filter::ConnFacts>>,
    /// This hop's `x-forwarded-client-cert` element, made by the first
    /// request that writes one ([`crate::proxy_headers::xfcc_element`]).
    pub xfcc: std::cell::OnceCell<Option<http::HeaderValue>>,
    /// The tunnel the connection became after a protocol upgrade (WebSocket),
    /// which [`serve`] waits for: the connection stays counted
    /// (`max_connections`, the active gauge, drain) until the tunnel ends.
    pub tunnel: Cell<Option<crate::proxy::Tunnel>>,
    /// Where a request finds the future its response is sent from (the
    /// HTTP/1.1 connection, an HTTP/2 stream's task), which runs its stream
    /// idle timer after the head ([`crate::idle`]).
    pub streams: crate::idle::Current,
    /// When `limits.max_connection_duration` ends the connection (closed
    /// gracefully from then on; its tunnels `drain_timeout` later).
    pub lifetime_end: Option<tokio::time::Instant>,
}

impl ConnCtx {
    /// The address the client meant to reach: a redirected connection's
    /// original destination, else ours.
    pub fn reached(&self) -> SocketAddr {
        self.original_dst.unwrap_or(self.local)
    }

    /// The client as the access log and header operators write it, and the
    /// peer it came through: `client` (the one trusted proxies reported) as
    /// `ip:0` with the connection's peer beside it, or the peer alone.
    pub fn client_text(&self, client: Option<std::net::IpAddr>) -> (String, Option<String>) {
        match client {
            Some(ip) => (
                SocketAddr::new(ip, 0).to_string(),
                Some(self.peer.to_string()),
            ),
            None => (self.peer.to_string(), None),
        }
    }
}

/// The executor of a downstream connection: hyper gives it each HTTP/2 stream
/// (the request's future, then the sending of its response) to run as a
/// task, here under the stream idle timeout ([`crate::idle::Watching`]): a
/// stream found idle ends its task, and dropping it resets that stream alone
/// (h2 sends `RST_STREAM` `CANCEL` for a stream nothing holds any more).
#[derive(Clone)]
struct StreamExec(crate::idle::Current);

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: std::future::Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(self.0.watching(fut, None));
    }
}

/// Whether a response's `Connection` names `close`.
fn says_close(h: &http::HeaderMap) -> bool {
    h.get_all(http::header::CONNECTION).iter().any(|v| {
        legate_abi_rules::headers::list_items(v.as_bytes())
            .any(|t| t.eq_ignore_ascii_case(b"close"))
    })
}

/// Whether an HTTP/1 client can tell where `resp`'s body ends without the
/// close: a `content-length` (given, or the one hyper writes for a body of
/// known size), or no body at all (a response to `HEAD`, 1xx, 204, 304).
fn length_known(resp: &http::Response<crate::body::Body>, head_request: bool) -> bool {
    use http_body::Body as _;
    head_request
        || crate::proxy::bodiless(resp.status())
        || resp.headers().contains_key(http::header::CONTENT_LENGTH)
        || resp.body().is_end_stream()
        || resp.body().size_hint().exact().is_some()
}

/// How long a draining HTTP/1.1 connection may stay idle (waiting for one more
/// request to answer with `Connection: close`) before it is closed.
const H1_DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Sleeps until `t`, or for ever without one.
pub(crate) async fn until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Serves one accepted HTTP connection until it closes. Returns the connection
/// when it should end with a lingering close ([`Linger`]), which no longer
/// serves requests.
pub async fn serve(
    worker: Rc<Worker>,
    ctx: Arc<ListenerCtx>,
    serving: Option<crate::listener::Serving>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    original_dst: Option<SocketAddr>,
) -> Option<Linger> {
    let limits = ctx.cfg.limits.clone();
    let (io, tls) = match ctx.tls.load_full() {
        None => (Conn::Plain(stream), None),
        Some(server_tls) => {
            // The handshake counts against the header timeout: a client that opens
            // TLS and stalls is a slowloris too.
            match tokio::time::timeout(
                limits.header_read_timeout.get(),
                server_tls.acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(s)) => {
                    crate::tls::count_resumed(s.get_ref().1, &ctx.stats);
                    let info = server_tls.info(s.get_ref().1);
                    (
                        Conn::Tls(Box::new(tokio_rustls::TlsStream::Server(s))),
                        Some(info),
                    )
                }
                Ok(Err(e)) => {
                    ctx.stats.cx_tls_error.inc();
                    tracing::debug!(listener = %ctx.name, %peer, "TLS handshake failed: {e}");
                    return None;
                }
                Err(_) => {
                    ctx.stats.cx_tls_error.inc();
                    tracing::debug!(listener = %ctx.name, %peer, "TLS handshake timed out");
                    return None;
                }
            }
        }
    };
    // With TLS, ALPN decides; in cleartext, hyper-util detects the h2 preface.
    let alpn_h2 = tls.as_ref().map(|t| t.alpn.as_deref() == Some(b"h2"));

    let activity = Arc::new(Activity::default());
    activity.set_socket(match &io {
        Conn::Plain(s) => s,
        Conn::Tls(s) => s.get_ref().0,
    });
    let conn_ctx = Rc::new(ConnCtx {
        worker: worker.clone(),
        listener: ctx.clone(),
        peer,
        forwarded_for: crate::proxy_headers::ForwardedFor::new(peer.ip()),
        local,
        tls,
        original_dst,
        activity: activity.clone(),
        facts: std::cell::OnceCell::new(),
        xfcc: std::cell::OnceCell::new(),
        tunnel: Cell::new(None),
        streams: crate::idle::Current::default(),
        // `limits.max_connection_duration`: closed gracefully from then on,
        // as a drain closes it.
        lifetime_end: limits
            .max_connection_duration
            .map(|d| tokio::time::Instant::now() + d.get()),
    });
    // Set when the listener closes (drain, reload, hot restart): HTTP/1.1
    // responses then carry `Connection: close`, so a keep-alive client learns of
    // the close from a response instead of racing a request against it.
    let h1_closing = Rc::new(Cell::new(false));
    // The protocol of the last request: HTTP/2 connections get a GOAWAY instead.
    let last_version = Rc::new(Cell::new(None::<http::Version>));
    // `limits.max_requests_per_connection`: the request that reaches it starts
    // the graceful close, as a drain does (its HTTP/1.1 response says
    // `Connection: close`; HTTP/2 gets a GOAWAY, so it takes no further
    // streams and the ones open finish). Wakes the loop below for the GOAWAY.
    let limit_reached = Rc::new(tokio::sync::Notify::new());
    let service = {
        let (h1_closing, last_version) = (h1_closing.clone(), last_version.clone());
        let conn_ctx = conn_ctx.clone();
        let (max_requests, served) = (limits.max_requests_per_connection, Cell::new(0u32));
        let limit_reached = limit_reached.clone();
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let version = req.version();
            let head_request = req.method() == http::Method::HEAD;
            last_version.set(Some(version));
            if let Some(max) = max_requests {
                served.set(served.get().saturating_add(1));
                if served.get() == max && !h1_closing.get() {
                    h1_closing.set(true);
                    conn_ctx.listener.stats.cx_max_requests.inc();
                    limit_reached.notify_one();
                }
            }
            let conn_ctx = conn_ctx.clone();
            let h1_closing = h1_closing.clone();
            async move {
                // Boxed: the request's future is several KiB, and hyper moves
                // the future it gets from the service (into its in-flight
                // slot, or into the HTTP/2 stream's task): a move copies it
                // whole. Made here, on the first poll, it is copied once,
                // into the box.
                let Ok(mut resp) = Box::pin(crate::proxy::handle(conn_ctx, req)).await;
                // A filter reset the stream: hyper resets an HTTP/2 stream
                // whose service fails (`RST_STREAM`) and closes an HTTP/1.1
                // connection without an answer.
                if resp
                    .extensions()
                    .get::<crate::filter::StreamReset>()
                    .is_some()
                {
                    return Err(crate::filter::StreamReset);
                }
                // Not on a `101`: its `Connection: upgrade` must stay (the
                // tunnel is closed at the drain timeout instead).
                if version < http::Version::HTTP_2
                    && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
                {
                    if h1_closing.get() {
                        resp.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    // To an HTTP/1.0 client hyper writes an HTTP/1.0 status
                    // line whatever the response's version, which decides the
                    // keep-alive of an HTTP/1.0 keep-alive request
                    // (`fix_keep_alive`): an HTTP/1.1 response gets
                    // `keep-alive` appended and the connection stays open; an
                    // HTTP/1.0 one is closed after, its `Connection` as it is.
                    // So HTTP/1.1 (whatever the upstream spoke: an HTTP/2 or
                    // HTTP/1.0 upstream's answer closed the connection),
                    // unless it closes: its `close` must stand alone (not
                    // `close, keep-alive`), and a body of unknown length,
                    // which HTTP/1.0 can only end by closing, must not say
                    // `keep-alive` (hyper said it, then closed).
                    if version == http::Version::HTTP_10 {
                        let closes =
                            says_close(resp.headers()) || !length_known(&resp, head_request);
                        *resp.version_mut() = if closes {
                            http::Version::HTTP_10
                        } else {
                            http::Version::HTTP_11
                        };
                    }
                }
                Ok::<_, crate::filter::StreamReset>(resp)
            }
        })
    };

    let mut builder = auto::Builder::new(StreamExec(conn_ctx.streams.clone()));
    builder
        .http1()
        .timer(TokioTimer::new())
        // Off: Legate enforces `header_read_timeout` and `idle_timeout` itself
        // (`io::Activity`); hyper's own 30 s default, armed whenever it waits
        // for a head (an idle keep-alive connection too), would cut both at 30 s.
        .header_read_timeout(None)
        // hyper answers 431 past these. `max_request_headers_size` is checked
        // exactly in `proxy::check_framing` (hyper's buffer grows in doubling
        // steps, so this cap only catches a head arriving in pieces; its
        // floor is 8 KiB): a head within the limit is never more bytes.
        .max_buf_size(
            usize::try_from(
                limits
                    .max_request_headers_size
                    .0
                    .max(crate::proxy::H1_HEAD_BUFFER_FLOOR),
            )
            .unwrap_or(usize::MAX),
        )
        .max_headers(limits.max_request_headers as usize)
        .half_close(false)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        // Fixed windows (not hyper's adaptive ones), the connection's sized so
        // that uploads whose upstream stopped reading never shut it for the
        // other streams (hyper's default: 1 MiB each, one stalled upload did).
        .adaptive_window(false)
        .initial_stream_window_size(limits.stream_window())
        .initial_connection_window_size(limits.connection_window())
        // h2 refuses a header list that reaches its setting: one more, so that
        // a list of exactly `max_request_headers_size` passes, as over HTTP/1.1.
        .max_header_list_size(
            u32::try_from(limits.max_request_headers_size.0.saturating_add(1)).unwrap_or(u32::MAX),
        )
        .max_pending_accept_reset_streams(100)
        // No PINGs unless configured, as Envoy (a client's own ping policy may
        // refuse frequent ones); then a client that does not answer one within
        // its timeout is gone, and its connection closes with its streams.
        .keep_alive_interval(
            limits
                .connection_keepalive
                .as_ref()
                .map(|k| k.interval.get()),
        )
        .keep_alive_timeout(
            limits
                .connection_keepalive
                .as_ref()
                .map_or(Duration::from_secs(20), |k| k.timeout.get()),
        );
    let extended_connect = conn_ctx
        .listener
        .cfg
        .http
        .as_ref()
        .is_some_and(|h| h.extended_connect);
    if extended_connect {
        // RFC 8441: `:protocol` streams, proxied as upgrades (`proxy::handle`).
        builder.http2().enable_connect_protocol();
    }
    let builder = match alpn_h2 {
        Some(true) => builder.http2_only(),
        Some(false) => builder.http1_only(),
        None => builder,
    };
    if alpn_h2 == Some(true) {
        activity.set_h2();
    }
    let header_timeout = limits.header_read_timeout.get();
    // hyper drops the stream when the connection ends; it comes back here for a
    // lingering close.
    let (io, reclaimed) = Reclaim::new(io);
    // Boxed to be dropped (and the stream with it) when the lingering close
    // takes the stream back. HTTP/1.1 sends its responses from here: it runs
    // the stream idle timer of the response being sent, and ends with `None`
    // when that stream went idle (a client that stopped reading, too).
    let mut conn = Box::pin(conn_ctx.streams.watching(
        builder.serve_connection_with_upgrades(
            TokioIo::new(Tracked::new(io, activity.clone())),
            service,
        ),
        // (Only HTTP/1.1 polls requests in the connection future: HTTP/2
        // streams have their own, from `StreamExec`.)
        Some(activity.clone()),
    ));
    // Each waited for by one future for the connection's life, not one made
    // (and registered with its channel) at every turn of the loop below.
    let mut drain = ctx.closing_signal();
    let drain = drain.wait_for(|d| *d);
    tokio::pin!(drain);
    // `POST /healthcheck/fail`: closed as a drain closes it, though the
    // listener keeps accepting (Envoy's drain-close while its health checks
    // fail): a client with a keep-alive or HTTP/2 connection moves to the
    // other instances the load balancer now prefers.
    let mut health_failed = worker.shared.health_check_failed.subscribe();
    let health_failed = health_failed.wait_for(|f| *f);
    tokio::pin!(health_failed);
    let mut idle = limits.idle_timeout.get();
    let lifetime_end = conn_ctx.lifetime_end;
    // When the graceful shutdown started (idle, or a drain's GOAWAY). A peer
    // can leave it hanging: an HTTP/2 client that never answers the GOAWAY's
    // PING, or one that stopped reading, so that the GOAWAY or the last bytes
    // of a response cannot be flushed. Once a further idle period has passed
    // with no request in flight, no byte either way and no byte acknowledged
    // by the client, the connection is closed hard (the future dropped), or
    // it would hold its socket, buffers and `max_connections` slot forever.
    let mut closing_since: Option<std::time::Instant> = None;
    // We closed it for idleness (idle timeout, or idle while draining, or the
    // stream idle timeout of its response).
    let mut idle_closed = false;
    // `legate_listener_max_duration_reached_total` counted this connection.
    let mut max_duration_counted = false;
    loop {
        if h1_closing.get()
            && closing_since.is_none()
            && last_version.get() == Some(http::Version::HTTP_2)
        {
            conn.as_mut().inner().graceful_shutdown();
            closing_since = Some(std::time::Instant::now());
        }
        let deadline = match activity.check(idle, Some(header_timeout)) {
            Verdict::WaitUntil(t) => t,
            Verdict::Idle => match closing_since {
                None => {
                    conn.as_mut().inner().graceful_shutdown();
                    closing_since = Some(std::time::Instant::now());
                    idle_closed = true;
                    continue;
                }
                // Idle: no byte either way for `idle`. The shutdown must have
                // had that long too, and a client still acknowledging what the
                // kernel sends it (a slow reader of a response's tail) is
                // making progress: it is let be.
                Some(since) => {
                    let progress = activity.last_progress().map_or(since, |t| t.max(since));
                    if progress.elapsed() < idle {
                        progress + idle
                    } else {
                        ctx.stats.cx_close_timeout.inc();
                        tracing::debug!(listener = %ctx.name, %peer, "graceful close stalled for the idle timeout; closing");
                        idle_closed = true;
                        break;
                    }
                }
            },
            Verdict::HeaderTimeout => {
                tracing::debug!(listener = %ctx.name, %peer, "request headers not received in time; closing");
                return None;
            }
        };
        tokio::select! {
            res = conn.as_mut() => {
                let Some(res) = res else {
                    // The response being sent went idle (an upstream that
                    // stalls, a client that stopped reading): the connection
                    // closes under it, the upstream request with it, without
                    // a lingering close (the client is not sending).
                    tracing::debug!(listener = %ctx.name, %peer, "response stream idle; closing");
                    idle_closed = true;
                    break;
                };
                if let Err(e) = res {
                    // hyper answered a malformed or oversized request head itself
                    // (400/414/431) without calling us: counted as a 4xx and
                    // logged as every answer is.
                    let reply = e.downcast_ref::<hyper::Error>().and_then(crate::proxy::hyper_reply);
                    if let Some((status, cause)) = reply {
                        ctx.stats.rq_by_class[3].inc();
                        crate::proxy::log_hyper_reply(&conn_ctx, status, cause);
                    }
                    tracing::debug!(listener = %ctx.name, %peer, "connection error: {e}");
                }
                break;
            }
            // (Once either fires, `h1_closing` keeps both from being polled
            // again.)
            _ = &mut drain, if closing_since.is_none() && !h1_closing.get() => {
                // h2: GOAWAY (checked at the top of the loop), in-flight streams
                // finish. h1 (or nothing received yet): the next response says
                // `Connection: close`; a connection idle for H1_DRAIN_IDLE is closed,
                // so a client sending on it right then is the only one that can
                // race the close.
                h1_closing.set(true);
                idle = idle.min(H1_DRAIN_IDLE);
            }
            _ = &mut health_failed, if closing_since.is_none() && !h1_closing.get() => {
                h1_closing.set(true);
                idle = idle.min(H1_DRAIN_IDLE);
            }
            () = until(lifetime_end), if closing_since.is_none() && !h1_closing.get() => {
                ctx.stats.cx_max_duration.inc();
                max_duration_counted = true;
                h1_closing.set(true);
                idle = idle.min(H1_DRAIN_IDLE);
            }
            () = limit_reached.notified() => {
                // (`h1_closing` is set: the GOAWAY goes at the top of the loop.)
                idle = idle.min(H1_DRAIN_IDLE);
            }
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
    // An upgraded connection lives on as a tunnel: it ends when either side
    // closes, or after its idle timeout without a byte either way (the
    // route's `idle_timeout` if it sets one, else the listener's; both
    // directions pass through this connection's byte counter), or
    // `drain_timeout` after the listener stopped (a drain, a reload that
    // replaced or removed it: [`ListenerCtx::drained`]).
    let Some(mut tunnel) = conn_ctx.tunnel.take() else {
        // HTTP/1.1 has no way to say "stop sending" but closing, and a close
        // with bytes unread (or still arriving) resets the connection: the
        // client's next write fails, often before it reads the response. That
        // is an early answer (413, a filter's 401) to a client still
        // uploading. So unless the client closed its side already, or we
        // closed an idle connection, the close lingers. HTTP/2 stops a stream
        // with RST_STREAM and keeps the connection; its close follows a GOAWAY.
        // `lingering_time: 0s` turns it off (nginx's `lingering_close off`).
        let time = limits.lingering_time.get();
        if !activity.is_h1() || activity.read_closed() || idle_closed || time.is_zero() {
            return None;
        }
        drop(conn);
        let io = Arc::into_inner(reclaimed)?.into_inner().ok()??;
        ctx.stats.cx_lingering.inc();
        return Some(Linger {
            io,
            time,
            timeout: limits.lingering_timeout.get(),
        });
    };
    // No request follows on a tunnel.
    drop(serving);
    // The route's `idle_timeout` (Envoy's route `idle_timeout`, which bounds
    // an upgraded stream there), else the listener's: a WebSocket route can
    // outlive, or be cut sooner than, the keep-alive idle time. `None`: off.
    let idle = tunnel.idle.unwrap_or(Some(limits.idle_timeout.get()));
    // Nor does a response end it: once the listener stops (a drain, or a
    // reload that replaced or removed it) it has `drain_timeout` left.
    let drained = ctx.drained(&worker.shared.snapshot);
    tokio::pin!(drained);
    // `limits.max_connection_duration` bounds a tunnel too: past it, it has
    // `drain_timeout` left, as Envoy force-closes a connection whose stream is
    // still active at the end of the drain period that limit starts.
    // Otherwise a WebSocket outlived the limit meant to rebalance or rotate
    // connections.
    let lifetime_cut =
        lifetime_end.map(|end| end + worker.shared.snapshot.load().config.drain_timeout.get());
    loop {
        let deadline = match idle.map(|idle| activity.check(idle, None)) {
            None => None,
            Some(Verdict::WaitUntil(t)) => Some(t.into()),
            Some(Verdict::Idle | Verdict::HeaderTimeout) => {
                tracing::debug!(listener = %ctx.name, %peer, "upgraded connection idle; closing");
                tunnel.cut("idle_timeout");
                return None;
            }
        };
        tokio::select! {
            _ = &mut tunnel.task => return None,
            () = &mut drained => {
                tracing::debug!(listener = %ctx.name, %peer, "upgraded connection's listener closed and its drain timeout passed; closing");
                tunnel.cut("drain_timeout");
                return None;
            }
            () = until(lifetime_cut) => {
                tracing::debug!(listener = %ctx.name, %peer, "upgraded connection outlived max_connection_duration and its drain timeout; closing");
                if !max_duration_counted {
                    ctx.stats.cx_max_duration.inc();
                }
                tunnel.cut("max_connection_duration");
                return None;
            }
            () = until(deadline) => {}
        }
    }
}

/// An HTTP/1.1 connection that ends with a lingering close, as nginx's
/// `lingering_close on`: Legate has sent its last response and closes its
/// side, then reads and discards what the client still sends, so that the
/// close does not reset the connection under the client before it has read
/// the response.
pub struct Linger {
    io: Conn,
    /// The listener's `limits.lingering_time`: the longest it lasts.
    time: Duration,
    /// The listener's `limits.lingering_timeout`: the longest wait for bytes.
    timeout: Duration,
}

impl Linger {
    /// Shuts the write side down (TLS: `close_notify`, then the TCP FIN), then
    /// discards reads until the client closes, nothing comes for `timeout`, or
    /// `time` passes; then closes.
    pub async fn run(self) {
        let deadline = tokio::time::Instant::now() + self.time;
        let timeout = self.timeout;
        let mut io = self.io;
        // hyper has shut down already unless the connection ended on an error;
        // a second shutdown does nothing. Bounded: it writes when it is the
        // first, and a client that does not read would block it.
        let _ = tokio::time::timeout(timeout.min(self.time), io.shutdown()).await;
        // What follows is discarded unread: plain TCP will do under TLS too.
        let mut tcp = match io {
            Conn::Plain(s) => s,
            Conn::Tls(s) => match *s {
                tokio_rustls::TlsStream::Server(s) => s.into_inner().0,
                tokio_rustls::TlsStream::Client(s) => s.into_inner().0,
            },
        };
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let until = (tokio::time::Instant::now() + timeout).min(deadline);
            match tokio::time::timeout_at(until, tcp.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                // The client closed (or reset), or time is up: a client still
                // sending then may see a reset, as without lingering.
                _ => return,
            }
        }
    }
}
