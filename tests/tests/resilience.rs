//! Failure handling: retries (conditions, limits, idempotency, endpoint choice),
//! route and per-try timeouts, connect failures and resets.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use legate_tests::*;

const RETRY_STAT: &str = r#"legate_cluster_upstream_rq_retry{cluster="backend"}"#;
const RETRY_SUCCESS: &str = r#"legate_cluster_upstream_rq_retry_success{cluster="backend"}"#;
const RETRY_LIMIT: &str = r#"legate_cluster_upstream_rq_retry_limit_exceeded{cluster="backend"}"#;
/// Attempts answered 5xx, or that failed without an answer (connect failure,
/// reset, protocol error, timeout: counted as the 502 or 504 Legate answers).
const FIVE_XX: &str = r#"legate_cluster_upstream_rq_5xx{cluster="backend"}"#;
const TWO_XX: &str = r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#;
const RX_RESET: &str = r#"legate_cluster_upstream_rq_rx_reset{cluster="backend"}"#;
const CX_TOTAL: &str = r#"legate_cluster_upstream_cx_total{cluster="backend"}"#;
const CX_CONNECT_FAIL: &str = r#"legate_cluster_upstream_cx_connect_fail{cluster="backend"}"#;

fn retry(extra: &str) -> String {
    format!("            retry:\n{extra}")
}

each_proto!(
    async fn retry_5xx_then_success(proto) {
        let up = upstream().fail_first(2, 503).start().await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                &retry("              retry_on: [5xx]\n              num_retries: 3\n              backoff_base: 1ms\n"),
                "",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/r").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(up.requests.get(), 3);
        lg.assert_stat(RETRY_STAT, 2.0).await;
        lg.assert_stat(RETRY_SUCCESS, 1.0).await;
        lg.assert_stat(RETRY_LIMIT, 0.0).await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_5xx{cluster="backend"}"#, 2.0)
            .await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="2xx"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="5xx"}"#, 0.0)
            .await;
    }
);

each_proto!(
    async fn retries_exhausted_pass_the_upstream_answer_through(proto) {
        let up = upstream().fail_first(100, 503).start().await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                &retry("              retry_on: [5xx]\n              num_retries: 2\n              backoff_base: 1ms\n"),
                "",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 503);
        assert_eq!(r.text(), "failure 3 of 100\n", "not the upstream's last answer");
        assert_eq!(up.requests.get(), 3);
        lg.assert_stat(RETRY_STAT, 2.0).await;
        lg.assert_stat(RETRY_LIMIT, 1.0).await;
        lg.assert_stat(RETRY_SUCCESS, 0.0).await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="5xx"}"#, 1.0)
            .await;
    }
);

each_proto!(
    async fn retriable_status_codes(proto) {
        let up = upstream().fail_first(1, 409).start().await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                &retry("              retry_on: [retriable-status-codes]\n              retriable_status_codes: [409]\n              backoff_base: 1ms\n"),
                "",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/").send().await.status, 200);
        assert_eq!(up.requests.get(), 2);
        // A 5xx is not in the list: not retried.
        let up5 = upstream().fail_first(1, 500).start().await;
        let lg5 = legate()
            .config(&simple_config_with(
                &[up5.addr],
                &retry("              retry_on: [retriable-status-codes]\n              retriable_status_codes: [409]\n"),
                "",
            ))
            .start();
        let mut c = client(proto, lg5.addr("web")).await;
        assert_eq!(c.get("/").send().await.status, 500);
        assert_eq!(up5.requests.get(), 1);
    }
);

each_proto!(
    async fn post_is_not_retried_unless_allowed(proto) {
        let up = upstream().fail_first(1, 503).start().await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                &retry("              retry_on: [5xx]\n              backoff_base: 1ms\n"),
                "",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/").body("order=1").send().await;
        assert_eq!(r.status, 503);
        assert_eq!(up.requests.get(), 1, "POST retried");
        lg.assert_stat(RETRY_STAT, 0.0).await;

        let up = upstream().fail_first(1, 503).start().await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                &retry("              retry_on: [5xx]\n              retry_non_idempotent: true\n              backoff_base: 1ms\n"),
                "",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/").body("order=1").send().await;
        assert_eq!(r.status, 200);
        // The body is replayed on the retry.
        assert_eq!(r.echo().body, "order=1");
        assert_eq!(up.requests.get(), 2);
        lg.assert_stat(RETRY_STAT, 1.0).await;
    }
);

