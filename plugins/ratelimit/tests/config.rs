//! ratelimit's configuration on the SDK harness: valid configs load and
//! declare the right phases; invalid ones are rejected with a message naming
//! the field.

#![allow(clippy::unwrap_used)]

use legate_plugin_ratelimit::RateLimit;
use legate_sdk::testing::TestHost;
use legate_sdk::Phase;

fn host() -> TestHost {
    TestHost::new().grant_kv("ratelimit")
}

fn err(config: &str) -> String {
    match host().configure::<RateLimit>(config) {
        Ok(_) => panic!("accepted: {config}"),
        Err(e) => e,
    }
}

#[test]
fn a_full_config_loads() {
    let t = TestHost::new()
        .grant_kv("rl-global")
        .configure::<RateLimit>(
            r#"{
              "namespace": "rl-global",
              "emit_headers": true,
              "header_names": "x-ratelimit",
              "failure_mode": "deny",
              "limits": [
                {"name": "per-ip", "key": ["client_ip"], "rate": "100/s", "burst": 200},
                {"name": "api-writes", "match": {"prefix": "/api", "methods": ["post", "PUT"]},
                 "key": ["client_ip", "method", {"header": "X-Jwt-Sub"}], "rate": "1000/m"},
                {"name": "per-key", "match": {"routes": ["api"]},
                 "key": ["header:x-api-key-id", "route", "path", "authority"], "rate": "10/h",
                 "shadow": true},
                {"name": "global", "rate": "5/d"},
                {"name": "per-net", "key": [{"client_ip": {"v4_prefix": 24, "v6_prefix": 64}}],
                 "rate": "1000/m"}
              ]
            }"#,
        )
        .unwrap();
    let phases = t.setup().phases();
    assert!(phases.contains(&Phase::RequestHeaders));
    assert!(phases.contains(&Phase::ResponseHeaders));
    assert!(t.host().metric_defined("ratelimit_requests_total"));
    for outcome in ["allowed", "limited", "shadow_limited", "error"] {
        assert_eq!(
            t.host()
                .counter("ratelimit_requests_total", &["api-writes", outcome]),
            Some(0),
            "{outcome}"
        );
    }
}

#[test]
fn without_emit_headers_only_the_request_head_is_declared() {
    let t = host()
        .configure::<RateLimit>(r#"{"limits": [{"name": "a", "rate": "1/s"}]}"#)
        .unwrap();
    let phases = t.setup().phases();
    assert!(phases.contains(&Phase::RequestHeaders));
    assert!(!phases.contains(&Phase::ResponseHeaders));
}

#[test]
fn invalid_configs_name_the_field() {
    let cases: &[(&str, &[&str])] = &[
        ("null", &["limits"]),
        (r#"{"limits": []}"#, &["`limits`", "at least one"]),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s"}], "limit": 1}"#,
            &["unknown field `limit`"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s", "brust": 2}]}"#,
            &["limits[0]", "unknown field `brust`"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "100"}]}"#,
            &["`limits[0].rate`", "\"100\"", "N/s"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/w"}]}"#,
            &["`limits[0].rate`"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "0/s"}]}"#,
            &["`limits[0].rate`", "at least 1"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "2000000000/s"}]}"#,
            &["`limits[0].rate`", "one request per nanosecond"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s", "key": ["header:Host"]}]}"#,
            &["limits[0].key", "`authority`"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s"}, {"name": "b", "rate": "1/s", "burst": 0}]}"#,
            &["`limits[1].burst`", "at least 1"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s"}, {"name": "a", "rate": "2/s"}]}"#,
            &["`limits[1].name`", "unique"],
        ),
        (
            r#"{"limits": [{"name": "a b", "rate": "1/s"}]}"#,
            &["`limits[0].name`"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s", "key": ["client_ip", "cookie"]}]}"#,
            &["limits[0].key[1]", "\"cookie\"", "client_ip"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s", "key": [{"header": "bad header"}]}]}"#,
            &["limits[0].key[0]", "invalid header name"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s", "key": [{"cookie": "x"}]}]}"#,
            &["limits[0].key[0]", "\"cookie\""],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s", "key": [{"client_ip": {"v6_prefix": 0}}]}]}"#,
            &["limits[0].key[0]", "v6_prefix: 0 is not 1-128"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s", "key": [{"client_ip": {"v4_prefix": 33}}]}]}"#,
            &["limits[0].key[0]", "v4_prefix: 33 is not 1-32"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s", "key": [{"client_ip": {"v6": 64}}]}]}"#,
            &["limits[0].key[0]", "unknown field `v6`"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s", "match": {"prefix": "api"}}]}"#,
            &["`limits[0].match.prefix`", "start with '/'"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s", "match": {"methods": ["GET", "G T"]}}]}"#,
            &["`limits[0].match.methods[1]`"],
        ),
        (
            r#"{"limits": [{"name": "a", "rate": "1/s", "match": {"path": "/"}}]}"#,
            &["limits[0].match", "unknown field `path`"],
        ),
        (
            r#"{"failure_mode": "maybe", "limits": [{"name": "a", "rate": "1/s"}]}"#,
            &["failure_mode", "maybe"],
        ),
        (
            r#"{"header_names": "X-RateLimit", "limits": [{"name": "a", "rate": "1/s"}]}"#,
            &[
                "`header_names`",
                "X-RateLimit",
                "expected `ratelimit` or `x-ratelimit`",
            ],
        ),
        (
            r#"{"namespace": "", "limits": [{"name": "a", "rate": "1/s"}]}"#,
            &["`namespace`", "empty"],
        ),
    ];
    for (config, needles) in cases {
        let e = err(config);
        assert!(e.starts_with("invalid config"), "{config}: {e}");
        for n in *needles {
            assert!(e.contains(n), "{config}: {e:?} lacks {n:?}");
        }
    }
}

#[test]
fn an_ungranted_namespace_is_a_config_error() {
    let e = TestHost::new()
        .configure::<RateLimit>(r#"{"limits": [{"name": "a", "rate": "1/s"}]}"#)
        .err()
        .unwrap();
    assert!(e.contains("`namespace`"), "{e}");
    assert!(e.contains("\"ratelimit\""), "{e}");
    assert!(e.contains("capabilities.kv"), "{e}");
}

#[test]
fn too_many_limits() {
    let limits: Vec<String> = (0..65)
        .map(|i| format!(r#"{{"name": "l{i}", "rate": "1/s"}}"#))
        .collect();
    let e = err(&format!(r#"{{"limits": [{}]}}"#, limits.join(",")));
    assert!(e.contains("`limits`") && e.contains("at most 64"), "{e}");
}
