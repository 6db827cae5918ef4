//! The Wasm sandbox: runs HTTP filter plugins, WebAssembly components of the
//! `legate:filter/http-filter@0.1.3` world (abi/), inside the request path.
//!
//! - [`engine`]: the one wasmtime engine (Cranelift, pooling allocator with
//!   copy-on-write memory images, epoch interruption driven by one ticker thread),
//!   compiling modules and checking their SHA-256.
//! - [`cache`]: compiled components on disk, keyed by module SHA-256 and engine.
//! - [`bindings`]: the one `bindgen!` of the WIT world.
//! - [`host`]: the host side of every imported interface.
//! - [`wasi`]: WASI 0.2, linked synchronously (a guest call is a plain call, no
//!   fiber) with nothing granted.
//! - [`kv`]: the plugin KV store, a [`kv::KvBackend`]: in memory (one per process)
//!   or in Redis (`kv:` in the config), shared by Legate processes.
//! - [`plugin`]: [`WasmFilter`], a [`crate::filter::HttpFilter`]; per-worker
//!   instances, deadlines, memory caps, failure handling and per-plugin stats.
//! - [`network`]: components of the `network-filter` world, as
//!   [`crate::network_filter::NetworkFilter`]s on TCP listeners.
//!
//! - [`slots`]: which loaded filters still exist (workers drop the instances of
//!   replaced ones) and each filter's share of the instances gauge.
//! - [`proxy_wasm`]: core modules built for Envoy's proxy-wasm ABI 0.2.1, detected
//!   from the module itself (docs/proxy-wasm.md).
//!
//! Callouts: `callout.send` queues a request on the exchange (or, from `on-tick`,
//! on the instance); [`crate::filter::Chain`] (or the tick task) sends it through
//! the proxy's [`crate::filter::CalloutSender`] and delivers the result.
//!
//! Body and trailer phases: [`crate::filter::Chain`] runs them when a filter
//! declared them (buffered or streamed, abi/README.md §4); the `buffer` resource
//! and trailer maps point at the data the proxy moved into the exchange for the
//! call; a filter may `pause` there too (abi/README.md §4).

pub mod bindings;
pub mod builtin;
pub mod cache;
pub mod engine;
pub mod host;
pub mod kv;
pub mod network;
pub mod plugin;
pub mod proxy_wasm;
pub mod slots;
pub mod stdio;
pub mod wasi;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;

pub use plugin::WasmFilter;

use crate::config::{Config, FailPolicy};
use crate::filter::{FilterKey, HttpFilter};
use crate::stats::Stats;

/// Loads every plugin of `config` (and every route `config` override of one), each
/// compiled once and configured once on this thread to check it.
///
/// Also returns each plugin's [`ModuleInfo`], taken from the bytes compiled: the
/// reload watch compares a module file with it, so it must describe what runs
/// (a second read could see a file replaced meanwhile, which would then never
/// be reloaded).
pub fn load(
    config: &Config,
    stats: &Arc<Stats>,
) -> anyhow::Result<(crate::server::Loaded, Modules)> {
    let mut out: HashMap<FilterKey, Arc<dyn HttpFilter>> = HashMap::new();
    let mut modules = Modules::new();
    let _kv = kv::enter(kv::backend(&config.kv, stats)?);
    // This set's shared proxy-wasm VMs (a reloaded set gets new ones).
    let mut shares = proxy_wasm::Shares::default();
    for spanned in &config.plugins {
        let p = &spanned.value;
        // What `/plugins` shows as `load_ms`: compiling (or reading the
        // cache) and configuring it, every route override included.
        let started = std::time::Instant::now();
        load_plugin(config, p, stats, &mut out, &mut modules, &mut shares)
            .map_err(|e| placed(config, spanned, e))?;
        if let Some(m) = modules.get_mut(p.name.as_str()) {
            m.took = started.elapsed();
        }
    }
    Ok((out, modules))
}

