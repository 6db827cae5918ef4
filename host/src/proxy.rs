//! The HTTP request path: route → (local answer | cluster) → attempts with retries
//! and timeouts → response headers → stats and access log.
//!
//! ```text
//! request ─► proxy headers ─► router ─► direct/redirect ───────────────┐
//!                                    └► cluster ─► LB pick ─► pool ─► upstream
//!                                          ▲  retry (other endpoint)   │
//!                                          └──── 5xx/reset/timeout ◄───┤
//! response ◄─ header ops, via ◄─ hop-by-hop strip ◄─────────────────────┘
//! ```
//! The filter chain ([`crate::filter`], Wasm plugins) runs between the request id and
//! the router (request headers, in chain order) and after the response header
//! handling (response headers, in reverse); a filter's local response takes the
//! place of the upstream's and gets the same response header handling, and the
//! host's own answer to an error after the request phases goes through the
//! response phases too ([`local_reply`]). Filters'
//! callouts go through [`PoolCallouts`]: the worker's upstream pool and the
//! exchange's config snapshot. Bodies go through the chain only when a filter
//! declared a body or trailers phase for that direction ([`request_body`],
//! [`response_body`]): buffered (read whole under the plugin's cap, head held) or
//! streamed ([`body::Filtered`]); otherwise they stream straight through.
//!
//! The route timeout bounds the attempts together and the per-try timeout each,
//! up to the response head, from when the request has gone upstream whole (as
//! Envoy's): for a body streamed as the client sends it, from its end
//! ([`BodySent`]), so a slow upload is the stream idle timeout's
//! ([`crate::idle`]), never a 504 nor its endpoint's timeout.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame};
use hyper::body::Incoming;
use rand::Rng;

use crate::access_log;
use crate::body::{self, Body, BoxError, Limit, Watch, Watched};
use crate::config::UnderscoreHeaders;
use crate::connection::ConnCtx;
use crate::error::{Kind, ProxyError, Side};
use crate::filter::{self, ConnFacts, Exchange, TlsFacts};
use crate::idle;
use crate::local_reply;
use crate::proxy_headers;
use crate::router::{Action, Matched, RetryPolicy, RouteInput};
use crate::server::ClusterEntry;
use crate::upstream::Target;
use crate::worker::RouteStats;

/// The access log's cause (and `on-log`'s) for a route's own answer, a
/// `direct_response` or a `redirect`: Envoy's response code details for both.
const DIRECT_RESPONSE: &str = "direct_response";

/// A route's `health` answer: the access log's cause.
const HEALTH_CHECK: &str = "health_check";

