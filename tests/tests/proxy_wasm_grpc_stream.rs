//! proxy-wasm gRPC streams (`proxy_grpc_stream` / `_send` / `_close` /
//! `_cancel` and the four stream callbacks) against a real tonic server
//! (tests/src/grpc.rs), driven by the upstream `proxy-wasm` SDK's test guest in
//! mode `grpc-stream` (tests/proxy-wasm-guests): the guest's root context opens
//! each stream from `on_queue_ready` and records every callback in shared data,
//! which a later request reads back (`/result/<key>`). Run over HTTP/1.1 and
//! HTTP/2 clients.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};

use legate_tests::grpc::GrpcUpstreamHandle;
use legate_tests::proxy_wasm::proxy_wasm_guest;
use legate_tests::*;

/// Listener `web` running plugin `streamer` (mode `grpc-stream`, granted
/// clusters `grpc` and `dead`), route to `backend` at `up`; cluster `grpc` at
/// `grpc` and `dead` at `dead`, both HTTP/2. Each config has its own `vm_id`:
/// the tests' Legates share this process, hence shared data and queues.
fn config(up: SocketAddr, grpc: SocketAddr, dead: SocketAddr) -> String {
    static VM: AtomicU32 = AtomicU32::new(0);
    let vm = VM.fetch_add(1, Relaxed);
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: streamer }}]
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
  - name: grpc
    protocol: h2
    endpoints:
      - address: {grpc}
  - name: dead
    protocol: h2
    endpoints:
      - address: {dead}
plugins:
  - name: streamer
    module: {}
    limits: {{ cpu: 500ms }}
    capabilities: {{ clusters: [grpc, dead] }}
    proxy_wasm:
      vm_id: streams{vm}
      plugin_config: {{ mode: grpc-stream }}
",
        proxy_wasm_guest().display()
    )
}

/// A test's servers and proxy: the echo upstream, the tonic server, a Legate
/// on [`config`] (a dead cluster on a closed port) and a `proto` client of its
/// listener.
async fn setup(proto: Proto) -> (UpstreamHandle, GrpcUpstreamHandle, LegateHandle, Client) {
    setup_with(proto, None, "").await
}

/// [`setup`] with the echo upstream answering after `delay`, and the
/// plugin's `limits: { cpu: 500ms }` line replaced by `plugin` (unless empty:
/// e.g. `fail: open` and other limits).
async fn setup_with(
    proto: Proto,
    delay: Option<Duration>,
    plugin: &str,
) -> (UpstreamHandle, GrpcUpstreamHandle, LegateHandle, Client) {
    let up = match delay {
        Some(d) => upstream().delay(d),
        None => upstream(),
    }
    .start()
    .await;
    let grpc = legate_tests::grpc::grpc_upstream().start().await;
    let mut cfg = config(up.addr, grpc.addr, closed_port_addr());
    if !plugin.is_empty() {
        const LIMITS: &str = "    limits: { cpu: 500ms }\n";
        assert!(cfg.contains(LIMITS));
        cfg = cfg.replace(LIMITS, plugin);
    }
    let lg = legate().config(&cfg).start();
    let c = client(proto, lg.addr("web")).await;
    (up, grpc, lg, c)
}

/// [`setup`] with `allow_on_headers_stop_iteration` (Envoy's `StopIteration`:
/// a headers `Pause` holds only the head while the body callbacks go on).
async fn setup_stop_iteration(
    proto: Proto,
) -> (UpstreamHandle, GrpcUpstreamHandle, LegateHandle, Client) {
    let up = upstream().start().await;
    let grpc = legate_tests::grpc::grpc_upstream().start().await;
    let cfg = config(up.addr, grpc.addr, closed_port_addr()).replace(
        "    proxy_wasm:\n",
        "    proxy_wasm:\n      allow_on_headers_stop_iteration: true\n",
    );
    let lg = legate().config(&cfg).start();
    let c = client(proto, lg.addr("web")).await;
    (up, grpc, lg, c)
}

