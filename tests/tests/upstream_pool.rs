//! The upstream connection pool's HTTP/2 connections: a burst of requests with no
//! connection yet opens one connection and waits for it, a connection with no
//! stream open for the cluster's `idle_timeout` is closed, and a long stream keeps
//! its connection open (and reusable) past that time. HTTP/1.1: a connection
//! whose request body is still uploading is not pooled when its response ends.
//! TLS: endpoints naming one address under two host names do not share
//! connections (each one's SNI and certificate check are its own). A full HTTP/2
//! connection (`max_concurrent_streams`) makes the pool open another.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use legate_tests::*;

const CLUSTER_2XX: &str = r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#;
const CX_TOTAL: &str = r#"legate_cluster_upstream_cx_total{cluster="backend"}"#;
const CX_ACTIVE: &str = r#"legate_cluster_upstream_cx_active{cluster="backend"}"#;
const CX_CONNECT_FAIL: &str = r#"legate_cluster_upstream_cx_connect_fail{cluster="backend"}"#;
const CX_OVERFLOW: &str = r#"legate_cluster_upstream_cx_overflow{cluster="backend"}"#;
const PENDING_ACTIVE: &str = r#"legate_cluster_upstream_rq_pending_active{cluster="backend"}"#;

/// Chunks of the slow response, and the time between them.
const SLOW_CHUNKS: usize = 10;
const SLOW_GAP: Duration = Duration::from_millis(300);

/// A response whose body streams `SLOW_CHUNKS` chunks `SLOW_GAP` apart (3 s).
async fn slow_response(_req: Request<Incoming>) -> Response<BoxBody> {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    let chunks = futures_util::stream::iter(0..SLOW_CHUNKS).then(|i| async move {
        tokio::time::sleep(SLOW_GAP).await;
        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from(format!("chunk-{i};"))))
    });
    Response::new(BodyExt::boxed(http_body_util::StreamBody::new(chunks)))
}

fn slow_body() -> String {
    (0..SLOW_CHUNKS).map(|i| format!("chunk-{i};")).collect()
}

/// `n` clients of `proto`: over HTTP/2 handles on one connection, over HTTP/1.1
/// one connection each (all opened before any request, so the requests come as
/// one burst).
async fn clients(proto: Proto, addr: std::net::SocketAddr, n: usize) -> Vec<Client> {
    match proto {
        Proto::H2 => {
            let c = client(proto, addr).await;
            (0..n).map(|_| c.clone()).collect()
        }
        Proto::H1 => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(client(proto, addr).await);
            }
            v
        }
    }
}

each_proto!(
    /// 50 concurrent requests to an HTTP/2 upstream with no connection yet open
    /// one connection: the others wait for it instead of each opening their own
    /// (the proxy runs one worker, so one connection in all).
    async fn a_burst_opens_one_h2_connection(proto) {
        let up = upstream()
            .h2()
            .delay(Duration::from_millis(50))
            .start()
            .await;
        let lg = legate()
            .config(&simple_config_with(&[up.addr], "", "    protocol: h2\n"))
            .start();
        let tasks: Vec<_> = clients(proto, lg.addr("web"), 50)
            .await
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                tokio::spawn(async move {
                    let r = c.get(&format!("/burst/{i}")).send().await;
                    (r.status.as_u16(), r.echo().path)
                })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let (status, path) = t.await.unwrap();
            assert_eq!(status, 200, "request {i}");
            assert_eq!(path, format!("/burst/{i}"));
        }
        assert_eq!(
            up.connections.get(),
            1,
            "the burst opened one upstream connection per request"
        );
        // Concurrently, not one after another: all 50 at once is the usual case,
        // but a loaded machine may start the last requests after the first
        // answers (50 ms each), so only overlap is asserted.
        assert!(
            up.max_in_flight.get() > 1,
            "the requests did not share it concurrently ({} at most in flight)",
            up.max_in_flight.get()
        );
        lg.assert_stat(CLUSTER_2XX, 50.0).await;
        lg.assert_stat(CX_TOTAL, 1.0).await;
        lg.assert_stat(CX_ACTIVE, 1.0).await;
        lg.assert_stat(PENDING_ACTIVE, 0.0).await;
    }
);

