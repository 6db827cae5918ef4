//! `Config::validate`: every check serde cannot make — references between sections,
//! uniqueness, exactly-one-of choices, regexes, header names — collected (not stopped
//! at the first) so one `legate check` run shows everything to fix.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use serde_saphyr::Location;

use super::*;

type Errors = Vec<ConfigError>;

fn err(errors: &mut Errors, loc: &Location, msg: impl Into<String>, help: impl Into<String>) {
    errors.push(ConfigError::at(loc, msg).help(help));
}

impl Config {
    /// Checks the parsed config; an empty vector means it is valid.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut e = Vec::new();
        if self.version.value != 1 {
            err(
                &mut e,
                &self.version.referenced,
                format!("unsupported config version {}", self.version.value),
                "this Legate reads `version: 1`",
            );
        }
        if !self.plugins.value.is_empty() {
            err(
                &mut e,
                &self.plugins.referenced,
                "the `plugins` section is reserved and not supported by this Legate yet",
                "remove the plugins or leave `plugins: []`",
            );
        }
        self.validate_admin(&mut e);

        let clusters: HashSet<&Name> = self.clusters.iter().map(|c| &c.value.name).collect();
        let tables: HashSet<&Name> = self.routes.iter().map(|t| &t.value.name).collect();
        let cluster_ref = |e: &mut Errors, r: &Spanned<Name>| {
            if !clusters.contains(&r.value) {
                err(
                    e,
                    &r.referenced,
                    format!("unknown cluster `{}`", r.value),
                    format!("define it under `clusters:`; defined: {}", list(&clusters)),
                );
            }
        };

        unique(&mut e, "listener", self.listeners.iter().map(|l| (&l.value.name, &l.referenced)));
        unique(&mut e, "route table", self.routes.iter().map(|t| (&t.value.name, &t.referenced)));
        unique(&mut e, "cluster", self.clusters.iter().map(|c| (&c.value.name, &c.referenced)));

        let mut addrs = HashMap::new();
        for l in &self.listeners {
            let loc = &l.referenced;
            let l = &l.value;
            match l.address.value.parse::<SocketAddr>() {
                Ok(a) => {
                    if let Some(other) = addrs.insert(a, &l.name) {
                        err(
                            &mut e,
                            &l.address.referenced,
                            format!("listeners `{other}` and `{}` both bind {a}", l.name),
                            "give each listener its own address",
                        );
                    }
                }
                Err(_) => err(
                    &mut e,
                    &l.address.referenced,
                    format!("listener address `{}` is not `ip:port`", l.address.value),
                    "write it like `0.0.0.0:8080` or `[::1]:8443`",
                ),
            }
            match (&l.http, &l.tcp) {
                (Some(h), None) => {
                    if !tables.contains(&h.routes.value) {
                        err(
                            &mut e,
                            &h.routes.referenced,
                            format!("unknown route table `{}`", h.routes.value),
                            format!("define it under `routes:`; defined: {}", list(&tables)),
                        );
                    }
                }
                (None, Some(t)) => cluster_ref(&mut e, &t.cluster),
                _ => err(
                    &mut e,
                    loc,
                    format!("listener `{}` needs exactly one of `http` and `tcp`", l.name),
                    "add `http: { routes: NAME }` for HTTP or `tcp: { cluster: NAME }` for a TCP proxy",
                ),
            }
            if let Some(tls) = &l.tls {
                if tls.certificates.is_empty() {
                    err(
                        &mut e,
                        loc,
                        format!("listener `{}` has `tls` but no certificates", l.name),
                        "add `certificates: [{ cert: FILE, key: FILE }]`",
                    );
                }
            }
            let lim = &l.limits;
            if lim.max_connections == 0 || lim.max_request_headers == 0 || lim.max_concurrent_streams == 0 {
                err(
                    &mut e,
                    loc,
                    format!("listener `{}`: limits must be greater than zero", l.name),
                    "remove the limit to get the default, or set a positive value",
                );
            }
            if lim.max_request_headers_size.0 < 1024 {
                err(
                    &mut e,
                    loc,
                    format!("listener `{}`: max_request_headers_size below 1KiB", l.name),
                    "real clients send more than 1KiB of headers; the default is 60KiB",
                );
            }
        }

