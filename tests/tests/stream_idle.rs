//! The stream idle timeout (`http.stream_idle_timeout`, a route's
//! `idle_timeout`): a stream on which nothing moves for that long is ended,
//! with 408 `stream_idle_timeout` before the response head and a reset (a
//! closed HTTP/1.1 connection) after it; activity in either direction keeps
//! it alive.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::BodyExt;
use legate_tests::*;

const IDLE_STAT: &str = r#"legate_listener_stream_idle_timeouts_total{listener="web"}"#;

/// Long enough for no test to finish by it: a test that waits for it fails
/// its outer bound instead.
const BOUND: Duration = Duration::from_secs(20);

/// `yaml` with the listener's `http.stream_idle_timeout` set to `t`.
fn listener_idle(yaml: &str, t: &str) -> String {
    yaml.replacen(
        "      routes: main\n",
        &format!("      routes: main\n      stream_idle_timeout: {t}\n"),
        1,
    )
}

/// A response that sends its head and one chunk, then nothing, never ending.
async fn stall(_req: Request<Incoming>) -> Response<BoxBody> {
    let s = futures_util::stream::iter([Ok::<_, BoxError>(hyper::body::Frame::data(
        Bytes::from_static(b"first"),
    ))])
    .chain(futures_util::stream::pending());
    Response::new(BodyExt::boxed(http_body_util::StreamBody::new(s)))
}

/// `n` chunks `gap` apart: each gap is activity-free, the whole is not.
fn trickle(n: usize, gap: Duration) -> BoxBody {
    let s = futures_util::stream::iter(0..n).then(move |i| async move {
        tokio::time::sleep(gap).await;
        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(format!("chunk-{i};"))))
    });
    BodyExt::boxed(http_body_util::StreamBody::new(s))
}

fn trickled(n: usize) -> String {
    (0..n).map(|i| format!("chunk-{i};")).collect()
}

/// The access log's first line, once written.
async fn first_log_line(log: &std::path::Path) -> Value {
    let line = eventually(Duration::from_secs(5), "the access-log line", || async {
        std::fs::read_to_string(log)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_string))
    })
    .await;
    serde_json::from_str(&line).unwrap()
}

each_proto!(
    /// An upstream that sends the head and then stalls: the client's body
    /// ends abnormally (HTTP/2 reset, HTTP/1.1 truncated by the close) once
    /// the stream was idle for the timeout, instead of never; counted, and
    /// logged with the status sent and the cause.
    async fn a_response_that_stalls_after_its_head_is_reset(proto) {
        let up = upstream().route("/stall", stall).start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let cfg = listener_idle(&simple_config(&[up.addr]), "300ms").replace(
            "version: 1\n",
            &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = tokio::time::timeout(BOUND, c.get("/stall").try_send())
            .await
            .expect("the stalled response was never ended");
        assert!(r.is_err(), "a stalled body ended normally: {r:?}");
        lg.assert_stat(IDLE_STAT, 1.0).await;
        let v = first_log_line(&log).await;
        assert_eq!(v["status"], 200, "{v}");
        assert_eq!(v["cause"], "stream_idle_timeout", "{v}");
        lg.assert_stat(r#"legate_listener_requests_active{listener="web"}"#, 0.0)
            .await;
    }
);

each_proto!(
    /// With the route timeout off (`0s`, long polling), an upstream that
    /// never answers is still bounded by the idle timeout: 408, the cause
    /// in the body.
    async fn an_upstream_that_never_answers_gets_408(proto) {
        let up = upstream().delay(Duration::from_secs(3600)).start().await;
        let cfg = listener_idle(
            &simple_config_with(&[up.addr], "            timeout: 0s\n", ""),
            "300ms",
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = tokio::time::timeout(BOUND, c.get("/poll").send())
            .await
            .expect("no answer from an upstream that never answers");
        assert_eq!(r.status, 408, "{}", r.text());
        assert_eq!(r.text(), "stream_idle_timeout\n");
        lg.assert_stat(IDLE_STAT, 1.0).await;
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="4xx"}"#,
            1.0,
        )
        .await;
    }
);

each_proto!(
    /// Activity resets the timer: a response body and a request body that
    /// each take longer than the timeout in total, a chunk well within it,
    /// pass intact.
    async fn bodies_that_trickle_within_the_timeout_complete(proto) {
        let up = upstream()
            .route("/slow", |_req| async {
                Response::new(trickle(8, Duration::from_millis(150)))
            })
            .route("/sink", sink)
            .start()
            .await;
        // A chunk every 150ms against 1s: a loaded machine's stalls stay inside.
        let lg = legate()
            .config(&listener_idle(&simple_config(&[up.addr]), "1s"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = tokio::time::timeout(BOUND, c.get("/slow").send())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), trickled(8));

        let mut c = client(proto, lg.addr("web")).await;
        let r = tokio::time::timeout(
            BOUND,
            c.post("/sink")
                .boxed_body(trickle(8, Duration::from_millis(150)))
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["len"], trickled(8).len());
        lg.assert_stat(IDLE_STAT, 0.0).await;
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
            2.0,
        )
        .await;
    }
);

each_proto!(
    /// A route's `idle_timeout` overrides the listener's both ways: shorter
    /// (a stall is cut on that route although the listener would wait an
    /// hour) and off (`0s`: a silence longer than the listener's timeout is
    /// left alone).
    async fn a_route_idle_timeout_overrides_the_listener(proto) {
        let up = upstream()
            .route("/short/*", stall)
            .route("/off/*", |_req| async {
                Response::new(trickle(2, Duration::from_millis(800)))
            })
            .start()
            .await;
        let cfg = format!(
            "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      stream_idle_timeout: {{LISTENER}}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: /short/ }}
            cluster: backend
            idle_timeout: 300ms
          - match: {{ prefix: /off/ }}
            cluster: backend
            idle_timeout: 0s
clusters:
  - name: backend
    endpoints:
      - address: {}
",
            up.addr
        );
        // The listener would wait an hour: the route's 300ms cuts the stall.
        let lg = legate().config(&cfg.replace("{LISTENER}", "1h")).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = tokio::time::timeout(BOUND, c.get("/short/x").try_send())
            .await
            .expect("the route's idle timeout did not apply");
        assert!(r.is_err(), "a stalled body ended normally: {r:?}");
        lg.assert_stat(IDLE_STAT, 1.0).await;
        drop(lg);

        // The listener would cut an 800ms silence: the route turned it off.
        let lg = legate().config(&cfg.replace("{LISTENER}", "300ms")).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = tokio::time::timeout(BOUND, c.get("/off/x").send())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), trickled(2));
        lg.assert_stat(IDLE_STAT, 0.0).await;
    }
);
