//! `Config::validate`: every check serde cannot make — references between sections,
//! uniqueness, exactly-one-of choices, regexes, header names — collected (not stopped
//! at the first) so one `legate check` run shows everything to fix.
//!
//! Each problem is recorded against the nearest item that carries a location (a
//! listener, a route, a cluster...) plus the key path inside it (`retry.num_retries`);
//! the loader, which has the text, follows that path so the caret lands on the key.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde_saphyr::Location;

use super::source::Seg;
use super::*;

/// One problem found by validation, before it is placed precisely.
#[derive(Debug, Clone)]
pub(crate) struct Issue {
    /// The located item the problem belongs to; `None` = the top of the file.
    pub anchor: Option<Location>,
    /// Key path from the anchor to the offending key, followed as far as it exists.
    pub focus: Vec<Seg>,
    /// The error, located at the anchor.
    pub error: ConfigError,
}

impl Issue {
    /// Narrows the place to key `k` of the current one.
    pub(super) fn key(&mut self, k: &str) -> &mut Self {
        self.focus.push(Seg::Key(k.to_string()));
        self
    }

    /// Narrows the place to item `i` of the current list.
    pub(super) fn index(&mut self, i: usize) -> &mut Self {
        self.focus.push(Seg::Index(i));
        self
    }
}

#[derive(Default)]
pub(super) struct Issues(pub(super) Vec<Issue>);

impl Issues {
    /// Records a problem at `loc` (refine it with [`Issue::key`]).
    pub(super) fn at(
        &mut self,
        loc: &Location,
        msg: impl Into<String>,
        help: impl Into<String>,
    ) -> &mut Issue {
        self.push(Some(*loc), msg, help)
    }

    /// Records a problem at a top-level key path (refine it with [`Issue::key`]).
    pub(super) fn top(&mut self, msg: impl Into<String>, help: impl Into<String>) -> &mut Issue {
        self.push(None, msg, help)
    }

    fn push(
        &mut self,
        anchor: Option<Location>,
        msg: impl Into<String>,
        help: impl Into<String>,
    ) -> &mut Issue {
        let loc = anchor.unwrap_or(Location::UNKNOWN);
        let n = self.0.len();
        self.0.push(Issue {
            anchor,
            focus: Vec::new(),
            error: ConfigError::at(&loc, msg).help(help),
        });
        &mut self.0[n]
    }
}

/// Defined names of one kind, for reference checks and their hints.
struct Defined<'a> {
    what: &'static str,
    section: &'static str,
    names: HashSet<&'a Name>,
}

impl Defined<'_> {
    fn check(&self, e: &mut Issues, r: &Spanned<Name>) {
        if self.names.contains(&r.value) {
            return;
        }
        let mut sorted: Vec<&str> = self.names.iter().map(|n| n.as_str()).collect();
        sorted.sort_unstable();
        let help = match did_you_mean(r.value.as_str(), sorted.iter().copied()) {
            Some(near) => format!(
                "did you mean `{near}`? The {}s defined are: {}",
                self.what,
                sorted.join(", ")
            ),
            None if sorted.is_empty() => format!(
                "define it under `{}:`; no {}s are defined yet",
                self.section, self.what
            ),
            None => format!(
                "define it under `{}:`, or use one of the {}s defined: {}",
                self.section,
                self.what,
                sorted.join(", ")
            ),
        };
        e.at(
            &r.referenced,
            format!("unknown {} `{}`", self.what, r.value),
            help,
        );
    }
}

impl Config {
    /// Checks the parsed config; an empty vector means it is valid.
    ///
    /// Errors are located at the item they concern; [`parse_str`](super::parse_str)
    /// narrows them to the offending key using the file's text.
    pub fn validate(&self) -> Vec<ConfigError> {
        self.issues().into_iter().map(|i| i.error).collect()
    }

    /// `c` (a cluster an HTTP route or a plugin sends to) must not send PROXY
    /// protocol headers: its connections are shared by many clients.
    fn no_proxy_protocol_over_http(&self, e: &mut Issues, c: &Spanned<Name>) {
        let sends = self
            .clusters
            .iter()
            .any(|k| k.value.name == c.value && k.value.proxy_protocol.is_some());
        if sends {
            e.at(
                &c.referenced,
                format!(
                    "cluster `{}` sends a PROXY protocol header (`proxy_protocol`), which only \
                     a TCP listener's cluster may",
                    c.value
                ),
                "an HTTP connection to an upstream carries many clients' requests, so no one \
                 client's address can be sent on it; use a cluster without `proxy_protocol` \
                 here (the client is in `x-forwarded-for`)",
            );
        }
    }

    /// The `tracing` section: its collector is a defined cluster an HTTP
    /// request may reach, and its numbers are in range.
    fn validate_tracing(&self, e: &mut Issues, t: &Tracing, clusters: &Defined<'_>) {
        clusters.check(e, &t.collector_cluster);
        self.no_proxy_protocol_over_http(e, &t.collector_cluster);
        if !t.collector_path.starts_with('/')
            || t.collector_path.parse::<http::uri::PathAndQuery>().is_err()
        {
            e.top(
                format!(
                    "`tracing.collector_path` `{}` is not a path starting with `/`",
                    t.collector_path
                ),
                "write the collector's path, such as Zipkin's `/api/v2/spans` (the default)",
            )
            .key("tracing")
            .key("collector_path");
        }
        if t.service_name.trim().is_empty() {
            e.top(
                "`tracing.service_name` is empty",
                "name this proxy as the trace UI should show it; the default is `legate`",
            )
            .key("tracing")
            .key("service_name");
        }
        if !(0.0..=100.0).contains(&t.random_sampling.0) {
            e.top(
                format!(
                    "`tracing.random_sampling` {} is not between 0% and 100%",
                    t.random_sampling
                ),
                "write a percentage from `0%` (only requests that arrive sampled) to `100%`",
            )
            .key("tracing")
            .key("random_sampling");
        }
        let interval = t.flush_interval.get();
        if !(Duration::from_millis(1)..=Duration::from_secs(60)).contains(&interval) {
            e.top(
                format!(
                    "`tracing.flush_interval` is {}, not between 1ms and 1m",
                    t.flush_interval
                ),
                "the default is `1s`; spans wait at most this long before they are sent",
            )
            .key("tracing")
            .key("flush_interval");
        }
        if !(1..=1_000_000).contains(&t.max_buffered_spans) {
            e.top(
                format!(
                    "`tracing.max_buffered_spans` is {}, not between 1 and 1000000",
                    t.max_buffered_spans
                ),
                "the default is `1000`; spans past it are dropped and counted while the \
                 collector is behind",
            )
            .key("tracing")
            .key("max_buffered_spans");
        }
    }

    /// The problems of this config with the key paths that locate them precisely.
    pub(crate) fn issues(&self) -> Vec<Issue> {
        let mut e = Issues::default();
        if self.version.value != 1 {
            e.at(
                &self.version.referenced,
                format!("unsupported config version {}", self.version.value),
                "this Legate reads `version: 1`",
            );
        }
        self.validate_admin(&mut e);
        self.validate_kv(&mut e);
        self.validate_access_logs(&mut e);

        let clusters = Defined {
            what: "cluster",
            section: "clusters",
            names: self.clusters.iter().map(|c| &c.value.name).collect(),
        };
        let tables = Defined {
            what: "route table",
            section: "routes",
            names: self.routes.iter().map(|t| &t.value.name).collect(),
        };

        if let Some(t) = &self.tracing {
            self.validate_tracing(&mut e, t, &clusters);
        }

        unique(
            &mut e,
            "listener",
            self.listeners
                .iter()
                .map(|l| (&l.value.name, &l.referenced)),
        );
        unique(
            &mut e,
            "route table",
            self.routes.iter().map(|t| (&t.value.name, &t.referenced)),
        );
        unique(
            &mut e,
            "cluster",
            self.clusters.iter().map(|c| (&c.value.name, &c.referenced)),
        );

        let plugins = Defined {
            what: "plugin",
            section: "plugins",
            names: self.plugins.iter().map(|p| &p.value.name).collect(),
        };
        unique(
            &mut e,
            "plugin",
            self.plugins.iter().map(|p| (&p.value.name, &p.referenced)),
        );
        for p in &self.plugins {
            validate_plugin(&mut e, p, &clusters);
            for c in &p.value.capabilities.clusters {
                self.no_proxy_protocol_over_http(&mut e, c);
            }
        }

        self.validate_listener_addresses(&mut e);
        for l in &self.listeners {
            validate_listener(&mut e, l, &tables, &clusters);
            if let Some(h) = &l.value.http {
                for f in &h.filters {
                    plugins.check(&mut e, &f.value.plugin);
                }
            }
            if let Some(t) = &l.value.tcp {
                let original_dst = self
                    .clusters
                    .iter()
                    .any(|c| c.value.name == t.cluster.value && c.value.original_dst);
                if original_dst && !l.value.original_destination {
                    // Only an `original_destination` listener learns a
                    // connection's original destination: every connection
                    // would be closed.
                    e.at(
                        &t.cluster.referenced,
                        format!(
                            "listener `{}`: cluster `{}` is `original_dst`, but the listener \
                             does not read original destinations",
                            l.value.name, t.cluster.value
                        ),
                        "add `original_destination: true` to the listener (connections \
                         redirected to it by iptables), or use a cluster with endpoints",
                    );
                }
                for f in &t.filters {
                    plugins.check(&mut e, &f.value.plugin);
                    http_only_on_tcp(&mut e, &l.value.name, f, &self.plugins);
                }
            }
        }
        self.validate_client_cert_routes(&mut e);
        for t in &self.routes {
            validate_route_table(&mut e, t, &clusters);
            // The HTTP listeners serving this table, with their chains: an
            // override of a plugin none of them runs would never apply.
            let serving: Vec<(&Name, &[Spanned<FilterRef>])> = self
                .listeners
                .iter()
                .filter_map(|l| {
                    let h = l.value.http.as_ref()?;
                    (h.routes.value == t.value.name).then_some((&l.value.name, &h.filters[..]))
                })
                .collect();
            for vh in &t.value.virtual_hosts {
                for r in &vh.value.routes {
                    let rv = &r.value;
                    let targets = rv
                        .cluster
                        .iter()
                        .chain(
                            rv.weighted_clusters
                                .iter()
                                .flat_map(|w| w.value.iter().map(|c| &c.cluster)),
                        )
                        .chain(rv.mirror.iter().map(|m| &m.cluster));
                    for c in targets {
                        self.no_proxy_protocol_over_http(&mut e, c);
                    }
                    for (name, f) in &r.value.filters {
                        if !plugins.names.contains(name) {
                            e.at(
                                &r.referenced,
                                format!("route filter override for unknown plugin `{name}`"),
                                "the keys of `filters:` are plugin names from `plugins:`",
                            )
                            .key("filters")
                            .key(name.as_str());
                        } else if !serving.is_empty()
                            && !serving.iter().any(|(_, chain)| {
                                chain.iter().any(|f| f.value.plugin.value == *name)
                            })
                        {
                            let listeners = serving
                                .iter()
                                .map(|(l, _)| format!("`{l}`"))
                                .collect::<Vec<_>>()
                                .join(", ");
                            let which = if serving.len() == 1 {
                                "listener"
                            } else {
                                "listeners"
                            };
                            e.at(
                                &r.referenced,
                                format!(
                                    "route filter override for plugin `{name}`, which is not in \
                                     the `http.filters` of {which} {listeners} (serving route \
                                     table `{}`): it would never apply",
                                    t.value.name
                                ),
                                format!(
                                    "add `- plugin: {name}` to the listener's `http.filters`, \
                                     or remove this override"
                                ),
                            )
                            .key("filters")
                            .key(name.as_str());
                        }
                        if f.disabled && f.config.is_some() {
                            e.at(
                                &r.referenced,
                                format!("filter `{name}` is both `disabled` and given a `config`"),
                                "use either `disabled: true` or `config: ...`",
                            )
                            .key("filters")
                            .key(name.as_str());
                        }
                    }
                }
            }
        }
        for c in &self.clusters {
            validate_cluster(&mut e, c);
        }
        e.0
    }

    /// A route that needs a client certificate in a table only listeners
    /// without `tls.client_auth` serve can never match: no connection of theirs
    /// has one.
    fn validate_client_cert_routes(&self, e: &mut Issues) {
        for t in &self.routes {
            let mut served = self
                .listeners
                .iter()
                .filter_map(|l| {
                    let h = l.value.http.as_ref()?;
                    (h.routes.value == t.value.name).then_some(&l.value)
                })
                .peekable();
            if served.peek().is_none()
                || served.any(|l| l.tls.as_ref().is_some_and(|t| t.client_auth.is_some()))
            {
                continue;
            }
            for vh in &t.value.virtual_hosts {
                for r in &vh.value.routes {
                    let Some(c) = &r.value.matcher.client_cert else {
                        continue;
                    };
                    if c.presented == Some(false) {
                        continue;
                    }
                    let route = match &r.value.name {
                        Some(n) => format!("route `{n}`"),
                        None => format!("a route of virtual host `{}`", vh.value.name),
                    };
                    e.at(
                        &r.referenced,
                        format!(
                            "{route} matches on the client certificate, but no listener \
                             serving route table `{}` verifies client certificates",
                            t.value.name
                        ),
                        "without `tls.client_auth` on the listener no connection has a \
                         certificate, so the route never matches; add `tls.client_auth` to \
                         the listener, or remove `match.client_cert`",
                    )
                    .key("match")
                    .key("client_cert");
                }
            }
        }
    }

    /// Every access log, the top level's and the listeners': each one's
    /// problems, an empty list, and logs that write one destination with
    /// different writer settings (they share one writer:
    /// [`crate::access_log::destination`]).
    fn validate_access_logs(&self, e: &mut Issues) {
        let top = self
            .access_log
            .as_ref()
            .map(|l| (None, "the top-level `access_log`".to_string(), l));
        let listeners = self.listeners.iter().filter_map(|l| {
            let name = format!("listener `{}`'s `access_log`", l.value.name);
            l.value
                .access_log
                .as_ref()
                .map(|a| (Some(l.referenced), name, a))
        });
        // The first log of each destination, and where it is.
        let mut writers: HashMap<String, (&AccessLog, String)> = HashMap::new();
        for (anchor, owner, logs) in top.into_iter().chain(listeners) {
            let list = matches!(logs, AccessLogs::List(_));
            if list && logs.logs().is_empty() {
                let at = LogAt {
                    anchor,
                    index: None,
                };
                log_issue(
                    e,
                    &at,
                    "`access_log` is an empty list",
                    "list the logs, or write `access_log: off` for none",
                );
            }
            for (i, log) in logs.logs().iter().enumerate() {
                let at = LogAt {
                    anchor,
                    index: list.then_some(i),
                };
                validate_access_log(e, &at, log);
                let here = if list {
                    format!("{owner} (entry {i})")
                } else {
                    owner.clone()
                };
                let dest = crate::access_log::destination(&log.path);
                let Some((first, there)) = writers.get(&dest) else {
                    writers.insert(dest, (log, here));
                    continue;
                };
                let interval = first.flush_interval.get() != log.flush_interval.get();
                if interval || first.buffer_limit.0 != log.buffer_limit.0 {
                    log_issue(
                        e,
                        &at,
                        format!(
                            "this access log writes the file {there} writes, with another \
                             `flush_interval` or `buffer_limit`"
                        ),
                        "logs writing one file share one writer (one file handle, whole \
                         lines): give them the same `flush_interval` and `buffer_limit`, or \
                         leave both out for the defaults",
                    )
                    .key(if interval {
                        "flush_interval"
                    } else {
                        "buffer_limit"
                    });
                }
            }
        }
    }

