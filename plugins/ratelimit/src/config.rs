//! The plugin's configuration: the serde schema (`deny_unknown_fields`) and
//! its validation into [`Limit`]s ready for the request path. Every error names
//! the field, e.g. ``invalid config: field `limits[1].burst`: must be at least 1``.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::gcra::Bucket;

/// At most this many limits: each has 4 metric series, and the host caps a
/// plugin at 1000 series.
pub const MAX_LIMITS: usize = 64;

/// The plugin's `config:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The KV namespace holding the buckets (granted in the plugin's
    /// `capabilities.kv`); the host decides whether it is local
    /// memory or shared (Redis).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The limits; every matching one must pass. (Defaulted so that a missing
    /// `limits` gets validation's message rather than serde's.)
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
    /// Count, never block (every limit in shadow mode).
    #[serde(default)]
    pub shadow: bool,
    /// Add `RateLimit-*` headers to allowed responses too (429s always have them).
    #[serde(default)]
    pub emit_headers: bool,
    /// The names of the quota headers (on 429s, and with `emit_headers` on
    /// allowed responses): `ratelimit` (default) or `x-ratelimit`.
    #[serde(default)]
    pub header_names: HeaderNames,
    /// What a KV error does: `allow` (default) or `deny` (503).
    #[serde(default)]
    pub failure_mode: FailureMode,
}

fn default_namespace() -> String {
    "ratelimit".to_owned()
}

/// The quota headers' names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum HeaderNames {
    /// `ratelimit-limit`, `ratelimit-remaining`, `ratelimit-reset`: the IETF
    /// draft's names (draft-ietf-httpapi-ratelimit-headers, up to -06).
    #[default]
    #[serde(rename = "ratelimit")]
    RateLimit,
    /// `x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-reset`: the
    /// names Envoy's `local_ratelimit` emits with `enable_x_ratelimit_headers:
    /// DRAFT_VERSION_03`.
    #[serde(rename = "x-ratelimit")]
    XRateLimit,
}

impl HeaderNames {
    /// The limit, remaining and reset header names.
    pub fn names(self) -> [&'static str; 3] {
        match self {
            HeaderNames::RateLimit => ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"],
            HeaderNames::XRateLimit => [
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset",
            ],
        }
    }
}

/// The policy when the KV store fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Let the request through (fail open).
    #[default]
    Allow,
    /// Answer 503 (fail closed).
    Deny,
}

impl FailureMode {
    /// As the config spells it (for the log: `Allow` is no config value).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Allow => "allow",
            FailureMode::Deny => "deny",
        }
    }
}

/// One limit as configured.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Unique name: metric label, 429 body, KV key prefix.
    pub name: String,
    /// Which requests the limit applies to (absent: all).
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    /// What identifies a bucket (absent/empty: one bucket for the whole limit).
    #[serde(default)]
    pub key: Vec<Descriptor>,
    /// `N/s`, `N/m`, `N/h` or `N/d`.
    pub rate: String,
    /// Bucket capacity: requests allowed at once (default: the rate's N).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Count, never block (this limit only).
    #[serde(default)]
    pub shadow: bool,
}

/// Request selection for one limit.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Path prefix (query excluded), segment-unaware like route prefixes.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Methods (any case); empty: all.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Route names (`route_name()` of the exchange); empty: all.
    #[serde(default)]
    pub routes: Vec<String>,
}

/// One part of a bucket key, taken from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Descriptor {
    /// The client's IP (the exchange's source address), its first `v4`
    /// (IPv4) or `v6` (IPv6) bits: one bucket per network, as Envoy's
    /// `masked_remote_address` (`client_ip` alone: 32 and 128, the address).
    ClientIp {
        /// Prefix length kept of an IPv4 address, 1-32.
        v4: u8,
        /// Prefix length kept of an IPv6 address, 1-128.
        v6: u8,
    },
    /// The request method.
    Method,
    /// The path without the query.
    Path,
    /// The matched route's name; requests without a route skip the limit.
    Route,
    /// The `:authority`/`Host`.
    Authority,
    /// A request header's first value (lower-cased name); requests without it
    /// skip the limit. E.g. `x-user` written by the auth plugin (its
    /// `claim_to_headers`), or an API key id (`x-api-key-id`).
    Header(String),
}

