//! Integration-test harness for Legate: real sockets, real TLS, real upstreams.
//!
//! Every integration test follows the same pattern:
//!
//! 1. start one or more real upstream servers with [`upstream()`] (hyper 1 on
//!    127.0.0.1:0, run on a background runtime so they keep serving while a test
//!    blocks) or, for gRPC, [`grpc::grpc_upstream()`] (a real tonic server),
//! 2. format their addresses into a `plugins.yaml` text and start Legate in-process
//!    with [`legate()`],
//! 3. talk to it with a real client ([`client`], [`tls_client`], or [`raw`] bytes for
//!    malformed input),
//! 4. assert on the responses *and* on the `/stats` counters
//!    ([`LegateHandle::stat`], [`LegateHandle::assert_stat`]).
//!
//! HTTP tests run over both HTTP/1.1 and HTTP/2 with the [`each_proto!`] macro, which
//! expands one async body into an `h1` and an `h2` test (run in parallel, reported
//! separately):
//!
//! ```no_run
//! use legate_tests::*;
//!
//! each_proto!(async fn get_is_proxied(proto) {
//!     let up = upstream().name("a").start().await;
//!     let lg = legate().config(&simple_config(&[up.addr])).start();
//!     let mut c = client(proto, lg.addr("web")).await;
//!     let r = c.get("/hello").send().await;
//!     assert_eq!(r.status, 200);
//!     lg.assert_stat(r#"legate_listener_requests_total{listener="web",class="2xx"}"#, 1.0).await;
//! });
//! # fn main() {}
//! ```
//!
//! Everything binds 127.0.0.1 only. Nothing sleeps longer than the behaviour under
//! test needs: waits are polls with a deadline ([`eventually`]).

pub mod bins;
pub mod certs;
pub mod client;
pub mod dns;
pub mod grpc;
pub mod guests;
pub mod legate;
pub mod plugins;
pub mod proxy_wasm;
pub mod redis;
pub mod stats;
pub mod upstream;

use std::future::Future;
use std::io::Write as _;
use std::time::{Duration, Instant};

pub use bins::{assert_check_places, workspace_bin};
pub use certs::{Ca, TempDir, TlsFiles};
pub use client::{
    client, raw, raw_h2, raw_status, spread, tls_client, tls_raw, Client, Proto, RawConn,
    RequestBuilder, Resp, TlsOptions, TlsSessions,
};
pub use dns::{DnsServer, DnsState};
pub use guests::{abi_0_1_0_guest, network_guest, test_guest};
pub use legate::{legate, LegateBuilder, LegateHandle};
pub use stats::{assert_families_documented, parse_prometheus};
pub use upstream::{
    authz_upstream, checksum, echo, endless_tcp_server, grpc_echo, grpc_frame, health_checked,
    pattern_bytes, sink, source, tcp_echo_server, upgrade_echo_server, upstream,
    websocket_echo_server, BoxBody, BoxError, ConnInfo, Counter, EchoBody, TcpEchoHandle, TlsInfo,
    UpstreamBuilder, UpstreamHandle,
};

// Re-exported so tests need no direct dependency on them.
pub use bytes::Bytes;
pub use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
pub use http_body_util::Full;
pub use hyper::body::Incoming;
pub use serde_json::{self, json, Value};

/// Expands one async test body into two tokio tests, `h1` and `h2`, inside a module
/// named after the test, so `cargo test basic::get` runs both and a failure names the
/// protocol. The body gets the protocol as a [`Proto`] under the given name.
#[macro_export]
macro_rules! each_proto {
    ($(#[$meta:meta])* async fn $name:ident($proto:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($proto: $crate::Proto) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn h1() {
                run($crate::Proto::H1).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn h2() {
                run($crate::Proto::H2).await
            }
        }
    };
}