each_proto!(
    /// A burst to an HTTP/2 endpoint that refuses connections: the requests that
    /// waited for the failed connection get its error (502
    /// `upstream_connect_failure`), none hangs.
    async fn a_burst_shares_a_failed_h2_connect(proto) {
        let addr = closed_port_addr();
        let lg = legate()
            .config(&simple_config_with(&[addr], "", "    protocol: h2\n"))
            .start();
        let tasks: Vec<_> = clients(proto, lg.addr("web"), 20)
            .await
            .into_iter()
            .map(|mut c| {
                tokio::spawn(async move {
                    let r = c.get("/").send().await;
                    (r.status.as_u16(), r.text())
                })
            })
            .collect();
        for t in tasks {
            let (status, body) = tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("a request waiting for the failed connection hung")
                .unwrap();
            assert_eq!(status, 502, "{body}");
            assert!(body.contains("upstream_connect_failure"), "{body}");
        }
        lg.assert_stat_with(CX_CONNECT_FAIL, |v| (1.0..=20.0).contains(&v), "in 1..=20")
            .await;
        // Every connection attempt counts in `cx_total`, the failed ones too
        // (it was 0, below `cx_connect_fail`), and every request's failed
        // attempt in `upstream_rq_5xx` (it was 0).
        let failed = lg.stat(CX_CONNECT_FAIL).await.unwrap();
        lg.assert_stat(CX_TOTAL, failed).await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_5xx{cluster="backend"}"#, 20.0)
            .await;
        lg.assert_stat(PENDING_ACTIVE, 0.0).await;
    }
);

each_proto!(
    /// An upstream HTTP/2 connection is closed once no stream was open on it for
    /// the cluster's `idle_timeout`; a response streaming for longer than that
    /// keeps it open, whole, and the connection is reused meanwhile.
    async fn an_idle_h2_connection_is_closed(proto) {
        let up = upstream()
            .h2()
            .route("/slow", slow_response)
            .start()
            .await;
        let lg = legate()
            .config(&simple_config_with(
                &[up.addr],
                "",
                "    protocol: h2\n    idle_timeout: 1s\n",
            ))
            .start();
        let mut cs = clients(proto, lg.addr("web"), 2).await;
        let mut c = cs.pop().unwrap();
        let mut slow_client = cs.pop().unwrap();
        let slow = tokio::spawn(async move {
            let r = slow_client.get("/slow").send().await;
            (r.status.as_u16(), r.text())
        });
        // Past the idle timeout (and a sweep) while the slow response streams.
        tokio::time::sleep(Duration::from_millis(2000)).await;
        let r = c.get("/during").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().path, "/during");
        assert_eq!(
            up.connections.get(),
            1,
            "the connection with a stream open was dropped from the pool"
        );
        assert_eq!(up.closed.get(), 0, "the connection closed under a stream");
        let (status, body) = slow.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, slow_body(), "the long response was cut");
        assert_eq!(up.closed.get(), 0, "closed at once, not after the idle timeout");
        lg.assert_stat(CX_ACTIVE, 1.0).await;

        // Idle now: closed within the timeout and a sweep (1 s each).
        eventually(Duration::from_secs(5), "the idle connection to close", || async {
            (up.closed.get() == 1).then_some(())
        })
        .await;
        lg.assert_stat(CX_ACTIVE, 0.0).await;
        lg.assert_stat(CX_TOTAL, 1.0).await;

        // The next request opens a new one.
        let r = c.get("/after").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(up.connections.get(), 2);
        lg.assert_stat(CX_TOTAL, 2.0).await;
        lg.assert_stat(CLUSTER_2XX, 3.0).await;
    }
);

