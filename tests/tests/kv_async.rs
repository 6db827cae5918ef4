//! Asynchronous KV calls (abi/README.md §5.7, ABI 0.1.2) in the real host:
//! tests/kv-sdk-guest, built by `legate plugin build`, starts calls from the
//! request and response phases, pauses, and resumes or answers from
//! `on-kv-response`; against the in-memory store and a real `redis-server`.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use legate_tests::plugins::plugin_wasm;
use legate_tests::redis::RedisServer;
use legate_tests::*;

const GUEST: &str = "tests/kv-sdk-guest";

/// The guest on every route, namespace `ns`; `kv` is a top-level `kv:` section
/// (empty: the in-memory store).
fn config(up: SocketAddr, ns: &str, kv: &str) -> String {
    format!(
        "version: 1
{kv}listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: kvg }}]
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
    endpoints:
      - address: {up}
plugins:
  - name: kvg
    module: {wasm}
    limits: {{ cpu: 2s }}
    capabilities: {{ kv: [{ns}] }}
    config: {{ namespace: {ns} }}
",
        wasm = plugin_wasm(GUEST).display(),
    )
}

fn kv_responses() -> &'static str {
    r#"legate_plugin_calls_total{plugin="kvg",phase="kv_response"}"#
}

/// Checks every behaviour of the guest against whatever store `lg` has.
async fn exercise(proto: Proto, lg: &LegateHandle, backend: &str) {
    let addr = lg.addr("web");
    let mut c = client(proto, addr).await;

    // Pause in request headers; the reply writes the request head and resumes.
    for n in 1..=3 {
        let r = c.get("/incr").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.header("x-kv-count"), Some(n.to_string().as_str()));
        assert_eq!(e.header("x-kv-backend"), Some(backend));
    }
    lg.assert_stat(kv_responses(), 3.0).await;

    // Two calls out at once: resumed when both replied.
    let r = c.get("/two").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.echo();
    assert_eq!(
        (e.header("x-kv-a"), e.header("x-kv-b")),
        (Some("1"), Some("1"))
    );

    // A reply that answers locally.
    let r = c.get("/deny").send().await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "count=absent\n");

    // Pause in response headers; the reply writes the response head.
    let r = c.get("/response").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-kv-count"), Some("4"));

    // Arguments checked at once, as the synchronous call does.
    let r = c.get("/bad-key").send().await;
    assert_eq!(r.echo().header("x-kv-error"), Some("invalid-argument"));

    // A cancelled call's reply never comes.
    let before = lg.stat(kv_responses()).await;
    let r = c.get("/cancel").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().header("x-kv-cancel"), Some("ok"));
    // Later replies are counted; the cancelled one is not among them.
    let r = c.get("/incr").send().await;
    assert_eq!(r.echo().header("x-kv-count"), Some("5"));
    lg.assert_stat(kv_responses(), before.unwrap_or(0.0) + 1.0)
        .await;

    // Get + conditional set, both asynchronous, from 6 clients on both
    // workers at once: no increment lost or doubled.
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = client(proto, addr).await;
                for _ in 0..10 {
                    let r = c.get("/cas").send().await;
                    assert_eq!(r.status, 200, "{}", r.text());
                    assert!(r.echo().header("x-kv-count").is_some());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let r = c.get("/deny").send().await;
    assert_eq!(r.text(), "count=60\n");
}

each_proto!(
    async fn async_kv_calls_pause_and_resume_in_memory(proto) {
        let up = upstream().start().await;
        // Per protocol: both run in one test process and share its memory store.
        let ns = format!("kva-{proto:?}").to_lowercase();
        let lg = legate()
            .config(&config(up.addr, &ns, ""))
            .concurrency(2)
            .start();
        exercise(proto, &lg, "memory").await;
    }
);

each_proto!(
    async fn async_kv_calls_pause_and_resume_over_redis(proto) {
        let redis = RedisServer::start();
        let up = upstream().start().await;
        let kv = format!("kv:\n  backend: redis\n  url: {}\n  timeout: 500ms\n", redis.url());
        let lg = legate()
            .config(&config(up.addr, "kva", &kv))
            .concurrency(2)
            .start();
        exercise(proto, &lg, "redis").await;
        let s = lg.stats().await;
        let ops = |op: &str| {
            let series = format!(r#"legate_kv_operations_total{{backend="redis",op="{op}"}}"#);
            parse_prometheus(&s).get(&series).copied()
        };
        assert!(ops("increment").is_some_and(|n| n >= 7.0), "{s}");
        assert!(ops("set").is_some_and(|n| n >= 60.0), "{s}");
    }
);
