//! An L4 test filter (`legate:filter/network-filter@0.1.3`). The plugin config
//! picks the mode (`{"mode": "..."}`):
//!
//! - `rewrite`: downstream data is upper-cased, except that a chunk equal to
//!   `props\n` becomes `listener=<listener-name> cluster=<cluster>
//!   tls=<tls-version or none> up=<upstream port>\n`; upstream data has every
//!   `O` replaced by `0`.
//! - `close`: downstream data containing `QUIT` closes the connection.
//! - `trap`: downstream data containing `boom` panics.
//! - `sleep`: downstream data containing `nap` sleeps 5s (a WASI pollable).
//! - `callout`: `on-new-connection` calls cluster `authz` at the config's
//!   `path` and pauses; a 200 continues (connecting upstream), anything else
//!   closes.
//! - `cancel`: downstream data containing `ask` calls `authz` at `path` and
//!   pauses; the next upstream data cancels that callout (so nothing can
//!   resume the pause) and continues.
//!
//! Every mode counts closes in `net_closes{peer}` (`legate_plugin_net_closes`).

wit_bindgen::generate!({ world: "network-filter", path: "../../abi/wit" });

use std::cell::RefCell;

use exports::legate::filter::network_handler::{Guest, GuestNetworkContext};
use legate::filter::callout::{CalloutId, CalloutResponse};
use legate::filter::metrics::Counter;
use legate::filter::network::{Connection, NetworkAction, NetworkEvents, NetworkSetup, Peer};
use legate::filter::types::{Buffer, Error, IpAddress, TlsVersion};

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
    static PATH: RefCell<String> = const { RefCell::new(String::new()) };
    static CLOSES: RefCell<Option<Counter>> = const { RefCell::new(None) };
    /// `cancel` mode: the callout the downstream pause waits for.
    static PENDING: RefCell<Option<CalloutId>> = const { RefCell::new(None) };
}

struct Plugin;

impl Guest for Plugin {
    type NetworkContext = Ctx;

    fn configure(config: String) -> Result<NetworkSetup, String> {
        let mode = ["rewrite", "close", "trap", "sleep", "callout", "cancel"]
            .into_iter()
            .find(|m| config.contains(&format!("\"{m}\"")))
            .ok_or_else(|| format!("no known mode in {config}"))?;
        MODE.with(|m| *m.borrow_mut() = mode.to_string());
        // `"path": "/..."` (no JSON parser in this fixture).
        let path = config
            .split("\"path\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("/check")
            .to_string();
        PATH.with(|p| *p.borrow_mut() = path);
        let c = legate::filter::metrics::define_counter(
            "net_closes",
            "Close notifications seen by the network test plugin.",
            &["peer".to_string()],
        )
        .map_err(|e| format!("define_counter: {e:?}"))?;
        CLOSES.with(|x| *x.borrow_mut() = Some(c));
        Ok(NetworkSetup {
            events: NetworkEvents::NEW_CONNECTION
                | NetworkEvents::DOWNSTREAM_DATA
                | NetworkEvents::UPSTREAM_DATA
                | NetworkEvents::CLOSE,
            tick_interval_ms: 0,
        })
    }

    fn on_tick() {}

    fn on_tick_callout_response(_id: CalloutId, _response: Result<CalloutResponse, Error>) {}
}

struct Ctx;

/// `GET <path>` on cluster `authz`.
fn check() -> legate::filter::callout::CalloutRequest {
    legate::filter::callout::CalloutRequest {
        cluster: "authz".into(),
        method: "GET".into(),
        path: PATH.with(|p| p.borrow().clone()),
        authority: None,
        headers: Vec::new(),
        body: Vec::new(),
        timeout_ms: 0,
    }
}

fn all(b: &Buffer) -> Vec<u8> {
    b.read(0, b.len())
}

fn ip(a: &IpAddress) -> String {
    match a {
        IpAddress::Ipv4((a, b, c, d)) => format!("{a}.{b}.{c}.{d}"),
        IpAddress::Ipv6(_) => "v6".to_string(),
    }
}

impl GuestNetworkContext for Ctx {
    fn new() -> Self {
        Ctx
    }

