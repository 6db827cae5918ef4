//! A real `redis-server` per test, on an ephemeral loopback port, with no
//! persistence: no global service, nothing shared between tests. The binary comes
//! from Debian's `redis-server` package (`scripts/setup.sh test` installs it).
//!
//! ```no_run
//! let redis = legate_tests::redis::RedisServer::start();
//! let url = redis.url(); // redis://127.0.0.1:PORT/0
//! redis.pause(); // SIGSTOP: connected but silent, as a hung server
//! redis.resume();
//! redis.kill(); // SIGKILL, as a crash
//! redis.restart(); // same port, empty data
//! ```
//!
//! [`RedisServer::start_tls`] adds a TLS port (`rediss://localhost:PORT/0`) beside
//! the plaintext one, which tests keep using to look inside.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A running `redis-server`; killed when dropped.
pub struct RedisServer {
    addr: SocketAddr,
    tls_port: Option<u16>,
    /// Extra arguments (the TLS ones), kept for [`RedisServer::restart`].
    args: Vec<String>,
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    /// Starts one on a free port, waiting until it answers `PING`.
    pub fn start() -> Self {
        Self::start_with(|_| Vec::new(), false)
    }

    /// Starts one that also serves TLS with `server`'s certificate (for the name
    /// `localhost`) on another port. `client_ca`: require client certificates
    /// issued by this CA (`tls-auth-clients yes`); `None`: no client certificate.
    pub fn start_tls(server: &crate::TlsFiles, client_ca: Option<&std::path::Path>) -> Self {
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let ca = client_ca.unwrap_or(&server.ca);
        let args = move |tls_port: u16| {
            vec![
                "--tls-port".into(),
                tls_port.to_string(),
                "--tls-cert-file".into(),
                path(&server.cert),
                "--tls-key-file".into(),
                path(&server.key),
                "--tls-ca-cert-file".into(),
                path(ca),
                "--tls-auth-clients".into(),
                if client_ca.is_some() { "yes" } else { "no" }.into(),
            ]
        };
        Self::start_with(args, true)
    }

    fn start_with(args: impl Fn(u16) -> Vec<String>, tls: bool) -> Self {
        // The ports are reserved for this process (free_addr), but something
        // outside the tests may still take one; retry with new ones.
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_addr().port()));
            let tls_port = tls.then(|| crate::free_addr().port());
            let args = tls_port.map(&args).unwrap_or_default();
            if let Some(child) = spawn(addr, &args) {
                return RedisServer {
                    addr,
                    tls_port,
                    args,
                    child: Mutex::new(Some(child)),
                };
            }
        }
        panic!("redis-server did not start on any of 5 reserved ports");
    }

    /// `rediss://localhost:PORT/0`, the TLS port of [`RedisServer::start_tls`].
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("started without TLS: use start_tls");
        format!("rediss://localhost:{port}/0")
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills it with SIGKILL (a crash: no goodbye to clients) and waits for it.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut c) = child.take() {
            // A paused process dies on SIGKILL too; no SIGCONT needed.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing is persisted).
    pub fn restart(&self) {
        self.kill();
        // The port was just released; retry briefly if the bind races.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(c) = spawn(self.addr, &self.args) {
                *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Freezes it (SIGSTOP): connections stay open but nothing is answered, as
    /// with a hung or overloaded server. [`RedisServer::resume`] undoes it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let pid = child.as_ref().expect("redis-server is not running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// Sends one command in RESP (inline form) and returns the raw reply.
    pub fn command(&self, cmd: &str) -> String {
        ping_like(self.addr, cmd).unwrap_or_else(|e| panic!("redis {cmd}: {e}"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts redis-server on `addr` and waits until it answers, or `None` if it
/// exited (typically: the port is taken).
fn spawn(addr: SocketAddr, extra: &[String]) -> Option<Child> {
    let mut child = Command::new("redis-server")
        .args(["--port", &addr.port().to_string()])
        .args(extra)
        .args(["--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        // No pid/log files or working files outside a temp dir.
        .args(["--dir", &std::env::temp_dir().to_string_lossy()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run redis-server ({e}); install it with `scripts/setup.sh test`")
        });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if ping_like(addr, "PING").is_ok_and(|r| r.starts_with("+PONG")) {
            return Some(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-server on {addr} did not answer PING within 10s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ping_like(addr: SocketAddr, cmd: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("{cmd}\r\n").as_bytes())?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
