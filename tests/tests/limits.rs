//! Limits and malformed input: request smuggling shapes, bad chunking, header size
//! and count limits, slowloris, idle connections, max_connections, request body
//! limits and HTTP/2 stream limits. Every rejected request must never reach the
//! upstream.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use legate_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn limits_config(up: std::net::SocketAddr, limits: &str, route_extra: &str) -> String {
    let limits = if limits.is_empty() {
        String::new()
    } else {
        format!("    limits:\n{limits}")
    };
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
{limits}routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - cluster: backend
{route_extra}clusters:
  - name: backend
    endpoints:
      - address: {up}
"
    )
}

const LISTENER_4XX: &str = r#"legate_listener_requests_total{listener="web",class="4xx"}"#;
const LINGERING_CLOSES: &str = r#"legate_listener_lingering_closes_total{listener="web"}"#;
const LISTENER_2XX: &str = r#"legate_listener_requests_total{listener="web",class="2xx"}"#;
const STREAM_IDLE_TIMEOUTS: &str = r#"legate_listener_stream_idle_timeouts_total{listener="web"}"#;
const CONNECTIONS_ACTIVE: &str = r#"legate_listener_connections_active{listener="web"}"#;
const CLOSE_TIMEOUTS: &str = r#"legate_listener_close_timeouts_total{listener="web"}"#;

async fn raw_exchange(addr: std::net::SocketAddr, req: &[u8]) -> (Option<u16>, String) {
    let out = raw(addr, req).await;
    (raw_status(&out), String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_never_smuggled() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    // The classic CL.TE smuggling shape: a front end using Content-Length and a back
    // end using chunked would disagree on where the request ends. hyper resolves it
    // as RFC 9112 §6.1 says (Transfer-Encoding wins, Content-Length is dropped, the
    // connection closes after the response), before Legate sees the request. What
    // must hold: the upstream gets one unambiguous request (never the client's
    // Content-Length; the body, known empty, goes as `content-length: 0` as Envoy's
    // codec sends it, never with a Transfer-Encoding), `/smuggled` is never parsed
    // as a request, and the connection is closed.
    let (status, text) = raw_exchange(
        lg.addr("web"),
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(matches!(status, Some(200 | 400)), "{text}");
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "a second response came back: {text}"
    );
    assert!(!text.contains("/smuggled"), "{text}");
    assert!(up.requests.get() <= 1);
    if status == Some(200) {
        let lower = text.to_ascii_lowercase();
        assert!(
            lower.contains("connection: close"),
            "connection kept open: {text}"
        );
        assert!(
            !lower.contains("\"content-length\":[\"6\"]"),
            "the client's CL forwarded with TE: {text}"
        );
        assert!(
            !(lower.contains("\"content-length\"") && lower.contains("\"transfer-encoding\"")),
            "CL and TE both forwarded: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_heads_are_rejected() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    // Two lengths (which one frames the body?), two hosts (RFC 9112 §3.2:
    // which one names the target?), and an HTTP/1.1 request with no host, even
    // one whose absolute form names a target (§3.2 again; nginx answers the
    // same), or a target that is not a host and port (§3.2 too: path or
    // query characters, spaces, userinfo, which a wildcard virtual host
    // would otherwise match and the upstream trust), or an authority-form
    // target (a bare `host:port`, §3.2.3: for CONNECT only) that would name
    // the virtual host over `Host`: 400, nothing goes upstream.
    let ambiguous: [&[u8]; 8] = [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET http://a.example/ HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: evil.example/.a.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET http://user:pw@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
        b"GET victim.internal:8080 HTTP/1.1\r\nHost: a.example\r\n\r\n",
    ];
    for req in ambiguous {
        let (status, text) = raw_exchange(lg.addr("web"), req).await;
        assert_eq!(status, Some(400), "{text}");
    }
    assert_eq!(up.requests.get(), 0);
    lg.assert_stat(LISTENER_4XX, 8.0).await;
    // One `Host` is fine on the same listener (with a port, or an IPv6
    // literal), and HTTP/1.0 (which predates `Host`) may name its target by
    // absolute form alone.
    let fine: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example:8080\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1]:80\r\nConnection: close\r\n\r\n",
        b"GET http://a.example/ HTTP/1.0\r\n\r\n",
    ];
    for req in fine {
        let (status, text) = raw_exchange(lg.addr("web"), req).await;
        assert_eq!(status, Some(200), "{text}");
    }
    assert_eq!(up.requests.get(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_transfer_encoding_is_rejected() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let (status, text) = raw_exchange(
        lg.addr("web"),
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(
        status.is_none_or(|s| s >= 400) && !text.contains("\"method\""),
        "forwarded: {text}"
    );
}

/// A transfer coding Legate does not take (`chunked, chunked`, which HTTP/1.1
/// forbids) is a 501 that closes the connection, as nginx's: what follows
/// the head cannot be trusted to frame the next request. The connection was
/// kept, and the bytes after the head were read as another request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_transfer_coding_closes_the_connection() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    c.write(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let (bytes, closed) = c.read_until_close(HANG_GUARD).await;
    let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
    assert!(closed, "the connection stayed open: {text}");
    assert!(text.starts_with("http/1.1 501"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert_eq!(text.matches("http/1.1 ").count(), 1, "{text}");
    assert_eq!(up.requests.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunked_encoding_is_rejected() {
    let up = upstream().route("/sink", sink).start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let (status, text) = raw_exchange(
        lg.addr("web"),
        b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    // The head was valid, so the request may have started upstream; what must not
    // happen is a success for a body that could not be read.
    assert!(
        matches!(status, Some(400) | None),
        "bad chunking answered with {status:?}: {text}"
    );
    assert!(
        !text.contains("\"len\""),
        "upstream consumed a broken body: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_lines_are_400() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    for req in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nx-nul: a\0b\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    ] {
        let (status, text) = raw_exchange(lg.addr("web"), req).await;
        assert!(
            matches!(status, Some(400) | Some(505) | None) && !text.contains("\"method\""),
            "{:?} answered: {text}",
            String::from_utf8_lossy(req)
        );
    }
    assert_eq!(up.requests.get(), 0);
}

each_proto!(
    async fn oversized_headers_are_431(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&limits_config(up.addr, "      max_request_headers_size: 4KiB\n", ""))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // Within the limit: fine.
        let r = c.get("/").header("x-small", &"a".repeat(1000)).send().await;
        assert_eq!(r.status, 200);
        // Over 4KiB but under the 8KiB that hyper's HTTP/1.1 head buffer
        // holds at least (that went through over HTTP/1.1), and over both.
        for size in [5 * 1024, 8 * 1024] {
            let big = "b".repeat(size);
            match c.get("/").header("x-big", &big).try_send().await {
                Ok(r) => assert_eq!(r.status, 431, "{size}: {}", r.text()),
                // An HTTP/2 client may refuse to send past the advertised
                // SETTINGS_MAX_HEADER_LIST_SIZE; the limit is enforced either way.
                Err(e) => assert_eq!(proto, Proto::H2, "{e:#}"),
            }
            if proto == Proto::H1 {
                c = client(proto, lg.addr("web")).await;
            }
        }
        assert_eq!(up.requests.get(), 1);
    }
);

/// `max_request_headers_size` is exact, counted as HTTP/2 counts a header
/// list (RFC 9113 §6.5.2: name + value + 32 per field, pseudo-headers too;
/// an HTTP/1.1 request line as `:method` and `:path`), whatever the
/// segmentation: a head of exactly the limit passes, one byte more is 431.
/// HTTP/1.1 let up to the next power of two through (hyper's read buffer
/// grows in doubling steps) when the head came in one read. Written raw, on
/// both protocols in this one test (not `each_proto!`), so that every byte
/// counted is known: the harness client adds headers of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_size_limit_is_exact() {
    const LIMIT: usize = 20 * 1024;
    let up = upstream().start().await;
    let lg = legate()
        .config(&limits_config(
            up.addr,
            "      max_request_headers_size: 20KiB\n",
            "",
        ))
        .start();
    let addr = lg.addr("web");
    // :method GET (7+3+32), :path / (5+1+32), host x (4+1+32), connection
    // close (10+5+32), x-big (5+32 + its value).
    let h1_fixed = 42 + 38 + 37 + 47 + 37;
    for (extra, want) in [(0, 200), (1, 431)] {
        let req = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-big: {}\r\n\r\n",
            "a".repeat(LIMIT - h1_fixed + extra)
        );
        // In one write, then in pieces.
        let (status, out) = raw_exchange(addr, req.as_bytes()).await;
        assert_eq!(status, Some(want), "extra {extra}, one write: {out}");
        let mut c = RawConn::connect(addr).await;
        for piece in req.as_bytes().chunks(1024) {
            c.write(piece).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let out = c.read_until_close(HANG_GUARD).await.0;
        assert_eq!(raw_status(&out), Some(want), "extra {extra}, in pieces");
    }
    // :method GET, :scheme http (7+4+32), :authority (10+32 + the address),
    // :path /, x-big.
    let authority = addr.to_string();
    let h2_fixed = 42 + 43 + (42 + authority.len()) + 38 + 37;
    for (extra, want) in [(0, 200), (1, 431)] {
        let mut sender = raw_h2(addr).await;
        let req = Request::get(format!("http://{authority}/"))
            .header("x-big", "a".repeat(LIMIT - h2_fixed + extra))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        match sender.send_request(req).await {
            Ok(r) => assert_eq!(r.status(), want, "extra {extra}"),
            // A client may refuse to send past the advertised
            // SETTINGS_MAX_HEADER_LIST_SIZE.
            Err(e) => assert_eq!(want, 431, "{e:#}"),
        }
    }
    // The heads of exactly the limit: two over HTTP/1.1, one over HTTP/2.
    assert_eq!(up.requests.get(), 3);
}

each_proto!(
    /// An HTTP/2 upstream's response head of up to 60 KiB passes, as in Envoy
    /// (its default for upstream responses); hyper's client default of 16 KiB
    /// made it a 502. A larger one is a 502.
    async fn http2_upstream_response_heads_pass_up_to_60_kib(proto) {
        let up = upstream()
            .h2()
            .route("/big/*", |req: Request<Incoming>| async move {
                let n: usize = req.uri().path()["/big/".len()..].parse().unwrap();
                let mut r = Response::new(Full::new(Bytes::from("ok")));
                let v = HeaderValue::from_str(&"c".repeat(n)).unwrap();
                r.headers_mut().insert("x-big", v);
                r
            })
            .start()
            .await;
        let yaml = limits_config(up.addr, "", "") + "    protocol: h2\n";
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/big/30000").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-big").map(str::len), Some(30000));
        let r = c.get("/big/70000").send().await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.text(), "upstream_reset\n");
    }
);

/// A raw HTTP/1.1 upstream: `GET /big/N` gets a response head with an
/// `x-big` field of N bytes, `GET /fields/N` one with N fields in all (N - 1
/// `x-fN` and its `content-length`). One response per connection (it closes).
async fn raw_head_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                let mut out = String::from("HTTP/1.1 200 OK\r\nconnection: close\r\n");
                if let Some(n) = path.strip_prefix("/big/") {
                    let n: usize = n.parse().unwrap();
                    out += &format!("x-big: {}\r\n", "c".repeat(n));
                } else if let Some(n) = path.strip_prefix("/fields/") {
                    // `connection` and `content-length` are two of them.
                    let n: usize = n.parse().unwrap();
                    for i in 0..n - 2 {
                        out += &format!("x-f{i}: v\r\n");
                    }
                }
                out += "content-length: 2\r\n\r\nok";
                // Legate may close before reading a head it refuses.
                let _ = tcp.write_all(out.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

each_proto!(
    /// An HTTP/1.1 upstream's response head has HTTP/2's limit, 60 KiB (it was
    /// bounded only by hyper's read buffer, ~400 KiB), and Envoy's 100 fields;
    /// over either it is a 502 `upstream_reset`, as on HTTP/2 (too many fields
    /// was an `upstream_protocol_error`).
    async fn http1_upstream_response_heads_are_limited_to_60_kib(proto) {
        let up = raw_head_upstream().await;
        let yaml = limits_config(up, "", "") + "    protocol: http1\n";
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/big/51200").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-big").map(str::len), Some(51200));
        let r = c.get("/big/71680").send().await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.text(), "upstream_reset\n");
        let r = c.get("/fields/100").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = c.get("/fields/101").send().await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.text(), "upstream_reset\n");
    }
);

