//! A real gRPC upstream for tests: tonic's generated server for the test service
//! `legate.test.v1.Echo` (tests/proto), served over HTTP/2 with prior knowledge
//! on 127.0.0.1:0, plus the gRPC message framing tests need and the compiled
//! `FileDescriptorSet` of the test protos (for schema-driven plugins).
//!
//! ```no_run
//! # async fn f() {
//! use legate_tests::grpc::{grpc_upstream, pb};
//! let up = grpc_upstream().start().await;
//! // cluster: { protocol: h2, endpoints: [{ address: <up.addr> }] }
//! # }
//! ```
//!
//! The service: `Say` echoes the message and reports the request metadata it saw
//! (so a test can check what the proxy sent); `Count` streams `count` replies
//! (`delay_ms` apart), then ends with `fail_code`/`fail_message` in the
//! trailers; `Chat` echoes each message of a client stream as it arrives;
//! `Collect` answers once with a client stream's messages joined by `,`;
//! `Fail` answers with a chosen status, which tonic sends trailers-only
//! (status in the headers); `Reflect` answers with the request it received.
//! Every method carries `google.api.http` options (REST/JSON bindings for
//! plugins/grpc-json).

use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::codegen::Service;
use tonic::{Code, Request, Response, Status};

use crate::upstream::{bind_on_runtime, runtime, Counter};

/// The generated messages and server of `legate.test.v1` (tests/proto).
#[allow(missing_docs, clippy::all, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("legate.test.v1");
}

pub use prost::Message;

/// The encoded `FileDescriptorSet` of tests/proto (`legate/test/v1/echo.proto`).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/legate_test_v1_descriptor.bin"));

/// The encoded `FileDescriptorSet` of the demo's service `legate.demo.v1.Echo`
/// (examples/demo-upstream/proto, with its imports), as compiled now: what
/// examples/demo-upstream/echo.pb, which plugins.yaml gives the grpc-json
/// plugin, must contain.
pub const DEMO_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/legate_demo_v1_descriptor.bin"));

/// Where [`FILE_DESCRIPTOR_SET`] is on disk (in the build's `OUT_DIR`), for a
/// plugin config that names a descriptor file.
pub fn file_descriptor_set_path() -> std::path::PathBuf {
    std::path::PathBuf::from(concat!(env!("OUT_DIR"), "/legate_test_v1_descriptor.bin"))
}

/// Frames `msg` as one gRPC (and gRPC-Web data) message: flag 0, big-endian
/// length, message.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    frame_with(0, msg)
}

/// Frames `payload` with flag byte `flag` (gRPC-Web trailers: `0x80`).
pub fn frame_with(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 5);
    v.push(flag);
    v.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    v.extend_from_slice(payload);
    v
}

/// Splits a body into `(flag, payload)` frames; `Err` names what is malformed.
pub fn unframe(mut body: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 5 {
            return Err(format!("{} trailing bytes, not a frame header", body.len()));
        }
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let Some(payload) = body.get(5..5 + len) else {
            return Err(format!(
                "frame of {len} bytes, {} available",
                body.len() - 5
            ));
        };
        out.push((body[0], payload.to_vec()));
        body = &body[5 + len..];
    }
    Ok(out)
}

/// Starts building a gRPC upstream.
pub fn grpc_upstream() -> GrpcUpstreamBuilder {
    GrpcUpstreamBuilder { _private: () }
}

/// Builder of the gRPC upstream (no options yet; kept for growth).
pub struct GrpcUpstreamBuilder {
    _private: (),
}

