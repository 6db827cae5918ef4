//! proxy-wasm ABI 0.2.1 (and 0.2.0) support: a core Wasm module built for Envoy
//! with a proxy-wasm SDK runs unchanged as an HTTP filter (docs/proxy-wasm.md).
//!
//! - [`abi`]: status codes and enums, guest-memory access, the pairs format.
//! - [`imports`]: every `env` host function and the WASI preview1 subset.
//! - [`state`]: a VM's store data and what a plugin's VMs share (metrics).
//! - [`headers`]: header maps with pseudo-headers over the exchange.
//! - [`properties`]: Envoy's attributes (`request.path`, `plugin_name`, ...) and
//!   the filter state `proxy_set_property` writes, kept on the exchange.
//! - [`shared`]: shared data with CAS and shared queues, per `vm_id`.
//! - [`grpc`]: gRPC over callouts: unary calls' framing and statuses, streams.
//! - [`filter`]: [`ProxyWasmFilter`], the per-worker VMs and the context lifecycle.
//!
//! Not supported yet (documented, answered with the status the SDKs expect):
//! foreign functions, TCP (network) filters.

pub mod abi;
pub mod filter;
pub mod grpc;
pub mod headers;
pub mod imports;
pub mod properties;
pub mod shared;
pub mod state;

use std::path::Path;
use std::sync::Arc;

use wasmtime::Module;

pub use filter::{ProxyWasmFilter, Settings, Shares};
use state::{Meta, Metrics};

use crate::stats::Stats;

/// The ABI markers a proxy-wasm module exports (0.2.0 differs from 0.2.1 only in
/// calls this host answers the same way).
const MARKERS: [&str; 2] = ["proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0"];

/// The marker of proxy-wasm ABI 0.1.0 (Envoy's first), refused by name.
const OLD_MARKER: &str = "proxy_abi_version_0_1_0";

/// Whether the file's header is a core module (`\0asm` version 1) rather than a
/// component (layer 1).
pub fn is_core_module(header: &[u8]) -> bool {
    header.len() >= 8 && &header[0..4] == b"\0asm" && header[4..8] == [1, 0, 0, 0]
}

/// Compiles core module `bytes` (of file `path`) and checks it is a proxy-wasm
/// module.
pub fn compile(plugin: &str, path: &Path, bytes: &[u8]) -> anyhow::Result<Module> {
    let module = Module::new(crate::wasm::engine::engine()?, bytes).map_err(|e| {
        anyhow::anyhow!(
            "plugin `{plugin}`: cannot compile {}: {e:#}",
            path.display()
        )
    })?;
    if !module.exports().any(|e| MARKERS.contains(&e.name())) {
        if module.exports().any(|e| e.name() == OLD_MARKER) {
            anyhow::bail!(
                "plugin `{plugin}`: {} is built for proxy-wasm ABI 0.1.0, which is not \
                 supported (this host implements 0.2.1 and 0.2.0); rebuild it with a \
                 proxy-wasm SDK targeting 0.2.x",
                path.display()
            );
        }
        anyhow::bail!(
            "plugin `{plugin}`: {} is a core Wasm module but not a proxy-wasm module (it \
             exports neither `proxy_abi_version_0_2_1` nor `proxy_abi_version_0_2_0`): \
             a Legate plugin is a component: encode it as a component \
             (`legate-componentize component`, or `wasm-tools component new` with the WASI \
             adapter), or build a Rust plugin for `wasm32-wasip2`; or build a proxy-wasm \
             filter with a proxy-wasm SDK",
            path.display()
        );
    }
    Ok(module)
}

/// A config value as a proxy-wasm configuration buffer: a string as is, anything
/// else as JSON text (Envoy's `StringValue` vs. other `Any` payloads).
pub fn config_bytes(v: Option<&serde_json::Value>) -> Vec<u8> {
    match v {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
    }
}

/// What a proxy-wasm plugin is loaded with.
pub struct Load<'a> {
    /// Plugin name.
    pub name: &'a str,
    /// `proxy_wasm.root_id`.
    pub root_id: &'a str,
    /// `proxy_wasm.vm_id`.
    pub vm_id: &'a str,
    /// The VM configuration buffer.
    pub vm_config: Vec<u8>,
    /// The plugin configuration buffer.
    pub plugin_config: Vec<u8>,
    /// Clusters granted for `proxy_http_call` (`capabilities.clusters`).
    pub clusters: Vec<String>,
    /// The module's sha256 (hex): with `vm_id` and `vm_config`, which plugins
    /// share a VM.
    pub module_sha256: &'a str,
}

/// Loads one proxy-wasm plugin (one configuration of it): starts a VM here to
/// check it, as component plugins are configured once at load. With a
/// non-empty `vm_id` it joins the VM of `shares` with the same `vm_id`, module
/// and `vm_config` (Envoy's VM sharing); otherwise it has a VM of its own.
pub fn load(
    module: &Module,
    what: Load<'_>,
    settings: Settings,
    stats: &Arc<Stats>,
    shares: &mut Shares,
) -> anyhow::Result<Arc<ProxyWasmFilter>> {
    let share = (!what.vm_id.is_empty())
        .then(|| shares.reserve(what.vm_id, what.module_sha256, &what.vm_config, what.name));
    // Metrics are the VM's (as Envoy's): a shared VM's plugins use one table.
    let metrics = match &share {
        Some((s, _)) => s.metrics(),
        None => Metrics::new(what.name),
    };
    let meta = Meta {
        name: what.name.into(),
        root_id: what.root_id.to_string(),
        vm_id: what.vm_id.to_string(),
        vm_config: what.vm_config,
        plugin_config: what.plugin_config,
        stats: stats.clone(),
        metrics,
        callouts_sent: crate::wasm::host::callouts_counter(stats, what.name),
        grpc_streams: stats.counter(
            "legate_plugin_grpc_streams_total",
            "gRPC streams a proxy-wasm plugin opened (proxy_grpc_stream).",
            &[("plugin", what.name)],
        ),
        grpc_streams_open: stats.gauge(
            "legate_plugin_grpc_streams_open",
            "gRPC streams of a proxy-wasm plugin not closed yet.",
            &[("plugin", what.name)],
        ),
        grpc_stream_messages: stats.counter(
            "legate_plugin_grpc_stream_messages_total",
            "Messages a proxy-wasm plugin's gRPC streams received.",
            &[("plugin", what.name)],
        ),
        grpc_stream_failures: stats.counter(
            "legate_plugin_grpc_stream_failures_total",
            "gRPC streams of a proxy-wasm plugin closed with a status other than OK.",
            &[("plugin", what.name)],
        ),
        clusters: what.clusters,
        body_limit: settings.body_limit,
    };
    let f = Arc::new(ProxyWasmFilter::load(module, meta, settings, stats, share)?);
    f.arm();
    Shares::join(&f);
    Ok(f)
}
