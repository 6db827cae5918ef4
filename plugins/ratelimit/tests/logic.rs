//! ratelimit's request path on the SDK harness: the real filter against the
//! harness's KV (versions, CAS, TTLs) on its settable clock.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use legate_plugin_ratelimit::RateLimit;
use legate_sdk::testing::{FilterTest, Outcome, Request, Response, TestHost};
use legate_sdk::{LocalResponse, Phase};

const T0: u64 = 1_800_000_000_000_000_000;
const METRIC: &str = "ratelimit_requests_total";

/// The KV key of a bucket of limit `name` at `rate` (burst: the rate's
/// count), then `|part` for each descriptor value: `name@INTERVALxBURST|…`.
fn bucket(name: &str, rate: &str, parts: &[&str]) -> String {
    let (count, period_ns) = legate_plugin_ratelimit::config::parse_rate(rate).unwrap();
    let mut key = format!("{name}@{}x{count}", period_ns / u64::from(count));
    for p in parts {
        key.push('|');
        key.push_str(p);
    }
    key
}

fn setup(config: &str) -> FilterTest<RateLimit> {
    let host = TestHost::new().grant_kv("ratelimit");
    host.set_wall_time(T0);
    host.configure::<RateLimit>(config).unwrap()
}

fn from(ip: [u8; 4]) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), 40000)
}

/// `Some(response)` if the filter answered locally, `None` if it passed.
fn send(t: &mut FilterTest<RateLimit>, req: Request) -> Option<LocalResponse> {
    match t.exchange(req).run(Response::new(200)) {
        Outcome::Completed => None,
        Outcome::Responded(Phase::RequestHeaders, r) => Some(r),
        other => panic!("unexpected {other:?}"),
    }
}

fn header(r: &LocalResponse, name: &str) -> String {
    String::from_utf8(r.header_value(name).unwrap().to_vec()).unwrap()
}

fn body(r: &LocalResponse) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[test]
fn burst_then_429_then_refill_over_time() {
    let mut t =
        setup(r#"{"limits": [{"name": "ip", "key": ["client_ip"], "rate": "2/s", "burst": 3}]}"#);
    for _ in 0..3 {
        assert_eq!(send(&mut t, Request::get("/")), None);
    }
    let r = send(&mut t, Request::get("/")).unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.details, "rate_limited");
    assert_eq!(header(&r, "content-type"), "application/json");
    // One token every 500 ms: the next one is 0.5 s away, rounded up.
    assert_eq!(header(&r, "retry-after"), "1");
    assert_eq!(header(&r, "ratelimit-limit"), "3");
    assert_eq!(header(&r, "ratelimit-remaining"), "0");
    // Full again after 3 tokens × 500 ms.
    assert_eq!(header(&r, "ratelimit-reset"), "2");
    assert_eq!(
        body(&r),
        serde_json::json!({"error": "rate_limited", "limit": "ip", "retry_after_s": 1})
    );

    // Half an interval is not enough; a full one gives exactly one token.
    t.host().advance(Duration::from_millis(250));
    assert!(send(&mut t, Request::get("/")).is_some());
    t.host().advance(Duration::from_millis(250));
    assert_eq!(send(&mut t, Request::get("/")), None);
    assert!(send(&mut t, Request::get("/")).is_some());

    // After a long idle time the bucket is full (burst), not fuller.
    t.host().advance(Duration::from_secs(3600));
    for _ in 0..3 {
        assert_eq!(send(&mut t, Request::get("/")), None);
    }
    assert!(send(&mut t, Request::get("/")).is_some());

    assert_eq!(t.host().counter(METRIC, &["ip", "allowed"]), Some(7));
    assert_eq!(t.host().counter(METRIC, &["ip", "limited"]), Some(4));
    assert_eq!(t.host().counter(METRIC, &["ip", "error"]), Some(0));
}

#[test]
fn slow_rates_give_long_retry_after() {
    let mut t = setup(r#"{"limits": [{"name": "slow", "rate": "1/m"}]}"#);
    assert_eq!(send(&mut t, Request::get("/")), None);
    t.host().advance(Duration::from_secs(15));
    let r = send(&mut t, Request::get("/")).unwrap();
    assert_eq!(header(&r, "retry-after"), "45");
    assert_eq!(body(&r)["retry_after_s"], 45);
}

#[test]
fn keys_are_isolated() {
    let mut t = setup(
        r#"{"limits": [
            {"name": "ip", "key": ["client_ip"], "rate": "1/m"},
            {"name": "user", "key": [{"header": "x-jwt-sub"}], "rate": "1/m"}
        ]}"#,
    );
    let a = || Request::get("/").source(from([10, 0, 0, 1]));
    let b = || Request::get("/").source(from([10, 0, 0, 2]));
    assert_eq!(send(&mut t, a()), None);
    assert_eq!(send(&mut t, a()).unwrap().status, 429);
    assert_eq!(
        send(&mut t, b()),
        None,
        "another client IP has its own bucket"
    );

    // The header limit: a request without the header skips it.
    let c = |sub: &str| {
        Request::get("/")
            .source(from([10, 0, 0, 3]))
            .header("x-jwt-sub", sub)
    };
    assert_eq!(send(&mut t, c("alice")), None);
    let r = send(&mut t, c("alice").source(from([10, 0, 0, 4]))).unwrap();
    assert_eq!(body(&r)["limit"], "user", "same subject, other IP");
    assert_eq!(send(&mut t, c("bob").source(from([10, 0, 0, 5]))), None);
    assert_eq!(t.host().counter(METRIC, &["user", "allowed"]), Some(2));
}

