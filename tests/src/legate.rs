//! Running Legate in-process: config text in, a handle with listener addresses, stats
//! helpers and shutdown out; optionally from a config file, so it can be reloaded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;
use legate_host::config::Config;
use legate_host::server;

use crate::certs::TempDir;
use crate::client::{client, Proto};
use crate::stats::{family_lines, parse_prometheus};

/// Builder of an in-process Legate. See [`legate()`].
pub struct LegateBuilder {
    yaml: String,
    concurrency: usize,
    base_dir: PathBuf,
    file: bool,
    watch: Option<Duration>,
    /// Written over the config file after it was read, before the server starts.
    edit_while_starting: Option<String>,
}

/// A new Legate builder (one worker thread unless [`LegateBuilder::concurrency`]).
pub fn legate() -> LegateBuilder {
    LegateBuilder {
        yaml: String::new(),
        concurrency: 1,
        base_dir: std::env::temp_dir(),
        file: false,
        watch: None,
        edit_while_starting: None,
    }
}

/// The config text with the admin listener on `127.0.0.1:0` if it names none (the
/// default port would collide between tests), appended so that line numbers in
/// messages stay those of `yaml`.
fn with_test_admin(yaml: &str) -> String {
    if names_admin(yaml) {
        yaml.to_string()
    } else {
        let sep = if yaml.is_empty() || yaml.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        format!("{yaml}{sep}admin:\n  address: 127.0.0.1:0\n")
    }
}

fn names_admin(yaml: &str) -> bool {
    yaml.lines().any(|l| l.starts_with("admin:"))
}

impl LegateBuilder {
    /// The `plugins.yaml` text. If it has no top-level `admin:` section, the admin
    /// listener is put on `127.0.0.1:0` (the default port would collide between tests).
    pub fn config(mut self, yaml: &str) -> Self {
        self.yaml = yaml.to_string();
        self
    }
    /// Worker threads (default 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }
    /// Directory relative paths in the config resolve against (default: temp dir).
    pub fn base_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.base_dir = dir.into();
        self
    }

    /// Starts from a config file (`legate.yaml` in a fresh temp dir, which relative
    /// paths then resolve against), as `legate run -c FILE` does, so `POST /reload`
    /// re-reads it and [`LegateHandle::write_config`] replaces it.
    pub fn from_file(mut self) -> Self {
        self.file = true;
        self
    }
    /// Starts from a config file (as [`LegateBuilder::from_file`]) that Legate checks
    /// for changes every `interval` (`--watch`).
    pub fn watch(mut self, interval: Duration) -> Self {
        self.file = true;
        self.watch = Some(interval);
        self
    }

    /// Starts from a config file (as [`LegateBuilder::from_file`]) that is
    /// replaced with `yaml` after Legate read it and before it starts serving:
    /// an edit landing while a process starts (its plugins compiling).
    pub fn edit_while_starting(mut self, yaml: &str) -> Self {
        self.file = true;
        self.edit_while_starting = Some(yaml.to_string());
        self
    }

    /// Parses the config (panicking with the rendered errors if it is invalid: tests
    /// only write valid configs here) and starts the server.
    pub fn start(self) -> LegateHandle {
        self.try_start()
            .unwrap_or_else(|e| panic!("legate failed to start: {e:#}"))
    }

    /// Parses the config (panicking if invalid) and starts the server, returning the
    /// start error (bind failure, unreadable certificate...) instead of panicking.
    pub fn try_start(self) -> anyhow::Result<LegateHandle> {
        let opts = server::Options {
            concurrency: self.concurrency,
        };
        let yaml = &self.yaml;
        let invalid = |e: &dyn std::fmt::Display| -> ! {
            panic!("invalid test config:\n{e}\n--- config ---\n{yaml}")
        };
        let file = self.file.then(|| {
            let dir = TempDir::new();
            let path = dir.write("legate.yaml", with_test_admin(yaml));
            (dir, path)
        });
        let (config, process) = match &file {
            Some((_, path)) => {
                let config = legate_host::config::load_file(path).unwrap_or_else(|e| invalid(&e));
                if let Some(edit) = &self.edit_while_starting {
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, with_test_admin(edit)).expect("write the config file");
                    std::fs::rename(&tmp, path).expect("replace the config file");
                }
                let process = server::ProcessOptions {
                    config_path: Some(path.clone()),
                    watch_interval: self.watch,
                    ..Default::default()
                };
                (config, process)
            }
            None => {
                let mut config: Config =
                    legate_host::config::parse_str("test.yaml", yaml, &self.base_dir)
                        .unwrap_or_else(|e| invalid(&e));
                if !names_admin(yaml) {
                    config.admin.address.value = "127.0.0.1:0".to_string();
                }
                (config, server::ProcessOptions::default())
            }
        };
        // Started on a plain thread: `start` may build and block on runtimes of its
        // own, which tokio forbids on a thread that is already inside a runtime.
        let handle = std::thread::spawn(move || server::start_with(config, opts, process))
            .join()
            .map_err(|_| anyhow::anyhow!("server::start panicked"))??;
        let admin = handle.admin_addr();
        Ok(LegateHandle {
            inner: Some(handle),
            admin,
            file,
        })
    }
}

