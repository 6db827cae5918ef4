//! The HTTP exchange ([`Exchange`]): the request line, the response status,
//! the other message parts and typed properties (addresses, TLS, route,
//! request id, timing).

use std::cell::Cell;
use std::net::SocketAddr;

use crate::backend::ExchangeHandle;
use crate::headers::{Body, Headers};
use crate::types::{BodyMode, Direction, HttpVersion, TlsVersion};
use crate::Error;

/// One request/response exchange, passed to every phase. Setters follow the
/// ABI's write windows: outside them they return `Error::InvalidState`.
pub struct Exchange<'a>(pub(crate) ExchangeHandle<'a>, Cell<bool>);

impl<'a> Exchange<'a> {
    pub(crate) fn new(h: ExchangeHandle<'a>) -> Self {
        Exchange(h, Cell::new(false))
    }

    /// Whether [`detach`](Self::detach) succeeded during this call (for the
    /// dispatcher, which then ends the context).
    pub(crate) fn was_detached(&self) -> bool {
        self.1.get()
    }
}

impl Exchange<'_> {
    /// The request method, e.g. `"GET"`.
    pub fn method(&self) -> String {
        self.0.method()
    }
    /// Change the method. Errors: `InvalidArgument` (not a token), `InvalidState`.
    pub fn set_method(&self, method: &str) -> Result<(), Error> {
        self.0.set_method(method)
    }
    /// Path and query as sent on the wire (`"/a/b?x=1"`).
    pub fn path(&self) -> String {
        self.0.path()
    }
    /// Change the path. Errors: `InvalidArgument` (must start with `/`; no CR,
    /// LF, NUL, space or `#`), `InvalidState`.
    pub fn set_path(&self, path: &str) -> Result<(), Error> {
        self.0.set_path(path)
    }
    /// `"http"` or `"https"`.
    pub fn scheme(&self) -> String {
        self.0.scheme()
    }
    /// Host and optional port.
    pub fn authority(&self) -> String {
        self.0.authority()
    }
    /// Change the authority. Errors: `InvalidArgument`, `InvalidState`.
    pub fn set_authority(&self, authority: &str) -> Result<(), Error> {
        self.0.set_authority(authority)
    }
    /// The downstream HTTP version.
    pub fn http_version(&self) -> HttpVersion {
        self.0.http_version()
    }
    /// The response status; `None` before a response head exists.
    pub fn status(&self) -> Option<u16> {
        self.0.status()
    }
    /// Change the response status. Errors: `InvalidArgument` (outside
    /// 200..=599), `InvalidState`.
    pub fn set_status(&self, status: u16) -> Result<(), Error> {
        self.0.set_status(status)
    }
    /// The header map of `direction`; `None` if that head does not exist yet.
    ///
    /// The handle lives as long as this borrow of the exchange, so within the
    /// call: the host refuses (traps) a handle used after its call, so one
    /// cannot be kept in a context for a later call.
    ///
    /// ```compile_fail
    /// # use legate_sdk::{Direction, Exchange, Headers};
    /// struct Kept<'a> { h: Option<Headers<'a>> }
    /// fn keep(x: &Exchange<'_>) -> Kept<'static> {
    ///     Kept { h: x.headers(Direction::Request) }
    /// }
    /// ```
    pub fn headers(&self, direction: Direction) -> Option<Headers<'_>> {
        self.0.headers(direction).map(Headers)
    }
    /// The body data the host currently holds for `direction`; `None` if none.
    /// Like [`Exchange::headers`], for this call only.
    pub fn body(&self, direction: Direction) -> Option<Body<'_>> {
        self.0.body(direction).map(Body)
    }
    /// The trailer map of `direction`; `None` if there are none (yet). Like
    /// [`Exchange::headers`], for this call only.
    pub fn trailers(&self, direction: Direction) -> Option<Headers<'_>> {
        self.0.trailers(direction).map(Headers)
    }
    /// Override the declared body mode of `direction` for this exchange, before
    /// its first body call. Errors: `InvalidState` (too late, or that body
    /// phase was not declared).
    pub fn set_body_mode(&self, direction: Direction, mode: BodyMode) -> Result<(), Error> {
        self.0.set_body_mode(direction, mode)
    }
    /// This filter needs no more calls for this exchange: the host calls none
    /// of its phases, `on_log` or `on_done` for it again. When the current
    /// phase method returns, the SDK passes the exchange's context to
    /// [`HttpFilter::on_done`](crate::HttpFilter::on_done) and drops it, so the
    /// filter still sees every context end exactly once. The action the phase
    /// returns still applies. Use it as soon as an exchange turns out to be
    /// none of the filter's business: each phase call skipped saves a guest
    /// entry (a few µs). Errors: `InvalidState` (a callout of this exchange is
    /// outstanding, or called from `on_log`); after it, sending a callout for
    /// this exchange is `InvalidState`.
    pub fn detach(&self) -> Result<(), Error> {
        self.0.detach()?;
        self.1.set(true);
        Ok(())
    }
    /// The client: the downstream peer or, on a listener with
    /// `http.xff_num_trusted_hops`, the address its trusted proxies reported in
    /// `x-forwarded-for` (port 0), as Envoy's downstream remote address.
    pub fn source_address(&self) -> SocketAddr {
        self.0.source_address()
    }
    /// The local address the connection was accepted on.
    pub fn destination_address(&self) -> SocketAddr {
        self.0.destination_address()
    }
    /// The TLS version; `None` for plaintext.
    pub fn tls_version(&self) -> Option<TlsVersion> {
        self.0.tls_version()
    }
    /// The SNI the client sent, if any.
    pub fn tls_sni(&self) -> Option<String> {
        self.0.tls_sni()
    }
    /// Whether the client presented a verified certificate.
    pub fn tls_peer_certificate_presented(&self) -> bool {
        self.0.tls_peer_certificate_presented()
    }
    /// The verified client certificate's subject (RFC 4514).
    pub fn tls_peer_subject(&self) -> Option<String> {
        self.0.tls_peer_subject()
    }
    /// The route selected for the current request head; `None` if none matches.
    pub fn route_name(&self) -> Option<String> {
        self.0.route_name()
    }
    /// The upstream cluster the request goes to; `None` for direct responses.
    pub fn cluster(&self) -> Option<String> {
        self.0.cluster()
    }
    /// The upstream endpoint of the last attempt.
    pub fn upstream_address(&self) -> Option<SocketAddr> {
        self.0.upstream_address()
    }
    /// The exchange's `x-request-id`.
    pub fn request_id(&self) -> String {
        self.0.request_id()
    }
    /// When the request head was received (Unix nanoseconds).
    pub fn start_time(&self) -> u64 {
        self.0.start_time()
    }
    /// The access-log cause once the exchange failed (e.g.
    /// `upstream_connect_failure`) or a filter answered it locally
    /// (`plugin:<details>`); `None` for an upstream's response.
    pub fn cause(&self) -> Option<String> {
        self.0.cause()
    }
}
