//! Config tests: valid configs load with the documented defaults; invalid
//! ones are rejected with a message naming the field.

#![allow(clippy::unwrap_used)]

mod common;

use common::{jwks, sha256_hex, Signer};
use legate_plugin_auth::AuthFilter;
use legate_sdk::testing::{FilterTest, TestHost};
use legate_sdk::Phase;
use serde_json::{json, Value};

/// Loads `cfg` on a host that grants the clusters these configs call, `idp`,
/// `authz` and `a` (a cluster not granted is refused at `configure`:
/// `a_cluster_the_plugin_may_not_call_is_refused_at_its_key`).
fn load(cfg: &Value) -> Result<FilterTest<AuthFilter>, String> {
    TestHost::new()
        .grant_cluster("idp")
        .grant_cluster("authz")
        .grant_cluster("a")
        .configure::<AuthFilter>(&cfg.to_string())
}

fn err(cfg: Value) -> String {
    match load(&cfg) {
        Ok(_) => panic!("accepted: {cfg}"),
        Err(e) => e,
    }
}

/// The error for `cfg`, which must contain `want`.
fn refused(cfg: &Value, want: &str) -> String {
    let e = err(cfg.clone());
    assert!(
        e.contains(want),
        "config {cfg}\n  error: {e}\n  wanted: {want}"
    );
    e
}

fn jwk() -> Value {
    jwks(&[Signer::new("EdDSA").jwk("k1")])
}

fn provider() -> Value {
    json!({"name": "corp", "issuer": "https://id", "jwks": jwk()})
}

#[test]
fn valid_configs_load() {
    let t = load(&json!({"providers": [provider()]})).unwrap();
    let s = t.setup();
    assert!(s.declares(Phase::RequestHeaders));
    assert!(!s.declares(Phase::ResponseHeaders));
    assert_eq!(s.tick_interval_ms(), 0, "no remote JWKS: no tick");
    assert!(t.host().metric_defined("auth_decisions_total"));

    let full = json!({
        "realm": "shop",
        "providers": [{
            "name": "corp", "issuer": "https://id", "audiences": ["api"],
            "algorithms": ["RS256", "ES256", "EdDSA", "HS256", "RS384", "RS512", "ES384"],
            "jwks": jwk(),
            "remote_jwks": {"cluster": "idp", "path": "/jwks"},
            "clock_skew_s": 0, "require_exp": false,
            "from": [{"header": "Authorization", "prefix": "Bearer "}, {"cookie": "s"}, {"query": "t"}],
            "claim_to_headers": [{"claim": "sub", "header": "X-User"}],
            "forward_token": false,
            "cache": {"size": 500, "max_token_size": 8192}
        }],
        "api_keys": [{"name": "keys", "keys": [{"id": "a", "sha256": sha256_hex("k")}],
                      "id_header": "x-key", "forward_key": true}],
        "basic": [{"name": "staff", "htpasswd": ["bob:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ="]}],
        "ext_authz": {"cluster": "authz", "path": "/check", "method": "POST",
                      "forward_headers": ["authorization"], "upstream_headers": ["x-u"],
                      "client_headers": ["www-authenticate"], "timeout_ms": 200,
                      "failure_mode_allow": true, "status_on_error": 503},
        "rules": [
            {"match": {"prefix": "/public"}, "public": true},
            {"match": {"path": "/login"}, "ext_authz": true},
            {"match": {"prefix": "/admin"}, "requires": {"any": ["corp"]},
             "allow_missing": false, "claims": {"role": ["admin"]}, "ext_authz": false},
            {"match": {"prefix": "/"}, "requires": {"any": ["corp", "keys", "staff"]}}
        ]
    });
    let t = load(&full).unwrap();
    assert_eq!(
        t.setup().tick_interval_ms(),
        1000,
        "remote JWKS: ticks refresh it"
    );

    // ext_authz alone is a complete config.
    load(&json!({"ext_authz": {"cluster": "authz"}})).unwrap();
}

