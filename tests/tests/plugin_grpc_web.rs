//! plugins/grpc-web, built by `legate plugin build`, in the real host between a
//! client speaking gRPC-Web (requests framed here, as grpc-web clients frame
//! them) and a real tonic gRPC server over HTTP/2 (`legate_tests::grpc`), over
//! HTTP/1.1 and HTTP/2 downstream.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use legate_tests::grpc::{frame, grpc_upstream, pb, unframe, GrpcUpstreamHandle, Message};
use legate_tests::plugins::plugin_wasm;
use legate_tests::*;

const ORIGIN: &str = "https://app.example.com";

/// Listener `web`: `/echo/*` to a plain HTTP echo upstream, the rest to the
/// gRPC server (cluster over h2 prior knowledge), all through the plugin.
fn config(grpc: SocketAddr, echo: SocketAddr) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: grpc-web }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: /echo/ }}
            cluster: echo
          - match: {{ prefix: / }}
            cluster: grpc
clusters:
  - name: grpc
    protocol: h2
    endpoints:
      - address: {grpc}
  - name: echo
    endpoints:
      - address: {echo}
plugins:
  - name: grpc-web
    module: {wasm}
    limits: {{ cpu: 500ms }}
    config:
      cors:
        allowed_origins: [\"{ORIGIN}\"]
        max_age_s: 600
",
        wasm = plugin_wasm("plugins/grpc-web").display(),
    )
}

struct Setup {
    lg: LegateHandle,
    grpc: GrpcUpstreamHandle,
    _echo: UpstreamHandle,
}

async fn setup() -> Setup {
    let grpc = grpc_upstream().start().await;
    let echo = upstream().start().await;
    let lg = legate().config(&config(grpc.addr, echo.addr)).start();
    Setup {
        lg,
        grpc,
        _echo: echo,
    }
}

/// A gRPC-Web call: `POST path` with `content_type`, `x-grpc-web: 1`, and the
/// (already framed, possibly base64) body.
async fn call(c: &mut Client, path: &str, content_type: &str, body: Vec<u8>) -> Resp {
    c.post(path)
        .header("content-type", content_type)
        .header("x-grpc-web", "1")
        .header("x-user-agent", "grpc-web-javascript/0.1")
        .body(body)
        .send()
        .await
}

/// The data messages and the trailer block (`name: value` lines, lower-cased
/// names) of a binary gRPC-Web response body; the trailer frame must be last.
fn split(body: &[u8]) -> (Vec<Vec<u8>>, Vec<(String, String)>) {
    let frames = unframe(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    let mut data = Vec::new();
    let mut trailers = None;
    for (flag, payload) in frames {
        assert!(trailers.is_none(), "a frame after the trailer frame");
        match flag {
            0 => data.push(payload),
            0x80 => {
                let text = String::from_utf8(payload).unwrap();
                assert!(text.ends_with("\r\n"), "{text:?}");
                let lines = text
                    .split("\r\n")
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (n, v) = l.split_once(':').unwrap();
                        (n.trim().to_ascii_lowercase(), v.trim().to_owned())
                    })
                    .collect();
                trailers = Some(lines);
            }
            f => panic!("unexpected frame flag {f:#x}"),
        }
    }
    (data, trailers.expect("no trailer frame"))
}

fn trailer<'a>(t: &'a [(String, String)], name: &str) -> Option<&'a str> {
    t.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// The response has no HTTP trailers (browsers cannot read them).
fn no_http_trailers(r: &Resp) {
    assert!(
        r.trailers.as_ref().is_none_or(|t| t.is_empty()),
        "HTTP trailers: {:?}",
        r.trailers
    );
}

fn b64(data: &[u8]) -> Vec<u8> {
    base64_ref::encode(data)
}

fn unb64(data: &[u8]) -> Vec<u8> {
    base64_ref::decode(data)
}

/// Base64 for the test's own encoding and decoding: a small independent
/// implementation (not the plugin's), so a shared bug cannot hide.
mod base64_ref {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> Vec<u8> {
        let mut bits = String::new();
        for b in data {
            bits.push_str(&format!("{b:08b}"));
        }
        while !bits.len().is_multiple_of(6) {
            bits.push('0');
        }
        let mut out: Vec<u8> = bits
            .as_bytes()
            .chunks(6)
            .map(|c| A[usize::from_str_radix(std::str::from_utf8(c).unwrap(), 2).unwrap()])
            .collect();
        while !out.len().is_multiple_of(4) {
            out.push(b'=');
        }
        out
    }

