//! The host side of network (L4) filters on TCP proxy listeners: the
//! [`NetworkFilter`] trait every L4 filter implements (proxy-wasm modules and
//! components of the `network-filter` world, `wasm/network.rs`), the
//! per-listener chains
//! ([`NetworkFilters`]) and the per-connection run ([`serve`]), which
//! `tcp_proxy.rs` uses instead of its plain copy when a listener has filters.
//!
//! A connection's state as filters see it is an [`Exchange`] (its facts,
//! `upstream`, queued callouts), so the Wasm hosts reuse their exchange plumbing:
//! the data of a call is in `bodies[0]` (from downstream) or `bodies[1]` (from
//! upstream), where the filter may rewrite it (a proxy-wasm filter finds what it
//! holds there in its callout responses too: `held_in_callouts`).
//!
//! Order: `on_new_connection` in chain order before the upstream connect;
//! downstream data in chain order, upstream data in reverse order (as HTTP
//! request and response phases); close notifications per side once the
//! connection is over, then `on_done`. A `Pause` from a data call holds the data
//! in that filter: with a callout of the filter outstanding, that direction stops
//! reading until the callout response resumes it (the held data then goes on to
//! the next filter); with none, the next data of that direction is appended and
//! the filter called again with all of it (Envoy's buffering), up to the
//! filter's cap. Each direction and the new connection have their own callout
//! pause, so both directions can wait at once, and a filter's `Continue` from a
//! callout response resumes every pause of that filter (and lets data it
//! buffers go on). A wake-up a filter arms ([`Exchange::wakes`]: a proxy-wasm
//! filter's pause, which another callback of its VM may end) counts as
//! something that can end its pauses, as a callout does, except that data
//! paused before its end keeps being buffered; its delivery resumes as a
//! callout response does. A filter with a [`NetworkFilter::pause_limit`]
//! fails a pause that outlives it. Failures follow the
//! plugin's policy as for HTTP filters: `fail: closed` closes the connection,
//! `fail: open` skips the filter for the rest of the connection.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::{Config, Name};
use crate::filter::{CalloutResult, CalloutSender, ConnFacts, Exchange, FilterKey, HttpFilter};
use crate::io::{Activity, Verdict as Idle};

/// One side of a proxied connection (the WIT `peer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The client connection.
    Downstream,
    /// The connection to the upstream endpoint.
    Upstream,
}

impl Peer {
    /// 0 for downstream, 1 for upstream: the index of [`Exchange::bodies`] that
    /// holds data read from this peer.
    pub fn idx(self) -> usize {
        match self {
            Peer::Downstream => 0,
            Peer::Upstream => 1,
        }
    }

    /// `downstream` / `upstream`, for logs and stats labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Peer::Downstream => "downstream",
            Peer::Upstream => "upstream",
        }
    }
}

/// What an L4 filter tells the host after a call (the WIT `network-action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetVerdict {
    /// Go on: forward the data, or connect upstream.
    Continue,
    /// Hold the data (or the connection), see the module docs.
    Pause,
    /// Close both connections; held data is discarded.
    Close,
    /// From [`NetworkFilter::on_callout_response`]: resume this filter's pause
    /// of the data from this peer (for `Downstream`, also of the new
    /// connection), not the other direction's (proxy-wasm's
    /// `proxy_continue_stream` names one). `Continue` resumes every pause of
    /// the filter. From other calls, the same as `Continue`.
    Resume(Peer),
}

/// An L4 filter: one loaded plugin, shared by every worker (per-worker state is
/// the implementation's, as for [`HttpFilter`]). `Err` from a call is a failure
/// (trap, deadline, invalid result) handled by the plugin's policy.
pub trait NetworkFilter: Send + Sync {
    /// The plugin name.
    fn name(&self) -> &str;
    /// `fail: open`: a failure skips the filter instead of closing the connection.
    fn fail_open(&self) -> bool;
    /// The most bytes this filter may hold (`Pause`) per direction.
    fn buffer_limit(&self) -> usize;
    /// Held data went over [`Self::buffer_limit`] (for the filter's stats).
    fn buffer_limit_exceeded(&self, from: Peer) {
        let _ = from;
    }
    /// Whether [`Self::on_callout_response`] finds the data this filter
    /// holds in `c.bodies` (per direction, writable: what is left there stays
    /// held). proxy-wasm filters do (Envoy's read buffer stays available
    /// after `StopIteration`); components do not (abi/README.md §11).
    fn held_in_callouts(&self) -> bool {
        false
    }
    /// The chain found this filter failed without a failing call: it paused
    /// on callouts that were all cancelled, so nothing can end the pause. For
    /// the filter's stats, as its own failures.
    fn host_failure(&self) {}
    /// How long one pause of this filter may hold the connection or its
    /// data (`limits.pause`), from its first `Pause` until what it holds
    /// goes on; past it the pause fails by the failure policy. `None`: no
    /// bound (component filters: their pauses end with a callout, which has
    /// its own timeout, or with more data).
    fn pause_limit(&self) -> Option<Duration> {
        None
    }
    /// The chain gave up this filter's pause (past its `limits.pause`): the
    /// filter drops what it kept for it (a wake-up it armed).
    fn pause_abandoned(&self, worker: usize, c: &mut Exchange) {
        let _ = (worker, c);
    }
    /// A downstream connection was accepted (after TLS), before connecting
    /// upstream. The first call for `c`: the implementation creates its
    /// per-connection state here.
    fn on_new_connection(&self, worker: usize, c: &mut Exchange) -> Result<NetVerdict, String>;
    /// Data read from `from`, in `c.bodies[from.idx()]` (writable: what is left
    /// there is forwarded). `end_of_stream`: `from` half-closed.
    fn on_data(
        &self,
        worker: usize,
        c: &mut Exchange,
        from: Peer,
        end_of_stream: bool,
    ) -> Result<NetVerdict, String>;
    /// The result of callout `id`, which this filter queued for `c`. If the
    /// filter is paused, `Continue` resumes it (every pause of it: the new
    /// connection's, either direction's), `Resume` one direction's.
    fn on_callout_response(
        &self,
        worker: usize,
        c: &mut Exchange,
        id: u64,
        result: CalloutResult,
    ) -> Result<NetVerdict, String>;
    /// `peer`'s connection closed: by the peer (`remote`) or by the host.
    fn on_close(&self, worker: usize, c: &mut Exchange, peer: Peer, remote: bool);
    /// The connection is over: free its state (always called for a filter that
    /// saw `on_new_connection`).
    fn on_done(&self, worker: usize, c: &mut Exchange);
}

/// The network filter chains of one config version, per TCP listener.
#[derive(Default)]
pub struct NetworkFilters {
    chains: HashMap<Name, Arc<[Arc<dyn NetworkFilter>]>>,
}

impl NetworkFilters {
    /// The chains of `config`'s TCP listeners from the loaded plugins. A plugin
    /// that is not a network filter on a TCP listener, or a network-only plugin
    /// on an HTTP listener, is an error naming both.
    pub fn build(
        config: &Config,
        loaded: &HashMap<FilterKey, Arc<dyn HttpFilter>>,
    ) -> anyhow::Result<Self> {
        let get = |plugin: &Name| {
            let key = FilterKey {
                plugin: plugin.clone(),
                config_override: None,
            };
            loaded
                .get(&key)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("plugin `{plugin}` was not loaded"))
        };
        let mut chains = HashMap::new();
        for l in &config.listeners {
            let l = &l.value;
            if let Some(http) = &l.http {
                for f in &http.filters {
                    let name = &f.value.plugin.value;
                    if get(name)?.phases().0 == 0 {
                        anyhow::bail!(
                            "listener `{}`: plugin `{name}` is a network (L4) filter, but \
                             `http.filters` takes HTTP filters; use it in a TCP listener's \
                             `tcp.filters`",
                            l.name
                        );
                    }
                }
            }
            let Some(tcp) = &l.tcp else { continue };
            if tcp.filters.is_empty() {
                continue;
            }
            let mut chain = Vec::new();
            for f in &tcp.filters {
                let name = &f.value.plugin.value;
                let Some(nf) = get(name)?.network() else {
                    anyhow::bail!(
                        "listener `{}`: plugin `{name}` is an HTTP filter, but `tcp.filters` \
                         takes network filters (a component of the `network-filter` world, \
                         or a proxy-wasm module); move it to an HTTP listener's \
                         `http.filters`",
                        l.name
                    );
                };
                chain.push(nf);
            }
            chains.insert(l.name.clone(), chain.into());
        }
        Ok(NetworkFilters { chains })
    }

    /// The chain of TCP listener `listener`; `None` if it has no filters.
    pub fn get(&self, listener: &Name) -> Option<Arc<[Arc<dyn NetworkFilter>]>> {
        self.chains.get(listener).cloned()
    }
}

