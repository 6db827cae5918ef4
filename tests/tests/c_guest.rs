//! A Legate filter in C (examples/c-filter), built from source by
//! `scripts/build-c-filter.sh` exactly as its README says, is a component of
//! the `legate:filter/http-filter@0.1.0` shape: it exports
//! `legate:filter/http-handler@0.1.0` and imports only `legate:filter/*`
//! interfaces (no WASI: the filter uses no libc I/O).
//!
//! Running it inside the proxy is the host's integration tests' job; this
//! checks the build and the component's interface.

// Test code: a failed unwrap is a test failure with its location.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use legate_componentize::{describe, HTTP_HANDLER};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the build script into a fresh temp dir and returns the component.
fn build_c_filter() -> Vec<u8> {
    let out_dir = std::env::temp_dir().join(format!("legate-c-guest-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("c_filter.wasm");
    let output = Command::new("bash")
        .arg(repo_root().join("scripts/build-c-filter.sh"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "scripts/build-c-filter.sh failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_dir_all(&out_dir).unwrap();
    bytes
}

#[test]
fn c_filter_builds_into_an_http_filter_component() {
    let component = build_c_filter();

    // A component, not a core module: same magic, layer 1 in the version field.
    assert_eq!(&component[..4], b"\0asm", "not a wasm binary");
    assert_eq!(
        &component[4..8],
        &[0x0d, 0x00, 0x01, 0x00],
        "a core module, not a component"
    );

    let world = describe(&component).unwrap();
    assert_eq!(world.exports, vec![HTTP_HANDLER.to_owned()], "{world}");
    assert!(
        world
            .imports
            .iter()
            .any(|i| i == "legate:filter/http@0.1.0"),
        "the filter reads and writes headers, so it imports `http`:\n{world}"
    );
    for import in &world.imports {
        assert!(
            import.starts_with("legate:filter/") && import.ends_with("@0.1.0"),
            "unexpected import `{import}` (the C filter should need no WASI):\n{world}"
        );
    }
    world.check_http_filter().unwrap();
}
