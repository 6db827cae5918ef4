//! The guest backend: every SDK handle is a thin wrapper over the bindings that
//! `wit-bindgen` generates from `abi/wit`: world `http-filter-kv` (`http-filter`
//! with the `kv-handler` export; [`bindings`],
//! which also holds the interfaces both worlds import) and world
//! `network-filter` ([`net_bindings`], which reuses those shared interfaces
//! through `with`, so buffers, metrics, KV, callouts… have one set of types and
//! one set of wrappers).

#![allow(missing_docs)]

use crate::callout::{CalloutRequest, CalloutResponse};
use crate::kv::{Backend, Entry, Op, Reply, WriteCondition};
use crate::log::Level;
use crate::types::{Action, BodyMode, Direction, HttpVersion, TlsVersion};
use crate::Error;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The generated bindings (public only for `legate_sdk::export!`).
pub mod bindings {
    wit_bindgen::generate!({
        world: "http-filter-kv",
        path: "../abi/wit",
        pub_export_macro: true,
        export_macro_name: "__export_http_filter",
        default_bindings_module: "::legate_sdk::__private::bindings",
        generate_all,
    });
}

/// The generated bindings of the `network-filter` world (public only for
/// `legate_sdk::export_network!`). The interfaces it shares with
/// `http-filter` are those of [`bindings`]; only `network` and
/// `network-handler` are generated here. With `pub_export_macro`, the world's
/// exports are described only by the export macro a crate invokes, so an
/// HTTP filter does not have to export `network-handler` nor the reverse.
pub mod net_bindings {
    wit_bindgen::generate!({
        world: "network-filter",
        path: "../abi/wit",
        pub_export_macro: true,
        export_macro_name: "__export_network_filter",
        default_bindings_module: "::legate_sdk::__private::net_bindings",
        with: {
            "legate:filter/types@0.1.3": crate::backend::wasm::bindings::legate::filter::types,
            "legate:filter/log@0.1.3": crate::backend::wasm::bindings::legate::filter::log,
            "legate:filter/clock@0.1.3": crate::backend::wasm::bindings::legate::filter::clock,
            "legate:filter/random@0.1.3": crate::backend::wasm::bindings::legate::filter::random,
            "legate:filter/metrics@0.1.3": crate::backend::wasm::bindings::legate::filter::metrics,
            "legate:filter/kv@0.1.3": crate::backend::wasm::bindings::legate::filter::kv,
            "legate:filter/callout@0.1.3": crate::backend::wasm::bindings::legate::filter::callout,
            "legate:filter/plugin@0.1.3": crate::backend::wasm::bindings::legate::filter::plugin,
        },
        generate_all,
    });
}

use bindings::legate::filter as wit;
use net_bindings::legate::filter::network as wnet;

pub(crate) fn error(e: wit::types::Error) -> Error {
    use wit::types::Error as W;
    match e {
        W::Denied => Error::Denied,
        W::NotFound => Error::NotFound,
        W::InvalidArgument => Error::InvalidArgument,
        W::InvalidState => Error::InvalidState,
        W::CasMismatch => Error::CasMismatch,
        W::LimitExceeded => Error::LimitExceeded,
        W::Timeout => Error::Timeout,
        W::Unavailable => Error::Unavailable,
        W::Unsupported => Error::Unsupported,
        W::Internal => Error::Internal,
    }
}

fn direction(d: Direction) -> wit::types::Direction {
    match d {
        Direction::Request => wit::types::Direction::Request,
        Direction::Response => wit::types::Direction::Response,
    }
}

pub(crate) fn body_mode(m: BodyMode) -> wit::types::BodyMode {
    match m {
        BodyMode::Streamed => wit::types::BodyMode::Streamed,
        BodyMode::Buffered => wit::types::BodyMode::Buffered,
        BodyMode::Skipped => wit::types::BodyMode::Skipped,
    }
}

fn socket_address(a: wit::types::SocketAddress) -> SocketAddr {
    let ip = match a.ip {
        wit::types::IpAddress::Ipv4((a, b, c, d)) => IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
        wit::types::IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => {
            IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h))
        }
    };
    SocketAddr::new(ip, a.port)
}

fn tls_version(v: wit::types::TlsVersion) -> TlsVersion {
    match v {
        wit::types::TlsVersion::Tls12 => TlsVersion::Tls12,
        wit::types::TlsVersion::Tls13 => TlsVersion::Tls13,
    }
}

