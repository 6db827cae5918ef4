//! The compiled route table: from a validated [`config::RouteTable`] to the structure
//! the request path consults to pick a virtual host, a route and its action.
//!
//! One [`RouteTable`] is built per configured table when a config is loaded and then
//! shared read-only by every worker thread (it is `Send + Sync`). Everything that can
//! be prepared ahead is prepared at build time: regexes are compiled once, header
//! names and values are parsed once, weights are turned into cumulative sums, so
//! matching a request allocates nothing except where a value must be transformed
//! (a `Host` with upper-case letters is lower-cased, a percent-encoded query
//! parameter is decoded).
//!
//! # Virtual host selection
//!
//! The request's authority (`Host` for HTTP/1.1, `:authority` for HTTP/2; for an
//! absolute-form request URI the caller passes the URI's authority, RFC 9112 §3.2.2)
//! is compared case-insensitively with each virtual host's `domains`. A port in the
//! authority (`example.com:8080`, `[::1]:8080`) is ignored, unless a pattern itself
//! has a port, in which case that pattern matches only that exact authority
//! including the port. Patterns are tried in this order, as Envoy does:
//!
//! 1. exact names (`api.example.com`, `api.example.com:8443`), by hash lookup;
//! 2. suffix wildcards (`*.example.com`), longest suffix first. The `*` stands for at
//!    least one character and may span labels: `*.example.com` matches
//!    `a.example.com` and `a.b.example.com`, not `example.com`;
//! 3. prefix wildcards (`api.*`), longest prefix first, against the host without
//!    its port;
//! 4. the catch-all `*`.
//!
//! No match means no virtual host: [`RouteTable::route`] returns `None` and the
//! caller answers 404.
//!
//! # Route matching
//!
//! Routes of the virtual host are tried in config order; the first whose every
//! condition holds wins:
//!
//! - path (query string excluded, compared as sent, case-sensitively): `prefix`
//!   (starts with), `path` (equals) or `regex` (matches the *whole* path: the
//!   pattern is anchored at both ends, so `/a/[0-9]+` does not match `/a/1/b`). A
//!   route with none of the three matches every path;
//! - `methods`: the request method is one of them (any method when empty). Methods
//!   are case-sensitive (RFC 9110 §9.1): write `GET`, not `get`;
//! - `headers`: for each condition, `exact` holds when any value of the header
//!   equals the string, `regex` when any value matches it in full, `present: true`
//!   when the header exists and `present: false` when it does not. Each value of a
//!   header sent several times is tried on its own;
//! - `query`: the query string is split on `&`, each `name=value` is
//!   percent-decoded (`+` decodes to a space, as in HTML forms; malformed `%`
//!   escapes are kept literally), and the conditions work as for headers, per
//!   occurrence of the parameter. A parameter without `=` has the empty value.
//!
//! # Actions and rewrites
//!
//! A route forwards to a cluster, splits across weighted clusters
//! ([`WeightedClusters::pick`]), redirects ([`Matched::redirect`]) or answers
//! directly. A forwarding route may rewrite the path ([`Matched::rewritten_path`]):
//! `rewrite.prefix` replaces the matched route prefix (as in Envoy, `prefix: /api`
//! rewritten to `/` turns `/api/x` into `//x`; match `/api/` to get `/x`), and
//! `rewrite.regex` replaces every match of its pattern in the path with its
//! substitution, where `$1` / `${name}` refer to capture groups (write `${1}x` when a
//! group reference is followed by a letter or digit). The query string is kept.
//!
//! # Header operations
//!
//! Request and response header operations run the route's set first, then the
//! virtual host's, so a virtual host's `set` has the last word. Within one set the
//! order is remove, then set (replacing every value), then add (appending).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};

use crate::config::{self, Name};

/// Content type of a direct response whose config gives none.
const DEFAULT_DIRECT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// A compiled route table. Build with [`RouteTable::new`], share behind an `Arc`.
#[derive(Debug)]
pub struct RouteTable {
    name: Name,
    vhosts: Box<[VirtualHost]>,
    domains: DomainIndex,
    /// Whether a virtual host or route has a `cors` policy: only then is a
    /// request with an `origin` matched before the filters ([`crate::cors`]).
    has_cors: bool,
    /// Whether a route answers health checks (`health`): only then is a
    /// `GET` or `HEAD` matched before the filters.
    has_health: bool,
    /// Whether a route has `tracing: false`: only then is a request matched
    /// before the filters for its trace context ([`crate::trace`]).
    has_untraced: bool,
}

/// What the router needs to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    /// Request method.
    pub method: &'a Method,
    /// Request target, origin-form or absolute-form; its path and query are used.
    pub uri: &'a Uri,
    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2), possibly with `:port`. For an
    /// absolute-form target, the target's authority.
    pub authority: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The downstream connection is TLS (the scheme redirects keep by default).
    pub scheme_https: bool,
    /// The downstream connection's verified client certificate, if any.
    pub client_cert: Option<&'a crate::tls::PeerCert>,
    /// The client's address: the connection's peer, or the one trusted
    /// proxies reported (`xff_num_trusted_hops`).
    pub client_ip: std::net::IpAddr,
}

/// The result of routing: the virtual host and the route within it.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'a> {
    /// The selected virtual host.
    pub vhost: &'a VirtualHost,
    /// The first route of `vhost` that matched.
    pub route: &'a Route,
}

/// A compiled virtual host.
#[derive(Debug)]
pub struct VirtualHost {
    /// Config name, for stats.
    pub name: Name,
    routes: Box<[Route]>,
    request_headers: HeaderOps,
    response_headers: HeaderOps,
    cors: Option<Arc<crate::cors::Policy>>,
}

/// Where a route is: its route table, virtual host and name. Together they
/// name it, as Envoy scopes a route's stats by its virtual host
/// (`vhost.<name>.route.<name>`): a route name is unique only within its
/// virtual host, a virtual host's within its table, and every table may have
/// a virtual host `default` with a route `default/0`. The route's series
/// (`legate_route_*`) and access log lines carry all three.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct RouteId {
    /// The route table's name.
    pub table: Arc<str>,
    /// The virtual host's name.
    pub virtual_host: Arc<str>,
    /// The route's name ([`Route::name`]).
    pub name: Arc<str>,
}

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    /// The config name, or `<vhost>/<index>` (0-based) when it has none; used in
    /// stats labels and the access log, with its table's and virtual host's
    /// ([`Route::id`]).
    pub name: Arc<str>,
    /// The route's table, virtual host and name, for stats and the access log.
    pub id: Arc<RouteId>,
    /// What to do with a matching request.
    pub action: Action,
    /// Whole-request timeout, retries included; `None` when configured as `0s`.
    pub timeout: Option<Duration>,
    /// Timeout of each upstream attempt; `None` when absent (or `0s`).
    pub per_try_timeout: Option<Duration>,
    /// Stream idle timeout: `None` = the listener's, `Some(None)` = disabled
    /// here (`0s`).
    pub idle_timeout: Option<Option<Duration>>,
    /// Retry policy; `None` = no retries.
    pub retry: Option<RetryPolicy>,
    /// Largest request body accepted, in bytes; `None` = unlimited.
    pub max_request_body: Option<u64>,
    /// Request mirroring (see [`crate::mirror`]).
    pub mirror: Option<config::Mirror>,
    /// Fault injection (`fault`): delays and aborts for a share of requests.
    pub fault: Option<Box<config::Fault>>,
    /// Whether the listener's `http.compression` applies to its responses.
    pub compression: bool,
    /// Whether its requests are traced under a top-level `tracing`
    /// ([`crate::trace`]).
    pub tracing: bool,
    /// Per-type overrides of the listener's `http.upgrades` (see
    /// [`Route::allows_upgrade`]).
    upgrades: Box<[(Box<str>, bool)]>,
    matcher: RouteMatcher,
    path_rewrite: PathRewrite,
    host_rewrite: Option<HeaderValue>,
    request_headers: HeaderOps,
    response_headers: HeaderOps,
    cors: Option<Arc<crate::cors::Policy>>,
}

/// A route's `health` answer (Envoy's health check filter, not passing
/// through): 200 `OK` while Legate serves and every `min_healthy` cluster has
/// that share of its endpoints healthy; 503 `DRAINING` once it drains or its
/// health checks are failed on purpose (`POST /healthcheck/fail`), as the
/// admin API's `/ready`; 503 `UNHEALTHY` when a cluster is short.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// Cluster names and the least healthy share (percent) of each.
    pub min_healthy: Vec<(Name, f64)>,
}

impl HealthCheck {
    /// The answer now: `draining` (a drain, or failed on purpose), `warming`
    /// (a `dns` cluster waits for its first answer, as `/ready` says), and
    /// each cluster's `(healthy, total)` endpoints as `counts` finds them
    /// (`None` for a cluster the snapshot lacks, which fails it).
    pub fn answer(
        &self,
        draining: bool,
        warming: bool,
        counts: impl Fn(&Name) -> Option<(u64, u64)>,
    ) -> (StatusCode, &'static str) {
        if draining {
            return (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n");
        }
        if warming {
            return (StatusCode::SERVICE_UNAVAILABLE, "WARMING\n");
        }
        let short = self
            .min_healthy
            .iter()
            .any(|(name, min)| match counts(name) {
                // A cluster without endpoints has no healthy share to speak of:
                // short unless nothing is asked of it.
                Some((healthy, total)) => {
                    let share = if total == 0 {
                        0.0
                    } else {
                        healthy as f64 * 100.0 / total as f64
                    };
                    share < *min
                }
                None => true,
            });
        if short {
            (StatusCode::SERVICE_UNAVAILABLE, "UNHEALTHY\n")
        } else {
            (StatusCode::OK, "OK\n")
        }
    }
}

/// What a route does with a request.
#[derive(Debug)]
pub enum Action {
    /// Forward to this cluster.
    Cluster(Name),
    /// Forward to one of several clusters, chosen by weight.
    Weighted(WeightedClusters),
    /// Answer with a redirect (see [`Matched::redirect`]).
    Redirect(Redirect),
    /// Answer a load balancer's health check (see [`HealthCheck`]).
    Health(HealthCheck),
    /// Answer with this status and body.
    Direct {
        /// Response status.
        status: StatusCode,
        /// Response body (may be empty).
        body: Bytes,
        /// `content-type` of the body.
        content_type: HeaderValue,
    },
}

impl Action {
    /// The cluster to forward to, for forwarding actions; `rand` chooses among
    /// weighted clusters (see [`WeightedClusters::pick`]).
    pub fn cluster(&self, rand: u64) -> Option<&Name> {
        match self {
            Action::Cluster(c) => Some(c),
            Action::Weighted(w) => Some(w.pick(rand)),
            Action::Redirect(_) | Action::Direct { .. } | Action::Health(_) => None,
        }
    }
}

/// Clusters with weights, ready for picking in O(log n).
#[derive(Debug)]
pub struct WeightedClusters {
    /// Clusters with a positive weight, in config order.
    clusters: Box<[Name]>,
    /// `cumulative[i]` = sum of the weights of `clusters[..=i]`; strictly increasing.
    cumulative: Box<[u64]>,
}

impl WeightedClusters {
    fn new(list: &[config::WeightedCluster]) -> anyhow::Result<Self> {
        let mut clusters = Vec::with_capacity(list.len());
        let mut cumulative = Vec::with_capacity(list.len());
        let mut total = 0u64;
        for wc in list.iter().filter(|wc| wc.weight > 0) {
            total += u64::from(wc.weight);
            clusters.push(wc.cluster.value.clone());
            cumulative.push(total);
        }
        if total == 0 {
            bail!("weighted_clusters: the weights add up to zero");
        }
        Ok(WeightedClusters {
            clusters: clusters.into(),
            cumulative: cumulative.into(),
        })
    }

