//! Request path normalization (listener `http.normalize_path`, `merge_slashes`,
//! `path_with_escaped_slashes`): routes, filters and the upstream see the one
//! normalized path, so `/public/../admin` is `/admin` to all of them; paths that
//! cannot be normalized are refused with 400 and counted.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use legate_tests::*;

/// `http:` settings beyond `routes`, then the upstream's address.
fn config(http: &str, up: SocketAddr) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http: {{ routes: main{http} }}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - name: admin
            match: {{ path: /admin }}
            cluster: backend
            request_headers: {{ set: {{ x-route: admin }} }}
          - name: public
            match: {{ prefix: /public }}
            cluster: backend
            request_headers: {{ set: {{ x-route: public }} }}
          - name: api
            match: {{ prefix: /api/ }}
            cluster: backend
            request_headers: {{ set: {{ x-route: api }} }}
          - name: other
            cluster: backend
            request_headers: {{ set: {{ x-route: other }} }}
clusters:
  - name: backend
    endpoints: [{{ address: {up} }}]
"
    )
}

const REJECTED: &str = r#"legate_listener_paths_rejected_total{listener="web"}"#;

/// The route the request took and the path (with query) the upstream saw.
async fn routed(c: &mut Client, path: &str) -> (String, String) {
    let r = c.get(path).send().await;
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    let echo = r.echo();
    (echo.header("x-route").unwrap().to_string(), echo.path)
}

each_proto!(
    async fn dot_segments_and_unreserved_escapes_are_normalized(proto) {
        let up = upstream().start().await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let cfg = config("", up.addr).replace(
            "version: 1\n",
            &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let cases = [
            ("/public/../admin", "admin", "/admin"),
            ("/public/./../admin?x=/../y", "admin", "/admin?x=/../y"),
            ("/public/%2e%2E/admin", "admin", "/admin"),
            ("/%61dmin", "admin", "/admin"),
            ("/../../admin", "admin", "/admin"),
            ("/a/./b/../c", "other", "/a/c"),
            ("/public/%7euser%3f", "public", "/public/~user%3F"),
            ("/public/index.html", "public", "/public/index.html"),
            // A backslash is a separator (Envoy's, IIS's, WHATWG URL parsers').
            ("/public\\..\\admin", "admin", "/admin"),
            ("/api\\x", "api", "/api/x"),
        ];
        for (sent, route, seen) in cases {
            assert_eq!(routed(&mut c, sent).await, (route.into(), seen.into()), "{sent}");
        }
        // The access log shows the path as routed (Envoy's `:path`), not as sent.
        let lines = access_log_until(&log, "every request's line", |l| l.len() >= cases.len()).await;
        let mut logged: Vec<&str> = lines.iter().map(|l| l["path"].as_str().unwrap()).collect();
        let mut want: Vec<&str> = cases.iter().map(|c| c.2).collect();
        logged.sort_unstable();
        want.sort_unstable();
        assert_eq!(logged, want);
        if proto == Proto::H1 {
            // Absolute-form keeps its authority; `OPTIONS *` has no path to normalize.
            let (route, seen) = routed(&mut c, "http://example.com/public/../admin").await;
            assert_eq!((route.as_str(), seen.as_str()), ("admin", "/admin"));
            let r = c.request(Method::OPTIONS, "*").send().await;
            assert_ne!(r.status, 400, "{}", r.text());
        }
        lg.assert_stat(REJECTED, 0.0).await;
    }
);

each_proto!(
    async fn normalize_path_off_passes_the_path_as_sent(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&config(", normalize_path: false, merge_slashes: true", up.addr))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let (route, seen) = routed(&mut c, "/public/../admin").await;
        assert_eq!((route.as_str(), seen.as_str()), ("public", "/public/../admin"));
        let (route, seen) = routed(&mut c, "/%zz/%61").await;
        assert_eq!((route.as_str(), seen.as_str()), ("other", "/%zz/%61"));
        let (route, seen) = routed(&mut c, "/public\\..\\admin").await;
        assert_eq!((route.as_str(), seen.as_str()), ("public", "/public\\..\\admin"));
        // Merging slashes alone still applies.
        let (route, seen) = routed(&mut c, "//public//../x").await;
        assert_eq!((route.as_str(), seen.as_str()), ("public", "/public/../x"));
        lg.assert_stat(REJECTED, 0.0).await;
    }
);

each_proto!(
    async fn bad_escapes_are_400(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&config("", up.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        for path in ["/public/%zz", "/admin%00.png", "/a%2"] {
            let r = c.get(path).send().await;
            assert_eq!(r.status, 400, "{path}: {}", r.text());
            if proto == Proto::H1 {
                // A fresh connection after the 400 (HTTP/1.1 closes it).
                c = client(proto, lg.addr("web")).await;
            }
        }
        assert_eq!(up.requests.get(), 0);
        lg.assert_stat(REJECTED, 3.0).await;
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="4xx"}"#,
            3.0,
        )
        .await;
    }
);

