//! The process's one wasmtime [`Engine`] and its epoch ticker, and compiling a
//! plugin's component file (with its SHA-256 check).
//!
//! Deadlines use epoch interruption: one thread bumps the engine's epoch every
//! millisecond and each call sets its deadline in ticks, so a call is stopped between
//! `cpu` and `cpu + 1ms` (abi/README.md §7). The pooling allocator keeps instance
//! memories in pre-reserved slots reused copy-on-write from the module's image, so
//! re-instantiating a poisoned instance is cheap.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Epoch tick period: the granularity of call deadlines.
pub const TICK: Duration = Duration::from_millis(1);

/// Largest linear memory a plugin may be given (`limits.memory` is validated
/// against it); also the size of each pooled memory slot.
pub const MAX_MEMORY: u64 = 256 << 20;

/// Pooled instance slots, shared by every plugin instance of the process (plugins ×
/// workers, plus the short-lived instances `legate check` and loading make).
const POOL_INSTANCES: u32 = 256;

static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();

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
    c
}

fn build() -> Result<Engine, String> {
    let mut pooled = base_config();
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(POOL_INSTANCES)
        .total_core_instances(POOL_INSTANCES * 4)
        .total_memories(POOL_INSTANCES * 2)
        .total_tables(POOL_INSTANCES * 4)
        .max_memory_size(MAX_MEMORY as usize)
        .max_memories_per_module(2)
        .max_core_instance_size(4 << 20)
        .max_component_instance_size(4 << 20);
    pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
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

/// Deadline in epoch ticks for a call budget.
pub fn ticks(budget: Duration) -> u64 {
    u64::try_from(budget.as_millis()).unwrap_or(u64::MAX).max(1) + 1
}

/// Checks and compiles the component `bytes` of module `path` (a file or
/// `builtin:NAME`; through the disk cache, when one is configured: see
/// [`super::cache`]).
pub fn compile(
    plugin: &str,
    path: &Path,
    bytes: &[u8],
    sha256: Option<&str>,
    stats: &crate::stats::Stats,
) -> anyhow::Result<Component> {
    let digest = hex(&Sha256::digest(bytes));
    if let Some(want) = sha256 {
        if !want.eq_ignore_ascii_case(&digest) {
            anyhow::bail!(
                "plugin `{plugin}`: module {} has sha256 {digest}, but the config says {want}; \
                 rebuild the plugin or update `sha256`",
                path.display()
            );
        }
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
        if let Some(component) = c.load(engine, &digest, stats) {
            return Ok(component);
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| {
        anyhow::anyhow!(
            "plugin `{plugin}`: cannot compile {}: {e:#}",
            path.display()
        )
    })?;
    if let Some(c) = &cache {
        c.store(&digest, &component);
    }
    Ok(component)
}

/// A core module's header is `\0asm` version 1; a component's has layer 1.
fn wasmparser_is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[0..4] == b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}
