//! Component handles do not leak across phase calls: every call lends the guest
//! the exchange, header, trailer and buffer handles, and each must be released
//! when the call returns. A leak used to fill wasmtime's per-store table (100 000
//! live handles) and trap the instance every few ten thousand requests; with the
//! cap lowered to a few hundred for this test process, a leak of even one handle
//! per call traps within the first requests.
//!
//! A separate test binary: the lowered cap is process-wide.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use legate_tests::*;

/// Far below the handles a leak would pile up over [`REQUESTS`] requests (8+
/// calls each, 2-3 handles per call), above what one request holds at a time.
const CAP: usize = 64;
const REQUESTS: usize = 300;

each_proto!(
    async fn phase_calls_release_their_handles(proto) {
        legate_host::wasm::plugin::set_max_component_handles_for_tests(CAP);
        let up = upstream().start().await;
        let yaml = format!(
            "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: every-phase }}]
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
      - address: {}
plugins:
  - name: every-phase
    module: {}
    config: {{ mode: fold-trailers, phases: \"rq,rs,rqbody,rsbody,rqtrailers,rstrailers,log,done\", rqmode: buffered }}
    limits: {{ cpu: 500ms }}
",
            up.addr,
            test_guest().display()
        );
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        for i in 0..REQUESTS {
            let mut t = HeaderMap::new();
            t.insert("x-keep", HeaderValue::from_static("1"));
            let r = c
                .post(&format!("/r{i}"))
                .header("te", "trailers")
                .body_with_trailers(format!("body {i}"), t)
                .send()
                .await;
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
        }
        let traps = "legate_plugin_traps_total{plugin=\"every-phase\"}";
        assert_eq!(lg.stat(traps).await, Some(0.0));
        let restarts = "legate_plugin_instance_restarts_total{plugin=\"every-phase\"}";
        assert_eq!(lg.stat(restarts).await.unwrap_or(0.0), 0.0);
        lg.assert_stat(
            "legate_plugin_calls_total{plugin=\"every-phase\",phase=\"request_trailers\"}",
            REQUESTS as f64,
        )
        .await;
    }
);