/// A cluster a reload changed gets new settings, so the pool never uses its old
/// HTTP/2 connection again: that connection closes after its idle timeout instead
/// of staying open for good, and the new one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_does_not_leak_h2_connections() {
    let up = upstream().h2().start().await;
    let config = |idle: &str| {
        let yaml = simple_config_with(
            &[up.addr],
            "",
            &format!("    protocol: h2\n    idle_timeout: {idle}\n"),
        );
        yaml
    };
    let lg = legate().config(&config("1s")).from_file().start();
    let web = lg.addr("web");
    let stat = |series: &'static str| {
        let lg = &lg;
        async move { lg.stat(series).await }
    };

    for proto in [Proto::H1, Proto::H2] {
        let mut c = client(proto, web).await;
        assert_eq!(c.get("/before").send().await.status, 200);
    }
    assert_eq!(up.connections.get(), 1);

    // The cluster changes (a longer idle timeout): new settings, a new connection.
    lg.reload_ok(&config("60s")).await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = client(proto, web).await;
        assert_eq!(c.get("/after").send().await.status, 200);
    }
    assert_eq!(up.connections.get(), 2);

    // The old connection closes after its own (1 s) idle timeout; the new one stays.
    eventually(
        Duration::from_secs(5),
        "the old connection to close",
        || async { (up.closed.get() == 1).then_some(()) },
    )
    .await;
    eventually(Duration::from_secs(2), "upstream_cx_active 1", || async {
        (stat(CX_ACTIVE).await == Some(1.0)).then_some(())
    })
    .await;
    // The reloaded cluster's counters go on from the old ones: two
    // connections in all, one of them open (its gauge is the new cluster's).
    assert_eq!(stat(CX_TOTAL).await, Some(2.0));
    assert_eq!(up.requests.get(), 4);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(up.closed.get(), 1, "the new connection closed too soon");
}

/// A request body: one chunk, then nothing until `release` is set, then its end.
struct HeldUpload {
    first: bool,
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
    poll: tokio::time::Interval,
}

impl hyper::body::Body for HeldUpload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        if self.first {
            self.first = false;
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
                b"first part of a long upload",
            )))));
        }
        while !self.release.load(std::sync::atomic::Ordering::SeqCst) {
            std::task::ready!(self.poll.poll_tick(cx));
        }
        Poll::Ready(None)
    }
}

each_proto!(
    /// An HTTP/1.1 upstream answers (401) before the client's upload is over:
    /// that connection is still busy sending the body, so it must not go back to
    /// the pool, where the next request would wait behind the upload (here: until
    /// the route timeout, a 504). It is not reused; the next request opens its own.
    async fn a_connection_still_uploading_is_not_pooled(proto) {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let up = upstream()
            .route("/upload", |req: Request<Incoming>| async {
                // Answers at once and reads the body on (as Go and Node servers
                // do): the connection stays open, busy with the upload.
                tokio::spawn(async move {
                    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                });
                let mut r = Response::new(Full::new(Bytes::from_static(b"no\n")));
                *r.status_mut() = StatusCode::UNAUTHORIZED;
                r
            })
            .start()
            .await;
        let lg = legate()
            .concurrency(1)
            .config(&simple_config_with(
                &[up.addr],
                "            timeout: 3s\n",
                "    protocol: http1\n",
            ))
            .start();
        let release = Arc::new(AtomicBool::new(false));
        let body = HeldUpload {
            first: true,
            release: release.clone(),
            poll: tokio::time::interval(Duration::from_millis(10)),
        };
        let mut c1 = client(proto, lg.addr("web")).await;
        let r = c1.post("/upload").boxed_body(http_body_util::BodyExt::boxed(body)).send().await;
        assert_eq!(r.status, 401, "{}", r.text());

        let mut c2 = client(proto, lg.addr("web")).await;
        let r = c2.get("/after").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(up.connections.get(), 2, "the uploading connection was reused");
        release.store(true, Ordering::SeqCst);
    }
);