each_proto!(
    /// A route that retries streams the request body upstream as it comes,
    /// keeping a copy for the retry (Envoy's retry buffer), and a retry
    /// replays the copy and goes on with the rest. The body was read whole
    /// before anything went upstream: a gRPC client or bidirectional stream
    /// (any exchange whose upstream answers before the request ends) got
    /// nothing until the route timeout (408). Here the first attempt is
    /// answered 503 and the retry echoes the body back as it comes, while the
    /// client has sent only part of it; over an HTTP/1.1 upstream (which goes
    /// on writing the failed attempt's body after its answer) and an HTTP/2 one.
    async fn a_retried_route_streams_the_body_and_replays_it_mid_stream(proto) {
        use http_body_util::BodyExt;
        for h2_upstream in [false, true] {
            let seen = Arc::new(AtomicUsize::new(0));
            let counted = seen.clone();
            let up = upstream().route("/duplex", move |req: Request<Incoming>| {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        // At once, the body unread.
                        let mut r = Response::new(BodyExt::boxed(Full::new(Bytes::from("busy"))
                            .map_err(|never| match never {})));
                        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        return r;
                    }
                    // The request body back as it comes.
                    Response::new(BodyExt::boxed(req.into_body().map_err(BoxError::from)))
                }
            });
            let up = if h2_upstream { up.h2() } else { up }.start().await;
            let lg = legate()
                .config(&simple_config_with(
                    &[up.addr],
                    &retry("              retry_on: [5xx]\n              retry_non_idempotent: true\n              backoff_base: 1ms\n"),
                    if h2_upstream { "    protocol: h2\n" } else { "" },
                ))
                .start();
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            let body = futures_util::stream::unfold(rx, |mut rx| async move {
                let chunk = rx.recv().await?;
                Some((Ok::<_, BoxError>(hyper::body::Frame::data(chunk)), rx))
            });
            tx.send(Bytes::from("one;")).await.unwrap();
            let mut c = client(proto, lg.addr("web")).await;
            let head = tokio::time::timeout(
                HANG_GUARD,
                c.post("/duplex")
                    .boxed_body(BodyExt::boxed(http_body_util::StreamBody::new(body)))
                    .send_for_head(),
            )
            .await
            .expect("no response head while the request body streams");
            assert_eq!(head.status(), 200, "h2 upstream: {h2_upstream}");
            tx.send(Bytes::from("two;")).await.unwrap();
            drop(tx);
            let got = tokio::time::timeout(HANG_GUARD, head.into_body().collect())
                .await
                .expect("the response body never ended")
                .unwrap()
                .to_bytes();
            assert_eq!(got, "one;two;", "h2 upstream: {h2_upstream}");
            assert_eq!(seen.load(Ordering::SeqCst), 2);
            lg.assert_stat(RETRY_STAT, 1.0).await;
            lg.assert_stat(FIVE_XX, 1.0).await;
            lg.assert_stat(TWO_XX, 1.0).await;
        }
    }
);

/// An HTTP/2 upstream that resets its stream after the response head: the
/// client's stream is reset with Legate's own code (`INTERNAL_ERROR`), not the
/// upstream's, which went on as it came. A `REFUSED_STREAM` then told the
/// client the request was never processed, though it was answered (curl and
/// gRPC clients send it again by themselves); a `PROTOCOL_ERROR` blamed the
/// client. (HTTP/2 clients only: an HTTP/1.1 one gets the body cut short
/// either way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_after_the_head_is_not_passed_on_as_its_code() {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    // The reset waits for the client to have the head (a reset right after
    // it may overtake it).
    let headed = Arc::new(tokio::sync::Notify::new());
    let told = headed.clone();
    let up = upstream()
        .h2()
        .route("/reset/*", move |req: Request<Incoming>| {
            let told = told.clone();
            async move {
                let reason = match req.uri().path() {
                    "/reset/refused" => h2::Reason::REFUSED_STREAM,
                    _ => h2::Reason::PROTOCOL_ERROR,
                };
                let first = futures_util::stream::once(async {
                    Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"partial")))
                });
                // hyper resets the stream with the reason of an h2 error.
                let reset = futures_util::stream::once(async move {
                    told.notified().await;
                    Err::<hyper::body::Frame<Bytes>, BoxError>(Box::new(h2::Error::from(reason)))
                });
                Response::new(BodyExt::boxed(http_body_util::StreamBody::new(
                    first.chain(reset),
                )))
            }
        })
        .start()
        .await;
    let lg = legate()
        .config(&simple_config_with(&[up.addr], "", "    protocol: h2\n"))
        .start();
    for path in ["/reset/refused", "/reset/protocol"] {
        let mut c = client(Proto::H2, lg.addr("web")).await;
        let head = c.get(path).send_for_head().await;
        assert_eq!(head.status(), 200, "{path}");
        headed.notify_one();
        let err = head
            .into_body()
            .collect()
            .await
            .expect_err("the body was not reset");
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        let mut reason = None;
        while let Some(e) = src {
            if let Some(h2e) = e.downcast_ref::<h2::Error>() {
                reason = h2e.reason();
                break;
            }
            src = e.source();
        }
        assert_eq!(reason, Some(h2::Reason::INTERNAL_ERROR), "{path}: {err}");
    }
    lg.assert_stat(TWO_XX, 2.0).await;
    lg.assert_stat(RX_RESET, 2.0).await;
}

each_proto!(
    async fn retry_goes_to_another_endpoint(proto) {
        let bad = upstream().name("bad").status(503).start().await;
        let good = upstream().name("good").start().await;
        // The failing endpoint has most of the weight: a retry that re-picked by
        // weight alone would usually land on it again.
        let cfg = format!(
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
            retry:
              retry_on: [5xx]
              num_retries: 1
              backoff_base: 1ms
clusters:
  - name: backend
    endpoints:
      - address: {}
        weight: 10
      - address: {}
        weight: 1
",
            bad.addr, good.addr
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        for i in 0..20 {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
            assert_eq!(r.header("x-upstream"), Some("good"));
        }
        assert!(bad.requests.get() >= 10, "bad got {}", bad.requests.get());
        assert_eq!(good.requests.get(), 20);
    }
);

each_proto!(
    async fn route_timeout_is_504(proto) {
        let up = upstream().delay(Duration::from_secs(3)).start().await;
        let lg = legate()
            .config(&simple_config_with(&[up.addr], "            timeout: 200ms\n", ""))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // The upstream answers after 3s: a 504 is the 200ms timeout's.
        let r = c.get("/").send().await;
        assert_eq!(r.status, 504);
        assert_eq!(r.text(), "upstream_timeout\n");
        lg.assert_stat(r#"legate_cluster_upstream_rq_timeout{cluster="backend"}"#, 1.0)
            .await;
        // The timed-out attempt is a 5xx of the cluster, as Envoy's 504. (It was 0.)
        lg.assert_stat(FIVE_XX, 1.0).await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="5xx"}"#, 1.0)
            .await;
    }
);

/// A unary gRPC call with an empty message.
async fn grpc_call(c: &mut Client, path: &str) -> Resp {
    c.post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Bytes::from_static(b"\0\0\0\0\0"))
        .send()
        .await
}

