//! Network (L4) filters on TCP proxy listeners: a proxy-wasm filter built from
//! source with the upstream `proxy-wasm` crate (tests/proxy-wasm-guests, its
//! `tcp-*` modes), the component fixtures (tests/network-guest on raw
//! `wit-bindgen`, tests/network-sdk-guest on `legate-sdk`) and the shipped
//! example examples/tcp-filter run on real connections to a real echo
//! upstream; the tests assert the bytes each side gets, the `/stats`
//! counters and a filter-closed session's access-log line.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use legate_tests::plugins::plugin_wasm;
use legate_tests::proxy_wasm::proxy_wasm_guest;
use legate_tests::*;

const T: Duration = Duration::from_secs(5);

/// TCP listener `tcp` to cluster `echo` at `echo`, with filter `pw` (the
/// proxy-wasm guest with `plugin_config`), `extra` plugin keys and `tls` keys
/// under the listener.
fn config(echo: SocketAddr, plugin_config: &str, extra: &str, tls: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: tcp
    address: 127.0.0.1:0
{tls}    tcp:
      cluster: echo
      filters: [{{ plugin: pw }}]
clusters:
  - name: echo
    endpoints:
      - address: {echo}
plugins:
  - name: pw
    module: {}
    limits: {{ cpu: 500ms }}
{extra}    proxy_wasm:
      plugin_config: {plugin_config}
",
        proxy_wasm_guest().display()
    )
}

fn calls(phase: &str) -> String {
    format!("legate_plugin_calls_total{{plugin=\"pw\",phase=\"{phase}\"}}")
}

