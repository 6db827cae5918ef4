//! proxy-wasm filters that hold a whole message while an HTTP or gRPC call
//! checks it, as Envoy runs them: the headers callback returns `Pause` (wait
//! for the body), the end-of-stream body callback (or the trailers callback)
//! sends the body to a service and returns `Pause`, and the call's callback
//! rewrites the held body and resumes (`proxy_continue_stream`) or answers
//! locally. Real Legate, real upstream, real callout clusters (the `authz`
//! content checker and a tonic gRPC server), the guest built from source with
//! the `proxy-wasm` SDK (tests/proxy-wasm-guests, modes `body-callout`,
//! `trailers-callout`, `body-stuck-held`), over HTTP/1.1 and HTTP/2. The same
//! on streamed messages (modes `stream-callout`, `stream-trailers`: the
//! headers callbacks continue, the end of the body or the trailers are held
//! for the call), including a client going away and a route timeout during
//! the hold. Also
//! `proxy_grpc_cancel` of a unary call during a pause (mode `grpc-cancel`),
//! and pauses with nothing outstanding that the root context's tick resumes,
//! answers or resets after `proxy_set_effective_context`, or that nothing
//! resumes within `limits.pause` (mode `tick-resume`).

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use legate_tests::proxy_wasm::proxy_wasm_guest;
use legate_tests::*;

/// Listener `web` running plugin `checker` (the guest in `mode`, granted
/// `authz` and `grpc`) in front of `up`, with cluster `authz` at `authz` and
/// the HTTP/2 cluster `grpc` at `grpc`.
fn config(up: SocketAddr, authz: SocketAddr, grpc: SocketAddr, mode: &str) -> String {
    config_with(up, authz, grpc, mode, "{ cpu: 500ms }")
}

/// [`config`] with the plugin's `limits` (a flow map) and, if not empty,
/// `fail` policy.
fn config_with(
    up: SocketAddr,
    authz: SocketAddr,
    grpc: SocketAddr,
    mode: &str,
    limits: &str,
) -> String {
    // Modes whose headers callbacks pause for the body they then get:
    // Envoy's `StopIteration`, only with `allow_on_headers_stop_iteration`.
    let stop_iteration = matches!(
        mode,
        "body-callout" | "trailers-callout" | "body-stuck-held"
    );
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: checker }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - name: rest
            match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
  - name: authz
    endpoints:
      - address: {authz}
  - name: grpc
    protocol: h2
    endpoints:
      - address: {grpc}
plugins:
  - name: checker
    module: {}
    limits: {limits}
    capabilities: {{ clusters: [authz, grpc] }}
    proxy_wasm:
      plugin_config: {{ mode: {mode} }}
      allow_on_headers_stop_iteration: {stop_iteration}
",
        proxy_wasm_guest().display()
    )
}

/// What the guest's `on_log` saw (`stream-*` modes): `CODE_DETAILS`.
fn logged(what: &str) -> String {
    format!("legate_proxywasm_pw_logged_{what}{{plugin=\"checker\"}}")
}

fn calls(phase: &str) -> String {
    format!("legate_plugin_calls_total{{plugin=\"checker\",phase=\"{phase}\"}}")
}

const CALLOUTS: &str = r#"legate_plugin_callouts_total{plugin="checker"}"#;
const FAILURES: &str = r#"legate_plugin_failures_total{plugin="checker"}"#;
const AUTHZ_REQUESTS: &str = r#"legate_cluster_upstream_rq_total{cluster="authz"}"#;

/// The echo upstream's answer after the `body-callout` guest replaced it with
/// the checker's (`checked:` + the JSON upper-cased), lower-cased back and
/// parsed.
fn checked_echo(text: &str) -> Value {
    let json = text
        .strip_prefix("checked:")
        .unwrap_or_else(|| panic!("the response was not checked: {text}"));
    serde_json::from_str(&json.to_lowercase()).unwrap()
}

/// `POST /t` with body `payload` and trailer `x-client-trailer: value`, on a
/// new connection.
async fn post_with_trailer(proto: Proto, web: SocketAddr, value: &'static str) -> Resp {
    let mut t = HeaderMap::new();
    t.insert("x-client-trailer", HeaderValue::from_static(value));
    client(proto, web)
        .await
        .post("/t")
        .header("te", "trailers")
        // hyper's HTTP/1.1 encoder sends only the trailers `Trailer` names.
        .header("trailer", "x-client-trailer, x-pw-trailer-checked")
        .body_with_trailers("payload", t)
        .send()
        .await
}

