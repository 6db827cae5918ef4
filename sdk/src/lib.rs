//! `legate-sdk`: write Legate HTTP filters in Rust and build them into WebAssembly
//! components.
//!
//! The ABI (`abi/wit`, package `legate:filter@0.1.0`) and this SDK arrive with the
//! Wasm host; until then this crate only reserves the name and the lints.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
