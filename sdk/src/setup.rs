//! Declaring which phases a filter wants ([`Setup`]): the host calls only those.

use crate::types::BodyMode;
use crate::Error;

/// Declares request headers this plugin owns, such as the identity headers
/// an authentication filter writes: the host removes every client-sent copy
/// of them from each request of a listener whose chain lists the plugin,
/// before the chain's first filter, on **every** route — also routes that
/// disable the plugin or run it with another config, where the filter never
/// sees the request to remove them itself. Call it from
/// [`HttpFilter::configure`](crate::HttpFilter::configure) (or `setup`); each
/// call adds to the set. Names are case-insensitive; list each spelling an
/// upstream may read as the same header (`x_user` beside `x-user`).
///
/// Errors: `InvalidArgument` (not a header name), `Denied` (a field the host
/// owns, e.g. `host` or `content-length`), `InvalidState` (outside
/// `configure`), `LimitExceeded` (more than 256 names in all); a refused call
/// declares none of its names. Needs a host of ABI 0.1.3 or later (an older
/// one refuses to load a plugin that calls it).
///
/// ```
/// # fn configure() -> Result<(), String> {
/// legate_sdk::sanitize_request_headers(&["x-user", "x_user"])
///     .map_err(|e| format!("declaring the identity headers: {e}"))?;
/// # Ok(()) }
/// ```
pub fn sanitize_request_headers(names: &[&str]) -> Result<(), Error> {
    crate::backend::sanitize_request_headers(names)
}

/// One HTTP phase a filter can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// `on_request_headers`.
    RequestHeaders,
    /// `on_request_body`.
    RequestBody,
    /// `on_request_trailers`.
    RequestTrailers,
    /// `on_response_headers`.
    ResponseHeaders,
    /// `on_response_body`.
    ResponseBody,
    /// `on_response_trailers`.
    ResponseTrailers,
    /// `on_log`.
    Log,
    /// The end of each exchange, where the SDK drops the per-exchange context.
    /// Declared automatically when [`HttpFilter::Context`](crate::HttpFilter::Context)
    /// is not a zero-sized type.
    Done,
}

impl Phase {
    const ALL: [Phase; 8] = [
        Phase::RequestHeaders,
        Phase::RequestBody,
        Phase::RequestTrailers,
        Phase::ResponseHeaders,
        Phase::ResponseBody,
        Phase::ResponseTrailers,
        Phase::Log,
        Phase::Done,
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// What a filter returns from [`HttpFilter::setup`](crate::HttpFilter::setup):
/// the phases it wants, body modes and the tick interval.
///
/// **Declare only what you use.** The host makes one component call per
/// declared phase per request (about 0.5 µs each, plus what the phase does) and
/// never calls an undeclared one; a filter that declares only
/// `on_request_headers` costs exactly one call per request. Overriding a trait
/// method without declaring its phase means it is never called.
///
/// ```
/// use legate_sdk::{BodyMode, Setup};
/// let setup = Setup::new()
///     .on_request_headers()
///     .on_response_body(BodyMode::Buffered)
///     .tick_every_ms(1000);
/// assert!(setup.declares(legate_sdk::Phase::ResponseBody));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Setup {
    phases: u8,
    request_body_mode: BodyMode,
    response_body_mode: BodyMode,
    tick_interval_ms: u32,
}

impl Setup {
    /// No phases, streamed body modes, no ticks.
    pub fn new() -> Self {
        Setup::default()
    }

    /// Declare `phase`.
    pub fn phase(mut self, phase: Phase) -> Self {
        self.phases |= phase.bit();
        self
    }

    /// Declare `on_request_headers`.
    pub fn on_request_headers(self) -> Self {
        self.phase(Phase::RequestHeaders)
    }

    /// Declare `on_request_body`, receiving the body in `mode` by default.
    pub fn on_request_body(mut self, mode: BodyMode) -> Self {
        self.request_body_mode = mode;
        self.phase(Phase::RequestBody)
    }

    /// Declare `on_request_trailers`.
    pub fn on_request_trailers(self) -> Self {
        self.phase(Phase::RequestTrailers)
    }

    /// Declare `on_response_headers`.
    pub fn on_response_headers(self) -> Self {
        self.phase(Phase::ResponseHeaders)
    }

    /// Declare `on_response_body`, receiving the body in `mode` by default.
    pub fn on_response_body(mut self, mode: BodyMode) -> Self {
        self.response_body_mode = mode;
        self.phase(Phase::ResponseBody)
    }

    /// Declare `on_response_trailers`.
    pub fn on_response_trailers(self) -> Self {
        self.phase(Phase::ResponseTrailers)
    }

    /// Declare `on_log`.
    pub fn on_log(self) -> Self {
        self.phase(Phase::Log)
    }

    /// Call `on_tick` every `ms` milliseconds on each instance (0: never; the
    /// host rejects intervals below its minimum, 10 ms by default).
    pub fn tick_every_ms(mut self, ms: u32) -> Self {
        self.tick_interval_ms = ms;
        self
    }

    /// Whether `phase` is declared.
    pub fn declares(&self, phase: Phase) -> bool {
        self.phases & phase.bit() != 0
    }

    /// Every declared phase, in ABI order.
    pub fn phases(&self) -> Vec<Phase> {
        Phase::ALL
            .into_iter()
            .filter(|p| self.declares(*p))
            .collect()
    }

    /// The default body mode of `direction`'s body phase.
    pub fn body_mode(&self, direction: crate::Direction) -> BodyMode {
        match direction {
            crate::Direction::Request => self.request_body_mode,
            crate::Direction::Response => self.response_body_mode,
        }
    }

    /// The tick interval in milliseconds (0: no ticks).
    pub fn tick_interval_ms(&self) -> u32 {
        self.tick_interval_ms
    }
}
