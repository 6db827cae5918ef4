//! The verified-token cache on the SDK harness, observed through the
//! plugin's counters (`auth_jwt_signature_checks_total`, `auth_jwt_cache_total`),
//! never through timing: a reused token is not re-verified; time-dependent and
//! per-route checks still run on a hit; failures are never cached; a JWKS
//! change flushes the provider's cache (an unchanged refresh does not); size 0
//! disables it; tokens over max_token_size are not kept; the least recently
//! used token is evicted at size.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{claims, corrupt, jwks, Signer, NOW};
use legate_plugin_auth::AuthFilter;
use legate_sdk::callout::CalloutResponse;
use legate_sdk::testing::{FilterTest, Request, TestHost};
use legate_sdk::{Action, Error, LocalResponse};
use serde_json::{json, Value};

const ISS: &str = "https://id.example.com";

fn host() -> TestHost {
    let h = TestHost::new().grant_cluster("idp");
    h.set_wall_time(NOW * 1_000_000_000);
    h
}

fn provider(signer: &Signer, cache: Option<Value>) -> Value {
    let mut p = json!({
        "name": "corp",
        "issuer": ISS,
        "audiences": ["api"],
        "clock_skew_s": 0,
        "jwks": jwks(&[signer.jwk("k1")]),
        "claim_to_headers": [{"claim": "sub", "header": "x-user"}]
    });
    if let Some(c) = cache {
        p["cache"] = c;
    }
    p
}

fn configure(host: &TestHost, cfg: &Value) -> FilterTest<AuthFilter> {
    host.configure::<AuthFilter>(&cfg.to_string()).unwrap()
}

fn bearer(path: &str, token: &str) -> Request {
    Request::get(path).header("authorization", format!("Bearer {token}"))
}

fn respond(a: Action) -> LocalResponse {
    match a {
        Action::Respond(r) => r,
        other => panic!("expected a local response, got {other:?}"),
    }
}

/// Runs one request with `token` on `/api`; the status it gets (200: passed).
fn status(t: &mut FilterTest<AuthFilter>, token: &str) -> u16 {
    let mut x = t.exchange(bearer("/api", token));
    match x.request_headers() {
        Action::Continue => {
            assert_eq!(x.request_header("x-user").as_deref(), Some("alice"));
            200
        }
        Action::Respond(r) => r.status,
        other => panic!("unexpected {other:?}"),
    }
}

fn checks(h: &TestHost) -> u64 {
    h.counter("auth_jwt_signature_checks_total", &["corp"])
        .unwrap()
}

fn hits(h: &TestHost) -> u64 {
    h.counter("auth_jwt_cache_total", &["corp", "hit"]).unwrap()
}

fn misses(h: &TestHost) -> u64 {
    h.counter("auth_jwt_cache_total", &["corp", "miss"])
        .unwrap()
}

#[test]
fn a_reused_token_is_verified_once() {
    for alg in ["RS256", "ES256", "HS256"] {
        let host = host();
        let k = Signer::new(alg);
        let mut t = configure(&host, &json!({"providers": [provider(&k, None)]}));
        let tok = k.token(Some("k1"), &claims(ISS));
        for _ in 0..3 {
            assert_eq!(status(&mut t, &tok), 200, "{alg}");
        }
        assert_eq!(checks(&host), 1, "{alg}: one signature check");
        assert_eq!((hits(&host), misses(&host)), (2, 1), "{alg}");
        // Another token is another entry.
        let mut c = claims(ISS);
        c["jti"] = json!("other");
        assert_eq!(status(&mut t, &k.token(Some("k1"), &c)), 200);
        assert_eq!(checks(&host), 2, "{alg}");
    }
}

#[test]
fn a_cached_token_still_expires_and_is_evicted() {
    let host = host();
    let k = Signer::new("ES256");
    let mut t = configure(&host, &json!({"providers": [provider(&k, None)]}));
    let tok = k.token(Some("k1"), &claims(ISS)); // exp: NOW + 300, skew 0
    assert_eq!(status(&mut t, &tok), 200);
    assert_eq!(status(&mut t, &tok), 200);
    assert_eq!(checks(&host), 1);

    host.advance(Duration::from_secs(300));
    let r = respond(t.exchange(bearer("/api", &tok)).request_headers());
    assert_eq!(r.status, 401);
    assert!(String::from_utf8_lossy(&r.body).contains("token expired"));
    assert_eq!(checks(&host), 1, "refused from the cache");

    // Evicted: with the wall clock stepped back, the token is verified again
    // rather than served from the cache.
    host.set_wall_time(NOW * 1_000_000_000);
    assert_eq!(status(&mut t, &tok), 200);
    assert_eq!(checks(&host), 2);
}

