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

/// Modes whose headers callbacks return `Pause` with no call out and then
/// expect the body callbacks (Envoy's `StopIteration`): their plugins get
/// `allow_on_headers_stop_iteration` (tests/proxy-wasm-guests).
const STOP_ITERATION_MODES: &[&str] = &["body-wait", "peek", "stop-a", "body-local", "late-call"];

/// One plugin entry (indented for `plugins:`) running the guest with
/// `plugin_config` (YAML) and extra keys; with
/// `allow_on_headers_stop_iteration` for [`STOP_ITERATION_MODES`].
fn plugin(name: &str, plugin_config: &str, extra: &str) -> String {
    // A generous deadline for well-behaved guests, so a busy test machine never
    // trips it; the deadline tests set their own.
    let limits = if extra.contains("limits:") {
        ""
    } else {
        "    limits: { cpu: 500ms }\n"
    };
    let mode = plugin_config
        .split("mode: ")
        .nth(1)
        .and_then(|m| m.split([' ', ',', '}']).next())
        .unwrap_or_default();
    let stop = if STOP_ITERATION_MODES.contains(&mode) {
        "      allow_on_headers_stop_iteration: true\n"
    } else {
        ""
    };
    format!(
        "  - name: {name}\n    module: {}\n{limits}{extra}    proxy_wasm:\n      plugin_config: {plugin_config}\n{stop}",
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
        // The request head read again in the response callback is the one
        // sent upstream (the host keeps a snapshot of it).
        assert_eq!(
            r.header("x-pw-request-later"),
            Some("kept|bonjour|-|a,b|http")
        );
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
        // Replacing the whole map is all or nothing: a bad `:path` among the pairs
        // is BAD_ARGUMENT (2) and leaves every header as it was.
        let r = c.get("/set-all").header("x-keep", "orig").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-set-all-bad"), Some("2|-|orig"));
        assert_eq!(r.header("x-pw-set-all-good"), Some("0"));
        let e = r.echo();
        assert_eq!(e.path, "/replaced");
        assert_eq!(e.header("x-pw-set-all"), Some("good"));
        assert_eq!(e.header("x-keep"), Some("kept"));
        // Every response callback wrote a request header after the head went out;
        // none of them failed the filter.
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="rewriter"}"#, 0.0)
            .await;
        // `/plugins` names the ABI from the module's marker export.
        assert_eq!(lg.plugin_abi("rewriter").await, "proxy-wasm@0.2.1");
    }
);

each_proto!(
    async fn empty_values_come_back_as_envoy_gives_them(proto) {
        let up = upstream().start().await;
        // No plugin configuration and no VM configuration (`bare`), and both
        // given as empty text (`blank`): the SDK's getters give `None`, as
        // with Envoy (the guest then runs its `empty` mode).
        let bare = format!(
            "  - name: bare\n    module: {}\n    limits: {{ cpu: 500ms }}\n",
            proxy_wasm_guest().display()
        );
        let blank = plugin("blank", "''", "").replace(
            "    proxy_wasm:\n",
            "    proxy_wasm:\n      vm_config: ''\n",
        );
        for name in ["bare", "blank"] {
            let plugins = bare.clone() + &blank;
            let lg = legate()
                .config(&config(up.addr, &plugins, &[name]))
                .start();
            let mut c = client(proto, lg.addr("web")).await;
            let r = c
                .post("/empty")
                .header("x-empty", "")
                .body("hello")
                .send()
                .await;
            assert_eq!(r.status, 200, "{name}: {}", r.text());
            assert_eq!(r.header("x-pw-plugin-config"), Some("none"), "{name}");
            assert_eq!(r.header("x-pw-vm-config-seen"), Some("none"), "{name}");
            // An empty header value is `Some("")` (the Rust SDK's reading of
            // a null value for a header that exists).
            assert_eq!(r.header("x-pw-empty-header"), Some("some:"), "{name}");
            // Shared data set to no bytes reads back as `None`.
            assert_eq!(r.header("x-pw-empty-shared"), Some("none"), "{name}");
            // Zero bytes of a body, or from its end: `None`; the data itself
            // as ever.
            assert_eq!(r.header("x-pw-body-zero"), Some("none"), "{name}");
            assert_eq!(r.header("x-pw-body-past"), Some("none"), "{name}");
            assert_eq!(r.header("x-pw-body-first"), Some("some:hello"), "{name}");
            assert_eq!(r.echo().body, "hello", "{name}");
        }
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
        // The filter's own answer ran through its response headers callback.
        assert_eq!(r.header("x-pw-response"), Some("1"));
        assert_eq!(up.requests.get(), 0);
        // A gRPC local response to a gRPC request is trailers-only: 200,
        // grpc-status in the head, the text as grpc-message.
        let r = c.get("/grpc-deny").header("content-type", "application/grpc").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("grpc-status"), Some("7"));
        assert_eq!(r.header("grpc-message"), Some("nope"));
        assert_eq!(r.header("content-type"), Some("application/grpc"));
        assert_eq!(r.header("x-pw-grpc"), Some("1"));
        assert_eq!(r.text(), "");
        // To a request that is not gRPC, as Envoy: the status code the filter
        // gave (the SDK's 200) with the text as the body, no grpc-status.
        let r = c.get("/grpc-deny").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("grpc-status"), None);
        assert_eq!(r.text(), "nope");
        assert_eq!(r.header("x-pw-grpc"), Some("1"));
        assert_eq!(up.requests.get(), 0);
        // Two answers in one callback: the first stands, as in Envoy (its
        // second `sendLocalReply` finds the response under way). The second
        // replaced it.
        let r = c.get("/deny-twice").send().await;
        assert_eq!(r.status, 403);
        assert_eq!(r.text(), "first\n");
        assert_eq!(up.requests.get(), 0);
        let r = c.get("/fine").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(up.requests.get(), 1);
    }
);

