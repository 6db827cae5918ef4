//! Wasm filter plugins in the request path: a real component (tests/guests, built
//! for wasm32-wasip2 once per test process) run by a real Legate against a real
//! upstream. The one guest crate's behaviour is picked by the plugin `config`
//! (`{mode: ...}`), so the fixtures build in one compile.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use legate_tests::*;

/// One plugin entry (indented for `plugins:`).
fn plugin(name: &str, config: &str, extra: &str) -> String {
    // A generous deadline for well-behaved guests, so a busy test machine never trips
    // it; the deadline tests set their own.
    let limits = if extra.contains("limits:") {
        ""
    } else {
        "    limits: { cpu: 500ms }\n"
    };
    format!(
        "  - name: {name}\n    module: {}\n    config: {config}\n{limits}{extra}",
        test_guest().display()
    )
}

/// Listener `web` with the filter chain `chain`; routes `/off` and `/over` (with the
/// route keys `off` and `over`, e.g. filter overrides), `/new` (a direct response),
/// the rest to the upstream.
fn config(up: SocketAddr, plugins: &str, chain: &[&str], off: &str, over: &str) -> String {
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
          - name: off
            match: {{ prefix: /off }}
            cluster: backend
{off}          - name: over
            match: {{ prefix: /over }}
            cluster: backend
{over}          - name: new
            match: {{ prefix: /new }}
            direct_response: {{ status: 200, body: \"the new route\" }}
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

fn simple(up: SocketAddr, plugins: &str, chain: &[&str]) -> String {
    config(up, plugins, chain, "", "")
}

fn calls(plugin: &str, phase: &str) -> String {
    format!("legate_plugin_calls_total{{plugin=\"{plugin}\",phase=\"{phase}\"}}")
}

each_proto!(
    async fn adds_headers_on_request_and_response(proto) {
        let up = upstream().start().await;
        let p = plugin("tagger", "{ mode: headers }", "");
        let lg = legate().config(&simple(up.addr, &p, &["tagger"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/a?b=1").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.header("x-filter"), Some("tagger"));
        // Every read hides `host`, whether the guest's first look at the head
        // or after a write.
        let names = e.header("x-seen-names").unwrap_or_default();
        assert!(!names.split(',').any(|n| n == "host"), "{names}");
        let count = names.split(',').filter(|n| !n.is_empty()).count();
        assert_eq!(
            e.header("x-seen-host"),
            Some(format!("get=none has=false all=0 len={count} entries={count}").as_str())
        );
        let authority = lg.addr("web").to_string();
        assert_eq!(e.header("x-seen-authority"), Some(authority.as_str()));
        assert_eq!(e.path, "/a?b=1");
        assert_eq!(r.header("x-filter-resp"), Some("tagger"));
        assert_eq!(r.header("x-seen-route"), Some("rest"));
        assert_eq!(r.header("x-seen-request-filter"), Some("tagger"));
        assert_eq!(r.header("x-seen-request-id"), e.header("x-request-id"));
        lg.assert_stat(&calls("tagger", "request_headers"), 1.0).await;
        lg.assert_stat(&calls("tagger", "response_headers"), 1.0).await;
        lg.assert_stat(r#"legate_plugin_instances{plugin="tagger"}"#, 1.0)
            .await;
    }
);

each_proto!(
    async fn local_response_replaces_upstream(proto) {
        let up = upstream().start().await;
        let p = plugin("auth", "{ mode: respond }", "")
            + &plugin("outer", "{ mode: headers }", "");
        // `outer` runs first, so it sees auth's local response in its response phase.
        let lg = legate()
            .config(&simple(up.addr, &p, &["outer", "auth"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/private").send().await;
        assert_eq!(r.status, 401);
        assert_eq!(r.text(), "denied by plugin\n");
        assert_eq!(r.header("www-authenticate"), Some("ApiKey"));
        assert_eq!(r.header("content-length"), Some("17"));
        // The filter gave its body no type: text/plain, as Envoy's local replies.
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.header("connection"), None, "hop-by-hop header kept");
        assert_eq!(r.header("x-filter-resp"), Some("outer"));
        assert_eq!(up.requests.get(), 0, "the upstream was called");

        let r = c.get("/private").header("x-api-key", "k").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(up.requests.get(), 1);
    }
);

each_proto!(
    /// The filters after one that answered from its request headers never
    /// had a call; those that declare `on-log` still get it, once, as every
    /// filter of Envoy's chain is logged (abi/README.md §3): a component and
    /// a proxy-wasm filter (its context made for it); one without `on-log`
    /// gets nothing. The next request, let through, is logged once as well.
    async fn the_filters_an_answer_never_reached_still_get_on_log(proto) {
        let up = upstream().start().await;
        let p = plugin("auth", "{ mode: respond }", "")
            + &plugin("logger", "{ mode: headers, phases: \"rq,log\" }", "")
            + &plugin("reqonly", "{ mode: headers, phases: rq }", "")
            + &format!(
                "  - name: pw\n    module: {}\n    limits: {{ cpu: 500ms }}\n    \
                 proxy_wasm:\n      plugin_config: {{ mode: logger }}\n",
                legate_tests::proxy_wasm::proxy_wasm_guest().display()
            );
        let lg = legate()
            .config(&simple(up.addr, &p, &["auth", "logger", "reqonly", "pw"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/private").send().await;
        assert_eq!(r.status, 401, "{}", r.text());
        lg.assert_stat(&calls("logger", "log"), 1.0).await;
        lg.assert_stat(&calls("pw", "log"), 1.0).await;
        // What its `on_log` read: the answer's status and details.
        lg.assert_stat(
            r#"legate_proxywasm_pw_logged_401_plugin_missing_api_key{plugin="pw"}"#,
            1.0,
        )
        .await;
        for (f, phase) in [
            ("logger", "request_headers"),
            ("pw", "request_headers"),
            ("reqonly", "request_headers"),
            ("reqonly", "log"),
        ] {
            let n = lg.stat(&calls(f, phase)).await.unwrap_or(0.0);
            assert_eq!(n, 0.0, "{f} {phase}");
        }
        // No call failed.
        for f in ["auth", "logger", "pw"] {
            let failures = format!("legate_plugin_failures_total{{plugin=\"{f}\"}}");
            assert_eq!(lg.stat(&failures).await.unwrap_or(0.0), 0.0, "{f}");
        }

        let r = c.get("/private").header("x-api-key", "k").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        lg.assert_stat(&calls("logger", "request_headers"), 1.0).await;
        lg.assert_stat(&calls("logger", "log"), 2.0).await;
        lg.assert_stat(&calls("pw", "log"), 2.0).await;
    }
);

each_proto!(
    /// The response head stays readable for the `on-log` of a filter the
    /// answer never reached (`Chain::response_interest` keeps it for them):
    /// the status and the fields of the earlier filter's local response.
    async fn a_filter_never_reached_reads_the_response_head_in_on_log(proto) {
        let up = upstream().start().await;
        let p = plugin("auth", "{ mode: respond }", "")
            + &plugin(
                "logger",
                "{ mode: metrics, phases: \"rq,log\", log_header: www-authenticate }",
                "",
            );
        let lg = legate()
            .config(&simple(up.addr, &p, &["auth", "logger"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/private").send().await;
        assert_eq!(r.status, 401, "{}", r.text());
        let series = |label: &str| format!(r#"legate_plugin_requests{{plugin="logger",method="{label}"}}"#);
        lg.assert_stat(&series("log-GET"), 1.0).await;
        lg.assert_stat(&series("log-status-401"), 1.0).await;
        lg.assert_stat(&series("log-www-authenticate-ApiKey"), 1.0).await;
        // Its request phase was never called.
        assert_eq!(lg.stat(&series("GET")).await, None);
    }
);

each_proto!(
    /// A filter's local response is logged with `cause: plugin:<details>`
    /// (abi/README.md §3.5); it had no cause.
    async fn a_local_response_is_logged_with_its_details(proto) {
        let up = upstream().start().await;
        let p = plugin("auth", "{ mode: respond }", "");
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let cfg = simple(up.addr, &p, &["auth"]).replacen(
            "version: 1\n",
            &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
            1,
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/private").send().await.status, 401);
        let lines = access_log_until(&log, "the 401 line", |l| !l.is_empty()).await;
        assert_eq!(lines[0]["status"], 401, "{}", lines[0]);
        assert_eq!(lines[0]["cause"], "plugin:missing_api_key", "{}", lines[0]);
        drop(lg);
    }
);

each_proto!(
    async fn set_cookie_values_stay_separate(proto) {
        let up = upstream()
            .route("/cookies", |_req| async {
                let mut r = Response::new(Full::new(Bytes::from("c")));
                r.headers_mut()
                    .append("set-cookie", HeaderValue::from_static("a=1"));
                r.headers_mut()
                    .append("set-cookie", HeaderValue::from_static("b=2"));
                r
            })
            .start()
            .await;
        let p = plugin("jar", "{ mode: cookies }", "");
        let lg = legate().config(&simple(up.addr, &p, &["jar"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/cookies").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cookie-count"), Some("2"));
        assert_eq!(
            r.header_all("set-cookie"),
            vec!["a=1", "b=2", "added=by-plugin"]
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_declared_phases_are_called() {
    let up = upstream().start().await;
    let p = plugin("reqonly", "{ mode: headers, phases: rq }", "");
    let lg = legate().config(&simple(up.addr, &p, &["reqonly"])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    for _ in 0..3 {
        let r = c.get("/x").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().header("x-filter"), Some("reqonly"));
        assert_eq!(r.header("x-filter-resp"), None);
    }
    lg.assert_stat(&calls("reqonly", "request_headers"), 3.0)
        .await;
    lg.assert_stat(&calls("reqonly", "response_headers"), 0.0)
        .await;
    lg.assert_stat(&calls("reqonly", "log"), 0.0).await;
    lg.assert_stat(&calls("reqonly", "done"), 0.0).await;
    // configure: once at load (the check instance), once for the worker's instance.
    lg.assert_stat(&calls("reqonly", "configure"), 2.0).await;
}

each_proto!(
    async fn routes_disable_or_reconfigure_a_filter(proto) {
        let up = upstream().start().await;
        let p = plugin("tagger", "{ mode: headers }", "");
        let off = "            filters: { tagger: { disabled: true } }\n";
        let over = "            filters: { tagger: { config: { mode: headers, tag: per-route } } }\n";
        let lg = legate()
            .config(&config(up.addr, &p, &["tagger"], off, over))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/off").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().header("x-filter"), None);
        assert_eq!(r.header("x-filter-resp"), None);
        let r = c.get("/over").send().await;
        assert_eq!(r.echo().header("x-filter"), Some("per-route"));
        assert_eq!(r.header("x-filter-resp"), Some("per-route"));
        let r = c.get("/other").send().await;
        assert_eq!(r.echo().header("x-filter"), Some("tagger"));
    }
);

each_proto!(
    async fn a_rewritten_path_is_routed_again(proto) {
        let up = upstream().start().await;
        let p = plugin("rw", "{ mode: rewrite }", "");
        let lg = legate().config(&simple(up.addr, &p, &["rw"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/old/page").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "the new route");
        assert_eq!(up.requests.get(), 0);
        let r = c.get("/keep").send().await;
        assert_eq!(r.echo().path, "/keep");
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_define_the_hosts_metrics() {
    let up = upstream().start().await;
    // The host's own series for the plugin (legate_plugin_failures_total
    // {plugin}): the plugin would count into its failure count. A name a
    // histogram's sample lines use is refused too.
    for name in ["failures_total", "instances", "latency_count"] {
        let p = plugin(
            "sneaky",
            &format!("{{ mode: metrics, metric: {name} }}"),
            "",
        );
        let err = match legate()
            .config(&simple(up.addr, &p, &["sneaky"]))
            .try_start()
        {
            Ok(_) => panic!("a plugin defined `{name}`"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&format!("define-counter {name}: ")) && err.contains("invalid-argument"),
            "{err}"
        );
    }
    // Its own name is fine.
    let p = plugin("honest", "{ mode: metrics, metric: honest_requests }", "");
    let lg = legate().config(&simple(up.addr, &p, &["honest"])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    c.get("/").send().await;
    lg.assert_stat(
        r#"legate_plugin_honest_requests{plugin="honest",method="GET"}"#,
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_error_rejects_the_load() {
    let up = upstream().start().await;
    let p = plugin("picky", "{ mode: bad-config }", "");
    let yaml = simple(up.addr, &p, &["picky"]);
    let err = match legate().config(&yaml).try_start() {
        Ok(_) => panic!("a plugin whose configure fails was loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(
            "plugin `picky`: configure failed: bad-config: the `mode` asked this plugin to refuse"
        ),
        "{err}"
    );

    // `legate check` loads the plugins too.
    let dir = TempDir::new();
    let file = dir.write("plugins.yaml", &yaml);
    let out = Command::new(legate_bin())
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "legate check accepted a failing plugin"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad-config: the `mode` asked"), "{stderr}");

    // A route's `config` override that fails is named with its route: the
    // plugin's own config is fine, the operator must be sent to the route.
    let over = "            filters: { picky: { config: { mode: bad-config } } }\n";
    let yaml = config(
        up.addr,
        &plugin("picky", "{ mode: headers }", ""),
        &["picky"],
        "",
        over,
    );
    let line = yaml
        .lines()
        .position(|l| l.contains("- name: over"))
        .unwrap()
        + 1;
    let want = format!(
        "the config override of route `over` of virtual host `all` in route table `main` \
         (line {line}), key `filters.picky.config`: plugin `picky`: configure failed: \
         bad-config: the `mode` asked"
    );
    let err = match legate().config(&yaml).try_start() {
        Ok(_) => panic!("a route override whose configure fails was loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(&want), "{err}");
    let out = Command::new(legate_bin())
        .args(["check", "-c"])
        .arg(dir.write("over.yaml", &yaml))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "legate check accepted a failing override"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&want), "{stderr}");
    // ... and placed at that `config` key, as the file's own errors are.
    let (at, text) = yaml
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("filters: { picky:"))
        .unwrap();
    let col = text.find("config").unwrap() + 1;
    assert!(
        stderr.starts_with(&format!(
            "{}:{}:{col}: error: the config override of route `over`",
            dir.path().join("over.yaml").display(),
            at + 1
        )),
        "{stderr}"
    );

    let good = dir.write(
        "good.yaml",
        simple(up.addr, &plugin("fine", "{ mode: headers }", ""), &["fine"]),
    );
    let out = Command::new(legate_bin())
        .args(["check", "-c"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A guest that panics in `configure` is refused in one line naming its panic
/// (message and location, from its stderr) and the trap's kind, at load and in
/// `legate check`; the wasm backtrace (a line per frame) is not in it. It was
/// `trap: error while executing at wasm backtrace:` and 14 frame lines, the
/// panic only in separate stderr log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_configure_is_one_line_naming_the_panic() {
    let up = upstream().start().await;
    let p = plugin(
        "boomer",
        "{ mode: headers, panic_configure: boom in configure }",
        "",
    );
    let yaml = simple(up.addr, &p, &["boomer"]);
    let err = match legate().config(&yaml).try_start() {
        Ok(_) => panic!("a plugin whose configure panics was loaded"),
        Err(e) => format!("{e:#}"),
    };
    let line = err
        .lines()
        .find(|l| l.contains("plugin `boomer`: configure failed"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("configure failed: trap: panicked at src/lib.rs:")
            && line.contains(": boom in configure (wasm `unreachable` instruction executed)"),
        "{err}"
    );
    assert!(
        !err.contains("wasm backtrace") && !err.contains("<wasm function"),
        "{err}"
    );

    let dir = TempDir::new();
    let file = dir.write("plugins.yaml", &yaml);
    let out = Command::new(legate_bin())
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "legate check accepted a panicking plugin"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains(": error: ")).collect();
    assert!(
        errors.len() == 1
            && errors[0].contains("configure failed: trap: panicked at src/lib.rs:")
            && errors[0].contains("boom in configure (wasm `unreachable`"),
        "{stderr}"
    );
    assert!(!stderr.contains("<wasm function"), "{stderr}");
}

each_proto!(
    /// A panic while serving is logged as one `plugin failure` line naming the
    /// panic and the trap's kind.
    async fn a_panic_in_a_phase_is_one_failure_line_naming_the_panic(proto) {
        captured_log();
        let up = upstream().start().await;
        let p = plugin("panicky", "{ mode: hostile }", "");
        let lg = legate().config(&simple(up.addr, &p, &["panicky"])).start();
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
                && line.contains(
                    ": hostile guest panics on purpose (wasm `unreachable` instruction executed)"
                ),
            "{line}"
        );
        assert!(!log.contains("<wasm function"), "{log}");
    }
);

/// A component built against another `legate:filter` version (here the test
/// guest with its interfaces renamed to `@0.2.x`) is refused in one line
/// naming that version, the host's and the fix; it was the linker's
/// "component imports instance `legate:filter/…@0.2.0`, but a matching
/// implementation was not found in the linker".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_of_another_abi_version_is_refused_naming_both_versions() {
    let up = upstream().start().await;
    let mut bytes = std::fs::read(test_guest()).unwrap();
    // Same length: the names stay valid; only `legate:filter/…@0.1.` ones.
    let (from, to) = (b"@0.1.".as_slice(), b"@0.2.".as_slice());
    let mut i = 0;
    let mut renamed = 0;
    while let Some(at) = bytes[i..].windows(from.len()).position(|w| w == from) {
        let at = i + at;
        let start = at.saturating_sub(40);
        if bytes[start..at].windows(14).any(|w| w == b"legate:filter/") {
            bytes[at..at + from.len()].copy_from_slice(to);
            renamed += 1;
        }
        i = at + from.len();
    }
    assert!(renamed > 0, "no legate:filter interface found in the guest");
    let dir = TempDir::new();
    let module = dir.path().join("future.wasm");
    std::fs::write(&module, &bytes).unwrap();
    let p = format!(
        "  - name: future\n    module: {}\n    config: {{ mode: headers }}\n",
        module.display()
    );
    let err = match legate()
        .config(&simple(up.addr, &p, &["future"]))
        .try_start()
    {
        Ok(_) => panic!("a component built against legate:filter 0.2 was loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("plugin `future`: the component is built against legate:filter@0.2.")
            && err.contains(
                "; this host implements 0.1.x (0.1.0–0.1.3): regenerate its bindings from abi/wit \
                 (legate:filter@0.1.x), or rebuild it with a legate-sdk for 0.1"
            ),
        "{err}"
    );
    assert!(
        !err.contains("matching implementation was not found"),
        "{err}"
    );
}

/// A file that is not Wasm at all is refused in one line saying so (it was
/// wasmparser's `bad magic number - expected=[` and both byte arrays over
/// ten lines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_is_not_wasm_is_refused_in_one_line() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let module = dir.write("filter.wat", "(component)\n");
    let p = format!(
        "  - name: text\n    module: {}\n    config: {{ mode: headers }}\n",
        module.display()
    );
    let err = match legate().config(&simple(up.addr, &p, &["text"])).try_start() {
        Ok(_) => panic!("a text file was loaded as a plugin"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&format!(
            "plugin `text`: {} is not a Wasm file (it does not start with the `\\0asm` magic \
             bytes): point `module` at a .wasm built with `legate plugin build`",
            module.display()
        )),
        "{err}"
    );
    assert!(
        !err.contains("magic header") && !err.contains("0x0,"),
        "{err}"
    );
}

/// `configure` runs at load, on a thread with no runtime: a guest that waits in a
/// WASI pollable there loads after its wait, or is refused at the wall bound of
/// the configure deadline (10 × 1 s), naming the plugin; it never hangs the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configure_that_sleeps_loads_or_is_refused_at_the_wall_bound() {
    let up = upstream().start().await;
    let p = plugin(
        "napper",
        r#"{ mode: headers, configure_sleep_ms: "200" }"#,
        "",
    );
    let lg = legate().config(&simple(up.addr, &p, &["napper"])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c.get("/").send().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().header("x-filter"), Some("napper"));
    drop(lg);

    let p = plugin(
        "sleeper",
        r#"{ mode: headers, configure_sleep_ms: "60000" }"#,
        "",
    );
    let yaml = simple(up.addr, &p, &["sleeper"]);
    // Without the wall bound the load would wait the 60 s out and succeed.
    let err = match legate().config(&yaml).try_start() {
        Ok(_) => panic!("a plugin sleeping 60 s in configure was loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("plugin `sleeper`: configure failed") && err.contains("deadline"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha256_mismatch_refuses_the_load() {
    let up = upstream().start().await;
    let p = plugin(
        "pinned",
        "{ mode: headers }",
        &format!("    sha256: {}\n", "ab".repeat(32)),
    );
    let err = match legate()
        .config(&simple(up.addr, &p, &["pinned"]))
        .try_start()
    {
        Ok(_) => panic!("a module with the wrong sha256 was loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("plugin `pinned`: module"), "{err}");
    assert!(
        err.contains(&format!("but the config says {}", "ab".repeat(32))),
        "{err}"
    );
}

/// A guest that sleeps 5s in `on-request-headers` (a WASI pollable: no Wasm runs
/// while it waits, so the epoch deadline never gets a say) under the default
/// `cpu: 50ms`: the call is stopped at the wall-time bound (10× the budget), is
/// counted as a timeout, and the worker goes on serving with a new instance. The
/// client timeout turns a hung worker into a failure instead of a hung test.
async fn sleeping_guest(proto: Proto, fail: &str) {
    let up = upstream().start().await;
    let p = plugin(
        "sleepy",
        "{ mode: hostile }",
        // 50ms, not less: the calls that must pass (`/fine`) get the same bound,
        // 500ms of wall time, which a loaded machine's scheduling stays under.
        &format!("    fail: {fail}\n    limits: {{ cpu: 50ms }}\n"),
    );
    let lg = legate().config(&simple(up.addr, &p, &["sleepy"])).start();
    let mut c = client(proto, lg.addr("web")).await;
    let r = c.get("/fine").send().await;
    assert_eq!(r.status, 200);

    let r = tokio::time::timeout(HANG_GUARD, c.get("/sleep").send())
        .await
        .unwrap_or_else(|_| panic!("GET /sleep hung: the sleeping call was never stopped"));
    // Not stopped, the call would hang (its sleep waits on the worker it
    // blocks; seen with the wall bound raised past the guard), or, had it
    // returned, go on normally (200 even failing closed) with no timeout
    // counted: the status, body and counters below show it was stopped.
    if fail == "closed" {
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.text(), "plugin_failure: sleepy\n");
        assert_eq!(up.requests.get(), 1);
    } else {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(up.requests.get(), 2);
    }
    lg.assert_stat(r#"legate_plugin_timeouts_total{plugin="sleepy"}"#, 1.0)
        .await;
    lg.assert_stat(r#"legate_plugin_traps_total{plugin="sleepy"}"#, 0.0)
        .await;
    lg.assert_stat(r#"legate_plugin_failures_total{plugin="sleepy"}"#, 1.0)
        .await;

    // The same worker (same connection) serves the next request, on a new instance.
    let r = tokio::time::timeout(HANG_GUARD, c.get("/fine/again").send())
        .await
        .unwrap_or_else(|_| panic!("the worker hung after the sleeping call"));
    assert_eq!(r.status, 200);
    lg.assert_stat(
        r#"legate_plugin_instance_restarts_total{plugin="sleepy"}"#,
        1.0,
    )
    .await;
    lg.assert_stat(r#"legate_plugin_instances{plugin="sleepy"}"#, 1.0)
        .await;
}

each_proto!(
    async fn a_sleeping_guest_is_stopped_at_the_wall_bound_fail_closed(proto) {
        sleeping_guest(proto, "closed").await;
    }
);

each_proto!(
    async fn a_sleeping_guest_is_stopped_at_the_wall_bound_fail_open(proto) {
        sleeping_guest(proto, "open").await;
    }
);

/// A hostile plugin on one route, checked to be contained: the failing request gets
/// the failure policy, the next request on another path is served by a fresh instance.
async fn hostile(proto: Proto, path: &str, fail: &str, limits: &str, counter: &str) {
    let up = upstream().start().await;
    let p = plugin(
        "hostile",
        "{ mode: hostile }",
        &format!("    fail: {fail}\n    limits: {{ cpu: 20ms, {limits} }}\n"),
    );
    let lg = legate().config(&simple(up.addr, &p, &["hostile"])).start();
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

    // The proxy keeps serving, with a new instance.
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
    /// A filter that fails in its response headers phase gets no more calls,
    /// not even `on-log` (abi/README.md §9), as a failure in any other phase:
    /// it used to get `on-log` when it failed closed there.
    async fn a_response_headers_failure_gets_no_on_log(proto) {
        for fail in ["closed", "open"] {
            let up = upstream().start().await;
            let p = plugin(
                "hostile",
                "{ mode: hostile, phases: \"rq,rs,log,done\" }",
                &format!("    fail: {fail}\n"),
            );
            let lg = legate().config(&simple(up.addr, &p, &["hostile"])).start();
            let mut c = client(proto, lg.addr("web")).await;
            let r = c.get("/pause-response").send().await;
            let want = if fail == "closed" { 503 } else { 200 };
            assert_eq!(r.status, want, "{fail}: {}", r.text());
            lg.assert_stat(r#"legate_plugin_failures_total{plugin="hostile"}"#, 1.0)
                .await;
            // One on-log, for the request that did not fail (both exchanges
            // are over once both had on-done, which comes after on-log).
            let r = c.get("/fine").send().await;
            assert_eq!(r.status, 200);
            lg.assert_stat(&calls("hostile", "done"), 2.0).await;
            assert_eq!(lg.stat(&calls("hostile", "log")).await, Some(1.0));
        }
    }
);

each_proto!(
    async fn guest_panic_fails_closed(proto) {
        hostile(proto, "/panic", "closed", "memory: 16MiB", "legate_plugin_traps_total").await;
    }
);

each_proto!(
    async fn guest_panic_fails_open(proto) {
        hostile(proto, "/panic", "open", "memory: 16MiB", "legate_plugin_traps_total").await;
    }
);

each_proto!(
    async fn infinite_loop_hits_the_deadline(proto) {
        hostile(proto, "/loop", "closed", "memory: 16MiB", "legate_plugin_timeouts_total").await;
    }
);

each_proto!(
    async fn unbounded_recursion_traps(proto) {
        hostile(proto, "/recurse", "closed", "memory: 16MiB", "legate_plugin_traps_total").await;
    }
);

each_proto!(
    async fn memory_bomb_hits_the_cap(proto) {
        hostile(
            proto,
            "/oom",
            "closed",
            "memory: 8MiB",
            "legate_plugin_memory_exceeded_total",
        )
        .await;
    }
);

// `memory.grow` past `limits.memory` fails (returns -1) rather than trap
// (abi/README.md §7): the guest sees it and the instance lives on.
each_proto!(
    async fn memory_grow_past_the_cap_fails_without_a_trap(proto) {
        let up = upstream().start().await;
        let p = plugin(
            "hostile",
            "{ mode: hostile }",
            "    limits: { cpu: 500ms, memory: 16MiB }\n",
        );
        let lg = legate().config(&simple(up.addr, &p, &["hostile"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..2 {
            let r = c.get("/grow").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.echo().header("x-grow"), Some("-1,ok"));
        }
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="hostile"}"#, 0.0)
            .await;
        lg.assert_stat(r#"legate_plugin_memory_exceeded_total{plugin="hostile"}"#, 0.0)
            .await;
        lg.assert_stat(r#"legate_plugin_instance_restarts_total{plugin="hostile"}"#, 0.0)
            .await;
    }
);

// A guest growing a header map: `HeaderMap` panics past 24 576 names, which
// took the connection down with the host's state for the exchange half moved.
// The host caps a map at 1024 fields: an add past it is `limit-exceeded`, a
// local response with more is a failed call (the failure policy).
each_proto!(
    async fn a_guest_cannot_grow_a_header_map_without_bound(proto) {
        let up = upstream().start().await;
        let p = plugin("hostile", "{ mode: hostile }", "");
        let lg = legate().config(&simple(up.addr, &p, &["hostile"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/flood-add").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let refused = r.text();
        assert!(refused.starts_with("limit-exceeded at "), "{refused}");
        let at: usize = refused["limit-exceeded at ".len()..].parse().unwrap();
        assert!((1000..=1024).contains(&at), "{refused}");

        let r = c.get("/flood-respond").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.text(), "plugin_failure: hostile\n");
        // The connection and the proxy keep serving.
        let r = c.get("/fine").send().await;
        assert_eq!(r.status, 200);
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="hostile"}"#, 1.0)
            .await;
    }
);

// WASI sockets are linked (a guest using `std::net` instantiates) but deny
// every operation: each call returns an error to the guest, never a trap or a
// host panic (the binds and UDP socket creation would block in wasmtime-wasi's
// own synchronous code, which the host replaces).
each_proto!(
    async fn wasi_sockets_are_denied_without_a_trap(proto) {
        let up = upstream().start().await;
        let p = plugin("hostile", "{ mode: hostile }", "");
        let lg = legate().config(&simple(up.addr, &p, &["hostile"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/sockets").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.echo().header("x-sockets"),
            Some("tcp-bind=PermissionDenied,tcp-connect=PermissionDenied,udp-bind=PermissionDenied")
        );
        lg.assert_stat(r#"legate_plugin_traps_total{plugin="hostile"}"#, 0.0)
            .await;
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="hostile"}"#, 0.0)
            .await;
    }
);

/// Two plugins defining one histogram family must give it the same buckets:
/// the second definition over others is `invalid-argument`, as one of another
/// kind is. (It was accepted, and `/stats` showed one family with two bucket
/// layouts.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_sharing_a_histogram_must_share_its_buckets() {
    let up = upstream().start().await;
    let two = |a: &str, b: &str| {
        plugin("ha", &format!("{{ define_histogram: \"lat:{a}\" }}"), "")
            + &plugin("hb", &format!("{{ define_histogram: \"lat:{b}\" }}"), "")
    };
    // Other bounds, or the host's (none given) against a plugin's own.
    for (a, b) in [("1|10", "1|100"), ("1|10", "")] {
        let err = match legate()
            .config(&simple(up.addr, &two(a, b), &["ha", "hb"]))
            .try_start()
        {
            Ok(_) => panic!("buckets {a} and {b} for one family were both accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains("plugin `hb`")
                && err.contains("define-histogram lat: ")
                && err.contains("invalid-argument"),
            "{err}"
        );
    }
    let lg = legate()
        .config(&simple(up.addr, &two("1|10", "1|10"), &["ha", "hb"]))
        .start();
    let stats = lg.stats().await;
    for p in ["ha", "hb"] {
        let line = format!("legate_plugin_lat_bucket{{plugin=\"{p}\",le=\"10\"}} 0");
        assert!(stats.contains(&line), "{line}: {stats}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_metrics_reach_stats() {
    let up = upstream().start().await;
    let p = plugin("counting", "{ mode: metrics }", "");
    let lg = legate().config(&simple(up.addr, &p, &["counting"])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    c.get("/a").send().await;
    c.get("/b").send().await;
    c.post("/c").body("x").send().await;
    lg.assert_stat(
        r#"legate_plugin_requests{plugin="counting",method="GET"}"#,
        2.0,
    )
    .await;
    lg.assert_stat(
        r#"legate_plugin_requests{plugin="counting",method="POST"}"#,
        1.0,
    )
    .await;
    // The define handle's all-empty-labels series was never recorded into.
    assert_eq!(
        lg.stat(r#"legate_plugin_requests{plugin="counting",method=""}"#)
            .await,
        None,
        "{}",
        lg.stats().await
    );
}

each_proto!(
    /// A plugin that declares only `on-log` (an access logger) gets it for every
    /// exchange, its context made by that call; before, it was never called
    /// (no earlier call had made the context) and each exchange logged a warning.
    async fn a_log_only_plugin_is_called_once_per_exchange(proto) {
        let up = upstream().start().await;
        let p = plugin("logger", "{ mode: metrics, phases: log }", "");
        let lg = legate().config(&simple(up.addr, &p, &["logger"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..3 {
            assert_eq!(c.get("/a").send().await.status, 200);
        }
        lg.assert_stat(
            r#"legate_plugin_requests{plugin="logger",method="log-GET"}"#,
            3.0,
        )
        .await;
        assert_eq!(
            lg.stat(r#"legate_plugin_requests{plugin="logger",method="GET"}"#)
                .await,
            None
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_new_series_count_against_the_series_cap() {
    // The guest calls `with-labels` on every request: the same series again must
    // not use up the plugin's 1000 series (it did: metrics stopped after 1000
    // requests, and an instance re-created 1000 times could not configure).
    let up = upstream().start().await;
    let p = plugin("counting", "{ mode: metrics }", "");
    let lg = legate()
        .config(&simple(up.addr, &p, &["counting"]))
        .from_file()
        .start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    for _ in 0..1100 {
        assert_eq!(c.get("/a").send().await.status, 200);
    }
    lg.assert_stat(
        r#"legate_plugin_requests{plugin="counting",method="GET"}"#,
        1100.0,
    )
    .await;
    // New series still stop at the cap: GET plus 999 more.
    for i in 0..1000 {
        let m = Method::from_bytes(format!("M{i}").as_bytes()).unwrap();
        assert_eq!(c.request(m, "/m").send().await.status, 200);
    }
    let stats = lg.stats().await;
    assert!(stats.contains(r#"legate_plugin_requests{plugin="counting",method="M998"} 1"#));
    assert!(
        !stats.contains(r#"method="M999""#),
        "a series over the cap was made"
    );
    // The plugin loaded again gets no new allowance: its old series are still
    // on /stats (a reload made up to 1000 more, without bound).
    let (status, body) = lg.admin(Method::POST, "/plugins/counting/reload").await;
    assert_eq!(status, 200, "{body}");
    for m in ["M998", "M999"] {
        let m = Method::from_bytes(m.as_bytes()).unwrap();
        assert_eq!(c.request(m, "/m").send().await.status, 200);
    }
    let stats = lg.stats().await;
    assert!(stats.contains(r#"legate_plugin_requests{plugin="counting",method="M998"} 2"#));
    assert!(
        !stats.contains(r#"method="M999""#),
        "a series over the cap was made after a reload"
    );
}

each_proto!(
    /// `on-log` sees a filter's local response as the access log has it:
    /// `exchange.cause()` is `plugin:<details>` for the filters before the one
    /// that answered (it was `none`, as for an upstream's answer); an
    /// upstream's answer has no cause.
    async fn on_log_sees_a_local_response_as_its_cause(proto) {
        let up = upstream().start().await;
        let p = plugin("logger", "{ mode: metrics, phases: log }", "")
            + &plugin("gate", "{ mode: respond }", "");
        let lg = legate()
            .config(&simple(up.addr, &p, &["logger", "gate"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/a").send().await.status, 401);
        let ok = c.get("/a").header("x-api-key", "k").send().await;
        assert_eq!(ok.status, 200, "{}", ok.text());
        lg.assert_stat(
            r#"legate_plugin_requests{plugin="logger",method="log-GET"}"#,
            2.0,
        )
        .await;
        let stats = lg.stats().await;
        let caused = |m: &str| {
            parse_prometheus(&stats)
                .iter()
                .filter(|(k, _)| k.contains(m))
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            caused("log-cause-"),
            [r#"legate_plugin_requests{plugin="logger",method="log-cause-plugin:missing_api_key"}=1"#],
            "{stats}"
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_components_are_cached_on_disk() {
    let dir = TempDir::new();
    let cache = dir.path().join("cache");
    // Process-wide, read when a plugin is compiled; other tests in this process just
    // use this cache too.
    std::env::set_var("LEGATE_WASM_CACHE", &cache);
    let up = upstream().start().await;
    let yaml = simple(
        up.addr,
        &plugin("cached", "{ mode: headers }", ""),
        &["cached"],
    );
    let hits = "legate_wasm_cache_hits_total";
    let misses = "legate_wasm_cache_misses_total";
    let invalid = "legate_wasm_cache_invalid_total";

    let first = legate().config(&yaml).start();
    // All three series exist from the first lookup, at 0 until their first
    // event, so that Prometheus' `increase()` sees that event. (Only the one
    // counting an event existed.)
    assert_eq!(first.stat(hits).await, Some(0.0));
    assert_eq!(first.stat(invalid).await, Some(0.0));
    assert!(first.stat(misses).await.is_some_and(|v| v >= 1.0));
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    drop(first);

    let second = legate().config(&yaml).start();
    second.assert_stat(hits, 1.0).await;
    let mut c = client(Proto::H1, second.addr("web")).await;
    assert_eq!(
        c.get("/x").send().await.header("x-filter-resp"),
        Some("cached")
    );
    drop(second);

    // A corrupt entry is recompiled, not fatal.
    std::fs::write(&entries[0], b"not a compiled component").unwrap();
    let third = legate().config(&yaml).start();
    third.assert_stat(invalid, 1.0).await;
    assert_families_documented(&third.stats().await);
    let mut c = client(Proto::H1, third.addr("web")).await;
    assert_eq!(
        c.get("/x").send().await.header("x-filter-resp"),
        Some("cached")
    );
    assert!(std::fs::metadata(&entries[0]).unwrap().len() > 1000);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

/// The `legate` binary (the harness builds the workspace's binaries once).
fn legate_bin() -> PathBuf {
    workspace_bin("legate")
}

/// The KV plugin (`mode: kv`) over namespace `ns`, granted `grant` (a YAML list).
/// Legate runs in the test process, so each test uses its own namespace.
fn kv_plugin(name: &str, ns: &str, grant: &str) -> String {
    plugin(
        name,
        &format!("{{ mode: kv, ns: {ns} }}"),
        &format!("    capabilities: {{ kv: {grant} }}\n"),
    )
}

each_proto!(
    async fn kv_counter_is_exact_across_workers(proto) {
        let up = upstream().start().await;
        let ns = format!("count-{proto:?}").to_lowercase();
        let p = kv_plugin("counter", &ns, &format!("[{ns}]"));
        let lg = legate()
            .concurrency(2)
            .config(&simple(up.addr, &p, &["counter"]))
            .start();
        let addr = lg.addr("web");
        // 8 clients × 25 requests, each a get + CAS set with retries, racing on
        // one key from two workers: no increment may be lost or doubled.
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn(async move {
                    let mut c = client(proto, addr).await;
                    for _ in 0..25 {
                        let r = c.get("/count").send().await;
                        assert_eq!(r.status, 200, "{}", r.text());
                        let e = r.echo();
                        assert_eq!(e.header("x-kv-error"), None);
                        assert!(e.header("x-kv-count").is_some());
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let mut c = client(proto, addr).await;
        let r = c.get("/read").send().await;
        assert_eq!(r.echo().header("x-kv-count"), Some("200"));
        // `increment` is atomic too and creates the key at 0.
        let r = c.get("/incr").send().await;
        assert_eq!(r.echo().header("x-kv-count"), Some("1"));
        let r = c.get("/incr").send().await;
        assert_eq!(r.echo().header("x-kv-count"), Some("2"));
        // A value over the cap is refused, not stored.
        let r = c.get("/big").send().await;
        assert_eq!(r.echo().header("x-kv-error"), Some("limit-exceeded"));
        // An asynchronous call needs the optional `kv-handler` export, which
        // this component (world `http-filter`) lacks: it still loads, and the
        // call says so.
        let r = c.get("/start").send().await;
        assert_eq!(r.echo().header("x-kv-error"), Some("unsupported"));
        assert_eq!(r.echo().header("x-kv-backend"), Some("Backend::Memory"));
    }
);

each_proto!(
    async fn kv_namespace_not_granted_is_denied(proto) {
        let up = upstream().start().await;
        // Granted `other`, asks for `secret`; `plain` has no KV capability at all.
        let p = kv_plugin("nosy", "secret", "[other]") + &kv_plugin("plain", "secret", "[]");
        for name in ["nosy", "plain"] {
            let lg = legate()
                .config(&simple(up.addr, &p, &[name]))
                .start();
            let mut c = client(proto, lg.addr("web")).await;
            let r = c.get("/incr").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            let e = r.echo();
            assert_eq!(e.header("x-kv-error"), Some("denied"), "{name}");
            assert_eq!(e.header("x-kv-count"), None);
        }
    }
);

each_proto!(
    /// The guest only learns `denied`: the host says which grant is missing,
    /// as a warning once per plugin and namespace, and in a failed
    /// `configure`'s error (it was `configure failed: open myns: denied`).
    async fn a_kv_namespace_not_granted_names_the_capability_to_add(proto) {
        // This test's part of the process's log.
        let before = captured_log().len();
        let up = upstream().start().await;
        let p = plugin(
            "needy",
            "{ mode: headers, kv_required: myns }",
            "    capabilities: { kv: [other] }\n",
        );
        let err = match legate().config(&simple(up.addr, &p, &["needy"])).try_start() {
            Ok(_) => panic!("a plugin whose configure fails was loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(
                "plugin `needy`: configure failed: open myns: denied (KV namespace `myns` is \
                 not granted to plugin `needy`: add it to the plugin's `capabilities.kv`)"
            ),
            "{err}"
        );
        // Said by the error, not also by a WARN line before it.
        let log = captured_log().split_off(before);
        assert!(
            !log.lines().any(|l| l.contains("WARN") && l.contains("`myns`")),
            "{log}"
        );
        // Opened on every request: warned once.
        let lg = legate()
            .config(&simple(up.addr, &kv_plugin("nosy", "secret", "[other]"), &["nosy"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..2 {
            let r = c.get("/incr").send().await;
            assert_eq!(r.echo().header("x-kv-error"), Some("denied"));
        }
        let log = captured_log().split_off(before);
        let hint = "KV namespace `secret` is not granted to plugin `nosy`: add it to the \
                    plugin's `capabilities.kv`";
        let warned: Vec<&str> = log.lines().filter(|l| l.contains(hint)).collect();
        assert!(warned.len() == 1 && warned[0].contains("WARN"), "{log}");
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_entries_expire() {
    let up = upstream().start().await;
    let p = kv_plugin("ttl", "ttl", "[ttl]");
    let lg = legate().config(&simple(up.addr, &p, &["ttl"])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    // A TTL of an hour: present.
    let r = c.get("/ttl-set/3600000").send().await;
    assert!(r.echo().header("x-kv-version").is_some());
    let r = c.get("/ttl-get").send().await;
    assert_eq!(r.echo().header("x-kv-value"), Some("v"));
    // A TTL of 0 is invalid.
    let r = c.get("/ttl-set/0").send().await;
    assert_eq!(r.echo().header("x-kv-error"), Some("invalid-argument"));
    // A TTL of 1 ms: absent once it passed (polled, no timing assumption).
    let r = c.get("/ttl-set/1").send().await;
    assert!(r.echo().header("x-kv-version").is_some());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = c.get("/ttl-get").send().await;
        if r.echo().header("x-kv-value") == Some("absent") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "key with a 1 ms TTL still present after 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_call_on_tick() {
    let up = upstream().start().await;
    let p = plugin(
        "ticker",
        "{ mode: kv, ns: ticks, tick: \"20\" }",
        "    capabilities: { kv: [ticks] }\n",
    );
    let lg = legate().config(&simple(up.addr, &p, &["ticker"])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    // The instance (and its tick task) starts with the config; each tick
    // increments KV key `ticks`.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = c.get("/ticks").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let n: u64 = r.echo().header("x-kv-count").unwrap().parse().unwrap();
        if n >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "on-tick ran {n} times in 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    lg.assert_stat_with(&calls("ticker", "tick"), |v| v >= 3.0, ">= 3")
        .await;
    let failures = lg
        .stat(r#"legate_plugin_failures_total{plugin="ticker"}"#)
        .await;
    assert_eq!(failures.unwrap_or(0.0), 0.0);
}

/// Plugin `name` in `kv` mode over KV namespace `name-<proto>` (Legate runs in
/// the test process: a namespace per test), ticking every 20 ms (each tick
/// increments its key `ticks`); `extra` adds config keys.
fn ticking(name: &str, proto: Proto, extra: &str) -> String {
    let ns = format!("{name}-{proto:?}").to_lowercase();
    plugin(
        name,
        &format!("{{ mode: kv, ns: {ns}, tick: \"20\"{extra} }}"),
        &format!("    capabilities: {{ kv: [{ns}] }}\n"),
    )
}

fn instances(plugin: &str) -> String {
    format!("legate_plugin_instances{{plugin=\"{plugin}\"}}")
}

each_proto!(
    /// A plugin that ticks gets its instance on every worker when the config
    /// goes live (Envoy starts each worker's VM with the config), so it ticks
    /// before any request; requests then run on those instances, not new ones;
    /// and a reload that removes the plugin ends its instances and ticks.
    async fn a_ticking_plugin_starts_with_the_config_and_stops_when_removed(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&simple(
                up.addr,
                &(ticking("ticker", proto, "") + &ticking("clock", proto, "")),
                &["ticker", "clock"],
            ))
            .concurrency(2)
            .from_file()
            .start();
        // No request yet: each worker has its instance, and it ticks.
        lg.assert_stat_with(&calls("ticker", "tick"), |v| v >= 3.0, ">= 3")
            .await;
        lg.assert_stat(&instances("ticker"), 2.0).await;
        // The load's check, then one per worker.
        lg.assert_stat(&calls("ticker", "configure"), 3.0).await;
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..3 {
            let r = c.get("/ticks").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            // The ticks before any request reached the guest (its KV key).
            let n: u64 = r.echo().header("x-kv-count").unwrap().parse().unwrap();
            assert!(n >= 3, "the guest counted {n} ticks");
        }
        // The requests ran on the worker's instance: none was made for them.
        lg.assert_stat(&calls("ticker", "request_headers"), 3.0)
            .await;
        assert_eq!(lg.stat(&calls("ticker", "configure")).await, Some(3.0));
        assert_eq!(lg.stat(&instances("ticker")).await, Some(2.0));
        drop(c);

        // A reload removes `ticker` and carries `clock` over (unchanged).
        let clock = ticking("clock", proto, "");
        let v = lg.reload_ok(&simple(up.addr, &clock, &["clock"])).await;
        assert_eq!(v["plugins"]["kept"], serde_json::json!(["clock"]), "{v}");
        // Its instances end on both workers, their memory with them, and it
        // ticks no more while `clock` ticks on with no request.
        assert_ticks_stopped(&lg, "ticker", "clock").await;
        lg.assert_stat(&instances("clock"), 2.0).await;
        // `clock` goes on in the instances it had: none configured again.
        assert_eq!(lg.stat(&calls("clock", "configure")).await, Some(3.0));
    }
);

/// The instance pool is sized for the config's workers and plugins: 130
/// workers × 2 ticking plugins start 260 instances with the config, past the
/// 256 the pool had whatever the config (the last ones failed to start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_pool_holds_every_workers_instances() {
    const WORKERS: usize = 130;
    let up = upstream().start().await;
    let p = plugin("a", "{ mode: headers, tick: \"1000\" }", "")
        + &plugin("b", "{ mode: headers, tick: \"1000\" }", "");
    let lg = legate()
        .config(&simple(up.addr, &p, &["a", "b"]))
        .concurrency(WORKERS)
        .start();
    let n = WORKERS as f64;
    lg.assert_stat(&instances("a"), n).await;
    lg.assert_stat(&instances("b"), n).await;
    // Each worker's instance once, and the load's check: no start failed.
    lg.assert_stat(&calls("a", "configure"), n + 1.0).await;
    lg.assert_stat(&calls("b", "configure"), n + 1.0).await;
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c.get("/").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-filter-resp"), Some("a"));
}

/// [`simple`] with `n` more routes, `/r0/` to `/r{n-1}/`, each with its own
/// `config` for plugin `name`: a plugin configuration each, so an instance each
/// on a worker, made at the route's first request there.
fn with_overrides(up: SocketAddr, plugins: &str, name: &str, n: usize) -> String {
    let routes: String = (0..n)
        .map(|i| {
            format!(
                "          - match: {{ path: /r{i}/ }}\n            cluster: backend\n            \
                 filters: {{ {name}: {{ config: {{ mode: headers, tag: r{i} }} }} }}\n"
            )
        })
        .collect();
    let cfg = simple(up, plugins, &[name]);
    let rest = "          - name: rest\n";
    assert!(cfg.contains(rest));
    cfg.replacen(rest, &format!("{routes}{rest}"), 1)
}

each_proto!(
    /// The instance pool fills for real: sized at start for the config then (one
    /// worker, one plugin configuration: the floor of 256 slots), it cannot hold a
    /// reload's 300 route overrides once each has its instance. The request that
    /// finds no free slot gets the failure policy, with every slot held by the
    /// plugin's instances; a reload adding one more configuration is refused,
    /// the error naming the full pool, its size and the hot restart that fixes it.
    async fn a_full_instance_pool_fails_requests_and_names_the_fix(proto) {
        const OVERRIDES: usize = 300;
        let up = upstream().start().await;
        let p = plugin("tagger", "{ mode: headers }", "");
        let lg = legate()
            .config(&simple(up.addr, &p, &["tagger"]))
            .concurrency(1)
            .from_file()
            .start();
        lg.reload_ok(&with_overrides(up.addr, &p, "tagger", OVERRIDES))
            .await;
        let mut c = client(proto, lg.addr("web")).await;
        let mut served = 0;
        let refused = loop {
            assert!(served < OVERRIDES, "{OVERRIDES} instances fit in the pool");
            let r = c.get(&format!("/r{served}/")).send().await;
            if r.status != 200 {
                break r;
            }
            // Each route's own configuration, so its own instance.
            let tag = format!("r{served}");
            assert_eq!(r.header("x-filter-resp"), Some(tag.as_str()));
            served += 1;
        };
        assert_eq!(refused.status, 503, "{}", refused.text());
        assert_eq!(refused.text(), "plugin_failure: tagger\n");
        // Every slot holds one of the worker's instances (the first config's is
        // gone with it): the pool itself is full, not a sub-pool.
        assert_eq!(served, 256);
        lg.assert_stat(&instances("tagger"), 256.0).await;
        // A call that got no instance is the plugin's failure, as a trapped one.
        let failures = r#"legate_plugin_failures_total{plugin="tagger"}"#;
        lg.assert_stat(failures, 1.0).await;
        // The next request of that route fails again (the slot backs off
        // after the failed start), counted again.
        let r = c.get(&format!("/r{served}/")).send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        lg.assert_stat(failures, 2.0).await;
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="5xx"}"#,
            2.0,
        )
        .await;
        // A route whose instance is there is served.
        let r = c.get("/r0/").send().await;
        assert_eq!(r.status, 200, "{}", r.text());

        // A reload with one more configuration: its check instance does not fit.
        let e = lg
            .reload_rejected(&with_overrides(up.addr, &p, "tagger", OVERRIDES + 1))
            .await;
        assert!(
            e.contains(
                "cannot instantiate: the Wasm instance pool is full (256 instances, sized at \
                 start for the workers × plugin configurations of the config then, twice \
                 over for reloads); a hot restart sizes it for the current config"
            ),
            "{e}"
        );
        // The config in force still serves.
        let r = c.get("/r1/").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
);

each_proto!(
    /// A ticking plugin whose instance fails to start on the worker (its
    /// `configure` fails there, after passing the load's check) leaves the
    /// worker serving: the failure is logged, and the next request tries
    /// again, as an instance made for a request would.
    async fn a_failed_start_of_a_ticking_plugin_leaves_the_worker_serving(proto) {
        let up = upstream().start().await;
        let p = ticking("ticker", proto, ", fail_configure_after: \"1\"")
            .replace("    limits:", "    fail: open\n    limits:");
        let lg = legate().config(&simple(up.addr, &p, &["ticker"])).start();
        // The load's check, then the worker's start, which failed.
        lg.assert_stat(&calls("ticker", "configure"), 2.0).await;
        assert_eq!(lg.stat(&instances("ticker")).await, Some(0.0));
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/ticks").send().await;
        // Served without the filter (`fail: open`), after a new attempt.
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-kv-count"), None);
        lg.assert_stat(&calls("ticker", "configure"), 3.0).await;
        assert_eq!(lg.stat(&calls("ticker", "tick")).await.unwrap_or(0.0), 0.0);
        // The request's failed start is the plugin's failure (the early one,
        // which no call waited for, is only logged).
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="ticker"}"#, 1.0)
            .await;
    }
);

each_proto!(
    /// A ticking plugin whose instance dies on a worker (here a trap in an
    /// exchange) gets a new one there without waiting for the next exchange,
    /// so it goes on ticking on a worker with no traffic.
    async fn a_ticking_plugin_whose_instance_traps_is_replaced_without_traffic(proto) {
        let up = upstream().start().await;
        let p = plugin("hostile", "{ mode: hostile, tick: \"20\" }", "");
        let lg = legate()
            .config(&simple(up.addr, &p, &["hostile"]))
            .concurrency(1)
            .start();
        lg.assert_stat(&instances("hostile"), 1.0).await;
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/panic").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        lg.assert_stat(r#"legate_plugin_traps_total{plugin="hostile"}"#, 1.0)
            .await;
        // No request since: replaced all the same, and ticking.
        lg.assert_stat(
            r#"legate_plugin_instance_restarts_total{plugin="hostile"}"#,
            1.0,
        )
        .await;
        lg.assert_stat(&instances("hostile"), 1.0).await;
        let ticks = lg.stat(&calls("hostile", "tick")).await.unwrap_or(0.0);
        lg.assert_stat_with(&calls("hostile", "tick"), |v| v >= ticks + 3.0, "3 more")
            .await;
        // The load's check, the worker's first instance, its replacement; the
        // next request runs on the replacement.
        assert_eq!(lg.stat(&calls("hostile", "configure")).await, Some(3.0));
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(lg.stat(&calls("hostile", "configure")).await, Some(3.0));
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tick_interval_below_minimum_is_refused() {
    let up = upstream().start().await;
    let p = plugin("fast", "{ mode: kv, tick: \"5\" }", "");
    let err = match legate().config(&simple(up.addr, &p, &["fast"])).try_start() {
        Ok(_) => panic!("a 5 ms tick interval was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("plugin `fast`: tick-interval-ms 5 is below the minimum of 10 ms"),
        "{err}"
    );
}

// ---- callouts (abi/README.md §3.3, §5.8) ----

/// `simple`'s config plus cluster `authz` at `authz`.
fn with_authz(up: SocketAddr, authz: SocketAddr, plugins: &str, chain: &[&str]) -> String {
    with_cluster(&simple(up, plugins, chain), "authz", authz)
}

fn callout_plugin(name: &str, config: &str) -> String {
    plugin(name, config, "    capabilities: { clusters: [authz] }\n")
}

/// Plugin `caller` (the test guest with `config`, granted `authz`) in front
/// of a new upstream, with a new `authz` service: (upstream, authz, Legate).
async fn caller(config: &str) -> (UpstreamHandle, UpstreamHandle, LegateHandle) {
    let up = upstream().start().await;
    let az = authz_upstream().await;
    let p = callout_plugin("caller", config);
    let lg = legate()
        .config(&with_authz(up.addr, az.addr, &p, &["caller"]))
        .start();
    (up, az, lg)
}

each_proto!(
    async fn a_component_built_against_abi_0_1_0_still_runs(proto) {
        // The versioning promise (abi/README.md §12): a guest of an older 0.1.z
        // loads on this host (0.1.3) by semver-compatible names, and behaves.
        let wasm = abi_0_1_0_guest();
        let world = legate_componentize::describe(&std::fs::read(wasm).unwrap()).unwrap();
        assert_eq!(
            world.exports,
            vec!["legate:filter/http-handler@0.1.0".to_owned()],
            "{world}"
        );
        assert!(
            world.imports.iter().any(|i| i == "legate:filter/http@0.1.0"),
            "{world}"
        );
        let up = upstream().start().await;
        let p = format!("  - name: old\n    module: {}\n", wasm.display());
        let lg = legate().config(&simple(up.addr, &p, &["old"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..2 {
            let r = c.get("/old/abi?x=1").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.echo().header("x-abi"), Some("0.1.0"));
            assert_eq!(r.header("x-abi-resp"), Some("/old/abi?x=1"));
        }
        lg.assert_stat(&calls("old", "done"), 2.0).await;
        // `/plugins` names the ABI the component was built against.
        assert_eq!(lg.plugin_abi("old").await, "legate:filter@0.1.0");
    }
);

each_proto!(
    async fn a_detached_filter_gets_no_more_calls_for_the_exchange(proto) {
        let (up, az, lg) = caller("{ mode: detach, phases: \"rq,rs,rsbody,log,done\" }").await;
        let mut c = client(proto, lg.addr("web")).await;
        // Not detached: every declared phase runs.
        let r = c.get("/plain").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-detach-resp"), Some("called"));
        assert_eq!(r.echo().header("x-detach"), None);
        let body = calls("caller", "response_body");
        lg.assert_stat_with(&body, |v| v >= 1.0, ">= 1").await;
        lg.assert_stat(&calls("caller", "done"), 1.0).await;
        let body_calls = lg.stat(&body).await;

        // Detached in request headers: the request goes on as the call said,
        // and nothing more of this filter runs for the exchange.
        let r = c.get("/quiet").header("x-detach-me", "1").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-detach"), Some("ok"));
        assert_eq!(r.header("x-detach-resp"), None, "response phase after detach");
        assert_eq!(r.echo().path, "/quiet");

        // Refused with a callout outstanding; once it is cancelled, allowed; a
        // callout after it is refused (its response would have nowhere to go).
        let r = c
            .get("/quiet")
            .header("x-detach-me", "1")
            .header("x-with-callout", "1")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.echo().header("x-detach"),
            Some("invalid-state,ok,ok,invalid-state")
        );
        assert_eq!(r.header("x-detach-resp"), None);

        lg.assert_stat(&calls("caller", "request_headers"), 3.0).await;
        lg.assert_stat(&calls("caller", "response_headers"), 1.0).await;
        lg.assert_stat(&calls("caller", "log"), 1.0).await;
        lg.assert_stat(&calls("caller", "done"), 1.0).await;
        assert_eq!(lg.stat(&body).await, body_calls, "body calls after detach");
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="caller"}"#, 0.0)
            .await;
        assert_eq!(up.requests.get(), 3);
        assert_eq!(az.requests.get(), 0, "the cancelled callout went out");
    }
);

each_proto!(
    async fn callout_pauses_then_continues_with_its_response(proto) {
        let (_up, _az, lg) = caller("{ mode: callout }").await;
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/hello").header("x-user", "alice").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.path, "/hello");
        assert_eq!(e.header("x-callout-status"), Some("200"));
        assert_eq!(e.header("x-callout-body"), Some("ok:alice"));
        // Two callouts outstanding: the first response keeps the exchange paused.
        let r = c.get("/two").header("x-user", "bob").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-callout-count"), Some("2"));
        assert_eq!(r.echo().header("x-callout-body"), Some("ok:bob"));
        lg.assert_stat(r#"legate_plugin_callouts_total{plugin="caller"}"#, 3.0)
            .await;
        lg.assert_stat(&calls("caller", "callout_response"), 3.0).await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_total{cluster="authz"}"#, 3.0)
            .await;
    }
);

each_proto!(
    /// `callout.cancel`: `ok`, then `not-found`; a callout cancelled in the
    /// call that sent it is aborted before it goes out, and nothing is
    /// delivered.
    async fn a_cancelled_callout_is_not_sent(proto) {
        let (_up, az, lg) = caller("{ mode: callout }").await;
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/cancel").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-callout-cancel"), Some("ok,not-found"));
        lg.assert_stat(r#"legate_plugin_callouts_total{plugin="caller"}"#, 1.0)
            .await;
        lg.assert_stat(&calls("caller", "callout_response"), 0.0).await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_total{cluster="authz"}"#, 0.0)
            .await;
        assert_eq!(az.requests.get(), 0);
    }
);

each_proto!(
    async fn callout_response_answers_locally(proto) {
        let (_up, _az, lg) = caller("{ mode: callout }").await;
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/deny/x").header("x-user", "mallory").send().await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "denied:mallory");
        assert_eq!(r.header("x-from-callout"), Some("1"));
        assert!(r.header("x-upstream").is_none(), "the backend answered");
    }
);

each_proto!(
    async fn callout_to_an_ungranted_cluster_is_denied(proto) {
        // Granted `authz` only; asks for `backend`.
        let (_up, _az, lg) = caller("{ mode: callout, cluster: backend }").await;
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/hello").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-callout-error"), Some("denied"));
        lg.assert_stat(r#"legate_plugin_callouts_total{plugin="caller"}"#, 0.0)
            .await;
    }
);

each_proto!(
    /// A callout to a cluster the plugin is not granted is a warning naming
    /// `capabilities.clusters`, once per plugin and cluster (as for proxy-wasm
    /// modules); the guest only gets `denied`.
    async fn a_callout_to_an_ungranted_cluster_names_the_capability_to_add(proto) {
        // This test's part of the process's log.
        let before = captured_log().len();
        let (_up, _az, lg) = caller("{ mode: callout, cluster: backend }").await;
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..2 {
            let r = c.get("/hello").send().await;
            assert_eq!(r.echo().header("x-callout-error"), Some("denied"));
        }
        let log = captured_log().split_off(before);
        let hint = "cluster `backend` is not granted to plugin `caller`: add it to the \
                    plugin's `capabilities.clusters`";
        let warned: Vec<&str> = log.lines().filter(|l| l.contains(hint)).collect();
        assert!(warned.len() == 1 && warned[0].contains("WARN"), "{log}");
    }
);

each_proto!(
    async fn callout_timeout_reaches_the_guest(proto) {
        let (_up, _az, lg) = caller("{ mode: callout, timeout: \"100\" }").await;
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/slow").send().await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.header("x-callout-error"), Some("timeout"));
        lg.assert_stat(r#"legate_plugin_callout_timeouts_total{plugin="caller"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_plugin_callout_failures_total{plugin="caller"}"#, 1.0)
            .await;
    }
);

each_proto!(
    async fn a_paused_exchange_does_not_block_the_worker(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let p = callout_plugin("caller", "{ mode: callout, timeout: \"5000\" }");
        let lg = legate()
            .concurrency(1)
            .config(&with_authz(up.addr, az.addr, &p, &["caller"]))
            .start();
        let mut slow = client(proto, lg.addr("web")).await;
        let slow = tokio::spawn(async move { slow.get("/slow").send().await });
        eventually(
            std::time::Duration::from_secs(5),
            "the slow callout to be sent",
            || async {
                let n = lg
                    .stat(r#"legate_plugin_callouts_total{plugin="caller"}"#)
                    .await;
                (n == Some(1.0)).then_some(())
            },
        )
        .await;
        // The one worker serves another exchange, callout included, meanwhile.
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/fast").header("x-user", "carol").send().await;
        assert_eq!(r.status, 200, "{} {:?}", r.text(), r.header("x-callout-error"));
        assert_eq!(r.echo().header("x-callout-body"), Some("ok:carol"));
        assert!(!slow.is_finished(), "the slow exchange finished first");
        let r = slow.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
);

/// An exchange paused on a callout in an instance that another exchange's
/// call makes trap gets the failure policy at once (abi/README.md §9), not
/// when its callout comes back: here the callout is held until the end, past
/// [`HANG_GUARD`] (its timeout is 30 s).
async fn paused_in_a_trapping_instance(proto: Proto, fail: &str) {
    let up = upstream().start().await;
    let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let az = upstream().name("authz").hold_until(&release).start().await;
    let p = plugin(
        "caller",
        "{ mode: callout, timeout: \"30000\" }",
        &format!("    fail: {fail}\n    capabilities: {{ clusters: [authz] }}\n"),
    );
    // One worker: both exchanges run in the same instance.
    let lg = legate()
        .concurrency(1)
        .config(&with_authz(up.addr, az.addr, &p, &["caller"]))
        .start();
    let mut held = client(proto, lg.addr("web")).await;
    let held = tokio::spawn(async move { held.get("/held").send().await });
    eventually(HANG_GUARD, "the held callout to reach authz", || async {
        (az.requests.get() == 1).then_some(())
    })
    .await;

    let mut c = client(proto, lg.addr("web")).await;
    let r = c.get("/panic").send().await;
    let r_held = tokio::time::timeout(HANG_GUARD, held)
        .await
        .expect("the paused exchange waited for its callout")
        .unwrap();
    if fail == "closed" {
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r_held.status, 503, "{}", r_held.text());
        assert_eq!(r_held.text(), "plugin_failure: caller\n");
        assert_eq!(up.requests.get(), 0);
    } else {
        // Bypassed: the held request goes on as it was.
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r_held.status, 200, "{}", r_held.text());
        assert_eq!(r_held.echo().path, "/held");
        assert_eq!(r_held.echo().header("x-callout-status"), None);
        assert_eq!(up.requests.get(), 2);
    }
    // The callout was still held when the exchange was answered.
    assert!(!release.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        lg.stat(&calls("caller", "callout_response"))
            .await
            .unwrap_or(0.0),
        0.0
    );
    lg.assert_stat(r#"legate_plugin_traps_total{plugin="caller"}"#, 1.0)
        .await;
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    // A new instance serves the next exchange.
    let r = c.get("/after").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().header("x-callout-status"), Some("200"));
}

each_proto!(
    async fn a_trap_fails_the_exchanges_paused_in_that_instance_at_once_fail_closed(proto) {
        paused_in_a_trapping_instance(proto, "closed").await;
    }
);

each_proto!(
    async fn a_trap_fails_the_exchanges_paused_in_that_instance_at_once_fail_open(proto) {
        paused_in_a_trapping_instance(proto, "open").await;
    }
);

each_proto!(
    async fn client_disconnect_while_paused_frees_the_exchange(proto) {
        let (_up, _az, lg) = caller("{ mode: callout, phases: \"rq,done\", timeout: \"5000\" }").await;
        let mut c = client(proto, lg.addr("web")).await;
        let pending = tokio::spawn(async move { c.get("/slow").try_send().await });
        eventually(
            std::time::Duration::from_secs(5),
            "the slow callout to be sent",
            || async {
                let n = lg
                    .stat(r#"legate_plugin_callouts_total{plugin="caller"}"#)
                    .await;
                (n == Some(1.0)).then_some(())
            },
        )
        .await;
        // Dropping the request task drops the client and closes its connection.
        pending.abort();
        let _ = pending.await;
        lg.assert_stat(&calls("caller", "done"), 1.0).await;
        lg.assert_stat(r#"legate_listener_requests_active{listener="web"}"#, 0.0)
            .await;
        // The callout was cancelled with the exchange: never delivered.
        let delivered = lg.stat(&calls("caller", "callout_response")).await;
        assert_eq!(delivered.unwrap_or(0.0), 0.0);
        assert_eq!(
            lg.stat(r#"legate_listener_requests_total{listener="web",class="2xx"}"#)
                .await
                .unwrap_or(0.0),
            0.0
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_callout_cluster_is_a_load_error() {
    let up = upstream().start().await;
    let p = plugin(
        "caller",
        "{ mode: callout }",
        "    capabilities: { clusters: [nope] }\n",
    );
    let yaml = simple(up.addr, &p, &["caller"]);
    let err = match legate_host::config::parse_str("test.yaml", &yaml, Path::new(".")) {
        Ok(_) => panic!("a plugin granted an undefined cluster was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("unknown cluster `nope`"), "{err}");
    assert!(
        err.contains("caller") || err.contains("capabilities"),
        "{err}"
    );
}

/// Plugin `ticker` in `tick-callout` mode over KV namespace `ns` (`extra`:
/// more config keys), one worker, cluster `authz`; returns Legate, the
/// `authz` upstream, and what the guest stored from its tick callout. The
/// instance, its ticks and the worker's sender for their callouts start with
/// the config: the callout is answered before any request, which then reads
/// what the guest stored.
async fn tick_callout(ns: &str, extra: &str) -> (LegateHandle, UpstreamHandle, String) {
    let up = upstream().start().await;
    let az = authz_upstream().await;
    let p = plugin(
        "ticker",
        &format!("{{ mode: tick-callout, ns: {ns}, tick: \"20\"{extra} }}"),
        &format!("    capabilities: {{ clusters: [authz], kv: [{ns}] }}\n"),
    );
    let lg = legate()
        .concurrency(1)
        .config(&with_authz(up.addr, az.addr, &p, &["ticker"]))
        .start();
    lg.assert_stat_with(
        &calls("ticker", "tick_callout_response"),
        |v| v >= 1.0,
        ">= 1",
    )
    .await;
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c.get("/t").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r
        .echo()
        .header("x-tick-callout")
        .unwrap_or("absent")
        .to_owned();
    (lg, az, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_from_on_tick_reach_on_tick_callout_response() {
    let (lg, _az, v) = tick_callout("tickco", "").await;
    assert_eq!(v, "200 ok:anonymous");
    lg.assert_stat(&calls("ticker", "tick_callout_response"), 1.0)
        .await;
    lg.assert_stat(r#"legate_plugin_callouts_total{plugin="ticker"}"#, 1.0)
        .await;
}

/// `callout.cancel` from `on-tick`: `ok`, then `not-found`; the cancelled
/// callout never goes out, and only the other one is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callout_cancelled_in_on_tick_is_not_sent() {
    let (lg, az, v) = tick_callout("tickcancel", ", tick_cancel: \"1\"").await;
    assert_eq!(v, "cancel:ok,not-found 200 ok:anonymous");
    lg.assert_stat(r#"legate_plugin_callouts_total{plugin="ticker"}"#, 2.0)
        .await;
    lg.assert_stat(&calls("ticker", "tick_callout_response"), 1.0)
        .await;
    lg.assert_stat(r#"legate_cluster_upstream_rq_total{cluster="authz"}"#, 1.0)
        .await;
    assert_eq!(az.requests.get(), 1);
}

each_proto!(
    async fn data_files_are_given_to_the_plugin_and_read_again_on_reload(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let data = dir.write("data.bin", b"first\x00contents");
        let files = format!("    files: {{ data: {} }}\n", data.display());
        let p = plugin("reader", "{ mode: file }", &files);
        let yaml = config(
            up.addr,
            &p,
            &["reader"],
            "",
            "            filters: { reader: { config: { mode: file, file: nope } } }\n",
        );
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;

        let r = c.get("/x").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.as_ref(), b"first\x00contents");
        // A name that was not granted is `not-found`, not a trap.
        let r = c.get("/over").send().await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (404, "not-found"));
        assert_eq!(up.requests.get(), 0);

        // A plugin reload reads the file again.
        std::fs::write(&data, b"second").unwrap();
        let (status, body) = lg.admin_post("/plugins/reader/reload").await;
        assert_eq!(status, 200, "{body}");
        let r = c.get("/x").send().await;
        assert_eq!(r.text(), "second");

        // A file that cannot be read fails the reload, naming it; the old data stays.
        std::fs::remove_file(&data).unwrap();
        let (status, body) = lg.admin_post("/plugins/reader/reload").await;
        assert_ne!(status, 200, "{body}");
        assert!(
            body.contains("plugin `reader`: cannot read file `data`")
                && body.contains("data.bin"),
            "{body}"
        );
        let r = c.get("/x").send().await;
        assert_eq!(r.text(), "second");
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_data_file_refuses_the_load() {
    let up = upstream().start().await;
    let files = "    files: { data: /nonexistent/legate-data.bin }\n";
    let yaml = simple(
        up.addr,
        &plugin("reader", "{ mode: file }", files),
        &["reader"],
    );
    let err = match legate().config(&yaml).try_start() {
        Ok(_) => panic!("a plugin with a missing data file was loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("plugin `reader`: cannot read file `data` (/nonexistent/legate-data.bin)")
            && err.contains("fix the path under the plugin's `files:`"),
        "{err}"
    );
}

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
    /// A plugin's log line from inside an exchange carries the exchange's
    /// request id (abi §5.4), the `x-request-id` the upstream got.
    async fn a_plugin_log_line_carries_the_request_id(proto) {
        captured_log();
        let up = upstream().start().await;
        // Its own tag: the h1 and h2 tests may share the process's log.
        let tag = format!("logger-{proto:?}");
        let p = plugin("logger", &format!("{{ mode: log, tag: {tag} }}"), "");
        let lg = legate().config(&simple(up.addr, &p, &["logger"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        let id = e.header("x-request-id").expect("x-request-id generated");
        let log = captured_log();
        let line = log
            .lines()
            .find(|l| l.contains(&format!("request log line from {tag}")))
            .unwrap_or_else(|| panic!("no log line from the plugin: {log}"));
        assert!(line.contains("plugin=\"logger\""), "{line}");
        assert!(line.contains(&format!("request_id=\"{id}\"")), "{id}: {line}");
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_stdout_and_stderr_become_log_lines() {
    // `legate check` configures the plugin once; its log goes to stderr.
    let up = upstream().start().await;
    let dir = TempDir::new();
    let yaml = simple(
        up.addr,
        &plugin("printer", "{ mode: stdio }", ""),
        &["printer"],
    );
    let file = dir.write("plugins.yaml", &yaml);
    let out = Command::new(legate_bin())
        .args(["check", "-c"])
        .arg(&file)
        .env("LEGATE_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let line = |needle: &str, level: &str| {
        log.lines()
            .any(|l| l.contains(needle) && l.contains(level) && l.contains("printer"))
    };
    assert!(line("stdout line from printer", "INFO"), "{log}");
    assert!(line("stderr line from printer", "ERROR"), "{log}");
    assert!(line("partial line from printer", "INFO"), "{log}");
}

each_proto!(
    /// `http.sanitize-request-headers` (ABI 0.1.3): the declared headers are
    /// removed before the chain's first filter on every route of the
    /// listener, also where a route disables the plugin or overrides its
    /// config; only `configure` may declare them.
    async fn declared_request_headers_are_removed_on_every_route(proto) {
        let up = upstream().start().await;
        let p = plugin("owner", "{ mode: headers, sanitize: \"X-Secret,x_secret\" }", "");
        let off = "            filters: { owner: { disabled: true } }\n";
        let over = "            filters: { owner: { config: { mode: headers, sanitize: x-over } } }\n";
        let lg = legate()
            .config(&config(up.addr, &p, &["owner"], off, over))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for path in ["/a", "/off", "/over"] {
            let r = c
                .get(path)
                .header("x-secret", "forged")
                .header("x_secret", "forged")
                .header("x-over", "forged")
                .header("x-keep", "1")
                .send()
                .await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            let e = r.echo();
            for n in ["x-secret", "x_secret", "x-over"] {
                assert_eq!(e.header(n), None, "{path}: {n}");
            }
            assert_eq!(e.header("x-keep"), Some("1"), "{path}");
            // The plugin ran where it is not disabled.
            let ran = (path != "/off").then_some("owner");
            assert_eq!(e.header("x-filter"), ran, "{path}");
        }
        // Outside `configure`: refused, and the header is not removed.
        let r = c
            .get("/a")
            .header("x-sanitize-late", "x-late")
            .header("x-late", "1")
            .send()
            .await;
        let e = r.echo();
        assert_eq!(e.header("x-sanitize-late"), Some("invalid-state"));
        assert_eq!(e.header("x-late"), Some("1"));
    }
);

#[tokio::test]
async fn a_bad_sanitized_header_fails_configure() {
    let up = upstream().start().await;
    for (names, err) in [
        ("x-ok,bad name", "invalid-argument"),
        ("content-length", "denied"),
        ("host", "denied"),
    ] {
        let p = plugin(
            "owner",
            &format!("{{ mode: headers, sanitize: \"{names}\" }}"),
            "",
        );
        let err_text = match legate()
            .config(&simple(up.addr, &p, &["owner"]))
            .try_start()
        {
            Ok(_) => panic!("{names}: loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err_text.contains(&format!(
                "plugin `owner`: configure failed: sanitize: {err}"
            )),
            "{names}: {err_text}"
        );
    }
    let many: Vec<String> = (0..257).map(|i| format!("x-h{i}")).collect();
    let p = plugin(
        "owner",
        &format!("{{ mode: headers, sanitize: \"{}\" }}", many.join(",")),
        "",
    );
    let err_text = match legate()
        .config(&simple(up.addr, &p, &["owner"]))
        .try_start()
    {
        Ok(_) => panic!("257 names loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err_text.contains("configure failed: sanitize: limit-exceeded"),
        "{err_text}"
    );
}

/// `callout.check-cluster` (ABI 0.1.3): `ok` for a granted cluster, `denied`
/// for another, with the host's hint of what to grant in the `configure` error.
#[tokio::test]
async fn check_cluster_says_whether_a_cluster_is_granted() {
    let up = upstream().start().await;
    let grant = "    capabilities: { clusters: [backend] }\n";
    let p = plugin(
        "checker",
        "{ mode: headers, check_cluster: backend }",
        grant,
    );
    let lg = legate().config(&simple(up.addr, &p, &["checker"])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(c.get("/").send().await.status, 200);
    let p = plugin("checker", "{ mode: headers, check_cluster: backend }", "");
    let err = match legate()
        .config(&simple(up.addr, &p, &["checker"]))
        .try_start()
    {
        Ok(_) => panic!("configure passed a cluster it may not call"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(
            "plugin `checker`: configure failed: check-cluster backend: denied (cluster \
             `backend` is not granted to plugin `checker`: add it to the plugin's \
             `capabilities.clusters`)"
        ),
        "{err}"
    );
}