pub fn action(a: Action) -> wit::http::Action {
    match a {
        Action::Continue => wit::http::Action::Continue,
        Action::Pause => wit::http::Action::Pause,
        Action::Respond(r) => wit::http::Action::Respond(wit::http::LocalResponse {
            status: r.status,
            headers: r.headers,
            body: r.body,
            details: r.details,
        }),
    }
}

pub fn callout_result(
    r: Result<wit::callout::CalloutResponse, wit::types::Error>,
) -> Result<CalloutResponse, Error> {
    r.map(|r| CalloutResponse {
        status: r.status,
        headers: r.headers,
        body: r.body,
    })
    .map_err(error)
}

// ---- headers ----

pub(crate) enum HeadersHandle<'a> {
    Borrowed(&'a wit::http::Headers),
    Owned(wit::http::Headers),
}

impl<'a> HeadersHandle<'a> {
    pub(crate) fn borrowed(h: &'a wit::http::Headers) -> Self {
        HeadersHandle::Borrowed(h)
    }

    fn raw(&self) -> &wit::http::Headers {
        match self {
            HeadersHandle::Borrowed(h) => h,
            HeadersHandle::Owned(h) => h,
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.raw().get(name)
    }
    pub(crate) fn get_all(&self, name: &str) -> Vec<Vec<u8>> {
        self.raw().get_all(name)
    }
    pub(crate) fn has(&self, name: &str) -> bool {
        self.raw().has(name)
    }
    pub(crate) fn len(&self) -> u32 {
        self.raw().len()
    }
    pub(crate) fn set(&self, name: &str, value: &[u8]) -> Result<(), Error> {
        self.raw().set(name, value).map_err(error)
    }
    pub(crate) fn add(&self, name: &str, value: &[u8]) -> Result<(), Error> {
        self.raw().add(name, value).map_err(error)
    }
    pub(crate) fn remove(&self, name: &str) -> Result<(), Error> {
        self.raw().remove(name).map_err(error)
    }
    pub(crate) fn entries(&self) -> Vec<(String, Vec<u8>)> {
        self.raw().entries()
    }
}

// ---- buffer ----

pub(crate) enum BufferHandle<'a> {
    Borrowed(&'a wit::types::Buffer),
    Owned(wit::types::Buffer),
}

impl<'a> BufferHandle<'a> {
    pub(crate) fn borrowed(b: &'a wit::types::Buffer) -> Self {
        BufferHandle::Borrowed(b)
    }

    fn raw(&self) -> &wit::types::Buffer {
        match self {
            BufferHandle::Borrowed(b) => b,
            BufferHandle::Owned(b) => b,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.raw().len()
    }
    pub(crate) fn read(&self, offset: u64, max_len: u64) -> Vec<u8> {
        self.raw().read(offset, max_len)
    }
    pub(crate) fn replace(&self, data: &[u8]) -> Result<(), Error> {
        self.raw().replace(data).map_err(error)
    }
    pub(crate) fn splice(&self, offset: u64, remove_len: u64, data: &[u8]) -> Result<(), Error> {
        self.raw().splice(offset, remove_len, data).map_err(error)
    }
}

// ---- exchange ----

pub(crate) struct ExchangeHandle<'a>(&'a wit::http::Exchange);

impl<'a> ExchangeHandle<'a> {
    pub(crate) fn borrowed(x: &'a wit::http::Exchange) -> Self {
        ExchangeHandle(x)
    }

