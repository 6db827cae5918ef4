//! An L4 test filter written with `legate-sdk`: the SDK's network-filter
//! glue (`export_network!`) under the real host. The config picks the mode:
//!
//! - `tick` (with `tick_ms`): counts `on_tick` calls in `ticks_total` and
//!   answers a downstream chunk that is exactly `ticks?\n` with
//!   `ticks=<n>\n` (this instance's count so far) sent upstream instead.
//!   With `tick_trap: N`, the Nth tick of an instance after its first
//!   downstream data panics (a trap: the connection that sent the data is on
//!   the instance, however early the instance started); with
//!   `tick_callout: true`, each tick without a callout outstanding calls
//!   cluster `authz` at `path`, and the answers are counted in
//!   `tick_answers_total{status}`;
//! - `hold`: the first downstream data of a connection is held (`Pause`)
//!   until a callout to cluster `authz` at `path` answers; a 200 forwards it
//!   and marks the connection allowed (its per-connection context), so later
//!   data goes on without a callout; anything else closes the connection;
//! - `facts`: each downstream chunk is replaced by
//!   `id=<bool> listener=<name> cluster=<name> up=<addr>\n`.
//!
//! Every mode counts `on_close` in `closes_total{peer}`.

use legate_sdk::callout::{self, CalloutId, CalloutRequest, CalloutResponse};
use legate_sdk::metrics::Counter;
use legate_sdk::{Body, Connection, Error, NetworkAction, NetworkFilter, NetworkSetup, Peer};
use serde::Deserialize;

/// The plugin config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    mode: Mode,
    #[serde(default)]
    tick_ms: u32,
    #[serde(default = "default_path")]
    path: String,
    #[serde(default)]
    tick_trap: Option<u64>,
    #[serde(default)]
    tick_callout: bool,
}

fn default_path() -> String {
    "/check".to_owned()
}

/// What the fixture does.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Count ticks.
    Tick,
    /// Hold data on a callout.
    Hold,
    /// Report connection facts.
    Facts,
}

/// The fixture filter.
pub struct Fixture {
    mode: Mode,
    tick_ms: u32,
    path: String,
    ticks: u64,
    ticks_total: Counter,
    closes: Counter,
    tick_trap: Option<u64>,
    /// Ticks since the instance's first downstream data (`None` before it).
    ticks_since_data: Option<u64>,
    tick_callout: bool,
    tick_outstanding: bool,
    tick_answers: Counter,
}

impl NetworkFilter for Fixture {
    type Config = Config;
    /// Whether the connection was allowed (`hold` mode).
    type Context = bool;

    fn configure(config: Config) -> Result<Self, String> {
        let ticks_total = Counter::define("ticks_total", "on_tick calls", &[])
            .map_err(|e| format!("defining ticks_total: {e}"))?;
        let closes = Counter::define("closes_total", "on_close calls", &["peer"])
            .map_err(|e| format!("defining closes_total: {e}"))?;
        let tick_answers =
            Counter::define("tick_answers_total", "tick callout answers", &["status"])
                .map_err(|e| format!("defining tick_answers_total: {e}"))?;
        Ok(Fixture {
            mode: config.mode,
            tick_ms: config.tick_ms,
            path: config.path,
            ticks: 0,
            ticks_total,
            closes,
            tick_trap: config.tick_trap,
            ticks_since_data: None,
            tick_callout: config.tick_callout,
            tick_outstanding: false,
            tick_answers,
        })
    }

    fn setup(&self) -> NetworkSetup {
        let s = NetworkSetup::new().on_downstream_data().on_close();
        if self.mode == Mode::Tick {
            s.tick_every_ms(self.tick_ms)
        } else {
            s
        }
    }

    fn on_downstream_data(
        &mut self,
        allowed: &mut bool,
        conn: &Connection<'_>,
        data: &Body<'_>,
        _eos: bool,
    ) -> NetworkAction {
        self.ticks_since_data.get_or_insert(0);
        let out = match self.mode {
            Mode::Tick if data.to_vec() == b"ticks?\n" => format!("ticks={}\n", self.ticks),
            Mode::Tick => return NetworkAction::Continue,
            Mode::Hold if *allowed => return NetworkAction::Continue,
            Mode::Hold => {
                let req = CalloutRequest::new("authz", "GET", self.path.as_str());
                return match callout::send(&req) {
                    Ok(_) => NetworkAction::Pause,
                    Err(_) => NetworkAction::Close,
                };
            }
            Mode::Facts => format!(
                "id={} listener={} cluster={} up={}\n",
                conn.id() > 0,
                conn.listener_name(),
                conn.cluster().unwrap_or_default(),
                conn.upstream_address()
                    .map_or_else(|| "none".to_owned(), |a| a.to_string()),
            ),
        };
        match data.replace(out) {
            Ok(()) => NetworkAction::Continue,
            Err(_) => NetworkAction::Close,
        }
    }

    fn on_callout_response(
        &mut self,
        allowed: &mut bool,
        _: &Connection<'_>,
        _id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) -> NetworkAction {
        match response {
            Ok(r) if r.status == 200 => {
                *allowed = true;
                NetworkAction::Continue
            }
            _ => NetworkAction::Close,
        }
    }

    fn on_close(&mut self, _: &mut bool, _: &Connection<'_>, peer: Peer) {
        let label = match peer {
            Peer::Downstream => "downstream",
            Peer::Upstream => "upstream",
        };
        if let Ok(c) = self.closes.with_labels(&[label]) {
            c.inc();
        }
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        self.ticks_total.inc();
        if let Some(n) = self.ticks_since_data.as_mut() {
            *n += 1;
            if self.tick_trap == Some(*n) {
                panic!("tick {} traps", self.ticks);
            }
        }
        if self.tick_callout && !self.tick_outstanding {
            let req = CalloutRequest::new("authz", "GET", self.path.as_str());
            self.tick_outstanding = callout::send(&req).is_ok();
        }
    }

    fn on_tick_callout_response(
        &mut self,
        _id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) {
        self.tick_outstanding = false;
        let status = response.map_or_else(|e| e.to_string(), |r| r.status.to_string());
        if let Ok(c) = self.tick_answers.with_labels(&[&status]) {
            c.inc();
        }
    }
}

legate_sdk::export_network!(Fixture);