/// Connection contexts start here so they never meet an HTTP exchange's in a
/// plugin used on both kinds of listener.
static NEXT_CONTEXT: AtomicU64 = AtomicU64::new(FIRST_CONTEXT);

/// Whether exchange context `context` is a TCP connection's.
pub fn is_connection(context: u64) -> bool {
    context >= FIRST_CONTEXT
}

const FIRST_CONTEXT: u64 = 1 << 62;

/// The connection's state for filters: an exchange holding its facts, with the
/// listener's name as `authority` and the cluster's as `path` (a connection has
/// neither; the Wasm hosts answer `listener-name` and `cluster` from them).
pub fn connection(facts: Arc<ConnFacts>, listener: &Name, cluster: &Name) -> Exchange {
    let mut x = Exchange::placeholder();
    x.authority = listener.to_string();
    x.path = cluster.to_string();
    x.context = NEXT_CONTEXT.fetch_add(1, Relaxed);
    x.https = facts.tls.is_some();
    x.conn = facts;
    x.start = SystemTime::now();
    x
}

/// A callout result or a wake-up on its way back.
pub struct Delivery {
    /// The filter that sent the callout or armed the wake-up.
    filter: usize,
    /// The callout's (or wake-up's) id.
    id: u64,
    result: CalloutResult,
    /// A wake-up ([`Exchange::wakes`]), not a callout.
    wake: bool,
}

/// The pause slot of the new connection (the data slots are [`Peer::idx`]).
const NEW: usize = 2;

/// Where a filter paused waiting for a callout.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// In `on_new_connection`.
    New,
    /// In a data call of direction `from`, at position `pos` of its order.
    Data { from: Peer, pos: usize, eos: bool },
}

/// What a run over the chain produced.
#[derive(Debug)]
enum Step {
    /// Go on (connect, or forward this data).
    Go(Vec<u8>),
    /// A filter holds it.
    Held,
    /// Close the connection.
    Close,
}

/// One filter's pause bookkeeping in a [`NetChain`].
#[derive(Clone, Copy, Default)]
struct Pauses {
    /// Wake-ups not delivered yet ([`Exchange::wakes`]: a proxy-wasm
    /// filter's pause that another callback of its VM may end). A filter
    /// with one holds its pauses for it, as for a callout.
    wakes: usize,
    /// When its pause in each slot (data from downstream, from upstream
    /// ([`Peer::idx`]), the new connection ([`NEW`])) outlives its
    /// `limits.pause` ([`NetworkFilter::pause_limit`]); set when the pause
    /// starts (a callout pause, or data held), cleared when it ends.
    deadlines: [Option<tokio::time::Instant>; 3],
    /// Data it holds that a resume released while a pause later in that
    /// direction's order waited (that data is older): it goes on when that
    /// pause ends ([`NetChain::release_held`]), per direction.
    go_on: [bool; 2],
}

/// One connection's run through a listener's network chain.
pub struct NetChain {
    worker: usize,
    filters: Arc<[Arc<dyn NetworkFilter>]>,
    /// The connection as filters see it.
    pub x: Exchange,
    /// Filters bypassed after a fail-open failure.
    skipped: Vec<bool>,
    /// Filters a call of which failed (their state may be gone: no close
    /// notification); not those the chain failed for a pause.
    failed: Vec<bool>,
    /// Data each filter holds (`Pause`), per direction ([`Peer::idx`]).
    held: Vec<[Vec<u8>; 2]>,
    /// Callouts of each filter not delivered yet.
    outstanding: Vec<usize>,
    /// Each filter's wake-ups, pause deadlines and released data (one
    /// allocation for the three).
    pauses: Vec<Pauses>,
    /// A deadline was set since the timer last looked ([`serve`]).
    deadline_set: bool,
    /// The filter waiting for a callout, and where, per pause slot: data from
    /// downstream and from upstream ([`Peer::idx`]), the new connection
    /// ([`NEW`]). Each direction stops reading only for its own, so both can
    /// wait at once (on one filter or two).
    paused: [Option<(usize, Stage)>; 3],
    /// A pause ended since the pumps last looked: they must look at `out`,
    /// `eos_out` and `closing` again.
    woke: bool,
    /// Data a resume released, per direction, for the pump to write.
    out: [Vec<u8>; 2],
    /// End of stream reached the end of the chain in that direction while held.
    eos_out: [bool; 2],
    /// A filter (or a failure) closed the connection.
    closing: bool,
    /// A read from that side failed (a reset): the peer closed, though the
    /// host then closes the connection ([`Peer::idx`]).
    reset: [bool; 2],
    /// Filters that saw `on_new_connection` (they get `on_close` and `on_done`).
    entered: usize,
    callouts: Rc<dyn CalloutSender>,
    deliver: tokio::sync::mpsc::UnboundedSender<Delivery>,
    /// Callouts in flight: dropping the chain aborts them.
    inflight: crate::filter::Inflight<()>,
}

impl NetChain {
    /// A chain for connection `x`; the receiver gets callout results.
    pub fn new(
        worker: usize,
        filters: Arc<[Arc<dyn NetworkFilter>]>,
        x: Exchange,
        callouts: Rc<dyn CalloutSender>,
    ) -> (Self, tokio::sync::mpsc::UnboundedReceiver<Delivery>) {
        let n = filters.len();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let chain = NetChain {
            worker,
            filters,
            x,
            skipped: vec![false; n],
            failed: vec![false; n],
            held: vec![[Vec::new(), Vec::new()]; n],
            outstanding: vec![0; n],
            pauses: vec![Pauses::default(); n],
            deadline_set: false,
            paused: [None; 3],
            woke: false,
            out: [Vec::new(), Vec::new()],
            eos_out: [false, false],
            closing: false,
            reset: [false, false],
            entered: 0,
            callouts,
            deliver: tx,
            inflight: crate::filter::Inflight::new(),
        };
        (chain, rx)
    }

    /// Sends the callouts filter `i` queued in its last call.
    fn dispatch(&mut self, i: usize) {
        for req in std::mem::take(&mut self.x.callouts) {
            // Results come through `deliver`, never from the set: drop the
            // finished tasks, which it keeps until joined.
            while self.inflight.try_join_next().is_some() {}
            let id = req.id;
            let fut = self.callouts.send(req);
            let tx = self.deliver.clone();
            self.outstanding[i] += 1;
            self.inflight.spawn(i, id, async move {
                let _ = tx.send(Delivery {
                    filter: i,
                    id,
                    result: fut.await,
                    wake: false,
                });
            });
        }
        for (id, rx) in std::mem::take(&mut self.x.wakes) {
            // Fired, or dropped (the filter gave the wait up, its VM died):
            // either way the filter is told.
            let tx = self.deliver.clone();
            self.pauses[i].wakes += 1;
            self.inflight.spawn(i, id, async move {
                let result = rx
                    .await
                    .unwrap_or(Err(crate::filter::CalloutError::Unavailable));
                let _ = tx.send(Delivery {
                    filter: i,
                    id,
                    result,
                    wake: true,
                });
            });
        }
        for id in std::mem::take(&mut self.x.cancelled) {
            // An aborted callout delivers nothing: it is not outstanding.
            if self.inflight.cancel(i, id) {
                self.outstanding[i] = self.outstanding[i].saturating_sub(1);
            }
        }
    }

