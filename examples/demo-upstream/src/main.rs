//! `legate-demo-upstream`: the small HTTP server that the README demo and the
//! benchmarks put behind Legate.
//!
//! It speaks HTTP/1.1 and cleartext HTTP/2 (h2c, prior knowledge) on the same
//! port; the protocol is detected from the connection preface by
//! [`hyper_util::server::conn::auto`].
//!
//! ```text
//! legate-demo-upstream --listen 127.0.0.1:8081 [--name NAME] [--threads N]
//! ```
//!
//! Endpoints (every response carries `x-upstream: NAME`):
//!
//! | path            | response                                                        |
//! |-----------------|-----------------------------------------------------------------|
//! | `GET /`         | `200`, `hello from NAME\n`                                      |
//! | `/echo`         | `200`, JSON: method, path, authority, query, headers, body, version, server |
//! | `/status/{code}`| that status (200..=999)                                         |
//! | `/delay/{ms}`   | sleeps `ms` milliseconds, then `200`                            |
//! | `/bytes/{n}`    | `200` with `n` bytes of `application/octet-stream`              |
//! | gRPC: a `POST` with `content-type: application/grpc[+…]` | a gRPC echo: the request's messages back, then `grpc-status: 0` in the trailers (the demo's gRPC-Web route) |
//! | anything else   | `200`, the same JSON as `/echo`, so proxied routes show what arrived |
//!
//! Once the socket is bound it prints `listening on ADDR` on stdout, which
//! scripts wait for. It exits cleanly on SIGINT or SIGTERM.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Either, Full, Limited, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Largest request body `/echo` buffers; larger ones get `413`.
const MAX_BODY: usize = 8 * 1024 * 1024;
/// Largest `/bytes/{n}`.
const MAX_BYTES: usize = 64 * 1024 * 1024;
/// Longest `/delay/{ms}`.
const MAX_DELAY_MS: u64 = 5 * 60 * 1000;

const USAGE: &str = "\
usage: legate-demo-upstream [--listen ADDR] [--name NAME] [--threads N]

  --listen ADDR   address to bind (default 127.0.0.1:8081; port 0 picks one)
  --name NAME     name reported in bodies and the x-upstream header (default demo-upstream)
  --threads N     tokio worker threads (default: the CPUs this process may run on)
";

/// Command-line options.
#[derive(Debug)]
struct Options {
    listen: SocketAddr,
    name: String,
    threads: Option<usize>,
}

/// What to do after parsing the command line.
enum Command {
    Run(Options),
    Help,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 8081).into();
    let mut name = String::from("demo-upstream");
    let mut threads = None;

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-l" | "--listen" => {
                let v = value()?;
                listen = v
                    .parse()
                    .map_err(|e| format!("--listen {v:?}: {e} (want IP:PORT)"))?;
            }
            "-n" | "--name" => {
                name = value()?;
                if HeaderValue::from_str(&name).is_err() || name.is_empty() {
                    return Err(format!(
                        "--name {name:?}: must be non-empty visible ASCII (it goes in a header)"
                    ));
                }
            }
            "--threads" => {
                let v = value()?;
                let n: usize = v.parse().map_err(|e| format!("--threads {v:?}: {e}"))?;
                if n == 0 {
                    return Err("--threads must be at least 1".into());
                }
                threads = Some(n);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Command::Run(Options {
        listen,
        name,
        threads,
    }))
}

/// Shared, precomputed per-server data, so the hot `GET /` path only clones
/// reference-counted buffers.
struct State {
    name: String,
    name_header: HeaderValue,
    hello: Bytes,
}

/// A whole body, or a gRPC answer's data and trailers.
type Body = Either<Full<Bytes>, GrpcBody>;
type GrpcBody =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;
type Resp = Response<Body>;

fn full(b: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(b.into()))
}

fn main() {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(opts)) => opts,
        Ok(Command::Help) => {
            print!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("legate-demo-upstream: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(opts) {
        eprintln!("legate-demo-upstream: {e}");
        std::process::exit(1);
    }
}

fn run(opts: Options) -> std::io::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = opts.threads {
        rt.worker_threads(n);
    }
    rt.build()?.block_on(serve(opts))
}

async fn serve(opts: Options) -> std::io::Result<()> {
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("bind {}: {e}", opts.listen)))?;
    let local = listener.local_addr()?;

    let name_header = HeaderValue::from_str(&opts.name)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let state = Arc::new(State {
        hello: Bytes::from(format!("hello from {}\n", opts.name)),
        name: opts.name,
        name_header,
    });

    // Scripts wait for this line, so make sure it leaves the process now.
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {local}")?;
    out.flush()?;
    drop(out);

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let builder = auto::Builder::new(TokioExecutor::new());

    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Typically EMFILE under heavy load: back off instead of spinning.
                    eprintln!("legate-demo-upstream: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small responses: do not let Nagle hold them back.
        if let Err(e) = stream.set_nodelay(true) {
            eprintln!("legate-demo-upstream: set TCP_NODELAY: {e}");
        }
        let state = Arc::clone(&state);
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(Arc::clone(&state), req));
            // Errors here are peers going away mid-request; nothing to do.
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let path = req.uri().path();
    let mut resp = if is_grpc(&req) {
        grpc_echo(req).await
    } else if path == "/" && req.method() == Method::GET {
        text(StatusCode::OK, state.hello.clone())
    } else if path == "/echo" {
        echo(&state, req).await
    } else if let Some(code) = path.strip_prefix("/status/") {
        status(code)
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        delay(ms).await
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        bytes(n)
    } else {
        echo(&state, req).await
    };
    resp.headers_mut().insert(
        HeaderName::from_static("x-upstream"),
        state.name_header.clone(),
    );
    Ok(resp)
}

