//! Test guest for the Wasm host: one component, behaviour chosen by the plugin's
//! `config`, a JSON object `{"mode": ..., "phases": ..., "tag": ...}`:
//!
//! - `headers`: sets request header `x-filter: <tag or plugin name>` and response
//!   header `x-filter-resp: <tag or plugin name>`; echoes the route and request-id
//!   seen into `x-seen-route` / `x-seen-request-id` response headers.
//! - `respond`: answers 401 locally unless the request has `x-api-key`; in the
//!   response-headers phase, replaces the response with a local 503 (`replaced by
//!   plugin\n`, header `x-replaced-by: <tag>`) when the request has `x-respond-late`.
//! - `cookies`: on the response, counts `set-cookie` values (`x-cookie-count`) and
//!   adds one more.
//! - `rewrite`: rewrites a path starting `/old` to `/new` (the host re-routes).
//! - `hostile`: path `/flood-add` adds request fields until refused (answers
//!   where), `/flood-respond` answers with 30 000 fields; path `/panic` panics, `/loop` loops forever, `/oom` allocates
//!   without bound, `/grow` grows memory past the cap with `memory.grow` and
//!   reports `x-grow: <its result>,<ok|refused: a page more>`, `/sleep` sleeps 5s (a WASI pollable: no Wasm runs while it
//!   waits, so no epoch check either), `/recurse` recurses without bound (a
//!   stack overflow trap), `/sockets` tries a TCP bind, a TCP connect
//!   and a UDP bind through WASI and sets request header `x-sockets:
//!   tcp-bind=<io error kind or ok>,tcp-connect=…,udp-bind=…`; the response
//!   headers phase of `/pause-response` returns `pause` with no callout (a
//!   failure, not a trap); anything else passes.
//! - `bad-config`: `configure` fails with a message.
//! - Any mode: `configure_sleep_ms: "<ms>"` sleeps that long in `configure`.
//! - Any mode: `check_cluster: <name>` calls `callout.check-cluster` in
//!   `configure` (an error fails it: `check-cluster <name>: <error>`).
//! - Any mode: `sanitize: "<name>,<name>…"` declares those request headers with
//!   `http.sanitize-request-headers` in `configure` (an error fails it:
//!   `sanitize: <error>`). In `headers` mode, a request with
//!   `x-sanitize-late` declares that header's value from the request phase and
//!   puts the result (`ok` or the error) in request header `x-sanitize-late`.
//! - `metrics`: counts requests in counter `requests{method}` (`metric`: another
//!   name), and in `on-log`
//!   (with phase `log`) under `method="log-<METHOD>"`, and, if the exchange
//!   has a cause there, `method="log-cause-<cause>"`. In any mode,
//!   `define_counter: <name>` defines an unlabelled counter in `configure`, and
//!   `fail_configure: <why>` then fails `configure`. Before all that (any
//!   mode), `panic_configure: <why>` panics in `configure` and
//!   `kv_required: <ns>` fails `configure` if KV namespace `<ns>` does not
//!   open (`open <ns>: <error>`).
//! - `kv`: opens KV namespace `ns` (default `counters`) in `configure`; a failed
//!   open is reported on every request as `x-kv-error: <error>`. Request paths:
//!   `/count` adds 1 to key `count` with a get + `if-version`/`if-absent` CAS retry
//!   loop (`x-kv-count: <new>`, `x-kv-retries: <n>`); `/read` reads `count`;
//!   `/incr` uses `increment` on key `hits`; `/ttl-set/<ms>` sets key `t` with that
//!   TTL; `/ttl-get` reads `t` (`x-kv-value: <v or absent>`); `/big` writes a value
//!   over the cap (`x-kv-error`); `/ticks` reads key `ticks`; `/start` tries
//!   an asynchronous `start-get` (this world exports no `kv-handler`, so
//!   `x-kv-error: unsupported`) and reports `namespace.backend` in
//!   `x-kv-backend`. The results are
//!   request headers (the upstream echoes them). With `tick: "<ms>"` it asks for
//!   that tick interval and each `on-tick` increments key `ticks`. With
//!   `fail_configure_after: "<n>"`, `configure` counts its calls in key
//!   `configures` and fails from call n + 1 on (the load check is call 1, so
//!   `"1"` loads and then fails on every worker).
//!
//! - `callout`: on the request, sends `GET /check<request path>` to cluster
//!   `cluster` (default `authz`; `timeout` ms, default 0 = the host's) carrying the
//!   request's `x-user` header, and pauses. On the response: a 2xx continues with
//!   request headers `x-callout-status` and `x-callout-body` (the callout's body) and
//!   `x-callout-id-ok`; any other status answers locally with that status and body
//!   (`x-from-callout: 1`); an error answers 502 with `x-callout-error: <error>`.
//!   Path `/nopause` sends without pausing (the request continues at once); a
//!   failed `send` continues with request header `x-callout-error: <error>`.
//!   Path `/two` sends two callouts and resumes after both (`x-callout-count: 2`).
//!   Path `/cancel` cancels its callout at once, twice (`x-callout-cancel:
//!   <first>,<second>`), and continues.
//!   Path `/panic` panics (the instance traps).
//!
//! - `detach`: with request header `x-detach-me`, calls `exchange.detach` in
//!   the request headers; with `x-with-callout` too, first sends a callout to
//!   `cluster` and detaches (refused), cancels it, detaches, then sends another
//!   (refused). The results go in request header `x-detach` (e.g.
//!   `invalid-state,ok,ok,invalid-state`). With `x-detach-later` instead, it
//!   sends a callout without pausing and detaches in its response. Its
//!   response-headers call sets `x-detach-resp: called` (absent for a detached
//!   exchange).
//!
//! - `tick-callout`: with `tick`, the first `on-tick` sends `GET /check/tick` to
//!   cluster `cluster`; `on-tick-callout-response` stores `<status> <body>` (or
//!   `error <error>`) in KV key `tick-callout` of namespace `ns`; requests get it as
//!   request header `x-tick-callout` (absent until then). With
//!   `tick_cancel: "1"` that tick first sends `GET /check/cancelled` and cancels
//!   it at once, twice; the results prefix the stored value (`cancel:<first>,
//!   <second> `).
//!
//! Body and trailer modes (phases `rqbody`, `rsbody`, `rqtrailers`, `rstrailers`;
//! body modes `rqmode` / `rsmode`: `streamed` (default), `buffered`, `skipped`):
//!
//! - `body-upper`: a body phase replaces the data with its upper case plus `!`
//!   (so the length changes), in both directions. In buffered mode it also sets
//!   header `x-body-len: <original length>` on that direction's head (writable
//!   while buffered). Its headers phases remove `content-length`, as a streamed
//!   rewrite that changes sizes must.
//! - `body-shrink`: a body phase keeps only the first byte of each chunk
//!   (either direction), and nothing removes `content-length`: a streamed
//!   rewrite that breaks the length the head went on with.
//! - `body-stream-count`: counts request body calls, bytes and whether
//!   end-of-stream was seen; the response head gets `x-body-calls`,
//!   `x-body-bytes`, `x-body-eos`. Data passes unchanged.
//! - `body-deny`: a request body containing `forbidden` is answered 403
//!   (`body denied\n`) from the body phase; a response body containing
//!   `forbidden` is replaced with 451.
//! - `trailers`: the request trailers phase adds trailer `x-trailer-seen` (the
//!   value of request trailer `x-client-trailer`, or `none`); the response
//!   trailers phase adds trailer `x-added-trailer: yes`.
//! - `fold-trailers`: the end-of-stream body call appends the direction's
//!   trailers (if any arrived) to the body as `\n[trailers] name=value ...` and
//!   removes them all, except `x-keep` (then left for the trailers phase); other
//!   body calls pass data unchanged. Its headers phases remove `content-length`;
//!   its trailers phases add `x-trailers-phase: ran`.
//! - `body-mode-switch`: declares a streamed request body phase; a request with
//!   header `x-mode: buffered` (or `skipped`) switches it in the headers phase
//!   (`x-mode-result` request header: `ok` or the error); the body phase then
//!   behaves as `body-upper`, and records a late `set-body-mode` error in
//!   `x-late-mode` on the response.
//!
//! - `body-callout`: the body phase (either direction, any mode; in `streamed`
//!   mode each chunk) sends the body as a callout `POST /check<request path>` to cluster
//!   `cluster` (`timeout` as in `callout`; header `x-direction: request|response`)
//!   and pauses; a trailers phase likewise sends `POST /check/trailers<request
//!   path>` with the trailers as `name=value;...` and pauses. Request path
//!   `/nocallout...` pauses without sending anything (a failure). The callout
//!   response, still in the paused phase: a 2xx sets `x-checked: <status>` on that
//!   direction's head (if `buffered`; a streamed head went on before, and if
//!   it is still writable the answer is 500 `the head of a streamed body was
//!   writable`) and
//!   upper-cases the body plus `!` (or, from a trailers phase,
//!   sets trailer `x-checked: <status>`); if the direction's trailers are there in
//!   a body pause, it sets trailer `x-body-checked: <status>` too. A write that
//!   fails answers 500 `write failed: <what> <error>`. Any other status answers
//!   locally with that status and body (`x-from-callout: 1`); an error answers 502
//!   with `x-callout-error: <error>`.
//! - `body-stale`: the request body phase keeps an owned `exchange.body`
//!   handle; the response headers phase uses it (the body was forwarded by
//!   then) and reports `len=<n>,read=<bytes>,replace=<ok or error>` in
//!   response header `x-stale`.
//! - `file`: answers every request locally with data file `file` (default
//!   `data`, `plugin.file`): 200 and its contents, or 404 and the error name.
//!
//! - `stdio`: `configure` prints `stdout line from <tag>` to stdout and
//!   `stderr line from <tag>` to stderr (WASI), then a partial line without a
//!   newline, flushed.
//!
//! `phases` is a comma list of `rq` (request headers), `rs` (response headers),
//! `rqbody`, `rsbody`, `rqtrailers`, `rstrailers`, `log`, `done`; default `rq,rs`.

