//! An example L4 (TCP) filter for Legate, written with `legate-sdk`'s
//! [`NetworkFilter`]. On a TCP listener it
//!
//! - closes a connection whose client sends any of the `deny` words
//!   (counted in `denied_total`), before those bytes reach the upstream;
//! - replaces each of the `redact` words in upstream data with `*`s of the
//!   same length, so the client never sees them;
//! - counts the bytes it passes in `bytes_total{direction}` and logs a
//!   summary per connection when the client side closes.
//!
//! Words are matched within one chunk of data (one read); a word split
//! across two reads is not seen. That keeps the filter allocation-light; a
//! line-based protocol filter would hold data with `Pause` until a newline.

use legate_sdk::metrics::Counter;
use legate_sdk::{Body, Connection, NetworkAction, NetworkFilter, NetworkSetup, Peer};
use serde::Deserialize;

/// The plugin's `config:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Words that close the connection when the client sends them.
    #[serde(default)]
    pub deny: Vec<String>,
    /// Words masked with `*` in data from the upstream.
    #[serde(default)]
    pub redact: Vec<String>,
}

/// The filter: its config and metric handles (one per instance).
pub struct TcpFilter {
    deny: Vec<Vec<u8>>,
    redact: Vec<Vec<u8>>,
    denied: Counter,
    bytes_down: Counter,
    bytes_up: Counter,
}

/// Per-connection state: bytes seen in each direction.
#[derive(Default)]
pub struct Seen {
    from_client: u64,
    from_upstream: u64,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl NetworkFilter for TcpFilter {
    type Config = Config;
    type Context = Seen;

    fn configure(config: Config) -> Result<Self, String> {
        if config
            .deny
            .iter()
            .chain(&config.redact)
            .any(String::is_empty)
        {
            return Err("invalid config: `deny` and `redact` words must not be empty".into());
        }
        let denied = Counter::define(
            "denied_total",
            "Connections closed for sending a denied word",
            &[],
        )
        .map_err(|e| format!("defining denied_total: {e}"))?;
        let bytes = Counter::define("bytes_total", "Bytes passed, by direction", &["direction"])
            .map_err(|e| format!("defining bytes_total: {e}"))?;
        let label = |d: &str| {
            bytes
                .with_labels(&[d])
                .map_err(|e| format!("bytes_total{{direction={d}}}: {e}"))
        };
        Ok(TcpFilter {
            deny: config.deny.into_iter().map(String::into_bytes).collect(),
            redact: config.redact.into_iter().map(String::into_bytes).collect(),
            denied,
            bytes_down: label("downstream")?,
            bytes_up: label("upstream")?,
        })
    }

    fn setup(&self) -> NetworkSetup {
        NetworkSetup::new()
            .on_downstream_data()
            .on_upstream_data()
            .on_close()
    }

    fn on_downstream_data(
        &mut self,
        seen: &mut Seen,
        _conn: &Connection<'_>,
        data: &Body<'_>,
        _end_of_stream: bool,
    ) -> NetworkAction {
        let bytes = data.to_vec();
        if self.deny.iter().any(|w| find(&bytes, w).is_some()) {
            self.denied.inc();
            legate_sdk::info!("closing: the client sent a denied word");
            return NetworkAction::Close;
        }
        seen.from_client += data.len();
        self.bytes_down.add(data.len());
        NetworkAction::Continue
    }

    fn on_upstream_data(
        &mut self,
        seen: &mut Seen,
        _conn: &Connection<'_>,
        data: &Body<'_>,
        _end_of_stream: bool,
    ) -> NetworkAction {
        seen.from_upstream += data.len();
        self.bytes_up.add(data.len());
        let mut bytes = data.to_vec();
        let mut changed = false;
        for word in &self.redact {
            let mut from = 0;
            while let Some(at) = find(&bytes[from..], word) {
                let start = from + at;
                bytes[start..start + word.len()].fill(b'*');
                from = start + word.len();
                changed = true;
            }
        }
        // Same length: only the changed bytes are worth a write, and a
        // failed write must not leak the word.
        if changed && data.replace(bytes).is_err() {
            return NetworkAction::Close;
        }
        NetworkAction::Continue
    }

    fn on_close(&mut self, seen: &mut Seen, conn: &Connection<'_>, peer: Peer) {
        if peer == Peer::Downstream {
            legate_sdk::info!(
                "connection {} from {}: {} bytes in, {} bytes out",
                conn.id(),
                conn.source_address(),
                seen.from_client,
                seen.from_upstream
            );
        }
    }
}

legate_sdk::export_network!(TcpFilter);