    fn validate_admin(&self, e: &mut Issues) {
        let a = &self.admin.address;
        match a.value.parse::<SocketAddr>() {
            Ok(addr) if !addr.ip().is_loopback() && !self.admin.allow_non_loopback => {
                e.at(
                    &a.referenced,
                    format!("admin address {addr} is not a loopback address"),
                    "the admin API can drain the proxy; bind it to 127.0.0.1, or set \
                     `admin.allow_non_loopback: true` if the network is trusted",
                );
            }
            Ok(_) => {}
            Err(_) => {
                e.at(
                    &a.referenced,
                    format!("admin address `{}` is not `ip:port`", a.value),
                    "write it like `127.0.0.1:9901`",
                );
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for h in &self.admin.allowed_hosts {
            let name = h.value.as_str();
            let problem = if name.parse::<std::net::IpAddr>().is_ok()
                || name.eq_ignore_ascii_case("localhost")
            {
                Some((
                    format!("`admin.allowed_hosts` lists `{name}`, which is always allowed"),
                    "IP addresses and `localhost` are always answered; list DNS names only"
                        .to_string(),
                ))
            } else if name.contains('*') || rustls_pki_types::DnsName::try_from(name).is_err() {
                Some((
                    format!("`admin.allowed_hosts` entry `{name}` is not a DNS name"),
                    "write a host name as clients send it in `Host`, without port, scheme, \
                     path or wildcard: `legate-0.legate.prod.svc`"
                        .to_string(),
                ))
            } else {
                seen.iter()
                    .find(|s| s.eq_ignore_ascii_case(name))
                    .map(|first| {
                        (
                            format!("`admin.allowed_hosts` lists `{name}` twice"),
                            format!(
                                "names are compared without case: `{first}` already allows it; \
                                 remove one"
                            ),
                        )
                    })
            };
            seen.push(name);
            if let Some((msg, help)) = problem {
                e.at(&h.referenced, msg, help);
            }
        }
    }

    /// The `kv:` section: a Redis backend needs a usable URL and a timeout that
    /// fits every KV-using plugin's CPU deadline (a call waiting on Redis counts
    /// against it: a deadline trap would bypass the plugin's own failure policy).
    fn validate_kv(&self, e: &mut Issues) {
        let kv = &self.kv;
        let timeout = kv.timeout.value.get();
        if timeout.is_zero() || timeout > Duration::from_secs(1) {
            e.top(
                format!(
                    "`kv.timeout` is {}; it must be above 0 and at most 1s",
                    kv.timeout.value
                ),
                "a KV call blocks its worker thread while it waits; 50ms (the default) suits a \
                 Redis on the same network",
            )
            .key("kv")
            .key("timeout");
        }
        if kv.prefix.is_empty()
            || kv
                .prefix
                .contains(|c: char| c.is_whitespace() || c == ':' || c == '#')
        {
            // `:` and `#` separate the prefix, namespace and key in Redis's
            // keys: with one in the prefix, `a:b` + namespace `c` and `a` +
            // namespace `b:c` would name the same keys.
            e.top(
                format!(
                    "`kv.prefix` `{}` is empty or has whitespace, `:` or `#`",
                    kv.prefix
                ),
                "use a short word like `legate` (the default); keys are `PREFIX:NAMESPACE:KEY`",
            )
            .key("kv")
            .key("prefix");
        }
        match (kv.backend, &kv.url) {
            (KvBackendKind::Memory, None) => {}
            (KvBackendKind::Memory, Some(_)) => {
                e.top(
                    "`kv.url` is set but `kv.backend` is `memory`",
                    "set `backend: redis` to use the Redis at this URL, or remove `url`",
                )
                .key("kv")
                .key("url");
            }
            (KvBackendKind::Redis, None) => {
                e.top(
                    "`kv.backend: redis` needs `kv.url`",
                    "add e.g. `url: redis://127.0.0.1:6379/0`",
                )
                .key("kv")
                .key("backend");
            }
            (KvBackendKind::Redis, Some(url)) => {
                if let Err(why) = crate::wasm::kv::check_redis_url(&url.value) {
                    e.top(
                        format!("`kv.url`: {why}"),
                        "write it like `redis://127.0.0.1:6379/0` (or \
                         `redis://:PASSWORD@host:6379/0`, `rediss://host:6380/0` for TLS)",
                    )
                    .key("kv")
                    .key("url");
                }
            }
        }
        if let Some(tls) = &kv.tls {
            let rediss = kv
                .url
                .as_ref()
                .is_some_and(|u| u.value.starts_with("rediss:"));
            if !rediss {
                e.at(
                    &tls.referenced,
                    "`kv.tls` is set but `kv.url` is not a `rediss://` URL",
                    "write the URL as `rediss://host:port/db` to use TLS, or remove `tls`",
                )
                .key("kv")
                .key("tls");
            }
            if tls.value.client_cert.is_some() != tls.value.client_key.is_some() {
                e.at(
                    &tls.referenced,
                    "`kv.tls` needs both `client_cert` and `client_key`, or neither",
                    "give the client certificate and its key (PEM files)",
                )
                .key("kv")
                .key("tls");
            }
            if tls.value.key_password_file.is_some() && tls.value.client_key.is_none() {
                e.at(
                    &tls.referenced,
                    "`kv.tls.key_password_file` without `client_key`",
                    "the password is of an encrypted `client_key`: add the client certificate \
                     and its key, or remove `key_password_file`",
                )
                .key("kv")
                .key("tls")
                .key("key_password_file");
            }
        }
        if kv.backend != KvBackendKind::Redis {
            return;
        }
        for p in &self.plugins {
            let cpu = &p.value.limits.cpu;
            if !p.value.capabilities.kv.is_empty() && cpu.value.get() <= timeout {
                e.at(
                    &p.referenced,
                    format!(
                        "plugin `{}` uses the Redis KV store but its `limits.cpu` ({}) is not above \
                         `kv.timeout` ({})",
                        p.value.name, cpu.value, kv.timeout.value
                    ),
                    format!(
                        "raise `limits.cpu` above `kv.timeout`: a call may wait at most 10× \
                         `limits.cpu` in all, Redis round trips included, and a plugin making \
                         several KV calls in one phase wants room for each at its timeout \
                         (`limits: {{ cpu: {} }}` covers 4), so a slow Redis gets it an \
                         `unavailable` error it handles rather than a deadline trap",
                        Dur(timeout.saturating_mul(4).saturating_add(Duration::from_millis(5)))
                    ),
                )
                .key("limits")
                .key("cpu");
            }
        }
    }

    /// Listener addresses: well-formed, and no two listeners that would collide on bind
    /// (the same address, or a wildcard address and another of its family on one port).
    fn validate_listener_addresses(&self, e: &mut Issues) {
        let mut seen: Vec<(SocketAddr, &Name)> = Vec::new();
        for l in &self.listeners {
            let l = &l.value;
            let Ok(addr) = l.address.value.parse::<SocketAddr>() else {
                e.at(
                    &l.address.referenced,
                    format!("listener address `{}` is not `ip:port`", l.address.value),
                    "write it like `0.0.0.0:8080` or `[::1]:8443`; host names are not allowed here",
                );
                continue;
            };
            let clash = seen
                .iter()
                .find(|(other, _)| addresses_overlap(*other, addr));
            if let Some((other, other_name)) = clash {
                let (msg, help) = if *other == addr {
                    (
                        format!("listeners `{other_name}` and `{}` both bind {addr}", l.name),
                        "give each listener its own address".to_string(),
                    )
                } else {
                    (
                        format!(
                            "listener `{}` ({addr}) overlaps listener `{other_name}` ({other}) on port {}",
                            l.name,
                            addr.port()
                        ),
                        format!(
                            "a wildcard address ({}) already takes the port on every address of its \
                             family; use another port",
                            if addr.is_ipv4() { "0.0.0.0" } else { "[::]" }
                        ),
                    )
                };
                e.at(&l.address.referenced, msg, help);
            }
            // The admin listener binds its address too: `legate run` would fail.
            let admin = self.admin.address.value.parse::<SocketAddr>();
            if let Some(admin) = admin.ok().filter(|a| addresses_overlap(*a, addr)) {
                let msg = if admin == addr {
                    format!(
                        "listener `{}` binds {addr}, the admin address (`admin.address`)",
                        l.name
                    )
                } else {
                    format!(
                        "listener `{}` ({addr}) overlaps the admin address {admin} \
                         (`admin.address`) on port {}",
                        l.name,
                        addr.port()
                    )
                };
                e.at(
                    &l.address.referenced,
                    msg,
                    "the admin listener binds that port too, so `legate run` would fail with \
                     `Address already in use`; give the listener or `admin.address` another \
                     port (a wildcard address takes the port on every address of its family)",
                );
            }
            seen.push((addr, &l.name));
        }
    }
}

/// Whether two addresses cannot both be bound: one port (not 0, which asks
/// the kernel for a free one), one family, and the same IP or a wildcard
/// (`0.0.0.0`, `[::]`: the port on every address of its family; IPv6 sockets
/// are bound `IPV6_V6ONLY`, so they never take an IPv4 port).
pub fn addresses_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Most proxies `listeners[].http.xff_num_trusted_hops` may count: more is a
/// typo, and would make every request's client the peer without a word.
const MAX_XFF_TRUSTED_HOPS: u32 = 16;

/// `forward_client_cert` and `set_client_cert_details` of an HTTP listener:
/// a mode that passes on the downstream's `x-forwarded-client-cert` needs a
/// trusted downstream (an untrusted one would name any identity), one that
/// reads the client certificate needs mTLS, and details need a mode that
/// writes them.
fn validate_client_cert(e: &mut Issues, loc: &Location, l: &Listener, h: &HttpListener) {
    let mode = h.forward_client_cert;
    if mode.forwards() && !h.trust_downstream {
        e.at(
            loc,
            format!(
                "listener `{}`: `forward_client_cert` is `{}` but `trust_downstream` is false",
                l.name,
                mode.as_str()
            ),
            "an untrusted client could name any identity in `x-forwarded-client-cert`; set \
             `trust_downstream: true` when only proxies you run connect, or use \
             `sanitize_set` to write the header from the client certificate alone",
        )
        .key("http")
        .key("forward_client_cert");
    } else if mode != ForwardClientCert::Sanitize
        && mode != ForwardClientCert::AlwaysForwardOnly
        && l.tls
            .as_ref()
            .and_then(|t| t.client_auth.as_ref())
            .is_none()
    {
        e.at(
            loc,
            format!(
                "listener `{}`: `forward_client_cert` is `{}` but the listener verifies no \
                 client certificates",
                l.name,
                mode.as_str()
            ),
            "this mode applies only to connections with a verified client certificate, so \
             every request would lose the header; add `tls.client_auth`, or use `sanitize`",
        )
        .key("http")
        .key("forward_client_cert");
    }
    if h.set_client_cert_details.is_some() && !mode.sets() {
        e.at(
            loc,
            format!(
                "listener `{}`: `set_client_cert_details` has no effect with \
                 `forward_client_cert: {}`",
                l.name,
                mode.as_str()
            ),
            "only `append_forward` and `sanitize_set` write the client certificate's details; \
             set one of them, or remove `set_client_cert_details`",
        )
        .key("http")
        .key("set_client_cert_details");
    }
}

fn validate_listener(
    e: &mut Issues,
    l: &Spanned<Listener>,
    tables: &Defined<'_>,
    clusters: &Defined<'_>,
) {
    let loc = &l.referenced;
    let l = &l.value;
    match (&l.http, &l.tcp) {
        (Some(h), None) => {
            tables.check(e, &h.routes);
            if let Some(c) = &h.compression {
                if !(1..=9).contains(&c.level) {
                    e.at(
                        loc,
                        format!(
                            "listener `{}`: `compression.level` {} is not from 1 to 9",
                            l.name, c.level
                        ),
                        "1 is the fastest, 9 the smallest; 6 (the default) is zlib's balance",
                    )
                    .key("http")
                    .key("compression")
                    .key("level");
                }
                if let Some(b) = &c.brotli {
                    if b.quality > 6 {
                        e.at(
                            loc,
                            format!(
                                "listener `{}`: `compression.brotli.quality` {} is not from 0 to 6",
                                l.name, b.quality
                            ),
                            "each response compressed at 7 and above holds a hash table of \
                             8MiB to 128MiB; 3 (the default) costs about what gzip does, 5 \
                             or 6 compress more",
                        )
                        .key("http")
                        .key("compression")
                        .key("brotli")
                        .key("quality");
                    }
                    if !(10..=22).contains(&b.window_bits) {
                        e.at(
                            loc,
                            format!(
                                "listener `{}`: `compression.brotli.window_bits` {} is not from 10 to 22",
                                l.name, b.window_bits
                            ),
                            "each response's encoder holds a window of 2^window_bits bytes; 18 \
                             (the default) is 256KiB, 22 is 4MiB",
                        )
                        .key("http")
                        .key("compression")
                        .key("brotli")
                        .key("window_bits");
                    }
                }
                if let Some(z) = &c.zstd {
                    if !(1..=6).contains(&z.level) {
                        e.at(
                            loc,
                            format!(
                                "listener `{}`: `compression.zstd.level` {} is not from 1 to 6",
                                l.name, z.level
                            ),
                            "each response compressed at 7 and above holds 6MiB to 90MiB; 3 \
                             (the default) compresses about as gzip's 6 at a fraction of its CPU",
                        )
                        .key("http")
                        .key("compression")
                        .key("zstd")
                        .key("level");
                    }
                    if !(10..=23).contains(&z.window_bits) {
                        e.at(
                            loc,
                            format!(
                                "listener `{}`: `compression.zstd.window_bits` {} is not from 10 to 23",
                                l.name, z.window_bits
                            ),
                            "each response's encoder holds a window of 2^window_bits bytes; 19 \
                             (the default) is 512KiB, 23 (8MiB) is the most an HTTP client must \
                             accept (RFC 9659)",
                        )
                        .key("http")
                        .key("compression")
                        .key("zstd")
                        .key("window_bits");
                    }
                }
                for t in &c.content_types {
                    let ok = t.split_once('/').is_some_and(|(a, b)| {
                        !a.is_empty()
                            && !b.is_empty()
                            && t.bytes()
                                .all(|c| legate_abi_rules::headers::is_tchar(c) || c == b'/')
                    }) && t.bytes().filter(|&c| c == b'/').count() == 1;
                    if !ok {
                        e.at(
                            loc,
                            format!(
                                "listener `{}`: `compression.content_types` entry `{t}` is not a media type",
                                l.name
                            ),
                            "write a type/subtype without parameters, such as `application/json`",
                        )
                        .key("http")
                        .key("compression")
                        .key("content_types");
                    }
                }
            }
            if let Some(via) = &h.via {
                if via.is_empty() || http::HeaderValue::from_str(via).is_err() {
                    e.at(
                        loc,
                        format!(
                            "listener `{}`: `via` value `{via}` is not a valid header value",
                            l.name
                        ),
                        "use printable ASCII such as `legate`; remove `via` for no header",
                    )
                    .key("http")
                    .key("via");
                }
            }
            if h.xff_num_trusted_hops > 0 && !h.trust_downstream {
                e.at(
                    loc,
                    format!(
                        "listener `{}`: `xff_num_trusted_hops` is {} but `trust_downstream` is false",
                        l.name, h.xff_num_trusted_hops
                    ),
                    "an untrusted downstream's `x-forwarded-for` is replaced, not read; set \
                     `trust_downstream: true` when proxies you run are in front, or remove \
                     `xff_num_trusted_hops`",
                )
                .key("http")
                .key("xff_num_trusted_hops");
            } else if h.xff_num_trusted_hops > MAX_XFF_TRUSTED_HOPS {
                e.at(
                    loc,
                    format!(
                        "listener `{}`: `xff_num_trusted_hops` is {}, more than {MAX_XFF_TRUSTED_HOPS}",
                        l.name, h.xff_num_trusted_hops
                    ),
                    "count the proxies you run in front of this listener that append to \
                     `x-forwarded-for` (a load balancer is 1)",
                )
                .key("http")
                .key("xff_num_trusted_hops");
            }
            validate_client_cert(e, loc, l, h);
            let mut seen: Vec<&str> = Vec::new();
            for (i, t) in h.upgrades.iter().enumerate() {
                let problem = upgrade_type_problem(t).or_else(|| {
                    seen.iter().find(|s| s.eq_ignore_ascii_case(t)).map(|first| {
                        (
                            format!("listener `{}`: upgrade `{t}` is listed twice", l.name),
                            format!("upgrade types are case-insensitive: `{first}` already allows it; remove one"),
                        )
                    })
                });
                seen.push(t);
                if let Some((msg, help)) = problem {
                    e.at(loc, msg, help).key("http").key("upgrades").index(i);
                }
            }
        }
        (None, Some(t)) => {
            clusters.check(e, &t.cluster);
            if t.idle_timeout.0.is_zero() {
                e.at(
                    loc,
                    format!("listener `{}`: `tcp.idle_timeout` is zero", l.name),
                    "a zero idle timeout would close every connection at once; the default is 1h",
                )
                .key("tcp")
                .key("idle_timeout");
            }
        }
        (Some(_), Some(_)) => {
            e.at(
                loc,
                format!("listener `{}` has both `http` and `tcp`", l.name),
                "a listener is either HTTP or a TCP proxy; keep one and move the other to its own \
                 listener with a different address",
            )
            .key("tcp");
        }
        (None, None) => {
            e.at(
                loc,
                format!("listener `{}` needs one of `http` and `tcp`", l.name),
                "add `http: { routes: NAME }` for HTTP or `tcp: { cluster: NAME }` for a TCP proxy",
            );
        }
    }
    if let Some(tls) = &l.tls {
        if tls.certificates.is_empty() {
            e.at(
                loc,
                format!("listener `{}` has `tls` but no certificates", l.name),
                "add `certificates: [{ cert: FILE, key: FILE }]`",
            )
            .key("tls")
            .key("certificates");
        }
        let owner = format!("listener `{}`", l.name);
        let needs_tls13 = tls.min_version == TlsVersion::V1_3;
        validate_tls_params(
            e,
            loc,
            &owner,
            &tls.cipher_suites,
            &tls.ecdh_curves,
            needs_tls13,
        );
        if !tls.session_tickets && !tls.session_ticket_keys.is_empty() {
            e.at(
                loc,
                format!(
                    "listener `{}`: `tls.session_ticket_keys` with `session_tickets: false`",
                    l.name
                ),
                "the keys encrypt session tickets, which `session_tickets: false` turns off; \
                 remove one of the two",
            )
            .key("tls")
            .key("session_ticket_keys");
        }
        if let Some(auth) = &tls.client_auth {
            if auth.only_verify_leaf_cert_crl && auth.crl.is_none() {
                e.at(
                    loc,
                    format!(
                        "listener `{}`: `tls.client_auth.only_verify_leaf_cert_crl` without `crl`",
                        l.name
                    ),
                    "it chooses which certificates `crl` is checked against; add \
                     `crl: FILE`, or remove it",
                )
                .key("tls")
                .key("client_auth")
                .key("only_verify_leaf_cert_crl");
            }
        }
        for c in &tls.certificates {
            for (i, sni) in c.value.server_names.iter().enumerate() {
                if let Err(why) = check_server_name(sni) {
                    e.at(
                        &c.referenced,
                        why,
                        "use an exact name like `api.example.com` or `*.example.com`",
                    )
                    .key("server_names")
                    .index(i);
                }
            }
        }
    }
    let lim = &l.limits;
    for (key, value) in [
        ("max_connections", lim.max_connections),
        ("max_request_headers", lim.max_request_headers),
        ("max_concurrent_streams", lim.max_concurrent_streams),
        (
            "max_requests_per_connection",
            lim.max_requests_per_connection.unwrap_or(1),
        ),
    ] {
        if value == 0 {
            e.at(
                loc,
                format!("listener `{}`: `limits.{key}` is zero", l.name),
                "limits must be greater than zero; remove the key to get the default",
            )
            .key("limits")
            .key(key);
        }
    }
    if let Some(k) = &lim.connection_keepalive {
        keepalive_issues(e, loc, &format!("listener `{}`", l.name), &["limits"], k);
    }
    for (key, w) in h2_windows(
        lim.initial_stream_window_size,
        lim.initial_connection_window_size,
    ) {
        e.at(
            loc,
            format!(
                "listener `{}`: {}",
                l.name,
                window_range_error(&format!("limits.{key}"), w)
            ),
            WINDOW_HINT,
        )
        .key("limits")
        .key(key);
    }
    if lim.max_request_headers_size.0 < 1024 {
        e.at(
            loc,
            format!(
                "listener `{}`: `limits.max_request_headers_size` is {} bytes, below 1KiB",
                l.name, lim.max_request_headers_size.0
            ),
            "real clients send more than 1KiB of headers; the default is 60KiB",
        )
        .key("limits")
        .key("max_request_headers_size");
    }
    let at_once =
        "a zero timeout would close every connection at once; remove the key to get the default";
    for (key, value, help) in [
        ("header_read_timeout", lim.header_read_timeout, at_once),
        ("idle_timeout", lim.idle_timeout, at_once),
        (
            "max_connection_duration",
            lim.max_connection_duration.unwrap_or(Dur::secs(1)),
            "a connection could serve nothing; remove the key for no limit",
        ),
        (
            "lingering_timeout",
            lim.lingering_timeout,
            "a lingering close would end at once; to turn lingering close off, set `lingering_time: 0s` instead",
        ),
    ] {
        if value.0.is_zero() {
            e.at(
                loc,
                format!("listener `{}`: `limits.{key}` is zero", l.name),
                help,
            )
            .key("limits")
            .key(key);
        }
    }
}

fn validate_route_table(e: &mut Issues, t: &Spanned<RouteTable>, clusters: &Defined<'_>) {
    let table = &t.value;
    if table.virtual_hosts.is_empty() {
        e.at(
            &t.referenced,
            format!("route table `{}` has no virtual hosts", table.name),
            "add a virtual host, e.g. `{ name: default, domains: [\"*\"], routes: [...] }`",
        )
        .key("virtual_hosts");
    }
    unique(
        e,
        "virtual host",
        table
            .virtual_hosts
            .iter()
            .map(|v| (&v.value.name, &v.referenced)),
    );
    // Each domain's key (as the router matches it) → its virtual host and spelling.
    let mut domains: HashMap<String, (&Name, &str)> = HashMap::new();
    for vh in &table.virtual_hosts {
        let vh_loc = &vh.referenced;
        let vh = &vh.value;
        if vh.domains.is_empty() {
            e.at(
                vh_loc,
                format!("virtual host `{}` has no domains", vh.name),
                "add `domains: [\"*\"]` to match every host",
            )
            .key("domains");
        }
        for d in &vh.domains {
            if let Err((why, help)) = check_domain(&d.value) {
                e.at(&d.referenced, why, help);
            }
            let key = normalize_domain(&d.value);
            if let Some((other, spelling)) = domains.insert(key, (&vh.name, &d.value)) {
                let what = if spelling == d.value {
                    format!("domain `{spelling}`")
                } else {
                    // `api.test.` and `api.test`, or `API.test`: one host.
                    format!(
                        "domain `{}` (the same host as `{spelling}`: case and a trailing \
                         dot are ignored)",
                        d.value
                    )
                };
                e.at(
                    &d.referenced,
                    format!("{what} is in virtual hosts `{other}` and `{}`", vh.name),
                    "a domain may belong to one virtual host per route table; remove one",
                );
            }
        }
        if vh.routes.is_empty() {
            e.at(
                vh_loc,
                format!("virtual host `{}` has no routes", vh.name),
                "add a route, e.g. `{ match: { prefix: / }, cluster: NAME }`",
            )
            .key("routes");
        }
        unique(
            e,
            "route",
            vh.routes
                .iter()
                .filter_map(|r| r.value.name.as_ref().map(|n| (n, &r.referenced))),
        );
        header_ops(e, &vh.request_headers, vh_loc, "request_headers");
        header_ops(e, &vh.response_headers, vh_loc, "response_headers");
        if let Some(c) = &vh.cors {
            validate_cors(e, vh_loc, c);
        }
        for r in &vh.routes {
            validate_route(e, r, clusters);
        }
    }
}

/// The most `max_concurrent_streams` can be: HTTP/2 stream identifiers are 31
/// bits.
const MAX_STREAMS: u32 = (1 << 31) - 1;

/// The action keys of a route, in the order the schema lists them.
const ACTIONS: [&str; 5] = [
    "cluster",
    "weighted_clusters",
    "redirect",
    "direct_response",
    "health",
];

/// A plugin on a TCP listener must be a network filter. Native filters and the
/// builtin plugins are HTTP filters, known from the config alone; whether a
/// `.wasm` file is one is known only once it is loaded (`network_filter.rs`).
fn http_only_on_tcp(
    e: &mut Issues,
    listener: &Name,
    f: &Spanned<super::FilterRef>,
    plugins: &[Spanned<Plugin>],
) {
    let name = &f.value.plugin;
    let Some(p) = plugins.iter().find(|p| p.value.name == name.value) else {
        return;
    };
    let module = p.value.module.to_str().unwrap_or_default();
    let kind = if module.starts_with(crate::native::PREFIX) {
        "a native filter"
    } else if module.starts_with(crate::wasm::builtin::PREFIX) {
        "a builtin plugin"
    } else {
        return;
    };
    e.at(
        &name.referenced,
        format!(
            "listener `{listener}`: plugin `{}` ({kind}, `{module}`) is an HTTP filter, but \
             `tcp.filters` takes network filters",
            name.value
        ),
        "use a component of the `network-filter` world or a proxy-wasm module here, or move \
         the plugin to an HTTP listener's `http.filters`",
    );
}

fn validate_plugin(e: &mut Issues, p: &Spanned<Plugin>, clusters: &Defined<'_>) {
    let loc = &p.referenced;
    let p = &p.value;
    if p.module.as_os_str().is_empty() {
        e.at(
            loc,
            format!("plugin `{}`: `module` is empty", p.name),
            "give the path of the plugin's `.wasm` component",
        )
        .key("module");
    }
    if let Some(kind) = p
        .module
        .to_str()
        .and_then(|m| m.strip_prefix(crate::native::PREFIX))
    {
        if !crate::native::NAMES.contains(&kind) {
            e.at(
                loc,
                format!("plugin `{}`: no native filter `{kind}`", p.name),
                format!(
                    "native filters: {}; or give the path of a `.wasm` file",
                    crate::native::NAMES.join(", ")
                ),
            )
            .key("module");
        }
    }
    if let Some(name) = p
        .module
        .to_str()
        .and_then(|m| m.strip_prefix(crate::wasm::builtin::PREFIX))
    {
        if crate::wasm::builtin::get(name).is_none() {
            e.at(
                loc,
                format!("plugin `{}`: no builtin plugin `{name}`", p.name),
                crate::wasm::builtin::missing_help(),
            )
            .key("module");
        }
    }
    if let Some(sha) = &p.sha256 {
        let v = &sha.value;
        if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
            e.at(
                &sha.referenced,
                format!("plugin `{}`: `sha256` is not 64 hex digits", p.name),
                "write the module's digest as printed by `sha256sum FILE`",
            );
        }
    }
    let l = &p.limits;
    let cpu = l.cpu.value.get();
    let mem = l.memory.value.0;
    let body = l.body.value.0;
    let checks = [
        (
            (Duration::from_millis(1)..=Duration::from_secs(10)).contains(&cpu),
            "cpu",
            &l.cpu.referenced,
            l.cpu.value.to_string(),
            "use between `1ms` and `10s` (deadlines are enforced at 1ms granularity)",
        ),
        (
            ((1 << 20)..=(256 << 20)).contains(&mem),
            "memory",
            &l.memory.referenced,
            l.memory.value.to_string(),
            "use between `1MiB` and `256MiB`",
        ),
        (
            usize::try_from(body).is_ok_and(|b| legate_abi_rules::limits::BODY_LIMIT.contains(&b)),
            "body",
            &l.body.referenced,
            l.body.value.to_string(),
            "use between `1KiB` and `64MiB` (a buffered body is held in host memory per exchange)",
        ),
        (
            l.pause.value.get() <= Duration::from_secs(3600),
            "pause",
            &l.pause.referenced,
            l.pause.value.to_string(),
            "use at most `1h`, or `0s` for no bound",
        ),
    ];
    for (ok, key, at, value, help) in checks {
        if !ok {
            e.at(
                at,
                format!(
                    "plugin `{}`: `limits.{key}` {value} is out of range",
                    p.name
                ),
                help,
            );
        }
    }
    for c in &p.capabilities.clusters {
        clusters.check(e, c);
    }
    if p.files.len() > super::MAX_PLUGIN_FILES {
        e.at(
            loc,
            format!(
                "plugin `{}`: {} `files` given; at most {} are allowed",
                p.name,
                p.files.len(),
                super::MAX_PLUGIN_FILES
            ),
            "combine the data into fewer files",
        )
        .key("files");
    }
    if p.proxy_wasm.is_some() && !p.files.is_empty() {
        e.at(
            loc,
            format!(
                "plugin `{}`: `files` is for components, not proxy-wasm modules",
                p.name
            ),
            "proxy-wasm modules read their data from `proxy_wasm.plugin_config`; remove `files`",
        )
        .key("files");
    }
    if let Some(pw) = &p.proxy_wasm {
        if pw.plugin_config.is_some() && p.config.is_some() {
            e.at(
                loc,
                format!(
                    "plugin `{}`: both `config` and `proxy_wasm.plugin_config` are given",
                    p.name
                ),
                "give the proxy-wasm plugin configuration once, in either",
            )
            .key("proxy_wasm");
        }
        if let Some(d) = &pw.start_cpu {
            let v = d.value.get();
            if !(Duration::from_millis(1)..=ProxyWasm::MAX_START_CPU).contains(&v) {
                e.at(
                    &d.referenced,
                    format!(
                        "plugin `{}`: `proxy_wasm.start_cpu` {} is out of range",
                        p.name, d.value
                    ),
                    "use between `1ms` and `60s`",
                );
            }
        }
        for (key, v) in [("root_id", &pw.root_id), ("vm_id", &pw.vm_id)] {
            if v.len() > 256 || v.chars().any(char::is_control) {
                e.at(
                    loc,
                    format!("plugin `{}`: `proxy_wasm.{key}` is invalid", p.name),
                    "use at most 256 printable characters",
                )
                .key("proxy_wasm");
            }
        }
    }
}

/// A `cors` policy (of a virtual host or a route, at `loc`).
fn validate_cors(e: &mut Issues, loc: &Location, c: &crate::config::Cors) {
    if c.allow_origins.is_empty() {
        e.at(
            loc,
            "`cors.allow_origins` is empty, so no origin is allowed",
            "list the origins, e.g. `[{ exact: \"https://app.example.com\" }]`, or `[{ exact: \"*\" }]` for any",
        )
        .key("cors")
        .key("allow_origins");
    }
    if c.allow_credentials
        && c.allow_origins
            .iter()
            .any(|o| o.exact.as_deref() == Some("*"))
    {
        e.at(
            loc,
            "`cors.allow_credentials: true` with `{ exact: \"*\" }` in `allow_origins`",
            "with credentials every site could read its visitors' answers (browsers refuse `*` \
             with credentials for this reason, and Legate answers with the origin itself): list \
             the origins allowed, or drop `allow_credentials`",
        )
        .key("cors")
        .key("allow_credentials");
    }
    for (i, o) in c.allow_origins.iter().enumerate() {
        validate_string_match(e, loc, "a `cors.allow_origins` entry", o, &|issue| {
            issue.key("cors").key("allow_origins").index(i);
        });
    }
    for m in &c.allow_methods {
        if m.is_empty() || !m.bytes().all(legate_abi_rules::headers::is_tchar) {
            e.at(
                loc,
                format!("`cors.allow_methods` entry `{m}` is not a method"),
                "methods are tokens such as `PUT` or `DELETE`",
            )
            .key("cors")
            .key("allow_methods");
        }
    }
    for (key, list) in [
        ("allow_headers", &c.allow_headers),
        ("expose_headers", &c.expose_headers),
    ] {
        for h in list {
            if h != "*" && http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                e.at(
                    loc,
                    format!("`cors.{key}` entry `{h}` is not a header name"),
                    "header names are tokens such as `authorization` or `x-request-id` (or `*`)",
                )
                .key("cors")
                .key(key);
            }
        }
    }
}

