//! The process's one wasmtime [`Engine`] and its epoch ticker, and compiling a
//! plugin's component file (with its SHA-256 check).
//!
//! Deadlines use epoch interruption: one thread bumps the engine's epoch every
//! millisecond. A call's first tick marks the thread's CPU clock; from then on,
//! at each tick the call is stopped if its thread has used `cpu` of CPU time
//! since the mark (or the call has taken ten times that in wall time);
//! otherwise the worker was waiting — for a core, or in a host call such as a
//! KV round trip — and the deadline moves by the CPU budget left. The CPU time
//! before the first tick (at most one tick's worth) is not charged, so a call
//! is stopped within about a tick of spending its budget, and a busy machine
//! does not kill well-behaved plugins (abi/README.md §7). The thread's CPU
//! clock is a system call (~350ns here, more than a short guest call): reading
//! it lazily means a call that ends before the next tick, nearly every filter
//! call, never pays for it. Epoch ticks only reach a call while Wasm runs: a
//! call waiting in a host pollable (a guest's `sleep`, WASI `poll`) is bounded
//! instead by [`poll_inline`](super::wasi::poll_inline), which reads the wall
//! deadline [`arm`] leaves in a thread-local ([`wall_deadline`]). The pooling
//! allocator keeps instance
//! memories in pre-reserved slots reused copy-on-write from the module's image, so
//! re-instantiating a poisoned instance is cheap.

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Epoch tick period: the granularity of call deadlines.
pub const TICK: Duration = Duration::from_millis(1);

/// Largest linear memory a plugin may be given (`limits.memory` is validated
/// against it); also the size of each pooled memory slot.
pub const MAX_MEMORY: u64 = 256 << 20;

/// The fewest pooled instance slots (`legate check`, and the floor of the
/// size [`size_pool`] computes).
pub const MIN_POOL_INSTANCES: u32 = 256;

/// The most pooled instance slots: each reserves address space for two
/// memories of [`MAX_MEMORY`] (1 TiB in all at this bound), so that a config
/// sized far beyond any machine cannot make the pool unreservable.
const MAX_POOL_INSTANCES: u32 = 2048;

/// Pooled component instance slots, shared by every plugin instance of the
/// process; set by [`size_pool`] before the engine is built.
static POOL_INSTANCES: AtomicU32 = AtomicU32::new(MIN_POOL_INSTANCES);

static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();

/// Sizes the instance pool for `workers` workers running `filters` plugin
/// configurations each (every plugin, and every route `config` override of
/// one, is an instance per worker): twice that, for a reload that replaces
/// them all while exchanges finish on the old instances, plus room for the
/// instances loading makes to check a plugin; at least
/// [`MIN_POOL_INSTANCES`]. The pool is reserved when the engine is built (the
/// first plugin load), so this must come before; later calls change nothing.
pub fn size_pool(workers: usize, filters: usize) {
    if ENGINE.get().is_none() {
        POOL_INSTANCES.store(pool_size(workers, filters), Relaxed);
    }
}

/// The pool [`size_pool`] reserves for `workers` × `filters`.
fn pool_size(workers: usize, filters: usize) -> u32 {
    let needed = workers
        .saturating_mul(filters)
        .saturating_mul(2)
        .saturating_add(filters)
        .saturating_add(16);
    u32::try_from(needed)
        .unwrap_or(u32::MAX)
        .clamp(MIN_POOL_INSTANCES, MAX_POOL_INSTANCES)
}

/// A linear memory the store's limiter refused to create or grow: the size
/// the guest asked for and the plugin's `limits.memory`, in bytes. Refused
/// while instantiating, it is a module whose memory starts over the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusedMemory {
    /// The size asked for.
    pub desired: usize,
    /// The instance's cap (`limits.memory`).
    pub cap: usize,
}