    /// Picks a cluster with probability proportional to its weight. `rand` should be
    /// uniformly distributed over the whole `u64` range (e.g. `rand::random()`); it
    /// is scaled onto the total weight by a widening multiply, which unlike `%` has
    /// no bias towards the first clusters.
    pub fn pick(&self, rand: u64) -> &Name {
        let total = self.total_weight();
        // (rand * total) / 2^64 is uniform in 0..total.
        let point = ((u128::from(rand) * u128::from(total)) >> 64) as u64;
        let i = self.cumulative.partition_point(|&c| c <= point);
        // `point < total` = the last cumulative value, so `i` is in range; `min`
        // keeps indexing panic-free regardless.
        &self.clusters[i.min(self.clusters.len() - 1)]
    }

    /// Sum of all weights (never zero).
    pub fn total_weight(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The clusters with a positive weight and their weights, in config order.
    pub fn iter(&self) -> impl Iterator<Item = (&Name, u64)> + '_ {
        let prev = std::iter::once(0).chain(self.cumulative.iter().copied());
        self.clusters
            .iter()
            .zip(self.cumulative.iter().zip(prev))
            .map(|(n, (c, p))| (n, c - p))
    }
}

/// A compiled redirect action.
#[derive(Debug)]
pub struct Redirect {
    /// Response status (301, 302, 303, 307 or 308).
    pub status: StatusCode,
    scheme: Option<&'static str>,
    host: Option<Box<str>>,
    path: RedirectPath,
    strip_query: bool,
}

#[derive(Debug)]
enum RedirectPath {
    /// Keep the request path.
    Keep,
    /// Replace the path; `query` is a query the config gave with it (`/new?x=1`),
    /// which replaces the request's.
    Replace {
        path: Box<str>,
        query: Option<Box<str>>,
    },
    /// Replace the matched route prefix with this.
    PrefixRewrite(Box<str>),
}

/// A compiled retry policy, defaults resolved.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub num_retries: u32,
    /// First backoff; doubled each retry, with full jitter.
    pub backoff_base: Duration,
    /// Backoff ceiling (10 × `backoff_base` unless configured; never below it).
    pub backoff_max: Duration,
    /// Retry non-idempotent methods (POST, PATCH, ...) too.
    pub retry_non_idempotent: bool,
    /// Largest request body kept for replay; a larger body is not retried.
    pub buffer_limit: u64,
    on_5xx: bool,
    on_gateway_error: bool,
    on_connect_failure: bool,
    on_reset: bool,
    on_refused_stream: bool,
    /// The gRPC statuses retried (bit N: status N), from the gRPC conditions.
    grpc_statuses: u32,
    /// Empty unless `retriable-status-codes` is among the conditions.
    retriable_status_codes: Box<[u16]>,
}

impl RetryPolicy {
    fn new(p: &config::RetryPolicy) -> Self {
        use config::RetryOn;
        let on = |c: RetryOn| p.retry_on.contains(&c);
        let backoff_base = p.backoff_base.get();
        let backoff_max = p
            .backoff_max
            .map_or_else(|| backoff_base.saturating_mul(10), |d| d.get())
            .max(backoff_base);
        RetryPolicy {
            num_retries: p.num_retries,
            backoff_base,
            backoff_max,
            retry_non_idempotent: p.retry_non_idempotent,
            buffer_limit: p.buffer_limit.0,
            on_5xx: on(RetryOn::FiveXx),
            on_gateway_error: on(RetryOn::GatewayError),
            on_connect_failure: on(RetryOn::ConnectFailure),
            on_reset: on(RetryOn::Reset),
            on_refused_stream: on(RetryOn::RefusedStream),
            grpc_statuses: p
                .retry_on
                .iter()
                .filter_map(|c| c.grpc_status())
                .fold(0, |bits, code| bits | 1 << code),
            retriable_status_codes: if on(RetryOn::RetriableStatusCodes) {
                p.retriable_status_codes.clone().into()
            } else {
                Box::default()
            },
        }
    }

    /// Whether an upstream response with this status is retried (`5xx`: any 5xx;
    /// `gateway-error`: 502, 503, 504; `retriable-status-codes`: the listed ones).
    pub fn retries_status(&self, status: StatusCode) -> bool {
        (self.on_5xx && status.is_server_error())
            || (self.on_gateway_error && matches!(status.as_u16(), 502..=504))
            || self.retriable_status_codes.contains(&status.as_u16())
    }

    /// Whether a response is retried for the gRPC status in its head (a
    /// trailers-only response: `unavailable`, `cancelled`, ...), whatever the
    /// request's method, as Envoy's gRPC conditions and gRPC's own retry
    /// policy, which leave idempotency to whoever lists them.
    pub fn retries_grpc(&self, head: &http::HeaderMap) -> bool {
        self.grpc_statuses != 0
            && head
                .get("grpc-status")
                .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
                .and_then(|v| v.trim().parse::<u8>().ok())
                .is_some_and(|code| code < 32 && self.grpc_statuses & (1 << code) != 0)
    }

    /// Whether a failure to connect to the upstream is retried (`5xx`,
    /// `gateway-error`, `connect-failure`, and `reset` as in Envoy, whose
    /// `reset` covers an upstream that "does not respond at all"), whatever
    /// the request's method: nothing of it reached the upstream.
    pub fn retries_connect_failure(&self) -> bool {
        self.on_5xx || self.on_gateway_error || self.on_connect_failure || self.on_reset
    }

    /// Whether a reset before the response head is retried (`5xx`,
    /// `gateway-error`, `reset`).
    pub fn retries_reset(&self) -> bool {
        self.on_5xx || self.on_gateway_error || self.on_reset
    }

    /// Whether an error of a request the upstream did not process
    /// ([`crate::error::ProxyError::unprocessed`]) is retried
    /// (`refused-stream`), whatever the request's method.
    pub fn retries_refused_stream(&self) -> bool {
        self.on_refused_stream
    }

    /// Whether the policy can retry a request with this method at all: any
    /// method under `refused-stream` (an unprocessed request), a gRPC
    /// condition, or a condition that retries connect failures (a request
    /// that never left), else as
    /// [`RetryPolicy::allows_method`].
    pub fn applies_to(&self, m: &Method) -> bool {
        self.on_refused_stream
            || self.grpc_statuses != 0
            || self.retries_connect_failure()
            || self.allows_method(m)
    }

    /// Whether requests with this method may be retried: the idempotent methods of
    /// RFC 9110 §9.2.2 always, others only with `retry_non_idempotent` (or, a
    /// request the upstream did not process, under `refused-stream`, or one
    /// that never reached it, a connect failure).
    pub fn allows_method(&self, m: &Method) -> bool {
        self.retry_non_idempotent
            || matches!(
                *m,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            )
    }
}

/// Host patterns of a table, indexed for lookup in the order documented above.
#[derive(Debug, Default)]
struct DomainIndex {
    /// Lower-cased exact names (with a port when the pattern has one) → vhost index.
    exact: HashMap<Box<str>, usize>,
    /// `*.suffix` patterns keyed by `.suffix`, grouped by key length, longest first.
    suffix: Vec<(usize, HashMap<Box<str>, usize>)>,
    /// `prefix.*` patterns keyed by `prefix.`, grouped by key length, longest first.
    prefix: Vec<(usize, HashMap<Box<str>, usize>)>,
    /// The `*` vhost.
    any: Option<usize>,
}

/// `host` (lower-case, split from `port`) without a fully qualified name's
/// one trailing dot (`api.example.com.` names `api.example.com`), joined
/// with `port` again, and the host's length in it; `None` if it has none.
/// Request hosts are looked up so and domain patterns keyed so
/// ([`crate::config::normalize_domain`]).
pub(crate) fn undotted(host: &str, port: Option<&str>) -> Option<(String, usize)> {
    let h = host
        .strip_suffix('.')
        .filter(|h| !h.is_empty() && !h.ends_with('.'))?;
    Some((
        match port {
            Some(p) => format!("{h}:{p}"),
            None => h.to_owned(),
        },
        h.len(),
    ))
}

impl DomainIndex {
    fn build(vhosts: &[config::Spanned<config::VirtualHost>]) -> Self {
        let mut exact = HashMap::new();
        let mut suffix: BTreeMap<usize, HashMap<Box<str>, usize>> = BTreeMap::new();
        let mut prefix: BTreeMap<usize, HashMap<Box<str>, usize>> = BTreeMap::new();
        let mut any = None;
        // Validation rejects a domain in two vhosts; should one slip through, the
        // first vhost in config order keeps it.
        for (i, vh) in vhosts.iter().enumerate() {
            for d in &vh.value.domains {
                // Keyed as the request's host is looked up: lower-cased, one
                // trailing dot dropped (`api.example.com.` is `api.example.com`).
                let d = config::normalize_domain(&d.value);
                if d == "*" {
                    any.get_or_insert(i);
                } else if let Some(rest) = d.strip_prefix('*') {
                    suffix
                        .entry(rest.len())
                        .or_default()
                        .entry(rest.into())
                        .or_insert(i);
                } else if let Some(rest) = d.strip_suffix('*') {
                    prefix
                        .entry(rest.len())
                        .or_default()
                        .entry(rest.into())
                        .or_insert(i);
                } else {
                    exact.entry(d.into_boxed_str()).or_insert(i);
                }
            }
        }
        DomainIndex {
            exact,
            suffix: suffix.into_iter().rev().collect(),
            prefix: prefix.into_iter().rev().collect(),
            any,
        }
    }