/// A route's `fault`: on a forwarding route, with something to inject.
fn validate_fault(e: &mut Issues, loc: &Location, r: &Route, f: &Fault) {
    if r.cluster.is_none() && r.weighted_clusters.is_none() {
        e.at(
            loc,
            "`fault` only applies to routes that forward to a cluster",
            "remove `fault`, or route to a cluster: a redirect or direct response has no \
             upstream to fail",
        )
        .key("fault");
    }
    if f.delay.is_none() && f.abort.is_none() {
        e.at(
            loc,
            "`fault` has neither `delay` nor `abort`",
            "add `delay: { duration: 1s, percent: 10% }` or `abort: { status: 503, percent: 5% }`",
        )
        .key("fault");
    }
    let percent = |e: &mut Issues, p: Percent, what: &str| {
        if !(0.0..=100.0).contains(&p.0) {
            e.at(
                loc,
                format!("`fault.{what}.percent` {p} is not between 0% and 100%"),
                "write a percentage from `0%` to `100%` (the default: every request)",
            )
            .key("fault")
            .key(what)
            .key("percent");
        }
    };
    if let Some(d) = &f.delay {
        percent(e, d.percent, "delay");
        if d.duration.get().is_zero() {
            e.at(
                loc,
                "`fault.delay.duration` is 0",
                "use a positive duration such as `2s`",
            )
            .key("fault")
            .key("delay")
            .key("duration");
        }
    }
    if let Some(a) = &f.abort {
        percent(e, a.percent, "abort");
        match (a.status, a.grpc_status) {
            (Some(s), None) if !(200..=599).contains(&s) => {
                e.at(
                    loc,
                    format!("`fault.abort.status` {s} is not between 200 and 599"),
                    "answer with an HTTP status such as `503`",
                )
                .key("fault")
                .key("abort")
                .key("status");
            }
            (None, Some(g)) if g > 16 => {
                e.at(
                    loc,
                    format!("`fault.abort.grpc_status` {g} is not a gRPC status (0 to 16)"),
                    "use e.g. `14` (UNAVAILABLE) or `4` (DEADLINE_EXCEEDED)",
                )
                .key("fault")
                .key("abort")
                .key("grpc_status");
            }
            (Some(_), None) | (None, Some(_)) => {}
            (Some(_), Some(_)) | (None, None) => {
                e.at(
                    loc,
                    "`fault.abort` needs exactly one of `status` and `grpc_status`",
                    "`status: 503` answers HTTP; `grpc_status: 14` answers gRPC's \
                     trailers-only form",
                )
                .key("fault")
                .key("abort");
            }
        }
    }
}