wit_bindgen::generate!({ world: "http-filter", path: "../../abi/wit" });

use std::cell::RefCell;

use exports::legate::filter::http_handler::Guest;
use legate::filter::callout::CalloutResponse;
use legate::filter::http::{Action, Exchange, Headers, HttpSetup, LocalResponse, Phases};
use legate::filter::kv::{Namespace, WriteCondition};
use legate::filter::metrics::Counter;
use legate::filter::types::{BodyMode, Buffer, Direction, Error};

struct Cfg {
    mode: String,
    tag: String,
    cluster: String,
    timeout: u32,
    file: String,
    /// Per direction, whether its body mode is `buffered` (the head is held
    /// with the body).
    buffered: [bool; 2],
}

thread_local! {
    static CFG: RefCell<Cfg> = const {
        RefCell::new(Cfg {
            mode: String::new(),
            tag: String::new(),
            cluster: String::new(),
            timeout: 0,
            file: String::new(),
            buffered: [false; 2],
        })
    };
    /// `callout` mode: responses still awaited per context.
    /// `tick-callout` mode: the tick callout was sent.
    static TICK_SENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// `tick-callout` mode with `tick_cancel`: the two cancels' results.
    static TICK_CANCEL: RefCell<Option<String>> = const { RefCell::new(None) };
    static WAITING: RefCell<std::collections::HashMap<u64, u32>> = RefCell::default();
    static REQUESTS: RefCell<Option<Counter>> = const { RefCell::new(None) };
    /// `metrics` mode with `log_header`: the response field `on-log` records.
    static LOG_HEADER: RefCell<Option<String>> = const { RefCell::new(None) };
    static HOARD: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static KV: RefCell<Option<Result<Namespace, Error>>> = const { RefCell::new(None) };
    /// `body-stream-count` mode: (calls, bytes, end-of-stream seen) per context.
    static STREAMED: RefCell<std::collections::HashMap<u64, (u32, u64, bool)>> = RefCell::default();
    /// `body-mode-switch` mode: the result of a late `set-body-mode` per context.
    static LATE: RefCell<std::collections::HashMap<u64, String>> = RefCell::default();
    /// `body-callout` mode: per paused context, the direction and whether it
    /// paused in a trailers phase.
    static HELD: RefCell<std::collections::HashMap<u64, (Direction, bool)>> = RefCell::default();
    /// `body-stale` mode: the request body handle taken in the body phase, per context.
    static STALE: RefCell<std::collections::HashMap<u64, Buffer>> = RefCell::default();
}