#[test]
fn invalid_configs_name_the_field() {
    let cases: Vec<(Value, &str)> = vec![
        (json!(null), "nothing to do"),
        (json!({"bogus": 1}), "unknown field `bogus`"),
        (
            json!({"providers": [{"name": "corp", "issuer": "https://id", "jwks": jwk(), "audience": "x"}]}),
            "providers[0]",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "", "jwks": jwk()}]}),
            "invalid config: field `providers[0].issuer`: must not be empty",
        ),
        (
            json!({"providers": [{"name": "corp", "jwks": jwk()}]}),
            "missing field `issuer`",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i"}]}),
            "invalid config: field `providers[0]`: needs keys",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "algorithms": ["none"]}]}),
            "invalid config: field `providers[0].algorithms[0]`: \"none\" is not supported",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": {"nokeys": []}}]}),
            "invalid config: field `providers[0].jwks`: expected an object with a `keys` array",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": {"keys": [{"kty": "oct", "k": "c2hvcnQ"}]}}]}),
            "invalid config: field `providers[0].jwks.keys[0]`: HS256 secret is 5 bytes",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": {"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}}]}),
            "invalid config: field `providers[0].jwks.keys[0]`: P-256 `x`/`y` must be 32 bytes",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": {"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}}]}),
            "invalid config: field `providers[0].jwks.keys[0]`: ",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": {"keys": [{"kty": "dunno"}]}}]}),
            "invalid config: field `providers[0].jwks`: has no usable key",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "remote_jwks": {"cluster": "idp", "path": "jwks"}}]}),
            "invalid config: field `providers[0].remote_jwks.path`: \"jwks\" must start with `/`",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "remote_jwks": {"cluster": "idp", "path": "/j", "timeout_ms": 0}}]}),
            "invalid config: field `providers[0].remote_jwks.timeout_ms`: 0 is outside 1..=30000",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "from": [{"header": "a", "cookie": "b"}]}]}),
            "invalid config: field `providers[0].from[0]`: set exactly one of `header`, `cookie`, `query`",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "from": [{"cookie": "b", "prefix": "x"}]}]}),
            "invalid config: field `providers[0].from[0].prefix`: only valid with `header`",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "claim_to_headers": [{"claim": "sub", "header": "x user"}]}]}),
            "invalid config: field `providers[0].claim_to_headers[0].header`: \"x user\" is not a valid header name",
        ),
        (
            json!({"providers": [provider(), provider()]}),
            "invalid config: field `providers[1].name`: \"corp\" is already used",
        ),
        (
            json!({"api_keys": [{"name": "k", "keys": [{"id": "a", "sha256": "abc"}]}]}),
            "invalid config: field `api_keys[0].keys[0].sha256`: expected 64 hex digits",
        ),
        (
            json!({"api_keys": [{"name": "k", "keys": []}]}),
            "invalid config: field `api_keys[0].keys`: must list at least one key",
        ),
        (
            json!({"api_keys": [{"name": "k", "keys": [{"id": "a", "sha256": sha256_hex("x")}, {"id": "b", "sha256": sha256_hex("x")}]}]}),
            "invalid config: field `api_keys[0].keys[1].sha256`: the same key is listed twice",
        ),
        (
            json!({"basic": [{"name": "b", "htpasswd": ["alice:plain"]}]}),
            "invalid config: field `basic[0].htpasswd[0]`: unsupported hash",
        ),
        (
            json!({"basic": [{"name": "b", "htpasswd": ["alice"]}]}),
            "invalid config: field `basic[0].htpasswd[0]`: expected `user:hash`",
        ),
        (
            json!({"basic": [{"name": "b", "htpasswd": ["a:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=", "a:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ="]}]}),
            "invalid config: field `basic[0].htpasswd[1]`: user \"a\" is listed twice",
        ),
        (
            json!({"basic": [{"name": "b", "htpasswd": ["a:$2y$99$xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"]}]}),
            "invalid config: field `basic[0].htpasswd[0]`: malformed bcrypt hash",
        ),
        (
            json!({"ext_authz": {"cluster": "a", "path": "check"}}),
            "invalid config: field `ext_authz.path`: \"check\" must start with `/`",
        ),
        (
            json!({"ext_authz": {"cluster": "a", "method": "get"}}),
            "invalid config: field `ext_authz.method`: \"get\" is not an HTTP method",
        ),
        (
            json!({"ext_authz": {"cluster": "a", "status_on_error": 700}}),
            "invalid config: field `ext_authz.status_on_error`: 700 is outside 200..=599",
        ),
        (
            json!({"ext_authz": {"cluster": "a", "timeout_ms": 40000}}),
            "invalid config: field `ext_authz.timeout_ms`: 40000 is outside 1..=30000",
        ),
        (
            json!({"providers": [provider()], "rules": [{"match": {"prefix": "/"}, "requires": {"any": ["nope"]}}]}),
            "invalid config: field `rules[0].requires.any[0]`: no provider, api_keys or basic entry is named \"nope\"",
        ),
        (
            json!({"providers": [provider()], "rules": [{"match": {}, "public": true}]}),
            "invalid config: field `rules[0].match`: set exactly one of `prefix`, `path`",
        ),
        (
            json!({"providers": [provider()], "rules": [{"match": {"prefix": "api"}, "public": true}]}),
            "invalid config: field `rules[0].match.prefix`: \"api\" must start with `/`",
        ),
        (
            json!({"providers": [provider()], "rules": [{"match": {"prefix": "/"}}]}),
            "invalid config: field `rules[0]`: says nothing",
        ),
        (
            json!({"providers": [provider()], "rules": [{"match": {"prefix": "/"}, "public": true, "requires": {"any": ["corp"]}}]}),
            "invalid config: field `rules[0]`: `public: true` and `requires` contradict",
        ),
        (
            json!({"providers": [provider()], "rules": [{"match": {"prefix": "/"}, "public": true, "allow_missing": true}]}),
            "invalid config: field `rules[0].allow_missing`: only valid with `requires`",
        ),
        (
            json!({"api_keys": [{"name": "k", "keys": [{"id": "a", "sha256": sha256_hex("x")}]}],
                "rules": [{"match": {"prefix": "/"}, "requires": {"any": ["k"]}, "claims": {"role": ["a"]}}]}),
            "invalid config: field `rules[0].claims`: needs a JWT provider",
        ),
        (
            json!({"providers": [provider()], "rules": [{"match": {"prefix": "/"}, "requires": {"any": []}}]}),
            "invalid config: field `rules[0].requires.any`: must name at least one authenticator",
        ),
        (
            json!({"providers": [provider()], "realm": "a\"b"}),
            "invalid config: field `realm`: must not contain",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "cache": {"size": 100_001}}]}),
            "invalid config: field `providers[0].cache.size`: 100001 is above 100000",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "cache": {"size": -1}}]}),
            "providers[0]",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "cache": {"size": "big"}}]}),
            "invalid type: string \"big\"",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "cache": {"max_entries": 5}}]}),
            "unknown field `max_entries`, expected `size` or `max_token_size`",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "cache": {"max_token_size": 0}}]}),
            "invalid config: field `providers[0].cache.max_token_size`: 0 is not between 1 and 16384",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "cache": {"max_token_size": 16385}}]}),
            "invalid config: field `providers[0].cache.max_token_size`: 16385 is not between 1 and 16384",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "cache_size": 5}]}),
            "unknown field `cache_size`",
        ),
    ];
    for (cfg, want) in cases {
        refused(&cfg, want);
    }
}

