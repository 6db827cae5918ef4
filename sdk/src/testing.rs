//! A native test harness: run a filter through its phases with `cargo test`,
//! no wasm and no proxy. The filter runs on the same [`Instance`] runtime as in
//! the guest; host calls go to an in-memory host ([`TestHost`]) that follows
//! the ABI's rules: write windows (`InvalidState` outside them), header
//! validation, capabilities (`Denied`), metrics defined only in `configure`,
//! KV versions/CAS/TTL against a settable clock, callout bookkeeping,
//! `content-length` (recomputed after a buffered body call; a streamed body
//! held to the one its head went on with, [`Outcome::LengthMismatch`]).
//!
//! ```
//! # use legate_sdk::{Action, Exchange, Headers, HttpFilter, Setup};
//! # struct AddHeader;
//! # impl HttpFilter for AddHeader {
//! #     type Config = ();
//! #     type Context = ();
//! #     fn configure(_: ()) -> Result<Self, String> { Ok(AddHeader) }
//! #     fn setup(&self) -> Setup { Setup::new().on_response_headers() }
//! #     fn on_response_headers(&mut self, _: &mut (), _: &Exchange<'_>, h: &Headers<'_>, _: bool) -> Action {
//! #         let _ = h.set("x-added", "1");
//! #         Action::Continue
//! #     }
//! # }
//! use legate_sdk::testing::{FilterTest, Request, Response};
//!
//! let mut t = FilterTest::<AddHeader>::configure("null").unwrap();
//! let mut x = t.exchange(Request::get("/"));
//! assert_eq!(x.request_headers(), Action::Continue); // not declared: not called
//! assert_eq!(x.response_headers(Response::new(200)), Action::Continue);
//! assert_eq!(x.response_header("x-added").as_deref(), Some("1"));
//! ```
//!
//! Every phase method calls the filter only if the phase is declared (as the
//! host does) and returns the [`Action`] (`Continue` for an undeclared phase).
//! Once the filter answered with a local response (`Respond` from a phase, or
//! from a reply while paused), it gets no more phase calls for the exchange,
//! as from the host (the response enters the response path right after it:
//! it never sees it), only `on_log` and `on_done`: later phase methods return
//! `Continue` without calling it. As on the host, the exchange records the
//! answer (`Exchange::cause` is `plugin:<details>`, `Exchange::status` the
//! status that went out), so `on_log` sees it.
//! As the host, the harness makes each phase call of an exchange once, in
//! order, and none while the exchange is paused: a phase method asked for
//! again, or for a phase the exchange is past, panics naming the mistake.
//!
//! Network (L4) filters run on [`NetworkFilterTest`]: open a connection with
//! [`NetworkFilterTest::connect`], feed bytes from either side and read what
//! would be forwarded ([`TestConnection::sent_upstream`] /
//! [`TestConnection::sent_downstream`]), held (pause) or whether the
//! connection was closed, and whether the host would have failed the filter
//! ([`TestConnection::failure`]: a pause nothing could end, with the failure
//! policy of [`NetworkFilterTest::fail_open`] applied); the same fake host
//! serves both kinds of filter.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use crate::backend::{
    check_local_response, idx, install, run_kv, BufferHandle, Call, CalloutState, ConnectionHandle,
    Ex, ExchangeHandle, ExchangeState, FieldList, HeadersHandle, Host, HostState, Part, Sent,
    SeriesValue,
};

use crate::callout::{CalloutId, CalloutRequest, CalloutResponse};
use crate::kv::{Backend, CallId, Entry, Op, Reply as KvReply};
use crate::log::Level;
use crate::network::{
    Connection, NetworkAction, NetworkEvent, NetworkInstance, NetworkSetup, Peer,
};
use crate::types::{Action, BodyMode, Direction, HttpVersion, TlsVersion};
use crate::NetworkFilter;
use crate::{Body, Error, Exchange, Headers, HttpFilter, Instance, Phase, Setup};

/// The host's default `limits.body` (`legate_abi_rules::limits`, which the
/// host's is): the most a network filter may hold per direction.
pub use legate_abi_rules::limits::DEFAULT_BODY_LIMIT;

/// The host's histogram buckets (host/src/stats.rs `BUCKETS`): those of a
/// histogram defined with none.
pub const HOST_BUCKETS: [f64; 19] = crate::backend::HOST_BUCKETS;

/// The largest callout response body the host reads (abi/README.md §7;
/// `legate_abi_rules::limits`, which the host's is): a larger one is
/// delivered as `Err(Error::LimitExceeded)`.
pub use legate_abi_rules::limits::CALLOUT_MAX_RESPONSE;

/// The fields the host always drops from a callout response's head before
/// the filter gets it, as from every message it proxies: the
/// connection-specific ones (RFC 9110 §7.6.1, RFC 9112) and
/// `proxy-authorization`; the host's list (`legate_abi_rules`, which the host
/// strips with). The harness drops them too, and, as the host, the fields a
/// `connection` value names (but `host`, `content-length` and `te`) and `te`
/// unless it offers `trailers` (then kept as exactly `te: trailers`).
pub use legate_abi_rules::headers::HOP_BY_HOP;
use legate_abi_rules::headers::{is_tchar, list_items, offers_trailers, NOT_NOMINATABLE};
use legate_abi_rules::limits::MIN_TICK_MS;

/// A callout result as the host delivers it: a response whose body is over
/// [`CALLOUT_MAX_RESPONSE`] is `Err(LimitExceeded)` (host/src/proxy.rs
/// `callout` reads the body under that cap), and the head of one delivered
/// loses its hop-by-hop fields ([`strip_hop_by_hop`]), as the host strips them
/// (`callout`, `proxy_headers::strip_hop_by_hop`).
fn as_received(r: Result<CalloutResponse, Error>) -> Result<CalloutResponse, Error> {
    match r {
        Ok(resp) if resp.body.len() > CALLOUT_MAX_RESPONSE => Err(Error::LimitExceeded),
        Ok(mut resp) => {
            strip_hop_by_hop(&mut resp.headers);
            Ok(resp)
        }
        r => r,
    }
}

/// Removes hop-by-hop fields as the host does (host/src/proxy_headers.rs
/// `strip_hop_by_hop`): every field [`HOP_BY_HOP`] lists and every field a
/// `connection` value names (but `host`, `content-length` and `te`); `te` is
/// kept as exactly `te: trailers` (one field, where the first was) if one of
/// its values offers `trailers`, else removed. Names compare
/// case-insensitively.
fn strip_hop_by_hop(headers: &mut Vec<(String, Vec<u8>)>) {
    let nominated: Vec<String> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| list_items(v))
        .filter_map(|t| std::str::from_utf8(t).ok())
        .filter(|t| !t.is_empty() && t.bytes().all(is_tchar))
        .map(str::to_ascii_lowercase)
        .filter(|t| !NOT_NOMINATABLE.contains(&t.as_str()))
        .collect();
    let offers_trailers = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("te"))
        .any(|(_, v)| offers_trailers(v));
    let mut te_kept = false;
    headers.retain_mut(|(n, v)| {
        let name = n.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&name.as_str()) || nominated.contains(&name) {
            return false;
        }
        if name != "te" {
            return true;
        }
        if !offers_trailers || te_kept {
            return false;
        }
        te_kept = true;
        *v = b"trailers".to_vec();
        true
    });
}

/// `bytes` if it is a `limits.body` the host's configuration takes
/// ([`crate::rules::limits::BODY_LIMIT`]); shared by the `body_limit` setters of
/// [`FilterTest`] and [`NetworkFilterTest`] (`who`).
///
/// # Panics
///
/// Outside 1 KiB..=64 MiB.
#[track_caller]
fn checked_body_limit(who: &str, bytes: usize) -> usize {
    assert!(
        crate::rules::limits::BODY_LIMIT.contains(&bytes),
        "{who}::body_limit({bytes}): the host takes `limits.body` between \
         `1KiB` and `64MiB` only"
    );
    bytes
}

/// Why the host fails a call that returned `pause` with no callout or KV call
/// of its exchange outstanding (host/src/wasm/plugin.rs `verdict`).
const PAUSE_WITHOUT_CALL: &str = "returned `pause` with no outstanding callout";

/// The fake host: capabilities, clock, logs, metrics, KV and callouts. Cheap to
/// clone (shared); several [`FilterTest`]s made from one `TestHost` share KV
/// and metrics like instances of one plugin do, and, like them, each has its
/// own outstanding callouts and KV calls (their context ids may be the same:
/// a reply goes only to the instance and exchange that made the call).
#[derive(Clone)]
pub struct TestHost {
    host: Host,
}

impl Default for TestHost {
    fn default() -> Self {
        TestHost::new()
    }
}

/// A callout the filter sent, as recorded by the [`TestHost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentCallout {
    /// The id `send` returned.
    pub id: CalloutId,
    /// The exchange's context id; `None` if sent from `on_tick`.
    pub context: Option<u64>,
    /// What was sent.
    pub request: CalloutRequest,
    /// Whether it is still outstanding (neither delivered nor cancelled).
    pub outstanding: bool,
    /// Whether the filter cancelled it.
    pub cancelled: bool,
}

impl TestHost {
    /// A host with nothing granted, plugin name `test`, instance 0, the clock at
    /// 2026-01-01T00:00:00Z and every log level enabled.
    pub fn new() -> Self {
        TestHost {
            host: Rc::new(RefCell::new(HostState::new())),
        }
    }

    /// Set the plugin name `plugin::name()` returns.
    pub fn plugin_name(self, name: &str) -> Self {
        self.host.borrow_mut().plugin_name = name.to_owned();
        self
    }

    /// A host for another plugin, `name`, on the same proxy as this one: it
    /// shares only the proxy's metric families (each `legate_plugin_<name>`
    /// has one kind and, for a histogram, one bucket layout), nothing else.
    /// A metric this plugin defined with another kind or other buckets (no
    /// buckets: [`HOST_BUCKETS`]) is `Err(Error::InvalidArgument)` there, as
    /// on the host (abi/README.md §5.6). `name` the same as this plugin's is
    /// the plugin loaded again: its previous version's definitions hold the
    /// families the same way.
    pub fn another_plugin(&self, name: &str) -> TestHost {
        let families = self.host.borrow().families.clone();
        let other = TestHost::new().plugin_name(name);
        other.host.borrow_mut().families = families;
        other
    }

    /// Set the instance index `plugin::instance_index()` returns.
    pub fn instance_index(self, index: u32) -> Self {
        self.host.borrow_mut().instance_index = index;
        self
    }

    /// Grant data file `name` with `contents` (`plugin::file(name)`), as
    /// `files: {NAME: PATH}` does in the host configuration.
    pub fn file(self, name: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.host
            .borrow_mut()
            .files
            .insert(name.to_owned(), contents.into());
        self
    }

    /// Grant (and configure) KV namespace `name`; others are `Denied`.
    pub fn grant_kv(self, name: &str) -> Self {
        self.host.borrow_mut().granted_kv.insert(name.to_owned());
        self
    }

    /// What [`Namespace::backend`](crate::kv::Namespace::backend) reports
    /// (default [`Backend::Memory`]); the store stays this fake's.
    pub fn kv_backend(self, backend: Backend) -> Self {
        self.host.borrow_mut().kv_backend = backend;
        self
    }

    /// From now on every KV call (synchronous, or an asynchronous one when
    /// delivered) fails with `Unavailable`, as with the backend down; `false`
    /// brings it back.
    pub fn kv_unavailable(&self, down: bool) -> &Self {
        self.host.borrow_mut().kv_down = down;
        self
    }

    /// Grant cluster `name` for callouts; others are `Denied`.
    pub fn grant_cluster(self, name: &str) -> Self {
        self.host
            .borrow_mut()
            .granted_clusters
            .insert(name.to_owned());
        self
    }

    /// Write only messages at `level` or above (and make `log::enabled` say so).
    pub fn log_level(self, level: Level) -> Self {
        self.host.borrow_mut().log_level = level;
        self
    }

    /// Configure filter `F` on this host with the JSON `config` (`"null"`: no
    /// config). `Err` is the message `configure` would return to the host, or
    /// the host's own refusal of the setup (a tick interval of 1 to 9 ms).
    pub fn configure<F: HttpFilter>(&self, config: &str) -> Result<FilterTest<F>, String> {
        let id = self.new_instance();
        let instance = self.loading(|| {
            let instance = {
                let _g = install(&self.host, id, Call::Configure);
                Instance::<F>::configure(config)?
            };
            self.check_tick(instance.setup().tick_interval_ms())?;
            Ok(instance)
        })?;
        Ok(FilterTest {
            host: self.clone(),
            instance,
            id,
            next_context: 1,
            fail_open: false,
            body_limit: DEFAULT_BODY_LIMIT,
        })
    }

    /// Configure network filter `F` on this host with the JSON `config`.
    /// `Err` is the message `configure` would return to the host, or the
    /// host's own refusal of the setup (a tick interval of 1 to 9 ms).
    pub fn configure_network<F: NetworkFilter>(
        &self,
        config: &str,
    ) -> Result<NetworkFilterTest<F>, String> {
        let id = self.new_instance();
        let instance = self.loading(|| {
            let instance = {
                let _g = install(&self.host, id, Call::Configure);
                NetworkInstance::<F>::configure(config)?
            };
            self.check_tick(instance.setup().tick_interval_ms())?;
            Ok(instance)
        })?;
        Ok(NetworkFilterTest {
            host: self.clone(),
            instance,
            id,
            // Apart from exchange ids, so HTTP and network filters can share
            // one host.
            next_context: 1 << 32,
            fail_open: false,
            body_limit: DEFAULT_BODY_LIMIT,
        })
    }

    /// Runs `load` (a `configure` and the host's checks of its setup); if it
    /// fails, the proxy's metric families it made are taken back, as the host
    /// rolls back a load that fails (host/src/stats.rs `roll_back`), so
    /// another plugin may define those names its own way.
    fn loading<T>(&self, load: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
        let families = self.host.borrow().families.clone();
        let before: Vec<String> = families.borrow().keys().cloned().collect();
        let loaded = load();
        if loaded.is_err() {
            families
                .borrow_mut()
                .retain(|name, _| before.contains(name));
        }
        loaded
    }