    pub(crate) fn method(&self) -> String {
        self.0.method()
    }
    pub(crate) fn set_method(&self, v: &str) -> Result<(), Error> {
        self.0.set_method(v).map_err(error)
    }
    pub(crate) fn path(&self) -> String {
        self.0.path()
    }
    pub(crate) fn set_path(&self, v: &str) -> Result<(), Error> {
        self.0.set_path(v).map_err(error)
    }
    pub(crate) fn scheme(&self) -> String {
        self.0.scheme()
    }
    pub(crate) fn authority(&self) -> String {
        self.0.authority()
    }
    pub(crate) fn set_authority(&self, v: &str) -> Result<(), Error> {
        self.0.set_authority(v).map_err(error)
    }
    pub(crate) fn http_version(&self) -> HttpVersion {
        match self.0.http_version() {
            wit::http::HttpVersion::Http10 => HttpVersion::Http10,
            wit::http::HttpVersion::Http11 => HttpVersion::Http11,
            wit::http::HttpVersion::Http2 => HttpVersion::Http2,
        }
    }
    pub(crate) fn status(&self) -> Option<u16> {
        self.0.status()
    }
    pub(crate) fn set_status(&self, v: u16) -> Result<(), Error> {
        self.0.set_status(v).map_err(error)
    }
    pub(crate) fn headers(&self, d: Direction) -> Option<HeadersHandle<'static>> {
        self.0.headers(direction(d)).map(HeadersHandle::Owned)
    }
    pub(crate) fn body(&self, d: Direction) -> Option<BufferHandle<'static>> {
        self.0.body(direction(d)).map(BufferHandle::Owned)
    }
    pub(crate) fn trailers(&self, d: Direction) -> Option<HeadersHandle<'static>> {
        self.0.trailers(direction(d)).map(HeadersHandle::Owned)
    }
    pub(crate) fn set_body_mode(&self, d: Direction, m: BodyMode) -> Result<(), Error> {
        self.0
            .set_body_mode(direction(d), body_mode(m))
            .map_err(error)
    }
    pub(crate) fn detach(&self) -> Result<(), Error> {
        self.0.detach().map_err(error)
    }
    pub(crate) fn source_address(&self) -> SocketAddr {
        socket_address(self.0.source_address())
    }
    pub(crate) fn destination_address(&self) -> SocketAddr {
        socket_address(self.0.destination_address())
    }
    pub(crate) fn tls_version(&self) -> Option<TlsVersion> {
        self.0.tls_version().map(tls_version)
    }
    pub(crate) fn tls_sni(&self) -> Option<String> {
        self.0.tls_sni()
    }
    pub(crate) fn tls_peer_certificate_presented(&self) -> bool {
        self.0.tls_peer_certificate_presented()
    }
    pub(crate) fn tls_peer_subject(&self) -> Option<String> {
        self.0.tls_peer_subject()
    }
    pub(crate) fn route_name(&self) -> Option<String> {
        self.0.route_name()
    }
    pub(crate) fn cluster(&self) -> Option<String> {
        self.0.cluster()
    }
    pub(crate) fn upstream_address(&self) -> Option<SocketAddr> {
        self.0.upstream_address().map(socket_address)
    }
    pub(crate) fn request_id(&self) -> String {
        self.0.request_id()
    }
    pub(crate) fn start_time(&self) -> u64 {
        self.0.start_time()
    }
    pub(crate) fn cause(&self) -> Option<String> {
        self.0.cause()
    }
}

// ---- connection (network-filter world) ----

pub(crate) struct ConnectionHandle<'a>(&'a wnet::Connection);

impl<'a> ConnectionHandle<'a> {
    pub(crate) fn borrowed(c: &'a wnet::Connection) -> Self {
        ConnectionHandle(c)
    }

    pub(crate) fn id(&self) -> u64 {
        self.0.id()
    }
    pub(crate) fn listener_name(&self) -> String {
        self.0.listener_name()
    }
    pub(crate) fn source_address(&self) -> SocketAddr {
        socket_address(self.0.source_address())
    }
    pub(crate) fn destination_address(&self) -> SocketAddr {
        socket_address(self.0.destination_address())
    }
    pub(crate) fn tls_version(&self) -> Option<TlsVersion> {
        self.0.tls_version().map(tls_version)
    }
    pub(crate) fn tls_sni(&self) -> Option<String> {
        self.0.tls_sni()
    }
    pub(crate) fn tls_peer_certificate_presented(&self) -> bool {
        self.0.tls_peer_certificate_presented()
    }
    pub(crate) fn tls_peer_subject(&self) -> Option<String> {
        self.0.tls_peer_subject()
    }
    pub(crate) fn cluster(&self) -> Option<String> {
        self.0.cluster()
    }
    pub(crate) fn upstream_address(&self) -> Option<SocketAddr> {
        self.0.upstream_address().map(socket_address)
    }
    pub(crate) fn start_time(&self) -> u64 {
        self.0.start_time()
    }
    pub(crate) fn data(&self, d: Direction) -> Option<BufferHandle<'static>> {
        self.0.data(direction(d)).map(BufferHandle::Owned)
    }
}

// ---- log, clock, random, plugin ----

