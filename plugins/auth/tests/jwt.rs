//! JWT verification on the SDK harness: every algorithm with valid, expired,
//! not-yet-valid, badly signed, wrong-issuer and wrong-audience tokens made in
//! the test; token sources; rules (public, allow_missing, claims, no match).

#![allow(clippy::unwrap_used)]

mod common;

use common::{claims, jwks, Signer, NOW};
use legate_plugin_auth::AuthFilter;
use legate_sdk::testing::{FilterTest, Request, TestHost};
use legate_sdk::{Action, LocalResponse};
use serde_json::{json, Value};

const ALGS: [&str; 7] = [
    "HS256", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA",
];
const ISS: &str = "https://id.example.com";

fn filter(config: Value) -> FilterTest<AuthFilter> {
    let host = TestHost::new();
    host.set_wall_time(NOW * 1_000_000_000);
    host.configure::<AuthFilter>(&config.to_string()).unwrap()
}

fn provider(keys: Value) -> Value {
    json!({
        "name": "corp",
        "issuer": ISS,
        "audiences": ["api", "other"],
        "jwks": keys,
        "claim_to_headers": [
            {"claim": "sub", "header": "x-user"},
            {"claim": "org.id", "header": "x-org"}
        ]
    })
}

fn bearer(token: &str) -> Request {
    Request::get("/api/x").header("authorization", format!("Bearer {token}"))
}

fn respond(a: Action) -> LocalResponse {
    match a {
        Action::Respond(r) => r,
        other => panic!("expected a local response, got {other:?}"),
    }
}

fn header(r: &LocalResponse, name: &str) -> String {
    String::from_utf8(r.header_value(name).unwrap_or_default().to_vec()).unwrap()
}

fn assert_invalid(t: &mut FilterTest<AuthFilter>, token: &str, why: &str) {
    let a = t.exchange(bearer(token)).request_headers();
    let r = respond(a);
    assert_eq!(r.status, 401, "{why}");
    assert_eq!(
        header(&r, "www-authenticate"),
        "Bearer realm=\"legate\", error=\"invalid_token\"",
        "{why}"
    );
    assert_eq!(r.details, "auth_invalid_credentials", "{why}");
}

/// A verified token whose `aud` is not accepted: 403 with the invalid-token
/// challenge, as Envoy's jwt_authn (`JwtAudienceNotAllowed` → Forbidden).
fn assert_audience_refused(t: &mut FilterTest<AuthFilter>, token: &str, why: &str) {
    let a = t.exchange(bearer(token)).request_headers();
    let r = respond(a);
    assert_eq!(r.status, 403, "{why}");
    assert_eq!(
        header(&r, "www-authenticate"),
        "Bearer realm=\"legate\", error=\"invalid_token\"",
        "{why}"
    );
    assert_eq!(r.details, "auth_invalid_credentials", "{why}");
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["reason"], "audience not accepted", "{why}");
}