fn error_name(e: Error) -> &'static str {
    match e {
        Error::Denied => "denied",
        Error::NotFound => "not-found",
        Error::InvalidArgument => "invalid-argument",
        Error::InvalidState => "invalid-state",
        Error::CasMismatch => "cas-mismatch",
        Error::LimitExceeded => "limit-exceeded",
        Error::Timeout => "timeout",
        Error::Unavailable => "unavailable",
        Error::Unsupported => "unsupported",
        Error::Internal => "internal",
    }
}

/// `detach` mode's request: with `x-detach-me`, `exchange.detach`; with
/// `x-with-callout` too, first a detach with a callout outstanding (refused),
/// then, after the callout is cancelled, the detach, then a callout sent after
/// it (refused). The results, comma-separated, go in `x-detach`.
fn detach_request(x: &Exchange, h: &Headers) {
    if !h.has("x-detach-me") {
        return;
    }
    let r = |r: Result<(), Error>| r.map_or_else(error_name, |()| "ok");
    let req = || legate::filter::callout::CalloutRequest {
        cluster: CFG.with(|c| c.borrow().cluster.clone()),
        method: "GET".into(),
        path: "/check/detach".into(),
        authority: None,
        headers: Vec::new(),
        body: Vec::new(),
        timeout_ms: 0,
    };
    if h.has("x-detach-later") {
        // Detach in the callout's response (`on-callout-response`), unpaused.
        if let Err(e) = legate::filter::callout::send(&req()) {
            let _ = h.set("x-detach", error_name(e).as_bytes());
        }
        return;
    }
    let callout = h.has("x-with-callout");
    let mut out = Vec::new();
    if callout {
        match legate::filter::callout::send(&req()) {
            Ok(id) => {
                out.push(r(x.detach()));
                out.push(r(legate::filter::callout::cancel(id)));
            }
            Err(e) => out.push(error_name(e)),
        }
    }
    out.push(r(x.detach()));
    if callout {
        out.push(r(legate::filter::callout::send(&req()).map(|_| ())));
    }
    let _ = h.set("x-detach", out.join(",").as_bytes());
}

/// `kv` mode's request: the KV operation the path names; results go in `h`.
fn kv_request(ns: &Namespace, path: &str, h: &Headers) {
    let put = |name: &str, v: String| {
        let _ = h.set(name, v.as_bytes());
    };
    if path == "/count" {
        let mut retries = 0u32;
        loop {
            let (n, cond) = match ns.get("count") {
                Ok(Some(e)) => (
                    String::from_utf8_lossy(&e.value)
                        .parse::<u64>()
                        .unwrap_or(0),
                    WriteCondition::IfVersion(e.version),
                ),
                Ok(None) => (0, WriteCondition::IfAbsent),
                Err(e) => return put("x-kv-error", error_name(e).into()),
            };
            match ns.set("count", (n + 1).to_string().as_bytes(), cond, None) {
                Ok(_) => {
                    put("x-kv-count", (n + 1).to_string());
                    put("x-kv-retries", retries.to_string());
                    return;
                }
                Err(Error::CasMismatch) => retries += 1,
                Err(e) => return put("x-kv-error", error_name(e).into()),
            }
        }
    } else if path == "/read" {
        match ns.get("count") {
            Ok(Some(e)) => put("x-kv-count", String::from_utf8_lossy(&e.value).into()),
            Ok(None) => put("x-kv-count", "absent".into()),
            Err(e) => put("x-kv-error", error_name(e).into()),
        }
    } else if path == "/ticks" {
        match ns.get("ticks") {
            Ok(Some(e)) => put("x-kv-count", String::from_utf8_lossy(&e.value).into()),
            Ok(None) => put("x-kv-count", "0".into()),
            Err(e) => put("x-kv-error", error_name(e).into()),
        }
    } else if path == "/incr" {
        match ns.increment("hits", 1, None) {
            Ok(n) => put("x-kv-count", n.to_string()),
            Err(e) => put("x-kv-error", error_name(e).into()),
        }
    } else if let Some(ms) = path.strip_prefix("/ttl-set/") {
        let ttl = ms.parse::<u64>().ok();
        match ns.set("t", b"v", WriteCondition::Always, ttl) {
            Ok(v) => put("x-kv-version", v.to_string()),
            Err(e) => put("x-kv-error", error_name(e).into()),
        }
    } else if path == "/ttl-get" {
        match ns.get("t") {
            Ok(Some(e)) => put("x-kv-value", String::from_utf8_lossy(&e.value).into()),
            Ok(None) => put("x-kv-value", "absent".into()),
            Err(e) => put("x-kv-error", error_name(e).into()),
        }
    } else if path == "/big" {
        if let Err(e) = ns.set("big", &vec![0u8; 65537], WriteCondition::Always, None) {
            put("x-kv-error", error_name(e).into());
        }
    } else if path == "/start" {
        // This guest does not export `kv-handler`: nowhere for a reply to go.
        match ns.start_get("count") {
            Ok(id) => put("x-kv-started", id.to_string()),
            Err(e) => put("x-kv-error", error_name(e).into()),
        }
        put("x-kv-backend", format!("{:?}", ns.backend()));
    }
}

/// `tick-callout` mode: records the tick callout's outcome in KV.
fn tick_result(v: String) {
    let v = match TICK_CANCEL.with(|c| c.borrow().clone()) {
        Some(c) => format!("cancel:{c} {v}"),
        None => v,
    };
    KV.with(|k| {
        if let Some(Ok(ns)) = k.borrow().as_ref() {
            let _ = ns.set("tick-callout", v.as_bytes(), WriteCondition::Always, None);
        }
    });
}

