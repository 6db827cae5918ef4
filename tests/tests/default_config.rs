//! The default config, `plugins.yaml` at the repository root, so it cannot rot:
//! it parses and validates as is, and — with its plugins built from source, its
//! addresses made ephemeral and its upstreams replaced by test upstreams — it
//! answers the way the README's quick start says (200, 401, 429, ...), over
//! HTTP/1.1 and HTTP/2.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use legate_tests::*;

/// The demo JWT (`sub: alice`, expires 2100), as in the README.
const ALICE: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImRlbW8ifQ.eyJpc3MiOiJodHRwczovL2RlbW8ubGVnYXRlLmxvY2FsIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJkZW1vLWFwaSIsImV4cCI6NDEwMjQ0NDgwMH0.7GTghndOWx6suaxU4Im4C-8p7HZSt99dd1r6vphx5PQ";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn default_config() -> String {
    std::fs::read_to_string(root().join("plugins.yaml")).unwrap()
}

/// `text` with `from` replaced by `to`, failing if `from` is not there: a change
/// to plugins.yaml must update this test, not silently skip a substitution.
fn subst(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "plugins.yaml no longer contains `{from}`; update tests/tests/default_config.rs"
    );
    text.replace(from, to)
}

#[test]
fn parses_and_validates_as_is() {
    legate_host::config::parse_str("plugins.yaml", &default_config(), &root())
        .unwrap_or_else(|e| panic!("plugins.yaml is invalid:\n{e}"));
}

/// `legate-demo-upstream` on an ephemeral port; killed when dropped.
struct DemoUpstream {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl DemoUpstream {
    fn start(name: &str) -> Self {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(workspace_bin("legate-demo-upstream"))
            .args(["--listen", "127.0.0.1:0", "--name", name, "--threads", "1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // It prints `listening on ADDR` once bound.
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("legate-demo-upstream said {line:?}"))
            .parse()
            .unwrap();
        DemoUpstream { child, addr }
    }
}

impl Drop for DemoUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// plugins.yaml made runnable in a test: ephemeral listener and admin
/// addresses, the test upstreams, and a rate-limit namespace of its own (tests
/// may share one process and so its in-memory KV store), named by `proto` and
/// `test`. The plugins are the ones embedded in the host (`builtin:NAME`).
fn runnable(
    mut yaml: String,
    proto: Proto,
    test: &str,
    v1: &UpstreamHandle,
    v2: &UpstreamHandle,
    grpc: &DemoUpstream,
) -> String {
    yaml = subst(&yaml, "127.0.0.1:8080", "127.0.0.1:0");
    yaml = subst(&yaml, "127.0.0.1:9901", "127.0.0.1:0");
    yaml = subst(&yaml, "127.0.0.1:8081", &v1.addr.to_string());
    yaml = subst(&yaml, "127.0.0.1:8082", &v2.addr.to_string());
    yaml = subst(&yaml, "127.0.0.1:8083", &grpc.addr.to_string());
    let ns = format!("ratelimit-{test}-{proto:?}").to_lowercase();
    yaml = subst(&yaml, "kv: [ratelimit]", &format!("kv: [{ns}]"));
    subst(&yaml, "namespace: ratelimit", &format!("namespace: {ns}"))
}

each_proto!(
    async fn answers_as_the_readme_says(proto) {
        let v1 = upstream().name("app-v1").start().await;
        let v2 = upstream().name("app-v2").start().await;
        // The demo's own gRPC upstream, the binary scripts/demo.sh runs.
        let grpc = DemoUpstream::start("grpc");
        let yaml = runnable(default_config(), proto, "readme", &v1, &v2, &grpc);
        let lg = legate().config(&yaml).base_dir(root()).start();
        let mut c = client(proto, lg.addr("web")).await;

        // Public paths need no credential.
        let r = c.get("/healthz").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = c.get("/hello").send().await;
        assert_eq!(r.status, 200, "{}", r.text());

        // gRPC-Web (as the README's printf line sends it): the message comes back,
        // and the gRPC trailers in the body's last frame.
        let framed = b"\0\0\0\0\x07\x0a\x05hello";
        let r = c
            .post("/legate.demo.v1.Echo/Say")
            .header("content-type", "application/grpc-web+proto")
            .body(&framed[..])
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc-web+proto"));
        assert!(r.body.starts_with(framed), "{:?}", r.body);
        let trailer = &r.body[framed.len()..];
        assert_eq!(trailer.first(), Some(&0x80), "{:?}", r.body);
        assert!(
            String::from_utf8_lossy(trailer).contains("grpc-status: 0\r\n"),
            "{:?}",
            r.body
        );

        // REST/JSON, transcoded to the same gRPC method and back (the README's line).
        let r = c.get("/v1/echo/hello").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body: Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(body, serde_json::json!({ "message": "hello" }));
        let r = c
            .post("/v1/echo")
            .header("content-type", "application/json")
            .body(r#"{"message": "posted"}"#)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let body: Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(body["message"], "posted");

        // CORS from the demo web origin: grpc-web answers the preflight of
        // its gRPC-Web route. Not on the REST route, whose JSON answers carry
        // no CORS headers (grpc-web leaves them alone): a browser must not
        // pass a preflight for a call it would then be refused; the
        // preflight goes upstream as any request there.
        let origin = "http://localhost:3000";
        for (path, grpc_web) in [("/legate.demo.v1.Echo/Say", true), ("/v1/echo", false)] {
            let r = c
                .request(Method::OPTIONS, path)
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "content-type")
                .send()
                .await;
            if grpc_web {
                assert_eq!(r.status, 204, "{}", r.text());
                assert_eq!(r.header("access-control-allow-origin"), Some(origin));
            } else {
                assert_eq!(r.header("access-control-allow-origin"), None, "{}", r.text());
                assert_eq!(r.echo().method, "OPTIONS");
            }
        }

        // /api/ without a credential: 401, nothing upstream, no token spent.
        let before = v1.requests.get() + v2.requests.get();
        let r = c.get("/api/users").send().await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(r.header("www-authenticate").is_some());
        assert_eq!(v1.requests.get() + v2.requests.get(), before);

        // With the API key, then the JWT: 200, identity upstream, quota counting down.
        let r = c.get("/api/users").header("x-api-key", "demo-key").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-api-key-id"), Some("demo"));
        assert_eq!(r.header("ratelimit-limit"), Some("5"));
        assert_eq!(r.header("ratelimit-remaining"), Some("4"));
        let r = c
            .get("/api/users")
            .header("authorization", &format!("Bearer {ALICE}"))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-user"), Some("alice"));
        assert_eq!(r.header("ratelimit-remaining"), Some("3"));

        // Five a minute per client IP: the sixth is 429.
        for left in ["2", "1", "0"] {
            let r = c.get("/api/users").header("x-api-key", "demo-key").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("ratelimit-remaining"), Some(left));
        }
        let r = c.get("/api/users").header("x-api-key", "demo-key").send().await;
        assert_eq!(r.status, 429, "{}", r.text());
        assert!(r.header("retry-after").is_some());
        let body: Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["limit"], "api-per-ip");