    /// The host's check of the setup's tick interval (host/src/wasm/plugin.rs,
    /// abi/README.md §2): 1..=9 ms rejects the load.
    fn check_tick(&self, ms: u32) -> Result<(), String> {
        if ms == 0 || ms >= MIN_TICK_MS {
            return Ok(());
        }
        Err(format!(
            "plugin `{}`: tick-interval-ms {ms} is below the minimum of {MIN_TICK_MS} ms; \
             ask for 0 (no ticks) or at least {MIN_TICK_MS}",
            self.host.borrow().plugin_name
        ))
    }

    /// A new instance id (each configured filter is one instance).
    fn new_instance(&self) -> u64 {
        let mut h = self.host.borrow_mut();
        h.instances += 1;
        h.instances
    }

    /// Set the wall clock (Unix nanoseconds).
    pub fn set_wall_time(&self, unix_nanos: u64) {
        self.host.borrow_mut().wall_ns = unix_nanos;
    }

    /// Move both clocks forward; KV entries expire against the monotonic one.
    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let mut h = self.host.borrow_mut();
        h.wall_ns = h.wall_ns.saturating_add(ns);
        h.mono_ns = h.mono_ns.saturating_add(ns);
    }

    /// Every message logged so far, in order, as the host writes it
    /// (host/src/wasm/stdio.rs `one_line`): one line, control characters but
    /// tabs escaped (`\n`, `\r`, `\u{1b}`), cut after escaping at 4 KiB (at a
    /// character boundary) with `…[truncated]`.
    pub fn logs(&self) -> Vec<(Level, String)> {
        self.host.borrow().logs.clone()
    }

    /// Whether some logged message at `level` contains `needle` (as written:
    /// see [`TestHost::logs`]).
    pub fn logged(&self, level: Level, needle: &str) -> bool {
        self.host
            .borrow()
            .logs
            .iter()
            .any(|(l, m)| *l == level && m.contains(needle))
    }

    fn series(&self, name: &str, labels: &[&str]) -> Option<SeriesValue> {
        let h = self.host.borrow();
        let key: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        h.metrics.get(name)?.series.get(&key).cloned()
    }

    /// Whether metric `name` was defined.
    pub fn metric_defined(&self, name: &str) -> bool {
        self.host.borrow().metrics.contains_key(name)
    }

    /// The value of counter `name` for label values `labels` (in definition
    /// order; `&[]` for an unlabelled counter); `None` if that series does not
    /// exist. A series exists when the host makes it: an unlabelled metric's
    /// at `define`, a labelled one's at `with_labels` (the one it names), and
    /// a labelled metric's all-empty one (what the `define` handle records
    /// into) only once recorded into, as the host shows it in `/stats`.
    pub fn counter(&self, name: &str, labels: &[&str]) -> Option<u64> {
        match self.series(name, labels)? {
            SeriesValue::Counter(v) => Some(v),
            _ => None,
        }
    }

    /// The value of gauge `name` for `labels`; `None` as for [`TestHost::counter`].
    pub fn gauge(&self, name: &str, labels: &[&str]) -> Option<i64> {
        match self.series(name, labels)? {
            SeriesValue::Gauge(v) => Some(v),
            _ => None,
        }
    }

    /// Every observation of histogram `name` for `labels`, in order.
    pub fn histogram(&self, name: &str, labels: &[&str]) -> Option<Vec<f64>> {
        match self.series(name, labels)? {
            SeriesValue::Histogram(v) => Some(v),
            _ => None,
        }
    }

    /// Read a KV entry directly (expired entries are absent).
    pub fn kv_get(&self, namespace: &str, key: &str) -> Option<Entry> {
        let h = self.host.borrow();
        let v = h.kv.get(namespace)?.get(key)?;
        if v.expires_at.is_some_and(|t| t <= h.mono_ns) {
            return None;
        }
        Some(Entry {
            value: v.value.clone(),
            version: v.version,
        })
    }

    /// Another worker wins the next compare-and-swap races on `key`: each of
    /// the plugin's next conditional writes (`if-absent`, `if-version`) to it
    /// first sees another writer store the next of `values` (a new version,
    /// no expiry), so it fails with `cas-mismatch` and a re-read sees that
    /// value. For testing a plugin's CAS retry loop.
    pub fn kv_race(&self, namespace: &str, key: &str, values: &[&[u8]]) {
        self.host
            .borrow_mut()
            .kv_races
            .entry((namespace.to_owned(), key.to_owned()))
            .or_default()
            .extend(values.iter().map(|v| v.to_vec()));
    }

    /// Seed a KV entry (as another plugin would); returns its version.
    pub fn kv_put(&self, namespace: &str, key: &str, value: &[u8]) -> u64 {
        let mut h = self.host.borrow_mut();
        h.kv_version += 1;
        let version = h.kv_version;
        h.kv.entry(namespace.to_owned()).or_default().insert(
            key.to_owned(),
            crate::backend::KvValue {
                value: value.to_vec(),
                version,
                expires_at: None,
            },
        );
        version
    }

    /// Every callout sent so far, in order.
    pub fn callouts(&self) -> Vec<SentCallout> {
        self.host
            .borrow()
            .callouts
            .iter()
            .filter_map(|c| match &c.what {
                Sent::Http(request) => Some(SentCallout {
                    id: c.id,
                    context: c.context,
                    request: request.clone(),
                    outstanding: c.state == CalloutState::Outstanding,
                    cancelled: c.state == CalloutState::Cancelled,
                }),
                Sent::Kv { .. } => None,
            })
            .collect()
    }

    /// Queue the response the next callout to `cluster` gets when delivered
    /// ([`TestExchange::deliver_callouts`], [`FilterTest::deliver_tick_callouts`]).
    /// As from the host, a response whose body is over
    /// [`CALLOUT_MAX_RESPONSE`] reaches the filter as `Err(LimitExceeded)`
    /// (so does one given to a `deliver_callout`).
    pub fn queue_callout_response(&self, cluster: &str, response: Result<CalloutResponse, Error>) {
        self.host
            .borrow_mut()
            .queued
            .entry(cluster.to_owned())
            .or_default()
            .push_back(response);
    }

    /// Mark `id` delivered if it is an outstanding call of `context` in
    /// `instance`, an asynchronous KV call if `kv`, else a callout; whether it
    /// was.
    fn take_outstanding(
        &self,
        instance: u64,
        context: Option<u64>,
        id: CalloutId,
        kv: bool,
    ) -> bool {
        let mut h = self.host.borrow_mut();
        match h.callouts.iter_mut().find(|c| {
            c.id == id
                && c.outstanding_in(instance, context)
                && matches!(c.what, Sent::Kv { .. }) == kv
        }) {
            Some(c) => {
                c.state = CalloutState::Delivered;
                true
            }
            None => false,
        }
    }

    /// The outstanding callouts of `context` in `instance`, in send order:
    /// (id, cluster).
    fn pending_callouts(&self, instance: u64, context: Option<u64>) -> Vec<(CalloutId, String)> {
        self.host
            .borrow()
            .callouts
            .iter()
            .filter(|c| c.outstanding_in(instance, context))
            .filter_map(|c| match &c.what {
                Sent::Http(r) => Some((c.id, r.cluster.clone())),
                Sent::Kv { .. } => None,
            })
            .collect()
    }

    /// The next queued response for `cluster`, popped.
    fn pop_queued(&self, cluster: &str) -> Option<Result<CalloutResponse, Error>> {
        self.host
            .borrow_mut()
            .queued
            .get_mut(cluster)
            .and_then(VecDeque::pop_front)
    }

    /// Outstanding callouts of `context` in `instance` that have a queued
    /// response, popped.
    fn ready_callouts(
        &self,
        instance: u64,
        context: Option<u64>,
    ) -> Vec<(CalloutId, Result<CalloutResponse, Error>)> {
        self.pending_callouts(instance, context)
            .into_iter()
            .filter_map(|(id, cluster)| Some((id, self.pop_queued(&cluster)?)))
            .collect()
    }

    /// The outstanding asynchronous KV calls of `context` in `instance`, in
    /// start order: (id, namespace, key, operation).
    fn kv_outstanding(&self, instance: u64, context: u64) -> Vec<(CallId, String, String, Op)> {
        self.host
            .borrow()
            .callouts
            .iter()
            .filter(|c| c.outstanding_in(instance, Some(context)))
            .filter_map(|c| match &c.what {
                Sent::Kv { namespace, key, op } => {
                    Some((c.id, namespace.clone(), key.clone(), op.clone()))
                }
                Sent::Http(_) => None,
            })
            .collect()
    }

    /// How many callouts and KV calls of `context` in `instance` are outstanding.
    fn outstanding(&self, instance: u64, context: Option<u64>) -> usize {
        self.host
            .borrow()
            .callouts
            .iter()
            .filter(|c| c.outstanding_in(instance, context))
            .count()
    }
}

/// One configured filter instance on a [`TestHost`].
pub struct FilterTest<F: HttpFilter> {
    host: TestHost,
    instance: Instance<F>,
    /// This instance's id on the host.
    id: u64,
    next_context: u64,
    /// The plugin's failure policy is `fail: open`.
    fail_open: bool,
    /// The plugin's `limits.body`: the most a body buffer may hold.
    body_limit: usize,
}

impl<F: HttpFilter> FilterTest<F> {
    /// Configure `F` with JSON `config` on a fresh [`TestHost`] with nothing
    /// granted. `Err` is the message `configure` returns to the host.
    pub fn configure(config: &str) -> Result<Self, String> {
        TestHost::new().configure(config)
    }

    /// The host this filter runs on.
    pub fn host(&self) -> &TestHost {
        &self.host
    }

    /// Set the plugin's failure policy, as `fail:` in the host configuration
    /// (host/src/filter.rs `failure`): `false` (the default, `fail: closed`)
    /// ends an exchange whose filter failed with the host's `503`
    /// ([`Outcome::Failed`]); `true` (`fail: open`) skips the filter for the
    /// rest of the exchange, which goes on without it: [`TestExchange::run`]
    /// carries on to the upstream's response and returns what the rest of
    /// the exchange ends with (see [`TestExchange::failure`]).
    pub fn fail_open(mut self, open: bool) -> Self {
        self.fail_open = open;
        self
    }

    /// Set the plugin's `limits.body` (default [`DEFAULT_BODY_LIMIT`], 1 MiB):
    /// as on the host (host/src/wasm/host.rs `splice_buffer`, abi/README.md
    /// §4, §5.2), a `Body::replace`, `splice` or `append` that would leave a
    /// body buffer longer than this fails with `Error::LimitExceeded` (the
    /// buffer is left as it was).
    ///
    /// # Panics
    ///
    /// Outside 1 KiB..=64 MiB, which the host's configuration refuses.
    #[track_caller]
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = checked_body_limit("FilterTest", bytes);
        self
    }

    /// The effective setup (including `done` for a stateful context).
    pub fn setup(&self) -> Setup {
        self.instance.setup()
    }

    /// The filter value.
    pub fn filter(&self) -> &F {
        self.instance.filter()
    }

    /// How many exchange contexts the SDK keeps alive.
    pub fn live_contexts(&self) -> usize {
        self.instance.live_contexts()
    }

    /// The request headers this instance's `configure` declared with
    /// [`sanitize_request_headers`](crate::sanitize_request_headers),
    /// lowercase, in order.
    pub fn sanitized_request_headers(&self) -> Vec<String> {
        let h = self.host.host.borrow();
        h.sanitized.get(&self.id).cloned().unwrap_or_default()
    }

    /// Start an exchange for `request`; drive it with the returned handle.
    /// As the host, the headers the filter declared with
    /// [`sanitize_request_headers`](crate::sanitize_request_headers) are
    /// removed from `request` first.
    pub fn exchange(&mut self, mut request: Request) -> TestExchange<'_, F> {
        let sanitized = self.sanitized_request_headers();
        if !sanitized.is_empty() {
            request
                .headers
                .retain(|(n, _)| !sanitized.iter().any(|s| s.eq_ignore_ascii_case(n)));
        }
        let context = self.next_context;
        self.next_context += 1;
        let setup = self.instance.setup();
        // As the host (host/src/local_reply.rs `is_grpc`): by the request's
        // content type as it arrived, before any filter.
        let grpc = request
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            .and_then(|(_, v)| v.strip_prefix(b"application/grpc"))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"+"));
        let start_time = self.host.host.borrow().wall_ns;
        let state = ExchangeState {
            method: request.method,
            path: request.path,
            scheme: request.scheme,
            authority: request.authority,
            version: request.version,
            status: None,
            heads: [Some(request.headers), None],
            bodies: [None, None],
            trailers: [None, None],
            source: request.source,
            destination: request.destination,
            tls_version: request.tls_version,
            tls_sni: request.tls_sni,
            tls_peer_subject: request.tls_peer_subject,
            route_name: request.route_name,
            cluster: request.cluster,
            upstream_address: None,
            request_id: format!("test-{context}"),
            start_time,
            cause: None,
            window: Vec::new(),
            body_modes: [
                setup.body_mode(Direction::Request),
                setup.body_mode(Direction::Response),
            ],
            body_declared: [
                setup.declares(Phase::RequestBody),
                setup.declares(Phase::ResponseBody),
            ],
            body_started: [false, false],
            detached: false,
            body_limit: self.body_limit,
        };
        TestExchange {
            test: self,
            context,
            grpc,
            over_body_limit: None,
            ex: Rc::new(RefCell::new(state)),
            pending_body: [request.body, Vec::new()],
            pending_trailers: [request.trailers, None],
            paused_window: Vec::new(),
            paused: false,
            held_trailers: None,
            failure: None,
            started: false,
            logged: false,
            ended: false,
            stages: [Stage::Start; 2],
            arrived: VecDeque::new(),
            request_cut: false,
            responded: false,
            passed: [None, None],
            body_call: None,
            streamed: [0; 2],
            length_mismatch: None,
        }
    }

    /// Call `on_tick`, as the host does every declared tick interval.
    ///
    /// # Panics
    ///
    /// If the filter declared no tick interval (`Setup::tick_every_ms`,
    /// or 0): the host never calls `on_tick` then, so a test that ticks it
    /// would test a call that cannot happen.
    #[track_caller]
    pub fn tick(&mut self) {
        if self.instance.setup().tick_interval_ms() == 0 {
            panic!(
                "FilterTest::tick called, but the filter declared no tick interval \
                 (Setup::tick_every_ms): the host never calls `on_tick` then; declare \
                 one in `setup`, or do not tick"
            );
        }
        let _g = install(&self.host.host, self.id, Call::Tick);
        self.instance.tick();
    }

    /// Deliver queued responses to outstanding callouts sent from `on_tick`;
    /// returns how many were delivered.
    pub fn deliver_tick_callouts(&mut self) -> usize {
        let ready = self.host.ready_callouts(self.id, None);
        let n = ready.len();
        for (id, r) in ready {
            self.host.take_outstanding(self.id, None, id, false);
            let _g = install(&self.host.host, self.id, Call::Tick);
            self.instance.tick_callout_response(id, as_received(r));
        }
        n
    }
}