        for t in &self.routes {
            let table = &t.value;
            unique(&mut e, "virtual host", table.virtual_hosts.iter().map(|v| (&v.value.name, &v.referenced)));
            let mut domains: HashMap<String, &Name> = HashMap::new();
            for vh in &table.virtual_hosts {
                let vh_loc = &vh.referenced;
                let vh = &vh.value;
                if vh.domains.is_empty() {
                    err(&mut e, vh_loc, format!("virtual host `{}` has no domains", vh.name), "add `domains: [\"*\"]` to match every host");
                }
                for d in &vh.domains {
                    if let Err(why) = check_domain(&d.value) {
                        err(&mut e, &d.referenced, why, "use `host`, `*.suffix`, `prefix.*` or `*`");
                    }
                    let key = d.value.to_ascii_lowercase();
                    if let Some(other) = domains.insert(key, &vh.name) {
                        err(
                            &mut e,
                            &d.referenced,
                            format!("domain `{}` is in virtual hosts `{other}` and `{}`", d.value, vh.name),
                            "a domain may belong to one virtual host per route table",
                        );
                    }
                }
                headers(&mut e, &vh.request_headers);
                headers(&mut e, &vh.response_headers);
                for r in &vh.routes {
                    self.validate_route(&mut e, r, &cluster_ref);
                }
            }
        }

