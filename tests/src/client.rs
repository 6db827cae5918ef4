//! Test clients: one real hyper connection (HTTP/1.1 or HTTP/2, plaintext or TLS)
//! that sends arbitrary requests, and a raw TCP connection for malformed input.
//!
//! A [`Client`] is one connection, not a pool, so a test controls exactly which
//! connection a request uses (keep-alive, stream limits, drain behaviour).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::header::{HeaderName, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Version};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::certs::TlsFiles;
use crate::upstream::{BoxBody, BoxError, EchoBody};

/// Downstream HTTP protocol of a test client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 (over TLS: ALPN `http/1.1`).
    H1,
    /// HTTP/2 (plaintext: h2c prior knowledge; over TLS: ALPN `h2`).
    H2,
}

impl Proto {
    /// The `Version` responses are expected to have.
    pub fn version(self) -> Version {
        match self {
            Proto::H1 => Version::HTTP_11,
            Proto::H2 => Version::HTTP_2,
        }
    }
}

enum Sender {
    H1(http1::SendRequest<BoxBody>),
    H2(http2::SendRequest<BoxBody>),
}

/// One client connection. HTTP/2 clients can be cloned to send concurrent streams on
/// the same connection.
pub struct Client {
    proto: Proto,
    sender: Sender,
    scheme: &'static str,
    authority: String,
    /// The certificate the server presented (TLS only).
    pub peer_cert: Option<CertificateDer<'static>>,
    /// Negotiated ALPN (TLS only).
    pub alpn: Option<String>,
    /// Negotiated TLS version, e.g. `TLSv1_3` (TLS only).
    pub tls_version: Option<String>,
    /// The OCSP response the server stapled to its certificate (TLS only;
    /// `None` when it stapled none).
    pub ocsp_response: Option<Vec<u8>>,
    /// Whether the TLS handshake resumed an earlier session (TLS only; see
    /// [`TlsSessions`]).
    pub resumed: bool,
}

impl Clone for Client {
    /// Clones an HTTP/2 client (another handle on the same connection).
    ///
    /// # Panics
    /// For HTTP/1.1 clients: one HTTP/1.1 connection carries one request at a time.
    fn clone(&self) -> Self {
        let sender = match &self.sender {
            Sender::H2(s) => Sender::H2(s.clone()),
            Sender::H1(_) => panic!("an HTTP/1.1 client cannot be cloned; open another connection"),
        };
        Client {
            proto: self.proto,
            sender,
            scheme: self.scheme,
            authority: self.authority.clone(),
            peer_cert: self.peer_cert.clone(),
            alpn: self.alpn.clone(),
            tls_version: self.tls_version.clone(),
            ocsp_response: self.ocsp_response.clone(),
            resumed: self.resumed,
        }
    }
}

/// Opens a plaintext connection to `addr`; panics if it cannot.
pub async fn client(proto: Proto, addr: SocketAddr) -> Client {
    Client::connect(proto, addr)
        .await
        .unwrap_or_else(|e| panic!("connect {proto:?} client to {addr}: {e:#}"))
}

/// Opens a TLS connection to `addr`; an `Err` is a failed TCP connect, TLS handshake
/// or HTTP/2 handshake (tests of TLS policy assert on it).
pub async fn tls_client(
    proto: Proto,
    addr: SocketAddr,
    opts: TlsOptions,
) -> anyhow::Result<Client> {
    Client::connect_tls(proto, addr, opts).await
}

/// TLS settings of a test client.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// CA certificate trusted for the server's chain.
    pub ca: CertificateDer<'static>,
    /// SNI sent (and the name verified).
    pub sni: String,
    /// Client certificate to present.
    pub client_cert: Option<TlsFiles>,
    /// Only offer TLS 1.2.
    pub tls12_only: bool,
    /// ALPN override; default from the protocol (`h2` or `http/1.1`).
    pub alpn: Option<Vec<Vec<u8>>>,
}

impl TlsOptions {
    /// Trust the CA that issued `issued_by` (any certificate of that CA), send `sni`.
    pub fn new(issued_by: &TlsFiles, sni: &str) -> TlsOptions {
        TlsOptions {
            ca: issued_by.ca_der.clone(),
            sni: sni.to_string(),
            client_cert: None,
            tls12_only: false,
            alpn: None,
        }
    }
    /// Present this client certificate.
    pub fn client_cert(mut self, cert: TlsFiles) -> Self {
        self.client_cert = Some(cert);
        self
    }
    /// Offer only TLS 1.2.
    pub fn tls12_only(mut self) -> Self {
        self.tls12_only = true;
        self
    }
}

