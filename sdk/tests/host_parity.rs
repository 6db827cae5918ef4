//! The native harness refuses what the real host refuses (host/src/wasm), so a
//! plugin that passes its native tests does not fail in the host: metric
//! definitions and caps, the buffered body call of a body-less message, local
//! response validation, header values, callouts, the tick interval and KV TTLs.

#![allow(clippy::unwrap_used)]

use legate_sdk::metrics::{Counter, Gauge, Histogram};
use legate_sdk::testing::FilterTest;
use legate_sdk::{Error, HttpFilter, Setup};
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
