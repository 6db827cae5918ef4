//! Service discovery: where a cluster's endpoints come from, and how a changed set
//! reaches the workers without dropping anything in flight.
//!
//! - `static`: the config's `endpoints`, host names resolved once at load.
//! - `dns`: the config's `endpoints` host names, resolved with [`dns::Resolver`]
//!   every `dns_refresh_rate` (or when its TTL runs out); after a failure, with
//!   `dns_failure_refresh_rate`, sooner, backing off ([`Schedule`]). Each name has
//!   its own schedule, as each of Envoy's resolve targets. `strict`: every
//!   address is an endpoint; `logical`: the first one (IPv4 preferred) is.
//! - `file`: an endpoint file (YAML or JSON: `endpoints: [{address, weight, priority, zone,
//!   metadata, health_check}]`, an entry's `health_check` validated as a configured
//!   endpoint's), re-read every `watch_interval` and applied when its content changes.
//!
//! **Generations.** A [`Cluster`] never changes its endpoint list. Discovery builds
//! the next generation with [`Cluster::with_endpoints`] — same counters and breakers,
//! and the *same `Arc<Endpoint>`* for every endpoint that is still there, so its
//! health flags, outlier state and counters carry over — and swaps it into the
//! [`ClusterEntry`]. Each request picks from the generation current when its attempt
//! starts and keeps it (indices stay valid); each worker's balancer is keyed by
//! generation, so the next pick after a swap uses the new set. Connection pools are
//! keyed by address, so a surviving endpoint keeps its pooled connections.
//!
//! **Health has primacy.** An endpoint that fails health checks (or is ejected) gets
//! no traffic even while discovery lists it (its flags carry over). An endpoint that
//! discovery drops stays in the set while the cluster has active health checks and
//! it passes them; the refresh after it fails them removes it
//! (`membership_kept_by_health` counts such endpoints). Without health checks a
//! dropped endpoint goes at once. A changed weight, priority, zone, metadata or own
//! `health_check` makes a new
//! endpoint (fresh counters and outlier state, not ejected) that inherits only its
//! active health-check state: the "failed active health check" flag and the run of
//! passed or failed checks, so the thresholds still apply to it. The cluster's
//! gauges are recounted for the new generation: an ejected endpoint dropped or
//! replaced this way no longer counts in `outlier_detection_ejections_active`.
//!
//! **Warming.** A `dns` cluster has no endpoints until its first answer: at start
//! `/ready` waits for it (up to `initial_fetch_timeout`, see
//! [`ClusterEntry::warming`]); at a reload [`warm_for_reload`] gives a new or
//! changed `dns` cluster its first endpoints before the config goes live.
//!
//! **Failures keep the old set.** A failed resolution, an unreadable file or a file
//! with an error (reported with `file:line:col`) changes nothing and counts
//! `discovery_update_failure`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use super::dns::{self, Resolver};
use super::health::FAILED_ACTIVE_HC;
use super::{Attributes, Cluster, Endpoint};
use crate::config::{self, DiscoveryType, DnsLookup, EndpointConfig, EndpointHealthCheck, Spanned};
use crate::server::ClusterEntry;

/// An endpoint as discovery found it.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Where connections go.
    pub address: SocketAddr,
    /// The host part as written (SNI / certificate name).
    pub host: Arc<str>,
    /// `host:port` as written (Host header, ring-hash identity).
    pub authority: String,
    /// Weight (at least 1), priority, zone, metadata and own health-check
    /// settings (configured, or from the file).
    pub attributes: Attributes,
}

impl Spec {
    fn same_endpoint(&self, ep: &Endpoint) -> bool {
        self.address == ep.address && self.authority == ep.authority
    }

    fn same_attributes(&self, ep: &Endpoint) -> bool {
        self.attributes == ep.attributes()
    }

    /// The spec of `ep`, as discovery found it.
    fn of(ep: &Endpoint) -> Spec {
        Spec {
            address: ep.address,
            host: ep.host.clone(),
            authority: ep.authority.clone(),
            attributes: ep.attributes(),
        }
    }

    fn endpoint(&self) -> Arc<Endpoint> {
        Endpoint::new(
            self.address,
            self.host.clone(),
            self.authority.clone(),
            self.attributes.clone(),
        )
    }
}

/// The endpoint file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    endpoints: Vec<Spanned<FileEndpoint>>,
}

/// One endpoint of the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    address: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    priority: u32,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    health_check: Option<EndpointHealthCheck>,
}

fn one() -> u32 {
    1
}