/// `callout` mode's request phase.
fn callout_request(c: u64, x: &Exchange, h: &Headers) -> Action {
    let (cluster, timeout) = CFG.with(|c| (c.borrow().cluster.clone(), c.borrow().timeout));
    let path = x.path();
    let mut headers = Vec::new();
    if let Some(u) = h.get("x-user") {
        headers.push(("x-user".to_string(), u));
    }
    let req = legate::filter::callout::CalloutRequest {
        cluster,
        method: "GET".into(),
        path: format!("/check{path}"),
        authority: None,
        headers,
        body: Vec::new(),
        timeout_ms: timeout,
    };
    if path.starts_with("/panic") {
        panic!("callout guest panics on purpose");
    }
    let n = if path.starts_with("/two") { 2 } else { 1 };
    for _ in 0..n {
        match legate::filter::callout::send(&req) {
            Ok(id) if path.starts_with("/cancel") => {
                let r = |r: Result<(), Error>| r.map_or_else(error_name, |()| "ok");
                let first = r(legate::filter::callout::cancel(id));
                let second = r(legate::filter::callout::cancel(id));
                let _ = h.set("x-callout-cancel", format!("{first},{second}").as_bytes());
                return Action::Continue;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = h.set("x-callout-error", error_name(e).as_bytes());
                return Action::Continue;
            }
        }
    }
    if path.starts_with("/nopause") {
        return Action::Continue;
    }
    WAITING.with(|w| w.borrow_mut().insert(c, n));
    Action::Pause
}

/// `body-callout` mode: sends `body` for checking and pauses the body (or, if
/// `trailers`, the trailers) phase of direction `d`.
fn check_part(c: u64, x: &Exchange, d: Direction, trailers: bool, body: Vec<u8>) -> Action {
    let path = x.path();
    if !path.starts_with("/nocallout") {
        let (cluster, timeout) = CFG.with(|c| (c.borrow().cluster.clone(), c.borrow().timeout));
        let direction = if d == Direction::Request {
            "request"
        } else {
            "response"
        };
        let req = legate::filter::callout::CalloutRequest {
            cluster,
            method: "POST".into(),
            path: if trailers {
                format!("/check/trailers{path}")
            } else {
                format!("/check{path}")
            },
            authority: None,
            headers: vec![("x-direction".into(), direction.as_bytes().to_vec())],
            body,
            timeout_ms: timeout,
        };
        if let Err(e) = legate::filter::callout::send(&req) {
            return callout_failed(e);
        }
    }
    HELD.with(|h| h.borrow_mut().insert(c, (d, trailers)));
    Action::Pause
}

/// 502 for a callout that has no response.
fn callout_failed(e: Error) -> Action {
    Action::Respond(LocalResponse {
        status: 502,
        headers: vec![("x-callout-error".into(), error_name(e).as_bytes().to_vec())],
        body: b"callout failed\n".to_vec(),
        details: "callout_failed".into(),
    })
}

/// 500 naming a write the host refused.
fn write_failed(what: &str, e: Error) -> Action {
    Action::Respond(LocalResponse {
        status: 500,
        headers: Vec::new(),
        body: format!("write failed: {what} {}\n", error_name(e)).into_bytes(),
        details: "write_failed".into(),
    })
}

/// `body-callout` mode's callout response, in the phase that paused.
fn checked(c: u64, x: &Exchange, r: Result<CalloutResponse, Error>) -> Action {
    let Some((d, trailers)) = HELD.with(|h| h.borrow_mut().remove(&c)) else {
        return Action::Continue;
    };
    let resp = match r {
        Ok(resp) => resp,
        Err(e) => return callout_failed(e),
    };
    if !(200..300).contains(&resp.status) {
        return Action::Respond(LocalResponse {
            status: resp.status,
            headers: vec![("x-from-callout".into(), b"1".to_vec())],
            body: resp.body,
            details: "check_denied".into(),
        });
    }
    let status = resp.status.to_string();
    let set = |h: Option<Headers>, name: &str, what: &str| match h {
        Some(h) => h
            .set(name, status.as_bytes())
            .err()
            .map(|e| write_failed(what, e)),
        None => Some(write_failed(what, Error::NotFound)),
    };
    if trailers {
        return set(x.trailers(d), "x-checked", "trailers").unwrap_or(Action::Continue);
    }
    // A streamed body's head went on before its first body call: writing it
    // must fail (abi/README.md §3.4), else the host broke the write window.
    let held_head = CFG.with(|c| c.borrow().buffered[usize::from(d == Direction::Response)]);
    if held_head {
        if let Some(a) = set(x.headers(d), "x-checked", "head") {
            return a;
        }
    } else if x
        .headers(d)
        .is_some_and(|h| h.set("x-checked", b"late").is_ok())
    {
        return Action::Respond(LocalResponse {
            status: 500,
            headers: Vec::new(),
            body: b"the head of a streamed body was writable\n".to_vec(),
            details: "write_window".into(),
        });
    }
    let Some(b) = x.body(d) else {
        return write_failed("body", Error::NotFound);
    };
    let mut upper = b.read(0, b.len()).to_ascii_uppercase();
    upper.push(b'!');
    if let Err(e) = b.replace(&upper) {
        return write_failed("body", e);
    }
    if let Some(t) = x.trailers(d) {
        if let Err(e) = t.set("x-body-checked", status.as_bytes()) {
            return write_failed("trailers", e);
        }
    }
    Action::Continue
}

/// `name=value;` for each trailer.
fn trailer_list(t: &Headers) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in t.entries() {
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(&value);
        out.push(b';');
    }
    out
}

