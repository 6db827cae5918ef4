//! # legate-sdk: write Legate filters in Rust
//!
//! A Legate filter is a WebAssembly component implementing the WIT world
//! `legate:filter/http-filter-kv@0.1.3` (an HTTP filter: world `http-filter`
//! plus the `kv-handler` export for asynchronous KV replies) or
//! `legate:filter/network-filter@0.1.3` (an L4 filter on TCP listeners; see
//! [Network filters](#network-filters)). See `abi/README.md` in the Legate
//! repository. This crate hides the generated bindings behind an idiomatic
//! API:
//!
//! - implement [`HttpFilter`] (typed `Config` via serde, per-exchange
//!   `Context`, phase methods with no-op defaults) and declare the phases you
//!   use in [`HttpFilter::setup`] with a [`Setup`] builder;
//! - export it with [`export!`];
//! - use the host services: [`Headers`], [`Body`], [`Exchange`], logging
//!   ([`info!`] & co), [`clock`], [`random`], [`plugin`], [`metrics`], [`kv`],
//!   [`callout`]. Every fallible call returns `Result<_, `[`Error`]`>`; nothing
//!   in the SDK panics on a host error;
//! - test the filter natively with [`testing`] (`cargo test`, no wasm, no proxy).
//!
//! Build with `legate plugin build path/to/crate` (or
//! `cargo build --release --target wasm32-wasip2`): the output `.wasm` is a
//! component the host loads directly.
//!
//! ## Example
//!
//! ```
//! use legate_sdk::metrics::Counter;
//! use legate_sdk::{Action, Exchange, Headers, HttpFilter, LocalResponse, Setup};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config {
//!     /// The header that must be present.
//!     header: String,
//! }
//!
//! struct RequireHeader {
//!     header: String,
//!     rejected: Counter,
//! }
//!
//! impl HttpFilter for RequireHeader {
//!     type Config = Config;
//!     type Context = ();
//!
//!     fn configure(config: Config) -> Result<Self, String> {
//!         let rejected = Counter::define("rejected_total", "Requests rejected", &[])
//!             .map_err(|e| format!("defining rejected_total: {e}"))?;
//!         Ok(RequireHeader { header: config.header, rejected })
//!     }
//!
//!     fn setup(&self) -> Setup {
//!         // One call per request: only the request head is declared.
//!         Setup::new().on_request_headers()
//!     }
//!
//!     fn on_request_headers(
//!         &mut self,
//!         _ctx: &mut (),
//!         _exchange: &Exchange<'_>,
//!         headers: &Headers<'_>,
//!         _end_of_stream: bool,
//!     ) -> Action {
//!         if headers.has(&self.header) {
//!             return Action::Continue;
//!         }
//!         self.rejected.inc();
//!         legate_sdk::info!("rejected: no {}", self.header);
//!         Action::Respond(
//!             LocalResponse::new(401)
//!                 .header("content-type", "text/plain")
//!                 .body(format!("missing {}\n", self.header))
//!                 .details("missing_header"),
//!         )
//!     }
//! }
//!
//! legate_sdk::export!(RequireHeader);
//!
//! // Natively, the same filter runs on the test harness:
//! use legate_sdk::testing::{FilterTest, Request};
//! let mut t = FilterTest::<RequireHeader>::configure(r#"{"header": "x-api-key"}"#).unwrap();
//! let action = t.exchange(Request::get("/")).request_headers();
//! assert!(matches!(action, Action::Respond(r) if r.status == 401));
//! assert_eq!(t.host().counter("rejected_total", &[]), Some(1));
//!
//! // A config error names the field:
//! let err = FilterTest::<RequireHeader>::configure(r#"{"header": 5}"#).err().unwrap();
//! assert!(err.contains("header"), "{err}");
//! ```
//!
//! ## Network filters
//!
//! An L4 filter runs on the connections of a TCP listener (`tcp.filters` in
//! the host configuration): implement [`NetworkFilter`] (same `Config` and
//! per-connection `Context` scheme, events with no-op defaults), declare
//! the events in a [`NetworkSetup`] and export it with [`export_network!`].
//! It uses the same host services; the data of a call is a [`Body`] and the
//! connection a [`Connection`]. [`testing::NetworkFilterTest`] runs it
//! natively: feed bytes from either side, see what would be forwarded,
//! whether it paused or closed.
//!
//! ```
//! use legate_sdk::metrics::Counter;
//! use legate_sdk::{Body, Connection, NetworkAction, NetworkFilter, NetworkSetup};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config {
//!     /// Bytes a client may send before the connection is closed.
//!     max_bytes: u64,
//! }
//!
//! struct Quota {
//!     max: u64,
//!     closed: Counter,
//! }
//!
//! #[derive(Default)]
//! struct Sent(u64);
//!
//! impl NetworkFilter for Quota {
//!     type Config = Config;
//!     type Context = Sent;
//!
//!     fn configure(config: Config) -> Result<Self, String> {
//!         let closed = Counter::define("quota_closed_total", "Connections over quota", &[])
//!             .map_err(|e| format!("defining quota_closed_total: {e}"))?;
//!         Ok(Quota { max: config.max_bytes, closed })
//!     }
//!
//!     fn setup(&self) -> NetworkSetup {
//!         NetworkSetup::new().on_downstream_data()
//!     }
//!
//!     fn on_downstream_data(
//!         &mut self,
//!         sent: &mut Sent,
//!         _conn: &Connection<'_>,
//!         data: &Body<'_>,
//!         _end_of_stream: bool,
//!     ) -> NetworkAction {
//!         sent.0 += data.len();
//!         if sent.0 > self.max {
//!             self.closed.inc();
//!             return NetworkAction::Close;
//!         }
//!         NetworkAction::Continue
//!     }
//! }
//!
//! legate_sdk::export_network!(Quota);
//!
//! use legate_sdk::testing::{Conn, NetworkFilterTest};
//! let mut t = NetworkFilterTest::<Quota>::configure(r#"{"max_bytes": 5}"#).unwrap();
//! let mut c = t.connect(Conn::new());
//! assert_eq!(c.new_connection(), NetworkAction::Continue);
//! assert_eq!(c.downstream("abc", false), NetworkAction::Continue);
//! assert_eq!(c.upstream("pong", false), NetworkAction::Continue); // not declared
//! assert_eq!(c.downstream("defg", false), NetworkAction::Close);
//! assert_eq!(c.sent_upstream(), b"abc");
//! assert_eq!(c.sent_downstream(), b"pong");
//! drop(c);
//! assert_eq!(t.host().counter("quota_closed_total", &[]), Some(1));
//! ```
//!
//! ## Declaring phases
//!
//! The host calls **only the phases declared** in [`Setup`], and each
//! declared phase costs one component call per request (about 0.5 µs plus the
//! work). A filter that only looks at request headers declares only
//! `on_request_headers` and costs one call per request. A non-zero-sized
//! [`HttpFilter::Context`] makes the SDK declare the `done` phase too, to free
//! the context at the end of each exchange.
//!
//! ## Keeping a filter cheap
//!
//! Measured with `bench/instructions.sh` (wasmtime 48, release; a request
//! through Legate without filters is ~44k instructions, bench/README.md):
//!
//! - A phase call costs ~4.4k instructions before your code runs; every call
//!   into the host (a header read or write, a KV operation, a counter, the
//!   clock, the client address) ~1k. Count them: a filter making six host
//!   calls per request spends more in them than in its own logic.
//! - Declare only the phases you need, and call [`Exchange::detach`] once the
//!   filter has nothing more to do for an exchange: the host then skips its
//!   later phases and its `done` call.
//! - Read a header with [`Headers::get`] (bytes) when you compare or hash it;
//!   [`Headers::get_str`] checks UTF-8 in Wasm, ~3.5 instructions per byte
//!   (1.8k for a 500-byte bearer header).
//! - Allocation is the guest's `dlmalloc`, ~100–200 instructions per
//!   allocation and free: size buffers up front, keep per-exchange state
//!   small, and avoid `format!`/`to_string` on the hot path (the formatting
//!   machinery costs more than the digits; the first-party `ratelimit` plugin
//!   writes its numbers by hand).

