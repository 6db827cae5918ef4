//! What the three kinds of Wasm filter (HTTP components, network components,
//! proxy-wasm VMs) share about their per-worker instances across reloads:
//! which loaded filters still exist, so that a worker drops the instances of
//! filters a reload replaced ([`LiveIds`]), and each filter's share of its
//! plugin's `legate_plugin_instances` gauge ([`InstanceCount`]); each
//! instance's share of `legate_plugin_memory_bytes` ([`MemoryUse`]); and the
//! components' tick timer ([`tick_interval`]); the backoff before a
//! worker replaces an instance that failed ([`Restarts`]), and the replacement
//! of a ticking filter's dead instance without waiting for traffic
//! ([`restart_when`]); and a component's per-worker slot ([`Slot`]).
//!
//! Workers keep instances in thread-local maps keyed by a filter's id; only the
//! worker can free them, and a replaced filter is dropped on whatever thread
//! drops its last reference. So the drop only marks the id dead here, and each
//! worker sweeps its map the next time it makes a new slot (a reload that loads
//! a plugin again brings new ids, so that happens when it starts the new
//! config's ticking plugins or on the first request after it; a plugin a config
//! reload carries over keeps its id and its instances, [`crate::reload`]), or
//! when a tick task finds its filter gone.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::stats::{Gauge, Stats};

/// Ids of loaded filters (or shared VMs) not dropped yet.
pub struct LiveIds(Mutex<BTreeSet<u64>>);

impl LiveIds {
    /// An empty set, for a `static`.
    pub const fn new() -> Self {
        LiveIds(Mutex::new(BTreeSet::new()))
    }

    /// `id` was loaded.
    pub fn insert(&self, id: u64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id);
    }

    /// `id` was dropped: workers free its instances at their next sweep.
    pub fn remove(&self, id: u64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Drops a worker's slots of ids no longer live (their instances with them).
    pub fn sweep<V>(&self, slots: &mut FxHashMap<u64, V>) {
        let live = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slots.retain(|id, _| live.contains(id));
    }
}

impl Default for LiveIds {
    fn default() -> Self {
        Self::new()
    }
}

/// One filter's live instances (on all workers), counted in its plugin's
/// instances gauge and taken off it when the filter is dropped: a reload does
/// not leave the replaced filter's instances in the gauge.
pub struct InstanceCount {
    gauge: Gauge,
    mine: AtomicI64,
}

impl InstanceCount {
    /// None yet, counting into `gauge`.
    pub fn new(gauge: Gauge) -> Self {
        InstanceCount {
            gauge,
            mine: AtomicI64::new(0),
        }
    }

    /// A worker started an instance.
    pub fn started(&self) {
        self.gauge.inc();
        self.mine.fetch_add(1, Relaxed);
    }

    /// A worker's instance died (it trapped, or its filter went away).
    pub fn ended(&self) {
        self.gauge.dec();
        self.mine.fetch_sub(1, Relaxed);
    }
}

impl Drop for InstanceCount {
    fn drop(&mut self) {
        for _ in 0..self.mine.load(Relaxed) {
            self.gauge.dec();
        }
    }
}

/// The linear memory one instance holds, counted in its plugin's
/// `legate_plugin_memory_bytes{plugin, worker}` gauge (when tracked) and taken
/// off it when the instance is dropped. Fed by the store's resource limiter.
#[derive(Default)]
pub struct MemoryUse {
    bytes: usize,
    gauge: Option<Gauge>,
}

impl MemoryUse {
    /// Counted in `plugin`'s gauge for `worker`.
    pub fn tracked(stats: &Stats, plugin: &str, worker: u32) -> Self {
        MemoryUse {
            bytes: 0,
            gauge: Some(stats.gauge(
                "legate_plugin_memory_bytes",
                "Linear memory of a plugin's instances, per worker.",
                &[("plugin", plugin), ("worker", &worker.to_string())],
            )),
        }
    }

    /// Whether a memory of the instance may grow by `delta` bytes: not past
    /// `cap` for all its memories together. The cap is per instance
    /// (abi/README.md §7), while wasmtime's `StoreLimits` applies it to each
    /// memory alone, so a module with two memories, or a component of several
    /// core modules, would get it twice. A refusal is not a trap: `memory.grow`
    /// returns -1 to the guest (recorded for the call's failure stats,
    /// [`super::engine::memory_refused`]).
    pub fn admit(&self, delta: usize, cap: usize) -> bool {
        let fits = self.bytes.saturating_add(delta) <= cap;
        if !fits {
            super::engine::memory_refused();
        }
        fits
    }