#[test]
fn failures_are_never_cached() {
    let host = host();
    let k = Signer::new("RS256");
    let mut t = configure(&host, &json!({"providers": [provider(&k, None)]}));
    let good = k.token(Some("k1"), &claims(ISS));
    let bad = corrupt(&good);

    // A tampered token first: refused, not remembered; the good one still
    // verifies, and caching it does not let the tampered one (same header and
    // payload, bad signature) in.
    assert_eq!(status(&mut t, &bad), 401);
    assert_eq!(status(&mut t, &bad), 401);
    assert_eq!(checks(&host), 2, "each bad try is verified (and fails)");
    assert_eq!(status(&mut t, &good), 200);
    assert_eq!(status(&mut t, &good), 200);
    assert_eq!(checks(&host), 3);
    assert_eq!(status(&mut t, &bad), 401);
    assert_eq!(checks(&host), 4);
    assert_eq!(hits(&host), 1);

    // Validly signed but failing a claim check (audience, not yet valid):
    // not cached either, so a later request verifies again.
    let mut c = claims(ISS);
    c["aud"] = json!("elsewhere");
    let wrong_aud = k.token(Some("k1"), &c);
    let mut c = claims(ISS);
    c["nbf"] = json!(NOW + 60);
    let early = k.token(Some("k1"), &c);
    assert_eq!(status(&mut t, &wrong_aud), 403);
    assert_eq!(status(&mut t, &early), 401);
    assert_eq!(checks(&host), 6);
    host.advance(Duration::from_secs(61));
    assert_eq!(status(&mut t, &early), 200, "valid now");
    assert_eq!(status(&mut t, &wrong_aud), 403);
    assert_eq!(checks(&host), 8);
    assert_eq!(hits(&host), 1);
}

#[test]
fn route_claims_are_checked_on_a_hit() {
    let host = host();
    let k = Signer::new("ES256");
    let cfg = json!({
        "providers": [provider(&k, None)],
        "rules": [
            {"match": {"prefix": "/admin"}, "requires": {"any": ["corp"]}, "claims": {"role": ["admin"]}},
            {"match": {"prefix": "/"}, "requires": {"any": ["corp"]}}
        ]
    });
    let mut t = configure(&host, &cfg);
    let mut c = claims(ISS);
    c["role"] = json!("user");
    let tok = k.token(Some("k1"), &c);
    assert_eq!(status(&mut t, &tok), 200);
    let r = respond(t.exchange(bearer("/admin", &tok)).request_headers());
    assert_eq!(r.status, 403);
    assert_eq!(hits(&host), 1);
    assert_eq!(checks(&host), 1);
}

#[test]
fn size_zero_disables_the_cache() {
    let host = host();
    let k = Signer::new("ES256");
    let mut t = configure(
        &host,
        &json!({"providers": [provider(&k, Some(json!({"size": 0})))]}),
    );
    let tok = k.token(Some("k1"), &claims(ISS));
    for _ in 0..3 {
        assert_eq!(status(&mut t, &tok), 200);
    }
    assert_eq!(checks(&host), 3);
    assert_eq!((hits(&host), misses(&host)), (0, 0), "no lookups");
}

#[test]
fn a_token_longer_than_max_token_size_is_verified_every_time() {
    let host = host();
    let k = Signer::new("HS256");
    let short = k.token(Some("k1"), &claims(ISS));
    let mut c = claims(ISS);
    c["pad"] = json!("x".repeat(200));
    let long = k.token(Some("k1"), &c);
    assert!(short.len() < long.len());
    let mut t = configure(
        &host,
        &json!({"providers": [provider(&k, Some(json!({"max_token_size": short.len()})))]}),
    );
    for _ in 0..3 {
        assert_eq!(status(&mut t, &long), 200);
    }
    assert_eq!(checks(&host), 3, "the long token is not cached");
    assert_eq!((hits(&host), misses(&host)), (0, 0), "nor looked up");
    for _ in 0..3 {
        assert_eq!(status(&mut t, &short), 200);
    }
    assert_eq!(checks(&host), 4, "a token of max_token_size bytes is");
    assert_eq!((hits(&host), misses(&host)), (2, 1));
}

#[test]
fn the_least_recently_used_token_is_evicted_at_size() {
    let host = host();
    let k = Signer::new("HS256");
    let mut t = configure(
        &host,
        &json!({"providers": [provider(&k, Some(json!({"size": 2})))]}),
    );
    let tok = |n: u32| {
        let mut c = claims(ISS);
        c["jti"] = json!(n);
        k.token(Some("k1"), &c)
    };
    let (a, b, c) = (tok(1), tok(2), tok(3));
    assert_eq!(status(&mut t, &a), 200);
    assert_eq!(status(&mut t, &b), 200);
    assert_eq!(status(&mut t, &a), 200, "a used again: b is the oldest");
    assert_eq!(status(&mut t, &c), 200, "evicts b");
    assert_eq!(checks(&host), 3);
    assert_eq!(status(&mut t, &a), 200);
    assert_eq!(status(&mut t, &c), 200);
    assert_eq!(checks(&host), 3, "a and c are cached");
    assert_eq!(status(&mut t, &b), 200);
    assert_eq!(checks(&host), 4, "b was evicted");
}

