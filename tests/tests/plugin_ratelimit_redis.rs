//! Global rate limiting: plugins/ratelimit over the host's Redis KV backend
//! (`kv: {backend: redis}`), against a real `redis-server` started per test
//! (tests/src/redis.rs).
//!
//! - The backend itself: conditional writes, versions, increments with TTL, expiry,
//!   and `unavailable` at once when Redis cannot be reached.
//! - Two Legate *processes* against one Redis enforce one limit between them.
//! - Over TLS (`rediss://`, `kv.tls`): the server verified against a private CA,
//!   a client certificate presented; wrong CA or no certificate: `unavailable`.
//! - Redis killed mid-test: requests are served (the plugin's default fail-open
//!   policy), never hang, and the failures are counted in /stats; Redis restarted:
//!   Legate reconnects and the limit is enforced again.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use legate_host::stats::Stats;
use legate_host::wasm::kv::{
    ClientTlsConfig, Condition, Entry, KvBackend, KvError, KvResult, Op, RedisKv, Reply,
    TlsCertificates,
};
use legate_tests::plugins::plugin_wasm;
use legate_tests::redis::RedisServer;
use legate_tests::*;

/// Longest any one request may take before the test calls it a hang: far above
/// `kv.timeout` (400ms at most), far below a stuck worker.
const HANG: Duration = Duration::from_secs(10);

fn backend(url: &str, stats: &Arc<Stats>) -> RedisKv {
    RedisKv::new(url, None, Duration::from_millis(500), "t", stats).unwrap()
}

