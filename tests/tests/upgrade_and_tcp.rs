//! Connection-level proxying: HTTP/1.1 Upgrade (WebSocket) passthrough and TCP proxy
//! listeners (bytes both ways, idle timeout, byte counters as the bytes move, a
//! session's access-log line: success, upstream closed, refused, overflow,
//! idle timeout).

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use legate_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passthrough() {
    let up = upgrade_echo_server().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/chat?room=1").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(
        lower.contains("sec-websocket-accept: accept-dghlihnhbxbszsbub25jzq=="),
        "{head}"
    );

    // The upstream saw the upgrade request with its hop-by-hop upgrade headers.
    let seen = up.heads.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let seen = seen[0].to_ascii_lowercase();
    assert!(seen.starts_with("get /chat?room=1 http/1.1"), "{seen}");
    assert!(seen.contains("upgrade: websocket"), "{seen}");
    assert!(
        seen.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="),
        "{seen}"
    );

    // Bytes flow both ways after the switch, including more than one buffer's worth.
    c.write(b"hello").await;
    assert_eq!(c.read_exact(5, HANG_GUARD).await.unwrap(), b"hello");
    let big = pattern_bytes(256 * 1024);
    c.write(&big).await;
    let back = c.read_exact(big.len(), HANG_GUARD).await.unwrap();
    assert_eq!(checksum(&back), checksum(&big));
    assert_eq!(up.bytes.get(), 5 + big.len());

    // Closing the client closes the upstream side.
    drop(c);
    eventually(HANG_GUARD, "upstream side of the tunnel closed", || async {
        (up.closed.get() == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_refused_by_upstream_is_a_normal_response() {
    let up = upgrade_echo_server().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let out = raw(
        lg.addr("web"),
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        raw_status(&out),
        Some(400),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

/// A WebSocket handshake whose `Sec-WebSocket-Key` the upstream must not see.
const WS_HANDSHAKE: &[u8] = b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// What an allowed upgrade whose upstream connection is HTTP/2 gets: 502
/// `upgrade_failed`, the connection closed, counted; the upstream sees nothing
/// (before, HTTP/2 dropped the `Upgrade` and the handshake went as a plain GET,
/// answered 200).
async fn assert_upgrade_failed(lg: &LegateHandle, up: &UpstreamHandle, n: f64) {
    // `raw` reads to the close: Legate closes after this answer.
    let out = raw(lg.addr("web"), WS_HANDSHAKE).await;
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert_eq!(raw_status(&out), Some(502), "{text}");
    assert!(text.ends_with("\r\n\r\nupgrade_failed\n"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert_eq!(up.requests.get(), 0, "the upstream got the request");
    lg.assert_stat(
        r#"legate_listener_upgrades_failed_total{listener="web"}"#,
        n,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_to_an_h2_cluster_fails_explicitly() {
    let up = upstream().h2().start().await;
    let lg = legate()
        .config(&simple_config_with(&[up.addr], "", "    protocol: h2\n"))
        .start();
    assert_upgrade_failed(&lg, &up, 1.0).await;
    // Not the endpoint's failure, and not an upstream connection either.
    assert_eq!(up.connections.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_over_an_auto_cluster_that_negotiated_h2_fails_explicitly() {
    let ca = Ca::new("upstream CA");
    let up = upstream()
        .tls(ca.server(&["backend.internal"]))
        .start()
        .await;
    let tls = format!(
        "    protocol: auto\n    tls:\n      sni: backend.internal\n      ca: {}\n",
        ca.cert_path.display()
    );
    let lg = legate()
        .config(&simple_config_with(&[up.addr], "", &tls))
        .start();
    assert_upgrade_failed(&lg, &up, 1.0).await;
    // A second one, on the pooled h2 connection.
    assert_upgrade_failed(&lg, &up, 2.0).await;
    // The connection still serves plain requests (ALPN chose h2).
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c.get("/").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().version, "HTTP/2.0");
}

fn tcp_config(cluster_addr: std::net::SocketAddr, idle: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: tcp
    address: 127.0.0.1:0
    tcp:
      cluster: echo
      idle_timeout: {idle}
clusters:
  - name: echo
    endpoints:
      - address: {cluster_addr}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_moves_bytes_both_ways() {
    let echo = tcp_echo_server().await;
    let lg = legate().config(&tcp_config(echo.addr, "1h")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"ping").await;
    assert_eq!(c.read_exact(4, HANG_GUARD).await.unwrap(), b"ping");
    let big = pattern_bytes(1 << 20);
    c.write(&big).await;
    let back = c.read_exact(big.len(), HANG_GUARD).await.unwrap();
    assert_eq!(checksum(&back), checksum(&big));
    let total = (4 + big.len()) as f64;
    // Half-close from the client: the proxy passes the FIN on and closes after the
    // upstream does.
    c.stream.shutdown().await.ok();
    let (rest, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(rest.is_empty());
    assert!(closed, "proxy did not close after both sides finished");
    lg.assert_stat(r#"legate_listener_rx_bytes_total{listener="tcp"}"#, total)
        .await;
    lg.assert_stat(r#"legate_listener_tx_bytes_total{listener="tcp"}"#, total)
        .await;
    lg.assert_stat(r#"legate_listener_connections_total{listener="tcp"}"#, 1.0)
        .await;
    lg.assert_stat(r#"legate_listener_connections_active{listener="tcp"}"#, 0.0)
        .await;
    assert_eq!(echo.connections.get(), 1);
    assert_eq!(echo.bytes.get(), 4 + big.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_idle_timeout_closes_both_sides() {
    let echo = tcp_echo_server().await;
    // A wide margin between the pause below and the timeout: a loaded machine
    // must not stall the test past it.
    let lg = legate().config(&tcp_config(echo.addr, "1s")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"x").await;
    assert_eq!(c.read_exact(1, HANG_GUARD).await.unwrap(), b"x");
    // Activity resets the timer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.write(b"y").await;
    assert_eq!(c.read_exact(1, HANG_GUARD).await.unwrap(), b"y");
    let t = Instant::now();
    // Nothing but the idle timeout closes it: neither side closes.
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    let idle = t.elapsed();
    assert!(closed, "idle connection not closed");
    assert!(idle >= Duration::from_millis(900), "closed after {idle:?}");
    eventually(HANG_GUARD, "upstream connection closed", || async {
        (echo.closed.get() == 1).then_some(())
    })
    .await;
    lg.assert_stat(r#"legate_listener_connections_active{listener="tcp"}"#, 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_upstream_down_closes_the_client() {
    let dead = closed_port_addr();
    let lg = legate().config(&tcp_config(dead, "1h")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"anyone?").await;
    let (out, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "client left hanging");
    assert!(out.is_empty());
    lg.assert_stat(
        r#"legate_cluster_upstream_cx_connect_fail{cluster="echo"}"#,
        1.0,
    )
    .await;
}

/// An upgraded connection (WebSocket tunnel) stays counted on its listener
/// (the active gauge, `max_connections`, drain) while it lives, and closes
/// after the listener's `idle_timeout` without a byte either way: it was
/// uncounted from the 101 on, and had no timeout at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_is_counted_and_idles_out() {
    let up = upgrade_echo_server().await;
    let config = simple_config(&[up.addr]).replace(
        "    http:\n      routes: main\n",
        "    http:\n      routes: main\n    limits:\n      idle_timeout: 1s\n",
    );
    let lg = legate().config(&config).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    // Bytes keep it alive past the idle timeout (each pause well inside it, so
    // a loaded machine cannot stretch one past it).
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.write(b"ping").await;
        assert_eq!(c.read_exact(4, HANG_GUARD).await.unwrap(), b"ping");
    }
    lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 1.0)
        .await;
    // Quiet: closed, both sides.
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "an idle tunnel stayed open");
    eventually(HANG_GUARD, "upstream side of the tunnel closed", || async {
        (up.closed.get() == 1).then_some(())
    })
    .await;
    lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 0.0)
        .await;
}

/// A route's `idle_timeout` (Envoy's route `idle_timeout`, the knob Envoy
/// users turn for quiet WebSockets) bounds the tunnels of its upgrades in
/// place of the listener's `limits.idle_timeout`: it was ignored, so a
/// WebSocket route could neither outlive the listener's keep-alive idle time
/// (60s) nor be cut sooner. Here the route's 1s closes a tunnel the
/// listener's 60s would keep, logged with cause `idle_timeout`; a route
/// without one keeps the listener's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_idle_timeout_bounds_its_tunnels() {
    let up = upgrade_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let config = web_config(
        "          - match: { prefix: /quick }\n            cluster: backend\n            idle_timeout: 1s\n          - cluster: backend\n",
        &format!("  - name: backend\n    endpoints:\n      - address: {}\n", up.addr),
    ) + &format!("access_log:\n  path: {}\n  flush_interval: 10ms\n", log.display());
    let lg = legate().config(&config).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/quick").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    c.write(b"ping").await;
    assert_eq!(c.read_exact(4, HANG_GUARD).await.unwrap(), b"ping");
    // Quiet: closed by the route's 1s, long before the listener's 60s.
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "the route's idle_timeout did not close the tunnel");
    eventually(HANG_GUARD, "upstream side of the tunnel closed", || async {
        (up.closed.get() == 1).then_some(())
    })
    .await;
    let lines = access_log_until(&log, "the tunnel's line", |l| !l.is_empty()).await;
    let line = &lines[0];
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["cause"], "idle_timeout", "{line}");
    lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 0.0)
        .await;

    // Another route's tunnel is bounded by the listener's (60s): still open
    // after the other one's bound has passed twice.
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/other").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.write(b"pong").await;
    assert_eq!(c.read_exact(4, HANG_GUARD).await.unwrap(), b"pong");
}

/// `limits.max_connection_duration` bounds an upgraded connection too: past
/// it the tunnel has `drain_timeout` left (Envoy force-closes a connection
/// with an active stream at the end of the drain period the limit starts),
/// and is logged with cause `max_connection_duration`. A WebSocket outlived
/// the limit forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_duration_bounds_a_tunnel() {
    let up = upgrade_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let config = simple_config(&[up.addr])
        .replace(
            "    http:\n      routes: main\n",
            "    http:\n      routes: main\n    limits:\n      max_connection_duration: 300ms\n",
        )
        .replacen("version: 1\n", "version: 1\ndrain_timeout: 300ms\n", 1)
        + &format!(
            "access_log:\n  path: {}\n  flush_interval: 10ms\n",
            log.display()
        );
    let lg = legate().config(&config).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    echoes(&mut c).await;
    // The listener's idle timeout (60s) is not what closes it.
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "the tunnel outlived max_connection_duration");
    let lines = access_log_until(&log, "the tunnel's line", |l| !l.is_empty()).await;
    let line = &lines[0];
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["cause"], "max_connection_duration", "{line}");
    lg.assert_stat(
        r#"legate_listener_max_duration_reached_total{listener="web"}"#,
        1.0,
    )
    .await;
}

each_proto!(
    /// An upstream's `426 Upgrade Required` keeps its `Upgrade` (with
    /// `Connection: upgrade`) for an HTTP/1.1 client, as RFC 9110 §15.5.22
    /// wants: hop-by-hop, it was stripped, and the 426 named no protocol to
    /// switch to. An HTTP/2 client, whose protocol has no `Upgrade`, gets none.
    async fn a_426_keeps_its_upgrade_header(proto) {
        let up = upstream()
            .route("/legacy", |_req| async {
                let mut r = Response::new(Full::new(Bytes::from_static(b"use TLS")));
                *r.status_mut() = StatusCode::UPGRADE_REQUIRED;
                let h = r.headers_mut();
                h.insert("upgrade", HeaderValue::from_static("TLS/1.2, HTTP/1.1"));
                h.insert("connection", HeaderValue::from_static("Upgrade"));
                r
            })
            .start()
            .await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/legacy").send().await;
        assert_eq!(r.status, 426);
        assert_eq!(r.text(), "use TLS");
        match proto {
            Proto::H1 => {
                assert_eq!(r.header("upgrade"), Some("TLS/1.2, HTTP/1.1"));
                assert_eq!(r.header("connection"), Some("upgrade"));
            }
            Proto::H2 => assert_eq!(r.header("upgrade"), None),
        }
        // The connection still serves.
        assert_eq!(c.get("/next").send().await.status, 200);
    }
);

/// The upstream side of a WebSocket tunnel stays counted until the tunnel
/// closes, as Envoy's: the connection (`upstream_cx_active`, the endpoint's
/// `cx_active`) and the attempt (`upstream_rq_active`, the endpoint's
/// `rq_active`, what `least_request` reads). Both were dropped at the 101 (the
/// connection task ended when hyper handed its socket over; the 101's empty
/// body ended the attempt). HTTP/1.1 only: upgrades are HTTP/1.1's (HTTP/2
/// extended CONNECT is not offered, see `h2_extended_connect_is_not_offered`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_counts_as_an_upstream_connection_and_request_until_it_closes() {
    let up = upgrade_echo_server().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let gauges = [
        r#"legate_cluster_upstream_cx_active{cluster="backend"}"#.to_string(),
        r#"legate_cluster_upstream_rq_active{cluster="backend"}"#.to_string(),
        format!(
            r#"legate_endpoint_cx_active{{cluster="backend",endpoint="{}"}}"#,
            up.addr
        ),
        format!(
            r#"legate_endpoint_rq_active{{cluster="backend",endpoint="{}"}}"#,
            up.addr
        ),
    ];
    let mut tunnels = Vec::new();
    for _ in 0..2 {
        let mut c = RawConn::connect(lg.addr("web")).await;
        let head = c.websocket_handshake("/chat").await;
        assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
        c.write(b"ping").await;
        assert_eq!(c.read_exact(4, HANG_GUARD).await.unwrap(), b"ping");
        tunnels.push(c);
    }
    for g in &gauges {
        lg.assert_stat(g, 2.0).await;
    }
    drop(tunnels);
    eventually(
        HANG_GUARD,
        "upstream sides of the tunnels closed",
        || async { (up.closed.get() == 2).then_some(()) },
    )
    .await;
    for g in &gauges {
        lg.assert_stat(g, 0.0).await;
    }
}

/// A cluster's `max_connections` and `max_requests` limit WebSocket tunnels:
/// with a limit of 1, a second WebSocket while one is open is refused with
/// 503 (it was let through: the first stopped counting at its 101), and one
/// after the first closed gets through. HTTP/1.1 only (upgrades are).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breakers_limit_open_tunnels() {
    for (limit, overflow) in [
        ("max_connections", "upstream_cx_overflow"),
        ("max_requests", "upstream_rq_pending_overflow"),
    ] {
        let up = upgrade_echo_server().await;
        let config = simple_config_with(
            &[up.addr],
            "",
            &format!("    circuit_breakers: {{ {limit}: 1 }}\n"),
        );
        let lg = legate().config(&config).start();
        let mut first = RawConn::connect(lg.addr("web")).await;
        let head = first.websocket_handshake("/chat").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{limit}: no 101: {head}");
        first.write(b"ping").await;
        assert_eq!(first.read_exact(4, HANG_GUARD).await.unwrap(), b"ping");

        let mut second = RawConn::connect(lg.addr("web")).await;
        let head = second.websocket_handshake("/chat").await;
        assert!(
            head.starts_with("HTTP/1.1 503"),
            "{limit}: a second tunnel was let through: {head}"
        );
        lg.assert_stat(
            &format!(r#"legate_cluster_{overflow}{{cluster="backend"}}"#),
            1.0,
        )
        .await;
        assert_eq!(up.connections.get(), 1, "{limit}");
        if limit == "max_connections" {
            // A plain request does not wait over `max_connections` for a
            // connection that is a tunnel: 503 at once (it waited for the
            // route timeout, as a pending request).
            let mut c = client(Proto::H1, lg.addr("web")).await;
            let r = c.get("/plain").send().await;
            assert_eq!(r.status, 503, "{}", r.text());
            assert_eq!(r.header("x-legate-overloaded"), Some("true"));
        }

        drop(first);
        eventually(HANG_GUARD, "upstream side of the tunnel closed", || async {
            (up.closed.get() == 1).then_some(())
        })
        .await;
        lg.assert_stat(
            r#"legate_cluster_upstream_rq_active{cluster="backend"}"#,
            0.0,
        )
        .await;
        lg.assert_stat(
            r#"legate_cluster_upstream_cx_active{cluster="backend"}"#,
            0.0,
        )
        .await;
        let mut third = RawConn::connect(lg.addr("web")).await;
        let head = third.websocket_handshake("/chat").await;
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "{limit}: no 101 after the close: {head}"
        );
    }
}

/// A tunnel where only the upstream talks (server push over a WebSocket) is
/// not idle: the bytes it sends the client are activity, however long the
/// client stays silent. (A review suspected the idle timer counted only what
/// the client sends; it counts bytes both ways on the client's socket.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_only_the_upstream_talks_on_stays_open() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pushes = 10;
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request head did not arrive");
            head.extend_from_slice(&buf[..n]);
        }
        tcp.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
            .await
            .unwrap();
        // A push every 250ms against a 1.5s idle timeout (a wide margin for a
        // loaded machine): 2.5s in all.
        for _ in 0..pushes {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if tcp.write_all(b"push").await.is_err() {
                return;
            }
        }
        let _ = tcp.read(&mut buf).await;
    });
    let config = simple_config(&[addr]).replace(
        "    http:\n      routes: main\n",
        "    http:\n      routes: main\n    limits:\n      idle_timeout: 1500ms\n",
    );
    let lg = legate().config(&config).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/feed").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    for i in 0..pushes {
        let got = c.read_exact(4, HANG_GUARD).await;
        assert!(
            got.as_ref().is_ok_and(|g| g == b"push"),
            "push {i} did not arrive: {got:?}"
        );
    }
}

