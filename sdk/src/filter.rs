//! The [`HttpFilter`] trait a filter implements, and the per-instance runtime
//! ([`Instance`]) that parses the config, keeps per-exchange contexts and
//! dispatches phases. The same runtime serves the wasm exports and the native
//! test harness, so what the harness tests is what runs in the proxy.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use serde::de::DeserializeOwned;

use crate::callout::{CalloutId, CalloutResponse};
use crate::exchange::Exchange;
use crate::headers::{Body, Headers};
use crate::kv::{CallId, Reply};
use crate::setup::{Phase, Setup};
use crate::types::Action;
use crate::Error;

/// An HTTP filter. Implement it, then `legate_sdk::export!(YourFilter);`.
///
/// Every phase method has a no-op default (returning [`Action::Continue`]);
/// override the ones you need **and declare them** in [`HttpFilter::setup`]:
/// the host calls only declared phases.
///
/// One value of the filter type exists per plugin instance (per worker
/// thread); calls into it are strictly sequential, so `&mut self` needs no
/// locks. Per-exchange state goes into [`HttpFilter::Context`].
pub trait HttpFilter: Sized + 'static {
    /// The plugin's `config:` from the host configuration, deserialized from
    /// JSON. Use `()` or `serde_json::Value` for none/free-form. An absent
    /// config is `null`; if `Config` cannot be built from `null`, the SDK tries
    /// `{}`, so a struct whose fields all have `#[serde(default)]` works without
    /// one. A config that does not deserialize rejects the load with a message
    /// naming the offending field.
    type Config: DeserializeOwned;

    /// Per-exchange state, created with `Default` on the exchange's first phase
    /// and dropped when the exchange is over. Use `()` for a stateless filter.
    /// For any non-zero-sized type the SDK keeps a map keyed by the host's
    /// `context` id and declares the `done` phase itself (one more call per
    /// exchange) to free the entry.
    type Context: Default + 'static;

    /// Build the filter from its config: validate it, define metrics
    /// ([`Counter::define`](crate::metrics::Counter::define)), open KV
    /// namespaces. `Err(message)` rejects the load and is shown to the
    /// operator verbatim: keep it to one line.
    fn configure(config: Self::Config) -> Result<Self, String>;

    /// The phases this filter wants, its body modes and tick interval.
    fn setup(&self) -> Setup;

    /// The request head. `end_of_stream`: no body and no trailers follow.
    fn on_request_headers(
        &mut self,
        ctx: &mut Self::Context,
        exchange: &Exchange<'_>,
        headers: &Headers<'_>,
        end_of_stream: bool,
    ) -> Action {
        let _ = (ctx, exchange, headers, end_of_stream);
        Action::Continue
    }

    /// A request body chunk (streamed) or the whole body (buffered).
    fn on_request_body(
        &mut self,
        ctx: &mut Self::Context,
        exchange: &Exchange<'_>,
        body: &Body<'_>,
        end_of_stream: bool,
    ) -> Action {
        let _ = (ctx, exchange, body, end_of_stream);
        Action::Continue
    }

    /// The request trailers; the last request phase.
    fn on_request_trailers(
        &mut self,
        ctx: &mut Self::Context,
        exchange: &Exchange<'_>,
        trailers: &Headers<'_>,
    ) -> Action {
        let _ = (ctx, exchange, trailers);
        Action::Continue
    }

    /// The response head (status via [`Exchange::status`]).
    fn on_response_headers(
        &mut self,
        ctx: &mut Self::Context,
        exchange: &Exchange<'_>,
        headers: &Headers<'_>,
        end_of_stream: bool,
    ) -> Action {
        let _ = (ctx, exchange, headers, end_of_stream);
        Action::Continue
    }

    /// A response body chunk or the whole buffered body.
    fn on_response_body(
        &mut self,
        ctx: &mut Self::Context,
        exchange: &Exchange<'_>,
        body: &Body<'_>,
        end_of_stream: bool,
    ) -> Action {
        let _ = (ctx, exchange, body, end_of_stream);
        Action::Continue
    }

    /// The response trailers; the last response phase.
    fn on_response_trailers(
        &mut self,
        ctx: &mut Self::Context,
        exchange: &Exchange<'_>,
        trailers: &Headers<'_>,
    ) -> Action {
        let _ = (ctx, exchange, trailers);
        Action::Continue
    }

    /// After the response was sent or the exchange aborted; read-only.
    fn on_log(&mut self, ctx: &mut Self::Context, exchange: &Exchange<'_>) {
        let _ = (ctx, exchange);
    }

    /// The response to a callout this exchange sent. While paused, `Continue`
    /// resumes, `Respond` answers, `Pause` keeps waiting (only with another
    /// callout outstanding).
    fn on_callout_response(
        &mut self,
        ctx: &mut Self::Context,
        exchange: &Exchange<'_>,
        id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) -> Action {
        let _ = (ctx, exchange, id, response);
        Action::Continue
    }

    /// The reply to KV call `id` ([`Namespace::start_get`](crate::kv::Namespace::start_get)
    /// and the other `start_*` calls), which this exchange started. As
    /// [`HttpFilter::on_callout_response`]: while paused, `Continue` resumes,
    /// `Respond` answers, `Pause` keeps waiting (only with another callout or
    /// KV call outstanding).
    fn on_kv_response(
        &mut self,
        ctx: &mut Self::Context,
        exchange: &Exchange<'_>,
        id: CallId,
        reply: Result<Reply, Error>,
    ) -> Action {
        let _ = (ctx, exchange, id, reply);
        Action::Continue
    }

    /// The exchange is over, or the filter detached from it
    /// ([`Exchange::detach`]); `ctx` is dropped after this returns. Called only
    /// when the `done` phase is declared (automatic for a non-zero-sized
    /// `Context`).
    fn on_done(&mut self, ctx: Self::Context) {
        let _ = ctx;
    }

    /// Called every [`Setup::tick_every_ms`] milliseconds.
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

