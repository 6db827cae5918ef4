//! The proxy's one error type and the one place errors become HTTP responses.
//!
//! Every failure on the request path is a [`ProxyError`] with a [`Kind`] (what went
//! wrong), a [`Side`] (whose fault: downstream client, upstream server, a plugin, or
//! Legate itself) and whether a retry may help. [`ProxyError::to_response`] is the only
//! code that picks a status for an error, so the mapping is written down once.
//! Once the request phases of a filter chain ran, the response goes through the
//! filters' response phases like an upstream response (`proxy::local_reply`,
//! abi/README.md §3.6), so they may still change it.
//!
//! | kind | status | retryable |
//! |---|---|---|
//! | `NoRoute` | 404 | no |
//! | `BodyTooLarge` | 413 | no |
//! | `BadRequest` | 400 | no |
//! | `HeadersTooLarge` | 431 | no |
//! | `NotImplemented` | 501 | no |
//! | `UpgradeRefused` | 403 (`upgrade_failed`), HTTP/1.1 connection closed | no |
//! | `UpgradeUnsupported` | 502 (`upgrade_failed`), HTTP/1.1 connection closed | no |
//! | `ConnectFailed` | 502 | yes (`connect-failure`) |
//! | `UpstreamReset` | 502 | yes (`reset`) |
//! | `UpstreamProtocol` | 502 | yes (`reset`: a malformed response head) |
//! | `NoHealthyUpstream` | 503 | no |
//! | `Overloaded` | 503 + `x-legate-overloaded: true` | no |
//! | `Timeout` (route) | 504 | no |
//! | `PerTryTimeout` | 504 | yes |
//! | `StreamIdleTimeout` | 408 (`stream_idle_timeout`) before the response head; after it the stream is reset | no |
//! | `PluginFailure` | 503, body `plugin_failure: <plugin>` | no |
//! | `RequestBufferLimit` | 413 (`plugin_buffer_limit`) | no |
//! | `ResponseBufferLimit` | 502 (`plugin_buffer_limit`) | no |
//! | `DownstreamReset` | (none: the client is gone) | no |
//! | `Internal` | 500 | no |

use std::fmt;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No virtual host or route matched.
    NoRoute,
    /// The request body exceeded the route's `max_request_body`.
    BodyTooLarge,
    /// The request was malformed in a way hyper let through.
    BadRequest,
    /// More request headers than the listener allows.
    HeadersTooLarge,
    /// A request feature Legate does not implement (an unknown transfer coding).
    NotImplemented,
    /// An HTTP/1.1 `Upgrade:` to a protocol neither the listener's `http.upgrades`
    /// nor the route allows (Envoy's 403 with details `upgrade_failed`).
    UpgradeRefused,
    /// An allowed HTTP/1.1 upgrade whose upstream connection is HTTP/2 (a
    /// `protocol: h2` cluster, or `auto` where ALPN chose h2): HTTP/2 has no
    /// `Upgrade`, and Legate does not speak extended CONNECT (RFC 8441).
    UpgradeUnsupported,
    /// TCP or TLS connect to the upstream failed or timed out.
    ConnectFailed,
    /// The upstream closed or reset the connection/stream before a full response.
    UpstreamReset,
    /// The upstream sent something that is not valid HTTP.
    UpstreamProtocol,
    /// The cluster has no endpoint to send to.
    NoHealthyUpstream,
    /// A limit (connections, pending requests) refused the request.
    Overloaded,
    /// The route's whole-request timeout fired.
    Timeout,
    /// The client did not send the request body the proxy buffers (for
    /// retries or a mirror) within the route timeout.
    RequestTimeout,
    /// One attempt's `per_try_timeout` fired.
    PerTryTimeout,
    /// Nothing moved on the stream (either direction) for the stream idle
    /// timeout (Envoy's `stream_idle_timeout`, response flag `SI`).
    StreamIdleTimeout,
    /// A filter plugin with `fail: closed` trapped, overran its deadline or memory
    /// cap, or returned an invalid result. The detail is the plugin's name.
    PluginFailure,
    /// A request body a filter buffers was over the plugin's `limits.body`.
    RequestBufferLimit,
    /// A response body a filter buffers was over the plugin's `limits.body`: the
    /// upstream sent more than this gateway was configured to handle.
    ResponseBufferLimit,
    /// The client went away.
    DownstreamReset,
    /// A bug or resource failure inside Legate.
    Internal,
}

