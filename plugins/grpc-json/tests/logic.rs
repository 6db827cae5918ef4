//! grpc-json's logic on the SDK harness, phase by phase: the request head
//! rewritten to gRPC and the message built and framed in the body phase; the
//! response message printed as JSON; gRPC errors (in trailers, or
//! trailers-only) mapped to HTTP statuses with a JSON body; bad input answered
//! 400; unmatched requests untouched.

#![allow(clippy::unwrap_used)]

mod common;

use legate_plugin_grpc_json::{codec, GrpcJson};
use legate_sdk::testing::{FilterTest, Request, Response, TestHost};
use legate_sdk::{Action, BodyMode, Direction};
use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
struct SayRequest {
    #[prost(string, tag = "1")]
    message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SayReply {
    #[prost(string, tag = "1")]
    message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ReflectRequest {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, repeated, tag = "3")]
    tags: Vec<String>,
}

fn filter() -> FilterTest<GrpcJson> {
    TestHost::new()
        .file("descriptors", common::echo_descriptors())
        .configure::<GrpcJson>(common::CONFIG)
        .unwrap()
}

fn grpc_ok(body: Vec<u8>) -> Response {
    Response::new(200)
        .header("content-type", "application/grpc")
        .body(body)
        .trailer("grpc-status", "0")
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

fn counter(t: &FilterTest<GrpcJson>, result: &str) -> Option<u64> {
    t.host().counter("grpc_json_requests_total", &[result])
}

/// The single gRPC message of a framed body.
fn unframe(body: &[u8]) -> &[u8] {
    assert_eq!(body[0], 0, "flag");
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    assert_eq!(body.len(), 5 + len, "one frame");
    &body[5..]
}

#[test]
fn get_with_path_variable_and_query_becomes_a_grpc_request() {
    let mut t = filter();
    let mut x = t.exchange(
        Request::get("/v1/shelves/1/books/2?tags=a&tags=b")
            .header("accept", "application/json")
            .header("content-length", "0"),
    );
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.method(), "POST");
    assert_eq!(x.path(), "/legate.test.v1.Echo/Reflect");
    assert_eq!(
        x.request_header("content-type").as_deref(),
        Some("application/grpc")
    );
    assert_eq!(x.request_header("te").as_deref(), Some("trailers"));
    assert_eq!(x.request_header("content-length"), None);
    assert_eq!(x.body_mode(Direction::Request), BodyMode::Buffered);
    // Body-less GET: the buffered body call still comes, empty.
    assert_eq!(x.request_body(), Action::Continue);
    let sent = ReflectRequest::decode(unframe(&x.request_body_bytes())).unwrap();
    assert_eq!(
        sent,
        ReflectRequest {
            name: "shelves/1/books/2".into(),
            tags: vec!["a".into(), "b".into()],
        }
    );

    // The reply (the same message): printed as JSON, trailers gone.
    assert_eq!(
        x.response_headers(grpc_ok(common::frame(&sent.encode_to_vec()))),
        Action::Continue
    );
    assert_eq!(x.body_mode(Direction::Response), BodyMode::Buffered);
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.status(), Some(200));
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        json(&x.response_body_bytes()),
        serde_json::json!({"name": "shelves/1/books/2", "tags": ["a", "b"]})
    );
    assert_eq!(x.response_trailers(), Action::Continue);
    assert_eq!(x.response_trailer("grpc-status"), None);
    assert_eq!(counter(&t, "ok"), Some(1));
}

#[test]
fn post_with_body_star() {
    let mut t = filter();
    let body = r#"{"message": "hello"}"#;
    let mut x = t.exchange(
        Request::post("/v1/echo", body)
            .header("content-type", "application/json")
            .header("content-length", body.len().to_string()),
    );
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.path(), "/legate.test.v1.Echo/Say");
    assert_eq!(x.request_body(), Action::Continue);
    let sent = SayRequest::decode(unframe(&x.request_body_bytes())).unwrap();
    assert_eq!(sent.message, "hello");
    let reply = SayReply {
        message: "hello".into(),
    };
    x.response_headers(grpc_ok(common::frame(&reply.encode_to_vec())));
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(
        json(&x.response_body_bytes()),
        serde_json::json!({"message": "hello"})
    );
}