/// A TLS cluster with two endpoints, `a.test` and `b.test` on `port`, both resolved
/// to 127.0.0.1 by `dns` (a `dns` cluster, round robin).
fn two_names_one_address(port: u16, dns: std::net::SocketAddr, ca: &Ca, protocol: &str) -> String {
    web_config(
        "          - match: { prefix: / }\n            cluster: backend\n",
        &format!(
            "  - name: backend
    protocol: {protocol}
    tls: {{ ca: {ca} }}
    discovery:
      type: dns
      dns_resolvers: [\"{dns}\"]
      dns_refresh_rate: 1h
    endpoints:
      - address: \"a.test:{port}\"
      - address: \"b.test:{port}\"
",
            ca = ca.cert_path.display()
        ),
    )
}

each_proto!(
    /// One TLS server behind two names (virtual hosts): a cluster's endpoints
    /// `a.test` and `b.test` resolve to the same address. Each request goes over a
    /// connection opened for its own endpoint, with that endpoint's name as SNI
    /// (and its certificate checked for it), never over the other's: one
    /// connection per name, each reused, over HTTP/1.1 and HTTP/2 upstream.
    async fn tls_endpoints_on_one_address_keep_their_own_connections(proto) {
        for protocol in ["http1", "h2"] {
            let ca = Ca::new("upstream CA");
            let up = upstream().tls(ca.server(&["a.test", "b.test"])).start().await;
            let dns = DnsServer::start(&[std::net::Ipv4Addr::LOCALHOST]).await;
            let lg = legate()
                .concurrency(1)
                .config(&two_names_one_address(up.addr.port(), dns.addr, &ca, protocol))
                .start();
            let members = r#"legate_cluster_membership_total{cluster="backend"}"#;
            eventually(Duration::from_secs(10), "both endpoints resolved", || async {
                (lg.stat(members).await == Some(2.0)).then_some(())
            })
            .await;
            let mut c = client(proto, lg.addr("web")).await;
            let mut names = Vec::new();
            for i in 0..6 {
                let r = c.get(&format!("/{i}")).send().await;
                assert_eq!(r.status, 200, "{protocol}: {}", r.text());
                let tls = r.echo().tls.expect("the upstream saw TLS");
                names.push(tls.sni.unwrap_or_default());
            }
            // Round robin (one worker) alternates the endpoints: so do the names.
            assert!(
                names.windows(2).all(|w| w[0] != w[1]),
                "{protocol}: SNI per request {names:?}"
            );
            let mut seen = names.clone();
            seen.sort();
            seen.dedup();
            assert_eq!(seen, ["a.test", "b.test"], "{protocol}");
            assert_eq!(up.connections.get(), 2, "{protocol}: one connection per name");
            lg.assert_stat(CLUSTER_2XX, 6.0).await;
            lg.assert_stat(CX_TOTAL, 2.0).await;
        }
    }
);

/// Five requests sent at once over `proto` to an h2 upstream that holds them
/// until `release` is set, through one worker and a cluster with
/// `max_concurrent_streams: 2` and `extra`; returns once all five are at the
/// upstream, with the tasks that give each one's response.
#[allow(clippy::type_complexity)]
async fn five_held_h2_requests(
    proto: Proto,
    extra: &str,
) -> (
    LegateHandle,
    UpstreamHandle,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    Vec<tokio::task::JoinHandle<Resp>>,
) {
    let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up = upstream().h2().hold_until(&release).start().await;
    let lg = legate()
        .concurrency(1)
        .config(&simple_config_with(
            &[up.addr],
            "",
            &format!("    protocol: h2\n    max_concurrent_streams: 2\n{extra}"),
        ))
        .start();
    let tasks = send_five_held(proto, &lg, &up).await;
    (lg, up, release, tasks)
}

/// Sends five requests at once over `proto` through `lg` to `up`, which holds
/// them; returns once all five are at the upstream, with the tasks that give
/// each one's response.
async fn send_five_held(
    proto: Proto,
    lg: &LegateHandle,
    up: &UpstreamHandle,
) -> Vec<tokio::task::JoinHandle<Resp>> {
    let tasks: Vec<_> = clients(proto, lg.addr("web"), 5)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| tokio::spawn(async move { c.get(&format!("/held/{i}")).send().await }))
        .collect();
    eventually(
        Duration::from_secs(10),
        "all 5 requests at the upstream",
        || async { (up.in_flight.get() == 5).then_some(()) },
    )
    .await;
    tasks
}

/// Lets the upstream answer the held requests; each must get 200. Their
/// responses, in the order sent.
async fn release_all(
    release: &std::sync::atomic::AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<Resp>>,
) -> Vec<Resp> {
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut out = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        out.push(r);
    }
    out
}

