//! Per-request debugging: `x-legate-debug: 1` from a trusted downstream makes the
//! response carry where the request was routed (route, cluster, endpoint, attempts,
//! new or reused connection) and its internal timings; from an untrusted one the
//! header is stripped and ignored.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use legate_tests::*;

/// Listeners `trusted` (trust_downstream, a native filter in its chain) and `plain`
/// on one route table: `/api` → `backend`, `/dead` → `dead`, `/hello` a direct
/// response, anything else no route.
fn config(
    backend: &[(SocketAddr, u32)],
    dead: SocketAddr,
    api_extra: &str,
    cluster_extra: &str,
) -> String {
    let mut eps = String::new();
    for (a, w) in backend {
        eps.push_str(&format!("      - {{ address: \"{a}\", weight: {w} }}\n"));
    }
    format!(
        "version: 1
listeners:
  - name: trusted
    address: 127.0.0.1:0
    http: {{ routes: main, trust_downstream: true, filters: [{{ plugin: noop }}] }}
  - name: plain
    address: 127.0.0.1:0
    http: {{ routes: main }}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - name: api
            match: {{ prefix: /api }}
            cluster: backend
{api_extra}          - name: dead
            match: {{ prefix: /dead }}
            cluster: dead
          - name: hello
            match: {{ prefix: /hello }}
            direct_response: {{ status: 200, body: hi }}
clusters:
  - name: backend
    endpoints:
{eps}{cluster_extra}  - name: dead
    endpoints: [{{ address: \"{dead}\" }}]
plugins:
  - name: noop
    module: native:noop
"
    )
}

fn one(up: SocketAddr) -> String {
    config(&[(up, 1)], closed_port_addr(), "", "")
}

/// `x-legate-debug-timing` as name → microseconds; panics if it is missing or a
/// part is not a number.
fn timing(r: &Resp) -> BTreeMap<String, u64> {
    let v = r
        .header("x-legate-debug-timing")
        .expect("x-legate-debug-timing");
    v.split(", ")
        .map(|part| {
            let (k, n) = part
                .split_once('=')
                .unwrap_or_else(|| panic!("bad part `{part}` in `{v}`"));
            (
                k.to_string(),
                n.parse()
                    .unwrap_or_else(|_| panic!("`{part}` is not a number in `{v}`")),
            )
        })
        .collect()
}

fn debug_headers(r: &Resp) -> Vec<String> {
    r.headers
        .keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with("x-legate-debug"))
        .collect()
}

const TRUSTED_STAT: &str = r#"legate_debug_responses_total{listener="trusted"}"#;
const PLAIN_STAT: &str = r#"legate_debug_responses_total{listener="plain"}"#;

each_proto!(
    async fn trusted_request_reports_route_cluster_endpoint_and_timings(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&one(up.addr)).start();
        let mut c = client(proto, lg.addr("trusted")).await;
        let r = c.get("/api/x").header("x-legate-debug", "1").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(!r.echo().headers.contains_key("x-legate-debug"));
        assert_eq!(r.header("x-legate-debug-route"), Some("api"));
        assert_eq!(r.header("x-legate-debug-cluster"), Some("backend"));
        assert_eq!(r.header("x-legate-debug-endpoint"), Some(up.addr.to_string().as_str()));
        assert_eq!(r.header("x-legate-debug-attempts"), Some("1"));
        assert_eq!(r.header("x-legate-debug-connection"), Some("new"));
        assert_eq!(r.header("x-legate-debug-cause"), None);
        let t = timing(&r);
        let names: Vec<&str> = t.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["connect", "first-byte", "request-filters", "response-filters", "total"],
            "{t:?}"
        );
        // Stages happen in order: each ends before the next, all before `total`.
        assert!(t["request-filters"] <= t["first-byte"], "{t:?}");
        assert!(t["connect"] <= t["first-byte"], "{t:?}");
        assert!(t["first-byte"] + t["response-filters"] <= t["total"], "{t:?}");
        lg.assert_stat(TRUSTED_STAT, 1.0).await;

        // Without the header, nothing is added.
        let r = c.get("/api/x").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(debug_headers(&r), Vec::<String>::new());
        lg.assert_stat(TRUSTED_STAT, 1.0).await;
    }
);