/// Parses the text of `cluster`'s endpoint file; errors name `path:line:col`.
///
/// An entry's own `health_check` is checked as a configured endpoint's is, against
/// the cluster's `health_check`, with the same messages.
pub fn parse_file(path: &Path, text: &str, cluster: &config::Cluster) -> anyhow::Result<Vec<Spec>> {
    let shown = path.display();
    let file: EndpointFile = serde_saphyr::from_str(text).map_err(|e| anyhow!("{shown}: {e}"))?;
    let mut specs: Vec<Spec> = Vec::with_capacity(file.endpoints.len());
    for ep in file.endpoints {
        let at = ep.referenced;
        let place = |key: &str| {
            let (line, col) = config::key_position(text, &at, &[key]);
            format!("{shown}:{line}:{col}")
        };
        let ep = ep.value;
        let address: SocketAddr = ep.address.parse().map_err(|_| {
            anyhow!(
                "{}: endpoint address `{}` is not `ip:port` (write it like \
                 `10.0.0.5:8080` or `[2001:db8::5]:8080`; the file takes no host names)",
                place("address"),
                ep.address
            )
        })?;
        if ep.weight == 0 {
            bail!(
                "{}: endpoint `{}` has weight 0 (weights are at least 1; remove \
                 the endpoint to send it nothing)",
                place("weight"),
                ep.address
            );
        }
        if specs.iter().any(|s| s.address == address) {
            bail!(
                "{}: endpoint `{}` is listed twice",
                place("address"),
                ep.address
            );
        }
        if let Some(own) = &ep.health_check {
            let errors = config::endpoint_health_check_errors(text, &at, cluster, &ep.address, own);
            if let Some(e) = errors.first() {
                let help = e
                    .help
                    .as_deref()
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                bail!("{shown}:{}:{}: {}{help}", e.line, e.col, e.message);
            }
        }
        specs.push(Spec {
            address,
            host: address.ip().to_string().into(),
            authority: ep.address,
            attributes: Attributes {
                weight: ep.weight,
                priority: ep.priority,
                zone: ep.zone,
                metadata: ep.metadata,
                health_check: ep.health_check,
            },
        });
    }
    Ok(specs)
}

/// Reads and parses `cluster`'s endpoint file.
pub fn read_file(path: &Path, cluster: &config::Cluster) -> anyhow::Result<Vec<Spec>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read endpoint file {}: {e}", path.display()))?;
    parse_file(path, &text, cluster)
}

/// The first generation of a cluster: `static` resolves its host names now, `file`
/// reads its file now (an error fails the config load), `dns` starts empty and is
/// filled by the first resolution, which [`run`] makes at once (at a reload,
/// [`warm_for_reload`] fills it before it goes live).
pub(super) fn initial_endpoints(cfg: &config::Cluster) -> anyhow::Result<Vec<Arc<Endpoint>>> {
    match (&cfg.discovery.kind, &cfg.discovery.path) {
        (DiscoveryType::File, Some(path)) => {
            Ok(read_file(path, cfg)?.iter().map(Spec::endpoint).collect())
        }
        _ => Ok(Vec::new()),
    }
}

/// A new or changed `dns` cluster's first endpoints on a reload, so it does not
/// go live empty (Envoy swaps an updated cluster in only once it has warmed).
///
/// When `old` (the cluster it replaces) was `dns` with the same `dns_lookup` and
/// `dns_resolvers`, every configured name `old` has addresses for starts from
/// them: fresh endpoints (the new weights, zones and metadata; healthy, as a
/// changed cluster starts) at the same addresses. (Not the old cluster's pooled
/// connections: a changed cluster has new `UpstreamSettings`, whose id keys
/// the pool, so requests open connections of their own.) The other names (new
/// ones; all of them without such an `old`) are resolved now, all clusters at
/// once on a thread of their own, each within its
/// `initial_fetch_timeout`. A name that does not answer in time leaves the cluster
/// without its endpoints (Envoy activates a cluster after `initial_fetch_timeout`
/// too); discovery keeps resolving it (every `dns_refresh_rate`, or sooner with
/// `dns_failure_refresh_rate`), and what it found
/// is returned as a note for the reload's outcome. The discovery task started
/// after the commit refreshes every name at once, as usual.
///
/// `pairs`: the cluster replaced (if any) and the new entry, not yet published.
pub fn warm_for_reload(pairs: &[(Option<Arc<Cluster>>, Arc<ClusterEntry>)]) -> Vec<String> {
    type Job<'a> = (
        &'a Arc<ClusterEntry>,
        &'a Cluster,
        Vec<Arc<Endpoint>>,
        Vec<&'a EndpointConfig>,
    );
    let mut jobs: Vec<Job<'_>> = Vec::new();
    let mut notes = Vec::new();
    let news: Vec<Arc<Cluster>> = pairs.iter().map(|(_, e)| e.cluster()).collect();
    for ((old, entry), new) in pairs.iter().zip(&news) {
        let cfg = &new.config;
        if cfg.discovery.kind != DiscoveryType::Dns {
            continue;
        }
        let (carried, missing) = carried_endpoints(old.as_deref(), cfg);
        if missing.is_empty() {
            install(entry, carried, &mut notes);
        } else {
            jobs.push((entry, &**new, carried, missing));
        }
    }
    if jobs.is_empty() {
        return notes;
    }
    let resolved = std::thread::scope(|scope| {
        let work = scope.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| anyhow!("cannot start a runtime to resolve: {e}"))?;
            Ok::<_, anyhow::Error>(rt.block_on(futures_util::future::join_all(jobs.iter().map(
                |(_, new, _, missing)| async move {
                    let cfg = &new.config;
                    let within = cfg.discovery.initial_fetch_timeout;
                    let resolver = resolver(cfg);
                    // Each name on its own: one that fails costs only its endpoints.
                    futures_util::future::join_all(missing.iter().map(|ep| {
                        let resolver = &resolver;
                        async move {
                            match tokio::time::timeout(within.get(), resolve_one(resolver, cfg, ep))
                                .await
                            {
                                Ok(r) => r.map(|(found, _)| found),
                                Err(_) => Err(anyhow!(
                                    "no answer for `{}` within `initial_fetch_timeout` ({within})",
                                    ep.address
                                )),
                            }
                        }
                    }))
                    .await
                },
            ))))
        });
        work.join()
            .unwrap_or_else(|_| Err(anyhow!("the resolving thread panicked")))
    });
    for (i, (entry, new, mut endpoints, _)) in jobs.into_iter().enumerate() {
        let stats = &new.stats;
        stats.discovery_update_attempt.fetch_add(1, Relaxed);
        let mut failed = Vec::new();
        match resolved.as_ref().map(|all| all.get(i)) {
            Ok(Some(answers)) => {
                for answer in answers {
                    match answer {
                        Ok(found) => endpoints.extend(found.iter().map(Spec::endpoint)),
                        Err(e) => failed.push(format!("{e:#}")),
                    }
                }
            }
            Ok(None) => failed.push("internal error: no resolution result".to_string()),
            Err(e) => failed.push(format!("{e:#}")),
        }
        if failed.is_empty() {
            stats.discovery_update_success.fetch_add(1, Relaxed);
        } else {
            stats.discovery_update_failure.fetch_add(1, Relaxed);
            let name = &new.name;
            let note = format!(
                "cluster `{name}`: {}; it went live without the endpoints of the names \
                 not resolved (requests for them get 503 until discovery resolves them; \
                 it asks again every `dns_refresh_rate`, or as `dns_failure_refresh_rate` \
                 says)",
                failed.join("; ")
            );
            tracing::warn!("reload: {note}");
            notes.push(note);
        }
        install(entry, endpoints, &mut notes);
    }
    notes
}