/// A request to start a [`TestExchange`] with.
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    path: String,
    scheme: String,
    authority: String,
    version: HttpVersion,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    trailers: Option<Vec<(String, Vec<u8>)>>,
    source: SocketAddr,
    destination: SocketAddr,
    tls_version: Option<TlsVersion>,
    tls_sni: Option<String>,
    tls_peer_subject: Option<String>,
    route_name: Option<String>,
    cluster: Option<String>,
}

impl Request {
    /// `method path` over plain HTTP/1.1 to authority `example.com`, from
    /// 192.0.2.1:50000 to 192.0.2.2:8080, routed to route `default` and cluster
    /// `upstream`, for authority `example.com`. As on the host, the client's
    /// `host` field is the authority, not a header filters see.
    pub fn new(method: &str, path: &str) -> Self {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            scheme: "http".to_owned(),
            authority: "example.com".to_owned(),
            version: HttpVersion::Http11,
            headers: Vec::new(),
            body: Vec::new(),
            trailers: None,
            source: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 50000),
            destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 8080),
            tls_version: None,
            tls_sni: None,
            tls_peer_subject: None,
            route_name: Some("default".to_owned()),
            cluster: Some("upstream".to_owned()),
        }
    }
    /// A `GET` request.
    pub fn get(path: &str) -> Self {
        Request::new("GET", path)
    }
    /// A `POST` request with `body`.
    pub fn post(path: &str, body: impl Into<Vec<u8>>) -> Self {
        Request::new("POST", path).body(body)
    }
    /// Add a header. `host` sets the authority instead (the host hides the
    /// client's `host` from filters: it is the authority).
    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        let name = name.to_ascii_lowercase();
        let value = value.into();
        if name == "host" {
            self.authority = String::from_utf8_lossy(&value).into_owned();
            return self;
        }
        self.headers.push((name, value));
        self
    }
    /// Set the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
    /// Add a trailer.
    pub fn trailer(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.trailers
            .get_or_insert_with(Vec::new)
            .push((name.to_ascii_lowercase(), value.into()));
        self
    }
    /// Set the authority (`:authority`, or the client's `host`).
    pub fn authority(mut self, authority: &str) -> Self {
        self.authority = authority.to_owned();
        self
    }
    /// Set the HTTP version.
    pub fn version(mut self, version: HttpVersion) -> Self {
        self.version = version;
        self
    }
    /// Set the client address.
    pub fn source(mut self, addr: SocketAddr) -> Self {
        self.source = addr;
        self
    }
    /// Make the connection TLS 1.3 with `sni`, and `https`.
    pub fn tls(mut self, sni: &str) -> Self {
        self.scheme = "https".to_owned();
        self.tls_version = Some(TlsVersion::Tls13);
        self.tls_sni = Some(sni.to_owned());
        self
    }
    /// A verified client certificate with `subject`.
    pub fn client_cert(mut self, subject: &str) -> Self {
        self.tls_peer_subject = Some(subject.to_owned());
        self
    }
    /// Set the selected route (`None`: no route matches).
    pub fn route(mut self, name: Option<&str>) -> Self {
        self.route_name = name.map(str::to_owned);
        self
    }
    /// Set the upstream cluster (`None`: a direct response).
    pub fn cluster(mut self, name: Option<&str>) -> Self {
        self.cluster = name.map(str::to_owned);
        self
    }
}

/// An upstream response to feed a [`TestExchange`].
#[derive(Debug, Clone)]
pub struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    trailers: Option<Vec<(String, Vec<u8>)>>,
}

impl Response {
    /// A response with `status`, no headers and no body.
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            trailers: None,
        }
    }
    /// Add a header.
    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }
    /// Set the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
    /// Add a trailer.
    pub fn trailer(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.trailers
            .get_or_insert_with(Vec::new)
            .push((name.to_ascii_lowercase(), value.into()));
        self
    }
}

/// What [`TestExchange::run`] ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every declared phase returned `Continue`; inspect the exchange for the
    /// modified request and response.
    Completed,
    /// A phase answered locally.
    Responded(Phase, crate::LocalResponse),
    /// A phase paused with a callout or KV call of the exchange outstanding
    /// (deliver them, then drive the rest by hand).
    Paused(Phase),
    /// A phase's call failed as the host would fail it (abi/README.md §3.3,
    /// §8, §9): it returned a local response the host refuses (a status
    /// outside 200..=599, a header name that is not a token, a value with a
    /// control byte other than HTAB or DEL, over 1024 fields or a value over
    /// 64 KiB), or `Pause` with no callout or KV call of the exchange
    /// outstanding (nothing could resume it).
    /// The host applies the plugin's failure policy (`fail: closed`: a `503`)
    /// and makes no more calls into the filter for the exchange but `on_done`;
    /// so does the harness. The `String` is the host's reason. Only with
    /// `fail: closed` (the default): with [`FilterTest::fail_open`] the host
    /// skips the filter and the exchange goes on, so `run` does too (and
    /// [`TestExchange::failure`] gives the reason).
    Failed(Phase, String),
    /// The body of the phase's direction, buffered for the filter, was over
    /// its `limits.body` ([`FilterTest::body_limit`]): the host answered
    /// with this status (`413` to a request body, `502` to a response
    /// body; cause `plugin_buffer_limit`) without calling the body phase
    /// (abi/README.md §4; host/src/proxy.rs `run_body`), then `on_log` and
    /// `on_done`. See [`TestExchange::over_body_limit`].
    OverBodyLimit(Phase, u16),
    /// A `streamed` body phase's rewrite broke the `content-length` the
    /// direction's head went on with (more data than it says, or less at
    /// the end of the stream) and the filter did not remove it in its
    /// headers phase (abi/README.md §4, "Rewriting a streamed body"): the
    /// host ended the exchange as the filter's failure (a request with
    /// `503 plugin_failure`, the upstream request reset; a response, whose
    /// head is out, with a reset stream), counted in the plugin's
    /// `legate_plugin_failures_total`; then `on_log` and `on_done`. The
    /// `String` is the host's reason. See
    /// [`TestExchange::length_mismatch`].
    LengthMismatch(Phase, String),
}

/// One exchange of a [`FilterTest`], driven phase by phase.
pub struct TestExchange<'t, F: HttpFilter> {
    test: &'t mut FilterTest<F>,
    context: u64,
    ex: Ex,
    pending_body: [Vec<u8>; 2],
    pending_trailers: [Option<FieldList>; 2],
    /// The write window of the call the exchange is paused in (empty when
    /// not paused).
    paused_window: Vec<Part>,
    /// The filter paused the exchange (a `Pause` the host takes: a callout
    /// or KV call of the exchange outstanding) and no reply ended it yet.
    paused: bool,
    /// The direction whose trailers a paused end-of-stream body call holds (on
    /// the exchange, writable, until the pause ends).
    held_trailers: Option<Direction>,
    /// Why the host would have failed a call of this exchange.
    failure: Option<String>,
    /// A phase method (or `run`) was called.
    started: bool,
    /// `log` was called: the exchange is over but for `on_done`.
    logged: bool,
    /// `done` was called: the exchange is over.
    ended: bool,
    /// How far each direction's phases got (`[request, response]`): the
    /// host calls them once each, in order.
    stages: [Stage; 2],
    /// Callout and asynchronous KV replies that came while the exchange was
    /// not paused, by call id, in arrival order: the host delivers them when
    /// the exchange next waits on a pause or reaches its response phase
    /// (abi/README.md §5.8, §5.7). Their calls stay outstanding until then.
    arrived: VecDeque<(u64, Arrived)>,
    /// The upstream answered while a streamed request part was held by a
    /// pause: the host abandoned the hold and reads no more of the request.
    request_cut: bool,
    /// The filter answered with a local response the host applied (the
    /// verdict of a phase, or of a reply while paused): the response enters
    /// the response path right after it, so it never sees it, and the rest
    /// of the message it answered is not read (abi/README.md §3.2, §3.5;
    /// host/src/filter.rs `responded`, `replaced_response`, `in_response`):
    /// no more phase calls, only `on_log` and `on_done`.
    responded: bool,
    /// Each direction's body data as its last body call left it, once it
    /// went on or the exchange was logged: the host takes it off the
    /// exchange then (host/src/filter.rs `chunk_part`, `end_body`), so
    /// `Exchange::body` no longer reaches it; kept here for [`request_body_bytes`](Self::request_body_bytes) and
    /// [`response_body_bytes`](Self::response_body_bytes).
    passed: [Option<Vec<u8>>; 2],
    /// A gRPC request (`content-type` `application/grpc` or
    /// `application/grpc+…` as it arrived): the host answers it locally in
    /// gRPC's trailers-only form (abi/README.md §3.5).
    grpc: bool,
    /// The host ended the exchange because a buffered body of this
    /// direction was over `limits.body` (see
    /// [`over_body_limit`](Self::over_body_limit)).
    over_body_limit: Option<Direction>,
    /// The body call in progress (through a pause), for what the host does
    /// with its data once it goes on ([`finish_body_call`](Self::finish_body_call)).
    body_call: Option<BodyCall>,
    /// Per direction: the data bytes of a `streamed` body passed on so far.
    streamed: [u64; 2],
    /// The direction whose `streamed` body broke its head's
    /// `content-length`, and the host's reason (see
    /// [`length_mismatch`](Self::length_mismatch)).
    length_mismatch: Option<(Direction, String)>,
}

/// A body call of a [`TestExchange`] in progress.
#[derive(Clone, Copy)]
struct BodyCall {
    d: Direction,
    mode: BodyMode,
    end_of_stream: bool,
    /// The message came without a body (nor trailers).
    bodyless: bool,
}

/// A local response to a gRPC request as the host sends it, in gRPC's
/// trailers-only form (host/src/local_reply.rs `grpc_form`, abi/README.md
/// §3.5): status `200`, `content-type: application/grpc`, a `grpc-status`
/// (the response's own, else mapped from its status), the body less a final
/// newline as a percent-encoded `grpc-message`, no body and no
/// `content-length`.
fn grpc_form(lr: &crate::LocalResponse) -> (u16, FieldList) {
    let mut h: FieldList = lr
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
        .filter(|(n, _)| {
            !matches!(
                n.as_str(),
                "content-length" | "transfer-encoding" | "content-type"
            )
        })
        .collect();
    if !h.iter().any(|(n, _)| n == "grpc-status") {
        let code = legate_abi_rules::grpc::status_of_http(lr.status);
        h.push(("grpc-status".to_owned(), code.to_string().into_bytes()));
    }
    let text = lr.body.strip_suffix(b"\n").unwrap_or(&lr.body);
    if !text.is_empty() {
        let m = legate_abi_rules::grpc::percent_encode(text);
        h.retain(|(n, _)| n != "grpc-message");
        h.push(("grpc-message".to_owned(), m.into_bytes()));
    }
    h.push(("content-type".to_owned(), b"application/grpc".to_vec()));
    (200, h)
}

/// A local response's header fields as the host puts them in the response
/// head to a request that is not gRPC (host/src/local_reply.rs
/// `LocalResponse::for_client`): `content-type: text/plain` for a body the
/// filter gave no type (a client must not sniff one). The host adds
/// `content-length` as it sends the head, after `on_log`'s view of it was
/// taken.
fn http_form(lr: &crate::LocalResponse) -> FieldList {
    let mut h: FieldList = lr
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
        .collect();
    if !lr.body.is_empty() && !h.iter().any(|(n, _)| n == "content-type") {
        h.push(("content-type".to_owned(), b"text/plain".to_vec()));
    }
    h
}

/// A reply that came for a call of a [`TestExchange`], not delivered yet.
enum Arrived {
    /// To `on_callout_response`.
    Callout(Result<CalloutResponse, Error>),
    /// To `on_kv_response`.
    Kv(Result<KvReply, Error>),
}

/// How far a direction of a [`TestExchange`] got, by the phase methods
/// called for it (whether or not the phase is declared).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Nothing yet.
    Start,
    /// The headers phase.
    Headers,
    /// Body chunks, not the last (`end_of_stream = false`).
    Body,
    /// The last body call (`end_of_stream = true`, or the whole body).
    BodyEnd,
    /// The trailers phase.
    Trailers,
}

impl Stage {
    /// The order of the stages.
    fn rank(self) -> u8 {
        match self {
            Stage::Start => 0,
            Stage::Headers => 1,
            Stage::Body => 2,
            Stage::BodyEnd => 3,
            Stage::Trailers => 4,
        }
    }
}

/// A phase method of a [`TestExchange`], for [`TestExchange::step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Headers,
    Body { eos: bool },
    Trailers,
}