each_proto!(
    /// Envoy's gRPC conditions (`unavailable`, `cancelled`,
    /// `deadline-exceeded`, `resource-exhausted`, `internal`) retry a
    /// trailers-only response whose `grpc-status` they name, whatever the
    /// method (gRPC calls are POSTs); other statuses pass through. They were
    /// config errors.
    async fn grpc_conditions_retry_the_status_they_name(proto) {
        let calls = Arc::new(AtomicUsize::new(0));
        let calls2 = calls.clone();
        let up = upstream()
            .handler(move |req| {
                let n = calls2.fetch_add(1, Ordering::SeqCst);
                async move {
                    // UNAVAILABLE, then NOT_FOUND (not listed), then OK.
                    let status = match (req.uri().path(), n) {
                        ("/svc/Unavailable", _) => "14",
                        (_, 0) => "14",
                        (_, 1) => "5",
                        _ => "0",
                    };
                    let mut r = Response::new(Full::new(Bytes::new()));
                    let h = r.headers_mut();
                    h.insert("content-type", HeaderValue::from_static("application/grpc"));
                    h.insert("grpc-status", HeaderValue::from_static(status));
                    r
                }
            })
            .start()
            .await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                &retry("              retry_on: [unavailable, internal]\n              num_retries: 3\n              backoff_base: 1ms\n"),
                "",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = grpc_call(&mut c, "/svc/Method").await;
        // UNAVAILABLE retried; NOT_FOUND is not among the conditions.
        assert_eq!(r.header("grpc-status"), Some("5"));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        lg.assert_stat(RETRY_STAT, 1.0).await;
        lg.assert_stat(RETRY_SUCCESS, 1.0).await;
        let r = grpc_call(&mut c, "/svc/Unavailable").await;
        assert_eq!(r.header("grpc-status"), Some("14"));
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        lg.assert_stat(RETRY_LIMIT, 1.0).await;
    }
);

each_proto!(
    async fn per_try_timeout_then_retry_succeeds(proto) {
        let calls = Arc::new(AtomicUsize::new(0));
        let calls2 = calls.clone();
        let up = upstream()
            .handler(move |req| {
                let n = calls2.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    echo(req).await
                }
            })
            .start()
            .await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                "            timeout: 5s\n            per_try_timeout: 200ms\n            retry:\n              retry_on: [5xx]\n              backoff_base: 1ms\n",
                "",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // The first attempt would answer after 3s, within the route's 5s: a
        // second attempt (and the counters) show the per-try timeout cut it.
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        lg.assert_stat(RETRY_STAT, 1.0).await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_timeout{cluster="backend"}"#, 1.0)
            .await;
        // Per attempt: the timed-out one is a 5xx, the retry a 2xx.
        lg.assert_stat(FIVE_XX, 1.0).await;
        lg.assert_stat(TWO_XX, 1.0).await;
    }
);

each_proto!(
    async fn per_try_timeout_without_retry_is_504(proto) {
        let up = upstream().delay(Duration::from_secs(3)).start().await;
        let lg = legate()
            .config(&simple_config_with(&[up.addr], "            per_try_timeout: 150ms\n", ""))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // The upstream answers after 3s, within the route's default 15s.
        let r = c.get("/").send().await;
        assert_eq!(r.status, 504);
        assert_eq!(r.text(), "upstream_per_try_timeout\n");
        lg.assert_stat(r#"legate_cluster_upstream_rq_timeout{cluster="backend"}"#, 1.0)
            .await;
        lg.assert_stat(FIVE_XX, 1.0).await;
    }
);

each_proto!(
    async fn connect_failure_is_502_naming_the_cause(proto) {
        let dead = closed_port_addr();
        let lg = legate().config(&simple_config(&[dead])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 502);
        assert_eq!(r.text(), "upstream_connect_failure\n");
        lg.assert_stat(CX_CONNECT_FAIL, 1.0).await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="5xx"}"#, 1.0)
            .await;
        // The failed attempt is a 5xx of the cluster (Envoy's 503 UF), and the
        // failed connection an attempt in `cx_total`. (Both were 0.)
        lg.assert_stat(FIVE_XX, 1.0).await;
        lg.assert_stat(CX_TOTAL, 1.0).await;
        // The downstream connection survives the upstream failure.
        let r = c.get("/").send().await;
        assert_eq!(r.status, 502);
        lg.assert_stat(CX_CONNECT_FAIL, 2.0).await;
        lg.assert_stat(CX_TOTAL, 2.0).await;
        lg.assert_stat(FIVE_XX, 2.0).await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_total{cluster="backend"}"#, 2.0)
            .await;
    }
);

each_proto!(
    /// A connect failure is retried on another endpoint under
    /// `connect-failure`, and under `reset` too (Envoy's `reset` covers an
    /// upstream that "does not respond at all"); for any method, POST too:
    /// nothing of the request reached the upstream (nginx's
    /// `proxy_next_upstream error`). Both were 502 for about half the requests.
    async fn connect_failure_is_retried_on_another_endpoint(proto) {
        let dead = closed_port_addr();
        let up = upstream().name("live").start().await;
        for (n, on) in ["connect-failure", "reset"].into_iter().enumerate() {
            let lg = legate()
                .config(&simple_config_with(
                    &[dead, up.addr],
                    &retry(&format!("              retry_on: [{on}]\n              backoff_base: 1ms\n")),
                    "",
                ))
                .start();
            let mut c = client(proto, lg.addr("web")).await;
            for i in 0..6 {
                let r = c.get("/").send().await;
                assert_eq!(r.status, 200, "{on}: {}", r.text());
                let body = format!("post-{i}");
                let r = c.post("/").body(body.clone()).send().await;
                assert_eq!(r.status, 200, "{on}: POST: {}", r.text());
                assert_eq!(r.echo().body, body);
            }
            assert_eq!(up.requests.get(), 12 * (n + 1));
            lg.assert_stat_with(
                r#"legate_cluster_upstream_cx_connect_fail{cluster="backend"}"#,
                |v| v >= 2.0,
                ">= 2",
            )
            .await;
        }
    }
);

