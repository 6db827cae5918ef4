//! WebSocket over HTTP/2 (RFC 8441 extended CONNECT, `http.extended_connect`):
//! an HTTP/2 client's `CONNECT` with `:protocol: websocket` is tunnelled to an
//! HTTP/1.1 upstream as a WebSocket upgrade, with a key Legate makes and an
//! accept it checks; the stream is the tunnel, beside the connection's other
//! streams, with its own idle timeout. Real sockets, a real HTTP/2 client
//! (hyper's), a raw HTTP/1.1 upstream that answers as a WebSocket server.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use legate_tests::*;

type Empty = http_body_util::Empty<Bytes>;

/// `simple_config` with `http.extended_connect: true` (and `extra` lines in
/// the listener's `http`, indented by 6).
fn config(up: std::net::SocketAddr, extra: &str) -> String {
    simple_config(&[up]).replacen(
        "      routes: main\n",
        &format!("      routes: main\n      extended_connect: true\n{extra}"),
        1,
    )
}

/// `cfg` with `route` (YAML list items indented by 10) before its catch-all route.
fn with_route(cfg: &str, route: &str) -> String {
    let catch_all = "          - match:\n              prefix: /\n";
    assert!(cfg.contains(catch_all));
    cfg.replacen(catch_all, &format!("{route}{catch_all}"), 1)
}

/// The access-log line of the tunnel to `path`, once it is written.
async fn tunnel_line(log: &std::path::Path, path: &str) -> Value {
    eventually(HANG_GUARD, "the tunnel's line", || async {
        let text = std::fs::read_to_string(log).ok()?;
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|v| v["path"] == path)
    })
    .await
}

/// [`config`] with `drain_timeout: 300ms`, an access log at `log`, and the
/// listener `limit` (one `limits` key: value).
fn logged_config(up: std::net::SocketAddr, log: &std::path::Path, limit: &str) -> String {
    config(up, "")
        .replacen(
            "version: 1\n",
            &format!(
                "version: 1\ndrain_timeout: 300ms\naccess_log:\n  path: {}\n",
                log.display()
            ),
            1,
        )
        .replace(
            "      extended_connect: true\n",
            &format!("      extended_connect: true\n    limits:\n      {limit}\n"),
        )
}

/// An HTTP/2 (prior knowledge) connection to `addr`.
async fn h2(addr: std::net::SocketAddr) -> SendRequest<Empty> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

/// An extended CONNECT for `protocol` on `path`, as a browser opens a
/// WebSocket over HTTP/2 (RFC 8441 §5: no key, `sec-websocket-version: 13`).
fn connect(path: &str, protocol: &'static str) -> Request<Empty> {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://ws.example{path}"))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "chat")
        .body(Empty::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static(protocol));
    req
}

/// Sends `req` and, on a 2xx, opens its tunnel.
async fn open(
    send: &mut SendRequest<Empty>,
    req: Request<Empty>,
) -> (
    http::StatusCode,
    http::HeaderMap,
    Option<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
) {
    let resp = tokio::time::timeout(HANG_GUARD, send.send_request(req))
        .await
        .expect("an answer to the CONNECT")
        .unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    if !status.is_success() {
        return (status, headers, None);
    }
    let io = hyper::upgrade::on(resp).await.unwrap();
    (status, headers, Some(hyper_util::rt::TokioIo::new(io)))
}

async fn echo(io: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin), data: &[u8]) {
    io.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(HANG_GUARD, io.read_exact(&mut back))
        .await
        .expect("the echo")
        .unwrap();
    assert_eq!(checksum(&back), checksum(data));
}

