//! Callout flows and the other authenticators on the SDK harness: remote JWKS
//! (cold fetch, caching, kid rotation with rate-limited refetch, failures,
//! tick refresh), API keys, HTTP Basic (bcrypt and {SHA}), external
//! authorization (allow, deny, a denial over the host's caps on a local
//! response, timeout and 5xx errors, failure_mode_allow),
//! and that no secret reaches the logs.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{claims, jwks, sha256_hex, Signer, NOW};
use legate_plugin_auth::AuthFilter;
use legate_sdk::callout::CalloutResponse;
use legate_sdk::testing::{Request, TestHost};
use legate_sdk::{Action, Error, LocalResponse};
use serde_json::{json, Value};

const ISS: &str = "https://id.example.com";

fn host() -> TestHost {
    let h = TestHost::new().grant_cluster("idp").grant_cluster("authz");
    h.set_wall_time(NOW * 1_000_000_000);
    h
}

fn respond(a: Action) -> LocalResponse {
    match a {
        Action::Respond(r) => r,
        other => panic!("expected a local response, got {other:?}"),
    }
}

fn remote_cfg() -> Value {
    json!({"providers": [{
        "name": "corp",
        "issuer": ISS,
        "remote_jwks": {"cluster": "idp", "path": "/jwks.json", "authority": "id.example.com",
                         "refresh_interval_s": 300, "min_refetch_interval_s": 30},
        "claim_to_headers": [{"claim": "sub", "header": "x-user"}]
    }]})
}

fn jwks_response(keys: &[Value]) -> Result<CalloutResponse, Error> {
    Ok(
        CalloutResponse::new(200, jwks(keys).to_string())
            .header("content-type", "application/json"),
    )
}

fn bearer(token: &str) -> Request {
    Request::get("/").header("authorization", format!("Bearer {token}"))
}

#[test]
fn remote_jwks_is_fetched_once_cached_and_refetched_on_rotation() {
    let host = host();
    let mut t = host
        .configure::<AuthFilter>(&remote_cfg().to_string())
        .unwrap();
    assert_eq!(t.setup().tick_interval_ms(), 1000);
    // The test moves the clock by minutes: long-lived tokens.
    let long = || {
        let mut c = claims(ISS);
        c["exp"] = json!(NOW + 3600);
        c
    };
    let k1 = Signer::new("ES256");
    let tok1 = k1.token(Some("k1"), &long());

    // Cold: the exchange pauses on a fetch, then verifies with what arrived.
    host.queue_callout_response("idp", jwks_response(&[k1.jwk("k1")]));
    let mut x = t.exchange(bearer(&tok1));
    assert_eq!(x.request_headers(), Action::Pause);
    assert!(x.may_pause());
    assert!(!x.detached(), "detached while waiting for the keys");
    let sent = host.callouts();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].request.cluster, "idp");
    assert_eq!(sent[0].request.path, "/jwks.json");
    assert_eq!(sent[0].request.authority.as_deref(), Some("id.example.com"));
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    assert_eq!(x.request_header("x-user").as_deref(), Some("alice"));
    // Decided: no more calls for the exchange, and its context is freed.
    assert!(x.detached());
    drop(x);
    assert_eq!(t.live_contexts(), 0);

    // Cached: no more callouts.
    let mut x = t.exchange(bearer(&tok1));
    assert_eq!(x.request_headers(), Action::Continue);
    drop(x);
    assert_eq!(host.callouts().len(), 1);

    // Rotation: a token with a new kid triggers one refetch.
    let k2 = Signer::new("EdDSA");
    let tok2 = k2.token(Some("k2"), &long());
    host.advance(Duration::from_secs(31));
    host.queue_callout_response("idp", jwks_response(&[k1.jwk("k1"), k2.jwk("k2")]));
    let mut x = t.exchange(bearer(&tok2));
    assert_eq!(x.request_headers(), Action::Pause);
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    drop(x);
    assert_eq!(host.callouts().len(), 2);

    // Another unknown kid right after: rate-limited, 401 without a fetch.
    let k3 = Signer::new("ES256");
    let tok3 = k3.token(Some("k3"), &long());
    let r = respond(t.exchange(bearer(&tok3)).request_headers());
    assert_eq!(r.status, 401);
    assert_eq!(host.callouts().len(), 2);

    // After min_refetch_interval_s it may fetch again; the JWKS still lacks
    // k3, so the token is refused after that one fetch.
    host.advance(Duration::from_secs(31));
    host.queue_callout_response("idp", jwks_response(&[k1.jwk("k1"), k2.jwk("k2")]));
    let mut x = t.exchange(bearer(&tok3));
    assert_eq!(x.request_headers(), Action::Pause);
    let a = x.deliver_callouts();
    assert!(
        matches!(&a[..], [Action::Respond(r)] if r.status == 401),
        "{a:?}"
    );
    drop(x);
    assert_eq!(host.callouts().len(), 3);
    assert_eq!(host.counter("auth_jwks_fetches_total", &["ok"]), Some(3));

    // Keys the new JWKS dropped stop working: k1 removed.
    host.advance(Duration::from_secs(301));
    t.tick();
    assert_eq!(host.callouts().len(), 4, "tick refreshes stale keys");
    assert!(host.callouts()[3].context.is_none());
    host.queue_callout_response("idp", jwks_response(&[k2.jwk("k2")]));
    assert_eq!(t.deliver_tick_callouts(), 1);
    let r = respond(t.exchange(bearer(&tok1)).request_headers());
    assert_eq!(r.status, 401);
    let mut x = t.exchange(bearer(&tok2));
    assert_eq!(x.request_headers(), Action::Continue);
}