/// A failed instantiation, explained: the pool being full names its size and
/// what fixes it; a memory the limiter refused (`refused`, kept by the store)
/// names `limits.memory` and the module's starting size, where wasmtime says
/// only "memory minimum size of 257 pages exceeds memory limits" (any
/// zig-linked filter, whose default 16 MiB stack starts it over the default
/// 16 MiB cap; a Python or JavaScript one under a lowered cap).
pub fn instantiate_error(e: &wasmtime::Error, refused: Option<RefusedMemory>) -> String {
    if let Some(RefusedMemory { desired, cap }) = refused {
        let cap = crate::config::ByteSize(u64::try_from(cap).unwrap_or(u64::MAX));
        #[allow(clippy::cast_precision_loss)] // a size shown to one decimal
        let mib = desired as f64 / f64::from(1u32 << 20);
        return format!(
            "cannot instantiate: its linear memory starts at {mib:.1} MiB ({} pages of 64 KiB), \
             over the plugin's `limits.memory` of {cap}: raise `limits.memory` (at most \
             {}), or build the module to start smaller (its stack counts: zig's default \
             is 16 MiB, `-Wl,-z,stack-size=65536` makes it 64 KiB) ({e:#})",
            desired / 65536,
            crate::config::ByteSize(MAX_MEMORY),
        );
    }
    if e.is::<wasmtime::PoolConcurrencyLimitError>() {
        return format!(
            "cannot instantiate: the Wasm instance pool is full ({} instances, sized at start \
             for the workers × plugin configurations of the config then, twice over for \
             reloads); a hot restart sizes it for the current config: {e:#}",
            POOL_INSTANCES.load(Relaxed)
        );
    }
    format!("cannot instantiate: {e:#}")
}

/// The engine (built on first use, with its ticker thread).
pub fn engine() -> anyhow::Result<&'static Engine> {
    ENGINE
        .get_or_init(build)
        .as_ref()
        .map_err(|e| anyhow::anyhow!("cannot start the Wasm engine: {e}"))
}

fn base_config() -> Config {
    let mut c = Config::new();
    c.wasm_component_model(true);
    c.epoch_interruption(true);
    // Instances are small; the default 4GiB reservation per memory would make a
    // pool of hundreds of slots reserve terabytes of address space. Explicit bounds
    // checks are the price, and a filter's hot path is host calls anyway.
    c.memory_reservation(MAX_MEMORY);
    c.memory_guard_size(64 << 10);
    c.memory_init_cow(true);
    // A developer's aid: with `LEGATE_WASM_PERFMAP` set, wasmtime writes
    // `/tmp/perf-PID.map` naming the guests' compiled functions, so `perf`, and
    // callgrind through bench/callgrind-diff.py, show guest code by function
    // (bench/README.md, "Instructions per request").
    if std::env::var_os("LEGATE_WASM_PERFMAP").is_some_and(|v| !v.is_empty()) {
        c.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    c
}

/// The most core module instances one component instance may make. A
/// component made by `cargo component` or the SDK makes a handful (its module,
/// the WASI adapter, a few shims); one made by componentize-py makes one per
/// shared library it links (CPython, libc, its runtime: 14 for a minimal
/// filter), and more with native extension modules. A component with more is
/// refused when it is compiled, with wasmtime's message naming the count and
/// this limit. The pool reserves nothing per core instance (wasmtime only
/// counts them; each one's context is allocated when it is instantiated, up to
/// `max_core_instance_size`), so a generous bound costs nothing until used.
pub const CORE_INSTANCES_PER_COMPONENT: u32 = 64;

/// The most tables one component instance may define. Each pooled table slot
/// reserves address space for [`TABLE_ELEMENTS`] (8 bytes each, committed only
/// as used); components seen so far define one or two
/// (componentize-py: 2, of 5 748 and 142 elements; componentize-js: 2).
pub const TABLES_PER_COMPONENT: u32 = 4;

/// The most elements a table may start with (wasmtime's default, set here so
/// it is stated): each pooled table slot reserves `8 ×` this of address space.
pub const TABLE_ELEMENTS: usize = 20_000;

/// The most linear memories one component instance may define (each pooled
/// memory slot reserves [`MAX_MEMORY`] of address space).
pub const MEMORIES_PER_COMPONENT: u32 = 2;

/// The pooling allocator's limits for `instances` component instances. Every
/// sub-pool (core instances, tables, memories) is sized at the per-component
/// bound times `instances`, so it cannot run out before the component pool
/// does: only one pool can be full, and [`instantiate_error`] names it.
fn pool_config(instances: u32) -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .total_memories(instances.saturating_mul(MEMORIES_PER_COMPONENT))
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .max_memories_per_module(MEMORIES_PER_COMPONENT)
        .total_tables(instances.saturating_mul(TABLES_PER_COMPONENT))
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .table_elements(TABLE_ELEMENTS)
        .max_memory_size(MAX_MEMORY as usize)
        .max_core_instance_size(4 << 20)
        .max_component_instance_size(4 << 20);
    pool
}