#[test]
fn token_cache_config() {
    // Absent, empty (default size), disabled, the maximum: all load, and the
    // cache metrics exist per provider.
    for cache in [
        None,
        Some(json!({})),
        Some(json!({"size": 0})),
        Some(json!({"size": 100_000})),
        Some(json!({"max_token_size": 1})),
        Some(json!({"size": 10, "max_token_size": 16384})),
    ] {
        let mut p = provider();
        if let Some(c) = &cache {
            p["cache"] = c.clone();
        }
        let t = load(&json!({"providers": [p]})).unwrap();
        let h = t.host();
        assert_eq!(
            h.counter("auth_jwt_cache_total", &["corp", "hit"]),
            Some(0),
            "{cache:?}"
        );
        assert_eq!(
            h.counter("auth_jwt_cache_total", &["corp", "miss"]),
            Some(0)
        );
        assert_eq!(
            h.counter("auth_jwt_signature_checks_total", &["corp"]),
            Some(0)
        );
    }
}

#[test]
fn claims_are_refused_on_a_rule_that_admits_requests_without_a_token() {
    let two = || {
        json!({
            "providers": [provider()],
            "api_keys": [{"name": "partners", "keys": [{"id": "a", "sha256": sha256_hex("x")}]}],
            "basic": [{"name": "staff", "htpasswd": ["bob:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ="]}]
        })
    };
    let with_rules = |rules: Value| {
        let mut c = two();
        c["rules"] = rules;
        c
    };
    // Claims with JWT providers only: fine.
    load(&with_rules(json!([
        {"match": {"path": "/admin"}, "requires": {"any": ["corp"]}, "claims": {"role": ["admin"]}},
        {"match": {"prefix": "/"}, "requires": {"any": ["corp", "partners", "staff"]}}
    ])))
    .unwrap();
    let cases = [
        (
            json!([{"match": {"path": "/admin"}, "requires": {"any": ["corp", "partners"]}, "claims": {"role": ["admin"]}}]),
            "invalid config: field `rules[0].requires.any[1]`: \"partners\" is an api_keys entry, which carries no claims",
        ),
        (
            json!([{"match": {"prefix": "/"}, "public": true},
                   {"match": {"path": "/admin"}, "requires": {"any": ["staff", "corp"]}, "claims": {"role": ["admin"]}}]),
            "invalid config: field `rules[1].requires.any[0]`: \"staff\" is a basic entry, which carries no claims",
        ),
        (
            json!([{"match": {"path": "/admin"}, "requires": {"any": ["corp"]}, "allow_missing": true, "claims": {"role": ["admin"]}}]),
            "invalid config: field `rules[0].allow_missing`: a request with no token would pass without the rule's `claims`",
        ),
    ];
    for (rules, want) in cases {
        let e = refused(&with_rules(rules.clone()), want);
        assert!(e.contains("claims"), "{e}");
    }
}

