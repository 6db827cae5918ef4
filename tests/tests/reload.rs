//! Hot operations: config reload (`POST /reload`, the file watch), listener
//! add/remove, cluster health after a reload, plugin reload (`POST
//! /plugins/NAME/reload`, `GET /plugins`), and requests under steady load across
//! all of them failing none, and replaced plugins' instances (components and
//! proxy-wasm VMs) freed. Legate runs in-process from a real config file; the
//! SIGHUP and hot-restart tests run the real `legate` binary, and so does the test
//! of a host name that stops resolving, in a mount namespace with its own
//! `/etc/hosts` ([`spawn_with_hosts`]).

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use legate_tests::*;

/// Legate started in-process from a config file, so it can reload it.
fn start(yaml: &str, watch: Option<Duration>, concurrency: usize) -> LegateHandle {
    let b = legate().config(yaml).concurrency(concurrency).from_file();
    match watch {
        Some(interval) => b.watch(interval),
        None => b,
    }
    .start()
}

const RELOAD_OK: &str = r#"legate_config_reloads_total{result="success"}"#;
const RELOAD_FAILED: &str = r#"legate_config_reloads_total{result="failure"}"#;

/// Listener `web` (and `extra` if asked) routing everything to cluster `backend`
/// at `up`; `route_extra` lines go into the route (indented 12), `cluster_extra`
/// into the cluster (indented 4), `top` at the end.
fn yaml(up: SocketAddr, extra: bool, route_extra: &str, cluster_extra: &str, top: &str) -> String {
    let extra = if extra {
        "  - name: extra\n    address: 127.0.0.1:0\n    http:\n      routes: main\n"
    } else {
        ""
    };
    format!(
        "version: 1
admin:
  address: 127.0.0.1:0
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
{extra}routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match:
              prefix: /
            cluster: backend
{route_extra}clusters:
  - name: backend
    endpoints:
      - address: {up}
{cluster_extra}{top}"
    )
}

each_proto!(
    async fn reload_swaps_routes_and_keeps_connections(proto) {
        let a = upstream().name("a").start().await;
        let b = upstream().name("b").start().await;
        let lg = start(&yaml(a.addr, false, "", "", ""), None, 2);
        let web = lg.addr("web");
        let mut c = client(proto, web).await;
        let r = c.get("/x").send().await;
        assert_eq!(r.header("x-upstream"), Some("a"));

        let v = lg.reload_ok(&yaml(b.addr, false, "", "", "")).await;
        assert_eq!(v["result"], "ok");
        assert_eq!(v["listeners"]["kept"], json!(["web"]));
        assert_eq!(v["clusters"]["new_or_changed"], json!(["backend"]));

        // The same connection, now routed by the new config.
        let r = c.get("/x").send().await;
        assert_eq!(r.header("x-upstream"), Some("b"));
        assert!(!c.is_closed(), "the reload closed a connection of a kept listener");
        assert_eq!(lg.try_addr("web"), Some(web), "the kept listener moved");
        assert_eq!(lg.stat(RELOAD_OK).await, Some(1.0));
        let (_, last) = lg.admin(Method::GET, "/reload").await;
        let last: Value = serde_json::from_str(&last).unwrap();
        assert_eq!(last["generation"], 2);
        assert_eq!(last["last"]["result"], "ok");
    }
);

each_proto!(
    /// A cluster a reload changes keeps counting where it was (as Envoy keeps
    /// a cluster's stats by name): `/stats` never goes back.
    async fn a_changed_clusters_counters_go_on(proto) {
        let a = upstream().name("a").start().await;
        let lg = start(&yaml(a.addr, false, "", "", ""), None, 2);
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..3 {
            assert_eq!(c.get("/x").send().await.status, 200);
        }
        let total = r#"legate_cluster_upstream_rq_total{cluster="backend"}"#;
        lg.assert_stat(total, 3.0).await;
        let v = lg
            .reload_ok(&yaml(a.addr, false, "", "    connect_timeout: 2s\n", ""))
            .await;
        assert_eq!(v["clusters"]["new_or_changed"], json!(["backend"]));
        assert_eq!(c.get("/x").send().await.status, 200);
        lg.assert_stat(total, 4.0).await;
        // Gauges describe the new cluster.
        lg.assert_stat(
            r#"legate_cluster_upstream_rq_active{cluster="backend"}"#,
            0.0,
        )
        .await;
    }
);

each_proto!(
    async fn a_broken_config_changes_nothing(proto) {
        let a = upstream().name("a").start().await;
        let b = upstream().name("b").start().await;
        let lg = start(&yaml(a.addr, false, "", "", ""), None, 1);
        let mut c = client(proto, lg.addr("web")).await;

        // Valid YAML, invalid config: an unknown key in the cluster (line 22).
        let body = lg
            .reload_rejected(&yaml(b.addr, false, "", "    lb_polizy: random\n", ""))
            .await;
        assert!(body.contains("legate.yaml:22:"), "no file:line:col in: {body}");
        assert!(body.contains("lb_polizy"), "{body}");
        // Not YAML at all.
        let body = lg.reload_rejected("version: 1\nlisteners: [\n").await;
        assert!(body.contains("legate.yaml:"), "{body}");

        let r = c.get("/x").send().await;
        assert_eq!(r.header("x-upstream"), Some("a"), "a failed reload changed the routes");
        assert_eq!(lg.stat(RELOAD_FAILED).await, Some(2.0));
        assert_eq!(lg.stat(RELOAD_OK).await, Some(0.0));
        let (_, last) = lg.admin(Method::GET, "/reload").await;
        let last: Value = serde_json::from_str(&last).unwrap();
        assert_eq!(last["generation"], 1);
        assert_eq!(last["last"]["result"], "error");
        assert!(last["last"]["error"].as_str().unwrap().contains("legate.yaml:"));

        // A config that validates but cannot be applied (its listener's address is
        // taken) changes nothing either.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let bad = yaml(b.addr, false, "", "", "").replace(
            "  - name: web\n",
            &format!(
                "  - name: busy\n    address: {}\n    http:\n      routes: main\n  - name: web\n",
                taken.local_addr().unwrap()
            ),
        );
        let body = lg.reload_rejected(&bad).await;
        assert!(body.contains("listener `busy`"), "{body}");
        let r = c.get("/x").send().await;
        assert_eq!(r.header("x-upstream"), Some("a"));
    }
);

each_proto!(
    async fn listeners_are_added_and_removed(proto) {
        let a = upstream().name("a").start().await;
        let lg = start(&yaml(a.addr, false, "", "", ""), None, 2);
        let web = lg.addr("web");
        assert_eq!(lg.try_addr("extra"), None);

        let v = lg.reload_ok(&yaml(a.addr, true, "", "", "")).await;
        assert_eq!(v["listeners"]["added"], json!(["extra"]), "{v}");
        let extra = lg.addr("extra");
        let mut on_extra = client(proto, extra).await;
        let r = on_extra.get("/x").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(lg.try_addr("web"), Some(web));

        // Removing it: it stops accepting; its connection is closed gracefully.
        let v = lg.reload_ok(&yaml(a.addr, false, "", "", "")).await;
        assert_eq!(v["listeners"]["removed"], json!(["extra"]));
        assert_eq!(lg.try_addr("extra"), None);
        eventually(Duration::from_secs(3), "the removed listener refuses", || async {
            tokio::net::TcpStream::connect(extra).await.is_err().then_some(())
        })
        .await;
        match proto {
            // HTTP/2: a GOAWAY closes the idle connection.
            Proto::H2 => {
                eventually(Duration::from_secs(3), "the connection closes", || async {
                    on_extra.is_closed().then_some(())
                })
                .await
            }
            // HTTP/1.1: one more request is answered, with `Connection: close`.
            Proto::H1 => {
                let r = on_extra.get("/x").send().await;
                assert_eq!(r.status, 200);
                assert_eq!(r.header("connection"), Some("close"));
            }
        }
        let mut c = client(proto, web).await;
        assert_eq!(c.get("/x").send().await.status, 200);
    }
);

