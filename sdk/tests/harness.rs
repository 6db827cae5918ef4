//! The SDK's runtime and its native harness, through filters written the way
//! users write them: config parsing, phase declaration, contexts, the host
//! services' rules (write windows, validation, capabilities, KV, callouts,
//! metrics, logs, clock).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use legate_sdk::callout::{self, CalloutId, CalloutRequest, CalloutResponse};
use legate_sdk::kv::{Namespace, WriteCondition};
use legate_sdk::log::Level;
use legate_sdk::metrics::{Counter, Gauge, Histogram};
use legate_sdk::testing::{FilterTest, Outcome, Request, Response, TestExchange, TestHost};
use legate_sdk::{
    clock, plugin, random, Action, Body, BodyMode, Direction, Error, Exchange, Headers, HttpFilter,
    LocalResponse, Phase, Setup,
};
use serde::Deserialize;

// ---------------------------------------------------------------- config

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Limits {
    max: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NestedConfig {
    #[serde(default)]
    name: String,
    #[serde(default)]
    limits: Vec<Limits>,
}

struct ConfigOnly {
    name: String,
    total: u32,
}

impl HttpFilter for ConfigOnly {
    type Config = NestedConfig;
    type Context = ();
    fn configure(c: NestedConfig) -> Result<Self, String> {
        if c.name == "reject" {
            return Err("name `reject` is reserved".to_owned());
        }
        Ok(ConfigOnly {
            name: c.name,
            total: c.limits.iter().map(|l| l.max).sum(),
        })
    }
    fn setup(&self) -> Setup {
        Setup::new()
    }
}

#[test]
fn config_errors_name_the_field() {
    let err = FilterTest::<ConfigOnly>::configure(r#"{"limits": [{"max": 1}, {"max": "x"}]}"#)
        .err()
        .unwrap();
    assert!(err.contains("limits[1].max"), "{err}");
    assert!(err.contains("invalid type"), "{err}");

    let err = FilterTest::<ConfigOnly>::configure(r#"{"nmae": "a"}"#)
        .err()
        .unwrap();
    assert!(err.contains("unknown field `nmae`"), "{err}");

    let err = FilterTest::<ConfigOnly>::configure(r#"{"limits": [{}]}"#)
        .err()
        .unwrap();
    assert!(
        err.contains("limits[0]") && err.contains("missing field `max`"),
        "{err}"
    );

    let err = FilterTest::<ConfigOnly>::configure(r#"{"name": "a"} x"#)
        .err()
        .unwrap();
    assert!(err.contains("trailing characters"), "{err}");
}

#[test]
fn config_errors_give_no_position_in_the_json_the_host_made() {
    // The host hands the plugin JSON it made from the YAML: a line and
    // column in it point at nothing the operator wrote.
    let err = FilterTest::<NeedsHeader>::configure(r#"{"header": 1}"#)
        .err()
        .unwrap();
    assert_eq!(
        err,
        "invalid config: field `header`: invalid type: integer `1`, expected a string"
    );
    let err = FilterTest::<ConfigOnly>::configure(r#"{"limits": [{"max": 1}, {"max": "x"}]}"#)
        .err()
        .unwrap();
    assert_eq!(
        err,
        r#"invalid config: field `limits[1].max`: invalid type: string "x", expected u32"#
    );
    let err = FilterTest::<ConfigOnly>::configure(r#"{"limits": [{}]}"#)
        .err()
        .unwrap();
    assert_eq!(
        err,
        "invalid config: field `limits[0]`: missing field `max`"
    );
    let err = FilterTest::<ConfigOnly>::configure(r#"{"nmae": "a"}"#)
        .err()
        .unwrap();
    assert_eq!(
        err,
        "invalid config: unknown field `nmae`, expected `name` or `limits`"
    );
    let err = FilterTest::<ConfigOnly>::configure(r#"{"limits": [{"max": 1, "mx": 2}]}"#)
        .err()
        .unwrap();
    assert_eq!(
        err,
        "invalid config: field `limits[0]`: unknown field `mx`, expected `max`"
    );
    let err = FilterTest::<ConfigOnly>::configure(r#""x""#).err().unwrap();
    assert_eq!(
        err,
        r#"invalid config: invalid type: string "x", expected struct NestedConfig"#
    );
    // No config: the `{}` the SDK tried instead is not what the operator
    // wrote either.
    let err = FilterTest::<NeedsHeader>::configure("null").err().unwrap();
    assert_eq!(
        err,
        "invalid config: missing field `header` (the plugin has no `config`)"
    );
    // JSON that does not parse (only a test gives it): the position is in
    // the test's own text, so it stays.
    let err = FilterTest::<ConfigOnly>::configure(r#"{"name": "a"} x"#)
        .err()
        .unwrap();
    assert_eq!(
        err,
        "invalid config: trailing characters at line 1 column 15"
    );
}

#[test]
fn configure_err_is_passed_through_and_null_means_defaults() {
    let err = FilterTest::<ConfigOnly>::configure(r#"{"name": "reject"}"#)
        .err()
        .unwrap();
    assert_eq!(err, "name `reject` is reserved");

    let t = FilterTest::<ConfigOnly>::configure("null").unwrap();
    assert_eq!(t.filter().name, "");
    assert_eq!(t.filter().total, 0);

    let t =
        FilterTest::<ConfigOnly>::configure(r#"{"name": "n", "limits": [{"max": 2}, {"max": 3}]}"#)
            .unwrap();
    assert_eq!((t.filter().name.as_str(), t.filter().total), ("n", 5));
}

/// Reads its data file in `configure`, as a descriptor-driven plugin does.
struct FileReader {
    data: Vec<u8>,
}

impl HttpFilter for FileReader {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        let data = plugin::file("data").map_err(|e| format!("file `data`: {e:?}"))?;
        Ok(FileReader { data })
    }
    fn setup(&self) -> Setup {
        Setup::new()
    }
}

#[test]
fn data_files_are_read_in_configure() {
    let t = TestHost::new()
        .file("data", b"\x00bytes".to_vec())
        .configure::<FileReader>("null")
        .unwrap();
    assert_eq!(t.filter().data, b"\x00bytes");

    let err = TestHost::new()
        .configure::<FileReader>("null")
        .err()
        .unwrap();
    // Not granted: `NotFound`, a result the plugin turns into its own message.
    assert_eq!(err, "file `data`: NotFound");
}

// ---------------------------------------------------------------- phases and contexts

/// Counts calls per phase; keeps per-exchange state.
#[derive(Default)]
struct Tracker {
    seen: Vec<&'static str>,
    done_with: Vec<u32>,
}

#[derive(Default)]
struct TrackerCtx {
    calls: u32,
}

impl HttpFilter for Tracker {
    type Config = ();
    type Context = TrackerCtx;
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Tracker::default())
    }
    fn setup(&self) -> Setup {
        // Declares request headers and log, not the response phases.
        Setup::new().on_request_headers().on_log()
    }
    fn on_request_headers(
        &mut self,
        ctx: &mut TrackerCtx,
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        ctx.calls += 1;
        self.seen.push("request_headers");
        Action::Continue
    }
    fn on_response_headers(
        &mut self,
        ctx: &mut TrackerCtx,
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        ctx.calls += 1;
        self.seen.push("response_headers");
        Action::Continue
    }
    fn on_log(&mut self, ctx: &mut TrackerCtx, _: &Exchange<'_>) {
        ctx.calls += 1;
        self.seen.push("log");
    }
    fn on_done(&mut self, ctx: TrackerCtx) {
        self.done_with.push(ctx.calls);
    }
}

#[test]
fn only_declared_phases_run_and_a_stateful_context_declares_done() {
    let mut t = FilterTest::<Tracker>::configure("null").unwrap();
    assert_eq!(
        t.setup().phases(),
        vec![Phase::RequestHeaders, Phase::Log, Phase::Done]
    );
    assert_eq!(
        t.exchange(Request::get("/")).run(Response::new(200)),
        Outcome::Completed
    );
    // response_headers is implemented but not declared: never called.
    assert_eq!(t.filter().seen, vec!["request_headers", "log"]);
    // on_done got the context that lived through both calls, and dropped it.
    assert_eq!(t.filter().done_with, vec![2]);
    assert_eq!(t.live_contexts(), 0);
}

/// The panic message of `f`, which must panic.
fn panic_message(f: impl FnOnce()) -> String {
    let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_err();
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

/// The host ends an exchange once and never calls into it after: `done`
/// again (as after `run`) does nothing, and a phase after `done` (or after
/// `log`) is refused with a panic naming the mistake, instead of calling
/// `on_done` twice or starting a new context.
#[test]
fn an_exchange_is_ended_once_and_never_restarted() {
    let mut t = FilterTest::<Tracker>::configure("null").unwrap();
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(x.run(Response::new(200)), Outcome::Completed);
    x.done();
    x.done();
    for (what, call) in [
        (
            "request_headers",
            Box::new(|x: &mut TestExchange<'_, Tracker>| {
                x.request_headers();
            }) as Box<dyn Fn(&mut TestExchange<'_, Tracker>)>,
        ),
        (
            "response_headers",
            Box::new(|x: &mut TestExchange<'_, Tracker>| {
                x.response_headers(Response::new(200));
            }),
        ),
        ("log", Box::new(|x: &mut TestExchange<'_, Tracker>| x.log())),
        (
            "run",
            Box::new(|x: &mut TestExchange<'_, Tracker>| {
                x.run(Response::new(200));
            }),
        ),
    ] {
        let m = panic_message(|| call(&mut x));
        assert!(
            m.contains(&format!("TestExchange::{what} called after `done`")),
            "{m}"
        );
    }
    assert_eq!(x.deliver_callouts(), vec![]);
    drop(x);
    assert_eq!(t.filter().seen, vec!["request_headers", "log"]);
    assert_eq!(t.filter().done_with, vec![2]);
    assert_eq!(t.live_contexts(), 0);

    // After `log`: the exchange is over but for `done`; `log` again does
    // nothing.
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    x.log();
    x.log();
    let m = panic_message(|| {
        x.request_headers();
    });
    assert!(m.contains("request_headers called after `log`"), "{m}");
    x.done();
    drop(x);
    assert_eq!(
        t.filter().seen,
        vec!["request_headers", "log", "request_headers", "log"]
    );
    assert_eq!(t.filter().done_with, vec![2, 2]);

    // `run` drives a fresh exchange only: it would repeat the phases called.
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    let m = panic_message(|| {
        x.run(Response::new(200));
    });
    assert!(m.contains("already driven by phase methods"), "{m}");
    drop(x);
    assert_eq!(t.filter().seen.len(), 5);
}

/// Records (and logs) every phase call; pauses the request headers on a
/// callout when the request has `x-call`, the end of the request body when
/// it has `x-hold`.
#[derive(Default)]
struct Every {
    seen: Vec<String>,
}

impl Every {
    fn record(&mut self, call: String) {
        legate_sdk::info!("{call}");
        self.seen.push(call);
    }
}

impl HttpFilter for Every {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Every::default())
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_request_headers()
            .on_request_body(BodyMode::Streamed)
            .on_request_trailers()
            .on_response_headers()
            .on_response_body(BodyMode::Streamed)
            .on_response_trailers()
    }
    fn on_request_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        h: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.record("request_headers".into());
        if h.has("x-call") {
            callout::send(&CalloutRequest::new("authz", "GET", "/")).unwrap();
            return Action::Pause;
        }
        Action::Continue
    }
    fn on_request_body(&mut self, _: &mut (), x: &Exchange<'_>, b: &Body<'_>, eos: bool) -> Action {
        self.record(format!("request_body {} {eos}", b.len()));
        if eos
            && x.headers(Direction::Request)
                .is_some_and(|h| h.has("x-hold"))
        {
            callout::send(&CalloutRequest::new("authz", "GET", "/")).unwrap();
            return Action::Pause;
        }
        Action::Continue
    }
    fn on_request_trailers(&mut self, _: &mut (), _: &Exchange<'_>, _: &Headers<'_>) -> Action {
        self.record("request_trailers".into());
        Action::Continue
    }
    fn on_response_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.record("response_headers".into());
        Action::Continue
    }
    fn on_response_body(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        b: &Body<'_>,
        eos: bool,
    ) -> Action {
        self.record(format!("response_body {} {eos}", b.len()));
        Action::Continue
    }
    fn on_response_trailers(&mut self, _: &mut (), _: &Exchange<'_>, _: &Headers<'_>) -> Action {
        self.record("response_trailers".into());
        Action::Continue
    }
}

/// The host calls each phase of an exchange once, in order, and none while
/// it is paused: the harness refuses a test that asks for a phase again, or
/// for one the exchange is past, with a panic naming it, instead of calling
/// the filter a second time.
#[test]
fn a_phase_is_called_once_in_order_and_not_while_paused() {
    type Call = fn(&mut TestExchange<'_, Every>);
    let trailers = || Request::post("/", "ab").trailer("x-t", "1");
    let refused: [(&str, Call, Call, &str); 8] = [
        (
            "headers twice",
            |x| {
                x.request_headers();
            },
            |x| {
                x.request_headers();
            },
            "request_headers called twice",
        ),
        (
            "a body call after the last",
            |x| {
                x.request_body_chunk("a", true);
            },
            |x| {
                x.request_body_chunk("b", false);
            },
            "request_body_chunk called after the request body ended",
        ),
        (
            "the whole body twice",
            |x| {
                x.request_body();
            },
            |x| {
                x.request_body();
            },
            "request_body called after the request body ended",
        ),
        (
            "a body call after the trailers",
            |x| {
                x.request_trailers();
            },
            |x| {
                x.request_body_chunk("b", true);
            },
            "request_body_chunk called after request_trailers",
        ),
        (
            "trailers twice",
            |x| {
                x.response_headers(Response::new(200).trailer("x-t", "1"));
                x.response_trailers();
            },
            |x| {
                x.response_trailers();
            },
            "response_trailers called twice",
        ),
        (
            "response headers twice",
            |x| {
                x.response_headers(Response::new(200));
            },
            |x| {
                x.response_headers(Response::new(200));
            },
            "response_headers called twice",
        ),
        (
            "request headers after the response",
            |x| {
                x.response_headers(Response::new(200));
            },
            |x| {
                x.request_headers();
            },
            "request_headers called after a response phase",
        ),
        (
            "the headers after the body",
            |x| {
                x.response_headers(Response::new(200).body("x"));
                x.response_body_chunk("x", false);
            },
            |x| {
                x.response_headers(Response::new(200));
            },
            "response_headers called after the response body or trailers",
        ),
    ];
    for (case, first, again, want) in refused {
        let host = TestHost::new();
        let mut t = host.configure::<Every>("null").unwrap();
        let mut x = t.exchange(trailers());
        first(&mut x);
        let calls = host.logs().len();
        let m = panic_message(|| again(&mut x));
        assert!(m.contains(&format!("TestExchange::{want}")), "{case}: {m}");
        assert!(m.contains("once, in order"), "{case}: {m}");
        // The filter was not called again.
        assert_eq!(host.logs().len(), calls, "{case}");
    }

    // Paused: no phase until the pause ends.
    let host = TestHost::new().grant_cluster("authz");
    let mut t = host.configure::<Every>("null").unwrap();
    let mut x = t.exchange(Request::get("/").header("x-call", "1"));
    assert_eq!(x.request_headers(), Action::Pause);
    let m = panic_message(|| {
        x.response_headers(Response::new(200));
    });
    assert!(
        m.contains("response_headers called while the exchange is paused"),
        "{m}"
    );
    host.queue_callout_response("authz", Ok(CalloutResponse::new(200, "")));
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    assert_eq!(x.response_headers(Response::new(200)), Action::Continue);
    drop(x);
    assert_eq!(t.filter().seen, vec!["request_headers", "response_headers"]);

    // Paused holding the end of a streamed request body, the upstream may
    // answer: the host abandons the hold (no verdict, not a failure), cancels
    // the callout, drops the held chunk and reads no more of the request.
    let mut t = host.configure::<Every>("null").unwrap();
    let mut x = t.exchange(Request::post("/", "ab").header("x-hold", "1"));
    x.request_headers();
    assert_eq!(x.request_body_chunk("ab", true), Action::Pause);
    assert_eq!(x.response_headers(Response::new(200)), Action::Continue);
    assert_eq!(x.failure(), None);
    assert_eq!(x.request_body_bytes(), b"");
    assert!(host.callouts().last().unwrap().cancelled);
    host.queue_callout_response("authz", Ok(CalloutResponse::new(200, "")));
    assert_eq!(x.deliver_callouts(), vec![]);
    let m = panic_message(|| {
        x.request_trailers();
    });
    assert!(m.contains("reads no more of the request"), "{m}");
    drop(x);
    assert_eq!(
        t.filter().seen,
        vec!["request_headers", "request_body 2 true", "response_headers"]
    );

    // What the host does: each phase once, in order; streamed request body
    // calls interleave with the response's (full duplex); phases may be
    // left out.
    let mut t = FilterTest::<Every>::configure("null").unwrap();
    let mut x = t.exchange(trailers());
    x.request_headers();
    x.request_body_chunk("a", false);
    x.request_body_chunk("b", false);
    x.response_headers(Response::new(200).body("cd"));
    x.request_body_chunk("", true);
    x.response_body_chunk("cd", true);
    x.request_trailers();
    x.log();
    x.done();
    drop(x);
    assert_eq!(
        t.filter().seen,
        vec![
            "request_headers",
            "request_body 1 false",
            "request_body 1 false",
            "response_headers",
            "request_body 0 true",
            "response_body 2 true",
            "request_trailers",
        ]
    );
}

#[test]
fn contexts_are_per_exchange() {
    let mut t = FilterTest::<Tracker>::configure("null").unwrap();
    {
        let mut a = t.exchange(Request::get("/a"));
        a.request_headers();
        a.log();
        // `a` is not done yet: its context stays alive.
    }
    assert_eq!(t.live_contexts(), 1);
    let mut b = t.exchange(Request::get("/b"));
    b.request_headers();
    // `done` calls `on_log` first, as the host: two calls in `b`'s context.
    b.done();
    assert_eq!(t.filter().done_with, vec![2]);
    assert_eq!(t.live_contexts(), 1);
}

#[test]
fn a_stateless_filter_does_not_declare_done() {
    let t = FilterTest::<ConfigOnly>::configure("null").unwrap();
    assert!(!t.setup().declares(Phase::Done));
    assert!(t.setup().phases().is_empty());
}

/// Detaches in request headers when the request asks (`x-detach`), after
/// trying with a callout outstanding when asked (`x-callout`).
#[derive(Default)]
struct Detacher {
    seen: Vec<&'static str>,
    results: Vec<&'static str>,
    done_with: Vec<u32>,
}

impl HttpFilter for Detacher {
    type Config = ();
    type Context = TrackerCtx;
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Detacher::default())
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_request_headers()
            .on_response_headers()
            .on_response_body(BodyMode::Streamed)
            .on_log()
    }
    fn on_request_headers(
        &mut self,
        ctx: &mut TrackerCtx,
        x: &Exchange<'_>,
        h: &Headers<'_>,
        _: bool,
    ) -> Action {
        ctx.calls += 1;
        self.seen.push("request_headers");
        if !h.has("x-detach") {
            return Action::Continue;
        }
        let name = |r: Result<(), Error>| match r {
            Ok(()) => "ok",
            Err(Error::InvalidState) => "invalid-state",
            Err(_) => "other",
        };
        if h.has("x-callout") {
            let req = CalloutRequest::new("authz", "GET", "/check");
            let id = callout::send(&req).unwrap();
            self.results.push(name(x.detach()));
            callout::cancel(id).unwrap();
        }
        self.results.push(name(x.detach()));
        let again = callout::send(&CalloutRequest::new("authz", "GET", "/check"));
        self.results.push(name(again.map(|_| ())));
        Action::Continue
    }
    fn on_response_headers(
        &mut self,
        ctx: &mut TrackerCtx,
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        ctx.calls += 1;
        self.seen.push("response_headers");
        Action::Continue
    }
    fn on_response_body(
        &mut self,
        ctx: &mut TrackerCtx,
        _: &Exchange<'_>,
        _: &Body<'_>,
        _: bool,
    ) -> Action {
        ctx.calls += 1;
        self.seen.push("response_body");
        Action::Continue
    }
    fn on_log(&mut self, ctx: &mut TrackerCtx, x: &Exchange<'_>) {
        ctx.calls += 1;
        self.seen.push("log");
        // Too late to save anything: refused.
        assert_eq!(x.detach(), Err(Error::InvalidState));
    }
    fn on_done(&mut self, ctx: TrackerCtx) {
        self.done_with.push(ctx.calls);
    }
}

#[test]
fn a_detached_exchange_gets_no_more_calls_and_its_context_ends_at_once() {
    let host = TestHost::new().grant_cluster("authz");
    let mut t = host.configure::<Detacher>("null").unwrap();
    let response = || Response::new(200).body("hello");

    // Not detached: every declared phase, then `on_done` with the context.
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(x.run(response()), Outcome::Completed);
    assert!(!x.detached());
    assert_eq!(
        t.filter().seen,
        vec![
            "request_headers",
            "response_headers",
            "response_body",
            "log"
        ]
    );
    assert_eq!(t.filter().done_with, vec![4]);

    // Detached: `on_done` runs as the phase returns; the request goes on, and
    // no later phase (nor log) is called. Callouts after it are refused.
    let mut x = t.exchange(Request::get("/").header("x-detach", "1"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert!(x.detached());
    assert_eq!(t.live_contexts(), 0);
    assert_eq!(t.filter().done_with, vec![4, 1]);
    let mut x = t.exchange(Request::get("/").header("x-detach", "1"));
    let context = x.context();
    assert!(context > 0);
    assert_eq!(x.run(response()), Outcome::Completed);
    assert_eq!(t.filter().seen.len(), 4 + 2);
    assert_eq!(t.filter().done_with, vec![4, 1, 1]);
    assert_eq!(
        t.filter().results,
        vec!["ok", "invalid-state", "ok", "invalid-state"]
    );

    // With a callout outstanding, refused; after cancelling it, allowed.
    let mut x = t.exchange(
        Request::get("/")
            .header("x-detach", "1")
            .header("x-callout", "1"),
    );
    assert_eq!(x.run(response()), Outcome::Completed);
    assert!(x.detached());
    assert_eq!(
        t.filter().results[4..],
        ["invalid-state", "ok", "invalid-state"]
    );
    assert_eq!(t.live_contexts(), 0);
}

// ---------------------------------------------------------------- headers, bodies, exchange

/// Rewrites things and records what the host said.
#[derive(Default)]
struct Rewriter {
    results: Vec<(&'static str, Result<(), Error>)>,
}

impl HttpFilter for Rewriter {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Rewriter::default())
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_request_headers()
            .on_response_headers()
            .on_response_body(BodyMode::Buffered)
            .on_log()
    }
    fn on_request_headers(
        &mut self,
        _: &mut (),
        x: &Exchange<'_>,
        h: &Headers<'_>,
        eos: bool,
    ) -> Action {
        assert!(eos);
        let cookies = h.get_all("Cookie");
        h.set("x-cookies", cookies.len().to_string()).unwrap();
        h.add("x-multi", "1").unwrap();
        h.add("x-multi", "2").unwrap();
        self.results
            .push(("content-length", h.set("content-length", "5")));
        self.results.push(("bad name", h.set("bad name", "v")));
        self.results.push(("bad value", h.set("x-ok", "a\r\nb")));
        self.results
            .push(("connection", h.add("connection", "close")));
        // `te: trailers` only, set or removed, on the request head (gRPC).
        self.results.push(("te trailers", h.set("te", "trailers")));
        self.results.push(("te gzip", h.set("te", "gzip")));
        self.results.push(("te add", h.add("te", "trailers")));
        // `trailer` only on the response head.
        self.results
            .push(("request trailer", h.set("trailer", "grpc-status")));
        self.results.push(("remove absent", h.remove("x-absent")));
        // The response head does not exist yet.
        self.results.push((
            "response head",
            match x.headers(Direction::Response) {
                Some(_) => Ok(()),
                None => Err(Error::NotFound),
            },
        ));
        x.set_path("/rewritten?q=1").unwrap();
        self.results.push(("bad path", x.set_path("no-slash")));
        x.set_body_mode(Direction::Response, BodyMode::Buffered)
            .unwrap();
        Action::Continue
    }
    fn on_response_headers(
        &mut self,
        _: &mut (),
        x: &Exchange<'_>,
        h: &Headers<'_>,
        _: bool,
    ) -> Action {
        // Request head was released: writing it now is outside its window.
        let req = x.headers(Direction::Request).unwrap();
        self.results
            .push(("late request write", req.set("x-late", "1")));
        self.results.push(("late path", x.set_path("/late")));
        h.remove("server").unwrap();
        self.results.push(("response te", h.set("te", "trailers")));
        self.results
            .push(("response trailer", h.set("trailer", "grpc-status")));
        Action::Continue
    }
    fn on_response_body(
        &mut self,
        _: &mut (),
        x: &Exchange<'_>,
        b: &Body<'_>,
        eos: bool,
    ) -> Action {
        assert!(eos);
        assert_eq!(b.read(0, 5), b"hello");
        b.splice(0, 5, "HELLO").unwrap();
        b.append("!").unwrap();
        self.results.push(("bad splice", b.splice(100, 1, "")));
        // Buffered: the response head is still held and writable.
        let resp = x.headers(Direction::Response).unwrap();
        resp.set("content-type", "text/shout").unwrap();
        x.set_status(203).unwrap();
        self.results.push(("bad status", x.set_status(700)));
        Action::Continue
    }
    fn on_log(&mut self, _: &mut (), x: &Exchange<'_>) {
        self.results.push((
            "log write",
            x.headers(Direction::Response).unwrap().set("x-log", "1"),
        ));
        self.results.push((
            "log body",
            match x.body(Direction::Response) {
                Some(_) => Ok(()),
                None => Err(Error::NotFound),
            },
        ));
    }
}

fn result_of(t: &FilterTest<Rewriter>, what: &str) -> Result<(), Error> {
    t.filter()
        .results
        .iter()
        .find(|(w, _)| *w == what)
        .unwrap()
        .1
}

#[test]
fn headers_bodies_and_write_windows_follow_the_abi() {
    let mut t = FilterTest::<Rewriter>::configure("null").unwrap();
    let mut x = t.exchange(
        Request::get("/orig")
            .header("cookie", "a=1")
            .header("Cookie", "b=2"),
    );
    let outcome = x.run(
        Response::new(200)
            .header("server", "upstream")
            .header("content-type", "text/plain")
            .body("hello world"),
    );
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(x.path(), "/rewritten?q=1");
    assert_eq!(x.request_header("x-cookies").as_deref(), Some("2"));
    let multi: Vec<_> = x
        .request_headers_list()
        .into_iter()
        .filter(|(n, _)| n == "x-multi")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(multi, vec![b"1".to_vec(), b"2".to_vec()]);
    assert_eq!(x.request_header("x-late"), None);
    assert_eq!(x.response_header("server"), None);
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("text/shout")
    );
    assert_eq!(x.response_header("x-log"), None);
    assert_eq!(x.response_header("trailer").as_deref(), Some("grpc-status"));
    assert_eq!(x.status(), Some(203));
    assert_eq!(x.body_mode(Direction::Response), BodyMode::Buffered);
    let x_te = x.request_header("te");
    drop(x);

    assert_eq!(result_of(&t, "content-length"), Err(Error::Denied));
    assert_eq!(result_of(&t, "bad name"), Err(Error::InvalidArgument));
    assert_eq!(result_of(&t, "bad value"), Err(Error::InvalidArgument));
    assert_eq!(result_of(&t, "connection"), Err(Error::Denied));
    assert_eq!(result_of(&t, "te trailers"), Ok(()));
    assert_eq!(x_te, Some("trailers".to_owned()));
    assert_eq!(result_of(&t, "te gzip"), Err(Error::Denied));
    assert_eq!(result_of(&t, "te add"), Err(Error::Denied));
    assert_eq!(result_of(&t, "response te"), Err(Error::Denied));
    assert_eq!(result_of(&t, "request trailer"), Err(Error::Denied));
    assert_eq!(result_of(&t, "response trailer"), Ok(()));
    assert_eq!(result_of(&t, "remove absent"), Ok(()));
    assert_eq!(result_of(&t, "response head"), Err(Error::NotFound));
    assert_eq!(result_of(&t, "bad path"), Err(Error::InvalidArgument));
    assert_eq!(
        result_of(&t, "late request write"),
        Err(Error::InvalidState)
    );
    assert_eq!(result_of(&t, "late path"), Err(Error::InvalidState));
    assert_eq!(result_of(&t, "bad splice"), Err(Error::InvalidArgument));
    assert_eq!(result_of(&t, "bad status"), Err(Error::InvalidArgument));
    assert_eq!(result_of(&t, "log write"), Err(Error::InvalidState));
    assert_eq!(result_of(&t, "log body"), Err(Error::NotFound));
}

#[test]
fn the_rewritten_body_is_what_goes_on() {
    let mut t = FilterTest::<Rewriter>::configure("null").unwrap();
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    x.response_headers(Response::new(200).body("hello world"));
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.response_body_bytes(), b"HELLO world!");
}

#[test]
fn the_rewritten_bodies_can_be_asserted_after_run_and_log() {
    // `run` logs and ends the exchange; `on_log` reaches no body (the
    // Rewriter's "log body" read is `NotFound`), but the data of the last
    // body calls stays readable for the test.
    let mut t = FilterTest::<Rewriter>::configure("null").unwrap();
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(
        x.run(Response::new(200).body("hello world")),
        Outcome::Completed
    );
    assert_eq!(x.response_body_bytes(), b"HELLO world!");
    drop(x);
    assert_eq!(result_of(&t, "log body"), Err(Error::NotFound));

    let mut t = FilterTest::<Redactor>::configure("null").unwrap();
    let mut x = t.exchange(Request::post("/", "a secret"));
    assert_eq!(x.run(Response::new(204)), Outcome::Completed);
    assert_eq!(x.request_body_bytes(), b"a ******");
    // A second `done` leaves them too.
    x.done();
    assert_eq!(x.request_body_bytes(), b"a ******");

    // Phase by phase: `log` keeps what went on.
    let mut t = FilterTest::<Rewriter>::configure("null").unwrap();
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    x.response_headers(Response::new(200).body("hello there"));
    assert_eq!(x.response_body(), Action::Continue);
    x.log();
    assert_eq!(x.response_body_bytes(), b"HELLO there!");
}

/// Redacts `secret` in request bodies chunk by chunk (streamed) and records in a
/// request trailer how many it redacted.
#[derive(Default)]
struct Redactor;

impl HttpFilter for Redactor {
    type Config = ();
    type Context = u32;
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Redactor)
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_request_body(BodyMode::Streamed)
            .on_request_trailers()
    }
    fn on_request_body(&mut self, n: &mut u32, _: &Exchange<'_>, b: &Body<'_>, _: bool) -> Action {
        let data = b.read(0, b.len());
        let text = String::from_utf8_lossy(&data);
        *n += u32::try_from(text.matches("secret").count()).unwrap();
        b.replace(text.replace("secret", "******")).unwrap();
        Action::Continue
    }
    fn on_request_trailers(&mut self, n: &mut u32, _: &Exchange<'_>, t: &Headers<'_>) -> Action {
        t.set("x-redacted", n.to_string()).unwrap();
        Action::Continue
    }
}

#[test]
fn a_streamed_request_body_is_rewritten_chunk_by_chunk() {
    let mut t = FilterTest::<Redactor>::configure("null").unwrap();
    let mut x = t.exchange(Request::post("/", "").trailer("x-client", "1"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_body_chunk("a secret, ", false), Action::Continue);
    assert_eq!(x.request_body_bytes(), b"a ******, ");
    assert_eq!(
        x.request_body_chunk("another secret", true),
        Action::Continue
    );
    assert_eq!(x.request_body_bytes(), b"another ******");
    assert_eq!(x.request_trailers(), Action::Continue);
    assert_eq!(x.request_trailer("x-redacted").as_deref(), Some("2"));
    assert_eq!(x.request_trailer("x-client").as_deref(), Some("1"));
}

/// Folds the response trailers into the body at its end (as gRPC-Web does),
/// except `x-keep`; counts its trailers-phase calls in response trailer `x-calls`.
struct Folder;

impl HttpFilter for Folder {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Folder)
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_response_body(BodyMode::Streamed)
            .on_response_trailers()
    }
    fn on_response_body(
        &mut self,
        _: &mut (),
        x: &Exchange<'_>,
        b: &Body<'_>,
        eos: bool,
    ) -> Action {
        let Some(t) = x.trailers(Direction::Response) else {
            return Action::Continue;
        };
        assert!(eos, "trailers are visible only in the end-of-stream call");
        for (name, value) in t.entries() {
            if name != "x-keep" {
                b.append(format!("|{name}={}", String::from_utf8_lossy(&value)))
                    .unwrap();
                t.remove(&name).unwrap();
            }
        }
        Action::Continue
    }
    fn on_response_trailers(&mut self, _: &mut (), _: &Exchange<'_>, t: &Headers<'_>) -> Action {
        t.set("x-phase", "ran").unwrap();
        Action::Continue
    }
}

#[test]
fn trailers_are_writable_in_the_last_body_call_and_folded_ones_are_gone() {
    let mut t = FilterTest::<Folder>::configure("null").unwrap();
    let mut x = t.exchange(Request::get("/"));
    x.response_headers(Response::new(200).trailer("grpc-status", "0"));
    assert_eq!(x.response_body_chunk("data", false), Action::Continue);
    assert_eq!(x.response_body_bytes(), b"data");
    assert_eq!(x.response_body_chunk("", true), Action::Continue);
    assert_eq!(x.response_body_bytes(), b"|grpc-status=0");
    // Emptied: no trailers, and the trailers phase is not called.
    assert_eq!(x.response_trailers(), Action::Continue);
    assert_eq!(x.response_trailer("grpc-status"), None);
    assert_eq!(x.response_trailer("x-phase"), None);

    // What is left goes through the trailers phase.
    let mut x = t.exchange(Request::get("/"));
    let resp = Response::new(200)
        .body("d")
        .trailer("x-keep", "1")
        .trailer("x-gone", "2");
    x.response_headers(resp);
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.response_body_bytes(), b"d|x-gone=2");
    assert_eq!(x.response_trailers(), Action::Continue);
    assert_eq!(x.response_trailer("x-keep").as_deref(), Some("1"));
    assert_eq!(x.response_trailer("x-gone"), None);
    assert_eq!(x.response_trailer("x-phase").as_deref(), Some("ran"));
}

/// Sends the whole request body to `checker` and pauses until it answers (mode
/// from the config: `"buffered"` or `"streamed"`): a 200 upper-cases the body,
/// sets `x-checked` on the head and, if the request has trailers, trailer
/// `x-body-checked`; anything else answers 403 with the checker's body.
struct BodyCheck {
    mode: BodyMode,
}

impl HttpFilter for BodyCheck {
    type Config = String;
    type Context = ();
    fn configure(mode: String) -> Result<Self, String> {
        let mode = match mode.as_str() {
            "buffered" => BodyMode::Buffered,
            "streamed" => BodyMode::Streamed,
            other => return Err(format!("unknown mode {other}")),
        };
        Ok(BodyCheck { mode })
    }
    fn setup(&self) -> Setup {
        Setup::new().on_request_body(self.mode)
    }
    fn on_request_body(&mut self, _: &mut (), _: &Exchange<'_>, b: &Body<'_>, eos: bool) -> Action {
        if !eos {
            return Action::Continue;
        }
        let check = CalloutRequest::new("checker", "POST", "/check").body(b.read(0, b.len()));
        match callout::send(&check) {
            Ok(_) => Action::Pause,
            Err(e) => Action::respond(500, e.to_string()),
        }
    }
    fn on_callout_response(
        &mut self,
        _: &mut (),
        x: &Exchange<'_>,
        _: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) -> Action {
        match response {
            Ok(r) if r.status == 200 => {
                // Still paused in the body phase: the body is held, and the
                // head too when buffered (a streamed one went on before).
                let b = x.body(Direction::Request).unwrap();
                b.replace(b.read(0, b.len()).to_ascii_uppercase()).unwrap();
                let head = x
                    .headers(Direction::Request)
                    .unwrap()
                    .set("x-checked", "200");
                if self.mode == BodyMode::Buffered {
                    head.unwrap();
                } else {
                    assert_eq!(head, Err(Error::InvalidState));
                }
                if let Some(t) = x.trailers(Direction::Request) {
                    t.set("x-body-checked", "200").unwrap();
                }
                Action::Continue
            }
            Ok(r) => Action::Respond(LocalResponse::new(403).body(r.body)),
            Err(e) => Action::respond(502, e.to_string()),
        }
    }
}

#[test]
fn a_buffered_body_phase_pauses_for_a_callout_with_the_message_writable() {
    let h = TestHost::new().grant_cluster("checker");
    let mut t = h.configure::<BodyCheck>(r#""buffered""#).unwrap();
    h.queue_callout_response("checker", Ok(CalloutResponse::new(200, "ok")));
    let mut x = t.exchange(Request::post("/", "hello").trailer("x-client", "1"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_body(), Action::Pause);
    assert!(x.may_pause());
    assert_eq!(h.callouts()[0].request.body, b"hello");
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    assert_eq!(x.request_body_bytes(), b"HELLO");
    assert_eq!(x.request_header("x-checked").as_deref(), Some("200"));
    // The trailers, held with the end-of-stream call, go on as the filter left them.
    assert_eq!(x.request_trailers(), Action::Continue);
    assert_eq!(x.request_trailer("x-body-checked").as_deref(), Some("200"));
    assert_eq!(x.request_trailer("x-client").as_deref(), Some("1"));

    // Denied by the checker: its answer.
    h.queue_callout_response("checker", Ok(CalloutResponse::new(401, "no")));
    let mut x = t.exchange(Request::post("/", "bad"));
    assert_eq!(x.request_body(), Action::Pause);
    let actions = x.deliver_callouts();
    assert!(
        matches!(&actions[..], [Action::Respond(r)] if r.status == 403 && r.body == b"no"),
        "{actions:?}"
    );
}

#[test]
fn a_streamed_body_phase_pauses_for_a_callout_with_the_chunk_writable() {
    let h = TestHost::new().grant_cluster("checker");
    let mut t = h.configure::<BodyCheck>(r#""streamed""#).unwrap();
    h.queue_callout_response("checker", Ok(CalloutResponse::new(200, "ok")));
    let mut x = t.exchange(Request::post("/", "hello"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_body_chunk("hello", true), Action::Pause);
    assert!(x.may_pause());
    assert_eq!(h.callouts()[0].request.body, b"hello");
    // The chunk is rewritten from the callback; the head went on before it.
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    assert_eq!(x.request_body_bytes(), b"HELLO");
    assert_eq!(x.request_header("x-checked"), None);
}

// ---------------------------------------------------------------- services

/// Uses KV, metrics, logs, clock, random and callouts.
struct Services {
    ns: Namespace,
    hits: Counter,
    inflight: Gauge,
    latency: Histogram,
    configure_results: Vec<(&'static str, Result<(), Error>)>,
    later: Vec<(&'static str, Result<(), Error>)>,
    tick_responses: Vec<(CalloutId, Result<u16, Error>)>,
}

#[derive(Default)]
struct ServicesCtx {
    started: u64,
}

fn unit<T>(r: Result<T, Error>) -> Result<(), Error> {
    r.map(|_| ())
}

impl HttpFilter for Services {
    type Config = ();
    type Context = ServicesCtx;
    fn configure(_: ()) -> Result<Self, String> {
        let mut configure_results = vec![
            ("kv denied", unit(Namespace::open("secret"))),
            (
                "callout in configure",
                unit(callout::send(&CalloutRequest::new("authz", "GET", "/"))),
            ),
            (
                "bad metric name",
                unit(Counter::define("Bad-Name", "", &[])),
            ),
            (
                "reserved label",
                unit(Counter::define("x_total", "", &["plugin"])),
            ),
            (
                "bad buckets",
                unit(Histogram::define("h", "", &[], &[2.0, 1.0])),
            ),
        ];
        let hits = Counter::define("hits_total", "hits", &["route"]).map_err(|e| e.to_string())?;
        // Defining it again the same way is fine, differently is not.
        configure_results.push((
            "redefine same",
            unit(Counter::define("hits_total", "hits", &["route"])),
        ));
        configure_results.push((
            "redefine other",
            unit(Gauge::define("hits_total", "hits", &["route"])),
        ));
        configure_results.push(("wrong label count", unit(hits.with_labels(&["a", "b"]))));
        Ok(Services {
            ns: Namespace::open("shared").map_err(|e| e.to_string())?,
            hits,
            inflight: Gauge::define("inflight", "in flight", &[]).map_err(|e| e.to_string())?,
            latency: Histogram::define("latency_ms", "latency", &[], &[1.0, 10.0])
                .map_err(|e| e.to_string())?,
            configure_results,
            later: Vec::new(),
            tick_responses: Vec::new(),
        })
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_request_headers()
            .on_log()
            .tick_every_ms(1000)
    }
    fn on_request_headers(
        &mut self,
        ctx: &mut ServicesCtx,
        x: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        ctx.started = clock::monotonic_now();
        self.inflight.add(1);
        self.later
            .push(("define late", unit(Counter::define("late_total", "", &[]))));
        if let Ok(series) = self
            .hits
            .with_labels(&[x.route_name().unwrap_or_default().as_str()])
        {
            series.inc();
        }
        legate_sdk::debug!("request {} on {}", x.request_id(), plugin::name());
        match x.path().as_str() {
            "/auth" => match callout::send(
                &CalloutRequest::new("authz", "POST", "/check")
                    .header("X-Path", x.path())
                    .body("payload")
                    .timeout_ms(200),
            ) {
                Ok(_) => Action::Pause,
                Err(e) => Action::respond(500, e.to_string()),
            },
            "/host-header" => {
                // Framing and the authority are the host's (as on the real host).
                let r =
                    callout::send(&CalloutRequest::new("authz", "GET", "/").header("Host", "x"));
                Action::respond(500, r.err().map(|e| e.to_string()).unwrap_or_default())
            }
            "/denied" => {
                let r = callout::send(&CalloutRequest::new("other", "GET", "/"));
                Action::respond(500, r.err().map(|e| e.to_string()).unwrap_or_default())
            }
            "/cancel" => {
                let id = callout::send(&CalloutRequest::new("authz", "GET", "/")).unwrap();
                self.later.push(("cancel", callout::cancel(id)));
                self.later.push(("cancel again", callout::cancel(id)));
                Action::Continue
            }
            _ => Action::Continue,
        }
    }
    fn on_callout_response(
        &mut self,
        _: &mut ServicesCtx,
        x: &Exchange<'_>,
        _: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) -> Action {
        match response {
            Ok(r) if r.status == 200 => {
                let user = r.header_value("x-user").unwrap_or_default().to_vec();
                // Paused in the request-headers phase: the head is writable.
                let set = x.headers(Direction::Request).unwrap().set("x-user", user);
                self.later.push(("set while paused", set));
                Action::Continue
            }
            Ok(r) => Action::Respond(LocalResponse::new(403).body(r.body).details("authz_denied")),
            Err(e) => Action::respond(503, e.to_string()),
        }
    }
    fn on_log(&mut self, ctx: &mut ServicesCtx, _: &Exchange<'_>) {
        self.inflight.add(-1);
        let ms = (clock::monotonic_now() - ctx.started) / 1_000_000;
        self.latency.observe(ms as f64);
        self.later.push((
            "callout from log",
            unit(callout::send(&CalloutRequest::new("authz", "GET", "/"))),
        ));
    }
    fn on_tick(&mut self) {
        legate_sdk::info!("tick at {}", clock::wall_now());
        self.later.push((
            "tick callout",
            unit(callout::send(&CalloutRequest::new(
                "authz", "GET", "/refresh",
            ))),
        ));
    }
    fn on_tick_callout_response(
        &mut self,
        id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) {
        self.tick_responses.push((id, response.map(|r| r.status)));
    }
}

fn host() -> TestHost {
    TestHost::new()
        .plugin_name("svc")
        .grant_kv("shared")
        .grant_cluster("authz")
}

fn later(t: &FilterTest<Services>, what: &str) -> Result<(), Error> {
    t.filter().later.iter().find(|(w, _)| *w == what).unwrap().1
}

#[test]
fn configure_time_rules() {
    let t = host().configure::<Services>("null").unwrap();
    let r = |w: &str| {
        t.filter()
            .configure_results
            .iter()
            .find(|(x, _)| *x == w)
            .unwrap()
            .1
    };
    assert_eq!(r("kv denied"), Err(Error::Denied));
    assert_eq!(r("callout in configure"), Err(Error::InvalidState));
    assert_eq!(r("bad metric name"), Err(Error::InvalidArgument));
    assert_eq!(r("reserved label"), Err(Error::InvalidArgument));
    assert_eq!(r("bad buckets"), Err(Error::InvalidArgument));
    assert_eq!(r("redefine same"), Ok(()));
    assert_eq!(r("redefine other"), Err(Error::InvalidArgument));
    assert_eq!(r("wrong label count"), Err(Error::InvalidArgument));
    // Without the grant, configure fails the load with the host's error.
    let err = TestHost::new().configure::<Services>("null").err().unwrap();
    assert_eq!(err, "denied");
}

#[test]
fn callout_pause_and_resume_with_the_response() {
    let mut t = host().configure::<Services>("null").unwrap();
    let h = t.host().clone();
    h.queue_callout_response(
        "authz",
        Ok(CalloutResponse::new(200, "").header("x-user", "alice")),
    );
    let mut x = t.exchange(Request::get("/auth"));
    assert_eq!(x.request_headers(), Action::Pause);
    assert!(x.may_pause());
    let sent = h.callouts();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].context, Some(x.context()));
    assert_eq!(sent[0].request.cluster, "authz");
    assert_eq!(sent[0].request.method, "POST");
    assert_eq!(
        sent[0].request.headers,
        vec![("x-path".to_owned(), b"/auth".to_vec())]
    );
    assert_eq!(sent[0].request.body, b"payload");
    assert_eq!(sent[0].request.timeout_ms, 200);
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    assert_eq!(x.request_header("x-user").as_deref(), Some("alice"));
    assert!(!x.may_pause());
    // Delivered once only.
    assert_eq!(
        x.deliver_callout(sent[0].id, Ok(CalloutResponse::new(200, ""))),
        None
    );
    drop(x);
    assert_eq!(later(&t, "set while paused"), Ok(()));
}

#[test]
fn callout_errors_and_denials() {
    let mut t = host().configure::<Services>("null").unwrap();
    let h = t.host().clone();
    h.queue_callout_response("authz", Err(Error::Timeout));
    let mut x = t.exchange(Request::get("/auth"));
    assert_eq!(x.request_headers(), Action::Pause);
    let actions = x.deliver_callouts();
    assert!(
        matches!(&actions[..], [Action::Respond(r)] if r.status == 503 && r.body == b"timeout")
    );

    let mut y = t.exchange(Request::get("/denied"));
    assert!(matches!(y.request_headers(), Action::Respond(r) if r.body == b"denied"));

    let mut w = t.exchange(Request::get("/host-header"));
    assert!(
        matches!(w.request_headers(), Action::Respond(r) if r.body == b"invalid-argument"),
        "a callout carrying `host` is refused"
    );

    let mut z = t.exchange(Request::get("/cancel"));
    z.request_headers();
    drop(z);
    assert_eq!(later(&t, "cancel"), Ok(()));
    assert_eq!(later(&t, "cancel again"), Err(Error::NotFound));
    assert!(h.callouts().last().unwrap().cancelled);
}

#[test]
fn done_cancels_outstanding_callouts() {
    let mut t = host().configure::<Services>("null").unwrap();
    let h = t.host().clone();
    let mut x = t.exchange(Request::get("/auth"));
    assert_eq!(x.request_headers(), Action::Pause);
    x.done();
    assert!(h.callouts()[0].cancelled);
    assert!(x.deliver_callouts().is_empty());
}

#[test]
fn metrics_logs_and_the_clock() {
    let mut t = host().configure::<Services>("null").unwrap();
    let h = t.host().clone();
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    assert_eq!(h.gauge("inflight", &[]), Some(1));
    h.advance(Duration::from_millis(7));
    x.log();
    drop(x);
    t.exchange(Request::get("/")).request_headers();
    assert_eq!(h.counter("hits_total", &["default"]), Some(2));
    assert_eq!(h.counter("hits_total", &["other"]), None);
    assert_eq!(h.gauge("inflight", &[]), Some(1));
    assert_eq!(h.histogram("latency_ms", &[]), Some(vec![7.0]));
    assert_eq!(later(&t, "define late"), Err(Error::InvalidState));
    assert_eq!(later(&t, "callout from log"), Err(Error::InvalidState));
    assert!(h.logged(Level::Debug, "request test-1 on svc"));

    let quiet = host()
        .log_level(Level::Info)
        .configure::<Services>("null")
        .unwrap();
    let qh = quiet.host().clone();
    let mut quiet = quiet;
    quiet.exchange(Request::get("/")).request_headers();
    assert!(qh.logs().is_empty());
}

#[test]
fn ticks_and_tick_callouts() {
    let mut t = host().configure::<Services>("null").unwrap();
    assert_eq!(t.setup().tick_interval_ms(), 1000);
    let h = t.host().clone();
    h.set_wall_time(42);
    t.tick();
    assert!(h.logged(Level::Info, "tick at 42"));
    assert_eq!(later(&t, "tick callout"), Ok(()));
    assert_eq!(h.callouts()[0].context, None);
    assert_eq!(t.deliver_tick_callouts(), 0, "nothing queued yet");
    h.queue_callout_response("authz", Ok(CalloutResponse::new(204, "")));
    assert_eq!(t.deliver_tick_callouts(), 1);
    assert_eq!(
        t.filter().tick_responses,
        vec![(h.callouts()[0].id, Ok(204))]
    );
}

#[test]
fn kv_versions_cas_ttl_and_increment() {
    let t = host().configure::<Services>("null").unwrap();
    let h = t.host().clone();
    let ns = &t.filter().ns;

    let v1 = ns.set("k", "a", WriteCondition::IfAbsent, None).unwrap();
    assert_eq!(
        ns.set("k", "b", WriteCondition::IfAbsent, None),
        Err(Error::CasMismatch)
    );
    assert_eq!(
        ns.set("k", "b", WriteCondition::IfVersion(v1 + 100), None),
        Err(Error::CasMismatch)
    );
    let v2 = ns
        .set("k", "b", WriteCondition::IfVersion(v1), None)
        .unwrap();
    assert!(v2 > v1);
    let e = ns.get("k").unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.version), (&b"b"[..], v2));
    assert_eq!(
        ns.delete("k", WriteCondition::IfVersion(v1)),
        Err(Error::CasMismatch)
    );
    assert_eq!(
        ns.delete("k", WriteCondition::IfAbsent),
        Err(Error::InvalidArgument)
    );
    assert_eq!(ns.delete("k", WriteCondition::IfVersion(v2)), Ok(true));
    assert_eq!(ns.delete("k", WriteCondition::Always), Ok(false));
    // Re-created: a new version, never an old one (no ABA).
    let v3 = ns.set("k", "c", WriteCondition::IfAbsent, None).unwrap();
    assert!(v3 > v2);

    // TTL against the fake clock.
    ns.set("t", "x", WriteCondition::Always, Some(1000))
        .unwrap();
    assert_eq!(
        ns.set("t", "x", WriteCondition::Always, Some(0)),
        Err(Error::InvalidArgument)
    );
    h.advance(Duration::from_millis(999));
    assert!(ns.get("t").unwrap().is_some());
    h.advance(Duration::from_millis(1));
    assert_eq!(ns.get("t").unwrap(), None);
    assert_eq!(h.kv_get("shared", "t"), None);

    // Fixed-window counter: the first increment sets the expiry, later ones keep it.
    assert_eq!(ns.increment("n", 1, Some(60_000)), Ok(1));
    h.advance(Duration::from_secs(30));
    assert_eq!(ns.increment("n", 5, Some(60_000)), Ok(6));
    assert_eq!(ns.get("n").unwrap().unwrap().value, b"6");
    h.advance(Duration::from_secs(30));
    assert_eq!(ns.increment("n", 1, Some(60_000)), Ok(1));
    assert_eq!(
        ns.increment("k", 1, None),
        Err(Error::InvalidArgument),
        "not an integer"
    );
    h.kv_put("shared", "max", i64::MAX.to_string().as_bytes());
    assert_eq!(
        ns.increment("max", 1, None),
        Err(Error::InvalidArgument),
        "overflow"
    );
    assert_eq!(ns.get(&"k".repeat(513)), Err(Error::InvalidArgument));
}

#[test]
fn kv_is_shared_by_instances_on_one_host() {
    let h = host();
    let a = h.configure::<Services>("null").unwrap();
    let b = h
        .clone()
        .instance_index(1)
        .configure::<Services>("null")
        .unwrap();
    a.filter()
        .ns
        .set("k", "from a", WriteCondition::Always, None)
        .unwrap();
    assert_eq!(b.filter().ns.get("k").unwrap().unwrap().value, b"from a");
}

#[test]
fn random_is_bounded_and_not_constant() {
    struct R;
    impl HttpFilter for R {
        type Config = ();
        type Context = ();
        fn configure(_: ()) -> Result<Self, String> {
            assert_eq!(random::bytes(65_537), Err(Error::LimitExceeded));
            let a = random::bytes(16).unwrap();
            let b = random::bytes(16).unwrap();
            assert_eq!(a.len(), 16);
            assert_ne!(a, b);
            assert_ne!(random::u64(), random::u64());
            Ok(R)
        }
        fn setup(&self) -> Setup {
            Setup::new()
        }
    }
    FilterTest::<R>::configure("null").unwrap();
}

// ---------------------------------------------------------------- as the host

/// Records what a filter sees of the client's `host`, and what its `on_done`
/// may do; increments a counter stored by the test.
#[derive(Default)]
struct HostProbe {
    host_header: Option<Option<Vec<u8>>>,
    has_host: bool,
    header_count: usize,
    set_host: Option<Result<(), Error>>,
    authority: String,
    increment: Option<Result<i64, Error>>,
    in_done: Vec<(&'static str, Error)>,
    ns: Option<Namespace>,
}

impl HttpFilter for HostProbe {
    type Config = ();
    // Per-exchange state: declares `done`.
    type Context = u8;
    fn configure(_: ()) -> Result<Self, String> {
        Ok(HostProbe {
            ns: Namespace::open("ns").ok(),
            ..HostProbe::default()
        })
    }
    fn setup(&self) -> Setup {
        Setup::new().on_request_headers()
    }
    fn on_request_headers(
        &mut self,
        _: &mut u8,
        x: &Exchange<'_>,
        h: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.host_header = Some(h.get("host"));
        self.has_host = h.has("host");
        self.header_count = h.len();
        self.set_host = Some(h.set("host", "evil.example"));
        self.authority = x.authority();
        self.increment = self.ns.as_ref().map(|ns| ns.increment("c", 1, None));
        Action::Continue
    }
    fn on_done(&mut self, _: u8) {
        if let Err(e) = callout::send(&CalloutRequest::new("authz", "GET", "/check")) {
            self.in_done.push(("callout", e));
        }
        if let Some(Err(e)) = self.ns.as_ref().map(|ns| ns.start_get("k")) {
            self.in_done.push(("start_get", e));
        }
    }
}

#[test]
fn the_harness_hides_the_client_host_and_runs_on_done_outside_the_exchange_as_the_host() {
    let host = TestHost::new().grant_kv("ns").grant_cluster("authz");
    // Redis's (and the host's) integer form only: no leading zero.
    host.kv_put("ns", "c", b"007");
    let mut t = host.configure::<HostProbe>("null").unwrap();
    let req = Request::get("/")
        .header("Host", "a.example")
        .header("x-one", "1");
    assert_eq!(t.exchange(req).run(Response::new(200)), Outcome::Completed);
    let p = t.filter();
    // The client's host is the authority, not a header a filter reads or writes.
    assert_eq!(p.host_header, Some(None));
    assert!(!p.has_host);
    assert_eq!(p.header_count, 1);
    assert_eq!(p.set_host, Some(Err(Error::Denied)));
    assert_eq!(p.authority, "a.example");
    assert_eq!(p.increment, Some(Err(Error::InvalidArgument)));
    // on-done is no exchange call: no callout, no asynchronous KV.
    assert_eq!(
        p.in_done,
        vec![
            ("callout", Error::InvalidState),
            ("start_get", Error::InvalidState)
        ]
    );
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Required {
    #[allow(dead_code)]
    header: String,
}

struct NeedsHeader;

impl HttpFilter for NeedsHeader {
    type Config = Required;
    type Context = ();
    fn configure(_: Required) -> Result<Self, String> {
        Ok(NeedsHeader)
    }
    fn setup(&self) -> Setup {
        Setup::new()
    }
}

#[test]
fn no_config_names_the_missing_field() {
    let Err(e) = FilterTest::<NeedsHeader>::configure("null") else {
        panic!("a config without its required field loaded")
    };
    assert!(e.contains("missing field `header`"), "{e}");
}

// ---------------------------------------------------------------- sanitized request headers

/// Declares the headers of its config at `configure`; records what it sees.
struct Owner {
    seen_user: Vec<Option<Vec<u8>>>,
    later: Option<Error>,
}

impl HttpFilter for Owner {
    type Config = Vec<String>;
    type Context = ();
    fn configure(names: Vec<String>) -> Result<Self, String> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        legate_sdk::sanitize_request_headers(&names).map_err(|e| format!("declaring: {e:?}"))?;
        Ok(Owner {
            seen_user: Vec::new(),
            later: None,
        })
    }
    fn setup(&self) -> Setup {
        Setup::new().on_request_headers()
    }
    fn on_request_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        headers: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.seen_user.push(headers.get("x-user"));
        self.later = legate_sdk::sanitize_request_headers(&["x-other"]).err();
        Action::Continue
    }
}

#[test]
fn declared_request_headers_are_removed_before_the_filter_runs() {
    let mut t = FilterTest::<Owner>::configure(r#"["X-User", "x_user", "x-user"]"#).unwrap();
    // Lowercase, each once.
    assert_eq!(t.sanitized_request_headers(), vec!["x-user", "x_user"]);
    let outcome = t
        .exchange(
            Request::get("/")
                .header("x-user", "admin")
                .header("X_User", "admin")
                .header("x-keep", "1"),
        )
        .run(Response::new(200));
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(t.filter().seen_user, vec![None]);
    // Only `configure` may declare them.
    assert_eq!(t.filter().later, Some(Error::InvalidState));
}

#[test]
fn a_bad_declaration_is_refused_whole() {
    for (config, err) in [
        (r#"["x-user", "bad name"]"#, "InvalidArgument"),
        (r#"[":path"]"#, "InvalidArgument"),
        (r#"["x-user", "Content-Length"]"#, "Denied"),
        (r#"["host"]"#, "Denied"),
    ] {
        let e = FilterTest::<Owner>::configure(config).err().unwrap();
        assert_eq!(e, format!("declaring: {err}"), "{config}");
    }
    let many: Vec<String> = (0..257).map(|i| format!("x-h{i}")).collect();
    let e = FilterTest::<Owner>::configure(&serde_json::to_string(&many).unwrap())
        .err()
        .unwrap();
    assert_eq!(e, "declaring: LimitExceeded");
    let t = FilterTest::<Owner>::configure(&serde_json::to_string(&many[..256]).unwrap()).unwrap();
    assert_eq!(t.sanitized_request_headers().len(), 256);
}

// ---------------------------------------------------------------- check_cluster

/// Checks the cluster its config names at `configure`.
struct ClusterChecker;

impl HttpFilter for ClusterChecker {
    type Config = String;
    type Context = ();
    fn configure(cluster: String) -> Result<Self, String> {
        callout::check_cluster(&cluster).map_err(|e| format!("{cluster}: {e:?}"))?;
        Ok(ClusterChecker)
    }
    fn setup(&self) -> Setup {
        Setup::new()
    }
}

#[test]
fn check_cluster_is_ok_only_for_a_granted_cluster() {
    let host = TestHost::new().grant_cluster("authz");
    assert!(host.configure::<ClusterChecker>(r#""authz""#).is_ok());
    assert_eq!(
        host.configure::<ClusterChecker>(r#""other""#).err(),
        Some("other: Denied".to_owned())
    );
}