/// A route's `health` answer now ([`crate::router::HealthCheck`]).
fn health_reply(
    conn: &ConnCtx,
    snapshot: &crate::server::Snapshot,
    h: &crate::router::HealthCheck,
) -> Response<Bytes> {
    let shared = &conn.worker.shared;
    let (status, body) = h.answer(
        shared.is_draining() || shared.is_health_check_failed(),
        snapshot.warming().next().is_some(),
        |name| {
            snapshot.clusters.get(name).map(|c| {
                let stats = &c.cluster().stats;
                (
                    stats
                        .membership_healthy
                        .load(std::sync::atomic::Ordering::Relaxed),
                    stats
                        .membership_total
                        .load(std::sync::atomic::Ordering::Relaxed),
                )
            })
        },
    );
    let mut resp = Response::new(Bytes::from_static(body.as_bytes()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    // A balancer must not be answered from a cache.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
/// The access log's cause for a CORS preflight Legate answered.
const CORS_PREFLIGHT: &str = "cors_preflight";

/// What the access log and stats learn about a request as it goes.
#[derive(Default)]
struct Outcome {
    route: Option<Arc<crate::router::RouteId>>,
    cluster: Option<String>,
    upstream: Option<SocketAddr>,
    attempts: u32,
    cause: Option<&'static str>,
    request_id: Option<HeaderValue>,
    /// The filter chain run of this exchange, finished (log, done) with it; shared
    /// with the body streams that run body phases.
    chain: Option<filter::SharedChain>,
    /// What `x-legate-debug` reports (`debug.on`: it was asked for, trusted).
    debug: DebugFacts,
    /// A response entered the response path ([`response_filters`]): a later
    /// error is answered without the filters (see [`local_reply`]).
    responding: bool,
    /// The upstream attempt in flight (see [`Attempts::run`]): counted as active
    /// (`upstream_rq_active`, `max_requests`, `least_request`) until the response
    /// body ends or is dropped, with `Done`, which owns this; after a `101`,
    /// until the tunnel closes (its task takes it).
    active: Option<crate::cluster::ActiveRequest>,
    /// The stream idle timeout's clock ([`crate::idle`]): the matched route
    /// sets its timeout, `Done` reads whether it ended the request.
    idle: Option<Rc<idle::Clock>>,
    /// The path and query in their normal form, when normalizing changed them:
    /// what the access log shows (as Envoy's `:path`), before any route rewrite.
    normalized_path: Option<String>,
    /// A buffering filter read the request body whole: it goes upstream from
    /// memory, so the route and per-try timeouts start with the attempts, not
    /// at its end (see [`BodySent`]).
    body_read: bool,
    /// A filter answered the request locally (`plugin:<details>`) or the route
    /// did ([`DIRECT_RESPONSE`]): the access log's cause (abi/README.md §3.5)
    /// when the host gave none.
    local: Option<String>,
    /// The CORS policy that allowed the request's origin: its response gets
    /// the policy's headers ([`crate::cors`]).
    cors: Option<crate::cors::Allowed>,
    /// The route has a CORS policy: its answers vary by `origin`.
    cors_route: bool,
    /// The route turned the listener's compression off (`compression: false`).
    uncompressed: bool,
    /// The client's fault that failed its request body, if one did.
    client_fault: body::ClientFault,
    /// The client trusted proxies reported (`xff_num_trusted_hops`), if not
    /// the peer: as Envoy's downstream remote address, what `hash_on:
    /// {source_ip}` hashes and the access log's `client`, as filters see it.
    client: Option<std::net::IpAddr>,
    /// The request is gRPC, as it arrived: local replies take gRPC's form
    /// ([`crate::local_reply`]).
    grpc: bool,
    /// The body byte counters the filters read as they run (proxy-wasm's
    /// `request.size`, `response.size`): the request's (`InFlight::received`)
    /// and, with a filter chain, the response's, which `Done` keeps.
    body_bytes: filter::BodyBytes,
    /// The request named no authority (an HTTP/1.0 request without `Host`)
    /// and was routed by the address it reached ([`authority_of`]): the
    /// access log's `authority` is that address.
    local_authority: bool,
    /// The exchange was upgraded (a `101`) and its tunnel spliced: its line
    /// and latency wait for the tunnel's end ([`TunnelEnd`]).
    tunnel: Option<Rc<TunnelEnd>>,
    /// The request is an HTTP/2 extended CONNECT ([`extended_connect`]).
    extended_connect: bool,
    /// Why the upstream connection's TLS failed, when that failed the
    /// request: the access log's `upstream_transport_failure_reason`.
    transport_failure: Option<String>,
    /// When the upstream's response head arrived: the access log's
    /// `response_duration_ms` and the debug headers' `first-byte` (taken
    /// only when either wants it).
    upstream_head_at: Option<Instant>,
    /// The sticky cookie made for this request (`hash_on.cookie_ttl`), for
    /// its upstream response's `Set-Cookie`.
    set_cookie: Option<HeaderValue>,
    /// The span of a sampled request ([`crate::trace`]), reported by `Done`.
    trace: Option<Box<crate::trace::Active>>,
}

/// Timings and facts of the debug headers ([`crate::overrides::Debug`]).
#[derive(Default)]
struct DebugFacts {
    on: bool,
    request_filters: Option<Duration>,
    response_filters: Option<Duration>,
    connection: Option<crate::upstream::ConnectionUse>,
}

/// Handles one downstream request. Never fails: errors become responses here.
pub async fn handle(
    conn: Rc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    conn.activity.request_started();
    conn.listener.stats.rq_active.inc();
    let version = req.version();
    // hyper's HTTP/1.1 server sends trailers only to a request that allows them.
    let trailers_allowed =
        version == Version::HTTP_11 && proxy_headers::te_allows_trailers(req.headers());
    // Turned into `Done` once the response exists; if the client goes away
    // first (hyper drops this future, e.g. while a filter is paused), its drop
    // ends the request as a 499 `downstream_disconnect`, logged and counted.
    // What only the access log needs, taken only when there is one.
    let logged = conn
        .listener
        .access_log
        .as_ref()
        .map(|log| Box::new(Logged::of(&req, log.wants())));
    // The request body's bytes: the access log's `bytes_received`, and the
    // filters' request size without a `content-length` (proxy-wasm's
    // `request.size`). A request without a body has none to count.
    let received =
        (logged.is_some() || !req.body().is_end_stream()).then(filter::ByteCount::default);
    // An HTTP/1.1 upgrade (WebSocket; `h2c` is served as a plain request):
    // the client may send the other protocol right after its head, so an
    // answer other than a 101 — a refusal, an error, a filter's or the
    // upstream's own — closes the connection, lest those bytes be read as
    // the next request (smuggled past the route that answered).
    let tunnel_asked = is_upgrade(&req) && !offers_h2c(req.headers());
    // RFC 8441: an HTTP/2 extended CONNECT (`http.extended_connect`), made
    // the upgrade it asks for; its stream is the tunnel.
    let mut req = req;
    let extended = extended_connect(&mut req);
    // An HTTP/1.1 CONNECT (refused: see `proxy`): the client may send tunnel
    // bytes right after its head, so the refusal closes the connection too.
    let connect_h1 = req.method() == Method::CONNECT && version < Version::HTTP_2;
    // Read before the request goes on; a listener without compression reads nothing.
    let coding = conn
        .listener
        .cfg
        .http
        .as_ref()
        .and_then(|h| h.compression.as_ref())
        .and_then(|c| crate::compress::accepted(req.headers(), c));
    let mut in_flight = InFlight {
        conn: Some(conn.clone()),
        start,
        method: req.method().clone(),
        path: path_of(req.uri()),
        version,
        out: Outcome {
            body_bytes: filter::BodyBytes {
                received: received.clone(),
                sent: None,
            },
            ..Outcome::default()
        },
        logged,
        received: received.clone(),
    };
    let out = &mut in_flight.out;
    // The stream idle timeout: the listener's until a route sets its own.
    let listener_idle = conn.listener.cfg.http.as_ref().and_then(|h| {
        let t = h.stream_idle_timeout.get();
        (!t.is_zero()).then_some(t)
    });
    let clock = idle::Clock::new(tokio::time::Instant::from_std(start), listener_idle);
    out.idle = Some(clock.clone());
    // A request body's frames are activity (a body-less request has none).
    let req = req.map(|b| {
        if b.is_end_stream() {
            body::boxed(b)
        } else {
            body::boxed(Watched::new(
                b,
                ClientBody(idle::Activity(clock.clone()), received),
            ))
        }
    });
    out.extended_connect = extended;
    let upgrade = tunnel_asked || extended;
    let mut resp = match idle::within(proxy(&conn, req, out, upgrade), &clock).await {
        Some(Ok(r)) => r,
        Some(Err(e)) => local_reply(&conn, out, e, version).await,
        None => {
            // Idle before the response head (the request future is dropped:
            // its upstream attempt with it): 408, as Envoy. A filter that held
            // the chain then lost it with the future: the reply goes without
            // the filters.
            out.active = None;
            if out.chain.as_ref().is_some_and(|c| chain_out(c).is_err()) {
                out.responding = true;
            }
            let e = ProxyError::new(
                Kind::StreamIdleTimeout,
                "no activity on the stream before the response head",
            );
            local_reply(&conn, out, e, version).await
        }
    };
    if extended && resp.status().is_success() && out.tunnel.is_none() {
        // On an extended CONNECT stream a 2xx opens the tunnel (RFC 8441 §5;
        // hyper sends it as one): only the upstream's switch may answer so.
        // A direct response or a filter's local one of 2xx cannot.
        let e = ProxyError::new(
            Kind::UpgradeUnsupported,
            format!(
                "a {} answer to an upgrade that was not switched",
                resp.status().as_u16()
            ),
        );
        conn.listener.stats.upgrades_failed.inc();
        resp = local_reply(&conn, out, e, version).await;
    }
    if (tunnel_asked && resp.status() != StatusCode::SWITCHING_PROTOCOLS) || connect_h1 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(chain) = &out.chain {
        // The head goes to the client now: a filter's local response between
        // phases can only reset the stream from here on, so the body watches
        // for one (when a filter may send one).
        chain.head_sent();
        if !resp.body().is_end_stream() && chain.may_answer_late() {
            let chain = chain.clone();
            resp = resp.map(|b| body::boxed(body::Cuttable::new(b, chain)));
        }
    }
    // A filter reset the stream (proxy-wasm's `proxy_close_stream`): the
    // connection resets it instead of sending this answer.
    if out
        .chain
        .as_ref()
        .is_some_and(filter::SharedChain::was_reset)
    {
        resp.extensions_mut().insert(filter::StreamReset);
    }
    if let Some(id) = out.request_id.as_ref().filter(|_| {
        conn.listener
            .cfg
            .http
            .as_ref()
            .is_some_and(|h| h.request_id_in_response)
    }) {
        // Every answer, the upstream's and Legate's own, after the filters:
        // the id the logs and the upstream saw.
        resp.headers_mut()
            .insert(proxy_headers::X_REQUEST_ID, id.clone());
    }
    if out.debug.on {
        // Here, after the response filters, so that every answer (upstream, local,
        // error) gets them the same way and no filter changes them.
        add_debug_headers(&conn, out, start, resp.headers_mut());
    }
    if let Some((policy, origin)) = out.cors.take() {
        // Whatever answered (the upstream, a filter, an error): the browser
        // may read it.
        policy.respond(&origin, resp.headers_mut());
    } else if out.cors_route {
        crate::cors::vary_origin(resp.headers_mut());
    }
    if let Some(c) = conn
        .listener
        .cfg
        .http
        .as_ref()
        .and_then(|h| h.compression.as_ref())
        .filter(|_| !out.uncompressed)
    {
        // After the filters: a filter reads and writes the body as the
        // upstream sent it, and its own answers are compressed too.
        crate::compress::apply(
            c,
            &conn.listener.stats.compression,
            &in_flight.method,
            coding,
            &mut resp,
        );
    }
    if trailers_allowed {
        declare_trailers(&in_flight.method, &mut resp);
    }
    if in_flight.method == Method::HEAD && !resp.body().is_end_stream() {
        // A response to HEAD has no content (RFC 9110 §9.3.2), but the
        // host's own answers (a direct response, an error, a filter's) come
        // with the body a GET gets: hyper's HTTP/1.1 server leaves it out,
        // its HTTP/2 server would send it (and the client reset the stream).
        // The length stays the one a GET gets.
        let h = resp.headers();
        if !h.contains_key(header::CONTENT_LENGTH) && !h.contains_key(header::TRANSFER_ENCODING) {
            if let Some(n) = resp.body().size_hint().exact() {
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            }
        }
        *resp.body_mut() = body::empty();
    }
    if bodiless(resp.status()) && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // A response filter that turned a response into a 204 or 304 leaves its
        // body behind: hyper's HTTP/2 server would send it (and the client reset
        // the stream). 204 and 1xx carry no `content-length` either (RFC 9110
        // §8.6); a 304's is the length a GET would get, kept.
        if !resp.body().is_end_stream() {
            *resp.body_mut() = body::empty();
        }
        if resp.status() != StatusCode::NOT_MODIFIED {
            resp.headers_mut().remove(header::CONTENT_LENGTH);
        }
    }
    // After the head, the idle timer runs in the future hyper sends the
    // response from (the HTTP/1.1 connection, the HTTP/2 stream's task), which
    // is polling this one now; the body's frames are activity. An
    // ended body or a disabled timeout needs no timer; an upgraded connection
    // has its own idle bound, the 408 of a stream that went idle before its
    // head none.
    let guard = !resp.body().is_end_stream()
        && clock.enabled()
        && !clock.expired()
        && resp.status() != StatusCode::SWITCHING_PROTOCOLS;
    if version < Version::HTTP_2
        && resp.status() == StatusCode::NOT_MODIFIED
        && resp.body().is_end_stream()
        && one_valid_length(resp.headers())
    {
        // A 304 keeps its `content-length` (RFC 9110 §8.6, as Envoy and
        // nginx pass it): hyper's HTTP/1.1 server would drop it.
        *resp.body_mut() = body::unannounced_empty();
    }
    // What tells a body the client took whole from one it left mid-way
    // (`Done::cut_short`): the framing the head promises.
    let framing = Framing::of(&in_flight.method, &resp);
    let mut done = in_flight.done(resp.status()).map(|d| d.framed(framing));
    if let Some(d) = &mut done {
        d.log_response_fields(resp.headers());
    }
    if let Some(end) = done.as_mut().and_then(|d| d.out.tunnel.take()) {
        // An upgraded exchange ends with its tunnel, as Envoy's stream (and
        // nginx's line, written at the close): its line, latency and bytes
        // wait for the splice to end. An HTTP/1.1 connection no longer
        // carries a request: its idle timeout watches the tunnel's bytes from
        // here. An HTTP/2 tunnel is one of the connection's streams, in
        // flight until it ends (the connection is not idle meanwhile).
        let h1 = version < Version::HTTP_2;
        if h1 {
            conn.activity.request_finished();
        }
        if let Some(mut d) = done.take() {
            d.connection_told = h1;
            // Its bytes are the tunnel's (an HTTP/2 one opens with a 200 and
            // no body): a tunnel that ends is not a response cut short.
            d.framing = Framing::Bodiless;
            d.finish_filters();
            end.hold(d);
        }
    }
    Ok(match done {
        Some(done) if guard => {
            clock.touch();
            // (Always there: every request is polled inside one.)
            if let Some(slot) = conn.streams.slot() {
                slot.watch(clock.clone());
            }
            resp.map(|b| body::boxed(Watched::new(idle::Guarded::new(b, clock), done)))
        }
        Some(done) => resp.map(|b| body::boxed(Watched::new(b, done))),
        // (Not reached: the request is in flight until here.)
        None => resp,
    })
}

/// The trailers of a response body a filter buffered whole (an extension of
/// the response): what [`declare_trailers`] names.
#[derive(Clone)]
struct KnownTrailers(http::HeaderMap);

/// Names in the response's `Trailer` the trailer fields that may end it, for
/// hyper's HTTP/1.1 server, which writes only those (to a client that allowed
/// trailers): if the response goes chunked (no `content-length`, a body of
/// unknown length), the trailers of a body a filter buffered, else gRPC's
/// ([`proxy_headers::declare_trailers`]).
fn declare_trailers(method: &Method, resp: &mut Response<Body>) {
    let known = resp.extensions_mut().remove::<KnownTrailers>();
    let status = resp.status();
    let body = resp.body();
    let chunked = *method != Method::HEAD
        && !status.is_informational()
        && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
        && !resp.headers().contains_key(header::CONTENT_LENGTH)
        && !body.is_end_stream()
        && body.size_hint().exact().is_none();
    if chunked {
        let grpc = local_reply::is_grpc(resp.headers());
        proxy_headers::declare_trailers(resp.headers_mut(), known.as_ref().map(|k| &k.0), grpc);
    }
}

/// The host's own answer to a failed request (error.rs picks the status). Once
/// the request phases ran and before any response reached the filters, it goes
/// through the response phases of the filters that took part, as an upstream
/// response does (Envoy's local reply through the encoder filters), so a filter
/// can add headers to a 502 or turn it into its protocol's error. An error of
/// the response path itself (a response phase failed, a response body over a
/// cap) is sent as it is, as Envoy sends a direct local reply then: a reply
/// never enters filters that already saw a response of this exchange.
async fn local_reply(
    conn: &ConnCtx,
    out: &mut Outcome,
    e: ProxyError,
    version: Version,
) -> Response<Body> {
    if e.kind != Kind::NoRoute {
        tracing::debug!(listener = %conn.listener.name, "request failed: {e}");
    }
    // A filter's reset (proxy-wasm `proxy_close_stream`) is logged with
    // Envoy's details for it, not as a client's.
    let reset = e.kind == Kind::DownstreamReset
        && out
            .chain
            .as_ref()
            .is_some_and(filter::SharedChain::was_reset);
    out.cause = Some(if reset {
        filter::RESET_CAUSE
    } else {
        e.cause()
    });
    out.transport_failure.clone_from(&e.transport_failure);
    let mut r = local_reply::reply(e.to_response(), out.grpc && e.kind != Kind::DownstreamReset);
    // The client is gone: nobody reads this answer, it only names the cause.
    if out.chain.is_some() && !out.responding && e.kind != Kind::DownstreamReset {
        r = match response_filters(out, r).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(listener = %conn.listener.name, "local reply failed: {e}");
                out.cause = Some(e.cause());
                local_reply::reply(e.to_response(), out.grpc)
            }
        };
    }
    if matches!(e.kind, Kind::BadRequest | Kind::NotImplemented) && version < Version::HTTP_2 {
        // The rest of the byte stream cannot be trusted to frame requests
        // (an upgrade answered otherwise than by a 101: see `handle`; a
        // transfer coding Legate does not take, whose body the next request
        // would be read from, as nginx closes after its 501).
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Adds the `x-legate-debug-*` headers and counts the debug response.
fn add_debug_headers(conn: &ConnCtx, out: &Outcome, start: Instant, h: &mut http::HeaderMap) {
    conn.listener.stats.debug_responses.inc();
    let d = &out.debug;
    let debug = crate::overrides::Debug {
        route: out.route.as_ref().map(|r| &*r.name),
        cluster: out.cluster.as_deref(),
        endpoint: out.upstream,
        attempts: out.attempts,
        connection: d.connection,
        request_filters: d.request_filters,
        first_byte: out
            .upstream_head_at
            .map(|t| t.saturating_duration_since(start)),
        response_filters: d.response_filters,
        total: start.elapsed(),
        cause: out.cause,
    };
    crate::overrides::debug_headers(h, &debug);
}

/// What routes read of a request's connection ([`RouteInput`]), for the
/// matches of one request.
struct Downstream<'c> {
    https: bool,
    client_cert: Option<&'c crate::tls::PeerCert>,
    client_ip: std::net::IpAddr,
}

impl<'c> Downstream<'c> {
    fn input<'a>(&self, req: &'a Request<Body>, authority: &'a str) -> RouteInput<'a>
    where
        'c: 'a,
    {
        RouteInput {
            method: req.method(),
            uri: req.uri(),
            authority,
            headers: req.headers(),
            scheme_https: self.https,
            client_cert: self.client_cert,
            client_ip: self.client_ip,
        }
    }
}

/// `upgrade`: the request asks for a protocol upgrade (WebSocket; not `h2c`,
/// which is served as a plain request), as [`handle`] decided it.
async fn proxy(
    conn: &ConnCtx,
    mut req: Request<Body>,
    out: &mut Outcome,
    upgrade: bool,
) -> Result<Response<Body>, ProxyError> {
    let listener = &conn.listener;
    let Some(http) = &listener.cfg.http else {
        return Err(ProxyError::new(
            Kind::Internal,
            "HTTP request on a non-HTTP listener",
        ));
    };
    out.grpc = local_reply::is_grpc(req.headers());
    check_framing(&req, &listener.cfg.limits)?;
    if http.headers_with_underscores != UnderscoreHeaders::Allow {
        underscore_headers(req.headers_mut(), http.headers_with_underscores, listener)?;
        if !req.body().is_end_stream() {
            // Trailers come after the head went on: checked as they pass.
            let watch = UnderscoreTrailers {
                reject: http.headers_with_underscores == UnderscoreHeaders::Reject,
                dropped: listener.stats.underscore_headers_dropped.clone(),
                rejected: listener.stats.underscore_headers_rejected.clone(),
                fault: out.client_fault.clone(),
            };
            req = req.map(|b| body::boxed(body::Watched::new(b, watch)));
        }
    }
    if req.method() == Method::CONNECT {
        // No route tunnels CONNECT (HTTP/1.1's, or HTTP/2's without
        // `:protocol`; an extended one was made an upgrade in `handle`):
        // Envoy answers 404 when no route has a `connect_matcher`. Routed as
        // a plain request, it went upstream as `CONNECT / HTTP/1.1` and its
        // 200 looked like an open tunnel to the client.
        return Err(ProxyError::new(
            Kind::NoRoute,
            "CONNECT: no route tunnels it",
        ));
    }
    // Before anything reads the path (the upgrade decision, filters, routes), so
    // that they and the upstream all see the same one.
    out.normalized_path = normalize_path(&mut req, http, listener)?;
    let snapshot = listener.snapshot(&conn.worker.shared.snapshot);
    let table = snapshot
        .route_tables
        .get(&http.routes.value)
        .ok_or_else(|| {
            ProxyError::new(
                Kind::Internal,
                "route table missing from the config snapshot",
            )
        })?;

    let (authority, local_authority) = authority_of(&req, conn.reached())?;
    out.local_authority = local_authority;
    let https = conn.tls.is_some();
    let client_cert = conn.tls.as_ref().and_then(|t| t.peer.as_deref());
    let trusted = http.trust_downstream;
    // `Upgrade: h2c` is never tunnelled: its upgrade headers go and it is
    // proxied as a plain request, as Envoy's HTTP/1 codec does (a tunnel would
    // let the client speak HTTP/2 to the upstream past the routes and filters).
    let h1 = req.version() < Version::HTTP_2;
    strip_h2c(req.headers_mut(), h1);
    if !h1 {
        join_cookies(req.headers_mut());
    }
    // A protocol upgrade (WebSocket) is read before its headers go with the
    // other hop-by-hop ones; they are set again for the upstream hop.
    let upgrade_token = if upgrade {
        upgrade_value(req.headers())
    } else {
        None
    };
    // The client a trusted chain of proxies reported, read before this hop
    // appends the peer (validation ties the hops to `trust_downstream`).
    let client = proxy_headers::trusted_client(req.headers(), http.xff_num_trusted_hops);
    out.client = client;
    let downstream = Downstream {
        https,
        client_cert,
        client_ip: client.unwrap_or(conn.peer.ip()),
    };
    // A route with `tracing: false` is decided on the route the request
    // matches as it arrives, before filters (as a CORS preflight is); only
    // tables with such a route pay for the match.
    let traced = snapshot.config.tracing.as_ref().filter(|_| {
        !table.has_untraced()
            || table
                .route(&downstream.input(&req, &authority))
                .is_none_or(|m| m.route.tracing)
    });
    let ov = {
        // Sanitised before filters and routes see the request (as Envoy's
        // connection manager does): hop-by-hop headers out first, so that a
        // client's `Connection: x-request-id` (or a header a filter adds) is
        // not stripped after the fact; then the forwarding facts a client
        // must not choose (untrusted downstream) and the request id. Kept for
        // them: an upgrade's `Upgrade` and `Connection: upgrade` (a route may
        // match on them), and `Proxy-Authorization` (credentials for this
        // proxy, which a filter may check); both leave before the upstream.
        let h = req.headers_mut();
        proxy_headers::strip_hop_by_hop_but(h, Some(&header::PROXY_AUTHORIZATION));
        if let Some(token) = &upgrade_token {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, token.clone());
        }
        proxy_headers::set_forwarded(h, &conn.forwarded_for, https, &authority, trusted);
        // `x-forwarded-client-cert` as `forward_client_cert` says; from an
        // untrusted downstream `set_forwarded` removed it already, which is
        // all `sanitize` does (one lookup less at the edge).
        if trusted || http.forward_client_cert != crate::config::ForwardClientCert::Sanitize {
            let mtls = conn.tls.as_ref().filter(|t| t.peer.is_some());
            proxy_headers::forward_client_cert(h, http.forward_client_cert, mtls.is_some(), || {
                conn.xfcc
                    .get_or_init(|| {
                        mtls.and_then(|t| {
                            proxy_headers::xfcc_element(t, http.set_client_cert_details.as_ref())
                        })
                    })
                    .clone()
            });
        }
        out.request_id = proxy_headers::request_id(h, trusted, http.generate_request_id);
        out.trace = crate::trace::begin(h, traced, &conn.worker.shared.tracer, https, &authority);
        crate::overrides::take(h, trusted)
    };
    out.debug.on = ov.debug;
    if let Some(token) = &upgrade_token {
        // Decided on the route the request matches as it came in, before filters
        // (Envoy decides when it creates the filter chain); without a route, by
        // the listener's list (a filter may still route it). The route it is
        // forwarded on is checked again below, in case a filter moved it.
        let input = downstream.input(&req, &authority);
        let m = table.route(&input);
        if let Err(e) = check_upgrade(token, m.as_ref().map(|m| m.route), http, &listener.stats) {
            out.route = m.as_ref().map(|m| m.route.id.clone());
            return Err(routed_error(e, m.as_ref(), http.via.as_deref()));
        }
    }
    if table.has_health() && matches!(*req.method(), Method::GET | Method::HEAD) {
        // Before the filters, as Envoy's health check filter comes first: a
        // balancer's probe carries no credentials for an auth plugin.
        let input = downstream.input(&req, &authority);
        if let Some(m) = table.route(&input) {
            if let Action::Health(h) = &m.route.action {
                out.route = Some(m.route.id.clone());
                out.uncompressed = !m.route.compression;
                out.cors_route = m.cors().is_some();
                out.cors = m.cors().and_then(|p| p.check(&req));
                out.local = Some(HEALTH_CHECK.to_string());
                let resp = health_reply(conn, &snapshot, h);
                return route_reply(out, &m, http.via.as_deref(), resp).await;
            }
        }
    }
    if table.has_cors() && req.headers().contains_key(header::ORIGIN) {
        // Before the filters, as Envoy's CORS filter comes first: a preflight
        // needs no credentials, so authentication must not refuse it.
        let input = downstream.input(&req, &authority);
        if let Some(m) = table.route(&input) {
            let allowed = m.cors().and_then(|p| p.check(&req));
            if let Some((policy, origin)) = &allowed {
                if crate::cors::is_preflight(&req) {
                    out.route = Some(m.route.id.clone());
                    out.local = Some(CORS_PREFLIGHT.to_string());
                    let resp = policy.preflight(origin);
                    return route_reply(out, &m, http.via.as_deref(), resp).await;
                }
            }
            out.cors = allowed;
        }
    }
    let mut authority = authority;
    if let Some(mut chain) = snapshot.filters.start(
        &listener.name,
        conn.worker.id,
        || {
            exchange_of(
                conn,
                &mut req,
                &authority,
                client,
                out.request_id.as_ref(),
                table,
            )
        },
        || exchange_callouts(&conn.worker, &snapshot),
    ) {
        chain.grpc = out.grpc;
        if chain.reads_body_sizes() {
            out.body_bytes.sent = Some(filter::ByteCount::default());
            chain.x.body_bytes = out.body_bytes.clone();
        }
        out.chain = Some(filter::SharedChain::new(chain));
        // Timed only for the debug headers (two clock reads).
        let started = out.debug.on.then(Instant::now);
        let local = request_filters(out, &mut req, &mut authority).await;
        out.debug.request_filters = started.map(|t| t.elapsed());
        let mut local = local;
        if matches!(local, Ok(None)) && !upgrade {
            // A body a filter buffers is waited for under the timeout of the
            // route the request matches now (a body phase may still re-route
            // it), the default one if none does: a client that stalls
            // mid-body must not hold the request and the buffer forever.
            // Matched only for a buffered body (a route match is ~0.5k
            // instructions, and the request is matched again below anyway).
            let limit = |req: &Request<Body>, authority: &str| {
                let input = downstream.input(req, authority);
                let route = table.route(&input).map_or_else(
                    || Some(crate::config::defaults::route_timeout().get()),
                    |m| m.route.timeout,
                );
                ov.timeout.unwrap_or(route)
            };
            local = request_body(out, &mut req, &mut authority, limit).await;
        }
        let input = downstream.input(&req, &authority);
        let local = match local {
            Ok(local) => local,
            // A plugin failure (or the client's) in the request phases: an answer
            // for the route the request matches, if any.
            Err(e) => {
                return Err(routed_error(
                    e,
                    table.route(&input).as_ref(),
                    http.via.as_deref(),
                ))
            }
        };
        if let Some(local) = local {
            out.local = Some(filter::plugin_cause(&local.details));
            let mut resp = local_response(local, out.grpc);
            if let Some(m) = table.route(&input) {
                out.route = Some(m.route.id.clone());
                out.uncompressed = !m.route.compression;
                finish_response_headers(
                    &m,
                    http.via.as_deref(),
                    Version::HTTP_11,
                    resp.headers_mut(),
                    false,
                );
            }
            return response_filters(out, resp).await;
        }
    }
    let input = downstream.input(&req, &authority);
    let Some(matched) = table.route(&input) else {
        return Err(ProxyError::new(
            Kind::NoRoute,
            format!("no route for {authority}{}", req.uri().path()),
        ));
    };
    out.route = Some(matched.route.id.clone());
    out.uncompressed = !matched.route.compression;
    out.cors_route = matched.cors().is_some();
    if let (Some(clock), Some(t)) = (&out.idle, matched.route.idle_timeout) {
        clock.set_timeout(t);
    }
    // Before the request moves on (the redirect reads its head).
    let redirect = match matched.route.action {
        Action::Redirect(_) => Some(matched.redirect(&input)),
        _ => None,
    };
    // Errors from here on are answered for this route: it finishes their headers
    // as it finishes an upstream response's (Envoy's router does the same for
    // its local replies).
    let forwarded: Result<Response<Body>, ProxyError> = async {
        let cluster_name = match &matched.route.action {
            Action::Direct {
                status,
                body,
                content_type,
            } => {
                // A status without content (204, 304, 1xx) goes without the
                // configured body and its length (RFC 9110 §6.4.1, §8.6).
                let content = !bodiless(*status);
                let mut resp = Response::new(if content { body.clone() } else { Bytes::new() });
                *resp.status_mut() = *status;
                if content {
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, content_type.clone());
                    resp.headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                }
                out.local = Some(DIRECT_RESPONSE.to_string());
                return route_reply(out, &matched, http.via.as_deref(), resp).await;
            }
            Action::Health(h) => {
                // (A `GET` or `HEAD` was answered before the filters.)
                out.local = Some(HEALTH_CHECK.to_string());
                let resp = health_reply(conn, &snapshot, h);
                return route_reply(out, &matched, http.via.as_deref(), resp).await;
            }
            Action::Redirect(_) => {
                let (status, location) = redirect.flatten().ok_or_else(|| {
                    ProxyError::new(Kind::Internal, "redirect route without a redirect")
                })?;
                let mut resp = Response::new(Bytes::new());
                *resp.status_mut() = status;
                resp.headers_mut().insert(header::LOCATION, location);
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
                out.local = Some(DIRECT_RESPONSE.to_string());
                return route_reply(out, &matched, http.via.as_deref(), resp).await;
            }
            Action::Cluster(name) => name.clone(),
            Action::Weighted(w) => w.pick(rand::rng().random()).clone(),
        };
        if let Some(token) = &upgrade_token {
            // A filter that rewrote the path or authority may have moved the
            // request to a route that does not tunnel this upgrade.
            check_upgrade(token, Some(matched.route), http, &listener.stats)?;
        }
        out.cluster = Some(cluster_name.to_string());
        if let Some(f) = &matched.route.fault {
            // Before anything goes upstream, as Envoy's fault filter before its
            // router: the route timeout starts after the delay.
            if let Some(d) = f.delay.as_ref().and_then(crate::fault::delay) {
                listener.stats.fault_delays.inc();
                tokio::time::sleep(d).await;
            }
            if let Some(resp) = f.abort.as_ref().and_then(crate::fault::abort) {
                listener.stats.fault_aborts.inc();
                out.local = Some(crate::fault::ABORT_CAUSE.to_string());
                return route_reply(out, &matched, http.via.as_deref(), resp).await;
            }
        }
        let entry = snapshot
            .clusters
            .get(&cluster_name)
            .ok_or_else(|| {
                ProxyError::new(
                    Kind::Internal,
                    format!("cluster `{cluster_name}` missing from the snapshot"),
                )
            })?
            .clone();
        if upgrade_token.is_some() && entry.upstream.is_h2() {
            // HTTP/2 has no `Upgrade` (RFC 9113 §8.6): hyper would drop it and
            // send a plain request. An `auto` cluster whose connection turns out
            // h2 is refused by the pool (`upstream::UpgradeRequest`).
            return Err(upgrade_over_h2());
        }

        // Limits on the request body, checked before anything goes upstream.
        let max_body = matched.route.max_request_body;
        if let (Some(max), Some(len)) = (max_body, content_length(req.headers())) {
            if len > max {
                return Err(ProxyError::new(
                    Kind::BodyTooLarge,
                    format!("content-length {len} > {max}"),
                ));
            }
        }

        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, incoming) = req.into_parts();

        // Request headers (hop-by-hop ones out and forwarding facts in at the
        // start): the route's ops.
        let h = &mut parts.headers;
        h.remove(header::EXPECT);
        h.remove(header::HOST);
        h.remove(header::PROXY_AUTHORIZATION);
        if upgrade_token.is_none() {
            // A filter's; an upgrade is decided by the client's request.
            h.remove(header::UPGRADE);
        }
        // `via` first: the route's operations see and may change it (docs/config.md).
        if let Some(v) = &http.via {
            proxy_headers::add_via(h, &via_value(parts.version, v));
        }
        if matched.request_headers_need_facts() {
            // Values with operators (`%DOWNSTREAM_REMOTE_ADDRESS%`): what
            // they read, gathered only for the routes that have them.
            let path = path_of(&parts.uri);
            let (client, peer) = conn.client_text(out.client);
            let facts = crate::router::RequestFacts {
                listener: listener.name.as_str(),
                route: Some(&matched.route.name),
                method: parts.method.as_str(),
                path: &path,
                authority: &authority,
                protocol: format!("{:?}", parts.version),
                client,
                peer,
                start: SystemTime::now(),
                local: conn.reached(),
                scheme: scheme_of(conn),
                tls: tls_of(conn),
                sni: sni_of(conn),
                peer_subject: peer_subject_of(conn),
                request_id: out.request_id.as_ref().and_then(|v| v.to_str().ok()),
            };
            matched.apply_request_headers(h, Some(&facts));
        } else {
            matched.apply_request_headers(h, None);
        }
        // The accept an extended CONNECT's WebSocket handshake expects.
        let mut ws_accept = None;
        if let Some(token) = upgrade_token {
            if out.extended_connect && token.as_bytes().eq_ignore_ascii_case(b"websocket") {
                // RFC 8441 §5: an HTTP/2 client sends no key (the stream is
                // its proof); the HTTP/1.1 upstream must prove it speaks
                // WebSocket, so Legate makes the key and checks the answer.
                let (key, accept) = websocket_key();
                h.insert(SEC_WEBSOCKET_KEY.clone(), key);
                ws_accept = Some(accept);
            }
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, token);
        }
        let upstream_authority = match matched.rewritten_host() {
            Some(v) => v.to_str().unwrap_or(&authority).to_string(),
            None => authority.clone(),
        };
        let path = matched
            .rewritten_path(&parts.uri)
            .unwrap_or_else(|| path_of(&parts.uri));

        let req_body = match max_body {
            Some(max) => body::boxed(Watched::new(
                incoming,
                Limit {
                    remaining: max,
                    fault: out.client_fault.clone(),
                },
            )),
            None => incoming,
        };

        let route = matched.route;
        // `x-legate-max-retries` tunes the route's policy (see crate::overrides).
        let tuned: Option<RetryPolicy> = ov.max_retries.and_then(|n| {
            route.retry.as_ref().map(|p| {
                let mut p = p.clone();
                p.num_retries = n;
                p
            })
        });
        let policy = tuned
            .as_ref()
            .or(route.retry.as_ref())
            .filter(|p| !upgrade && p.num_retries > 0 && p.applies_to(&parts.method));
        // A mirrored request's body is read first (up to the mirror's cap) to be copied.
        let mirror = route
            .mirror
            .as_ref()
            .filter(|m| !upgrade && crate::mirror::chosen(m));
        let route_timeout = ov.timeout.unwrap_or(route.timeout);
        let buffer_limit = match (policy, mirror) {
            // Read up to the larger of the two: a body under the mirror's
            // `max_body` is mirrored even when the retry's `buffer_limit` is
            // smaller (it was streamed, and not mirrored); one read whole is
            // also replayed by a retry.
            (Some(p), Some(m)) => Some(p.buffer_limit.max(m.max_body.0)),
            // A retry's copy is kept as the body streams (below).
            (Some(_), None) => None,
            (None, Some(m)) => Some(m.max_body.0),
            // Not buffered: the body streams to the attempt as it comes.
            (None, None) => None,
        };
        let mut source = match buffer_limit {
            // A body read before anything goes upstream is bounded by the route
            // timeout too (which then starts again for the attempts, as Envoy's
            // starts once the request is in): a client sending it a byte a
            // minute must not hold the request (and its buffer) forever.
            Some(limit) => {
                let buffering = std::pin::pin!(ReqBody::buffer(req_body, limit, &parts));
                match client_body_within(buffering, route_timeout, out.chain.as_ref()).await {
                    Ok(source) => source,
                    // A streamed request body phase answered, which stopped
                    // the body: its response, not a read error.
                    Err(e) => match out.chain.as_ref().and_then(filter::SharedChain::take_local) {
                        Some(lr) => {
                            return answer_locally(out, lr, &matched, http.via.as_deref()).await
                        }
                        None => return Err(e),
                    },
                }
            }
            // A retry's copy is kept as the body streams, as Envoy's retry
            // buffer: held back until its end, a gRPC client or bidirectional
            // stream (or any exchange whose upstream answers before the
            // request ends) stalled until the route timeout.
            None => match policy {
                Some(p) => ReqBody::replay(req_body, p.buffer_limit, &parts),
                None => ReqBody::Stream(Some(req_body)),
            },
        };
        // A body that streams upstream as the client sends it (not one read
        // whole before, here or by a filter; the rest of one too big to
        // buffer, too): the timeouts wait for its end.
        let timed = route_timeout.is_some() || route.per_try_timeout.is_some();
        let sent = if timed && !out.body_read {
            source.watch_end()
        } else {
            None
        };
        if let (Some(m), Some(body)) = (mirror, source.whole(mirror.map_or(0, |m| m.max_body.0))) {
            let copy = crate::mirror::Copy {
                method: parts.method.clone(),
                path: path.clone(),
                headers: parts.headers.clone(),
                authority: upstream_authority.clone(),
                body,
            };
            crate::mirror::send(&conn.worker, &snapshot, m, copy);
        }

        let attempt = Attempts {
            conn,
            entry: &entry,
            method: &parts.method,
            headers: RefCell::new(std::mem::take(&mut parts.headers)),
            path: &path,
            authority: &upstream_authority,
            policy,
            per_try: route.per_try_timeout,
            sent: sent.as_deref(),
            upgrade,
        };
        // A filter may answer between phases meanwhile (a callout's result
        // delivered as it arrived): its answer replaces the upstream's, which
        // is not waited for (the upstream request is aborted), as Envoy's
        // `sendLocalReply`.
        let answers = out.chain.clone();
        let attempts = async {
            match route_timeout {
                Some(t) => {
                    let timed = {
                        let run = std::pin::pin!(attempt.run(source, out));
                        after_sent(t, sent.as_deref(), run).await
                    };
                    match timed {
                        Ok(r) => r,
                        Err(_) => {
                            // The attempt cut short counts against its endpoint, as a per-try
                            // timeout does (outlier detection). None in flight (a backoff):
                            // only the cluster counts it.
                            match out.active.take() {
                                Some(active) => active.record_timeout(),
                                None => {
                                    entry
                                        .cluster()
                                        .stats
                                        .upstream_rq_timeout
                                        .fetch_add(1, Relaxed);
                                }
                            }
                            Err(ProxyError::new(
                                Kind::Timeout,
                                format!("route timeout {t:?}"),
                            ))
                        }
                    }
                }
                None => attempt.run(source, out).await,
            }
        };
        let result = match &answers {
            Some(shared) => tokio::select! {
                biased;
                () = shared.answered() => None,
                r = attempts => Some(r),
            },
            None => Some(attempts.await),
        };
        let Some(result) = result else {
            // The attempt in flight is dropped with its future.
            out.active = None;
            let Some(lr) = answers.as_ref().and_then(filter::SharedChain::take_local) else {
                return Err(ProxyError::new(
                    Kind::Internal,
                    "a filter's answer went missing",
                ));
            };
            return answer_locally(out, lr, &matched, http.via.as_deref()).await;
        };
        if let (Ok(_), Some(shared)) = (&result, out.chain.as_ref()) {
            // The upstream answered while a filter may still hold a chunk or the
            // end of the request body for a callout: its verdict comes first,
            // since its local response replaces the upstream's (abi/README.md
            // §3.5). The response phases would wait for the chain anyway.
            wait_for_chain(shared).await?;
        }
        if let Some(lr) = out.chain.as_ref().and_then(filter::SharedChain::take_local) {
            // A streamed request body phase answered: its response replaces whatever
            // the aborted upstream request produced.
            return answer_locally(out, lr, &matched, http.via.as_deref()).await;
        }
        let mut resp = result?;
        if out.debug.on || conn.listener.access_log.is_some() {
            out.upstream_head_at = Some(Instant::now());
        }

        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching && downstream_upgrade.is_none() {
            // RFC 9110 §7.8: a switch the client did not ask for (and HTTP/2
            // has no 101 at all, RFC 9113 §8.6): the upstream is broken.
            return Err(ProxyError::new(
                Kind::UpstreamProtocol,
                "101 Switching Protocols to a request that did not ask to upgrade",
            ));
        }
        if out.extended_connect && !switching && resp.status().is_success() {
            // A 2xx would open the client's tunnel (RFC 8441 §5) to an
            // upstream that did not switch.
            return Err(ProxyError::new(
                Kind::UpgradeUnsupported,
                format!(
                    "the upstream answered the upgrade {} instead of 101",
                    resp.status().as_u16()
                ),
            ));
        }
        if switching {
            if let Some(expected) = &ws_accept {
                let got = resp.headers().get(&SEC_WEBSOCKET_ACCEPT);
                if got.map(HeaderValue::as_bytes) != Some(expected.as_bytes()) {
                    return Err(ProxyError::new(
                        Kind::UpstreamProtocol,
                        "the upstream's 101 has no Sec-WebSocket-Accept matching the key sent",
                    ));
                }
            }
            if let Some(down) = downstream_upgrade {
                let up = hyper::upgrade::on(&mut resp);
                // The attempt stays in flight (`upstream_rq_active`,
                // `max_requests`, `least_request`) until the tunnel closes,
                // as Envoy's: the 101's empty body would end it at once.
                let active = out.active.take();
                let end = Rc::new(TunnelEnd::default());
                out.tunnel = Some(end.clone());
                let task = tokio::task::spawn_local(tunnel(down, up, active, end.clone()));
                if out.extended_connect {
                    // One stream of the connection: its own idle timeout and
                    // drain, which the connection's are not.
                    let idle = matched
                        .route
                        .idle_timeout
                        .unwrap_or(Some(listener.cfg.limits.idle_timeout.get()))
                        .filter(|t| !t.is_zero());
                    tokio::task::spawn_local(watch_stream_tunnel(
                        Tunnel {
                            task,
                            end,
                            idle: None,
                        },
                        idle,
                        conn.lifetime_end,
                        conn.listener.clone(),
                        conn.worker.clone(),
                    ));
                } else {
                    conn.tunnel.set(Some(Tunnel {
                        task,
                        end,
                        idle: matched.route.idle_timeout,
                    }));
                }
            }
        }
        let received = resp.version();
        // RFC 9110 §15.5.22: a 426 names in `Upgrade` (with `Connection:
        // upgrade`) the protocols the client must switch to; hop-by-hop, it
        // would be stripped and the 426 say nothing. HTTP/1.1 clients only:
        // HTTP/2 has no `Upgrade`.
        let upgrade_required = (resp.status() == StatusCode::UPGRADE_REQUIRED
            && parts.version < Version::HTTP_2)
            .then(|| resp.headers().get(header::UPGRADE).cloned())
            .flatten();
        // An HTTP/2 tunnel opens with a 200, which must not carry the 101's
        // hop-by-hop fields (those `Connection` names included).
        finish_response_headers(
            &matched,
            http.via.as_deref(),
            received,
            resp.headers_mut(),
            switching && !out.extended_connect,
        );
        if let Some(cookie) = out.set_cookie.take() {
            resp.headers_mut().append(header::SET_COOKIE, cookie);
        }
        if let Some(protocols) = upgrade_required {
            let h = resp.headers_mut();
            h.insert(header::UPGRADE, protocols);
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        if resp.version() != Version::HTTP_11 || parts.version == Version::HTTP_2 {
            // The downstream protocol sets the response framing; hyper picks it.
            *resp.version_mut() = parts.version;
        }
        if switching {
            if out.extended_connect {
                // RFC 8441 §5: the stream's tunnel opens with a 200, without
                // HTTP/1.1's switch headers.
                *resp.status_mut() = StatusCode::OK;
                let h = resp.headers_mut();
                h.remove(header::UPGRADE);
                h.remove(header::CONNECTION);
                h.remove(&SEC_WEBSOCKET_ACCEPT);
                h.remove(header::CONTENT_LENGTH);
            }
            // The tunnel is already spliced; filters see upgraded exchanges' heads only
            // on the request side in this release.
            return Ok(resp);
        }
        response_filters(out, resp).await
    }
    .await;
    forwarded.map_err(|e| {
        if e.kind == Kind::UpgradeUnsupported {
            // (Logged with the reply, and in the access log by its cause.)
            listener.stats.upgrades_failed.inc();
        }
        routed_error(e, Some(&matched), http.via.as_deref())
    })
}

