//! Upstream clusters: their endpoints (host names resolved once, at load), the
//! counters `/stats` and `/clusters` read, the request hash key for `ring_hash`, and,
//! in [`Balancer`], the choice of an endpoint for each upstream attempt.
//!
//! Threading: a [`Cluster`] is built once per config load and shared by every worker
//! through an `Arc`. Everything in it is immutable or an atomic counter, so the
//! request path takes no lock. What a load-balancing policy remembers between picks
//! (round-robin position, random generator) lives in a [`Balancer`], one per worker
//! per cluster, which is `!Sync` and needs no synchronization.
//!
//! Resilience: each endpoint carries atomic health flags ([`health`]: failed active
//! health check, [`outlier`]: ejected). Active checks run on one thread for the whole
//! process and set them; every worker's outcomes feed outlier detection through
//! [`ActiveRequest`]; every worker's balancer reads them lock-free. [`breaker`] holds
//! the per-cluster circuit breakers, also atomics shared by all workers.

pub mod adaptive;
pub mod breaker;
pub mod discovery;
pub mod dns;
mod hash;
pub mod health;
mod lb;
pub mod outlier;
mod priority;
mod zone;

pub use breaker::{ConnectPermit, RetrySlot};
pub use lb::{Balancer, Balancers};

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use http::header::{HeaderMap, HeaderName, COOKIE};
use serde_json::{Map, Value};

use crate::config::{self, LbPolicy, Name};

/// Declares a struct of atomic counters and its `snapshot()`, so a new counter
/// cannot be added without also appearing in `/stats` and `/clusters`.
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[doc = $doc:literal])* $field:ident, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: AtomicU64, )*
        }

        impl $name {
            /// Each value's name and its doc comment, the `# HELP` text of
            /// its series in `/stats`.
            pub const HELP: &'static [(&'static str, &'static str)] =
                &[$( (stringify!($field), concat!($($doc, " ",)*)), )*];

            /// The `# HELP` text of value `name` (empty for an unknown one).
            pub fn help(name: &str) -> &'static str {
                Self::HELP
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or("", |(_, h)| h.trim())
            }

            /// Every value with its name, in declaration order. Names ending in
            /// `_active` are gauges; the others are counters that only grow.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$( (stringify!($field), self.$field.load(Relaxed)), )*]
            }

            /// Adds `v` to counter `name` (a carried count); false for a gauge
            /// or an unknown name.
            pub fn add_to(&self, name: &str, v: u64) -> bool {
                $(
                    if name == stringify!($field) {
                        if is_gauge(name) {
                            return false;
                        }
                        self.$field.fetch_add(v, Relaxed);
                        return true;
                    }
                )*
                false
            }

            /// Fresh values whose counters go on from `old`'s (gauges start
            /// at zero: they describe the new owner), for what replaces the
            /// owner of `old` (a cluster changed by a reload).
            pub fn continuing(old: &Self) -> Self {
                let fresh = Self::default();
                $(
                    if !is_gauge(stringify!($field)) {
                        fresh.$field.store(old.$field.load(Relaxed), Relaxed);
                    }
                )*
                fresh
            }

            fn to_json(&self) -> Value {
                Value::Object(
                    self.snapshot()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), Value::from(v)))
                        .collect(),
                )
            }
        }
    };
}

counters! {
    /// Per-cluster statistics, shared by all workers. Request counters count upstream
    /// attempts (a retried request counts once per attempt), as Envoy's do.
    pub struct ClusterStats {
        /// Upstream attempts started.
        upstream_rq_total,
        /// Upstream attempts in flight (gauge).
        upstream_rq_active,
        /// Responses by status class. An attempt that ends without a response
        /// counts in the class of the status Legate answers for it: a connect
        /// failure, reset or protocol error as a 502, a timeout as a 504 (both
        /// 5xx), as Envoy charges its router's answer.
        upstream_rq_1xx,
        /// 2xx responses.
        upstream_rq_2xx,
        /// 3xx responses.
        upstream_rq_3xx,
        /// 4xx responses.
        upstream_rq_4xx,
        /// 5xx responses, and attempts that failed (connect failure, reset,
        /// protocol error, timeout) before a response.
        upstream_rq_5xx,
        /// Retries sent (attempts after the first).
        upstream_rq_retry,
        /// Attempts that hit the per-try or route timeout.
        upstream_rq_timeout,
        /// Attempts the upstream reset: an HTTP/2 `RST_STREAM` (or a GOAWAY
        /// with an error), or the connection closed, before the response
        /// ended; before its head (also a 5xx) or after it (the body cut), as
        /// Envoy's.
        upstream_rq_rx_reset,
        /// Connection attempts: those that opened and those that failed, so it
        /// is never below `upstream_cx_connect_fail`.
        upstream_cx_total,
        /// Connections open (gauge).
        upstream_cx_active,
        /// Connection attempts that failed or timed out.
        upstream_cx_connect_fail,
        /// Connection attempts that timed out (`connect_timeout`); also in
        /// `upstream_cx_connect_fail`, as Envoy's.
        upstream_cx_connect_timeout,
        /// Attempts waiting for a new connection to open (gauge).
        upstream_rq_pending_active,
        /// Connections over `circuit_breakers.max_connections`: not opened, or
        /// opened anyway as a worker's first to an endpoint.
        upstream_cx_overflow,
        /// Attempts not made because no endpoint was available (every one failing
        /// its health checks or ejected with panic mode off, or none yet): the
        /// 503 `no_healthy_upstream`. Envoy's name.
        upstream_cx_none_healthy,
        /// Attempts refused by `max_requests` or `max_pending_requests`.
        upstream_rq_pending_overflow,
        /// Retries not made because of `max_retries` or the retry budget.
        upstream_rq_retry_overflow,
        /// Requests retried at least once whose last attempt got an answer
        /// the retry policy takes (Envoy's name).
        upstream_rq_retry_success,
        /// Requests whose last attempt the policy would have retried, but
        /// that had made `num_retries` retries already (Envoy's name).
        upstream_rq_retry_limit_exceeded,
        /// Active health checks started.
        health_check_attempt,
        /// Active health checks passed.
        health_check_success,
        /// Active health checks failed (any reason).
        health_check_failure,
        /// Active health checks failed without an answer (connect, reset, timeout).
        health_check_network_failure,
        /// Endpoints ejected now (gauge).
        outlier_detection_ejections_active,
        /// Ejections ever.
        outlier_detection_ejections_total,
        /// Ejections for consecutive 5xx.
        outlier_detection_ejections_consecutive_5xx,
        /// Ejections for consecutive gateway failures.
        outlier_detection_ejections_consecutive_gateway_failure,
        /// Ejections for a low success rate.
        outlier_detection_ejections_success_rate,
        /// Ejections not made because of `max_ejection_percent`.
        outlier_detection_ejections_overflow,
        /// Picks made across all endpoints because too few were available.
        lb_healthy_panic,
        /// Endpoints available for new requests: passing health checks, not ejected
        /// (gauge).
        membership_healthy,
        /// Endpoints (gauge).
        membership_total,
        /// Endpoints that discovery no longer lists but that stay while they pass
        /// their health checks (gauge).
        membership_kept_by_health,
        /// Discovery refreshes (DNS resolutions, endpoint-file reads of new content).
        discovery_update_attempt,
        /// Refreshes that changed the endpoint set.
        discovery_update_success,
        /// Refreshes that found the same endpoints.
        discovery_update_no_rebuild,
        /// Refreshes that failed (no answer, bad file); the endpoints stay as they were.
        discovery_update_failure,
        /// Zone-aware picks that kept to the local zone (all of it available).
        lb_zone_routing_all_directly,
        /// Zone-aware picks that kept to the local zone by a draw (part of it down).
        lb_zone_routing_sampled,
        /// Zone-aware picks sent to other zones.
        lb_zone_routing_cross_zone,
        /// Picks where zones were ignored: fewer endpoints than `min_cluster_size`,
        /// or none in the local zone.
        lb_zone_cluster_too_small,
        /// Attempts refused with 503 by the adaptive concurrency limit.
        adaptive_concurrency_rq_blocked,
        /// The adaptive concurrency limit (gauge).
        adaptive_concurrency_limit,
        /// The last measured minimum round-trip time, in ms (gauge).
        adaptive_concurrency_min_rtt_ms,
        /// Mirrored (shadow) requests sent to this cluster.
        mirror_requests,
        /// Mirrored requests that failed: no endpoint, refused, error, 5xx or timeout.
        mirror_failures,
    }
}