impl<F: HttpFilter> TestExchange<'_, F> {
    /// The exchange's context id.
    pub fn context(&self) -> u64 {
        self.context
    }

    /// Whether the host still calls into this exchange's context: the filter
    /// neither detached nor failed (after a failure only `on_done` is called)
    /// and the exchange is not over (logged or done).
    fn live(&self) -> bool {
        !self.detached() && self.failure.is_none() && !self.logged && !self.ended
    }

    /// Before a phase call (`what`): the host never calls a phase of an
    /// exchange it logged or ended, so neither does the harness (that would
    /// repeat `on_log` or `on_done`, or start a new context): a test bug,
    /// reported by a panic at the caller.
    #[track_caller]
    fn enter(&mut self, what: &str) {
        let after = if self.ended {
            "done"
        } else if self.logged {
            "log"
        } else {
            self.started = true;
            return;
        };
        panic!(
            "TestExchange::{what} called after `{after}`: the host makes no call into an \
             exchange it logged or ended; start another with FilterTest::exchange"
        );
    }

    /// Before phase method `what` (`step` of direction `d`): the host calls
    /// each phase of an exchange once, in order (abi/README.md §3): request
    /// headers first; then, per direction, headers, body (chunks up to the
    /// one with `end_of_stream`), trailers (request body and trailers calls
    /// may interleave with the response's on full-duplex exchanges); and
    /// none while the exchange is paused (the host reads nothing of it until
    /// the pause ends). A test that asks for a phase again, or for one the
    /// exchange is already past, would see the filter called in a way the
    /// host never calls it: a test bug, reported by a panic at the caller.
    /// A test may leave phases out (those of its filter's undeclared phases,
    /// typically): the exchange is then past them.
    #[track_caller]
    fn step(&mut self, what: &str, d: Direction, step: Step) {
        let dir = match d {
            Direction::Request => "request",
            Direction::Response => "response",
        };
        let stage = self.stages[idx(d)];
        let refused = if d == Direction::Request && self.request_cut {
            Some(
                "after the upstream answered while the request was held by a pause: the host \
                 abandoned the hold and reads no more of the request"
                    .to_owned(),
            )
        } else if self.paused {
            Some(
                "while the exchange is paused: the host calls no phase until the pause ends \
                 (deliver the replies it waits for first)"
                    .to_owned(),
            )
        } else if step == Step::Headers && d == Direction::Request && self.stages[1] != Stage::Start
        {
            Some(
                "after a response phase: the request headers phase precedes every other phase"
                    .to_owned(),
            )
        } else {
            match (step, stage) {
                (Step::Headers, Stage::Start) => None,
                (Step::Headers, Stage::Headers) => Some(format!(
                    "twice: the host calls the {dir} headers phase once per exchange"
                )),
                (Step::Headers, _) => Some(format!("after the {dir} body or trailers")),
                (Step::Body { .. }, Stage::Start | Stage::Headers | Stage::Body) => None,
                (Step::Body { .. }, Stage::BodyEnd) => Some(format!(
                    "after the {dir} body ended (a body call with end of stream, or \
                     {dir}_body): the host makes no body call after the last one"
                )),
                (Step::Body { .. }, Stage::Trailers) => Some(format!("after {dir}_trailers")),
                (Step::Trailers, Stage::Trailers) => Some(format!(
                    "twice: the host calls the {dir} trailers phase once per exchange"
                )),
                (Step::Trailers, _) => None,
            }
        };
        if let Some(why) = refused {
            panic!(
                "TestExchange::{what} called {why}; the host calls each phase of an exchange \
                 once, in order"
            );
        }
        self.stages[idx(d)] = match step {
            Step::Headers => Stage::Headers,
            Step::Body { eos: false } => Stage::Body,
            Step::Body { eos: true } => Stage::BodyEnd,
            Step::Trailers => Stage::Trailers,
        };
    }

    /// Whether the exchange is past `phase` (a request or response phase):
    /// it was called, or a later one of its direction.
    fn past(&self, phase: Phase) -> bool {
        let (d, at) = match phase {
            Phase::RequestHeaders => (0, Stage::Headers),
            Phase::RequestBody => (0, Stage::BodyEnd),
            Phase::RequestTrailers => (0, Stage::Trailers),
            Phase::ResponseHeaders => (1, Stage::Headers),
            Phase::ResponseBody => (1, Stage::BodyEnd),
            Phase::ResponseTrailers => (1, Stage::Trailers),
            _ => return false,
        };
        self.stages[d].rank() >= at.rank()
    }

    /// Whether the host would make a call of `phase`: it is declared, the
    /// exchange is [`live`](Self::live), and for a phase other than `on_log`
    /// the filter has not answered with a local response (the host makes no
    /// request or response phase call into a filter after its local
    /// response: abi/README.md §3.5).
    fn declared(&self, phase: Phase) -> bool {
        self.test.instance.setup().declares(phase)
            && self.live()
            && (phase == Phase::Log || !self.responded)
    }

    /// Why the host would have failed one of this exchange's calls, if it
    /// would have: a local response it refuses, or a `Pause` with no callout
    /// or KV call of the exchange outstanding (see [`Outcome::Failed`]). The
    /// phase method (or the delivery to a paused exchange) still returns the
    /// action the filter gave;
    /// from then on the harness makes no more calls for the exchange but
    /// `on_done`, as the host (its failure policy applies: fail closed ends
    /// the exchange with `503`, fail open skips the filter): no later phase,
    /// no `on_log`, and no callout or KV reply is delivered
    /// ([`deliver_callout`](Self::deliver_callout) gives `None`). Fail open
    /// ([`FilterTest::fail_open`]), the exchange itself goes on past the
    /// skipped filter: the phase methods take the rest of the request and
    /// the upstream's response (returning `Continue`), and
    /// [`run`](Self::run) drives it to its end.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Whether the filter detached from this exchange ([`Exchange::detach`]):
    /// the harness, as the host, makes no more calls for it (its SDK context
    /// was dropped through `on_done` then).
    pub fn detached(&self) -> bool {
        self.ex.borrow().detached
    }

    /// Run one call with `window` writable; keep the window if it paused.
    /// `verdict`: the action is the exchange's verdict (a phase call, or a
    /// reply delivered while paused), so a `Pause` needs a call of the
    /// exchange outstanding; otherwise (a reply while not paused) `Pause`
    /// means nothing, as on the host.
    fn call(
        &mut self,
        window: Vec<Part>,
        verdict: bool,
        f: impl FnOnce(&mut Instance<F>, &Exchange<'_>) -> Action,
    ) -> Action {
        self.ex.borrow_mut().window = window.clone();
        let action = {
            let _g = install(
                &self.test.host.host,
                self.test.id,
                Call::Exchange(self.context),
            );
            let x = Exchange::new(ExchangeHandle::new(self.ex.clone()));
            f(&mut self.test.instance, &x)
        };
        self.ex.borrow_mut().window.clear();
        if let Action::Respond(lr) = &action {
            if let Err(why) = check_local_response(lr) {
                self.failure.get_or_insert(why);
            } else if verdict && self.failure.is_none() {
                // Applied: no more phase calls into the filter.
                self.responded = true;
                self.answered(lr, &window);
            }
        }
        let pause = verdict && action == Action::Pause;
        if pause && self.test.host.outstanding(self.test.id, Some(self.context)) == 0 {
            // As the host (host/src/wasm/plugin.rs `verdict`): nothing could
            // resume the pause, so the call failed.
            self.failure
                .get_or_insert_with(|| PAUSE_WITHOUT_CALL.to_owned());
        }
        self.paused = pause && self.failure.is_none();
        if self.paused {
            self.paused_window = window;
        } else {
            self.paused_window.clear();
            self.pass_bodies();
        }
        action
    }

    /// Body data not held by a pause goes on once its call returns: as the
    /// host, the exchange no longer holds it (`Exchange::body` gives `None`
    /// until the next body call of that direction, abi/README.md §3.1).
    fn pass_bodies(&mut self) {
        let mut ex = self.ex.borrow_mut();
        for (i, passed) in self.passed.iter_mut().enumerate() {
            if let Some(b) = ex.bodies[i].take() {
                *passed = Some(b);
            }
        }
    }

    /// The filter's local response `lr`, from a call with `window` writable,
    /// was applied: as the host, the exchange records it, so `on_log` (and
    /// `Exchange::cause`, `Exchange::status` in it) sees it (abi/README.md
    /// §3.5; host/src/filter.rs `plugin_cause`, proxy.rs `response_filters`,
    /// `SharedChain::finish`): the cause becomes `plugin:<details>`, and the
    /// status the one that went out: the local response's, unless the
    /// response head had already gone downstream (a streamed response body
    /// or trailers call, a request body call after the response head: the
    /// host resets the exchange and logs the status that was sent). From the
    /// response headers phase it replaces the response head too.
    fn answered(&mut self, lr: &crate::LocalResponse, window: &[Part]) {
        let head_out = self.stages[1] != Stage::Start && !self.holds_response_head(window);
        let mut ex = self.ex.borrow_mut();
        ex.cause = Some(format!("plugin:{}", lr.details));
        if head_out {
            return;
        }
        let (status, headers) = if self.grpc {
            grpc_form(lr)
        } else {
            (lr.status, http_form(lr))
        };
        ex.status = Some(status);
        if window == [Part::Head(Direction::Response)] {
            ex.heads[1] = Some(headers);
        }
    }

    /// Whether the response head has not gone downstream yet during a call
    /// with `window` writable: the call holds it (the response headers
    /// phase, a buffered response body call) or a buffered response body
    /// phase still will.
    fn holds_response_head(&self, window: &[Part]) -> bool {
        let ex = self.ex.borrow();
        window.contains(&Part::Head(Direction::Response))
            || (ex.body_declared[1]
                && ex.body_modes[1] == BodyMode::Buffered
                && self.stages[1].rank() < Stage::BodyEnd.rank())
    }

    fn has_body(&self, d: Direction) -> bool {
        !self.pending_body[idx(d)].is_empty() || self.pending_trailers[idx(d)].is_some()
    }

    /// Call `on_request_headers` (end of stream when the request has no body
    /// and no trailers).
    #[track_caller]
    pub fn request_headers(&mut self) -> Action {
        self.enter("request_headers");
        self.step("request_headers", Direction::Request, Step::Headers);
        if !self.declared(Phase::RequestHeaders) {
            return Action::Continue;
        }
        let eos = !self.has_body(Direction::Request);
        let c = self.context;
        let ex = self.ex.clone();
        let action = self.call(vec![Part::Head(Direction::Request)], true, |i, x| {
            let h = Headers(HeadersHandle::new(ex, Part::Head(Direction::Request)));
            i.request_headers(c, x, &h, eos)
        });
        self.wait(action)
    }

    fn body_phase(&mut self, d: Direction, data: Vec<u8>, eos: bool) -> Action {
        let phase = match d {
            Direction::Request => Phase::RequestBody,
            Direction::Response => Phase::ResponseBody,
        };
        let mode = self.ex.borrow().body_modes[idx(d)];
        if self.length_mismatch.as_ref().is_some_and(|(m, _)| *m == d) {
            // The host failed that body: nothing more of it is read.
            return Action::Continue;
        }
        let bodyless = data.is_empty() && self.pending_trailers[idx(d)].is_none();
        {
            let mut ex = self.ex.borrow_mut();
            ex.body_started[idx(d)] = true;
            ex.bodies[idx(d)] = Some(data);
        }
        if !self.declared(phase) || mode == BodyMode::Skipped {
            self.pass_bodies();
            return Action::Continue;
        }
        if mode == BodyMode::Buffered
            && self.ex.borrow().bodies[idx(d)].as_ref().map_or(0, Vec::len) > self.test.body_limit
        {
            self.refuse_body(d);
            return Action::Continue;
        }
        let mut window = vec![Part::Body(d)];
        if mode == BodyMode::Buffered {
            window.push(Part::Head(d));
        }
        // The end-of-stream call sees the trailers that arrived, writable, as
        // the host does (abi/README.md §4): a filter may fold them into the body.
        let folding = eos && self.pending_trailers[idx(d)].is_some();
        if folding {
            self.ex.borrow_mut().trailers[idx(d)] = self.pending_trailers[idx(d)].clone();
            window.push(Part::Trailers(d));
        }
        let c = self.context;
        let ex = self.ex.clone();
        self.body_call = Some(BodyCall {
            d,
            mode,
            end_of_stream: eos,
            bodyless,
        });
        let action = self.call(window, true, |i, x| {
            let b = Body(BufferHandle::new(ex, d));
            match d {
                Direction::Request => i.request_body(c, x, &b, eos),
                Direction::Response => i.response_body(c, x, &b, eos),
            }
        });
        if folding {
            if self.paused {
                // Held (and writable) with the body until the pause ends.
                self.held_trailers = Some(d);
            } else {
                self.settle_trailers(d);
            }
        }
        if !self.paused {
            self.finish_body_call();
        }
        self.wait(action)
    }

    /// The body call in progress ended (not paused, or its pause ended):
    /// what the host does with the data as it goes on (abi/README.md §4).
    /// A `buffered` body's head gets the `content-length` of the body the
    /// filter left (none with trailers after it; as it came for a request
    /// that had no body and still has none; none for a `204` or `304`):
    /// host/src/proxy.rs `request_body`, `response_body`, `set_length`. A
    /// `streamed` body's data is counted against the `content-length` its
    /// head went on with (host/src/body.rs `Filtered`): more than it, or
    /// fewer at the end, ends the exchange ([`Outcome::LengthMismatch`]).
    fn finish_body_call(&mut self) {
        let Some(call) = self.body_call.take() else {
            return;
        };
        if self.failure.is_some() || self.responded || self.over_body_limit.is_some() {
            return;
        }
        let d = call.d;
        let len = self.passed[idx(d)].as_ref().map_or(0, Vec::len);
        match call.mode {
            BodyMode::Buffered => self.set_length(d, len, call.bodyless),
            BodyMode::Streamed => {
                self.streamed[idx(d)] += len as u64;
                let Some(declared) = self.sent_length(d) else {
                    return;
                };
                let sent = self.streamed[idx(d)];
                if sent > declared || (call.end_of_stream && sent < declared) {
                    self.break_length(d, sent, declared);
                }
            }
            BodyMode::Skipped => {}
        }
    }

    /// A `buffered` body of `d` of `len` bytes went on: its head's length,
    /// as the host recomputes it (see [`finish_body_call`](Self::finish_body_call)).
    fn set_length(&mut self, d: Direction, len: usize, bodyless: bool) {
        let trailers = self.pending_trailers[idx(d)].is_some();
        let mut ex = self.ex.borrow_mut();
        let none = match d {
            // Still empty: framed as it came (no `content-length: 0` on a GET).
            Direction::Request if bodyless && len == 0 && !trailers => return,
            Direction::Request => trailers,
            Direction::Response => trailers || matches!(ex.status, Some(204 | 304)),
        };
        let Some(head) = ex.heads[idx(d)].as_mut() else {
            return;
        };
        head.retain(|(n, _)| n != "content-length" && n != "transfer-encoding");
        if !none {
            head.push(("content-length".to_owned(), len.to_string().into_bytes()));
        }
    }

    /// The `content-length` the head of `d` went on with, if its message
    /// may have a body (not a response to `HEAD`, nor a `1xx`, `204` or
    /// `304`): one value, a number (host/src/filter.rs `sent_length`).
    fn sent_length(&self, d: Direction) -> Option<u64> {
        let ex = self.ex.borrow();
        if d == Direction::Response
            && (ex.method == "HEAD" || ex.status.is_none_or(|s| s < 200 || s == 204 || s == 304))
        {
            return None;
        }
        let mut values = ex.heads[idx(d)]
            .as_ref()?
            .iter()
            .filter(|(n, _)| n == "content-length");
        match (values.next(), values.next()) {
            (Some((_, v)), None) => std::str::from_utf8(v).ok()?.trim().parse().ok(),
            _ => None,
        }
    }

    /// The `streamed` body of `d` came to `sent` bytes against the
    /// `content-length` of `declared` its head went on with: as the host,
    /// the exchange ends, the filter's failure. A request gets `503`,
    /// cause `plugin_failure` (the upstream request is reset); a response,
    /// whose head is out, is reset: its status stays, cause
    /// `response_body_failed`. Nothing more of that body is read.
    fn break_length(&mut self, d: Direction, sent: u64, declared: u64) {
        let what = if sent > declared {
            "more than"
        } else {
            "fewer than"
        };
        let why = format!(
            "a streamed {} body rewritten to {what} the content-length its head went on with \
             ({sent} bytes for {declared}): a filter that resizes a streamed body must remove \
             content-length in its headers phase",
            match d {
                Direction::Request => "request",
                Direction::Response => "response",
            }
        );
        {
            let mut ex = self.ex.borrow_mut();
            match d {
                Direction::Request => {
                    ex.status = Some(503);
                    ex.cause = Some("plugin_failure".to_owned());
                }
                Direction::Response => ex.cause = Some("response_body_failed".to_owned()),
            }
        }
        self.pending_body[idx(d)].clear();
        self.pending_trailers[idx(d)] = None;
        self.length_mismatch = Some((d, why));
    }

    /// The direction whose `streamed` body the filter rewrote to another
    /// size than the `content-length` its head went on with (it did not
    /// remove it in its headers phase), and the host's reason: the harness,
    /// as the host, ended the exchange there (see
    /// [`Outcome::LengthMismatch`]): nothing more of that body is read
    /// (its phase methods call nothing), the request gets `503` (cause
    /// `plugin_failure`, which `on_log` sees), a response keeps the status
    /// it went with (cause `response_body_failed`). Not a failed call:
    /// [`failure`](Self::failure) stays `None`.
    pub fn length_mismatch(&self) -> Option<(Direction, &str)> {
        self.length_mismatch
            .as_ref()
            .map(|(d, why)| (*d, why.as_str()))
    }

    /// The body of `d`, buffered for the filter, is over its `limits.body`:
    /// as the host (host/src/proxy.rs `run_body`, filter.rs
    /// `body_limit_exceeded`; abi/README.md §4), the body phase is not
    /// called and the exchange ends with `413` (request) or `502`
    /// (response), cause `plugin_buffer_limit`: no more phase calls (the
    /// upstream is not asked, or its response not sent), `on_log` sees that
    /// status and cause.
    fn refuse_body(&mut self, d: Direction) {
        {
            let mut ex = self.ex.borrow_mut();
            ex.bodies[idx(d)] = None;
            ex.status = Some(match d {
                Direction::Request => 413,
                Direction::Response => 502,
            });
            ex.cause = Some("plugin_buffer_limit".to_owned());
        }
        self.passed[idx(d)] = None;
        self.pending_trailers[idx(d)] = None;
        self.over_body_limit = Some(d);
        // No more phase calls into the filter, as after a local response.
        self.responded = true;
    }

    /// The direction whose body, buffered for the filter, was over its
    /// `limits.body` ([`FilterTest::body_limit`], 1 MiB by default): the
    /// harness, as the host, did not call the body phase (its method
    /// returned `Continue`) and ended the exchange with `413` (request) or
    /// `502` (response), cause `plugin_buffer_limit`, which `on_log` sees;
    /// later phase methods call nothing ([`run`](Self::run) gives
    /// [`Outcome::OverBodyLimit`]).
    pub fn over_body_limit(&self) -> Option<Direction> {
        self.over_body_limit
    }

    /// After the end-of-stream body call of `d`: what the filter left of the
    /// trailers goes to the trailers phase; an emptied map means no trailers at
    /// all (and no trailers phase). As on the host, where the trailers phase
    /// follows in the same step (host/src/filter.rs `after_body`,
    /// `end_trailers`) and the trailers stay on the exchange for later reads,
    /// they stay readable (`Exchange::trailers`) from a phase of the other
    /// direction a test runs in between (full duplex).
    fn settle_trailers(&mut self, d: Direction) {
        let mut ex = self.ex.borrow_mut();
        let left = ex.trailers[idx(d)].take().filter(|t| !t.is_empty());
        ex.trailers[idx(d)] = left.clone();
        self.pending_trailers[idx(d)] = left;
    }

    /// Call `on_request_body` once with the whole request body and end of
    /// stream (as in `buffered` mode; not called in `skipped` mode).
    #[track_caller]
    pub fn request_body(&mut self) -> Action {
        self.enter("request_body");
        self.step("request_body", Direction::Request, Step::Body { eos: true });
        let data = std::mem::take(&mut self.pending_body[0]);
        self.body_phase(Direction::Request, data, true)
    }

    /// Call `on_request_body` with one chunk (for `streamed` filters).
    #[track_caller]
    pub fn request_body_chunk(&mut self, data: impl Into<Vec<u8>>, end_of_stream: bool) -> Action {
        self.enter("request_body_chunk");
        self.step(
            "request_body_chunk",
            Direction::Request,
            Step::Body { eos: end_of_stream },
        );
        self.body_phase(Direction::Request, data.into(), end_of_stream)
    }

    fn trailers_phase(&mut self, d: Direction) -> Action {
        let phase = match d {
            Direction::Request => Phase::RequestTrailers,
            Direction::Response => Phase::ResponseTrailers,
        };
        let Some(t) = self.pending_trailers[idx(d)].take() else {
            return Action::Continue;
        };
        self.ex.borrow_mut().trailers[idx(d)] = Some(t);
        if !self.declared(phase) {
            return Action::Continue;
        }
        let c = self.context;
        let ex = self.ex.clone();
        let action = self.call(vec![Part::Trailers(d)], true, |i, x| {
            let t = Headers(HeadersHandle::new(ex, Part::Trailers(d)));
            match d {
                Direction::Request => i.request_trailers(c, x, &t),
                Direction::Response => i.response_trailers(c, x, &t),
            }
        });
        self.wait(action)
    }

    /// Call `on_request_trailers` if the request has trailers. After a body
    /// chunk that did not end the stream (`request_body_chunk(_, false)`),
    /// first the last body call, as the host makes it when the trailers (or
    /// the end of the stream) arrive: an empty chunk with end of stream,
    /// during which the trailers are readable and writable (abi/README.md
    /// §3.2, §4; host/src/body.rs `end`). If that call does not continue
    /// (`Pause`, `Respond`, a failure), its action is returned and the
    /// trailers phase is not called: after the pause ends, call this again.
    #[track_caller]
    pub fn request_trailers(&mut self) -> Action {
        self.trailers_method("request_trailers", Direction::Request)
    }

    /// The trailers phase method `what` of direction `d`: the last body
    /// call first if the body has not ended (see
    /// [`request_trailers`](Self::request_trailers)).
    #[track_caller]
    fn trailers_method(&mut self, what: &str, d: Direction) -> Action {
        self.enter(what);
        if self.stages[idx(d)] == Stage::Body {
            self.step(what, d, Step::Body { eos: true });
            let action = self.body_phase(d, Vec::new(), true);
            // (A pause, or a failure: both come with another action.)
            if action != Action::Continue {
                return action;
            }
        }
        self.step(what, d, Step::Trailers);
        self.trailers_phase(d)
    }

    /// Receive `response` from upstream and call `on_response_headers`.
    /// While the exchange is paused this panics (the host calls no phase
    /// then), but for a pause holding a part of a streamed request (a body
    /// chunk, or the trailers, after the head went upstream): the upstream
    /// may answer under it, and the host then abandons the hold (the pause
    /// ends without a verdict, not a failure: the exchange's outstanding
    /// calls are cancelled and never delivered, the held part is discarded,
    /// no more of the request is read: a later request phase method panics)
    /// and goes on with the response.
    #[track_caller]
    pub fn response_headers(&mut self, response: Response) -> Action {
        self.enter("response_headers");
        if self.paused && self.holds_streamed_request() {
            self.abandon_hold();
        }
        self.step("response_headers", Direction::Response, Step::Headers);
        if self.responded {
            // The filter answered from a request phase: the host aborted the
            // upstream request, so its response never comes; the exchange
            // keeps the local response (see `answered`).
            return Action::Continue;
        }
        {
            let mut ex = self.ex.borrow_mut();
            ex.status = Some(response.status);
            ex.heads[1] = Some(response.headers);
            ex.upstream_address =
                Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3)), 80));
        }
        self.pending_body[1] = response.body;
        self.pending_trailers[1] = response.trailers;
        // The replies that came while the exchange was not paused, before
        // the phase, if the filter takes part in the response (host/src/
        // filter.rs `on_response_headers`, `deliver_ready`; proxy.rs skips
        // the response path when no filter has a response phase or `on_log`,
        // and a filter that answered from a request phase has no part in it).
        let setup = self.test.instance.setup();
        let response_path = !self.responded
            && [
                Phase::ResponseHeaders,
                Phase::ResponseBody,
                Phase::ResponseTrailers,
                Phase::Log,
            ]
            .into_iter()
            .any(|p| setup.declares(p));
        if response_path {
            self.deliver_arrived();
        }
        if !self.declared(Phase::ResponseHeaders) {
            return Action::Continue;
        }
        let eos = !self.has_body(Direction::Response);
        let c = self.context;
        let ex = self.ex.clone();
        let action = self.call(vec![Part::Head(Direction::Response)], true, |i, x| {
            let h = Headers(HeadersHandle::new(ex, Part::Head(Direction::Response)));
            i.response_headers(c, x, &h, eos)
        });
        self.wait(action)
    }

    /// Whether the pause holds a part of a streamed request (a body chunk or
    /// the trailers after the head went upstream, so the upstream may answer
    /// meanwhile), not the head (request headers, a buffered body).
    fn holds_streamed_request(&self) -> bool {
        let w = &self.paused_window;
        let ex = self.ex.borrow();
        let buffered = ex.body_declared[0] && ex.body_modes[0] == BodyMode::Buffered;
        !buffered
            && !w.contains(&Part::Head(Direction::Request))
            && (w.contains(&Part::Body(Direction::Request))
                || w.contains(&Part::Trailers(Direction::Request)))
    }

    /// The upstream answered while the filter held a part of a streamed
    /// request: as the host (host/src/filter.rs `abandon_hold`), the pause
    /// ends without a verdict (not a failure): the exchange's outstanding
    /// calls are cancelled (never delivered), the held part is discarded,
    /// the rest of the request is not read, and the response goes through
    /// the response phases.
    fn abandon_hold(&mut self) {
        self.cancel_outstanding();
        self.arrived.clear();
        if self.paused_window.contains(&Part::Body(Direction::Request)) {
            self.ex.borrow_mut().bodies[0] = None;
            self.passed[0] = None;
        }
        if self.held_trailers.take().is_some() {
            self.ex.borrow_mut().trailers[0] = None;
        }
        self.pending_body[0].clear();
        self.pending_trailers[0] = None;
        self.paused = false;
        self.paused_window.clear();
        self.body_call = None;
        self.request_cut = true;
    }

    /// Cancels the exchange's outstanding callouts and KV calls.
    fn cancel_outstanding(&mut self) {
        let mut h = self.test.host.host.borrow_mut();
        for c in h.callouts.iter_mut() {
            if c.instance == self.test.id
                && c.context == Some(self.context)
                && c.state == CalloutState::Outstanding
            {
                c.state = CalloutState::Cancelled;
            }
        }
    }

    /// Call `on_response_body` once with the whole response body.
    #[track_caller]
    pub fn response_body(&mut self) -> Action {
        self.enter("response_body");
        self.step(
            "response_body",
            Direction::Response,
            Step::Body { eos: true },
        );
        let data = std::mem::take(&mut self.pending_body[1]);
        self.body_phase(Direction::Response, data, true)
    }

    /// Call `on_response_body` with one chunk.
    #[track_caller]
    pub fn response_body_chunk(&mut self, data: impl Into<Vec<u8>>, end_of_stream: bool) -> Action {
        self.enter("response_body_chunk");
        self.step(
            "response_body_chunk",
            Direction::Response,
            Step::Body { eos: end_of_stream },
        );
        self.body_phase(Direction::Response, data.into(), end_of_stream)
    }

    /// Call `on_response_trailers` if the response has trailers; after a
    /// body chunk that did not end the stream, the last body call first, as
    /// for [`request_trailers`](Self::request_trailers).
    #[track_caller]
    pub fn response_trailers(&mut self) -> Action {
        self.trailers_method("response_trailers", Direction::Response)
    }

    /// Call `on_log` (if declared); everything is read-only and bodies are
    /// gone from the exchange (`Exchange::body` is `None`), though
    /// [`request_body_bytes`](Self::request_body_bytes) and
    /// [`response_body_bytes`](Self::response_body_bytes) still give the
    /// data of the last body calls. The exchange is then over but for [`done`](Self::done): a second
    /// `log` does nothing, a phase method panics, no reply is delivered.
    /// Panics after `done`.
    #[track_caller]
    pub fn log(&mut self) {
        if self.logged && !self.ended {
            return;
        }
        self.enter("log");
        {
            // As the host, `on_log` reaches no body; the data of each
            // direction's last body call stays readable through
            // `request_body_bytes` / `response_body_bytes` (a test asserts
            // what the filter wrote after `run`, which logs).
            let mut ex = self.ex.borrow_mut();
            for (i, passed) in self.passed.iter_mut().enumerate() {
                if let Some(b) = ex.bodies[i].take() {
                    *passed = Some(b);
                }
            }
        }
        // The host drops the replies still waiting as the exchange ends.
        self.arrived.clear();
        let declared = self.declared(Phase::Log);
        self.logged = true;
        if !declared {
            return;
        }
        let c = self.context;
        let _g = install(&self.test.host.host, self.test.id, Call::Log(c));
        let x = Exchange::new(ExchangeHandle::new(self.ex.clone()));
        self.test.instance.log(c, &x);
    }

    /// End the exchange: [`log`](Self::log) first if it was not called (the
    /// host calls `on_log` before `on_done` for every filter that neither
    /// failed nor detached: host/src/filter.rs `run_finish`), then cancel its
    /// outstanding callouts and call `on_done` (if declared), which drops
    /// the SDK-kept context. Only the first call
    /// does anything (as the host ends an exchange once; [`run`](Self::run)
    /// calls it): a later `done` is harmless. After it, a phase method,
    /// [`log`](Self::log) or `run` panics (the host makes no call into an
    /// ended exchange, and the SDK would start a new context), and nothing
    /// is delivered.
    pub fn done(&mut self) {
        if self.ended {
            return;
        }
        if !self.logged {
            self.log();
        }
        self.ended = true;
        self.arrived.clear();
        self.cancel_outstanding();
        // The host calls `on-done` for a filter whose call failed, too.
        if self.test.instance.setup().declares(Phase::Done) && !self.detached() {
            // As on the host: not an exchange call (no callouts, no
            // asynchronous KV, no detach).
            let _g = install(&self.test.host.host, self.test.id, Call::Done);
            self.test.instance.done(self.context);
        }
    }

    /// Set the access-log cause (as if the exchange failed).
    pub fn set_cause(&mut self, cause: &str) {
        self.ex.borrow_mut().cause = Some(cause.to_owned());
    }

    /// Deliver callout `id`'s response to `on_callout_response` (at once if
    /// the exchange is paused, else when the host would: see below). `None`
    /// if `id` is not an outstanding callout of this exchange (sent by this
    /// exchange's context in this [`FilterTest`]: another `FilterTest` on the
    /// same host is another instance, whose context ids may be the same) or
    /// its reply came already, or if the exchange failed, detached or is
    /// over (`log` or `done` was called): the host would not call.
    ///
    /// While the exchange is paused, the action is its verdict, in the write
    /// window it paused in: `Continue` resumes, `Respond` answers, `Pause`
    /// keeps waiting, which with nothing else of the exchange outstanding is
    /// a failure ([`failure`](Self::failure)), as from a phase.
    ///
    /// Not paused, the reply waits, as on the host (abi/README.md §5.8: the
    /// result of a callout whose context is not paused is delivered when the
    /// exchange next waits on a pause or reaches its response phase, and is
    /// dropped if the exchange ends first), and the result is `Continue`:
    /// the exchange goes on. It waits ([`replies_waiting`](Self::replies_waiting);
    /// its callout stays outstanding, so it counts for a pause and can still
    /// be cancelled) and the filter gets it:
    /// - when a phase pauses: the waiting replies are delivered in arrival
    ///   order as verdicts of that pause, before any other, so the phase
    ///   method returns the verdict the pause ended with (`Continue`,
    ///   `Respond`), or `Pause` if it still waits;
    /// - else in [`response_headers`](Self::response_headers), before the
    ///   filter's call, if the filter has a response phase or `on_log` (else
    ///   the host makes no response call for it): the host then takes
    ///   `Continue` whatever the filter returned (`Continue` and `Pause` mean
    ///   nothing, a `Respond` is ignored: host/src/filter.rs
    ///   `deliver_unpaused`), though a local response the host refuses (see
    ///   [`Outcome::Failed`]) still fails the call;
    /// - never if the exchange is logged or done first.
    pub fn deliver_callout(
        &mut self,
        id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) -> Option<Action> {
        if !self.live()
            || self.arrived.iter().any(|(a, _)| *a == id)
            || !self
                .test
                .host
                .pending_callouts(self.test.id, Some(self.context))
                .iter()
                .any(|(c, _)| *c == id)
        {
            return None;
        }
        Some(self.arrive(id, Arrived::Callout(response)))
    }

    /// The reply to call `id` (outstanding, its reply not come yet) comes:
    /// delivered at once to a paused exchange (its verdict returned); to one
    /// not paused it waits, as on the host, and the result is `Continue`.
    fn arrive(&mut self, id: u64, reply: Arrived) -> Action {
        if !self.paused {
            self.arrived.push_back((id, reply));
            return Action::Continue;
        }
        self.deliver_reply(id, reply).unwrap_or(Action::Continue)
    }

    /// Delivers the reply to call `id` through [`resume`](Self::resume);
    /// `None` (nothing delivered) if the call is no longer outstanding (the
    /// filter cancelled it meanwhile).
    fn deliver_reply(&mut self, id: u64, reply: Arrived) -> Option<Action> {
        let kv = matches!(reply, Arrived::Kv(_));
        if !self
            .test
            .host
            .take_outstanding(self.test.id, Some(self.context), id, kv)
        {
            return None;
        }
        let c = self.context;
        Some(match reply {
            Arrived::Callout(r) => {
                let r = as_received(r);
                self.resume(|i, x| i.callout_response(c, x, id, r))
            }
            Arrived::Kv(r) => self.resume(|i, x| i.kv_response(c, x, id, r)),
        })
    }

    /// How many callout and KV replies wait for the exchange: they came (by
    /// [`deliver_callout`](Self::deliver_callout),
    /// [`deliver_callouts`](Self::deliver_callouts),
    /// [`deliver_kv`](Self::deliver_kv) or
    /// [`deliver_next_kv`](Self::deliver_next_kv)) while it was not
    /// paused, and the host delivers them only when the exchange next
    /// pauses or reaches its response phase.
    pub fn replies_waiting(&self) -> usize {
        self.arrived.len()
    }

    /// After a phase call whose action was `action`: if the exchange paused,
    /// the replies that came while it was not are delivered first, as the
    /// host's wait finds them ready (host/src/filter.rs `wait`), until one
    /// ends the pause. The action the phase ends with.
    fn wait(&mut self, action: Action) -> Action {
        let mut action = action;
        while self.paused && self.live() {
            let Some((id, reply)) = self.arrived.pop_front() else {
                break;
            };
            // Cancelled by the filter meanwhile: never delivered.
            if let Some(a) = self.deliver_reply(id, reply) {
                action = a;
            }
        }
        action
    }

    /// Delivers the replies that came while the exchange was not paused, as
    /// not paused (the host's `deliver_ready`, before the response phase).
    fn deliver_arrived(&mut self) {
        while self.live() {
            let Some((id, reply)) = self.arrived.pop_front() else {
                break;
            };
            self.deliver_reply(id, reply);
        }
    }

    /// Delivers a reply through `f`: to a paused exchange in the window it
    /// paused in, where a verdict other than `pause` settles the trailers held
    /// meanwhile; to one not paused with nothing writable, where the host
    /// takes `Continue` whatever the filter returned (host/src/wasm/plugin.rs
    /// `reply`, host/src/filter.rs `deliver_unpaused`: `continue` and `pause`
    /// mean nothing, a local response is ignored; one it refuses still fails
    /// the call, in [`call`](Self::call)).
    fn resume(&mut self, f: impl FnOnce(&mut Instance<F>, &Exchange<'_>) -> Action) -> Action {
        let window = self.paused_window.clone();
        let paused = self.paused;
        let action = self.call(window, paused, f);
        if !paused {
            return Action::Continue;
        }
        if !self.paused {
            if let Some(d) = self.held_trailers.take() {
                self.settle_trailers(d);
            }
            self.finish_body_call();
        }
        action
    }

    /// Run this exchange's outstanding asynchronous KV calls on the test
    /// host's store, in start order, delivering each reply to
    /// `on_kv_response` (calls the filter starts meanwhile run too); the
    /// actions returned. Each call runs when its reply comes, so other instances'
    /// writes (or [`TestHost::kv_put`]) made between start and reply land
    /// first, as with a remote backend (the host's in-memory store runs a call
    /// when it starts; only the reply waits). Nothing is delivered (or run)
    /// once the exchange failed, detached or is over. A reply is delivered as
    /// a callout's response by [`deliver_callout`](Self::deliver_callout),
    /// and the actions mean the same: to a paused exchange at once (its
    /// verdict); to one not paused it waits, as on the host (abi/README.md
    /// §5.7, §5.8: KV replies go the callouts' way), until the exchange next
    /// pauses or reaches its response phase
    /// ([`replies_waiting`](Self::replies_waiting); the call ran, its
    /// reply is kept), and the action is `Continue`.
    pub fn deliver_kv(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        while let Some(action) = self.deliver_next_kv() {
            actions.push(action);
        }
        actions
    }

    /// Like [`deliver_kv`](Self::deliver_kv), for the oldest outstanding
    /// call only (`None` if there is none): to stop an exchange between two
    /// of its calls.
    pub fn deliver_next_kv(&mut self) -> Option<Action> {
        if !self.live() {
            return None;
        }
        let (id, ns, key, op) = self.kv_unanswered().into_iter().next()?;
        let reply = run_kv(&self.test.host.host, &ns, &key, op);
        Some(self.arrive(id, Arrived::Kv(reply)))
    }

    /// How many asynchronous KV calls of this exchange are outstanding and
    /// have no reply yet (a reply waiting for the exchange to pause or reach
    /// its response phase is counted by
    /// [`replies_waiting`](Self::replies_waiting) instead, though its call
    /// still counts for a pause).
    pub fn kv_calls_outstanding(&self) -> usize {
        self.kv_unanswered().len()
    }

    /// The exchange's outstanding KV calls whose reply has not come, in
    /// start order.
    fn kv_unanswered(&self) -> Vec<(CallId, String, String, Op)> {
        let mut calls = self.test.host.kv_outstanding(self.test.id, self.context);
        calls.retain(|(id, ..)| !self.arrived.iter().any(|(a, _)| a == id));
        calls
    }

    /// Deliver the queued responses ([`TestHost::queue_callout_response`]) to
    /// this exchange's outstanding callouts, in send order; the actions
    /// returned. Stops once the exchange failed (or is over): the rest stay
    /// outstanding and their responses stay queued.
    pub fn deliver_callouts(&mut self) -> Vec<Action> {
        let pending = self
            .test
            .host
            .pending_callouts(self.test.id, Some(self.context));
        let mut actions = Vec::new();
        for (id, cluster) in pending {
            // Its reply came already (it waits for the exchange to pause or
            // reach its response phase).
            if self.arrived.iter().any(|(a, _)| *a == id) {
                continue;
            }
            // Once the exchange failed nothing more is delivered; the queued
            // responses are left for other exchanges.
            if !self.live() {
                break;
            }
            let Some(r) = self.test.host.pop_queued(&cluster) else {
                continue;
            };
            if let Some(a) = self.deliver_callout(id, r) {
                actions.push(a);
            }
        }
        actions
    }

    /// Whether a `Pause` just returned is valid: this exchange has a callout
    /// or KV call outstanding (the host treats a pause without one as a
    /// failure, and so does the harness: see [`failure`](Self::failure)). A pause
    /// is valid from every phase but `on_log`, body and trailers calls in
    /// `Streamed` mode included (the host then stops reading that body until
    /// the filter resumes).
    pub fn may_pause(&self) -> bool {
        self.test.host.outstanding(self.test.id, Some(self.context)) > 0
    }

    /// Whether the host makes body calls for direction `d` (in [`run`](Self::run)):
    /// for a message with a body (or trailers); for one without, one buffered
    /// call with an empty body if the filter buffers that direction and the
    /// message may have a body (not a response to `HEAD`, nor `1xx`, `204` or
    /// `304`), as host/src/proxy.rs does (abi/README.md §4).
    fn body_call(&self, d: Direction) -> bool {
        if self.has_body(d) {
            return true;
        }
        let phase = match d {
            Direction::Request => Phase::RequestBody,
            Direction::Response => Phase::ResponseBody,
        };
        let ex = self.ex.borrow();
        let may_have_body = match d {
            Direction::Request => true,
            Direction::Response => {
                ex.method != "HEAD" && ex.status.is_some_and(|s| s >= 200 && s != 204 && s != 304)
            }
        };
        may_have_body && ex.body_modes[idx(d)] == BodyMode::Buffered && self.declared(phase)
    }

    /// Drive the whole exchange as the host would: request headers, body,
    /// trailers, then `response` through headers, body, trailers, then log
    /// and done. Stops at the first `Respond` (then logs and ends the
    /// exchange), `Pause` ([`Outcome::Paused`]) or failure
    /// ([`Outcome::Failed`], then ends the exchange: `on_done` only). A
    /// `Pause` with nothing of the exchange outstanding is a failure, as on
    /// the host. With [`FilterTest::fail_open`], a failure does not stop
    /// the run: as the host, it skips the filter and the exchange goes on to
    /// its end (the upstream's `response`, no `on_log` for the failed
    /// filter, `on_done`), usually [`Outcome::Completed`];
    /// [`failure`](Self::failure) gives the reason. A filter that buffers a direction gets its body
    /// call even for a message without a body (an empty buffer), as from the
    /// host (abi/README.md §4).
    ///
    /// `run` drives a fresh exchange: it panics on one logged or done, and on
    /// one already driven by a phase method while the filter still gets calls
    /// (it would call those phases again; a detached or failed exchange gets
    /// none, so `run` only walks it to its end, from the phases it is not
    /// past yet: `response` is the upstream's unless the response headers
    /// were given already).
    #[track_caller]
    pub fn run(&mut self, response: Response) -> Outcome {
        if self.started && self.live() {
            panic!(
                "TestExchange::run called on an exchange already driven by phase methods: it \
                 would call them again; run a fresh one (FilterTest::exchange), or go on phase \
                 by phase"
            );
        }
        self.enter("run");
        let mut response = Some(response);
        for phase in [
            Phase::RequestHeaders,
            Phase::RequestBody,
            Phase::RequestTrailers,
            Phase::ResponseHeaders,
            Phase::ResponseBody,
            Phase::ResponseTrailers,
        ] {
            if self.past(phase) {
                // Driven by a phase method before (a detached or failed
                // exchange `run` walks to its end): not again.
                continue;
            }
            let action = match phase {
                Phase::RequestHeaders => self.request_headers(),
                Phase::RequestBody if self.body_call(Direction::Request) => self.request_body(),
                Phase::RequestTrailers => self.request_trailers(),
                Phase::ResponseHeaders => match response.take() {
                    Some(r) => self.response_headers(r),
                    None => Action::Continue,
                },
                Phase::ResponseBody if self.body_call(Direction::Response) => self.response_body(),
                Phase::ResponseTrailers => self.response_trailers(),
                _ => Action::Continue,
            };
            if let Some(why) = self.failure.clone() {
                if self.test.fail_open {
                    // As the host (filter.rs `failure`): the filter is
                    // skipped (no more calls: `declared` is false from now
                    // on) and the exchange goes on; its action means nothing.
                    continue;
                }
                // No `on_log` for the failed filter: `done` only.
                self.done();
                return Outcome::Failed(phase, why);
            }
            if let Some((_, why)) = self.length_mismatch.clone() {
                self.log();
                self.done();
                return Outcome::LengthMismatch(phase, why);
            }
            if let Some(d) = self.over_body_limit {
                self.log();
                self.done();
                let status = match d {
                    Direction::Request => 413,
                    Direction::Response => 502,
                };
                return Outcome::OverBodyLimit(phase, status);
            }
            match action {
                Action::Continue => {}
                Action::Pause => return Outcome::Paused(phase),
                Action::Respond(r) => {
                    self.log();
                    self.done();
                    return Outcome::Responded(phase, r);
                }
            }
        }
        self.log();
        self.done();
        Outcome::Completed
    }

    // ---- inspection ----

    fn field(&self, part: Part, name: &str) -> Option<String> {
        HeadersHandle::new(self.ex.clone(), part)
            .get(name)
            .and_then(|v| String::from_utf8(v).ok())
    }

    /// The first value of request header `name` (as text), as the next filter sees it.
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.field(Part::Head(Direction::Request), name)
    }

    /// The first value of response header `name` (as text).
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.field(Part::Head(Direction::Response), name)
    }

    /// The first value of request trailer `name` (as text).
    pub fn request_trailer(&self, name: &str) -> Option<String> {
        self.field(Part::Trailers(Direction::Request), name)
    }

    /// The first value of response trailer `name` (as text).
    pub fn response_trailer(&self, name: &str) -> Option<String> {
        self.field(Part::Trailers(Direction::Response), name)
    }

    /// The whole request header map, in order.
    pub fn request_headers_list(&self) -> Vec<(String, Vec<u8>)> {
        HeadersHandle::new(self.ex.clone(), Part::Head(Direction::Request)).entries()
    }

    /// The whole response header map, in order.
    pub fn response_headers_list(&self) -> Vec<(String, Vec<u8>)> {
        HeadersHandle::new(self.ex.clone(), Part::Head(Direction::Response)).entries()
    }

    /// The request body as last delivered (and possibly rewritten): the
    /// data of the last request body call (held by a pause, or gone on), also
    /// once the exchange is logged or done, so it can be asserted after
    /// [`run`](Self::run); empty if there was no body call, or the host
    /// dropped the data (a held streamed request part abandoned when the
    /// upstream answered).
    pub fn request_body_bytes(&self) -> Vec<u8> {
        self.body_bytes(0)
    }

    /// The response body as last delivered (and possibly rewritten), as
    /// [`request_body_bytes`](Self::request_body_bytes).
    pub fn response_body_bytes(&self) -> Vec<u8> {
        self.body_bytes(1)
    }

    fn body_bytes(&self, i: usize) -> Vec<u8> {
        let ex = self.ex.borrow();
        ex.bodies[i]
            .as_ref()
            .or(self.passed[i].as_ref())
            .cloned()
            .unwrap_or_default()
    }

    /// The request method (possibly rewritten).
    pub fn method(&self) -> String {
        self.ex.borrow().method.clone()
    }

    /// The request path (possibly rewritten).
    pub fn path(&self) -> String {
        self.ex.borrow().path.clone()
    }

    /// The authority (possibly rewritten).
    pub fn authority(&self) -> String {
        self.ex.borrow().authority.clone()
    }

    /// The response status (possibly rewritten); `None` before a response.
    pub fn status(&self) -> Option<u16> {
        self.ex.borrow().status
    }

    /// The current body mode of `direction` (after any override).
    pub fn body_mode(&self, direction: Direction) -> BodyMode {
        self.ex.borrow().body_modes[idx(direction)]
    }
}