#[test]
fn remote_jwks_failure_is_503_then_backs_off() {
    let host = host();
    let mut t = host
        .configure::<AuthFilter>(&remote_cfg().to_string())
        .unwrap();
    let k = Signer::new("ES256");
    let tok = k.token(Some("k1"), &claims(ISS));

    host.queue_callout_response("idp", Err(Error::Timeout));
    let mut x = t.exchange(bearer(&tok));
    assert_eq!(x.request_headers(), Action::Pause);
    let a = x.deliver_callouts();
    match &a[..] {
        [Action::Respond(r)] => {
            assert_eq!(r.status, 503);
            assert_eq!(r.details, "auth_jwks_unavailable");
        }
        other => panic!("{other:?}"),
    }
    drop(x);
    // The warning says where the keys were fetched from.
    assert!(host.logged(
        legate_sdk::log::Level::Warn,
        "provider \"corp\": JWKS fetch failed (cluster \"idp\", path \"/jwks.json\")"
    ));

    // Within the backoff: 503 at once, no fetch.
    let r = respond(t.exchange(bearer(&tok)).request_headers());
    assert_eq!(r.status, 503);
    assert_eq!(host.callouts().len(), 1);

    // A bad document counts as a failure too; then a good one recovers.
    host.advance(Duration::from_secs(31));
    host.queue_callout_response("idp", Ok(CalloutResponse::new(200, "{not json")));
    let mut x = t.exchange(bearer(&tok));
    assert_eq!(x.request_headers(), Action::Pause);
    assert!(matches!(&x.deliver_callouts()[..], [Action::Respond(r)] if r.status == 503));
    drop(x);
    assert_eq!(host.counter("auth_jwks_fetches_total", &["error"]), Some(2));

    host.advance(Duration::from_secs(31));
    host.queue_callout_response("idp", jwks_response(&[k.jwk("k1")]));
    let mut x = t.exchange(bearer(&tok));
    assert_eq!(x.request_headers(), Action::Pause);
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
}

#[test]
fn a_malformed_key_in_a_remote_jwks_is_skipped_not_fatal() {
    use legate_sdk::log::Level;
    let host = host();
    let mut t = host
        .configure::<AuthFilter>(&remote_cfg().to_string())
        .unwrap();
    let mut c = claims(ISS);
    c["exp"] = json!(NOW + 3600);
    let k1 = Signer::new("ES256");
    // A supported type with a bad member: a 1-byte RSA modulus, a P-256 point
    // of the wrong size.
    let bad_rsa = json!({"kty": "RSA", "kid": "old", "n": "AQAB", "e": "AQAB"});
    let bad_ec = json!({"kty": "EC", "crv": "P-256", "kid": "bad", "x": "AA", "y": "AA"});
    host.queue_callout_response(
        "idp",
        jwks_response(&[bad_rsa.clone(), k1.jwk("k1"), bad_ec.clone()]),
    );
    let mut x = t.exchange(bearer(&k1.token(Some("k1"), &c)));
    assert_eq!(x.request_headers(), Action::Pause);
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    drop(x);
    assert_eq!(
        host.counter("auth_jwks_fetches_total", &["partial"]),
        Some(1)
    );
    assert_eq!(host.counter("auth_jwks_fetches_total", &["error"]), Some(0));
    assert!(host.logged(Level::Warn, "2 malformed key(s), skipped"));

    // Nothing usable left: a failed fetch; the keys held stay in use.
    host.advance(Duration::from_secs(301));
    t.tick();
    host.queue_callout_response("idp", jwks_response(&[bad_rsa, bad_ec]));
    assert_eq!(t.deliver_tick_callouts(), 1);
    assert_eq!(host.counter("auth_jwks_fetches_total", &["error"]), Some(1));
    assert!(host.logged(Level::Warn, "no usable key (2 malformed"));
    let mut x = t.exchange(bearer(&k1.token(Some("k1"), &c)));
    assert_eq!(x.request_headers(), Action::Continue);
}