/// Parse the JSON config text into `T`, naming the offending field on error.
///
/// The message is one line, `invalid config: field `PATH`: WHAT` (or
/// `invalid config: WHAT` for the config as a whole), e.g.
/// ``invalid config: field `limits[1].max`: invalid type: string "x", expected u32``.
/// It gives no line and column: the host hands the plugin JSON it made from
/// the YAML config, so a position in that text would point at nothing the
/// operator wrote (JSON that does not parse, only possible in tests, keeps
/// its position). The host places the message itself, at `PATH` (or at the
/// unknown field) in the config file, `file:line:col`; a plugin's own checks
/// get the same by starting their messages ``invalid config: field `PATH`: ``. With no config (`null`) that `T` cannot take, the error is
/// that of `{}` (``missing field `mode` ``) and says no config was given.
pub fn parse_config<T: DeserializeOwned>(json: &str) -> Result<T, String> {
    match parse_json(json) {
        Ok(v) => Ok(v),
        // No config: as `{}`, whose error names what the config must give
        // (`missing field ...`), not "invalid type: null".
        Err(_) if json.trim() == "null" => {
            parse_json("{}").map_err(|e| format!("{e} (the plugin has no `config`)"))
        }
        Err(e) => Err(e),
    }
}

fn parse_json<T: DeserializeOwned>(json: &str) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_str(json);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let mut path = e.path().to_string();
        let inner = unplaced(&e.into_inner());
        // The path of an unknown field ends with that field, which the
        // message names already: the field it is in is the place.
        if inner.starts_with("unknown field") {
            path.truncate(path.rfind('.').unwrap_or(0));
        }
        if path.is_empty() || path == "." {
            format!("invalid config: {inner}")
        } else {
            format!("invalid config: field `{path}`: {inner}")
        }
    })?;
    de.end()
        .map_err(|e| format!("invalid config: {}", unplaced(&e)))?;
    Ok(value)
}

/// `e`'s message without serde_json's ` at line L column C` for an error in
/// the data (a wrong type or value, a missing or unknown field): that
/// position is in the JSON the host generated, not in the operator's file.
/// A syntax error keeps it (only a test hands the SDK JSON that does not
/// parse, and there the position is in text its author wrote).
fn unplaced(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if e.classify() != serde_json::error::Category::Data || e.line() == 0 {
        return text;
    }
    let at = format!(" at line {} column {}", e.line(), e.column());
    match text.strip_suffix(&at) {
        Some(message) => message.to_owned(),
        None => text,
    }
}

/// Exchange contexts by the host's context id. The ids are the host's, handed
/// out in sequence, never chosen by a client, so a multiplicative hash is
/// enough and costs a few instructions where SipHash costs a hundred or so on
/// every phase call.
pub(crate) type ContextMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// The hasher of [`ContextMap`]: one multiplication (Fx's constant), the high
/// bits mixed down so the table's low-bit buckets spread sequential ids.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let h = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        self.0 = h ^ (h >> 32);
    }
}

/// One configured filter and its live exchange contexts. Used by the export
/// glue and by [`testing`](crate::testing); not needed by filter code.
pub struct Instance<F: HttpFilter> {
    filter: F,
    setup: Setup,
    stateful: bool,
    contexts: ContextMap<F::Context>,
}

