//! The workspace's own binaries (`legate`, `legate-demo-upstream`, ...) for tests
//! that must run them as separate processes (network namespaces, two proxies
//! sharing state, hot restart). Built once per test process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use legate_host::plugin_build::cargo;

/// The path of the workspace binary `name` in the target directory, after one
/// `cargo build --workspace --bins` per test process. `--workspace` makes the
/// features of shared dependencies unify as in `scripts/test.sh`'s build, so
/// nothing but the binaries is built (`-p legate-host` alone would rebuild
/// wasmtime with other features, for minutes, inside the test); `--bins` and not
/// `--all-targets`, because `cargo build` builds test targets in the `dev`
/// profile while the test run built them in `test`: every test executable
/// would be compiled and linked a second time (minutes, and ~0.5 GB each).
///
/// With `LEGATE_BIN_DIR` set, the binaries are taken from that directory as they
/// are, nothing is built: benchmarks point it at `target/release`.
pub fn workspace_bin(name: &str) -> PathBuf {
    static TARGET: OnceLock<PathBuf> = OnceLock::new();
    let target = TARGET.get_or_init(|| {
        if let Some(dir) = std::env::var_os("LEGATE_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let build = cargo()
            .current_dir(&workspace)
            .args(["build", "--workspace", "--bins"])
            .output()
            .unwrap_or_else(|e| panic!("running cargo build: {e}"));
        assert!(
            build.status.success(),
            "cargo build --workspace --bins failed:\n{}",
            String::from_utf8_lossy(&build.stderr)
        );
        // `cargo metadata` knows the target directory (CARGO_TARGET_DIR, config...).
        let meta = cargo()
            .current_dir(&workspace)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .output()
            .unwrap_or_else(|e| panic!("running cargo metadata: {e}"));
        assert!(meta.status.success(), "cargo metadata failed");
        let meta: serde_json::Value =
            serde_json::from_slice(&meta.stdout).unwrap_or_else(|e| panic!("metadata: {e}"));
        let dir = meta["target_directory"]
            .as_str()
            .unwrap_or_else(|| panic!("no target_directory in cargo metadata"));
        PathBuf::from(dir).join("debug")
    });
    let bin = target.join(name);
    assert!(bin.is_file(), "{} was not built", bin.display());
    bin
}

/// Runs `legate check -c` on `yaml` (written into `dir`), which must fail
/// with an error placed at the first line containing `marker`, at the column
/// where `key` starts on it: `FILE:LINE:COL: error: ` then `want`, and the
/// line quoted. For the plugins' config errors, which the host places at the
/// key they name.
pub fn assert_check_places(dir: &crate::TempDir, yaml: &str, marker: &str, key: &str, want: &str) {
    let (line, text) = yaml
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains(marker))
        .unwrap_or_else(|| panic!("no line has {marker:?}"));
    let col = text
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} is not on the line {text:?}"))
        + 1;
    let file = dir.write("bad.yaml", yaml);
    let out = std::process::Command::new(workspace_bin("legate"))
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("running legate check: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "legate check accepted it: {stderr}");
    let place = format!("{}:{}:{col}: error: {want}", file.display(), line + 1);
    assert!(stderr.starts_with(&place), "wanted {place}\n{stderr}");
    assert!(stderr.contains(text.trim()), "the line is quoted: {stderr}");
}
