//! Upstream resilience with real failing upstreams on loopback: active health checks
//! (HTTP and TCP), passive outlier detection, panic mode, circuit breakers, and one
//! upstream of three killed under steady load.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use legate_tests::*;

const WAIT: Duration = Duration::from_secs(10);

fn stat(name: &str, cluster: &str) -> String {
    format!("legate_cluster_{name}{{cluster=\"{cluster}\"}}")
}

fn text(status: u16, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

/// Waits until the gauge `series` equals `want`.
async fn until_stat(lg: &LegateHandle, series: &str, want: f64) {
    eventually(WAIT, &format!("{series} == {want}"), || async {
        (lg.stat(series).await == Some(want)).then_some(())
    })
    .await;
}

/// The `health` object of endpoint `addr` in `/clusters`.
async fn endpoint_health(lg: &LegateHandle, addr: std::net::SocketAddr) -> Value {
    let (status, body) = lg.admin_get("/clusters").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["endpoints"].as_array().unwrap().iter())
        .find(|e| e["address"] == addr.to_string())
        .map(|e| e["health"].clone())
        .unwrap_or_else(|| panic!("{addr} not in /clusters: {body}"))
}

/// The cluster protocol to use with a client protocol: h2 clients go with an h2
/// cluster, so health checks are exercised over HTTP/2 too.
fn cluster_protocol(proto: Proto) -> &'static str {
    match proto {
        Proto::H2 => "    protocol: h2\n",
        _ => "    protocol: http1\n",
    }
}

each_proto!(
    async fn failing_health_check_takes_an_endpoint_out_and_back(proto) {
        let (a_ok, b_ok) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(true)),
        );
        let a = health_checked("a", &a_ok).await;
        let b = health_checked("b", &b_ok).await;
        let cluster = format!(
            "{}    health_check:
      http: {{ path: /healthz, host: health.internal }}
      interval: 50ms
      interval_jitter: 20ms
      timeout: 1s
      healthy_threshold: 2
      unhealthy_threshold: 3
",
            cluster_protocol(proto)
        );
        let lg = legate()
            .concurrency(2)
            .config(&simple_config_with(&[a.addr, b.addr], "", &cluster))
            .start();
        let healthy = stat("membership_healthy", "backend");
        eventually(WAIT, "health checks to run", || async {
            (lg.stat(&stat("health_check_success", "backend")).await >= Some(4.0)).then_some(())
        })
        .await;
        assert_eq!(lg.stat(&healthy).await, Some(2.0));
        let mut c = client(proto, lg.addr("web")).await;
        let both = spread(&mut c, "/work", 10).await;
        assert_eq!((both.get("a"), both.get("b")), (Some(&5), Some(&5)), "{both:?}");

        // b starts answering 503 on its health endpoint: out at the next check,
        // whatever the threshold (an unhealthy answer is believed at once).
        b_ok.store(false, Ordering::SeqCst);
        until_stat(&lg, &healthy, 1.0).await;
        let only_a = spread(&mut c, "/work", 20).await;
        assert_eq!(only_a.get("a"), Some(&20), "{only_a:?}");
        let h = endpoint_health(&lg, b.addr).await;
        assert_eq!(h["status"], "unhealthy", "{h}");
        assert_eq!(h["failed_active_health_check"], true, "{h}");
        assert_eq!(h["last_health_check_failure"], "HTTP status 503", "{h}");
        assert_eq!(endpoint_health(&lg, a.addr).await["status"], "healthy");
        lg.assert_stat_with(&stat("health_check_failure", "backend"), |v| v >= 1.0, ">= 1")
            .await;

        // b recovers: back after two passed checks.
        b_ok.store(true, Ordering::SeqCst);
        until_stat(&lg, &healthy, 2.0).await;
        let again = spread(&mut c, "/work", 10).await;
        assert_eq!((again.get("a"), again.get("b")), (Some(&5), Some(&5)), "{again:?}");
        assert_eq!(endpoint_health(&lg, b.addr).await["status"], "healthy");
        assert_eq!(lg.stat(&stat("lb_healthy_panic", "backend")).await, Some(0.0));
    }
);

/// An upstream whose `/healthz` answers 200 and records the Host (`:authority`
/// under HTTP/2) of every check it gets.
async fn host_recording(seen: &Arc<Mutex<Vec<String>>>) -> UpstreamHandle {
    let seen = seen.clone();
    upstream()
        .route("/healthz", move |req| {
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
                .or_else(|| req.uri().authority().map(|a| a.to_string()))
                .unwrap_or_default();
            seen.lock().unwrap().push(host);
            async move { text(200, "ok\n") }
        })
        .start()
        .await
}