    /// Group by group, so padded strings back to back (one per response
    /// chunk) decode as gRPC-Web clients decode them.
    pub fn decode(data: &[u8]) -> Vec<u8> {
        assert!(data.len().is_multiple_of(4), "not whole groups: {data:?}");
        let mut out = Vec::new();
        for group in data.chunks(4) {
            let mut bits = String::new();
            for &c in group.iter().filter(|&&c| c != b'=') {
                let i = A
                    .iter()
                    .position(|&a| a == c)
                    .unwrap_or_else(|| panic!("not base64: {c:#x}"));
                bits.push_str(&format!("{i:06b}"));
            }
            out.extend(
                bits.as_bytes()
                    .chunks(8)
                    .filter(|c| c.len() == 8)
                    .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 2).unwrap()),
            );
        }
        out
    }
}

fn say(message: &str) -> Vec<u8> {
    frame(
        &pb::SayRequest {
            message: message.into(),
        }
        .encode_to_vec(),
    )
}

fn count(from: u32, n: u32, fail_code: i32, fail_message: &str) -> Vec<u8> {
    frame(
        &pb::CountRequest {
            from,
            count: n,
            fail_code,
            fail_message: fail_message.into(),
            delay_ms: 0,
        }
        .encode_to_vec(),
    )
}

/// The value of the plugin counter `name` with label `label="value"`.
async fn plugin_counter(lg: &LegateHandle, name: &str, label: &str) -> Option<f64> {
    let stats = lg.stats().await;
    parse_prometheus(&stats)
        .into_iter()
        .find(|(k, _)| k.starts_with(&format!("legate_plugin_{name}{{")) && k.contains(label))
        .map(|(_, v)| v)
}

each_proto!(
    async fn unary_binary_call_is_converted_both_ways(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        let r = call(
            &mut c,
            "/legate.test.v1.Echo/Say",
            "application/grpc-web+proto",
            say("hello"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc-web+proto"));
        no_http_trailers(&r);
        let (data, trailers) = split(&r.body);
        assert_eq!(data.len(), 1);
        let reply = pb::SayReply::decode(&data[0][..]).unwrap();
        assert_eq!(reply.message, "hello");
        // What the gRPC server saw: a gRPC request, as Envoy's grpc_web
        // filter sends it (`+proto` is gRPC's default codec: plain
        // `application/grpc`; no encodings named by the client: `identity`).
        let md = &reply.metadata;
        assert_eq!(
            md.get("content-type").map(String::as_str),
            Some("application/grpc")
        );
        assert_eq!(md.get("te").map(String::as_str), Some("trailers"));
        assert_eq!(
            md.get("grpc-accept-encoding").map(String::as_str),
            Some("identity")
        );
        assert_eq!(
            md.get("x-user-agent").map(String::as_str),
            Some("grpc-web-javascript/0.1")
        );
        // The client's length is removed, binary as text, as Envoy's
        // grpc_web filter removes it (`decodeHeaders`).
        assert_eq!(md.get("content-length"), None, "{md:?}");
        assert_eq!(trailer(&trailers, "grpc-status"), Some("0"));
        assert_eq!(s.grpc.calls.get(), 1);

        // `application/grpc-web` (no codec suffix) maps to `application/grpc`,
        // and is answered `+proto`, as Envoy's grpc_web filter answers.
        let r = call(
            &mut c,
            "/legate.test.v1.Echo/Say",
            "application/grpc-web",
            say("plain"),
        )
        .await;
        assert_eq!(r.header("content-type"), Some("application/grpc-web+proto"));
        let (data, trailers) = split(&r.body);
        let reply = pb::SayReply::decode(&data[0][..]).unwrap();
        assert_eq!(reply.message, "plain");
        assert_eq!(
            reply.metadata.get("content-type").map(String::as_str),
            Some("application/grpc")
        );
        assert_eq!(trailer(&trailers, "grpc-status"), Some("0"));

        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_requests_total", "variant=\"binary\"").await,
            Some(2.0)
        );
        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_responses_total", "kind=\"trailer_frame\"").await,
            Some(2.0)
        );
    }
);

