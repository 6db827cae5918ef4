//! plugins/ratelimit, built by `legate plugin build`, in the real host: buckets in
//! the host's shared KV, shared by the workers of one process.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use legate_tests::plugins::plugin_wasm;
use legate_tests::*;

/// One limit: three requests an hour per `x-key` on route `api`.
fn config(up: SocketAddr, namespace: &str) -> String {
    config_with(
        up,
        namespace,
        "",
        "        - name: api-per-key
          match: { routes: [api] }
          key: [{ header: x-key }]
          rate: 3/h
",
    )
}

/// Listener `web` with `http_extra` (indented `http` keys) running the plugin
/// with the `limits` entries `limits` (indented YAML).
fn config_with(up: SocketAddr, namespace: &str, http_extra: &str, limits: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
{http_extra}      filters: [{{ plugin: ratelimit }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - name: api
            match: {{ prefix: /api }}
            cluster: backend
          - name: rest
            match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
plugins:
  - name: ratelimit
    module: {wasm}
    limits: {{ cpu: 500ms }}
    capabilities: {{ kv: [{namespace}] }}
    config:
      namespace: {namespace}
      emit_headers: true
      limits:
{limits}",
        wasm = plugin_wasm("plugins/ratelimit").display(),
    )
}

each_proto!(
    async fn limits_per_key_across_workers(proto) {
        let up = upstream().start().await;
        // Each protocol's test gets its own namespace: under `cargo test` both run in
        // one process and share its KV store.
        let ns = format!("rl-{proto:?}").to_lowercase();
        let lg = legate().config(&config(up.addr, &ns)).concurrency(2).start();

        // Three requests per key per hour: separate connections, so both workers
        // serve some, and the limit is still one.
        for i in 0..3 {
            let mut c = client(proto, lg.addr("web")).await;
            let r = c.get("/api/x").header("x-key", "alice").send().await;
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
            assert_eq!(r.header("ratelimit-limit"), Some("3"));
            assert_eq!(
                r.header("ratelimit-remaining"),
                Some((2 - i).to_string().as_str())
            );
        }
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/api/x").header("x-key", "alice").send().await;
        assert_eq!(r.status, 429, "{}", r.text());
        let body: Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["limit"], "api-per-key");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(retry > 0 && retry <= 3600, "retry-after {retry}");
        assert_eq!(r.header("ratelimit-remaining"), Some("0"));
        let upstream_seen = up.requests.get();

        // Another key has its own bucket; another route is not limited.
        let r = c.get("/api/x").header("x-key", "bob").send().await;
        assert_eq!(r.status, 200);
        for _ in 0..5 {
            let r = c.get("/other").header("x-key", "alice").send().await;
            assert_eq!(r.status, 200);
        }
        assert_eq!(up.requests.get(), upstream_seen + 6);

        let stats = lg.stats().await;
        let outcome = |o: &str| {
            parse_prometheus(&stats)
                .into_iter()
                .find(|(k, _)| {
                    k.starts_with("legate_plugin_ratelimit_requests_total{")
                        && k.contains(&format!("outcome=\"{o}\""))
                })
                .map(|(_, v)| v)
        };
        assert_eq!(outcome("limited"), Some(1.0), "{stats}");
        assert_eq!(outcome("allowed"), Some(4.0), "{stats}");
    }
);

/// A listener behind one trusted load balancer (`xff_num_trusted_hops: 1`) with a
/// `client_ip` limit of one request per hour.
fn behind_balancer(up: SocketAddr, namespace: &str) -> String {
    config_with(
        up,
        namespace,
        "      trust_downstream: true\n      xff_num_trusted_hops: 1\n",
        "        - name: per-ip\n          key: [client_ip]\n          rate: 1/h\n",
    )
}

each_proto!(
    async fn client_ip_is_the_address_the_trusted_balancer_appended(proto) {
        let up = upstream().start().await;
        let ns = format!("rl-xff-{proto:?}").to_lowercase();
        let lg = legate().config(&behind_balancer(up.addr, &ns)).start();
        // Every request comes from one peer (the "balancer"), which appended each
        // client's address.
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/x").header("x-forwarded-for", "192.0.2.1").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The upstream gets the whole list, the peer appended.
        assert_eq!(r.echo().header("x-forwarded-for"), Some("192.0.2.1, 127.0.0.1"));
        // Another client behind the same balancer has a bucket of its own.
        let r = c.get("/x").header("x-forwarded-for", "192.0.2.2").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The first client again, with an entry of its own to the left (the
        // balancer appends to what the client sent): the same bucket.
        let r = c
            .get("/x")
            .header("x-forwarded-for", "203.0.113.9, 192.0.2.1")
            .send()
            .await;
        assert_eq!(r.status, 429, "{}", r.text());
        // Without an entry the client is the peer: a bucket of its own.
        let r = c.get("/x").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = c.get("/x").send().await;
        assert_eq!(r.status, 429, "{}", r.text());
    }
);