/// Routes (and filters) see an upgrade request's `Upgrade` and
/// `Connection: upgrade`: a WebSocket route chosen by them gets the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_can_match_the_upgrade_header() {
    let ws = upgrade_echo_server().await;
    let web = upstream().start().await;
    let config = with_cluster(
        &simple_config(&[web.addr]).replace(
            "        routes:\n",
            "        routes:\n          - match:\n              prefix: /\n              headers:\n                \
             - { name: upgrade, exact: websocket }\n            cluster: ws\n",
        ),
        "ws",
        ws.addr,
    );
    let lg = legate().config(&config).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    assert_eq!(web.requests.get(), 0);
}

/// `simple_config` with `upgrades: LIST` on the listener's `http`.
fn with_upgrades(config: &str, list: &str) -> String {
    config.replace(
        "    http:\n      routes: main\n",
        &format!("    http:\n      routes: main\n      upgrades: {list}\n"),
    )
}

/// Sends an HTTP/1.1 upgrade to `proto` and reads until the proxy closes.
async fn upgrade_request(addr: std::net::SocketAddr, path: &str, proto: &str) -> String {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    String::from_utf8_lossy(&raw(addr, req.as_bytes()).await).into_owned()
}

/// An upgrade to a type the listener does not list is refused as Envoy refuses
/// one without an `upgrade_configs` entry: 403, details `upgrade_failed`
/// (`downstream_rq_ws_on_non_ws_route`), and the connection is closed, so bytes
/// the client sent after the head (the other protocol, or a smuggled request)
/// are never read as HTTP. Nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_of_an_unlisted_type_is_refused() {
    let up = upgrade_echo_server().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    c.write(
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let (out, closed) = c.read_until_close(HANG_GUARD).await;
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(
        closed,
        "connection left open after a refused upgrade: {out}"
    );
    assert_eq!(raw_status(out.as_bytes()), Some(403), "{out}");
    assert!(out.ends_with("\r\n\r\nupgrade_failed\n"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
    assert!(up.heads.lock().unwrap().is_empty());

    // Two `Upgrade` lines are one list (`websocket, foo`), not an allowed type.
    let two = raw(
        lg.addr("web"),
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nUpgrade: foo\r\n\r\n",
    )
    .await;
    assert_eq!(
        raw_status(&two),
        Some(403),
        "{}",
        String::from_utf8_lossy(&two)
    );
    assert!(up.heads.lock().unwrap().is_empty());

    lg.assert_stat(
        r#"legate_listener_upgrades_refused_total{listener="web"}"#,
        2.0,
    )
    .await;
    lg.assert_stat(
        r#"legate_listener_requests_total{listener="web",class="4xx"}"#,
        2.0,
    )
    .await;
}

/// An allowed upgrade answered otherwise than by a 101 — the upstream's own
/// answer (here a plain 200), a direct response, Legate's 502 — closes the
/// connection after the answer: the bytes the client sent after its head (the
/// other protocol, or a request smuggled there) are never read as the next
/// request. It stayed open, and `GET /smuggled` was routed and proxied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_answered_without_a_101_closes_the_connection() {
    let up = upstream().start().await;
    let config = simple_config(&[up.addr]).replace(
        "        routes:\n",
        "        routes:\n          - name: local\n            match: { prefix: /local }\n            \
         direct_response: { status: 200, body: here }\n          - name: gone\n            \
         match: { prefix: /gone }\n            cluster: gone\n",
    ) + &format!(
        "  - name: gone\n    endpoints:\n      - address: {}\n",
        closed_port_addr()
    );
    let lg = legate().config(&config).start();
    for (path, status) in [("/chat", 200), ("/local", 200), ("/gone", 502)] {
        let mut c = RawConn::connect(lg.addr("web")).await;
        let mut bytes = String::from_utf8_lossy(WS_HANDSHAKE).replacen("/chat", path, 1);
        bytes.push_str("GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
        c.write(bytes.as_bytes()).await;
        let (out, closed) = c.read_until_close(HANG_GUARD).await;
        let out = String::from_utf8_lossy(&out).into_owned();
        assert!(closed, "{path}: connection left open: {out}");
        assert_eq!(raw_status(out.as_bytes()), Some(status), "{path}: {out}");
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{path}: {out}");
        assert!(
            out.to_ascii_lowercase().contains("connection: close\r\n"),
            "{path}: {out}"
        );
    }
    // Only the first reached the upstream; `/smuggled` never did.
    assert_eq!(up.requests.get(), 1);
}

/// `upgrades: []` refuses WebSocket too; a listed type matches whatever its
/// case; a route's `upgrades` overrides the listener per type, both ways (Envoy's
/// route `upgrade_configs` with `enabled`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_list_and_route_overrides_decide() {
    let up = upgrade_echo_server().await;
    let routes = "        routes:\n          - match:\n              prefix: /open\n            \
                  cluster: backend\n            upgrades: { WebSocket: true }\n";
    let lg = legate()
        .config(&with_upgrades(
            &simple_config(&[up.addr]).replace("        routes:\n", routes),
            "[]",
        ))
        .start();
    let head = upgrade_request(lg.addr("web"), "/chat", "websocket").await;
    assert_eq!(raw_status(head.as_bytes()), Some(403), "{head}");
    assert!(up.heads.lock().unwrap().is_empty());
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/open/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    c.write(b"ping").await;
    assert_eq!(c.read_exact(4, HANG_GUARD).await.unwrap(), b"ping");
    lg.assert_stat(
        r#"legate_listener_upgrades_refused_total{listener="web"}"#,
        1.0,
    )
    .await;

    // Listed as `WEBSOCKET`, sent as `websocket`; a route turns it off.
    let routes = "        routes:\n          - match:\n              prefix: /closed\n            \
                  cluster: backend\n            upgrades: { websocket: false }\n";
    let lg = legate()
        .config(&with_upgrades(
            &simple_config(&[up.addr]).replace("        routes:\n", routes),
            "[WEBSOCKET, spdy/3.1]",
        ))
        .start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    let head = upgrade_request(lg.addr("web"), "/chat", "SPDY/3.1").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    let head = upgrade_request(lg.addr("web"), "/closed", "websocket").await;
    assert_eq!(raw_status(head.as_bytes()), Some(403), "{head}");
    lg.assert_stat(
        r#"legate_listener_upgrades_refused_total{listener="web"}"#,
        1.0,
    )
    .await;
}

/// The upgrade is checked on the route the request is forwarded on too: a
/// filter that rewrites the path (`/old/…` → `/new/…`) cannot move an upgrade
/// that matched no route on arrival onto a route that turns it off. Without a
/// route on arrival the listener's list decides, as Envoy's connection manager
/// does. (HTTP/1.1 only: HTTP/2 offers no upgrades.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_cannot_route_an_upgrade_around_its_refusal() {
    let up = upgrade_echo_server().await;
    let config = |list: &str, new_route_ws: bool| {
        with_upgrades(
            &web_config(
                &format!(
                    "          - match: {{ prefix: /new }}\n            cluster: backend\n            \
                     upgrades: {{ websocket: {new_route_ws} }}\n"
                ),
                &format!("  - name: backend\n    endpoints: [{{ address: {} }}]\n", up.addr),
            )
            .replace(
                "      routes: main\n",
                "      routes: main\n      filters: [{ plugin: rewriter }]\n",
            ),
            list,
        ) + &format!(
            "plugins:\n  - name: rewriter\n    module: {}\n    config: {{ mode: rewrite }}\n",
            test_guest().display()
        )
    };
    let refused = r#"legate_listener_upgrades_refused_total{listener="web"}"#;

    // Allowed by the listener, refused by the route the filter moved it to.
    let lg = legate().config(&config("[websocket]", false)).start();
    let head = upgrade_request(lg.addr("web"), "/old/chat", "websocket").await;
    assert_eq!(raw_status(head.as_bytes()), Some(403), "{head}");
    lg.assert_stat(refused, 1.0).await;
    // The route that allows it still does.
    let lg = legate().config(&config("[websocket]", true)).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/old/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    drop(c);

    // No route on arrival and the listener tunnels nothing: refused there.
    let lg = legate().config(&config("[]", true)).start();
    let head = upgrade_request(lg.addr("web"), "/old/chat", "websocket").await;
    assert_eq!(raw_status(head.as_bytes()), Some(403), "{head}");
    lg.assert_stat(refused, 1.0).await;
    assert_eq!(
        up.heads.lock().unwrap().len(),
        1,
        "only the allowed one went up"
    );
}

