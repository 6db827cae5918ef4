//! plugins/grpc-json, built by `legate plugin build`, in the real host between
//! REST/JSON clients and a real tonic gRPC server over HTTP/2
//! (`legate_tests::grpc`), over HTTP/1.1 and HTTP/2 downstream. The rules are
//! the `google.api.http` options of tests/proto, read from the compiled
//! descriptor set granted to the plugin under `files:`.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use legate_tests::grpc::{file_descriptor_set_path, grpc_upstream, GrpcUpstreamHandle};
use legate_tests::plugins::plugin_wasm;
use legate_tests::*;
use serde_json::json;

/// Listener `web`: `/plain/*` to a plain HTTP echo upstream, the rest to the
/// gRPC server (h2 prior knowledge), all through the transcoder. The
/// transcoded path (`/legate.test.v1.Echo/...`) is routed like any gRPC call.
fn config(grpc: SocketAddr, echo: SocketAddr) -> String {
    config_with(
        grpc,
        echo,
        &plugin_wasm("plugins/grpc-json").display().to_string(),
        "[legate.test.v1.Echo]",
    )
}

/// [`config`] with another `module` and `services`.
fn config_with(grpc: SocketAddr, echo: SocketAddr, module: &str, services: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: transcoder }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: /plain/ }}
            cluster: echo
          - match: {{ prefix: / }}
            cluster: grpc
clusters:
  - name: grpc
    protocol: h2
    endpoints:
      - address: {grpc}
  - name: echo
    endpoints:
      - address: {echo}
plugins:
  - name: transcoder
    module: {module}
    limits: {{ cpu: 500ms }}
    files: {{ descriptors: {fds} }}
    config:
      services: {services}
      ignored_query_parameters: [access_token]
",
        fds = file_descriptor_set_path().display(),
    )
}

struct Setup {
    lg: LegateHandle,
    grpc: GrpcUpstreamHandle,
    echo: UpstreamHandle,
}

async fn setup() -> Setup {
    let grpc = grpc_upstream().start().await;
    let echo = upstream().start().await;
    let lg = legate().config(&config(grpc.addr, echo.addr)).start();
    Setup { lg, grpc, echo }
}

/// `legate_plugin_grpc_json_requests_total{result="..."}` on /stats.
async fn requests(lg: &LegateHandle, result: &str) -> Option<f64> {
    let stats = lg.stats().await;
    parse_prometheus(&stats)
        .into_iter()
        .find(|(k, _)| {
            k.starts_with("legate_plugin_grpc_json_requests_total{")
                && k.contains(&format!("result=\"{result}\""))
        })
        .map(|(_, v)| v)
}

/// The response is plain JSON, ended without HTTP trailers.
fn is_json(r: &Resp) {
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{}",
        r.text()
    );
    assert!(
        r.trailers.as_ref().is_none_or(|t| t.is_empty()),
        "HTTP trailers: {:?}",
        r.trailers
    );
}

each_proto!(
    async fn get_with_path_variable_and_query_is_transcoded(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        let r = c.get("/v1/echo/hello%20there?access_token=x").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        is_json(&r);
        let v = r.json();
        assert_eq!(v["message"], "hello there");
        // What the gRPC server saw: a gRPC request.
        assert_eq!(v["metadata"]["content-type"], "application/grpc");
        assert_eq!(v["metadata"]["te"], "trailers");

        // Reflect answers with the message it received: nested path
        // template, repeated and typed query parameters.
        let r = c
            .get("/v1/shelves/s1/books/b2?tags=a&tags=b%20c&big=12&flag=true&kind=KIND_BOOK&inner.n=3")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        is_json(&r);
        assert_eq!(
            r.json(),
            json!({
                "name": "shelves/s1/books/b2",
                "tags": ["a", "b c"],
                "big": "12",
                "flag": true,
                "kind": "KIND_BOOK",
                "inner": {"n": 3},
            })
        );
        // response_body: only the `tags` field is printed.
        let r = c.get("/v1/tags/n?tags=x&tags=y").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!(["x", "y"]));
        assert_eq!(s.grpc.calls.get(), 3);
        assert_eq!(requests(&s.lg, "ok").await, Some(3.0));
    }
);

