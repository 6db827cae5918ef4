//! Basic proxying: requests and responses pass through intact (method, path, query,
//! headers, bodies, trailers), across protocol combinations, with the standard proxy
//! headers (`x-forwarded-*`, `x-request-id`, `via`, hop-by-hop removal) and the
//! configured header operations.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use legate_tests::*;

const LISTENER_2XX: &str = r#"legate_listener_requests_total{listener="web",class="2xx"}"#;
const ROUTE_2XX: &str = r#"legate_route_requests_total{route_table="main",virtual_host="all",route="all/0",class="2xx"}"#;
const CLUSTER_RQ: &str = r#"legate_cluster_upstream_rq_total{cluster="backend"}"#;
const CLUSTER_2XX: &str = r#"legate_cluster_upstream_rq_2xx{cluster="backend"}"#;

each_proto!(
    async fn request_and_response_pass_through(proto) {
        let up = upstream()
            .name("a")
            .route("/teapot", |_req| async {
                let mut r = Response::new(Full::new(Bytes::from("short and stout")));
                *r.status_mut() = StatusCode::IM_A_TEAPOT;
                r.headers_mut().insert("x-custom", HeaderValue::from_static("resp"));
                r.headers_mut().append("set-cookie", HeaderValue::from_static("a=1"));
                r.headers_mut().append("set-cookie", HeaderValue::from_static("b=2"));
                r
            })
            .start()
            .await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;

        let r = c
            .post("/a/b%20c/d?x=1&y=two&x=3")
            .host("app.example")
            .header("x-single", "one")
            .header("x-multi", "1")
            .header("x-multi", "2")
            .header("content-type", "text/plain")
            .body("request body ✓")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.version, proto.version());
        assert_eq!(r.header("x-upstream"), Some("a"));
        let e = r.echo();
        assert_eq!(e.method, "POST");
        assert_eq!(e.path, "/a/b%20c/d?x=1&y=two&x=3");
        assert_eq!(e.body, "request body ✓");
        assert_eq!(e.header("host"), Some("app.example"));
        assert_eq!(e.header("x-single"), Some("one"));
        assert_eq!(e.header_all("x-multi"), vec!["1", "2"]);
        assert_eq!(e.header("content-type"), Some("text/plain"));
        assert_eq!(
            e.header("content-length"),
            Some("request body ✓".len().to_string().as_str())
        );

        for m in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let r = c
                .request(Method::from_bytes(m.as_bytes()).unwrap(), "/m")
                .send()
                .await;
            assert_eq!(r.status, 200);
            assert_eq!(r.echo().method, m);
        }
        let r = c.request(Method::HEAD, "/head").send().await;
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty(), "HEAD response has a body: {:?}", r.body);

        let r = c.get("/teapot").send().await;
        assert_eq!(r.status, 418);
        assert_eq!(r.text(), "short and stout");
        assert_eq!(r.header("x-custom"), Some("resp"));
        assert_eq!(r.header_all("set-cookie"), vec!["a=1", "b=2"]);

        // 1 POST + 5 methods + HEAD = 7 2xx, 1 4xx, all through one upstream.
        lg.assert_stat(LISTENER_2XX, 7.0).await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="4xx"}"#, 1.0)
            .await;
        lg.assert_stat(ROUTE_2XX, 7.0).await;
        lg.assert_stat(CLUSTER_RQ, 8.0).await;
        lg.assert_stat(CLUSTER_2XX, 7.0).await;
        lg.assert_stat(r#"legate_cluster_upstream_rq_4xx{cluster="backend"}"#, 1.0)
            .await;
        lg.assert_stat(
            &format!(r#"legate_endpoint_rq_total{{cluster="backend",endpoint="{}"}}"#, up.addr),
            8.0,
        )
        .await;
        assert_eq!(up.requests.get(), 8);
        lg.assert_stat(r#"legate_listener_connections_total{listener="web"}"#, 1.0)
            .await;
    }
);

each_proto!(
    async fn upstream_connections_are_reused(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..20 {
            assert_eq!(c.get("/").send().await.status, 200);
        }
        assert_eq!(up.requests.get(), 20);
        assert_eq!(up.connections.get(), 1, "HTTP/1.1 keep-alive pool not reused");
        lg.assert_stat(r#"legate_cluster_upstream_cx_total{cluster="backend"}"#, 1.0)
            .await;
    }
);

each_proto!(
    async fn large_bodies_stream_both_ways(proto) {
        let n = 10 << 20;
        let up = upstream()
            .route("/sink", sink)
            .route("/source", source(n))
            .start()
            .await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let data = Bytes::from(pattern_bytes(n));

        // Streamed upload without a length (chunked under HTTP/1.1).
        let r = c.post("/sink").streamed_body(data.clone(), 64 * 1024).send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["len"], n);
        assert_eq!(v["checksum"], checksum(&data));

        // Upload with a content-length.
        let r = c.post("/sink").body(data.clone()).send().await;
        let v = r.json();
        assert_eq!(v["len"], n);
        assert_eq!(v["checksum"], checksum(&data));

        // Streamed download.
        let r = c.get("/source").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), n);
        assert_eq!(checksum(&r.body), checksum(&data));
        lg.assert_stat(LISTENER_2XX, 3.0).await;
    }
);