    fn lookup(&self, authority: &str) -> Option<usize> {
        let lower = ascii_lowercase(authority);
        let (host, port) = split_port(&lower);
        // A fully qualified name's trailing dot (`admin.example.com.`) names
        // the same host: without stripping it, it would miss that exact
        // virtual host and fall through to a wildcard (nginx strips it too).
        let undotted = undotted(host, port);
        let (host, full): (&str, &str) = match &undotted {
            Some((full, host_len)) => (&full[..*host_len], full),
            None => (host, &lower),
        };
        // Patterns with a port are tried against the full authority, the others
        // against the bare host. A suffix key with a port (`.example.com:8443`) can
        // only equal a suffix of an authority with a port, and a key without one
        // can never equal a `.`-starting suffix of `host:port`, so trying both forms
        // in one map cannot cross-match.
        let with_port = port.is_some().then_some(full);
        let forms = || with_port.into_iter().chain(std::iter::once(host));
        if let Some(&i) = forms().find_map(|f| self.exact.get(f)) {
            return Some(i);
        }
        for (len, map) in &self.suffix {
            let hit = forms().find_map(|f| {
                // The `*` must stand for at least one character.
                if f.len() <= *len {
                    return None;
                }
                f.get(f.len() - len..).and_then(|tail| map.get(tail))
            });
            if let Some(&i) = hit {
                return Some(i);
            }
        }
        for (len, map) in &self.prefix {
            if host.len() > *len {
                if let Some(&i) = host.get(..*len).and_then(|head| map.get(head)) {
                    return Some(i);
                }
            }
        }
        self.any
    }
}

/// Lower-cases ASCII, borrowing when there is nothing to change (the common case:
/// clients send lower-case hosts).
fn ascii_lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// Splits `host:port`, `[v6]:port`, `host`, `[v6]` into the host (brackets kept) and
/// the port, if any (possibly empty: `host:` is allowed by RFC 3986). A bare IPv6
/// address (several colons, no brackets) is returned whole, as it has no port.
pub(crate) fn split_port(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        if let Some(end) = authority.find(']') {
            let (host, rest) = authority.split_at(end + 1);
            if rest.is_empty() {
                return (host, None);
            }
            if let Some(port) = rest.strip_prefix(':') {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    return (host, Some(port));
                }
            }
        }
        return (authority, None);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            (host, Some(port))
        }
        _ => (authority, None),
    }
}

#[derive(Debug)]
struct RouteMatcher {
    path: PathMatch,
    methods: Box<[Method]>,
    headers: Box<[HeaderCondition]>,
    query: Box<[QueryCondition]>,
    client_cert: Option<Box<CertCondition>>,
    source_ips: Box<[config::Cidr]>,
}

/// `match.client_cert`: conditions on the connection's client certificate.
#[derive(Debug)]
struct CertCondition {
    presented: Option<bool>,
    subject: Option<StrTest>,
    uri_san: Option<StrTest>,
    dns_san: Option<StrTest>,
}

impl CertCondition {
    fn new(c: &config::ClientCertMatch) -> anyhow::Result<Self> {
        let test = |t: &Option<config::StringMatch>, key: &str| {
            t.as_ref()
                .map(|t| StrTest::new(t).with_context(|| format!("`client_cert.{key}`")))
                .transpose()
        };
        Ok(CertCondition {
            presented: c.presented,
            subject: test(&c.subject, "subject")?,
            uri_san: test(&c.uri_san, "uri_san")?,
            dns_san: test(&c.dns_san, "dns_san")?,
        })
    }

    fn test(&self, cert: Option<&crate::tls::PeerCert>) -> bool {
        if let Some(want) = self.presented {
            if cert.is_some() != want {
                return false;
            }
        }
        let tests = [&self.subject, &self.uri_san, &self.dns_san];
        if tests.iter().all(|t| t.is_none()) {
            return true;
        }
        // A condition on what a certificate says fails without one.
        let Some(cert) = cert else { return false };
        self.subject
            .as_ref()
            .is_none_or(|t| cert.subject.as_deref().is_some_and(|s| t.test(s)))
            && self
                .uri_san
                .as_ref()
                .is_none_or(|t| cert.uri_sans.iter().any(|s| t.test(s)))
            && self
                .dns_san
                .as_ref()
                .is_none_or(|t| cert.dns_sans.iter().any(|s| t.test(s)))
    }
}

/// A [`config::StringMatch`], compiled (also an upstream certificate's
/// `match_subject_alt_names`, [`crate::tls`]).
#[derive(Debug)]
pub(crate) enum StrTest {
    Exact(Box<str>),
    Prefix(Box<str>),
    /// Anchored.
    Regex(regex::Regex),
}

impl StrTest {
    pub(crate) fn new(m: &config::StringMatch) -> anyhow::Result<Self> {
        match (&m.exact, &m.prefix, &m.regex) {
            (Some(e), None, None) => Ok(StrTest::Exact(e.as_str().into())),
            (None, Some(p), None) => Ok(StrTest::Prefix(p.as_str().into())),
            (None, None, Some(r)) => regex::Regex::new(&anchored(r))
                .map(StrTest::Regex)
                .with_context(|| format!("invalid regex `{r}`")),
            _ => bail!("needs exactly one of `exact`, `prefix` and `regex`"),
        }
    }

    pub(crate) fn test(&self, s: &str) -> bool {
        match self {
            StrTest::Exact(e) => s == &**e,
            StrTest::Prefix(p) => s.starts_with(&**p),
            StrTest::Regex(re) => re.is_match(s),
        }
    }
}

#[derive(Debug)]
enum PathMatch {
    Any,
    Prefix(Box<str>),
    Exact(Box<str>),
    /// Anchored at both ends at build time.
    Regex(regex::Regex),
}

#[derive(Debug)]
struct HeaderCondition {
    name: HeaderName,
    test: ValueTest,
}

#[derive(Debug)]
struct QueryCondition {
    name: Box<str>,
    test: ValueTest,
}

#[derive(Debug)]
enum ValueTest {
    Exact(Box<[u8]>),
    /// Anchored; on bytes because header values and decoded query values need not
    /// be UTF-8.
    Regex(regex::bytes::Regex),
    Present(bool),
}

impl ValueTest {
    fn new(vm: &config::ValueMatch) -> anyhow::Result<Self> {
        match (&vm.exact, &vm.regex, vm.present) {
            (Some(e), None, None) => Ok(ValueTest::Exact(e.as_bytes().into())),
            (None, Some(r), None) => regex::bytes::Regex::new(&anchored(r))
                .map(ValueTest::Regex)
                .with_context(|| format!("invalid regex `{r}` for `{}`", vm.name)),
            (None, None, Some(p)) => Ok(ValueTest::Present(p)),
            _ => bail!(
                "condition on `{}` needs exactly one of `exact`, `regex`, `present`",
                vm.name
            ),
        }
    }

    /// Whether the values (each occurrence of the header or parameter) pass.
    fn test<V: AsRef<[u8]>>(&self, mut values: impl Iterator<Item = V>) -> bool {
        match self {
            ValueTest::Exact(e) => values.any(|v| v.as_ref() == &e[..]),
            ValueTest::Regex(re) => values.any(|v| re.is_match(v.as_ref())),
            ValueTest::Present(want) => values.next().is_some() == *want,
        }
    }
}

/// Wraps a pattern so it must match the whole input. `\A`/`\z` rather than `^`/`$`
/// so a `(?m)` flag inside the pattern cannot turn them into line anchors.
/// Config validation compiles the same form.
pub(crate) fn anchored(pattern: &str) -> String {
    format!(r"\A(?:{pattern})\z")
}