    /// A memory of the instance grew by `delta` bytes (or was created).
    pub fn grew(&mut self, delta: usize) {
        self.bytes += delta;
        if let Some(g) = &self.gauge {
            g.set(g.get() + i64::try_from(delta).unwrap_or(i64::MAX));
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for MemoryUse {
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.set(g.get() - i64::try_from(self.bytes).unwrap_or(i64::MAX));
        }
    }
}

/// A worker's slot for one component filter (HTTP or network).
pub struct Slot<L> {
    /// The instance, while one is live.
    pub live: Option<L>,
    /// When a failed instance may be replaced.
    pub restarts: Restarts,
    /// Bumped for each new instance: a tick task runs while its instance is live.
    pub generation: u64,
}

impl<L> Default for Slot<L> {
    fn default() -> Self {
        Slot {
            live: None,
            restarts: Restarts::default(),
            generation: 0,
        }
    }
}

impl<L> Slot<L> {
    /// Puts the new instance `made` in the slot (counted in `count`, and in
    /// `restarts` when one failed before) under a new generation, which `tick`
    /// gets to start the instance's tick task; a failure starts the backoff.
    pub fn start(
        &mut self,
        made: Result<L, String>,
        restarts: &crate::stats::Counter,
        count: &InstanceCount,
        tick: impl FnOnce(u64),
    ) -> Result<(), String> {
        match made {
            Ok(live) => {
                if self.restarts.failed_before() {
                    restarts.inc();
                }
                count.started();
                self.live = Some(live);
                self.generation += 1;
                tick(self.generation);
                Ok(())
            }
            Err(e) => {
                self.restarts.failed();
                Err(e)
            }
        }
    }
}

/// Starts filter `id`'s instance on this worker (in `slots`, with `start`) ahead of
/// its first exchange, for a filter that ticks: unless one is live already (an
/// exchange came first) or the slot backs off after a failure (the next exchange
/// retries then). A failure is logged as a lazy start's would be.
pub fn start_early<L: 'static>(
    slots: &'static std::thread::LocalKey<std::cell::RefCell<FxHashMap<u64, Slot<L>>>>,
    live: &LiveIds,
    id: u64,
    plugin: &str,
    start: impl FnOnce(&mut Slot<L>) -> Result<(), String>,
) {
    let r = slots.with(|cell| {
        let mut map = cell.borrow_mut();
        if !map.contains_key(&id) {
            live.sweep(&mut map);
        }
        let slot = map.entry(id).or_default();
        if slot.live.is_some() || slot.restarts.waiting() {
            return Ok(());
        }
        start(slot)
    });
    if let Err(why) = r {
        tracing::warn!(plugin, phase = "start", "plugin failure: {why}");
    }
}

/// When a worker may replace a failed instance of one filter: at once after
/// a first failure (a one-off panic costs one request), then after a backoff
/// doubling from 100ms to 5s while failures repeat (within a second of the
/// last allowed start), so a guest that fails on every call is not instantiated
/// again for every request.
#[derive(Default)]
pub struct Restarts {
    not_before: Option<Instant>,
    backoff: Duration,
    failed_before: bool,
}

impl Restarts {
    /// The instance failed now.
    pub fn failed(&mut self) {
        self.failed_at(Instant::now());
    }

