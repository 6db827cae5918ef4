//! Legate's host: the proxy process.
//!
//! One module per stage of the request path: [`listener`] → [`connection`] →
//! [`proxy`] (with [`router`] and [`proxy_headers`]) → [`cluster`] (load balancing)
//! → [`upstream`] (connection pool). [`tcp_proxy`] is the L4 path, with [`network_filter`] chains. [`server`] and
//! [`worker`] own the process and threads, [`admin`] the admin API. [`filter`] is the
//! HTTP filter chain; [`wasm`] runs Wasm filter plugins in it.
// `deny`, not `forbid`: the one exception is loading a compiled component from the
// disk cache (`wasm::cache`), which says why it is sound.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod body;
pub mod cluster;
pub mod compress;
pub mod config;
pub mod connection;
pub mod cors;
pub mod error;
pub mod fault;
pub mod filter;
pub mod head;
pub mod hot_restart;
pub mod idle;
pub mod io;
pub mod listener;
pub mod local_reply;
pub mod mirror;
pub mod native;
pub mod network_filter;
pub mod overrides;
pub mod path;
pub mod plugin_build;
pub mod plugin_profile;
pub mod proxy;
pub mod proxy_headers;
pub mod proxy_protocol;
pub mod reload;
pub mod router;
pub mod server;
pub mod stats;
pub mod tcp_proxy;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod wasm;
pub mod worker;