/// The answer to an allowed upgrade routed to an HTTP/2 upstream connection.
pub(crate) fn upgrade_over_h2() -> ProxyError {
    ProxyError::new(
        Kind::UpgradeUnsupported,
        "the upstream connection is HTTP/2, which cannot carry an HTTP/1.1 upgrade \
         (Legate does not send extended CONNECT, RFC 8441, upstream)",
    )
}

/// The exchange filters see, from the request head (without `host`: the authority is
/// its own property). `client`: the client address trusted proxies reported
/// ([`proxy_headers::trusted_client`]), which filters see as the source address,
/// port 0 (as Envoy's downstream address from `x-forwarded-for`); `None` for the
/// peer.
fn exchange_of<B>(
    conn: &ConnCtx,
    req: &mut Request<B>,
    authority: &str,
    client: Option<std::net::IpAddr>,
    request_id: Option<&HeaderValue>,
    table: &Arc<crate::router::RouteTable>,
) -> Exchange {
    // Moved, not copied: `write_head` puts the head as the filters leave it
    // back. The client's `host` stays in it: the exchange hides it from filters.
    let headers = std::mem::take(req.headers_mut());
    let conn_facts = conn.facts.get_or_init(|| {
        Arc::new(ConnFacts {
            id: crate::filter::next_connection_id(),
            source: conn.peer,
            destination: conn.local,
            tls: conn.tls.as_ref().map(TlsFacts::of),
        })
    });
    let facts = match client {
        Some(ip) => Arc::new(ConnFacts {
            source: SocketAddr::new(ip, 0),
            ..ConnFacts::clone(conn_facts)
        }),
        None => conn_facts.clone(),
    };
    Exchange::new(
        req.method().clone(),
        path_of(req.uri()),
        authority.to_string(),
        req.version(),
        headers,
        facts,
        request_id
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("")),
        Some(table.clone()),
    )
}

/// `uri`'s path and query as `Display` writes them (`/` if it has none, a leading
/// `/` added if missing), in one allocation of the right size rather than
/// through the formatter.
fn path_of(uri: &Uri) -> String {
    let Some(p) = uri.path_and_query() else {
        return "/".to_string();
    };
    let s = p.as_str();
    if s.starts_with(['/', '*']) {
        s.to_owned()
    } else {
        format!("/{s}")
    }
}

/// Runs the request-headers phase of the chain and writes the (possibly changed)
/// head back into `req`. `Some` is a filter's local response.
async fn request_filters(
    out: &mut Outcome,
    req: &mut Request<Body>,
    authority: &mut String,
) -> Result<Option<filter::LocalResponse>, ProxyError> {
    let Some(shared) = out.chain.clone() else {
        return Ok(None);
    };
    let Some(mut chain) = shared.take() else {
        return Ok(None);
    };
    let eos = req.body().is_end_stream();
    let local = chain.on_request_headers(eos).await;
    // Written back even when the chain failed: the request's headers are in the
    // exchange, and the error response may look at them (gRPC or not).
    let keep = chain.request_head_read_later();
    let written = write_head(&mut chain.x, keep, req, authority);
    shared.put(chain);
    let local = local?;
    written.map(|()| local)
}

/// Writes the request head as the filters left it back into `req`: its header
/// map is moved out, and a snapshot of it stays if a filter may `keep` reading
/// it (a `HeaderMap` copy was ~1k instructions, a tenth of a no-op filter's
/// cost).
fn write_head(
    x: &mut Exchange,
    keep: bool,
    req: &mut Request<Body>,
    authority: &mut String,
) -> Result<(), ProxyError> {
    *req.method_mut() = x.method.clone();
    // The original goes upstream (hyper consumes it) and, if `keep`, a flat
    // snapshot stays, rebuilt only if a filter reads it later (`filter::Head`).
    let filter::RequestHead { mut headers, host } = x.take_request_head(keep);
    let authority_changed = x.authority != *authority;
    if authority_changed || x.path != req.uri().path_and_query().map_or("/", |p| p.as_str()) {
        let uri = if req.uri().authority().is_some() {
            let mut b = Uri::builder()
                .authority(x.authority.as_str())
                .path_and_query(x.path.as_str());
            if let Some(s) = req.uri().scheme() {
                b = b.scheme(s.clone());
            }
            b.build()
        } else {
            Uri::builder().path_and_query(x.path.as_str()).build()
        };
        *req.uri_mut() = uri.map_err(|e| {
            ProxyError::new(
                Kind::Internal,
                format!("filter rewrote the target badly: {e}"),
            )
        })?;
        authority.clone_from(&x.authority);
    }
    let client = match host {
        // No filter reached the head and the authority is as it came: the
        // head is the client's, `host` and all, as without filters.
        filter::ClientHost::InHead if !authority_changed => {
            *req.headers_mut() = headers;
            return Ok(());
        }
        filter::ClientHost::InHead => headers.remove(header::HOST),
        filter::ClientHost::Taken(h) => h,
    };
    // `host` is the authority: HTTP/1 requests carry one, and so does a
    // request that came with one.
    if req.version() < Version::HTTP_2 || client.is_some() {
        let host = match client {
            // The client's own value when it is the authority still: no
            // parse and copy of it.
            Some(v) if v.as_bytes() == authority.as_bytes() => v,
            _ => HeaderValue::from_str(authority)
                .map_err(|_| ProxyError::new(Kind::BadRequest, "invalid authority"))?,
        };
        headers.insert(header::HOST, host);
    }
    *req.headers_mut() = headers;
    Ok(())
}

/// Whether the chain is out in an async phase (`false`: the exchange is over).
/// An error if the chain was dropped while out: the exchange was abandoned
/// (e.g. the request body holding it was dropped), so nothing may pass
/// unfiltered.
fn chain_out(shared: &filter::SharedChain) -> Result<bool, ProxyError> {
    match shared.with(|_| ()) {
        Ok(()) | Err(filter::SharedError::Finished) => Ok(false),
        Err(filter::SharedError::Busy) => Ok(true),
        Err(filter::SharedError::Aborted) => Err(ProxyError::new(
            Kind::UpstreamReset,
            "the request was abandoned while a filter held it",
        )),
    }
}

/// Waits until the chain is not out: a filter holding part of a streamed body
/// for a callout resumed or answered (or the exchange is over).
async fn wait_for_chain(shared: &filter::SharedChain) -> Result<(), ProxyError> {
    while chain_out(shared)? {
        std::future::poll_fn(|cx| shared.poll_available(cx)).await;
    }
    Ok(())
}

/// A reply the route makes itself (a direct response, a redirect): in gRPC's
/// form to a gRPC request, finished as the route finishes an upstream's
/// response, then through the response phases.
async fn route_reply(
    out: &mut Outcome,
    matched: &Matched<'_>,
    via: Option<&str>,
    resp: Response<Bytes>,
) -> Result<Response<Body>, ProxyError> {
    let mut resp = local_reply::reply(resp, out.grpc);
    finish_response_headers(matched, via, Version::HTTP_11, resp.headers_mut(), false);
    response_filters(out, resp).await
}

/// Sends `lr`, a streamed request body phase's local response, instead of
/// whatever the aborted upstream request produced; through the response phases
/// of the filters before the one that answered.
async fn answer_locally(
    out: &mut Outcome,
    lr: filter::LocalResponse,
    matched: &Matched<'_>,
    via: Option<&str>,
) -> Result<Response<Body>, ProxyError> {
    out.local = Some(filter::plugin_cause(&lr.details));
    let mut resp = local_response(lr, out.grpc);
    finish_response_headers(matched, via, Version::HTTP_11, resp.headers_mut(), false);
    response_filters(out, resp).await
}

/// The chain's step `f`, run synchronously; the chain is out only while an async
/// phase waits, which cannot be the case between phases of one direction.
fn chain_step<R>(
    shared: &filter::SharedChain,
    f: impl FnOnce(&mut filter::Chain) -> R,
) -> Result<R, ProxyError> {
    shared
        .with(f)
        .map_err(|e| ProxyError::new(Kind::Internal, format!("filter chain unavailable: {e:?}")))
}

