//! grpc-web's logic on the SDK harness: the request and response conversions
//! phase by phase, chunking of the `-text` variant, trailers folded into the
//! trailer frame, trailers-only responses, pass-through, and CORS.

#![allow(clippy::unwrap_used)]

use legate_plugin_grpc_web::codec::{self, TextDecoder};
use legate_plugin_grpc_web::{
    accepts_text, convert_content_type, is_grpc_response_type, status_fields, GrpcWeb, Variant,
    MAX_MESSAGE,
};
use legate_sdk::testing::{FilterTest, Request, Response};
use legate_sdk::{Action, BodyMode, Direction};

const CORS: &str = r#"{"cors": {"allowed_origins": ["https://app.example.com"]}}"#;

fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![flag];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A gRPC-Web request as grpc-web's JavaScript client sends it: a `-text`
/// one asks for a `-text` response in `accept` (without, the response is
/// binary: `the_response_encoding_follows_accept`).
fn grpc_web(content_type: &str, body: &[u8]) -> Request {
    let r = grpc_web_no_accept(content_type, body);
    if content_type.starts_with("application/grpc-web-text") {
        r.header("accept", "application/grpc-web-text")
    } else {
        r
    }
}

/// A gRPC-Web request without `accept`.
fn grpc_web_no_accept(content_type: &str, body: &[u8]) -> Request {
    Request::post("/pkg.Svc/Method", body.to_vec())
        .header("content-type", content_type)
        .header("x-grpc-web", "1")
        .header("content-length", body.len().to_string())
}

fn grpc_response() -> Response {
    Response::new(200)
        .header("content-type", "application/grpc")
        .header("content-length", "99")
        .trailer("grpc-status", "0")
        .trailer("grpc-message", "")
}

fn counter(t: &FilterTest<GrpcWeb>, name: &str, label: &str) -> Option<u64> {
    t.host().counter(name, &[label])
}

#[test]
fn content_types_map_to_grpc() {
    let c = convert_content_type;
    assert_eq!(
        c("application/grpc-web"),
        Some((
            Variant::Binary,
            "application/grpc-web".into(),
            "application/grpc".into()
        ))
    );
    // Parameters are ignored.
    assert_eq!(
        c("application/grpc-web+proto; charset=utf-8"),
        Some((
            Variant::Binary,
            "application/grpc-web+proto".into(),
            "application/grpc".into()
        ))
    );
    assert_eq!(
        c("application/grpc-web-text+proto"),
        Some((
            Variant::Text,
            "application/grpc-web-text+proto".into(),
            "application/grpc".into()
        ))
    );
    // A codec other than protobuf, which Envoy does not convert, keeps its
    // name upstream.
    assert_eq!(
        c("application/grpc-web-text+json"),
        Some((
            Variant::Text,
            "application/grpc-web-text+json".into(),
            "application/grpc+json".into()
        ))
    );
    for other in [
        "application/grpc",
        "application/grpc-webx",
        "application/grpc-web+",
        "text/plain",
    ] {
        assert_eq!(c(other), None, "{other}");
    }
}

#[test]
fn content_types_are_case_sensitive_as_envoy_matches_them() {
    // Envoy's grpc_web filter looks the whole value up in its set of the
    // four lower-case types (`isGrpcWebRequest`): another case is not
    // gRPC-Web, and passes untouched.
    for other in [
        "Application/grpc-web",
        "application/GRPC-Web+proto",
        "application/grpc-web-TEXT",
        "application/grpc-web-text+Proto",
        "APPLICATION/GRPC-WEB; charset=utf-8",
    ] {
        assert_eq!(convert_content_type(other), None, "{other}");
        let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
        let mut x = t.exchange(grpc_web_no_accept(other, &frame(0, b"x")));
        let headers = x.request_headers_list();
        assert_eq!(x.request_headers(), Action::Continue, "{other}");
        assert_eq!(x.request_headers_list(), headers, "{other}");
        assert!(x.detached(), "{other}");
        assert_eq!(counter(&t, "grpc_web_requests_total", "binary"), Some(0));
        assert_eq!(counter(&t, "grpc_web_requests_total", "text"), Some(0));
    }
}