each_proto!(
    /// A connect that neither opens nor is refused (SYNs dropped) ends at the
    /// cluster's `connect_timeout` as a connect failure, counted in
    /// `upstream_cx_connect_timeout` as well as `upstream_cx_connect_fail`, as
    /// Envoy's. (The timeout had no counter of its own.)
    async fn connect_timeout_is_a_connect_failure_with_its_own_counter(proto) {
        let hole = unanswering_addr();
        let lg = legate()
            .config(&simple_config_with(&[hole], "", "    connect_timeout: 100ms\n"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for n in 1..=2 {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 502);
            assert_eq!(r.text(), "upstream_connect_failure\n");
            lg.assert_stat(CX_CONNECT_FAIL, f64::from(n)).await;
            lg.assert_stat(
                r#"legate_cluster_upstream_cx_connect_timeout{cluster="backend"}"#,
                f64::from(n),
            )
            .await;
            lg.assert_stat(CX_TOTAL, f64::from(n)).await;
        }
        // `/clusters` names the cause as the endpoint's last connect failure.
        let (status, clusters) = lg.admin_get("/clusters").await;
        assert_eq!(status, 200);
        assert!(clusters.contains("timed out after 100ms"), "{clusters}");
    }
);

each_proto!(
    /// A refused connect is no timeout.
    async fn refused_connect_is_no_connect_timeout(proto) {
        let lg = legate().config(&simple_config(&[closed_port_addr()])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 502);
        lg.assert_stat(CX_CONNECT_FAIL, 1.0).await;
        lg.assert_stat(
            r#"legate_cluster_upstream_cx_connect_timeout{cluster="backend"}"#,
            0.0,
        )
        .await;
    }
);

each_proto!(
    async fn upstream_reset_is_502(proto) {
        let up = upstream().close_connection().start().await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 502);
        assert_eq!(r.text(), "upstream_reset\n");
        assert_eq!(up.requests.get(), 1);
        // The reset attempt is a 5xx of the cluster, as Envoy's. (It was 0.)
        lg.assert_stat(FIVE_XX, 1.0).await;
        lg.assert_stat(TWO_XX, 0.0).await;
        lg.assert_stat(RX_RESET, 1.0).await;
    }
);

each_proto!(
    /// An HTTP/1.1 upstream that closes its connection mid-body (after the
    /// head) reset the attempt: `upstream_rq_rx_reset`, as Envoy's, and no
    /// second status class. The client's response is cut. A whole response
    /// is no upstream reset. (An upstream reset after the head counted
    /// nowhere in the cluster.)
    async fn an_upstream_cutting_its_body_is_an_upstream_reset(proto) {
        use futures_util::StreamExt;
        use http_body_util::BodyExt;
        // The cut waits for the client to have the head (hyper's server would
        // close before sending a head whose body failed at once).
        let headed = Arc::new(tokio::sync::Notify::new());
        let told = headed.clone();
        let up = upstream()
            .route("/cut", move |_req: Request<Incoming>| {
                let told = told.clone();
                async move {
                    let first = futures_util::stream::once(async {
                        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"partial")))
                    });
                    let cut = futures_util::stream::once(async move {
                        told.notified().await;
                        Err::<hyper::body::Frame<Bytes>, BoxError>("cut".into())
                    });
                    Response::new(BodyExt::boxed(http_body_util::StreamBody::new(
                        first.chain(cut),
                    )))
                }
            })
            .start()
            .await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let head = c.get("/cut").send_for_head().await;
        assert_eq!(head.status(), 200);
        headed.notify_one();
        head.into_body()
            .collect()
            .await
            .expect_err("the body was not cut");
        lg.assert_stat(RX_RESET, 1.0).await;
        lg.assert_stat(TWO_XX, 1.0).await;
        lg.assert_stat(FIVE_XX, 0.0).await;
        // Legate cut the client's response (Envoy's `downstream_rq_tx_reset`).
        let tx = r#"legate_listener_tx_resets_total{listener="web"}"#;
        lg.assert_stat(tx, 1.0).await;
        lg.assert_stat(r#"legate_listener_rx_resets_total{listener="web"}"#, 0.0)
            .await;
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/whole").send().await.status, 200);
        lg.assert_stat(TWO_XX, 2.0).await;
        lg.assert_stat(RX_RESET, 1.0).await;
        lg.assert_stat(tx, 1.0).await;
    }
);

each_proto!(
    async fn reset_is_retried(proto) {
        let bad = upstream().close_connection().start().await;
        let good = upstream().name("good").start().await;
        let lg = legate()
            .config(&simple_config_with(
                &[bad.addr, good.addr],
                &retry("              retry_on: [reset]\n              backoff_base: 1ms\n"),
                "",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..4 {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-upstream"), Some("good"));
        }
        let reset = bad.requests.get();
        assert!(reset >= 1);
        // Each attempt counts: every reset one as a 5xx, each answer as a 2xx.
        lg.assert_stat(RETRY_STAT, reset as f64).await;
        lg.assert_stat(FIVE_XX, reset as f64).await;
        lg.assert_stat(TWO_XX, 4.0).await;
    }
);

/// An upstream that answers every request with a response head that does not
/// parse (`garbage`), then closes; counts the connections it took.
async fn malformed_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let _ = tcp.write_all(b"HTTP/1.1 2OO Not A Status\r\n\r\n").await;
            });
        }
    });
    (addr, conns)
}

