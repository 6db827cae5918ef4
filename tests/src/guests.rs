//! Wasm guests built from source for the tests: the ABI fixture component
//! (tests/guests, one mode per ABI feature) and the crates other harness modules
//! build the same way. Each is built once per test process into a target
//! directory of its own under `target/`, so the nested cargo never waits for the
//! lock of the build running the tests.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use legate_host::plugin_build::cargo;

/// Builds the crate at `manifest` (relative to the repository root) in release
/// for `target` into `target/<dir>`; the path of its `<artifact>.wasm`.
pub fn build_wasm_crate(manifest: &str, target: &str, dir: &str, artifact: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target_dir = root.join("target").join(dir);
    let out = cargo()
        .args(["build", "--release", "--target", target, "--manifest-path"])
        .arg(root.join(manifest))
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host (e.g. -C target-cpu=native) break Wasm builds.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap_or_else(|e| panic!("running cargo build for {manifest}: {e}"));
    assert!(
        out.status.success(),
        "building {manifest} for {target} failed (is the target installed? \
         `rustup target add {target}`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wasm = target_dir.join(format!("{target}/release/{artifact}.wasm"));
    assert!(wasm.is_file(), "{} was not built", wasm.display());
    wasm
}

/// The L4 fixture component of tests/network-guest (`legate:filter/network-filter`;
/// `mode` in its config picks the behaviour).
pub fn network_guest() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        build_wasm_crate(
            "tests/network-guest/Cargo.toml",
            "wasm32-wasip2",
            "network-guest",
            "legate_network_guest",
        )
    })
}

/// The filter of tests/abi-0.1.0-guest, built against the 0.1.0 WIT kept there
/// verbatim: what an old plugin looks like to this host.
pub fn abi_0_1_0_guest() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        build_wasm_crate(
            "tests/abi-0.1.0-guest/Cargo.toml",
            "wasm32-wasip2",
            "abi-0.1.0-guest",
            "legate_abi_0_1_0_guest",
        )
    })
}

/// The fixture component of tests/guests (`mode` in its config picks the
/// behaviour under test).
pub fn test_guest() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        build_wasm_crate(
            "tests/guests/Cargo.toml",
            "wasm32-wasip2",
            "guests",
            "legate_test_guests",
        )
    })
}