each_proto!(
    async fn a_real_grpc_web_client_talks_to_a_real_grpc_server_through_legate(proto) {
        // tonic's generated client with tonic-web's client layer: the requests
        // and the response parsing are a gRPC-Web implementation's, not ours.
        let s = setup().await;
        let mut c = legate_tests::grpc::grpc_web_client(proto, s.lg.addr("web")).await;

        let reply = c
            .say(pb::SayRequest {
                message: "from a grpc-web client".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.message, "from a grpc-web client");
        // The server got gRPC, not gRPC-Web.
        assert_eq!(
            reply.metadata.get("content-type").map(String::as_str),
            Some("application/grpc")
        );

        // Server streaming: every message, then the status from the trailer frame.
        let mut stream = c
            .count(pb::CountRequest {
                from: 1,
                count: 3,
                fail_code: 0,
                fail_message: String::new(),
                delay_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while let Some(m) = stream.message().await.unwrap() {
            got.push(m.n);
        }
        assert_eq!(got, [1, 2, 3]);

        // A failure reaches the client as a gRPC status with its message, both
        // from the trailer frame (streaming) and trailers-only (unary).
        let mut stream = c
            .count(pb::CountRequest {
                from: 1,
                count: 1,
                fail_code: 9,
                fail_message: "stopped".into(),
                delay_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stream.message().await.unwrap().map(|m| m.n), Some(1));
        let err = stream.message().await.unwrap_err();
        assert_eq!((err.code(), err.message()), (tonic::Code::FailedPrecondition, "stopped"));
        let err = c
            .fail(pb::FailRequest {
                code: 5,
                message: "no such thing".into(),
            })
            .await
            .unwrap_err();
        assert_eq!((err.code(), err.message()), (tonic::Code::NotFound, "no such thing"));

        assert_eq!(s.grpc.calls.get(), 4);
        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_requests_total", "variant=\"binary\"").await,
            Some(4.0)
        );
    }
);

each_proto!(
    async fn server_streaming_sends_every_message_then_the_trailer_frame(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        let r = call(
            &mut c,
            "/legate.test.v1.Echo/Count",
            "application/grpc-web+proto",
            count(7, 5, 0, ""),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        no_http_trailers(&r);
        let (data, trailers) = split(&r.body);
        let ns: Vec<u32> = data
            .iter()
            .map(|d| pb::CountReply::decode(&d[..]).unwrap().n)
            .collect();
        assert_eq!(ns, [7, 8, 9, 10, 11]);
        assert_eq!(trailer(&trailers, "grpc-status"), Some("0"));
    }
);

each_proto!(
    async fn text_variant_is_decoded_and_encoded_across_chunks(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        // Two messages on a stream would be odd for a unary call; a streamed
        // body in 5-byte chunks (never a multiple of 4) is the point here.
        let body = b64(&say("über text"));
        let r = c
            .post("/legate.test.v1.Echo/Say")
            .header("content-type", "application/grpc-web-text")
            .header("accept", "application/grpc-web-text")
            .streamed_body(body, 5)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc-web-text+proto"));
        no_http_trailers(&r);
        let (data, trailers) = split(&unb64(&r.body));
        let reply = pb::SayReply::decode(&data[0][..]).unwrap();
        assert_eq!(reply.message, "über text");
        assert_eq!(
            reply.metadata.get("content-type").map(String::as_str),
            Some("application/grpc")
        );
        assert_eq!(trailer(&trailers, "grpc-status"), Some("0"));

        // Server streaming in text: each chunk padded base64 of its own.
        let r = c
            .post("/legate.test.v1.Echo/Count")
            .header("content-type", "application/grpc-web-text+proto")
            .header("accept", "application/grpc-web-text")
            .body(b64(&count(1, 3, 0, "")))
            .send()
            .await;
        assert_eq!(r.header("content-type"), Some("application/grpc-web-text+proto"));
        let (data, trailers) = split(&unb64(&r.body));
        assert_eq!(data.len(), 3);
        assert_eq!(trailer(&trailers, "grpc-status"), Some("0"));

        // Not base64: refused with a gRPC status the client can read.
        let r = c
            .post("/legate.test.v1.Echo/Say")
            .header("content-type", "application/grpc-web-text")
            .body("%%%%")
            .send()
            .await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.header("grpc-status"), Some("3"));
        assert_eq!(s.grpc.calls.get(), 2);
        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_requests_total", "variant=\"text\"").await,
            Some(3.0)
        );
        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_rejected_total", "reason=\"invalid_base64\"").await,
            Some(1.0)
        );
    }
);

each_proto!(
    async fn a_text_request_that_does_not_accept_text_gets_a_binary_response(proto) {
        // As Envoy's grpc_web filter: only `accept` asks for a `-text`
        // response (grpc-web's JavaScript client sends `accept:
        // application/grpc-web-text` in text mode), read as one exact value;
        // any other `accept` (a list naming the text type too), or none,
        // gets binary, whatever the request's encoding.
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        for (accept, request_type, want_type) in [
            (None, "application/grpc-web-text", "application/grpc-web+proto"),
            (
                Some("*/*"),
                "application/grpc-web-text+proto",
                "application/grpc-web+proto",
            ),
            (
                Some("application/json"),
                "application/grpc-web-text",
                "application/grpc-web+proto",
            ),
            (
                Some("application/grpc-web-text, */*"),
                "application/grpc-web-text",
                "application/grpc-web+proto",
            ),
        ] {
            let mut req = c
                .post("/legate.test.v1.Echo/Say")
                .header("content-type", request_type)
                .header("x-grpc-web", "1")
                .body(b64(&say("text in, binary out")));
            if let Some(a) = accept {
                req = req.header("accept", a);
            }
            let r = req.send().await;
            assert_eq!(r.status, 200, "{accept:?}: {}", r.text());
            assert_eq!(r.header("content-type"), Some(want_type), "{accept:?}");
            no_http_trailers(&r);
            let (data, trailers) = split(&r.body);
            let reply = pb::SayReply::decode(&data[0][..]).unwrap();
            assert_eq!(reply.message, "text in, binary out", "{accept:?}");
            assert_eq!(trailer(&trailers, "grpc-status"), Some("0"), "{accept:?}");
        }
        assert_eq!(s.grpc.calls.get(), 4);
        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_requests_total", "variant=\"text\"").await,
            Some(4.0)
        );
    }
);