    fn failed_at(&mut self, now: Instant) {
        let repeated = self
            .not_before
            .is_some_and(|t| now < t + Duration::from_secs(1));
        self.backoff = if repeated {
            (self.backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
        } else {
            Duration::ZERO
        };
        self.not_before = Some(now + self.backoff);
        self.failed_before = true;
    }

    /// Whether a new instance must still wait.
    pub fn waiting(&self) -> bool {
        self.not_before.is_some_and(|t| Instant::now() < t)
    }

    /// Whether an instance failed before: a new one is then a restart.
    pub fn failed_before(&self) -> bool {
        self.failed_before
    }

    /// When a new instance may start (now, if nothing failed or the backoff
    /// is over).
    pub fn not_before(&self) -> Instant {
        self.not_before.unwrap_or_else(Instant::now)
    }
}

/// Replaces a ticking filter's instance on this worker after it died (it
/// trapped, in a tick or in an exchange), so that the plugin goes on ticking
/// on a worker without traffic: once the restart backoff allows, `start` makes
/// a new one (with its own tick task), as at the config's start.
/// `down_until` says, while the worker has the filter's slot with no live
/// instance, when a new one may start; `None` once one is live (another task
/// or an exchange replaced it) or the slot is gone (a reload dropped it). One
/// attempt: if it fails, the next exchange tries again, as after a failed
/// start with the config.
pub async fn restart_when(down_until: impl Fn() -> Option<Instant>, start: impl FnOnce()) {
    let Some(at) = down_until() else { return };
    tokio::time::sleep_until(at.into()).await;
    if down_until().is_some() {
        start();
    }
}

/// [`restart_when`] for component filter `id`, whose slots are `slots`.
pub async fn restart_ticking<L: 'static>(
    slots: &'static std::thread::LocalKey<std::cell::RefCell<FxHashMap<u64, Slot<L>>>>,
    id: u64,
    start: impl FnOnce(),
) {
    let down_until = || {
        slots.with(|cell| {
            cell.borrow()
                .get(&id)
                .filter(|s| s.live.is_none())
                .map(|s| s.restarts.not_before())
        })
    };
    restart_when(down_until, start).await;
}

/// A component instance's tick timer: its first tick one period after the
/// instance starts, and a late tick is not made up (abi/README.md §2).
pub async fn tick_interval(every: std::time::Duration) -> tokio::time::Interval {
    let mut iv = tokio::time::interval(every);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An interval's first tick is immediate.
    iv.tick().await;
    iv
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_memory_cap_holds_for_all_memories_together() {
        const MIB: usize = 1 << 20;
        let mut m = MemoryUse::default();
        // A first memory of 6 MiB fits an 8 MiB cap; a second one of 6 MiB
        // (alone under the cap, as `StoreLimits` sees it) does not.
        assert!(m.admit(6 * MIB, 8 * MIB));
        m.grew(6 * MIB);
        assert!(!super::super::engine::was_memory_refused());
        assert!(!m.admit(6 * MIB, 8 * MIB));
        assert!(super::super::engine::was_memory_refused());
        assert!(m.admit(2 * MIB, 8 * MIB));
    }

    #[test]
    fn sweep_drops_the_slots_of_removed_ids() {
        let live = LiveIds::new();
        live.insert(1);
        live.insert(2);
        let mut slots: FxHashMap<u64, &str> = FxHashMap::default();
        slots.insert(1, "a");
        slots.insert(2, "b");
        live.remove(1);
        live.sweep(&mut slots);
        assert_eq!(slots.keys().copied().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn restarts_back_off_only_while_failures_repeat() {
        let t0 = Instant::now();
        let mut r = Restarts::default();
        assert!(!r.waiting() && !r.failed_before());
        r.failed_at(t0);
        assert_eq!(
            r.backoff,
            Duration::ZERO,
            "a first failure restarts at once"
        );
        assert!(r.failed_before());
        r.failed_at(t0 + Duration::from_millis(10));
        assert_eq!(r.backoff, Duration::from_millis(100));
        r.failed_at(t0 + Duration::from_millis(120));
        assert_eq!(r.backoff, Duration::from_millis(200));
        for i in 0..10 {
            r.failed_at(t0 + Duration::from_millis(200 + i));
        }
        assert_eq!(r.backoff, Duration::from_secs(5), "capped");
        // Quiet for over a second past the last allowed start: back to none.
        let quiet = r.not_before.unwrap() + Duration::from_secs(2);
        r.failed_at(quiet);
        assert_eq!(r.backoff, Duration::ZERO);
    }

    #[test]
    fn a_dropped_count_leaves_the_gauge() {
        let gauge = Gauge::default();
        let a = InstanceCount::new(gauge.clone());
        let b = InstanceCount::new(gauge.clone());
        a.started();
        a.started();
        a.ended();
        b.started();
        assert_eq!(gauge.get(), 2);
        drop(a);
        assert_eq!(gauge.get(), 1);
        drop(b);
        assert_eq!(gauge.get(), 0);
    }
}
