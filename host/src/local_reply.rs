//! Local replies to gRPC requests, as Envoy's `sendLocalReply` makes them: the
//! host's own answers (a 503 `no_healthy_upstream`, a 504, a 404 `no_route`),
//! direct responses, redirects and filters' local responses to a request whose
//! `content-type` is gRPC's go in gRPC's *trailers-only* form: HTTP 200,
//! `content-type: application/grpc`, the status as `grpc-status` and the text as
//! `grpc-message`, no body. A gRPC client reads that as the call's status
//! (`UNAVAILABLE`, "no_healthy_upstream"); a plain HTTP 503 with a text body is a
//! protocol error to it, reported without the reason.
//!
//! Whether the request is gRPC is decided on its headers as they arrive, before
//! any filter (Envoy decides when the request headers are initialized): a
//! gRPC-Web or JSON request a filter converts to gRPC gets HTTP answers, which
//! that filter converts back in its response phase.
//!
//! Also the one rule for a filter's local response `details` (its access-log
//! `cause`): [`details`].

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::filter::LocalResponse;

/// `content-type` is `application/grpc` or `application/grpc+…` (Envoy's
/// `hasGrpcContentType`: `application/grpc-web` is not gRPC).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"+"))
}

/// The gRPC status for a local reply's HTTP status (Envoy's `httpToGrpcStatus`,
/// after gRPC's `doc/http-grpc-status-mapping.md`):
/// `legate_abi_rules::grpc::status_of_http`, the SDK harness's too.
pub fn grpc_status_of(status: StatusCode) -> u32 {
    legate_abi_rules::grpc::status_of_http(status.as_u16())
}

/// `resp`, a local reply with its whole body, in gRPC's trailers-only form (see
/// [`grpc_form`]).
pub fn into_grpc(resp: Response<Bytes>, explicit: Option<u32>) -> Response<Bytes> {
    let (mut parts, mut body) = resp.into_parts();
    grpc_form(&mut parts.status, &mut parts.headers, &mut body, explicit);
    Response::from_parts(parts, body)
}

/// A host reply (`resp`, whole) as it goes out: in gRPC's trailers-only form
/// if `grpc` (a gRPC request the client can still read an answer to).
pub fn reply(resp: Response<Bytes>, grpc: bool) -> Response<crate::body::Body> {
    let resp = if grpc { into_grpc(resp, None) } else { resp };
    resp.map(crate::body::full)
}

impl LocalResponse {
    /// This filter's answer in the form it goes out in: to a `grpc` request
    /// gRPC's trailers-only form ([`LocalResponse::into_grpc`]); else with
    /// `content-type: text/plain` for a body the filter gave no type (Envoy's
    /// local replies do the same: a client must not sniff one).
    pub fn for_client(self, grpc: bool) -> Self {
        if grpc {
            return self.into_grpc();
        }
        let mut lr = self;
        if !lr.body.is_empty() && !lr.headers.contains_key(http::header::CONTENT_TYPE) {
            lr.headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
        }
        lr
    }

    /// This filter's answer in gRPC's trailers-only form (see [`grpc_form`]).
    pub fn into_grpc(mut self) -> Self {
        grpc_form(
            &mut self.status,
            &mut self.headers,
            &mut self.body,
            self.grpc_status,
        );
        self
    }
}

/// A local reply in gRPC's trailers-only form. A `grpc-status` it already has
/// is kept; else `explicit` (one a filter asked for), else the status its HTTP
/// status maps to. Its body, less a final newline, becomes `grpc-message`,
/// percent-encoded as gRPC asks; the status becomes 200 and the body empty.
fn grpc_form(status: &mut StatusCode, h: &mut HeaderMap, body: &mut Bytes, explicit: Option<u32>) {
    if !h.contains_key("grpc-status") {
        let code = explicit.unwrap_or_else(|| grpc_status_of(*status));
        h.insert("grpc-status", HeaderValue::from(code));
    }
    let text = body.strip_suffix(b"\n").unwrap_or(body);
    if !text.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&legate_abi_rules::grpc::percent_encode(text)) {
            h.insert("grpc-message", v);
        }
    }
    *status = StatusCode::OK;
    *body = Bytes::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::TRANSFER_ENCODING);
}

/// The longest `details` a filter's local response keeps, in bytes
/// (abi/README.md §3.5): a short token, not a message.
pub const MAX_DETAILS: usize = 256;

/// A filter's local response `details` as the host keeps it (the access log's
/// `cause = plugin:<details>`, `exchange.cause()`, proxy-wasm
/// `response.code_details`): every whitespace or control character replaced
/// with `_`, as Envoy's `setResponseCodeDetails` does (its
/// `StringUtil::replaceAllEmptySpace`: response code details are a token with
/// no spaces), and cut to [`MAX_DETAILS`] bytes at a character boundary, so a
/// guest cannot put a CR/LF or 200 KB into a log line.
pub fn details(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_DETAILS));
    for c in raw.chars() {
        let c = if c.is_whitespace() || c.is_control() {
            '_'
        } else {
            c
        };
        if out.len() + c.len_utf8() > MAX_DETAILS {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn details_are_one_bounded_token() {
        // Were kept verbatim: CR/LF in the access log's `cause`, 200 000
        // bytes in one log line.
        assert_eq!(details("no_route"), "no_route");
        assert_eq!(details(""), "");
        assert_eq!(
            details("bad key\r\nx: y\tz\u{0}\u{85}"),
            "bad_key__x:_y_z__"
        );
        let long = "a".repeat(200_000);
        assert_eq!(details(&long).len(), MAX_DETAILS);
        // Cut at a character boundary: 255 ASCII bytes, then a 2-byte char
        // that does not fit.
        let s = format!("{}é", "a".repeat(MAX_DETAILS - 1));
        assert_eq!(details(&s), "a".repeat(MAX_DETAILS - 1));
        let s = format!("{}é", "a".repeat(MAX_DETAILS - 2));
        assert_eq!(details(&s), s);
    }

    use super::*;

    #[test]
    fn grpc_content_types() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/grpc-web-text+proto"));
        assert!(!with("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn trailers_only_form() {
        let mut r = Response::new(Bytes::from_static(b"no_healthy_upstream\n"));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(20));
        r.headers_mut()
            .insert("x-legate-overloaded", HeaderValue::from_static("true"));
        let g = into_grpc(r, None);
        assert_eq!(g.status(), StatusCode::OK);
        assert!(g.body().is_empty());
        let h = g.headers();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["grpc-message"], "no_healthy_upstream");
        assert_eq!(h["x-legate-overloaded"], "true");
        assert!(!h.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn a_status_given_or_set_is_kept() {
        let mut r = Response::new(Bytes::from_static("100% dé\n".as_bytes()));
        *r.status_mut() = StatusCode::FORBIDDEN;
        let g = into_grpc(r.clone(), Some(8));
        assert_eq!(g.headers()["grpc-status"], "8");
        assert_eq!(g.headers()["grpc-message"], "100%25 d%C3%A9");
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from_static("5"));
        assert_eq!(into_grpc(r, Some(8)).headers()["grpc-status"], "5");
    }
}