/// Loads plugin `p` of `config` into `out`, its module info into `modules`.
fn load_plugin(
    config: &Config,
    p: &crate::config::Plugin,
    stats: &Arc<Stats>,
    out: &mut HashMap<FilterKey, Arc<dyn HttpFilter>>,
    modules: &mut Modules,
    shares: &mut proxy_wasm::Shares,
) -> anyhow::Result<()> {
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
    if let Some(kind) = p
        .module
        .to_str()
        .and_then(|m| m.strip_prefix(crate::native::PREFIX))
    {
        // A native filter: same chain, no sandbox; one per config, like components.
        modules.insert(p.name.to_string(), ModuleInfo::of(&[]));
        let places = overrides_placed(config, &p.name);
        let mut configs: Vec<Option<String>> = vec![None];
        configs.extend(places.iter().map(|(j, _)| Some(j.clone())));
        for over in configs {
            let value = match &over {
                Some(j) => Some(serde_json::from_str(j)?),
                None => p.config.clone(),
            };
            let f = at_override(
                crate::native::load(name, kind, value.as_ref()),
                over.as_ref(),
                &places,
            )?;
            out.insert(
                FilterKey {
                    plugin: p.name.clone(),
                    config_override: over,
                },
                f,
            );
        }
        return Ok(());
    }
    let bytes = module_bytes(p)?;
    let module = ModuleBytes::checked(p, &bytes)?;
    modules.insert(p.name.to_string(), module.info.clone());
    if load_proxy_wasm(config, p, &module, stats, out, shares)? {
        return Ok(());
    }
    let files = read_files(p)?;
    if let Some(m) = modules.get_mut(name) {
        m.files = files_digest(&files);
    }
    let component = engine::compile(name, &p.module, &module, stats)?;
    if network::is_network_filter(&component) {
        // An L4 filter: TCP listeners only, so no route overrides.
        let json = p
            .config
            .as_ref()
            .map_or_else(|| "null".to_string(), |v| v.to_string());
        let f = Arc::new(network::WasmNetworkFilter::load(
            name,
            &component,
            settings(p, json, files.clone()),
            stats,
        )?);
        f.arm();
        out.insert(
            FilterKey {
                plugin: p.name.clone(),
                config_override: None,
            },
            f,
        );
        return Ok(());
    }
    let places = overrides_placed(config, &p.name);
    let mut configs: Vec<Option<String>> = vec![None];
    configs.extend(places.iter().map(|(j, _)| Some(j.clone())));
    for over in configs {
        let json = match (&over, &p.config) {
            (Some(j), _) => j.clone(),
            (None, Some(v)) => v.to_string(),
            (None, None) => "null".to_string(),
        };
        let settings = settings(p, json, files.clone());
        let f = Arc::new(at_override(
            WasmFilter::load(name, &component, settings, stats),
            over.as_ref(),
            &places,
        )?);
        f.arm();
        out.insert(
            FilterKey {
                plugin: p.name.clone(),
                config_override: over,
            },
            f,
        );
    }
    Ok(())
}

/// What a plugin's module was when it was loaded, for `GET /plugins` and the
/// reload watch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModuleInfo {
    /// SHA-256 of the bytes compiled (of nothing for a native filter).
    pub sha256: String,
    /// The ABI they are built for (see [`crate::reload`]'s `abi_of`).
    pub abi: String,
    /// SHA-256 of the plugin's data files (`files:`) as read for the load
    /// ([`files_digest`]); empty when it has none. A config reload compares it
    /// to decide whether the plugin carries over ([`unchanged_module`]).
    pub files: String,
    /// How long loading the plugin took (compiling or reading the cache,
    /// configuring it and its route overrides): `/plugins`' `load_ms`.
    pub took: std::time::Duration,
}

impl ModuleInfo {
    /// The info of a module whose bytes are `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ModuleInfo {
            sha256: crate::reload::sha256_hex(bytes),
            abi: crate::reload::abi_of(bytes),
            files: String::new(),
            took: std::time::Duration::ZERO,
        }
    }
}

/// [`ModuleInfo`] by plugin name.
pub type Modules = HashMap<String, ModuleInfo>;

/// A plugin's module bytes, read once, with their info: what is compiled, what
/// `sha256:` is checked against and what `/plugins` shows are the same bytes.
pub struct ModuleBytes<'a> {
    /// The module.
    pub bytes: &'a [u8],
    /// Its digest and ABI.
    pub info: ModuleInfo,
}