impl RouteMatcher {
    fn new(m: &config::RouteMatch) -> anyhow::Result<Self> {
        let path = match (&m.prefix, &m.path, &m.regex) {
            (None, None, None) => PathMatch::Any,
            (Some(p), None, None) => PathMatch::Prefix(p.as_str().into()),
            (None, Some(p), None) => PathMatch::Exact(p.as_str().into()),
            (None, None, Some(r)) => regex::Regex::new(&anchored(&r.value))
                .map(PathMatch::Regex)
                .with_context(|| format!("invalid path regex `{}`", r.value))?,
            _ => bail!("a route match may use only one of `prefix`, `path` and `regex`"),
        };
        let methods = m
            .methods
            .iter()
            .map(|s| {
                Method::from_bytes(s.as_bytes()).map_err(|_| anyhow!("`{s}` is not an HTTP method"))
            })
            .collect::<anyhow::Result<_>>()?;
        let headers = m
            .headers
            .iter()
            .map(|h| {
                let h = &h.value;
                Ok(HeaderCondition {
                    name: HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| anyhow!("`{}` is not a valid header name", h.name))?,
                    test: ValueTest::new(h)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let query = m
            .query
            .iter()
            .map(|q| {
                let q = &q.value;
                Ok(QueryCondition {
                    name: q.name.as_str().into(),
                    test: ValueTest::new(q)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let client_cert = m
            .client_cert
            .as_ref()
            .map(|c| CertCondition::new(c).map(Box::new))
            .transpose()?;
        Ok(RouteMatcher {
            path,
            methods,
            headers,
            query,
            client_cert,
            source_ips: m.source_ips.clone().into(),
        })
    }

    fn matches(&self, input: &RouteInput<'_>) -> bool {
        let path = input.uri.path();
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Prefix(p) => path.starts_with(&**p),
            PathMatch::Exact(p) => path == &**p,
            PathMatch::Regex(re) => re.is_match(path),
        };
        if !path_ok {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.contains(input.method) {
            return false;
        }
        for c in self.headers.iter() {
            let ok = if c.name == http::header::HOST {
                // The authority the virtual host was chosen by (HTTP/2's
                // `:authority`, an absolute-form target's), as Envoy keeps
                // `host` as `:authority` for both protocols: one matcher
                // routes both.
                c.test.test(std::iter::once(input.authority.as_bytes()))
            } else {
                c.test.test(input.headers.get_all(&c.name).iter())
            };
            if !ok {
                return false;
            }
        }
        if !self.query.is_empty() {
            let query = input.uri.query().unwrap_or("");
            for c in self.query.iter() {
                let values = query_values(query, c.name.as_bytes());
                if !c.test.test(values) {
                    return false;
                }
            }
        }
        if !self.source_ips.is_empty()
            && !self.source_ips.iter().any(|c| c.contains(input.client_ip))
        {
            return false;
        }
        self.client_cert
            .as_ref()
            .is_none_or(|c| c.test(input.client_cert))
    }
}

/// The decoded values of every occurrence of parameter `name` in a query string.
fn query_values<'q>(query: &'q str, name: &'q [u8]) -> impl Iterator<Item = Cow<'q, [u8]>> + 'q {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(move |pair| {
            let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
            (*percent_decode(n) == *name).then(|| percent_decode(v))
        })
}

/// Decodes `%XX` escapes and `+` (a space in `application/x-www-form-urlencoded`,
/// which is what query strings carry in practice). A `%` not followed by two hex
/// digits is kept as is, like browsers and Envoy do. Borrows when nothing changes.
fn percent_decode(s: &str) -> Cow<'_, [u8]> {
    percent_decode_with(s, true)
}

/// [`percent_decode`], with `+` decoded as a space only if `plus_is_space` (form
/// encoding; not in e.g. gRPC's `grpc-message`).
pub(crate) fn percent_decode_with(s: &str, plus_is_space: bool) -> Cow<'_, [u8]> {
    let b = s.as_bytes();
    if !b.iter().any(|&c| c == b'%' || (plus_is_space && c == b'+')) {
        return Cow::Borrowed(b);
    }
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                if let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(out)
}

#[derive(Debug)]
enum PathRewrite {
    None,
    /// Replace the route's match prefix `matched` with `replacement`.
    Prefix {
        matched: Box<str>,
        replacement: Box<str>,
    },
    Regex {
        pattern: regex::Regex,
        substitution: Box<str>,
    },
}

/// Header operations with names and values parsed.
#[derive(Debug, Default)]
struct HeaderOps {
    remove: Box<[HeaderName]>,
    set: Box<[(HeaderName, OpValue)]>,
    add: Box<[(HeaderName, OpValue)]>,
    /// A value has operators: the request's facts are needed to apply them.
    dynamic: bool,
}

/// A header operation's value.
#[derive(Debug)]
enum OpValue {
    Static(HeaderValue),
    /// Request headers only: operators rendered per request.
    Dynamic(Box<crate::access_log::format::HeaderTemplate>),
}

/// The request facts header operators read ([`Matched::apply_request_headers`]).
pub use crate::access_log::format::RequestFacts;

impl HeaderOps {
    /// `request`: values may have operators (`%...%`); response values are
    /// literal.
    fn new(ops: &config::HeaderOps, request: bool) -> anyhow::Result<Self> {
        use crate::access_log::format::{header_value, HeaderValueSpec};
        let name = |k: &str| {
            HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| anyhow!("`{k}` is not a valid header name"))
        };
        let literal = |k: &str, v: &str| {
            HeaderValue::from_str(v)
                .map(OpValue::Static)
                .map_err(|_| anyhow!("value of `{k}` is not a valid header value"))
        };
        let pairs = |m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| {
                    let value = if request {
                        match header_value(v).map_err(|(msg, _)| anyhow!("`{k}`: {msg}"))? {
                            HeaderValueSpec::Literal(l) => literal(k, &l)?,
                            HeaderValueSpec::Template(t) => OpValue::Dynamic(Box::new(t)),
                        }
                    } else {
                        literal(k, v)?
                    };
                    Ok((name(k)?, value))
                })
                .collect::<anyhow::Result<Box<[_]>>>()
        };
        let set = pairs(&ops.set.value)?;
        let add = pairs(&ops.add.value)?;
        let dynamic = set
            .iter()
            .chain(add.iter())
            .any(|(_, v)| matches!(v, OpValue::Dynamic(_)));
        Ok(HeaderOps {
            remove: ops
                .remove
                .value
                .iter()
                .map(|k| name(k))
                .collect::<anyhow::Result<_>>()?,
            set,
            add,
            dynamic,
        })
    }

    /// Applies the operations; a value with operators needs `facts` (without
    /// them, or when it comes out empty, it adds nothing).
    fn apply(&self, h: &mut HeaderMap, facts: Option<&RequestFacts<'_>>) {
        for n in self.remove.iter() {
            h.remove(n);
        }
        let value = |v: &OpValue, h: &HeaderMap| match v {
            OpValue::Static(v) => Some(v.clone()),
            OpValue::Dynamic(t) => facts.and_then(|f| t.render(f, h)),
        };
        // `try_*` fail only past 32768 entries, far beyond any listener's header
        // limit; ignoring the failure beats panicking a worker.
        for (n, v) in self.set.iter() {
            match value(v, h) {
                Some(v) => {
                    let _ = h.try_insert(n, v);
                }
                // Envoy's: an empty value adds nothing; `set` still replaces.
                None => {
                    h.remove(n);
                }
            }
        }
        for (n, v) in self.add.iter() {
            if let Some(v) = value(v, h) {
                let _ = h.try_append(n, v);
            }
        }
    }
}

impl RouteTable {
    /// Compiles a validated route table. Errors (which validation should already
    /// have reported) name the virtual host and route at fault.
    pub fn new(cfg: &config::RouteTable) -> anyhow::Result<Self> {
        let vhosts = cfg
            .virtual_hosts
            .iter()
            .map(|vh| {
                VirtualHost::new(&cfg.name, &vh.value).with_context(|| {
                    format!(
                        "route table `{}`, virtual host `{}`",
                        cfg.name, vh.value.name
                    )
                })
            })
            .collect::<anyhow::Result<Box<[VirtualHost]>>>()?;
        let has_cors = vhosts
            .iter()
            .any(|v| v.cors.is_some() || v.routes.iter().any(|r| r.cors.is_some()));
        let has_health = vhosts.iter().any(|v| {
            v.routes
                .iter()
                .any(|r| matches!(r.action, Action::Health(_)))
        });
        let has_untraced = vhosts.iter().any(|v| v.routes.iter().any(|r| !r.tracing));
        Ok(RouteTable {
            name: cfg.name.clone(),
            vhosts,
            domains: DomainIndex::build(&cfg.virtual_hosts),
            has_cors,
            has_health,
            has_untraced,
        })
    }

    /// Whether any route here has a CORS policy.
    pub fn has_cors(&self) -> bool {
        self.has_cors
    }

    /// Whether a route here answers health checks (`health`).
    pub fn has_health(&self) -> bool {
        self.has_health
    }

    /// Whether any route here has `tracing: false`.
    pub fn has_untraced(&self) -> bool {
        self.has_untraced
    }

    /// The table's config name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// The virtual hosts, in config order.
    pub fn virtual_hosts(&self) -> &[VirtualHost] {
        &self.vhosts
    }

    /// The virtual host serving `authority` (see the module doc for the order).
    pub fn virtual_host(&self, authority: &str) -> Option<&VirtualHost> {
        self.domains
            .lookup(authority)
            .and_then(|i| self.vhosts.get(i))
    }

    /// Virtual host by host/:authority, then first matching route.
    pub fn route<'a>(&'a self, input: &RouteInput<'_>) -> Option<Matched<'a>> {
        let vhost = self.virtual_host(input.authority)?;
        let route = vhost.find_route(input)?;
        Some(Matched { vhost, route })
    }
}

impl VirtualHost {
    fn new(table: &Name, cfg: &config::VirtualHost) -> anyhow::Result<Self> {
        let (table, virtual_host): (Arc<str>, Arc<str>) =
            (table.as_str().into(), cfg.name.as_str().into());
        let routes = cfg
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let name: Arc<str> = match &r.value.name {
                    Some(n) => n.as_str().into(),
                    None => format!("{}/{i}", cfg.name).into(),
                };
                let id = Arc::new(RouteId {
                    table: table.clone(),
                    virtual_host: virtual_host.clone(),
                    name: name.clone(),
                });
                Route::new(&r.value, id).with_context(|| format!("route `{name}`"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(VirtualHost {
            name: cfg.name.clone(),
            routes,
            request_headers: HeaderOps::new(&cfg.request_headers, true)
                .context("request_headers")?,
            response_headers: HeaderOps::new(&cfg.response_headers, false)
                .context("response_headers")?,
            cors: cfg
                .cors
                .as_ref()
                .map(crate::cors::Policy::new)
                .transpose()
                .context("cors")?,
        })
    }

    /// The routes, in config order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The first route matching the request.
    pub fn find_route(&self, input: &RouteInput<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(input))
    }
}

impl Route {
    fn new(cfg: &config::Route, id: Arc<RouteId>) -> anyhow::Result<Self> {
        let name = id.name.clone();
        let matcher = RouteMatcher::new(&cfg.matcher)?;
        let action = match (
            &cfg.cluster,
            &cfg.weighted_clusters,
            &cfg.redirect,
            &cfg.direct_response,
            &cfg.health,
        ) {
            (Some(c), None, None, None, None) => Action::Cluster(c.value.clone()),
            (None, Some(w), None, None, None) => Action::Weighted(WeightedClusters::new(&w.value)?),
            (None, None, Some(r), None, None) => {
                Action::Redirect(compile_redirect(r, &cfg.matcher)?)
            }
            (None, None, None, None, Some(h)) => Action::Health(HealthCheck {
                min_healthy: h
                    .min_healthy
                    .iter()
                    .map(|m| (m.cluster.value.clone(), m.percent.0))
                    .collect(),
            }),
            (None, None, None, Some(d), None) => Action::Direct {
                status: StatusCode::from_u16(d.status.value)
                    .map_err(|_| anyhow!("invalid status {}", d.status.value))?,
                body: Bytes::from(d.body.clone().unwrap_or_default()),
                content_type: HeaderValue::from_str(
                    d.content_type
                        .as_deref()
                        .unwrap_or(DEFAULT_DIRECT_CONTENT_TYPE),
                )
                .context("invalid content_type")?,
            },
            _ => bail!("a route needs exactly one action"),
        };
        let (path_rewrite, host_rewrite) = match &cfg.rewrite {
            None => (PathRewrite::None, None),
            Some(rw) => {
                let path = match (&rw.prefix, &rw.regex) {
                    (None, None) => PathRewrite::None,
                    (Some(p), None) => PathRewrite::Prefix {
                        matched: cfg
                            .matcher
                            .prefix
                            .as_deref()
                            .ok_or_else(|| {
                                anyhow!("`rewrite.prefix` needs a route matched by `prefix`")
                            })?
                            .into(),
                        replacement: p.as_str().into(),
                    },
                    (None, Some(rr)) => PathRewrite::Regex {
                        pattern: regex::Regex::new(&rr.pattern.value).with_context(|| {
                            format!("invalid rewrite regex `{}`", rr.pattern.value)
                        })?,
                        substitution: rr.substitution.as_str().into(),
                    },
                    (Some(_), Some(_)) => bail!("`rewrite` has both `prefix` and `regex`"),
                };
                let host = rw
                    .host
                    .as_deref()
                    .map(|h| {
                        HeaderValue::from_str(h)
                            .with_context(|| format!("invalid rewrite host `{h}`"))
                    })
                    .transpose()?;
                (path, host)
            }
        };
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Ok(Route {
            name,
            id,
            action,
            timeout: nonzero(cfg.timeout.get()),
            per_try_timeout: cfg.per_try_timeout.and_then(|d| nonzero(d.get())),
            idle_timeout: cfg.idle_timeout.map(|d| nonzero(d.get())),
            retry: cfg.retry.as_ref().map(RetryPolicy::new),
            max_request_body: cfg.max_request_body.map(|b| b.0),
            mirror: cfg.mirror.clone(),
            fault: cfg.fault.clone().map(Box::new),
            compression: cfg.compression,
            tracing: cfg.tracing,
            upgrades: cfg
                .upgrades
                .iter()
                .map(|(t, on)| (t.as_str().into(), *on))
                .collect(),
            matcher,
            path_rewrite,
            host_rewrite,
            request_headers: HeaderOps::new(&cfg.request_headers, true)
                .context("request_headers")?,
            response_headers: HeaderOps::new(&cfg.response_headers, false)
                .context("response_headers")?,
            cors: cfg
                .cors
                .as_ref()
                .map(crate::cors::Policy::new)
                .transpose()
                .context("cors")?,
        })
    }