// ---- network (L4) filters ----

/// One configured network filter instance on a [`TestHost`].
pub struct NetworkFilterTest<F: NetworkFilter> {
    host: TestHost,
    instance: NetworkInstance<F>,
    /// This instance's id on the host.
    id: u64,
    next_context: u64,
    /// The plugin's failure policy is `fail: open`.
    fail_open: bool,
    /// The plugin's `limits.body`: the most the filter may hold per direction.
    body_limit: usize,
}

impl<F: NetworkFilter> NetworkFilterTest<F> {
    /// Configure `F` with JSON `config` on a fresh [`TestHost`] with nothing
    /// granted. `Err` is the message `configure` returns to the host.
    pub fn configure(config: &str) -> Result<Self, String> {
        TestHost::new().configure_network(config)
    }

    /// The host this filter runs on.
    pub fn host(&self) -> &TestHost {
        &self.host
    }

    /// Set the plugin's failure policy, as `fail:` in the host configuration:
    /// `false` (the default, `fail: closed`) closes a connection whose
    /// filter failed; `true` (`fail: open`) skips the filter for the rest of
    /// the connection and lets what it held go on (see
    /// [`TestConnection::failure`]).
    pub fn fail_open(mut self, open: bool) -> Self {
        self.fail_open = open;
        self
    }

