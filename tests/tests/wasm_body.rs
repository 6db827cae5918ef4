//! Body and trailer phases of Wasm filters (abi/README.md §3.2, §4): the fixture
//! guest (tests/guests, built from source) in a real Legate between a real client
//! and a real upstream that echoes what it received, over HTTP/1.1 and HTTP/2.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use legate_tests::*;

/// One plugin entry (indented for `plugins:`): the fixture guest with `config`,
/// a generous CPU deadline (a busy test machine must not trip it) and `limits`.
fn plugin(name: &str, config: &str, limits: &str) -> String {
    let limits = if limits.is_empty() {
        "{ cpu: 500ms }"
    } else {
        limits
    };
    format!(
        "  - name: {name}\n    module: {}\n    config: {config}\n    limits: {limits}\n",
        test_guest().display()
    )
}

/// Listener `web` with the filter chain `chain`, everything to the upstream.
fn config(up: SocketAddr, plugins: &str, chain: &[&str]) -> String {
    config_with(up, plugins, chain, "")
}

/// As [`config`], with `cluster` keys added to the cluster.
fn config_with(up: SocketAddr, plugins: &str, chain: &[&str], cluster: &str) -> String {
    let chain: Vec<String> = chain.iter().map(|p| format!("{{ plugin: {p} }}")).collect();
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{}]
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
{cluster}    endpoints:
      - address: {up}
plugins:
{plugins}",
        chain.join(", ")
    )
}

fn calls(plugin: &str, phase: &str) -> String {
    format!("legate_plugin_calls_total{{plugin=\"{plugin}\",phase=\"{phase}\"}}")
}

fn limit_exceeded(plugin: &str, direction: &str) -> String {
    format!(
        "legate_plugin_body_limit_exceeded_total{{plugin=\"{plugin}\",direction=\"{direction}\"}}"
    )
}

/// An upstream that answers `/text` with `text` (with a content-length), and
/// echoes the rest.
async fn text_upstream(text: &'static str) -> UpstreamHandle {
    upstream()
        .route("/text", move |_req| async move {
            Response::new(Full::new(Bytes::from(text)))
        })
        .start()
        .await
}

each_proto!(
    async fn buffered_request_body_is_rewritten_with_its_length(proto) {
        let up = upstream().start().await;
        let p = plugin(
            "upper",
            "{ mode: body-upper, phases: \"rq,rqbody\", rqmode: buffered }",
            "",
        );
        let lg = legate().config(&config(up.addr, &p, &["upper"])).start();
        let mut c = client(proto, lg.addr("web")).await;

        let r = c.post("/a").body("hello").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.body, "HELLO!");
        assert_eq!(e.header("content-length"), Some("6"));
        // The head is held, and writable, while the body is buffered.
        assert_eq!(e.header("x-body-len"), Some("5"));

        // A body of unknown length (chunked on HTTP/1.1) gets a content-length.
        let r = c.post("/b").streamed_body("chunk-one/chunk-two", 5).send().await;
        let e = r.echo();
        assert_eq!(e.body, "CHUNK-ONE/CHUNK-TWO!");
        assert_eq!(e.header("content-length"), Some("20"));
        assert_eq!(e.header("transfer-encoding"), None);

        // No body: still one body call in buffered mode, and the filter can give
        // the request a body (abi/README.md §4), sent with its length.
        let r = c.get("/c").send().await;
        let e = r.echo();
        assert_eq!((e.method.as_str(), e.body.as_str()), ("GET", "!"));
        assert_eq!(e.header("content-length"), Some("1"));
        assert_eq!(e.header("x-body-len"), Some("0"));
        lg.assert_stat(&calls("upper", "request_body"), 3.0).await;
    }
);

each_proto!(
    async fn buffered_response_body_is_rewritten_with_its_length(proto) {
        let up = text_upstream("hello world").await;
        let p = plugin(
            "upper",
            "{ mode: body-upper, phases: \"rs,rsbody\", rsmode: buffered }",
            "",
        );
        let lg = legate().config(&config(up.addr, &p, &["upper"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/text").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "HELLO WORLD!");
        assert_eq!(r.header("content-length"), Some("12"));
        assert_eq!(r.header("x-body-len"), Some("11"));
        lg.assert_stat(&calls("upper", "response_body"), 1.0).await;
    }
);

each_proto!(
    /// A response replaced from filter k's response-headers phase goes through the
    /// body phases of the filters before k only (abi/README.md §3.5): a filter
    /// after k saw the upstream's head, and never sees the local body; before, it
    /// rewrote it (and k's own body phase ran too).
    async fn a_response_replaced_in_response_headers_skips_the_later_filters_bodies(proto) {
        let up = text_upstream("hello world").await;
        let upper = plugin("upper", "{ mode: body-upper, phases: \"rs,rsbody\" }", "");
        let responder = plugin(
            "responder",
            "{ mode: respond, phases: \"rq,rs,rsbody\", tag: late }",
            "",
        );
        let plugins = format!("{upper}{responder}");
        // `upper` after the responder: it does not touch the local body.
        let lg = legate()
            .config(&config(up.addr, &plugins, &["responder", "upper"]))
            .start();
        async fn late(c: &mut Client) -> Resp {
            c.get("/text")
                .header("x-api-key", "k")
                .header("x-respond-late", "1")
                .send()
                .await
        }
        let mut c = client(proto, lg.addr("web")).await;
        let r = late(&mut c).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-replaced-by"), Some("late"));
        assert_eq!(r.text(), "replaced by plugin\n");
        // The upstream's type went with its head; the local body without one
        // is `text/plain`, as a request phase's local response.
        assert_eq!(r.header("content-type"), Some("text/plain"));
        lg.assert_stat(&calls("responder", "response_body"), 0.0).await;
        lg.assert_stat(&calls("upper", "response_body"), 0.0).await;
        // Without the header, both see the upstream's body as usual.
        let r = c.get("/text").header("x-api-key", "k").send().await;
        assert_eq!(r.text(), "HELLO WORLD!");
        drop(lg);

        // `upper` before the responder: it sees the local body, as the response.
        let lg = legate()
            .config(&config(up.addr, &plugins, &["upper", "responder"]))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = late(&mut c).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.text(), "REPLACED BY PLUGIN\n!");
    }
);

each_proto!(
    async fn a_buffered_body_phase_can_give_a_body_to_a_message_without_one(proto) {
        let up = upstream()
            .route("/empty", |_req| async { Response::new(Full::new(Bytes::new())) })
            .route("/nocontent", |_req| async {
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            })
            .start()
            .await;
        let p = plugin(
            "upper",
            "{ mode: body-upper, phases: \"rs,rsbody\", rsmode: buffered }",
            "",
        );
        let lg = legate().config(&config(up.addr, &p, &["upper"])).start();
        let mut c = client(proto, lg.addr("web")).await;

        let r = c.get("/empty").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "!");
        assert_eq!(r.header("content-length"), Some("1"));
        assert_eq!(r.header("x-body-len"), Some("0"));
        lg.assert_stat(&calls("upper", "response_body"), 1.0).await;

        // Responses that cannot have a body get no body call.
        let r = c.get("/nocontent").send().await;
        assert_eq!(r.status, 204);
        assert_eq!(r.text(), "");
        let r = c.request(Method::HEAD, "/empty").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "");
        lg.assert_stat(&calls("upper", "response_body"), 1.0).await;
        assert_eq!(up.requests.get(), 3);
    }
);

each_proto!(
    async fn streamed_bodies_are_rewritten_without_a_length(proto) {
        let up = text_upstream("hello world").await;
        let p = plugin(
            "upper",
            "{ mode: body-upper, phases: \"rq,rs,rqbody,rsbody\" }",
            "",
        );
        let lg = legate().config(&config(up.addr, &p, &["upper"])).start();
        let mut c = client(proto, lg.addr("web")).await;

        // The filter removed content-length in its headers phase: the rewritten
        // stream goes on chunked (HTTP/1.1) or unsized (HTTP/2).
        let r = c.post("/a").body("hello").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The response filter upper-cases the echo too.
        let text = r.text();
        assert!(text.contains("\"BODY\":\"HELLO!\""), "{text}");
        assert!(!text.contains("CONTENT-LENGTH"), "{text}");

        let r = c.get("/text").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "HELLO WORLD!");
        assert_eq!(r.header("content-length"), None);
        // Streamed: the head went on before the body, so it was not writable.
        assert_eq!(r.header("x-body-len"), None);
    }
);

/// `legate_plugin_failures_total` of plugin `p`.
fn failures(p: &str) -> String {
    format!("legate_plugin_failures_total{{plugin=\"{p}\"}}")
}