    /// Applies filter `i`'s failure policy: `true` if the filter is skipped.
    /// `broken`: a call of it failed (a trap, its deadline, an invalid
    /// result), so its state may be gone and it gets no close notification.
    /// A failure the chain finds itself (a pause nothing could end, or one
    /// past its `limits.pause`) leaves the filter whole: closed by it (fail
    /// closed), the filter gets its close notifications, as for a close over
    /// its cap.
    fn failure(&mut self, i: usize, phase: &str, why: &str, broken: bool) -> bool {
        let f = &self.filters[i];
        tracing::warn!(plugin = f.name(), phase, "plugin failure: {why}");
        self.failed[i] |= broken;
        self.pauses[i].deadlines = [None; 3];
        if f.fail_open() {
            // `settle` ends this filter's pauses and lets what it holds in
            // either direction run on past it.
            self.skipped[i] = true;
            true
        } else {
            false
        }
    }

    /// Filter `i`'s position in the order of data from `from`.
    fn position(&self, i: usize, from: Peer) -> usize {
        match from {
            Peer::Downstream => i,
            Peer::Upstream => self.filters.len() - 1 - i,
        }
    }

    /// The filter positions data from `from` runs through.
    fn order(&self, from: Peer) -> Vec<usize> {
        let n = self.filters.len();
        match from {
            Peer::Downstream => (0..n).collect(),
            Peer::Upstream => (0..n).rev().collect(),
        }
    }

    /// `on_new_connection` from filter `start` on.
    fn run_new(&mut self, start: usize) -> Step {
        for i in start..self.filters.len() {
            self.entered = self.entered.max(i + 1);
            if self.skipped[i] {
                continue;
            }
            let f = self.filters[i].clone();
            let r = f.on_new_connection(self.worker, &mut self.x);
            self.dispatch(i);
            match r {
                Ok(NetVerdict::Continue | NetVerdict::Resume(_)) => {}
                Ok(NetVerdict::Close) => return Step::Close,
                Ok(NetVerdict::Pause) if self.resumable(i) => {
                    self.paused[NEW] = Some((i, Stage::New));
                    self.start_deadline(i, NEW);
                    return Step::Held;
                }
                Ok(NetVerdict::Pause) => {
                    let why = "paused the new connection with no callout outstanding: nothing \
                               could resume it";
                    if !self.failure(i, "new_connection", why, false) {
                        return Step::Close;
                    }
                }
                Err(e) => {
                    if !self.failure(i, "new_connection", &e, true) {
                        return Step::Close;
                    }
                }
            }
        }
        Step::Go(Vec::new())
    }

    /// Data from `from` through the chain from position `pos` of its order.
    fn run_data(&mut self, from: Peer, mut data: Vec<u8>, eos: bool, start: usize) -> Step {
        let d = from.idx();
        let order = self.order(from);
        let phase = match from {
            Peer::Downstream => "downstream_data",
            Peer::Upstream => "upstream_data",
        };
        for (pos, &i) in order.iter().enumerate().skip(start) {
            // Before the skip: data a skipped filter held goes on first.
            let mut held = std::mem::take(&mut self.held[i][d]);
            if !held.is_empty() {
                held.append(&mut data);
                data = held;
            }
            // What it held goes with this data: a resume asked for it
            // meanwhile is moot, the filter decides again.
            self.pauses[i].go_on[d] = false;
            if self.skipped[i] {
                continue;
            }
            let f = self.filters[i].clone();
            self.x.bodies[d] = Some(data.into());
            let r = f.on_data(self.worker, &mut self.x, from, eos);
            data = self.x.bodies[d].take().unwrap_or_default().into_vec();
            self.dispatch(i);
            if !matches!(r, Ok(NetVerdict::Pause)) {
                // Whatever it held went on with this call (or is dropped).
                self.pauses[i].deadlines[d] = None;
            }
            match r {
                Ok(NetVerdict::Continue | NetVerdict::Resume(_)) => {}
                Ok(NetVerdict::Close) => return Step::Close,
                Ok(NetVerdict::Pause)
                    if (self.resumable(i) || !eos) && self.over_cap(i, from, &data) =>
                {
                    return Step::Close;
                }
                Ok(NetVerdict::Pause) if self.outstanding[i] > 0 || eos && self.resumable(i) => {
                    // Waits for a callout, or (at the end of the stream) for
                    // a resume from another callback: that direction stops.
                    self.held[i][d] = data;
                    self.paused[d] = Some((i, Stage::Data { from, pos, eos }));
                    self.start_deadline(i, d);
                    return Step::Held;
                }
                Ok(NetVerdict::Pause) if !eos => {
                    // Envoy's buffering: called again with this and the next
                    // data, until it continues or a resume from another
                    // callback lets the data go on.
                    self.held[i][d] = data;
                    self.start_deadline(i, d);
                    return Step::Held;
                }
                Ok(NetVerdict::Pause) => {
                    let why = format!(
                        "paused at the end of the {} stream with no callout outstanding: \
                         nothing could resume it",
                        from.as_str()
                    );
                    if !self.failure(i, phase, &why, false) {
                        return Step::Close;
                    }
                }
                Err(e) => {
                    if !self.failure(i, phase, &e, true) {
                        return Step::Close;
                    }
                }
            }
        }
        Step::Go(data)
    }

    /// Whether `held`, which filter `i` holds from `from`, is over its cap
    /// (the connection then closes). Data passing through is not capped.
    fn over_cap(&self, i: usize, from: Peer, held: &[u8]) -> bool {
        let f = &self.filters[i];
        if held.len() <= f.buffer_limit() {
            return false;
        }
        f.buffer_limit_exceeded(from);
        tracing::warn!(
            plugin = f.name(),
            "the {} data this filter holds is over its cap of {} bytes; closing",
            from.as_str(),
            f.buffer_limit()
        );
        true
    }

    /// Whether data from `from` must wait (a filter waits for a callout on the
    /// new connection or in that direction).
    fn blocked(&self, from: Peer) -> bool {
        self.paused[NEW].is_some() || self.paused[from.idx()].is_some()
    }

    /// Delivers a callout result; a resume runs the rest of the chain from where
    /// the filter paused, for each pause of that filter. `Some(step)` when the
    /// paused new connection resumed.
    fn deliver(&mut self, d: Delivery) -> Option<Step> {
        let Delivery {
            filter: i,
            id,
            result,
            wake,
        } = d;
        if wake {
            self.pauses[i].wakes = self.pauses[i].wakes.saturating_sub(1);
        } else {
            self.outstanding[i] = self.outstanding[i].saturating_sub(1);
        }
        if self.closing {
            return None;
        }
        let f = self.filters[i].clone();
        let r = if self.skipped[i] {
            Ok(NetVerdict::Continue)
        } else if f.held_in_callouts() {
            // What it holds in each direction it pauses, even if that is
            // only the end of the stream (empty): Envoy keeps its read
            // buffer after `StopIteration`, so the callback may append to it.
            for d in 0..2 {
                if self.pauses(i, d) {
                    self.x.bodies[d] = Some(std::mem::take(&mut self.held[i][d]).into());
                }
            }
            let r = f.on_callout_response(self.worker, &mut self.x, id, result);
            for d in 0..2 {
                if let Some(b) = self.x.bodies[d].take() {
                    self.held[i][d] = b.into_vec();
                }
            }
            r
        } else {
            f.on_callout_response(self.worker, &mut self.x, id, result)
        };
        self.dispatch(i);
        match r {
            Ok(v @ (NetVerdict::Continue | NetVerdict::Resume(_))) => {
                let slots: &[usize] = match v {
                    NetVerdict::Resume(Peer::Downstream) => &[NEW, 0],
                    NetVerdict::Resume(Peer::Upstream) => &[1],
                    _ => &[NEW, 0, 1],
                };
                let mut step = None;
                for &slot in slots {
                    if matches!(self.paused[slot], Some((p, _)) if p == i) {
                        step = step.or(self.resume(slot));
                    }
                }
                if step.is_some() {
                    return step;
                }
                // Data it holds without waiting on a callout (Envoy's read
                // buffer after `StopIteration`) goes on too, as Envoy's
                // `continueReading`.
                for from in [Peer::Downstream, Peer::Upstream] {
                    if slots.contains(&from.idx()) {
                        self.release_held(i, from);
                    }
                }
            }
            Ok(NetVerdict::Close) => {
                self.closing = true;
                return Some(Step::Close);
            }
            Err(e) if !self.failure(i, "callout_response", &e, true) => {
                self.closing = true;
                return Some(Step::Close);
            }
            _ => {}
        }
        self.settle()
    }