/// Makes `endpoints` the first generation of a reloaded cluster, and it warm.
fn install(entry: &Arc<ClusterEntry>, endpoints: Vec<Arc<Endpoint>>, notes: &mut Vec<String>) {
    let current = entry.cluster();
    match current.with_endpoints(endpoints) {
        Ok(cluster) => entry.replace(cluster),
        Err(e) => notes.push(format!("cluster `{}`: {e:#}", current.name)),
    }
    entry.set_warm();
}

/// The endpoints a changed `dns` cluster `cfg` takes over from `old` (see
/// [`warm_for_reload`]), and the configured endpoints that got none that way.
fn carried_endpoints<'c>(
    old: Option<&Cluster>,
    cfg: &'c config::Cluster,
) -> (Vec<Arc<Endpoint>>, Vec<&'c EndpointConfig>) {
    let (n, o) = (&cfg.discovery, old.map(|o| &o.config.discovery));
    // Another lookup mode or other name servers may answer otherwise: ask again.
    let same_resolution = o.is_some_and(|o| {
        o.kind == DiscoveryType::Dns
            && o.dns_lookup == n.dns_lookup
            && o.dns_resolvers
                .iter()
                .map(|r| &r.value)
                .eq(n.dns_resolvers.iter().map(|r| &r.value))
    });
    let mut carried = Vec::new();
    let mut missing = Vec::new();
    for ep in &cfg.endpoints {
        let ep = &ep.value;
        let before = old
            .filter(|_| same_resolution)
            .map(|o| &o.endpoints[..])
            .unwrap_or_default()
            .iter()
            .filter(|e| e.authority == ep.address);
        let start = carried.len();
        for e in before {
            carried.push(Endpoint::new(
                e.address,
                e.host.clone(),
                e.authority.clone(),
                Attributes::of(ep),
            ));
        }
        if carried.len() == start {
            missing.push(ep);
        }
    }
    (carried, missing)
}

/// The endpoint list of the next generation of `current` given what discovery found:
/// surviving endpoints keep their `Arc`, dropped ones stay while they pass health
/// checks (see the module doc). Also returns how many were kept that way.
pub fn merge(current: &Cluster, found: &[Spec]) -> (Vec<Arc<Endpoint>>, usize) {
    // `dns_lookup: logical` is one endpoint per name, as Envoy's logical host:
    // a new first address replaces it (its health-check state carried), and an
    // address the answer no longer leads with is never kept for its health.
    let d = &current.config.discovery;
    let logical = d.kind == DiscoveryType::Dns && d.dns_lookup == DnsLookup::Logical;
    let same = |spec: &Spec, ep: &Endpoint| {
        if logical {
            spec.authority == ep.authority
        } else {
            spec.same_endpoint(ep)
        }
    };
    let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(found.len());
    for spec in found {
        let old = current.endpoints.iter().find(|e| same(spec, e));
        next.push(match old {
            Some(ep) if spec.same_attributes(ep) && spec.address == ep.address => ep.clone(),
            Some(ep) => {
                let fresh = spec.endpoint();
                fresh.health.carry_from(&ep.health);
                fresh
            }
            None => spec.endpoint(),
        });
    }
    let checked = current.config.health_check.is_some() && !logical;
    let mut kept = 0;
    for ep in &current.endpoints {
        let listed = found.iter().any(|s| same(s, ep));
        if !listed && checked && ep.health.flags() & FAILED_ACTIVE_HC == 0 {
            next.push(ep.clone());
            kept += 1;
        }
    }
    (next, kept)
}