each_proto!(
    /// A reload that moves a listener to another address and puts another
    /// listener on its old one hands the socket over (binding it again would fail
    /// with `EADDRINUSE`: the socket is still open).
    async fn a_listener_moving_away_leaves_its_socket_to_another(proto) {
        let a = upstream().name("a").start().await;
        let (x, y) = (free_addr(), free_addr());
        let at = |yaml: String, name: &str, addr: SocketAddr| {
            yaml.replace(
                &format!("  - name: {name}\n    address: 127.0.0.1:0\n"),
                &format!("  - name: {name}\n    address: {addr}\n"),
            )
        };
        let lg = start(&at(yaml(a.addr, false, "", "", ""), "web", x), None, 1);
        let mut before = client(proto, x).await;
        assert_eq!(before.get("/x").send().await.status, 200);

        lg.reload_ok(&at(at(yaml(a.addr, true, "", "", ""), "web", y), "extra", x)).await;
        assert_eq!(lg.try_addr("web"), Some(y));
        assert_eq!(lg.try_addr("extra"), Some(x));
        for (addr, listener) in [(x, "extra"), (y, "web")] {
            let mut c = client(proto, addr).await;
            let r = c.get("/x").send().await;
            assert_eq!(r.status, 200, "{listener}: {}", r.text());
            lg.assert_stat(
                &format!(r#"legate_listener_requests_total{{listener="{listener}",class="2xx"}}"#),
                if listener == "web" { 2.0 } else { 1.0 },
            )
            .await;
        }
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_follow_the_reloaded_clusters() {
    let a = upstream().name("a").start().await;
    let b = upstream().name("b").start().await;
    let lg = start(&yaml(a.addr, false, "", "", ""), None, 1);
    let hc = "    health_check:
      http: { path: /healthz }
      interval: 50ms
      timeout: 1s
";
    // A new cluster with health checks, and the old one replaced by another
    // endpoint: both are checked after the reload.
    let top = format!(
        "  - name: checked
    endpoints:
      - address: {}
{hc}",
        b.addr
    );
    lg.reload_ok(&yaml(a.addr, false, "", hc, &top)).await;
    for cluster in ["backend", "checked"] {
        let series = format!("legate_cluster_health_check_success{{cluster=\"{cluster}\"}}");
        eventually(Duration::from_secs(5), &series, || async {
            lg.stat(&series).await.filter(|v| *v >= 2.0)
        })
        .await;
    }
    // A reload that keeps the clusters keeps their state: the counter continues.
    let before = lg
        .stat(r#"legate_cluster_health_check_success{cluster="checked"}"#)
        .await
        .unwrap();
    let v = lg
        .reload_ok(&yaml(a.addr, false, "            timeout: 5s\n", hc, &top))
        .await;
    assert_eq!(v["clusters"]["kept"], json!(["backend", "checked"]));
    let after = lg
        .stat(r#"legate_cluster_health_check_success{cluster="checked"}"#)
        .await
        .unwrap();
    assert!(
        after >= before,
        "a kept cluster lost its counters: {before} -> {after}"
    );
    eventually(
        Duration::from_secs(5),
        "checks continue after the reload",
        || async {
            lg.stat(r#"legate_cluster_health_check_success{cluster="checked"}"#)
                .await
                .filter(|v| *v >= after + 2.0)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watch_reloads_on_change() {
    let a = upstream().name("a").start().await;
    let b = upstream().name("b").start().await;
    let lg = start(
        &yaml(a.addr, false, "", "", ""),
        Some(Duration::from_millis(50)),
        1,
    );
    let web = lg.addr("web");
    lg.write_config(&yaml(b.addr, false, "", "", ""));
    eventually(Duration::from_secs(5), "the watch reloads", || async {
        let mut c = client(Proto::H1, web).await;
        (c.get("/x").send().await.header("x-upstream") == Some("b")).then_some(())
    })
    .await;
    // A broken file is tried once and counted; the config in force stays.
    lg.write_config("version: 1\nlisteners: [\n");
    eventually(Duration::from_secs(5), "the failure is counted", || async {
        lg.stat(RELOAD_FAILED).await.filter(|v| *v == 1.0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        lg.stat(RELOAD_FAILED).await,
        Some(1.0),
        "a broken file was retried"
    );
    let mut c = client(Proto::H1, web).await;
    assert_eq!(c.get("/x").send().await.header("x-upstream"), Some("b"));
    assert_eq!(lg.stat(RELOAD_OK).await, Some(1.0));
}

/// A file edited, reloaded by hand (`POST /reload`) and reverted within one
/// poll of the watch is put back in force: the watch had tried the reverted
/// content before and skipped it as tried, leaving the hand-reloaded edit in
/// force while the file said otherwise, with nothing in the counters to tell.
/// (A poll between the edit and the revert would hide the bug: the interval
/// is long, so that almost never happens; it cannot make the test fail.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_puts_back_a_file_reverted_after_a_reload_by_hand() {
    let a = upstream().name("a").start().await;
    let b = upstream().name("b").start().await;
    let good = yaml(a.addr, false, "", "", "");
    let lg = start(&good, Some(Duration::from_secs(3)), 1);
    let web = lg.addr("web");
    // The watch's first poll (at its start) has read the file.
    tokio::time::sleep(Duration::from_millis(300)).await;
    lg.write_config(&yaml(b.addr, false, "", "", ""));
    let (status, body) = lg.admin(Method::POST, "/reload").await;
    assert_eq!(status, 200, "{body}");
    let mut c = client(Proto::H1, web).await;
    assert_eq!(c.get("/x").send().await.header("x-upstream"), Some("b"));
    lg.write_config(&good);
    eventually(
        HANG_GUARD,
        "the watch puts the reverted file in force",
        || async {
            let mut c = client(Proto::H1, web).await;
            (c.get("/x").send().await.header("x-upstream") == Some("a")).then_some(())
        },
    )
    .await;
}

/// A new config and a new plugin module written one after the other: the
/// config reload fails while the module is half copied; once the module is
/// whole, the watch tries the config again (with it), instead of reloading
/// only the plugin under the old config and leaving the new one waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_retries_a_config_that_failed_on_its_module() {
    let a = upstream().name("a").start().await;
    let b = upstream().name("b").start().await;
    let dir = TempDir::new();
    let module = dir.path().join("filter.wasm");
    let good = std::fs::read(legate_tests::plugins::plugin_wasm("plugins/grpc-web")).unwrap();
    std::fs::write(&module, &good).unwrap();
    let with_plugin = |up| {
        yaml(up, false, "", "", "")
            + &format!("plugins:\n  - name: gw\n    module: {}\n", module.display())
    };
    let lg = start(&with_plugin(a.addr), Some(Duration::from_millis(50)), 1);
    let web = lg.addr("web");
    // The module half copied, then the new config.
    std::fs::write(&module, &good[..good.len() / 2]).unwrap();
    lg.write_config(&with_plugin(b.addr));
    eventually(Duration::from_secs(10), "the failed reload", || async {
        lg.stat(RELOAD_FAILED).await.filter(|v| *v >= 1.0)
    })
    .await;
    // The copy completes: a new build of the module (a custom section more).
    let mut newer = good.clone();
    newer.extend_from_slice(b"\x00\x04\x03new");
    std::fs::write(&module, &newer).unwrap();
    eventually(
        Duration::from_secs(10),
        "the new config in force",
        || async {
            let mut c = client(Proto::H1, web).await;
            (c.get("/x").send().await.header("x-upstream") == Some("b")).then_some(())
        },
    )
    .await;
}

/// An edit of the config file that lands while Legate starts (after it read
/// the file, while its plugins compile) is loaded by the file watch: the
/// config in force is the text Legate read, not what the file held once it
/// served. Before, the process hashed the file again when it was up, took the
/// edit for the config in force and never loaded it (`GET /reload` showed no
/// reload, the old routes served until the next edit or a SIGHUP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_made_while_starting_is_loaded_by_the_watch() {
    let a = upstream().name("a").start().await;
    let b = upstream().name("b").start().await;
    let lg = legate()
        .config(&yaml(a.addr, false, "", "", ""))
        .edit_while_starting(&yaml(b.addr, false, "", "", ""))
        .watch(Duration::from_millis(20))
        .start();
    let web = lg.addr("web");
    eventually(
        HANG_GUARD,
        "the edit made while starting in force",
        || async {
            let mut c = client(Proto::H1, web).await;
            (c.get("/x").send().await.header("x-upstream") == Some("b")).then_some(())
        },
    )
    .await;
    // The outcome is recorded just after the new config goes in force: a
    // request may see the one before `GET /reload` sees the other.
    let v = eventually(HANG_GUARD, "the reload's outcome recorded", || async {
        let (_, body) = lg.admin(Method::GET, "/reload").await;
        let v: Value = serde_json::from_str(&body).ok()?;
        (!v["last"].is_null()).then_some(v)
    })
    .await;
    assert_eq!(v["last"]["result"], "ok", "{v}");
    assert_eq!(v["last"]["trigger"], "watch", "{v}");
    assert_eq!(
        v["last"]["clusters"]["new_or_changed"],
        json!(["backend"]),
        "{v}"
    );
    lg.assert_stat(RELOAD_OK, 1.0).await;
}

/// What only building finds is told at its `file:line:col` too, with the
/// line: a new listener whose address another process holds (at its
/// `address`), so an operator reading the error knows which line to fix, as
/// for every other reload error. Before, the error named the listener and the
/// address only. The config in force goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_tells_a_bind_error_at_its_file_line_and_column() {
    let a = upstream().name("a").start().await;
    let lg = start(&yaml(a.addr, false, "", "", ""), None, 1);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().map(|addr| (busy, addr)).unwrap();
    let text = yaml(a.addr, true, "", "", "").replace(
        "  - name: extra\n    address: 127.0.0.1:0\n",
        &format!("  - name: extra\n    address: {}\n", busy.1),
    );
    let line = 1 + text
        .lines()
        .position(|l| l == format!("    address: {}", busy.1))
        .unwrap();
    lg.write_config(&text);
    let body = lg.assert_reload_rejected().await;
    let file = lg.config_path().display().to_string();
    assert!(
        body.starts_with(&format!(
            "{file}:{line}:5: error: listener `extra` on {}: ",
            busy.1
        )),
        "the error is at the listener's address: {body}"
    );
    assert!(
        body.contains(&format!("{line} |     address: {}", busy.1)),
        "{body}"
    );
    assert!(body.contains("Address already in use"), "{body}");
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(c.get("/x").send().await.header("x-upstream"), Some("a"));
    assert_eq!(
        lg.try_addr("extra"),
        None,
        "a failed reload added a listener"
    );
    lg.assert_stat(RELOAD_FAILED, 1.0).await;
}

/// The file watch notices `kv.tls` files renewed at their paths, as it does a
/// listener's or a cluster's, and reloads the config (the plugins using the
/// KV store load them again). Before, only a SIGHUP or `POST /reload` put a
/// renewed Redis CA or client certificate in force. KV connections are made
/// on first use: no Redis is needed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watch_reloads_when_kv_tls_files_are_renewed() {
    let up = upstream().start().await;
    let (first, second) = (Ca::new("redis CA"), Ca::new("renewed redis CA"));
    let dir = TempDir::new();
    let ca = dir.write("redis-ca.pem", std::fs::read(&first.cert_path).unwrap());
    let text = yaml(up.addr, false, "", "", "")
        + &format!(
            "kv:\n  backend: redis\n  url: rediss://127.0.0.1:1\n  tls:\n    ca: {}\n",
            ca.display()
        );
    let lg = start(&text, Some(Duration::from_millis(20)), 1);
    let staged = dir.write("staged.pem", std::fs::read(&second.cert_path).unwrap());
    std::fs::rename(&staged, &ca).unwrap();
    let v = eventually(HANG_GUARD, "a reload by the watch", || async {
        let (_, body) = lg.admin(Method::GET, "/reload").await;
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["last"]["result"] == "ok").then_some(v)
    })
    .await;
    assert_eq!(v["last"]["trigger"], "watch", "{v}");
    lg.assert_stat(RELOAD_OK, 1.0).await;
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(c.get("/").send().await.status, 200);
}

/// A reload that puts an expired certificate in place (a renewal that copied
/// the old certificate back, say) is `ok`, as at start — the certificate is
/// served anyway — but its outcome says so in `notes`, which name the listener,
/// the file and the date. Before, only a WARN line in the log told it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_notes_a_certificate_outside_its_validity() {
    let up = upstream().start().await;
    let ca = Ca::new("validity CA");
    let (good, expired) = (ca.server(&["a.example"]), ca.expired_server(&["a.example"]));
    let dir = TempDir::new();
    let cert = dir.write("cert.pem", std::fs::read(&good.cert).unwrap());
    let key = dir.write("key.pem", std::fs::read(&good.key).unwrap());
    let lg = start(&tls_yaml(&cert, &key, up.addr), None, 1);
    let v = lg.assert_reload_ok().await;
    assert_eq!(v["notes"], json!([]), "{v}");
    std::fs::write(&cert, std::fs::read(&expired.cert).unwrap()).unwrap();
    std::fs::write(&key, std::fs::read(&expired.key).unwrap()).unwrap();
    let v = lg.assert_reload_ok().await;
    assert_eq!(
        v["listeners"]["certificates_renewed"],
        json!(["web"]),
        "{v}"
    );
    let notes = v["notes"].to_string();
    assert!(
        notes.contains("listener `web`: certificate `")
            && notes.contains("cert.pem` expired on Feb  1 00:00:00 2020"),
        "{v}"
    );
}

/// Listener `web` terminating TLS with `cert` and `key`, routing to `up`.
fn tls_yaml(cert: &std::path::Path, key: &std::path::Path, up: SocketAddr) -> String {
    format!(
        "version: 1
admin:
  address: 127.0.0.1:0
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
    tls:
      certificates:
        - cert: {}
          key: {}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
",
        cert.display(),
        key.display(),
    )
}

/// The file watch notices a certificate renewed at the same paths (the config
/// untouched) and puts it in place, keeping the listener's connections. The
/// pair is replaced one file at a time, as a renewal tool writes it: the reload
/// between the two fails (the key does not match) and the second file's change
/// is tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watch_puts_a_renewed_certificate_in_place() {
    let up = upstream().start().await;
    let ca = Ca::new("watch CA");
    let (first, second) = (ca.server(&["a.example"]), ca.server(&["a.example"]));
    let dir = TempDir::new();
    let cert = dir.write("cert.pem", std::fs::read(&first.cert).unwrap());
    let key = dir.write("key.pem", std::fs::read(&first.key).unwrap());
    let lg = start(
        &tls_yaml(&cert, &key, up.addr),
        Some(Duration::from_millis(20)),
        1,
    );
    let web = lg.addr("web");
    let tls = || async {
        tls_client(Proto::H1, web, TlsOptions::new(&first, "a.example"))
            .await
            .unwrap()
    };
    let mut before = tls().await;
    assert_eq!(before.peer_cert.as_ref(), Some(&first.chain[0]));
    // Written elsewhere and renamed in, one file after the other.
    let staged = dir.write("staged.pem", std::fs::read(&second.cert).unwrap());
    std::fs::rename(&staged, &cert).unwrap();
    let staged = dir.write("staged.pem", std::fs::read(&second.key).unwrap());
    std::fs::rename(&staged, &key).unwrap();
    eventually(HANG_GUARD, "the renewed certificate served", || async {
        let c = tls().await;
        (c.peer_cert.as_ref() == Some(&second.chain[0])).then_some(())
    })
    .await;
    lg.assert_stat(RELOAD_OK, 1.0).await;
    let r = before.get("/").send().await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("connection"),
        None,
        "the old connection is drained"
    );
}

/// A renewed certificate whose reload fails for a passing reason is tried
/// again, though no file changes again: here the certificate is also the
/// client certificate of a `file` cluster, and the config edit landing with
/// the renewal changes that cluster (so the reload reads its endpoint file),
/// whose endpoint file is missing at that moment. The listener and the
/// cluster take the renewed certificate at once (a failed reload still
/// renews them); once the file is back, the watch's retry puts the edit in
/// force. Before, the watch tried each file content once: the old config
/// stayed until another change or a SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watch_retries_a_renewal_that_failed_for_a_passing_reason() {
    let up = upstream().start().await;
    let ca = Ca::new("watch retry CA");
    let (first, second) = (ca.server(&["a.example"]), ca.server(&["a.example"]));
    let dir = TempDir::new();
    let cert = dir.write("cert.pem", std::fs::read(&first.cert).unwrap());
    let key = dir.write("key.pem", std::fs::read(&first.key).unwrap());
    let eps = dir.path().join("peers.yaml");
    write_endpoints(&eps, up.addr);
    let text = |connect_timeout: &str| {
        tls_yaml(&cert, &key, up.addr)
            + &format!(
                "  - name: peers
    connect_timeout: {connect_timeout}
    discovery:
      type: file
      path: {}
    tls:
      sni: a.example
      client_cert: {}
      client_key: {}
",
                eps.display(),
                cert.display(),
                key.display()
            )
    };
    let lg = start(&text("1s"), Some(Duration::from_millis(20)), 1);
    let web = lg.addr("web");
    let served = || async {
        let c = tls_client(Proto::H1, web, TlsOptions::new(&first, "a.example"))
            .await
            .unwrap();
        c.peer_cert.clone()
    };
    assert_eq!(served().await.as_ref(), Some(&first.chain[0]));
    // The serial number of the client certificate `/certs` shows for `peers`.
    let peers_serial = || async {
        let v: Value = serde_json::from_str(&lg.admin_get("/certs").await.1).unwrap();
        let peers = v["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["cluster"] == "peers");
        peers.unwrap()["cert_chain"][0]["serial_number"].clone()
    };
    let serial_before = peers_serial().await;

    // The endpoint file is away (being rewritten, say) when the renewal lands.
    std::fs::remove_file(&eps).unwrap();
    let staged = dir.write("staged.pem", std::fs::read(&second.key).unwrap());
    std::fs::rename(&staged, &key).unwrap();
    let staged = dir.write("staged.pem", std::fs::read(&second.cert).unwrap());
    std::fs::rename(&staged, &cert).unwrap();
    let staged = dir.write("staged.yaml", text("2s"));
    std::fs::rename(&staged, lg.config_path()).unwrap();
    let missing = eps.display().to_string();
    eventually(
        HANG_GUARD,
        "a reload failing on the endpoint file",
        || async {
            let (_, body) = lg.admin(Method::GET, "/reload").await;
            let v: Value = serde_json::from_str(&body).ok()?;
            (v["last"]["result"] == "error"
                && v["last"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains(&missing)))
            .then_some(())
        },
    )
    .await;
    // The listener and the cluster take their renewed files though the
    // reload failed (they load); the edit waits for the retry.
    assert_eq!(served().await.as_ref(), Some(&second.chain[0]));
    assert_ne!(
        peers_serial().await,
        serial_before,
        "the cluster's renewed certificate"
    );

    // The file is back; no watched file changes again.
    write_endpoints(&eps, up.addr);
    eventually(HANG_GUARD, "the retried reload in force", || async {
        let (_, body) = lg.admin(Method::GET, "/reload").await;
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["last"]["result"] == "ok").then_some(v)
    })
    .await;
    let (_, body) = lg.admin(Method::GET, "/reload").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["last"]["result"], "ok", "{v}");
    assert_eq!(v["last"]["trigger"], "watch", "{v}");
    assert_eq!(
        v["last"]["clusters"]["new_or_changed"],
        json!(["peers"]),
        "{v}"
    );
    assert_eq!(served().await.as_ref(), Some(&second.chain[0]));
}

each_proto!(
    /// A certificate renewed at the same paths (the config unchanged) is served
    /// after a reload, to new connections, while connections made before keep
    /// working and are not drained (as Envoy's SDS rotates a certificate: before,
    /// the listener was replaced and every connection closed, WebSocket tunnels
    /// cut at the drain timeout); a renewal with a key that does not match fails
    /// the reload and keeps the old one.
    async fn reload_picks_up_a_renewed_certificate(proto) {
        let up = upstream().start().await;
        let ca = Ca::new("reload CA");
        let (first, second) = (ca.server(&["a.example"]), ca.server(&["a.example"]));
        let dir = TempDir::new();
        let cert = dir.write("cert.pem", std::fs::read(&first.cert).unwrap());
        let key = dir.write("key.pem", std::fs::read(&first.key).unwrap());
        let lg = start(&tls_yaml(&cert, &key, up.addr), None, 1);
        let web = lg.addr("web");
        let tls = || async { tls_client(proto, web, TlsOptions::new(&first, "a.example")).await.unwrap() };
        let mut before = tls().await;
        assert_eq!(before.peer_cert.as_ref(), Some(&first.chain[0]));
        assert_eq!(before.get("/").send().await.status, 200);

        // A mismatched pair (the new certificate, the old key) fails the reload.
        std::fs::write(&cert, std::fs::read(&second.cert).unwrap()).unwrap();
        let body = lg.assert_reload_rejected().await;
        assert!(body.contains("key"), "the error should name the key problem: {body}");
        let mut c = tls().await;
        assert_eq!(c.peer_cert.as_ref(), Some(&first.chain[0]), "a failed reload changed the certificate");
        assert_eq!(c.get("/").send().await.status, 200);

        std::fs::write(&key, std::fs::read(&second.key).unwrap()).unwrap();
        let v = lg.assert_reload_ok().await;
        assert_eq!(v["listeners"]["kept"], json!(["web"]), "{v}");
        assert_eq!(v["listeners"]["changed"], json!([]), "{v}");
        assert_eq!(v["listeners"]["certificates_renewed"], json!(["web"]), "{v}");
        let mut after = tls().await;
        assert_eq!(after.peer_cert.as_ref(), Some(&second.chain[0]), "the renewed certificate");
        assert_eq!(after.get("/").send().await.status, 200);
        assert_eq!(lg.try_addr("web"), Some(web), "the listener moved");
        // The connection from before the renewal is not drained: it keeps
        // serving (HTTP/1.1 without `Connection: close`, HTTP/2 without a GOAWAY).
        for _ in 0..3 {
            let r = before.get("/").send().await;
            assert_eq!(r.status, 200);
            assert_eq!(r.header("connection"), None);
        }
        assert!(!before.is_closed(), "the connection from before was closed");
        // Nothing changed: a reload renews nothing.
        let v = lg.assert_reload_ok().await;
        assert_eq!(v["listeners"]["certificates_renewed"], json!([]), "{v}");
        assert_eq!(lg.stat(RELOAD_OK).await, Some(2.0));
        assert_eq!(lg.stat(RELOAD_FAILED).await, Some(1.0));
    }
);

each_proto!(
    /// A certificate renewed while the config file does not load (a bad edit
    /// left on disk) is served all the same: the reload fails, naming the
    /// config's error, and the listener in force takes its renewed files, as
    /// Envoy's SDS rotates a certificate whatever becomes of the listener
    /// config. Before, the renewal waited for a config that loads, and the old
    /// certificate could expire in force meanwhile. A pair that does not match
    /// (the new certificate before its key) is still not put in place.
    async fn a_renewal_is_served_while_the_config_file_does_not_load(proto) {
        let up = upstream().start().await;
        let ca = Ca::new("renew-alone CA");
        let (first, second) = (ca.server(&["a.example"]), ca.server(&["a.example"]));
        let dir = TempDir::new();
        let cert = dir.write("cert.pem", std::fs::read(&first.cert).unwrap());
        let key = dir.write("key.pem", std::fs::read(&first.key).unwrap());
        let good = tls_yaml(&cert, &key, up.addr);
        let lg = start(&good, None, 1);
        let web = lg.addr("web");
        let tls = || async { tls_client(proto, web, TlsOptions::new(&first, "a.example")).await.unwrap() };
        let mut before = tls().await;
        assert_eq!(before.peer_cert.as_ref(), Some(&first.chain[0]));

        // An edit that does not load: a route to a cluster the file lacks.
        lg.write_config(&good.replace("cluster: backend", "cluster: nowhere"));
        // Half a renewal: the new certificate, the old key.
        std::fs::write(&cert, std::fs::read(&second.cert).unwrap()).unwrap();
        let body = lg.assert_reload_rejected().await;
        assert!(body.contains("nowhere"), "the error names the config's problem: {body}");
        let mut c = tls().await;
        assert_eq!(c.peer_cert.as_ref(), Some(&first.chain[0]), "a mismatched pair was put in place");
        assert_eq!(c.get("/").send().await.status, 200);

        // The renewal completes; the config file still does not load.
        std::fs::write(&key, std::fs::read(&second.key).unwrap()).unwrap();
        lg.assert_reload_rejected().await;
        let mut after = tls().await;
        assert_eq!(after.peer_cert.as_ref(), Some(&second.chain[0]), "the renewed certificate");
        assert_eq!(after.get("/").send().await.status, 200);
        let (_, last) = lg.admin(Method::GET, "/reload").await;
        let v: Value = serde_json::from_str(&last).unwrap();
        assert_eq!(v["last"]["result"], "error", "{v}");
        assert_eq!(v["last"]["certificates_renewed"], json!(["web"]), "{v}");
        // Open connections go on, not drained; nothing else of the bad edit applied.
        let r = before.get("/").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), None);
        assert_eq!(lg.stat(RELOAD_FAILED).await, Some(2.0));
        assert_eq!(lg.stat(RELOAD_OK).await, Some(0.0));
    }
);

