//! Real upstream servers for tests: hyper 1 on 127.0.0.1:0 with configurable
//! protocol, TLS, routes and failure behaviours, plus raw TCP servers (echo, and an
//! HTTP Upgrade endpoint) for tests hyper cannot express.
//!
//! Upstreams run on one background multi-thread runtime shared by the test binary, so
//! they keep serving while a test thread blocks (for example in
//! [`crate::LegateHandle::shutdown_and_wait`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::certs::TlsFiles;

/// Error type of boxed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A boxed response body: for streaming, slow or trailer-carrying responses.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFuture<Response<BoxBody>> + Send + Sync>;

/// The background runtime all upstreams of this process run on.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-upstream")
            .enable_all()
            .build()
            .expect("build the upstream runtime")
    })
}

/// A listener bound to `addr` (port 0: an ephemeral one) and registered with
/// [`runtime`], where the server serving it runs; its address. `what` names it
/// in the panic if binding fails.
pub(crate) fn bind_on_runtime(addr: SocketAddr, what: &str) -> (TcpListener, SocketAddr) {
    let std_listener =
        std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {what} listener: {e}"));
    std_listener.set_nonblocking(true).expect("nonblocking");
    let addr = std_listener.local_addr().expect("local_addr");
    let _guard = runtime().enter();
    (
        TcpListener::from_std(std_listener).expect("tokio listener"),
        addr,
    )
}

/// A shared counter (requests seen, connections accepted, ...).
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    /// The current value.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    pub(crate) fn inc(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    fn dec(&self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
    fn max(&self, v: usize) {
        self.0.fetch_max(v, Ordering::SeqCst);
    }
}

/// What a handler can return: a plain full-body response or a boxed-body one.
pub trait IntoUpstreamResponse {
    /// Converts to the boxed body the server sends.
    fn into_boxed(self) -> Response<BoxBody>;
}

impl IntoUpstreamResponse for Response<Full<Bytes>> {
    fn into_boxed(self) -> Response<BoxBody> {
        self.map(|b| b.map_err(|never| match never {}).boxed())
    }
}

impl IntoUpstreamResponse for Response<BoxBody> {
    fn into_boxed(self) -> Response<BoxBody> {
        self
    }
}

/// Facts about the connection a request arrived on; in every request's extensions.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnInfo {
    /// The upstream's `.name()`, empty if unnamed.
    pub upstream: String,
    /// The client (Legate) address.
    pub peer: String,
    /// Present when the connection is TLS.
    pub tls: Option<TlsInfo>,
}

/// TLS facts of a connection.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TlsInfo {
    /// SNI the client sent.
    pub sni: Option<String>,
    /// Negotiated ALPN protocol.
    pub alpn: Option<String>,
    /// Whether the client presented a (verified) certificate.
    pub client_cert: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServeProto {
    Auto,
    H1,
    H2,
}

/// Builder of a real upstream HTTP server. See [`upstream()`].
pub struct UpstreamBuilder {
    proto: ServeProto,
    tls: Option<TlsFiles>,
    client_ca: Option<TlsFiles>,
    name: String,
    routes: Vec<(String, Handler)>,
    default: Option<Handler>,
    status: Option<u16>,
    delay: Option<Duration>,
    gate: Option<Arc<AtomicBool>>,
    fail_first: Option<(usize, u16)>,
    close_connection: bool,
    header: Vec<(String, String)>,
    bind: Option<SocketAddr>,
    h2_max_streams: Option<u32>,
}

/// A new upstream builder: HTTP/1.1 + h2c (prior knowledge) on 127.0.0.1:0, answering
/// every request with [`echo`].
pub fn upstream() -> UpstreamBuilder {
    UpstreamBuilder {
        proto: ServeProto::Auto,
        tls: None,
        client_ca: None,
        name: String::new(),
        routes: Vec::new(),
        default: None,
        status: None,
        delay: None,
        gate: None,
        fail_first: None,
        close_connection: false,
        header: Vec::new(),
        bind: None,
        h2_max_streams: None,
    }
}