#[test]
fn the_upstreams_content_type_is_read_as_envoy_reads_it() {
    // gRPC: `application/grpc` or `application/grpc+codec`, case-sensitive
    // (Envoy's `hasGrpcContentType`); gRPC-Web already (binary, proto): any
    // case, parameters ignored (`hasProtoEncodedGrpcWebContentType`).
    for grpc in [
        "application/grpc",
        "application/grpc+proto",
        "application/grpc+json",
        "application/grpc-web",
        "application/grpc-web+proto",
        "Application/GRPC-Web+Proto; charset=utf-8",
    ] {
        assert!(is_grpc_response_type(grpc), "{grpc}");
    }
    for not in [
        "Application/grpc",
        "APPLICATION/GRPC+PROTO",
        "application/grpcx",
        "application/grpc; charset=utf-8",
        "application/grpc-web-text",
        "text/html",
    ] {
        assert!(!is_grpc_response_type(not), "{not}");
    }
    // An upstream answering `Application/grpc` is answered as a non-gRPC
    // answer: its status 200 kept, UNKNOWN in the head, the body dropped.
    let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
    let mut x = t.exchange(grpc_web("application/grpc-web", &frame(0, b"x")));
    x.request_headers();
    let resp = Response::new(200)
        .header("content-type", "Application/grpc")
        .body(frame(0, b"reply"))
        .trailer("grpc-status", "0");
    assert_eq!(x.response_headers(resp), Action::Continue);
    assert_eq!(x.body_mode(Direction::Response), BodyMode::Buffered);
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.status(), Some(200));
    assert_eq!(x.response_header("grpc-status").as_deref(), Some("2"));
    assert_eq!(x.response_body_bytes(), b"");
    assert_eq!(counter(&t, "grpc_web_responses_total", "not_grpc"), Some(1));

    // A head that ends the response with a `grpc-status` is trailers-only
    // gRPC whatever its content type (Envoy's `isGrpcResponseHeaders`): the
    // upstream's status passes, not one mapped from the HTTP status.
    for ct in ["Application/grpc", "text/plain"] {
        let mut x = t.exchange(grpc_web("application/grpc-web", &frame(0, b"x")));
        x.request_headers();
        let resp = Response::new(200)
            .header("content-type", ct)
            .header("grpc-status", "5")
            .header("grpc-message", "not found");
        assert_eq!(x.response_headers(resp), Action::Continue, "{ct}");
        assert_eq!(x.response_header("grpc-status").as_deref(), Some("5"));
        assert_eq!(
            x.response_header("content-type").as_deref(),
            Some("application/grpc-web+proto")
        );
    }
    assert_eq!(
        counter(&t, "grpc_web_responses_total", "trailers_only"),
        Some(2)
    );
    assert_eq!(counter(&t, "grpc_web_responses_total", "not_grpc"), Some(1));
}

#[test]
fn binary_unary_is_converted_and_trailers_become_the_last_frame() {
    let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
    let msg = frame(0, b"request");
    let mut x = t.exchange(grpc_web("application/grpc-web+proto", &msg));
    assert_eq!(x.request_headers(), Action::Continue);
    // As Envoy's grpc_web filter sends it: `+proto` is gRPC's default codec.
    assert_eq!(
        x.request_header("content-type").as_deref(),
        Some("application/grpc")
    );
    assert_eq!(x.request_header("te").as_deref(), Some("trailers"));
    // The client named no message encodings: `identity`, as Envoy adds.
    assert_eq!(
        x.request_header("grpc-accept-encoding").as_deref(),
        Some("identity")
    );
    // As Envoy's grpc_web filter, binary too: no `content-length` upstream
    // (the body itself passes untouched).
    assert_eq!(x.request_header("content-length"), None);
    assert_eq!(x.body_mode(Direction::Request), BodyMode::Skipped);
    assert!(
        !x.detached(),
        "a converted exchange needs its response calls"
    );

    assert_eq!(x.response_headers(grpc_response()), Action::Continue);
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("application/grpc-web+proto")
    );
    assert_eq!(x.response_header("content-length"), None);
    let reply = frame(0, b"reply");
    assert_eq!(
        x.response_body_chunk(reply.clone(), false),
        Action::Continue
    );
    assert_eq!(x.response_body_bytes(), reply);
    assert_eq!(x.response_body_chunk(Vec::new(), true), Action::Continue);
    assert_eq!(
        x.response_body_bytes(),
        frame(0x80, b"grpc-status: 0\r\ngrpc-message: \r\n")
    );
    // Folded: no HTTP trailers are left.
    assert_eq!(x.response_trailers(), Action::Continue);
    assert_eq!(x.response_trailer("grpc-status"), None);
    assert_eq!(counter(&t, "grpc_web_requests_total", "binary"), Some(1));
    assert_eq!(
        counter(&t, "grpc_web_responses_total", "trailer_frame"),
        Some(1)
    );
}

#[test]
fn a_clients_own_grpc_accept_encoding_is_kept() {
    // As Envoy's grpc_web filter: `identity` only when the client named no
    // encodings; one that can decode gzip says so and is believed.
    let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
    let msg = frame(0, b"request");
    let mut x = t.exchange(
        grpc_web("application/grpc-web", &msg).header("grpc-accept-encoding", "gzip,identity"),
    );
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(
        x.request_header("grpc-accept-encoding").as_deref(),
        Some("gzip,identity")
    );
}