// `Upgrade: h2c` is never a tunnel (the client would speak HTTP/2 to the
// upstream past routes and filters): as Envoy, its upgrade headers and
// `HTTP2-Settings` go and the request is proxied as a plain one. Under HTTP/2
// the client drops `Connection`/`Upgrade` itself (RFC 9113 §8.2.2) and the
// proxy drops `HTTP2-Settings`, a connection-specific header.
each_proto!(
    async fn h2c_is_proxied_as_a_plain_request(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for connection in ["Upgrade, HTTP2-Settings", "Upgrade"] {
            let r = c
                .get("/h2c")
                .header("connection", connection)
                .header("upgrade", "H2C")
                .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
                .send()
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            let echo = r.echo();
            assert_eq!(echo.path, "/h2c");
            for h in ["upgrade", "http2-settings", "connection"] {
                assert_eq!(echo.header(h), None, "{h} reached the upstream: {:?}", echo.headers);
            }
        }
        assert_eq!(up.requests.get(), 2);
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
            2.0,
        )
        .await;
        lg.assert_stat(
            r#"legate_listener_upgrades_refused_total{listener="web"}"#,
            0.0,
        )
        .await;
    }
);

// With no upgrade allowed, requests that are not upgrades pass as before, over
// both protocols; HTTP/2 has no `Upgrade` at all (the client drops it), so
// nothing there is refused.
each_proto!(
    async fn plain_requests_pass_a_listener_without_upgrades(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&with_upgrades(&simple_config(&[up.addr]), "[]"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/plain").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        if proto == Proto::H2 {
            let r = c.get("/plain").header("upgrade", "websocket").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.echo().header("upgrade"), None);
        }
        lg.assert_stat(
            r#"legate_listener_upgrades_refused_total{listener="web"}"#,
            0.0,
        )
        .await;
    }
);