fn boxed_handler<F, Fut, R>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoUpstreamResponse,
{
    Arc::new(move |req| {
        let fut = f(req);
        Box::pin(async move { fut.await.into_boxed() })
    })
}

impl UpstreamBuilder {
    /// HTTP/2 only (h2c prior knowledge; with TLS, ALPN offers only `h2`).
    pub fn h2(mut self) -> Self {
        self.proto = ServeProto::H2;
        self
    }
    /// HTTP/2 only, advertising `SETTINGS_MAX_CONCURRENT_STREAMS` = `n` (hyper
    /// refuses streams past it).
    pub fn h2_max_concurrent_streams(mut self, n: u32) -> Self {
        self.proto = ServeProto::H2;
        self.h2_max_streams = Some(n);
        self
    }
    /// HTTP/1.1 only (with TLS, ALPN offers only `http/1.1`).
    pub fn http1(mut self) -> Self {
        self.proto = ServeProto::H1;
        self
    }
    /// HTTP/1.1 and h2c prior knowledge (the default).
    pub fn auto(mut self) -> Self {
        self.proto = ServeProto::Auto;
        self
    }
    /// Serve TLS with this certificate; ALPN offers `h2` and `http/1.1` (as the
    /// protocol choice allows).
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }
    /// Require client certificates issued by the CA of `ca` (its `ca_der`).
    pub fn client_ca(mut self, ca: TlsFiles) -> Self {
        self.client_ca = Some(ca);
        self
    }
    /// Listens on `addr` instead of 127.0.0.1:0 (e.g. another loopback address).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    /// Names the upstream: every response carries `x-upstream: <name>`.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }
    /// Adds a response header to every response.
    pub fn response_header(mut self, name: &str, value: &str) -> Self {
        self.header.push((name.to_string(), value.to_string()));
        self
    }
    /// Serves `path` (the path without query; a trailing `*` makes it a prefix) with
    /// `handler`. Routes are tried in order; unmatched requests get the default handler.
    pub fn route<F, Fut, R>(mut self, path: &str, handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: IntoUpstreamResponse,
    {
        self.routes.push((path.to_string(), boxed_handler(handler)));
        self
    }
    /// Replaces the default handler ([`echo`]).
    pub fn handler<F, Fut, R>(mut self, handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: IntoUpstreamResponse,
    {
        self.default = Some(boxed_handler(handler));
        self
    }
    /// The default handler answers with this status (echo body).
    pub fn status(mut self, code: u16) -> Self {
        self.status = Some(code);
        self
    }
    /// Every request waits this long before it is answered.
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
    /// Every request waits until `release` is set before it is answered: it stays
    /// in flight for as long as a test needs, however slow the machine.
    pub fn hold_until(mut self, release: &Arc<AtomicBool>) -> Self {
        self.gate = Some(release.clone());
        self
    }
    /// The first `n` requests (across connections) are answered with `status`.
    pub fn fail_first(mut self, n: usize, status: u16) -> Self {
        self.fail_first = Some((n, status));
        self
    }
    /// Accept connections, wait for the first bytes of a request, then reset the
    /// connection (RST) without answering.
    pub fn close_connection(mut self) -> Self {
        self.close_connection = true;
        self
    }
    /// The default handler becomes [`grpc_echo`]; the server speaks HTTP/2 only.
    pub fn grpc(mut self) -> Self {
        self.proto = ServeProto::H2;
        self.default = Some(boxed_handler(grpc_echo));
        self
    }

    /// Binds 127.0.0.1:0 and starts serving.
    pub async fn start(self) -> UpstreamHandle {
        let rt = runtime();
        let (listener, addr) = bind_on_runtime(
            self.bind
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            "upstream",
        );
        let tls = self.tls.as_ref().map(|files| {
            tokio_rustls::TlsAcceptor::from(Arc::new(server_tls_config(
                files,
                self.client_ca.as_ref(),
                self.proto,
            )))
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let state = Arc::new(State {
            name: self.name,
            routes: self.routes,
            default: self.default.unwrap_or_else(|| boxed_handler(echo)),
            status: self.status,
            delay: self.delay,
            gate: self.gate,
            fail_first: self.fail_first,
            header: self.header,
            h2_max_streams: self.h2_max_streams,
            requests: Counter::default(),
            connections: Counter::default(),
            closed: Counter::default(),
            in_flight: Counter::default(),
            max_in_flight: Counter::default(),
        });
        let handle = UpstreamHandle {
            addr,
            requests: state.requests.clone(),
            connections: state.connections.clone(),
            closed: state.closed.clone(),
            in_flight: state.in_flight.clone(),
            max_in_flight: state.max_in_flight.clone(),
            stop: stop_tx,
        };
        let proto = self.proto;
        let close = self.close_connection;
        rt.spawn(accept_loop(listener, state, tls, proto, close, stop_rx));
        handle
    }
}

struct State {
    name: String,
    routes: Vec<(String, Handler)>,
    default: Handler,
    status: Option<u16>,
    delay: Option<Duration>,
    gate: Option<Arc<AtomicBool>>,
    fail_first: Option<(usize, u16)>,
    header: Vec<(String, String)>,
    h2_max_streams: Option<u32>,
    requests: Counter,
    connections: Counter,
    closed: Counter,
    in_flight: Counter,
    max_in_flight: Counter,
}

/// A running upstream. Dropping it stops it (the listener closes and every open
/// connection is dropped).
pub struct UpstreamHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests seen (including ones answered by a failure behaviour).
    pub requests: Counter,
    /// TCP connections accepted.
    pub connections: Counter,
    /// Connections that ended while the upstream ran: closed by the client (Legate)
    /// or failed; not those [`UpstreamHandle::stop`] drops.
    pub closed: Counter,
    /// Requests being handled right now.
    pub in_flight: Counter,
    /// Most requests ever handled at once.
    pub max_in_flight: Counter,
    stop: watch::Sender<bool>,
}

impl UpstreamHandle {
    /// Stops listening and drops every connection. The port then stays bound (not
    /// listening) until the test process exits: connecting is refused, and no
    /// other test's server lands on it while this test still probes it.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        crate::hold_stopped_port(self.addr).await;
    }
}

impl Drop for UpstreamHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn server_tls_config(
    files: &TlsFiles,
    client_ca: Option<&TlsFiles>,
    proto: ServeProto,
) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.ca_der.clone()).expect("client CA");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(files.chain.clone(), files.key_der())
        .expect("server certificate");
    cfg.alpn_protocols = match proto {
        ServeProto::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        ServeProto::H1 => vec![b"http/1.1".to_vec()],
        ServeProto::H2 => vec![b"h2".to_vec()],
    };
    cfg
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    proto: ServeProto,
    close: bool,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        state.connections.inc();
        let _ = tcp.set_nodelay(true);
        if close {
            let state = state.clone();
            tokio::spawn(reset_after_first_bytes(tcp, state));
            continue;
        }
        let state = state.clone();
        let tls = tls.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let closed = state.closed.clone();
            tokio::select! {
                _ = serve_conn(tcp, peer, state, tls, proto) => { closed.inc(); }
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

async fn reset_after_first_bytes(mut tcp: TcpStream, state: Arc<State>) {
    let mut buf = [0u8; 1024];
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
        if n > 0 {
            state.requests.inc();
        }
    }
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

async fn serve_conn(
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    proto: ServeProto,
) {
    let mut info = ConnInfo {
        upstream: state.name.clone(),
        peer: peer.to_string(),
        tls: None,
    };
    match tls {
        None => serve_http(tcp, info, state, proto).await,
        Some(acceptor) => {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let conn = stream.get_ref().1;
            let alpn = conn
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            info.tls = Some(TlsInfo {
                sni: conn.server_name().map(str::to_string),
                alpn: alpn.clone(),
                client_cert: conn.peer_certificates().is_some_and(|c| !c.is_empty()),
            });
            let proto = match alpn.as_deref() {
                Some("h2") => ServeProto::H2,
                Some("http/1.1") => ServeProto::H1,
                _ => proto,
            };
            serve_http(stream, info, state, proto).await
        }
    }
}

async fn serve_http<I>(io: I, info: ConnInfo, state: Arc<State>, proto: ServeProto)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(info);
    let h2_max_streams = state.h2_max_streams;
    let svc = service_fn(move |req| {
        let state = state.clone();
        let info = info.clone();
        async move { Ok::<_, Infallible>(handle(state, info, req).await) }
    });
    let io = TokioIo::new(io);
    match proto {
        ServeProto::Auto => {
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http1().timer(TokioTimer::new());
            b.http2().timer(TokioTimer::new());
            let _ = b.serve_connection_with_upgrades(io, svc).await;
        }
        ServeProto::H1 => {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(io, svc)
                .with_upgrades()
                .await;
        }
        ServeProto::H2 => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new());
            if let Some(n) = h2_max_streams {
                b.max_concurrent_streams(n);
            }
            let _ = b.serve_connection(io, svc).await;
        }
    }
}

