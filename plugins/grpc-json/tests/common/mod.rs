//! Descriptor sets for the tests, compiled with protox as `protoc
//! --include_imports` would: the harness's tests/proto (the real test service
//! with its `google.api.http` rules) and one-off `.proto` texts.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

fn proto_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/proto")
}

/// tests/proto/legate/test/v1/echo.proto with its imports, encoded.
pub fn echo_descriptors() -> Vec<u8> {
    compile("legate/test/v1/echo.proto", &[proto_root()])
}

/// `source` as `test.proto` (it may import google/api/annotations.proto),
/// compiled with its imports and encoded.
pub fn descriptors_of(source: &str) -> Vec<u8> {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "grpc-json-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("test.proto"), source).unwrap();
    let fds = compile("test.proto", &[dir.clone(), proto_root()]);
    let _ = std::fs::remove_dir_all(&dir);
    fds
}

/// Compiles `file` with its imports; encoded by protox, which keeps the
/// options' extensions (`prost_types` would drop `google.api.http`).
fn compile(file: &str, includes: &[PathBuf]) -> Vec<u8> {
    let mut c = protox::Compiler::new(includes).unwrap();
    c.include_imports(true)
        .open_file(file)
        .unwrap_or_else(|e| panic!("{e}"));
    c.encode_file_descriptor_set()
}

/// A gRPC frame around `msg`.
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut v = vec![0];
    v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// The config most tests use.
pub const CONFIG: &str = r#"{"services": ["legate.test.v1.Echo"]}"#;