each_proto!(
    async fn escaped_slashes_in_each_mode(proto) {
        let up = upstream().start().await;

        // keep (default): not a separator; hex made upper-case.
        let lg = legate().config(&config("", up.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let (route, seen) = routed(&mut c, "/public%2f..%2Fadmin").await;
        assert_eq!((route.as_str(), seen.as_str()), ("public", "/public%2F..%2Fadmin"));
        let (route, seen) = routed(&mut c, "/api%2fx").await;
        assert_eq!((route.as_str(), seen.as_str()), ("other", "/api%2Fx"));
        lg.assert_stat(REJECTED, 0.0).await;
        drop(lg);

        // reject: 400, counted.
        let lg = legate()
            .config(&config(", path_with_escaped_slashes: reject", up.addr))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/public%2F..%2Fadmin").send().await;
        assert_eq!(r.status, 400, "{}", r.text());
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/api%5cx").send().await;
        assert_eq!(r.status, 400, "{}", r.text());
        lg.assert_stat(REJECTED, 2.0).await;
        drop(lg);

        // unescape: decoded, then normalized like any `/`.
        let lg = legate()
            .config(&config(", path_with_escaped_slashes: unescape", up.addr))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let (route, seen) = routed(&mut c, "/public%2F..%2Fadmin").await;
        assert_eq!((route.as_str(), seen.as_str()), ("admin", "/admin"));
        let (route, seen) = routed(&mut c, "/api%2fx").await;
        assert_eq!((route.as_str(), seen.as_str()), ("api", "/api/x"));
        let (route, seen) = routed(&mut c, "/public%5C..%5cadmin").await;
        assert_eq!((route.as_str(), seen.as_str()), ("admin", "/admin"));
        lg.assert_stat(REJECTED, 0.0).await;
    }
);

each_proto!(
    async fn merge_slashes_on_and_off(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&config("", up.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        // Off (default): `//api/x` is not under `/api/`.
        let (route, seen) = routed(&mut c, "//api///x").await;
        assert_eq!((route.as_str(), seen.as_str()), ("other", "//api///x"));
        drop(lg);

        let lg = legate()
            .config(&config(", merge_slashes: true", up.addr))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let (route, seen) = routed(&mut c, "//api///x?q=a//b").await;
        assert_eq!((route.as_str(), seen.as_str()), ("api", "/api/x?q=a//b"));
        let (route, seen) = routed(&mut c, "/public//..//admin").await;
        assert_eq!((route.as_str(), seen.as_str()), ("admin", "/admin"));
    }
);

/// HS256 token for `sub: alice`, `iss: https://demo.legate.local`, `aud: demo-api`,
/// `exp: 4102444800` (2100-01-01), signed with the demo secret (as
/// plugin_auth_inline.rs).
const ALICE: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRlbW8ifQ.eyJpc3MiOiJodHRwczovL2RlbW8ubGVnYXRlLmxvY2FsIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJkZW1vLWFwaSIsImV4cCI6NDEwMjQ0NDgwMH0.7GTghndOWx6suaxU4Im4C-8p7HZSt99dd1r6vphx5PQ";

fn auth_config(up: SocketAddr) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: auth }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - cluster: backend
clusters:
  - name: backend
    endpoints: [{{ address: {up} }}]
plugins:
  - name: auth
    module: builtin:auth
    limits: {{ cpu: 500ms }}
    config:
      providers:
        - name: demo
          issuer: https://demo.legate.local
          audiences: [demo-api]
          jwks:
            keys:
              - {{ kty: oct, kid: demo, alg: HS256, k: bGVnYXRlLWRlbW8tc2VjcmV0LW5vdC1mb3ItcHJvZHVjdGlvbiEh }}
          claim_to_headers:
            - {{ claim: sub, header: x-user }}
      rules:
        - {{ match: {{ prefix: /public }}, public: true }}
        - {{ match: {{ prefix: / }}, requires: {{ any: [demo] }} }}
"
    )
}

each_proto!(
    async fn auth_plugin_sees_the_normalized_path(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&auth_config(up.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        assert_eq!(c.get("/public/x").send().await.status, 200);
        for path in ["/public/../admin", "/public/%2e%2e/admin"] {
            let r = c.get(path).send().await;
            assert_eq!(r.status, 401, "{path}: {}", r.text());
        }
        assert_eq!(up.requests.get(), 1);
        let r = c
            .get("/public/../admin")
            .header("authorization", &format!("Bearer {ALICE}"))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let echo = r.echo();
        assert_eq!(echo.path, "/admin");
        assert_eq!(echo.header("x-user"), Some("alice"));
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="4xx"}"#,
            2.0,
        )
        .await;
    }
);