    /// Set the plugin's `limits.body` (default [`DEFAULT_BODY_LIMIT`], 1 MiB):
    /// the most bytes the filter may hold (`Pause`) per direction. As on the
    /// host (host/src/network_filter.rs `over_cap`), a data call that leaves
    /// the filter holding more than this (a pause with a callout outstanding,
    /// or a buffering pause before the end of the stream) closes the
    /// connection (see [`TestConnection::limit_exceeded`]); data passing
    /// through is not capped.
    ///
    /// # Panics
    ///
    /// Outside 1 KiB..=64 MiB, which the host's configuration refuses.
    #[track_caller]
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = checked_body_limit("NetworkFilterTest", bytes);
        self
    }

    /// The setup `configure` returned.
    pub fn setup(&self) -> NetworkSetup {
        self.instance.setup()
    }

    /// The filter value.
    pub fn filter(&self) -> &F {
        self.instance.filter()
    }

    /// Accept a downstream connection described by `conn` (its context is
    /// created; nothing is called yet): drive it with the returned handle,
    /// starting with [`TestConnection::new_connection`].
    pub fn connect(&mut self, conn: Conn) -> TestConnection<'_, F> {
        let context = self.next_context;
        self.next_context += 1;
        let start_time = self.host.host.borrow().wall_ns;
        let state = ExchangeState {
            method: String::new(),
            path: String::new(),
            scheme: String::new(),
            authority: String::new(),
            version: HttpVersion::Http11,
            status: None,
            heads: [None, None],
            bodies: [None, None],
            trailers: [None, None],
            source: conn.source,
            destination: conn.destination,
            tls_version: conn.tls_version,
            tls_sni: conn.tls_sni,
            tls_peer_subject: conn.tls_peer_subject,
            route_name: None,
            cluster: conn.cluster,
            upstream_address: None,
            request_id: String::new(),
            start_time,
            cause: None,
            window: Vec::new(),
            body_modes: [BodyMode::Streamed; 2],
            body_declared: [false; 2],
            body_started: [false; 2],
            detached: false,
            body_limit: self.body_limit,
        };
        TestConnection {
            test: self,
            context,
            listener: conn.listener,
            upstream: conn.upstream,
            ctx: F::Context::default(),
            ex: Rc::new(RefCell::new(state)),
            sent: [Vec::new(), Vec::new()],
            paused: [false; 2],
            waiting: [false; 2],
            paused_new: false,
            pending: [Vec::new(), Vec::new()],
            pending_eos: [false; 2],
            open: [true, false],
            closed: false,
            closing: false,
            failure: None,
            limit_exceeded: None,
        }
    }

    /// Call `on_tick`, as the host does every declared tick interval.
    ///
    /// # Panics
    ///
    /// If the filter declared no tick interval (`NetworkSetup::tick_every_ms`,
    /// or 0): the host never calls `on_tick` then, so a test that ticks it
    /// would test a call that cannot happen.
    #[track_caller]
    pub fn tick(&mut self) {
        if self.instance.setup().tick_interval_ms() == 0 {
            panic!(
                "NetworkFilterTest::tick called, but the filter declared no tick interval \
                 (NetworkSetup::tick_every_ms): the host never calls `on_tick` then; declare \
                 one in `setup`, or do not tick"
            );
        }
        let _g = install(&self.host.host, self.id, Call::Tick);
        self.instance.tick();
    }

    /// Deliver queued responses to outstanding callouts sent from `on_tick`;
    /// returns how many were delivered.
    pub fn deliver_tick_callouts(&mut self) -> usize {
        let ready = self.host.ready_callouts(self.id, None);
        let n = ready.len();
        for (id, r) in ready {
            self.host.take_outstanding(self.id, None, id, false);
            let _g = install(&self.host.host, self.id, Call::Tick);
            self.instance.tick_callout_response(id, as_received(r));
        }
        n
    }
}