each_proto!(
    async fn an_own_local_response_runs_through_the_filters_it_reached(proto) {
        let up = upstream().start().await;
        // Three `headers` filters; each adds `x-pw-response: 1` in its
        // response headers callback. Envoy encodes a local reply through every
        // encoder filter, and a proxy-wasm filter runs on it once its context
        // exists (its request headers came): the answering filter and the ones
        // before it, not the ones after it.
        let plugins = ["a", "b", "c"]
            .iter()
            .map(|n| plugin(n, "{ mode: headers }", ""))
            .collect::<String>();
        let lg = legate()
            .config(&config(up.addr, &plugins, &["a", "b", "c"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/deny").send().await;
        assert_eq!(r.status, 403);
        assert_eq!(r.text(), "denied by proxy-wasm\n");
        assert_eq!(r.header_all("x-pw-response"), vec!["1"]);
        lg.assert_stat(&calls("a", "response_headers"), 1.0).await;
        let seen = lg.stat(&calls("b", "response_headers")).await;
        assert_eq!(seen.unwrap_or(0.0), 0.0, "b");
        let seen = lg.stat(&calls("c", "response_headers")).await;
        assert_eq!(seen.unwrap_or(0.0), 0.0, "c");
        // Answered from a request body callback (`words`, after `a`'s and
        // before `b`'s request headers callbacks ran): all three see it.
        let plugins = plugin("a", "{ mode: headers }", "")
            + &plugin("words", "{ mode: body-local }", "")
            + &plugin("b", "{ mode: headers }", "");
        let lg = legate()
            .config(&config(up.addr, &plugins, &["a", "words", "b"]))
            .start();
        let r = client(proto, lg.addr("web"))
            .await
            .post("/up")
            .streamed_body("this is forbidden text", 4)
            .send()
            .await;
        assert_eq!(r.status, 403);
        assert_eq!(r.header("x-pw-body-denied"), Some("yes"));
        assert_eq!(r.text(), "no forbidden words\n");
        assert_eq!(r.header_all("x-pw-response"), vec!["1", "1"]);
        lg.assert_stat(&calls("words", "response_headers"), 1.0).await;
        lg.assert_stat(&calls("words", "response_body"), 1.0).await;
        lg.assert_stat(&calls("b", "response_headers"), 1.0).await;
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
        // Envoy's names for them under `xds` (Envoy 1.28), and the query.
        assert_eq!(h("x-p-xds-route"), "rest");
        assert_eq!(h("x-p-xds-cluster"), "backend");
        assert_eq!(h("x-p-query"), "x=1");
        assert!(h("x-p-source").starts_with("127.0.0.1:"), "{}", h("x-p-source"));
        let port = h("x-p-source").rsplit(':').next().unwrap().to_string();
        assert_eq!(h("x-p-source-port"), port);
        assert_eq!(h("x-p-dest-port"), addr.port().to_string());
        // Envoy's downstream connection id, under both names: one per
        // connection, the same for its requests.
        let id = h("x-p-conn-id");
        assert!(id.parse::<u64>().is_ok_and(|n| n > 0), "{id}");
        assert_eq!(h("x-p-conn-id2"), id);
        let again = c.get("/p/q").send().await;
        assert_eq!(again.header("x-p-conn-id"), Some(id.as_str()));
        let mut other = client(proto, addr).await;
        let elsewhere = other.get("/p/q").send().await;
        assert_ne!(elsewhere.header("x-p-conn-id"), Some(id.as_str()));
        assert_eq!(h("x-p-missing"), "<none>");
        assert_eq!(h("x-p-header"), "probed");
        assert_eq!(h("x-p-time-len"), "8");
        assert_eq!(h("x-p-clock-ok"), "true");
        assert_eq!(h("x-p-set-prop"), "stored");
        assert_eq!(h("x-p-code"), "200");
        // A value set under a built-in name does not hide it (Envoy reads
        // its attributes first).
        assert_eq!(h("x-p-shadowed-method"), "GET");
        // The request header map holds the pseudo-headers, as Envoy's.
        assert_eq!(h("x-p-h-authority"), addr.to_string());
        assert_eq!(h("x-p-h-path"), "/p/q?x=1");
        assert_eq!(h("x-p-h-method"), "GET");
        assert_eq!(h("x-p-h-scheme"), "http");
        let keys = h("x-p-h-keys");
        assert!(
            keys.starts_with(":authority,:path,:method,:scheme,") && keys.contains(",x-probe"),
            "{keys}"
        );
        // And the response's `:status`.
        assert_eq!(h("x-p-h-status"), "200");
    }
);

each_proto!(
    /// `proxy_set_property` writes the stream's filter state (Envoy's
    /// `wasm.<path>` keys), not the calling VM's: a later filter of the same
    /// exchange — another plugin with a VM of its own — reads the value in
    /// its callbacks and `on_log`, also as `filter_state.wasm.<path>`; the
    /// next exchange starts without it.
    async fn a_property_set_by_one_plugin_is_read_by_the_next(proto) {
        let up = upstream().start().await;
        let vm = |name: &str, tag: &str| {
            plugin(name, &format!("{{ mode: filter-state, tag: {tag} }}"), "").replace(
                "    proxy_wasm:\n",
                &format!("    proxy_wasm:\n      vm_id: vm_{tag}\n"),
            )
        };
        let plugins = vm("writer", "writer") + &vm("reader", "reader");
        let lg = legate()
            .config(&config(up.addr, &plugins, &["writer", "reader"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").header("x-fs-write", "peer-a").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-fs-req"), Some("peer-a"));
        assert_eq!(r.header("x-fs-state"), Some("peer-a"));
        assert_eq!(r.header("x-fs-resp"), Some("peer-a"));
        lg.assert_stat(
            r#"legate_proxywasm_pw_fs_logged_peer_a{plugin="reader"}"#,
            1.0,
        )
        .await;
        // Another exchange (on the same connection) does not see it.
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-fs-req"), Some("<none>"));
        assert_eq!(r.header("x-fs-state"), Some("<none>"));
        assert_eq!(r.header("x-fs-resp"), Some("<none>"));
        lg.assert_stat(
            r#"legate_proxywasm_pw_fs_logged_none{plugin="reader"}"#,
            1.0,
        )
        .await;
    }
);

each_proto!(
    /// The `connection.*` properties of an mTLS connection, as Envoy's: the
    /// client certificate's subject, its first URI and DNS SANs; none of
    /// them (`NOT_FOUND`) on a connection without a certificate.
    async fn connection_properties_describe_the_client_certificate(proto) {
        let up = upstream().start().await;
        let ca = Ca::new("props CA");
        let server = ca.server(&["a.example"]);
        let p = plugin("props", "{ mode: properties }", "");
        let cfg = config(up.addr, &p, &["props"]).replace(
            "routes:\n  - name: main",
            &format!(
                "    tls:
      certificates: [{{ cert: {}, key: {} }}]
      client_auth: {{ ca: {}, required: false }}
routes:
  - name: main",
                server.cert.display(),
                server.key.display(),
                ca.cert_path.display()
            ),
        );
        let lg = legate().config(&cfg).start();
        let addr = lg.addr("web");
        let cert = ca.client_with_uris("peer.example", &["spiffe://m/ns/a/sa/peer", "spiffe://m/2"]);
        let opts = TlsOptions::new(&server, "a.example").client_cert(cert);
        let mut c = tls_client(proto, addr, opts).await.expect("TLS client");
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let h = |n: &str| r.header(n).unwrap_or("<absent>").to_string();
        assert_eq!(h("x-p-peer-subject"), "CN=peer.example");
        assert_eq!(h("x-p-peer-uri"), "spiffe://m/ns/a/sa/peer");
        assert_eq!(h("x-p-peer-dns"), "peer.example");
        assert_eq!(h("x-p-sni"), "a.example");
        assert_eq!(h("x-p-tls-version"), "TLSv1.3");
        assert_eq!(h("x-p-scheme"), "https");

        let opts = TlsOptions::new(&server, "a.example");
        let mut c = tls_client(proto, addr, opts).await.expect("TLS client");
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        for n in ["x-p-peer-subject", "x-p-peer-uri", "x-p-peer-dns"] {
            assert_eq!(r.header(n), Some("<none>"), "{n}");
        }
    }
);

each_proto!(
    async fn source_address_is_the_client_trusted_proxies_reported(proto) {
        // As Envoy's `source.address` with `xff_num_trusted_hops`: the
        // downstream address its connection manager computed, port 0.
        let up = upstream().start().await;
        let p = plugin("props", "{ mode: properties }", "");
        let cfg = config(up.addr, &p, &["props"]).replace(
            "      routes: main\n",
            "      routes: main\n      trust_downstream: true\n      xff_num_trusted_hops: 1\n",
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .get("/")
            .header("x-forwarded-for", "203.0.113.9, 192.0.2.7")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-p-source"), Some("192.0.2.7:0"));
        assert_eq!(r.header("x-p-source-port"), Some("0"));
        // Without an entry: the peer.
        let r = c.get("/").send().await;
        let source = r.header("x-p-source").unwrap_or_default();
        assert!(source.starts_with("127.0.0.1:"), "{source}");
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

/// A filter that runs out of memory while it starts (a rule set to compile
/// in `proxy_on_configure`: Envoy caps no VM) is refused at its
/// `limits.memory`, with a help line saying to raise it and the allocation
/// that failed; the error was placed at its plugin configuration, with help
/// about the plugin's config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_out_of_memory_at_start_is_placed_at_its_memory_limit() {
    let up = upstream().start().await;
    let p = plugin(
        "heavy",
        "{ mode: noop, configure_alloc_mib: 32 }",
        "    limits: { cpu: 500ms, memory: 16MiB }\n",
    );
    let err = load_error(&config(up.addr, &p, &["heavy"]));
    // At the key, quoted under `file:line:col`.
    assert!(
        err.contains(".yaml:")
            && err.contains("plugin `heavy`: ")
            && err
                .lines()
                .any(|l| l.contains(" | ") && l.contains("memory: 16MiB")),
        "{err}"
    );
    assert!(
        err.contains("memory cap exceeded")
            && err.contains("memory allocation of 33554432 bytes failed"),
        "{err}"
    );
    assert!(
        err.contains(
            "help: the plugin needs more memory while it starts than `limits.memory` (16MiB) \
             lets it have: raise it (at most 256MiB)"
        ),
        "{err}"
    );
    assert!(!err.contains("says what its config takes"), "{err}");
}

/// A filter whose start takes more CPU than starting may (a large rule set
/// to compile; Envoy bounds none) is refused with a help line saying what
/// the bound is and that `limits.cpu` does not raise it; the help line said
/// "the plugin's own documentation says what its config takes".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_too_slow_to_start_is_told_the_start_deadline() {
    let up = upstream().start().await;
    // Far past the deadline's 1s of CPU (and its 10s of wall time, for a
    // loaded machine).
    let p = plugin("slow", "{ mode: noop, configure_spin_ms: 30000 }", "");
    let err = load_error(&config(up.addr, &p, &["slow"]));
    assert!(
        err.contains("plugin `slow`: proxy_on_configure failed: call exceeded its"),
        "{err}"
    );
    assert!(
        err.contains(
            "help: starting a plugin (its `configure`; proxy-wasm's `proxy_on_vm_start` and \
             `proxy_on_configure`) may take 1s of CPU (10x that of wall time), whatever its \
             `limits.cpu`: a component that does more work as it starts (compiling a large \
             rule set) cannot be loaded, a proxy-wasm filter can with a larger \
             `proxy_wasm.start_cpu` (at most 60s)"
        ),
        "{err}"
    );
    assert!(!err.contains("says what its config takes"), "{err}");
}

/// `proxy_wasm.start_cpu` raises the start's CPU bound: a filter whose
/// start takes 1.5 s (a rule set to compile) loads with `5s` and serves on
/// every worker's VM. There was no such key: the 1 s bound refused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_cpu_lets_a_slow_starting_filter_load() {
    let up = upstream().start().await;
    let p =
        plugin("slow", "{ mode: headers, configure_spin_ms: 1500 }", "") + "      start_cpu: 5s\n";
    let lg = legate()
        .config(&config(up.addr, &p, &["slow"]))
        .concurrency(1)
        .start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c.get("/").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-pw-response"), Some("1"));
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="slow"}"#, 0.0)
        .await;
}

/// A module for proxy-wasm ABI 0.1.0 is refused naming that ABI and the fix
/// (it was "not a proxy-wasm module (it exports neither …0_2_1 nor …0_2_0)").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_wasm_0_1_0_module_is_refused_naming_the_abi() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    // A core module exporting `proxy_abi_version_0_1_0`, a `() -> ()` function.
    let name = b"proxy_abi_version_0_1_0";
    let mut m = b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0\x03\x02\x01\0".to_vec();
    m.extend([7, name.len() as u8 + 4, 1, name.len() as u8]);
    m.extend(name);
    m.extend([0, 0]);
    m.extend(b"\x0a\x04\x01\x02\0\x0b");
    let path = dir.path().join("old.wasm");
    std::fs::write(&path, &m).unwrap();
    let p = format!("  - name: old\n    module: {}\n", path.display());
    let err = load_error(&config(up.addr, &p, &["old"]));
    assert!(
        err.contains(&format!(
            "plugin `old`: {} is built for proxy-wasm ABI 0.1.0, which is not supported \
             (this host implements 0.2.1 and 0.2.0); rebuild it with a proxy-wasm SDK \
             targeting 0.2.x",
            path.display()
        )),
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
    /// `proxy_record_metric` on a counter adds the value, as Envoy's (and
    /// proxy-wasm-cpp-host's) `recordMetric` does: it does not set it.
    async fn record_metric_adds_to_a_counter(proto) {
        let up = upstream().start().await;
        let p = plugin("recorder", "{ mode: counter }", "");
        let lg = legate().config(&config(up.addr, &p, &["recorder"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..3 {
            let r = c.get("/count").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        // Each request records 2.
        lg.assert_stat(&calls("recorder", "done"), 3.0).await;
        assert_eq!(
            lg.stat(r#"legate_proxywasm_pw_recorded{plugin="recorder"}"#)
                .await,
            Some(6.0)
        );
    }
);

each_proto!(
    /// `proxy_record_metric` on a histogram records the value as given, as
    /// Envoy's `recordValue` (it defines a plugin's histogram with an
    /// unspecified unit), over Envoy's default buckets: 7 and 2000 land under
    /// `le="10"` and `le="2500"`. (The value used to be taken as
    /// milliseconds, against buckets in seconds.)
    async fn record_metric_on_a_histogram_takes_the_value_as_given(proto) {
        let up = upstream().start().await;
        let p = plugin("recorder", "{ mode: counter }", "");
        let lg = legate().config(&config(up.addr, &p, &["recorder"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..3 {
            let r = c.get("/count").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        lg.assert_stat(&calls("recorder", "done"), 3.0).await;
        let h = "legate_proxywasm_pw_histogram";
        let text = lg.stats().await;
        let m = parse_prometheus(&text);
        let get = |s: String| m.get(&s).copied();
        assert_eq!(get(format!(r#"{h}_count{{plugin="recorder"}}"#)), Some(6.0), "{text}");
        assert_eq!(get(format!(r#"{h}_sum{{plugin="recorder"}}"#)), Some(6021.0), "{text}");
        for (le, n) in [("0.5", 0.0), ("5", 0.0), ("10", 3.0), ("1000", 3.0), ("2500", 6.0), ("3600000", 6.0), ("+Inf", 6.0)] {
            assert_eq!(
                get(format!(r#"{h}_bucket{{plugin="recorder",le="{le}"}}"#)),
                Some(n),
                "le {le}: {text}"
            );
        }
    }
);

each_proto!(
    /// A filter that resumes its direction in the callback that then returns
    /// `Pause` (a helper shared with a call's callback: "apply, then
    /// resume") goes on at once, as in Envoy, which defers a continue to the
    /// end of the call that makes it. The exchange waited for `limits.pause`
    /// and failed (503).
    async fn a_resume_in_the_callback_that_pauses_lets_the_message_go_on(proto) {
        let up = upstream().start().await;
        let p = plugin(
            "selfish",
            "{ mode: self-resume }",
            "    limits: { cpu: 500ms, pause: 3s }\n",
        );
        let lg = legate().config(&config(up.addr, &p, &["selfish"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/with-body").body("payload").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-self-resp"), Some("resumed"));
        let e = r.echo();
        assert_eq!(e.header("x-pw-self"), Some("resumed"));
        assert_eq!(e.body, "payload");
        let r = c.get("/no-body").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="selfish"}"#, 0.0)
            .await;
    }
);

each_proto!(
    /// A filter whose metric names carry values (Istio's and OSM's put tags
    /// in the name) defines more than the host exports: past the cap, and a
    /// name defined again with another type, `proxy_define_metric` still
    /// gives an id, which records into nothing, as Envoy defines them all.
    /// It was BAD_ARGUMENT, on which the SDK's `define_metric` panics: the
    /// request failed (503) at the 101st name.
    async fn metrics_past_the_cap_record_into_nothing_instead_of_failing(proto) {
        let up = upstream().start().await;
        let p = plugin("many", "{ mode: many-metrics }", "");
        let lg = legate().config(&config(up.addr, &p, &["many"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for round in 1..=2 {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            // The 100 exported ones read back their count; the others 0.
            assert_eq!(r.header("x-pw-many"), Some(&*(100 * round).to_string()));
        }
        let stat = |i: u32| format!("legate_proxywasm_pw_many_{i}{{plugin=\"many\"}}");
        lg.assert_stat(&stat(0), 2.0).await;
        lg.assert_stat(&stat(99), 2.0).await;
        let text = lg.stats().await;
        assert!(!text.contains("pw_many_100"), "{text}");
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="many"}"#, 0.0)
            .await;
    }
);

each_proto!(
    /// `proxy_close_stream` resets the stream, as Envoy's `resetStream`, under
    /// either failure policy: from a request or response headers callback
    /// nothing is answered (HTTP/2 `RST_STREAM`, HTTP/1.1 connection closed)
    /// and a reset request never reaches the upstream; from a response body
    /// callback the response is cut. It is not a plugin failure.
    async fn close_stream_resets_the_exchange_whatever_the_policy(proto) {
        let up = upstream().start().await;
        for fail in ["open", "closed"] {
            let p = plugin("closer", "{ mode: close }", &format!("    fail: {fail}\n"));
            let lg = legate().config(&config(up.addr, &p, &["closer"])).start();
            let addr = lg.addr("web");
            let before = up.requests.get();
            for path in ["/close-request", "/close-response", "/close-body"] {
                let r = client(proto, addr).await.get(path).try_send().await;
                assert!(
                    r.is_err(),
                    "fail {fail}, {path}: answered {:?}",
                    r.map(|r| (r.status, r.text()))
                );
            }
            // The reset request never went upstream; the other two did.
            assert_eq!(up.requests.get(), before + 2, "fail {fail}");
            let r = client(proto, addr).await.get("/fine").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            lg.assert_stat(&calls("closer", "done"), 4.0).await;
            let failures = lg
                .stat(r#"legate_plugin_failures_total{plugin="closer"}"#)
                .await;
            assert_eq!(failures.unwrap_or(0.0), 0.0, "fail {fail}");
        }
    }
);

each_proto!(
    /// An exchange `proxy_close_stream` reset before its response head is
    /// logged with Envoy's response code details for it, `wasm_close_stream`
    /// (status 499: nothing was sent). It used to be a client's
    /// `downstream_reset`.
    async fn close_stream_is_logged_as_wasm_close_stream(proto) {
        let up = upstream().start().await;
        let (_dir, log, yaml) = with_access_log(&config(
            up.addr,
            &plugin("closer", "{ mode: close }", ""),
            &["closer"],
        ));
        let lg = legate().config(&yaml).start();
        for path in ["/close-request", "/close-response"] {
            let r = client(proto, lg.addr("web")).await.get(path).try_send().await;
            assert!(r.is_err(), "{path}: answered {:?}", r.map(|r| r.status));
        }
        let lines = access_log_until(&log, "both lines", |l| l.len() >= 2).await;
        for v in &lines {
            assert_eq!(v["status"], 499, "{v}");
            assert_eq!(v["cause"], "wasm_close_stream", "{v}");
        }
    }
);

each_proto!(
    /// The filter that reset the stream (`proxy_close_stream`) still gets
    /// `on_log` with the exchange, as Envoy logs every filter, and reads
    /// there why it ended: `response.code_details` is `wasm_close_stream`,
    /// before the response head (status 499: nothing was sent) and after it
    /// (the body cut; the access log names it too, not as a failed body).
    /// It used to be skipped as a failed filter: its `on_log` ran without
    /// the exchange and read nothing.
    async fn a_filter_that_reset_the_stream_reads_why_in_on_log(proto) {
        let up = upstream().start().await;
        let (_dir, log, yaml) = with_access_log(&config(
            up.addr,
            &plugin("closer", "{ mode: close }", ""),
            &["closer"],
        ));
        let lg = legate().config(&yaml).start();
        for path in ["/close-request", "/close-response", "/close-body"] {
            let r = client(proto, lg.addr("web")).await.get(path).try_send().await;
            assert!(r.is_err(), "{path}: answered {:?}", r.map(|r| r.status));
        }
        lg.assert_stat(
            r#"legate_proxywasm_pw_logged_499_wasm_close_stream{plugin="closer"}"#,
            2.0,
        )
        .await;
        lg.assert_stat(
            r#"legate_proxywasm_pw_logged_200_wasm_close_stream{plugin="closer"}"#,
            1.0,
        )
        .await;
        let lines = access_log_until(&log, "three lines", |l| l.len() >= 3).await;
        for v in &lines {
            assert_eq!(v["cause"], "wasm_close_stream", "{v}");
        }
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

each_proto!(
    /// `proxy_on_queue_ready` is called once per enqueue, as
    /// proxy-wasm-cpp-host posts one call per enqueue: three enqueues in one
    /// callback are three calls, not one (the guest dequeues one item per call).
    async fn queue_ready_once_per_enqueue(proto) {
        let up = upstream().start().await;
        let vm = format!("queue-burst-{proto:?}");
        let p = plugin("burst", "{ mode: queue, burst: 3 }", "").replace(
            "    proxy_wasm:\n",
            &format!("    proxy_wasm:\n      vm_id: {vm}\n"),
        );
        let lg = legate().config(&config(up.addr, &p, &["burst"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for i in 0..2 {
            let r = c.get(&format!("/event/{i}")).send().await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        lg.assert_stat(r#"legate_proxywasm_pw_dequeued{plugin="burst"}"#, 6.0)
            .await;
    }
);

each_proto!(
    /// A queue consumer (a root context that registers its queue in
    /// `on_configure`) on a listener that never gets traffic still gets
    /// `proxy_on_queue_ready`: its VM starts on every worker with the config,
    /// as Envoy starts every worker's VM (it used to wait for the first
    /// exchange of its own plugin, so nothing was ever dequeued). The
    /// producer, on listener `web`, enqueues to the consumer's VM's queue.
    async fn a_queue_consumer_without_traffic_gets_its_items(proto) {
        let up = upstream().start().await;
        let sink = format!("sink-{proto:?}");
        let producer = plugin(
            "producer",
            &format!("{{ mode: queue, target_vm: {sink} }}"),
            "",
        )
        .replace(
            "    proxy_wasm:\n",
            &format!("    proxy_wasm:\n      vm_id: source-{proto:?}\n"),
        );
        let consumer = plugin("consumer", "{ mode: queue }", "").replace(
            "    proxy_wasm:\n",
            &format!("    proxy_wasm:\n      vm_id: {sink}\n"),
        );
        let cfg = config(up.addr, &(producer + &consumer), &["producer"]).replace(
            "routes:\n  - name: main\n",
            "  - name: idle\n    address: 127.0.0.1:0\n    http:\n      routes: main\n      \
             filters: [{ plugin: consumer }]\nroutes:\n  - name: main\n",
        );
        let lg = legate().concurrency(2).config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        for i in 0..3 {
            let r = c.get(&format!("/event/{i}")).send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-pw-resolved"), Some("false"));
        }
        let dequeued = r#"legate_proxywasm_pw_dequeued{plugin="consumer"}"#;
        eventually(HANG_GUARD, "the idle consumer dequeued the 3 items", || async {
            (lg.stat(dequeued).await == Some(3.0)).then_some(())
        })
        .await;
        lg.assert_stat(r#"legate_proxywasm_pw_dequeued{plugin="producer"}"#, 0.0)
            .await;
    }
);

each_proto!(
    /// A new tick period takes effect at once, as Envoy's `setTickPeriod`
    /// re-arms the timer: a root context ticking every 60 s that a request
    /// sets to 100 ms ticks soon after (it used to wait out the 60 s first);
    /// a period of 0 stops the ticks.
    async fn a_changed_tick_period_takes_effect_at_once(proto) {
        let up = upstream().start().await;
        let p = plugin("clock", "{ mode: tick-change, tick_ms: 60000 }", "");
        let lg = legate().config(&config(up.addr, &p, &["clock"])).start();
        let ticks = r#"legate_proxywasm_pw_changed_ticks{plugin="clock"}"#;
        // One connection: both requests reach the same worker's VM.
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/tick/100").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-tick-set"), Some("Ok(())"));
        // Well before the old period's 60 s.
        eventually(HANG_GUARD, "a tick at the new period", || async {
            (lg.stat(ticks).await.unwrap_or(0.0) >= 2.0).then_some(())
        })
        .await;
        let r = c.get("/tick/0").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let stopped = lg.stat(ticks).await.unwrap_or(0.0);
        // Ten periods of 100 ms: none comes.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert_eq!(lg.stat(ticks).await.unwrap_or(0.0), stopped);
    }
);

each_proto!(
    /// An HTTP context ends as in Envoy: `proxy_on_log` (the stream is
    /// logged), then `proxy_on_done` and `proxy_on_delete` (its filters are
    /// destroyed); it used to be done before log. (A TCP context keeps
    /// Envoy's done, log, delete.)
    async fn on_log_comes_before_on_done(proto) {
        let up = upstream().start().await;
        let p = plugin("order", "{ mode: order }", "");
        let lg = legate().config(&config(up.addr, &p, &["order"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..2 {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        lg.assert_stat(r#"legate_proxywasm_pw_log_before_done{plugin="order"}"#, 2.0)
            .await;
        lg.assert_stat(r#"legate_proxywasm_pw_log_after_done{plugin="order"}"#, 0.0)
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
    // The VM (and its ticks) starts with the config; a request runs in it.
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

each_proto!(
    /// A plugin whose root context sets its tick period in `on_configure` gets
    /// its VM on every worker when the config goes live (as Envoy starts each
    /// worker's VM), so it ticks before any request; requests then run in those
    /// VMs, not new ones; and a reload that removes the plugin ends its VMs and
    /// ticks.
    async fn a_ticking_plugin_starts_with_the_config_and_stops_when_removed(proto) {
        let up = upstream().start().await;
        let ticking = |name: &str| plugin(name, "{ mode: counter, tick_ms: 20 }", "");
        let instances = |p: &str| format!("legate_plugin_instances{{plugin=\"{p}\"}}");
        let lg = legate()
            .config(&config(
                up.addr,
                &(ticking("ticker") + &ticking("clock")),
                &["ticker", "clock"],
            ))
            .concurrency(2)
            .from_file()
            .start();
        // No request yet: each worker has its VM, and its root context ticks.
        lg.assert_stat_with(
            r#"legate_proxywasm_pw_ticks{plugin="ticker"}"#,
            |v| v >= 3.0,
            ">= 3 ticks",
        )
        .await;
        lg.assert_stat_with(&calls("ticker", "tick"), |v| v >= 3.0, ">= 3")
            .await;
        lg.assert_stat(&instances("ticker"), 2.0).await;
        // The load's check, then one VM per worker.
        lg.assert_stat(&calls("ticker", "configure"), 3.0).await;
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..3 {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        // The requests ran in the worker's VM: none was started for them.
        lg.assert_stat(&calls("ticker", "request_headers"), 3.0)
            .await;
        assert_eq!(lg.stat(&calls("ticker", "configure")).await, Some(3.0));
        assert_eq!(lg.stat(&instances("ticker")).await, Some(2.0));
        drop(c);

        // A reload removes `ticker` and carries `clock` over (unchanged).
        let v = lg.reload_ok(&config(up.addr, &ticking("clock"), &["clock"])).await;
        assert_eq!(v["plugins"]["kept"], serde_json::json!(["clock"]), "{v}");
        // Its VMs end on both workers, their memory with them, and it
        // ticks no more while `clock` ticks on with no request.
        assert_ticks_stopped(&lg, "ticker", "clock").await;
        lg.assert_stat(&instances("clock"), 2.0).await;
        // `clock` goes on in the VMs it had: none configured again.
        assert_eq!(lg.stat(&calls("clock", "configure")).await, Some(3.0));
    }
);

/// A reload that replaces or removes a plugin ends each worker's VM of it
/// as Envoy tears a plugin down: `proxy_on_done`, then `proxy_on_delete`, on
/// its root context (neither was ever called). A root context whose
/// `on_done` traps is logged and its VM dropped (no `on_delete`): the
/// reload and the other plugins go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_ends_the_root_contexts_of_the_plugins_it_removes() {
    let up = upstream().start().await;
    let rd =
        |name: &str, tag: &str| plugin(name, &format!("{{ mode: root-done, tag: {tag} }}"), "");
    let stat = |plugin: &str, name: &str| {
        format!("legate_proxywasm_pw_root_{name}{{plugin=\"{plugin}\"}}")
    };
    let instances = |plugin: &str| format!("legate_plugin_instances{{plugin=\"{plugin}\"}}");
    let lg = legate()
        .config(&config(
            up.addr,
            &(rd("rd", "a") + &rd("bad", "trap")),
            &["rd", "bad"],
        ))
        .concurrency(2)
        .from_file()
        .start();
    // Each worker runs a VM of each (they tick), the load's check VM is gone:
    // none ended its root context.
    lg.assert_stat(&instances("rd"), 2.0).await;
    lg.assert_stat(&instances("bad"), 2.0).await;
    assert_eq!(lg.stat(&stat("rd", "done_a")).await, None);
    assert_eq!(lg.stat(&stat("rd", "deleted")).await, None);

    // `rd` is replaced (its configuration changed), `bad` removed.
    lg.reload_ok(&config(up.addr, &rd("rd", "b"), &["rd"]))
        .await;
    lg.assert_stat(&stat("rd", "done_a"), 2.0).await;
    lg.assert_stat(&stat("rd", "deleted"), 2.0).await;
    lg.assert_stat(&stat("bad", "done_trap"), 2.0).await;
    assert_eq!(lg.stat(&stat("bad", "deleted")).await, None);
    // The new `rd` runs, its root context alive.
    lg.assert_stat(&instances("rd"), 2.0).await;
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c.get("/").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(lg.stat(&stat("rd", "done_b")).await, None);
}

/// The hostile guest on every path; `path` misbehaves and gets the failure policy,
/// the next request is served by a fresh VM. The VM's memory is in the memory
/// gauge, and leaves it with the VM.
async fn hostile(proto: Proto, path: &str, fail: &str, counter: &str) {
    const MEMORY: &str = r#"legate_plugin_memory_bytes{plugin="hostile",worker="0"}"#;
    let up = upstream().start().await;
    let p = plugin(
        "hostile",
        "{ mode: hostile }",
        &format!("    fail: {fail}\n    limits: {{ cpu: 50ms, memory: 16MiB }}\n"),
    );
    let lg = legate()
        .config(&config(up.addr, &p, &["hostile"]))
        .concurrency(1)
        .start();
    let mut c = client(proto, lg.addr("web")).await;
    let r = c.get("/fine").send().await;
    assert_eq!(r.status, 200);
    lg.assert_stat_with(MEMORY, |v| v >= 65536.0, ">= one Wasm page")
        .await;

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
    lg.assert_stat(MEMORY, 0.0).await;
    let r = c.get("/fine/again").send().await;
    assert_eq!(r.status, 200);
    lg.assert_stat(
        r#"legate_plugin_instance_restarts_total{plugin="hostile"}"#,
        1.0,
    )
    .await;
    lg.assert_stat(r#"legate_plugin_instances{plugin="hostile"}"#, 1.0)
        .await;
    lg.assert_stat_with(MEMORY, |v| v >= 65536.0, ">= one Wasm page")
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

/// The log lines of this test process, as the host's `fmt` subscriber
/// writes them (installed on first use, for every test of the process).
fn captured_log() -> String {
    use std::sync::{Arc, Mutex, OnceLock};
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
    static LOG: OnceLock<Sink> = OnceLock::new();
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

each_proto!(
    /// A guest panic is one `plugin failure` line naming the panic (which the
    /// SDK's hook logs at critical) and the trap's kind, and the hook's log
    /// message is one line too: it was the wasm backtrace, a line per frame,
    /// and the panic over two log lines.
    async fn a_guest_panic_is_one_failure_line_naming_it(proto) {
        captured_log();
        let up = upstream().start().await;
        let p = plugin("panicky", "{ mode: hostile }", "");
        let lg = legate()
            .config(&config(up.addr, &p, &["panicky"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/panic").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="panicky"}"#, 1.0)
            .await;
        let log = captured_log();
        let line = log
            .lines()
            .find(|l| l.contains("plugin failure") && l.contains("panicky"))
            .unwrap_or_else(|| panic!("no failure line: {log}"));
        assert!(
            line.contains("plugin failure: trap: panicked at src/lib.rs:")
                && line.contains(": guest panic on purpose (wasm `unreachable` instruction executed)"),
            "{line}"
        );
        assert!(!log.contains("<wasm function"), "{log}");
        // The hook's message: `panicked at LOCATION:` and the message, on one line.
        assert!(
            log.lines().any(|l| l.contains("panicked at src/lib.rs:")
                && l.contains("\\nguest panic on purpose")
                && !l.contains("plugin failure")),
            "{log}"
        );
    }
);

each_proto!(
    /// What a guest writes to stderr in several calls is one log line, and
    /// the failure names the allocation that failed: std writes `memory
    /// allocation of N bytes failed` in three pieces, each of which was
    /// logged as a line, and the failure's reason was the last line written
    /// (`the guest's last error line: …`), not the allocation.
    async fn a_guest_out_of_memory_is_one_line_naming_the_allocation(proto) {
        captured_log();
        let up = upstream().start().await;
        let p = plugin(
            "greedy",
            "{ mode: hostile }",
            "    limits: { cpu: 50ms, memory: 16MiB }\n",
        );
        let lg = legate().config(&config(up.addr, &p, &["greedy"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/grow").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        lg.assert_stat(
            r#"legate_plugin_memory_exceeded_total{plugin="greedy"}"#,
            1.0,
        )
        .await;
        let log = captured_log();
        let line = log
            .lines()
            .find(|l| l.contains("plugin failure") && l.contains("greedy"))
            .unwrap_or_else(|| panic!("no failure line: {log}"));
        assert!(
            line.contains("memory cap exceeded")
                && line.contains(": memory allocation of 67108864 bytes failed"),
            "{line}"
        );
        // The guest's own line, whole, at error.
        assert!(
            log.lines().any(|l| l.contains("ERROR")
                && l.contains(": memory allocation of 67108864 bytes failed plugin=\"greedy\"")),
            "{log}"
        );
        assert!(!log.contains(": 67108864 plugin="), "{log}");
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
        // An unknown stream type to continue or close: BAD_ARGUMENT, as in
        // Envoy (the close resets nothing).
        let r = c.get("/badstream").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-badstream"), Some("2,2"));
        // http_call to a cluster the plugin is not granted: the SDK sees
        // BAD_ARGUMENT (as Envoy answers for an unknown cluster).
        let r = c.get("/unimpl").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-pw-http-call"), Some("Err(BadArgument)"));
        // WASI stdout/stderr go to the log, and do not fail the call.
        let r = c.get("/print").send().await;
        assert_eq!(r.status, 200);
        // WASI `fd_fdstat_get`, as Envoy's: stdout and stderr answer with
        // the right to write (64), other fds `BADF` (8). It was `ENOSYS` (52).
        let r = c.get("/fdstat").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-pw-fdstat"), Some("8:0:0,0:0:64,0:0:64,8:0:0"));
        // Nothing failed; the same VM served everything.
        let r = c.get("/fine").send().await;
        assert_eq!(r.status, 200);
        let failures = lg
            .stat(r#"legate_plugin_failures_total{plugin="hostile"}"#)
            .await;
        assert_eq!(failures.unwrap_or(0.0), 0.0);
        lg.assert_stat(r#"legate_plugin_instances{plugin="hostile"}"#, 1.0)
            .await;
        lg.assert_stat(&calls("hostile", "request_headers"), 7.0).await;
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

each_proto!(
    /// A C++ SDK filter built with Emscripten imports two functions of
    /// Emscripten's runtime from `env`, which Envoy's host links: its
    /// allocator calls `emscripten_notify_memory_growth` whenever the heap
    /// grows, its libc `pthread_equal`. They were left to the
    /// trap-when-called fallback, so such a filter failed at its first
    /// growth (here its first request).
    async fn an_emscripten_filter_grows_its_memory_and_compares_threads(proto) {
        let up = upstream().start().await;
        let p = plugin("cpp", "{ mode: emscripten }", "");
        let lg = legate().config(&config(up.addr, &p, &["cpp"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..2 {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-pw-emscripten"), Some("grew 1, equal 1 0"));
        }
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="cpp"}"#, 0.0)
            .await;
        lg.assert_stat(&calls("cpp", "request_headers"), 2.0).await;
    }
);

// ---- a filter from another language's SDK ----

each_proto!(
    /// An AssemblyScript filter built with Solo.io's proxy-runtime SDK, configured
    /// as its README configures it for Envoy: root id, plugin configuration read
    /// back, request and response headers, a local response.
    async fn an_assemblyscript_filter_runs_unchanged(proto) {
        let up = upstream().start().await;
        let p = format!(
            "  - name: as\n    module: {}\n    limits: {{ cpu: 500ms }}\n    proxy_wasm:\n      root_id: legate_as\n      plugin_config: from-as\n",
            legate_tests::proxy_wasm::assemblyscript_guest().display()
        );
        let lg = legate().config(&config(up.addr, &p, &["as"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/hello").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-as-config"), Some("from-as"));
        assert_eq!(r.echo().header("x-as-request"), Some("seen"));
        let r = c.get("/as-deny").send().await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "denied by an AssemblyScript filter\n");
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(&calls("as", "request_headers"), 2.0).await;
    }
);

// ---- gRPC calls (proxy_grpc_call → proxy_on_grpc_receive / _close) ----

/// `yaml` plus cluster `grpc` (HTTP/2, as gRPC needs) at `addr`.
fn with_grpc_cluster(yaml: &str, addr: SocketAddr) -> String {
    yaml.replacen(
        "clusters:\n",
        &format!("clusters:\n  - name: grpc\n    protocol: h2\n    endpoints:\n      - address: {addr}\n"),
        1,
    )
}

each_proto!(
    /// The SDK's gRPC pattern against a real tonic server: pause on a unary gRPC
    /// call, resume with a header from the reply, or answer with a gRPC local
    /// response carrying the call's status (`send_grpc_response`).
    async fn grpc_call_pauses_then_resumes_or_answers_with_its_status(proto) {
        let up = upstream().start().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let p = plugin(
            "caller",
            "{ mode: grpc-call }",
            "    capabilities: { clusters: [grpc] }\n",
        );
        let yaml = with_grpc_cluster(&config(up.addr, &p, &["caller"]), grpc.addr);
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;

        let r = c.get("/say/hello").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.path, "/say/hello");
        assert_eq!(e.header("x-pw-grpc-reply"), Some("hello"));
        // The call's metadata reached the gRPC server.
        assert_eq!(e.header("x-pw-md-seen"), Some("yes"));

        // NOT_FOUND from the server (trailers-only): a gRPC local response.
        let r = c.get("/fail/5").header("content-type", "application/grpc+proto").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc"));
        assert_eq!(r.header("grpc-status"), Some("5"));
        assert_eq!(r.header("x-pw-grpc"), Some("failed"));
        let message = r.header("grpc-message").unwrap_or_default();
        assert!(message.contains("failed") && message.contains("purpose"), "{message}");
        assert_eq!(up.requests.get(), 1, "the failed call's request reached the backend");
        assert_eq!(grpc.calls.get(), 2);
        lg.assert_stat(r#"legate_plugin_callouts_total{plugin="caller"}"#, 2.0)
            .await;
        lg.assert_stat(&calls("caller", "callout_response"), 2.0).await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_to_a_dead_cluster_closes_with_unavailable() {
    let up = upstream().start().await;
    let p = plugin(
        "caller",
        "{ mode: grpc-call }",
        "    capabilities: { clusters: [grpc] }\n",
    );
    let yaml = with_grpc_cluster(&config(up.addr, &p, &["caller"]), closed_port_addr());
    let lg = legate().config(&yaml).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c
        .get("/say/hello")
        .header("content-type", "application/grpc")
        .send()
        .await;
    assert_eq!(r.header("grpc-status"), Some("14"), "{}", r.text());
    assert_eq!(up.requests.get(), 0);
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
        // Trailer count passed and map 7 read: this authz service sends none.
        assert_eq!(e.header("x-pw-call-trailers"), Some("0:0"));
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
    /// A call's callback runs when its answer arrives, whatever the state of
    /// the exchange, as Envoy runs it: here while the request, which went on
    /// (`Continue`), waits for an upstream that holds its response (an HTTP
    /// call, then a unary gRPC call). The host used to deliver it only at the
    /// response headers. Its write to the request head, which went on, is
    /// accepted and goes nowhere; `on_log` comes after it.
    async fn a_call_answer_reaches_its_callback_while_the_request_waits(proto) {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        use std::sync::Arc;
        let release = Arc::new(AtomicBool::new(false));
        let up = upstream().hold_until(&release).start().await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let p = plugin(
            "late",
            "{ mode: late-call }",
            "    capabilities: { clusters: [authz, grpc] }\n",
        );
        let yaml = no_route_timeout(&with_grpc_cluster(
            &with_authz(up.addr, az.addr, &p, &["late"]),
            grpc.addr,
        ));
        let lg = legate().config(&yaml).start();
        let addr = lg.addr("web");
        let delivered = r#"legate_proxywasm_pw_late_calls{plugin="late"}"#;
        for (n, path) in [(1.0, "/late/http"), (2.0, "/late/grpc")] {
            release.store(false, SeqCst);
            let mut c = client(proto, addr).await;
            let sent = tokio::spawn(async move { c.get(path).send().await });
            let lg = &lg;
            eventually(HANG_GUARD, &format!("{path}: the callback while the upstream holds the response"), || async move {
                lg.stat(delivered).await.filter(|v| *v >= n)
            })
            .await;
            release.store(true, SeqCst);
            let r = sent.await.unwrap();
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            assert_eq!(r.echo().header("x-pw-late"), None, "{path}");
        }
        lg.assert_stat(r#"legate_proxywasm_pw_late_logged{plugin="late"}"#, 2.0)
            .await;
        lg.assert_stat(&calls("late", "callout_response"), 2.0).await;
    }
);

each_proto!(
    /// The same for a call sent from the response headers callback while the
    /// response body streams (the upstream holds its end until the callback
    /// ran): the host used to drop such an answer, since no response headers
    /// phase came after it.
    async fn a_call_answer_reaches_its_callback_while_the_response_streams(proto) {
        use http_body_util::BodyExt;
        let (more_tx, stream) = gated_stream("part1;", "part2");
        let up = upstream()
            .route("/late/response", stream)
            .start()
            .await;
        let az = authz_upstream().await;
        let lg = legate().config(&late_call_config(up.addr, az.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let resp = tokio::time::timeout(HANG_GUARD, c.get("/late/response").send_for_head())
            .await
            .expect("the response head");
        assert_eq!(resp.status(), 200);
        late_calls(&lg, 1.0, "the callback while the response body streams").await;
        more_tx.send(()).unwrap();
        let body = tokio::time::timeout(HANG_GUARD, resp.into_body().collect())
            .await
            .expect("the rest of the body")
            .unwrap();
        assert_eq!(body.to_bytes(), "part1;part2");
        lg.assert_stat(r#"legate_proxywasm_pw_late_logged{plugin="late"}"#, 1.0)
            .await;
    }
);

/// A request body that sends `first`, then `rest` once the sender fires.
fn gated_body(
    first: &'static str,
    rest: &'static str,
) -> (tokio::sync::oneshot::Sender<()>, BoxBody) {
    use futures_util::StreamExt;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let first = futures_util::stream::once(async move {
        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(first)))
    });
    let rest = futures_util::stream::once(async move {
        let _ = rx.await;
        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(rest)))
    });
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(first.chain(rest)));
    (tx, body)
}

/// POSTs `path` from a task (its own connection), with a body of `part1;`,
/// then `part2` once the returned sender fires ([`gated_body`]).
fn gated_post(
    lg: &LegateHandle,
    proto: Proto,
    path: &'static str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Resp>,
) {
    let (more, body) = gated_body("part1;", "part2");
    let web = lg.addr("web");
    let sent = tokio::spawn(async move {
        client(proto, web)
            .await
            .post(path)
            .boxed_body(body)
            .send()
            .await
    });
    (more, sent)
}

/// Waits until `plugin`'s `phase` callbacks have run at least once.
async fn until_called(lg: &LegateHandle, plugin: &str, phase: &str, what: &str) {
    let stat = calls(plugin, phase);
    eventually(HANG_GUARD, what, || {
        let stat = &stat;
        async move { lg.stat(stat).await.filter(|v| *v >= 1.0) }
    })
    .await;
}

/// The config of the `late-call` guest (plugin `late`, which may call
/// cluster `authz`) in front of `up`, with `authz` at `az`.
fn late_call_config(up: SocketAddr, az: SocketAddr) -> String {
    let p = plugin(
        "late",
        "{ mode: late-call }",
        "    capabilities: { clusters: [authz] }\n",
    );
    with_authz(up, az, &p, &["late"])
}

/// `yaml` with an access log to a file in a new temporary directory (kept
/// while the returned `TempDir` lives): the directory, the log's path and the
/// config.
fn with_access_log(yaml: &str) -> (TempDir, std::path::PathBuf, String) {
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let yaml = yaml.replace(
        "version: 1\n",
        &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
    );
    (dir, log, yaml)
}

/// `yaml` with no route timeout on the backend route: an upstream that holds
/// its answer then waits as long as the test needs (a 504 would end the
/// exchange first, and a result delivered with it could pass for one
/// delivered on arrival).
fn no_route_timeout(yaml: &str) -> String {
    yaml.replace(
        "            cluster: backend\n",
        "            cluster: backend\n            timeout: 0s\n",
    )
}

/// Waits until the `late-call` guest's call callbacks reached `n`.
async fn late_calls(lg: &LegateHandle, n: f64, what: &str) {
    eventually(HANG_GUARD, what, || async move {
        lg.stat(r#"legate_proxywasm_pw_late_calls{plugin="late"}"#)
            .await
            .filter(|v| *v >= n)
    })
    .await;
}

each_proto!(
    /// While the request headers callback's `Pause` holds the head (Envoy's
    /// StopIteration: the body streams through the body callback), a call's
    /// callback that runs between two chunks writes that head, and the
    /// write reaches the upstream with it, as in Envoy. (It was accepted
    /// and went nowhere.)
    async fn a_call_answer_between_chunks_writes_the_held_request_head(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let lg = legate().config(&late_call_config(up.addr, az.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let (more, body) = gated_body("part1;", "part2");
        let sent = tokio::spawn(async move { c.post("/late/held").boxed_body(body).send().await });
        late_calls(&lg, 1.0, "the callback between the chunks").await;
        more.send(()).unwrap();
        let r = tokio::time::timeout(HANG_GUARD, sent).await.expect("the answer").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.body, "part1;part2");
        assert_eq!(e.header("x-pw-held-write"), Some("call"));
    }
);

each_proto!(
    /// The same on the response: the response headers callback's `Pause`
    /// holds the head while the body streams, and a call's callback between
    /// two chunks writes it; the client gets the header.
    async fn a_call_answer_between_chunks_writes_the_held_response_head(proto) {
        use http_body_util::BodyExt;
        let (more, stream) = gated_stream("part1;", "part2");
        let up = upstream().route("/late/held-resp", stream).start().await;
        let az = authz_upstream().await;
        let lg = legate().config(&late_call_config(up.addr, az.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let head = tokio::spawn(async move { c.get("/late/held-resp").send_for_head().await });
        late_calls(&lg, 1.0, "the callback between the chunks").await;
        more.send(()).unwrap();
        let resp = tokio::time::timeout(HANG_GUARD, head).await.expect("the head").unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers().get("x-pw-held-write").map(|v| v.to_str().unwrap()), Some("call"));
        let body = tokio::time::timeout(HANG_GUARD, resp.into_body().collect())
            .await
            .expect("the body")
            .unwrap();
        assert_eq!(body.to_bytes(), "part1;part2");
    }
);

each_proto!(
    /// A local response from a call's callback while the exchange is not
    /// paused (the request went on, `Continue`, and waits for an upstream
    /// that holds its answer) answers the client at once, as Envoy's
    /// `sendLocalReply`: the upstream request is aborted. (It was ignored,
    /// and the client got the upstream's answer.)
    async fn a_call_answer_while_the_request_waits_can_answer_at_once(proto) {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let release = Arc::new(AtomicBool::new(false));
        let up = upstream().hold_until(&release).start().await;
        let az = authz_upstream().await;
        // No route timeout: only the filter's answer can end the wait.
        let yaml = no_route_timeout(&late_call_config(up.addr, az.addr));
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = tokio::time::timeout(HANG_GUARD, c.get("/late/deny").send())
            .await
            .expect("the filter's answer, while the upstream holds its own");
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "denied late");
        assert_eq!(r.header("x-pw-late-denied"), Some("yes"));
        assert!(r.header("x-upstream").is_none(), "the backend answered");
        lg.assert_stat(r#"legate_proxywasm_pw_late_logged{plugin="late"}"#, 1.0)
            .await;
    }
);

each_proto!(
    /// A trap in a call's callback while the exchange is not paused (the
    /// request went on and waits for an upstream that holds its answer) is
    /// counted in the plugin's stats when it happens, and its failure policy
    /// (closed) answers at the response head, as Envoy fails the stream at
    /// its next callback (docs/proxy-wasm.md, "Callbacks while not paused"),
    /// also when the failed filter was the only one with a response phase.
    /// (The upstream's 200 passed: the failed filter was skipped, so no
    /// filter had a response phase and the failure went nowhere.)
    async fn a_trap_in_a_callback_between_phases_fails_the_exchange(proto) {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let release = Arc::new(AtomicBool::new(false));
        let up = upstream().hold_until(&release).start().await;
        let az = authz_upstream().await;
        let yaml = no_route_timeout(&late_call_config(up.addr, az.addr));
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let sent = tokio::spawn(async move { c.get("/late/trap").send().await });
        // The upstream still holds its answer: no later step has come.
        eventually(HANG_GUARD, "the trap counted", || async {
            lg.stat(r#"legate_plugin_traps_total{plugin="late"}"#)
                .await
                .filter(|v| *v >= 1.0)
        })
        .await;
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="late"}"#, 1.0)
            .await;
        assert!(!sent.is_finished(), "answered before the upstream");
        release.store(true, Ordering::SeqCst);
        let r = tokio::time::timeout(HANG_GUARD, sent)
            .await
            .expect("the answer")
            .unwrap();
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.text(), "plugin_failure: late\n");
        lg.assert_stat(r#"legate_plugin_traps_total{plugin="late"}"#, 1.0)
            .await;
    }
);

each_proto!(
    /// The same while the request headers callback's `Pause` holds the head
    /// and the body streams through the body callback: the answer replaces
    /// the request, which never reaches the upstream (the client has not
    /// even sent the whole body).
    async fn a_call_answer_between_chunks_can_answer_the_held_request(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let lg = legate().config(&late_call_config(up.addr, az.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let (more, body) = gated_body("part1;", "part2");
        let r = tokio::time::timeout(
            HANG_GUARD,
            c.post("/late/held-deny").boxed_body(body).send(),
        )
        .await
        .expect("the filter's answer before the end of the body");
        drop(more);
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "denied late");
        assert_eq!(r.header("x-pw-late-denied"), Some("yes"));
        assert_eq!(up.requests.get(), 0, "the held request reached the backend");
    }
);

each_proto!(
    /// And on the response: while the response headers callback's `Pause`
    /// holds the head and the body streams, the answer replaces the
    /// response (the upstream has not even sent all of it).
    async fn a_call_answer_between_chunks_can_replace_the_held_response(proto) {
        let (_more, stream) = gated_stream("part1;", "part2");
        let up = upstream().route("/late/held-resp-deny", stream).start().await;
        let az = authz_upstream().await;
        let lg = legate().config(&late_call_config(up.addr, az.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = tokio::time::timeout(HANG_GUARD, c.get("/late/held-resp-deny").send())
            .await
            .expect("the filter's answer before the end of the upstream's body");
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "denied late");
        assert_eq!(r.header("x-pw-late-denied"), Some("yes"));
    }
);

each_proto!(
    /// `proxy_continue_stream` resumes the direction it names, as Envoy's
    /// `continueStream` (`HTTP_REQUEST`: `continueDecoding`, `HTTP_RESPONSE`:
    /// `continueEncoding`): a callback that continues the direction that is
    /// not paused resumes nothing, and the exchange waits for its second
    /// call, whose callback continues the right one. (Any type used to resume
    /// whichever direction was paused.)
    async fn continue_stream_resumes_only_the_direction_it_names(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let p = plugin(
            "resumer",
            "{ mode: wrong-resume }",
            "    capabilities: { clusters: [authz] }\n",
        );
        let lg = legate()
            .config(&with_authz(up.addr, az.addr, &p, &["resumer"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/req").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-pw-resumed-by"), Some("second"));
        let r = c.get("/resp").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-resumed-by"), Some("second"));
        lg.assert_stat(&calls("resumer", "callout_response"), 4.0).await;
    }
);

each_proto!(
    /// An exchange paused on a call in a VM that another exchange's callback
    /// makes trap fails at once (as for components, abi/README.md §9), not
    /// when its call comes back: the call is held past [`HANG_GUARD`].
    async fn a_trap_fails_the_exchanges_paused_in_that_vm_at_once(proto) {
        let up = upstream().start().await;
        let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let az = upstream().name("authz").hold_until(&release).start().await;
        // One worker: both exchanges run in the same VM.
        let lg = legate()
            .concurrency(1)
            .config(&with_authz(
                up.addr,
                az.addr,
                &caller("{ mode: callout, timeout_ms: 30000 }"),
                &["caller"],
            ))
            .start();
        let mut held = client(proto, lg.addr("web")).await;
        let held = tokio::spawn(async move { held.get("/held").send().await });
        eventually(HANG_GUARD, "the held call to reach authz", || async {
            (az.requests.get() == 1).then_some(())
        })
        .await;
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/panic").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        let r = tokio::time::timeout(HANG_GUARD, held)
            .await
            .expect("the paused exchange waited for its call")
            .unwrap();
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.text(), "plugin_failure: caller\n");
        assert!(!release.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(up.requests.get(), 0);
        release.store(true, std::sync::atomic::Ordering::SeqCst);
    }
);

each_proto!(
    /// A call asking for `content-length: 5` with no body (Envoy accepts the
    /// field; the Rust SDK would panic on an error): the host drops it and
    /// frames the call itself. Sent as asked, the upstream (here the echo
    /// backend, as `authz`) would wait for 5 bytes that never come.
    async fn http_call_drops_fields_the_host_owns(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&with_authz(up.addr, up.addr, &caller("{ mode: callout }"), &["caller"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/owned/1").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The call's echo, which the guest put in `x-pw-authz`.
        let seen = r.echo().header("x-pw-authz").unwrap_or_default().to_string();
        let call: EchoBody = serde_json::from_str(&seen).unwrap();
        assert_eq!(call.path, "/check/owned/1");
        assert_eq!(call.header("content-length"), None);
        assert_eq!(call.body_len, 0);
        assert_eq!(up.requests.get(), 2);
        lg.assert_stat(r#"legate_plugin_callout_failures_total{plugin="caller"}"#, 0.0)
            .await;
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
    /// A call with timeout 0 has no timeout of its own, as Envoy's `httpCall`
    /// (its async client then sets none): it waits for an answer that takes
    /// 2 s, up to the 30 s every call is capped at. It meant 1 s, so the call
    /// failed and the guest answered 503.
    async fn http_call_timeout_0_waits_for_the_answer(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let lg = legate()
            .config(&with_authz(
                up.addr,
                az.addr,
                &caller("{ mode: callout, timeout_ms: 0 }"),
                &["caller"],
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/slow").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-pw-authz"), Some("ok:anonymous"));
        lg.assert_stat(r#"legate_plugin_callout_timeouts_total{plugin="caller"}"#, 0.0)
            .await;
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

each_proto!(
    /// A call without `:authority` is refused with BAD_ARGUMENT, as Envoy's
    /// `httpCall` refuses one without `:method`, `:path` or `:authority` (a
    /// `host` pair is no substitute): nothing is sent (it used to go with the
    /// `host` pair as its authority).
    async fn http_call_needs_an_authority(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let lg = legate()
            .config(&with_authz(up.addr, az.addr, &caller("{ mode: callout }"), &["caller"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/no-authority").send().await;
        assert_eq!(r.status, 500, "{}", r.text());
        assert_eq!(r.header("x-pw-call-error"), Some("BadArgument"));
        lg.assert_stat(r#"legate_plugin_callouts_total{plugin="caller"}"#, 0.0)
            .await;
        assert_eq!(az.requests.get(), 0);
        // The same call with its `:authority` goes.
        let r = c.get("/hello").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(az.requests.get(), 1);
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
    // The worker's VM (and its ticks) started with the config.
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

// ---- bodies and trailers (proxy_on_*_body, proxy_on_*_trailers) ----

fn limit_exceeded(plugin: &str, direction: &str) -> String {
    format!(
        "legate_plugin_body_limit_exceeded_total{{plugin=\"{plugin}\",direction=\"{direction}\"}}"
    )
}

/// The response body without the `<<`/`>>` the `body-rewrite` guest wraps it in.
fn unwrap_angles(text: &str) -> &str {
    assert!(
        text.starts_with("<<") && text.ends_with(">>"),
        "not wrapped: {}",
        &text[..text.len().min(200)]
    );
    &text[2..text.len() - 2]
}

each_proto!(
    async fn paused_body_callbacks_see_the_whole_body_and_rewrite_it(proto) {
        let up = upstream().start().await;
        let p = plugin("rw", "{ mode: body-rewrite }", "");
        let lg = legate().config(&config(up.addr, &p, &["rw"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        // Many chunks: the guest returns Pause until end of stream, so it must be
        // handed the whole body then (and nothing may reach the upstream before).
        let body = "hello world ".repeat(20_000);
        let r = c
            .post("/up")
            .streamed_body(body.clone(), 16 * 1024)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let text = r.text();
        let e: EchoBody = serde_json::from_str(unwrap_angles(&text)).unwrap();
        let want = body.replace("hello", "HELLO-WORLD");
        assert_eq!(e.body_len, want.len());
        assert!(e.body == want, "the upstream got another body");
        // No stale length went upstream (the guest removed it; the host framed
        // the longer body itself).
        assert!(e.header("content-length").is_none_or(|l| l == want.len().to_string()));
        // A header set from the body callback, after the head went out: accepted
        // (no failure, as in Envoy), and it goes nowhere.
        assert_eq!(e.header("x-pw-late"), None);
        let seen = r.header("x-pw-rq-body").unwrap();
        let (calls_seen, len) = seen.split_once(':').unwrap();
        assert_eq!(len, body.len().to_string(), "the length at end of stream");
        assert!(calls_seen.parse::<u32>().unwrap() >= 2, "{seen}: one call only");
        lg.assert_stat_with(&calls("rw", "request_body"), |v| v >= 2.0, ">= 2")
            .await;
        lg.assert_stat_with(&calls("rw", "response_body"), |v| v >= 1.0, ">= 1")
            .await;
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="rw"}"#, 0.0)
            .await;
    }
);

each_proto!(
    /// `set_http_request_body(0, n, data)` with `0 < n < length`: Envoy drains
    /// the first `n` bytes and prepends `data` (no error, which the SDK would
    /// panic on).
    async fn a_body_write_at_0_replaces_its_first_bytes(proto) {
        let up = upstream().start().await;
        let p = plugin("splice", "{ mode: body-splice }", "");
        let lg = legate().config(&config(up.addr, &p, &["splice"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/up").body("hello world").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().body, "HELLO world");
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="splice"}"#, 0.0)
            .await;
        lg.assert_stat_with(&calls("splice", "request_body"), |v| v >= 1.0, ">= 1")
            .await;
    }
);

each_proto!(
    async fn pause_from_headers_waits_for_the_whole_body(proto) {
        let up = upstream().start().await;
        let p = plugin("wait", "{ mode: body-wait }", "");
        let lg = legate().config(&config(up.addr, &p, &["wait"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .post("/up")
            .streamed_body("abc def", 3)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The response body was upper-cased and its head written in the body
        // callback (the head was held with the body).
        let text = r.text();
        assert!(text.contains("\"BODY\":\"ABC DEF\""), "{text}");
        assert_eq!(r.header("x-pw-body-len"), Some(text.len().to_string().as_str()));
        let e: Value = serde_json::from_str(&text.to_lowercase()).unwrap();
        // The request head was written in the body callback too, and the host set
        // the length of the rewritten body.
        assert_eq!(e["headers"]["x-pw-body-len"][0], "7");
        assert_eq!(e["headers"]["content-length"][0], "7");
        // A call per chunk as it came (Envoy's way), each held by the guest.
        lg.assert_stat_with(&calls("wait", "request_body"), |v| v >= 1.0, ">= 1")
            .await;
        lg.assert_stat_with(&calls("wait", "response_body"), |v| v >= 1.0, ">= 1")
            .await;
    }
);

/// An upstream handler streaming a response (`text/event-stream`, no length):
/// `first` at once, `rest` only once the returned sender fires, so a test sees
/// what reaches the client while the upstream still holds the stream open.
/// Answers one request.
fn gated_stream(
    first: &'static str,
    rest: &'static str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    impl Fn(Request<Incoming>) -> std::future::Ready<Response<BoxBody>> + Send + Sync + 'static,
) {
    gated_stream_sized(first, rest, false)
}

/// [`gated_stream`], with a `content-length` (of `first` and `rest`) if
/// `sized`.
fn gated_stream_sized(
    first: &'static str,
    rest: &'static str,
    sized: bool,
) -> (
    tokio::sync::oneshot::Sender<()>,
    impl Fn(Request<Incoming>) -> std::future::Ready<Response<BoxBody>> + Send + Sync + 'static,
) {
    use futures_util::StreamExt;
    use std::sync::{Arc, Mutex};
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = Arc::new(Mutex::new(Some(rx)));
    let len = first.len() + rest.len();
    let handler = move |_req| {
        let more = rx.lock().unwrap().take();
        let first = futures_util::stream::once(async move {
            Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(first)))
        });
        let rest = futures_util::stream::once(async move {
            if let Some(more) = more {
                let _ = more.await;
            }
            Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(rest)))
        });
        let body =
            http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(first.chain(rest)));
        let mut r = Response::new(body);
        r.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("text/event-stream"),
        );
        if sized {
            r.headers_mut()
                .insert("content-length", http::HeaderValue::from(len));
        }
        std::future::ready(r)
    };
    (tx, handler)
}

/// The upstream's view of a request: the body's length and checksum (read as
/// it streams, [`sink`]) and the headers `x-pw-first-chunk` and `x-pw-late`.
async fn sink_with_marks(req: Request<Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    let h = |n: &str| {
        let v = req.headers().get(n).and_then(|v| v.to_str().ok());
        v.unwrap_or("-").to_string()
    };
    let (first, late) = (h("x-pw-first-chunk"), h("x-pw-late"));
    let body = sink(req).await.into_body().collect().await.unwrap();
    let mut v: Value = serde_json::from_slice(&body.to_bytes()).unwrap();
    v["first"] = first.into();
    v["late"] = late.into();
    Response::new(Full::new(Bytes::from(v.to_string())))
}

each_proto!(
    /// A local response from a call's callback after the response head went
    /// to the client (the call sent from the response headers callback, its
    /// answer arriving while the upstream holds the rest of the body) resets
    /// the stream, as Envoy's `sendLocalReply` once headers are sent: the
    /// client can tell the response is incomplete (HTTP/2 `RST_STREAM`;
    /// HTTP/1.1 the connection closed with the chunked body unterminated, or
    /// short of its `content-length`). The access log and `on_log` name the
    /// filter's answer (`plugin:<details>`), and the reset is counted. (It
    /// was ignored, and the body went on.)
    async fn a_call_answer_after_the_response_head_resets_the_stream(proto) {
        use http_body_util::BodyExt;
        for sized in [false, true] {
            let (more, stream) = gated_stream_sized("part1;", "part2", sized);
            let up = upstream().route("/late/response-deny", stream).start().await;
            let az = authz_upstream().await;
            let (_dir, log, yaml) = with_access_log(&late_call_config(up.addr, az.addr));
            let lg = legate().config(&yaml).start();
            let mut c = client(proto, lg.addr("web")).await;
            let resp = tokio::time::timeout(HANG_GUARD, c.get("/late/response-deny").send_for_head())
                .await
                .expect("the response head");
            assert_eq!(resp.status(), 200);
            // The upstream holds the rest of its body until `more` fires,
            // which it does not: only the reset can end the body.
            let body = tokio::time::timeout(HANG_GUARD, resp.into_body().collect())
                .await
                .expect("the body cut by the filter's answer, not held open");
            assert!(
                body.is_err(),
                "sized {sized}: the body ended cleanly: {:?}",
                body.map(|b| b.to_bytes())
            );
            drop(more);
            let lines = access_log_until(&log, "the line", |l| !l.is_empty()).await;
            assert_eq!(lines[0]["status"], 200, "{}", lines[0]);
            assert_eq!(lines[0]["cause"], "plugin:late_denied", "{}", lines[0]);
            lg.assert_stat(r#"legate_listener_late_local_replies_total{listener="web"}"#, 1.0)
                .await;
            // `on_log` of the filter that answered reads why.
            lg.assert_stat(
                r#"legate_proxywasm_pw_logged_200_plugin_late_denied{plugin="late"}"#,
                1.0,
            )
            .await;
        }
    }
);

each_proto!(
    /// A local response from a call's callback while another filter's pause
    /// holds the exchange answers it, as Envoy's `sendLocalReply` does
    /// whatever other filters' pause state: the first filter's call (sent
    /// from its request headers callback, which continued) is answered
    /// while the second filter waits for a call its upstream holds; the
    /// second filter's call is abandoned (its callback never comes) and the
    /// request never reaches the upstream. (The answer was ignored, and the
    /// exchange waited for the paused filter.)
    async fn a_call_answer_while_another_filter_is_paused_answers(proto) {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        use std::sync::Arc;
        let release = Arc::new(AtomicBool::new(false));
        let up = upstream().start().await;
        let held = upstream().hold_until(&release).start().await;
        let az = authz_upstream().await;
        let late = plugin(
            "late",
            "{ mode: late-call }",
            "    capabilities: { clusters: [authz] }\n",
        );
        let waiter = plugin(
            "waiter",
            "{ mode: callout, cluster: held, timeout_ms: 30000 }",
            "    capabilities: { clusters: [held] }\n",
        );
        let yaml = with_cluster(
            &with_authz(up.addr, az.addr, &format!("{late}{waiter}"), &["late", "waiter"]),
            "held",
            held.addr,
        );
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = tokio::time::timeout(HANG_GUARD, c.get("/late/deny").send())
            .await
            .expect("the first filter's answer while the second one is paused");
        release.store(true, SeqCst);
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "denied late");
        assert_eq!(r.header("x-pw-late-denied"), Some("yes"));
        assert_eq!(up.requests.get(), 0, "the request reached the backend");
        lg.assert_stat(&calls("waiter", "done"), 1.0).await;
        let answered = lg.stat(&calls("waiter", "callout_response")).await;
        assert_eq!(answered.unwrap_or(0.0), 0.0, "the abandoned call was delivered");
    }
);

each_proto!(
    /// Envoy's StopIteration from the request headers callback, with a body
    /// callback that continues each chunk: the body goes through chunk by
    /// chunk, not buffered (a 2 MiB upload passes a plugin whose body cap is
    /// the default 1 MiB; it was 413), and the head, held until the first
    /// chunk is continued, carries what the body callback wrote on it then.
    async fn pause_from_request_headers_streams_the_body_chunk_by_chunk(proto) {
        let n = 2 << 20;
        let up = upstream().route("/sink", sink_with_marks).start().await;
        let p = plugin("peek", "{ mode: peek }", "");
        let lg = legate().config(&config(up.addr, &p, &["peek"])).start();
        let data = pattern_bytes(n);
        let r = client(proto, lg.addr("web"))
            .await
            .post("/sink")
            .streamed_body(data.clone(), 64 * 1024)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["len"], n);
        assert_eq!(v["checksum"], checksum(&data));
        let first: usize = v["first"].as_str().unwrap().parse().unwrap();
        assert!(first > 0 && first < n, "{v}");
        // Written after the head went on: nowhere.
        assert_eq!(v["late"], "-");
        lg.assert_stat_with(&calls("peek", "request_body"), |v| v >= 2.0, ">= 2")
            .await;
        lg.assert_stat(&limit_exceeded("peek", "request"), 0.0).await;
    }
);

each_proto!(
    /// The response side, on an endless stream (server-sent events): the head
    /// reaches the client with the first chunk the body callback continues,
    /// while the upstream is still sending (the host used to wait for the end
    /// of the body, which never comes).
    async fn pause_from_response_headers_lets_a_stream_through(proto) {
        use http_body_util::BodyExt;
        // The second event only once the client has the first.
        let (more_tx, stream) = gated_stream("data: 1\n\n", "data: 2\n\n");
        let up = upstream()
            .route("/events", stream)
            .start()
            .await;
        let p = plugin("peek", "{ mode: peek }", "");
        let lg = legate().config(&config(up.addr, &p, &["peek"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let resp = tokio::time::timeout(HANG_GUARD, c.get("/events").send_for_head())
            .await
            .expect("the head came while the stream went on");
        assert_eq!(resp.status(), 200);
        // Written on the head while it was held, in the first body call.
        assert_eq!(resp.headers()["x-pw-first-chunk"], "9");
        let mut body = resp.into_body();
        let first = tokio::time::timeout(HANG_GUARD, body.frame())
            .await
            .expect("the first event")
            .unwrap()
            .unwrap();
        assert_eq!(first.into_data().unwrap(), "data: 1\n\n");
        more_tx.send(()).unwrap();
        let rest = tokio::time::timeout(HANG_GUARD, body.collect())
            .await
            .expect("the rest")
            .unwrap();
        assert_eq!(rest.to_bytes(), "data: 2\n\n");
        lg.assert_stat_with(&calls("peek", "response_body"), |v| v >= 2.0, ">= 2")
            .await;
    }
);

each_proto!(
    async fn held_bodies_over_the_cap_are_413_and_reset(proto) {
        // The plugin's own cap (`limits.body`), below the 1 MiB default.
        let n = 512 << 10;
        let up = upstream().route("/source", source(n)).start().await;
        let p = plugin(
            "rw",
            "{ mode: body-rewrite }",
            "    limits: { cpu: 500ms, body: 256KiB }\n",
        );
        let lg = legate().config(&config(up.addr, &p, &["rw"])).start();
        let web = lg.addr("web");
        // A fresh connection per request: HTTP/1.1 closes the connection after
        // answering a request whose body it did not read, lingering so that
        // the close does not reset the connection under the client still
        // writing (limits.rs: an_early_413_lingers_while_the_client_still_uploads).
        let r = client(proto, web)
            .await
            .post("/up")
            .streamed_body(pattern_bytes(n), 64 * 1024)
            .send()
            .await;
        assert_eq!(r.status, 413);
        assert_eq!(r.text(), "plugin_buffer_limit\n");
        lg.assert_stat(&limit_exceeded("rw", "request"), 1.0).await;

        // Under the cap: through.
        let r = client(proto, web)
            .await
            .post("/up")
            .streamed_body("hello", 2)
            .send()
            .await;
        assert_eq!(r.status, 200);

        // The response head is out before the body: over the cap, the exchange
        // is reset (nothing of the held body is sent).
        let r = client(proto, web).await.get("/source").try_send().await;
        if let Ok(r) = &r {
            assert!(r.body.len() < n, "the whole response went through");
        }
        lg.assert_stat(&limit_exceeded("rw", "response"), 1.0).await;
    }
);

each_proto!(
    async fn headers_pause_buffers_under_the_host_cap_502(proto) {
        let up = upstream()
            .route("/big", |_req| async {
                Response::new(Full::new(Bytes::from(vec![b'x'; 2 << 20])))
            })
            .start()
            .await;
        let p = plugin("wait", "{ mode: body-wait }", "");
        let lg = legate().config(&config(up.addr, &p, &["wait"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        // The head is still held (the guest holds every chunk): a clean 502.
        let r = c.get("/big").send().await;
        assert_eq!(r.status, 502);
        assert_eq!(r.text(), "plugin_buffer_limit\n");
        lg.assert_stat(&limit_exceeded("wait", "response"), 1.0).await;
        // A request the same: a clean 413, the upstream never reached.
        let r = client(proto, lg.addr("web"))
            .await
            .post("/up")
            .streamed_body(vec![b'x'; 2 << 20], 64 * 1024)
            .send()
            .await;
        assert_eq!(r.status, 413);
        assert_eq!(r.text(), "plugin_buffer_limit\n");
        lg.assert_stat(&limit_exceeded("wait", "request"), 1.0).await;
    }
);

each_proto!(
    async fn a_body_callback_answers_locally(proto) {
        let up = upstream().start().await;
        let p = plugin("words", "{ mode: body-local }", "");
        let lg = legate().config(&config(up.addr, &p, &["words"])).start();
        let web = lg.addr("web");
        let r = client(proto, web)
            .await
            .post("/up")
            .streamed_body("this is forbidden text", 4)
            .send()
            .await;
        assert_eq!(r.status, 403);
        assert_eq!(r.header("x-pw-body-denied"), Some("yes"));
        assert_eq!(r.text(), "no forbidden words\n");
        let r = client(proto, web)
            .await
            .post("/up")
            .streamed_body("this is fine", 4)
            .send()
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().body, "this is fine");
        lg.assert_stat_with(&calls("words", "request_body"), |v| v >= 2.0, ">= 2")
            .await;
        // From the response body callback (its head held: the headers callback
        // waited for the body), the answer replaces the upstream's response.
        let r = client(proto, web)
            .await
            .post("/up")
            .streamed_body("a secret", 4)
            .send()
            .await;
        assert_eq!(r.status, 451);
        assert_eq!(r.header("x-pw-resp-denied"), Some("yes"));
        assert_eq!(r.text(), "redacted\n");
        // One call each for the two upstream responses, and one for the 403 the
        // request body callback answered (its own answer runs through its
        // response callbacks, as Envoy's local reply through the filter chain);
        // the 451 from a response callback runs through none.
        lg.assert_stat(&calls("words", "response_body"), 3.0).await;
    }
);

each_proto!(
    async fn request_trailers_are_read_and_modified(proto) {
        let up = upstream().start().await;
        let p = plugin("tr", "{ mode: trailers }", "");
        let lg = legate().config(&config(up.addr, &p, &["tr"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let mut t = HeaderMap::new();
        t.insert("x-client-trailer", HeaderValue::from_static("abc"));
        let r = c
            .post("/a")
            .header("te", "trailers")
            // hyper's HTTP/1.1 encoder sends only the trailers `Trailer` names.
            .header("trailer", "x-client-trailer, x-pw-trailer-seen")
            .body_with_trailers("payload", t)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.body, "payload");
        assert_eq!(e.trailers.get("x-client-trailer"), Some(&vec!["changed".to_string()]));
        assert_eq!(e.trailers.get("x-pw-trailer-seen"), Some(&vec!["abc".to_string()]));
        lg.assert_stat(&calls("tr", "request_trailers"), 1.0).await;
    }
);

/// Response trailers need an HTTP/2 upstream that sends them (gRPC).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_are_read_and_modified() {
    let up = upstream().grpc().start().await;
    let p = plugin("tr", "{ mode: trailers }", "");
    let yaml = config(up.addr, &p, &["tr"]).replace(
        &format!("      - address: {}\n", up.addr),
        &format!("      - address: {}\n    protocol: h2\n", up.addr),
    );
    let lg = legate().config(&yaml).start();
    let mut c = client(Proto::H2, lg.addr("web")).await;
    let msg = grpc_frame(b"ping");
    let r = c
        .post("/echo.Echo/Say")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(msg.clone())
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, msg);
    let t = r.trailers.as_ref().expect("response trailers were dropped");
    assert_eq!(t.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    // grpc-status, grpc-message, x-echo-trailer
    assert_eq!(t.get("x-pw-added").map(|v| v.as_bytes()), Some(&b"3"[..]));
    assert!(t.get("grpc-message").is_none(), "not removed: {t:?}");
    lg.assert_stat(&calls("tr", "response_trailers"), 1.0).await;
}

/// `response.grpc_status` and `response.trailers`, which a gRPC stats or
/// logging filter reads in `on_log`, as Envoy gives them: the trailers'
/// `grpc-status`, else the head's (a trailers-only answer), else the status
/// gRPC maps the HTTP status to; the trailers as a map, empty when the answer
/// has none. Both were `NOT_FOUND`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_and_trailers_are_response_properties() {
    let up = upstream()
        .grpc()
        .route("/echo.Echo/Denied", |_req| async {
            // A trailers-only answer: the status in the head.
            let mut r = Response::new(Full::new(Bytes::new()));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            r.headers_mut()
                .insert("grpc-status", HeaderValue::from_static("7"));
            r
        })
        .route("/missing", |_req| async {
            let mut r = Response::new(Full::new(Bytes::from("not here")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        })
        .start()
        .await;
    let p = plugin("gs", "{ mode: grpc-stats }", "");
    let yaml = config(up.addr, &p, &["gs"]).replace(
        &format!("      - address: {}\n", up.addr),
        &format!("      - address: {}\n    protocol: h2\n", up.addr),
    );
    let lg = legate().config(&yaml).start();
    let mut c = client(Proto::H2, lg.addr("web")).await;
    for path in ["/echo.Echo/Say", "/echo.Echo/Denied"] {
        let r = c
            .post(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(grpc_frame(b"ping"))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = c.get("/missing").send().await;
    assert_eq!(r.status, 404, "{}", r.text());
    let stat = |name: &str| format!("legate_proxywasm_pw_grpc_stats_{name}{{plugin=\"gs\"}}");
    // The echo: `grpc-status: 0` in its trailers, with the trailers' names.
    lg.assert_stat(&stat("0_grpc_status_grpc_message_x_echo_trailer_OK"), 1.0)
        .await;
    // Trailers-only: the head's status, and no trailers.
    lg.assert_stat(&stat("7___none_"), 1.0).await;
    // Not gRPC: a 404 maps to 12 (UNIMPLEMENTED), as Envoy's httpToGrpcStatus.
    lg.assert_stat(&stat("12___none_"), 1.0).await;
    // The body sizes, as Envoy's: the declared length, else the bytes
    // received or sent (the echo's streamed answer, the trailers-only
    // answer's none, a GET's empty request body).
    let sizes = |s: &str| format!("legate_proxywasm_pw_sizes_{s}{{plugin=\"gs\"}}");
    lg.assert_stat(&sizes("9_9"), 1.0).await;
    lg.assert_stat(&sizes("9_0"), 1.0).await;
    lg.assert_stat(&sizes("0_8"), 1.0).await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="gs"}"#, 0.0)
        .await;
}

each_proto!(
    /// `request.size` and `response.size` without a `content-length` are the
    /// body bytes so far in every callback, as Envoy's `bytesReceived()` and
    /// `bytesSent()`: 0 at the request head, the whole request body at its
    /// end of stream, the response's chunks that have left at its last one,
    /// the whole of each in `on_log`. They were `NOT_FOUND` before `on_log`.
    /// `request.total_size` adds the head's names and values.
    async fn body_sizes_are_the_bytes_so_far_in_every_callback(proto) {
        let up = upstream()
            .route("/stream", |req: Request<Incoming>| async move {
                // The whole request first, then an answer of unknown
                // length in three chunks (9 bytes).
                let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                let chunks = ["abc", "defg", "hi"]
                    .map(|c| Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(c))));
                Response::new(http_body_util::BodyExt::boxed(
                    http_body_util::StreamBody::new(futures_util::stream::iter(chunks)),
                ))
            })
            .start()
            .await;
        let p = plugin("sz", "{ mode: sizes-so-far }", "");
        let lg = legate().config(&config(up.addr, &p, &["sz"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .post("/stream")
            .streamed_body(&b"hello world"[..], 4)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, &b"abcdefghi"[..]);
        let stat = |n: &str| format!("legate_proxywasm_pw_sofar_{n}{{plugin=\"sz\"}}");
        lg.assert_stat(&stat("rqhead_0_0"), 1.0).await;
        lg.assert_stat(&stat("rqbody_11_0"), 1.0).await;
        lg.assert_stat(&stat("rshead_11_0"), 1.0).await;
        lg.assert_stat(&stat("total_true"), 1.0).await;
        lg.assert_stat(&stat("log_11_9"), 1.0).await;
        // At the last chunk, those before it have left.
        let text = lg.stats().await;
        let last = text
            .lines()
            .find(|l| l.starts_with("legate_proxywasm_pw_sofar_rsbody_"))
            .unwrap_or_else(|| panic!("no rsbody series:\n{text}"));
        assert!(last.contains("_9{"), "{last}");
        assert!(!last.contains("_none_"), "{last}");
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="sz"}"#, 0.0)
            .await;
    }
);

/// Shared data past its caps (64 MiB here) is not stored but answered `OK`,
/// so a filter built with the Rust SDK, whose `set_shared_data` panics on
/// any other status, keeps running (Envoy caps nothing). It answered
/// `BAD_ARGUMENT`: the VM trapped and the request failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_data_past_its_cap_is_not_stored_and_the_filter_runs_on() {
    let up = upstream().start().await;
    let p = plugin(
        "fill",
        "{ mode: shared-fill }",
        "    limits: { cpu: 5s, memory: 64MiB }\n",
    );
    let lg = legate().config(&config(up.addr, &p, &["fill"])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    // 67 entries of key and 1 000 000 bytes fit in 64 MiB, the 68th does not.
    for _ in 0..2 {
        let r = c.get("/fill/70").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-fill"), Some("67"));
    }
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="fill"}"#, 0.0)
        .await;
    lg.assert_stat(r#"legate_plugin_traps_total{plugin="fill"}"#, 0.0)
        .await;
}

each_proto!(
    /// `response.flags`, which Istio's stats filter decodes into its
    /// `response_flags` label, holds Envoy's bits for how the exchange
    /// ended: `0` for an upstream's answer, `UF` for an endpoint that
    /// refuses connections, `NR` for no route. It was `NOT_FOUND`.
    async fn response_flags_are_envoys_bits(proto) {
        let up = upstream().start().await;
        let p = plugin("fl", "{ mode: grpc-stats }", "");
        let yaml = config(up.addr, &p, &["fl"])
            .replace(
                "          - name: rest\n            match: { prefix: / }\n",
                "          - name: dead\n            match: { prefix: /dead }\n            cluster: dead\n          - name: rest\n            match: { prefix: /ok }\n",
            )
            .replace(
                "clusters:\n",
                &format!("clusters:\n  - name: dead\n    endpoints:\n      - address: {}\n", closed_port_addr()),
            );
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        for (path, status) in [("/ok", 200), ("/dead", 502), ("/nowhere", 404)] {
            let r = c.get(path).send().await;
            assert_eq!(r.status, status, "{path}: {}", r.text());
        }
        let stat = |n: &str| format!("legate_proxywasm_pw_flags_{n}{{plugin=\"fl\"}}");
        lg.assert_stat(&stat("0"), 1.0).await;
        lg.assert_stat(&stat("32"), 1.0).await;
        lg.assert_stat(&stat("256"), 1.0).await;
    }
);

each_proto!(
    async fn continuing_body_callbacks_stream_4_mib_unchanged(proto) {
        let n = 4 << 20;
        let up = upstream()
            .route("/sink", sink)
            .route("/source", source(n))
            .start()
            .await;
        let p = plugin("quiet", "{ mode: noop }", "");
        let lg = legate().config(&config(up.addr, &p, &["quiet"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let data = pattern_bytes(n);
        let r = c
            .post("/sink")
            .streamed_body(data.clone(), 64 * 1024)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["len"], n);
        assert_eq!(v["checksum"], checksum(&data));
        let r = c.get("/source").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), n);
        assert_eq!(checksum(&r.body), checksum(&data));
        // Chunk by chunk (over the 1 MiB cap, so nothing was buffered).
        lg.assert_stat_with(&calls("quiet", "request_body"), |v| v > 4.0, "> 4")
            .await;
        lg.assert_stat_with(&calls("quiet", "response_body"), |v| v > 4.0, "> 4")
            .await;
        lg.assert_stat(&limit_exceeded("quiet", "request"), 0.0).await;
    }
);

each_proto!(
    /// A `Pause` at the end of a streamed body that nothing resumes holds the
    /// exchange, as Envoy does (any callback of the VM could resume it), until
    /// the plugin's `limits.pause`; then the failure policy applies.
    async fn pause_at_end_of_stream_fails_by_policy_without_losing_data(proto) {
        let up = upstream().start().await;
        let limits = "    limits: { cpu: 500ms, pause: 300ms }\n";
        let p = plugin("closed", "{ mode: body-stuck }", limits);
        let yaml = config(up.addr, &p, &["closed"]);
        let lg = legate().config(&yaml).start();
        let started = std::time::Instant::now();
        let r = client(proto, lg.addr("web"))
            .await
            .post("/up")
            .streamed_body("abcdefgh", 2)
            .send()
            .await;
        // Failed closed: 503 naming the plugin, as for a failure in any phase.
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.text(), "plugin_failure: closed\n");
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(300),
            "failed before `limits.pause`"
        );
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="closed"}"#, 1.0)
            .await;
        drop(lg);

        // Failing open, the filter is skipped and everything it held goes on.
        let p = plugin("open", "{ mode: body-stuck }", &format!("    fail: open\n{limits}"));
        let lg = legate().config(&config(up.addr, &p, &["open"])).start();
        let r = client(proto, lg.addr("web"))
            .await
            .post("/up")
            .streamed_body("abcdefgh", 2)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().body, "abcdefgh");
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="open"}"#, 1.0)
            .await;
    }
);

/// Plugins `a` (mode `stop-a`: Envoy's `StopIteration` from the headers
/// callbacks, the body held to its end) and `b` (mode `stop-b`: records what
/// it sees, and when).
fn stop_plugins() -> String {
    plugin("a", "{ mode: stop-a }", "") + &plugin("b", "{ mode: stop-b }", "")
}

each_proto!(
    /// Envoy's `StopIteration` from the request headers callback of `a`,
    /// then `b`: `b`'s headers callback runs only once `a` lets the head go
    /// (its end-of-stream body callback continues), and sees the header `a`
    /// set there; then `b`'s body callback gets the body `a` held, whole,
    /// with the end of stream. The body comes in two chunks, the second only
    /// once `a` held the first.
    async fn the_filters_after_a_held_request_head_get_it_when_it_is_let_go(proto) {
        let up = upstream().start().await;
        let (_dir, log, yaml) =
            with_access_log(&config(up.addr, &stop_plugins(), &["a", "b"]));
        let lg = legate().config(&yaml).start();
        let (more, sent) = gated_post(&lg, proto, "/up");
        until_called(&lg, "a", "request_body", "a held the first chunk").await;
        // `b` has not seen the request yet.
        let b = lg.stat(&calls("b", "request_headers")).await;
        assert_eq!(b.unwrap_or(0.0), 0.0, "`b` had the head while `a` held it");
        more.send(()).unwrap();
        let r = tokio::time::timeout(HANG_GUARD, sent)
            .await
            .expect("the request went on once `a` let its head go")
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        let a = e.header("x-a").unwrap();
        assert!(a.starts_with("11:"), "`a` held the whole body: {a}");
        assert_ne!(a, "11:1", "the body came in one chunk");
        assert_eq!(e.header("x-b-saw-a"), Some(a), "`b` saw the head as `a` left it");
        assert_eq!(e.header("x-b-eos"), Some("false"));
        // `b`'s body callback, after its headers callback: once, whole.
        assert_eq!(e.body, "part1;part2|b:hb:11");
        lg.assert_stat(&calls("a", "request_headers"), 1.0).await;
        lg.assert_stat(&calls("b", "request_headers"), 1.0).await;
        lg.assert_stat(&calls("b", "request_body"), 1.0).await;
        no_failures(&lg).await;
        // The exchange is logged as any other.
        let lines = access_log_until(&log, "the line", |l| !l.is_empty()).await;
        let (v, line) = (&lines[0], lines[0].to_string());
        assert_eq!(v["status"], 200, "{line}");
        assert_eq!(v["cause"], Value::Null, "{line}");
        assert_eq!(v["bytes_received"], 11, "{line}");
        assert_eq!(v["bytes_sent"], r.body.len(), "{line}");
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
            1.0,
        )
        .await;
    }
);

/// Failures of plugin `a` and `b`, asserted none.
async fn no_failures(lg: &LegateHandle) {
    for p in ["a", "b"] {
        lg.assert_stat(
            &format!("legate_plugin_failures_total{{plugin=\"{p}\"}}"),
            0.0,
        )
        .await;
    }
}

each_proto!(
    /// The same when `a` lets the head go on the first chunk (`/mid`): `b`
    /// gets the head then, with `x-a`, then that chunk and the rest as they
    /// come.
    async fn a_head_let_go_mid_body_reaches_the_filters_after_it_then(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, &stop_plugins(), &["a", "b"]))
            .start();
        let (more, sent) = gated_post(&lg, proto, "/mid");
        // `b` had the head and the first chunk before the rest was sent.
        until_called(&lg, "b", "request_body", "b had the first chunk").await;
        more.send(()).unwrap();
        let r = tokio::time::timeout(HANG_GUARD, sent)
            .await
            .expect("the request")
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.header("x-a"), Some("mid"));
        assert_eq!(e.header("x-b-saw-a"), Some("mid"));
        assert_eq!(e.header("x-b-eos"), Some("false"));
        assert!(e.body.starts_with("part1;part2|b:hbb"), "{}", e.body);
        assert!(e.body.ends_with(":11"), "{}", e.body);
        lg.assert_stat(&calls("b", "request_headers"), 1.0).await;
        no_failures(&lg).await;
    }
);

each_proto!(
    /// With trailers: `a` lets the head go in its end-of-stream body call,
    /// then its trailers callback adds a trailer; `b` gets the head (with
    /// `x-a`), the body, then the trailers as `a` left them.
    async fn the_filters_after_a_held_head_get_the_trailers_after_it(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, &stop_plugins(), &["a", "b"]))
            .start();
        let mut t = HeaderMap::new();
        t.insert("x-client-trailer", HeaderValue::from_static("t1"));
        let r = client(proto, lg.addr("web"))
            .await
            .post("/up")
            .header("te", "trailers")
            // hyper's HTTP/1.1 encoder sends only the trailers `Trailer` names.
            .header("trailer", "x-client-trailer, x-a-trailer, x-b-saw-trailer")
            .body_with_trailers("payload", t)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        let a = e.header("x-a").unwrap();
        assert!(a.starts_with("7:"), "`a` held the whole body: {a}");
        assert_eq!(e.header("x-b-saw-a"), Some(a));
        assert_eq!(e.body, "payload|b:hb:7");
        assert_eq!(e.trailers.get("x-a-trailer"), Some(&vec!["t1".to_string()]));
        assert_eq!(e.trailers.get("x-b-saw-trailer"), Some(&vec!["t1".to_string()]));
        no_failures(&lg).await;
    }
);

each_proto!(
    /// The response side (`encodeHeaders` `StopIteration`): with the chain
    /// `b`, `a`, the response reaches `a` first; `b`'s response headers
    /// callback runs once `a` lets the head go at the end of the body, and
    /// sees the header `a` set there, then `b`'s body callback gets the body.
    async fn the_filters_after_a_held_response_head_get_it_when_it_is_let_go(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, &stop_plugins(), &["b", "a"]))
            .start();
        let r = client(proto, lg.addr("web")).await.get("/down").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let text = r.text();
        let (echo, mark) = text.rsplit_once('|').unwrap();
        assert_eq!(mark, "B:HB", "`b`'s response callbacks, in order");
        let len = echo.len().to_string();
        assert_eq!(r.header("x-a-resp"), Some(len.as_str()));
        assert_eq!(r.header("x-b-saw-a-resp"), Some(len.as_str()));
        lg.assert_stat(&calls("b", "response_headers"), 1.0).await;
        lg.assert_stat(&calls("b", "response_body"), 1.0).await;
        no_failures(&lg).await;
    }
);

each_proto!(
    /// A component filter after `a` that buffers the request body
    /// (`buffered` mode): `a` lets the head go on the first chunk (`/mid`),
    /// and still sees the body chunk by chunk; the component gets the head
    /// then, and the whole body once it ended (the head held meanwhile, its
    /// `content-length` set for the final body).
    async fn a_buffering_component_after_a_held_head_gets_the_whole_body(proto) {
        let up = upstream().start().await;
        let upper = format!(
            "  - name: upper\n    module: {}\n    config: {{ mode: body-upper, phases: \"rq,rqbody\", rqmode: buffered }}\n    limits: {{ cpu: 500ms }}\n",
            test_guest().display()
        );
        let plugins = plugin("a", "{ mode: stop-a }", "") + &upper;
        let lg = legate()
            .config(&config(up.addr, &plugins, &["a", "upper"]))
            .start();
        let (more, sent) = gated_post(&lg, proto, "/mid");
        until_called(&lg, "upper", "request_headers", "the component had the head").await;
        let b = lg.stat(&calls("upper", "request_body")).await;
        assert_eq!(b.unwrap_or(0.0), 0.0, "the component buffers: one call, at the end");
        more.send(()).unwrap();
        let r = tokio::time::timeout(HANG_GUARD, sent)
            .await
            .expect("the request")
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.header("x-a"), Some("mid"));
        assert_eq!(e.body, "PART1;PART2!");
        assert_eq!(e.header("content-length"), Some("12"));
        assert_eq!(e.header("x-body-len"), Some("11"));
        lg.assert_stat(&calls("upper", "request_body"), 1.0).await;
        // `a` held the head itself, and saw the body as it came.
        lg.assert_stat_with(&calls("a", "request_body"), |v| v >= 2.0, ">= 2")
            .await;
    }
);