/// A TLS client that keeps the sessions servers give it (rustls's in-memory
/// store, by server name) and offers them again: every connection shares
/// one client config, as a browser resumes with the tickets of earlier
/// connections. Connections to different addresses with the same SNI offer
/// the same sessions (instances behind one load balancer).
pub struct TlsSessions {
    proto: Proto,
    opts: TlsOptions,
    cfg: Arc<rustls::ClientConfig>,
    verifier: Arc<RecordingVerifier>,
}

impl TlsSessions {
    /// A client of `proto` with `opts`, holding no session yet.
    pub fn new(proto: Proto, opts: TlsOptions) -> TlsSessions {
        let (cfg, verifier) =
            client_tls_config_recording(proto, &opts).expect("test TLS client config");
        TlsSessions {
            proto,
            opts,
            cfg: Arc::new(cfg),
            verifier,
        }
    }

    /// Connects to `addr`, offering a session kept for the SNI if there is
    /// one ([`Client::resumed`] says whether the server took it).
    pub async fn connect(&self, addr: SocketAddr) -> anyhow::Result<Client> {
        Client::connect_tls_with(
            self.proto,
            addr,
            &self.opts,
            self.cfg.clone(),
            &self.verifier,
            &[],
        )
        .await
    }

    /// Connects to `addr` and sends `GET /` (answered 200), so that the
    /// TLS 1.3 tickets the server sends after the handshake are read and
    /// kept; returns whether the handshake resumed a session.
    pub async fn resumes(&self, addr: SocketAddr) -> bool {
        let mut c = self
            .connect(addr)
            .await
            .unwrap_or_else(|e| panic!("TLS to {addr}: {e:#}"));
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200);
        c.resumed
    }
}

/// The server certificate verifier of test clients: webpki's, with the CA of
/// [`TlsOptions`], recording the OCSP response stapled to the certificate.
#[derive(Debug)]
struct RecordingVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    ocsp: std::sync::Mutex<Option<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.ocsp.lock() {
            *seen = (!ocsp_response.is_empty()).then(|| ocsp_response.to_vec());
        }
        self.webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn client_tls_config(proto: Proto, opts: &TlsOptions) -> anyhow::Result<rustls::ClientConfig> {
    Ok(client_tls_config_recording(proto, opts)?.0)
}

/// [`client_tls_config`], and the verifier that records what the server
/// stapled.
fn client_tls_config_recording(
    proto: Proto,
    opts: &TlsOptions,
) -> anyhow::Result<(rustls::ClientConfig, Arc<RecordingVerifier>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider.clone());
    let b = if opts.tls12_only {
        b.with_protocol_versions(&[&rustls::version::TLS12])?
    } else {
        b.with_safe_default_protocol_versions()?
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(opts.ca.clone())?;
    let verifier = Arc::new(RecordingVerifier {
        webpki: rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider,
        )
        .build()?,
        ocsp: std::sync::Mutex::new(None),
    });
    let b = b
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let mut cfg = match &opts.client_cert {
        Some(c) => b.with_client_auth_cert(c.chain.clone(), c.key_der())?,
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = opts.alpn.clone().unwrap_or_else(|| match proto {
        Proto::H1 => vec![b"http/1.1".to_vec()],
        Proto::H2 => vec![b"h2".to_vec()],
    });
    Ok((cfg, verifier))
}

impl Client {
    /// Opens a plaintext connection.
    pub async fn connect(proto: Proto, addr: SocketAddr) -> anyhow::Result<Client> {
        let tcp = TcpStream::connect(addr).await.context("tcp connect")?;
        tcp.set_nodelay(true)?;
        let sender = handshake(proto, tcp).await?;
        Ok(Client {
            proto,
            sender,
            scheme: "http",
            authority: addr.to_string(),
            peer_cert: None,
            alpn: None,
            tls_version: None,
            ocsp_response: None,
            resumed: false,
        })
    }

    /// Opens a plaintext connection that first sends `preamble` (a PROXY
    /// protocol header, say).
    pub async fn connect_after(
        proto: Proto,
        addr: SocketAddr,
        preamble: &[u8],
    ) -> anyhow::Result<Client> {
        let mut tcp = TcpStream::connect(addr).await.context("tcp connect")?;
        tcp.set_nodelay(true)?;
        tokio::io::AsyncWriteExt::write_all(&mut tcp, preamble).await?;
        let sender = handshake(proto, tcp).await?;
        Ok(Client {
            proto,
            sender,
            scheme: "http",
            authority: addr.to_string(),
            peer_cert: None,
            alpn: None,
            tls_version: None,
            ocsp_response: None,
            resumed: false,
        })
    }