        assert_families_documented(&lg.stats().await);
    }
);

/// examples/demo-upstream/echo.pb, the descriptor set plugins.yaml gives the
/// grpc-json plugin, is the compiled examples/demo-upstream/proto. After
/// changing the .proto, regenerate it with
/// `BLESS=1 cargo test -p legate-tests --test default_config`.
#[test]
fn the_demo_descriptor_set_is_current() {
    let path = root().join("examples/demo-upstream/echo.pb");
    if std::env::var_os("BLESS").is_some_and(|v| !v.is_empty() && v != "0") {
        std::fs::write(&path, legate_tests::grpc::DEMO_DESCRIPTOR_SET).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == legate_tests::grpc::DEMO_DESCRIPTOR_SET,
        "{} is not the compiled examples/demo-upstream/proto; regenerate it with \
         `BLESS=1 cargo test -p legate-tests --test default_config`",
        path.display()
    );
}

each_proto!(
    /// The chain's order: auth (and ratelimit) run before grpc-json rewrites a
    /// REST request into its gRPC call, so an auth rule written for a REST
    /// path applies to it. With grpc-json first, `GET /v1/echo/hello` reached
    /// auth as `POST /legate.demo.v1.Echo/Say`, fell through to the public `/`
    /// rule and was served without a credential.
    async fn auth_rules_for_rest_paths_hold_before_transcoding(proto) {
        let v1 = upstream().name("app-v1").start().await;
        let v2 = upstream().name("app-v2").start().await;
        let grpc = DemoUpstream::start("grpc");
        // plugins.yaml, with the REST API behind the `/api/` credentials.
        let public = "        - match: { prefix: / }\n          public: true\n";
        let rest = "        - match: { prefix: /v1/echo }\n          requires: { any: [demo, keys] }\n";
        let yaml = subst(&default_config(), public, &format!("{rest}{public}"));
        let yaml = runnable(yaml, proto, "rest", &v1, &v2, &grpc);
        let lg = legate().config(&yaml).base_dir(root()).start();
        let mut c = client(proto, lg.addr("web")).await;

        // No credential: refused, nothing transcoded or sent upstream.
        let r = c.get("/v1/echo/hello").send().await;
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(r.header("www-authenticate").is_some());
        let r = c
            .post("/v1/echo")
            .header("content-type", "application/json")
            .body(r#"{"message": "posted"}"#)
            .send()
            .await;
        assert_eq!(r.status, 401, "{}", r.text());

        // With the API key, then the JWT: transcoded and answered.
        let r = c
            .get("/v1/echo/hello")
            .header("x-api-key", "demo-key")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body: Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(body, serde_json::json!({ "message": "hello" }));
        let r = c
            .post("/v1/echo")
            .header("content-type", "application/json")
            .header("authorization", &format!("Bearer {ALICE}"))
            .body(r#"{"message": "posted"}"#)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let body: Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(body["message"], "posted");
    }
);