fn level(l: Level) -> wit::log::Level {
    match l {
        Level::Trace => wit::log::Level::Trace,
        Level::Debug => wit::log::Level::Debug,
        Level::Info => wit::log::Level::Info,
        Level::Warn => wit::log::Level::Warn,
        Level::Error => wit::log::Level::Error,
    }
}

pub(crate) fn log(l: Level, message: &str) {
    wit::log::log(level(l), message)
}
pub(crate) fn log_enabled(l: Level) -> bool {
    wit::log::enabled(level(l))
}
pub(crate) fn wall_now() -> u64 {
    wit::clock::wall_now()
}
pub(crate) fn monotonic_now() -> u64 {
    wit::clock::monotonic_now()
}
pub(crate) fn random_bytes(len: u32) -> Result<Vec<u8>, Error> {
    wit::random::get_bytes(len).map_err(error)
}
pub(crate) fn random_u64() -> u64 {
    wit::random::get_u64()
}
pub(crate) fn plugin_name() -> String {
    wit::plugin::name()
}
pub(crate) fn instance_index() -> u32 {
    wit::plugin::instance_index()
}
pub(crate) fn sanitize_request_headers(names: &[&str]) -> Result<(), Error> {
    wit::http::sanitize_request_headers(&owned(names)).map_err(error)
}

pub(crate) fn plugin_file(name: &str) -> Result<Vec<u8>, Error> {
    wit::plugin::file(name).map_err(error)
}

// ---- metrics ----