    /// Whether every condition of the route's match holds for the request.
    pub fn matches(&self, input: &RouteInput<'_>) -> bool {
        self.matcher.matches(input)
    }

    /// Whether an `Upgrade: upgrade` request is tunnelled on this route: the
    /// route's override for the type if it has one, else whether the listener's
    /// `http.upgrades` lists it. Types compare case-insensitively (as Envoy's
    /// HCM and route `upgrade_configs`).
    pub fn allows_upgrade(&self, upgrade: &str, listener: &[String]) -> bool {
        match self
            .upgrades
            .iter()
            .find(|(t, _)| t.eq_ignore_ascii_case(upgrade))
        {
            Some((_, on)) => *on,
            None => listener_allows_upgrade(listener, upgrade),
        }
    }
}

/// Whether a listener's `http.upgrades` lists `upgrade` (case-insensitively):
/// what decides where no route says otherwise.
pub fn listener_allows_upgrade(listener: &[String], upgrade: &str) -> bool {
    listener.iter().any(|t| t.eq_ignore_ascii_case(upgrade))
}

fn compile_redirect(r: &config::Redirect, m: &config::RouteMatch) -> anyhow::Result<Redirect> {
    let status = match r.code.value {
        301 => StatusCode::MOVED_PERMANENTLY,
        302 => StatusCode::FOUND,
        303 => StatusCode::SEE_OTHER,
        307 => StatusCode::TEMPORARY_REDIRECT,
        308 => StatusCode::PERMANENT_REDIRECT,
        c => bail!("redirect code {c} is not a redirect"),
    };
    let scheme = match r.scheme.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => None,
        Some("http") => Some("http"),
        Some("https") => Some("https"),
        Some(s) => bail!("redirect scheme `{s}` is not http or https"),
    };
    let path = match (&r.path, &r.prefix_rewrite) {
        (None, None) => RedirectPath::Keep,
        (Some(p), None) => match p.split_once('?') {
            Some((path, query)) => RedirectPath::Replace {
                path: path.into(),
                query: Some(query.into()),
            },
            None => RedirectPath::Replace {
                path: p.as_str().into(),
                query: None,
            },
        },
        (None, Some(p)) => {
            if m.prefix.is_none() {
                bail!("redirect `prefix_rewrite` needs a route matched by `prefix`");
            }
            RedirectPath::PrefixRewrite(p.as_str().into())
        }
        (Some(_), Some(_)) => bail!("redirect has both `path` and `prefix_rewrite`"),
    };
    Ok(Redirect {
        status,
        scheme,
        host: r.host.as_deref().map(Into::into),
        path,
        strip_query: r.strip_query,
    })
}

impl Matched<'_> {
    /// The CORS policy in force: the route's, else its virtual host's.
    pub fn cors(&self) -> Option<&Arc<crate::cors::Policy>> {
        self.route.cors.as_ref().or(self.vhost.cors.as_ref())
    }

    /// New path-and-query to send upstream if the route rewrites the path (prefix or
    /// regex rewrite; the query is preserved); `None` = forward the path as is. A
    /// rewritten path always starts with `/` (one is put in front if the rewrite
    /// left none, and an empty one becomes `/`), so the result is never read as
    /// an authority or an absolute URI: `prefix: ''` on `/apievil.example` must
    /// not send the request to host `evil.example`. The caller parses the result into a URI
    /// (a substitution can produce characters a URI may not hold: answer 500 then).
    pub fn rewritten_path(&self, uri: &Uri) -> Option<String> {
        let path = uri.path();
        let new_path: Cow<'_, str> = match &self.route.path_rewrite {
            PathRewrite::None => return None,
            PathRewrite::Prefix {
                matched,
                replacement,
            } => {
                let rest = path.strip_prefix(&**matched)?;
                let mut s = String::with_capacity(replacement.len() + rest.len());
                s.push_str(replacement);
                s.push_str(rest);
                Cow::Owned(s)
            }
            PathRewrite::Regex {
                pattern,
                substitution,
            } => pattern.replace_all(path, &**substitution),
        };
        let slash = if new_path.starts_with('/') { "" } else { "/" };
        Some(match uri.query() {
            Some(q) => format!("{slash}{new_path}?{q}"),
            None => format!("{slash}{new_path}"),
        })
    }

    /// Host/:authority to send upstream if the route rewrites it.
    pub fn rewritten_host(&self) -> Option<&HeaderValue> {
        self.route.host_rewrite.as_ref()
    }

    /// For [`Action::Redirect`]: the status and `Location`.
    ///
    /// The location is an absolute URL: the scheme from the config, else the
    /// request's; the host from the config, else the request authority (when the
    /// config changes the scheme and not the host, a port that is the default of the
    /// old or new scheme is dropped: `http://a:80/` → `https://a/`); the path from
    /// `path`, else the request path with the matched prefix replaced by
    /// `prefix_rewrite`, else the request path. The request query is kept unless
    /// `strip_query`; a query written in `path` (`/new?x=1`) replaces it.
    ///
    /// Without any authority (an HTTP/1.0 request with no `Host` and no host in the
    /// config) the location is relative (path and query only), which RFC 9110
    /// §10.2.2 allows. `None` when the route is not a redirect, or when the request
    /// authority holds bytes a header value cannot (the caller answers 400).
    pub fn redirect(&self, input: &RouteInput<'_>) -> Option<(StatusCode, HeaderValue)> {
        let Action::Redirect(r) = &self.route.action else {
            return None;
        };
        let req_path = match input.uri.path() {
            "" => "/",
            p => p,
        };
        let (path, cfg_query): (Cow<'_, str>, Option<&str>) = match &r.path {
            RedirectPath::Keep => (Cow::Borrowed(req_path), None),
            RedirectPath::Replace { path, query } => (Cow::Borrowed(&**path), query.as_deref()),
            RedirectPath::PrefixRewrite(new_prefix) => {
                let rest = match &self.route.matcher.path {
                    PathMatch::Prefix(p) => req_path.strip_prefix(&**p),
                    _ => None,
                };
                let path = match rest {
                    Some(rest) => Cow::Owned(format!("{new_prefix}{rest}")),
                    None => Cow::Borrowed(req_path),
                };
                (path, None)
            }
        };
        let query = match cfg_query {
            Some(q) => Some(q),
            None if r.strip_query => None,
            None => input.uri.query(),
        };

        let req_scheme = if input.scheme_https { "https" } else { "http" };
        let scheme = r.scheme.unwrap_or(req_scheme);
        let host: &str = match &r.host {
            Some(h) => h,
            None if scheme != req_scheme => match split_port(input.authority) {
                (h, Some(p))
                    if p.is_empty()
                        || p == default_port(req_scheme)
                        || p == default_port(scheme) =>
                {
                    h
                }
                _ => input.authority,
            },
            None => input.authority,
        };

        let mut loc = String::with_capacity(
            scheme.len() + 3 + host.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        if !host.is_empty() {
            loc.push_str(scheme);
            loc.push_str("://");
            loc.push_str(host);
        }
        if !path.starts_with('/') {
            loc.push('/');
        }
        loc.push_str(&path);
        if let Some(q) = query {
            loc.push('?');
            loc.push_str(q);
        }
        let value = HeaderValue::from_maybe_shared(Bytes::from(loc)).ok()?;
        Some((r.status, value))
    }

    /// Request header operations: the route's, then the virtual host's; within one
    /// set remove, set, add.
    pub fn apply_request_headers(&self, h: &mut HeaderMap, facts: Option<&RequestFacts<'_>>) {
        self.route.request_headers.apply(h, facts);
        self.vhost.request_headers.apply(h, facts);
    }

    /// Whether the request header operations have operators to render (then
    /// [`Matched::apply_request_headers`] needs the request's facts).
    pub fn request_headers_need_facts(&self) -> bool {
        self.route.request_headers.dynamic || self.vhost.request_headers.dynamic
    }

    /// Response header operations: the route's, then the virtual host's.
    pub fn apply_response_headers(&self, h: &mut HeaderMap) {
        self.route.response_headers.apply(h, None);
        self.vhost.response_headers.apply(h, None);
    }
}

