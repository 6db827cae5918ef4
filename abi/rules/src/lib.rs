//! The rules both sides of the Legate plugin ABI (abi/README.md) must agree
//! on, written once: the host (`legate-host`) applies them to a plugin, and
//! the guest SDK (`legate-sdk`, built for `wasm32-wasip2`) applies the same
//! ones in its native test harness (`legate_sdk::testing`), so a filter that
//! passes its native tests is not refused by the proxy.
//!
//! Each module is one area of the ABI: [`kv`] (what `increment` counts),
//! [`log`] (how a guest's log line is written), [`headers`] (the hop-by-hop
//! fields stripped from a callout response, the fields a filter may not
//! write, and which names and values it may), [`limits`] (the caps on header
//! maps, callouts, ticks and bodies, and the statuses a filter may give a response),
//! [`metrics`] (which names and labels a plugin may define), [`grpc`] (a
//! non-gRPC answer's status as gRPC's, and `grpc-message` encoding) and
//! [`wasi`] (the WASI interfaces a host links for a component).
//!
//! The crate has no dependencies and works on plain `&str` and bytes; a
//! caller converts to its own types (such as `http::HeaderName`) where it
//! uses a rule.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod grpc;
pub mod headers;
pub mod kv;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod wasi;