/// The plugin still serves: a request paused on its stream is resumed by
/// the reply (a VM that failed or trapped would not do this).
async fn assert_still_serves(c: &mut Client) {
    let r = c.get("/await/again").send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().header("x-pw-stream-verdict"), Some("again"));
}

/// Starts scenario `scenario` recorded under `key`.
async fn start(c: &mut Client, key: &str, scenario: &str) {
    let r = c.get(&format!("/stream/{key}/{scenario}")).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-pw-queued"), Some("ok"));
}

/// The record of `key` so far.
async fn record(c: &mut Client, key: &str) -> String {
    let r = c.get(&format!("/result/{key}")).send().await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("x-pw-stream").unwrap_or_default().to_string()
}

/// Polls the record of `key` until `done` holds (5 s at most); every record
/// seen on the way, the last one last.
async fn wait_record(c: &mut Client, key: &str, done: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen: Vec<String> = Vec::new();
    loop {
        let r = record(c, key).await;
        if seen.last() != Some(&r) {
            seen.push(r.clone());
        }
        if done(&r) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "stream `{key}` did not finish; records seen: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn closed(r: &str) -> bool {
    r.contains("after:") || r.contains("open-error")
}

fn stat(name: &str) -> String {
    format!("{name}{{plugin=\"streamer\"}}")
}

each_proto!(
    /// Server streaming: every message is delivered as it arrives (a record
    /// with some messages and no close is seen while the server paces them),
    /// then the trailing metadata and the close with status 0; the initial
    /// metadata is the response head (with `:status`, as in Envoy). An error status from the server reaches
    /// `proxy_on_grpc_close` with its message (and `proxy_get_status`), after
    /// the messages sent before it.
    async fn a_server_stream_delivers_each_message_then_trailers_and_close(proto) {
        let (up, grpc, lg, mut c) = setup(proto).await;

        start(&mut c, "paced", "count/3/300").await;
        let seen = wait_record(&mut c, "paced", closed).await;
        let last = seen.last().unwrap();
        assert_eq!(
            last,
            "open;init:200:application/grpc;msg:1;msg:2;msg:3;trail:0;close:0/0:;after:Ok(())",
            "{seen:#?}"
        );
        assert!(
            seen.iter().any(|r| r.contains("msg:1") && !r.contains("msg:3")),
            "messages were not delivered one by one: {seen:#?}"
        );

        start(&mut c, "failed", "fail/9").await;
        let seen = wait_record(&mut c, "failed", closed).await;
        assert_eq!(
            seen.last().unwrap(),
            "open;init:200:application/grpc;msg:1;msg:2;trail:9;\
             close:9/9:stream failed on purpose;after:Ok(())",
            "{seen:#?}"
        );
        assert_eq!(grpc.calls.get(), 2);
        assert_eq!(up.requests.get(), 0);
        lg.assert_stat(&stat("legate_plugin_grpc_streams_total"), 2.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_stream_messages_total"), 5.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_stream_failures_total"), 1.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
            .await;
        assert_families_documented(&lg.stats().await);
    }
);

each_proto!(
    /// `proxy_grpc_close` is Envoy's local close: the request side ends (the
    /// server, which waits for it, then answers) and the callbacks go on; the
    /// token is gone once both sides closed.
    async fn close_half_closes_and_the_replies_still_arrive(proto) {
        let (_up, _grpc, lg, mut c) = setup(proto).await;
        start(&mut c, "half", "close/2").await;
        let seen = wait_record(&mut c, "half", closed).await;
        assert_eq!(
            seen.last().unwrap(),
            "open;closed:Ok(());init:200:application/grpc;msg:1;msg:2;trail:0;close:0/0:;\
             after:Err(NotFound)",
            "{seen:#?}"
        );
        lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
            .await;
    }
);

each_proto!(
    /// `proxy_grpc_cancel` resets the stream: `OK`, then the token is unknown
    /// (`NOT_FOUND` for a second cancel and for a send), and no callback
    /// follows although the server had more to send.
    async fn cancel_resets_and_nothing_follows(proto) {
        let (_up, _grpc, lg, mut c) = setup(proto).await;
        start(&mut c, "cancelled", "cancel").await;
        let want = "open;init:200:application/grpc;msg:1;cancel:Ok(()),Err(NotFound),Err(NotFound)";
        wait_record(&mut c, "cancelled", |r| r == want).await;
        // The server would have sent four more replies, 200 ms apart.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(record(&mut c, "cancelled").await, want);
        lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_stream_messages_total"), 1.0)
            .await;
    }
);

each_proto!(
    /// Statuses the SDK handles: an unknown token is `NOT_FOUND` for send,
    /// close and cancel; a cluster the plugin is not granted is
    /// `PARSE_FAILURE` (Envoy's answer for an upstream it cannot use).
    async fn unknown_tokens_and_ungranted_clusters_are_refused(proto) {
        let (_up, grpc, lg, mut c) = setup(proto).await;
        let r = c.get("/direct/unknown").send().await;
        assert_eq!(
            r.header("x-pw-unknown"),
            Some("Err(NotFound),Err(NotFound),Err(NotFound)"),
            "{}",
            r.text()
        );
        let r = c.get("/direct/ungranted").send().await;
        assert_eq!(r.header("x-pw-open"), Some("Err(ParseFailure)"), "{}", r.text());
        assert_eq!(grpc.calls.get(), 0);
        lg.assert_stat(&stat("legate_plugin_grpc_streams_total"), 0.0)
            .await;
    }
);

each_proto!(
    /// A stream whose upstream does not answer closes with 14 `UNAVAILABLE`,
    /// without metadata callbacks.
    async fn a_stream_to_a_dead_upstream_closes_with_unavailable(proto) {
        let (_up, _grpc, lg, mut c) = setup(proto).await;
        start(&mut c, "nobody", "dead").await;
        let seen = wait_record(&mut c, "nobody", closed).await;
        assert_eq!(
            seen.last().unwrap(),
            "open;close:14/14:upstream unavailable;after:Ok(())",
            "{seen:#?}"
        );
        lg.assert_stat(&stat("legate_plugin_grpc_stream_failures_total"), 1.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
            .await;
    }
);

each_proto!(
    /// Bidirectional: each message the filter sends from a callback (the
    /// stream already running) reaches the server, whose echo comes back
    /// before the next is sent; the filter's half-close then ends the call
    /// with status 0.
    async fn a_bidi_stream_exchanges_messages_one_by_one(proto) {
        let (_up, grpc, lg, mut c) = setup(proto).await;
        start(&mut c, "talk", "chat/3").await;
        let seen = wait_record(&mut c, "talk", closed).await;
        assert_eq!(
            seen.last().unwrap(),
            "open;init:200:application/grpc;msg:m1;msg:m2;msg:m3;closed:Ok(());trail:0;\
             close:0/0:;after:Err(NotFound)",
            "{seen:#?}"
        );
        assert_eq!(grpc.calls.get(), 1);
        lg.assert_stat(&stat("legate_plugin_grpc_stream_messages_total"), 3.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
            .await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_are_capped_per_vm() {
    let (_up, grpc, lg, mut c) = setup(Proto::H1).await;
    start(&mut c, "many", "cap").await;
    let seen = wait_record(&mut c, "many", closed).await;
    assert_eq!(seen.last().unwrap(), "cap:64:InternalFailure;after:");
    lg.assert_stat(&stat("legate_plugin_grpc_streams_total"), 64.0)
        .await;
    lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
        .await;
    // Cancelled in the call that opened them: never sent.
    assert_eq!(grpc.calls.get(), 0);
    // The VM can open streams again.
    start(&mut c, "again", "count/1").await;
    let seen = wait_record(&mut c, "again", closed).await;
    assert!(seen.last().unwrap().contains("close:0/0:"), "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_in_a_stream_callback_ends_the_vms_streams() {
    let (_up, _grpc, lg, mut c) = setup(Proto::H1).await;
    start(&mut c, "boom", "trap").await;
    let want = "open;init:200:application/grpc;msg:1";
    wait_record(&mut c, "boom", |r| r == want).await;
    lg.assert_stat(r#"legate_plugin_traps_total{plugin="streamer"}"#, 1.0)
        .await;
    lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
        .await;
    // Four more replies were due, 200 ms apart: none is delivered.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(record(&mut c, "boom").await, want);
    // A new VM serves new streams.
    start(&mut c, "after", "count/2").await;
    let seen = wait_record(&mut c, "after", closed).await;
    assert!(
        seen.last().unwrap().contains("msg:2;trail:0;close:0/0:"),
        "{seen:#?}"
    );
}

each_proto!(
    /// A stream opened by an HTTP context is reset when that context is
    /// deleted (as Envoy does when the context is destroyed): it is counted
    /// closed long before the server's replies (one a second) were due, and no
    /// callback comes.
    async fn an_http_contexts_stream_ends_with_the_context(proto) {
        let (_up, _grpc, lg, mut c) = setup(proto).await;
        let r = c.get("/direct/leave").send().await;
        assert!(
            r.header("x-pw-open").is_some_and(|v| v.starts_with("Ok(")),
            "{:?}",
            r.header("x-pw-open")
        );
        lg.assert_stat(&stat("legate_plugin_grpc_streams_total"), 1.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
            .await;
        tokio::time::sleep(Duration::from_millis(1300)).await;
        lg.assert_stat(&stat("legate_plugin_grpc_stream_messages_total"), 0.0)
            .await;
    }
);

each_proto!(
    /// Envoy's ext_proc shape: a request pauses on a stream its HTTP context
    /// opened (`Echo/Chat`), and the stream's reply, delivered to that context
    /// with the exchange, edits the request head and resumes it, or answers
    /// it with a local response. Fails if stream callbacks run without the
    /// exchange (the SDK's `send_http_response` traps then) or if the pause
    /// is refused (nothing but a call could resume it before).
    async fn a_request_paused_on_its_stream_resumes_or_answers_from_the_reply(proto) {
        let (up, _grpc, lg, mut c) = setup(proto).await;

        let r = c.get("/await/hello").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-pw-stream-verdict"), Some("hello"));

        let r = c.get("/await/deny").send().await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.header("x-pw-stream-verdict"), Some("deny"));
        assert_eq!(r.text(), "denied by the stream");
        assert_eq!(up.requests.get(), 1, "the denied request reached the upstream");

        lg.assert_stat(&stat("legate_plugin_grpc_streams_total"), 2.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_stream_messages_total"), 2.0)
            .await;
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="streamer"}"#, 0.0)
            .await;
        // Both streams end: the resumed one when the server closes it after
        // the half-close, the denied one with its context.
        lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
            .await;
    }
);

each_proto!(
    /// A pause on a stream lasts over several events: each reply wakes the
    /// exchange, the callback sees it with the exchange, and the pause holds
    /// until the callback of the last reply resumes it. Resuming from the
    /// close callback works too.
    async fn a_pause_on_a_stream_holds_over_several_replies(proto) {
        let (up, _grpc, lg, mut c) = setup(proto).await;

        let r = c.get("/await-count/3").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-pw-stream-seen"), Some("1,2,3"));

        let r = c.get("/await-count/0/resume-on-close").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-pw-stream-close"), Some("0"));

        lg.assert_stat(&stat("legate_plugin_grpc_stream_messages_total"), 3.0)
            .await;
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="streamer"}"#, 0.0)
            .await;
        assert_eq!(up.requests.get(), 2);
    }
);

each_proto!(
    /// A pause whose streams all end without a resume still holds the
    /// exchange, as in Envoy (another callback of the VM, such as a tick,
    /// could resume it), until the plugin's `limits.pause`: then it fails by
    /// the failure policy (closed here: 503); the proxy keeps serving.
    async fn a_pause_on_a_stream_that_ends_without_a_resume_fails_at_the_pause_limit(proto) {
        let (up, _grpc, lg, mut c) =
            setup_with(proto, None, "    limits: { cpu: 500ms, pause: 500ms }\n").await;

        let started = Instant::now();
        let r = tokio::time::timeout(HANG_GUARD, c.get("/await-count/2/never").send())
            .await
            .expect("the pause outlived `limits.pause`");
        assert_eq!(r.status, 503, "{}", r.text());
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(500), "failed after {took:?}");
        assert_eq!(up.requests.get(), 0);
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="streamer"}"#, 1.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_stream_messages_total"), 2.0)
            .await;

        assert_still_serves(&mut c).await;
    }
);

each_proto!(
    /// With `allow_on_headers_stop_iteration` (Envoy's `StopIteration`), a
    /// headers `Pause` with a stream open and a body to come still waits for
    /// the whole body (as without a stream); the body callback sends it on
    /// the stream and pauses at the end of the body, and the reply, delivered
    /// with the held body writable, rewrites and resumes it. (By default, as
    /// in Envoy, the body waits for a resume: the stream's reply would have
    /// to resume the headers first.)
    async fn a_stream_open_at_a_headers_pause_still_lets_the_body_buffer(proto) {
        let (_up, _grpc, lg, mut c) = setup_stop_iteration(proto).await;
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            c.post("/await-body").body("ping").send(),
        )
        .await
        .expect("the body was not buffered: the request waits on the silent stream");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().body, "stream:ping");
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="streamer"}"#, 0.0)
            .await;
    }
);

