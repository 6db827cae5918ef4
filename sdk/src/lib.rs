//! # legate-sdk: write Legate HTTP filters in Rust
//!
//! A Legate filter is a WebAssembly component implementing the WIT world
//! `legate:filter/http-filter@0.1.0` (see `abi/README.md` in the Legate
//! repository). This crate hides the generated bindings behind an idiomatic
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
//! ## Declaring phases
//!
//! The host calls **only the phases declared** in [`Setup`], and each
//! declared phase costs one component call per request (about 0.5 µs plus the
//! work). A filter that only looks at request headers declares only
//! `on_request_headers` and costs one call per request. A non-zero-sized
//! [`HttpFilter::Context`] makes the SDK declare the `done` phase too, to free
//! the context at the end of each exchange.

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
mod setup;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
mod types;

pub use error::Error;
pub use exchange::Exchange;
pub use filter::{parse_config, HttpFilter, Instance};
pub use headers::{Body, Headers};
pub use host::{clock, plugin, random};
pub use setup::{Phase, Setup};
pub use types::{Action, BodyMode, Direction, HttpVersion, LocalResponse, TlsVersion};

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

    __lg::bindings::__export_http_filter!(__LegateExport with_types_in __lg::bindings);
        };
    };
}