fn metric(name: &str) -> String {
    format!("legate_proxywasm_{name}{{plugin=\"pw\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_rewrites_both_directions() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&config(echo.addr, "{ mode: tcp-rewrite }", "", ""))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let me = c.stream.local_addr().unwrap();
    // A line in two writes: the filter holds the first part (`Pause`) until the
    // newline arrives, then rewrites the whole line (a longer buffer).
    c.write(b"hel").await;
    c.write(b"lo world\n").await;
    let sent_up = b"howdy, partner world\n";
    let back = b"h0wdy, partner w0rld\n";
    assert_eq!(c.read_exact(back.len(), T).await.unwrap(), back);
    // Properties of the connection, read in the downstream data callback.
    c.write(b"props\n").await;
    let line = format!(
        "src={me} dst={} up={} tls=none req=none\n",
        lg.addr("tcp"),
        echo.addr
    );
    let expected = line.replace('o', "0");
    let got = c.read_exact(expected.len(), T).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&got), expected);
    // The client half-closes: the FIN goes through the filter to the echo
    // server, which closes, and the proxy closes the client.
    c.stream.shutdown().await.unwrap();
    let (rest, closed) = c.read_until_close(T).await;
    assert!(
        rest.is_empty(),
        "unexpected bytes after the close: {rest:?}"
    );
    assert!(closed, "the proxy did not close the client");
    assert_eq!(echo.bytes.get(), sent_up.len() + line.len());
    let rx = (3 + 9 + 6) as f64;
    let tx = (back.len() + expected.len()) as f64;
    lg.assert_stat(r#"legate_listener_rx_bytes_total{listener="tcp"}"#, rx)
        .await;
    lg.assert_stat(r#"legate_listener_tx_bytes_total{listener="tcp"}"#, tx)
        .await;
    lg.assert_stat(&calls("new_connection"), 1.0).await;
    lg.assert_stat_with(&calls("downstream_data"), |v| v >= 3.0, ">= 3")
        .await;
    lg.assert_stat_with(&calls("upstream_data"), |v| v >= 2.0, ">= 2")
        .await;
    lg.assert_stat(&calls("downstream_close"), 1.0).await;
    lg.assert_stat(&calls("upstream_close"), 1.0).await;
    lg.assert_stat(&calls("done"), 1.0).await;
    // The guest's own view of the callbacks (its metrics).
    lg.assert_stat(&metric("pw_tcp_new"), 1.0).await;
    lg.assert_stat(&metric("pw_tcp_down_close_remote"), 1.0)
        .await;
    lg.assert_stat(&metric("pw_tcp_up_close_remote"), 1.0).await;
    lg.assert_stat(&metric("pw_tcp_down_close_local"), 0.0)
        .await;
    lg.assert_stat(&metric("pw_tcp_log"), 1.0).await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_closes_the_connection_on_a_pattern() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&config(echo.addr, "{ mode: tcp-close }", "", ""))
        .start();
    // Downstream: `QUIT` closes before anything reaches the upstream.
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"hi\n").await;
    assert_eq!(c.read_exact(3, T).await.unwrap(), b"hi\n");
    c.write(b"QUIT\n").await;
    let (rest, closed) = c.read_until_close(T).await;
    assert!(closed, "QUIT did not close the connection");
    assert!(rest.is_empty(), "got {rest:?} after QUIT");
    eventually(T, "upstream connection closed", || async {
        (echo.closed.get() == 1).then_some(())
    })
    .await;
    assert_eq!(echo.bytes.get(), 3, "QUIT reached the upstream");
    lg.assert_stat(&metric("pw_tcp_down_close_local"), 1.0)
        .await;
    lg.assert_stat(&metric("pw_tcp_up_close_local"), 1.0).await;
    lg.assert_stat(&metric("pw_tcp_log"), 1.0).await;

    // Upstream: the echo of `BYE` closes; the client never gets it.
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"BYE").await;
    let (rest, closed) = c.read_until_close(T).await;
    assert!(closed, "BYE from upstream did not close the connection");
    assert!(rest.is_empty(), "got {rest:?}");
    assert_eq!(echo.bytes.get(), 6);
    lg.assert_stat(&metric("pw_tcp_new"), 2.0).await;
    lg.assert_stat(&metric("pw_tcp_log"), 2.0).await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
    lg.assert_stat(r#"legate_listener_connections_active{listener="tcp"}"#, 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_pauses_the_new_connection_on_an_http_callout() {
    let echo = tcp_echo_server().await;
    let az = authz_upstream().await;
    let cfg = |path: &str| {
        with_cluster(
            &config(
                echo.addr,
                &format!("{{ mode: tcp-callout, path: \"{path}\" }}"),
                "    capabilities: { clusters: [authz] }\n",
                "",
            ),
            "authz",
            az.addr,
        )
    };
    // Allowed: the connection resumes once the answer came, and the filter
    // prefixes the first data with it.
    let lg = legate().config(&cfg("/check/tcp")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"data").await;
    let want = b"ok:anonymous|data";
    assert_eq!(c.read_exact(want.len(), T).await.unwrap(), want);
    assert_eq!(echo.connections.get(), 1);
    lg.assert_stat(r#"legate_cluster_upstream_rq_total{cluster="authz"}"#, 1.0)
        .await;
    lg.assert_stat(&calls("callout_response"), 1.0).await;
    drop(c);
    drop(lg);

    // Denied: closed without ever connecting upstream.
    let lg = legate().config(&cfg("/check/deny")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"data").await;
    let (rest, closed) = c.read_until_close(T).await;
    assert!(closed, "a denied connection was left open");
    assert!(rest.is_empty());
    assert_eq!(
        echo.connections.get(),
        1,
        "a denied connection reached the upstream"
    );
    lg.assert_stat(&metric("pw_tcp_down_close_local"), 1.0)
        .await;
    lg.assert_stat(&metric("pw_tcp_up_close_local"), 0.0).await;
    lg.assert_stat(&metric("pw_tcp_log"), 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trapping_filter_closes_the_connection_and_the_proxy_keeps_serving() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&config(echo.addr, "{ mode: tcp-trap }", "", ""))
        .concurrency(1)
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"fine").await;
    assert_eq!(c.read_exact(4, T).await.unwrap(), b"fine");
    c.write(b"boom").await;
    let (rest, closed) = c.read_until_close(T).await;
    assert!(closed, "fail: closed did not close the connection");
    assert!(rest.is_empty());
    lg.assert_stat(r#"legate_plugin_traps_total{plugin="pw"}"#, 1.0)
        .await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 1.0)
        .await;
    assert_eq!(
        echo.bytes.get(),
        4,
        "data that trapped the filter reached the upstream"
    );
    // A new connection gets a new VM.
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"again").await;
    assert_eq!(c.read_exact(5, T).await.unwrap(), b"again");
    lg.assert_stat(r#"legate_plugin_instance_restarts_total{plugin="pw"}"#, 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_skips_a_trapping_filter() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&config(
            echo.addr,
            "{ mode: tcp-trap }",
            "    fail: open\n",
            "",
        ))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"boom").await;
    assert_eq!(c.read_exact(4, T).await.unwrap(), b"boom");
    c.write(b"boom again").await;
    assert_eq!(c.read_exact(10, T).await.unwrap(), b"boom again");
    lg.assert_stat(r#"legate_plugin_traps_total{plugin="pw"}"#, 1.0)
        .await;
    assert_eq!(echo.bytes.get(), 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_terminating_tcp_listener_runs_the_filter() {
    let ca = Ca::new("tcp-filters");
    let cert = ca.server(&["db.example"]);
    let tls = cert.listener_tls_yaml();
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&config(echo.addr, "{ mode: tcp-rewrite }", "", &tls))
        .start();
    let mut s = tls_raw(lg.addr("tcp"), TlsOptions::new(&cert, "db.example"))
        .await
        .unwrap();
    s.write_all(b"hello\nprops\n").await.unwrap();
    s.flush().await.unwrap();
    let me = s.get_ref().0.local_addr().unwrap();
    let expected = format!(
        "howdy, partner\nsrc={me} dst={} up={} tls=TLSv1.3 req=none\n",
        lg.addr("tcp"),
        echo.addr
    )
    .replace('o', "0");
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(T, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), expected);
    lg.assert_stat(&calls("new_connection"), 1.0).await;
    lg.assert_stat(r#"legate_listener_tls_errors_total{listener="tcp"}"#, 0.0)
        .await;
}

#[test]
fn an_http_component_on_a_tcp_listener_is_refused() {
    let yaml = format!(
        "version: 1
listeners:
  - name: tcp
    address: 127.0.0.1:0
    tcp:
      cluster: echo
      filters: [{{ plugin: web-only }}]
clusters:
  - name: echo
    endpoints:
      - address: 127.0.0.1:1
plugins:
  - name: web-only
    module: {}
",
        test_guest().display()
    );
    let e = match legate().config(&yaml).try_start() {
        Ok(_) => panic!("an HTTP component was accepted on a TCP listener"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("plugin `web-only` is an HTTP filter, but `tcp.filters` takes network filters"),
        "{e}"
    );
}

/// `yaml` with a top-level `drain_timeout` of 300 ms: a replaced listener's
/// TCP connections are closed that long after the reload.
fn short_drain(yaml: &str) -> String {
    yaml.replacen("version: 1\n", "version: 1\ndrain_timeout: 300ms\n", 1)
}

/// A plugin reload of a network filter replaces the TCP listeners running it
/// on their socket, as Envoy drains a listener whose filter chain changed:
/// new connections run the reloaded plugin, and the open ones, which hold the
/// filters they started with, are closed `drain_timeout` later instead of
/// keeping the old version's instance (one per worker) for their lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_reload_drains_open_connections_and_filters_new_ones() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&short_drain(&config(
            echo.addr,
            "{ mode: tcp-rewrite }",
            "",
            "",
        )))
        .start();
    let mut old = RawConn::connect(lg.addr("tcp")).await;
    old.write(b"hello\n").await;
    let back = b"h0wdy, partner\n";
    assert_eq!(old.read_exact(back.len(), T).await.unwrap(), back);
    let (status, body) = lg.admin_post("/plugins/pw/reload").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["listeners"]["changed"], serde_json::json!(["tcp"]), "{v}");
    lg.assert_stat(
        r#"legate_plugin_reloads_total{plugin="pw",result="success"}"#,
        1.0,
    )
    .await;
    // The open connection is drained.
    let (_, closed) = old.read_until_close(HANG_GUARD).await;
    assert!(closed, "a connection on the reloaded filter stayed open");
    lg.assert_stat(r#"legate_listener_drain_closes_total{listener="tcp"}"#, 1.0)
        .await;
    // A new connection runs the reloaded plugin.
    let mut new = RawConn::connect(lg.addr("tcp")).await;
    new.write(b"hello\n").await;
    assert_eq!(new.read_exact(back.len(), T).await.unwrap(), back);
    lg.assert_stat(&calls("new_connection"), 2.0).await;
    // Only the new version's instance is left (one worker).
    lg.assert_stat(r#"legate_plugin_instances{plugin="pw"}"#, 1.0)
        .await;
}

/// Reloads of a config whose network filter is unchanged (here the same file
/// each time) keep the TCP listener and its plugin as they are, as Envoy keeps
/// an unchanged listener's filter chain and VM: an open connection goes on
/// with the live plugin, new connections use the same instance, and the
/// plugin is neither configured again nor left behind with an instance per
/// reload (they piled up, one per reload, until the instance pool was full
/// and every reload was refused). `send` gives `back`.
async fn unchanged_reloads_keep_the_filter(yaml: &str, send: &[u8], back: &[u8]) {
    let lg = legate()
        .config(&short_drain(yaml))
        .concurrency(1)
        .from_file()
        .start();
    let mut old = RawConn::connect(lg.addr("tcp")).await;
    old.write(send).await;
    assert_eq!(old.read_exact(back.len(), T).await.unwrap(), back);
    let instances = r#"legate_plugin_instances{plugin="pw"}"#;
    lg.assert_stat(instances, 1.0).await;
    let configured = lg.stat(&calls("configure")).await;
    for _ in 0..5 {
        let v = lg.assert_reload_ok().await;
        assert_eq!(v["listeners"]["kept"], serde_json::json!(["tcp"]), "{v}");
        assert_eq!(v["plugins"]["kept"], serde_json::json!(["pw"]), "{v}");
        assert_eq!(v["plugins"]["new_or_changed"], serde_json::json!([]), "{v}");
        let mut new = RawConn::connect(lg.addr("tcp")).await;
        new.write(send).await;
        assert_eq!(new.read_exact(back.len(), T).await.unwrap(), back);
        drop(new);
        old.write(send).await;
        assert_eq!(old.read_exact(back.len(), T).await.unwrap(), back);
        lg.assert_stat(instances, 1.0).await;
    }
    assert_eq!(lg.stat(&calls("configure")).await, configured);
    lg.assert_stat(r#"legate_listener_drain_closes_total{listener="tcp"}"#, 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_reloads_keep_a_proxy_wasm_network_filter() {
    let echo = tcp_echo_server().await;
    unchanged_reloads_keep_the_filter(
        &config(echo.addr, "{ mode: tcp-rewrite }", "", ""),
        b"hello\n",
        b"h0wdy, partner\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_reloads_keep_a_component_network_filter() {
    let echo = tcp_echo_server().await;
    unchanged_reloads_keep_the_filter(
        &component_config(echo.addr, "rewrite", "", ""),
        b"one",
        b"0NE",
    )
    .await;
}

/// A reload that changes only a network filter's config (not the listener's
/// settings) replaces the TCP listener: the open connection, which runs the
/// old config, is drained (`drain_timeout`), as after a settings change, and
/// new connections get the new config. It was kept with the old config for
/// its lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changing_a_network_filters_config_drains_its_connections() {
    let echo = tcp_echo_server().await;
    let cfg = |mode: &str| short_drain(&config(echo.addr, &format!("{{ mode: {mode} }}"), "", ""));
    // One worker: the instance count is exact.
    let lg = legate()
        .config(&cfg("tcp-rewrite"))
        .concurrency(1)
        .from_file()
        .start();
    let mut old = RawConn::connect(lg.addr("tcp")).await;
    old.write(b"hello\n").await;
    let back = b"h0wdy, partner\n";
    assert_eq!(old.read_exact(back.len(), T).await.unwrap(), back);
    let v = lg.reload_ok(&cfg("tcp-lines")).await;
    assert_eq!(v["listeners"]["changed"], serde_json::json!(["tcp"]), "{v}");
    assert_eq!(
        v["plugins"]["new_or_changed"],
        serde_json::json!(["pw"]),
        "{v}"
    );
    let (_, closed) = old.read_until_close(HANG_GUARD).await;
    assert!(
        closed,
        "a connection running the old filter config stayed open"
    );
    lg.assert_stat(r#"legate_listener_drain_closes_total{listener="tcp"}"#, 1.0)
        .await;
    // The new config: lines pass unchanged.
    let mut new = RawConn::connect(lg.addr("tcp")).await;
    new.write(b"hello\n").await;
    assert_eq!(new.read_exact(6, T).await.unwrap(), b"hello\n");
    lg.assert_stat(r#"legate_plugin_instances{plugin="pw"}"#, 1.0)
        .await;
}

/// `yaml` with the TCP listener's `idle_timeout` set to `t`.
fn tcp_idle(yaml: &str, t: &str) -> String {
    yaml.replacen(
        "      cluster: echo\n",
        &format!("      cluster: echo\n      idle_timeout: {t}\n"),
        1,
    )
}

/// A filtered connection whose client stops reading while the upstream
/// keeps sending: the pump writing to the client blocks, which is no
/// activity, so the connection is closed after `idle_timeout`; the filter
/// sees the close as local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_connection_whose_client_stops_reading_is_closed() {
    let source = endless_tcp_server().await;
    let lg = legate()
        .config(&tcp_idle(
            &config(source, "{ mode: tcp-rewrite }", "", ""),
            "1s",
        ))
        .start();
    let mut c = RawConn::connect_small_buffer(lg.addr("tcp")).await;
    // Some of it arrives, through the filter (its `o`s are `0`s).
    let got = c.read_exact(1024, HANG_GUARD).await.unwrap();
    assert!(!got.contains(&b'o'), "not filtered");
    // Nothing read from here on.
    lg.wait_no_connections(
        "tcp",
        "the connection of a client that stopped reading closed",
    )
    .await;
    lg.assert_stat(&metric("pw_tcp_down_close_local"), 1.0)
        .await;
    lg.assert_stat(&calls("done"), 1.0).await;
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "Legate's side closed, yet the client's stayed open");
}

/// Bytes from the upstream are activity for the TCP idle timeout, as Envoy's
/// `tcp_proxy` counts upstream reads: an upstream trickling a line that the
/// filter holds until its newline, for longer than `idle_timeout` in all,
/// while nothing moves on the client's side, is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_bytes_a_filter_holds_keep_the_connection_open() {
    // A byte per 100 ms for 3 s, then the newline: far more often than the
    // 2 s idle timeout, longer than it in all.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        s.set_nodelay(true).unwrap();
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(b"a").await.is_err() {
                return;
            }
        }
        let _ = s.write_all(b"\n").await;
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
    });
    let lg = legate()
        .config(&tcp_idle(&config(up, "{ mode: tcp-lines }", "", ""), "2s"))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let want = [b"a".repeat(30), b"\n".to_vec()].concat();
    assert_eq!(c.read_exact(want.len(), HANG_GUARD).await.unwrap(), want);
    lg.assert_stat(&metric("pw_tcp_down_close_local"), 0.0)
        .await;
}

