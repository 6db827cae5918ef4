//! proxy-wasm (Envoy ABI 0.2.1) filters in the request path: a module built with
//! the upstream `proxy-wasm` Rust SDK for wasm32-wasip1, unchanged, run by a real
//! Legate against a real upstream over HTTP/1.1 and HTTP/2. The guest's behaviour
//! is picked by its plugin configuration (`{"mode": ...}`), so the fixture builds
//! in one compile (tests/proxy-wasm-guests).

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use legate_tests::proxy_wasm::proxy_wasm_guest;
use legate_tests::*;

/// One plugin entry (indented for `plugins:`) running the guest with
/// `plugin_config` (YAML) and extra keys.
fn plugin(name: &str, plugin_config: &str, extra: &str) -> String {
    // A generous deadline for well-behaved guests, so a busy test machine never
    // trips it; the deadline tests set their own.
    let limits = if extra.contains("limits:") {
        ""
    } else {
        "    limits: { cpu: 500ms }\n"
    };
    format!(
        "  - name: {name}\n    module: {}\n{limits}{extra}    proxy_wasm:\n      plugin_config: {plugin_config}\n",
        proxy_wasm_guest().display()
    )
}

/// Listener `web` with the filter chain `chain`; route `rest` to the upstream.
fn config(up: SocketAddr, plugins: &str, chain: &[&str]) -> String {
    let chain: Vec<String> = chain.iter().map(|p| format!("{{ plugin: {p} }}")).collect();
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - name: rest
            match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
plugins:
{plugins}",
        chain.join(", ")
    )
}

fn calls(plugin: &str, phase: &str) -> String {
    format!("legate_plugin_calls_total{{plugin=\"{plugin}\",phase=\"{phase}\"}}")
}

fn load_error(yaml: &str) -> String {
    match legate().config(yaml).try_start() {
        Ok(_) => panic!("the config was loaded:\n{yaml}"),
        Err(e) => format!("{e:#}"),
    }
}

