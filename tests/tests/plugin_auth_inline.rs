//! plugins/auth, built by `legate plugin build`, in the real host with what needs
//! no callout: a JWT provider with an inline HS256 key (JWKS `oct`) and API keys
//! stored as SHA-256 hashes. The same credentials as the default plugins.yaml demo.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use legate_tests::plugins::plugin_wasm;
use legate_tests::*;

/// HS256 token for `sub: alice`, `iss: https://demo.legate.local`, `aud: demo-api`,
/// `exp: 4102444800` (2100-01-01), signed with the demo secret.
const ALICE: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRlbW8ifQ.eyJpc3MiOiJodHRwczovL2RlbW8ubGVnYXRlLmxvY2FsIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJkZW1vLWFwaSIsImV4cCI6NDEwMjQ0NDgwMH0.7GTghndOWx6suaxU4Im4C-8p7HZSt99dd1r6vphx5PQ";
/// The same claims with `exp: 1700000000` (2023).
const EXPIRED: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRlbW8ifQ.eyJpc3MiOiJodHRwczovL2RlbW8ubGVnYXRlLmxvY2FsIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJkZW1vLWFwaSIsImV4cCI6MTcwMDAwMDAwMH0.rWXDtcjQtyIG_oQoSB6Pz2fxqPVHV5mkFwnEi_0ECoE";
/// [`ALICE`]'s claims signed with another secret.
const FORGED: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRlbW8ifQ.eyJpc3MiOiJodHRwczovL2RlbW8ubGVnYXRlLmxvY2FsIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJkZW1vLWFwaSIsImV4cCI6NDEwMjQ0NDgwMH0.TEDIg6-EUoS6qAiy95sQSqY_uSUHXapnaQHqFNPZDMU";

fn config(up: SocketAddr) -> String {
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
          - match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
plugins:
  - name: auth
    module: {wasm}
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
      api_keys:
        - name: keys
          keys:
            # sha256(\"demo-key\")
            - {{ id: demo, sha256: c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c }}
      rules:
        - match: {{ prefix: /public }}
          public: true
        - match: {{ prefix: / }}
          requires: {{ any: [demo, keys] }}
",
        wasm = plugin_wasm("plugins/auth").display(),
    )
}