#[test]
fn text_bodies_are_decoded_and_encoded_whatever_the_chunking() {
    let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
    let msg = frame(0, b"hello, text variant");
    let encoded = codec::encode(&msg);
    let mut x = t.exchange(grpc_web("application/grpc-web-text", &encoded));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(
        x.request_header("content-type").as_deref(),
        Some("application/grpc")
    );
    assert_eq!(
        x.request_header("content-length"),
        None,
        "decoding changes the size"
    );
    assert_eq!(x.body_mode(Direction::Request), BodyMode::Streamed);
    // Chunks of 3 bytes: never a whole number of base64 groups.
    let mut decoded = Vec::new();
    let chunks: Vec<&[u8]> = encoded.chunks(3).collect();
    for (i, c) in chunks.iter().enumerate() {
        let last = i == chunks.len() - 1;
        assert_eq!(x.request_body_chunk(c.to_vec(), last), Action::Continue);
        decoded.extend(x.request_body_bytes());
    }
    assert_eq!(decoded, msg);

    assert_eq!(x.response_headers(grpc_response()), Action::Continue);
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("application/grpc-web-text+proto")
    );
    let reply = frame(0, b"a reply of some length");
    let mut out = Vec::new();
    for c in reply.chunks(4) {
        assert_eq!(x.response_body_chunk(c.to_vec(), false), Action::Continue);
        out.extend(x.response_body_bytes());
    }
    assert_eq!(x.response_body_chunk(Vec::new(), true), Action::Continue);
    out.extend(x.response_body_bytes());
    let mut want = reply.clone();
    want.extend(frame(0x80, b"grpc-status: 0\r\ngrpc-message: \r\n"));
    // Each chunk padded base64 of its own: a client decodes the concatenation.
    assert_eq!(out.len() % 4, 0);
    assert_eq!(TextDecoder::default().push(&out, true).unwrap(), want);
    assert_eq!(counter(&t, "grpc_web_requests_total", "text"), Some(1));
}

#[test]
fn the_response_encoding_follows_accept() {
    // As Envoy's grpc_web filter: `accept: application/grpc-web-text` asks for
    // a base64 response, whatever the request's encoding; `accept:
    // application/grpc-web` for a binary one; any other `accept` (a list
    // too: see `accept_is_one_exact_value_as_envoy_reads_it`), or none, gets
    // binary, whatever the request's encoding (Envoy's `is_text_response_`
    // is set by `accept` alone).
    let trailer = frame(0x80, b"grpc-status: 0\r\ngrpc-message: \r\n");
    let reply = frame(0, b"reply");
    for (request_type, accept, want_type, text) in [
        (
            "application/grpc-web+proto",
            Some("application/grpc-web-text"),
            "application/grpc-web-text+proto",
            true,
        ),
        (
            "application/grpc-web",
            Some("application/grpc-web-text+proto"),
            "application/grpc-web-text+proto",
            true,
        ),
        (
            "application/grpc-web-text",
            Some("application/grpc-web"),
            "application/grpc-web+proto",
            false,
        ),
        (
            "application/grpc-web-text+proto",
            Some("Application/GRPC-Web+proto; q=1"),
            "application/grpc-web+proto",
            false,
        ),
        // Fallbacks: binary, whatever the request's encoding.
        (
            "application/grpc-web-text",
            None,
            "application/grpc-web+proto",
            false,
        ),
        (
            "application/grpc-web-text+proto",
            Some("*/*"),
            "application/grpc-web+proto",
            false,
        ),
        (
            "application/grpc-web-text",
            Some("application/json, text/plain"),
            "application/grpc-web+proto",
            false,
        ),
        (
            "application/grpc-web+proto",
            None,
            "application/grpc-web+proto",
            false,
        ),
        (
            "application/grpc-web",
            Some("*/*"),
            "application/grpc-web+proto",
            false,
        ),
    ] {
        let why = format!("{request_type} accept {accept:?}");
        let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
        let msg = frame(0, b"request");
        let body = if request_type.contains("-text") {
            codec::encode(&msg)
        } else {
            msg.clone()
        };
        let mut req = grpc_web_no_accept(request_type, &body);
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let mut x = t.exchange(req);
        assert_eq!(x.request_headers(), Action::Continue, "{why}");
        if request_type.contains("-text") {
            x.request_body_chunk(body, true);
            assert_eq!(x.request_body_bytes(), msg, "{why}: request decoded");
        }
        assert_eq!(x.response_headers(grpc_response()), Action::Continue);
        assert_eq!(
            x.response_header("content-type").as_deref(),
            Some(want_type),
            "{why}"
        );
        x.response_body_chunk(reply.clone(), false);
        let mut out = x.response_body_bytes();
        x.response_body_chunk(Vec::new(), true);
        out.extend(x.response_body_bytes());
        let mut want = reply.clone();
        want.extend_from_slice(&trailer);
        if text {
            assert_eq!(
                TextDecoder::default().push(&out, true).unwrap(),
                want,
                "{why}"
            );
        } else {
            assert_eq!(out, want, "{why}");
        }
    }
}