/// The longest a test waits for something that must happen at all (a close, an
/// answer, a stop): it turns a hang into a failure with a message and bounds no
/// speed (the project measures speed with benchmarks, never with timed
/// assertions). A test using it makes the broken behaviour a hang, or sets the
/// timeouts that could stand in for the one under test far beyond it. 20 s, below
/// hyper's own 30 s HTTP/1.1 header read timeout, so that this is never what
/// closes a connection a test waits on.
pub const HANG_GUARD: Duration = Duration::from_secs(20);

/// Polls `check` every 10ms until it returns `Some`, or panics after `timeout` naming
/// `what`. Used instead of sleeps wherever a test waits for something to happen.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A watchdog for a test that hangs rarely at a step not yet known: the test
/// names each step with [`Watchdog::step`], and if one step lasts longer than
/// the limit the watchdog writes the test's name and that step to stderr and
/// aborts the process (a hang inside synchronous code or a `block_on` cannot
/// be cut by a timeout around an await, and a panic on another thread would
/// not end the test). Dropping it stops the watch.
pub struct Watchdog {
    state: std::sync::Arc<std::sync::Mutex<WatchState>>,
}

struct WatchState {
    step: &'static str,
    since: Instant,
    done: bool,
}

impl Watchdog {
    /// Starts watching `test`: a step that lasts longer than `limit` aborts.
    pub fn new(test: &'static str, limit: Duration) -> Self {
        let state = std::sync::Arc::new(std::sync::Mutex::new(WatchState {
            step: "start",
            since: Instant::now(),
            done: false,
        }));
        let watched = std::sync::Arc::downgrade(&state);
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let Some(state) = watched.upgrade() else {
                    return;
                };
                let s = state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if s.done {
                    return;
                }
                if s.since.elapsed() > limit {
                    let _ = writeln!(
                        std::io::stderr(),
                        "WATCHDOG: {test} hung at step `{}` for over {limit:?}; aborting",
                        s.step
                    );
                    std::process::abort();
                }
            })
            .expect("spawning the watchdog thread");
        Watchdog { state }
    }

    /// The test is now at `step`; its time starts now.
    pub fn step(&self, step: &'static str) {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.step = step;
        s.since = Instant::now();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .done = true;
    }
}

/// The lines of the access log at `path`, parsed (none if it does not exist yet).
/// A last line without its newline (a write in progress) is left out; any other
/// line that is not JSON fails the test.
pub fn access_log_lines(path: &std::path::Path) -> Vec<Value> {
    access_log_text(path)
        .iter()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("access-log line is not JSON ({e}): {l:?}"))
        })
        .collect()
}

/// The whole lines of the access log at `path` as text (an `access_log.format`
/// log; none if it does not exist yet). A last line without its newline is
/// left out.
pub fn access_log_text(path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole.lines().map(str::to_string).collect()
}