fn default_port(scheme: &str) -> &'static str {
    if scheme == "https" {
        "443"
    } else {
        "80"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn a_health_answer_says_draining_then_short_clusters() {
        let h = HealthCheck {
            min_healthy: vec![(Name::new("a").unwrap(), 50.0)],
        };
        let counts = |healthy, total| move |_: &Name| Some((healthy, total));
        assert_eq!(
            h.answer(false, false, counts(1, 2)),
            (StatusCode::OK, "OK\n")
        );
        assert_eq!(
            h.answer(false, false, counts(1, 3)).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // No endpoints: no healthy share.
        assert_eq!(h.answer(false, false, counts(0, 0)).1, "UNHEALTHY\n");
        assert_eq!(h.answer(false, false, |_: &Name| None).1, "UNHEALTHY\n");
        assert_eq!(h.answer(true, false, counts(2, 2)).1, "DRAINING\n");
        assert_eq!(h.answer(false, true, counts(2, 2)).1, "WARMING\n");
        let none = HealthCheck {
            min_healthy: Vec::new(),
        };
        assert_eq!(none.answer(false, false, |_: &Name| None).0, StatusCode::OK);
    }

    use super::*;

    /// Compiles the first route table of a config; clusters `a`, `b`, `c` exist.
    fn table(routes_yaml: &str) -> RouteTable {
        let src = format!(
            "version: 1\n\
             clusters:\n\
             - {{ name: a, endpoints: [{{ address: '127.0.0.1:1' }}] }}\n\
             - {{ name: b, endpoints: [{{ address: '127.0.0.1:2' }}] }}\n\
             - {{ name: c, endpoints: [{{ address: '127.0.0.1:3' }}] }}\n\
             routes:\n\
             - name: t\n\
             \x20 virtual_hosts:\n{routes_yaml}"
        );
        let cfg = config::parse_str("test.yaml", &src, std::path::Path::new("."))
            .unwrap_or_else(|e| panic!("{e}\n---\n{src}"));
        RouteTable::new(&cfg.routes[0].value).unwrap()
    }

    struct Req {
        method: Method,
        uri: Uri,
        authority: String,
        headers: HeaderMap,
        https: bool,
        client_cert: Option<crate::tls::PeerCert>,
        client_ip: std::net::IpAddr,
    }

    impl Req {
        fn new(authority: &str, uri: &str) -> Self {
            Req {
                method: Method::GET,
                uri: uri.parse().unwrap(),
                authority: authority.into(),
                headers: HeaderMap::new(),
                https: false,
                client_cert: None,
                client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            }
        }
        fn client(mut self, ip: &str) -> Self {
            self.client_ip = ip.parse().unwrap();
            self
        }
        fn cert(mut self, subject: &str, uris: &[&str], dns: &[&str]) -> Self {
            self.client_cert = Some(crate::tls::PeerCert {
                subject: Some(subject.into()),
                uri_sans: uris.iter().map(|s| s.to_string()).collect(),
                dns_sans: dns.iter().map(|s| s.to_string()).collect(),
            });
            self
        }
        fn method(mut self, m: Method) -> Self {
            self.method = m;
            self
        }
        fn header(mut self, k: &'static str, v: &str) -> Self {
            self.headers.append(k, v.parse().unwrap());
            self
        }
        fn input(&self) -> RouteInput<'_> {
            RouteInput {
                method: &self.method,
                uri: &self.uri,
                authority: &self.authority,
                headers: &self.headers,
                scheme_https: self.https,
                client_cert: self.client_cert.as_ref(),
                client_ip: self.client_ip,
            }
        }
    }

    fn vhost_of(t: &RouteTable, authority: &str) -> Option<String> {
        t.virtual_host(authority).map(|v| v.name.to_string())
    }

    fn route_of(t: &RouteTable, req: &Req) -> Option<String> {
        t.route(&req.input()).map(|m| m.route.name.to_string())
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RouteTable>();
    }

    const HOSTS: &str = "
  - { name: exact, domains: ['api.example.com', 'Mixed.Example.com'], routes: [{ cluster: a }] }
  - { name: exact-port, domains: ['api.example.com:8443'], routes: [{ cluster: a }] }
  - { name: short-suffix, domains: ['*.example.com'], routes: [{ cluster: a }] }
  - { name: long-suffix, domains: ['*.eu.example.com'], routes: [{ cluster: a }] }
  - { name: suffix-port, domains: ['*.ports.net:9000'], routes: [{ cluster: a }] }
  - { name: short-prefix, domains: ['api.*'], routes: [{ cluster: a }] }
  - { name: long-prefix, domains: ['api.internal.*'], routes: [{ cluster: a }] }
  - { name: v6, domains: ['[::1]'], routes: [{ cluster: a }] }
  - { name: default, domains: ['*'], routes: [{ cluster: a }] }
";

    #[test]
    fn vhost_exact_wins_and_is_case_insensitive() {
        let t = table(HOSTS);
        assert_eq!(vhost_of(&t, "api.example.com").as_deref(), Some("exact"));
        assert_eq!(vhost_of(&t, "API.Example.COM").as_deref(), Some("exact"));
        assert_eq!(vhost_of(&t, "mixed.example.com").as_deref(), Some("exact"));
    }

    #[test]
    fn a_trailing_dot_names_the_same_host() {
        let t = table(HOSTS);
        assert_eq!(vhost_of(&t, "api.example.com.").as_deref(), Some("exact"));
        assert_eq!(
            vhost_of(&t, "API.example.com.:80").as_deref(),
            Some("exact")
        );
        assert_eq!(
            vhost_of(&t, "api.example.com.:8443").as_deref(),
            Some("exact-port")
        );
        assert_eq!(
            vhost_of(&t, "x.eu.example.com.").as_deref(),
            Some("long-suffix")
        );
        assert_eq!(
            vhost_of(&t, "api.internal.x.").as_deref(),
            Some("long-prefix")
        );
        assert_eq!(
            vhost_of(&t, "www.example.com..").as_deref(),
            Some("default")
        );
    }

    #[test]
    fn a_pattern_with_a_trailing_dot_names_the_same_host() {
        let t = table(
            "
  - { name: fqdn, domains: ['API.test.'], routes: [{ cluster: a }] }
  - { name: fqdn-port, domains: ['api.test.:8443'], routes: [{ cluster: a }] }
  - { name: suffix, domains: ['*.wild.test.'], routes: [{ cluster: a }] }
  - { name: default, domains: ['*'], routes: [{ cluster: a }] }
",
        );
        assert_eq!(vhost_of(&t, "api.test").as_deref(), Some("fqdn"));
        assert_eq!(vhost_of(&t, "api.test.").as_deref(), Some("fqdn"));
        assert_eq!(vhost_of(&t, "api.test:80").as_deref(), Some("fqdn"));
        assert_eq!(vhost_of(&t, "api.test:8443").as_deref(), Some("fqdn-port"));
        assert_eq!(vhost_of(&t, "api.test.:8443").as_deref(), Some("fqdn-port"));
        assert_eq!(vhost_of(&t, "x.wild.test").as_deref(), Some("suffix"));
        assert_eq!(vhost_of(&t, "x.wild.test.").as_deref(), Some("suffix"));
    }

    #[test]
    fn vhost_port_is_stripped_unless_pattern_has_one() {
        let t = table(HOSTS);
        assert_eq!(vhost_of(&t, "api.example.com:80").as_deref(), Some("exact"));
        assert_eq!(
            vhost_of(&t, "api.example.com:8443").as_deref(),
            Some("exact-port")
        );
        assert_eq!(vhost_of(&t, "api.example.com:").as_deref(), Some("exact"));
        assert_eq!(
            vhost_of(&t, "x.ports.net:9000").as_deref(),
            Some("suffix-port")
        );
        assert_eq!(vhost_of(&t, "x.ports.net:9001").as_deref(), Some("default"));
        assert_eq!(vhost_of(&t, "x.ports.net").as_deref(), Some("default"));
        assert_eq!(vhost_of(&t, "[::1]").as_deref(), Some("v6"));
        assert_eq!(vhost_of(&t, "[::1]:8080").as_deref(), Some("v6"));
        assert_eq!(vhost_of(&t, "[::2]:8080").as_deref(), Some("default"));
    }

    #[test]
    fn vhost_suffix_longest_first_and_needs_a_label() {
        let t = table(HOSTS);
        assert_eq!(
            vhost_of(&t, "www.example.com").as_deref(),
            Some("short-suffix")
        );
        assert_eq!(
            vhost_of(&t, "a.b.example.com:80").as_deref(),
            Some("short-suffix")
        );
        assert_eq!(
            vhost_of(&t, "x.eu.example.com").as_deref(),
            Some("long-suffix")
        );
        // The wildcard stands for at least one character.
        assert_eq!(vhost_of(&t, "example.com").as_deref(), Some("default"));
        assert_eq!(
            vhost_of(&t, "eu.example.com").as_deref(),
            Some("short-suffix")
        );
    }

    #[test]
    fn vhost_suffix_beats_prefix_and_prefix_longest_first() {
        let t = table(HOSTS);
        // Both `*.example.com` and `api.*` match; suffix wildcards come first.
        assert_eq!(
            vhost_of(&t, "api.v2.example.com").as_deref(),
            Some("short-suffix")
        );
        assert_eq!(vhost_of(&t, "api.foo").as_deref(), Some("short-prefix"));
        assert_eq!(
            vhost_of(&t, "api.internal.foo:80").as_deref(),
            Some("long-prefix")
        );
        assert_eq!(vhost_of(&t, "api.").as_deref(), Some("default"));
        assert_eq!(vhost_of(&t, "other.org").as_deref(), Some("default"));
        assert_eq!(vhost_of(&t, "").as_deref(), Some("default"));
    }

    #[test]
    fn vhost_no_match_without_catch_all() {
        let t = table("  - { name: only, domains: ['a.com'], routes: [{ cluster: a }] }\n");
        assert!(vhost_of(&t, "b.com").is_none());
        assert!(t.route(&Req::new("b.com", "/").input()).is_none());
        assert!(t.route(&Req::new("a.com", "/").input()).is_some());
    }

    #[test]
    fn split_port_forms() {
        assert_eq!(split_port("a.com:80"), ("a.com", Some("80")));
        assert_eq!(split_port("a.com"), ("a.com", None));
        assert_eq!(split_port("[::1]:443"), ("[::1]", Some("443")));
        assert_eq!(split_port("[::1]"), ("[::1]", None));
        assert_eq!(split_port("::1"), ("::1", None));
        assert_eq!(split_port("a.com:http"), ("a.com:http", None));
    }

    #[test]
    fn path_conditions_and_first_match_wins() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - { name: exact, match: { path: /exact }, cluster: a }
    - { name: regex, match: { regex: '/items/[0-9]+' }, cluster: a }
    - { name: prefix, match: { prefix: /api }, cluster: a }
    - { name: fallback, cluster: b }
",
        );
        let r = |p: &str| route_of(&t, &Req::new("h", p));
        assert_eq!(r("/exact").as_deref(), Some("exact"));
        assert_eq!(r("/exact?q=1").as_deref(), Some("exact"));
        assert_eq!(r("/exact/more").as_deref(), Some("fallback"));
        assert_eq!(r("/items/42").as_deref(), Some("regex"));
        assert_eq!(r("/items/42?x=y").as_deref(), Some("regex"));
        // Anchored: neither a partial match at the end nor in the middle counts.
        assert_eq!(r("/items/42/edit").as_deref(), Some("fallback"));
        assert_eq!(r("/v1/items/42").as_deref(), Some("fallback"));
        assert_eq!(r("/api").as_deref(), Some("prefix"));
        assert_eq!(r("/api/users").as_deref(), Some("prefix"));
        assert_eq!(r("/apix").as_deref(), Some("prefix"));
        assert_eq!(r("/API").as_deref(), Some("fallback"));
        assert_eq!(r("http://h/api/x").as_deref(), Some("prefix"));
    }

    #[test]
    fn regex_alternation_is_anchored_as_a_whole() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - { name: re, match: { regex: '/a|/b' }, cluster: a }
