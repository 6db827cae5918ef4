//! Plain value types shared by the filter API: directions, body modes, versions,
//! actions and local responses.

/// Which way data flows: `Request` is downstream to upstream, `Response` the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The request (client to upstream).
    Request,
    /// The response (upstream to client).
    Response,
}

/// How a filter receives a body in one direction (see the ABI spec, section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BodyMode {
    /// Chunk by chunk as it arrives; `content-length` is never touched.
    #[default]
    Streamed,
    /// The whole body in one call (up to the plugin's cap); the head is held
    /// until the body phase returns and `content-length` is recomputed.
    Buffered,
    /// No body calls: the body passes through untouched.
    Skipped,
}

/// The HTTP version of the downstream request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1.
    Http11,
    /// HTTP/2.
    Http2,
}

/// The TLS version of a downstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// What a phase tells the host to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Pass the message part on to the next filter (or the peer).
    Continue,
    /// Hold the message part until a callout response resumes it. Valid only
    /// while this exchange has a callout outstanding (otherwise the host treats
    /// the call as a failure).
    Pause,
    /// Answer locally instead of (or in place of) the upstream response.
    Respond(LocalResponse),
}

impl Action {
    /// Shorthand for `Action::Respond(LocalResponse::new(status).body(body))`.
    pub fn respond(status: u16, body: impl Into<Vec<u8>>) -> Action {
        Action::Respond(LocalResponse::new(status).body(body))
    }
}

/// A response the filter answers with, built with chained setters:
/// `LocalResponse::new(403).header("content-type", "text/plain").body("no\n")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// 200..=599.
    pub status: u16,
    /// Response fields; `content-length` is set by the host.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The response body.
    pub body: Vec<u8>,
    /// A short token for the access log (`cause = plugin:<details>`); may be empty.
    pub details: String,
}

impl LocalResponse {
    /// A response with `status`, no headers and an empty body.
    pub fn new(status: u16) -> Self {
        LocalResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            details: String::new(),
        }
    }

    /// Add a header (names are sent in lower case).
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

    /// Set the access-log details token.
    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The first value of header `name` (case-insensitive), if any.
    pub fn header_value(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}
