//! Routing: virtual host selection by host, route matching on path, method, headers
//! and query, weighted clusters, redirects, direct responses and rewrites.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use legate_tests::*;

const VHOSTS: &str = "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
routes:
  - name: main
    virtual_hosts:
      - name: exact
        domains: [api.example.com, other.example.com:8443]
        routes:
          - direct_response: { status: 200, body: exact }
      - name: suffix
        domains: [\"*.example.com\"]
        routes:
          - direct_response: { status: 200, body: suffix }
      - name: longer-suffix
        domains: [\"*.eu.example.com\"]
        routes:
          - direct_response: { status: 200, body: longer-suffix }
      - name: prefix
        domains: [\"api.*\"]
        routes:
          - direct_response: { status: 200, body: prefix }
DEFAULT";

fn vhost_config(with_default: bool) -> String {
    let default = if with_default {
        "      - name: default
        domains: [\"*\"]
        routes:
          - direct_response: { status: 200, body: default }
"
    } else {
        ""
    };
    VHOSTS.replace("DEFAULT", default)
}

each_proto!(
    async fn virtual_host_selection(proto) {
        let lg = legate().config(&vhost_config(true)).start();
        let mut c = client(proto, lg.addr("web")).await;
        for (host, expected) in [
            ("api.example.com", "exact"),
            ("API.Example.COM", "exact"),
            ("api.example.com:8080", "exact"),
            ("other.example.com:8443", "exact"),
            ("other.example.com:9000", "suffix"),
            ("www.example.com", "suffix"),
            ("a.b.example.com", "suffix"),
            ("x.eu.example.com", "longer-suffix"),
            ("api.example.org", "prefix"),
            ("api.internal:9000", "prefix"),
            ("example.com", "default"),
            ("unknown.test", "default"),
        ] {
            let r = c.get("/").host(host).send().await;
            assert_eq!(r.status, 200, "{host}");
            assert_eq!(r.text(), expected, "host {host}");
        }
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="2xx"}"#, 12.0)
            .await;
        lg.assert_stat(r#"legate_route_requests_total{route_table="main",virtual_host="exact",route="exact/0",class="2xx"}"#, 4.0)
            .await;
        lg.assert_stat(r#"legate_route_requests_total{route_table="main",virtual_host="default",route="default/0",class="2xx"}"#, 2.0)
            .await;
    }
);

each_proto!(
    async fn no_virtual_host_is_404(proto) {
        let lg = legate().config(&vhost_config(false)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").host("unknown.test").send().await;
        assert_eq!(r.status, 404);
        assert_eq!(r.text(), "no_route\n");
        let r = c.get("/").host("example.com").send().await;
        assert_eq!(r.status, 404);
        // The connection stays usable after a 404.
        assert_eq!(c.get("/").host("api.example.com").send().await.text(), "exact");
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="4xx"}"#, 2.0)
            .await;
    }
);

each_proto!(
    /// More than one `host` field is a 400 over both protocols: over HTTP/2
    /// one request could name a virtual host by its first `host` and an
    /// upstream by another (nghttp2, so Envoy, refuses it too).
    async fn a_repeated_host_is_400(proto) {
        let lg = legate().config(&vhost_config(true)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .get("/")
            .host("api.example.com")
            .header("host", "api.example.com")
            .header("host", "www.example.com")
            .send()
            .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.text(), "bad_request\n");
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/").host("api.example.com").send().await.text(), "exact");
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="4xx"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="2xx"}"#, 1.0)
            .await;
    }
);

each_proto!(
    /// A port past 65535 in the authority names no port: 400, as a port with a
    /// letter in it is, so it never reaches a virtual host or an upstream.
    async fn a_port_past_65535_is_400(proto) {
        let lg = legate().config(&vhost_config(true)).start();
        for host in ["api.example.com:65536", "api.example.com:99999"] {
            let mut c = client(proto, lg.addr("web")).await;
            let r = c.get("/").host(host).send().await;
            assert_eq!(r.status, 400, "{host}");
            assert_eq!(r.text(), "bad_request\n");
        }
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/").host("api.example.com:65535").send().await;
        assert_eq!(r.text(), "exact");
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="4xx"}"#, 2.0)
            .await;
    }
);

each_proto!(
    async fn a_domain_with_a_trailing_dot_matches_its_host(proto) {
        // `api.test.` is a fully qualified name: the same host as `api.test`, as a
        // request's trailing dot is ignored, so it must win over the wildcard.
        let lg = legate()
            .config(
                "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
routes:
  - name: main
    virtual_hosts:
      - name: fqdn
        domains: [\"API.test.\", \"admin.test.:8443\"]
        routes:
          - direct_response: { status: 200, body: fqdn }
      - name: default
        domains: [\"*\"]
        routes:
          - direct_response: { status: 200, body: default }
",
            )
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for (host, expected) in [
            ("api.test", "fqdn"),
            ("api.test.", "fqdn"),
            ("api.test:8080", "fqdn"),
            ("admin.test:8443", "fqdn"),
            ("admin.test.:8443", "fqdn"),
            ("admin.test", "default"),
            ("www.test", "default"),
        ] {
            let r = c.get("/").host(host).send().await;
            assert_eq!(r.status, 200, "{host}");
            assert_eq!(r.text(), expected, "host {host}");
        }
    }
);

/// Method, path, headers, expected route answer.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

const MATCHES: &str = "version: 1
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
          - name: exact-path
            match: { path: /exact }
            direct_response: { status: 200, body: exact-path }
          - name: regex
            match: { regex: \"/items/[0-9]+\" }
            direct_response: { status: 200, body: regex }
          - name: post-only
            match: { prefix: /methods, methods: [POST, PUT] }
            direct_response: { status: 200, body: post-or-put }
          - name: header-exact
            match:
              prefix: /h
              headers:
                - { name: x-tenant, exact: blue }
            direct_response: { status: 200, body: header-exact }
          - name: header-regex
            match:
              prefix: /h
              headers:
                - { name: X-Version, regex: \"v[0-9]+\" }
            direct_response: { status: 200, body: header-regex }
          - name: header-present
            match:
              prefix: /h
              headers:
                - { name: x-debug, present: true }
                - { name: x-skip, present: false }
            direct_response: { status: 200, body: header-present }
          - name: query
            match:
              prefix: /q
              query:
                - { name: mode, exact: fast car }
                - { name: id, regex: \"[a-f]{3}\" }
            direct_response: { status: 200, body: query-exact-regex }
          - name: query-present
            match:
              prefix: /q
              query:
                - { name: flag, present: true }
            direct_response: { status: 200, body: query-present }
          - name: prefix
            match: { prefix: /exact }
            direct_response: { status: 200, body: prefix-exact }
          - name: fallback
            direct_response: { status: 200, body: fallback }
";

each_proto!(
    async fn route_matching(proto) {
        let lg = legate().config(MATCHES).start();
        let mut c = client(proto, lg.addr("web")).await;
        let cases: &[Case<'_>] = &[
            ("GET", "/exact", &[], "exact-path"),
            ("GET", "/exact?x=1", &[], "exact-path"),
            ("GET", "/exact/more", &[], "prefix-exact"),
            ("GET", "/exactly", &[], "prefix-exact"),
            ("GET", "/items/42", &[], "regex"),
            ("GET", "/items/42/x", &[], "fallback"),
            ("GET", "/items/abc", &[], "fallback"),
            ("POST", "/methods", &[], "post-or-put"),
            ("PUT", "/methods/x", &[], "post-or-put"),
            ("GET", "/methods", &[], "fallback"),
            ("GET", "/h", &[("x-tenant", "blue")], "header-exact"),
            ("GET", "/h", &[("x-tenant", "Blue")], "fallback"),
            ("GET", "/h", &[("x-tenant", "red"), ("x-tenant", "blue")], "header-exact"),
            ("GET", "/h", &[("x-version", "v12")], "header-regex"),
            ("GET", "/h", &[("x-version", "v12-beta")], "fallback"),
            ("GET", "/h", &[("x-debug", "")], "header-present"),
            ("GET", "/h", &[("x-debug", "1"), ("x-skip", "1")], "fallback"),
            ("GET", "/q?mode=fast+car&id=abc", &[], "query-exact-regex"),
            ("GET", "/q?id=abc&mode=fast%20car", &[], "query-exact-regex"),
            ("GET", "/q?mode=fast+car&id=abcd", &[], "fallback"),
            ("GET", "/q?mode=fast&id=abc", &[], "fallback"),
            ("GET", "/q?a=1&flag", &[], "query-present"),
            ("GET", "/q?flag=", &[], "query-present"),
            ("GET", "/q?flags=1", &[], "fallback"),
        ];
        for (method, path, headers, expected) in cases {
            let mut b = c.request(Method::from_bytes(method.as_bytes()).unwrap(), path);
            for (k, v) in *headers {
                b = b.header(k, v);
            }
            let r = b.send().await;
            assert_eq!(r.status, 200);
            assert_eq!(r.text(), *expected, "{method} {path} {headers:?}");
        }
        lg.assert_stat(r#"legate_route_requests_total{route_table="main",virtual_host="all",route="fallback",class="2xx"}"#, 9.0)
            .await;
        lg.assert_stat(r#"legate_route_requests_total{route_table="main",virtual_host="all",route="header-exact",class="2xx"}"#, 2.0)
            .await;
    }
);

const WEIGHTED: &str = "version: 1
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
          - weighted_clusters:
              - { cluster: stable, weight: 90 }
              - { cluster: canary, weight: 10 }
clusters:
  - name: stable
    endpoints:
      - address: STABLE
  - name: canary
    endpoints:
      - address: CANARY
";

each_proto!(
    async fn weighted_clusters_split_traffic(proto) {
        let stable = upstream().name("stable").start().await;
        let canary = upstream().name("canary").start().await;
        let lg = legate()
            .config(
                &WEIGHTED
                    .replace("STABLE", &stable.addr.to_string())
                    .replace("CANARY", &canary.addr.to_string()),
            )
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let n = 1000;
        let mut to_canary = 0;
        for _ in 0..n {
            let r = c.get("/").send().await;
            assert_eq!(r.status, 200);
            if r.header("x-upstream") == Some("canary") {
                to_canary += 1;
            }
        }
        // Binomial(1000, 0.1): mean 100, sd 9.5; ±50 is more than 5 sd.
        assert!((50..=150).contains(&to_canary), "canary got {to_canary} of {n}");
        assert_eq!(canary.requests.get(), to_canary);
        assert_eq!(stable.requests.get(), n - to_canary);
        lg.assert_stat(r#"legate_cluster_upstream_rq_total{cluster="canary"}"#, to_canary as f64)
            .await;
        lg.assert_stat(
            r#"legate_cluster_upstream_rq_total{cluster="stable"}"#,
            (n - to_canary) as f64,
        )
        .await;
    }
);

const REDIRECTS: &str = "version: 1
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
          - match: { prefix: /old/ }
            redirect: { prefix_rewrite: /new/, code: 308 }
          - match: { prefix: /secure }
            redirect: { scheme: https }
          - match: { prefix: /elsewhere }
            redirect: { host: \"other.example:8443\", path: /landing, code: 302 }
          - match: { prefix: /noquery }
            redirect: { path: /clean, strip_query: true, code: 307 }
";

each_proto!(
    async fn redirects(proto) {
        let lg = legate().config(REDIRECTS).start();
        let mut c = client(proto, lg.addr("web")).await;
        let cases = [
            ("/old/page?x=1", 308, "http://site.example/new/page?x=1"),
            ("/secure/a?b=c", 301, "https://site.example/secure/a?b=c"),
            ("/elsewhere/x?y=1", 302, "http://other.example:8443/landing?y=1"),
            ("/noquery?drop=me", 307, "http://site.example/clean"),
        ];
        for (path, code, location) in cases {
            let r = c.get(path).host("site.example").send().await;
            assert_eq!(r.status, code, "{path}");
            assert_eq!(r.header("location"), Some(location), "{path}");
        }
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="3xx"}"#, 4.0)
            .await;
    }
);

const DIRECT: &str = "version: 1
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
          - match: { path: /health }
            direct_response: { status: 200, body: \"ok\\n\" }
          - match: { path: /json }
            direct_response:
              status: 201
              body: '{\"a\":1}'
              content_type: application/json
          - match: { path: /empty }
            direct_response: { status: 204 }
          - direct_response: { status: 503, body: maintenance }
";

each_proto!(
    async fn direct_responses(proto) {
        let lg = legate().config(DIRECT).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/health").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "ok\n");
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        assert_eq!(r.header("content-length"), Some("3"));
        let r = c.post("/json").body("ignored").send().await;
        assert_eq!(r.status, 201);
        assert_eq!(r.json()["a"], 1);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let r = c.get("/empty").send().await;
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
        let r = c.get("/anything").send().await;
        assert_eq!(r.status, 503);
        assert_eq!(r.text(), "maintenance");
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="5xx"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="2xx"}"#, 3.0)
            .await;
    }
);

each_proto!(
    async fn a_direct_204_or_304_has_no_body(proto) {
        // A status without content (RFC 9110 §6.4.1) goes without body,
        // `content-length` and `content-type` (a configured body is refused
        // at load: golden direct_response_204_body). A 204 carried the
        // default `content-type` and a length, which HTTP/2 clients reset
        // the stream for when the length was not 0.
        let lg = legate()
            .config(
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
          - match: { prefix: /dr204 }
            direct_response: { status: 204 }
          - match: { prefix: /dr304 }
            direct_response: { status: 304 }
          - direct_response: { status: 200, body: after }
",
            )
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for (path, status) in [("/dr204", 204), ("/dr304", 304)] {
            let r = c.get(path).send().await;
            assert_eq!(r.status, status, "{path}");
            assert!(r.body.is_empty(), "{path}: {:?}", r.text());
            assert_eq!(r.header("content-length"), None, "{path}");
            assert_eq!(r.header("content-type"), None, "{path}");
            // The connection carries the next request.
            assert_eq!(c.get("/next").send().await.text(), "after", "{path}");
        }
        let r = c.request(Method::HEAD, "/dr204").send().await;
        assert_eq!((r.status.as_u16(), r.header("content-length")), (204, None));
    }
);

each_proto!(
    async fn a_host_matcher_reads_the_authority(proto) {
        // HTTP/2 has `:authority` and no `host` field: a `host` matcher reads
        // the authority the virtual host was chosen by, so one matcher routes
        // both protocols (Envoy keeps `host` as `:authority` for both).
        let lg = legate()
            .config(
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
          - match:
              prefix: /h
              headers: [ { name: host, exact: h.test } ]
            direct_response: { status: 200, body: host-matched }
          - match:
              prefix: /h
              headers: [ { name: Host, regex: \"h[.]test:[0-9]+\" } ]
            direct_response: { status: 200, body: host-with-port }
          - direct_response: { status: 200, body: other }
",
            )
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for (host, expected) in [
            ("h.test", "host-matched"),
            ("h.test:8080", "host-with-port"),
            ("other.test", "other"),
        ] {
            let r = c.get("/h").host(host).send().await;
            assert_eq!(r.text(), expected, "{host}");
        }
    }
);

/// A catch-all route to `UPSTREAM`: CONNECT must not reach it.
const CATCH_ALL: &str = "version: 1
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
clusters:
  - name: backend
    endpoints:
      - address: UPSTREAM
";

each_proto!(
    async fn connect_is_refused_before_routing(proto) {
        // No route tunnels CONNECT: 404 `no_route`, as Envoy answers without a
        // `connect_matcher` route, and never forwarded (a 200 from upstream
        // looked like an open tunnel).
        let up = upstream().start().await;
        let lg = legate()
            .config(&CATCH_ALL.replace("UPSTREAM", &up.addr.to_string()))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let target = up.addr.to_string();
        let r = match proto {
            // Authority-form: `CONNECT host:port HTTP/1.1`.
            Proto::H1 => c.request(Method::CONNECT, &target).host(&target),
            // `:method CONNECT`, `:authority` only.
            Proto::H2 => c.request(Method::CONNECT, "").host(&target),
        }
        .send()
        .await;
        assert_eq!(r.status, 404);
        assert_eq!(r.text(), "no_route\n");
        if proto == Proto::H2 {
            // The connection serves the next stream.
            assert_eq!(c.get("/after").send().await.echo().path, "/after");
        } else {
            assert_eq!(r.header("connection"), Some("close"));
        }
        assert_eq!(up.requests.get(), usize::from(proto == Proto::H2));
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="4xx"}"#, 1.0)
            .await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_refused_http1_connect_are_not_a_request() {
    // The client may send tunnel bytes right after its CONNECT: the refusal
    // closes the connection instead of reading them as the next request.
    let up = upstream().start().await;
    let lg = legate()
        .config(&CATCH_ALL.replace("UPSTREAM", &up.addr.to_string()))
        .start();
    let t = up.addr;
    let out = raw(
        lg.addr("web"),
        format!(
            "CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {t}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(raw_status(&out), Some(404), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert_eq!(up.requests.get(), 0);
}

const REWRITES: &str = "version: 1
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
          - match: { prefix: /api/v1/ }
            cluster: backend
            rewrite: { prefix: /v2/ }
          - match: { prefix: /strip/ }
            cluster: backend
            rewrite: { prefix: / }
          - match: { prefix: /users/ }
            cluster: backend
            rewrite:
              regex: { pattern: \"^/users/([0-9]+)/profile$\", substitution: \"/profiles/$1\" }
          - match: { prefix: /dash }
            cluster: backend
            rewrite:
              regex: { pattern: \"-\", substitution: \"_\" }
          - match: { prefix: /host }
            cluster: backend
            rewrite: { host: \"internal.svc:8080\" }
clusters:
  - name: backend
    endpoints:
      - address: UPSTREAM
";

each_proto!(
    async fn path_and_host_rewrites(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&REWRITES.replace("UPSTREAM", &up.addr.to_string()))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for (path, expected) in [
            ("/api/v1/users?page=2", "/v2/users?page=2"),
            ("/strip/a/b", "/a/b"),
            ("/users/42/profile?full=1", "/profiles/42?full=1"),
            ("/users/42/settings", "/users/42/settings"),
            ("/dash/a-b-c?q=x-y", "/dash/a_b_c?q=x-y"),
        ] {
            let e = c.get(path).host("front.example").send().await.echo();
            assert_eq!(e.path, expected, "{path}");
            assert_eq!(e.header("host"), Some("front.example"), "{path}");
        }
        let e = c.get("/host/x").host("front.example").send().await.echo();
        assert_eq!(e.path, "/host/x");
        assert_eq!(e.header_all("host"), vec!["internal.svc:8080"]);
        assert_eq!(e.header("x-forwarded-host"), Some("front.example"));
        assert_eq!(up.requests.get(), 6);
    }
);

each_proto!(
    /// Two route tables with the same virtual host and route names count
    /// apart: a route's series name its table and virtual host too (Envoy
    /// scopes route stats by virtual host). They were one series, counting
    /// both listeners' requests.
    async fn same_named_routes_of_two_tables_count_apart(proto) {
        let table = |name: &str, body: &str| {
            format!(
                "  - name: {name}
    virtual_hosts:
      - name: default
        domains: [\"*\"]
        routes:
          - name: api
            match: {{ prefix: /api }}
            direct_response: {{ status: 200, body: {body} }}
          - direct_response: {{ status: 200, body: {body} }}
"
            )
        };
        let cfg = format!(
            "version: 1
listeners:
  - name: one
    address: 127.0.0.1:0
    http:
      routes: first
  - name: two
    address: 127.0.0.1:0
    http:
      routes: second
routes:
{}{}",
            table("first", "one"),
            table("second", "two")
        );
        let lg = legate().config(&cfg).start();
        for (listener, api, other) in [("one", 1, 2), ("two", 3, 4)] {
            let mut c = client(proto, lg.addr(listener)).await;
            for (path, n) in [("/api", api), ("/x", other)] {
                for _ in 0..n {
                    let r = c.get(path).send().await;
                    assert_eq!(r.status, 200);
                    assert_eq!(r.text(), listener);
                }
            }
        }
        for (table, api, other) in [("first", 1.0, 2.0), ("second", 3.0, 4.0)] {
            let series = |route: &str| {
                format!(
                    "legate_route_requests_total{{route_table=\"{table}\",\
                     virtual_host=\"default\",route=\"{route}\",class=\"2xx\"}}"
                )
            };
            lg.assert_stat(&series("api"), api).await;
            lg.assert_stat(&series("default/1"), other).await;
            let count = format!(
                "legate_route_request_duration_seconds_count{{route_table=\"{table}\",\
                 virtual_host=\"default\",route=\"api\"}}"
            );
            lg.assert_stat(&count, api).await;
        }
        assert_families_documented(&lg.stats().await);
    }
);

each_proto!(
    /// `match.source_ips`: an allow list by client address (nginx's `allow` and
    /// `deny`), the client being the connection's peer or, behind trusted
    /// proxies, the one they reported.
    async fn source_ips_route_by_the_client_address(proto) {
        let up = upstream().start().await;
        let cfg = format!(
            "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http: {{ routes: main, trust_downstream: true, xff_num_trusted_hops: 1 }}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - name: office
            match: {{ prefix: /admin, source_ips: [10.0.0.0/8, \"2001:db8::/32\"] }}
            cluster: backend
          - name: others
            match: {{ prefix: /admin }}
            direct_response: {{ status: 403, body: \"not from here\\n\" }}
          - match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: backend
    endpoints: [{{ address: \"{}\" }}]
",
            up.addr
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        for (xff, status) in [("10.1.2.3", 200), ("2001:db8::7", 200), ("203.0.113.9", 403)] {
            let r = c.get("/admin").header("x-forwarded-for", xff).send().await;
            assert_eq!(r.status, status, "{xff}: {}", r.text());
        }
        // Without a reported client, the peer (127.0.0.1) is the client.
        let r = c.get("/admin").send().await;
        assert_eq!(r.status, 403);
        assert_eq!(r.text(), "not from here\n");
        assert_eq!(up.requests.get(), 2);
    }
);