each_proto!(
    /// The request body is held at end of stream while the checker sees it;
    /// the callback reads it, replaces it with the answer (another length) and
    /// resumes: the upstream gets the new body with the right
    /// `content-length`, and the header the callback set on the held head. A
    /// denial is answered from the callback instead of the upstream. The
    /// response goes through the same way (its head held, its body replaced).
    async fn a_request_body_held_for_a_call_is_rewritten_or_answered(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, az.addr, grpc.addr, "body-callout"))
            .start();
        let web = lg.addr("web");

        let r = client(proto, web)
            .await
            .post("/up")
            .streamed_body("hello pause", 3)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let text = r.text();
        // The response body was held and replaced too, with its length.
        assert_eq!(r.header("content-length"), Some(text.len().to_string().as_str()));
        let e = checked_echo(&text);
        let want = "checked:hello pause";
        assert_eq!(e["body"], want);
        assert_eq!(e["headers"]["content-length"][0], want.len().to_string());
        // Read again from the callback: the whole held body.
        assert_eq!(e["headers"]["x-pw-held-len"][0], "11");
        let held = r.header("x-pw-held-len").unwrap().parse::<usize>().unwrap();
        assert_eq!(held + "checked:".len(), text.len(), "the response held whole");

        // Refused by the checker: answered from the callback, the upstream
        // never gets it.
        let r = client(proto, web)
            .await
            .post("/up")
            .streamed_body("a forbidden word", 4)
            .send()
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.header("x-pw-body-denied"), Some("yes"));
        // The answer runs through the filter's own response callbacks
        // (Envoy's local reply through the filter chain): its response body
        // goes to the checker as any response's.
        assert_eq!(r.text(), "checked:DENIED:16");
        assert_eq!(up.requests.get(), 1);

        // A body call per chunk as it came (Envoy's way).
        lg.assert_stat_with(&calls("request_body"), |v| v >= 2.0, ">= 2")
            .await;
        lg.assert_stat_with(&calls("response_body"), |v| v >= 1.0, ">= 1")
            .await;
        // Three request checks and the 403's response check.
        lg.assert_stat(&calls("callout_response"), 4.0).await;
        lg.assert_stat(CALLOUTS, 4.0).await;
        lg.assert_stat(AUTHZ_REQUESTS, 4.0).await;
        lg.assert_stat(FAILURES, 0.0).await;

        // A pause at the end with nothing outstanding that nothing resumes
        // holds the exchange, as Envoy does, until the plugin's
        // `limits.pause`: then a failure of the filter.
        let lg = legate()
            .config(&config_with(
                up.addr,
                az.addr,
                grpc.addr,
                "body-stuck-held",
                "{ cpu: 500ms, pause: 300ms }",
            ))
            .start();
        let started = Instant::now();
        let r = client(proto, lg.addr("web"))
            .await
            .post("/up")
            .streamed_body("stuck", 2)
            .send()
            .await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(started.elapsed() >= Duration::from_millis(300));
        lg.assert_stat(FAILURES, 1.0).await;
        assert_eq!(up.requests.get(), 1);
    }
);

each_proto!(
    /// The response body is held at end of stream (the response headers
    /// callback waited for it) while the checker sees it: replaced with the
    /// answer, with its `content-length`, or replaced by the callback's local
    /// response.
    async fn a_response_body_held_for_a_call_is_replaced_or_answered(proto) {
        let up = upstream()
            .route("/fine", |_req| async {
                Response::new(Full::new(Bytes::from_static(b"fine data")))
            })
            .route("/leak", |_req| async {
                Response::new(Full::new(Bytes::from_static(b"some forbidden data")))
            })
            .start()
            .await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, az.addr, grpc.addr, "body-callout"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;

        let r = c.get("/fine").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "checked:FINE DATA");
        assert_eq!(r.header("content-length"), Some("17"));
        // Set on the held response head from the callback.
        assert_eq!(r.header("x-pw-held-len"), Some("9"));

        let r = c.get("/leak").send().await;
        assert_eq!(r.status, 451, "{}", r.text());
        assert_eq!(r.header("x-pw-resp-denied"), Some("yes"));
        assert_eq!(r.text(), "denied:19");

        lg.assert_stat(&calls("response_body"), 2.0).await;
        lg.assert_stat(&calls("callout_response"), 2.0).await;
        lg.assert_stat(CALLOUTS, 2.0).await;
        lg.assert_stat(AUTHZ_REQUESTS, 2.0).await;
        lg.assert_stat(FAILURES, 0.0).await;
        assert_eq!(up.requests.get(), 2);
    }
);

