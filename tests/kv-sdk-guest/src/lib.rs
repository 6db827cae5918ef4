//! Test guest for the asynchronous KV calls (abi/README.md §5.7, ABI 0.1.2),
//! written with `legate-sdk`. Config: `{"namespace": "<granted namespace>"}`.
//! Every request reports `namespace.backend` in request header
//! `x-kv-backend` (`memory` or `redis`). By request path:
//!
//! - `/incr`: `start_increment("hits", 1)` and pause; the reply sets request
//!   header `x-kv-count: <new value>` and resumes.
//! - `/cas`: adds 1 to key `count` with a get and a conditional set, both
//!   asynchronous, re-reading on `cas-mismatch`; the result in `x-kv-count`,
//!   the lost races in `x-kv-retries`. Concurrent requests count exactly.
//! - `/deny`: `start_get("count")`; the reply answers locally `403` with body
//!   `count=<value or absent>`.
//! - `/cancel`: starts a get, cancels it (`callout::cancel`) and continues
//!   without pausing: `x-kv-cancel: ok` (or the error). The reply must never
//!   come (a delivered one would answer 500 `reply after cancel`, which the host
//!   ignores outside a pause, so the test checks the `kv_response` call count).
//! - `/bad-key`: a 600-byte key: `x-kv-error: invalid-argument` at once.
//! - `/response`: in the response-headers phase, `start_increment("hits", 1)`
//!   and pause; the reply sets response header `x-kv-count`.
//! - `/two`: two increments (`a`, `b`) at once; resumes when both replied,
//!   with `x-kv-a` and `x-kv-b`.
//! - anything else: passes.
//!
//! Errors from a reply answer 502 with `x-kv-error: <error>`.

use legate_sdk::kv::{Backend, CallId, Namespace, Reply, WriteCondition};
use legate_sdk::{
    callout, Action, Direction, Error, Exchange, Headers, HttpFilter, LocalResponse, Setup,
};
use serde::Deserialize;

/// The plugin's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The KV namespace to use (granted in the plugin's capabilities).
    pub namespace: String,
}

/// What an exchange waits for.
#[derive(Debug, Default)]
pub enum Context {
    /// Nothing.
    #[default]
    Idle,
    /// `/incr` or `/response`: the increment's id.
    Incr(CallId),
    /// `/cas`: reading (`version` none) or writing, with lost races so far.
    Cas {
        /// The outstanding call.
        id: CallId,
        /// The value being written, once read.
        next: Option<u64>,
        /// Lost races.
        retries: u32,
    },
    /// `/deny`: the get's id.
    Deny(CallId),
    /// `/two`: the two ids and the values that came.
    Two([(CallId, Option<i64>); 2]),
}

/// The filter.
pub struct KvGuest {
    ns: Namespace,
}

fn path(x: &Exchange<'_>) -> String {
    let p = x.path();
    p.split('?').next().unwrap_or_default().to_owned()
}

fn request_header(x: &Exchange<'_>, name: &str, value: &str) {
    if let Some(h) = x.headers(Direction::Request) {
        let _ = h.set(name, value);
    }
}

fn failed(e: Error) -> Action {
    Action::Respond(
        LocalResponse::new(502)
            .header("x-kv-error", e.to_string())
            .body(format!("kv error: {e}\n")),
    )
}

impl KvGuest {
    /// `/cas`: the read of `count`.
    fn cas_read(&self, ctx: &mut Context, retries: u32) -> Action {
        match self.ns.start_get("count") {
            Ok(id) => {
                *ctx = Context::Cas {
                    id,
                    next: None,
                    retries,
                };
                Action::Pause
            }
            Err(e) => failed(e),
        }
    }
}

impl HttpFilter for KvGuest {
    type Config = Config;
    type Context = Context;

    fn configure(config: Config) -> Result<Self, String> {
        let ns = Namespace::open(&config.namespace)
            .map_err(|e| format!("cannot open namespace {:?}: {e}", config.namespace))?;
        Ok(KvGuest { ns })
    }

    fn setup(&self) -> Setup {
        Setup::new().on_request_headers().on_response_headers()
    }

