//! L4 (TCP) filters: the [`NetworkFilter`] trait a network filter implements,
//! what it declares ([`NetworkSetup`]) and returns ([`NetworkAction`]), the
//! [`Connection`] it sees, and the per-instance runtime ([`NetworkInstance`])
//! that the `export_network!` glue and the native harness
//! ([`testing::NetworkFilterTest`](crate::testing::NetworkFilterTest)) both
//! drive, so what the harness tests is what runs in the proxy.
//!
//! The world is `legate:filter/network-filter@0.1.3` (abi/README.md §11). The
//! host services (logging, metrics, KV, callouts, clocks…) are the same
//! modules as for HTTP filters; the data of a call is a [`Body`].

use std::net::SocketAddr;

use serde::de::DeserializeOwned;

use crate::backend::ConnectionHandle;
use crate::callout::{CalloutId, CalloutResponse};
use crate::filter::parse_config;
use crate::headers::Body;
use crate::types::{Direction, TlsVersion};
use crate::Error;

/// What a network phase tells the host to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkAction {
    /// Forward the data (from `on_new_connection`: connect upstream).
    Continue,
    /// Hold the data (or the connection) in this filter. With a callout of
    /// the connection outstanding, that direction stops reading until
    /// `on_callout_response` returns `Continue`; with none, the next data of
    /// that direction is appended and the filter called again with all of it
    /// (up to the plugin's buffer cap). From `on_new_connection` and at end of
    /// stream a pause needs an outstanding callout (otherwise it is a failure).
    Pause,
    /// Close both connections; held data is discarded.
    Close,
}

/// One side of the proxied connection pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// The client connection.
    Downstream,
    /// The connection to the upstream endpoint.
    Upstream,
}

/// One network event a filter can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetworkEvent {
    /// `on_new_connection`.
    NewConnection,
    /// `on_downstream_data`.
    DownstreamData,
    /// `on_upstream_data`.
    UpstreamData,
    /// `on_close` (once per side that was open).
    Close,
}

impl NetworkEvent {
    const ALL: [NetworkEvent; 4] = [
        NetworkEvent::NewConnection,
        NetworkEvent::DownstreamData,
        NetworkEvent::UpstreamData,
        NetworkEvent::Close,
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What a network filter returns from [`NetworkFilter::setup`]: the events it
/// wants and the tick interval. The host calls **only declared events**
/// (each costs one component call per occurrence); an undeclared data event
/// passes the bytes through untouched.
///
/// ```
/// use legate_sdk::{NetworkEvent, NetworkSetup};
/// let setup = NetworkSetup::new().on_downstream_data().on_close().tick_every_ms(1000);
/// assert!(setup.declares(NetworkEvent::Close));
/// assert!(!setup.declares(NetworkEvent::UpstreamData));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetworkSetup {
    events: u8,
    tick_interval_ms: u32,
}

impl NetworkSetup {
    /// No events, no ticks.
    pub fn new() -> Self {
        NetworkSetup::default()
    }

    /// Declare `event`.
    pub fn event(mut self, event: NetworkEvent) -> Self {
        self.events |= event.bit();
        self
    }

    /// Declare `on_new_connection`.
    pub fn on_new_connection(self) -> Self {
        self.event(NetworkEvent::NewConnection)
    }

    /// Declare `on_downstream_data`.
    pub fn on_downstream_data(self) -> Self {
        self.event(NetworkEvent::DownstreamData)
    }

    /// Declare `on_upstream_data`.
    pub fn on_upstream_data(self) -> Self {
        self.event(NetworkEvent::UpstreamData)
    }

    /// Declare `on_close`.
    pub fn on_close(self) -> Self {
        self.event(NetworkEvent::Close)
    }

    /// Call `on_tick` every `ms` milliseconds on each instance (0: never; the
    /// host rejects intervals below its minimum, 10 ms by default).
    pub fn tick_every_ms(mut self, ms: u32) -> Self {
        self.tick_interval_ms = ms;
        self
    }

    /// Whether `event` is declared.
    pub fn declares(&self, event: NetworkEvent) -> bool {
        self.events & event.bit() != 0
    }

    /// Every declared event, in ABI order.
    pub fn events(&self) -> Vec<NetworkEvent> {
        NetworkEvent::ALL
            .into_iter()
            .filter(|e| self.declares(*e))
            .collect()
    }