each_proto!(
    async fn jwt_and_api_keys_without_callouts(proto) {
        let up = upstream().start().await;
        let lg = legate().config(&config(up.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;

        // No credential: 401 with the challenges of both authenticators; the
        // upstream never sees the request.
        let r = c.get("/api/x").send().await;
        assert_eq!(r.status, 401, "{}", r.text());
        let challenges = r.header_all("www-authenticate").join(", ");
        assert!(challenges.contains("Bearer realm=\"legate\""), "{challenges}");
        assert!(challenges.contains("ApiKey realm=\"legate\""), "{challenges}");
        let body: Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(body["error"], "unauthorized");
        assert_eq!(up.requests.get(), 0);

        // A valid JWT: the subject goes upstream as x-user, a forged one from the
        // client is replaced.
        let r = c
            .get("/api/x")
            .header("authorization", &format!("Bearer {ALICE}"))
            .header("x-user", "mallory")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-user"), Some("alice"));

        // Expired and forged tokens: 401 invalid_token.
        for (what, token) in [("expired", EXPIRED), ("forged", FORGED)] {
            let r = c
                .get("/api/x")
                .header("authorization", &format!("Bearer {token}"))
                .send()
                .await;
            assert_eq!(r.status, 401, "{what}: {}", r.text());
            let challenges = r.header_all("www-authenticate").join(", ");
            assert!(challenges.contains("error=\"invalid_token\""), "{what}: {challenges}");
        }

        // An API key: its id goes upstream, the key itself does not.
        let r = c.get("/api/x").header("x-api-key", "demo-key").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let echo = r.echo();
        assert_eq!(echo.header("x-api-key-id"), Some("demo"));
        assert_eq!(echo.header("x-api-key"), None);
        let r = c.get("/api/x").header("x-api-key", "wrong").send().await;
        assert_eq!(r.status, 401, "{}", r.text());

        // A public path needs nothing.
        let r = c.get("/public/x").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(up.requests.get(), 3);
    }
);

/// A browser's CORS preflight for `GET /api/x` with `authorization`, and a
/// forged identity header.
async fn preflight(c: &mut Client) -> Resp {
    c.request(Method::OPTIONS, "/api/x")
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .header("x-user", "mallory")
        .send()
        .await
}

each_proto!(
    /// A browser's CORS preflight carries no credential, so without
    /// `bypass_cors_preflight` auth answers it 401 and the browser never sends
    /// the real call; with it, the preflight reaches the upstream (which
    /// answers CORS), as behind Envoy's jwt_authn with the option of that name.
    async fn cors_preflights_reach_the_upstream_with_bypass_cors_preflight(proto) {
        let up = upstream().start().await;
        let checked = config(up.addr);
        let yaml = checked.replace(
            "    config:\n      providers:",
            "    config:\n      bypass_cors_preflight: true\n      providers:",
        );
        assert_ne!(yaml, checked);

        let lg = legate().config(&checked).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = preflight(&mut c).await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(up.requests.get(), 0);

        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = preflight(&mut c).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let echo = r.echo();
        assert_eq!(echo.header("access-control-request-method"), Some("GET"));
        assert_eq!(echo.header("x-user"), None, "a forged identity is removed");
        assert_eq!(up.requests.get(), 1);
        // The real call still needs its credential.
        let r = c.get("/api/x").header("origin", "https://app.example.com").send().await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(
            r#"legate_plugin_auth_decisions_total{plugin="auth",result="cors_preflight"}"#,
            1.0,
        )
        .await;
    }
);

/// A config auth refuses is told at the key its message names, as the
/// schema's own errors are: `legate check` prints `FILE:LINE:COL` of that key
/// and quotes its line. Before, auth's checks said `providers[0].issuer: ...`,
/// a form the host does not read, so every such error was placed at the
/// plugin's `config:` key, however deep the mistake was.
#[test]
fn a_config_auth_refuses_is_placed_at_the_key_it_names() {
    let good = config("127.0.0.1:9".parse().unwrap());
    let dir = TempDir::new();
    for (from, to, key, want) in [
        (
            "issuer: https://demo.legate.local",
            "issuer: \"\"",
            "issuer",
            "invalid config: field `providers[0].issuer`: must not be empty",
        ),
        (
            "requires: { any: [demo, keys] }",
            "requires: { any: [demo, kyes] }",
            "kyes",
            "invalid config: field `rules[1].requires.any[1]`: no provider, api_keys or basic \
             entry is named \"kyes\"",
        ),
        (
            "kty: oct, kid: demo, alg: HS256, k: bGVnYXRlLWRlbW8tc2VjcmV0LW5vdC1mb3ItcHJvZHVjdGlvbiEh",
            "kty: oct, kid: demo, alg: HS256, k: c2hvcnQ",
            "{ kty",
            "invalid config: field `providers[0].jwks.keys[0]`: HS256 secret is 5 bytes",
        ),
        (
            // A cluster the plugin is not granted (capabilities.clusters):
            // refused at load, with what to grant, not 503 per request.
            "      rules:\n",
            "      ext_authz: { cluster: backend, path: /check }\n      rules:\n",
            "cluster: backend",
            "invalid config: field `ext_authz.cluster`: this plugin may not call cluster \
             `backend` (cluster `backend` is not granted to plugin `auth`: add it to the \
             plugin's `capabilities.clusters`)",
        ),
    ] {
        assert!(good.contains(from), "{from}");
        let bad = good.replace(from, to);
        let want = format!("plugin `auth`: configure failed: {want}");
        assert_check_places(&dir, &bad, to.lines().next().unwrap_or(to), key, &want);
    }
}

/// [`config`] with routes that skip the plugin (`/open`) or run it with
/// another config that writes another identity header (`/other`).
fn config_with_route_overrides(up: SocketAddr) -> String {
    config(up).replace(
        "        routes:
          - match: { prefix: / }
            cluster: backend
",
        "        routes:
          - match: { prefix: /open }
            cluster: backend
            filters: { auth: { disabled: true } }
          - match: { prefix: /other }
            cluster: backend
            filters:
              auth:
                config:
                  api_keys:
                    - name: team
                      id_header: x-team
                      # sha256(\"demo-key\")
                      keys: [{ id: team-demo, sha256: c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c }]
          - match: { prefix: / }
            cluster: backend
",
    )
}

each_proto!(
    async fn identity_headers_are_removed_on_routes_that_skip_or_override_the_plugin(proto) {
        let up = upstream().start().await;
        let cfg = config_with_route_overrides(up.addr);
        assert!(cfg.contains("/open"), "the route overrides are in the config");
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let forged = [
            ("x-user", "admin"),
            ("x_user", "admin"),
            ("x-api-key-id", "admin"),
            ("x_api_key_id", "admin"),
            ("x-team", "admin"),
        ];
        // The plugin does not run on /open, and /other runs a config that
        // writes only x-team: every identity header any of the listener's
        // auth configs writes is still removed, in both spellings.
        for (path, key) in [("/open/a", None), ("/other/a", Some("demo-key")), ("/public/a", None)] {
            let mut req = c.get(path).header("x-keep", "1");
            for (n, v) in forged {
                req = req.header(n, v);
            }
            if let Some(k) = key {
                req = req.header("x-api-key", k);
            }
            let r = req.send().await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            let e = r.echo();
            for (n, _) in forged {
                let want = (path == "/other/a" && n == "x-team").then_some("team-demo");
                assert_eq!(e.header(n), want, "{path}: {n}");
            }
            assert_eq!(e.header("x-keep"), Some("1"), "{path}");
        }
        // Where the listener's config runs, its identity is the one written.
        let r = c
            .get("/api/x")
            .header("x-api-key", "demo-key")
            .header("x-api-key-id", "admin")
            .header("x-team", "admin")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header_all("x-api-key-id"), vec!["demo"]);
        assert_eq!(r.echo().header("x-team"), None);
    }
);