#[test]
fn every_algorithm_accepts_valid_and_rejects_bad_tokens() {
    for alg in ALGS {
        let s = Signer::new(alg);
        let mut t = filter(json!({"providers": [provider(jwks(&[s.jwk("k1")]))]}));

        // Valid: passes with the claims as headers, forged copies replaced.
        let tok = s.token(Some("k1"), &claims(ISS));
        let mut x = t.exchange(bearer(&tok).header("x-user", "mallory"));
        assert_eq!(x.request_headers(), Action::Continue, "{alg}");
        assert_eq!(
            x.request_header("x-user").as_deref(),
            Some("alice"),
            "{alg}"
        );
        assert_eq!(x.request_header("x-org").as_deref(), Some("42"), "{alg}");
        assert!(
            x.request_header("authorization").is_none(),
            "{alg}: removed by default (forward_token: false)"
        );
        drop(x);

        // Without kid: every key that fits the algorithm is tried.
        let mut x = t.exchange(bearer(&s.token(None, &claims(ISS))));
        assert_eq!(x.request_headers(), Action::Continue, "{alg} no kid");
        drop(x);

        // Expired beyond the 60 s skew; expired within it passes.
        let mut c = claims(ISS);
        c["exp"] = json!(NOW - 120);
        assert_invalid(&mut t, &s.token(Some("k1"), &c), &format!("{alg} expired"));
        c["exp"] = json!(NOW - 30);
        let mut x = t.exchange(bearer(&s.token(Some("k1"), &c)));
        assert_eq!(x.request_headers(), Action::Continue, "{alg} within skew");
        drop(x);

        // Not yet valid.
        let mut c = claims(ISS);
        c["nbf"] = json!(NOW + 120);
        assert_invalid(&mut t, &s.token(Some("k1"), &c), &format!("{alg} nbf"));

        // A flipped signature bit, and (except RSA: one key per test run)
        // a token signed by another key under the same kid.
        let tok = s.token(Some("k1"), &claims(ISS));
        assert_invalid(
            &mut t,
            &common::corrupt(&tok),
            &format!("{alg} bad signature"),
        );
        if !alg.starts_with("RS") {
            let other = Signer::new(alg);
            assert_invalid(
                &mut t,
                &other.token(Some("k1"), &claims(ISS)),
                &format!("{alg} other key"),
            );
        }

        // Payload changed after signing.
        let tok = s.token(Some("k1"), &claims(ISS));
        let mut parts: Vec<String> = tok.split('.').map(str::to_owned).collect();
        let mut c = claims(ISS);
        c["sub"] = json!("root");
        parts[1] = common::b64(c.to_string().as_bytes());
        assert_invalid(&mut t, &parts.join("."), &format!("{alg} tampered"));

        // Wrong issuer, wrong audience.
        assert_invalid(
            &mut t,
            &s.token(Some("k1"), &claims("https://evil.example.com")),
            &format!("{alg} issuer"),
        );
        let mut c = claims(ISS);
        c["aud"] = json!(["nope"]);
        assert_audience_refused(&mut t, &s.token(Some("k1"), &c), &format!("{alg} audience"));

        // An audience list containing an accepted one passes.
        c["aud"] = json!(["nope", "other"]);
        let mut x = t.exchange(bearer(&s.token(Some("k1"), &c)));
        assert_eq!(x.request_headers(), Action::Continue, "{alg} aud list");
        drop(x);

        // Unknown kid with inline keys only: rejected, no fetch.
        assert_invalid(
            &mut t,
            &s.token(Some("k9"), &claims(ISS)),
            &format!("{alg} kid"),
        );
        assert!(t.host().callouts().is_empty());
    }
}

#[test]
fn missing_exp_none_alg_and_disallowed_alg_are_rejected() {
    let s = Signer::new("ES256");
    let mut t = filter(json!({"providers": [provider(jwks(&[s.jwk("k1")]))]}));
    let mut c = claims(ISS);
    c.as_object_mut().unwrap().remove("exp");
    assert_invalid(&mut t, &s.token(Some("k1"), &c), "no exp");

    // alg none: header says none, no signature.
    let none = format!(
        "{}.{}.",
        common::b64(br#"{"alg":"none"}"#),
        common::b64(claims(ISS).to_string().as_bytes())
    );
    assert_invalid(&mut t, &none, "alg none");
    assert_invalid(&mut t, "not-a-token", "garbage");

    // A provider pinned to RS256 refuses an ES256 token even with a fitting key.
    let mut p = provider(jwks(&[s.jwk("k1")]));
    p["algorithms"] = json!(["RS256"]);
    let mut t = filter(json!({"providers": [p]}));
    assert_invalid(
        &mut t,
        &s.token(Some("k1"), &claims(ISS)),
        "alg not allowed",
    );

    // require_exp: false accepts a token without exp.
    let mut p = provider(jwks(&[s.jwk("k1")]));
    p["require_exp"] = json!(false);
    let mut t = filter(json!({"providers": [p]}));
    let mut x = t.exchange(bearer(&s.token(Some("k1"), &c)));
    assert_eq!(x.request_headers(), Action::Continue);
}

#[test]
fn hs256_key_cannot_verify_an_rs256_token_header_swap() {
    // Classic confusion: a token claiming HS256 "signed" with an RSA public
    // key's bytes must not verify against an RSA JWK.
    let rs = Signer::new("RS256");
    let mut t = filter(json!({"providers": [provider(jwks(&[rs.jwk("k1")]))]}));
    let hs = Signer::new("HS256");
    assert_invalid(&mut t, &hs.token(Some("k1"), &claims(ISS)), "alg confusion");
}

#[test]
fn missing_token_gets_a_bearer_challenge_without_error() {
    let s = Signer::new("EdDSA");
    let mut t = filter(json!({"realm": "shop", "providers": [provider(jwks(&[s.jwk("k1")]))]}));
    let r = respond(t.exchange(Request::get("/api")).request_headers());
    assert_eq!(r.status, 401);
    assert_eq!(header(&r, "www-authenticate"), "Bearer realm=\"shop\"");
    assert_eq!(r.details, "auth_missing_credentials");
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["error"], "unauthorized");
    // A different scheme in authorization is not a bearer token.
    let r = respond(
        t.exchange(Request::get("/").header("authorization", "Basic Zm9vOmJhcg=="))
            .request_headers(),
    );
    assert_eq!(r.details, "auth_missing_credentials");
}

