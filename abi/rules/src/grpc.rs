//! gRPC (gRPC over HTTP/2, and grpc/grpc `doc/http-grpc-status-mapping.md`):
//! a non-gRPC answer's HTTP status as a gRPC status, and the encoding of
//! `grpc-message`. The host uses them for local replies in gRPC's
//! trailers-only form and for gRPC callouts; the SDK's harness for the same
//! local replies; gRPC plugins for upstream answers that are not gRPC.

/// The gRPC status for an HTTP status that is not a gRPC answer's (Envoy's
/// `httpToGrpcStatus`, after gRPC's HTTP mapping): `400` `INTERNAL` (13),
/// `401` `UNAUTHENTICATED` (16), `403` `PERMISSION_DENIED` (7), `404`
/// `UNIMPLEMENTED` (12), `429`, `502`, `503` and `504` `UNAVAILABLE` (14),
/// anything else `UNKNOWN` (2).
pub fn status_of_http(status: u16) -> u32 {
    match status {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// `text` as a `grpc-message` value: bytes outside printable ASCII, and `%`,
/// as `%XX` (uppercase hex); the rest as they are.
pub fn percent_encode(text: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for &b in text {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses() {
        for (http, grpc) in [
            (400, 13),
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 14),
            (502, 14),
            (503, 14),
            (504, 14),
            (200, 2),
            (301, 2),
            (405, 2),
            (408, 2),
            (500, 2),
            (501, 2),
            (505, 2),
        ] {
            assert_eq!(status_of_http(http), grpc, "{http}");
        }
    }

    #[test]
    fn messages() {
        assert_eq!(
            percent_encode(b"no_healthy_upstream"),
            "no_healthy_upstream"
        );
        assert_eq!(
            percent_encode("50% é\n\x7f ~".as_bytes()),
            "50%25 %C3%A9%0A%7F ~"
        );
        assert_eq!(percent_encode(b""), "");
    }
}