#[test]
fn values_cannot_forge_key_separators() {
    let mut t =
        setup(r#"{"limits": [{"name": "k", "key": ["header:x-a", "header:x-b"], "rate": "1/m"}]}"#);
    let req = |a: &str, b: &str| Request::get("/").header("x-a", a).header("x-b", b);
    assert_eq!(send(&mut t, req("1|2", "3")), None);
    assert_eq!(send(&mut t, req("1", "2|3")), None, "a distinct bucket");
    assert!(send(&mut t, req("1", "2|3")).is_some());
}

#[test]
fn over_long_keys_are_digested_and_still_limited() {
    let mut t =
        setup(r#"{"limits": [{"name": "k", "key": ["header:x-api-key-id"], "rate": "1/m"}]}"#);
    let long = "a".repeat(2000);
    let long2 = format!("{}b", "a".repeat(1999));
    assert_eq!(
        send(
            &mut t,
            Request::get("/").header("x-api-key-id", long.clone())
        ),
        None
    );
    assert!(send(&mut t, Request::get("/").header("x-api-key-id", long)).is_some());
    assert_eq!(
        send(&mut t, Request::get("/").header("x-api-key-id", long2)),
        None
    );
    assert_eq!(t.host().counter(METRIC, &["k", "error"]), Some(0));
}

#[test]
fn routes_select_limits() {
    let mut t = setup(
        r#"{"limits": [
            {"name": "writes", "match": {"prefix": "/api", "methods": ["POST"]}, "rate": "1/m"},
            {"name": "admin", "match": {"routes": ["admin"]}, "rate": "1/m"}
        ]}"#,
    );
    let post = |p: &str| Request::post(p, "x");
    assert_eq!(send(&mut t, post("/api/a?x=1")), None);
    assert_eq!(
        body(&send(&mut t, post("/api/b")).unwrap())["limit"],
        "writes"
    );
    assert_eq!(
        send(&mut t, Request::get("/api/a")),
        None,
        "GET is not limited"
    );
    assert_eq!(send(&mut t, post("/other")), None, "outside the prefix");
    assert_eq!(send(&mut t, post("/other")), None);
    let admin = || Request::get("/x").route(Some("admin"));
    assert_eq!(send(&mut t, admin()), None);
    assert_eq!(body(&send(&mut t, admin()).unwrap())["limit"], "admin");
    assert_eq!(send(&mut t, Request::get("/x").route(None)), None);
}

#[test]
fn every_limit_must_pass_and_a_rejection_consumes_nothing() {
    let mut t = setup(
        r#"{"emit_headers": true, "limits": [
            {"name": "wide", "rate": "10/m"},
            {"name": "narrow", "key": ["path"], "rate": "1/m"}
        ]}"#,
    );
    // `wide` stores its TAT: one admitted request moves it 6 s (60 s / 10).
    let wide_tat = |t: &FilterTest<RateLimit>| -> u64 {
        let e = t
            .host()
            .kv_get("ratelimit", &bucket("wide", "10/m", &[]))
            .unwrap();
        String::from_utf8(e.value).unwrap().parse().unwrap()
    };
    const TOKEN: u64 = 6_000_000_000;

    let mut x = t.exchange(Request::get("/a"));
    assert_eq!(x.run(Response::new(200)), Outcome::Completed);
    // The most restrictive limit's numbers: narrow has 0 left (wide has 9).
    assert_eq!(x.response_header("ratelimit-limit").as_deref(), Some("1"));
    assert_eq!(
        x.response_header("ratelimit-remaining").as_deref(),
        Some("0")
    );
    assert_eq!(x.response_header("ratelimit-reset").as_deref(), Some("60"));
    drop(x);
    assert_eq!(wide_tat(&t), T0 + TOKEN);

    for _ in 0..3 {
        let r = send(&mut t, Request::get("/a")).unwrap();
        assert_eq!(body(&r)["limit"], "narrow");
    }
    assert_eq!(
        wide_tat(&t),
        T0 + TOKEN,
        "rejected requests consumed nothing"
    );

    assert_eq!(send(&mut t, Request::get("/b")), None);
    assert_eq!(wide_tat(&t), T0 + 2 * TOKEN);
    assert_eq!(t.host().counter(METRIC, &["wide", "allowed"]), Some(5));
    assert_eq!(t.host().counter(METRIC, &["narrow", "allowed"]), Some(2));
    assert_eq!(t.host().counter(METRIC, &["narrow", "limited"]), Some(3));
}

#[test]
fn the_blocking_limit_with_the_longest_wait_answers() {
    let mut t = setup(
        r#"{"limits": [
            {"name": "per-second", "rate": "1/s"},
            {"name": "per-hour", "rate": "1/h"}
        ]}"#,
    );
    assert_eq!(send(&mut t, Request::get("/")), None);
    let r = send(&mut t, Request::get("/")).unwrap();
    assert_eq!(body(&r)["limit"], "per-hour");
    assert_eq!(header(&r, "retry-after"), "3600");
}

