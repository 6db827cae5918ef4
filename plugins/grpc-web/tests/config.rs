//! grpc-web's configuration on the SDK harness: valid configs load (with the
//! documented defaults) and declare the phases the filter needs; invalid ones
//! are rejected with a message naming the field and the fix.

#![allow(clippy::unwrap_used)]

use legate_plugin_grpc_web::config::{Config, Cors, DEFAULT_ALLOWED_HEADERS, DEFAULT_MAX_AGE_S};
use legate_plugin_grpc_web::GrpcWeb;
use legate_sdk::testing::TestHost;
use legate_sdk::{BodyMode, Direction, Phase};

fn err(config: &str) -> String {
    match TestHost::new().configure::<GrpcWeb>(config) {
        Ok(_) => panic!("accepted: {config}"),
        Err(e) => e,
    }
}

fn cors(config: &str) -> Option<Cors> {
    let c: Config = serde_json::from_str(config).unwrap();
    c.validate().unwrap()
}

#[test]
fn no_config_converts_with_cors_off() {
    for config in ["null", "{}"] {
        let t = TestHost::new().configure::<GrpcWeb>(config).unwrap();
        let setup = t.setup();
        for p in [
            Phase::RequestHeaders,
            Phase::RequestBody,
            Phase::ResponseHeaders,
            Phase::ResponseBody,
        ] {
            assert!(setup.declares(p), "{p:?} not declared");
        }
        // Trailers are folded in the body phase; no trailers phase is needed.
        assert!(!setup.declares(Phase::ResponseTrailers));
        assert_eq!(setup.body_mode(Direction::Request), BodyMode::Streamed);
        assert_eq!(setup.body_mode(Direction::Response), BodyMode::Streamed);
        for (name, label) in [
            ("grpc_web_requests_total", "binary"),
            ("grpc_web_requests_total", "text"),
            ("grpc_web_responses_total", "trailer_frame"),
            ("grpc_web_responses_total", "trailers_only"),
            ("grpc_web_responses_total", "not_grpc"),
            ("grpc_web_preflights_total", "allowed"),
            ("grpc_web_rejected_total", "invalid_base64"),
        ] {
            assert_eq!(
                t.host().counter(name, &[label]),
                Some(0),
                "{name}{{{label}}}"
            );
        }
    }
    assert_eq!(cors("{}"), None);
}

#[test]
fn cors_defaults_and_overrides() {
    let c = cors(
        r#"{"cors": {"allowed_origins": ["https://App.example.com", "http://localhost:8080"]}}"#,
    )
    .unwrap();
    assert_eq!(
        c.origins,
        Some(vec![
            "https://app.example.com".to_owned(),
            "http://localhost:8080".to_owned()
        ])
    );
    assert_eq!(
        c.allowed_headers,
        DEFAULT_ALLOWED_HEADERS.map(str::to_owned)
    );
    assert_eq!(c.expose_headers, ["grpc-status", "grpc-message"]);
    assert_eq!(c.max_age_s, DEFAULT_MAX_AGE_S);
    assert!(!c.allow_credentials);
    assert_eq!(
        c.allow_origin("https://app.example.com").as_deref(),
        Some("https://app.example.com")
    );
    assert_eq!(c.allow_origin("https://other.example.com"), None);

    let c = cors(
        r#"{"cors": {"allowed_origins": ["*"], "allowed_headers": ["X-Custom"],
            "expose_headers": [], "max_age_s": 60}}"#,
    )
    .unwrap();
    assert_eq!(c.origins, None);
    assert_eq!(c.allowed_headers, ["x-custom"]);
    assert!(c.expose_headers.is_empty());
    assert_eq!(c.max_age_s, 60);
    assert_eq!(c.allow_origin("https://any.example").as_deref(), Some("*"));

    // Credentials with listed origins: each allowed origin is echoed.
    let c = cors(
        r#"{"cors": {"allowed_origins": ["https://app.example.com"], "allow_credentials": true}}"#,
    )
    .unwrap();
    assert!(c.allow_credentials);
    assert_eq!(
        c.allow_origin("https://app.example.com").as_deref(),
        Some("https://app.example.com")
    );
    assert_eq!(c.allow_origin("https://any.example"), None);
}

#[test]
fn any_origin_with_credentials_is_refused() {
    // `*` with credentials would have to echo every origin (browsers refuse
    // `*` itself with credentials): any site could call with the user's
    // cookies. The config must list the origins instead.
    for (config, index) in [
        (
            r#"{"cors": {"allowed_origins": ["*"], "allow_credentials": true}}"#,
            0,
        ),
        (
            r#"{"cors": {"allowed_origins": ["https://a.example", "*"], "allow_credentials": true}}"#,
            1,
        ),
    ] {
        let e = err(config);
        assert!(
            e.contains(&format!("`cors.allowed_origins[{index}]`"))
                && e.contains("`cors.allow_credentials: true`")
                && e.contains("list the origins"),
            "{e}"
        );
    }
    // Without credentials `*` stays allowed.
    let c = cors(r#"{"cors": {"allowed_origins": ["*"], "allow_credentials": false}}"#).unwrap();
    assert_eq!(c.origins, None);
}

#[test]
fn invalid_configs_name_the_field_and_the_fix() {
    let e = err(r#"{"cors": {}}"#);
    assert!(
        e.contains("`cors.allowed_origins`") && e.contains("at least one"),
        "{e}"
    );

    let e = err(r#"{"cors": {"allowed_origins": ["https://a.example", "example.com"]}}"#);
    assert!(
        e.contains("`cors.allowed_origins[1]`") && e.contains("scheme://host[:port]"),
        "{e}"
    );
    let e = err(r#"{"cors": {"allowed_origins": ["https://a.example/"]}}"#);
    assert!(e.contains("`cors.allowed_origins[0]`"), "{e}");
    let e = err(r#"{"cors": {"allowed_origins": ["https://a.example:99999"]}}"#);
    assert!(e.contains("`cors.allowed_origins[0]`"), "{e}");

    let e = err(r#"{"cors": {"allowed_origins": ["*"], "allowed_headers": ["x ok"]}}"#);
    assert!(
        e.contains("`cors.allowed_headers[0]`") && e.contains("not a header name"),
        "{e}"
    );
    let e = err(r#"{"cors": {"allowed_origins": ["*"], "expose_headers": [""]}}"#);
    assert!(e.contains("`cors.expose_headers[0]`"), "{e}");

    // Unknown fields and wrong types are named by the SDK.
    let e = err(r#"{"cros": {}}"#);
    assert!(e.contains("cros"), "{e}");
    let e = err(r#"{"cors": {"allowed_origins": ["*"], "max_age": 5}}"#);
    assert!(e.contains("max_age"), "{e}");
    let e = err(r#"{"cors": {"allowed_origins": ["*"], "max_age_s": "1h"}}"#);
    assert!(e.contains("max_age_s"), "{e}");
}