/// Polls the access log at `path` until `done` accepts its lines, and returns them.
/// Lines reach the file from a writer thread, every `access_log.flush_interval`
/// (1s by default), not when the response is sent. Panics after 10 s naming `what`
/// and showing the lines so far.
pub async fn access_log_until(
    path: &std::path::Path,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = access_log_lines(path);
        if done(&lines) {
            return lines;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out waiting for {what} in the access log {}; its lines:\n{}",
                path.display(),
                lines
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A minimal config: one HTTP listener `web` on an ephemeral port whose every request
/// (virtual host `all`, route `all/0`) goes to cluster `backend` with the given
/// endpoints. [`simple_config_with`] adds keys to the route and the cluster.
pub fn simple_config(endpoints: &[std::net::SocketAddr]) -> String {
    simple_config_with(endpoints, "", "")
}

/// Listener `web` → cluster `backend`, whose endpoints come from the endpoint
/// file at `path` (`discovery: { type: file }`, read every 20ms);
/// `cluster_extra` lines go into the cluster (indented by 4).
pub fn file_discovery_config(path: &std::path::Path, cluster_extra: &str) -> String {
    web_config(
        "          - match: { prefix: / }\n            cluster: backend\n",
        &format!(
            "  - name: backend\n    discovery: {{ type: file, path: {}, watch_interval: 20ms }}\n{cluster_extra}",
            path.display()
        ),
    )
}

/// A config with one HTTP listener `web` on an ephemeral port, route table
/// `main` with one virtual host `all` for every domain, whose route list is
/// `routes` (YAML list items indented by 10 spaces), and the top-level cluster
/// list `clusters` (items indented by 2): what every single-listener test config
/// shares.
pub fn web_config(routes: &str, clusters: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
{routes}clusters:
{clusters}"
    )
}

/// [`simple_config`] with extra route keys (each line indented by 12 spaces, e.g.
/// `"            timeout: 1s\n"`) and extra cluster keys (each line indented by 4
/// spaces, e.g. `"    lb_policy: random\n"`).
pub fn simple_config_with(
    endpoints: &[std::net::SocketAddr],
    route_extra: &str,
    cluster_extra: &str,
) -> String {
    let mut eps = String::new();
    for e in endpoints {
        eps.push_str(&format!("      - address: {e}\n"));
    }
    web_config(
        &format!("          - match:\n              prefix: /\n            cluster: backend\n{route_extra}"),
        &format!("  - name: backend\n    endpoints:\n{eps}{cluster_extra}"),
    )
}

/// `yaml` (a config with a top-level `clusters:` list) with one more cluster,
/// `name`, at `addr`.
pub fn with_cluster(yaml: &str, name: &str, addr: std::net::SocketAddr) -> String {
    yaml.replacen(
        "clusters:\n",
        &format!("clusters:\n  - name: {name}\n    endpoints:\n      - address: {addr}\n"),
        1,
    )
}

/// A port on 127.0.0.1 reserved for this test process, for a server that must be
/// told its address before it starts (a config with a fixed address, another
/// process, Redis).
///
/// A port merely bound on `:0` and released can be handed to another test's
/// listener before our server binds it. So the port comes from below the kernel's
/// ephemeral range, which `bind(:0)` and outgoing connections never use, and is
/// claimed with a lock file (`flock`) that is held until this process exits, so no
/// other test process (nextest runs each test in its own) picks it too. The lock
/// files stay in `$TMPDIR/legate-test-ports`; a lock dies with its process.
pub fn free_addr() -> std::net::SocketAddr {
    reserve_port().unwrap_or_else(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind an ephemeral port")
    })
}

/// [`free_addr`]'s reservation; `None` when no port below the ephemeral range is
/// usable (a machine whose range starts low), and `free_addr` falls back to `:0`.
fn reserve_port() -> Option<std::net::SocketAddr> {
    const LOWEST: u16 = 10_000;
    // "32768\t60999": the kernel hands out ports from this range for `:0`.
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let count = first_ephemeral.checked_sub(LOWEST).filter(|&n| n > 0)?;
    let dir = std::env::temp_dir().join("legate-test-ports");
    std::fs::create_dir_all(&dir).ok()?;
    // Start where another process is unlikely to, and walk the pool once.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let start = (std::process::id().wrapping_mul(7919) ^ nanos) % u32::from(count);
    for i in 0..u32::from(count) {
        let port = LOWEST + ((start + i) % u32::from(count)) as u16;
        let Ok(lock) = std::fs::File::create(dir.join(port.to_string())) else {
            continue;
        };
        // Taken by a live test process (or by this one, earlier).
        if lock.try_lock().is_err() {
            continue;
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // Something outside the tests may listen there.
        if std::net::TcpListener::bind(addr).is_ok() {
            HELD_LOCKS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(lock);
            return Some(addr);
        }
    }
    None
}

/// [`reserve_port`]'s lock files, open (so locked) until the process exits.
static HELD_LOCKS: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());

/// A port on 127.0.0.1 that nothing listens on. Connecting to it is refused, which
/// is what connect-failure tests need.
///
/// The port is bound without `listen()` and the socket is kept until the test
/// process exits: a port that was merely released could be handed to another test's
/// listener running in parallel, which then answers where a refusal was expected.
pub fn closed_port_addr() -> std::net::SocketAddr {
    let (s, addr) = ephemeral_unlistened();
    hold(s);
    addr
}