/// A filter that holds a connection's data (`tcp-rewrite` pauses a line
/// until its newline) while nothing else moves: the connection is closed
/// after `idle_timeout` (here before the pause's own bound, `limits.pause`,
/// 300 s by default), the held bytes never reach the upstream, and the
/// filter sees a local close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_data_a_filter_holds_is_closed_when_idle() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&tcp_idle(
            &config(echo.addr, "{ mode: tcp-rewrite }", "", ""),
            "1s",
        ))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"no newline yet").await;
    let (rest, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    lg.assert_stat(&metric("pw_tcp_down_close_local"), 1.0)
        .await;
    lg.assert_stat(&calls("done"), 1.0).await;
    assert_eq!(echo.bytes.get(), 0, "held data reached the upstream");
}

/// A reload that replaces a filtered TCP listener closes its open
/// connections `drain_timeout` later (they stayed open for as long as they
/// moved a byte per `idle_timeout`); the filter sees a local close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_closes_a_replaced_listeners_filtered_connections() {
    let echo = tcp_echo_server().await;
    let cfg = |idle: &str| {
        short_drain(&tcp_idle(
            &config(echo.addr, "{ mode: tcp-rewrite }", "", ""),
            idle,
        ))
    };
    // Idle timeouts far beyond the test: only the reload can close.
    let lg = legate().config(&cfg("1h")).from_file().start();
    let mut old = RawConn::connect(lg.addr("tcp")).await;
    old.write(b"hello\n").await;
    let back = b"h0wdy, partner\n";
    assert_eq!(old.read_exact(back.len(), T).await.unwrap(), back);
    lg.reload_ok(&cfg("2h")).await;
    let (_, closed) = old.read_until_close(HANG_GUARD).await;
    assert!(closed, "a connection of the replaced listener stayed open");
    lg.assert_stat(r#"legate_listener_drain_closes_total{listener="tcp"}"#, 1.0)
        .await;
    lg.assert_stat(&metric("pw_tcp_down_close_local"), 1.0)
        .await;
    lg.assert_stat(&calls("done"), 1.0).await;
    // The new listener filters as before.
    let mut new = RawConn::connect(lg.addr("tcp")).await;
    new.write(b"hello\n").await;
    assert_eq!(new.read_exact(back.len(), T).await.unwrap(), back);
}