    /// Opens a TLS connection.
    pub async fn connect_tls(
        proto: Proto,
        addr: SocketAddr,
        opts: TlsOptions,
    ) -> anyhow::Result<Client> {
        Self::connect_tls_after(proto, addr, opts, &[]).await
    }

    /// Opens a TLS connection after sending `preamble` in cleartext (a PROXY
    /// protocol header precedes the handshake).
    pub async fn connect_tls_after(
        proto: Proto,
        addr: SocketAddr,
        opts: TlsOptions,
        preamble: &[u8],
    ) -> anyhow::Result<Client> {
        let (cfg, verifier) = client_tls_config_recording(proto, &opts)?;
        Self::connect_tls_with(proto, addr, &opts, Arc::new(cfg), &verifier, preamble).await
    }

    /// [`Client::connect_tls_after`] with the client config `cfg`, whose
    /// verifier is `verifier`.
    async fn connect_tls_with(
        proto: Proto,
        addr: SocketAddr,
        opts: &TlsOptions,
        cfg: Arc<rustls::ClientConfig>,
        verifier: &RecordingVerifier,
        preamble: &[u8],
    ) -> anyhow::Result<Client> {
        let mut tcp = TcpStream::connect(addr).await.context("tcp connect")?;
        tcp.set_nodelay(true)?;
        tokio::io::AsyncWriteExt::write_all(&mut tcp, preamble).await?;
        let name = ServerName::try_from(opts.sni.clone()).context("sni")?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .context("tls handshake")?;
        let conn = tls.get_ref().1;
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let peer_cert = conn.peer_certificates().and_then(|c| c.first().cloned());
        let alpn = conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let tls_version = conn.protocol_version().map(|v| format!("{v:?}"));
        let sender = handshake(proto, tls).await?;
        Ok(Client {
            proto,
            sender,
            scheme: "https",
            authority: opts.sni.clone(),
            peer_cert,
            alpn,
            tls_version,
            ocsp_response: verifier.ocsp.lock().ok().and_then(|o| o.clone()),
            resumed,
        })
    }

    /// The client's protocol.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// Whether the connection has been closed (by either side).
    pub fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// A request with any method.
    pub fn request(&mut self, method: Method, path: &str) -> RequestBuilder<'_> {
        RequestBuilder {
            client: self,
            method,
            path: path.to_string(),
            host: None,
            headers: Vec::new(),
            body: ReqBody::Empty,
        }
    }
    /// A GET request.
    pub fn get(&mut self, path: &str) -> RequestBuilder<'_> {
        self.request(Method::GET, path)
    }
    /// A POST request.
    pub fn post(&mut self, path: &str) -> RequestBuilder<'_> {
        self.request(Method::POST, path)
    }

    async fn send_request(&mut self, req: Request<BoxBody>) -> anyhow::Result<Resp> {
        let (parts, body) = self.send_for_head(req).await?.into_parts();
        let collected = body.collect().await.context("response body")?;
        let trailers = collected.trailers().cloned();
        Ok(Resp {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }

    async fn send_for_head(
        &mut self,
        req: Request<BoxBody>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        Ok(match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await.context("connection not ready")?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await.context("connection not ready")?;
                s.send_request(req).await?
            }
        })
    }
}

async fn handshake<I>(proto: Proto, io: I) -> anyhow::Result<Sender>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    Ok(match proto {
        Proto::H1 => {
            let (s, conn) = http1::Builder::new().handshake(io).await?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            Sender::H1(s)
        }
        Proto::H2 => {
            let (s, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // Large response heads are Legate's to refuse, not the client's
                // (hyper's default is 16 KiB).
                .max_header_list_size(1 << 20)
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Sender::H2(s)
        }
    })
}

enum ReqBody {
    Empty,
    Full(Bytes),
    Frames(Vec<Frame<Bytes>>),
    Boxed(BoxBody),
}

/// A request being built; finish with [`RequestBuilder::send`].
pub struct RequestBuilder<'a> {
    client: &'a mut Client,
    method: Method,
    path: String,
    host: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: ReqBody,
}

