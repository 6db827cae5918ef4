//! Tests of the harness itself, without Legate: the upstreams, clients and
//! certificates the proxy tests rely on must behave as documented, or a proxy test
//! failure would be meaningless.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use legate_tests::*;

each_proto!(
    async fn echo_reports_the_request(proto) {
        let up = upstream().name("a").start().await;
        let mut c = client(proto, up.addr).await;
        let r = c
            .post("/p?q=1")
            .host("example.test")
            .header("x-multi", "1")
            .header("x-multi", "2")
            .body("hello")
            .send()
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-upstream"), Some("a"));
        let e = r.echo();
        assert_eq!(e.method, "POST");
        assert_eq!(e.path, "/p?q=1");
        assert_eq!(e.body, "hello");
        assert_eq!(e.header("host"), Some("example.test"));
        assert_eq!(e.header_all("x-multi"), vec!["1", "2"]);
        assert_eq!(e.version, format!("{:?}", proto.version()));
        assert_eq!(up.requests.get(), 1);
        assert_eq!(up.connections.get(), 1);
    }
);

each_proto!(
    async fn behaviours(proto) {
        let up = upstream().fail_first(2, 503).start().await;
        let mut c = client(proto, up.addr).await;
        assert_eq!(c.get("/").send().await.status, 503);
        assert_eq!(c.get("/").send().await.status, 503);
        assert_eq!(c.get("/").send().await.status, 200);

        let up = upstream().status(418).start().await;
        let mut c = client(proto, up.addr).await;
        assert_eq!(c.get("/").send().await.status, 418);

        let up = upstream()
            .route("/fixed", |_req| async { Response::new(Full::new(Bytes::from("fixed"))) })
            .route("/pre/*", |_req| async { Response::new(Full::new(Bytes::from("prefix"))) })
            .start()
            .await;
        let mut c = client(proto, up.addr).await;
        assert_eq!(c.get("/fixed").send().await.text(), "fixed");
        assert_eq!(c.get("/pre/x/y").send().await.text(), "prefix");
        assert_eq!(c.get("/other").send().await.echo().path, "/other");

        let up = upstream().close_connection().start().await;
        let mut c = client(proto, up.addr).await;
        assert!(c.get("/").try_send().await.is_err());
        assert_eq!(up.connections.get(), 1);
    }
);

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let n = 10 << 20;
    let up = upstream()
        .route("/sink", sink)
        .route("/source", source(n))
        .start()
        .await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = client(proto, up.addr).await;
        let data = pattern_bytes(n);
        let r = c
            .post("/sink")
            .streamed_body(data.clone(), 64 * 1024)
            .send()
            .await;
        let v = r.json();
        assert_eq!(v["len"], n);
        assert_eq!(v["checksum"], checksum(&data));
        let r = c.get("/source").send().await;
        assert_eq!(r.body.len(), n);
        assert_eq!(checksum(&r.body), checksum(&data));
    }
}

#[tokio::test]
async fn grpc_echo_has_trailers() {
    let up = upstream().grpc().start().await;
    let mut c = client(Proto::H2, up.addr).await;
    let msg = grpc_frame(b"ping");
    let r = c
        .post("/pkg.Svc/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(msg.clone())
        .send()
        .await;
    assert_eq!(r.header("content-type"), Some("application/grpc"));
    assert_eq!(r.body, msg);
    assert_eq!(r.trailer("grpc-status"), Some("0"));
    assert_eq!(r.trailer("x-echo-trailer"), Some("yes"));
}

#[tokio::test]
async fn request_trailers_reach_the_upstream() {
    let up = upstream().start().await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = client(proto, up.addr).await;
        let mut t = HeaderMap::new();
        t.insert("x-trailer", HeaderValue::from_static("t1"));
        let r = c
            .post("/")
            .header("te", "trailers")
            .body_with_trailers("data", t)
            .send()
            .await;
        let e = r.echo();
        assert_eq!(e.body, "data");
        assert_eq!(e.trailers["x-trailer"], vec!["t1"]);
    }
}

