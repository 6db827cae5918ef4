//! The gRPC side of the wire: message framing (gRPC over HTTP/2, "Length-Prefixed-Message"),
//! the gRPC status → HTTP status mapping, `grpc-message` decoding, and the
//! JSON error body clients get.

/// Frames `msg` as one uncompressed gRPC message: flag 0, big-endian length.
pub fn frame(msg: &[u8]) -> Result<Vec<u8>, String> {
    let len = u32::try_from(msg.len())
        .map_err(|_| format!("a message of {} bytes is too large for gRPC", msg.len()))?;
    let mut v = Vec::with_capacity(msg.len() + 5);
    v.push(0);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(msg);
    Ok(v)
}

/// The one message of a unary response body; `Err` says what is malformed.
pub fn deframe(body: &[u8]) -> Result<&[u8], String> {
    let Some((&flag, rest)) = body.split_first() else {
        return Err("the upstream sent no message".into());
    };
    let Some((len, payload)) = rest.split_first_chunk::<4>() else {
        return Err(format!(
            "the upstream body ({} bytes) is shorter than a gRPC frame header",
            body.len()
        ));
    };
    let len = u32::from_be_bytes(*len) as usize;
    if flag & 1 == 1 {
        return Err("the upstream sent a compressed message (grpc-encoding), which the transcoder cannot decode".into());
    }
    if flag != 0 {
        return Err(format!("unknown gRPC frame flag {flag:#04x}"));
    }
    match payload.len().cmp(&len) {
        std::cmp::Ordering::Equal => Ok(payload),
        std::cmp::Ordering::Less => Err(format!(
            "the upstream frame announces {len} bytes but has {}",
            payload.len()
        )),
        std::cmp::Ordering::Greater => Err(format!(
            "the upstream sent more than one message ({} bytes after the first) for a unary method",
            payload.len() - len
        )),
    }
}

/// The largest message a server stream may send: gRPC's default receive
/// limit. A streamed response is not under `limits.body`, so a frame header
/// announcing more (up to 4 GiB) is refused, not buffered.
pub const MAX_STREAM_MESSAGE: usize = 4 << 20;

/// Splits a stream of gRPC frames that arrives in chunks of any size into its
/// messages (server streaming).
#[derive(Debug, Default)]
pub struct Deframer {
    /// Bytes of a frame whose end has not arrived yet.
    pending: Vec<u8>,
}

impl Deframer {
    /// Adds `data`; the payloads of the frames it completes, in order.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(header) = self.pending.get(at..at + 5) {
            let flag = header[0];
            if flag & 1 == 1 {
                return Err("the upstream sent a compressed message (grpc-encoding), which the transcoder cannot decode".into());
            }
            if flag != 0 {
                return Err(format!("unknown gRPC frame flag {flag:#04x}"));
            }
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            if len > MAX_STREAM_MESSAGE {
                return Err(format!(
                    "the upstream announced a message of {len} bytes (the limit is {MAX_STREAM_MESSAGE})"
                ));
            }
            // Cannot overflow: `at` is within `pending` and `len` is capped.
            let end = at + 5 + len;
            let Some(payload) = self.pending.get(at + 5..end) else {
                break;
            };
            out.push(payload.to_vec());
            at += 5 + len;
        }
        self.pending.drain(..at);
        Ok(out)
    }

    /// Bytes of an incomplete frame held: not 0 at the end of the stream
    /// means the stream was cut inside a message.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The HTTP status for a gRPC status code (google/rpc/code.proto, as Envoy
/// and grpc-gateway map them). Unknown codes are 500.
pub fn http_status(grpc_status: u32) -> u16 {
    match grpc_status {
        0 => 200,
        1 => 499,
        2 => 500,
        3 => 400,
        4 => 504,
        5 => 404,
        6 => 409,
        7 => 403,
        8 => 429,
        9 => 400,
        10 => 409,
        11 => 400,
        12 => 501,
        13 => 500,
        14 => 503,
        15 => 500,
        16 => 401,
        _ => 500,
    }
}