#[test]
fn accept_is_one_exact_value_as_envoy_reads_it() {
    // Envoy's grpc_web filter compares the whole `accept` with
    // `application/grpc-web-text` and `application/grpc-web-text+proto`:
    // a list or parameters get binary. grpc-web's JavaScript client sends
    // exactly `application/grpc-web-text` (text mode) or no `accept`.
    const PROTO_TEXT: &str = "application/grpc-web-text+proto";
    for (accept, text) in [
        ("application/grpc-web-text", true),
        ("application/grpc-web-text+proto", true),
        ("application/grpc-web-text, */*", false),
        ("text/html, application/grpc-web-text", false),
        ("application/grpc-web-text+proto;q=1", false),
        ("Application/GRPC-Web-Text", false),
        ("application/grpc-web-text+json", false),
        ("application/grpc-web", false),
        ("*/*", false),
    ] {
        assert_eq!(accepts_text(accept, PROTO_TEXT), text, "{accept}");
        let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
        let body = codec::encode(&frame(0, b"request"));
        let mut x = t.exchange(
            grpc_web_no_accept("application/grpc-web-text", &body).header("accept", accept),
        );
        assert_eq!(x.request_headers(), Action::Continue, "{accept}");
        x.request_body_chunk(body, true);
        assert_eq!(x.response_headers(grpc_response()), Action::Continue);
        let want = if text {
            "application/grpc-web-text+proto"
        } else {
            "application/grpc-web+proto"
        };
        assert_eq!(
            x.response_header("content-type").as_deref(),
            Some(want),
            "{accept}"
        );
        x.response_body_chunk(Vec::new(), true);
        let out = x.response_body_bytes();
        let trailer = frame(0x80, b"grpc-status: 0\r\ngrpc-message: \r\n");
        if text {
            assert_eq!(TextDecoder::default().push(&out, true).unwrap(), trailer);
        } else {
            assert_eq!(out, trailer, "{accept}");
        }
    }
    // A codec Envoy does not convert: its own text type asks for text too.
    assert!(accepts_text(
        "application/grpc-web-text+thrift",
        "application/grpc-web-text+thrift"
    ));
}

#[test]
fn the_response_content_type_says_proto_as_envoy() {
    // Envoy's grpc_web filter (encodeHeaders) answers every request it
    // converts (no codec, or `+proto`) `application/grpc-web[-text]+proto`;
    // so does the plugin, for converted responses and its own answers. A
    // codec Envoy does not convert keeps its name (the body is in it).
    const TEXT: &str = "application/grpc-web-text";
    for (request_type, accept, want) in [
        ("application/grpc-web", None, "application/grpc-web+proto"),
        (
            "application/grpc-web+proto",
            None,
            "application/grpc-web+proto",
        ),
        (TEXT, Some(TEXT), "application/grpc-web-text+proto"),
        (
            "application/grpc-web-text+proto",
            Some(TEXT),
            "application/grpc-web-text+proto",
        ),
        (
            "application/grpc-web+json",
            None,
            "application/grpc-web+json",
        ),
        (
            "application/grpc-web-text+thrift",
            Some(TEXT),
            "application/grpc-web-text+thrift",
        ),
    ] {
        let why = format!("{request_type} accept {accept:?}");
        let request = || {
            let r = grpc_web_no_accept(request_type, b"");
            match accept {
                Some(a) => r.header("accept", a),
                None => r,
            }
        };
        let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
        // A gRPC response, converted.
        let mut x = t.exchange(request());
        assert_eq!(x.request_headers(), Action::Continue, "{why}");
        assert_eq!(x.response_headers(grpc_response()), Action::Continue);
        assert_eq!(
            x.response_header("content-type").as_deref(),
            Some(want),
            "{why}"
        );
        // A non-gRPC answer, and one that ends with its head.
        for resp in [Response::new(503).body("down"), Response::new(503)] {
            let mut x = t.exchange(request());
            x.request_headers();
            assert_eq!(x.response_headers(resp), Action::Continue, "{why}");
            assert_eq!(
                x.response_header("content-type").as_deref(),
                Some(want),
                "{why}"
            );
        }
    }
}

#[test]
fn a_text_response_chunk_reaches_the_client_whole() {
    // A server stream's message must be decodable when its chunk is sent, not
    // when the next message (maybe much later) arrives: no byte is held back.
    let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
    let req = codec::encode(&frame(0, b"req"));
    let mut x = t.exchange(grpc_web("application/grpc-web-text", &req));
    x.request_headers();
    x.request_body_chunk(req, true);
    x.response_headers(grpc_response());
    for payload in [&b"ab"[..], b"c", b"defg"] {
        let msg = frame(0, payload); // 6, 7 and 9 bytes
        assert_eq!(x.response_body_chunk(msg.clone(), false), Action::Continue);
        let sent = x.response_body_bytes();
        assert_eq!(TextDecoder::default().push(&sent, true).unwrap(), msg);
    }
}

#[test]
fn invalid_base64_is_refused_with_a_grpc_status() {
    let mut t = FilterTest::<GrpcWeb>::configure(CORS).unwrap();
    let mut x = t.exchange(
        grpc_web("application/grpc-web-text", b"AAAA!!!!")
            .header("origin", "https://app.example.com"),
    );
    assert_eq!(x.request_headers(), Action::Continue);
    let Action::Respond(r) = x.request_body_chunk(b"AAAA!!!!".to_vec(), true) else {
        panic!("not refused")
    };
    assert_eq!(r.status, 400);
    assert_eq!(r.header_value("grpc-status"), Some(&b"3"[..]));
    assert_eq!(
        r.header_value("content-type"),
        Some(&b"application/grpc-web-text+proto"[..])
    );
    assert_eq!(
        r.header_value("access-control-allow-origin"),
        Some(&b"https://app.example.com"[..])
    );
    assert_eq!(
        counter(&t, "grpc_web_rejected_total", "invalid_base64"),
        Some(1)
    );
}