#[test]
fn the_token_header_is_removed_by_default_and_kept_with_forward_token() {
    // As Envoy's JwtProvider.forward (default false): the verified token's
    // header does not reach the upstream unless asked for.
    let s = Signer::new("ES256");
    let tok = s.token(Some("k1"), &claims(ISS));
    for (forward, expect) in [
        (None, None),
        (Some(false), None),
        (Some(true), Some(format!("Bearer {tok}"))),
    ] {
        let mut p = provider(jwks(&[s.jwk("k1")]));
        if let Some(f) = forward {
            p["forward_token"] = json!(f);
        }
        let mut t = filter(json!({"providers": [p]}));
        let mut x = t.exchange(bearer(&tok));
        assert_eq!(x.request_headers(), Action::Continue);
        assert_eq!(x.request_header("x-user").as_deref(), Some("alice"));
        assert_eq!(
            x.request_header("authorization"),
            expect,
            "forward_token: {forward:?}"
        );
    }
}

#[test]
fn tokens_from_cookie_and_query_and_forward_token_off() {
    let s = Signer::new("ES384");
    let mut p = provider(jwks(&[s.jwk("k1")]));
    p["from"] = json!([
        {"header": "x-token"},
        {"cookie": "session"},
        {"query": "access_token"}
    ]);
    p["forward_token"] = json!(false);
    let mut t = filter(json!({"providers": [p]}));
    let tok = s.token(Some("k1"), &claims(ISS));

    let mut x = t.exchange(Request::get("/").header("cookie", format!("a=1; session={tok}; b=2")));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_header("x-user").as_deref(), Some("alice"));
    drop(x);

    let mut x = t.exchange(Request::get(&format!("/p?x=1&access_token={tok}")));
    assert_eq!(x.request_headers(), Action::Continue);
    drop(x);

    let mut x = t.exchange(Request::get("/").header("x-token", tok.as_str()));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(
        x.request_header("x-token"),
        None,
        "forward_token: false removes it"
    );
    drop(x);

    // The default bearer header is not a source any more.
    let r = respond(t.exchange(bearer(&tok)).request_headers());
    assert_eq!(r.details, "auth_missing_credentials");
}