each_proto!(
    /// An HTTP check without `host` sends the cluster's name as Host, as Envoy;
    /// `host` overrides it. (It sent the endpoint's address.)
    async fn http_check_host_is_the_cluster_name_unless_set(proto) {
        let (by_name, pinned) = (Arc::default(), Arc::default());
        let a = host_recording(&by_name).await;
        let b = host_recording(&pinned).await;
        let protocol = cluster_protocol(proto);
        let cfg = format!(
            "version: 1
clusters:
  - name: users.v2
{protocol}    endpoints: [{{ address: \"{a}\" }}]
    health_check: {{ http: {{ path: /healthz }}, interval: 50ms }}
  - name: pinned
{protocol}    endpoints: [{{ address: \"{b}\" }}]
    health_check: {{ http: {{ path: /healthz, host: health.internal }}, interval: 50ms }}
",
            a = a.addr,
            b = b.addr
        );
        let lg = legate().config(&cfg).start();
        for c in ["users.v2", "pinned"] {
            let series = stat("health_check_success", c);
            eventually(WAIT, &format!("{series} >= 2"), || async {
                (lg.stat(&series).await >= Some(2.0)).then_some(())
            })
            .await;
        }
        let by_name = by_name.lock().unwrap().clone();
        assert!(!by_name.is_empty());
        assert!(by_name.iter().all(|h| h == "users.v2"), "{by_name:?}");
        let pinned = pinned.lock().unwrap().clone();
        assert!(!pinned.is_empty());
        assert!(pinned.iter().all(|h| h == "health.internal"), "{pinned:?}");
    }
);

each_proto!(
    /// An endpoint's own `health_check` (Envoy's `endpoint.health_check_config`):
    /// its `host` comes before the cluster's for its checks, and its `port` takes
    /// them to another port of the same address. (Every endpoint got the cluster's
    /// Host at its own port.)
    async fn an_endpoint_health_check_sets_its_own_host_and_port(proto) {
        let (plain, named, traffic, admin) =
            (Arc::default(), Arc::default(), Arc::default(), Arc::default());
        let a = host_recording(&plain).await;
        let b = host_recording(&named).await;
        let c = host_recording(&traffic).await;
        let c_admin = host_recording(&admin).await;
        let protocol = cluster_protocol(proto);
        let cfg = format!(
            "version: 1
clusters:
  - name: backend
{protocol}    endpoints:
      - {{ address: \"{a}\" }}
      - {{ address: \"{b}\", health_check: {{ host: b.health.internal }} }}
      - {{ address: \"{c}\", health_check: {{ port: {port} }} }}
    health_check: {{ http: {{ path: /healthz, host: health.internal }}, interval: 50ms }}
",
            a = a.addr,
            b = b.addr,
            c = c.addr,
            port = c_admin.addr.port(),
        );
        let lg = legate().config(&cfg).start();
        for (what, seen) in [("a", &plain), ("b", &named), ("c's admin port", &admin)] {
            eventually(WAIT, &format!("two checks on {what}"), || async {
                (seen.lock().unwrap().len() >= 2).then_some(())
            })
            .await;
        }
        let plain = plain.lock().unwrap().clone();
        assert!(plain.iter().all(|h| h == "health.internal"), "{plain:?}");
        let named = named.lock().unwrap().clone();
        assert!(named.iter().all(|h| h == "b.health.internal"), "{named:?}");
        let admin = admin.lock().unwrap().clone();
        assert!(admin.iter().all(|h| h == "health.internal"), "{admin:?}");
        let traffic = traffic.lock().unwrap().clone();
        assert!(traffic.is_empty(), "c's own port got checks: {traffic:?}");
        assert_eq!(lg.stat(&stat("membership_healthy", "backend")).await, Some(3.0));
    }
);

each_proto!(
    /// An endpoint file's entry takes its own `health_check` too: its `port` takes
    /// the checks to the endpoint's health port (which fails them while its traffic
    /// port would pass them), and a changed one in the file moves them (a new port
    /// and Host). (The file refused `health_check`; checks went to the traffic port.)
    async fn an_endpoint_file_entry_has_its_own_health_check(proto) {
        let (traffic_checks, admin_checks) = (Arc::default(), Arc::default());
        // The traffic port passes any check it gets; the health port fails them.
        let traffic = host_recording(&traffic_checks).await;
        let sick = health_checked("sick-admin", &Arc::new(AtomicBool::new(false))).await;
        let admin = host_recording(&admin_checks).await;
        let dir = TempDir::new();
        let path = dir.path().join("endpoints.yaml");
        let write = |own: String| {
            let body = format!(
                "endpoints:\n  - address: \"{}\"\n    health_check: {own}\n",
                traffic.addr
            );
            std::fs::rename(dir.write("endpoints.yaml.tmp", &body), &path).unwrap();
        };
        write(format!("{{ port: {} }}", sick.addr.port()));
        let lg = legate()
            .config(&file_discovery_config(
                &path,
                &format!(
                    "{}    health_check: {{ http: {{ path: /healthz }}, interval: 30ms }}\n    \
                     panic_threshold: 0%\n",
                    cluster_protocol(proto)
                ),
            ))
            .start();
        let healthy = stat("membership_healthy", "backend");
        until_stat(&lg, &healthy, 0.0).await;
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/work").send().await;
        assert_eq!(r.status, 503);
        assert_eq!(r.text(), "no_healthy_upstream\n");

        // The file moves its checks to a health port that passes them, under a
        // Host of its own: back in.
        write(format!(
            "{{ host: traffic.health.internal, port: {} }}",
            admin.addr.port()
        ));
        until_stat(&lg, &stat("discovery_update_success", "backend"), 1.0).await;
        until_stat(&lg, &healthy, 1.0).await;
        assert_eq!(c.get("/work").send().await.status, 200);
        let admin_checks = admin_checks.lock().unwrap().clone();
        assert!(!admin_checks.is_empty());
        assert!(
            admin_checks.iter().all(|h| h == "traffic.health.internal"),
            "{admin_checks:?}"
        );
        let traffic_checks = traffic_checks.lock().unwrap().clone();
        assert!(traffic_checks.is_empty(), "the traffic port got checks: {traffic_checks:?}");
    }
);

each_proto!(
    async fn unreachable_endpoint_fails_after_the_threshold(proto) {
        let a = upstream().name("a").start().await;
        let dead = closed_port_addr();
        let lg = legate()
            .config(&simple_config_with(
                &[a.addr, dead],
                "",
                "    health_check:
      http: { path: /, expected_statuses: [\"200-299\"] }
      interval: 50ms
      unhealthy_threshold: 2
",
            ))
            .start();
        // The first check decides at once: the dead endpoint is out.
        until_stat(&lg, &stat("membership_healthy", "backend"), 1.0).await;
        let mut c = client(proto, lg.addr("web")).await;
        let seen = spread(&mut c, "/work", 10).await;
        assert_eq!(seen.get("a"), Some(&10), "{seen:?}");
        let h = endpoint_health(&lg, dead).await;
        assert!(
            h["last_health_check_failure"]
                .as_str()
                .is_some_and(|f| f.contains("connect")),
            "{h}"
        );
        lg.assert_stat_with(
            &stat("health_check_network_failure", "backend"),
            |v| v >= 1.0,
            ">= 1",
        )
        .await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_checks_send_and_expect_bytes() {
    let echo = tcp_echo_server().await;
    let other = tcp_echo_server().await;
    let cfg = format!(
        "version: 1
listeners:
  - name: db
    address: 127.0.0.1:0
    tcp: {{ cluster: echo }}
clusters:
  - name: echo
    endpoints: [{{ address: \"{echo}\" }}]
    health_check:
      tcp:
        send: {{ hex: \"50494e470d0a\" }}
        expect: {{ text: \"PING\" }}
      interval: 50ms
      timeout: 500ms
      unhealthy_threshold: 1
      healthy_threshold: 1
  - name: wrong
    endpoints: [{{ address: \"{other}\" }}]
    health_check:
      tcp:
        send: {{ text: \"PING\" }}
        expect: {{ text: \"PONG\" }}
      interval: 50ms
      timeout: 200ms
  - name: connect-only
    endpoints: [{{ address: \"{other}\" }}]
    health_check:
      tcp: {{}}
      interval: 50ms
      unhealthy_threshold: 1
",
        echo = echo.addr,
        other = other.addr
    );
    let lg = legate().config(&cfg).start();
    lg.assert_stat_with(&stat("health_check_success", "echo"), |v| v >= 2.0, ">= 2")
        .await;
    assert_eq!(
        lg.stat(&stat("membership_healthy", "echo")).await,
        Some(1.0)
    );
    assert!(echo.bytes.get() >= 12, "the checks sent PING\\r\\n");
    // The echo of PING never contains PONG: the check times out waiting for it.
    until_stat(&lg, &stat("membership_healthy", "wrong"), 0.0).await;
    lg.assert_stat_with(
        &stat("health_check_success", "connect-only"),
        |v| v >= 1.0,
        ">= 1",
    )
    .await;
    assert_eq!(
        lg.stat(&stat("membership_healthy", "connect-only")).await,
        Some(1.0)
    );

    // The server goes away: connects are refused, the endpoint is out.
    other.stop().await;
    until_stat(&lg, &stat("membership_healthy", "connect-only"), 0.0).await;
    assert_eq!(
        lg.stat(&stat("membership_healthy", "echo")).await,
        Some(1.0)
    );
}

each_proto!(
    async fn outlier_detection_ejects_a_5xx_endpoint_and_returns_it(proto) {
        let failing = Arc::new(AtomicBool::new(true));
        let good = upstream().name("good").start().await;
        let flag = failing.clone();
        let bad = upstream()
            .name("bad")
            .handler(move |req| {
                let fail = flag.load(Ordering::SeqCst);
                async move {
                    if fail {
                        text(500, "broken\n")
                    } else {
                        echo(req).await
                    }
                }
            })
            .start()
            .await;
        let lg = legate()
            .config(&simple_config_with(
                &[good.addr, bad.addr],
                "",
                "    outlier_detection:
      consecutive_5xx: 3
      interval: 50ms
      base_ejection_time: 2s
",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // Round robin: the bad endpoint gets every other request until ejected.
        let before = spread(&mut c, "/work", 6).await;
        assert_eq!(before.get("status 500"), Some(&3), "{before:?}");
        lg.assert_stat(&stat("outlier_detection_ejections_consecutive_5xx", "backend"), 1.0)
            .await;
        assert_eq!(
            lg.stat(&stat("outlier_detection_ejections_active", "backend")).await,
            Some(1.0)
        );
        let h = endpoint_health(&lg, bad.addr).await;
        assert_eq!(h["status"], "unhealthy", "{h}");
        assert_eq!(h["outlier"]["ejected"], true, "{h}");
        assert_eq!(h["outlier"]["last_ejection_reason"], "consecutive_5xx", "{h}");
        let requests_to_bad = bad.requests.get();
        let during = spread(&mut c, "/work", 20).await;
        assert_eq!(during.get("good"), Some(&20), "{during:?}");
        assert_eq!(bad.requests.get(), requests_to_bad, "an ejected endpoint got requests");

        // It recovers; its ejection time ends and it is back in rotation.
        failing.store(false, Ordering::SeqCst);
        until_stat(&lg, &stat("outlier_detection_ejections_active", "backend"), 0.0).await;
        let after = spread(&mut c, "/work", 10).await;
        assert_eq!((after.get("good"), after.get("bad")), (Some(&5), Some(&5)), "{after:?}");
        assert_eq!(
            lg.stat(&stat("outlier_detection_ejections_total", "backend")).await,
            Some(1.0)
        );
    }
);

each_proto!(
    async fn connect_failures_eject_as_gateway_failures(proto) {
        let good = upstream().name("good").start().await;
        let dead = closed_port_addr();
        let lg = legate()
            .config(&simple_config_with(
                &[good.addr, dead],
                "            retry: { retry_on: [connect-failure], backoff_base: 1ms }\n",
                "    outlier_detection: { consecutive_gateway_failure: 2, base_ejection_time: 1h }\n",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // Every request succeeds: the connect failures are retried on the good one.
        let seen = spread(&mut c, "/work", 20).await;
        assert_eq!(seen.get("good"), Some(&20), "{seen:?}");
        lg.assert_stat(
            &stat("outlier_detection_ejections_consecutive_gateway_failure", "backend"),
            1.0,
        )
        .await;
        // Once ejected, the dead endpoint is not tried any more.
        lg.assert_stat(&stat("upstream_cx_connect_fail", "backend"), 2.0).await;
        assert_eq!(lg.stat(&stat("upstream_rq_retry", "backend")).await, Some(2.0));
    }
);

each_proto!(
    async fn panic_mode_uses_every_endpoint(proto) {
        let oks: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(true))).collect();
        let ups = [
            health_checked("a", &oks[0]).await,
            health_checked("b", &oks[1]).await,
            health_checked("c", &oks[2]).await,
        ];
        let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
        let hc = "    health_check: { http: { path: /healthz }, interval: 50ms }\n";
        let lg = legate()
            .config(&simple_config_with(&addrs, "", hc))
            .start();
        let strict = legate()
            .config(&simple_config_with(
                &addrs,
                "",
                &format!("{hc}    panic_threshold: 0%\n"),
            ))
            .start();
        oks[0].store(false, Ordering::SeqCst);
        oks[1].store(false, Ordering::SeqCst);
        let healthy = stat("membership_healthy", "backend");
        until_stat(&lg, &healthy, 1.0).await;
        until_stat(&strict, &healthy, 1.0).await;

        // One of three available is below 50%: panic, all three are used.
        let mut c = client(proto, lg.addr("web")).await;
        let seen = spread(&mut c, "/work", 30).await;
        for name in ["a", "b", "c"] {
            assert_eq!(seen.get(name), Some(&10), "{seen:?}");
        }
        lg.assert_stat_with(&stat("lb_healthy_panic", "backend"), |v| v >= 30.0, ">= 30")
            .await;

        // Without panic mode, only the healthy one.
        let mut s = client(proto, strict.addr("web")).await;
        let seen = spread(&mut s, "/work", 10).await;
        assert_eq!(seen.get("c"), Some(&10), "{seen:?}");
        assert_eq!(strict.stat(&stat("lb_healthy_panic", "backend")).await, Some(0.0));

        // None healthy at all: panic mode still serves, strict mode refuses.
        oks[2].store(false, Ordering::SeqCst);
        until_stat(&lg, &healthy, 0.0).await;
        until_stat(&strict, &healthy, 0.0).await;
        assert_eq!(c.get("/").send().await.status, 200);
        let none_healthy = stat("upstream_cx_none_healthy", "backend");
        assert_eq!(strict.stat(&none_healthy).await, Some(0.0));
        let attempts = strict.stat(&stat("upstream_rq_total", "backend")).await;
        for _ in 0..2 {
            let r = s.get("/").send().await;
            assert_eq!(r.status, 503);
            assert_eq!(r.text(), "no_healthy_upstream\n");
        }
        // Counted, as Envoy's `upstream_cx_none_healthy` (they counted in no
        // cluster series), and no attempt was made.
        strict.assert_stat(&none_healthy, 2.0).await;
        assert_eq!(strict.stat(&stat("upstream_rq_total", "backend")).await, attempts);
        assert_eq!(lg.stat(&none_healthy).await, Some(0.0), "panic mode picked one");
    }
);

each_proto!(
    async fn max_requests_overflow_is_503_overloaded(proto) {
        let release = Arc::new(AtomicBool::new(false));
        let up = upstream().hold_until(&release).start().await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                "",
                "    circuit_breakers: { max_requests: 1 }\n",
            ))
            .start();
        let addr = lg.addr("web");
        let first = tokio::spawn(async move { client(proto, addr).await.get("/slow").send().await });
        eventually(WAIT, "the first request upstream", || async {
            (up.in_flight.get() == 1).then_some(())
        })
        .await;
        // The breaker's gauges say it is open (Envoy's
        // circuit_breakers.default.rq_open and remaining_rq).
        let breaker = |g: &str| format!("legate_cluster_circuit_breakers_{g}{{cluster=\"backend\"}}");
        lg.assert_stat(&breaker("rq_open"), 1.0).await;
        lg.assert_stat(&breaker("remaining_rq"), 0.0).await;
        lg.assert_stat(&breaker("cx_open"), 0.0).await;
        lg.assert_stat(&breaker("remaining_retries"), 3.0).await;
        let mut c = client(proto, addr).await;
        let r = c.get("/second").send().await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-legate-overloaded"), Some("true"));
        assert_eq!(r.text(), "overloaded\n");
        release.store(true, Ordering::SeqCst);
        assert_eq!(first.await.unwrap().status, 200);
        lg.assert_stat(&stat("upstream_rq_pending_overflow", "backend"), 1.0)
            .await;
        assert_eq!(up.requests.get(), 1);
        // The slot is free again.
        lg.assert_stat(&breaker("rq_open"), 0.0).await;
        lg.assert_stat(&breaker("remaining_rq"), 1.0).await;
        assert_eq!(c.get("/third").send().await.status, 200);
    }
);

/// An HTTP/1.1 cluster with `cluster_extra` (its breakers) over an upstream that
/// holds requests until `release`, and a first request held there: the
/// connection it took is busy.
async fn one_connection_held(
    cluster_extra: &str,
) -> (
    Arc<AtomicBool>,
    UpstreamHandle,
    LegateHandle,
    tokio::task::JoinHandle<Resp>,
) {
    let release = Arc::new(AtomicBool::new(false));
    let up = upstream().hold_until(&release).start().await;
    let lg = legate()
        .config(&simple_config_with(&[up.addr], "", cluster_extra))
        .start();
    let addr = lg.addr("web");
    let first =
        tokio::spawn(async move { client(Proto::H1, addr).await.get("/slow").send().await });
    eventually(WAIT, "the first request upstream", || async {
        (up.in_flight.get() == 1).then_some(())
    })
    .await;
    (release, up, lg, first)
}

/// Over `max_connections`, an HTTP/1.1 attempt waits as a pending request for
/// a connection to come free, as in Envoy, up to `max_pending_requests`; past
/// that it gets 503. (It got 503 at once: a short burst over the limit failed
/// although the connections were about to be free.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_queues_http1_attempts_up_to_max_pending_requests() {
    let (release, up, lg, first) = one_connection_held("    protocol: http1\n    circuit_breakers: { max_connections: 1, max_pending_requests: 1 }\n").await;
    let addr = lg.addr("web");
    // The one connection is busy with an HTTP/1.1 request: the second waits.
    let second =
        tokio::spawn(async move { client(Proto::H1, addr).await.get("/second").send().await });
    lg.assert_stat(&stat("upstream_rq_pending_active", "backend"), 1.0)
        .await;
    lg.assert_stat(&stat("upstream_cx_overflow", "backend"), 1.0)
        .await;
    let breaker = |g: &str| format!("legate_cluster_circuit_breakers_{g}{{cluster=\"backend\"}}");
    lg.assert_stat(&breaker("cx_open"), 1.0).await;
    lg.assert_stat(&breaker("rq_pending_open"), 1.0).await;
    // The pending queue is full: the third is refused.
    let mut c = client(Proto::H1, addr).await;
    let r = c.get("/third").send().await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-legate-overloaded"), Some("true"));
    lg.assert_stat(&stat("upstream_rq_pending_overflow", "backend"), 1.0)
        .await;
    // Over max_connections too, as Envoy counts it.
    lg.assert_stat(&stat("upstream_cx_overflow", "backend"), 2.0)
        .await;
    release.store(true, Ordering::SeqCst);
    assert_eq!(first.await.unwrap().status, 200);
    // The second took the first's connection when it went back to the pool.
    assert_eq!(second.await.unwrap().status, 200);
    assert_eq!(up.connections.get(), 1);
    assert_eq!(up.requests.get(), 2);
    // Once each: the second asked again after it waited, uncounted.
    lg.assert_stat(&stat("upstream_cx_overflow", "backend"), 2.0)
        .await;
    lg.assert_stat(&stat("upstream_rq_pending_active", "backend"), 0.0)
        .await;
    // The refused attempt was never made: no upstream attempt, on the cluster
    // or the endpoint, as Envoy's.
    let ep_total = format!(
        "legate_endpoint_rq_total{{cluster=\"backend\",endpoint=\"{}\"}}",
        up.addr
    );
    lg.assert_stat(&stat("upstream_rq_total", "backend"), 2.0)
        .await;
    lg.assert_stat(&ep_total, 2.0).await;
    // The pooled connection is reused: no new connection, no overflow.
    assert_eq!(c.get("/fourth").send().await.status, 200);
    assert_eq!(up.connections.get(), 1);
    lg.assert_stat(&stat("upstream_cx_overflow", "backend"), 2.0)
        .await;
}

/// Three attempts wait for the one connection: each takes it in turn as the
/// previous response ends (each wake-up goes to one waiter; the pool hands the
/// connection on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_attempts_take_the_connection_in_turn() {
    let (release, up, lg, first) =
        one_connection_held("    protocol: http1\n    circuit_breakers: { max_connections: 1 }\n")
            .await;
    let addr = lg.addr("web");
    let waiting: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(async move {
                client(Proto::H1, addr)
                    .await
                    .get(&format!("/w{i}"))
                    .send()
                    .await
            })
        })
        .collect();
    lg.assert_stat(&stat("upstream_rq_pending_active", "backend"), 3.0)
        .await;
    release.store(true, Ordering::SeqCst);
    assert_eq!(first.await.unwrap().status, 200);
    for w in waiting {
        assert_eq!(w.await.unwrap().status, 200);
    }
    assert_eq!(up.connections.get(), 1);
    assert_eq!(up.requests.get(), 4);
    lg.assert_stat(&stat("upstream_rq_pending_active", "backend"), 0.0)
        .await;
}

/// A waiting attempt whose connection closes instead of going back to the
/// pool opens its own: the closed one's slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_attempt_opens_a_connection_when_the_busy_one_closes() {
    let (release, up, lg, first) = one_connection_held("    protocol: http1\n    max_idle_per_endpoint: 0\n    circuit_breakers: { max_connections: 1 }\n").await;
    let addr = lg.addr("web");
    let second =
        tokio::spawn(async move { client(Proto::H1, addr).await.get("/second").send().await });
    lg.assert_stat(&stat("upstream_rq_pending_active", "backend"), 1.0)
        .await;
    release.store(true, Ordering::SeqCst);
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.await.unwrap().status, 200);
    // No pooling: the second had a connection of its own, opened once the
    // first one closed.
    assert_eq!(up.connections.get(), 2);
    lg.assert_stat(&stat("upstream_cx_overflow", "backend"), 1.0)
        .await;
}

each_proto!(
    async fn retry_overflow_passes_the_answer_through(proto) {
        let up = upstream().fail_first(1, 503).start().await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                "            retry: { retry_on: [5xx], backoff_base: 1ms }\n",
                "    circuit_breakers: { max_retries: 0 }\n",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 503, "not retried: the upstream's answer");
        assert_eq!(r.header("x-legate-overloaded"), None);
        lg.assert_stat(&stat("upstream_rq_retry_overflow", "backend"), 1.0)
            .await;
        assert_eq!(lg.stat(&stat("upstream_rq_retry", "backend")).await, Some(0.0));
        assert_eq!(up.requests.get(), 1);
    }
);

each_proto!(
    async fn killing_one_of_three_under_load_keeps_traffic_flowing(proto) {
        let oks: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::new(AtomicBool::new(true))).collect();
        let ups = [
            health_checked("a", &oks[0]).await,
            health_checked("b", &oks[1]).await,
            health_checked("c", &oks[2]).await,
        ];
        let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
        let lg = legate()
            .concurrency(2)
            .config(&simple_config_with(
                &addrs,
                "            retry:
              retry_on: [5xx, reset, connect-failure]
              num_retries: 2
              backoff_base: 1ms
",
                &format!(
                    "{}    health_check: {{ http: {{ path: /healthz }}, interval: 100ms, timeout: 500ms }}
    outlier_detection: {{ consecutive_gateway_failure: 2, interval: 100ms, base_ejection_time: 30s, max_ejection_percent: 34% }}
",
                    cluster_protocol(proto)
                ),
            ))
            .start();
        let addr = lg.addr("web");
        const CLIENTS: usize = 8;
        const PER_CLIENT: u64 = 400;
        let ok = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let (ok, done) = (ok.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = client(proto, addr).await;
                for i in 0..PER_CLIENT {
                    let good = matches!(c.get(&format!("/load/{i}")).try_send().await, Ok(r) if r.status == 200);
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else if c.is_closed() {
                        c = client(proto, addr).await;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let total = CLIENTS as u64 * PER_CLIENT;
        eventually(WAIT, "a third of the load", || async {
            (done.load(Ordering::Relaxed) >= total / 3).then_some(())
        })
        .await;
        // Kill b: its listener closes and its open connections are dropped.
        ups[1].stop().await;
        for t in tasks {
            t.await.unwrap();
        }
        let ok = ok.load(Ordering::Relaxed);
        let rate = ok as f64 / total as f64;
        let stats = parse_prometheus(&lg.stats().await);
        let of = |name: &str| stats.get(&stat(name, "backend")).copied().unwrap_or(-1.0);
        println!(
            "kill one of three ({proto:?}): {ok}/{total} succeeded = {:.3}%; retries {}, \
             retry overflow {}, ejections {}, health check failures {}",
            rate * 100.0,
            of("upstream_rq_retry"),
            of("upstream_rq_retry_overflow"),
            of("outlier_detection_ejections_total"),
            of("health_check_failure"),
        );
        assert!(rate >= 0.999, "success rate {rate} < 99.9% ({ok}/{total})");
        // The dead endpoint is out of rotation, by the checks and by ejection.
        until_stat(&lg, &stat("membership_healthy", "backend"), 2.0).await;
        let h = endpoint_health(&lg, ups[1].addr).await;
        assert_eq!(h["status"], "unhealthy", "{h}");
    }
);

/// An upstream whose `/healthz` answers 200 only to a check that came over TLS with
/// SNI `backend.internal` and HTTP version `version`, while `healthy` is true.
async fn tls_checked(
    server: TlsFiles,
    http1: bool,
    version: http::Version,
    healthy: &Arc<AtomicBool>,
) -> UpstreamHandle {
    let healthy = healthy.clone();
    let b = upstream().tls(server);
    let b = if http1 { b.http1() } else { b };
    b.route("/healthz", move |req| {
        let tls_ok = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|i| i.tls.as_ref())
            .is_some_and(|t| t.sni.as_deref() == Some("backend.internal"));
        let ok = tls_ok && req.version() == version && healthy.load(Ordering::SeqCst);
        async move {
            if ok {
                text(200, "ok\n")
            } else {
                text(418, "wrong check\n")
            }
        }
    })
    .start()
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_use_the_cluster_tls_and_protocol() {
    let ca = Ca::new("upstream CA");
    let server = ca.server(&["backend.internal"]);
    let (h2_ok, h1_ok) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(true)),
    );
    let h2 = tls_checked(server.clone(), false, http::Version::HTTP_2, &h2_ok).await;
    let h1 = tls_checked(server, true, http::Version::HTTP_11, &h1_ok).await;
    let cluster = |name: &str, addr: std::net::SocketAddr, protocol: &str| {
        format!(
            "  - name: {name}
    protocol: {protocol}
    tls: {{ sni: backend.internal, ca: {ca} }}
    endpoints: [{{ address: \"{addr}\" }}]
    health_check: {{ http: {{ path: /healthz }}, interval: 50ms, unhealthy_threshold: 1 }}
",
            ca = ca.cert_path.display()
        )
    };
    let cfg = format!(
        "version: 1\nclusters:\n{}{}",
        cluster("alpn", h2.addr, "auto"),
        cluster("plain", h1.addr, "http1")
    );
    let lg = legate().config(&cfg).start();
    for c in ["alpn", "plain"] {
        lg.assert_stat_with(&stat("health_check_success", c), |v| v >= 2.0, ">= 2")
            .await;
        assert_eq!(lg.stat(&stat("health_check_failure", c)).await, Some(0.0));
        assert_eq!(lg.stat(&stat("membership_healthy", c)).await, Some(1.0));
    }
    h2_ok.store(false, Ordering::SeqCst);
    until_stat(&lg, &stat("membership_healthy", "alpn"), 0.0).await;
    assert_eq!(
        endpoint_health(&lg, h2.addr).await["last_health_check_failure"],
        "HTTP status 418"
    );
    assert_eq!(
        lg.stat(&stat("membership_healthy", "plain")).await,
        Some(1.0)
    );
}

each_proto!(
    async fn success_rate_outlier_is_ejected(proto) {
        let good_a = upstream().name("a").start().await;
        let good_b = upstream().name("b").start().await;
        // Fails every other request: never 5 in a row, but a poor success rate.
        let n = Arc::new(AtomicU64::new(0));
        let bad = upstream()
            .name("bad")
            .handler(move |req| {
                let fail = n.fetch_add(1, Ordering::SeqCst).is_multiple_of(2);
                async move {
                    if fail {
                        text(500, "sometimes\n")
                    } else {
                        echo(req).await
                    }
                }
            })
            .start()
            .await;
        let lg = legate()
            .config(&simple_config_with(
                &[good_a.addr, good_b.addr, bad.addr],
                "",
                "    outlier_detection:
      interval: 300ms
      max_ejection_percent: 34%
      success_rate: { minimum_hosts: 3, request_volume: 10, stdev_factor: 1.0 }
",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let ejected = stat("outlier_detection_ejections_success_rate", "backend");
        // Traffic until an interval has seen enough of it (a poll with a deadline).
        let deadline = std::time::Instant::now() + WAIT;
        while lg.stat(&ejected).await != Some(1.0) {
            assert!(std::time::Instant::now() < deadline, "no success-rate ejection");
            spread(&mut c, "/work", 30).await;
        }
        assert_eq!(
            endpoint_health(&lg, bad.addr).await["outlier"]["last_ejection_reason"],
            "success_rate"
        );
        let seen = spread(&mut c, "/work", 20).await;
        assert_eq!(seen.get("bad"), None, "{seen:?}");
        assert_eq!(seen.get("status 500"), None, "{seen:?}");
        assert_eq!(
            lg.stat(&stat("outlier_detection_ejections_consecutive_5xx", "backend"))
                .await,
            Some(0.0)
        );
    }
);

each_proto!(
    async fn recovery_seen_by_health_checks_ends_an_ejection(proto) {
        let (health_ok, serve_ok) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(true)),
        );
        let good = upstream().name("good").start().await;
        let (h, s) = (health_ok.clone(), serve_ok.clone());
        let bad = upstream()
            .name("bad")
            .handler(move |req| {
                let ok = if req.uri().path() == "/healthz" {
                    h.load(Ordering::SeqCst)
                } else {
                    s.load(Ordering::SeqCst)
                };
                async move {
                    if ok {
                        echo(req).await
                    } else {
                        text(500, "broken\n")
                    }
                }
            })
            .start()
            .await;
        let lg = legate()
            .config(&simple_config_with(
                &[good.addr, bad.addr],
                "",
                "    health_check: { http: { path: /healthz }, interval: 50ms, healthy_threshold: 1 }
    outlier_detection: { consecutive_5xx: 2, base_ejection_time: 1h }
",
            ))
            .start();
        let healthy = stat("membership_healthy", "backend");
        let active = stat("outlier_detection_ejections_active", "backend");
        let mut c = client(proto, lg.addr("web")).await;
        serve_ok.store(false, Ordering::SeqCst);
        spread(&mut c, "/work", 4).await;
        lg.assert_stat(&active, 1.0).await;
        // The checks see it fail too, then recover: that ends the hour-long ejection.
        health_ok.store(false, Ordering::SeqCst);
        eventually(WAIT, "the failed health check", || async {
            (endpoint_health(&lg, bad.addr).await["failed_active_health_check"] == true)
                .then_some(())
        })
        .await;
        assert_eq!(lg.stat(&active).await, Some(1.0));
        serve_ok.store(true, Ordering::SeqCst);
        health_ok.store(true, Ordering::SeqCst);
        until_stat(&lg, &healthy, 2.0).await;
        assert_eq!(lg.stat(&active).await, Some(0.0));
        let seen = spread(&mut c, "/work", 10).await;
        assert_eq!((seen.get("good"), seen.get("bad")), (Some(&5), Some(&5)), "{seen:?}");
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_connect_failures_eject() {
    let echo = tcp_echo_server().await;
    let dead = closed_port_addr();
    let cfg = format!(
        "version: 1
listeners:
  - name: db
    address: 127.0.0.1:0
    tcp: {{ cluster: pg }}
clusters:
  - name: pg
    endpoints: [{{ address: \"{}\" }}, {{ address: \"{dead}\" }}]
    outlier_detection: {{ consecutive_gateway_failure: 2, base_ejection_time: 1h }}
",
        echo.addr
    );
    let lg = legate().config(&cfg).start();
    for i in 0..6 {
        let mut conn = RawConn::connect(lg.addr("db")).await;
        conn.write(b"ping").await;
        let got = conn.read_exact(4, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, b"ping", "connection {i}");
    }
    lg.assert_stat(
        &stat(
            "outlier_detection_ejections_consecutive_gateway_failure",
            "pg",
        ),
        1.0,
    )
    .await;
    // After the ejection the dead endpoint is not tried any more.
    lg.assert_stat(&stat("upstream_cx_connect_fail", "pg"), 2.0)
        .await;
    assert_eq!(endpoint_health(&lg, dead).await["outlier"]["ejected"], true);
}

// ---------------------------------------------------------------------------------
// Outlier-detection and in-flight bookkeeping: across discovery generations, on a
// route timeout, for streamed responses, and across a reload.

/// An upstream named `name` answering 503 while `failing` is true, else echoing.
async fn flaky(name: &str, failing: &Arc<AtomicBool>) -> UpstreamHandle {
    let failing = failing.clone();
    upstream()
        .name(name)
        .handler(move |req| {
            let fail = failing.load(Ordering::SeqCst);
            async move {
                if fail {
                    text(503, "failing\n")
                } else {
                    echo(req).await
                }
            }
        })
        .start()
        .await
}

/// Replaces the endpoint file atomically (write, then rename).
fn write_endpoints(dir: &TempDir, eps: &[(std::net::SocketAddr, u32)]) -> std::path::PathBuf {
    let mut body = String::from("endpoints:\n");
    for (a, w) in eps {
        body.push_str(&format!("  - {{ address: \"{a}\", weight: {w} }}\n"));
    }
    let tmp = dir.write("endpoints.yaml.tmp", &body);
    let path = dir.path().join("endpoints.yaml");
    std::fs::rename(&tmp, &path).unwrap();
    path
}

each_proto!(
    async fn dropped_or_replaced_ejected_endpoints_free_their_ejection_slot(proto) {
        let (b_fails, c_fails) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(false)),
        );
        let a = upstream().name("a").start().await;
        let b = flaky("b", &b_fails).await;
        let c = flaky("c", &c_fails).await;
        let dir = TempDir::new();
        let path = write_endpoints(&dir, &[(a.addr, 1), (b.addr, 1), (c.addr, 1)]);
        // One ejection at a time (34% of 3 and of 2 both round to "at least one"),
        // and no interval tick during the test: only the generations act.
        let lg = legate()
            .config(&file_discovery_config(
                &path,
                "    outlier_detection: { consecutive_gateway_failure: 2, interval: 1h, \
                 base_ejection_time: 1h, max_ejection_percent: 34% }\n",
            ))
            .start();
        let active = stat("outlier_detection_ejections_active", "backend");
        let ejections = stat("outlier_detection_ejections_consecutive_gateway_failure", "backend");
        let overflow = stat("outlier_detection_ejections_overflow", "backend");
        let healthy = stat("membership_healthy", "backend");
        let mut cl = client(proto, lg.addr("web")).await;
        spread(&mut cl, "/work", 6).await;
        lg.assert_stat(&ejections, 1.0).await;
        assert_eq!(lg.stat(&active).await, Some(1.0));
        assert_eq!(lg.stat(&healthy).await, Some(2.0));

        // b's weight changes: a new endpoint that starts in. The ejected one is
        // gone, and so is its ejection.
        write_endpoints(&dir, &[(a.addr, 1), (b.addr, 2), (c.addr, 1)]);
        until_stat(&lg, &stat("discovery_update_success", "backend"), 1.0).await;
        assert_eq!(lg.stat(&active).await, Some(0.0));
        assert_eq!(lg.stat(&healthy).await, Some(3.0));
        assert_eq!(endpoint_health(&lg, b.addr).await["outlier"]["ejected"], false);
        // Still failing: ejected again, not refused as an overflow.
        spread(&mut cl, "/work", 8).await;
        lg.assert_stat(&ejections, 2.0).await;
        assert_eq!(lg.stat(&active).await, Some(1.0));
        assert_eq!(lg.stat(&overflow).await, Some(0.0));

        // The file drops the ejected b: its slot goes with it.
        write_endpoints(&dir, &[(a.addr, 1), (c.addr, 1)]);
        until_stat(&lg, &stat("membership_total", "backend"), 2.0).await;
        assert_eq!(lg.stat(&active).await, Some(0.0));
        assert_eq!(lg.stat(&healthy).await, Some(2.0));
        // So c, failing now, can be ejected.
        c_fails.store(true, Ordering::SeqCst);
        spread(&mut cl, "/work", 4).await;
        lg.assert_stat(&ejections, 3.0).await;
        assert_eq!(lg.stat(&active).await, Some(1.0));
        assert_eq!(lg.stat(&overflow).await, Some(0.0));
        assert_eq!(endpoint_health(&lg, c.addr).await["outlier"]["ejected"], true);
        let seen = spread(&mut cl, "/work", 4).await;
        assert_eq!(seen.get("a"), Some(&4), "{seen:?}");
    }
);

each_proto!(
    async fn an_attempt_on_an_old_generation_ejects_nothing_discovery_dropped(proto) {
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        // b answers 503 once told to: after discovery has dropped it.
        let b = upstream()
            .name("b")
            .handler(move |_req| {
                let r = r.clone();
                async move {
                    while !r.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    text(503, "late\n")
                }
            })
            .start()
            .await;
        let a = upstream().name("a").start().await;
        let c_fails = Arc::new(AtomicBool::new(false));
        let c = flaky("c", &c_fails).await;
        let dir = TempDir::new();
        let path = write_endpoints(&dir, &[(b.addr, 1)]);
        let lg = legate()
            .config(&file_discovery_config(
                &path,
                "    outlier_detection: { consecutive_gateway_failure: 1, interval: 1h, \
                 base_ejection_time: 1h, max_ejection_percent: 34% }\n",
            ))
            .start();
        let addr = lg.addr("web");
        let slow = tokio::spawn(async move { client(proto, addr).await.get("/slow").send().await });
        eventually(WAIT, "the request at b", || async {
            (b.requests.get() == 1).then_some(())
        })
        .await;
        write_endpoints(&dir, &[(a.addr, 1), (c.addr, 1)]);
        until_stat(&lg, &stat("membership_total", "backend"), 2.0).await;
        // b's 503 reaches an attempt of the old generation: b is not in the cluster
        // any more, so nothing is ejected and no gauge moves.
        release.store(true, Ordering::SeqCst);
        assert_eq!(slow.await.unwrap().status, 503);
        let active = stat("outlier_detection_ejections_active", "backend");
        assert_eq!(lg.stat(&active).await, Some(0.0));
        assert_eq!(lg.stat(&stat("membership_healthy", "backend")).await, Some(2.0));
        assert_eq!(
            lg.stat(&stat("outlier_detection_ejections_total", "backend")).await,
            Some(0.0)
        );
        // The one ejection allowed is there for c when it fails.
        c_fails.store(true, Ordering::SeqCst);
        let mut cl = client(proto, addr).await;
        spread(&mut cl, "/work", 2).await;
        lg.assert_stat(
            &stat("outlier_detection_ejections_consecutive_gateway_failure", "backend"),
            1.0,
        )
        .await;
        assert_eq!(lg.stat(&active).await, Some(1.0));
        assert_eq!(
            lg.stat(&stat("outlier_detection_ejections_overflow", "backend")).await,
            Some(0.0)
        );
        assert_eq!(endpoint_health(&lg, c.addr).await["outlier"]["ejected"], true);
    }
);

each_proto!(
    async fn a_route_timeout_counts_against_the_endpoint(proto) {
        let a = upstream().name("a").start().await;
        let slow = upstream().name("slow").delay(Duration::from_secs(5)).start().await;
        let lg = legate()
            .config(&simple_config_with(
                &[a.addr, slow.addr],
                "            timeout: 1s\n",
                "    outlier_detection: { consecutive_gateway_failure: 2, base_ejection_time: 1h }\n",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let seen = spread(&mut c, "/work", 4).await;
        assert_eq!(
            (seen.get("a"), seen.get("status 504")),
            (Some(&2), Some(&2)),
            "{seen:?}"
        );
        lg.assert_stat(&stat("upstream_rq_timeout", "backend"), 2.0).await;
        let errors = format!(
            "legate_endpoint_rq_error{{cluster=\"backend\",endpoint=\"{}\"}}",
            slow.addr
        );
        assert_eq!(lg.stat(&errors).await, Some(2.0));
        // Two timeouts in a row are two gateway failures: slow is ejected.
        lg.assert_stat(
            &stat("outlier_detection_ejections_consecutive_gateway_failure", "backend"),
            1.0,
        )
        .await;
        assert_eq!(endpoint_health(&lg, slow.addr).await["outlier"]["ejected"], true);
        assert_eq!(lg.stat(&stat("upstream_rq_active", "backend")).await, Some(0.0));
        let after = spread(&mut c, "/work", 6).await;
        assert_eq!(after.get("a"), Some(&6), "{after:?}");
        assert_eq!(slow.requests.get(), 2);
    }
);

/// Sends `GET path` on a new connection and returns as soon as the response head is
/// in (the test client collects whole bodies), with what keeps the connection up.
async fn response_head(
    proto: Proto,
    addr: std::net::SocketAddr,
    path: &str,
) -> (Response<Incoming>, Box<dyn std::any::Any + Send>) {
    use http_body_util::Empty;
    use hyper::client::conn::{http1, http2};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    match proto {
        Proto::H1 => {
            let (mut s, conn) = http1::handshake(io).await.unwrap();
            let task = tokio::spawn(conn);
            let req = Request::get(path)
                .header("host", addr.to_string())
                .body(Empty::<Bytes>::new())
                .unwrap();
            (
                s.send_request(req).await.unwrap(),
                Box::new((s, AbortOnDrop(task))),
            )
        }
        Proto::H2 => {
            let (mut s, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .unwrap();
            let task = tokio::spawn(conn);
            let req = Request::get(format!("http://{addr}{path}"))
                .version(http::Version::HTTP_2)
                .body(Empty::<Bytes>::new())
                .unwrap();
            (
                s.send_request(req).await.unwrap(),
                Box::new((s, AbortOnDrop(task))),
            )
        }
    }
}

/// Ends a connection task (closing the connection) when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

each_proto!(
    async fn a_streamed_response_is_in_flight_until_its_body_ends(proto) {
        use futures_util::StreamExt;
        use http_body_util::{BodyExt, StreamBody};
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        // Head and a first chunk at once; the last chunk once released.
        let up = upstream()
            .route("/stream", move |_req| {
                let r = r.clone();
                async move {
                    let first = futures_util::stream::once(async {
                        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"first\n")))
                    });
                    let last = futures_util::stream::once(async move {
                        while !r.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Ok(hyper::body::Frame::data(Bytes::from_static(b"last\n")))
                    });
                    Response::new(BodyExt::boxed(StreamBody::new(first.chain(last))))
                }
            })
            .start()
            .await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                "",
                "    circuit_breakers: { max_requests: 1 }\n",
            ))
            .start();
        let addr = lg.addr("web");
        let active = stat("upstream_rq_active", "backend");
        let ep_active = format!(
            "legate_endpoint_rq_active{{cluster=\"backend\",endpoint=\"{}\"}}",
            up.addr
        );

        let (resp, conn) = response_head(proto, addr, "/stream").await;
        assert_eq!(resp.status(), 200);
        // The head is through, the body is not: the attempt is still in flight.
        assert_eq!(lg.stat(&active).await, Some(1.0));
        assert_eq!(lg.stat(&ep_active).await, Some(1.0));
        // ... and holds the one request max_requests allows.
        let mut c = client(proto, addr).await;
        let r = c.get("/other").send().await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-legate-overloaded"), Some("true"));
        lg.assert_stat(&stat("upstream_rq_pending_overflow", "backend"), 1.0)
            .await;
        // The body ends: so does the attempt.
        release.store(true, Ordering::SeqCst);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "first\nlast\n");
        until_stat(&lg, &active, 0.0).await;
        assert_eq!(lg.stat(&ep_active).await, Some(0.0));
        assert_eq!(c.get("/other").send().await.status, 200);
        drop(conn);

        // A client that goes away mid-body ends it too.
        release.store(false, Ordering::SeqCst);
        let (resp, conn) = response_head(proto, addr, "/stream").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(lg.stat(&active).await, Some(1.0));
        drop((resp, conn));
        until_stat(&lg, &active, 0.0).await;
        assert_eq!(lg.stat(&ep_active).await, Some(0.0));
        assert_eq!(c.get("/other").send().await.status, 200);
        release.store(true, Ordering::SeqCst);
    }
);

each_proto!(
    async fn a_reload_keeps_the_health_check_thresholds(proto) {
        let (a_ok, b_ok) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(true)),
        );
        let a = health_checked("a", &a_ok).await;
        let b = health_checked("b", &b_ok).await;
        // b comes back only after 1000 passed checks in a row: not within the test.
        let config = |more: &str| {
            let yaml = simple_config_with(
                &[a.addr, b.addr],
                "",
                &format!(
                    "{}    health_check: {{ http: {{ path: /healthz }}, interval: 50ms, \
                     healthy_threshold: 1000 }}\n{more}",
                    cluster_protocol(proto)
                ),
            );
            yaml
        };
        let lg = legate().config(&config("")).from_file().start();
        let web = lg.addr("web");
        let stat_of = |series: String| {
            let lg = &lg;
            async move { lg.stat(&series).await }
        };
        let healthy = stat("membership_healthy", "backend");
        let checks = stat("health_check_success", "backend");

        // b says it is unhealthy: out at once; then it passes again, but too few
        // times to come back.
        b_ok.store(false, Ordering::SeqCst);
        eventually(WAIT, "b out", || async {
            (stat_of(healthy.clone()).await == Some(1.0)).then_some(())
        })
        .await;
        b_ok.store(true, Ordering::SeqCst);

        // A reload that changes the cluster set restarts every cluster's checks;
        // backend is kept, and so is b's run of passed checks and its threshold.
        let r = lg
            .reload_ok(&config(
                "  - name: other\n    endpoints: [{ address: \"127.0.0.1:9\" }]\n",
            ))
            .await;
        assert_eq!(r["clusters"]["kept"], json!(["backend"]), "{r}");
        let before = stat_of(checks.clone()).await.unwrap();
        eventually(WAIT, "checks after the reload", || async {
            (stat_of(checks.clone()).await.unwrap() >= before + 6.0).then_some(())
        })
        .await;
        assert_eq!(stat_of(healthy.clone()).await, Some(1.0));
        let mut c = client(proto, web).await;
        let seen = spread(&mut c, "/work", 6).await;
        assert_eq!(seen.get("a"), Some(&6), "{seen:?}");
    }
);

/// An HTTP/2 health check of an endpoint that speaks only HTTP/1.1 names
/// what went wrong below hyper's own `http2 error` (which was all
/// `/clusters` and the log said, whatever the cause).
#[tokio::test]
async fn h2_health_check_failures_say_why() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers whatever comes with an HTTP/1.1 400 and closes, as an
    // HTTP/1.1-only server does to the HTTP/2 preface.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    let lg = legate()
        .config(&format!(
            "version: 1
clusters:
  - name: backend
    protocol: h2
    endpoints: [{{ address: \"{addr}\" }}]
    health_check: {{ http: {{ path: / }}, interval: 50ms, unhealthy_threshold: 1 }}
"
        ))
        .start();
    until_stat(&lg, &stat("membership_healthy", "backend"), 0.0).await;
    let h = endpoint_health(&lg, addr).await;
    let failure = h["last_health_check_failure"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Either hyper read the 400 as a broken preface and Legate says why, or
    // (when the server closed before the preface was written) the write
    // failed, which the reason says too.
    let why = failure
        .strip_prefix("http2 error: ")
        .or_else(|| failure.strip_prefix("connection error: "))
        .unwrap_or_else(|| panic!("{h}"));
    assert!(why.len() > 5, "{h}");
}

/// A gRPC server's health service: `Check` answers `status` (1 SERVING, 2
/// NOT_SERVING) for the service `api`, and gRPC NOT_FOUND (5) for any other,
/// as grpc-go's health server does; records the `:authority` it was asked with.
async fn grpc_health_server(
    status: &Arc<AtomicU64>,
    seen: &Arc<Mutex<Vec<String>>>,
) -> UpstreamHandle {
    let (status, seen) = (status.clone(), seen.clone());
    upstream()
        .h2()
        .route(
            "/grpc.health.v1.Health/Check",
            move |req: Request<Incoming>| {
                let (status, seen) = (status.clone(), seen.clone());
                async move {
                    let authority = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    seen.lock().unwrap().push(authority);
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    // HealthCheckRequest { service: "api" }: 0x0a 3 "api".
                    let known = body.get(5..) == Some(&b"\x0a\x03api"[..]);
                    let mut trailers = http::HeaderMap::new();
                    let frames: Vec<Result<hyper::body::Frame<Bytes>, BoxError>> = if known {
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let msg = [0x08, status.load(Ordering::SeqCst) as u8];
                        vec![
                            Ok(hyper::body::Frame::data(grpc_frame(&msg))),
                            Ok(hyper::body::Frame::trailers(trailers)),
                        ]
                    } else {
                        trailers.insert("grpc-status", http::HeaderValue::from_static("5"));
                        trailers.insert(
                            "grpc-message",
                            http::HeaderValue::from_static("unknown service"),
                        );
                        vec![Ok(hyper::body::Frame::trailers(trailers))]
                    };
                    let mut r = Response::new(BodyExt::boxed(http_body_util::StreamBody::new(
                        futures_util::stream::iter(frames),
                    )));
                    r.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    r
                }
            },
        )
        .start()
        .await
}

/// `grpc` health checks (Envoy's `grpc_health_check`): an endpoint whose health
/// service answers NOT_SERVING for the configured service leaves rotation
/// after `unhealthy_threshold` checks and comes back when it serves again; an
/// unknown service is a failure naming the gRPC status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_follow_the_serving_status() {
    let status = Arc::new(AtomicU64::new(1));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let up = grpc_health_server(&status, &seen).await;
    let cfg = |service: &str| {
        format!(
            "version: 1
clusters:
  - name: backend
    protocol: h2
    endpoints: [{{ address: \"{}\" }}]
    health_check:
      grpc: {{ service_name: {service}, authority: health.internal }}
      interval: 30ms
      unhealthy_threshold: 2
      healthy_threshold: 1
",
            up.addr
        )
    };
    let lg = legate().config(&cfg("api")).start();
    let healthy = stat("membership_healthy", "backend");
    until_stat(&lg, &stat("health_check_success", "backend"), 2.0).await;
    assert_eq!(lg.stat(&healthy).await, Some(1.0));
    assert_eq!(seen.lock().unwrap()[0], "health.internal");
    status.store(2, Ordering::SeqCst);
    until_stat(&lg, &healthy, 0.0).await;
    let h = endpoint_health(&lg, up.addr).await;
    assert_eq!(
        h["last_health_check_failure"], "serving status NOT_SERVING",
        "{h}"
    );
    status.store(1, Ordering::SeqCst);
    until_stat(&lg, &healthy, 1.0).await;

    let lg = legate().config(&cfg("other")).start();
    until_stat(&lg, &healthy, 0.0).await;
    let h = endpoint_health(&lg, up.addr).await;
    assert_eq!(
        h["last_health_check_failure"], "gRPC status 5 (unknown service)",
        "{h}"
    );
}