impl<'a> ModuleBytes<'a> {
    /// `bytes`, the module of plugin `p`, checked against the `sha256` its
    /// config pins, if any.
    pub fn checked(p: &crate::config::Plugin, bytes: &'a [u8]) -> anyhow::Result<Self> {
        let info = ModuleInfo::of(bytes);
        if let Some(want) = &p.sha256 {
            if !want.value.eq_ignore_ascii_case(&info.sha256) {
                anyhow::bail!(
                    "plugin `{}`: module {} has sha256 {}, but the config says {}; rebuild \
                     the plugin or update `sha256`",
                    p.name,
                    p.module.display(),
                    info.sha256,
                    want.value
                );
            }
        }
        Ok(ModuleBytes { bytes, info })
    }
}

/// SHA-256 over a plugin's data files, keys and contents in key order;
/// empty for none.
fn files_digest(files: &plugin::Files) -> String {
    use sha2::{Digest, Sha256};
    if files.is_empty() {
        return String::new();
    }
    let mut keys: Vec<&String> = files.keys().collect();
    keys.sort();
    let mut h = Sha256::new();
    for k in keys {
        let v = files.get(k).map_or(&[][..], |v| &v[..]);
        // Lengths first, so no two different sets hash the same bytes.
        let len = |n: usize| u64::try_from(n).unwrap_or(u64::MAX).to_le_bytes();
        h.update(len(k.len()));
        h.update(k.as_bytes());
        h.update(len(v.len()));
        h.update(v);
    }
    h.finalize()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Whether plugin `p`'s module (and data files) on disk now are those it
/// was loaded from, as `info` describes them: a config reload carries such
/// a plugin over instead of loading it again ([`crate::reload`]). A file that
/// cannot be read is not the same (loading it again reports why). A native
/// filter has no module.
pub(crate) fn unchanged_module(p: &crate::config::Plugin, info: &ModuleInfo) -> bool {
    if p.module
        .to_str()
        .is_some_and(|m| m.starts_with(crate::native::PREFIX))
    {
        return true;
    }
    let Ok(bytes) = module_bytes(p) else {
        return false;
    };
    if crate::reload::sha256_hex(&bytes) != info.sha256 {
        return false;
    }
    if p.files.is_empty() {
        return info.files.is_empty();
    }
    read_files(p).is_ok_and(|files| files_digest(&files) == info.files)
}

/// `limits.pause` of plugin `p`; `None` for `0s` (no bound).
fn pause_limit(p: &crate::config::Plugin) -> Option<std::time::Duration> {
    Some(p.limits.pause.value.get()).filter(|d| !d.is_zero())
}

/// The sandbox settings of component plugin `p` configured with `json`.
fn settings(
    p: &crate::config::Plugin,
    json: String,
    files: Arc<plugin::Files>,
) -> plugin::Settings {
    plugin::Settings {
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
        body_limit: usize::try_from(p.limits.body.value.0).unwrap_or(usize::MAX),
        pause_limit: pause_limit(p),
        files,
    }
}

/// `legate plugin measure`: component plugin `name` of `config`, loaded as
/// `legate run` loads it, then `n` instances created, configured and dropped.
pub fn measure_instances(
    config: &Config,
    name: &str,
    n: u32,
) -> anyhow::Result<plugin::InstanceCost> {
    let stats = Stats::new();
    let _kv = kv::enter(kv::backend(&config.kv, &stats)?);
    let Some(p) = config
        .plugins
        .iter()
        .find(|p| p.value.name.as_str() == name)
    else {
        anyhow::bail!("no plugin named `{name}` in the config");
    };
    let p = &p.value;
    let bytes = module_bytes(p)?;
    if proxy_wasm::is_core_module(&bytes) {
        anyhow::bail!("plugin `{name}` is a proxy-wasm module; this measures components");
    }
    let json = p
        .config
        .as_ref()
        .map_or("null".to_string(), |v| v.to_string());
    let module = ModuleBytes::checked(p, &bytes)?;
    let component = engine::compile(name, &p.module, &module, &stats)?;
    let f = WasmFilter::load(name, &component, settings(p, json, read_files(p)?), &stats)?;
    f.measure_instances(n)
        .map_err(|e| anyhow::anyhow!("plugin `{name}`: {e}"))
}

/// Reads plugin `p`'s data files (`files:`), once per load, shared by its instances.
fn read_files(p: &crate::config::Plugin) -> anyhow::Result<Arc<plugin::Files>> {
    let name = p.name.as_str();
    let mut out = plugin::Files::new();
    for (key, path) in &p.files {
        let fix = "fix the path under the plugin's `files:` (relative to the config file)";
        let meta = std::fs::metadata(path).map_err(|e| {
            anyhow::anyhow!(
                "plugin `{name}`: cannot read file `{key}` ({}): {e}; {fix}",
                path.display()
            )
        })?;
        if meta.len() > crate::config::MAX_PLUGIN_FILE_SIZE {
            anyhow::bail!(
                "plugin `{name}`: file `{key}` ({}) is {} bytes, over the limit of {} bytes \
                 for a plugin data file",
                path.display(),
                meta.len(),
                crate::config::MAX_PLUGIN_FILE_SIZE
            );
        }
        let bytes = std::fs::read(path).map_err(|e| {
            anyhow::anyhow!(
                "plugin `{name}`: cannot read file `{key}` ({}): {e}; {fix}",
                path.display()
            )
        })?;
        out.insert(key.to_string(), bytes.into());
    }
    Ok(Arc::new(out))
}

/// The bytes of plugin `p`'s module: the embedded component of `builtin:NAME`, or
/// the file's contents.
pub fn module_bytes(p: &crate::config::Plugin) -> anyhow::Result<std::borrow::Cow<'static, [u8]>> {
    let name = p.name.as_str();
    if let Some(file) = p.module_file() {
        return std::fs::read(file).map(Into::into).map_err(|e| {
            anyhow::anyhow!(
                "plugin `{name}`: cannot read module {}: {e}",
                file.display()
            )
        });
    }
    let builtin = p
        .module
        .to_str()
        .and_then(|m| m.strip_prefix(builtin::PREFIX));
    match builtin.map(|b| (b, builtin::get(b))) {
        Some((_, Some(bytes))) => Ok(bytes.into()),
        Some((b, None)) => anyhow::bail!(
            "plugin `{name}`: no builtin plugin `{b}`: {}",
            builtin::missing_help()
        ),
        None => anyhow::bail!(
            "plugin `{name}`: module {} is compiled into the host, not Wasm",
            p.module.display()
        ),
    }
}