each_proto!(
    /// A response head that does not parse (502 `upstream_protocol_error`)
    /// is retried under `reset` and `5xx`, as Envoy retries the stream reset
    /// its codec makes of a protocol error: the retry goes to the other
    /// endpoint. (It was never retried.)
    async fn a_malformed_response_is_retried(proto) {
        let (bad, bad_conns) = malformed_upstream().await;
        let good = upstream().name("good").start().await;
        for retry_on in ["reset", "5xx"] {
            let lg = legate()
                .config(&simple_config_with(
                    &[bad, good.addr],
                    &retry(&format!(
                        "              retry_on: [{retry_on}]\n              backoff_base: 1ms\n"
                    )),
                    "    protocol: http1\n",
                ))
                .start();
            let mut c = client(proto, lg.addr("web")).await;
            let before = bad_conns.load(Ordering::SeqCst);
            for i in 0..4 {
                let r = c.get("/").send().await;
                assert_eq!(r.status, 200, "{retry_on}, request {i}: {}", r.text());
                assert_eq!(r.header("x-upstream"), Some("good"));
            }
            let tried = bad_conns.load(Ordering::SeqCst) - before;
            assert!(tried >= 1, "{retry_on}: the malformed endpoint was never tried");
            lg.assert_stat(RETRY_STAT, tried as f64).await;
            lg.assert_stat(FIVE_XX, tried as f64).await;
        }
        // Without a retry, the client gets the 502.
        let lg = legate().config(&simple_config(&[bad])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 502);
        assert_eq!(r.text(), "upstream_protocol_error\n");
        // The protocol error is a 5xx of the cluster (Envoy's 502 UPE). (It was 0.)
        lg.assert_stat(FIVE_XX, 1.0).await;
    }
);

each_proto!(
    /// A retry that cannot be made when its turn comes gives the client the
    /// upstream's answer, as one over the retry limit does, not Legate's 503:
    /// here no endpoint is left to take it (the only one was ejected by the
    /// 503 itself, panic mode off). It is not counted as a retry. (The client
    /// got 503 `no_healthy_upstream`, and `upstream_rq_retry` counted it.)
    async fn a_retry_no_endpoint_can_take_sends_back_the_previous_answer(proto) {
        let up = upstream().status(503).response_header("retry-after", "7").start().await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                &retry("              retry_on: [5xx]\n              num_retries: 2\n              backoff_base: 1ms\n"),
                "    panic_threshold: 0%\n    outlier_detection: { consecutive_gateway_failure: 1 }\n",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/once").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("retry-after"), Some("7"), "not the upstream's answer: {}", r.text());
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(
            r#"legate_cluster_outlier_detection_ejections_total{cluster="backend"}"#,
            1.0,
        )
        .await;
        lg.assert_stat(RETRY_STAT, 0.0).await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_total{cluster="backend"}"#, 1.0)
            .await;
    }
);

each_proto!(
    /// The answer sent back after a refused retry counts as active
    /// (`upstream_rq_active`, the endpoint's `rq_active`) while its body
    /// streams, as any answer's does: `max_requests` and `least_request` see
    /// it. (Its count was given back for the retry and not taken again, so the
    /// gauges showed 0 while the upstream was still sending.)
    async fn the_answer_after_a_refused_retry_stays_active_while_its_body_streams(proto) {
        use futures_util::StreamExt;
        use http_body_util::BodyExt;
        let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held = release.clone();
        let up = upstream()
            .handler(move |_req: Request<Incoming>| {
                let held = held.clone();
                async move {
                    let rest = async move {
                        while !held.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"rest\n")))
                    };
                    let first = futures_util::stream::once(async {
                        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"busy, ")))
                    });
                    let body = first.chain(futures_util::stream::once(rest));
                    let mut resp = Response::new(BodyExt::boxed(http_body_util::StreamBody::new(body)));
                    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    resp
                }
            })
            .start()
            .await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                &retry("              retry_on: [5xx]\n              num_retries: 2\n              backoff_base: 1ms\n"),
                "    panic_threshold: 0%\n    outlier_detection: { consecutive_gateway_failure: 1 }\n",
            ))
            .start();
        let addr = lg.addr("web");
        let request = tokio::spawn(async move {
            let mut c = client(proto, addr).await;
            c.get("/").send().await
        });
        lg.assert_stat(
            r#"legate_cluster_outlier_detection_ejections_total{cluster="backend"}"#,
            1.0,
        )
        .await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_active{cluster="backend"}"#, 1.0)
            .await;
        release.store(true, Ordering::SeqCst);
        let r = request.await.unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.text(), "busy, rest\n", "not the upstream's answer");
        lg.assert_stat(r#"legate_cluster_upstream_rq_active{cluster="backend"}"#, 0.0)
            .await;
        lg.assert_stat(RETRY_STAT, 0.0).await;
    }
);