#[test]
fn an_identity_header_cannot_be_a_credential_header() {
    let keys = |extra: Value| {
        let mut k = json!({"name": "keys", "keys": [{"id": "a", "sha256": sha256_hex("x")}]});
        for (n, v) in extra.as_object().unwrap() {
            k[n] = v.clone();
        }
        k
    };
    // No overlap: an authz service may mint `authorization` for the upstream
    // when no authenticator reads it.
    load(&json!({"api_keys": [keys(json!({}))],
                 "ext_authz": {"cluster": "authz", "upstream_headers": ["authorization"]}}))
    .unwrap();
    let cases = [
        (
            json!({"providers": [provider()],
                   "ext_authz": {"cluster": "authz", "upstream_headers": ["x-u", "Authorization"]}}),
            "invalid config: field `ext_authz.upstream_headers[1]`: \"authorization\" is also a credential header, read by providers[0].from (default)",
        ),
        (
            json!({"api_keys": [keys(json!({"id_header": "x-api-key"}))]}),
            "invalid config: field `api_keys[0].id_header`: \"x-api-key\" is also a credential header, read by api_keys[0].from (default)",
        ),
        (
            json!({"basic": [{"name": "b", "htpasswd": ["bob:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ="],
                              "user_header": "authorization"}]}),
            "invalid config: field `basic[0].user_header`: \"authorization\" is also a credential header, read by basic[0]",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(),
                                  "from": [{"header": "authorization", "prefix": "Bearer "}, {"cookie": "s"}],
                                  "claim_to_headers": [{"claim": "sub", "header": "cookie"}]}]}),
            "invalid config: field `providers[0].claim_to_headers[0].header`: \"cookie\" is also a credential header, read by providers[0].from[1]",
        ),
        (
            json!({"providers": [provider()],
                   "api_keys": [keys(json!({"from": [{"header": "x_token"}]}))],
                   "basic": [{"name": "b", "htpasswd": ["bob:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ="],
                              "user_header": "x-token"}]}),
            "invalid config: field `basic[0].user_header`: \"x-token\" is also a credential header (as \"x_token\", its `_` spelling, also removed), read by api_keys[0].from[0]",
        ),
    ];
    for (cfg, want) in cases {
        let e = refused(&cfg, want);
        assert!(e.contains("write the identity to another header"), "{e}");
    }
}