each_proto!(
    async fn post_with_json_body_is_transcoded(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        let r = c
            .post("/v1/echo")
            .header("content-type", "application/json")
            .body(r#"{"message": "über JSON"}"#)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        is_json(&r);
        assert_eq!(r.json()["message"], "über JSON");

        // body: "inner", with {inner.id} from the path and a custom verb.
        let r = c
            .post("/v1/reflect/from-path:run")
            .body(r#"{"id": "from-body", "n": 7}"#)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!({"inner": {"id": "from-path", "n": 7}}));
        assert_eq!(requests(&s.lg, "ok").await, Some(2.0));
    }
);

each_proto!(
    async fn grpc_errors_map_to_http_statuses_with_a_json_body(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        for (code, http) in [(5, 404), (7, 403), (14, 503), (3, 400), (16, 401)] {
            let r = c
                .post("/v1/fail")
                .body(format!(r#"{{"code": {code}, "message": "failed: {code}?"}}"#))
                .send()
                .await;
            assert_eq!(r.status, http, "code {code}: {}", r.text());
            is_json(&r);
            assert_eq!(
                r.json(),
                json!({"code": code, "message": format!("failed: {code}?")})
            );
        }
        // GET binding of the same method: the code from the path.
        let r = c.get("/v1/fail/8").send().await;
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json()["code"], 8);
        assert_eq!(s.grpc.calls.get(), 6);
        assert_eq!(requests(&s.lg, "grpc_error").await, Some(6.0));
    }
);

each_proto!(
    async fn server_streaming_replies_are_a_json_array(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        let r = c.get("/v1/count/3?from=1&delay_ms=20").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        is_json(&r);
        assert_eq!(r.json(), json!([{"n": 1}, {"n": 2}, {"n": 3}]));
        let r = c.get("/v1/count/0").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!([]));

        // An error after replies: the 200 is gone already, so the array is
        // closed and the status stays in the trailers (when the client
        // takes trailers: HTTP/2 always).
        let r = c
            .get("/v1/count/2?from=1&fail_code=5&fail_message=gone")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!([{"n": 1}, {"n": 2}]));
        if proto == Proto::H2 {
            let t = r.trailers.as_ref().expect("trailers");
            assert_eq!(t.get("grpc-status").map(|v| v.as_bytes()), Some(&b"5"[..]));
        }
        assert_eq!(s.grpc.calls.get(), 3);
        assert_eq!(requests(&s.lg, "ok").await, Some(2.0));
        assert_eq!(requests(&s.lg, "grpc_error").await, Some(1.0));
    }
);

each_proto!(
    /// A client that takes trailers (`te: trailers`) gets a failed stream's
    /// status after the array, HTTP/1.1 included: the JSON head declares the
    /// trailers (`trailer: grpc-status, grpc-message`), which hyper's HTTP/1.1
    /// server writes only when declared.
    async fn a_failed_stream_keeps_its_status_for_clients_that_take_trailers(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        let r = c
            .get("/v1/count/2?from=1&fail_code=5&fail_message=gone")
            .header("te", "trailers")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json(), json!([{"n": 1}, {"n": 2}]));
        assert_eq!(r.trailer("grpc-status"), Some("5"), "{:?}", r.trailers);
        assert_eq!(r.trailer("grpc-message"), Some("gone"), "{:?}", r.trailers);
        assert_eq!(requests(&s.lg, "grpc_error").await, Some(1.0));

        // An OK stream ends with its array: no trailers, whatever was declared.
        let r = c
            .get("/v1/count/1?from=1")
            .header("te", "trailers")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!([{"n": 1}]));
        assert_eq!(r.trailer("grpc-status"), None, "{:?}", r.trailers);
    }
);

each_proto!(
    /// Client and bidi streaming, as Envoy: the request messages come from a
    /// JSON array, one frame each; a reply stream is a JSON array too.
    async fn request_streams_come_from_a_json_array(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        let two = r#"[{"message": "a"}, {"message": "b"}]"#;
        // Client streaming: one reply.
        let r = c.post("/v1/collect").body(two).send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        is_json(&r);
        assert_eq!(r.json(), json!({"message": "a,b"}));
        // An empty stream; and, without a body in the rule, one from the path.
        let r = c.post("/v1/collect").body("[]").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!({}));
        let r = c.post("/v1/collect/solo").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!({"message": "solo"}));
        // Bidi streaming: each request echoed, the replies an array.
        let r = c.post("/v1/chat").body(two).send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!([{"message": "a"}, {"message": "b"}]));
        // Not an array: 400, and the upstream sees nothing.
        let r = c.post("/v1/collect").body(r#"{"message": "a"}"#).send().await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["code"], json!(3));
        assert_eq!(s.grpc.calls.get(), 4);
        assert_eq!(requests(&s.lg, "ok").await, Some(4.0));
        assert_eq!(requests(&s.lg, "bad_request").await, Some(1.0));
    }
);