/// Asserts that nothing was held against the one endpoint `up` of cluster
/// `backend`: no attempt failed there (outlier detection's input), none timed
/// out.
async fn upstream_not_blamed(lg: &LegateHandle, up: SocketAddr) {
    lg.assert_stat(
        &format!("legate_endpoint_rq_error{{cluster=\"backend\",endpoint=\"{up}\"}}"),
        0.0,
    )
    .await;
    lg.assert_stat(
        "legate_cluster_upstream_rq_timeout{cluster=\"backend\"}",
        0.0,
    )
    .await;
}

each_proto!(
    /// A streamed request body a filter resizes without removing its
    /// `content-length` (abi/README.md §4): the host does not send a message
    /// its head contradicts (hyper's HTTP/1.1 client would wait for the bytes
    /// missing, to the route timeout, or cut those over). The exchange fails
    /// as the filter's: `503 plugin_failure: <plugin>`, counted as its
    /// failure, nothing held against the upstream.
    async fn a_streamed_request_rewrite_that_breaks_its_length_fails_as_the_filters(proto) {
        let up = text_upstream("hello world").await;
        for (name, mode) in [("upper", "body-upper"), ("shrink", "body-shrink")] {
            let p = plugin(name, &format!("{{ mode: {mode}, phases: \"rqbody\" }}"), "");
            let lg = legate().config(&config(up.addr, &p, &[name])).start();
            let mut c = client(proto, lg.addr("web")).await;
            let r = tokio::time::timeout(HANG_GUARD, c.post("/a").body("hello").send())
                .await
                .unwrap_or_else(|_| panic!("{name}: no answer"));
            assert_eq!(r.status, 503, "{name}: {}", r.text());
            assert_eq!(r.text(), format!("plugin_failure: {name}\n"));
            lg.assert_stat(&failures(name), 1.0).await;
            upstream_not_blamed(&lg, up.addr).await;
            if name == "shrink" {
                // A body the filter leaves its length (one byte) passes.
                let r = c.post("/a").body("h").send().await;
                assert_eq!(r.status, 200, "{name}: {}", r.text());
            }
        }
    }
);

each_proto!(
    /// The same for a response, whose head went out: the client gets a reset
    /// (HTTP/2) or a connection closed short of the `content-length` (HTTP/1.1),
    /// never a 200 cut to its length on a connection used again.
    async fn a_streamed_response_rewrite_that_breaks_its_length_is_reset(proto) {
        let up = text_upstream("hello world").await;
        for (name, mode) in [("upper", "body-upper"), ("shrink", "body-shrink")] {
            let p = plugin(name, &format!("{{ mode: {mode}, phases: \"rsbody\" }}"), "");
            let lg = legate().config(&config(up.addr, &p, &[name])).start();
            let mut c = client(proto, lg.addr("web")).await;
            let r = tokio::time::timeout(HANG_GUARD, c.get("/text").try_send())
                .await
                .unwrap_or_else(|_| panic!("{name}: no answer"));
            assert!(r.is_err(), "{name}: a whole response: {r:?}");
            lg.assert_stat(&failures(name), 1.0).await;
            upstream_not_blamed(&lg, up.addr).await;
        }
    }
);

each_proto!(
    async fn buffered_bodies_over_the_cap_are_413_and_502(proto) {
        let up = upstream()
            .route("/big", |_req| async {
                Response::new(Full::new(Bytes::from(vec![b'x'; 5000])))
            })
            .start()
            .await;
        let p = plugin(
            "rq",
            "{ mode: body-upper, phases: \"rqbody\", rqmode: buffered }",
            "{ cpu: 500ms, body: 1KiB }",
        ) + &plugin(
            "rs",
            "{ mode: body-upper, phases: \"rsbody\", rsmode: buffered }",
            "{ cpu: 500ms, body: 4KiB }",
        );
        let lg = legate().config(&config(up.addr, &p, &["rq", "rs"])).start();
        // A fresh connection per request: HTTP/1.1 closes the connection after
        // answering a request whose body it did not read.
        let web = lg.addr("web");

        // Known too large from its content-length.
        let r = client(proto, web).await.post("/up").body(vec![b'a'; 2000]).send().await;
        assert_eq!(r.status, 413);
        assert_eq!(r.text(), "plugin_buffer_limit\n");
        // Found too large while reading it.
        let r = client(proto, web)
            .await
            .post("/up")
            .streamed_body(vec![b'a'; 2000], 500)
            .send()
            .await;
        assert_eq!(r.status, 413);
        assert_eq!(up.requests.get(), 0, "the upstream got a request");
        lg.assert_stat(&limit_exceeded("rq", "request"), 2.0).await;

        // Under the cap: rewritten.
        let mut c = client(proto, web).await;
        let r = c.post("/up").body(vec![b'a'; 1000]).send().await;
        // (The response filter upper-cases the echo too.)
        assert_eq!(r.status, 200);
        assert!(r.text().contains("\"BODY_LEN\":1001"), "{}", r.text());

        let r = c.get("/big").send().await;
        assert_eq!(r.status, 502);
        assert_eq!(r.text(), "plugin_buffer_limit\n");
        lg.assert_stat(&limit_exceeded("rs", "response"), 1.0).await;
    }
);

each_proto!(
    async fn streamed_bodies_pass_unchanged_and_are_seen_chunk_by_chunk(proto) {
        let n = 4 << 20;
        let up = upstream()
            .route("/sink", sink)
            .route("/source", source(n))
            .start()
            .await;
        let p = plugin(
            "count",
            "{ mode: body-stream-count, phases: \"rq,rs,rqbody,rsbody\" }",
            "",
        );
        let lg = legate().config(&config(up.addr, &p, &["count"])).start();
        let mut c = client(proto, lg.addr("web")).await;

        let data = pattern_bytes(n);
        let r = c
            .post("/sink")
            .streamed_body(data.clone(), 64 * 1024)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["len"], n);
        assert_eq!(v["checksum"], checksum(&data));
        assert_eq!(r.header("x-body-bytes"), Some(n.to_string().as_str()));
        assert_eq!(r.header("x-body-eos"), Some("1"));
        let chunks: u32 = r.header("x-body-calls").unwrap().parse().unwrap();
        // Far more than one call: the body was not buffered (chunk sizes are the
        // transport's, at most the 4 MiB).
        assert!(chunks > 4, "{chunks} body calls for 4 MiB");

        let r = c.get("/source").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), n);
        assert_eq!(checksum(&r.body), checksum(&pattern_bytes(n)));
        lg.assert_stat_with(
            &calls("count", "response_body"),
            |v| v > 4.0,
            "streamed response body calls",
        )
        .await;
    }
);