impl<F: HttpFilter> Instance<F> {
    /// Parse `config` and run [`HttpFilter::configure`] and
    /// [`HttpFilter::setup`]; adds the `done` phase for a stateful context.
    pub fn configure(config: &str) -> Result<Self, String> {
        let config = parse_config::<F::Config>(config)?;
        let filter = F::configure(config)?;
        let stateful = std::mem::size_of::<F::Context>() != 0;
        let mut setup = filter.setup();
        if stateful {
            setup = setup.phase(Phase::Done);
        }
        Ok(Instance {
            filter,
            setup,
            stateful,
            contexts: ContextMap::default(),
        })
    }

    /// The effective setup (what `configure` returns to the host).
    pub fn setup(&self) -> Setup {
        self.setup
    }

    /// The filter value.
    pub fn filter(&self) -> &F {
        &self.filter
    }

    /// How many exchange contexts are alive.
    pub fn live_contexts(&self) -> usize {
        self.contexts.len()
    }

    fn with_ctx<R>(&mut self, context: u64, f: impl FnOnce(&mut F, &mut F::Context) -> R) -> R {
        if self.stateful {
            let ctx = self.contexts.entry(context).or_default();
            f(&mut self.filter, ctx)
        } else {
            // Zero-sized: nothing to keep between calls.
            let mut ctx = F::Context::default();
            f(&mut self.filter, &mut ctx)
        }
    }

    /// A per-exchange phase call: with the context, which ends (through
    /// `on_done`) if the filter detached during the call.
    fn phase<R>(
        &mut self,
        c: u64,
        x: &Exchange<'_>,
        f: impl FnOnce(&mut F, &mut F::Context) -> R,
    ) -> R {
        let r = self.with_ctx(c, f);
        if x.was_detached() && self.setup.declares(Phase::Done) {
            self.done(c);
        }
        r
    }

    /// Dispatch `on_request_headers`.
    pub fn request_headers(
        &mut self,
        c: u64,
        x: &Exchange<'_>,
        h: &Headers<'_>,
        eos: bool,
    ) -> Action {
        self.phase(c, x, |f, ctx| f.on_request_headers(ctx, x, h, eos))
    }
    /// Dispatch `on_request_body`.
    pub fn request_body(&mut self, c: u64, x: &Exchange<'_>, b: &Body<'_>, eos: bool) -> Action {
        self.phase(c, x, |f, ctx| f.on_request_body(ctx, x, b, eos))
    }
    /// Dispatch `on_request_trailers`.
    pub fn request_trailers(&mut self, c: u64, x: &Exchange<'_>, t: &Headers<'_>) -> Action {
        self.phase(c, x, |f, ctx| f.on_request_trailers(ctx, x, t))
    }
    /// Dispatch `on_response_headers`.
    pub fn response_headers(
        &mut self,
        c: u64,
        x: &Exchange<'_>,
        h: &Headers<'_>,
        eos: bool,
    ) -> Action {
        self.phase(c, x, |f, ctx| f.on_response_headers(ctx, x, h, eos))
    }
    /// Dispatch `on_response_body`.
    pub fn response_body(&mut self, c: u64, x: &Exchange<'_>, b: &Body<'_>, eos: bool) -> Action {
        self.phase(c, x, |f, ctx| f.on_response_body(ctx, x, b, eos))
    }
    /// Dispatch `on_response_trailers`.
    pub fn response_trailers(&mut self, c: u64, x: &Exchange<'_>, t: &Headers<'_>) -> Action {
        self.phase(c, x, |f, ctx| f.on_response_trailers(ctx, x, t))
    }
    /// Dispatch `on_log`.
    pub fn log(&mut self, c: u64, x: &Exchange<'_>) {
        self.with_ctx(c, |f, ctx| f.on_log(ctx, x))
    }
    /// Dispatch `on_callout_response`.
    pub fn callout_response(
        &mut self,
        c: u64,
        x: &Exchange<'_>,
        id: CalloutId,
        r: Result<CalloutResponse, Error>,
    ) -> Action {
        self.phase(c, x, |f, ctx| f.on_callout_response(ctx, x, id, r))
    }
    /// Dispatch `on_kv_response`.
    pub fn kv_response(
        &mut self,
        c: u64,
        x: &Exchange<'_>,
        id: CallId,
        r: Result<Reply, Error>,
    ) -> Action {
        self.phase(c, x, |f, ctx| f.on_kv_response(ctx, x, id, r))
    }
    /// Dispatch `on_done`: hand the context to the filter and drop it.
    pub fn done(&mut self, c: u64) {
        let ctx = self.contexts.remove(&c).unwrap_or_default();
        self.filter.on_done(ctx);
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
