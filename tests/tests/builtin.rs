//! The first-party plugins embedded in the host (`module: builtin:NAME`): they are
//! the crates under plugins/ built from source, `legate plugin list` shows them
//! with the digest `sha256:` pins, and they run like a file module.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use legate_tests::plugins::plugin_wasm;
use legate_tests::*;

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The digest of the embedded `builtin:ratelimit`.
fn ratelimit_digest() -> String {
    sha256_hex(legate_host::wasm::builtin::get("ratelimit").unwrap())
}

#[test]
fn builtins_are_the_plugin_crates_built_from_source() {
    let plugins = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let mut crates: Vec<String> = std::fs::read_dir(&plugins)
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("Cargo.toml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    crates.sort();
    assert_eq!(legate_host::wasm::builtin::names(), crates);
    for name in &crates {
        // What `legate plugin build` makes of the crate now is what is embedded: a
        // stale embed (a plugin changed, the host not rebuilt) fails here.
        let built = std::fs::read(plugin_wasm(&format!("plugins/{name}"))).unwrap();
        let embedded = legate_host::wasm::builtin::get(name).unwrap();
        assert!(
            built == embedded,
            "builtin:{name} differs from plugins/{name} built now"
        );
    }
}

#[test]
fn plugin_list_prints_every_builtin_with_its_digest() {
    let out = Command::new(workspace_bin("legate"))
        .args(["plugin", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("builtin:ratelimit\t"))
        .unwrap_or_else(|| panic!("no builtin:ratelimit in:\n{stdout}"));
    assert!(
        line.ends_with(&format!("sha256:{}", ratelimit_digest())),
        "{line}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("builtin:auth\t")),
        "{stdout}"
    );
}

fn config(up: SocketAddr, namespace: &str, sha256: &str) -> String {
    format!(
        "version: 1
listeners:
  - name: web
    address: 127.0.0.1:0
    http:
      routes: main
      filters: [{{ plugin: limit }}]
routes:
  - name: main
    virtual_hosts:
      - name: all
        domains: [\"*\"]
        routes:
          - match: {{ prefix: / }}
            cluster: backend
clusters:
  - name: backend
    endpoints: [{{ address: {up} }}]
plugins:
  - name: limit
    module: builtin:ratelimit
    sha256: {sha256}
    limits: {{ cpu: 500ms }}
    capabilities: {{ kv: [{namespace}] }}
    config:
      namespace: {namespace}
      limits:
        - name: per-key
          key: [{{ header: x-key }}]
          rate: 2/h
"
    )
}

each_proto!(
    async fn a_pinned_builtin_runs_like_a_file_module(proto) {
        let up = upstream().start().await;
        // Both protocols' tests may share one process's KV store.
        let ns = format!("builtin-{proto:?}").to_lowercase();
        let lg = legate()
            .config(&config(up.addr, &ns, &ratelimit_digest()))
            .start();
        let mut c = client(proto, lg.addr("web")).await;
        for i in 0..2 {
            let r = c.get("/x").header("x-key", "k").send().await;
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
        }
        let r = c.get("/x").header("x-key", "k").send().await;
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(up.requests.get(), 2);
        lg.assert_stat(
            r#"legate_plugin_calls_total{plugin="limit",phase="request_headers"}"#,
            3.0,
        )
        .await;
    }
);

#[tokio::test]
async fn a_wrong_digest_refuses_the_builtin() {
    let up = upstream().start().await;
    let wrong = "0".repeat(64);
    let err = legate()
        .config(&config(up.addr, "builtin-wrong", &wrong))
        .try_start()
        .err()
        .expect("a builtin with a wrong sha256 must not load");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("builtin:ratelimit")
            && msg.contains(&ratelimit_digest())
            && msg.contains(&wrong),
        "{msg}"
    );
}

/// A plugin refusing its `config` (here a misspelt key of a builtin's limit)
/// is an error at that key's `file:line:col`, quoting the line, with where
/// the plugin's keys are documented: at `legate check`, at `legate run` and
/// in a refused reload's answer, as the file's own errors are. It named the
/// file only, so the operator had to find `limits[0]` by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_config_error_is_placed_at_its_key() {
    let up = upstream().start().await;
    let good = config(up.addr, "placed", &ratelimit_digest());
    let misspelt = |yaml: &str| yaml.replace("rate: 2/h", "rate: 2/h\n          burts: 3");
    // `legate run` below must not take the default admin port.
    let bad = misspelt(&format!("{good}admin:\n  address: {}\n", free_addr()));
    let line = bad.lines().position(|l| l.contains("burts")).unwrap() + 1;
    let dir = TempDir::new();
    let file = dir.write("bad.yaml", &bad);
    let want = format!(
        "{}:{line}:11: error: plugin `limit`: configure failed: invalid config: field \
         `limits[0]`: unknown field `burts`",
        file.display()
    );
    let quoted = format!("{line} |           burts: 3");
    let help = "help: the keys of its config are in plugins/ratelimit/README.md";

    let out = Command::new(workspace_bin("legate"))
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "legate check accepted it: {stderr}");
    assert!(stderr.starts_with(&want), "{stderr}");
    assert!(
        stderr.contains(&quoted) && stderr.contains(help),
        "{stderr}"
    );

    // `legate run` refuses to start, saying the same.
    let mut child = Command::new(workspace_bin("legate"))
        .args(["run", "--watch-interval", "0", "-c"])
        .arg(&file)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("legate run started with a config its plugin refuses");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("error: invalid config\n{want}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&quoted) && stderr.contains(help),
        "{stderr}"
    );

    // A reload to it is refused with the place, in the config file the
    // reload read; the config in force stays.
    let lg = legate().config(&good).from_file().start();
    let err = lg.reload_rejected(&misspelt(&good)).await;
    let want = format!(
        "{}:{line}:11: error: plugin `limit`: configure failed: invalid config: field \
         `limits[0]`: unknown field `burts`",
        lg.config_path().display()
    );
    assert!(err.starts_with(&want), "{err}");
    assert!(err.contains(&quoted) && err.contains(help), "{err}");
    let mut c = client(Proto::H1, lg.addr("web")).await;
    assert_eq!(c.get("/x").header("x-key", "k").send().await.status, 200);
}
