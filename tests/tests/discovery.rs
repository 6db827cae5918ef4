//! Service discovery with real sockets: `dns` clusters resolved through a tiny DNS
//! server on loopback ([`DnsServer`]) whose answers change between refreshes,
//! `/ready` while a `dns` cluster waits for its first answer, and `file` clusters
//! whose endpoint file is edited live under traffic.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use legate_tests::*;

const WAIT: Duration = Duration::from_secs(10);

fn stat(name: &str, cluster: &str) -> String {
    format!("legate_cluster_{name}{{cluster=\"{cluster}\"}}")
}

async fn until_stat(lg: &LegateHandle, series: &str, want: impl Fn(f64) -> bool, what: &str) {
    eventually(WAIT, &format!("{series} {what}"), || async {
        lg.stat(series).await.filter(|v| want(*v)).map(|_| ())
    })
    .await;
}

fn who(seen: &BTreeMap<String, usize>) -> Vec<&str> {
    seen.keys().map(String::as_str).collect()
}

/// A port free on both 127.0.0.2 and 127.0.0.3, with an upstream on each: a DNS name
/// resolving to either reaches a different upstream on the same port.
async fn two_loopback_upstreams() -> (u16, UpstreamHandle, UpstreamHandle) {
    for _ in 0..50 {
        // Reserved for this process, so no parallel test binds it in between.
        let port = free_addr().port();
        let (a2, a3): (SocketAddr, SocketAddr) = (
            (Ipv4Addr::new(127, 0, 0, 2), port).into(),
            (Ipv4Addr::new(127, 0, 0, 3), port).into(),
        );
        if std::net::TcpListener::bind(a2).is_err() || std::net::TcpListener::bind(a3).is_err() {
            continue;
        }
        let a = upstream().name("two").bind(a2).start().await;
        let b = upstream().name("three").bind(a3).start().await;
        return (port, a, b);
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

fn dns_config(port: u16, dns: SocketAddr, lookup: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http: {{ routes: main }}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: / }}
            cluster: backend
            retry: {{ num_retries: 2, retry_on: [connect-failure, reset] }}
clusters:
  - name: backend
    discovery:
      type: dns
      dns_lookup: {lookup}
      dns_refresh_rate: 50ms
      dns_resolvers: [\"{dns}\"]
      dns_timeout: 500ms
    endpoints:
      - address: \"backend.test:{port}\"
        zone: z1
"
    )
}

const V2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const V3: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

each_proto!(
    async fn strict_dns_follows_changing_answers(proto) {
        let (port, _a, _b) = two_loopback_upstreams().await;
        let dns = DnsServer::start(&[V2]).await;
        let lg = legate()
            .config(&dns_config(port, dns.addr, "strict"))
            .start();
        let total = stat("membership_total", "backend");
        until_stat(&lg, &total, |v| v == 1.0, "== 1").await;
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(who(&spread(&mut c, "/work", 6).await), ["two"]);

        // The name now resolves to both: both get traffic.
        dns.state.set(&[V2, V3]);
        until_stat(&lg, &total, |v| v == 2.0, "== 2").await;
        let both = spread(&mut c, "/work", 10).await;
        assert_eq!((both.get("two"), both.get("three")), (Some(&5), Some(&5)), "{both:?}");

        // The name moves to .3 only.
        dns.state.set(&[V3]);
        until_stat(&lg, &total, |v| v == 1.0, "== 1").await;
        assert_eq!(who(&spread(&mut c, "/work", 6).await), ["three"]);

        // The server fails: the endpoints stay as they were.
        let failures = stat("discovery_update_failure", "backend");
        assert_eq!(lg.stat(&failures).await, Some(0.0));
        dns.state.servfail.store(true, Ordering::SeqCst);
        until_stat(&lg, &failures, |v| v >= 2.0, ">= 2").await;
        assert_eq!(who(&spread(&mut c, "/work", 6).await), ["three"]);
        assert_eq!(lg.stat(&total).await, Some(1.0));
        lg.assert_stat_with(&stat("discovery_update_success", "backend"), |v| v >= 3.0, ">= 3")
            .await;

        // /clusters shows the discovered endpoint with the config entry's zone.
        let (_, body) = lg.admin_get("/clusters").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        let cl = &v["clusters"][0];
        assert_eq!(cl["discovery"], "dns");
        assert_eq!(cl["endpoints"][0]["address"], format!("127.0.0.3:{port}"));
        assert_eq!(cl["endpoints"][0]["configured_address"], format!("backend.test:{port}"));
        assert_eq!(cl["endpoints"][0]["zone"], "z1");
    }
);

