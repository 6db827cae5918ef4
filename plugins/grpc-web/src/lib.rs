//! `grpc-web`: Legate's first-party gRPC-Web filter, a Wasm plugin built with
//! `legate-sdk`.
//!
//! Browsers cannot speak gRPC (no trailers, no HTTP/2 framing control), so
//! gRPC-Web (grpc/grpc `doc/PROTOCOL-WEB.md`) carries the same messages over
//! any HTTP version with the trailers moved into the body. This filter converts
//! at the proxy, as Envoy's `grpc_web` filter does:
//!
//! - request: `content-type: application/grpc-web[-text][+proto]` (lower
//!   case, as Envoy matches it; any method but `CONNECT`, as Envoy does not
//!   look at the method) becomes `application/grpc` (another codec
//!   keeps its suffix), `te: trailers` is added, `grpc-accept-encoding:
//!   identity` if the client named no encodings, `content-length` is
//!   removed (binary and text, as Envoy), and a `-text` body is
//!   base64-decoded as it streams (any chunking);
//! - response: `content-type` goes back to gRPC-Web, text when the client's
//!   `accept` asks for `application/grpc-web-text`, else binary (as Envoy,
//!   whatever the request's variant), with `+proto` as Envoy answers (a
//!   codec Envoy does not convert, `+json`, keeps its name); the body passes
//!   through (base64-encoded for text), and the upstream's trailers become
//!   the final body frame (flag `0x80`) in the last body call, so the HTTP
//!   response itself has no trailers (abi/README.md §4, folding trailers).
//!   A trailers-only response (status in the headers) passes as headers,
//!   whatever its HTTP status, and so does any other answer that ends with
//!   its head (as Envoy: no `grpc-status` is added). A non-gRPC answer with
//!   a body (an error of the host or of a proxy: `502` for a dead upstream;
//!   as Envoy, any non-200 answer with a body, gRPC content type or not)
//!   becomes one in Envoy's shape: its HTTP status kept, `grpc-status`
//!   mapped from it (gRPC's HTTP mapping: `502`/`503`/`504` are
//!   `UNAVAILABLE`) and the body's first 16 KiB as `grpc-message`, in the
//!   headers, and an empty body;
//! - CORS (optional): preflights from allowed origins are answered locally
//!   (others pass on untouched, as Envoy's cors filter), converted responses get
//!   `access-control-allow-origin` and `access-control-expose-headers`.
//!
//! Anything that is not a gRPC-Web request passes untouched, its bodies skipped.
//! See `README.md` for the schema and behaviour.

pub mod codec;
pub mod config;

use legate_sdk::metrics::Counter;
use legate_sdk::{
    rules, Action, Body, BodyMode, Direction, Exchange, Headers, HttpFilter, LocalResponse, Setup,
};

use crate::codec::TextDecoder;
use crate::config::{Config, Cors};

/// `grpc_web_requests_total{variant}`: requests converted, `binary` or `text`.
pub const REQUESTS: &str = "grpc_web_requests_total";
/// `grpc_web_responses_total{kind}`: responses to converted requests by how
/// the status travelled: `trailer_frame`, `trailers_only`, `not_grpc` (the
/// upstream or the host did not answer gRPC: its HTTP status kept, the
/// status mapped from it and its body as the message put in the headers), or
/// `no_status` (an answer that ended with its head without a `grpc-status`:
/// passed without one, as Envoy passes it).
pub const RESPONSES: &str = "grpc_web_responses_total";
/// `grpc_web_preflights_total{outcome}`: CORS preflights, `allowed`
/// (answered) or `denied` (an origin not allowed: passed on untouched).
pub const PREFLIGHTS: &str = "grpc_web_preflights_total";
/// `grpc_web_rejected_total{reason}`: requests refused, `invalid_base64`.
pub const REJECTED: &str = "grpc_web_rejected_total";