struct InFlight(Counter);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn handle(
    state: Arc<State>,
    info: Arc<ConnInfo>,
    mut req: Request<Incoming>,
) -> Response<BoxBody> {
    let n = state.requests.inc();
    let now = state.in_flight.inc();
    state.max_in_flight.max(now);
    let _guard = InFlight(state.in_flight.clone());
    req.extensions_mut().insert((*info).clone());

    let mut resp = if let Some((first, status)) = state.fail_first.filter(|(k, _)| n <= *k) {
        // Drain the body so an HTTP/1.1 connection stays reusable.
        let _ = req.into_body().collect().await;
        if let Some(d) = state.delay {
            tokio::time::sleep(d).await;
        }
        let mut r = Response::new(Full::new(Bytes::from(format!("failure {n} of {first}\n"))));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r.into_boxed()
    } else {
        if let Some(release) = &state.gate {
            while !release.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if let Some(d) = state.delay {
            tokio::time::sleep(d).await;
        }
        let path = req.uri().path().to_string();
        let routed = state
            .routes
            .iter()
            .find(|(p, _)| match p.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => path == *p,
            });
        match routed {
            Some((_, h)) => h(req).await,
            None => {
                let mut r = (state.default)(req).await;
                if let Some(s) = state.status {
                    *r.status_mut() = StatusCode::from_u16(s).unwrap_or(StatusCode::OK);
                }
                r
            }
        }
    };
    if !state.name.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&state.name) {
            resp.headers_mut().insert("x-upstream", v);
        }
    }
    for (k, v) in &state.header {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

/// An upstream named `name` whose `/healthz` answers 200 while `ok` is true and
/// 503 after; every other path is echoed (with `x-upstream: name`).
pub async fn health_checked(
    name: &str,
    ok: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> UpstreamHandle {
    let ok = ok.clone();
    upstream()
        .name(name)
        .route("/healthz", move |_req| {
            let up = ok.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                let mut r = Response::new(Full::new(Bytes::from_static(if up {
                    b"ok\n"
                } else {
                    b"down\n"
                })));
                if !up {
                    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                }
                r
            }
        })
        .start()
        .await
}

/// What [`echo`] answers, as JSON.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EchoBody {
    /// Request method.
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Request headers: lowercase name → values in order. Under HTTP/2 the
    /// `:authority` is reported as `host` when no `host` header was sent.
    pub headers: BTreeMap<String, Vec<String>>,
    /// Request body as (lossy) UTF-8.
    pub body: String,
    /// Request body length in bytes.
    pub body_len: usize,
    /// Request trailers.
    pub trailers: BTreeMap<String, Vec<String>>,
    /// The upstream's name.
    pub upstream: String,
    /// TLS facts of the connection.
    pub tls: Option<TlsInfo>,
}