/// HTTP/2 has no `Upgrade`; its WebSocket bootstrap (RFC 8441 extended
/// CONNECT, `:protocol`) is not offered without `http.extended_connect`
/// (tests/websocket_h2.rs has it on): the listener does not send
/// `SETTINGS_ENABLE_CONNECT_PROTOCOL`, and a stream with `:protocol` is reset
/// without reaching the upstream; the connection goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_extended_connect_is_not_offered() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let tcp = tokio::net::TcpStream::connect(lg.addr("web"))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri("http://ws.example/chat")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let sent = send.send_request(req).await;
    assert!(sent.is_err(), "extended CONNECT answered: {sent:?}");
    let ok = Request::get("http://ws.example/after")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(ok).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.requests.get(), 1);
    lg.assert_stat(
        r#"legate_listener_upgrades_refused_total{listener="web"}"#,
        0.0,
    )
    .await;
}

/// A client that stops reading while the upstream keeps sending: once the
/// socket buffers are full every write blocks, and a blocked write is no
/// activity: the connection is closed after `idle_timeout`, both sides,
/// instead of being held forever by an upstream that would send if it could.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_closes_a_client_that_stops_reading() {
    let source = endless_tcp_server().await;
    let lg = legate().config(&tcp_config(source, "1s")).start();
    let mut c = RawConn::connect_small_buffer(lg.addr("tcp")).await;
    // Some of it arrives: the connection is up.
    c.read_exact(1024, HANG_GUARD).await.unwrap();
    // Nothing read from here on.
    lg.wait_no_connections(
        "tcp",
        "the connection of a client that stopped reading closed",
    )
    .await;
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "Legate's side closed, yet the client's stayed open");
}