        for c in &self.clusters {
            validate_cluster(&mut e, c);
        }
        e
    }

    fn validate_admin(&self, e: &mut Errors) {
        let a = &self.admin.address;
        match a.value.parse::<SocketAddr>() {
            Ok(addr) if !addr.ip().is_loopback() && !self.admin.allow_non_loopback => err(
                e,
                &a.referenced,
                format!("admin address {addr} is not a loopback address"),
                "the admin API can drain the proxy; bind it to 127.0.0.1, or set \
                 `admin.allow_non_loopback: true` if the network is trusted",
            ),
            Ok(_) => {}
            Err(_) => err(e, &a.referenced, format!("admin address `{}` is not `ip:port`", a.value), "write it like `127.0.0.1:9901`"),
        }
    }

    fn validate_route(&self, e: &mut Errors, r: &Spanned<Route>, cluster_ref: &dyn Fn(&mut Errors, &Spanned<Name>)) {
        let loc = &r.referenced;
        let r = &r.value;
        let actions = [r.cluster.is_some(), r.weighted_clusters.is_some(), r.redirect.is_some(), r.direct_response.is_some()];
        if actions.iter().filter(|a| **a).count() != 1 {
            err(
                e,
                loc,
                "a route needs exactly one action",
                "give it one of `cluster`, `weighted_clusters`, `redirect` or `direct_response`",
            );
        }
        if let Some(c) = &r.cluster {
            cluster_ref(e, c);
        }
        if let Some(w) = &r.weighted_clusters {
            for wc in &w.value {
                cluster_ref(e, &wc.cluster);
            }
            if w.value.iter().map(|c| u64::from(c.weight)).sum::<u64>() == 0 {
                err(e, &w.referenced, "weighted_clusters: the weights add up to zero", "give at least one cluster a positive weight");
            }
        }
        if let Some(rd) = &r.redirect {
            if ![301, 302, 303, 307, 308].contains(&rd.code.value) {
                err(e, &rd.code.referenced, format!("redirect code {} is not a redirect", rd.code.value), "use 301, 302, 303, 307 or 308");
            }
            if let Some(s) = &rd.scheme {
                if s != "http" && s != "https" {
                    err(e, loc, format!("redirect scheme `{s}` is not http or https"), "use `http` or `https`");
                }
            }
            if rd.prefix_rewrite.is_some() && rd.path.is_some() {
                err(e, loc, "redirect has both `path` and `prefix_rewrite`", "keep one of them");
            }
            if rd.prefix_rewrite.is_some() && r.matcher.prefix.is_none() {
                err(e, loc, "redirect `prefix_rewrite` needs a route matched by `prefix`", "match with `prefix:` or use `path:`");
            }
        }
        if let Some(d) = &r.direct_response {
            if !(200..=599).contains(&d.status.value) {
                err(e, &d.status.referenced, format!("status {} is not a final HTTP status", d.status.value), "use a status from 200 to 599");
            }
            if let Some(ct) = &d.content_type {
                if http::HeaderValue::from_str(ct).is_err() {
                    err(e, loc, format!("content_type `{ct}` is not a valid header value"), "use printable ASCII");
                }
            }
        }
        let m = &r.matcher;
        let path_kinds = [m.prefix.is_some(), m.path.is_some(), m.regex.is_some()].iter().filter(|x| **x).count();
        if path_kinds > 1 {
            err(e, loc, "a route match may use only one of `prefix`, `path` and `regex`", "keep one of them");
        }
        for p in [&m.prefix, &m.path].into_iter().flatten() {
            if !p.starts_with('/') {
                err(e, loc, format!("path `{p}` does not start with `/`"), "paths in matches start with `/`");
            }
        }
        if let Some(re) = &m.regex {
            regex_check(e, re);
        }
        for meth in &m.methods {
            if http::Method::from_bytes(meth.as_bytes()).is_err() {
                err(e, loc, format!("`{meth}` is not an HTTP method"), "use GET, POST, PUT, ...");
            }
        }
        for (vm, is_header) in m.headers.iter().map(|h| (h, true)).chain(m.query.iter().map(|q| (q, false))) {
            let v = &vm.value;
            let n = [v.exact.is_some(), v.regex.is_some(), v.present.is_some()].iter().filter(|x| **x).count();
            if n != 1 {
                err(e, &vm.referenced, format!("condition on `{}` needs exactly one of `exact`, `regex`, `present`", v.name), "add one of them");
            }
            if is_header && http::HeaderName::from_bytes(v.name.as_bytes()).is_err() {
                err(e, &vm.referenced, format!("`{}` is not a valid header name", v.name), "header names are tokens like `x-user-id`");
            }
            if let Some(re) = &v.regex {
                if let Err(x) = regex::Regex::new(re) {
                    err(e, &vm.referenced, format!("invalid regex `{re}`: {x}"), "fix the regular expression (Rust regex syntax)");
                }
            }
        }
        if let Some(rw) = &r.rewrite {
            if rw.prefix.is_some() && m.prefix.is_none() {
                err(e, loc, "`rewrite.prefix` needs a route matched by `prefix`", "match with `prefix:` or use `rewrite.regex`");
            }
            if rw.prefix.is_some() && rw.regex.is_some() {
                err(e, loc, "`rewrite` has both `prefix` and `regex`", "keep one of them");
            }
            if let Some(rr) = &rw.regex {
                regex_check(e, &rr.pattern);
            }
            if let Some(h) = &rw.host {
                if http::uri::Authority::try_from(h.as_str()).is_err() {
                    err(e, loc, format!("rewrite host `{h}` is not a valid host"), "write it like `api.internal` or `api.internal:8080`");
                }
            }
            if r.cluster.is_none() && r.weighted_clusters.is_none() {
                err(e, loc, "`rewrite` only applies to routes that forward to a cluster", "remove `rewrite` or route to a cluster");
            }
        }
        if let (Some(pt), true) = (r.per_try_timeout, !r.timeout.0.is_zero()) {
            if pt > r.timeout {
                err(e, loc, format!("per_try_timeout {pt} is longer than the route timeout {}", r.timeout), "make per_try_timeout shorter than timeout");
            }
        }
        if let Some(rp) = &r.retry {
            if rp.retry_on.is_empty() {
                err(e, loc, "`retry.retry_on` is empty", "list conditions such as `[5xx, connect-failure, reset]`");
            }
            if rp.retry_on.contains(&RetryOn::RetriableStatusCodes) && rp.retriable_status_codes.is_empty() {
                err(e, loc, "`retriable-status-codes` is set but `retriable_status_codes` is empty", "list the statuses, e.g. `retriable_status_codes: [409]`");
            }
            if rp.num_retries > 10 {
                err(e, loc, format!("num_retries {} is more than 10", rp.num_retries), "retry storms hurt a failing upstream; use a small number");
            }
            if rp.backoff_base.0.is_zero() {
                err(e, loc, "backoff_base must be greater than zero", "the default is 25ms");
            }
        }
        headers(e, &r.request_headers);
        headers(e, &r.response_headers);
    }
}

