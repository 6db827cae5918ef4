//! Fault injection: a route's `fault` (Envoy's HTTP fault filter) holds a share
//! of its requests for a while before they go upstream (`delay`) and answers a
//! share locally instead of forwarding them (`abort`), to test how clients and
//! callers cope with a slow or failing service without breaking it. Applied
//! after the Wasm filters and the route match, before the attempt (`proxy.rs`).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::config::{FaultAbort, FaultDelay};

/// The access log's cause for an abort (Envoy's response code details; its
/// `%RESPONSE_FLAGS%` is `FI`).
pub const ABORT_CAUSE: &str = "fault_filter_abort";

/// The body of an abort's answer (Envoy's).
const BODY: &str = "fault filter abort";

/// The delay to hold this request for, if it is drawn.
pub fn delay(d: &FaultDelay) -> Option<std::time::Duration> {
    d.percent.draw().then(|| d.duration.get())
}

/// The answer for this request, if it is drawn: the configured HTTP status
/// with Envoy's body, or, for `grpc_status`, gRPC's trailers-only form (to any
/// request: a route that answers gRPC statuses is a gRPC route).
pub fn abort(a: &FaultAbort) -> Option<Response<Bytes>> {
    if !a.percent.draw() {
        return None;
    }
    let status = a
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut resp = Response::new(Bytes::from_static(BODY.as_bytes()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(BODY.len()));
    Some(match a.grpc_status {
        Some(code) => crate::local_reply::into_grpc(resp, Some(code)),
        None => resp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, Percent};

    #[test]
    fn an_abort_answers_http_or_grpc() {
        let http = abort(&FaultAbort {
            status: Some(429),
            grpc_status: None,
            percent: Percent(100.0),
        })
        .unwrap();
        assert_eq!(http.status(), 429);
        assert_eq!(http.body().as_ref(), b"fault filter abort");
        let grpc = abort(&FaultAbort {
            status: None,
            grpc_status: Some(14),
            percent: Percent(100.0),
        })
        .unwrap();
        assert_eq!(grpc.status(), 200);
        assert_eq!(grpc.headers()["grpc-status"], "14");
        assert_eq!(grpc.headers()["grpc-message"], "fault filter abort");
        assert!(grpc.body().is_empty());
        let never = FaultAbort {
            status: Some(503),
            grpc_status: None,
            percent: Percent(0.0),
        };
        assert!((0..1000).all(|_| abort(&never).is_none()));
        let d = FaultDelay {
            duration: Dur::secs(2),
            percent: Percent(100.0),
        };
        assert_eq!(delay(&d), Some(std::time::Duration::from_secs(2)));
    }
}
