//! Connection-level proxying: HTTP/1.1 Upgrade (WebSocket) passthrough and TCP proxy
//! listeners (bytes both ways, idle timeout, byte counters).

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
    assert_eq!(
        c.read_exact(5, Duration::from_secs(2)).await.unwrap(),
        b"hello"
    );
    let big = pattern_bytes(256 * 1024);
    c.write(&big).await;
    let back = c
        .read_exact(big.len(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(checksum(&back), checksum(&big));
    assert_eq!(up.bytes.get(), 5 + big.len());

    // Closing the client closes the upstream side.
    drop(c);
    eventually(
        Duration::from_secs(3),
        "upstream side of the tunnel closed",
        || async { (up.closed.get() == 1).then_some(()) },
    )
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
    assert_eq!(
        c.read_exact(4, Duration::from_secs(2)).await.unwrap(),
        b"ping"
    );
    let big = pattern_bytes(1 << 20);
    c.write(&big).await;
    let back = c
        .read_exact(big.len(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(checksum(&back), checksum(&big));
    let total = (4 + big.len()) as f64;
    // Half-close from the client: the proxy passes the FIN on and closes after the
    // upstream does.
    c.stream.shutdown().await.ok();
    let (rest, closed) = c.read_until_close(Duration::from_secs(3)).await;
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
    let lg = legate().config(&tcp_config(echo.addr, "300ms")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"x").await;
    assert_eq!(c.read_exact(1, Duration::from_secs(2)).await.unwrap(), b"x");
    // Activity resets the timer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.write(b"y").await;
    assert_eq!(c.read_exact(1, Duration::from_secs(2)).await.unwrap(), b"y");
    let t = Instant::now();
    let (_, closed) = c.read_until_close(Duration::from_secs(3)).await;
    let idle = t.elapsed();
    assert!(closed, "idle connection not closed");
    assert!(idle >= Duration::from_millis(250), "closed after {idle:?}");
    assert!(idle < Duration::from_millis(1500), "closed after {idle:?}");
    eventually(
        Duration::from_secs(2),
        "upstream connection closed",
        || async { (echo.closed.get() == 1).then_some(()) },
    )
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
    let (out, closed) = c.read_until_close(Duration::from_secs(3)).await;
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
        "    http:\n      routes: main\n    limits:\n      idle_timeout: 400ms\n",
    );
    let lg = legate().config(&config).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    // Bytes keep it alive past the idle timeout.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.write(b"ping").await;
        assert_eq!(
            c.read_exact(4, Duration::from_secs(2)).await.unwrap(),
            b"ping"
        );
    }
    lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 1.0)
        .await;
    // Quiet: closed, both sides.
    let (_, closed) = c.read_until_close(Duration::from_secs(10)).await;
    assert!(closed, "an idle tunnel stayed open");
    eventually(
        Duration::from_secs(3),
        "upstream side of the tunnel closed",
        || async { (up.closed.get() == 1).then_some(()) },
    )
    .await;
    lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 0.0)
        .await;
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
