//! `hello-filter`: the smallest useful Legate filter, written with `legate-sdk`.
//!
//! - adds `x-hello: <value>` to every response (`value` from the config,
//!   default `world`);
//! - answers `GET /hello` locally with `200 hello from legate`;
//! - counts requests in `hello_requests_total{outcome="local"|"proxied"}`.
//!
//! Config (JSON/YAML under the plugin's `config:`): `{ "value": "world" }`.

use legate_sdk::metrics::Counter;
use legate_sdk::{Action, Exchange, Headers, HttpFilter, LocalResponse, Setup};
use serde::Deserialize;

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The value of the `x-hello` response header.
    #[serde(default = "default_value")]
    pub value: String,
}

fn default_value() -> String {
    "world".to_owned()
}

/// The body of the local `/hello` response.
pub const HELLO_BODY: &str = "hello from legate\n";

/// The filter: one per plugin instance.
pub struct HelloFilter {
    value: String,
    local: Counter,
    proxied: Counter,
}

impl HttpFilter for HelloFilter {
    type Config = Config;
    type Context = ();

    fn configure(config: Config) -> Result<Self, String> {
        if config.value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err("invalid config: field `value`: must not contain CR, LF or NUL".to_owned());
        }
        let requests = Counter::define(
            "hello_requests_total",
            "Requests seen by hello-filter, by outcome",
            &["outcome"],
        )
        .map_err(|e| format!("defining metric hello_requests_total: {e}"))?;
        let series = |outcome: &str| {
            requests
                .with_labels(&[outcome])
                .map_err(|e| format!("hello_requests_total{{outcome={outcome:?}}}: {e}"))
        };
        Ok(HelloFilter {
            local: series("local")?,
            proxied: series("proxied")?,
            value: config.value,
        })
    }

    fn setup(&self) -> Setup {
        // Two calls per proxied request, one per local answer: nothing else is declared.
        Setup::new().on_request_headers().on_response_headers()
    }

    fn on_request_headers(
        &mut self,
        _ctx: &mut (),
        exchange: &Exchange<'_>,
        _headers: &Headers<'_>,
        _end_of_stream: bool,
    ) -> Action {
        if exchange.method() == "GET" && path_only(&exchange.path()) == "/hello" {
            self.local.inc();
            // A local response skips this filter's own response phase (it
            // enters the response path after us), so add x-hello here.
            return Action::Respond(
                LocalResponse::new(200)
                    .header("content-type", "text/plain; charset=utf-8")
                    .header("x-hello", self.value.as_bytes())
                    .body(HELLO_BODY)
                    .details("hello"),
            );
        }
        self.proxied.inc();
        Action::Continue
    }

    fn on_response_headers(
        &mut self,
        _ctx: &mut (),
        _exchange: &Exchange<'_>,
        headers: &Headers<'_>,
        _end_of_stream: bool,
    ) -> Action {
        if let Err(e) = headers.set("x-hello", &self.value) {
            legate_sdk::warn!("could not set x-hello: {e}");
        }
        Action::Continue
    }
}

fn path_only(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

legate_sdk::export!(HelloFilter);