fn build() -> Result<Engine, String> {
    let mut pooled = base_config();
    pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool_config(
        POOL_INSTANCES.load(Relaxed),
    )));
    let engine = match Engine::new(&pooled) {
        Ok(e) => e,
        Err(e) => {
            // A host with a small address-space limit (ulimit -v) cannot reserve the
            // pool; instances are then allocated on demand, which is slower to
            // instantiate but otherwise the same.
            tracing::warn!("Wasm pooling allocator unavailable ({e}); allocating on demand");
            Engine::new(&base_config()).map_err(|e| e.to_string())?
        }
    };
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("legate-wasm-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(TICK);
            match weak.upgrade() {
                Some(e) => e.increment_epoch(),
                None => return,
            }
        })
        .map_err(|e| format!("cannot start the epoch thread: {e}"))?;
    Ok(engine)
}

/// Wall time a call may take, as a multiple of its CPU budget: bounds calls that
/// wait (host calls to a slow Redis, a starved thread) without spinning.
pub const WALL_FACTOR: u32 = 10;

/// The clock of the call running on a store: what the deadline callback
/// compares against. It lives in the store's data so that the callback is
/// installed once per store ([`install`]) and [`arm`] costs no allocation.
#[derive(Clone, Copy, Debug)]
pub struct CallClock {
    /// The thread's CPU time at the call's first tick; `None` until then.
    cpu_mark: Option<Duration>,
    wall_start: Instant,
    budget: Duration,
}

impl Default for CallClock {
    fn default() -> Self {
        CallClock {
            cpu_mark: None,
            wall_start: Instant::now(),
            budget: Duration::ZERO,
        }
    }
}

/// Store data that carries a [`CallClock`].
pub trait Clocked {
    /// The clock of the current call.
    fn call_clock(&mut self) -> &mut CallClock;
}

/// Installs the deadline callback on a new `store` and arms its first call
/// (instantiation and setup) with `budget`.
pub fn install<T: Clocked + 'static>(store: &mut wasmtime::Store<T>, budget: Duration) {
    store.epoch_deadline_callback(|mut ctx| {
        let c = ctx.data_mut().call_clock();
        match c.tick(thread_cpu_time()) {
            Some(left) => Ok(wasmtime::UpdateDeadline::Continue(ticks(left))),
            None => Err(wasmtime::Trap::Interrupt.into()),
        }
    });
    arm(store, budget);
}

impl CallClock {
    /// An epoch tick during the call, with the thread's CPU time now (if the OS
    /// tells): the budget left, or `None` when it is spent.
    fn tick(&mut self, cpu_now: Option<Duration>) -> Option<Duration> {
        let wall = self.wall_start.elapsed();
        if wall >= self.budget.saturating_mul(WALL_FACTOR) {
            wall_bound_hit();
            return None;
        }
        let used = match (cpu_now, self.cpu_mark) {
            // No thread clock: wall time, as if every tick was spent running.
            (None, _) => wall,
            (Some(now), None) => {
                // The first tick: CPU time counts from here (what ran before
                // it, less than a tick, is not charged: charging wall time
                // would charge a thread that waited for a core). The next
                // check comes a tick early to make up for it.
                self.cpu_mark = Some(now);
                return Some(self.budget.saturating_sub(TICK));
            }
            (Some(now), Some(mark)) => now.saturating_sub(mark),
        };
        if used >= self.budget {
            return None;
        }
        Some(self.budget - used)
    }
}

thread_local! {
    /// The wall-time bound of the call last armed on this thread (calls on a
    /// thread never overlap).
    static WALL_DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Whether the call last armed on this thread was refused a memory growth
    /// at the memory cap ([`memory_refused`]).
    static MEMORY_REFUSED: Cell<bool> = const { Cell::new(false) };
    /// Whether the call last armed on this thread was stopped by its wall-time
    /// bound rather than its CPU budget ([`wall_bound_hit`]).
    static WALL_BOUND_HIT: Cell<bool> = const { Cell::new(false) };
}

/// Records that the running call is stopped by its wall-time bound (budget ×
/// [`WALL_FACTOR`]), not by the CPU time it used: the failure then says so.
pub fn wall_bound_hit() {
    WALL_BOUND_HIT.with(|r| r.set(true));
}

/// Whether the call last armed on this thread was stopped by its wall-time
/// bound.
pub fn was_wall_bound_hit() -> bool {
    WALL_BOUND_HIT.with(Cell::get)
}