impl EchoBody {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
    /// All values of header `name` (lowercase); empty if absent.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .get(name)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

/// Collects a header map as lowercase name → values.
pub fn header_map_json(h: &HeaderMap) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in h {
        out.entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    out
}

/// The default handler: 200 with a JSON [`EchoBody`] describing the request.
pub async fn echo(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let info = parts
        .extensions
        .get::<ConnInfo>()
        .cloned()
        .unwrap_or_default();
    let (data, trailers) = match body.collect().await {
        Ok(c) => {
            let t = c.trailers().map(header_map_json).unwrap_or_default();
            (c.to_bytes(), t)
        }
        Err(e) => {
            let mut r = Response::new(Full::new(Bytes::from(format!("body error: {e}\n"))));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        }
    };
    let mut headers = header_map_json(&parts.headers);
    if !headers.contains_key("host") {
        if let Some(a) = parts.uri.authority() {
            headers.insert("host".into(), vec![a.to_string()]);
        }
    }
    let e = EchoBody {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into()),
        version: format!("{:?}", parts.version),
        headers,
        body: String::from_utf8_lossy(&data).into_owned(),
        body_len: data.len(),
        trailers,
        upstream: info.upstream,
        tls: info.tls,
    };
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(&e).unwrap_or_default(),
    )));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