#[test]
fn host_owned_and_plugin_owned_header_names_are_refused() {
    let authz = |field: &str, list: Value| {
        let mut e = json!({"cluster": "authz"});
        e[field] = list;
        json!({"ext_authz": e})
    };
    // Other names load.
    load(&authz(
        "forward_headers",
        json!(["authorization", "x-forwarded-for", "x-request-id"]),
    ))
    .unwrap();
    load(&authz(
        "client_headers",
        json!(["www-authenticate", "set-cookie", "location", "content-type"]),
    ))
    .unwrap();
    let cases = [
        (
            authz("forward_headers", json!(["authorization", "upgrade"])),
            "invalid config: field `ext_authz.forward_headers[1]`: \"upgrade\" is a connection or framing field, which the host refuses in a callout",
        ),
        (
            authz("forward_headers", json!(["Content-Length"])),
            "invalid config: field `ext_authz.forward_headers[0]`: \"content-length\" is a connection or framing field",
        ),
        (
            authz("forward_headers", json!(["te"])),
            "invalid config: field `ext_authz.forward_headers[0]`: \"te\" is a connection",
        ),
        (
            authz("forward_headers", json!(["x-forwarded-uri"])),
            "invalid config: field `ext_authz.forward_headers[0]`: \"x-forwarded-uri\" is sent by the plugin itself",
        ),
        (
            authz("forward_headers", json!(["cookie", "X-Forwarded-Host"])),
            "invalid config: field `ext_authz.forward_headers[1]`: \"x-forwarded-host\" is sent by the plugin itself",
        ),
        (
            authz("upstream_headers", json!(["connection"])),
            "invalid config: field `ext_authz.upstream_headers[0]`: \"connection\" is a connection or framing field, which the host owns",
        ),
        (
            authz("client_headers", json!(["www-authenticate", "Content-Length"])),
            "invalid config: field `ext_authz.client_headers[1]`: \"content-length\" is a connection or framing field: in the plugin's answer the host drops it or sets its own",
        ),
        (
            authz("client_headers", json!(["transfer-encoding"])),
            "invalid config: field `ext_authz.client_headers[0]`: \"transfer-encoding\" is a connection",
        ),
        (
            authz("client_headers", json!(["set-cookie", "Set-Cookie"])),
            "invalid config: field `ext_authz.client_headers[1]`: \"set-cookie\" is listed twice",
        ),
        (
            authz("forward_headers", json!(["cookie", "COOKIE"])),
            "invalid config: field `ext_authz.forward_headers[1]`: \"cookie\" is listed twice",
        ),
        (
            json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(),
                                  "claim_to_headers": [{"claim": "sub", "header": "transfer-encoding"}]}]}),
            "invalid config: field `providers[0].claim_to_headers[0].header`: \"transfer-encoding\" is a connection",
        ),
        (
            json!({"api_keys": [{"name": "k", "keys": [{"id": "a", "sha256": sha256_hex("x")}],
                                 "id_header": "Host"}]}),
            "invalid config: field `api_keys[0].id_header`: \"host\" is a connection",
        ),
        (
            json!({"basic": [{"name": "b", "htpasswd": ["bob:{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ="],
                              "user_header": "trailer"}]}),
            "invalid config: field `basic[0].user_header`: \"trailer\" is a connection",
        ),
    ];
    for (cfg, want) in cases {
        refused(&cfg, want);
    }
}

