//! The access log: a request whose client goes away before the response is
//! written as a 499 `downstream_disconnect` line and counted in the 4xx class;
//! lines are handed to a writer thread, so they arrive whole and in order from
//! every worker, the last ones are written at shutdown, and a log nobody reads
//! drops lines (counted) instead of stalling requests. The answers hyper sends
//! by itself to an HTTP/1.1 head it cannot take (400, 414, 431) are logged too.
//! A listener writes its own logs (`listeners[].access_log`, replacing the
//! top-level ones), several at once, or none (`off`); logs of one file share
//! its writer; a reload changes a listener's logs.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use legate_tests::*;

const RX_RESETS: &str = r#"legate_listener_rx_resets_total{listener="web"}"#;
const TX_RESETS: &str = r#"legate_listener_tx_resets_total{listener="web"}"#;

each_proto!(
    async fn client_gone_before_the_response_is_logged(proto) {
        let up = upstream().delay(Duration::from_secs(5)).start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let cfg = simple_config(&[up.addr]).replace(
            "version: 1\n",
            &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let req = tokio::spawn(async move { c.get("/gone?x=1").try_send().await });
        eventually(Duration::from_secs(3), "request upstream", || async {
            (up.in_flight.get() == 1).then_some(())
        })
        .await;
        // The client gives up: its connection (HTTP/1.1) or stream (HTTP/2) ends.
        req.abort();
        let lines = access_log_until(&log, "the 499 line", |l| !l.is_empty()).await;
        let (v, line) = (&lines[0], lines[0].to_string());
        assert_eq!(v["status"], 499, "{line}");
        assert_eq!(v["cause"], "downstream_disconnect", "{line}");
        assert_eq!(v["method"], "GET", "{line}");
        assert_eq!(v["path"], "/gone?x=1", "{line}");
        assert_eq!(v["route"], "all/0", "{line}");
        assert_eq!(v["route_table"], "main", "{line}");
        assert_eq!(v["virtual_host"], "all", "{line}");
        assert_eq!(v["cluster"], "backend", "{line}");
        assert_eq!(v["bytes_sent"], 0, "{line}");
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="4xx"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_listener_requests_active{listener="web"}"#, 0.0)
            .await;
        lg.assert_stat(
            r#"legate_route_requests_total{route_table="main",virtual_host="all",route="all/0",class="4xx"}"#,
            1.0,
        )
        .await;
        // The client reset it (Envoy's `downstream_rq_rx_reset`); Legate cut nothing.
        lg.assert_stat(RX_RESETS, 1.0).await;
        lg.assert_stat(TX_RESETS, 0.0).await;
    }
);

/// An HTTP/2 client that resets its stream while the route reads the body
/// first (to mirror it) went away: a 499 `downstream_reset`, as an HTTP/1.1
/// client that closes mid-body. It was logged as a 400 `bad_request` (the
/// client's reset taken for a malformed body) and counted so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_resetting_its_upload_is_no_bad_request() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let cfg = simple_config_with(&[up.addr], "            mirror: { cluster: backend }\n", "")
        .replace(
            "version: 1\n",
            &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
        );
    let lg = legate().config(&cfg).start();
    let mut c = client(Proto::H2, lg.addr("web")).await;
    // Part of the body, then the client's failure: hyper resets the stream.
    let body = futures_util::stream::iter([
        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from("part"))),
        Err(BoxError::from("the client gives up")),
    ]);
    let sent = c
        .post("/upload")
        .boxed_body(http_body_util::BodyExt::boxed(
            http_body_util::StreamBody::new(body),
        ))
        .try_send()
        .await;
    assert!(sent.is_err(), "{sent:?}");
    let lines = access_log_until(&log, "the upload's line", |l| !l.is_empty()).await;
    let (v, line) = (&lines[0], lines[0].to_string());
    assert_eq!(v["status"], 499, "{line}");
    assert_eq!(v["cause"], "downstream_reset", "{line}");
    assert_eq!(up.requests.get(), 0, "{line}");
    lg.assert_stat(
        r#"legate_listener_requests_total{listener="web",class="4xx"}"#,
        1.0,
    )
    .await;
    lg.assert_stat(RX_RESETS, 1.0).await;
}

each_proto!(
    /// An upstream that fails its response body after the head was sent: the
    /// client gets a truncated response, and the line says so (it was a clean
    /// 200 with no cause).
    async fn a_response_cut_short_is_logged_as_failed(proto) {
        use futures_util::StreamExt;
        let up = upstream()
            .route("/cut", |_req| async {
                let first = futures_util::stream::once(async {
                    Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"0123456789")))
                });
                let broken = futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err::<hyper::body::Frame<Bytes>, BoxError>("upstream gave up".into())
                });
                Response::new(http_body_util::BodyExt::boxed(
                    http_body_util::StreamBody::new(first.chain(broken)),
                ))
            })
            .start()
            .await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let lg = legate().config(&logged_config(up.addr, &log, "")).start();
        let mut c = client(proto, lg.addr("web")).await;
        let _ = c.get("/cut").try_send().await;
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/whole").send().await.status, 200);
        let lines = access_log_until(&log, "two lines", |l| l.len() >= 2).await;
        let cut = lines.iter().find(|l| l["path"] == "/cut").unwrap();
        assert_eq!(cut["status"], 200, "{cut}");
        assert_eq!(cut["cause"], "response_body_failed", "{cut}");
        let whole = lines.iter().find(|l| l["path"] == "/whole").unwrap();
        assert_eq!(whole["cause"], Value::Null, "{whole}");
    }
);

/// A response body that never ends: a chunk every 20ms, until the reader
/// goes away.
fn endless_trickle() -> BoxBody {
    use futures_util::StreamExt;
    let s = futures_util::stream::repeat(()).then(|()| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"0123456789")))
    });
    http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(s))
}