#![deny(missing_docs)]

mod backend;
pub mod callout;
mod error;
mod exchange;
mod filter;
mod headers;
mod host;
pub mod kv;
pub mod log;
pub mod metrics;
mod network;
mod setup;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
mod types;

pub use error::Error;
pub use exchange::Exchange;
pub use filter::{parse_config, HttpFilter, Instance};
pub use headers::{Body, Headers};
pub use host::{clock, plugin, random};
pub use network::{
    Connection, NetworkAction, NetworkEvent, NetworkFilter, NetworkInstance, NetworkSetup, Peer,
};
pub use setup::{sanitize_request_headers, Phase, Setup};
pub use types::{Action, BodyMode, Direction, HttpVersion, LocalResponse, TlsVersion};

/// The rules the host and this SDK share (crate `legate-abi-rules`, in the
/// Legate repository's `abi/rules`): what the host applies to a plugin, and
/// [`testing`] the same way. For filters too: gRPC's mapping of a non-gRPC
/// answer's HTTP status ([`rules::grpc::status_of_http`]) and the
/// `grpc-message` encoding ([`rules::grpc::percent_encode`]), as the host's
/// own gRPC local replies use them.
pub use legate_abi_rules as rules;

/// Re-exported for [`export!`]; not a stable API.
#[doc(hidden)]
pub mod __private {
    #[cfg(target_arch = "wasm32")]
    pub use crate::backend::wasm::*;
}

