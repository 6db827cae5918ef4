//! `listeners[].proxy_protocol`: the client address a load balancer sends in a
//! PROXY protocol header (v1 or v2) is the one Legate forwards and logs, over
//! HTTP/1.1, HTTP/2, TLS and on TCP listeners; a connection without a header is
//! closed (or, when it is optional, served with its own address).

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use legate_tests::*;

const ERRORS: &str = r#"legate_listener_proxy_protocol_errors_total{listener="web"}"#;

/// `PROXY TCP4 …` for `source` → `destination`.
fn v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// A version 2 `PROXY` header for two IPv4 addresses, with an AWS-style TLV.
fn v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (source, destination) else {
        panic!("IPv4 only here");
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11]);
    let mut block = Vec::new();
    block.extend_from_slice(&s.ip().octets());
    block.extend_from_slice(&d.ip().octets());
    block.extend_from_slice(&s.port().to_be_bytes());
    block.extend_from_slice(&d.port().to_be_bytes());
    block.extend_from_slice(&[0xea, 0x00, 0x04, 0x01, b'v', b'p', b'c']);
    h.extend_from_slice(&(block.len() as u16).to_be_bytes());
    h.extend_from_slice(&block);
    h
}

/// A config whose listener `web` reads PROXY headers (`settings`, YAML flow),
/// with an access log at `log`, routing to `up`.
fn config(up: SocketAddr, settings: &str, log: &std::path::Path, tls: &str) -> String {
    simple_config(&[up])
        .replace(
            "version: 1\n",
            &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
        )
        .replace(
            "    http:\n      routes: main\n",
            &format!("    proxy_protocol: {settings}\n    http:\n      routes: main\n{tls}"),
        )
}

fn client_addr() -> SocketAddr {
    "203.0.113.7:51000".parse().unwrap()
}

fn balancer_addr() -> SocketAddr {
    "198.51.100.1:443".parse().unwrap()
}

each_proto!(
    async fn the_client_address_comes_from_the_header(proto) {
        let up = upstream().route("/", echo).start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let lg = legate().config(&config(up.addr, "{}", &log, "")).start();
        for (version, header) in [("v1", v1(client_addr(), balancer_addr())), ("v2", v2(client_addr(), balancer_addr()))] {
            let mut c = Client::connect_after(proto, lg.addr("web"), &header).await.unwrap();
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200, "{version}: {}", r.text());
            assert_eq!(r.echo().header_all("x-forwarded-for"), ["203.0.113.7"], "{version}");
        }
        let lines = access_log_until(&log, "two lines", |l| l.len() >= 2).await;
        for line in &lines {
            assert_eq!(line["client"], "203.0.113.7:51000", "{line}");
        }
        assert_eq!(lg.stat(ERRORS).await, Some(0.0));
    }
);

each_proto!(
    async fn a_connection_without_a_header_is_closed_when_one_is_required(proto) {
        let up = upstream().route("/", echo).start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let lg = legate().config(&config(up.addr, "{ required: true }", &log, "")).start();
        // The handshake (HTTP/2) or the request (HTTP/1.1) meets a closed connection.
        if let Ok(mut c) = Client::connect(proto, lg.addr("web")).await {
            assert!(c.get("/").try_send().await.is_err());
        }
        lg.assert_stat(ERRORS, 1.0).await;
        // A malformed one too.
        let bad = b"PROXY TCP4 203.0.113.7 not-an-ip 51000 443\r\n";
        if let Ok(mut c) = Client::connect_after(proto, lg.addr("web"), bad).await {
            assert!(c.get("/").try_send().await.is_err());
        }
        lg.assert_stat(ERRORS, 2.0).await;
        assert_eq!(up.requests.get(), 0);
    }
);

each_proto!(
    async fn an_optional_header_may_be_absent_or_local(proto) {
        let up = upstream().route("/", echo).start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let lg = legate().config(&config(up.addr, "{ required: false }", &log, "")).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().header_all("x-forwarded-for"), ["127.0.0.1"]);
        // LOCAL (the balancer's own health check): the connection's addresses.
        let mut local = v2(client_addr(), balancer_addr());
        local[12] = 0x20;
        let mut c = Client::connect_after(proto, lg.addr("web"), &local).await.unwrap();
        let r = c.get("/").send().await;
        assert_eq!(r.echo().header_all("x-forwarded-for"), ["127.0.0.1"]);
        // And a header is still read.
        let mut c = Client::connect_after(proto, lg.addr("web"), &v1(client_addr(), balancer_addr()))
            .await
            .unwrap();
        let r = c.get("/").send().await;
        assert_eq!(r.echo().header_all("x-forwarded-for"), ["203.0.113.7"]);
        assert_eq!(lg.stat(ERRORS).await, Some(0.0));
    }
);