/// Clears this thread's per-call records, as [`arm`] does (for tests that
/// describe a failure without a store).
#[cfg(test)]
pub fn arm_for_test() {
    MEMORY_REFUSED.with(|r| r.set(false));
    WALL_BOUND_HIT.with(|r| r.set(false));
}

/// Records that the running call was refused a memory growth at its
/// instance's memory cap: `memory.grow` returned -1 to the guest (abi/README.md
/// §7), and a trap that follows in the same call (the guest's allocator
/// giving up) counts as the memory cap.
pub fn memory_refused() {
    MEMORY_REFUSED.with(|r| r.set(true));
}

/// Whether the call last armed on this thread was refused a memory growth.
pub fn was_memory_refused() -> bool {
    MEMORY_REFUSED.with(Cell::get)
}

/// When the call last armed on this thread ([`arm`]) must be stopped even if no
/// Wasm runs (its budget × [`WALL_FACTOR`] after it began); `None` if no call
/// was armed here.
pub fn wall_deadline() -> Option<Instant> {
    WALL_DEADLINE.with(Cell::get)
}

/// Runs `f`, a plugin's instantiation and `configure`, in the context of a
/// small runtime of the engine's own whose thread drives its timer, so that a
/// guest waiting in WASI there (a `sleep` in `configure`) waits as asked,
/// within the configure deadline's wall bound. Without it the wait could not
/// end: at load the thread has no runtime (creating a WASI clock pollable
/// would panic), and on a worker the worker's own timer does not advance while
/// [`poll_inline`](super::wasi::poll_inline) spins. Request-path calls do not
/// pay for entering it (a filter must not sleep, abi/README.md §7).
pub fn with_timers<R>(f: impl FnOnce() -> R) -> R {
    static TIMERS: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    let rt = TIMERS.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("legate-wasm-timers")
            .enable_time()
            .build()
            .map_err(|e| tracing::error!("no timer runtime for plugin configure: {e}"))
            .ok()
    });
    match rt {
        Some(rt) => {
            let _in = rt.enter();
            f()
        }
        None => f(),
    }
}

/// Sets the CPU deadline of the next call on `store` to `budget` (see the module
/// docs); call right before each guest call, on a store set up with [`install`].
/// Returns the time it read, the call's start for its duration stat (one clock
/// read per call instead of two).
pub fn arm<T: Clocked + 'static>(store: &mut wasmtime::Store<T>, budget: Duration) -> Instant {
    let now = Instant::now();
    *store.data_mut().call_clock() = CallClock {
        cpu_mark: None,
        wall_start: now,
        budget,
    };
    WALL_DEADLINE.with(|d| d.set(now.checked_add(budget.saturating_mul(WALL_FACTOR))));
    MEMORY_REFUSED.with(|r| r.set(false));
    WALL_BOUND_HIT.with(|r| r.set(false));
    super::stdio::call_started();
    // The next tick marks the CPU clock (see the module docs).
    store.set_epoch_deadline(1);
    now
}

/// CPU time the calling thread has used, if the OS tells.
fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes one `timespec` through the valid,
    // exclusively borrowed pointer it is given.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec).ok()?;
    Some(Duration::new(secs, nanos))
}

/// Deadline in epoch ticks for a call budget.
pub fn ticks(budget: Duration) -> u64 {
    u64::try_from(budget.as_millis()).unwrap_or(u64::MAX).max(1) + 1
}

/// A failed compile, explained: a component over one of the pool's
/// per-instance bounds (wasmtime's message names the count and the bound) is
/// told that the bounds are fixed and what they are.
fn compile_error(plugin: &str, path: &Path, e: &wasmtime::Error) -> anyhow::Error {
    let e = format!("{e:#}");
    let hint = if e.contains("pooling allocator") {
        format!(
            " (Legate's fixed bounds on one plugin instance: {CORE_INSTANCES_PER_COMPONENT} \
             core module instances, {TABLES_PER_COMPONENT} tables of at most {TABLE_ELEMENTS} elements, \
             {MEMORIES_PER_COMPONENT} linear memories of at most {} MiB; no setting raises \
             them: the component must need less, see docs/config.md, Wasm filters, Instances)",
            MAX_MEMORY >> 20
        )
    } else {
        String::new()
    };
    anyhow::anyhow!(
        "plugin `{plugin}`: cannot compile {}: {e}{hint}",
        path.display()
    )
}