each_proto!(
    /// As a listener's, a cluster's renewed TLS files go in force while the
    /// config file does not load: the cluster is rebuilt from the config in
    /// force with them (here its CA, renewed from one that does not verify the
    /// upstream to the one that does), everything else carried over. Before,
    /// the renewal waited for a config that loads (a client certificate could
    /// expire meanwhile, failing every connection to an upstream requiring it).
    async fn a_cluster_renewal_goes_in_force_while_the_config_file_does_not_load(proto) {
        let right = Ca::new("upstream CA");
        let wrong = Ca::new("other CA");
        let up = upstream().tls(right.server(&["backend.internal"])).start().await;
        let dir = TempDir::new();
        let ca = dir.write("ca.pem", std::fs::read(&wrong.cert_path).unwrap());
        let good = format!(
            "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - cluster: backend
clusters:
  - name: backend
    tls:
      sni: backend.internal
      ca: {}
    endpoints:
      - address: {}
",
            ca.display(),
            up.addr
        );
        let lg = start(&good, None, 1);
        let web = lg.addr("web");
        let mut c = client(proto, web).await;
        assert_eq!(c.get("/").send().await.status, 502, "the wrong CA verifies the upstream");

        lg.write_config(&good.replace("cluster: backend", "cluster: nowhere"));
        std::fs::write(&ca, std::fs::read(&right.cert_path).unwrap()).unwrap();
        let body = lg.assert_reload_rejected().await;
        assert!(body.contains("nowhere"), "the error names the config's problem: {body}");
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200, "the renewed CA: {}", r.text());
        let (_, last) = lg.admin(Method::GET, "/reload").await;
        let v: Value = serde_json::from_str(&last).unwrap();
        assert_eq!(v["last"]["result"], "error", "{v}");
        assert_eq!(v["last"]["clusters_renewed"], json!(["backend"]), "{v}");
        assert_eq!(v["generation"], 1, "the config in force is the same: {v}");
        // Its counters went on across the rebuild.
        lg.assert_stat(r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#, 1.0).await;
        lg.assert_stat(r#"legate_cluster_upstream_cx_connect_fail{cluster="backend"}"#, 1.0).await;
        // Nothing to renew: a second failed reload rebuilds nothing.
        lg.assert_reload_rejected().await;
        let (_, last) = lg.admin(Method::GET, "/reload").await;
        let v: Value = serde_json::from_str(&last).unwrap();
        assert_eq!(v["last"]["clusters_renewed"], json!([]), "{v}");
    }
);

each_proto!(
    /// A reload reads the files the config names as `legate check` and `legate
    /// run` do: a certificate that is not there, then a key that is not its
    /// certificate's, refuse it with the problem at its `file:line:col` and a
    /// help line (not only naming the listener, as building it would); the
    /// listener in force keeps serving, and once the files are fixed the same
    /// config reloads.
    async fn a_reload_checks_the_files_the_config_names(proto) {
        let up = upstream().start().await;
        let ca = Ca::new("files CA");
        let (first, second) = (ca.server(&["a.example"]), ca.server(&["a.example"]));
        let dir = TempDir::new();
        let cert = dir.write("cert.pem", std::fs::read(&first.cert).unwrap());
        let key = dir.write("key.pem", std::fs::read(&first.key).unwrap());
        let lg = start(&tls_yaml(&cert, &key, up.addr), None, 1);
        let web = lg.addr("web");
        let tls = || async { tls_client(proto, web, TlsOptions::new(&first, "a.example")).await.unwrap() };
        let mut before = tls().await;
        assert_eq!(before.get("/").send().await.status, 200);
        let still_first = || async {
            let mut c = tls().await;
            assert_eq!(c.peer_cert.as_ref(), Some(&first.chain[0]), "a refused reload changed the certificate");
            assert_eq!(c.get("/").send().await.status, 200);
        };

        // The new certificate is not there yet (`cert` is on line 11).
        let renewed = dir.path().join("renewed.pem");
        let body = lg.reload_rejected(&tls_yaml(&renewed, &key, up.addr)).await;
        assert!(
            body.contains("legate.yaml:11:11: error: listener `web`: cannot read certificate file `"),
            "{body}"
        );
        assert!(body.contains("help: check the path of the certificate file"), "{body}");
        let (_, last) = lg.admin(Method::GET, "/reload").await;
        let last: Value = serde_json::from_str(&last).unwrap();
        assert!(last["last"]["error"].as_str().unwrap().contains("legate.yaml:11:11: error:"), "{last}");
        assert_eq!(before.get("/").send().await.status, 200);
        still_first().await;

        // It is, but the key (line 12) is still the old certificate's.
        std::fs::write(&renewed, std::fs::read(&second.cert).unwrap()).unwrap();
        let body = lg.assert_reload_rejected().await;
        assert!(
            body.contains("legate.yaml:12:11: error: listener `web`: private key file `"),
            "{body}"
        );
        assert!(body.contains("does not match the certificate"), "{body}");
        assert!(body.contains("help: give the private key that belongs to the certificate"), "{body}");
        assert_eq!(before.get("/").send().await.status, 200);
        still_first().await;
        assert_eq!(lg.stat(RELOAD_FAILED).await, Some(2.0));

        // The key renewed too: the same config goes live.
        std::fs::write(&key, std::fs::read(&second.key).unwrap()).unwrap();
        lg.assert_reload_ok().await;
        let mut after = tls().await;
        assert_eq!(after.peer_cert.as_ref(), Some(&second.chain[0]), "the renewed certificate");
        assert_eq!(after.get("/").send().await.status, 200);
        assert_eq!(lg.stat(RELOAD_OK).await, Some(1.0));
    }
);

each_proto!(
    /// A cluster's TLS file renewed at the same path keeps the cluster, as
    /// Envoy's SDS rotation does: an endpoint ejected before the renewal stays
    /// ejected (a rebuilt cluster would start it healthy and send it requests
    /// again), and new connections use the renewed file.
    async fn a_renewed_upstream_ca_keeps_the_clusters_ejections(proto) {
        let ca = Ca::new("upstream CA");
        let good = upstream().name("good").tls(ca.server(&["backend.internal"])).start().await;
        let bad = upstream()
            .name("bad")
            .tls(ca.server(&["backend.internal"]))
            .status(500)
            .start()
            .await;
        let dir = TempDir::new();
        let ca_file = dir.write("ca.pem", std::fs::read(&ca.cert_path).unwrap());
        // The second endpoint, then the cluster's other keys.
        let cluster = format!(
            "      - address: {}
    tls:
      sni: backend.internal
      ca: {}
    outlier_detection:
      consecutive_5xx: 1
      base_ejection_time: 1h
",
            bad.addr,
            ca_file.display()
        );
        let config = yaml(good.addr, false, "", &cluster, "");
        let lg = start(&config, None, 1);
        let ejected = r#"legate_cluster_outlier_detection_ejections_active{cluster="backend"}"#;
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..4 {
            c.get("/").send().await;
        }
        assert_eq!(bad.requests.get(), 1, "round robin reaches the bad endpoint once");
        lg.assert_stat(ejected, 1.0).await;

        // The CA file renewed: a bundle that also holds a second CA.
        let bundle = [ca.cert_path.as_path(), Ca::new("next CA").cert_path.as_path()]
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect::<String>();
        std::fs::write(&ca_file, bundle).unwrap();
        let v = lg.assert_reload_ok().await;
        assert_eq!(v["clusters"]["kept"], json!(["backend"]), "{v}");
        assert_eq!(v["clusters"]["certificates_renewed"], json!(["backend"]), "{v}");
        assert_eq!(v["clusters"]["new_or_changed"], json!([]), "{v}");
        lg.assert_stat(ejected, 1.0).await;
        let mut fresh = client(proto, lg.addr("web")).await;
        for _ in 0..4 {
            assert_eq!(fresh.get("/").send().await.status, 200);
        }
        assert_eq!(bad.requests.get(), 1, "the ejected endpoint got requests again");
        let (_, certs) = lg.admin_get("/certs").await;
        assert!(certs.contains("next CA"), "{certs}");
    }
);

each_proto!(
    /// A cluster's CA file replaced at the same path (the config unchanged) is
    /// used after a reload: the cluster keeps its endpoints, with the new CA.
    async fn reload_picks_up_a_replaced_upstream_ca(proto) {
        let (right, wrong) = (Ca::new("upstream CA"), Ca::new("other CA"));
        let up = upstream().tls(right.server(&["backend.internal"])).start().await;
        let dir = TempDir::new();
        let ca = dir.write("ca.pem", std::fs::read(&wrong.cert_path).unwrap());
        let cluster_tls = format!(
            "    tls:\n      sni: backend.internal\n      ca: {}\n",
            ca.display()
        );
        let lg = start(&yaml(up.addr, false, "", &cluster_tls, ""), None, 1);
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/x").send().await.status, 502, "an untrusted upstream");

        std::fs::write(&ca, std::fs::read(&right.cert_path).unwrap()).unwrap();
        let v = lg.assert_reload_ok().await;
        assert_eq!(v["clusters"]["certificates_renewed"], json!(["backend"]), "{v}");
        let r = c.get("/x").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
);

/// What this process's tracing writes (installed on first use, for every
/// test of the process; nextest runs each test in its own).
fn captured_log() -> String {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static LOG: std::sync::OnceLock<Sink> = std::sync::OnceLock::new();
    let sink = LOG.get_or_init(|| {
        let sink = Sink(Arc::default());
        let writer = sink.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .with_writer(move || writer.clone())
            .init();
        sink
    });
    String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned()
}

/// A reload that fails (here: a new listener cannot bind) warns about none of
/// the changes it would have needed a restart for — it applied nothing; one
/// that succeeds does. Before, the `admin.address changed` warning came first,
/// then the error saying the config in force was unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_does_not_warn_about_what_it_never_applied() {
    captured_log();
    let a = upstream().start().await;
    let lg = start(&yaml(a.addr, false, "", "", ""), None, 1);
    let moved = free_addr();
    let moved_admin = |text: String| {
        text.replace(
            "admin:\n  address: 127.0.0.1:0\n",
            &format!("admin:\n  address: {moved}\n"),
        )
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let failing = moved_admin(yaml(a.addr, true, "", "", "")).replace(
        "name: extra\n    address: 127.0.0.1:0",
        &format!("name: extra\n    address: {}", taken.local_addr().unwrap()),
    );
    let body = lg.reload_rejected(&failing).await;
    assert!(body.contains("cannot bind"), "{body}");
    let log = captured_log();
    assert!(log.contains("config reload failed"), "{log}");
    assert!(!log.contains("admin.address changed"), "{log}");

    lg.reload_ok(&moved_admin(yaml(a.addr, false, "", "", "")))
        .await;
    let log = captured_log();
    assert!(log.contains("admin.address changed"), "{log}");
}

/// A reload does not rebind the admin listener nor reopen a changed access
/// log (its notes say so): `/config_dump`, the config in force, shows the
/// admin address and access log the process uses, not the file's new ones,
/// and the rest of the reloaded config. Before, it showed the reloaded values,
/// which were in force nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_shows_the_admin_address_and_access_log_in_force() {
    let (a, b) = (upstream().start().await, upstream().start().await);
    let text = yaml(a.addr, false, "", "", "");
    let lg = start(&text, None, 1);
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let moved = free_addr();
    let v = lg
        .reload_ok(
            &(yaml(b.addr, false, "", "", "").replace(
                "admin:\n  address: 127.0.0.1:0\n",
                &format!("admin:\n  address: {moved}\n"),
            ) + &format!("access_log:\n  path: {}\n", log.display())),
        )
        .await;
    let notes = v["notes"].to_string();
    assert!(notes.contains("admin.address changed"), "{v}");
    assert!(notes.contains("access_log changed"), "{v}");
    let (status, body) = lg.admin(Method::GET, "/config_dump").await;
    assert_eq!(status, 200, "{body}");
    let dump: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["admin"]["address"], "127.0.0.1:0", "{dump}");
    assert!(dump.get("access_log").is_none_or(Value::is_null), "{dump}");
    assert_eq!(
        dump["clusters"][0]["endpoints"][0]["address"],
        b.addr.to_string(),
        "{dump}"
    );
}

/// A reload that moves a listener to another address reports it as changed,
/// from the old address to the new, not as a new listener (before, it was
/// listed only under `added`, and nowhere as gone from its old address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_listener_is_reported_as_changed_with_its_addresses() {
    let up = upstream().start().await;
    let text = yaml(up.addr, false, "", "", "");
    let lg = start(&text, None, 1);
    let to = free_addr();
    let v = lg
        .reload_ok(&text.replace(
            "    address: 127.0.0.1:0\n    http:",
            &format!("    address: {to}\n    http:"),
        ))
        .await;
    let l = &v["listeners"];
    assert_eq!(l["changed"], json!(["web"]), "{v}");
    assert_eq!(l["added"], json!([]), "{v}");
    assert_eq!(
        l["moved"],
        json!([{ "name": "web", "from": "127.0.0.1:0", "to": to.to_string() }]),
        "{v}"
    );
    let mut c = client(Proto::H1, to).await;
    assert_eq!(c.get("/x").send().await.status, 200);
}

/// A reload that moves a listener to an address overlapping its own (the
/// same port, from 127.0.0.1 to the wildcard) cannot bind it while the old
/// socket listens: the error says the port is this Legate's own and how to
/// get there, where before it asked whether another process used it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_onto_an_overlapping_address_says_the_port_is_legates_own() {
    let up = upstream().start().await;
    let web = free_addr();
    let text = yaml(up.addr, false, "", "", "").replace(
        "    address: 127.0.0.1:0\n    http:",
        &format!("    address: {web}\n    http:"),
    );
    let lg = start(&text, None, 1);
    let wildcard = format!("0.0.0.0:{}", web.port());
    let e = lg
        .reload_rejected(&text.replace(&web.to_string(), &wildcard))
        .await;
    assert!(
        e.contains(&format!(
            "the other process is this Legate, whose listener `web` listens on {web}"
        )),
        "{e}"
    );
    assert!(e.contains("Reload in two steps"), "{e}");
    // Still served where it was.
    let mut c = client(Proto::H1, web).await;
    assert_eq!(c.get("/x").send().await.status, 200);
}

/// A config for [`discovery_follows_reloads`]: cluster `backend` discovered from
/// the endpoint file `eps`; `tag` is added as a response header by the route (a
/// change that keeps the cluster).
fn discovered_yaml(eps: &Path, tag: &str) -> String {
    format!(
        "version: 1
admin:
  address: 127.0.0.1:0
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match:
              prefix: /
            cluster: backend
            response_headers:
              add:
                x-tag: {tag}
clusters:
  - name: backend
    discovery:
      type: file
      path: {}
      watch_interval: 20ms
",
        eps.display()
    )
}