/// Route `config` overrides of plugin `name`, as JSON text, each once.
/// Sizes the process's Wasm instance pool for `workers` workers running
/// `config` ([`engine::size_pool`]): one instance per worker for each plugin
/// and each route `config` override of one. Call before the first load.
pub fn size_pool(config: &Config, workers: usize) {
    let filters = config
        .plugins
        .iter()
        .map(|p| 1 + route_overrides(config, &p.value.name).len())
        .sum();
    engine::size_pool(workers, filters)
}

pub(crate) fn route_overrides(config: &Config, name: &crate::config::Name) -> Vec<String> {
    overrides_placed(config, name)
        .into_iter()
        .map(|(json, _)| json)
        .collect()
}

/// [`route_overrides`], each with the first route that gives it, named for a
/// load error: a `configure` failure of an override is the route's config, not
/// the plugin's own, and the operator must be sent there.
fn overrides_placed(config: &Config, name: &crate::config::Name) -> Vec<(String, Override)> {
    let mut out: Vec<(String, Override)> = Vec::new();
    for t in &config.routes {
        for vh in &t.value.virtual_hosts {
            for r in &vh.value.routes {
                if let Some(c) = r.value.filters.get(name).and_then(|f| f.config.as_ref()) {
                    let json = c.to_string();
                    if !out.iter().any(|(j, _)| *j == json) {
                        let route = r.value.name.as_ref().map_or_else(
                            || "the unnamed route".to_string(),
                            |n| format!("route `{n}`"),
                        );
                        let place = format!(
                            "{route} of virtual host `{}` in route table `{}` (line {}), \
                             key `filters.{name}.config`",
                            vh.value.name,
                            t.value.name,
                            r.referenced.line()
                        );
                        let route = r.referenced;
                        out.push((json, Override { place, route }));
                    }
                }
            }
        }
    }
    out
}

/// The context of a route override's load error: which route gives the
/// config, in words and as its place in the file ([`placed`] looks for it).
#[derive(Debug, Clone)]
struct Override {
    place: String,
    route: serde_saphyr::Location,
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the config override of {}", self.place)
    }
}

/// `r` with the place of route override `over` (if one) in its message.
fn at_override<T>(
    r: anyhow::Result<T>,
    over: Option<&String>,
    places: &[(String, Override)],
) -> anyhow::Result<T> {
    match over.and_then(|j| places.iter().find(|(p, _)| p == j)) {
        Some((_, place)) => r.context(place.clone()),
        None => r,
    }
}

