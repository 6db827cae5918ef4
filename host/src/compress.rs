//! Response compression (`listeners[].http.compression`): gzip, and brotli and
//! zstd when configured, for clients that accept them, as Envoy's compressor
//! filter and nginx's `gzip on` (and `brotli on`) do.
//!
//! Decided once per response, after the response filters and before the head
//! goes out: the request's `accept-encoding` must accept a coding ([`accepted`]:
//! the highest weight; at a tie zstd, then brotli), and the response must be a
//! compressible one (a listed media type, not already encoded, not
//! `no-transform`, not a range, long enough). Its body is then wrapped in
//! [`Compressed`], which compresses each chunk as it passes and flushes it
//! (zlib's sync flush, brotli's flush, zstd's `ZSTD_e_flush`), so a streamed
//! response reaches the
//! client as the upstream sends it; the head loses its `content-length`, and
//! gains `content-encoding` and `vary: accept-encoding`; a strong `etag`
//! becomes weak, as in Envoy.

use std::io::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::write::GzEncoder;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};

use crate::body::{self, Body, BoxError};
use crate::config::Compression;
use crate::stats::Counter;

/// The counters of a listener's compression.
#[derive(Clone, Default)]
pub struct CompressionStats {
    /// Responses compressed.
    pub compressed: Counter,
    /// Compressible responses sent as they were: the client accepted no coding offered.
    pub not_accepted: Counter,
    /// Bytes of the compressed responses' bodies before compression.
    pub bytes_in: Counter,
    /// The same bodies' bytes after it.
    pub bytes_out: Counter,
}

/// A content coding Legate compresses with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Brotli,
    Zstd,
}

impl Coding {
    fn token(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        }
    }
}

/// The coding `accept-encoding` values ask for (RFC 9110 §12.5.3): of gzip
/// (`gzip`, `x-gzip`) and those `cfg` offers (`br`, `zstd`), the one with the
/// highest nonzero `q` (a coding not named takes `*`'s weight); at a tie zstd
/// (the least CPU per byte for its size), then brotli (smaller than gzip).
/// `None`: none of them (a weight that does not parse accepts nothing).
pub fn accepted(headers: &HeaderMap, cfg: &Compression) -> Option<Coding> {
    let (mut gzip, mut br, mut zstd, mut star) = (None, None, None, None);
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or_default().trim();
            let q = parts
                .filter_map(|p| p.trim().split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1000), |(_, v)| qvalue(v.trim()))
                .unwrap_or(0);
            let slot =
                if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                    &mut gzip
                } else if coding.eq_ignore_ascii_case("br") {
                    &mut br
                } else if coding.eq_ignore_ascii_case("zstd") {
                    &mut zstd
                } else if coding == "*" {
                    &mut star
                } else {
                    continue;
                };
            // The first mention of a coding counts.
            slot.get_or_insert(q);
        }
    }
    let weight = |q: Option<u16>, offered: bool| if offered { q.or(star).unwrap_or(0) } else { 0 };
    // In order of preference at a tie: the first with the highest weight wins.
    [
        (Coding::Zstd, weight(zstd, cfg.zstd.is_some())),
        (Coding::Brotli, weight(br, cfg.brotli.is_some())),
        (Coding::Gzip, weight(gzip, true)),
    ]
    .into_iter()
    .filter(|&(_, q)| q > 0)
    .fold(None, |best: Option<(Coding, u16)>, (c, q)| match best {
        Some((_, b)) if b >= q => best,
        _ => Some((c, q)),
    })
    .map(|(c, _)| c)
}

/// An RFC 9110 §12.4.2 `qvalue` in thousandths: `0` to `1`, at most three
/// decimals (`0.5`, `1.000`); `None` for anything else (`nan`, `2`, `1e3`),
/// which accepts nothing.
fn qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u16, |n, b| n * 10 + u16::from(b - b'0'));
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Whether a response with this head may be compressed at all (whatever the
/// client accepts); for a `head` request, whether the `GET` one would be.
fn compressible(cfg: &Compression, head: bool, resp: &Response<Body>) -> bool {
    let status = resp.status();
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || (!head && resp.body().is_end_stream())
    {
        return false;
    }
    let h = resp.headers();
    let encoded = h
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let no_transform = h.get_all(header::CACHE_CONTROL).iter().any(|v| {
        legate_abi_rules::headers::list_items(v.as_bytes())
            .any(|d| d.eq_ignore_ascii_case(b"no-transform"))
    });
    if encoded || no_transform || h.contains_key(header::CONTENT_RANGE) {
        return false;
    }
    let short = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n < cfg.min_content_length.0);
    if short {
        return false;
    }
    let Some(media) = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim())
    else {
        return false;
    };
    cfg.content_types
        .iter()
        .any(|t| t.eq_ignore_ascii_case(media))
}