fn write_endpoints(path: &Path, up: SocketAddr) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("endpoints:\n  - address: \"{up}\"\n")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// File discovery across reloads: a reload pointing the cluster at another file
/// uses it (and watches it), and a reload that keeps the cluster keeps its
/// discovered endpoints and its watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_follows_reloads() {
    let a = upstream().name("a").start().await;
    let b = upstream().name("b").start().await;
    let c = upstream().name("c").start().await;
    let dir = TempDir::new();
    let (first, second) = (
        dir.path().join("first.yaml"),
        dir.path().join("second.yaml"),
    );
    write_endpoints(&first, a.addr);
    write_endpoints(&second, b.addr);
    let lg = start(&discovered_yaml(&first, "one"), None, 1);
    let web = lg.addr("web");
    let answered_by = |want: &'static str, tag: &'static str| async move {
        eventually(
            Duration::from_secs(5),
            &format!("answers from {want}"),
            || async {
                let mut cl = client(Proto::H1, web).await;
                let r = cl.get("/x").send().await;
                (r.header("x-upstream") == Some(want) && r.header("x-tag") == Some(tag))
                    .then_some(())
            },
        )
        .await;
    };
    answered_by("a", "one").await;

    // The cluster now reads another file.
    lg.reload_ok(&discovered_yaml(&second, "one")).await;
    answered_by("b", "one").await;
    // ... and watches it.
    write_endpoints(&second, c.addr);
    answered_by("c", "one").await;

    // A reload that keeps the cluster keeps what it discovered and its watch.
    let v = lg.reload_ok(&discovered_yaml(&second, "two")).await;
    assert_eq!(v["clusters"]["kept"], json!(["backend"]), "{v}");
    answered_by("c", "two").await;
    write_endpoints(&second, a.addr);
    answered_by("a", "two").await;
    // The first file is no longer watched.
    write_endpoints(&first, b.addr);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut cl = client(Proto::H1, web).await;
    assert_eq!(cl.get("/x").send().await.header("x-upstream"), Some("a"));
}

each_proto!(
    /// A reload that does not change a `file` cluster does not read its endpoint
    /// file again: the file missing for a moment (a deploy rewriting it) cannot
    /// fail an unrelated edit, and the cluster keeps the endpoints it found.
    async fn an_unchanged_cluster_is_not_loaded_again(proto) {
        let a = upstream().name("a").start().await;
        let dir = TempDir::new();
        let eps = dir.path().join("eps.yaml");
        write_endpoints(&eps, a.addr);
        let lg = start(&discovered_yaml(&eps, "one"), None, 1);
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/x").send().await;
        assert_eq!(r.header("x-upstream"), Some("a"));

        std::fs::remove_file(&eps).unwrap();
        let v = lg.reload_ok(&discovered_yaml(&eps, "two")).await;
        assert_eq!(v["clusters"]["kept"], json!(["backend"]), "{v}");
        let r = c.get("/x").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-upstream"), Some("a"));
        assert_eq!(r.header("x-tag"), Some("two"));
        assert_eq!(lg.stat(RELOAD_OK).await, Some(1.0));
        // The cluster's counters went on (both requests), not started again.
        assert_eq!(
            lg.stat(r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#).await,
            Some(2.0)
        );

        // A changed cluster is loaded, and its missing file is an error that
        // changes nothing.
        let changed = discovered_yaml(&eps, "three").replace(
            "      watch_interval: 20ms\n",
            "      watch_interval: 30ms\n",
        );
        let body = lg.reload_rejected(&changed).await;
        assert!(
            body.contains("cluster `backend`") && body.contains("cannot read endpoint file"),
            "{body}"
        );
        let r = c.get("/x").send().await;
        assert_eq!(r.header("x-tag"), Some("two"));
        assert_eq!(lg.stat(RELOAD_FAILED).await, Some(1.0));
    }
);

each_proto!(
    /// `max_connections` holds while a reload hands a changed listener over on
    /// the same socket: the connections of the old listener, still finishing
    /// their requests, count against the new one's limit (not 2× the limit).
    async fn max_connections_holds_across_a_listener_change(proto) {
        let (release, released) = tokio::sync::watch::channel(false);
        let up = upstream()
            .route("/slow", move |_req| {
                let mut released = released.clone();
                async move {
                    let _ = released.wait_for(|r| *r).await;
                    Response::new(Full::new(Bytes::from_static(b"slow")))
                }
            })
            .start()
            .await;
        let limited = |idle: &str| {
            yaml(up.addr, false, "", "", "").replace(
                "    http:\n      routes: main\n",
                &format!(
                    "    limits: {{ max_connections: 2, idle_timeout: {idle} }}\n    http:\n      routes: main\n"
                ),
            )
        };
        let lg = start(&limited("60s"), None, 2);
        let web = lg.addr("web");
        // Two connections at the limit, each with a request in flight.
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut c = client(proto, web).await;
            slow.push(tokio::spawn(async move {
                let r = c.get("/slow").send().await;
                (r.status, r.text())
            }));
        }
        eventually(Duration::from_secs(5), "both requests at the upstream", || async {
            (up.in_flight.get() == 2).then_some(())
        })
        .await;

        let v = lg.reload_ok(&limited("30s")).await;
        assert_eq!(v["listeners"]["changed"], json!(["web"]), "{v}");

        // A third connection, to the new listener, is over the limit: closed at
        // accept, as without a reload.
        let third = match Client::connect(proto, web).await {
            Ok(mut c) => c.get("/x").try_send().await.ok().map(|r| r.status),
            Err(_) => None,
        };
        assert_eq!(third, None, "a third connection was served over max_connections 2");
        lg.assert_stat(
            r#"legate_listener_connections_overflow_total{listener="web"}"#,
            1.0,
        )
        .await;

        // The old connections finish their requests; once they are closed their
        // slots are free again.
        release.send_replace(true);
        for t in slow {
            let (status, text) = t.await.unwrap();
            assert_eq!(status, 200, "{text}");
            assert_eq!(text, "slow");
        }
        lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 0.0)
            .await;
        let mut c = client(proto, web).await;
        assert_eq!(c.get("/x").send().await.status, 200);
        let mut d = client(proto, web).await;
        assert_eq!(d.get("/x").send().await.status, 200);
        assert_eq!(
            lg.stat(r#"legate_listener_connections_overflow_total{listener="web"}"#).await,
            Some(1.0)
        );
        assert_eq!(up.requests.get(), 4);
    }
);

/// A rewrite in place (same size, same inode) within the mtime tick the watch
/// already saw is still picked up: the watch re-hashes files whose mtime is recent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watch_sees_a_same_size_rewrite_in_place() {
    let a = upstream().name("a").start().await;
    let b = upstream().name("b").start().await;
    let (ya, yb) = (
        yaml(a.addr, false, "", "", ""),
        yaml(b.addr, false, "", "", ""),
    );
    assert_eq!(
        ya.len(),
        yb.len(),
        "the two configs must have the same size"
    );
    let lg = start(&ya, Some(Duration::from_millis(50)), 1);
    let web = lg.addr("web");
    let before = std::fs::metadata(lg.config_path()).unwrap();
    // Let the watch poll (and stamp) the current file a few times.
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(lg.config_path(), &yb).unwrap();
    // The same size, inode and mtime the watch stamped: only the contents differ.
    std::fs::File::options()
        .write(true)
        .open(lg.config_path())
        .unwrap()
        .set_modified(before.modified().unwrap())
        .unwrap();
    let after = std::fs::metadata(lg.config_path()).unwrap();
    assert_eq!(after.modified().unwrap(), before.modified().unwrap());
    eventually(Duration::from_secs(5), "the watch reloads", || async {
        let mut c = client(Proto::H1, web).await;
        (c.get("/x").send().await.header("x-upstream") == Some("b")).then_some(())
    })
    .await;
    // Counted just after the config went live: waited for, not read at once.
    lg.assert_stat(RELOAD_OK, 1.0).await;
}

/// What a steady load saw.
#[derive(Debug, Default)]
struct LoadResult {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Requests not written because the server had closed the connection
    /// gracefully (GOAWAY, `Connection: close`) first: sent again on a new
    /// connection, as any client does. Not failures: the request never left.
    resent: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl LoadResult {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap();
        if e.len() < 10 {
            e.push(what);
        }
    }
}

/// Steady load until `stop`: per protocol, one keep-alive connection (reopened
/// when the server closes it gracefully) and one new connection per request.
/// Every answer must be a 200.
fn steady_load(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    expect: Option<(&'static str, &'static str)>,
) -> (Arc<LoadResult>, Vec<tokio::task::JoinHandle<()>>) {
    let res = Arc::new(LoadResult::default());
    let mut tasks = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        for keep_alive in [true, false] {
            let (res, stop) = (res.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut conn: Option<Client> = None;
                while !stop.load(Ordering::Relaxed) {
                    if conn.as_ref().is_none_or(Client::is_closed) || !keep_alive {
                        conn = match Client::connect(proto, addr).await {
                            Ok(c) => Some(c),
                            Err(e) => {
                                res.fail(format!("{proto:?} connect: {e:#}"));
                                None
                            }
                        };
                    }
                    let Some(c) = conn.as_mut() else { continue };
                    match c.get("/load").try_send().await {
                        Ok(r) if r.status == 200 => match expect {
                            Some((name, value)) if r.header(name) != Some(value) => res.fail(
                                format!("{proto:?}: {name} = {:?}, not {value}", r.header(name)),
                            ),
                            _ => {
                                res.ok.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                        Ok(r) => res.fail(format!("{proto:?}: status {} {}", r.status, r.text())),
                        // hyper's `canceled`: the connection closed before the
                        // request was written (hyper-util's pool resends these).
                        // h2's remote GOAWAY with NO_ERROR on a request: a
                        // stream opened as the server's final graceful GOAWAY
                        // was on its way, so above its last stream id — never
                        // processed, and safe to send again (RFC 9113 §6.8).
                        Err(e)
                            if format!("{e:#}").contains("connection not ready")
                                || format!("{e:#}").contains("operation was canceled")
                                || format!("{e:#}").contains(
                                    "connection error received: not a result of an error",
                                ) =>
                        {
                            res.resent.fetch_add(1, Ordering::Relaxed);
                            conn = None;
                        }
                        Err(e) => res.fail(format!("{proto:?} keep_alive={keep_alive}: {e:#}")),
                    }
                }
            }));
        }
    }
    (res, tasks)
}

async fn finish_load(res: &LoadResult, stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failed = res.failed.load(Ordering::Relaxed);
    let ok = res.ok.load(Ordering::Relaxed);
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed: {:?}",
        ok + failed,
        res.errors.lock().unwrap()
    );
    assert!(ok > 0, "no request was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request() {
    let a = upstream().name("a").start().await;
    let b = upstream().name("b").start().await;
    let lg = start(&yaml(a.addr, false, "", "", ""), None, 2);
    let web = lg.addr("web");
    let stop = Arc::new(AtomicBool::new(false));
    let (res, tasks) = steady_load(web, stop.clone(), None);
    for i in 0..20 {
        let (up, route) = if i % 2 == 0 {
            (b.addr, "            timeout: 5s\n")
        } else {
            (a.addr, "")
        };
        // Every third config adds (and the next removes) a listener.
        lg.reload_ok(&yaml(up, i % 3 == 0, route, "", "")).await;
        if i % 5 == 0 {
            lg.reload_rejected(&yaml(up, false, "", "    bogus: 1\n", ""))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    finish_load(&res, &stop, tasks).await;
    assert_eq!(lg.stat(RELOAD_OK).await, Some(20.0));
    assert_eq!(lg.stat(RELOAD_FAILED).await, Some(4.0));
}

/// The guest with a custom section appended: the same behaviour, another module
/// (another SHA-256), as a rebuilt plugin would be.
fn guest_variant(n: u32) -> Vec<u8> {
    let mut bytes = std::fs::read(test_guest()).unwrap();
    let name = b"legate-test";
    let payload = n.to_le_bytes();
    let size = 1 + name.len() + payload.len();
    bytes.push(0); // custom section
    bytes.push(u8::try_from(size).unwrap());
    bytes.push(u8::try_from(name.len()).unwrap());
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(&payload);
    bytes
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(bytes)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// Writes a module file atomically.
fn write_module(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// [`yaml`] with plugin `tagger` (module `module`) on listener `web`.
fn plugin_yaml(up: SocketAddr, module: &Path) -> String {
    yaml(up, false, "", "", "").replace(
        "    http:\n      routes: main\n",
        "    http:\n      routes: main\n      filters: [{ plugin: tagger }]\n",
    ) + &format!(
        "plugins:
  - name: tagger
    module: {}
    config: {{ mode: headers }}
    limits: {{ cpu: 500ms }}
",
        module.display()
    )
}

async fn plugin_status(lg: &LegateHandle) -> Value {
    let (status, body) = lg.admin(Method::GET, "/plugins").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["plugins"][0].clone()
}

each_proto!(
    async fn a_plugin_reload_swaps_the_module(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let module = dir.path().join("tagger.wasm");
        write_module(&module, &guest_variant(1));
        let lg = start(&plugin_yaml(up.addr, &module), None, 2);
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));
        let st = plugin_status(&lg).await;
        assert_eq!(st["name"], "tagger");
        assert_eq!(st["sha256"], sha256_hex(&guest_variant(1)));
        assert_eq!(st["abi"], "legate:filter@0.1.3");
        assert_eq!(st["instances"], 1);
        assert!(st["loaded_at"].as_f64().unwrap() > 0.0);

        write_module(&module, &guest_variant(2));
        let (status, body) = lg.admin(Method::POST, "/plugins/tagger/reload").await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["result"], "ok");
        assert_eq!(v["sha256"], sha256_hex(&guest_variant(2)));
        // The same connection runs the new instance.
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));
        let st = plugin_status(&lg).await;
        assert_eq!(st["sha256"], sha256_hex(&guest_variant(2)));
        assert_eq!(st["last_reload"]["result"], "ok");
        // The old instance was freed when its snapshot went.
        assert_eq!(st["instances"], 1, "{st}");
        assert_eq!(
            lg.stat(r#"legate_plugin_reloads_total{plugin="tagger",result="success"}"#).await,
            Some(1.0)
        );

        let (status, body) = lg.admin(Method::POST, "/plugins/nope/reload").await;
        assert_eq!(status, 404, "{body}");
    }
);

each_proto!(
    /// A config reload carries over a plugin whose definition is unchanged, as
    /// Envoy reuses the VM of an unchanged plugin: its instance goes on (it is
    /// not configured again), `/plugins` keeps its load time and the outcome
    /// lists it as kept. A changed module (same path, other bytes) or a
    /// changed `config` loads it again.
    async fn a_config_reload_keeps_an_unchanged_plugins_instance(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let module = dir.path().join("tagger.wasm");
        write_module(&module, &guest_variant(1));
        let yaml = plugin_yaml(up.addr, &module);
        let lg = start(&yaml, None, 1);
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));
        let configure = r#"legate_plugin_calls_total{plugin="tagger",phase="configure"}"#;
        let configured = lg.stat(configure).await.unwrap();
        let st = plugin_status(&lg).await;
        let loaded_at = st["loaded_at"].clone();
        // The time the start took to load it (it was 0 after a start and
        // after every config reload).
        let load_ms = st["load_ms"].clone();
        assert!(load_ms.as_f64().unwrap() > 0.0, "{st}");

        // Another config text, the plugin's part unchanged: it carries over.
        let v = lg.reload_ok(&format!("{yaml}# a comment\n")).await;
        assert_eq!(v["plugins"]["kept"], serde_json::json!(["tagger"]), "{v}");
        assert_eq!(v["plugins"]["new_or_changed"], serde_json::json!([]), "{v}");
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));
        assert_eq!(lg.stat(configure).await, Some(configured), "configured again");
        let st = plugin_status(&lg).await;
        assert_eq!(st["loaded_at"], loaded_at, "{st}");
        assert_eq!(st["load_ms"], load_ms, "{st}");
        assert_eq!(st["instances"], 1, "{st}");

        // The module changed on disk: loaded again.
        write_module(&module, &guest_variant(2));
        let v = lg.reload_ok(&yaml).await;
        assert_eq!(v["plugins"]["new_or_changed"], serde_json::json!(["tagger"]), "{v}");
        let st = plugin_status(&lg).await;
        assert_eq!(st["sha256"], sha256_hex(&guest_variant(2)));
        assert!(st["load_ms"].as_f64().unwrap() > 0.0, "{st}");
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));
        let configured = lg.stat(configure).await.unwrap();
        // Its config changed: loaded again, and the new config runs.
        let v = lg
            .reload_ok(&yaml.replace("mode: headers", "mode: headers, tag: t2"))
            .await;
        assert_eq!(v["plugins"]["new_or_changed"], serde_json::json!(["tagger"]), "{v}");
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("t2"));
        assert!(lg.stat(configure).await.unwrap() > configured);
    }
);