#[test]
fn remote_jwks_cluster_not_granted_is_refused_at_configure() {
    // It was loaded and answered every request 503; a config whose keys can
    // never be fetched is now refused where it names the cluster.
    let err = TestHost::new()
        .configure::<AuthFilter>(&remote_cfg().to_string())
        .err()
        .unwrap_or_default();
    assert!(
        err.starts_with(
            "invalid config: field `providers[0].remote_jwks.cluster`: this plugin may not call \
             cluster `idp`"
        ),
        "{err}"
    );
}

fn keys_cfg() -> Value {
    json!({
        "api_keys": [{
            "name": "keys",
            "from": [{"header": "x-api-key"}, {"query": "api_key"}],
            "keys": [{"id": "team-a", "sha256": sha256_hex("s3cret-key-a")},
                     {"id": "team-b", "sha256": sha256_hex("s3cret-key-b")}]
        }]
    })
}

#[test]
fn api_keys_forward_the_id_not_the_key() {
    let mut t = host()
        .configure::<AuthFilter>(&keys_cfg().to_string())
        .unwrap();
    let mut x = t.exchange(
        Request::get("/")
            .header("x-api-key", "s3cret-key-b")
            .header("x-api-key-id", "forged"),
    );
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_header("x-api-key-id").as_deref(), Some("team-b"));
    assert_eq!(x.request_header("x-api-key"), None);
    assert!(x.detached(), "decided in the request headers");
    drop(x);
    assert_eq!(t.live_contexts(), 0);

    let mut x = t.exchange(Request::get("/a?api_key=s3cret%2Dkey%2Da"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_header("x-api-key-id").as_deref(), Some("team-a"));
    drop(x);

    let r = respond(
        t.exchange(Request::get("/").header("x-api-key", "guess"))
            .request_headers(),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.details, "auth_invalid_credentials");
    assert_eq!(
        r.header_value("www-authenticate"),
        Some(&b"ApiKey realm=\"legate\""[..])
    );
    let r = respond(t.exchange(Request::get("/")).request_headers());
    assert_eq!(r.details, "auth_missing_credentials");
}

#[test]
fn an_identity_header_spelled_with_underscores_is_removed_too() {
    // CGI/WSGI-style upstreams read x_api_key_id as HTTP_X_API_KEY_ID, the same
    // variable as the x-api-key-id this plugin writes.
    let mut cfg = keys_cfg();
    cfg["rules"] = json!([
        {"match": {"prefix": "/open"}, "public": true},
        {"match": {"prefix": "/"}, "requires": {"any": ["keys"]}}
    ]);
    let mut t = host().configure::<AuthFilter>(&cfg.to_string()).unwrap();
    // Declared to the host, which removes them before any filter on every
    // route of the listener (also where a route disables the plugin).
    assert_eq!(
        t.sanitized_request_headers(),
        vec!["x-api-key-id", "x_api_key_id"]
    );
    for req in [
        Request::get("/x").header("x-api-key", "s3cret-key-a"),
        Request::get("/open"),
    ] {
        let mut x = t.exchange(req.header("x_api_key_id", "forged"));
        assert_eq!(x.request_headers(), Action::Continue);
        assert_eq!(x.request_header("x_api_key_id"), None);
    }
}

/// An htpasswd `{SHA}` hash of `password` (without the prefix).
fn sha_hash(password: &str) -> String {
    use base64::Engine as _;
    use sha1::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(password.as_bytes()))
}

/// An `authorization: Basic` value.
fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[test]
fn basic_bcrypt_and_sha() {
    let bcrypt_hash = bcrypt::hash("open sesame", 4)
        .unwrap()
        .replacen("$2b$", "$2y$", 1);
    let sha = sha_hash("hunter2");
    let cfg = json!({"basic": [{
        "name": "staff",
        "realm": "staff area",
        "htpasswd": [format!("alice:{bcrypt_hash}"), format!("bob:{{SHA}}{sha}")]
    }]});
    let mut t = host().configure::<AuthFilter>(&cfg.to_string()).unwrap();
    for (u, p) in [
        ("alice", "open sesame"),
        ("bob", "hunter2"),
        ("alice", "open sesame"),
    ] {
        let mut x = t.exchange(Request::get("/").header("authorization", basic(u, p)));
        assert_eq!(x.request_headers(), Action::Continue, "{u}");
        assert_eq!(x.request_header("x-user").as_deref(), Some(u));
        assert_eq!(x.request_header("authorization"), None);
    }
    for (u, p) in [("alice", "wrong"), ("bob", "open sesame"), ("carol", "x")] {
        let r = respond(
            t.exchange(Request::get("/").header("authorization", basic(u, p)))
                .request_headers(),
        );
        assert_eq!(r.status, 401, "{u}");
        assert_eq!(
            r.header_value("www-authenticate"),
            Some(&b"Basic realm=\"staff area\""[..])
        );
    }
}