/// A `-text` server stream's message reaches the client whole when the
/// upstream sends it, not with the next one: base64 bytes held back to fill a
/// group would keep it from the browser until then (here 1.5 s; forever on an
/// idle stream). Raw HTTP/1.1, the browsers' transport, to see each chunk.
#[tokio::test]
async fn a_text_stream_message_is_sent_whole_when_it_arrives() {
    let s = setup().await;
    let mut req = pb::CountRequest {
        from: 1,
        count: 2,
        fail_code: 0,
        fail_message: String::new(),
        delay_ms: 1500,
    }
    .encode_to_vec();
    req = b64(&frame(&req));
    let mut conn = RawConn::connect(s.lg.addr("web")).await;
    conn.write(
        format!(
            "POST /legate.test.v1.Echo/Count HTTP/1.1\r\nHost: web\r\n\
             content-type: application/grpc-web-text\r\nx-grpc-web: 1\r\n\
             accept: application/grpc-web-text\r\ncontent-length: {}\r\n\r\n",
            req.len()
        )
        .as_bytes(),
    )
    .await;
    conn.write(&req).await;
    let mut got = conn.read_head(HANG_GUARD).await;
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    got.drain(..end);
    // The first chunk: its size line, then that many base64 characters.
    while !got.windows(2).any(|w| w == b"\r\n") {
        got.extend(conn.read_exact(1, HANG_GUARD).await.unwrap());
    }
    let line = got.windows(2).position(|w| w == b"\r\n").unwrap();
    let size = usize::from_str_radix(std::str::from_utf8(&got[..line]).unwrap(), 16).unwrap();
    got.drain(..line + 2);
    if got.len() < size {
        got.extend(conn.read_exact(size - got.len(), HANG_GUARD).await.unwrap());
    }
    let first = unb64(&got[..size]);
    let want = frame(&pb::CountReply { n: 1 }.encode_to_vec());
    assert_eq!(first, want, "the first message, whole, in the first chunk");
}

each_proto!(
    async fn failures_carry_the_status_in_the_trailer_frame_or_the_headers(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        // A stream that fails after one message: the status is in the trailer frame.
        let r = call(
            &mut c,
            "/legate.test.v1.Echo/Count",
            "application/grpc-web+proto",
            count(1, 1, 9, "not now"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        no_http_trailers(&r);
        let (data, trailers) = split(&r.body);
        assert_eq!(data.len(), 1);
        assert_eq!(trailer(&trailers, "grpc-status"), Some("9"));
        // grpc-message is percent-encoded on the wire (gRPC over HTTP/2).
        assert_eq!(trailer(&trailers, "grpc-message"), Some("not%20now"));

        // A unary failure: tonic answers trailers-only, which passes as headers.
        let r = call(
            &mut c,
            "/legate.test.v1.Echo/Fail",
            "application/grpc-web+proto",
            frame(
                &pb::FailRequest {
                    code: 5,
                    message: "no such thing".into(),
                }
                .encode_to_vec(),
            ),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("grpc-status"), Some("5"));
        assert_eq!(r.header("grpc-message"), Some("no%20such%20thing"));
        assert_eq!(r.header("content-type"), Some("application/grpc-web+proto"));
        assert!(r.body.is_empty(), "{:?}", r.body);
        no_http_trailers(&r);
        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_responses_total", "kind=\"trailers_only\"").await,
            Some(1.0)
        );
    }
);