    fn on_new_connection(&self, connection: &Connection) -> NetworkAction {
        // Nothing is connected yet.
        if connection.upstream_address().is_some() {
            return NetworkAction::Close;
        }
        if MODE.with(|m| m.borrow().as_str() == "callout") {
            return match legate::filter::callout::send(&check()) {
                Ok(_) => NetworkAction::Pause,
                Err(_) => NetworkAction::Close,
            };
        }
        NetworkAction::Continue
    }

    fn on_downstream_data(
        &self,
        connection: &Connection,
        data: &Buffer,
        _eos: bool,
    ) -> NetworkAction {
        let bytes = all(data);
        match MODE.with(|m| m.borrow().clone()).as_str() {
            "rewrite" => {
                let out = if bytes == b"props\n" {
                    let up = connection
                        .upstream_address()
                        .map(|a| format!("{}:{}", ip(&a.ip), a.port))
                        .unwrap_or_else(|| "none".into());
                    let tls = match connection.tls_version() {
                        Some(TlsVersion::Tls12) => "1.2",
                        Some(TlsVersion::Tls13) => "1.3",
                        None => "none",
                    };
                    format!(
                        "listener={} cluster={} tls={tls} up={up}\n",
                        connection.listener_name(),
                        connection.cluster().unwrap_or_default()
                    )
                    .into_bytes()
                } else {
                    bytes.to_ascii_uppercase()
                };
                if data.replace(&out).is_err() {
                    return NetworkAction::Close;
                }
                NetworkAction::Continue
            }
            "close" if bytes.windows(4).any(|w| w == b"QUIT") => NetworkAction::Close,
            "trap" if bytes.windows(4).any(|w| w == b"boom") => {
                panic!("boom in on-downstream-data")
            }
            "cancel" if bytes.windows(3).any(|w| w == b"ask") => {
                match legate::filter::callout::send(&check()) {
                    Ok(id) => {
                        PENDING.with(|p| *p.borrow_mut() = Some(id));
                        NetworkAction::Pause
                    }
                    Err(_) => NetworkAction::Close,
                }
            }
            "sleep" if bytes.windows(3).any(|w| w == b"nap") => {
                std::thread::sleep(std::time::Duration::from_secs(5));
                NetworkAction::Continue
            }
            _ => NetworkAction::Continue,
        }
    }

    fn on_upstream_data(
        &self,
        _connection: &Connection,
        data: &Buffer,
        _eos: bool,
    ) -> NetworkAction {
        if let Some(id) = PENDING.with(|p| p.borrow_mut().take()) {
            if legate::filter::callout::cancel(id).is_err() {
                return NetworkAction::Close;
            }
        }
        if MODE.with(|m| m.borrow().as_str() == "rewrite") {
            let out: Vec<u8> = all(data)
                .into_iter()
                .map(|b| if b == b'O' { b'0' } else { b })
                .collect();
            if data.replace(&out).is_err() {
                return NetworkAction::Close;
            }
        }
        NetworkAction::Continue
    }

    fn on_close(&self, _connection: &Connection, peer: Peer) {
        let label = match peer {
            Peer::Downstream => "downstream",
            Peer::Upstream => "upstream",
        };
        CLOSES.with(|c| {
            if let Some(c) = c.borrow().as_ref() {
                if let Ok(s) = c.with_labels(&[label.to_string()]) {
                    s.add(1);
                }
            }
        });
    }

    fn on_callout_response(
        &self,
        _connection: &Connection,
        _id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) -> NetworkAction {
        match response {
            Ok(r) if r.status == 200 => NetworkAction::Continue,
            _ => NetworkAction::Close,
        }
    }
}

export!(Plugin);