#[test]
fn the_default_size_is_100() {
    let host = host();
    let k = Signer::new("HS256");
    let mut t = configure(&host, &json!({"providers": [provider(&k, None)]}));
    let tokens: Vec<String> = (0..101)
        .map(|n| {
            let mut c = claims(ISS);
            c["jti"] = json!(n);
            k.token(Some("k1"), &c)
        })
        .collect();
    for tok in &tokens[1..] {
        assert_eq!(status(&mut t, tok), 200);
    }
    assert_eq!(checks(&host), 100);
    for tok in &tokens[1..] {
        assert_eq!(status(&mut t, tok), 200);
    }
    assert_eq!(checks(&host), 100, "100 fit");
    assert_eq!(status(&mut t, &tokens[0]), 200);
    assert_eq!(status(&mut t, &tokens[1]), 200);
    assert_eq!(checks(&host), 102, "the 101st evicted the oldest");
}

fn jwks_response(keys: &[Value]) -> Result<CalloutResponse, Error> {
    Ok(CalloutResponse::new(200, jwks(keys).to_string()))
}

#[test]
fn a_jwks_change_flushes_the_cache_and_an_unchanged_refresh_does_not() {
    let host = host();
    let cfg = json!({"providers": [{
        "name": "corp",
        "issuer": ISS,
        "remote_jwks": {"cluster": "idp", "path": "/jwks.json",
                         "refresh_interval_s": 300, "min_refetch_interval_s": 30},
        "claim_to_headers": [{"claim": "sub", "header": "x-user"}]
    }]});
    let mut t = configure(&host, &cfg);
    let mut c = claims(ISS);
    c["exp"] = json!(NOW + 3600);
    let k1 = Signer::new("ES256");
    let k2 = Signer::new("ES256");
    let tok1 = k1.token(Some("k1"), &c);
    let tok2 = k2.token(Some("k2"), &c);

    t.tick();
    host.queue_callout_response("idp", jwks_response(&[k1.jwk("k1"), k2.jwk("k2")]));
    assert_eq!(t.deliver_tick_callouts(), 1);
    for tok in [&tok1, &tok2, &tok1, &tok2] {
        assert_eq!(status(&mut t, tok), 200);
    }
    assert_eq!(checks(&host), 2);

    // The same JWKS again: the cache stays.
    host.advance(Duration::from_secs(301));
    t.tick();
    host.queue_callout_response("idp", jwks_response(&[k1.jwk("k1"), k2.jwk("k2")]));
    assert_eq!(t.deliver_tick_callouts(), 1);
    assert_eq!(status(&mut t, &tok1), 200);
    assert_eq!(checks(&host), 2, "unchanged keys: still cached");

    // k1 removed: its cached token stops working at once, and k2's token is
    // verified again against the new set.
    host.advance(Duration::from_secs(301));
    t.tick();
    host.queue_callout_response("idp", jwks_response(&[k2.jwk("k2")]));
    assert_eq!(t.deliver_tick_callouts(), 1);
    let r = respond(t.exchange(bearer("/api", &tok1)).request_headers());
    assert_eq!(r.status, 401);
    assert_eq!(status(&mut t, &tok2), 200);
    assert_eq!(checks(&host), 4);
    assert_eq!(status(&mut t, &tok2), 200);
    assert_eq!(checks(&host), 4, "cached again");
}

#[test]
fn tokens_are_not_logged_by_the_cache() {
    use legate_sdk::log::Level;
    let host = TestHost::new().log_level(Level::Debug);
    host.set_wall_time(NOW * 1_000_000_000);
    let k = Signer::new("ES256");
    let mut t = configure(&host, &json!({"providers": [provider(&k, None)]}));
    let tok = k.token(Some("k1"), &claims(ISS));
    let mut expired = claims(ISS);
    expired["exp"] = json!(NOW - 100);
    let old = k.token(Some("k1"), &expired);
    for x in [&tok, &tok, &old, &corrupt(&tok)] {
        let _ = t.exchange(bearer("/api", x)).request_headers();
    }
    let sig = tok.rsplit('.').next().unwrap();
    for (_, m) in host.logs() {
        assert!(!m.contains(sig) && !m.contains(&tok), "{m}");
    }
}
