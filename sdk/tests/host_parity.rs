//! The native harness refuses what the real host refuses (host/src/wasm), so a
//! plugin that passes its native tests does not fail in the host: metric
//! definitions and caps, a metric family's kind and buckets shared by the
//! plugins on one proxy, the buffered body call of a body-less message, local
//! response validation, header values, callouts, the tick interval and KV TTLs;
//! and it calls the filter when the host would: a labelled metric's empty
//! series, a pause with nothing outstanding (a failure), replies to the
//! instance that made the call only, none after a failure, and the failure
//! policy (fail open: the exchange goes on without the filter), a buffered
//! body over `limits.body` answered by the host without the body call,
//! callout responses over 1 MiB as `limit-exceeded`, `on_log` before
//! `on_done` always; and the exchange is what the host shows: a local
//! response's status and cause (in gRPC's form to a gRPC request) in
//! `on_log`, no body data once it went on, body writes capped at
//! `limits.body`, trailers kept once their body call saw them, and log
//! messages as the host writes them (one line, at most 4 KiB).

#![allow(clippy::unwrap_used)]

use legate_sdk::callout::{self, CalloutId, CalloutRequest, CalloutResponse};
use legate_sdk::kv::{CallId, Namespace, Reply, WriteCondition};
use legate_sdk::metrics::{Counter, Gauge, Histogram};
use legate_sdk::testing::{FilterTest, NetworkFilterTest, Outcome, Request, Response, TestHost};
use legate_sdk::{
    Action, Body, BodyMode, Direction, Error, Exchange, Headers, HttpFilter, LocalResponse,
    NetworkFilter, NetworkSetup, Phase, Setup,
};
use serde::Deserialize;

// ---------------------------------------------------------------- metrics

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricCase {
    case: String,
}

/// Runs one metrics case in `configure`; `Err` names the first check that did
/// not get what the host answers.
struct Metrics;