/// `tcp_config` with `drain_timeout: 300ms`, from a file (for reloads).
fn draining_tcp_config(cluster_addr: std::net::SocketAddr, idle: &str) -> String {
    tcp_config(cluster_addr, idle).replacen("version: 1\n", "version: 1\ndrain_timeout: 300ms\n", 1)
}

/// Writes and reads back one byte through an echoing connection: it still
/// proxies.
async fn echoes(c: &mut RawConn) {
    c.write(b"e").await;
    assert_eq!(c.read_exact(1, HANG_GUARD).await.unwrap(), b"e");
}

/// A reload that replaces a TCP listener (its settings changed) or removes
/// one closes the old listener's open connections `drain_timeout` after it,
/// as Envoy closes a drained listener's connections at the end of its drain
/// time (they stayed open, on a listener the config no longer has, for as long
/// as they moved a byte per `idle_timeout`). A listener the reload keeps
/// keeps its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_closes_a_replaced_or_removed_tcp_listeners_connections() {
    let echo = tcp_echo_server().await;
    let gone = "  - name: gone\n    address: 127.0.0.1:0\n    tcp:\n      cluster: echo\n";
    let with_gone = |idle: &str| {
        draining_tcp_config(echo.addr, idle).replacen(
            "listeners:\n",
            &format!("listeners:\n{gone}"),
            1,
        )
    };
    // Idle timeouts far beyond the test: only the reload can close.
    let lg = legate().config(&with_gone("1h")).from_file().start();
    let mut replaced = RawConn::connect(lg.addr("tcp")).await;
    let mut removed = RawConn::connect(lg.addr("gone")).await;
    echoes(&mut replaced).await;
    echoes(&mut removed).await;

    // `tcp` changes (its idle timeout), `gone` goes.
    let v = lg.reload_ok(&draining_tcp_config(echo.addr, "2h")).await;
    assert_eq!(v["listeners"]["changed"], json!(["tcp"]), "{v}");
    let mut kept = RawConn::connect(lg.addr("tcp")).await;
    echoes(&mut kept).await;
    for (c, what) in [(&mut replaced, "replaced"), (&mut removed, "removed")] {
        let (_, closed) = c.read_until_close(HANG_GUARD).await;
        assert!(closed, "a connection of the {what} listener stayed open");
    }
    eventually(HANG_GUARD, "the upstream sides closed", || async {
        (echo.closed.get() == 2).then_some(())
    })
    .await;
    for l in ["tcp", "gone"] {
        let series = format!("legate_listener_drain_closes_total{{listener=\"{l}\"}}");
        lg.assert_stat(&series, 1.0).await;
    }
    // The new listener's connection is not the old one's: it stays.
    echoes(&mut kept).await;
    lg.reload_ok(&draining_tcp_config(echo.addr, "2h")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    echoes(&mut kept).await;
}