each_proto!(
    async fn logical_dns_uses_the_first_address(proto) {
        let (port, _a, _b) = two_loopback_upstreams().await;
        let dns = DnsServer::start(&[V2, V3]).await;
        let lg = legate()
            .config(&dns_config(port, dns.addr, "logical"))
            .start();
        let success = stat("discovery_update_success", "backend");
        until_stat(&lg, &success, |v| v >= 1.0, ">= 1").await;
        assert_eq!(lg.stat(&stat("membership_total", "backend")).await, Some(1.0));
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(who(&spread(&mut c, "/work", 6).await), ["two"]);

        dns.state.set(&[V3, V2]);
        until_stat(&lg, &success, |v| v >= 2.0, ">= 2").await;
        assert_eq!(who(&spread(&mut c, "/work", 6).await), ["three"]);
        assert_eq!(lg.stat(&stat("membership_total", "backend")).await, Some(1.0));
    }
);

each_proto!(
    /// A name that does not resolve costs only its own endpoints: the
    /// cluster's other names serve, as Envoy resolves each name on its own.
    /// (The first failing name failed the whole refresh: the cluster never
    /// got an endpoint, and every request was 503.)
    async fn one_unresolvable_name_leaves_the_others_serving(proto) {
        let (port, _a, _b) = two_loopback_upstreams().await;
        let dns = DnsServer::start(&[V2]).await;
        dns.state.remove_name("gone.test");
        let yaml = dns_config(port, dns.addr, "strict").replace(
            "        zone: z1\n",
            &format!("        zone: z1\n      - address: \"gone.test:{port}\"\n"),
        );
        let lg = legate().config(&yaml).start();
        until_stat(&lg, &stat("discovery_update_failure", "backend"), |v| v >= 2.0, ">= 2").await;
        assert_eq!(lg.stat(&stat("membership_total", "backend")).await, Some(1.0));
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(who(&spread(&mut c, "/work", 4).await), ["two"]);
        // The answers of the name that resolves are still followed.
        dns.state.set(&[V3]);
        eventually(WAIT, "the move to .3", || {
            let lg = &lg;
            async move {
                let (_, body) = lg.admin_get("/clusters").await;
                body.contains(&format!("127.0.0.3:{port}")).then_some(())
            }
        })
        .await;
        assert_eq!(who(&spread(&mut c, "/work", 4).await), ["three"]);
    }
);