each_proto!(
    async fn bad_json_is_400_and_the_upstream_sees_nothing(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        for (path, body) in [
            ("/v1/echo", "{not json"),
            ("/v1/echo", r#"{"message": 5}"#),
            ("/v1/echo", r#"{"nope": "x"}"#),
        ] {
            let r = c.post(path).body(body).send().await;
            assert_eq!(r.status, 400, "{body}: {}", r.text());
            is_json(&r);
            assert_eq!(r.json()["code"], 3, "{body}");
        }
        let r = c.get("/v1/echo/x?unknown=1").send().await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.json()["message"].as_str().unwrap().contains("unknown"), "{}", r.text());
        assert_eq!(s.grpc.calls.get(), 0);
        assert_eq!(requests(&s.lg, "bad_request").await, Some(4.0));
    }
);

each_proto!(
    async fn unmatched_requests_pass_through_untouched(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        let r = c
            .post("/plain/v1/echo?x=1")
            .header("content-type", "application/json")
            .body(r#"{"message": "hi"}"#)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let echo = r.echo();
        assert_eq!(echo.method, "POST");
        assert_eq!(echo.path, "/plain/v1/echo?x=1");
        assert_eq!(echo.header("content-type"), Some("application/json"));
        assert_eq!(echo.body, r#"{"message": "hi"}"#);
        assert_eq!(s.echo.requests.get(), 1);

        // A gRPC call straight to the service is not transcoded either.
        let r = c
            .post("/legate.test.v1.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(legate_tests::grpc::frame(&[0x0a, 0x02, b'h', b'i']))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc"));
        assert_eq!(s.grpc.calls.get(), 1);
        for result in ["ok", "grpc_error", "bad_request", "upstream_error"] {
            assert_eq!(requests(&s.lg, result).await.unwrap_or(0.0), 0.0, "{result}");
        }
    }
);

each_proto!(
    async fn a_non_grpc_answer_that_is_no_error_passes_as_it_is(proto) {
        // The "gRPC" cluster is a plain HTTP/2 echo server: it shows what the
        // transcoder sent, and its JSON answer (not gRPC) passes untranscoded.
        let h2_echo = upstream().h2().start().await;
        let echo = upstream().start().await;
        let lg = legate().config(&config(h2_echo.addr, echo.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/v1/echo/x?access_token=t").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = r.echo();
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.path, "/legate.test.v1.Echo/Say");
        assert_eq!(seen.header("content-type"), Some("application/grpc"));
        assert_eq!(seen.header("te"), Some("trailers"));
        // One frame: flag, length 3, then field 1 = "x".
        assert_eq!(seen.body.as_bytes(), [0, 0, 0, 0, 3, 0x0a, 1, b'x']);
        assert_eq!(seen.header("content-length"), Some("8"));
        assert_eq!(requests(&lg, "upstream_error").await, Some(1.0));

    }
);

each_proto!(
    async fn a_dead_upstream_becomes_a_json_error(proto) {
        // No gRPC server at all: the host's own 502 goes through the
        // transcoder's response phases, which turn it into its JSON error:
        // 502 → UNAVAILABLE (14) → 503.
        let echo = upstream().start().await;
        let yaml = config_with(
            closed_port_addr(),
            echo.addr,
            "builtin:grpc-json",
            "[legate.test.v1.Echo]",
        );
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/v1/echo/x").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        is_json(&r);
        assert_eq!(
            r.json(),
            json!({"code": 14, "message": "HTTP 502: upstream_connect_failure"})
        );
        assert_eq!(requests(&lg, "upstream_error").await, Some(1.0));
        lg.assert_stat(
            r#"legate_plugin_calls_total{plugin="transcoder",phase="response_headers"}"#,
            1.0,
        )
        .await;
        lg.assert_stat(
            r#"legate_plugin_calls_total{plugin="transcoder",phase="response_body"}"#,
            1.0,
        )
        .await;
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="5xx"}"#,
            1.0,
        )
        .await;
        // A request the transcoder does not take keeps the host's answer: to
        // a gRPC request, in gRPC's form.
        let r = c
            .post("/legate.test.v1.Echo/Say")
            .header("content-type", "application/grpc")
            .body(Vec::new())
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("grpc-status"), Some("14"));
        assert_eq!(r.header("grpc-message"), Some("upstream_connect_failure"));
    }
);