/// Applies what discovery found to `entry`: swaps in a new generation if the set
/// changed (and starts health checks of new endpoints), counts the outcome.
fn apply(entry: &Arc<ClusterEntry>, found: &[Spec], counted: bool) {
    let current = entry.cluster();
    let stats = &current.stats;
    let (next, kept) = merge(&current, found);
    stats.membership_kept_by_health.store(kept as u64, Relaxed);
    // The same endpoints in another order are the same set: round-robin DNS
    // rotates its answer, which must not make a new generation (a new ring,
    // every worker's rotation restarted) at each refresh.
    let same =
        next.len() == current.endpoints.len() && next.iter().all(|a| current.index_of(a).is_some());
    if same {
        if counted {
            stats.discovery_update_no_rebuild.fetch_add(1, Relaxed);
        }
        return;
    }
    let fresh: Vec<Arc<Endpoint>> = next
        .iter()
        .filter(|e| current.index_of(e).is_none())
        .cloned()
        .collect();
    match current.with_endpoints(next) {
        Ok(cluster) => {
            tracing::info!(
                cluster = %cluster.name,
                endpoints = cluster.endpoints.len(),
                kept_by_health = kept,
                "discovery: endpoint set changed"
            );
            entry.replace(cluster);
            stats.discovery_update_success.fetch_add(1, Relaxed);
            for ep in &fresh {
                super::health::start_checks(entry, ep);
            }
        }
        Err(e) => {
            stats.discovery_update_failure.fetch_add(1, Relaxed);
            tracing::warn!(cluster = %current.name, "discovery: {e:#}");
        }
    }
}

/// Runs a `dns` or `file` cluster's discovery for as long as the health thread runs.
pub(super) async fn run(entry: Arc<ClusterEntry>) {
    let cfg = entry.cluster().config.clone();
    match cfg.discovery.kind {
        DiscoveryType::Static => {}
        DiscoveryType::Dns => run_dns(entry, &cfg).await,
        DiscoveryType::File => run_file(entry, &cfg).await,
    }
}

/// The resolver of a `dns` cluster: its `dns_resolvers`, or /etc/resolv.conf's.
fn resolver(cfg: &config::Cluster) -> Resolver {
    let d = &cfg.discovery;
    let servers = d
        .dns_resolvers
        .iter()
        .filter_map(|r| dns::parse_server(&r.value))
        .collect();
    Resolver::new(servers, d.dns_timeout.get())
}

/// When one name of a `dns` cluster is resolved next (each name has its own):
/// after a success `dns_refresh_rate` (or the name's TTL with `dns_respect_ttl`);
/// after a failure, with `dns_failure_refresh_rate`,
/// a backoff that starts at `base_interval` and doubles up to `max_interval`, each
/// wait drawn from the upper half of the current step (so proxies that failed
/// together do not ask again in lockstep, and none asks again at once). A success
/// starts the backoff over. Without `dns_failure_refresh_rate` a failure waits
/// `dns_refresh_rate`, as before and as Envoy.
#[derive(Debug)]
struct Schedule {
    refresh: Duration,
    respect_ttl: bool,
    /// `base_interval` and `max_interval`, when set.
    backoff: Option<(Duration, Duration)>,
    /// The next failure's step (before jitter).
    step: Duration,
}

impl Schedule {
    fn new(d: &config::Discovery) -> Schedule {
        let backoff = d
            .dns_failure_refresh_rate
            .map(|r| (r.base_interval.get(), r.max()));
        Schedule {
            refresh: d.dns_refresh_rate.get(),
            respect_ttl: d.dns_respect_ttl,
            backoff,
            step: backoff.map_or(Duration::ZERO, |(base, _)| base),
        }
    }

    /// The wait after a resolution of this name whose answers' smallest TTL is
    /// `ttl` seconds.
    fn after_success(&mut self, ttl: u32) -> Duration {
        if let Some((base, _)) = self.backoff {
            self.step = base;
        }
        self.success_wait(ttl)
    }

    /// `dns_refresh_rate`, or with `dns_respect_ttl` the TTL `ttl` (seconds),
    /// unless it is 0: then `dns_refresh_rate` too, as Envoy (a TTL of 0, as
    /// Consul gives by default, would mean asking again at once).
    fn success_wait(&self, ttl: u32) -> Duration {
        if self.respect_ttl && ttl > 0 {
            Duration::from_secs(u64::from(ttl))
        } else {
            self.refresh
        }
    }