// An owned `exchange.body` handle stays valid until the exchange is over
// (abi/README.md §3.1): used after its data was forwarded, it has no data
// behind it (`len` 0, `read` empty, writes `invalid-state`), not a trap.
each_proto!(
    async fn a_body_handle_used_after_its_data_was_forwarded_is_empty(proto) {
        let up = upstream().start().await;
        let p = plugin("stale", "{ mode: body-stale, phases: \"rq,rs,rqbody\" }", "");
        let lg = legate().config(&config(up.addr, &p, &["stale"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        for _ in 0..2 {
            let r = c.post("/echo").body("some request body").send().await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.echo().body, "some request body");
            assert_eq!(r.header("x-stale"), Some("len=0,read=0,replace=invalid-state"));
        }
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="stale"}"#, 0.0)
            .await;
        lg.assert_stat(r#"legate_plugin_instance_restarts_total{plugin="stale"}"#, 0.0)
            .await;
    }
);

each_proto!(
    async fn filters_without_body_phases_leave_bodies_alone(proto) {
        let up = upstream().start().await;
        let p = plugin("tagger", "{ mode: headers }", "");
        let lg = legate().config(&config(up.addr, &p, &["tagger"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/a").streamed_body("some body", 4).send().await;
        let e = r.echo();
        assert_eq!(e.body, "some body");
        assert_eq!(e.header("content-length"), None);
        assert_eq!(e.header("x-filter"), Some("tagger"));
        let r = c.post("/a").body("sized").send().await;
        assert_eq!(r.echo().header("content-length"), Some("5"));
        lg.assert_stat(&calls("tagger", "request_headers"), 2.0).await;
        lg.assert_stat(&calls("tagger", "request_body"), 0.0).await;
        lg.assert_stat(&calls("tagger", "response_body"), 0.0).await;
    }
);

each_proto!(
    /// A body-less request goes through the body phases for a filter that
    /// buffers it (its one call, empty), but a `streamed` filter after it,
    /// whose headers phase had end-of-stream, gets no body call (abi §4) —
    /// unless the buffering filter gave the request a body, which it then
    /// sees, as Envoy's filters see data added to a headers-only stream. (It
    /// got an empty end-of-stream call: a GET could come out with the body a
    /// streamed signer or footer appends at the end.)
    async fn a_bodyless_message_skips_streamed_body_phases(proto) {
        let up = upstream().start().await;
        let p = plugin(
            "deny",
            "{ mode: body-deny, phases: \"rqbody\", rqmode: buffered }",
            "",
        ) + &plugin(
            "upper",
            "{ mode: body-upper, phases: \"rqbody\", rqmode: buffered }",
            "",
        ) + &plugin("count", "{ mode: body-stream-count, phases: \"rs,rqbody\" }", "");
        let lg = legate().config(&config(up.addr, &p, &["deny", "count"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/none").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-body-calls"), Some("0"));
        assert_eq!(r.echo().body, "");
        lg.assert_stat(&calls("deny", "request_body"), 1.0).await;
        let r = c.post("/some").body("abc").send().await;
        assert_eq!(r.header("x-body-bytes"), Some("3"));
        // A buffering filter that gives the body-less request a body (`!`).
        let lg = legate().config(&config(up.addr, &p, &["upper", "count"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/none").send().await;
        assert_eq!(r.header("x-body-calls"), Some("1"));
        assert_eq!(r.header("x-body-bytes"), Some("1"));
        assert_eq!(r.echo().body, "!");
    }
);

each_proto!(
    async fn a_body_phase_answers_locally(proto) {
        let up = text_upstream("this text is forbidden").await;
        let p = plugin(
            "deny",
            "{ mode: body-deny, phases: \"rqbody,rsbody\", rqmode: buffered, rsmode: buffered }",
            "",
        );
        let lg = legate().config(&config(up.addr, &p, &["deny"])).start();
        let mut c = client(proto, lg.addr("web")).await;

        let r = c.post("/a").body("a forbidden word").send().await;
        assert_eq!(r.status, 403);
        assert_eq!(r.text(), "body denied\n");
        assert_eq!(r.header("x-denied-by"), Some("body"));
        assert_eq!(r.header("content-length"), Some("12"));
        assert_eq!(up.requests.get(), 0, "the upstream saw the denied request");

        let r = c.post("/a").body("a fine word").send().await;
        assert_eq!(r.status, 200);
        assert_eq!(r.echo().body, "a fine word");

        // Buffered response: the head was held, so the answer replaces it cleanly.
        let r = c.get("/text").send().await;
        assert_eq!(r.status, 451);
        assert_eq!(r.text(), "body denied\n");
    }
);

each_proto!(
    /// A filter's local response from a response phase is logged with cause
    /// `plugin:<details>`, as one to the request is (abi/README.md §3.5): one
    /// that replaced the response (headers phase, buffered body) with its
    /// own status, one from a streamed body phase (the head was out: the
    /// exchange is reset) with the status sent. They had no cause (or
    /// `response_body_failed`, for the reset).
    async fn a_response_phase_local_response_is_logged_with_its_details(proto) {
        let up = text_upstream("this text is forbidden").await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let logged = |yaml: String| {
            yaml.replacen(
                "version: 1\n",
                &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
                1,
            )
        };
        let p = plugin("deny", "{ mode: body-deny, phases: \"rsbody\", rsmode: buffered }", "")
            + &plugin("late", "{ mode: respond }", "")
            + &plugin("deny_streamed", "{ mode: body-deny, phases: \"rsbody\" }", "");
        let lg = legate()
            .config(&logged(config(up.addr, &p, &["deny", "late"])))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/text").header("x-api-key", "k").send().await;
        assert_eq!(r.status, 451, "{}", r.text());
        let r = c
            .get("/a")
            .header("x-api-key", "k")
            .header("x-respond-late", "1")
            .send()
            .await;
        assert_eq!(r.status, 503, "{}", r.text());
        access_log_until(&log, "two lines", |l| l.len() >= 2).await;
        drop(lg);
        let lg = legate()
            .config(&logged(config(up.addr, &p, &["deny_streamed"])))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // Streamed: the head went out before the body phase answered.
        assert_eq!(c.get("/fine").send().await.status, 200);
        let mut c = client(proto, lg.addr("web")).await;
        let _ = c.get("/text").try_send().await;
        let lines = access_log_until(&log, "four lines", |l| l.len() >= 4).await;
        let line = |path: &str, status: u16| {
            lines
                .iter()
                .find(|l| l["path"] == path && l["status"] == status)
                .unwrap_or_else(|| panic!("no {path} {status} in {lines:?}"))
                .clone()
        };
        let (buffered, late, reset) = (line("/text", 451), line("/a", 503), line("/text", 200));
        assert_eq!(
            (&buffered["cause"], &late["cause"], &reset["cause"]),
            (
                &json!("plugin:body_denied"),
                &json!("plugin:replaced_late"),
                &json!("plugin:body_denied")
            ),
            "{lines:?}"
        );
        // An exchange no filter answered has no cause.
        assert_eq!(line("/fine", 200)["cause"], Value::Null);
    }
);

each_proto!(
    /// Full duplex: a streamed request body phase that answers once the
    /// response head went out resets the exchange, logged with the status
    /// sent and cause `plugin:<details>` (abi/README.md §3.5); it was
    /// `response_body_failed`, as if the upstream had failed.
    async fn a_request_body_answer_after_the_response_head_is_logged(proto) {
        // Echoes the request body as it arrives: the head goes out at once.
        let up = upstream()
            .h2()
            .handler(|req: Request<Incoming>| async move {
                let body = http_body_util::BodyExt::map_err(req.into_body(), BoxError::from);
                Response::new(http_body_util::BodyExt::boxed(body))
            })
            .start()
            .await;
        let dir = TempDir::new();
        let log = dir.path().join("access.log");
        let p = plugin("deny", "{ mode: body-deny, phases: \"rqbody\" }", "");
        let yaml = config_with(up.addr, &p, &["deny"], "    protocol: h2\n").replacen(
            "version: 1\n",
            &format!("version: 1\naccess_log: {{ path: {} }}\n", log.display()),
            1,
        );
        let lg = legate().config(&yaml).start();
        let addr = lg.addr("web");
        match proto {
            Proto::H1 => {
                let mut c = RawConn::connect(addr).await;
                c.write(b"POST /duplex HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n6\r\nhello,\r\n")
                    .await;
                let head = c.read_head(HANG_GUARD).await;
                assert_eq!(raw_status(&head), Some(200), "{}", String::from_utf8_lossy(&head));
                c.write(b"9\r\nforbidden\r\n").await;
                let (_, closed) = c.read_until_close(HANG_GUARD).await;
                assert!(closed, "the exchange was not reset");
            }
            Proto::H2 => {
                let mut sender = raw_h2(addr).await;
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|d| (Ok::<_, BoxError>(http_body::Frame::data(d)), rx))
                });
                let req = Request::post(format!("http://{addr}/duplex"))
                    .body(http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(stream)))
                    .unwrap();
                tx.send(Bytes::from("hello,")).unwrap();
                let r = sender.send_request(req).await.unwrap();
                assert_eq!(r.status(), 200);
                tx.send(Bytes::from("forbidden")).unwrap();
                let cut = tokio::time::timeout(
                    HANG_GUARD,
                    http_body_util::BodyExt::collect(r.into_body()),
                )
                .await
                .expect("the exchange was not reset");
                assert!(cut.is_err(), "the response ended cleanly");
                drop(tx);
            }
        }
        let lines = access_log_until(&log, "the line", |l| !l.is_empty()).await;
        assert_eq!(lines[0]["status"], 200, "{}", lines[0]);
        assert_eq!(lines[0]["cause"], "plugin:body_denied", "{}", lines[0]);
    }
);

each_proto!(
    async fn a_streamed_request_body_phase_answers_locally(proto) {
        let up = upstream().start().await;
        let p = plugin("deny", "{ mode: body-deny, phases: \"rqbody\" }", "");
        let lg = legate().config(&config(up.addr, &p, &["deny"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .post("/a")
            .streamed_body("this is forbidden", 64)
            .send()
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "body denied\n");
    }
);

each_proto!(
    async fn request_trailers_go_through_the_trailers_phase(proto) {
        let up = upstream().start().await;
        let p = plugin("tr", "{ mode: trailers, phases: \"rqtrailers\" }", "");
        let lg = legate().config(&config(up.addr, &p, &["tr"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let mut t = HeaderMap::new();
        t.insert("x-client-trailer", HeaderValue::from_static("abc"));
        let r = c
            .post("/a")
            .header("te", "trailers")
            // hyper's HTTP/1.1 encoder sends only the trailers `Trailer` names.
            .header("trailer", "x-client-trailer, x-trailer-seen")
            .body_with_trailers("payload", t)
            .send()
            .await;
        let e = r.echo();
        assert_eq!(e.body, "payload");
        assert_eq!(e.trailers.get("x-client-trailer"), Some(&vec!["abc".to_string()]));
        assert_eq!(e.trailers.get("x-trailer-seen"), Some(&vec!["abc".to_string()]));
        lg.assert_stat(&calls("tr", "request_trailers"), 1.0).await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_go_through_the_trailers_phase() {
    let up = upstream().grpc().start().await;
    let p = plugin("tr", "{ mode: trailers, phases: \"rstrailers\" }", "");
    let yaml = config_with(up.addr, &p, &["tr"], "    protocol: h2\n");
    let lg = legate().config(&yaml).start();
    let mut c = client(Proto::H2, lg.addr("web")).await;
    let msg = grpc_frame(b"ping");
    let r = c
        .post("/echo.Echo/Say")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(msg.clone())
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, msg);
    let t = r.trailers.as_ref().expect("response trailers were dropped");
    assert_eq!(t.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    assert_eq!(
        t.get("x-added-trailer").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    lg.assert_stat(&calls("tr", "response_trailers"), 1.0).await;
}

each_proto!(
    /// A trailers phase's field reaches an HTTP/1.1 client when the filter
    /// buffered the body: its final trailers are known before the head goes
    /// out and named in `Trailer` (hyper's HTTP/1 server writes only those).
    /// Streamed, the head is out before the trailers phase: over HTTP/1.1
    /// only gRPC's own fields pass (docs/config.md, "Trailers to HTTP/1.1
    /// clients"); over HTTP/2 every field.
    async fn response_trailers_a_filter_adds_reach_the_client(proto) {
        let up = upstream().grpc().start().await;
        for mode in ["buffered", "streamed"] {
            let name = format!("tr_{mode}");
            let p = plugin(
                &name,
                &format!("{{ mode: trailers, phases: \"rsbody,rstrailers\", rsmode: {mode} }}"),
                "",
            );
            let yaml = config_with(up.addr, &p, &[&name], "    protocol: h2\n");
            let lg = legate().config(&yaml).start();
            let mut c = client(proto, lg.addr("web")).await;
            let msg = grpc_frame(b"ping");
            let r = c
                .post("/echo.Echo/Say")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(msg.clone())
                .send()
                .await;
            assert_eq!(r.status, 200, "{mode}: {}", r.text());
            assert_eq!(r.body, msg, "{mode}");
            let t = r.trailers.as_ref().expect("response trailers were dropped");
            let get = |n: &str| t.get(n).map(|v| v.to_str().unwrap());
            assert_eq!(get("grpc-status"), Some("0"), "{mode}: {t:?}");
            assert_eq!(get("grpc-message"), Some("OK"), "{mode}: {t:?}");
            let all = mode == "buffered" || proto == Proto::H2;
            let want = all.then_some("yes");
            assert_eq!(get("x-added-trailer"), want, "{mode}: {t:?}");
            assert_eq!(get("x-echo-trailer"), want, "{mode}: {t:?}");
            lg.assert_stat(&calls(&name, "response_trailers"), 1.0).await;
        }
    }
);

each_proto!(
    async fn set_body_mode_overrides_the_declared_mode_until_the_body_starts(proto) {
        let up = upstream().start().await;
        let p = plugin(
            "switch",
            "{ mode: body-mode-switch, phases: \"rq,rs,rqbody\" }",
            "",
        );
        let lg = legate().config(&config(up.addr, &p, &["switch"])).start();
        let mut c = client(proto, lg.addr("web")).await;

        // Streamed by default, buffered for this exchange: the length is fixed.
        let r = c
            .post("/a")
            .header("x-mode", "buffered")
            .body("hello")
            .send()
            .await;
        let e = r.echo();
        assert_eq!(e.header("x-mode-result"), Some("ok"));
        assert_eq!(e.body, "HELLO!");
        assert_eq!(e.header("content-length"), Some("6"));
        assert_eq!(e.header("x-body-len"), Some("5"));
        // From the body phase, the mode can no longer change.
        assert_eq!(r.header("x-late-mode"), Some("invalid-state"));

        // Skipped for this exchange: no body call, the body passes untouched.
        let r = c
            .post("/a")
            .header("x-mode", "skipped")
            .body("hello")
            .send()
            .await;
        let e = r.echo();
        assert_eq!(e.header("x-mode-result"), Some("ok"));
        assert_eq!(e.body, "hello");
        assert_eq!(r.header("x-late-mode"), None);
        lg.assert_stat(&calls("switch", "request_body"), 1.0).await;
    }
);

each_proto!(
    async fn response_trailers_folded_into_the_body_end_the_body(proto) {
        // An HTTP/2 gRPC upstream sends trailers; the filter folds them into the
        // body in its last body call (abi/README.md §4), so the client gets a body
        // and no trailers, over HTTP/1.1 (chunked) as over HTTP/2.
        let up = upstream().grpc().start().await;
        // Streamed: the data chunk, then the empty end-of-stream call with the
        // trailers; buffered: one call.
        for (mode, body_calls) in [("streamed", 2.0), ("buffered", 1.0)] {
            let name = format!("fold_{mode}");
            let p = plugin(
                &name,
                &format!(
                    "{{ mode: fold-trailers, phases: \"rs,rsbody,rstrailers\", rsmode: {mode} }}"
                ),
                "",
            );
            let yaml = config_with(up.addr, &p, &[&name], "    protocol: h2\n");
            let lg = legate().config(&yaml).start();
            let mut c = client(proto, lg.addr("web")).await;
            let msg = grpc_frame(b"ping");
            let r = c
                .post("/echo.Echo/Say")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(msg.clone())
                .send()
                .await;
            assert_eq!(r.status, 200, "{mode}: {}", r.text());
            let mut want = msg.to_vec();
            want.extend_from_slice(
                b"\n[trailers] grpc-status=0 grpc-message=OK x-echo-trailer=yes",
            );
            assert_eq!(r.body, want, "{mode}: {}", String::from_utf8_lossy(&r.body));
            assert!(
                r.trailers.as_ref().is_none_or(|t| t.is_empty()),
                "{mode}: trailers were not removed: {:?}",
                r.trailers
            );
            // Buffered, the host knows the final length once no trailers follow.
            let len = want.len().to_string();
            let want_len = (mode == "buffered").then_some(len.as_str());
            assert_eq!(r.header("content-length"), want_len, "{mode}");
            // Emptied trailers: no trailers phase.
            lg.assert_stat(&calls(&name, "response_body"), body_calls).await;
            lg.assert_stat(&calls(&name, "response_trailers"), 0.0).await;
        }
    }
);

each_proto!(
    async fn request_trailers_folded_into_the_body(proto) {
        let up = upstream().start().await;
        let p = plugin(
            "fold",
            "{ mode: fold-trailers, phases: \"rq,rqbody,rqtrailers\" }",
            "",
        );
        let lg = legate().config(&config(up.addr, &p, &["fold"])).start();
        let mut c = client(proto, lg.addr("web")).await;
        let mut t = HeaderMap::new();
        t.insert("x-client-trailer", HeaderValue::from_static("abc"));
        let r = c
            .post("/a")
            .header("te", "trailers")
            .header("trailer", "x-client-trailer")
            .body_with_trailers("payload", t)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.body, "payload\n[trailers] x-client-trailer=abc");
        assert!(e.trailers.is_empty(), "{:?}", e.trailers);
        lg.assert_stat(&calls("fold", "request_trailers"), 0.0).await;

        // Trailers left in the map go on, through the trailers phase.
        let mut t = HeaderMap::new();
        t.insert("x-keep", HeaderValue::from_static("1"));
        t.insert("x-gone", HeaderValue::from_static("2"));
        let r = c
            .post("/a")
            .header("te", "trailers")
            .header("trailer", "x-keep, x-gone, x-trailers-phase")
            .body_with_trailers("payload", t)
            .send()
            .await;
        let e = r.echo();
        assert_eq!(e.body, "payload\n[trailers] x-gone=2");
        assert_eq!(e.trailers.get("x-keep"), Some(&vec!["1".to_string()]));
        assert_eq!(e.trailers.get("x-gone"), None);
        assert_eq!(e.trailers.get("x-trailers-phase"), Some(&vec!["ran".to_string()]));
        lg.assert_stat(&calls("fold", "request_trailers"), 1.0).await;
    }
);

// ---- pause from buffered body and trailers phases (abi/README.md §3.3, §4) ----

/// A checking service for `body-callout`: `403 rejected: <body>` for a body
/// containing `forbidden`, else `200 ok`; a path containing `/slow` answers after
/// 2 s.
async fn checker() -> UpstreamHandle {
    async fn check(req: Request<Incoming>) -> Response<Full<Bytes>> {
        use http_body_util::BodyExt;
        let slow = req.uri().path().contains("/slow");
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => Bytes::from(format!("checker could not read the body: {e}")),
        };
        if slow {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
        let text = String::from_utf8_lossy(&body);
        let (status, answer) = if text.contains("forbidden") {
            (StatusCode::FORBIDDEN, format!("rejected: {text}"))
        } else {
            (StatusCode::OK, "ok".to_string())
        };
        let mut r = Response::new(Full::new(Bytes::from(answer)));
        *r.status_mut() = status;
        r
    }
    upstream().name("checker").handler(check).start().await
}

/// A `body-callout` plugin entry granted cluster `checker`, with `extra` config
/// keys (`phases`, modes, ...).
fn checking_plugin(name: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    module: {}\n    config: {{ mode: body-callout, cluster: checker, {extra} }}\n    limits: {{ cpu: 500ms }}\n    capabilities: {{ clusters: [checker] }}\n",
        test_guest().display()
    )
}

/// [`config_with`] plus cluster `checker` at `checker`.
fn checked_config(
    up: SocketAddr,
    checker: SocketAddr,
    plugins: &str,
    chain: &[&str],
    cluster: &str,
) -> String {
    config_with(up, plugins, chain, cluster).replace(
        "\nplugins:\n",
        &format!("\n  - name: checker\n    endpoints:\n      - address: {checker}\nplugins:\n"),
    )
}

fn callouts(plugin: &str) -> String {
    format!("legate_plugin_callouts_total{{plugin=\"{plugin}\"}}")
}

each_proto!(
    async fn a_buffered_request_body_pauses_for_a_callout(proto) {
        let up = upstream().start().await;
        let ck = checker().await;
        let p = checking_plugin("check", "phases: \"rqbody\", rqmode: buffered");
        let yaml = checked_config(up.addr, ck.addr, &p, &["check"], "");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;

        // Allowed: the body, still held and writable in the callout response, is
        // rewritten there, and the head too; the length is recomputed.
        let r = c.post("/a").body("hello").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.body, "HELLO!");
        assert_eq!(e.header("content-length"), Some("6"));
        assert_eq!(e.header("x-checked"), Some("200"));
        assert_eq!(up.requests.get(), 1);

        // Denied from the callout response: the checker's answer, no upstream.
        let r = c.post("/a").body("a forbidden word").send().await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "rejected: a forbidden word");
        assert_eq!(r.header("x-from-callout"), Some("1"));
        assert_eq!(up.requests.get(), 1, "the upstream saw the denied request");

        assert_eq!(ck.requests.get(), 2);
        lg.assert_stat(&calls("check", "request_body"), 2.0).await;
        lg.assert_stat(&calls("check", "callout_response"), 2.0).await;
        lg.assert_stat(&callouts("check"), 2.0).await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="4xx"}"#, 1.0)
            .await;
        let failures = lg.stat(r#"legate_plugin_failures_total{plugin="check"}"#).await;
        assert_eq!(failures.unwrap_or(0.0), 0.0);
    }
);

each_proto!(
    async fn a_filter_that_detaches_while_another_is_paused_gets_no_body_call(proto) {
        // `check` pauses 2 s in its buffered body phase; meanwhile `late`'s
        // unpaused callout answers and `late` detaches in that delivery. The
        // body run was planned with `late` in it: it must skip it.
        let up = upstream().start().await;
        let ck = checker().await;
        let p = checking_plugin("check", "phases: \"rqbody\", rqmode: buffered, timeout: \"5000\"")
            + &format!(
                "  - name: late\n    module: {}\n    config: {{ mode: detach, cluster: checker, phases: \"rq,rqbody\" }}\n    limits: {{ cpu: 500ms }}\n    capabilities: {{ clusters: [checker] }}\n",
                test_guest().display()
            );
        let yaml = checked_config(up.addr, ck.addr, &p, &["check", "late"], "");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .post("/slow/x")
            .header("x-detach-me", "1")
            .header("x-detach-later", "1")
            .body("hello")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().body, "HELLO!");
        lg.assert_stat(&calls("late", "callout_response"), 1.0).await;
        lg.assert_stat(&calls("check", "request_body"), 1.0).await;
        lg.assert_stat(&calls("late", "request_body"), 0.0).await;
        let failures = lg.stat(r#"legate_plugin_failures_total{plugin="late"}"#).await;
        assert_eq!(failures.unwrap_or(0.0), 0.0);
    }
);

each_proto!(
    async fn a_buffered_response_body_pauses_for_a_callout(proto) {
        let up = upstream()
            .route("/text", |_req| async {
                Response::new(Full::new(Bytes::from("hello world")))
            })
            .route("/bad", |_req| async {
                Response::new(Full::new(Bytes::from("a forbidden answer")))
            })
            .start()
            .await;
        let ck = checker().await;
        let p = checking_plugin("check", "phases: \"rsbody\", rsmode: buffered");
        let yaml = checked_config(up.addr, ck.addr, &p, &["check"], "");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;

        let r = c.get("/text").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "HELLO WORLD!");
        assert_eq!(r.header("content-length"), Some("12"));
        // The response head is held with the body: writable while paused.
        assert_eq!(r.header("x-checked"), Some("200"));

        // The head is still held: the checker's answer replaces the response.
        let r = c.get("/bad").send().await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "rejected: a forbidden answer");
        assert_eq!(r.header("x-from-callout"), Some("1"));

        lg.assert_stat(&calls("check", "response_body"), 2.0).await;
        lg.assert_stat(&calls("check", "callout_response"), 2.0).await;
    }
);

each_proto!(
    async fn a_pause_without_a_callout_in_a_body_phase_fails_closed(proto) {
        let up = upstream().start().await;
        let ck = checker().await;
        let p = checking_plugin("check", "phases: \"rqbody\", rqmode: buffered");
        let yaml = checked_config(up.addr, ck.addr, &p, &["check"], "");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/nocallout").body("hello").send().await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.text(), "plugin_failure: check\n");
        assert_eq!(up.requests.get(), 0, "the upstream got the request");
        assert_eq!(ck.requests.get(), 0);
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="check"}"#, 1.0)
            .await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="5xx"}"#, 1.0)
            .await;

        // The instance is kept: the next request is checked as usual.
        let r = c.post("/a").body("fine").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().body, "FINE!");
    }
);

each_proto!(
    async fn a_body_pause_whose_callout_times_out_gets_the_guests_answer(proto) {
        let up = upstream().start().await;
        let ck = checker().await;
        let p = checking_plugin(
            "check",
            "phases: \"rqbody\", rqmode: buffered, timeout: \"100\"",
        );
        let yaml = checked_config(up.addr, ck.addr, &p, &["check"], "");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/slow").body("hello").send().await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.header("x-callout-error"), Some("timeout"));
        assert_eq!(r.text(), "callout failed\n");
        assert_eq!(up.requests.get(), 0, "the upstream got the request");
        lg.assert_stat(r#"legate_plugin_callout_timeouts_total{plugin="check"}"#, 1.0)
            .await;
        lg.assert_stat(&calls("check", "callout_response"), 1.0).await;
    }
);

each_proto!(
    async fn buffered_request_trailers_pause_for_a_callout(proto) {
        let up = upstream().start().await;
        let ck = checker().await;
        let p = checking_plugin("check", "phases: \"rqbody,rqtrailers\", rqmode: buffered");
        let yaml = checked_config(up.addr, ck.addr, &p, &["check"], "");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let mut t = HeaderMap::new();
        t.insert("x-client-trailer", HeaderValue::from_static("abc"));
        let r = c
            .post("/a")
            .header("te", "trailers")
            // hyper's HTTP/1.1 encoder sends only the trailers `Trailer` names.
            .header("trailer", "x-client-trailer, x-body-checked, x-checked")
            .body_with_trailers("payload", t)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.body, "PAYLOAD!");
        assert_eq!(e.header("x-checked"), Some("200"));
        let trailer = |n: &str| e.trailers.get(n).cloned();
        assert_eq!(trailer("x-client-trailer"), Some(vec!["abc".to_string()]));
        // Paused in the last body call, the trailers stay writable.
        assert_eq!(trailer("x-body-checked"), Some(vec!["200".to_string()]));
        // Then the trailers phase paused for its own callout.
        assert_eq!(trailer("x-checked"), Some(vec!["200".to_string()]));
        assert_eq!(ck.requests.get(), 2);
        lg.assert_stat(&calls("check", "request_trailers"), 1.0).await;
        lg.assert_stat(&calls("check", "callout_response"), 2.0).await;

        // Denied from the trailers phase's callout: no upstream.
        let mut t = HeaderMap::new();
        t.insert("x-client-trailer", HeaderValue::from_static("forbidden"));
        let r = c
            .post("/a")
            .header("te", "trailers")
            .header("trailer", "x-client-trailer, x-body-checked")
            .body_with_trailers("payload", t)
            .send()
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "rejected: x-client-trailer=forbidden;x-body-checked=200;");
        assert_eq!(up.requests.get(), 1, "the upstream saw the denied request");
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_response_trailers_pause_for_a_callout() {
    let up = upstream().grpc().start().await;
    let ck = checker().await;
    let p = checking_plugin("check", "phases: \"rsbody,rstrailers\", rsmode: buffered");
    let yaml = checked_config(up.addr, ck.addr, &p, &["check"], "    protocol: h2\n");
    let lg = legate().config(&yaml).start();
    let mut c = client(Proto::H2, lg.addr("web")).await;
    let r = c
        .post("/echo.Echo/Say")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(grpc_frame(b"ping"))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut want = grpc_frame(b"PING").to_vec();
    want.push(b'!');
    assert_eq!(r.body, want);
    assert_eq!(r.header("x-checked"), Some("200"));
    let t = r.trailers.as_ref().expect("response trailers were dropped");
    assert_eq!(t.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
    assert_eq!(
        t.get("x-body-checked").map(|v| v.as_bytes()),
        Some(&b"200"[..])
    );
    assert_eq!(t.get("x-checked").map(|v| v.as_bytes()), Some(&b"200"[..]));
    lg.assert_stat(&calls("check", "response_trailers"), 1.0)
        .await;
    lg.assert_stat(&calls("check", "callout_response"), 2.0)
        .await;
}

/// A request body sent chunk by chunk: `first` now, each of `rest` once the
/// plugin's callouts counter reached its position (1, 2, ...), the end once it
/// passed them all (one more); nothing ends before.
fn paced_body<'a>(
    lg: &'a LegateHandle,
    plugin: &str,
    first: &'static str,
    rest: &'static [&'static str],
) -> (BoxBody, impl std::future::Future<Output = ()> + 'a) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    tx.send(Bytes::from(first)).unwrap();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|d| (Ok::<_, BoxError>(http_body::Frame::data(d)), rx))
    });
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(stream));
    let name = callouts(plugin);
    let drive = async move {
        for (n, chunk) in rest.iter().enumerate() {
            callouts_reach(lg, &name, n + 1).await;
            tx.send(Bytes::from(*chunk)).unwrap();
        }
        callouts_reach(lg, &name, rest.len() + 1).await;
        drop(tx);
    };
    (body, drive)
}

/// Waits until stat `name` is at least `n`.
async fn callouts_reach(lg: &LegateHandle, name: &str, n: usize) {
    eventually(HANG_GUARD, "the plugin's next callout", || async {
        (lg.stat(name).await.unwrap_or(0.0) >= n as f64).then_some(())
    })
    .await;
}

each_proto!(
    /// A streamed request body pauses chunk by chunk: each chunk is held
    /// (the rest of the body unread) until its callout answers, rewritten
    /// there, then goes on through the filters after the paused one.
    async fn a_streamed_request_body_pauses_for_a_callout_chunk_by_chunk(proto) {
        let up = upstream().start().await;
        let ck = checker().await;
        let p = checking_plugin("check", "phases: \"rqbody\"")
            + &plugin("count", "{ mode: body-stream-count, phases: \"rqbody,rs\" }", "{ cpu: 500ms }");
        let yaml = checked_config(up.addr, ck.addr, &p, &["check", "count"], "");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let (body, drive) = paced_body(&lg, "check", "first,", &["second"]);
        let (r, ()) = tokio::join!(c.post("/s").boxed_body(body).send(), drive);
        assert_eq!(r.status, 200, "{}", r.text());
        // Each chunk checked and rewritten in turn; the end-of-stream call
        // (empty: the end came alone) paused too and added its `!`.
        assert_eq!(r.echo().body, "FIRST,!SECOND!!");
        // `count`, after `check` in the chain, saw the rewritten chunks.
        assert_eq!(r.header("x-body-calls"), Some("3"));
        assert_eq!(r.header("x-body-bytes"), Some("15"));
        assert_eq!(r.header("x-body-eos"), Some("1"));
        assert_eq!(ck.requests.get(), 3);
        lg.assert_stat(&calls("check", "request_body"), 3.0).await;
        lg.assert_stat(&calls("check", "callout_response"), 3.0).await;
        let failures = lg.stat(r#"legate_plugin_failures_total{plugin="check"}"#).await;
        assert_eq!(failures.unwrap_or(0.0), 0.0);
    }
);

each_proto!(
    /// A streamed response body pauses as a request body does; its head went
    /// downstream before (not writable from the callback).
    async fn a_streamed_response_body_pauses_for_a_callout(proto) {
        use std::sync::{Arc, Mutex};
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let rx = Arc::new(Mutex::new(Some(rx)));
        let up = upstream()
            .handler(move |_req: Request<Incoming>| {
                let rx = rx.lock().unwrap().take();
                async move {
                    let stream = futures_util::stream::unfold(rx, |rx| async move {
                        let mut rx = rx?;
                        let d = rx.recv().await?;
                        Some((Ok::<_, BoxError>(http_body::Frame::data(d)), Some(rx)))
                    });
                    Response::new(http_body_util::BodyExt::boxed(
                        http_body_util::StreamBody::new(stream),
                    ))
                }
            })
            .start()
            .await;
        let ck = checker().await;
        let p = checking_plugin("check", "phases: \"rsbody\"");
        let yaml = checked_config(up.addr, ck.addr, &p, &["check"], "");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        tx.send(Bytes::from("po")).unwrap();
        let name = callouts("check");
        let drive = async {
            callouts_reach(&lg, &name, 1).await;
            tx.send(Bytes::from("ng")).unwrap();
            callouts_reach(&lg, &name, 2).await;
            drop(tx);
        };
        let (r, ()) = tokio::join!(c.get("/r").send(), drive);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "PO!NG!!");
        assert_eq!(r.header("x-checked"), None);
        assert_eq!(ck.requests.get(), 3);
        lg.assert_stat(&calls("check", "response_body"), 3.0).await;
        lg.assert_stat(&calls("check", "callout_response"), 3.0).await;
    }
);

each_proto!(
    /// A callout that denies a held chunk answers instead of the upstream,
    /// whose request is aborted.
    async fn a_streamed_request_chunk_denied_from_its_callout_answers_locally(proto) {
        let (_up, _ck, lg, mut c) = checked_route(proto, "phases: \"rqbody\"", "").await;
        // The denial is the second chunk's; the end, sent after its callout,
        // is never read.
        let (body, drive) = paced_body(&lg, "check", "first,", &["a forbidden word"]);
        let r = tokio::select! {
            r = c.post("/d").boxed_body(body).send() => r,
            () = async { drive.await; std::future::pending().await } => unreachable!(),
        };
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "rejected: a forbidden word");
        assert_eq!(r.header("x-from-callout"), Some("1"));
        lg.assert_stat(&calls("check", "callout_response"), 2.0).await;
        lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="4xx"}"#, 1.0)
            .await;
    }
);