#[test]
fn backend_conditions_versions_increments_and_expiry() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let kv = backend(&redis.url(), &stats);

    let v1 = kv
        .set("n", "k", b"a".to_vec(), Condition::IfAbsent, None)
        .unwrap();
    assert_eq!(
        kv.set("n", "k", b"b".to_vec(), Condition::IfAbsent, None),
        Err(KvError::CasMismatch)
    );
    let v2 = kv
        .set("n", "k", b"b".to_vec(), Condition::IfVersion(v1), None)
        .unwrap();
    assert!(v2 > v1);
    assert_eq!(
        kv.set("n", "k", b"c".to_vec(), Condition::IfVersion(v1), None),
        Err(KvError::CasMismatch)
    );
    assert_eq!(
        kv.get("n", "k").unwrap(),
        Some(Entry {
            value: b"b".to_vec(),
            version: v2
        })
    );
    // Binary values survive; namespaces are separate.
    let bin = vec![0u8, 255, b':', 10, 13];
    kv.set("n", "bin", bin.clone(), Condition::Always, None)
        .unwrap();
    assert_eq!(kv.get("n", "bin").unwrap().unwrap().value, bin);
    assert_eq!(kv.get("other", "k").unwrap(), None);

    assert_eq!(
        kv.delete("n", "k", Condition::IfAbsent),
        Err(KvError::InvalidArgument)
    );
    assert_eq!(
        kv.delete("n", "k", Condition::IfVersion(v1)),
        Err(KvError::CasMismatch)
    );
    assert!(kv.delete("n", "k", Condition::IfVersion(v2)).unwrap());
    assert!(!kv.delete("n", "k", Condition::Always).unwrap());
    assert_eq!(
        kv.delete("n", "k", Condition::IfVersion(v2)),
        Err(KvError::CasMismatch)
    );
    // Re-created: a new version, so the old one never matches again (no ABA).
    let v3 = kv
        .set("n", "k", b"d".to_vec(), Condition::Always, None)
        .unwrap();
    assert!(v3 > v2);

    // Increments: absent = 0, the value stays a decimal, versions move.
    assert_eq!(kv.increment("n", "c", 5, None).unwrap(), 5);
    assert_eq!(kv.increment("n", "c", -2, None).unwrap(), 3);
    let e = kv.get("n", "c").unwrap().unwrap();
    assert_eq!(e.value, b"3");
    assert!(e.version > v3);
    assert_eq!(
        kv.increment("n", "bin", 1, None),
        Err(KvError::InvalidArgument)
    );
    kv.set(
        "n",
        "max",
        i64::MAX.to_string().into_bytes(),
        Condition::Always,
        None,
    )
    .unwrap();
    assert_eq!(
        kv.increment("n", "max", 1, None),
        Err(KvError::InvalidArgument)
    );
    assert_eq!(
        kv.get("n", "max").unwrap().unwrap().value,
        i64::MAX.to_string().as_bytes()
    );

    // Arguments checked as in memory.
    let long = "k".repeat(legate_host::wasm::kv::MAX_KEY + 1);
    assert_eq!(kv.get("n", &long), Err(KvError::InvalidArgument));
    assert_eq!(
        kv.set(
            "n",
            "big",
            vec![0; legate_host::wasm::kv::MAX_VALUE + 1],
            Condition::Always,
            None
        ),
        Err(KvError::LimitExceeded)
    );
    assert_eq!(
        kv.set("n", "z", vec![], Condition::Always, Some(Duration::ZERO)),
        Err(KvError::InvalidArgument)
    );

    // TTLs are Redis's own: the entry is gone after them; a counter's TTL is set
    // when it is created and kept by later increments.
    // (The counter's TTL is 1s, not 100ms: the check must come before it ends,
    // however slow a loaded machine is between the calls.)
    let ttl = Some(Duration::from_millis(100));
    kv.set("n", "t", b"v".to_vec(), Condition::Always, ttl)
        .unwrap();
    kv.increment("n", "tc", 1, Some(Duration::from_secs(1)))
        .unwrap();
    kv.increment("n", "tc", 1, Some(Duration::from_secs(3600)))
        .unwrap();
    let pttl = redis.command("PTTL t:n:tc");
    let pttl: i64 = pttl.trim().trim_start_matches(':').parse().unwrap();
    assert!(
        (1..=1000).contains(&pttl),
        "counter TTL {pttl}ms, want the first increment's (<= 1000)"
    );
    // A plain set without TTL clears an earlier one.
    kv.set("n", "p", b"v".to_vec(), Condition::Always, ttl)
        .unwrap();
    kv.set("n", "p", b"w".to_vec(), Condition::Always, None)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(kv.get("n", "t").unwrap(), None);
    assert_eq!(kv.increment("n", "tc", 1, None).unwrap(), 1);
    assert_eq!(kv.get("n", "p").unwrap().unwrap().value, b"w");

    let ops = parse_prometheus(&stats.render());
    let get = ops
        .iter()
        .find(|(k, _)| *k == r#"legate_kv_operations_total{backend="redis",op="get"}"#)
        .map(|(_, v)| *v);
    assert_eq!(get, Some(7.0), "{}", stats.render());
    let errors = ops
        .iter()
        .find(|(k, _)| *k == r#"legate_kv_errors_total{backend="redis"}"#)
        .map(|(_, v)| *v);
    assert_eq!(errors, Some(0.0), "{}", stats.render());
}

#[test]
fn backend_unreachable_is_unavailable_at_once_then_reconnects() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let kv = backend(&redis.url(), &stats);
    kv.set("n", "k", b"v".to_vec(), Condition::Always, None)
        .unwrap();
    redis.kill();
    // The pooled connection is dead (first call), then connects are refused
    // (second) and backed off (the rest): all `unavailable`, none waits.
    for _ in 0..5 {
        assert_eq!(kv.get("n", "k"), Err(KvError::Unavailable));
    }
    let stat = |name: &str| stat(&stats.render(), name);
    assert_eq!(
        stat(r#"legate_kv_errors_total{backend="redis"}"#),
        Some(5.0)
    );
    assert_eq!(stat(r#"legate_kv_up{backend="redis"}"#), Some(0.0));
    redis.restart();
    // Within the longest backoff (2s) the backend is used again: a fresh Redis,
    // so the key is gone.
    let deadline = Instant::now() + HANG;
    loop {
        match kv.get("n", "k") {
            Ok(v) => {
                assert_eq!(v, None);
                break;
            }
            Err(e) => assert_eq!(e, KvError::Unavailable),
        }
        assert!(Instant::now() < deadline, "no reconnect within {HANG:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        stat(r#"legate_kv_reconnects_total{backend="redis"}"#),
        Some(1.0)
    );
    assert_eq!(stat(r#"legate_kv_up{backend="redis"}"#), Some(1.0));
}

/// A pooled connection Redis closed while it sat idle (here Redis's own `timeout`,
/// as managed Redis services set it) is noticed before use: the next call
/// reconnects instead of failing with `unavailable` (before, it failed once).
#[test]
fn backend_replaces_an_idle_connection_redis_closed() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let kv = backend(&redis.url(), &stats);
    kv.set("n", "k", b"v".to_vec(), Condition::Always, None)
        .unwrap();
    redis.command("CONFIG SET timeout 1");
    // Redis closes clients idle for more than 1s; wait until only the test's own
    // (new) connection is left.
    let deadline = Instant::now() + HANG;
    while !redis
        .command("INFO clients")
        .contains("connected_clients:1\r")
    {
        assert!(Instant::now() < deadline, "Redis kept the idle client");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        kv.get("n", "k").map(|e| e.map(|e| e.value)),
        Ok(Some(b"v".to_vec()))
    );
    assert_eq!(
        stat(
            &stats.render(),
            r#"legate_kv_errors_total{backend="redis"}"#
        ),
        Some(0.0)
    );
}

/// `total_connections_received` from Redis's `INFO stats` (the INFO
/// connection itself included).
fn connections_received(redis: &RedisServer) -> u64 {
    let info = redis.command("INFO stats");
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no connection count in {info:?}"))
}

#[test]
fn backend_increments_answer_exact_sums_and_unavailable_for_refusals() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let kv = backend(&redis.url(), &stats);
    // Exact above 2^53 (Lua's numbers are doubles) and at i64::MAX.
    assert_eq!(
        kv.increment("n", "big", 9_007_199_254_740_993, None),
        Ok(9_007_199_254_740_993)
    );
    assert_eq!(kv.increment("n", "top", i64::MAX, None), Ok(i64::MAX));
    assert_eq!(
        kv.get("n", "top").unwrap().unwrap().value,
        i64::MAX.to_string().as_bytes()
    );
    // Redis refusing the write (out of memory) is `unavailable`, which the
    // guest's failure policy handles, not "not an integer".
    redis.command("CONFIG SET maxmemory 1");
    assert_eq!(kv.increment("n", "c", 1, None), Err(KvError::Unavailable));
    let render = stats.render();
    assert_eq!(
        stat(&render, r#"legate_kv_errors_total{backend="redis"}"#),
        Some(1.0),
        "{render}"
    );
    redis.command("CONFIG SET maxmemory 0");
    assert_eq!(kv.increment("n", "c", 1, None), Ok(1));
}

#[test]
fn backend_versions_stay_ahead_of_a_lost_version_counter() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let kv = backend(&redis.url(), &stats);
    let v1 = kv
        .set("n", "k", b"a".to_vec(), Condition::Always, None)
        .unwrap();
    let c1 = kv
        .increment("n", "c", 1, None)
        .and_then(|_| kv.get("n", "c").map(|e| e.unwrap().version))
        .unwrap();
    // Evicted, or not persisted across a restart or failover.
    redis.command("DEL t:n#version");
    let v2 = kv
        .set("n", "k", b"b".to_vec(), Condition::Always, None)
        .unwrap();
    assert!(v2 > v1, "{v2} after {v1}: an old version would match again");
    kv.increment("n", "c", 1, None).unwrap();
    let c2 = kv.get("n", "c").unwrap().unwrap().version;
    assert!(c2 > c1, "{c2} after {c1}");
    assert_eq!(
        kv.set("n", "k", b"c".to_vec(), Condition::IfVersion(v1), None),
        Err(KvError::CasMismatch)
    );
}

#[test]
fn backend_leaves_a_demoted_server_for_a_new_connection() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let kv = backend(&redis.url(), &stats);
    kv.set("n", "k", b"a".to_vec(), Condition::Always, None)
        .unwrap();
    // A failover demoted this server; it keeps its clients and still answers
    // PING, but refuses writes.
    redis.command("REPLICAOF 127.0.0.1 1");
    assert_eq!(
        kv.set("n", "k", b"b".to_vec(), Condition::Always, None),
        Err(KvError::Unavailable)
    );
    redis.command("REPLICAOF NO ONE");
    let before = connections_received(&redis);
    // After the backoff the write goes through, on a new connection (one
    // that a real failover's DNS or VIP would have taken to the new master).
    let deadline = Instant::now() + HANG;
    while kv
        .set("n", "k", b"c".to_vec(), Condition::Always, None)
        .is_err()
    {
        assert!(Instant::now() < deadline, "no write within {HANG:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = connections_received(&redis);
    assert!(
        after >= before + 2,
        "the write reused the connection to the demoted server ({before} -> {after})"
    );
}

/// A call that times out fails alone, as Envoy's per-request timeouts do:
/// no backoff, so the next calls are served as soon as Redis answers them.
/// (Before, one timeout failed every call for 100ms to 2s, and the ratelimit
/// plugin let every request through meanwhile.)
#[test]
fn backend_a_timed_out_call_fails_alone() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let kv = RedisKv::new(&redis.url(), None, Duration::from_millis(100), "t", &stats).unwrap();
    kv.set("n", "k", b"a".to_vec(), Condition::Always, None)
        .unwrap();
    // Holds every write (the scripts) and answers reads: each write times
    // out, and each read right after it is answered, on a new connection
    // (the timed-out one owes a reply and is not reused).
    redis.command("CLIENT PAUSE 10000 WRITE");
    for _ in 0..6 {
        assert_eq!(
            kv.set("n", "k", b"b".to_vec(), Condition::Always, None),
            Err(KvError::Unavailable)
        );
        assert_eq!(
            kv.get("n", "k").map(|e| e.map(|e| e.value)),
            Ok(Some(b"a".to_vec()))
        );
    }
    redis.command("CLIENT UNPAUSE");
    // Six timeouts in a row (before: a 2s backoff), and the next write
    // goes through at once.
    let v = kv.set("n", "k", b"c".to_vec(), Condition::Always, None);
    assert!(v.is_ok(), "{v:?}");
    let render = stats.render();
    for series in [
        r#"legate_kv_errors_total{backend="redis"}"#,
        r#"legate_kv_timeouts_total{backend="redis"}"#,
    ] {
        assert_eq!(stat(&render, series), Some(6.0), "{series}\n{render}");
    }
    assert_eq!(
        stat(&render, r#"legate_kv_up{backend="redis"}"#),
        Some(1.0),
        "{render}"
    );
}

/// `legate_kv_up` is 0 while Redis answers calls with an error (here NOPERM,
/// an ACL change; NOAUTH after a password change and OOM at `maxmemory` are
/// alike), new connections included, and 1 again once a call succeeds.
#[test]
fn backend_is_down_while_redis_refuses_its_calls() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let kv = backend(&redis.url(), &stats);
    let up = || stat(&stats.render(), r#"legate_kv_up{backend="redis"}"#);
    assert_eq!(kv.get("n", "k"), Ok(None));
    assert_eq!(up(), Some(1.0));
    redis.command("ACL SETUSER default -hmget");
    assert_eq!(kv.get("n", "k"), Err(KvError::Unavailable));
    assert_eq!(up(), Some(0.0), "{}", stats.render());
    // A new connection (the old ones closed) is made, then refused too.
    redis.command("CLIENT KILL TYPE normal");
    for _ in 0..3 {
        assert_eq!(kv.get("n", "k"), Err(KvError::Unavailable));
    }
    assert_eq!(up(), Some(0.0), "{}", stats.render());
    redis.command("ACL SETUSER default +hmget");
    let deadline = Instant::now() + HANG;
    while kv.get("n", "k").is_err() {
        assert!(Instant::now() < deadline, "no call within {HANG:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(up(), Some(1.0), "{}", stats.render());
}

/// A reload builds a new backend for the same `/stats` (a reloaded KV plugin
/// gets it): Redis's state is what the last call found, not "unknown". Before,
/// each new backend set `legate_kv_up` to 1, so a reload while Redis was down
/// reported it up until the next call.
#[test]
fn a_new_backend_keeps_legate_kv_up_of_the_last_call() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let up = || stat(&stats.render(), r#"legate_kv_up{backend="redis"}"#);
    // The first backend of a process: 1 before any call (unknown, not down).
    let kv = backend(&redis.url(), &stats);
    assert_eq!(up(), Some(1.0));
    redis.kill();
    assert_eq!(kv.get("n", "k"), Err(KvError::Unavailable));
    assert_eq!(up(), Some(0.0));
    // The reload's backend: Redis is still down, and the gauge says so.
    let reloaded = backend(&redis.url(), &stats);
    assert_eq!(up(), Some(0.0), "{}", stats.render());
    assert_eq!(reloaded.get("n", "k"), Err(KvError::Unavailable));
    assert_eq!(up(), Some(0.0));
    redis.restart();
    let deadline = Instant::now() + HANG;
    while reloaded.get("n", "k").is_err() {
        assert!(Instant::now() < deadline, "no call within {HANG:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(up(), Some(1.0));
}

/// An asynchronous call (`start`), on the calling thread's multiplexed connection.
async fn start(kv: &Arc<RedisKv>, op: Op) -> KvResult {
    let kv: Arc<dyn KvBackend> = kv.clone();
    kv.start("n", op).await
}

fn get_op(key: &str) -> Op {
    Op::Get { key: key.into() }
}

#[tokio::test(flavor = "current_thread")]
async fn backend_async_calls_reuse_one_connection_and_replace_a_closed_idle_one() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let kv = Arc::new(backend(&redis.url(), &stats));
    let set = Op::Set {
        key: "k".into(),
        value: b"v".to_vec(),
        cond: Condition::IfAbsent,
        ttl: None,
    };
    let Ok(Reply::Set(v1)) = start(&kv, set.clone()).await else {
        panic!("set failed")
    };
    assert_eq!(start(&kv, set).await, Err(KvError::CasMismatch));
    // Several calls at once share the thread's one connection.
    let calls: Vec<_> = (0..5).map(|_| start(&kv, get_op("k"))).collect();
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(
            r,
            Ok(Reply::Get(Some(Entry {
                value: b"v".to_vec(),
                version: v1
            })))
        );
    }
    assert!(redis
        .command("INFO clients")
        .contains("connected_clients:2\r"));

    // Redis closes clients idle for more than 1s; the next call checks the
    // idle connection and makes a new one instead of failing.
    redis.command("CONFIG SET timeout 1");
    let deadline = Instant::now() + HANG;
    while !redis
        .command("INFO clients")
        .contains("connected_clients:1\r")
    {
        assert!(Instant::now() < deadline, "Redis kept the idle client");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        start(&kv, get_op("k")).await,
        Ok(Reply::Get(Some(_)))
    ));
    let errors = stat(
        &stats.render(),
        r#"legate_kv_errors_total{backend="redis"}"#,
    );
    assert_eq!(errors, Some(0.0), "{}", stats.render());
}

#[tokio::test(flavor = "current_thread")]
async fn backend_async_calls_time_out_on_a_hung_redis() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let kv = Arc::new(
        RedisKv::new(&redis.url(), None, Duration::from_millis(100), "t", &stats).unwrap(),
    );
    assert!(matches!(
        start(&kv, get_op("k")).await,
        Ok(Reply::Get(None))
    ));
    redis.pause();
    for _ in 0..3 {
        assert_eq!(start(&kv, get_op("k")).await, Err(KvError::Unavailable));
    }
    let render = stats.render();
    assert_eq!(
        stat(&render, r#"legate_kv_errors_total{backend="redis"}"#),
        Some(3.0),
        "{render}"
    );
    assert!(
        stat(&render, r#"legate_kv_timeouts_total{backend="redis"}"#).is_some_and(|n| n >= 1.0),
        "{render}"
    );
    assert_eq!(
        stat(&render, r#"legate_kv_up{backend="redis"}"#),
        Some(0.0),
        "{render}"
    );
    redis.resume();
    let deadline = Instant::now() + HANG;
    while start(&kv, get_op("k")).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "not usable again within {HANG:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stat(&stats.render(), r#"legate_kv_up{backend="redis"}"#),
        Some(1.0)
    );
}

/// As [`backend_a_timed_out_call_fails_alone`], for the asynchronous calls:
/// the next call after a timeout is served at once, on a new connection.
#[tokio::test(flavor = "current_thread")]
async fn backend_async_timed_out_call_fails_alone() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    let kv = Arc::new(
        RedisKv::new(&redis.url(), None, Duration::from_millis(100), "t", &stats).unwrap(),
    );
    let set = |v: &[u8]| Op::Set {
        key: "k".into(),
        value: v.to_vec(),
        cond: Condition::Always,
        ttl: None,
    };
    assert!(matches!(start(&kv, set(b"a")).await, Ok(Reply::Set(_))));
    redis.command("CLIENT PAUSE 10000 WRITE");
    for _ in 0..6 {
        assert_eq!(start(&kv, set(b"b")).await, Err(KvError::Unavailable));
        let r = start(&kv, get_op("k")).await;
        assert!(
            matches!(&r, Ok(Reply::Get(Some(e))) if e.value == b"a"),
            "{r:?}"
        );
    }
    redis.command("CLIENT UNPAUSE");
    let r = start(&kv, set(b"c")).await;
    assert!(matches!(r, Ok(Reply::Set(_))), "{r:?}");
    let render = stats.render();
    assert_eq!(
        stat(&render, r#"legate_kv_timeouts_total{backend="redis"}"#),
        Some(6.0),
        "{render}"
    );
}

#[test]
fn backend_hung_redis_times_out() {
    let redis = RedisServer::start();
    let stats = Stats::new();
    // A short timeout: this test waits it out a few times.
    let kv = RedisKv::new(&redis.url(), None, Duration::from_millis(100), "t", &stats).unwrap();
    kv.set("n", "k", b"v".to_vec(), Condition::Always, None)
        .unwrap();
    // Connected, but nothing answers: each call gives up after the timeout
    // (sending fits the socket buffer; the reply never comes).
    redis.pause();
    for _ in 0..3 {
        assert_eq!(kv.get("n", "k"), Err(KvError::Unavailable));
    }
    let stat = |name: &str| stat(&stats.render(), name);
    assert_eq!(
        stat(r#"legate_kv_errors_total{backend="redis"}"#),
        Some(3.0)
    );
    // The first call timed out reading; the next ones timed out connecting (the
    // handshake gets no answer either) or failed at once while backing off.
    assert!(
        stat(r#"legate_kv_timeouts_total{backend="redis"}"#).is_some_and(|n| n >= 1.0),
        "{}",
        stats.render()
    );
    redis.resume();
    let deadline = Instant::now() + HANG;
    while kv.get("n", "k").is_err() {
        assert!(
            Instant::now() < deadline,
            "not usable again within {HANG:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(kv.get("n", "k").unwrap().unwrap().value, b"v");
}

/// A config with the ratelimit plugin on `/api` (one bucket per route, `rate`),
/// its KV in the Redis at `redis_url`; `web` and `admin` are `ip:port` (`:0` in
/// process).
fn config(up: SocketAddr, redis_url: &str, rate: &str, web: &str, admin: &str) -> String {
    format!(
        "version: 1
admin:
  address: {admin}
kv:
  backend: redis
  url: {redis_url}
  timeout: 400ms
listeners:
  - name: web
    address: {web}
    http:
      routes: main
      filters: [{{ plugin: ratelimit }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - name: api
            match: {{ prefix: /api }}
            cluster: backend
clusters:
  - name: backend
    endpoints:
      - address: {up}
plugins:
  - name: ratelimit
    module: {wasm}
    limits: {{ cpu: 500ms }}
    capabilities: {{ kv: [ratelimit] }}
    config:
      namespace: ratelimit
      emit_headers: true
      limits:
        - name: api
          match: {{ routes: [api] }}
          rate: {rate}
",
        wasm = plugin_wasm("plugins/ratelimit").display(),
    )
}

/// The certificates of `kv.tls`, read as the host reads them.
fn tls_certs(client: Option<&TlsFiles>, ca: &std::path::Path) -> TlsCertificates {
    TlsCertificates {
        client_tls: client.map(|c| ClientTlsConfig {
            client_cert: std::fs::read(&c.cert).unwrap(),
            client_key: std::fs::read(&c.key).unwrap(),
        }),
        root_cert: Some(std::fs::read(ca).unwrap()),
    }
}

#[test]
fn backend_over_tls_needs_a_trusted_server_and_a_client_certificate() {
    let ca = Ca::new("redis-ca");
    let server = ca.server(&["localhost"]);
    let client = ca.client("legate");
    let redis = RedisServer::start_tls(&server, Some(&server.ca));
    let stats = Stats::new();
    let timeout = Duration::from_millis(500);
    let url = redis.tls_url();

    let kv = RedisKv::new(
        &url,
        Some(tls_certs(Some(&client), &server.ca)),
        timeout,
        "t",
        &stats,
    )
    .unwrap();
    kv.set("n", "k", b"v".to_vec(), Condition::Always, None)
        .unwrap();
    assert_eq!(kv.get("n", "k").unwrap().unwrap().value, b"v");
    // It went to this Redis (seen over its plaintext port).
    assert!(redis.command("EXISTS t:n:k").starts_with(":1"));

    // The server asks for a client certificate: without one, nothing works.
    let anonymous = RedisKv::new(
        &url,
        Some(tls_certs(None, &server.ca)),
        timeout,
        "t",
        &stats,
    )
    .unwrap();
    assert_eq!(anonymous.get("n", "k"), Err(KvError::Unavailable));
    // A server certificate from a CA Legate does not trust is refused.
    let other = Ca::new("other-ca").server(&["localhost"]);
    let distrustful = RedisKv::new(
        &url,
        Some(tls_certs(Some(&client), &other.ca)),
        timeout,
        "t",
        &stats,
    )
    .unwrap();
    assert_eq!(distrustful.get("n", "k"), Err(KvError::Unavailable));
    // A plaintext client on the TLS port gets nowhere either.
    let plain = RedisKv::new(
        &url.replace("rediss://", "redis://"),
        None,
        timeout,
        "t",
        &stats,
    )
    .unwrap();
    assert_eq!(plain.get("n", "k"), Err(KvError::Unavailable));
}

each_proto!(
    async fn limits_through_redis_over_mutual_tls(proto) {
        limits_over_mutual_tls(proto, false).await;
    }
);

each_proto!(
    /// `kv.tls.key_password_file`: the client key is encrypted; the Redis
    /// client is given it decrypted.
    async fn limits_through_redis_with_an_encrypted_client_key(proto) {
        limits_over_mutual_tls(proto, true).await;
    }
);

/// A limit kept in a Redis that requires a client certificate; Legate's key
/// is `encrypted` (with `key_password_file`) or not.
async fn limits_over_mutual_tls(proto: Proto, encrypted: bool) {
    let ca = Ca::new("redis-ca");
    let server = ca.server(&["localhost"]);
    let client_files = ca.client("legate");
    let redis = RedisServer::start_tls(&server, Some(&server.ca));
    let up = upstream().start().await;
    let key = if encrypted {
        let (key, password) =
            client_files.write_encrypted_key("legate.enc.key", "legate.pass", "s3cret");
        format!(
            "{}\n    key_password_file: {}",
            key.display(),
            password.display()
        )
    } else {
        client_files.key.display().to_string()
    };
    let tls = format!(
        "  timeout: 400ms\n  tls:\n    ca: {}\n    client_cert: {}\n    client_key: {key}\n",
        server.ca.display(),
        client_files.cert.display(),
    );
    let yaml = config(
        up.addr,
        &redis.tls_url(),
        "2/h",
        "127.0.0.1:0",
        "127.0.0.1:0",
    );
    assert!(yaml.contains("  timeout: 400ms\n"));
    let lg = legate()
        .config(&yaml.replace("  timeout: 400ms\n", &tls))
        .start();
    let mut codes = Vec::new();
    for _ in 0..3 {
        let mut c = client(proto, lg.addr("web")).await;
        codes.push(c.get("/api/x").send().await.status);
    }
    assert_eq!(codes, [200, 200, 429]);
    assert_eq!(up.requests.get(), 2);
    // The bucket lives in Redis (seen over its plaintext port)...
    let keys = redis.command("KEYS legate:ratelimit:*");
    assert!(keys.contains("legate:ratelimit:"), "{keys}");
    // ...and no KV call failed on the way.
    lg.assert_stat(r#"legate_kv_errors_total{backend="redis"}"#, 0.0)
        .await;
}

/// Set (to a config path) in the environment of a child process of this test
/// binary: [`legate_child_process`] then runs Legate from that config.
const CHILD_CONFIG: &str = "LEGATE_TEST_CHILD_CONFIG";

/// Not a test: the body of each separate Legate process of
/// [`two_processes_share_one_limit`]. The test binary re-runs itself with only this
/// test selected and [`CHILD_CONFIG`] set, so the processes run exactly the Legate
/// under test without building the `legate` binary; in a normal run (variable
/// unset) it returns at once.
#[test]
fn legate_child_process() {
    let Some(path) = std::env::var_os(CHILD_CONFIG) else {
        return;
    };
    let path = PathBuf::from(path);
    let text = std::fs::read_to_string(&path).unwrap();
    let config =
        legate_host::config::parse_str("child.yaml", &text, path.parent().unwrap()).unwrap();
    let opts = legate_host::server::Options { concurrency: 2 };
    let handle = legate_host::server::start(config, opts).unwrap();
    // Runs until the parent kills it.
    handle.wait().unwrap();
}

/// A Legate in a process of its own ([`legate_child_process`]); killed when dropped.
struct LegateProcess {
    child: Child,
    web: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl LegateProcess {
    /// Starts a Legate process with the config `make(web, admin)` on free ports and
    /// waits until `/ready` answers 200.
    async fn start(make: impl Fn(&str, &str) -> String) -> Self {
        let dir = TempDir::new();
        let (web, admin) = (free_addr(), free_addr());
        let cfg = dir.path().join("legate.yaml");
        std::fs::File::create(&cfg)
            .unwrap()
            .write_all(make(&web.to_string(), &admin.to_string()).as_bytes())
            .unwrap();
        let log = dir.path().join("legate.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "legate_child_process", "--nocapture"])
            .env(CHILD_CONFIG, &cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn legate");
        let mut p = LegateProcess {
            child,
            web,
            admin,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("legate exited ({status}) before ready:\n{}", p.log());
            }
            if let Ok(mut c) = Client::connect(Proto::H1, admin).await {
                if c.get("/ready").send().await.status == 200 {
                    return p;
                }
            }
            assert!(Instant::now() < deadline, "legate not ready:\n{}", p.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn stats(&self) -> String {
        let mut c = client(Proto::H1, self.admin).await;
        c.get("/stats").send().await.text()
    }
}

impl Drop for LegateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the ratelimit plugin's `requests_total` series with `outcome`.
fn outcome(stats: &str, o: &str) -> Option<f64> {
    parse_prometheus(stats)
        .into_iter()
        .find(|(k, _)| {
            k.starts_with("legate_plugin_ratelimit_requests_total{")
                && k.contains(&format!("outcome=\"{o}\""))
        })
        .map(|(_, v)| v)
}

fn stat(stats: &str, series: &str) -> Option<f64> {
    parse_prometheus(stats)
        .into_iter()
        .find(|(k, _)| k == series)
        .map(|(_, v)| v)
}

/// One request to `/api/x`, failing the test if it takes longer than [`HANG`].
async fn get(proto: Proto, addr: SocketAddr) -> Resp {
    let mut c = client(proto, addr).await;
    tokio::time::timeout(HANG, c.get("/api/x").send())
        .await
        .unwrap_or_else(|_| panic!("a request hung for {HANG:?}"))
}

each_proto!(
    async fn two_processes_share_one_limit(proto) {
        let redis = RedisServer::start();
        let up = upstream().start().await;
        let url = redis.url();
        let a = LegateProcess::start(|web, admin| config(up.addr, &url, "10/h", web, admin)).await;
        let b = LegateProcess::start(|web, admin| config(up.addr, &url, "10/h", web, admin)).await;

        // Ten requests, alternating between the two processes: one bucket of 10,
        // so the remaining count goes down across both.
        for i in 0..10 {
            let (name, p) = if i % 2 == 0 { ("a", &a) } else { ("b", &b) };
            let r = get(proto, p.web).await;
            assert_eq!(r.status, 200, "request {i} via {name}: {}", r.text());
            assert_eq!(r.header("ratelimit-limit"), Some("10"));
            assert_eq!(
                r.header("ratelimit-remaining"),
                Some((9 - i).to_string().as_str()),
                "request {i} via {name}"
            );
        }
        // The 11th is refused by either.
        for p in [&a, &b] {
            let r = get(proto, p.web).await;
            assert_eq!(r.status, 429, "{}", r.text());
            let body: Value = serde_json::from_str(&r.text()).unwrap();
            assert_eq!(body["error"], "rate_limited");
            assert_eq!(r.header("ratelimit-remaining"), Some("0"));
        }
        assert_eq!(up.requests.get(), 10);

        for p in [&a, &b] {
            let s = p.stats().await;
            assert_eq!(outcome(&s, "allowed"), Some(5.0), "{s}");
            assert_eq!(outcome(&s, "limited"), Some(1.0), "{s}");
            assert_eq!(outcome(&s, "error"), Some(0.0), "{s}");
            assert_eq!(
                stat(&s, r#"legate_kv_errors_total{backend="redis"}"#),
                Some(0.0),
                "{s}"
            );
            assert!(
                stat(&s, r#"legate_kv_operations_total{backend="redis",op="set"}"#)
                    .is_some_and(|n| n >= 5.0),
                "{s}"
            );
        }
    }
);

each_proto!(
    async fn hung_redis_fails_open_without_hanging(proto) {
        let redis = RedisServer::start();
        let up = upstream().start().await;
        // A short kv.timeout, for the hung calls below to end soon (the default
        // config's 400ms leaves room for a loaded machine).
        let yaml = config(up.addr, &redis.url(), "3/h", "127.0.0.1:0", "127.0.0.1:0");
        assert!(yaml.contains("  timeout: 400ms\n"));
        let lg = legate()
            .config(&yaml.replace("  timeout: 400ms\n", "  timeout: 200ms\n"))
            .start();
        let web = lg.addr("web");
        let r = get(proto, web).await;
        assert_eq!(r.header("ratelimit-remaining"), Some("2"));

        // Redis stops answering (connections stay open): each KV call gives up
        // after kv.timeout (200ms; the wait is not CPU time for the plugin's
        // deadline), the
        // plugin fails open, and the request is served.
        redis.pause();
        for i in 0..3 {
            let r = get(proto, web).await;
            assert_eq!(r.status, 200, "request {i} with Redis hung: {}", r.text());
            assert_eq!(r.header("ratelimit-remaining"), None);
        }
        let s = lg.stats().await;
        assert_eq!(outcome(&s, "error"), Some(3.0), "{s}");
        assert!(
            stat(&s, r#"legate_kv_timeouts_total{backend="redis"}"#).is_some_and(|n| n >= 1.0),
            "{s}"
        );
        // No failed plugin call (deadline trap): the plugin handled every KV
        // failure itself.
        let failures: f64 = parse_prometheus(&s)
            .into_iter()
            .filter(|(k, _)| k.starts_with("legate_plugin_failures_total{"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(failures, 0.0, "{s}");
        redis.resume();
        let deadline = Instant::now() + HANG;
        loop {
            let r = get(proto, web).await;
            if let Some(remaining) = r.header("ratelimit-remaining") {
                assert_eq!(remaining, "1");
                break;
            }
            assert!(Instant::now() < deadline, "Redis not used again within {HANG:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
);

/// 60 requests at once on one bucket of 20, through `workers` workers: 20
/// answered, 40 refused, no KV error.
async fn concurrent_requests_on_one_bucket(proto: Proto, workers: usize) {
    let redis = RedisServer::start();
    let up = upstream().start().await;
    let yaml = config(up.addr, &redis.url(), "20/h", "127.0.0.1:0", "127.0.0.1:0");
    let lg = legate().config(&yaml).concurrency(workers).start();
    let web = lg.addr("web");
    let requests: Vec<_> = (0..60).map(|_| tokio::spawn(get(proto, web))).collect();
    let mut statuses = Vec::new();
    for r in requests {
        statuses.push(r.await.unwrap().status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((ok, refused), (20, 40), "{statuses:?}");
    assert_eq!(up.requests.get(), 20);
    let s = lg.stats().await;
    assert_eq!(outcome(&s, "allowed"), Some(20.0), "{s}");
    assert_eq!(outcome(&s, "limited"), Some(40.0), "{s}");
    assert_eq!(outcome(&s, "error"), Some(0.0), "{s}");
    // Far fewer writes than requests: one per flight (and per lost race
    // between workers), not one per attempt of each request.
    let sets = stat(
        &s,
        r#"legate_kv_operations_total{backend="redis",op="set"}"#,
    );
    assert!(sets.is_some_and(|n| (1.0..=40.0).contains(&n)), "{s}");
}

each_proto!(
    async fn concurrent_requests_on_one_bucket_are_each_counted_once(proto) {
        // One worker, so one plugin instance. Each admitted request must take
        // a token: before the instance wrote a bucket one flight at a time,
        // the requests raced their compare-and-swaps, most ran out of
        // attempts, and the KV error that made let them through unchecked
        // (`failure_mode: allow`): all 60 were served.
        concurrent_requests_on_one_bucket(proto, 1).await;
    }
);

each_proto!(
    async fn concurrent_requests_on_one_bucket_across_workers_are_each_counted_once(proto) {
        // Two instances: their flights race each other (a lost one re-reads,
        // re-decides its requests and writes again).
        concurrent_requests_on_one_bucket(proto, 2).await;
    }
);

each_proto!(
    async fn an_exchange_waiting_on_redis_holds_up_no_other(proto) {
        // One worker; the limit's KV calls are asynchronous (the namespace is
        // remote), so while one request waits on a hung Redis the worker
        // serves another. With the blocking calls, the worker would sit in the
        // first request's call until kv.timeout gave up on it, so the second
        // could only be served after a KV timeout.
        let redis = RedisServer::start();
        let up = upstream().start().await;
        let yaml = config(up.addr, &redis.url(), "3/h", "127.0.0.1:0", "127.0.0.1:0");
        let routes = "            cluster: backend\nclusters:";
        assert!(yaml.contains(routes) && yaml.contains("  timeout: 400ms\n"));
        let yaml = yaml
            .replace(
                routes,
                "            cluster: backend\n          - name: free\n            \
                 match: { prefix: /free }\n            cluster: backend\nclusters:",
            )
            // The longest allowed: ample time for the other request.
            .replace("  timeout: 400ms\n", "  timeout: 1s\n")
            .replace("limits: { cpu: 500ms }", "limits: { cpu: 5s }");
        let lg = legate().config(&yaml).concurrency(1).start();
        let web = lg.addr("web");
        // Connects to Redis and loads the scripts.
        assert_eq!(get(proto, web).await.header("ratelimit-remaining"), Some("2"));
        let gets = |s: &str| stat(s, r#"legate_kv_operations_total{backend="redis",op="get"}"#);
        assert_eq!(gets(&lg.stats().await), Some(1.0));

        redis.pause();
        let waiting = tokio::spawn(get(proto, web));
        // Until its read is out to Redis.
        let deadline = Instant::now() + HANG;
        while gets(&lg.stats().await) != Some(2.0) {
            assert!(Instant::now() < deadline, "the limited request never read its bucket");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut c = client(proto, web).await;
        let r = tokio::time::timeout(HANG, c.get("/free").send())
            .await
            .expect("a request not waiting on Redis was held up");
        assert_eq!(r.status, 200);
        let s = lg.stats().await;
        assert_eq!(
            stat(&s, r#"legate_kv_timeouts_total{backend="redis"}"#),
            Some(0.0),
            "served only after the waiting request's KV call timed out: {s}"
        );
        redis.resume();
        let r = waiting.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        // Its reply came (not a fail-open after a timeout): it consumed a token.
        assert_eq!(r.header("ratelimit-remaining"), Some("1"));
    }
);

each_proto!(
    async fn waiting_on_redis_is_not_cpu_time(proto) {
        // Three limits, so three KV reads per request. With Redis hung the first
        // waits out kv.timeout (40ms) and the reconnect for the second does too
        // (the third then fails at once: backoff), 80ms in all, above the
        // plugin's 60ms deadline. That deadline is CPU time, and waiting uses
        // none: the plugin gets its `unavailable`s and fails open instead of
        // being stopped (a 503).
        let redis = RedisServer::start();
        let up = upstream().start().await;
        let yaml = config(up.addr, &redis.url(), "3/h", "127.0.0.1:0", "127.0.0.1:0");
        assert!(yaml.contains("limits: { cpu: 500ms }") && yaml.ends_with("rate: 3/h\n"));
        let yaml = yaml
            .replace("limits: { cpu: 500ms }", "limits: { cpu: 60ms }")
            .replace("  timeout: 400ms\n", "  timeout: 40ms\n")
            + "        - { name: second, rate: 3/h }\n        - { name: third, rate: 3/h }\n";
        let lg = legate().config(&yaml).start();
        let web = lg.addr("web");
        assert_eq!(get(proto, web).await.status, 200);
        redis.pause();
        let r = get(proto, web).await;
        assert_eq!(r.status, 200, "with Redis hung: {}", r.text());
        let s = lg.stats().await;
        assert!(
            stat(&s, r#"legate_kv_timeouts_total{backend="redis"}"#).is_some_and(|n| n >= 2.0),
            "{s}"
        );
        assert_eq!(
            stat(&s, r#"legate_plugin_timeouts_total{plugin="ratelimit"}"#),
            Some(0.0),
            "{s}"
        );
        redis.resume();
    }
);

each_proto!(
    async fn redis_down_fails_open_then_reconnects(proto) {
        let redis = RedisServer::start();
        let up = upstream().start().await;
        let lg = legate()
            .config(&config(up.addr, &redis.url(), "3/h", "127.0.0.1:0", "127.0.0.1:0"))
            .start();
        let web = lg.addr("web");

        for i in 0..3 {
            let r = get(proto, web).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(
                r.header("ratelimit-remaining"),
                Some((2 - i).to_string().as_str())
            );
        }
        assert_eq!(get(proto, web).await.status, 429);

        // Redis crashes: the plugin gets `unavailable` and, failing open (its
        // default), lets every request through without a quota; none hangs.
        redis.kill();
        for i in 0..5 {
            let r = get(proto, web).await;
            assert_eq!(r.status, 200, "request {i} with Redis down: {}", r.text());
            assert_eq!(r.header("ratelimit-remaining"), None);
        }
        let s = lg.stats().await;
        assert_eq!(outcome(&s, "error"), Some(5.0), "{s}");
        assert_eq!(
            stat(&s, r#"legate_kv_errors_total{backend="redis"}"#),
            Some(5.0),
            "{s}"
        );
        assert_eq!(stat(&s, r#"legate_kv_up{backend="redis"}"#), Some(0.0), "{s}");

        // Redis is back (empty): once Legate has reconnected, the limit holds again
        // from a full bucket.
        redis.restart();
        let deadline = Instant::now() + HANG;
        loop {
            let r = get(proto, web).await;
            assert_eq!(r.status, 200, "{}", r.text());
            if let Some(remaining) = r.header("ratelimit-remaining") {
                assert_eq!(remaining, "2");
                break;
            }
            assert!(Instant::now() < deadline, "no reconnect within {HANG:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for left in ["1", "0"] {
            let r = get(proto, web).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("ratelimit-remaining"), Some(left));
        }
        assert_eq!(get(proto, web).await.status, 429);
        let s = lg.stats().await;
        assert_eq!(
            stat(&s, r#"legate_kv_reconnects_total{backend="redis"}"#),
            Some(1.0),
            "{s}"
        );
        assert_eq!(stat(&s, r#"legate_kv_up{backend="redis"}"#), Some(1.0), "{s}");
        assert_families_documented(&s);
    }
);