#[test]
fn allowed_responses_carry_headers_only_with_emit_headers() {
    let mut t =
        setup(r#"{"emit_headers": true, "limits": [{"name": "a", "rate": "10/s", "burst": 5}]}"#);
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(x.run(Response::new(200)), Outcome::Completed);
    assert_eq!(x.response_header("ratelimit-limit").as_deref(), Some("5"));
    assert_eq!(
        x.response_header("ratelimit-remaining").as_deref(),
        Some("4")
    );
    // 100 ms of credit used, rounded up to whole seconds.
    assert_eq!(x.response_header("ratelimit-reset").as_deref(), Some("1"));
    drop(x);
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    assert!(!x.detached(), "detached before adding the headers");
    x.response_headers(Response::new(200));
    assert_eq!(
        x.response_header("ratelimit-remaining").as_deref(),
        Some("3")
    );
    // Its last call for the exchange: detached, so no `on-done` call.
    assert!(x.detached());
    drop(x);
    assert_eq!(t.live_contexts(), 0, "contexts are freed when detached");

    // Without headers to add, the filter is done after the request headers.
    let mut t = setup(r#"{"limits": [{"name": "a", "rate": "10/s", "burst": 5}]}"#);
    let mut x = t.exchange(Request::get("/"));
    x.request_headers();
    assert!(x.detached());
    assert_eq!(x.run(Response::new(200)), Outcome::Completed);
    assert_eq!(x.response_header("ratelimit-limit"), None);
    drop(x);
    assert_eq!(t.live_contexts(), 0);
}

#[test]
fn header_names_x_ratelimit_uses_envoys_names() {
    // As Envoy's local_ratelimit with `enable_x_ratelimit_headers:
    // DRAFT_VERSION_03`: the same values under `x-ratelimit-*`, on the 429
    // and (with `emit_headers`) on allowed responses; `ratelimit-*` is gone.
    let mut t = setup(
        r#"{"emit_headers": true, "header_names": "x-ratelimit",
            "limits": [{"name": "a", "rate": "10/s", "burst": 2}]}"#,
    );
    let mut x = t.exchange(Request::get("/"));
    assert_eq!(x.run(Response::new(200)), Outcome::Completed);
    assert_eq!(x.response_header("x-ratelimit-limit").as_deref(), Some("2"));
    assert_eq!(
        x.response_header("x-ratelimit-remaining").as_deref(),
        Some("1")
    );
    assert_eq!(x.response_header("x-ratelimit-reset").as_deref(), Some("1"));
    assert_eq!(x.response_header("ratelimit-limit"), None);
    drop(x);
    assert_eq!(send(&mut t, Request::get("/")), None);
    let r = send(&mut t, Request::get("/")).unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(header(&r, "x-ratelimit-limit"), "2");
    assert_eq!(header(&r, "x-ratelimit-remaining"), "0");
    assert_eq!(header(&r, "x-ratelimit-reset"), "1");
    assert_eq!(r.header_value("ratelimit-limit"), None);

    // The default and `ratelimit` spelled out: the IETF draft's names.
    for cfg in [
        r#"{"limits": [{"name": "a", "rate": "1/s"}]}"#,
        r#"{"header_names": "ratelimit", "limits": [{"name": "a", "rate": "1/s"}]}"#,
    ] {
        let mut t = setup(cfg);
        assert_eq!(send(&mut t, Request::get("/")), None);
        let r = send(&mut t, Request::get("/")).unwrap();
        assert_eq!(header(&r, "ratelimit-limit"), "1", "{cfg}");
        assert_eq!(r.header_value("x-ratelimit-limit"), None, "{cfg}");
    }
}

#[test]
fn shadow_counts_but_never_blocks() {
    let mut t = setup(
        r#"{"limits": [
            {"name": "s", "rate": "1/m", "shadow": true},
            {"name": "real", "rate": "2/m"}
        ]}"#,
    );
    assert_eq!(send(&mut t, Request::get("/")), None);
    assert_eq!(
        send(&mut t, Request::get("/")),
        None,
        "s is over, but in shadow"
    );
    assert_eq!(
        body(&send(&mut t, Request::get("/")).unwrap())["limit"],
        "real"
    );
    assert_eq!(t.host().counter(METRIC, &["s", "allowed"]), Some(1));
    assert_eq!(t.host().counter(METRIC, &["s", "shadow_limited"]), Some(2));
    assert_eq!(t.host().counter(METRIC, &["s", "limited"]), Some(0));
    assert_eq!(t.host().counter(METRIC, &["real", "limited"]), Some(1));

    let mut t = setup(r#"{"shadow": true, "limits": [{"name": "all", "rate": "1/m"}]}"#);
    for _ in 0..5 {
        assert_eq!(send(&mut t, Request::get("/")), None);
    }
    assert_eq!(
        t.host().counter(METRIC, &["all", "shadow_limited"]),
        Some(4)
    );
}

/// The bucket of limit `name` (`1/m`) for client 192.0.2.1 (the harness default),
/// overwritten with something that is not a bucket: the KV read fails.
fn corrupt(t: &FilterTest<RateLimit>, name: &str) {
    t.host().kv_put(
        "ratelimit",
        &bucket(name, "1/m", &["192.0.2.1"]),
        b"not a number",
    );
}

