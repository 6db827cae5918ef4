//! The shipped example filters, built from source the way their READMEs say, run in
//! the real host through real requests: examples/hello-filter (Rust, legate-sdk, built
//! by `legate plugin build`) and examples/c-filter (C, built by
//! scripts/build-c-filter.sh), chained on one listener. This is the proof that a
//! filter written against the WIT in another language runs next to an SDK filter.
//! examples/python-filter (Python, componentize-py, built by
//! scripts/build-python-filter.sh) runs with the default limits: CPython inside
//! fits the default memory cap and the instance pool.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use legate_tests::plugins::{c_filter_wasm, plugin_wasm, python_filter_wasm};
use legate_tests::*;

fn config(up: SocketAddr) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: c }}, {{ plugin: hello }}]
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
  - name: c
    module: {c}
    limits: {{ cpu: 500ms }}
  - name: hello
    module: {hello}
    config: {{ value: from-test }}
    limits: {{ cpu: 500ms }}
",
        c = c_filter_wasm().display(),
        hello = plugin_wasm("examples/hello-filter").display(),
    )
}

each_proto!(
    async fn c_and_rust_filters_share_a_chain(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&config(up.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;

        // Proxied: the C filter tags the request, both tag the response.
        let r = c.get("/app").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-c-filter"), Some("seen"));
        assert_eq!(r.header("x-c-filter-lang"), Some("c"));
        assert_eq!(r.header("x-hello"), Some("from-test"));

        // Answered by hello-filter: the upstream never sees it.
        let before = up.requests.get();
        let r = c.get("/hello").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hello from legate\n");
        assert_eq!(r.header("x-hello"), Some("from-test"));
        assert_eq!(up.requests.get(), before);

        // Answered by the C filter, first in the chain: hello-filter is not called.
        let r = c
            .get("/app")
            .header("x-c-filter-block", "yes")
            .send()
            .await;
        assert_eq!(r.status, 403);
        assert_eq!(r.text(), "blocked by c-filter\n");
        assert_eq!(up.requests.get(), before);

        let stats = lg.stats().await;
        let series = |outcome: &str| {
            parse_prometheus(&stats)
                .into_iter()
                .find(|(k, _)| {
                    k.starts_with("legate_plugin_hello_requests_total{")
                        && k.contains("plugin=\"hello\"")
                        && k.contains(&format!("outcome=\"{outcome}\""))
                })
                .map(|(_, v)| v)
        };
        assert_eq!(series("proxied"), Some(1.0), "{stats}");
        assert_eq!(series("local"), Some(1.0), "{stats}");
        lg.assert_stat(
            r#"legate_plugin_calls_total{plugin="hello",phase="request_headers"}"#,
            2.0,
        )
        .await;
        lg.assert_stat(
            r#"legate_plugin_calls_total{plugin="c",phase="request_headers"}"#,
            3.0,
        )
        .await;
    }
);

fn python_config(up: SocketAddr) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: py }}]
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
  - name: py
    module: {py}
    config: {{ greeting: \"hi from a test\\n\" }}
",
        py = python_filter_wasm().display(),
    )
}

each_proto!(
    async fn python_filter_runs_with_default_limits(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&python_config(up.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;

        // Answered by the filter: the upstream never sees it.
        let r = c.get("/hello-py").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "hi from a test\n");
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        assert_eq!(up.requests.get(), 0);

        // Proxied, and the response tagged, many times over on the same
        // instances (CPython's heap stays within the default memory cap).
        for _ in 0..50 {
            let r = c.get("/app").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-python-filter"), Some("1"));
        }
        assert_eq!(up.requests.get(), 50);
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="py"}"#, 0.0)
            .await;
        lg.assert_stat(
            r#"legate_plugin_calls_total{plugin="py",phase="request_headers"}"#,
            51.0,
        )
        .await;
    }
);
