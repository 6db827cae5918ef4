//! Hot reload: the config (SIGHUP, `POST /reload`, the file watch) and single
//! plugins (`POST /plugins/NAME/reload`, the module file watch), with zero failed
//! requests.
//!
//! **Config.** The file is read, parsed and validated, the files it names are
//! checked as `legate check` and `legate run` check them
//! ([`config::check_files_carrying`]: every problem at its `file:line:col`,
//! except the endpoint files of the clusters carried over, not read again),
//! and a whole new [`Snapshot`] is built — route tables, clusters, TLS, every new
//! or changed plugin compiled (from the disk cache when warm) and configured — on
//! the caller's thread, never on a worker. Any error changes nothing: it is logged with its `file:line:col`,
//! returned (the admin endpoint answers 400 with it) and counted in
//! `legate_config_reloads_total{result="failure"}`. Otherwise the snapshot and the
//! listener set are published together ([`Shared::commit`]); a request in flight
//! keeps the snapshot it started with. Nothing includes `/stats`: the series
//! the new config registered while it was built (a plugin's metrics defined by
//! the instance configured to check it, a new listener's series)
//! are taken back when it is refused ([`crate::stats::Stats::stage`]), and no
//! longer count against the plugin's series cap; the live config's series of
//! the same names keep their values.
//!
//! **Listeners.** A listener whose config is unchanged keeps its socket and its
//! connections; if its TLS files changed (a certificate renewed at the same
//! path), the new ones are checked and, once the reload commits, served to new
//! connections, as Envoy's SDS rotates a certificate. One whose address is unchanged but whose settings changed keeps its
//! socket (no connection is refused) and is served by a new listener: the old one's
//! connections drain gracefully (a TCP connection is closed `drain_timeout`
//! later), counted toward the new one's `max_connections`
//! (one count for the socket, so the limit holds across the handover). A new
//! address is bound before anything is published (a bind failure fails the
//! reload); a removed listener stops accepting and its connections drain. A TCP
//! listener whose network filters (`tcp.filters`) are not all carried over (see
//! below: a plugin of its chain changed) is changed too, though its own config is
//! the same: a TCP connection runs the chain it started with for its lifetime,
//! so the new filters reach only new connections and the old ones drain, as
//! Envoy drains a listener whose filter chain changed. HTTP listeners are kept:
//! their chains are taken from the snapshot for each request. A listener's
//! TLS built again (renewed files, or a new listener on the old socket) keeps
//! the random session ticket key of the one before when its `tls` settings are
//! the same ([`crate::tls::ServerTls::new`]), so clients resume across the
//! reload; `session_ticket_keys` files are read again (and watched).
//!
//! **What carries over.** A cluster whose config and TLS files are unchanged is
//! carried over as it is, not built again (its host names are not resolved again,
//! its endpoint file not read again: a resolver or file failing for a moment fails
//! only a reload that adds or changes a cluster). It keeps its state: endpoints,
//! health flags, outlier ejections, discovered endpoints, counters, pooled
//! connections and every worker's balancer. A new or changed cluster starts
//! fresh (endpoints healthy, as at start), a changed one's counters going on
//! from the old ones ([`crate::cluster::ClusterStats::continuing`]). A new or changed `dns` cluster is
//! warmed before the new config goes live, so it never serves empty: names the
//! cluster it replaces had resolved start from those addresses, other names are
//! resolved first, within the cluster's `initial_fetch_timeout` (past it the
//! cluster goes live without them, as Envoy's; the outcome's `notes` say so); see
//! [`crate::cluster::discovery::warm_for_reload`]. When the cluster set changed, the
//! health-check / discovery thread is restarted for the new set (checks of kept
//! clusters start again from their current flags). Stats counters are by name,
//! so they keep counting. Not reloadable (need a hot restart; listed in the
//! reload's `notes`, and logged once the new config is in force: a reload that
//! fails applied nothing to warn about): `admin.address` and the top-level
//! `access_log`; the config in force (`/config_dump`) keeps their values in
//! use. A listener's own `access_log` is part of its config: a change replaces
//! the listener (its new connections write the new logs; a destination the new
//! logs share with the old ones keeps its writer, [`crate::access_log::Writers`]),
//! and listeners without one keep the top-level logs in force.
//!
//! A plugin whose definition is unchanged carries over too, as Envoy reuses a
//! Wasm VM whose plugin config did not change: the same plugin block (`module`,
//! `sha256`, `config`, `fail`, `limits`, `capabilities`, `files`, `proxy_wasm`),
//! the same module bytes and data file contents on disk (hashed: an edited
//! module is loaded again), the same route `config` overrides of it, the clusters
//! its capabilities name still defined, the same `kv` block when it uses the KV
//! store, and for a proxy-wasm plugin sharing a VM (`vm_id`) the same plugins
//! sharing it, all unchanged (see [`carried_plugins`]). It keeps its loaded
//! filters: its instances on the workers (their memory: a guest's counters go
//! on), its VMs, tick tasks and stats; `/plugins` keeps its `loaded_at` and
//! `load_ms`. So a connection of a kept TCP listener goes on with the live
//! plugin, and reloads do not pile up instances behind it (each would hold one
//! per worker, until the Wasm instance pool is full). The reload outcome lists
//! `plugins: {kept, new_or_changed, removed}`.
//!
//! **Plugins.** A plugin reload compiles and configures that plugin's module again
//! (every route override of it too, and the plugins it shares a proxy-wasm VM
//! with); other plugins keep their instances. A TCP listener running one of them
//! as a network filter is replaced by a new listener on the same socket, as for
//! a config reload that changed its filters: new connections get the new version,
//! open ones drain (closed `drain_timeout` later) rather than keep the old
//! version's instances for their lifetime; the outcome lists them under
//! `listeners.changed`. An error
//! leaves the old version serving and is shown in `/plugins`; the metrics the
//! refused version defined are taken back, as for a config reload. A config reload
//! loads again every plugin that does not carry over (above). With `sha256:`
//! pinned in the config a changed module fails its reload until the config is
//! updated.
//!
//! **Watch.** With `--watch-interval` (default 1s; `0` disables) a thread polls the
//! config file and every plugin module: when a file's size, mtime or inode changes
//! (or its mtime is under 2 s old, so a same-size rewrite within one mtime tick is
//! not missed) its contents are hashed, and a content change triggers a reload;
//! so do the TLS files of listeners, clusters and `kv.tls` when their contents
//! differ from those in force (a renewed certificate). A reload the watch started that
//! failed is tried again, backing off from 1 s to 1 min, while those files
//! differ from what is in force ([`Retry`]). Write files atomically (write
//! then rename) so a half-written file is never picked up.
//!
//! **Renewal without a reload.** When a config reload fails (by any trigger),
//! the listeners in force whose TLS files changed take them anyway
//! ([`renew_in_force`]), and the clusters in force whose TLS files changed take
//! them too, keeping everything else ([`renew_clusters_in_force`]): a
//! certificate renewed at its path goes in force though the config file beside
//! it does not load, as Envoy's SDS rotates a secret independently of the
//! listener or cluster config around it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::{self, Config};
use crate::listener::ListenerCtx;
use crate::server::{Bound, ListenerSet, Shared, Snapshot};
use crate::stats::{Counter, Histogram, Stats};