each_proto!(
    async fn cors_preflight_is_answered_or_passed_on_and_responses_carry_cors_headers(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        let r = c
            .request(Method::OPTIONS, "/legate.test.v1.Echo/Say")
            .header("origin", ORIGIN)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,x-grpc-web")
            .send()
            .await;
        assert_eq!(r.status, 204, "{}", r.text());
        assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
        assert_eq!(r.header("access-control-max-age"), Some("600"));
        let allowed = r.header("access-control-allow-headers").unwrap();
        for h in ["content-type", "x-grpc-web", "x-user-agent", "grpc-timeout"] {
            assert!(allowed.contains(h), "{h} not in {allowed}");
        }
        assert!(r
            .header("access-control-allow-methods")
            .unwrap()
            .contains("POST"));

        // Another origin's preflight is not the plugin's to answer: as
        // Envoy's cors filter, it passes on untouched (here to the echo
        // upstream), with no CORS headers from the plugin.
        let r = c
            .request(Method::OPTIONS, "/echo/x")
            .header("origin", "https://evil.example")
            .header("access-control-request-method", "POST")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.echo().method, "OPTIONS");
        assert_eq!(r.echo().header("origin"), Some("https://evil.example"));
        assert_eq!(r.header("access-control-allow-origin"), None);
        assert_eq!(s.grpc.calls.get(), 0, "a preflight reached the gRPC upstream");

        // The call itself: CORS headers so the script can read the status.
        let r = c
            .post("/legate.test.v1.Echo/Say")
            .header("origin", ORIGIN)
            .header("content-type", "application/grpc-web+proto")
            .body(say("x"))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
        assert_eq!(
            r.header("access-control-expose-headers"),
            Some("grpc-status,grpc-message")
        );
        // From a foreign origin: converted, but no CORS headers.
        let r = c
            .post("/legate.test.v1.Echo/Say")
            .header("origin", "https://evil.example")
            .header("content-type", "application/grpc-web+proto")
            .body(say("x"))
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("access-control-allow-origin"), None);
        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_preflights_total", "outcome=\"allowed\"").await,
            Some(1.0)
        );
        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_preflights_total", "outcome=\"denied\"").await,
            Some(1.0)
        );
    }
);

each_proto!(
    async fn a_dead_upstream_is_unavailable_in_the_head_of_its_502(proto) {
        // No gRPC server: the host's own 502 goes through the plugin's
        // response phases, which give it Envoy's shape: the 502 stays, the
        // gRPC status mapped from it and the cause go in the head, the body
        // goes.
        let echo = upstream().start().await;
        let lg = legate()
            .config(&config(closed_port_addr(), echo.addr))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = c
            .post("/legate.test.v1.Echo/Say")
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("origin", ORIGIN)
            .body(say("hi"))
            .send()
            .await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some("application/grpc-web+proto")
        );
        assert_eq!(r.header("grpc-status"), Some("14"));
        assert_eq!(r.header("grpc-message"), Some("upstream_connect_failure"));
        assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
        assert!(r.body.is_empty(), "{:?}", r.body);
        no_http_trailers(&r);

        // -text: the same head, no body to encode.
        let r = c
            .post("/legate.test.v1.Echo/Say")
            .header("content-type", "application/grpc-web-text")
            .header("accept", "application/grpc-web-text")
            .body(b64(&say("hi")))
            .send()
            .await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc-web-text+proto"));
        assert_eq!(r.header("grpc-status"), Some("14"));
        assert_eq!(r.header("grpc-message"), Some("upstream_connect_failure"));
        assert!(r.body.is_empty(), "{:?}", r.body);

        // A real gRPC-Web client (tonic-web's) reads the status from the head.
        let mut web = legate_tests::grpc::grpc_web_client(proto, lg.addr("web")).await;
        let err = web
            .say(pb::SayRequest {
                message: "hi".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (tonic::Code::Unavailable, "upstream_connect_failure")
        );

        assert_eq!(
            plugin_counter(&lg, "grpc_web_responses_total", "kind=\"not_grpc\"").await,
            Some(3.0)
        );
        lg.assert_stat(
            r#"legate_plugin_calls_total{plugin="grpc-web",phase="response_headers"}"#,
            3.0,
        )
        .await;
        lg.assert_stat(
            r#"legate_plugin_calls_total{plugin="grpc-web",phase="response_body"}"#,
            3.0,
        )
        .await;
        lg.assert_stat(
            r#"legate_listener_requests_total{listener="web",class="5xx"}"#,
            3.0,
        )
        .await;
    }
);

/// An upstream standing in for an HTTP server or proxy that does not answer
/// gRPC: `/echo/page` a `503` HTML page, `/echo/big` a `503` page of 20 000
/// bytes, `/echo/empty` a body-less `404`.
async fn error_pages() -> UpstreamHandle {
    upstream()
        .http1()
        .handler(|req: Request<Incoming>| async move {
            let (status, body) = match req.uri().path() {
                "/echo/page" => (503, Bytes::from_static(b"<h1>Service  Unavailable</h1>\n")),
                "/echo/big" => (503, Bytes::from(vec![b'x'; 20_000])),
                _ => (404, Bytes::new()),
            };
            let mut r = Response::new(Full::new(body));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("text/html"));
            r
        })
        .start()
        .await
}