#[test]
fn kv_errors_fail_open_by_default() {
    let mut t = setup(
        r#"{"limits": [{"name": "a", "key": ["client_ip"], "rate": "1/m"},
                      {"name": "b", "rate": "5/m"}]}"#,
    );
    corrupt(&t, "a");
    for _ in 0..3 {
        assert_eq!(send(&mut t, Request::get("/")), None);
    }
    assert_eq!(t.host().counter(METRIC, &["a", "error"]), Some(3));
    assert_eq!(
        t.host().counter(METRIC, &["b", "allowed"]),
        Some(3),
        "b still applies"
    );
    assert!(t.host().logged(legate_sdk::log::Level::Warn, "KV error"));
    // A healthy key is limited as usual.
    assert_eq!(
        send(&mut t, Request::get("/").source(from([10, 1, 1, 1]))),
        None
    );
    assert!(send(&mut t, Request::get("/").source(from([10, 1, 1, 1]))).is_some());
}

#[test]
fn kv_errors_fail_closed_with_deny() {
    let mut t = setup(
        r#"{"failure_mode": "deny", "limits": [{"name": "a", "key": ["client_ip"], "rate": "1/m"}]}"#,
    );
    corrupt(&t, "a");
    let r = send(&mut t, Request::get("/")).unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        body(&r),
        serde_json::json!({"error": "rate_limit_unavailable", "limit": "a"})
    );
    assert_eq!(t.host().counter(METRIC, &["a", "error"]), Some(1));
    assert_eq!(
        send(&mut t, Request::get("/").source(from([10, 1, 1, 1]))),
        None
    );

    // A shadow limit never blocks, even on errors.
    let mut t = setup(
        r#"{"failure_mode": "deny", "shadow": true, "limits": [{"name": "a", "key": ["client_ip"], "rate": "1/m"}]}"#,
    );
    corrupt(&t, "a");
    assert_eq!(send(&mut t, Request::get("/")), None);
    assert_eq!(t.host().counter(METRIC, &["a", "error"]), Some(1));
}

#[test]
fn a_limit_of_the_same_name_with_other_parameters_has_its_own_buckets() {
    // A route's config (another instance, one namespace) reusing a limit's
    // name with another rate: each keeps its own state; sharing it, the
    // route's 5/m would read the listener's TAT and refuse everywhere.
    let host = TestHost::new().grant_kv("ratelimit");
    host.set_wall_time(T0);
    let mut wide = host
        .configure::<RateLimit>(
            r#"{"limits": [{"name": "per-ip", "key": ["client_ip"], "rate": "100/s"}]}"#,
        )
        .unwrap();
    let mut login = host
        .configure::<RateLimit>(
            r#"{"limits": [{"name": "per-ip", "key": ["client_ip"], "rate": "5/m"}]}"#,
        )
        .unwrap();
    for _ in 0..50 {
        assert_eq!(send(&mut wide, Request::get("/")), None);
    }
    assert_eq!(send(&mut login, Request::get("/login")), None);
    assert_eq!(
        send(&mut wide, Request::get("/")),
        None,
        "refused by the other limit's state"
    );
    for _ in 0..4 {
        assert_eq!(send(&mut login, Request::get("/login")), None);
    }
    assert!(send(&mut login, Request::get("/login")).is_some());
}

