//! The Wasm sandbox: runs HTTP filter plugins, WebAssembly components of the
//! `legate:filter/http-filter@0.1.0` world (abi/), inside the request path.
//!
//! - [`engine`]: the one wasmtime engine (Cranelift, pooling allocator with
//!   copy-on-write memory images, epoch interruption driven by one ticker thread),
//!   compiling modules and checking their SHA-256.
//! - [`cache`]: compiled components on disk, keyed by module SHA-256 and engine.
//! - [`bindings`]: the one `bindgen!` of the WIT world.
//! - [`host`]: the host side of every imported interface; WASI linked with nothing
//!   granted.
//! - [`kv`]: the plugin KV store, a [`kv::KvBackend`] (in-memory, one per process).
//! - [`plugin`]: [`WasmFilter`], a [`crate::filter::HttpFilter`]; per-worker
//!   instances, deadlines, memory caps, failure handling and per-plugin stats.
//!
//! Callouts: `callout.send` queues a request on the exchange (or, from `on-tick`,
//! on the instance); [`crate::filter::Chain`] (or the tick task) sends it through
//! the proxy's [`crate::filter::CalloutSender`] and delivers the result.
//!
//! Not supported yet, refused at load with a clear error: body and trailer phases.

pub mod bindings;
pub mod cache;
pub mod engine;
pub mod host;
pub mod kv;
pub mod plugin;

use std::collections::HashMap;
use std::sync::Arc;

pub use plugin::WasmFilter;

use crate::config::{Config, FailPolicy};
use crate::filter::{FilterKey, HttpFilter};
use crate::stats::Stats;

/// Loads every plugin of `config` (and every route `config` override of one), each
/// compiled once and configured once on this thread to check it.
pub fn load(
    config: &Config,
    stats: &Arc<Stats>,
) -> anyhow::Result<HashMap<FilterKey, Arc<dyn HttpFilter>>> {
    let mut out: HashMap<FilterKey, Arc<dyn HttpFilter>> = HashMap::new();
    for p in &config.plugins {
        let p = &p.value;
        let name = p.name.as_str();
        for c in &p.capabilities.clusters {
            if !config.clusters.iter().any(|k| k.value.name == c.value) {
                anyhow::bail!(
                    "plugin `{name}`: `capabilities.clusters` names cluster `{}`, which is not \
                     defined; add it under `clusters:` or remove it from the plugin's \
                     capabilities",
                    c.value
                );
            }
        }
        let component = engine::compile(
            name,
            &p.module,
            p.sha256.as_ref().map(|s| s.value.as_str()),
            stats,
        )?;
        let mut configs: Vec<Option<String>> = vec![None];
        for t in &config.routes {
            for vh in &t.value.virtual_hosts {
                for r in &vh.value.routes {
                    if let Some(c) = r.value.filters.get(&p.name).and_then(|f| f.config.as_ref()) {
                        let json = c.to_string();
                        if !configs.contains(&Some(json.clone())) {
                            configs.push(Some(json));
                        }
                    }
                }
            }
        }
        for over in configs {
            let json = match (&over, &p.config) {
                (Some(j), _) => j.clone(),
                (None, Some(v)) => v.to_string(),
                (None, None) => "null".to_string(),
            };
            let settings = plugin::Settings {
                config_json: json,
                cpu: p.limits.cpu.value.get(),
                memory: usize::try_from(p.limits.memory.value.0).unwrap_or(usize::MAX),
                fail_open: p.fail == FailPolicy::Open,
                kv: p.capabilities.kv.iter().map(|n| n.to_string()).collect(),
                clusters: p
                    .capabilities
                    .clusters
                    .iter()
                    .map(|n| n.value.to_string())
                    .collect(),
            };
            let f = Arc::new(WasmFilter::load(name, &component, settings, stats)?);
            f.arm();
            out.insert(
                FilterKey {
                    plugin: p.name.clone(),
                    config_override: over,
                },
                f,
            );
        }
    }
    Ok(out)
}

/// For `legate check`: loads, compiles and configures every plugin, so a plugin
/// that would refuse to load fails the check with its message.
pub fn check_plugins(config: &Config) -> anyhow::Result<()> {
    load(config, &Stats::new()).map(|_| ())
}
