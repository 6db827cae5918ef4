//! The proxy-wasm test filter (tests/proxy-wasm-guests), built with the upstream
//! `proxy-wasm` Rust SDK for wasm32-wasip1 exactly as for Envoy, once per test
//! process, into `target/proxy-wasm-guests`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The built `.wasm` (a core module exporting `proxy_abi_version_0_2_1`).
pub fn proxy_wasm_guest() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let target_dir = root.join("target").join("proxy-wasm-guests");
        let out = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "--manifest-path",
            ])
            .arg(root.join("tests/proxy-wasm-guests/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .unwrap_or_else(|e| panic!("run cargo build for the proxy-wasm guests: {e}"));
        assert!(
            out.status.success(),
            "building tests/proxy-wasm-guests for wasm32-wasip1 failed (is the target \
             installed? `rustup target add wasm32-wasip1`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let wasm = target_dir.join("wasm32-wasip1/release/legate_proxy_wasm_guests.wasm");
        assert!(wasm.is_file(), "{} was not built", wasm.display());
        wasm
    })
}