/// Which gRPC-Web encoding a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `application/grpc-web[+…]`: binary frames.
    Binary,
    /// `application/grpc-web-text[+…]`: the frames base64-encoded.
    Text,
}

/// Whether a gRPC-Web client's `accept` asks for a text (base64) response,
/// read as Envoy's grpc_web filter reads it (`decodeHeaders`): the whole
/// value is exactly `application/grpc-web-text` or `text_type`, the text form
/// of the response's media type (`application/grpc-web-text+proto` for a
/// proto request, as Envoy; another codec keeps its name). No list, no
/// parameters, case-sensitive: anything else (`*/*`, a list, none) gets
/// binary. grpc-web's JavaScript client sends exactly
/// `application/grpc-web-text` in text mode, and no `accept` in binary mode.
pub fn accepts_text(accept: &str, text_type: &str) -> bool {
    accept == "application/grpc-web-text" || accept == text_type
}

/// A gRPC-Web `content-type` → (variant, the client's media type, the gRPC
/// media type to send upstream). `None` for anything else.
///
/// Case-sensitive, as Envoy's grpc_web filter (`isGrpcWebRequest` looks the
/// whole value up in its set of the four lower-case gRPC-Web types): a type
/// with an upper-case letter (`Application/grpc-web`) is not gRPC-Web and
/// passes untouched. Parameters are ignored (Envoy would not convert a type
/// with them), and a codec other than `+proto` is converted too (Envoy
/// converts none).
pub fn convert_content_type(content_type: &str) -> Option<(Variant, String, String)> {
    let base = content_type.split(';').next().unwrap_or_default().trim();
    if base.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let (variant, suffix) = if let Some(s) = base.strip_prefix("application/grpc-web-text") {
        (Variant::Text, s)
    } else if let Some(s) = base.strip_prefix("application/grpc-web") {
        (Variant::Binary, s)
    } else {
        return None;
    };
    // `+proto`, `+json`, …: the message codec, the same on both sides.
    if !(suffix.is_empty() || suffix.starts_with('+') && suffix.len() > 1) {
        return None;
    }
    // No codec and `+proto` are both protobuf, sent as Envoy's grpc_web
    // filter sends them (`decodeHeaders`): plain `application/grpc`, gRPC's
    // protobuf default. Another codec, which Envoy does not convert, keeps
    // its name: the server needs it.
    let grpc = match suffix {
        "" | "+proto" => "application/grpc".to_owned(),
        _ => format!("application/grpc{suffix}"),
    };
    Some((variant, base.to_owned(), grpc))
}

/// Whether an upstream response's `content-type` is gRPC, as Envoy's
/// grpc_web filter decides whether to convert it: `application/grpc` or
/// `application/grpc+codec`, case-sensitive (`Grpc::Common::hasGrpcContentType`:
/// `application/grpc-web` and `Application/grpc` are not gRPC), or an answer
/// that is gRPC-Web already, `application/grpc-web` or
/// `application/grpc-web+proto` in any case, parameters ignored
/// (`hasProtoEncodedGrpcWebContentType`). Anything else is a non-gRPC answer.
pub fn is_grpc_response_type(content_type: &str) -> bool {
    if let Some(rest) = content_type.strip_prefix("application/grpc") {
        if rest.is_empty() || rest.starts_with('+') {
            return true;
        }
    }
    let base = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim_end();
    base.eq_ignore_ascii_case("application/grpc-web")
        || base.eq_ignore_ascii_case("application/grpc-web+proto")
}

struct Metrics {
    binary: Counter,
    text: Counter,
    trailer_frame: Counter,
    trailers_only: Counter,
    not_grpc: Counter,
    no_status: Counter,
    preflight_allowed: Counter,
    preflight_denied: Counter,
    invalid_base64: Counter,
}