fn validate_route(e: &mut Issues, r: &Spanned<Route>, clusters: &Defined<'_>) {
    let loc = &r.referenced;
    let r = &r.value;
    if let Some(c) = &r.cors {
        validate_cors(e, loc, c);
    }
    let mut seen: Vec<&str> = Vec::new();
    for t in r.upgrades.keys() {
        let problem = upgrade_type_problem(t).or_else(|| {
            seen.iter()
                .find(|s| s.eq_ignore_ascii_case(t))
                .map(|first| {
                    (
                        format!("upgrade `{t}` is overridden twice (`{first}` too)"),
                        "upgrade types are case-insensitive; keep one of them".to_string(),
                    )
                })
        });
        seen.push(t);
        if let Some((msg, help)) = problem {
            e.at(loc, msg, help).key("upgrades").key(t);
        }
    }
    let present: Vec<&str> = ACTIONS
        .iter()
        .zip([
            r.cluster.is_some(),
            r.weighted_clusters.is_some(),
            r.redirect.is_some(),
            r.direct_response.is_some(),
            r.health.is_some(),
        ])
        .filter_map(|(name, set)| set.then_some(*name))
        .collect();
    match present.as_slice() {
        [] => {
            e.at(
                loc,
                "this route has no action",
                "give it one of `cluster`, `weighted_clusters`, `redirect`, `direct_response` or `health`",
            );
        }
        [_] => {}
        [first, second, ..] => {
            e.at(
                loc,
                format!("this route has two actions, `{first}` and `{second}`"),
                "a route does one thing; keep one action, or split it into two routes with different matches",
            )
            .key(second);
        }
    }
    if let Some(f) = &r.fault {
        validate_fault(e, loc, r, f);
    }
    if let Some(c) = &r.cluster {
        clusters.check(e, c);
    }
    for (i, m) in r
        .health
        .iter()
        .flat_map(|h| h.min_healthy.iter())
        .enumerate()
    {
        clusters.check(e, &m.cluster);
        if !(0.0..=100.0).contains(&m.percent.0) {
            e.at(
                loc,
                format!(
                    "`health.min_healthy` percent {} is not between 0% and 100%",
                    m.percent
                ),
                "write the least share of the cluster's endpoints that must be healthy, e.g. `50%`",
            )
            .key("health")
            .key("min_healthy")
            .index(i)
            .key("percent");
        }
    }
    if let Some(w) = &r.weighted_clusters {
        for wc in &w.value {
            clusters.check(e, &wc.cluster);
        }
        if w.value.is_empty() {
            e.at(
                &w.referenced,
                "`weighted_clusters` is empty",
                "list the clusters to split across, e.g. `[{ cluster: a, weight: 90 }, { cluster: b, weight: 10 }]`",
            );
        } else if w.value.iter().map(|c| u64::from(c.weight)).sum::<u64>() == 0 {
            e.at(
                &w.referenced,
                "`weighted_clusters`: the weights add up to zero",
                "give at least one cluster a positive weight",
            );
        }
    }
    if let Some(m) = &r.mirror {
        clusters.check(e, &m.cluster);
        if r.cluster.is_none() && r.weighted_clusters.is_none() {
            e.at(
                loc,
                "`mirror` only applies to routes that forward to a cluster",
                "remove `mirror`, or route to a cluster",
            )
            .key("mirror");
        }
        if !(0.0..=100.0).contains(&m.percent.0) {
            e.at(
                loc,
                format!("`mirror.percent` {} is not between 0% and 100%", m.percent),
                "write a percentage from `0%` to `100%`",
            )
            .key("mirror")
            .key("percent");
        }
        if m.timeout.get().is_zero() {
            e.at(
                loc,
                "`mirror.timeout` is 0",
                "use a positive duration such as `5s`",
            )
            .key("mirror")
            .key("timeout");
        }
    }
    if let Some(rd) = &r.redirect {
        validate_redirect(e, loc, rd, &r.matcher);
    }
    if let Some(d) = &r.direct_response {
        if !(200..=599).contains(&d.status.value) {
            e.at(
                &d.status.referenced,
                format!(
                    "direct_response status {} is not a final HTTP status",
                    d.status.value
                ),
                "use a status from 200 to 599",
            );
        }
        if matches!(d.status.value, 204 | 304) && d.body.as_ref().is_some_and(|b| !b.is_empty()) {
            e.at(
                loc,
                format!(
                    "direct_response status {} has a `body`, which this status never carries",
                    d.status.value
                ),
                "remove `body` (RFC 9110 §15.3.5, §15.4.5: 204 and 304 responses have no \
                 content), or use another status such as 200",
            )
            .key("direct_response")
            .key("body");
        }
        if let Some(ct) = &d.content_type {
            if ct.is_empty() || http::HeaderValue::from_str(ct).is_err() {
                e.at(
                    loc,
                    format!("content_type `{ct}` is not a valid header value"),
                    "use a media type such as `application/json`",
                )
                .key("direct_response")
                .key("content_type");
            }
        }
    }
    validate_match(e, loc, &r.matcher);
    if let Some(rw) = &r.rewrite {
        if rw.prefix.is_some() && r.matcher.prefix.is_none() {
            e.at(
                loc,
                "`rewrite.prefix` needs a route matched by `prefix`",
                "it replaces the matched prefix; match with `prefix:`, or use `rewrite.regex`",
            )
            .key("rewrite")
            .key("prefix");
        }
        if rw.prefix.is_some() && rw.regex.is_some() {
            e.at(
                loc,
                "`rewrite` has both `prefix` and `regex`",
                "keep one of them",
            )
            .key("rewrite")
            .key("regex");
        }
        if let Some(rr) = &rw.regex {
            regex_check(e, &rr.pattern, false);
            if let Ok(re) = regex::Regex::new(&rr.pattern.value) {
                for name in missing_groups(&re, &rr.substitution) {
                    e.at(
                        loc,
                        format!(
                            "`rewrite.regex.substitution` refers to group `{name}`, which \
                             `{}` does not have (it would be replaced by nothing)",
                            rr.pattern.value
                        ),
                        "use a group the pattern has (`$1` is the first); write `${1}x` \
                         when letters or digits follow the reference, `$$` for a `$`",
                    )
                    .key("rewrite")
                    .key("regex")
                    .key("substitution");
                }
            }
        }
        if let Some(h) = &rw.host {
            if h.is_empty() || http::uri::Authority::try_from(h.as_str()).is_err() {
                e.at(
                    loc,
                    format!("rewrite host `{h}` is not a valid host"),
                    "write it like `api.internal` or `api.internal:8080`",
                )
                .key("rewrite")
                .key("host");
            }
        }
        if r.cluster.is_none() && r.weighted_clusters.is_none() {
            e.at(
                loc,
                "`rewrite` only applies to routes that forward to a cluster",
                "remove `rewrite`, or route to a cluster",
            )
            .key("rewrite");
        }
    }
    if let Some(pt) = r.per_try_timeout {
        // `0s` disables the per-try timeout, as it does the route timeout.
        if !pt.0.is_zero() && !r.timeout.0.is_zero() && pt > r.timeout {
            e.at(
                loc,
                format!(
                    "per_try_timeout {pt} is longer than the route timeout {}",
                    r.timeout
                ),
                "the route timeout covers all attempts; make per_try_timeout shorter than `timeout` \
                 (default 15s)",
            )
            .key("per_try_timeout");
        }
    }
    if let Some(rp) = &r.retry {
        validate_retry(e, loc, rp);
    }
    header_ops(e, &r.request_headers, loc, "request_headers");
    header_ops(e, &r.response_headers, loc, "response_headers");
}

fn validate_redirect(e: &mut Issues, loc: &Location, rd: &Redirect, m: &RouteMatch) {
    if ![301, 302, 303, 307, 308].contains(&rd.code.value) {
        e.at(
            &rd.code.referenced,
            format!("redirect code {} is not a redirect status", rd.code.value),
            "use 301, 302, 303, 307 or 308 (for other answers use `direct_response`)",
        );
    }
    if let Some(s) = &rd.scheme {
        if s != "http" && s != "https" {
            e.at(
                loc,
                format!("redirect scheme `{s}` is not http or https"),
                "use `http` or `https`",
            )
            .key("redirect")
            .key("scheme");
        }
    }
    if let Some(h) = &rd.host {
        if h.is_empty() || http::uri::Authority::try_from(h.as_str()).is_err() {
            e.at(
                loc,
                format!("redirect host `{h}` is not a valid host"),
                "write it like `www.example.com` or `example.com:8443`",
            )
            .key("redirect")
            .key("host");
        }
    }
    if let Some(p) = &rd.path {
        if !p.starts_with('/') {
            e.at(
                loc,
                format!("redirect path `{p}` does not start with `/`"),
                "write an absolute path such as `/login`",
            )
            .key("redirect")
            .key("path");
        }
    }
    if rd.prefix_rewrite.is_some() {
        if rd.path.is_some() {
            e.at(
                loc,
                "redirect has both `path` and `prefix_rewrite`",
                "`path` replaces the whole path, `prefix_rewrite` only the matched prefix; keep one",
            )
            .key("redirect")
            .key("prefix_rewrite");
        } else if m.prefix.is_none() {
            e.at(
                loc,
                "redirect `prefix_rewrite` needs a route matched by `prefix`",
                "it replaces the matched prefix; match with `prefix:`, or use `path:`",
            )
            .key("redirect")
            .key("prefix_rewrite");
        }
    }
}