/// A TCP socket bound to an ephemeral port on 127.0.0.1, not listening, and
/// its address.
fn ephemeral_unlistened() -> (socket2::Socket, std::net::SocketAddr) {
    let s = unlistened(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), false)
        .expect("bind an ephemeral port");
    let addr = s
        .local_addr()
        .expect("local_addr")
        .as_socket()
        .expect("an IPv4 address");
    (s, addr)
}

/// An address on 127.0.0.1 where a connect neither succeeds nor is refused: it
/// hangs until the connecting side gives up, as for an endpoint behind a firewall
/// that drops packets. Connect-timeout tests need it.
///
/// A listener with a backlog of 0 that never accepts: once its accept queue holds
/// a connection, Linux drops further SYNs (they are retried after 1 s, 3 s, ...).
/// The queue is filled here, and the address returned only once a connect to it
/// was seen to time out. Listener and connections are kept until the test process
/// exits.
pub fn unanswering_addr() -> std::net::SocketAddr {
    let (s, addr) = ephemeral_unlistened();
    s.listen(0).expect("listen");
    hold(s);
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(queued) => hold(socket2::Socket::from(queued)),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return addr,
            Err(e) => panic!("connect to the full backlog at {addr}: {e}"),
        }
    }
    panic!("{addr}: a backlog of 0 kept accepting connections (no SYN drop here)")
}

/// Takes `addr` back once the server that listened there has closed its listener
/// (tried for up to 2 s), and keeps it bound without listening, as
/// [`closed_port_addr`]: connections to a stopped server stay refused, and no
/// other test's server lands on its port while this process still probes it.
pub(crate) async fn hold_stopped_port(addr: std::net::SocketAddr) {
    for _ in 0..200 {
        // SO_REUSEADDR: the stopped server's connections may linger (TIME_WAIT).
        if let Ok(s) = unlistened(addr, true) {
            hold(s);
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TCP socket bound to `addr`, not listening.
fn unlistened(addr: std::net::SocketAddr, reuse: bool) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(reuse)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Keeps `s` open until the test process exits.
fn hold(s: socket2::Socket) {
    static HELD: std::sync::Mutex<Vec<socket2::Socket>> = std::sync::Mutex::new(Vec::new());
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(s);
}

/// After a reload removed ticking plugin `gone` (on two workers) and kept ticking
/// plugin `clock`: `gone`'s instances and their memory leave both workers, and
/// `gone` ticks no more while `clock` ticks ten more times (the clock, not a sleep).
pub async fn assert_ticks_stopped(lg: &LegateHandle, gone: &str, clock: &str) {
    let series = |name: &str, labels: String| format!("legate_plugin_{name}{{{labels}}}");
    let instances = series("instances", format!("plugin=\"{gone}\""));
    let memory = |w: u32| series("memory_bytes", format!("plugin=\"{gone}\",worker=\"{w}\""));
    let ticks = |p: &str| series("calls_total", format!("plugin=\"{p}\",phase=\"tick\""));
    eventually(
        Duration::from_secs(5),
        &format!("{gone}'s instances gone from both workers"),
        || async {
            let gone = lg.stat(&instances).await == Some(0.0)
                && lg.stat(&memory(0)).await == Some(0.0)
                && lg.stat(&memory(1)).await == Some(0.0);
            gone.then_some(())
        },
    )
    .await;
    let stopped = lg.stat(&ticks(gone)).await;
    assert!(stopped.is_some(), "{gone} never ticked");
    let from = lg.stat(&ticks(clock)).await.unwrap_or(0.0);
    eventually(
        Duration::from_secs(5),
        &format!("ten more ticks of {clock}"),
        || async {
            let now = lg.stat(&ticks(clock)).await.unwrap_or(0.0);
            (now >= from + 10.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        lg.stat(&ticks(gone)).await,
        stopped,
        "{gone} ticked after its removal"
    );
}
