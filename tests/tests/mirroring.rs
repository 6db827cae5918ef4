//! Request mirroring with real upstreams: the shadow cluster gets a copy with the
//! `-shadow` host, and a shadow that hangs or fails changes nothing for the client.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use legate_tests::*;
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(10);

fn stat(name: &str, cluster: &str) -> String {
    format!("legate_cluster_{name}{{cluster=\"{cluster}\"}}")
}

/// What the shadow saw: (host, path, body) of each request.
type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A shadow upstream that records each request, then waits for `release` (if given)
/// and answers `status`.
async fn shadow(seen: &Seen, release: Option<Arc<Notify>>, status: u16) -> UpstreamHandle {
    let seen = seen.clone();
    upstream()
        .name("shadow")
        .handler(move |req: Request<Incoming>| {
            let seen = seen.clone();
            let release = release.clone();
            async move {
                let host = req
                    .headers()
                    .get("host")
                    .map(|h| h.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let path = req.uri().path().to_string();
                let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                seen.lock().unwrap().push((host, path, body));
                if let Some(r) = release {
                    r.notified().await;
                }
                let mut resp = Response::new(Full::new(Bytes::from_static(b"shadow\n")));
                *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                resp
            }
        })
        .start()
        .await
}

fn config(primary: SocketAddr, shadow: SocketAddr, mirror: &str) -> String {
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
            cluster: primary
            mirror: {mirror}
clusters:
  - name: primary
    endpoints: [{{ address: \"{primary}\" }}]
  - name: shadow
    endpoints: [{{ address: \"{shadow}\" }}]
"
    )
}

each_proto!(
    async fn the_shadow_host_stays_a_valid_host(proto) {
        // A trailing dot goes before `-shadow` (`api.example.-shadow` is no
        // DNS name); an IPv6 literal keeps its host (`[::1]-shadow` is no
        // authority).
        let p = upstream().name("primary").start().await;
        let seen = Seen::default();
        let s = shadow(&seen, None, 200).await;
        let lg = legate()
            .config(&config(p.addr, s.addr, "{ cluster: shadow }"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let cases = [
            ("api.example.", "api.example-shadow"),
            ("api.example.:8080", "api.example-shadow:8080"),
            ("[::1]:8080", "[::1]:8080"),
        ];
        for (i, (host, _)) in cases.iter().enumerate() {
            let r = c.get(&format!("/{i}")).host(host).send().await;
            assert_eq!(r.status, 200, "{host}");
        }
        eventually(WAIT, "the shadow to see the copies", || async {
            (seen.lock().unwrap().len() == cases.len()).then_some(())
        })
        .await;
        let mut got: Vec<(String, String)> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(h, p, _)| (p.clone(), h.clone()))
            .collect();
        got.sort();
        let want: Vec<(String, String)> = cases
            .iter()
            .enumerate()
            .map(|(i, (_, shadow))| (format!("/{i}"), shadow.to_string()))
            .collect();
        assert_eq!(got, want);
        lg.assert_stat(&stat("mirror_failures", "shadow"), 0.0).await;
    }
);

each_proto!(
    async fn the_shadow_gets_a_copy_with_the_shadow_host(proto) {
        let p = upstream().name("primary").start().await;
        let seen = Seen::default();
        let s = shadow(&seen, None, 200).await;
        let lg = legate()
            .config(&config(p.addr, s.addr, "{ cluster: shadow }"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .post("/orders?id=7")
            .host("shop.example:8080")
            .body("hello mirror")
            .send()
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-upstream"), Some("primary"));
        assert_eq!(r.echo().body, "hello mirror");
        eventually(WAIT, "the shadow to see the copy", || async {
            (!seen.lock().unwrap().is_empty()).then_some(())
        })
        .await;
        let got = seen.lock().unwrap().clone();
        assert_eq!(
            got,
            [(
                "shop.example-shadow:8080".to_string(),
                "/orders".to_string(),
                b"hello mirror".to_vec()
            )]
        );
        lg.assert_stat(&stat("mirror_requests", "shadow"), 1.0).await;
        eventually(WAIT, "the copy's answer to be counted", || async {
            (lg.stat(&stat("upstream_rq_2xx", "shadow")).await == Some(1.0)).then_some(())
        })
        .await;
        lg.assert_stat(&stat("mirror_failures", "shadow"), 0.0).await;
        lg.assert_stat(&stat("upstream_rq_total", "primary"), 1.0).await;
    }
);

each_proto!(
    async fn a_hanging_or_failing_shadow_does_not_affect_the_primary(proto) {
        let p = upstream().name("primary").start().await;
        let seen = Seen::default();
        let release = Arc::new(Notify::new());
        let hanging = shadow(&seen, Some(release.clone()), 200).await;
        let lg = legate()
            .config(&config(p.addr, hanging.addr, "{ cluster: shadow, timeout: 10s }"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // The shadow holds every copy until released, after the primaries are
        // answered: were the primary waiting for the copy, this would never finish.
        for i in 0..3 {
            let r = c.post("/x").body(format!("body {i}")).send().await;
            assert_eq!(r.status, 200);
            assert_eq!(r.echo().body, format!("body {i}"));
        }
        eventually(WAIT, "three copies", || async {
            (seen.lock().unwrap().len() == 3).then_some(())
        })
        .await;
        release.notify_waiters();

        // A shadow answering 500: the primary's answers are unchanged, the failures
        // are counted on the shadow cluster.
        let failing_seen = Seen::default();
        let failing = shadow(&failing_seen, None, 500).await;
        let lg2 = legate()
            .config(&config(p.addr, failing.addr, "{ cluster: shadow }"))
            .start();
        let mut c2 = client(proto, lg2.addr("web")).await;
        for _ in 0..3 {
            let r = c2.get("/y").send().await;
            assert_eq!(r.status, 200);
            assert_eq!(r.header("x-upstream"), Some("primary"));
        }
        eventually(WAIT, "three failed copies", || async {
            (lg2.stat(&stat("mirror_failures", "shadow")).await == Some(3.0)).then_some(())
        })
        .await;

        // A shadow that is down: same.
        let lg3 = legate()
            .config(&config(p.addr, closed_port_addr(), "{ cluster: shadow }"))
            .start();
        let mut c3 = client(proto, lg3.addr("web")).await;
        let r = c3.get("/z").send().await;
        assert_eq!((r.status.as_u16(), r.header("x-upstream")), (200, Some("primary")));
        eventually(WAIT, "the failed copy", || async {
            (lg3.stat(&stat("mirror_failures", "shadow")).await == Some(1.0)).then_some(())
        })
        .await;
    }
);

each_proto!(
    /// A route that retries with a smaller `buffer_limit` than its mirror's
    /// `max_body`: a body between the two is mirrored (it streamed past the
    /// retry's limit and was not).
    async fn a_body_under_max_body_is_mirrored_whatever_the_retry_limit(proto) {
        let p = upstream().name("primary").start().await;
        let seen = Seen::default();
        let s = shadow(&seen, None, 200).await;
        let cfg = config(p.addr, s.addr, "{ cluster: shadow, max_body: 1MiB }").replace(
            "            mirror:",
            "            retry: { retry_on: [connect-failure], buffer_limit: 16KiB }\n            mirror:",
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let body = "y".repeat(100 * 1024);
        let r = c
            .request(Method::PUT, "/upload")
            .body(body.clone())
            .send()
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().body.len(), body.len());
        eventually(WAIT, "the copy", || async {
            (!seen.lock().unwrap().is_empty()).then_some(())
        })
        .await;
        assert_eq!(seen.lock().unwrap()[0].2.len(), body.len());
        lg.assert_stat(&stat("mirror_requests", "shadow"), 1.0).await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_cap_and_zero_percent_are_not_mirrored() {
    let p = upstream().name("primary").start().await;
    let seen = Seen::default();
    let s = shadow(&seen, None, 200).await;
    let lg = legate()
        .config(&config(p.addr, s.addr, "{ cluster: shadow, max_body: 16 }"))
        .start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let big = "x".repeat(17);
    let r = c.post("/big").body(big.clone()).send().await;
    assert_eq!(r.echo().body, big);
    let r = c.post("/small").body("sixteen bytes!!!").send().await;
    assert_eq!(r.status, 200);
    eventually(WAIT, "the small copy", || async {
        (!seen.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let paths: Vec<String> = seen.lock().unwrap().iter().map(|s| s.1.clone()).collect();
    assert_eq!(paths, ["/small"]);
    lg.assert_stat(&stat("mirror_requests", "shadow"), 1.0)
        .await;

    let lg0 = legate()
        .config(&config(p.addr, s.addr, "{ cluster: shadow, percent: 0% }"))
        .start();
    let mut c0 = client(Proto::H1, lg0.addr("web")).await;
    for _ in 0..5 {
        assert_eq!(c0.get("/never").send().await.status, 200);
    }
    lg0.assert_stat(&stat("mirror_requests", "shadow"), 0.0)
        .await;
}

each_proto!(
    /// A shadow answering with an endless body: Legate reads a bounded amount of
    /// it and then drops it (closing that connection), instead of keeping it all
    /// in memory until the mirror timeout.
    async fn an_endless_shadow_answer_is_cut_not_kept(proto) {
        let p = upstream().name("primary").start().await;
        let endless = upstream()
            .name("shadow")
            .handler(|_req: Request<Incoming>| async {
                let every = tokio::time::interval(Duration::from_millis(1));
                Response::new(BodyExt::boxed(Endless(every)))
            })
            .start()
            .await;
        // The timeout is far beyond the wait below: only the cut ends the copy.
        let lg = legate()
            .config(&config(p.addr, endless.addr, "{ cluster: shadow, timeout: 60s }"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/big").send().await;
        assert_eq!((r.status.as_u16(), r.header("x-upstream")), (200, Some("primary")));
        eventually(WAIT, "the shadow's connection closed by Legate", || async {
            (endless.closed.get() == 1).then_some(())
        })
        .await;
        lg.assert_stat(&stat("mirror_requests", "shadow"), 1.0).await;
        lg.assert_stat(&stat("mirror_failures", "shadow"), 0.0).await;
    }
);

each_proto!(
    /// The mirror `timeout` bounds the wait for the shadow's answer: a copy
    /// with no answer by then is a failure of the copy and of the endpoint
    /// (`upstream_rq_timeout`, as Envoy's shadow timeouts feed outlier
    /// detection). A good answer whose body is slow is no failure. (The
    /// timeout covered reading the body, so that copy counted as failed, and
    /// a copy timed out was never recorded on the endpoint.)
    async fn the_mirror_timeout_is_for_the_answer_not_its_body(proto) {
        use futures_util::StreamExt;
        let p = upstream().name("primary").start().await;
        let release = Arc::new(Notify::new());
        let held = release.clone();
        let slow_body = upstream()
            .name("shadow")
            .handler(move |_req: Request<Incoming>| {
                let held = held.clone();
                async move {
                    let first = futures_util::stream::once(async {
                        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"head ")))
                    });
                    let rest = futures_util::stream::once(async move {
                        held.notified().await;
                        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"rest")))
                    });
                    Response::new(BodyExt::boxed(http_body_util::StreamBody::new(first.chain(rest))))
                }
            })
            .start()
            .await;
        let lg = legate()
            .config(&config(p.addr, slow_body.addr, "{ cluster: shadow, timeout: 200ms }"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/slow-body").send().await.status, 200);
        lg.assert_stat(&stat("upstream_rq_2xx", "shadow"), 1.0).await;
        // Past the timeout, with the body still coming.
        tokio::time::sleep(Duration::from_millis(600)).await;
        release.notify_waiters();
        lg.assert_stat(&stat("mirror_requests", "shadow"), 1.0).await;
        lg.assert_stat(&stat("mirror_failures", "shadow"), 0.0).await;
        lg.assert_stat(&stat("upstream_rq_timeout", "shadow"), 0.0).await;

        // A shadow that does not answer: the copy fails at the timeout, and the
        // endpoint's counters know it.
        let seen = Seen::default();
        let hanging = shadow(&seen, Some(Arc::new(Notify::new())), 200).await;
        let lg = legate()
            .config(&config(p.addr, hanging.addr, "{ cluster: shadow, timeout: 200ms }"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/hang").send().await.status, 200);
        lg.assert_stat(&stat("mirror_failures", "shadow"), 1.0).await;
        lg.assert_stat(&stat("upstream_rq_timeout", "shadow"), 1.0).await;
    }
);

/// 64 KiB every millisecond, forever.
struct Endless(tokio::time::Interval);

impl hyper::body::Body for Endless {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
        std::task::ready!(self.0.poll_tick(cx));
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            &CHUNK,
        )))))
    }
}

each_proto!(
    /// Copies the shadow cluster's own circuit breaker refuses (here
    /// `max_connections: 1` over HTTP/1.1, its one connection held by a copy
    /// the shadow has not answered, and `max_pending_requests: 1` taken by the
    /// copy waiting for it) are mirror failures, not failures of the shadow
    /// endpoint: no `rq_error`, nothing for outlier detection, as on the
    /// primary path. (They were recorded as the endpoint's: two such refusals
    /// ejected it.)
    async fn copies_the_shadow_breaker_refuses_do_not_eject_its_endpoint(proto) {
        let p = upstream().name("primary").start().await;
        let seen = Seen::default();
        let release = Arc::new(Notify::new());
        let held = shadow(&seen, Some(release.clone()), 200).await;
        let yaml = config(p.addr, held.addr, "{ cluster: shadow, timeout: 10s }").replace(
            &format!("    endpoints: [{{ address: \"{}\" }}]\n", held.addr),
            &format!(
                "    endpoints: [{{ address: \"{}\" }}]\n    protocol: http1\n    \
                 circuit_breakers: {{ max_connections: 1, max_pending_requests: 1 }}\n    \
                 outlier_detection: {{ consecutive_gateway_failure: 2, consecutive_5xx: 2 }}\n",
                held.addr
            ),
        );
        assert!(yaml.contains("max_connections: 1"), "{yaml}");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/held").send().await;
        assert_eq!(r.status, 200);
        eventually(WAIT, "the held copy", || async {
            (seen.lock().unwrap().len() == 1).then_some(())
        })
        .await;
        // The first waits for the held copy's connection; the next three are
        // refused.
        for _ in 0..4 {
            let r = c.get("/refused").send().await;
            assert_eq!(r.status, 200);
        }
        eventually(WAIT, "three refused copies", || async {
            (lg.stat(&stat("mirror_failures", "shadow")).await == Some(3.0)).then_some(())
        })
        .await;
        lg.assert_stat(&stat("upstream_cx_overflow", "shadow"), 4.0).await;
        lg.assert_stat(&stat("upstream_rq_pending_overflow", "shadow"), 3.0).await;
        lg.assert_stat(&stat("outlier_detection_ejections_total", "shadow"), 0.0)
            .await;
        lg.assert_stat(
            &format!(r#"legate_endpoint_rq_error{{cluster="shadow",endpoint="{}"}}"#, held.addr),
            0.0,
        )
        .await;
        release.notify_waiters();
        eventually(WAIT, "the held copy answered", || async {
            (lg.stat(&stat("upstream_rq_2xx", "shadow")).await == Some(1.0)).then_some(())
        })
        .await;
        // The waiting copy went on the connection it gave back (and is held
        // in its turn).
        eventually(WAIT, "the waiting copy sent", || async {
            (seen.lock().unwrap().len() == 2).then_some(())
        })
        .await;
        assert_eq!(seen.lock().unwrap()[1].1, "/refused");
        release.notify_waiters();
        eventually(WAIT, "the waiting copy answered", || async {
            (lg.stat(&stat("upstream_rq_2xx", "shadow")).await == Some(2.0)).then_some(())
        })
        .await;
        assert_eq!(seen.lock().unwrap().len(), 2);
    }
);