#[test]
fn a_client_stream_is_a_json_array_sent_as_one_frame_per_message() {
    let mut t = filter();
    let body = r#"[{"message": "a"}, {"message": "b"}]"#;
    let mut x = t.exchange(Request::post("/v1/collect", body));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.path(), "/legate.test.v1.Echo/Collect");
    assert_eq!(x.request_body(), Action::Continue);
    let mut frames = codec::Deframer::default();
    let sent: Vec<String> = frames
        .push(&x.request_body_bytes())
        .unwrap()
        .iter()
        .map(|m| SayRequest::decode(m.as_slice()).unwrap().message)
        .collect();
    assert_eq!(sent, ["a", "b"]);
    // Its one reply prints as an object, as a unary call's.
    let reply = SayReply {
        message: "a,b".into(),
    };
    x.response_headers(grpc_ok(common::frame(&reply.encode_to_vec())));
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(
        json(&x.response_body_bytes()),
        serde_json::json!({"message": "a,b"})
    );

    // Not an array: 400, nothing upstream.
    let mut x = t.exchange(Request::post("/v1/collect", r#"{"message": "a"}"#));
    assert_eq!(x.request_headers(), Action::Continue);
    let Action::Respond(r) = x.request_body() else {
        panic!("not answered locally")
    };
    assert_eq!(r.status, 400);
    assert_eq!(counter(&t, "bad_request"), Some(1));
}

#[test]
fn bad_json_is_answered_400_and_nothing_goes_upstream() {
    let mut t = filter();
    let mut x = t.exchange(Request::post("/v1/echo", r#"{"message": 5}"#));
    assert_eq!(x.request_headers(), Action::Continue);
    let Action::Respond(r) = x.request_body() else {
        panic!("not answered locally")
    };
    assert_eq!(r.status, 400);
    assert_eq!(
        r.headers,
        [("content-type".to_owned(), b"application/json".to_vec())]
    );
    let v = json(&r.body);
    assert_eq!(v["code"], 3);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("legate.test.v1.SayRequest"),
        "{v}"
    );
    // An unknown query parameter, too.
    let mut x = t.exchange(Request::get("/v1/echo/x?nope=1"));
    x.request_headers();
    let Action::Respond(r) = x.request_body() else {
        panic!("not answered locally")
    };
    assert_eq!(r.status, 400);
    assert!(json(&r.body)["message"]
        .as_str()
        .unwrap()
        .contains("\"nope\""));
    assert_eq!(counter(&t, "bad_request"), Some(2));
}

#[test]
fn a_malformed_percent_escape_in_the_query_is_answered_400() {
    let mut t = filter();
    let mut x = t.exchange(Request::get("/v1/tags/n?tags=%ZZ"));
    x.request_headers();
    let Action::Respond(r) = x.request_body() else {
        panic!("not answered locally")
    };
    assert_eq!(r.status, 400);
    let v = json(&r.body);
    assert_eq!(v["code"], 3);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("malformed percent escape \"%ZZ\""),
        "{v}"
    );
    assert_eq!(counter(&t, "bad_request"), Some(1));
}

#[test]
fn grpc_error_in_trailers_maps_to_http_status_and_json() {
    let mut t = filter();
    let mut x = t.exchange(Request::get("/v1/echo/x"));
    x.request_headers();
    x.request_body();
    let resp = Response::new(200)
        .header("content-type", "application/grpc")
        .body(Vec::new())
        .trailer("grpc-status", "5")
        .trailer("grpc-message", "no%20such%20echo%3A%20%C3%BC");
    assert_eq!(x.response_headers(resp), Action::Continue);
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.status(), Some(404));
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        json(&x.response_body_bytes()),
        serde_json::json!({"code": 5, "message": "no such echo: ü"})
    );
    // Emptied: the response ends without trailers.
    x.response_trailers();
    assert_eq!(x.response_trailer("grpc-status"), None);
    assert_eq!(x.response_trailer("grpc-message"), None);
    assert_eq!(counter(&t, "grpc_error"), Some(1));
}