    /// The wait after a failed resolution; `jitter` in [0, 1] picks it within the
    /// step (0: half the step, 1: all of it). The TTL is unknown after a failure, so
    /// `dns_respect_ttl` plays no part.
    fn after_failure(&mut self, jitter: f64) -> Duration {
        let Some((_, max)) = self.backoff else {
            return self.refresh;
        };
        let step = self.step;
        self.step = step.saturating_mul(2).min(max);
        let half = step / 2;
        // In whole nanoseconds, so a jitter of 0 or 1 gives the bounds exactly.
        let extra = ((step - half).as_nanos() as f64 * jitter.clamp(0.0, 1.0)) as u64;
        half + Duration::from_nanos(extra)
    }
}

async fn run_dns(entry: Arc<ClusterEntry>, cfg: &config::Cluster) {
    let resolver = resolver(cfg);
    let all: Vec<&EndpointConfig> = cfg.endpoints.iter().map(|e| &e.value).collect();
    if all.is_empty() {
        return;
    }
    // Each name has its own schedule, as each of Envoy's resolve targets: with
    // `dns_respect_ttl` a name is asked again when *its* TTL runs out (a short TTL
    // on one name does not make the others asked as often), and after a failure
    // only the failed name backs off. Names due together (all of them, without
    // `dns_respect_ttl`, while all answer) are resolved together, in one round.
    let mut schedules: Vec<Schedule> = all.iter().map(|_| Schedule::new(&cfg.discovery)).collect();
    let mut due: Vec<Instant> = vec![Instant::now(); all.len()];
    // Each name's last answer: a name that fails keeps its endpoints, and costs
    // the others nothing (Envoy resolves each name on its own). At first, the
    // endpoints a reload carried over for it.
    let current = entry.cluster();
    let mut last: Vec<Option<Vec<Spec>>> = all
        .iter()
        .map(|ep| {
            let carried: Vec<Spec> = current
                .endpoints
                .iter()
                .filter(|e| e.authority == ep.address)
                .map(|e| Spec::of(e))
                .collect();
            (!carried.is_empty()).then_some(carried)
        })
        .collect();
    drop(current);
    loop {
        let now = Instant::now();
        let ready: Vec<usize> = (0..all.len()).filter(|&i| due[i] <= now).collect();
        let stats = entry.cluster().stats.clone();
        stats.discovery_update_attempt.fetch_add(1, Relaxed);
        let names: Vec<&EndpointConfig> = ready.iter().map(|&i| all[i]).collect();
        let results = resolve_each(&resolver, cfg, &names).await;
        // Each name's next resolution counts from the end of this one.
        let done = Instant::now();
        let mut failed = Vec::new();
        for (&i, result) in ready.iter().zip(results) {
            match result {
                Ok((specs, ttl)) => {
                    last[i] = Some(specs);
                    due[i] = later(done, schedules[i].after_success(ttl));
                }
                Err(e) => {
                    let wait = schedules[i].after_failure(rand::random::<f64>());
                    due[i] = later(done, wait);
                    failed.push(format!("{e:#} (asking again in {wait:?})"));
                }
            }
        }
        if failed.len() < ready.len() {
            let found = joined(&last);
            apply(&entry, &found, true);
            if !found.is_empty() {
                entry.set_warm();
            }
        }
        if !failed.is_empty() {
            stats.discovery_update_failure.fetch_add(1, Relaxed);
            tracing::warn!(
                cluster = %cfg.name,
                "dns discovery: {}; keeping their endpoints as they were",
                failed.join("; ")
            );
        }
        let next = due.iter().min().copied().unwrap_or(done);
        tokio::time::sleep_until(next).await;
    }
}

/// `at` + `wait`, or (a wait too long to add, such as an IP literal's TTL of
/// `u32::MAX` seconds on some platforms) a year from `at`: never, in effect.
fn later(at: Instant, wait: Duration) -> Instant {
    at.checked_add(wait)
        .or_else(|| at.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(at)
}

/// The endpoints of every name's last answer, each once.
fn joined(answers: &[Option<Vec<Spec>>]) -> Vec<Spec> {
    let mut found: Vec<Spec> = Vec::new();
    for spec in answers.iter().flatten().flatten() {
        if !found
            .iter()
            .any(|s| s.address == spec.address && s.authority == spec.authority)
        {
            found.push(spec.clone());
        }
    }
    found
}

/// Resolves each of the endpoints `eps` of `cfg` on its own, all at once: its
/// endpoints and its answer's TTL, or why it failed.
async fn resolve_each(
    resolver: &Resolver,
    cfg: &config::Cluster,
    eps: &[&EndpointConfig],
) -> Vec<anyhow::Result<(Vec<Spec>, u32)>> {
    futures_util::future::join_all(eps.iter().map(|ep| resolve_one(resolver, cfg, ep))).await
}

/// Resolves the endpoint `ep` of `cfg`: its endpoints and the answer's TTL.
async fn resolve_one(
    resolver: &Resolver,
    cfg: &config::Cluster,
    ep: &EndpointConfig,
) -> anyhow::Result<(Vec<Spec>, u32)> {
    let (host, port) = config::split_host_port(&ep.address).map_err(|why| anyhow!("{why}"))?;
    let answer = resolver.resolve(&host).await?;
    let host: Arc<str> = host.into();
    let addrs: Vec<IpAddr> = match cfg.discovery.dns_lookup {
        DnsLookup::Strict => answer.addrs,
        DnsLookup::Logical => answer
            .addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| answer.addrs.first())
            .copied()
            .into_iter()
            .collect(),
    };
    let mut found: Vec<Spec> = Vec::new();
    for ip in addrs {
        let address = SocketAddr::new(ip, port);
        if found.iter().any(|s| s.address == address) {
            continue;
        }
        found.push(Spec {
            address,
            host: host.clone(),
            authority: ep.address.clone(),
            attributes: Attributes::of(ep),
        });
    }
    Ok((found, answer.ttl))
}