const DESCRIPTOR_FORMS: &str = "client_ip, {client_ip: {v4_prefix: N, v6_prefix: N}}, method, \
     path, route, authority, header:NAME or {header: NAME}";

/// The whole address: `client_ip` without prefixes.
pub const CLIENT_IP: Descriptor = Descriptor::ClientIp { v4: 32, v6: 128 };

/// `{client_ip: {...}}`: the prefix lengths kept of the client's address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientIpMask {
    /// Of an IPv4 address (default 32: the address).
    #[serde(default)]
    v4_prefix: Option<u8>,
    /// Of an IPv6 address (default 128: the address).
    #[serde(default)]
    v6_prefix: Option<u8>,
}

impl ClientIpMask {
    fn descriptor(self) -> Result<Descriptor, String> {
        let v4 = self.v4_prefix.unwrap_or(32);
        let v6 = self.v6_prefix.unwrap_or(128);
        if !(1..=32).contains(&v4) {
            return Err(format!("client_ip.v4_prefix: {v4} is not 1-32"));
        }
        if !(1..=128).contains(&v6) {
            return Err(format!("client_ip.v6_prefix: {v6} is not 1-128"));
        }
        Ok(Descriptor::ClientIp { v4, v6 })
    }
}

impl Descriptor {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "client_ip" => CLIENT_IP,
            "method" => Descriptor::Method,
            "path" => Descriptor::Path,
            "route" => Descriptor::Route,
            "authority" => Descriptor::Authority,
            _ => match s.strip_prefix("header:") {
                Some(name) => Descriptor::Header(header_name(name)?),
                None => {
                    return Err(format!(
                        "unknown key descriptor {s:?}; expected {DESCRIPTOR_FORMS}"
                    ))
                }
            },
        })
    }
}

fn header_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("invalid header name {name:?}"));
    }
    let name = name.to_ascii_lowercase();
    if name == "host" {
        // The host shows filters the client's host as the authority, never
        // as a header: such a limit would never apply.
        return Err(
            "the client's host is not a header filters see; use the `authority` descriptor"
                .to_owned(),
        );
    }
    Ok(name)
}

