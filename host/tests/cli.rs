//! The `legate` binary as a user runs it: `check` exit codes and messages, and a real
//! process draining on SIGTERM with a request in flight.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn legate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_legate"))
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("legate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path
}

#[test]
fn check_accepts_the_default_config() {
    // As is: its plugins are the ones embedded in the binary (`builtin:NAME`).
    let out = legate()
        .args(["check", "-c"])
        .arg(repo_root().join("plugins.yaml"))
        .output()
        .expect("run legate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));
}

#[test]
fn check_rejects_a_bad_config_with_its_location() {
    let path = temp_file(
        "bad.yaml",
        "version: 1\nlisteners:\n  - name: web\n    address: 127.0.0.1:8080\n    http: { routes: nope }\n",
    );
    let out = legate()
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run legate");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}:5:21: error: unknown route table `nope`", path.display());
    assert!(err.contains(&expected), "{err}");
    assert!(err.contains("help:"), "{err}");
}

#[test]
fn run_refuses_a_missing_file() {
    let out = legate()
        .args(["run", "-c", "/nonexistent/legate.yaml"])
        .output()
        .expect("run legate");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the config file"));
}

/// An upstream that answers each request after `delay`, on its own thread.
fn slow_upstream(delay: Duration) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn);
                loop {
                    let mut line = String::new();
                    // Read one request head.
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    std::thread::sleep(delay);
                    let body = "slow ok";
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if r.get_mut().write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn sigterm_drains_the_request_in_flight_and_exits_zero() {
    let up = slow_upstream(Duration::from_millis(800));
    let port = free_port();
    let admin = free_port();
    let cfg = temp_file(
        "drain.yaml",
        &format!(
            "version: 1
admin: {{ address: 127.0.0.1:{admin} }}
drain_timeout: 10s
listeners:
  - name: web
    address: 127.0.0.1:{port}
    http: {{ routes: main }}
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: ['*']
        routes:
          - cluster: slow
clusters:
  - name: slow
    endpoints: [{{ address: '{up}' }}]
"
        ),
    );
    let mut child = legate()
        .args(["run", "--concurrency", "2", "-c"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start legate");

    // Wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        if let Ok(c) = TcpStream::connect(("127.0.0.1", port)) {
            break c;
        }
        assert!(Instant::now() < deadline, "legate did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    };
    conn.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("send request");
    // The request is now waiting on the slow upstream; ask Legate to stop.
    std::thread::sleep(Duration::from_millis(200));
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());

    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut resp = String::new();
    let _ = conn.read_to_string(&mut resp);
    assert!(
        resp.starts_with("HTTP/1.1 200 OK"),
        "in-flight request failed: {resp:?}"
    );
    assert!(resp.ends_with("slow ok"), "{resp:?}");

    // New connections are refused once it drains, and the process exits 0.
    let exit = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "legate did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(exit.success(), "exit {exit:?}: {stderr}");
    assert!(stderr.contains("SIGTERM: draining"), "{stderr}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}