/// A client that connects straight to a transparent listener whose cluster
/// is `original_dst` has no original destination to go to: the connection
/// closes before any connect, and the filter that saw it still gets its
/// downstream close and `on_done` (its stream context is deleted, not left
/// in the VM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_no_original_destination_finishes_its_filters() {
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cfg = config(unused, "{ mode: tcp-rewrite }", "", "")
        .replacen(
            "    tcp:\n      cluster: echo\n",
            "    original_destination: true\n    tcp:\n      cluster: echo\n",
            1,
        )
        .replacen(
            &format!("    endpoints:\n      - address: {unused}\n"),
            "    original_dst: true\n",
            1,
        );
    assert!(cfg.contains("original_dst: true"), "{cfg}");
    let lg = legate().config(&cfg).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let (rest, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    lg.assert_stat(&metric("pw_tcp_new"), 1.0).await;
    lg.assert_stat(&metric("pw_tcp_down_close_local"), 1.0)
        .await;
    lg.assert_stat(&metric("pw_tcp_up_close_local"), 0.0).await;
    lg.assert_stat(&metric("pw_tcp_log"), 1.0).await;
    lg.assert_stat(&calls("done"), 1.0).await;
}

/// A client that resets its connection (a read error, not a half-close)
/// ends a filtered connection as the plain path does: both sides close at
/// once instead of the upstream getting a FIN and the connection living on
/// until `idle_timeout`. The filter sees no end-of-stream data call, the
/// client's close as remote and the upstream's as local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_closes_both_sides() {
    // An upstream that sends nothing and never closes.
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = up.accept().await {
            let _ = tx.send(s);
        }
    });
    let lg = legate()
        .config(&config(up_addr, "{ mode: tcp-close }", "", ""))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"hi").await;
    let mut held = tokio::time::timeout(HANG_GUARD, accepted.recv())
        .await
        .unwrap()
        .unwrap();
    let mut got = [0u8; 2];
    tokio::time::timeout(HANG_GUARD, held.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"hi");
    c.stream.set_zero_linger().unwrap();
    drop(c);
    lg.wait_no_connections("tcp", "a reset client's connection closed")
        .await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, held.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    lg.assert_stat(&calls("downstream_data"), 1.0).await;
    lg.assert_stat(&metric("pw_tcp_down_close_remote"), 1.0)
        .await;
    lg.assert_stat(&metric("pw_tcp_up_close_local"), 1.0).await;
    lg.assert_stat(&calls("done"), 1.0).await;
}

/// A TCP server on 127.0.0.1:0 that sends `hello\n` first on each
/// connection, then echoes.
async fn greeting_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(b"hello\n").await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// [`config`] with mode `mode` calling `authz` at `path`.
fn resume_config(up: SocketAddr, az: SocketAddr, mode: &str, path: &str) -> String {
    with_cluster(
        &config(
            up,
            &format!("{{ mode: {mode}, path: \"{path}\", timeout_ms: 10000 }}"),
            "    capabilities: { clusters: [authz] }\n",
            "",
        ),
        "authz",
        az,
    )
}

/// `proxy_continue_stream` names the direction a TCP connection resumes:
/// both directions wait on calls at once (the upstream speaks first), and
/// each call's callback resumes its own with `resume_downstream` /
/// `resume_upstream`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_resumes_each_direction_by_its_stream_type() {
    let up = greeting_server().await;
    let az = authz_upstream().await;
    let lg = legate()
        .config(&resume_config(up, az.addr, "tcp-resume", "/check/slow"))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"ping").await;
    let want = b"hello\nping";
    assert_eq!(c.read_exact(want.len(), HANG_GUARD).await.unwrap(), want);
    lg.assert_stat(&calls("callout_response"), 2.0).await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
}

/// In a call's callback a proxy-wasm TCP filter reads and rewrites the data
/// it holds (`DOWNSTREAM_DATA` / `UPSTREAM_DATA`), as Envoy keeps its read
/// buffer after `StopIteration`: each callback prefixes its direction's held
/// data before resuming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_rewrites_held_data_in_a_calls_callback() {
    let up = greeting_server().await;
    let az = authz_upstream().await;
    let lg = legate()
        .config(&resume_config(up, az.addr, "tcp-resume-edit", "/check/tcp"))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"ping").await;
    let want = b"up|hello\ndown|ping";
    assert_eq!(c.read_exact(want.len(), HANG_GUARD).await.unwrap(), want);
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
}

/// A callback that resumes only the downstream direction leaves the paused
/// upstream direction paused: with no call left, only another callback of
/// the VM could resume it, and nothing does, so at the plugin's
/// `limits.pause` it fails, and with `fail: closed` the connection closes
/// and the held upstream data never reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_resume_downstream_leaves_upstream_paused() {
    let up = greeting_server().await;
    let az = authz_upstream().await;
    let lg = legate()
        .config(&with_pause_limit(&resume_config(
            up,
            az.addr,
            "tcp-resume-down",
            "/check/tcp",
        )))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let (rest, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 1.0)
        .await;
    lg.assert_stat(&metric("pw_tcp_log"), 1.0).await;
}

/// A filter that pauses at the end of the downstream stream on a call, its
/// earlier data gone on (it holds only the end), finds the downstream data
/// buffer in the call's callback, empty, and appends to it (as Envoy keeps its
/// read buffer after `StopIteration` and proxy-wasm-cpp-host appends at a
/// start past the end): the footer goes upstream before the end of stream,
/// and the VM does not trap (the Rust SDK panics on `NOT_FOUND`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_appends_to_a_held_end_of_stream_in_a_calls_callback() {
    let echo = tcp_echo_server().await;
    let az = authz_upstream().await;
    let lg = legate()
        .config(&resume_config(
            echo.addr,
            az.addr,
            "tcp-footer",
            "/check/tcp",
        ))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"hello\n").await;
    c.stream.shutdown().await.unwrap();
    let (got, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(
        closed,
        "not closed; got {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(String::from_utf8_lossy(&got), "hello\n[footer]\n");
    lg.assert_stat(&calls("callout_response"), 1.0).await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
    lg.assert_stat(&metric("pw_tcp_log"), 1.0).await;
}

/// A pause past `limits.pause` closes the connection (fail closed) as one
/// over `limits.body` does: either way the filter, whose VM is healthy, gets
/// both close callbacks (`LOCAL`) before `proxy_on_log`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_pause_and_body_limits_both_give_the_close_callbacks() {
    let echo = tcp_echo_server().await;
    let yaml = config(echo.addr, "{ mode: tcp-hold }", "    fail: closed\n", "").replacen(
        "limits: { cpu: 500ms }",
        "limits: { cpu: 500ms, pause: 300ms, body: 1KiB }",
        1,
    );
    for (send, failures) in [(vec![b'x'; 10], 1.0), (vec![b'x'; 2048], 0.0)] {
        let lg = legate().config(&yaml).start();
        let mut c = RawConn::connect(lg.addr("tcp")).await;
        c.write(&send).await;
        let (rest, closed) = c.read_until_close(HANG_GUARD).await;
        assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
        let n = send.len();
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, failures)
            .await;
        lg.assert_stat(&metric("pw_tcp_log"), 1.0).await;
        for (m, want) in [
            ("pw_tcp_down_close_local", 1.0),
            ("pw_tcp_up_close_local", 1.0),
            ("pw_tcp_down_close_remote", 0.0),
            ("pw_tcp_up_close_remote", 0.0),
        ] {
            let got = lg.stat(&metric(m)).await;
            assert_eq!(got, Some(want), "{m} after sending {n} bytes");
        }
    }
}

/// `yaml` with plugin `pw`'s `limits.pause` at 300 ms.
fn with_pause_limit(yaml: &str) -> String {
    let out = yaml.replacen(
        "limits: { cpu: 500ms }",
        "limits: { cpu: 500ms, pause: 300ms }",
        1,
    );
    assert_ne!(out, yaml);
    out
}