impl Metrics {
    fn define() -> Result<Self, String> {
        let def = |name: &str, help: &str, label: &str, values: &[&str]| {
            let c = Counter::define(name, help, &[label])
                .map_err(|e| format!("defining metric {name}: {e}"))?;
            values
                .iter()
                .map(|v| {
                    c.with_labels(&[v])
                        .map_err(|e| format!("metric series {name}{{{label}={v}}}: {e}"))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        let mut req = def(
            REQUESTS,
            "gRPC-Web requests converted to gRPC, by variant",
            "variant",
            &["binary", "text"],
        )?
        .into_iter();
        let mut resp = def(
            RESPONSES,
            "Responses to converted requests, by how the gRPC status travelled",
            "kind",
            &["trailer_frame", "trailers_only", "not_grpc", "no_status"],
        )?
        .into_iter();
        let mut pre = def(
            PREFLIGHTS,
            "CORS preflights: answered (allowed) or passed on (denied: origin not allowed)",
            "outcome",
            &["allowed", "denied"],
        )?
        .into_iter();
        let mut rej = def(
            REJECTED,
            "gRPC-Web requests refused, by reason",
            "reason",
            &["invalid_base64"],
        )?
        .into_iter();
        let next = |it: &mut std::vec::IntoIter<Counter>| {
            it.next()
                .ok_or_else(|| "bug: a metric series is missing".to_owned())
        };
        Ok(Metrics {
            binary: next(&mut req)?,
            text: next(&mut req)?,
            trailer_frame: next(&mut resp)?,
            trailers_only: next(&mut resp)?,
            not_grpc: next(&mut resp)?,
            no_status: next(&mut resp)?,
            preflight_allowed: next(&mut pre)?,
            preflight_denied: next(&mut pre)?,
            invalid_base64: next(&mut rej)?,
        })
    }
}

/// The filter: one per plugin instance (worker).
pub struct GrpcWeb {
    cors: Option<Cors>,
    metrics: Metrics,
}

/// Per-exchange state of a converted exchange.
#[derive(Debug, Default)]
pub struct Context {
    /// `Some` once the request was converted.
    variant: Option<Variant>,
    /// The response's media type: the client's, in the encoding it accepts.
    content_type: String,
    /// The response is base64 (`-text`): `accept` asks for it (else binary,
    /// whatever the request's variant).
    text_response: bool,
    /// `access-control-allow-origin` for this exchange (CORS on, origin allowed).
    allow_origin: Option<String>,
    /// The upstream answered gRPC: its body and trailers are converted.
    grpc_response: bool,
    /// The HTTP status of a non-gRPC answer, converted in the (buffered)
    /// response body phase.
    not_grpc: Option<u16>,
    /// That answer's body is content-encoded (gzip…): no text to quote.
    page_encoded: bool,
    decoder: TextDecoder,
}

impl HttpFilter for GrpcWeb {
    type Config = Config;
    type Context = Context;

    fn configure(config: Config) -> Result<Self, String> {
        let cors = config.validate()?;
        Ok(GrpcWeb {
            cors,
            metrics: Metrics::define()?,
        })
    }

    fn setup(&self) -> Setup {
        // Streamed both ways: messages flow as they come (server streaming),
        // and exchanges that need no body work switch to `skipped`.
        Setup::new()
            .on_request_headers()
            .on_request_body(BodyMode::Streamed)
            .on_response_headers()
            .on_response_body(BodyMode::Streamed)
    }

    fn on_request_headers(
        &mut self,
        ctx: &mut Context,
        x: &Exchange<'_>,
        headers: &Headers<'_>,
        _end_of_stream: bool,
    ) -> Action {
        // The method is a host call: asked for only when it decides something
        // (a preflight, or the one request a gRPC-Web content type does not
        // make gRPC-Web), not for plain requests.
        let mut method = None;
        if let Some(cors) = &self.cors {
            let m = x.method();
            if m == "OPTIONS" && headers.has("access-control-request-method") {
                if let Some(origin) = headers.get_str("origin") {
                    if let Some(answer) = self.preflight(cors, &origin) {
                        return answer;
                    }
                    // An origin not allowed: as Envoy's cors filter, the
                    // preflight goes on untouched (the next filter or the
                    // upstream may answer it; without CORS headers from
                    // here, the browser refuses the call either way).
                    pass_through(x);
                    return Action::Continue;
                }
            }
            method = Some(m);
        }
        // As Envoy's grpc_web filter (`isGrpcWebRequest`): the content type
        // decides, whatever the method (gRPC-Web clients send POST; Envoy
        // converts a GET or PUT with the type too). Envoy also requires a
        // `:path`, which only a CONNECT lacks: a CONNECT is left alone.
        let converted = headers
            .get_str("content-type")
            .and_then(|ct| convert_content_type(&ct))
            .filter(|_| method.unwrap_or_else(|| x.method()) != "CONNECT");
        let Some((variant, client_type, grpc_type)) = converted else {
            pass_through(x);
            return Action::Continue;
        };
        // Writes to the request head cannot fail in its own phase but for a
        // malformed value, which these constants are not; a failure would
        // surface as the upstream rejecting the request.
        let _ = headers.set("content-type", &grpc_type);
        let _ = headers.set("te", "trailers");
        // As Envoy's grpc_web filter (since envoyproxy/envoy#13647): a
        // client that names no message encodings gets `identity`, so the
        // server sends its messages uncompressed (grpc-web's JavaScript
        // client names none and cannot decompress one, and the filter passes
        // messages as they are); a client that names its own keeps them.
        if !headers.has("grpc-accept-encoding") {
            let _ = headers.set("grpc-accept-encoding", "identity");
        }
        // As Envoy's grpc_web filter (`decodeHeaders`), for binary and text
        // alike: the upstream request goes without a length (chunked on
        // HTTP/1.1, DATA frames to the end of the stream on HTTP/2). Decoding
        // a `-text` body shrinks it, and a binary one is framed as Envoy
        // frames it, so an upstream sees the same request behind either.
        let _ = headers.remove("content-length");
        match variant {
            Variant::Binary => {
                self.metrics.binary.inc();
                let _ = x.set_body_mode(Direction::Request, BodyMode::Skipped);
            }
            Variant::Text => self.metrics.text.inc(),
        }
        // As Envoy's grpc_web filter (`is_text_response_`), the response is
        // text only when `accept` is exactly a text type (grpc-web's JS
        // client sends `accept: application/grpc-web-text` in text mode, as
        // PROTOCOL-WEB says a client wanting text must), and binary
        // otherwise: `*/*`, a list, or no `accept`, whatever the request's
        // variant.
        let text_type = response_content_type(&client_type, true);
        let text_response = headers
            .get_str("accept")
            .is_some_and(|a| accepts_text(&a, &text_type));
        ctx.variant = Some(variant);
        ctx.text_response = text_response;
        ctx.content_type = if text_response {
            text_type
        } else {
            response_content_type(&client_type, false)
        };
        ctx.allow_origin = self
            .cors
            .as_ref()
            .and_then(|c| headers.get_str("origin").and_then(|o| c.allow_origin(&o)));
        Action::Continue
    }

    fn on_request_body(
        &mut self,
        ctx: &mut Context,
        _x: &Exchange<'_>,
        body: &Body<'_>,
        end_of_stream: bool,
    ) -> Action {
        if ctx.variant != Some(Variant::Text) {
            return Action::Continue;
        }
        match ctx.decoder.push(&body.to_vec(), end_of_stream) {
            Ok(decoded) => match body.replace(decoded) {
                Ok(()) => Action::Continue,
                Err(e) => Action::Respond(self.error_response(
                    ctx,
                    500,
                    13,
                    &format!("grpc-web: replacing the decoded request body failed: {e}"),
                    "grpc_web_body_write",
                )),
            },
            Err(e) => {
                self.metrics.invalid_base64.inc();
                Action::Respond(self.error_response(
                    ctx,
                    400,
                    3,
                    &e.to_string(),
                    "grpc_web_invalid_base64",
                ))
            }
        }
    }

    fn on_response_headers(
        &mut self,
        ctx: &mut Context,
        x: &Exchange<'_>,
        headers: &Headers<'_>,
        end_of_stream: bool,
    ) -> Action {
        if ctx.variant.is_none() {
            return Action::Continue;
        }
        if let Some(origin) = &ctx.allow_origin {
            self.cors_headers(headers, origin);
        }
        // As Envoy's grpc_web filter (`isGrpcResponseHeaders`,
        // `isProtoEncodedGrpcWebResponseHeaders`): a head that ends the
        // response with a `grpc-status` is a trailers-only gRPC answer
        // whatever its status and content type; any other answer is gRPC
        // only with status 200 (the one status of a gRPC answer,
        // PROTOCOL-HTTP2) and a gRPC content type. A `503` labelled
        // `application/grpc` is some proxy's error, converted as any other.
        let grpc = (end_of_stream && headers.has("grpc-status"))
            || (headers
                .get_str("content-type")
                .is_some_and(|ct| is_grpc_response_type(&ct))
                && x.status() == Some(200));
        // As Envoy's `encodeHeaders`, for every answer to a converted
        // request: the client's gRPC-Web type, and no length (the body
        // changes: a trailer frame, base64, or none).
        let _ = headers.set("content-type", &ctx.content_type);
        let _ = headers.remove("content-length");
        if grpc {
            ctx.grpc_response = true;
            if end_of_stream {
                // Trailers-only: the status is in the headers, which gRPC-Web
                // clients read as they are.
                self.metrics.trailers_only.inc();
            }
            return Action::Continue;
        }
        if end_of_stream {
            // An answer that ends with its head and has no `grpc-status`
            // (a body-less 404, a 200 with nothing): passed as it is, as
            // Envoy passes it (`encodeHeaders` continues on `end_stream`),
            // with no status added. A gRPC-Web client reads its HTTP status.
            self.metrics.no_status.inc();
            return Action::Continue;
        }
        // An error page from the upstream, a proxy or the host (a dead
        // upstream's 502): as Envoy's filter, its HTTP status stays and the
        // gRPC status mapped from it goes in the head with the page as its
        // message, the body emptied. The head is held with the (buffered)
        // body, where both are rewritten.
        self.metrics.not_grpc.inc();
        ctx.not_grpc = Some(x.status().unwrap_or(500));
        // The page is dropped: its coding must go with it (a body-less
        // answer is not gzip), and its bytes are no message.
        ctx.page_encoded = headers
            .get_str("content-encoding")
            .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
        let _ = headers.remove("content-encoding");
        if let Err(e) = x.set_body_mode(Direction::Response, BodyMode::Buffered) {
            legate_sdk::error!("grpc-web: buffering a non-gRPC answer failed: {e}");
        }
        Action::Continue
    }

    fn on_response_body(
        &mut self,
        ctx: &mut Context,
        x: &Exchange<'_>,
        body: &Body<'_>,
        end_of_stream: bool,
    ) -> Action {
        if let Some(status) = ctx.not_grpc {
            // Buffered: this is the one call, with the whole page (unless it
            // is compressed: bytes that would only garble the message).
            let page = if ctx.page_encoded {
                Vec::new()
            } else {
                body.to_vec()
            };
            let (grpc_status, grpc_message) = status_fields(status, &page);
            // Trailers of the answer (a `grpc-status` of a non-200 gRPC
            // answer) go: the head's status is the answer's, and a browser
            // could not read them anyway.
            if let Some(t) = x.trailers(Direction::Response) {
                for (name, _) in t.entries() {
                    if let Err(e) = t.remove(&name) {
                        legate_sdk::warn!("grpc-web: removing trailer {name} failed: {e}");
                    }
                }
            }
            let written = match x.headers(Direction::Response) {
                Some(h) => h
                    .set("grpc-status", &grpc_status)
                    .and_then(|()| h.set("grpc-message", &grpc_message))
                    .and_then(|()| body.replace(b"")),
                None => Err(legate_sdk::Error::InvalidState),
            };
            return match written {
                Ok(()) => Action::Continue,
                Err(e) => {
                    legate_sdk::error!("grpc-web: converting a non-gRPC answer failed: {e}");
                    Action::Respond(self.status_answer(ctx, status, &page))
                }
            };
        }
        if !ctx.grpc_response {
            return Action::Continue;
        }
        let text = ctx.text_response;
        let trailers = if end_of_stream {
            x.trailers(Direction::Response)
        } else {
            None
        };
        if !text && trailers.is_none() {
            return Action::Continue;
        }
        let mut data = body.to_vec();
        if let Some(t) = trailers {
            let entries = t.entries();
            data.extend_from_slice(&codec::trailer_frame(&entries));
            // Emptied, the host ends the response with this body: no HTTP
            // trailers, which browsers cannot read.
            for (name, _) in &entries {
                if let Err(e) = t.remove(name) {
                    legate_sdk::warn!("grpc-web: removing trailer {name} failed: {e}");
                }
            }
            self.metrics.trailer_frame.inc();
        }
        if text {
            // Each chunk is padded base64 of its own, as Envoy encodes each
            // message: holding back the 1-2 bytes that do not fill a group
            // would keep a streamed message from the client until the next
            // chunk (gRPC-Web clients decode padding mid-stream).
            data = codec::encode(&data);
        }
        match body.replace(data) {
            Ok(()) => Action::Continue,
            Err(e) => {
                legate_sdk::error!("grpc-web: rewriting the response body failed: {e}");
                Action::respond(502, "grpc-web: response conversion failed\n")
            }
        }
    }
}

/// The response media type for a request of media type `client_type`
/// (`application/grpc-web[-text][+codec]`), in the text or binary encoding.
///
/// As Envoy's grpc_web filter (`encodeHeaders`), a request with no codec or
/// `+proto` is answered `application/grpc-web[-text]+proto`. Envoy converts
/// no other codec; a request with one (`+json`, `+thrift`) keeps it here, as
/// answering `+proto` would mislabel the body.
fn response_content_type(client_type: &str, text: bool) -> String {
    let codec = match client_type
        .strip_prefix("application/grpc-web-text")
        .or_else(|| client_type.strip_prefix("application/grpc-web"))
        .unwrap_or_default()
    {
        "" => "+proto",
        other => other,
    };
    let base = if text {
        "application/grpc-web-text"
    } else {
        "application/grpc-web"
    };
    format!("{base}{codec}")
}

/// Not a gRPC-Web exchange: no more calls for it (one guest call per plain
/// request instead of three).
fn pass_through(x: &Exchange<'_>) {
    // `detach` fails only with a callout outstanding; this filter sends none.
    let _ = x.detach();
}

impl GrpcWeb {
    /// The answer to a CORS preflight from `origin`; `None` for an origin
    /// not allowed (the preflight is not this filter's to answer).
    fn preflight(&self, cors: &Cors, origin: &str) -> Option<Action> {
        let Some(allow) = cors.allow_origin(origin) else {
            self.metrics.preflight_denied.inc();
            return None;
        };
        self.metrics.preflight_allowed.inc();
        let mut r = LocalResponse::new(204)
            .header("access-control-allow-origin", allow.as_str())
            .header("access-control-allow-methods", "POST, OPTIONS")
            .header(
                "access-control-allow-headers",
                cors.allowed_headers.join(", "),
            )
            .header("access-control-max-age", cors.max_age_s.to_string())
            .details("grpc_web_preflight");
        if allow != "*" {
            r = r.header("vary", "origin");
        }
        if cors.allow_credentials {
            r = r.header("access-control-allow-credentials", "true");
        }
        Some(Action::Respond(r))
    }

    /// The CORS fields of a response for an allowed origin (none without
    /// CORS): one list for converted responses and this filter's own answers,
    /// so a credentialed browser request can read either.
    fn cors_fields(&self, allow_origin: &str) -> Vec<(&'static str, String)> {
        let Some(cors) = &self.cors else {
            return Vec::new();
        };
        let mut fields = vec![("access-control-allow-origin", allow_origin.to_owned())];
        if !cors.expose_headers.is_empty() {
            fields.push((
                "access-control-expose-headers",
                cors.expose_headers.join(","),
            ));
        }
        if allow_origin != "*" {
            fields.push(("vary", "origin".to_owned()));
        }
        if cors.allow_credentials {
            fields.push(("access-control-allow-credentials", "true".to_owned()));
        }
        fields
    }

    /// CORS headers of a converted response for an allowed origin.
    fn cors_headers(&self, headers: &Headers<'_>, allow_origin: &str) {
        for (name, value) in self.cors_fields(allow_origin) {
            // `vary` may list the upstream's own fields: added, not replaced.
            let _ = if name == "vary" {
                headers.add(name, &value)
            } else {
                headers.set(name, &value)
            };
        }
    }

    /// This filter's own answer `r` with the CORS fields of the exchange.
    fn with_cors(&self, ctx: &Context, mut r: LocalResponse) -> LocalResponse {
        if let Some(origin) = &ctx.allow_origin {
            for (name, value) in self.cors_fields(origin) {
                r = r.header(name, value);
            }
        }
        r
    }

    /// A non-gRPC answer in Envoy's shape, answered whole (when rewriting it
    /// in place failed): its HTTP `status`, the client's content type,
    /// `grpc-status` and `grpc-message` of [`status_fields`], no body.
    fn status_answer(&self, ctx: &Context, status: u16, page: &[u8]) -> LocalResponse {
        let (grpc_status, grpc_message) = status_fields(status, page);
        let r = LocalResponse::new(status)
            .header("content-type", ctx.content_type.as_str())
            .header("grpc-status", grpc_status)
            .header("grpc-message", grpc_message)
            .details("grpc_web_not_grpc");
        self.with_cors(ctx, r)
    }

    /// A gRPC-Web error answered by this filter: trailers-only (status in the
    /// headers) so a gRPC-Web client reports it, with CORS headers when allowed.
    fn error_response(
        &self,
        ctx: &Context,
        http_status: u16,
        grpc_status: u32,
        message: &str,
        details: &str,
    ) -> LocalResponse {
        let r = LocalResponse::new(http_status)
            .header("content-type", ctx.content_type.as_str())
            .header("grpc-status", grpc_status.to_string())
            .header(
                "grpc-message",
                rules::grpc::percent_encode(message.as_bytes()),
            )
            .details(details);
        self.with_cors(ctx, r)
    }
}

/// The most of a non-gRPC answer's body kept as its `grpc-message`, in bytes
/// (before percent-encoding): Envoy's `MAX_BUFFERED_PLAINTEXT_LENGTH`.
pub const MAX_MESSAGE: usize = 16 * 1024;

/// `grpc-status` and `grpc-message` for a non-gRPC answer with HTTP `status`
/// and body `page`, as Envoy's grpc_web filter builds them
/// (`setTransformedNonProtoEncodedResponseHeaders`): the status mapped from
/// the HTTP status (`httpToGrpcStatus`), the body's first [`MAX_MESSAGE`]
/// bytes as they are, percent-encoded (empty for an empty body). One final
/// newline is left out, as the host leaves it out of its local replies'
/// gRPC form: the host's own answers end with one (`no_healthy_upstream\n`),
/// Envoy's do not.
pub fn status_fields(status: u16, page: &[u8]) -> (String, String) {
    let page = page.strip_suffix(b"\n").unwrap_or(page);
    let message = &page[..page.len().min(MAX_MESSAGE)];
    (
        rules::grpc::status_of_http(status).to_string(),
        rules::grpc::percent_encode(message),
    )
}

legate_sdk::export!(GrpcWeb);