/// Export a type implementing [`HttpFilter`] as the component's
/// `legate:filter/http-handler`. Use once per crate, at the top level. On
/// non-wasm targets it expands to nothing, so the same crate builds natively
/// for tests.
#[macro_export]
macro_rules! export {
    ($filter:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use __lg::bindings::exports::legate::filter::http_handler as __h;
            use __lg::bindings::legate::filter as __w;
            use $crate::__private as __lg;

            ::std::thread_local! {
                static __LEGATE_INSTANCE: ::std::cell::RefCell<
                    ::std::option::Option<$crate::Instance<$filter>>,
                > = const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            struct __LegateExport;

            impl __h::Guest for __LegateExport {
                fn configure(
                    config: ::std::string::String,
                ) -> ::std::result::Result<__w::http::HttpSetup, ::std::string::String> {
                    __lg::configure::<$filter>(&__LEGATE_INSTANCE, config)
                }
                fn on_tick() {
                    __lg::with_instance(&__LEGATE_INSTANCE, (), |i| i.tick())
                }
                fn on_tick_callout_response(
                    id: u64,
                    response: ::std::result::Result<
                        __w::callout::CalloutResponse,
                        __w::types::Error,
                    >,
                ) {
                    let r = __lg::callout_result(response);
                    __lg::with_instance(&__LEGATE_INSTANCE, (), |i| i.tick_callout_response(id, r))
                }
                fn on_request_headers(
                    context: u64,
                    exchange: &__w::http::Exchange,
                    headers: &__w::http::Headers,
                    end_of_stream: bool,
                ) -> __w::http::Action {
                    __lg::action(__lg::with_instance(
                        &__LEGATE_INSTANCE,
                        $crate::Action::Continue,
                        |i| {
                            i.request_headers(
                                context,
                                &__lg::exchange(exchange),
                                &__lg::headers(headers),
                                end_of_stream,
                            )
                        },
                    ))
                }
                fn on_request_body(
                    context: u64,
                    exchange: &__w::http::Exchange,
                    body: &__w::types::Buffer,
                    end_of_stream: bool,
                ) -> __w::http::Action {
                    __lg::action(__lg::with_instance(
                        &__LEGATE_INSTANCE,
                        $crate::Action::Continue,
                        |i| {
                            i.request_body(
                                context,
                                &__lg::exchange(exchange),
                                &__lg::body(body),
                                end_of_stream,
                            )
                        },
                    ))
                }
                fn on_request_trailers(
                    context: u64,
                    exchange: &__w::http::Exchange,
                    trailers: &__w::http::Headers,
                ) -> __w::http::Action {
                    __lg::action(__lg::with_instance(
                        &__LEGATE_INSTANCE,
                        $crate::Action::Continue,
                        |i| {
                            i.request_trailers(
                                context,
                                &__lg::exchange(exchange),
                                &__lg::headers(trailers),
                            )
                        },
                    ))
                }
                fn on_response_headers(
                    context: u64,
                    exchange: &__w::http::Exchange,
                    headers: &__w::http::Headers,
                    end_of_stream: bool,
                ) -> __w::http::Action {
                    __lg::action(__lg::with_instance(
                        &__LEGATE_INSTANCE,
                        $crate::Action::Continue,
                        |i| {
                            i.response_headers(
                                context,
                                &__lg::exchange(exchange),
                                &__lg::headers(headers),
                                end_of_stream,
                            )
                        },
                    ))
                }
                fn on_response_body(
                    context: u64,
                    exchange: &__w::http::Exchange,
                    body: &__w::types::Buffer,
                    end_of_stream: bool,
                ) -> __w::http::Action {
                    __lg::action(__lg::with_instance(
                        &__LEGATE_INSTANCE,
                        $crate::Action::Continue,
                        |i| {
                            i.response_body(
                                context,
                                &__lg::exchange(exchange),
                                &__lg::body(body),
                                end_of_stream,
                            )
                        },
                    ))
                }
                fn on_response_trailers(
                    context: u64,
                    exchange: &__w::http::Exchange,
                    trailers: &__w::http::Headers,
                ) -> __w::http::Action {
                    __lg::action(__lg::with_instance(
                        &__LEGATE_INSTANCE,
                        $crate::Action::Continue,
                        |i| {
                            i.response_trailers(
                                context,
                                &__lg::exchange(exchange),
                                &__lg::headers(trailers),
                            )
                        },
                    ))
                }
                fn on_log(context: u64, exchange: &__w::http::Exchange) {
                    __lg::with_instance(&__LEGATE_INSTANCE, (), |i| {
                        i.log(context, &__lg::exchange(exchange))
                    })
                }
                fn on_callout_response(
                    context: u64,
                    exchange: &__w::http::Exchange,
                    id: u64,
                    response: ::std::result::Result<
                        __w::callout::CalloutResponse,
                        __w::types::Error,
                    >,
                ) -> __w::http::Action {
                    let r = __lg::callout_result(response);
                    __lg::action(__lg::with_instance(
                        &__LEGATE_INSTANCE,
                        $crate::Action::Continue,
                        |i| i.callout_response(context, &__lg::exchange(exchange), id, r),
                    ))
                }
                fn on_done(context: u64) {
                    __lg::with_instance(&__LEGATE_INSTANCE, (), |i| i.done(context))
                }
            }

            impl __lg::bindings::exports::legate::filter::kv_handler::Guest for __LegateExport {
                fn on_kv_response(
                    context: u64,
                    exchange: &__w::http::Exchange,
                    id: u64,
                    reply: ::std::result::Result<__w::kv::Reply, __w::types::Error>,
                ) -> __w::http::Action {
                    let r = __lg::kv_reply(reply);
                    __lg::action(__lg::with_instance(
                        &__LEGATE_INSTANCE,
                        $crate::Action::Continue,
                        |i| i.kv_response(context, &__lg::exchange(exchange), id, r),
                    ))
                }
            }

    __lg::bindings::__export_http_filter!(__LegateExport with_types_in __lg::bindings);
        };
    };
}