#[test]
fn a_trailers_only_response_passes_as_headers() {
    let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
    let mut x = t.exchange(grpc_web("application/grpc-web", &frame(0, b"x")));
    x.request_headers();
    let resp = Response::new(200)
        .header("content-type", "application/grpc")
        .header("content-length", "0")
        .header("grpc-status", "5")
        .header("grpc-message", "not found");
    assert_eq!(x.response_headers(resp), Action::Continue);
    assert_eq!(x.response_header("grpc-status").as_deref(), Some("5"));
    // Removed from every response to a converted request, as Envoy's
    // `encodeHeaders` does.
    assert_eq!(x.response_header("content-length"), None);
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("application/grpc-web+proto")
    );
    assert_eq!(
        counter(&t, "grpc_web_responses_total", "trailers_only"),
        Some(1)
    );
    assert_eq!(
        counter(&t, "grpc_web_responses_total", "trailer_frame"),
        Some(0)
    );
}

#[test]
fn a_non_grpc_answer_keeps_its_status_and_gets_a_grpc_status_in_its_head() {
    // Envoy's shape (`setTransformedNonProtoEncodedResponseHeaders`): the
    // HTTP status stays, `grpc-status` mapped from it and the body as
    // `grpc-message` go in the head, and the body is emptied.
    let mut t = FilterTest::<GrpcWeb>::configure(CORS).unwrap();
    let mut x = t.exchange(
        grpc_web("application/grpc-web+proto", &frame(0, b"x"))
            .header("origin", "https://app.example.com"),
    );
    x.request_headers();
    let resp = Response::new(502)
        .header("content-type", "text/plain; charset=utf-8")
        .header("content-length", "25")
        .body("upstream_connect_failure\n");
    assert_eq!(x.response_headers(resp), Action::Continue);
    // The page is buffered (the head held) and converted in its one body call.
    assert_eq!(x.body_mode(Direction::Response), BodyMode::Buffered);
    assert_eq!(
        x.response_header("access-control-allow-origin").as_deref(),
        Some("https://app.example.com")
    );
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.status(), Some(502));
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("application/grpc-web+proto")
    );
    assert_eq!(x.response_header("grpc-status").as_deref(), Some("14"));
    // The body as it is, less its final newline (the host's local replies
    // end with one), percent-encoded: no prefix, nothing trimmed.
    assert_eq!(
        x.response_header("grpc-message").as_deref(),
        Some("upstream_connect_failure")
    );
    // The host sets the length of the (empty) body the buffered call left.
    assert_eq!(x.response_header("content-length").as_deref(), Some("0"));
    assert_eq!(x.response_body_bytes(), b"");
    assert_eq!(counter(&t, "grpc_web_responses_total", "not_grpc"), Some(1));
    assert_eq!(
        counter(&t, "grpc_web_responses_total", "trailer_frame"),
        Some(0)
    );

    // -text: the same head (no body to encode).
    let mut x = t.exchange(grpc_web("application/grpc-web-text", b"AAAA"));
    x.request_headers();
    let resp = Response::new(504)
        .header("content-type", "text/plain")
        .body("upstream_timeout\n");
    assert_eq!(x.response_headers(resp), Action::Continue);
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.status(), Some(504));
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("application/grpc-web-text+proto")
    );
    assert_eq!(x.response_header("grpc-status").as_deref(), Some("14"));
    assert_eq!(
        x.response_header("grpc-message").as_deref(),
        Some("upstream_timeout")
    );
    assert_eq!(x.response_body_bytes(), b"");
}

#[test]
fn the_message_is_the_body_as_envoy_builds_it_up_to_16_kib() {
    // As it is: spaces and inner newlines kept, bytes outside printable
    // ASCII and `%` percent-encoded; one final newline left out.
    assert_eq!(
        status_fields(503, b"  100% down\r\n\n"),
        ("14".to_owned(), "  100%25 down%0D%0A".to_owned())
    );
    assert_eq!(
        status_fields(404, "dé".as_bytes()),
        ("12".to_owned(), "d%C3%A9".to_owned())
    );
    // An empty body: an empty message, as Envoy sets it.
    assert_eq!(status_fields(500, b""), ("2".to_owned(), String::new()));
    // Envoy's `MAX_BUFFERED_PLAINTEXT_LENGTH`: the first 16 KiB.
    assert_eq!(MAX_MESSAGE, 16384);

    let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
    let mut x = t.exchange(grpc_web("application/grpc-web", &frame(0, b"x")));
    x.request_headers();
    let mut page = vec![b'a'; MAX_MESSAGE - 1];
    page.extend_from_slice(b"bcdef");
    let resp = Response::new(503)
        .header("content-type", "text/html")
        .body(page.clone());
    assert_eq!(x.response_headers(resp), Action::Continue);
    assert_eq!(x.response_body(), Action::Continue);
    let message = x.response_header("grpc-message").unwrap();
    assert_eq!(message.len(), MAX_MESSAGE);
    assert_eq!(message.as_bytes(), &page[..MAX_MESSAGE]);
    assert!(message.ends_with("ab"), "{}", &message[MAX_MESSAGE - 4..]);
}

