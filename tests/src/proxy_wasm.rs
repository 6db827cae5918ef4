//! The proxy-wasm test filter (tests/proxy-wasm-guests), built with the upstream
//! `proxy-wasm` Rust SDK for wasm32-wasip1 exactly as for Envoy, once per test
//! process, into `target/proxy-wasm-guests`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::guests::build_wasm_crate;

/// The built `.wasm` (a core module exporting `proxy_abi_version_0_2_1`).
pub fn proxy_wasm_guest() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        build_wasm_crate(
            "tests/proxy-wasm-guests/Cargo.toml",
            "wasm32-wasip1",
            "proxy-wasm-guests",
            "legate_proxy_wasm_guests",
        )
    })
}