each_proto!(
    /// The same with a unary gRPC call (`proxy_grpc_call`): the request body is
    /// held until `proxy_on_grpc_receive` replaces it with the reply.
    async fn a_request_body_held_for_a_grpc_call(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, az.addr, grpc.addr, "body-callout"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c.post("/grpc/x").streamed_body("hi there", 3).send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = checked_echo(&r.text());
        assert_eq!(e["path"], "/grpc/x");
        assert_eq!(e["body"], "grpc:hi there");
        assert_eq!(e["headers"]["content-length"][0], "13");
        assert_eq!(grpc.calls.get(), 1);
        // The gRPC call and the response's HTTP call.
        lg.assert_stat(CALLOUTS, 2.0).await;
        lg.assert_stat(&calls("callout_response"), 2.0).await;
        lg.assert_stat(FAILURES, 0.0).await;
    }
);

each_proto!(
    /// `Pause` from the request trailers callback holds the trailers (and the
    /// body before them) for a call: the callback adds a trailer and resumes,
    /// or answers locally.
    async fn request_trailers_held_for_a_call(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, az.addr, grpc.addr, "trailers-callout"))
            .start();
        let web = lg.addr("web");
        let send = |value: &'static str| post_with_trailer(proto, web, value);
        let r = send("abc").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.body, "payload");
        assert_eq!(e.trailers.get("x-client-trailer"), Some(&vec!["abc".to_string()]));
        assert_eq!(
            e.trailers.get("x-pw-trailer-checked"),
            Some(&vec!["checked:ABC".to_string()])
        );

        let r = send("forbidden").await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.header("x-pw-body-denied"), Some("yes"));
        assert_eq!(up.requests.get(), 1);

        lg.assert_stat(&calls("request_trailers"), 2.0).await;
        lg.assert_stat(&calls("callout_response"), 2.0).await;
        lg.assert_stat(AUTHZ_REQUESTS, 2.0).await;
        lg.assert_stat(FAILURES, 0.0).await;
    }
);

each_proto!(
    /// `proxy_grpc_cancel` of a unary call (as Envoy): `OK` (a second cancel
    /// finds nothing: `NOT_FOUND`), and the reply never reaches the guest,
    /// though it arrives while the exchange is paused on a slower HTTP call
    /// (were it delivered, the guest's gRPC callback would resume the request
    /// early with `x-pw-grpc-reply`).
    async fn a_cancelled_unary_grpc_call_never_calls_back(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, az.addr, grpc.addr, "grpc-cancel"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // `authz` answers `/check/slow…` after 2 s.
        let r = c.get("/slow/x").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.header("x-pw-cancel"), Some("Ok(()),Err(NotFound)"));
        assert_eq!(e.header("x-pw-authz"), Some("ok:anonymous"));
        assert_eq!(e.header("x-pw-grpc-reply"), None, "the cancelled call called back");
        // Cancelled in the callback that sent it: aborted before it went out.
        assert_eq!(grpc.calls.get(), 0);
        lg.assert_stat(CALLOUTS, 2.0).await;
        // Only the HTTP call's callback ran.
        lg.assert_stat(&calls("callout_response"), 1.0).await;
        lg.assert_stat(FAILURES, 0.0).await;
    }
);

each_proto!(
    /// `proxy_grpc_cancel` of a unary call the server is working on (as
    /// Envoy): the request is reset, so the server's handler is dropped
    /// before it answers, and no callback comes. The call (a `slow` message,
    /// answered after 5 s) is cancelled in the callback of an HTTP call that
    /// `authz` answers after 2 s, while the exchange goes on.
    async fn cancelling_a_unary_grpc_call_in_flight_resets_its_request(proto) {
        // The upstream answers 4 s after the request reaches it (at 2 s), so
        // the exchange is still live when the server would answer the call
        // (5 s): only a reset of the call's own request drops its handler.
        let up = upstream().delay(Duration::from_secs(4)).start().await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, az.addr, grpc.addr, "grpc-cancel"))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        // `authz` answers `/check/slow…` after 2 s.
        let (r, ()) = tokio::join!(c.get("/slow/inflight").send(), async {
            eventually(Duration::from_secs(10), "the gRPC server to see the reset", || async {
                (grpc.abandoned.get() == 1).then_some(())
            })
            .await;
        });
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.header("x-pw-cancel"), Some("Ok(())"));
        assert_eq!(e.header("x-pw-authz"), Some("ok:anonymous"));
        assert_eq!(grpc.calls.get(), 1);
        assert_eq!(e.header("x-pw-grpc-reply"), None);
        lg.assert_stat(&calls("callout_response"), 1.0).await;
        lg.assert_stat(FAILURES, 0.0).await;
    }
);