each_proto!(
    /// With `max_requests: 1` and two clients, a request whose attempt
    /// reached the upstream always gets the upstream's answer: its retry is
    /// admitted before that answer is dropped (before the backoff), and one
    /// refused sends the answer back. Only requests refused at their first
    /// attempt get Legate's 503. (The retry took its slot after the backoff:
    /// the other client's request took it meanwhile and the client whose
    /// request the upstream had answered got `x-legate-overloaded`.)
    async fn a_retry_refused_by_max_requests_sends_back_the_previous_answer(proto) {
        let seen: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
        let recorded = seen.clone();
        let up = upstream()
            .handler(move |req: Request<Incoming>| {
                let recorded = recorded.clone();
                async move {
                    if let Some(id) = req.headers().get("x-id") {
                        recorded.lock().unwrap().insert(id.to_str().unwrap().to_string());
                    }
                    let mut resp = Response::new(Full::new(Bytes::from_static(b"busy\n")));
                    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    resp.headers_mut().insert("retry-after", HeaderValue::from_static("7"));
                    resp
                }
            })
            .start()
            .await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                &retry("              retry_on: [5xx]\n              num_retries: 1\n              backoff_base: 50ms\n"),
                "    circuit_breakers: { max_requests: 1 }\n",
            ))
            .start();
        let addr = lg.addr("web");
        let run = |who: &'static str| {
            let seen = seen.clone();
            async move {
                let mut c = client(proto, addr).await;
                let mut answered = 0;
                for i in 0..20 {
                    let id = format!("{who}-{i}");
                    let r = c.get("/").header("x-id", &id).send().await;
                    assert_eq!(r.status, 503, "{}", r.text());
                    if r.header("retry-after") == Some("7") {
                        answered += 1;
                        continue;
                    }
                    assert_eq!(r.header("x-legate-overloaded"), Some("true"), "{}", r.text());
                    assert!(
                        !seen.lock().unwrap().contains(&id),
                        "request {id} reached the upstream, yet its client got Legate's 503"
                    );
                }
                answered
            }
        };
        let (a, b) = tokio::join!(run("a"), run("b"));
        assert!(a + b > 0, "no request reached the upstream");
        assert_eq!(seen.lock().unwrap().len(), a + b);
    }
);

/// A request body on a route that retries streams upstream as any other (a
/// copy kept for the retry), so a client that stops sending it is the stream
/// idle timeout's: 408 `stream_idle_timeout`, as on a route without retries,
/// not held with its buffer for as long as the client keeps the connection.
/// (It was read whole first, bounded by the route timeout: 408
/// `request_timeout`, nothing sent upstream.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_on_a_retried_route_is_the_stream_idle_timeouts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().start().await;
    let lg = legate()
        .config(&simple_config_with(
            &[up.addr],
            "            idle_timeout: 300ms\n            retry:\n              retry_on: [5xx]\n              num_retries: 1\n",
            "",
        ))
        .start();
    let mut s = tokio::net::TcpStream::connect(lg.addr("web"))
        .await
        .unwrap();
    s.write_all(b"PUT /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "no answer while the body stalls");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("stream_idle_timeout"), "{text}");
    assert_eq!(up.requests.get(), 1);
    lg.assert_stat(
        r#"legate_listener_requests_total{listener="web",class="4xx"}"#,
        1.0,
    )
    .await;
}

const TIMEOUT_STAT: &str = r#"legate_cluster_upstream_rq_timeout{cluster="backend"}"#;

/// Two routes to `up` (spoken to in `protocol`): `/route/` with a route
/// `timeout` of 1s, `/try/` with a `per_try_timeout` of 1s alone (`timeout: 0s`).
fn upload_config(up: std::net::SocketAddr, protocol: &str) -> String {
    web_config(
        "          - match: { prefix: /route/ }
            cluster: backend
            timeout: 1s
          - match: { prefix: /try/ }
            cluster: backend
            timeout: 0s
            per_try_timeout: 1s
",
        &format!(
            "  - name: backend\n    protocol: {protocol}\n    endpoints:\n      - address: {up}\n"
        ),
    )
}

/// `n` chunks `gap` apart: an upload of `n × gap`, each gap far inside the
/// stream idle timeout.
fn trickle(n: usize, gap: Duration) -> BoxBody {
    use futures_util::StreamExt;
    let s = futures_util::stream::iter(0..n).then(move |i| async move {
        tokio::time::sleep(gap).await;
        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(format!("chunk-{i};"))))
    });
    http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(s))
}

fn trickled(n: usize) -> usize {
    (0..n).map(|i| format!("chunk-{i};").len()).sum()
}

each_proto!(
    /// The route and per-try timeouts start once the streamed request body
    /// has gone upstream whole (as Envoy's): an upload that takes three times
    /// the timeout (a chunk every 300ms) to an upstream that answers at its
    /// end gets the answer, and no timeout is counted against the endpoint.
    async fn a_slow_upload_is_not_timed_by_the_route_or_per_try_timeout(proto) {
        let up = upstream().handler(sink).start().await;
        for protocol in ["http1", "h2"] {
            let lg = legate().config(&upload_config(up.addr, protocol)).start();
            let web = lg.addr("web");
            let upload = |path: &'static str| async move {
                let mut c = client(proto, web).await;
                let sent = c
                    .post(path)
                    .boxed_body(trickle(10, Duration::from_millis(300)))
                    .send();
                let r = tokio::time::timeout(HANG_GUARD, sent)
                    .await
                    .expect("the upload was never answered");
                assert_eq!(r.status, 200, "{protocol} {path}: {}", r.text());
                assert_eq!(r.json()["len"], trickled(10), "{protocol} {path}");
            };
            tokio::join!(upload("/route/up"), upload("/try/up"));
            lg.assert_stat(TIMEOUT_STAT, 0.0).await;
            let errors = format!(
                "legate_endpoint_rq_error{{cluster=\"backend\",endpoint=\"{}\"}}",
                up.addr
            );
            lg.assert_stat(&errors, 0.0).await;
            lg.assert_stat(
                r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
                2.0,
            )
            .await;
        }
    }
);

