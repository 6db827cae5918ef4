//! Transparent sidecar: iptables `REDIRECT` plus `original_destination` listeners and
//! an `original_dst` cluster, exercised for real inside a network namespace that the
//! test creates (so no rule touches the machine's own tables).
//!
//! Inside namespace `legate-t-<pid>-<n>` (loopback only; all of 127.0.0.0/8 is local):
//!
//! ```text
//! curl --interface 127.0.0.3 ──▶ 127.0.0.2:9000
//!        │  nat OUTPUT: -s 127.0.0.3 -d 127.0.0.2 --dport 9000 -j REDIRECT --to-ports 15001
//!        ▼
//!   Legate 127.0.0.1:15001 (original_destination) ──▶ SO_ORIGINAL_DST = 127.0.0.2:9000
//!        ▼
//!   legate-demo-upstream 127.0.0.2:9000
//! ```
//!
//! Only connections from source 127.0.0.3 (the "application") are redirected, so
//! Legate's own upstream connection, made from 127.0.0.1 to the same destination, is
//! not sent back to Legate. Real sidecars get the same effect by exempting the proxy's
//! uid (`-m owner --uid-owner 1337 -j RETURN`, as Istio); a source-address match does
//! it here without running Legate as another user.
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for `ip netns add`) and the Debian
//! packages iproute2, iptables and curl (`scripts/setup.sh test`). Without them the
//! tests fail with a message saying so, unless `LEGATE_SKIP_NETNS=1` is set, in which
//! case they print `SKIPPED: ...` and return.
//!
//! Legate and the upstream are the real binaries (`legate`, `legate-demo-upstream`),
//! built by the test with `cargo build` and started with `ip netns exec`.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use legate_tests::{parse_prometheus, workspace_bin, TempDir, Value};

/// The address the redirected "application" connects to, and the upstream behind it.
const ORIGINAL_HTTP: &str = "127.0.0.2:9000";
const ORIGINAL_TCP: &str = "127.0.0.2:9001";
/// The application's source address: the only one whose connections are redirected.
const APP_SOURCE: &str = "127.0.0.3";
const ADMIN: &str = "127.0.0.1:9901";