#[test]
fn rules_public_allow_missing_claims_and_no_match() {
    let s = Signer::new("HS256");
    let cfg = json!({
        "providers": [provider(jwks(&[s.jwk("k1")]))],
        "rules": [
            {"match": {"prefix": "/public"}, "public": true},
            {"match": {"prefix": "/maybe"}, "requires": {"any": ["corp"]}, "allow_missing": true},
            {"match": {"path": "/admin"}, "requires": {"any": ["corp"]}, "claims": {"role": ["admin"]}},
            {"match": {"path": "/write"}, "requires": {"any": ["corp"]}, "claims": {"scope": ["write"]}},
            {"match": {"path": "/ops"}, "requires": {"any": ["corp"]}, "claims": {"role": ["ops"]}},
            {"match": {"prefix": "/api"}, "requires": {"any": ["corp"]}}
        ]
    });
    let mut t = filter(cfg);
    let good = s.token(Some("k1"), &claims(ISS));
    let mut bad_claims = claims(ISS);
    bad_claims["exp"] = json!(NOW - 1000);
    let expired = s.token(Some("k1"), &bad_claims);

    // Public: nothing needed, a forged identity header is still removed.
    let mut x = t.exchange(Request::get("/public/a").header("x-user", "root"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_header("x-user"), None);
    drop(x);

    // allow_missing: no token passes anonymously; a bad one is still 401.
    let mut x = t.exchange(Request::get("/maybe"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_header("x-user"), None);
    drop(x);
    let r = respond(
        t.exchange(Request::get("/maybe").header("authorization", format!("Bearer {expired}")))
            .request_headers(),
    );
    assert_eq!(r.status, 401);

    // Claims: role admin and scope "read write" contain what the rules need.
    for path in ["/admin", "/write"] {
        let mut x =
            t.exchange(Request::get(path).header("authorization", format!("Bearer {good}")));
        assert_eq!(x.request_headers(), Action::Continue, "{path}");
    }
    let r = respond(
        t.exchange(Request::get("/ops").header("authorization", format!("Bearer {good}")))
            .request_headers(),
    );
    assert_eq!(r.status, 403);
    assert_eq!(
        header(&r, "www-authenticate"),
        "Bearer realm=\"legate\", error=\"insufficient_scope\""
    );
    assert_eq!(r.details, "auth_forbidden");

    // No rule matches: 403 (fail closed).
    let r = respond(t.exchange(Request::get("/elsewhere")).request_headers());
    assert_eq!(r.status, 403);
    assert_eq!(r.details, "auth_no_rule");

    let h = t.host();
    assert_eq!(h.counter("auth_decisions_total", &["public"]), Some(1));
    assert_eq!(h.counter("auth_decisions_total", &["anonymous"]), Some(1));
    assert_eq!(h.counter("auth_decisions_total", &["allowed"]), Some(2));
    assert_eq!(h.counter("auth_decisions_total", &["forbidden"]), Some(1));
    assert_eq!(h.counter("auth_decisions_total", &["no_rule"]), Some(1));
    assert_eq!(
        h.counter("auth_decisions_total", &["invalid_credentials"]),
        Some(1)
    );
}

#[test]
fn two_providers_on_one_header_pick_by_issuer() {
    let a = Signer::new("ES256");
    let b = Signer::new("EdDSA");
    let mut pa = provider(jwks(&[a.jwk("a")]));
    let mut pb = provider(jwks(&[b.jwk("b")]));
    pb["name"] = json!("partner");
    pb["issuer"] = json!("https://partner.example");
    pb["claim_to_headers"] = json!([{"claim": "sub", "header": "x-partner-user"}]);
    pa["claim_to_headers"] = json!([{"claim": "sub", "header": "x-user"}]);
    let mut t = filter(json!({"providers": [pa, pb]}));

    let mut x = t.exchange(bearer(
        &b.token(Some("b"), &claims("https://partner.example")),
    ));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_header("x-partner-user").as_deref(), Some("alice"));
    assert_eq!(x.request_header("x-user"), None);
    drop(x);
    let mut x = t.exchange(bearer(&a.token(Some("a"), &claims(ISS))));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_header("x-user").as_deref(), Some("alice"));
}

/// Two providers on one header: a token refused by its own provider (its
/// issuer's) is answered with that provider's reason, not with "wrong issuer"
/// from a provider listed before it. The case: a key rotation at `partner`,
/// whose tokens still carry a `kid` that `corp` also uses, signed with the
/// old key; `corp` says "wrong issuer", `partner` "bad signature", and the
/// operator needs the second. Before, the first provider's reason won.
#[test]
fn a_refused_token_gets_its_own_providers_reason() {
    let old = Signer::new("ES256");
    let new = Signer::new("ES256");
    let corp = provider(jwks(&[old.jwk("k1")]));
    let mut partner = provider(jwks(&[new.jwk("k1")]));
    partner["name"] = json!("partner");
    partner["issuer"] = json!("https://partner.example");
    let mut t = filter(json!({"providers": [corp, partner]}));
    let token = old.token(Some("k1"), &claims("https://partner.example"));
    let r = respond(t.exchange(bearer(&token)).request_headers());
    assert_eq!(r.status, 401);
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["reason"], "bad signature");
    // A token of an issuer no provider has is still "wrong issuer".
    let token = old.token(Some("k1"), &claims("https://elsewhere.example"));
    let r = respond(t.exchange(bearer(&token)).request_headers());
    assert_eq!(r.status, 401);
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["reason"], "wrong issuer");
}