each_proto!(
    async fn rewrites_request_and_response_headers(proto) {
        let up = upstream().start().await;
        let p = plugin("rewriter", "{ mode: headers, greeting: bonjour }", "");
        // The VM configuration reaches `on_vm_start` as given.
        let p = p.replace(
            "    proxy_wasm:\n",
            "    proxy_wasm:\n      vm_config: vm-says-hi\n",
        );
        let lg = legate().config(&config(up.addr, &p, &["rewriter"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .get("/a?b=1")
            .header("x-pw-remove", "gone")
            .header("x-keep", "kept")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.path, "/a?b=1");
        assert_eq!(e.header("x-pw-hello"), Some("bonjour"));
        assert_eq!(e.header("x-pw-remove"), None);
        assert_eq!(e.header("x-keep"), Some("kept"));
        assert_eq!(e.header_all("x-pw-multi"), vec!["a", "b"]);
        assert_eq!(r.header("x-pw-response"), Some("1"));
        assert_eq!(r.header("x-pw-pseudo"), Some(":authority,:path,:method,:scheme"));
        assert_eq!(r.header("x-pw-vm-config"), Some("vm-says-hi"));
        lg.assert_stat(&calls("rewriter", "request_headers"), 1.0).await;
        lg.assert_stat(&calls("rewriter", "response_headers"), 1.0).await;
        lg.assert_stat(&calls("rewriter", "done"), 1.0).await;
        lg.assert_stat(r#"legate_plugin_instances{plugin="rewriter"}"#, 1.0)
            .await;
        // A second exchange on the same VM gets a fresh HTTP context.
        let r = c.get("/b").send().await;
        assert_eq!(r.echo().header("x-pw-hello"), Some("bonjour"));
        lg.assert_stat(&calls("rewriter", "done"), 2.0).await;
    }
);

each_proto!(
    async fn local_response_on_a_path(proto) {
        let up = upstream().start().await;
        let p = plugin("guard", "{ mode: headers }", "");
        let lg = legate().config(&config(up.addr, &p, &["guard"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/deny").send().await;
        assert_eq!(r.status, 403);
        assert_eq!(r.text(), "denied by proxy-wasm\n");
        assert_eq!(r.header("x-pw-denied"), Some("yes"));
        assert_eq!(up.requests.get(), 0);
        // A gRPC local response is trailers-only: 200, grpc-status in the head.
        let r = c.get("/grpc-deny").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("grpc-status"), Some("7"));
        assert_eq!(r.header("grpc-message"), Some("nope"));
        assert_eq!(r.header("content-type"), Some("application/grpc"));
        assert_eq!(r.header("x-pw-grpc"), Some("1"));
        assert_eq!(up.requests.get(), 0);
        let r = c.get("/fine").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(up.requests.get(), 1);
    }
);

each_proto!(
    async fn properties_use_envoy_names_and_encodings(proto) {
        let up = upstream().start().await;
        let p = plugin(
            "props",
            "{ mode: properties }",
            "",
        )
        .replace(
            "    proxy_wasm:\n",
            "    proxy_wasm:\n      root_id: my_root\n      vm_id: my_vm\n",
        );
        let lg = legate().config(&config(up.addr, &p, &["props"])).start();
        let addr = lg.addr("web");
        let mut c = client(proto, addr).await;
        let r = c.get("/p/q?x=1").header("x-probe", "probed").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let h = |n: &str| r.header(n).unwrap_or("<absent>").to_string();
        assert_eq!(h("x-p-path"), "/p/q?x=1");
        assert_eq!(h("x-p-url-path"), "/p/q");
        assert_eq!(h("x-p-method"), "GET");
        assert_eq!(h("x-p-host"), addr.to_string());
        assert_eq!(h("x-p-scheme"), "http");
        let protocol = match proto {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        };
        assert_eq!(h("x-p-protocol"), protocol);
        assert_eq!(h("x-p-id"), r.echo().header("x-request-id").unwrap());
        assert_eq!(h("x-p-plugin-name"), "props");
        assert_eq!(h("x-p-root-id"), "my_root");
        assert_eq!(h("x-p-vm-id"), "my_vm");
        assert_eq!(h("x-p-route"), "rest");
        assert_eq!(h("x-p-cluster"), "backend");
        assert!(h("x-p-source").starts_with("127.0.0.1:"), "{}", h("x-p-source"));
        let port = h("x-p-source").rsplit(':').next().unwrap().to_string();
        assert_eq!(h("x-p-source-port"), port);
        assert_eq!(h("x-p-dest-port"), addr.port().to_string());
        assert_eq!(h("x-p-missing"), "<none>");
        assert_eq!(h("x-p-header"), "probed");
        assert_eq!(h("x-p-time-len"), "8");
        assert_eq!(h("x-p-clock-ok"), "true");
        assert_eq!(h("x-p-set-prop"), "stored");
        assert_eq!(h("x-p-code"), "200");
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_config_as_text_or_plugin_config_key() {
    let up = upstream().start().await;
    // Envoy's StringValue form: the text reaches on_configure as is.
    let p = plugin(
        "text",
        "'{\"mode\": \"headers\", \"greeting\": \"from-text\"}'",
        "",
    );
    // The plugin's own `config` works as the plugin configuration too.
    let p2 = format!(
        "  - name: cfg\n    module: {}\n    config: {{ mode: headers, greeting: from-config }}\n",
        proxy_wasm_guest().display()
    );
    for (name, want) in [("text", "from-text"), ("cfg", "from-config")] {
        let lg = legate()
            .config(&config(up.addr, &(p.clone() + &p2), &[name]))
            .start();
        let mut c = client(Proto::H1, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.echo().header("x-pw-hello"), Some(want), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_configure_false_rejects_the_load() {
    let up = upstream().start().await;
    let p = plugin("picky", "{ mode: reject }", "");
    let err = load_error(&config(up.addr, &p, &["picky"]));
    assert!(
        err.contains("plugin `picky`: proxy_on_configure returned false"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_module_that_is_not_proxy_wasm_is_refused() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    // The smallest valid core module: header only, no exports.
    let path = dir.path().join("empty.wasm");
    std::fs::write(&path, b"\0asm\x01\0\0\0").unwrap();
    let p = format!("  - name: empty\n    module: {}\n", path.display());
    let err = load_error(&config(up.addr, &p, &["empty"]));
    assert!(
        err.contains("is a core Wasm module but not a proxy-wasm module"),
        "{err}"
    );
    // `proxy_wasm` settings on something that is not a core module.
    let path = dir.path().join("component.wasm");
    std::fs::write(&path, b"\0asm\x0d\0\x01\0").unwrap();
    let p = format!(
        "  - name: comp\n    module: {}\n    proxy_wasm: {{ root_id: x }}\n",
        path.display()
    );
    let err = load_error(&config(up.addr, &p, &["comp"]));
    assert!(
        err.contains("`proxy_wasm` settings are given, but"),
        "{err}"
    );
}

each_proto!(
    async fn shared_data_and_metrics_across_two_workers(proto) {
        let up = upstream().start().await;
        let vm = format!("counter-{proto:?}");
        let p = plugin("counter", "{ mode: counter }", "").replace(
            "    proxy_wasm:\n",
            &format!("    proxy_wasm:\n      vm_id: {vm}\n"),
        );
        let lg = legate()
            .concurrency(2)
            .config(&config(up.addr, &p, &["counter"]))
            .start();
        let addr = lg.addr("web");
        // The first set creates the key with CAS 0 ("unconditionally", as in
        // Envoy), which two racing creators could both do: create it first.
        let r = client(proto, addr).await.get("/count").send().await;
        assert_eq!(r.header("x-pw-counter"), Some("1"));
        // 8 clients × 10 requests racing on one key from two workers (a CAS loop in
        // the guest): no increment lost or doubled.
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn(async move {
                    let mut c = client(proto, addr).await;
                    for _ in 0..10 {
                        let r = c.get("/count").send().await;
                        assert_eq!(r.status, 200, "{}", r.text());
                        assert!(r.header("x-pw-counter").is_some());
                        assert_eq!(r.header("x-pw-queue"), Some("item"));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let mut c = client(proto, addr).await;
        let r = c.get("/count").send().await;
        assert_eq!(r.header("x-pw-counter"), Some("82"));
        assert_eq!(r.header("x-pw-metric"), Some("82"));
        lg.assert_stat(r#"legate_proxywasm_pw_requests{plugin="counter"}"#, 82.0)
            .await;
        lg.assert_stat(r#"legate_proxywasm_pw_gauge{plugin="counter"}"#, 42.0)
            .await;
        lg.assert_stat_with(
            r#"legate_plugin_instances{plugin="counter"}"#,
            |v| (1.0..=2.0).contains(&v),
            "one VM per worker that served",
        )
        .await;
    }
);

each_proto!(
    async fn queue_ready_drains_a_shared_queue(proto) {
        let up = upstream().start().await;
        let vm = format!("queue-{proto:?}");
        let p = plugin("queue", "{ mode: queue }", "").replace(
            "    proxy_wasm:\n",
            &format!("    proxy_wasm:\n      vm_id: {vm}\n"),
        );
        let lg = legate()
            .concurrency(2)
            .config(&config(up.addr, &p, &["queue"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for i in 0..5 {
            let r = c.get(&format!("/event/{i}")).send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-pw-resolved"), Some("true"));
        }
        // Each enqueue wakes the registering root context, which dequeues.
        lg.assert_stat(r#"legate_proxywasm_pw_dequeued{plugin="queue"}"#, 5.0)
            .await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_reach_the_root_context() {
    let up = upstream().start().await;
    let p = plugin("ticker", "{ mode: counter, tick_ms: 20 }", "")
        .replace("    proxy_wasm:\n", "    proxy_wasm:\n      vm_id: ticks\n");
    let lg = legate().config(&config(up.addr, &p, &["ticker"])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    // The VM (and its ticks) starts with the worker's first exchange.
    let r = c.get("/").send().await;
    assert_eq!(r.status, 200);
    lg.assert_stat_with(
        r#"legate_proxywasm_pw_ticks{plugin="ticker"}"#,
        |v| v >= 3.0,
        ">= 3 ticks",
    )
    .await;
    lg.assert_stat_with(&calls("ticker", "tick"), |v| v >= 3.0, ">= 3")
        .await;
    let failures = lg
        .stat(r#"legate_plugin_failures_total{plugin="ticker"}"#)
        .await;
    assert_eq!(failures.unwrap_or(0.0), 0.0);
}

/// The hostile guest on every path; `path` misbehaves and gets the failure policy,
/// the next request is served by a fresh VM.
async fn hostile(proto: Proto, path: &str, fail: &str, counter: &str) {
    let up = upstream().start().await;
    let p = plugin(
        "hostile",
        "{ mode: hostile }",
        &format!("    fail: {fail}\n    limits: {{ cpu: 50ms, memory: 16MiB }}\n"),
    );
    let lg = legate().config(&config(up.addr, &p, &["hostile"])).start();
    let mut c = client(proto, lg.addr("web")).await;
    let r = c.get("/fine").send().await;
    assert_eq!(r.status, 200);

    let r = c.get(path).send().await;
    if fail == "closed" {
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.text(), "plugin_failure: hostile\n");
        assert_eq!(up.requests.get(), 1);
    } else {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(up.requests.get(), 2);
    }
    lg.assert_stat(&format!("{counter}{{plugin=\"hostile\"}}"), 1.0)
        .await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="hostile"}"#, 1.0)
        .await;
    let r = c.get("/fine/again").send().await;
    assert_eq!(r.status, 200);
    lg.assert_stat(
        r#"legate_plugin_instance_restarts_total{plugin="hostile"}"#,
        1.0,
    )
    .await;
    lg.assert_stat(r#"legate_plugin_instances{plugin="hostile"}"#, 1.0)
        .await;
}

each_proto!(
    async fn guest_panic_fails_closed(proto) {
        hostile(proto, "/panic", "closed", "legate_plugin_traps_total").await;
    }
);

each_proto!(
    async fn guest_panic_fails_open(proto) {
        hostile(proto, "/panic", "open", "legate_plugin_traps_total").await;
    }
);

each_proto!(
    async fn endless_loop_stops_at_the_deadline(proto) {
        hostile(proto, "/loop", "closed", "legate_plugin_timeouts_total").await;
    }
);

each_proto!(
    async fn memory_cap_stops_a_growing_guest(proto) {
        hostile(proto, "/grow", "closed", "legate_plugin_memory_exceeded_total").await;
    }
);

each_proto!(
    async fn bad_pointers_and_contexts_get_error_statuses(proto) {
        let up = upstream().start().await;
        let p = plugin("hostile", "{ mode: hostile }", "");
        let lg = legate().config(&config(up.addr, &p, &["hostile"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        // Wild key pointer, wild out-pointers, a length past memory: each
        // INVALID_MEMORY_ACCESS (6); an unknown map type: BAD_ARGUMENT (2).
        let r = c.get("/badptr").header("x-probe", "v").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-bad"), Some("6,6,6,2"));
        // An unknown context id is refused (BAD_ARGUMENT), its own is accepted.
        let r = c.get("/badctx").send().await;
        assert_eq!(r.header("x-pw-badctx"), Some("2,0"));
        // http_call to a cluster the plugin is not granted: the SDK sees
        // BAD_ARGUMENT (as Envoy answers for an unknown cluster).
        let r = c.get("/unimpl").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-pw-http-call"), Some("Err(BadArgument)"));
        // WASI stdout/stderr go to the log, and do not fail the call.
        let r = c.get("/print").send().await;
        assert_eq!(r.status, 200);
        // Nothing failed; the same VM served everything.
        let r = c.get("/fine").send().await;
        assert_eq!(r.status, 200);
        let failures = lg
            .stat(r#"legate_plugin_failures_total{plugin="hostile"}"#)
            .await;
        assert_eq!(failures.unwrap_or(0.0), 0.0);
        lg.assert_stat(r#"legate_plugin_instances{plugin="hostile"}"#, 1.0)
            .await;
        lg.assert_stat(&calls("hostile", "request_headers"), 5.0).await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_sha256_is_refused() {
    let up = upstream().start().await;
    let p = plugin(
        "pinned",
        "{ mode: headers }",
        &format!("    sha256: {}\n", "0".repeat(64)),
    );
    let err = load_error(&config(up.addr, &p, &["pinned"]));
    assert!(err.contains("plugin `pinned`: module"), "{err}");
    assert!(err.contains("but the config says 0000"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_config_override_is_another_plugin_configuration() {
    let up = upstream().start().await;
    let p = plugin("rewriter", "{ mode: headers, greeting: default }", "");
    let yaml = config(up.addr, &p, &["rewriter"]).replace(
        "          - name: rest\n",
        "          - name: over
            match: { prefix: /over }
            cluster: backend
            filters: { rewriter: { config: { mode: headers, greeting: per-route } } }
          - name: off
            match: { prefix: /off }
            cluster: backend
            filters: { rewriter: { disabled: true } }
          - name: rest\n",
    );
    let lg = legate().config(&yaml).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c.get("/").send().await;
    assert_eq!(r.echo().header("x-pw-hello"), Some("default"));
    let r = c.get("/over").send().await;
    assert_eq!(r.echo().header("x-pw-hello"), Some("per-route"));
    let r = c.get("/off").send().await;
    assert_eq!(r.echo().header("x-pw-hello"), None);
    assert_eq!(r.header("x-pw-response"), None);
}

/// Every import of an SDK-built module is one this host provides (none is left to
/// the trap-when-called fallback), so SDK filters load without warnings.
#[test]
fn the_sdk_module_needs_no_import_the_host_lacks() {
    use legate_host::wasm::proxy_wasm::imports;
    let engine = legate_host::wasm::engine::engine().unwrap();
    let module = wasmtime::Module::from_file(engine, proxy_wasm_guest()).unwrap();
    let env: Vec<String> = module
        .imports()
        .filter(|i| i.module() == "env")
        .map(|i| i.name().to_string())
        .collect();
    // The SDK imports most host functions, used or not (36 with this guest's LTO).
    assert!(env.len() >= 30, "{env:?}");
    let mut linker = wasmtime::Linker::new(engine);
    imports::add_to_linker(&mut linker).unwrap();
    let unknown = imports::stub_the_rest(&mut linker, &module);
    assert!(unknown.is_empty(), "not provided: {unknown:?}");
}

// ---- HTTP callouts (proxy_http_call → proxy_on_http_call_response) ----

/// [`config`] plus cluster `authz` at `authz`.
fn with_authz(up: SocketAddr, authz: SocketAddr, plugins: &str, chain: &[&str]) -> String {
    with_cluster(&config(up, plugins, chain), "authz", authz)
}

fn caller(plugin_config: &str) -> String {
    plugin(
        "caller",
        plugin_config,
        "    capabilities: { clusters: [authz] }\n",
    )
}

each_proto!(
    /// The SDK's http_auth pattern: pause on an HTTP call, then resume with a
    /// header from its response, or answer with the response's status and body.
    async fn http_call_pauses_then_resumes_or_answers(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let lg = legate()
            .config(&with_authz(up.addr, az.addr, &caller("{ mode: callout }"), &["caller"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/hello").header("x-user", "alice").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.path, "/hello");
        assert_eq!(e.header("x-pw-authz"), Some("ok:anonymous"));
        let r = c.get("/deny/x").send().await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "denied:anonymous");
        assert_eq!(r.header("x-pw-denied"), Some("yes"));
        assert!(r.header("x-upstream").is_none(), "the backend answered");
        lg.assert_stat(r#"legate_plugin_callouts_total{plugin="caller"}"#, 2.0)
            .await;
        lg.assert_stat(&calls("caller", "callout_response"), 2.0).await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_total{cluster="authz"}"#, 2.0)
            .await;
        assert_eq!(up.requests.get(), 1, "only the allowed request reached the backend");
    }
);

each_proto!(
    /// A failed call (its timeout, or no endpoint) reaches the guest as zero
    /// headers; the guest answers 503.
    async fn http_call_failures_reach_the_guest(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let lg = legate()
            .config(&with_authz(
                up.addr,
                az.addr,
                &caller("{ mode: callout, timeout_ms: 100 }"),
                &["caller"],
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/slow").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("x-pw-call"), Some("failed"));
        lg.assert_stat(r#"legate_plugin_callout_timeouts_total{plugin="caller"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_plugin_callout_failures_total{plugin="caller"}"#, 1.0)
            .await;
        // The VM is fine: the next request is allowed.
        let r = c.get("/again").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
);

each_proto!(
    /// Calling a cluster the plugin was not granted fails the dispatch
    /// (BAD_ARGUMENT, what the Rust SDK returns as an error), nothing is sent.
    async fn http_call_needs_the_cluster_grant(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let p = plugin("caller", "{ mode: callout }", "");
        let lg = legate()
            .config(&with_authz(up.addr, az.addr, &p, &["caller"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/hello").send().await;
        assert_eq!(r.status, 500, "{}", r.text());
        assert_eq!(r.header("x-pw-call-error"), Some("BadArgument"));
        lg.assert_stat(r#"legate_plugin_callouts_total{plugin="caller"}"#, 0.0)
            .await;
        assert_eq!(az.requests.get(), 0);
    }
);

/// The root context calls out from `on_tick` and keeps the answer in shared data,
/// which requests then read (a JWKS-refresh-like pattern).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_call_from_the_root_context_on_tick() {
    let up = upstream().start().await;
    let az = authz_upstream().await;
    let lg = legate()
        .concurrency(1)
        .config(&with_authz(
            up.addr,
            az.addr,
            &caller("{ mode: tick-callout, tick_ms: 20 }"),
            &["caller"],
        ))
        .start();
    // The first request starts the worker's VM (and its ticks).
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(c.get("/first").send().await.status, 200);
    eventually(
        std::time::Duration::from_secs(5),
        "a tick's callout answered",
        || {
            let addr = lg.addr("web");
            async move {
                let mut c = client(Proto::H1, addr).await;
                let r = c.get("/x").send().await;
                (r.header("x-pw-tick-body") == Some("fresh")).then_some(())
            }
        },
    )
    .await;
    let sent = lg
        .stat(r#"legate_plugin_callouts_total{plugin="caller"}"#)
        .await
        .unwrap_or(0.0);
    assert!(sent >= 1.0, "callouts sent: {sent}");
    assert!(
        lg.stat(&calls("caller", "tick_callout_response"))
            .await
            .unwrap_or(0.0)
            >= 1.0,
        "{}",
        lg.stats().await
    );
}
