//! The host's own answers after the request phases (a dead upstream's 502, a
//! route timeout's 504) go through the response phases of the filters that
//! took part, as an upstream response does and as Envoy runs its encoder
//! filters on local replies: a component filter and a proxy-wasm filter
//! (built from source, tests/guests and tests/proxy-wasm-guests) see them,
//! over HTTP/1.1 and HTTP/2, and `/stats` counts the calls. The matched
//! route's `response_headers` finish these replies as they finish an
//! upstream response.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use legate_tests::proxy_wasm::proxy_wasm_guest;
use legate_tests::*;

/// Listener `web` with the chain `tagger` (component, `headers` mode: adds
/// `x-filter-resp` in its response phase) then `pw` (proxy-wasm,
/// `properties` mode: `x-p-code`, `x-p-code-details` from its response
/// headers callback). `/dead` goes to a closed port, `/slow` to an upstream
/// slower than the route's 200ms timeout, the rest to `up`.
fn config(up: SocketAddr, dead: SocketAddr, slow: SocketAddr) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: tagger }}, {{ plugin: pw }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: /dead }}
            cluster: dead
            response_headers: {{ set: {{ x-route: dead }} }}
          - match: {{ prefix: /slow }}
            cluster: slow
            timeout: 200ms
          - match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
  - name: dead
    endpoints:
      - address: {dead}
  - name: slow
    endpoints:
      - address: {slow}
plugins:
  - name: tagger
    module: {guest}
    limits: {{ cpu: 500ms }}
    config: {{ mode: headers, phases: \"rq,rs,log\" }}
  - name: pw
    module: {pw}
    limits: {{ cpu: 500ms }}
    proxy_wasm:
      plugin_config: {{ mode: properties }}
",
        guest = test_guest().display(),
        pw = proxy_wasm_guest().display(),
    )
}

fn calls(plugin: &str, phase: &str) -> String {
    format!("legate_plugin_calls_total{{plugin=\"{plugin}\",phase=\"{phase}\"}}")
}

each_proto!(
    async fn a_dead_upstreams_502_goes_through_the_response_phases(proto) {
        let up = upstream().start().await;
        let slow = upstream().delay(Duration::from_secs(30)).start().await;
        let lg = legate()
            .config(&config(up.addr, closed_port_addr(), slow.addr))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/dead/x").send().await;
        assert_eq!(r.status, 502, "{}", r.text());
        // The host's answer, as the filters left it.
        assert_eq!(r.text(), "upstream_connect_failure\n");
        assert_eq!(r.header("x-filter-resp"), Some("tagger"));
        // The route finishes the host's reply as it finishes an upstream's.
        assert_eq!(r.header("x-route"), Some("dead"));
        assert_eq!(r.header("x-p-code"), Some("502"));
        assert_eq!(
            r.header("x-p-code-details"),
            Some("upstream_connect_failure")
        );
        lg.assert_stat(&calls("tagger", "response_headers"), 1.0)
            .await;
        lg.assert_stat(&calls("pw", "response_headers"), 1.0).await;
        lg.assert_stat(&calls("tagger", "log"), 1.0).await;
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="5xx"}"#,
            1.0,
        )
        .await;

        // An upstream answer still gets them once (not twice).
        let r = c.get("/ok").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-filter-resp"), Some("tagger"));
        assert_eq!(r.header("x-p-code-details"), Some("via_upstream"));
        assert_eq!(r.header("x-route"), None);
        lg.assert_stat(&calls("tagger", "response_headers"), 2.0)
            .await;
        lg.assert_stat(&calls("pw", "response_headers"), 2.0).await;
    }
);

each_proto!(
    /// The host's answers to a gRPC request are gRPC's trailers-only form, as
    /// Envoy's local replies are: 200, `grpc-status` (502, 504 →
    /// `UNAVAILABLE`), the cause as `grpc-message`, no body; the filters'
    /// response phases see that form. A gRPC-Web request (not gRPC until a
    /// filter converts it) gets the HTTP answer. (A gRPC client got an HTTP 502
    /// with a text body: a protocol error to it, the cause lost.)
    async fn a_grpc_requests_local_replies_are_grpc(proto) {
        let up = upstream().start().await;
        let slow = upstream().delay(Duration::from_secs(30)).start().await;
        let lg = legate()
            .config(&config(up.addr, closed_port_addr(), slow.addr))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for (path, message) in [("/dead/x", "upstream_connect_failure"), ("/slow/x", "upstream_timeout")] {
            let r = c
                .post(path)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(grpc_frame(b"hello"))
                .send()
                .await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            assert_eq!(r.header("content-type"), Some("application/grpc"), "{path}");
            assert_eq!(r.header("grpc-status"), Some("14"), "{path}");
            assert_eq!(r.header("grpc-message"), Some(message), "{path}");
            assert_eq!(r.text(), "", "{path}");
            // Through the response phases, in this form.
            assert_eq!(r.header("x-filter-resp"), Some("tagger"), "{path}");
            assert_eq!(r.header("x-p-code"), Some("200"), "{path}");
            assert_eq!(r.header("x-p-code-details"), Some(message), "{path}");
        }
        let r = c
            .post("/dead/x")
            .header("content-type", "application/grpc-web+proto")
            .body(grpc_frame(b"hello"))
            .send()
            .await;
        assert_eq!(r.status, 502);
        assert_eq!(r.header("grpc-status"), None);
        assert_eq!(r.text(), "upstream_connect_failure\n");
    }
);

