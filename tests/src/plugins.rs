//! Plugin components built from source for tests that run them in the real host:
//! Rust plugin crates through `legate plugin build` (the command users run), the C
//! and Python examples through their build scripts. Each is built once per test
//! process (the Python one once in all: its script caches it by content).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The component of the plugin crate at `crate_dir` (relative to the repository
/// root, e.g. `examples/hello-filter`), built with `legate plugin build` into
/// `target/plugin-build-test` (shared with the host's own plugin-build tests, so
/// it stays warm and never waits for the lock of the build running the tests).
pub fn plugin_wasm(crate_dir: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    // Held while building: two tests asking for the same crate build it once.
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(crate_dir) {
        return path.clone();
    }
    let root = repo_root();
    let target = root.join("target").join("plugin-build-test");
    let path = legate_host::plugin_build::build_in(&root.join(crate_dir), None, Some(&target))
        .unwrap_or_else(|e| panic!("legate plugin build {crate_dir} failed: {e:#}"));
    built.insert(crate_dir.to_string(), path.clone());
    path
}

/// examples/c-filter's component, built by `scripts/build-c-filter.sh`.
pub fn c_filter_wasm() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("legate-c-filter-{}.wasm", std::process::id()));
        let run = Command::new("bash")
            .arg(repo_root().join("scripts/build-c-filter.sh"))
            .arg(&out)
            .output()
            .unwrap_or_else(|e| panic!("running scripts/build-c-filter.sh: {e}"));
        assert!(
            run.status.success(),
            "scripts/build-c-filter.sh failed:\n{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        out
    })
}

/// examples/python-filter's component, built by `scripts/build-python-filter.sh`
/// (componentize-py, installed by `scripts/setup.sh pyguest` if missing).
pub fn python_filter_wasm() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        let out =
            std::env::temp_dir().join(format!("legate-python-filter-{}.wasm", std::process::id()));
        let run = Command::new("bash")
            .arg(repo_root().join("scripts/build-python-filter.sh"))
            .arg(&out)
            .output()
            .unwrap_or_else(|e| panic!("running scripts/build-python-filter.sh: {e}"));
        assert!(
            run.status.success(),
            "scripts/build-python-filter.sh failed:\n{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        out
    })
}