each_proto!(
    /// An HTTP/2 connection takes `max_concurrent_streams` streams; past that,
    /// another is opened. Five requests held by the upstream at once, with a limit
    /// of 2 and one worker: three connections (2 + 2 + 1), where one connection
    /// would have queued them past an upstream's limit. The first connection is
    /// reused once its streams end.
    async fn a_full_h2_connection_opens_another(proto) {
        let (lg, up, release, tasks) = five_held_h2_requests(proto, "").await;
        assert_eq!(up.connections.get(), 3, "connections for 5 streams, 2 per connection");
        lg.assert_stat(CX_ACTIVE, 3.0).await;
        for (i, r) in release_all(&release, tasks).await.iter().enumerate() {
            assert_eq!(r.echo().path, format!("/held/{i}"));
        }
        // Streams free again: a later request opens nothing.
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/after").send().await.status, 200);
        assert_eq!(up.connections.get(), 3);
        lg.assert_stat(CLUSTER_2XX, 6.0).await;
        lg.assert_stat(CX_TOTAL, 3.0).await;
        lg.assert_stat(PENDING_ACTIVE, 0.0).await;
    }
);

each_proto!(
    /// An upstream that allows fewer streams than the cluster's
    /// `max_concurrent_streams` (its `SETTINGS_MAX_CONCURRENT_STREAMS` is 2,
    /// the cluster's the default 100) gets no more than that per connection:
    /// five held requests after a first one (which brought its SETTINGS) go
    /// over three connections, where one would have left three of them queued
    /// in hyper, never reaching the upstream.
    async fn the_upstreams_own_stream_limit_opens_another_connection(proto) {
        let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let up = upstream()
            .h2_max_concurrent_streams(2)
            .hold_until(&release)
            .start()
            .await;
        let lg = legate()
            .concurrency(1)
            .config(&simple_config_with(&[up.addr], "", "    protocol: h2\n"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/first").send().await.status, 200);
        release.store(false, std::sync::atomic::Ordering::SeqCst);
        let tasks = send_five_held(proto, &lg, &up).await;
        assert_eq!(up.connections.get(), 3, "connections for 5 streams, 2 per connection");
        release_all(&release, tasks).await;
        lg.assert_stat(CLUSTER_2XX, 6.0).await;
        lg.assert_stat(CX_TOTAL, 3.0).await;
    }
);

each_proto!(
    /// When `circuit_breakers.max_connections` refuses another HTTP/2 connection
    /// (counted as an overflow), a request past the streams of the open ones shares
    /// the least loaded one instead of failing: five requests held at once, two
    /// streams per connection, two connections at most: all five reach the
    /// upstream, over two connections, and all are answered.
    async fn full_h2_connections_are_shared_at_max_connections(proto) {
        let (lg, up, release, tasks) =
            five_held_h2_requests(proto, "    circuit_breakers: { max_connections: 2 }\n").await;
        assert_eq!(up.connections.get(), 2);
        release_all(&release, tasks).await;
        lg.assert_stat(CLUSTER_2XX, 5.0).await;
        lg.assert_stat(CX_TOTAL, 2.0).await;
        lg.assert_stat_with(CX_OVERFLOW, |v| v >= 1.0, ">= 1").await;
        lg.assert_stat(PENDING_ACTIVE, 0.0).await;
    }
);

each_proto!(
    /// An upstream whose `SETTINGS_MAX_CONCURRENT_STREAMS` is 0 takes no stream
    /// on its connections until it raises the limit, as in Envoy (its pool
    /// marks such a connection busy): each request looks for a connection with
    /// a stream free, so it opens another, and `circuit_breakers.max_connections`
    /// bounds them (`upstream_cx_overflow`). Past it a request waits on the
    /// least loaded connection, here until its route timeout. The first
    /// request, sent before the upstream's SETTINGS came, is refused.
    async fn an_upstream_allowing_no_streams_gets_max_connections(proto) {
        let up = upstream().h2_max_concurrent_streams(0).start().await;
        let lg = legate()
            .concurrency(1)
            .config(&simple_config_with(
                &[up.addr],
                "            timeout: 500ms\n",
                "    protocol: h2\n    circuit_breakers: { max_connections: 2 }\n",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for i in 0..4 {
            let r = c.get(&format!("/r{i}")).send().await;
            let got = (r.status.as_u16(), r.text());
            let ok = [(502, "upstream_reset\n"), (504, "upstream_timeout\n")];
            assert!(ok.iter().any(|(s, t)| (*s, t.to_string()) == got), "{i}: {got:?}");
        }
        assert_eq!(up.connections.get(), 2);
        assert_eq!(up.requests.get(), 0);
        lg.assert_stat(CX_TOTAL, 2.0).await;
        lg.assert_stat_with(CX_OVERFLOW, |v| v >= 1.0, ">= 1").await;
    }
);

/// A response of `STUCK_BODY` bytes (never all read in the test) that counts
/// what the upstream handed to hyper to send in `produced`.
fn endless_response(produced: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Response<BoxBody> {
    use http_body_util::BodyExt;
    const CHUNK: usize = 64 * 1024;
    const STUCK_BODY: usize = 256 << 20;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let chunks = futures_util::stream::iter((0..STUCK_BODY / CHUNK).map(move |_| {
        produced.fetch_add(CHUNK, std::sync::atomic::Ordering::SeqCst);
        Ok::<_, BoxError>(hyper::body::Frame::data(chunk.clone()))
    }));
    Response::new(BodyExt::boxed(http_body_util::StreamBody::new(chunks)))
}

/// Waits until `produced` stops growing: the stalled responses filled every
/// window and buffer on their way (their clients read nothing).
async fn until_stalled(produced: &std::sync::atomic::AtomicUsize) {
    let deadline = std::time::Instant::now() + HANG_GUARD;
    let mut last = usize::MAX;
    loop {
        let now = produced.load(std::sync::atomic::Ordering::SeqCst);
        if now == last && now > 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the unread responses never stalled ({now} bytes sent)"
        );
        last = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

each_proto!(
    /// Clients that stop reading large responses do not stall the other
    /// streams of the upstream HTTP/2 connection their requests share. What a
    /// stream received and Legate has not forwarded counts against the
    /// connection's flow-control window too: with hyper's default windows (2 MiB
    /// a stream, 5 MiB the connection) three stalled streams shut it, and every
    /// other response on the connection got its head and then no data at all
    /// (until the stream idle timeout, 5 min). The connection window is now the
    /// stream window × `max_concurrent_streams`.
    async fn unread_responses_do_not_stall_the_shared_h2_connection(proto) {
        let produced = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = produced.clone();
        let up = upstream()
            .h2()
            .route("/endless", move |_req| {
                let produced = counted.clone();
                async move { endless_response(produced) }
            })
            .start()
            .await;
        let lg = legate()
            .concurrency(1)
            .config(&simple_config_with(
                &[up.addr],
                // No route timeout: only the stall may end the unread streams.
                "            timeout: 0s\n",
                "    protocol: h2\n",
            ))
            .start();
        // Four unread responses (a client that never reads; over HTTP/1.1 four
        // connections, over HTTP/2 four streams of one connection).
        let mut unread = Vec::new();
        for mut c in clients(proto, lg.addr("web"), 4).await {
            let head = c.get("/endless").send_for_head().await;
            assert_eq!(head.status(), 200);
            unread.push((c, head));
        }
        until_stalled(&produced).await;
        lg.assert_stat(CX_TOTAL, 1.0).await;
        // Another client's requests go on the same upstream connection and
        // complete, body and all.
        let mut c = client(proto, lg.addr("web")).await;
        for i in 0..3 {
            let r = tokio::time::timeout(HANG_GUARD, c.get(&format!("/small/{i}")).send())
                .await
                .unwrap_or_else(|_| panic!("request {i} stalled behind the unread responses"));
            assert_eq!(r.status, 200);
            assert_eq!(r.echo().path, format!("/small/{i}"));
        }
        lg.assert_stat(CX_TOTAL, 1.0).await;
        drop(unread);
    }
);

/// What a raw HTTP/2 upstream saw: request heads and PINGs.
#[derive(Default)]
struct H2Seen {
    heads: std::sync::atomic::AtomicUsize,
    pings: std::sync::atomic::AtomicUsize,
}

/// An HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An h2c upstream of raw frames (hyper's server does not tell of the PINGs it
/// answers): it answers SETTINGS and PINGs, counts the PINGs and request heads,
/// and never answers a request, so that each stays open.
async fn pinged_upstream() -> (std::net::SocketAddr, std::sync::Arc<H2Seen>) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(H2Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = counts.clone();
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
                        match kind {
                            1 => {
                                seen.heads.fetch_add(1, SeqCst);
                            }
                            4 if flags & 1 == 0 => s.write_all(&h2_frame(4, 1, 0, &[])).await?,
                            6 if flags & 1 == 0 => {
                                seen.pings.fetch_add(1, SeqCst);
                                s.write_all(&h2_frame(6, 1, 0, &payload)).await?;
                            }
                            _ => {}
                        }
                    }
                }
                .await;
            });
        }
    });
    (addr, seen)
}

