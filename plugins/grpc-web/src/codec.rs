//! The gRPC-Web wire pieces this filter produces or undoes: base64 of the
//! `-text` variants (decoded across arbitrary chunk boundaries by
//! [`TextDecoder`]; encoded one response chunk at a time, each padded), and the trailer frame (flag `0x80`,
//! `name: value\r\n` lines) that carries gRPC trailers in the body.
//!
//! Base64 is hand-written (standard alphabet, padded): a few dozen lines, and
//! it must decode the concatenation of independently padded chunks, which
//! gRPC-Web clients send and general-purpose decoders reject.

/// The flag byte of a gRPC-Web trailer frame.
pub const TRAILER_FLAG: u8 = 0x80;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// A `-text` request body that is not base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidBase64 {
    /// Offset of the bad 4-character group in the whole body.
    pub offset: u64,
}

impl std::fmt::Display for InvalidBase64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "grpc-web-text body is not valid base64 (bad group at byte {})",
            self.offset
        )
    }
}

fn sextet(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decodes one 4-character group (padding allowed at its end) into `out`.
fn decode_group(g: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let pad = g.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 {
        return None;
    }
    let mut n: u32 = 0;
    for &c in &g[..4 - pad] {
        n = (n << 6) | u32::from(sextet(c)?);
    }
    n <<= 6 * pad as u32;
    let bytes = n.to_be_bytes();
    out.extend_from_slice(&bytes[1..4 - pad]);
    Some(())
}

/// Streaming base64 decoder: decodes whole 4-character groups as they arrive
/// and keeps the rest for the next chunk. Each group is decoded on its own, so
/// a body made of several padded base64 strings back to back decodes too.
#[derive(Debug, Default, Clone)]
pub struct TextDecoder {
    pending: Vec<u8>,
    /// Characters consumed so far (for error offsets).
    consumed: u64,
}

impl TextDecoder {
    /// Decodes what `chunk` completes; `end`: no more input follows, so a
    /// leftover partial group is an error.
    pub fn push(&mut self, chunk: &[u8], end: bool) -> Result<Vec<u8>, InvalidBase64> {
        self.pending
            .extend(chunk.iter().filter(|c| !c.is_ascii_whitespace()));
        let whole = self.pending.len() - self.pending.len() % 4;
        let mut out = Vec::with_capacity(whole / 4 * 3);
        for (i, g) in self.pending[..whole].chunks_exact(4).enumerate() {
            if decode_group(g, &mut out).is_none() {
                return Err(InvalidBase64 {
                    offset: self.consumed + 4 * i as u64,
                });
            }
        }
        self.pending.drain(..whole);
        self.consumed += whole as u64;
        if end && !self.pending.is_empty() {
            return Err(InvalidBase64 {
                offset: self.consumed,
            });
        }
        Ok(out)
    }
}

/// Base64 (standard alphabet, padded) of `data`.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    for g in data.chunks(3) {
        let n = (u32::from(g[0]) << 16)
            | (u32::from(g.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(g.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= g.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]);
            } else {
                out.push(b'=');
            }
        }
    }
    out
}

/// The gRPC-Web trailer frame for `trailers`: flag `0x80`, the big-endian
/// length, then `name: value\r\n` per entry (names are lower case already).
pub fn trailer_frame(trailers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in trailers {
        block.extend_from_slice(name.as_bytes());
        block.extend_from_slice(b": ");
        block.extend_from_slice(value);
        block.extend_from_slice(b"\r\n");
    }
    let mut frame = Vec::with_capacity(block.len() + 5);
    frame.push(TRAILER_FLAG);
    frame.extend_from_slice(&u32::try_from(block.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&block);
    frame
}
