//! `grpc-json`: Legate's first-party JSON ↔ gRPC transcoder, a Wasm plugin
//! built with `legate-sdk`, after Envoy's `grpc_json_transcoder`.
//!
//! A gRPC method with a `google.api.http` option is exposed as REST/JSON (a
//! server stream's replies as a JSON array, streamed; a client stream's
//! requests from a JSON array, as Envoy's):
//!
//! - request headers: the method and path are matched against the rules of the
//!   configured services (most specific template wins). No match: the
//!   exchange passes untouched and the filter detaches from it (no more calls). A match: the head becomes a
//!   gRPC request (`POST /pkg.Service/Method`, `content-type: application/grpc`,
//!   `te: trailers`) and the request body is buffered;
//! - request body (buffered, also called for a body-less `GET`): the message is
//!   built from the JSON body, path variables and query parameters, encoded and
//!   framed (for a client or bidi stream, one message per element of the body's
//!   JSON array, each framed, the path and query bound into each); bad input is
//!   answered `400` with `{"code": 3, "message": ...}`;
//! - response: the response body is buffered; its message is printed as JSON,
//!   or, for a gRPC error (in the trailers, or trailers-only in the headers),
//!   the mapped HTTP status with `{"code": N, "message": ...}`. The trailers
//!   are removed, so the response ends with its body (abi/README.md §4).
//!   A non-gRPC error answer (of the host or a proxy: `502` for a dead
//!   upstream) becomes the same JSON error: its HTTP status mapped to a gRPC
//!   code (`502`/`503`/`504`: `UNAVAILABLE`) and back to an HTTP status, its
//!   body as the message.
//!
//! See `README.md` for the schema and behaviour.

pub mod codec;
pub mod config;
pub mod direct;
pub mod rules;
pub mod template;

use legate_sdk::metrics::Counter;
use legate_sdk::{
    Action, Body, BodyMode, Direction, Exchange, Headers, HttpFilter, LocalResponse, Setup,
};

use crate::codec::code;
use crate::config::Config;
use crate::rules::{Match, Transcoder};

/// `grpc_json_requests_total{result}`: transcoded requests by result: `ok`,
/// `grpc_error` (the upstream answered a non-OK status), `bad_request` (the
/// client's JSON, path or query did not fit the message; answered 400) or
/// `upstream_error` (the upstream's answer could not be transcoded).
pub const REQUESTS: &str = "grpc_json_requests_total";

/// The label values of [`REQUESTS`].
pub const RESULTS: [&str; 4] = ["ok", "grpc_error", "bad_request", "upstream_error"];

/// The `trailer` field of a streamed JSON array's head: the fields a failed
/// stream ends with (an OK one ends without trailers).
pub const STREAM_TRAILERS: &str = "grpc-status, grpc-message";

struct Metrics {
    ok: Counter,
    grpc_error: Counter,
    bad_request: Counter,
    upstream_error: Counter,
}

impl Metrics {
    fn define() -> Result<Self, String> {
        let c = Counter::define(
            REQUESTS,
            "Requests transcoded between JSON and gRPC, by result",
            &["result"],
        )
        .map_err(|e| format!("defining metric {REQUESTS}: {e}"))?;
        let series = |v: &str| {
            c.with_labels(&[v])
                .map_err(|e| format!("metric series {REQUESTS}{{result={v}}}: {e}"))
        };
        Ok(Metrics {
            ok: series("ok")?,
            grpc_error: series("grpc_error")?,
            bad_request: series("bad_request")?,
            upstream_error: series("upstream_error")?,
        })
    }
}

/// The filter: one per plugin instance (worker).
pub struct GrpcJson {
    transcoder: Transcoder,
    metrics: Metrics,
}