impl GrpcUpstreamBuilder {
    /// Binds 127.0.0.1:0 and serves `legate.test.v1.Echo` over HTTP/2 (prior
    /// knowledge, no TLS) on the harness's upstream runtime.
    pub async fn start(self) -> GrpcUpstreamHandle {
        let rt = runtime();
        let (listener, addr) =
            bind_on_runtime(SocketAddr::from(([127, 0, 0, 1], 0)), "gRPC upstream");
        let (stop, stop_rx) = watch::channel(false);
        let calls = Counter::default();
        let abandoned = Counter::default();
        rt.spawn(serve(listener, calls.clone(), abandoned.clone(), stop_rx));
        GrpcUpstreamHandle {
            addr,
            calls,
            abandoned,
            stop,
        }
    }
}

/// A running gRPC upstream; dropping it stops it.
pub struct GrpcUpstreamHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// RPCs handled.
    pub calls: Counter,
    /// `Say` calls with a message starting `slow` (answered after 5 s) whose
    /// client went away first.
    pub abandoned: Counter,
    stop: watch::Sender<bool>,
}

impl Drop for GrpcUpstreamHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn serve(
    listener: TcpListener,
    calls: Counter,
    abandoned: Counter,
    mut stop: watch::Receiver<bool>,
) {
    let svc = pb::echo_server::EchoServer::new(EchoService { calls, abandoned });
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let _ = tcp.set_nodelay(true);
        let svc = svc.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<Incoming>| {
                let mut svc = svc.clone();
                async move { svc.call(req).await }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

struct EchoService {
    calls: Counter,
    abandoned: Counter,
}

type CountStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::CountReply, Status>> + Send + 'static>>;

type ChatStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::SayReply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::echo_server::Echo for EchoService {
    async fn say(&self, req: Request<pb::SayRequest>) -> Result<Response<pb::SayReply>, Status> {
        self.calls.inc();
        if req.get_ref().message.starts_with("slow") {
            // Counts the call as abandoned unless it gets to answer: tonic
            // drops the handler when the client resets the stream.
            struct Watch(Counter, bool);
            impl Drop for Watch {
                fn drop(&mut self) {
                    if !self.1 {
                        self.0.inc();
                    }
                }
            }
            let mut w = Watch(self.abandoned.clone(), false);
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            w.1 = true;
        }
        let metadata = req
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        Ok(Response::new(pb::SayReply {
            message: req.into_inner().message,
            metadata,
        }))
    }

    type CountStream = CountStream;

    async fn count(&self, req: Request<pb::CountRequest>) -> Result<Response<CountStream>, Status> {
        self.calls.inc();
        let r = req.into_inner();
        let mut items: Vec<Result<pb::CountReply, Status>> = (0..r.count)
            .map(|i| {
                Ok(pb::CountReply {
                    n: r.from.saturating_add(i),
                })
            })
            .collect();
        if r.fail_code != 0 {
            items.push(Err(Status::new(Code::from(r.fail_code), r.fail_message)));
        }
        let delay = std::time::Duration::from_millis(u64::from(r.delay_ms));
        let items = futures_util::StreamExt::then(
            futures_util::stream::iter(items),
            move |item| async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                item
            },
        );
        Ok(Response::new(Box::pin(items)))
    }

    type ChatStream = ChatStream;

    async fn chat(
        &self,
        req: Request<tonic::Streaming<pb::SayRequest>>,
    ) -> Result<Response<ChatStream>, Status> {
        self.calls.inc();
        let replies = futures_util::StreamExt::map(req.into_inner(), |m| {
            m.map(|m| pb::SayReply {
                message: m.message,
                metadata: Default::default(),
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn collect(
        &self,
        req: Request<tonic::Streaming<pb::SayRequest>>,
    ) -> Result<Response<pb::SayReply>, Status> {
        self.calls.inc();
        let mut stream = req.into_inner();
        let mut messages = Vec::new();
        while let Some(m) = futures_util::StreamExt::next(&mut stream).await {
            messages.push(m?.message);
        }
        Ok(Response::new(pb::SayReply {
            message: messages.join(","),
            metadata: Default::default(),
        }))
    }

    async fn fail(&self, req: Request<pb::FailRequest>) -> Result<Response<pb::SayReply>, Status> {
        self.calls.inc();
        let r = req.into_inner();
        Err(Status::new(Code::from(r.code), r.message))
    }

    async fn reflect(
        &self,
        req: Request<pb::ReflectRequest>,
    ) -> Result<Response<pb::ReflectRequest>, Status> {
        self.calls.inc();
        Ok(Response::new(req.into_inner()))
    }
}

/// A gRPC message's bytes, encoded (no frame).
pub fn encode<M: Message>(m: &M) -> Bytes {
    Bytes::from(m.encode_to_vec())
}

/// One HTTP/1.1 or HTTP/2 connection to `addr` as a tower service, for tonic's
/// generated client (tonic's own transport is not built here).
#[derive(Clone)]
pub struct HyperConn {
    sender: ConnSender,
    authority: String,
}

#[derive(Clone)]
enum ConnSender {
    H1(std::sync::Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<ConnBody>>>),
    H2(hyper::client::conn::http2::SendRequest<ConnBody>),
}

type ConnBody = http_body_util::combinators::UnsyncBoxBody<Bytes, crate::BoxError>;

impl HyperConn {
    /// Connects to `addr` speaking `proto` (HTTP/2: prior knowledge).
    pub async fn connect(proto: crate::Proto, addr: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let io = TokioIo::new(tcp);
        let sender = match proto {
            crate::Proto::H1 => {
                let (s, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .unwrap_or_else(|e| panic!("HTTP/1.1 handshake: {e}"));
                tokio::spawn(conn);
                ConnSender::H1(std::sync::Arc::new(tokio::sync::Mutex::new(s)))
            }
            crate::Proto::H2 => {
                let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap_or_else(|e| panic!("HTTP/2 handshake: {e}"));
                tokio::spawn(conn);
                ConnSender::H2(s)
            }
        };
        HyperConn {
            sender,
            authority: addr.to_string(),
        }
    }
}

impl<B> Service<http::Request<B>> for HyperConn
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<crate::BoxError>,
{
    type Response = http::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<
        Box<
            dyn std::future::Future<Output = Result<http::Response<Incoming>, hyper::Error>> + Send,
        >,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use http_body_util::BodyExt as _;
        let mut req = req.map(|b| b.map_err(Into::into).boxed_unsync());
        match self.sender.clone() {
            ConnSender::H1(s) => {
                // Origin-form target and a Host header, as an HTTP/1.1 client sends.
                let path = req
                    .uri()
                    .path_and_query()
                    .map_or("/".to_string(), |p| p.to_string());
                *req.uri_mut() = path.parse().unwrap_or_default();
                if let Ok(host) = http::HeaderValue::from_str(&self.authority) {
                    req.headers_mut().insert(http::header::HOST, host);
                }
                *req.version_mut() = http::Version::HTTP_11;
                Box::pin(async move {
                    let mut s = s.lock().await;
                    s.ready().await?;
                    s.send_request(req).await
                })
            }
            ConnSender::H2(mut s) => {
                *req.version_mut() = http::Version::HTTP_2;
                Box::pin(async move {
                    s.ready().await?;
                    s.send_request(req).await
                })
            }
        }
    }
}

/// A gRPC-Web client of `legate.test.v1.Echo` (what a browser app built with
/// tonic-web sends: `application/grpc-web+proto`, trailers in the body) on one
/// connection to `addr` (e.g. Legate's listener) over `proto`.
pub async fn grpc_web_client(
    proto: crate::Proto,
    addr: SocketAddr,
) -> pb::echo_client::EchoClient<tonic_web::GrpcWebClientService<HyperConn>> {
    let conn = HyperConn::connect(proto, addr).await;
    let origin: http::Uri = format!("http://{addr}")
        .parse()
        .unwrap_or_else(|e| panic!("origin for {addr}: {e}"));
    pb::echo_client::EchoClient::with_origin(tonic_web::GrpcWebClientService::new(conn), origin)
}