/// An unknown user's password is hashed as a known user's wrong one is (against
/// the costliest listed hash), so the 401 does not come sooner and tell which
/// users exist; a remembered success hashes nothing.
#[test]
fn basic_unknown_users_cost_a_password_check() {
    let cheap = bcrypt::hash("open sesame", 4).unwrap();
    let costly = bcrypt::hash("swordfish", 5).unwrap();
    let sha = sha_hash("hunter2");
    let cfg = json!({"basic": [{"name": "staff", "htpasswd": [
        format!("alice:{cheap}"), format!("bob:{{SHA}}{sha}"), format!("dave:{costly}")
    ]}]});
    let h = host();
    let mut t = h.configure::<AuthFilter>(&cfg.to_string()).unwrap();
    let count = || h.counter("auth_basic_password_checks_total", &["staff"]);
    assert_eq!(count(), Some(0));
    for (u, p, ok, checks) in [
        ("alice", "open sesame", true, 1),
        // Remembered: no hash.
        ("alice", "open sesame", true, 1),
        ("alice", "wrong", false, 2),
        ("bob", "wrong", false, 3),
        // Unknown: hashed all the same.
        ("carol", "x", false, 4),
        // The dummy is a listed user's hash: its password still admits no one
        // else.
        ("carol", "swordfish", false, 5),
    ] {
        let a = t
            .exchange(Request::get("/").header("authorization", basic(u, p)))
            .request_headers();
        assert_eq!(a == Action::Continue, ok, "{u}:{p}: {a:?}");
        assert_eq!(count(), Some(checks), "after {u}:{p}");
    }
}

fn authz_cfg(failure_mode_allow: bool) -> Value {
    json!({
        "api_keys": [{"name": "keys", "keys": [{"id": "team-a", "sha256": sha256_hex("k-a")}]}],
        "ext_authz": {
            "cluster": "authz", "path": "/check", "timeout_ms": 250,
            "forward_headers": ["x-api-key-id", "x-tenant"],
            "upstream_headers": ["x-authz-user"],
            "failure_mode_allow": failure_mode_allow
        },
        "rules": [
            {"match": {"prefix": "/open"}, "public": true},
            {"match": {"prefix": "/"}, "requires": {"any": ["keys"]}}
        ]
    })
}

#[test]
fn ext_authz_allow_copies_headers_and_sees_the_identity() {
    let host = host();
    let mut t = host
        .configure::<AuthFilter>(&authz_cfg(false).to_string())
        .unwrap();
    host.queue_callout_response(
        "authz",
        Ok(CalloutResponse::new(200, "")
            .header("x-authz-user", "alice")
            .header("x-internal", "not copied")),
    );
    let mut x = t.exchange(
        Request::get("/orders?id=1")
            .header("x-api-key", "k-a")
            .header("x-tenant", "t1"),
    );
    assert_eq!(x.request_headers(), Action::Pause);
    let c = &host.callouts()[0].request;
    assert_eq!(
        (c.cluster.as_str(), c.method.as_str(), c.path.as_str()),
        ("authz", "GET", "/check")
    );
    assert_eq!(c.timeout_ms, 250);
    let h = |n: &str| {
        c.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
    };
    assert_eq!(h("x-api-key-id").as_deref(), Some("team-a"));
    assert_eq!(h("x-tenant").as_deref(), Some("t1"));
    assert_eq!(h("x-forwarded-uri").as_deref(), Some("/orders?id=1"));
    assert_eq!(h("x-api-key"), None, "the key itself is not forwarded");
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
    assert_eq!(x.request_header("x-authz-user").as_deref(), Some("alice"));
    assert_eq!(x.request_header("x-internal"), None);
    drop(x);

    // A public rule skips ext_authz; an unauthenticated request never reaches it.
    // A client's own x-authz-user is dropped either way: only the check sets it.
    let mut x = t.exchange(Request::get("/open").header("x-authz-user", "admin"));
    assert_eq!(x.request_headers(), Action::Continue);
    assert_eq!(x.request_header("x-authz-user"), None);
    drop(x);
    let r = respond(t.exchange(Request::get("/x")).request_headers());
    assert_eq!(r.status, 401);
    assert_eq!(host.callouts().len(), 1);
}

/// The check request carries the request's `x-request-id`, as Envoy's
/// ext_authz forwards it, so the check service's logs correlate with the
/// access log; once, whether or not `forward_headers` lists it. Before, it
/// carried none unless listed.
#[test]
fn ext_authz_check_carries_the_request_id() {
    for listed in [false, true] {
        let host = host();
        let mut cfg = authz_cfg(false);
        if listed {
            cfg["ext_authz"]["forward_headers"] = json!(["x-request-id", "x-api-key-id"]);
        }
        let mut t = host.configure::<AuthFilter>(&cfg.to_string()).unwrap();
        host.queue_callout_response("authz", Ok(CalloutResponse::new(200, "")));
        host.queue_callout_response("authz", Ok(CalloutResponse::new(200, "")));
        let mut x = t.exchange(
            Request::get("/orders")
                .header("x-api-key", "k-a")
                .header("x-request-id", "4f0c-rid"),
        );
        assert_eq!(x.request_headers(), Action::Pause);
        assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
        drop(x);
        // A request without one (`generate_request_id: false`): none.
        let mut x = t.exchange(Request::get("/orders").header("x-api-key", "k-a"));
        assert_eq!(x.request_headers(), Action::Pause);
        drop(x);
        let ids = |i: usize| -> Vec<String> {
            host.callouts()[i]
                .request
                .headers
                .iter()
                .filter(|(k, _)| k == "x-request-id")
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
                .collect()
        };
        assert_eq!(ids(0), ["4f0c-rid"], "listed: {listed}");
        assert_eq!(ids(1), Vec::<String>::new(), "listed: {listed}");
    }
}