/// The methods of RFC 9110 §9 and RFC 5789 (`PATCH`), as requests spell them. A
/// `match.methods` entry equal to one of them but for case is refused.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn validate_match(e: &mut Issues, loc: &Location, m: &RouteMatch) {
    let kinds: Vec<&str> = [
        ("prefix", m.prefix.is_some()),
        ("path", m.path.is_some()),
        ("regex", m.regex.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    if let [first, second, ..] = kinds.as_slice() {
        e.at(
            loc,
            format!("a route match has both `{first}` and `{second}`"),
            "match the path with one of `prefix`, `path` and `regex`",
        )
        .key("match")
        .key(second);
    }
    for (key, p) in [("prefix", &m.prefix), ("path", &m.path)] {
        if let Some(p) = p {
            if !p.starts_with('/') {
                e.at(
                    loc,
                    format!("match {key} `{p}` does not start with `/`"),
                    format!("request paths start with `/`; write `/{p}`"),
                )
                .key("match")
                .key(key);
            }
        }
    }
    if let Some(re) = &m.regex {
        regex_check(e, re, true);
    }
    for (i, meth) in m.methods.iter().enumerate() {
        if meth.is_empty() || http::Method::from_bytes(meth.as_bytes()).is_err() {
            e.at(
                loc,
                format!("`{meth}` is not an HTTP method"),
                "use a method token such as GET, POST or PUT",
            )
            .key("match")
            .key("methods")
            .index(i);
        } else if let Some(std) = STANDARD_METHODS
            .iter()
            .find(|s| s.eq_ignore_ascii_case(meth) && **s != meth.as_str())
        {
            // A valid token, but requests spell standard methods in upper case
            // and methods are compared case-sensitively (RFC 9110 §9.1): `get`
            // would never match a normal GET.
            e.at(
                loc,
                format!("method `{meth}` never matches a `{std}` request"),
                format!("methods are case-sensitive: use `{std}`"),
            )
            .key("match")
            .key("methods")
            .index(i);
        }
    }
    let conditions = m
        .headers
        .iter()
        .map(|h| (h, "header"))
        .chain(m.query.iter().map(|q| (q, "query parameter")));
    for (vm, what) in conditions {
        let at = &vm.referenced;
        let v = &vm.value;
        let n = [v.exact.is_some(), v.regex.is_some(), v.present.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if n != 1 {
            e.at(
                at,
                format!(
                    "the condition on {what} `{}` needs exactly one of `exact`, `regex` and `present`",
                    v.name
                ),
                if n == 0 {
                    "add `exact: VALUE`, `regex: PATTERN`, or `present: true`"
                } else {
                    "keep one of them; use two conditions on the same name to require both"
                },
            );
        }
        if what == "header" {
            if v.name.starts_with(':') || http::HeaderName::from_bytes(v.name.as_bytes()).is_err() {
                e.at(
                    at,
                    format!("`{}` is not a valid header name", v.name),
                    "header names are tokens such as `x-user-id`: letters, digits and `!#$%&'*+-.^_|~`",
                )
                .key("name");
            }
        } else if v.name.is_empty() {
            e.at(
                at,
                "the query parameter name is empty",
                "give the parameter's name",
            )
            .key("name");
        }
        if let Some(re) = &v.regex {
            if let Some(issue) = anchored_regex_issue(e, at, re) {
                issue.key("regex");
            }
        }
    }
    if let Some(c) = &m.client_cert {
        validate_client_cert_match(e, loc, c);
    }
}

fn validate_client_cert_match(e: &mut Issues, loc: &Location, c: &ClientCertMatch) {
    let fields = [
        ("subject", &c.subject),
        ("uri_san", &c.uri_san),
        ("dns_san", &c.dns_san),
    ];
    let tested = fields.iter().find(|(_, t)| t.is_some()).map(|(k, _)| *k);
    match (c.presented, tested) {
        (None, None) => {
            e.at(
                loc,
                "`match.client_cert` has no condition, so it matches every request",
                "add `presented: true`, or a `subject`, `uri_san` or `dns_san` condition; or remove `client_cert`",
            )
            .key("match")
            .key("client_cert");
        }
        (Some(false), Some(k)) => {
            e.at(
                loc,
                format!("`match.client_cert` has `presented: false` and a `{k}` condition"),
                "a connection without a certificate has no subject or SANs, so the route \
                 never matches; remove `presented: false`",
            )
            .key("match")
            .key("client_cert")
            .key("presented");
        }
        _ => {}
    }
    for (key, t) in fields {
        let Some(t) = t else { continue };
        let what = format!("`match.client_cert.{key}`");
        validate_string_match(e, loc, &what, t, &|issue| {
            issue.key("match").key("client_cert").key(key);
        });
    }
}

/// A list of names a `tls` section takes: its key, its entries, the names
/// known (for the help) and the test of one.
type NameList<'a> = (&'a str, &'a [String], &'a str, &'a dyn Fn(&str) -> bool);

/// A `tls` section's `cipher_suites` and `ecdh_curves` (of `owner`, placed
/// under `loc`'s `tls`): known names, none twice, and (`needs_tls13`: a
/// listener with `min_version: "1.3"`) a suite the versions allowed can use.
fn validate_tls_params(
    e: &mut Issues,
    loc: &Location,
    owner: &str,
    suites: &[String],
    curves: &[String],
    needs_tls13: bool,
) {
    let suite_known = |n: &str| crate::tls::cipher_suite_is_tls13(n).is_some();
    let lists: [NameList<'_>; 2] = [
        (
            "cipher_suites",
            suites,
            crate::tls::CIPHER_SUITE_NAMES,
            &suite_known,
        ),
        (
            "ecdh_curves",
            curves,
            crate::tls::ECDH_CURVE_NAMES,
            &crate::tls::is_ecdh_curve,
        ),
    ];
    for (key, names, known, valid) in lists {
        for (i, name) in names.iter().enumerate() {
            let (what, help) = if !valid(name) {
                (
                    format!("`{name}` is not one Legate has"),
                    format!("use {known}"),
                )
            } else if names[..i].contains(name) {
                (
                    format!("`{name}` is listed twice"),
                    "remove this entry".to_string(),
                )
            } else {
                continue;
            };
            e.at(loc, format!("{owner}: `tls.{key}[{i}]`: {what}"), help)
                .key("tls")
                .key(key)
                .index(i);
        }
    }
    let tls13 = suites
        .iter()
        .any(|n| crate::tls::cipher_suite_is_tls13(n) == Some(true));
    if needs_tls13 && !suites.is_empty() && !tls13 {
        e.at(
            loc,
            format!(
                "{owner}: `tls.cipher_suites` has no TLS 1.3 suite, but `min_version` is \"1.3\""
            ),
            "add TLS_AES_128_GCM_SHA256 (or another TLS 1.3 suite), or lower `min_version`",
        )
        .key("tls")
        .key("cipher_suites");
    }
}

/// `t` (`what`, as the message names it; placed under `loc` by `placed`) has exactly one of `exact`,
/// `prefix` and `regex`, and its regex compiles.
fn validate_string_match(
    e: &mut Issues,
    loc: &Location,
    what: &str,
    t: &StringMatch,
    placed: &dyn Fn(&mut Issue),
) {
    let n = [t.exact.is_some(), t.prefix.is_some(), t.regex.is_some()]
        .iter()
        .filter(|x| **x)
        .count();
    if n != 1 {
        placed(e.at(
            loc,
            format!("{what} needs exactly one of `exact`, `prefix` and `regex`"),
            if n == 0 {
                "add `exact: VALUE`, `prefix: VALUE` or `regex: PATTERN`"
            } else {
                "keep one of them"
            },
        ));
    }
    if let Some(re) = &t.regex {
        if let Some(issue) = anchored_regex_issue(e, loc, re) {
            placed(issue);
            issue.key("regex");
        }
    }
}

fn validate_retry(e: &mut Issues, loc: &Location, rp: &RetryPolicy) {
    let wants_codes = rp.retry_on.contains(&RetryOn::RetriableStatusCodes);
    if rp.retry_on.is_empty() {
        e.at(
            loc,
            "`retry.retry_on` is empty, so nothing is retried",
            "list conditions such as `[5xx, connect-failure, reset]`, or remove `retry`",
        )
        .key("retry")
        .key("retry_on");
    }
    if wants_codes && rp.retriable_status_codes.is_empty() {
        let at = rp
            .retry_on
            .iter()
            .position(|r| *r == RetryOn::RetriableStatusCodes)
            .unwrap_or_default();
        e.at(
            loc,
            "`retry_on` has `retriable-status-codes` but no `retriable_status_codes` are listed",
            "list the statuses to retry, e.g. `retriable_status_codes: [409]`",
        )
        .key("retry")
        .key("retry_on")
        .index(at);
    }
    if !wants_codes && !rp.retriable_status_codes.is_empty() {
        e.at(
            loc,
            "`retriable_status_codes` has no effect without `retriable-status-codes` in `retry_on`",
            "add `retriable-status-codes` to `retry_on`",
        )
        .key("retry")
        .key("retriable_status_codes");
    }
    for (i, code) in rp.retriable_status_codes.iter().enumerate() {
        if !(100..=599).contains(code) {
            e.at(
                loc,
                format!("retriable status {code} is not an HTTP status"),
                "statuses are from 100 to 599",
            )
            .key("retry")
            .key("retriable_status_codes")
            .index(i);
        }
    }
    if u64::from(rp.num_retries) > crate::overrides::MAX_RETRIES_ALLOWED {
        e.at(
            loc,
            format!("num_retries {} is more than 10", rp.num_retries),
            "retry storms hurt a failing upstream; use a small number (the default is 1)",
        )
        .key("retry")
        .key("num_retries");
    }
    if rp.backoff_base.0.is_zero() {
        e.at(
            loc,
            "`retry.backoff_base` is zero",
            "retrying at once hammers a failing upstream; the default is 25ms",
        )
        .key("retry")
        .key("backoff_base");
    }
    if let Some(max) = rp.backoff_max {
        if max < rp.backoff_base {
            e.at(
                loc,
                format!(
                    "backoff_max {max} is shorter than backoff_base {}",
                    rp.backoff_base
                ),
                "backoff_max caps the doubling backoff; make it at least backoff_base",
            )
            .key("retry")
            .key("backoff_max");
        }
    }
}

fn validate_discovery(e: &mut Issues, loc: &Location, c: &Cluster) {
    let d = &c.discovery;
    match (d.kind, &d.path) {
        (DiscoveryType::File, None) => {
            e.at(
                loc,
                format!(
                    "cluster `{}` has `discovery.type: file` without a `path`",
                    c.name
                ),
                "add `path: endpoints.yaml` (relative to this config file)",
            )
            .key("discovery");
        }
        (DiscoveryType::Static | DiscoveryType::Dns, Some(_)) => {
            e.at(
                loc,
                format!(
                    "cluster `{}` has `discovery.path` but its discovery type is not `file`",
                    c.name
                ),
                "set `type: file`, or remove `path`",
            )
            .key("discovery")
            .key("path");
        }
        _ => {}
    }
    if d.kind != DiscoveryType::Dns && !d.dns_resolvers.is_empty() {
        e.at(
            loc,
            format!(
                "cluster `{}` has `discovery.dns_resolvers` but its discovery type is not `dns`",
                c.name
            ),
            "set `type: dns`, or remove `dns_resolvers`",
        )
        .key("discovery")
        .key("dns_resolvers");
    }
    for r in &d.dns_resolvers {
        if crate::cluster::dns::parse_server(&r.value).is_none() {
            e.at(
                &r.referenced,
                format!("DNS resolver `{}` is not an IP address", r.value),
                "write it like `10.0.0.2`, `10.0.0.2:53` or `[2001:db8::53]:53`",
            );
        }
    }
    if let Some(rr) = &d.dns_failure_refresh_rate {
        if d.kind != DiscoveryType::Dns {
            e.at(
                loc,
                format!(
                    "cluster `{}` has `discovery.dns_failure_refresh_rate` but its discovery \
                     type is not `dns`",
                    c.name
                ),
                "set `type: dns`, or remove `dns_failure_refresh_rate`",
            )
            .key("discovery")
            .key("dns_failure_refresh_rate");
        }
        if rr.base_interval.get().is_zero() {
            e.at(
                loc,
                format!(
                    "cluster `{}`: `discovery.dns_failure_refresh_rate.base_interval` is 0",
                    c.name
                ),
                "asking again at once hammers a failing name server; use a positive \
                 duration such as `1s`",
            )
            .key("discovery")
            .key("dns_failure_refresh_rate")
            .key("base_interval");
        }
        if let Some(max) = rr.max_interval {
            if max < rr.base_interval {
                e.at(
                    loc,
                    format!(
                        "cluster `{}`: `discovery.dns_failure_refresh_rate.max_interval` {max} \
                         is shorter than `base_interval` {}",
                        c.name, rr.base_interval
                    ),
                    "max_interval caps the doubling wait; make it at least base_interval \
                     (or leave it out: it defaults to 10 × base_interval)",
                )
                .key("discovery")
                .key("dns_failure_refresh_rate")
                .key("max_interval");
            }
        }
    }
    for (what, d) in [
        ("dns_refresh_rate", d.dns_refresh_rate),
        ("dns_timeout", d.dns_timeout),
        ("initial_fetch_timeout", d.initial_fetch_timeout),
        ("watch_interval", d.watch_interval),
    ] {
        if d.get().is_zero() {
            e.at(
                loc,
                format!("cluster `{}`: `discovery.{what}` is 0", c.name),
                "use a positive duration such as `1s`",
            )
            .key("discovery")
            .key(what);
        }
    }
}

fn validate_cluster(e: &mut Issues, c: &Spanned<Cluster>) {
    let loc = &c.referenced;
    let c = &c.value;
    if let Some(pp) = &c.proxy_protocol {
        if !matches!(pp.version, 1 | 2) {
            e.at(
                loc,
                format!(
                    "cluster `{}`: `proxy_protocol.version` {} is neither 1 nor 2",
                    c.name, pp.version
                ),
                "1 is the text header, 2 the binary one; use what the upstream reads",
            )
            .key("proxy_protocol")
            .key("version");
        }
    }
    if c.original_dst {
        if !c.endpoints.is_empty() {
            e.at(
                loc,
                format!(
                    "cluster `{}` is `original_dst` and also lists endpoints",
                    c.name
                ),
                "remove the endpoints: each connection's original destination is its endpoint",
            )
            .key("endpoints");
        }
        if c.discovery.kind != DiscoveryType::Static {
            e.at(
                loc,
                format!(
                    "cluster `{}` is `original_dst` and also has `discovery`",
                    c.name
                ),
                "remove `discovery`: each connection's original destination is its endpoint",
            )
            .key("discovery");
        }
    } else if c.discovery.kind == DiscoveryType::File {
        if !c.endpoints.is_empty() {
            e.at(
                loc,
                format!(
                    "cluster `{}` takes its endpoints from a file and also lists endpoints",
                    c.name
                ),
                "move the endpoints into the `discovery.path` file, or drop `discovery`",
            )
            .key("endpoints");
        }
    } else if c.endpoints.is_empty() {
        e.at(
            loc,
            format!("cluster `{}` has no endpoints", c.name),
            "add `endpoints: [{ address: HOST:PORT }]`, or set `original_dst: true` for a \
             transparent sidecar",
        )
        .key("endpoints");
    }
    for ep in &c.endpoints {
        if let Err((why, help)) = parse_host_port(&ep.value.address) {
            e.at(&ep.referenced, why, help).key("address");
        }
        if ep.value.weight == 0 {
            e.at(
                &ep.referenced,
                format!(
                    "endpoint `{}` of cluster `{}` has weight 0",
                    ep.value.address, c.name
                ),
                "weights are at least 1; remove the endpoint to send it nothing",
            )
            .key("weight");
        }
        if let Some(own) = &ep.value.health_check {
            validate_endpoint_health_check(e, &ep.referenced, c, &ep.value.address, own);
        }
    }
    validate_discovery(e, loc, c);
    match (c.lb_policy, &c.hash_on) {
        (LbPolicy::RingHash, None) => {
            e.at(
                loc,
                format!("cluster `{}` uses ring_hash without `hash_on`", c.name),
                "add `hash_on: { header: x-user-id }`, `{ cookie: NAME }` or `{ source_ip: true }`",
            )
            .key("lb_policy");
        }
        (LbPolicy::RingHash, Some(h)) => {
            let n = [h.header.is_some(), h.cookie.is_some(), h.source_ip]
                .iter()
                .filter(|x| **x)
                .count();
            if n != 1 {
                e.at(
                    loc,
                    format!(
                        "cluster `{}`: `hash_on` needs exactly one of `header`, `cookie` and `source_ip`",
                        c.name
                    ),
                    if n == 0 {
                        "add `header: NAME`, `cookie: NAME` or `source_ip: true`"
                    } else {
                        "keep one of them: the ring hashes a single key"
                    },
                )
                .key("hash_on");
            }
            if let Some(name) = &h.cookie {
                // RFC 6265 §4.1.1: cookie-name is a token.
                if name.is_empty() || !name.bytes().all(legate_abi_rules::headers::is_tchar) {
                    e.at(
                        loc,
                        format!("`{name}` is not a valid cookie name"),
                        "cookie names are tokens such as `session` (no spaces, `=`, `;` or quotes)",
                    )
                    .key("hash_on")
                    .key("cookie");
                }
            }
            if h.cookie.is_none() {
                for (key, set) in [
                    ("cookie_ttl", h.cookie_ttl.is_some()),
                    ("cookie_path", h.cookie_path.is_some()),
                    ("cookie_secure", h.cookie_secure),
                    ("cookie_same_site", h.cookie_same_site.is_some()),
                ] {
                    if set {
                        e.at(
                            loc,
                            format!("cluster `{}`: `hash_on.{key}` needs `cookie`", c.name),
                            "it is about the cookie Legate makes: add `cookie: NAME`, or remove it",
                        )
                        .key("hash_on")
                        .key(key);
                    }
                }
            }
            if h.cookie_same_site == Some(crate::config::SameSite::None) && !h.cookie_secure {
                e.at(
                    loc,
                    format!(
                        "cluster `{}`: `hash_on.cookie_same_site: none` without `cookie_secure: true`",
                        c.name
                    ),
                    "browsers drop a `SameSite=None` cookie that is not `Secure`: add \
                     `cookie_secure: true` (the site must be served over HTTPS), or use `lax`",
                )
                .key("hash_on")
                .key("cookie_same_site");
            }
            if let Some(path) = &h.cookie_path {
                // A cookie attribute value: no control byte or `;` (RFC 6265 §4.1.1).
                if !path.starts_with('/')
                    || path.bytes().any(|b| b < 0x20 || b == 0x7f || b == b';')
                {
                    e.at(
                        loc,
                        format!("`{path}` is not a cookie path"),
                        "give a path starting with `/`, without `;` or control characters",
                    )
                    .key("hash_on")
                    .key("cookie_path");
                }
            }
            if let Some(name) = &h.header {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    e.at(
                        loc,
                        format!("`{name}` is not a valid header name"),
                        "header names are tokens such as `x-user-id`",
                    )
                    .key("hash_on")
                    .key("header");
                }
            }
        }
        (_, Some(_)) => {
            e.at(
                loc,
                format!(
                    "cluster `{}`: `hash_on` is only used by `lb_policy: ring_hash`",
                    c.name
                ),
                "remove `hash_on`, or set `lb_policy: ring_hash`",
            )
            .key("hash_on");
        }
        _ => {}
    }
    if c.protocol == UpstreamProtocol::Auto && c.tls.is_none() {
        e.at(
            loc,
            format!(
                "cluster `{}`: `protocol: auto` picks the protocol by ALPN, which needs `tls`",
                c.name
            ),
            "add `tls:`, or choose `http1` or `h2` (h2c)",
        )
        .key("protocol");
    }
    if let Some(tls) = &c.tls {
        match (&tls.client_cert, &tls.client_key) {
            (Some(_), None) => {
                e.at(
                    loc,
                    format!(
                        "cluster `{}`: `tls.client_cert` without `client_key`",
                        c.name
                    ),
                    "a client certificate needs its private key; add `client_key: FILE`",
                )
                .key("tls")
                .key("client_cert");
            }
            (None, Some(_)) => {
                e.at(
                    loc,
                    format!(
                        "cluster `{}`: `tls.client_key` without `client_cert`",
                        c.name
                    ),
                    "add `client_cert: FILE`, or remove `client_key`",
                )
                .key("tls")
                .key("client_key");
            }
            _ => {}
        }
        if tls.key_password_file.is_some() && tls.client_key.is_none() {
            e.at(
                loc,
                format!(
                    "cluster `{}`: `tls.key_password_file` without `client_key`",
                    c.name
                ),
                "the password is of an encrypted `client_key`: add `client_cert` and \
                 `client_key`, or remove `key_password_file`",
            )
            .key("tls")
            .key("key_password_file");
        }
        let owner = format!("cluster `{}`", c.name);
        validate_tls_params(e, loc, &owner, &tls.cipher_suites, &tls.ecdh_curves, false);
        if tls.crl.is_some() && tls.ca.is_none() {
            e.at(
                loc,
                format!("cluster `{}`: `tls.crl` without `tls.ca`", c.name),
                "a CRL is checked with the CA that issued it; without `ca` the Mozilla roots \
                 are trusted, and a certificate of any CA the file has no CRL for would be \
                 refused. Add `ca: FILE` (the CA the CRL is from), or remove `crl`",
            )
            .key("tls")
            .key("crl");
        }
        for (i, san) in tls.match_subject_alt_names.iter().enumerate() {
            match (&san.uri, &san.dns) {
                (Some(t), None) | (None, Some(t)) => {
                    let kind = if san.uri.is_some() { "uri" } else { "dns" };
                    let what = format!(
                        "cluster `{}`: `tls.match_subject_alt_names[{i}].{kind}`",
                        c.name
                    );
                    validate_string_match(e, loc, &what, t, &|issue| {
                        issue
                            .key("tls")
                            .key("match_subject_alt_names")
                            .index(i)
                            .key(kind);
                    });
                }
                (uri, _) => {
                    e.at(
                        loc,
                        format!(
                            "cluster `{}`: `tls.match_subject_alt_names[{i}]` needs exactly one \
                             of `uri` and `dns`",
                            c.name
                        ),
                        if uri.is_some() {
                            "one entry matches one kind of name; put `dns` in an entry of its own"
                        } else {
                            "add `uri: { exact: spiffe://... }` or `dns: { exact: NAME }`"
                        },
                    )
                    .key("tls")
                    .key("match_subject_alt_names")
                    .index(i);
                }
            }
        }
        if tls.only_verify_leaf_cert_crl && tls.crl.is_none() {
            e.at(
                loc,
                format!(
                    "cluster `{}`: `tls.only_verify_leaf_cert_crl` without `crl`",
                    c.name
                ),
                "it chooses which certificates `crl` is checked against; add `crl: FILE`, or \
                 remove it",
            )
            .key("tls")
            .key("only_verify_leaf_cert_crl");
        }
        if let Some(sni) = &tls.sni {
            if rustls_pki_types::ServerName::try_from(sni.as_str()).is_err() {
                e.at(
                    loc,
                    format!(
                        "cluster `{}`: `tls.sni` `{sni}` is not a DNS name or IP address",
                        c.name
                    ),
                    "write a host name such as `api.example.com`, without port or scheme",
                )
                .key("tls")
                .key("sni");
            }
        }
    }
    if c.connect_timeout.0.is_zero() {
        e.at(
            loc,
            format!("cluster `{}`: `connect_timeout` is zero", c.name),
            "no connection can be made in no time; the default is 5s",
        )
        .key("connect_timeout");
    }
    if c.max_concurrent_streams == 0 || c.max_concurrent_streams > MAX_STREAMS {
        e.at(
            loc,
            format!(
                "cluster `{}`: `max_concurrent_streams` {} is not between 1 and {MAX_STREAMS}",
                c.name, c.max_concurrent_streams
            ),
            "the streams one HTTP/2 connection carries before another is opened; the default is 100",
        )
        .key("max_concurrent_streams");
    }
    for (key, w) in h2_windows(
        c.initial_stream_window_size,
        c.initial_connection_window_size,
    ) {
        e.at(
            loc,
            format!("cluster `{}`: {}", c.name, window_range_error(key, w)),
            WINDOW_HINT,
        )
        .key(key);
    }
    if let Some(k) = &c.connection_keepalive {
        keepalive_issues(e, loc, &format!("cluster `{}`", c.name), &[], k);
    }
    validate_resilience(e, loc, c);
}

/// The problems of `connection_keepalive` `k`, of `whose` (a cluster or a
/// listener), under keys `under` of the item at `loc`: a zero interval or
/// timeout.
fn keepalive_issues(
    e: &mut Issues,
    loc: &Location,
    whose: &str,
    under: &[&'static str],
    k: &super::ConnectionKeepalive,
) {
    let path: String = under.iter().map(|k| format!("{k}.")).collect();
    for (key, d) in [("interval", k.interval), ("timeout", k.timeout)] {
        if d.0.is_zero() {
            let issue = e.at(
                loc,
                format!("{whose}: `{path}connection_keepalive.{key}` is zero"),
                "PINGs need an interval and an answer some time to come; leave \
                 `connection_keepalive` out for no PINGs",
            );
            for k in under {
                issue.key(k);
            }
            issue.key("connection_keepalive").key(key);
        }
    }
}

/// The problems of an endpoint file's entry (at `loc`) with its own `health_check`,
/// for cluster `c`: the same checks and messages as for a configured endpoint.
pub(super) fn endpoint_health_check_issues(
    loc: &Location,
    c: &Cluster,
    address: &str,
    own: &EndpointHealthCheck,
) -> Vec<Issue> {
    let mut e = Issues::default();
    validate_endpoint_health_check(&mut e, loc, c, address, own);
    e.0
}

/// An endpoint's own `health_check` (at `loc`, the endpoint): it adjusts the
/// cluster's checks, so it needs them, and its `host` needs an HTTP check.
fn validate_endpoint_health_check(
    e: &mut Issues,
    loc: &Location,
    c: &Cluster,
    address: &str,
    own: &EndpointHealthCheck,
) {
    let name = &c.name;
    let Some(hc) = &c.health_check else {
        e.at(
            loc,
            format!(
                "endpoint `{address}` of cluster `{name}` has `health_check`, but the cluster \
                 has no `health_check`"
            ),
            "an endpoint's `health_check` only changes how the cluster's checks reach it; \
             add `health_check` to the cluster, or remove it from the endpoint",
        )
        .key("health_check");
        return;
    };
    if let Some(host) = &own.host {
        if hc.http.is_none() && hc.grpc.is_none() {
            e.at(
                loc,
                format!(
                    "endpoint `{address}` of cluster `{name}`: `health_check.host` without an \
                     HTTP or gRPC check"
                ),
                "the cluster's checks send no Host; remove `host`, or check with \
                 `http: { path: /healthz }`",
            )
            .key("health_check")
            .key("host");
        } else if http::uri::Authority::try_from(host.as_str()).is_err() {
            e.at(
                loc,
                format!(
                    "endpoint `{address}` of cluster `{name}`: health check host `{host}` is not \
                     a valid authority"
                ),
                "write a host name, optionally with a port: `api.internal`",
            )
            .key("health_check")
            .key("host");
        }
    }
    if own.port == Some(0) {
        e.at(
            loc,
            format!("endpoint `{address}` of cluster `{name}`: health check port 0"),
            "write the port the endpoint answers its checks on, from 1 to 65535, or remove \
             `port` to check the endpoint's own",
        )
        .key("health_check")
        .key("port");
    }
}

/// `health_check`, `outlier_detection`, `panic_threshold`, `circuit_breakers`.
fn validate_resilience(e: &mut Issues, loc: &Location, c: &Cluster) {
    let name = &c.name;
    let percent = |e: &mut Issues, p: Percent, path: &[&str]| {
        if !(0.0..=100.0).contains(&p.0) {
            let issue = e.at(
                loc,
                format!(
                    "cluster `{name}`: `{}` {p} is not between 0% and 100%",
                    path.join(".")
                ),
                "write a percentage from `0%` to `100%`",
            );
            for k in path {
                issue.key(k);
            }
        }
    };
    percent(e, c.panic_threshold, &["panic_threshold"]);
    if c.overprovisioning_factor < 100 {
        e.at(
            loc,
            format!(
                "cluster `{name}`: `overprovisioning_factor` {} is below 100",
                c.overprovisioning_factor
            ),
            "write 100 or more (it is in percent): 100 means no headroom, a priority level \
             spills traffic to the next as soon as one of its endpoints goes; Envoy's \
             default 140 lets a level lose 28% of its endpoints first",
        )
        .key("overprovisioning_factor");
    }
    if let Some(ac) = &c.adaptive_concurrency {
        percent(e, ac.jitter, &["adaptive_concurrency", "jitter"]);
        percent(e, ac.buffer, &["adaptive_concurrency", "buffer"]);
    }
    if let Some(hc) = &c.health_check {
        if c.original_dst {
            e.at(
                loc,
                format!("cluster `{name}`: `health_check` on an `original_dst` cluster"),
                "an original-destination cluster has no endpoints to check; remove `health_check`",
            )
            .key("health_check");
        }
        let kinds = [hc.http.is_some(), hc.tcp.is_some(), hc.grpc.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            e.at(
                loc,
                format!(
                    "cluster `{name}`: `health_check` needs exactly one of `http`, `tcp` and `grpc`"
                ),
                "write `http: { path: /healthz }`, `tcp: {}` or `grpc: {}`",
            )
            .key("health_check");
        }
        if let Some(g) = &hc.grpc {
            if c.protocol == crate::config::UpstreamProtocol::Http1 {
                e.at(
                    loc,
                    format!("cluster `{name}`: a `grpc` health check on an HTTP/1.1 cluster"),
                    "gRPC runs over HTTP/2: set the cluster's `protocol: h2` (or `auto` with `tls`)",
                )
                .key("health_check")
                .key("grpc");
            }
            if let Some(a) = &g.authority {
                if http::uri::Authority::try_from(a.as_str()).is_err() {
                    e.at(
                        loc,
                        format!("cluster `{name}`: health check authority `{a}` is not valid"),
                        "write a host name, optionally with a port: `api.internal`",
                    )
                    .key("health_check")
                    .key("grpc")
                    .key("authority");
                }
            }
        }
        for (key, d) in [("interval", hc.interval), ("timeout", hc.timeout)] {
            if d.0.is_zero() {
                e.at(
                    loc,
                    format!("cluster `{name}`: `health_check.{key}` is zero"),
                    "checks need time between them and time to answer; the defaults are 5s and 1s",
                )
                .key("health_check")
                .key(key);
            }
        }
        for (key, n) in [
            ("healthy_threshold", hc.healthy_threshold),
            ("unhealthy_threshold", hc.unhealthy_threshold),
        ] {
            if n == 0 {
                e.at(
                    loc,
                    format!("cluster `{name}`: `health_check.{key}` is 0"),
                    "a state changes after at least one check; use 1 or more",
                )
                .key("health_check")
                .key(key);
            }
        }
        if let Some(http) = &hc.http {
            if !http.path.starts_with('/') || http.path.parse::<http::uri::PathAndQuery>().is_err()
            {
                e.at(
                    loc,
                    format!(
                        "cluster `{name}`: health check path `{}` is not a valid path",
                        http.path
                    ),
                    "write an absolute path such as `/healthz`",
                )
                .key("health_check")
                .key("http")
                .key("path");
            }
            if let Some(host) = &http.host {
                if http::uri::Authority::try_from(host.as_str()).is_err() {
                    e.at(
                        loc,
                        format!(
                            "cluster `{name}`: health check host `{host}` is not a valid authority"
                        ),
                        "write a host name, optionally with a port: `api.internal`",
                    )
                    .key("health_check")
                    .key("http")
                    .key("host");
                }
            }
            if http.expected_statuses.is_empty() {
                e.at(
                    loc,
                    format!("cluster `{name}`: `expected_statuses` is empty, so no check can pass"),
                    "list statuses or ranges, e.g. `[200, \"300-399\"]`, or remove the key (default `[200]`)",
                )
                .key("health_check")
                .key("http")
                .key("expected_statuses");
            }
            for (i, r) in http.expected_statuses.iter().enumerate() {
                if !r.is_valid() {
                    e.at(
                        loc,
                        format!("cluster `{name}`: expected status `{r}` is not a status or a rising range of statuses"),
                        "statuses are from 100 to 599; write a range low to high, like `\"200-299\"`",
                    )
                    .key("health_check")
                    .key("http")
                    .key("expected_statuses")
                    .index(i);
                }
            }
        }
        if let Some(tcp) = &hc.tcp {
            for (key, p) in [("send", &tcp.send), ("expect", &tcp.expect)] {
                let Some(p) = p else { continue };
                let problem = match (&p.text, &p.hex) {
                    (Some(_), Some(_)) | (None, None) => {
                        Some("needs exactly one of `text` and `hex`".to_string())
                    }
                    (None, Some(h)) if decode_hex(h).is_none() => {
                        Some(format!("`hex` `{h}` is not an even number of hex digits"))
                    }
                    (Some(t), None) if t.is_empty() => Some("`text` is empty".to_string()),
                    _ => None,
                };
                if let Some(problem) = problem {
                    e.at(
                        loc,
                        format!("cluster `{name}`: health check `tcp.{key}` {problem}"),
                        "write `{ text: \"PING\\r\\n\" }` or `{ hex: \"50494e47\" }`",
                    )
                    .key("health_check")
                    .key("tcp")
                    .key(key);
                }
            }
        }
    }
    if let Some(od) = &c.outlier_detection {
        for (key, d) in [
            ("interval", od.interval),
            ("base_ejection_time", od.base_ejection_time),
        ] {
            if d.0.is_zero() {
                e.at(
                    loc,
                    format!("cluster `{name}`: `outlier_detection.{key}` is zero"),
                    "the defaults are 10s and 30s",
                )
                .key("outlier_detection")
                .key(key);
            }
        }
        if let Some(max) = od.max_ejection_time.filter(|m| *m < od.base_ejection_time) {
            e.at(
                loc,
                format!(
                    "cluster `{name}`: `max_ejection_time` {} is shorter than `base_ejection_time` {}",
                    max, od.base_ejection_time
                ),
                "max_ejection_time caps the growing ejection time; make it at least base_ejection_time",
            )
            .key("outlier_detection")
            .key("max_ejection_time");
        }
        percent(
            e,
            od.max_ejection_percent,
            &["outlier_detection", "max_ejection_percent"],
        );
        if let Some(sr) = &od.success_rate {
            if !(sr.stdev_factor.is_finite() && sr.stdev_factor > 0.0) {
                e.at(
                    loc,
                    format!(
                        "cluster `{name}`: `success_rate.stdev_factor` {} is not a positive number",
                        sr.stdev_factor
                    ),
                    "the default is 1.9: eject below the mean minus 1.9 standard deviations",
                )
                .key("outlier_detection")
                .key("success_rate")
                .key("stdev_factor");
            }
            if sr.minimum_hosts == 0 || sr.request_volume == 0 {
                e.at(
                    loc,
                    format!("cluster `{name}`: `success_rate` needs `minimum_hosts` and `request_volume` of at least 1"),
                    "the defaults are 5 hosts and 100 requests per interval",
                )
                .key("outlier_detection")
                .key("success_rate");
            }
        }
    }
    let cb = &c.circuit_breakers;
    for (key, n) in [
        ("max_connections", cb.max_connections),
        ("max_pending_requests", cb.max_pending_requests),
        ("max_requests", cb.max_requests),
    ] {
        if n == 0 {
            e.at(
                loc,
                format!("cluster `{name}`: `circuit_breakers.{key}` is 0, so every request would be refused"),
                "use at least 1; the default is 1024",
            )
            .key("circuit_breakers")
            .key(key);
        }
    }
    if let Some(b) = &cb.retry_budget {
        percent(
            e,
            b.percent,
            &["circuit_breakers", "retry_budget", "percent"],
        );
    }
}

/// Splits `host:port`, `ip:port` or `[v6]:port`.
pub(crate) fn split_host_port(s: &str) -> Result<(String, u16), String> {
    parse_host_port(s).map_err(|(msg, _)| msg)
}

/// The help for an endpoint address of the usual kind of mistake.
const ENDPOINT_FORMS: &str = "write it like `10.0.0.5:8080`, `[2001:db8::5]:8080` or \
                              `app.internal:8080`";

/// [`split_host_port`], the error with its help: the host must be an IPv4
/// address, an IPv6 address in brackets, or a DNS name (letters, digits, `-`,
/// `_`, dot-separated labels), as nginx refuses an `invalid host in upstream`.
fn parse_host_port(s: &str) -> Result<(String, u16), (String, &'static str)> {
    let bad = |why: &str| format!("endpoint address `{s}` is not `host:port`: {why}");
    if let Some((scheme, _)) = s.split_once("://") {
        return Err((
            bad(&format!("`{scheme}://` is a URL scheme")),
            "write only the host and port, without scheme or path: `app.internal:8080` (the \
             cluster's `tls` says whether Legate speaks TLS to it)",
        ));
    }
    if s.contains(|c: char| c.is_whitespace() || c.is_control() || c == '/') {
        return Err((
            bad("it contains a space or `/`"),
            "write only the host and port, without scheme or path: `app.internal:8080`",
        ));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (ip, port) = rest.split_once("]:").ok_or_else(|| {
            (
                bad("an IPv6 address needs the form `[addr]:port`"),
                ENDPOINT_FORMS,
            )
        })?;
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err((
                bad(&format!("`{ip}` in brackets is not an IPv6 address")),
                ENDPOINT_FORMS,
            ));
        }
        (ip, port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| (bad("the port is missing"), ENDPOINT_FORMS))?;
        if host.contains(':') || s.parse::<std::net::Ipv6Addr>().is_ok() {
            return Err((
                bad("an IPv6 address must be in brackets"),
                "write `[2001:db8::5]:8080`: the port follows the `]`",
            ));
        }
        (host, port)
    };
    let port: u16 = port.parse().map_err(|_| {
        (
            bad("the port is not a number from 1 to 65535"),
            ENDPOINT_FORMS,
        )
    })?;
    if host.is_empty() {
        return Err((bad("the host is missing"), ENDPOINT_FORMS));
    }
    if port == 0 {
        return Err((bad("port 0 cannot be connected to"), ENDPOINT_FORMS));
    }
    if !s.starts_with('[') && host.parse::<std::net::Ipv4Addr>().is_err() {
        if let Some(why) = dns_name_problem(host) {
            return Err((bad(&why), ENDPOINT_FORMS));
        }
    }
    Ok((host.to_string(), port))
}

/// Why `host` (not an IP address) is no DNS name: dot-separated labels of
/// letters, digits, `-` and `_` (container names have it), at most 63 bytes each
/// and 253 in all, one trailing dot allowed; not all digits and dots (a
/// mistyped IPv4 address).
fn dns_name_problem(host: &str) -> Option<String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Some(format!(
            "`{host}` is not a host name: `{c}` is not a letter, digit, `-`, `_` or `.`"
        ));
    }
    if name.is_empty() || name.split('.').any(str::is_empty) {
        return Some(format!(
            "`{host}` is not a host name: it has an empty label"
        ));
    }
    if name.len() > 253 || name.split('.').any(|l| l.len() > 63) {
        return Some(format!(
            "`{host}` is not a host name: longer than 253 bytes, or a label longer than 63"
        ));
    }
    if name.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Some(format!("`{host}` is not an IPv4 address"));
    }
    None
}