each_proto!(
    /// An upstream that answers before the upload ends (without reading it)
    /// ends the wait as ever: its answer goes back, no timeout ran.
    async fn an_early_answer_during_a_slow_upload_goes_back(proto) {
        let up = upstream()
            .handler(|_req: Request<Incoming>| async {
                Response::new(Full::new(Bytes::from_static(b"early\n")))
            })
            .start()
            .await;
        let lg = legate().config(&upload_config(up.addr, "http1")).start();
        for path in ["/route/up", "/try/up"] {
            let mut c = client(proto, lg.addr("web")).await;
            let sent = c
                .post(path)
                .boxed_body(trickle(5, Duration::from_millis(300)))
                .send();
            let r = tokio::time::timeout(HANG_GUARD, sent)
                .await
                .expect("the early answer did not come back");
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            assert_eq!(r.text(), "early\n", "{path}");
        }
        lg.assert_stat(TIMEOUT_STAT, 0.0).await;
    }
);

each_proto!(
    /// After a slow upload the timeouts do run: an upstream that reads the
    /// whole body and never answers gets its 504, counted as its timeout.
    async fn the_timeouts_run_once_the_upload_has_gone_upstream(proto) {
        let up = upstream()
            .handler(|req: Request<Incoming>| async move {
                let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Response::new(Full::new(Bytes::new()))
            })
            .start()
            .await;
        let lg = legate().config(&upload_config(up.addr, "http1")).start();
        let cases = [
            ("/route/up", "upstream_timeout\n"),
            ("/try/up", "upstream_per_try_timeout\n"),
        ];
        for (n, (path, cause)) in cases.into_iter().enumerate() {
            let mut c = client(proto, lg.addr("web")).await;
            let sent = c
                .post(path)
                .boxed_body(trickle(5, Duration::from_millis(300)))
                .send();
            let r = tokio::time::timeout(HANG_GUARD, sent)
                .await
                .expect("the timeout never ran");
            assert_eq!(r.status, 504, "{path}: {}", r.text());
            assert_eq!(r.text(), cause, "{path}");
            lg.assert_stat(TIMEOUT_STAT, (n + 1) as f64).await;
        }
    }
);

each_proto!(
    /// A client that stops sending its streamed body is the stream idle
    /// timeout's (408), not the route timeout's: the endpoint waiting for the
    /// rest is not blamed (no 504, no timeout counted).
    async fn a_stalled_upload_is_the_idle_timeouts_not_the_endpoints(proto) {
        let up = upstream().handler(sink).start().await;
        let cfg = simple_config_with(&[up.addr], "            timeout: 300ms\n", "").replacen(
            "      routes: main\n",
            "      routes: main\n      stream_idle_timeout: 1s\n",
            1,
        );
        let lg = legate().config(&cfg).start();
        let answer = async {
            match proto {
                Proto::H1 => {
                    let mut c = RawConn::connect(lg.addr("web")).await;
                    c.write(b"PUT /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
                        .await;
                    let got = c.read_head(HANG_GUARD).await;
                    let text = String::from_utf8_lossy(&got).into_owned();
                    (raw_status(&got), text)
                }
                Proto::H2 => {
                    use futures_util::StreamExt;
                    // Ten bytes, then nothing, with the stream left open.
                    let stalled = futures_util::stream::iter([Ok::<_, BoxError>(
                        hyper::body::Frame::data(Bytes::from_static(b"0123456789")),
                    )])
                    .chain(futures_util::stream::pending());
                    let r = client(proto, lg.addr("web"))
                        .await
                        .request(Method::PUT, "/up")
                        .boxed_body(http_body_util::BodyExt::boxed(
                            http_body_util::StreamBody::new(stalled),
                        ))
                        .send()
                        .await;
                    (Some(r.status.as_u16()), r.text())
                }
            }
        };
        let (status, text) = tokio::time::timeout(HANG_GUARD, answer)
            .await
            .expect("no answer while the body stalls");
        assert_eq!(status, Some(408), "{text}");
        // The cause: the 408 is the idle timeout's (the head may come alone).
        lg.assert_stat(
            r#"legate_listener_stream_idle_timeouts_total{listener="web"}"#,
            1.0,
        )
        .await;
        lg.assert_stat(TIMEOUT_STAT, 0.0).await;
    }
);

/// An HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `RST_STREAM` `REFUSED_STREAM` (RFC 9113 §8.7: not processed) on `stream`.
fn refuse(stream: u32) -> Vec<u8> {
    const REFUSED_STREAM: u32 = 0x7;
    h2_frame(3, 0, stream, &REFUSED_STREAM.to_be_bytes())
}

/// An h2c upstream of raw frames that answers the first stream it gets with
/// `first(stream)` and every later one with an empty 200 once its request
/// ended. Counts the request heads.
async fn raw_h2_upstream(first: fn(u32) -> Vec<u8>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let counted = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let heads = counted.clone();
            tokio::spawn(async move {
                // Ends when Legate closes the connection.
                let _: std::io::Result<()> = async {
                    let mut preface = [0u8; 24];
                    s.read_exact(&mut preface).await?;
                    s.write_all(&h2_frame(4, 0, 0, &[])).await?;
                    loop {
                        let mut head = [0u8; 9];
                        s.read_exact(&mut head).await?;
                        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let mut payload = vec![0u8; len];
                        s.read_exact(&mut payload).await?;
                        let (kind, flags) = (head[3], head[4]);
                        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
                        let end_stream = flags & 1 != 0;
                        match kind {
                            // HEADERS: the first request gets `first`.
                            1 if heads.fetch_add(1, Ordering::SeqCst) == 0 => {
                                s.write_all(&first(stream)).await?;
                            }
                            // HEADERS or DATA ending a later request: `:status: 200`
                            // (HPACK static index 8), END_STREAM | END_HEADERS.
                            0 | 1 if end_stream && heads.load(Ordering::SeqCst) > 1 => {
                                s.write_all(&h2_frame(1, 0x5, stream, &[0x88])).await?;
                            }
                            4 if flags & 1 == 0 => s.write_all(&h2_frame(4, 1, 0, &[])).await?,
                            6 if flags & 1 == 0 => {
                                s.write_all(&h2_frame(6, 1, 0, &payload)).await?
                            }
                            _ => {}
                        }
                    }
                }
                .await;
            });
        }
    });
    (addr, heads)
}