    fn on_request_headers(
        &mut self,
        ctx: &mut Context,
        x: &Exchange<'_>,
        headers: &Headers<'_>,
        _end_of_stream: bool,
    ) -> Action {
        let backend = match self.ns.backend() {
            Backend::Memory => "memory",
            Backend::Redis => "redis",
        };
        let _ = headers.set("x-kv-backend", backend);
        match path(x).as_str() {
            "/incr" => match self.ns.start_increment("hits", 1, None) {
                Ok(id) => {
                    *ctx = Context::Incr(id);
                    Action::Pause
                }
                Err(e) => failed(e),
            },
            "/cas" => self.cas_read(ctx, 0),
            "/deny" => match self.ns.start_get("count") {
                Ok(id) => {
                    *ctx = Context::Deny(id);
                    Action::Pause
                }
                Err(e) => failed(e),
            },
            "/cancel" => {
                let r = self
                    .ns
                    .start_get("count")
                    .and_then(|id| callout::cancel(id).map(|()| "ok".to_owned()));
                let _ = headers.set("x-kv-cancel", r.unwrap_or_else(|e| e.to_string()));
                Action::Continue
            }
            "/bad-key" => {
                let key = "k".repeat(600);
                let r = self.ns.start_get(&key);
                let _ = headers.set(
                    "x-kv-error",
                    r.err().map_or("none".to_owned(), |e| e.to_string()),
                );
                Action::Continue
            }
            "/two" => {
                let a = self.ns.start_increment("a", 1, None);
                let b = self.ns.start_increment("b", 1, None);
                match (a, b) {
                    (Ok(a), Ok(b)) => {
                        *ctx = Context::Two([(a, None), (b, None)]);
                        Action::Pause
                    }
                    (Err(e), _) | (_, Err(e)) => failed(e),
                }
            }
            _ => Action::Continue,
        }
    }

    fn on_response_headers(
        &mut self,
        ctx: &mut Context,
        x: &Exchange<'_>,
        _headers: &Headers<'_>,
        _end_of_stream: bool,
    ) -> Action {
        if path(x) != "/response" {
            return Action::Continue;
        }
        match self.ns.start_increment("hits", 1, None) {
            Ok(id) => {
                *ctx = Context::Incr(id);
                Action::Pause
            }
            Err(e) => failed(e),
        }
    }

    fn on_kv_response(
        &mut self,
        ctx: &mut Context,
        x: &Exchange<'_>,
        id: CallId,
        reply: Result<Reply, Error>,
    ) -> Action {
        let reply = match reply {
            Ok(r) => r,
            Err(Error::CasMismatch) => {
                if let Context::Cas { retries, .. } = *ctx {
                    return self.cas_read(ctx, retries + 1);
                }
                return failed(Error::CasMismatch);
            }
            Err(e) => return failed(e),
        };
        match (std::mem::take(ctx), reply) {
            (Context::Incr(want), Reply::Increment(n)) if want == id => {
                let d = if x.status().is_some() {
                    Direction::Response
                } else {
                    Direction::Request
                };
                if let Some(h) = x.headers(d) {
                    let _ = h.set("x-kv-count", n.to_string());
                }
                Action::Continue
            }
            (
                Context::Cas {
                    id: want,
                    next: None,
                    retries,
                },
                Reply::Get(entry),
            ) if want == id => {
                let (n, cond) = match entry {
                    Some(e) => (
                        String::from_utf8_lossy(&e.value)
                            .parse::<u64>()
                            .unwrap_or(0),
                        WriteCondition::IfVersion(e.version),
                    ),
                    None => (0, WriteCondition::IfAbsent),
                };
                let next = n + 1;
                match self.ns.start_set("count", next.to_string(), cond, None) {
                    Ok(id) => {
                        *ctx = Context::Cas {
                            id,
                            next: Some(next),
                            retries,
                        };
                        Action::Pause
                    }
                    Err(e) => failed(e),
                }
            }
            (
                Context::Cas {
                    id: want,
                    next: Some(n),
                    retries,
                },
                Reply::Set(_),
            ) if want == id => {
                request_header(x, "x-kv-count", &n.to_string());
                request_header(x, "x-kv-retries", &retries.to_string());
                Action::Continue
            }
            (Context::Deny(want), Reply::Get(entry)) if want == id => {
                let v = entry.map_or("absent".to_owned(), |e| {
                    String::from_utf8_lossy(&e.value).into_owned()
                });
                Action::Respond(LocalResponse::new(403).body(format!("count={v}\n")))
            }
            (Context::Two(mut two), Reply::Increment(n)) => {
                for slot in &mut two {
                    if slot.0 == id {
                        slot.1 = Some(n);
                    }
                }
                if let [(_, Some(a)), (_, Some(b))] = two {
                    request_header(x, "x-kv-a", &a.to_string());
                    request_header(x, "x-kv-b", &b.to_string());
                    Action::Continue
                } else {
                    *ctx = Context::Two(two);
                    Action::Pause
                }
            }
            (other, reply) => Action::Respond(
                LocalResponse::new(500)
                    .body(format!("unexpected reply {id} {reply:?} in {other:?}\n")),
            ),
        }
    }
}

legate_sdk::export!(KvGuest);