/// The most of a non-gRPC answer's body kept as the JSON error's message.
pub const MAX_MESSAGE: usize = 1024;

/// The JSON error's message for a non-gRPC answer with HTTP `status` and body
/// `page`: the page's text (its start, for a long page), prefixed with the
/// status it came with.
pub fn http_error_message(status: u16, page: &[u8]) -> String {
    let text = String::from_utf8_lossy(page);
    let mut message = text.trim();
    if message.is_empty() {
        message = "the response was not gRPC";
    }
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("HTTP {status}: {}", &message[..end])
}

/// gRPC codes this plugin uses for its own errors.
pub mod code {
    /// A `grpc-status` that is not a number.
    pub const UNKNOWN: u32 = 2;
    /// Bad JSON, unknown fields or query parameters.
    pub const INVALID_ARGUMENT: u32 = 3;
    /// A proxy-side failure.
    pub const INTERNAL: u32 = 13;
    /// The upstream's answer could not be transcoded.
    pub const UNAVAILABLE: u32 = 14;
}

/// The JSON error body: `{"code": N, "message": "..."}` (google.rpc.Status
/// without details).
pub fn error_json(code: u32, message: &str) -> Vec<u8> {
    let v = serde_json::json!({ "code": code, "message": message });
    let mut out = v.to_string().into_bytes();
    out.push(b'\n');
    out
}

/// Decodes a `grpc-message` value (percent-encoded, gRPC over HTTP/2,
/// "Responses"); invalid escapes and non-UTF-8 are kept as they are.
pub fn grpc_message(raw: &str) -> String {
    crate::template::percent_decode_lenient(raw).unwrap_or_else(|_| raw.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_round_trip_and_malformed_ones_are_named() {
        let f = frame(b"abc").unwrap();
        assert_eq!(f, [0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(deframe(&f).unwrap(), b"abc");
        assert_eq!(deframe(&[0, 0, 0, 0, 0]).unwrap(), b"");
        for (body, why) in [
            (&[][..], "no message"),
            (&[0, 0, 0][..], "shorter than a gRPC frame header"),
            (&[0, 0, 0, 0, 4, 1][..], "announces 4 bytes but has 1"),
            (&[0, 0, 0, 0, 0, 9][..], "more than one message"),
            (&[1, 0, 0, 0, 0][..], "compressed"),
            (&[0x80, 0, 0, 0, 0][..], "unknown gRPC frame flag 0x80"),
        ] {
            let e = deframe(body).unwrap_err();
            assert!(e.contains(why), "{body:?}: {e}");
        }
    }

    #[test]
    fn status_mapping() {
        let table = [
            (0, 200),
            (1, 499),
            (2, 500),
            (3, 400),
            (4, 504),
            (5, 404),
            (6, 409),
            (7, 403),
            (8, 429),
            (9, 400),
            (10, 409),
            (11, 400),
            (12, 501),
            (13, 500),
            (14, 503),
            (15, 500),
            (16, 401),
            (17, 500),
        ];
        for (g, h) in table {
            assert_eq!(http_status(g), h, "grpc {g}");
        }
    }

    #[test]
    fn http_error_messages() {
        assert_eq!(
            http_error_message(502, b"upstream_connect_failure\n"),
            "HTTP 502: upstream_connect_failure"
        );
        assert_eq!(
            http_error_message(503, b""),
            "HTTP 503: the response was not gRPC"
        );
        // Cut at a character boundary: the cap falls inside a 2-byte one.
        let long = format!("a{}", "\u{e9}".repeat(MAX_MESSAGE));
        let m = http_error_message(500, long.as_bytes());
        assert_eq!(m.len(), "HTTP 500: ".len() + MAX_MESSAGE - 1);
    }

    #[test]
    fn error_body_and_message_decoding() {
        let v: serde_json::Value = serde_json::from_slice(&error_json(5, "no \"x\"")).unwrap();
        assert_eq!(v, serde_json::json!({"code": 5, "message": "no \"x\""}));
        assert_eq!(grpc_message("not%20found%3A%20%C3%BC"), "not found: ü");
        assert_eq!(grpc_message("100%"), "100%");
    }
}