#[test]
fn a_non_200_answer_with_a_grpc_content_type_is_converted_as_envoy() {
    // Envoy's grpc_web filter reads an answer as gRPC only with status 200
    // (`isGrpcResponseHeaders`, `isProtoEncodedGrpcWebResponseHeaders`): a
    // `503` labelled `application/grpc` (some proxy's error page) is
    // converted like any non-gRPC answer, its status mapped from the HTTP
    // status (Envoy overwrites the `grpc-status` it carried).
    for content_type in [
        "application/grpc",
        "application/grpc+proto",
        "application/grpc-web+proto",
    ] {
        let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
        let mut x = t.exchange(grpc_web("application/grpc-web", &frame(0, b"x")));
        x.request_headers();
        let resp = Response::new(503)
            .header("content-type", content_type)
            .header("grpc-status", "8")
            .header("grpc-message", "from the head")
            .body("overloaded")
            .trailer("grpc-status", "4")
            .trailer("grpc-message", "from the trailers");
        assert_eq!(x.response_headers(resp), Action::Continue, "{content_type}");
        assert_eq!(
            x.body_mode(Direction::Response),
            BodyMode::Buffered,
            "{content_type}"
        );
        assert_eq!(x.response_body(), Action::Continue, "{content_type}");
        assert_eq!(x.status(), Some(503), "{content_type}");
        assert_eq!(
            x.response_header("content-type").as_deref(),
            Some("application/grpc-web+proto")
        );
        // One status, mapped from the HTTP status, in the head (Envoy
        // overwrites the head's); none left in HTTP trailers.
        assert_eq!(
            x.response_header("grpc-status").as_deref(),
            Some("14"),
            "{content_type}"
        );
        assert_eq!(
            x.response_header("grpc-message").as_deref(),
            Some("overloaded"),
            "{content_type}"
        );
        assert_eq!(x.response_trailer("grpc-status"), None, "{content_type}");
        assert_eq!(x.response_body_bytes(), b"", "{content_type}");
        assert_eq!(counter(&t, "grpc_web_responses_total", "not_grpc"), Some(1));
        assert_eq!(
            counter(&t, "grpc_web_responses_total", "trailer_frame"),
            Some(0)
        );
    }

    // A head that ends the answer with a `grpc-status` is trailers-only
    // whatever its HTTP status (`isGrpcResponseHeaders` with `end_stream`):
    // it passes as gRPC, its status the upstream's, not one mapped from 503.
    let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
    let mut x = t.exchange(grpc_web("application/grpc-web", &frame(0, b"x")));
    x.request_headers();
    let resp = Response::new(503)
        .header("content-type", "application/grpc")
        .header("grpc-status", "8")
        .header("grpc-message", "too many");
    assert_eq!(x.response_headers(resp), Action::Continue);
    assert_eq!(x.status(), Some(503));
    assert_eq!(x.response_header("grpc-status").as_deref(), Some("8"));
    assert_eq!(
        x.response_header("grpc-message").as_deref(),
        Some("too many")
    );
    assert_eq!(
        x.response_header("content-type").as_deref(),
        Some("application/grpc-web+proto")
    );
    assert_eq!(
        counter(&t, "grpc_web_responses_total", "trailers_only"),
        Some(1)
    );
    assert_eq!(counter(&t, "grpc_web_responses_total", "not_grpc"), Some(0));
}

#[test]
fn a_compressed_non_grpc_answer_loses_its_coding_with_its_page() {
    let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
    let mut x = t.exchange(grpc_web("application/grpc-web", &frame(0, b"x")));
    x.request_headers();
    let resp = Response::new(502)
        .header("content-type", "text/html")
        .header("content-encoding", "gzip")
        .body(vec![0x1f, 0x8b, 8, 0, 0xff, 0xfe]);
    assert_eq!(x.response_headers(resp), Action::Continue);
    assert_eq!(x.response_body(), Action::Continue);
    assert_eq!(x.response_header("content-encoding"), None);
    assert_eq!(x.response_header("grpc-status").as_deref(), Some("14"));
    assert_eq!(x.response_header("grpc-message").as_deref(), Some(""));
    assert_eq!(x.response_body_bytes(), b"");
}

#[test]
fn the_filters_own_answers_carry_every_cors_field() {
    // A credentialed request (`withCredentials`) can read an answer only with
    // `access-control-allow-credentials`; `vary` keeps caches per origin.
    let cfg =
        r#"{"cors": {"allowed_origins": ["https://app.example.com"], "allow_credentials": true}}"#;
    let mut t = FilterTest::<GrpcWeb>::configure(cfg).unwrap();
    let check = |r: &legate_sdk::LocalResponse| {
        assert_eq!(
            r.header_value("access-control-allow-origin"),
            Some(&b"https://app.example.com"[..])
        );
        assert_eq!(
            r.header_value("access-control-allow-credentials"),
            Some(&b"true"[..])
        );
        assert_eq!(r.header_value("vary"), Some(&b"origin"[..]));
    };
    // Refused: not base64.
    let mut x = t.exchange(
        grpc_web("application/grpc-web-text", b"AAAA!!!!")
            .header("origin", "https://app.example.com"),
    );
    x.request_headers();
    let Action::Respond(r) = x.request_body_chunk(b"AAAA!!!!".to_vec(), true) else {
        panic!("not refused")
    };
    check(&r);
}

