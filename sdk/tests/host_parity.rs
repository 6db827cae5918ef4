//! The native harness refuses what the real host refuses (host/src/wasm), so a
//! plugin that passes its native tests does not fail in the host: metric
//! definitions and caps, the buffered body call of a body-less message, local
//! response validation, header values, callouts, the tick interval and KV TTLs.

#![allow(clippy::unwrap_used)]

use legate_sdk::metrics::{Counter, Gauge, Histogram};
use legate_sdk::testing::{FilterTest, Outcome, Request, Response};
use legate_sdk::{Action, Body, BodyMode, Direction, Error, Exchange, Headers, HttpFilter, Setup};
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