/// Per-exchange state; `Some` match only for exchanges being transcoded.
#[derive(Debug, Default)]
pub struct Context {
    matched: Option<Match>,
    /// The upstream answered gRPC: its body is transcoded.
    grpc_response: bool,
    /// `grpc-status`/`grpc-message` found in the response headers.
    header_status: Option<(u32, String)>,
    /// The HTTP status of a non-gRPC answer, turned into a JSON error in the
    /// (buffered) response body phase.
    not_grpc: Option<u16>,
    /// That answer's body is content-encoded (gzip…): no text to quote.
    page_encoded: bool,
    /// A server-streaming method's replies, printed as a JSON array as they
    /// arrive (the response body is streamed).
    stream: Option<Stream>,
}

/// The state of a streamed JSON array.
#[derive(Debug, Default)]
struct Stream {
    frames: codec::Deframer,
    /// Messages printed so far.
    messages: u64,
}

impl GrpcJson {
    /// Builds the filter from a parsed config and the descriptor set's bytes
    /// (what `configure` does after reading the granted file).
    pub fn new(config: &Config, descriptor_set: &[u8]) -> Result<Self, String> {
        Ok(GrpcJson {
            transcoder: Transcoder::new(config, descriptor_set)?,
            metrics: Metrics::define()?,
        })
    }

    /// The rules, for inspection.
    pub fn transcoder(&self) -> &Transcoder {
        &self.transcoder
    }

    fn bad_request(&self, message: &str) -> Action {
        self.metrics.bad_request.inc();
        Action::Respond(json_response(
            400,
            code::INVALID_ARGUMENT,
            message,
            "grpc_json_bad_request",
        ))
    }
}

fn json_response(status: u16, code: u32, message: &str, details: &str) -> LocalResponse {
    LocalResponse::new(status)
        .header("content-type", "application/json")
        .body(codec::error_json(code, message))
        .details(details)
}

impl HttpFilter for GrpcJson {
    type Config = Config;
    type Context = Context;

    fn configure(config: Config) -> Result<Self, String> {
        let bytes = legate_sdk::plugin::file(&config.descriptor_file).map_err(|e| {
            format!(
                "invalid config: field `descriptor_file`: reading descriptor file {:?}: {e}: grant it in the plugin's `files:` (e.g. `files: {{ {}: protos/api.pb }}`)",
                config.descriptor_file, config.descriptor_file
            )
        })?;
        GrpcJson::new(&config, &bytes)
    }

    fn setup(&self) -> Setup {
        // Bodies are skipped unless an exchange is transcoded, which switches
        // its directions to buffered: other traffic pays no body calls.
        Setup::new()
            .on_request_headers()
            .on_request_body(BodyMode::Skipped)
            .on_response_headers()
            .on_response_body(BodyMode::Skipped)
    }

    fn on_request_headers(
        &mut self,
        ctx: &mut Context,
        x: &Exchange<'_>,
        headers: &Headers<'_>,
        _end_of_stream: bool,
    ) -> Action {
        // Already gRPC (a gRPC client on a path that looks like a REST one):
        // not ours to convert, as in Envoy.
        let grpc = headers.get_str("content-type").is_some_and(|ct| {
            ct.trim()
                .to_ascii_lowercase()
                .starts_with("application/grpc")
        });
        let found = if grpc {
            None
        } else {
            self.transcoder.find(&x.method(), &x.path())
        };
        let Some(m) = found else {
            // Not ours: no more calls for this exchange (no response or done
            // call); it cannot fail, as this filter sends no callouts.
            let _ = x.detach();
            return Action::Continue;
        };
        let Some(rule) = self.transcoder.rules.get(m.rule) else {
            return Action::Continue;
        };
        let rewrite = x
            .set_method("POST")
            .and_then(|()| x.set_path(&rule.grpc_path))
            .and_then(|()| headers.set("content-type", "application/grpc"))
            .and_then(|()| headers.set("te", "trailers"))
            // The body changes; buffered, the host sets the new length.
            .and_then(|()| headers.remove("content-length"))
            .and_then(|()| x.set_body_mode(Direction::Request, BodyMode::Buffered));
        if let Err(e) = rewrite {
            legate_sdk::error!("grpc-json: rewriting the request head failed: {e}");
            return Action::Respond(json_response(
                500,
                code::INTERNAL,
                "grpc-json: the request could not be transcoded",
                "grpc_json_internal",
            ));
        }
        ctx.matched = Some(m);
        Action::Continue
    }

