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

/// The AssemblyScript filter of tests/proxy-wasm-as (Solo.io's
/// `@solo-io/proxy-runtime` SDK), built once per test process: its sources are
/// copied into a directory of this process under `target/proxy-wasm-as`, where
/// `npm ci` installs the locked SDK and compiler and `asc` builds the module.
/// Needs `npm` (scripts/setup.sh test installs it).
pub fn assemblyscript_guest() -> &'static Path {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let src = root.join("tests/proxy-wasm-as");
        let base = root.join("target/proxy-wasm-as");
        let dir = base.join(format!("build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("assembly"))
            .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        for f in ["package.json", "package-lock.json", "assembly/index.ts"] {
            std::fs::copy(src.join(f), dir.join(f))
                .unwrap_or_else(|e| panic!("copy tests/proxy-wasm-as/{f}: {e}"));
        }
        let npm = |args: &[&str]| {
            let out = std::process::Command::new("npm")
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| {
                    panic!("running npm (install Node.js and npm: scripts/setup.sh test): {e}")
                });
            assert!(
                out.status.success(),
                "npm {args:?} in {} failed:\n{}{}",
                dir.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        npm(&["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
        npm(&["run", "build", "--silent"]);
        // One stable path; the per-process directory is removed.
        let wasm = base.join(format!("filter-{}.wasm", std::process::id()));
        std::fs::copy(dir.join("build/filter.wasm"), &wasm)
            .unwrap_or_else(|e| panic!("the AssemblyScript build made no filter.wasm: {e}"));
        let _ = std::fs::remove_dir_all(&dir);
        wasm
    })
}
