//! `noop-filter`: the Wasm side of the filter-cost benchmark (bench/filters.sh).
//!
//! With no config it declares the request-headers phase and continues at once,
//! so a request pays exactly one guest call: the fixed cost of a Wasm filter.
//! With `{ "read_header": "NAME" }` it also reads that one request header (the
//! "header-reading filter" of the benchmark), which adds one host call and a copy
//! of the value into the guest. With `{ "all_phases": true }` it declares the
//! phases a proxy-wasm filter is called in (request and response headers, the
//! response body, the log) and continues in each: the same no-op as
//! bench/pw-noop-filter, hook for hook, so the two ABIs' costs compare like for
//! like (bench/README.md).

use legate_sdk::{Action, BodyMode, Exchange, Headers, HttpFilter, Setup};
use serde::Deserialize;

/// The plugin's configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A request header to read on every request (its value is only measured).
    #[serde(default)]
    pub read_header: Option<String>,
    /// Declare every phase a proxy-wasm filter gets, not just request headers.
    #[serde(default)]
    pub all_phases: bool,
}

/// The filter.
pub struct NoopFilter {
    read_header: Option<String>,
    all_phases: bool,
    /// Bytes of header values read; kept so the read cannot be optimised away.
    seen: u64,
}

impl NoopFilter {
    /// Bytes of header values read so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }
}

impl HttpFilter for NoopFilter {
    type Config = Config;
    type Context = ();

    fn configure(config: Config) -> Result<Self, String> {
        Ok(NoopFilter {
            read_header: config.read_header,
            all_phases: config.all_phases,
            seen: 0,
        })
    }

    fn setup(&self) -> Setup {
        let setup = Setup::new().on_request_headers();
        if !self.all_phases {
            return setup;
        }
        // The trait's default for each of these is `Continue` (or nothing).
        setup
            .on_response_headers()
            .on_response_body(BodyMode::Streamed)
            .on_log()
    }

    fn on_request_headers(
        &mut self,
        _ctx: &mut (),
        _exchange: &Exchange<'_>,
        headers: &Headers<'_>,
        _end_of_stream: bool,
    ) -> Action {
        if let Some(name) = &self.read_header {
            if let Some(v) = headers.get(name) {
                self.seen = self.seen.wrapping_add(v.len() as u64);
            }
        }
        Action::Continue
    }
}

legate_sdk::export!(NoopFilter);
