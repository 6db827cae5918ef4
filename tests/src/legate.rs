//! Running Legate in-process: config text in, a handle with listener addresses, stats
//! helpers and shutdown out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use legate_host::config::Config;
use legate_host::server;

use crate::client::{client, Proto};
use crate::stats::{family_lines, parse_prometheus};

/// Builder of an in-process Legate. See [`legate()`].
pub struct LegateBuilder {
    yaml: String,
    concurrency: usize,
    base_dir: PathBuf,
}

/// A new Legate builder (one worker thread unless [`LegateBuilder::concurrency`]).
pub fn legate() -> LegateBuilder {
    LegateBuilder {
        yaml: String::new(),
        concurrency: 1,
        base_dir: std::env::temp_dir(),
    }
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

    /// Parses the config (panicking with the rendered errors if it is invalid: tests
    /// only write valid configs here) and starts the server.
    pub fn start(self) -> LegateHandle {
        self.try_start()
            .unwrap_or_else(|e| panic!("legate failed to start: {e:#}"))
    }

    /// Parses the config (panicking if invalid) and starts the server, returning the
    /// start error (bind failure, unreadable certificate...) instead of panicking.
    pub fn try_start(self) -> anyhow::Result<LegateHandle> {
        let mut config: Config =
            legate_host::config::parse_str("test.yaml", &self.yaml, &self.base_dir).unwrap_or_else(
                |e| panic!("invalid test config:\n{e}\n--- config ---\n{}", self.yaml),
            );
        if !self.yaml.lines().any(|l| l.starts_with("admin:")) {
            config.admin.address.value = "127.0.0.1:0".to_string();
        }
        let opts = server::Options {
            concurrency: self.concurrency,
        };
        // Started on a plain thread: `start` may build and block on runtimes of its
        // own, which tokio forbids on a thread that is already inside a runtime.
        let handle = std::thread::spawn(move || server::start(config, opts))
            .join()
            .map_err(|_| anyhow::anyhow!("server::start panicked"))??;
        let admin = handle.admin_addr();
        Ok(LegateHandle {
            inner: Some(handle),
            admin,
        })
    }
}

/// A running Legate. Dropping it starts a graceful shutdown (without waiting).
pub struct LegateHandle {
    inner: Option<server::Handle>,
    /// The admin listener.
    pub admin: SocketAddr,
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
        tokio::task::spawn_blocking(move || h.wait()).await?
    }

    /// Waits (without starting one) until the server has stopped, e.g. after
    /// `POST /drain`; fails after `timeout`.
    pub async fn wait_stopped(mut self, timeout: Duration) -> anyhow::Result<()> {
        let h = self
            .inner
            .take()
            .expect("legate handle used after shutdown");
        tokio::time::timeout(timeout, tokio::task::spawn_blocking(move || h.wait()))
            .await
            .map_err(|_| anyhow::anyhow!("legate did not stop within {timeout:?}"))??
    }

    /// `GET` an admin path; returns (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let mut c = client(Proto::H1, self.admin).await;
        let r = c.get(path).send().await;
        (r.status.as_u16(), r.text())
    }

    /// `POST` an admin path; returns (status, body).
    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        let mut c = client(Proto::H1, self.admin).await;
        let r = c.post(path).send().await;
        (r.status.as_u16(), r.text())
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