/// `yaml` with `route` (YAML lines at the route's indentation) added to its
/// route.
fn with_route(yaml: &str, route: &str) -> String {
    yaml.replace(
        "            cluster: backend\n",
        &format!("            cluster: backend\n{route}"),
    )
}

/// An echo upstream, the checker, plugin `check` (`body-callout` with
/// `extra` config) as the chain, `route` (YAML lines) on its route, the proxy
/// and a client of it.
async fn checked_route(
    proto: Proto,
    extra: &str,
    route: &str,
) -> (UpstreamHandle, UpstreamHandle, LegateHandle, Client) {
    let up = upstream().start().await;
    let ck = checker().await;
    let p = checking_plugin("check", extra);
    let yaml = with_route(&checked_config(up.addr, ck.addr, &p, &["check"], ""), route);
    let lg = legate().config(&yaml).start();
    let c = client(proto, lg.addr("web")).await;
    (up, ck, lg, c)
}

/// A request body whose chunks a test sends as it goes (`tx`), never ended
/// unless `tx` is dropped.
fn open_body() -> (tokio::sync::mpsc::UnboundedSender<Bytes>, BoxBody) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|d| (Ok::<_, BoxError>(http_body::Frame::data(d)), rx))
    });
    (
        tx,
        http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(stream)),
    )
}