/// A negative `exp` or `nbf` is a date before 1970 (RFC 7519's NumericDate
/// is any JSON number): the token is expired, or valid since then. Before, a
/// negative `exp` was refused as "`exp` is not a number".
#[test]
fn a_negative_numeric_date_is_a_date_before_1970() {
    let s = Signer::new("ES256");
    let mut t = filter(json!({"providers": [provider(jwks(&[s.jwk("k1")]))]}));
    for exp in [json!(-1), json!(-1.5), json!(i64::MIN)] {
        let mut c = claims(ISS);
        c["exp"] = exp.clone();
        let r = respond(
            t.exchange(bearer(&s.token(Some("k1"), &c)))
                .request_headers(),
        );
        assert_eq!(r.status, 401, "exp {exp}");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["reason"], "token expired", "exp {exp}");
    }
    let mut c = claims(ISS);
    c["nbf"] = json!(-100);
    let mut x = t.exchange(bearer(&s.token(Some("k1"), &c)));
    assert_eq!(x.request_headers(), Action::Continue, "nbf before 1970");
    drop(x);
    // What is not a number still says so.
    let mut c = claims(ISS);
    c["exp"] = json!("tomorrow");
    let r = respond(
        t.exchange(bearer(&s.token(Some("k1"), &c)))
            .request_headers(),
    );
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body["reason"], "malformed token: `exp` is not a number");
}

#[test]
fn a_claims_failure_on_one_provider_does_not_block_a_later_one() {
    // Each provider's token is checked against the rule's claims on its own:
    // `corp`'s valid token lacks the role, `partner`'s has it, so the request
    // passes as `partner` (and only `partner`'s identity goes upstream).
    let a = Signer::new("ES256");
    let b = Signer::new("EdDSA");
    let pa = provider(jwks(&[a.jwk("a")]));
    let mut pb = provider(jwks(&[b.jwk("b")]));
    pb["name"] = json!("partner");
    pb["issuer"] = json!("https://partner.example");
    pb["from"] = json!([{"header": "x-partner-token"}]);
    pb["claim_to_headers"] = json!([{"claim": "sub", "header": "x-partner-user"}]);
    let mut t = filter(json!({
        "providers": [pa, pb],
        "rules": [{"match": {"prefix": "/"}, "requires": {"any": ["corp", "partner"]},
                   "claims": {"role": ["admin"]}}]
    }));
    let mut user = claims(ISS);
    user["role"] = json!("user");
    let corp_user = a.token(Some("a"), &user);
    let mut admin = claims("https://partner.example");
    admin["sub"] = json!("bob");
    let partner_admin = b.token(Some("b"), &admin);

    let mut x = t.exchange(
        Request::get("/api/x")
            .header("authorization", format!("Bearer {corp_user}"))
            .header("x-partner-token", partner_admin.as_str()),
    );
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_header("x-partner-user").as_deref(), Some("bob"));
    assert_eq!(x.request_header("x-user"), None);
    drop(x);

    // corp's token alone still fails the claims: 403.
    let r = respond(t.exchange(bearer(&corp_user)).request_headers());
    assert_eq!(r.status, 403);
    assert_eq!(r.details, "auth_forbidden");
    let h = t.host();
    assert_eq!(h.counter("auth_decisions_total", &["allowed"]), Some(1));
    assert_eq!(h.counter("auth_decisions_total", &["forbidden"]), Some(1));
}

#[test]
fn a_short_or_foreign_header_value_falls_through_to_the_next_source() {
    let s = Signer::new("ES256");
    let mut p = provider(jwks(&[s.jwk("k1")]));
    p["from"] = json!([{"header": "authorization", "prefix": "Bearer "}, {"cookie": "session"}]);
    let mut t = filter(json!({"providers": [p]}));
    let tok = s.token(Some("k1"), &claims(ISS));
    for auth in ["x", "Basic Zm9vOmJhcg=="] {
        let mut x = t.exchange(
            Request::get("/")
                .header("authorization", auth)
                .header("cookie", format!("session={tok}")),
        );
        assert_eq!(x.request_headers(), Action::Continue, "{auth}");
    }
}

#[test]
fn a_bearer_value_is_trimmed_and_a_non_utf8_token_is_invalid() {
    let s = Signer::new("EdDSA");
    let mut t = filter(json!({"providers": [provider(jwks(&[s.jwk("k1")]))]}));
    let tok = s.token(Some("k1"), &claims(ISS));
    // Spaces and tabs around the token are the field's, not the token's.
    let mut x =
        t.exchange(Request::get("/api/x").header("authorization", format!("bearer \t{tok} \t")));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_header("x-user").as_deref(), Some("alice"));
    drop(x);
    // The header is read as bytes (no UTF-8 check on the hot path); a token
    // that is not UTF-8 is a bad credential, not a missing one.
    let mut bad = b"Bearer ".to_vec();
    bad.extend_from_slice(tok.as_bytes());
    bad.extend_from_slice(&[0xff, 0xfe]);
    let r = respond(
        t.exchange(Request::get("/api/x").header("authorization", bad))
            .request_headers(),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.details, "auth_invalid_credentials");
    assert_eq!(
        header(&r, "www-authenticate"),
        "Bearer realm=\"legate\", error=\"invalid_token\""
    );
}