/// A reload that renames a listener (and its route table) retires the old
/// listener: its open connections finish with the config they came in on.
/// Looked up in the new config by the old names, the next request of an old
/// keep-alive connection found no filter chain (and went upstream without its
/// filters) or no route table (a 500). HTTP/1.1: an HTTP/2 connection gets a
/// GOAWAY and opens no new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_listeners_connections_keep_its_filters() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let module = dir.path().join("tagger.wasm");
    write_module(&module, &guest_variant(1));
    let before = plugin_yaml(up.addr, &module);
    let lg = start(&before, None, 1);
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c.get("/x").send().await;
    assert_eq!(r.header("x-filter-resp"), Some("tagger"));

    let after = before
        .replace("  - name: web\n", "  - name: public\n")
        .replace("routes: main", "routes: main2")
        .replace("  - name: main\n", "  - name: main2\n");
    assert_ne!(after, before);
    let v = lg.reload_ok(&after).await;
    assert!(lg.try_addr("public").is_some(), "{v}");

    // The old connection's next request: still filtered, still routed.
    let r = c.get("/x").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-filter-resp"), Some("tagger"));
    assert_eq!(r.header("connection"), Some("close"));
    // New connections get the new listener, with the same filter.
    let mut c = client(Proto::H1, lg.addr("public")).await;
    let r = c.get("/x").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-filter-resp"), Some("tagger"));
}

/// A long-lived TCP-proxied connection does not keep the config it started
/// with: a plugin reload frees the replaced plugin's instances while the
/// connection stays open (it held the whole old config, every plugin
/// instance of it included, for as long as it lived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_does_not_pin_the_old_plugins() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().start().await;
    let dir = TempDir::new();
    let module = dir.path().join("tagger.wasm");
    write_module(&module, &guest_variant(1));
    let yaml = plugin_yaml(up.addr, &module).replace(
        "listeners:\n",
        "listeners:\n  - name: raw\n    address: 127.0.0.1:0\n    tcp:\n      cluster: backend\n",
    );
    let lg = start(&yaml, None, 1);
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(
        c.get("/x").send().await.header("x-filter-resp"),
        Some("tagger")
    );
    // A TCP connection through `raw`, kept open.
    let mut raw = tokio::net::TcpStream::connect(lg.addr("raw"))
        .await
        .unwrap();
    raw.write_all(b"GET /raw HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = vec![0u8; 4096];
    let n = raw.read(&mut got).await.unwrap();
    assert!(
        got[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got[..n])
    );

    write_module(&module, &guest_variant(2));
    let (status, body) = lg.admin(Method::POST, "/plugins/tagger/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        c.get("/x").send().await.header("x-filter-resp"),
        Some("tagger")
    );
    let st = plugin_status(&lg).await;
    assert_eq!(st["instances"], 1, "the old instance is still held: {st}");
    // The connection still works.
    raw.write_all(b"GET /raw HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let n = raw.read(&mut got).await.unwrap();
    assert!(got[..n].starts_with(b"HTTP/1.1 200"));
}

/// A WebSocket tunnel on a listener a reload replaced does not keep the old
/// config alive: a retired listener keeps its config only while it has
/// connections that may still send requests, and a tunnel sends none. (With
/// the tunnel counted as a connection of the listener, it kept every plugin
/// instance of the old config for as long as it lived.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_on_a_replaced_listener_does_not_pin_its_config() {
    let ws = upgrade_echo_server().await;
    let dir = TempDir::new();
    let module = dir.path().join("tagger.wasm");
    write_module(&module, &guest_variant(1));
    let before = plugin_yaml(ws.addr, &module);
    let lg = start(&before, None, 1);
    let mut t = RawConn::connect(lg.addr("web")).await;
    let head = t.websocket_handshake("/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    assert_eq!(plugin_status(&lg).await["instances"], 1);

    // The listener is replaced (renamed) and the plugin too (a new module).
    write_module(&module, &guest_variant(2));
    lg.reload_ok(&before.replace("  - name: web\n", "  - name: public\n"))
        .await;
    let mut c = client(Proto::H1, lg.addr("public")).await;
    assert_eq!(
        c.get("/x").send().await.header("x-filter-resp"),
        Some("tagger")
    );
    eventually(
        Duration::from_secs(5),
        "the old plugin instance freed while the tunnel is open",
        || async { (plugin_status(&lg).await["instances"] == 1).then_some(()) },
    )
    .await;
    // The tunnel still carries bytes.
    t.write(b"ping").await;
    assert_eq!(
        t.read_exact(4, Duration::from_secs(2)).await.unwrap(),
        b"ping"
    );
}

each_proto!(
    async fn the_watch_reloads_a_module_replaced_while_it_was_loading(proto) {
        // The status the watch compares a module file with must describe the
        // module loaded, not the file as it is after the load: read again, a
        // module replaced mid-load would look loaded and never be.
        let up = upstream().start().await;
        let dir = TempDir::new();
        let module = dir.path().join("tagger.wasm");
        let data = dir.path().join("data.txt");
        std::fs::write(&data, b"v1").unwrap();
        write_module(&module, &guest_variant(1));
        let yaml = plugin_yaml(up.addr, &module).replace(
            "    limits: { cpu: 500ms }\n",
            &format!(
                "    limits: {{ cpu: 500ms }}\n    files: {{ data: {} }}\n",
                data.display()
            ),
        );
        let lg = start(&yaml, Some(Duration::from_millis(50)), 1);
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));

        // The data file becomes a FIFO: a load reads the module, then blocks
        // opening the data file until the writer below opens it.
        std::fs::remove_file(&data).unwrap();
        assert!(Command::new("mkfifo").arg(&data).status().unwrap().success());
        let writer = {
            let (data, module) = (data.clone(), module.clone());
            tokio::task::spawn_blocking(move || {
                use std::io::Write as _;
                let mut fifo = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
                // The watch's reload has read module 2 by now: replace it.
                write_module(&module, &guest_variant(3));
                // Later loads read a plain file (the open FIFO stays readable).
                std::fs::remove_file(&data).unwrap();
                std::fs::write(&data, b"v3").unwrap();
                fifo.write_all(b"v2").unwrap();
            })
        };
        write_module(&module, &guest_variant(2));
        writer.await.unwrap();
        // Two reloads: module 2, then module 3 (the watch sees the file differ
        // from the module loaded).
        let reloads = r#"legate_plugin_reloads_total{plugin="tagger",result="success"}"#;
        eventually(Duration::from_secs(20), "module 3 reloaded", || async {
            (lg.stat(reloads).await == Some(2.0)).then_some(())
        })
        .await;
        assert_eq!(plugin_status(&lg).await["sha256"], sha256_hex(&guest_variant(3)));
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));
    }
);

each_proto!(
    async fn a_broken_plugin_keeps_the_old_version(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let module = dir.path().join("tagger.wasm");
        write_module(&module, &guest_variant(1));
        let lg = start(&plugin_yaml(up.addr, &module), None, 1);
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));

        write_module(&module, b"\0asm\x0d\0\x01\0 not a component");
        let (status, body) = lg.admin(Method::POST, "/plugins/tagger/reload").await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("plugin `tagger`"), "{body}");
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));
        let st = plugin_status(&lg).await;
        assert_eq!(st["sha256"], sha256_hex(&guest_variant(1)), "the status shows a module not in use");
        assert_eq!(st["last_reload"]["result"], "error");
        assert!(st["errors"]["last_load_error"].as_str().unwrap().contains("tagger"), "{st}");
        assert_eq!(
            lg.stat(r#"legate_plugin_reloads_total{plugin="tagger",result="failure"}"#).await,
            Some(1.0)
        );
        // A config reload reads the module too: it fails the same way, and changes
        // nothing.
        lg.assert_reload_rejected().await;
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));
    }
);

each_proto!(
    /// A module file replaced by something that is not Wasm: the reload's
    /// answer and `/plugins`' `last_load_error` say so in one line (they were
    /// wasmparser's `bad magic number - expected=[` over ten lines).
    async fn a_module_that_is_not_wasm_is_one_line_in_the_reload_and_plugins(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let module = dir.path().join("tagger.wasm");
        write_module(&module, &guest_variant(1));
        let lg = start(&plugin_yaml(up.addr, &module), None, 1);
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));

        write_module(&module, b"<html>not found</html>\n");
        let (status, body) = lg.admin(Method::POST, "/plugins/tagger/reload").await;
        assert_eq!(status, 400, "{body}");
        let want = format!(
            "plugin `tagger`: {} is not a Wasm file (it does not start with the `\\0asm` \
             magic bytes): point `module` at a .wasm built with `legate plugin build`",
            module.display()
        );
        assert!(body.contains(&want) && !body.contains("magic header"), "{body}");
        let st = plugin_status(&lg).await;
        let last = st["errors"]["last_load_error"].as_str().unwrap();
        assert!(last.contains(&want) && !last.contains('\n'), "{st}");
        assert_eq!(c.get("/x").send().await.header("x-filter-resp"), Some("tagger"));
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_watch_reloads_a_plugin() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let module = dir.path().join("tagger.wasm");
    write_module(&module, &guest_variant(1));
    let lg = start(
        &plugin_yaml(up.addr, &module),
        Some(Duration::from_millis(50)),
        1,
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    write_module(&module, &guest_variant(3));
    let want = sha256_hex(&guest_variant(3));
    eventually(
        Duration::from_secs(10),
        "the watch reloads the plugin",
        || async { (plugin_status(&lg).await["sha256"] == want.as_str()).then_some(()) },
    )
    .await;
    let st = plugin_status(&lg).await;
    assert_eq!(st["last_reload"]["trigger"], "watch");
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(
        c.get("/x").send().await.header("x-filter-resp"),
        Some("tagger")
    );
    assert_eq!(
        lg.stat(RELOAD_OK).await,
        Some(0.0),
        "a module change reloaded the whole config"
    );
}

/// Two plugins loaded from one module file: a change of the file reloads
/// both (the first one's poll used to mark the file seen for the second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_watch_reloads_every_plugin_of_a_file() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let module = dir.path().join("tagger.wasm");
    write_module(&module, &guest_variant(1));
    let yaml = plugin_yaml(up.addr, &module).replace(
        "filters: [{ plugin: tagger }]",
        "filters: [{ plugin: tagger }, { plugin: tagger2 }]",
    ) + &format!(
        "  - name: tagger2
    module: {}
    config: {{ mode: headers }}
    limits: {{ cpu: 500ms }}
",
        module.display()
    );
    let lg = start(&yaml, Some(Duration::from_millis(50)), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    write_module(&module, &guest_variant(4));
    let want = sha256_hex(&guest_variant(4));
    eventually(
        Duration::from_secs(10),
        "the watch reloads both plugins",
        || async {
            let (_, body) = lg.admin(Method::GET, "/plugins").await;
            let v: Value = serde_json::from_str(&body).unwrap();
            let all = v["plugins"].as_array().unwrap();
            (all.len() == 2 && all.iter().all(|p| p["sha256"] == want.as_str())).then_some(())
        },
    )
    .await;
}

/// [`yaml`] with three proxy-wasm plugins on listener `web`: `solo` (a VM of
/// its own) and `a`, `b` (one VM shared through `vm_id`).
fn proxy_wasm_yaml(up: SocketAddr) -> String {
    let plugin = |name: &str, mode: &str, vm_id: &str| {
        format!(
            "  - name: {name}\n    module: {}\n    limits: {{ cpu: 500ms }}\n    proxy_wasm:\n      \
             root_id: root_{name}\n{vm_id}      plugin_config: {{ mode: {mode}, tag: {name} }}\n",
            legate_tests::proxy_wasm::proxy_wasm_guest().display()
        )
    };
    let shared = "      vm_id: shared\n";
    yaml(up, false, "", "", "").replace(
        "    http:\n      routes: main\n",
        "    http:\n      routes: main\n      filters: [{ plugin: solo }, { plugin: a }, { plugin: b }]\n",
    ) + "plugins:\n"
        + &plugin("solo", "noop", "")
        + &plugin("a", "share", shared)
        + &plugin("b", "share", shared)
}

