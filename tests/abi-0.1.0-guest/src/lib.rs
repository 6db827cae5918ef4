//! A filter compiled against `legate:filter@0.1.0` (wit/, a verbatim copy of
//! the 0.1.0 release's abi/wit): it exports `http-handler@0.1.0` and imports
//! `http@0.1.0`. It sets request header `x-abi: 0.1.0` and response header
//! `x-abi-resp: <the request path, read back through the exchange>`, and
//! declares `done` (counted in the host's stats).

wit_bindgen::generate!({ world: "http-filter", path: "wit" });

use exports::legate::filter::http_handler::Guest;
use legate::filter::callout::CalloutResponse;
use legate::filter::http::{Action, Exchange, Headers, HttpSetup, Phases};
use legate::filter::types::{BodyMode, Buffer, Error};

struct Plugin;

impl Guest for Plugin {
    fn configure(_config: String) -> Result<HttpSetup, String> {
        Ok(HttpSetup {
            phases: Phases::REQUEST_HEADERS | Phases::RESPONSE_HEADERS | Phases::DONE,
            request_body_mode: BodyMode::Skipped,
            response_body_mode: BodyMode::Skipped,
            tick_interval_ms: 0,
        })
    }

    fn on_tick() {}

    fn on_tick_callout_response(_id: u64, _r: Result<CalloutResponse, Error>) {}

    fn on_request_headers(_c: u64, _x: &Exchange, h: &Headers, _eos: bool) -> Action {
        let _ = h.set("x-abi", b"0.1.0");
        Action::Continue
    }

    fn on_request_body(_c: u64, _x: &Exchange, _b: &Buffer, _eos: bool) -> Action {
        Action::Continue
    }

    fn on_request_trailers(_c: u64, _x: &Exchange, _t: &Headers) -> Action {
        Action::Continue
    }

    fn on_response_headers(_c: u64, x: &Exchange, h: &Headers, _eos: bool) -> Action {
        let _ = h.set("x-abi-resp", x.path().as_bytes());
        Action::Continue
    }

    fn on_response_body(_c: u64, _x: &Exchange, _b: &Buffer, _eos: bool) -> Action {
        Action::Continue
    }

    fn on_response_trailers(_c: u64, _x: &Exchange, _t: &Headers) -> Action {
        Action::Continue
    }

    fn on_log(_c: u64, _x: &Exchange) {}

    fn on_callout_response(
        _c: u64,
        _x: &Exchange,
        _id: u64,
        _r: Result<CalloutResponse, Error>,
    ) -> Action {
        Action::Continue
    }

    fn on_done(_c: u64) {}
}

export!(Plugin);