/// The body phases of the body modes (either direction).
fn body_phase(c: u64, x: &Exchange, b: &Buffer, eos: bool, d: Direction) -> Action {
    match mode().as_str() {
        "body-callout" => check_part(c, x, d, false, b.read(0, b.len())),
        "body-upper" | "body-mode-switch" => {
            if mode() == "body-mode-switch" {
                let late = match x.set_body_mode(d, BodyMode::Streamed) {
                    Ok(()) => "ok",
                    Err(e) => error_name(e),
                };
                LATE.with(|l| l.borrow_mut().insert(c, late.to_string()));
            }
            let data = b.read(0, b.len());
            let mut upper = data.to_ascii_uppercase();
            if eos {
                upper.push(b'!');
            }
            if let Err(e) = b.replace(&upper) {
                return Action::Respond(LocalResponse {
                    status: 500,
                    headers: Vec::new(),
                    body: format!("replace failed: {}\n", error_name(e)).into_bytes(),
                    details: "replace_failed".into(),
                });
            }
            if let Some(h) = x.headers(d) {
                // Writable only while the body is buffered; ignored otherwise.
                let _ = h.set("x-body-len", data.len().to_string().as_bytes());
            }
            Action::Continue
        }
        "fold-trailers" => {
            let Some(t) = x.trailers(d) else {
                return Action::Continue;
            };
            if !eos {
                return Action::Continue;
            }
            let mut folded = b"\n[trailers]".to_vec();
            for (name, value) in t.entries() {
                if name == "x-keep" {
                    continue;
                }
                folded.extend_from_slice(format!(" {name}=").as_bytes());
                folded.extend_from_slice(&value);
                if let Err(e) = t.remove(&name) {
                    folded
                        .extend_from_slice(format!(" remove-failed:{}", error_name(e)).as_bytes());
                }
            }
            if let Err(e) = b.splice(b.len(), 0, &folded) {
                folded = format!("splice failed: {}", error_name(e)).into_bytes();
                let _ = b.replace(&folded);
            }
            Action::Continue
        }
        "body-stale" => {
            if let Some(owned) = x.body(d) {
                STALE.with(|s| {
                    s.borrow_mut().entry(c).or_insert(owned);
                });
            }
            Action::Continue
        }
        "body-stream-count" => {
            let n = b.len();
            STREAMED.with(|s| {
                let mut s = s.borrow_mut();
                let e = s.entry(c).or_default();
                e.0 += 1;
                e.1 += n;
                e.2 |= eos;
            });
            Action::Continue
        }
        "body-shrink" => {
            // Each chunk down to its first byte: the body shrinks, and the
            // content-length (never removed in this mode) no longer holds.
            if b.len() > 1 {
                let first = b.read(0, 1);
                let _ = b.replace(&first);
            }
            Action::Continue
        }
        "body-deny" => {
            let data = b.read(0, b.len());
            if data.windows(9).any(|w| w == b"forbidden") {
                let status = if d == Direction::Request { 403 } else { 451 };
                return Action::Respond(LocalResponse {
                    status,
                    headers: vec![("x-denied-by".into(), b"body".to_vec())],
                    body: b"body denied\n".to_vec(),
                    details: "body_denied".into(),
                });
            }
            Action::Continue
        }
        _ => Action::Continue,
    }
}

/// `"key":"value"` from compact JSON (the host serializes config without spaces).
fn field(json: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = json.find(&pat)? + pat.len();
    let end = json[start..].find('"')? + start;
    Some(json[start..end].to_string())
}

fn mode() -> String {
    CFG.with(|c| c.borrow().mode.clone())
}

fn tag() -> String {
    CFG.with(|c| c.borrow().tag.clone())
}

struct Plugin;

impl Guest for Plugin {
    fn configure(config: String) -> Result<HttpSetup, String> {
        let mode = field(&config, "mode").unwrap_or_else(|| "headers".into());
        if mode == "bad-config" {
            return Err("bad-config: the `mode` asked this plugin to refuse".into());
        }
        if let Some(why) = field(&config, "panic_configure") {
            panic!("{why}");
        }
        if let Some(ns) = field(&config, "kv_required") {
            legate::filter::kv::open(&ns).map_err(|e| format!("open {ns}: {}", error_name(e)))?;
        }
        if let Some(cluster) = field(&config, "check_cluster") {
            legate::filter::callout::check_cluster(&cluster)
                .map_err(|e| format!("check-cluster {cluster}: {}", error_name(e)))?;
        }
        if let Some(names) = field(&config, "sanitize") {
            let names: Vec<String> = names.split(',').map(str::to_owned).collect();
            legate::filter::http::sanitize_request_headers(&names)
                .map_err(|e| format!("sanitize: {}", error_name(e)))?;
        }
        if let Some(ms) = field(&config, "configure_sleep_ms").and_then(|v| v.parse().ok()) {
            // A WASI pollable in `configure`, which runs at load, off the workers.
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let tag = field(&config, "tag").unwrap_or_else(legate::filter::plugin::name);
        let mut phases = Phases::empty();
        for p in field(&config, "phases")
            .unwrap_or_else(|| "rq,rs".into())
            .split(',')
        {
            phases |= match p {
                "rq" => Phases::REQUEST_HEADERS,
                "rs" => Phases::RESPONSE_HEADERS,
                "rqbody" => Phases::REQUEST_BODY,
                "rsbody" => Phases::RESPONSE_BODY,
                "rqtrailers" => Phases::REQUEST_TRAILERS,
                "rstrailers" => Phases::RESPONSE_TRAILERS,
                "log" => Phases::LOG,
                "done" => Phases::DONE,
                _ => return Err(format!("unknown phase `{p}`")),
            };
        }
        if mode == "stdio" {
            use std::io::Write as _;
            println!("stdout line from {tag}");
            eprintln!("stderr line from {tag}");
            print!("partial line from {tag}");
            let _ = std::io::stdout().flush();
        }
        if mode == "metrics" {
            let name = field(&config, "metric").unwrap_or_else(|| "requests".into());
            let c = legate::filter::metrics::define_counter(
                &name,
                "Requests seen by the test plugin.",
                &["method".to_string()],
            )
            .map_err(|e| format!("define-counter {name}: {e:?}"))?;
            REQUESTS.with(|r| *r.borrow_mut() = Some(c));
            LOG_HEADER.with(|h| *h.borrow_mut() = field(&config, "log_header"));
        }
        if let Some(name) = field(&config, "define_counter") {
            // An unlabelled counter: its series is on /stats once defined.
            legate::filter::metrics::define_counter(&name, "Defined by the test plugin.", &[])
                .map_err(|e| format!("define-counter {name}: {e:?}"))?;
        }
        if let Some(def) = field(&config, "define_histogram") {
            // `NAME:B1|B2|…`: an unlabelled histogram over those buckets.
            let (name, bounds) = def.split_once(':').unwrap_or((&def, ""));
            let buckets: Vec<f64> = bounds.split('|').filter_map(|b| b.parse().ok()).collect();
            legate::filter::metrics::define_histogram(
                name,
                "Defined by the test plugin.",
                &[],
                &buckets,
            )
            .map_err(|e| format!("define-histogram {name}: {e:?}"))?;
        }
        if let Some(why) = field(&config, "fail_configure") {
            // After everything above was defined.
            return Err(format!("fail_configure: {why}"));
        }
        if field(&config, "tick_cancel").is_some() {
            TICK_CANCEL.with(|c| *c.borrow_mut() = Some(String::new()));
        }
        if mode == "kv" || mode == "tick-callout" {
            let ns = field(&config, "ns").unwrap_or_else(|| "counters".into());
            KV.with(|k| *k.borrow_mut() = Some(legate::filter::kv::open(&ns)));
        }
        if let Some(max) = field(&config, "fail_configure_after").and_then(|n| n.parse().ok()) {
            let n = KV.with(|k| match k.borrow().as_ref() {
                Some(Ok(ns)) => ns.increment("configures", 1, None).unwrap_or(0),
                _ => 0,
            });
            if n > max {
                return Err(format!("configure call {n} fails"));
            }
        }
        let cluster = field(&config, "cluster").unwrap_or_else(|| "authz".into());
        let timeout = field(&config, "timeout")
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let body_mode = |key: &str| match field(&config, key).as_deref() {
            None | Some("streamed") => Ok(BodyMode::Streamed),
            Some("buffered") => Ok(BodyMode::Buffered),
            Some("skipped") => Ok(BodyMode::Skipped),
            Some(m) => Err(format!("unknown body mode `{m}`")),
        };
        let (request_body_mode, response_body_mode) = (body_mode("rqmode")?, body_mode("rsmode")?);
        CFG.with(|c| {
            *c.borrow_mut() = Cfg {
                mode,
                tag,
                cluster,
                timeout,
                file: field(&config, "file").unwrap_or_else(|| "data".into()),
                buffered: [
                    request_body_mode == BodyMode::Buffered,
                    response_body_mode == BodyMode::Buffered,
                ],
            }
        });
        Ok(HttpSetup {
            phases,
            request_body_mode,
            response_body_mode,
            tick_interval_ms: field(&config, "tick")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0),
        })
    }