/// `Pause` from the response trailers callback for a call: the callback adds a
/// trailer and resumes. In mode `trailers-callout` the response headers
/// callback waited for the body, so the head is held; in `stream-trailers` it
/// continued: the head and the body went out, and only the trailers are held.
/// Response trailers need an HTTP/2 upstream that sends them (gRPC).
async fn response_trailers_held(mode: &str) {
    let up = upstream().grpc().start().await;
    let az = authz_upstream().await;
    let grpc = legate_tests::grpc::grpc_upstream().start().await;
    let yaml = config(up.addr, az.addr, grpc.addr, mode).replacen(
        &format!("      - address: {}\n", up.addr),
        &format!("      - address: {}\n    protocol: h2\n", up.addr),
        1,
    );
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
        t.get("x-pw-trailer-checked").map(|v| v.as_bytes()),
        Some(&b"checked:YES"[..]),
        "{t:?}"
    );
    lg.assert_stat(&calls("response_trailers"), 1.0).await;
    lg.assert_stat(&calls("callout_response"), 1.0).await;
    lg.assert_stat(AUTHZ_REQUESTS, 1.0).await;
    lg.assert_stat(FAILURES, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_held_for_a_call() {
    response_trailers_held("trailers-callout").await;
}

/// A request body a slow client sends in `chunks`, 30 ms apart.
fn slow_body(chunks: &'static [&'static str]) -> BoxBody {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    let s = futures_util::stream::iter(chunks.iter()).then(|c| async move {
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        Ok::<_, BoxError>(hyper::body::Frame::data(Bytes::from_static(c.as_bytes())))
    });
    BodyExt::boxed(http_body_util::StreamBody::new(s))
}

/// An echo upstream that also counts the requests whose body arrived whole.
async fn counting_upstream() -> (
    UpstreamHandle,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let whole = std::sync::Arc::new(AtomicUsize::new(0));
    let w = whole.clone();
    let up = upstream()
        .handler(move |req| {
            let w = w.clone();
            async move {
                let r = echo(req).await;
                if r.status() == StatusCode::OK {
                    w.fetch_add(1, Ordering::SeqCst);
                }
                r
            }
        })
        .start()
        .await;
    (up, whole)
}

each_proto!(
    /// Envoy's most common body check, on a streamed body: the headers
    /// callback continues (the head goes upstream at once), the body callback
    /// pauses chunk by chunk (the filter holds them), and at end of stream it
    /// sends the whole body to the checker and returns `Pause`. The host holds
    /// the end of the body until the call's callback rewrites it and resumes:
    /// the upstream gets the checker's answer as the body. The response body
    /// (streamed too) is held the same way and replaced. A denial answers the
    /// client 403 from the callback and aborts the upstream request, which
    /// never gets a whole body.
    async fn a_streamed_request_body_held_at_end_for_a_call(proto) {
        use std::sync::atomic::Ordering;
        let (up, whole) = counting_upstream().await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, az.addr, grpc.addr, "stream-callout"))
            .start();
        let web = lg.addr("web");

        let r = client(proto, web)
            .await
            .post("/up")
            .boxed_body(slow_body(&["hel", "lo ", "pau", "se"]))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The response was streamed (its length removed) and held at its end.
        assert_eq!(r.header("content-length"), None);
        let e = checked_echo(&r.text());
        assert_eq!(e["body"], "checked:hello pause");
        // The head went out before the body: no length, and what the callback
        // set on it came too late (as in Envoy).
        assert!(e["headers"].get("content-length").is_none(), "{e}");
        assert!(e["headers"].get("x-pw-held-len").is_none(), "{e}");
        assert_eq!(whole.load(Ordering::SeqCst), 1);

        let r = client(proto, web)
            .await
            .post("/up")
            .boxed_body(slow_body(&["a forb", "idden ", "word"]))
            .send()
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.header("x-pw-body-denied"), Some("yes"));
        // The answer runs through the filter's own response callbacks
        // (Envoy's local reply through the filter chain): its response body
        // goes to the checker as any response's.
        assert_eq!(r.text(), "checked:DENIED:16");
        // The upstream saw the head, never the whole body.
        assert_eq!(whole.load(Ordering::SeqCst), 1);

        // The same with a unary gRPC call (`proxy_grpc_call`) holding the end.
        let r = client(proto, web)
            .await
            .post("/grpc/x")
            .boxed_body(slow_body(&["hi ", "there"]))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(checked_echo(&r.text())["body"], "grpc:hi there");
        assert_eq!(grpc.calls.get(), 1);
        assert_eq!(whole.load(Ordering::SeqCst), 2);

        // With the 403's response check (its answer runs through its own
        // response callbacks).
        lg.assert_stat(&calls("callout_response"), 6.0).await;
        lg.assert_stat(CALLOUTS, 6.0).await;
        lg.assert_stat(AUTHZ_REQUESTS, 5.0).await;
        lg.assert_stat(FAILURES, 0.0).await;
        lg.assert_stat(&calls("done"), 3.0).await;
    }
);