fn expect<T>(what: &str, got: Result<T, Error>, want: Result<(), Error>) -> Result<(), String> {
    let got = got.map(drop);
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

impl HttpFilter for Metrics {
    type Config = MetricCase;
    type Context = ();
    fn configure(c: MetricCase) -> Result<Self, String> {
        let bad = Err(Error::InvalidArgument);
        let over = Err(Error::LimitExceeded);
        match c.case.as_str() {
            "reserved" => {
                for name in ["calls_total", "failures_total", "instances", "memory_bytes"] {
                    expect(name, Counter::define(name, "", &[]), bad)?;
                }
                for name in ["lat_bucket", "lat_sum", "req_count"] {
                    expect(name, Counter::define(name, "", &[]), bad)?;
                    expect(name, Gauge::define(name, "", &[]), bad)?;
                    expect(name, Histogram::define(name, "", &[], &[]), bad)?;
                }
                expect("counts", Counter::define("req_counts", "", &[]), Ok(()))?;
                expect(
                    "my_calls",
                    Counter::define("my_calls_total", "", &[]),
                    Ok(()),
                )?;
            }
            "help" => {
                let long = "h".repeat(1025);
                expect("1025", Counter::define("a", &long, &[]), bad)?;
                expect("1024", Counter::define("a", &long[..1024], &[]), Ok(()))?;
            }
            "metrics" => {
                for i in 0..100 {
                    expect("100", Counter::define(&format!("m{i}"), "", &["k"]), Ok(()))?;
                }
                expect("101st", Gauge::define("one_more", "", &[]), over)?;
                // Defining one it has again is not a new metric.
                expect("again", Counter::define("m7", "", &["k"]), Ok(()))?;
            }
            "series" => {
                let c = Counter::define("c", "", &["k"]).map_err(|e| e.to_string())?;
                // An unlabelled metric's series counts at once.
                expect("unlabelled", Gauge::define("g", "", &[]), Ok(()))?;
                for i in 0..999 {
                    expect("999", c.with_labels(&[&i.to_string()]), Ok(()))?;
                }
                expect("1001st", c.with_labels(&["new"]), over)?;
                expect("known", c.with_labels(&["7"]), Ok(()))?;
                expect("another", Gauge::define("g2", "", &[]), over)?;
            }
            other => return Err(format!("no case {other}")),
        }
        Ok(Metrics)
    }
    fn setup(&self) -> Setup {
        Setup::new()
    }
}

fn metric_case(case: &str) -> Result<(), String> {
    FilterTest::<Metrics>::configure(&format!(r#"{{"case": "{case}"}}"#)).map(drop)
}

#[test]
fn host_reserved_and_histogram_sample_names_are_refused() {
    metric_case("reserved").unwrap();
}

#[test]
fn metric_help_is_at_most_1_kib() {
    metric_case("help").unwrap();
}

#[test]
fn a_plugin_defines_at_most_100_metrics() {
    metric_case("metrics").unwrap();
}

#[test]
fn a_plugin_makes_at_most_1000_series() {
    metric_case("series").unwrap();
}

/// Defines, in `configure`, an unlabelled histogram `histogram` over
/// `buckets` (and again over `again`, if given), or a counter `counter`.
struct Family;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FamilyConfig {
    #[serde(default)]
    histogram: Option<String>,
    #[serde(default)]
    buckets: Vec<f64>,
    #[serde(default)]
    again: Option<Vec<f64>>,
    #[serde(default)]
    counter: Option<String>,
}

impl HttpFilter for Family {
    type Config = FamilyConfig;
    type Context = ();
    fn configure(c: FamilyConfig) -> Result<Self, String> {
        if let Some(name) = &c.histogram {
            Histogram::define(name, "", &[], &c.buckets).map_err(|e| format!("{e:?}"))?;
            if let Some(again) = &c.again {
                Histogram::define(name, "", &[], again).map_err(|e| format!("again {e:?}"))?;
            }
        }
        if let Some(name) = &c.counter {
            Counter::define(name, "", &[]).map_err(|e| format!("{e:?}"))?;
        }
        Ok(Family)
    }
    fn setup(&self) -> Setup {
        Setup::new()
    }
}

/// Plugins on one proxy share a metric family, so the host refuses a second
/// definition with other buckets (host/src/stats.rs `declare_histogram`, abi
/// §5.6): another plugin's, or the plugin's own loaded again, and the host's
/// buckets (none given) against a plugin's own. Those bounds written out are
/// the same layout as none. Another kind is refused too.
#[test]
fn plugins_sharing_a_histogram_family_must_share_its_buckets() {
    let lat = |buckets: &str| format!(r#"{{"histogram": "lat", "buckets": {buckets}}}"#);
    let refused = |host: &TestHost, config: &str| match host.configure::<Family>(config) {
        Ok(_) => panic!("{config} was accepted"),
        Err(e) => assert_eq!(e, "InvalidArgument", "{config}"),
    };
    let a = TestHost::new().plugin_name("a");
    a.configure::<Family>(&lat("[1, 10]")).unwrap();
    let b = a.another_plugin("b");
    refused(&b, &lat("[1, 100]"));
    refused(&b, &lat("[]"));
    b.configure::<Family>(&lat("[1, 10]")).unwrap();
    // The plugin loaded again meets its previous version's definition.
    refused(&a.another_plugin("a"), &lat("[1, 100]"));
    // A plugin's own buckets against the host's.
    let a = TestHost::new().plugin_name("a");
    a.configure::<Family>(&lat("[]")).unwrap();
    refused(&a.another_plugin("b"), &lat("[1, 10]"));
    let host_buckets = format!("{:?}", legate_sdk::testing::HOST_BUCKETS);
    a.another_plugin("b")
        .configure::<Family>(&lat(&host_buckets))
        .unwrap();
    // In one plugin, too: none and the host's written out are one layout.
    TestHost::new()
        .configure::<Family>(&format!(
            r#"{{"histogram": "lat", "buckets": [], "again": {host_buckets}}}"#
        ))
        .unwrap();
    // A failed load takes its families back.
    let a = TestHost::new().plugin_name("a");
    let failed = r#"{"histogram": "lat", "buckets": [1, 10], "again": [2]}"#;
    assert_eq!(
        a.configure::<Family>(failed).err().as_deref(),
        Some("again InvalidArgument")
    );
    a.another_plugin("b")
        .configure::<Family>(&lat("[2]"))
        .unwrap();
    // Another kind.
    let a = TestHost::new().plugin_name("a");
    a.configure::<Family>(r#"{"counter": "n"}"#).unwrap();
    refused(&a.another_plugin("b"), r#"{"histogram": "n"}"#);
    a.another_plugin("b")
        .configure::<Family>(r#"{"counter": "n"}"#)
        .unwrap();
}

// ---------------------------------------------------------------- body-less messages

/// Records its body calls (direction, length, end of stream); in `streamed`
/// mode with config `{"streamed": true}`.
#[derive(Default)]
struct BodyCalls {
    streamed: bool,
    calls: Vec<(Direction, u64, bool)>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BodyCallsConfig {
    #[serde(default)]
    streamed: bool,
}

impl HttpFilter for BodyCalls {
    type Config = BodyCallsConfig;
    type Context = ();
    fn configure(c: BodyCallsConfig) -> Result<Self, String> {
        Ok(BodyCalls {
            streamed: c.streamed,
            calls: Vec::new(),
        })
    }
    fn setup(&self) -> Setup {
        let mode = if self.streamed {
            BodyMode::Streamed
        } else {
            BodyMode::Buffered
        };
        Setup::new().on_request_body(mode).on_response_body(mode)
    }
    fn on_request_body(&mut self, _: &mut (), _: &Exchange<'_>, b: &Body<'_>, eos: bool) -> Action {
        self.calls.push((Direction::Request, b.len(), eos));
        // A transcoder may give a `GET` a body there.
        if b.is_empty() {
            assert_eq!(b.replace(b"made"), Ok(()));
        }
        Action::Continue
    }
    fn on_response_body(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        b: &Body<'_>,
        eos: bool,
    ) -> Action {
        self.calls.push((Direction::Response, b.len(), eos));
        Action::Continue
    }
}

fn body_calls(config: &str, req: Request, resp: Response) -> Vec<(Direction, u64, bool)> {
    let mut t = FilterTest::<BodyCalls>::configure(config).unwrap();
    assert_eq!(t.exchange(req).run(resp), Outcome::Completed);
    t.filter().calls.clone()
}

#[test]
fn a_buffering_filter_gets_one_empty_body_call_for_a_message_without_body() {
    use Direction::{Request as Rq, Response as Rs};
    let mut t = FilterTest::<BodyCalls>::configure("null").unwrap();
    let mut x = t.exchange(Request::get("/items/7"));
    assert_eq!(x.run(Response::new(200)), Outcome::Completed);
    assert_eq!(t.filter().calls, vec![(Rq, 0, true), (Rs, 0, true)]);
    // With a body, one call with all of it, as before.
    assert_eq!(
        body_calls(
            "null",
            Request::post("/", "abc"),
            Response::new(200).body("xy")
        ),
        vec![(Rq, 3, true), (Rs, 2, true)]
    );
    // Responses that cannot have a body get no call.
    for status in [204, 304] {
        assert_eq!(
            body_calls("null", Request::get("/"), Response::new(status)),
            vec![(Rq, 0, true)],
            "{status}"
        );
    }
    assert_eq!(
        body_calls("null", Request::new("HEAD", "/"), Response::new(200)),
        vec![(Rq, 0, true)]
    );
    // In streamed mode a body-less message gets no body call.
    assert_eq!(
        body_calls(
            r#"{"streamed": true}"#,
            Request::get("/"),
            Response::new(200)
        ),
        vec![]
    );
}

// ---------------------------------------------------------------- header values

/// Writes fields in `on_request_headers` and keeps the first mismatch with
/// what the host answers.
struct HeaderRules {
    result: Result<(), String>,
}

impl HeaderRules {
    fn check(h: &Headers<'_>) -> Result<(), String> {
        let bad = Err(Error::InvalidArgument);
        let over = Err(Error::LimitExceeded);
        for b in [0x01u8, 0x08, 0x0B, 0x1F, 0x7F, b'\r', b'\n', 0] {
            expect(&format!("byte {b:#x}"), h.set("x-v", [b'a', b, b'b']), bad)?;
            expect(&format!("add {b:#x}"), h.add("x-v", [b]), bad)?;
        }
        for v in [&b"a\tb"[..], b"caf\xc3\xa9", b"\x80\xff", b" ~ "] {
            expect(&format!("{v:?}"), h.set("x-v", v), Ok(()))?;
        }
        // The host checks the fields it owns before the value.
        expect("connection", h.set("connection", "\r"), Err(Error::Denied))?;
        expect("long name", h.set(&"n".repeat(65_536), "v"), bad)?;
        expect("65535 name", h.set(&"n".repeat(65_535), "v"), Ok(()))?;
        h.remove(&"n".repeat(65_535)).map_err(|e| e.to_string())?;
        // Caps: 64 KiB a value, 1024 fields a map.
        expect("64 KiB", h.set("x-big", vec![b'a'; 64 * 1024]), Ok(()))?;
        expect(
            "64 KiB + 1",
            h.set("x-big", vec![b'a'; 64 * 1024 + 1]),
            over,
        )?;
        h.remove("x-big").map_err(|e| e.to_string())?;
        while h.len() < 1024 {
            h.add("x-many", "1").map_err(|e| e.to_string())?;
        }
        expect("1025th", h.add("x-many", "1"), over)?;
        expect("new field", h.set("x-new", "1"), over)?;
        // Replacing a field the full map holds does not grow it.
        expect("replace", h.set("x-v", "2"), Ok(()))?;
        Ok(())
    }
}

impl HttpFilter for HeaderRules {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        Ok(HeaderRules {
            result: Err("not called".to_owned()),
        })
    }
    fn setup(&self) -> Setup {
        Setup::new().on_request_headers()
    }
    fn on_request_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        h: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.result = Self::check(h);
        Action::Continue
    }
}

#[test]
fn header_values_and_caps_are_checked_as_the_hosts_http_crate_does() {
    let mut t = FilterTest::<HeaderRules>::configure("null").unwrap();
    t.exchange(Request::get("/")).request_headers();
    t.filter().result.clone().unwrap();
}

// ---------------------------------------------------------------- local responses

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerConfig {
    status: u16,
    #[serde(default)]
    name: String,
    #[serde(default)]
    value: String,
    /// How many `name: value` fields.
    #[serde(default)]
    count: usize,
    /// Bytes added to the value.
    #[serde(default)]
    pad: usize,
}

/// Answers every request locally as configured; counts `on_log` and `on_done`.
struct Answer {
    response: LocalResponse,
    logs: u32,
    dones: u32,
}

#[derive(Default)]
struct Seen(#[allow(dead_code)] u8);

impl HttpFilter for Answer {
    type Config = AnswerConfig;
    type Context = Seen;
    fn configure(c: AnswerConfig) -> Result<Self, String> {
        let value = format!("{}{}", c.value, "a".repeat(c.pad));
        let mut response = LocalResponse::new(c.status).body("no\n");
        response.headers = vec![(c.name, value.into_bytes()); c.count];
        Ok(Answer {
            response,
            logs: 0,
            dones: 0,
        })
    }
    fn setup(&self) -> Setup {
        Setup::new().on_request_headers().on_log()
    }
    fn on_request_headers(
        &mut self,
        _: &mut Seen,
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        Action::Respond(self.response.clone())
    }
    fn on_log(&mut self, _: &mut Seen, _: &Exchange<'_>) {
        self.logs += 1;
    }
    fn on_done(&mut self, _: Seen) {
        self.dones += 1;
    }
}

/// What `run` ends with for an `Answer` configured with `config`, and
/// whether it was logged.
fn answer(config: &str) -> (Outcome, u32, u32) {
    let mut t = FilterTest::<Answer>::configure(config).unwrap();
    let outcome = t.exchange(Request::get("/")).run(Response::new(200));
    (outcome, t.filter().logs, t.filter().dones)
}

fn failed(config: &str, why: &str) {
    match answer(config) {
        (Outcome::Failed(Phase::RequestHeaders, reason), 0, 1) => {
            assert!(reason.contains(why), "{config}: {reason}")
        }
        other => panic!("{config}: {other:?}"),
    }
}

fn responded(config: &str) {
    match answer(config) {
        (Outcome::Responded(Phase::RequestHeaders, _), 1, 1) => {}
        other => panic!("{config}: {other:?}"),
    }
}

#[test]
fn a_local_response_the_host_refuses_is_a_failure_of_the_call() {
    for status in [0, 100, 199, 600, 999] {
        failed(&format!(r#"{{"status": {status}}}"#), "outside 200..=599");
    }
    responded(r#"{"status": 200}"#);
    responded(r#"{"status": 599}"#);
    let field = |name: &str, value: &str, count: usize, pad: usize| {
        format!(
            r#"{{"status": 403, "name": "{name}", "value": "{value}", "count": {count}, "pad": {pad}}}"#
        )
    };
    failed(&field("bad name", "v", 1, 0), "header name `bad name`");
    failed(&field("", "v", 1, 0), "header name");
    failed(&field("x-a", "\\u0001", 1, 0), "invalid value");
    failed(&field("x-a", "a\\rb", 1, 0), "invalid value");
    failed(&field("x-a", "\\u007f", 1, 0), "invalid value");
    failed(&field("x-a", "v", 1025, 0), "caps");
    failed(&field("x-a", "", 1, 64 * 1024 + 1), "caps");
    responded(&field("x-a", "", 1, 64 * 1024));
    responded(&field("x-a", "v", 1024, 0));
    responded(&field("x-a", "a\\tb", 1, 0));
    // Hop-by-hop fields are dropped by the host, not refused.
    responded(&field("connection", "close", 1, 0));
    // An upper-case name is a token; the host sends it in lower case.
    responded(&field("X-Why", "v", 1, 0));
}

#[test]
fn a_refused_local_response_is_reported_by_the_phase_call_too() {
    let mut t = FilterTest::<Answer>::configure(r#"{"status": 700}"#).unwrap();
    let mut x = t.exchange(Request::get("/"));
    assert!(matches!(x.request_headers(), Action::Respond(_)));
    assert!(x.failure().unwrap().contains("700"));
    // No more calls but `on_done`.
    x.log();
    x.done();
    assert_eq!((t.filter().logs, t.filter().dones), (0, 1));

    let mut t = FilterTest::<Answer>::configure(r#"{"status": 401}"#).unwrap();
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    assert_eq!(x.failure(), None);
}

// ---------------------------------------------------------------- callouts

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CallerConfig {
    #[serde(default)]
    requests: Vec<ProbeRequest>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct ProbeRequest {
    #[serde(default = "slash")]
    path: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    header: Option<(String, String)>,
    /// How many copies of `header`.
    #[serde(default = "one")]
    count: usize,
    /// Bytes added to the header's value.
    #[serde(default)]
    pad: usize,
}

fn slash() -> String {
    "/".to_owned()
}
fn one() -> usize {
    1
}

/// Sends callouts and cancels them as its request's `x-op` says:
/// `probe` (the configured requests), `send N`, `cancel ID`; `on_tick` sends
/// one and tries to cancel every callout an exchange sent.
#[derive(Default)]
struct Caller {
    requests: Vec<ProbeRequest>,
    sent: Vec<Result<CalloutId, Error>>,
    cancels: Vec<Result<(), Error>>,
    tick_ids: Vec<CalloutId>,
    tick_cancels: Vec<Result<(), Error>>,
}

impl Caller {
    fn probe(r: &ProbeRequest) -> CalloutRequest {
        let mut c = CalloutRequest::new("authz", "GET", &r.path);
        c.authority = r.authority.clone();
        if let Some((n, v)) = &r.header {
            let v = format!("{v}{}", "a".repeat(r.pad));
            c.headers = vec![(n.clone(), v.into_bytes()); r.count];
        }
        c
    }
}

impl HttpFilter for Caller {
    type Config = CallerConfig;
    type Context = ();
    fn configure(c: CallerConfig) -> Result<Self, String> {
        Ok(Caller {
            requests: c.requests,
            ..Caller::default()
        })
    }
    fn setup(&self) -> Setup {
        // Ticks: callouts from `on_tick` (the host ticks only a filter
        // that declares an interval).
        Setup::new().on_request_headers().tick_every_ms(1000)
    }
    fn on_request_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        h: &Headers<'_>,
        _: bool,
    ) -> Action {
        let op = h.get_str("x-op").unwrap_or_default();
        let mut words = op.split(' ');
        match (
            words.next(),
            words.next().map(|n| n.parse::<u64>().unwrap()),
        ) {
            (Some("probe"), _) => {
                for r in &self.requests {
                    self.sent.push(callout::send(&Caller::probe(r)));
                }
            }
            (Some("send"), Some(n)) => {
                for _ in 0..n {
                    let r = CalloutRequest::new("authz", "GET", "/check");
                    self.sent.push(callout::send(&r));
                }
            }
            (Some("cancel"), Some(id)) => self.cancels.push(callout::cancel(id)),
            _ => {}
        }
        Action::Continue
    }
    fn on_tick(&mut self) {
        for id in self.sent.iter().flatten() {
            self.tick_cancels.push(callout::cancel(*id));
        }
        let r = CalloutRequest::new("authz", "GET", "/tick");
        self.tick_ids.push(callout::send(&r).unwrap());
    }
}

fn caller(config: &str) -> FilterTest<Caller> {
    TestHost::new()
        .grant_cluster("authz")
        .configure(config)
        .unwrap()
}

fn op(t: &mut FilterTest<Caller>, op: &str) {
    let mut x = t.exchange(Request::get("/").header("x-op", op));
    assert_eq!(x.request_headers(), Action::Continue);
}

/// What `send` answers for each of `requests` (JSON `ProbeRequest`s).
fn probe(requests: &[&str]) -> Vec<Result<(), Error>> {
    let mut t = caller(&format!(r#"{{"requests": [{}]}}"#, requests.join(",")));
    op(&mut t, "probe");
    t.filter().sent.iter().map(|r| r.map(drop)).collect()
}

#[test]
fn a_callout_path_must_parse_as_a_uri() {
    let bad = Err(Error::InvalidArgument);
    let cases: &[(&str, Result<(), Error>)] = &[
        (r#"{"path": "/"}"#, Ok(())),
        (r#"{"path": "/a/b?x=1&y=%20"}"#, Ok(())),
        (r#"{"path": "/caf\u00e9"}"#, Ok(())),
        (r#"{"path": "/a?x=`|{}"}"#, Ok(())),
        (r#"{"path": "/a{\"b\"}"}"#, Ok(())),
        // Nothing after a fragment's `#` is looked at (the host drops it).
        (r#"{"path": "/a#b c"}"#, Ok(())),
        (r#"{"path": "a"}"#, bad),
        (r#"{"path": "/a b"}"#, bad),
        (r#"{"path": "/a\tb"}"#, bad),
        (r#"{"path": "/a\u007f"}"#, bad),
        (r#"{"path": "/a<b"}"#, bad),
        (r#"{"path": "/a`"}"#, bad),
        // The `http` crate takes a backslash in a path.
        (r#"{"path": "/a\\b"}"#, Ok(())),
        (r#"{"path": "/a?x=\"y\""}"#, bad),
        (r#"{"path": "/a?x=<"}"#, bad),
    ];
    let got = probe(&cases.iter().map(|c| c.0).collect::<Vec<_>>());
    for ((case, want), got) in cases.iter().zip(got) {
        assert_eq!(got, *want, "{case}");
    }
    let long = format!(r#"{{"path": "/{}"}}"#, "a".repeat(65_533));
    assert_eq!(probe(&[&long]), vec![Ok(())]);
    let long = format!(r#"{{"path": "/{}"}}"#, "a".repeat(65_534));
    assert_eq!(probe(&[&long]), vec![bad]);
}

#[test]
fn a_callout_authority_must_parse_as_one() {
    let bad = Err(Error::InvalidArgument);
    let cases: &[(&str, Result<(), Error>)] = &[
        (r#"{"authority": "authz"}"#, Ok(())),
        (r#"{"authority": "authz.internal:8443"}"#, Ok(())),
        (r#"{"authority": "[::1]:80"}"#, Ok(())),
        (r#"{"authority": "[fe80::1%25eth0]"}"#, Ok(())),
        (r#"{"authority": "user:pw@authz"}"#, Ok(())),
        (r#"{"authority": "us%20er@authz"}"#, Ok(())),
        (r#"{"authority": ""}"#, bad),
        (r#"{"authority": "a b"}"#, bad),
        (r#"{"authority": "a:1:2"}"#, bad),
        (r#"{"authority": "a/b"}"#, bad),
        (r#"{"authority": "a?"}"#, bad),
        (r#"{"authority": "user@"}"#, bad),
        (r#"{"authority": "a%20b"}"#, bad),
        (r#"{"authority": "[::1"}"#, bad),
        (r#"{"authority": "::1]"}"#, bad),
        (r#"{"authority": "a\"b"}"#, bad),
    ];
    let got = probe(&cases.iter().map(|c| c.0).collect::<Vec<_>>());
    for ((case, want), got) in cases.iter().zip(got) {
        assert_eq!(got, *want, "{case}");
    }
}

#[test]
fn callout_headers_have_the_hosts_caps() {
    let over = Err(Error::LimitExceeded);
    assert_eq!(
        probe(&[
            r#"{"header": ["x-a", "v"], "count": 1024}"#,
            r#"{"header": ["x-a", "v"], "count": 1025}"#,
            r#"{"header": ["x-a", ""], "pad": 65536}"#,
            r#"{"header": ["x-a", ""], "pad": 65537}"#,
            r#"{"header": ["x-a", "\u0001"]}"#,
        ]),
        vec![Ok(()), over, Ok(()), over, Err(Error::InvalidArgument)]
    );
}

#[test]
fn an_instance_has_at_most_1024_callouts_outstanding() {
    let host = TestHost::new().grant_cluster("authz");
    let mut t = host.configure::<Caller>("null").unwrap();
    for _ in 0..127 {
        op(&mut t, "send 8");
    }
    // On-tick's count too.
    t.tick();
    op(&mut t, "send 8");
    let sent = &t.filter().sent;
    assert_eq!(sent.len(), 128 * 8);
    assert!(sent[..127 * 8 + 7].iter().all(Result::is_ok));
    assert_eq!(sent[127 * 8 + 7], Err(Error::LimitExceeded));
    // Another instance of the plugin has its own.
    let mut other = host.configure::<Caller>("null").unwrap();
    op(&mut other, "send 8");
    assert!(other.filter().sent.iter().all(Result::is_ok));
}

#[test]
fn only_the_context_that_sent_a_callout_cancels_it() {
    let mut t = caller("null");
    op(&mut t, "send 1");
    let id = *t.filter().sent[0].as_ref().unwrap();
    // Another exchange, and on_tick, do not find it.
    op(&mut t, &format!("cancel {id}"));
    assert_eq!(t.filter().cancels, vec![Err(Error::NotFound)]);
    t.tick();
    assert_eq!(t.filter().tick_cancels, vec![Err(Error::NotFound)]);
    // Nor an exchange the tick's.
    let tick = t.filter().tick_ids[0];
    op(&mut t, &format!("cancel {tick}"));
    assert_eq!(t.filter().cancels[1], Err(Error::NotFound));
    assert!(t.host().callouts().iter().all(|c| c.outstanding));
}

// ---------------------------------------------------------------- ticks and KV TTLs

struct Ticker(u32);

impl HttpFilter for Ticker {
    type Config = u32;
    type Context = ();
    fn configure(ms: u32) -> Result<Self, String> {
        Ok(Ticker(ms))
    }
    fn setup(&self) -> Setup {
        Setup::new().tick_every_ms(self.0)
    }
}

struct NetTicker(u32);

impl NetworkFilter for NetTicker {
    type Config = u32;
    type Context = ();
    fn configure(ms: u32) -> Result<Self, String> {
        Ok(NetTicker(ms))
    }
    fn setup(&self) -> NetworkSetup {
        NetworkSetup::new().tick_every_ms(self.0)
    }
}

#[test]
fn a_tick_interval_below_10_ms_rejects_the_load() {
    for ms in [1, 9] {
        let err = FilterTest::<Ticker>::configure(&ms.to_string())
            .err()
            .unwrap();
        assert!(err.contains("below the minimum of 10 ms"), "{err}");
        let err = NetworkFilterTest::<NetTicker>::configure(&ms.to_string())
            .err()
            .unwrap();
        assert!(err.contains("below the minimum of 10 ms"), "{err}");
    }
    for ms in [0, 10, 60_000] {
        FilterTest::<Ticker>::configure(&ms.to_string()).unwrap();
        NetworkFilterTest::<NetTicker>::configure(&ms.to_string()).unwrap();
    }
}

/// Runs KV calls with a TTL of 0 in `configure` (config: whether the store
/// is down).
struct ZeroTtl;

impl HttpFilter for ZeroTtl {
    type Config = bool;
    type Context = ();
    fn configure(down: bool) -> Result<Self, String> {
        let ns = Namespace::open("ns").map_err(|e| e.to_string())?;
        let bad = Err(Error::InvalidArgument);
        expect("absent", ns.increment("absent", 1, Some(0)), bad)?;
        expect(
            "set",
            ns.set("k", b"1", WriteCondition::Always, Some(0)),
            bad,
        )?;
        if down {
            // Checked before the store is asked, as on the host.
            let down = Err(Error::Unavailable);
            expect("down", ns.increment("k", 1, Some(60_000)), down)?;
        } else {
            expect("create", ns.increment("k", 1, Some(60_000)), Ok(()))?;
            // The host refuses it for an existing key too.
            expect("existing", ns.increment("k", 1, Some(0)), bad)?;
        }
        Ok(ZeroTtl)
    }
    fn setup(&self) -> Setup {
        Setup::new()
    }
}

#[test]
fn a_kv_ttl_of_0_is_refused_whether_or_not_the_key_exists() {
    let host = TestHost::new().grant_kv("ns");
    host.configure::<ZeroTtl>("false").map(drop).unwrap();
    assert_eq!(host.kv_get("ns", "k").unwrap().value, b"1");
    host.kv_unavailable(true);
    host.configure::<ZeroTtl>("true").map(drop).unwrap();
}

// ---------------------------------------------------------------- labelled metrics' empty series

/// Defines a labelled counter, gauge and histogram and an unlabelled counter
/// in `configure` (and one labelled series by `with_labels`); each request
/// records once through every `define` handle.
struct Labelled {
    hits: Counter,
    level: Gauge,
    sizes: Histogram,
}

impl HttpFilter for Labelled {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        let hits = Counter::define("hits_total", "", &["route"]).map_err(|e| e.to_string())?;
        hits.with_labels(&["a"]).map_err(|e| e.to_string())?;
        Counter::define("plain_total", "", &[]).map_err(|e| e.to_string())?;
        Ok(Labelled {
            hits,
            level: Gauge::define("level", "", &["k"]).map_err(|e| e.to_string())?,
            sizes: Histogram::define("sizes", "", &["k"], &[]).map_err(|e| e.to_string())?,
        })
    }
    fn setup(&self) -> Setup {
        Setup::new().on_request_headers()
    }
    fn on_request_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.hits.inc();
        self.level.set(3);
        self.sizes.observe(1.5);
        Action::Continue
    }
}

#[test]
fn a_labelled_metrics_empty_series_exists_once_recorded_into() {
    let host = TestHost::new();
    let mut t = host.configure::<Labelled>("null").unwrap();
    assert!(host.metric_defined("hits_total"));
    // As the host's /stats: no `{route=""}` series for a `define` handle
    // nothing was recorded through.
    assert_eq!(host.counter("hits_total", &[""]), None);
    assert_eq!(host.gauge("level", &[""]), None);
    assert_eq!(host.histogram("sizes", &[""]), None);
    // An unlabelled metric's series and a `with_labels` one exist at once.
    assert_eq!(host.counter("plain_total", &[]), Some(0));
    assert_eq!(host.counter("hits_total", &["a"]), Some(0));
    t.exchange(Request::get("/")).request_headers();
    assert_eq!(host.counter("hits_total", &[""]), Some(1));
    assert_eq!(host.gauge("level", &[""]), Some(3));
    assert_eq!(host.histogram("sizes", &[""]), Some(vec![1.5]));
}

// ---------------------------------------------------------------- pauses, instances, failures

/// The steps left for an exchange of a [`Waiter`].
#[derive(Default)]
struct Steps(Vec<String>);

/// Takes its steps from the request's `x-steps` (comma-separated), one per
/// call: the request headers phase, then each callout or KV reply (then
/// `continue`). A step does something, then returns: `pause` (nothing sent),
/// `call` (a callout to `authz`, then `pause`), `call2` (two), `callkv` (a
/// callout and an asynchronous KV get), `kv` (a KV get), `send` (a callout,
/// then `continue`), `sendkv` (a KV get, then `continue`), `detach` (tries
/// to, then `continue`), `respond` (a local response, 403), `bad` (a local
/// response the host refuses), `continue`. `on_tick` sends a callout.
#[derive(Default)]
struct Waiter {
    sent: Vec<CalloutId>,
    replies: Vec<CalloutId>,
    detaches: Vec<Result<(), Error>>,
    logs: u32,
    dones: u32,
    tick_replies: Vec<CalloutId>,
}

fn check() -> CalloutRequest {
    CalloutRequest::new("authz", "GET", "/check")
}

impl Waiter {
    fn step(&mut self, steps: &mut Steps, x: &Exchange<'_>) -> Action {
        let step = if steps.0.is_empty() {
            "continue".to_owned()
        } else {
            steps.0.remove(0)
        };
        let kv = || Namespace::open("ns").unwrap().start_get("k").unwrap();
        match step.as_str() {
            "pause" => Action::Pause,
            "call" | "call2" | "callkv" | "send" => {
                self.sent.push(callout::send(&check()).unwrap());
                match step.as_str() {
                    "call2" => self.sent.push(callout::send(&check()).unwrap()),
                    "callkv" => self.sent.push(kv()),
                    _ => {}
                }
                if step == "send" {
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
            "kv" | "sendkv" => {
                self.sent.push(kv());
                if step == "sendkv" {
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
            "detach" => {
                self.detaches.push(x.detach());
                Action::Continue
            }
            "respond" => Action::Respond(LocalResponse::new(403)),
            "bad" => Action::Respond(LocalResponse::new(700)),
            _ => Action::Continue,
        }
    }
}

impl HttpFilter for Waiter {
    type Config = ();
    type Context = Steps;
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Waiter::default())
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_request_headers()
            .on_log()
            .tick_every_ms(1000)
    }
    fn on_request_headers(
        &mut self,
        steps: &mut Steps,
        x: &Exchange<'_>,
        h: &Headers<'_>,
        _: bool,
    ) -> Action {
        let all = h.get_str("x-steps").unwrap_or_default();
        steps.0 = all.split(',').map(str::to_owned).collect();
        self.step(steps, x)
    }
    fn on_callout_response(
        &mut self,
        steps: &mut Steps,
        x: &Exchange<'_>,
        id: CalloutId,
        _: Result<CalloutResponse, Error>,
    ) -> Action {
        self.replies.push(id);
        self.step(steps, x)
    }
    fn on_kv_response(
        &mut self,
        steps: &mut Steps,
        x: &Exchange<'_>,
        id: CallId,
        _: Result<Reply, Error>,
    ) -> Action {
        self.replies.push(id);
        self.step(steps, x)
    }
    fn on_log(&mut self, _: &mut Steps, _: &Exchange<'_>) {
        self.logs += 1;
    }
    fn on_done(&mut self, _: Steps) {
        self.dones += 1;
    }
    fn on_tick(&mut self) {
        self.sent.push(callout::send(&check()).unwrap());
    }
    fn on_tick_callout_response(&mut self, id: CalloutId, _: Result<CalloutResponse, Error>) {
        self.tick_replies.push(id);
    }
}

fn waiters() -> TestHost {
    TestHost::new().grant_cluster("authz").grant_kv("ns")
}

fn steps(steps: &str) -> Request {
    Request::get("/").header("x-steps", steps)
}

fn ok() -> Result<CalloutResponse, Error> {
    Ok(CalloutResponse::new(200, "ok"))
}

/// The host's reason (host/src/wasm/plugin.rs `verdict`).
const NO_CALL: &str = "returned `pause` with no outstanding callout";

#[test]
fn a_pause_with_nothing_outstanding_is_a_failure() {
    let host = waiters();
    let mut t = host.configure::<Waiter>("null").unwrap();
    assert_eq!(
        t.exchange(steps("pause")).run(Response::new(200)),
        Outcome::Failed(Phase::RequestHeaders, NO_CALL.to_owned())
    );
    // No `on_log`, but `on_done`, as after any failure.
    assert_eq!((t.filter().logs, t.filter().dones), (0, 1));

    // The phase method returns the action, and the failure is there.
    let mut x = t.exchange(steps("pause"));
    assert_eq!(x.request_headers(), Action::Pause);
    assert!(!x.may_pause());
    assert_eq!(x.failure(), Some(NO_CALL));

    // With a callout, or an asynchronous KV call, out: a pause.
    for with in ["call", "kv"] {
        let mut x = t.exchange(steps(with));
        assert_eq!(
            x.run(Response::new(200)),
            Outcome::Paused(Phase::RequestHeaders)
        );
        assert_eq!(x.failure(), None);
    }

    // Pausing again from a reply: only with another call still out.
    host.queue_callout_response("authz", ok());
    let mut x = t.exchange(steps("call,pause"));
    assert_eq!(x.request_headers(), Action::Pause);
    assert_eq!(x.deliver_callouts(), vec![Action::Pause]);
    assert_eq!(x.failure(), Some(NO_CALL));
    host.queue_callout_response("authz", ok());
    host.queue_callout_response("authz", ok());
    let mut x = t.exchange(steps("call2,pause,continue"));
    assert_eq!(x.request_headers(), Action::Pause);
    assert_eq!(x.deliver_callouts(), vec![Action::Pause, Action::Continue]);
    assert_eq!(x.failure(), None);

    // A reply while not paused: `pause` means nothing (the host takes it
    // as `continue`).
    host.queue_callout_response("authz", ok());
    let mut x = t.exchange(steps("send,pause"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    assert_eq!(x.failure(), None);
}

/// A local response from a reply while the exchange is not paused is
/// ignored by the host (host/src/filter.rs `deliver_unpaused`, abi/README.md
/// §5.8): the delivery gives `Continue` and the exchange goes on. One the
/// host refuses still fails the call.
#[test]
fn a_local_response_from_a_reply_while_not_paused_is_ignored() {
    let host = waiters();
    let mut t = host.configure::<Waiter>("null").unwrap();
    host.queue_callout_response("authz", ok());
    let mut x = t.exchange(steps("send,respond"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    assert_eq!(x.failure(), None);
    assert_eq!(x.response_headers(Response::new(200)), Action::Continue);
    x.log();
    x.done();
    drop(x);
    assert_eq!(t.filter().replies.len(), 1);
    // Not answered: `on_log` as for any exchange.
    assert_eq!((t.filter().logs, t.filter().dones), (1, 1));

    // A KV reply's, too (delivered at the response phase).
    let mut x = t.exchange(steps("sendkv,respond"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.deliver_kv(), vec![Action::Continue]);
    assert_eq!(x.response_headers(Response::new(200)), Action::Continue);
    assert_eq!(x.replies_waiting(), 0);
    assert_eq!(x.status(), Some(200));
    assert_eq!(x.failure(), None);

    // A local response the host refuses is a failure, paused or not (not
    // paused: when delivered, at the response phase).
    host.queue_callout_response("authz", ok());
    let mut x = t.exchange(steps("send,bad"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    assert_eq!(x.failure(), None);
    assert_eq!(x.response_headers(Response::new(200)), Action::Continue);
    assert!(x.failure().unwrap().contains("700"));
}

#[test]
fn calls_belong_to_the_instance_that_made_them() {
    let host = waiters();
    let mut a = host.configure::<Waiter>("null").unwrap();
    let mut b = host.configure::<Waiter>("null").unwrap();
    let mut xa = a.exchange(steps("callkv,pause,continue"));
    let mut xb = b.exchange(steps("callkv,pause,continue"));
    // Two instances: the same context id, two exchanges.
    assert_eq!(xa.context(), xb.context());
    assert_eq!(xa.request_headers(), Action::Pause);
    assert_eq!(xb.request_headers(), Action::Pause);
    // One id sequence for callouts and KV calls: A's 1 and 2, B's 3 and 4.
    let (call_a, kv_a) = (host.callouts()[0].id, 2);
    let (call_b, kv_b) = (host.callouts()[1].id, 4);

    // B's deliveries are B's own calls.
    host.queue_callout_response("authz", ok());
    assert_eq!(xb.deliver_callout(call_a, ok()), None);
    assert_eq!(xb.deliver_callouts(), vec![Action::Pause]);
    assert_eq!(xb.deliver_kv(), vec![Action::Continue]);
    assert!(host.callouts()[0].outstanding);
    assert!(!host.callouts()[1].outstanding);
    assert_eq!(xa.kv_calls_outstanding(), 1);
    assert!(xa.may_pause());

    // A's are still there for A.
    host.queue_callout_response("authz", ok());
    assert_eq!(xa.deliver_callouts(), vec![Action::Pause]);
    assert_eq!(xa.deliver_kv(), vec![Action::Continue]);
    drop((xa, xb));
    assert_eq!(a.filter().replies, vec![call_a, kv_a]);
    assert_eq!(b.filter().replies, vec![call_b, kv_b]);

    // Detach is refused only for the instance's own context with a call out.
    let mut xa = a.exchange(steps("call"));
    assert_eq!(xa.request_headers(), Action::Pause);
    let mut xb = b.exchange(steps("detach"));
    assert_eq!(xa.context(), xb.context());
    assert_eq!(xb.request_headers(), Action::Continue);
    drop((xa, xb));
    assert_eq!(b.filter().detaches, vec![Ok(())]);

    // And `on_tick`'s callouts are the instance's.
    a.tick();
    host.queue_callout_response("authz", ok());
    assert_eq!(b.deliver_tick_callouts(), 0);
    assert_eq!(a.deliver_tick_callouts(), 1);
    assert_eq!(a.filter().tick_replies.len(), 1);
    assert!(b.filter().tick_replies.is_empty());
}

#[test]
fn a_failed_exchange_gets_no_more_deliveries() {
    let host = waiters();
    let mut t = host.configure::<Waiter>("null").unwrap();
    // The first reply answers with a local response the host refuses.
    host.queue_callout_response("authz", ok());
    host.queue_callout_response("authz", ok());
    let mut x = t.exchange(steps("call2,bad"));
    assert_eq!(x.request_headers(), Action::Pause);
    let first = x.deliver_callouts();
    assert!(matches!(first[..], [Action::Respond(_)]), "{first:?}");
    assert!(x.failure().unwrap().contains("700"));
    // The second is not delivered (its response stays queued), not even by id.
    let second = host.callouts()[1].id;
    assert!(host.callouts()[1].outstanding);
    assert_eq!(x.deliver_callout(second, ok()), None);
    assert_eq!(x.deliver_callouts(), vec![]);
    x.log();
    x.done();
    assert!(host.callouts()[1].cancelled);
    drop(x);
    assert_eq!(t.filter().replies.len(), 1);
    assert_eq!((t.filter().logs, t.filter().dones), (0, 1));
    // The response left is the next exchange's.
    let mut y = t.exchange(steps("call"));
    assert_eq!(y.request_headers(), Action::Pause);
    assert_eq!(y.deliver_callouts(), vec![Action::Continue]);

    // A KV reply is not delivered either.
    host.queue_callout_response("authz", ok());
    let mut x = t.exchange(steps("callkv,bad"));
    assert_eq!(x.request_headers(), Action::Pause);
    assert_eq!(x.deliver_callouts().len(), 1);
    assert!(x.failure().is_some());
    assert_eq!(x.deliver_kv(), vec![]);
    assert_eq!(x.kv_calls_outstanding(), 1);
}

// ---------------------------------------------------------------- failure policy

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlakyConfig {
    /// What `on_request_headers` does: `bad` (a local response the host
    /// refuses), `pause` (with nothing outstanding), anything else continues.
    fail: String,
}

/// Fails in its request headers phase as configured; marks the response
/// and counts its response, `on_log` and `on_done` calls.
struct Flaky {
    fail: String,
    response_calls: u32,
    logs: u32,
    dones: u32,
}

impl HttpFilter for Flaky {
    type Config = FlakyConfig;
    type Context = Seen;
    fn configure(c: FlakyConfig) -> Result<Self, String> {
        Ok(Flaky {
            fail: c.fail,
            response_calls: 0,
            logs: 0,
            dones: 0,
        })
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
        _: &mut Seen,
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        match self.fail.as_str() {
            "bad" => Action::Respond(LocalResponse::new(700)),
            "pause" => Action::Pause,
            _ => Action::Continue,
        }
    }
    fn on_response_headers(
        &mut self,
        _: &mut Seen,
        _: &Exchange<'_>,
        h: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.response_calls += 1;
        h.set("x-filtered", "1").unwrap();
        Action::Continue
    }
    fn on_response_body(
        &mut self,
        _: &mut Seen,
        _: &Exchange<'_>,
        b: &Body<'_>,
        _: bool,
    ) -> Action {
        self.response_calls += 1;
        b.replace("filtered").unwrap();
        Action::Continue
    }
    fn on_log(&mut self, _: &mut Seen, _: &Exchange<'_>) {
        self.logs += 1;
    }
    fn on_done(&mut self, _: Seen) {
        self.dones += 1;
    }
}

/// Fail open, the host skips a failed filter and the exchange goes on
/// (host/src/filter.rs `failure`): the upstream's response comes back
/// untouched by it, without `on_log` for it, with `on_done`.
#[test]
fn a_filter_failing_open_is_skipped_and_the_exchange_goes_on() {
    for (fail, why) in [("bad", "700"), ("pause", NO_CALL)] {
        let config = format!(r#"{{"fail": "{fail}"}}"#);
        let upstream = || Response::new(200).header("x-up", "1").body("hi");

        // Fail closed (the default): the exchange ends with the failure.
        let mut t = FilterTest::<Flaky>::configure(&config).unwrap();
        let mut x = t.exchange(Request::get("/"));
        match x.run(upstream()) {
            Outcome::Failed(Phase::RequestHeaders, reason) => assert!(reason.contains(why)),
            other => panic!("{fail}: {other:?}"),
        }
        assert_eq!(x.status(), None);

        // Fail open: the exchange goes on to the upstream and back.
        let mut t = FilterTest::<Flaky>::configure(&config)
            .unwrap()
            .fail_open(true);
        let mut x = t.exchange(Request::get("/"));
        assert_eq!(x.run(upstream()), Outcome::Completed, "{fail}");
        assert!(x.failure().unwrap().contains(why), "{fail}");
        assert_eq!(x.status(), Some(200));
        assert_eq!(x.response_header("x-up").as_deref(), Some("1"));
        assert_eq!(x.response_header("x-filtered"), None);
        drop(x);
        let f = t.filter();
        assert_eq!((f.response_calls, f.logs, f.dones), (0, 0, 1), "{fail}");
    }

    // A filter that does not fail is unaffected by the policy.
    let mut t = FilterTest::<Flaky>::configure(r#"{"fail": "no"}"#)
        .unwrap()
        .fail_open(true);
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(x.run(Response::new(200).body("hi")), Outcome::Completed);
    assert_eq!(x.failure(), None);
    assert_eq!(x.response_header("x-filtered").as_deref(), Some("1"));
    drop(x);
    let f = t.filter();
    assert_eq!((f.response_calls, f.logs, f.dones), (2, 1, 1));

    // Failing in a reply while paused: the exchange goes on past it too.
    let host = waiters();
    let mut t = host.configure::<Waiter>("null").unwrap().fail_open(true);
    host.queue_callout_response("authz", ok());
    let mut x = t.exchange(steps("call,bad"));
    assert_eq!(x.request_headers(), Action::Pause);
    assert!(matches!(x.deliver_callouts()[..], [Action::Respond(_)]));
    assert!(x.failure().unwrap().contains("700"));
    assert_eq!(x.response_headers(Response::new(204)), Action::Continue);
    assert_eq!(x.status(), Some(204));
    x.log();
    x.done();
    drop(x);
    assert_eq!((t.filter().logs, t.filter().dones), (0, 1));
}

// ---------------------------------------------------------------- replies while not paused

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LaterConfig {
    /// What the reply to the first callout returns: `pause`, `respond`,
    /// `continue`.
    first: String,
    /// Declare `on_log` (a response path).
    log: bool,
    /// The first call is an asynchronous KV get, not a callout.
    #[serde(default)]
    kv: bool,
}

/// Sends callout `first` from the request headers (and continues), and
/// `second` from the end of the (streamed) request body, where it pauses.
/// Its reply to `second` continues.
struct Later {
    config: LaterConfig,
    first: Option<CalloutId>,
    replies: Vec<CalloutId>,
}

impl HttpFilter for Later {
    type Config = LaterConfig;
    type Context = ();
    fn configure(config: LaterConfig) -> Result<Self, String> {
        Ok(Later {
            config,
            first: None,
            replies: Vec::new(),
        })
    }
    fn setup(&self) -> Setup {
        let s = Setup::new()
            .on_request_headers()
            .on_request_body(BodyMode::Streamed);
        if self.config.log {
            s.on_log()
        } else {
            s
        }
    }
    fn on_request_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.first = Some(if self.config.kv {
            Namespace::open("ns").unwrap().start_get("k").unwrap()
        } else {
            callout::send(&check()).unwrap()
        });
        Action::Continue
    }
    fn on_request_body(&mut self, _: &mut (), _: &Exchange<'_>, _: &Body<'_>, eos: bool) -> Action {
        if !eos {
            return Action::Continue;
        }
        callout::send(&check()).unwrap();
        Action::Pause
    }
    fn on_callout_response(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        id: CalloutId,
        _: Result<CalloutResponse, Error>,
    ) -> Action {
        self.reply(id)
    }
    fn on_kv_response(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        id: CallId,
        _: Result<Reply, Error>,
    ) -> Action {
        self.reply(id)
    }
}

impl Later {
    fn reply(&mut self, id: u64) -> Action {
        self.replies.push(id);
        if Some(id) != self.first {
            return Action::Continue;
        }
        match self.config.first.as_str() {
            "pause" => Action::Pause,
            "respond" => Action::Respond(LocalResponse::new(403)),
            _ => Action::Continue,
        }
    }
}

/// A [`Later`] and its host.
fn later(first: &str, log: bool) -> (FilterTest<Later>, TestHost) {
    later_kv(first, log, false)
}

/// A [`Later`] whose first call is a KV get (`kv`) and its host.
fn later_kv(first: &str, log: bool, kv: bool) -> (FilterTest<Later>, TestHost) {
    let host = waiters();
    let t = host
        .configure(&format!(
            r#"{{"first": "{first}", "log": {log}, "kv": {kv}}}"#
        ))
        .unwrap();
    (t, host)
}

/// The host delivers the reply to a callout of an exchange that is not
/// paused when the exchange next waits on a pause or reaches its response
/// phase, and drops it if the exchange ends first (abi/README.md §5.8,
/// host/src/filter.rs `wait`, `deliver_ready`); so does the harness.
#[test]
fn a_reply_while_not_paused_waits_for_the_next_pause_or_the_response() {
    // At the next pause: delivered first, as a verdict of that pause.
    let (mut t, host) = later("pause", false);
    let mut x = t.exchange(Request::post("/", "body"));
    assert_eq!(x.request_headers(), Action::Continue);
    let first = host.callouts()[0].id;
    assert_eq!(x.deliver_callout(first, ok()), Some(Action::Continue));
    assert_eq!(x.replies_waiting(), 1);
    // Not twice.
    assert_eq!(x.deliver_callout(first, ok()), None);
    assert!(x.may_pause(), "its callout is still outstanding");
    assert_eq!(x.request_body_chunk("bo", false), Action::Continue);
    assert_eq!(x.replies_waiting(), 1);
    // The body's end pauses on the second callout; the first reply is
    // delivered then, and keeps the pause (`pause`, the second is out).
    assert_eq!(x.request_body_chunk("dy", true), Action::Pause);
    assert_eq!(x.replies_waiting(), 0);
    let second = host.callouts()[1].id;
    assert_eq!(x.deliver_callout(second, ok()), Some(Action::Continue));
    x.done();
    drop(x);
    assert_eq!(t.filter().replies, vec![first, second]);

    // The first reply ends the pause: the phase ends with its verdict.
    for (verdict, want) in [
        ("continue", Action::Continue),
        ("respond", Action::Respond(LocalResponse::new(403))),
    ] {
        let (mut t, host) = later(verdict, false);
        let mut x = t.exchange(Request::post("/", "body"));
        x.request_headers();
        let first = host.callouts()[0].id;
        x.deliver_callout(first, ok());
        assert_eq!(x.request_body_chunk("body", true), want, "{verdict}");
        // The second callout's reply now comes while not paused.
        let second = host.callouts()[1].id;
        assert_eq!(x.deliver_callout(second, ok()), Some(Action::Continue));
        assert_eq!(x.replies_waiting(), 1);
        drop(x);
        assert_eq!(t.filter().replies, vec![first], "{verdict}");
    }

    // At the response phase, with a response path (`on_log` here).
    let (mut t, host) = later("respond", true);
    host.queue_callout_response("authz", ok());
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    assert_eq!(x.replies_waiting(), 1);
    // Its `Respond` is ignored: not paused.
    assert_eq!(x.response_headers(Response::new(200)), Action::Continue);
    assert_eq!(x.replies_waiting(), 0);
    assert_eq!(x.status(), Some(200));
    x.done();
    drop(x);
    assert_eq!(t.filter().replies.len(), 1);

    // Without one, the host makes no response call for the filter: the
    // reply is dropped with the exchange.
    let (mut t, host) = later("continue", false);
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    let first = host.callouts()[0].id;
    x.deliver_callout(first, ok());
    x.response_headers(Response::new(200));
    assert_eq!(x.replies_waiting(), 1);
    x.log();
    x.done();
    assert_eq!(x.replies_waiting(), 0);
    drop(x);
    assert!(t.filter().replies.is_empty());
    assert!(host.callouts()[0].cancelled);
}

/// The host delivers an asynchronous KV call's reply as a callout's
/// (host/src/filter.rs: both are `Reply`s of the chain's in-flight set;
/// abi/README.md §5.7): to an exchange that is not paused, when it next
/// waits on a pause or reaches its response phase, dropped if it ends
/// first. So does the harness.
#[test]
fn a_kv_reply_while_not_paused_waits_as_a_callouts() {
    // At the next pause: delivered first, as a verdict of that pause.
    let (mut t, host) = later_kv("pause", false, true);
    host.kv_put("ns", "k", b"v");
    let mut x = t.exchange(Request::post("/", "body"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.kv_calls_outstanding(), 1);
    // The call runs when its reply comes; the reply waits.
    assert_eq!(x.deliver_kv(), vec![Action::Continue]);
    assert_eq!(x.replies_waiting(), 1);
    assert_eq!(x.kv_calls_outstanding(), 0);
    assert_eq!(x.deliver_next_kv(), None, "not twice");
    assert!(x.may_pause(), "its call is still outstanding");
    assert_eq!(x.request_body_chunk("bo", false), Action::Continue);
    // The body's end pauses on a callout; the KV reply is delivered then,
    // and keeps the pause (`pause`, the callout is out).
    assert_eq!(x.request_body_chunk("dy", true), Action::Pause);
    assert_eq!(x.replies_waiting(), 0);
    // (KV calls are not in `callouts()`.)
    let second = host.callouts()[0].id;
    assert_eq!(x.deliver_callout(second, ok()), Some(Action::Continue));
    x.done();
    drop(x);
    let first = t.filter().first.unwrap();
    assert_eq!(t.filter().replies, vec![first, second]);

    // The KV reply ends the pause: the phase ends with its verdict.
    let (mut t, _host) = later_kv("respond", false, true);
    let mut x = t.exchange(Request::post("/", "body"));
    x.request_headers();
    x.deliver_kv();
    assert_eq!(
        x.request_body_chunk("body", true),
        Action::Respond(LocalResponse::new(403))
    );
    drop(x);

    // At the response phase, with a response path (`on_log`); its
    // `Respond` is ignored there.
    let (mut t, _host) = later_kv("respond", true, true);
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    assert_eq!(x.deliver_kv(), vec![Action::Continue]);
    assert_eq!(x.replies_waiting(), 1);
    assert_eq!(x.response_headers(Response::new(200)), Action::Continue);
    assert_eq!(x.replies_waiting(), 0);
    assert_eq!(x.status(), Some(200));
    x.done();
    drop(x);
    assert_eq!(t.filter().replies.len(), 1);

    // Without one, dropped with the exchange.
    let (mut t, _host) = later_kv("continue", false, true);
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    x.deliver_kv();
    x.response_headers(Response::new(200));
    assert_eq!(x.replies_waiting(), 1);
    x.log();
    x.done();
    drop(x);
    assert!(t.filter().replies.is_empty());
}

// ---------------------------------------------------------------- after a local response

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnsweredConfig {
    /// Where the filter answers (403): `request_headers`, `reply` (from the
    /// reply to a callout `request_headers` paused on), `response_headers`.
    at: String,
}

/// Answers locally where configured; counts the calls of every other phase.
struct Answered {
    config: AnsweredConfig,
    /// The phases called, in order.
    calls: Vec<&'static str>,
    logs: u32,
}

impl Answered {
    fn at(&mut self, phase: &'static str) -> Action {
        self.calls.push(phase);
        if self.config.at == phase {
            Action::Respond(LocalResponse::new(403))
        } else {
            Action::Continue
        }
    }
}

impl HttpFilter for Answered {
    type Config = AnsweredConfig;
    type Context = ();
    fn configure(config: AnsweredConfig) -> Result<Self, String> {
        Ok(Answered {
            config,
            calls: Vec::new(),
            logs: 0,
        })
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_request_headers()
            .on_request_body(BodyMode::Streamed)
            .on_request_trailers()
            .on_response_headers()
            .on_response_body(BodyMode::Streamed)
            .on_response_trailers()
            .on_log()
    }
    fn on_request_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        if self.config.at == "reply" {
            self.calls.push("request_headers");
            callout::send(&check()).unwrap();
            return Action::Pause;
        }
        self.at("request_headers")
    }
    fn on_request_body(&mut self, _: &mut (), _: &Exchange<'_>, _: &Body<'_>, _: bool) -> Action {
        self.at("request_body")
    }
    fn on_request_trailers(&mut self, _: &mut (), _: &Exchange<'_>, _: &Headers<'_>) -> Action {
        self.at("request_trailers")
    }
    fn on_response_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.at("response_headers")
    }
    fn on_response_body(&mut self, _: &mut (), _: &Exchange<'_>, _: &Body<'_>, _: bool) -> Action {
        self.at("response_body")
    }
    fn on_response_trailers(&mut self, _: &mut (), _: &Exchange<'_>, _: &Headers<'_>) -> Action {
        self.at("response_trailers")
    }
    fn on_callout_response(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: CalloutId,
        _: Result<CalloutResponse, Error>,
    ) -> Action {
        self.at("reply")
    }
    fn on_log(&mut self, _: &mut (), _: &Exchange<'_>) {
        self.logs += 1;
    }
}

/// The host calls no phase of a filter after its local response: one from a
/// request phase enters the response path right after the filter, which
/// never sees it (and the rest of the request is not read); one from the
/// response headers replaces the response for the filters after it
/// (abi/README.md §3.5; host/src/filter.rs `responded`,
/// `replaced_response`, `in_response`). It still gets `on_log` and
/// `on_done`. So does the harness.
#[test]
fn a_filter_that_answered_gets_no_more_phases_but_on_log() {
    let request = || Request::post("/", "body").trailer("x-t", "1");
    let response = || Response::new(200).body("resp").trailer("x-r", "1");
    for (at, answered) in [
        ("request_headers", vec!["request_headers"]),
        ("reply", vec!["request_headers", "reply"]),
    ] {
        let host = waiters();
        let mut t = host
            .configure::<Answered>(&format!(r#"{{"at": "{at}"}}"#))
            .unwrap();
        let mut x = t.exchange(request());
        let first = x.request_headers();
        let action = if at == "reply" {
            assert_eq!(first, Action::Pause);
            x.deliver_callout(host.callouts()[0].id, ok()).unwrap()
        } else {
            first
        };
        assert_eq!(action, Action::Respond(LocalResponse::new(403)), "{at}");
        // The rest of the exchange, phase by phase: nothing reaches the filter.
        assert_eq!(x.request_body(), Action::Continue, "{at}");
        assert_eq!(x.request_trailers(), Action::Continue, "{at}");
        assert_eq!(x.response_headers(response()), Action::Continue, "{at}");
        assert_eq!(x.response_body(), Action::Continue, "{at}");
        assert_eq!(x.response_trailers(), Action::Continue, "{at}");
        x.log();
        x.done();
        assert_eq!(x.failure(), None);
        drop(x);
        assert_eq!(t.filter().calls, answered, "{at}");
        assert_eq!(t.filter().logs, 1, "{at}: on_log still");
    }

    // From the response headers: no body or trailers call of the response.
    let host = waiters();
    let mut t = host
        .configure::<Answered>(r#"{"at": "response_headers"}"#)
        .unwrap();
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(
        x.response_headers(response()),
        Action::Respond(LocalResponse::new(403))
    );
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.response_trailers(), Action::Continue);
    x.log();
    drop(x);
    assert_eq!(
        t.filter().calls,
        vec!["request_headers", "response_headers"]
    );
    assert_eq!(t.filter().logs, 1);
}

// ---------------------------------------------------------------- the end of a streamed body

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnderConfig {
    /// The end-of-stream body call sends a callout and pauses.
    pause_at_end: bool,
}

/// A streamed request body filter with a trailers phase: records its body
/// calls (data, end of stream, the trailer `x-t` as the call sees it) and
/// its trailers calls.
struct Ender {
    config: EnderConfig,
    bodies: Vec<(String, bool, Option<String>)>,
    trailers: u32,
}

impl HttpFilter for Ender {
    type Config = EnderConfig;
    type Context = ();
    fn configure(config: EnderConfig) -> Result<Self, String> {
        Ok(Ender {
            config,
            bodies: Vec::new(),
            trailers: 0,
        })
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_request_body(BodyMode::Streamed)
            .on_request_trailers()
    }
    fn on_request_body(&mut self, _: &mut (), x: &Exchange<'_>, b: &Body<'_>, eos: bool) -> Action {
        let t = x
            .trailers(Direction::Request)
            .and_then(|t| t.get_str("x-t"));
        self.bodies
            .push((String::from_utf8(b.to_vec()).unwrap(), eos, t));
        if eos && self.config.pause_at_end {
            callout::send(&check()).unwrap();
            return Action::Pause;
        }
        Action::Continue
    }
    fn on_request_trailers(&mut self, _: &mut (), _: &Exchange<'_>, _: &Headers<'_>) -> Action {
        self.trailers += 1;
        Action::Continue
    }
}

/// A streamed body whose last chunk did not end it ends when the trailers
/// (or the end of the stream) arrive: the host then makes the last body call
/// with an empty buffer and end of stream, the trailers readable there, then
/// calls the trailers phase (abi/README.md §3.2; host/src/body.rs `end`).
/// So does the harness for a trailers call right after such a chunk.
#[test]
fn trailers_after_a_chunk_that_did_not_end_the_body_end_it_first() {
    let ender = |pause: bool| {
        waiters()
            .configure::<Ender>(&format!(r#"{{"pause_at_end": {pause}}}"#))
            .unwrap()
    };
    let mut t = ender(false);
    let mut x = t.exchange(Request::post("/", "body").trailer("x-t", "1"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_body_chunk("body", false), Action::Continue);
    assert_eq!(x.request_trailers(), Action::Continue);
    drop(x);
    assert_eq!(
        t.filter().bodies,
        vec![
            ("body".to_owned(), false, None),
            (String::new(), true, Some("1".to_owned())),
        ]
    );
    assert_eq!(t.filter().trailers, 1);

    // The end of the stream without trailers: the last body call only.
    let mut t = ender(false);
    let mut x = t.exchange(Request::post("/", "body"));
    x.request_headers();
    x.request_body_chunk("body", false);
    assert_eq!(x.request_trailers(), Action::Continue);
    drop(x);
    assert_eq!(t.filter().bodies.len(), 2);
    assert_eq!(t.filter().bodies[1], (String::new(), true, None));
    assert_eq!(t.filter().trailers, 0);

    // The last body call pauses: its action; the trailers phase comes when
    // asked for again, after the pause.
    let mut t = ender(true);
    let host = t.host().clone();
    let mut x = t.exchange(Request::post("/", "body").trailer("x-t", "1"));
    x.request_headers();
    x.request_body_chunk("body", false);
    assert_eq!(x.request_trailers(), Action::Pause);
    assert_eq!(
        x.deliver_callout(host.callouts()[0].id, ok()),
        Some(Action::Continue)
    );
    assert_eq!(x.request_trailers(), Action::Continue);
    drop(x);
    assert_eq!(t.filter().bodies.len(), 2);
    assert_eq!(t.filter().trailers, 1);

    // After a chunk that ended the body: the trailers phase only.
    let mut t = ender(false);
    let mut x = t.exchange(Request::post("/", "body").trailer("x-t", "1"));
    x.request_headers();
    x.request_body_chunk("body", true);
    assert_eq!(x.request_trailers(), Action::Continue);
    drop(x);
    assert_eq!(t.filter().bodies.len(), 1);
    assert_eq!(t.filter().trailers, 1);

    // Whole phases may still be left out: trailers without a body call.
    let mut t = ender(false);
    let mut x = t.exchange(Request::post("/", "body").trailer("x-t", "1"));
    x.request_headers();
    assert_eq!(x.request_trailers(), Action::Continue);
    drop(x);
    assert!(t.filter().bodies.is_empty());
    assert_eq!(t.filter().trailers, 1);
}

// ---------------------------------------------------------------- what on_log sees of a local response

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoggedConfig {
    /// The phase that answers: `request_headers`, `response_headers`,
    /// `response_body` (streamed: the head went out before).
    at: String,
}

/// Answers `403` with `x-local: 1` and details `nope` where configured;
/// records what `on_log` sees: status, cause, the response's `x-local`.
struct Logged {
    config: LoggedConfig,
    logged: Option<(Option<u16>, Option<String>, Option<String>)>,
    /// The response head `on_log` sees.
    head: Option<Vec<(String, Vec<u8>)>>,
}

impl Logged {
    fn at(&self, phase: &str) -> Action {
        if self.config.at == phase {
            Action::Respond(
                LocalResponse::new(403)
                    .header("x-local", "1")
                    .body("no way\n")
                    .details("nope"),
            )
        } else {
            Action::Continue
        }
    }
}

impl HttpFilter for Logged {
    type Config = LoggedConfig;
    type Context = ();
    fn configure(config: LoggedConfig) -> Result<Self, String> {
        Ok(Logged {
            config,
            logged: None,
            head: None,
        })
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
        _: &mut (),
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.at("request_headers")
    }
    fn on_response_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.at("response_headers")
    }
    fn on_response_body(&mut self, _: &mut (), _: &Exchange<'_>, _: &Body<'_>, _: bool) -> Action {
        self.at("response_body")
    }
    fn on_log(&mut self, _: &mut (), x: &Exchange<'_>) {
        let local = x
            .headers(Direction::Response)
            .and_then(|h| h.get_str("x-local"));
        self.logged = Some((x.status(), x.cause(), local));
        self.head = x.headers(Direction::Response).map(|h| h.entries());
    }
}

/// The host records a filter's local response on the exchange: its cause,
/// `plugin:<details>`, and the status that went out (the local response's,
/// or the upstream's when the response head had already gone downstream: the
/// exchange is reset), so `on_log` sees them (abi/README.md §3.5;
/// host/src/filter.rs `plugin_cause`, proxy.rs `response_filters`). One
/// from the response headers phase replaces the response head too. So does
/// the harness.
#[test]
fn on_log_sees_the_status_and_cause_of_a_local_response() {
    let cause = Some("plugin:nope".to_owned());
    let one = Some("1".to_owned());
    for (at, want) in [
        ("request_headers", (Some(403), cause.clone(), None)),
        ("response_headers", (Some(403), cause.clone(), one)),
        ("response_body", (Some(200), cause.clone(), None)),
    ] {
        let mut t = FilterTest::<Logged>::configure(&format!(r#"{{"at": "{at}"}}"#)).unwrap();
        let outcome = t
            .exchange(Request::get("/"))
            .run(Response::new(200).body("up"));
        assert!(
            matches!(outcome, Outcome::Responded(..)),
            "{at}: {outcome:?}"
        );
        assert_eq!(t.filter().logged, Some(want), "{at}");
        if at == "response_headers" {
            // The head that replaced the upstream's is the one the host
            // sends: `text/plain` for a body the filter gave no type
            // (local_reply.rs `LocalResponse::for_client`); its
            // `content-length` is set after `on_log`'s view was taken.
            let head = t.filter().head.clone().unwrap_or_default();
            let field = |name: &str| {
                head.iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            };
            assert_eq!(field("content-type").as_deref(), Some("text/plain"));
            assert_eq!(field("content-length"), None);
        }
    }

    // Phase by phase: the upstream's response after a request phase's
    // answer never comes (the host aborted the upstream request).
    let mut t = FilterTest::<Logged>::configure(r#"{"at": "request_headers"}"#).unwrap();
    let mut x = t.exchange(Request::get("/"));
    assert!(matches!(x.request_headers(), Action::Respond(_)));
    assert_eq!(x.response_headers(Response::new(200)), Action::Continue);
    assert_eq!(x.status(), Some(403));
    x.log();
    drop(x);
    assert_eq!(t.filter().logged, Some((Some(403), cause, None)));
}

// ---------------------------------------------------------------- body data that went on

/// A buffered request body filter that also looks for the request body from
/// its trailers and response headers phases, and from a callout reply while
/// not paused: records what `Exchange::body(Request)` reaches each time.
#[derive(Default)]
struct BodyLater {
    seen: Vec<(&'static str, Option<Vec<u8>>)>,
}

impl BodyLater {
    fn look(&mut self, at: &'static str, x: &Exchange<'_>) {
        let body = x.body(Direction::Request).map(|b| b.to_vec());
        self.seen.push((at, body));
    }
}

impl HttpFilter for BodyLater {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        Ok(BodyLater::default())
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_request_body(BodyMode::Streamed)
            .on_request_trailers()
            .on_response_headers()
    }
    fn on_request_body(&mut self, _: &mut (), x: &Exchange<'_>, _: &Body<'_>, eos: bool) -> Action {
        self.look("request_body", x);
        if !eos {
            callout::send(&check()).unwrap();
        }
        Action::Continue
    }
    fn on_request_trailers(&mut self, _: &mut (), x: &Exchange<'_>, _: &Headers<'_>) -> Action {
        self.look("request_trailers", x);
        Action::Continue
    }
    fn on_response_headers(
        &mut self,
        _: &mut (),
        x: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.look("response_headers", x);
        Action::Continue
    }
    fn on_callout_response(
        &mut self,
        _: &mut (),
        x: &Exchange<'_>,
        _: CalloutId,
        _: Result<CalloutResponse, Error>,
    ) -> Action {
        self.look("reply", x);
        Action::Continue
    }
}

/// Body data that went on (its body call returned without a pause holding
/// it) is no longer on the exchange: the host takes it off
/// (host/src/filter.rs `chunk_part`, `end_body`), so `Exchange::body` gives
/// `None` in later calls until the next body call of that direction
/// (abi/README.md §3.1). So does the harness; its inspection still gives
/// the last body.
#[test]
fn body_data_that_went_on_is_gone_from_the_exchange() {
    let mut t = waiters().configure::<BodyLater>("null").unwrap();
    let host = t.host().clone();
    queue_ok(&host);
    let mut x = t.exchange(Request::post("/", "ab").trailer("x-t", "1"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_body_chunk("a", false), Action::Continue);
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    assert_eq!(x.request_body_chunk("b", true), Action::Continue);
    assert_eq!(x.request_trailers(), Action::Continue);
    assert_eq!(x.request_body_bytes(), b"b");
    assert_eq!(x.response_headers(Response::new(200)), Action::Continue);
    drop(x);
    let some = |b: &str| Some(b.as_bytes().to_vec());
    assert_eq!(
        t.filter().seen,
        vec![
            ("request_body", some("a")),
            ("request_body", some("b")),
            ("request_trailers", None),
            // The reply came while not paused: delivered at the response.
            ("reply", None),
            ("response_headers", None),
        ]
    );
}

fn queue_ok(host: &TestHost) {
    host.queue_callout_response("authz", ok());
}

// ---------------------------------------------------------------- the body cap on writes

/// Grows the buffered request body: records what each write returns.
#[derive(Default)]
struct Grower {
    results: Vec<Result<(), Error>>,
}

impl HttpFilter for Grower {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Grower::default())
    }
    fn setup(&self) -> Setup {
        Setup::new().on_request_body(BodyMode::Buffered)
    }
    fn on_request_body(&mut self, _: &mut (), _: &Exchange<'_>, b: &Body<'_>, _: bool) -> Action {
        self.results.push(b.append(vec![b'y'; 100]));
        self.results.push(b.replace(vec![b'z'; 1025]));
        self.results.push(b.splice(0, 10, vec![b'w'; 34]));
        self.results.push(b.append(b"!"));
        Action::Continue
    }
}

/// A buffer write that would make the body longer than the plugin's
/// `limits.body` fails with `limit-exceeded` and writes nothing
/// (host/src/wasm/host.rs `splice_buffer`; abi/README.md §4, §5.2). So it
/// does in the harness (`FilterTest::body_limit`, 1 MiB by default).
#[test]
fn a_body_write_over_the_cap_is_limit_exceeded() {
    let mut t = FilterTest::<Grower>::configure("null")
        .unwrap()
        .body_limit(1024);
    let mut x = t.exchange(Request::post("/", vec![b'x'; 1000]));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_body(), Action::Continue);
    let body = x.request_body_bytes();
    drop(x);
    let over = Err(Error::LimitExceeded);
    assert_eq!(t.filter().results, vec![over, over, Ok(()), over]);
    // 1000 - 10 + 34 = 1024: at the cap, not over it.
    assert_eq!(body.len(), 1024);
    assert_eq!(&body[..34], &[b'w'; 34][..]);

    // The default cap is 1 MiB.
    for (len, first) in [((1 << 20) - 100, Ok(())), ((1 << 20) - 99, over)] {
        let mut t = FilterTest::<Grower>::configure("null").unwrap();
        let mut x = t.exchange(Request::post("/", vec![b'x'; len]));
        x.request_headers();
        x.request_body();
        drop(x);
        assert_eq!(t.filter().results[0], first, "{len}");
    }
}

/// To a gRPC request (its `content-type` as it arrived) the host answers in
/// gRPC's trailers-only form (abi/README.md §3.5; host/src/local_reply.rs
/// `grpc_form`): status `200`, the status mapped to a `grpc-status`, the
/// body as `grpc-message`. So `on_log` sees `200`, and an answer from the
/// response headers phase leaves that head. So does the harness.
#[test]
fn a_local_response_to_a_grpc_request_is_in_grpc_form() {
    let grpc = || Request::post("/pkg.Svc/M", "").header("content-type", "application/grpc+proto");
    let cause = Some("plugin:nope".to_owned());
    for (at, local) in [
        ("request_headers", None),
        ("response_headers", Some("1".to_owned())),
    ] {
        let mut t = FilterTest::<Logged>::configure(&format!(r#"{{"at": "{at}"}}"#)).unwrap();
        let outcome = t.exchange(grpc()).run(Response::new(200));
        assert!(
            matches!(outcome, Outcome::Responded(..)),
            "{at}: {outcome:?}"
        );
        assert_eq!(
            t.filter().logged,
            Some((Some(200), cause.clone(), local)),
            "{at}"
        );
    }
    let mut t = FilterTest::<Logged>::configure(r#"{"at": "response_headers"}"#).unwrap();
    t.exchange(grpc())
        .run(Response::new(200).header("content-type", "application/grpc"));
    let head = t.filter().head.clone().unwrap();
    let get = |n: &str| {
        head.iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
    };
    assert_eq!(get("grpc-status").as_deref(), Some("7"));
    assert_eq!(get("grpc-message").as_deref(), Some("no way"));
    assert_eq!(get("content-type").as_deref(), Some("application/grpc"));

    // Not gRPC: `application/grpc-web` (the gRPC-Web plugin answers those).
    let mut t = FilterTest::<Logged>::configure(r#"{"at": "request_headers"}"#).unwrap();
    t.exchange(Request::post("/", "").header("content-type", "application/grpc-web"))
        .run(Response::new(200));
    assert_eq!(t.filter().logged.as_ref().unwrap().0, Some(403));
}

// ---------------------------------------------------------------- log lines

/// Logs the message its config gives from `configure`.
struct Says;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SaysConfig {
    say: String,
}

impl HttpFilter for Says {
    type Config = SaysConfig;
    type Context = ();
    fn configure(c: SaysConfig) -> Result<Self, String> {
        legate_sdk::log::log(legate_sdk::log::Level::Info, &c.say);
        Ok(Says)
    }
    fn setup(&self) -> Setup {
        Setup::new()
    }
}

/// The host writes a guest's message as one line of at most 4 KiB
/// (host/src/wasm/host.rs `log`, stdio.rs `one_line`): control characters
/// but tabs escaped, cut after escaping with `…[truncated]`. The harness's
/// `logs()` and `logged()` see what the host writes.
#[test]
fn log_messages_are_one_line_and_cut_as_the_host_writes_them() {
    use legate_sdk::log::Level;
    let says = |msg: &str| {
        let host = TestHost::new();
        let config = serde_json::json!({ "say": msg }).to_string();
        host.configure::<Says>(&config).map(drop).unwrap();
        host
    };
    let host = says("x\r[host] fake\n\u{1b}[2J\tok é");
    assert_eq!(
        host.logs(),
        vec![(Level::Info, "x\\r[host] fake\\n\\u{1b}[2J\tok é".to_owned())]
    );
    assert!(host.logged(Level::Info, "fake\\n"));
    assert!(!host.logged(Level::Info, "fake\n"));

    // 4096 bytes are kept; one more is cut (after escaping: 2 bytes each).
    let host = says(&"a".repeat(4096));
    assert_eq!(host.logs()[0].1.len(), 4096);
    let host = says(&"a".repeat(4097));
    assert_eq!(
        host.logs()[0].1,
        format!("{}…[truncated]", "a".repeat(4096))
    );
    let host = says(&"\n".repeat(2049));
    assert_eq!(
        host.logs()[0].1,
        format!("{}…[truncated]", "\\n".repeat(2048))
    );
    // At a character boundary: `é` is 2 bytes.
    let host = says(&format!("a{}", "é".repeat(2048)));
    assert_eq!(
        host.logs()[0].1,
        format!("a{}…[truncated]", "é".repeat(2047))
    );
}

// ---------------------------------------------------------------- the body cap on buffering

/// Buffers both bodies; records its calls and what `on_log` sees.
#[derive(Default)]
struct Buffers {
    calls: Vec<&'static str>,
    logged: Option<(Option<u16>, Option<String>)>,
}

impl HttpFilter for Buffers {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Buffers::default())
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_request_body(BodyMode::Buffered)
            .on_response_headers()
            .on_response_body(BodyMode::Buffered)
            .on_log()
    }
    fn on_request_body(&mut self, _: &mut (), _: &Exchange<'_>, _: &Body<'_>, _: bool) -> Action {
        self.calls.push("request_body");
        Action::Continue
    }
    fn on_response_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.calls.push("response_headers");
        Action::Continue
    }
    fn on_response_body(&mut self, _: &mut (), _: &Exchange<'_>, _: &Body<'_>, _: bool) -> Action {
        self.calls.push("response_body");
        Action::Continue
    }
    fn on_log(&mut self, _: &mut (), x: &Exchange<'_>) {
        self.calls.push("log");
        self.logged = Some((x.status(), x.cause()));
    }
}

/// A body to buffer over the plugin's `limits.body` is not given to the
/// filter: the host answers `413` (a request body) or `502` (a response
/// body), cause `plugin_buffer_limit` (abi/README.md §4; host/src/proxy.rs
/// `run_body`), and the filter gets `on_log` (and `on_done`) only. So does
/// the harness.
#[test]
fn a_buffered_body_over_the_cap_is_answered_by_the_host() {
    let cause = Some("plugin_buffer_limit".to_owned());
    // Request body: 413, no upstream, no response phases.
    let mut t = FilterTest::<Buffers>::configure("null")
        .unwrap()
        .body_limit(1024);
    let mut x = t.exchange(Request::post("/", vec![b'x'; 1025]));
    assert_eq!(
        x.run(Response::new(200).body("ok")),
        Outcome::OverBodyLimit(Phase::RequestBody, 413)
    );
    assert_eq!(x.over_body_limit(), Some(Direction::Request));
    drop(x);
    assert_eq!(t.filter().calls, vec!["log"]);
    assert_eq!(t.filter().logged, Some((Some(413), cause.clone())));

    // Response body: 502 after the response headers phase.
    let mut t = FilterTest::<Buffers>::configure("null")
        .unwrap()
        .body_limit(1024);
    let mut x = t.exchange(Request::post("/", vec![b'x'; 1024]));
    assert_eq!(
        x.run(Response::new(200).body(vec![b'y'; 1025])),
        Outcome::OverBodyLimit(Phase::ResponseBody, 502)
    );
    drop(x);
    assert_eq!(
        t.filter().calls,
        vec!["request_body", "response_headers", "log"]
    );
    assert_eq!(t.filter().logged, Some((Some(502), cause)));

    // Phase by phase: the body method returns `Continue` without the call,
    // and later phase methods call nothing.
    let mut t = FilterTest::<Buffers>::configure("null").unwrap();
    let mut x = t.exchange(Request::post("/", vec![b'x'; (1 << 20) + 1]));
    x.request_headers();
    assert_eq!(x.request_body(), Action::Continue);
    assert_eq!(x.over_body_limit(), Some(Direction::Request));
    assert_eq!(x.response_headers(Response::new(200)), Action::Continue);
    x.log();
    x.done();
    drop(x);
    assert_eq!(t.filter().calls, vec!["log"]);
}

// ---------------------------------------------------------------- the callout response cap

/// Sends a callout to `authz` from the request headers and pauses; records
/// the result of each reply (the status, or the error).
#[derive(Default)]
struct Fetch {
    results: Vec<Result<u16, Error>>,
    /// The head of each response delivered.
    heads: Vec<Vec<(String, Vec<u8>)>>,
}

impl Fetch {
    fn record(&mut self, r: Result<CalloutResponse, Error>) {
        if let Ok(r) = &r {
            self.heads.push(r.headers.clone());
        }
        self.results.push(r.map(|r| r.status));
    }
}

impl HttpFilter for Fetch {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        Ok(Fetch::default())
    }
    fn setup(&self) -> Setup {
        Setup::new().on_request_headers().tick_every_ms(1000)
    }
    fn on_request_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        callout::send(&check()).unwrap();
        Action::Pause
    }
    fn on_callout_response(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        _: CalloutId,
        r: Result<CalloutResponse, Error>,
    ) -> Action {
        self.record(r);
        Action::Continue
    }
    fn on_tick(&mut self) {
        callout::send(&check()).unwrap();
    }
    fn on_tick_callout_response(&mut self, _: CalloutId, r: Result<CalloutResponse, Error>) {
        self.record(r);
    }
}

/// The host reads a callout response's body under a 1 MiB cap
/// (host/src/wasm/host.rs `CALLOUT_MAX_RESPONSE`, proxy.rs `callout`;
/// abi/README.md §7) and delivers a larger one as `Err(LimitExceeded)`.
/// So does the harness, however the response comes (queued, given to
/// `deliver_callout`, to a tick's callout).
#[test]
fn a_callout_response_over_1_mib_is_limit_exceeded() {
    let big = |len: usize| Ok(CalloutResponse::new(200, vec![b'x'; len]));
    let host = TestHost::new().grant_cluster("authz");
    let mut t = host.configure::<Fetch>("null").unwrap();
    for (len, queued) in [
        (1 << 20, true),
        ((1 << 20) + 1, true),
        ((1 << 20) + 1, false),
    ] {
        let mut x = t.exchange(Request::get("/"));
        assert_eq!(x.request_headers(), Action::Pause);
        if queued {
            host.queue_callout_response("authz", big(len));
            assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
        } else {
            let id = host.callouts().last().unwrap().id;
            assert_eq!(x.deliver_callout(id, big(len)), Some(Action::Continue));
        }
    }
    t.tick();
    host.queue_callout_response("authz", big((1 << 20) + 1));
    assert_eq!(t.deliver_tick_callouts(), 1);
    let over = Err(Error::LimitExceeded);
    assert_eq!(t.filter().results, vec![Ok(200), over, over, over]);
}

/// The host drops a callout response's hop-by-hop fields before the filter
/// gets it (host/src/proxy.rs `callout`, `proxy_headers::strip_hop_by_hop`;
/// the two lists are compared in tests/tests/sdk_parity.rs): the fixed
/// list, the fields `connection` names (but `content-length`), and `te`
/// unless it offers `trailers` (then exactly `te: trailers`). So does the
/// harness, however the response comes.
#[test]
fn a_callout_responses_hop_by_hop_fields_are_dropped() {
    let resp = |te: &str| {
        Ok(CalloutResponse::new(200, "ok")
            .header("Connection", "x-hop, Content-Length")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("transfer-encoding", "chunked")
            .header("upgrade", "h2c")
            .header("proxy-authorization", "Basic eDp5")
            .header("x-hop", "1")
            .header("te", te)
            .header("content-length", "2")
            .header("x-user", "alice"))
    };
    let host = TestHost::new().grant_cluster("authz");
    let mut t = host.configure::<Fetch>("null").unwrap();
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(x.request_headers(), Action::Pause);
    host.queue_callout_response("authz", resp("gzip, trailers;q=1"));
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    drop(x);
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(x.request_headers(), Action::Pause);
    let id = host.callouts().last().unwrap().id;
    assert_eq!(x.deliver_callout(id, resp("gzip")), Some(Action::Continue));
    drop(x);
    t.tick();
    host.queue_callout_response("authz", resp("trailers"));
    assert_eq!(t.deliver_tick_callouts(), 1);

    let kept = |te: bool| {
        let mut h = vec![
            ("content-length".to_owned(), b"2".to_vec()),
            ("x-user".to_owned(), b"alice".to_vec()),
        ];
        if te {
            h.insert(0, ("te".to_owned(), b"trailers".to_vec()));
        }
        h
    };
    assert_eq!(t.filter().heads, vec![kept(true), kept(false), kept(true)]);
}

// ---------------------------------------------------------------- ticks only when declared

/// The host ticks an instance only if its setup declares a tick interval
/// (host/src/wasm/plugin.rs: no interval, no tick task). A test that ticks a
/// filter that declared none would test a call that never happens: the
/// harness panics, naming the mistake, as for phase-order misuse.
#[test]
#[should_panic(expected = "FilterTest::tick called, but the filter declared no tick interval")]
fn ticking_a_filter_without_a_tick_interval_panics() {
    let mut t = FilterTest::<Ticker>::configure("0").unwrap();
    t.tick();
}

#[test]
#[should_panic(
    expected = "NetworkFilterTest::tick called, but the filter declared no tick interval"
)]
fn ticking_a_network_filter_without_a_tick_interval_panics() {
    let mut t = TestHost::new().configure_network::<NetTicker>("0").unwrap();
    t.tick();
}

#[test]
fn a_filter_with_a_tick_interval_is_ticked() {
    let mut t = FilterTest::<Ticker>::configure("1000").unwrap();
    t.tick();
    let mut n = TestHost::new()
        .configure_network::<NetTicker>("10")
        .unwrap();
    n.tick();
}

// ---------------------------------------------------------------- on_log before on_done

/// The host calls `on_log` before `on_done` for every filter of the
/// exchange that neither failed nor detached, however the exchange ended
/// (host/src/filter.rs `run_finish`). So `done` without `log` calls
/// `on_log` first, once.
#[test]
fn done_without_log_calls_on_log_first() {
    let mut t = FilterTest::<Buffers>::configure("null").unwrap();
    let mut x = t.exchange(Request::post("/", "a"));
    x.request_body();
    x.done();
    x.done();
    drop(x);
    assert_eq!(t.filter().calls, vec!["request_body", "log"]);

    // After `log`, not again.
    let mut t = FilterTest::<Buffers>::configure("null").unwrap();
    let mut x = t.exchange(Request::post("/", "a"));
    x.request_body();
    x.log();
    x.done();
    drop(x);
    assert_eq!(t.filter().calls, vec!["request_body", "log"]);
}

// ---------------------------------------------------------------- trailers stay on the exchange

/// Streams the request body; records the request trailer `x-t` each call
/// sees on the exchange (`-` for none).
#[derive(Default)]
struct SeesTrailers {
    seen: Vec<String>,
}

impl SeesTrailers {
    fn see(&mut self, what: &str, x: &Exchange<'_>) {
        let t = x
            .trailers(Direction::Request)
            .and_then(|t| t.get("x-t"))
            .map_or("-".to_owned(), |v| String::from_utf8(v).unwrap());
        self.seen.push(format!("{what} {t}"));
    }
}

impl HttpFilter for SeesTrailers {
    type Config = ();
    type Context = ();
    fn configure(_: ()) -> Result<Self, String> {
        Ok(SeesTrailers::default())
    }
    fn setup(&self) -> Setup {
        Setup::new()
            .on_request_body(BodyMode::Streamed)
            .on_request_trailers()
            .on_response_headers()
            .on_log()
    }
    fn on_request_body(&mut self, _: &mut (), x: &Exchange<'_>, _: &Body<'_>, _: bool) -> Action {
        self.see("request_body", x);
        Action::Continue
    }
    fn on_request_trailers(&mut self, _: &mut (), x: &Exchange<'_>, _: &Headers<'_>) -> Action {
        self.see("request_trailers", x);
        Action::Continue
    }
    fn on_response_headers(
        &mut self,
        _: &mut (),
        x: &Exchange<'_>,
        _: &Headers<'_>,
        _: bool,
    ) -> Action {
        self.see("response_headers", x);
        Action::Continue
    }
    fn on_log(&mut self, _: &mut (), x: &Exchange<'_>) {
        self.see("log", x);
    }
}

/// The host runs the trailers phase right after the last body call that
/// saw them, and keeps the trailers on the exchange for later reads
/// (host/src/filter.rs `after_body`, `end_trailers`): a response phase
/// between the two in the harness (full duplex) sees them too.
#[test]
fn trailers_stay_on_the_exchange_between_the_last_body_call_and_their_phase() {
    let mut t = FilterTest::<SeesTrailers>::configure("null").unwrap();
    let mut x = t.exchange(Request::post("/", "ab").trailer("x-t", "1"));
    x.request_body_chunk("ab", true);
    x.response_headers(Response::new(200));
    x.request_trailers();
    x.log();
    drop(x);
    assert_eq!(
        t.filter().seen,
        vec![
            "request_body 1",
            "response_headers 1",
            "request_trailers 1",
            "log 1"
        ]
    );
}

// ---------------------------------------------------------------- content-length

/// Rewrites bodies to another size, per direction: `shrink` keeps the first
/// byte of each body call's data, `grow` appends `+` at the end of the
/// stream; with `remove`, its headers phases remove `content-length` (as a
/// streamed rewrite must, abi/README.md §4).
struct Resize {
    c: ResizeConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeConfig {
    streamed: bool,
    #[serde(default)]
    request: String,
    #[serde(default)]
    response: String,
    #[serde(default)]
    remove: bool,
}

fn resize(b: &Body<'_>, how: &str, eos: bool) -> Action {
    match how {
        "shrink" if b.len() > 1 => assert_eq!(b.replace(b.read(0, 1)), Ok(())),
        "grow" if eos => assert_eq!(b.append(b"+"), Ok(())),
        _ => {}
    }
    Action::Continue
}

impl HttpFilter for Resize {
    type Config = ResizeConfig;
    type Context = ();
    fn configure(c: ResizeConfig) -> Result<Self, String> {
        Ok(Resize { c })
    }
    fn setup(&self) -> Setup {
        let mode = if self.c.streamed {
            BodyMode::Streamed
        } else {
            BodyMode::Buffered
        };
        Setup::new()
            .on_request_headers()
            .on_response_headers()
            .on_request_body(mode)
            .on_response_body(mode)
    }
    fn on_request_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        h: &Headers<'_>,
        _: bool,
    ) -> Action {
        if self.c.remove {
            assert_eq!(h.remove("content-length"), Ok(()));
        }
        Action::Continue
    }
    fn on_response_headers(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        h: &Headers<'_>,
        _: bool,
    ) -> Action {
        if self.c.remove {
            assert_eq!(h.remove("content-length"), Ok(()));
        }
        Action::Continue
    }
    fn on_request_body(&mut self, _: &mut (), _: &Exchange<'_>, b: &Body<'_>, eos: bool) -> Action {
        resize(b, &self.c.request, eos)
    }
    fn on_response_body(
        &mut self,
        _: &mut (),
        _: &Exchange<'_>,
        b: &Body<'_>,
        eos: bool,
    ) -> Action {
        resize(b, &self.c.response, eos)
    }
}

/// Twenty bytes with the `content-length` a real message would have.
fn post20() -> Request {
    Request::post("/", "abcdefghijklmnopqrst").header("content-length", "20")
}

fn resp20() -> Response {
    Response::new(200)
        .header("content-length", "20")
        .body("abcdefghijklmnopqrst")
}

#[test]
fn a_buffered_rewrite_gets_the_content_length_the_host_recomputes() {
    let mut t = FilterTest::<Resize>::configure(
        r#"{"streamed": false, "request": "shrink", "response": "grow"}"#,
    )
    .unwrap();
    let mut x = t.exchange(post20());
    assert_eq!(x.run(resp20()), Outcome::Completed);
    assert_eq!(x.request_header("content-length").as_deref(), Some("1"));
    assert_eq!(x.response_header("content-length").as_deref(), Some("21"));
    assert_eq!(x.response_body_bytes(), b"abcdefghijklmnopqrst+");

    // Trailers after the body: no length (chunked on HTTP/1.1).
    let mut x = t.exchange(post20().trailer("x-t", "1"));
    assert_eq!(x.run(resp20().trailer("x-t", "1")), Outcome::Completed);
    assert_eq!(x.request_header("content-length"), None);
    assert_eq!(x.response_header("content-length"), None);

    // A request that had no body and still has none is framed as it came;
    // an empty response body gets its length, but not a 204 or 304.
    let mut t = FilterTest::<Resize>::configure(r#"{"streamed": false}"#).unwrap();
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(x.run(Response::new(200)), Outcome::Completed);
    assert_eq!(x.request_header("content-length"), None);
    assert_eq!(x.response_header("content-length").as_deref(), Some("0"));
    let mut x = t.exchange(Request::get("/"));
    let r = Response::new(304).header("content-length", "20");
    assert_eq!(x.run(r), Outcome::Completed);
    assert_eq!(x.response_header("content-length").as_deref(), Some("20"));
}

#[test]
fn a_streamed_rewrite_that_breaks_the_content_length_ends_the_exchange() {
    use Direction::{Request as Rq, Response as Rs};
    // Request: 503 plugin_failure, as the host answers; not a failed call.
    for how in ["shrink", "grow"] {
        let mut t = FilterTest::<Resize>::configure(&format!(
            r#"{{"streamed": true, "request": "{how}"}}"#
        ))
        .unwrap();
        let mut x = t.exchange(post20());
        let o = x.run(resp20());
        assert!(
            matches!(&o, Outcome::LengthMismatch(Phase::RequestBody, why) if why.contains("content-length")),
            "{how}: {o:?}"
        );
        assert_eq!(x.length_mismatch().map(|(d, _)| d), Some(Rq), "{how}");
        assert_eq!(x.status(), Some(503));
        assert_eq!(x.failure(), None);
    }
    // Response: reset after its head, which went out with its status.
    let mut t =
        FilterTest::<Resize>::configure(r#"{"streamed": true, "response": "grow"}"#).unwrap();
    let mut x = t.exchange(Request::get("/"));
    let o = x.run(resp20());
    assert!(
        matches!(o, Outcome::LengthMismatch(Phase::ResponseBody, _)),
        "{o:?}"
    );
    assert_eq!(x.length_mismatch().map(|(d, _)| d), Some(Rs));
    assert_eq!(x.status(), Some(200));

    // Chunk by chunk: over the length as soon as it is; the rest of the body
    // is not read.
    let mut t =
        FilterTest::<Resize>::configure(r#"{"streamed": true, "request": "grow"}"#).unwrap();
    let mut x = t.exchange(Request::new("POST", "/").header("content-length", "10"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_body_chunk("hello", false), Action::Continue);
    assert_eq!(x.length_mismatch(), None);
    assert_eq!(x.request_body_chunk("world", true), Action::Continue);
    assert_eq!(x.length_mismatch().map(|(d, _)| d), Some(Rq));

    // Sizes kept, or content-length removed in the headers phases: as it was.
    for config in [
        r#"{"streamed": true}"#,
        r#"{"streamed": true, "request": "grow", "response": "shrink", "remove": true}"#,
    ] {
        let mut t = FilterTest::<Resize>::configure(config).unwrap();
        let mut x = t.exchange(post20());
        assert_eq!(x.run(resp20()), Outcome::Completed, "{config}");
        assert_eq!(x.length_mismatch(), None);
    }
}
