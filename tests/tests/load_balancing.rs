//! Load-balancing policies: the distribution of requests across a cluster's endpoints
//! (weighted round robin, least request, weighted random, ring hash stickiness).

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use legate_tests::*;

fn cluster_config(endpoints: &[(std::net::SocketAddr, u32)], cluster_extra: &str) -> String {
    let mut eps = String::new();
    for (a, w) in endpoints {
        eps.push_str(&format!("      - address: {a}\n        weight: {w}\n"));
    }
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - cluster: backend
clusters:
  - name: backend
{cluster_extra}    endpoints:
{eps}"
    )
}

fn endpoint_stat(addr: std::net::SocketAddr) -> String {
    format!(r#"legate_endpoint_rq_total{{cluster="backend",endpoint="{addr}"}}"#)
}

each_proto!(
    async fn round_robin_follows_weights(proto) {
        let a = upstream().name("a").start().await;
        let b = upstream().name("b").start().await;
        let lg = legate()
            .config(&cluster_config(&[(a.addr, 3), (b.addr, 1)], "    lb_policy: round_robin\n"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let mut seq = String::new();
        for _ in 0..400 {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200);
            seq.push_str(r.header("x-upstream").unwrap_or("?"));
        }
        assert_eq!(a.requests.get(), 300, "{seq}");
        assert_eq!(b.requests.get(), 100, "{seq}");
        // Smooth: the light endpoint's turns are spread out, never back to back.
        assert!(!seq.contains("bb"), "{seq}");
        assert!(!seq.contains("aaaa"), "{seq}");
        lg.assert_stat(&endpoint_stat(a.addr), 300.0).await;
        lg.assert_stat(&endpoint_stat(b.addr), 100.0).await;
    }
);

each_proto!(
    async fn round_robin_equal_weights_alternate(proto) {
        let ups = [
            upstream().name("a").start().await,
            upstream().name("b").start().await,
            upstream().name("c").start().await,
        ];
        let eps: Vec<_> = ups.iter().map(|u| (u.addr, 1)).collect();
        let lg = legate().config(&cluster_config(&eps, "")).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..30 {
            assert_eq!(c.get("/").send().await.status, 200);
        }
        for u in &ups {
            assert_eq!(u.requests.get(), 10);
        }
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_prefers_the_fast_endpoint() {
    let slow = upstream()
        .name("slow")
        .delay(Duration::from_millis(50))
        .start()
        .await;
    let fast = upstream().name("fast").start().await;
    let lg = legate()
        .config(&cluster_config(
            &[(slow.addr, 1), (fast.addr, 1)],
            "    lb_policy: least_request\n    protocol: h2\n",
        ))
        .start();
    let c = client(Proto::H2, lg.addr("web")).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                assert_eq!(c.get("/").send().await.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (s, f) = (slow.requests.get(), fast.requests.get());
    assert_eq!(s + f, 200);
    // Round robin would give 100/100; with the slow endpoint holding requests, two
    // choices sends it at most the picks where it is not busier (~25% by chance).
    assert!(f >= 130, "fast {f}, slow {s}");
    lg.assert_stat(&endpoint_stat(fast.addr), f as f64).await;
}

each_proto!(
    async fn random_follows_weights(proto) {
        let a = upstream().name("a").start().await;
        let b = upstream().name("b").start().await;
        let lg = legate()
            .config(&cluster_config(&[(a.addr, 3), (b.addr, 1)], "    lb_policy: random\n"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let mut seq = String::new();
        for _ in 0..1000 {
            let r = c.get("/").send().await;
            seq.push_str(r.header("x-upstream").unwrap_or("?"));
        }
        let na = a.requests.get();
        // Binomial(1000, 0.75): sd 13.7; ±70 is 5 sd.
        assert!((680..=820).contains(&na), "a got {na} of 1000");
        assert_eq!(na + b.requests.get(), 1000);
        // Random, not round robin: some runs of b happen.
        assert!(seq.contains("bb"), "no two b in a row in 1000 random picks: {seq}");
    }
);

/// Legate balancing `ring_hash` on `hash_on` over three upstreams, named
/// `a`, `b` and `c` (kept alive by the caller).
async fn ring_hash_over_three(hash_on: &str) -> ([UpstreamHandle; 3], LegateHandle) {
    let ups = [
        upstream().name("a").start().await,
        upstream().name("b").start().await,
        upstream().name("c").start().await,
    ];
    let eps: Vec<_> = ups.iter().map(|u| (u.addr, 1)).collect();
    let lg = legate()
        .config(&cluster_config(
            &eps,
            &format!("    lb_policy: ring_hash\n    hash_on: {hash_on}\n"),
        ))
        .start();
    (ups, lg)
}

each_proto!(
    /// `hash_on.cookie_ttl`, as Envoy's `cookie.ttl`: a client without the
    /// cookie gets one (`Set-Cookie` on the upstream's response), and sending
    /// it back keeps it on the endpoint it reached, from any connection.
    async fn ring_hash_makes_a_sticky_cookie(proto) {
        let (_ups, lg) =
            ring_hash_over_three("{ cookie: sticky, cookie_ttl: 1h, cookie_path: /app, cookie_same_site: strict }").await;
        let mut owners: HashMap<String, String> = HashMap::new();
        for _ in 0..24 {
            // A new connection each: another peer address, another cookie.
            let mut c = client(proto, lg.addr("web")).await;
            let r = c.get("/app/x").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            let first = r.header("x-upstream").unwrap_or("?").to_string();
            let set = r.header("set-cookie").unwrap_or_default().to_string();
            let value = set
                .strip_prefix("sticky=")
                .and_then(|v| v.split(';').next())
                .unwrap_or_default()
                .to_string();
            assert_eq!(value.len(), 16, "{set}");
            assert_eq!(
                set,
                format!("sticky={value}; Path=/app; Max-Age=3600; HttpOnly; SameSite=Strict")
            );
            // Sent back, on another connection: the same endpoint, no new cookie.
            let mut c = client(proto, lg.addr("web")).await;
            for _ in 0..3 {
                let r = c
                    .get("/app/y")
                    .header("cookie", &format!("other=1; sticky={value}"))
                    .send()
                    .await;
                assert_eq!(r.header("x-upstream"), Some(first.as_str()), "{value}");
                assert_eq!(r.header("set-cookie"), None);
            }
            owners.insert(value, first);
        }
        // The made cookies spread the clients over the endpoints.
        let used: std::collections::HashSet<&String> = owners.values().collect();
        assert!(used.len() >= 2, "24 clients all on one endpoint: {owners:?}");
    }
);

each_proto!(
    async fn ring_hash_is_sticky_by_header(proto) {
        let (_ups, lg) = ring_hash_over_three("{ header: x-user }").await;
        let mut c = client(proto, lg.addr("web")).await;
        let mut owner: HashMap<String, String> = HashMap::new();
        for round in 0..4 {
            for user in 0..60 {
                let user = format!("user-{user}");
                let r = c.get("/").header("x-user", &user).send().await;
                let got = r.header("x-upstream").unwrap_or("?").to_string();
                let first = owner.entry(user.clone()).or_insert_with(|| got.clone());
                assert_eq!(*first, got, "{user} moved in round {round}");
            }
        }
        let mut per_upstream: HashMap<&str, usize> = HashMap::new();
        for o in owner.values() {
            *per_upstream.entry(o).or_default() += 1;
        }
        // 60 keys on 3 endpoints: each gets a share (expected 20; a ring with a
        // reasonable number of points keeps every share well above 5).
        for name in ["a", "b", "c"] {
            let n = per_upstream.get(name).copied().unwrap_or(0);
            assert!(n >= 5, "endpoint {name} owns {n} of 60 keys: {per_upstream:?}");
        }
        // Requests without the header still succeed (they are spread by a random key).
        assert_eq!(c.get("/").send().await.status, 200);
    }
);