each_proto!(
    /// Upstream HTTP/2 connections carry no keep-alive PINGs unless the cluster
    /// sets `connection_keepalive`, as Envoy: they were sent after every 30 s
    /// of silence, and a gRPC server's default policy (grpc-go: one PING in 5
    /// minutes) answers those with GOAWAY `too_many_pings`, ending a quiet
    /// server-streaming call. With the key the PINGs come at its interval;
    /// without it, none in that time.
    async fn h2_keepalive_pings_only_when_configured(proto) {
        use std::sync::atomic::Ordering::SeqCst;
        let (pinged_addr, pinged) = pinged_upstream().await;
        let (quiet_addr, quiet) = pinged_upstream().await;
        let config = web_config(
            "          - match: { prefix: /quiet }
            cluster: quiet
            timeout: 0s
          - match: { prefix: / }
            cluster: backend
            timeout: 0s
",
            &format!(
                "  - name: backend
    endpoints:
      - address: {pinged_addr}
    protocol: h2
    connection_keepalive: {{ interval: 50ms, timeout: 10s }}
  - name: quiet
    endpoints:
      - address: {quiet_addr}
    protocol: h2
"
            ),
        );
        let lg = legate().config(&config).start();
        // Both requests stay open (the upstreams never answer): hyper pings
        // only a connection with a stream open.
        let mut held = Vec::new();
        for (path, seen) in [("/quiet", &quiet), ("/pinged", &pinged)] {
            let mut c = client(proto, lg.addr("web")).await;
            held.push(tokio::spawn(async move { c.get(path).send().await }));
            eventually(HANG_GUARD, "the request at the upstream", || async {
                (seen.heads.load(SeqCst) == 1).then_some(())
            })
            .await;
        }
        eventually(HANG_GUARD, "two PINGs on the configured cluster", || async {
            (pinged.pings.load(SeqCst) >= 2).then_some(())
        })
        .await;
        assert_eq!(
            quiet.pings.load(SeqCst),
            0,
            "a cluster without connection_keepalive pinged its upstream"
        );
        for h in held {
            h.abort();
        }
    }
);

