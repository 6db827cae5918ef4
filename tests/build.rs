//! Compiles tests/proto with protox (a pure-Rust protobuf compiler: no system
//! `protoc`) into prost messages and a tonic server for the harness's gRPC
//! upstream (src/grpc.rs), and writes the `FileDescriptorSet` next to them for
//! plugins that need the schema (e.g. JSON transcoding).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/legate/test/v1/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    // Its imports: the `google.api.http` options (JSON transcoding rules).
    println!("cargo:rerun-if-changed=proto/google/api");
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_file(proto)?;
    let fds = compiler.file_descriptor_set();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Encoded by protox itself: `prost_types` would drop the options'
    // extensions (the `google.api.http` rules) as unknown fields.
    std::fs::write(
        out.join("legate_test_v1_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    // The demo's service (examples/demo-upstream/proto): its descriptor set is
    // committed as examples/demo-upstream/echo.pb for plugins.yaml, and a test
    // (default_config.rs) checks the committed file against this one.
    let demo = "legate/demo/v1/echo.proto";
    println!("cargo:rerun-if-changed=../examples/demo-upstream/proto");
    let mut demo_compiler = protox::Compiler::new(["../examples/demo-upstream/proto", "proto"])?;
    demo_compiler.include_imports(true).open_file(demo)?;
    std::fs::write(
        out.join("legate_demo_v1_descriptor.bin"),
        demo_compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
