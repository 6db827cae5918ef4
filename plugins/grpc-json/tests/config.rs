//! grpc-json's configuration on the SDK harness: a valid config loads the
//! descriptor set from the granted file and declares the phases it needs;
//! invalid ones are rejected at configure with a message naming the problem
//! (file, service, method, template, field) and the fix.

#![allow(clippy::unwrap_used)]

mod common;

use legate_plugin_grpc_json::GrpcJson;
use legate_sdk::testing::TestHost;
use legate_sdk::{BodyMode, Direction, Phase};

fn err_with(descriptors: Vec<u8>, config: &str) -> String {
    match TestHost::new()
        .file("descriptors", descriptors)
        .configure::<GrpcJson>(config)
    {
        Ok(_) => panic!("accepted: {config}"),
        Err(e) => e,
    }
}

fn err(config: &str) -> String {
    err_with(common::echo_descriptors(), config)
}

/// A one-method service whose rule is `rule` (the inside of the option).
fn service_with_rule(rule: &str) -> Vec<u8> {
    common::descriptors_of(&format!(
        r#"syntax = "proto3";
package t;
import "google/api/annotations.proto";
message Req {{ string name = 1; Inner inner = 2; repeated string tags = 3; }}
message Inner {{ string id = 1; }}
service S {{
  rpc Get(Req) returns (Req) {{ option (google.api.http) = {{ {rule} }}; }}
}}"#
    ))
}

#[test]
fn valid_config_loads_with_defaults() {
    let host = TestHost::new().file("descriptors", common::echo_descriptors());
    let t = host.configure::<GrpcJson>(common::CONFIG).unwrap();
    let setup = t.setup();
    for p in [
        Phase::RequestHeaders,
        Phase::RequestBody,
        Phase::ResponseHeaders,
        Phase::ResponseBody,
    ] {
        assert!(setup.declares(p), "{p:?} not declared");
    }
    // Trailers are read in the last body call; no trailers phase needed.
    assert!(!setup.declares(Phase::ResponseTrailers));
    // Untranscoded traffic pays no body calls.
    assert_eq!(setup.body_mode(Direction::Request), BodyMode::Skipped);
    assert_eq!(setup.body_mode(Direction::Response), BodyMode::Skipped);
    for result in legate_plugin_grpc_json::RESULTS {
        assert_eq!(
            t.host().counter("grpc_json_requests_total", &[result]),
            Some(0),
            "{result}"
        );
    }
    assert_eq!(t.filter().transcoder().rules.len(), 12);

    // Another file name, and every option spelled out.
    let host = TestHost::new().file("protos", common::echo_descriptors());
    host.configure::<GrpcJson>(
        r#"{"descriptor_file": "protos", "services": ["legate.test.v1.Echo"],
            "print_options": {"add_whitespace": true, "always_print_primitive_fields": true,
                              "always_print_enums_as_ints": true, "preserve_proto_field_names": true},
            "ignored_query_parameters": ["key"], "ignore_unknown_query_parameters": true,
            "query_param_unescape_plus": true}"#,
    )
    .unwrap();
}