    fn on_tick() {
        if mode() == "tick-callout" {
            if TICK_SENT.with(|s| s.replace(true)) {
                return;
            }
            let cluster = CFG.with(|c| c.borrow().cluster.clone());
            let req = legate::filter::callout::CalloutRequest {
                cluster,
                method: "GET".into(),
                path: "/check/tick".into(),
                authority: None,
                headers: Vec::new(),
                body: Vec::new(),
                timeout_ms: 0,
            };
            if TICK_CANCEL.with(|c| c.borrow().is_some()) {
                // First a callout cancelled at once (twice), never to go out.
                let cancelled = legate::filter::callout::CalloutRequest {
                    path: "/check/cancelled".into(),
                    ..req.clone()
                };
                let r = |r: Result<(), Error>| r.map_or_else(error_name, |()| "ok");
                let v = match legate::filter::callout::send(&cancelled) {
                    Ok(id) => format!(
                        "{},{}",
                        r(legate::filter::callout::cancel(id)),
                        r(legate::filter::callout::cancel(id))
                    ),
                    Err(e) => format!("send {}", error_name(e)),
                };
                TICK_CANCEL.with(|c| *c.borrow_mut() = Some(v));
            }
            if let Err(e) = legate::filter::callout::send(&req) {
                tick_result(format!("error {}", error_name(e)));
            }
            return;
        }
        KV.with(|k| {
            if let Some(Ok(ns)) = k.borrow().as_ref() {
                let _ = ns.increment("ticks", 1, None);
            }
        });
    }

    fn on_tick_callout_response(_id: u64, r: Result<CalloutResponse, Error>) {
        tick_result(match r {
            Ok(resp) => format!("{} {}", resp.status, String::from_utf8_lossy(&resp.body)),
            Err(e) => format!("error {}", error_name(e)),
        });
    }