/// Sends `GET path`, reads the response head and at least `n` body bytes,
/// then goes away: HTTP/1.1 closes its connection, HTTP/2 resets the stream
/// (`RST_STREAM` `CANCEL`) and keeps the connection, which it returns.
async fn leave_mid_body(
    proto: Proto,
    addr: std::net::SocketAddr,
    path: &str,
    n: usize,
) -> Option<hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>> {
    use http_body_util::BodyExt;
    match proto {
        Proto::H1 => {
            let mut c = RawConn::connect(addr).await;
            c.write(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await;
            let mut got = c.read_head(HANG_GUARD).await;
            let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            assert_eq!(
                raw_status(&got),
                Some(200),
                "{}",
                String::from_utf8_lossy(&got)
            );
            while got.len() - head_end < n {
                got.extend(c.read_exact(1, HANG_GUARD).await.unwrap());
            }
            drop(c);
            None
        }
        Proto::H2 => {
            let mut sender = raw_h2(addr).await;
            let req = Request::get(format!("http://{addr}{path}"))
                .body(http_body_util::Empty::new())
                .unwrap();
            let r = sender.send_request(req).await.unwrap();
            assert_eq!(r.status(), 200);
            let mut body = r.into_body();
            let mut got = 0;
            while got < n {
                let f = body.frame().await.unwrap().unwrap();
                got += f.data_ref().map_or(0, Bytes::len);
            }
            drop(body);
            Some(sender)
        }
    }
}

each_proto!(
    /// A client that goes away mid-body (closes its connection, resets its
    /// stream) is logged with the status sent, the bytes it got and cause
    /// `downstream_disconnect` (Envoy's response flag `DC`): it was logged
    /// as a response sent whole, with no cause. Responses that were sent
    /// whole, with or without a length, and those without a body (`HEAD`,
    /// 204, 304) still have none.
    async fn a_client_gone_mid_body_is_logged_as_such(proto) {
        let up = upstream()
            .route("/endless", |_req| async { Response::new(endless_trickle()) })
            .route("/chunked", |_req| async {
                let s = futures_util::stream::iter(["one ", "two"]).map(|d| {
                    Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(d.as_bytes())))
                });
                Response::new(http_body_util::BodyExt::boxed(
                    http_body_util::StreamBody::new(s),
                ))
            })
            .route("/204", |_req| async {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            })
            .route("/304", |_req| async {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                r
            })
            .start()
            .await;
        use futures_util::StreamExt;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let lg = legate().config(&logged_config(up.addr, &log, "")).start();
        let kept = leave_mid_body(proto, lg.addr("web"), "/endless", 30).await;
        let gone = access_log_until(&log, "the line of the client gone", |l| !l.is_empty()).await;
        let gone = &gone[0];
        assert_eq!(gone["path"], "/endless", "{gone}");
        assert_eq!(gone["status"], 200, "{gone}");
        assert_eq!(gone["cause"], "downstream_disconnect", "{gone}");
        assert!(gone["bytes_sent"].as_u64().unwrap() >= 10, "{gone}");
        if let Some(mut sender) = kept {
            // Only the stream was reset: the connection serves the next one.
            let req = Request::get(format!("http://{}/next", lg.addr("web")))
                .body(http_body_util::Empty::new())
                .unwrap();
            assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
        }
        let mut c = client(proto, lg.addr("web")).await;
        let whole = c.get("/whole").send().await;
        assert_eq!(whole.status, 200);
        assert_eq!(c.get("/chunked").send().await.text(), "one two");
        assert_eq!(c.request(Method::HEAD, "/head").send().await.status, 200);
        assert_eq!(c.get("/204").send().await.status, 204);
        assert_eq!(c.get("/304").send().await.status, 304);
        let n = if proto == Proto::H2 { 7 } else { 6 };
        let lines = access_log_until(&log, "every line", |l| l.len() >= n).await;
        for l in &lines[1..] {
            assert_eq!(l["cause"], Value::Null, "{l}");
        }
        let whole_line = lines.iter().find(|l| l["path"] == "/whole").unwrap();
        assert_eq!(whole_line["bytes_sent"], whole.body.len(), "{whole_line}");
    }
);

each_proto!(
    /// A line names the request's authority and user agent, the body bytes
    /// received, and when the request started (Envoy's `%REQ(:AUTHORITY)%`,
    /// `%REQ(USER-AGENT)%`, `%BYTES_RECEIVED%`, `%START_TIME%`): virtual
    /// hosts' traffic can be told apart. Also its `Referer` and the
    /// `X-Forwarded-For` it came with (nginx's combined format and Envoy's
    /// default one have them), several fields joined.
    async fn lines_name_the_authority_agent_and_bytes_received(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let lg = legate()
            .config(&logged_config(up.addr, &log, ", flush_interval: 10ms"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .post("/upload")
            .header("host", "api.example:8080")
            .header("user-agent", "legate-test/1.0")
            .header("referer", "https://shop.example/cart")
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-forwarded-for", "198.51.100.2, 10.0.0.1")
            .body("hello")
            .send()
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(c.get("/plain").send().await.status, 200);
        let lines = access_log_until(&log, "two lines", |l| l.len() >= 2).await;
        let upload = lines.iter().find(|l| l["path"] == "/upload").unwrap();
        // Over HTTP/2 the request's `:authority` (the test client's is the
        // address it connects to) is the authority, not a `host` field.
        let authority = match proto {
            Proto::H1 => "api.example:8080".to_string(),
            Proto::H2 => lg.addr("web").to_string(),
        };
        assert_eq!(upload["authority"], authority.as_str(), "{upload}");
        assert_eq!(upload["user_agent"], "legate-test/1.0", "{upload}");
        assert_eq!(upload["bytes_received"], 5, "{upload}");
        assert_eq!(upload["referer"], "https://shop.example/cart", "{upload}");
        let xff = "203.0.113.7, 198.51.100.2, 10.0.0.1";
        assert_eq!(upload["x_forwarded_for"], xff, "{upload}");
        let (start, end) = (upload["start_time"].as_str().unwrap(), upload["time"].as_str().unwrap());
        assert!(start.len() == end.len() && start <= end, "{upload}");
        let plain = lines.iter().find(|l| l["path"] == "/plain").unwrap();
        assert_eq!(plain["bytes_received"], 0, "{plain}");
        assert_eq!(plain["user_agent"], Value::Null, "{plain}");
        assert_eq!(plain["referer"], Value::Null, "{plain}");
        assert_eq!(plain["x_forwarded_for"], Value::Null, "{plain}");
        assert!(plain["authority"].is_string(), "{plain}");
    }
);

each_proto!(
    /// A route's own answer, a `direct_response` or a `redirect`, is logged
    /// with cause `direct_response` (Envoy's response code details for both):
    /// it is a local reply, not the upstream's. (The cause was `null`.)
    async fn a_routes_own_answer_is_logged_as_direct_response(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let routes = "          - match: { prefix: /direct }\n            direct_response: { status: 200, body: here }\n          - match: { prefix: /old }\n            redirect: { path: /new, code: 301 }\n          - match: { prefix: / }\n            cluster: backend\n";
        let clusters = format!("  - name: backend\n    endpoints:\n      - address: {}\n", up.addr);
        let cfg = with_access_log(&web_config(routes, &clusters), &log, ", flush_interval: 10ms");
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/direct").send().await.text(), "here");
        assert_eq!(c.get("/old").send().await.status, 301);
        assert_eq!(c.get("/up").send().await.status, 200);
        let lines = access_log_until(&log, "three lines", |l| l.len() >= 3).await;
        let line = |path: &str| lines.iter().find(|l| l["path"] == path).unwrap().clone();
        for (path, status) in [("/direct", 200), ("/old", 301)] {
            let l = line(path);
            assert_eq!(l["status"], status, "{l}");
            assert_eq!(l["cause"], "direct_response", "{l}");
            assert_eq!(l["cluster"], Value::Null, "{l}");
        }
        let l = line("/up");
        assert_eq!(l["cause"], Value::Null, "{l}");
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="2xx"}"#, 2.0)
            .await;
    }
);

each_proto!(
    /// `response_duration_ms` (Envoy's `%RESPONSE_DURATION%`): from the
    /// request head to the upstream's response head, so a slow upstream
    /// (long to answer) is told from a slow body or client (long after); `null`
    /// when no upstream answered (a route's own answer).
    async fn the_upstreams_time_to_answer_is_logged(proto) {
        let up = upstream()
            .route("/slow", |_req| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let late = futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(b"late")))
                });
                Response::new(http_body_util::BodyExt::boxed(
                    http_body_util::StreamBody::new(late),
                ))
            })
            .start()
            .await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let routes = "          - match: { prefix: /direct }\n            direct_response: { status: 200, body: here }\n          - match: { prefix: / }\n            cluster: backend\n";
        let clusters = format!("  - name: backend\n    endpoints:\n      - address: {}\n", up.addr);
        let cfg = with_access_log(&web_config(routes, &clusters), &log, ", flush_interval: 10ms");
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/slow").send().await.text(), "late");
        assert_eq!(c.get("/direct").send().await.text(), "here");
        let lines = access_log_until(&log, "two lines", |l| l.len() >= 2).await;
        let line = |path: &str| lines.iter().find(|l| l["path"] == path).unwrap().clone();
        let slow = line("/slow");
        let head = slow["response_duration_ms"].as_f64().unwrap();
        let whole = slow["duration_ms"].as_f64().unwrap();
        // The upstream took 100ms to answer, then 100ms more for its body.
        assert!(head >= 100.0, "{slow}");
        assert!(whole >= head + 90.0, "{slow}");
        let direct = line("/direct");
        assert_eq!(direct["response_duration_ms"], Value::Null, "{direct}");
    }
);