/// gRPC-shaped echo: `content-type: application/grpc`, the request's (already framed)
/// message sent back as one data frame, then trailers `grpc-status: 0`,
/// `grpc-message: OK` and `x-echo-trailer: yes`.
pub async fn grpc_echo(req: Request<Incoming>) -> Response<BoxBody> {
    let data = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("grpc-message", HeaderValue::from_static("OK"));
    trailers.insert("x-echo-trailer", HeaderValue::from_static("yes"));
    let frames: Vec<Result<Frame<Bytes>, BoxError>> =
        vec![Ok(Frame::data(data)), Ok(Frame::trailers(trailers))];
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}

/// Frames `msg` as one gRPC message (uncompressed).
pub fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(msg.len() + 5);
    v.push(0);
    v.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(msg);
    Bytes::from(v)
}

/// Deterministic test bytes: `n` bytes of a pattern that is not periodic at any
/// power of two, so a dropped or duplicated chunk changes the checksum.
pub fn pattern_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + i / 251) % 251) as u8).collect()
}

/// Order-sensitive checksum (FNV-1a, 64 bit).
pub fn checksum(data: &[u8]) -> u64 {
    let mut h = Checksum::default();
    h.update(data);
    h.0
}

/// Incremental [`checksum`].
#[derive(Clone, Copy, Debug)]
pub struct Checksum(pub u64);

impl Default for Checksum {
    fn default() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
}

impl Checksum {
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A handler that reads the request body as it streams and answers
/// `{"len": N, "checksum": C, "frames": F}` without keeping the body.
pub async fn sink(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut body = req.into_body();
    let mut len = 0usize;
    let mut frames = 0usize;
    let mut sum = Checksum::default();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    len += d.len();
                    frames += 1;
                    sum.update(d);
                }
            }
            Err(e) => {
                let mut r = Response::new(Full::new(Bytes::from(format!("body error: {e}\n"))));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return r;
            }
        }
    }
    let v = serde_json::json!({"len": len, "checksum": sum.0, "frames": frames});
    Response::new(Full::new(Bytes::from(v.to_string())))
}

