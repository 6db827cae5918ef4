//! Compiles tests/proto with protox (a pure-Rust protobuf compiler: no system
//! `protoc`) into prost messages and a tonic server for the harness's gRPC
//! upstream (src/grpc.rs), and writes the `FileDescriptorSet` next to them for
//! plugins that need the schema (e.g. JSON transcoding).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/legate/test/v1/echo.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("legate_test_v1_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
