//! Legate's host: the proxy process.
#![forbid(unsafe_code)]
pub mod cluster;
pub mod config;
