//! Process lifecycle and the admin API: graceful drain under load (by
//! `shutdown()` and by `POST /drain`), the drain timeout, and the admin endpoints
//! (`/ready`, `/stats`, `/clusters`, `/config_dump`, `/drain`,
//! `/healthcheck/fail`).

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use legate_tests::*;

/// `yaml` with `drain_timeout: 1h`: a drain that waits for the drain timeout
/// instead of ending when its connections do is then a hang, which the tests'
/// [`HANG_GUARD`] reports, not a slower stop.
fn with_long_drain_timeout(yaml: &str) -> String {
    assert!(yaml.starts_with("version: 1\n"), "{yaml}");
    yaml.replacen("version: 1\n", "version: 1\ndrain_timeout: 1h\n", 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_finishes_in_flight_requests() {
    let release = Arc::new(AtomicBool::new(false));
    let up = upstream().hold_until(&release).start().await;
    let lg = legate()
        .config(&with_long_drain_timeout(&simple_config(&[up.addr])))
        .concurrency(2)
        .start();
    let addr = lg.addr("web");

    let mut tasks = Vec::new();
    for i in 0..5 {
        let mut c = client(Proto::H1, addr).await;
        tasks.push(tokio::spawn(async move {
            c.post("/h1").body(format!("h1-{i}")).try_send().await
        }));
    }
    let h2 = client(Proto::H2, addr).await;
    for i in 0..5 {
        let mut c = h2.clone();
        tasks.push(tokio::spawn(async move {
            c.post("/h2").body(format!("h2-{i}")).try_send().await
        }));
    }
    eventually(
        Duration::from_secs(10),
        "10 requests in flight upstream",
        || async { (up.in_flight.get() == 10).then_some(()) },
    )
    .await;

    lg.shutdown();
    // Draining is visible on the admin API while requests finish.
    let (status, body) = lg.admin_get("/ready").await;
    assert_eq!((status, body.as_str()), (503, "DRAINING\n"));

    // A connection attempted during the drain is refused, not accepted by the
    // kernel into a backlog nobody serves (it hung until the process exited).
    let late = tokio::net::TcpStream::connect(addr).await;
    assert!(
        late.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a connection during the drain was not refused: {late:?}"
    );

    release.store(true, Ordering::SeqCst);
    for t in tasks {
        let r = t
            .await
            .unwrap()
            .expect("in-flight request failed during drain");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.echo().body.starts_with("h"));
    }
    // The drain ends when its requests and connections do (the drain timeout
    // is an hour away).
    tokio::time::timeout(HANG_GUARD, lg.shutdown_and_wait())
        .await
        .expect("the drain did not end with its requests: it waits for drain_timeout")
        .expect("clean stop");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener still accepting after shutdown"
    );
    assert_eq!(up.requests.get(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_idle_keepalive_connections() {
    let up = upstream().start().await;
    let lg = legate()
        .config(&with_long_drain_timeout(&simple_config(&[up.addr])))
        .start();
    let mut h1 = client(Proto::H1, lg.addr("web")).await;
    let mut h2 = client(Proto::H2, lg.addr("web")).await;
    assert_eq!(h1.get("/").send().await.status, 200);
    assert_eq!(h2.get("/").send().await.status, 200);
    // Idle connections do not hold the drain for drain_timeout (an hour here).
    tokio::time::timeout(HANG_GUARD, lg.shutdown_and_wait())
        .await
        .expect("idle keep-alive connections held the drain")
        .expect("clean stop");
    eventually(Duration::from_secs(2), "client connections closed", || {
        let closed = h1.is_closed() && h2.is_closed();
        async move { closed.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_close_does_not_hold_the_drain() {
    let up = upstream().start().await;
    let lg = legate()
        .config(&with_long_drain_timeout(&simple_config_with(
            &[up.addr],
            "            max_request_body: 1KiB\n",
            "",
        )))
        .start();
    // An early 413 to an HTTP/1.1 client that keeps its connection open and a
    // byte coming every 200ms: Legate's lingering close would last its whole
    // 30 s (the drain timeout is an hour here).
    let mut c = RawConn::connect(lg.addr("web")).await;
    c.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        .await;
    let head = c.read_head(Duration::from_secs(3)).await;
    assert_eq!(
        raw_status(&head),
        Some(413),
        "{}",
        String::from_utf8_lossy(&head)
    );
    lg.assert_stat(
        r#"legate_listener_lingering_closes_total{listener="web"}"#,
        1.0,
    )
    .await;
    // Still open, and counted as such.
    lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 1.0)
        .await;
    let trickle = tokio::spawn(async move {
        while c.try_write(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // It serves no more requests: the drain does not wait for it.
    lg.shutdown();
    lg.wait_stopped(HANG_GUARD)
        .await
        .expect("the drain waited for the lingering close");
    trickle.abort();
    assert_eq!(up.requests.get(), 0);
}

/// One upstream, `drain_timeout: 300ms`, the access log written to `log`.
fn drain_config(up: std::net::SocketAddr, log: &std::path::Path) -> String {
    simple_config(&[up]).replace(
        "version: 1\n",
        &format!(
            "version: 1\ndrain_timeout: 300ms\naccess_log: {{ path: {} }}\n",
            log.display()
        ),
    )
}

/// `drain_timeout` bounds a shutdown that waits for a request in flight; the
/// request is cut, its connection closed without a response (as Envoy's
/// drain ends it), and the access log says what the client got: nothing
/// (499, no bytes, cause `drain_timeout`). It logged a 503 nobody received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_the_shutdown() {
    // Held until the end: only a timeout ends the request (the route's is
    // 15s), and the access log below says which.
    let release = Arc::new(AtomicBool::new(false));
    let up = upstream().hold_until(&release).start().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let cfg = drain_config(up.addr, &log);
    let lg = legate().config(&cfg).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let req = tokio::spawn(async move { c.get("/slow").try_send().await });
    eventually(Duration::from_secs(3), "request in flight", || async {
        (up.in_flight.get() == 1).then_some(())
    })
    .await;
    // Held as `legate run` holds it: the cut request's line is written by the
    // shutdown itself (the log's writer thread), not when the state drops.
    let _shared = lg.shared();
    let t = Instant::now();
    tokio::time::timeout(HANG_GUARD, lg.shutdown_and_wait())
        .await
        .expect("drain_timeout not enforced: the shutdown waits for the held request")
        .expect("stop");
    let took = t.elapsed();
    // It did wait for the request, up to the drain timeout.
    assert!(took >= Duration::from_millis(250), "{took:?}");
    release.store(true, Ordering::SeqCst);
    // The cut request gets no response.
    let r = req.await.unwrap();
    assert!(r.is_err(), "{r:?}");
    // The proxy cut it, not the client: the access log says so, and that
    // nothing was sent.
    let line = std::fs::read_to_string(&log).unwrap();
    let v: Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["status"], 499, "{line}");
    assert_eq!(v["bytes_sent"], 0, "{line}");
    assert_eq!(v["cause"], "drain_timeout", "{line}");
    assert_eq!(v["path"], "/slow", "{line}");
}

/// A response still streaming when the drain timeout passes is cut by the
/// proxy: its line keeps the status sent and says `drain_timeout` (it was
/// logged as a response sent whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_mid_body_by_the_drain_timeout_is_logged_as_such() {
    let up = upstream()
        .route("/endless", |_req| async {
            use futures_util::StreamExt;
            let s = futures_util::stream::repeat(()).then(|()| async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"more")))
            });
            Response::new(http_body_util::BodyExt::boxed(
                http_body_util::StreamBody::new(s),
            ))
        })
        .start()
        .await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let cfg = drain_config(up.addr, &log);
    let lg = legate().config(&cfg).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    c.write(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let head = c.read_head(HANG_GUARD).await;
    assert_eq!(
        raw_status(&head),
        Some(200),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // The client reads on while the drain runs out.
    let reader = tokio::spawn(async move { c.read_until_close(HANG_GUARD).await.1 });
    let _shared = lg.shared();
    tokio::time::timeout(HANG_GUARD, lg.shutdown_and_wait())
        .await
        .expect("drain_timeout not enforced")
        .expect("stop");
    assert!(reader.await.unwrap(), "the cut connection stayed open");
    let line = std::fs::read_to_string(&log).unwrap();
    let v: Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["status"], 200, "{line}");
    assert_eq!(v["cause"], "drain_timeout", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_drain_stops_the_server() {
    let up = upstream().start().await;
    let lg = legate()
        .config(&with_long_drain_timeout(&simple_config(&[up.addr])))
        .start();
    let addr = lg.addr("web");
    let mut c = client(Proto::H1, addr).await;
    assert_eq!(c.get("/").send().await.status, 200);

    assert_eq!(lg.admin_get("/drain").await.0, 405);
    assert_eq!(lg.admin_get("/ready").await, (200, "LIVE\n".to_string()));
    let (status, _) = lg.admin_post("/drain").await;
    assert_eq!(status, 200);
    assert_eq!(lg.admin_get("/ready").await.0, 503);
    // A reload asked for meanwhile: 503 (the process is stopping), not 400.
    assert_eq!(lg.admin_post("/reload").await.0, 503);
    // With its idle keep-alive connection closed, not at the drain timeout.
    lg.wait_stopped(HANG_GUARD)
        .await
        .expect("server stops after POST /drain");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

each_proto!(
    /// `POST /healthcheck/fail` (Envoy's, for taking a process out of a load
    /// balancer before stopping it): `/ready` says 503 `DRAINING` and
    /// `legate_server_live` 0; an open connection is closed (HTTP/1.1 after
    /// its next response, which says `Connection: close`; HTTP/2 by a GOAWAY)
    /// while the listener still serves new ones; `POST /healthcheck/ok` undoes
    /// it, and connections stay open again.
    async fn a_failed_health_check_closes_connections_but_keeps_serving(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&with_long_drain_timeout(&simple_config(&[up.addr])))
            .start();
        let web = lg.addr("web");
        let mut c = client(proto, web).await;
        let r = c.get("/").send().await;
        assert_eq!((r.status.as_u16(), r.header("connection")), (200, None));
        assert_eq!(lg.admin_get("/healthcheck/fail").await.0, 405);
        assert_eq!(lg.admin_post("/healthcheck/fail?now").await.0, 400);
        assert_eq!(lg.admin_get("/ready").await, (200, "LIVE\n".into()));
        let failed = lg.admin_post("/healthcheck/fail").await;
        assert_eq!(failed, (200, "OK\n".into()));
        assert_eq!(lg.admin_get("/ready").await, (503, "DRAINING\n".into()));
        assert_eq!(lg.stat("legate_server_live").await, Some(0.0));
        let info = lg.admin_get("/server_info").await.1;
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["state"], "DRAINING", "{info}");
        assert_eq!(info["health_check_failed"], true, "{info}");
        if proto == Proto::H1 {
            let r = c.get("/").send().await;
            let closing = (r.status.as_u16(), r.header("connection"));
            assert_eq!(closing, (200, Some("close")));
        }
        eventually(HANG_GUARD, "the open connection closed", || {
            let closed = c.is_closed();
            async move { closed.then_some(()) }
        })
        .await;
        // Whoever still comes is served.
        let mut late = client(proto, web).await;
        assert_eq!(late.get("/").send().await.status, 200);
        assert_eq!(lg.admin_post("/healthcheck/ok").await, (200, "OK\n".into()));
        assert_eq!(lg.admin_get("/ready").await, (200, "LIVE\n".into()));
        assert_eq!(lg.stat("legate_server_live").await, Some(1.0));
        let mut again = client(proto, web).await;
        for _ in 0..2 {
            let r = again.get("/").send().await;
            assert_eq!((r.status.as_u16(), r.header("connection")), (200, None));
        }
        assert!(!again.is_closed());
        // HTTP/1.1 sent one more on the first connection.
        let served = 4.0 + f64::from(proto == Proto::H1);
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
            served,
        )
        .await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    for _ in 0..3 {
        assert_eq!(c.get("/").send().await.status, 200);
    }
    assert!(lg.admin.ip().is_loopback());

    assert_eq!(lg.admin_get("/ready").await, (200, "LIVE\n".to_string()));

    let mut admin = client(Proto::H1, lg.admin).await;
    // HEAD (a balancer's health check) is answered as GET, without the body.
    for path in ["/ready", "/stats", "/reload"] {
        let r = admin.request(Method::HEAD, path).send().await;
        assert_eq!(r.status, 200, "HEAD {path}");
        assert!(r.text().is_empty(), "HEAD {path}: {}", r.text());
    }
    let r = admin.get("/stats").send().await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.header("content-type")
    );
    let text = r.text();
    assert!(
        text.contains("# TYPE legate_listener_requests_total counter\n"),
        "{text}"
    );
    let m = parse_prometheus(&text);
    assert_eq!(
        m.get(r#"legate_listener_requests_total{listener="web",class="2xx"}"#),
        Some(&3.0)
    );
    assert_eq!(
        m.get(r#"legate_route_request_duration_seconds_count{route_table="main",virtual_host="all",route="all/0"}"#),
        Some(&3.0)
    );
    assert_eq!(
        m.get(r#"legate_cluster_upstream_rq_total{cluster="backend"}"#),
        Some(&3.0)
    );
    assert_eq!(
        m.get(r#"legate_listener_connections_active{listener="web"}"#),
        Some(&1.0)
    );

    let r = admin.get("/clusters").send().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let cl = &v["clusters"][0];
    assert_eq!(cl["name"], "backend");
    assert_eq!(cl["lb_policy"], "round_robin");
    assert_eq!(cl["protocol"], "http1");
    assert_eq!(cl["stats"]["upstream_rq_total"], 3);
    assert_eq!(cl["stats"]["upstream_rq_2xx"], 3);
    assert_eq!(cl["endpoints"][0]["address"], up.addr.to_string());
    assert_eq!(cl["endpoints"][0]["weight"], 1);
    assert_eq!(cl["endpoints"][0]["stats"]["rq_total"], 3);

    let r = admin.get("/config_dump").send().await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["version"], 1);
    assert_eq!(v["listeners"][0]["name"], "web");
    assert_eq!(
        v["clusters"][0]["endpoints"][0]["address"],
        up.addr.to_string()
    );
    // Defaults are filled in, in the config's own notation.
    assert_eq!(v["drain_timeout"], "30s");
    assert_eq!(v["listeners"][0]["limits"]["max_connections"], 10000);
    assert_eq!(
        v["listeners"][0]["limits"]["max_request_headers_size"],
        "60KiB"
    );
    assert_eq!(
        v["routes"][0]["virtual_hosts"][0]["routes"][0]["timeout"],
        "15s"
    );

    assert_eq!(admin.post("/stats").send().await.status, 405);
    assert_eq!(admin.get("/nope").send().await.status, 404);
    let r = admin.get("/").send().await;
    assert!(r.text().contains("/config_dump"));
}

/// `/stats` has the process's own series, as Envoy's `server.*`: the version
/// that runs, whether it serves (0 once it drains, as `server.live`) and
/// when it started (a restart changes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_say_the_version_liveness_and_start_of_the_process() {
    let release = Arc::new(AtomicBool::new(false));
    let up = upstream().hold_until(&release).start().await;
    let lg = legate()
        .config(&with_long_drain_timeout(&simple_config(&[up.addr])))
        .start();
    let text = lg.stats().await;
    let m = parse_prometheus(&text);
    let info: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with("legate_build_info{version=\""))
        .collect();
    assert_eq!(info.len(), 1, "{text}");
    assert_eq!(*info[0].1, 1.0);
    assert!(text.contains("# TYPE legate_build_info gauge\n"), "{text}");
    assert_eq!(m.get("legate_server_live"), Some(&1.0), "{text}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = m["legate_server_start_time_seconds"];
    assert!(started > 1.0e9 && started <= now, "{started} (now {now})");

    // A request held upstream keeps the draining process (and its admin API) up.
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let held = tokio::spawn(async move { c.get("/").try_send().await });
    eventually(Duration::from_secs(10), "the request upstream", || async {
        (up.in_flight.get() == 1).then_some(())
    })
    .await;
    assert_eq!(lg.admin_post("/drain").await.0, 200);
    assert_eq!(lg.stat("legate_server_live").await, Some(0.0));
    release.store(true, Ordering::SeqCst);
    assert_eq!(
        held.await.unwrap().map(|r| r.status.as_u16()).ok(),
        Some(200)
    );
}

/// `GET /server_info`, as Envoy's (it was a 404): the version, the state
/// `/ready` reports (`LIVE`, then `DRAINING`), when the process started and
/// for how long, the config generation, and each listener's bound address
/// (Envoy's `/listeners`). `/help` lists the endpoints, as `/` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_info_says_version_state_start_and_listener_addresses() {
    let release = Arc::new(AtomicBool::new(false));
    let up = upstream().hold_until(&release).start().await;
    let lg = legate()
        .config(&with_long_drain_timeout(&simple_config(&[up.addr])))
        .start();
    let info = |body: String| -> serde_json::Value {
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    };
    let (status, body) = lg.admin_get("/server_info").await;
    assert_eq!(status, 200, "{body}");
    let v = info(body);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{v}");
    assert_eq!(v["state"], "LIVE", "{v}");
    assert_eq!(v["generation"], 1, "{v}");
    let started = v["start_time"].as_f64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(started > 1.0e9 && started <= now, "{v}");
    assert!(v["uptime_s"].as_u64().is_some(), "{v}");
    assert_eq!(
        v["listeners"],
        serde_json::json!([{ "name": "web", "address": lg.addr("web").to_string() }]),
        "{v}"
    );

    let (status, help) = lg.admin_get("/help").await;
    assert_eq!(status, 200);
    assert_eq!(help, lg.admin_get("/").await.1);
    assert!(help.contains("/server_info"), "{help}");
    assert_eq!(lg.admin_post("/server_info").await.0, 405);

    // A request held upstream keeps the draining process (and its admin API) up.
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let held = tokio::spawn(async move { c.get("/").try_send().await });
    eventually(Duration::from_secs(10), "the request upstream", || async {
        (up.in_flight.get() == 1).then_some(())
    })
    .await;
    assert_eq!(lg.admin_post("/drain").await.0, 200);
    let v = info(lg.admin_get("/server_info").await.1);
    assert_eq!(v["state"], "DRAINING", "{v}");
    release.store(true, Ordering::SeqCst);
    assert_eq!(
        held.await.unwrap().map(|r| r.status.as_u16()).ok(),
        Some(200)
    );
}

/// Envoy's Prometheus path, `/stats/prometheus` (what scrape configs written for
/// Envoy ask for), is `/stats`; `filter=REGEX` keeps the families whose name
/// matches, with their HELP and TYPE lines; a parameter `/stats` does not
/// serve is a 400 saying so, not the whole page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_prometheus_path_and_filter() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(c.get("/").send().await.status, 200);
    let mut admin = client(Proto::H1, lg.admin).await;

    let r = admin.get("/stats/prometheus").send().await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    let m = parse_prometheus(&r.text());
    assert_eq!(
        m.get(r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#),
        Some(&1.0)
    );

    let r = admin
        .get("/stats/prometheus?filter=upstream_rq_2xx")
        .send()
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "# HELP legate_cluster_upstream_rq_2xx 2xx responses.\n\
         # TYPE legate_cluster_upstream_rq_2xx counter\n\
         legate_cluster_upstream_rq_2xx{cluster=\"backend\"} 1\n"
    );
    let r = admin
        .get("/stats?filter=%5Elegate_listener_requests")
        .send()
        .await;
    let text = r.text();
    assert!(
        text.contains("legate_listener_requests_total{listener=\"web\",class=\"2xx\"} 1\n"),
        "{text}"
    );
    assert!(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .all(|l| l.starts_with("legate_listener_requests_")),
        "{text}"
    );

    // `usedonly` (Envoy's): the 2xx counted, not the 5xx nothing counted;
    // with `filter`, both apply.
    let r = admin
        .get("/stats/prometheus?usedonly&filter=listener_requests_total")
        .send()
        .await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(
        text.contains("legate_listener_requests_total{listener=\"web\",class=\"2xx\"} 1\n"),
        "{text}"
    );
    assert!(!text.contains("class=\"5xx\""), "{text}");
    let all = admin.get("/stats").send().await.text();
    assert!(all.contains("class=\"5xx\"} 0\n"), "{all}");

    for (path, says) in [
        ("/stats?format=json", "`format=json` is not served"),
        ("/stats/prometheus?usedonly=no", "`usedonly` is a flag"),
        ("/stats?used", "unknown /stats parameter `used`"),
        ("/clusters?format=text", "`format=text` is not served"),
        ("/stats?filter=(", "`filter` is not a regular expression"),
    ] {
        let r = admin.get(path).send().await;
        assert_eq!(r.status, 400, "{path}");
        assert!(r.text().contains(says), "{path}: {}", r.text());
    }
    assert_eq!(admin.post("/stats/prometheus").send().await.status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_hides_the_redis_password() {
    let up = upstream().start().await;
    // Redis is connected to lazily: none needs to run for the dump.
    let cfg = format!(
        "{}kv:\n  backend: redis\n  url: redis://app:s3cret-pw@127.0.0.1:1/0\n",
        simple_config(&[up.addr])
    );
    let lg = legate().config(&cfg).start();
    let (status, body) = lg.admin_get("/config_dump").await;
    assert_eq!(status, 200);
    assert!(!body.contains("s3cret-pw"), "{body}");
    assert!(body.contains("redis://***@127.0.0.1:1/0"), "{body}");
}

/// An auth config with an inline HS256 key (JWKS `oct`, base64url `k`).
fn auth_config(k: &str) -> String {
    format!(
        "{{ providers: [{{ name: demo, issuer: https://demo.legate.local, audiences: [demo-api], \
         jwks: {{ keys: [{{ kty: oct, kid: demo, alg: HS256, k: {k} }}] }} }}], \
         rules: [{{ match: {{ prefix: / }}, requires: {{ any: [demo] }} }}] }}"
    )
}

/// A config whose plugin config, route override of it and route header
/// operation hold secrets; `admin` is the admin section.
fn config_with_secrets(up: std::net::SocketAddr, admin: &str) -> String {
    format!(
        "version: 1
{admin}listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: auth }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        request_headers:
          add: {{ x-api-key: vhost-api-key-secret }}
        routes:
          - match: {{ prefix: /other }}
            cluster: backend
            filters:
              auth: {{ config: {override} }}
          - match: {{ prefix: / }}
            cluster: backend
            request_headers:
              set: {{ authorization: Bearer upstream-token-secret }}
clusters:
  - name: backend
    endpoints: [{{ address: {up} }}]
plugins:
  - name: auth
    module: builtin:auth
    limits: {{ cpu: 500ms }}
    config: {top}
",
        top = auth_config("bGVnYXRlLWRlbW8tc2VjcmV0LW5vdC1mb3ItcHJvZHVjdGlvbiEh"),
        override = auth_config("cm91dGUtb3ZlcnJpZGUtc2VjcmV0LWtleS1mb3ItdGVzdHM"),
    )
}

const DUMPED_SECRETS: [&str; 4] = [
    "bGVnYXRlLWRlbW8tc2VjcmV0LW5vdC1mb3ItcHJvZHVjdGlvbiEh",
    "cm91dGUtb3ZlcnJpZGUtc2VjcmV0LWtleS1mb3ItdGVzdHM",
    "upstream-token-secret",
    "vhost-api-key-secret",
];

/// `/config_dump` shows no plugin config (an auth plugin's inline HS256 key, a
/// route's override of it) and no header operation's value (an
/// `authorization` a route sets), only that they are there and the configs'
/// sha256; `admin.config_dump_secrets: true` shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_hides_plugin_configs_and_header_values() {
    let up = upstream().start().await;
    let lg = legate()
        .config(&config_with_secrets(
            up.addr,
            "admin:\n  address: 127.0.0.1:0\n",
        ))
        .start();
    let (status, body) = lg.admin_get("/config_dump").await;
    assert_eq!(status, 200);
    for secret in DUMPED_SECRETS {
        assert!(!body.contains(secret), "{secret} in {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let marker = v["plugins"][0]["config"].as_str().unwrap();
    assert!(marker.starts_with("[redacted] sha256:"), "{marker}");
    assert_eq!(marker.len(), "[redacted] sha256:".len() + 64, "{marker}");
    let vhost = &v["routes"][0]["virtual_hosts"][0];
    assert_eq!(vhost["request_headers"]["add"]["x-api-key"], "[redacted]");
    let routes = &vhost["routes"];
    let over = routes[0]["filters"]["auth"]["config"].as_str().unwrap();
    assert!(over.starts_with("[redacted] sha256:"), "{over}");
    assert_ne!(over, marker, "two configs, one hash");
    assert_eq!(
        routes[1]["request_headers"]["set"]["authorization"],
        "[redacted]"
    );

    let lg = legate()
        .config(&config_with_secrets(
            up.addr,
            "admin:\n  address: 127.0.0.1:0\n  config_dump_secrets: true\n",
        ))
        .start();
    let (status, body) = lg.admin_get("/config_dump").await;
    assert_eq!(status, 200);
    for secret in DUMPED_SECRETS {
        assert!(body.contains(secret), "{secret} not in {body}");
    }
}

each_proto!(
    async fn an_endpoint_listed_twice_is_one_stats_series(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&simple_config(&[up.addr, up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..4 {
            assert_eq!(c.get("/").send().await.status, 200);
        }
        // Prometheus rejects a scrape with two samples of one series.
        let stats = lg.stats().await;
        let series = format!(
            "legate_endpoint_rq_total{{cluster=\"backend\",endpoint=\"{}\"}}",
            up.addr
        );
        let lines: Vec<_> = stats.lines().filter(|l| l.starts_with(&series)).collect();
        assert_eq!(lines, [format!("{series} 4")], "{stats}");
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_share_the_listener() {
    let up = upstream().start().await;
    let lg = legate()
        .config(&simple_config(&[up.addr]))
        .concurrency(2)
        .start();
    let addr = lg.addr("web");
    let mut tasks = Vec::new();
    for i in 0..10 {
        let proto = if i % 2 == 0 { Proto::H1 } else { Proto::H2 };
        tasks.push(tokio::spawn(async move {
            let mut c = client(proto, addr).await;
            for _ in 0..5 {
                assert_eq!(c.get("/").send().await.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(up.requests.get(), 50);
    lg.assert_stat(r#"legate_listener_connections_total{listener="web"}"#, 10.0)
        .await;
    lg.assert_stat(
        r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
        50.0,
    )
    .await;
}

/// `legate run` raises its soft open-file limit to the hard limit: started with
/// 256 of 4096 (systemd starts services with a soft limit of 1024), it would
/// run out of descriptors at a few hundred connections, far below
/// `max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legate_run_raises_its_open_file_limit() {
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let up = upstream().start().await;
    let bin = workspace_bin("legate");
    let admin = free_addr();
    let dir = TempDir::new();
    let cfg = dir.write(
        "legate.yaml",
        format!("{}admin:\n  address: {admin}\n", simple_config(&[up.addr])),
    );
    // util-linux's prlimit sets the limits, then runs legate in its place.
    let child = std::process::Command::new("prlimit")
        .arg("--nofile=256:4096")
        .arg(&bin)
        .args(["run", "--watch-interval", "0", "-c"])
        .arg(&cfg)
        .spawn()
        .expect("run legate under util-linux's prlimit");
    let child = Killed(child);
    eventually(Duration::from_secs(60), "legate is ready", || async {
        let mut c = Client::connect(Proto::H1, admin).await.ok()?;
        let r = c.get("/ready").try_send().await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-file limit in\n{limits}"));
    let values: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    assert_eq!(values[..2], ["4096", "4096"], "{line}");
}

/// The admin API keeps web pages out: a cross-site `POST /drain` (what
/// `fetch(..., {method: "POST", mode: "no-cors"})` sends) is refused and
/// drains nothing; a request to a name other than an IP address or
/// `localhost` (DNS rebinding, which would let a page read `/config_dump`) is
/// refused; curl-like requests still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_web_pages() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let mut admin = client(Proto::H1, lg.admin).await;

    for (name, value) in [
        ("origin", "https://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = admin.post("/drain").header(name, value).send().await;
        assert_eq!(r.status, 403, "{name}: {}", r.text());
    }
    assert_eq!(lg.admin_get("/ready").await, (200, "LIVE\n".to_string()));

    for host in [
        "rebind.evil.example",
        "rebind.evil.example:9901",
        "localhost.evil.example",
    ] {
        let r = admin.get("/config_dump").host(host).send().await;
        assert_eq!(r.status, 403, "{host}: {}", r.text());
    }

    for host in ["localhost:9901", "LOCALHOST", "127.0.0.1", "[::1]:9901"] {
        let r = admin.get("/ready").host(host).send().await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }
    // A page's GET (no side effect, and the answer cannot be read cross-origin)
    // is answered.
    let r = admin
        .get("/ready")
        .header("origin", "https://evil.example")
        .send()
        .await;
    assert_eq!(r.status, 200);
    // What curl sends.
    let r = admin.post("/drain").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(lg.admin_get("/ready").await.0, 503);
}

/// `admin.allowed_hosts` lets a scraper reach the admin API by name (any port,
/// any case, a trailing dot); other names are still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_the_names_it_is_told_to() {
    let up = upstream().start().await;
    let config = format!(
        "{}admin:\n  address: 127.0.0.1:0\n  allowed_hosts: [legate-0.Admin.internal]\n",
        simple_config(&[up.addr])
    );
    let lg = legate().config(&config).start();
    let mut admin = client(Proto::H1, lg.admin).await;
    for host in [
        "legate-0.admin.internal",
        "LEGATE-0.admin.internal:9901",
        "legate-0.admin.internal.",
        "127.0.0.1",
    ] {
        let r = admin.get("/stats").host(host).send().await;
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }
    for host in [
        "rebind.evil.example",
        "legate-1.admin.internal",
        "legate-0.admin.internal.evil.example",
    ] {
        let r = admin.get("/stats").host(host).send().await;
        assert_eq!(r.status, 403, "{host}: {}", r.text());
    }
}

/// A client that never finishes its request head is cut off (slowloris); so is
/// a connection beyond the admin API's cap, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_bounds_slow_and_excess_connections() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let mut slow = RawConn::connect(lg.admin).await;
    slow.write(b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await;
    let (_, closed) = slow.read_until_close(HANG_GUARD).await;
    assert!(closed, "a request head never finished holds its connection");

    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(RawConn::connect(lg.admin).await);
    }
    let mut excess = RawConn::connect(lg.admin).await;
    excess
        .write(b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    let (answer, closed) = excess.read_until_close(HANG_GUARD).await;
    assert!(
        closed && answer.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    drop(held);
    // Closed connections free their slots.
    eventually(HANG_GUARD, "the admin API answers again", || async {
        let mut c = Client::connect(Proto::H1, lg.admin).await.ok()?;
        let r = c.get("/ready").try_send().await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
}

/// `legate check` fails what `legate run` would fail at start for the config's
/// contents — a listener's certificate missing or not matching its key, a
/// cluster's CA missing, an access log in a directory that does not exist —
/// each named; it passed them ("ok") and only the start failed.
#[test]
fn legate_check_fails_what_legate_run_would() {
    let ca = Ca::new("check CA");
    let (one, two) = (ca.server(&["a.example"]), ca.server(&["a.example"]));
    let dir = TempDir::new();
    let check = |name: &str, yaml: String| {
        let file = dir.write(name, yaml);
        let out = std::process::Command::new(workspace_bin("legate"))
            .args(["check", "-c"])
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stderr)
    };
    let up: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let tls = |cert: &std::path::Path, key: &std::path::Path| {
        simple_config(&[up]).replace(
            "    http:\n",
            &format!(
                "    tls:\n      certificates:\n        - cert: {}\n          key: {}\n    http:\n",
                cert.display(),
                key.display()
            ),
        )
    };
    let (ok, stderr) = check("good.yaml", tls(&one.cert, &one.key));
    assert!(ok, "{stderr}");
    let missing = dir.path().join("gone.pem");
    for (name, yaml, want) in [
        ("missing.yaml", tls(&missing, &one.key), "listener `web`"),
        ("mismatch.yaml", tls(&one.cert, &two.key), "listener `web`"),
        (
            "ca.yaml",
            simple_config_with(
                &[up],
                "",
                &format!("    tls:\n      ca: {}\n", missing.display()),
            ),
            "cluster `backend`",
        ),
        (
            "log.yaml",
            format!(
                "{}access_log:\n  path: {}\n",
                simple_config(&[up]),
                dir.path().join("no/such/dir/access.log").display()
            ),
            "access log",
        ),
    ] {
        let (ok, stderr) = check(name, yaml);
        assert!(!ok, "{name}: legate check passed it");
        assert!(stderr.contains(want), "{name}: {stderr}");
    }
}

/// A `legate run` child process whose stderr (its log) goes to a file.
struct LoggedChild {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl LoggedChild {
    /// `legate run -c cfg EXTRA...`, logging at the default level (no
    /// `LEGATE_LOG`) to `log`.
    fn spawn(cfg: &std::path::Path, extra: &[&str], log: std::path::PathBuf) -> LoggedChild {
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(workspace_bin("legate"))
            .args(["run", "--concurrency", "1", "--watch-interval", "0", "-c"])
            .arg(cfg)
            .args(extra)
            .env_remove("LEGATE_LOG")
            .env("LEGATE_WASM_CACHE", "off")
            .stderr(file)
            .spawn()
            .expect("spawn legate");
        LoggedChild { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit; its exit status.
    async fn exited(&mut self) -> std::process::ExitStatus {
        let log = self.log.clone();
        let what = format!("the legate process exits (log: {})", log.display());
        eventually(Duration::from_secs(60), &what, || {
            let r = self.child.try_wait().unwrap();
            async move { r }
        })
        .await
    }

    /// Waits for a log line containing `needle`; the line. A timeout shows the
    /// whole log, the only account of what the process did instead.
    async fn log_line(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after 60s waiting for a log line with {needle:?}; the log ({}):\n{log}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn admin_answer(admin: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut c = Client::connect(Proto::H1, admin).await.ok()?;
    let r = c.get(path).try_send().await.ok()?;
    Some((r.status.as_u16(), r.text()))
}

/// SIGTERM while Legate starts stops it at once, with a log line: the handler
/// is installed before the start, since the default action does nothing to
/// PID 1 of a PID namespace (a container's `ENTRYPOINT ["legate"]`), where a
/// pod deleted during a slow start sat `Terminating` until SIGKILL. The start
/// here blocks for good: a hot restart from an "old process" that accepts the
/// upgrade connection and never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_starting_stops_legate() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let cfg = dir.write(
        "legate.yaml",
        format!(
            "{}admin:\n  address: {}\n",
            simple_config(&[up.addr]),
            free_addr()
        ),
    );
    let sock = dir.path().join("upgrade.sock");
    let old = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut lg = LoggedChild::spawn(
        &cfg,
        &["--upgrade", "--upgrade-socket", sock.to_str().unwrap()],
        dir.path().join("legate.log"),
    );
    // Once the new process connected, it waits in its start for an answer.
    let (_conn, _) = tokio::task::spawn_blocking(move || old.accept())
        .await
        .unwrap()
        .unwrap();
    lg.signal("TERM");
    let status = lg.exited().await;
    let log = lg.log();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("SIGTERM while starting"), "{log}");
}

/// The admin address answers while the plugins compile: `/ready` 503
/// `INITIALIZING` (as Envoy's admin answers while it initializes), so a
/// liveness probe does not take a slow start (a cold Python filter: half a
/// minute) for a dead process and restart it, and SIGTERM stops it then too.
/// The start blocks here on a plugin module that is a FIFO no one writes to
/// yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_answers_initializing_while_legate_starts() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let fifo = dir.path().join("slow.wasm");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let admin = free_addr();
    let cfg = dir.write(
        "legate.yaml",
        format!(
            "{}admin:\n  address: {admin}\nplugins:\n  - name: slow\n    module: {}\n",
            simple_config(&[up.addr]),
            fifo.display()
        ),
    );
    let mut lg = LoggedChild::spawn(&cfg, &[], dir.path().join("legate.log"));
    let (status, body) = eventually(Duration::from_secs(60), "the admin answers", || {
        admin_answer(admin, "/ready")
    })
    .await;
    assert_eq!(
        (status, body.as_str()),
        (503, "INITIALIZING\n"),
        "{}",
        lg.log()
    );
    let (status, body) = admin_answer(admin, "/stats").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("INITIALIZING"), "{body}");
    // Still starting (the module is not read yet): SIGTERM stops it.
    lg.signal("TERM");
    let status = lg.exited().await;
    let log = lg.log();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("SIGTERM while starting"), "{log}");
}

/// At the default log level, a TLS handshake whose SNI is an IP address
/// (RFC 6066 forbids it, but wrk, health checkers and `openssl s_client
/// -servername 10.0.0.1` send it) logs nothing: rustls warns at each one, a
/// line per connection. `LEGATE_LOG` set replaces the whole filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ip_address_as_sni_is_not_logged_at_each_handshake() {
    let up = upstream().start().await;
    let ca = Ca::new("test ca");
    let server = ca.server(&["localhost"]);
    let dir = TempDir::new();
    let admin = free_addr();
    let web = free_addr();
    let yaml = simple_config(&[up.addr]).replacen(
        "    address: 127.0.0.1:0\n    http:\n",
        &format!(
            "    address: {web}\n{}    http:\n",
            server.listener_tls_yaml()
        ),
        1,
    );
    assert!(yaml.contains("tls:"), "{yaml}");
    let cfg = dir.write("legate.yaml", format!("{yaml}admin:\n  address: {admin}\n"));
    let lg = LoggedChild::spawn(&cfg, &[], dir.path().join("legate.log"));
    eventually(Duration::from_secs(60), "legate is ready", || async {
        let (status, _) = admin_answer(admin, "/ready").await?;
        (status == 200).then_some(())
    })
    .await;
    let shake = tokio::task::spawn_blocking(move || {
        std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &web.to_string(),
                "-servername",
                "127.0.0.1",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&shake.stdout);
    assert!(out.contains("BEGIN CERTIFICATE"), "no handshake:\n{out}");
    // A line logged after the handshake: the handshake's would be before it.
    let (status, _) = eventually(Duration::from_secs(60), "a drain", || {
        admin_answer_post(admin, "/drain")
    })
    .await;
    assert_eq!(status, 200);
    lg.log_line("drain requested").await;
    let log = lg.log();
    assert!(!log.contains("Illegal SNI"), "{log}");
}

async fn admin_answer_post(admin: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut c = Client::connect(Proto::H1, admin).await.ok()?;
    let r = c.post(path).try_send().await.ok()?;
    Some((r.status.as_u16(), r.text()))
}

/// A hot restart whose new process fails to start logs why in the old process
/// (it keeps serving): the new process sends its error before it exits,
/// instead of the old one logging an empty reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hot_restart_says_why_in_the_old_process() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let admin = free_addr();
    let good = format!("{}admin:\n  address: {admin}\n", simple_config(&[up.addr]));
    let cfg = dir.write("legate.yaml", &good);
    let old = LoggedChild::spawn(&cfg, &[], dir.path().join("old.log"));
    eventually(Duration::from_secs(60), "legate is ready", || async {
        let (status, _) = admin_answer(admin, "/ready").await?;
        (status == 200).then_some(())
    })
    .await;
    let sock = dir.path().join("legate.yaml.upgrade.sock");
    eventually(Duration::from_secs(60), "the upgrade socket", || {
        let there = sock.exists();
        async move { there.then_some(()) }
    })
    .await;
    // A module that is no WebAssembly: the config checks, the load fails.
    let module = dir.write("broken.wasm", "not wasm");
    dir.write(
        "legate.yaml",
        format!(
            "{good}plugins:\n  - name: broken\n    module: {}\n",
            module.display()
        ),
    );
    let mut new = LoggedChild::spawn(&cfg, &["--upgrade"], dir.path().join("new.log"));
    let status = new.exited().await;
    assert!(!status.success(), "{}", new.log());
    let line = old.log_line("did not take over").await;
    assert!(line.contains("plugin") && line.contains("broken"), "{line}");
    assert!(line.contains("still serving"), "{line}");
    let (status, body) = admin_answer(admin, "/ready").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "LIVE\n"));
}

/// Two hot restarts in a row while the first process still drains: the middle
/// one has drained first, and waits for the first one's final counts to pass
/// them on with its own, so the request the first process finished while
/// draining is counted by the newest. Before, the middle process exited, the
/// first one's counts met a broken pipe (`WARN hot restart: the final counts
/// did not reach the new process`), and `upstream_rq_2xx` missed the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_hot_restarts_keep_the_first_process_final_counts() {
    let release = Arc::new(AtomicBool::new(false));
    let up = upstream().hold_until(&release).start().await;
    let dir = TempDir::new();
    let (web, admin) = (free_addr(), free_addr());
    let yaml = with_long_drain_timeout(&simple_config(&[up.addr])).replacen(
        "    address: 127.0.0.1:0\n",
        &format!("    address: {web}\n"),
        1,
    );
    let cfg = dir.write("legate.yaml", format!("{yaml}admin:\n  address: {admin}\n"));
    let sock = dir.path().join("legate.yaml.upgrade.sock");
    // The upgrade socket's file, once another than `before` (each new process
    // replaces it with its own, by a rename): its inode.
    let upgrade_socket_after = |before: Option<u64>| {
        let sock = sock.clone();
        async move {
            use std::os::unix::fs::MetadataExt as _;
            eventually(Duration::from_secs(60), "a new upgrade socket", || {
                let ino = std::fs::metadata(&sock).ok().map(|m| m.ino());
                async move { ino.filter(|i| Some(*i) != before) }
            })
            .await
        }
    };
    let mut p1 = LoggedChild::spawn(&cfg, &[], dir.path().join("p1.log"));
    let first = upgrade_socket_after(None).await;
    // A request in flight at the first process: it finishes while it drains.
    let held = tokio::spawn(async move {
        let mut c = client(Proto::H1, web).await;
        c.get("/").send().await.status
    });
    eventually(
        Duration::from_secs(60),
        "the request reaches the upstream",
        || {
            let n = up.in_flight.get();
            async move { (n == 1).then_some(()) }
        },
    )
    .await;
    let p2 = LoggedChild::spawn(&cfg, &["--upgrade"], dir.path().join("p2.log"));
    p2.log_line("is draining").await;
    upgrade_socket_after(Some(first)).await;
    let p3 = LoggedChild::spawn(&cfg, &["--upgrade"], dir.path().join("p3.log"));
    p3.log_line("is draining").await;
    // The second process has drained (nothing was in flight there): it
    // exited, or waits for the first one's counts.
    let mut p2 = p2;
    eventually(
        Duration::from_secs(60),
        "the second process drained",
        || {
            let done = p2.child.try_wait().unwrap().is_some()
                || p2.log().contains("waiting for the final counts");
            async move { done.then_some(()) }
        },
    )
    .await;
    release.store(true, Ordering::SeqCst);
    assert_eq!(held.await.unwrap(), 200);
    assert!(p1.exited().await.success(), "{}", p1.log());
    assert!(p2.exited().await.success(), "{}", p2.log());
    assert!(!p1.log().contains("did not reach"), "{}", p1.log());
    for series in [
        r#"legate_cluster_upstream_rq_total{cluster="backend"}"#,
        r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#,
    ] {
        let what = format!("{series} is 1 at the third process");
        eventually(HANG_GUARD, &what, || async {
            let (_, body) = admin_answer(admin, "/stats").await?;
            (parse_prometheus(&body).get(series) == Some(&1.0)).then_some(())
        })
        .await;
    }
    drop(p3);
}

each_proto!(
    /// A route's `health` answers a load balancer's probe before the
    /// listener's filters (its auth plugin refuses everything else without a
    /// token): 200 `OK` while cluster `app` has all its endpoints healthy, 503
    /// `UNHEALTHY` once its health check fails, 503 `DRAINING` after `POST
    /// /healthcheck/fail`, as Envoy's health check filter.
    async fn a_health_route_answers_load_balancers_before_the_filters(proto) {
        let ok = Arc::new(AtomicBool::new(true));
        let up = health_checked("app", &ok).await;
        let cfg = format!(
            "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: auth }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ path: /lb }}
            health: {{ min_healthy: [{{ cluster: app, percent: 100% }}] }}
          - match: {{ prefix: / }}
            cluster: app
clusters:
  - name: app
    endpoints: [{{ address: {} }}]
    health_check: {{ http: {{ path: /healthz }}, interval: 50ms, unhealthy_threshold: 1, healthy_threshold: 1 }}
plugins:
  - name: auth
    module: builtin:auth
    config: {}
",
            up.addr,
            auth_config("bGVnYXRlLWRlbW8tc2VjcmV0LW5vdC1mb3ItcHJvZHVjdGlvbiEh")
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/other").send().await.status, 401);
        let r = c.get("/lb").send().await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "OK\n"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let r = c.request(Method::HEAD, "/lb").send().await;
        assert_eq!(r.status, 200);
        // The head a GET gets, no body.
        assert_eq!(r.header("content-length"), Some("3"));
        assert!(r.body.is_empty());
        // Not a probe: through the filters.
        assert_eq!(c.post("/lb").send().await.status, 401);

        ok.store(false, Ordering::SeqCst);
        lg.assert_stat(r#"legate_cluster_membership_healthy{cluster="app"}"#, 0.0)
            .await;
        let r = c.get("/lb").send().await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (503, "UNHEALTHY\n"));
        ok.store(true, Ordering::SeqCst);
        lg.assert_stat(r#"legate_cluster_membership_healthy{cluster="app"}"#, 1.0)
            .await;
        assert_eq!(c.get("/lb").send().await.status, 200);

        assert_eq!(lg.admin_post("/healthcheck/fail").await.0, 200);
        // (The connection closes after this answer: a new one per probe.)
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/lb").send().await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (503, "DRAINING\n"));
        assert_eq!(lg.admin_post("/healthcheck/ok").await.0, 200);
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/lb").send().await.status, 200);
    }
);