each_proto!(
    async fn h2_upstream(proto) {
        let up = upstream().h2().start().await;
        let lg = legate()
            .config(&simple_config_with(&[up.addr], "", "    protocol: h2\n"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/x?y=1").host("h2.example").body("to h2").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.version, "HTTP/2.0");
        assert_eq!(e.path, "/x?y=1");
        assert_eq!(e.body, "to h2");
        assert_eq!(e.header("host"), Some("h2.example"));
        // Concurrent requests share the one upstream HTTP/2 connection.
        for _ in 0..5 {
            assert_eq!(c.get("/").send().await.status, 200);
        }
        assert_eq!(up.connections.get(), 1);
        lg.assert_stat(CLUSTER_2XX, 6.0).await;
    }
);

each_proto!(
    async fn h1_upstream(proto) {
        let up = upstream().http1().start().await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/x").host("h1.example").body("to h1").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.version, "HTTP/1.1");
        assert_eq!(e.body, "to h1");
        assert_eq!(e.header("host"), Some("h1.example"));
        lg.assert_stat(CLUSTER_2XX, 1.0).await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_h2_with_trailers() {
    let up = upstream().grpc().start().await;
    let lg = legate()
        .config(&simple_config_with(&[up.addr], "", "    protocol: h2\n"))
        .start();
    let mut c = client(Proto::H2, lg.addr("web")).await;
    let msg = grpc_frame(b"\x0a\x05hello");
    let mut req_trailers = HeaderMap::new();
    req_trailers.insert("x-client-trailer", HeaderValue::from_static("ct"));
    let r = c
        .post("/echo.Echo/Say")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body_with_trailers(msg.clone(), req_trailers)
        .send()
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/grpc"));
    assert_eq!(r.body, msg);
    let t = r.trailers.as_ref().expect("response trailers were dropped");
    assert_eq!(t.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    assert_eq!(
        t.get("grpc-message").map(|v| v.as_bytes()),
        Some(&b"OK"[..])
    );
    assert_eq!(
        t.get("x-echo-trailer").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    lg.assert_stat(LISTENER_2XX, 1.0).await;
}

/// A gRPC request over HTTP/1.1 to an HTTP/2 upstream (the HTTP/2 client's
/// side is `grpc_through_h2_with_trailers`): hyper's HTTP/1 server writes only
/// the trailer fields the response head's `Trailer` names, and an HTTP/2
/// upstream sends no `Trailer`, so Legate declares gRPC's three. Without
/// `TE: trailers` hyper sends no trailer section at all (docs/config.md,
/// "Trailers to HTTP/1.1 clients").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_reach_an_http1_client_from_an_h2_upstream() {
    let up = upstream().grpc().start().await;
    let lg = legate()
        .config(&simple_config_with(&[up.addr], "", "    protocol: h2\n"))
        .start();
    let msg = grpc_frame(b"\x0a\x05hello");
    let request = |te: &str| {
        let mut r = format!(
            "POST /legate.demo.v1.Echo/Say HTTP/1.1\r\nHost: a\r\n{te}\
             content-type: application/grpc\r\ncontent-length: {}\r\n\
             Connection: close\r\n\r\n",
            msg.len()
        )
        .into_bytes();
        r.extend_from_slice(&msg);
        r
    };
    let out = raw(lg.addr("web"), &request("te: trailers\r\n")).await;
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert_eq!(raw_status(&out), Some(200), "{text}");
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    assert!(
        text.contains("trailer: grpc-status, grpc-message, grpc-status-details-bin\r\n"),
        "{text}"
    );
    let (_, trailers) = text
        .split_once("\r\n0\r\n")
        .unwrap_or_else(|| panic!("no last chunk: {text}"));
    assert!(trailers.contains("grpc-status: 0\r\n"), "{text}");
    assert!(trailers.contains("grpc-message: ok\r\n"), "{text}");
    // Named by nothing before it came: hyper drops it (the documented limit).
    assert!(!trailers.contains("x-echo-trailer"), "{text}");
    assert!(trailers.ends_with("\r\n\r\n"), "{text}");

    // Without `TE: trailers`: no trailers, nor a promise of any.
    let out = raw(lg.addr("web"), &request("")).await;
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert_eq!(raw_status(&out), Some(200), "{text}");
    assert!(text.ends_with("\r\n0\r\n\r\n"), "{text}");
    assert!(!text.contains("grpc-status"), "{text}");
    assert!(!text.contains("\r\ntrailer:"), "{text}");
    lg.assert_stat(LISTENER_2XX, 2.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_and_te_reach_an_h2_upstream() {
    let up = upstream().h2().start().await;
    let lg = legate()
        .config(&simple_config_with(&[up.addr], "", "    protocol: h2\n"))
        .start();
    for proto in [Proto::H1, Proto::H2] {
        let mut c = client(proto, lg.addr("web")).await;
        let mut t = HeaderMap::new();
        t.insert("x-checksum", HeaderValue::from_static("abc"));
        let r = c
            .post("/")
            .header("te", "trailers")
            .body_with_trailers("payload", t)
            .send()
            .await;
        let e = r.echo();
        assert_eq!(e.body, "payload", "{proto:?}");
        assert_eq!(e.header("te"), Some("trailers"), "{proto:?}");
        assert_eq!(
            e.trailers.get("x-checksum"),
            Some(&vec!["abc".to_string()]),
            "{proto:?}: request trailers were dropped"
        );
    }
}

/// Hop-by-hop fields in a client's request trailers are dropped as in its head
/// (RFC 9110 §6.5.1): toward an HTTP/2 upstream they would make the stream
/// malformed (RFC 9113 §8.2.2) and fail the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_trailers_are_dropped() {
    let up = upstream().h2().start().await;
    let lg = legate()
        .config(&simple_config_with(&[up.addr], "", "    protocol: h2\n"))
        .start();
    let req = b"POST /t HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: close\r\n\
                Transfer-Encoding: chunked\r\n\r\n7\r\npayload\r\n0\r\nx-ok: 1\r\n\
                keep-alive: timeout=5\r\n\r\n";
    let resp = raw(lg.addr("web"), req).await;
    let text = String::from_utf8_lossy(&resp);
    assert_eq!(raw_status(&resp), Some(200), "{text}");
    assert!(text.contains("x-ok"), "the trailers were lost: {text}");
    assert!(!text.contains("keep-alive"), "{text}");
}

fn forwarding_config(up: std::net::SocketAddr, http_extra: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
{http_extra}routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match:
              prefix: /
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
"
    )
}

each_proto!(
    async fn forwarded_headers_untrusted(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&forwarding_config(up.addr, "")).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .get("/")
            .host("shop.example:8080")
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .header("x-request-id", "client-chosen-id")
            .send()
            .await;
        let e = r.echo();
        assert_eq!(e.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
        assert_eq!(e.header_all("x-forwarded-proto"), vec!["http"]);
        assert_eq!(e.header_all("x-forwarded-host"), vec!["shop.example:8080"]);
        let id = e.header("x-request-id").expect("x-request-id generated");
        assert_ne!(id, "client-chosen-id", "untrusted x-request-id kept");
        assert_eq!(id.len(), 36, "not a UUID: {id}");

        // Generated ids differ per request.
        let id2 = c.get("/").send().await.echo();
        let id2 = id2.header("x-request-id").expect("x-request-id generated");
        assert_ne!(id, id2);
    }
);

each_proto!(
    /// The forwarding facts Legate does not write (`x-forwarded-port`,
    /// `x-forwarded-prefix`, RFC 7239's `forwarded`) are removed from an
    /// untrusted client's request, as the three it writes are replaced: an
    /// upstream that builds redirects from them would otherwise send users to
    /// the client's host, port or prefix. A trusted downstream's pass.
    async fn untrusted_forwarding_facts_are_removed(proto) {
        let up = upstream().start().await;
        let untrusted = legate().config(&forwarding_config(up.addr, "")).start();
        let trusted = legate()
            .config(&forwarding_config(up.addr, "      trust_downstream: true\n"))
            .start();
        for (lg, kept) in [(&untrusted, false), (&trusted, true)] {
            let mut c = client(proto, lg.addr("web")).await;
            let r = c
                .get("/")
                .host("shop.example")
                .header("x-forwarded-port", "8443")
                .header("x-forwarded-prefix", "/evil")
                .header("forwarded", "for=6.6.6.6;host=evil.example;proto=https")
                .header("x-forwardedness", "not a forwarding fact")
                .send()
                .await;
            assert_eq!(r.status, 200);
            let e = r.echo();
            for name in ["x-forwarded-port", "x-forwarded-prefix", "forwarded"] {
                assert_eq!(
                    e.header(name).is_some(),
                    kept,
                    "{name} (trusted: {kept}): {:?}",
                    e.header(name)
                );
            }
            assert_eq!(e.header_all("x-forwardedness"), vec!["not a forwarding fact"]);
            lg.assert_stat(LISTENER_2XX, 1.0).await;
        }
    }
);

each_proto!(
    /// `headers_with_underscores` (Envoy's `headers_with_underscores_action`):
    /// `allow` (the default) passes `x_user` on, `drop` removes it before the
    /// upstream (and routes) see the request, `reject` answers 400; each counted.
    async fn headers_with_underscores_are_allowed_dropped_or_rejected(proto) {
        let up = upstream().start().await;
        fn send(c: &mut Client) -> RequestBuilder<'_> {
            c.get("/")
                .header("x_user", "admin")
                .header("x_user", "root")
                .header("x-user", "alice")
        }
        let allow = legate().config(&forwarding_config(up.addr, "")).start();
        let mut c = client(proto, allow.addr("web")).await;
        let e = send(&mut c).send().await.echo();
        assert_eq!(e.header_all("x_user"), vec!["admin", "root"]);

        let drop = legate()
            .config(&forwarding_config(up.addr, "      headers_with_underscores: drop\n"))
            .start();
        let mut c = client(proto, drop.addr("web")).await;
        let r = send(&mut c).send().await;
        assert_eq!(r.status, 200);
        let e = r.echo();
        assert_eq!(e.header_all("x_user"), Vec::<&str>::new());
        assert_eq!(e.header_all("x-user"), vec!["alice"]);
        drop.assert_stat(
            r#"legate_listener_underscore_headers_dropped_total{listener="web"}"#,
            2.0,
        )
        .await;
        drop.assert_stat(LISTENER_2XX, 1.0).await;

        let reject = legate()
            .config(&forwarding_config(up.addr, "      headers_with_underscores: reject\n"))
            .start();
        let mut c = client(proto, reject.addr("web")).await;
        let r = send(&mut c).send().await;
        assert_eq!(r.status, 400);
        assert_eq!(r.text(), "bad_request\n");
        let mut c = client(proto, reject.addr("web")).await;
        assert_eq!(c.get("/").header("x-user", "alice").send().await.status, 200);
        reject
            .assert_stat(
                r#"legate_listener_underscore_headers_rejected_total{listener="web"}"#,
                1.0,
            )
            .await;
        reject
            .assert_stat(r#"legate_listener_requests_total{listener="web",class="4xx"}"#, 1.0)
            .await;
        assert_eq!(up.requests.get(), 3, "a rejected request reached the upstream");
    }
);

each_proto!(
    /// Hop-by-hop headers go and the forwarding facts are set before routes
    /// (and filters) see the request: a client cannot pick a route by a
    /// spoofed `x-forwarded-for`, nor strip the generated request id by
    /// naming it in `Connection`.
    async fn routes_see_the_sanitised_request(proto) {
        let up = upstream().start().await;
        let admin = upstream().start().await;
        // A route for a spoofable header first, then the usual catch-all.
        let config = with_cluster(
            &simple_config(&[up.addr]).replace(
                "        routes:\n",
                "        routes:\n          - match:\n              prefix: /\n              headers:\n                \
                 - { name: x-forwarded-for, exact: \"10.0.0.1\" }\n            cluster: admin\n",
            ),
            "admin",
            admin.addr,
        );
        let lg = legate().config(&config).start();
        let mut c = client(proto, lg.addr("web")).await;
        let mut req = c.get("/").header("x-forwarded-for", "10.0.0.1");
        if proto == Proto::H1 {
            // (HTTP/2 has no `Connection` header.)
            req = req.header("connection", "keep-alive, x-request-id");
        }
        let r = req.send().await;
        assert_eq!(r.status, 200);
        assert_eq!(admin.requests.get(), 0, "routed by a spoofed x-forwarded-for");
        assert_eq!(up.requests.get(), 1);
        let e = r.echo();
        assert_eq!(e.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
        assert_eq!(e.header("x-request-id").map(str::len), Some(36));
    }
);

each_proto!(
    async fn forwarded_headers_trusted(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&forwarding_config(up.addr, "      trust_downstream: true\n"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .get("/")
            .host("shop.example")
            .header("x-forwarded-for", "10.1.1.1")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "front.example")
            .header("x-request-id", "trusted-id-123")
            .send()
            .await;
        let e = r.echo();
        assert_eq!(e.header_all("x-forwarded-for"), vec!["10.1.1.1, 127.0.0.1"]);
        assert_eq!(e.header_all("x-forwarded-proto"), vec!["https"]);
        assert_eq!(e.header_all("x-forwarded-host"), vec!["front.example"]);
        assert_eq!(e.header_all("x-request-id"), vec!["trusted-id-123"]);

        // Trusted but absent: generated.
        let e = c.get("/").send().await.echo();
        assert_eq!(e.header("x-request-id").map(str::len), Some(36));
        assert_eq!(e.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
    }
);

each_proto!(
    async fn request_id_generation_off(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&forwarding_config(up.addr, "      generate_request_id: false\n"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let e = c.get("/").send().await.echo();
        assert_eq!(e.header("x-request-id"), None);
        // Untrusted incoming id is removed, not forwarded.
        let e = c.get("/").header("x-request-id", "forged").send().await.echo();
        assert_eq!(e.header("x-request-id"), None);
    }
);

each_proto!(
    async fn via_on_requests_and_responses(proto) {
        let up = upstream().response_header("via", "1.1 origin").start().await;
        let lg = legate()
            .config(&forwarding_config(up.addr, "      via: legate-test\n"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").header("via", "1.1 client-proxy").send().await;
        let expected_req = match proto {
            Proto::H1 => "1.1 client-proxy, 1.1 legate-test",
            Proto::H2 => "1.1 client-proxy, 2 legate-test",
        };
        assert_eq!(r.echo().header_all("via"), vec![expected_req]);
        let via = r.header_all("via").join(", ");
        assert!(
            via.starts_with("1.1 origin") && via.ends_with("legate-test"),
            "response via: {via}"
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_are_removed() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c
        .get("/")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "gzip, trailers")
        .header("x-kept", "yes")
        .send()
        .await;
    let e = r.echo();
    for h in [
        "x-private",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "upgrade",
        "transfer-encoding",
    ] {
        assert_eq!(
            e.header(h),
            None,
            "hop-by-hop `{h}` forwarded: {:?}",
            e.headers
        );
    }
    assert!(
        e.header("connection")
            .is_none_or(|v| !v.contains("x-private")),
        "{:?}",
        e.headers
    );
    assert_eq!(e.header("te"), Some("trailers"));
    assert_eq!(e.header("x-kept"), Some("yes"));
}

each_proto!(
    async fn hop_by_hop_response_headers_are_removed(proto) {
        let up = upstream()
            .http1()
            .route("/", |_req| async {
                let mut r = Response::new(Full::new(Bytes::from("ok")));
                let h = r.headers_mut();
                h.insert("connection", HeaderValue::from_static("x-upstream-private"));
                h.insert("x-upstream-private", HeaderValue::from_static("secret"));
                h.insert("keep-alive", HeaderValue::from_static("timeout=30"));
                h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
                h.insert("x-kept", HeaderValue::from_static("yes"));
                r
            })
            .start()
            .await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-upstream-private"), None, "{:?}", r.headers);
        assert_eq!(r.header("keep-alive"), None, "{:?}", r.headers);
        assert_eq!(r.header("x-kept"), Some("yes"));
        assert_eq!(r.text(), "ok");
    }
);

const HEADER_OPS: &str = "version: 1
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
        request_headers:
          add:
            x-vhost-add: vhost
          set:
            x-both: vhost
          remove: [x-vhost-remove]
        response_headers:
          add:
            x-resp-vhost: vhost
          set:
            x-resp-both: vhost
          remove: [x-resp-vhost-remove]
        routes:
          - match:
              prefix: /
            cluster: backend
            request_headers:
              add:
                x-add: route
              set:
                x-set: route
                x-both: route
              remove: [x-remove]
            response_headers:
              add:
                x-resp-add: route
              set:
                x-resp-set: route
                x-resp-both: route
              remove: [x-resp-remove]
clusters:
  - name: backend
    endpoints:
      - address: UPSTREAM
";

each_proto!(
    async fn header_operations_at_route_and_vhost_level(proto) {
        let up = upstream()
            .response_header("x-resp-add", "upstream")
            .response_header("x-resp-set", "upstream")
            .response_header("x-resp-remove", "upstream")
            .response_header("x-resp-vhost-remove", "upstream")
            .response_header("x-resp-both", "upstream")
            .start()
            .await;
        let lg = legate()
            .config(&HEADER_OPS.replace("UPSTREAM", &up.addr.to_string()))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .get("/")
            .header("x-add", "client")
            .header("x-set", "client")
            .header("x-remove", "client")
            .header("x-vhost-remove", "client")
            .header("x-both", "client")
            .send()
            .await;
        assert_eq!(r.status, 200);
        let e = r.echo();
        assert_eq!(e.header_all("x-add"), vec!["client", "route"]);
        assert_eq!(e.header_all("x-set"), vec!["route"]);
        assert_eq!(e.header_all("x-remove"), Vec::<&str>::new());
        assert_eq!(e.header_all("x-vhost-remove"), Vec::<&str>::new());
        assert_eq!(e.header_all("x-vhost-add"), vec!["vhost"]);
        // Route ops run first, then the virtual host's: its `set` wins.
        assert_eq!(e.header_all("x-both"), vec!["vhost"]);

        assert_eq!(r.header_all("x-resp-add"), vec!["upstream", "route"]);
        assert_eq!(r.header_all("x-resp-set"), vec!["route"]);
        assert_eq!(r.header_all("x-resp-remove"), Vec::<&str>::new());
        assert_eq!(r.header_all("x-resp-vhost-remove"), Vec::<&str>::new());
        assert_eq!(r.header_all("x-resp-vhost"), vec!["vhost"]);
        assert_eq!(r.header_all("x-resp-both"), vec!["vhost"]);
    }
);

each_proto!(
    /// Request header values with Envoy's operators (nginx's
    /// `proxy_set_header X-Real-IP $remote_addr`): the client's address, the
    /// route, a request header, the scheme; one whose operators have no value
    /// adds nothing (and a `set` of it still removes the client's); `%%` is
    /// a literal `%`. Response values stay literal.
    async fn request_header_values_with_operators(proto) {
        let up = upstream().start().await;
        let cfg = web_config(
            "          - name: api
            match: { prefix: / }
            cluster: backend
            request_headers:
              set:
                x-real-ip: \"%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%\"
                x-via-route: \"%ROUTE_NAME% for %REQ(USER-AGENT)% on %REQ(:SCHEME)%\"
                x-empty: \"%REQ(X-NOPE)%\"
                x-share: \"100%%\"
            response_headers:
              set:
                x-literal: \"50%\"
",
            &format!("  - name: backend\n    endpoints:\n      - address: {}\n", up.addr),
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .get("/")
            .header("user-agent", "curl/8")
            .header("x-real-ip", "6.6.6.6")
            .header("x-empty", "from-client")
            .send()
            .await;
        assert_eq!(r.status, 200);
        let e = r.echo();
        assert_eq!(e.header_all("x-real-ip"), vec!["127.0.0.1"]);
        assert_eq!(e.header_all("x-via-route"), vec!["api for curl/8 on http"]);
        assert_eq!(e.header_all("x-empty"), Vec::<&str>::new());
        assert_eq!(e.header_all("x-share"), vec!["100%"]);
        assert_eq!(r.header("x-literal"), Some("50%"));
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_waits_for_the_go_ahead() {
    let up = upstream().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let mut c = RawConn::connect(lg.addr("web")).await;
    c.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await;
    // The client holds the body until Legate says go on.
    let interim = c.read_head(std::time::Duration::from_secs(5)).await;
    let interim = String::from_utf8_lossy(&interim);
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    c.write(b"hello").await;
    let (rest, _) = c.read_until_close(std::time::Duration::from_secs(2)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 200 OK"), "{rest}");
    let body = &rest[rest.find("\r\n\r\n").map_or(0, |i| i + 4)..];
    let echo: legate_tests::serde_json::Value =
        legate_tests::serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {rest}"));
    assert_eq!(echo["body"], "hello", "{echo}");
    // The expectation is met hop by hop: the upstream is not asked again.
    assert!(echo["headers"].get("expect").is_none(), "{echo}");
    assert_eq!(up.requests.get(), 1);
}

/// A raw HTTP/1.1 upstream on 127.0.0.1:0 that reads each request head,
/// writes `response` as it is and closes: answers hyper would not send.
async fn canned_upstream(response: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s.write_all(response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    up
}

each_proto!(
    /// An upstream answer with both `Transfer-Encoding: chunked` and a
    /// `Content-Length` is read as chunked (RFC 9112 §6.3), and the length,
    /// which does not describe that body, is not passed on.
    async fn a_response_with_both_framings_is_read_as_chunked(proto) {
        let up = canned_upstream(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\
              Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
        )
        .await;
        let lg = legate().config(&simple_config(&[up])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "hello");
        assert_ne!(r.header("content-length"), Some("3"));
    }
);

each_proto!(
    /// A GET with a body of unknown length (chunked over HTTP/1.1, DATA
    /// frames without `content-length` over HTTP/2) reaches an HTTP/1.1
    /// upstream with its body: hyper frames a GET without a length as
    /// bodiless, so the proxy sends it chunked.
    async fn a_get_body_of_unknown_length_goes_upstream(proto) {
        let up = upstream().http1().start().await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let mut req = c.get("/_search").streamed_body(b"{\"query\":1}".to_vec(), 4);
        if proto == Proto::H1 {
            // hyper (the test client) would send the GET bodiless too.
            req = req.header("transfer-encoding", "chunked");
        }
        let r = req.send().await;
        assert_eq!(r.status, 200);
        let e = r.echo();
        assert_eq!(e.method, "GET");
        assert_eq!(e.body, "{\"query\":1}");
    }
);

each_proto!(
    /// The route's request operations run after `via` is added, so they may
    /// remove it (docs/config.md: they see Legate's own proxy headers).
    async fn route_operations_see_via(proto) {
        let up = upstream().start().await;
        let config = simple_config_with(
            &[up.addr],
            "            request_headers:\n              remove: [via]\n",
            "",
        )
        .replace("      routes: main\n", "      routes: main\n      via: legate-test\n");
        let lg = legate().config(&config).start();
        let mut c = client(proto, lg.addr("web")).await;
        let e = c.get("/").header("via", "1.1 client-proxy").send().await.echo();
        assert_eq!(e.header("via"), None, "{:?}", e.headers);
    }
);

/// An HTTP/2 request over a raw socket (h2c prior knowledge) whose HEADERS
/// lack END_STREAM and are followed, in the same write, by an empty DATA
/// frame with END_STREAM (some clients end every request so). Returns the
/// first byte of the response's header block (`0x88`: `:status: 200` in
/// HPACK's static table).
async fn h2_headers_then_empty_data(addr: std::net::SocketAddr, method: &str, path: &str) -> u8 {
    use std::time::Duration;
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    // HPACK: a literal without indexing, its name from the static table, no
    // Huffman coding.
    fn literal(index: u8, value: &str) -> Vec<u8> {
        let mut v = vec![index, value.len() as u8];
        v.extend_from_slice(value.as_bytes());
        v
    }
    let mut block = literal(2, method); // :method
    block.push(0x86); // :scheme: http
    block.extend(literal(4, path)); // :path
    block.extend(literal(1, "example.test")); // :authority
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[])); // SETTINGS
    out.extend(frame(1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    out.extend(frame(0, 0x1, 1, &[])); // DATA, END_STREAM
    let mut c = RawConn::connect(addr).await;
    c.write(&out).await;
    loop {
        let head = c.read_exact(9, Duration::from_secs(5)).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
        let payload = c.read_exact(len, Duration::from_secs(5)).await.unwrap();
        if kind == 4 && flags & 1 == 0 {
            c.write(&frame(4, 1, 0, &[])).await; // SETTINGS ACK
        }
        if kind == 1 && stream == 1 {
            return payload[0];
        }
    }
}

each_proto!(
    /// A request whose body turns out empty before its head goes upstream
    /// (HTTP/2: END_STREAM on an empty DATA frame after the HEADERS;
    /// HTTP/1.1: an empty chunked body) reaches an HTTP/1.1 upstream without
    /// a body framing, as Envoy sends a request that ends with its headers: a
    /// GET gains no `transfer-encoding: chunked` and `0` chunk, a POST goes
    /// with `content-length: 0`.
    async fn a_body_known_empty_goes_upstream_without_framing(proto) {
        use std::sync::{Arc, Mutex};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let up = upstream()
            .http1()
            .handler(move |req: Request<Incoming>| {
                let s = s.clone();
                async move {
                    let h = req.headers();
                    let framing = ["transfer-encoding", "content-length"]
                        .map(|n| h.get(n).map(|v| v.to_str().unwrap_or("?").to_string()));
                    s.lock().unwrap().push((req.method().to_string(), framing));
                    echo(req).await
                }
            })
            .start()
            .await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        for method in ["GET", "POST"] {
            match proto {
                Proto::H2 => {
                    let status = h2_headers_then_empty_data(lg.addr("web"), method, "/e").await;
                    assert_eq!(status, 0x88, "not a 200");
                }
                Proto::H1 => {
                    let req = format!(
                        "{method} /e HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\
                         connection: close\r\n\r\n0\r\n\r\n"
                    );
                    let resp = raw(lg.addr("web"), req.as_bytes()).await;
                    assert_eq!(raw_status(&resp), Some(200), "{}", String::from_utf8_lossy(&resp));
                }
            }
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                ("GET".to_string(), [None, None]),
                ("POST".to_string(), [None, Some("0".to_string())]),
            ]
        );
        lg.assert_stat(LISTENER_2XX, 2.0).await;
        lg.assert_stat(CLUSTER_2XX, 2.0).await;
    }
);

/// RFC 9113 §8.2.3: the `cookie` fields an HTTP/2 client splits are joined
/// with `; ` before the request goes on (one field for an HTTP/1.1 upstream),
/// as Envoy and nginx do; a repeated `content-length` (RFC 9110 §8.6), an
/// `:authority` with userinfo (§8.3.1) and a value padded with whitespace
/// (§8.2.1) are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_cookies_are_joined_and_bad_heads_refused() {
    let up = upstream().http1().start().await;
    let lg = legate().config(&simple_config(&[up.addr])).start();
    let mut c = client(Proto::H2, lg.addr("web")).await;
    let r = c
        .get("/c")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().header_all("cookie"), ["a=1; b=2; c=3"]);
    let r = c.get("/one").header("cookie", "a=1").send().await;
    assert_eq!(r.echo().header_all("cookie"), ["a=1"]);
    assert_eq!(up.requests.get(), 2);

    let r = c
        .post("/len")
        .header("content-length", "5")
        .header("content-length", "5")
        .body("hello")
        .send()
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = c.get("/u").host("user@a.example").send().await;
    assert_eq!(r.status, 400, "{}", r.text());
    // RFC 9113 §8.2.1: no whitespace around a field value.
    let r = c.get("/w").header("x-a", " padded").send().await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(up.requests.get(), 2, "a refused request went upstream");
}

each_proto!(
    /// An upstream `101` to a request that asked for no upgrade (RFC 9110
    /// §7.8; HTTP/2 has no 101 at all) is a broken upstream: 502, not a
    /// switch nobody asked for.
    async fn an_unasked_101_is_a_bad_gateway(proto) {
        let up = canned_upstream(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n",
        )
        .await;
        let lg = legate().config(&simple_config(&[up])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/plain").send().await;
        assert_eq!(r.status, 502, "{}", r.text());
        // The connection goes on serving (HTTP/1.1: no bogus switch).
        let r = c.get("/again").send().await;
        assert_eq!(r.status, 502, "{}", r.text());
    }
);

/// Hop-by-hop fields in an upstream's trailers are dropped as in its head
/// (RFC 9110 §6.5.1): an HTTP/2 stream carrying them would be malformed and
/// reset, losing a complete response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_trailers_are_dropped() {
    let up = canned_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n0\r\nx-ok: 1\r\nkeep-alive: timeout=5\r\n\r\n",
    )
    .await;
    let lg = legate().config(&simple_config(&[up])).start();
    let mut c = client(Proto::H2, lg.addr("web")).await;
    let r = c.get("/t").header("te", "trailers").send().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello");
    let t = r.trailers.as_ref().expect("the trailers were lost");
    assert_eq!(t.get("x-ok").map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert!(t.get("keep-alive").is_none(), "{t:?}");
}

each_proto!(
    /// `te: trailers` reaches an HTTP/1.1 upstream named in `Connection`
    /// (RFC 9110 §10.1.4), so a further intermediary drops it; a request
    /// without `te` gets no such `Connection`.
    async fn te_reaches_an_h1_upstream_listed_in_connection(proto) {
        let up = upstream().http1().start().await;
        let lg = legate().config(&simple_config(&[up.addr])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/te").header("te", "trailers").send().await;
        assert_eq!(r.status, 200);
        let e = r.echo();
        assert_eq!(e.header("te"), Some("trailers"));
        assert_eq!(e.header("connection"), Some("te"));
        let r = c.get("/plain").send().await;
        assert_eq!(r.echo().header("connection"), None);
    }
);

each_proto!(
    /// A `304` keeps the `content-length` its upstream sent (RFC 9110 §8.6:
    /// the length of the representation it stands for; Envoy and nginx pass
    /// it), and the connection goes on. HTTP/1.1 lost it (hyper's server drops
    /// the field from a response it knows has an empty body).
    async fn a_304_keeps_its_content_length(proto) {
        let up = canned_upstream(
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 1234\r\n\
              etag: \"v1\"\r\nconnection: close\r\n\r\n",
        )
        .await;
        let lg = legate().config(&simple_config(&[up])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..2 {
            let r = c.get("/cached").header("if-none-match", "\"v1\"").send().await;
            assert_eq!(r.status, 304);
            assert_eq!(r.header("content-length"), Some("1234"), "{:?}", r.headers);
            assert_eq!(r.header("etag"), Some("\"v1\""));
            assert!(r.body.is_empty());
        }
    }
);

each_proto!(
    /// A `103 Early Hints` (or any 1xx but 100 and 101) from the upstream is
    /// not passed on: hyper's server has no way to send an interim response
    /// (docs/config.md, "Interim responses"). The final response still
    /// arrives whole after it.
    async fn an_early_hints_response_is_dropped_and_the_final_one_passes(proto) {
        let up = canned_upstream(
            b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-final: yes\r\n\
              connection: close\r\n\r\nok",
        )
        .await;
        let lg = legate().config(&simple_config(&[up])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/page").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-final"), Some("yes"));
        assert_eq!(r.header("link"), None, "the 103's fields reached the final response");
        assert_eq!(r.text(), "ok");
    }
);

each_proto!(
    /// A response to `HEAD` that Legate makes itself (a direct response, a
    /// host error) carries no body (RFC 9110 §9.3.2), over HTTP/2 too, where
    /// its DATA made the client reset the stream; its `content-length` is the
    /// body's a `GET` gets.
    async fn a_local_answer_to_head_has_no_body(proto) {
        let yaml = web_config(
            "          - match: { prefix: /direct }\n            direct_response: { status: 200, body: hello }\n\
             \x20         - match: { prefix: / }\n            cluster: backend\n",
            &format!("  - name: backend\n    endpoints:\n      - address: {}\n", closed_port_addr()),
        );
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let get = c.get("/direct").send().await;
        assert_eq!(get.text(), "hello");
        for path in ["/direct", "/dead"] {
            let r = c
                .request(Method::HEAD, path)
                .try_send()
                .await
                .unwrap_or_else(|e| panic!("HEAD {path}: {e:#}"));
            assert!(r.body.is_empty(), "HEAD {path}: {:?}", r.body);
            if path == "/direct" {
                assert_eq!(r.status, 200);
                assert_eq!(r.header("content-length"), Some("5"), "{:?}", r.headers);
            } else {
                assert_eq!(r.status, 502, "{:?}", r.headers);
            }
        }
        let r = c.get("/direct").send().await;
        assert_eq!(r.text(), "hello", "the connection went on");
    }
);

/// An HTTP/1.0 request without `Host` (HAProxy's default `option httpchk`,
/// `OPTIONS / HTTP/1.0`; keepalived and `nc` checks) is routed by the address
/// the client reached, `ip:port`, as nginx serves it from that address's
/// server: a direct response answers it, and a proxied one reaches the
/// upstream with that address as its `Host`. It was a 400, which made a
/// balancer in front mark Legate down. HTTP/1.1 without `Host` stays a 400
/// (RFC 9112 §3.2). HTTP/1 only: HTTP/1.0 and `Host` have no HTTP/2 form
/// (an HTTP/2 request without `:authority` is refused as before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_request_without_host_is_routed_by_the_local_address() {
    let up = upstream().start().await;
    let yaml = web_config(
        "          - match: { prefix: /healthz }\n            direct_response: { status: 200, body: ok }\n\
         \x20         - match: { prefix: / }\n            cluster: backend\n",
        &format!("  - name: backend\n    endpoints:\n      - address: {}\n", up.addr),
    );
    let lg = legate().config(&yaml).start();
    let addr = lg.addr("web");
    let out = raw(addr, b"OPTIONS /healthz HTTP/1.0\r\n\r\n").await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(raw_status(&out), Some(200), "{text}");
    assert!(text.ends_with("\r\n\r\nok"), "{text}");
    let out = raw(addr, b"GET /x HTTP/1.0\r\n\r\n").await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(raw_status(&out), Some(200), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let echo: EchoBody = serde_json::from_str(body).unwrap();
    assert_eq!(
        echo.header("host"),
        Some(addr.to_string().as_str()),
        "{body}"
    );
    assert_eq!(up.requests.get(), 1);
    let out = raw(addr, b"GET /x HTTP/1.1\r\n\r\n").await;
    assert_eq!(
        raw_status(&out),
        Some(400),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(up.requests.get(), 1);
}

/// `headers_with_underscores` applies to a request's trailers too: `drop`
/// removes `x_sum` (counted), `reject` fails the request with 400 (counted;
/// over an HTTP/2 upstream it was a 502 before the client's fault was noted) —
/// they would stand in for `x-sum` at a CGI-style upstream as a header would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscored_request_trailers_are_dropped_or_rejected() {
    let up = upstream().h2().start().await;
    let up1 = upstream().http1().start().await;
    for proto in [Proto::H1, Proto::H2] {
        for (action, up, cluster) in [
            ("drop", &up, "    protocol: h2\n"),
            ("reject", &up, "    protocol: h2\n"),
            ("reject", &up1, ""),
        ] {
            let cfg = simple_config_with(&[up.addr], "", cluster).replacen(
                "      routes: main\n",
                &format!("      routes: main\n      headers_with_underscores: {action}\n"),
                1,
            );
            let lg = legate().config(&cfg).start();
            let mut c = client(proto, lg.addr("web")).await;
            let mut t = HeaderMap::new();
            t.insert("x_sum", HeaderValue::from_static("forged"));
            t.insert("x-sum", HeaderValue::from_static("abc"));
            let r = c
                .post("/")
                .header("te", "trailers")
                .body_with_trailers("payload", t)
                .try_send()
                .await;
            let counter =
                format!("legate_listener_underscore_headers_{action}ped_total{{listener=\"web\"}}")
                    .replace("rejectped", "rejected");
            if action == "drop" {
                let e = r.unwrap().echo();
                assert_eq!(e.trailers.get("x_sum"), None, "{proto:?}");
                assert_eq!(
                    e.trailers.get("x-sum"),
                    Some(&vec!["abc".to_string()]),
                    "{proto:?}"
                );
            } else {
                // The client's fault, whichever protocol the upstream speaks
                // (an HTTP/2 upstream only sees its stream reset).
                let r = r.unwrap();
                assert_eq!(r.status, 400, "{proto:?} {cluster:?}: {}", r.text());
            }
            lg.assert_stat(&counter, 1.0).await;
        }
    }
}

each_proto!(
    /// `request_id_in_response`: every answer carries the `x-request-id` the
    /// request was handled with (the upstream's, and Legate's own 404); off
    /// by default.
    async fn the_request_id_goes_back_in_the_response(proto) {
        let up = upstream().start().await;
        let routes = "          - match: { prefix: /ok }\n            cluster: backend\n";
        let clusters = format!("  - name: backend\n    endpoints:\n      - address: {}\n", up.addr);
        let on = web_config(routes, &clusters).replacen(
            "      routes: main\n",
            "      routes: main\n      request_id_in_response: true\n",
            1,
        );
        let lg = legate().config(&on).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/ok").send().await;
        let sent = r.echo().header("x-request-id").unwrap().to_string();
        assert_eq!(r.header("x-request-id"), Some(sent.as_str()));
        let r = c.get("/nowhere").send().await;
        assert_eq!(r.status, 404);
        assert_eq!(r.header("x-request-id").map(str::len), Some(36));
        let lg = legate().config(&web_config(routes, &clusters)).start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/ok").send().await.header("x-request-id"), None);
    }
);