/// `simple_config` with an access log at `path` and the extra `access_log` keys.
fn logged_config(up: std::net::SocketAddr, path: &Path, keys: &str) -> String {
    with_access_log(&simple_config(&[up]), path, keys)
}

/// `cfg` with an access log at `path` and the extra `access_log` keys.
fn with_access_log(cfg: &str, path: &Path, keys: &str) -> String {
    cfg.replace(
        "version: 1\n",
        &format!(
            "version: 1\naccess_log: {{ path: {}{keys} }}\n",
            path.display()
        ),
    )
}

/// The number in `/c<client>/<n>` or `/blocked/<n>?...` paths.
fn seq(line: &Value) -> (String, usize) {
    let path = line["path"].as_str().unwrap();
    let path = path.split('?').next().unwrap();
    let (prefix, n) = path.rsplit_once('/').unwrap();
    (prefix.to_string(), n.parse().unwrap())
}

each_proto!(
    async fn lines_arrive_whole_and_in_order_from_every_worker(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let lg = legate()
            .config(&logged_config(up.addr, &log, ""))
            .concurrency(2)
            .start();
        let (clients, each) = (8, 40);
        let mut tasks = Vec::new();
        for c in 0..clients {
            let mut cl = client(proto, lg.addr("web")).await;
            tasks.push(tokio::spawn(async move {
                for n in 0..each {
                    assert_eq!(cl.get(&format!("/c{c}/{n}")).send().await.status, 200);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let lines = access_log_until(&log, "every request's line", |l| {
            l.len() >= clients * each
        })
        .await;
        assert_eq!(lines.len(), clients * each);
        // Each connection's requests were sequential: its lines keep their order.
        for c in 0..clients {
            let got: Vec<usize> = lines
                .iter()
                .map(seq)
                .filter(|(p, _)| *p == format!("/c{c}"))
                .map(|(_, n)| n)
                .collect();
            assert_eq!(got, (0..each).collect::<Vec<_>>(), "client {c}");
        }
        assert!(lines.iter().all(|l| l["status"] == 200 && l["route"] == "all/0"));
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
            (clients * each) as f64,
        )
        .await;
        lg.assert_stat("legate_access_log_dropped_total", 0.0).await;
    }
);

each_proto!(
    async fn the_last_lines_are_written_at_shutdown(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        // No interval flush within the test: only the shutdown writes the lines.
        let lg = legate()
            .config(&logged_config(up.addr, &log, ", flush_interval: 1m"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for n in 0..20 {
            assert_eq!(c.get(&format!("/last/{n}")).send().await.status, 200);
        }
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
            20.0,
        )
        .await;
        drop(c);
        let registry = lg.registry();
        // As `legate run`, which exits with the state still referenced: the
        // lines must be written by the shutdown itself, not when it is dropped.
        let _shared = lg.shared();
        lg.shutdown_and_wait().await.expect("clean stop");
        let lines = access_log_lines(&log);
        let got: Vec<usize> = lines.iter().map(|l| seq(l).1).collect();
        assert_eq!(got, (0..20).collect::<Vec<_>>(), "{lines:?}");
        let stats = parse_prometheus(&registry.render());
        assert_eq!(stats.get("legate_access_log_dropped_total"), Some(&0.0));
    }
);

each_proto!(
    /// The log is a FIFO whose reader never reads: the writer thread blocks once
    /// the pipe is full, the buffer fills to `buffer_limit`, and from then on
    /// lines are dropped and counted while every request is still answered. When
    /// the reader catches up, every line that was not dropped arrives whole.
    async fn a_log_nobody_reads_drops_lines_instead_of_stalling_requests(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let fifo = dir.path().join("access.fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success(), "mkfifo: {made}");
        // Opening a FIFO for writing waits for a reader: open ours alongside.
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::File::open(fifo).unwrap())
        };
        let lg = legate()
            .config(&logged_config(up.addr, &fifo, ", buffer_limit: 64KiB"))
            .start();
        let mut reader = reader.join().unwrap();
        // ~1.1KiB lines: the pipe (64KiB), one batch held by the blocked writer
        // and the buffer (64KiB each) hold under 200 of them.
        let pad = "p".repeat(1000);
        let total: u32 = 600;
        let mut c = client(proto, lg.addr("web")).await;
        let sent = tokio::time::timeout(Duration::from_secs(60), async {
            for n in 0..total {
                let r = c.get(&format!("/blocked/{n}?pad={pad}")).send().await;
                assert_eq!(r.status, 200);
            }
        })
        .await;
        assert!(sent.is_ok(), "requests stalled behind the blocked access log");
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
            f64::from(total),
        )
        .await;
        lg.assert_stat_with("legate_access_log_dropped_total", |v| v > 0.0, "> 0")
            .await;
        drop(c);
        // Now read: the writer catches up, and the shutdown ends the pipe.
        let drained = std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut reader, &mut text).unwrap();
            text
        });
        let registry = lg.registry();
        lg.shutdown_and_wait().await.expect("clean stop");
        let text = drained.join().unwrap();
        assert!(text.ends_with('\n'));
        let got: Vec<usize> = text
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("a broken line ({e}): {l:?}"));
                seq(&v).1
            })
            .collect();
        // In order, with gaps where lines were dropped; nothing lost uncounted.
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
        let dropped = parse_prometheus(&registry.render())["legate_access_log_dropped_total"];
        assert!(dropped > 0.0);
        assert_eq!(got.len() as f64 + dropped, f64::from(total), "{got:?}");
    }
);