    /// Ends the pauses that nothing can end any more: their filter was
    /// skipped after a failure (fail open), or it has no callout outstanding
    /// (it answered a callout response with `pause`, or cancelled the last
    /// callout it waited for while called for the other direction). The
    /// latter is a failure: fail closed closes the connection
    /// (`Some(Step::Close)`); fail open, like a skipped filter, lets what it
    /// held run on past it. Walks the pause slots until none changes (ending
    /// one pause may end another: resumed data can make a filter fail).
    fn settle(&mut self) -> Option<Step> {
        loop {
            let mut changed = false;
            for slot in [NEW, 0, 1] {
                let Some((p, _)) = self.paused[slot] else {
                    continue;
                };
                if self.closing {
                    return None;
                }
                if !self.skipped[p] {
                    if self.resumable(p) {
                        continue;
                    }
                    let why = "paused with no callout outstanding: nothing could resume it";
                    self.filters[p].host_failure();
                    if !self.failure(p, "callout_response", why, false) {
                        self.closing = true;
                        return Some(Step::Close);
                    }
                }
                if let Some(step) = self.resume(slot) {
                    return Some(step);
                }
                changed = true;
            }
            match self.release_skipped() {
                Some(true) => {}
                Some(false) if changed => {}
                Some(false) => return None,
                None => return Some(Step::Close),
            }
        }
    }

    /// Lets the data skipped filters hold (they buffered it before they
    /// failed) run on past them, unless a callout pause later in that
    /// direction's order waits (that data is older: this follows it when that
    /// pause ends). Whether something ran; `None` if that closed the connection.
    fn release_skipped(&mut self) -> Option<bool> {
        let mut ran = false;
        for i in 0..self.filters.len() {
            if !self.skipped[i] && !self.pauses[i].go_on.contains(&true) {
                continue;
            }
            for from in [Peer::Downstream, Peer::Upstream] {
                let d = from.idx();
                if !self.skipped[i] && !self.pauses[i].go_on[d] {
                    continue;
                }
                let pos = self.position(i, from);
                let waits_later = matches!(
                    self.paused[d],
                    Some((_, Stage::Data { pos: p, .. })) if p > pos
                );
                if self.held[i][d].is_empty() || waits_later || self.closing {
                    continue;
                }
                let data = std::mem::take(&mut self.held[i][d]);
                self.pauses[i].go_on[d] = false;
                self.pauses[i].deadlines[d] = None;
                self.woke = true;
                ran = true;
                match self.run_data(from, data, false, pos + 1) {
                    Step::Go(data) => self.out[d].extend_from_slice(&data),
                    Step::Held => {}
                    Step::Close => {
                        self.closing = true;
                        return None;
                    }
                }
            }
        }
        Some(ran)
    }

    /// Runs the rest of the chain from where the filter paused in `slot`.
    /// `Some(step)` when the paused new connection resumed.
    fn resume(&mut self, slot: usize) -> Option<Step> {
        let (i, stage) = self.paused[slot].take()?;
        self.pauses[i].deadlines[slot] = None;
        self.woke = true;
        match stage {
            Stage::New => Some(self.run_new(i + 1)),
            Stage::Data { from, pos, eos } => {
                let d = from.idx();
                let data = std::mem::take(&mut self.held[i][d]);
                match self.run_data(from, data, eos, pos + 1) {
                    Step::Go(data) => {
                        self.out[d].extend_from_slice(&data);
                        self.eos_out[d] |= eos;
                    }
                    Step::Held => {}
                    Step::Close => self.closing = true,
                }
                None
            }
        }
    }

    /// Whether something other than new data can end a pause of filter `i`:
    /// a callout of it, or a wake-up it armed (another callback of its VM).
    fn resumable(&self, i: usize) -> bool {
        self.outstanding[i] > 0 || self.pauses[i].wakes > 0
    }

    /// Filter `i`'s pause in `slot` starts (or goes on): its `limits.pause`
    /// runs from the first `Pause`, not from each.
    fn start_deadline(&mut self, i: usize, slot: usize) {
        if self.pauses[i].deadlines[slot].is_some() {
            return;
        }
        if let Some(limit) = self.filters[i].pause_limit() {
            self.pauses[i].deadlines[slot] = Some(tokio::time::Instant::now() + limit);
            self.deadline_set = true;
        }
    }

    /// When the first pause outlives its `limits.pause` ([`Self::expire`]);
    /// `None` while nothing is paused (or nothing paused has a bound).
    fn next_deadline(&self) -> Option<tokio::time::Instant> {
        self.pauses.iter().flat_map(|p| p.deadlines).flatten().min()
    }

    /// Whether filter `i` still pauses in `slot`: a callout pause, or data
    /// it holds.
    fn pauses(&self, i: usize, slot: usize) -> bool {
        matches!(self.paused[slot], Some((p, _)) if p == i)
            || slot < NEW && !self.held[i][slot].is_empty()
    }

    /// Fails the pauses that outlived their filter's `limits.pause` by
    /// `now`, as HTTP pauses: counted as the filter's failure, then its
    /// policy (fail closed: `Some(Step::Close)`; fail open: the filter is
    /// skipped and what it held goes on, see [`Self::settle`]).
    fn expire(&mut self, now: tokio::time::Instant) -> Option<Step> {
        let mut skipped = false;
        for i in 0..self.filters.len() {
            for slot in [NEW, 0, 1] {
                let Some(t) = self.pauses[i].deadlines[slot] else {
                    continue;
                };
                if t > now {
                    continue;
                }
                self.pauses[i].deadlines[slot] = None;
                if self.closing || self.skipped[i] || !self.pauses(i, slot) {
                    continue;
                }
                let f = self.filters[i].clone();
                f.host_failure();
                f.pause_abandoned(self.worker, &mut self.x);
                self.dispatch(i);
                let phase = match slot {
                    NEW => "new_connection",
                    0 => "downstream_data",
                    _ => "upstream_data",
                };
                let why = format!(
                    "paused for longer than its `limits.pause` ({:?}) without being resumed",
                    f.pause_limit().unwrap_or_default()
                );
                if !self.failure(i, phase, &why, false) {
                    self.closing = true;
                    return Some(Step::Close);
                }
                skipped = true;
            }
        }
        if skipped {
            self.woke = true;
            return self.settle();
        }
        None
    }

    /// A resume of filter `i` for data from `from` it holds without a
    /// callout pause (buffered): the data goes on from the next filter, now,
    /// or (a callout pause later in that direction's order waits: its data
    /// is older) once that pause ended ([`Self::release_skipped`]).
    fn release_held(&mut self, i: usize, from: Peer) {
        let d = from.idx();
        if self.held[i][d].is_empty() || self.closing {
            return;
        }
        if matches!(self.paused[d], Some((p, _)) if p == i) {
            // A callout pause: `resume` decides.
            return;
        }
        self.pauses[i].go_on[d] = true;
        let _ = self.release_skipped();
    }

