//! Legate's host: the proxy process.
#![forbid(unsafe_code)]
pub mod config;
pub mod tls;