each_proto!(
    /// A body over the plugin's `limits.body` is refused by the host, not by
    /// the transcoder: its `413`/`502` with the plain-text cause, not
    /// grpc-json's JSON error (plugins/grpc-json/README.md, "Not supported").
    async fn bodies_over_the_buffer_limit_are_the_hosts_answers(proto) {
        let grpc = grpc_upstream().start().await;
        let echo = upstream().start().await;
        let yaml = config(grpc.addr, echo.addr);
        assert!(yaml.contains("limits: { cpu: 500ms }"));
        let yaml = yaml.replace("limits: { cpu: 500ms }", "limits: { cpu: 500ms, body: 1KiB }");
        let lg = legate().config(&yaml).start();
        let web = lg.addr("web");

        // A request body over the cap (fresh connections: HTTP/1.1 closes one
        // whose request body was not read).
        let big = format!(r#"{{"message": "{}"}}"#, "a".repeat(2000));
        let r = client(proto, web)
            .await
            .post("/v1/echo")
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (413, "plugin_buffer_limit\n"),
            "{:?}",
            r.headers
        );
        assert_eq!(grpc.calls.get(), 0);

        // A unary reply over the cap: a request message just under it (1000
        // bytes, framed), echoed back with the request's metadata.
        let r = client(proto, web)
            .await
            .get(&format!("/v1/echo/{}", "b".repeat(1000)))
            .send()
            .await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (502, "plugin_buffer_limit\n"),
            "{:?}",
            r.headers
        );
        assert_eq!(grpc.calls.get(), 1);
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtin_module_transcodes() {
    let grpc = grpc_upstream().start().await;
    let echo = upstream().start().await;
    let yaml = config_with(
        grpc.addr,
        echo.addr,
        "builtin:grpc-json",
        "[legate.test.v1.Echo]",
    );
    let lg = legate().config(&yaml).start();
    let mut c = client(Proto::H1, lg.addr("web")).await;
    let r = c.get("/v1/echo/builtin").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["message"], "builtin");
}

/// A service the descriptor set does not have, a descriptor file that is
/// not granted, or an ignored query parameter listed twice, is told at its
/// key (`services[1]`, `descriptor_file`, `ignored_query_parameters[1]`) by
/// `legate check`, as the schema's own errors are: before, these messages
/// were not in the SDK's form, so the host placed them at `config:`.
#[test]
fn a_refused_service_or_descriptor_file_is_placed_at_its_key() {
    let wasm = plugin_wasm("plugins/grpc-json").display().to_string();
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let dir = TempDir::new();
    for (yaml, marker, key, want) in [
        (
            config_with(
                addr,
                addr,
                &wasm,
                "[legate.test.v1.Echo, legate.test.v1.Nope]",
            ),
            "legate.test.v1.Nope]",
            "legate.test.v1.Nope",
            "invalid config: field `services[1]`: service \"legate.test.v1.Nope\" is not in \
             descriptor file \"descriptors\"",
        ),
        (
            config_with(
                addr,
                addr,
                &wasm,
                "[legate.test.v1.Echo]\n      descriptor_file: protos",
            ),
            "descriptor_file: protos",
            "descriptor_file",
            "invalid config: field `descriptor_file`: reading descriptor file \"protos\"",
        ),
        (
            config_with(addr, addr, &wasm, "[legate.test.v1.Echo]").replace(
                "ignored_query_parameters: [access_token]",
                "ignored_query_parameters: [access_token, access_token]",
            ),
            "ignored_query_parameters: [",
            "access_token]",
            "invalid config: field `ignored_query_parameters[1]`: \"access_token\" is listed twice",
        ),
    ] {
        let want = format!("plugin `transcoder`: configure failed: {want}");
        assert_check_places(&dir, &yaml, marker, key, &want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_errors_reject_the_load() {
    let grpc = grpc_upstream().start().await;
    let echo = upstream().start().await;
    let wasm = plugin_wasm("plugins/grpc-json").display().to_string();
    let yaml = config_with(grpc.addr, echo.addr, &wasm, "[legate.test.v1.Nope]");
    let err = match legate().config(&yaml).try_start() {
        Ok(_) => panic!("an unknown service was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(
            "service \"legate.test.v1.Nope\" is not in descriptor file \"descriptors\"; it has: legate.test.v1.Echo"
        ),
        "{err}"
    );
    // No descriptor file granted.
    let yaml = config(grpc.addr, echo.addr).replace("    files:", "    # files:");
    let err = match legate().config(&yaml).try_start() {
        Ok(_) => panic!("a missing descriptor file was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("reading descriptor file \"descriptors\""),
        "{err}"
    );
}