#[test]
fn trailers_only_error_is_answered_with_the_mapped_status() {
    let mut t = filter();
    let mut x = t.exchange(Request::post(
        "/v1/fail",
        r#"{"code": 16, "message": "who?"}"#,
    ));
    x.request_headers();
    x.request_body();
    let resp = Response::new(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", "16")
        .header("grpc-message", "who%3F");
    let Action::Respond(r) = x.response_headers(resp) else {
        panic!("trailers-only not answered")
    };
    assert_eq!(r.status, 401);
    assert_eq!(
        json(&r.body),
        serde_json::json!({"code": 16, "message": "who?"})
    );
    assert_eq!(counter(&t, "grpc_error"), Some(1));
}

#[test]
fn malformed_upstream_frame_is_502() {
    let mut t = filter();
    let mut x = t.exchange(Request::get("/v1/echo/x"));
    x.request_headers();
    x.request_body();
    x.response_headers(grpc_ok(vec![0, 0, 0, 0, 9, 1]));
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.status(), Some(502));
    let v = json(&x.response_body_bytes());
    assert_eq!(v["code"], 14);
    assert!(
        v["message"].as_str().unwrap().contains("announces 9 bytes"),
        "{v}"
    );
    // No grpc-status at all.
    let mut x = t.exchange(Request::get("/v1/echo/x"));
    x.request_headers();
    x.request_body();
    x.response_headers(
        Response::new(200)
            .header("content-type", "application/grpc")
            .body(common::frame(b"")),
    );
    x.response_body();
    assert_eq!(x.status(), Some(502));
    assert_eq!(counter(&t, "upstream_error"), Some(2));
}

#[derive(Clone, PartialEq, prost::Message)]
struct CountRequest {
    #[prost(uint32, tag = "2")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CountReply {
    #[prost(uint32, tag = "1")]
    n: u32,
}

/// Replies 1..=n of `Count`, framed, as one byte stream.
fn count_replies(n: u32) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| common::frame(&CountReply { n: i }.encode_to_vec()))
        .collect()
}

/// A `GET /v1/count/N` exchange up to the response head (gRPC, trailers
/// `status` to come); the bytes it sent upstream are checked.
fn count_exchange<'t>(
    t: &'t mut FilterTest<GrpcJson>,
    n: u32,
    status: &str,
) -> legate_sdk::testing::TestExchange<'t, GrpcJson> {
    let mut x = t.exchange(Request::get(&format!("/v1/count/{n}")));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.path(), "/legate.test.v1.Echo/Count");
    assert_eq!(x.request_body(), Action::Continue);
    let sent = CountRequest::decode(unframe(&x.request_body_bytes())).unwrap();
    assert_eq!(sent.count, n);
    let head = Response::new(200)
        .header("content-type", "application/grpc")
        .trailer("grpc-status", status)
        .trailer("grpc-message", "stopped%20early");
    assert_eq!(x.response_headers(head), Action::Continue);
    // The head goes now (a 200 with JSON), the body streams.
    assert_eq!(x.body_mode(Direction::Response), BodyMode::Streamed);
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("application/json")
    );
    // The status trailers are declared, for HTTP/1.1 clients (whose server
    // writes only declared trailers; the head no longer says gRPC).
    assert_eq!(
        x.response_header("trailer").as_deref(),
        Some("grpc-status, grpc-message")
    );
    x
}

#[test]
fn server_streaming_replies_become_a_json_array_as_they_arrive() {
    let mut t = filter();
    let stream = count_replies(3);
    // Every way of cutting the stream into two chunks gives the same array.
    for cut in 0..=stream.len() {
        let mut x = count_exchange(&mut t, 3, "0");
        let mut out = Vec::new();
        assert_eq!(
            x.response_body_chunk(stream[..cut].to_vec(), false),
            Action::Continue
        );
        out.extend(x.response_body_bytes());
        assert_eq!(
            x.response_body_chunk(stream[cut..].to_vec(), true),
            Action::Continue
        );
        out.extend(x.response_body_bytes());
        assert_eq!(
            json(&out),
            serde_json::json!([{"n": 1}, {"n": 2}, {"n": 3}]),
            "cut at {cut}"
        );
        // OK: the trailers are gone, the response ends with the array.
        assert_eq!(x.response_trailers(), Action::Continue);
        assert_eq!(x.response_trailer("grpc-status"), None);
    }
    assert_eq!(counter(&t, "ok"), Some(stream.len() as u64 + 1));

    // No replies: an empty array.
    let mut x = count_exchange(&mut t, 0, "0");
    assert_eq!(x.response_body_chunk(Vec::new(), true), Action::Continue);
    assert_eq!(json(&x.response_body_bytes()), serde_json::json!([]));
}