/// Compresses `resp` if it and the client (`accepts`: [`accepted`] of the
/// request) allow, counting in `stats`.
pub fn apply(
    cfg: &Compression,
    stats: &CompressionStats,
    method: &Method,
    accepts: Option<Coding>,
    resp: &mut Response<Body>,
) {
    let head = method == Method::HEAD;
    if !compressible(cfg, head, resp) {
        return;
    }
    // The coding the encoder is built for (brotli and zstd only where offered).
    let accepts = accepts.map(|c| match c {
        Coding::Brotli if cfg.brotli.is_none() => Coding::Gzip,
        Coding::Zstd if cfg.zstd.is_none() => Coding::Gzip,
        c => c,
    });
    let h = resp.headers_mut();
    // Whether or not it is compressed here, the answer depends on the
    // request's accept-encoding: caches must key on it.
    let varies = h.get_all(header::VARY).iter().any(|v| {
        legate_abi_rules::headers::list_items(v.as_bytes())
            .any(|t| t == b"*" || t.eq_ignore_ascii_case(b"accept-encoding"))
    });
    if !varies {
        h.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    let Some(coding) = accepts else {
        if !head {
            stats.not_accepted.inc();
        }
        return;
    };
    // Made before the head changes, so that a coding whose encoder cannot
    // start leaves the response as it is.
    let encoder = if head {
        None
    } else {
        let Some(e) = encoder(cfg, coding) else {
            return;
        };
        stats.compressed.inc();
        Some(e)
    };
    h.remove(header::CONTENT_LENGTH);
    h.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(coding.token()),
    );
    // Another representation: a strong validator no longer holds (RFC 9110
    // §8.8.1), a weak one does.
    if let Some(etag) = h.get(header::ETAG) {
        if !etag.as_bytes().starts_with(b"W/") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(weak) = HeaderValue::from_bytes(&weak) {
                h.insert(header::ETAG, weak);
            }
        }
    }
    let Some(encoder) = encoder else {
        // A `HEAD`: the head a `GET` would get; there is no body to compress.
        return;
    };
    let inner = std::mem::replace(resp.body_mut(), body::empty());
    *resp.body_mut() = body::boxed(Compressed {
        inner,
        encoder: Some(encoder),
        trailers: None,
        stats: stats.clone(),
        bytes_in: 0,
        bytes_out: 0,
    });
}

/// The encoder for `coding` (one `apply` made sure is offered) with `cfg`'s
/// settings. `None` if libzstd refuses its settings, which validation at load
/// rules out: the response then goes uncompressed (never in another coding
/// than the one chosen, which the client may refuse).
fn encoder(cfg: &Compression, coding: Coding) -> Option<Encoder> {
    Some(match (coding, &cfg.brotli, &cfg.zstd) {
        (Coding::Brotli, Some(b), _) => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
            Vec::new(),
            BROTLI_BUFFER,
            b.quality.min(11),
            b.window_bits.clamp(10, 24),
        ))),
        (Coding::Zstd, _, Some(z)) => match zstd_encoder(z) {
            Ok(e) => Encoder::Zstd(Box::new(e)),
            Err(e) => {
                tracing::warn!(
                    "cannot start a zstd encoder, sending the response uncompressed: {e}"
                );
                return None;
            }
        },
        _ => Encoder::Gzip(GzEncoder::new(
            Vec::new(),
            flate2::Compression::new(cfg.level.clamp(1, 9)),
        )),
    })
}

/// The brotli encoder's output staging buffer (what it hands to the `Vec` at
/// a time).
const BROTLI_BUFFER: usize = 4096;