#[test]
fn an_api_key_cannot_pass_a_claims_rule() {
    let s = Signer::new("HS256");
    let keys = json!([{"name": "partners",
                       "keys": [{"id": "acme", "sha256": common::sha256_hex("partner-key")}]}]);
    // The reviewer's repro: any valid x-api-key would have passed /admin.
    let host = TestHost::new();
    host.set_wall_time(NOW * 1_000_000_000);
    let repro = json!({
        "providers": [provider(jwks(&[s.jwk("k1")]))],
        "api_keys": keys,
        "rules": [{"match": {"path": "/admin"}, "requires": {"any": ["corp", "partners"]},
                   "claims": {"role": ["admin"]}}]
    });
    match host.configure::<AuthFilter>(&repro.to_string()) {
        Err(e) => assert!(e.contains("rules[0].requires.any[1]"), "{e}"),
        Ok(mut t) => {
            let a = t
                .exchange(Request::get("/admin").header("x-api-key", "partner-key"))
                .request_headers();
            panic!("accepted; an API key on /admin got {a:?}");
        }
    }

    // The form that is accepted: claims on a JWT-only rule; keys elsewhere.
    let mut t = filter(json!({
        "providers": [provider(jwks(&[s.jwk("k1")]))],
        "api_keys": keys,
        "rules": [
            {"match": {"path": "/admin"}, "requires": {"any": ["corp"]}, "claims": {"role": ["admin"]}},
            {"match": {"prefix": "/"}, "requires": {"any": ["corp", "partners"]}}
        ]
    }));
    let r = respond(
        t.exchange(Request::get("/admin").header("x-api-key", "partner-key"))
            .request_headers(),
    );
    assert_eq!(r.status, 401);
    let mut x = t.exchange(Request::get("/orders").header("x-api-key", "partner-key"));
    assert_eq!(x.request_headers(), Action::Continue);
    drop(x);
    let good = s.token(Some("k1"), &claims(ISS));
    let mut x =
        t.exchange(Request::get("/admin").header("authorization", format!("Bearer {good}")));
    assert_eq!(x.request_headers(), Action::Continue);
}

#[test]
fn a_key_without_kid_verifies_a_token_with_a_kid() {
    for alg in ["HS256", "RS256", "ES256", "EdDSA"] {
        let s = Signer::new(alg);
        let other = Signer::new(if alg == "RS256" { "ES256" } else { alg });
        let mut anonymous = s.jwk("x");
        anonymous.as_object_mut().unwrap().remove("kid");
        // Another key holds the token's kid: it is tried first, fails, then
        // the kid-less key verifies.
        let mut t = filter(json!({"providers": [provider(jwks(&[other.jwk("k1"), anonymous]))]}));
        for kid in ["k1", "k9"] {
            let mut x = t.exchange(bearer(&s.token(Some(kid), &claims(ISS))));
            assert_eq!(x.request_headers(), Action::Continue, "{alg} kid {kid}");
            assert_eq!(x.request_header("x-user").as_deref(), Some("alice"));
        }
        // A key under another kid is still not tried.
        let mut t = filter(json!({"providers": [provider(jwks(&[s.jwk("k1")]))]}));
        assert_invalid(&mut t, &s.token(Some("k9"), &claims(ISS)), alg);
        // A forged token is refused by the kid-less key too.
        let mut anonymous = s.jwk("x");
        anonymous.as_object_mut().unwrap().remove("kid");
        let mut t = filter(json!({"providers": [provider(jwks(&[anonymous]))]}));
        assert_invalid(
            &mut t,
            &common::corrupt(&s.token(Some("k9"), &claims(ISS))),
            alg,
        );
    }
}