/// [`config`] in mode `tcp-tick` (the root context's tick resumes or
/// closes the connections waiting for it) with `opts` added to the plugin
/// configuration (`, new: true`).
fn tick_config(up: SocketAddr, opts: &str) -> String {
    config(
        up,
        &format!("{{ mode: tcp-tick, tick_ms: 20{opts} }}"),
        "",
        "",
    )
}

/// Contexts the guest's ticks acted on, and tick hostcalls that failed.
fn tick_acted() -> String {
    metric("pw_tick_acted")
}
fn tick_errors() -> String {
    metric("pw_tick_errors")
}

/// Envoy's `continueReading` from another callback: downstream data a
/// proxy-wasm filter holds (`Pause` with nothing outstanding: it is called
/// again with all of it as more arrives) goes on when the root context's
/// tick makes the connection effective and calls `resume_downstream`. The
/// line comes in many reads (over 100 KiB), data written while the
/// connection waits for the tick is held behind it, and later data passes:
/// all of it reaches the upstream, in order, nothing lost. No failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_tick_resumes_held_downstream_data() {
    let echo = tcp_echo_server().await;
    let lg = legate().config(&tick_config(echo.addr, "")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let line = [b"hel".to_vec(), vec![b'x'; 100 * 1024], b"lo\n".to_vec()].concat();
    c.write(&line[..3]).await;
    c.write(&line[3..]).await;
    c.write(b"more\n").await;
    let want = [line.clone(), b"more\n".to_vec()].concat();
    let got = c.read_exact(want.len(), HANG_GUARD).await.unwrap();
    assert!(got == want, "the echo differs from what was sent");
    // Resumed: data passes without waiting.
    c.write(b"later\n").await;
    assert_eq!(c.read_exact(6, HANG_GUARD).await.unwrap(), b"later\n");
    assert_eq!(echo.bytes.get(), want.len() + 6);
    lg.assert_stat(&tick_acted(), 1.0).await;
    lg.assert_stat(&tick_errors(), 0.0).await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
}

/// A tick's `close_downstream` (`proxy_close_stream` after
/// `proxy_set_effective_context`) closes a paused connection at once, as
/// Envoy closes it: the held line never reaches the upstream, the filter
/// sees a local close, and it is not a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_tick_closes_a_paused_connection() {
    let echo = tcp_echo_server().await;
    let lg = legate().config(&tick_config(echo.addr, "")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"close me\n").await;
    let (rest, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    assert_eq!(echo.bytes.get(), 0, "held data reached the upstream");
    lg.assert_stat(&tick_acted(), 1.0).await;
    lg.assert_stat(&tick_errors(), 0.0).await;
    lg.assert_stat(&metric("pw_tcp_down_close_local"), 1.0)
        .await;
    lg.assert_stat(&metric("pw_tcp_log"), 1.0).await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
}

/// Connections waiting for the tick at once (a filter that lets
/// connections through at a rate) are each resumed, each with its own data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_tick_resumes_concurrent_connections() {
    let echo = tcp_echo_server().await;
    let lg = legate().config(&tick_config(echo.addr, "")).start();
    let addr = lg.addr("tcp");
    let got = futures_util::future::join_all((0..8).map(|i| async move {
        let mut c = RawConn::connect(addr).await;
        let line = format!("connection {i}\n");
        c.write(line.as_bytes()).await;
        let got = c.read_exact(line.len(), HANG_GUARD).await.unwrap();
        (line, got)
    }))
    .await;
    for (line, got) in got {
        assert_eq!(String::from_utf8_lossy(&got), line);
    }
    lg.assert_stat(&tick_acted(), 8.0).await;
    lg.assert_stat(&tick_errors(), 0.0).await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
}

/// `Pause` from `proxy_on_new_connection` with nothing outstanding holds the
/// connection (no upstream connect, the client's bytes wait) until the tick
/// resumes it (`resume_downstream`); upstream data held the same way is
/// resumed by the tick's `resume_upstream` (Envoy answers `UNIMPLEMENTED`
/// there). The upstream greets first: the greeting reaches the client after
/// the tick, then the client's bytes are echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_tick_resumes_the_new_connection_and_upstream_data() {
    let up = greeting_server().await;
    let lg = legate()
        .config(&tick_config(up, ", new: true, up: true"))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"ping\n").await;
    let want = b"hello\nping\n";
    assert_eq!(c.read_exact(want.len(), HANG_GUARD).await.unwrap(), want);
    lg.assert_stat(&tick_acted(), 2.0).await;
    lg.assert_stat(&tick_errors(), 0.0).await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
}

/// A pause that nothing resumes (a line starting `never`) holds the data
/// until the plugin's `limits.pause`, then fails by the failure policy, as
/// for HTTP: fail closed, the connection closes and the data never reaches
/// the upstream; fail open, the filter is skipped and the data goes on.
/// Either way one failure is counted. The same for a new connection paused
/// with nothing outstanding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_wasm_tcp_pause_nothing_resumes_ends_at_the_pause_limit() {
    let echo = tcp_echo_server().await;
    for fail in ["closed", "open"] {
        let yaml = with_pause_limit(&tick_config(echo.addr, "")).replacen(
            "    proxy_wasm:\n",
            &format!("    fail: {fail}\n    proxy_wasm:\n"),
            1,
        );
        let lg = legate().config(&yaml).start();
        let before = echo.bytes.get();
        let mut c = RawConn::connect(lg.addr("tcp")).await;
        c.write(b"never\n").await;
        if fail == "closed" {
            let (rest, closed) = c.read_until_close(HANG_GUARD).await;
            assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
            assert_eq!(echo.bytes.get(), before, "held data reached the upstream");
        } else {
            assert_eq!(c.read_exact(6, HANG_GUARD).await.unwrap(), b"never\n");
            // Skipped for the rest of the connection.
            c.write(b"never again\n").await;
            assert_eq!(
                c.read_exact(12, HANG_GUARD).await.unwrap(),
                b"never again\n"
            );
        }
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 1.0)
            .await;
        lg.assert_stat(&tick_acted(), 0.0).await;
        drop(lg);

        // The new connection paused, never resumed.
        let yaml = with_pause_limit(&tick_config(echo.addr, ", new: true, never: true")).replacen(
            "    proxy_wasm:\n",
            &format!("    fail: {fail}\n    proxy_wasm:\n"),
            1,
        );
        let lg = legate().config(&yaml).start();
        let (before, connections) = (echo.bytes.get(), echo.connections.get());
        let mut c = RawConn::connect(lg.addr("tcp")).await;
        c.write(b"hi\n").await;
        if fail == "closed" {
            let (rest, closed) = c.read_until_close(HANG_GUARD).await;
            assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
            assert_eq!(echo.bytes.get(), before);
            assert_eq!(echo.connections.get(), connections, "connected upstream");
        } else {
            assert_eq!(c.read_exact(3, HANG_GUARD).await.unwrap(), b"hi\n");
        }
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 1.0)
            .await;
    }
}