/// A downstream connection to open with [`NetworkFilterTest::connect`].
#[derive(Debug, Clone)]
pub struct Conn {
    listener: String,
    source: SocketAddr,
    destination: SocketAddr,
    upstream: SocketAddr,
    cluster: Option<String>,
    tls_version: Option<TlsVersion>,
    tls_sni: Option<String>,
    tls_peer_subject: Option<String>,
}

impl Default for Conn {
    fn default() -> Self {
        Conn::new()
    }
}

impl Conn {
    /// A plaintext connection on listener `tcp` from 192.0.2.1:50000 to
    /// 192.0.2.2:9000, proxied to cluster `upstream`, whose endpoint (once
    /// connected) is 192.0.2.3:9000.
    pub fn new() -> Self {
        Conn {
            listener: "tcp".to_owned(),
            source: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 50000),
            destination: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 9000),
            upstream: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3)), 9000),
            cluster: Some("upstream".to_owned()),
            tls_version: None,
            tls_sni: None,
            tls_peer_subject: None,
        }
    }
    /// Set the listener name.
    pub fn listener(mut self, name: &str) -> Self {
        self.listener = name.to_owned();
        self
    }
    /// Set the downstream peer's address.
    pub fn source(mut self, addr: SocketAddr) -> Self {
        self.source = addr;
        self
    }
    /// Set the local address the connection was accepted on.
    pub fn destination(mut self, addr: SocketAddr) -> Self {
        self.destination = addr;
        self
    }
    /// Set the upstream endpoint the harness "connects" to.
    pub fn upstream(mut self, addr: SocketAddr) -> Self {
        self.upstream = addr;
        self
    }
    /// Set the cluster (`None`: the listener has none).
    pub fn cluster(mut self, cluster: Option<&str>) -> Self {
        self.cluster = cluster.map(str::to_owned);
        self
    }
    /// Make the connection TLS-terminated with `version` and `sni`.
    pub fn tls(mut self, version: TlsVersion, sni: Option<&str>) -> Self {
        self.tls_version = Some(version);
        self.tls_sni = sni.map(str::to_owned);
        self
    }
    /// Set the verified client certificate's subject (mTLS).
    pub fn peer_subject(mut self, subject: &str) -> Self {
        self.tls_peer_subject = Some(subject.to_owned());
        self
    }
}

fn direction_of(from: Peer) -> Direction {
    match from {
        Peer::Downstream => Direction::Request,
        Peer::Upstream => Direction::Response,
    }
}

/// One connection of a [`NetworkFilterTest`], driven event by event as the
/// host would (abi/README.md §11, host/src/network_filter.rs): only declared
/// events call the filter; `Continue` forwards the (possibly rewritten) data
/// to the other side, `Pause` holds it in the filter, `Close` closes both
/// sides (and calls `on_close` for each side that was open, downstream
/// first).
///
/// A `Pause` from a data call with a callout of the connection outstanding
/// is a callout pause that blocks that direction: later data of it is
/// queued, not delivered, until a callout response returns `Continue` (the
/// held data is then forwarded and the queued data delivered). With nothing
/// outstanding (and not at end of stream), the filter buffers: the next data
/// of that direction is appended to the held data and the filter is called
/// again with all of it; a callout response does not release it.
///
/// As on the host, a pause nothing could end is a failure of the filter
/// ([`failure`](Self::failure)): a `Pause` from `on_new_connection` or at
/// the end of a stream with no callout outstanding, and a callout pause left
/// with none (the last reply returned `Pause`, or the filter cancelled the
/// callout it waited for). The plugin's failure policy then applies
/// ([`NetworkFilterTest::fail_open`]): fail closed closes the connection, fail
/// open skips the filter for the rest of the connection (what it held goes
/// on, later data passes untouched, no reply is delivered); either way the
/// failed filter gets no `on_close`.
///
/// What the filter holds is capped per direction at the plugin's
/// `limits.body` ([`NetworkFilterTest::body_limit`], 1 MiB by default): as on
/// the host, a hold over it closes the connection
/// ([`limit_exceeded`](Self::limit_exceeded)).
pub struct TestConnection<'t, F: NetworkFilter> {
    test: &'t mut NetworkFilterTest<F>,
    context: u64,
    listener: String,
    upstream: SocketAddr,
    ctx: F::Context,
    ex: Ex,
    /// Bytes forwarded: `[0]` to upstream, `[1]` to downstream.
    sent: [Vec<u8>; 2],
    /// Whether the direction's data is held in the filter (in `ex.bodies`).
    paused: [bool; 2],
    /// Whether that hold is a callout pause (the host's pause slot: the
    /// direction is blocked until a reply resumes it), not buffering.
    waiting: [bool; 2],
    /// `on_new_connection` paused on a callout: not connected yet.
    paused_new: bool,
    /// Data read while the direction was blocked on a callout.
    pending: [Vec<u8>; 2],
    pending_eos: [bool; 2],
    /// Which sides are open (`[downstream, upstream]`).
    open: [bool; 2],
    closed: bool,
    /// An `on_close` call is running.
    closing: bool,
    /// Why the host would have failed the filter on this connection.
    failure: Option<String>,
    /// The side whose data the filter held over its `limits.body` (the host
    /// then closed the connection).
    limit_exceeded: Option<Peer>,
}