/// An upstream that answers `early` at once, while it reads the request body
/// to its end (`reads`) or not at all (it then closes the connection or
/// resets the stream: it will not read the rest).
async fn early_upstream(reads: bool) -> UpstreamHandle {
    upstream()
        .handler(move |req: Request<Incoming>| async move {
            if reads {
                tokio::spawn(async move {
                    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                });
            }
            Response::new(Full::new(Bytes::from("early")))
        })
        .start()
        .await
}

/// Posts `a forbidden word` to `/slow` (its check answers after 2 s) through
/// plugin `check` with `phases`, to [`early_upstream`] (`reads`): the answer,
/// and the proxy for its stats.
async fn early_answer_to_a_held_chunk(
    proto: Proto,
    reads: bool,
    phases: &str,
) -> (Resp, LegateHandle) {
    let up = early_upstream(reads).await;
    let ck = checker().await;
    let p = checking_plugin("check", &format!("phases: \"{phases}\", timeout: \"5000\""));
    let yaml = checked_config(up.addr, ck.addr, &p, &["check"], "");
    let lg = legate().config(&yaml).start();
    let mut c = client(proto, lg.addr("web")).await;
    let (tx, body) = open_body();
    tx.send(Bytes::from("a forbidden word")).unwrap();
    let r = c.post("/slow").boxed_body(body).send().await;
    drop(tx);
    (r, lg)
}