/// [`config`] with the component fixture (tests/network-guest) as `pw`.
fn component_config(echo: SocketAddr, mode: &str, extra: &str, tls: &str) -> String {
    let proxy_wasm = config(echo, "x", extra, tls);
    let cut = proxy_wasm.find("    proxy_wasm:").unwrap();
    let module = proxy_wasm_guest().display().to_string();
    format!(
        "{}    config: {{ mode: {mode} }}\n",
        &proxy_wasm[..cut].replace(&module, &network_guest().display().to_string())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_network_filter_rewrites_and_sees_closes() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&component_config(echo.addr, "rewrite", "", ""))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"hello world").await;
    assert_eq!(c.read_exact(11, T).await.unwrap(), b"HELL0 W0RLD");
    c.write(b"props\n").await;
    let expected =
        format!("listener=tcp cluster=echo tls=none up={}\n", echo.addr).replace('O', "0");
    let got = c.read_exact(expected.len(), T).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&got), expected);
    c.stream.shutdown().await.unwrap();
    let (rest, closed) = c.read_until_close(T).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    assert_eq!(echo.bytes.get(), 11 + expected.len());
    lg.assert_stat(&calls("new_connection"), 1.0).await;
    lg.assert_stat_with(&calls("downstream_data"), |v| v >= 2.0, ">= 2")
        .await;
    lg.assert_stat(&calls("downstream_close"), 1.0).await;
    lg.assert_stat(&calls("upstream_close"), 1.0).await;
    lg.assert_stat(
        r#"legate_plugin_net_closes{plugin="pw",peer="downstream"}"#,
        1.0,
    )
    .await;
    lg.assert_stat(
        r#"legate_plugin_net_closes{plugin="pw",peer="upstream"}"#,
        1.0,
    )
    .await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_network_filter_closes_and_survives_a_trap() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&component_config(echo.addr, "close", "", ""))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"hi").await;
    assert_eq!(c.read_exact(2, T).await.unwrap(), b"hi");
    c.write(b"QUIT").await;
    let (rest, closed) = c.read_until_close(T).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    assert_eq!(echo.bytes.get(), 2);
    drop(lg);

    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&component_config(echo.addr, "trap", "", ""))
        .concurrency(1)
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"boom").await;
    let (rest, closed) = c.read_until_close(T).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    lg.assert_stat(r#"legate_plugin_traps_total{plugin="pw"}"#, 1.0)
        .await;
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"fine").await;
    assert_eq!(c.read_exact(4, T).await.unwrap(), b"fine");
    assert_eq!(echo.bytes.get(), 4);
    lg.assert_stat(r#"legate_plugin_instance_restarts_total{plugin="pw"}"#, 1.0)
        .await;
}

/// A network component that sleeps 5s in `on-downstream-data` (a WASI pollable,
/// where the epoch deadline never runs) under `cpu: 50ms` is stopped at the
/// wall-time bound: the connection is closed (fail closed), the call counts as a
/// timeout, and the worker serves the next connection with a new instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_network_component_is_stopped_at_the_wall_bound() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&component_config(echo.addr, "sleep", "", "").replace("cpu: 500ms", "cpu: 50ms"))
        .concurrency(1)
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"nap").await;
    // Not stopped, the call would hang (its sleep waits on the worker it
    // blocks; seen with the wall bound raised past the guard), or, had it
    // returned, let `nap` through to the echo: the close with nothing echoed
    // and the timeout counted below show it was stopped at the bound.
    let (rest, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    lg.assert_stat(r#"legate_plugin_timeouts_total{plugin="pw"}"#, 1.0)
        .await;
    lg.assert_stat(r#"legate_plugin_traps_total{plugin="pw"}"#, 0.0)
        .await;
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"fine").await;
    assert_eq!(c.read_exact(4, T).await.unwrap(), b"fine");
    assert_eq!(echo.bytes.get(), 4);
    lg.assert_stat(r#"legate_plugin_instance_restarts_total{plugin="pw"}"#, 1.0)
        .await;
}

/// `legate_plugin_memory_bytes` counts a worker's network-filter instance, and
/// drops it with the instance after a trap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_network_filter_memory_is_in_the_gauge() {
    const MEMORY: &str = r#"legate_plugin_memory_bytes{plugin="pw",worker="0"}"#;
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&component_config(echo.addr, "trap", "", ""))
        .concurrency(1)
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"fine").await;
    assert_eq!(c.read_exact(4, T).await.unwrap(), b"fine");
    lg.assert_stat_with(MEMORY, |v| v >= 65536.0, ">= one Wasm page")
        .await;
    let held = lg.stat(MEMORY).await.unwrap();
    let mut boom = RawConn::connect(lg.addr("tcp")).await;
    boom.write(b"boom").await;
    let (_, closed) = boom.read_until_close(T).await;
    assert!(closed);
    lg.assert_stat(MEMORY, 0.0).await;
    let mut again = RawConn::connect(lg.addr("tcp")).await;
    again.write(b"back").await;
    assert_eq!(again.read_exact(4, T).await.unwrap(), b"back");
    lg.assert_stat(MEMORY, held).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_network_filter_on_a_tls_listener() {
    let ca = Ca::new("tcp-filters-component");
    let cert = ca.server(&["db.example"]);
    let tls = cert.listener_tls_yaml();
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&component_config(echo.addr, "rewrite", "", &tls))
        .start();
    let mut s = tls_raw(lg.addr("tcp"), TlsOptions::new(&cert, "db.example"))
        .await
        .unwrap();
    s.write_all(b"props\n").await.unwrap();
    s.flush().await.unwrap();
    let expected = format!("listener=tcp cluster=echo tls=1.3 up={}\n", echo.addr);
    let mut got = vec![0u8; expected.len()];
    tokio::time::timeout(T, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got), expected);
}

#[test]
fn a_network_component_on_an_http_listener_is_refused() {
    let yaml = format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: l4 }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: / }}
            cluster: echo
clusters:
  - name: echo
    endpoints:
      - address: 127.0.0.1:1
plugins:
  - name: l4
    module: {}
    config: {{ mode: rewrite }}