#[tokio::test]
async fn tls_and_mtls_upstreams() {
    let ca = Ca::new("harness CA");
    let server = ca.server(&["upstream.test"]);
    let up = upstream().name("tls").tls(server.clone()).start().await;
    for proto in [Proto::H1, Proto::H2] {
        let mut c = tls_client(proto, up.addr, TlsOptions::new(&server, "upstream.test"))
            .await
            .expect("tls connect");
        assert_eq!(c.peer_cert.as_ref(), Some(&server.chain[0]));
        let e = c.get("/").send().await.echo();
        let tls = e.tls.expect("tls info");
        assert_eq!(tls.sni.as_deref(), Some("upstream.test"));
        assert_eq!(
            tls.alpn.as_deref(),
            Some(if proto == Proto::H1 { "http/1.1" } else { "h2" })
        );
        assert!(!tls.client_cert);
    }
    // Wrong name: verification fails.
    assert!(
        tls_client(Proto::H1, up.addr, TlsOptions::new(&server, "other.test"))
            .await
            .is_err()
    );

    let client_cert = ca.client("client.test");
    let up = upstream()
        .tls(server.clone())
        .client_ca(client_cert.clone())
        .start()
        .await;
    let mut c = tls_client(
        Proto::H1,
        up.addr,
        TlsOptions::new(&server, "upstream.test").client_cert(client_cert),
    )
    .await
    .expect("mtls connect");
    assert!(c.get("/").send().await.echo().tls.expect("tls").client_cert);
    // Without a certificate the handshake or the first request fails.
    let failed = match tls_client(
        Proto::H1,
        up.addr,
        TlsOptions::new(&server, "upstream.test"),
    )
    .await
    {
        Err(_) => true,
        Ok(mut c) => c.get("/").try_send().await.is_err(),
    };
    assert!(
        failed,
        "mTLS upstream accepted a client without a certificate"
    );
}

#[tokio::test]
async fn raw_tcp_and_upgrade_servers() {
    let echo = tcp_echo_server().await;
    let mut c = RawConn::connect(echo.addr).await;
    c.write(b"abc").await;
    assert_eq!(
        c.read_exact(3, Duration::from_secs(2)).await.unwrap(),
        b"abc"
    );
    drop(c);
    eventually(
        Duration::from_secs(2),
        "echo server sees the close",
        || async { (echo.closed.get() == 1).then_some(()) },
    )
    .await;
    assert_eq!(echo.bytes.get(), 3);

    let up = upgrade_echo_server().await;
    let mut c = RawConn::connect(up.addr).await;
    c.write(b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-key: k\r\n\r\n")
        .await;
    let head = String::from_utf8(c.read_head(Duration::from_secs(2)).await).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-accept: accept-k"), "{head}");
    c.write(b"ping").await;
    assert_eq!(
        c.read_exact(4, Duration::from_secs(2)).await.unwrap(),
        b"ping"
    );
    assert_eq!(up.heads.lock().unwrap().len(), 1);
}

#[test]
fn raw_status_parses() {
    assert_eq!(raw_status(b"HTTP/1.1 400 Bad Request\r\n"), Some(400));
    assert_eq!(raw_status(b"HTTP/1.0 200 OK\r\n"), Some(200));
    assert_eq!(raw_status(b"garbage"), None);
}

/// `free_addr` ports are ones `bind(:0)` never hands out (below the ephemeral
/// range), each claimed by a lock that another test process would find taken.
#[test]
fn free_addr_reserves_ports_no_ephemeral_bind_can_take() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let first_ephemeral: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    let (a, b) = (free_addr(), free_addr());
    assert_ne!(a, b);
    for addr in [a, b] {
        assert!(
            addr.port() < first_ephemeral,
            "{addr} in the ephemeral range"
        );
        // Bindable: nothing listens there.
        drop(std::net::TcpListener::bind(addr).unwrap());
        let lock = std::env::temp_dir()
            .join("legate-test-ports")
            .join(addr.port().to_string());
        let other = std::fs::File::open(lock).unwrap();
        assert!(matches!(
            other.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
    }
}