impl<'a> RequestBuilder<'a> {
    /// Adds a header (repeat to send several values). `host` here is sent as a
    /// literal header under both protocols; use [`RequestBuilder::host`] to set the
    /// authority.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let n = HeaderName::from_bytes(name.as_bytes()).expect("valid header name");
        let v = HeaderValue::from_str(value).expect("valid header value");
        self.headers.push((n, v));
        self
    }
    /// The host: `Host` under HTTP/1.1, `:authority` under HTTP/2. Default: the
    /// address connected to (TLS: the SNI).
    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.to_string());
        self
    }
    /// A body with a known length.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = ReqBody::Full(body.into());
        self
    }
    /// A body of unknown length sent in chunks of `chunk` bytes (chunked encoding
    /// under HTTP/1.1, no content-length under HTTP/2).
    pub fn streamed_body(mut self, data: impl Into<Bytes>, chunk: usize) -> Self {
        let data: Bytes = data.into();
        let frames = (0..data.len())
            .step_by(chunk.max(1))
            .map(|i| Frame::data(data.slice(i..(i + chunk).min(data.len()))))
            .collect();
        self.body = ReqBody::Frames(frames);
        self
    }
    /// Body data followed by trailers (HTTP/1.1: chunked encoding with trailers). A
    /// `Trailer` header naming them is added unless one was set.
    pub fn body_with_trailers(mut self, data: impl Into<Bytes>, trailers: HeaderMap) -> Self {
        let data: Bytes = data.into();
        // hyper's HTTP/1.1 encoder sends only trailers declared in `Trailer`.
        if !self.headers.iter().any(|(k, _)| k == http::header::TRAILER) {
            let names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
            if let Ok(v) = HeaderValue::from_str(&names.join(", ")) {
                self.headers.push((http::header::TRAILER, v));
            }
        }
        let mut frames = Vec::new();
        if !data.is_empty() {
            frames.push(Frame::data(data));
        }
        frames.push(Frame::trailers(trailers));
        self.body = ReqBody::Frames(frames);
        self
    }
    /// Any body (slow, endless, failing...).
    pub fn boxed_body(mut self, body: BoxBody) -> Self {
        self.body = ReqBody::Boxed(body);
        self
    }

    fn build(self) -> anyhow::Result<(Request<BoxBody>, &'a mut Client)> {
        let c = &*self.client;
        let authority = self.host.clone().unwrap_or_else(|| c.authority.clone());
        let uri = match c.proto {
            Proto::H1 => self.path.clone(),
            Proto::H2 => format!("{}://{}{}", c.scheme, authority, self.path),
        };
        let mut b = Request::builder().method(self.method).uri(&uri);
        if c.proto == Proto::H2 {
            b = b.version(Version::HTTP_2);
        }
        let has_host = self.headers.iter().any(|(k, _)| *k == HOST);
        if c.proto == Proto::H1 && !has_host {
            b = b.header(HOST, &authority);
        }
        for (k, v) in self.headers {
            b = b.header(k, v);
        }
        let body: BoxBody = match self.body {
            ReqBody::Empty => Empty::<Bytes>::new().map_err(|n| match n {}).boxed(),
            ReqBody::Full(d) => Full::new(d).map_err(|n| match n {}).boxed(),
            ReqBody::Frames(f) => {
                let s = futures_util::stream::iter(f.into_iter().map(Ok::<_, BoxError>));
                StreamBody::new(s).boxed()
            }
            ReqBody::Boxed(b) => b,
        };
        let req = b
            .body(body)
            .map_err(|e| anyhow!("bad request {uri}: {e}"))?;
        Ok((req, self.client))
    }

    /// Sends the request and collects the response; panics on a transport error.
    pub async fn send(self) -> Resp {
        let what = format!("{} {}", self.method, self.path);
        self.try_send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"))
    }

    /// Sends the request and collects the response.
    pub async fn try_send(self) -> anyhow::Result<Resp> {
        let (req, client) = self.build()?;
        client.send_request(req).await
    }

    /// Sends the request and returns the response as soon as its head
    /// arrives, its body still streaming (a test of what reaches the client
    /// before the upstream ends); panics on a transport error.
    pub async fn send_for_head(self) -> hyper::Response<hyper::body::Incoming> {
        let what = format!("{} {}", self.method, self.path);
        let (req, client) = self.build().unwrap_or_else(|e| panic!("{what}: {e:#}"));
        client
            .send_for_head(req)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"))
    }
}

/// A collected response.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status.
    pub status: StatusCode,
    /// HTTP version of the response.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if any were received.
    pub trailers: Option<HeaderMap>,
}