each_proto!(
    async fn a_route_timeouts_504_goes_through_the_response_phases(proto) {
        let up = upstream().start().await;
        let slow = upstream().delay(Duration::from_secs(30)).start().await;
        let lg = legate()
            .config(&config(up.addr, closed_port_addr(), slow.addr))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/slow/x").send().await;
        assert_eq!(r.status, 504, "{}", r.text());
        assert_eq!(r.text(), "upstream_timeout\n");
        assert_eq!(r.header("x-filter-resp"), Some("tagger"));
        assert_eq!(r.header("x-p-code"), Some("504"));
        assert_eq!(r.header("x-p-code-details"), Some("upstream_timeout"));
        lg.assert_stat(&calls("tagger", "response_headers"), 1.0)
            .await;
        lg.assert_stat(&calls("pw", "response_headers"), 1.0).await;
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="5xx"}"#,
            1.0,
        )
        .await;
    }
);

/// Listener `web` with the chain `tagger` (component, `headers` mode), then
/// `stopper`: `hostile` (fails closed: `/panic` traps in its request phase) or
/// a `body-upper` filter buffering the request body under a 1 KiB cap; all
/// routes to `up`. Both of them declare response headers phases.
fn stopping_chain(up: SocketAddr, stopper: &str) -> String {
    let stopper = match stopper {
        "hostile" => "config: { mode: hostile }\n    limits: { cpu: 500ms }",
        _ => "config: { mode: body-upper, phases: \"rq,rs,rqbody\", rqmode: buffered }\n    limits: { cpu: 500ms, body: 1KiB }",
    };
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: tagger }}, {{ plugin: stopper }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: / }}
            cluster: backend
            response_headers: {{ add: {{ x-route: main }} }}
clusters:
  - name: backend
    endpoints:
      - address: {up}
plugins:
  - name: tagger
    module: {guest}
    limits: {{ cpu: 500ms }}
    config: {{ mode: headers }}
  - name: stopper
    module: {guest}
    {stopper}
",
        guest = test_guest().display(),
    )
}

each_proto!(
    async fn a_fail_closed_503_reaches_only_the_filters_before_the_failed_one(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&stopping_chain(up.addr, "hostile"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/panic").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.text(), "plugin_failure: stopper\n");
        // The request's route finishes the answer (once)...
        assert_eq!(r.header_all("x-route"), vec!["main"]);
        // ...and the filter before the failed one sees it...
        assert_eq!(r.header("x-filter-resp"), Some("tagger"));
        lg.assert_stat(&calls("tagger", "response_headers"), 1.0)
            .await;
        // ...the failed one does not (it held the request, abi §3.2).
        assert_eq!(
            lg.stat(&calls("stopper", "response_headers")).await.unwrap_or(0.0),
            0.0
        );
        assert_eq!(up.requests.get(), 0);
    }
);

each_proto!(
    async fn a_buffer_cap_413_reaches_only_the_filters_before_the_buffering_one(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&stopping_chain(up.addr, "buffered"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/up").body("x".repeat(4096)).send().await;
        assert_eq!(r.status, 413, "{}", r.text());
        assert_eq!(r.text(), "plugin_buffer_limit\n");
        assert_eq!(r.header("x-filter-resp"), Some("tagger"));
        lg.assert_stat(&calls("tagger", "response_headers"), 1.0)
            .await;
        assert_eq!(
            lg.stat(&calls("stopper", "response_headers")).await.unwrap_or(0.0),
            0.0
        );
        lg.assert_stat(&calls("stopper", "request_headers"), 1.0)
            .await;
        assert_eq!(up.requests.get(), 0);
        // Under the cap the buffering filter takes part in the response too.
        let r = c.post("/up").body("small").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        lg.assert_stat(&calls("stopper", "response_headers"), 1.0)
            .await;
    }
);