each_proto!(
    async fn a_non_grpc_answer_keeps_its_status_with_the_grpc_status_in_its_head(proto) {
        // As Envoy's grpc_web filter: the HTTP status stays, `grpc-status`
        // (mapped from it) and `grpc-message` (the body, up to 16 KiB) go in
        // the head, the body goes; an answer that ends with its head and has
        // no `grpc-status` passes without one. Also for the host's own
        // answers: a route timeout's 504.
        let grpc = grpc_upstream().start().await;
        let pages = error_pages().await;
        let slow = upstream().delay(std::time::Duration::from_secs(30)).start().await;
        let yaml = config(grpc.addr, pages.addr)
            .replace(
                "          - match: { prefix: / }\n",
                "          - match: { prefix: /slow/ }\n            cluster: slow\n            \
                 timeout: 200ms\n          - match: { prefix: / }\n",
            )
            .replace(
                "  - name: echo\n",
                &format!(
                    "  - name: slow\n    endpoints:\n      - address: {}\n  - name: echo\n",
                    slow.addr
                ),
            );
        assert!(yaml.contains("/slow/"), "{yaml}");
        let lg = legate().config(&yaml).start();
        let mut c = client(proto, lg.addr("web")).await;

        let r = c
            .post("/echo/page")
            .header("content-type", "application/grpc-web+proto")
            .header("origin", ORIGIN)
            .body(say("x"))
            .send()
            .await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc-web+proto"));
        assert_eq!(r.header("grpc-status"), Some("14"));
        assert_eq!(
            r.header("grpc-message"),
            Some("<h1>Service  Unavailable</h1>")
        );
        assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
        assert!(r.body.is_empty(), "{:?}", r.body);
        no_http_trailers(&r);

        // -text: the same head.
        let r = c
            .post("/echo/page")
            .header("content-type", "application/grpc-web-text")
            .header("accept", "application/grpc-web-text")
            .body(b64(&say("x")))
            .send()
            .await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc-web-text+proto"));
        assert_eq!(r.header("grpc-status"), Some("14"));
        assert!(r.body.is_empty(), "{:?}", r.body);

        // The message is the page's first 16 KiB.
        let r = call(&mut c, "/echo/big", "application/grpc-web+proto", say("x")).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("grpc-message"), Some("x".repeat(16384).as_str()));
        assert!(r.body.is_empty(), "{:?}", r.body.len());

        // A body-less 404: passed, no status added.
        let r = call(&mut c, "/echo/empty", "application/grpc-web+proto", say("x")).await;
        assert_eq!(r.status, 404, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc-web+proto"));
        assert_eq!(r.header("grpc-status"), None, "{:?}", r.headers);
        assert_eq!(r.header("grpc-message"), None, "{:?}", r.headers);
        assert!(r.body.is_empty(), "{:?}", r.body);

        // The host's 504: its cause as the message.
        let r = call(&mut c, "/slow/x", "application/grpc-web+proto", say("x")).await;
        assert_eq!(r.status, 504, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc-web+proto"));
        assert_eq!(r.header("grpc-status"), Some("14"));
        assert_eq!(r.header("grpc-message"), Some("upstream_timeout"));
        assert!(r.body.is_empty(), "{:?}", r.body);

        assert_eq!(
            plugin_counter(&lg, "grpc_web_responses_total", "kind=\"not_grpc\"").await,
            Some(4.0)
        );
        assert_eq!(
            plugin_counter(&lg, "grpc_web_responses_total", "kind=\"no_status\"").await,
            Some(1.0)
        );
    }
);

each_proto!(
    async fn other_requests_pass_untouched(proto) {
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        let r = c
            .post("/echo/json")
            .header("content-type", "application/json")
            .body("{\"a\":1}")
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.header("content-type"), Some("application/json"));
        assert_eq!(e.header("te"), None);
        assert_eq!(e.body, "{\"a\":1}");
        assert_eq!(r.header("access-control-allow-origin"), None);
        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_requests_total", "variant=\"binary\"").await,
            Some(0.0)
        );
    }
);

