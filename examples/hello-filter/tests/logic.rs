//! hello-filter's logic on the SDK's native harness: the config, the local
//! `/hello` answer, the `x-hello` response header and the request counter.

#![allow(clippy::unwrap_used)]

use legate_example_hello_filter::{HelloFilter, HELLO_BODY};
use legate_sdk::testing::{FilterTest, Outcome, Request, Response};
use legate_sdk::{Action, Phase};

#[test]
fn adds_x_hello_to_proxied_responses() {
    let mut t = FilterTest::<HelloFilter>::configure("null").unwrap();
    let mut x = t.exchange(Request::get("/api"));
    let outcome = x.run(
        Response::new(200)
            .header("content-type", "application/json")
            .header("x-hello", "upstream")
            .body("{}"),
    );
    assert_eq!(outcome, Outcome::Completed);
    // The filter's value replaces the upstream's.
    assert_eq!(x.response_header("x-hello").as_deref(), Some("world"));
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("application/json")
    );
    drop(x);
    assert_eq!(
        t.host().counter("hello_requests_total", &["proxied"]),
        Some(1)
    );
    assert_eq!(
        t.host().counter("hello_requests_total", &["local"]),
        Some(0)
    );
}

#[test]
fn the_header_value_comes_from_the_config() {
    let mut t = FilterTest::<HelloFilter>::configure(r#"{"value": "legate"}"#).unwrap();
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.response_headers(Response::new(404)), Action::Continue);
    assert_eq!(x.response_header("x-hello").as_deref(), Some("legate"));
}

#[test]
fn answers_get_hello_locally() {
    let mut t = FilterTest::<HelloFilter>::configure(r#"{"value": "v"}"#).unwrap();
    for path in ["/hello", "/hello?x=1"] {
        let mut x = t.exchange(Request::get(path));
        match x.run(Response::new(500)) {
            Outcome::Responded(Phase::RequestHeaders, r) => {
                assert_eq!(r.status, 200);
                assert_eq!(r.body, HELLO_BODY.as_bytes());
                assert_eq!(r.header_value("x-hello"), Some(&b"v"[..]));
                assert_eq!(r.details, "hello");
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    assert_eq!(
        t.host().counter("hello_requests_total", &["local"]),
        Some(2)
    );
    assert_eq!(
        t.host().counter("hello_requests_total", &["proxied"]),
        Some(0)
    );
}

#[test]
fn other_methods_and_paths_are_proxied() {
    let mut t = FilterTest::<HelloFilter>::configure("null").unwrap();
    for req in [
        Request::post("/hello", "x"),
        Request::new("HEAD", "/hello"),
        Request::get("/hello/there"),
        Request::get("/hellox"),
    ] {
        assert_eq!(t.exchange(req).request_headers(), Action::Continue);
    }
    assert_eq!(
        t.host().counter("hello_requests_total", &["proxied"]),
        Some(4)
    );
}

#[test]
fn declares_only_the_two_header_phases() {
    let t = FilterTest::<HelloFilter>::configure("null").unwrap();
    assert_eq!(
        t.setup().phases(),
        vec![Phase::RequestHeaders, Phase::ResponseHeaders]
    );
}

#[test]
fn bad_config_names_the_field() {
    let err = FilterTest::<HelloFilter>::configure(r#"{"value": 1}"#)
        .err()
        .unwrap();
    assert!(err.contains("`value`"), "{err}");
    let err = FilterTest::<HelloFilter>::configure(r#"{"valeu": "x"}"#)
        .err()
        .unwrap();
    assert!(err.contains("unknown field `valeu`"), "{err}");
    let err = FilterTest::<HelloFilter>::configure(r#"{"value": "a\nb"}"#)
        .err()
        .unwrap();
    assert!(err.contains("`value`") && err.contains("CR, LF"), "{err}");
}