/// The sidecar config: an HTTP and a TCP transparent listener, both sending to the
/// connection's original destination.
const CONFIG: &str = "\
version: 1
admin: { address: \"127.0.0.1:9901\" }
access_log: { path: stdout }
drain_timeout: 1s
listeners:
  - name: transparent
    address: 127.0.0.1:15001
    original_destination: true
    http: { routes: passthrough, via: legate-sidecar }
  - name: transparent-tcp
    address: 127.0.0.1:15002
    original_destination: true
    tcp: { cluster: original }
routes:
  - name: passthrough
    virtual_hosts:
      - name: any
        domains: [\"*\"]
        routes:
          - name: passthrough
            cluster: original
            timeout: 5s
clusters:
  - name: original
    original_dst: true
    connect_timeout: 1s
";

/// Whether the environment asked to skip tests that need network namespaces.
fn skip_allowed() -> bool {
    std::env::var("LEGATE_SKIP_NETNS").is_ok_and(|v| v == "1")
}

/// Fails the test with `why`, or prints `SKIPPED: why` when `LEGATE_SKIP_NETNS=1`.
/// Returns only in the skip case.
fn unavailable(why: &str) {
    if skip_allowed() {
        // Written to the real stderr, not through the test harness's capture, so
        // the skip shows in every `cargo test` run.
        let _ = writeln!(std::io::stderr(), "SKIPPED: {why} (LEGATE_SKIP_NETNS=1)");
    } else {
        panic!(
            "{why}.\nThis test needs root (CAP_NET_ADMIN) and iproute2, iptables and curl \
             (`scripts/setup.sh test`). Set LEGATE_SKIP_NETNS=1 to skip it explicitly."
        );
    }
}

/// A network namespace with loopback up. Dropping it kills every process started in
/// it (children first, then anything else `ip netns pids` still reports) and deletes
/// it, whether the test passed or panicked.
struct Netns {
    name: String,
    children: Vec<Child>,
    logs: TempDir,
}

impl Netns {
    /// Creates the namespace; `None` when the environment cannot (and the skip was
    /// allowed: otherwise this panics).
    fn create() -> Option<Netns> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "legate-t-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        for tool in ["ip", "iptables", "curl"] {
            let found = Command::new(tool)
                .arg(if tool == "curl" { "--version" } else { "-V" })
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            if !found {
                unavailable(&format!("`{tool}` is not installed"));
                return None;
            }
        }
        let add = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        if !add.status.success() {
            let err = String::from_utf8_lossy(&add.stderr);
            unavailable(&format!(
                "cannot create a network namespace (`ip netns add {name}`: {})",
                err.trim()
            ));
            return None;
        }
        // From here on, Drop deletes the namespace.
        let ns = Netns {
            name,
            children: Vec::new(),
            logs: TempDir::new(),
        };
        ns.run_ok(&["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `ip netns exec NAME args...`, as a command to adjust and run.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs `args` in the namespace; panics with its stderr if it fails.
    fn run_ok(&self, args: &[&str]) -> Output {
        let out = self
            .command(args)
            .output()
            .unwrap_or_else(|e| panic!("run {args:?} in {}: {e}", self.name));
        assert!(
            out.status.success(),
            "{args:?} in {} failed ({}):\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Redirects TCP from the application's source address to `dst` into `to_port`.
    fn redirect(&self, dst: &str, to_port: u16) {
        let (ip, port) = dst.split_once(':').unwrap();
        self.run_ok(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-s",
            APP_SOURCE,
            "-d",
            ip,
            "--dport",
            port,
            "-j",
            "REDIRECT",
            "--to-ports",
            &to_port.to_string(),
        ]);
    }

    /// Starts `legate-demo-upstream` on `addr` and waits until it has bound.
    fn start_upstream(&mut self, addr: &str, name: &str) {
        let bin = workspace_bin("legate-demo-upstream").display().to_string();
        let mut child = self
            .command(&[&bin, "--listen", addr, "--name", name, "--threads", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn legate-demo-upstream");
        let stdout = child.stdout.take().unwrap();
        self.children.push(child);
        // It prints `listening on ADDR` once bound; a closed pipe means it exited.
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert!(
            line.starts_with("listening on"),
            "legate-demo-upstream on {addr} did not start (stdout: {line:?})"
        );
    }

    /// Starts Legate with `config` and waits until its admin port reports ready.
    fn start_legate(&mut self, config: &str) {
        let cfg = self.logs.write("legate.yaml", config);
        let log = std::fs::File::create(self.logs.path().join("legate.log")).unwrap();
        let bin = workspace_bin("legate").display().to_string();
        let child = self
            .command(&[
                &bin,
                "run",
                "-c",
                cfg.to_str().unwrap(),
                "--concurrency",
                "1",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn legate");
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = self
                .command(&["curl", "-sf", "--max-time", "1"])
                .arg(format!("http://{ADMIN}/ready"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            if let Some(status) = self.children.last_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "legate exited ({status}) before it was ready:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "legate not ready after 10s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Legate's stdout and stderr (access log and tracing), for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("legate.log")).unwrap_or_default()
    }

    /// `curl -i` inside the namespace, optionally from `source`; returns the response.
    fn curl(&self, source: Option<&str>, url: &str) -> CurlResponse {
        let mut args = vec!["curl", "-sS", "-i", "--max-time", "5"];
        if let Some(s) = source {
            args.extend(["--interface", s]);
        }
        args.push(url);
        let out = self.run_ok(&args);
        CurlResponse::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// Legate's `/stats`, parsed.
    fn stats(&self) -> BTreeMap<String, f64> {
        let out = self.run_ok(&[
            "curl",
            "-sSf",
            "--max-time",
            "5",
            &format!("http://{ADMIN}/stats"),
        ]);
        parse_prometheus(&String::from_utf8_lossy(&out.stdout))
    }

    /// Waits up to 2s for `series` to equal `expected` (counters are updated when a
    /// stream or connection finishes, just after the client saw the response).
    fn assert_stat(&self, series: &str, expected: f64) {
        self.wait_stat(series, |v| v == expected, &format!("== {expected}"));
    }

    /// Waits up to 2s for `series` to satisfy `pred`; returns its value.
    fn wait_stat(&self, series: &str, pred: impl Fn(f64) -> bool, what: &str) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let stats = self.stats();
            let v = stats.get(series).copied();
            if let Some(v) = v.filter(|v| pred(*v)) {
                return v;
            }
            if Instant::now() >= deadline {
                let mut all = String::new();
                for (k, v) in stats {
                    if k.starts_with("legate_listener") || k.starts_with("legate_cluster") {
                        let _ = writeln!(all, "{k} {v}");
                    }
                }
                panic!(
                    "stat {series} = {v:?}, expected {what}\n{all}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            // `ip netns exec` execs the program, so this is the program itself.
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything else still in the namespace was started by this test (through a
        // child); its pids are listed by the namespace, not guessed by name.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let deleted = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status()
            .is_ok_and(|s| s.success());
        if !deleted {
            eprintln!("warning: could not delete network namespace {}", self.name);
        }
    }
}

/// A response as `curl -i` prints it.
#[derive(Debug)]
struct CurlResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl CurlResponse {
    fn parse(out: &str) -> CurlResponse {
        let (head, body) = out
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no header/body separator in curl output:\n{out}"));
        let mut lines = head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        CurlResponse {
            status,
            headers,
            body: body.to_string(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The demo upstream's echo of the request.
    fn echo(&self) -> Value {
        legate_tests::serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not an echo body ({e}): {}", self.body))
    }
}

#[test]
fn http_connection_redirected_by_iptables_reaches_its_original_destination() {
    let Some(mut ns) = Netns::create() else {
        return;
    };
    ns.start_upstream(ORIGINAL_HTTP, "original");
    ns.start_legate(CONFIG);
    ns.redirect(ORIGINAL_HTTP, 15001);

    // The application's connection: redirected into Legate, which forwards it to
    // where it was going.
    let r = ns.curl(Some(APP_SOURCE), &format!("http://{ORIGINAL_HTTP}/x?y=1"));
    assert_eq!(r.status, 200, "{r:?}\n{}", ns.log());
    assert_eq!(r.header("x-upstream"), Some("original"), "{r:?}");
    assert_eq!(r.header("via"), Some("1.1 legate-sidecar"), "{r:?}");
    let echo = r.echo();
    assert_eq!(echo["path"], "/x");
    assert_eq!(echo["query"], "y=1");
    // Headers only Legate adds: proof that the request went through it.
    assert_eq!(echo["headers"]["via"], "1.1 legate-sidecar", "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-for"], APP_SOURCE, "{echo}");
    assert_eq!(echo["headers"]["host"], ORIGINAL_HTTP, "{echo}");
    assert!(echo["headers"]["x-request-id"].is_string(), "{echo}");

    ns.assert_stat(
        r#"legate_listener_requests_total{listener="transparent",class="2xx"}"#,
        1.0,
    );
    ns.assert_stat(r#"legate_cluster_upstream_rq_2xx{cluster="original"}"#, 1.0);
    ns.assert_stat(
        r#"legate_cluster_upstream_cx_total{cluster="original"}"#,
        1.0,
    );

    // A connection from another source is not redirected: it reaches the upstream
    // directly and Legate sees nothing (the rule, not luck, decides).
    let direct = ns.curl(None, &format!("http://{ORIGINAL_HTTP}/direct"));
    assert_eq!(direct.status, 200, "{direct:?}");
    assert_eq!(direct.header("via"), None, "{direct:?}");
    assert!(direct.echo()["headers"].get("via").is_none(), "{direct:?}");
    ns.assert_stat(
        r#"legate_listener_connections_total{listener="transparent"}"#,
        1.0,
    );

    // A client that connects to the transparent listener itself has no original
    // destination to go to (the kernel reports the listener's own address): it
    // gets a 503, and Legate does not proxy to itself in a loop.
    let own = ns.curl(None, "http://127.0.0.1:15001/loop");
    assert_eq!(own.status, 503, "{own:?}");
    ns.assert_stat(
        r#"legate_listener_connections_total{listener="transparent"}"#,
        2.0,
    );
    ns.assert_stat(
        r#"legate_cluster_upstream_cx_total{cluster="original"}"#,
        1.0,
    );
}

#[test]
fn tcp_connection_redirected_by_iptables_reaches_its_original_destination() {
    let Some(mut ns) = Netns::create() else {
        return;
    };
    ns.start_upstream(ORIGINAL_TCP, "original-tcp");
    ns.start_legate(CONFIG);
    ns.redirect(ORIGINAL_TCP, 15002);

    let r = ns.curl(Some(APP_SOURCE), &format!("http://{ORIGINAL_TCP}/t"));
    assert_eq!(r.status, 200, "{r:?}\n{}", ns.log());
    assert_eq!(r.header("x-upstream"), Some("original-tcp"), "{r:?}");
    // An L4 proxy forwards bytes untouched: no header of Legate's.
    let echo = r.echo();
    assert_eq!(echo["path"], "/t");
    assert!(echo["headers"].get("via").is_none(), "{echo}");
    assert!(echo["headers"].get("x-forwarded-for").is_none(), "{echo}");
    // ...but the connection went through it, both ways.
    ns.assert_stat(
        r#"legate_listener_connections_total{listener="transparent-tcp"}"#,
        1.0,
    );
    let rx = ns.wait_stat(
        r#"legate_listener_rx_bytes_total{listener="transparent-tcp"}"#,
        |v| v > 0.0,
        "> 0 (the request)",
    );
    ns.wait_stat(
        r#"legate_listener_tx_bytes_total{listener="transparent-tcp"}"#,
        |v| v > rx,
        "more than received (the echo repeats the request)",
    );
    ns.assert_stat(
        r#"legate_listener_connections_total{listener="transparent"}"#,
        0.0,
    );
}