each_proto!(
    async fn a_content_type_in_another_case_is_not_grpc_web(proto) {
        // Envoy's grpc_web filter matches the four lower-case types exactly:
        // `Application/grpc-web+proto` is not gRPC-Web and passes untouched
        // (as the client sent it, its length kept), its answer unconverted.
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        let body = say("hello");
        let len = body.len().to_string();
        let r = call(&mut c, "/echo/Say", "Application/grpc-web+proto", body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        assert_eq!(e.header("content-type"), Some("Application/grpc-web+proto"));
        assert_eq!(e.header("te"), None);
        assert_eq!(e.header("grpc-accept-encoding"), None);
        assert_eq!(e.header("content-length"), Some(len.as_str()));
        assert_eq!(r.header("content-type"), Some("application/json"));

        // To the gRPC server: unconverted both ways. tonic does not check
        // the content type and answers gRPC, which the client gets as it is
        // (its status in HTTP trailers, which a browser cannot read).
        let r = call(
            &mut c,
            "/legate.test.v1.Echo/Say",
            "application/GRPC-WEB",
            say("hello"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc"));
        let frames = unframe(&r.body).unwrap();
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].0, 0, "a plain gRPC message, no trailer frame");
        let reply = pb::SayReply::decode(&frames[0].1[..]).unwrap();
        assert_eq!(
            reply.metadata.get("content-type").map(String::as_str),
            Some("application/GRPC-WEB")
        );
        assert_eq!(reply.metadata.get("te"), None);
        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_requests_total", "variant=\"binary\"").await,
            Some(0.0)
        );
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_grpc_passes_untouched_with_its_trailers() {
    let s = setup().await;
    let mut c = client(Proto::H2, s.lg.addr("web")).await;
    let r = c
        .post("/legate.test.v1.Echo/Count")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(count(3, 2, 0, ""))
        .send()
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/grpc"));
    let frames = unframe(&r.body).unwrap();
    assert_eq!(frames.len(), 2);
    assert!(frames.iter().all(|(flag, _)| *flag == 0));
    assert_eq!(r.trailer("grpc-status"), Some("0"));
}

/// An upstream (standing in for a proxy between Legate and the gRPC server)
/// whose errors carry a gRPC content type: `/echo/overloaded` is a `503`
/// `application/grpc` with a page and a `grpc-status` in its head,
/// `/echo/trailers-only` a body-less `503` with `grpc-status: 8`.
async fn grpc_labelled_errors() -> UpstreamHandle {
    upstream()
        .http1()
        .handler(|req: Request<Incoming>| async move {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            let h = r.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from_static("8"));
            if req.uri().path() == "/echo/overloaded" {
                h.insert(
                    "grpc-message",
                    HeaderValue::from_static("from%20the%20head"),
                );
                *r.body_mut() = Full::new(Bytes::from_static(b"overloaded"));
            } else {
                h.insert("grpc-message", HeaderValue::from_static("too%20many"));
            }
            r
        })
        .start()
        .await
}

each_proto!(
    async fn a_non_200_answer_with_a_grpc_content_type_is_converted_as_envoy(proto) {
        // Envoy's grpc_web filter reads an answer as gRPC only with status 200
        // (`isGrpcResponseHeaders`): a 503 labelled `application/grpc` with a
        // body is converted like any error page, its status mapped from the
        // HTTP status (not the `grpc-status` it carried, which Envoy
        // overwrites); one that ends with its head and carries a
        // `grpc-status` is trailers-only whatever its status, and passes.
        let grpc = grpc_upstream().start().await;
        let errors = grpc_labelled_errors().await;
        let lg = legate().config(&config(grpc.addr, errors.addr)).start();
        let mut c = client(proto, lg.addr("web")).await;
        let r = call(&mut c, "/echo/overloaded", "application/grpc-web+proto", say("x")).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc-web+proto"));
        assert_eq!(r.header("grpc-status"), Some("14"), "{:?}", r.headers);
        assert_eq!(r.header("grpc-message"), Some("overloaded"), "{:?}", r.headers);
        assert!(r.body.is_empty(), "{:?}", r.body);
        no_http_trailers(&r);

        let r = call(&mut c, "/echo/trailers-only", "application/grpc-web+proto", say("x")).await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("grpc-status"), Some("8"));
        assert_eq!(r.header("grpc-message"), Some("too%20many"));
        assert_eq!(r.header("content-type"), Some("application/grpc-web+proto"));
        assert!(r.body.is_empty(), "{:?}", r.body);

        assert_eq!(
            plugin_counter(&lg, "grpc_web_responses_total", "kind=\"not_grpc\"").await,
            Some(1.0)
        );
        assert_eq!(
            plugin_counter(&lg, "grpc_web_responses_total", "kind=\"trailers_only\"").await,
            Some(1.0)
        );
    }
);