    /// The tick interval in milliseconds (0: no ticks).
    pub fn tick_interval_ms(&self) -> u32 {
        self.tick_interval_ms
    }
}

/// A downstream connection and (once connected) its upstream connection, as
/// the host shows it during one call.
pub struct Connection<'a>(pub(crate) ConnectionHandle<'a>);

impl Connection<'_> {
    /// Unique per host process.
    pub fn id(&self) -> u64 {
        self.0.id()
    }
    /// The listener that accepted the connection.
    pub fn listener_name(&self) -> String {
        self.0.listener_name()
    }
    /// The downstream peer.
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
    /// The upstream cluster; `None` if the listener has none.
    pub fn cluster(&self) -> Option<String> {
        self.0.cluster()
    }
    /// The upstream endpoint; `None` before connecting.
    pub fn upstream_address(&self) -> Option<SocketAddr> {
        self.0.upstream_address()
    }
    /// When the connection was accepted (Unix nanoseconds).
    pub fn start_time(&self) -> u64 {
        self.0.start_time()
    }
    /// The data the host holds for this filter in `direction` (`Request`:
    /// from downstream, `Response`: from upstream); `None` outside a data
    /// call of that direction. Writable only during that call (or while
    /// paused in it).
    pub fn data(&self, direction: Direction) -> Option<Body<'_>> {
        self.0.data(direction).map(Body)
    }
}

/// An L4 (TCP) filter. Implement it, then
/// `legate_sdk::export_network!(YourFilter);`.
///
/// Every event method has a no-op default ([`NetworkAction::Continue`]);
/// override the ones you need **and declare them** in
/// [`NetworkFilter::setup`]: the host calls only declared events.
///
/// One value of the filter type exists per plugin instance (per worker
/// thread); calls are strictly sequential, so `&mut self` needs no locks.
/// Per-connection state goes into [`NetworkFilter::Context`], created when
/// the connection is accepted and dropped after its last `on_close`.
///
/// ```
/// use legate_sdk::{Body, Connection, NetworkAction, NetworkFilter, NetworkSetup};
///
/// /// Closes a connection whose client sends `QUIT`.
/// struct Quit;
///
/// impl NetworkFilter for Quit {
///     type Config = ();
///     type Context = ();
///     fn configure(_: ()) -> Result<Self, String> {
///         Ok(Quit)
///     }
///     fn setup(&self) -> NetworkSetup {
///         NetworkSetup::new().on_downstream_data()
///     }
///     fn on_downstream_data(
///         &mut self,
///         _ctx: &mut (),
///         _conn: &Connection<'_>,
///         data: &Body<'_>,
///         _end_of_stream: bool,
///     ) -> NetworkAction {
///         if data.to_vec().windows(4).any(|w| w == b"QUIT") {
///             NetworkAction::Close
///         } else {
///             NetworkAction::Continue
///         }
///     }
/// }
/// legate_sdk::export_network!(Quit);
///
/// use legate_sdk::testing::{Conn, NetworkFilterTest};
/// let mut t = NetworkFilterTest::<Quit>::configure("null").unwrap();
/// let mut c = t.connect(Conn::new());
/// assert_eq!(c.new_connection(), NetworkAction::Continue);
/// assert_eq!(c.downstream("hi", false), NetworkAction::Continue);
/// assert_eq!(c.downstream("QUIT\n", false), NetworkAction::Close);
/// assert_eq!(c.sent_upstream(), b"hi");
/// assert!(c.is_closed());
/// ```
pub trait NetworkFilter: Sized + 'static {
    /// The plugin's `config:`, deserialized from JSON exactly as
    /// [`HttpFilter::Config`](crate::HttpFilter::Config) (`null` falls back to
    /// `{}`; errors name the offending field).
    type Config: DeserializeOwned;

    /// Per-connection state: `Default` when the connection is accepted,
    /// dropped after the last `on_close`. Use `()` for none.
    type Context: Default + 'static;

    /// Build the filter from its config (validate it, define metrics, open
    /// KV namespaces). `Err(message)` rejects the load, shown verbatim.
    fn configure(config: Self::Config) -> Result<Self, String>;

    /// The events this filter wants and its tick interval.
    fn setup(&self) -> NetworkSetup;

    /// Before the upstream connection is opened. `Pause` (with a callout
    /// sent) delays connecting; `Close` rejects the connection.
    fn on_new_connection(
        &mut self,
        ctx: &mut Self::Context,
        connection: &Connection<'_>,
    ) -> NetworkAction {
        let _ = (ctx, connection);
        NetworkAction::Continue
    }

    /// Bytes from downstream, before they are written upstream; `data` may
    /// be rewritten. `end_of_stream`: the client half-closed.
    fn on_downstream_data(
        &mut self,
        ctx: &mut Self::Context,
        connection: &Connection<'_>,
        data: &Body<'_>,
        end_of_stream: bool,
    ) -> NetworkAction {
        let _ = (ctx, connection, data, end_of_stream);
        NetworkAction::Continue
    }

    /// Bytes from upstream, before they are written downstream.
    fn on_upstream_data(
        &mut self,
        ctx: &mut Self::Context,
        connection: &Connection<'_>,
        data: &Body<'_>,
        end_of_stream: bool,
    ) -> NetworkAction {
        let _ = (ctx, connection, data, end_of_stream);
        NetworkAction::Continue
    }

    /// `peer`'s connection closed; once per side that was open.
    fn on_close(&mut self, ctx: &mut Self::Context, connection: &Connection<'_>, peer: Peer) {
        let _ = (ctx, connection, peer);
    }

    /// The response to a callout this connection sent. While paused,
    /// `Continue` resumes (connects, or forwards the held data), `Close`
    /// closes, `Pause` keeps waiting (only with another callout outstanding).
    fn on_callout_response(
        &mut self,
        ctx: &mut Self::Context,
        connection: &Connection<'_>,
        id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) -> NetworkAction {
        let _ = (ctx, connection, id, response);
        NetworkAction::Continue
    }

    /// Called every [`NetworkSetup::tick_every_ms`] milliseconds on each
    /// instance.
    fn on_tick(&mut self) {}

    /// The response to a callout sent from `on_tick`.
    fn on_tick_callout_response(
        &mut self,
        id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) {
        let _ = (id, response);
    }
}