impl<'de> Deserialize<'de> for Descriptor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Descriptor;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a key descriptor: {DESCRIPTOR_FORMS}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Descriptor, E> {
                Descriptor::parse(s).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Descriptor, A::Error> {
                let Some(k) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(format!(
                        "empty key descriptor; expected {DESCRIPTOR_FORMS}"
                    )));
                };
                let d = match k.as_str() {
                    "header" => {
                        let name: String = map.next_value()?;
                        header_name(&name).map(Descriptor::Header)
                    }
                    "client_ip" => map.next_value::<ClientIpMask>()?.descriptor(),
                    _ => {
                        return Err(de::Error::custom(format!(
                            "unknown key descriptor field {k:?}; expected {{header: NAME}} \
                             or {{client_ip: {{v4_prefix: N, v6_prefix: N}}}}"
                        )))
                    }
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "unexpected field {extra:?} next to `{k}`"
                    )));
                }
                d.map_err(de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A validated limit, ready for the request path.
#[derive(Debug, Clone)]
pub struct Limit {
    /// Its name.
    pub name: String,
    /// What its bucket keys start with: the name, emission interval and
    /// burst (`name@INTERVALxBURST`).
    pub key_prefix: String,
    /// Path prefix to match, if any.
    pub prefix: Option<String>,
    /// Upper-case methods to match (empty: all).
    pub methods: Vec<String>,
    /// Route names to match (empty: all).
    pub routes: Vec<String>,
    /// The bucket key's parts.
    pub key: Vec<Descriptor>,
    /// The bucket's rate and capacity.
    pub bucket: Bucket,
    /// Never blocks.
    pub shadow: bool,
}

/// Parse `N/unit` into (N, period in ns).
pub fn parse_rate(s: &str) -> Result<(u32, u64), String> {
    let bad = || format!("{s:?} is not a rate; expected N/s, N/m, N/h or N/d, e.g. \"100/s\"");
    let (n, unit) = s.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    let secs: u64 = match unit.trim() {
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3_600,
        "d" | "day" => 86_400,
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(format!("{s:?}: the count must be at least 1"));
    }
    let period_ns = secs * 1_000_000_000;
    if u64::from(n) > period_ns {
        // The bucket counts whole nanoseconds per token.
        return Err(format!(
            "{s:?} is faster than one request per nanosecond; at most 1000000000/s"
        ));
    }
    Ok((n, period_ns))
}

fn field_err(field: &str, msg: impl fmt::Display) -> String {
    format!("invalid config: field `{field}`: {msg}")
}

impl Config {
    /// Check everything serde could not and build the limits.
    pub fn validate(&self) -> Result<Vec<Limit>, String> {
        if self.namespace.is_empty() {
            return Err(field_err("namespace", "must not be empty"));
        }
        if self.limits.is_empty() {
            return Err(field_err("limits", "at least one limit is required"));
        }
        if self.limits.len() > MAX_LIMITS {
            return Err(field_err(
                "limits",
                format!("{} limits, at most {MAX_LIMITS}", self.limits.len()),
            ));
        }
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(self.limits.len());
        for (i, l) in self.limits.iter().enumerate() {
            let f = |sub: &str| format!("limits[{i}].{sub}");
            let name_ok = |b: u8| b.is_ascii_alphanumeric() || b"_-.".contains(&b);
            if l.name.is_empty() || l.name.len() > 64 || !l.name.bytes().all(name_ok) {
                return Err(field_err(
                    &f("name"),
                    format!("{:?}: 1-64 characters of [A-Za-z0-9_.-]", l.name),
                ));
            }
            if !names.insert(l.name.as_str()) {
                return Err(field_err(
                    &f("name"),
                    format!(
                        "{:?} is used by an earlier limit; names must be unique",
                        l.name
                    ),
                ));
            }
            let (count, period_ns) = parse_rate(&l.rate).map_err(|e| field_err(&f("rate"), e))?;
            let burst = l.burst.unwrap_or(count);
            if burst == 0 {
                return Err(field_err(&f("burst"), "must be at least 1"));
            }
            // At least 1 ns per token (parse_rate refuses faster rates).
            let interval_ns = (period_ns / u64::from(count)).max(1);
            if let Some(p) = &l.matcher.prefix {
                if !p.starts_with('/') {
                    return Err(field_err(
                        &f("match.prefix"),
                        format!("{p:?} must start with '/'"),
                    ));
                }
            }
            let mut methods = Vec::new();
            for (j, m) in l.matcher.methods.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
                    return Err(field_err(
                        &format!("limits[{i}].match.methods[{j}]"),
                        format!("{m:?} is not an HTTP method"),
                    ));
                }
                methods.push(m.to_ascii_uppercase());
            }
            out.push(Limit {
                // The rate and burst in the key: another config (a route's)
                // with a limit of the same name but other parameters must not
                // share its buckets (each would read the other's state with
                // its own interval); a changed rate starts fresh buckets.
                key_prefix: format!("{}@{interval_ns}x{burst}", l.name),
                name: l.name.clone(),
                prefix: l.matcher.prefix.clone(),
                methods,
                routes: l.matcher.routes.clone(),
                key: l.key.clone(),
                bucket: Bucket { interval_ns, burst },
                shadow: l.shadow || self.shadow,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100/s"), Ok((100, 1_000_000_000)));
        assert_eq!(parse_rate(" 5 / m "), Ok((5, 60_000_000_000)));
        assert_eq!(parse_rate("1/d"), Ok((1, 86_400_000_000_000)));
        // The spelt-out units the README lists.
        for (alias, unit) in [
            ("sec", "s"),
            ("second", "s"),
            ("min", "m"),
            ("minute", "m"),
            ("hour", "h"),
            ("day", "d"),
        ] {
            assert_eq!(
                parse_rate(&format!("7/{alias}")),
                parse_rate(&format!("7/{unit}"))
            );
        }
        for bad in ["100", "x/s", "10/w", "-1/s", "0/s", "/s", "1/mins", "1/M"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