each_proto!(
    /// A stream opened in a call's callback, which keeps the pause, can
    /// resume the exchange: the pause waits on it. A stream cancelled while
    /// the exchange waits on it (here by a call's callback) leaves the pause
    /// holding, as in Envoy (another callback of the VM could resume it),
    /// until the plugin's `limits.pause` fails it (503, fail closed).
    async fn a_pause_waits_on_streams_opened_later_and_holds_when_they_are_cancelled(proto) {
        let (up, _grpc, lg, mut c) =
            setup_with(proto, None, "    limits: { cpu: 500ms, pause: 1s }\n").await;

        let r = c.get("/await-late").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-pw-stream-verdict"), Some("late"));

        let started = Instant::now();
        let r = tokio::time::timeout(HANG_GUARD, c.get("/await-cancel").send())
            .await
            .expect("the pause on a cancelled stream outlived `limits.pause`");
        assert_eq!(r.status, 503, "{}", r.text());
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(1), "failed after {took:?}");
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="streamer"}"#, 1.0)
            .await;
        // The cancelled stream delivered nothing (the one message is
        // `/await-late`'s).
        lg.assert_stat(&stat("legate_plugin_grpc_stream_messages_total"), 1.0)
            .await;
        assert_eq!(up.requests.get(), 1);
    }
);