each_proto!(
    /// The upstream answers while the end of its request is held for a call
    /// (a streaming server: it answers before reading the whole body). The
    /// response waits for the held request to be resumed, then goes through
    /// the filters' response phases like any other (here: held and replaced
    /// by the checker's answer), never past them.
    async fn an_answer_during_a_held_request_end_goes_through_the_filters(proto) {
        let up = upstream()
            .handler(|req: Request<Incoming>| async move {
                use http_body_util::BodyExt;
                tokio::spawn(async move {
                    let _ = req.into_body().collect().await;
                });
                // After the request's end is held (its check takes 2s).
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                Response::new(Full::new(Bytes::from_static(b"early")))
            })
            .start()
            .await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, az.addr, grpc.addr, "stream-callout"))
            .start();
        let r = client(proto, lg.addr("web"))
            .await
            .post("/slow-early")
            .boxed_body(slow_body(&["hel", "lo"]))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "checked:EARLY");
        lg.assert_stat(&calls("response_headers"), 1.0).await;
        lg.assert_stat(&calls("response_body"), 1.0).await;
        lg.assert_stat(&calls("callout_response"), 2.0).await;
        lg.assert_stat(AUTHZ_REQUESTS, 2.0).await;
        lg.assert_stat(FAILURES, 0.0).await;
        lg.assert_stat(&calls("done"), 1.0).await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_response_trailers_held_for_a_call() {
    response_trailers_held("stream-trailers").await;
}

/// An upstream answering `/fine` and `/leak` with a body streamed in chunks
/// 30 ms apart (no length).
async fn chunked_upstream() -> UpstreamHandle {
    fn chunks(parts: &'static [&'static str]) -> Response<BoxBody> {
        Response::new(slow_body(parts))
    }
    upstream()
        .route("/fine", |_req| async { chunks(&["fine ", "da", "ta"]) })
        .route("/leak", |_req| async {
            chunks(&["some ", "forbidden ", "data"])
        })
        .start()
        .await
}

each_proto!(
    /// A response body streamed from the upstream (the response headers
    /// callback continued: the head is out) is held at its end for a call:
    /// resumed, the client gets the rewritten body; answered locally, the
    /// response cannot be replaced (its head is out), so the stream is reset,
    /// as Envoy does.
    async fn a_streamed_response_body_held_at_end_for_a_call(proto) {
        let up = chunked_upstream().await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, az.addr, grpc.addr, "stream-callout"))
            .start();
        let web = lg.addr("web");

        let r = client(proto, web).await.get("/fine").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "checked:FINE DATA");

        let r = client(proto, web).await.get("/leak").try_send().await;
        assert!(r.is_err(), "the response was not reset: {r:?}");

        // Three chunks and the end (the stream learns it after the last chunk).
        lg.assert_stat(&calls("response_body"), 8.0).await;
        lg.assert_stat(&calls("callout_response"), 2.0).await;
        lg.assert_stat(AUTHZ_REQUESTS, 2.0).await;
        lg.assert_stat(FAILURES, 0.0).await;
        lg.assert_stat(&calls("done"), 2.0).await;
        assert_eq!(up.requests.get(), 2);
    }
);

each_proto!(
    /// `Pause` from the request trailers callback of a streamed request (the
    /// headers callback continued): the trailers are held for the call, the
    /// callback adds one and resumes, or answers locally (the upstream request
    /// is aborted).
    async fn streamed_request_trailers_held_for_a_call(proto) {
        let (up, whole) = counting_upstream().await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, az.addr, grpc.addr, "stream-trailers"))
            .start();
        let web = lg.addr("web");
        let send = |value: &'static str| post_with_trailer(proto, web, value);
        let r = send("abc").await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.body, "payload");
        assert_eq!(
            e.trailers.get("x-pw-trailer-checked"),
            Some(&vec!["checked:ABC".to_string()])
        );

        let r = send("forbidden").await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.header("x-pw-body-denied"), Some("yes"));
        assert_eq!(whole.load(std::sync::atomic::Ordering::SeqCst), 1);

        lg.assert_stat(&calls("request_trailers"), 2.0).await;
        lg.assert_stat(&calls("callout_response"), 2.0).await;
        lg.assert_stat(FAILURES, 0.0).await;
    }
);

