//! `legate plugin build` as a user runs it: it really builds
//! examples/hello-filter for wasm32-wasip2 (the `test` setup group installs the
//! target) and the result is a small component exporting the filter ABI.

use std::path::PathBuf;
use std::process::Command;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

fn legate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_legate"));
    // A target directory of its own, so the nested cargo never waits for the
    // lock of the build running this test; kept under target/ to stay warm.
    cmd.env(
        "CARGO_TARGET_DIR",
        repo_root().join("target").join("plugin-build-test"),
    );
    cmd
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("legate-plugin-build-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn builds_hello_filter_into_a_small_component() {
    let out = temp_dir().join("hello.wasm");
    let run = legate()
        .args(["plugin", "build"])
        .arg(repo_root().join("examples/hello-filter"))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run legate");
    assert!(
        run.status.success(),
        "legate plugin build failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        out.display().to_string()
    );
    let wasm = std::fs::read(&out).expect("read the built component");
    assert_eq!(
        &wasm[..8],
        &[0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00],
        "not a component"
    );
    let exports = b"legate:filter/http-handler@0.1.3";
    assert!(
        wasm.windows(exports.len()).any(|w| w == exports),
        "the component does not mention {}",
        String::from_utf8_lossy(exports)
    );
    // Stripped and size-optimized: a debug build of the same crate is ~6 MB.
    assert!(wasm.len() < 512 * 1024, "{} bytes", wasm.len());
}

#[test]
fn without_out_prints_the_built_path() {
    let run = legate()
        .args(["plugin", "build"])
        .arg(repo_root().join("examples/hello-filter/Cargo.toml"))
        .output()
        .expect("run legate");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&run.stdout).trim());
    assert!(
        path.ends_with("wasm32-wasip2/release/legate_example_hello_filter.wasm"),
        "{}",
        path.display()
    );
    assert!(path.is_file(), "{}", path.display());
}

#[test]
fn a_path_without_a_crate_is_a_clear_error() {
    let dir = temp_dir().join("empty");
    std::fs::create_dir_all(&dir).expect("dir");
    let run = legate()
        .args(["plugin", "build"])
        .arg(&dir)
        .output()
        .expect("run legate");
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("no such crate") && err.contains("has no Cargo.toml"),
        "{err}"
    );
}

#[test]
fn a_crate_without_cdylib_is_a_clear_error() {
    let run = legate()
        .args(["plugin", "build"])
        .arg(repo_root().join("sdk"))
        .output()
        .expect("run legate");
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("no cdylib library") && err.contains("crate-type"),
        "{err}"
    );
}

#[test]
fn a_build_failure_is_reported() {
    // Inside the repository, so rust-toolchain.toml (and its wasm target) applies.
    let dir = repo_root().join("target/plugin-build-test/broken-plugin");
    std::fs::create_dir_all(dir.join("src")).expect("dir");
    std::fs::write(
        dir.join("Cargo.toml"),
        "[package]\nname = \"broken-plugin\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[workspace]\n",
    )
    .expect("manifest");
    std::fs::write(
        dir.join("src/lib.rs"),
        "pub fn f() -> u32 { \"not a number\" }\n",
    )
    .expect("lib");
    let run = legate()
        .args(["plugin", "build"])
        .arg(&dir)
        .output()
        .expect("run legate");
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("mismatched types"), "{err}");
    assert!(err.contains("cargo build failed for"), "{err}");
}