each_proto!(
    /// The header comes before the TLS handshake, as from a TCP balancer.
    async fn the_header_precedes_tls(proto) {
        let up = upstream().route("/", echo).start().await;
        let ca = Ca::new("pp");
        let cert = ca.server(&["a.example"]);
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let tls = cert.listener_tls_yaml();
        let lg = legate().config(&config(up.addr, "{}", &log, &tls)).start();
        let header = v2(client_addr(), balancer_addr());
        let mut c = Client::connect_tls_after(proto, lg.addr("web"), TlsOptions::new(&cert, "a.example"), &header)
            .await
            .unwrap();
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().header_all("x-forwarded-for"), ["203.0.113.7"]);
    }
);

/// On a TCP listener the header is read and not forwarded: the upstream gets
/// the client's bytes only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_consumes_the_header() {
    let echo = tcp_echo_server().await;
    let lg = legate()
        .config(&format!(
            "version: 1
listeners:
  - name: tcp
    address: 127.0.0.1:0
    proxy_protocol: {{}}
    tcp:
      cluster: echo
clusters:
  - name: echo
    endpoints:
      - address: {}
",
            echo.addr
        ))
        .start();
    let mut c = RawConn::connect(lg.addr("tcp")).await;
    let mut first = v1(client_addr(), balancer_addr());
    first.extend_from_slice(b"ping");
    c.write(&first).await;
    assert_eq!(
        c.read_exact(4, Duration::from_secs(10)).await.unwrap(),
        b"ping"
    );
    assert_eq!(echo.bytes.get(), 4);
}

/// A TCP listener's cluster with `proxy_protocol` sends the client's header
/// first: version 1 to an echo server (which sends it back), version 2 to
/// Legate's own HTTP listener that requires one, whose health checks (with
/// `LOCAL` headers) pass too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_sends_the_header_upstream() {
    let echo = tcp_echo_server().await;
    let up = upstream().start().await;
    let web = free_addr();
    let lg = legate()
        .config(&format!(
            "version: 1
listeners:
  - name: tcp
    address: 127.0.0.1:0
    tcp: {{ cluster: echo }}
  - name: edge
    address: 127.0.0.1:0
    tcp: {{ cluster: inner }}
  - name: web
    address: {web}
    proxy_protocol: {{}}
    http: {{ routes: main }}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: echo
    proxy_protocol: {{ version: 1 }}
    endpoints: [{{ address: \"{}\" }}]
  - name: inner
    proxy_protocol: {{ version: 2 }}
    endpoints: [{{ address: \"{web}\" }}]
    health_check: {{ http: {{ path: /healthz }}, interval: 30ms, unhealthy_threshold: 1 }}
  - name: backend
    endpoints: [{{ address: \"{}\" }}]
",
            echo.addr, up.addr
        ))
        .start();
    let tcp = lg.addr("tcp");
    let mut c = RawConn::connect(tcp).await;
    c.write(b"ping").await;
    let prefix = b"PROXY TCP4 127.0.0.1 127.0.0.1 ".len();
    let head = c.read_exact(prefix, Duration::from_secs(10)).await.unwrap();
    assert_eq!(head, b"PROXY TCP4 127.0.0.1 127.0.0.1 ");
    let mut rest = Vec::new();
    while !rest.ends_with(b"ping") {
        rest.extend(c.read_exact(1, Duration::from_secs(10)).await.unwrap());
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(
        rest.ends_with(&format!(" {}\r\nping", tcp.port())),
        "{rest:?}"
    );
    lg.assert_stat(r#"legate_cluster_membership_healthy{cluster="inner"}"#, 1.0)
        .await;
    let mut c = RawConn::connect(lg.addr("edge")).await;
    c.write(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let answer = c.read_exact(12, Duration::from_secs(10)).await.unwrap();
    assert_eq!(answer, b"HTTP/1.1 200");
    assert_eq!(
        lg.stat(r#"legate_listener_proxy_protocol_errors_total{listener="web"}"#)
            .await,
        Some(0.0)
    );
}