/// A handler that streams `n` bytes of [`pattern_bytes`] in 64 KiB chunks, without a
/// content-length.
pub fn source(
    n: usize,
) -> impl Fn(Request<Incoming>) -> BoxFuture<Response<BoxBody>> + Send + Sync + Clone + 'static {
    move |_req| {
        Box::pin(async move {
            let data = Bytes::from(pattern_bytes(n));
            let chunks: Vec<Result<Frame<Bytes>, BoxError>> = (0..n)
                .step_by(64 * 1024)
                .map(|i| Ok(Frame::data(data.slice(i..(i + 64 * 1024).min(n)))))
                .collect();
            Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                chunks,
            ))))
        })
    }
}

/// A raw TCP server (echo or HTTP Upgrade), for what hyper does not model.
pub struct TcpEchoHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connections accepted.
    pub connections: Counter,
    /// Bytes received (and echoed).
    pub bytes: Counter,
    /// Connections closed by the peer (EOF or error seen).
    pub closed: Counter,
    /// For upgrade servers: the request heads received, as text.
    pub heads: Arc<Mutex<Vec<String>>>,
    stop: watch::Sender<bool>,
}

impl TcpEchoHandle {
    /// Stops listening and drops every connection. The port then stays bound (not
    /// listening) until the test process exits: connecting is refused, and no
    /// other test's server lands on it while this test still probes it.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        crate::hold_stopped_port(self.addr).await;
    }
}

impl Drop for TcpEchoHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A TCP echo server on 127.0.0.1:0: every byte received is sent back.
pub async fn tcp_echo_server() -> TcpEchoHandle {
    raw_server(Raw::Echo).await
}

/// An HTTP/1.1 server on 127.0.0.1:0 that answers any request carrying `Upgrade` with
/// `101 Switching Protocols` (echoing the `Upgrade` value and, for WebSocket, a
/// `Sec-WebSocket-Accept`-shaped header) and then echoes bytes; requests without
/// `Upgrade` get `400`. Request heads are recorded in [`TcpEchoHandle::heads`].
pub async fn upgrade_echo_server() -> TcpEchoHandle {
    raw_server(Raw::Upgrade).await
}

/// [`upgrade_echo_server`] answering a WebSocket key with the real RFC 6455
/// `Sec-WebSocket-Accept` (base64 of the SHA-1 of the key and the GUID), as
/// a WebSocket server does: for a proxy that checks it (RFC 8441 upgrades).
/// Its `101` also has `x-hop: secret`, a field its `Connection` names
/// (hop-by-hop: a proxy must not pass it on).
pub async fn websocket_echo_server() -> TcpEchoHandle {
    raw_server(Raw::WebSocket).await
}

/// What a [`raw_server`] is.
#[derive(Clone, Copy, PartialEq)]
enum Raw {
    /// Echoes bytes from the start.
    Echo,
    /// Answers an upgrade with `101` (a WebSocket key with a made-up accept
    /// that tests can spot), then echoes.
    Upgrade,
    /// The same, with the real accept.
    WebSocket,
}