fn owned(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

pub(crate) struct CounterHandle(wit::metrics::Counter);
impl CounterHandle {
    pub(crate) fn add(&self, delta: u64) {
        self.0.add(delta)
    }
    pub(crate) fn with_labels(&self, values: &[&str]) -> Result<Self, Error> {
        self.0
            .with_labels(&owned(values))
            .map(CounterHandle)
            .map_err(error)
    }
}

pub(crate) struct GaugeHandle(wit::metrics::Gauge);
impl GaugeHandle {
    pub(crate) fn set(&self, v: i64) {
        self.0.set(v)
    }
    pub(crate) fn add(&self, delta: i64) {
        self.0.add(delta)
    }
    pub(crate) fn with_labels(&self, values: &[&str]) -> Result<Self, Error> {
        self.0
            .with_labels(&owned(values))
            .map(GaugeHandle)
            .map_err(error)
    }
}

pub(crate) struct HistogramHandle(wit::metrics::Histogram);
impl HistogramHandle {
    pub(crate) fn observe(&self, v: f64) {
        self.0.observe(v)
    }
    pub(crate) fn with_labels(&self, values: &[&str]) -> Result<Self, Error> {
        self.0
            .with_labels(&owned(values))
            .map(HistogramHandle)
            .map_err(error)
    }
}

pub(crate) fn define_counter(
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<CounterHandle, Error> {
    wit::metrics::define_counter(name, help, &owned(labels))
        .map(CounterHandle)
        .map_err(error)
}
pub(crate) fn define_gauge(name: &str, help: &str, labels: &[&str]) -> Result<GaugeHandle, Error> {
    wit::metrics::define_gauge(name, help, &owned(labels))
        .map(GaugeHandle)
        .map_err(error)
}
pub(crate) fn define_histogram(
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<HistogramHandle, Error> {
    wit::metrics::define_histogram(name, help, &owned(labels), buckets)
        .map(HistogramHandle)
        .map_err(error)
}

// ---- kv ----

fn condition(c: WriteCondition) -> wit::kv::WriteCondition {
    match c {
        WriteCondition::Always => wit::kv::WriteCondition::Always,
        WriteCondition::IfAbsent => wit::kv::WriteCondition::IfAbsent,
        WriteCondition::IfVersion(v) => wit::kv::WriteCondition::IfVersion(v),
    }
}

pub(crate) struct NamespaceHandle(wit::kv::Namespace);
impl NamespaceHandle {
    pub(crate) fn get(&self, key: &str) -> Result<Option<Entry>, Error> {
        self.0
            .get(key)
            .map(|e| {
                e.map(|e| Entry {
                    value: e.value,
                    version: e.version,
                })
            })
            .map_err(error)
    }
    pub(crate) fn set(
        &self,
        key: &str,
        value: &[u8],
        c: WriteCondition,
        ttl_ms: Option<u64>,
    ) -> Result<u64, Error> {
        self.0.set(key, value, condition(c), ttl_ms).map_err(error)
    }
    pub(crate) fn delete(&self, key: &str, c: WriteCondition) -> Result<bool, Error> {
        self.0.delete(key, condition(c)).map_err(error)
    }
    pub(crate) fn increment(
        &self,
        key: &str,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> Result<i64, Error> {
        self.0.increment(key, delta, ttl_ms).map_err(error)
    }
    pub(crate) fn backend(&self) -> Backend {
        match self.0.backend() {
            wit::kv::Backend::Memory => Backend::Memory,
            wit::kv::Backend::Redis => Backend::Redis,
        }
    }
    pub(crate) fn start(&self, key: &str, op: Op) -> Result<u64, Error> {
        match op {
            Op::Get => self.0.start_get(key),
            Op::Set(value, c, ttl) => self.0.start_set(key, &value, condition(c), ttl),
            Op::Delete(c) => self.0.start_delete(key, condition(c)),
            Op::Increment(delta, ttl) => self.0.start_increment(key, delta, ttl),
        }
        .map_err(error)
    }
}

/// A KV reply as the SDK gives it (used by the `export!` glue).
pub fn kv_reply(r: Result<wit::kv::Reply, wit::types::Error>) -> Result<Reply, Error> {
    match r {
        Ok(wit::kv::Reply::Get(e)) => Ok(Reply::Get(e.map(|e| Entry {
            value: e.value,
            version: e.version,
        }))),
        Ok(wit::kv::Reply::Set(v)) => Ok(Reply::Set(v)),
        Ok(wit::kv::Reply::Delete(d)) => Ok(Reply::Delete(d)),
        Ok(wit::kv::Reply::Increment(n)) => Ok(Reply::Increment(n)),
        Err(e) => Err(error(e)),
    }
}

pub(crate) fn kv_open(name: &str) -> Result<NamespaceHandle, Error> {
    wit::kv::open(name).map(NamespaceHandle).map_err(error)
}

// ---- callout ----

pub(crate) fn callout_send(r: &CalloutRequest) -> Result<u64, Error> {
    wit::callout::send(&wit::callout::CalloutRequest {
        cluster: r.cluster.clone(),
        method: r.method.clone(),
        path: r.path.clone(),
        authority: r.authority.clone(),
        headers: r.headers.clone(),
        body: r.body.clone(),
        timeout_ms: r.timeout_ms,
    })
    .map_err(error)
}
pub(crate) fn callout_check_cluster(cluster: &str) -> Result<(), Error> {
    wit::callout::check_cluster(cluster).map_err(error)
}

pub(crate) fn callout_cancel(id: u64) -> Result<(), Error> {
    wit::callout::cancel(id).map_err(error)
}

// ---- export glue (called by the code `legate_sdk::export!` expands to) ----

/// The per-instance slot the `export!` macro declares for the filter type.
pub type Slot<F> = std::thread::LocalKey<std::cell::RefCell<Option<crate::filter::Instance<F>>>>;

/// The per-instance slot `export_network!` declares for the filter type.
pub type NetSlot<F> =
    std::thread::LocalKey<std::cell::RefCell<Option<crate::network::NetworkInstance<F>>>>;

fn setup(s: crate::setup::Setup) -> wit::http::HttpSetup {
    use crate::setup::Phase;
    use wit::http::Phases;
    let mut phases = Phases::empty();
    for (phase, flag) in [
        (Phase::RequestHeaders, Phases::REQUEST_HEADERS),
        (Phase::RequestBody, Phases::REQUEST_BODY),
        (Phase::RequestTrailers, Phases::REQUEST_TRAILERS),
        (Phase::ResponseHeaders, Phases::RESPONSE_HEADERS),
        (Phase::ResponseBody, Phases::RESPONSE_BODY),
        (Phase::ResponseTrailers, Phases::RESPONSE_TRAILERS),
        (Phase::Log, Phases::LOG),
        (Phase::Done, Phases::DONE),
    ] {
        if s.declares(phase) {
            phases |= flag;
        }
    }
    wit::http::HttpSetup {
        phases,
        request_body_mode: body_mode(s.body_mode(Direction::Request)),
        response_body_mode: body_mode(s.body_mode(Direction::Response)),
        tick_interval_ms: s.tick_interval_ms(),
    }
}

/// `configure`: build the instance and store it in `slot`.
pub fn configure<F: crate::HttpFilter>(
    slot: &'static Slot<F>,
    config: String,
) -> Result<wit::http::HttpSetup, String> {
    let instance = crate::filter::Instance::<F>::configure(&config)?;
    let s = setup(instance.setup());
    store(slot, instance)?;
    Ok(s)
}

fn store<I: 'static>(
    slot: &'static std::thread::LocalKey<std::cell::RefCell<Option<I>>>,
    instance: I,
) -> Result<(), String> {
    slot.with(|cell| match cell.try_borrow_mut() {
        Ok(mut guard) => {
            *guard = Some(instance);
            Ok(())
        }
        Err(_) => Err("legate-sdk: configure re-entered the plugin instance".to_owned()),
    })
}

/// Run `f` on the configured instance (of either world). The host calls an
/// instance strictly sequentially and only after a successful `configure`;
/// if either does not hold, `default` is returned instead of trapping.
pub fn with_instance<I: 'static, R>(
    slot: &'static std::thread::LocalKey<std::cell::RefCell<Option<I>>>,
    default: R,
    f: impl FnOnce(&mut I) -> R,
) -> R {
    slot.with(|cell| match cell.try_borrow_mut() {
        Ok(mut guard) => match guard.as_mut() {
            Some(instance) => f(instance),
            None => default,
        },
        Err(_) => default,
    })
}

/// Wrap a borrowed exchange.
pub fn exchange(x: &wit::http::Exchange) -> crate::Exchange<'_> {
    crate::Exchange::new(ExchangeHandle::borrowed(x))
}
/// Wrap a borrowed header map.
pub fn headers(h: &wit::http::Headers) -> crate::Headers<'_> {
    crate::Headers(HeadersHandle::borrowed(h))
}
/// Wrap a borrowed buffer.
pub fn body(b: &wit::types::Buffer) -> crate::Body<'_> {
    crate::Body(BufferHandle::borrowed(b))
}