/// `POST` with `application/grpc` or `application/grpc+CODEC` (not gRPC-Web).
fn is_grpc(req: &Request<Incoming>) -> bool {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    req.method() == Method::POST
        && (ct == "application/grpc" || ct.starts_with("application/grpc+"))
}

/// Echoes the request's gRPC messages (already length-prefixed on the wire, so
/// the body is sent back as it came) and ends with `grpc-status: 0`.
async fn grpc_echo(req: Request<Incoming>) -> Resp {
    let (status, message, data) = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => ("0", None, c.to_bytes()),
        Err(e) => ("8", Some(format!("reading the request: {e}")), Bytes::new()),
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    if let Some(m) = message.and_then(|m| HeaderValue::from_str(&m).ok()) {
        trailers.insert("grpc-message", m);
    }
    let frames = vec![Ok(Frame::data(data)), Ok(Frame::trailers(trailers))];
    let mut resp = Response::new(Either::Right(StreamBody::new(futures_util::stream::iter(
        frames,
    ))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn status(code: &str) -> Resp {
    let Some(status) = code
        .parse::<u16>()
        .ok()
        .filter(|c| *c >= 200)
        .and_then(|c| StatusCode::from_u16(c).ok())
    else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("bad status {code:?}: want an integer in 200..=999\n"),
        );
    };
    // 204 and 304 must not carry a body.
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        let mut resp = Response::new(full(Bytes::new()));
        *resp.status_mut() = status;
        return resp;
    }
    text(status, format!("status {}\n", status.as_u16()))
}

async fn delay(ms: &str) -> Resp {
    let Some(ms) = ms.parse::<u64>().ok().filter(|ms| *ms <= MAX_DELAY_MS) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("bad delay {ms:?}: want milliseconds in 0..={MAX_DELAY_MS}\n"),
        );
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    text(StatusCode::OK, format!("delayed {ms} ms\n"))
}

fn bytes(n: &str) -> Resp {
    let Some(n) = n.parse::<usize>().ok().filter(|n| *n <= MAX_BYTES) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("bad size {n:?}: want a byte count in 0..={MAX_BYTES}\n"),
        );
    };
    let mut resp = Response::new(full(vec![b'x'; n]));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// Describes the request as JSON, so one can see what the proxy forwarded.
async fn echo(state: &State, req: Request<Incoming>) -> Resp {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let status = if e.is::<http_body_util::LengthLimitError>() {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            return text(status, format!("reading request body: {e}\n"));
        }
    };

    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        // Set for HTTP/2 (`:authority`) and absolute-form HTTP/1 targets.
        "authority": parts.uri.authority().map(|a| a.as_str()),
        "query": parts.uri.query(),
        "headers": headers_json(&parts.headers),
        "body": String::from_utf8_lossy(&body),
        "version": version_str(parts.version),
        "server": state.name,
    });
    let mut out = json.to_string();
    out.push('\n');

    let mut resp = Response::new(full(out));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Headers as a JSON object; repeated headers are joined with `", "`.
fn headers_json(headers: &HeaderMap) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for name in headers.keys() {
        let joined = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect::<Vec<_>>()
            .join(", ");
        map.insert(name.as_str().to_owned(), serde_json::Value::String(joined));
    }
    serde_json::Value::Object(map)
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_flags() {
        let Command::Run(o) = parse_args(args(&[
            "--listen",
            "127.0.0.1:9000",
            "--name=app-v2",
            "--threads",
            "1",
        ]))
        .unwrap() else {
            panic!("expected Run");
        };
        assert_eq!(o.listen, "127.0.0.1:9000".parse::<SocketAddr>().unwrap());
        assert_eq!(o.name, "app-v2");
        assert_eq!(o.threads, Some(1));
    }

    #[test]
    fn defaults_and_errors() {
        let Command::Run(o) = parse_args(args(&[])).unwrap() else {
            panic!("expected Run");
        };
        assert_eq!(o.listen.port(), 8081);
        assert_eq!(o.name, "demo-upstream");
        assert!(parse_args(args(&["--listen"])).is_err());
        assert!(parse_args(args(&["--listen", "nope"])).is_err());
        assert!(parse_args(args(&["--name", "bad\nname"])).is_err());
        assert!(parse_args(args(&["--threads", "0"])).is_err());
        assert!(parse_args(args(&["--bogus"])).is_err());
        assert!(matches!(parse_args(args(&["-h"])), Ok(Command::Help)));
    }

    #[test]
    fn status_codes() {
        assert_eq!(status("418").status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(status("204").status(), StatusCode::NO_CONTENT);
        assert_eq!(status("100").status(), StatusCode::BAD_REQUEST);
        assert_eq!(status("abc").status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn repeated_headers_are_joined() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.append("host", HeaderValue::from_static("example"));
        let j = headers_json(&h);
        assert_eq!(j["x-a"], "1, 2");
        assert_eq!(j["host"], "example");
    }
}