each_proto!(
    /// A client that goes away while the end of its streamed body is held for
    /// a call (the checker answers `/check/body/slow…` after 2 s): the wait
    /// ends, the context is finished (`on_done`, `on_log`) and the upstream
    /// never gets the whole body; the worker goes on serving. The stream idle
    /// timeout during the hold answers 408 and finishes the context the same
    /// way. The route timeout (shorter) does not run during the hold: it
    /// starts once the body has gone upstream whole, and the hold is the
    /// filter's time, not the endpoint's.
    async fn a_held_streamed_body_ends_cleanly_on_disconnect_or_timeout(proto) {
        use std::sync::atomic::Ordering;
        let (up, whole) = counting_upstream().await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        // `/slowtimed` goes to a route with a timeout and a longer idle timeout.
        let yaml = config(up.addr, az.addr, grpc.addr, "stream-callout").replace("          - name: rest\n", "          - name: timed\n            match: { prefix: /slowtimed }\n            cluster: backend\n            timeout: 500ms\n            idle_timeout: 1s\n          - name: rest\n");
        let lg = legate().config(&yaml).start();
        let web = lg.addr("web");

        let mut c = client(proto, web).await;
        let gone = tokio::time::timeout(
            std::time::Duration::from_millis(600),
            c.post("/slow/x").boxed_body(slow_body(&["ab", "cd"])).try_send(),
        )
        .await;
        assert!(gone.is_err(), "answered before the checker: {gone:?}");
        drop(c);
        lg.assert_stat_with(&calls("done"), |v| v == 1.0, "the held context finished")
            .await;
        lg.assert_stat(&calls("log"), 1.0).await;

        // The worker was never blocked: another request goes through meanwhile.
        let r = client(proto, web)
            .await
            .post("/up")
            .boxed_body(slow_body(&["fine"]))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());

        let r = client(proto, web)
            .await
            .post("/slowtimed")
            .boxed_body(slow_body(&["ab", "cd"]))
            .send()
            .await;
        assert_eq!(r.status, 408, "{}", r.text());
        assert_eq!(r.text(), "stream_idle_timeout\n");
        // (The filters' response callbacks do not see this 408: it does not
        // wait for the callout; docs/proxy-wasm.md.)
        lg.assert_stat_with(&calls("done"), |v| v == 3.0, "every context finished")
            .await;
        lg.assert_stat(&calls("log"), 3.0).await;
        // `on_log` does see how each exchange ended, the 408 too.
        lg.assert_stat(&logged("200_via_upstream"), 1.0).await;
        lg.assert_stat(&logged("408_stream_idle_timeout"), 1.0).await;
        lg.assert_stat(&logged("none_downstream_disconnect"), 1.0).await;
        // Only `/up` reached the upstream whole.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert_eq!(whole.load(Ordering::SeqCst), 1);
        lg.assert_stat(&calls("done"), 3.0).await;
    }
);

each_proto!(
    /// The 408 bound on a request body buffered for retries counts only the
    /// time spent waiting for the client: the filter holding the end of the
    /// streamed body for a call (2 s, the checker's `/slow` delay) longer
    /// than the route timeout (1 s) is the filter's time, under its pause
    /// bound, and the request goes on (the route timeout starts again for the
    /// attempts) instead of getting 408.
    async fn a_held_body_end_does_not_count_toward_the_408_bound(proto) {
        let up = upstream().start().await;
        let az = authz_upstream().await;
        let grpc = legate_tests::grpc::grpc_upstream().start().await;
        let yaml = config(up.addr, az.addr, grpc.addr, "stream-callout").replace(
            "            cluster: backend\n",
            "            cluster: backend\n            timeout: 1s\n            \
             retry: { retry_on: [5xx], num_retries: 1 }\n",
        );
        let lg = legate().config(&yaml).start();
        let r = client(proto, lg.addr("web"))
            .await
            .request(Method::PUT, "/slow")
            .boxed_body(slow_body(&["ab", "cd"]))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(checked_echo(&r.text())["body"], "checked:abcd");
        lg.assert_stat(CALLOUTS, 2.0).await;
        lg.assert_stat(FAILURES, 0.0).await;
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="2xx"}"#,
            1.0,
        )
        .await;
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="4xx"}"#,
            0.0,
        )
        .await;
    }
);