each_proto!(
    async fn too_many_headers_are_431(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&limits_config(up.addr, "      max_request_headers: 10\n", ""))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let mut b = c.get("/");
        for i in 0..5 {
            b = b.header(&format!("x-h{i}"), "v");
        }
        assert_eq!(b.send().await.status, 200);
        let mut c = client(proto, lg.addr("web")).await;
        let mut b = c.get("/");
        for i in 0..30 {
            b = b.header(&format!("x-h{i}"), "v");
        }
        let r = b.try_send().await;
        match r {
            Ok(r) => assert_eq!(r.status, 431, "{}", r.text()),
            Err(e) => panic!("no 431 for too many headers: {e:#}"),
        }
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(LISTENER_4XX, 1.0).await;
    }
);

each_proto!(
    /// The `cookie` crumbs an HTTP/2 client splits (browsers send one field per
    /// cookie) count as the one field they are joined into, as the same cookies
    /// sent on one HTTP/1.1 line count: a browser with more cookies than
    /// `max_request_headers` got 431 over HTTP/2 only.
    async fn cookie_crumbs_count_as_one_header(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&limits_config(up.addr, "      max_request_headers: 10\n", ""))
            .start();
        let cookies: Vec<String> = (0..20).map(|i| format!("c{i}={i}")).collect();
        let mut c = client(proto, lg.addr("web")).await;
        let mut b = c.get("/");
        for i in 0..5 {
            b = b.header(&format!("x-h{i}"), "v");
        }
        if proto == Proto::H2 {
            for cookie in &cookies {
                b = b.header("cookie", cookie);
            }
        } else {
            // An HTTP/1.1 client sends one `Cookie` line (RFC 6265 §5.4).
            b = b.header("cookie", &cookies.join("; "));
        }
        let r = b.send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header_all("cookie"), vec![cookies.join("; ")]);
        // Other fields still count one by one.
        let mut c = client(proto, lg.addr("web")).await;
        let mut b = c.get("/").header("cookie", "a=1").header("cookie", "b=2");
        for i in 0..12 {
            b = b.header(&format!("x-h{i}"), "v");
        }
        let r = b.try_send().await;
        match r {
            Ok(r) => assert_eq!(r.status, 431, "{}", r.text()),
            Err(e) => panic!("no 431 for too many headers: {e:#}"),
        }
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(LISTENER_2XX, 1.0).await;
        lg.assert_stat(LISTENER_4XX, 1.0).await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_by_the_header_read_timeout() {
    let up = upstream().start().await;
    let lg = legate()
        .config(&limits_config(
            up.addr,
            "      header_read_timeout: 300ms\n",
            "",
        ))
        .start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let t = Instant::now();
    c.write(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    // Trickle a byte every 50ms: activity must not extend the head deadline. If
    // it did, the trickle would keep the connection open past the guard: the
    // idle timeout (60s) is not for a connection reading a head, and hyper's own
    // header timeout (30s) is longer than the guard.
    let trickle = async {
        let mut answered = Vec::new();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if c.try_write(b"x").await.is_err() {
                return answered;
            }
            let (got, closed) = c.read_until_close(Duration::from_millis(1)).await;
            answered.extend(got);
            if closed {
                return answered;
            }
        }
    };
    let answered = tokio::time::timeout(HANG_GUARD, trickle)
        .await
        .expect("the slowloris connection was never closed: its bytes extend the head deadline");
    // Cut, not answered, and only once the header timeout had passed.
    assert_eq!(String::from_utf8_lossy(&answered), "");
    let closed_at = t.elapsed();
    assert!(closed_at >= Duration::from_millis(250), "{closed_at:?}");
    assert_eq!(up.requests.get(), 0);
}