each_proto!(
    /// A request paused on a stream that stays open and silent is not held
    /// forever: past the plugin's `limits.pause` the pause fails by the
    /// failure policy (503, fail closed), the context's stream is reset with
    /// it, and the proxy keeps serving.
    async fn a_pause_on_a_silent_stream_ends_at_the_pause_limit(proto) {
        let (up, _grpc, lg, mut c) =
            setup_with(proto, None, "    limits: { cpu: 500ms, pause: 400ms }\n").await;

        // Nothing else ends it before the guard: the stream idle timeout is
        // 5 min, and the route timeout starts only once the request has gone
        // upstream.
        let started = Instant::now();
        let r = tokio::time::timeout(HANG_GUARD, c.get("/await-silent").send())
            .await
            .expect("the pause on a silent stream hangs: `limits.pause` did not end it");
        let took = started.elapsed();
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.text().contains("streamer"), "{}", r.text());
        assert!(took >= Duration::from_millis(400), "answered after {took:?}");
        assert_eq!(up.requests.get(), 0);
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="streamer"}"#, 1.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_streams_total"), 1.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
            .await;

        // The VM lives on: the next pause is resumed by its stream as usual.
        assert_still_serves(&mut c).await;
    }
);

each_proto!(
    /// A stream event for an HTTP context that is not paused (its request went
    /// on at once) runs outside the exchange, as in Envoy: header reads see
    /// the heads as its last callback left them, a header write is
    /// `OK` and goes nowhere (the head is out; the Rust SDK's helpers panic on
    /// anything else), and a local response answers the client at the
    /// exchange's next callback (here the response head, which it replaces;
    /// the upstream had the request already, as in Envoy). The VM keeps
    /// serving.
    async fn a_stream_event_outside_the_exchange_writes_nowhere_and_may_answer(proto) {
        // The upstream answers after the stream's reply has come.
        let (up, _grpc, lg, mut c) =
            setup_with(proto, Some(Duration::from_millis(500)), "").await;

        let r = c
            .get("/unpaused/hello")
            .header("x-probe", "p1")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-pw-unpaused-write"), Some("Ok(())"));
        // Reads see the request head as the headers callback left it.
        assert_eq!(
            r.header("x-pw-unpaused-read"),
            Some("/unpaused/hello|p1|true")
        );
        // Written after the head went out: not seen upstream.
        assert_eq!(r.echo().header("x-pw-late"), None);

        let r = c.get("/unpaused/deny").send().await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.header("x-pw-stream-verdict"), Some("deny"));
        assert_eq!(r.text(), "denied by the stream");
        assert_eq!(up.requests.get(), 2);
        lg.assert_stat(r#"legate_plugin_traps_total{plugin="streamer"}"#, 0.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
            .await;

        assert_still_serves(&mut c).await;
    }
);