    fn on_request_body(
        &mut self,
        ctx: &mut Context,
        _x: &Exchange<'_>,
        body: &Body<'_>,
        end_of_stream: bool,
    ) -> Action {
        let Some(m) = &ctx.matched else {
            return Action::Continue;
        };
        if !end_of_stream {
            return Action::Continue;
        }
        // One frame per message: one for a unary call, one per element of the
        // JSON array for a client or bidi stream (none for `[]`).
        let framed = self
            .transcoder
            .request_messages(m, &body.to_vec())
            .and_then(|msgs| {
                msgs.iter().try_fold(Vec::new(), |mut out, msg| {
                    out.extend(codec::frame(msg)?);
                    Ok(out)
                })
            });
        match framed {
            Ok(framed) => match body.replace(framed) {
                Ok(()) => Action::Continue,
                Err(e) => {
                    ctx.matched = None;
                    self.bad_request(&format!("the request message does not fit: {e}"))
                }
            },
            Err(e) => {
                // Answered here: no response of this exchange is transcoded.
                ctx.matched = None;
                self.bad_request(&e)
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
        if ctx.matched.is_none() {
            return Action::Continue;
        }
        let grpc = headers.get_str("content-type").is_some_and(|ct| {
            ct.trim()
                .to_ascii_lowercase()
                .starts_with("application/grpc")
        });
        if !grpc {
            self.metrics.upstream_error.inc();
            let status = x.status().unwrap_or(500);
            if status < 400 {
                // Not gRPC but no error either (a plain HTTP service behind
                // the route): nothing to transcode, it passes as it is.
                return Action::Continue;
            }
            // An error of the host (a dead upstream's 502) or of a proxy on
            // the way: the JSON client gets the same error shape as for a
            // gRPC status, with the page as the message.
            if end_of_stream {
                let code = legate_sdk::rules::grpc::status_of_http(status);
                return Action::Respond(json_response(
                    codec::http_status(code),
                    code,
                    &codec::http_error_message(status, b""),
                    "grpc_json_upstream_error",
                ));
            }
            ctx.not_grpc = Some(status);
            ctx.page_encoded = headers
                .get_str("content-encoding")
                .is_some_and(|v| !v.trim().eq_ignore_ascii_case("identity"));
            if let Err(e) = x.set_body_mode(Direction::Response, BodyMode::Buffered) {
                legate_sdk::error!("grpc-json: buffering a non-gRPC answer failed: {e}");
            }
            return Action::Continue;
        }
        let status = grpc_status(headers);
        let streaming = ctx
            .matched
            .as_ref()
            .and_then(|m| self.transcoder.rules.get(m.rule))
            .is_some_and(|r| r.method.is_server_streaming());
        if end_of_stream {
            // Trailers-only: the status is all there is. For a server stream,
            // OK means no replies (grpc-go answers an empty stream this way).
            if streaming && matches!(status, Some((0, _))) {
                self.metrics.ok.inc();
                return Action::Respond(
                    LocalResponse::new(200)
                        .header("content-type", "application/json")
                        .body("[]"),
                );
            }
            return Action::Respond(match status {
                Some((s, msg)) if s != 0 => {
                    self.metrics.grpc_error.inc();
                    json_response(codec::http_status(s), s, &msg, "grpc_json_grpc_error")
                }
                _ => {
                    self.metrics.upstream_error.inc();
                    json_response(
                        502,
                        code::UNAVAILABLE,
                        "grpc-json: the upstream answered without a message",
                        "grpc_json_upstream_error",
                    )
                }
            });
        }
        ctx.header_status = status;
        ctx.grpc_response = true;
        if streaming {
            // Replies go out as they come, as one JSON array: the head goes
            // now, as a 200 (a later error status can only be a trailer).
            let head = json_head(headers)
                .and_then(|()| headers.remove("content-length"))
                .and_then(|()| x.set_body_mode(Direction::Response, BodyMode::Streamed));
            if let Err(e) = head {
                legate_sdk::error!("grpc-json: streaming the response failed: {e}");
                return untranscodable();
            }
            // The head no longer says gRPC, so the host does not declare the
            // status trailers to an HTTP/1.1 client, and hyper writes only
            // declared ones (docs/config.md, "Trailers to HTTP/1.1 clients"):
            // declared here, a `te: trailers` client sees a failed stream's
            // status. (A host that refuses the write loses only that.)
            if let Err(e) = headers.set("trailer", STREAM_TRAILERS) {
                legate_sdk::debug!("grpc-json: trailers not declared: {e}");
            }
            ctx.stream = Some(Stream::default());
            return Action::Continue;
        }
        if let Err(e) = x.set_body_mode(Direction::Response, BodyMode::Buffered) {
            legate_sdk::error!("grpc-json: buffering the response failed: {e}");
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
        if let (Some(status), true) = (ctx.not_grpc, end_of_stream) {
            let code = legate_sdk::rules::grpc::status_of_http(status);
            // A compressed page's bytes would only garble the message.
            let page = if ctx.page_encoded {
                Vec::new()
            } else {
                body.to_vec()
            };
            let message = codec::http_error_message(status, &page);
            return write_json(
                x,
                body,
                codec::http_status(code),
                codec::error_json(code, &message),
            );
        }
        if let (Some(stream), Some(m)) = (ctx.stream.as_mut(), &ctx.matched) {
            let header_status = if end_of_stream {
                ctx.header_status.take()
            } else {
                None
            };
            return self.stream_body(stream, m.rule, x, body, end_of_stream, header_status);
        }
        if !ctx.grpc_response || !end_of_stream {
            return Action::Continue;
        }
        let Some(m) = &ctx.matched else {
            return Action::Continue;
        };
        let mut status = ctx.header_status.take();
        if let Some(t) = x.trailers(Direction::Response) {
            status = grpc_status(&t).or(status);
            // Emptied, the host ends the response with this body: a JSON
            // client (HTTP/1.1 included) gets no trailers.
            clear(&t);
        }
        let (http, json) = match status {
            Some((0, _)) => {
                let out = codec::deframe(&body.to_vec())
                    .and_then(|payload| self.transcoder.response_json(m.rule, payload));
                match out {
                    Ok(json) => {
                        self.metrics.ok.inc();
                        (200, json)
                    }
                    Err(e) => {
                        self.metrics.upstream_error.inc();
                        legate_sdk::warn!("grpc-json: bad upstream response: {e}");
                        (
                            502,
                            codec::error_json(code::UNAVAILABLE, &format!("grpc-json: {e}")),
                        )
                    }
                }
            }
            Some((s, msg)) => {
                self.metrics.grpc_error.inc();
                (codec::http_status(s), codec::error_json(s, &msg))
            }
            None => {
                self.metrics.upstream_error.inc();
                (
                    502,
                    codec::error_json(
                        code::UNAVAILABLE,
                        "grpc-json: the upstream's response has no grpc-status",
                    ),
                )
            }
        };
        write_json(x, body, http, json)
    }
}

impl GrpcJson {
    /// One chunk of a server-streaming response: the messages it completes,
    /// printed into the JSON array (`[` before the first, `,` between, `]` at
    /// the end). The stream's status comes last, in the trailers: OK removes
    /// them (the response ends with the array); an error keeps `grpc-status`
    /// and `grpc-message` as trailers, as the 200 is already sent. A message
    /// that does not decode resets the exchange (a local response after the
    /// head went out, abi/README.md §3.5): the client must not take a cut
    /// array for the whole answer.
    fn stream_body(
        &self,
        stream: &mut Stream,
        rule: usize,
        x: &Exchange<'_>,
        body: &Body<'_>,
        end_of_stream: bool,
        mut status: Option<(u32, String)>,
    ) -> Action {
        let broken = |why: String| {
            self.metrics.upstream_error.inc();
            legate_sdk::warn!("grpc-json: bad upstream stream: {why}");
            Action::Respond(json_response(
                502,
                code::UNAVAILABLE,
                &format!("grpc-json: {why}"),
                "grpc_json_upstream_error",
            ))
        };
        let mut out = Vec::new();
        let payloads = match stream.frames.push(&body.to_vec()) {
            Ok(p) => p,
            Err(e) => return broken(e),
        };
        for payload in payloads {
            match self.transcoder.response_json(rule, &payload) {
                Ok(json) => {
                    out.push(if stream.messages == 0 { b'[' } else { b',' });
                    out.extend_from_slice(&json);
                    stream.messages += 1;
                }
                Err(e) => return broken(e),
            }
        }
        if end_of_stream {
            if stream.frames.pending() != 0 {
                return broken(format!(
                    "the stream ended inside a message ({} bytes of it)",
                    stream.frames.pending()
                ));
            }
            if let Some(t) = x.trailers(Direction::Response) {
                status = grpc_status(&t).or(status);
                if status.as_ref().is_some_and(|(s, _)| *s == 0) {
                    clear(&t);
                }
            }
            let Some((s, _)) = status else {
                // Ended cleanly but without a status: not known to be whole.
                return broken("the upstream's stream ended without a grpc-status".into());
            };
            if stream.messages == 0 {
                out.push(b'[');
            }
            out.push(b']');
            if let Err(e) = body.replace(out) {
                return broken(format!("writing the JSON array failed: {e}"));
            }
            if s == 0 {
                self.metrics.ok.inc();
            } else {
                self.metrics.grpc_error.inc();
            }
            return Action::Continue;
        }
        match body.replace(out) {
            Ok(()) => Action::Continue,
            Err(e) => broken(format!("writing the JSON array failed: {e}")),
        }
    }
}

/// The `grpc-status` (an unparsable one is UNKNOWN) and percent-decoded
/// `grpc-message` of a response head or trailers, if it has a status.
fn grpc_status(h: &Headers<'_>) -> Option<(u32, String)> {
    let s = h.get_str("grpc-status")?;
    let msg = h.get_str("grpc-message").unwrap_or_default();
    Some((
        s.trim().parse::<u32>().unwrap_or(code::UNKNOWN),
        codec::grpc_message(&msg),
    ))
}

/// Removes every trailer: the host then ends the response with its body.
fn clear(t: &Headers<'_>) {
    for (name, _) in &t.entries() {
        if let Err(e) = t.remove(name) {
            legate_sdk::warn!("grpc-json: removing trailer {name} failed: {e}");
        }
    }
}

/// Writes the JSON answer over the held (buffered) response: body, status,
/// `content-type`, no gRPC fields; the host sets the length.
fn write_json(x: &Exchange<'_>, body: &Body<'_>, http: u16, json: Vec<u8>) -> Action {
    let written = body
        .replace(json)
        .and_then(|()| x.set_status(http))
        .and_then(|()| match x.headers(Direction::Response) {
            Some(h) => json_head(&h),
            None => Ok(()),
        });
    match written {
        Ok(()) => Action::Continue,
        Err(e) => {
            legate_sdk::error!("grpc-json: writing the JSON response failed: {e}");
            untranscodable()
        }
    }
}

/// A response head turned JSON: `content-type`, no gRPC fields (the status
/// was read before) and no `content-encoding` (the body was replaced).
fn json_head(h: &Headers<'_>) -> Result<(), legate_sdk::Error> {
    h.set("content-type", "application/json")
        .and_then(|()| h.remove("content-encoding"))
        .and_then(|()| h.remove("grpc-status"))
        .and_then(|()| h.remove("grpc-message"))
        .and_then(|()| h.remove("grpc-encoding"))
        .and_then(|()| h.remove("grpc-accept-encoding"))
}

/// The answer when the host refused a rewrite of the response (a bug).
fn untranscodable() -> Action {
    Action::Respond(json_response(
        502,
        code::UNAVAILABLE,
        "grpc-json: the response could not be transcoded",
        "grpc_json_upstream_error",
    ))
}

legate_sdk::export!(GrpcJson);