async fn assert_closed_by_header_timeout(preface: &[u8]) {
    let up = upstream().start().await;
    let lg = legate()
        .config(&limits_config(
            up.addr,
            "      header_read_timeout: 300ms\n",
            "",
        ))
        .start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let t = Instant::now();
    c.write(preface).await;
    // Nothing else would close it before the guard: the idle timeout is 60s,
    // hyper's own HTTP/1.1 header timeout 30s.
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(
        closed,
        "connection without a request head left open: the header read timeout did not cut it"
    );
    // By the header timeout, not at once (a refused preface would be).
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_by_the_idle_timeout() {
    let up = upstream().start().await;
    let lg = legate()
        .config(&limits_config(up.addr, "      idle_timeout: 300ms\n", ""))
        .start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let t = Instant::now();
    // Only the idle timeout can close it: the header timer starts at a head's
    // first byte.
    let (_, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(
        closed,
        "connection that never sent a byte left open: the idle timeout did not close it"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
}

/// hyper's own 30 s header read timeout, armed whenever it waits for a head
/// (so also on an idle keep-alive connection), must not cut what Legate's
/// `idle_timeout` allows. HTTP/1.1 only: hyper's HTTP/2 has no such timer.
/// (Takes 31 s: the bound is hyper's, not configurable.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_connection_lives_as_long_as_idle_timeout_says() {
    let up = upstream().start().await;
    let lg = legate()
        .config(&limits_config(up.addr, "      idle_timeout: 120s\n", ""))
        .start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(c.get("/a").send().await.status, 200);
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(
        !c.is_closed(),
        "closed while idle for 31 s, under idle_timeout 120s"
    );
    assert_eq!(c.get("/b").send().await.status, 200);
}

each_proto!(
    async fn keepalive_connection_outlives_the_header_read_timeout(proto) {
        // Between requests a connection is idle, not "reading a head": only the idle
        // timeout applies, even if the client sends connection-level bytes (HTTP/2
        // SETTINGS acks, WINDOW_UPDATEs) in the meantime.
        let up = upstream().start().await;
        let lg = legate()
            .config(&limits_config(up.addr, "      header_read_timeout: 200ms\n", ""))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/").send().await.status, 200);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = c.get("/").try_send().await;
        assert!(
            r.as_ref().is_ok_and(|r| r.status == 200),
            "idle keep-alive connection was closed: {r:?}"
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_h2_preface_is_closed_by_the_header_read_timeout() {
    assert_closed_by_header_timeout(b"PRI * HTTP/2.0\r\n").await;
}

/// An HTTP/2 connection made ahead of its first request (a gRPC channel, a
/// browser's preconnect) is idle, not a slow head: it outlives the header read
/// timeout and is closed by the idle timeout, gracefully, with a GOAWAY (it was
/// dropped at the header timeout, without one, so a request sent then was
/// lost without the client knowing whether it was processed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_connection_without_a_request_idles_out_with_a_goaway() {
    let up = upstream().start().await;
    let lg = legate()
        .config(&limits_config(
            up.addr,
            "      header_read_timeout: 100ms\n      idle_timeout: 800ms\n",
            "",
        ))
        .start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    let t = Instant::now();
    // The preface and an empty SETTINGS frame; the server's SETTINGS come back.
    c.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await;
    let (got, closed) = c.read_until_close(HANG_GUARD).await;
    assert!(closed, "the idle HTTP/2 connection was never closed");
    // Not by the header timeout: by the idle timeout.
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    let mut types = Vec::new();
    let mut rest = &got[..];
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        types.push(rest[3]);
        rest = &rest[(9 + len).min(rest.len())..];
    }
    assert!(
        types.contains(&0x7),
        "no GOAWAY before the close: frame types {types:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_request_head_is_closed_by_the_header_read_timeout() {
    assert_closed_by_header_timeout(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
}

each_proto!(
    async fn idle_keepalive_connection_is_closed(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&limits_config(up.addr, "      idle_timeout: 300ms\n", ""))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/").send().await.status, 200);
        let t = Instant::now();
        eventually(Duration::from_secs(3), "idle connection closed", || {
            let closed = c.is_closed();
            async move { closed.then_some(()) }
        })
        .await;
        assert!(t.elapsed() >= Duration::from_millis(250), "{:?}", t.elapsed());
        // Closed at once: a client that has sent nothing for the idle timeout is
        // owed no lingering close.
        lg.assert_stat(LINGERING_CLOSES, 0.0).await;
        lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 0.0)
            .await;
    }
);

each_proto!(
    /// `limits.max_requests_per_connection`: the request that reaches it is
    /// answered, and the connection is closed gracefully after it (HTTP/1.1:
    /// `Connection: close` on that response; HTTP/2: a GOAWAY), so a client
    /// behind a balancer reconnects and is spread again. Counted per listener.
    async fn a_connection_is_closed_after_max_requests(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&limits_config(
                up.addr,
                "      max_requests_per_connection: 3\n",
                "",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for i in 1..=3 {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            let close = r.header("connection") == Some("close");
            assert_eq!(close, proto == Proto::H1 && i == 3, "request {i}");
        }
        eventually(HANG_GUARD, "connection closed after its third request", || {
            let closed = c.is_closed();
            async move { closed.then_some(()) }
        })
        .await;
        // A new connection serves as many again.
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/").send().await.status, 200);
        assert!(!c.is_closed());
        lg.assert_stat(
            r#"legate_listener_max_requests_reached_total{listener="web"}"#,
            1.0,
        )
        .await;
        assert_eq!(up.requests.get(), 4);
    }
);

/// The `connection` header lines of a raw HTTP/1 response.
fn connection_lines(out: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(out);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// An HTTP/1.0 keep-alive client whose connection Legate closes (the last
/// request under `max_requests_per_connection`, a 400 after which the byte
/// stream cannot be trusted) is told `connection: close` alone: it got
/// `connection: close, keep-alive` (hyper appended `keep-alive` to the
/// HTTP/1.1 response of an HTTP/1.0 keep-alive request), which contradicts
/// itself. A connection that stays open still says `keep-alive`. HTTP/1 only:
/// HTTP/2 has no `Connection` header (it closes with a GOAWAY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_keepalive_client_is_told_close_alone() {
    let up = upstream().start().await;
    let lg = legate()
        .config(&limits_config(
            up.addr,
            "      max_requests_per_connection: 2\n",
            "",
        ))
        .start();
    let addr = lg.addr("web");
    const KEEP: &[u8] = b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n";
    let mut c = RawConn::connect(addr).await;
    c.write(KEEP).await;
    let head = c.read_head(HANG_GUARD).await;
    assert_eq!(
        raw_status(&head),
        Some(200),
        "{}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(connection_lines(&head), ["keep-alive"]);
    // The body (the upstream's echo) is framed by its length: read it all.
    let text = String::from_utf8_lossy(&head).into_owned();
    let len: usize = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    let have = head.len() - text.find("\r\n\r\n").unwrap() - 4;
    c.read_exact(len - have, HANG_GUARD).await.unwrap();
    // The second request reaches `max_requests_per_connection`.
    c.write(KEEP).await;
    let (out, closed) = c.read_until_close(HANG_GUARD).await;
    assert_eq!(
        raw_status(&out),
        Some(200),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(
        connection_lines(&out),
        ["close"],
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(closed);
    // A bad request's answer closes too.
    let out = raw(
        addr,
        b"GET /%zz HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    )
    .await;
    assert_eq!(
        raw_status(&out),
        Some(400),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(
        connection_lines(&out),
        ["close"],
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(up.requests.get(), 2);
}

/// The length of an HTTP/1 response's body from its head (`content-length`).
fn head_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length:")
            .map(|v| v.trim().parse().unwrap())
    })
}

/// Reads the rest of a response whose head (and perhaps some of its body)
/// `head` holds, framed by its `content-length`.
async fn read_rest(c: &mut RawConn, head: &[u8]) {
    let len = head_length(head).expect("a content-length");
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let have = head.len() - end;
    if len > have {
        c.read_exact(len - have, HANG_GUARD).await.unwrap();
    }
}

/// An HTTP/1.0 keep-alive client keeps its connection whatever protocol the
/// upstream spoke: the response of an HTTP/2 upstream went out as an HTTP/1.0
/// response, which hyper closes after (no `keep-alive`), so every request of
/// such a client (ApacheBench's `-k`, HTTP/1.0 health checkers) paid a new
/// connection. A response of unknown length cannot be kept alive over
/// HTTP/1.0 (it ends with the close): it no longer says `keep-alive` (it did,
/// then closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_keepalive_client_keeps_its_connection_over_an_h2_upstream() {
    let up = upstream()
        .h2()
        .route("/stream", source(100 * 1024))
        .start()
        .await;
    let config = limits_config(up.addr, "", "")
        .replace("    endpoints:\n", "    protocol: h2\n    endpoints:\n");
    let lg = legate().config(&config).start();
    let addr = lg.addr("web");
    const KEEP: &[u8] = b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n";
    let mut c = RawConn::connect(addr).await;
    for i in 0..2 {
        c.write(KEEP).await;
        let head = c.read_head(HANG_GUARD).await;
        let text = String::from_utf8_lossy(&head).into_owned();
        assert_eq!(raw_status(&head), Some(200), "request {i}: {text}");
        assert!(text.starts_with("HTTP/1.0 200"), "request {i}: {text}");
        assert_eq!(
            connection_lines(&head),
            ["keep-alive"],
            "request {i}: {text}"
        );
        read_rest(&mut c, &head).await;
    }
    // Without a length: the body ends with the close, and the head says nothing
    // of keeping the connection.
    c.write(b"GET /stream HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let (out, closed) = c.read_until_close(HANG_GUARD).await;
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&out[..end]).into_owned();
    assert_eq!(raw_status(&out), Some(200), "{head}");
    assert!(connection_lines(&out[..end]).is_empty(), "{head}");
    assert!(closed, "{head}");
    assert_eq!(checksum(&out[end..]), checksum(&pattern_bytes(100 * 1024)));
    assert_eq!(up.requests.get(), 3);
    lg.assert_stat(r#"legate_listener_connections_total{listener="web"}"#, 1.0)
        .await;
}

each_proto!(
    /// `limits.max_connection_duration`: a connection older than it is closed
    /// gracefully, though it is busy enough never to idle out.
    async fn a_connection_is_closed_at_max_duration(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&limits_config(
                up.addr,
                "      max_connection_duration: 300ms\n",
                "",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let mut served = 0;
        let deadline = Instant::now() + HANG_GUARD;
        while !c.is_closed() {
            assert!(Instant::now() < deadline, "still open after {served} requests");
            match c.get("/").try_send().await {
                Ok(r) => {
                    assert_eq!(r.status, 200, "{}", r.text());
                    served += 1;
                }
                // Sent as the close raced it (HTTP/1.1), or after the GOAWAY:
                // not processed, the client retries elsewhere.
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(served > 0);
        lg.assert_stat(
            r#"legate_listener_max_duration_reached_total{listener="web"}"#,
            1.0,
        )
        .await;
    }
);

/// A response body that never ends: 64 KiB chunks, as fast as they are taken.
async fn endless(_req: Request<Incoming>) -> Response<BoxBody> {
    let chunk = Bytes::from(pattern_bytes(64 * 1024));
    let s = futures_util::stream::repeat_with(move || {
        Ok::<_, BoxError>(hyper::body::Frame::data(chunk.clone()))
    });
    Response::new(http_body_util::BodyExt::boxed(
        http_body_util::StreamBody::new(s),
    ))
}

/// An HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// h2c prior knowledge: the preface, SETTINGS opening every stream's send
/// window to the maximum (and a WINDOW_UPDATE the connection's), then `GET
/// path` on stream 1. Flow control then never stops Legate: only the socket
/// does.
fn h2_get_with_open_windows(path: &str) -> Vec<u8> {
    const MAX_WINDOW: u32 = (1 << 31) - 1;
    // HPACK: a literal without indexing, its name from the static table.
    let literal = |index: u8, value: &str| {
        let mut v = vec![index, value.len() as u8];
        v.extend_from_slice(value.as_bytes());
        v
    };
    let mut block = vec![0x82, 0x86]; // :method: GET, :scheme: http
    block.extend(literal(4, path)); // :path
    block.extend(literal(1, "example.test")); // :authority
    let mut settings = 4u16.to_be_bytes().to_vec(); // SETTINGS_INITIAL_WINDOW_SIZE
    settings.extend_from_slice(&MAX_WINDOW.to_be_bytes());
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(4, 0, 0, &settings)); // SETTINGS
    out.extend(h2_frame(8, 0, 0, &(MAX_WINDOW - 65_535).to_be_bytes())); // WINDOW_UPDATE
    out.extend(h2_frame(1, 0x5, 1, &block)); // HEADERS, END_STREAM | END_HEADERS
    out
}

each_proto!(
    /// A client that sends one request for an endless response and then
    /// never reads (nor sends) anything: the stream idle timeout ends the
    /// response, and the connection is closed in the end instead of holding
    /// its socket, buffers and `max_connections` slot forever. HTTP/1.1: the
    /// stream idle timeout closes it. HTTP/2 keeps the connection past a
    /// stream's reset, and its idle timeout starts a graceful close (GOAWAY
    /// and a PING) that can never finish: the socket is full, and the PING
    /// is never answered; one more idle timeout without a byte either way
    /// and the connection is closed hard, counted.
    async fn a_client_that_never_reads_is_closed(proto) {
        let up = upstream().route("/endless", endless).start().await;
        let cfg = limits_config(up.addr, "      idle_timeout: 300ms\n", "").replacen(
            "      routes: main\n",
            "      routes: main\n      stream_idle_timeout: 300ms\n",
            1,
        );
        let lg = legate().config(&cfg).start();
        let mut c = RawConn::connect_small_buffer(lg.addr("web")).await;
        c.write(&match proto {
            Proto::H1 => b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Proto::H2 => h2_get_with_open_windows("/endless"),
        })
        .await;
        // Nothing read from here on.
        eventually(HANG_GUARD, "the stream idle timeout", || async {
            (lg.stat(STREAM_IDLE_TIMEOUTS).await == Some(1.0)).then_some(())
        })
        .await;
        eventually(HANG_GUARD, "the connection of a client that never reads closed", || async {
            (lg.stat(CONNECTIONS_ACTIVE).await == Some(0.0)).then_some(())
        })
        .await;
        let hard = if proto == Proto::H2 { 1.0 } else { 0.0 };
        lg.assert_stat(CLOSE_TIMEOUTS, hard).await;
        lg.assert_stat(LINGERING_CLOSES, 0.0).await;
        // The client sees it too, once it reads what was on its way.
        let (_, closed) = c.read_until_close(HANG_GUARD).await;
        assert!(closed, "Legate's side closed, yet the client's stayed open");
    }
);

each_proto!(
    /// A reload that changes the listener drains the old listener's
    /// connections: a keep-alive connection idle for a second is closed
    /// (HTTP/2: GOAWAY and a PING, and h2 waits for the PING's answer before
    /// it closes). A client that never reads nor answers, its one small
    /// response waiting unread in its socket, still has its connection
    /// closed: hard, once the GOAWAY got no answer for that second, instead
    /// of being kept by the retired listener forever (no `drain_timeout`
    /// applies to a reload).
    async fn a_client_that_ignores_a_reloads_drain_is_closed(proto) {
        let up = upstream().start().await;
        // The idle timeout is longer than the test waits: only the drain
        // can close the connection.
        let cfg = |limits: &str| limits_config(up.addr, limits, "");
        let lg = legate()
            .config(&cfg("      idle_timeout: 60s\n"))
            .from_file()
            .start();
        let mut c = RawConn::connect(lg.addr("web")).await;
        c.write(&match proto {
            Proto::H1 => b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Proto::H2 => h2_get_with_open_windows("/"),
        })
        .await;
        // Nothing read from here on.
        eventually(HANG_GUARD, "the response sent", || async {
            (lg.stat(LISTENER_2XX).await == Some(1.0)).then_some(())
        })
        .await;
        let v = lg
            .reload_ok(&cfg("      idle_timeout: 60s\n      max_connections: 5000\n"))
            .await;
        assert_eq!(v["listeners"]["changed"], json!(["web"]), "{v}");
        eventually(HANG_GUARD, "the drained connection closed", || async {
            (lg.stat(CONNECTIONS_ACTIVE).await == Some(0.0)).then_some(())
        })
        .await;
        let hard = if proto == Proto::H2 { 1.0 } else { 0.0 };
        lg.assert_stat(CLOSE_TIMEOUTS, hard).await;
        let (_, closed) = c.read_until_close(HANG_GUARD).await;
        assert!(closed, "Legate's side closed, yet the client's stayed open");
    }
);

/// The slow reader of [`a_slow_reader_gets_every_byte_of_a_large_response`]:
/// HTTP/1.1 on a raw socket (it reads what the kernel holds), HTTP/2 with
/// hyper's client and its default windows (its connection task takes what
/// the windows allow off the socket at once and releases window as the body
/// is read).
enum SlowReader {
    H1(tokio::net::TcpStream),
    H2(Incoming),
}

impl SlowReader {
    /// Reads at least one byte and at most about `max` (HTTP/2: whole
    /// frames): the bytes read, `None` at the end or on an error.
    async fn read(
        &mut self,
        max: usize,
        sum: &mut legate_tests::upstream::Checksum,
    ) -> Option<usize> {
        match self {
            SlowReader::H1(s) => {
                let mut buf = vec![0u8; max];
                let n = s.read(&mut buf).await.ok().filter(|n| *n > 0)?;
                sum.update(&buf[..n]);
                Some(n)
            }
            SlowReader::H2(body) => {
                let mut got = 0;
                while got < max {
                    let Some(Ok(frame)) = http_body_util::BodyExt::frame(body).await else {
                        break;
                    };
                    if let Some(d) = frame.data_ref() {
                        sum.update(d);
                        got += d.len();
                    }
                }
                (got > 0).then_some(got)
            }
        }
    }
}

each_proto!(
    /// The hard close of a graceful close left hanging
    /// ([`a_client_that_never_reads_is_closed`]) leaves a slow reader alone.
    /// A 12 MiB response, more than the socket buffers and the client's
    /// windows hold, goes to a client that reads it in small reads with
    /// pauses well inside `idle_timeout` (2s: a test thread stalled that
    /// long on a loaded machine would look like a reader that stopped). Its
    /// request ends on Legate's side once the body's end has been handed to
    /// the connection, with
    /// megabytes still unread (in the kernel's buffers, or in the HTTP/2
    /// client's window); the connection then has no request in flight, its
    /// idle timeout runs and its graceful close starts while the client reads
    /// the rest, slowly, for several idle timeouts more (checked: the test
    /// paces it so), and the connection closes meanwhile. It gets every byte,
    /// and no close timed out.
    async fn a_slow_reader_gets_every_byte_of_a_large_response(proto) {
        const LEN: usize = 12 << 20;
        let body = Bytes::from(pattern_bytes(LEN));
        let want = checksum(&body);
        let up = upstream()
            .route("/big", move |_req| {
                let body = body.clone();
                async move { Response::new(Full::new(body)) }
            })
            .start()
            .await;
        let lg = legate()
            .config(&limits_config(up.addr, "      idle_timeout: 2s\n", ""))
            .start();
        let addr = lg.addr("web");
        let (mut r, mut got) = match proto {
            Proto::H1 => {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
                // The head, byte by byte (what follows it is the body).
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    tokio::time::timeout(HANG_GUARD, s.read_exact(&mut b))
                        .await
                        .expect("no response head")
                        .unwrap();
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                assert!(head.starts_with("http/1.1 200"), "{head}");
                assert!(head.contains(&format!("content-length: {LEN}")), "{head}");
                (SlowReader::H1(s), 0)
            }
            Proto::H2 => {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(
                        hyper_util::rt::TokioExecutor::new(),
                        hyper_util::rt::TokioIo::new(tcp),
                    )
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let req = Request::get(format!("http://{addr}/big"))
                    .body(http_body_util::Empty::<Bytes>::new())
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                (SlowReader::H2(resp.into_body()), 0)
            }
        };
        let mut sum = legate_tests::upstream::Checksum::default();
        let pause = Duration::from_millis(50);
        // Steadily, 64 KiB per pause, until the request has ended on
        // Legate's side: what is left then waits in buffers.
        let mut steps = 0;
        let left = loop {
            assert!(got < LEN, "read the whole response before the request ended");
            got += r.read(64 * 1024, &mut sum).await.expect("the response ended early");
            tokio::time::sleep(pause).await;
            steps += 1;
            if steps % 4 == 0
                && lg.stat(r#"legate_listener_requests_active{listener="web"}"#).await == Some(0.0)
            {
                break LEN - got;
            }
        };
        assert!(
            left >= 1 << 20,
            "only {left} bytes were left unread once the request ended: the tail \
             did not wait in buffers"
        );
        // The rest in 120 reads 50ms apart: 6s, three idle timeouts, whatever
        // the buffers held.
        let step = (left / 120).max(4096);
        // Meanwhile the connection, idle with a tail still on its way, closes
        // gracefully (HTTP/1.1 once hyper has handed its last bytes to the
        // kernel, HTTP/2 once its stream is sent and the GOAWAY's PING
        // answered): what is then left to read is the client's.
        let mut closed_with_bytes_left = false;
        steps = 0;
        while got < LEN {
            match r.read(step, &mut sum).await {
                Some(n) => got += n,
                None => break,
            }
            tokio::time::sleep(pause).await;
            steps += 1;
            if !closed_with_bytes_left && steps % 4 == 0 && got < LEN {
                closed_with_bytes_left = lg.stat(CONNECTIONS_ACTIVE).await == Some(0.0);
            }
        }
        assert_eq!(got, LEN, "the slow reader was cut after {got} of {LEN} bytes");
        assert_eq!(sum.0, want, "the body arrived corrupted");
        assert!(
            closed_with_bytes_left,
            "the connection did not close while the client still read: its idle \
             close was not exercised"
        );
        lg.assert_stat(CLOSE_TIMEOUTS, 0.0).await;
        lg.assert_stat(STREAM_IDLE_TIMEOUTS, 0.0).await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_response_is_not_cut_by_the_idle_timeout() {
    // The response takes 3× the idle timeout. The timeout is not shorter: it also
    // runs between the client's connect and its request, which a loaded test
    // machine can stretch past 200ms (this test failed that way once).
    let up = upstream().delay(Duration::from_millis(1500)).start().await;
    let lg = legate()
        .config(&limits_config(up.addr, "      idle_timeout: 500ms\n", ""))
        .start();
    for proto in [Proto::H1, Proto::H2] {
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/").send().await.status, 200, "{proto:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections() {
    let up = upstream().start().await;
    let lg = legate()
        .config(&limits_config(up.addr, "      max_connections: 2\n", ""))
        .start();
    let addr = lg.addr("web");
    let mut a = client(Proto::H1, addr).await;
    let mut b = client(Proto::H2, addr).await;
    assert_eq!(a.get("/").send().await.status, 200);
    assert_eq!(b.get("/").send().await.status, 200);

    let mut third = RawConn::connect(addr).await;
    third.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (out, closed) = third.read_until_close(HANG_GUARD).await;
    assert!(closed, "connection over the limit was kept open");
    assert!(
        raw_status(&out).is_none_or(|s| s == 503),
        "over-limit connection served: {}",
        String::from_utf8_lossy(&out)
    );
    lg.assert_stat(
        r#"legate_listener_connections_overflow_total{listener="web"}"#,
        1.0,
    )
    .await;
    assert_eq!(up.requests.get(), 2);

    // Existing connections still work; a closed one frees its slot.
    assert_eq!(a.get("/").send().await.status, 200);
    drop(a);
    eventually(Duration::from_secs(2), "a slot to free up", || async {
        match Client::connect(Proto::H1, addr).await {
            Ok(mut c) => match c.get("/").try_send().await {
                Ok(r) if r.status == 200 => Some(()),
                _ => None,
            },
            Err(_) => None,
        }
    })
    .await;
}

each_proto!(
    async fn request_body_limit(proto) {
        let up = upstream().route("/sink", sink).start().await;
        let lg = legate()
            .config(&limits_config(up.addr, "", "            max_request_body: 1KiB\n"))
            .start();
        let addr = lg.addr("web");
        let mut c = client(proto, addr).await;
        let r = c.post("/sink").body(vec![b'a'; 1024]).send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["len"], 1024);
        let r = c.post("/sink").streamed_body(vec![b'a'; 1024], 100).send().await;
        assert_eq!(r.status, 200);
        assert_eq!(up.requests.get(), 2);

        // Declared too large: refused before anything goes upstream.
        let mut c = client(proto, addr).await;
        let r = c.post("/sink").body(vec![b'a'; 2048]).send().await;
        assert_eq!(r.status, 413);
        assert_eq!(r.text(), "request_body_too_large\n");
        assert_eq!(up.requests.get(), 2, "over-limit body with content-length forwarded");

        // Streamed without a length: cut when it crosses the limit. The client
        // is still writing when the 413 comes: HTTP/1.1 closes the connection
        // after it, lingering so the close does not reset it under the client
        // (an_early_413_lingers_while_the_client_still_uploads); HTTP/2 resets
        // the stream.
        let mut c = client(proto, addr).await;
        let r = c.post("/sink").streamed_body(vec![b'a'; 64 * 1024], 512).send().await;
        assert_eq!(r.status, 413, "{}", r.text());
        assert_eq!(r.text(), "request_body_too_large\n");
        lg.assert_stat(LISTENER_4XX, 2.0).await;
    }
);

/// An HTTP/1.1 client that goes on uploading after an early answer: it sends
/// `head` and `first`, reads the answer until Legate closes its side, then sends
/// `rest` and closes its own side. Returns the answer. Panics if the answer ends
/// in a reset or a write of `rest` fails: what a close with the client's bytes
/// unread does (Legate's close resets the connection), and what a lingering
/// close spares the client.
async fn upload_past_an_early_answer(
    mut c: impl AsyncRead + AsyncWrite + Unpin,
    head: &[u8],
    first: &[u8],
    rest: &[u8],
) -> String {
    let answer = send_and_read_the_answer(&mut c, head, first).await;
    // Legate has answered and closed its side; the client still sends its body
    // (as one that writes the whole body before it reads would).
    for (i, chunk) in rest.chunks(64 << 10).enumerate() {
        if let Err(e) = c.write_all(chunk).await {
            panic!("write {i} of the rest of the body after the answer: {e}");
        }
    }
    c.shutdown().await.unwrap();
    answer
}

/// Sends `head` and `first`, then reads the answer until Legate closes its
/// side. Panics if the answer ends in a reset.
async fn send_and_read_the_answer(
    c: &mut (impl AsyncRead + AsyncWrite + Unpin),
    head: &[u8],
    first: &[u8],
) -> String {
    c.write_all(head).await.unwrap();
    c.write_all(first).await.unwrap();
    c.flush().await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await {
            Err(_) => panic!(
                "no close after the answer: {}",
                String::from_utf8_lossy(&answer)
            ),
            Ok(Err(e)) => panic!(
                "reading the answer: {e} (after {})",
                String::from_utf8_lossy(&answer)
            ),
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_lingers_while_the_client_still_uploads() {
    // HTTP/1.1 only: HTTP/2 refuses the stream (RST_STREAM) and keeps the
    // connection, so no close can reset it (request_body_limit runs over both).
    let up = upstream().route("/sink", sink).start().await;
    let lg = legate()
        .config(&limits_config(
            up.addr,
            "",
            "            max_request_body: 1KiB\n",
        ))
        .start();
    let addr = lg.addr("web");
    // Well over what the two kernels buffer (the client's send buffer, up to
    // 4 MiB, and Legate's receive window): a client cannot write it all unless
    // Legate reads it, so without a lingering close a write fails however the
    // threads are scheduled.
    let body = vec![b'a'; 16 << 20];

    // Declared too large: answered at once, before the body is read.
    let head = format!(
        "POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (first, rest) = body.split_at(64 << 10);
    let c = RawConn::connect(addr).await.stream;
    let answer = upload_past_an_early_answer(c, head.as_bytes(), first, rest).await;
    assert_eq!(raw_status(answer.as_bytes()), Some(413), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\nrequest_body_too_large\n"),
        "{answer}"
    );
    assert_eq!(up.requests.get(), 0, "an over-limit body went upstream");

    // Chunked: answered when the body crosses the limit (the upstream request
    // is cut there).
    let head = b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunked = |data: &[u8]| {
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        out
    };
    let first = chunked(&body[..2048]);
    let mut rest: Vec<u8> = body[2048..].chunks(16 << 10).flat_map(chunked).collect();
    rest.extend_from_slice(b"0\r\n\r\n");
    let c = RawConn::connect(addr).await.stream;
    let answer = upload_past_an_early_answer(c, head, &first, &rest).await;
    assert_eq!(raw_status(answer.as_bytes()), Some(413), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\nrequest_body_too_large\n"),
        "{answer}"
    );

    lg.assert_stat(LISTENER_4XX, 2.0).await;
    lg.assert_stat(LINGERING_CLOSES, 2.0).await;
    // The lingering closes ended when the client closed.
    lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_over_tls_lingers_too() {
    // The TLS session ends with Legate's close_notify; what the client sends
    // after it is discarded at the TCP level.
    let ca = Ca::new("legate test CA");
    let cert = ca.server(&["a.example"]);
    let tls = cert.listener_tls_yaml();
    let up = upstream().route("/sink", sink).start().await;
    let config = limits_config(up.addr, "", "            max_request_body: 1KiB\n").replace(
        "      routes: main\n",
        &format!("      routes: main\n{tls}"),
    );
    let lg = legate().config(&config).start();
    let body = vec![b'a'; 16 << 20];
    let head = format!(
        "POST /sink HTTP/1.1\r\nHost: a.example\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (first, rest) = body.split_at(64 << 10);
    let c = tls_raw(lg.addr("web"), TlsOptions::new(&cert, "a.example"))
        .await
        .unwrap();
    let answer = upload_past_an_early_answer(c, head.as_bytes(), first, rest).await;
    assert_eq!(raw_status(answer.as_bytes()), Some(413), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\nrequest_body_too_large\n"),
        "{answer}"
    );
    assert_eq!(up.requests.get(), 0);
    lg.assert_stat(LINGERING_CLOSES, 1.0).await;
    lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 0.0)
        .await;
}

/// A raw HTTP/1.1 upload of 16 MiB, for a route whose `max_request_body` is
/// 1KiB: its head and its first 64 KiB.
fn oversized_upload() -> (Vec<u8>, Vec<u8>) {
    let head = format!(
        "POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        16 << 20
    );
    (head.into_bytes(), vec![b'a'; 64 << 10])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lingering_time_zero_turns_the_lingering_close_off() {
    // HTTP/1.1 only: an HTTP/2 connection never lingers.
    let up = upstream().route("/sink", sink).start().await;
    let lg = legate()
        .config(&limits_config(
            up.addr,
            "      lingering_time: 0s\n",
            "            max_request_body: 1KiB\n",
        ))
        .start();
    let (head, first) = oversized_upload();
    let mut c = RawConn::connect(lg.addr("web")).await.stream;
    // Either write may meet the reset.
    let _ = c.write_all(&head).await;
    let _ = c.write_all(&first).await;
    // Closed at once with the client's bytes unread: the client may see the
    // 413 or a reset (that is what turning it off means), so only Legate's
    // side is asserted.
    let mut buf = [0u8; 16 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
    lg.assert_stat(LISTENER_4XX, 1.0).await;
    lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 0.0)
        .await;
    lg.assert_stat(LINGERING_CLOSES, 0.0).await;
    assert_eq!(up.requests.get(), 0);
}

/// Legate with listener `limits` (and a 1KiB body limit), after an early 413
/// to a client that goes on uploading (the connection, now lingering).
async fn lingering_after_an_early_413(
    limits: &str,
) -> (LegateHandle, UpstreamHandle, tokio::net::TcpStream) {
    let up = upstream().route("/sink", sink).start().await;
    let lg = legate()
        .config(&limits_config(
            up.addr,
            limits,
            "            max_request_body: 1KiB\n",
        ))
        .start();
    let (head, first) = oversized_upload();
    let mut c = RawConn::connect(lg.addr("web")).await.stream;
    let answer = send_and_read_the_answer(&mut c, &head, &first).await;
    assert_eq!(raw_status(answer.as_bytes()), Some(413), "{answer}");
    lg.assert_stat(LINGERING_CLOSES, 1.0).await;
    (lg, up, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_close_ends_after_lingering_time() {
    let (lg, _up, mut c) = lingering_after_an_early_413("      lingering_time: 300ms\n").await;
    // A client that uploads without end: Legate discards it for 300ms, then
    // closes, and the client's writes fail (with the default 30s they would
    // go on for the whole loop).
    let chunk = vec![b'a'; 64 << 10];
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if c.write_all(&chunk).await.is_err() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the lingering close still reads after 20s"
        );
    }
    lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_close_ends_after_lingering_timeout_of_silence() {
    let (lg, _up, mut c) = lingering_after_an_early_413("      lingering_timeout: 200ms\n").await;
    // A byte a second: each one would restart the default 5s wait (for up to
    // 30s), but 200ms of silence ends the linger, so the close resets the
    // connection under one of the next writes.
    let mut failed = false;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if c.write_all(b"a").await.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "the lingering close still read after 10 slow bytes");
    lg.assert_stat(LINGERING_CLOSES, 1.0).await;
    lg.assert_stat(r#"legate_listener_connections_active{listener="web"}"#, 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_max_concurrent_streams() {
    let up = upstream().delay(Duration::from_millis(200)).start().await;
    let lg = legate()
        .config(&limits_config(
            up.addr,
            "      max_concurrent_streams: 2\n",
            "",
        ))
        .start();
    let mut c = client(Proto::H2, lg.addr("web")).await;
    // One request first, so the client has the server's SETTINGS (a client may open
    // streams before it knows the limit; those are refused, which is correct).
    assert_eq!(c.get("/").send().await.status, 200);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { c.get("/").send().await.status }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(up.requests.get(), 7);
    assert_eq!(
        up.max_in_flight.get(),
        2,
        "streams beyond the limit ran concurrently"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(550),
        "{:?}",
        t.elapsed()
    );
}

/// An endless request body of 64 KiB chunks that counts what the client
/// handed to its connection in `sent`.
fn endless_upload(sent: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> BoxBody {
    use http_body_util::BodyExt;
    const CHUNK: usize = 64 * 1024;
    let chunk = bytes::Bytes::from(vec![b'u'; CHUNK]);
    let chunks = futures_util::stream::iter(std::iter::repeat_with(move || {
        sent.fetch_add(CHUNK, std::sync::atomic::Ordering::SeqCst);
        Ok::<_, BoxError>(hyper::body::Frame::data(chunk.clone()))
    }));
    BodyExt::boxed(http_body_util::StreamBody::new(chunks))
}

each_proto!(
    /// Uploads whose upstream stopped reading do not stall the other uploads
    /// on the client's HTTP/2 connection. What a stream received and Legate
    /// has not forwarded counts against the connection's flow-control window
    /// too: with hyper's default windows (1 MiB a stream, 1 MiB the
    /// connection) one stalled upload shut it, and every other request body on
    /// the connection waited (until the stream idle timeout, 5 min). The
    /// connection window is now the stream window × `max_concurrent_streams`.
    async fn stalled_uploads_do_not_stall_the_client_h2_connection(proto) {
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // `/sink` never reads its body, nor answers.
        let up = upstream()
            .route("/sink", |req| async move {
                let _held = req;
                std::future::pending::<hyper::Response<BoxBody>>().await
            })
            .start()
            .await;
        let lg = legate()
            .concurrency(1)
            .config(&limits_config(up.addr, "", "            timeout: 0s\n"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // Two stalled uploads (over HTTP/2 streams of `c`'s connection, over
        // HTTP/1.1 connections of their own).
        let mut stalled = Vec::new();
        for _ in 0..2 {
            let mut s = match proto {
                Proto::H2 => c.clone(),
                Proto::H1 => client(proto, lg.addr("web")).await,
            };
            let body = endless_upload(sent.clone());
            stalled.push(tokio::spawn(async move {
                let _ = s.post("/sink").boxed_body(body).try_send().await;
            }));
        }
        // Until the stalled bodies filled every window and buffer on their way.
        let deadline = Instant::now() + HANG_GUARD;
        let mut last = usize::MAX;
        loop {
            let now = sent.load(std::sync::atomic::Ordering::SeqCst);
            if now == last && now > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the uploads never stalled ({now} bytes sent)");
            last = now;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Another upload on the same connection completes.
        let body = vec![b'b'; 256 * 1024];
        let r = tokio::time::timeout(HANG_GUARD, c.post("/echo").body(body.clone()).send())
            .await
            .expect("the upload stalled behind the stalled ones");
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().body_len, body.len());
        for s in stalled {
            s.abort();
        }
    }
);

/// `limits.connection_keepalive` PINGs HTTP/2 clients: one that answers
/// none (gone without a FIN: a laptop asleep, a NAT that forgot the flow)
/// has its connection closed once a PING goes unanswered for `timeout`,
/// with the request it left waiting (the client abandoned it:
/// `rx_resets`), long before the upstream would have answered or an idle
/// or stream timeout would have fired. Without it nothing noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_answers_no_ping_is_closed_by_the_keepalive() {
    let up = upstream().delay(Duration::from_secs(60)).start().await;
    let lg = legate()
        .config(&limits_config(
            up.addr,
            "      idle_timeout: 300s\n      connection_keepalive: { interval: 200ms, timeout: 200ms }\n",
            "",
        ))
        .start();
    let mut s = tokio::net::TcpStream::connect(lg.addr("web"))
        .await
        .unwrap();
    // The preface, empty SETTINGS, then `GET /` (HPACK: :method GET,
    // :scheme http, :path /, :authority localhost) on stream 1; after that
    // the client writes nothing more, PING answers included.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    let block = b"\x82\x86\x84\x41\x09localhost";
    hello.extend([0, 0, block.len() as u8, 0x01, 0x05, 0, 0, 0, 1]);
    hello.extend(block);
    s.write_all(&hello).await.unwrap();
    eventually(Duration::from_secs(5), "the request upstream", || async {
        (up.in_flight.get() == 1).then_some(())
    })
    .await;
    let closed = tokio::time::timeout(HANG_GUARD, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection of a client answering no PING stayed open"
    );
    lg.assert_stat(r#"legate_listener_rx_resets_total{listener="web"}"#, 1.0)
        .await;
    lg.assert_stat(CONNECTIONS_ACTIVE, 0.0).await;
}

each_proto!(
    /// A streamed body cut at `max_request_body` on its way to an HTTP/2
    /// upstream is the client's 413 too, not a 502 and not a failure of the
    /// endpoint: h2 reports only the stream's reset, so the limit notes the
    /// fault it caused.
    async fn request_body_limit_over_an_h2_upstream(proto) {
        let up = upstream().h2().route("/sink", sink).start().await;
        let cfg = limits_config(up.addr, "", "            max_request_body: 1KiB\n")
            .replacen("    endpoints:\n", "    protocol: h2\n    endpoints:\n", 1);
        assert!(cfg.contains("protocol: h2"), "{cfg}");
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/sink").streamed_body(vec![b'a'; 64 * 1024], 512).send().await;
        assert_eq!(r.status, 413, "{}", r.text());
        assert_eq!(r.text(), "request_body_too_large\n");
        lg.assert_stat(
            &format!(r#"legate_endpoint_rq_error{{cluster="backend",endpoint="{}"}}"#, up.addr),
            0.0,
        )
        .await;
    }
);
