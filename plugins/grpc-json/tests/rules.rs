//! The transcoder's rules without the SDK: which rule a request matches, the
//! protobuf message built from path, query and JSON body (decoded here with
//! independent prost structs), and the JSON printed for a response message.

#![allow(clippy::unwrap_used)]

mod common;

use legate_plugin_grpc_json::config::Config;
use legate_plugin_grpc_json::rules::{Match, Transcoder};
use prost::Message;

/// legate.test.v1 messages, declared independently of the plugin.
mod pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SayRequest {
        #[prost(string, tag = "1")]
        pub message: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SayReply {
        #[prost(string, tag = "1")]
        pub message: String,
        #[prost(map = "string, string", tag = "2")]
        pub metadata: std::collections::HashMap<String, String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FailRequest {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Inner {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(int32, tag = "2")]
        pub n: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ReflectRequest {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub inner: Option<Inner>,
        #[prost(string, repeated, tag = "3")]
        pub tags: Vec<String>,
        #[prost(int64, tag = "4")]
        pub big: i64,
        #[prost(bool, tag = "5")]
        pub flag: bool,
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(bytes = "vec", tag = "7")]
        pub data: Vec<u8>,
        #[prost(string, tag = "8")]
        pub display_name: String,
    }
}

fn transcoder(config: &str) -> Transcoder {
    let config: Config = serde_json::from_str(config).unwrap();
    Transcoder::new(&config, &common::echo_descriptors()).unwrap()
}

fn find(t: &Transcoder, method: &str, path: &str) -> Option<(String, Match)> {
    t.find(method, path)
        .map(|m| (t.rules[m.rule].grpc_path.clone(), m))
}

fn build<M: Message + Default>(
    t: &Transcoder,
    method: &str,
    path: &str,
    body: &str,
) -> Result<M, String> {
    let (_, m) = find(t, method, path).unwrap_or_else(|| panic!("{method} {path}: no rule"));
    let bytes = t.request_message(&m, body.as_bytes())?;
    Ok(M::decode(bytes.as_slice()).unwrap())
}

/// What `request_messages` builds for `path` with `body`: each message decoded.
fn build_all<M: Message + Default>(
    t: &Transcoder,
    method: &str,
    path: &str,
    body: &str,
) -> Result<Vec<M>, String> {
    let (_, m) = find(t, method, path).unwrap_or_else(|| panic!("{method} {path}: no rule"));
    let all = t.request_messages(&m, body.as_bytes())?;
    Ok(all
        .iter()
        .map(|b| M::decode(b.as_slice()).unwrap())
        .collect())
}

#[test]
fn rules_come_from_the_http_options_of_every_method() {
    let t = transcoder(common::CONFIG);
    let mut bound: Vec<String> = t
        .rules
        .iter()
        .map(|r| format!("{} {} -> {}", r.http_method, r.template.source, r.grpc_path))
        .collect();
    bound.sort();
    assert_eq!(
        bound,
        [
            "GET /v1/count/{count} -> /legate.test.v1.Echo/Count",
            "GET /v1/echo/{message} -> /legate.test.v1.Echo/Say",
            "GET /v1/fail/{code} -> /legate.test.v1.Echo/Fail",
            "GET /v1/tags/{name} -> /legate.test.v1.Echo/Reflect",
            "GET /v1/{name=shelves/*/books/*} -> /legate.test.v1.Echo/Reflect",
            "PATCH /v1/files/{name=**} -> /legate.test.v1.Echo/Reflect",
            "POST /v1/chat -> /legate.test.v1.Echo/Chat",
            "POST /v1/collect -> /legate.test.v1.Echo/Collect",
            "POST /v1/collect/{message} -> /legate.test.v1.Echo/Collect",
            "POST /v1/echo -> /legate.test.v1.Echo/Say",
            "POST /v1/fail -> /legate.test.v1.Echo/Fail",
            "POST /v1/reflect/{inner.id}:run -> /legate.test.v1.Echo/Reflect",
        ]
    );
    // Count is server streaming: transcoded too (its replies, a JSON array).
    assert!(find(&t, "GET", "/v1/count/3").is_some());
    // Method and path must both match.
    assert!(find(&t, "POST", "/v1/echo/x").is_none());
    assert!(find(&t, "GET", "/v1/echo").is_none());
    assert!(find(&t, "GET", "/legate.test.v1.Echo/Say").is_none());
    assert!(find(&t, "GET", "/v1/shelves/1/books").is_none());
}

#[test]
fn a_request_stream_comes_from_a_json_array() {
    let t = transcoder(common::CONFIG);
    let say = |m: &str| pb::SayRequest { message: m.into() };
    // One message per element, for client and bidi streaming alike.
    for path in ["/v1/collect", "/v1/chat"] {
        let all: Vec<pb::SayRequest> = build_all(
            &t,
            "POST",
            path,
            r#"[{"message": "a"}, {}, {"message": "c"}]"#,
        )
        .unwrap();
        assert_eq!(all, [say("a"), say(""), say("c")], "{path}");
    }
    // An empty array or body: a stream with no message.
    for body in ["[]", "", " \n"] {
        let all: Vec<pb::SayRequest> = build_all(&t, "POST", "/v1/collect", body).unwrap();
        assert!(all.is_empty(), "{body:?}");
    }
    // No body in the rule: one message, from the path.
    let all: Vec<pb::SayRequest> = build_all(&t, "POST", "/v1/collect/solo", "").unwrap();
    assert_eq!(all, [say("solo")]);
    // A unary method still takes one object.
    let all: Vec<pb::SayRequest> =
        build_all(&t, "POST", "/v1/echo", r#"{"message": "x"}"#).unwrap();
    assert_eq!(all, [say("x")]);

    // Errors say what is wrong, and where in the array.
    let e =
        build_all::<pb::SayRequest>(&t, "POST", "/v1/collect", r#"{"message": "a"}"#).unwrap_err();
    assert!(
        e.contains("legate.test.v1.Echo.Collect takes a stream of legate.test.v1.SayRequest")
            && e.contains("JSON array"),
        "{e}"
    );
    let e = build_all::<pb::SayRequest>(
        &t,
        "POST",
        "/v1/collect",
        r#"[{"message": "a"}, {"nope": 1}]"#,
    )
    .unwrap_err();
    assert!(
        e.starts_with("message 1 of the array: invalid JSON body for legate.test.v1.SayRequest"),
        "{e}"
    );
    let e = build_all::<pb::SayRequest>(&t, "POST", "/v1/collect", "[{").unwrap_err();
    assert!(e.starts_with("invalid JSON body"), "{e}");
}

#[test]
fn get_with_path_variable_and_query() {
    let t = transcoder(common::CONFIG);
    let r: pb::SayRequest = build(&t, "GET", "/v1/echo/hello%20world", "").unwrap();
    assert_eq!(r.message, "hello world");

    let r: pb::ReflectRequest = build(
        &t,
        "GET",
        "/v1/shelves/s1/books/b%2F2?tags=a&tags=b%20c&big=-9007199254740993&flag=true&kind=KIND_BOOK&inner.id=x&inner.n=7&data=AAE%3D&displayName=D",
        "",
    )
    .unwrap();
    assert_eq!(
        r,
        pb::ReflectRequest {
            // Multi-segment variable: %2F stays encoded.
            name: "shelves/s1/books/b%2F2".into(),
            inner: Some(pb::Inner {
                id: "x".into(),
                n: 7
            }),
            tags: vec!["a".into(), "b c".into()],
            big: -9007199254740993,
            flag: true,
            kind: 1,
            data: vec![0, 1],
            display_name: "D".into(),
        }
    );
    // A typed path variable.
    let r: pb::FailRequest = build(&t, "GET", "/v1/fail/-5?message=m", "").unwrap();
    assert_eq!(
        r,
        pb::FailRequest {
            code: -5,
            message: "m".into()
        }
    );
    let e = build::<pb::FailRequest>(&t, "GET", "/v1/fail/five", "").unwrap_err();
    assert!(
        e.starts_with("path variable code: \"five\" does not fit legate.test.v1.FailRequest.code"),
        "{e}"
    );
    // Enum by number.
    let r: pb::ReflectRequest = build(&t, "GET", "/v1/tags/n?kind=1", "").unwrap();
    assert_eq!(r.kind, 1);
}

#[test]
fn a_query_parameter_cannot_override_a_path_bound_field() {
    // Query parameters are for the fields the path does not bind
    // (google.api.http): the path's value stays, as the route and every
    // filter before this one saw it; the others still apply.
    let t = transcoder(common::CONFIG);
    let r: pb::ReflectRequest = build(&t, "GET", "/v1/tags/alice?name=bob&flag=true", "").unwrap();
    assert_eq!(r.name, "alice");
    assert!(r.flag);
    let r: pb::SayRequest = build(&t, "GET", "/v1/echo/hi?message=evil", "").unwrap();
    assert_eq!(r.message, "hi");
    // A nested path-bound field, by its proto or its JSON name alike; its
    // sibling is not bound by the path, so the query sets it.
    for q in ["inner.id=evil", "inner.id=evil&inner.id=worse"] {
        let r: pb::ReflectRequest = build(
            &t,
            "POST",
            &format!("/v1/reflect/x1:run?{q}&inner.n=3"),
            r#"{"id": "body", "n": 1}"#,
        )
        .unwrap();
        assert_eq!(
            r.inner,
            Some(pb::Inner {
                id: "x1".into(),
                n: 3
            }),
            "{q}"
        );
    }
}

#[test]
fn plus_in_a_query_is_a_plus_unless_query_param_unescape_plus() {
    // As Envoy's `query_param_unescape_plus` (default false): RFC 3986 gives
    // `+` no meaning in a query, so it stays (a base64 value keeps its `+`);
    // a space is `%20`. The option decodes `+` as a space (form encoding).
    let path = "/v1/tags/n?tags=a+b&tags=c%20d&tags=e%2Bf&data=%2B%2F8%3D";
    let t = transcoder(common::CONFIG);
    let r: pb::ReflectRequest = build(&t, "GET", path, "").unwrap();
    assert_eq!(r.tags, ["a+b", "c d", "e+f"]);
    assert_eq!(r.data, [0xfb, 0xff]);
    let r: pb::ReflectRequest = build(&t, "GET", "/v1/tags/n?data=+/8=", "").unwrap();
    assert_eq!(r.data, [0xfb, 0xff], "a raw + of base64");

    let t =
        transcoder(r#"{"services": ["legate.test.v1.Echo"], "query_param_unescape_plus": true}"#);
    let r: pb::ReflectRequest = build(&t, "GET", path, "").unwrap();
    assert_eq!(r.tags, ["a b", "c d", "e+f"]);
}

#[test]
fn bad_query_parameters_are_client_errors() {
    let t = transcoder(common::CONFIG);
    for (path, why) in [
        ("/v1/tags/n?nope=1", "has no field \"nope\""),
        ("/v1/tags/n?flag=yes", "is not a bool"),
        ("/v1/tags/n?big=abc", "big"),
        ("/v1/tags/n?inner=x", "is a message"),
        ("/v1/tags/n?name.x=1", "is not a message"),
        ("/v1/tags/n?kind=KIND_NOPE", "KIND_NOPE"),
    ] {
        let e = build::<pb::ReflectRequest>(&t, "GET", path, "").unwrap_err();
        assert!(e.contains(why), "{path}: {e}");
    }
    // Ignored ones are dropped.
    let t = transcoder(
        r#"{"services": ["legate.test.v1.Echo"], "ignored_query_parameters": ["access_token"]}"#,
    );
    let r: pb::SayRequest = build(&t, "GET", "/v1/echo/hi?access_token=s3cret", "").unwrap();
    assert_eq!(r.message, "hi");
}

/// A `%` in the query not followed by two hex digits is a client error, as
/// Envoy's transcoder answers it 400; it was taken as the literal text.
#[test]
fn a_malformed_percent_escape_in_the_query_is_a_client_error() {
    let t = transcoder(common::CONFIG);
    for (path, names) in [
        ("/v1/tags/n?tags=a%ZZb", "query parameter \"tags\""),
        ("/v1/tags/n?tags=a%2", "query parameter \"tags\""),
        ("/v1/tags/n?ta%ZZgs=a", "query parameter name"),
    ] {
        let e = build::<pb::ReflectRequest>(&t, "GET", path, "").unwrap_err();
        assert!(e.contains(names), "{path}: {e}");
        assert!(e.contains("malformed percent escape"), "{path}: {e}");
    }
    // An ignored parameter is still read: its name must decode.
    let t = transcoder(
        r#"{"services": ["legate.test.v1.Echo"], "ignore_unknown_query_parameters": true}"#,
    );
    build::<pb::ReflectRequest>(&t, "GET", "/v1/tags/n?x%Z=1", "").unwrap_err();
    // Well-formed escapes still decode, `%25` to `%`.
    let r: pb::ReflectRequest = build(&t, "GET", "/v1/tags/n?tags=100%25", "").unwrap();
    assert_eq!(r.tags, ["100%"]);
}

/// `ignore_unknown_query_parameters` (Envoy's option of that name) drops the
/// parameters that name no field, and every one of a `body: "*"` rule, where
/// without it they are a 400; a parameter naming a field still has to fit it.
#[test]
fn unknown_query_parameters_are_dropped_with_ignore_unknown_query_parameters() {
    let t = transcoder(common::CONFIG);
    for (method, path, body) in [
        ("GET", "/v1/echo/hi?_=1712345678&utm_source=mail", ""),
        ("POST", "/v1/echo?_=1", r#"{"message": "hi"}"#),
    ] {
        build::<pb::SayRequest>(&t, method, path, body).unwrap_err();
    }
    let t = transcoder(
        r#"{"services": ["legate.test.v1.Echo"], "ignore_unknown_query_parameters": true}"#,
    );
    let r: pb::SayRequest =
        build(&t, "GET", "/v1/echo/hi?_=1712345678&utm_source=mail", "").unwrap();
    assert_eq!(r.message, "hi");
    let r: pb::SayRequest = build(&t, "POST", "/v1/echo?_=1", r#"{"message": "hi"}"#).unwrap();
    assert_eq!(r.message, "hi");
    // Known fields are still bound, and still checked.
    let r: pb::ReflectRequest = build(&t, "GET", "/v1/tags/n?tags=a&nope=1&name.x=2", "").unwrap();
    assert_eq!(r.tags, ["a"]);
    let e = build::<pb::ReflectRequest>(&t, "GET", "/v1/tags/n?flag=yes&nope=1", "").unwrap_err();
    assert!(e.contains("is not a bool"), "{e}");
}

#[test]
fn post_with_body_star_and_a_body_field() {
    let t = transcoder(common::CONFIG);
    let r: pb::SayRequest = build(&t, "POST", "/v1/echo", r#"{"message": "über"}"#).unwrap();
    assert_eq!(r.message, "über");
    // An empty body is the empty message.
    let r: pb::SayRequest = build(&t, "POST", "/v1/echo", "").unwrap();
    assert_eq!(r.message, "");
    // body: "*" leaves nothing to the query.
    let e = build::<pb::SayRequest>(&t, "POST", "/v1/echo?message=x", "{}").unwrap_err();
    assert!(
        e.contains("every field of legate.test.v1.SayRequest is in the body"),
        "{e}"
    );

    // body: "inner" with the path variable {inner.id} (the path wins) and a verb.
    let r: pb::ReflectRequest = build(
        &t,
        "POST",
        "/v1/reflect/from-path:run?tags=q",
        r#"{"id": "from-body", "n": 3}"#,
    )
    .unwrap();
    assert_eq!(
        r.inner,
        Some(pb::Inner {
            id: "from-path".into(),
            n: 3
        })
    );
    assert_eq!(r.tags, ["q"]);

    // A bound default value (0, "", false) overrides the body's too.
    let r: pb::ReflectRequest = build(
        &t,
        "POST",
        "/v1/reflect/y:run?inner.n=0&tags=a&tags=",
        r#"{"id": "b", "n": 3}"#,
    )
    .unwrap();
    assert_eq!(
        r.inner,
        Some(pb::Inner {
            id: "y".into(),
            n: 0
        })
    );
    assert_eq!(r.tags, ["a", ""]);

    // PATCH with {name=**}: the rest of the path, and the body's other fields.
    let r: pb::ReflectRequest = build(
        &t,
        "PATCH",
        "/v1/files/a/b/c.txt",
        r#"{"display_name": "x", "big": "12"}"#,
    )
    .unwrap();
    assert_eq!(r.name, "a/b/c.txt");
    assert_eq!(r.display_name, "x");
    assert_eq!(r.big, 12);
}

#[test]
fn bad_json_is_a_client_error_naming_the_problem() {
    let t = transcoder(common::CONFIG);
    for (body, why) in [
        ("{", "invalid JSON body"),
        (r#"{"message": 5}"#, "invalid type"),
        (r#"{"nope": "x"}"#, "nope"),
        ("[1]", "invalid JSON body"),
        (r#"{"message": "a"} x"#, "trailing"),
    ] {
        let e = build::<pb::SayRequest>(&t, "POST", "/v1/echo", body).unwrap_err();
        assert!(e.contains(why), "{body}: {e}");
    }
    let e = build::<pb::ReflectRequest>(&t, "POST", "/v1/reflect/x:run", r#"{"n": "many"}"#)
        .unwrap_err();
    assert!(e.contains("field inner"), "{e}");
}

#[test]
fn most_specific_template_wins() {
    let fds = common::descriptors_of(
        r#"syntax = "proto3";
package t;
import "google/api/annotations.proto";
message R { string a = 1; string b = 2; }
service S {
  rpc Wild(R) returns (R) { option (google.api.http) = { get: "/v1/{a=**}" }; }
  rpc One(R) returns (R) { option (google.api.http) = { get: "/v1/items/{a}" }; }
  rpc Lit(R) returns (R) { option (google.api.http) = { get: "/v1/items/special" }; }
  rpc Verb(R) returns (R) { option (google.api.http) = { custom: { kind: "GET", path: "/v1/items/{a}:peek" } }; }
}"#,
    );
    let config: Config = serde_json::from_str(r#"{"services": ["t.S"]}"#).unwrap();
    let t = Transcoder::new(&config, &fds).unwrap();
    let target = |p: &str| find(&t, "GET", p).map(|(g, _)| g);
    assert_eq!(target("/v1/items/special").as_deref(), Some("/t.S/Lit"));
    assert_eq!(target("/v1/items/other").as_deref(), Some("/t.S/One"));
    assert_eq!(target("/v1/items/other:peek").as_deref(), Some("/t.S/Verb"));
    assert_eq!(target("/v1/items/a/b").as_deref(), Some("/t.S/Wild"));
    assert_eq!(target("/v2/x"), None);
}

#[test]
fn an_exact_template_beats_a_rest_that_matches_nothing() {
    // List and Get of one collection: `GET /v1/files` is List's, although
    // `{path=**}` may match zero segments (Envoy's matcher takes the exact one).
    let fds = common::descriptors_of(
        r#"syntax = "proto3";
package t;
import "google/api/annotations.proto";
message R { string path = 1; string rest = 2; }
service S {
  rpc Get(R) returns (R) { option (google.api.http) = { get: "/v1/files/{path=**}" }; }
  rpc List(R) returns (R) { option (google.api.http) = { get: "/v1/files" }; }
  rpc Item(R) returns (R) { option (google.api.http) = { get: "/v1/items/{path}/{rest=**}" }; }
  rpc One(R) returns (R) { option (google.api.http) = { get: "/v1/items/{path}" }; }
}"#,
    );
    let config: Config = serde_json::from_str(r#"{"services": ["t.S"]}"#).unwrap();
    let t = Transcoder::new(&config, &fds).unwrap();
    let target = |p: &str| find(&t, "GET", p).map(|(g, _)| g);
    assert_eq!(target("/v1/files").as_deref(), Some("/t.S/List"));
    assert_eq!(target("/v1/files/a/b").as_deref(), Some("/t.S/Get"));
    assert_eq!(target("/v1/items/7").as_deref(), Some("/t.S/One"));
    assert_eq!(target("/v1/items/7/x").as_deref(), Some("/t.S/Item"));
}

#[test]
fn responses_print_as_proto3_json() {
    let t = transcoder(common::CONFIG);
    let json = |t: &Transcoder, method: &str, path: &str, msg: &[u8]| -> serde_json::Value {
        let (_, m) = find(t, method, path).unwrap();
        serde_json::from_slice(&t.response_json(m.rule, msg).unwrap()).unwrap()
    };
    let reply = pb::SayReply {
        message: "hi".into(),
        metadata: [("k".to_owned(), "v".to_owned())].into(),
    }
    .encode_to_vec();
    assert_eq!(
        json(&t, "GET", "/v1/echo/x", &reply),
        serde_json::json!({"message": "hi", "metadata": {"k": "v"}})
    );
    let reflected = pb::ReflectRequest {
        display_name: "D".into(),
        big: 5,
        kind: 1,
        tags: vec!["a".into()],
        ..Default::default()
    }
    .encode_to_vec();
    // Defaults omitted, lowerCamelCase names, int64 as a string, enum names.
    assert_eq!(
        json(&t, "GET", "/v1/shelves/1/books/2", &reflected),
        serde_json::json!({"displayName": "D", "big": "5", "kind": "KIND_BOOK", "tags": ["a"]})
    );
    // response_body: "tags".
    assert_eq!(
        json(&t, "GET", "/v1/tags/x", &reflected),
        serde_json::json!(["a"])
    );
    // An omitted (default) response_body field prints as its default.
    assert_eq!(json(&t, "GET", "/v1/tags/x", &[]), serde_json::json!([]));

    let t = transcoder(
        r#"{"services": ["legate.test.v1.Echo"], "print_options": {"always_print_primitive_fields": true, "preserve_proto_field_names": true, "always_print_enums_as_ints": true}}"#,
    );
    let v = json(&t, "GET", "/v1/shelves/1/books/2", &reflected);
    assert_eq!(v["display_name"], "D");
    assert_eq!(v["kind"], 1);
    assert_eq!(v["flag"], false);
    assert_eq!(v["name"], "");

    // add_whitespace: indented, same content.
    let t2 = transcoder(
        r#"{"services": ["legate.test.v1.Echo"], "print_options": {"add_whitespace": true}}"#,
    );
    let (_, m) = find(&t2, "GET", "/v1/echo/x").unwrap();
    let text = String::from_utf8(t2.response_json(m.rule, &reply).unwrap()).unwrap();
    assert!(text.starts_with("{\n  \""), "{text}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).unwrap(),
        serde_json::json!({"message": "hi", "metadata": {"k": "v"}})
    );

    // A message that does not decode is the upstream's fault.
    let (_, m) = find(&t, "GET", "/v1/echo/x").unwrap();
    let e = t.response_json(m.rule, &[0x0a, 0x05, b'a']).unwrap_err();
    assert!(e.contains("legate.test.v1.SayReply does not decode"), "{e}");
}

#[test]
fn floats_print_as_the_shortest_text_that_reads_back_as_them() {
    let fds = common::descriptors_of(
        r#"
syntax = "proto3";
package t;
import "google/api/annotations.proto";
service S {
  rpc Get(M) returns (M) {
    option (google.api.http) = {
      post: "/v1/m" body: "*"
      additional_bindings { post: "/v1/fs" body: "*" response_body: "fs" }
      additional_bindings { post: "/v1/inner" body: "*" response_body: "inner" }
    };
  }
}
message M { float f = 1; double d = 2; repeated float fs = 3; M inner = 4; }
"#,
    );
    #[derive(Clone, PartialEq, prost::Message)]
    struct M {
        #[prost(float, tag = "1")]
        f: f32,
        #[prost(double, tag = "2")]
        d: f64,
        #[prost(float, repeated, tag = "3")]
        fs: Vec<f32>,
        #[prost(message, optional, boxed, tag = "4")]
        inner: Option<Box<M>>,
    }
    let msg = M {
        f: 0.1,
        d: 0.1,
        fs: vec![0.1, 1.5, 3.4e38],
        inner: Some(Box::new(M {
            f: 0.3,
            ..Default::default()
        })),
    }
    .encode_to_vec();
    let text = |config: &str, path: &str| {
        let config: Config = serde_json::from_str(config).unwrap();
        let t = Transcoder::new(&config, &fds).unwrap();
        let m = t.find("POST", path).unwrap();
        String::from_utf8(t.response_json(m.rule, &msg).unwrap()).unwrap()
    };
    let compact = r#"{"services": ["t.S"]}"#;
    // `float` 0.1 is 0.1, not the f64 widening of it (0.10000000149011612).
    assert_eq!(
        text(compact, "/v1/m"),
        "{\"f\":0.1,\"d\":0.1,\"fs\":[0.1,1.5,3.4e+38],\"inner\":{\"f\":0.3}}\n"
    );
    assert_eq!(text(compact, "/v1/fs"), "[0.1,1.5,3.4e+38]\n");
    assert_eq!(text(compact, "/v1/inner"), "{\"f\":0.3}\n");
    // Indented: a response_body field as a whole body, not one level deep.
    let pretty = r#"{"services": ["t.S"], "print_options": {"add_whitespace": true}}"#;
    assert_eq!(
        text(pretty, "/v1/m"),
        "{\n  \"f\": 0.1,\n  \"d\": 0.1,\n  \"fs\": [\n    0.1,\n    1.5,\n    3.4e+38\n  ],\n  \"inner\": {\n    \"f\": 0.3\n  }\n}\n"
    );
    assert_eq!(text(pretty, "/v1/fs"), "[\n  0.1,\n  1.5,\n  3.4e+38\n]\n");
    assert_eq!(text(pretty, "/v1/inner"), "{\n  \"f\": 0.3\n}\n");
}

/// A proto with every kind the direct JSON → protobuf path takes, and some it
/// leaves to the general one.
const KINDS_PROTO: &str = r#"
syntax = "proto3";
package k;
import "google/api/annotations.proto";
service S {
  rpc All(M) returns (M) { option (google.api.http) = { post: "/v1/m" body: "*" additional_bindings { post: "/v1/m/{s}" body: "*" } }; }
  rpc Map(WithMap) returns (M) { option (google.api.http) = { post: "/v1/map" body: "*" }; }
  rpc Print(M) returns (P) { option (google.api.http) = { post: "/v1/p" body: "*" }; }
}
message P { M m = 1; bytes by = 2; repeated bytes rb = 3; repeated M ms = 4; }
enum E { E_ZERO = 0; E_ONE = 1; }
message Inner { string id = 1; int32 n = 2; repeated Inner kids = 3; }
message M {
  int32 i32 = 1; int64 i64 = 2; uint32 u32 = 3; uint64 u64 = 4;
  sint32 s32 = 5; sint64 s64 = 6; fixed32 f32 = 7; fixed64 f64 = 8;
  sfixed32 sf32 = 9; sfixed64 sf64 = 10; float fl = 11; double db = 12;
  bool b = 13; string s = 14; E e = 15; Inner inner = 16;
  repeated Inner kids = 17; repeated int32 ri = 18; repeated string rs = 19;
  repeated double rd = 20; repeated E re = 21; repeated sint64 rs64 = 22;
  string display_name = 23;
}
message WithMap { map<string, int32> m = 1; }
"#;

#[test]
fn the_direct_json_path_encodes_as_the_general_one() {
    use legate_plugin_grpc_json::direct;
    use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};
    let fds = common::descriptors_of(KINDS_PROTO);
    let pool = DescriptorPool::decode(fds.as_slice()).unwrap();
    let m = pool.get_message_by_name("k.M").unwrap();
    let config: Config = serde_json::from_str(r#"{"services": ["k.S"]}"#).unwrap();
    let t = Transcoder::new(&config, &fds).unwrap();
    let rule = |path: &str| t.find("POST", path).unwrap();
    // Taken for plain messages; not for maps (nor well-known types, oneofs).
    assert!(t.rules[rule("/v1/m").rule].direct);
    assert!(!t.rules[rule("/v1/map").rule].direct);
    // The general parser's message, through the wire (which drops the
    // defaults it holds as set).
    let general = |body: &str| {
        let mut de = serde_json::Deserializer::from_str(body);
        let msg = DynamicMessage::deserialize_with_options(
            m.clone(),
            &mut de,
            &DeserializeOptions::new().deny_unknown_fields(true),
        )
        .unwrap();
        DynamicMessage::decode(m.clone(), msg.encode_to_vec().as_slice()).unwrap()
    };
    let direct_bodies = [
        "{}",
        r#"{"i32": -5, "i64": -9007199254740993, "u32": 4294967295, "u64": 18446744073709551615}"#,
        r#"{"s32": -3, "s64": -70000000000, "f32": 7, "f64": 8, "sf32": -9, "sf64": -10}"#,
        r#"{"fl": 0.1, "db": 0.1, "b": true, "s": "h\u00e9\"llo", "e": "E_ONE"}"#,
        r#"{"i32": 0, "s": "", "b": false, "e": 0, "fl": -0.0, "inner": {}}"#,
        r#"{"inner": {"id": "a", "n": 1, "kids": [{"id": "b", "kids": [{}]}]}, "kids": [{"id": "x"}, {}]}"#,
        r#"{"ri": [1, -2, 0], "rs": ["a", ""], "rd": [0.5, 0], "re": ["E_ONE", 0, 1], "rs64": [-1, 2]}"#,
        r#"{"displayName": "D", "inner": null, "s": null, "ri": []}"#,
        r#"{"display_name": "D", "fl": 3, "db": 1e300}"#,
    ];
    for body in direct_bodies {
        let encoded = direct::encode(&m, body.as_bytes())
            .unwrap_or_else(|| panic!("not taken directly: {body}"));
        assert_eq!(
            DynamicMessage::decode(m.clone(), encoded.as_slice()).unwrap(),
            general(body),
            "{body}"
        );
        // And through the rule.
        let built = t.request_message(&rule("/v1/m"), body.as_bytes()).unwrap();
        assert_eq!(built, encoded, "{body}");
    }
    // Left to the general path, which words the error or takes the body.
    let general_bodies = [
        r#"{"i64": "5"}"#,
        r#"{"i32": 1.5}"#,
        r#"{"i32": 4294967296}"#,
        r#"{"fl": 1e39}"#,
        r#"{"e": "E_NONE"}"#,
        r#"{"s": "a", "s": "b"}"#,
        r#"{"nope": 1}"#,
        r#"{"ri": [null]}"#,
        r#"{"s": 1}"#,
        r#"{"b": "true"}"#,
        r#"{} x"#,
        r#"[]"#,
    ];
    for body in general_bodies {
        assert_eq!(direct::encode(&m, body.as_bytes()), None, "{body}");
    }
    // Those the general parser takes come out the same through the rule.
    let built = t
        .request_message(&rule("/v1/m"), br#"{"i64": "5", "s": "a", "s": "b"}"#)
        .unwrap();
    assert_eq!(
        DynamicMessage::decode(m.clone(), built.as_slice()).unwrap(),
        general(r#"{"i64": "5", "s": "b"}"#)
    );
    // A path variable: the general path, which merges it.
    let built = t
        .request_message(&rule("/v1/m/p"), br#"{"i32": 1}"#)
        .unwrap();
    assert_eq!(
        DynamicMessage::decode(m.clone(), built.as_slice()).unwrap(),
        general(r#"{"i32": 1, "s": "p"}"#)
    );
    // The review's body: 2,000 small objects, taken directly.
    let mut big = String::from(r#"{"kids":["#);
    for i in 0..2000 {
        if i > 0 {
            big.push(',');
        }
        big.push_str(&format!(r#"{{"id":"item-{i}","n":{i}}}"#));
    }
    big.push_str(r#"],"fl":0.1}"#);
    let encoded = direct::encode(&m, big.as_bytes()).unwrap();
    assert_eq!(
        DynamicMessage::decode(m.clone(), encoded.as_slice()).unwrap(),
        general(&big)
    );
}

#[test]
fn the_direct_json_printer_prints_as_the_general_one() {
    use legate_plugin_grpc_json::direct::{self, PrintNames};
    use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
    let fds = common::descriptors_of(KINDS_PROTO);
    let pool = DescriptorPool::decode(fds.as_slice()).unwrap();
    let p = pool.get_message_by_name("k.P").unwrap();
    assert!(direct::printable(&p));
    assert!(!direct::printable(
        &pool.get_message_by_name("k.WithMap").unwrap()
    ));
    let encode = |body: &str| {
        let mut de = serde_json::Deserializer::from_str(body);
        DynamicMessage::deserialize_with_options(p.clone(), &mut de, &DeserializeOptions::new())
            .unwrap()
            .encode_to_vec()
    };
    let general = |payload: &[u8], names: PrintNames| {
        let msg = DynamicMessage::decode(p.clone(), payload).unwrap();
        let mut out = Vec::new();
        msg.serialize_with_options(
            &mut serde_json::Serializer::new(&mut out),
            &SerializeOptions::new()
                .use_proto_field_name(names.proto_field_names)
                .use_enum_numbers(names.enum_numbers),
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    };
    let m = r#"{"i32": -5, "i64": "-9007199254740993", "u32": 4294967295, "u64": "18446744073709551615",
        "s32": -3, "s64": "-70000000000", "f32": 7, "f64": "8", "sf32": -9, "sf64": "-10",
        "fl": 0.1, "db": 0.1, "b": true, "s": "h\u00e9\"llo\n", "e": "E_ONE", "displayName": "D",
        "inner": {"id": "a", "kids": [{"n": 2}, {}]}, "kids": [{"id": "x"}, {}],
        "ri": [1, -2, 0], "rs": ["a", ""], "rd": [0.5, 0, "NaN", "-Infinity"], "re": ["E_ONE", 0, 7],
        "rs64": ["-1", "2"]}"#;
    let bodies = [
        "{}".to_owned(),
        format!(r#"{{"m": {m}}}"#),
        format!(r#"{{"ms": [{m}, {{}}, {{"fl": "Infinity", "db": 1e300, "e": 7}}]}}"#),
        r#"{"by": "AAEC/w==", "rb": ["", "YQ==", "YWI=", "YWJj"], "m": {}}"#.to_owned(),
    ];
    let names = [
        PrintNames {
            proto_field_names: false,
            enum_numbers: false,
        },
        PrintNames {
            proto_field_names: true,
            enum_numbers: true,
        },
    ];
    for body in &bodies {
        let payload = encode(body);
        for n in names {
            let printed = direct::print(&p, &payload, n)
                .unwrap_or_else(|| panic!("not printed directly: {body}"));
            assert_eq!(
                String::from_utf8(printed).unwrap(),
                general(&payload, n),
                "{body}"
            );
        }
    }
    // Wire forms a printer must read too: a repeated scalar unpacked and
    // packed in two runs, a scalar given twice (the last wins), an explicit
    // default, an unknown field (left out).
    let mut payload = vec![0x08, 0x07, 0x08, 0x00]; // M.i32 = 7 then 0
    payload.extend_from_slice(&[0x90, 0x01, 0x01, 0x90, 0x01, 0x02]); // ri 1, 2 unpacked
    payload.extend_from_slice(&[0x92, 0x01, 0x02, 0x03, 0x04]); // ri [3, 4] packed
    payload.extend_from_slice(&[0xf8, 0x07, 0x05]); // field 127: unknown
    let mut outer = vec![0x0a, payload.len() as u8];
    outer.extend_from_slice(&payload);
    for n in names {
        let printed = direct::print(&p, &outer, n).unwrap();
        assert_eq!(String::from_utf8(printed).unwrap(), general(&outer, n));
    }
    // Given up, to the general path: a message field twice (protobuf merges
    // them), a string that is not UTF-8, a truncated message.
    let twice = [
        encode(r#"{"m": {"i32": 1}}"#),
        encode(r#"{"m": {"s": "a"}}"#),
    ]
    .concat();
    assert_eq!(direct::print(&p, &twice, names[0]), None);
    assert_eq!(
        direct::print(&p, &[0x0a, 0x03, 0x72, 0x01, 0xff][..], names[0]),
        None
    );
    assert_eq!(direct::print(&p, &[0x0a, 0x05, 0x08][..], names[0]), None);
    // Through the rule: the same text either way.
    let config: Config = serde_json::from_str(r#"{"services": ["k.S"]}"#).unwrap();
    let t = Transcoder::new(&config, &fds).unwrap();
    let rule = t.find("POST", "/v1/p").unwrap().rule;
    assert!(t.rules[rule].printable);
    for payload in [twice, encode(&bodies[1])] {
        assert_eq!(
            String::from_utf8(t.response_json(rule, &payload).unwrap()).unwrap(),
            general(&payload, names[0]) + "\n"
        );
    }
}
