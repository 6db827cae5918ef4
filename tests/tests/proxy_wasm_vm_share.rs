//! proxy-wasm VM sharing (Envoy's `vm_id`): plugins with the same non-empty
//! `vm_id`, module and `vm_config` run in one VM per worker, each on its own root
//! context. Proved with the guest's `share` mode, whose static counter is one
//! per VM: a shared VM shows both plugins' increments, separate VMs do not.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use legate_tests::proxy_wasm::proxy_wasm_guest;
use legate_tests::*;

/// A `share`-mode plugin entry: `tag` in its config, root id `root_<tag>`, and
/// `proxy_wasm` keys `extra` (vm_id, vm_config).
fn plugin(name: &str, config: &str, extra: &str, fail: &str) -> String {
    format!(
        "  - name: {name}\n    module: {}\n    fail: {fail}\n    limits: {{ cpu: 500ms }}\n    \
         proxy_wasm:\n      root_id: root_{name}\n{extra}      plugin_config: {config}\n",
        proxy_wasm_guest().display()
    )
}

fn share(name: &str, vm_id: &str) -> String {
    plugin(
        name,
        &format!("{{ mode: share, tag: {name} }}"),
        &format!("      vm_id: {vm_id}\n"),
        "closed",
    )
}

/// Listener `web` with the filter chain `chain`; everything to the upstream.
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

fn stat(name: &str, plugin: &str) -> String {
    format!("{name}{{plugin=\"{plugin}\"}}")
}