each_proto!(
    async fn the_content_type_decides_whatever_the_method(proto) {
        // Envoy's grpc_web filter converts by content type alone
        // (`isGrpcWebRequest`): a gRPC-Web GET or PUT is converted as a POST.
        let s = setup().await;
        let mut c = client(proto, s.lg.addr("web")).await;
        for method in [Method::GET, Method::PUT] {
            let r = c
                .request(method.clone(), "/legate.test.v1.Echo/Say")
                .header("content-type", "application/grpc-web-text")
                .header("accept", "application/grpc-web-text")
                .body(b64(&say("not a post")))
                .send()
                .await;
            assert_eq!(r.status, 200, "{method}: {}", r.text());
            assert_eq!(
                r.header("content-type"),
                Some("application/grpc-web-text+proto"),
                "{method}"
            );
            let (data, trailers) = split(&unb64(&r.body));
            let reply = pb::SayReply::decode(&data[0][..]).unwrap();
            assert_eq!(reply.message, "not a post", "{method}");
            let md = &reply.metadata;
            assert_eq!(
                md.get("content-type").map(String::as_str),
                Some("application/grpc"),
                "{method}"
            );
            assert_eq!(md.get("te").map(String::as_str), Some("trailers"));
            assert_eq!(trailer(&trailers, "grpc-status"), Some("0"), "{method}");
        }
        assert_eq!(s.grpc.calls.get(), 2);
        // A preflight is still answered, not converted.
        let r = c
            .request(Method::OPTIONS, "/legate.test.v1.Echo/Say")
            .header("origin", ORIGIN)
            .header("access-control-request-method", "POST")
            .send()
            .await;
        assert_eq!(r.status, 204, "{}", r.text());
        assert_eq!(s.grpc.calls.get(), 2);
        assert_eq!(
            plugin_counter(&s.lg, "grpc_web_requests_total", "variant=\"text\"").await,
            Some(2.0)
        );
    }
);

/// What an upstream saw of a request: method, `content-length`,
/// `transfer-encoding`, body.
type Head = (String, Option<String>, Option<String>, Vec<u8>);

/// An upstream that records each request's [`Head`] and answers `status`
/// for the first `fail` requests, then `200` `application/grpc` with the
/// request's body (a gRPC message, echoed).
async fn recording(seen: &Arc<Mutex<Vec<Head>>>, fail: usize, h2: bool) -> UpstreamHandle {
    let seen = seen.clone();
    let b = upstream().handler(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let field = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
            let (cl, te) = (field("content-length"), field("transfer-encoding"));
            let method = req.method().to_string();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let n = {
                let mut s = seen.lock().unwrap();
                s.push((method, cl, te, body.to_vec()));
                s.len()
            };
            let mut r = Response::new(Full::new(body));
            if n <= fail {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            } else {
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
            }
            r
        }
    });
    if h2 { b.h2() } else { b.http1() }.start().await
}

each_proto!(
    async fn a_replayed_request_goes_without_the_length_the_plugin_removed(proto) {
        // A `-text` request shrinks as it is decoded, and the plugin removes
        // its `content-length`. A route that retries or mirrors reads the
        // (decoded) body whole to replay it: the first attempt, the retry and
        // the mirror's copy go as the head says, without a length (chunked
        // to the HTTP/1.1 primary, DATA frames to the HTTP/2 shadow), as
        // Envoy sends them, never with the client's base64 length.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shadow_seen = Arc::new(Mutex::new(Vec::new()));
        let primary = recording(&seen, 1, false).await;
        let shadow = recording(&shadow_seen, 0, true).await;
        let cfg = format!(
            "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: grpc-web }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: / }}
            cluster: primary
            retry: {{ retry_on: [5xx], num_retries: 1, retry_non_idempotent: true }}
            mirror: {{ cluster: shadow }}
clusters:
  - name: primary
    endpoints: [{{ address: \"{primary}\" }}]
  - name: shadow
    protocol: h2
    endpoints: [{{ address: \"{shadow}\" }}]
plugins:
  - name: grpc-web
    module: {wasm}
",
            primary = primary.addr,
            shadow = shadow.addr,
            wasm = plugin_wasm("plugins/grpc-web").display(),
        );
        let lg = legate().config(&cfg).start();
        let mut c = client(proto, lg.addr("web")).await;
        let message = say("replayed");
        let text = b64(&message);
        assert_ne!(text.len(), message.len());
        let r = c
            .post("/legate.test.v1.Echo/Say")
            .header("content-type", "application/grpc-web-text")
            .header("content-length", &text.len().to_string())
            .body(text)
            .send()
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/grpc-web+proto"));
        let frames = unframe(&r.body).unwrap();
        assert_eq!(frames, [(0, message[5..].to_vec())]);
        eventually(HANG_GUARD, "the shadow to see the copy", || async {
            (!shadow_seen.lock().unwrap().is_empty()).then_some(())
        })
        .await;
        let unframed = |te: Option<&str>| (
            "POST".to_owned(),
            None,
            te.map(str::to_owned),
            message.clone(),
        );
        let chunked = unframed(Some("chunked"));
        assert_eq!(*seen.lock().unwrap(), [chunked.clone(), chunked]);
        assert_eq!(*shadow_seen.lock().unwrap(), [unframed(None)]);
        lg.assert_stat(
            r#"legate_cluster_upstream_rq_retry{cluster="primary"}"#,
            1.0,
        )
        .await;
    }
);