#[test]
fn ext_authz_deny_passes_status_and_body_back() {
    let host = host();
    let mut t = host
        .configure::<AuthFilter>(&authz_cfg(false).to_string())
        .unwrap();
    host.queue_callout_response(
        "authz",
        Ok(CalloutResponse::new(451, "{\"why\":\"region\"}")
            .header("content-type", "application/json")
            .header("x-internal", "no")),
    );
    let mut x = t.exchange(Request::get("/").header("x-api-key", "k-a"));
    assert_eq!(x.request_headers(), Action::Pause);
    let a = x.deliver_callouts();
    match &a[..] {
        [Action::Respond(r)] => {
            assert_eq!(r.status, 451);
            assert_eq!(r.body, b"{\"why\":\"region\"}");
            assert_eq!(
                r.header_value("content-type"),
                Some(&b"application/json"[..])
            );
            // `client_headers` unset: every header of the answer.
            assert_eq!(r.header_value("x-internal"), Some(&b"no"[..]));
            assert_eq!(r.details, "auth_ext_authz_denied");
        }
        other => panic!("{other:?}"),
    }
    drop(x);
    assert_eq!(
        host.counter("auth_decisions_total", &["ext_authz_denied"]),
        Some(1)
    );
}

/// The check service's answer for a login redirect.
fn login_redirect() -> Result<CalloutResponse, Error> {
    Ok(CalloutResponse::new(302, "")
        .header("Location", "https://login.example.com/?next=%2Forders")
        .header("set-cookie", "state=abc; Secure; HttpOnly")
        .header("set-cookie", "nonce=xyz; Secure; HttpOnly")
        .header("cache-control", "no-store")
        .header("connection", "close")
        .header("transfer-encoding", "chunked")
        .header("content-length", "0")
        .header("keep-alive", "timeout=5"))
}

fn fields(r: &LocalResponse) -> Vec<(String, String)> {
    r.headers
        .iter()
        .map(|(n, v)| (n.clone(), String::from_utf8(v.clone()).unwrap()))
        .collect()
}

#[test]
fn ext_authz_denial_passes_every_header_unless_client_headers_is_set() {
    // As Envoy's `allowed_client_headers` unset: a login redirect's
    // `location` and `set-cookie`s reach the client; the connection and
    // framing fields, which the host owns, do not.
    let host = host();
    let mut t = host
        .configure::<AuthFilter>(&authz_cfg(false).to_string())
        .unwrap();
    host.queue_callout_response("authz", login_redirect());
    let mut x = t.exchange(Request::get("/orders").header("x-api-key", "k-a"));
    assert_eq!(x.request_headers(), Action::Pause);
    let r = respond(x.deliver_callouts().remove(0));
    assert_eq!(r.status, 302);
    assert_eq!(
        fields(&r),
        [
            ("location", "https://login.example.com/?next=%2Forders"),
            ("set-cookie", "state=abc; Secure; HttpOnly"),
            ("set-cookie", "nonce=xyz; Secure; HttpOnly"),
            ("cache-control", "no-store"),
        ]
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
    );
    drop(x);

    // A list filters: only what it names (in any case the service writes).
    let mut cfg = authz_cfg(false);
    cfg["ext_authz"]["client_headers"] = json!(["location"]);
    let host2 = self::host();
    let mut t = host2.configure::<AuthFilter>(&cfg.to_string()).unwrap();
    host2.queue_callout_response("authz", login_redirect());
    let mut x = t.exchange(Request::get("/orders").header("x-api-key", "k-a"));
    assert_eq!(x.request_headers(), Action::Pause);
    let r = respond(x.deliver_callouts().remove(0));
    assert_eq!(r.status, 302);
    assert_eq!(
        fields(&r),
        [(
            "location".to_owned(),
            "https://login.example.com/?next=%2Forders".to_owned()
        )]
    );
    drop(x);

    // An empty list passes none.
    cfg["ext_authz"]["client_headers"] = json!([]);
    let host3 = self::host();
    let mut t = host3.configure::<AuthFilter>(&cfg.to_string()).unwrap();
    host3.queue_callout_response("authz", login_redirect());
    let mut x = t.exchange(Request::get("/orders").header("x-api-key", "k-a"));
    assert_eq!(x.request_headers(), Action::Pause);
    let r = respond(x.deliver_callouts().remove(0));
    assert_eq!(r.status, 302);
    assert!(r.headers.is_empty(), "{:?}", fields(&r));
}