#[test]
fn an_answer_ending_with_its_head_without_a_status_passes_as_envoy() {
    // Envoy's `encodeHeaders` continues on `end_stream`: a body-less answer
    // with no `grpc-status` keeps its status and gets none; only its content
    // type (the client's) and length change, as for every answer.
    let mut t = FilterTest::<GrpcWeb>::configure(CORS).unwrap();
    for (status, req) in [
        (404, grpc_web("application/grpc-web-text", b"")),
        (503, grpc_web("application/grpc-web", &frame(0, b"x"))),
        (200, grpc_web("application/grpc-web", &frame(0, b"x"))),
    ] {
        let mut x = t.exchange(req.header("origin", "https://app.example.com"));
        x.request_headers();
        let resp = Response::new(status)
            .header("content-type", "text/plain")
            .header("content-length", "0");
        assert_eq!(x.response_headers(resp), Action::Continue, "{status}");
        assert_eq!(x.status(), Some(status));
        assert_eq!(x.response_header("grpc-status"), None, "{status}");
        assert_eq!(x.response_header("grpc-message"), None, "{status}");
        assert_eq!(x.response_header("content-length"), None, "{status}");
        assert!(x
            .response_header("content-type")
            .is_some_and(|ct| ct.starts_with("application/grpc-web")));
        assert_eq!(
            x.response_header("access-control-allow-origin").as_deref(),
            Some("https://app.example.com")
        );
    }
    assert_eq!(
        counter(&t, "grpc_web_responses_total", "no_status"),
        Some(3)
    );
    assert_eq!(counter(&t, "grpc_web_responses_total", "not_grpc"), Some(0));
}

#[test]
fn other_requests_are_untouched_and_the_filter_detaches() {
    // With CORS the method is read first (for preflights); without, only for
    // a gRPC-Web content type: both must leave the same requests alone.
    for config in [CORS, "{}"] {
        other_requests_untouched(config);
    }
}

fn other_requests_untouched(config: &str) {
    let mut t = FilterTest::<GrpcWeb>::configure(config).unwrap();
    for req in [
        Request::post("/api", "{}").header("content-type", "application/json"),
        Request::post("/pkg.Svc/M", "x").header("content-type", "application/grpc"),
        // The one request without a path, which Envoy does not convert.
        Request::new("CONNECT", "").header("content-type", "application/grpc-web"),
        // A plain OPTIONS (no preflight headers).
        Request::new("OPTIONS", "/").header("origin", "https://app.example.com"),
    ] {
        let before = format!("{req:?}");
        let mut x = t.exchange(req);
        let headers = x.request_headers_list();
        assert_eq!(x.request_headers(), Action::Continue, "{before}");
        assert_eq!(x.request_headers_list(), headers, "{before}");
        // No more calls for the exchange (bodies, response, done): its
        // context is gone at once.
        assert!(x.detached(), "{before}");
        x.response_headers(Response::new(200).header("content-type", "application/json"));
        assert_eq!(x.response_header("access-control-allow-origin"), None);
    }
    assert_eq!(t.live_contexts(), 0);
    assert_eq!(counter(&t, "grpc_web_requests_total", "binary"), Some(0));
}

#[test]
fn the_content_type_decides_whatever_the_method() {
    // As Envoy's grpc_web filter (`isGrpcWebRequest` reads the content type,
    // and the method not at all): a gRPC-Web request that is not a POST is
    // converted too, with CORS on or off.
    for config in [CORS, "{}"] {
        let mut t = FilterTest::<GrpcWeb>::configure(config).unwrap();
        for method in ["GET", "PUT", "OPTIONS"] {
            let body = codec::encode(&frame(0, b"x"));
            let mut x = t.exchange(
                Request::new(method, "/pkg.Svc/M")
                    .header("content-type", "application/grpc-web-text")
                    .header("origin", "https://app.example.com")
                    .header("content-length", body.len().to_string())
                    .body(body.clone()),
            );
            assert_eq!(x.request_headers(), Action::Continue, "{method}");
            assert!(!x.detached(), "{method}");
            assert_eq!(
                x.request_header("content-type").as_deref(),
                Some("application/grpc"),
                "{method}"
            );
            assert_eq!(x.request_header("te").as_deref(), Some("trailers"));
            assert_eq!(x.request_header("content-length"), None, "{method}");
            assert_eq!(x.request_body(), Action::Continue, "{method}");
            assert_eq!(x.request_body_bytes(), frame(0, b"x"), "{method}");
            x.response_headers(grpc_response());
            assert_eq!(
                x.response_header("content-type").as_deref(),
                Some("application/grpc-web+proto"),
                "{method}"
            );
        }
        assert_eq!(counter(&t, "grpc_web_requests_total", "text"), Some(3));
    }
    // A preflight is still a preflight: answered, not converted, even with
    // a gRPC-Web content type.
    let mut t = FilterTest::<GrpcWeb>::configure(CORS).unwrap();
    let mut x = t.exchange(
        Request::new("OPTIONS", "/pkg.Svc/M")
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "POST")
            .header("content-type", "application/grpc-web"),
    );
    let Action::Respond(r) = x.request_headers() else {
        panic!("preflight not answered")
    };
    assert_eq!(r.status, 204);
    assert_eq!(counter(&t, "grpc_web_requests_total", "binary"), Some(0));
}

