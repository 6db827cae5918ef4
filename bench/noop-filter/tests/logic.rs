//! noop-filter on the SDK harness: it declares only the request-headers phase,
//! never changes the exchange, and reads the configured header.

#![allow(clippy::unwrap_used)]

use legate_bench_noop_filter::NoopFilter;
use legate_sdk::testing::{FilterTest, Outcome, Request, Response};
use legate_sdk::Action;

#[test]
fn continues_without_touching_the_exchange() {
    let mut t = FilterTest::<NoopFilter>::configure("null").unwrap();
    let mut x = t.exchange(Request::get("/a").header("x-b", "1"));
    assert_eq!(
        x.run(Response::new(200).header("x-c", "2")),
        Outcome::Completed
    );
    assert_eq!(x.request_header("x-b").as_deref(), Some("1"));
    assert_eq!(x.response_header("x-c").as_deref(), Some("2"));
}

#[test]
fn reads_the_configured_header() {
    let mut t = FilterTest::<NoopFilter>::configure(r#"{"read_header": "user-agent"}"#).unwrap();
    for _ in 0..3 {
        let mut x = t.exchange(Request::get("/").header("user-agent", "bench/1.0"));
        assert_eq!(x.run(Response::new(204)), Outcome::Completed);
    }
    assert_eq!(t.filter().seen(), 3 * "bench/1.0".len() as u64);
}

#[test]
fn all_phases_declares_what_a_proxy_wasm_filter_gets() {
    use legate_sdk::Phase;
    let t = FilterTest::<NoopFilter>::configure("null").unwrap();
    assert_eq!(t.setup().phases(), vec![Phase::RequestHeaders]);
    let mut t = FilterTest::<NoopFilter>::configure(r#"{"all_phases": true}"#).unwrap();
    assert_eq!(
        t.setup().phases(),
        vec![
            Phase::RequestHeaders,
            Phase::ResponseHeaders,
            Phase::ResponseBody,
            Phase::Log
        ]
    );
    // Each declared phase continues and leaves its part as it was.
    let mut x = t.exchange(Request::get("/").header("x-b", "1"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(
        x.response_headers(Response::new(200).header("x-c", "2").body("hello")),
        Action::Continue
    );
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.response_header("x-c").as_deref(), Some("2"));
    assert_eq!(x.response_body_bytes(), b"hello");
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(x.run(Response::new(200).body("hello")), Outcome::Completed);
}

#[test]
fn rejects_unknown_config_keys() {
    let err = FilterTest::<NoopFilter>::configure(r#"{"read_headers": "x"}"#)
        .err()
        .unwrap();
    assert!(err.contains("read_headers"), "{err}");
}