/// Listener `web` running plugin `waiter` (mode `tick-resume`: its root
/// context ticks every 20 ms and resumes, answers or resets the contexts
/// waiting for it) in front of `up`, with the plugin's `limits` (a flow map)
/// and `extra` lines (e.g. `fail: open`); with
/// `allow_on_headers_stop_iteration` (`/wait/body` and `/wait/response` get
/// their body callbacks while their heads wait).
fn tick_config(up: SocketAddr, limits: &str, extra: &str) -> String {
    tick_config_with(up, limits, extra, true, 20)
}

/// [`tick_config`] with `allow_on_headers_stop_iteration` set to
/// `stop_iteration` and the tick every `tick_ms`.
fn tick_config_with(
    up: SocketAddr,
    limits: &str,
    extra: &str,
    stop_iteration: bool,
    tick_ms: u64,
) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: waiter }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - name: rest
            match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
plugins:
  - name: waiter
    module: {}
    limits: {limits}
{extra}    proxy_wasm:
      plugin_config: {{ mode: tick-resume, tick_ms: {tick_ms} }}
      allow_on_headers_stop_iteration: {stop_iteration}
",
        proxy_wasm_guest().display()
    )
}

const WAITER_FAILURES: &str = r#"legate_plugin_failures_total{plugin="waiter"}"#;
/// Hostcalls of the guest's ticks that failed (`set_effective_context`,
/// `resume_http_request`, …).
const TICK_ERRORS: &str = r#"legate_proxywasm_pw_tick_errors{plugin="waiter"}"#;
/// Contexts the guest's ticks acted on.
const TICK_ACTED: &str = r#"legate_proxywasm_pw_tick_acted{plugin="waiter"}"#;
/// Body callbacks of contexts still waiting for the tick.
const TICK_EARLY_BODY: &str = r#"legate_proxywasm_pw_tick_early_body{plugin="waiter"}"#;

each_proto!(
    /// Envoy's default (proxy-wasm-cpp-host turns `StopIteration` from a
    /// headers callback into `StopAllIterationAndWatermark`): a request whose
    /// headers callback returns `Pause` with nothing outstanding waits, body
    /// and all, for the filter to resume; no body callback comes before. A
    /// tick that answers it 429 answers a request with a body too (whole or
    /// streamed): the upstream never sees it (it used to go upstream with
    /// the body, the default body callback continuing it). A tick that
    /// resumes it lets the body go on after it. The same for a response
    /// whose headers callback waits for the tick.
    async fn a_headers_pause_holds_the_body_until_the_filter_resumes(proto) {
        let up = upstream().start().await;
        // A tick every 100 ms: a body callback before it would be seen.
        let cfg = tick_config_with(up.addr, "{ cpu: 500ms }", "", false, 100);
        let lg = legate().config(&cfg).start();
        let web = lg.addr("web");

        let r = tokio::time::timeout(
            HANG_GUARD,
            client(proto, web).await.post("/wait/local").body("payload").send(),
        )
        .await
        .expect("the tick did not answer the request with a body");
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.header("x-pw-tick"), Some("local"));
        let r = tokio::time::timeout(
            HANG_GUARD,
            client(proto, web)
                .await
                .post("/wait/local/streamed")
                .streamed_body("pay load", 3)
                .send(),
        )
        .await
        .expect("the tick did not answer the request with a streamed body");
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(up.requests.get(), 0);

        let r = tokio::time::timeout(
            HANG_GUARD,
            client(proto, web)
                .await
                .post("/wait/resume")
                .streamed_body("resumed body", 4)
                .send(),
        )
        .await
        .expect("the tick did not resume the request with a body");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().body, "resumed body");

        let r = tokio::time::timeout(
            HANG_GUARD,
            client(proto, web).await.get("/wait/held-response").send(),
        )
        .await
        .expect("the tick did not resume the response");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-waited"), Some("held"));
        assert_eq!(r.echo().path, "/wait/held-response");

        assert_eq!(up.requests.get(), 2);
        lg.assert_stat(TICK_ACTED, 4.0).await;
        lg.assert_stat(TICK_EARLY_BODY, 0.0).await;
        lg.assert_stat(TICK_ERRORS, 0.0).await;
        lg.assert_stat(WAITER_FAILURES, 0.0).await;
    }
);

