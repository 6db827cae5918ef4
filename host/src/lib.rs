//! Legate's host: the proxy process.
//!
//! One module per stage of the request path: [`listener`] → [`connection`] →
//! [`proxy`] (with [`router`] and [`proxy_headers`]) → [`cluster`] (load balancing)
//! → [`upstream`] (connection pool). [`tcp_proxy`] is the L4 path. [`server`] and
//! [`worker`] own the process and threads, [`admin`] the admin API.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod body;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod error;
pub mod io;
pub mod listener;
pub mod mirror;
pub mod overrides;
pub mod proxy;
pub mod proxy_headers;
pub mod router;
pub mod server;
pub mod stats;
pub mod tcp_proxy;
pub mod tls;
pub mod upstream;
pub mod worker;