fn validate_cluster(e: &mut Errors, c: &Spanned<Cluster>) {
    let loc = &c.referenced;
    let c = &c.value;
    if c.original_dst {
        if !c.endpoints.is_empty() {
            err(e, loc, format!("cluster `{}` is `original_dst` and also lists endpoints", c.name), "remove the endpoints: the connection's original destination is the endpoint");
        }
    } else if c.endpoints.is_empty() {
        err(e, loc, format!("cluster `{}` has no endpoints", c.name), "add `endpoints: [{ address: HOST:PORT }]`");
    }
    for ep in &c.endpoints {
        if let Err(why) = split_host_port(&ep.value.address) {
            err(e, &ep.referenced, why, "write it like `10.0.0.5:8080` or `app.internal:8080`");
        }
        if ep.value.weight == 0 {
            err(e, &ep.referenced, "endpoint weight 0", "weights are at least 1; remove the endpoint to send it nothing");
        }
    }
    match (c.lb_policy, &c.hash_on) {
        (LbPolicy::RingHash, None) => err(e, loc, format!("cluster `{}` uses ring_hash without `hash_on`", c.name), "add `hash_on: { header: x-user-id }`, `{ cookie: NAME }` or `{ source_ip: true }`"),
        (LbPolicy::RingHash, Some(h)) => {
            let n = [h.header.is_some(), h.cookie.is_some(), h.source_ip].iter().filter(|x| **x).count();
            if n != 1 {
                err(e, loc, "`hash_on` needs exactly one of `header`, `cookie`, `source_ip`", "keep one of them");
            }
        }
        (_, Some(_)) => err(e, loc, "`hash_on` is only used by `lb_policy: ring_hash`", "remove `hash_on` or set `lb_policy: ring_hash`"),
        _ => {}
    }
    if c.protocol == UpstreamProtocol::Auto && c.tls.is_none() {
        err(e, loc, "`protocol: auto` picks the protocol by ALPN, which needs `tls`", "add `tls:` or choose `http1` or `h2`");
    }
    if let Some(tls) = &c.tls {
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            err(e, loc, "`client_cert` and `client_key` go together", "give both or neither");
        }
    }
    if c.connect_timeout.0.is_zero() {
        err(e, loc, "connect_timeout must be greater than zero", "the default is 5s");
    }
}

/// Splits `host:port`, `ip:port` or `[v6]:port`.
pub(crate) fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let bad = || format!("endpoint address `{s}` is not `host:port`");
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        (h, p)
    } else {
        s.rsplit_once(':').ok_or_else(bad)?
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

fn check_domain(d: &str) -> Result<(), String> {
    if d == "*" {
        return Ok(());
    }
    let stars = d.matches('*').count();
    let ok = match stars {
        0 => true,
        1 => (d.starts_with("*.") || d.ends_with(".*")) && d.len() > 2,
        _ => false,
    };
    if !ok || d.is_empty() || d.contains(char::is_whitespace) || d.contains('/') {
        return Err(format!("domain `{d}` is not a valid host pattern"));
    }
    Ok(())
}

fn regex_check(e: &mut Errors, re: &Spanned<String>) {
    if let Err(x) = regex::Regex::new(&re.value) {
        err(e, &re.referenced, format!("invalid regex `{}`: {x}", re.value), "fix the regular expression (Rust regex syntax)");
    }
}

fn headers(e: &mut Errors, ops: &HeaderOps) {
    for (map, loc) in [(&ops.add.value, &ops.add.referenced), (&ops.set.value, &ops.set.referenced)] {
        for (k, v) in map {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                err(e, loc, format!("`{k}` is not a valid header name"), "header names are tokens like `x-env`");
            }
            if http::HeaderValue::from_str(v).is_err() {
                err(e, loc, format!("value of `{k}` is not a valid header value"), "use printable ASCII without newlines");
            }
            if is_pseudo_or_hop(k) {
                err(e, loc, format!("header `{k}` cannot be changed by config"), "hop-by-hop and pseudo headers are managed by the proxy");
            }
        }
    }
    for k in &ops.remove.value {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            err(e, &ops.remove.referenced, format!("`{k}` is not a valid header name"), "header names are tokens like `x-env`");
        }
    }
}

fn is_pseudo_or_hop(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    k.starts_with(':') || matches!(k.as_str(), "connection" | "transfer-encoding" | "upgrade" | "te" | "keep-alive" | "host" | "content-length")
}

fn unique<'a>(e: &mut Errors, what: &str, items: impl Iterator<Item = (&'a Name, &'a Location)>) {
    let mut seen = HashSet::new();
    for (name, loc) in items {
        if !seen.insert(name) {
            err(e, loc, format!("duplicate {what} name `{name}`"), format!("give each {what} a unique name"));
        }
    }
}

fn list(names: &HashSet<&Name>) -> String {
    let mut v: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
    v.sort_unstable();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