/// A reload that replaces an HTTP listener closes a WebSocket tunnel of the
/// old one `drain_timeout` later: a tunnel has no request to end and let the
/// connection close, and stayed open for as long as it moved a byte per
/// `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_closes_a_tunnel_of_the_replaced_listener() {
    let up = upgrade_echo_server().await;
    let cfg = |max: &str| {
        simple_config(&[up.addr])
            .replacen("version: 1\n", "version: 1\ndrain_timeout: 300ms\n", 1)
            .replace(
                "    http:\n      routes: main\n",
                &format!(
                    "    http:\n      routes: main\n    limits:\n      max_connections: {max}\n"
                ),
            )
    };
    let lg = legate().config(&cfg("100")).from_file().start();
    let mut t = RawConn::connect(lg.addr("web")).await;
    let head = t.websocket_handshake("/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    echoes(&mut t).await;
    lg.reload_ok(&cfg("200")).await;
    let (_, closed) = t.read_until_close(HANG_GUARD).await;
    assert!(closed, "a tunnel of the replaced listener stayed open");
    lg.assert_stat(r#"legate_listener_drain_closes_total{listener="web"}"#, 1.0)
        .await;
    eventually(HANG_GUARD, "upstream side of the tunnel closed", || async {
        (up.closed.get() == 1).then_some(())
    })
    .await;
}

/// A drain (`POST /drain`) with a TCP connection and a WebSocket tunnel open,
/// neither idle long enough to close: both are closed when `drain_timeout`
/// passes, and the server stops.
/// A `101` that goes out while the listener drains keeps its `Connection:
/// upgrade`: the drain's `Connection: close` is for keep-alive responses, and
/// on a `101` it replaced the upgrade token, so clients failed the handshake
/// (RFC 6455 §4.1) of a tunnel the proxy had opened. The tunnel itself is then
/// closed at the drain timeout, as any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_sent_during_a_drain_keeps_its_upgrade() {
    use tokio::io::AsyncReadExt;
    // An upstream that answers the upgrade only when told, then echoes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "upstream: the request head did not arrive");
            head.extend_from_slice(&buf[..n]);
        }
        let _ = wait.await;
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )
        .await
        .unwrap();
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    let cfg = simple_config(&[addr]).replacen("version: 1\n", "version: 1\ndrain_timeout: 2s\n", 1);
    let lg = legate().config(&cfg).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    c.write(
        b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    lg.assert_stat(r#"legate_listener_requests_active{listener="web"}"#, 1.0)
        .await;
    let (status, _) = lg.admin_post("/drain").await;
    assert_eq!(status, 200);
    go.send(()).unwrap();
    let head = String::from_utf8_lossy(&c.read_head(HANG_GUARD).await).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "no 101: {head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(!head.contains("close"), "{head}");
    echoes(&mut c).await;
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "the tunnel stayed open through the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_tcp_connections_and_tunnels_at_its_timeout() {
    let echo = tcp_echo_server().await;
    let ws = upgrade_echo_server().await;
    let cfg = simple_config(&[ws.addr])
        .replacen("version: 1\n", "version: 1\ndrain_timeout: 300ms\n", 1)
        .replacen(
            "listeners:\n",
            "listeners:\n  - name: tcp\n    address: 127.0.0.1:0\n    tcp:\n      cluster: echo\n",
            1,
        );
    let cfg = with_cluster(&cfg, "echo", echo.addr);
    let lg = legate().config(&cfg).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    echoes(&mut c).await;
    let mut t = RawConn::connect(lg.addr("web")).await;
    let head = t.websocket_handshake("/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    echoes(&mut t).await;
    let (status, _) = lg.admin_post("/drain").await;
    assert_eq!(status, 200);
    for (conn, what) in [(&mut c, "tcp connection"), (&mut t, "tunnel")] {
        let (_, closed) = conn.read_until_close(HANG_GUARD).await;
        assert!(closed, "the {what} stayed open through the drain");
    }
    lg.wait_stopped(HANG_GUARD)
        .await
        .expect("the server stops once the drain timeout closed its connections");
}

/// `tcp_config` with an access log at `log`, written every 10ms.
fn logged_tcp_config(
    cluster_addr: std::net::SocketAddr,
    idle: &str,
    log: &std::path::Path,
) -> String {
    tcp_config(cluster_addr, idle).replacen(
        "version: 1\n",
        &format!(
            "version: 1\naccess_log: {{ path: {}, flush_interval: 10ms }}\n",
            log.display()
        ),
        1,
    )
}

/// The one access-log line of a TCP session, once written.
async fn tcp_line(log: &std::path::Path) -> Value {
    let lines = access_log_until(log, "the session's line", |l| !l.is_empty()).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v = lines[0].clone();
    // The fields of an HTTP request a TCP session does not have.
    for key in [
        "method",
        "path",
        "authority",
        "user_agent",
        "route",
        "route_table",
        "virtual_host",
        "request_id",
    ] {
        assert_eq!(v[key], Value::Null, "{key}: {v}");
    }
    assert_eq!(v["protocol"], "TCP", "{v}");
    assert_eq!(v["listener"], "tcp", "{v}");
    assert_eq!(v["cluster"], "echo", "{v}");
    v
}

/// A TCP session writes one access-log line when it ends, with what an L4
/// operator needs: the endpoint, the exact bytes each way, the duration and
/// what ended it (it wrote none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_session_is_logged_when_it_ends() {
    let echo = tcp_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let lg = legate()
        .config(&logged_tcp_config(echo.addr, "1h", &log))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let client = c.stream.local_addr().unwrap();
    let data = pattern_bytes(100_000);
    c.write(&data).await;
    assert_eq!(c.read_exact(data.len(), HANG_GUARD).await.unwrap(), data);
    // The client ends its side first; the echo server then closes too.
    c.stream.shutdown().await.ok();
    let (rest, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed && rest.is_empty());
    let v = tcp_line(&log).await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["cause"], "downstream_close", "{v}");
    assert_eq!(v["client"], client.to_string(), "{v}");
    assert_eq!(v["upstream"], echo.addr.to_string(), "{v}");
    assert_eq!(v["attempts"], 1, "{v}");
    assert_eq!(v["bytes_received"], 100_000, "{v}");
    assert_eq!(v["bytes_sent"], 100_000, "{v}");
    assert!(v["duration_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["upstream_transport_failure_reason"], Value::Null, "{v}");
}

/// A TCP session in an `access_log.format` line: the operators HTTP has and
/// a session does not (`%PROTOCOL%`, request headers) are `-`; the local
/// address is the listener's, the session's status and cause as the JSON
/// line's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_session_in_a_text_format() {
    let echo = tcp_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let cfg = logged_tcp_config(echo.addr, "1h", &log).replacen(
        "flush_interval: 10ms }",
        "flush_interval: 10ms, format: '%PROTOCOL% %REQ(:METHOD)% %RESPONSE_CODE% \
         %RESPONSE_CODE_DETAILS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% \
         %UPSTREAM_HOST% %BYTES_RECEIVED% %BYTES_SENT% %LISTENER_NAME%' }",
        1,
    );
    let lg = legate().config(&cfg).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let client = c.stream.local_addr().unwrap();
    c.write(b"ping").await;
    assert_eq!(c.read_exact(4, HANG_GUARD).await.unwrap(), b"ping");
    c.stream.shutdown().await.ok();
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed);
    let lines = eventually(HANG_GUARD, "the session's line", || async {
        let l = access_log_text(&log);
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(
        lines,
        [format!(
            "- - 200 downstream_close {} {client} {} 4 4 tcp",
            lg.addr("tcp"),
            echo.addr
        )]
    );
}

/// An upstream that ends the session first is named as its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_session_the_upstream_ends_is_logged_so() {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        s.write_all(b"bye").await.unwrap();
        // Closed: the upstream is done.
    });
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let lg = legate()
        .config(&logged_tcp_config(addr, "1h", &log))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let (got, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed);
    assert_eq!(got, b"bye");
    // A half-closed session lasts until the client ends its side too.
    c.stream.shutdown().await.ok();
    let v = tcp_line(&log).await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["cause"], "upstream_close", "{v}");
    assert_eq!(v["bytes_sent"], 3, "{v}");
    assert_eq!(v["bytes_received"], 0, "{v}");
}