each_proto!(
    /// The upstream answers at once, while a request chunk is held for a slow
    /// check: the check's denial still replaces the upstream's answer, whose
    /// head had not gone downstream (abi/README.md §3.5).
    async fn a_held_chunk_denied_after_the_upstream_answered_replaces_its_answer(proto) {
        let (r, _lg) = early_answer_to_a_held_chunk(proto, true, "rqbody").await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "rejected: a forbidden word");
        assert_eq!(r.header("x-from-callout"), Some("1"));
    }
);

each_proto!(
    /// The upstream answers at once and stops reading the request body while
    /// a chunk of it is held: the hold is abandoned (the chunk can go nowhere)
    /// and the upstream's answer goes to the client, as Envoy's would.
    async fn a_held_chunk_the_upstream_no_longer_reads_lets_its_answer_through(proto) {
        let (r, lg) = early_answer_to_a_held_chunk(proto, false, "rqbody,rs").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "early");
        // Not the filter's failure; its response phase ran; the cancelled
        // check is never delivered.
        lg.assert_stat(&calls("check", "response_headers"), 1.0).await;
        let failures = lg.stat(r#"legate_plugin_failures_total{plugin="check"}"#).await;
        assert_eq!(failures.unwrap_or(0.0), 0.0);
        let delivered = lg.stat(&calls("check", "callout_response")).await;
        assert_eq!(delivered.unwrap_or(0.0), 0.0);
    }
);