/// The listener advertises `SETTINGS_ENABLE_CONNECT_PROTOCOL`; the stream
/// opens with a 200 (no `101`, no switch headers), bytes flow both ways
/// (more than a window's worth), the upstream got an HTTP/1.1 WebSocket
/// upgrade with a key Legate made (and the client's version and
/// subprotocol), the same connection serves a plain request and a second
/// tunnel meanwhile, and the tunnel's line is written when it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_h2_is_tunnelled_to_an_http1_upstream() {
    let up = websocket_echo_server().await;
    let plain = upstream().start().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let cfg = config(up.addr, "").replacen(
        "version: 1\n",
        &format!("version: 1\naccess_log:\n  path: {}\n", log.display()),
        1,
    );
    let cfg = with_route(
        &cfg,
        "          - match: { prefix: /plain }\n            cluster: plain\n",
    );
    let cfg = with_cluster(&cfg, "plain", plain.addr);
    let lg = legate().config(&cfg).start();
    let mut send = h2(lg.addr("web")).await;

    let (status, headers, io) = open(&mut send, connect("/chat?room=1", "websocket")).await;
    assert_eq!(status, 200);
    for h in [
        "upgrade",
        "connection",
        "sec-websocket-accept",
        "content-length",
        "x-hop",
    ] {
        assert!(headers.get(h).is_none(), "{h} on the 200: {headers:?}");
    }
    let mut io = io.unwrap();
    echo(&mut io, b"hello").await;
    echo(&mut io, &pattern_bytes(256 * 1024)).await;

    let seen = up.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(seen.starts_with("get /chat?room=1 http/1.1\r\n"), "{seen}");
    assert!(seen.contains("\r\nupgrade: websocket\r\n"), "{seen}");
    assert!(seen.contains("\r\nconnection: upgrade\r\n"), "{seen}");
    assert!(seen.contains("\r\nsec-websocket-version: 13\r\n"), "{seen}");
    assert!(
        seen.contains("\r\nsec-websocket-protocol: chat\r\n"),
        "{seen}"
    );
    assert!(seen.contains("\r\nhost: ws.example\r\n"), "{seen}");
    let key = seen
        .lines()
        .find_map(|l| l.strip_prefix("sec-websocket-key: "))
        .expect("a key for the upstream");
    assert_eq!(key.len(), 24, "16 bytes in base64: {key}");

    // The connection's other streams go on meanwhile: a request, a second tunnel.
    let resp = send
        .send_request(
            Request::get("http://ws.example/plain")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, _, io2) = open(&mut send, connect("/other", "websocket")).await;
    assert_eq!(status, 200);
    let mut io2 = io2.unwrap();
    echo(&mut io2, b"second").await;
    echo(&mut io, b"first again").await;
    let keys: Vec<String> = up
        .heads
        .lock()
        .unwrap()
        .iter()
        .filter_map(|h| {
            h.to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("sec-websocket-key: ").map(str::to_string))
        })
        .collect();
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1], "a fresh key per upgrade");

    // Closing the client's stream closes the upstream side, and the
    // exchange is logged then, with the tunnel's bytes.
    io.shutdown().await.unwrap();
    drop(io);
    eventually(HANG_GUARD, "upstream side of the tunnel closed", || async {
        (up.closed.get() >= 1).then_some(())
    })
    .await;
    let line = tunnel_line(&log, "/chat?room=1").await;
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["protocol"], "HTTP/2.0", "{line}");
    assert_eq!(line["cause"], Value::Null, "{line}");
    assert!(
        line["bytes_received"].as_u64().unwrap() >= 5 + 256 * 1024,
        "{line}"
    );
    assert!(
        line["bytes_sent"].as_u64().unwrap() >= 5 + 256 * 1024,
        "{line}"
    );
    echo(&mut io2, b"still open").await;
    lg.assert_stat(
        r#"legate_listener_upgrades_refused_total{listener="web"}"#,
        0.0,
    )
    .await;
}