#[test]
fn an_ext_authz_denial_over_the_hosts_caps_keeps_its_status_and_body() {
    // The host refuses a local response with more than 1024 fields or a value
    // over 64 KiB (abi/README.md §5.1), failing the call: the client would get
    // the failure policy's 503, not the denial. The plugin keeps the first
    // 1024 fields in the service's order and leaves out values too long, and
    // counts what it left out.
    use legate_sdk::log::Level;
    let host = host();
    let mut t = host
        .configure::<AuthFilter>(&authz_cfg(false).to_string())
        .unwrap();
    let mut denial = CalloutResponse::new(403, "denied: too many groups")
        .header("x-big", "b".repeat(64 * 1024 + 1))
        .header("x-fits", "f".repeat(64 * 1024));
    for i in 0..1100 {
        denial = denial.header(format!("x-group-{i}"), "1");
    }
    host.queue_callout_response("authz", Ok(denial));
    let mut x = t.exchange(Request::get("/").header("x-api-key", "k-a"));
    assert_eq!(x.request_headers(), Action::Pause);
    let r = respond(x.deliver_callouts().remove(0));
    assert_eq!(
        x.failure(),
        None,
        "the host would refuse the local response"
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.body, b"denied: too many groups");
    assert_eq!(r.details, "auth_ext_authz_denied");
    assert_eq!(r.headers.len(), 1024);
    assert_eq!(r.headers[0].0, "x-fits", "a value at the cap is kept");
    assert_eq!(r.header_value("x-big"), None);
    assert_eq!(r.headers[1].0, "x-group-0");
    assert_eq!(r.headers[1023].0, "x-group-1022");
    assert_eq!(r.header_value("x-group-1023"), None);
    drop(x);
    // x-big, and x-group-1023 to x-group-1099.
    assert_eq!(
        host.counter("auth_ext_authz_denial_headers_dropped_total", &[]),
        Some(78)
    );
    assert_eq!(
        host.counter("auth_decisions_total", &["ext_authz_denied"]),
        Some(1)
    );
    assert!(
        host.logged(Level::Warn, "78 header(s) not passed to the client"),
        "{:?}",
        host.logs()
    );
}

#[test]
fn ext_authz_allows_only_on_200() {
    // As Envoy's HTTP ext_authz: another 2xx is a denial, its status passed back.
    for status in [201, 204, 206, 299] {
        let host = host();
        let mut t = host
            .configure::<AuthFilter>(&authz_cfg(false).to_string())
            .unwrap();
        host.queue_callout_response(
            "authz",
            Ok(CalloutResponse::new(status, "").header("x-authz-user", "alice")),
        );
        let mut x = t.exchange(Request::get("/").header("x-api-key", "k-a"));
        assert_eq!(x.request_headers(), Action::Pause);
        let a = x.deliver_callouts();
        match &a[..] {
            [Action::Respond(r)] => {
                assert_eq!(r.status, status);
                assert_eq!(r.details, "auth_ext_authz_denied");
            }
            other => panic!("status {status}: {other:?}"),
        }
        assert_eq!(x.request_header("x-authz-user"), None);
        drop(x);
        assert_eq!(
            host.counter("auth_decisions_total", &["ext_authz_denied"]),
            Some(1)
        );
        assert_eq!(host.counter("auth_decisions_total", &["allowed"]), Some(0));
    }
}

#[test]
fn ext_authz_timeout_denies_by_default_and_allows_in_failure_mode_allow() {
    for (allow, expect) in [(false, Some(403)), (true, None)] {
        let host = host();
        let mut t = host
            .configure::<AuthFilter>(&authz_cfg(allow).to_string())
            .unwrap();
        host.queue_callout_response("authz", Err(Error::Timeout));
        let mut x = t.exchange(
            Request::get("/")
                .header("x-api-key", "k-a")
                .header("x-authz-user", "admin"),
        );
        assert_eq!(x.request_headers(), Action::Pause);
        let a = x.deliver_callouts();
        match (expect, &a[..]) {
            (Some(s), [Action::Respond(r)]) => {
                assert_eq!(r.status, s);
                assert_eq!(r.details, "auth_ext_authz_error");
            }
            // Let through without the check's word: a forged identity header
            // does not go upstream.
            (None, [Action::Continue]) => {
                assert_eq!(x.request_header("x-authz-user"), None);
            }
            other => panic!("failure_mode_allow={allow}: {other:?}"),
        }
        drop(x);
        assert_eq!(
            host.counter("auth_decisions_total", &["ext_authz_error"]),
            Some(1)
        );
    }
}