#[test]
fn schema_errors_name_the_field() {
    let e = err("null");
    assert!(e.starts_with("invalid config"), "{e}");
    let e = err("{}");
    assert!(e.contains("missing field `services`"), "{e}");
    let e = err(r#"{"services": ["legate.test.v1.Echo"], "services_typo": 1}"#);
    assert!(e.contains("unknown field `services_typo`"), "{e}");
    let e = err(r#"{"services": ["legate.test.v1.Echo"], "print_options": {"indent": true}}"#);
    assert!(e.contains("unknown field `indent`"), "{e}");
    let e = err(r#"{"services": ["legate.test.v1.Echo"], "query_param_unescape_plus": "yes"}"#);
    assert!(e.contains("query_param_unescape_plus"), "{e}");
    assert!(e.contains("expected a boolean"), "{e}");
    let e = err(r#"{"services": []}"#);
    assert!(
        e.contains("invalid config: field `services`: the list is empty"),
        "{e}"
    );
}

#[test]
fn descriptor_file_problems() {
    // Not granted.
    let e = match TestHost::new().configure::<GrpcJson>(common::CONFIG) {
        Ok(_) => panic!("accepted without a descriptor file"),
        Err(e) => e,
    };
    assert!(
        e.contains(
            "invalid config: field `descriptor_file`: reading descriptor file \"descriptors\""
        ),
        "{e}"
    );
    assert!(e.contains("files:"), "{e}");
    // Not a FileDescriptorSet.
    let e = err_with(b"\xff\xff not protobuf".to_vec(), common::CONFIG);
    assert!(
        e.contains("invalid config: field `descriptor_file`: descriptor file \"descriptors\" is not a valid FileDescriptorSet"),
        "{e}"
    );
    assert!(e.contains("--include_imports"), "{e}");
    // A set without google.api.http (annotations not imported).
    let plain = common::descriptors_of(
        "syntax = \"proto3\"; package t; message M {} service S { rpc A(M) returns (M); }",
    );
    let e = err_with(plain, r#"{"services": ["t.S"]}"#);
    assert!(
        e.contains("invalid config: field `descriptor_file`: descriptor file \"descriptors\" has no google.api.http extension"),
        "{e}"
    );
}

/// A name listed twice in `ignored_query_parameters` or `services` is
/// refused in the SDK's form, naming the second entry (the host places it at
/// that key); it was accepted.
#[test]
fn a_name_listed_twice_is_refused_at_its_second_entry() {
    let e = err(
        r#"{"services": ["legate.test.v1.Echo"], "ignored_query_parameters": ["access_token", "_", "access_token"]}"#,
    );
    assert_eq!(
        e,
        "invalid config: field `ignored_query_parameters[2]`: \"access_token\" is listed twice \
         (also at `ignored_query_parameters[0]`): remove one"
    );
    let e = err(r#"{"services": ["legate.test.v1.Echo", "legate.test.v1.Echo"]}"#);
    assert!(
        e.starts_with(
            "invalid config: field `services[1]`: \"legate.test.v1.Echo\" is listed twice"
        ),
        "{e}"
    );
    // Names that differ only in case are different parameters.
    TestHost::new()
        .file("descriptors", common::echo_descriptors())
        .configure::<GrpcJson>(
            r#"{"services": ["legate.test.v1.Echo"], "ignored_query_parameters": ["a", "A"]}"#,
        )
        .unwrap();
}

#[test]
fn unknown_service_lists_the_known_ones() {
    // In the SDK's form, naming the entry: the host places it at that key.
    let e = err(r#"{"services": ["legate.test.v1.Echo", "legate.test.v1.Nope"]}"#);
    assert!(
        e.contains("invalid config: field `services[1]`: service \"legate.test.v1.Nope\" is not in descriptor file \"descriptors\"; it has: legate.test.v1.Echo"),
        "{e}"
    );
}

#[test]
fn bad_rules_name_the_method_and_template() {
    let cases = [
        (
            r#"get: "v1/x""#,
            "method t.S.Get: path template \"v1/x\": must start with '/'",
        ),
        (
            r#"get: "/v1/{name""#,
            "method t.S.Get: path template \"/v1/{name\"",
        ),
        (r#"get: "/v1/**/x""#, "'**' must be the last segment"),
        (
            r#"get: "/v1/{nope}""#,
            "variable {nope}: t.Req has no field \"nope\"",
        ),
        (r#"get: "/v1/{tags}""#, "t.Req.tags is repeated"),
        (
            r#"get: "/v1/{inner}""#,
            "is a message (t.Inner), not a scalar field",
        ),
        (
            r#"post: "/v1/x" body: "nope""#,
            "method t.S.Get: body \"nope\": t.Req has no field \"nope\"",
        ),
        (
            r#"get: "/v1/x" response_body: "nope""#,
            "response_body \"nope\": t.Req has no field nope",
        ),
        (r#"body: "*""#, "has no pattern"),
    ];
    for (rule, want) in cases {
        let e = err_with(service_with_rule(rule), r#"{"services": ["t.S"]}"#);
        assert!(e.contains(want), "{rule}: {e}");
    }
    // The same binding twice.
    let e = err_with(
        service_with_rule(r#"get: "/v1/x" additional_bindings { get: "/v1/x" }"#),
        r#"{"services": ["t.S"]}"#,
    );
    assert!(e.contains("GET /v1/x is bound twice"), "{e}");
}