    fn on_request_headers(c: u64, x: &Exchange, h: &Headers, _eos: bool) -> Action {
        match mode().as_str() {
            "log" => {
                // A log line inside an exchange: the host adds its request id.
                legate::filter::log::log(
                    legate::filter::log::Level::Info,
                    &format!("request log line from {}", tag()),
                );
                Action::Continue
            }
            "headers" => {
                let _ = h.set("x-filter", tag().as_bytes());
                if let Some(name) = h.get("x-sanitize-late") {
                    let name = String::from_utf8_lossy(&name).into_owned();
                    let r = legate::filter::http::sanitize_request_headers(&[name]);
                    let r = r.map_or_else(error_name, |()| "ok");
                    let _ = h.set("x-sanitize-late", r.as_bytes());
                }
                // The host hides `host` from every read: the authority is the
                // exchange's.
                let host = h.get("host").unwrap_or_else(|| b"none".to_vec());
                let names: Vec<String> = h.entries().into_iter().map(|(n, _)| n).collect();
                let seen = format!(
                    "get={} has={} all={} len={} entries={}",
                    String::from_utf8_lossy(&host),
                    h.has("Host"),
                    h.get_all("host").len(),
                    h.len(),
                    names.len(),
                );
                let _ = h.set("x-seen-host", seen.as_bytes());
                let _ = h.set("x-seen-names", names.join(",").as_bytes());
                let _ = h.set("x-seen-authority", x.authority().as_bytes());
                Action::Continue
            }
            "respond" if !h.has("x-api-key") => Action::Respond(LocalResponse {
                status: 401,
                headers: vec![
                    ("www-authenticate".into(), b"ApiKey".to_vec()),
                    ("connection".into(), b"x-dropped-by-host".to_vec()),
                ],
                body: b"denied by plugin\n".to_vec(),
                details: "missing_api_key".into(),
            }),
            "file" => {
                let name = CFG.with(|c| c.borrow().file.clone());
                match legate::filter::plugin::file(&name) {
                    Ok(data) => Action::Respond(LocalResponse {
                        status: 200,
                        headers: Vec::new(),
                        body: data,
                        details: String::new(),
                    }),
                    Err(e) => Action::Respond(LocalResponse {
                        status: 404,
                        headers: Vec::new(),
                        body: error_name(e).as_bytes().to_vec(),
                        details: "no_file".into(),
                    }),
                }
            }
            "rewrite" => {
                let p = x.path();
                if let Some(rest) = p.strip_prefix("/old") {
                    let _ = x.set_path(&format!("/new{rest}"));
                }
                Action::Continue
            }
            "hostile" => {
                let p = x.path();
                if p.starts_with("/panic") {
                    panic!("hostile guest panics on purpose");
                }
                if p.starts_with("/loop") {
                    let mut n: u64 = 0;
                    loop {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                }
                if p.starts_with("/sleep") {
                    // `wasi:clocks/monotonic-clock.subscribe-duration` + `poll.block`.
                    std::thread::sleep(std::time::Duration::from_secs(5));
                }
                if p.starts_with("/recurse") {
                    // Unbounded recursion: wasmtime's stack limit traps it
                    // (on the worker thread's own stack: calls have no fiber).
                    fn down(n: u64) -> u64 {
                        if n == 0 {
                            return 0;
                        }
                        std::hint::black_box(down(std::hint::black_box(n - 1))) + 1
                    }
                    let _ = h.set("x-depth", down(u64::MAX).to_string().as_bytes());
                }
                if p.starts_with("/sockets") {
                    // WASI sockets are linked but deny everything: each must
                    // come back as an error (not a trap, not a host panic).
                    let kind = |r: std::io::Result<()>| match r {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("{:?}", e.kind()),
                    };
                    let v = format!(
                        "tcp-bind={},tcp-connect={},udp-bind={}",
                        kind(std::net::TcpListener::bind("127.0.0.1:0").map(drop)),
                        kind(std::net::TcpStream::connect("127.0.0.1:9").map(drop)),
                        kind(std::net::UdpSocket::bind("127.0.0.1:0").map(drop)),
                    );
                    let _ = h.set("x-sockets", v.as_bytes());
                }
                if p.starts_with("/grow") {
                    // Past the memory cap (64 MiB, over the 16 MiB a test
                    // sets): `memory.grow` fails with -1, it does not trap;
                    // a page more still fits.
                    let big = core::arch::wasm32::memory_grow(0, 1024) as isize;
                    let small = core::arch::wasm32::memory_grow(0, 1) as isize;
                    let small = if small < 0 { "refused" } else { "ok" };
                    let _ = h.set("x-grow", format!("{big},{small}").as_bytes());
                }
                if p.starts_with("/oom") {
                    HOARD.with(|h| loop {
                        h.borrow_mut().push(vec![1u8; 1 << 20]);
                    });
                }
                if p.starts_with("/flood-add") {
                    // Adds fields until the host refuses one: answers where.
                    let mut refused = String::from("never refused");
                    for i in 0..30_000 {
                        if let Err(e) = h.add(&format!("x-f-{i}"), b"v") {
                            refused = format!("{} at {i}", error_name(e));
                            break;
                        }
                    }
                    return Action::Respond(LocalResponse {
                        status: 200,
                        headers: Vec::new(),
                        body: refused.into_bytes(),
                        details: String::new(),
                    });
                }
                if p.starts_with("/flood-respond") {
                    // More fields than a header map can hold (24 576 names).
                    let headers = (0..30_000)
                        .map(|i| (format!("x-f-{i}"), b"v".to_vec()))
                        .collect();
                    return Action::Respond(LocalResponse {
                        status: 200,
                        headers,
                        body: Vec::new(),
                        details: String::new(),
                    });
                }
                Action::Continue
            }
            "kv" => {
                KV.with(|k| match k.borrow().as_ref() {
                    Some(Ok(ns)) => kv_request(ns, &x.path(), h),
                    Some(Err(e)) => {
                        let _ = h.set("x-kv-error", error_name(*e).as_bytes());
                    }
                    None => {}
                });
                Action::Continue
            }
            "callout" => callout_request(c, x, h),
            "detach" => {
                detach_request(x, h);
                Action::Continue
            }
            "body-upper" | "fold-trailers" => {
                // The body will grow: a streamed rewrite must not keep the length.
                let _ = h.remove("content-length");
                Action::Continue
            }
            "body-mode-switch" => {
                let mode = match h.get("x-mode").as_deref() {
                    Some(b"buffered") => Some(BodyMode::Buffered),
                    Some(b"skipped") => Some(BodyMode::Skipped),
                    _ => None,
                };
                if let Some(m) = mode {
                    let r = match x.set_body_mode(Direction::Request, m) {
                        Ok(()) => "ok",
                        Err(e) => error_name(e),
                    };
                    let _ = h.set("x-mode-result", r.as_bytes());
                }
                Action::Continue
            }
            "tick-callout" => {
                KV.with(|k| {
                    if let Some(Ok(ns)) = k.borrow().as_ref() {
                        if let Ok(Some(e)) = ns.get("tick-callout") {
                            let _ = h.set("x-tick-callout", &e.value);
                        }
                    }
                });
                Action::Continue
            }
            "metrics" => {
                REQUESTS.with(|r| {
                    if let Some(c) = r.borrow().as_ref() {
                        if let Ok(s) = c.with_labels(&[x.method()]) {
                            s.add(1);
                        }
                    }
                });
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_request_body(c: u64, x: &Exchange, b: &Buffer, eos: bool) -> Action {
        body_phase(c, x, b, eos, Direction::Request)
    }

    fn on_request_trailers(c: u64, x: &Exchange, t: &Headers) -> Action {
        if mode() == "body-callout" {
            return check_part(c, x, Direction::Request, true, trailer_list(t));
        }
        if mode() == "fold-trailers" {
            let _ = t.set("x-trailers-phase", b"ran");
        }
        if mode() == "trailers" {
            let seen = t
                .get("x-client-trailer")
                .unwrap_or_else(|| b"none".to_vec());
            let _ = t.set("x-trailer-seen", &seen);
        }
        Action::Continue
    }

    fn on_response_headers(c: u64, x: &Exchange, h: &Headers, _eos: bool) -> Action {
        match mode().as_str() {
            // A failure that is not a trap: a pause with nothing to resume it.
            "hostile" if x.path().starts_with("/pause-response") => Action::Pause,
            "headers" => {
                let _ = h.set("x-filter-resp", tag().as_bytes());
                let route = x.route_name().unwrap_or_default();
                let _ = h.set("x-seen-route", route.as_bytes());
                let _ = h.set("x-seen-request-id", x.request_id().as_bytes());
                if let Some(req) = x.headers(Direction::Request) {
                    if let Some(v) = req.get("x-filter") {
                        let _ = h.set("x-seen-request-filter", &v);
                    }
                }
                Action::Continue
            }
            "body-upper" | "fold-trailers" => {
                let _ = h.remove("content-length");
                Action::Continue
            }
            "body-stream-count" => {
                let (calls, bytes, eos) = STREAMED
                    .with(|s| s.borrow_mut().remove(&c))
                    .unwrap_or_default();
                let _ = h.set("x-body-calls", calls.to_string().as_bytes());
                let _ = h.set("x-body-bytes", bytes.to_string().as_bytes());
                let _ = h.set("x-body-eos", if eos { b"1" } else { b"0" });
                Action::Continue
            }
            "body-stale" => {
                // The request body went upstream: the handle is still valid,
                // with no data behind it.
                if let Some(b) = STALE.with(|s| s.borrow_mut().remove(&c)) {
                    let replace = b.replace(b"late").map_or_else(error_name, |()| "ok");
                    let v = format!(
                        "len={},read={},replace={replace}",
                        b.len(),
                        b.read(0, 1 << 20).len()
                    );
                    let _ = h.set("x-stale", v.as_bytes());
                }
                Action::Continue
            }
            "body-mode-switch" => {
                if let Some(v) = LATE.with(|l| l.borrow_mut().remove(&c)) {
                    let _ = h.set("x-late-mode", v.as_bytes());
                }
                Action::Continue
            }
            "detach" => {
                // Only for exchanges that did not detach.
                let _ = h.set("x-detach-resp", b"called");
                Action::Continue
            }
            "cookies" => {
                let n = h.get_all("set-cookie").len();
                let _ = h.set("x-cookie-count", n.to_string().as_bytes());
                let _ = h.add("set-cookie", b"added=by-plugin");
                Action::Continue
            }
            "respond"
                if x.headers(Direction::Request)
                    .is_some_and(|r| r.has("x-respond-late")) =>
            {
                Action::Respond(LocalResponse {
                    status: 503,
                    headers: vec![("x-replaced-by".into(), tag().into_bytes())],
                    body: b"replaced by plugin\n".to_vec(),
                    details: "replaced_late".into(),
                })
            }
            _ => Action::Continue,
        }
    }

    fn on_response_body(c: u64, x: &Exchange, b: &Buffer, eos: bool) -> Action {
        body_phase(c, x, b, eos, Direction::Response)
    }

    fn on_response_trailers(c: u64, x: &Exchange, t: &Headers) -> Action {
        if mode() == "body-callout" {
            return check_part(c, x, Direction::Response, true, trailer_list(t));
        }
        if mode() == "trailers" {
            let _ = t.set("x-added-trailer", b"yes");
        }
        if mode() == "fold-trailers" {
            let _ = t.set("x-trailers-phase", b"ran");
        }
        Action::Continue
    }

    fn on_log(_c: u64, x: &Exchange) {
        if mode() == "metrics" {
            REQUESTS.with(|r| {
                if let Some(c) = r.borrow().as_ref() {
                    if let Ok(s) = c.with_labels(&[format!("log-{}", x.method())]) {
                        s.add(1);
                    }
                    // What `on-log` sees of why the answer is not the upstream's.
                    if let Some(cause) = x.cause() {
                        if let Ok(s) = c.with_labels(&[format!("log-cause-{cause}")]) {
                            s.add(1);
                        }
                    }
                    // What `on-log` reads of the response head: its status and
                    // one field (`none` where the head or the field is missing).
                    if let Some(name) = LOG_HEADER.with(|h| h.borrow().clone()) {
                        let status = x.status().map_or("none".into(), |s| s.to_string());
                        let value = x
                            .headers(Direction::Response)
                            .and_then(|h| h.get(&name))
                            .map_or("none".into(), |v| String::from_utf8_lossy(&v).into_owned());
                        for l in [
                            format!("log-status-{status}"),
                            format!("log-{name}-{value}"),
                        ] {
                            if let Ok(s) = c.with_labels(&[l]) {
                                s.add(1);
                            }
                        }
                    }
                }
            });
        }
    }

    fn on_callout_response(
        c: u64,
        x: &Exchange,
        _id: u64,
        r: Result<CalloutResponse, Error>,
    ) -> Action {
        if mode() == "body-callout" {
            return checked(c, x, r);
        }
        if mode() == "detach" {
            if let Err(e) = x.detach() {
                legate::filter::log::log(
                    legate::filter::log::Level::Error,
                    &format!("detach from a callout response: {}", error_name(e)),
                );
            }
            return Action::Continue;
        }
        let left = WAITING.with(|w| {
            let mut w = w.borrow_mut();
            let n = w.get(&c).copied().unwrap_or(1).saturating_sub(1);
            if n == 0 {
                w.remove(&c);
            } else {
                w.insert(c, n);
            }
            n
        });
        let resp = match r {
            Ok(resp) => resp,
            Err(e) => {
                return Action::Respond(LocalResponse {
                    status: 502,
                    headers: vec![("x-callout-error".into(), error_name(e).as_bytes().to_vec())],
                    body: b"callout failed\n".to_vec(),
                    details: "callout_failed".into(),
                })
            }
        };
        if !(200..300).contains(&resp.status) {
            return Action::Respond(LocalResponse {
                status: resp.status,
                headers: vec![("x-from-callout".into(), b"1".to_vec())],
                body: resp.body,
                details: "callout_denied".into(),
            });
        }
        if left > 0 {
            return Action::Pause;
        }
        // The paused request head is still writable.
        if let Some(h) = x.headers(Direction::Request) {
            let _ = h.set("x-callout-status", resp.status.to_string().as_bytes());
            let _ = h.set("x-callout-body", &resp.body);
            if x.path().starts_with("/two") {
                let _ = h.set("x-callout-count", b"2");
            }
        }
        Action::Continue
    }

    fn on_done(_c: u64) {}
}

export!(Plugin);
