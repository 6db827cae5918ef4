//! HTTP calls from a filter to a named upstream cluster. [`send`] returns at
//! once with an id; the response arrives later in
//! [`HttpFilter::on_callout_response`](crate::HttpFilter::on_callout_response)
//! (or `on_tick_callout_response` for callouts sent from `on_tick`).

use crate::backend;
use crate::Error;

/// Identifies a callout; unique within the plugin instance.
pub type CalloutId = u64;

/// A request to a cluster the plugin was granted. Build it with
/// `CalloutRequest::new("authz", "POST", "/check").header(..).body(..)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutRequest {
    /// The target cluster.
    pub cluster: String,
    /// The method.
    pub method: String,
    /// Path and query, starting with `/`.
    pub path: String,
    /// `None`: the cluster name.
    pub authority: Option<String>,
    /// Request fields.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The request body.
    pub body: Vec<u8>,
    /// Timeout in milliseconds; 0: the plugin's default (1000 ms).
    pub timeout_ms: u32,
}

impl CalloutRequest {
    /// A request without headers or body, with the default timeout.
    pub fn new(
        cluster: impl Into<String>,
        method: impl Into<String>,
        path: impl Into<String>,
    ) -> Self {
        CalloutRequest {
            cluster: cluster.into(),
            method: method.into(),
            path: path.into(),
            authority: None,
            headers: Vec::new(),
            body: Vec::new(),
            timeout_ms: 0,
        }
    }
    /// Set the authority.
    pub fn authority(mut self, authority: impl Into<String>) -> Self {
        self.authority = Some(authority.into());
        self
    }
    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers
            .push((name.into().to_ascii_lowercase(), value.into()));
        self
    }
    /// Set the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
    /// Set the timeout.
    pub fn timeout_ms(mut self, ms: u32) -> Self {
        self.timeout_ms = ms;
        self
    }
}

/// A callout's response (any status, 5xx included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutResponse {
    /// The status code.
    pub status: u16,
    /// Response fields.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body (capped by the host, default 1 MiB).
    pub body: Vec<u8>,
}

impl CalloutResponse {
    /// A response with `status`, no headers, and `body`.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        CalloutResponse {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }
    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers
            .push((name.into().to_ascii_lowercase(), value.into()));
        self
    }
    /// The first value of header `name` (case-insensitive).
    pub fn header_value(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Send a callout; the response is delivered after the current call returns.
/// Errors: `Denied` (cluster not granted), `NotFound` (no such cluster),
/// `InvalidArgument` (a method that is not a token, a path that does not start
/// with `/` or is not a valid URI path and query, an authority that is not a
/// valid URI authority, a bad header — `host`, `content-length` and
/// hop-by-hop fields are the host's —, or a timeout over 30 s),
/// `InvalidState` (from `configure` or `on_log`), `LimitExceeded` (more than
/// 8 outstanding for the context or 1024 for the instance, counting
/// asynchronous KV calls; over 1024 headers or a value over 64 KiB).
pub fn send(request: &CalloutRequest) -> Result<CalloutId, Error> {
    backend::callout_send(request)
}

/// Whether this plugin may send callouts to `cluster` (granted in its
/// `capabilities.clusters`). Call it from `configure` for each cluster the
/// config names, so a config the host would refuse every callout of fails
/// at load, with the host's hint of what to grant. Errors: `Denied` (not
/// granted). Needs a host of ABI 0.1.3 or later.
///
/// ```
/// # fn configure(cluster: &str) -> Result<(), String> {
/// legate_sdk::callout::check_cluster(cluster)
///     .map_err(|e| format!("cluster `{cluster}`: {e}"))?;
/// # Ok(()) }
/// ```
pub fn check_cluster(cluster: &str) -> Result<(), Error> {
    backend::callout_check_cluster(cluster)
}

/// Cancel an outstanding callout (or asynchronous KV call) of the running
/// call's own context: an exchange's call cancels only that exchange's, `on_tick`
/// only the plugin-level ones. Errors: `NotFound` (unknown, delivered, already
/// cancelled, another context's, or from `configure` or `on_done`).
pub fn cancel(id: CalloutId) -> Result<(), Error> {
    backend::callout_cancel(id)
}