#[test]
fn cors_preflights_from_allowed_origins_are_answered_locally() {
    let mut t = FilterTest::<GrpcWeb>::configure(CORS).unwrap();
    let preflight = |origin: &str| {
        Request::new("OPTIONS", "/pkg.Svc/M")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
    };
    let mut x = t.exchange(preflight("https://app.example.com"));
    let Action::Respond(r) = x.request_headers() else {
        panic!("preflight not answered")
    };
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header_value("access-control-allow-origin"),
        Some(&b"https://app.example.com"[..])
    );
    assert_eq!(
        r.header_value("access-control-max-age"),
        Some(&b"86400"[..])
    );
    assert_eq!(r.header_value("vary"), Some(&b"origin"[..]));
    let allowed = String::from_utf8(
        r.header_value("access-control-allow-headers")
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(
        allowed.contains("x-grpc-web") && allowed.contains("grpc-timeout"),
        "{allowed}"
    );

    // Another origin: as Envoy's cors filter, the preflight passes on
    // untouched (to the next filter or the upstream), and nothing this
    // filter adds lets the browser make the call.
    let mut x = t.exchange(preflight("https://evil.example"));
    let headers = x.request_headers_list();
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_headers_list(), headers);
    assert!(x.detached());
    x.response_headers(Response::new(204).header("allow", "OPTIONS, POST"));
    assert_eq!(x.response_header("access-control-allow-origin"), None);
    assert_eq!(x.response_header("allow").as_deref(), Some("OPTIONS, POST"));
    drop(x);
    assert_eq!(counter(&t, "grpc_web_preflights_total", "allowed"), Some(1));
    assert_eq!(counter(&t, "grpc_web_preflights_total", "denied"), Some(1));

    // Without `cors`, a preflight is not this filter's business.
    let mut t = FilterTest::<GrpcWeb>::configure("{}").unwrap();
    let mut x = t.exchange(preflight("https://app.example.com"));
    assert_eq!(x.request_headers(), Action::Continue);
}

#[test]
fn converted_responses_carry_cors_headers_for_allowed_origins() {
    let mut t = FilterTest::<GrpcWeb>::configure(CORS).unwrap();
    let mut x = t.exchange(
        grpc_web("application/grpc-web", &frame(0, b"x"))
            .header("origin", "https://app.example.com"),
    );
    x.request_headers();
    x.response_headers(grpc_response());
    assert_eq!(
        x.response_header("access-control-allow-origin").as_deref(),
        Some("https://app.example.com")
    );
    assert_eq!(
        x.response_header("access-control-expose-headers")
            .as_deref(),
        Some("grpc-status,grpc-message")
    );

    let mut x = t.exchange(
        grpc_web("application/grpc-web", &frame(0, b"x")).header("origin", "https://evil.example"),
    );
    x.request_headers();
    x.response_headers(grpc_response());
    assert_eq!(x.response_header("access-control-allow-origin"), None);
}

#[test]
fn base64_round_trips_across_any_chunking() {
    let data: Vec<u8> = (0..=255u8).chain(0..17).collect();
    let encoded = codec::encode(&data);
    for size in 1..=9 {
        let mut dec = TextDecoder::default();
        let mut back = Vec::new();
        let chunks: Vec<&[u8]> = encoded.chunks(size).collect();
        for (i, c) in chunks.iter().enumerate() {
            back.extend(dec.push(c, i == chunks.len() - 1).unwrap());
        }
        assert_eq!(back, data, "decode in chunks of {size}");
    }
    // Independently padded strings back to back (one per message) decode too.
    let mut two = codec::encode(b"a");
    two.extend(codec::encode(b"bc"));
    assert_eq!(TextDecoder::default().push(&two, true).unwrap(), b"abc");
    // A truncated body or a bad character is an error with its offset.
    assert_eq!(TextDecoder::default().push(b"QUJD", false).unwrap(), b"ABC");
    assert_eq!(
        TextDecoder::default()
            .push(b"QUJDQ", true)
            .unwrap_err()
            .offset,
        4
    );
    assert_eq!(
        TextDecoder::default()
            .push(b"QUJD*A==", true)
            .unwrap_err()
            .offset,
        4
    );
    assert!(TextDecoder::default().push(b"Q===", true).is_err());
}