/// One configured network filter. Per-connection contexts are owned by the
/// caller (the guest `network-context` resource, or the harness's
/// connection), so the instance holds only the filter. Used by the export
/// glue and by [`testing`](crate::testing); not needed by filter code.
pub struct NetworkInstance<F: NetworkFilter> {
    filter: F,
    setup: NetworkSetup,
}

impl<F: NetworkFilter> NetworkInstance<F> {
    /// Parse `config` and run [`NetworkFilter::configure`] and
    /// [`NetworkFilter::setup`].
    pub fn configure(config: &str) -> Result<Self, String> {
        let config = parse_config::<F::Config>(config)?;
        let filter = F::configure(config)?;
        let setup = filter.setup();
        Ok(NetworkInstance { filter, setup })
    }

    /// The setup `configure` returns to the host.
    pub fn setup(&self) -> NetworkSetup {
        self.setup
    }

    /// The filter value.
    pub fn filter(&self) -> &F {
        &self.filter
    }

    /// Dispatch `on_new_connection`.
    pub fn new_connection(&mut self, ctx: &mut F::Context, c: &Connection<'_>) -> NetworkAction {
        self.filter.on_new_connection(ctx, c)
    }
    /// Dispatch `on_downstream_data` or `on_upstream_data` (data from `from`).
    pub fn data(
        &mut self,
        ctx: &mut F::Context,
        c: &Connection<'_>,
        from: Peer,
        data: &Body<'_>,
        eos: bool,
    ) -> NetworkAction {
        match from {
            Peer::Downstream => self.filter.on_downstream_data(ctx, c, data, eos),
            Peer::Upstream => self.filter.on_upstream_data(ctx, c, data, eos),
        }
    }
    /// Dispatch `on_close`.
    pub fn close(&mut self, ctx: &mut F::Context, c: &Connection<'_>, peer: Peer) {
        self.filter.on_close(ctx, c, peer)
    }
    /// Dispatch `on_callout_response`.
    pub fn callout_response(
        &mut self,
        ctx: &mut F::Context,
        c: &Connection<'_>,
        id: CalloutId,
        r: Result<CalloutResponse, Error>,
    ) -> NetworkAction {
        self.filter.on_callout_response(ctx, c, id, r)
    }
    /// Dispatch `on_tick`.
    pub fn tick(&mut self) {
        self.filter.on_tick()
    }
    /// Dispatch `on_tick_callout_response`.
    pub fn tick_callout_response(&mut self, id: CalloutId, r: Result<CalloutResponse, Error>) {
        self.filter.on_tick_callout_response(id, r)
    }
}
