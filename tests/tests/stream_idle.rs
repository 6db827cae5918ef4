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

/// A response body that never ends: 8 KiB chunks, as fast as they are taken.
async fn endless(_req: Request<Incoming>) -> Response<BoxBody> {
    let chunk = Bytes::from(pattern_bytes(8 * 1024));
    let s = futures_util::stream::repeat_with(move || {
        Ok::<_, BoxError>(hyper::body::Frame::data(chunk.clone()))
    });
    Response::new(BodyExt::boxed(http_body_util::StreamBody::new(s)))
}

/// A client that sends `GET path` and then reads the response only when
/// told: what it does not read stops the response on its way, as a client
/// that stops reading does.
enum Reader {
    /// HTTP/1.1 on a raw socket with a small receive buffer: the socket
    /// fills up, then Legate's, then hyper's write buffer.
    H1(tokio::net::TcpStream),
    /// HTTP/2 with a 64 KiB stream window, which hyper's client widens only
    /// as the body is read: Legate's send window runs out. `sender` keeps the
    /// connection for another request.
    H2 {
        body: Incoming,
        sender: hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
    },
}

impl Reader {
    async fn open(proto: Proto, addr: std::net::SocketAddr, path: &str) -> Reader {
        match proto {
            Proto::H1 => {
                let s = tokio::net::TcpSocket::new_v4().unwrap();
                s.set_recv_buffer_size(4096).unwrap();
                let mut s = s.connect(addr).await.unwrap();
                let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
                tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
                    .await
                    .unwrap();
                Reader::H1(s)
            }
            Proto::H2 => {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .initial_stream_window_size(65_535)
                        .handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let r = sender.send_request(h2_get(addr, path)).await.unwrap();
                assert_eq!(r.status(), 200);
                Reader::H2 {
                    body: r.into_body(),
                    sender,
                }
            }
        }
    }

    /// Reads at least `n` bytes of the response (its head included, over
    /// HTTP/1.1); `false` if it ended first.
    async fn read(&mut self, n: usize) -> bool {
        let mut got = 0;
        while got < n {
            let read = match self {
                Reader::H1(s) => {
                    let mut buf = [0u8; 16 * 1024];
                    tokio::io::AsyncReadExt::read(s, &mut buf)
                        .await
                        .unwrap_or(0)
                }
                Reader::H2 { body, .. } => match body.frame().await {
                    Some(Ok(f)) => f.data_ref().map_or(0, Bytes::len),
                    _ => 0,
                },
            };
            if read == 0 {
                return false;
            }
            got += read;
        }
        true
    }

    /// Reads on until the response is cut (the body is endless): HTTP/1.1
    /// sees the connection close once what was on its way is read, HTTP/2
    /// the stream reset.
    async fn until_cut(&mut self) {
        tokio::time::timeout(HANG_GUARD, async {
            match self {
                Reader::H1(s) => {
                    let mut buf = [0u8; 64 * 1024];
                    while tokio::io::AsyncReadExt::read(s, &mut buf)
                        .await
                        .is_ok_and(|n| n > 0)
                    {}
                }
                Reader::H2 { body, .. } => loop {
                    match body.frame().await {
                        Some(Ok(_)) => {}
                        Some(Err(_)) => break,
                        None => panic!("an endless body ended normally"),
                    }
                },
            }
        })
        .await
        .expect("the response of a client that stopped reading was never cut");
    }
}

fn h2_get(addr: std::net::SocketAddr, path: &str) -> Request<http_body_util::Empty<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// The stream idle timeout's count, once it is `n` (waited for under
/// [`HANG_GUARD`]: the cut comes a timeout after the client stops).
async fn idle_timeouts_reach(lg: &LegateHandle, n: f64) {
    eventually(HANG_GUARD, "the stream idle timeout", || async {
        (lg.stat(IDLE_STAT).await == Some(n)).then_some(())
    })
    .await;
}

each_proto!(
    /// A client that sends its request and then never reads the (endless)
    /// response: hyper stops polling the body once the socket (HTTP/1.1) or
    /// the stream's window (HTTP/2) is full, yet the stream is cut after the
    /// timeout without progress, as Envoy's stream idle timeout and nginx's
    /// `send_timeout` do: HTTP/1.1 closes the connection, HTTP/2 resets the
    /// stream alone (the connection serves the next request). The upstream
    /// request ends with it (its connection closed, not pooled mid-response);
    /// counted, and logged with the status sent and the cause.
    async fn a_client_that_never_reads_is_cut(proto) {
        let up = upstream()
            .route("/endless", endless)
            .route("/ok", |_req| async { Response::new(Full::new(Bytes::from("ok"))) })
            .start()
            .await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let cfg = listener_idle(&simple_config(&[up.addr]), "1s").replace(
            "version: 1\n",
            &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
        );
        let lg = legate().config(&cfg).start();
        let mut r = Reader::open(proto, lg.addr("web"), "/endless").await;
        idle_timeouts_reach(&lg, 1.0).await;
        r.until_cut().await;
        let v = first_log_line(&log).await;
        assert_eq!(v["status"], 200, "{v}");
        assert_eq!(v["cause"], "stream_idle_timeout", "{v}");
        lg.assert_stat(r#"legate_listener_requests_active{listener="web"}"#, 0.0)
            .await;
        eventually(HANG_GUARD, "the upstream connection's close", || async {
            (up.closed.get() == 1).then_some(())
        })
        .await;
        if let Reader::H2 { sender, .. } = &mut r {
            let ok = sender.send_request(h2_get(lg.addr("web"), "/ok")).await;
            let ok = ok.expect("the reset took the connection down");
            assert_eq!(ok.status(), 200);
            assert_eq!(&ok.into_body().collect().await.unwrap().to_bytes()[..], b"ok");
        }
    }
);

each_proto!(
    /// A client that reads slowly but steadily (32 KiB every 300ms against a
    /// 1s timeout, for several timeouts in all) is left alone however long it
    /// takes: each read lets the response move on. Once it stops reading, it
    /// is cut.
    async fn a_slow_reader_is_cut_only_once_it_stops(proto) {
        let up = upstream().route("/endless", endless).start().await;
        let lg = legate()
            .config(&listener_idle(&simple_config(&[up.addr]), "1s"))
            .start();
        let mut r = Reader::open(proto, lg.addr("web"), "/endless").await;
        for i in 0..12 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(r.read(32 * 1024).await, "cut while reading (round {i})");
        }
        lg.assert_stat(IDLE_STAT, 0.0).await;
        idle_timeouts_reach(&lg, 1.0).await;
        r.until_cut().await;
    }
);