/// What running one direction's body through the chain gave.
enum BodyRun {
    /// No filter takes this body, or it now streams through them chunk by chunk:
    /// the body to send on, head unchanged.
    Passed(Body),
    /// Buffered and run through the phases: the new body and trailers (the head,
    /// writable meanwhile, must be written back).
    Whole(Bytes, Option<http::HeaderMap>),
    /// A filter held the head while the body began to stream through the
    /// chain, and let it go before the end: the body to send on (what passed
    /// so far, then the rest); the head, writable meanwhile, must be written
    /// back.
    Released(Body),
    /// A filter answered from a body or trailers phase.
    Respond(filter::LocalResponse),
}

/// Sends a body of direction `d` (whose head has `headers`) through the chain's
/// body and trailers phases if a filter declared them (abi/README.md §4):
/// streamed, the body is wrapped so chunks go through as they are forwarded;
/// buffered, the whole body is read under the smallest cap of the buffering
/// filters (over it: request 413, response 502) and the phases run once, waiting
/// out a filter's pause (abi/README.md §3.3) as the headers phases do.
async fn run_body(
    shared: &filter::SharedChain,
    d: filter::Direction,
    inner: Body,
    headers: &http::HeaderMap,
    limit: impl FnOnce() -> Option<Duration>,
) -> Result<BodyRun, ProxyError> {
    use filter::Direction;
    // Filters after one that held the head in its headers phase still wait
    // for it ([`filter::Chain::run_stopped`]), even if that one no longer
    // takes part (it failed open, or detached).
    let (plan, stopped) = chain_step(shared, |c| (c.body_plan(d), c.stopped(d)))?;
    let plan = match plan {
        Some(p) => p,
        None if stopped => filter::BodyPlan {
            buffer_cap: None,
            holds_head: true,
        },
        None => return Ok(BodyRun::Passed(inner)),
    };
    let Some(cap) = plan.buffer_cap else {
        let streamed = body::Filtered::new(inner, shared.clone(), d);
        if plan.holds_head || stopped {
            return hold_head(shared, d, streamed, limit()).await;
        }
        return Ok(BodyRun::Passed(body::boxed(streamed)));
    };
    let (kind, what) = match d {
        Direction::Request => (Kind::RequestBufferLimit, "request"),
        Direction::Response => (Kind::ResponseBufferLimit, "response"),
    };
    let over = |len: u64| {
        let _ =
            shared.with(|c| c.body_limit_exceeded(d, usize::try_from(len).unwrap_or(usize::MAX)));
        ProxyError::new(
            kind,
            format!("{what} body of {len} bytes is over a filter's buffer cap of {cap} bytes"),
        )
    };
    if let Some(len) = content_length(headers).filter(|&l| l > cap as u64) {
        return Err(over(len));
    }
    let collect = std::pin::pin!(async {
        body::collect_capped(inner, cap)
            .await
            .map_err(|e| match (e, d) {
                (body::CollectError::OverCap(len), _) => over(len as u64),
                (body::CollectError::Read(e), Direction::Request) => ProxyError::request_body(&*e),
                (body::CollectError::Read(e), Direction::Response) => {
                    ProxyError::new(Kind::UpstreamReset, format!("response body: {e}"))
                }
            })
    });
    // Only the read is bounded: the chain is not out yet (the phases below,
    // which may pause, have the plugin's own `pause` bound). A filter may
    // answer between phases meanwhile: the answer replaces the message,
    // whose head is held.
    let (data, trailers) = tokio::select! {
        biased;
        () = shared.answered() => match shared.take_local() {
            Some(lr) => return Ok(BodyRun::Respond(lr)),
            None => return Err(ProxyError::new(Kind::Internal, "a filter's answer went missing")),
        },
        r = client_body_within(collect, limit(), None) => r?,
    };
    // The phases may pause (the whole message is held here): taken out, as for
    // the headers phases, so no borrow is held while the chain waits. A
    // response read while the request body is held for a callout (full
    // duplex) waits for it first.
    wait_for_chain(shared).await?;
    let Some(mut chain) = shared.take() else {
        return Err(ProxyError::new(
            Kind::Internal,
            format!("filter chain unavailable for the buffered {what} body phases"),
        ));
    };
    // The trailers are writable in the body call; emptied, there are none.
    // Then the filters after one that held the head, if any, get it and the
    // whole body.
    let r = match chain.on_whole_body(d, data, trailers).await {
        Ok(Ok((data, trailers))) if chain.stopped(d) => {
            match chain.run_stopped(d, data, trailers, true).await {
                Ok(filter::StoppedRun::Passed(data, trailers)) => Ok(Ok((data, trailers))),
                Ok(filter::StoppedRun::Respond(lr)) => Ok(Err(lr)),
                Ok(filter::StoppedRun::Whole(_)) => Err(ProxyError::new(
                    Kind::Internal,
                    "bug: a whole body was asked for again",
                )),
                Err(e) => Err(e),
            }
        }
        r => r,
    };
    shared.put(chain);
    match r? {
        Ok((data, trailers)) => Ok(BodyRun::Whole(data, trailers)),
        Err(lr) => Ok(BodyRun::Respond(lr)),
    }
}

/// A filter holds the head of direction `d` while its body streams through
/// the chain (proxy-wasm's `StopIteration` from a headers callback, Envoy's
/// way: the body callback gets each chunk, and the head goes on with the first
/// one it continues). Reads `body` (the chain's phases over the body) until no
/// filter holds the head, or to its end: ended, it is as if buffered
/// ([`BodyRun::Whole`]); let go before, what passed so far goes ahead of the
/// rest ([`BodyRun::Released`]). What this holds is bounded by the holding
/// filter's body cap (the data it keeps back). A request's client has `limit`
/// to send what is read here, as for a buffered body.
///
/// The filters after the holding one have not had their headers phase yet
/// (Envoy's iteration stopped there): once it lets the head go, they get it,
/// then what passed so far ([`filter::Chain::run_stopped`]); one of them may
/// hold the head in turn, and the reading goes on.
async fn hold_head(
    shared: &filter::SharedChain,
    d: filter::Direction,
    body: body::Filtered,
    limit: Option<Duration>,
) -> Result<BodyRun, ProxyError> {
    let mut body = body.holding_head();
    let mut frames: Vec<Frame<Bytes>> = Vec::new();
    // A filter after the holding one buffers the body: what is read to its
    // end is bounded by its cap.
    let mut whole_cap: Option<usize> = None;
    // Asked when the stream has nothing more ready, and after each frame: a
    // filter may let the head go on a chunk it empties. A chain out for a
    // callout still holds it. Once the end reached the chain, the rest is
    // read too: the body is then whole.
    let released = |body: &body::Filtered| {
        !body.ended() && matches!(shared.with(|c| c.holds_head(d)), Ok(false))
    };
    let ended = loop {
        // A filter may answer between phases meanwhile (a callout's result
        // delivered between chunks): the answer replaces the message, whose
        // head is held.
        let mut answered = false;
        let read = {
            let read = std::pin::pin!(async {
                loop {
                    let next = std::future::poll_fn(|cx| {
                        if shared.poll_answered(cx).is_ready() {
                            answered = true;
                            return Poll::Ready(None);
                        }
                        match Pin::new(&mut body).poll_frame(cx) {
                            Poll::Pending if released(&body) => Poll::Ready(None),
                            Poll::Pending => Poll::Pending,
                            Poll::Ready(f) => Poll::Ready(Some(f)),
                        }
                    })
                    .await;
                    match next {
                        None if answered => return Ok(Err(BoxError::from("answered by a filter"))),
                        None => return Ok(Ok(false)),
                        Some(None) => return Ok(Ok(true)),
                        Some(Some(Err(e))) => return Ok(Err(e)),
                        Some(Some(Ok(f))) => {
                            frames.push(f);
                            let over = whole_cap.is_some_and(|cap| {
                                frames
                                    .iter()
                                    .filter_map(Frame::data_ref)
                                    .map(Bytes::len)
                                    .sum::<usize>()
                                    > cap
                            });
                            if over {
                                return Ok(Err(BoxError::from(over_cap(shared, d, &frames))));
                            }
                            if released(&body) {
                                return Ok(Ok(false));
                            }
                        }
                    }
                }
            });
            client_body_within(read, limit, Some(shared)).await?
        };
        let ended = match read {
            Ok(ended) => ended,
            // A filter's local response replaces the message (its head is held).
            Err(_) if let Some(lr) = shared.take_local() => return Ok(BodyRun::Respond(lr)),
            Err(e) => {
                return Err(match e.downcast::<ProxyError>() {
                    Ok(e) => *e,
                    Err(e) if d == filter::Direction::Request => ProxyError::request_body(&*e),
                    Err(e) => ProxyError::new(Kind::UpstreamReset, format!("response body: {e}")),
                })
            }
        };
        // The filters the holding one kept the head from get it now, then
        // what passed it (the chain's pauses are waited out here).
        wait_for_chain(shared).await?;
        if !chain_step(shared, |c| c.stopped(d))? {
            break ended;
        }
        let Some(mut chain) = shared.take() else {
            return Err(ProxyError::new(
                Kind::Internal,
                "filter chain unavailable for the filters after one that held the head",
            ));
        };
        let (data, trailers) = joined(std::mem::take(&mut frames));
        let r = chain
            .run_stopped(d, data.clone(), trailers.clone(), ended)
            .await;
        shared.put(chain);
        match r? {
            filter::StoppedRun::Respond(lr) => return Ok(BodyRun::Respond(lr)),
            filter::StoppedRun::Whole(cap) => {
                // Kept as read; all of it goes to them at the end.
                whole_cap = Some(whole_cap.map_or(cap, |c| c.min(cap)));
                frames.push(Frame::data(data));
                frames.extend(trailers.map(Frame::trailers));
            }
            filter::StoppedRun::Passed(data, trailers) => {
                frames.push(Frame::data(data));
                frames.extend(trailers.map(Frame::trailers));
            }
        }
        if ended || !matches!(shared.with(|c| c.holds_head(d)), Ok(true)) {
            break ended;
        }
    };
    // The head goes on now (whole, or with what passed so far): a callout
    // result delivered later can no longer change it.
    let _ = shared.with(|c| c.head_out(d));
    if ended {
        let (data, trailers) = joined(frames);
        return Ok(BodyRun::Whole(data, trailers));
    }
    body.head_out();
    Ok(BodyRun::Released(body::Prefixed::body(
        frames
            .into_iter()
            .filter(|f| f.data_ref().is_none_or(|b| !b.is_empty()))
            .map(Ok),
        body::boxed(body),
    )))
}