/// The cluster protocol matching the client's, so both upstream pools (HTTP/1.1
/// keep-alive and shared HTTP/2) are exercised.
fn upstream_protocol(proto: Proto) -> &'static str {
    match proto {
        Proto::H1 => "    protocol: http1\n",
        Proto::H2 => "    protocol: h2\n",
    }
}

each_proto!(
    async fn connect_time_only_for_a_new_connection(proto) {
        let up = match proto {
            Proto::H1 => upstream().http1().start().await,
            Proto::H2 => upstream().h2().start().await,
        };
        let dead = closed_port_addr();
        let lg = legate()
            .config(&config(&[(up.addr, 1)], dead, "", upstream_protocol(proto)))
            .start();
        let mut c = client(proto, lg.addr("trusted")).await;
        let r = c.get("/api").header("x-legate-debug", "1").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-legate-debug-connection"), Some("new"));
        assert!(timing(&r).contains_key("connect"));
        assert_eq!(up.connections.get(), 1);

        for i in 0..3 {
            let r = c.get("/api").header("x-legate-debug", "1").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-legate-debug-connection"), Some("reused"), "request {i}");
            let t = timing(&r);
            assert!(!t.contains_key("connect"), "request {i}: {t:?}");
            assert!(t["first-byte"] <= t["total"], "{t:?}");
        }
        // The reports match what the upstream saw: one connection.
        assert_eq!(up.connections.get(), 1);
        lg.assert_stat(TRUSTED_STAT, 4.0).await;
    }
);

each_proto!(
    async fn a_retry_reports_both_attempts_and_the_endpoint_that_answered(proto) {
        let bad = upstream().name("bad").status(503).start().await;
        let good = upstream().name("good").start().await;
        // Most picks go to `bad` first; the retry goes to the other endpoint.
        let retry = "            retry: { retry_on: [5xx], num_retries: 1, backoff_base: 1ms }\n";
        let lg = legate()
            .config(&config(&[(bad.addr, 10), (good.addr, 1)], closed_port_addr(), retry, ""))
            .start();
        let mut c = client(proto, lg.addr("trusted")).await;
        let mut retried = 0;
        for i in 0..10 {
            let before = bad.requests.get();
            let r = c.get("/api").header("x-legate-debug", "1").send().await;
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
            assert_eq!(r.header("x-upstream"), Some("good"));
            assert_eq!(
                r.header("x-legate-debug-endpoint"),
                Some(good.addr.to_string().as_str()),
                "request {i}"
            );
            // Attempts = what the upstreams saw: one more than `bad` got.
            let expected = 1 + bad.requests.get() - before;
            assert_eq!(
                r.header("x-legate-debug-attempts"),
                Some(expected.to_string().as_str()),
                "request {i}"
            );
            if expected == 2 {
                retried += 1;
            }
        }
        assert!(retried > 0, "no request was retried");
        assert_eq!(good.requests.get(), 10);
    }
);

each_proto!(
    async fn a_connect_failure_retried_reports_the_live_endpoint(proto) {
        let dead = closed_port_addr();
        let live = upstream().name("live").start().await;
        let retry = "            retry: { retry_on: [connect-failure], num_retries: 1, backoff_base: 1ms }\n";
        let lg = legate()
            .config(&config(&[(dead, 10), (live.addr, 1)], closed_port_addr(), retry, ""))
            .start();
        let mut c = client(proto, lg.addr("trusted")).await;
        let mut retried = 0;
        for i in 0..6 {
            let r = c.get("/api").header("x-legate-debug", "1").send().await;
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
            assert_eq!(
                r.header("x-legate-debug-endpoint"),
                Some(live.addr.to_string().as_str()),
                "request {i}"
            );
            match r.header("x-legate-debug-attempts") {
                Some("1") => {}
                Some("2") => retried += 1,
                other => panic!("request {i}: attempts {other:?}"),
            }
            // The connection is that of the attempt that answered.
            assert!(r.header("x-legate-debug-connection").is_some());
        }
        assert!(retried > 0, "no request went to the dead endpoint first");
        assert_eq!(live.requests.get(), 6);
    }
);