    /// Close notifications for the sides that were open (not to filters a
    /// call of which failed, nor to skipped ones), then `on_done`, for the
    /// filters that saw the connection.
    fn finish(&mut self, closed: &[(Peer, bool)]) {
        for i in 0..self.entered {
            let f = self.filters[i].clone();
            for &(peer, remote) in closed {
                if !self.skipped[i] && !self.failed[i] {
                    f.on_close(self.worker, &mut self.x, peer, remote);
                }
            }
            f.on_done(self.worker, &mut self.x);
        }
        self.entered = 0;
    }
}

impl Drop for NetChain {
    /// A chain dropped before it finished (an early return, a connection task
    /// dropped mid-way) still gives the filters that saw the connection their
    /// close notifications (local: the host ends it) and `on_done`, which
    /// frees their per-connection state.
    fn drop(&mut self) {
        if self.entered == 0 {
            return;
        }
        if self.x.upstream.is_some() {
            self.finish(&[(Peer::Downstream, false), (Peer::Upstream, false)]);
        } else {
            self.finish(&[(Peer::Downstream, false)]);
        }
    }
}

/// Callout results for a chain.
pub type Deliveries = tokio::sync::mpsc::UnboundedReceiver<Delivery>;

/// Sleeps until `t`; never without one.
async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Runs `on_new_connection` over the chain, waiting out pauses (up to their
/// `limits.pause`): whether to connect upstream.
pub async fn start(chain: &mut NetChain, rx: &mut Deliveries) -> bool {
    let mut step = chain.run_new(0);
    loop {
        match step {
            Step::Go(_) => return true,
            Step::Close => {
                chain.closing = true;
                return false;
            }
            Step::Held => {
                let deadline = chain.next_deadline();
                step = tokio::select! {
                    d = rx.recv() => {
                        let Some(d) = d else {
                            return false;
                        };
                        chain.deliver(d).unwrap_or(Step::Held)
                    }
                    () = sleep_until(deadline) => {
                        chain.expire(tokio::time::Instant::now()).unwrap_or(Step::Held)
                    }
                };
            }
        }
    }
}

/// How a pump ended.
#[derive(Clone, Copy, Default)]
struct Ended {
    /// The peer it read from closed (EOF): a remote close.
    remote: bool,
}

/// Reads from `from`, runs the chain, writes to the other side. Ends at the end
/// of `from`'s stream (after half-closing the other side) or when the
/// connection closes; a read error (the peer reset) closes it, with no
/// end-of-stream call, as the plain path and Envoy do.
async fn pump<R, W>(
    chain: &RefCell<NetChain>,
    from: Peer,
    mut r: R,
    mut w: W,
    mut changed: tokio::sync::watch::Receiver<u64>,
    wake: &tokio::sync::watch::Sender<u64>,
) -> Ended
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let d = from.idx();
    let mut buf = vec![0u8; 16 * 1024];
    let mut ended = Ended::default();
    let close = |wake: &tokio::sync::watch::Sender<u64>| {
        chain.borrow_mut().closing = true;
        wake.send_modify(|v| *v += 1);
    };
    loop {
        let (out, eos_out) = {
            let mut c = chain.borrow_mut();
            if c.closing {
                return ended;
            }
            let eos = std::mem::take(&mut c.eos_out[d]);
            (std::mem::take(&mut c.out[d]), eos)
        };
        if !out.is_empty() && w.write_all(&out).await.is_err() {
            close(wake);
            return ended;
        }
        if eos_out {
            let _ = w.shutdown().await;
            return ended;
        }
        if chain.borrow().blocked(from) {
            if changed.changed().await.is_err() {
                return ended;
            }
            continue;
        }
        if ended.remote {
            // Our end of stream is held by a filter (buffering): wait for a
            // resume or a close.
            if changed.changed().await.is_err() {
                return ended;
            }
            continue;
        }
        let n = tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!("tcp {} read failed: {e}; closing", from.as_str());
                    chain.borrow_mut().reset[d] = true;
                    close(wake);
                    return ended;
                }
            },
            c = changed.changed() => {
                if c.is_err() {
                    return ended;
                }
                continue;
            }
        };
        let eos = n == 0;
        ended.remote = eos;
        let (step, settled) = {
            let mut c = chain.borrow_mut();
            let step = c.run_data(from, buf[..n].to_vec(), eos, 0);
            // The filters called may have ended another direction's pause
            // for good (a failure, a cancelled callout).
            let settled = c.settle();
            // (A pause that started has a deadline for the timer.)
            let woke = std::mem::take(&mut c.woke) | std::mem::take(&mut c.deadline_set);
            (step, woke || settled.is_some())
        };
        if settled {
            wake.send_modify(|v| *v += 1);
        }
        match step {
            Step::Go(data) => {
                if !data.is_empty() && w.write_all(&data).await.is_err() {
                    close(wake);
                    return ended;
                }
                if eos {
                    let _ = w.shutdown().await;
                    return ended;
                }
            }
            Step::Held => {}
            Step::Close => {
                close(wake);
                return ended;
            }
        }
    }
}

/// What ended a connection [`serve`] ran (the access log's `cause`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Both directions finished: a peer closed or reset its side (which one
    /// the caller sees on its sockets).
    Peers,
    /// The idle timeout.
    Idle,
    /// `cut`: the listener stopped and its drain time passed.
    Drain,
    /// A filter closed the connection (or failed with `fail: closed`).
    Filter,
}