/// A refused upstream: the line says so (nginx `stream`'s 502), with the
/// endpoint tried; without it the failure was visible only at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_session_whose_upstream_refuses_is_logged() {
    let dead = closed_port_addr();
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let lg = legate()
        .config(&logged_tcp_config(dead, "1h", &log))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "client left hanging");
    let v = tcp_line(&log).await;
    assert_eq!(v["status"], 502, "{v}");
    assert_eq!(v["cause"], "upstream_connect_failure", "{v}");
    assert_eq!(v["upstream"], dead.to_string(), "{v}");
    assert_eq!(v["attempts"], 1, "{v}");
    assert_eq!(v["bytes_received"], 0, "{v}");
    assert_eq!(v["bytes_sent"], 0, "{v}");
}

/// A cluster whose circuit breakers are full refuses the session (503
/// `overloaded`, as HTTP's cause), counted once in `upstream_cx_overflow`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_session_refused_by_the_circuit_breakers_is_logged() {
    let echo = tcp_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let config = logged_tcp_config(echo.addr, "1h", &log).replacen(
        "  - name: echo\n",
        "  - name: echo\n    circuit_breakers: { max_connections: 1 }\n",
        1,
    );
    let lg = legate().config(&config).start();
    let mut first = RawConn::connect(lg.addr("tcp")).await;
    first.write(b"x").await;
    assert_eq!(first.read_exact(1, HANG_GUARD).await.unwrap(), b"x");
    let mut second = RawConn::connect(lg.addr("tcp")).await;
    let (_, closed) = second.read_until_close(HANG_GUARD).await;
    assert!(closed, "the second connection was let through");
    let v = tcp_line(&log).await;
    assert_eq!(v["status"], 503, "{v}");
    assert_eq!(v["cause"], "overloaded", "{v}");
    lg.assert_stat(
        r#"legate_cluster_upstream_cx_overflow{cluster="echo"}"#,
        1.0,
    )
    .await;
}