each_proto!(
    /// On a route that reads the body first (to mirror it), a streamed body
    /// phase's denial is the filter's answer, not a body read error.
    async fn a_streamed_denial_on_a_mirroring_route_is_the_filters_answer(proto) {
        let (up, _ck, _lg, mut c) = checked_route(
            proto,
            "phases: \"rqbody\"",
            "            mirror: { cluster: backend }\n",
        )
        .await;
        let r = c.post("/d").body("a forbidden word").send().await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.text(), "rejected: a forbidden word");
        assert_eq!(up.requests.get(), 0, "the upstream got the denied request");
    }
);

each_proto!(
    /// A route that reads the body first (to mirror it) bounds that read by
    /// its timeout, counting only the client's time: a chunk held for a check
    /// longer than the timeout is no 408, a client that stalls after it is.
    async fn a_held_chunk_is_not_the_clients_time_but_a_stall_after_it_is(proto) {
        let (_up, _ck, lg, mut c) = checked_route(
            proto,
            "phases: \"rqbody\", timeout: \"5000\"",
            "            timeout: 1s\n            mirror: { cluster: backend }\n",
        )
        .await;

        // Held 2 s (`/slow`), then the end at once: through.
        let (tx, body) = open_body();
        tx.send(Bytes::from("first,")).unwrap();
        let drive = async {
            eventually(HANG_GUARD, "the chunk's check to answer", || async {
                (lg.stat(&calls("check", "callout_response")).await == Some(1.0)).then_some(())
            })
            .await;
            drop(tx);
        };
        let (r, ()) = tokio::join!(c.post("/slow").boxed_body(body).send(), drive);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().body, "FIRST,!!");

        // Held 2 s, then nothing: 408 once the client used up its second.
        let (tx, body) = open_body();
        tx.send(Bytes::from("first,")).unwrap();
        let r = tokio::time::timeout(HANG_GUARD, c.post("/slow").boxed_body(body).send())
            .await
            .expect("a client stalled after a held chunk was never timed out");
        assert_eq!(r.status, 408, "{}", r.text());
        // The check answered first: the 408 is the stall's, not the hold's.
        lg.assert_stat(&calls("check", "callout_response"), 3.0).await;
        drop(tx);
    }
);

each_proto!(
    /// Full duplex: the response, read whole for a buffering filter, ends while
    /// a request chunk is held for a check: its phases wait for the check.
    async fn a_buffered_response_waits_for_a_held_request_chunk(proto) {
        use std::sync::{Arc, Mutex};
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
        let end_rx = Arc::new(Mutex::new(Some(end_rx)));
        let up = upstream()
            .h2()
            .handler(move |req: Request<Incoming>| {
                let end_rx = end_rx.lock().unwrap().take();
                async move {
                    // Reads the request body to its end (a server that stops
                    // reading once it answered resets the request stream).
                    tokio::spawn(async move {
                        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                    });
                    // The head at once; the body's one chunk when told.
                    let stream = futures_util::stream::once(async move {
                        if let Some(rx) = end_rx {
                            let _ = rx.await;
                        }
                        Ok::<_, BoxError>(http_body::Frame::data(Bytes::from("pong")))
                    });
                    Response::new(http_body_util::BodyExt::boxed(
                        http_body_util::StreamBody::new(stream),
                    ))
                }
            })
            .start()
            .await;
        let ck = checker().await;
        let p = checking_plugin("check", "phases: \"rqbody\", timeout: \"5000\"")
            + &checking_plugin("whole", "phases: \"rsbody\", rsmode: buffered, timeout: \"5000\"");
        let yaml = checked_config(up.addr, ck.addr, &p, &["check", "whole"], "    protocol: h2\n");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let (tx, body) = open_body();
        tx.send(Bytes::from("a,")).unwrap();
        let drive = async {
            // The first chunk is checked (2 s), then the second is held
            // (2 s) while the response ends.
            eventually(HANG_GUARD, "the first chunk's check", || async {
                (lg.stat(&calls("check", "callout_response")).await == Some(1.0)).then_some(())
            })
            .await;
            tx.send(Bytes::from("b,")).unwrap();
            callouts_reach(&lg, &callouts("check"), 2).await;
            let _ = end_tx.send(());
            tx
        };
        let (r, tx) = tokio::join!(c.post("/slow").boxed_body(body).send(), drive);
        drop(tx);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "PONG!");
        assert_eq!(r.header("x-checked"), Some("200"));
    }
);

each_proto!(
    /// A pause from a streamed body phase with no callout in flight could
    /// never end: a failure of the plugin (abi/README.md §3.3).
    async fn a_pause_from_a_streamed_body_phase_without_a_callout_is_a_failure(proto) {
        let (_up, ck, lg, mut c) = checked_route(proto, "phases: \"rqbody\"", "").await;
        let r = c.post("/nocallout").body("hello").send().await;
        // Failed closed: 503 naming the plugin, as for a failure in any phase.
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.text(), "plugin_failure: check\n");
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="check"}"#, 1.0)
            .await;
        assert_eq!(ck.requests.get(), 0);
    }
);