/// `e`, an error loading plugin `p` of `config`, placed at `file:line:col`
/// when it is the plugin refusing its config (its `configure` returned an
/// error or trapped, proxy-wasm's `proxy_on_configure` or `proxy_on_vm_start`
/// returned false, a native filter takes none): at the key the message names
/// in the SDK's form (``invalid config: field `PATH`: ...``, and an unknown
/// field's own key), else at the config itself; for a route override, in the
/// route's `filters.NAME.config`. A plugin out of memory while it starts is
/// placed at its `limits.memory`, with a help line saying to raise it. Other
/// load errors (a module that does not
/// compile, a missing export) are about the module, not a place in the file,
/// and stay as they are; so does every error of a config not read from a file.
fn placed(
    config: &Config,
    p: &crate::config::Spanned<crate::config::Plugin>,
    e: anyhow::Error,
) -> anyhow::Error {
    let Some(origin) = &config.origin else {
        return e;
    };
    let message = format!("{e:#}");
    let pw = p.value.proxy_wasm.as_ref();
    // Out of memory while starting (`configure`, `proxy_on_vm_start`): the
    // limit is the key to change, not the plugin's config (a filter ported
    // from Envoy, which caps no VM, may need more than the default).
    if message.contains("memory cap exceeded") && e.downcast_ref::<Override>().is_none() {
        let help = format!(
            "the plugin needs more memory while it starts than `limits.memory` ({}) lets it \
             have: raise it (at most {}MiB)",
            p.value.limits.memory.value,
            engine::MAX_MEMORY >> 20
        );
        return anyhow::Error::new(crate::config::error_at_path(
            origin,
            &p.referenced,
            "limits.memory",
            message,
            Some(help),
        ));
    }
    let key = if message.contains("proxy_on_vm_start") {
        "proxy_wasm.vm_config"
    } else if message.contains("configure failed")
        || message.contains("proxy_on_configure")
        || message.contains("takes no config")
    {
        match pw {
            Some(pw) if pw.plugin_config.is_some() => "proxy_wasm.plugin_config",
            _ => "config",
        }
    } else {
        return e;
    };
    let (anchor, mut path) = match e.downcast_ref::<Override>() {
        Some(o) => (&o.route, format!("filters.{}.config", p.value.name)),
        None => (&p.referenced, key.to_string()),
    };
    if let Some(field) = field_of(&message) {
        path.push('.');
        path.push_str(&field);
    }
    let slow = message.contains("exceeded its CPU deadline")
        || message.contains("exceeded its wall-clock bound");
    let help = match p
        .value
        .module
        .to_str()
        .and_then(|m| m.strip_prefix("builtin:"))
    {
        // Not the config's fault, and no key raises it: say so.
        _ if slow => format!(
            "starting a plugin (its `configure`; proxy-wasm's `proxy_on_vm_start` and \
             `proxy_on_configure`) may take {:?} of CPU ({}x that of wall time), whatever its \
             `limits.cpu`: a component that does more work as it starts (compiling a large \
             rule set) cannot be loaded, a proxy-wasm filter can with a larger \
             `proxy_wasm.start_cpu` (at most {:?}); a config asking for less may help",
            pw.map_or(
                plugin::CONFIGURE_DEADLINE,
                crate::config::ProxyWasm::start_cpu
            ),
            engine::WALL_FACTOR,
            crate::config::ProxyWasm::MAX_START_CPU
        ),
        Some(b) => format!("the keys of its config are in plugins/{b}/README.md"),
        None => "the plugin's own documentation says what its config takes".to_string(),
    };
    anyhow::Error::new(crate::config::error_at_path(
        origin,
        anchor,
        &path,
        message,
        Some(help),
    ))
}

/// The key path in `message` (a plugin's configure error) of the field it is
/// about, in the SDK's form (its `parse_config`):
/// ``invalid config: field `limits[1].max`: ...`` gives `limits[1].max`;
/// ``... unknown field `x`, expected ...`` adds `x`, the key to remove.
fn field_of(message: &str) -> Option<String> {
    let rest = &message[message.find("invalid config: ")? + "invalid config: ".len()..];
    let (mut path, rest) = match rest.strip_prefix("field `") {
        Some(r) => {
            let end = r.find("`: ")?;
            (r[..end].to_string(), &r[end + 3..])
        }
        None => (String::new(), rest),
    };
    if let Some(unknown) = rest.strip_prefix("unknown field `") {
        let key = &unknown[..unknown.find('`')?];
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    }
    (!path.is_empty()).then_some(path)
}