/// A session the idle timeout ends is logged with that cause and counted
/// (Envoy's `tcp.<stat_prefix>.idle_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_session_that_idles_out_is_logged_and_counted() {
    let echo = tcp_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let lg = legate()
        .config(&logged_tcp_config(echo.addr, "1s", &log))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"abc").await;
    assert_eq!(c.read_exact(3, HANG_GUARD).await.unwrap(), b"abc");
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "idle connection not closed");
    let v = tcp_line(&log).await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["cause"], "idle_timeout", "{v}");
    assert_eq!(v["bytes_received"], 3, "{v}");
    assert_eq!(v["bytes_sent"], 3, "{v}");
    assert!(v["duration_ms"].as_f64().unwrap() >= 900.0, "{v}");
    lg.assert_stat(
        r#"legate_listener_tcp_idle_timeouts_total{listener="tcp"}"#,
        1.0,
    )
    .await;
}

/// The listener's byte counters grow as the bytes move, not when the
/// connection ends: a long-lived connection showed 0 until it closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_byte_counters_grow_while_the_connection_is_open() {
    let echo = tcp_echo_server().await;
    let lg = legate().config(&tcp_config(echo.addr, "1h")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let data = pattern_bytes(70_000);
    c.write(&data).await;
    assert_eq!(c.read_exact(data.len(), HANG_GUARD).await.unwrap(), data);
    // Still open.
    lg.assert_stat(
        r#"legate_listener_rx_bytes_total{listener="tcp"}"#,
        70_000.0,
    )
    .await;
    lg.assert_stat(
        r#"legate_listener_tx_bytes_total{listener="tcp"}"#,
        70_000.0,
    )
    .await;
    c.write(b"more").await;
    assert_eq!(c.read_exact(4, HANG_GUARD).await.unwrap(), b"more");
    lg.assert_stat(
        r#"legate_listener_rx_bytes_total{listener="tcp"}"#,
        70_004.0,
    )
    .await;
    lg.assert_stat(r#"legate_listener_connections_active{listener="tcp"}"#, 1.0)
        .await;
    drop(c);
    lg.wait_no_connections("tcp", "the connection closed").await;
    // Nothing is added twice at the close.
    lg.assert_stat(
        r#"legate_listener_tx_bytes_total{listener="tcp"}"#,
        70_004.0,
    )
    .await;
}