each_proto!(
    /// `logical` is one endpoint per name, as Envoy's logical host, even with
    /// health checks: when the answer leads with another address, the endpoint
    /// moves there. (The old address passed its checks, so it was kept beside
    /// the new one: the cluster grew to every address the rotation showed, as
    /// `strict` does.)
    async fn logical_dns_stays_one_endpoint_with_health_checks(proto) {
        let (port, _a, _b) = two_loopback_upstreams().await;
        let dns = DnsServer::start(&[V2, V3]).await;
        let yaml = dns_config(port, dns.addr, "logical").replace(
            "    endpoints:\n",
            "    health_check: { tcp: {}, interval: 50ms }\n    endpoints:\n",
        );
        let lg = legate().config(&yaml).start();
        let total = stat("membership_total", "backend");
        until_stat(&lg, &total, |v| v == 1.0, "== 1").await;
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(who(&spread(&mut c, "/work", 4).await), ["two"]);
        let success = stat("discovery_update_success", "backend");
        let before = lg.stat(&success).await.unwrap_or(0.0);
        dns.state.set(&[V3, V2]);
        until_stat(&lg, &success, |v| v > before, "a new generation").await;
        assert_eq!(lg.stat(&total).await, Some(1.0));
        assert_eq!(who(&spread(&mut c, "/work", 4).await), ["three"]);
        // And back: still one.
        let before = lg.stat(&success).await.unwrap_or(0.0);
        dns.state.set(&[V2, V3]);
        until_stat(&lg, &success, |v| v > before, "a new generation").await;
        assert_eq!(lg.stat(&total).await, Some(1.0));
        assert_eq!(who(&spread(&mut c, "/work", 4).await), ["two"]);
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_cluster_without_an_answer_yet_is_503_then_serves() {
    let (port, _a, _b) = two_loopback_upstreams().await;
    let dns = DnsServer::start(&[]).await;
    let lg = legate()
        .config(&dns_config(port, dns.addr, "strict"))
        .start();
    // No address for the name: nothing to send to.
    eventually(WAIT, "a few resolutions", || async {
        (dns.state.queries.load(Ordering::SeqCst) >= 4).then_some(())
    })
    .await;
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(c.get("/").send().await.status, 503);
    dns.state.set(&[V3]);
    until_stat(
        &lg,
        &stat("membership_total", "backend"),
        |v| v == 1.0,
        "== 1",
    )
    .await;
    assert_eq!(who(&spread(&mut c, "/work", 3).await), ["three"]);
}

each_proto!(
    /// A failed first resolution (the name server answers SERVFAIL at start) is
    /// retried after `dns_failure_refresh_rate`'s backoff, not `dns_refresh_rate`:
    /// with the latter at 1h, the cluster can only get its endpoints through the
    /// backoff. Once an answer came, the next resolution is due in 1h: none follows.
    async fn failed_first_resolution_is_retried_with_backoff(proto) {
        let (port, _a, _b) = two_loopback_upstreams().await;
        let dns = DnsServer::start(&[]).await;
        dns.state.servfail.store(true, Ordering::SeqCst);
        let config = dns_config(port, dns.addr, "strict").replace(
            "      dns_refresh_rate: 50ms\n",
            "      dns_refresh_rate: 1h\n      dns_failure_refresh_rate: { base_interval: 100ms, max_interval: 200ms }\n",
        );
        let lg = legate().config(&config).start();
        let failures = stat("discovery_update_failure", "backend");
        until_stat(&lg, &failures, |v| v >= 3.0, ">= 3").await;
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/").send().await.status, 503);
        assert_eq!(lg.stat(&stat("membership_total", "backend")).await, Some(0.0));

        dns.state.set(&[V3]);
        dns.state.servfail.store(false, Ordering::SeqCst);
        until_stat(&lg, &stat("membership_total", "backend"), |v| v == 1.0, "== 1").await;
        assert_eq!(who(&spread(&mut c, "/work", 4).await), ["three"]);
        lg.assert_stat(&stat("upstream_rq_2xx", "backend"), 4.0).await;
        lg.assert_stat(&stat("discovery_update_success", "backend"), 1.0).await;
        let failed = lg.stat(&failures).await.unwrap();
        lg.assert_stat(&stat("discovery_update_attempt", "backend"), failed + 1.0)
            .await;
    }
);

each_proto!(
    /// With `dns_respect_ttl` each name is asked again when its own TTL runs out,
    /// as Envoy refreshes each resolve target on its own: a name with a 1 s TTL
    /// is asked every second, one with a 1 h TTL (and `dns_refresh_rate` 1h) once.
    /// (The smallest TTL of all answers drove every name: `slow.test` was asked
    /// every second too.)
    async fn each_name_is_refreshed_on_its_own_ttl(proto) {
        let (port, _a, _b) = two_loopback_upstreams().await;
        let dns = DnsServer::start(&[V2]).await;
        dns.state.set_ttl("fast.test", 1);
        dns.state.set_ttl("slow.test", 3600);
        let yaml = dns_config(port, dns.addr, "strict")
            .replace(
                "      dns_refresh_rate: 50ms\n",
                "      dns_refresh_rate: 1h\n      dns_respect_ttl: true\n",
            )
            .replace(
                "      - address: \"backend.test:{port}\"\n        zone: z1\n"
                    .replace("{port}", &port.to_string())
                    .as_str(),
                &format!(
                    "      - address: \"fast.test:{port}\"\n      - address: \"slow.test:{port}\"\n"
                ),
            );
        assert!(yaml.contains("slow.test"), "{yaml}");
        let lg = legate().config(&yaml).start();
        eventually(WAIT, "fast.test asked three times", || async {
            (dns.state.a_queries("fast.test") >= 3).then_some(())
        })
        .await;
        assert_eq!(dns.state.a_queries("slow.test"), 1);
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(who(&spread(&mut c, "/work", 2).await), ["two"]);
        // One endpoint per name (both at .2).
        assert_eq!(lg.stat(&stat("membership_total", "backend")).await, Some(2.0));
    }
);

// ---------------------------------------------------------------------------------
// File discovery.

/// Replaces the endpoint file atomically (write, then rename), as the docs advise.
fn write_endpoints(dir: &TempDir, body: &str) -> PathBuf {
    let tmp = dir.write("endpoints.yaml.tmp", body);
    let path = dir.path().join("endpoints.yaml");
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn endpoints_yaml(eps: &[(SocketAddr, u32)]) -> String {
    let mut s = String::from("endpoints:\n");
    for (a, w) in eps {
        s.push_str(&format!(
            "  - address: \"{a}\"\n    weight: {w}\n    zone: z1\n"
        ));
    }
    s
}

/// Sends requests on its own connection until stopped; counts answers that are not
/// 200, and which upstreams answered.
struct Traffic {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<String, u64>>>,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl Traffic {
    async fn start(proto: Proto, addr: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let record = seen.clone();
        let mut c = client(proto, addr).await;
        let task = tokio::spawn(async move {
            let (mut ok, mut bad) = (0, 0);
            while !s.load(Ordering::SeqCst) {
                match c.get("/traffic").try_send().await {
                    Ok(r) if r.status == 200 => {
                        ok += 1;
                        let who = r.header("x-upstream").unwrap_or("?").to_string();
                        *record.lock().unwrap().entry(who).or_insert(0) += 1;
                    }
                    _ => bad += 1,
                }
            }
            (ok, bad)
        });
        Traffic { stop, seen, task }
    }

    /// Forgets which upstreams answered so far.
    fn reset(&self) {
        self.seen.lock().unwrap().clear();
    }

    /// Waits until the upstreams that answered since [`Traffic::reset`] are `want`
    /// (after at least 10 answers).
    async fn until_seen(&self, want: &[&str]) {
        eventually(WAIT, &format!("traffic answered by {want:?}"), || async {
            let seen = self.seen.lock().unwrap();
            let names: Vec<&str> = seen.keys().map(String::as_str).collect();
            (names == want && seen.values().sum::<u64>() >= 10).then_some(())
        })
        .await;
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

each_proto!(
    async fn endpoint_file_edited_live_under_traffic(proto) {
        let a = upstream().name("a").start().await;
        let b = upstream().name("b").start().await;
        let dir = TempDir::new();
        let path = write_endpoints(&dir, &endpoints_yaml(&[(a.addr, 1)]));
        let lg = legate().config(&file_discovery_config(&path, "")).start();
        let total = stat("membership_total", "backend");
        assert_eq!(lg.stat(&total).await, Some(1.0));
        let success = stat("discovery_update_success", "backend");

        let traffic = Traffic::start(proto, lg.addr("web")).await;
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(who(&spread(&mut c, "/work", 4).await), ["a"]);

        // Add b. (The traffic and this client share one worker's rotation, so
        // between them they see both.)
        write_endpoints(&dir, &endpoints_yaml(&[(a.addr, 1), (b.addr, 1)]));
        until_stat(&lg, &total, |v| v == 2.0, "== 2").await;
        traffic.reset();
        traffic.until_seen(&["a", "b"]).await;

        // A broken edit: rejected, the two endpoints stay.
        let failures = stat("discovery_update_failure", "backend");
        write_endpoints(&dir, "endpoints:\n  - address: not-an-address\n");
        until_stat(&lg, &failures, |v| v == 1.0, "== 1").await;
        assert_eq!(lg.stat(&total).await, Some(2.0));
        traffic.reset();
        traffic.until_seen(&["a", "b"]).await;

        // Remove a while traffic flows: no request fails.
        write_endpoints(&dir, &endpoints_yaml(&[(b.addr, 1)]));
        until_stat(&lg, &total, |v| v == 1.0, "== 1").await;
        assert_eq!(who(&spread(&mut c, "/work", 6).await), ["b"]);
        traffic.reset();
        traffic.until_seen(&["b"]).await;
        let (ok, bad) = traffic.finish().await;
        assert!(ok > 0);
        assert_eq!(bad, 0, "{ok} ok");
        assert_eq!(lg.stat(&success).await, Some(2.0));

        // Reweight: 1:3 (no other traffic, one worker: the smooth rotation is exact
        // over whole periods).
        write_endpoints(&dir, &endpoints_yaml(&[(a.addr, 1), (b.addr, 3)]));
        until_stat(&lg, &success, |v| v == 3.0, "== 3").await;
        let w = spread(&mut c, "/work", 40).await;
        assert_eq!((w.get("a"), w.get("b")), (Some(&10), Some(&30)), "{w:?}");
        let (_, body) = lg.admin_get("/clusters").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["clusters"][0]["discovery"], "file");
        assert_eq!(v["clusters"][0]["endpoints"][1]["weight"], 3);
        assert_eq!(v["clusters"][0]["endpoints"][1]["zone"], "z1");
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_has_primacy_over_the_endpoint_file() {
    let b_ok = Arc::new(AtomicBool::new(true));
    let a = upstream().name("a").start().await;
    let flag = b_ok.clone();
    let b = upstream()
        .name("b")
        .route("/healthz", move |_req| {
            let ok = flag.load(Ordering::SeqCst);
            async move {
                let mut r = Response::new(Full::new(Bytes::from_static(b"hc\n")));
                if !ok {
                    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                }
                r
            }
        })
        .start()
        .await;
    let dir = TempDir::new();
    let path = write_endpoints(&dir, &endpoints_yaml(&[(a.addr, 1), (b.addr, 1)]));
    let lg = legate()
        .config(&file_discovery_config(
            &path,
            "    health_check:\n      http: { path: /healthz }\n      interval: 30ms\n",
        ))
        .start();
    let total = stat("membership_total", "backend");
    let kept = stat("membership_kept_by_health", "backend");

    // The file drops b, but b passes its checks: it stays and still gets traffic.
    write_endpoints(&dir, &endpoints_yaml(&[(a.addr, 1)]));
    until_stat(&lg, &kept, |v| v == 1.0, "== 1").await;
    assert_eq!(lg.stat(&total).await, Some(2.0));
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(who(&spread(&mut c, "/work", 10).await), ["a", "b"]);

    // b fails its checks: out of rotation at once, then out of the cluster.
    b_ok.store(false, Ordering::SeqCst);
    until_stat(&lg, &total, |v| v == 1.0, "== 1").await;
    assert_eq!(lg.stat(&kept).await, Some(0.0));
    assert_eq!(who(&spread(&mut c, "/work", 6).await), ["a"]);

    // Listed again (and healthy again): back in, checked afresh.
    b_ok.store(true, Ordering::SeqCst);
    write_endpoints(&dir, &endpoints_yaml(&[(a.addr, 1), (b.addr, 1)]));
    until_stat(&lg, &total, |v| v == 2.0, "== 2").await;
    assert_eq!(who(&spread(&mut c, "/work", 10).await), ["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_endpoint_file_at_start_is_a_clear_error() {
    let dir = TempDir::new();
    let path = write_endpoints(
        &dir,
        "endpoints:\n  - address: 10.0.0.1:80\n  - address: db:80\n",
    );
    let err = legate()
        .config(&file_discovery_config(&path, ""))
        .try_start()
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("cluster `backend`"), "{msg}");
    assert!(
        msg.contains(&format!(
            "{}:3:5: endpoint address `db:80` is not `ip:port`",
            path.display()
        )),
        "{msg}"
    );
}

/// At start `/ready` answers 503 `WARMING`, naming the cluster, until a `dns`
/// cluster has its first answer (as Envoy holds readiness until its clusters
/// warmed), then 200 `LIVE`; a name server that never answers holds it back only
/// for the cluster's `initial_fetch_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_first_dns_answer() {
    let (port, _a, _b) = two_loopback_upstreams().await;
    let dns = DnsServer::start(&[]).await;
    dns.state.servfail.store(true, Ordering::SeqCst);
    let with_timeout = |t: &str| {
        dns_config(port, dns.addr, "strict").replace(
            "      dns_timeout: 500ms\n",
            &format!("      dns_timeout: 500ms\n      initial_fetch_timeout: {t}\n"),
        )
    };
    let lg = legate().config(&with_timeout("60s")).start();
    until_stat(
        &lg,
        &stat("discovery_update_failure", "backend"),
        |v| v >= 2.0,
        ">= 2",
    )
    .await;
    let (status, body) = lg.admin_get("/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("WARMING\ncluster `backend`: waiting for its first DNS answer"),
        "{body}"
    );
    dns.state.set(&[V3]);
    dns.state.servfail.store(false, Ordering::SeqCst);
    eventually(WAIT, "/ready says LIVE", || async {
        (lg.admin_get("/ready").await == (200, "LIVE\n".to_string())).then_some(())
    })
    .await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(
            who(&spread(&mut c, "/work", 2).await),
            ["three"],
            "{proto:?}"
        );
    }
    lg.assert_stat(&stat("upstream_rq_2xx", "backend"), 4.0)
        .await;
    assert!(lg.stat(&stat("discovery_update_success", "backend")).await >= Some(1.0));

    // A name server that never answers: ready once initial_fetch_timeout passed.
    let silent = DnsServer::start(&[]).await;
    silent.state.servfail.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let lg = legate()
        .config(&with_timeout("3s").replace(&dns.addr.to_string(), &silent.addr.to_string()))
        .start();
    assert_eq!(lg.admin_get("/ready").await.0, 503);
    eventually(WAIT, "/ready says LIVE", || async {
        (lg.admin_get("/ready").await == (200, "LIVE\n".to_string())).then_some(())
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(2900));
    let r = client(Proto::H1, lg.addr("web"))
        .await
        .get("/")
        .send()
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
}