/// A domain pattern as the router keys it: lower-cased, and one trailing dot of
/// its host (`api.example.com.`, `api.example.com.:8443`) dropped, as the router
/// drops it from a request's host. Two patterns with the same key are the same
/// domain.
pub(crate) fn normalize_domain(d: &str) -> String {
    let lower = d.to_ascii_lowercase();
    let (host, port) = crate::router::split_port(&lower);
    crate::router::undotted(host, port).map_or(lower, |(d, _)| d)
}

/// A virtual host's domain pattern: `*`, `host`, `*.suffix` or `prefix.*`, optionally
/// with `:port`; an IPv6 address in brackets (`[::1]`, `[::1]:8443`).
/// The error is the message and its help.
fn check_domain(d: &str) -> Result<(), (String, &'static str)> {
    if d == "*" {
        return Ok(());
    }
    let msg = |why: &str| format!("domain `{d}` is not a valid host pattern: {why}");
    let bad = |why: &str| {
        Err((
            msg(why),
            "use an exact host (`api.example.com`), `*.suffix`, `prefix.*` or `*`",
        ))
    };
    let bad_port = |why: &str| {
        Err((
            msg(why),
            "write the port as a number from 1 to 65535 (`api.example.com:8443`), or leave it \
             out to match the host on any port",
        ))
    };
    if d.is_empty() {
        return bad("it is empty");
    }
    if d.contains(|c: char| c.is_whitespace() || c.is_control() || c == '/') {
        return bad("it contains a space or `/`; write only the host, without scheme or path");
    }
    // The port, if any: after the `]` of an IPv6 literal, else after the only `:`.
    let port = if let Some(rest) = d.strip_prefix('[') {
        match rest.split_once(']') {
            None => return bad("the `[` of an IPv6 address has no `]`"),
            Some((_, "")) => None,
            Some((_, tail)) => match tail.strip_prefix(':') {
                Some(p) => Some(p),
                None => return bad("only `:port` may follow the `]` of an IPv6 address"),
            },
        }
    } else {
        match d.matches(':').count() {
            0 => None,
            1 => d.rsplit_once(':').map(|(_, p)| p),
            _ => {
                return Err((
                    msg("an IPv6 address must be in brackets, as in a `Host` header"),
                    "write `[2001:db8::1]`, or `[2001:db8::1]:8443` with a port",
                ))
            }
        }
    };
    if let Some(p) = port {
        if p.is_empty() {
            return bad_port("the port after `:` is missing");
        }
        if !p.bytes().all(|b| b.is_ascii_digit()) {
            return bad_port(&format!("port `{p}` is not a number"));
        }
        if !matches!(p.parse::<u32>(), Ok(1..=65535)) {
            return bad_port(&format!("port `{p}` is out of range (1-65535)"));
        }
    }
    match d.matches('*').count() {
        0 => Ok(()),
        1 if (d.starts_with("*.") || d.ends_with(".*")) && d.len() > 2 => Ok(()),
        1 => bad(
            "`*` may only stand for a whole leading or trailing label (`*.example.com`, `api.*`)",
        ),
        _ => bad("only one `*` is allowed"),
    }
}