impl Resp {
    /// The body as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response ({}) is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }
    /// The body as an upstream [`EchoBody`]; panics if it is not one.
    pub fn echo(&self) -> EchoBody {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response ({}) is not an upstream echo ({e}): {}",
                self.status,
                self.text()
            )
        })
    }
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// All values of header `name`.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    }
    /// The first value of trailer `name`.
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .and_then(|v| v.to_str().ok())
    }
}

/// Sends `bytes` on a new TCP connection and returns everything received until the
/// peer closes or 2 s pass.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut c = RawConn::connect(addr).await;
    c.write(bytes).await;
    c.read_until_close(Duration::from_secs(2)).await.0
}

/// A raw TCP connection, for malformed input and slow clients.
pub struct RawConn {
    /// The socket.
    pub stream: TcpStream,
}

impl RawConn {
    /// Connects with a 4 KiB receive buffer, for a client that stops reading:
    /// what it leaves unread fills its buffers (and the sender's) quickly.
    pub async fn connect_small_buffer(addr: SocketAddr) -> RawConn {
        let s = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("socket: {e}"));
        s.set_recv_buffer_size(4096)
            .unwrap_or_else(|e| panic!("SO_RCVBUF: {e}"));
        let stream = s
            .connect(addr)
            .await
            .unwrap_or_else(|e| panic!("raw connect {addr}: {e}"));
        RawConn { stream }
    }

    /// Connects; panics on failure.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("raw connect {addr}: {e}"));
        let _ = stream.set_nodelay(true);
        RawConn { stream }
    }

    /// Writes all of `bytes`; a write error (peer closed) is ignored, as the tests
    /// look at what comes back.
    pub async fn write(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Writes `bytes`, reporting errors (to detect a closed connection).
    pub async fn try_write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Reads until EOF (returns `true`), a reset (also `true`) or `timeout` (`false`).
    pub async fn read_until_close(&mut self, timeout: Duration) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_) => return (out, false),
                Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Sends a WebSocket handshake (HTTP/1.1 `GET path` with `Upgrade:
    /// websocket`) and returns the response head as text.
    pub async fn websocket_handshake(&mut self, path: &str) -> String {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        self.write(req.as_bytes()).await;
        String::from_utf8_lossy(&self.read_head(Duration::from_secs(3)).await).into_owned()
    }

    /// Reads until a complete response head (`\r\n\r\n`) has arrived, EOF or
    /// `timeout`; returns what was read (possibly including part of a body).
    pub async fn read_head(&mut self, timeout: Duration) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let deadline = tokio::time::Instant::now() + timeout;
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        out
    }

    /// Reads exactly `n` bytes or fails after `timeout`.
    pub async fn read_exact(&mut self, n: usize, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        let mut out = vec![0u8; n];
        match tokio::time::timeout(timeout, self.stream.read_exact(&mut out)).await {
            Err(_) => bail!("timed out reading {n} bytes"),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(_)) => Ok(out),
        }
    }
}

/// A raw TLS connection (no ALPN), for TCP proxy listeners that terminate TLS.
pub async fn tls_raw(
    addr: SocketAddr,
    opts: TlsOptions,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut cfg = client_tls_config(Proto::H1, &opts)?;
    cfg.alpn_protocols = Vec::new();
    let tcp = TcpStream::connect(addr).await.context("tcp connect")?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(opts.sni.clone()).context("sni")?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .context("tls handshake")
}

/// The status code of a raw HTTP/1.x response (`None` if it is not one).
pub fn raw_status(resp: &[u8]) -> Option<u16> {
    let s = std::str::from_utf8(resp.get(..12)?).ok()?;
    s.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
}

/// A bare HTTP/2 connection (prior knowledge) to `addr`, driven on a task: for
/// a test that sends its own request bodies (streamed, dropped mid-way) where
/// [`Client`] would complete them.
pub async fn raw_h2<B>(addr: SocketAddr) -> http2::SendRequest<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap_or_else(|e| panic!("HTTP/2 handshake with {addr}: {e}"));
    tokio::spawn(conn);
    sender
}

/// Sends `n` GETs for `path` and counts the answers by the upstream that gave
/// them (`x-upstream`), or by status (`status 503`) when none did.
pub async fn spread(
    c: &mut Client,
    path: &str,
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let r = c.get(path).send().await;
        let who = match r.header("x-upstream") {
            Some(u) if r.status == 200 => u.to_string(),
            _ => format!("status {}", r.status.as_u16()),
        };
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}