async fn run_file(entry: Arc<ClusterEntry>, cfg: &config::Cluster) {
    let Some(path) = &cfg.discovery.path else {
        return;
    };
    // The content last looked at (applied or rejected), and what it gave.
    let mut last: Option<Vec<u8>> = None;
    let mut last_found: Vec<Spec> = Vec::new();
    let mut last_read_error: Option<String> = None;
    let mut tick = tokio::time::interval(cfg.discovery.watch_interval.get());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let stats = entry.cluster().stats.clone();
        let bytes = match tokio::fs::read(path).await {
            Ok(b) => {
                last_read_error = None;
                b
            }
            Err(e) => {
                let msg = format!("cannot read endpoint file {}: {e}", path.display());
                // Counted and logged once per distinct error, not every tick.
                if last_read_error.as_deref() != Some(msg.as_str()) {
                    stats.discovery_update_attempt.fetch_add(1, Relaxed);
                    stats.discovery_update_failure.fetch_add(1, Relaxed);
                    tracing::warn!(cluster = %cfg.name, "file discovery: {msg}; keeping the endpoints as they were");
                    last_read_error = Some(msg);
                }
                continue;
            }
        };
        if last.as_deref() == Some(bytes.as_slice()) {
            // Same content: only endpoints kept by health may need dropping.
            if stats.membership_kept_by_health.load(Relaxed) > 0 {
                apply(&entry, &last_found, false);
            }
            continue;
        }
        let first = last.is_none();
        last = Some(bytes.clone());
        let text = String::from_utf8_lossy(&bytes);
        match parse_file(path, &text, cfg) {
            Ok(found) => {
                // The first read repeats the one made at load: not an update.
                if !first {
                    stats.discovery_update_attempt.fetch_add(1, Relaxed);
                }
                apply(&entry, &found, !first);
                last_found = found;
            }
            Err(e) => {
                stats.discovery_update_attempt.fetch_add(1, Relaxed);
                stats.discovery_update_failure.fetch_add(1, Relaxed);
                tracing::warn!(cluster = %cfg.name, "file discovery: {e:#}; keeping the endpoints as they were");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::cluster::tests::cluster;

    fn spec(addr: &str, weight: u32) -> Spec {
        Spec {
            address: addr.parse().unwrap(),
            host: "h".into(),
            authority: addr.into(),
            attributes: Attributes {
                weight,
                ..Attributes::default()
            },
        }
    }

    #[test]
    fn a_rotated_answer_is_the_same_set() {
        let c = cluster(
            "name: c\nendpoints: [{ address: \"10.0.0.1:80\" }, { address: \"10.0.0.2:80\" }, { address: \"10.0.0.3:80\" }]",
        );
        let settings = crate::upstream::UpstreamSettings::new(&c.config).unwrap();
        let entry = Arc::new(crate::server::ClusterEntry::new(c.clone(), settings));
        let rotated = [
            spec("10.0.0.2:80", 1),
            spec("10.0.0.3:80", 1),
            spec("10.0.0.1:80", 1),
        ];
        apply(&entry, &rotated, true);
        assert!(Arc::ptr_eq(&entry.cluster(), &c), "a new generation");
        assert_eq!(c.stats.discovery_update_no_rebuild.load(Relaxed), 1);
        assert_eq!(c.stats.discovery_update_success.load(Relaxed), 0);
        // A changed set still is one.
        apply(&entry, &rotated[..2], true);
        assert!(!Arc::ptr_eq(&entry.cluster(), &c));
    }

    /// A cluster's config, for [`parse_file`].
    fn cfg(yaml: &str) -> config::Cluster {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn file_errors_name_the_line_and_column() {
        let p = Path::new("eps.yaml");
        let c = cfg("name: c");
        let ok = parse_file(
            p,
            "endpoints:\n  - address: 10.0.0.1:80\n    weight: 3\n    zone: a\n    priority: 2\n    metadata: {canary: true}\n  - { address: \"[::1]:81\" }\n",
            &c,
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].attributes.weight, 3);
        assert_eq!(ok[0].attributes.zone.as_deref(), Some("a"));
        assert_eq!(ok[0].attributes.priority, 2);
        assert_eq!(ok[1].attributes.priority, 0);
        assert_eq!(&*ok[1].host, "::1");
        let json = parse_file(
            p,
            r#"{"endpoints": [{"address": "10.0.0.2:80", "weight": 2}]}"#,
            &c,
        )
        .unwrap();
        assert_eq!(json[0].attributes.weight, 2);

        let e = parse_file(
            p,
            "endpoints:\n  - address: 10.0.0.1:80\n  - address: db.internal:80\n",
            &c,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("eps.yaml:3:5: endpoint address `db.internal:80`"),
            "{e}"
        );
        let e = parse_file(
            p,
            "endpoints:\n  - address: 10.0.0.1:80\n    weight: 0\n",
            &c,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("eps.yaml:3:5: endpoint `10.0.0.1:80` has weight 0"),
            "{e}"
        );
        let e = parse_file(
            p,
            "endpoints:\n  - address: 10.0.0.1:80\n  - { weight: 2, address: 10.0.0.1:80 }\n",
            &c,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("eps.yaml:3:18: endpoint `10.0.0.1:80` is listed twice"),
            "{e}"
        );
        let e = parse_file(
            p,
            "endpoints:\n  - address: 10.0.0.1:80\n    wieght: 2\n",
            &c,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("eps.yaml: ") && e.contains("wieght"), "{e}");
    }

    #[test]
    fn an_entry_takes_its_own_health_check_validated_as_in_the_config() {
        let p = Path::new("eps.yaml");
        let http = cfg("name: app\nhealth_check: { http: { path: /healthz } }");
        let tcp = cfg("name: db\nhealth_check: { tcp: {} }");
        let unchecked = cfg("name: bare");

        // YAML and JSON alike; absent, the cluster's settings.
        let ok = parse_file(
            p,
            "endpoints:\n  - address: 10.0.0.1:80\n    health_check: { host: a.internal, port: 8081 }\n  - { address: 10.0.0.2:80 }\n",
            &http,
        )
        .unwrap();
        let own = ok[0].attributes.health_check.as_ref().unwrap();
        assert_eq!(
            (own.host.as_deref(), own.port),
            (Some("a.internal"), Some(8081))
        );
        assert_eq!(ok[1].attributes.health_check, None);
        let json = parse_file(
            p,
            r#"{"endpoints": [{"address": "10.0.0.2:80", "health_check": {"port": 9000}}]}"#,
            &tcp,
        )
        .unwrap();
        assert_eq!(
            json[0].attributes.health_check.as_ref().unwrap().port,
            Some(9000)
        );

        // The config's checks and messages, at the offending key.
        let err = |text: &str, c: &config::Cluster| parse_file(p, text, c).unwrap_err().to_string();
        let e = err(
            "endpoints:\n  - address: 10.0.0.1:80\n    health_check:\n      host: \"bad host\"\n",
            &http,
        );
        assert_eq!(
            e,
            "eps.yaml:4:7: endpoint `10.0.0.1:80` of cluster `app`: health check host \
             `bad host` is not a valid authority (write a host name, optionally with a port: \
             `api.internal`)"
        );
        let e = err(
            "endpoints:\n  - { address: 10.0.0.1:80, health_check: { port: 0 } }\n",
            &http,
        );
        assert!(
            e.starts_with("eps.yaml:2:45: endpoint `10.0.0.1:80` of cluster `app`: health check port 0 (write the port"),
            "{e}"
        );
        let e = err(
            "endpoints:\n  - { address: 10.0.0.1:5432, health_check: { host: db.internal } }\n",
            &tcp,
        );
        assert!(
            e.starts_with("eps.yaml:2:47: endpoint `10.0.0.1:5432` of cluster `db`: `health_check.host` without an HTTP or gRPC check"),
            "{e}"
        );
        let e = err(
            r#"{"endpoints": [{"address": "10.0.0.1:80", "health_check": {"port": 81}}]}"#,
            &unchecked,
        );
        assert!(
            e.starts_with("eps.yaml:1:43: endpoint `10.0.0.1:80` of cluster `bare` has `health_check`, but the cluster has no `health_check`"),
            "{e}"
        );
        // A port out of range is the parser's error, as in the config.
        let e = err(
            "endpoints:\n  - { address: 10.0.0.1:80, health_check: { port: 70000 } }\n",
            &http,
        );
        assert!(e.starts_with("eps.yaml: "), "{e}");
        let e = err(
            "endpoints:\n  - { address: 10.0.0.1:80, health_check: { prot: 1 } }\n",
            &http,
        );
        assert!(e.starts_with("eps.yaml: ") && e.contains("prot"), "{e}");
    }

    fn schedule(yaml: &str) -> Schedule {
        let d: config::Discovery = serde_saphyr::from_str(yaml).unwrap();
        Schedule::new(&d)
    }

    #[test]
    fn failures_back_off_and_a_success_starts_over() {
        let secs = Duration::from_secs;
        let ms = Duration::from_millis;
        // Unset: a failure waits dns_refresh_rate, as before (and as Envoy).
        let mut s = schedule("{ type: dns, dns_refresh_rate: 7s }");
        assert_eq!(s.after_failure(0.0), secs(7));
        assert_eq!(s.after_failure(1.0), secs(7));
        assert_eq!(s.after_success(30), secs(7));

        // Doubling from base_interval up to max_interval; the jitter picks within
        // the upper half of each step.
        let mut s = schedule(
            "{ type: dns, dns_refresh_rate: 1h, \
             dns_failure_refresh_rate: { base_interval: 1s, max_interval: 5s } }",
        );
        let top: Vec<Duration> = (0..5).map(|_| s.after_failure(1.0)).collect();
        assert_eq!(top, [secs(1), secs(2), secs(4), secs(5), secs(5)]);
        // A success starts over, and waits dns_refresh_rate.
        assert_eq!(s.after_success(30), secs(3600));
        let low: Vec<Duration> = (0..5).map(|_| s.after_failure(0.0)).collect();
        assert_eq!(low, [ms(500), secs(1), secs(2), ms(2500), ms(2500)]);
        s.after_success(30);
        for (step, j) in [(1000, 0.3), (2000, 0.9), (4000, 0.5)] {
            let w = s.after_failure(j).as_millis();
            assert!(step / 2 <= w && w <= step, "{w}ms for a {step}ms step");
        }
        s.after_success(30);
        for _ in 0..50 {
            let w = s.after_failure(rand::random());
            assert!(ms(500) <= w && w <= secs(5), "{w:?}");
        }

        // max_interval defaults to 10 × base_interval, as Envoy.
        let mut s = schedule("{ type: dns, dns_failure_refresh_rate: { base_interval: 100ms } }");
        let top: Vec<Duration> = (0..6).map(|_| s.after_failure(1.0)).collect();
        assert_eq!(
            top,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );

        // With dns_respect_ttl a success waits the TTL; a failure (no TTL known)
        // follows the failure backoff.
        let mut s = schedule(
            "{ type: dns, dns_respect_ttl: true, \
             dns_failure_refresh_rate: { base_interval: 2s, max_interval: 8s } }",
        );
        assert_eq!(s.after_success(30), secs(30));
        assert_eq!(s.after_failure(1.0), secs(2));
        assert_eq!(s.after_failure(1.0), secs(4));
        // A TTL of 0 waits dns_refresh_rate (5s), as Envoy: not at once.
        assert_eq!(s.after_success(0), secs(5));
        assert_eq!(s.after_failure(1.0), secs(2));
        // Without dns_failure_refresh_rate a failure waits dns_refresh_rate (5s).
        let mut s = schedule("{ type: dns, dns_respect_ttl: true }");
        assert_eq!(s.after_success(30), secs(30));
        assert_eq!(s.after_failure(0.5), secs(5));
    }

    #[test]
    fn merge_keeps_state_and_respects_health() {
        let c = cluster(
            "name: c\nendpoints: [{ address: \"10.0.0.1:80\" }, { address: \"10.0.0.2:80\" }]",
        );
        // Same set: the same Arcs.
        let (next, kept) = merge(&c, &[spec("10.0.0.1:80", 1), spec("10.0.0.2:80", 1)]);
        assert!(Arc::ptr_eq(&next[0], &c.endpoints[0]) && Arc::ptr_eq(&next[1], &c.endpoints[1]));
        assert_eq!(kept, 0);
        // Without health checks a dropped endpoint goes; a reweighted one is new but
        // keeps a failed health check.
        c.set_flag(0, FAILED_ACTIVE_HC, true);
        let (next, kept) = merge(&c, &[spec("10.0.0.1:80", 5), spec("10.0.0.3:80", 1)]);
        assert_eq!(kept, 0);
        assert_eq!(next.len(), 2);
        assert!(!Arc::ptr_eq(&next[0], &c.endpoints[0]));
        assert_eq!(next[0].weight, 5);
        assert_eq!(next[0].health.flags(), FAILED_ACTIVE_HC);
        assert_eq!(next[1].address.to_string(), "10.0.0.3:80");

        // With health checks a dropped endpoint that passes them stays; one that
        // fails them goes.
        let c = cluster("name: c\nhealth_check: { tcp: {} }\nendpoints: [{ address: \"10.0.0.1:80\" }, { address: \"10.0.0.2:80\" }]");
        c.set_flag(1, FAILED_ACTIVE_HC, true);
        let (next, kept) = merge(&c, &[spec("10.0.0.3:80", 1)]);
        assert_eq!(kept, 1);
        let addrs: Vec<String> = next.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.3:80", "10.0.0.1:80"]);
        assert!(Arc::ptr_eq(&next[1], &c.endpoints[0]));

        let next = c.with_endpoints(next).unwrap();
        assert!(Arc::ptr_eq(&next.stats, &c.stats));
        assert_eq!(next.stats.membership_total.load(Relaxed), 2);
        assert_eq!(next.stats.membership_healthy.load(Relaxed), 2);
    }
}