/// An upstream that does not prove it speaks WebSocket (a `101` whose
/// `Sec-WebSocket-Accept` is not the key's) is a 502, and so is one that
/// answers 200 without switching (a 2xx would open the client's tunnel to
/// nothing); any other answer (a 404) is passed on. A `:protocol` the
/// listener does not allow is refused with 403 before the upstream, and a
/// route's `direct_response` of 200 cannot pass for an open tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_a_websocket_is_not_a_tunnel() {
    // Made-up accept: `accept-KEY`.
    let fake = upgrade_echo_server().await;
    let lg = legate().config(&config(fake.addr, "")).start();
    let mut send = h2(lg.addr("web")).await;
    let (status, _, _) = open(&mut send, connect("/chat", "websocket")).await;
    assert_eq!(status, 502);
    assert_eq!(
        fake.heads.lock().unwrap().len(),
        1,
        "the upstream was asked"
    );
    let (status, _, _) = open(&mut send, connect("/chat", "custom-proto")).await;
    assert_eq!(status, 403);
    assert_eq!(
        fake.heads.lock().unwrap().len(),
        1,
        "a refused type went upstream"
    );
    lg.assert_stat(
        r#"legate_listener_upgrades_refused_total{listener="web"}"#,
        1.0,
    )
    .await;

    let up = upstream()
        .route("/page", |_req| async {
            Response::new(Full::new(Bytes::from("a page")))
        })
        .route("/missing", |_req| async {
            let mut r = Response::new(Full::new(Bytes::from("no such page")));
            *r.status_mut() = http::StatusCode::NOT_FOUND;
            r
        })
        .start()
        .await;
    let cfg = with_route(
        &config(up.addr, ""),
        "          - match: { prefix: /direct }\n            direct_response: { status: 200, body: hi }\n",
    );
    let lg = legate().config(&cfg).start();
    let mut send = h2(lg.addr("web")).await;
    let (status, _, _) = open(&mut send, connect("/page", "websocket")).await;
    assert_eq!(status, 502, "a 200 without a switch");
    let (status, _, _) = open(&mut send, connect("/missing", "websocket")).await;
    assert_eq!(status, 404);
    let (status, _, _) = open(&mut send, connect("/direct", "websocket")).await;
    assert_eq!(status, 502, "a direct 200");
    lg.assert_stat(
        r#"legate_listener_upgrades_failed_total{listener="web"}"#,
        2.0,
    )
    .await;
    // The connection still serves.
    let resp = send
        .send_request(
            Request::get("http://ws.example/page")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// A quiet tunnel is cut after the route's `idle_timeout` (else the
/// listener's), bytes keep it open, and its connection's other streams go
/// on: the idle timeout is the stream's, not the connection's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_tunnel_idles_out_alone() {
    let up = websocket_echo_server().await;
    let cfg = with_route(
        &config(up.addr, ""),
        "          - match: { prefix: /quiet }\n            cluster: backend\n            idle_timeout: 1s\n",
    );
    let lg = legate().config(&cfg).start();
    let mut send = h2(lg.addr("web")).await;
    let (_, _, io) = open(&mut send, connect("/quiet", "websocket")).await;
    let mut io = io.unwrap();
    let (_, _, other) = open(&mut send, connect("/busy", "websocket")).await;
    let mut other = other.unwrap();
    // Bytes keep it alive past the idle timeout (each pause well inside it).
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        echo(&mut io, b"ping").await;
    }
    // Quiet: cut, and the upstream side with it.
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(HANG_GUARD, io.read(&mut buf))
        .await
        .expect("the idle tunnel ends");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    eventually(HANG_GUARD, "upstream side of the tunnel closed", || async {
        (up.closed.get() == 1).then_some(())
    })
    .await;
    // The other tunnel (the listener's 60s) and the connection live on.
    echo(&mut other, b"still here").await;
}

/// A reload that replaces the listener closes its HTTP/2 tunnels at the
/// drain timeout, as it does HTTP/1.1 ones, logged with cause
/// `drain_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_closes_an_h2_tunnel_of_the_replaced_listener() {
    let up = websocket_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let cfg = |max: &str| logged_config(up.addr, &log, &format!("max_connections: {max}"));
    let lg = legate().config(&cfg("100")).from_file().start();
    let mut send = h2(lg.addr("web")).await;
    let (status, _, io) = open(&mut send, connect("/chat", "websocket")).await;
    assert_eq!(status, 200);
    let mut io = io.unwrap();
    echo(&mut io, b"before").await;
    lg.reload_ok(&cfg("200")).await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(HANG_GUARD, io.read(&mut buf))
        .await
        .expect("the tunnel of the replaced listener closes");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    eventually(HANG_GUARD, "upstream side of the tunnel closed", || async {
        (up.closed.get() == 1).then_some(())
    })
    .await;
    let line = tunnel_line(&log, "/chat").await;
    assert_eq!(line["cause"], "drain_timeout", "{line}");
}

/// The connection's `max_connection_duration` cuts its HTTP/2 tunnels
/// `drain_timeout` later, as it does an HTTP/1.1 tunnel (the connection
/// counts the tunnel in flight and would not close under it), logged with
/// cause `max_connection_duration`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_duration_bounds_an_h2_tunnel() {
    let up = websocket_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let cfg = logged_config(up.addr, &log, "max_connection_duration: 1s");
    let lg = legate().config(&cfg).start();
    let mut send = h2(lg.addr("web")).await;
    let (status, _, io) = open(&mut send, connect("/chat", "websocket")).await;
    assert_eq!(status, 200);
    let mut io = io.unwrap();
    echo(&mut io, b"before").await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(HANG_GUARD, io.read(&mut buf))
        .await
        .expect("the tunnel outliving its connection's duration closes");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let line = tunnel_line(&log, "/chat").await;
    assert_eq!(line["cause"], "max_connection_duration", "{line}");
}