each_proto!(
    /// A request an HTTP/2 upstream refused unprocessed (`REFUSED_STREAM`) is
    /// retried under `retry_on: [refused-stream]` whatever its method: a `POST`
    /// too, without `retry_non_idempotent` (RFC 9113 §8.7; Envoy's
    /// `refused-stream`), its body replayed.
    async fn a_refused_stream_is_retried_for_any_method(proto) {
        let (addr, heads) = raw_h2_upstream(refuse).await;
        let lg = legate()
            .config(&simple_config_with(
                &[addr],
                &retry("              retry_on: [refused-stream]\n              backoff_base: 1ms\n"),
                "    protocol: h2\n",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/orders").body("one order").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(heads.load(Ordering::SeqCst), 2);
        lg.assert_stat(RETRY_STAT, 1.0).await;
    }
);

each_proto!(
    /// `reset` alone does not retry a refused `POST`: only `refused-stream`
    /// lifts the idempotency rule, for requests the upstream did not process.
    async fn a_refused_post_is_not_retried_under_reset(proto) {
        let (addr, heads) = raw_h2_upstream(refuse).await;
        let lg = legate()
            .config(&simple_config_with(
                &[addr],
                &retry("              retry_on: [reset]\n              backoff_base: 1ms\n"),
                "    protocol: h2\n",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/orders").body("one order").send().await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.text(), "upstream_reset\n");
        assert_eq!(heads.load(Ordering::SeqCst), 1);
    }
);

/// Routes of a fault-injection test: `/abort` answers 503 itself, `/grpc`
/// a gRPC UNAVAILABLE, `/slow` is held 2.5 s before it goes upstream under a
/// 2 s route timeout, `/` forwards.
fn fault_config(up: std::net::SocketAddr, log: &std::path::Path) -> String {
    web_config(
        "          - match: { prefix: /abort }
            cluster: backend
            fault: { abort: { status: 503, percent: 100% } }
          - match: { prefix: /grpc }
            cluster: backend
            fault: { abort: { grpc_status: 14 } }
          - match: { prefix: /slow }
            cluster: backend
            timeout: 2s
            fault: { delay: { duration: 2500ms } }
          - match: { prefix: / }
            cluster: backend
",
        &format!("  - name: backend\n    endpoints:\n      - address: {up}\n"),
    )
    .replace(
        "version: 1\n",
        &format!(
            "version: 1\naccess_log: {{ path: {}, flush_interval: 10ms }}\n",
            log.display()
        ),
    )
}

each_proto!(
    /// `fault.abort`: the route answers the share drawn itself (Envoy's
    /// fault filter: its body, cause `fault_filter_abort`, flag `FI`), and the
    /// upstream never sees those requests; `grpc_status` answers gRPC's
    /// trailers-only form. Routes without `fault` are untouched.
    async fn a_fault_abort_answers_instead_of_the_upstream(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let lg = legate().config(&fault_config(up.addr, &log)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/abort").send().await;
        assert_eq!(r.status, 503);
        assert_eq!(r.text(), "fault filter abort");
        let r = c.get("/grpc").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("grpc-status"), Some("14"));
        assert_eq!(r.header("grpc-message"), Some("fault filter abort"));
        assert_eq!(up.requests.get(), 0);
        assert_eq!(c.get("/ok").send().await.status, 200);
        assert_eq!(up.requests.get(), 1);
        let lines = access_log_until(&log, "three lines", |l| l.len() >= 3).await;
        assert_eq!(lines[0]["cause"], "fault_filter_abort", "{}", lines[0]);
        assert_eq!(lines[0]["cluster"], "backend", "{}", lines[0]);
        assert_eq!(lines[1]["cause"], "fault_filter_abort", "{}", lines[1]);
        assert_eq!(lines[2].get("cause"), Some(&serde_json::Value::Null), "{}", lines[2]);
        lg.assert_stat(r#"legate_listener_fault_aborts_injected_total{listener="web"}"#, 2.0)
            .await;
        lg.assert_stat(r#"legate_listener_fault_delays_injected_total{listener="web"}"#, 0.0)
            .await;
        lg.assert_stat(TWO_XX, 1.0).await;
    }
);

each_proto!(
    /// `fault.delay`: the request is held before it goes upstream, and the
    /// route timeout starts after it (as Envoy's, whose fault filter holds the
    /// request before its router): held 2.5 s under a 2 s timeout, it is
    /// still answered by the upstream, not a 504.
    async fn a_fault_delay_holds_the_request_before_the_route_timeout(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let lg = legate().config(&fault_config(up.addr, &log)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/slow").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(r#"legate_listener_fault_delays_injected_total{listener="web"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_listener_fault_aborts_injected_total{listener="web"}"#, 0.0)
            .await;
        let lines = access_log_until(&log, "the line", |l| !l.is_empty()).await;
        assert!(lines[0]["duration_ms"].as_f64().unwrap() >= 2500.0, "{}", lines[0]);
    }
);