each_proto!(
    async fn a_client_gone_while_a_body_phase_is_paused_frees_the_exchange(proto) {
        let up = upstream().start().await;
        let ck = checker().await;
        let p = checking_plugin(
            "check",
            "phases: \"rqbody,done\", rqmode: buffered, timeout: \"5000\"",
        );
        let yaml = checked_config(up.addr, ck.addr, &p, &["check"], "");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let pending = tokio::spawn(async move { c.post("/slow").body("hello").try_send().await });
        eventually(
            std::time::Duration::from_secs(5),
            "the slow callout to be sent",
            || async { (lg.stat(&callouts("check")).await == Some(1.0)).then_some(()) },
        )
        .await;
        // Dropping the request task drops the client and closes its connection.
        pending.abort();
        let _ = pending.await;
        lg.assert_stat(&calls("check", "done"), 1.0).await;
        lg.assert_stat(r#"legate_listener_requests_active{listener="web"}"#, 0.0)
            .await;
        // The callout was cancelled with the exchange: never delivered.
        let delivered = lg.stat(&calls("check", "callout_response")).await;
        assert_eq!(delivered.unwrap_or(0.0), 0.0);
        assert_eq!(up.requests.get(), 0, "the upstream got the request");
    }
);

// ---- full duplex: a body chunk while another phase is paused (issue 3) ----

/// An HTTP/2 upstream that answers `pong` at once, then reads the (first)
/// request's body on: what it received, or how its read failed, comes on the
/// receiver.
async fn pong_reader_upstream() -> (
    UpstreamHandle,
    tokio::sync::oneshot::Receiver<Result<Bytes, String>>,
) {
    use std::sync::{Arc, Mutex};
    let (got_tx, got_rx) = tokio::sync::oneshot::channel::<Result<Bytes, String>>();
    let got_tx = Arc::new(Mutex::new(Some(got_tx)));
    let up = upstream()
        .h2()
        .handler(move |req: Request<Incoming>| {
            let got_tx = got_tx.clone();
            async move {
                tokio::spawn(async move {
                    let r = http_body_util::BodyExt::collect(req.into_body())
                        .await
                        .map(|c| c.to_bytes())
                        .map_err(|e| e.to_string());
                    if let Some(tx) = got_tx.lock().unwrap().take() {
                        let _ = tx.send(r);
                    }
                });
                Response::new(Full::new(Bytes::from("pong")))
            }
        })
        .start()
        .await;
    (up, got_rx)
}

each_proto!(
    async fn a_request_chunk_while_a_response_phase_is_paused_waits_for_it(proto) {
        use std::sync::Arc;
        use tokio::sync::{mpsc, Notify};

        // The upstream (h2) answers at once, then keeps reading the request
        // body: what it received, or how its read failed, goes to `got_rx`.
        let (up, got_rx) = pong_reader_upstream().await;
        // The checker holds the response body phase paused until released.
        let (paused_tx, mut paused_rx) = mpsc::unbounded_channel::<()>();
        let release = Arc::new(Notify::new());
        let held = release.clone();
        let checker = upstream()
            .name("checker")
            .handler(move |_req: Request<Incoming>| {
                let paused_tx = paused_tx.clone();
                let held = held.clone();
                async move {
                    let _ = paused_tx.send(());
                    held.notified().await;
                    Response::new(Full::new(Bytes::from("ok")))
                }
            })
            .start()
            .await;
        let p = plugin("count", "{ mode: body-stream-count, phases: \"rq,rs,rqbody\" }", "{ cpu: 500ms }")
            + &checking_plugin("check", "phases: \"rq,rs,rsbody\", rsmode: buffered");
        let lg = legate()
            .config(&checked_config(
                up.addr,
                checker.addr,
                &p,
                &["count", "check"],
                "    protocol: h2\n",
            ))
            .start();
        let mut c = client(proto, lg.addr("web")).await;

        // The request body streams from here: chunk 1 now, chunk 2 once the
        // response body phase is paused.
        let (body_tx, body_rx) = mpsc::unbounded_channel::<Bytes>();
        body_tx.send(Bytes::from("first,")).unwrap();
        let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|d| (Ok::<_, BoxError>(http_body::Frame::data(d)), rx))
        });
        let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(stream));
        let drive = async {
            paused_rx.recv().await.unwrap();
            body_tx.send(Bytes::from("second")).unwrap();
            drop(body_tx);
            // The host would reset the exchange as soon as it read the chunk;
            // give it the time to read it before the phase resumes.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            release.notify_one();
        };
        let (r, ()) = tokio::join!(c.post("/duplex").boxed_body(body).send(), drive);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "PONG!");
        assert_eq!(r.header("x-checked"), Some("200"));
        lg.assert_stat(&calls("check", "response_body"), 1.0).await;
        // The chunk that arrived during the pause was not read then (no
        // reset). After the resume it either went through the filters before
        // the response ended, or, read after that, was not forwarded at all
        // (abi/README.md §4): never unfiltered.
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), got_rx)
            .await
            .expect("the upstream never finished reading the request body")
            .expect("the upstream's reader was dropped");
        if let Ok(b) = &got {
            assert_eq!(&b[..], b"first,second");
            lg.assert_stat_with(
                &calls("count", "request_body"),
                |n| n >= 2.0,
                "the second request chunk went through the streamed body phase",
            )
            .await;
        }
    }
);

each_proto!(
    /// Request data that arrives once the response ended (and with it the
    /// exchange's filters) is not forwarded: no filter could see it, and the
    /// upstream answered already (Envoy resets such an upstream request).
    async fn request_data_after_the_response_ended_is_not_forwarded_unfiltered(proto) {
        let (up, got_rx) = pong_reader_upstream().await;
        let p = plugin("count", "{ mode: body-stream-count, phases: \"rqbody\" }", "");
        let lg = legate()
            .config(&config_with(up.addr, &p, &["count"], "    protocol: h2\n"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let (tx, body) = open_body();
        tx.send(Bytes::from("first,")).unwrap();
        let r = c.post("/late").boxed_body(body).send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "pong");
        // The response is complete; now the rest of the request.
        let _ = tx.send(Bytes::from("second"));
        drop(tx);
        let got = tokio::time::timeout(HANG_GUARD, got_rx)
            .await
            .expect("the upstream never finished reading the request body")
            .expect("the upstream's reader was dropped");
        assert!(got.is_err(), "the upstream got {got:?}");
    }
);

each_proto!(
    async fn a_buffered_response_phase_may_pause_on_the_hosts_own_502(proto) {
        // The upstream is down: the host's 502 goes through the response body
        // phase (abi/README.md §3.6), which pauses on a callout and rewrites it.
        let ck = checker().await;
        let p = checking_plugin("check", "phases: \"rsbody\", rsmode: buffered");
        let yaml = checked_config(closed_port_addr(), ck.addr, &p, &["check"], "");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.get("/down").send().await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.text(), "UPSTREAM_CONNECT_FAILURE\n!");
        assert_eq!(r.header("x-checked"), Some("200"));
        assert_eq!(r.header("content-length"), Some("26"));
        lg.assert_stat(&calls("check", "response_body"), 1.0).await;
        lg.assert_stat(&calls("check", "callout_response"), 1.0).await;
    }
);

// ---- a buffered request body the client stalls on ----

each_proto!(
    /// A request body a filter buffers must arrive within the route timeout:
    /// a client that sends the head and part of the body, then stalls, gets
    /// 408 `request_timeout` instead of holding the request (and the
    /// filter's buffer) for as long as it keeps the connection. The body
    /// phase never runs and nothing goes upstream.
    async fn a_stalled_body_a_filter_buffers_times_out_with_408(proto) {
        use std::time::Duration;
        let up = upstream().start().await;
        let p = plugin(
            "upper",
            "{ mode: body-upper, phases: \"rqbody\", rqmode: buffered }",
            "",
        );
        let yaml = config(up.addr, &p, &["upper"]).replace(
            "            cluster: backend\n",
            "            cluster: backend\n            timeout: 300ms\n",
        );
        let lg = legate().config(&yaml).start();
        let answer = async {
            match proto {
                Proto::H1 => {
                    let mut c = RawConn::connect(lg.addr("web")).await;
                    c.write(b"PUT /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
                        .await;
                    let (got, _) = c.read_until_close(Duration::from_secs(5)).await;
                    let text = String::from_utf8_lossy(&got).into_owned();
                    (raw_status(&got), text)
                }
                Proto::H2 => {
                    use futures_util::StreamExt;
                    use http_body_util::BodyExt;
                    // Ten bytes, then nothing, with the stream left open.
                    let stalled = futures_util::stream::iter([Ok::<_, BoxError>(
                        hyper::body::Frame::data(Bytes::from_static(b"0123456789")),
                    )])
                    .chain(futures_util::stream::pending());
                    let r = client(proto, lg.addr("web"))
                        .await
                        .request(Method::PUT, "/slow")
                        .boxed_body(BodyExt::boxed(http_body_util::StreamBody::new(stalled)))
                        .send()
                        .await;
                    (Some(r.status.as_u16()), r.text())
                }
            }
        };
        let (status, text) = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("no answer while the body stalls");
        assert_eq!(status, Some(408), "{text}");
        assert!(text.contains("request_timeout"), "{text}");
        assert_eq!(up.requests.get(), 0);
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="4xx"}"#,
            1.0,
        )
        .await;
        lg.assert_stat(&calls("upper", "request_body"), 0.0).await;
    }
);