/// What a reload was asked by, for logs and `/reload`.
#[derive(Clone, Copy, Debug)]
pub enum Trigger {
    /// `POST /reload` or `POST /plugins/NAME/reload`.
    Admin,
    /// SIGHUP.
    Signal,
    /// The file watch saw a change.
    Watch,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Admin => "admin",
            Trigger::Signal => "signal",
            Trigger::Watch => "watch",
        }
    }
}

/// Why a reload failed.
#[derive(Debug)]
pub enum ReloadError {
    /// No such plugin in the config in force.
    UnknownPlugin(String),
    /// Nothing was changed; the message says why (with `file:line:col` for config
    /// errors).
    Failed(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::UnknownPlugin(n) => write!(
                f,
                "no plugin named `{n}` in the config in force; GET /plugins lists them"
            ),
            ReloadError::Failed(m) => f.write_str(m),
        }
    }
}

/// A plugin's load state for `GET /plugins`.
#[derive(Clone, Debug, Default)]
struct PluginStatus {
    module: PathBuf,
    sha256: String,
    abi: String,
    loaded_at: f64,
    load_ms: f64,
    /// Last reload attempt: result object.
    last_reload: Option<Value>,
    /// The last load error (cleared by a successful load).
    last_error: Option<String>,
}

/// Reload state of the process: where the config comes from, one reload at a time,
/// the last results and the counters.
pub struct Reloader {
    path: Option<PathBuf>,
    local_zone: Option<String>,
    /// Held for the whole of a reload: reloads are serialized.
    lock: Mutex<()>,
    last: Mutex<Option<Value>>,
    generation: AtomicU64,
    /// SHA-256 of the config text in force (for the watch).
    applied: Mutex<Option<String>>,
    /// [`crate::tls::kv_files_digest`] of `kv.tls` in force, taken before the
    /// plugins that use the KV store read those files: the watch reloads the
    /// config when they are renewed, as it does for listeners' and clusters'.
    kv_tls: Mutex<Option<[u8; 32]>>,
    plugins: Mutex<BTreeMap<String, PluginStatus>>,
    stats: Arc<Stats>,
    ok: Counter,
    failed: Counter,
    duration: Histogram,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(64);
    for b in Sha256::digest(bytes) {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The ABI a plugin file is built for, as `/plugins` shows it: a component's
/// is the `legate:filter` package at the version of the interfaces it exports
/// (`legate:filter@0.1.0` for a filter built against 0.1.0, which this host
/// still runs); a core module's is `proxy-wasm@0.2.x` from its ABI marker.
/// Anything else is named for what it is (`component`, `core-module`,
/// `unknown`), which a load would have refused.
pub(crate) fn abi_of(bytes: &[u8]) -> String {
    use wasmparser::{Encoding, Parser, Payload};
    let mut kind = None;
    // Nested modules' sections come before the component's own exports; only
    // the outer encoding's export section counts.
    for payload in Parser::new(0).parse_all(bytes) {
        let Ok(payload) = payload else { break };
        match payload {
            Payload::Version { encoding, .. } if kind.is_none() => kind = Some(encoding),
            Payload::ComponentExportSection(exports) if kind == Some(Encoding::Component) => {
                for e in exports.into_iter().flatten() {
                    let version = e
                        .name
                        .name
                        .strip_prefix("legate:filter/")
                        .and_then(|rest| rest.split_once('@'));
                    if let Some((_, version)) = version {
                        return format!("legate:filter@{version}");
                    }
                }
            }
            Payload::ExportSection(exports) if kind == Some(Encoding::Module) => {
                for e in exports.into_iter().flatten() {
                    if let Some(v) = e.name.strip_prefix("proxy_abi_version_") {
                        return format!("proxy-wasm@{}", v.replace('_', "."));
                    }
                }
            }
            _ => {}
        }
    }
    match kind {
        Some(Encoding::Component) => "component",
        Some(Encoding::Module) => "core-module",
        None => "unknown",
    }
    .to_string()
}

fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

impl Reloader {
    /// Reload state for a process started from `path` (if any), whose config
    /// was parsed from text of SHA-256 `applied` ([`Config::source_sha256`]).
    /// Without it the file is hashed now, which takes an edit made since the
    /// config was read for the one in force.
    pub fn new(
        path: Option<PathBuf>,
        applied: Option<String>,
        local_zone: Option<String>,
        stats: &Arc<Stats>,
    ) -> Self {
        let result = |r| {
            stats.counter(
                "legate_config_reloads_total",
                "Config reloads (SIGHUP, POST /reload, file watch), by result.",
                &[("result", r)],
            )
        };
        Reloader {
            applied: Mutex::new(applied.or_else(|| {
                path.as_deref()
                    .and_then(|p| std::fs::read(p).ok())
                    .map(|b| sha256_hex(&b))
            })),
            kv_tls: Mutex::new(None),
            path,
            local_zone,
            lock: Mutex::new(()),
            last: Mutex::new(None),
            generation: AtomicU64::new(1),
            plugins: Mutex::new(BTreeMap::new()),
            stats: stats.clone(),
            ok: result("success"),
            failed: result("failure"),
            duration: stats.histogram(
                "legate_config_reload_duration_seconds",
                "Time to validate, build and publish a new config.",
                &[],
            ),
        }
    }

    /// The config file reloads read, if any.
    pub fn config_path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Records the plugins of the config Legate started with.
    pub(crate) fn record_initial(&self, shared: &Shared) {
        let snap = shared.snapshot.load_full();
        self.record_plugins(&snap.config, &snap.modules, None, &BTreeSet::new(), None);
    }

    fn plugin_counter(&self, plugin: &str, result: &str) -> Counter {
        self.stats.counter(
            "legate_plugin_reloads_total",
            "Plugin reloads (POST /plugins/NAME/reload, module watch), by result.",
            &[("plugin", plugin), ("result", result)],
        )
    }

    /// Refreshes the status of `only` (or every plugin of `config`), after a load.
    /// Records the plugins of `config` as loaded (only plugin `only`, if given)
    /// and, with `outcome`, that plugin's reload outcome (with its new
    /// sha256): in one critical section, so `/plugins` never shows a new module
    /// with the previous reload's outcome. `modules` describes the modules as
    /// loaded (not read again: the file may have changed since).
    fn record_plugins(
        &self,
        config: &Config,
        modules: &crate::wasm::Modules,
        only: Option<&[&str]>,
        carried: &BTreeSet<String>,
        mut outcome: Option<&mut Value>,
    ) {
        let mut map = self.plugins.lock().unwrap_or_else(PoisonError::into_inner);
        if only.is_none() {
            map.retain(|name, _| config.plugins.iter().any(|p| p.value.name.as_str() == name));
        }
        for p in &config.plugins {
            let p = &p.value;
            // A plugin a config reload carried over keeps its status: it
            // was not loaded again.
            if only.is_some_and(|o| !o.contains(&p.name.as_str()))
                || carried.contains(p.name.as_str())
            {
                continue;
            }
            let info = modules.get(p.name.as_str()).cloned().unwrap_or_default();
            let st = map.entry(p.name.to_string()).or_default();
            st.module = p.module.clone();
            st.sha256 = info.sha256;
            st.abi = info.abi;
            st.loaded_at = now_unix();
            st.load_ms = ms(info.took);
            st.last_error = None;
            if let Some(o) = outcome.as_deref_mut() {
                o["sha256"] = json!(st.sha256);
                st.last_reload = Some(o.clone());
            }
        }
    }

    fn finish(&self, outcome: Value) -> Value {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome.clone());
        outcome
    }

    /// The last config reload's outcome, for `GET /reload`.
    pub fn last(&self) -> Value {
        let last = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        json!({
            "config": self.path.as_ref().map(|p| p.display().to_string()),
            "generation": self.generation.load(Relaxed),
            "last": last,
        })
    }

    /// `GET /plugins`.
    pub fn plugins_json(&self, shared: &Shared) -> Value {
        let snap = shared.snapshot.load_full();
        let map = self.plugins.lock().unwrap_or_else(PoisonError::into_inner);
        let mut list = Vec::new();
        for p in &snap.config.plugins {
            let p = &p.value;
            let name = p.name.as_str();
            let st = map.get(name).cloned().unwrap_or_default();
            // Read, never made: a plugin without them (a `native:` one) would
            // get series with no help on `/stats`. Absent, they are 0.
            let labels = [("plugin", name)];
            let counter = |family: &str| self.stats.counter_value(family, &labels).unwrap_or(0);
            let instances = self
                .stats
                .gauge_value("legate_plugin_instances", &labels)
                .unwrap_or(0);
            let config_sets = snap
                .plugins
                .keys()
                .filter(|k| k.plugin.as_str() == name)
                .count();
            list.push(json!({
                "name": name,
                "module": st.module.display().to_string(),
                "sha256": st.sha256,
                "abi": st.abi,
                "loaded_at": st.loaded_at,
                "load_ms": st.load_ms,
                "instances": instances,
                "config_sets": config_sets,
                "errors": {
                    "failures": counter("legate_plugin_failures_total"),
                    "traps": counter("legate_plugin_traps_total"),
                    "timeouts": counter("legate_plugin_timeouts_total"),
                    "memory_exceeded": counter("legate_plugin_memory_exceeded_total"),
                    "last_load_error": st.last_error,
                },
                "last_reload": st.last_reload,
            }));
        }
        json!({ "plugins": list })
    }

    /// Records the digest of the `kv.tls` files the config in force loaded
    /// ([`crate::tls::kv_files_digest`], taken before they were read).
    pub(crate) fn set_kv_tls(&self, digest: Option<[u8; 32]>) {
        *self.kv_tls.lock().unwrap_or_else(PoisonError::into_inner) = digest;
    }

    fn kv_tls(&self) -> Option<[u8; 32]> {
        *self.kv_tls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// SHA-256 of the config text in force.
    fn applied_hash(&self) -> Option<String> {
        self.applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The SHA-256 of the module `plugin` runs now.
    fn plugin_hash(&self, plugin: &str) -> Option<String> {
        self.plugins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(plugin)
            .map(|s| s.sha256.clone())
    }
}

/// Reloads the config file: validates and builds everything first; on any error
/// nothing changes. Returns the outcome (what changed) as JSON.
pub fn reload_config(shared: &Arc<Shared>, trigger: Trigger) -> Result<Value, ReloadError> {
    reload_config_as(shared, trigger, None)
}

/// As [`reload_config`]; a failure whose error is `logged` (the watch's retry
/// failing as before) is logged at debug level, not again as an error.
fn reload_config_as(
    shared: &Arc<Shared>,
    trigger: Trigger,
    logged: Option<&str>,
) -> Result<Value, ReloadError> {
    let r = &shared.reloader;
    let _one = r.lock.lock().unwrap_or_else(PoisonError::into_inner);
    let started = Instant::now();
    // What the new config registers (its plugins' metrics, its listeners' and
    // routes' series) stays only if it goes live.
    let stage = shared.stats.stage();
    let result = apply_config(shared);
    if result.is_ok() {
        stage.commit();
    } else {
        drop(stage);
    }
    let took = started.elapsed();
    r.duration.observe(took);
    match result {
        Ok(mut changes) => {
            r.ok.inc();
            let generation = r.generation.fetch_add(1, Relaxed) + 1;
            changes["result"] = json!("ok");
            changes["trigger"] = json!(trigger.as_str());
            changes["generation"] = json!(generation);
            changes["duration_ms"] = json!(ms(took));
            changes["at"] = json!(now_unix());
            tracing::info!(
                trigger = trigger.as_str(),
                generation,
                "config reloaded in {:.1} ms: {}",
                ms(took),
                changes
            );
            Ok(r.finish(changes))
        }
        Err(e) => {
            r.failed.inc();
            // The certificates the config in force names were renewed on their
            // own (a renewal landing while the config file does not load):
            // they go in force all the same, as Envoy's SDS rotates a secret
            // whatever becomes of the listener config around it.
            let renewed = renew_in_force(shared);
            let clusters_renewed = renew_clusters_in_force(shared);
            if logged == Some(e.as_str()) {
                tracing::debug!(
                    trigger = trigger.as_str(),
                    "config reload failed again, as before:\n{e}"
                );
            } else {
                tracing::error!(
                    trigger = trigger.as_str(),
                    "config reload failed; the config in force is unchanged:\n{e}"
                );
            }
            r.finish(json!({
                "result": "error",
                "trigger": trigger.as_str(),
                "error": e,
                "certificates_renewed": renewed,
                "clusters_renewed": clusters_renewed,
                "duration_ms": ms(took),
                "at": now_unix(),
            }));
            Err(ReloadError::Failed(e))
        }
    }
}

fn apply_config(shared: &Arc<Shared>) -> Result<Value, String> {
    let r = &shared.reloader;
    if shared.is_draining() {
        return Err("Legate is draining; not reloading".into());
    }
    let Some(path) = r.path.as_deref() else {
        return Err(
            "this Legate was not started from a config file, so there is nothing to reload".into(),
        );
    };
    // Read once: the text hashed (what the watch compares the file with) is the
    // text applied, even if the file is replaced meanwhile.
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the config file: {e}", path.display()))?;
    let hash = sha256_hex(text.as_bytes());
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let file = path.display().to_string();
    let mut cfg = config::parse_str(&file, &text, &base).map_err(|e| e.to_string())?;
    if r.local_zone.is_some() {
        cfg.set_local_zone(r.local_zone.clone());
    }
    let old = shared.snapshot.load_full();

    // Clusters whose config and TLS files are unchanged keep their entry as it is
    // (endpoints as resolved or discovered, health, ejections, counters, balancers,
    // pooled connections) and are not built again: resolving their host names or
    // reading their endpoint files again could only fail a reload that does not
    // touch them (a name server down for a moment), as Envoy keeps a cluster's
    // last hosts when a resolution fails.
    // One whose TLS files were renewed at the same paths is kept too, with
    // the new files (its health and ejections go on, as under Envoy's SDS).
    let mut carried = HashMap::new();
    let mut kept_clusters = Vec::new();
    let mut changed_clusters = Vec::new();
    let mut renewed_clusters = Vec::new();
    for c in &cfg.clusters {
        let c = &c.value;
        let before = old.config.clusters.iter().find(|o| o.value.name == c.name);
        match (before, old.clusters.get(&c.name)) {
            // (`local_zone` is the process's, copied into each cluster and not
            // part of its serialized block: compared on its own.)
            (Some(b), Some(entry)) if same(&b.value, c) && b.value.local_zone == c.local_zone => {
                if !entry.upstream.same_tls_files(c) {
                    renewed_clusters.push(c.name.to_string());
                }
                carried.insert(c.name.clone(), entry.clone());
                kept_clusters.push(c.name.to_string());
            }
            _ => changed_clusters.push(c.name.to_string()),
        }
    }
    // The files the config names, read as `legate run` reads them (every
    // problem at once, each at its `file:line:col`), before anything is built:
    // except the endpoint files of the clusters carried over, not read again.
    config::check_files_carrying(&file, &text, &base, &cfg, &|name| {
        carried.keys().any(|k| k.as_str() == name)
    })
    .map_err(|e| e.to_string())?;
    let mut notes = Vec::new();
    if cfg.admin.address.value != old.config.admin.address.value {
        notes.push(format!(
            "admin.address changed to {}; the admin listener stays on {} until a restart",
            cfg.admin.address.value, old.config.admin.address.value
        ));
    }
    // As text: `json_format`'s key order is part of the config (the lines'
    // order), which a JSON value's sorted map would not see.
    if serde_json::to_string(&cfg.access_log).ok()
        != serde_json::to_string(&old.config.access_log).ok()
    {
        notes.push("access_log changed; it takes effect at the next (hot) restart".to_string());
    }
    // Warned once the config is in force (below): a reload that fails later
    // applies nothing, so it has nothing to warn about.
    let restart_notes = notes.len();
    // What the process keeps using until a restart stays in the config in
    // force, so `/config_dump` shows the admin address and access log this
    // process serves and writes, not the file's new ones (the notes say so).
    cfg.admin.address = old.config.admin.address.clone();
    cfg.access_log = old.config.access_log.clone();
    let config = Arc::new(cfg);
    let stats = &shared.stats;
    // A changed cluster's counters go on from the old ones (Envoy keeps a
    // cluster's stats by name; only its endpoints' start again). Copied, not
    // shared: the old generation's gauges (in flight, health) must not count
    // into the new one's. What its requests still count after the copy is lost.
    let counters = |c: &crate::config::Cluster| {
        old.clusters
            .get(&c.name)
            .map(|e| Arc::new(crate::cluster::ClusterStats::continuing(&e.cluster().stats)))
    };
    // Plugins whose definition is unchanged carry over as they are (their
    // instances, VMs, tick tasks and in-memory state), as Envoy reuses a Wasm
    // VM whose plugin config did not change; the others are loaded again.
    let kept_plugins = carried_plugins(&old, &config);
    // Before the plugins using the KV store read them: one renewed meanwhile
    // makes the watch reload again rather than keep it stale.
    let kv_tls = config
        .kv
        .tls
        .as_ref()
        .map(|t| crate::tls::kv_files_digest(&t.value));
    let carried_loaded: crate::server::Loaded = old
        .plugins
        .iter()
        .filter(|(k, _)| kept_plugins.contains(k.plugin.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let carried_modules: crate::wasm::Modules = old
        .modules
        .iter()
        .filter(|(name, _)| kept_plugins.contains(name.as_str()))
        .map(|(name, info)| (name.clone(), info.clone()))
        .collect();
    let snap = Snapshot::build_carrying(
        config.clone(),
        stats,
        &|c| carried.get(&c.name).cloned(),
        &counters,
        (carried_loaded, carried_modules),
    )
    .map_err(|e| format!("{:#}", crate::server::placed(&config, e)))?;
    // New and changed `dns` clusters get their first endpoints (the old cluster's
    // for names it resolved, a bounded resolution for the others) before they go
    // live, so none of them serves its first requests empty.
    let warming: Vec<_> = snap
        .clusters
        .iter()
        .filter(|(name, _)| !carried.contains_key(*name))
        .map(|(name, entry)| (old.clusters.get(name).map(|o| o.cluster()), entry.clone()))
        .collect();
    notes.extend(crate::cluster::discovery::warm_for_reload(&warming));
    let removed_clusters: Vec<String> = old
        .clusters
        .keys()
        .filter(|n| !snap.clusters.contains_key(*n))
        .map(|n| n.to_string())
        .collect();

    let PlannedListeners {
        set: listeners,
        renewed,
        outcome: lchanges,
    } = plan_listeners(shared, &config, &old, &snap, (&file, &text))?;
    // A renewed cluster's checks restart too: they connect with its files.
    let clusters_changed = !changed_clusters.is_empty()
        || !removed_clusters.is_empty()
        || !renewed_clusters.is_empty();
    let snap_modules = snap.modules.clone();
    shared.commit(Arc::new(snap), Some(listeners))?;
    for n in &notes[..restart_notes] {
        tracing::warn!("reload: {n}");
    }
    for (bound, tls) in renewed {
        bound.ctx.renew_tls(tls);
    }
    *r.applied.lock().unwrap_or_else(PoisonError::into_inner) = Some(hash);
    r.set_kv_tls(kv_tls);
    if clusters_changed {
        if let Err(e) = shared.restart_health() {
            // The config is in force; only health checking of the new clusters is
            // missing, which is worth an error but not a rollback.
            tracing::error!("reload: {e:#}");
            notes.push(format!("health checks not restarted: {e:#}"));
        }
    }
    notes.extend(outside_validity(&config, &base));
    r.record_plugins(&config, &snap_modules, None, &kept_plugins, None);
    let (kept_list, loaded_list): (Vec<String>, Vec<String>) = config
        .plugins
        .iter()
        .map(|p| p.value.name.to_string())
        .partition(|name| kept_plugins.contains(name.as_str()));
    let removed_plugins: Vec<String> = old
        .config
        .plugins
        .iter()
        .filter(|o| !config.plugins.iter().any(|p| p.value.name == o.value.name))
        .map(|o| o.value.name.to_string())
        .collect();
    Ok(json!({
        "listeners": lchanges,
        "clusters": {
            "kept": kept_clusters,
            "new_or_changed": changed_clusters,
            "removed": removed_clusters,
            "certificates_renewed": renewed_clusters,
        },
        "plugins": {
            "kept": kept_list,
            "new_or_changed": loaded_list,
            "removed": removed_plugins,
        },
        "notes": notes,
    }))
}

/// The certificates of `config` (listeners' and clusters' client
/// certificates) outside their validity period, one note each: they are served
/// (or presented) anyway, as at start, so that an expiry is not an outage of
/// every name on a listener, but a reload answering `ok` must not hide that a
/// renewal put in place an expired certificate (the old one copied back, say)
/// or one whose validity starts later (a clock behind the issuer's). Paths
/// are shown as the file wrote them (relative to `base`).
fn outside_validity(config: &Config, base: &Path) -> Vec<String> {
    let shown = |p: &Path| p.strip_prefix(base).unwrap_or(p).display().to_string();
    let mut notes = Vec::new();
    for l in &config.listeners {
        let l = &l.value;
        for c in l.tls.iter().flat_map(|t| &t.certificates) {
            if let Some(problem) = crate::tls::validity_problem(&c.value.cert) {
                notes.push(format!(
                    "listener `{}`: certificate `{}` {problem}; it is served anyway",
                    l.name,
                    shown(&c.value.cert)
                ));
            }
        }
    }
    for c in &config.clusters {
        let c = &c.value;
        if let Some(cert) = c.tls.as_ref().and_then(|t| t.client_cert.as_ref()) {
            if let Some(problem) = crate::tls::validity_problem(cert) {
                notes.push(format!(
                    "cluster `{}`: client certificate `{}` {problem}; it is presented anyway",
                    c.name,
                    shown(cert)
                ));
            }
        }
    }
    notes
}

/// After a config reload failed: puts in place the renewed TLS files of the
/// listeners in force (their certificate, key and client CA files, at the paths
/// the config in force names), each that loads and checks, and returns their
/// names. Without it a config file that does not load (a bad edit left on disk)
/// held back every certificate renewal with it, and a certificate could expire
/// in force while its renewal waited on disk. A listener whose files do not
/// load (a new certificate before its key) keeps its certificate: the reload's
/// error names the problem. Called with the reload lock held.
fn renew_in_force(shared: &Shared) -> Vec<String> {
    let mut renewed = Vec::new();
    if shared.is_draining() {
        return renewed;
    }
    for b in shared.listener_set().iter() {
        let Some(tls) = &b.ctx.cfg.tls else { continue };
        if b.ctx.tls_files() == Some(crate::tls::files_digest(tls)) {
            continue;
        }
        match ListenerCtx::load_tls(&b.ctx.cfg, Some(&b.ctx)) {
            Ok(material) => {
                b.ctx.renew_tls(material);
                renewed.push(b.ctx.name.to_string());
            }
            Err(e) => tracing::debug!(
                listener = %b.ctx.name,
                "renewed TLS files not put in place: {e:#}"
            ),
        }
    }
    if !renewed.is_empty() {
        tracing::warn!(
            "the reload failed, but the renewed certificates of listener(s) {} are in \
             force (for the config in force)",
            renewed.join(", ")
        );
    }
    renewed
}

/// As [`renew_in_force`], for the clusters in force whose TLS files (CA,
/// client certificate and key, CRLs) changed: each keeps its cluster with its
/// renewed files ([`crate::server::ClusterEntry::renewed`]), as a reload
/// renews it, and the rest of the config in force is carried over as it is
/// (every other cluster, every plugin: nothing is loaded again), then
/// published. A cluster's client certificate renewed for an upstream that
/// requires one would otherwise expire while a bad edit of the config file
/// held it back. If one of them does not load (its files are not complete
/// yet), none is renewed; the reload's error says why. Returns their names.
/// Called with the reload lock held.
fn renew_clusters_in_force(shared: &Arc<Shared>) -> Vec<String> {
    let old = shared.snapshot.load_full();
    let stale: BTreeSet<&str> = old
        .config
        .clusters
        .iter()
        .map(|c| &c.value)
        .filter(|c| {
            c.tls.is_some()
                && old
                    .clusters
                    .get(&c.name)
                    .is_some_and(|entry| !entry.upstream.same_tls_files(c))
        })
        .map(|c| c.name.as_str())
        .collect();
    if stale.is_empty() || shared.is_draining() {
        return Vec::new();
    }
    let stage = shared.stats.stage();
    // Every cluster is kept; the stale ones are renewed as they are kept.
    let keep = |c: &crate::config::Cluster| old.clusters.get(&c.name).cloned();
    let counters = |c: &crate::config::Cluster| {
        old.clusters
            .get(&c.name)
            .map(|e| Arc::new(crate::cluster::ClusterStats::continuing(&e.cluster().stats)))
    };
    let snap = match Snapshot::build_carrying(
        old.config.clone(),
        &shared.stats,
        &keep,
        &counters,
        (old.plugins.clone(), (*old.modules).clone()),
    ) {
        Ok(snap) => snap,
        Err(e) => {
            tracing::debug!("renewed cluster TLS files not put in place: {e:#}");
            return Vec::new();
        }
    };
    if shared.commit(Arc::new(snap), None).is_err() {
        return Vec::new();
    }
    stage.commit();
    if let Err(e) = shared.restart_health() {
        tracing::error!("renewing cluster TLS files: {e:#}");
    }
    let renewed: Vec<String> = stale.iter().map(|n| n.to_string()).collect();
    tracing::warn!(
        "the reload failed, but cluster(s) {} take their renewed TLS files (for the \
         config in force)",
        renewed.join(", ")
    );
    renewed
}

/// The listener set for `config`: unchanged listeners kept, changed ones on their
/// old socket when the address is the same, new addresses bound. A TCP
/// listener whose network filter chain is not the very filters it runs now
/// (`old`'s; a plugin of it loaded again in `snap`: its module, config or
/// settings changed) is changed too, though its config is the same: its
/// connections drain, as Envoy drains a listener whose filter chain changed.
fn plan_listeners(
    shared: &Shared,
    config: &Config,
    old: &Snapshot,
    snap: &Snapshot,
    (file, text): (&str, &str),
) -> Result<PlannedListeners, String> {
    let current = shared.listener_set();
    let mut next: Vec<Arc<Bound>> = Vec::new();
    let (mut kept, mut changed, mut added) = (Vec::new(), Vec::new(), Vec::new());
    let mut moved = Vec::new();
    let (mut renewed, mut certificates) = (Vec::new(), Vec::new());
    for spanned in &config.listeners {
        let l = &spanned.value;
        // An error of this listener, at its key `key` of the file (what only
        // binding or loading finds: a reload tells it where, as the others).
        let at = |key: &str, message: String| {
            config::error_at(file, text, &spanned.referenced, &[key], message, None).to_string()
        };
        let by_name = current.iter().find(|b| b.ctx.name == l.name);
        // Unchanged: the same config. Its TLS files may have changed (a renewed
        // certificate at the same path): the new ones are read and checked now
        // and put in place once the reload commits, as Envoy's SDS rotates a
        // certificate: new connections get it, open ones are not drained.
        if let Some(b) =
            by_name.filter(|b| same(&b.ctx.cfg, l) && same_network_chain(old, snap, &l.name))
        {
            if b.ctx.tls_files() != l.tls.as_ref().map(crate::tls::files_digest) {
                let tls = ListenerCtx::load_tls(l, Some(&b.ctx))
                    .map_err(|e| at("tls", format!("listener `{}`: {e:#}", l.name)))?;
                renewed.push((b.clone(), tls));
                certificates.push(l.name.to_string());
            }
            next.push(b.clone());
            kept.push(l.name.to_string());
            continue;
        }
        // Its access logs: its own, opened (a destination in use keeps its
        // writer), or the top-level ones in force.
        let logs = || {
            crate::access_log::for_listener(
                l,
                shared.access_log.as_ref(),
                &shared.log_writers,
                &shared.stats,
            )
            .map_err(|e| at("access_log", format!("{e:#}")))
        };
        // The same address string (a rename, or other settings): keep the socket,
        // so no connection waiting in its backlog is refused.
        // Another name's socket only if no listener of that name keeps that
        // address (it is going away, or moving to another address), and never for
        // port 0 (every `:0` is a different socket).
        let ephemeral = l.address.value.ends_with(":0");
        let reuse = by_name
            .filter(|b| b.ctx.cfg.address.value == l.address.value)
            .or_else(|| {
                current.iter().find(|b| {
                    !ephemeral
                        && b.ctx.cfg.address.value == l.address.value
                        && !config.listeners.iter().any(|n| {
                            n.value.name == b.ctx.name
                                && n.value.address.value == b.ctx.cfg.address.value
                        })
                })
            });
        let bound = match reuse {
            Some(b) => {
                let socket = b.socket.try_clone().map_err(|e| {
                    at(
                        "address",
                        format!("listener `{}`: duplicating its socket: {e}", l.name),
                    )
                })?;
                let ctx = ListenerCtx::succeed(l, &shared.stats, &socket, &b.ctx, logs()?)
                    .map_err(|e| at("tls", format!("listener `{}`: {e:#}", l.name)))?;
                changed.push(l.name.to_string());
                Bound {
                    ctx: Arc::new(ctx),
                    socket,
                }
            }
            None => {
                let (ctx, socket) = ListenerCtx::bind(l, &shared.stats, logs()?).map_err(|e| {
                    let own = l.address.value.parse::<SocketAddr>().ok().and_then(|want| {
                        current
                            .iter()
                            .find(|b| config::addresses_overlap(b.ctx.local_addr, want))
                    });
                    let message = match own {
                        // `EADDRINUSE` from this very process: say so, and how to get there.
                        Some(b) => format!(
                            "listener `{}` on {}: {e:#}: the other process is this Legate, \
                             whose listener `{}` listens on {} (the same port, and the same IP \
                             or a wildcard) until this reload would close it; a reload binds \
                             new addresses before it closes old ones. Reload in two steps \
                             (first move `{}` to another port, then to {}), or restart Legate",
                            l.name,
                            l.address.value,
                            b.ctx.name,
                            b.ctx.local_addr,
                            b.ctx.name,
                            l.address.value
                        ),
                        None => format!("listener `{}` on {}: {e:#}", l.name, l.address.value),
                    };
                    at("address", message)
                })?;
                // A listener of this name on another address moved: changed,
                // not a new listener.
                match by_name {
                    Some(b) => {
                        changed.push(l.name.to_string());
                        moved.push(json!({
                            "name": l.name.as_str(),
                            "from": b.ctx.cfg.address.value,
                            "to": l.address.value,
                        }));
                    }
                    None => added.push(l.name.to_string()),
                }
                Bound {
                    ctx: Arc::new(ctx),
                    socket,
                }
            }
        };
        next.push(Arc::new(bound));
    }
    let removed: Vec<String> = current
        .iter()
        .filter(|b| !config.listeners.iter().any(|l| l.value.name == b.ctx.name))
        .map(|b| b.ctx.name.to_string())
        .collect();
    Ok(PlannedListeners {
        set: next.into(),
        renewed,
        outcome: json!({
            "kept": kept,
            "changed": changed,
            "moved": moved,
            "added": added,
            "removed": removed,
            "certificates_renewed": certificates,
        }),
    })
}

/// Whether TCP listener `listener` runs the same network filters (the same
/// loaded objects, in the same order) in `old` as in `new`; true for a
/// listener without filters in both (an HTTP listener: its chains are taken
/// from the snapshot for each request).
fn same_network_chain(old: &Snapshot, new: &Snapshot, listener: &crate::config::Name) -> bool {
    match (old.network.get(listener), new.network.get(listener)) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.len() == b.len()
                && a.iter()
                    .zip(b.iter())
                    .all(|(x, y)| std::ptr::addr_eq(Arc::as_ptr(x), Arc::as_ptr(y)))
        }
        _ => false,
    }
}

/// The plugins of `config` that a config reload carries over from `old`, the
/// snapshot in force, instead of loading them again: each whose definition is
/// unchanged, so that loading it again would make the same filter. That is:
/// the same plugin block (module path, `sha256`, `config`, `fail`, `limits`,
/// `capabilities`, `files` paths, `proxy_wasm`), the same module bytes and
/// data file contents on disk ([`crate::wasm::unchanged_module`]), the same
/// route `config` overrides of it, the clusters its capabilities name still
/// defined, the same `kv` block if it uses the KV store (and no `kv.tls`,
/// whose files may have been renewed), and, for a proxy-wasm plugin sharing a
/// VM (`vm_id`), the same plugins sharing it, each of them unchanged too (a
/// VM is loaded again with all its plugins, as a plugin reload does).
fn carried_plugins(old: &Snapshot, config: &Config) -> BTreeSet<String> {
    let unchanged = |p: &crate::config::Plugin| -> bool {
        let Some(before) = old.config.plugins.iter().find(|o| o.value.name == p.name) else {
            return false;
        };
        let Some(info) = old.modules.get(p.name.as_str()) else {
            return false;
        };
        let overrides = |c: &Config| {
            let mut v = crate::wasm::route_overrides(c, &p.name);
            v.sort();
            v
        };
        same(&before.value, p)
            && old.plugins.keys().any(|k| k.plugin == p.name)
            && overrides(&old.config) == overrides(config)
            && p.capabilities
                .clusters
                .iter()
                .all(|c| config.clusters.iter().any(|k| k.value.name == c.value))
            && (p.capabilities.kv.is_empty()
                || (same(&old.config.kv, &config.kv) && config.kv.tls.is_none()))
            && crate::wasm::unchanged_module(p, info)
    };
    let single: BTreeSet<&str> = config
        .plugins
        .iter()
        .filter(|p| unchanged(&p.value))
        .map(|p| p.value.name.as_str())
        .collect();
    single
        .iter()
        .filter(|name| {
            let now: BTreeSet<&str> = vm_group(config, name).into_iter().collect();
            let before: BTreeSet<&str> = vm_group(&old.config, name).into_iter().collect();
            now == before && now.iter().all(|g| single.contains(g))
        })
        .map(|name| name.to_string())
        .collect()
}

/// What a reload does to the listeners ([`plan_listeners`]).
struct PlannedListeners {
    /// The listener set to serve.
    set: ListenerSet,
    /// Kept listeners whose TLS files changed, with the material read from
    /// them: put in place after the commit.
    renewed: Vec<(Arc<Bound>, crate::listener::RenewedTls)>,
    /// The reload result's `listeners`.
    outcome: Value,
}

/// Reloads one plugin: compiles its module again and configures it (with every
/// route override). On error the old version keeps serving.
pub fn reload_plugin(
    shared: &Arc<Shared>,
    name: &str,
    trigger: Trigger,
) -> Result<Value, ReloadError> {
    let r = &shared.reloader;
    let _one = r.lock.lock().unwrap_or_else(PoisonError::into_inner);
    let old = shared.snapshot.load_full();
    if !old
        .config
        .plugins
        .iter()
        .any(|p| p.value.name.as_str() == name)
    {
        return Err(ReloadError::UnknownPlugin(name.to_string()));
    }
    // A proxy-wasm plugin sharing a VM (`vm_id`) is reloaded with the plugins
    // it shares it with: loaded alone, it would get a VM of its own and the
    // others keep the old one, splitting the shared data, queues and globals
    // they share (the watch reloads each plugin of a changed module in turn).
    let group = vm_group(&old.config, name);
    let started = Instant::now();
    // The metrics the new version defines stay only if it goes live (see
    // `reload_config`).
    let stage = shared.stats.stage();
    let result = (|| -> Result<(Arc<crate::wasm::Modules>, Vec<String>), String> {
        if shared.is_draining() {
            return Err("Legate is draining; not reloading".into());
        }
        let mut only = (*old.config).clone();
        only.plugins
            .retain(|p| group.iter().any(|g| *g == p.value.name.as_str()));
        let (fresh, fresh_modules) =
            crate::wasm::load(&only, &shared.stats).map_err(|e| format!("{e:#}"))?;
        let mut loaded: HashMap<_, _> = old
            .plugins
            .iter()
            .filter(|(k, _)| !group.iter().any(|g| *g == k.plugin.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        loaded.extend(fresh);
        let mut modules = (*old.modules).clone();
        modules.extend(fresh_modules);
        let snap = old
            .with_plugins(&shared.stats, loaded, modules)
            .map_err(|e| format!("{e:#}"))?;
        // TCP listeners running the reloaded plugins are replaced, so their
        // open connections (which hold the old filters) drain.
        let (listeners, drained) = match refilter_listeners(shared, &old, &snap)? {
            Some((set, names)) => (Some(set), names),
            None => (None, Vec::new()),
        };
        let modules = snap.modules.clone();
        shared.commit(Arc::new(snap), listeners)?;
        Ok((modules, drained))
    })();
    if result.is_ok() {
        stage.commit();
    } else {
        drop(stage);
    }
    let took = started.elapsed();
    shared
        .stats
        .histogram(
            "legate_plugin_reload_duration_seconds",
            "Time to compile (or load from the cache), configure and publish a plugin.",
            &[("plugin", name)],
        )
        .observe(took);
    let mut outcome = json!({
        "plugin": name,
        "with": group.iter().filter(|g| **g != name).collect::<Vec<_>>(),
        "trigger": trigger.as_str(),
        "duration_ms": ms(took),
        "at": now_unix(),
    });
    match result {
        Ok((modules, drained)) => {
            for g in &group {
                r.plugin_counter(g, "success").inc();
            }
            outcome["result"] = json!("ok");
            outcome["listeners"] = json!({ "changed": drained });
            r.record_plugins(
                &old.config,
                &modules,
                Some(&group),
                &BTreeSet::new(),
                Some(&mut outcome),
            );
            tracing::info!(
                plugin = name,
                trigger = trigger.as_str(),
                "plugin reloaded in {:.1} ms",
                ms(took)
            );
            Ok(outcome)
        }
        Err(e) => {
            for g in &group {
                r.plugin_counter(g, "failure").inc();
            }
            tracing::error!(
                plugin = name,
                trigger = trigger.as_str(),
                "plugin reload failed; the version in force keeps serving: {e}"
            );
            outcome["result"] = json!("error");
            outcome["error"] = json!(e);
            if let Some(st) = r
                .plugins
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(name)
            {
                st.last_error = Some(e.clone());
                st.last_reload = Some(outcome);
            }
            Err(ReloadError::Failed(e))
        }
    }
}

/// After a plugin reload (`old` → `snap`): the listener set with each TCP
/// listener whose network filter chain changed replaced by a new listener on
/// the same socket, as a config reload replaces a listener whose settings
/// changed: new connections get the reloaded plugin, the open ones (which
/// hold the filters they started with) drain, closed `drain_timeout` later,
/// as Envoy drains a listener whose filter chain changed. `None` when no
/// listener runs a reloaded plugin as a network filter (HTTP listeners take
/// their chains from the snapshot for each request); else the set and the
/// names of the listeners replaced.
fn refilter_listeners(
    shared: &Shared,
    old: &Snapshot,
    snap: &Snapshot,
) -> Result<Option<(ListenerSet, Vec<String>)>, String> {
    let current = shared.listener_set();
    let mut changed = Vec::new();
    let mut next = Vec::with_capacity(current.len());
    for b in current.iter() {
        if same_network_chain(old, snap, &b.ctx.name) {
            next.push(b.clone());
            continue;
        }
        let name = &b.ctx.name;
        let socket = b
            .socket
            .try_clone()
            .map_err(|e| format!("listener `{name}`: duplicating its socket: {e}"))?;
        let ctx = ListenerCtx::succeed(
            &b.ctx.cfg,
            &shared.stats,
            &socket,
            &b.ctx,
            b.ctx.access_log.clone(),
        )
        .map_err(|e| format!("listener `{name}`: {e:#}"))?;
        changed.push(name.to_string());
        next.push(Arc::new(Bound {
            ctx: Arc::new(ctx),
            socket,
        }));
    }
    Ok((!changed.is_empty()).then(|| (next.into(), changed)))
}

/// Plugin `name` and the plugins of `config` it shares a proxy-wasm VM with
/// (the same non-empty `vm_id`; docs/proxy-wasm.md "VM sharing"), in config
/// order.
fn vm_group<'a>(config: &'a Config, name: &'a str) -> Vec<&'a str> {
    fn vm_id(p: &crate::config::Plugin) -> Option<&str> {
        p.proxy_wasm
            .as_ref()
            .map(|pw| pw.vm_id.as_str())
            .filter(|v| !v.is_empty())
    }
    let target = config
        .plugins
        .iter()
        .find(|p| p.value.name.as_str() == name)
        .and_then(|p| vm_id(&p.value));
    let mut group: Vec<&str> = config
        .plugins
        .iter()
        .filter(|p| {
            p.value.name.as_str() == name || (target.is_some() && vm_id(&p.value) == target)
        })
        .map(|p| p.value.name.as_str())
        .collect();
    if group.is_empty() {
        group.push(name);
    }
    group
}

/// What the watch compares between polls: size, mtime and inode (an atomic
/// write-then-rename makes a new inode even within one mtime tick). Cheap to poll;
/// contents are hashed only when it changes.
type Stamp = (u64, SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

/// A stamp this close to its mtime is not trusted (git's "racy clean" rule): a
/// same-size rewrite in place within the same mtime tick would look unchanged.
/// Such a file is hashed again at the next poll (the hash decides; nothing is
/// reloaded twice).
const RACY: Duration = Duration::from_secs(2);

/// The first wait before the watch tries a failed config reload again
/// ([`Retry`]); each further failure doubles it, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);

/// The longest wait between two retries of a failed config reload.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A config reload the watch started that failed: the files it was for (the
/// config file, the TLS files of listeners and clusters) still differ from
/// what is in force, so it is tried again at `at`, though no file changes
/// again. The failure may be passing (a `file` cluster's endpoint file
/// briefly missing, a DNS blip), and nothing else would retry it: the watch tries each content of a
/// file once. Retries back off (1 s doubling to 1 min) so a config that fails
/// the same way each time is not rebuilt in a loop, and such a failure is
/// logged once, not at each retry.
#[derive(Debug)]
struct Retry {
    /// When to try again.
    at: Instant,
    /// The wait before `at`; the next one is twice it.
    backoff: Duration,
    /// The last attempt's error.
    error: String,
}

/// Starts the thread that polls the config file and plugin modules every `every`.
pub fn spawn_watch(shared: &Arc<Shared>, every: Duration) -> std::io::Result<()> {
    let weak = Arc::downgrade(shared);
    std::thread::Builder::new()
        .name("legate-watch".into())
        .spawn(move || {
            let mut stamps: HashMap<PathBuf, Stamp> = HashMap::new();
            // Content last tried per file: a broken version is tried once
            // because it changed; [`Retry`] tries it again while it is not in force.
            let mut tried: HashMap<PathBuf, String> = HashMap::new();
            let mut generation = 0;
            let mut retry = None;
            loop {
                let Some(shared) = weak.upgrade() else { return };
                if shared.is_draining() {
                    return;
                }
                watch_once(
                    &shared,
                    &mut stamps,
                    &mut tried,
                    &mut generation,
                    &mut retry,
                );
                drop(shared);
                std::thread::sleep(every);
            }
        })
        .map(|_| ())
}

/// A config reload by the watch; a failure schedules a [`Retry`], a success
/// ends the retries.
fn watch_reload(shared: &Arc<Shared>, retry: &mut Option<Retry>) {
    let logged = retry.take().map(|r| (r.error, r.backoff));
    let failed = match reload_config_as(
        shared,
        Trigger::Watch,
        logged.as_ref().map(|(e, _)| e.as_str()),
    ) {
        Ok(_) => return,
        Err(ReloadError::Failed(e)) => e,
        Err(e) => e.to_string(),
    };
    if shared.is_draining() {
        return;
    }
    // The same failure again backs off further; another one starts over.
    let backoff = match logged {
        Some((e, backoff)) if e == failed => (backoff * 2).min(RETRY_MAX),
        _ => {
            tracing::warn!(
                "the file watch tries this config again in {}s, then less and less often \
                 (up to every {}s), while the files differ from what is in force",
                RETRY_FIRST.as_secs(),
                RETRY_MAX.as_secs()
            );
            RETRY_FIRST
        }
    };
    *retry = Some(Retry {
        at: Instant::now() + backoff,
        backoff,
        error: failed,
    });
}

/// Whether the files the watch reloads the config for differ from what is in
/// force: the config file's content, or the TLS files of a listener or
/// cluster. (A file that cannot be read differs: the reload says why.)
fn out_of_date(shared: &Shared) -> bool {
    let r = &shared.reloader;
    let config = r
        .path
        .as_ref()
        .is_some_and(|path| std::fs::read(path).ok().map(|b| sha256_hex(&b)) != r.applied_hash());
    let listeners = shared.listener_set().iter().any(|b| {
        b.ctx
            .cfg
            .tls
            .as_ref()
            .is_some_and(|tls| b.ctx.tls_files() != Some(crate::tls::files_digest(tls)))
    });
    let snap = shared.snapshot.load_full();
    let clusters = snap.config.clusters.iter().any(|c| {
        c.value.tls.is_some()
            && snap
                .clusters
                .get(&c.value.name)
                .is_some_and(|entry| !entry.upstream.same_tls_files(&c.value))
    });
    let kv = snap
        .config
        .kv
        .tls
        .as_ref()
        .is_some_and(|t| r.kv_tls() != Some(crate::tls::kv_files_digest(&t.value)));
    config || listeners || clusters || kv
}

fn watch_once(
    shared: &Arc<Shared>,
    stamps: &mut HashMap<PathBuf, Stamp>,
    tried: &mut HashMap<PathBuf, String>,
    generation: &mut u64,
    retry: &mut Option<Retry>,
) {
    let r = &shared.reloader;
    // A config put in force since the last poll (by SIGHUP or the admin API
    // too) makes the watch's memory of the config file stale: a content it
    // tried before may not be the one in force any more (edited, reloaded by
    // hand, reverted within one poll), so it is compared with what is in force
    // again, not skipped as tried.
    let now = r.generation.load(Relaxed);
    if std::mem::replace(generation, now) != now {
        if let Some(path) = &r.path {
            tried.remove(path);
        }
    }
    if retry.as_ref().is_some_and(|r| Instant::now() >= r.at) {
        if out_of_date(shared) {
            watch_reload(shared, retry);
            return;
        }
        // Put in force meanwhile (by SIGHUP, say), or the files went back.
        *retry = None;
    }
    // Returns the content hash when `path` changed since the last poll. The first
    // poll of a file hashes it too: it may have changed between the load and the
    // watch's start, and the callers compare with the hash actually applied.
    fn changed(
        path: &Path,
        stamps: &mut HashMap<PathBuf, Stamp>,
        tried: &mut HashMap<PathBuf, String>,
    ) -> Option<String> {
        let now = stamp(path)?;
        let racy = SystemTime::now()
            .duration_since(now.1)
            .map_or(true, |age| age < RACY);
        let before = if racy {
            stamps.remove(path)
        } else {
            stamps.insert(path.to_path_buf(), now)
        };
        if before == Some(now) {
            return None;
        }
        let hash = sha256_hex(&std::fs::read(path).ok()?);
        if tried.get(path) == Some(&hash) {
            return None;
        }
        tried.insert(path.to_path_buf(), hash.clone());
        Some(hash)
    }
    if let Some(path) = r.path.clone() {
        if let Some(hash) = changed(&path, stamps, tried) {
            if r.applied_hash().as_deref() != Some(hash.as_str()) {
                // Errors are logged and counted by the reload itself.
                watch_reload(shared, retry);
                return;
            }
        }
    }
    let snap = shared.snapshot.load_full();
    // Certificates renewed in place (cert, key, CA files replaced at the same
    // paths): a config reload puts them in place, keeping the listener and its
    // connections, the cluster and its endpoints and health. Each file changed
    // is compared with what is in force, so a renewal not complete yet (a new
    // certificate before its key: the reload fails, naming the mismatch) is
    // tried again when the next file lands.
    let mut renewed = false;
    for b in shared.listener_set().iter() {
        if let Some(tls) = &b.ctx.cfg.tls {
            let touched = crate::tls::files(tls)
                .filter(|f| changed(f, stamps, tried).is_some())
                .count();
            renewed |= touched > 0 && b.ctx.tls_files() != Some(crate::tls::files_digest(tls));
        }
    }
    for c in &snap.config.clusters {
        let (Some(tls), Some(entry)) = (&c.value.tls, snap.clusters.get(&c.value.name)) else {
            continue;
        };
        let touched = crate::tls::upstream_files(tls)
            .filter(|f| changed(f, stamps, tried).is_some())
            .count();
        renewed |= touched > 0 && !entry.upstream.same_tls_files(&c.value);
    }
    // `kv.tls` too: a reload loads the plugins using the KV store again with
    // its renewed files (they are never carried over with `kv.tls`).
    if let Some(tls) = &snap.config.kv.tls {
        let touched = crate::tls::kv_files(&tls.value)
            .filter(|f| changed(f, stamps, tried).is_some())
            .count();
        renewed |= touched > 0 && r.kv_tls() != Some(crate::tls::kv_files_digest(&tls.value));
    }
    if renewed {
        watch_reload(shared, retry);
        return;
    }
    // Each file looked at once per poll, then every plugin loaded from it
    // (two plugins may share a module: VM sharing needs one) is compared.
    let mut files: HashMap<&Path, Option<String>> = HashMap::new();
    for p in &snap.config.plugins {
        let Some(file) = p.value.module_file() else {
            continue; // compiled in: nothing to watch
        };
        let p = &p.value;
        let hash = files
            .entry(file)
            .or_insert_with(|| changed(file, stamps, tried));
        if let Some(hash) = hash {
            if r.plugin_hash(p.name.as_str()).as_deref() != Some(hash.as_str()) {
                // A config change that failed and is still not in force (its
                // module was being copied, say) is tried again now, with the
                // module: reloading the plugin alone would run it under the
                // old config and leave the new one waiting for its file to be
                // touched.
                if let Some(path) = r.path.as_ref() {
                    let pending = tried
                        .get(path)
                        .is_some_and(|t| r.applied_hash().as_deref() != Some(t.as_str()));
                    if pending {
                        tried.remove(path);
                        watch_reload(shared, retry);
                        return;
                    }
                }
                let _ = reload_plugin(shared, p.name.as_str(), Trigger::Watch);
            }
        }
    }
}