// ---- network-filter export glue (`legate_sdk::export_network!`) ----

fn net_setup(s: crate::network::NetworkSetup) -> wnet::NetworkSetup {
    use crate::network::NetworkEvent as E;
    use wnet::NetworkEvents as W;
    let mut events = W::empty();
    for (event, flag) in [
        (E::NewConnection, W::NEW_CONNECTION),
        (E::DownstreamData, W::DOWNSTREAM_DATA),
        (E::UpstreamData, W::UPSTREAM_DATA),
        (E::Close, W::CLOSE),
    ] {
        if s.declares(event) {
            events |= flag;
        }
    }
    wnet::NetworkSetup {
        events,
        tick_interval_ms: s.tick_interval_ms(),
    }
}

/// `configure` of a network filter: build the instance and store it in `slot`.
pub fn net_configure<F: crate::NetworkFilter>(
    slot: &'static NetSlot<F>,
    config: String,
) -> Result<wnet::NetworkSetup, String> {
    let instance = crate::network::NetworkInstance::<F>::configure(&config)?;
    let s = net_setup(instance.setup());
    store(slot, instance)?;
    Ok(s)
}

/// A network action for the host.
pub fn net_action(a: crate::NetworkAction) -> wnet::NetworkAction {
    match a {
        crate::NetworkAction::Continue => wnet::NetworkAction::Continue,
        crate::NetworkAction::Pause => wnet::NetworkAction::Pause,
        crate::NetworkAction::Close => wnet::NetworkAction::Close,
    }
}

/// A peer from the host.
pub fn peer(p: wnet::Peer) -> crate::Peer {
    match p {
        wnet::Peer::Downstream => crate::Peer::Downstream,
        wnet::Peer::Upstream => crate::Peer::Upstream,
    }
}

/// Wrap a borrowed connection.
pub fn connection(c: &wnet::Connection) -> crate::Connection<'_> {
    crate::Connection(ConnectionHandle::borrowed(c))
}

/// Run `f` on a connection's context (held by its `network-context`
/// resource); `default` if it is already borrowed (the host never re-enters
/// a call, so this does not happen, but it must not trap).
pub fn with_context<C, R>(
    cell: &std::cell::RefCell<C>,
    default: R,
    f: impl FnOnce(&mut C) -> R,
) -> R {
    match cell.try_borrow_mut() {
        Ok(mut c) => f(&mut c),
        Err(_) => default,
    }
}
