//! `noop-filter`: the Wasm side of the filter-cost benchmark (bench/filters.sh).
//!
//! With no config it declares the request-headers phase and continues at once,
//! so a request pays exactly one guest call: the fixed cost of a Wasm filter.
//! With `{ "read_header": "NAME" }` it also reads that one request header (the
//! "header-reading filter" of the benchmark), which adds one host call and a copy
//! of the value into the guest.

use legate_sdk::{Action, Exchange, Headers, HttpFilter, Setup};
use serde::Deserialize;

/// The plugin's configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A request header to read on every request (its value is only measured).
    #[serde(default)]
    pub read_header: Option<String>,
}

/// The filter.
pub struct NoopFilter {
    read_header: Option<String>,
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
            seen: 0,
        })
    }

    fn setup(&self) -> Setup {
        Setup::new().on_request_headers()
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
