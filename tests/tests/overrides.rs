//! Request-header overrides (`x-legate-upstream-rq-timeout-ms`, `x-legate-max-retries`)
//! and the debug header, honoured only on a listener that trusts its downstream and
//! stripped everywhere.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use legate_tests::*;

/// Two listeners on one route table: `trusted` (trust_downstream) and `plain`.
fn config(endpoint: SocketAddr, route_extra: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: trusted
    address: 127.0.0.1:0
    http: {{ routes: main, trust_downstream: true }}
  - name: plain
    address: 127.0.0.1:0
    http: {{ routes: main }}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - name: everything
            match: {{ prefix: / }}
            cluster: backend
{route_extra}clusters:
  - name: backend
    endpoints: [{{ address: \"{endpoint}\" }}]
"
    )
}

const OVERRIDES: [(&str, &str); 3] = [
    ("x-legate-upstream-rq-timeout-ms", "5000"),
    ("x-legate-max-retries", "2"),
    ("x-legate-debug", "1"),
];

each_proto!(
    async fn override_headers_never_reach_the_upstream(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&config(up.addr, "")).start();
        for listener in ["trusted", "plain"] {
            let mut c = client(proto, lg.addr(listener)).await;
            let mut rq = c.get("/");
            for (k, v) in OVERRIDES {
                rq = rq.header(k, v);
            }
            let r = rq.send().await;
            assert_eq!(r.status, 200);
            let echo = r.echo();
            for (k, _) in OVERRIDES {
                assert!(!echo.headers.contains_key(k), "{listener}: {k} forwarded");
            }
        }
    }
);

each_proto!(
    async fn timeout_override_only_from_a_trusted_downstream(proto) {
        let slow = upstream().delay(Duration::from_millis(600)).start().await;
        let lg = legate()
            .config(&config(slow.addr, "            timeout: 30s\n"))
            .start();
        let mut t = client(proto, lg.addr("trusted")).await;
        let r = t
            .get("/")
            .header("x-legate-upstream-rq-timeout-ms", "50")
            .send()
            .await;
        assert_eq!(r.status, 504);
        let mut p = client(proto, lg.addr("plain")).await;
        let r = p
            .get("/")
            .header("x-legate-upstream-rq-timeout-ms", "50")
            .send()
            .await;
        assert_eq!(r.status, 200);
    }
);

each_proto!(
    async fn max_retries_override_only_from_a_trusted_downstream(proto) {
        let retry = "            retry: { num_retries: 1, retry_on: [5xx], backoff_base: 1ms }\n";
        // Fails twice: one retry is not enough, two are.
        let trusted_up = upstream().name("t").fail_first(2, 503).start().await;
        let lg = legate().config(&config(trusted_up.addr, retry)).start();
        let mut c = client(proto, lg.addr("trusted")).await;
        let r = c.get("/").header("x-legate-max-retries", "2").send().await;
        assert_eq!(r.status, 200);

        let plain_up = upstream().name("p").fail_first(2, 503).start().await;
        let lg = legate().config(&config(plain_up.addr, retry)).start();
        let mut c = client(proto, lg.addr("plain")).await;
        let r = c.get("/").header("x-legate-max-retries", "2").send().await;
        assert_eq!(r.status, 503);
    }
);

each_proto!(
    async fn debug_header_reports_the_route_and_the_endpoint(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&config(up.addr, "")).start();
        let mut c = client(proto, lg.addr("trusted")).await;
        let r = c.get("/").header("x-legate-debug", "1").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-legate-debug-route"), Some("everything"));
        assert_eq!(r.header("x-legate-debug-cluster"), Some("backend"));
        assert_eq!(
            r.header("x-legate-debug-endpoint"),
            Some(up.addr.to_string().as_str())
        );
        assert_eq!(r.header("x-legate-debug-attempts"), Some("1"));
        // Timings: see tests/tests/debug.rs.
        assert!(r.header("x-legate-debug-timing").unwrap().contains("first-byte="));

        let mut p = client(proto, lg.addr("plain")).await;
        let r = p.get("/").header("x-legate-debug", "1").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-legate-debug-route"), None);
        assert_eq!(r.header("x-legate-debug-attempts"), None);
    }
);
