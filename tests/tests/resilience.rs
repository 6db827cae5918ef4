//! Failure handling: retries (conditions, limits, idempotency, endpoint choice),
//! route and per-try timeouts, connect failures and resets.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use legate_tests::*;

const RETRY_STAT: &str = r#"legate_cluster_upstream_rq_retry{cluster="backend"}"#;

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
        let t = Instant::now();
        let r = c.get("/").send().await;
        let took = t.elapsed();
        assert_eq!(r.status, 504);
        assert_eq!(r.text(), "upstream_timeout\n");
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
        lg.assert_stat(r#"legate_cluster_upstream_rq_timeout{cluster="backend"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="5xx"}"#, 1.0)
            .await;
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
        let t = Instant::now();
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(t.elapsed() < Duration::from_millis(1500), "{:?}", t.elapsed());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        lg.assert_stat(RETRY_STAT, 1.0).await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_timeout{cluster="backend"}"#, 1.0)
            .await;
    }
);

each_proto!(
    async fn per_try_timeout_without_retry_is_504(proto) {
        let up = upstream().delay(Duration::from_secs(3)).start().await;
        let lg = legate()
            .config(&simple_config_with(&[up.addr], "            per_try_timeout: 150ms\n", ""))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let t = Instant::now();
        let r = c.get("/").send().await;
        assert_eq!(r.status, 504);
        assert!(t.elapsed() < Duration::from_millis(1500));
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
        lg.assert_stat(r#"legate_cluster_upstream_cx_connect_fail{cluster="backend"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="5xx"}"#, 1.0)
            .await;
        // The downstream connection survives the upstream failure.
        let r = c.get("/").send().await;
        assert_eq!(r.status, 502);
    }
);

each_proto!(
    async fn connect_failure_is_retried_on_another_endpoint(proto) {
        let dead = closed_port_addr();
        let up = upstream().name("live").start().await;
        let lg = legate()
            .config(&simple_config_with(
                &[dead, up.addr],
                &retry("              retry_on: [connect-failure]\n              backoff_base: 1ms\n"),
                "",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..6 {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        assert_eq!(up.requests.get(), 6);
        lg.assert_stat_with(
            r#"legate_cluster_upstream_cx_connect_fail{cluster="backend"}"#,
            |v| v >= 1.0,
            ">= 1",
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
        assert!(bad.requests.get() >= 1);
    }
);

/// A request body buffered for retries is bounded by the route timeout: a
/// client that stops sending it gets 408 (it was held, with its buffer, for as
/// long as the client kept the connection open), and nothing goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_buffered_for_retries_times_out_with_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().start().await;
    let lg = legate()
        .config(&simple_config_with(
            &[up.addr],
            "            timeout: 300ms\n            retry:\n              retry_on: [5xx]\n              num_retries: 1\n",
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
    assert!(text.contains("request_timeout"), "{text}");
    assert_eq!(up.requests.get(), 0);
    lg.assert_stat(
        r#"legate_listener_requests_total{listener="web",class="4xx"}"#,
        1.0,
    )
    .await;
}