each_proto!(
    async fn plugins_with_one_vm_id_share_a_vm(proto) {
        let up = upstream().start().await;
        let vm = format!("shared-{proto:?}");
        let plugins = share("a", &vm) + &share("b", &vm);
        let lg = legate()
            .concurrency(1)
            .config(&config(up.addr, &plugins, &["a", "b"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for (i, (a, b)) in [("1", "2"), ("3", "4")].into_iter().enumerate() {
            let r = c.get(&format!("/req/{i}")).send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            // One counter: b sees a's increment of the same request.
            assert_eq!(r.header("x-pw-count-a"), Some(a));
            assert_eq!(r.header("x-pw-count-b"), Some(b));
            // Each root context was configured with its own plugin_config and
            // root id, and each HTTP context answers for its plugin.
            assert_eq!(r.header("x-pw-cfg-a"), Some("a"));
            assert_eq!(r.header("x-pw-cfg-b"), Some("b"));
            assert_eq!(r.header("x-pw-root-a"), Some("root_a"));
            assert_eq!(r.header("x-pw-root-b"), Some("root_b"));
            assert_eq!(r.header("x-pw-root-now-a"), Some("root_a"));
            assert_eq!(r.header("x-pw-root-now-b"), Some("root_b"));
        }
        assert_eq!(up.requests.get(), 2);
        // One VM on the worker, counted once for each plugin in it.
        for p in ["a", "b"] {
            lg.assert_stat(&stat("legate_plugin_instances", p), 1.0).await;
            let f = lg.stat(&stat("legate_plugin_failures_total", p)).await;
            assert_eq!(f.unwrap_or(0.0), 0.0);
        }
    }
);

each_proto!(
    async fn a_plugin_reload_keeps_its_vm_shared(proto) {
        // Reloading one plugin of a shared VM reloads the VM's other plugins
        // with it: alone it got a VM of its own while the others kept the old
        // one, so they no longer shared data, queues or globals.
        let up = upstream().start().await;
        let vm = format!("reload-{proto:?}");
        let plugins = share("a", &vm) + &share("b", &vm);
        let lg = legate()
            .concurrency(1)
            .config(&config(up.addr, &plugins, &["a", "b"]))
            .from_file()
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/before").send().await;
        assert_eq!(r.header("x-pw-count-a"), Some("1"));
        assert_eq!(r.header("x-pw-count-b"), Some("2"));
        let (status, body) = lg.admin(Method::POST, "/plugins/a/reload").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["with"], serde_json::json!(["b"]), "{body}");
        // One new VM for both: its counter starts again and counts both.
        let r = c.get("/after").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-count-a"), Some("1"));
        assert_eq!(r.header("x-pw-count-b"), Some("2"), "b kept the old VM");
        for p in ["a", "b"] {
            lg.assert_stat(
                &format!(r#"legate_plugin_reloads_total{{plugin="{p}",result="success"}}"#),
                1.0,
            )
            .await;
        }
    }
);

each_proto!(
    async fn different_vm_id_vm_config_or_none_keep_separate_vms(proto) {
        let up = upstream().start().await;
        let vm = format!("sep-{proto:?}");
        // a and b: different vm_id; c: a's vm_id, another vm_config; d: none.
        let plugins = share("a", &vm)
            + &share("b", &format!("{vm}-other"))
            + &plugin(
                "c",
                "{ mode: share, tag: c }",
                &format!("      vm_id: {vm}\n      vm_config: other\n"),
                "closed",
            )
            + &plugin("d", "{ mode: share, tag: d }", "", "closed");
        let lg = legate()
            .concurrency(1)
            .config(&config(up.addr, &plugins, &["a", "b", "c", "d"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for n in ["1", "2"] {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            for p in ["a", "b", "c", "d"] {
                assert_eq!(r.header(&format!("x-pw-count-{p}")), Some(n), "{p}");
                assert_eq!(
                    r.header(&format!("x-pw-root-{p}")).map(str::to_string),
                    Some(format!("root_{p}"))
                );
            }
        }
        for p in ["a", "b", "c", "d"] {
            lg.assert_stat(&stat("legate_plugin_instances", p), 1.0).await;
        }
    }
);

each_proto!(
    async fn a_trap_restarts_the_shared_vm_for_both_plugins(proto) {
        let up = upstream().start().await;
        let vm = format!("trap-{proto:?}");
        let plugins = share("a", &vm) + &share("b", &vm);
        let lg = legate()
            .concurrency(1)
            .config(&config(up.addr, &plugins, &["a", "b"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/fine").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-count-b"), Some("2"));

        // b's context traps: the VM dies for a too.
        let r = c.get("/trap/b").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        // a's response phase then finds its context gone with the VM, and fails
        // too (closed): the reply may name either.
        assert!(r.text().starts_with("plugin_failure: "), "{}", r.text());
        lg.assert_stat(&stat("legate_plugin_traps_total", "b"), 1.0)
            .await;
        for p in ["a", "b"] {
            lg.assert_stat_with(
                &stat("legate_plugin_failures_total", p),
                |v| v >= 1.0,
                ">= 1 (the shared VM failed)",
            )
            .await;
        }

        // A fresh VM (its counter starts over) with both root contexts
        // configured again.
        for (a, b) in [("1", "2"), ("3", "4")] {
            let r = c.get("/again").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-pw-count-a"), Some(a));
            assert_eq!(r.header("x-pw-count-b"), Some(b));
            assert_eq!(r.header("x-pw-cfg-a"), Some("a"));
            assert_eq!(r.header("x-pw-root-b"), Some("root_b"));
        }
        for p in ["a", "b"] {
            lg.assert_stat(&stat("legate_plugin_instance_restarts_total", p), 1.0)
                .await;
            lg.assert_stat(&stat("legate_plugin_instances", p), 1.0).await;
        }
        assert_eq!(up.requests.get(), 3);
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_are_per_root_context() {
    let up = upstream().start().await;
    // a ticks, b (same VM) does not.
    let plugins = plugin(
        "a",
        "{ mode: share, tag: a, tick_ms: 20 }",
        "      vm_id: ticks-shared\n",
        "closed",
    ) + &share("b", "ticks-shared");
    let lg = legate()
        .concurrency(1)
        .config(&config(up.addr, &plugins, &["a", "b"]))
        .start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    // The VM (and its ticks) started with the config, as `a` ticks from
    // `on_configure`; a request runs in it.
    let r = c.get("/").send().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-pw-count-b"), Some("2"));
    lg.assert_stat_with(
        &stat("legate_proxywasm_pw_share_ticks", "a"),
        |v| v >= 3.0,
        ">= 3 ticks",
    )
    .await;
    let b_ticks = lg.stat(&stat("legate_proxywasm_pw_share_ticks", "b")).await;
    assert_eq!(b_ticks.unwrap_or(0.0), 0.0);
    let b_calls = lg
        .stat(r#"legate_plugin_calls_total{plugin="b",phase="tick"}"#)
        .await;
    assert_eq!(b_calls.unwrap_or(0.0), 0.0);
    let failures = lg.stat(&stat("legate_plugin_failures_total", "a")).await;
    assert_eq!(failures.unwrap_or(0.0), 0.0);
}

each_proto!(
    /// A VM that ticks from its start and dies on a worker (here a trap in an
    /// exchange) is replaced there without waiting for the next exchange, so
    /// its plugin goes on ticking on a worker with no traffic.
    async fn a_ticking_vm_that_traps_is_replaced_without_traffic(proto) {
        let up = upstream().start().await;
        let vm = format!("tick-trap-{proto:?}");
        let plugins = plugin(
            "a",
            "{ mode: share, tag: a, tick_ms: 20 }",
            &format!("      vm_id: {vm}\n"),
            "closed",
        ) + &share("b", &vm);
        let lg = legate()
            .concurrency(1)
            .config(&config(up.addr, &plugins, &["a", "b"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/trap/b").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        lg.assert_stat(&stat("legate_plugin_traps_total", "b"), 1.0)
            .await;
        // No request since: a new VM, with both root contexts, ticking.
        for p in ["a", "b"] {
            lg.assert_stat(&stat("legate_plugin_instance_restarts_total", p), 1.0)
                .await;
            lg.assert_stat(&stat("legate_plugin_instances", p), 1.0).await;
        }
        let tick = r#"legate_plugin_calls_total{plugin="a",phase="tick"}"#;
        let ticks = lg.stat(tick).await.unwrap_or(0.0);
        lg.assert_stat_with(tick, |v| v >= ticks + 3.0, "3 more").await;
        // The next request runs in that VM (its counter started over).
        let r = c.get("/again").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-count-a"), Some("1"));
        assert_eq!(r.header("x-pw-count-b"), Some("2"));
        for p in ["a", "b"] {
            lg.assert_stat(&stat("legate_plugin_instance_restarts_total", p), 1.0)
                .await;
        }
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_configure_false_in_a_shared_vm_rejects_that_plugin() {
    let up = upstream().start().await;
    let plugins = share("a", "picky-vm")
        + &plugin(
            "picky",
            "{ mode: reject }",
            "      vm_id: picky-vm\n",
            "closed",
        );
    let yaml = config(up.addr, &plugins, &["a", "picky"]);
    let err = match legate().config(&yaml).try_start() {
        Ok(_) => panic!("the config was loaded:\n{yaml}"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("plugin `picky`: proxy_on_configure returned false"),
        "{err}"
    );
}

/// A root-context callout of the second plugin of a shared VM (root context 2)
/// is answered to that plugin (`proxy_on_http_call_response` with its root id,
/// counted in its stats), while the first plugin serves requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_callout_of_the_second_root_context_is_answered_to_it() {
    let up = upstream().start().await;
    let az = authz_upstream().await;
    let plugins = share("a", "callout-vm")
        + &plugin(
            "caller",
            "{ mode: tick-callout, tick_ms: 20 }",
            "      vm_id: callout-vm\n",
            "closed",
        )
        .replace(
            "    proxy_wasm:\n",
            "    capabilities: { clusters: [authz] }\n    proxy_wasm:\n",
        );
    let lg = legate()
        .concurrency(1)
        .config(&with_cluster(
            &config(up.addr, &plugins, &["a", "caller"]),
            "authz",
            az.addr,
        ))
        .start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c.get("/first").send().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-pw-count-a"), Some("1"));
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
    lg.assert_stat_with(
        r#"legate_plugin_calls_total{plugin="caller",phase="tick_callout_response"}"#,
        |v| v >= 1.0,
        ">= 1",
    )
    .await;
    let a_ticks = lg
        .stat(r#"legate_plugin_calls_total{plugin="a",phase="tick"}"#)
        .await;
    assert_eq!(a_ticks.unwrap_or(0.0), 0.0);
    for p in ["a", "caller"] {
        let f = lg.stat(&stat("legate_plugin_failures_total", p)).await;
        assert_eq!(f.unwrap_or(0.0), 0.0, "{p}");
    }
}

each_proto!(
    /// Metrics are the VM's, as in Envoy: a counter that the shared VM's
    /// `proxy_on_vm_start` (on the first plugin's root context) defined is
    /// found by the second plugin's contexts under the same id, and one
    /// plugin's ids never land on another plugin's metric (ids per plugin both
    /// started at 1). The series carry the VM's first plugin.
    async fn a_shared_vm_has_one_metric_table(proto) {
        let up = upstream().start().await;
        let vm = format!("metric-{proto:?}");
        let with_vm_config =
            |p: String| p.replace("      vm_id:", "      vm_config: vm-metric\n      vm_id:");
        let plugins = with_vm_config(share("a", &vm)) + &with_vm_config(share("b", &vm));
        let lg = legate()
            .concurrency(1)
            .config(&config(up.addr, &plugins, &["a", "b"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for i in 0..3 {
            let r = c.get(&format!("/req/{i}")).send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-pw-vm-metric-a"), Some("Ok(())"));
            assert_eq!(r.header("x-pw-vm-metric-b"), Some("Ok(())"));
        }
        assert_eq!(
            lg.stat(&stat("legate_proxywasm_pw_vm_requests", "a")).await,
            Some(6.0)
        );
        assert_eq!(
            lg.stat(&stat("legate_proxywasm_pw_vm_requests", "b")).await,
            None
        );
        // Nothing ticks: no increment went to another metric.
        for p in ["a", "b"] {
            let t = lg.stat(&stat("legate_proxywasm_pw_share_ticks", p)).await;
            assert_eq!(t.unwrap_or(0.0), 0.0, "{p}");
        }
    }
);

each_proto!(
    /// A queue the second plugin of a shared VM registers in its
    /// `proxy_on_configure` (run when the first plugin's exchange starts the
    /// VM) wakes that plugin's root context, not the first one's: each
    /// enqueue is drained by the plugin that registered the queue.
    async fn a_queue_registered_by_the_second_plugin_wakes_its_root(proto) {
        let up = upstream().start().await;
        let vm = format!("queue-owner-{proto:?}");
        let plugins = share("a", &vm)
            + &plugin(
                "q",
                "{ mode: queue }",
                &format!("      vm_id: {vm}\n"),
                "closed",
            );
        let lg = legate()
            .concurrency(1)
            .config(&config(up.addr, &plugins, &["a", "q"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for i in 0..3 {
            let r = c.get(&format!("/event/{i}")).send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-pw-resolved"), Some("true"));
        }
        // Counted by `q`'s root context (the VM's metrics carry its first
        // plugin, `a`).
        lg.assert_stat(&stat("legate_proxywasm_pw_dequeued", "a"), 3.0)
            .await;
    }
);