/// Loads plugin `p` as a proxy-wasm module if its file is a core module (`false`:
/// it is a component, load it as one). Each route `config` override is another
/// plugin configuration, as for components.
fn load_proxy_wasm(
    config: &Config,
    p: &crate::config::Plugin,
    module: &ModuleBytes<'_>,
    stats: &Arc<Stats>,
    out: &mut HashMap<FilterKey, Arc<dyn HttpFilter>>,
    shares: &mut proxy_wasm::Shares,
) -> anyhow::Result<bool> {
    let name = p.name.as_str();
    if !proxy_wasm::is_core_module(module.bytes) {
        if p.proxy_wasm.is_some() {
            anyhow::bail!(
                "plugin `{name}`: `proxy_wasm` settings are given, but {} is not a core Wasm \
                 module (a proxy-wasm filter); remove `proxy_wasm` for a Legate component",
                p.module.display()
            );
        }
        return Ok(false);
    }
    if !p.files.is_empty() {
        anyhow::bail!(
            "plugin `{name}`: `files` is for Legate components, but {} is a proxy-wasm \
             module; give its data in `proxy_wasm.plugin_config` and remove `files`",
            p.module.display()
        );
    }
    let compiled = proxy_wasm::compile(name, &p.module, module.bytes)?;
    let pw = p.proxy_wasm.clone().unwrap_or_default();
    let base = pw.plugin_config.as_ref().or(p.config.as_ref());
    let places = overrides_placed(config, &p.name);
    let mut configs: Vec<(Option<String>, Vec<u8>)> = vec![(None, proxy_wasm::config_bytes(base))];
    for (json, _) in &places {
        let json = json.clone();
        let v: Option<serde_json::Value> = serde_json::from_str(&json).ok();
        configs.push((Some(json), proxy_wasm::config_bytes(v.as_ref())));
    }
    for (over, plugin_config) in configs {
        let loaded = proxy_wasm::load(
            &compiled,
            proxy_wasm::Load {
                name,
                root_id: &pw.root_id,
                vm_id: &pw.vm_id,
                vm_config: proxy_wasm::config_bytes(pw.vm_config.as_ref()),
                plugin_config,
                clusters: p
                    .capabilities
                    .clusters
                    .iter()
                    .map(|c| c.value.to_string())
                    .collect(),
                module_sha256: &module.info.sha256,
            },
            proxy_wasm::Settings {
                cpu: p.limits.cpu.value.get(),
                memory: usize::try_from(p.limits.memory.value.0).unwrap_or(usize::MAX),
                fail_open: p.fail == FailPolicy::Open,
                body_limit: usize::try_from(p.limits.body.value.0).unwrap_or(usize::MAX),
                pause_limit: pause_limit(p),
                headers_stop_iteration: pw.allow_on_headers_stop_iteration,
                start_cpu: pw.start_cpu(),
            },
            stats,
            shares,
        );
        let f = at_override(loaded, over.as_ref(), &places)?;
        out.insert(
            FilterKey {
                plugin: p.name.clone(),
                config_override: over,
            },
            f,
        );
    }
    Ok(true)
}

/// For `legate check`: loads, compiles and configures every plugin, so a plugin
/// that would refuse to load fails the check with its message.
pub fn check_plugins(config: &Config) -> anyhow::Result<()> {
    load(config, &Stats::new()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::field_of;

    #[test]
    fn the_field_a_configure_error_names() {
        let at = |m: &str| field_of(m);
        assert_eq!(
            at("configure failed: invalid config: field `limits[1].max`: must be at least 1"),
            Some("limits[1].max".into())
        );
        // An unknown field: the key to remove, in the mapping the path names.
        assert_eq!(
            at("invalid config: field `providers[0]`: unknown field `bogus`, expected one of `a`"),
            Some("providers[0].bogus".into())
        );
        assert_eq!(
            at("invalid config: unknown field `extra`, expected `services`"),
            Some("extra".into())
        );
        // No field: the config as a whole.
        assert_eq!(at("invalid config: missing field `mode`"), None);
        assert_eq!(at("configure failed: bad-config: refused"), None);
        assert_eq!(at("invalid config: field `unterminated"), None);
    }
}