/// Whether a cluster or endpoint statistic is a gauge (it goes up and down) rather
/// than a counter.
pub fn is_gauge(name: &str) -> bool {
    name.ends_with("_active")
        || name.starts_with("membership_")
        || name.starts_with("adaptive_concurrency_") && name != "adaptive_concurrency_rq_blocked"
}

counters! {
    /// Per-endpoint statistics, shared by all workers; `rq_active` also drives
    /// `least_request`.
    pub struct EndpointStats {
        /// Upstream attempts sent here.
        rq_total,
        /// Attempts in flight here (gauge).
        rq_active,
        /// Attempts that ended in a 5xx, a reset or a timeout.
        rq_error,
        /// Connection attempts: those that opened and those that failed.
        cx_total,
        /// Connections open (gauge).
        cx_active,
        /// Connection attempts that failed or timed out.
        cx_connect_fail,
    }
}

impl ClusterStats {
    /// Counts a response in its status class; statuses outside 100–599 count in none.
    pub fn record_status(&self, status: u16) {
        let counter = match status {
            100..=199 => &self.upstream_rq_1xx,
            200..=299 => &self.upstream_rq_2xx,
            300..=399 => &self.upstream_rq_3xx,
            400..=499 => &self.upstream_rq_4xx,
            500..=599 => &self.upstream_rq_5xx,
            _ => return,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// One upstream endpoint of a cluster.
#[derive(Debug)]
pub struct Endpoint {
    /// The address connections go to: resolved once, when the config is loaded.
    pub address: SocketAddr,
    /// The host part as written in the config, without port and without the
    /// brackets of an IPv6 literal: the default TLS SNI / certificate name.
    /// Shared: each attempt takes it without copying (the connection pool keys TLS
    /// connections by it).
    pub host: Arc<str>,
    /// The address as written in the config (`host:port`, `[v6]:port`): the default
    /// Host/`:authority` towards this endpoint, and its identity on the hash ring.
    pub authority: String,
    /// Relative weight (at least 1).
    pub weight: u32,
    /// Priority level: 0 is the highest.
    pub priority: u32,
    /// The zone the endpoint runs in, if known.
    pub zone: Option<String>,
    /// Free-form metadata from the config or the endpoint file.
    pub metadata: Option<Value>,
    /// How the cluster's active health checks reach this endpoint, if the config
    /// says (its own Host and port).
    pub health_check: Option<config::EndpointHealthCheck>,
    /// Counters.
    pub stats: EndpointStats,
    /// Health flags and the last health-check failure.
    pub health: health::EndpointHealth,
    /// Passive outlier-detection state.
    pub outlier: outlier::OutlierState,
}

/// What the config or the endpoint file says about an endpoint besides where it
/// is: changing any of it makes a new endpoint (see [`discovery`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Attributes {
    /// Relative weight (at least 1).
    pub weight: u32,
    /// Priority level: 0 is the highest.
    pub priority: u32,
    /// The zone the endpoint runs in, if known.
    pub zone: Option<String>,
    /// Free-form metadata.
    pub metadata: Option<Value>,
    /// The endpoint's own health-check settings.
    pub health_check: Option<config::EndpointHealthCheck>,
}

impl Default for Attributes {
    /// Weight 1, priority 0, nothing else: an endpoint listed by its address alone.
    fn default() -> Attributes {
        Attributes {
            weight: 1,
            priority: 0,
            zone: None,
            metadata: None,
            health_check: None,
        }
    }
}

impl Attributes {
    /// A configured endpoint's attributes (its weight at least 1).
    pub fn of(ep: &config::EndpointConfig) -> Attributes {
        Attributes {
            weight: ep.weight.max(1),
            priority: ep.priority,
            zone: ep.zone.clone(),
            metadata: ep.metadata.clone(),
            health_check: ep.health_check.clone(),
        }
    }
}

impl Endpoint {
    /// A new endpoint with fresh counters and health.
    pub fn new(
        address: SocketAddr,
        host: Arc<str>,
        authority: String,
        attributes: Attributes,
    ) -> Arc<Endpoint> {
        let Attributes {
            weight,
            priority,
            zone,
            metadata,
            health_check,
        } = attributes;
        Arc::new(Endpoint {
            address,
            host,
            authority,
            weight,
            priority,
            zone,
            metadata,
            health_check,
            stats: EndpointStats::default(),
            health: health::EndpointHealth::default(),
            outlier: outlier::OutlierState::default(),
        })
    }

    /// What the config said about this endpoint.
    pub fn attributes(&self) -> Attributes {
        Attributes {
            weight: self.weight,
            priority: self.priority,
            zone: self.zone.clone(),
            metadata: self.metadata.clone(),
            health_check: self.health_check.clone(),
        }
    }
}

/// An upstream cluster, built once per config load and shared by all workers.
#[derive(Debug)]
pub struct Cluster {
    /// The cluster's name.
    pub name: Name,
    /// The validated config (protocol, TLS, timeouts and pool settings are read by
    /// the upstream connection pool).
    pub config: config::Cluster,
    /// Endpoints, in config (or discovery) order; empty for an `original_dst` cluster.
    /// Fixed for this value: discovery builds a new [`Cluster`] (see [`discovery`]).
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Counters, shared by every generation of the cluster.
    pub stats: Arc<ClusterStats>,
    /// Circuit-breaker reservations not visible as stats, shared like `stats`.
    breakers: Arc<breaker::Breakers>,
    /// `hash_on.header`, parsed once.
    hash_header: Option<HeaderName>,
    /// What the policy precomputes: cumulative weights, the hash ring.
    lb: lb::Shared,
    /// The endpoints by priority level.
    levels: priority::Levels,
    /// This generation's id (see [`Cluster::is_newest`]).
    generation: u64,
    /// When the last upstream TLS failure was logged at WARN, and its reason
    /// ([`Cluster::record_connect_failure`]).
    transport_warned: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

/// At most one WARN per cluster per this long for upstream TLS failures of
/// the same reason (a new reason is logged at once).
const TRANSPORT_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Cluster {
    /// Builds a cluster from its validated config: resolves endpoint host names once
    /// (the error names the cluster, the endpoint and the host) and, for `ring_hash`,
    /// builds the hash ring.
    /// A `dns` cluster starts with no endpoints and a `file` one with the file's (see
    /// [`discovery`]).
    pub fn from_config(cfg: &config::Cluster) -> anyhow::Result<Arc<Cluster>> {
        Self::from_config_counting(cfg, Arc::default())
    }

    /// [`Cluster::from_config`] counting into `stats`: for a cluster a reload
    /// changed, [`ClusterStats::continuing`] its old counters (as Envoy keeps
    /// a cluster's stats by name), so `/stats` never goes back.
    pub fn from_config_counting(
        cfg: &config::Cluster,
        stats: Arc<ClusterStats>,
    ) -> anyhow::Result<Arc<Cluster>> {
        if cfg.discovery.kind != config::DiscoveryType::Static {
            let endpoints = discovery::initial_endpoints(cfg)
                .with_context(|| format!("cluster `{}`", cfg.name))?;
            return Self::assemble(cfg, endpoints, stats, Arc::default());
        }
        Self::build_counting(
            cfg,
            &|host, port| (host, port).to_socket_addrs().map(Iterator::collect),
            stats,
        )
    }

    /// [`Cluster::from_config`] with the name resolver given, so tests need no DNS.
    /// IP literals never reach the resolver.
    #[cfg(test)]
    fn build(
        cfg: &config::Cluster,
        resolve: &dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>>,
    ) -> anyhow::Result<Arc<Cluster>> {
        Self::build_counting(cfg, resolve, Arc::default())
    }

    fn build_counting(
        cfg: &config::Cluster,
        resolve: &dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>>,
        stats: Arc<ClusterStats>,
    ) -> anyhow::Result<Arc<Cluster>> {
        let cluster = &cfg.name;
        let mut endpoints = Vec::with_capacity(cfg.endpoints.len());
        for ep in &cfg.endpoints {
            let ep = &ep.value;
            let (host, port) = config::split_host_port(&ep.address)
                .map_err(|why| anyhow!("cluster `{cluster}`: {why}"))?;
            let host = host.as_str();
            if ep.weight == 0 {
                bail!(
                    "cluster `{cluster}`: endpoint `{}` has weight 0",
                    ep.address
                );
            }
            let address = match host.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, port),
                Err(_) => {
                    // Only a new or changed cluster gets here on a reload (an
                    // unchanged one keeps its addresses), so the fix is in its
                    // config or in name resolution; say both.
                    let why = match resolve(host, port) {
                        Ok(addrs) => preferred_address(&addrs)
                            .ok_or_else(|| "it resolved to no address".to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    why.map_err(|why| {
                        anyhow!(
                            "cluster `{cluster}`: cannot resolve host `{host}` of endpoint `{}` \
                             ({why}); a `static` cluster's host names must resolve when it is \
                             loaded: check the name and the system resolver, write an IP \
                             address, or use `discovery: {{ type: dns }}` to resolve it in the \
                             background (keeping the last addresses while it fails)",
                            ep.address
                        )
                    })?
                }
            };
            endpoints.push(Endpoint::new(
                address,
                host.into(),
                ep.address.clone(),
                Attributes::of(ep),
            ));
        }
        Self::assemble(cfg, endpoints, stats, Arc::default())
    }

    /// A cluster of `endpoints` with the given (possibly inherited) counters and
    /// breaker reservations.
    fn assemble(
        cfg: &config::Cluster,
        endpoints: Vec<Arc<Endpoint>>,
        stats: Arc<ClusterStats>,
        breakers: Arc<breaker::Breakers>,
    ) -> anyhow::Result<Arc<Cluster>> {
        let cluster = &cfg.name;

        let hash_header = match cfg.hash_on.as_ref().and_then(|h| h.header.as_deref()) {
            Some(h) => Some(HeaderName::from_bytes(h.as_bytes()).with_context(|| {
                format!("cluster `{cluster}`: `hash_on.header` `{h}` is not a valid header name")
            })?),
            None => None,
        };

        let generation = health::enter_generation(&endpoints, &breakers.generation);
        stats
            .membership_total
            .store(endpoints.len() as u64, Relaxed);
        let available = endpoints.iter().filter(|e| e.health.is_available()).count();
        stats.membership_healthy.store(available as u64, Relaxed);
        // Recounted, not carried: ejected endpoints discovery dropped or replaced
        // (a reweighted copy starts in) must not hold `max_ejection_percent` slots.
        stats
            .outlier_detection_ejections_active
            .store(outlier::ejected(&endpoints), Relaxed);
        Ok(Arc::new(Cluster {
            name: cfg.name.clone(),
            lb: lb::Shared::new(cfg.lb_policy, &endpoints),
            levels: priority::Levels::new(&endpoints),
            config: cfg.clone(),
            endpoints,
            stats,
            breakers,
            hash_header,
            generation,
            transport_warned: std::sync::Mutex::new(None),
        }))
    }

    /// The next generation of this cluster: the same config, counters and breaker
    /// reservations, with `endpoints` (which keep their own state when they are the
    /// same `Arc`s as before).
    pub fn with_endpoints(&self, endpoints: Vec<Arc<Endpoint>>) -> anyhow::Result<Arc<Cluster>> {
        Self::assemble(
            &self.config,
            endpoints,
            Arc::clone(&self.stats),
            Arc::clone(&self.breakers),
        )
    }

    /// The index of `ep` (the same `Arc`) in this generation.
    pub fn index_of(&self, ep: &Arc<Endpoint>) -> Option<usize> {
        self.endpoints.iter().position(|e| Arc::ptr_eq(e, ep))
    }

    /// A new balancer for one worker.
    pub fn balancer(self: &Arc<Self>) -> Balancer {
        Balancer::new(Arc::clone(self))
    }

    /// The `ring_hash` key of a request: a stable hash of the `hash_on` header's
    /// (first) value, of the `hash_on` cookie's value, or of the client's IP.
    ///
    /// `None` when the policy is not `ring_hash`, or when the header or cookie is
    /// absent or empty (an empty value identifies nobody, so such requests are spread
    /// at random instead of all landing on one endpoint).
    pub fn hash_key(&self, headers: &HeaderMap, client_ip: IpAddr) -> Option<u64> {
        if self.config.lb_policy != LbPolicy::RingHash {
            return None;
        }
        let on = self.config.hash_on.as_ref()?;
        let value = if let Some(name) = &self.hash_header {
            headers.get(name)?.as_bytes()
        } else if let Some(cookie) = &on.cookie {
            find_cookie(headers, cookie.as_bytes())?
        } else if on.source_ip {
            // A v4 client reaching a dual-stack listener appears as ::ffff:a.b.c.d;
            // canonicalizing keeps its key equal to the one it gets over plain v4.
            return Some(match client_ip.to_canonical() {
                IpAddr::V4(ip) => hash::xxh64(&ip.octets()),
                IpAddr::V6(ip) => hash::xxh64(&ip.octets()),
            });
        } else {
            return None;
        };
        (!value.is_empty()).then(|| hash::xxh64(value))
    }

    /// The cookie to make for a request without the `hash_on` cookie, when
    /// `hash_on.cookie_ttl` asks for one (Envoy's `cookie.ttl`): its ring key
    /// and its `Set-Cookie` value. The value is a hash of the client's address
    /// and the downstream connection's, so the requests racing on one
    /// connection get one cookie (as Envoy's); once the client sends it back,
    /// [`Cluster::hash_key`] hashes it to the same key, so it stays on the
    /// endpoint it reached.
    pub fn sticky_cookie(
        &self,
        client_ip: IpAddr,
        peer: SocketAddr,
    ) -> Option<(u64, http::HeaderValue)> {
        if self.config.lb_policy != LbPolicy::RingHash {
            return None;
        }
        let on = self.config.hash_on.as_ref()?;
        let name = on.cookie.as_deref()?;
        let ttl = on.cookie_ttl?.get();
        let value = format!(
            "{:016x}",
            hash::xxh64(format!("{client_ip} {peer}").as_bytes())
        );
        let path = on.cookie_path.as_deref().unwrap_or("/");
        let mut set = format!("{name}={value}; Path={path}");
        if !ttl.is_zero() {
            // A TTL under a second still makes a persistent cookie.
            set.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
        }
        set.push_str("; HttpOnly");
        if on.cookie_secure {
            set.push_str("; Secure");
        }
        if let Some(same_site) = on.cookie_same_site {
            set.push_str("; SameSite=");
            set.push_str(same_site.as_str());
        }
        let set = http::HeaderValue::from_str(&set).ok()?;
        Some((hash::xxh64(value.as_bytes()), set))
    }

    /// Counts the start of an upstream attempt on the cluster and, if given, on
    /// endpoint `endpoint` (an index into [`Cluster::endpoints`]; `None` for an
    /// `original_dst` cluster). The guard counts the attempt as active until dropped.
    pub fn start_request(self: &Arc<Self>, endpoint: Option<usize>) -> ActiveRequest {
        self.stats.upstream_rq_active.fetch_add(1, Relaxed);
        self.counted_request(endpoint)
    }

    /// [`Cluster::start_request`] under the `max_requests` circuit breaker: over it,
    /// the attempt is refused with 503 `overloaded` and `upstream_rq_pending_overflow`
    /// counts it.
    pub fn try_start_request(
        self: &Arc<Self>,
        endpoint: Option<usize>,
    ) -> Result<ActiveRequest, crate::error::ProxyError> {
        let max = u64::from(self.config.circuit_breakers.max_requests);
        if !breaker::reserve(&self.stats.upstream_rq_active, max) {
            self.stats
                .upstream_rq_pending_overflow
                .fetch_add(1, Relaxed);
            return Err(crate::error::ProxyError::new(
                crate::error::Kind::Overloaded,
                format!(
                    "cluster `{}`: circuit_breakers.max_requests ({max}) reached",
                    self.name
                ),
            ));
        }
        let admitted = match &self.config.adaptive_concurrency {
            Some(cfg) => {
                let ac = self
                    .breakers
                    .adaptive
                    .get_or_init(|| adaptive::Controller::new(cfg));
                if !ac.try_acquire() {
                    self.stats.upstream_rq_active.fetch_sub(1, Relaxed);
                    self.stats
                        .adaptive_concurrency_rq_blocked
                        .fetch_add(1, Relaxed);
                    return Err(crate::error::ProxyError::new(
                        crate::error::Kind::Overloaded,
                        format!(
                            "cluster `{}`: adaptive concurrency limit ({}) reached",
                            self.name,
                            ac.limit()
                        ),
                    ));
                }
                Some(std::time::Instant::now())
            }
            None => None,
        };
        let mut active = self.counted_request(endpoint);
        active.admitted = admitted;
        Ok(active)
    }

    /// Counts as active again an attempt whose count was given back for a
    /// retry that was then refused: its answer goes to the client after all,
    /// its body still streaming from the upstream. Not a new attempt (no
    /// `upstream_rq_total`), nor under the breakers: the slot was its own a
    /// moment ago, and the answer is already here.
    pub fn resume_request(self: &Arc<Self>, endpoint: Option<usize>) -> ActiveRequest {
        self.stats.upstream_rq_active.fetch_add(1, Relaxed);
        self.active_request(endpoint, false)
    }

    /// The rest of starting a request, once `upstream_rq_active` counts it.
    fn counted_request(self: &Arc<Self>, endpoint: Option<usize>) -> ActiveRequest {
        self.stats.upstream_rq_total.fetch_add(1, Relaxed);
        self.active_request(endpoint, true)
    }

    /// The guard of an attempt `upstream_rq_active` counts: the endpoint's
    /// `rq_active` counts it too, and its `rq_total` if it is `new`.
    fn active_request(self: &Arc<Self>, endpoint: Option<usize>, new: bool) -> ActiveRequest {
        let endpoint = endpoint.filter(|&i| i < self.endpoints.len());
        if let Some(ep) = endpoint.and_then(|i| self.endpoints.get(i)) {
            if new {
                ep.stats.rq_total.fetch_add(1, Relaxed);
            }
            ep.stats.rq_active.fetch_add(1, Relaxed);
        }
        ActiveRequest {
            cluster: Arc::clone(self),
            endpoint,
            admitted: None,
            head_rtt: std::cell::Cell::new(None),
            charged: std::cell::Cell::new(false),
            reset: std::cell::Cell::new(false),
        }
    }

    /// Counts a new upstream connection on the cluster and, if given, on endpoint
    /// `endpoint`; the guard counts it as open until dropped.
    pub fn start_connection(self: &Arc<Self>, endpoint: Option<usize>) -> ActiveConnection {
        self.stats.upstream_cx_total.fetch_add(1, Relaxed);
        self.stats.upstream_cx_active.fetch_add(1, Relaxed);
        let endpoint = endpoint.filter(|&i| i < self.endpoints.len());
        if let Some(ep) = endpoint.and_then(|i| self.endpoints.get(i)) {
            ep.stats.cx_total.fetch_add(1, Relaxed);
            ep.stats.cx_active.fetch_add(1, Relaxed);
        }
        ActiveConnection {
            cluster: Arc::clone(self),
            endpoint,
            _slot: None,
        }
    }

    /// Counts a failed connection attempt — in `upstream_cx_connect_fail`
    /// (and `upstream_cx_connect_timeout` if it timed out) and, as an attempt,
    /// in `upstream_cx_total` (Envoy counts every attempt there), on the
    /// cluster and the endpoint — and keeps `error` as the endpoint's last
    /// connect failure (`/clusters`). A failure of the TLS handshake (a
    /// certificate that does not verify, a name that does not match) is a
    /// configuration problem no retry fixes: it is logged at WARN, the first
    /// of each reason at once, then at most once per [`TRANSPORT_WARN_EVERY`]
    /// per cluster. Plain connect failures (a refused or timed-out connect:
    /// an endpoint restarting) stay at debug.
    pub fn record_connect_failure(
        &self,
        endpoint: Option<usize>,
        error: &str,
        how: ConnectFailure,
    ) {
        self.stats.upstream_cx_total.fetch_add(1, Relaxed);
        if let Some(ep) = self.endpoint(endpoint) {
            ep.stats.cx_total.fetch_add(1, Relaxed);
        }
        if how == ConnectFailure::TimedOut {
            self.stats.upstream_cx_connect_timeout.fetch_add(1, Relaxed);
        }
        self.record_connect_fail(endpoint, error, how == ConnectFailure::Tls);
    }

    /// A TLS handshake the upstream refused after it completed on Legate's
    /// side (with TLS 1.3 a server checks the client certificate last, so
    /// its alert comes on the first read): as
    /// [`Cluster::record_connect_failure`] for a TLS failure, except that
    /// the connection was counted in `upstream_cx_total` when it opened.
    pub fn record_handshake_refused(&self, endpoint: Option<usize>, error: &str) {
        self.record_connect_fail(endpoint, error, true);
    }

    fn record_connect_fail(&self, endpoint: Option<usize>, error: &str, tls: bool) {
        self.stats.upstream_cx_connect_fail.fetch_add(1, Relaxed);
        if let Some(ep) = self.endpoint(endpoint) {
            ep.stats.cx_connect_fail.fetch_add(1, Relaxed);
            ep.health.set_connect_failure(error);
        }
        if tls && self.transport_warn_due(error) {
            tracing::warn!(cluster = %self.name, "upstream TLS handshake failed: {error}");
        }
    }

    /// Whether a TLS failure with `reason` is to be logged at WARN now (and
    /// if so, notes it).
    fn transport_warn_due(&self, reason: &str) -> bool {
        let now = std::time::Instant::now();
        let mut last = self
            .transport_warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = match &*last {
            Some((at, r)) => r != reason || now.duration_since(*at) >= TRANSPORT_WARN_EVERY,
            None => true,
        };
        if due {
            *last = Some((now, reason.to_string()));
        }
        due
    }

    fn endpoint(&self, index: Option<usize>) -> Option<&Endpoint> {
        index.and_then(|i| self.endpoints.get(i)).map(|e| &**e)
    }

    /// The cluster for the admin `/clusters` page: name, policy, protocol, counters
    /// and each endpoint with its address, weight and counters.
    pub fn to_json(&self) -> Value {
        let endpoints = self
            .endpoints
            .iter()
            .map(|ep| {
                let mut m = Map::new();
                m.insert("address".into(), ep.address.to_string().into());
                m.insert("configured_address".into(), ep.authority.clone().into());
                m.insert("weight".into(), ep.weight.into());
                m.insert("priority".into(), ep.priority.into());
                if let Some(zone) = &ep.zone {
                    m.insert("zone".into(), zone.clone().into());
                }
                if let Some(meta) = &ep.metadata {
                    m.insert("metadata".into(), meta.clone());
                }
                m.insert("health".into(), self.endpoint_health_json(ep));
                m.insert("stats".into(), ep.stats.to_json());
                Value::Object(m)
            })
            .collect::<Vec<_>>();
        let mut m = Map::new();
        m.insert("name".into(), self.name.as_str().into());
        // The config's own serialization, so the names match what the file says.
        m.insert(
            "lb_policy".into(),
            serde_json::to_value(self.config.lb_policy).unwrap_or(Value::Null),
        );
        m.insert(
            "protocol".into(),
            serde_json::to_value(self.config.protocol).unwrap_or(Value::Null),
        );
        m.insert(
            "discovery".into(),
            serde_json::to_value(self.config.discovery.kind).unwrap_or(Value::Null),
        );
        m.insert("tls".into(), self.config.tls.is_some().into());
        m.insert("original_dst".into(), self.config.original_dst.into());
        m.insert(
            "health_check".into(),
            match self.config.health_check.as_ref() {
                Some(h) if h.http.is_some() => "http",
                Some(h) if h.grpc.is_some() => "grpc",
                Some(_) => "tcp",
                None => "none",
            }
            .into(),
        );
        m.insert(
            "outlier_detection".into(),
            self.config.outlier_detection.is_some().into(),
        );
        m.insert(
            "panic_threshold".into(),
            self.config.panic_threshold.to_string().into(),
        );
        m.insert("stats".into(), self.stats.to_json());
        m.insert("endpoints".into(), endpoints.into());
        Value::Object(m)
    }
}

/// The status an attempt that ended without a response (connect failure,
/// reset, protocol error) counts as in the cluster's status classes: the 502
/// Legate answers with. (Envoy answers and counts 503 for a connect failure or
/// reset and 502 for a protocol error; all are `upstream_rq_5xx`.)
pub const FAILURE_STATUS: u16 = 502;

/// The status an attempt cut by the route or per-try timeout counts as in the
/// cluster's status classes: the 504 Legate (and Envoy) answers with.
pub const TIMEOUT_STATUS: u16 = 504;

/// How a connection attempt failed: what it counts in, and how loudly it is
/// logged ([`Cluster::record_connect_failure`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Refused, reset or unreachable before it opened (an endpoint
    /// restarting): logged at debug.
    Failed,
    /// Not opened within `connect_timeout`: also `upstream_cx_connect_timeout`.
    TimedOut,
    /// The TLS handshake failed (a certificate that does not verify, a name
    /// that does not match): a configuration problem, logged at WARN.
    Tls,
}

/// An upstream attempt in flight: counted in `upstream_rq_active` (and the endpoint's
/// `rq_active`) from [`Cluster::start_request`] until dropped — for a response, when
/// its body ends or is dropped. Its outcome is recorded through it, so the cluster
/// and endpoint counters stay consistent.
#[derive(Debug)]
pub struct ActiveRequest {
    cluster: Arc<Cluster>,
    endpoint: Option<usize>,
    /// When the adaptive-concurrency controller admitted the attempt.
    admitted: Option<std::time::Instant>,
    /// Admission to response head: the latency sample, taken at the head (as
    /// documented) though the slot is held until the body ends.
    head_rtt: std::cell::Cell<Option<std::time::Duration>>,
    /// Whether the attempt's outcome is counted already: a response's status
    /// is, and a reset or timeout after it (its body cut) counts no second
    /// time (status class, endpoint error), as Envoy charges no abort once the
    /// response started.
    charged: std::cell::Cell<bool>,
    /// Whether the attempt counted in `upstream_rq_rx_reset` already.
    reset: std::cell::Cell<bool>,
}

impl ActiveRequest {
    /// The cluster.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The endpoint's index, if the attempt went to a configured endpoint.
    pub fn endpoint_index(&self) -> Option<usize> {
        self.endpoint
    }

    /// Starts the adaptive-concurrency latency sample again, now: for an
    /// attempt admitted before the retry backoff it waits out (the wait is no
    /// upstream latency).
    pub fn restart_clock(&mut self) {
        if self.admitted.is_some() {
            self.admitted = Some(std::time::Instant::now());
        }
    }

    /// The attempt was refused before it was made, by the pool's
    /// `max_connections` or `max_pending_requests` breaker: it is no upstream
    /// attempt (docs/metrics.md; Envoy counts `upstream_rq_total` once a stream
    /// has a connection), so neither the cluster's `upstream_rq_total` nor the
    /// endpoint's `rq_total` counts it, as with a `max_requests` refusal.
    pub fn not_made(&self) {
        self.cluster.stats.upstream_rq_total.fetch_sub(1, Relaxed);
        if let Some(ep) = self.cluster.endpoint(self.endpoint) {
            ep.stats.rq_total.fetch_sub(1, Relaxed);
        }
    }

    /// Records the response status: the cluster's status class, and a 5xx as an
    /// endpoint error. Feeds outlier detection.
    pub fn record_status(&self, status: u16) {
        self.head_rtt.set(self.admitted.map(|at| at.elapsed()));
        if self.charge(status) && status >= 500 {
            self.record_error();
        }
        let outcome = match status {
            502..=504 => outlier::Outcome::GatewayError,
            500..=599 => outlier::Outcome::ServerError,
            _ => outlier::Outcome::Success,
        };
        self.record_outlier(outcome);
    }

    /// Records an attempt that ended without a response (connect failure, reset,
    /// protocol error): in the cluster's status classes as [`FAILURE_STATUS`]
    /// and as an endpoint error (neither if its response was counted already).
    /// Feeds outlier detection as a gateway failure.
    pub fn record_failure(&self) {
        if self.charge(FAILURE_STATUS) {
            self.record_error();
        }
        self.record_outlier(outlier::Outcome::LocalFailure);
    }

    /// Records that the upstream reset the attempt (before its head, with
    /// [`ActiveRequest::record_failure`], or after it: its body cut):
    /// `upstream_rq_rx_reset`, once per attempt.
    pub fn record_reset(&self) {
        if !self.reset.replace(true) {
            self.cluster
                .stats
                .upstream_rq_rx_reset
                .fetch_add(1, Relaxed);
        }
    }

    /// Records an attempt that timed out: `upstream_rq_timeout`, and in the
    /// cluster's status classes as [`TIMEOUT_STATUS`] and as an endpoint error
    /// (neither if its response was counted already). Feeds outlier detection
    /// as a gateway failure.
    pub fn record_timeout(&self) {
        self.cluster.stats.upstream_rq_timeout.fetch_add(1, Relaxed);
        if self.charge(TIMEOUT_STATUS) {
            self.record_error();
        }
        self.record_outlier(outlier::Outcome::LocalFailure);
    }

    /// Counts the attempt in `status`'s class, the first time only; whether it did.
    fn charge(&self, status: u16) -> bool {
        let first = !self.charged.replace(true);
        if first {
            self.cluster.stats.record_status(status);
        }
        first
    }

    fn record_outlier(&self, outcome: outlier::Outcome) {
        if let Some(i) = self.endpoint {
            self.cluster.outlier_record(i, outcome);
        }
    }

    fn record_error(&self) {
        if let Some(ep) = self.cluster.endpoint(self.endpoint) {
            ep.stats.rq_error.fetch_add(1, Relaxed);
        }
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        if let (Some(at), Some(ac)) = (self.admitted, self.cluster.breakers.adaptive.get()) {
            ac.release(self.head_rtt.get().unwrap_or_else(|| at.elapsed()));
            let st = &self.cluster.stats;
            st.adaptive_concurrency_limit.store(ac.limit(), Relaxed);
            if let Some(rtt) = ac.min_rtt() {
                st.adaptive_concurrency_min_rtt_ms
                    .store(u64::try_from(rtt.as_millis()).unwrap_or(u64::MAX), Relaxed);
            }
        }
        self.cluster.stats.upstream_rq_active.fetch_sub(1, Relaxed);
        if let Some(ep) = self.cluster.endpoint(self.endpoint) {
            ep.stats.rq_active.fetch_sub(1, Relaxed);
        }
    }
}

/// An open upstream connection: counted in `upstream_cx_active` (and the endpoint's
/// `cx_active`) from [`Cluster::start_connection`] until dropped. The pool keeps it
/// next to the connection so the gauge falls when the connection closes.
#[derive(Debug)]
pub struct ActiveConnection {
    cluster: Arc<Cluster>,
    endpoint: Option<usize>,
    /// The `max_connections` reservation, released with the connection.
    _slot: Option<breaker::Slot>,
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.cluster.stats.upstream_cx_active.fetch_sub(1, Relaxed);
        if let Some(ep) = self.cluster.endpoint(self.endpoint) {
            ep.stats.cx_active.fetch_sub(1, Relaxed);
        }
    }
}

/// The address to use among those a name resolved to: the first IPv4 one, else the
/// first. With one address per endpoint there is no happy-eyeballs fallback, and
/// preferring IPv4 avoids the classic failure of `localhost` resolving to `::1`
/// while the upstream listens on 127.0.0.1 only.
fn preferred_address(addrs: &[SocketAddr]) -> Option<SocketAddr> {
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
}

/// The value of cookie `name` in the request's `Cookie` header(s) (RFC 6265 §4.2:
/// `name=value` pairs separated by `;`, the value optionally in double quotes).
fn find_cookie<'h>(headers: &'h HeaderMap, name: &[u8]) -> Option<&'h [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let (k, v) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
            let v = v.get(1..)?.trim_ascii();
            (k.trim_ascii() == name).then(|| {
                v.strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v)
            })
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Parses a cluster's YAML config; endpoint addresses must be IP literals (no DNS).
    pub(super) fn cluster(yaml: &str) -> Arc<Cluster> {
        let cfg: config::Cluster = serde_saphyr::from_str(yaml).unwrap();
        Cluster::from_config(&cfg).unwrap()
    }

    /// A cluster of endpoints `10.0.0.{1,2,..}:80` with the given weights.
    pub(super) fn weighted(policy: &str, weights: &[u32], extra: &str) -> Arc<Cluster> {
        let endpoints: String = weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!("  - {{ address: \"10.0.0.{}:80\", weight: {w} }}\n", i + 1))
            .collect();
        cluster(&format!(
            "name: c\nlb_policy: {policy}\n{extra}endpoints:\n{endpoints}"
        ))
    }

    fn ring(hash_on: &str) -> Arc<Cluster> {
        weighted("ring_hash", &[1, 1, 1], &format!("hash_on: {hash_on}\n"))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    #[test]
    fn shared_across_workers() {
        fn shared<T: Send + Sync>() {}
        fn movable<T: Send>() {}
        shared::<Cluster>();
        movable::<Balancer>();
        movable::<ActiveRequest>();
    }

    #[test]
    fn resolves_localhost_once() {
        let c = cluster("name: local\nendpoints: [{ address: \"localhost:80\", weight: 2 }]");
        let ep = &c.endpoints[0];
        assert!(ep.address.ip().is_loopback(), "{}", ep.address);
        assert_eq!(ep.address.port(), 80);
        assert_eq!(&*ep.host, "localhost");
        assert_eq!(ep.authority, "localhost:80");
        assert_eq!(ep.weight, 2);
    }

    #[test]
    fn ip_literals_and_ipv6_brackets() {
        let cfg: config::Cluster = serde_saphyr::from_str(
            "name: c\nendpoints: [{ address: \"[::1]:8443\" }, { address: \"10.1.2.3:80\" }]",
        )
        .unwrap();
        let c = Cluster::build(&cfg, &|host, _| {
            panic!("resolver called for the literal `{host}`")
        })
        .unwrap();
        let v6 = &c.endpoints[0];
        assert_eq!(
            v6.address,
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 8443)
        );
        assert_eq!(&*v6.host, "::1");
        assert_eq!(v6.authority, "[::1]:8443");
        assert_eq!(c.endpoints[1].address.to_string(), "10.1.2.3:80");
    }

    #[test]
    fn unresolvable_host_is_a_clear_error() {
        // A stub resolver: a real lookup of an unknown name would query the network.
        let cfg: config::Cluster =
            serde_saphyr::from_str("name: api\nendpoints: [{ address: \"10.0.0.1:80\" }, { address: \"backend.nowhere:8080\" }]").unwrap();
        let err = Cluster::build(&cfg, &|host, _| {
            Err(io::Error::other(format!(
                "failed to lookup address information: {host}: Name or service not known"
            )))
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cluster `api`"), "{msg}");
        assert!(msg.contains("host `backend.nowhere`"), "{msg}");
        assert!(msg.contains("endpoint `backend.nowhere:8080`"), "{msg}");
        assert!(
            format!("{err:#}").contains("Name or service not known"),
            "{err:#}"
        );

        let err = Cluster::build(&cfg, &|_, _| Ok(Vec::new())).unwrap_err();
        assert!(err.to_string().contains("resolved to no address"), "{err}");
    }

    #[test]
    fn prefers_ipv4_among_resolved_addresses() {
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert_eq!(preferred_address(&[v6, v4]), Some(v4));
        assert_eq!(preferred_address(&[v6]), Some(v6));
        assert_eq!(preferred_address(&[]), None);
    }

    #[test]
    fn rejects_an_invalid_hash_header() {
        let cfg: config::Cluster = serde_saphyr::from_str(
            "name: c\nlb_policy: ring_hash\nhash_on: { header: \"x user\" }\nendpoints: [{ address: \"10.0.0.1:80\" }]",
        )
        .unwrap();
        let err = Cluster::from_config(&cfg).unwrap_err().to_string();
        assert!(err.contains("`x user` is not a valid header name"), "{err}");
    }

    #[test]
    fn hash_key_from_header() {
        let c = ring("{ header: X-User }");
        let k = c.hash_key(&headers(&[("x-user", "alice")]), IP).unwrap();
        assert_eq!(k, hash::xxh64(b"alice"));
        assert_eq!(
            c.hash_key(&headers(&[("x-user", "alice"), ("x-user", "bob")]), IP),
            Some(k)
        );
        assert_ne!(c.hash_key(&headers(&[("x-user", "bob")]), IP), Some(k));
        assert_eq!(c.hash_key(&headers(&[("x-other", "alice")]), IP), None);
        assert_eq!(c.hash_key(&headers(&[("x-user", "")]), IP), None);
    }

    #[test]
    fn a_made_sticky_cookie_hashes_as_the_cookie_sent_back() {
        let peer: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let c = ring("{ cookie: sid, cookie_ttl: 90s }");
        let (key, set) = c.sticky_cookie(IP, peer).unwrap();
        let set = set.to_str().unwrap();
        let value = set.strip_prefix("sid=").unwrap().split(';').next().unwrap();
        assert_eq!(set, format!("sid={value}; Path=/; Max-Age=90; HttpOnly"));
        let back = format!("sid={value}");
        assert_eq!(c.hash_key(&headers(&[("cookie", &back)]), IP), Some(key));
        // One connection, one cookie; another connection, another.
        assert_eq!(c.sticky_cookie(IP, peer).unwrap().0, key);
        let other: SocketAddr = "192.0.2.7:40001".parse().unwrap();
        assert_ne!(c.sticky_cookie(IP, other).unwrap().0, key);
        // `0s`: a session cookie (no Max-Age).
        let (_, set) = ring("{ cookie: sid, cookie_ttl: 0s }")
            .sticky_cookie(IP, peer)
            .unwrap();
        assert!(!set.to_str().unwrap().contains("Max-Age"), "{set:?}");
        // Without `cookie_ttl`, none is made.
        assert!(ring("{ cookie: sid }").sticky_cookie(IP, peer).is_none());
        // The attributes asked for.
        let (_, set) = ring(
            "{ cookie: sid, cookie_ttl: 0s, cookie_path: /app, cookie_secure: true, cookie_same_site: none }",
        )
        .sticky_cookie(IP, peer)
        .unwrap();
        let set = set.to_str().unwrap();
        assert!(
            set.ends_with("; Path=/app; HttpOnly; Secure; SameSite=None"),
            "{set}"
        );
        let (_, set) = ring("{ cookie: sid, cookie_ttl: 1h, cookie_same_site: strict }")
            .sticky_cookie(IP, peer)
            .unwrap();
        let set = set.to_str().unwrap();
        assert!(
            set.ends_with("; Max-Age=3600; HttpOnly; SameSite=Strict"),
            "{set}"
        );
    }

    #[test]
    fn hash_key_from_cookie() {
        let c = ring("{ cookie: sid }");
        let want = Some(hash::xxh64(b"s3cr3t"));
        for cookies in [
            &[("cookie", "sid=s3cr3t")][..],
            &[("cookie", "a=1; sid=s3cr3t; b=2")],
            &[("cookie", "sid2=x;sid = s3cr3t")],
            &[("cookie", "a=1"), ("cookie", "sid=s3cr3t; sid=later")],
            &[("cookie", "flag; sid=\"s3cr3t\"")],
        ] {
            assert_eq!(c.hash_key(&headers(cookies), IP), want, "{cookies:?}");
        }
        for cookies in [
            &[("cookie", "sid2=s3cr3t; xsid=1")][..],
            &[("x-sid", "sid=s3cr3t")],
            &[("cookie", "sid=")],
        ] {
            assert_eq!(c.hash_key(&headers(cookies), IP), None, "{cookies:?}");
        }
    }

    #[test]
    fn hash_key_from_client_ip() {
        let c = ring("{ source_ip: true }");
        let k = c.hash_key(&HeaderMap::new(), IP).unwrap();
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(c.hash_key(&HeaderMap::new(), mapped), Some(k));
        let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8));
        assert_ne!(c.hash_key(&HeaderMap::new(), other), Some(k));
        assert!(c
            .hash_key(&HeaderMap::new(), IpAddr::V6(Ipv6Addr::LOCALHOST))
            .is_some());
    }

    #[test]
    fn tls_failures_warn_once_per_reason_then_rate_limited() {
        let c = weighted("round_robin", &[1, 1], "");
        assert!(c.transport_warn_due("invalid peer certificate: NotValidForName"));
        // The same reason again within the interval: not logged again.
        assert!(!c.transport_warn_due("invalid peer certificate: NotValidForName"));
        // A new reason is logged at once.
        assert!(c.transport_warn_due("invalid peer certificate: UnknownIssuer"));
        // The interval passed: logged again.
        if let Some((at, _)) = c.transport_warned.lock().unwrap().as_mut() {
            *at = at.checked_sub(TRANSPORT_WARN_EVERY).unwrap();
        }
        assert!(c.transport_warn_due("invalid peer certificate: UnknownIssuer"));
        // The endpoint keeps its last connect failure for `/clusters`.
        c.record_connect_failure(Some(1), "TLS handshake with x: bad", ConnectFailure::Tls);
        let h = c.endpoint_health_json(&c.endpoints[1]);
        assert_eq!(h["last_connect_failure"], "TLS handshake with x: bad");
    }

    #[test]
    fn no_hash_key_without_ring_hash() {
        let c = weighted("round_robin", &[1, 1], "");
        assert_eq!(c.hash_key(&headers(&[("cookie", "sid=1")]), IP), None);
    }

    #[test]
    fn request_and_connection_guards_keep_counters_consistent() {
        let c = weighted("round_robin", &[1, 1], "");
        let (s, e0, e1) = (&c.stats, &c.endpoints[0].stats, &c.endpoints[1].stats);
        let r0 = c.start_request(Some(0));
        let r1 = c.start_request(Some(1));
        let r2 = c.start_request(Some(1));
        let stray = c.start_request(Some(7));
        assert_eq!(stray.endpoint_index(), None);
        assert_eq!(s.upstream_rq_active.load(Relaxed), 4);
        assert_eq!(
            (e0.rq_active.load(Relaxed), e1.rq_active.load(Relaxed)),
            (1, 2)
        );

        r0.record_status(200);
        r1.record_status(503);
        // A reset after the response head (its body cut) counts no second time.
        r1.record_failure();
        r2.record_timeout();
        stray.record_failure();
        drop((r0, r1, r2, stray));
        assert_eq!(s.upstream_rq_active.load(Relaxed), 0);
        assert_eq!(s.upstream_rq_total.load(Relaxed), 4);
        assert_eq!(
            (
                s.upstream_rq_2xx.load(Relaxed),
                s.upstream_rq_5xx.load(Relaxed)
            ),
            (1, 3),
            "200; 503 (then a late reset); a timeout; a failure"
        );
        assert_eq!(s.upstream_rq_timeout.load(Relaxed), 1);
        assert_eq!(
            (e0.rq_active.load(Relaxed), e1.rq_active.load(Relaxed)),
            (0, 0)
        );
        assert_eq!(
            (e0.rq_total.load(Relaxed), e1.rq_total.load(Relaxed)),
            (1, 2)
        );
        assert_eq!(
            (e0.rq_error.load(Relaxed), e1.rq_error.load(Relaxed)),
            (0, 2)
        );

        let cx = c.start_connection(Some(1));
        c.record_connect_failure(Some(0), "connect refused", ConnectFailure::Failed);
        assert_eq!(
            (
                s.upstream_cx_active.load(Relaxed),
                e1.cx_active.load(Relaxed)
            ),
            (1, 1)
        );
        drop(cx);
        assert_eq!(
            (
                s.upstream_cx_active.load(Relaxed),
                e1.cx_active.load(Relaxed)
            ),
            (0, 0)
        );
        // Both attempts count in `cx_total`, the failed one too.
        assert_eq!(
            (
                s.upstream_cx_total.load(Relaxed),
                e0.cx_total.load(Relaxed),
                e1.cx_total.load(Relaxed)
            ),
            (2, 1, 1)
        );
        assert_eq!(
            (
                s.upstream_cx_connect_fail.load(Relaxed),
                e0.cx_connect_fail.load(Relaxed)
            ),
            (1, 1)
        );
    }

    #[test]
    fn status_classes() {
        let s = ClusterStats::default();
        for status in [101, 204, 304, 404, 429, 500, 599, 600, 99] {
            s.record_status(status);
        }
        let got: Vec<u64> = [
            &s.upstream_rq_1xx,
            &s.upstream_rq_2xx,
            &s.upstream_rq_3xx,
            &s.upstream_rq_4xx,
            &s.upstream_rq_5xx,
        ]
        .iter()
        .map(|c| c.load(Relaxed))
        .collect();
        assert_eq!(got, [1, 1, 1, 2, 2]);
    }

    #[test]
    fn admin_json() {
        let c = cluster("name: web\nlb_policy: least_request\nprotocol: h2\nendpoints: [{ address: \"10.0.0.1:80\", weight: 3 }]");
        let _active = c.start_request(Some(0));
        let j = c.to_json();
        assert_eq!(j["name"], "web");
        assert_eq!(j["lb_policy"], "least_request");
        assert_eq!(j["protocol"], "h2");
        assert_eq!(j["stats"]["upstream_rq_active"], 1);
        let ep = &j["endpoints"][0];
        assert_eq!(ep["address"], "10.0.0.1:80");
        assert_eq!(ep["weight"], 3);
        assert_eq!(ep["stats"]["rq_total"], 1);
        assert_eq!(ep["stats"]["rq_active"], 1);
        assert_eq!(c.stats.snapshot().len(), 48);
        assert_eq!(ep["health"]["status"], "healthy");
    }
}