each_proto!(
    async fn a_reload_frees_the_replaced_proxy_wasm_vms(proto) {
        let up = upstream().start().await;
        let lg = start(&proxy_wasm_yaml(up.addr), None, 1);
        for round in 0..3 {
            if round > 0 {
                lg.assert_reload_ok().await;
            }
            let mut c = client(proto, lg.addr("web")).await;
            let r = c.get("/x").send().await;
            assert_eq!(r.status, 200, "round {round}: {}", r.text());
            drop(c);
            // One VM per plugin on the one worker: the replaced set's VMs were
            // dropped (their plugins left the gauge), not kept beside the new.
            for p in ["solo", "a", "b"] {
                let series = format!("legate_plugin_instances{{plugin=\"{p}\"}}");
                let mut seen = None;
                for _ in 0..50 {
                    seen = lg.stat(&series).await;
                    if seen == Some(1.0) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                assert_eq!(seen, Some(1.0), "round {round}: {series}");
            }
        }
        assert_eq!(lg.stat(RELOAD_OK).await, Some(2.0));
    }
);

/// [`yaml`] with the test guest as plugin `counting` (config `counting`) on
/// listener `web`, after proxy-wasm plugin `pw` (mode `counter`, which defines
/// its metrics in `on_configure`) if `with_pw`.
fn metrics_yaml(up: SocketAddr, counting: &str, with_pw: bool) -> String {
    let (filters, pw) = if with_pw {
        (
            "[{ plugin: pw }, { plugin: counting }]",
            format!(
                "  - name: pw\n    module: {}\n    proxy_wasm:\n      root_id: root_pw\n      \
                 plugin_config: {{ mode: counter }}\n",
                legate_tests::proxy_wasm::proxy_wasm_guest().display()
            ),
        )
    } else {
        ("[{ plugin: counting }]", String::new())
    };
    yaml(up, false, "", "", "").replace(
        "    http:\n      routes: main\n",
        &format!("    http:\n      routes: main\n      filters: {filters}\n"),
    ) + &format!(
        "plugins:\n{pw}  - name: counting\n    module: {}\n    config: {counting}\n",
        test_guest().display()
    )
}

/// Every series on `/stats` (`name{labels}`), by its value.
async fn all_series(lg: &LegateHandle) -> BTreeMap<String, String> {
    lg.stats()
        .await
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A refused reload leaves `/stats` as it was (Envoy leaves no trace of a
/// rejected config): the metrics the refused config's plugins defined while
/// they were configured to check them (a component's `define-counter`, a
/// proxy-wasm plugin's `proxy_define_metric`, the host's series of a new
/// plugin) are taken back, and the live plugin's series of the same names
/// keep their values. They stayed, at 0, counting against the plugin's cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_leaves_no_series_behind() {
    let up = upstream().start().await;
    let live = "{ mode: metrics, define_counter: live_defined }";
    let lg = start(&metrics_yaml(up.addr, live, false), None, 1);
    let mut c = client(Proto::H1, lg.addr("web")).await;
    for _ in 0..2 {
        assert_eq!(c.get("/x").send().await.status, 200);
    }
    let requests = r#"legate_plugin_requests{plugin="counting",method="GET"}"#;
    lg.assert_stat(requests, 2.0).await;
    let before = all_series(&lg).await;
    assert!(before.contains_key(r#"legate_plugin_live_defined{plugin="counting"}"#));

    // The same plugin defines its live metrics and a new one, then refuses its
    // config; a new proxy-wasm plugin before it was configured fine.
    let refused = "{ mode: metrics, define_counter: fresh, fail_configure: refused }";
    let err = lg
        .reload_rejected(&metrics_yaml(up.addr, refused, true))
        .await;
    assert!(err.contains("fail_configure"), "{err}");
    let after = all_series(&lg).await;
    let new: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert!(new.is_empty(), "series the refused config left: {new:?}");
    let gone: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    assert!(gone.is_empty(), "series the refused config took: {gone:?}");
    // Values stay too, but for the counts of the work the refused reload did:
    // the reload itself, the check's `configure` call, its module cache lookup.
    let work = [
        "legate_config_reload",
        "legate_plugin_calls_total",
        "legate_plugin_call_duration_seconds",
        "legate_plugin_memory_bytes",
        "legate_wasm_cache_",
    ];
    let changed: Vec<_> = before
        .keys()
        .filter(|k| !work.iter().any(|w| k.starts_with(w)) && after[*k] != before[*k])
        .collect();
    assert!(
        changed.is_empty(),
        "series the refused config changed: {changed:?}"
    );
    assert_eq!(lg.stat(RELOAD_FAILED).await, Some(1.0));

    // The live plugin counts on, into the same series.
    assert_eq!(c.get("/x").send().await.status, 200);
    lg.assert_stat(requests, 3.0).await;

    // The refused names are free: the config, fixed, goes live with them.
    lg.reload_ok(&metrics_yaml(
        up.addr,
        "{ mode: metrics, define_counter: fresh }",
        true,
    ))
    .await;
    lg.assert_stat(r#"legate_plugin_fresh{plugin="counting"}"#, 0.0)
        .await;
    lg.assert_stat(r#"legate_proxywasm_pw_gauge{plugin="pw"}"#, 42.0)
        .await;
    lg.assert_stat(requests, 3.0).await;
}

/// Plugin and config reloads, good and broken, under load: no request fails and
/// every answer went through the plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_reloads_under_load_fail_no_request() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let module = dir.path().join("tagger.wasm");
    write_module(&module, &guest_variant(0));
    let lg = start(&plugin_yaml(up.addr, &module), None, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let (res, tasks) = steady_load(
        lg.addr("web"),
        stop.clone(),
        Some(("x-filter-resp", "tagger")),
    );
    let mut failures = 0;
    for i in 1..=30u32 {
        if i % 7 == 0 {
            write_module(&module, b"garbage");
            failures += 1;
        } else {
            write_module(&module, &guest_variant(i));
        }
        let (status, body) = if i % 5 == 0 {
            lg.reload().await
        } else {
            lg.admin(Method::POST, "/plugins/tagger/reload").await
        };
        assert_eq!(status == 200, i % 7 != 0, "reload {i}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    finish_load(&res, &stop, tasks).await;
    assert!(failures > 0);
    // Instances of replaced versions are freed: at most one per worker remains.
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(c.get("/x").send().await.status, 200);
    let st = plugin_status(&lg).await;
    assert!(st["instances"].as_i64().unwrap() <= 2, "{st}");
}

/// The `legate` binary (the harness builds the workspace's binaries once).
fn legate_bin() -> PathBuf {
    workspace_bin("legate")
}

/// A `legate run` child process.
struct Child {
    child: std::process::Child,
}

impl Child {
    fn spawn(config: &Path, extra: &[&str]) -> Child {
        let child = Command::new(legate_bin())
            .args(["run", "--concurrency", "2", "--watch-interval", "0", "-c"])
            .arg(config)
            .args(extra)
            .env("LEGATE_LOG", "info")
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn legate");
        Child { child }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit; its exit status.
    async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        eventually(within, "the legate process exits", || {
            let r = self.child.try_wait().unwrap();
            async move { r }
        })
        .await
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn admin_at(admin: SocketAddr, method: Method, path: &str) -> Option<(u16, String)> {
    let mut c = Client::connect(Proto::H1, admin).await.ok()?;
    let r = c.request(method, path).try_send().await.ok()?;
    Some((r.status.as_u16(), r.text()))
}

/// A config on fixed (free) ports, since two processes must agree on them.
fn fixed_yaml(web: SocketAddr, admin: SocketAddr, up: SocketAddr) -> String {
    fixed_ports(&yaml(up, false, "", "", ""), web, admin)
}

/// `yaml` (of [`yaml`]'s shape) with listener `web` and the admin on fixed ports.
fn fixed_ports(yaml: &str, web: SocketAddr, admin: SocketAddr) -> String {
    yaml.replace(
        "  address: 127.0.0.1:0\nlisteners:",
        &format!("  address: {admin}\nlisteners:"),
    )
    .replace(
        "    address: 127.0.0.1:0\n    http:",
        &format!("    address: {web}\n    http:"),
    )
}

/// `legate run --upgrade` on `cfg`: waits for `old` to hand over and exit
/// cleanly, and checks the new process still runs; the new process.
async fn hot_restart(cfg: &Path, old: &mut Child) -> Child {
    let mut new = Child::spawn(cfg, &["--upgrade"]);
    let status = old.exited(Duration::from_secs(60)).await;
    assert!(status.success(), "the old process exited with {status}");
    assert!(
        new.child.try_wait().unwrap().is_none(),
        "the new process died"
    );
    new
}

async fn wait_ready(admin: SocketAddr) {
    eventually(Duration::from_secs(60), "legate is ready", || async {
        admin_at(admin, Method::GET, "/ready")
            .await
            .filter(|(s, _)| *s == 200)
            .map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config() {
    let a = upstream().name("a").start().await;
    let b = upstream().name("b").start().await;
    // The binary first: ports chosen before a slow build could be taken meanwhile.
    legate_bin();
    let (web, admin) = (free_addr(), free_addr());
    let dir = TempDir::new();
    let cfg = dir.write("legate.yaml", fixed_yaml(web, admin, a.addr));
    let p = Child::spawn(&cfg, &[]);
    wait_ready(admin).await;
    let mut c = client(Proto::H1, web).await;
    assert_eq!(c.get("/x").send().await.header("x-upstream"), Some("a"));
    std::fs::write(&cfg, fixed_yaml(web, admin, b.addr)).unwrap();
    p.signal("HUP");
    eventually(Duration::from_secs(10), "SIGHUP reloads", || async {
        let (_, body) = admin_at(admin, Method::GET, "/reload").await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["last"]["trigger"] == "signal" && v["last"]["result"] == "ok").then_some(())
    })
    .await;
    assert_eq!(c.get("/x").send().await.header("x-upstream"), Some("b"));
}

each_proto!(
    /// SIGHUP runs the file checks of `legate check` too, and the log says
    /// what `GET /reload` says: a key that is not its certificate's, at its
    /// `file:line:col`. The listener in force keeps serving; the fixed files
    /// reload at the next signal.
    async fn sighup_reports_a_file_problem_at_its_line(proto) {
        let up = upstream().start().await;
        // The binary first: ports chosen before a slow build could be taken meanwhile.
        legate_bin();
        let (web, admin) = (free_addr(), free_addr());
        let ca = Ca::new("sighup CA");
        let (first, second) = (ca.server(&["a.example"]), ca.server(&["a.example"]));
        let dir = TempDir::new();
        let cert = dir.write("cert.pem", std::fs::read(&first.cert).unwrap());
        let key = dir.write("key.pem", std::fs::read(&first.key).unwrap());
        let cfg = dir.write("legate.yaml", fixed_ports(&tls_yaml(&cert, &key, up.addr), web, admin));
        let log = dir.path().join("stderr.log");
        let child = Command::new(legate_bin())
            .args(["run", "--concurrency", "1", "--watch-interval", "0", "-c"])
            .arg(&cfg)
            .env("LEGATE_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn legate");
        let p = Child { child };
        wait_ready(admin).await;
        let tls = || async { tls_client(proto, web, TlsOptions::new(&first, "a.example")).await.unwrap() };
        let mut before = tls().await;
        assert_eq!(before.get("/").send().await.status, 200);
        let last_reload = |result: &'static str, generation: u64| async move {
            eventually(HANG_GUARD, &format!("a reload by SIGHUP: {result}"), || async {
                let (_, body) = admin_at(admin, Method::GET, "/reload").await?;
                let v: Value = serde_json::from_str(&body).ok()?;
                (v["last"]["trigger"] == "signal"
                    && v["last"]["result"] == result
                    && v["generation"] == generation)
                    .then_some(v)
            })
            .await
        };

        // The new key (line 12) is not the certificate's.
        let new_key = dir.write("new.key", std::fs::read(&second.key).unwrap());
        std::fs::write(&cfg, fixed_ports(&tls_yaml(&cert, &new_key, up.addr), web, admin)).unwrap();
        p.signal("HUP");
        let v = last_reload("error", 1).await;
        let want = "legate.yaml:12:11: error: listener `web`: private key file `new.key` does not match";
        let error = v["last"]["error"].as_str().unwrap();
        assert!(error.contains(want), "{error}");
        let text = std::fs::read_to_string(&log).unwrap();
        let line = text
            .lines()
            .position(|l| l.contains("config reload failed"))
            .unwrap_or_else(|| panic!("no failed reload in the log:\n{text}"));
        assert!(
            text.lines().skip(line).any(|l| l.contains(want)),
            "no `{want}` in the log:\n{text}"
        );
        assert_eq!(before.get("/").send().await.status, 200);
        let mut c = tls().await;
        assert_eq!(c.peer_cert.as_ref(), Some(&first.chain[0]), "a refused reload changed the certificate");
        assert_eq!(c.get("/").send().await.status, 200);

        // The certificate renewed too: the next signal puts both in place.
        std::fs::write(&cert, std::fs::read(&second.cert).unwrap()).unwrap();
        p.signal("HUP");
        last_reload("ok", 2).await;
        let mut after = tls().await;
        assert_eq!(after.peer_cert.as_ref(), Some(&second.chain[0]), "the renewed certificate");
        assert_eq!(after.get("/").send().await.status, 200);
    }
);

/// SIGTERM drains; a second SIGTERM (or SIGINT) during the drain stops at
/// once, cutting what is still open, instead of waiting out `drain_timeout`
/// (an hour here): the second Ctrl-C an operator reaches for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_the_drain_at_once() {
    let release = Arc::new(AtomicBool::new(false));
    let up = upstream().hold_until(&release).start().await;
    legate_bin();
    let (web, admin) = (free_addr(), free_addr());
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    // Lines stay in the writer's buffer until it is closed (flushed each minute).
    let top = format!(
        "access_log:\n  path: {}\n  flush_interval: 1m\n",
        log.display()
    );
    let text = fixed_ports(&yaml(up.addr, false, "", "", &top), web, admin).replacen(
        "version: 1\n",
        "version: 1\ndrain_timeout: 1h\n",
        1,
    );
    let cfg = dir.write("legate.yaml", text);
    let mut p = Child::spawn(&cfg, &[]);
    wait_ready(admin).await;
    // A request that ends before the signals: its line must not be lost.
    release.store(true, Ordering::SeqCst);
    let mut c = client(Proto::H1, web).await;
    assert_eq!(c.get("/done").send().await.status, 200);
    drop(c);
    release.store(false, Ordering::SeqCst);
    // A request the upstream holds: the drain waits for it.
    let held = tokio::spawn(async move {
        let mut c = client(Proto::H1, web).await;
        c.get("/held").try_send().await.map(|r| r.status)
    });
    eventually(HANG_GUARD, "the request is in flight", || async {
        let (_, body) = admin_at(admin, Method::GET, "/stats").await?;
        body.contains(r#"legate_listener_requests_active{listener="web"} 1"#)
            .then_some(())
    })
    .await;
    p.signal("TERM");
    eventually(HANG_GUARD, "draining", || async {
        let (status, _) = admin_at(admin, Method::GET, "/ready").await?;
        (status == 503).then_some(())
    })
    .await;
    p.signal("TERM");
    let status = p.exited(HANG_GUARD).await;
    assert_eq!(status.code(), Some(1), "{status:?}");
    release.store(true, Ordering::SeqCst);
    assert!(
        held.await.unwrap().is_err(),
        "the held request was answered"
    );
    // The access log was written out before the exit.
    let written = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(written.contains("\"/done\""), "{written:?}");
}

/// Log rotation as logrotate's default `create` does it: the file is moved,
/// then SIGUSR1 (or `POST /reopen_logs`) has Legate write what it holds to the
/// moved file and open the path again, as nginx and Envoy do. (SIGUSR1 killed
/// the process, losing the lines it held, and the file was never reopened.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log() {
    let up = upstream().start().await;
    legate_bin();
    let (web, admin) = (free_addr(), free_addr());
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let top = format!(
        "access_log:\n  path: {}\n  flush_interval: 1m\n",
        log.display()
    );
    let text = fixed_ports(&yaml(up.addr, false, "", "", &top), web, admin);
    let cfg = dir.write("legate.yaml", text);
    let mut p = Child::spawn(&cfg, &[]);
    wait_ready(admin).await;
    let rotations = [
        ("SIGUSR1", dir.path().join("access.log.1")),
        ("admin", dir.path().join("access.log.2")),
    ];
    for (i, (how, moved)) in rotations.iter().enumerate() {
        for proto in [Proto::H1, Proto::H2] {
            let mut c = client(proto, web).await;
            assert_eq!(c.get(&format!("/before-{i}")).send().await.status, 200);
        }
        std::fs::rename(&log, moved).unwrap();
        if *how == "SIGUSR1" {
            p.signal("USR1");
        } else {
            let (status, _) = admin_at(admin, Method::POST, "/reopen_logs").await.unwrap();
            assert_eq!(status, 200);
        }
        eventually(HANG_GUARD, "the path is opened again", || async {
            log.exists().then_some(())
        })
        .await;
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "{how} stopped the process"
        );
        let mut c = client(Proto::H1, web).await;
        assert_eq!(c.get(&format!("/after-{i}")).send().await.status, 200);
        let old = std::fs::read_to_string(moved).unwrap();
        assert_eq!(
            old.matches(&format!("\"/before-{i}\"")).count(),
            2,
            "{how}: {old}"
        );
        assert!(!old.contains(&format!("/after-{i}")), "{how}: {old}");
    }
    p.signal("TERM");
    assert!(p.exited(Duration::from_secs(30)).await.success());
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(
        new.contains("\"/after-1\"") && !new.contains("/before"),
        "{new}"
    );
}

/// Hot restarts under steady load (HTTP/1.1 and HTTP/2, keep-alive and new
/// connections): no connection refused, no request failed; and, as Envoy's,
/// counters carry over: the last process counts every request any of them
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_restart_under_load_fails_no_request() {
    let up = upstream().start().await;
    legate_bin();
    let (web, admin) = (free_addr(), free_addr());
    let dir = TempDir::new();
    let cfg = dir.write("legate.yaml", fixed_yaml(web, admin, up.addr));
    let mut current = Child::spawn(&cfg, &[]);
    wait_ready(admin).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (res, tasks) = steady_load(web, stop.clone(), None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let before = res.ok.load(Ordering::Relaxed);
        // The old process hands over and exits once drained.
        current = hot_restart(&cfg, &mut current).await;
        wait_ready(admin).await;
        eventually(Duration::from_secs(10), "requests continue", || async {
            (res.ok.load(Ordering::Relaxed) > before + 20).then_some(())
        })
        .await;
    }
    finish_load(&res, &stop, tasks).await;
    // The last old process sends its final counts as it exits (awaited above);
    // the new one adds them on its own thread.
    let ok = res.ok.load(Ordering::Relaxed) as f64;
    // The cluster's counters too (they were not carried: they started from
    // zero in each new process).
    for series in [
        r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
        r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#,
    ] {
        let what = format!("{series} reaches {ok}, every request answered");
        eventually(HANG_GUARD, &what, || async {
            let (_, body) = admin_at(admin, Method::GET, "/stats").await?;
            (parse_prometheus(&body).get(series) == Some(&ok)).then_some(())
        })
        .await;
    }
    current.signal("TERM");
    assert!(current.exited(Duration::from_secs(30)).await.success());
}

/// A hot restart's new process takes no connection before its `dns` cluster has
/// its first answer (the old process serves meanwhile), so a slow name server
/// fails no request across the switch. Before, the new process accepted at once
/// and answered 503 `no_healthy_upstream` until its first answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_restart_waits_for_dns_clusters_to_warm() {
    let up = upstream().name("a").start().await;
    let dns = DnsServer::start(&[std::net::Ipv4Addr::LOCALHOST]).await;
    legate_bin();
    let (web, admin) = (free_addr(), free_addr());
    let dir = TempDir::new();
    let yaml = dns_yaml(dns.addr, "up.legate.test", up.addr.port(), "");
    let cfg = dir.write("legate.yaml", fixed_ports(&yaml, web, admin));
    let mut old = Child::spawn(&cfg, &[]);
    wait_ready(admin).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (res, tasks) = steady_load(web, stop.clone(), Some(("x-upstream", "a")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Every answer now comes 700 ms late (within `dns_timeout`, 3s): the new
    // process's first one too.
    dns.state.delay_ms.store(700, Ordering::SeqCst);
    let mut new = hot_restart(&cfg, &mut old).await;
    wait_ready(admin).await;
    let before = res.ok.load(Ordering::Relaxed);
    eventually(Duration::from_secs(10), "requests continue", || async {
        (res.ok.load(Ordering::Relaxed) > before + 20).then_some(())
    })
    .await;
    finish_load(&res, &stop, tasks).await;
    new.signal("TERM");
    assert!(new.exited(Duration::from_secs(30)).await.success());
}

/// Runs `legate` in a mount namespace of its own where `/etc/hosts` and
/// `/etc/nsswitch.conf` are the given files (bind mounts: the machine's files are
/// not touched), so a test decides what host names resolve to and when they stop
/// resolving. With `hosts: files` alone nothing is ever asked of a name server.
/// Needs root (CAP_SYS_ADMIN) and util-linux's `unshare`; without them the test
/// fails saying so, unless `LEGATE_SKIP_NETNS=1`, when it is skipped (`None`).
fn spawn_with_hosts(hosts: &Path, nsswitch: &Path, config: &Path) -> Option<Child> {
    const SCRIPT: &str = r#"mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/nsswitch.conf && shift 2 && exec "$@""#;
    let probe = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            SCRIPT,
            "sh",
        ])
        .args([hosts, nsswitch])
        .arg("true")
        .output();
    let why = match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Some(format!("cannot run unshare: {e}")),
    };
    if let Some(why) = why {
        if std::env::var_os("LEGATE_SKIP_NETNS").is_some_and(|v| v == "1") {
            eprintln!("SKIPPED: no private mount namespace ({why}) (LEGATE_SKIP_NETNS=1)");
            return None;
        }
        panic!(
            "cannot bind-mount a private /etc/hosts in a mount namespace ({why}).\nThis test \
             needs root (CAP_SYS_ADMIN) and util-linux's unshare. Set LEGATE_SKIP_NETNS=1 to \
             skip it explicitly."
        );
    }
    let child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            SCRIPT,
            "sh",
        ])
        .args([hosts, nsswitch])
        .arg(legate_bin())
        .args(["run", "--concurrency", "2", "--watch-interval", "0", "-c"])
        .arg(config)
        .env("LEGATE_LOG", "info")
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn unshare … legate");
    // `unshare` and `sh` exec: the child is the legate process itself.
    Some(Child { child })
}

/// A cluster whose host name stops resolving keeps its addresses across a reload
/// that does not change it (Envoy keeps a cluster's last hosts when a
/// resolution fails); a reload that changes it needs the name to resolve, and
/// fails naming the cluster and the host when it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_name_fails_only_a_reload_that_changes_its_cluster() {
    let up = upstream().name("a").start().await;
    legate_bin();
    let (web, admin) = (free_addr(), free_addr());
    let dir = TempDir::new();
    let hosts = dir.write("hosts", "127.0.0.1 up.legate.test\n");
    let nsswitch = dir.write("nsswitch.conf", "hosts: files\n");
    let named = |route_extra: &str, cluster_extra: &str| {
        fixed_yaml(web, admin, up.addr)
            .replace(
                "            cluster: backend\n",
                &format!("            cluster: backend\n{route_extra}"),
            )
            .replace(
                &format!("      - address: {}\n", up.addr),
                &format!(
                    "      - address: up.legate.test:{}\n{cluster_extra}",
                    up.addr.port()
                ),
            )
    };
    let cfg = dir.write("legate.yaml", named("", ""));
    let Some(_p) = spawn_with_hosts(&hosts, &nsswitch, &cfg) else {
        return;
    };
    wait_ready(admin).await;
    let get = |proto| async move {
        let mut c = client(proto, web).await;
        let r = c.get("/x").send().await;
        assert_eq!(r.status, 200, "{proto:?}: {}", r.text());
        assert_eq!(r.header("x-upstream"), Some("a"), "{proto:?}");
        r.header("x-config").map(str::to_string)
    };
    for proto in [Proto::H1, Proto::H2] {
        assert_eq!(get(proto).await, None);
    }
    let stat = |series: &'static str| async move {
        let (_, text) = admin_at(admin, Method::GET, "/stats").await.unwrap();
        parse_prometheus(&text).get(series).copied()
    };

    // The name no longer resolves (written in place: the bind mount follows the
    // file, not its path). A reload that leaves the cluster alone applies.
    std::fs::write(&hosts, "# up.legate.test is gone\n").unwrap();
    let route_v2 = "            response_headers: { set: { x-config: v2 } }\n";
    std::fs::write(&cfg, named(route_v2, "")).unwrap();
    let (status, body) = admin_at(admin, Method::POST, "/reload").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["clusters"]["kept"], json!(["backend"]), "{body}");
    for proto in [Proto::H1, Proto::H2] {
        assert_eq!(get(proto).await.as_deref(), Some("v2"));
    }
    assert_eq!(stat(RELOAD_OK).await, Some(1.0));
    assert_eq!(
        stat(r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#).await,
        Some(4.0),
        "the cluster's counters went on"
    );

    // A reload that changes the cluster resolves it, and the failure says where.
    let route_v3 = "            response_headers: { set: { x-config: v3 } }\n";
    std::fs::write(&cfg, named(route_v3, "    connect_timeout: 2s\n")).unwrap();
    let (status, body) = admin_at(admin, Method::POST, "/reload").await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("cluster `backend`: cannot resolve host `up.legate.test`"),
        "{body}"
    );
    // At the cluster's place in the file, with its line.
    let line = 1 + named(route_v3, "    connect_timeout: 2s\n")
        .lines()
        .position(|l| l == "  - name: backend")
        .unwrap();
    assert!(
        body.starts_with(&format!(
            "{}:{line}:5: error: cluster `backend`: cannot resolve host",
            cfg.display()
        )),
        "{body}"
    );
    for proto in [Proto::H1, Proto::H2] {
        assert_eq!(
            get(proto).await.as_deref(),
            Some("v2"),
            "a failed reload applied"
        );
    }
    assert_eq!(stat(RELOAD_FAILED).await, Some(1.0));

    // Once the name resolves again, the same reload applies.
    std::fs::write(&hosts, "127.0.0.1 up.legate.test\n").unwrap();
    let (status, body) = admin_at(admin, Method::POST, "/reload").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["clusters"]["new_or_changed"],
        json!(["backend"]),
        "{body}"
    );
    for proto in [Proto::H1, Proto::H2] {
        assert_eq!(get(proto).await.as_deref(), Some("v3"));
    }
}

/// A hot restart whose config renames a listener (same address) takes the
/// running process's socket for it instead of binding the address again, which
/// would fail with `EADDRINUSE` while the old process holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_restart_adopts_a_renamed_listeners_socket() {
    let up = upstream().name("a").start().await;
    legate_bin();
    let (web, admin) = (free_addr(), free_addr());
    let dir = TempDir::new();
    let cfg = dir.write("legate.yaml", fixed_yaml(web, admin, up.addr));
    let mut old = Child::spawn(&cfg, &[]);
    wait_ready(admin).await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = client(proto, web).await;
        assert_eq!(c.get("/x").send().await.status, 200, "{proto:?}");
    }

    std::fs::write(
        &cfg,
        fixed_yaml(web, admin, up.addr).replace("  - name: web\n", "  - name: edge\n"),
    )
    .unwrap();
    let mut new = Child::spawn(&cfg, &["--upgrade"]);
    // Either the old process drains and exits (the new one took over) or the new
    // one fails to start; whichever comes first.
    eventually(Duration::from_secs(60), "the handover", || {
        let new_exit = new.child.try_wait().unwrap();
        let old_exit = old.child.try_wait().unwrap();
        async move {
            if let Some(s) = new_exit {
                panic!("the new process exited with {s} (see its log above)");
            }
            old_exit
        }
    })
    .await;
    wait_ready(admin).await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = client(proto, web).await;
        let r = c.get("/x").send().await;
        assert_eq!(r.status, 200, "{proto:?}");
        assert_eq!(r.header("x-upstream"), Some("a"));
    }
    let (_, text) = admin_at(admin, Method::GET, "/stats").await.unwrap();
    assert_eq!(
        parse_prometheus(&text)
            .get(r#"legate_listener_requests_total{listener="edge",class="2xx"}"#)
            .copied(),
        Some(2.0),
        "{text}"
    );
    new.signal("TERM");
    assert!(new.exited(Duration::from_secs(30)).await.success());
    drop(old);
}