each_proto!(
    async fn untrusted_downstream_gets_nothing_and_the_header_is_stripped(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&one(up.addr)).start();
        let mut c = client(proto, lg.addr("plain")).await;
        let r = c.get("/api").header("x-legate-debug", "1").send().await;
        assert_eq!(r.status, 200);
        assert!(!r.echo().headers.contains_key("x-legate-debug"), "forwarded upstream");
        assert_eq!(debug_headers(&r), Vec::<String>::new());
        // Local answers and errors too.
        for path in ["/nowhere", "/hello", "/dead"] {
            let r = c.get(path).header("x-legate-debug", "1").send().await;
            assert_eq!(debug_headers(&r), Vec::<String>::new(), "{path}");
        }
        // A trusted listener strips the header as well: the upstream never sees it.
        let mut t = client(proto, lg.addr("trusted")).await;
        let r = t.get("/api").header("x-legate-debug", "yes").send().await;
        assert!(!r.echo().headers.contains_key("x-legate-debug"));
        assert_eq!(debug_headers(&r), Vec::<String>::new(), "only `1` asks");
        assert_eq!(up.requests.get(), 2);
        lg.assert_stat(PLAIN_STAT, 0.0).await;
        lg.assert_stat(TRUSTED_STAT, 0.0).await;
    }
);

each_proto!(
    async fn local_answers_and_errors_carry_what_is_known(proto) {
        let up = upstream().start().await;
        let dead = closed_port_addr();
        let lg = legate().config(&config(&[(up.addr, 1)], dead, "", "")).start();
        let mut c = client(proto, lg.addr("trusted")).await;

        // No route: nothing routed, only the filter and total timings.
        let r = c.get("/nowhere").header("x-legate-debug", "1").send().await;
        assert_eq!(r.status, 404);
        assert_eq!(r.header("x-legate-debug-route"), None);
        assert_eq!(r.header("x-legate-debug-cluster"), None);
        assert_eq!(r.header("x-legate-debug-endpoint"), None);
        assert_eq!(r.header("x-legate-debug-attempts"), Some("0"));
        assert_eq!(r.header("x-legate-debug-cause"), Some("no_route"));
        let t = timing(&r);
        assert!(t.contains_key("request-filters") && !t.contains_key("first-byte"), "{t:?}");
        assert!(t["request-filters"] <= t["total"], "{t:?}");

        // A direct response: the route, no cluster, no attempt.
        let r = c.get("/hello").header("x-legate-debug", "1").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hi");
        assert_eq!(r.header("x-legate-debug-route"), Some("hello"));
        assert_eq!(r.header("x-legate-debug-cluster"), None);
        assert_eq!(r.header("x-legate-debug-attempts"), Some("0"));
        assert_eq!(r.header("x-legate-debug-cause"), None);
        assert!(timing(&r).contains_key("total"));

        // A connect failure: route, cluster and the endpoint tried, no connection.
        let r = c.get("/dead").header("x-legate-debug", "1").send().await;
        assert_eq!(r.status, 502);
        assert_eq!(r.header("x-legate-debug-route"), Some("dead"));
        assert_eq!(r.header("x-legate-debug-cluster"), Some("dead"));
        assert_eq!(r.header("x-legate-debug-endpoint"), Some(dead.to_string().as_str()));
        assert_eq!(r.header("x-legate-debug-attempts"), Some("1"));
        assert_eq!(r.header("x-legate-debug-cause"), Some("upstream_connect_failure"));
        assert_eq!(r.header("x-legate-debug-connection"), None);
        let t = timing(&r);
        assert!(!t.contains_key("first-byte") && !t.contains_key("connect"), "{t:?}");

        lg.assert_stat(TRUSTED_STAT, 3.0).await;
        assert_eq!(up.requests.get(), 0);
    }
);