/// A zstd encoder with `z`'s settings, writing into a `Vec`. No checksum (as
/// Envoy's default: the connection's own integrity covers the bytes) and no
/// content size in the frame (the body streams).
fn zstd_encoder(
    z: &crate::config::Zstd,
) -> std::io::Result<zstd::stream::write::Encoder<'static, Vec<u8>>> {
    let level = i32::try_from(z.level.clamp(1, 19)).unwrap_or(3);
    let mut e = zstd::stream::write::Encoder::new(Vec::new(), level)?;
    e.set_parameter(zstd::stream::raw::CParameter::WindowLog(
        z.window_bits.clamp(10, 23),
    ))?;
    e.include_checksum(false)?;
    Ok(e)
}

/// A compressed stream's encoder, writing into a `Vec` taken after each chunk.
enum Encoder {
    Gzip(GzEncoder<Vec<u8>>),
    /// Boxed: brotli's state is large, and a `Compressed` is moved as a body.
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    /// Boxed for the same reason (the C library's context is on its own heap).
    Zstd(Box<zstd::stream::write::Encoder<'static, Vec<u8>>>),
}

impl Encoder {
    /// Compresses `data` and flushes it (zlib's sync flush, brotli's flush):
    /// what came goes on now, at a few bytes each.
    fn write_flushed(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Encoder::Gzip(e) => {
                e.write_all(data)?;
                e.flush()
            }
            Encoder::Brotli(e) => {
                e.write_all(data)?;
                e.flush()
            }
            Encoder::Zstd(e) => {
                e.write_all(data)?;
                e.flush()
            }
        }
    }

    /// What the encoder has produced so far.
    fn take(&mut self) -> Vec<u8> {
        match self {
            Encoder::Gzip(e) => std::mem::take(e.get_mut()),
            Encoder::Brotli(e) => std::mem::take(e.get_mut()),
            Encoder::Zstd(e) => std::mem::take(e.get_mut()),
        }
    }

    /// Ends the stream: what is left of it (gzip's trailer with the CRC,
    /// brotli's last block, zstd's last block of the frame).
    fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Brotli(e) => Ok(e.into_inner()),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

/// A body compressed as it streams.
struct Compressed {
    inner: Body,
    /// `None` once the compressed stream is finished.
    encoder: Option<Encoder>,
    /// The inner body's trailers, sent after the compressed stream's end.
    trailers: Option<HeaderMap>,
    stats: CompressionStats,
    bytes_in: u64,
    bytes_out: u64,
}

impl Compressed {
    /// What the encoder has produced so far.
    fn take_output(&mut self) -> Bytes {
        let out = self.encoder.as_mut().map(Encoder::take).unwrap_or_default();
        self.bytes_out += out.len() as u64;
        Bytes::from(out)
    }