/// A TCP server on 127.0.0.1:0 that sends an endless stream of
/// [`pattern_bytes`] to every connection, as fast as it is taken, and reads
/// nothing: an upstream that keeps sending to a client that may stop reading.
/// It serves until the test process exits.
pub async fn endless_tcp_server() -> SocketAddr {
    let rt = runtime();
    let (listener, addr) = bind_on_runtime(SocketAddr::from(([127, 0, 0, 1], 0)), "endless");
    rt.spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = pattern_bytes(64 * 1024);
                while tcp.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

async fn raw_server(kind: Raw) -> TcpEchoHandle {
    let rt = runtime();
    let (listener, addr) = bind_on_runtime(SocketAddr::from(([127, 0, 0, 1], 0)), "echo");
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let h = TcpEchoHandle {
        addr,
        connections: Counter::default(),
        bytes: Counter::default(),
        closed: Counter::default(),
        heads: Arc::new(Mutex::new(Vec::new())),
        stop: stop_tx,
    };
    let (conns, bytes, closed, heads) = (
        h.connections.clone(),
        h.bytes.clone(),
        h.closed.clone(),
        h.heads.clone(),
    );
    rt.spawn(async move {
        loop {
            let tcp = tokio::select! {
                r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
                _ = stop_rx.wait_for(|s| *s) => return,
            };
            conns.inc();
            let (bytes, closed, heads) = (bytes.clone(), closed.clone(), heads.clone());
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = raw_conn(tcp, kind, bytes, heads) => { closed.inc(); }
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
        }
    });
    h
}

async fn raw_conn(mut tcp: TcpStream, kind: Raw, bytes: Counter, heads: Arc<Mutex<Vec<String>>>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = Vec::new();
    if kind != Raw::Echo {
        // Read the request head.
        let head_end = loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
        let rest = pending.split_off(head_end);
        pending = rest;
        if let Ok(mut h) = heads.lock() {
            h.push(head.clone());
        }
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let Some(proto) = header("upgrade") else {
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\nconnection: close\r\n\r\nno upgrade\n")
                .await;
            return;
        };
        let mut resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: {proto}\r\nconnection: Upgrade\r\n"
        );
        if let Some(key) = header("sec-websocket-key") {
            let accept = if kind == Raw::WebSocket {
                use base64::Engine as _;
                let digest = ring::digest::digest(
                    &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                    format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
                );
                base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
            } else {
                // Not the RFC 6455 hash: tests check it is passed through.
                format!("accept-{key}")
            };
            resp.push_str(&format!("sec-websocket-accept: {accept}\r\n"));
            if kind == Raw::WebSocket {
                resp.push_str("connection: x-hop\r\nx-hop: secret\r\n");
            }
        }
        resp.push_str("\r\n");
        if tcp.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
    if !pending.is_empty() {
        bytes.0.fetch_add(pending.len(), Ordering::SeqCst);
        if tcp.write_all(&pending).await.is_err() {
            return;
        }
    }
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                bytes.0.fetch_add(n, Ordering::SeqCst);
                if tcp.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// An authorization service for the callout tests (both ABIs), named `authz`:
/// `/check/deny*` answers 403 `denied:<x-user>`, `/check/slow*` and
/// `/check/body/slow*` answer after 2 s,
/// `/tick` answers 200 `fresh`, `/check/body*`, `/check/resp*` and
/// `/check/trailer*` check the request body (403 `denied:<length>` if it
/// contains `forbidden`, else 200 `checked:<body upper-cased>`), anything else
/// 200 `ok:<x-user>` (`anonymous` without the header).
pub async fn authz_upstream() -> UpstreamHandle {
    async fn check(req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let user = req
            .headers()
            .get("x-user")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("anonymous")
            .to_string();
        if path.starts_with("/check/slow") || path.starts_with("/check/body/slow") {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        // A content-checking service: the payload (a body, a trailer) is
        // refused if it contains `forbidden`, else answered upper-cased after
        // `checked:` (so a body replaced with the answer changes length).
        if ["/check/body", "/check/resp", "/check/trailer"]
            .iter()
            .any(|p| path.starts_with(p))
        {
            let payload = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let text = String::from_utf8_lossy(&payload);
            let (status, body) = if text.contains("forbidden") {
                (StatusCode::FORBIDDEN, format!("denied:{}", payload.len()))
            } else {
                (StatusCode::OK, format!("checked:{}", text.to_uppercase()))
            };
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            return resp;
        }
        let (status, body) = if path.starts_with("/check/deny") {
            (StatusCode::FORBIDDEN, format!("denied:{user}"))
        } else if path == "/tick" {
            (StatusCode::OK, "fresh".to_string())
        } else {
            (StatusCode::OK, format!("ok:{user}"))
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp
    }
    upstream().name("authz").handler(check).start().await
}