each_proto!(
    /// Envoy's deferred resume: the request headers callback (a GET: end of
    /// stream) returns `Pause` with nothing outstanding, and the root
    /// context's tick resumes it (`proxy_set_effective_context` +
    /// `proxy_continue_stream`): the request reaches the upstream. Several
    /// requests waiting at once are all let through (a filter that queues
    /// requests). The same for a `Pause` at the end of a held body: the body,
    /// as the body callback left it, goes on when the tick resumes it; and
    /// for a response paused at the end of its held body, which the tick
    /// resumes with `HTTP_RESPONSE`. No failure is counted. It used to be refused at once (503, nothing could
    /// resume it).
    async fn a_pause_with_nothing_outstanding_is_resumed_by_a_tick(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&tick_config(up.addr, "{ cpu: 500ms }", ""))
            .start();
        let web = lg.addr("web");

        let r = client(proto, web).await.get("/wait/resume").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().path, "/wait/resume");

        // Four waiting at once, each on its own connection.
        let rs = futures_util::future::join_all((0..4).map(|i| async move {
            client(proto, web)
                .await
                .get(&format!("/wait/resume/{i}"))
                .send()
                .await
        }))
        .await;
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(r.status, 200, "{i}: {}", r.text());
            assert_eq!(r.echo().path, format!("/wait/resume/{i}"));
        }

        // The end of a held body, paused with nothing outstanding.
        let r = client(proto, web)
            .await
            .post("/wait/body")
            .streamed_body("hello tick", 3)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.path, "/wait/body");
        assert_eq!(e.body, "HELLO TICK");

        // A response paused at the end of its held body, resumed by a tick's
        // `proxy_continue_stream(HTTP_RESPONSE)`.
        let r = tokio::time::timeout(
            HANG_GUARD,
            client(proto, web).await.get("/wait/response").send(),
        )
        .await
        .expect("the tick did not resume the response");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-waited"), Some("response"));
        assert_eq!(r.echo().path, "/wait/response");

        assert_eq!(up.requests.get(), 7);
        lg.assert_stat(TICK_ACTED, 7.0).await;
        lg.assert_stat(TICK_ERRORS, 0.0).await;
        lg.assert_stat(WAITER_FAILURES, 0.0).await;
    }
);

each_proto!(
    /// A tick may also answer a paused request (`proxy_send_local_response`
    /// after `proxy_set_effective_context`): the client gets the answer, the
    /// upstream never sees the request. Or reset it (`proxy_close_stream`):
    /// the client sees the stream reset, as Envoy's `resetStream`. Neither
    /// is a failure.
    async fn a_tick_answers_or_resets_a_paused_request(proto) {
        let up = upstream().start().await;
        let lg = legate()
            .config(&tick_config(up.addr, "{ cpu: 500ms }", ""))
            .start();
        let web = lg.addr("web");

        let r = client(proto, web).await.get("/wait/local").send().await;
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.header("x-pw-tick"), Some("local"));
        assert_eq!(r.text(), "answered by the tick");

        let r = tokio::time::timeout(
            HANG_GUARD,
            client(proto, web).await.get("/wait/close").try_send(),
        )
        .await
        .expect("the reset from the tick did not reach the exchange");
        assert!(r.is_err(), "answered {:?}", r.map(|r| (r.status, r.text())));

        assert_eq!(up.requests.get(), 0);
        lg.assert_stat(TICK_ACTED, 2.0).await;
        lg.assert_stat(TICK_ERRORS, 0.0).await;
        lg.assert_stat(WAITER_FAILURES, 0.0).await;

        // The VM serves on.
        let r = client(proto, web).await.get("/wait/resume").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
);

each_proto!(
    /// A pause with nothing outstanding that nothing resumes holds the
    /// exchange until the plugin's `limits.pause`, then fails by its failure
    /// policy, as any pause that outlives it: fail closed, 503 naming the
    /// plugin (the upstream never sees the request); fail open, the request
    /// goes on without the filter. Either way one failure is counted.
    async fn a_pause_nothing_resumes_ends_at_the_pause_limit(proto) {
        let up = upstream().start().await;
        let limits = "{ cpu: 500ms, pause: 300ms }";
        let lg = legate().config(&tick_config(up.addr, limits, "")).start();
        let started = Instant::now();
        let r = tokio::time::timeout(
            HANG_GUARD,
            client(proto, lg.addr("web")).await.get("/wait/never").send(),
        )
        .await
        .expect("the pause was not ended by `limits.pause`");
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.text(), "plugin_failure: waiter\n");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "failed after {took:?}");
        assert_eq!(up.requests.get(), 0);
        lg.assert_stat(WAITER_FAILURES, 1.0).await;
        // The VM serves on.
        let r = client(proto, lg.addr("web")).await.get("/wait/resume").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        drop(lg);

        let lg = legate()
            .config(&tick_config(up.addr, limits, "    fail: open\n"))
            .start();
        let started = Instant::now();
        let r = client(proto, lg.addr("web")).await.get("/wait/never").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().path, "/wait/never");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "went on after {took:?}");
        lg.assert_stat(WAITER_FAILURES, 1.0).await;
    }
);