/// A TLS certificate's SNI name: exact or `*.suffix`.
fn check_server_name(s: &str) -> Result<(), String> {
    let name = s.strip_prefix("*.").unwrap_or(s);
    if name.is_empty() || name.contains('*') || rustls_pki_types::DnsName::try_from(name).is_err() {
        return Err(format!(
            "server name `{s}` is not a DNS name or `*.suffix` wildcard"
        ));
    }
    Ok(())
}

/// Checks a regex as the router compiles it: `anchored` for the ones that
/// must match a whole value, so a pattern that only breaks anchored (a `(?x)`
/// comment running to its end swallows the closing anchor) is refused here,
/// with its place, not when the route table is built.
fn regex_check(e: &mut Issues, re: &Spanned<String>, anchored: bool) {
    if let Some(why) = regex_problem(&re.value, anchored) {
        e.at(
            &re.referenced,
            format!("invalid regex `{}`: {why}", re.value),
            "fix the regular expression (Rust regex syntax, see https://docs.rs/regex)",
        );
    }
}

/// Records the problem of `re`, a pattern the router anchors, at `at`, if it
/// has one; the issue is returned to be placed with its keys.
fn anchored_regex_issue<'e>(e: &'e mut Issues, at: &Location, re: &str) -> Option<&'e mut Issue> {
    let why = regex_problem(re, true)?;
    Some(e.at(
        at,
        format!("invalid regex `{re}`: {why}"),
        "fix the regular expression (Rust regex syntax)",
    ))
}

/// The group references in `substitution` (the regex crate's `$name`,
/// `${name}`; `$$` is a `$`) that `re` has no group for: each expands to
/// nothing, silently. A name is the longest run of letters, digits and `_`
/// after `$` (so `$1x` is group `1x`), a number an index.
fn missing_groups(re: &regex::Regex, substitution: &str) -> Vec<String> {
    let names: Vec<&str> = re.capture_names().flatten().collect();
    let mut missing = Vec::new();
    let mut rest = substitution;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let name = if let Some(braced) = rest.strip_prefix('{') {
            let Some(end) = braced.find('}') else { break };
            rest = &braced[end + 1..];
            &braced[..end]
        } else if let Some(after) = rest.strip_prefix('$') {
            rest = after;
            continue;
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            rest = &rest[end..];
            name
        };
        if name.is_empty() {
            continue;
        }
        let known = match name.parse::<usize>() {
            Ok(i) => i < re.captures_len(),
            Err(_) => names.contains(&name),
        };
        if !known && !missing.iter().any(|m| m == name) {
            missing.push(name.to_owned());
        }
    }
    missing
}

/// What is wrong with pattern `re`, if anything. The pattern alone first (so
/// an error's position is the user's), then, for one the router anchors, the
/// anchored form.
fn regex_problem(re: &str, anchored: bool) -> Option<String> {
    if let Err(x) = regex::Regex::new(re) {
        return Some(regex_error(&x));
    }
    (anchored && regex::Regex::new(&crate::router::anchored(re)).is_err()).then(|| {
        "it must match a whole value, and it cannot be wrapped as `\\A(?:PATTERN)\\z`: \
         a `(?x)` comment runs to the end of its line; end it with a newline (`\\n`)"
            .to_string()
    })
}