",
        );
        assert!(route_of(&t, &Req::new("h", "/a")).is_some());
        assert!(route_of(&t, &Req::new("h", "/b")).is_some());
        assert!(route_of(&t, &Req::new("h", "/a/x")).is_none());
        assert!(route_of(&t, &Req::new("h", "/x/b")).is_none());
    }

    #[test]
    fn methods() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - { name: writes, match: { methods: [POST, PUT] }, cluster: a }
    - { name: any, cluster: b }
",
        );
        let r = |m: Method| route_of(&t, &Req::new("h", "/").method(m));
        assert_eq!(r(Method::POST).as_deref(), Some("writes"));
        assert_eq!(r(Method::PUT).as_deref(), Some("writes"));
        assert_eq!(r(Method::GET).as_deref(), Some("any"));
    }

    #[test]
    fn header_conditions() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - name: all
      match:
        headers:
        - { name: x-env, exact: canary }
        - { name: X-User, regex: 'u[0-9]+' }
        - { name: x-debug, present: true }
        - { name: x-block, present: false }
      cluster: a
    - { name: rest, cluster: b }
",
        );
        let base = || {
            Req::new("h", "/")
                .header("x-env", "canary")
                .header("x-user", "u42")
                .header("x-debug", "")
        };
        assert_eq!(route_of(&t, &base()).as_deref(), Some("all"));
        // Every value of a repeated header is tried.
        let multi = Req::new("h", "/")
            .header("x-env", "prod")
            .header("x-env", "canary")
            .header("x-user", "nobody")
            .header("x-user", "u7")
            .header("x-debug", "1");
        assert_eq!(route_of(&t, &multi).as_deref(), Some("all"));
        assert_eq!(
            route_of(&t, &base().header("x-block", "1")).as_deref(),
            Some("rest")
        );
        let mut wrong_env = base();
        wrong_env
            .headers
            .insert("x-env", HeaderValue::from_static("Canary"));
        assert_eq!(route_of(&t, &wrong_env).as_deref(), Some("rest"));
        let mut partial = base();
        partial
            .headers
            .insert("x-user", HeaderValue::from_static("u42x"));
        assert_eq!(route_of(&t, &partial).as_deref(), Some("rest"));
        let mut missing = base();
        missing.headers.remove("x-debug");
        assert_eq!(route_of(&t, &missing).as_deref(), Some("rest"));
    }

    #[test]
    fn source_ip_conditions() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - name: office
      match: { prefix: /admin, source_ips: [10.0.0.0/8, '2001:db8::/32', 192.0.2.7] }
      cluster: a
    - name: denied
      match: { prefix: /admin }
      direct_response: { status: 403 }
",
        );
        let admin = |ip: &str| route_of(&t, &Req::new("x", "/admin").client(ip));
        assert_eq!(admin("10.9.8.7").as_deref(), Some("office"));
        assert_eq!(admin("2001:db8:1::5").as_deref(), Some("office"));
        assert_eq!(admin("192.0.2.7").as_deref(), Some("office"));
        // An IPv4-mapped IPv6 client is its IPv4 address.
        assert_eq!(admin("::ffff:10.1.1.1").as_deref(), Some("office"));
        assert_eq!(admin("192.0.2.8").as_deref(), Some("denied"));
        assert_eq!(admin("11.0.0.1").as_deref(), Some("denied"));
        assert_eq!(admin("2001:db9::1").as_deref(), Some("denied"));
    }

    #[test]
    fn cidrs_parse_strictly() {
        let c = |s: &str| config::Cidr::parse(s);
        assert_eq!(c("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(c("192.0.2.7").unwrap().prefix, 32);
        assert_eq!(c("::1").unwrap().prefix, 128);
        assert!(c("0.0.0.0/0")
            .unwrap()
            .contains("203.0.113.9".parse().unwrap()));
        assert!(!c("0.0.0.0/0").unwrap().contains("::1".parse().unwrap()));
        assert!(c("10.1.2.3/8").unwrap_err().contains("`10.0.0.0/8`"));
        assert!(c("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(c("10.0.0/8").is_err());
        // An IPv4-mapped range is the IPv4 range (clients are compared so).
        let mapped = c("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert!(mapped.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(c("example.com").is_err());
    }

    #[test]
    fn client_cert_conditions() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - name: ops
      match:
        prefix: /admin
        client_cert:
          uri_san: { prefix: 'spiffe://m/ns/ops/' }
          subject: { regex: 'CN=[a-z]+,O=Ops' }
      cluster: a
    - name: dns
      match: { prefix: /admin, client_cert: { dns_san: { exact: b.test } } }
      cluster: a
    - name: denied
      match: { prefix: /admin }
      cluster: b
    - name: anonymous
      match: { client_cert: { presented: false } }
      cluster: b
    - name: any-cert
      match: { client_cert: { presented: true } }
      cluster: a
",
        );
        let ops = || {
            Req::new("h", "/admin").cert(
                "CN=ann,O=Ops",
                &["spiffe://x", "spiffe://m/ns/ops/sa/ann"],
                &[],
            )
        };
        assert_eq!(route_of(&t, &ops()).as_deref(), Some("ops"));
        // Every condition must hold: the SAN alone is not enough.
        let wrong_subject =
            Req::new("h", "/admin").cert("CN=ann,O=Dev", &["spiffe://m/ns/ops/sa/ann"], &[]);
        assert_eq!(route_of(&t, &wrong_subject).as_deref(), Some("denied"));
        // A regex is anchored: a subject that only contains a match fails.
        let longer =
            Req::new("h", "/admin").cert("CN=ann,O=Ops,C=DE", &["spiffe://m/ns/ops/sa/ann"], &[]);
        assert_eq!(route_of(&t, &longer).as_deref(), Some("denied"));
        let dns = Req::new("h", "/admin").cert("CN=b", &[], &["a.test", "b.test"]);
        assert_eq!(route_of(&t, &dns).as_deref(), Some("dns"));
        // No certificate: conditions on what it says fail.
        assert_eq!(
            route_of(&t, &Req::new("h", "/admin")).as_deref(),
            Some("denied")
        );
        assert_eq!(
            route_of(&t, &Req::new("h", "/")).as_deref(),
            Some("anonymous")
        );
        let dev = Req::new("h", "/").cert("CN=dev", &[], &[]);
        assert_eq!(route_of(&t, &dev).as_deref(), Some("any-cert"));
    }

    #[test]
    fn query_conditions_are_percent_decoded() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - name: q
      match:
        query:
        - { name: 'user name', exact: 'Zoë & co' }
        - { name: id, regex: '[0-9]+' }
        - { name: debug, present: true }
        - { name: off, present: false }
      cluster: a
    - { name: rest, cluster: b }
",
        );
        let r = |p: &str| route_of(&t, &Req::new("h", p));
        assert_eq!(
            r("/?user%20name=Zo%C3%AB+%26+co&id=12&debug").as_deref(),
            Some("q")
        );
        assert_eq!(
            r("/?user+name=Zo%c3%ab%20%26%20co&id=x&id=12&debug=").as_deref(),
            Some("q")
        );
        assert_eq!(
            r("/?user%20name=Zo%C3%AB+%26+co&id=12a&debug").as_deref(),
            Some("rest")
        );
        assert_eq!(
            r("/?user%20name=Zo%C3%AB+%26+co&id=12").as_deref(),
            Some("rest")
        );
        assert_eq!(
            r("/?user%20name=Zo%C3%AB+%26+co&id=12&debug&off=1").as_deref(),
            Some("rest")
        );
        assert_eq!(r("/").as_deref(), Some("rest"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(&*percent_decode("plain"), b"plain");
        assert!(matches!(percent_decode("plain"), Cow::Borrowed(_)));
        assert_eq!(&*percent_decode("a%2Fb+c"), b"a/b c");
        assert_eq!(&*percent_decode("%e2%82%ac"), "€".as_bytes());
        assert_eq!(&*percent_decode("100%"), b"100%");
        assert_eq!(&*percent_decode("%zz%4"), b"%zz%4");
        assert_eq!(&*percent_decode("%00"), b"\0");
        assert_eq!(&*percent_decode_with("a+b%20c", false), b"a+b c");
    }

    #[test]
    fn weighted_pick_matches_weights() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - weighted_clusters: [{ cluster: a, weight: 1 }, { cluster: b, weight: 0 }, { cluster: c, weight: 3 }]
",
        );
        let Action::Weighted(w) = &t.virtual_hosts()[0].routes()[0].action else {
            panic!("not weighted");
        };
        assert_eq!(w.total_weight(), 4);
        let listed: Vec<_> = w.iter().map(|(n, wt)| (n.to_string(), wt)).collect();
        assert_eq!(listed, [("a".to_string(), 1), ("c".to_string(), 3)]);
        // Evenly spaced points over the whole u64 range: i * 2^64 / n.
        let n = 4000u128;
        let mut counts: HashMap<String, u64> = HashMap::new();
        for i in 0..n {
            let rand = u64::try_from((i << 64) / n).unwrap();
            *counts.entry(w.pick(rand).to_string()).or_default() += 1;
        }
        assert_eq!(counts.get("a"), Some(&1000));
        assert_eq!(counts.get("c"), Some(&3000));
        assert_eq!(counts.get("b"), None);
        assert_eq!(w.pick(0).as_str(), "a");
        assert_eq!(w.pick(u64::MAX).as_str(), "c");
        assert_eq!(
            t.virtual_hosts()[0].routes()[0]
                .action
                .cluster(0)
                .map(Name::as_str),
            Some("a")
        );
    }

    #[test]
    fn route_settings() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - { cluster: a }
    - name: tuned
      cluster: a
      timeout: 0s
      per_try_timeout: 2s
      idle_timeout: 0s
      max_request_body: 1MiB
      retry: { retry_on: [gateway-error, retriable-status-codes], retriable_status_codes: [409], num_retries: 3 }
    - { cluster: a, idle_timeout: 2m, retry: { retry_on: [5xx], backoff_base: 100ms } }
",
        );
        let routes = t.virtual_hosts()[0].routes();
        assert_eq!(&*routes[0].name, "v/0");
        assert_eq!(routes[0].timeout, Some(Duration::from_secs(15)));
        assert_eq!(routes[0].per_try_timeout, None);
        // Absent: the listener's; `0s`: off on that route.
        assert_eq!(routes[0].idle_timeout, None);
        assert_eq!(routes[1].idle_timeout, Some(None));
        assert_eq!(routes[2].idle_timeout, Some(Some(Duration::from_secs(120))));
        assert!(routes[0].retry.is_none());
        assert_eq!(routes[0].max_request_body, None);

        assert_eq!(&*routes[1].name, "tuned");
        assert_eq!(routes[1].timeout, None);
        assert_eq!(routes[1].per_try_timeout, Some(Duration::from_secs(2)));
        assert_eq!(routes[1].max_request_body, Some(1 << 20));
        let rp = routes[1].retry.as_ref().unwrap();
        assert_eq!(rp.num_retries, 3);
        assert_eq!(rp.backoff_base, Duration::from_millis(25));
        assert_eq!(rp.backoff_max, Duration::from_millis(250));
        assert!(rp.retries_status(StatusCode::BAD_GATEWAY));
        assert!(rp.retries_status(StatusCode::CONFLICT));
        assert!(!rp.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(rp.retries_connect_failure());
        assert!(rp.retries_reset());
        assert!(rp.allows_method(&Method::PUT));
        assert!(!rp.allows_method(&Method::POST));

        let rp = routes[2].retry.as_ref().unwrap();
        assert!(rp.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!rp.retries_status(StatusCode::CONFLICT));
        // backoff_max defaults to ten times backoff_base, as Envoy.
        assert_eq!(rp.backoff_max, Duration::from_secs(1));
    }

    #[test]
    fn upgrade_overrides() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - { match: { prefix: /plain }, cluster: a }
    - { match: { prefix: /off }, cluster: a, upgrades: { WebSocket: false } }
    - { match: { prefix: /on }, cluster: a, upgrades: { spdy/3: true } }