#[test]
fn a_server_stream_that_fails_keeps_its_status_as_trailers() {
    let mut t = filter();
    let mut x = count_exchange(&mut t, 2, "5");
    let mut out = Vec::new();
    assert_eq!(
        x.response_body_chunk(count_replies(2), true),
        Action::Continue
    );
    out.extend(x.response_body_bytes());
    // The 200 went out with the head: the array is closed and the error
    // stays in the trailers.
    assert_eq!(json(&out), serde_json::json!([{"n": 1}, {"n": 2}]));
    assert_eq!(x.response_trailers(), Action::Continue);
    assert_eq!(x.response_trailer("grpc-status").as_deref(), Some("5"));
    assert_eq!(counter(&t, "grpc_error"), Some(1));

    // A reply that does not decode, or a stream cut inside a message: the
    // exchange is reset (a local response after the head was sent).
    let mut x = count_exchange(&mut t, 1, "0");
    let Action::Respond(r) = x.response_body_chunk(common::frame(&[0xff, 0xff]), false) else {
        panic!("a broken reply was passed on")
    };
    assert_eq!(r.status, 502);
    let mut x = count_exchange(&mut t, 1, "0");
    let cut = count_replies(1);
    let Action::Respond(_) = x.response_body_chunk(cut[..cut.len() - 1].to_vec(), true) else {
        panic!("a cut stream was passed on as complete")
    };
    assert_eq!(counter(&t, "upstream_error"), Some(2));

    // A frame announcing more than a stream's message cap: refused at once,
    // not buffered.
    let mut x = count_exchange(&mut t, 1, "0");
    let Action::Respond(_) = x.response_body_chunk(vec![0, 0xff, 0xff, 0xff, 0xff, 1], false)
    else {
        panic!("a 4 GiB frame was waited for")
    };
    assert_eq!(counter(&t, "upstream_error"), Some(3));
}