/// A rule path that no request path (as filters see it: no query, normalized
/// by the host) can have is refused: the rule would never match, and requests
/// would fall through to a later rule.
#[test]
fn rule_paths_that_could_never_match_are_refused() {
    let rule = |kind: &str, p: &str| {
        json!({"providers": [provider()],
               "rules": [{"match": {kind: p}, "public": true},
                         {"match": {"prefix": "/"}, "requires": {"any": ["corp"]}}]})
    };
    for p in [
        "/",
        "/api/",
        "/~user",
        "/a%2Fb",
        "/caf%C3%A9",
        "/v1/items:batchGet",
        "/a//b",
        "/.well-known/x",
    ] {
        for kind in ["prefix", "path"] {
            load(&rule(kind, p)).unwrap_or_else(|e| panic!("{kind} {p}: {e}"));
        }
    }
    let never = "would never match: ";
    for (p, why) in [
        (
            "/api?x=1",
            "rules match the path without its query; remove \"?x=1\"",
        ),
        ("/api/*", "`*` is not a wildcard"),
        ("/api*", "`*` is not a wildcard"),
        ("/docs#top", "a fragment"),
        (
            "/public/../admin",
            "the host resolves `.` and `..` segments",
        ),
        ("/a/./b", "the host resolves `.` and `..` segments"),
        ("/..", "the host resolves `.` and `..` segments"),
        (
            "/%7euser",
            "at byte 1: the host decodes `%7e` to `~` before filters run; write `~`",
        ),
        ("/%41dmin", "at byte 1: the host decodes `%41` to `A`"),
        (
            "/a%2fb",
            "at byte 2: the host writes escapes in upper case before filters run; write `%2F`",
        ),
        (
            "/a%2",
            "at byte 2: `%` must start an escape of two hex digits",
        ),
        (
            "/a%zz",
            "at byte 2: `%` must start an escape of two hex digits",
        ),
        (
            "/a b",
            "at byte 2: a space arrives percent-encoded; write `%20`",
        ),
        (
            "/caf\u{e9}",
            "at byte 4: this character arrives percent-encoded",
        ),
        ("/a\tb", "at byte 2: control characters"),
    ] {
        for kind in ["prefix", "path"] {
            let want = format!("invalid config: field `rules[0].match.{kind}`: {p:?} {never}{why}");
            refused(&rule(kind, p), &want);
        }
    }
}