each_proto!(
    /// `circuit_breakers.max_connections` counts the connections of every worker
    /// to every endpoint; a worker with no connection to an endpoint (open or
    /// opening) still opens one over it, counted in `upstream_cx_overflow`, as
    /// Envoy's per-worker pool does. Here one worker, two endpoints and
    /// `max_connections: 1`, one request at a time: the connection kept idle to
    /// the first endpoint refused every request to the second with 503
    /// `overloaded` (half the requests of an idle proxy; with two workers,
    /// likewise the connection another worker kept).
    async fn a_first_connection_to_an_endpoint_is_opened_over_max_connections(proto) {
        for protocol in ["http1", "h2"] {
            let a = upstream().name("a").start().await;
            let b = upstream().name("b").start().await;
            let lg = legate()
                .config(&simple_config_with(
                    &[a.addr, b.addr],
                    "",
                    &format!("    protocol: {protocol}\n    circuit_breakers: {{ max_connections: 1 }}\n"),
                ))
                .start();
            let mut c = client(proto, lg.addr("web")).await;
            for i in 0..4 {
                let r = c.get(&format!("/r{i}")).send().await;
                assert_eq!(r.status, 200, "{protocol} /r{i}: {}", r.text());
            }
            assert_eq!((a.requests.get(), b.requests.get()), (2, 2), "{protocol}");
            assert_eq!((a.connections.get(), b.connections.get()), (1, 1), "{protocol}");
            lg.assert_stat(CLUSTER_2XX, 4.0).await;
            lg.assert_stat(CX_TOTAL, 2.0).await;
            lg.assert_stat(CX_ACTIVE, 2.0).await;
            // The second connection went over the limit: counted, as Envoy's.
            lg.assert_stat(CX_OVERFLOW, 1.0).await;
        }
    }
);
