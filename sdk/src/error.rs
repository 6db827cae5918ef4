//! The one error type of every fallible host call (`legate:filter/types.error`).

use std::fmt;

/// Why a host call failed. Mirrors the ABI's `error` enum one to one; every SDK
/// function that can fail returns `Result<_, Error>` and none panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// Outside the plugin's capabilities (a cluster or KV namespace it was not
    /// granted), or a write the host never allows (hop-by-hop headers).
    Denied,
    /// The named thing does not exist: a cluster, a callout id, a namespace.
    NotFound,
    /// Malformed input: a header name or value, a metric name, a size, an offset.
    InvalidArgument,
    /// Not allowed at this point of the lifecycle (outside a write window,
    /// defining a metric outside `configure`, a callout from `configure`).
    InvalidState,
    /// A KV compare-and-swap precondition did not hold.
    CasMismatch,
    /// A configured limit would be exceeded.
    LimitExceeded,
    /// A callout's deadline passed.
    Timeout,
    /// The backend is unreachable or failed.
    Unavailable,
    /// This host does not implement the call.
    Unsupported,
    /// A host-side failure that is not the guest's fault (details in the host log).
    Internal,
}

impl Error {
    /// The ABI name of the error, e.g. `"cas-mismatch"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Error::Denied => "denied",
            Error::NotFound => "not-found",
            Error::InvalidArgument => "invalid-argument",
            Error::InvalidState => "invalid-state",
            Error::CasMismatch => "cas-mismatch",
            Error::LimitExceeded => "limit-exceeded",
            Error::Timeout => "timeout",
            Error::Unavailable => "unavailable",
            Error::Unsupported => "unsupported",
            Error::Internal => "internal",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for Error {}
