//! CORS policies on virtual hosts and routes, with a real upstream, over HTTP/1.1
//! and HTTP/2: Legate answers preflights from allowed origins itself (before
//! the filters), adds the allow headers to other responses, and leaves requests
//! from other origins alone.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use legate_tests::plugins::plugin_wasm;
use legate_tests::*;

/// Virtual host `all` with a CORS policy for `https://app.example` (and any
/// `https://*.example.org`), and a route `/public` whose own policy allows any
/// origin, without credentials.
fn config(up: std::net::SocketAddr) -> String {
    format!(
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
        cors:
          allow_origins: [{{ exact: \"https://app.example\" }}, {{ regex: \"https://[a-z]+\\\\.example\\\\.org\" }}]
          allow_methods: [GET, PUT, DELETE]
          allow_headers: [authorization, content-type]
          expose_headers: [x-request-id]
          max_age: 10m
          allow_credentials: true
        routes:
          - match: {{ prefix: /public }}
            cluster: backend
            cors: {{ allow_origins: [{{ exact: \"*\" }}] }}
          - match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
"
    )
}

each_proto!(
    async fn a_preflight_from_an_allowed_origin_is_answered_by_legate(proto) {
        let up = upstream().route("/", echo).start().await;
        let lg = legate().config(&config(up.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .request(Method::OPTIONS, "/api/items/7")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "PUT")
            .header("access-control-request-headers", "authorization")
            .send()
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example"));
        assert_eq!(r.header("access-control-allow-methods"), Some("GET, PUT, DELETE"));
        assert_eq!(r.header("access-control-allow-headers"), Some("authorization, content-type"));
        assert_eq!(r.header("access-control-max-age"), Some("600"));
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
        assert_eq!(r.header("vary"), Some("origin"));
        assert_eq!(up.requests.get(), 0, "answered by Legate");

        // From an origin not allowed: passed on, as Envoy does (the browser
        // then refuses the answer, which carries no allow headers).
        let r = c
            .request(Method::OPTIONS, "/api/items/7")
            .header("origin", "https://evil.example")
            .header("access-control-request-method", "PUT")
            .send()
            .await;
        assert_eq!(r.header("access-control-allow-origin"), None);
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(
            r#"legate_route_requests_total{route_table="main",virtual_host="all",route="all/1",class="2xx"}"#,
            2.0,
        )
        .await;
    }
);

each_proto!(
    async fn responses_to_allowed_origins_carry_the_allow_headers(proto) {
        let up = upstream().route("/", echo).start().await;
        let lg = legate().config(&config(up.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/api").header("origin", "https://shop.example.org").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("access-control-allow-origin"), Some("https://shop.example.org"));
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
        assert_eq!(r.header("access-control-expose-headers"), Some("x-request-id"));
        assert_eq!(r.header("vary"), Some("origin"));
        // The request itself went upstream with its origin.
        assert_eq!(r.echo().header("origin"), Some("https://shop.example.org"));
        // Another origin, or none: nothing added.
        for origin in [Some("https://evil.example"), None] {
            let mut req = c.get("/api");
            if let Some(o) = origin {
                req = req.header("origin", o);
            }
            let r = req.send().await;
            assert_eq!(r.header("access-control-allow-origin"), None, "{origin:?}");
            // A cache must not serve this answer to an allowed origin.
            assert_eq!(r.header("vary"), Some("origin"), "{origin:?}");
        }
        // The route's own policy replaces the virtual host's: any origin,
        // no credentials, nothing exposed.
        let r = c.get("/public/x").header("origin", "https://evil.example").send().await;
        assert_eq!(r.header("access-control-allow-origin"), Some("https://evil.example"));
        // Not the `null` origin of sandboxed frames, though.
        let r = c.get("/public/x").header("origin", "null").send().await;
        assert_eq!(r.header("access-control-allow-origin"), None);
        assert_eq!(r.header("access-control-allow-credentials"), None);
        assert_eq!(r.header("access-control-expose-headers"), None);
    }
);

each_proto!(
    /// The preflight is answered before the filters: an authentication plugin
    /// that refuses every request without a key does not see it, while the
    /// actual request it refuses still gets the allow headers (so the browser
    /// can show the 401 to the page).
    async fn a_preflight_is_answered_before_authentication(proto) {
        let up = upstream().route("/", echo).start().await;
        let cfg = config(up.addr)
            .replace(
                "      routes: main\n",
                "      routes: main\n      filters: [{ plugin: auth }]\n",
            )
            + &format!(
                "plugins:
  - name: auth
    module: {}
    config:
      api_keys:
        - name: keys
          keys:
            - {{ id: demo, sha256: c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c }}
      rules:
        - match: {{ prefix: / }}
          requires: {{ any: [keys] }}
",
                plugin_wasm("plugins/auth").display()
            );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .request(Method::OPTIONS, "/api")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "DELETE")
            .send()
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example"));
        let r = c.get("/api").header("origin", "https://app.example").send().await;
        assert_eq!(r.status, 401);
        assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example"));
        assert_eq!(up.requests.get(), 0);
    }
);