#[test]
fn the_authority_is_keyed_as_routing_sees_it() {
    // Virtual hosts match without case and with or without the port: so do
    // the buckets, or every spelling would be a fresh quota.
    let mut t = setup(r#"{"limits": [{"name": "h", "key": ["authority"], "rate": "1/m"}]}"#);
    let to = |a: &str| Request::get("/").authority(a);
    assert_eq!(send(&mut t, to("a.example")), None);
    for other in [
        "A.EXAMPLE",
        "a.Example:80",
        "a.example:8443",
        "a.example.",
        "a.example.:80",
    ] {
        assert!(send(&mut t, to(other)).is_some(), "{other}");
    }
    assert_eq!(send(&mut t, to("b.example")), None);
    assert_eq!(send(&mut t, to("[2001:DB8::1]:443")), None);
    assert!(send(&mut t, to("[2001:db8::1]")).is_some());
}

#[test]
fn an_ipv4_client_is_one_bucket_on_a_dual_stack_socket() {
    let mut t = setup(r#"{"limits": [{"name": "ip", "key": ["client_ip"], "rate": "1/m"}]}"#);
    assert_eq!(
        send(&mut t, Request::get("/").source(from([192, 0, 2, 9]))),
        None
    );
    let mapped = SocketAddr::new(
        IpAddr::V6(Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped()),
        40000,
    );
    assert!(send(&mut t, Request::get("/").source(mapped)).is_some());
}

#[test]
fn a_value_cannot_forge_a_long_keys_digest() {
    use sha2::{Digest, Sha256};
    let mut t = setup(r#"{"limits": [{"name": "k", "key": ["header:x-key"], "rate": "1/m"}]}"#);
    let long = "a".repeat(2000);
    assert_eq!(
        send(&mut t, Request::get("/").header("x-key", long.as_str())),
        None
    );
    // The digest key of `long`, sent as a value of its own.
    let full = bucket("k", "1/m", &[&long]);
    let hex: String = Sha256::digest(full.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let forged = format!("#{hex}");
    assert_eq!(
        send(&mut t, Request::get("/").header("x-key", forged.as_str())),
        None,
        "the forged value landed in the long value's bucket"
    );
}

#[test]
fn instances_share_buckets_through_the_kv() {
    // Two workers' instances on one host: one KV store.
    let host = TestHost::new().grant_kv("ratelimit");
    host.set_wall_time(T0);
    let cfg = r#"{"limits": [{"name": "a", "rate": "3/m"}]}"#;
    let mut w1 = host.configure::<RateLimit>(cfg).unwrap();
    let mut w2 = host.configure::<RateLimit>(cfg).unwrap();
    assert_eq!(send(&mut w1, Request::get("/")), None);
    assert_eq!(send(&mut w2, Request::get("/")), None);
    assert_eq!(send(&mut w1, Request::get("/")), None);
    assert!(send(&mut w2, Request::get("/")).is_some());
    assert!(send(&mut w1, Request::get("/")).is_some());
}

#[test]
fn buckets_expire_once_full_again() {
    let mut t = setup(r#"{"limits": [{"name": "a", "rate": "1/s", "burst": 2}]}"#);
    assert_eq!(send(&mut t, Request::get("/")), None);
    assert!(t.host().kv_get("ratelimit", "a@1000000000x2").is_some());
    t.host().advance(Duration::from_millis(999));
    assert!(t.host().kv_get("ratelimit", "a@1000000000x2").is_some());
    t.host().advance(Duration::from_millis(1));
    assert!(
        t.host().kv_get("ratelimit", "a@1000000000x2").is_none(),
        "expired: a full bucket"
    );
    for _ in 0..2 {
        assert_eq!(send(&mut t, Request::get("/")), None);
    }
    assert!(send(&mut t, Request::get("/")).is_some());
}

#[test]
fn method_authority_and_route_descriptors() {
    let mut t = setup(
        r#"{"limits": [{"name": "m", "key": ["method", "authority", "route"], "rate": "1/m"}]}"#,
    );
    let req = |m: &str, host: &str| Request::new(m, "/").authority(host);
    assert_eq!(send(&mut t, req("GET", "a.example")), None);
    assert!(send(&mut t, req("GET", "a.example")).is_some());
    assert_eq!(send(&mut t, req("POST", "a.example")), None, "other method");
    assert_eq!(
        send(&mut t, req("GET", "b.example")),
        None,
        "other authority"
    );
    let routed = |r: Option<&str>| req("GET", "a.example").route(r);
    assert_eq!(send(&mut t, routed(Some("other"))), None, "other route");
    for _ in 0..3 {
        assert_eq!(send(&mut t, routed(None)), None, "no route: limit skipped");
    }
    assert_eq!(t.host().counter(METRIC, &["m", "allowed"]), Some(4));
    assert_eq!(t.host().counter(METRIC, &["m", "limited"]), Some(1));
}

#[test]
fn ipv6_clients_have_their_own_buckets() {
    let mut t = setup(r#"{"limits": [{"name": "ip", "key": ["client_ip"], "rate": "1/m"}]}"#);
    let v6 = |last: u16| {
        Request::get("/").source(SocketAddr::new(
            IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)),
            443,
        ))
    };
    assert_eq!(send(&mut t, v6(1)), None);
    assert!(send(&mut t, v6(1)).is_some());
    assert_eq!(send(&mut t, v6(2)), None);
    assert!(t
        .host()
        .kv_get("ratelimit", &bucket("ip", "1/m", &["2001:db8::2"]))
        .is_some());
}

/// `{client_ip: {v6_prefix: 64}}`: one bucket per /64, as Envoy's
/// `masked_remote_address`, so a client that holds a /64 cannot rotate
/// through its addresses for fresh buckets (before, only the whole address
/// could be keyed on); IPv4 keeps its default of the whole address, and an
/// IPv4 `v4_prefix` groups a network the same way.
#[test]
fn client_ip_prefixes_key_one_bucket_per_network() {
    let mut t = setup(
        r#"{"limits": [{"name": "net", "key": [{"client_ip": {"v6_prefix": 64}}], "rate": "1/m"},
                      {"name": "v4net", "match": {"prefix": "/v4"},
                       "key": [{"client_ip": {"v4_prefix": 24}}], "rate": "1/m"}]}"#,
    );
    let v6 = |net: u16, last: u16| {
        Request::get("/").source(SocketAddr::new(
            IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 0, net, 0xa, 0xb, 0xc, last,
            )),
            443,
        ))
    };
    assert_eq!(send(&mut t, v6(1, 1)), None);
    // Another address of the same /64: the same bucket, spent.
    let r = send(&mut t, v6(1, 2)).expect("a 429 for the same /64");
    assert_eq!(r.status, 429);
    // Another /64 has its own.
    assert_eq!(send(&mut t, v6(2, 1)), None);
    assert!(t
        .host()
        .kv_get("ratelimit", &bucket("net", "1/m", &["2001:db8:0:1::/64"]))
        .is_some());
    // IPv4 clients: the whole address by default (`v4_prefix` 32).
    assert_eq!(
        send(&mut t, Request::get("/").source(from([192, 0, 2, 1]))),
        None
    );
    assert_eq!(
        send(&mut t, Request::get("/").source(from([192, 0, 2, 2]))),
        None
    );
    assert!(t
        .host()
        .kv_get("ratelimit", &bucket("net", "1/m", &["192.0.2.1"]))
        .is_some());
    // With `v4_prefix: 24`, one bucket per /24.
    let v4 = |last: u8| Request::get("/v4").source(from([198, 51, 100, last]));
    assert_eq!(send(&mut t, v4(7)), None);
    assert!(send(&mut t, v4(8)).is_some());
    assert!(t
        .host()
        .kv_get("ratelimit", &bucket("v4net", "1/m", &["198.51.100.0/24"]))
        .is_some());
}