/// Whose fault an error is; used for stats and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client.
    Downstream,
    /// The upstream server or the network to it.
    Upstream,
    /// A filter plugin.
    Plugin,
    /// Legate itself.
    Internal,
}

/// An error on the request path.
#[derive(Debug)]
pub struct ProxyError {
    /// What went wrong.
    pub kind: Kind,
    /// Detail for logs and the short response body (never secrets).
    pub detail: String,
    /// The reply's headers once the matched route finished them (its and its
    /// virtual host's `response_headers`, as for an upstream response; see
    /// [`ProxyError::finish_headers`]). `None` before routing.
    headers: Option<Box<HeaderMap>>,
    /// Why the upstream connection's transport (TLS) failed, as the TLS
    /// library says (`invalid peer certificate: NotValidForName`): the access
    /// log's `upstream_transport_failure_reason` (Envoy's
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`). Never in the client's reply.
    pub transport_failure: Option<String>,
    /// The upstream said it did not process the request (HTTP/2
    /// `REFUSED_STREAM`, or a stream above a graceful GOAWAY's last stream):
    /// RFC 9113 §8.7 lets any request, whatever its method, be retried then
    /// (the route's `retry_on: refused-stream`).
    pub unprocessed: bool,
}

impl ProxyError {
    /// An error of `kind` with a detail message.
    pub fn new(kind: Kind, detail: impl Into<String>) -> Self {
        ProxyError {
            kind,
            detail: detail.into(),
            headers: None,
            transport_failure: None,
            unprocessed: false,
        }
    }

    /// The error, marked as one of a request the upstream did not process
    /// ([`ProxyError::unprocessed`]).
    #[must_use]
    pub fn with_unprocessed(mut self) -> Self {
        self.unprocessed = true;
        self
    }

    /// The error with the reason its upstream transport (TLS) failed.
    #[must_use]
    pub fn with_transport_failure(mut self, reason: String) -> Self {
        self.transport_failure = Some(reason);
        self
    }

    /// Lets the matched route finish the reply's headers (`finish` gets the
    /// headers [`ProxyError::to_response`] would send), as Envoy's router does
    /// for its local replies. Only error paths pay for it.
    #[must_use]
    pub fn finish_headers(mut self, finish: impl FnOnce(&mut HeaderMap)) -> Self {
        let mut h = self.to_response().into_parts().0.headers;
        finish(&mut h);
        self.headers = Some(Box::new(h));
        self
    }

    /// Classifies a failure while reading the client's request body: over the
    /// route's limit (413), the client gone mid-body (499, logged only), or a
    /// malformed body such as bad chunking (400).
    pub fn request_body(err: &(dyn std::error::Error + 'static)) -> Self {
        // A filter that failed in a streamed body phase failed the body with its
        // own error (a plugin failure is 503, not the client's fault); it is
        // under hyper's "error from the body stream", so look past that first.
        let mut src = Some(err);
        while let Some(cur) = src {
            if let Some(e) = cur.downcast_ref::<ProxyError>() {
                return ProxyError::new(e.kind, e.detail.clone());
            }
            src = cur.source();
        }
        let mut src = Some(err);
        while let Some(cur) = src {
            if cur.is::<crate::body::BodyTooLarge>() {
                return ProxyError::new(Kind::BodyTooLarge, cur.to_string());
            }
            if let Some(h) = cur.downcast_ref::<hyper::Error>() {
                let kind = if h.is_incomplete_message()
                    || h.is_closed()
                    || h.is_canceled()
                    || client_reset(h)
                {
                    Kind::DownstreamReset
                } else {
                    Kind::BadRequest
                };
                return ProxyError::new(kind, format!("request body: {h}"));
            }
            src = cur.source();
        }
        ProxyError::new(Kind::BadRequest, format!("request body: {err}"))
    }

    /// Whose fault it is.
    pub fn side(&self) -> Side {
        match self.kind {
            Kind::NoRoute
            | Kind::BodyTooLarge
            | Kind::BadRequest
            | Kind::HeadersTooLarge
            | Kind::NotImplemented
            | Kind::UpgradeRefused
            | Kind::RequestBufferLimit
            | Kind::RequestTimeout
            | Kind::StreamIdleTimeout
            | Kind::DownstreamReset => Side::Downstream,
            Kind::ConnectFailed
            | Kind::UpstreamReset
            | Kind::UpstreamProtocol
            | Kind::NoHealthyUpstream
            | Kind::Timeout
            | Kind::ResponseBufferLimit
            | Kind::PerTryTimeout => Side::Upstream,
            // The configuration's: the endpoint did nothing wrong.
            Kind::Overloaded | Kind::Internal | Kind::UpgradeUnsupported => Side::Internal,
            Kind::PluginFailure => Side::Plugin,
        }
    }

    /// Whether another attempt (on another endpoint) may succeed. The route's
    /// `retry_on` decides whether one is actually made.
    pub fn retryable(&self) -> bool {
        matches!(
            self.kind,
            Kind::ConnectFailed
                | Kind::UpstreamReset
                | Kind::UpstreamProtocol
                | Kind::PerTryTimeout
        )
    }

    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            Kind::NoRoute => StatusCode::NOT_FOUND,
            Kind::BodyTooLarge | Kind::RequestBufferLimit => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Kind::NotImplemented => StatusCode::NOT_IMPLEMENTED,
            Kind::UpgradeRefused => StatusCode::FORBIDDEN,
            Kind::ConnectFailed
            | Kind::UpstreamReset
            | Kind::UpstreamProtocol
            | Kind::UpgradeUnsupported
            | Kind::ResponseBufferLimit => StatusCode::BAD_GATEWAY,
            Kind::NoHealthyUpstream | Kind::Overloaded | Kind::PluginFailure => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Kind::Timeout | Kind::PerTryTimeout => StatusCode::GATEWAY_TIMEOUT,
            // Envoy's local reply for its stream idle timeout too.
            Kind::RequestTimeout | Kind::StreamIdleTimeout => StatusCode::REQUEST_TIMEOUT,
            // The client is gone; this response is never delivered, 499 (nginx's
            // "client closed request") keeps the access log honest.
            Kind::DownstreamReset => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short stable name for the cause, used in the body, the access log
    /// (`response_flags`-like) and stats.
    pub fn cause(&self) -> &'static str {
        match self.kind {
            Kind::NoRoute => "no_route",
            Kind::BodyTooLarge => "request_body_too_large",
            Kind::BadRequest => "bad_request",
            Kind::HeadersTooLarge => "request_headers_too_large",
            Kind::NotImplemented => "not_implemented",
            // Envoy's response code details for the same refusal.
            Kind::UpgradeRefused | Kind::UpgradeUnsupported => "upgrade_failed",
            Kind::ConnectFailed => "upstream_connect_failure",
            Kind::UpstreamReset => "upstream_reset",
            Kind::UpstreamProtocol => "upstream_protocol_error",
            Kind::NoHealthyUpstream => "no_healthy_upstream",
            Kind::Overloaded => "overloaded",
            Kind::Timeout => "upstream_timeout",
            Kind::RequestTimeout => "request_timeout",
            Kind::PerTryTimeout => "upstream_per_try_timeout",
            Kind::StreamIdleTimeout => "stream_idle_timeout",
            Kind::PluginFailure => "plugin_failure",
            Kind::RequestBufferLimit | Kind::ResponseBufferLimit => "plugin_buffer_limit",
            Kind::DownstreamReset => "downstream_reset",
            Kind::Internal => "internal_error",
        }
    }

    /// The response sent to the client: the status for the kind and a one-line body
    /// naming the cause (no internal detail beyond it: addresses and messages stay in
    /// the logs).
    pub fn to_response(&self) -> Response<Bytes> {
        let body = if self.kind == Kind::PluginFailure {
            // The plugin's name is configuration, not a secret: it tells the operator
            // which filter to look at.
            Bytes::from(format!("{}: {}\n", self.cause(), self.detail))
        } else {
            Bytes::from(format!("{}\n", self.cause()))
        };
        let mut resp = Response::new(body.clone());
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        if self.kind == Kind::Overloaded {
            h.insert("x-legate-overloaded", HeaderValue::from_static("true"));
        }
        if let Some(finished) = &self.headers {
            h.clone_from(finished);
        }
        resp
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.cause(), self.detail)
    }
}

impl std::error::Error for ProxyError {}

/// Whether an HTTP/2 client reset the stream (`RST_STREAM` of any code) while
/// its body was read: the client went away, as a closed HTTP/1.1 connection
/// (hyper's incomplete message), not a malformed request. One h2 resets
/// itself (a body over its `content-length`, a flow-control breach) is.
fn client_reset(e: &hyper::Error) -> bool {
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.is_reset() && h2e.is_remote();
        }
        src = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        let e = ProxyError::new(Kind::ConnectFailed, "connection refused");
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(e.retryable());
        assert_eq!(e.side(), Side::Upstream);
        let r: Response<Bytes> = e.to_response();
        assert_eq!(r.body().as_ref(), b"upstream_connect_failure\n");
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "25");

        let o: Response<Bytes> = ProxyError::new(Kind::Overloaded, "").to_response();
        assert_eq!(o.status(), 503);
        assert_eq!(o.headers()["x-legate-overloaded"], "true");
        assert_eq!(ProxyError::new(Kind::Timeout, "").status(), 504);
        assert!(!ProxyError::new(Kind::Timeout, "").retryable());
        assert_eq!(ProxyError::new(Kind::NoHealthyUpstream, "").status(), 503);
        let p = ProxyError::new(Kind::PluginFailure, "auth");
        assert_eq!(p.status(), 503);
        assert_eq!(p.side(), Side::Plugin);
        assert_eq!(p.to_response().body().as_ref(), b"plugin_failure: auth\n");
        let b = ProxyError::new(Kind::RequestBufferLimit, "");
        assert_eq!(
            (b.status(), b.cause()),
            (StatusCode::PAYLOAD_TOO_LARGE, "plugin_buffer_limit")
        );
        let u = ProxyError::new(Kind::UpgradeRefused, "foo");
        assert_eq!(
            (u.status(), u.side(), u.retryable()),
            (StatusCode::FORBIDDEN, Side::Downstream, false)
        );
        assert_eq!(u.to_response().body().as_ref(), b"upgrade_failed\n");
        let u = ProxyError::new(Kind::UpgradeUnsupported, "h2");
        assert_eq!(
            (u.status(), u.side(), u.retryable(), u.cause()),
            (
                StatusCode::BAD_GATEWAY,
                Side::Internal,
                false,
                "upgrade_failed"
            )
        );
        let i = ProxyError::new(Kind::StreamIdleTimeout, "");
        assert_eq!(
            (i.status(), i.cause(), i.retryable()),
            (StatusCode::REQUEST_TIMEOUT, "stream_idle_timeout", false)
        );
        let b = ProxyError::new(Kind::ResponseBufferLimit, "");
        assert_eq!(
            (b.status(), b.side()),
            (StatusCode::BAD_GATEWAY, Side::Upstream)
        );
    }
}