/// The data of `frames` in one piece, and their trailers.
fn joined(frames: Vec<Frame<Bytes>>) -> (Bytes, Option<http::HeaderMap>) {
    let mut data = bytes::BytesMut::new();
    let mut trailers = None;
    for f in frames {
        match f.into_data() {
            Ok(b) => data.extend_from_slice(&b),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    (data.freeze(), trailers)
}

/// A body read whole for a filter that buffers it, after one that held the
/// head, went over that filter's cap: counted, and the error that answers it.
fn over_cap(
    shared: &filter::SharedChain,
    d: filter::Direction,
    frames: &[Frame<Bytes>],
) -> ProxyError {
    let len: usize = frames
        .iter()
        .filter_map(Frame::data_ref)
        .map(Bytes::len)
        .sum();
    let _ = shared.with(|c| c.body_limit_exceeded(d, len));
    let (kind, what) = match d {
        filter::Direction::Request => (Kind::RequestBufferLimit, "request"),
        filter::Direction::Response => (Kind::ResponseBufferLimit, "response"),
    };
    ProxyError::new(
        kind,
        format!("{what} body of {len} bytes is over a filter's buffer cap"),
    )
}

/// The request side of [`run_body`]: a buffered body's head is written back and
/// its `content-length` recomputed; the client has `limit` (asked only for a
/// body that is buffered, of the request as it is then) to send a body that is
/// buffered. `Some` is a filter's local response.
async fn request_body(
    out: &mut Outcome,
    req: &mut Request<Body>,
    authority: &mut String,
    limit: impl FnOnce(&Request<Body>, &str) -> Option<Duration>,
) -> Result<Option<filter::LocalResponse>, ProxyError> {
    let Some(shared) = out.chain.clone() else {
        return Ok(None);
    };
    // A body-less request goes through the body phases only for a filter that
    // buffers it: that filter may give it a body (abi/README.md §4).
    let empty = req.body().is_end_stream();
    if empty
        && !chain_step(&shared, |c| {
            c.set_bodyless(filter::Direction::Request);
            c.buffers(filter::Direction::Request)
        })?
    {
        return Ok(None);
    }
    let inner = std::mem::replace(req.body_mut(), body::empty());
    let (head, at): (&Request<Body>, &str) = (req, authority);
    match run_body(
        &shared,
        filter::Direction::Request,
        inner,
        head.headers(),
        || limit(head, at),
    )
    .await?
    {
        BodyRun::Passed(b) => *req.body_mut() = body::framed_by_head(req.headers(), b),
        BodyRun::Released(b) => {
            chain_step(&shared, |c| write_head(&mut c.x, true, req, authority))??;
            *req.body_mut() = body::framed_by_head(req.headers(), b);
        }
        BodyRun::Respond(lr) => return Ok(Some(lr)),
        BodyRun::Whole(data, trailers) => {
            out.body_read = true;
            chain_step(&shared, |c| write_head(&mut c.x, true, req, authority))??;
            // Still empty: framed as it came (no `content-length: 0` on a GET).
            if !(empty && data.is_empty() && trailers.is_none()) {
                set_length(req.headers_mut(), data.len(), trailers.is_some());
            }
            *req.body_mut() = body::whole(data, trailers);
        }
    }
    Ok(None)
}

/// Awaits `read`, a request body read whole before anything goes upstream,
/// with at most `limit` spent waiting for the client (`None`: no bound); past
/// it the client gets 408 `request_timeout`. Time a filter of `chain` holds
/// part of the body (a chunk or its end, streamed through the chain, paused
/// for a callout) does not count: nothing is read from the client then, and
/// the pause has its own bound (the plugin's `limits.pause`).
async fn client_body_within<T, F: Future<Output = Result<T, ProxyError>>>(
    mut read: Pin<&mut F>,
    limit: Option<Duration>,
    chain: Option<&filter::SharedChain>,
) -> Result<T, ProxyError> {
    let Some(t) = limit else {
        return read.await;
    };
    let held = || chain.map_or(Duration::ZERO, filter::SharedChain::held_time);
    let (start, held_before) = (Instant::now(), held());
    loop {
        let spent = start
            .elapsed()
            .saturating_sub(held().saturating_sub(held_before));
        if let Some(left) = t.checked_sub(spent).filter(|l| !l.is_zero()) {
            if let Ok(r) = tokio::time::timeout(left, read.as_mut()).await {
                return r;
            }
        }
        // Checked only at expiry: out means a filter holds part of the body;
        // the time left is counted again once it lets go.
        match chain {
            Some(c) if matches!(chain_out(c), Ok(true)) => tokio::select! {
                r = read.as_mut() => return r,
                r = wait_for_chain(c) => r?,
            },
            _ => {
                return Err(ProxyError::new(
                    Kind::RequestTimeout,
                    format!("request body not received within the route timeout {t:?}"),
                ))
            }
        }
    }
}

/// `content-length` of a buffered body the filters may have changed; none when
/// trailers follow (they need chunked encoding on HTTP/1.1).
fn set_length(h: &mut http::HeaderMap, len: usize, trailers: bool) {
    h.remove(header::TRANSFER_ENCODING);
    if trailers {
        h.remove(header::CONTENT_LENGTH);
    } else {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

/// The response side of [`run_body`]: over the cap is 502 (the head is still
/// held, so a clean status can be sent); a local response from the buffered
/// body phase replaces the response; from a streamed one, it resets the exchange
/// (its head is out).
async fn response_body(
    shared: filter::SharedChain,
    mut resp: Response<Body>,
    grpc: bool,
) -> Result<Response<Body>, ProxyError> {
    // As for requests: a body-less response goes through the body phases only
    // for a filter that buffers it, and only if it may have a body.
    let empty = resp.body().is_end_stream();
    if empty {
        let may_have_body = !(resp.status().is_informational()
            || matches!(
                resp.status(),
                StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
            ));
        let buffered = chain_step(&shared, |c| {
            c.set_bodyless(filter::Direction::Response);
            c.x.method != Method::HEAD && c.buffers(filter::Direction::Response)
        })?;
        if !(may_have_body && buffered) {
            return Ok(resp);
        }
    }
    let inner = std::mem::replace(resp.body_mut(), body::empty());
    // The head was held (and writable) with the body.
    let write_head = |resp: &mut Response<Body>| -> Result<(), ProxyError> {
        let (status, headers) = chain_step(&shared, |c| {
            (
                c.x.status,
                c.x.response_headers.as_deref().cloned().unwrap_or_default(),
            )
        })?;
        *resp.headers_mut() = headers;
        if let Some(s) = status {
            *resp.status_mut() = s;
        }
        Ok(())
    };
    // Boxed: only a filter with a response body phase gets here, and inline
    // the body run's future would size every request's future (which is
    // moved whole into its box per request), as connecting does upstream.
    let (data, trailers) = match Box::pin(run_body(
        &shared,
        filter::Direction::Response,
        inner,
        resp.headers(),
        || None,
    ))
    .await?
    {
        BodyRun::Passed(b) => {
            *resp.body_mut() = b;
            return Ok(resp);
        }
        BodyRun::Released(b) => {
            write_head(&mut resp)?;
            *resp.body_mut() = b;
            return Ok(resp);
        }
        BodyRun::Respond(lr) => {
            shared.set_answered(&lr.details);
            return Ok(local_response(lr, grpc));
        }
        BodyRun::Whole(data, trailers) => (data, trailers),
    };
    write_head(&mut resp)?;
    if matches!(
        resp.status(),
        StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
    ) {
        resp.headers_mut().remove(header::CONTENT_LENGTH);
    } else {
        set_length(resp.headers_mut(), data.len(), trailers.is_some());
    }
    if let Some(t) = &trailers {
        // For an HTTP/1.1 client, whose `Trailer` must name them.
        resp.extensions_mut().insert(KnownTrailers(t.clone()));
    }
    *resp.body_mut() = body::whole(data, trailers);
    Ok(resp)
}

/// A filter's local response as an HTTP response: in the form it goes out in
/// (`LocalResponse::for_client`), hop-by-hop fields dropped, `content-length`
/// set to the body's length (none to a `grpc` request: gRPC's form has no body).
///
/// A status without content (204, 304, 1xx) goes without the filter's body
/// and without `content-length` (RFC 9110 §6.4.1, §8.6).
fn local_response(lr: filter::LocalResponse, grpc: bool) -> Response<Body> {
    let mut lr = lr.for_client(grpc);
    let content = !bodiless(lr.status);
    if !content {
        lr.body = Bytes::new();
        lr.headers.remove(header::CONTENT_TYPE);
    }
    let len = lr.body.len();
    let mut resp = Response::new(body::full(lr.body));
    *resp.status_mut() = lr.status;
    *resp.headers_mut() = lr.headers;
    proxy_headers::strip_hop_by_hop(resp.headers_mut());
    if !content {
        resp.headers_mut().remove(header::CONTENT_LENGTH);
    } else if !grpc {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp
}

/// Whether a response with `status` has no content (RFC 9110 §6.4.1: 1xx,
/// 204, 304), so the host's own answers leave their body out.
pub(crate) fn bodiless(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// Runs the response-headers phase of the chain (reverse order) on `resp`.
async fn response_filters(
    out: &mut Outcome,
    mut resp: Response<Body>,
) -> Result<Response<Body>, ProxyError> {
    out.responding = true;
    let Some(shared) = out.chain.clone() else {
        return Ok(resp);
    };
    // The chain may be out: a filter holds part of the request for a callout
    // and the upstream answered meanwhile. Its response waits for the chain,
    // since the response phases need it; a host reply (a route timeout during
    // the hold) does not wait for the callout and passes unfiltered
    // (docs/proxy-wasm.md "Differences"). Over (not out): nothing left to run.
    if out.cause.is_none() {
        wait_for_chain(&shared).await?;
    }
    let Some(mut chain) = shared.take() else {
        return Ok(resp);
    };
    chain.x.upstream = out.upstream;
    chain.x.status = Some(resp.status());
    if let Some(cause) = out.cause {
        // A local reply: its cause is readable in the response phases already
        // (proxy-wasm `response.code_details`), not only in `on-log`.
        chain.x.cause = Some(cause.to_string());
    }
    let (any, later) = chain.response_interest();
    if !any {
        // No filter has a response phase: the response passes as it is.
        out.debug.response_filters = Some(Duration::ZERO);
        shared.put(chain);
        return Ok(resp);
    }
    chain.x.response_headers = Some(std::mem::take(resp.headers_mut()).into());
    let eos = resp.body().is_end_stream();
    let started = out.debug.on.then(Instant::now);
    let replaced = chain.on_response_headers(eos).await;
    out.debug.response_filters = started.map(|t| t.elapsed());
    // Kept only for a filter that reads the head later (body, trailers, log):
    // the original goes to the client, a flat snapshot stays (`filter::Head`).
    let headers = chain.x.response_headers.take().map(|mut h| h.take());
    if later {
        chain.x.response_headers = headers.as_ref().map(filter::Head::snapshot);
    }
    *resp.headers_mut() = headers.unwrap_or_default();
    let status = chain.x.status;
    let body_filtered =
        replaced.as_ref().is_ok_and(Option::is_some) && chain.response_body_filtered();
    shared.put(chain);
    let replaced = replaced?;
    if let Some(s) = status {
        *resp.status_mut() = s;
    }
    if let Some(b) = replaced {
        let len = b.len();
        *resp.body_mut() = body::full(b);
        proxy_headers::strip_hop_by_hop(resp.headers_mut());
        if body_filtered || out.grpc {
            // A body phase before the answering filter sees the local body and
            // may resize it (a buffered one gets its length set after it); a
            // gRPC answer has none.
            resp.headers_mut().remove(header::CONTENT_LENGTH);
        } else {
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    response_body(shared, resp, out.grpc).await
}

/// The callout sender of a TCP connection's network filters: the same as an
/// HTTP exchange's.
pub fn callout_sender(
    worker: &Rc<crate::worker::Worker>,
    snapshot: &Arc<crate::server::Snapshot>,
) -> Rc<dyn filter::CalloutSender> {
    Rc::new(PoolCallouts {
        worker: worker.clone(),
        snapshot: Arc::downgrade(snapshot),
    })
}

thread_local! {
    /// The callout sender of this worker thread's last filtered exchange,
    /// reused by the next while the worker and the config snapshot are the
    /// same (the sender keeps nothing per exchange): an allocation and a weak
    /// count per exchange fewer.
    static EXCHANGE_CALLOUTS: std::cell::RefCell<Option<Rc<PoolCallouts>>> =
        const { std::cell::RefCell::new(None) };
}

/// The callout sender of an HTTP exchange on `worker` under `snapshot`.
fn exchange_callouts(
    worker: &Rc<crate::worker::Worker>,
    snapshot: &Arc<crate::server::Snapshot>,
) -> Rc<dyn filter::CalloutSender> {
    EXCHANGE_CALLOUTS.with(|last| {
        let mut last = last.borrow_mut();
        if let Some(s) = last.as_ref() {
            // The weak reference keeps the snapshot's allocation, so an equal
            // address is the same snapshot, not a new one in its place.
            if Rc::ptr_eq(&s.worker, worker)
                && std::ptr::eq(s.snapshot.as_ptr(), Arc::as_ptr(snapshot))
            {
                return s.clone() as Rc<dyn filter::CalloutSender>;
            }
        }
        let s = Rc::new(PoolCallouts {
            worker: worker.clone(),
            snapshot: Arc::downgrade(snapshot),
        });
        *last = Some(s.clone());
        s
    })
}

/// Sends filters' callouts (abi/README.md §5.8) like an attempt without retries:
/// the cluster's balancer, circuit breaker and the worker's pool, under the
/// callout's own timeout. Clusters come from the exchange's snapshot (weak: the
/// worker keeps the last sender for plugin-level callouts, which must not keep an
/// old config alive).
struct PoolCallouts {
    worker: Rc<crate::worker::Worker>,
    snapshot: std::sync::Weak<crate::server::Snapshot>,
}

impl filter::CalloutSender for PoolCallouts {
    fn send(&self, req: filter::CalloutRequest) -> filter::CalloutFuture {
        let worker = self.worker.clone();
        let entry = self.entry(&req.cluster);
        Box::pin(async move {
            let Some(entry) = entry else {
                return Err(filter::CalloutError::Unavailable);
            };
            let timeout = req.timeout;
            tokio::time::timeout(timeout, callout(&worker, &entry, req))
                .await
                .unwrap_or(Err(filter::CalloutError::Timeout))
        })
    }

    fn open_stream(&self, req: filter::CalloutRequest, body: Body) -> filter::CalloutStreamFuture {
        let worker = self.worker.clone();
        let entry = self.entry(&req.cluster);
        Box::pin(async move {
            let Some(entry) = entry else {
                return Err(filter::CalloutError::Unavailable);
            };
            let (mut resp, active) = callout_open(&worker, &entry, req, body, None).await?;
            proxy_headers::strip_hop_by_hop(resp.headers_mut());
            // The request counts as active (circuit breaker) until its response
            // body ends or is dropped.
            Ok(resp.map(|b| body::boxed(Watched::new(b, HoldActive(active)))))
        })
    }
}

impl PoolCallouts {
    /// The cluster `name` of the snapshot, or of the config in force once a
    /// reload replaced it (the sender a worker keeps for plugin-level callouts
    /// outlives the exchange it came with; a TCP connection lets its snapshot
    /// go once set up): `None` if neither has it.
    fn entry(&self, name: &str) -> Option<Arc<ClusterEntry>> {
        let n = crate::config::Name::new(name).ok()?;
        match self.snapshot.upgrade() {
            Some(s) => s.clusters.get(&n).cloned(),
            None => self.worker.shared.snapshot.load().clusters.get(&n).cloned(),
        }
    }
}

/// Keeps a streaming callout's [`crate::cluster::ActiveRequest`] for as long as
/// its response body.
struct HoldActive(crate::cluster::ActiveRequest);

impl Watch for HoldActive {
    fn end(self, _complete: bool) {
        drop(self.0);
    }
}

/// Picks an endpoint of `entry` and sends `req` with `body` (of length `len`
/// when known, else streamed); the response head and the request's breaker slot.
async fn callout_open(
    worker: &crate::worker::Worker,
    entry: &Arc<ClusterEntry>,
    req: filter::CalloutRequest,
    body: Body,
    len: Option<usize>,
) -> Result<(Response<Body>, crate::cluster::ActiveRequest), filter::CalloutError> {
    use filter::CalloutError::Unavailable;
    let cluster = entry.cluster();
    let i = worker
        .balancer(&cluster)
        .pick(None, &[])
        .ok_or(Unavailable)?;
    let ep = cluster.endpoints.get(i).cloned().ok_or(Unavailable)?;
    let active = cluster
        .try_start_request(Some(i))
        .map_err(|_| Unavailable)?;
    let uri = req.path.parse::<Uri>().map_err(|_| Unavailable)?;
    let host = HeaderValue::from_str(req.authority.as_deref().unwrap_or(&req.cluster))
        .map_err(|_| Unavailable)?;
    let mut up = Request::new(body);
    *up.method_mut() = req.method;
    *up.uri_mut() = uri;
    *up.headers_mut() = req.headers;
    up.headers_mut().insert(header::HOST, host);
    if let Some(len) = len {
        if len > 0 || !matches!(*up.method(), Method::GET | Method::HEAD) {
            up.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    let target = Target {
        addr: ep.address,
        host: &ep.host,
        cluster: &cluster,
        endpoint: Some(i),
        proxied: None,
    };
    match worker.pool.send(&entry.upstream, target, up).await {
        Ok(resp) => {
            active.record_status(resp.status().as_u16());
            Ok((resp, active))
        }
        Err(e) => {
            tracing::debug!(cluster = %cluster.name, "callout: {}", e.detail);
            active.record_failure();
            if e.kind == Kind::UpstreamReset {
                active.record_reset();
            }
            Err(Unavailable)
        }
    }
}

/// One callout: pick, send, read the whole (capped) response.
async fn callout(
    worker: &crate::worker::Worker,
    entry: &Arc<ClusterEntry>,
    req: filter::CalloutRequest,
) -> filter::CalloutResult {
    use filter::CalloutError::{LimitExceeded, Unavailable};
    use http_body_util::BodyExt;
    let len = req.body.len();
    let max = req.max_response_body;
    let body = body::full(req.body.clone());
    let (resp, _active) = callout_open(worker, entry, req, body, Some(len)).await?;
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let collected = http_body_util::Limited::new(body, max)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                LimitExceeded
            } else {
                Unavailable
            }
        })?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body = collected.to_bytes();
    let mut headers = parts.headers;
    proxy_headers::strip_hop_by_hop(&mut headers);
    Ok(filter::CalloutResponse {
        status,
        headers,
        body,
        trailers,
    })
}

/// Rejects requests whose framing a proxy must not guess at (RFC 9112 §6.1, the
/// request-smuggling shapes) and enforces the header count on HTTP/2 (hyper
/// enforces it on HTTP/1.1 while parsing).
fn check_framing<B>(req: &Request<B>, limits: &crate::config::Limits) -> Result<(), ProxyError> {
    let h = req.headers();
    let max_headers = limits.max_request_headers as usize;
    if req.version() < Version::HTTP_2 {
        // `max_request_headers_size`, counted as HTTP/2 counts its header list
        // (h2 enforces it there), whatever the head's segmentation: hyper's own
        // cap (`max_buf_size`) only sees a head that arrives in pieces, as its
        // read buffer grows in doubling steps.
        let max_size = limits.max_request_headers_size.0;
        let size = header_list_size(req);
        if size > max_size {
            return Err(ProxyError::new(
                Kind::HeadersTooLarge,
                format!("{size} bytes of headers > {max_size}"),
            ));
        }
        // RFC 9112 §3.2: more than one `Host` is a 400 (as nginx answers): which
        // one names the target would be anyone's guess. So is an HTTP/1.1 request
        // with none, even in absolute form (nginx answers the same); HTTP/1.0
        // predates `Host`, and its absolute form names the target alone.
        let mut hosts = h.get_all(header::HOST).iter();
        match (hosts.next(), hosts.next()) {
            (Some(_), Some(_)) => {
                return Err(ProxyError::new(
                    Kind::BadRequest,
                    "more than one Host header",
                ))
            }
            (None, _) if req.version() == Version::HTTP_11 => {
                return Err(ProxyError::new(
                    Kind::BadRequest,
                    "HTTP/1.1 request without a Host header",
                ))
            }
            _ => {}
        }
        let te: Vec<&HeaderValue> = h.get_all(header::TRANSFER_ENCODING).iter().collect();
        if !te.is_empty() {
            if h.contains_key(header::CONTENT_LENGTH) {
                return Err(ProxyError::new(
                    Kind::BadRequest,
                    "both Content-Length and Transfer-Encoding",
                ));
            }
            let only_chunked = te.len() == 1
                && te[0]
                    .to_str()
                    .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            if !only_chunked {
                return Err(ProxyError::new(
                    Kind::NotImplemented,
                    "transfer codings other than `chunked` are not supported",
                ));
            }
        }
    } else if h.len() > max_headers && h2_field_count(h) > max_headers {
        return Err(ProxyError::new(
            Kind::HeadersTooLarge,
            format!("{} headers > {max_headers}", h2_field_count(h)),
        ));
    } else if h.get_all(header::HOST).iter().nth(1).is_some() {
        // As over HTTP/1.1 (above): without `:authority` the virtual host was
        // chosen by the first and anyone's guess was the upstream's; nghttp2
        // (so Envoy) refuses a repeated `host` whether or not `:authority` is
        // there.
        return Err(ProxyError::new(
            Kind::BadRequest,
            "more than one host header",
        ));
    } else if h.get_all(header::CONTENT_LENGTH).iter().nth(1).is_some() {
        // RFC 9110 §8.6: a proxy must not forward an invalid length; over
        // HTTP/1.1 hyper refuses the same (nghttp2, so Envoy, too).
        return Err(ProxyError::new(
            Kind::BadRequest,
            "more than one content-length",
        ));
    } else if let Some((name, _)) = h.iter().find(|(_, v)| padded(v.as_bytes())) {
        // RFC 9113 §8.2.1: a field value must not start or end with
        // whitespace (HTTP/1.1 parsing trims it); such a request is
        // malformed, as nghttp2 (so Envoy) treats it.
        return Err(ProxyError::new(
            Kind::BadRequest,
            format!("the value of {name} starts or ends with whitespace"),
        ));
    }
    Ok(())
}

/// `http.headers_with_underscores: drop | reject` (Envoy's
/// `headers_with_underscores_action`): a header named with `_` is removed, or
/// the request refused with 400, before filters and routes see it, counted.
/// CGI-style upstreams (PHP, WSGI, Rack) read `x_user` and `x-user` as the one
/// variable `HTTP_X_USER`, so a client's `x_user` could stand in for the
/// `x-user` a filter sets or a rule checks.
fn underscore_headers(
    h: &mut http::HeaderMap,
    action: UnderscoreHeaders,
    listener: &crate::listener::ListenerCtx,
) -> Result<(), ProxyError> {
    let underscored = |k: &HeaderName| k.as_str().contains('_');
    let Some(first) = h.keys().find(|k| underscored(k)) else {
        return Ok(());
    };
    if action == UnderscoreHeaders::Reject {
        listener.stats.underscore_headers_rejected.inc();
        return Err(ProxyError::new(
            Kind::BadRequest,
            format!("header name with an underscore: {first}"),
        ));
    }
    let names: Vec<HeaderName> = h.keys().filter(|k| underscored(k)).cloned().collect();
    for name in names {
        let fields = h.get_all(&name).iter().count();
        listener.stats.underscore_headers_dropped.add(fields as u64);
        h.remove(&name);
    }
    Ok(())
}

/// `headers_with_underscores` for a request's trailers: `drop` removes the
/// fields whose names have an underscore, `reject` fails the request body
/// (the upstream request is reset; the client gets 400 if no response came
/// yet), counted as for headers.
struct UnderscoreTrailers {
    reject: bool,
    dropped: crate::stats::Counter,
    rejected: crate::stats::Counter,
    fault: body::ClientFault,
}

impl body::Watch for UnderscoreTrailers {
    fn frame(&mut self, frame: &mut hyper::body::Frame<Bytes>) -> Result<(), body::BoxError> {
        let Some(t) = frame.trailers_mut() else {
            return Ok(());
        };
        let names: Vec<HeaderName> = t
            .keys()
            .filter(|k| k.as_str().contains('_'))
            .cloned()
            .collect();
        let Some(first) = names.first() else {
            return Ok(());
        };
        if self.reject {
            self.rejected.inc();
            let why = format!("trailer name with an underscore: {first}");
            self.fault
                .set(ProxyError::new(Kind::BadRequest, why.clone()));
            return Err(Box::new(ProxyError::new(Kind::BadRequest, why)));
        }
        for name in names {
            self.dropped.add(t.get_all(&name).iter().count() as u64);
            t.remove(&name);
        }
        Ok(())
    }
}

/// The fields of an HTTP/2 request's head as `max_request_headers` counts them:
/// the `cookie` crumbs a client split (RFC 9113 §8.2.3; browsers send one per
/// cookie) count as the one field they are joined into, as the same cookies
/// count over HTTP/1.1 and as Envoy counts them. Without this, a browser with a
/// hundred cookies got 431 over HTTP/2 only.
fn h2_field_count(h: &http::HeaderMap) -> usize {
    let crumbs = h.get_all(header::COOKIE).iter().count();
    h.len() - crumbs.saturating_sub(1)
}

/// Whether a field value starts or ends with SP or HTAB.
fn padded(v: &[u8]) -> bool {
    matches!(v.first(), Some(b' ' | b'\t')) || matches!(v.last(), Some(b' ' | b'\t'))
}

/// RFC 9113 §8.2.3: an HTTP/2 client may split `cookie` into several fields;
/// they are joined with `; ` into one, which an HTTP/1.1 upstream must get
/// (Envoy and nginx join them too). One field (or none) is left as it is.
fn join_cookies(h: &mut http::HeaderMap) {
    let mut all = h.get_all(header::COOKIE).iter();
    if all.nth(1).is_none() {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for v in h.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

/// Replaces the request's path by its normal form ([`crate::path`]), the query
/// string untouched, and returns the new path and query if it changed; a path that
/// cannot be normalized is a 400, counted.
fn normalize_path<B>(
    req: &mut Request<B>,
    http: &crate::config::HttpListener,
    listener: &crate::listener::ListenerCtx,
) -> Result<Option<String>, ProxyError> {
    let path = match crate::path::normalize(req.uri().path(), crate::path::Options::of(http)) {
        Ok(None) => return Ok(None),
        Ok(Some(p)) => p,
        Err(e) => {
            listener.stats.paths_rejected.inc();
            return Err(ProxyError::new(Kind::BadRequest, e.to_string()));
        }
    };
    let mut pq = path;
    if let Some(q) = req.uri().query() {
        pq.push('?');
        pq.push_str(q);
    }
    // Scheme and authority (absolute-form, HTTP/2) are kept as they came.
    let mut parts = req.uri().clone().into_parts();
    let uri = http::uri::PathAndQuery::try_from(pq.clone())
        .map_err(|e| e.to_string())
        .and_then(|pq| {
            parts.path_and_query = Some(pq);
            Uri::from_parts(parts).map_err(|e| e.to_string())
        })
        .map_err(|e| ProxyError::new(Kind::Internal, format!("normalized path: {e}")))?;
    *req.uri_mut() = uri;
    Ok(Some(pq))
}

/// An error answered for the route `m` (when the request matched one): the
/// route finishes the reply's headers as it does an upstream response's. A
/// client that went away gets no reply to finish.
fn routed_error(e: ProxyError, m: Option<&Matched<'_>>, via: Option<&str>) -> ProxyError {
    match m {
        Some(m) if e.kind != Kind::DownstreamReset => {
            e.finish_headers(|h| finish_response_headers(m, via, Version::HTTP_11, h, false))
        }
        _ => e,
    }
}

/// Response headers: hop-by-hop out (kept for a 101), route then vhost ops, via.
fn finish_response_headers(
    m: &Matched<'_>,
    via: Option<&str>,
    received: Version,
    h: &mut http::HeaderMap,
    switching: bool,
) {
    if !switching {
        // Both framings on one response (RFC 9112 §6.3): the body was read as
        // chunked, so a `content-length` left on it would misframe it downstream.
        if h.contains_key(header::TRANSFER_ENCODING) {
            h.remove(header::CONTENT_LENGTH);
        }
        proxy_headers::strip_hop_by_hop(h);
    }
    m.apply_response_headers(h);
    if let Some(v) = via {
        proxy_headers::add_via(h, &via_value(received, v));
    }
}

fn via_value(version: Version, name: &str) -> HeaderValue {
    let proto = match version {
        Version::HTTP_2 => "2",
        Version::HTTP_10 => "1.0",
        _ => "1.1",
    };
    HeaderValue::from_str(&format!("{proto} {name}"))
        .unwrap_or_else(|_| HeaderValue::from_static("1.1 legate"))
}

/// An attempt admitted by the circuit breakers, not yet sent
/// ([`Attempts::admit`]).
struct Admitted {
    addr: SocketAddr,
    host: Arc<str>,
    index: Option<usize>,
    active: crate::cluster::ActiveRequest,
}

/// One request's attempts against a cluster.
struct Attempts<'a> {
    conn: &'a ConnCtx,
    entry: &'a ClusterEntry,
    method: &'a Method,
    /// Moved into the last attempt's request; cloned for earlier ones.
    headers: RefCell<http::HeaderMap>,
    path: &'a str,
    authority: &'a str,
    policy: Option<&'a RetryPolicy>,
    per_try: Option<Duration>,
    /// A streamed body's end, where the timeouts start (`None`: at once).
    sent: Option<&'a BodySent>,
    /// An allowed HTTP/1.1 upgrade ([`crate::upstream::UpgradeRequest`]).
    upgrade: bool,
}

impl Attempts<'_> {
    async fn run(
        &self,
        mut source: ReqBody,
        out: &mut Outcome,
    ) -> Result<Response<Body>, ProxyError> {
        let cluster = &self.entry.cluster();
        let balancer = self.conn.worker.balancer(cluster);
        let client = out.client.unwrap_or_else(|| self.conn.peer.ip());
        let mut hash = cluster.hash_key(&self.headers.borrow(), client);
        if hash.is_none() {
            // A sticky cookie to make (`hash_on.cookie_ttl`): the ring key is
            // its value's, and the response carries it.
            if let Some((key, cookie)) = cluster.sticky_cookie(client, self.conn.peer) {
                hash = Some(key);
                out.set_cookie = Some(cookie);
            }
        }
        let max_retries = self.policy.map_or(0, |p| p.num_retries);
        let mut tried: Vec<usize> = Vec::new();
        let mut attempt: u32 = 0;
        // The circuit breakers' count of this request's retry in flight.
        let mut retry_slot = None;
        // The next attempt, admitted before its backoff (a retry's).
        let mut next: Option<Admitted> = None;
        loop {
            let Admitted {
                addr: target_addr,
                host,
                index,
                active: admitted,
            } = match next.take() {
                Some(n) => n,
                None => self.admit(cluster, &balancer, hash, &mut tried)?,
            };
            out.upstream = Some(target_addr);
            out.attempts = attempt + 1;
            out.debug.connection = None;
            let last = !source.replayable() || attempt >= max_retries;
            let req = self.build_request(source.take(), last)?;
            // In `out`, not here: a route timeout drops this future and records
            // the attempt from there, and a response keeps it until its body ends.
            let active = out.active.insert(admitted);
            let target = Target {
                addr: target_addr,
                host: &host,
                cluster,
                endpoint: index,
                proxied: None,
            };
            // In a block of its own: an attempt cut by its per-try timeout is
            // dropped (its upstream stream reset, its pool slot freed) before
            // the backoff, not after it.
            let result = {
                let send =
                    std::pin::pin!(self
                        .conn
                        .worker
                        .pool
                        .send(&self.entry.upstream, target, req));
                match self.per_try {
                    Some(d) => after_sent(d, self.sent, send).await.unwrap_or_else(|_| {
                        Err(ProxyError::new(
                            Kind::PerTryTimeout,
                            format!("per-try timeout {d:?}"),
                        ))
                    }),
                    None => send.await,
                }
            };
            // A failure the client's body caused (over its limit, a refused
            // trailer) is the client's, whatever the upstream made of it: not
            // the endpoint's, not retried.
            let result = match result {
                Err(e) if e.side() == Side::Upstream => Err(out.client_fault.take().unwrap_or(e)),
                r => r,
            };
            // Asked again: a body kept as it streams may have outgrown its
            // copy during the attempt.
            let can_retry = source.replayable() && attempt < max_retries;
            let retry = match &result {
                Ok(resp) => {
                    active.record_status(resp.status().as_u16());
                    self.policy.is_some_and(|p| {
                        p.retries_grpc(resp.headers())
                            || (p.allows_method(self.method) && p.retries_status(resp.status()))
                    })
                }
                Err(e) => {
                    if e.kind == Kind::PerTryTimeout {
                        active.record_timeout();
                    } else if e.kind == Kind::Overloaded {
                        active.not_made();
                    } else if e.side() == Side::Upstream {
                        active.record_failure();
                        if e.kind == Kind::UpstreamReset {
                            active.record_reset();
                        }
                    }
                    self.policy
                        .is_some_and(|p| retry_on_error(p, e, self.method))
                }
            };
            if retry && source.replayable() && attempt >= max_retries {
                cluster
                    .stats
                    .upstream_rq_retry_limit_exceeded
                    .fetch_add(1, Relaxed);
            } else if !retry && attempt > 0 && result.is_ok() {
                cluster
                    .stats
                    .upstream_rq_retry_success
                    .fetch_add(1, Relaxed);
            }
            if can_retry && retry && cluster.retry_permit(&mut retry_slot) {
                // This attempt is over: its slot goes back before the retry
                // takes one (one request retries under `max_requests: 1`).
                out.active = None;
                // The retry is admitted (an endpoint, `max_requests`, adaptive
                // concurrency) before this answer is dropped: refused, this is
                // the answer the client gets, not the refusal's 503, and it
                // counts as active again while its body streams. Admitted, the
                // retry holds its slot through the backoff.
                let Ok(n) = self.admit(cluster, &balancer, hash, &mut tried) else {
                    if result.is_ok() {
                        out.active = Some(cluster.resume_request(index));
                    }
                    return Self::answer(result, out);
                };
                drop(result);
                next = Some(n);
                self.backoff(attempt).await;
                if let Some(n) = &mut next {
                    // Its latency sample starts now, not before the wait.
                    n.active.restart_clock();
                }
                attempt += 1;
                // Counted as it is sent (a refused one was not made).
                cluster.stats.upstream_rq_retry.fetch_add(1, Relaxed);
                continue;
            }
            return Self::answer(result, out);
        }
    }

    /// What the client gets of the last attempt's `result`.
    fn answer(
        result: Result<Response<Body>, ProxyError>,
        out: &mut Outcome,
    ) -> Result<Response<Body>, ProxyError> {
        match result {
            Ok(mut resp) => {
                out.debug.connection = resp
                    .extensions_mut()
                    .remove::<crate::upstream::ConnectionUse>();
                Ok(resp)
            }
            Err(e) => {
                out.active = None;
                Err(e)
            }
        }
    }

    /// The next attempt's endpoint, admitted by the cluster's circuit breakers
    /// (`max_requests`, adaptive concurrency): from the balancer (skipping
    /// those `tried`, to which it is added), or where the client was going
    /// (`original_dst`).
    fn admit(
        &self,
        cluster: &Arc<crate::cluster::Cluster>,
        balancer: &crate::cluster::Balancer,
        hash: Option<u64>,
        tried: &mut Vec<usize>,
    ) -> Result<Admitted, ProxyError> {
        // Original-destination clusters send to where the client was going.
        let (addr, host, index) = if cluster.config.original_dst {
            let addr = self.conn.original_dst.ok_or_else(|| {
                ProxyError::new(
                    Kind::NoHealthyUpstream,
                    "connection has no original destination",
                )
            })?;
            (addr, Arc::<str>::from(addr.ip().to_string()), None)
        } else {
            let idx = balancer.pick(hash, tried).ok_or_else(|| {
                ProxyError::new(
                    Kind::NoHealthyUpstream,
                    format!("cluster `{}` has no available endpoint", cluster.name),
                )
            })?;
            tried.push(idx);
            let ep = &cluster.endpoints[idx];
            (ep.address, ep.host.clone(), Some(idx))
        };
        let active = cluster.try_start_request(index)?;
        Ok(Admitted {
            addr,
            host,
            index,
            active,
        })
    }

    /// The attempt's request in HTTP/1.1 form (origin-form URI + Host); the pool
    /// turns it into HTTP/2 form when the connection it picks speaks h2.
    fn build_request(&self, body: Body, last: bool) -> Result<Request<Body>, ProxyError> {
        let uri: Uri = self.path.parse().map_err(|e| {
            ProxyError::new(Kind::BadRequest, format!("cannot build upstream URI: {e}"))
        })?;
        let headers = if last {
            std::mem::take(&mut *self.headers.borrow_mut())
        } else {
            self.headers.borrow().clone()
        };
        // A body replayed from the retry buffer has a known length, which
        // hyper would write when the head has none: framed by the head, as
        // the body streamed on a route without retries.
        let mut req = Request::new(body::framed_by_head(&headers, body));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let host = HeaderValue::from_str(self.authority)
            .map_err(|_| ProxyError::new(Kind::BadRequest, "invalid authority"))?;
        req.headers_mut().insert(header::HOST, host);
        if self.upgrade {
            req.extensions_mut().insert(crate::upstream::UpgradeRequest);
        }
        Ok(req)
    }

    /// Exponential backoff with full jitter (as Envoy): a random wait in
    /// [0, min(max, base × 2^attempt)].
    async fn backoff(&self, attempt: u32) {
        let Some(p) = self.policy else { return };
        let (base, max) = (p.backoff_base, p.backoff_max);
        let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(max);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        let wait = rand::rng().random_range(0..=ms);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// The end of a request body streamed upstream as the client sends it: the
/// route and per-try timeouts start there, as Envoy's start once the whole
/// request is sent, so a client's slow upload is neither a 504 nor its
/// endpoint's timeout. Set by the body's [`SentEnd`]; waited for by
/// [`after_sent`]. A stalled upload is the stream idle timeout's
/// ([`crate::idle`]: each frame is activity).
#[derive(Default)]
struct BodySent {
    ended: Cell<bool>,
    /// Two wait at once (the route timeout around the attempts, the per-try
    /// one around the send): `Notify` wakes them all.
    notify: tokio::sync::Notify,
}

/// Sets [`BodySent`] once the body's last frame went by.
struct SentEnd(Rc<BodySent>);

impl Watch for SentEnd {
    fn end(self, complete: bool) {
        // A failed body fails its attempt: nothing to time.
        if complete {
            self.0.ended.set(true);
            self.0.notify.notify_waiters();
        }
    }
}

/// `fut` bounded by `limit`, which starts once `sent` has ended (`None`: at
/// once). `fut` done first (an early response head, a failure) ends the wait.
/// Pinned by the caller: an `async fn` that took it by value would hold it
/// twice (the argument, and the pinned copy it polls), and the attempts'
/// state is kilobytes.
async fn after_sent<F: Future>(
    limit: Duration,
    sent: Option<&BodySent>,
    mut fut: Pin<&mut F>,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    if let Some(s) = sent {
        // Made before the check: it sees a notice that comes after it.
        let mut ended = std::pin::pin!(s.notify.notified());
        if !s.ended.get() {
            let early = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                ended.as_mut().poll(cx).map(|()| None)
            })
            .await;
            if let Some(r) = early {
                return Ok(r);
            }
        }
    }
    tokio::time::timeout(limit, fut).await
}

/// Whether `e` is retried under `p` (as Envoy, `5xx` and `gateway-error` also cover
/// "no response at all": connect failure, reset, per-try timeout, and a response
/// head that does not parse, which Envoy's codec turns into a reset of the stream).
/// A request the upstream did not process (`refused-stream`) is retried whatever
/// `method` is; other conditions apply to the methods the policy allows.
fn retry_on_error(p: &RetryPolicy, e: &ProxyError, method: &Method) -> bool {
    if e.unprocessed && p.retries_refused_stream() {
        return true;
    }
    // Nothing of the request reached the upstream: any method, as nginx's
    // `proxy_next_upstream error` (a non-idempotent request is held back
    // only once it was sent).
    if e.kind == Kind::ConnectFailed {
        return p.retries_connect_failure();
    }
    if !p.allows_method(method) {
        return false;
    }
    match e.kind {
        Kind::UpstreamReset | Kind::UpstreamProtocol | Kind::PerTryTimeout => p.retries_reset(),
        _ => false,
    }
}

/// RFC 8441 §4: an HTTP/2 `CONNECT` with `:protocol` (which hyper lets in
/// only on a listener with `http.extended_connect`) asks for a tunnel of
/// that protocol over its stream. It is made what an HTTP/1.1 upgrade is —
/// `GET` with `Upgrade: PROTOCOL` and `Connection: upgrade` — so that routes,
/// the upgrade rules, filters and the upstream see one. Whether it was one.
fn extended_connect<B>(req: &mut Request<B>) -> bool {
    if req.version() != Version::HTTP_2 || req.method() != Method::CONNECT {
        return false;
    }
    let Some(protocol) = req.extensions().get::<hyper::ext::Protocol>() else {
        return false;
    };
    let Ok(token) = HeaderValue::from_str(protocol.as_str()) else {
        // (Left a CONNECT: refused as one.)
        return false;
    };
    *req.method_mut() = Method::GET;
    let h = req.headers_mut();
    h.insert(header::UPGRADE, token);
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    true
}

static SEC_WEBSOCKET_KEY: http::HeaderName = http::HeaderName::from_static("sec-websocket-key");
static SEC_WEBSOCKET_ACCEPT: http::HeaderName =
    http::HeaderName::from_static("sec-websocket-accept");

/// A fresh `Sec-WebSocket-Key` (16 random bytes, base64) and the
/// `Sec-WebSocket-Accept` an upstream that understood it answers (RFC 6455
/// §4.2.2: base64 of SHA-1 of the key and the protocol's GUID).
fn websocket_key() -> (HeaderValue, String) {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let accept = websocket_accept(&key);
    // (Base64 is always a valid header value.)
    let key = HeaderValue::from_str(&key).unwrap_or(HeaderValue::from_static(""));
    (key, accept)
}

/// The `Sec-WebSocket-Accept` for `key` (RFC 6455 §4.2.2).
fn websocket_accept(key: &str) -> String {
    use base64::Engine as _;
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The `Upgrade` value an upgrade is decided on: its lines joined, so that a
/// request with two never matches one allowed type.
fn upgrade_value(h: &http::HeaderMap) -> Option<HeaderValue> {
    let mut lines = h.get_all(header::UPGRADE).iter();
    let first = lines.next()?;
    let mut rest = lines.peekable();
    if rest.peek().is_none() {
        return Some(first.clone());
    }
    let mut joined = first.as_bytes().to_vec();
    for v in rest {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(v.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// `HTTP2-Settings`: the h2c upgrade's settings for the connection it arrived on.
static HTTP2_SETTINGS: http::HeaderName = http::HeaderName::from_static("http2-settings");

/// Removes an HTTP/1 `Upgrade: h2c` offer (`Upgrade`; the `Connection` tokens
/// naming it go with `Connection` itself, a hop-by-hop header): Envoy's codec
/// does the same, h2c is not upgraded to and the request is answered over
/// HTTP/1.1. `HTTP2-Settings` goes from every request: it is connection-specific
/// (RFC 7540 §3.2.1), meaningless to the upstream, whatever the version.
fn strip_h2c(h: &mut http::HeaderMap, h1: bool) {
    if h1 && offers_h2c(h) {
        h.remove(header::UPGRADE);
    }
    h.remove(&HTTP2_SETTINGS);
}

/// Whether a request's `Upgrade` offers `h2c` (see [`strip_h2c`]).
fn offers_h2c(h: &http::HeaderMap) -> bool {
    h.get_all(header::UPGRADE)
        .iter()
        .any(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"h2c"))
}

/// The request's authority (absolute form or `:authority`, else `Host`),
/// which must be RFC 9110 §7.2's `uri-host [":" port]`: anything else is a
/// 400 (RFC 9112 §3.2), as Envoy and nginx answer. Userinfo (RFC 9113
/// §8.3.1, RFC 9110 §4.2.4), path, query or fragment characters and spaces
/// are refused, so routes match and the upstream gets exactly a host.
///
/// An HTTP/1.0 request may have none (`Host` came with HTTP/1.1: HAProxy's
/// default `option httpchk` sends `OPTIONS / HTTP/1.0` without one): its
/// authority is `local`, the address the client reached (`ip:port`), as nginx
/// serves such a request from the server of the address it came to. Routes
/// match it (a `*` virtual host, or one naming the address), and the
/// upstream gets it as its `Host`. An HTTP/1.1 request without `Host` is a 400
/// before this (`check_framing`), an HTTP/2 one without `:authority` here.
/// With the authority, whether it is `local`'s.
fn authority_of<B>(req: &Request<B>, local: SocketAddr) -> Result<(String, bool), ProxyError> {
    if req.uri().scheme().is_none()
        && req.uri().authority().is_some()
        && req.method() != Method::CONNECT
    {
        // `GET host:port HTTP/1.1` (RFC 9112 §3.2.3: the authority form is
        // CONNECT's): it would choose the virtual host over `Host`.
        return Err(ProxyError::new(
            Kind::BadRequest,
            "an authority-form request target (host:port) is only for CONNECT",
        ));
    }
    let raw = match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok()),
    };
    match raw {
        None if req.version() < Version::HTTP_11 => Ok((local_authority(local), true)),
        None | Some("") => Err(ProxyError::new(
            Kind::BadRequest,
            "request has no Host/:authority",
        )),
        Some(a) if valid_authority(a) => Ok((a.to_string(), false)),
        Some(a) => Err(ProxyError::new(
            Kind::BadRequest,
            format!("invalid Host/:authority {a:?}: not a host with an optional port"),
        )),
    }
}

/// `local` as an authority, `ip:port` (an IPv6 address in brackets, without
/// its zone: it is no part of an authority).
fn local_authority(local: SocketAddr) -> String {
    match local {
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        SocketAddr::V4(a) => a.to_string(),
    }
}

/// Whether upgrade `token` is tunnelled: by `route`'s `upgrades`, else (or
/// without a route) by the listener's list. A refusal is counted.
fn check_upgrade(
    token: &HeaderValue,
    route: Option<&crate::router::Route>,
    http: &crate::config::HttpListener,
    stats: &crate::listener::ListenerStats,
) -> Result<(), ProxyError> {
    let t = token.to_str().unwrap_or_default();
    let allowed = match route {
        Some(r) => r.allows_upgrade(t, &http.upgrades),
        None => crate::router::listener_allows_upgrade(&http.upgrades, t),
    };
    if allowed {
        return Ok(());
    }
    stats.upgrades_refused.inc();
    Err(ProxyError::new(
        Kind::UpgradeRefused,
        format!("upgrade `{t}`"),
    ))
}

/// The smallest head buffer hyper's HTTP/1 server accepts (`max_buf_size`).
pub(crate) const H1_HEAD_BUFFER_FLOOR: u64 = 8192;

/// What RFC 9113 §6.5.2 adds to each field's name and value in the size of a
/// header list (`SETTINGS_MAX_HEADER_LIST_SIZE`, which h2 enforces).
const FIELD_OVERHEAD: u64 = 32;

/// The size of an HTTP/1 request's head as HTTP/2 counts a header list
/// (RFC 9113 §6.5.2, as h2 enforces `max_request_headers_size`): each field's
/// name and value plus 32 bytes, the request line counted as the
/// pseudo-headers HTTP/2 would carry (`:method`, `:path`; `:scheme` and
/// `:authority` for an absolute-form target). One pass over the header map,
/// no allocation. Never less than the head's bytes on the wire (each field
/// line's `: ` and CRLF are 4 bytes of the 32), unless a client pads values
/// with whitespace: hyper's `max_buf_size` (the limit) then refuses it.
fn header_list_size<B>(req: &Request<B>) -> u64 {
    let field = |name: usize, value: usize| (name + value) as u64 + FIELD_OVERHEAD;
    let uri = req.uri();
    let mut size = field(":method".len(), req.method().as_str().len());
    if let Some(p) = uri.path_and_query() {
        size += field(":path".len(), p.as_str().len());
    }
    if let Some(s) = uri.scheme_str() {
        size += field(":scheme".len(), s.len());
    }
    if let Some(a) = uri.authority() {
        size += field(":authority".len(), a.as_str().len());
    }
    size + req
        .headers()
        .iter()
        .map(|(n, v)| field(n.as_str().len(), v.len()))
        .sum::<u64>()
}

/// Whether `a` is `uri-host [":" port]` (RFC 3986 §3.2.2: an IPv6 literal in
/// brackets, or a reg-name / IPv4 address of unreserved, pct-encoded and
/// sub-delim characters; the port digits only).
fn valid_authority(a: &str) -> bool {
    let port = match a.strip_prefix('[') {
        Some(rest) => {
            let Some((literal, after)) = rest.split_once(']') else {
                return false;
            };
            let ipv6 = !literal.is_empty()
                && literal
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
            if !ipv6 {
                return false;
            }
            match after {
                "" => return true,
                p => match p.strip_prefix(':') {
                    Some(port) => port,
                    None => return false,
                },
            }
        }
        None => {
            let (host, port) = a.split_once(':').unwrap_or((a, ""));
            let b = host.as_bytes();
            let mut i = 0;
            while i < b.len() {
                let ok = match b[i] {
                    b'%' => {
                        let hex = b
                            .get(i + 1..i + 3)
                            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
                        i += 2;
                        hex
                    }
                    c => c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&c),
                };
                if !ok {
                    return false;
                }
                i += 1;
            }
            if host.is_empty() {
                return false;
            }
            port
        }
    };
    // RFC 3986 allows an empty port; one past 65535 names no port (nginx and
    // Envoy refuse it), and the upstream and a `host:port` domain would read it
    // each their own way.
    port.bytes().all(|b| b.is_ascii_digit()) && (port.is_empty() || port.parse::<u16>().is_ok())
}

/// Whether `h` has exactly one `content-length`, all digits: one hyper's
/// HTTP/1.1 encoder writes as it is (it fails the response on any other).
fn one_valid_length(h: &http::HeaderMap) -> bool {
    let mut values = h.get_all(header::CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 19 && b.iter().all(u8::is_ascii_digit)
        }
        _ => false,
    }
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Bytes both ways between an upgraded client and upstream connection; the
/// attempt's `active` slot is held until they stop. However the splice ends
/// (either side closes, an error, the idle or drain timeout aborting this
/// task), `end` gets the bytes it moved and writes the exchange's line.
async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    active: Option<crate::cluster::ActiveRequest>,
    end: Rc<TunnelEnd>,
) {
    let _active = active;
    let _ends = Ends(end.clone());
    let (down, up) = match tokio::try_join!(down, up) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!("upgrade failed: {e}");
            return;
        }
    };
    let mut down = Counted {
        io: hyper_util::rt::TokioIo::new(down),
        end,
    };
    let mut up = hyper_util::rt::TokioIo::new(up);
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!("upgraded connection ended: {e}");
    }
}

/// Watches an HTTP/2 stream's tunnel (extended CONNECT) as the connection
/// watches an HTTP/1.1 one: cut after `idle` without a byte either way (the
/// route's `idle_timeout`, else the listener's; `None`: never),
/// `drain_timeout` after its listener stopped, or `drain_timeout` after its
/// connection's `max_connection_duration` (`lifetime_end`): the connection,
/// which counts the tunnel in flight, would not close under it. The client
/// going away ends it too (the stream goes with the connection).
async fn watch_stream_tunnel(
    mut tunnel: Tunnel,
    idle: Option<std::time::Duration>,
    lifetime_end: Option<tokio::time::Instant>,
    listener: Arc<crate::listener::ListenerCtx>,
    worker: Rc<crate::worker::Worker>,
) {
    let drained = listener.drained(&worker.shared.snapshot);
    tokio::pin!(drained);
    let lifetime_cut =
        lifetime_end.map(|end| end + worker.shared.snapshot.load().config.drain_timeout.get());
    tunnel.end.touch();
    loop {
        let deadline = idle.map(|t| tunnel.end.last_moved() + t);
        tokio::select! {
            _ = &mut tunnel.task => return,
            () = &mut drained => {
                tunnel.cut("drain_timeout");
                return;
            }
            () = crate::connection::until(lifetime_cut) => {
                tunnel.cut("max_connection_duration");
                return;
            }
            () = crate::connection::until(deadline) => {
                // Bytes that moved meanwhile set a later deadline: wait on.
                if idle.is_some_and(|t| tunnel.end.last_moved() + t <= tokio::time::Instant::now()) {
                    tunnel.cut("idle_timeout");
                    return;
                }
            }
        }
    }
}

/// The tunnel a connection became ([`crate::connection::ConnCtx::tunnel`]):
/// the task splicing it, and its end, which the connection tells why it cut
/// the tunnel.
pub struct Tunnel {
    /// The splice; it ends when either side closes.
    pub task: tokio::task::JoinHandle<()>,
    end: Rc<TunnelEnd>,
    /// The route's `idle_timeout` (`Some(None)`: off), which bounds the
    /// tunnel in place of the listener's `limits.idle_timeout`, as Envoy's
    /// route `idle_timeout` bounds an upgraded stream.
    pub idle: Option<Option<std::time::Duration>>,
}

impl Tunnel {
    /// Cuts the tunnel; its exchange is logged with `cause` (`idle_timeout`,
    /// `drain_timeout`), as a request the proxy cut is.
    pub fn cut(&self, cause: &'static str) {
        self.end.cause.set(Some(cause));
        self.task.abort();
    }
}

/// An upgraded exchange's end: the request's [`Done`] (its access-log line,
/// latency, stats), held from the `101` until the tunnel ends, and the bytes
/// the tunnel moved on the client's side, which the line adds to the
/// request's (`bytes_received`) and response's (`bytes_sent`).
#[derive(Default)]
struct TunnelEnd {
    done: RefCell<Option<Done>>,
    ended: Cell<bool>,
    /// Why the proxy cut the tunnel, if it did ([`Tunnel::cut`]).
    cause: Cell<Option<&'static str>>,
    received: Cell<u64>,
    sent: Cell<u64>,
    /// When a byte last moved through the client's side (HTTP/2 tunnels'
    /// idle timeout, [`watch_stream_tunnel`]).
    moved: Cell<Option<tokio::time::Instant>>,
}

impl TunnelEnd {
    /// Bytes moved now.
    fn touch(&self) {
        self.moved.set(Some(tokio::time::Instant::now()));
    }

    /// When bytes last moved (or the tunnel opened).
    fn last_moved(&self) -> tokio::time::Instant {
        self.moved.get().unwrap_or_else(tokio::time::Instant::now)
    }

    /// Holds the exchange until the tunnel ends; if it already did (its
    /// upgrade failed), the exchange ends now.
    fn hold(&self, done: Done) {
        if self.ended.get() {
            self.finish(done);
        } else {
            *self.done.borrow_mut() = Some(done);
        }
    }

    /// The tunnel ended: the exchange ends, with the tunnel's bytes.
    fn close(&self) {
        self.ended.set(true);
        let done = self.done.borrow_mut().take();
        if let Some(done) = done {
            self.finish(done);
        }
    }

    fn finish(&self, mut done: Done) {
        // Cut by its connection (idle, a listener's drain), or by the
        // process's drain timeout (the worker drops its connections).
        let cut = self
            .cause
            .get()
            .or_else(|| done.conn.worker.cut.get().then_some("drain_timeout"));
        if let Some(cause) = cut {
            done.out.cause.get_or_insert(cause);
        }
        done.bytes
            .set(done.bytes.get().saturating_add(self.sent.get()));
        if let Some(r) = &done.received {
            r.add(self.received.get());
        }
        drop(done);
    }
}

/// Closes its [`TunnelEnd`] when the tunnel's task ends or is dropped.
struct Ends(Rc<TunnelEnd>);

impl Drop for Ends {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The client's side of a tunnel, counting the bytes read from it and
/// written to it into its [`TunnelEnd`].
struct Counted<T> {
    io: T,
    end: Rc<TunnelEnd>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        if n > 0 {
            let received = &self.end.received;
            received.set(received.get().saturating_add(n));
            self.end.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            let sent = &self.end.sent;
            sent.set(sent.get().saturating_add(*n as u64));
            if *n > 0 {
                self.end.touch();
            }
        }
        r
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The request body as the attempts see it: buffered (replayable), streamed
/// with a copy kept for a retry (replayable while the copy is whole), or
/// streamed once.
enum ReqBody {
    Buffered { frames: Vec<Frame<Bytes>> },
    Replay(body::Replay),
    Stream(Option<Body>),
}

impl ReqBody {
    /// Streams `body` keeping a copy of up to `limit` bytes for a retry; a
    /// body whose `content-length` is over it streams without one.
    fn replay(body: Body, limit: u64, parts: &Parts) -> Self {
        if content_length(&parts.headers).is_some_and(|l| l > limit) {
            return ReqBody::Stream(Some(body));
        }
        ReqBody::Replay(body::Replay::new(body, limit))
    }

    /// Watches for the end of a body that streams upstream, where the
    /// timeouts start (`None`: it has ended, or was read whole).
    fn watch_end(&mut self) -> Option<Rc<BodySent>> {
        let watch = |b: Body| {
            if b.is_end_stream() {
                return (b, None);
            }
            let sent = Rc::new(BodySent::default());
            (
                body::boxed(Watched::new(b, SentEnd(sent.clone()))),
                Some(sent),
            )
        };
        match self {
            ReqBody::Buffered { .. } => None,
            ReqBody::Replay(r) => r.map_rest(watch),
            ReqBody::Stream(slot) => {
                let (b, sent) = watch(slot.take()?);
                *slot = Some(b);
                sent
            }
        }
    }

    /// Reads up to `limit` bytes so the body can be replayed on retry; a larger body
    /// (or one with trailers) is streamed and the request is not retried.
    async fn buffer(mut body: Body, limit: u64, parts: &Parts) -> Result<Self, ProxyError> {
        if content_length(&parts.headers).is_some_and(|l| l > limit) {
            return Ok(ReqBody::Stream(Some(body)));
        }
        let mut frames = Vec::new();
        let mut total = 0u64;
        loop {
            if body.is_end_stream() {
                return Ok(ReqBody::Buffered { frames });
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            match frame {
                None => return Ok(ReqBody::Buffered { frames }),
                Some(Err(e)) => return Err(ProxyError::request_body(&*e)),
                Some(Ok(f)) => {
                    let trailers = f.is_trailers();
                    total += f.data_ref().map_or(0, |d| d.len() as u64);
                    frames.push(f);
                    if trailers || total > limit {
                        return Ok(ReqBody::Stream(Some(body::Prefixed::body(
                            frames.into_iter().map(Ok),
                            body,
                        ))));
                    }
                }
            }
        }
    }

    fn replayable(&self) -> bool {
        match self {
            ReqBody::Buffered { .. } => true,
            ReqBody::Replay(r) => r.replayable(),
            ReqBody::Stream(_) => false,
        }
    }

    /// The whole body, if it was read in full and is at most `max` bytes.
    fn whole(&self, max: u64) -> Option<Bytes> {
        let ReqBody::Buffered { frames } = self else {
            return None;
        };
        let data: Vec<&Bytes> = frames.iter().filter_map(Frame::data_ref).collect();
        let len: usize = data.iter().map(|d| d.len()).sum();
        if len as u64 > max {
            return None;
        }
        Some(match data.as_slice() {
            [] => Bytes::new(),
            [one] => (*one).clone(),
            many => many.iter().flat_map(|d| d.iter().copied()).collect(),
        })
    }

    /// The body for the next attempt.
    fn take(&mut self) -> Body {
        match self {
            ReqBody::Buffered { frames } => {
                // Empty chunks (an HTTP/2 END_STREAM on an empty DATA frame)
                // are left out: a body of none is empty, and goes upstream
                // without a body framing.
                let copy: VecDeque<_> = frames
                    .iter()
                    .filter_map(|f| f.data_ref().filter(|d| !d.is_empty()))
                    .map(|d| Ok(Frame::data(d.clone())))
                    .collect();
                if copy.is_empty() {
                    body::empty()
                } else {
                    body::Prefixed::body(copy, body::empty())
                }
            }
            ReqBody::Replay(r) => r.attempt(),
            ReqBody::Stream(b) => b.take().unwrap_or_else(body::empty),
        }
    }
}

/// A request started but without a response yet. Dropped so, the client went
/// away: it ends as a 499 `downstream_disconnect`, like the 499 of a client
/// seen resetting, counted in the 4xx class and written to the access log. Or
/// the proxy cut it at the drain timeout: its connection closes without a
/// response (as Envoy's drain ends it), logged as every exchange that ended
/// with nothing sent, 499, with cause `drain_timeout`.
struct InFlight {
    /// `None` once the request became `Done`.
    conn: Option<Rc<ConnCtx>>,
    start: Instant,
    method: Method,
    path: String,
    version: Version,
    out: Outcome,
    logged: Option<Box<Logged>>,
    /// The request body's bytes so far (and an upgraded exchange's tunnel
    /// bytes from the client): counted with an access log or a body.
    received: Option<filter::ByteCount>,
}

/// The request facts only the access log uses ([`Done`]'s line).
struct Logged {
    /// `:authority` or `Host` as the client sent it (the line shows the
    /// address the request was routed by instead when it had none:
    /// [`Outcome::local_authority`]).
    authority: Option<String>,
    user_agent: Option<String>,
    /// `Referer`, as sent (nginx's `$http_referer`).
    referer: Option<String>,
    /// `X-Forwarded-For` as it arrived (nginx's `$http_x_forwarded_for`;
    /// several fields joined with `, `), before Legate appends to it.
    x_forwarded_for: Option<String>,
    /// When the request head arrived (the line's `start_time`).
    started: SystemTime,
    /// The request fields a configured format reads, as the client sent them
    /// (access_log/format.rs), and the response's and its trailers' as sent.
    request: Box<[Option<String>]>,
    response: Box<[Option<String>]>,
    trailers: Box<[Option<String>]>,
}

impl Logged {
    fn of(req: &Request<Incoming>, wants: &access_log::format::Wants) -> Logged {
        let text = |v: &HeaderValue| access_log::header_text(v.as_bytes());
        Logged {
            authority: req
                .uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| req.headers().get(header::HOST).map(text)),
            user_agent: req.headers().get(header::USER_AGENT).map(text),
            referer: req.headers().get(header::REFERER).map(text),
            x_forwarded_for: {
                let mut all = req.headers().get_all("x-forwarded-for").iter();
                all.next().map(|first| {
                    let mut joined = text(first);
                    for more in all {
                        joined.push_str(", ");
                        joined.push_str(&text(more));
                    }
                    joined
                })
            },
            started: SystemTime::now(),
            request: if wants.request.is_empty() {
                Box::default()
            } else {
                access_log::format::capture(&wants.request, req.headers())
            },
            response: Box::default(),
            trailers: Box::default(),
        }
    }
}

impl InFlight {
    /// The request as it ends with a response of `status`.
    fn done(&mut self, status: StatusCode) -> Option<Done> {
        let conn = self.conn.take()?;
        let mut out = std::mem::take(&mut self.out);
        if let Some(p) = out.normalized_path.take() {
            self.path = p;
        }
        Some(Done {
            route_stats: out.route.as_ref().map(|r| conn.worker.route_stats(r)),
            conn,
            start: self.start,
            method: std::mem::take(&mut self.method),
            path: std::mem::take(&mut self.path),
            version: self.version,
            status,
            out,
            logged: self.logged.take(),
            received: self.received.take(),
            bytes: Cell::new(0),
            failed: false,
            upstream_reset: false,
            ended: false,
            framing: Framing::Bodiless,
            connection_told: false,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let Some(conn) = &self.conn else { return };
        // Nothing was sent either way: the client left, or the drain timeout
        // closed its connection under the request (no 503 goes out: the
        // connection's future is dropped).
        let status = StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST);
        let cause = if conn.worker.cut.get() {
            "drain_timeout"
        } else {
            "downstream_disconnect"
        };
        // (Whatever failed before, the request ended this way.)
        self.out.cause = Some(cause);
        if let Some(chain) = self.out.chain.take() {
            // No response was sent: the filters' `on-log` sees none (as
            // Envoy's, whose `response.code` is then absent), the same as
            // when the client leaves while a filter holds the chain.
            chain.finish(None, Some(cause));
        }
        drop(self.done(status));
    }
}

/// Everything recorded when a request is over (its response body ended or was
/// dropped): stats, latency, the access-log line.
struct Done {
    conn: Rc<ConnCtx>,
    start: Instant,
    method: Method,
    path: String,
    version: Version,
    status: StatusCode,
    out: Outcome,
    route_stats: Option<RouteStats>,
    logged: Option<Box<Logged>>,
    /// The request body's bytes ([`InFlight`]).
    received: Option<filter::ByteCount>,
    bytes: Cell<u64>,
    /// The response body failed after its head was sent (an upstream reset
    /// or a body error mid-stream): the client got a truncated response.
    failed: bool,
    /// It failed because the upstream did (reset the stream, closed the
    /// connection): `upstream_rq_rx_reset` of the attempt.
    upstream_reset: bool,
    /// The response body came to its end ([`Watch::end`], complete or not),
    /// or its trailers (always the last frame) passed.
    ended: bool,
    /// What the response head promised of its body.
    framing: Framing,
    /// The connection was told the request finished already (at the `101`
    /// of an upgraded exchange, whose line waits for its tunnel's end).
    connection_told: bool,
}

/// What a response head promises of its body, so that a body hyper drops
/// before its end can be told from one it had no more use for. hyper stops
/// polling a body without waiting for its end when it may send none (`HEAD`,
/// 1xx, 204, 304) and, over HTTP/1.1, once `content-length` bytes went out;
/// any other body dropped before its end was dropped because the stream or
/// the connection went away under it.
#[derive(Clone, Copy)]
enum Framing {
    /// The client gets no body, whatever the response carries.
    Bodiless,
    /// `content-length` bytes.
    Length(u64),
    /// Up to the body's end.
    Open,
}

impl Framing {
    fn of(method: &Method, resp: &Response<Body>) -> Framing {
        let s = resp.status();
        if *method == Method::HEAD
            || s.is_informational()
            || matches!(s, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
        {
            return Framing::Bodiless;
        }
        match content_length(resp.headers()) {
            Some(n) => Framing::Length(n),
            None => Framing::Open,
        }
    }
}

impl Done {
    fn framed(mut self, framing: Framing) -> Done {
        self.framing = framing;
        self
    }

    /// The response body was dropped before its end while the client still
    /// expected more of it: the stream (HTTP/2) or the connection went away
    /// under it, a client that left mid-body (Envoy's response flag `DC`) or
    /// the proxy cutting its connections at the drain timeout.
    fn cut_short(&self) -> bool {
        !self.ended
            && match self.framing {
                Framing::Bodiless => false,
                Framing::Length(n) => self.bytes.get() < n,
                Framing::Open => true,
            }
    }
}

impl Done {
    /// Ends the exchange's part of the filters and timers: the stream idle
    /// timer stops, the cause is settled and the chain finishes (`on-log`,
    /// its instances go back). At the drop, or at the `101` of an upgraded
    /// exchange, whose tunnel must not hold a config's plugins or its
    /// request's timers while its line waits for the tunnel's end.
    fn finish_filters(&mut self) {
        if let Some(c) = self.out.idle.take() {
            // (Its watch, if any, lets it go.)
            c.finish();
            if c.expired() {
                // Before or after the head (then the status is the one sent).
                self.out.cause = Some("stream_idle_timeout");
                self.conn.listener.stats.stream_idle_timeouts.inc();
            }
        }
        // A filter's local response from a response phase (abi/README.md
        // §3.5): logged as `plugin:<details>` as one to the request is. So is
        // one from a streamed request body phase still unsent here: the
        // response head had gone out (full duplex), so it reset the exchange.
        let answered = self.out.chain.as_ref().and_then(|c| {
            c.take_answered()
                .or_else(|| c.take_local().map(|lr| lr.details))
        });
        if let Some(details) = &answered {
            self.out.local = Some(filter::plugin_cause(details));
        }
        if self
            .out
            .chain
            .as_ref()
            .is_some_and(filter::SharedChain::was_cut)
        {
            // A filter answered after the head went out: the stream was reset
            // (Envoy's `sendLocalReply` once headers are sent).
            self.conn.listener.stats.late_local_replies.inc();
        }
        if self.out.cause.is_none()
            && answered.is_none()
            && self
                .out
                .chain
                .as_ref()
                .is_some_and(filter::SharedChain::was_reset)
        {
            // A filter reset the stream after the head (proxy-wasm's
            // `proxy_close_stream` from a response body callback): named as
            // before the head, not as a body that failed.
            self.out.cause = Some(filter::RESET_CAUSE);
        }
        if self.out.cause.is_none() {
            if self.cut_short() {
                // The status sent is logged, with fewer bytes than the head
                // promised: the client went away mid-body (or the drain cut
                // its connection), not a response sent whole.
                self.out.cause = Some(if self.conn.worker.cut.get() {
                    "drain_timeout"
                } else {
                    "downstream_disconnect"
                });
            } else if self.failed && answered.is_none() {
                // The status sent is logged, but the response was cut short: say
                // so, as Envoy's UR/UPE flags do, instead of a clean 200. (A
                // streamed response body phase that answered resets the
                // exchange too: that is its `plugin:` cause.)
                self.out.cause = Some("response_body_failed");
            }
        }
        if let Some(chain) = self.out.chain.take() {
            // With a tunnel's bytes, which `TunnelEnd` added.
            if let Some(sent) = &self.out.body_bytes.sent {
                sent.set(self.bytes.get());
            }
            // `on-log` sees the cause the access log writes (abi/README.md §3.5).
            chain.finish(
                Some(self.status),
                self.out.cause.or(self.out.local.as_deref()),
            );
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        self.finish_filters();
        if self.upstream_reset {
            if let Some(a) = &self.out.active {
                a.record_reset();
            }
        }
        let elapsed = self.start.elapsed();
        let class = (self.status.as_u16() / 100).clamp(1, 5) as usize - 1;
        let l = &self.conn.listener.stats;
        l.rq_by_class[class].inc();
        l.rq_active.dec();
        match self.out.cause {
            Some("downstream_disconnect" | "downstream_reset") => l.rx_resets.inc(),
            // Its head went out, and then its body failed (the client
            // leaving is the case above).
            _ if self.failed => l.tx_resets.inc(),
            _ => {}
        }
        if let Some(rs) = &self.route_stats {
            rs.by_class[class].inc();
            rs.latency.observe(elapsed);
        }
        if !self.connection_told {
            self.conn.activity.request_finished();
        }
        self.report_span(elapsed);
        if let (Some(log), Some(l)) = (&self.conn.listener.access_log, &self.logged) {
            let o = &self.out;
            // (Formatted again: only a request without an authority pays.)
            let local = o
                .local_authority
                .then(|| local_authority(self.conn.reached()));
            let (client, peer) = self.conn.client_text(o.client);
            log.write(&access_log::Line {
                time: crate::access_log::timestamp(SystemTime::now()),
                start_time: crate::access_log::timestamp(l.started),
                listener: self.conn.listener.name.as_str(),
                client,
                peer,
                method: Some(self.method.as_str()),
                path: Some(&self.path),
                protocol: Some(format!("{:?}", self.version)),
                authority: local.as_deref().or(l.authority.as_deref()),
                user_agent: l.user_agent.as_deref(),
                referer: l.referer.as_deref(),
                x_forwarded_for: l.x_forwarded_for.as_deref(),
                status: self.status.as_u16(),
                bytes_sent: self.bytes.get(),
                bytes_received: self.received.as_ref().map_or(0, filter::ByteCount::get),
                duration_ms: crate::access_log::millis(elapsed),
                response_duration_ms: o
                    .upstream_head_at
                    .map(|t| crate::access_log::millis(t.saturating_duration_since(self.start))),
                route: o.route.as_ref().map(|r| &*r.name),
                route_table: o.route.as_ref().map(|r| &*r.table),
                virtual_host: o.route.as_ref().map(|r| &*r.virtual_host),
                cluster: o.cluster.as_deref(),
                upstream: o.upstream.map(|a| a.to_string()),
                attempts: o.attempts,
                cause: o.cause.or(o.local.as_deref()),
                request_id: o.request_id.as_ref().and_then(|v| v.to_str().ok()),
                requested_server_name: sni_of(&self.conn),
                downstream_peer_subject: peer_subject_of(&self.conn),
                upstream_transport_failure_reason: o.transport_failure.as_deref(),
                facts: access_log::Facts {
                    start: Some(l.started),
                    local: Some(self.conn.reached()),
                    scheme: Some(scheme_of(&self.conn)),
                    grpc: o.grpc,
                    tls: tls_of(&self.conn),
                    request: &l.request,
                    response: &l.response,
                    trailers: &l.trailers,
                },
            });
        }
    }
}

impl Done {
    /// Keeps the response fields a configured access-log format reads.
    fn log_response_fields(&mut self, headers: &http::HeaderMap) {
        if let (Some(log), Some(l)) = (&self.conn.listener.access_log, &mut self.logged) {
            if !log.wants().response.is_empty() {
                l.response = access_log::format::capture(&log.wants().response, headers);
            }
        }
    }
}

/// `%DOWNSTREAM_TLS_VERSION%` and `%DOWNSTREAM_TLS_CIPHER%`.
fn tls_of(conn: &ConnCtx) -> Option<(&'static str, &'static str)> {
    conn.tls.as_ref().map(|t| (t.version, t.cipher))
}

/// `%REQ(:SCHEME)%`: the scheme the client spoke to the listener.
fn scheme_of(conn: &ConnCtx) -> &'static str {
    if conn.tls.is_some() {
        "https"
    } else {
        "http"
    }
}

impl Done {
    /// Hands the span of a sampled request to the tracer ([`crate::trace`]),
    /// with the facts its access-log line has.
    fn report_span(&mut self, elapsed: Duration) {
        let Some(span) = self.out.trace.take() else {
            return;
        };
        let o = &self.out;
        crate::trace::finish(
            &self.conn.worker.shared.tracer,
            &span,
            &crate::trace::Facts {
                route: o.route.as_ref().map(|r| &*r.name),
                method: self.method.as_str(),
                path: &self.path,
                protocol: format!("{:?}", self.version),
                status: self.status.as_u16(),
                elapsed,
                local: self.conn.reached(),
                client: match o.client {
                    Some(ip) => (ip, None),
                    None => (self.conn.peer.ip(), Some(self.conn.peer.port())),
                },
                cluster: o.cluster.as_deref(),
                upstream: o.upstream,
                request_size: self.received.as_ref().map_or(0, filter::ByteCount::get),
                response_size: self.bytes.get(),
                request_id: o.request_id.as_ref().and_then(|v| v.to_str().ok()),
                cause: o.cause.or(o.local.as_deref()),
            },
        );
    }
}

/// The answer hyper's HTTP/1 server sent by itself for the error that ended
/// its connection, if it sent one: its status and the access log's cause.
/// hyper answers a request head it cannot parse without calling the service,
/// as its `Server::on_error` maps the error (hyper 1.x, `proto/h1/role.rs`):
/// a malformed request line or header field 400, a head that outgrew the read
/// buffer (`max_buf_size`: one arriving in pieces past Legate's exact check)
/// 431, a request target over 65534 bytes 414. Other errors (an HTTP/2
/// preface on an HTTP/1-only connection, an I/O error, a client that closed
/// mid-head, hyper's internal error) close the connection without an answer.
/// hyper's predicates do not tell 414 from 431 nor its internal error from a
/// malformed head: its message does (read only on this error path).
pub(crate) fn hyper_reply(e: &hyper::Error) -> Option<(StatusCode, &'static str)> {
    if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
        return None;
    }
    let text = e.to_string();
    if text.starts_with("internal error") {
        return None;
    }
    Some(if !e.is_parse_too_large() {
        (StatusCode::BAD_REQUEST, "bad_request")
    } else if text == "URI too long" {
        (StatusCode::URI_TOO_LONG, "uri_too_long")
    } else {
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request_headers_too_large",
        )
    })
}

/// Writes the access-log line of an answer hyper sent by itself
/// ([`hyper_reply`]), as nginx logs its 400 and 494 and Envoy its codec's
/// 431: the fields of every line, with what is known of a request whose head
/// was never parsed (no method, path, protocol, authority or agent; no body
/// either way: hyper's answer is a head).
pub(crate) fn log_hyper_reply(conn: &ConnCtx, status: StatusCode, cause: &'static str) {
    let Some(log) = &conn.listener.access_log else {
        return;
    };
    let now = SystemTime::now();
    let elapsed = conn
        .activity
        .head_started()
        .map_or(Duration::ZERO, |t| t.elapsed());
    log.write(&access_log::Line {
        time: crate::access_log::timestamp(now),
        start_time: crate::access_log::timestamp(now.checked_sub(elapsed).unwrap_or(now)),
        listener: conn.listener.name.as_str(),
        client: conn.peer.to_string(),
        peer: None,
        method: None,
        path: None,
        protocol: None,
        authority: None,
        user_agent: None,
        referer: None,
        x_forwarded_for: None,
        status: status.as_u16(),
        bytes_sent: 0,
        bytes_received: 0,
        duration_ms: crate::access_log::millis(elapsed),
        response_duration_ms: None,
        route: None,
        route_table: None,
        virtual_host: None,
        cluster: None,
        upstream: None,
        attempts: 0,
        cause: Some(cause),
        request_id: None,
        requested_server_name: sni_of(conn),
        downstream_peer_subject: peer_subject_of(conn),
        upstream_transport_failure_reason: None,
        facts: access_log::Facts {
            start: now.checked_sub(elapsed),
            local: Some(conn.reached()),
            scheme: Some(scheme_of(conn)),
            tls: tls_of(conn),
            ..access_log::Facts::default()
        },
    });
}

/// The access log's `requested_server_name`: the SNI of `conn`'s handshake.
fn sni_of(conn: &ConnCtx) -> Option<&str> {
    conn.tls.as_ref().and_then(|t| t.sni.as_deref())
}

/// The access log's `downstream_peer_subject`: the subject of `conn`'s
/// verified client certificate.
fn peer_subject_of(conn: &ConnCtx) -> Option<&str> {
    conn.tls.as_ref().and_then(|t| t.peer_subject())
}

/// The client's request body as it arrives: its frames are activity for the
/// stream idle timeout, and its trailers lose their hop-by-hop fields as the
/// head does (RFC 9110 §6.5.1; toward an HTTP/2 upstream they would make the
/// stream malformed, RFC 9113 §8.2.2). Filters see them stripped, as the head.
/// With an access log, its data bytes are counted (`bytes_received`).
struct ClientBody(idle::Activity, Option<filter::ByteCount>);

impl Watch for ClientBody {
    fn frame(&mut self, frame: &mut Frame<Bytes>) -> Result<(), BoxError> {
        if let Some(t) = frame.trailers_mut() {
            crate::proxy_headers::strip_hop_by_hop(t);
        }
        if let (Some(n), Some(d)) = (&self.1, frame.data_ref()) {
            n.add(d.len() as u64);
        }
        self.0.frame(frame)
    }
}

/// The response body on its way out counts its bytes here; when it ends (or is
/// dropped), `Done` drops and finishes the request. Its trailers lose their
/// hop-by-hop fields (RFC 9110 §6.5.1 forbids them there; an HTTP/2 stream
/// carrying `connection` or `keep-alive` is malformed, RFC 9113 §8.2.2, and
/// would be reset), as the head did.
impl Watch for Done {
    fn frame(&mut self, frame: &mut Frame<Bytes>) -> Result<(), BoxError> {
        if let Some(d) = frame.data_ref() {
            self.bytes.set(self.bytes.get() + d.len() as u64);
            if let Some(sent) = &self.out.body_bytes.sent {
                sent.set(self.bytes.get());
            }
        } else if let Some(t) = frame.trailers_mut() {
            crate::proxy_headers::strip_hop_by_hop(t);
            // The last frame: hyper may drop the body without polling its end.
            self.ended = true;
            if let (Some(log), Some(l)) = (&self.conn.listener.access_log, &mut self.logged) {
                if !log.wants().trailers.is_empty() {
                    l.trailers = access_log::format::capture(&log.wants().trailers, t);
                }
            }
        }
        Ok(())
    }

    fn end(mut self, complete: bool) {
        // Logged by the drop that follows.
        self.failed = !complete;
        self.ended = true;
    }

    fn error(&mut self, e: BoxError) -> BoxError {
        self.upstream_reset = upstream_failure(&*e);
        e
    }
}

/// Whether a response body failed because the upstream did: the upstream
/// connection's own error (hyper's, under an HTTP/1.1 body), or Legate's
/// `UpstreamReset` for it (an HTTP/2 stream's, [`crate::upstream`]). A filter's
/// failure or a timeout is Legate's own error, of another kind.
fn upstream_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(p) = e.downcast_ref::<ProxyError>() {
            return p.kind == Kind::UpstreamReset;
        }
        if e.is::<hyper::Error>() {
            return true;
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn websocket_accept_is_rfc_6455s() {
        // RFC 6455 §1.3's example.
        assert_eq!(
            websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let (key, accept) = websocket_key();
        assert_eq!(key.len(), 24);
        assert_eq!(accept, websocket_accept(key.to_str().unwrap()));
        assert_ne!(websocket_key().0, key);
    }

    use super::*;

    fn exchange(version: Version, host: Option<&'static str>, authority: &str) -> Exchange {
        let mut h = http::HeaderMap::new();
        if let Some(v) = host {
            h.insert(header::HOST, HeaderValue::from_static(v));
        }
        h.insert("x-a", HeaderValue::from_static("1"));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
        let facts = Arc::new(filter::ConnFacts {
            id: 1,
            source: addr,
            destination: addr,
            tls: None,
        });
        let id = HeaderValue::from_static("");
        Exchange::new(
            Method::GET,
            "/".into(),
            authority.into(),
            version,
            h,
            facts,
            id,
            None,
        )
    }

    /// `write_head` for `x`, into a request as `exchange_of` leaves it, after
    /// a filter set the authority to `set` if given.
    fn written(x: &mut Exchange, keep: bool, set: Option<&str>) -> (Request<Body>, String) {
        let mut req = Request::new(body::empty());
        *req.version_mut() = x.version;
        let mut authority = x.authority.clone();
        if let Some(a) = set {
            x.authority = a.into();
        }
        write_head(x, keep, &mut req, &mut authority).expect("written");
        (req, authority)
    }

    fn hosts(req: &Request<Body>) -> Vec<&str> {
        req.headers()
            .get_all(header::HOST)
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect()
    }

    #[test]
    fn filters_never_see_host_and_the_request_keeps_it() {
        // Untouched by filters: the client's head as it came, even a `host`
        // that is not the authority (an absolute-form request: as without filters).
        let mut x = exchange(Version::HTTP_11, Some("b.example"), "a.example");
        let (req, _) = written(&mut x, false, None);
        assert_eq!(hosts(&req), ["b.example"]);
        assert_eq!(req.headers()["x-a"], "1");

        // A filter reached the head: no `host` in it; the authority is sent.
        for (client, want) in [
            (Some("a.example"), "a.example"),
            (Some("b.example"), "a.example"),
        ] {
            let mut x = exchange(Version::HTTP_11, client, "a.example");
            assert_eq!(x.request_header_count(), 1);
            assert!(!x.request_headers().contains_key(header::HOST));
            assert_eq!(x.request_headers().len(), 1);
            let (req, _) = written(&mut x, false, None);
            assert_eq!(hosts(&req), [want]);
        }

        // A filter changed the authority without reading the head.
        let mut x = exchange(Version::HTTP_11, Some("a.example"), "a.example");
        let (req, authority) = written(&mut x, false, Some("c.example"));
        assert_eq!(
            (hosts(&req), authority.as_str()),
            (vec!["c.example"], "c.example")
        );

        // HTTP/1 without `host` gets one; HTTP/2 without one gets none.
        for (version, want) in [
            (Version::HTTP_11, vec!["a.example"]),
            (Version::HTTP_2, vec![]),
        ] {
            let mut x = exchange(version, None, "a.example");
            x.request_headers();
            let (req, _) = written(&mut x, false, None);
            assert_eq!(hosts(&req), want, "{version:?}");
        }

        // Kept for later phases: a snapshot without `host`, the request with it,
        // and again after a second write (a buffered body's phases).
        let mut x = exchange(Version::HTTP_11, Some("a.example"), "a.example");
        let (req, _) = written(&mut x, true, None);
        assert_eq!(hosts(&req), ["a.example"]);
        assert_eq!(x.request_header_count(), 1);
        assert!(!x.request_headers().contains_key(header::HOST));
        assert_eq!(x.request_headers()["x-a"], "1");
        let (req, _) = written(&mut x, true, None);
        assert_eq!(hosts(&req), ["a.example"]);
    }

    #[test]
    fn authorities_are_a_host_and_an_optional_port() {
        for ok in [
            "a.example",
            "a.example:8080",
            "a.example:",
            "a.example:65535",
            "127.0.0.1:80",
            "[::1]",
            "[2001:db8::1]:443",
            "xn--bcher-kva.example",
            "a%2Db.example",
            "under_score.example",
        ] {
            assert!(valid_authority(ok), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "evil.com/.example.com",
            "evil.com?.example.com",
            "evil.com#.example.com",
            "evil.com\\.example.com",
            "a b",
            "user:pw@b.example",
            "u@a",
            "a.example:80x",
            "a.example:80:81",
            "a.example:65536",
            "a.example:99999999999999999999",
            "[::1",
            "[::1]x",
            "[zz::1]",
            "a%2.example",
            "a\"b",
        ] {
            assert!(!valid_authority(bad), "{bad}");
        }
    }
}
