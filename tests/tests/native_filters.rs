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
