//! Native filters (`module: native:NAME`, compiled into the host) in the same chain
//! as Wasm plugins: requests pass through a chain of them, and a config they do not
//! take is refused at load.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use legate_tests::*;

fn config(up: SocketAddr, route_filters: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: n1 }}, {{ plugin: n2 }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: /off }}
            cluster: backend
            filters: {{ n2: {{ disabled: true }} }}
          - match: {{ prefix: / }}
            cluster: backend
            {route_filters}
clusters:
  - name: backend
    endpoints:
      - address: {up}
plugins:
  - name: n1
    module: native:noop
  - name: n2
    module: native:noop
"
    )
}

each_proto!(
    async fn a_chain_of_native_noop_filters_proxies(proto) {
        let up = upstream().route("/", echo).start().await;
        let lg = legate().config(&config(up.addr, "")).start();
        let mut c = client(proto, lg.addr("web")).await;
        for path in ["/a", "/off/b"] {
            let r = c.get(path).header("x-probe", "1").send().await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            // The echo upstream got the request untouched.
            assert!(r.text().contains("x-probe"), "{}", r.text());
        }
        assert_eq!(up.requests.get(), 2);
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
            2.0,
        )
        .await;
    }
);

#[test]
fn a_route_config_for_noop_is_refused_at_load() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let err = legate()
        .config(&config(addr, "filters: { n1: { config: { level: 3 } } }"))
        .try_start()
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("plugin `n1`") && msg.contains("takes no config"),
        "{msg}"
    );
}

/// `GET /plugins` reads a plugin's failure counters and instance gauge without
/// making them: a native plugin has none, and the page made them with an empty
/// `# HELP` on `/stats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugins_page_makes_no_series() {
    let up = upstream().start().await;
    let lg = legate().config(&config(up.addr, "")).start();
    let before = lg.stats().await;
    let (status, body) = lg.admin_get("/plugins").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["plugins"][0]["name"], "n1");
    assert_eq!(v["plugins"][0]["instances"], 0);
    assert_eq!(v["plugins"][0]["errors"]["failures"], 0);
    let after = lg.stats().await;
    assert!(
        !after
            .lines()
            .any(|l| l.starts_with("# HELP ") && l.trim_end().split(' ').count() < 4),
        "{after}"
    );
    assert!(!after.contains("legate_plugin_"), "{after}");
    // Nothing new at all (the page itself is not counted on `/stats`).
    let families = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| l.starts_with("# TYPE "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(families(&before), families(&after));
}