each_proto!(
    /// `fail: open`: a pause that outlives `limits.pause` is given up and the
    /// request goes on to the upstream. The stream stays open; its later
    /// events reach the guest as for a context not paused (here its header
    /// write from the fifth reply is `OK` and goes nowhere, where the SDK's
    /// helper would panic on an error), and the stream is reset when the
    /// exchange ends.
    async fn a_pause_given_up_with_fail_open_goes_on_and_its_stream_with_it(proto) {
        // The upstream answers after the stream's five replies (50 ms apart).
        let (up, _grpc, lg, mut c) = setup_with(
            proto,
            Some(Duration::from_millis(600)),
            "    fail: open\n    limits: { cpu: 500ms, pause: 120ms }\n",
        )
        .await;

        let started = Instant::now();
        let r = c.get("/await-count/5").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(started.elapsed() >= Duration::from_millis(120));
        // Given up before the last reply: nothing was written into the head.
        assert_eq!(r.echo().header("x-pw-stream-seen"), None);
        assert_eq!(up.requests.get(), 1);
        lg.assert_stat(r#"legate_plugin_failures_total{plugin="streamer"}"#, 1.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_stream_messages_total"), 5.0)
            .await;
        lg.assert_stat(r#"legate_plugin_traps_total{plugin="streamer"}"#, 0.0)
            .await;
        lg.assert_stat(&stat("legate_plugin_grpc_streams_open"), 0.0)
            .await;

        // A pause that ends in time still works on the same VM.
        let r = c.get("/await-count/1").send().await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().header("x-pw-stream-seen"), Some("1"));
    }
);