",
        );
        let routes = t.virtual_hosts()[0].routes();
        let listener = vec!["websocket".to_string()];
        // No override: the listener's list, case-insensitively.
        assert!(routes[0].allows_upgrade("WEBSOCKET", &listener));
        assert!(!routes[0].allows_upgrade("foo", &listener));
        assert!(!routes[0].allows_upgrade("websocket", &[]));
        // `false` refuses what the listener allows; `true` allows what it does not list.
        assert!(!routes[1].allows_upgrade("websocket", &listener));
        assert!(routes[2].allows_upgrade("SPDY/3", &[]));
        assert!(routes[2].allows_upgrade("websocket", &listener));
    }

    #[test]
    fn direct_response() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - { match: { path: /health }, direct_response: { status: 200, body: ok } }
    - { direct_response: { status: 404, content_type: application/json, body: '{}' } }
",
        );
        let routes = t.virtual_hosts()[0].routes();
        let Action::Direct {
            status,
            body,
            content_type,
        } = &routes[0].action
        else {
            panic!("not direct");
        };
        assert_eq!(*status, StatusCode::OK);
        assert_eq!(&body[..], b"ok");
        assert_eq!(content_type, "text/plain; charset=utf-8");
        let Action::Direct {
            status,
            content_type,
            ..
        } = &routes[1].action
        else {
            panic!("not direct");
        };
        assert_eq!(*status, StatusCode::NOT_FOUND);
        assert_eq!(content_type, "application/json");
        assert!(routes[1].action.cluster(0).is_none());
    }

    #[test]
    fn path_and_host_rewrites() {
        let t = table(
            r"  - name: v
    domains: ['*']
    routes:
    - { match: { prefix: /api/ }, cluster: a, rewrite: { prefix: /, host: backend.internal:8080 } }
    - { match: { prefix: /strip }, cluster: a, rewrite: { prefix: '' } }
    - match: { prefix: /users }
      cluster: a
      rewrite: { regex: { pattern: '^/users/([0-9]+)/(\w+)$', substitution: '/v2/$2/${1}x' } }
    - { match: { prefix: /dots }, cluster: a, rewrite: { regex: { pattern: '\.', substitution: '_' } } }
    - { cluster: a }
",
        );
        let rw = |p: &str| {
            let req = Req::new("h", p);
            let m = t.route(&req.input()).unwrap();
            (m.rewritten_path(&req.uri), m.rewritten_host().cloned())
        };
        assert_eq!(
            rw("/api/users?x=1"),
            (
                Some("/users?x=1".into()),
                Some(HeaderValue::from_static("backend.internal:8080"))
            )
        );
        assert_eq!(rw("/strip").0.as_deref(), Some("/"));
        assert_eq!(rw("/strip/me?q").0.as_deref(), Some("/me?q"));
        // Never an authority or absolute form, whatever the rewrite leaves.
        assert_eq!(
            rw("/stripevil.example:8080").0.as_deref(),
            Some("/evil.example:8080")
        );
        assert_eq!(
            rw("/striphttp://evil/x?q").0.as_deref(),
            Some("/http://evil/x?q")
        );
        assert_eq!(
            rw("/users/42/posts?page=2").0.as_deref(),
            Some("/v2/posts/42x?page=2")
        );
        // A regex that does not match leaves the path unchanged.
        assert_eq!(rw("/users/me").0.as_deref(), Some("/users/me"));
        assert_eq!(rw("/dots/a.b.c").0.as_deref(), Some("/dots/a_b_c"));
        assert_eq!(rw("/other"), (None, None));
    }

    fn redirect(t: &RouteTable, req: &Req) -> (u16, String) {
        let m = t.route(&req.input()).unwrap();
        let (s, v) = m.redirect(&req.input()).unwrap();
        (s.as_u16(), v.to_str().unwrap().to_string())
    }

    #[test]
    fn redirect_urls() {
        let t = table(
            "  - name: v
    domains: ['*']
    routes:
    - { match: { prefix: /secure }, redirect: { scheme: https } }
    - { match: { prefix: /moved }, redirect: { host: new.example.com, code: 308 } }
    - { match: { prefix: /old/ }, redirect: { prefix_rewrite: /new/, code: 302 } }
    - { match: { prefix: /fixed }, redirect: { path: /landing, strip_query: true } }
    - { match: { prefix: /withq }, redirect: { path: '/landing?from=withq' } }
    - { match: { prefix: /keep }, redirect: { path: /kept } }
    - { cluster: a }
",
        );
        let r = |auth: &str, p: &str| redirect(&t, &Req::new(auth, p));
        assert_eq!(
            r("a.com", "/secure/x?y=1"),
            (301, "https://a.com/secure/x?y=1".into())
        );
        // The default port of the old scheme is dropped when only the scheme changes.
        assert_eq!(
            r("a.com:80", "/secure"),
            (301, "https://a.com/secure".into())
        );
        assert_eq!(
            r("a.com:8080", "/secure"),
            (301, "https://a.com:8080/secure".into())
        );
        assert_eq!(
            r("[::1]:80", "/secure"),
            (301, "https://[::1]/secure".into())
        );
        assert_eq!(
            r("a.com:8080", "/moved/p?q"),
            (308, "http://new.example.com/moved/p?q".into())
        );
        assert_eq!(
            r("a.com", "/old/page?q=1"),
            (302, "http://a.com/new/page?q=1".into())
        );
        assert_eq!(
            r("a.com", "/fixed/x?q=1"),
            (301, "http://a.com/landing".into())
        );
        assert_eq!(
            r("a.com", "/withq?q=1"),
            (301, "http://a.com/landing?from=withq".into())
        );
        assert_eq!(
            r("a.com", "/keep?q=1"),
            (301, "http://a.com/kept?q=1".into())
        );
        // Without any authority the Location is relative.
        assert_eq!(r("", "/keep"), (301, "/kept".into()));

        let mut tls = Req::new("a.com:443", "/moved");
        tls.https = true;
        assert_eq!(
            redirect(&t, &tls),
            (308, "https://new.example.com/moved".into())
        );
        tls.uri = "/keep".parse().unwrap();
        assert_eq!(redirect(&t, &tls), (301, "https://a.com:443/kept".into()));

        let fwd = Req::new("a.com", "/x");
        assert!(t
            .route(&fwd.input())
            .unwrap()
            .redirect(&fwd.input())
            .is_none());
    }

    #[test]
    fn header_ops_order() {
        let t = table(
            "  - name: v
    domains: ['*']
    request_headers:
      remove: [x-route-added]
      set: { x-layer: vhost }
      add: { x-trace: vhost }
    response_headers:
      set: { server: legate }
    routes:
    - cluster: a
      request_headers:
        remove: [x-secret, x-layer]
        set: { x-layer: route, x-secret: route-set }
        add: { x-trace: route, x-route-added: '1' }
      response_headers:
        add: { x-served-by: route }
        remove: [server]
",
        );
        let req = Req::new("h", "/");
        let m = t.route(&req.input()).unwrap();
        let mut h = HeaderMap::new();
        h.append("x-secret", HeaderValue::from_static("client"));
        h.append("x-trace", HeaderValue::from_static("client"));
        h.append("x-layer", HeaderValue::from_static("client"));
        m.apply_request_headers(&mut h, None);
        // Within the route: remove, then set, so the route's own `set` survives.
        let all = |h: &HeaderMap, k: &str| -> Vec<String> {
            h.get_all(k)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(all(&h, "x-secret"), ["route-set"]);
        // The vhost runs after the route: its `set` wins, its `remove` sees route adds.
        assert_eq!(all(&h, "x-layer"), ["vhost"]);
        assert!(h.get("x-route-added").is_none());
        assert_eq!(all(&h, "x-trace"), ["client", "route", "vhost"]);

        let mut resp = HeaderMap::new();
        resp.insert("server", HeaderValue::from_static("upstream"));
        m.apply_response_headers(&mut resp);
        assert_eq!(all(&resp, "server"), ["legate"]);
        assert_eq!(all(&resp, "x-served-by"), ["route"]);
    }
}