#[test]
fn ext_authz_5xx_is_an_error_not_a_denial() {
    // As Envoy's HTTP ext_authz (RawHttpClientImpl::toResponse): a 5xx from
    // the service is an error, so `failure_mode_allow` lets the request
    // through, else `status_on_error` answers; the service's own status and
    // body never reach the client.
    for status in [500, 502, 503, 504, 599] {
        for (allow, expect) in [(false, Some(403)), (true, None)] {
            let host = host();
            let mut t = host
                .configure::<AuthFilter>(&authz_cfg(allow).to_string())
                .unwrap();
            host.queue_callout_response(
                "authz",
                Ok(CalloutResponse::new(status, "upstream overloaded")
                    .header("x-authz-user", "alice")),
            );
            let mut x = t.exchange(
                Request::get("/")
                    .header("x-api-key", "k-a")
                    .header("x-authz-user", "admin"),
            );
            assert_eq!(x.request_headers(), Action::Pause);
            let a = x.deliver_callouts();
            match (expect, &a[..]) {
                (Some(s), [Action::Respond(r)]) => {
                    assert_eq!(r.status, s, "status {status}");
                    assert_eq!(r.details, "auth_ext_authz_error");
                    assert_ne!(r.body, b"upstream overloaded");
                }
                // Let through without the check's word: neither the
                // service's header nor the client's forged one goes upstream.
                (None, [Action::Continue]) => {
                    assert_eq!(x.request_header("x-authz-user"), None);
                }
                other => panic!("status {status}, failure_mode_allow={allow}: {other:?}"),
            }
            drop(x);
            assert_eq!(
                host.counter("auth_decisions_total", &["ext_authz_error"]),
                Some(1)
            );
            assert_eq!(
                host.counter("auth_decisions_total", &["ext_authz_denied"]),
                Some(0)
            );
        }
    }
}

#[test]
fn ext_authz_only_config_checks_every_request() {
    let host = host();
    let cfg = json!({"ext_authz": {"cluster": "authz", "method": "POST", "path": "/authz"}});
    let mut t = host.configure::<AuthFilter>(&cfg.to_string()).unwrap();
    host.queue_callout_response("authz", Ok(CalloutResponse::new(200, "")));
    let mut x = t.exchange(Request::get("/").header("authorization", "Bearer opaque"));
    assert_eq!(x.request_headers(), Action::Pause);
    let c = &host.callouts()[0].request;
    assert_eq!(c.method, "POST");
    assert!(c
        .headers
        .iter()
        .any(|(n, v)| n == "authorization" && v == b"Bearer opaque"));
    assert_eq!(x.deliver_callouts(), vec![Action::Continue]);
}

#[test]
fn no_token_key_or_password_is_logged() {
    let host = host();
    let k = Signer::new("HS256");
    let mut cfg = keys_cfg();
    cfg["providers"] = json!([{"name": "corp", "issuer": ISS, "jwks": jwks(&[k.jwk("k1")])}]);
    let mut t = host.configure::<AuthFilter>(&cfg.to_string()).unwrap();
    let mut expired = claims(ISS);
    expired["exp"] = json!(NOW - 1000);
    let tokens = [
        k.token(Some("k1"), &claims(ISS)),
        k.token(Some("k1"), &expired),
    ];
    for tok in &tokens {
        let _ = t.exchange(bearer(tok)).request_headers();
    }
    let _ = t
        .exchange(Request::get("/").header("x-api-key", "wrong-secret-key"))
        .request_headers();
    let _ = t
        .exchange(Request::get("/").header("x-api-key", "s3cret-key-a"))
        .request_headers();
    let logs = host.logs();
    assert!(!logs.is_empty(), "rejections are logged at debug");
    let secret = match k.jwk("k1")["k"].as_str() {
        Some(s) => s.to_owned(),
        None => unreachable!(),
    };
    for (_, m) in &logs {
        for tok in &tokens {
            let sig = tok.rsplit('.').next().unwrap();
            assert!(!m.contains(sig), "token logged: {m}");
        }
        assert!(!m.contains("secret-key"), "API key logged: {m}");
        assert!(!m.contains(&secret), "HMAC secret logged: {m}");
    }
}

#[test]
fn a_failed_tick_refresh_keeps_the_old_keys_and_retries_after_the_backoff() {
    let host = host();
    let mut t = host
        .configure::<AuthFilter>(&remote_cfg().to_string())
        .unwrap();
    let k = Signer::new("EdDSA");
    let mut c = claims(ISS);
    c["exp"] = json!(NOW + 3600);
    let tok = k.token(Some("k1"), &c);

    // Before any request, ticks fetch the keys (no exchange needed).
    t.tick();
    assert_eq!(host.callouts().len(), 1);
    t.tick();
    assert_eq!(host.callouts().len(), 1, "one refresh at a time");
    host.queue_callout_response("idp", jwks_response(&[k.jwk("k1")]));
    assert_eq!(t.deliver_tick_callouts(), 1);
    let mut x = t.exchange(bearer(&tok));
    assert_eq!(
        x.request_headers(),
        Action::Continue,
        "no fetch: the tick got the keys"
    );
    drop(x);

    host.advance(Duration::from_secs(301));
    t.tick();
    assert_eq!(host.callouts().len(), 2);
    host.queue_callout_response("idp", Ok(CalloutResponse::new(500, "oops")));
    assert_eq!(t.deliver_tick_callouts(), 1);
    let mut x = t.exchange(bearer(&tok));
    assert_eq!(
        x.request_headers(),
        Action::Continue,
        "stale keys stay in use"
    );
    drop(x);

    host.advance(Duration::from_secs(2));
    t.tick();
    assert_eq!(host.callouts().len(), 2, "backing off after the failure");
    host.advance(Duration::from_secs(30));
    t.tick();
    assert_eq!(
        host.callouts().len(),
        3,
        "retried after min_refetch_interval_s"
    );
}