/// Export a type implementing [`NetworkFilter`] as the component's
/// `legate:filter/network-handler` (world `network-filter`). Use once per
/// crate, at the top level, instead of [`export!`]. On non-wasm targets it
/// expands to nothing, so the same crate builds natively for tests.
#[macro_export]
macro_rules! export_network {
    ($filter:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use __lg::bindings::legate::filter as __w;
            use __lg::net_bindings::exports::legate::filter::network_handler as __h;
            use __lg::net_bindings::legate::filter::network as __n;
            use $crate::__private as __lg;

            ::std::thread_local! {
                static __LEGATE_NET_INSTANCE: ::std::cell::RefCell<
                    ::std::option::Option<$crate::NetworkInstance<$filter>>,
                > = const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            struct __LegateNetExport;

            /// The guest `network-context`: holds the connection's context.
            struct __LegateNetContext(
                ::std::cell::RefCell<<$filter as $crate::NetworkFilter>::Context>,
            );

            impl __h::Guest for __LegateNetExport {
                type NetworkContext = __LegateNetContext;

                fn configure(
                    config: ::std::string::String,
                ) -> ::std::result::Result<__n::NetworkSetup, ::std::string::String> {
                    __lg::net_configure::<$filter>(&__LEGATE_NET_INSTANCE, config)
                }
                fn on_tick() {
                    __lg::with_instance(&__LEGATE_NET_INSTANCE, (), |i| i.tick())
                }
                fn on_tick_callout_response(
                    id: u64,
                    response: ::std::result::Result<
                        __w::callout::CalloutResponse,
                        __w::types::Error,
                    >,
                ) {
                    let r = __lg::callout_result(response);
                    __lg::with_instance(&__LEGATE_NET_INSTANCE, (), |i| {
                        i.tick_callout_response(id, r)
                    })
                }
            }

            impl __LegateNetContext {
                fn run(
                    &self,
                    f: impl FnOnce(
                        &mut $crate::NetworkInstance<$filter>,
                        &mut <$filter as $crate::NetworkFilter>::Context,
                    ) -> $crate::NetworkAction,
                ) -> __n::NetworkAction {
                    let continue_ = $crate::NetworkAction::Continue;
                    __lg::net_action(__lg::with_context(&self.0, continue_, |ctx| {
                        __lg::with_instance(&__LEGATE_NET_INSTANCE, continue_, |i| f(i, ctx))
                    }))
                }
            }

            impl __h::GuestNetworkContext for __LegateNetContext {
                fn new() -> Self {
                    __LegateNetContext(::std::cell::RefCell::new(
                        ::std::default::Default::default(),
                    ))
                }
                fn on_new_connection(&self, connection: &__n::Connection) -> __n::NetworkAction {
                    self.run(|i, ctx| i.new_connection(ctx, &__lg::connection(connection)))
                }
                fn on_downstream_data(
                    &self,
                    connection: &__n::Connection,
                    data: &__w::types::Buffer,
                    end_of_stream: bool,
                ) -> __n::NetworkAction {
                    self.run(|i, ctx| {
                        i.data(
                            ctx,
                            &__lg::connection(connection),
                            $crate::Peer::Downstream,
                            &__lg::body(data),
                            end_of_stream,
                        )
                    })
                }
                fn on_upstream_data(
                    &self,
                    connection: &__n::Connection,
                    data: &__w::types::Buffer,
                    end_of_stream: bool,
                ) -> __n::NetworkAction {
                    self.run(|i, ctx| {
                        i.data(
                            ctx,
                            &__lg::connection(connection),
                            $crate::Peer::Upstream,
                            &__lg::body(data),
                            end_of_stream,
                        )
                    })
                }
                fn on_close(&self, connection: &__n::Connection, peer: __n::Peer) {
                    let p = __lg::peer(peer);
                    __lg::with_context(&self.0, (), |ctx| {
                        __lg::with_instance(&__LEGATE_NET_INSTANCE, (), |i| {
                            i.close(ctx, &__lg::connection(connection), p)
                        })
                    })
                }
                fn on_callout_response(
                    &self,
                    connection: &__n::Connection,
                    id: u64,
                    response: ::std::result::Result<
                        __w::callout::CalloutResponse,
                        __w::types::Error,
                    >,
                ) -> __n::NetworkAction {
                    let r = __lg::callout_result(response);
                    self.run(|i, ctx| {
                        i.callout_response(ctx, &__lg::connection(connection), id, r)
                    })
                }
            }

    __lg::net_bindings::__export_network_filter!(__LegateNetExport with_types_in __lg::net_bindings);
        };
    };
}