#[test]
fn audiences_match_without_scheme_and_trailing_slash_as_envoy() {
    let s = Signer::new("ES256");
    let mut p = provider(jwks(&[s.jwk("k1")]));
    p["audiences"] = json!(["https://api.example.com/", "bare.example.com", "http://x/y"]);
    let mut t = filter(json!({ "providers": [p] }));
    // Envoy's sanitizeAudience on both sides: `http://` or `https://` and one
    // trailing `/` removed before comparing.
    for aud in [
        "https://api.example.com/",
        "https://api.example.com",
        "http://api.example.com",
        "api.example.com",
        "api.example.com/",
        "https://bare.example.com/",
        "bare.example.com",
        "x/y/",
        "https://x/y",
    ] {
        let mut c = claims(ISS);
        c["aud"] = json!(aud);
        let mut x = t.exchange(bearer(&s.token(Some("k1"), &c)));
        assert_eq!(x.request_headers(), Action::Continue, "{aud}");
        drop(x);
        c["aud"] = json!(["other.example.com", aud]);
        let mut x = t.exchange(bearer(&s.token(Some("k1"), &c)));
        assert_eq!(x.request_headers(), Action::Continue, "[{aud}]");
    }
    // Anything else still differs: other schemes, paths, case, two slashes.
    for aud in [
        "ftp://api.example.com",
        "https://api.example.com/v1",
        "https://API.example.com",
        "api.example.com//",
        "https://https://api.example.com",
        "x",
    ] {
        let mut c = claims(ISS);
        c["aud"] = json!(aud);
        assert_audience_refused(&mut t, &s.token(Some("k1"), &c), aud);
    }
}

#[test]
fn a_wrong_audience_is_403_only_for_an_otherwise_valid_token() {
    let s = Signer::new("ES256");
    let mut t = filter(json!({"providers": [provider(jwks(&[s.jwk("k1")]))]}));
    let mut c = claims(ISS);
    c["aud"] = json!("elsewhere");
    assert_audience_refused(&mut t, &s.token(Some("k1"), &c), "wrong aud");
    // Expired, or badly signed, and for another audience: 401, as any
    // invalid token (the audience is checked last).
    c["exp"] = json!(NOW - 120);
    assert_invalid(&mut t, &s.token(Some("k1"), &c), "expired, wrong aud");
    let mut c = claims(ISS);
    c["aud"] = json!("elsewhere");
    assert_invalid(
        &mut t,
        &common::corrupt(&s.token(Some("k1"), &c)),
        "bad signature, wrong aud",
    );
}

/// A CORS preflight carries no credential (browsers never send one), so a
/// rule that requires one answers it 401 and the browser never sends the real
/// request. `bypass_cors_preflight: true` lets it through unchecked, as
/// Envoy's jwt_authn option of that name; identity headers are still removed.
/// Off (the default), a preflight is checked like any request.
#[test]
fn cors_preflights_pass_unchecked_only_with_bypass_cors_preflight() {
    let s = Signer::new("HS256");
    let base = json!({
        "providers": [provider(jwks(&[s.jwk("k1")]))],
        "rules": [{"match": {"prefix": "/api"}, "requires": {"any": ["corp"]}}]
    });
    let preflight = || {
        Request::new("OPTIONS", "/api/x")
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization")
            .header("x-user", "root")
    };

    let mut t = filter(base.clone());
    let r = respond(t.exchange(preflight()).request_headers());
    assert_eq!(r.status, 401, "checked like any request by default");
    assert_eq!(
        t.host()
            .counter("auth_decisions_total", &["cors_preflight"]),
        Some(0)
    );

    let mut cfg = base;
    cfg["bypass_cors_preflight"] = json!(true);
    let mut t = filter(cfg);
    let mut x = t.exchange(preflight());
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(
        x.request_header("x-user"),
        None,
        "a forged identity is removed"
    );
    drop(x);
    // Not a preflight: an OPTIONS without `Origin` or without
    // `Access-Control-Request-Method`, or another method with both.
    for req in [
        Request::new("OPTIONS", "/api/x").header("access-control-request-method", "POST"),
        Request::new("OPTIONS", "/api/x").header("origin", "https://app.example.com"),
        Request::new("OPTIONS", "/api/x")
            .header("origin", "")
            .header("access-control-request-method", "POST"),
        Request::get("/api/x")
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "GET"),
    ] {
        let r = respond(t.exchange(req).request_headers());
        assert_eq!(r.status, 401);
    }
    let h = t.host();
    assert_eq!(
        h.counter("auth_decisions_total", &["cors_preflight"]),
        Some(1)
    );
    assert_eq!(
        h.counter("auth_decisions_total", &["missing_credentials"]),
        Some(4)
    );
}