/// A TAT far in the future: a bucket another worker just emptied.
const EMPTIED: &[u8] = b"18000000000000000000";

#[test]
fn a_refusal_decided_on_the_last_cas_attempt_is_a_429() {
    let mut t = setup(r#"{"limits": [{"name": "a", "key": ["client_ip"], "rate": "1/m"}]}"#);
    // Every write of ours loses a race; the last re-read finds the bucket
    // emptied. That is a refusal, not a KV error (let through by default).
    let n = legate_plugin_ratelimit::MAX_CAS_ATTEMPTS as usize;
    let mut values: Vec<&[u8]> = vec![b"0"; n - 1];
    values.push(EMPTIED);
    t.host()
        .kv_race("ratelimit", &bucket("a", "1/m", &["192.0.2.1"]), &values);
    let r = send(&mut t, Request::get("/")).expect("a 429");
    assert_eq!(r.status, 429);
    assert_eq!(t.host().counter(METRIC, &["a", "error"]), Some(0));
    assert!(!t.host().logged(legate_sdk::log::Level::Warn, "KV error"));
}

#[test]
fn out_of_cas_attempts_is_logged_as_contention() {
    let mut t = setup(r#"{"limits": [{"name": "a", "key": ["client_ip"], "rate": "10/m"}]}"#);
    // Every write of ours loses a race, and each re-read still admits.
    let n = legate_plugin_ratelimit::MAX_CAS_ATTEMPTS as usize;
    let values: Vec<&[u8]> = vec![b"0"; n];
    t.host()
        .kv_race("ratelimit", &bucket("a", "10/m", &["192.0.2.1"]), &values);
    assert_eq!(
        send(&mut t, Request::get("/")),
        None,
        "fail open by default"
    );
    assert_eq!(t.host().counter(METRIC, &["a", "error"]), Some(1));
    let line = format!("compare-and-swap lost {n} times in a row (contention on bucket");
    assert!(
        t.host().logged(legate_sdk::log::Level::Warn, &line),
        "{:?}",
        t.host().logs()
    );
    assert!(!t
        .host()
        .logged(legate_sdk::log::Level::Warn, "limit-exceeded"));
}

/// With the backend down every request fails its check: each is counted,
/// but the log has the first failure, a summary per 10 s, and the recovery,
/// not a line per request.
#[test]
fn kv_errors_are_logged_once_per_episode() {
    let mut t = setup(r#"{"limits": [{"name": "a", "key": ["client_ip"], "rate": "1000/s"}]}"#);
    let warnings = |t: &FilterTest<RateLimit>| {
        t.host()
            .logs()
            .iter()
            .filter(|(l, _)| *l == legate_sdk::log::Level::Warn)
            .count()
    };
    t.host().kv_unavailable(true);
    for _ in 0..50 {
        assert_eq!(send(&mut t, Request::get("/")), None);
    }
    assert_eq!(t.host().counter(METRIC, &["a", "error"]), Some(50));
    assert_eq!(warnings(&t), 1, "{:?}", t.host().logs());
    // The first names the series as `/stats` shows it and the failure mode as
    // the config spells it (it said `ratelimit_requests_total`, which is on no
    // page, and `failure_mode Allow`).
    assert!(
        t.host().logged(
            legate_sdk::log::Level::Warn,
            "failure_mode allow (further KV errors are counted in \
             legate_plugin_ratelimit_requests_total{outcome=\"error\"}"
        ),
        "{:?}",
        t.host().logs()
    );
    t.host().advance(Duration::from_secs(11));
    assert_eq!(send(&mut t, Request::get("/")), None);
    assert_eq!(warnings(&t), 2, "{:?}", t.host().logs());
    assert!(t.host().logged(
        legate_sdk::log::Level::Warn,
        "50 more KV errors in the last 11s"
    ));
    t.host().kv_unavailable(false);
    assert_eq!(send(&mut t, Request::get("/")), None);
    assert!(t.host().logged(
        legate_sdk::log::Level::Info,
        "KV calls succeed again, after 51 KV errors in 11s"
    ));
    // A new episode is logged again, once 10 s have passed since the last
    // warning (see `alternating_kv_failures_are_logged_at_most_every_10s`).
    t.host().advance(Duration::from_secs(10));
    t.host().kv_unavailable(true);
    assert_eq!(send(&mut t, Request::get("/")), None);
    assert_eq!(warnings(&t), 3, "{:?}", t.host().logs());
}

/// When KV calls fail and succeed by turns, each request is an episode of
/// its own: a full in-memory namespace (a new bucket's read succeeds, its
/// write is `limit-exceeded`), a flapping Redis. The log still has at most
/// one warning per 10 s, the errors in between told by the next one, and a
/// recovery line only after an episode it warned of. Before, each episode
/// logged a warning and a recovery: two lines per request (29 795 lines,
/// 8 MB, in 8 s of load on a full namespace).
#[test]
fn alternating_kv_failures_are_logged_at_most_every_10s() {
    let mut t = setup(r#"{"limits": [{"name": "a", "key": ["client_ip"], "rate": "1000/s"}]}"#);
    let lines = |t: &FilterTest<RateLimit>, level| {
        t.host().logs().iter().filter(|(l, _)| *l == level).count()
    };
    use legate_sdk::log::Level::{Info, Warn};
    for i in 0..100 {
        t.host().kv_unavailable(i % 2 == 0);
        assert_eq!(send(&mut t, Request::get("/")), None);
    }
    assert_eq!(t.host().counter(METRIC, &["a", "error"]), Some(50));
    assert_eq!(lines(&t, Warn), 1, "{:?}", t.host().logs().first());
    assert_eq!(lines(&t, Info), 1, "{:?}", t.host().logs().get(1));
    assert!(t
        .host()
        .logged(Info, "KV calls succeed again, after 1 KV errors in 0s"));
    // 10 s on, the next failure is logged, with the 49 held back.
    t.host().advance(Duration::from_secs(10));
    t.host().kv_unavailable(true);
    assert_eq!(send(&mut t, Request::get("/")), None);
    assert_eq!(lines(&t, Warn), 2, "{:?}", t.host().logs());
    assert!(
        t.host().logged(
            Warn,
            "49 more KV errors in the last 10s, between KV calls that succeeded"
        ),
        "{:?}",
        t.host().logs()
    );
    t.host().kv_unavailable(false);
    assert_eq!(send(&mut t, Request::get("/")), None);
    assert_eq!(lines(&t, Info), 2, "{:?}", t.host().logs());
}

#[test]
fn limits_after_a_raced_refusal_spend_no_token() {
    let mut t = setup(
        r#"{"limits": [{"name": "a", "key": ["client_ip"], "rate": "1/m"},
                      {"name": "b", "rate": "5/m"}]}"#,
    );
    t.host()
        .kv_race("ratelimit", &bucket("a", "1/m", &["192.0.2.1"]), &[EMPTIED]);
    assert_eq!(send(&mut t, Request::get("/")).map(|r| r.status), Some(429));
    assert!(
        t.host()
            .kv_get("ratelimit", &bucket("b", "5/m", &[]))
            .is_none(),
        "b spent a token on a refused request"
    );
    // The race is over: a's bucket is the other worker's (empty), b's full.
    assert_eq!(send(&mut t, Request::get("/")).map(|r| r.status), Some(429));
    assert_eq!(
        send(&mut t, Request::get("/").source(from([10, 1, 1, 1]))),
        None
    );
}

/// With a remote namespace (Redis), the same checks run on asynchronous KV
/// calls: the exchange pauses instead of the worker waiting on a round trip.
mod remote {
    use super::*;
    use legate_sdk::kv::Backend;
    use legate_sdk::Action;

    fn setup(config: &str) -> FilterTest<RateLimit> {
        let host = TestHost::new()
            .grant_kv("ratelimit")
            .kv_backend(Backend::Redis);
        host.set_wall_time(T0);
        host.configure::<RateLimit>(config).unwrap()
    }

    /// Drives the request headers phase through its KV replies: the actions
    /// returned (the first is the phase's own), and the local response if any.
    fn send(t: &mut FilterTest<RateLimit>, req: Request) -> (Vec<Action>, Option<LocalResponse>) {
        let mut x = t.exchange(req);
        let mut actions = vec![x.request_headers()];
        assert_eq!(
            actions[0],
            Action::Pause,
            "a remote check waits for its reads"
        );
        assert!(x.may_pause());
        actions.extend(x.deliver_kv());
        assert_eq!(x.kv_calls_outstanding(), 0);
        let local = match actions.last() {
            Some(Action::Respond(r)) => Some(r.clone()),
            _ => None,
        };
        (actions, local)
    }

    #[test]
    fn a_remote_check_pauses_for_its_read_and_write_then_limits() {
        let mut t = setup(r#"{"limits": [{"name": "ip", "key": ["client_ip"], "rate": "1/m"}]}"#);
        let (actions, local) = send(&mut t, Request::get("/"));
        // Read, then write: one pause per round trip, then continue.
        assert_eq!(
            actions,
            vec![Action::Pause, Action::Pause, Action::Continue]
        );
        assert_eq!(local, None);
        assert!(t
            .host()
            .kv_get("ratelimit", &bucket("ip", "1/m", &["192.0.2.1"]))
            .is_some());
        let (actions, local) = send(&mut t, Request::get("/"));
        // Refused after the read: nothing written.
        assert_eq!(actions.len(), 2);
        let r = local.expect("a 429");
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "retry-after"), "60");
        assert_eq!(t.host().counter(METRIC, &["ip", "allowed"]), Some(1));
        assert_eq!(t.host().counter(METRIC, &["ip", "limited"]), Some(1));
    }

    #[test]
    fn several_limits_read_together_and_write_in_order() {
        let mut t = setup(
            r#"{"limits": [{"name": "a", "key": ["client_ip"], "rate": "2/m"},
                          {"name": "b", "rate": "1/m"}]}"#,
        );
        let mut x = t.exchange(Request::get("/"));
        assert_eq!(x.request_headers(), Action::Pause);
        assert_eq!(x.kv_calls_outstanding(), 2, "both buckets read at once");
        let actions = x.deliver_kv();
        assert_eq!(actions.last(), Some(&Action::Continue));
        drop(x);
        assert!(t
            .host()
            .kv_get("ratelimit", &bucket("a", "2/m", &["192.0.2.1"]))
            .is_some());
        assert!(t
            .host()
            .kv_get("ratelimit", &bucket("b", "1/m", &[]))
            .is_some());
        // b is empty now: refused, and a spends no token.
        let before = t
            .host()
            .kv_get("ratelimit", &bucket("a", "2/m", &["192.0.2.1"]))
            .unwrap();
        let (_, local) = send(&mut t, Request::get("/"));
        assert_eq!(local.map(|r| r.status), Some(429));
        assert_eq!(
            t.host()
                .kv_get("ratelimit", &bucket("a", "2/m", &["192.0.2.1"]))
                .unwrap(),
            before
        );
    }

    #[test]
    fn more_limits_than_calls_allowed_at_once_wait_their_turn() {
        // The host allows 8 outstanding calls per exchange; 10 limits match.
        let limits: Vec<String> = (0..10)
            .map(|i| format!(r#"{{"name": "l{i}", "rate": "5/m"}}"#))
            .collect();
        let mut t = setup(&format!(r#"{{"limits": [{}]}}"#, limits.join(",")));
        let mut x = t.exchange(Request::get("/"));
        assert_eq!(x.request_headers(), Action::Pause);
        assert_eq!(x.kv_calls_outstanding(), 8);
        let actions = x.deliver_kv();
        assert_eq!(actions.last(), Some(&Action::Continue));
        drop(x);
        for i in 0..10 {
            let name = format!("l{i}");
            assert!(
                t.host()
                    .kv_get("ratelimit", &bucket(&name, "5/m", &[]))
                    .is_some(),
                "{name}"
            );
            assert_eq!(t.host().counter(METRIC, &[&name, "allowed"]), Some(1));
            assert_eq!(t.host().counter(METRIC, &[&name, "error"]), Some(0));
        }
    }

    #[test]
    fn a_lost_race_rereads_asynchronously() {
        let mut t = setup(r#"{"limits": [{"name": "a", "key": ["client_ip"], "rate": "1/m"}]}"#);
        t.host()
            .kv_race("ratelimit", &bucket("a", "1/m", &["192.0.2.1"]), &[EMPTIED]);
        let (actions, local) = send(&mut t, Request::get("/"));
        // Read, write (lost), re-read: refused.
        assert_eq!(actions.len(), 4);
        assert_eq!(local.map(|r| r.status), Some(429));
        assert_eq!(t.host().counter(METRIC, &["a", "error"]), Some(0));
    }

    #[test]
    fn a_request_that_ends_while_carrying_a_write_holds_up_nobody() {
        let mut t = setup(r#"{"limits": [{"name": "a", "key": ["client_ip"], "rate": "10/m"}]}"#);
        {
            let mut x = t.exchange(Request::get("/"));
            assert_eq!(x.request_headers(), Action::Pause);
            // Its read answered: its write (the bucket's flight) is out.
            assert_eq!(x.deliver_next_kv(), Some(Action::Pause));
            assert_eq!(x.kv_calls_outstanding(), 1);
            // The client goes away before the write's reply.
            x.done();
        }
        // The next request on the bucket does not wait for that write (it
        // would, by reading again and again, until the flight counted as lost).
        let mut x = t.exchange(Request::get("/"));
        let mut actions = vec![x.request_headers()];
        while let Some(a) = x.deliver_next_kv() {
            actions.push(a);
            assert!(actions.len() <= 4, "still waiting: {actions:?}");
        }
        assert_eq!(
            actions,
            vec![Action::Pause, Action::Pause, Action::Continue]
        );
        assert_eq!(t.host().counter(METRIC, &["a", "allowed"]), Some(1));
    }

    #[test]
    fn an_unreachable_backend_applies_the_failure_mode() {
        let mut t = setup(r#"{"limits": [{"name": "a", "key": ["client_ip"], "rate": "1/m"}]}"#);
        t.host().kv_unavailable(true);
        let (actions, local) = send(&mut t, Request::get("/"));
        assert_eq!(
            actions.last(),
            Some(&Action::Continue),
            "fail open by default"
        );
        assert_eq!(local, None);
        assert_eq!(t.host().counter(METRIC, &["a", "error"]), Some(1));

        let mut t = setup(
            r#"{"failure_mode": "deny", "limits": [{"name": "a", "key": ["client_ip"], "rate": "1/m"}]}"#,
        );
        t.host().kv_unavailable(true);
        let (_, local) = send(&mut t, Request::get("/"));
        let r = local.expect("a 503");
        assert_eq!(r.status, 503);
        assert_eq!(
            body(&r),
            serde_json::json!({"error": "rate_limit_unavailable", "limit": "a"})
        );
        t.host().kv_unavailable(false);
        let (_, local) = send(&mut t, Request::get("/"));
        assert_eq!(local, None, "back once the backend is");
    }
}