#[test]
fn server_stream_statuses_from_the_head_or_nowhere() {
    let mut t = filter();
    // Trailers-only OK (grpc-go's empty stream): an empty array.
    let mut x = t.exchange(Request::get("/v1/count/0"));
    x.request_headers();
    x.request_body();
    let head = Response::new(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", "0");
    let Action::Respond(r) = x.response_headers(head) else {
        panic!("an empty OK stream was not answered")
    };
    assert_eq!((r.status, json(&r.body)), (200, serde_json::json!([])));
    drop(x);
    assert_eq!(counter(&t, "ok"), Some(1));

    // The status in the head, none in the trailers: it still ends the
    // stream, however many chunks came before.
    let mut x = t.exchange(Request::get("/v1/count/2"));
    x.request_headers();
    x.request_body();
    let head = Response::new(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", "0");
    let stream = count_replies(2);
    // A head with a body: not trailers-only.
    assert_eq!(
        x.response_headers(head.body(stream.clone())),
        Action::Continue
    );
    let mut out = Vec::new();
    for (i, b) in stream.iter().enumerate() {
        let eos = i + 1 == stream.len();
        assert_eq!(x.response_body_chunk(vec![*b], eos), Action::Continue);
        out.extend(x.response_body_bytes());
    }
    assert_eq!(json(&out), serde_json::json!([{"n": 1}, {"n": 2}]));
    drop(x);
    assert_eq!(counter(&t, "ok"), Some(2));

    // No status at all: not known to be complete, so the exchange is reset.
    let mut x = t.exchange(Request::get("/v1/count/1"));
    x.request_headers();
    x.request_body();
    let head = Response::new(200).header("content-type", "application/grpc");
    assert_eq!(
        x.response_headers(head.body(count_replies(1))),
        Action::Continue
    );
    let Action::Respond(_) = x.response_body_chunk(count_replies(1), true) else {
        panic!("a stream without a status passed as complete")
    };
    assert_eq!(counter(&t, "upstream_error"), Some(1));
}

#[test]
fn unmatched_requests_pass_untouched() {
    let mut t = filter();
    for req in [
        Request::get("/healthz"),
        Request::post("/legate.test.v1.Echo/Say", common::frame(b""))
            .header("content-type", "application/grpc"),
        // The right path with the wrong method.
        Request::new("DELETE", "/v1/echo/x"),
        // A matching rule, but the request is gRPC already.
        Request::post("/v1/echo", common::frame(b""))
            .header("content-type", "application/grpc+proto"),
    ] {
        let mut x = t.exchange(req.header("content-length", "5"));
        let (method, path) = (x.method(), x.path());
        assert_eq!(x.request_headers(), Action::Continue);
        assert_eq!((x.method(), x.path()), (method, path));
        assert_eq!(x.request_header("content-length").as_deref(), Some("5"));
        assert_eq!(x.body_mode(Direction::Request), BodyMode::Skipped);
        // Not ours: no more calls for the exchange.
        assert!(x.detached());
        assert_eq!(
            x.response_headers(Response::new(200).body("x")),
            Action::Continue
        );
        assert_eq!(x.body_mode(Direction::Response), BodyMode::Skipped);
    }
    for result in legate_plugin_grpc_json::RESULTS {
        assert_eq!(counter(&t, result), Some(0), "{result}");
    }
}

#[test]
fn a_non_grpc_answer_becomes_a_json_error_with_the_mapped_status() {
    let mut t = filter();
    let mut x = t.exchange(Request::get("/v1/echo/x"));
    x.request_headers();
    x.request_body();
    // The host's answer for a dead upstream.
    let resp = Response::new(502)
        .header("content-type", "text/plain; charset=utf-8")
        .header("content-length", "25")
        .body("upstream_connect_failure\n");
    assert_eq!(x.response_headers(resp), Action::Continue);
    assert_eq!(x.body_mode(Direction::Response), BodyMode::Buffered);
    assert_eq!(x.response_body(), Action::Continue);
    // 502 → UNAVAILABLE → 503, as a gRPC server's UNAVAILABLE would be.
    assert_eq!(x.status(), Some(503));
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        json(&x.response_body_bytes()),
        serde_json::json!({"code": 14, "message": "HTTP 502: upstream_connect_failure"})
    );
    assert_eq!(counter(&t, "upstream_error"), Some(1));

    // A compressed page: its coding goes with it, its bytes are not quoted.
    let mut x = t.exchange(Request::get("/v1/echo/x"));
    x.request_headers();
    x.request_body();
    let resp = Response::new(502)
        .header("content-type", "text/html")
        .header("content-encoding", "gzip")
        .body(vec![0x1f, 0x8b, 8, 0, 0xff, 0xfe]);
    assert_eq!(x.response_headers(resp), Action::Continue);
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.response_header("content-encoding"), None);
    assert_eq!(
        json(&x.response_body_bytes()),
        serde_json::json!({"code": 14, "message": "HTTP 502: the response was not gRPC"})
    );

    // Without a body: answered from the headers phase.
    let mut x = t.exchange(Request::get("/v1/echo/x"));
    x.request_headers();
    x.request_body();
    let Action::Respond(r) = x.response_headers(Response::new(404)) else {
        panic!("a body-less non-gRPC answer was not converted")
    };
    assert_eq!(r.status, 501);
    assert_eq!(
        json(&r.body),
        serde_json::json!({"code": 12, "message": "HTTP 404: the response was not gRPC"})
    );
    assert_eq!(counter(&t, "upstream_error"), Some(3));

    // Not gRPC but not an error (a plain HTTP service): passes as it is.
    let mut x = t.exchange(Request::get("/v1/echo/x"));
    x.request_headers();
    x.request_body();
    let plain = Response::new(200)
        .header("content-type", "application/json")
        .body("{}");
    assert_eq!(x.response_headers(plain), Action::Continue);
    assert_eq!(x.body_mode(Direction::Response), BodyMode::Skipped);
    assert_eq!(x.status(), Some(200));
    assert_eq!(counter(&t, "upstream_error"), Some(4));
}