#[test]
fn remote_jwks_ext_authz_rules_and_skew_limits() {
    let remote = |extra: Value| {
        let mut r = json!({"cluster": "idp", "path": "/jwks"});
        for (n, v) in extra.as_object().unwrap() {
            r[n] = v.clone();
        }
        json!({"providers": [{"name": "corp", "issuer": "i", "remote_jwks": r}]})
    };
    let skew = |s: u64| json!({"providers": [{"name": "corp", "issuer": "i", "jwks": jwk(), "clock_skew_s": s}]});
    let authz_path = |p: &str| json!({"ext_authz": {"cluster": "authz", "path": p}});
    for ok in [
        remote(json!({"authority": "id.example.com"})),
        remote(json!({"authority": "id.example.com:8443"})),
        remote(json!({"authority": "10.0.0.1:80"})),
        remote(json!({"authority": "[::1]:8443"})),
        remote(json!({"authority": "[2001:db8::1]"})),
        remote(json!({"authority": "idp_internal"})),
        remote(json!({"path": "/.well-known/jwks.json?tenant=a%20b&x=~1:@!$'()*+,;="})),
        remote(json!({"min_refetch_interval_s": 1})),
        skew(0),
        skew(300),
        authz_path("/v1/check?mode=strict"),
    ] {
        load(&ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    let not_authority = "is not `host[:port]`";
    let cases = [
        (remote(json!({"authority": "id.example.com/jwks"})), not_authority),
        (remote(json!({"authority": "https://id.example.com"})), not_authority),
        (remote(json!({"authority": "user@id.example.com"})), not_authority),
        (remote(json!({"authority": "id example.com"})), not_authority),
        (remote(json!({"authority": ""})), not_authority),
        (remote(json!({"authority": "id.example.com:"})), not_authority),
        (remote(json!({"authority": "id.example.com:99999"})), not_authority),
        (remote(json!({"authority": "id.example.com:0"})), not_authority),
        (remote(json!({"authority": "::1"})), not_authority),
        (remote(json!({"authority": "[::1]x"})), not_authority),
        (remote(json!({"authority": "[id]"})), not_authority),
        (
            remote(json!({"path": "/jwks json"})),
            "invalid config: field `providers[0].remote_jwks.path`: \"/jwks json\" is not a request path (origin-form `/path?query`): at byte 5: a space must be percent-encoded",
        ),
        (
            remote(json!({"path": "/jwks#keys"})),
            "invalid config: field `providers[0].remote_jwks.path`: \"/jwks#keys\" is not a request path (origin-form `/path?query`): at byte 5: a fragment",
        ),
        (remote(json!({"path": "/jwks\n"})), "control characters are not allowed"),
        (remote(json!({"path": "/a%2"})), "`%` must start an escape"),
        (remote(json!({"path": "/a\"b"})), "must be percent-encoded"),
        (
            authz_path("/check?a=b c"),
            "invalid config: field `ext_authz.path`: \"/check?a=b c\" is not a request path",
        ),
        (authz_path("/check#x"), "invalid config: field `ext_authz.path`: \"/check#x\" is not a request path"),
        (
            remote(json!({"min_refetch_interval_s": 0})),
            "invalid config: field `providers[0].remote_jwks.min_refetch_interval_s`: must be at least 1",
        ),
        (
            json!({"providers": [provider()], "rules": []}),
            "invalid config: field `rules`: an empty list matches no request, so every request would be refused",
        ),
        (
            skew(301),
            "invalid config: field `providers[0].clock_skew_s`: 301 is above 300",
        ),
    ];
    for (cfg, want) in cases {
        let e = refused(&cfg, want);
        if want == not_authority {
            assert!(
                e.starts_with("invalid config: field `providers[0].remote_jwks.authority`: "),
                "{e}"
            );
        }
    }
}

#[test]
fn a_cluster_the_plugin_may_not_call_is_refused_at_its_key() {
    let only_idp = |cfg: &Value| {
        TestHost::new()
            .grant_cluster("idp")
            .configure::<AuthFilter>(&cfg.to_string())
            .err()
            .unwrap_or_default()
    };
    let remote = json!({"providers": [
        {"name": "a", "issuer": "i", "jwks": jwk()},
        {"name": "b", "issuer": "j", "remote_jwks": {"cluster": "keys", "path": "/jwks"}}
    ]});
    assert_eq!(
        only_idp(&remote),
        "invalid config: field `providers[1].remote_jwks.cluster`: this plugin may not call \
         cluster `keys`"
    );
    assert_eq!(
        only_idp(&json!({"ext_authz": {"cluster": "authz"}})),
        "invalid config: field `ext_authz.cluster`: this plugin may not call cluster `authz`"
    );
    // Granted: loads.
    let ok = json!({"providers": [
        {"name": "b", "issuer": "j", "remote_jwks": {"cluster": "idp", "path": "/jwks"}}
    ]});
    assert_eq!(only_idp(&ok), "");
}