/// Checks and compiles the component `module` of file `path` (a file or
/// `builtin:NAME`; through the disk cache, when one is configured: see
/// [`super::cache`], keyed by the module's digest).
pub fn compile(
    plugin: &str,
    path: &Path,
    module: &super::ModuleBytes<'_>,
    stats: &crate::stats::Stats,
) -> anyhow::Result<Component> {
    let (bytes, digest) = (module.bytes, &module.info.sha256);
    if let Some(e) = not_wasm(plugin, path, bytes) {
        return Err(e);
    }
    if wasmparser_is_core_module(bytes) {
        anyhow::bail!(
            "plugin `{plugin}`: {} is a core Wasm module, not a component; build it for \
             `wasm32-wasip2` (or adapt it with `wasm-tools component new`)",
            path.display()
        );
    }
    let engine = engine()?;
    let cache = super::cache::Cache::from_env(engine);
    if let Some(c) = &cache {
        if let Some(component) = c.load(engine, digest, stats) {
            return Ok(component);
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| compile_error(plugin, path, &e))?;
    if let Some(c) = &cache {
        c.store(digest, &component);
    }
    Ok(component)
}

/// The error for a file that is not Wasm at all (a text file, a native
/// library, a `.wat` source): one line saying so and what to give instead,
/// instead of the parser's `bad magic number` with its bytes listed.
pub fn not_wasm(plugin: &str, path: &Path, bytes: &[u8]) -> Option<anyhow::Error> {
    if bytes.is_empty() {
        // What a failed or interrupted build, or a copy that ran out of disk
        // space, leaves behind.
        return Some(anyhow::anyhow!(
            "plugin `{plugin}`: {} is empty (0 bytes): build it again (`legate plugin \
             build`), or point `module` at the .wasm the build wrote",
            path.display()
        ));
    }
    (!bytes.starts_with(b"\0asm")).then(|| {
        anyhow::anyhow!(
            "plugin `{plugin}`: {} is not a Wasm file (it does not start with the `\\0asm` \
             magic bytes): point `module` at a .wasm built with `legate plugin build`",
            path.display()
        )
    })
}

/// A core module's header is `\0asm` version 1; a component's has layer 1.
fn wasmparser_is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[0..4] == b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(budget_ms: u64, started_ms_ago: u64) -> CallClock {
        CallClock {
            cpu_mark: None,
            wall_start: Instant::now() - Duration::from_millis(started_ms_ago),
            budget: Duration::from_millis(budget_ms),
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_pool_fits_every_worker_s_plugins_twice_over() {
        // A small config keeps the floor.
        assert_eq!(pool_size(2, 3), MIN_POOL_INSTANCES);
        // 64 cores × 4 plugins filled the old fixed pool of 256 on their own,
        // and a reload's new instances failed: room for both generations,
        // and for the load's check instances.
        assert_eq!(pool_size(64, 4), 64 * 4 * 2 + 4 + 16);
        // The address space each slot reserves bounds it.
        assert_eq!(pool_size(4096, 100), MAX_POOL_INSTANCES);
    }

    /// A component that instantiates an empty core module `n` times (as
    /// componentize-py's output instantiates one module per linked library).
    fn component_with_core_instances(n: u32) -> Vec<u8> {
        fn leb(out: &mut Vec<u8>, mut v: u32) {
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    out.push(byte);
                    return;
                }
                out.push(byte | 0x80);
            }
        }
        let empty_module = b"\0asm\x01\0\0\0";
        let mut c = b"\0asm\x0d\0\x01\0".to_vec();
        // Core module section: the empty module.
        c.push(0x01);
        leb(&mut c, empty_module.len() as u32);
        c.extend(empty_module);
        // Core instance section: `n` × (instantiate module 0, no arguments).
        let mut body = Vec::new();
        leb(&mut body, n);
        for _ in 0..n {
            body.extend([0x00, 0x00, 0x00]);
        }
        c.push(0x02);
        leb(&mut c, body.len() as u32);
        c.extend(body);
        c
    }

    #[test]
    fn every_pooled_instance_fits_a_component_with_many_core_instances() {
        // componentize-py's minimal filter makes 14 core instances per
        // component instance. The pool once allowed 4 per slot on average, so
        // 80 Python instances (8 plugins on 10 of 16 workers) filled a pool of
        // 280 slots and further requests failed with "pool is full".
        let engine = Engine::new(&{
            let mut c = base_config();
            c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool_config(3)));
            c
        })
        .unwrap();
        let component = Component::new(&engine, component_with_core_instances(14)).unwrap();
        let pre = wasmtime::component::Linker::<()>::new(&engine)
            .instantiate_pre(&component)
            .unwrap();
        let mut stores = Vec::new();
        for _ in 0..3 {
            let mut store = wasmtime::Store::new(&engine, ());
            pre.instantiate(&mut store).unwrap();
            stores.push(store);
        }
        // Only the component pool itself can be full, which is what
        // `instantiate_error` says.
        let mut store = wasmtime::Store::new(&engine, ());
        let e = pre.instantiate(&mut store).unwrap_err();
        assert!(e.is::<wasmtime::PoolConcurrencyLimitError>(), "{e:#}");
        assert!(format!("{e:#}").contains("component instances"), "{e:#}");
    }

    #[test]
    fn a_component_over_the_core_instance_bound_is_refused_at_compile_naming_it() {
        let engine = Engine::new(&{
            let mut c = base_config();
            c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool_config(3)));
            c
        })
        .unwrap();
        Component::new(&engine, component_with_core_instances(32)).unwrap();
        let e = Component::new(
            &engine,
            component_with_core_instances(CORE_INSTANCES_PER_COMPONENT + 1),
        )
        .unwrap_err();
        let e = compile_error("big", Path::new("big.wasm"), &e).to_string();
        assert!(
            e.starts_with("plugin `big`: cannot compile big.wasm: ")
                && e.contains("65 core module instances")
                && e.contains("maximum of 64")
                && e.contains("fixed bounds on one plugin instance: 64 core module instances"),
            "{e}"
        );
    }

    #[test]
    fn a_file_that_is_not_wasm_is_named_so_in_one_line() {
        // Was wasmparser's `magic header not detected: bad magic number -
        // expected=[` with both byte arrays listed over ten lines.
        let bytes = b"plugins:\n  - name: p\n";
        let m = super::super::ModuleBytes {
            bytes,
            info: super::super::ModuleInfo::of(bytes),
        };
        let e = compile("p", Path::new("p.yaml"), &m, &crate::stats::Stats::new())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "plugin `p`: p.yaml is not a Wasm file (it does not start with the `\\0asm` magic \
             bytes): point `module` at a .wasm built with `legate plugin build`"
        );
    }

    #[test]
    fn an_empty_file_is_named_empty() {
        // Was "is not a Wasm file (it does not start with the magic bytes)".
        let m = super::super::ModuleBytes {
            bytes: b"",
            info: super::super::ModuleInfo::of(b""),
        };
        let e = compile("p", Path::new("p.wasm"), &m, &crate::stats::Stats::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("plugin `p`: p.wasm is empty (0 bytes): build it again"),
            "{e}"
        );
    }

    #[test]
    fn the_first_tick_marks_the_cpu_clock_and_charges_no_waiting() {
        // Started 3ms ago (a starved thread) with a 1ms budget: the first tick
        // charges nothing and checks again a tick early (at the earliest).
        let mut c = clock(1, 3);
        assert_eq!(c.tick(Some(100 * MS)), Some(Duration::ZERO));
        assert_eq!(c.cpu_mark, Some(100 * MS));
        // Half a millisecond of CPU since the mark: within the budget.
        assert_eq!(c.tick(Some(100 * MS + MS / 2)), Some(MS / 2));
        // A whole one: stopped.
        assert_eq!(c.tick(Some(101 * MS)), None);
    }

    #[test]
    fn cpu_time_stops_the_call_and_waiting_does_not() {
        let mut c = clock(5, 0);
        assert_eq!(c.tick(Some(10 * MS)), Some(4 * MS));
        // 2ms of CPU since the mark: budget left.
        assert_eq!(c.tick(Some(12 * MS)), Some(3 * MS));
        // The thread waited (no CPU used): still the same budget left.
        assert_eq!(c.tick(Some(12 * MS)), Some(3 * MS));
        // 5ms of CPU since the mark: stopped.
        assert_eq!(c.tick(Some(15 * MS)), None);
    }

    #[test]
    fn wall_time_bounds_a_waiting_call() {
        let mut c = clock(1, 10);
        assert_eq!(c.tick(Some(MS)), None, "10× the budget in wall time");
    }

    #[test]
    fn without_a_thread_clock_wall_time_counts() {
        assert_eq!(clock(5, 6).tick(None), None);
        assert!(clock(5, 0).tick(None).is_some());
    }
}