/// Proxies a connection through its chain after [`start`] and the upstream
/// connect, with the idle timeout over `activity`, until `cut` resolves at the
/// latest (the listener stopped and its drain time passed); then the close
/// notifications (local, for an idle or cut connection) and `on_done`.
/// Returns when the connection is over, with what ended it.
pub async fn serve<D, U>(
    chain: NetChain,
    mut rx: Deliveries,
    down: D,
    up: U,
    activity: &Activity,
    idle: Duration,
    mut cut: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Ending
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut timed_out = false;
    let mut cut_off = false;
    let (mut chain, down_ended, up_ended, closed) = {
        let cell = RefCell::new(chain);
        let (wake, changed) = tokio::sync::watch::channel(0u64);
        let (dr, dw) = tokio::io::split(down);
        let (ur, uw) = tokio::io::split(up);
        let (result, closed) = {
            let pumps = async {
                tokio::join!(
                    pump(&cell, Peer::Downstream, dr, uw, changed.clone(), &wake),
                    pump(&cell, Peer::Upstream, ur, dw, changed.clone(), &wake),
                )
            };
            let deliveries = async {
                while let Some(d) = rx.recv().await {
                    let _ = cell.borrow_mut().deliver(d);
                    wake.send_modify(|v| *v += 1);
                }
                std::future::pending::<()>().await;
            };
            // Pauses past their `limits.pause` fail (a timer only while one
            // has a bound; re-armed when a new one starts, which wakes).
            let mut on_deadline = changed.clone();
            let pause_limits = async {
                loop {
                    let next = {
                        let mut c = cell.borrow_mut();
                        c.deadline_set = false;
                        c.next_deadline()
                    };
                    // (Every other change wakes it too: a delivery, a
                    // resume, a pump that saw a pause start.)
                    tokio::select! {
                        () = sleep_until(next) => {
                            let _ = cell.borrow_mut().expire(tokio::time::Instant::now());
                            wake.send_modify(|v| *v += 1);
                        }
                        r = on_deadline.changed() => {
                            if r.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                }
            };
            // A close ends the connection even if a pump is stuck writing to a
            // peer that does not read.
            let mut on_change = changed.clone();
            let closed = async {
                while !cell.borrow().closing {
                    if on_change.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::pin!(pumps);
            tokio::pin!(deliveries);
            tokio::pin!(closed);
            tokio::pin!(pause_limits);
            let mut result = None;
            loop {
                let deadline = match activity.check(idle, None) {
                    Idle::WaitUntil(t) => t,
                    _ => {
                        timed_out = true;
                        break;
                    }
                };
                tokio::select! {
                    ends = &mut pumps => {
                        result = Some(ends);
                        break;
                    }
                    () = &mut deliveries => {}
                    () = &mut pause_limits => {}
                    () = &mut closed => break,
                    () = cut.as_mut() => {
                        tracing::debug!("tcp connection's listener closed and its drain timeout passed; closing");
                        cut_off = true;
                        break;
                    }
                    () = tokio::time::sleep_until(deadline.into()) => {}
                }
            }
            (result, cell.borrow().closing)
        };
        let (a, b) = result.unwrap_or_default();
        (cell.into_inner(), a, b, closed)
    };
    if timed_out {
        tracing::debug!("tcp connection idle for {idle:?}; closing");
    }
    // Remote: that peer closed (and the host did not close first), or reset.
    let remote =
        |e: Ended, p: Peer| chain.reset[p.idx()] || e.remote && !closed && !timed_out && !cut_off;
    let closes = [
        (Peer::Downstream, remote(down_ended, Peer::Downstream)),
        (Peer::Upstream, remote(up_ended, Peer::Upstream)),
    ];
    chain.finish(&closes);
    if timed_out {
        Ending::Idle
    } else if cut_off {
        Ending::Drain
    } else if closed {
        Ending::Filter
    } else {
        Ending::Peers
    }
}

/// Finishes a connection that never reached the upstream (rejected by a filter,
/// no endpoint reachable, no original destination): the downstream side
/// closes locally. (Dropping the chain unfinished does the same.)
pub fn finish_unconnected(chain: &mut NetChain) {
    chain.finish(&[(Peer::Downstream, false)]);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;

    /// A filter that appends its tag to data, pauses until it has seen `hold`
    /// bytes, fails on `fail<tag>` in the data, and records its calls.
    struct Tag {
        tag: u8,
        hold: usize,
        open: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl NetworkFilter for Tag {
        fn name(&self) -> &str {
            "tag"
        }
        fn fail_open(&self) -> bool {
            self.open
        }
        fn buffer_limit(&self) -> usize {
            16
        }
        fn on_new_connection(&self, _: usize, _: &mut Exchange) -> Result<NetVerdict, String> {
            self.log
                .lock()
                .unwrap()
                .push(format!("new {}", self.tag as char));
            Ok(NetVerdict::Continue)
        }
        fn on_data(
            &self,
            _: usize,
            c: &mut Exchange,
            from: Peer,
            eos: bool,
        ) -> Result<NetVerdict, String> {
            let data = c.bodies[from.idx()].as_mut().unwrap().to_mut();
            if data
                .windows(5)
                .any(|w| w[..4] == *b"fail" && w[4] == self.tag)
            {
                return Err("fail".into());
            }
            if data.len() < self.hold && !eos {
                return Ok(NetVerdict::Pause);
            }
            data.push(self.tag);
            Ok(NetVerdict::Continue)
        }
        fn on_callout_response(
            &self,
            _: usize,
            _: &mut Exchange,
            _: u64,
            _: CalloutResult,
        ) -> Result<NetVerdict, String> {
            Ok(NetVerdict::Continue)
        }
        fn on_close(&self, _: usize, _: &mut Exchange, peer: Peer, remote: bool) {
            let who = if remote { "remote" } else { "local" };
            self.log.lock().unwrap().push(format!(
                "close {} {} {who}",
                self.tag as char,
                peer.as_str()
            ));
        }
        fn on_done(&self, _: usize, _: &mut Exchange) {
            self.log
                .lock()
                .unwrap()
                .push(format!("done {}", self.tag as char));
        }
    }

    struct NoCallouts;
    impl CalloutSender for NoCallouts {
        fn send(&self, _: crate::filter::CalloutRequest) -> crate::filter::CalloutFuture {
            Box::pin(async { Err(crate::filter::CalloutError::Unavailable) })
        }
    }

    fn chain(filters: Vec<Tag>) -> NetChain {
        let filters: Vec<Arc<dyn NetworkFilter>> = filters
            .into_iter()
            .map(|f| Arc::new(f) as Arc<dyn NetworkFilter>)
            .collect();
        chain_of(filters).0
    }

    /// A chain of `filters` for a loopback connection, with its deliveries.
    fn chain_of(filters: Vec<Arc<dyn NetworkFilter>>) -> (NetChain, Deliveries) {
        let x = connection(
            Arc::new(ConnFacts {
                id: 1,
                source: ([127, 0, 0, 1], 1).into(),
                destination: ([127, 0, 0, 1], 2).into(),
                tls: None,
            }),
            &Name::new("tcp").unwrap(),
            &Name::new("echo").unwrap(),
        );
        NetChain::new(0, filters.into(), x, Rc::new(NoCallouts))
    }

    fn tag(tag: u8, hold: usize, open: bool, log: &Arc<Mutex<Vec<String>>>) -> Tag {
        Tag {
            tag,
            hold,
            open,
            log: log.clone(),
        }
    }

    fn go(s: Step) -> Vec<u8> {
        match s {
            Step::Go(d) => d,
            other => panic!("expected Go, got {other:?}"),
        }
    }

    /// Pauses the first downstream data on a callout; resumes on its response.
    /// With `cancel`, upstream data makes it cancel that callout. With `up`,
    /// it also pauses the first upstream data on a callout of its own. With
    /// `resume`, a callout response resumes that direction only.
    struct Waits {
        cancel: bool,
        open: bool,
        up: bool,
        resume: Option<Peer>,
    }

    const WAITS: Waits = Waits {
        cancel: false,
        open: false,
        up: false,
        resume: None,
    };

    fn callout(id: u64) -> crate::filter::CalloutRequest {
        crate::filter::CalloutRequest {
            id,
            cluster: "authz".into(),
            method: http::Method::GET,
            path: "/".into(),
            authority: None,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::new(),
            timeout: Duration::from_secs(1),
            max_response_body: 1024,
        }
    }

    impl NetworkFilter for Waits {
        fn name(&self) -> &str {
            "waits"
        }
        fn fail_open(&self) -> bool {
            self.open
        }
        fn buffer_limit(&self) -> usize {
            1024
        }
        fn on_new_connection(&self, _: usize, _: &mut Exchange) -> Result<NetVerdict, String> {
            Ok(NetVerdict::Continue)
        }
        fn on_data(
            &self,
            _: usize,
            c: &mut Exchange,
            from: Peer,
            _: bool,
        ) -> Result<NetVerdict, String> {
            if from == Peer::Upstream && self.cancel {
                c.cancelled.push(7);
            }
            if from == Peer::Upstream && self.up && c.cause.is_none() {
                c.cause = Some("asked".into());
                c.callouts.push(callout(8));
                return Ok(NetVerdict::Pause);
            }
            if from == Peer::Upstream || c.request_id == "asked" {
                return Ok(NetVerdict::Continue);
            }
            c.request_id = http::HeaderValue::from_static("asked");
            c.callouts.push(callout(7));
            Ok(NetVerdict::Pause)
        }
        fn on_callout_response(
            &self,
            _: usize,
            c: &mut Exchange,
            id: u64,
            result: CalloutResult,
        ) -> Result<NetVerdict, String> {
            assert!(id == 7 || id == 8, "{id}");
            assert_eq!(result.err(), Some(crate::filter::CalloutError::Unavailable));
            let _ = c;
            Ok(self.resume.map_or(NetVerdict::Continue, NetVerdict::Resume))
        }
        fn on_close(&self, _: usize, _: &mut Exchange, _: Peer, _: bool) {}
        fn on_done(&self, _: usize, _: &mut Exchange) {}
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_callout_pause_blocks_one_direction_until_resumed() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let log = Arc::default();
                let filters: Vec<Arc<dyn NetworkFilter>> =
                    vec![Arc::new(WAITS), Arc::new(tag(b'b', 0, false, &log))];
                let (mut c, mut rx) = chain_of(filters);
                assert!(start(&mut c, &mut rx).await);
                assert!(matches!(
                    c.run_data(Peer::Downstream, b"x".to_vec(), false, 0),
                    Step::Held
                ));
                assert!(c.blocked(Peer::Downstream));
                assert!(!c.blocked(Peer::Upstream));
                // The other direction flows meanwhile.
                assert_eq!(
                    go(c.run_data(Peer::Upstream, b"u".to_vec(), false, 0)),
                    b"ub"
                );
                let d = rx.recv().await.unwrap();
                assert!(c.deliver(d).is_none());
                assert!(!c.blocked(Peer::Downstream));
                // The held data went on to the next filter, for the pump to write.
                assert_eq!(std::mem::take(&mut c.out[0]), b"xb");
                assert_eq!(
                    go(c.run_data(Peer::Downstream, b"y".to_vec(), false, 0)),
                    b"yb"
                );
            })
            .await;
    }

    /// The paused filter cancels the callout it waits for while called for
    /// the other direction: nothing can resume it, so its failure policy
    /// applies at once (closed: the connection closes; open: the held data
    /// runs on past it) instead of holding that direction for ever.
    #[tokio::test(flavor = "current_thread")]
    async fn a_pause_whose_callout_is_cancelled_fails_at_once() {
        for open in [false, true] {
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async {
                    let log = Arc::default();
                    let waits = Waits {
                        cancel: true,
                        open,
                        ..WAITS
                    };
                    let filters: Vec<Arc<dyn NetworkFilter>> =
                        vec![Arc::new(waits), Arc::new(tag(b'b', 0, false, &log))];
                    let (mut c, mut rx) = chain_of(filters);
                    assert!(start(&mut c, &mut rx).await);
                    assert!(matches!(
                        c.run_data(Peer::Downstream, b"x".to_vec(), false, 0),
                        Step::Held
                    ));
                    assert_eq!(
                        go(c.run_data(Peer::Upstream, b"u".to_vec(), false, 0)),
                        b"ub"
                    );
                    assert_eq!(c.outstanding[0], 0);
                    let settled = c.settle();
                    if open {
                        assert!(settled.is_none());
                        assert!(!c.closing);
                        assert!(!c.blocked(Peer::Downstream));
                        assert_eq!(std::mem::take(&mut c.out[0]), b"xb");
                    } else {
                        assert!(matches!(settled, Some(Step::Close)));
                        assert!(c.closing);
                    }
                    // The aborted callout delivers nothing.
                    tokio::task::yield_now().await;
                    assert!(rx.try_recv().is_err());
                })
                .await;
        }
    }

    /// One filter paused on callouts in both directions at once: its
    /// `continue` from a callout response resumes both, and each direction's
    /// held data goes on.
    #[tokio::test(flavor = "current_thread")]
    async fn both_directions_paused_at_once_both_resume() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let log = Arc::default();
                let waits = Waits { up: true, ..WAITS };
                let filters: Vec<Arc<dyn NetworkFilter>> =
                    vec![Arc::new(waits), Arc::new(tag(b'b', 0, false, &log))];
                let (mut c, mut rx) = chain_of(filters);
                assert!(start(&mut c, &mut rx).await);
                assert!(matches!(
                    c.run_data(Peer::Downstream, b"x".to_vec(), false, 0),
                    Step::Held
                ));
                assert!(matches!(
                    c.run_data(Peer::Upstream, b"u".to_vec(), false, 0),
                    Step::Held
                ));
                assert!(c.blocked(Peer::Downstream) && c.blocked(Peer::Upstream));
                // The first callout's response resumes both directions.
                let d = rx.recv().await.unwrap();
                assert!(c.deliver(d).is_none());
                assert!(!c.blocked(Peer::Downstream) && !c.blocked(Peer::Upstream));
                assert_eq!(std::mem::take(&mut c.out[0]), b"xb");
                assert_eq!(std::mem::take(&mut c.out[1]), b"ub");
                // The second finds nothing paused; data flows both ways.
                let d = rx.recv().await.unwrap();
                assert!(c.deliver(d).is_none());
                assert!(!c.closing);
                assert_eq!(
                    go(c.run_data(Peer::Downstream, b"y".to_vec(), false, 0)),
                    b"yb"
                );
                assert_eq!(
                    go(c.run_data(Peer::Upstream, b"v".to_vec(), false, 0)),
                    b"vb"
                );
            })
            .await;
    }

    /// A resume of one direction (proxy-wasm's `proxy_continue_stream` naming
    /// it) ends that direction's pause only; the other's, with nothing left
    /// to resume it, then fails by the policy.
    #[tokio::test(flavor = "current_thread")]
    async fn a_resume_of_one_direction_leaves_the_other_paused() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let log = Arc::default();
                let waits = Waits {
                    up: true,
                    resume: Some(Peer::Upstream),
                    ..WAITS
                };
                let filters: Vec<Arc<dyn NetworkFilter>> =
                    vec![Arc::new(waits), Arc::new(tag(b'b', 0, false, &log))];
                let (mut c, mut rx) = chain_of(filters);
                assert!(start(&mut c, &mut rx).await);
                assert!(matches!(
                    c.run_data(Peer::Downstream, b"x".to_vec(), false, 0),
                    Step::Held
                ));
                assert!(matches!(
                    c.run_data(Peer::Upstream, b"u".to_vec(), false, 0),
                    Step::Held
                ));
                let d = rx.recv().await.unwrap();
                assert!(c.deliver(d).is_none());
                assert!(c.blocked(Peer::Downstream) && !c.blocked(Peer::Upstream));
                assert_eq!(std::mem::take(&mut c.out[1]), b"ub");
                assert!(c.out[0].is_empty());
                let d = rx.recv().await.unwrap();
                assert!(matches!(c.deliver(d), Some(Step::Close)));
            })
            .await;
    }

    /// Holds downstream data until it ends with a newline, then waits for a
    /// wake-up (as a proxy-wasm filter waits for a tick): every `Pause`
    /// arms one (the sender kept in `fire`); a delivered wake-up resumes
    /// downstream data. `limit` is its `limits.pause`.
    struct Ticked {
        fire: Mutex<Vec<tokio::sync::oneshot::Sender<CalloutResult>>>,
        limit: Option<Duration>,
        open: bool,
    }

    impl NetworkFilter for Ticked {
        fn name(&self) -> &str {
            "ticked"
        }
        fn fail_open(&self) -> bool {
            self.open
        }
        fn buffer_limit(&self) -> usize {
            1024
        }
        fn pause_limit(&self) -> Option<Duration> {
            self.limit
        }
        fn on_new_connection(&self, _: usize, _: &mut Exchange) -> Result<NetVerdict, String> {
            Ok(NetVerdict::Continue)
        }
        fn on_data(
            &self,
            _: usize,
            c: &mut Exchange,
            _: Peer,
            _: bool,
        ) -> Result<NetVerdict, String> {
            let mut fire = self.fire.lock().unwrap();
            if fire.is_empty() {
                let (tx, rx) = tokio::sync::oneshot::channel();
                c.wakes.push((1 << 32, rx));
                fire.push(tx);
            }
            Ok(NetVerdict::Pause)
        }
        fn on_callout_response(
            &self,
            _: usize,
            _: &mut Exchange,
            id: u64,
            _: CalloutResult,
        ) -> Result<NetVerdict, String> {
            assert_eq!(id, 1 << 32);
            Ok(NetVerdict::Resume(Peer::Downstream))
        }
        fn on_close(&self, _: usize, _: &mut Exchange, _: Peer, _: bool) {}
        fn on_done(&self, _: usize, _: &mut Exchange) {}
    }

    fn ticked(limit: Option<Duration>, open: bool) -> Ticked {
        Ticked {
            fire: Mutex::new(Vec::new()),
            limit,
            open,
        }
    }

    /// A pause a wake-up can end keeps Envoy's buffering (the filter is
    /// called again with all it holds; reading goes on) and the wake-up's
    /// resume lets what it holds go on, in order, to the next filter.
    #[tokio::test(flavor = "current_thread")]
    async fn a_wake_up_resumes_data_held_with_nothing_outstanding() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let log = Arc::default();
                let t = Arc::new(ticked(None, false));
                let filters: Vec<Arc<dyn NetworkFilter>> =
                    vec![t.clone(), Arc::new(tag(b'b', 0, false, &log))];
                let (mut c, mut rx) = chain_of(filters);
                assert!(start(&mut c, &mut rx).await);
                for part in [&b"he"[..], b"llo\n"] {
                    assert!(matches!(
                        c.run_data(Peer::Downstream, part.to_vec(), false, 0),
                        Step::Held
                    ));
                    assert!(!c.blocked(Peer::Downstream));
                    assert!(c.settle().is_none());
                }
                assert!(c.next_deadline().is_none(), "no limits.pause, no timer");
                let tx = t.fire.lock().unwrap().pop().unwrap();
                tx.send(Err(crate::filter::CalloutError::Unavailable))
                    .unwrap();
                let d = rx.recv().await.unwrap();
                assert!(d.wake);
                assert!(c.deliver(d).is_none());
                assert_eq!(std::mem::take(&mut c.out[0]), b"hello\nb");
                assert!(!c.closing);
            })
            .await;
    }

    /// A pause nothing ends fails at its filter's `limits.pause`: fail
    /// closed closes, fail open skips the filter and lets what it held go
    /// on. An end-of-stream `Pause` with only a wake-up waits (a slot).
    #[tokio::test(flavor = "current_thread")]
    async fn a_pause_past_its_limit_fails_by_policy() {
        for open in [false, true] {
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async {
                    let log = Arc::default();
                    let t = Arc::new(ticked(Some(Duration::from_secs(60)), open));
                    let filters: Vec<Arc<dyn NetworkFilter>> =
                        vec![t.clone(), Arc::new(tag(b'b', 0, false, &log))];
                    let (mut c, mut rx) = chain_of(filters);
                    assert!(start(&mut c, &mut rx).await);
                    assert!(matches!(
                        c.run_data(Peer::Downstream, b"x".to_vec(), true, 0),
                        Step::Held
                    ));
                    assert!(c.blocked(Peer::Downstream));
                    let at = c.next_deadline().unwrap();
                    assert!(c.expire(at - Duration::from_secs(1)).is_none());
                    let step = c.expire(at);
                    if open {
                        assert!(step.is_none() && !c.closing);
                        assert_eq!(std::mem::take(&mut c.out[0]), b"xb");
                        assert!(c.eos_out[0]);
                    } else {
                        assert!(matches!(step, Some(Step::Close)));
                        assert!(c.closing);
                    }
                    assert!(c.next_deadline().is_none());
                })
                .await;
        }
    }

    /// A fail-open filter buffering downstream data fails in an upstream
    /// call: skipped from then on, what it held goes on (before later data)
    /// instead of being lost.
    #[test]
    fn a_skipped_filter_releases_what_it_held() {
        let log = Arc::default();
        let mut c = chain(vec![tag(b'a', 4, true, &log), tag(b'b', 0, false, &log)]);
        c.run_new(0);
        assert!(matches!(
            c.run_data(Peer::Downstream, b"12".to_vec(), false, 0),
            Step::Held
        ));
        assert_eq!(
            go(c.run_data(Peer::Upstream, b"faila".to_vec(), false, 0)),
            b"failab"
        );
        // As the pump does after each run.
        assert!(c.settle().is_none());
        let mut down = std::mem::take(&mut c.out[0]);
        down.extend(go(c.run_data(Peer::Downstream, b"34".to_vec(), false, 0)));
        assert_eq!(down, b"12b34b");
        // Next data reaching the skipped filter first takes what it held along.
        let mut c = chain(vec![tag(b'a', 4, true, &log), tag(b'b', 0, false, &log)]);
        c.run_new(0);
        assert!(matches!(
            c.run_data(Peer::Downstream, b"12".to_vec(), false, 0),
            Step::Held
        ));
        go(c.run_data(Peer::Upstream, b"faila".to_vec(), false, 0));
        assert_eq!(
            go(c.run_data(Peer::Downstream, b"34".to_vec(), false, 0)),
            b"1234b"
        );
    }

    /// The cap is on what a filter holds: a filter that holds nothing passes
    /// a chunk bigger than its cap.
    #[test]
    fn the_cap_is_on_held_data_not_data_passing_through() {
        let log = Arc::default();
        let mut c = chain(vec![tag(b'a', 0, false, &log)]);
        c.run_new(0);
        let data = vec![b'x'; 20];
        let mut want = data.clone();
        want.push(b'a');
        assert_eq!(go(c.run_data(Peer::Downstream, data, false, 0)), want);
    }

    /// A chain dropped before it finished (an early return) still gives the
    /// filters that saw the connection their close and `on_done`.
    #[test]
    fn a_chain_dropped_unfinished_finishes_its_filters() {
        let log = Arc::default();
        let mut c = chain(vec![tag(b'a', 0, false, &log)]);
        c.run_new(0);
        drop(c);
        assert_eq!(
            *log.lock().unwrap(),
            ["new a", "close a downstream local", "done a"]
        );
    }

    #[test]
    fn downstream_in_order_upstream_in_reverse() {
        let log = Arc::default();
        let mut c = chain(vec![tag(b'a', 0, false, &log), tag(b'b', 0, false, &log)]);
        assert!(matches!(c.run_new(0), Step::Go(_)));
        assert_eq!(
            go(c.run_data(Peer::Downstream, b"x".to_vec(), false, 0)),
            b"xab"
        );
        assert_eq!(
            go(c.run_data(Peer::Upstream, b"y".to_vec(), false, 0)),
            b"yba"
        );
        c.finish(&[(Peer::Downstream, true), (Peer::Upstream, false)]);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "new a",
                "new b",
                "close a downstream remote",
                "close a upstream local",
                "done a",
                "close b downstream remote",
                "close b upstream local",
                "done b"
            ]
        );
    }

    #[test]
    fn pause_holds_data_until_the_filter_continues() {
        let log = Arc::default();
        let mut c = chain(vec![tag(b'a', 4, false, &log), tag(b'b', 0, false, &log)]);
        c.run_new(0);
        assert!(matches!(
            c.run_data(Peer::Downstream, b"12".to_vec(), false, 0),
            Step::Held
        ));
        // The other direction is not blocked by a buffering pause.
        assert!(!c.blocked(Peer::Upstream) && !c.blocked(Peer::Downstream));
        assert_eq!(
            go(c.run_data(Peer::Downstream, b"34".to_vec(), false, 0)),
            b"1234ab"
        );
        // End of stream releases what is held.
        assert!(matches!(
            c.run_data(Peer::Downstream, b"5".to_vec(), false, 0),
            Step::Held
        ));
        assert_eq!(
            go(c.run_data(Peer::Downstream, Vec::new(), true, 0)),
            b"5ab"
        );
    }

    #[test]
    fn held_data_over_the_cap_closes() {
        let log = Arc::default();
        let mut c = chain(vec![tag(b'a', 100, false, &log)]);
        c.run_new(0);
        assert!(matches!(
            c.run_data(Peer::Downstream, vec![0; 10], false, 0),
            Step::Held
        ));
        assert!(matches!(
            c.run_data(Peer::Downstream, vec![0; 10], false, 0),
            Step::Close
        ));
    }

    #[test]
    fn failures_close_or_skip_by_policy() {
        let log = Arc::default();
        let mut closed = chain(vec![tag(b'a', 0, false, &log)]);
        closed.run_new(0);
        assert!(matches!(
            closed.run_data(Peer::Downstream, b"faila".to_vec(), false, 0),
            Step::Close
        ));
        let mut open = chain(vec![tag(b'a', 0, true, &log), tag(b'b', 0, false, &log)]);
        open.run_new(0);
        assert_eq!(
            go(open.run_data(Peer::Downstream, b"faila".to_vec(), false, 0)),
            b"failab"
        );
        // Skipped for the rest of the connection.
        assert_eq!(
            go(open.run_data(Peer::Downstream, b"x".to_vec(), false, 0)),
            b"xb"
        );
    }
}