/// A hot restart applies a changed `admin.address`: the new process binds it
/// and the old address closes with the old process. Before, the new process
/// adopted the old admin socket whatever its config said, so moving the admin
/// API off an exposed address and upgrading left it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_restart_moves_the_admin_listener() {
    let up = upstream().start().await;
    legate_bin();
    let (web, old_admin, new_admin) = (free_addr(), free_addr(), free_addr());
    let dir = TempDir::new();
    let cfg = dir.write("legate.yaml", fixed_yaml(web, old_admin, up.addr));
    let mut old = Child::spawn(&cfg, &[]);
    wait_ready(old_admin).await;

    std::fs::write(&cfg, fixed_yaml(web, new_admin, up.addr)).unwrap();
    let mut new = hot_restart(&cfg, &mut old).await;
    wait_ready(new_admin).await;
    assert!(
        admin_at(old_admin, Method::GET, "/ready").await.is_none(),
        "the old admin address {old_admin} still answers"
    );
    let mut c = client(Proto::H1, web).await;
    assert_eq!(c.get("/x").send().await.status, 200);
    new.signal("TERM");
    assert!(new.exited(Duration::from_secs(30)).await.success());
}

/// After a hot restart whose config drops a listener and moves the admin
/// address, the old process, still draining a request, stops listening on the
/// sockets the new process did not take: a client is refused there at once,
/// as on SIGTERM or a reload that removes a listener. Before, the old process
/// kept every socket listening until it exited (it skipped the `shutdown` of
/// all of them once it had handed over): clients connected, hung in a backlog
/// no one accepted from, then got a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_restart_closes_the_sockets_the_new_process_did_not_take() {
    let release = Arc::new(AtomicBool::new(false));
    let up = upstream().hold_until(&release).start().await;
    legate_bin();
    let (web, extra, old_admin, new_admin) = (free_addr(), free_addr(), free_addr(), free_addr());
    let dir = TempDir::new();
    let config = |admin: SocketAddr, with_extra: bool| {
        let text = fixed_ports(&yaml(up.addr, false, "", "", ""), web, admin).replacen(
            "version: 1\n",
            "version: 1\ndrain_timeout: 1h\n",
            1,
        );
        if with_extra {
            text.replace(
                "routes:\n  - name: main",
                &format!(
                    "  - name: extra\n    address: {extra}\n    http:\n      routes: main\n\
                     routes:\n  - name: main"
                ),
            )
        } else {
            text
        }
    };
    let cfg = dir.write("legate.yaml", config(old_admin, true));
    let mut old = Child::spawn(&cfg, &[]);
    wait_ready(old_admin).await;
    drop(
        tokio::net::TcpStream::connect(extra)
            .await
            .expect("listener `extra` serves"),
    );
    // A request the upstream holds keeps the old process draining.
    let held = tokio::spawn(async move {
        let mut c = client(Proto::H1, web).await;
        c.get("/held").try_send().await.map(|r| r.status)
    });
    eventually(HANG_GUARD, "the request is in flight", || async {
        let (_, body) = admin_at(old_admin, Method::GET, "/stats").await?;
        body.contains(r#"legate_listener_requests_active{listener="web"} 1"#)
            .then_some(())
    })
    .await;

    std::fs::write(&cfg, config(new_admin, false)).unwrap();
    let log = dir.path().join("new.log");
    let mut new = Child {
        child: Command::new(legate_bin())
            .args([
                "run",
                "--concurrency",
                "2",
                "--watch-interval",
                "0",
                "--upgrade",
                "-c",
            ])
            .arg(&cfg)
            .env("LEGATE_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn legate"),
    };
    // The new process logs this once the old one confirmed the handover, which
    // it does after it began its drain.
    eventually(Duration::from_secs(60), "the handover", || {
        let exited = new.child.try_wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move {
            if let Some(s) = exited {
                panic!("the new process exited with {s}:\n{text}");
            }
            text.contains("is draining").then_some(())
        }
    })
    .await;
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old process is draining"
    );
    for (what, addr) in [
        ("the dropped listener", extra),
        ("the old admin address", old_admin),
    ] {
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{what} {addr} still listens in the draining old process: {refused:?}"
        );
    }
    // The kept listener serves, from the new process.
    release.store(true, Ordering::SeqCst);
    wait_ready(new_admin).await;
    let mut c = client(Proto::H1, web).await;
    assert_eq!(c.get("/x").send().await.status, 200);
    // The held request finished in the old process, which then exited.
    assert_eq!(held.await.unwrap().map(|s| s.as_u16()).ok(), Some(200));
    assert!(old.exited(HANG_GUARD).await.success());
    new.signal("TERM");
    assert!(new.exited(Duration::from_secs(30)).await.success());
}

/// A hot restart passes every listening socket however many there are: Linux
/// passes at most 253 in one `SCM_RIGHTS` message, so they go in batches.
/// Before, 250 or more listeners failed the upgrade (the old process kept
/// serving and the new one exited).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_restart_passes_hundreds_of_listeners() {
    let up = upstream().start().await;
    legate_bin();
    let (web, admin) = (free_addr(), free_addr());
    let extras: Vec<SocketAddr> = (0..300).map(|_| free_addr()).collect();
    let listeners: String = extras
        .iter()
        .enumerate()
        .map(|(i, a)| {
            format!("  - name: extra-{i}\n    address: {a}\n    http:\n      routes: main\n")
        })
        .collect();
    let text = fixed_yaml(web, admin, up.addr).replacen(
        "routes:\n  - name: main",
        &format!("{listeners}routes:\n  - name: main"),
        1,
    );
    let dir = TempDir::new();
    let cfg = dir.write("legate.yaml", text);
    let mut old = Child::spawn(&cfg, &[]);
    wait_ready(admin).await;
    let mut new = hot_restart(&cfg, &mut old).await;
    wait_ready(admin).await;
    // The new process serves on every address: each socket was adopted (binding
    // the address again would have failed while the old process held it).
    for (proto, addr) in [
        (Proto::H1, web),
        (Proto::H2, extras[0]),
        (Proto::H1, extras[299]),
    ] {
        let mut c = client(proto, addr).await;
        assert_eq!(c.get("/x").send().await.status, 200, "{proto:?} {addr}");
    }
    new.signal("TERM");
    assert!(new.exited(Duration::from_secs(30)).await.success());
}

/// A hot restart to an `admin.address` that cannot be bound fails, saying so,
/// and the running process goes on serving (it drains only when told to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_restart_to_a_busy_admin_address_keeps_the_old_process() {
    let up = upstream().start().await;
    legate_bin();
    let (web, old_admin) = (free_addr(), free_addr());
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let dir = TempDir::new();
    let cfg = dir.write("legate.yaml", fixed_yaml(web, old_admin, up.addr));
    let mut old = Child::spawn(&cfg, &[]);
    wait_ready(old_admin).await;

    std::fs::write(&cfg, fixed_yaml(web, busy_addr, up.addr)).unwrap();
    let mut new = Child::spawn(&cfg, &["--upgrade"]);
    let status = new.exited(Duration::from_secs(60)).await;
    assert!(
        !status.success(),
        "the new process started on a busy admin address"
    );
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old process stopped"
    );
    let (status, body) = admin_at(old_admin, Method::GET, "/ready").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "LIVE\n"));
    let mut c = client(Proto::H1, web).await;
    assert_eq!(c.get("/x").send().await.status, 200);
    old.signal("TERM");
    assert!(old.exited(Duration::from_secs(30)).await.success());
}