",
        network_guest().display()
    );
    let e = match legate().config(&yaml).try_start() {
        Ok(_) => panic!("a network component was accepted on an HTTP listener"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("plugin `l4` is a network (L4) filter, but `http.filters` takes HTTP filters"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_network_filter_pauses_the_new_connection_on_a_callout() {
    let echo = tcp_echo_server().await;
    let az = authz_upstream().await;
    let cfg = |path: &str| {
        let yaml = component_config(
            echo.addr,
            &format!("callout, path: \"{path}\""),
            "    capabilities: { clusters: [authz] }\n",
            "",
        );
        with_cluster(&yaml, "authz", az.addr)
    };
    let lg = legate().config(&cfg("/check/tcp")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"data").await;
    assert_eq!(c.read_exact(4, T).await.unwrap(), b"data");
    assert_eq!(echo.connections.get(), 1);
    lg.assert_stat(&calls("callout_response"), 1.0).await;
    lg.assert_stat(r#"legate_cluster_upstream_rq_total{cluster="authz"}"#, 1.0)
        .await;
    drop(c);
    drop(lg);

    let lg = legate().config(&cfg("/check/deny")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"data").await;
    let (rest, closed) = c.read_until_close(T).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    assert_eq!(
        echo.connections.get(),
        1,
        "a denied connection reached the upstream"
    );
    lg.assert_stat(&calls("callout_response"), 1.0).await;
    // Closed before connecting: only the downstream side was open.
    lg.assert_stat(
        r#"legate_plugin_net_closes{plugin="pw",peer="downstream"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        lg.stat(r#"legate_plugin_net_closes{plugin="pw",peer="upstream"}"#)
            .await,
        None
    );
}

/// A filter paused on a callout (downstream data held) cancels that callout
/// while called for upstream data: nothing can resume the pause, so its
/// failure policy applies at once, not when the callout would have answered
/// (`authz` takes 2 s on `/check/slow`) and not never. Fail closed: the
/// connection closes; fail open: the held data goes on to the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_whose_callout_is_cancelled_fails_by_policy_at_once() {
    let az = authz_upstream().await;
    for fail in ["closed", "open"] {
        // An upstream that greets once the filter's callout reached `authz` (so
        // the filter is paused on it by then), then echoes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (checks, before) = (az.requests.clone(), az.requests.get());
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = listener.accept().await.unwrap();
            while checks.get() == before {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            s.write_all(b"hello\n").await.unwrap();
            let mut buf = [0u8; 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let yaml = component_config(
            addr,
            "cancel, path: \"/check/slow\"",
            &format!("    fail: {fail}\n    capabilities: {{ clusters: [authz] }}\n"),
            "",
        );
        let lg = legate()
            .config(&with_cluster(&yaml, "authz", az.addr))
            .start();
        let mut c = RawConn::connect(lg.addr("tcp")).await;
        c.write(b"ask").await;
        // A pause that still waited on the cancelled callout would never end
        // (its result is never delivered; the TCP idle timeout is 1h); one whose
        // callout was not cancelled would end with the callout's result (its
        // 1s timeout) and count a `callout_response` call.
        if fail == "closed" {
            let (rest, closed) = c.read_until_close(HANG_GUARD).await;
            assert!(
                closed,
                "not closed: the cancelled callout was waited for; got {rest:?}"
            );
        } else {
            assert_eq!(c.read_exact(9, HANG_GUARD).await.unwrap(), b"hello\nask");
        }
        // The cancelled callout delivered nothing, and was not waited out.
        lg.assert_stat(&calls("callout_response"), 0.0).await;
        lg.assert_stat(r#"legate_plugin_callout_timeouts_total{plugin="pw"}"#, 0.0)
            .await;
        lg.assert_stat(&calls("upstream_data"), 1.0).await;
        // The pause nothing could end is the filter's failure.
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 1.0)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_network_filter_reloads() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&component_config(echo.addr, "rewrite", "", ""))
        .concurrency(1)
        .start();
    let mut old = RawConn::connect(lg.addr("tcp")).await;
    old.write(b"one").await;
    assert_eq!(old.read_exact(3, T).await.unwrap(), b"0NE");
    let (status, body) = lg.admin_post("/plugins/pw/reload").await;
    assert_eq!(status, 200, "{body}");
    // The open connection keeps the instance it started on until its
    // listener, replaced by the reload, drains it (`drain_timeout`, 30 s).
    old.write(b"two").await;
    assert_eq!(old.read_exact(3, T).await.unwrap(), b"TW0");
    drop(old);
    // A new connection gets an instance of the reloaded filter; the old one is
    // freed (one instance on the one worker).
    let mut new = RawConn::connect(lg.addr("tcp")).await;
    new.write(b"foo").await;
    assert_eq!(new.read_exact(3, T).await.unwrap(), b"F00");
    lg.assert_stat(r#"legate_plugin_instances{plugin="pw"}"#, 1.0)
        .await;
}

/// TCP listener `tcp` to cluster `echo` with the component at `module` as
/// plugin `pw`, its `config` (a YAML flow mapping) and `extra` plugin keys.
fn sdk_config(echo: SocketAddr, module: &str, plugin_config: &str, extra: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: tcp
    address: 127.0.0.1:0
    tcp:
      cluster: echo
      filters: [{{ plugin: pw }}]
clusters:
  - name: echo
    endpoints:
      - address: {echo}
plugins:
  - name: pw
    module: {}
    limits: {{ cpu: 500ms }}
{extra}    config: {plugin_config}
",
        plugin_wasm(module).display()
    )
}

const SDK_GUEST: &str = "tests/network-sdk-guest";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_network_filter_ticks_per_instance() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&sdk_config(
            echo.addr,
            SDK_GUEST,
            "{ mode: tick, tick_ms: 20 }",
            "",
        ))
        .concurrency(1)
        .start();
    // The instance starts with the config, before any connection, and ticks
    // (counted by the host and by the guest).
    lg.assert_stat_with(&calls("tick"), |v| v >= 3.0, ">= 3")
        .await;
    lg.assert_stat_with(
        r#"legate_plugin_ticks_total{plugin="pw"}"#,
        |v| v >= 3.0,
        ">= 3",
    )
    .await;
    lg.assert_stat(r#"legate_plugin_instances{plugin="pw"}"#, 1.0)
        .await;
    // The first connection runs on that instance: its own count, read back
    // through the connection, has the ticks from before it (a new instance
    // would have none).
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"ticks?\n").await;
    let mut line = Vec::new();
    while line.last() != Some(&b'\n') {
        line.extend(c.read_exact(1, T).await.unwrap());
    }
    let n: u64 = std::str::from_utf8(&line)
        .unwrap()
        .trim()
        .strip_prefix("ticks=")
        .unwrap_or_else(|| panic!("unexpected reply {line:?}"))
        .parse()
        .unwrap();
    assert!(n >= 3, "the instance saw {n} ticks");
    c.write(b"plain").await;
    assert_eq!(c.read_exact(5, T).await.unwrap(), b"plain");
    // The load's check and the worker's one instance.
    assert_eq!(lg.stat(&calls("configure")).await, Some(2.0));
    // The interval is about 20 ms: over 300 ms, not hundreds of ticks.
    let before = lg.stat(&calls("tick")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = lg.stat(&calls("tick")).await.unwrap();
    assert!(
        (5.0..=40.0).contains(&(after - before)),
        "{} ticks in 300 ms at 20 ms",
        after - before
    );
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
    // The echo server saw the data but not the question, which the filter
    // answered in place.
    assert_eq!(echo.bytes.get(), 5 + line.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_network_filter_tick_callouts_are_answered() {
    let echo = tcp_echo_server().await;
    let az = authz_upstream().await;
    let yaml = with_cluster(
        &sdk_config(
            echo.addr,
            SDK_GUEST,
            "{ mode: tick, tick_ms: 20, tick_callout: true, path: /check/tick }",
            "    capabilities: { clusters: [authz] }\n",
        ),
        "authz",
        az.addr,
    );
    let lg = legate().config(&yaml).concurrency(1).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"go").await;
    assert_eq!(c.read_exact(2, T).await.unwrap(), b"go");
    lg.assert_stat_with(
        r#"legate_plugin_tick_answers_total{plugin="pw",status="200"}"#,
        |v| v >= 2.0,
        ">= 2",
    )
    .await;
    lg.assert_stat_with(&calls("tick_callout_response"), |v| v >= 2.0, ">= 2")
        .await;
    // Answered first: every answer was sent to the cluster before it.
    let answered = lg.stat(&calls("tick_callout_response")).await.unwrap();
    let sent = lg
        .stat(r#"legate_cluster_upstream_rq_total{cluster="authz"}"#)
        .await
        .unwrap();
    assert!(sent >= answered, "{sent} sent, {answered} answered");
    lg.assert_stat(r#"legate_plugin_callout_failures_total{plugin="pw"}"#, 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_in_on_tick_drops_the_instance_and_a_new_one_ticks_without_traffic() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&sdk_config(
            echo.addr,
            SDK_GUEST,
            "{ mode: tick, tick_ms: 20, tick_trap: 3 }",
            "",
        ))
        .concurrency(1)
        .start();
    let mut old = RawConn::connect(lg.addr("tcp")).await;
    old.write(b"one").await;
    assert_eq!(old.read_exact(3, T).await.unwrap(), b"one");
    // The instance (started with the config) traps at its third tick after
    // that data.
    lg.assert_stat(r#"legate_plugin_traps_total{plugin="pw"}"#, 1.0)
        .await;
    // Replaced without waiting for a connection (a plugin that ticks must go
    // on ticking on a worker without traffic), and the new one ticks (it saw
    // no data, so it does not trap).
    lg.assert_stat(r#"legate_plugin_instance_restarts_total{plugin="pw"}"#, 1.0)
        .await;
    lg.assert_stat(r#"legate_plugin_instances{plugin="pw"}"#, 1.0)
        .await;
    let ticks = lg.stat(&calls("tick")).await.unwrap();
    lg.assert_stat_with(&calls("tick"), |v| v >= ticks + 3.0, "3 more")
        .await;
    // The connection that started on the dead instance gets the failure
    // policy (closed).
    old.write(b"two").await;
    let (rest, closed) = old.read_until_close(T).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    // The load's check, the first instance and its replacement.
    assert_eq!(lg.stat(&calls("configure")).await, Some(3.0));
    // A new connection runs on the replacement (whose ticks then count to
    // its own trap: nothing is asserted after this data).
    let mut new = RawConn::connect(lg.addr("tcp")).await;
    new.write(b"three").await;
    assert_eq!(new.read_exact(5, T).await.unwrap(), b"three");
    assert_eq!(
        echo.bytes.get(),
        8,
        "data after the trap reached the upstream"
    );
}

#[test]
fn a_network_filter_tick_below_the_minimum_is_refused() {
    let yaml = sdk_config(
        "127.0.0.1:1".parse().unwrap(),
        SDK_GUEST,
        "{ mode: tick, tick_ms: 5 }",
        "",
    );
    let e = match legate().config(&yaml).try_start() {
        Ok(_) => panic!("a 5 ms tick was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("tick-interval-ms 5 is below the minimum of 10 ms"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_network_filter_holds_data_until_a_callout_answers() {
    let echo = tcp_echo_server().await;
    let az = authz_upstream().await;
    let cfg = |path: &str| {
        with_cluster(
            &sdk_config(
                echo.addr,
                SDK_GUEST,
                &format!("{{ mode: hold, path: \"{path}\" }}"),
                "    capabilities: { clusters: [authz] }\n",
            ),
            "authz",
            az.addr,
        )
    };
    let lg = legate().config(&cfg("/check/tcp")).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"data").await;
    // Held until the callout answered, then forwarded.
    assert_eq!(c.read_exact(4, T).await.unwrap(), b"data");
    lg.assert_stat(&calls("callout_response"), 1.0).await;
    // The connection's context remembers the answer: no second callout.
    c.write(b"more").await;
    assert_eq!(c.read_exact(4, T).await.unwrap(), b"more");
    assert_eq!(echo.bytes.get(), 8);
    lg.assert_stat(r#"legate_cluster_upstream_rq_total{cluster="authz"}"#, 1.0)
        .await;
    lg.assert_stat(&calls("callout_response"), 1.0).await;
    lg.assert_stat(&calls("downstream_data"), 2.0).await;
    c.stream.shutdown().await.unwrap();
    let (rest, closed) = c.read_until_close(T).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    lg.assert_stat(
        r#"legate_plugin_closes_total{plugin="pw",peer="downstream"}"#,
        1.0,
    )
    .await;
    lg.assert_stat(
        r#"legate_plugin_closes_total{plugin="pw",peer="upstream"}"#,
        1.0,
    )
    .await;
    drop(lg);

    // Denied: closed, nothing reaches the upstream.
    let lg = legate().config(&cfg("/check/deny")).start();
    let before = echo.bytes.get();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"data").await;
    let (rest, closed) = c.read_until_close(T).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    assert_eq!(echo.bytes.get(), before, "denied data reached the upstream");
    lg.assert_stat(&calls("callout_response"), 1.0).await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_network_filter_sees_the_connection() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&sdk_config(echo.addr, SDK_GUEST, "{ mode: facts }", ""))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"?").await;
    let want = format!("id=true listener=tcp cluster=echo up={}\n", echo.addr);
    let got = c.read_exact(want.len(), T).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&got), want);
    lg.assert_stat(&calls("downstream_data"), 1.0).await;
    // Not declared: never called.
    lg.assert_stat(&calls("new_connection"), 0.0).await;
    lg.assert_stat(&calls("upstream_data"), 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_filter_example_denies_redacts_and_counts() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&sdk_config(
            echo.addr,
            "examples/tcp-filter",
            "{ deny: [DROP], redact: [secret] }",
            "",
        ))
        .start();
    // Upstream data (the echo) is redacted; downstream data goes as is.
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let sent = b"my secret is secret\n";
    c.write(sent).await;
    let want = b"my ****** is ******\n";
    assert_eq!(c.read_exact(want.len(), T).await.unwrap(), want);
    assert_eq!(echo.bytes.get(), sent.len());
    // A denied word closes the connection before it reaches the upstream.
    c.write(b"DROP it\n").await;
    let (rest, closed) = c.read_until_close(T).await;
    assert!(closed && rest.is_empty(), "closed {closed}, rest {rest:?}");
    assert_eq!(
        echo.bytes.get(),
        sent.len(),
        "the denied data was forwarded"
    );
    let n = sent.len() as f64;
    lg.assert_stat(r#"legate_plugin_denied_total{plugin="pw"}"#, 1.0)
        .await;
    lg.assert_stat(
        r#"legate_plugin_bytes_total{plugin="pw",direction="downstream"}"#,
        n,
    )
    .await;
    lg.assert_stat(
        r#"legate_plugin_bytes_total{plugin="pw",direction="upstream"}"#,
        n,
    )
    .await;
    lg.assert_stat(&calls("downstream_close"), 1.0).await;
    lg.assert_stat(&calls("upstream_close"), 1.0).await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="pw"}"#, 0.0)
        .await;
}

/// A session a network filter closes is logged with cause `filter_close`
/// (status 200: the upstream was reached), with the bytes the client sent
/// and got through the filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_a_filter_closes_is_logged_so() {
    let echo = tcp_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let cfg = config(echo.addr, "{ mode: tcp-close }", "", "").replacen(
        "version: 1\n",
        &format!(
            "version: 1\naccess_log: {{ path: {}, flush_interval: 10ms }}\n",
            log.display()
        ),
        1,
    );
    let lg = legate().config(&cfg).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"hi\n").await;
    assert_eq!(c.read_exact(3, T).await.unwrap(), b"hi\n");
    c.write(b"QUIT\n").await;
    let (_, closed) = c.read_until_close(T).await;
    assert!(closed, "QUIT did not close the connection");
    let lines = access_log_until(&log, "the session's line", |l| !l.is_empty()).await;
    let v = &lines[0];
    assert_eq!(v["protocol"], "TCP", "{v}");
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["cause"], "filter_close", "{v}");
    assert_eq!(v["upstream"], echo.addr.to_string(), "{v}");
    assert_eq!(v["bytes_received"], 8, "{v}");
    assert_eq!(v["bytes_sent"], 3, "{v}");
}