#[test]
fn a_token_verified_before_still_expires() {
    let host = host();
    let k = Signer::new("ES384");
    let cfg = json!({"providers": [{"name": "corp", "issuer": ISS, "jwks": jwks(&[k.jwk("k1")]),
                                    "clock_skew_s": 0}]});
    let mut t = host.configure::<AuthFilter>(&cfg.to_string()).unwrap();
    let tok = k.token(Some("k1"), &claims(ISS)); // exp: NOW + 300
    for _ in 0..2 {
        let mut x = t.exchange(bearer(&tok));
        assert_eq!(x.request_headers(), Action::Continue);
    }
    host.advance(Duration::from_secs(301));
    let r = respond(t.exchange(bearer(&tok)).request_headers());
    assert_eq!(r.status, 401);
    assert!(String::from_utf8_lossy(&r.body).contains("expired"));
}

#[test]
fn a_costly_bcrypt_hash_is_warned_about_at_configure() {
    use legate_sdk::log::Level;
    for (cost, warned) in [(4, false), (5, true)] {
        let hash = bcrypt::hash("pw", cost).unwrap();
        let cfg = json!({"basic": [{"name": "b", "htpasswd": [format!("u:{hash}")]}]});
        let host = host();
        host.configure::<AuthFilter>(&cfg.to_string()).unwrap();
        assert_eq!(
            host.logged(Level::Warn, "bcrypt cost"),
            warned,
            "cost {cost}"
        );
        assert!(
            !host.logs().iter().any(|(_, m)| m.contains(&hash)),
            "hash logged"
        );
    }
}

/// The `WWW-Authenticate` challenges of a 401.
fn challenges(r: &LocalResponse) -> Vec<String> {
    fields(r)
        .into_iter()
        .filter(|(n, _)| n == "www-authenticate")
        .map(|(_, v)| v)
        .collect()
}

/// The Bearer challenge says `error="invalid_token"` only when a token was
/// presented and refused (RFC 6750 §3.1): a wrong API key or password on a
/// rule that also takes tokens is no reason for an OAuth client to drop or
/// refresh its token. Before, any refused credential put it there.
#[test]
fn the_bearer_challenge_says_invalid_token_only_for_a_refused_token() {
    let signer = Signer::new("HS256");
    let cfg = json!({
        "providers": [{"name": "corp", "issuer": "https://id.example.com",
                       "jwks": jwks(&[signer.jwk("k1")])}],
        "api_keys": keys_cfg()["api_keys"].clone(),
        "basic": [{"name": "staff", "htpasswd": [format!("bob:{{SHA}}{}", sha_hash("hunter2"))]}]
    });
    let mut t = host().configure::<AuthFilter>(&cfg.to_string()).unwrap();
    let plain = "Bearer realm=\"legate\"";
    let invalid = "Bearer realm=\"legate\", error=\"invalid_token\"";
    let mut expired = claims("https://id.example.com");
    expired["exp"] = json!(NOW - 1000);
    let expired = signer.token(Some("k1"), &expired);
    for (what, req, bearer, reason) in [
        (
            "a wrong API key",
            Request::get("/").header("x-api-key", "guess"),
            plain,
            "unknown API key",
        ),
        (
            "a wrong password",
            Request::get("/").header("authorization", basic("bob", "nope")),
            plain,
            "bad user or password",
        ),
        (
            "an expired token",
            Request::get("/").header("authorization", format!("Bearer {expired}")),
            invalid,
            "token expired",
        ),
        (
            "an expired token and a wrong API key",
            Request::get("/")
                .header("authorization", format!("Bearer {expired}"))
                .header("x-api-key", "guess"),
            invalid,
            "token expired",
        ),
    ] {
        let r = respond(t.exchange(req).request_headers());
        assert_eq!(r.status, 401, "{what}");
        assert_eq!(r.details, "auth_invalid_credentials", "{what}");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["reason"], reason, "{what}");
        let c = challenges(&r);
        assert!(c.iter().any(|v| v == bearer), "{what}: {c:?}");
        assert!(c.iter().any(|v| v.starts_with("Basic ")), "{what}: {c:?}");
        assert!(c.iter().any(|v| v.starts_with("ApiKey ")), "{what}: {c:?}");
    }
}