/// Another user's process cannot take the listening sockets, even where the
/// upgrade socket's mode would let it connect (loosened here by hand; Legate
/// makes it 0600): the running Legate refuses it by its `SO_PEERCRED` uid and
/// goes on serving. Runs the other process as `nobody`, which needs root; as
/// another user the test only says it was skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_restart_refuses_another_users_process() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    use std::os::unix::process::CommandExt as _;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!("skipped: running a process as another user needs root");
        return;
    }
    let up = upstream().start().await;
    legate_bin();
    let (web, admin) = (free_addr(), free_addr());
    let dir = TempDir::new();
    let cfg = dir.write("legate.yaml", fixed_yaml(web, admin, up.addr));
    let public = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    public(dir.path(), 0o755);
    public(&cfg, 0o644);
    let mut old = Child::spawn(&cfg, &[]);
    wait_ready(admin).await;
    let socket = dir.path().join("legate.yaml.upgrade.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "upgrade socket mode {mode:o}");
    public(&socket, 0o666);

    let child = Command::new(legate_bin())
        .args([
            "run",
            "--concurrency",
            "1",
            "--watch-interval",
            "0",
            "--upgrade",
            "-c",
        ])
        .arg(&cfg)
        .uid(65534)
        .gid(65534)
        .env("LEGATE_LOG", "info")
        .spawn()
        .expect("spawn legate as nobody");
    let mut intruder = Child { child };
    let status = intruder.exited(Duration::from_secs(60)).await;
    assert!(!status.success(), "another user's process took over");
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old process stopped"
    );
    let (status, body) = admin_at(admin, Method::GET, "/ready").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "LIVE\n"));
    old.signal("TERM");
    assert!(old.exited(Duration::from_secs(30)).await.success());
}

/// The upgrade socket goes with the process that serves it: after a hot
/// restart it is the new process's (the old one, exiting, leaves it alone),
/// and a process that stops removes it. It was left behind when the drain
/// ended before the serving thread's next poll (every demo run left one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_socket_goes_with_the_process_that_serves_it() {
    let up = upstream().start().await;
    legate_bin();
    let (web, admin) = (free_addr(), free_addr());
    let dir = TempDir::new();
    let cfg = dir.write("legate.yaml", fixed_yaml(web, admin, up.addr));
    let socket = dir.path().join("legate.yaml.upgrade.sock");
    let mut old = Child::spawn(&cfg, &[]);
    wait_ready(admin).await;
    // `/ready` says LIVE only once the socket is served (it said so a moment
    // before, and a hot restart right then found no socket).
    assert!(socket.exists(), "no upgrade socket");
    let mut new = hot_restart(&cfg, &mut old).await;
    wait_ready(admin).await;
    eventually(
        HANG_GUARD,
        "the new process serves the upgrade socket",
        || async {
            std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(|_| ())
        },
    )
    .await;
    new.signal("INT");
    assert!(new.exited(Duration::from_secs(30)).await.success());
    assert!(
        !socket.exists(),
        "the stopped process left its upgrade socket"
    );
}

/// An upgrade socket that cannot be made (a read-only root file system in a
/// container) costs only hot restarts: the process serves, and says how to
/// have them, as a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_socket_that_cannot_be_made_is_a_warning() {
    let up = upstream().start().await;
    legate_bin();
    let (web, admin) = (free_addr(), free_addr());
    let dir = TempDir::new();
    let cfg = dir.write("legate.yaml", fixed_yaml(web, admin, up.addr));
    let log = dir.path().join("stderr.log");
    let child = Command::new(legate_bin())
        .args(["run", "--concurrency", "1", "--watch-interval", "0", "-c"])
        .arg(&cfg)
        .args(["--upgrade-socket", "/proc/legate-cannot-be-here.sock"])
        .env("LEGATE_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn legate");
    let mut p = Child { child };
    wait_ready(admin).await;
    let mut c = client(Proto::H1, web).await;
    assert_eq!(c.get("/x").send().await.status, 200);
    p.signal("TERM");
    assert!(p.exited(Duration::from_secs(30)).await.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("hot restart will not be available"))
        .unwrap_or_else(|| panic!("no hot restart line in:\n{text}"));
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains("give --upgrade-socket a path"), "{line}");
    // Not a terminal: no colour codes.
    assert!(!text.contains('\u{1b}'), "escape codes in:\n{text}");
}

fn percentiles(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!(
        "p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms (n={})",
        at(0.5),
        at(0.95),
        at(1.0),
        v.len()
    )
}

fn env_n(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The reload benchmark (bench/reload.sh): steady load while doing config reloads,
/// plugin reloads and hot restarts of the real binary; prints failed requests and
/// reload latencies. Ignored in the normal suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by bench/reload.sh"]
async fn reload_bench() {
    let (config_reloads, plugin_reloads, restarts) = (
        env_n("CONFIG_RELOADS", 100),
        env_n("PLUGIN_RELOADS", 100),
        env_n("RESTARTS", 10),
    );
    let up = upstream().start().await;
    let (web, admin) = (free_addr(), free_addr());
    let dir = TempDir::new();
    let module = dir.path().join("tagger.wasm");
    write_module(&module, &guest_variant(0));
    let with_plugin = |route: &str| {
        fixed_yaml(web, admin, up.addr)
            .replace(
                "    http:\n      routes: main\n",
                "    http:\n      routes: main\n      filters: [{ plugin: tagger }]\n",
            )
            .replace("            cluster: backend\n", &format!("            cluster: backend\n{route}"))
            + &format!(
                "plugins:\n  - name: tagger\n    module: {}\n    config: {{ mode: headers }}\n    limits: {{ cpu: 500ms }}\n",
                module.display()
            )
    };
    let cfg = dir.write("legate.yaml", with_plugin(""));
    let mut current = Child::spawn(&cfg, &[]);
    wait_ready(admin).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (res, tasks) = steady_load(web, stop.clone(), Some(("x-filter-resp", "tagger")));

    let post = |path: &'static str| async move {
        let t = std::time::Instant::now();
        let (status, body) = admin_at(admin, Method::POST, path)
            .await
            .expect("admin answers");
        assert_eq!(status, 200, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        (
            v["duration_ms"].as_f64().unwrap(),
            t.elapsed().as_secs_f64() * 1000.0,
        )
    };
    let (mut cfg_server, mut cfg_client) = (Vec::new(), Vec::new());
    for i in 0..config_reloads {
        let route = if i % 2 == 0 {
            "            timeout: 5s\n"
        } else {
            ""
        };
        let tmp = cfg.with_extension("tmp");
        std::fs::write(&tmp, with_plugin(route)).unwrap();
        std::fs::rename(&tmp, &cfg).unwrap();
        let (s, c) = post("/reload").await;
        cfg_server.push(s);
        cfg_client.push(c);
    }
    let (mut pl_server, mut pl_client) = (Vec::new(), Vec::new());
    for i in 0..plugin_reloads {
        // Two module versions, alternating: each compiled once, then from the cache.
        write_module(&module, &guest_variant(u32::try_from(i % 2).unwrap() + 1));
        let (s, c) = post("/plugins/tagger/reload").await;
        pl_server.push(s);
        pl_client.push(c);
    }
    let mut handovers = Vec::new();
    for _ in 0..restarts {
        let t = std::time::Instant::now();
        let mut next = Child::spawn(&cfg, &["--upgrade"]);
        let status = current.exited(Duration::from_secs(120)).await;
        assert!(status.success(), "the old process exited with {status}");
        handovers.push(t.elapsed().as_secs_f64() * 1000.0);
        std::mem::swap(&mut current, &mut next);
        wait_ready(admin).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ok = res.ok.load(Ordering::Relaxed);
    let failed = res.failed.load(Ordering::Relaxed);
    let resent = res.resent.load(Ordering::Relaxed);
    println!("reload bench: {config_reloads} config reloads, {plugin_reloads} plugin reloads, {restarts} hot restarts");
    println!("  requests: {ok} ok, {failed} failed, {resent} resent on a new connection after a graceful close");
    println!("  config reload (server-side): {}", percentiles(cfg_server));
    println!(
        "  config reload (POST round trip): {}",
        percentiles(cfg_client)
    );
    println!(
        "  plugin reload, cached module (server-side): {}",
        percentiles(pl_server)
    );
    println!(
        "  plugin reload, cached module (POST round trip): {}",
        percentiles(pl_client)
    );
    println!(
        "  hot restart, spawn to old process exited: {}",
        percentiles(handovers)
    );
    finish_load(&res, &stop, tasks).await;
    current.signal("TERM");
    let _ = current.exited(Duration::from_secs(30)).await;
}

each_proto!(
    /// The top-level `local_zone` is the process's, copied into every cluster:
    /// a reload that changes it reloads the clusters that route by zone (they
    /// are not carried over as unchanged).
    async fn a_changed_local_zone_reaches_zone_aware_clusters(proto) {
        let a = upstream().name("a").start().await;
        let b = upstream().name("b").start().await;
        let cfg = |zone: &str| {
            format!(
                "version: 1
admin: {{ address: 127.0.0.1:0 }}
local_zone: {zone}
listeners:
  - name: web
    address: 127.0.0.1:0
    http: {{ routes: main }}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: backend
    zone_aware: {{ min_cluster_size: 2 }}
    endpoints:
      - {{ address: \"{}\", zone: z1 }}
      - {{ address: \"{}\", zone: z2 }}
",
                a.addr, b.addr
            )
        };
        let lg = start(&cfg("z1"), None, 1);
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..4 {
            assert_eq!(c.get("/").send().await.header("x-upstream"), Some("a"));
        }
        let v = lg.reload_ok(&cfg("z2")).await;
        assert_eq!(v["clusters"]["new_or_changed"], json!(["backend"]), "{v}");
        for _ in 0..4 {
            assert_eq!(c.get("/").send().await.header("x-upstream"), Some("b"));
        }
        assert_eq!(lg.stat(RELOAD_OK).await, Some(1.0));
    }
);

/// [`yaml`] with cluster `backend` a `dns` cluster on `name:port`, resolved by the
/// test name server `dns` (every 100 ms); `cluster_extra` as in [`yaml`].
fn dns_yaml(dns: SocketAddr, name: &str, port: u16, cluster_extra: &str) -> String {
    let up: SocketAddr = ([127, 0, 0, 1], port).into();
    yaml(
        up,
        false,
        "",
        &format!(
            "    discovery:\n      type: dns\n      dns_resolvers: [\"{dns}\"]\n      \
             dns_refresh_rate: 100ms\n      dns_timeout: 3s\n      initial_fetch_timeout: 2s\n\
             {cluster_extra}"
        ),
        "",
    )
    .replace(
        &format!("      - address: {up}\n"),
        &format!("      - address: \"{name}:{port}\"\n"),
    )
}

fn backend(series: &str) -> String {
    format!("legate_cluster_{series}{{cluster=\"backend\"}}")
}

/// A reload that changes a `dns` cluster but not what it resolves (here its
/// `connect_timeout`) starts the new cluster from the old one's endpoints: under
/// steady load (HTTP/1.1 and HTTP/2) no request fails, even with the name server
/// failing meanwhile (before, the new cluster started empty and answered 503
/// until a resolution succeeded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_dns_cluster_keeps_its_endpoints_across_reloads() {
    let up = upstream().name("a").start().await;
    let dns = DnsServer::start(&[std::net::Ipv4Addr::LOCALHOST]).await;
    let config = |i: u32| {
        dns_yaml(
            dns.addr,
            "up.legate.test",
            up.addr.port(),
            &format!("    connect_timeout: {}s\n", 1 + i % 2),
        )
    };
    let lg = start(&config(0), None, 2);
    lg.assert_stat(&backend("membership_total"), 1.0).await;
    // The name server fails from now on: the reloads must not need it.
    dns.state.servfail.store(true, Ordering::SeqCst);
    let stop = Arc::new(AtomicBool::new(false));
    let (res, tasks) = steady_load(lg.addr("web"), stop.clone(), Some(("x-upstream", "a")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 1..=6 {
        let v = lg.reload_ok(&config(i)).await;
        assert_eq!(v["clusters"]["new_or_changed"], json!(["backend"]), "{v}");
        assert_eq!(v["notes"], json!([]), "{v}");
        // Longer than a refresh: the new cluster's discovery fails meanwhile.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    finish_load(&res, &stop, tasks).await;
    assert_eq!(lg.stat(RELOAD_OK).await, Some(6.0));
    lg.assert_stat(&backend("membership_total"), 1.0).await;
    assert!(lg.stat(&backend("upstream_rq_2xx")).await.unwrap() > 0.0);
    assert_eq!(lg.stat(&backend("upstream_rq_5xx")).await, Some(0.0));
    assert!(
        lg.stat(&backend("discovery_update_failure")).await.unwrap() >= 1.0,
        "the name server was failing"
    );
}

/// A reload that changes the names of a `dns` cluster resolves them before the
/// new config goes live (the cluster warms, as Envoy's): with a slow name server
/// no request under steady load fails, and the reload took the resolution's time.
/// A name that does not resolve within `initial_fetch_timeout` leaves the cluster
/// without it (503) and says so in the reload's notes, until discovery resolves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_cluster_with_new_names_warms_before_it_goes_live() {
    let up = upstream().name("a").start().await;
    let dns = DnsServer::start(&[std::net::Ipv4Addr::LOCALHOST]).await;
    dns.state.delay_ms.store(300, Ordering::SeqCst);
    let config = |name: &str| dns_yaml(dns.addr, name, up.addr.port(), "");
    let lg = start(&config("a.legate.test"), None, 2);
    lg.assert_stat(&backend("membership_total"), 1.0).await;
    let stop = Arc::new(AtomicBool::new(false));
    let web = lg.addr("web");
    let (res, tasks) = steady_load(web, stop.clone(), Some(("x-upstream", "a")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    for name in ["b.legate.test", "c.legate.test", "a.legate.test"] {
        let v = lg.reload_ok(&config(name)).await;
        assert_eq!(v["clusters"]["new_or_changed"], json!(["backend"]), "{v}");
        assert_eq!(v["notes"], json!([]), "{v}");
        let took = v["duration_ms"].as_f64().unwrap();
        assert!(took >= 250.0, "the reload did not wait for the name: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    finish_load(&res, &stop, tasks).await;
    assert_eq!(lg.stat(RELOAD_OK).await, Some(3.0));
    lg.assert_stat(&backend("membership_total"), 1.0).await;
    assert!(lg.stat(&backend("upstream_rq_2xx")).await.unwrap() > 0.0);
    assert!(lg.stat(&backend("discovery_update_success")).await.unwrap() >= 1.0);

    // The name server fails: the reload goes live after trying, without the name.
    dns.state.delay_ms.store(0, Ordering::SeqCst);
    dns.state.servfail.store(true, Ordering::SeqCst);
    let v = lg.reload_ok(&config("d.legate.test")).await;
    let notes = v["notes"].to_string();
    assert!(
        notes.contains("cluster `backend`: cannot resolve `d.legate.test`")
            && notes.contains("went live without"),
        "{v}"
    );
    for proto in [Proto::H1, Proto::H2] {
        let r = client(proto, web).await.get("/x").send().await;
        assert_eq!(r.status, 503, "{proto:?}: {}", r.text());
    }
    lg.assert_stat(&backend("membership_total"), 0.0).await;
    // Discovery resolves it once the name server answers again.
    dns.state.servfail.store(false, Ordering::SeqCst);
    lg.assert_stat(&backend("membership_total"), 1.0).await;
    for proto in [Proto::H1, Proto::H2] {
        let r = client(proto, web).await.get("/x").send().await;
        assert_eq!(r.status, 200, "{proto:?}: {}", r.text());
    }
}

/// A reload asked with parameters (`POST /reload?plugin=x`, thinking it
/// reloads one plugin) is refused with 400 and reloads nothing, as `/stats`
/// refuses what it does not take; it reloaded the whole config and said ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_parameters_is_refused() {
    let a = upstream().name("a").start().await;
    let b = upstream().name("b").start().await;
    let lg = start(&yaml(a.addr, false, "", "", ""), None, 1);
    lg.write_config(&yaml(b.addr, false, "", "", ""));
    for path in ["/reload?plugin=x", "/plugins/x/reload?now=1"] {
        let (status, body) = lg.admin(Method::POST, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("takes no parameters"), "{body}");
    }
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(c.get("/x").send().await.header("x-upstream"), Some("a"));
    assert_eq!(lg.stat(RELOAD_OK).await, Some(0.0));
    // Without them, the reload happens.
    let (status, body) = lg.admin(Method::POST, "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.get("/x").send().await.header("x-upstream"), Some("b"));
}