    /// Ends the compressed stream: what is left of it.
    fn finish(&mut self) -> Result<Bytes, BoxError> {
        let Some(encoder) = self.encoder.take() else {
            return Ok(Bytes::new());
        };
        let out = encoder.finish()?;
        self.bytes_out += out.len() as u64;
        Ok(Bytes::from(out))
    }
}

impl Drop for Compressed {
    fn drop(&mut self) {
        self.stats.bytes_in.add(self.bytes_in);
        self.stats.bytes_out.add(self.bytes_out);
    }
}

impl HttpBody for Compressed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                // The compressed stream went out; then the trailers, if any.
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        this.bytes_in += data.len() as u64;
                        // Flushed: a streamed response is not held back.
                        encoder.write_flushed(&data)?;
                        let out = this.take_output();
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers = Some(t);
                        }
                        let out = this.finish()?;
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    let out = this.finish()?;
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none() && self.trailers.is_none()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use std::io::Read as _;

    fn cfg() -> Compression {
        serde_saphyr::from_str("{}").unwrap()
    }

    fn stats() -> CompressionStats {
        CompressionStats::default()
    }

    /// What `v` gets from a listener offering gzip, plus brotli if `brotli`.
    fn accept(v: &str, brotli: bool) -> Option<Coding> {
        accept_from(v, if brotli { "{brotli: {}}" } else { "{}" })
    }

    /// What `v` gets from a listener with compression config `offered` (YAML).
    fn accept_from(v: &str, offered: &str) -> Option<Coding> {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        accepted(&h, &serde_saphyr::from_str(offered).unwrap())
    }

    #[test]
    fn what_accepts_gzip() {
        let gzip = |v| accept(v, false) == Some(Coding::Gzip);
        assert!(gzip("gzip"));
        assert!(gzip("br, gzip;q=0.5"));
        assert!(gzip("GZIP"));
        assert!(gzip("x-gzip"));
        assert!(gzip("*"));
        assert!(!gzip("gzip;q=0"));
        assert!(!gzip("*, gzip;q=0"));
        assert!(!gzip("gzip;q=0, *"));
        assert!(!gzip("br, identity"));
        assert!(!gzip("gzip;q=x"));
        assert_eq!(accept("", true), None);
    }

    #[test]
    fn brotli_when_offered_and_weighted_at_least_as_high() {
        let b = |v| accept(v, true);
        assert_eq!(b("gzip, deflate, br, zstd"), Some(Coding::Brotli));
        assert_eq!(b("br;q=0.5, gzip"), Some(Coding::Gzip));
        assert_eq!(b("gzip;q=0.5, br;q=0.8"), Some(Coding::Brotli));
        assert_eq!(b("br"), Some(Coding::Brotli));
        assert_eq!(b("*"), Some(Coding::Brotli));
        assert_eq!(b("*, br;q=0"), Some(Coding::Gzip));
        assert_eq!(b("br;q=0, gzip;q=0"), None);
        // Only RFC 9110 qvalues weigh: anything else accepts nothing.
        assert_eq!(b("gzip;q=nan, br"), Some(Coding::Brotli));
        assert_eq!(b("gzip;q=2, br;q=0.9"), Some(Coding::Brotli));
        assert_eq!(b("gzip;q=0.001, br;q=0"), Some(Coding::Gzip));
        assert_eq!(b("gzip;q=1.000"), Some(Coding::Gzip));
        assert_eq!(b("gzip;q=0.0001"), None);
        assert_eq!(b("br;q=1.5"), None);
        // Not offered: gzip or nothing.
        assert_eq!(accept("br", false), None);
        assert_eq!(accept("gzip, br", false), Some(Coding::Gzip));
    }

    #[test]
    fn zstd_when_offered_and_weighted_at_least_as_high() {
        let all = |v| accept_from(v, "{brotli: {}, zstd: {}}");
        // A browser's list: zstd first at a tie, then brotli.
        assert_eq!(all("gzip, deflate, br, zstd"), Some(Coding::Zstd));
        assert_eq!(all("*"), Some(Coding::Zstd));
        assert_eq!(all("gzip, deflate, br"), Some(Coding::Brotli));
        assert_eq!(all("zstd;q=0.5, br;q=0.8, gzip"), Some(Coding::Gzip));
        assert_eq!(all("zstd;q=0.9, br;q=0.8, gzip;q=0.5"), Some(Coding::Zstd));
        assert_eq!(all("ZSTD;q=0.5, br;q=0.6"), Some(Coding::Brotli));
        assert_eq!(all("*, zstd;q=0"), Some(Coding::Brotli));
        assert_eq!(all("zstd;q=0, br;q=0, gzip;q=0"), None);
        // zstd without brotli: zstd at a tie, gzip when weighted higher.
        let z = |v| accept_from(v, "{zstd: {}}");
        assert_eq!(z("gzip, deflate, br, zstd"), Some(Coding::Zstd));
        assert_eq!(z("br, zstd;q=0.1, gzip;q=0.2"), Some(Coding::Gzip));
        assert_eq!(z("br"), None);
        // Not offered: what else is.
        assert_eq!(accept("zstd", true), None);
        assert_eq!(
            accept("gzip, deflate, br, zstd", true),
            Some(Coding::Brotli)
        );
        assert_eq!(accept("gzip, zstd", false), Some(Coding::Gzip));
    }

    fn response(headers: &[(&str, &str)], body: &'static str) -> Response<Body> {
        let mut r = Response::new(body::full(body));
        for (k, v) in headers {
            r.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        r
    }

    const TEXT: &str = "hello hello hello hello hello hello hello hello hello hello";

    #[test]
    fn brotli_asked_where_it_is_not_offered_is_gzip() {
        let mut r = response(&[("content-type", "text/html")], TEXT);
        apply(&cfg(), &stats(), &Method::GET, Some(Coding::Brotli), &mut r);
        assert_eq!(r.headers()["content-encoding"], "gzip");
    }

    /// A `text/plain` response streaming [`TEXT`] in two chunks.
    fn streamed_text() -> Response<Body> {
        let chunks = futures_util::stream::iter(
            [&TEXT[..20], &TEXT[20..]]
                .map(|p| Ok::<_, BoxError>(Frame::data(Bytes::from_static(p.as_bytes())))),
        );
        let mut r = Response::new(body::boxed(http_body_util::StreamBody::new(chunks)));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    }

    /// Every data frame of `body`, as sent.
    async fn data_frames(body: &mut Body) -> Vec<Bytes> {
        let mut frames = Vec::new();
        while let Some(f) = body.frame().await {
            frames.push(f.unwrap().into_data().unwrap());
        }
        frames
    }

    #[test]
    fn zstd_asked_where_it_is_not_offered_is_gzip() {
        let mut r = response(&[("content-type", "text/html")], TEXT);
        apply(&cfg(), &stats(), &Method::GET, Some(Coding::Zstd), &mut r);
        assert_eq!(r.headers()["content-encoding"], "gzip");
    }

    #[tokio::test]
    async fn a_zstd_body_decodes_to_the_original_chunk_by_chunk() {
        let s = stats();
        let mut c = cfg();
        c.zstd = Some(serde_saphyr::from_str("{level: 6, window_bits: 10}").unwrap());
        let mut r = streamed_text();
        apply(&c, &s, &Method::GET, Some(Coding::Zstd), &mut r);
        assert_eq!(r.headers()["content-encoding"], "zstd");
        let mut body = r.into_body();
        let frames = data_frames(&mut body).await;
        // The first chunk was flushed on its own: it decodes before the end
        // (a streaming decoder gives it out; the frame is not finished yet).
        let mut first = Vec::new();
        let mut d = zstd::stream::read::Decoder::new(&frames[0][..]).unwrap();
        let _ = d.read_to_end(&mut first);
        assert_eq!(String::from_utf8_lossy(&first), TEXT[..20]);
        let all: Vec<u8> = frames.concat();
        assert_eq!(zstd::decode_all(&all[..]).unwrap(), TEXT.as_bytes());
        // The window asked for is the one in the frame header: a client that
        // caps it (RFC 9659: 8MiB) can tell before decoding.
        let mut d = zstd::stream::raw::Decoder::new().unwrap();
        d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(10))
            .unwrap();
        let mut out = vec![0u8; 4096];
        let status = zstd::stream::raw::Operation::run_on_buffers(&mut d, &all, &mut out).unwrap();
        assert_eq!(&out[..status.bytes_written], TEXT.as_bytes());
        drop(body);
        assert_eq!(s.compressed.get(), 1);
        assert_eq!(s.bytes_out.get(), all.len() as u64);
    }

    #[tokio::test]
    async fn a_brotli_body_decodes_to_the_original() {
        let s = stats();
        let mut c = cfg();
        c.brotli = Some(serde_saphyr::from_str("{}").unwrap());
        // A streamed body: each chunk goes on as it comes.
        let mut r = streamed_text();
        apply(&c, &s, &Method::GET, Some(Coding::Brotli), &mut r);
        assert_eq!(r.headers()["content-encoding"], "br");
        let mut body = r.into_body();
        let frames = data_frames(&mut body).await;
        // The first chunk was flushed on its own: it decodes before the end.
        let mut first = Vec::new();
        let mut d = brotli::Decompressor::new(&frames[0][..], 4096);
        let _ = d.read_to_end(&mut first);
        assert_eq!(String::from_utf8_lossy(&first), TEXT[..20]);
        let all: Vec<u8> = frames.concat();
        let mut plain = String::new();
        brotli::Decompressor::new(&all[..], 4096)
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, TEXT);
        // (Its byte counts are added when the body is dropped.)
        drop(body);
        assert_eq!(s.compressed.get(), 1);
        assert_eq!(s.bytes_out.get(), all.len() as u64);
    }

    #[tokio::test]
    async fn a_compressed_body_is_gzip_of_the_original() {
        let s = stats();
        let mut r = response(
            &[
                ("content-type", "text/html; charset=utf-8"),
                ("content-length", "59"),
                ("etag", "\"v1\""),
            ],
            TEXT,
        );
        apply(&cfg(), &s, &Method::GET, Some(Coding::Gzip), &mut r);
        assert_eq!(r.headers()["content-encoding"], "gzip");
        assert_eq!(r.headers()["vary"], "accept-encoding");
        assert_eq!(r.headers()["etag"], "W/\"v1\"");
        assert!(!r.headers().contains_key("content-length"));
        let zipped = r.into_body().collect().await.unwrap().to_bytes();
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&zipped[..])
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, TEXT);
        assert_eq!(s.compressed.get(), 1);
        assert_eq!(s.bytes_in.get(), TEXT.len() as u64);
        assert_eq!(s.bytes_out.get(), zipped.len() as u64);
    }

    #[test]
    fn what_is_left_alone() {
        let s = stats();
        type Case<'a> = (&'a [(&'a str, &'a str)], Method, StatusCode);
        let cases: &[Case<'_>] = &[
            (
                &[("content-type", "image/png")],
                Method::GET,
                StatusCode::OK,
            ),
            (&[], Method::GET, StatusCode::OK),
            (
                &[("content-type", "text/html"), ("content-encoding", "br")],
                Method::GET,
                StatusCode::OK,
            ),
            (
                &[
                    ("content-type", "text/html"),
                    ("cache-control", "public, no-transform"),
                ],
                Method::GET,
                StatusCode::OK,
            ),
            (
                &[("content-type", "text/html"), ("content-length", "29")],
                Method::GET,
                StatusCode::OK,
            ),
            (
                &[
                    ("content-type", "text/html"),
                    ("content-range", "bytes 0-1/59"),
                ],
                Method::GET,
                StatusCode::PARTIAL_CONTENT,
            ),
        ];
        for (headers, method, status) in cases {
            let mut r = response(headers, TEXT);
            *r.status_mut() = *status;
            apply(&cfg(), &s, method, Some(Coding::Gzip), &mut r);
            assert!(
                !r.headers().contains_key("content-encoding")
                    || r.headers()["content-encoding"] == "br",
                "{headers:?}"
            );
            assert!(!r.headers().contains_key("vary"), "{headers:?}");
        }
        assert_eq!(s.compressed.get(), 0);
        // Compressible, but not accepted: as it was, with `vary`.
        let mut r = response(
            &[("content-type", "application/json"), ("vary", "origin")],
            TEXT,
        );
        apply(&cfg(), &s, &Method::GET, None, &mut r);
        assert!(!r.headers().contains_key("content-encoding"));
        let vary: Vec<_> = r.headers().get_all("vary").iter().collect();
        assert_eq!(vary, ["origin", "accept-encoding"]);
        assert_eq!(s.not_accepted.get(), 1);
        // HEAD: the head a GET gets, and no body to compress.
        let mut r = response(
            &[
                ("content-type", "text/html"),
                ("content-length", "59"),
                ("etag", "\"v1\""),
            ],
            "",
        );
        *r.body_mut() = body::empty();
        apply(&cfg(), &s, &Method::HEAD, Some(Coding::Gzip), &mut r);
        assert_eq!(r.headers()["content-encoding"], "gzip");
        assert_eq!(r.headers()["vary"], "accept-encoding");
        assert_eq!(r.headers()["etag"], "W/\"v1\"");
        assert!(!r.headers().contains_key("content-length"));
        assert!(r.body().is_end_stream());
        assert_eq!(s.compressed.get(), 0);
    }

    #[tokio::test]
    async fn trailers_follow_the_gzip_stream() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter([
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(TEXT.as_bytes()))),
            Ok(Frame::trailers(t)),
        ]));
        let mut r = Response::new(body::boxed(inner));
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("text/plain"));
        apply(&cfg(), &stats(), &Method::GET, Some(Coding::Gzip), &mut r);
        let all = r.into_body().collect().await.unwrap();
        assert_eq!(all.trailers().unwrap()["grpc-status"], "0");
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&all.to_bytes()[..])
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, TEXT);
    }
}