/// The regex crate explains a syntax error over several lines (the pattern, a caret
/// line, `error: ...`); a config error is one line, so keep the explanation and turn
/// the caret into a character position.
pub(crate) fn regex_error(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let what = lines
                .iter()
                .rev()
                .find_map(|l| l.strip_prefix("error: "))
                .unwrap_or(text.as_str())
                .trim();
            // Layout: "regex parse error:", "    PATTERN", "    ^^^", "error: ...".
            let caret = match lines.as_slice() {
                [_, _, marks, _] => marks.find('^').map(|i| i.saturating_sub(4) + 1),
                _ => None,
            };
            match caret {
                Some(at) => format!("{what} (at character {at})"),
                None => what.to_string(),
            }
        }
        regex::Error::CompiledTooBig(limit) => {
            format!("the compiled regex is larger than the {limit}-byte limit")
        }
        other => other.to_string().replace('\n', " "),
    }
}

fn header_ops(e: &mut Issues, ops: &HeaderOps, owner: &Location, key: &str) {
    for (op, map) in [("add", &ops.add), ("set", &ops.set)] {
        for (k, v) in &map.value {
            // A default (absent) map has no location: point at the owner's key instead.
            let at = |e: &mut Issues, msg: String, help: &str| {
                if map.referenced.line() == 0 {
                    e.at(owner, msg, help).key(key).key(op).key(k);
                } else {
                    e.at(&map.referenced, msg, help).key(k);
                }
            };
            if k.starts_with(':') || http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                at(
                    e,
                    format!("`{k}` is not a valid header name"),
                    "header names are tokens such as `x-env`: letters, digits and `!#$%&'*+-.^_|~`",
                );
            } else if is_hop_by_hop(k) {
                at(
                    e,
                    format!("header `{k}` cannot be changed by config"),
                    "hop-by-hop headers, `host` and `content-length` are managed by the proxy",
                );
            }
            if http::HeaderValue::from_str(v).is_err() {
                at(
                    e,
                    format!("the value of `{k}` is not a valid header value"),
                    "use printable ASCII without line breaks",
                );
            } else if key == "request_headers" {
                // Request values may have operators (`%DOWNSTREAM_REMOTE_ADDRESS%`).
                if let Err((msg, help)) = crate::access_log::format::header_value(v) {
                    at(e, format!("the value of `{k}`: {msg}"), &help);
                }
            }
        }
    }
    for (i, k) in ops.remove.value.iter().enumerate() {
        if k.starts_with(':') || http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            e.at(
                &ops.remove.referenced,
                format!("`{k}` is not a valid header name"),
                "header names are tokens such as `x-env`",
            )
            .index(i);
        }
    }
}

/// What is wrong with `t` as an upgrade type (an `Upgrade:` protocol, RFC 9110
/// §7.8: `name[/version]`, both tokens), if anything.
fn upgrade_type_problem(t: &str) -> Option<(String, String)> {
    let is_token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let valid = match t.split_once('/') {
        Some((name, version)) => is_token(name) && is_token(version),
        None => is_token(t),
    };
    if !valid {
        return Some((
            format!("`{t}` is not a valid upgrade type"),
            "an upgrade type is an `Upgrade:` protocol such as `websocket` or `spdy/3.1`: a \
             token (letters, digits and `!#$%&'*+-.^_|~`), optionally `/version`"
                .to_string(),
        ));
    }
    if t.eq_ignore_ascii_case("h2c") {
        return Some((
            "`h2c` cannot be tunnelled".to_string(),
            "an `Upgrade: h2c` request is proxied as a plain request with its upgrade headers \
             removed (HTTP/2 to the upstream is the cluster's `protocol: h2`); remove it"
                .to_string(),
        ));
    }
    None
}

/// Headers the proxy owns: connection management (RFC 9110 §7.6.1) and framing.
fn is_hop_by_hop(k: &str) -> bool {
    matches!(
        k.to_ascii_lowercase().as_str(),
        "connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "keep-alive"
            | "proxy-connection"
            | "host"
            | "content-length"
    )
}

fn unique<'a>(e: &mut Issues, what: &str, items: impl Iterator<Item = (&'a Name, &'a Location)>) {
    let mut seen: HashMap<&Name, &Location> = HashMap::new();
    for (name, loc) in items {
        if let Some(first) = seen.get(name) {
            let help = if first.line() == 0 {
                format!("give each {what} a unique name")
            } else {
                format!(
                    "give each {what} a unique name; the first `{name}` starts on line {}",
                    first.line()
                )
            };
            e.at(loc, format!("duplicate {what} name `{name}`"), help)
                .key("name");
        } else {
            seen.insert(name, loc);
        }
    }
}

/// The candidate closest to `word` within edit distance 2 (and less than the word's
/// length, so `ab` does not suggest `xy`); ties go to the first candidate.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        let d = edit_distance(word, c);
        if d <= 2 && d < word.chars().count() && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and
/// transpositions of neighbours each cost 1 (`ahtp` → `http` is 2), case-insensitive.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// The HTTP/2 window keys (stream, then connection) whose value is outside
/// the protocol's range.
fn h2_windows(
    stream: ByteSize,
    connection: Option<ByteSize>,
) -> impl Iterator<Item = (&'static str, ByteSize)> {
    [
        ("initial_stream_window_size", Some(stream)),
        ("initial_connection_window_size", connection),
    ]
    .into_iter()
    .filter_map(|(key, w)| w.map(|w| (key, w)))
    .filter(|(_, w)| !(MIN_H2_WINDOW..=MAX_H2_WINDOW).contains(&w.0))
}

/// What is wrong with an HTTP/2 window `key` of `w` (out of range).
fn window_range_error(key: &str, w: ByteSize) -> String {
    format!(
        "`{key}` {} is not between {MIN_H2_WINDOW} and {MAX_H2_WINDOW} bytes",
        w.0
    )
}

/// How to fix an HTTP/2 window out of range.
const WINDOW_HINT: &str = "an HTTP/2 flow-control window is at least 65535 (the protocol's \
     initial window) and at most 2^31-1 (RFC 9113 §6.9); leave it out for the default";

/// Where one access log is in the file: the top level (`anchor` `None`) or a
/// listener's `access_log`, and its index when the logs are a list.
struct LogAt {
    anchor: Option<Location>,
    index: Option<usize>,
}

/// An issue of the access log at `at`, focused on its `access_log` key (and
/// its list item); refine it with [`Issue::key`].
fn log_issue<'e>(
    e: &'e mut Issues,
    at: &LogAt,
    msg: impl Into<String>,
    help: impl Into<String>,
) -> &'e mut Issue {
    let issue = match &at.anchor {
        Some(loc) => e.at(loc, msg, help),
        None => e.top(msg, help),
    };
    issue.key("access_log");
    if let Some(i) = at.index {
        issue.index(i);
    }
    issue
}

/// The problems of one access log (top level or a listener's): its path,
/// writer settings, format and filter.
fn validate_access_log(e: &mut Issues, at: &LogAt, log: &AccessLog) {
    if log.path.trim().is_empty() {
        log_issue(
            e,
            at,
            "`access_log.path` is empty",
            "use `stdout`, `stderr` or a file path; remove `access_log` for no log",
        )
        .key("path");
    }
    let interval = log.flush_interval.get();
    if !(Duration::from_millis(1)..=Duration::from_secs(60)).contains(&interval) {
        log_issue(
            e,
            at,
            format!(
                "`access_log.flush_interval` is {}, not between 1ms and 1m",
                log.flush_interval
            ),
            "the default is `1s`; a shorter interval makes lines visible sooner at the \
                 cost of more writes",
        )
        .key("flush_interval");
    }
    let limit = log.buffer_limit.0;
    if !((64 << 10)..=(1 << 30)).contains(&limit) {
        log_issue(
            e,
            at,
            format!(
                "`access_log.buffer_limit` is {}, not between 64KiB and 1GiB",
                log.buffer_limit
            ),
            "lines are written in batches of up to 64KiB, so the buffer must hold \
                 at least that; the default is `16MiB`",
        )
        .key("buffer_limit");
    }
    if log.format.is_some() && log.json_format.is_some() {
        log_issue(
            e,
            at,
            "`access_log` has both `format` and `json_format`",
            "a line is either text (`format`) or a JSON object (`json_format`): keep one",
        )
        .key("json_format");
    } else if log.json_format.as_ref().is_some_and(|j| j.0.is_empty()) {
        log_issue(
            e,
            at,
            "`access_log.json_format` has no keys",
            "name the fields each line has, e.g. `status: \"%RESPONSE_CODE%\"`; remove \
                 `json_format` for the default JSON line",
        )
        .key("json_format");
    }
    if let Some(f) = &log.filter {
        for (i, r) in f.statuses.iter().enumerate() {
            if !r.is_valid() {
                log_issue(e, at,
                        format!("`access_log.filter.statuses` entry `{r}` is not a status or a rising range of statuses"),
                        "statuses are from 100 to 599 (a client gone is logged 499); write a \
                         range low to high, like `\"500-599\"`",
                    )
                    .key("filter")
                    .key("statuses")
                    .index(i);
            }
        }
        if !(0.0..=100.0).contains(&f.percent.0) {
            log_issue(
                e,
                at,
                format!(
                    "`access_log.filter.percent` {} is not between 0% and 100%",
                    f.percent
                ),
                "write a percentage from `0%` to `100%` (the default, every line)",
            )
            .key("filter")
            .key("percent");
        }
        for (i, flag) in f.response_flags.iter().flatten().enumerate() {
            if !crate::access_log::format::RESPONSE_FLAGS.contains(&flag.as_str()) {
                log_issue(
                    e,
                    at,
                    format!("`{flag}` is not a response flag Legate logs"),
                    format!(
                        "the flags are {} (docs/config.md, `%RESPONSE_FLAGS%`)",
                        crate::access_log::format::RESPONSE_FLAGS.join(", ")
                    ),
                )
                .key("filter")
                .key("response_flags")
                .index(i);
            }
        }
    }
    let one_format = log.format.is_none() || log.json_format.is_none();
    let has_keys = log.json_format.as_ref().is_none_or(|j| !j.0.is_empty());
    if !(one_format && has_keys) {
        // (Reported above.)
    } else if let Err(err) = crate::access_log::format::parse(log) {
        let issue = log_issue(e, at, err.message, err.help);
        if err.path.is_empty() {
            issue.key("format");
        } else {
            issue.key("json_format");
            for k in &err.path {
                issue.key(k);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("app", "app"), 0);
        assert_eq!(edit_distance("ap", "app"), 1);
        assert_eq!(edit_distance("ahtp", "http"), 2);
        assert_eq!(edit_distance("teh", "the"), 1);
        assert_eq!(edit_distance("API", "api"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggestions() {
        let names = ["backend", "frontend", "db"];
        assert_eq!(did_you_mean("backnd", names), Some("backend"));
        assert_eq!(did_you_mean("fronted", names), Some("frontend"));
        assert_eq!(did_you_mean("cache", names), None);
        // Short words would match anything short; no suggestion.
        assert_eq!(did_you_mean("xy", names), None);
        assert_eq!(did_you_mean("dc", names), Some("db"));
        // The closest wins, not the first within reach.
        assert_eq!(did_you_mean("web-2", ["web-10", "web-1"]), Some("web-1"));
    }

    #[test]
    fn regex_errors_fit_on_one_line() {
        // black_box: keep clippy from rejecting the deliberately broken patterns.
        let e = regex::Regex::new(std::hint::black_box("a(b")).unwrap_err();
        assert_eq!(regex_error(&e), "unclosed group (at character 2)");
        let e = regex::Regex::new(std::hint::black_box("x{2,1}")).unwrap_err();
        let msg = regex_error(&e);
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("invalid repetition"), "{msg}");
    }

    #[test]
    fn endpoint_addresses() {
        assert_eq!(
            split_host_port("a.internal:80").unwrap(),
            ("a.internal".into(), 80)
        );
        assert_eq!(split_host_port("[::1]:8080").unwrap(), ("::1".into(), 8080));
        assert!(split_host_port("a.internal")
            .unwrap_err()
            .contains("port is missing"));
        assert!(split_host_port(":80")
            .unwrap_err()
            .contains("host is missing"));
        assert!(split_host_port("a:0").unwrap_err().contains("port 0"));
        assert!(split_host_port("a:http")
            .unwrap_err()
            .contains("not a number"));
        assert!(split_host_port("[::1]").is_err());
    }

    #[test]
    fn endpoint_hosts_are_ip_literals_or_dns_names() {
        for ok in [
            "10.0.0.5:8080",
            "[2001:db8::5]:8080",
            "app.internal:8080",
            "app.internal.:8080",
            "my_service:80",
            "localhost:1",
        ] {
            assert!(parse_host_port(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("http://localhost:22301", "`http://` is a URL scheme"),
            ("localhost:80/api", "a space or `/`"),
            ("app internal:80", "a space or `/`"),
            ("::1:80", "must be in brackets"),
            ("::1", "must be in brackets"),
            ("2001:db8::5", "must be in brackets"),
            ("[app]:80", "is not an IPv6 address"),
            ("a..b:80", "empty label"),
            ("a@b:80", "`@` is not a letter"),
            ("10.0.0.256:80", "not an IPv4 address"),
        ] {
            let (err, _) = parse_host_port(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let (_, help) = parse_host_port("http://localhost:22301").unwrap_err();
        assert!(help.contains("without scheme"), "{help}");
    }

    #[test]
    fn domain_patterns() {
        for ok in [
            "*",
            "example.com",
            "*.example.com",
            "api.*",
            "example.com:8080",
            "example.com.",
            "example.com.:65535",
            "*.example.com:1",
            "[::1]",
            "[::1]:8443",
        ] {
            assert!(check_domain(ok).is_ok(), "{ok}");
        }
        for bad in ["", "*.", "a.*.b", "*example.com", "**", "http://x", "a b"] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
        for (bad, why) in [
            ("foo:99999", "port `99999` is out of range (1-65535)"),
            ("foo:0", "port `0` is out of range"),
            ("bar:abc", "port `abc` is not a number"),
            ("bar:", "the port after `:` is missing"),
            ("[::1]:x", "port `x` is not a number"),
            ("[::1", "has no `]`"),
            ("[::1]x", "only `:port` may follow"),
            ("::1", "must be in brackets"),
        ] {
            let (err, _) = check_domain(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn domain_keys_drop_case_and_one_trailing_dot() {
        assert_eq!(normalize_domain("API.test."), "api.test");
        assert_eq!(normalize_domain("api.test.:8443"), "api.test:8443");
        assert_eq!(normalize_domain("*.test."), "*.test");
        assert_eq!(normalize_domain("api.test"), "api.test");
        assert_eq!(normalize_domain("a.."), "a..");
        assert_eq!(normalize_domain("*"), "*");
    }

    #[test]
    fn server_names() {
        assert!(check_server_name("api.example.com").is_ok());
        assert!(check_server_name("*.example.com").is_ok());
        assert!(check_server_name("*").is_err());
        assert!(check_server_name("a.*.com").is_err());
        assert!(check_server_name("bad name").is_err());
    }
}