each_proto!(
    /// Behind trusted proxies (`xff_num_trusted_hops`) the client the proxies
    /// reported is the request's client everywhere, as Envoy's downstream
    /// remote address: the access log's `client` (the proxy in `peer`) and what
    /// `hash_on: { source_ip }` hashes. Both used the peer: one bucket per
    /// balancer, every client behind it logged as the balancer.
    async fn the_trusted_client_is_logged_and_hashed(proto) {
        let a = upstream().name("a").start().await;
        let b = upstream().name("b").start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let yaml = simple_config_with(
            &[a.addr, b.addr],
            "",
            "    lb_policy: ring_hash\n    hash_on: { source_ip: true }\n",
        )
        .replace(
            "      routes: main\n",
            "      routes: main\n      trust_downstream: true\n      xff_num_trusted_hops: 1\n",
        )
        .replace(
            "version: 1\n",
            &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
        );
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        // Twenty clients behind one balancer (this connection): spread over
        // both endpoints by their own address, each always to the same one.
        let mut seen = std::collections::HashSet::new();
        for i in 0..20 {
            let xff = format!("198.51.100.{i}");
            let first = c.get("/h").header("x-forwarded-for", &xff).send().await;
            let again = c.get("/h").header("x-forwarded-for", &xff).send().await;
            assert_eq!(first.header("x-upstream"), again.header("x-upstream"), "{xff}");
            seen.insert(first.header("x-upstream").unwrap().to_string());
        }
        assert_eq!(seen.len(), 2, "every client went to one endpoint: {seen:?}");

        let r = c.get("/logged").header("x-forwarded-for", "192.0.2.7").send().await;
        assert_eq!(r.status, 200);
        let lines = access_log_until(&log, "the line of /logged", |l| {
            l.iter().any(|l| l["path"] == "/logged")
        })
        .await;
        let line = lines.iter().find(|l| l["path"] == "/logged").unwrap();
        assert_eq!(line["client"], "192.0.2.7:0", "{line}");
        assert!(
            line["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{line}"
        );
    }
);

/// `logged_config` whose listener has the `limits` lines (indented by 6).
fn limited_logged_config(up: std::net::SocketAddr, path: &Path, limits: &str) -> String {
    logged_config(up, path, ", flush_interval: 10ms").replacen(
        "      routes: main\n",
        &format!("      routes: main\n    limits:\n{limits}"),
        1,
    )
}

/// The keys of a line, sorted.
fn keys(line: &Value) -> Vec<String> {
    let mut k: Vec<String> = line.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

/// A head that arrives in pieces and outgrows hyper's read buffer
/// (`max_buf_size`, 8KiB here) before Legate's exact header-size check sees
/// it is answered 431 by hyper itself: that answer gets its line, exactly
/// one, with what is known (no request line was parsed), as nginx logs its
/// 494 and Envoy its codec's 431; it counts in the 4xx class. HTTP/1.1
/// alone: HTTP/2 has no such answer from hyper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_hyper_refuses_as_too_large_is_logged_once() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let lg = legate()
        .config(&limited_logged_config(
            up.addr,
            &log,
            "      max_request_headers_size: 4KiB\n",
        ))
        .start();
    let addr = lg.addr("web");
    let mut c = RawConn::connect(addr).await;
    c.write(b"GET /big HTTP/1.1\r\nHost: x\r\n").await;
    // 16KiB of fields in pieces, the head never ended: hyper's buffer fills.
    let field = format!("x-big: {}\r\n", "a".repeat(500));
    for _ in 0..32 {
        c.write(field.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let out = c.read_until_close(HANG_GUARD).await.0;
    assert_eq!(
        raw_status(&out),
        Some(431),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // A request after it, on another connection: its line and the 431's may
    // come in either order (the 431's is written as its connection ends).
    let mut h = client(Proto::H1, addr).await;
    assert_eq!(h.get("/after").send().await.status, 200);
    let lines = access_log_until(&log, "the 431 and the next request", |l| {
        l.iter().any(|x| x["status"] == 431) && l.iter().any(|x| x["path"] == "/after")
    })
    .await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    let refused = lines.iter().find(|l| l["status"] == 431).unwrap();
    let after = lines.iter().find(|l| l["path"] == "/after").unwrap();
    assert_eq!(refused["cause"], "request_headers_too_large", "{refused}");
    assert_eq!(refused["listener"], "web", "{refused}");
    assert_eq!(
        refused["client"],
        c.stream.local_addr().unwrap().to_string(),
        "{refused}"
    );
    for null in [
        "method",
        "path",
        "protocol",
        "authority",
        "route",
        "cluster",
    ] {
        assert_eq!(refused[null], Value::Null, "{null}: {refused}");
    }
    assert_eq!(refused["bytes_sent"], 0, "{refused}");
    assert_eq!(refused["bytes_received"], 0, "{refused}");
    assert_eq!(refused["attempts"], 0, "{refused}");
    let (start, end) = (
        refused["start_time"].as_str().unwrap(),
        refused["time"].as_str().unwrap(),
    );
    assert!(start.len() == end.len() && start <= end, "{refused}");
    // The same fields as every line.
    assert_eq!(keys(refused), keys(after));
    lg.assert_stat(
        r#"legate_listener_requests_total{listener="web",class="4xx"}"#,
        1.0,
    )
    .await;
    assert_eq!(up.requests.get(), 1);
}

/// hyper's other answers of its own to a head it cannot take: 400 for a
/// malformed request line, 414 for a request target over 65534 bytes (with
/// a header-size limit that lets it in). Each gets its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_overlong_request_lines_are_logged() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let lg = legate()
        .config(&limited_logged_config(
            up.addr,
            &log,
            "      max_request_headers_size: 128KiB\n",
        ))
        .start();
    let addr = lg.addr("web");
    let out = raw(addr, b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(
        raw_status(&out),
        Some(400),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let out = raw(addr, long.as_bytes()).await;
    assert_eq!(
        raw_status(&out),
        Some(414),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let lines = access_log_until(&log, "two lines", |l| l.len() >= 2).await;
    // (In either order: each is written as its connection ends.)
    let mut causes: Vec<(&Value, &Value, &Value)> = lines
        .iter()
        .map(|l| (&l["status"], &l["cause"], &l["method"]))
        .collect();
    causes.sort_by_key(|c| c.0.as_u64());
    assert_eq!(
        causes,
        [
            (&Value::from(400), &Value::from("bad_request"), &Value::Null),
            (
                &Value::from(414),
                &Value::from("uri_too_long"),
                &Value::Null
            ),
        ],
        "{lines:?}"
    );
    assert_eq!(up.requests.get(), 0);
}

/// An HTTP/1.0 request without `Host` is routed by the address it reached:
/// its line names that address as the authority, not `null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_request_without_host_logs_the_address_it_was_routed_by() {
    let up = upstream().start().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let lg = legate()
        .config(&logged_config(up.addr, &log, ", flush_interval: 10ms"))
        .start();
    let addr = lg.addr("web");
    let out = raw(addr, b"GET /x HTTP/1.0\r\n\r\n").await;
    assert_eq!(
        raw_status(&out),
        Some(200),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let lines = access_log_until(&log, "one line", |l| !l.is_empty()).await;
    assert_eq!(lines[0]["authority"], addr.to_string(), "{}", lines[0]);
    assert_eq!(lines[0]["protocol"], "HTTP/1.0", "{}", lines[0]);
}

/// Moves `n` bytes each way through the open tunnel `c` (the upstream echoes).
async fn through_tunnel(c: &mut RawConn, n: usize) {
    let data = pattern_bytes(n);
    c.write(&data).await;
    let back = c.read_exact(n, HANG_GUARD).await.unwrap();
    assert_eq!(checksum(&back), checksum(&data));
}

/// An upgraded exchange (WebSocket) is logged when its tunnel ends, as nginx
/// logs at the close and Envoy's stream ends with its tunnel: one line, `101`,
/// with the tunnel's bytes each way (it was written at the `101`, a ~1ms
/// exchange of 0 bytes). HTTP/1.1 only: upgrades are HTTP/1.1's (HTTP/2
/// extended CONNECT is not offered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_exchange_is_logged_when_its_tunnel_ends() {
    let up = upgrade_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let lg = legate()
        .config(&logged_config(up.addr, &log, ", flush_interval: 10ms"))
        .start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    through_tunnel(&mut c, 5).await;
    through_tunnel(&mut c, 100_000).await;
    // A request after the 101, on another connection of the same worker: its
    // line is handed over after any the 101 had written (one worker, lines in
    // order), so once it is there the tunnel's would be too.
    let out = raw(
        lg.addr("web"),
        b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        raw_status(&out),
        Some(400),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let lines = access_log_until(&log, "the later request's line", |l| {
        l.iter().any(|l| l["path"] == "/after")
    })
    .await;
    assert!(
        lines.iter().all(|l| l["path"] != "/chat"),
        "the tunnel was logged while open: {lines:?}"
    );
    drop(c);
    let lines = access_log_until(&log, "the tunnel's line", |l| {
        l.iter().any(|l| l["path"] == "/chat")
    })
    .await;
    let chat: Vec<&Value> = lines.iter().filter(|l| l["path"] == "/chat").collect();
    assert_eq!(chat.len(), 1, "{lines:?}");
    let v = chat[0];
    assert_eq!(v["status"], 101, "{v}");
    assert_eq!(v["bytes_received"], 100_005, "{v}");
    assert_eq!(v["bytes_sent"], 100_005, "{v}");
    assert_eq!(v["cause"], Value::Null, "{v}");
    assert_eq!(v["cluster"], "backend", "{v}");
}

/// A tunnel cut by a drain at its `drain_timeout` is logged too, with the
/// bytes it moved, before the server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_cut_by_a_drain_is_logged() {
    let up = upgrade_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let cfg = logged_config(up.addr, &log, ", flush_interval: 10ms").replacen(
        "version: 1\n",
        "version: 1\ndrain_timeout: 300ms\n",
        1,
    );
    let lg = legate().config(&cfg).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    through_tunnel(&mut c, 3000).await;
    let (status, _) = lg.admin_post("/drain").await;
    assert_eq!(status, 200);
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "the tunnel stayed open through the drain");
    lg.wait_stopped(HANG_GUARD)
        .await
        .expect("the server stops once the drain timeout closed the tunnel");
    let lines = access_log_lines(&log);
    let chat: Vec<&Value> = lines.iter().filter(|l| l["path"] == "/chat").collect();
    assert_eq!(chat.len(), 1, "{lines:?}");
    let v = chat[0];
    assert_eq!(v["status"], 101, "{v}");
    assert_eq!(v["bytes_received"], 3000, "{v}");
    assert_eq!(v["bytes_sent"], 3000, "{v}");
    // Why it ended: the proxy cut it (was `null`, as a tunnel either side closed).
    assert_eq!(v["cause"], "drain_timeout", "{v}");
}

/// A tunnel the listener's `limits.idle_timeout` closed is logged with the
/// cause `idle_timeout` (it was `null`, as one either side closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_cut_by_its_idle_timeout_says_so() {
    let up = upgrade_echo_server().await;
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let cfg = logged_config(up.addr, &log, ", flush_interval: 10ms").replace(
        "    http:\n      routes: main\n",
        "    http:\n      routes: main\n    limits:\n      idle_timeout: 300ms\n",
    );
    let lg = legate().config(&cfg).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let head = c.websocket_handshake("/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "no 101: {head}");
    through_tunnel(&mut c, 10).await;
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "an idle tunnel stayed open");
    let lines = access_log_until(&log, "the tunnel's line", |l| {
        l.iter().any(|l| l["path"] == "/chat")
    })
    .await;
    let v = lines.iter().find(|l| l["path"] == "/chat").unwrap();
    assert_eq!(v["status"], 101, "{v}");
    assert_eq!(v["bytes_received"], 10, "{v}");
    assert_eq!(v["cause"], "idle_timeout", "{v}");
}

each_proto!(
    /// Header bytes that are not UTF-8 (obs-text: Latin-1 from an old client,
    /// a scanner's raw bytes) are written `\xHH`, and a backslash `\x5C`, as
    /// nginx escapes them: each byte stays readable in the line, where a lossy
    /// conversion turned all of them into U+FFFD.
    async fn header_bytes_that_are_not_utf8_are_logged_escaped(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let lg = legate()
            .config(&logged_config(up.addr, &log, ", flush_interval: 10ms"))
            .start();
        let addr = lg.addr("web");
        let agent: &[u8] = b"caf\xe9 \xff a\\b";
        let status = match proto {
            Proto::H1 => {
                let mut req = b"GET /bytes HTTP/1.1\r\nHost: x\r\nUser-Agent: ".to_vec();
                req.extend_from_slice(agent);
                req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
                raw_status(&raw(addr, &req).await)
            }
            Proto::H2 => {
                let mut sender = raw_h2(addr).await;
                let req = Request::get(format!("http://{addr}/bytes"))
                    .header("user-agent", HeaderValue::from_bytes(agent).unwrap())
                    .body(http_body_util::Empty::<Bytes>::new())
                    .unwrap();
                Some(sender.send_request(req).await.unwrap().status().as_u16())
            }
        };
        assert_eq!(status, Some(200));
        let lines = access_log_until(&log, "one line", |l| !l.is_empty()).await;
        assert_eq!(lines[0]["user_agent"], r"caf\xE9 \xFF a\x5Cb", "{}", lines[0]);
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="2xx"}"#, 1.0)
            .await;
    }
);

/// `access_log` with `path` and `extra` keys (indented by 2) instead of the
/// bare one `simple_config` leaves out.
fn with_log(cfg: &str, log: &Path, extra: &str) -> String {
    cfg.replace(
        "version: 1\n",
        &format!(
            "version: 1\naccess_log:\n  path: {}\n{extra}",
            log.display()
        ),
    )
}

/// The whole text lines of a `format` log once there are `n` of them.
async fn text_lines(log: &Path, n: usize) -> Vec<String> {
    eventually(Duration::from_secs(10), "the access-log lines", || async {
        let lines = access_log_text(log);
        (lines.len() >= n).then_some(lines)
    })
    .await
}

each_proto!(
    /// `access_log.format`: Envoy's command operators in a text line, `-` for
    /// what a request does not have. `%REQ(X-REQUEST-ID)%` is the id the
    /// request went upstream with (the client is not trusted: its own was
    /// replaced), `%RESP(...)%` a header of the response as sent, cut to 3
    /// characters here.
    async fn a_text_format_writes_envoys_operators(proto) {
        let up = upstream().response_header("x-up", "abcdef").start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let cfg = with_log(
            &web_config(
                "          - match: { prefix: /ok }\n            cluster: backend\n",
                &format!("  - name: backend\n    endpoints:\n      - address: {}\n", up.addr),
            ),
            &log,
            // As Envoy's formats, it ends with a line break (YAML's `\n`):
            // the line gets no second one.
            "  format: \"%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% \
             %RESPONSE_FLAGS% \\\"%REQ(USER-AGENT)%\\\" %REQ(X-REQUEST-ID)% %RESP(X-UP):3% \
             %UPSTREAM_CLUSTER% %ROUTE_NAME% %RESPONSE_CODE_DETAILS% %BYTES_SENT%\\n\"\n",
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let ok = c
            .get("/ok?x=1")
            .header("user-agent", "ua/1")
            .header("x-request-id", "from-the-client")
            .send()
            .await;
        assert_eq!(ok.status, 200);
        let id = ok.echo().header("x-request-id").unwrap().to_string();
        assert_ne!(id, "from-the-client");
        let missing = c.get("/missing").send().await;
        assert_eq!(missing.status, 404);
        let lines = text_lines(&log, 2).await;
        let v = match proto {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        };
        assert_eq!(
            lines[0],
            format!(
                "GET /ok?x=1 {v} 200 - \"ua/1\" {id} abc backend all/0 via_upstream {}",
                ok.body.len()
            )
        );
        let prefix = format!("GET /missing {v} 404 NR \"-\" ");
        let suffix = format!(" - - - no_route {}", missing.body.len());
        assert!(
            lines[1].starts_with(&prefix) && lines[1].ends_with(&suffix),
            "{}",
            lines[1]
        );
        assert_eq!(lines.len(), 2, "{lines:?}");
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="2xx"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="4xx"}"#, 1.0)
            .await;
    }
);

each_proto!(
    /// `access_log.json_format`: keys in the order configured, a lone
    /// operator keeps its type (numbers, `null`), nested objects and literals;
    /// `%GRPC_STATUS%` reads a real gRPC server's status from its trailers,
    /// or from the head of a trailers-only answer (which has no trailers).
    async fn a_json_format_has_typed_values_and_grpc_statuses(proto) {
        use legate_tests::grpc::{grpc_upstream, pb, HyperConn};
        let grpc = grpc_upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let cfg = with_log(
            &web_config(
                "          - match: { prefix: / }\n            cluster: backend\n",
                &format!(
                    "  - name: backend\n    protocol: h2\n    endpoints:\n      - address: {}\n",
                    grpc.addr
                ),
            ),
            &log,
            "  json_format:
    status: \"%RESPONSE_CODE%\"
    grpc: \"%GRPC_STATUS%\"
    grpc_number: \"%GRPC_STATUS(NUMBER)%\"
    trailer: \"%TRAILER(GRPC-STATUS)%\"
    content_type: \"%RESP(CONTENT-TYPE)%\"
    upstream:
      cluster: \"%UPSTREAM_CLUSTER%\"
      attempts: \"%UPSTREAM_REQUEST_ATTEMPT_COUNT%\"
    path: \"%REQ(:PATH)%\"
    schema: 1
",
        );
        let lg = legate().config(&cfg).start();
        let addr = lg.addr("web");
        let origin: http::Uri = format!("http://{addr}").parse().unwrap();
        let mut c =
            pb::echo_client::EchoClient::with_origin(HyperConn::connect(proto, addr).await, origin);
        let mut stream = c
            .count(pb::CountRequest {
                from: 1,
                count: 1,
                fail_code: 5,
                fail_message: "gone".into(),
                delay_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stream.message().await.unwrap().map(|m| m.n), Some(1));
        let err = stream.message().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        let err = c
            .fail(pb::FailRequest {
                code: 7,
                message: "no".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let lines = access_log_until(&log, "both calls", |l| l.len() >= 2).await;
        assert_eq!(
            lines[0],
            serde_json::json!({
                "status": 200, "grpc": "NotFound", "grpc_number": 5, "trailer": "5",
                "content_type": "application/grpc",
                "upstream": { "cluster": "backend", "attempts": 1 },
                "path": "/legate.test.v1.Echo/Count", "schema": 1,
            })
        );
        assert_eq!(lines[1]["grpc"], "PermissionDenied", "{}", lines[1]);
        assert_eq!(lines[1]["grpc_number"], 7, "{}", lines[1]);
        assert_eq!(lines[1].get("trailer"), Some(&serde_json::Value::Null), "{}", lines[1]);
        // The keys come out in the order written, not sorted.
        let text = access_log_text(&log);
        assert!(
            text[0].starts_with(r#"{"status":200,"grpc":"NotFound","grpc_number":5,"#),
            "{}",
            text[0]
        );
        assert_eq!(grpc.calls.get(), 2);
    }
);

each_proto!(
    /// `access_log.filter`: only the lines that pass are written (here the
    /// 4xx and 5xx answers, as nginx's `if=` and Envoy's status-code filter):
    /// the 200 before the 404 leaves no line.
    async fn a_filter_writes_only_the_lines_that_pass(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let cfg = with_log(
            &web_config(
                "          - match: { prefix: /ok }\n            cluster: backend\n",
                &format!("  - name: backend\n    endpoints:\n      - address: {}\n", up.addr),
            ),
            &log,
            "  format: '%RESPONSE_CODE% %REQ(:PATH)% %RESPONSE_FLAGS%'\n  \
             filter: { statuses: [\"400-599\"] }\n",
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/ok").send().await.status, 200);
        assert_eq!(c.get("/nowhere").send().await.status, 404);
        // Lines are written in the order their requests ended: the 200's
        // would be first.
        let lines = text_lines(&log, 1).await;
        assert_eq!(lines, ["404 /nowhere NR"]);
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="2xx"}"#, 1.0)
            .await;
    }
);

/// Listeners `web` and `api` (HTTP, ephemeral ports, route table `main`:
/// `/fail` a 500 of the route's own, anything else to `backend` at `up`),
/// each with its extra keys (`web`, `api`: lines indented by 4, such as
/// `    access_log: off\n`), and `top` at the top level.
fn two_listeners(up: std::net::SocketAddr, top: &str, web: &str, api: &str) -> String {
    format!(
        "version: 1
{top}listeners:
  - name: web
    address: 127.0.0.1:0
    http: {{ routes: main }}
{web}  - name: api
    address: 127.0.0.1:0
    http: {{ routes: main }}
{api}routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: /fail }}
            direct_response: {{ status: 500, body: failed }}
          - match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
"
    )
}

/// `    access_log: { path: PATH<keys> }\n`: a listener's own log.
fn own_log(path: &Path, keys: &str) -> String {
    format!("    access_log: {{ path: {}{keys} }}\n", path.display())
}

/// `access_log: { path: PATH }\n`: the top-level log.
fn top_log(path: &Path) -> String {
    format!("access_log: {{ path: {} }}\n", path.display())
}

const WEB_2XX: &str = r#"legate_listener_requests_total{listener="web",class="2xx"}"#;
const API_2XX: &str = r#"legate_listener_requests_total{listener="api",class="2xx"}"#;

each_proto!(
    /// Two listeners with logs of their own: each log gets its listener's
    /// lines only, and the top-level log, which both replace, none.
    async fn each_listener_writes_its_own_log(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let (top, web, api) = (
            dir.path().join("top.log"),
            dir.path().join("web.log"),
            dir.path().join("api.log"),
        );
        let cfg = two_listeners(
            up.addr,
            &top_log(&top),
            &own_log(&web, ""),
            &own_log(&api, ", format: '%LISTENER_NAME% %REQ(:PATH)%'"),
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/w").send().await.status, 200);
        let mut c = client(proto, lg.addr("api")).await;
        assert_eq!(c.get("/a").send().await.status, 200);
        lg.assert_stat(WEB_2XX, 1.0).await;
        lg.assert_stat(API_2XX, 1.0).await;
        // Stopped: every line handed over is written.
        lg.shutdown_and_wait().await.unwrap();
        let web = access_log_lines(&web);
        assert_eq!(web.len(), 1, "{web:?}");
        assert_eq!(web[0]["listener"], "web", "{web:?}");
        assert_eq!(web[0]["path"], "/w", "{web:?}");
        assert_eq!(access_log_text(&api), ["api /a"]);
        assert_eq!(access_log_text(&top), Vec::<String>::new());
    }
);

each_proto!(
    /// `access_log: off` on a listener (a health-check one): its requests
    /// write no line, while the other listener writes the top-level log.
    async fn a_listener_with_its_log_off_writes_nothing(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let top = dir.path().join("top.log");
        let cfg = two_listeners(up.addr, &top_log(&top), "", "    access_log: off\n");
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("api")).await;
        assert_eq!(c.get("/health").send().await.status, 200);
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/w").send().await.status, 200);
        // Counted all the same.
        lg.assert_stat(API_2XX, 1.0).await;
        lg.assert_stat(WEB_2XX, 1.0).await;
        lg.shutdown_and_wait().await.unwrap();
        let lines = access_log_lines(&top);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["listener"], "web", "{lines:?}");
        assert_eq!(lines[0]["path"], "/w", "{lines:?}");
    }
);

each_proto!(
    /// Two logs on one listener, as an Envoy listener's list: every request
    /// as JSON to one file, the 5xx as a text line to another. Each format
    /// reads a request header the other does not: both are captured.
    async fn two_logs_on_a_listener_get_the_lines_their_filters_pass(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let (all, errors) = (dir.path().join("all.json"), dir.path().join("errors.log"));
        let web = format!(
            "    access_log:
      - path: {}
        json_format: {{ path: \"%REQ(:PATH)%\", status: \"%RESPONSE_CODE%\", b: \"%REQ(X-B)%\" }}
      - path: {}
        format: \"%RESPONSE_CODE% %REQ(:PATH)% %REQ(X-A)%\"
        filter: {{ statuses: [\"500-599\"] }}
",
            all.display(),
            errors.display()
        );
        let lg = legate().config(&two_listeners(up.addr, "", &web, "")).start();
        let mut c = client(proto, lg.addr("web")).await;
        let ok = c.get("/ok").header("x-a", "1").header("x-b", "2").send().await;
        assert_eq!(ok.status, 200);
        let failed = c.get("/fail").header("x-a", "A").header("x-b", "B").send().await;
        assert_eq!(failed.status, 500);
        lg.assert_stat(WEB_2XX, 1.0).await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="5xx"}"#, 1.0)
            .await;
        lg.shutdown_and_wait().await.unwrap();
        assert_eq!(
            access_log_lines(&all),
            [
                serde_json::json!({ "path": "/ok", "status": 200, "b": "2" }),
                serde_json::json!({ "path": "/fail", "status": 500, "b": "B" }),
            ]
        );
        assert_eq!(access_log_text(&errors), ["500 /fail A"]);
    }
);

/// The file descriptors of this process open on `path`.
fn handles_on(path: &Path) -> usize {
    let want = std::fs::canonicalize(path).unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| *target == want)
        .count()
}

each_proto!(
    /// Logs writing one file, on one listener and on another (the path
    /// spelled differently), share one writer: the file is open once, and
    /// every line is whole, in the order the requests ended.
    async fn logs_of_one_file_share_its_writer(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let shared = dir.path().join("shared.log");
        let web = format!(
            "    access_log:
      - {{ path: {0}, format: 'a %REQ(:PATH)%' }}
      - {{ path: {0}, format: 'b %REQ(:PATH)%' }}
",
            shared.display()
        );
        let api = own_log(
            &dir.path().join(".").join("shared.log"),
            ", format: 'api %REQ(:PATH)%'",
        );
        let lg = legate().config(&two_listeners(up.addr, "", &web, &api)).start();
        assert_eq!(handles_on(&shared), 1);
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/1").send().await.status, 200);
        let mut c = client(proto, lg.addr("api")).await;
        assert_eq!(c.get("/2").send().await.status, 200);
        lg.assert_stat(API_2XX, 1.0).await;
        lg.shutdown_and_wait().await.unwrap();
        assert_eq!(access_log_text(&shared), ["a /1", "b /1", "api /2"]);
    }
);

each_proto!(
    /// A reload that changes a listener's log: the listener is replaced,
    /// its new connections write the new log; the old log gets the line of
    /// the request made before the reload (held in its writer: a minute's
    /// flush interval) once the old connection has gone, without a restart.
    async fn a_reload_changes_a_listeners_log(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let (old, new) = (dir.path().join("old.log"), dir.path().join("new.log"));
        let cfg = |web: &str| two_listeners(up.addr, "", web, "");
        let lg = legate()
            .config(&cfg(&own_log(&old, ", flush_interval: 1m")))
            .from_file()
            .start();
        let addr = lg.addr("web");
        let mut c = client(proto, addr).await;
        assert_eq!(c.get("/before").send().await.status, 200);
        let report = lg
            .reload_ok(&cfg(&own_log(&new, ", format: 'new %REQ(:PATH)%'")))
            .await;
        assert_eq!(report["listeners"]["changed"], serde_json::json!(["web"]), "{report}");
        let mut c2 = client(proto, addr).await;
        assert_eq!(c2.get("/after").send().await.status, 200);
        let lines = text_lines(&new, 1).await;
        assert_eq!(lines, ["new /after"]);
        // The old connection goes: the old listener, and its log's writer,
        // with it; its last line is written then.
        drop(c);
        let before = access_log_until(&old, "the line held before the reload", |l| !l.is_empty()).await;
        assert_eq!(before.len(), 1, "{before:?}");
        assert_eq!(before[0]["path"], "/before", "{before:?}");
        lg.assert_stat(WEB_2XX, 2.0).await;
        lg.shutdown_and_wait().await.unwrap();
        assert_eq!(access_log_text(&new), ["new /after"]);
        assert_eq!(access_log_lines(&old).len(), 1);
    }
);

/// A TCP proxy listener with a log of its own writes its sessions there; the
/// HTTP listener beside it writes the top-level log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_writes_its_own_log() {
    let up = upstream().start().await;
    let echo = tcp_echo_server().await;
    let dir = TempDir::new();
    let (top, tcp) = (dir.path().join("top.log"), dir.path().join("tcp.log"));
    let cfg = two_listeners(up.addr, &top_log(&top), "", "").replacen(
        "routes:\n",
        &format!(
            "  - name: tcp
    address: 127.0.0.1:0
    tcp: {{ cluster: echo }}
{}routes:\n",
            own_log(
                &tcp,
                ", format: '%LISTENER_NAME% %PROTOCOL% %RESPONSE_CODE% %BYTES_RECEIVED%'"
            )
        ),
        1,
    ) + &format!(
        "  - name: echo\n    endpoints:\n      - address: {}\n",
        echo.addr
    );
    let lg = legate().config(&cfg).start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    c.write(b"hi\n").await;
    assert_eq!(c.read_exact(3, HANG_GUARD).await.unwrap(), b"hi\n");
    drop(c);
    let mut h = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(h.get("/w").send().await.status, 200);
    lg.assert_stat(WEB_2XX, 1.0).await;
    let lines = text_lines(&tcp, 1).await;
    assert_eq!(lines, ["tcp - 200 3"]);
    lg.shutdown_and_wait().await.unwrap();
    let http = access_log_lines(&top);
    assert_eq!(http.len(), 1, "{http:?}");
    assert_eq!(http[0]["listener"], "web", "{http:?}");
    assert_eq!(access_log_text(&tcp), ["tcp - 200 3"]);
}

each_proto!(
    /// `POST /reopen_logs` (as SIGUSR1) reopens a listener's own log too, not
    /// only the top-level one: logrotate's `create` moves each file away.
    async fn reopening_covers_a_listeners_own_log(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let (top, web) = (dir.path().join("top.log"), dir.path().join("web.log"));
        let moved = dir.path().join("web.log.1");
        let cfg = two_listeners(
            up.addr,
            &top_log(&top),
            &own_log(&web, ", flush_interval: 1m, format: '%REQ(:PATH)%'"),
            "",
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/before").send().await.status, 200);
        std::fs::rename(&web, &moved).unwrap();
        let (status, body) = lg.admin_post("/reopen_logs").await;
        assert_eq!(status, 200, "{body}");
        eventually(HANG_GUARD, "the listener's log opened again", || async {
            web.exists().then_some(())
        })
        .await;
        assert_eq!(c.get("/after").send().await.status, 200);
        lg.assert_stat(WEB_2XX, 2.0).await;
        lg.shutdown_and_wait().await.unwrap();
        assert_eq!(access_log_text(&moved), ["/before"]);
        assert_eq!(access_log_text(&web), ["/after"]);
    }
);