/// A running Legate. Dropping it starts a graceful shutdown (without waiting).
pub struct LegateHandle {
    inner: Option<server::Handle>,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The config file and its directory, when started [`LegateBuilder::from_file`].
    file: Option<(TempDir, PathBuf)>,
}

/// Waits until `h` has stopped, on a thread of its own rather than the runtime's
/// blocking pool: a test that gives up waiting (a hang guard) then fails at once,
/// where the runtime's shutdown would wait for the blocking task, as long as the
/// drain it waits on.
async fn stopped(h: server::Handle) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("legate-wait".into())
        .spawn(move || {
            let _ = tx.send(h.wait());
        })?;
    rx.await
        .map_err(|_| anyhow::anyhow!("the thread waiting for legate to stop panicked"))?
}

impl LegateHandle {
    fn handle(&self) -> &server::Handle {
        self.inner
            .as_ref()
            .expect("legate handle used after shutdown")
    }

    /// The address listener `name` is bound to; panics if there is no such listener.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.handle()
            .listener_addr(name)
            .unwrap_or_else(|| panic!("legate has no listener named `{name}`"))
    }

    /// The address listener `name` is bound to, if there is such a listener (one a
    /// reload added or removed).
    pub fn try_addr(&self, name: &str) -> Option<SocketAddr> {
        self.handle().listener_addr(name)
    }

    /// The config file; panics unless started [`LegateBuilder::from_file`].
    pub fn config_path(&self) -> &Path {
        &self
            .file
            .as_ref()
            .expect("legate was not started from a config file")
            .1
    }

    /// Replaces the config file atomically (write, then rename), with the admin
    /// listener on `127.0.0.1:0` as at start if `yaml` names none.
    pub fn write_config(&self, yaml: &str) {
        let path = self.config_path();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, with_test_admin(yaml)).expect("write the config file");
        std::fs::rename(&tmp, path).expect("replace the config file");
    }

    /// `POST /reload`; returns (status, body).
    pub async fn reload(&self) -> (u16, String) {
        self.admin_post("/reload").await
    }

    /// Replaces the config file with `yaml` ([`LegateHandle::write_config`]) and
    /// reloads it ([`LegateHandle::assert_reload_ok`]); returns the reload's JSON
    /// report.
    pub async fn reload_ok(&self, yaml: &str) -> serde_json::Value {
        self.write_config(yaml);
        self.assert_reload_ok().await
    }

    /// Replaces the config file with `yaml` ([`LegateHandle::write_config`]) and
    /// asserts that reloading it is refused ([`LegateHandle::assert_reload_rejected`]);
    /// returns the error text.
    pub async fn reload_rejected(&self, yaml: &str) -> String {
        self.write_config(yaml);
        self.assert_reload_rejected().await
    }

    /// `POST /reload` of the files as they are (the config file and what it names,
    /// e.g. a renewed certificate); panics, with the status and body, unless it
    /// answers 200 with JSON. Returns that JSON, the reload's report.
    pub async fn assert_reload_ok(&self) -> serde_json::Value {
        let (status, body) = self.reload().await;
        assert_eq!(status, 200, "POST /reload answered {status}: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("POST /reload answered 200 but not JSON ({e}): {body}"))
    }

    /// `POST /reload` of the files as they are; panics, with the status and body,
    /// unless it answers 400 (the config in force stays). Returns the body, the
    /// error text.
    pub async fn assert_reload_rejected(&self) -> String {
        let (status, body) = self.reload().await;
        assert_eq!(status, 400, "POST /reload answered {status}: {body}");
        body
    }

    /// `http://<addr>` of listener `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}", self.addr(name))
    }

    /// The metrics registry itself, which outlives the server: for counters read
    /// after [`LegateHandle::shutdown_and_wait`], when `/stats` is gone.
    pub fn registry(&self) -> std::sync::Arc<legate_host::stats::Stats> {
        self.handle().stats()
    }

    /// The process-wide state. Holding it past [`LegateHandle::shutdown_and_wait`]
    /// is what `legate run` does (its signal loop keeps it until the process
    /// exits), so nothing may rely on it being dropped at shutdown.
    pub fn shared(&self) -> std::sync::Arc<server::Shared> {
        self.handle().shared()
    }

    /// Starts a graceful shutdown (as SIGTERM) without waiting for it.
    pub fn shutdown(&self) {
        self.handle().shutdown();
    }

    /// Shuts down gracefully and waits until the server has fully stopped.
    pub async fn shutdown_and_wait(mut self) -> anyhow::Result<()> {
        let h = self
            .inner
            .take()
            .expect("legate handle used after shutdown");
        h.shutdown();
        stopped(h).await
    }

    /// Waits (without starting one) until the server has stopped, e.g. after
    /// `POST /drain`; fails after `timeout`.
    pub async fn wait_stopped(mut self, timeout: Duration) -> anyhow::Result<()> {
        let h = self
            .inner
            .take()
            .expect("legate handle used after shutdown");
        tokio::time::timeout(timeout, stopped(h))
            .await
            .map_err(|_| anyhow::anyhow!("legate did not stop within {timeout:?}"))?
    }

    /// An admin request without a body; returns (status, body).
    pub async fn admin(&self, method: Method, path: &str) -> (u16, String) {
        let mut c = client(Proto::H1, self.admin).await;
        let r = c.request(method, path).send().await;
        (r.status.as_u16(), r.text())
    }

    /// `GET` an admin path; returns (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        self.admin(Method::GET, path).await
    }

    /// `POST` an admin path; returns (status, body).
    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        self.admin(Method::POST, path).await
    }

    /// The ABI `GET /plugins` reports for plugin `name`.
    pub async fn plugin_abi(&self, name: &str) -> String {
        let (status, body) = self.admin_get("/plugins").await;
        assert_eq!(status, 200, "GET /plugins: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("/plugins is JSON");
        let plugins = v["plugins"].as_array().cloned().unwrap_or_default();
        let p = plugins
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no plugin `{name}` in /plugins: {body}"));
        p["abi"].as_str().unwrap_or_default().to_string()
    }

    /// The `/stats` page (Prometheus text).
    pub async fn stats(&self) -> String {
        let (status, body) = self.admin_get("/stats").await;
        assert_eq!(status, 200, "GET /stats: {body}");
        body
    }

    /// The value of one series, written exactly as rendered, e.g.
    /// `legate_http_requests_total{listener="web",class="2xx"}`.
    pub async fn stat(&self, series: &str) -> Option<f64> {
        parse_prometheus(&self.stats().await).get(series).copied()
    }

    /// Asserts that `series` reaches `expected` within 2 s (counters are updated when a
    /// stream finishes, which may be just after the client saw the response); panics
    /// with the family's current series otherwise.
    pub async fn assert_stat(&self, series: &str, expected: f64) {
        self.assert_stat_with(series, |v| v == expected, &format!("== {expected}"))
            .await
    }

    /// Waits until `listener` has no open connection; panics, saying `what`
    /// did not happen, after [`crate::HANG_GUARD`].
    pub async fn wait_no_connections(&self, listener: &str, what: &str) {
        let series = format!("legate_listener_connections_active{{listener=\"{listener}\"}}");
        crate::eventually(crate::HANG_GUARD, what, || async {
            (self.stat(&series).await == Some(0.0)).then_some(())
        })
        .await;
    }

    /// Asserts that `series` satisfies `pred` within 2 s.
    pub async fn assert_stat_with(&self, series: &str, pred: impl Fn(f64) -> bool, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let text = self.stats().await;
            let v = parse_prometheus(&text).get(series).copied();
            if v.is_some_and(&pred) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "stat {series} = {v:?}, expected {what}\ncurrent series of the family:\n{}",
                    family_lines(&text, series)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for LegateHandle {
    fn drop(&mut self) {
        if let Some(h) = self.inner.take() {
            h.shutdown();
            // Not joined: a test that failed must not hang on a drain; the process
            // ends when the test binary does.
            std::thread::spawn(move || {
                let _ = h.wait();
            });
        }
    }
}