impl<F: NetworkFilter> TestConnection<'_, F> {
    /// The connection's context id (also [`Connection::id`]).
    pub fn context(&self) -> u64 {
        self.context
    }

    /// The filter's per-connection context.
    pub fn state(&self) -> &F::Context {
        &self.ctx
    }

    /// Why the host would have failed the filter on this connection, if it
    /// would have: a pause nothing could end (see [`TestConnection`]), with
    /// the host's reason. The call that failed still returns the action the
    /// filter gave. From then on the harness, as the host, makes no call
    /// into the filter for the connection: fail closed (the default) closed
    /// it ([`is_closed`](Self::is_closed)); fail open
    /// ([`NetworkFilterTest::fail_open`]) forwarded what the filter held and
    /// passes later data through untouched (the data methods return
    /// `Continue`); [`deliver_callout`](Self::deliver_callout) gives `None`.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Whether the host calls `event`: declared, and the filter did not fail.
    fn declared(&self, event: NetworkEvent) -> bool {
        self.test.instance.setup().declares(event) && self.failure.is_none()
    }

    /// Run one call with the data of `current` visible and writable. As on
    /// the host, held data is neither (not even in `on_callout_response`).
    fn call(
        &mut self,
        current: Option<Direction>,
        f: impl FnOnce(&mut NetworkInstance<F>, &mut F::Context, &Connection<'_>) -> NetworkAction,
    ) -> NetworkAction {
        self.ex.borrow_mut().window = current.map(Part::Body).into_iter().collect();
        // `on_close` is read-only on the host (no callouts), like `on_log`.
        let kind = if self.closing {
            Call::Log(self.context)
        } else {
            Call::Exchange(self.context)
        };
        let action = {
            let _g = install(&self.test.host.host, self.test.id, kind);
            let c = Connection(ConnectionHandle::new(
                self.ex.clone(),
                self.context,
                self.listener.clone(),
            ));
            f(&mut self.test.instance, &mut self.ctx, &c)
        };
        self.ex.borrow_mut().window.clear();
        action
    }

    fn connected(&mut self) {
        self.paused_new = false;
        self.open[1] = true;
        self.ex.borrow_mut().upstream_address = Some(self.upstream);
    }

    /// How many callouts of this connection are outstanding.
    fn outstanding(&self) -> usize {
        self.test.host.outstanding(self.test.id, Some(self.context))
    }

    /// Call `on_new_connection` (if declared). `Continue` connects upstream
    /// (from then on [`Connection::upstream_address`] is set), `Pause` waits
    /// for a callout response (with none outstanding: a failure), `Close`
    /// closes.
    pub fn new_connection(&mut self) -> NetworkAction {
        if self.closed {
            return NetworkAction::Close;
        }
        let action = if self.declared(NetworkEvent::NewConnection) {
            self.call(None, |i, ctx, c| i.new_connection(ctx, c))
        } else {
            NetworkAction::Continue
        };
        match action {
            NetworkAction::Continue => self.connected(),
            NetworkAction::Pause if self.outstanding() > 0 => self.paused_new = true,
            NetworkAction::Pause => {
                // As the host (network_filter.rs `run_new`); fail open
                // connects past the skipped filter.
                if self.fail(
                    "paused the new connection with no callout outstanding: nothing could \
                     resume it"
                        .to_owned(),
                ) {
                    self.connected();
                }
            }
            NetworkAction::Close => self.close_all(),
        }
        self.settle();
        action
    }

    /// Bytes from the client; returns the action (`Continue` if
    /// `on_downstream_data` is not declared or the filter failed open,
    /// `Pause` if the direction is blocked on a callout, `Close` once
    /// closed).
    pub fn downstream(&mut self, data: impl Into<Vec<u8>>, end_of_stream: bool) -> NetworkAction {
        self.data(Peer::Downstream, data.into(), end_of_stream)
    }

    /// Bytes from the upstream endpoint, as [`TestConnection::downstream`].
    pub fn upstream(&mut self, data: impl Into<Vec<u8>>, end_of_stream: bool) -> NetworkAction {
        self.data(Peer::Upstream, data.into(), end_of_stream)
    }

    /// Whether data of `d` must wait: the filter waits for a callout on the
    /// new connection or in that direction (the host does not read it).
    fn blocked(&self, d: Direction) -> bool {
        self.paused_new || self.waiting[idx(d)]
    }

    fn data(&mut self, from: Peer, bytes: Vec<u8>, eos: bool) -> NetworkAction {
        if self.closed {
            return NetworkAction::Close;
        }
        let d = direction_of(from);
        let i = idx(d);
        if self.blocked(d) {
            self.pending[i].extend_from_slice(&bytes);
            self.pending_eos[i] |= eos;
            return NetworkAction::Pause;
        }
        let event = match from {
            Peer::Downstream => NetworkEvent::DownstreamData,
            Peer::Upstream => NetworkEvent::UpstreamData,
        };
        // Held data (a pause with nothing outstanding) comes again, with
        // the new bytes appended.
        let mut all = self.ex.borrow_mut().bodies[i].take().unwrap_or_default();
        self.paused[i] = false;
        all.extend_from_slice(&bytes);
        if !self.declared(event) {
            self.sent[i].extend_from_slice(&all);
            return NetworkAction::Continue;
        }
        self.ex.borrow_mut().bodies[i] = Some(all);
        let action = self.call(Some(d), |inst, ctx, c| {
            let b = Body(BufferHandle::new(c.0.ex.clone(), d));
            inst.data(ctx, c, from, &b, eos)
        });
        match action {
            NetworkAction::Continue => self.forward(d),
            NetworkAction::Pause if (self.outstanding() > 0 || !eos) && self.over_limit(d) => {
                // As the host (network_filter.rs `run_data`, `over_cap`): the
                // connection closes, what the filter held is discarded; not a
                // failure of the filter (it still gets `on_close`).
                self.limit_exceeded = Some(from);
                self.close_all();
            }
            NetworkAction::Pause if self.outstanding() > 0 => {
                self.paused[i] = true;
                self.waiting[i] = true;
            }
            NetworkAction::Pause if !eos => self.paused[i] = true,
            NetworkAction::Pause => {
                // As the host (network_filter.rs `run_data`): no later data
                // could come to end the hold. Fail open lets the data (as
                // the filter left it) go on.
                let side = match from {
                    Peer::Downstream => "downstream",
                    Peer::Upstream => "upstream",
                };
                if self.fail(format!(
                    "paused at the end of the {side} stream with no callout outstanding: \
                     nothing could resume it"
                )) {
                    self.forward(d);
                }
            }
            NetworkAction::Close => self.close_all(),
        }
        // The call may have ended the other direction's pause for good (it
        // cancelled the callout that pause waits for), as the host's pump
        // settles after each run.
        self.settle();
        action
    }

    /// Whether the data of `d` the filter just paused on (as it left it) is
    /// over the plugin's `limits.body`.
    fn over_limit(&self, d: Direction) -> bool {
        self.ex.borrow().bodies[idx(d)]
            .as_ref()
            .is_some_and(|b| b.len() > self.test.body_limit)
    }

    fn forward(&mut self, d: Direction) {
        let i = idx(d);
        let out = self.ex.borrow_mut().bodies[i].take().unwrap_or_default();
        self.sent[i].extend_from_slice(&out);
        self.paused[i] = false;
        self.waiting[i] = false;
    }

    /// The filter failed (`why`: the host's reason): its policy applies.
    /// Fail closed closes the connection (no `on_close` for the failed
    /// filter); fail open skips it: what it held in either direction goes
    /// on, and a pause of the new connection connects. `true` if skipped
    /// (the caller then lets the data of the failed call go on).
    fn fail(&mut self, why: String) -> bool {
        self.failure.get_or_insert(why);
        if !self.test.fail_open {
            self.close_all();
            return false;
        }
        if self.paused_new {
            self.connected();
        }
        for d in [Direction::Request, Direction::Response] {
            if self.paused[idx(d)] {
                self.forward(d);
            }
        }
        true
    }

    /// Ends the callout pauses nothing can end any more (no callout of the
    /// connection outstanding), as the host's `settle`: a failure of the
    /// filter. Fail open then delivers the data queued meanwhile (it passes
    /// the skipped filter).
    fn settle(&mut self) {
        if self.closed || self.failure.is_some() {
            return;
        }
        let paused = self.paused_new || self.waiting.contains(&true);
        if !paused || self.outstanding() > 0 {
            return;
        }
        if self.fail("paused with no callout outstanding: nothing could resume it".to_owned()) {
            self.deliver_pending();
        }
    }

    /// Delivers the data queued while a direction was blocked (the host's
    /// pumps read again once a pause ended), for the directions no longer
    /// blocked.
    fn deliver_pending(&mut self) {
        for (d, from) in [
            (Direction::Request, Peer::Downstream),
            (Direction::Response, Peer::Upstream),
        ] {
            let i = idx(d);
            if self.closed || self.blocked(d) {
                continue;
            }
            let queued = std::mem::take(&mut self.pending[i]);
            let eos = std::mem::take(&mut self.pending_eos[i]);
            if !queued.is_empty() || eos {
                self.data(from, queued, eos);
            }
        }
    }

    /// `peer`'s connection closed: `on_close(peer)` if that side was open,
    /// the event is declared and the filter did not fail.
    pub fn close(&mut self, peer: Peer) {
        let i = match peer {
            Peer::Downstream => 0,
            Peer::Upstream => 1,
        };
        if !self.open[i] {
            return;
        }
        self.open[i] = false;
        if self.declared(NetworkEvent::Close) {
            self.closing = true;
            self.call(None, |inst, ctx, c| {
                inst.close(ctx, c, peer);
                NetworkAction::Continue
            });
            self.closing = false;
        }
        if !self.open[0] && !self.open[1] {
            self.end();
        }
    }

    /// Close both sides (downstream first), as the host does when the
    /// connection is over or a filter returned `Close`.
    pub fn close_all(&mut self) {
        self.close(Peer::Downstream);
        self.close(Peer::Upstream);
        self.end();
    }

    /// The connection is over: held data is discarded and outstanding
    /// callouts are cancelled (never delivered).
    fn end(&mut self) {
        self.closed = true;
        {
            let mut ex = self.ex.borrow_mut();
            ex.bodies = [None, None];
        }
        self.paused = [false; 2];
        self.waiting = [false; 2];
        self.paused_new = false;
        let mut h = self.test.host.host.borrow_mut();
        for c in h.callouts.iter_mut() {
            if c.instance == self.test.id
                && c.context == Some(self.context)
                && c.state == CalloutState::Outstanding
            {
                c.state = CalloutState::Cancelled;
            }
        }
    }

    /// Deliver callout `id`'s response to `on_callout_response`. `None` if
    /// `id` is not an outstanding callout of this connection, or the
    /// connection is closed or its filter failed (the host would not call).
    /// `Continue` resumes every callout pause of the filter: connects (after
    /// a paused `on_new_connection`), forwards the data held by a callout
    /// pause, then delivers data queued meanwhile (data the filter buffers
    /// with nothing outstanding stays held). `Pause` keeps waiting, which
    /// with no other callout outstanding is a failure
    /// ([`failure`](Self::failure)); not paused, it means nothing.
    pub fn deliver_callout(
        &mut self,
        id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) -> Option<NetworkAction> {
        if self.closed
            || self.failure.is_some()
            || !self
                .test
                .host
                .take_outstanding(self.test.id, Some(self.context), id, false)
        {
            return None;
        }
        let response = as_received(response);
        let action = self.call(None, |i, ctx, c| i.callout_response(ctx, c, id, response));
        match action {
            NetworkAction::Continue => {
                if self.paused_new {
                    self.connected();
                }
                for d in [Direction::Request, Direction::Response] {
                    if self.waiting[idx(d)] {
                        self.forward(d);
                    }
                }
                self.deliver_pending();
            }
            NetworkAction::Pause => {}
            NetworkAction::Close => self.close_all(),
        }
        self.settle();
        Some(action)
    }

    /// Deliver the queued responses ([`TestHost::queue_callout_response`]) to
    /// this connection's outstanding callouts, in send order; the actions.
    /// Stops once the connection closed or its filter failed: the rest stay
    /// queued.
    pub fn deliver_callouts(&mut self) -> Vec<NetworkAction> {
        let pending = self
            .test
            .host
            .pending_callouts(self.test.id, Some(self.context));
        let mut actions = Vec::new();
        for (id, cluster) in pending {
            if self.closed || self.failure.is_some() {
                break;
            }
            let Some(r) = self.test.host.pop_queued(&cluster) else {
                continue;
            };
            if let Some(a) = self.deliver_callout(id, r) {
                actions.push(a);
            }
        }
        actions
    }

    /// Whether a `Pause` just returned is valid as the host sees it: the
    /// connection has a callout outstanding (a pause from
    /// `on_new_connection` or at end of stream without one is a failure:
    /// see [`failure`](Self::failure)).
    pub fn may_pause(&self) -> bool {
        self.outstanding() > 0
    }

    // ---- inspection ----

    /// Every byte forwarded to the upstream endpoint so far (after the
    /// filter's rewrites).
    pub fn sent_upstream(&self) -> Vec<u8> {
        self.sent[0].clone()
    }

    /// Every byte forwarded to the client so far.
    pub fn sent_downstream(&self) -> Vec<u8> {
        self.sent[1].clone()
    }

    /// The data of `from` held in the filter by a pause, if any.
    pub fn held(&self, from: Peer) -> Option<Vec<u8>> {
        let i = idx(direction_of(from));
        if self.paused[i] {
            self.ex.borrow().bodies[i].clone()
        } else {
            None
        }
    }

    /// The side whose data the filter held over the plugin's `limits.body`
    /// ([`NetworkFilterTest::body_limit`]), if it did: the host closed the
    /// connection then ([`is_closed`](Self::is_closed); the held data was
    /// discarded, `on_close` ran for each open side, as for a `Close`), and
    /// counts it in `legate_plugin_body_limit_exceeded_total`. The data call
    /// still returns the filter's `Pause`.
    pub fn limit_exceeded(&self) -> Option<Peer> {
        self.limit_exceeded
    }

    /// Whether the upstream connection was opened.
    pub fn is_connected(&self) -> bool {
        self.ex.borrow().upstream_address.is_some()
    }

    /// Whether the connection is over (closed by the filter, or both sides
    /// closed).
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}
