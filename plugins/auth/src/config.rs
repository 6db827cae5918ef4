//! The plugin's `config:` schema (serde, `deny_unknown_fields`) and its
//! validation into the runtime [`Settings`]; every error names the field
//! (`providers[0].issuer: ...`) so an operator can fix it from `legate check`.

use std::collections::HashMap;

use serde::Deserialize;

use crate::basic::Htpasswd;
use crate::jwt::{Algorithm, Jwks};

/// The plugin config as written in plugins.yaml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The realm in `WWW-Authenticate` challenges.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// JWT providers.
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    /// API key sets.
    #[serde(default)]
    pub api_keys: Vec<ApiKeysConfig>,
    /// HTTP Basic user sets.
    #[serde(default)]
    pub basic: Vec<BasicConfig>,
    /// External authorization service.
    #[serde(default)]
    pub ext_authz: Option<ExtAuthzConfig>,
    /// Per-path requirements; first match wins. Absent: every request needs
    /// one of all the configured authenticators.
    #[serde(default)]
    pub rules: Option<Vec<RuleConfig>>,
    /// Let CORS preflights (`OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`) through unchecked, as Envoy's
    /// jwt_authn `bypass_cors_preflight`: browsers send them without
    /// credentials, so a rule that requires one would answer them 401 and the
    /// browser would never send the real request. Default `false`, as Envoy:
    /// nothing passes unchecked unless the config says so.
    #[serde(default)]
    pub bypass_cors_preflight: bool,
}

fn default_realm() -> String {
    "legate".to_owned()
}

/// Where a credential is read from.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A request header.
    #[serde(default)]
    pub header: Option<String>,
    /// With `header`: a case-insensitive prefix the value must start with,
    /// stripped (e.g. `"Bearer "`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// A cookie name.
    #[serde(default)]
    pub cookie: Option<String>,
    /// A query parameter name.
    #[serde(default)]
    pub query: Option<String>,
}

/// A JWT provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// The name rules refer to.
    pub name: String,
    /// The required `iss` claim.
    pub issuer: String,
    /// Accepted `aud` values (any one); empty: `aud` is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted `alg` values; empty: any the keys support.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// Inline JWKS (`{"keys": [...]}`).
    #[serde(default)]
    pub jwks: Option<serde_json::Value>,
    /// JWKS fetched from a cluster.
    #[serde(default)]
    pub remote_jwks: Option<RemoteJwksConfig>,
    /// Tolerance for `exp`/`nbf`, seconds.
    #[serde(default = "default_skew")]
    pub clock_skew_s: u64,
    /// Whether a token without `exp` is rejected.
    #[serde(default = "default_true")]
    pub require_exp: bool,
    /// Where the token is read from, first found wins.
    #[serde(default)]
    pub from: Vec<SourceConfig>,
    /// Claims copied into request headers for the upstream.
    #[serde(default)]
    pub claim_to_headers: Vec<ClaimHeaderConfig>,
    /// Whether the token itself is passed upstream (else the header it came
    /// in is removed; a cookie or query parameter is left). Default false,
    /// as Envoy's `JwtProvider.forward`: the upstream gets the verified
    /// claims through `claim_to_headers`, not a bearer credential it could
    /// replay elsewhere.
    #[serde(default)]
    pub forward_token: bool,
    /// The verified-token cache (absent: the default size).
    #[serde(default)]
    pub cache: Option<TokenCacheConfig>,
}

/// `cache: {size: N, max_token_size: BYTES}` of a provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCacheConfig {
    /// Verified tokens remembered per instance; 0 disables the cache.
    #[serde(default = "default_cache_size")]
    pub size: usize,
    /// Longest token cached, in bytes (longer ones are verified every time).
    #[serde(default = "default_cache_max_token")]
    pub max_token_size: usize,
}

/// Default verified-token cache size, per provider per instance.
pub const DEFAULT_CACHE_SIZE: usize = 100;

/// Largest accepted `cache.size`: an entry holds a token's claims (about a
/// KiB), per provider per worker.
pub const MAX_CACHE_SIZE: usize = 100_000;

fn default_cache_size() -> usize {
    DEFAULT_CACHE_SIZE
}

/// Default longest cached token, bytes: Envoy's `jwt_max_token_size`. Typical
/// tokens are well under 2 KiB; this bounds an entry (token plus claims) to a
/// few KiB, ~0.5 MiB per provider per worker at the default size.
pub const DEFAULT_CACHE_MAX_TOKEN: usize = 4096;

fn default_cache_max_token() -> usize {
    DEFAULT_CACHE_MAX_TOKEN
}

fn default_skew() -> u64 {
    60
}

/// Largest accepted `clock_skew_s`: 5 minutes, the usual bound in identity
/// provider guidance (e.g. Kerberos' default, Microsoft identity's).
pub const MAX_SKEW_S: u64 = 300;
fn default_true() -> bool {
    true
}

/// A remote JWKS endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteJwksConfig {
    /// The cluster (must be granted to the plugin).
    pub cluster: String,
    /// The path, e.g. `/.well-known/jwks.json`.
    pub path: String,
    /// The `:authority`/`host` sent; default: the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    /// How long fetched keys are used before a refresh, seconds.
    #[serde(default = "default_refresh")]
    pub refresh_interval_s: u64,
    /// Minimum time between refetches triggered by an unknown `kid`, seconds.
    #[serde(default = "default_refetch")]
    pub min_refetch_interval_s: u64,
    /// Fetch timeout.
    #[serde(default = "default_fetch_timeout")]
    pub timeout_ms: u32,
}

fn default_refresh() -> u64 {
    300
}
fn default_refetch() -> u64 {
    30
}
fn default_fetch_timeout() -> u32 {
    1000
}

/// One claim → header mapping.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimHeaderConfig {
    /// The claim; `a.b` reads a nested object member.
    pub claim: String,
    /// The request header it is written to.
    pub header: String,
}

/// A set of API keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysConfig {
    /// The name rules refer to.
    pub name: String,
    /// Where the key is read from; default: header `x-api-key`.
    #[serde(default)]
    pub from: Vec<SourceConfig>,
    /// The keys: an id and the SHA-256 of the key, hex.
    pub keys: Vec<ApiKeyConfig>,
    /// The request header the key id is written to.
    #[serde(default = "default_key_id_header")]
    pub id_header: String,
    /// Whether the key is passed upstream (else its header is removed).
    #[serde(default)]
    pub forward_key: bool,
}

fn default_key_id_header() -> String {
    "x-api-key-id".to_owned()
}

/// One API key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The id forwarded upstream (never the key).
    pub id: String,
    /// `sha256(key)` in hex (64 digits).
    pub sha256: String,
}

/// HTTP Basic users.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicConfig {
    /// The name rules refer to.
    pub name: String,
    /// The realm in the `Basic` challenge; default: the top-level realm.
    #[serde(default)]
    pub realm: Option<String>,
    /// htpasswd lines `user:hash` (bcrypt `$2y$`/`$2a$`/`$2b$`, or `{SHA}`).
    pub htpasswd: Vec<String>,
    /// The request header the user name is written to.
    #[serde(default = "default_user_header")]
    pub user_header: String,
    /// Whether the `authorization` header is passed upstream.
    #[serde(default)]
    pub forward_credentials: bool,
}

fn default_user_header() -> String {
    "x-user".to_owned()
}

/// External authorization.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtAuthzConfig {
    /// The auth service's cluster (must be granted).
    pub cluster: String,
    /// The path called.
    #[serde(default = "default_authz_path")]
    pub path: String,
    /// The method used.
    #[serde(default = "default_authz_method")]
    pub method: String,
    /// Request headers copied to the check request.
    #[serde(default = "default_forward_headers")]
    pub forward_headers: Vec<String>,
    /// Check-response headers copied to the upstream request on allow.
    #[serde(default)]
    pub upstream_headers: Vec<String>,
    /// Check-response headers copied to the client on deny (absent: all of
    /// them but the connection and framing fields, as Envoy's
    /// `allowed_client_headers` unset).
    #[serde(default)]
    pub client_headers: Option<Vec<String>>,
    /// Check timeout.
    #[serde(default = "default_authz_timeout")]
    pub timeout_ms: u32,
    /// On an error (timeout, unavailable, ...): let the request through.
    #[serde(default)]
    pub failure_mode_allow: bool,
    /// The status sent when the check fails and `failure_mode_allow` is off.
    #[serde(default = "default_status_on_error")]
    pub status_on_error: u16,
}

fn default_authz_path() -> String {
    "/check".to_owned()
}
fn default_authz_method() -> String {
    "GET".to_owned()
}
fn default_forward_headers() -> Vec<String> {
    vec!["authorization".to_owned(), "cookie".to_owned()]
}
fn default_authz_timeout() -> u32 {
    1000
}
fn default_status_on_error() -> u16 {
    403
}

/// A per-path requirement.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Which requests.
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    /// Authenticators, any one of which must accept the request.
    #[serde(default)]
    pub requires: Option<RequiresConfig>,
    /// With `requires`: a request with no credential at all passes
    /// (unauthenticated); a bad credential is still rejected.
    #[serde(default)]
    pub allow_missing: bool,
    /// No authentication and no external authorization.
    #[serde(default)]
    pub public: bool,
    /// Claims a JWT must carry (claim → accepted values); else 403.
    #[serde(default)]
    pub claims: HashMap<String, Vec<String>>,
    /// Whether `ext_authz` (if configured) runs for this rule.
    #[serde(default = "default_true")]
    pub ext_authz: bool,
}

/// How a rule matches the request path (query excluded).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// A path prefix, on segment boundaries or not (like routes: plain prefix).
    #[serde(default)]
    pub prefix: Option<String>,
    /// An exact path.
    #[serde(default)]
    pub path: Option<String>,
}

/// `requires: {any: [names]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequiresConfig {
    /// Authenticator names.
    pub any: Vec<String>,
}

// ---------------------------------------------------------------------------
// Validated runtime settings.

/// A validated, lowercase header name the plugin writes or reads per request:
/// shared, so that naming it in a request's identity is a count increment,
/// not an allocation and a copy.
pub type HeaderName = std::rc::Rc<str>;

/// A claim copied to a request header, validated.
#[derive(Debug)]
pub struct ClaimHeader {
    /// The claim; `a.b` reads a nested object member.
    pub claim: String,
    /// The request header it is written to.
    pub header: HeaderName,
}

/// Where a credential is read from, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A header (lowercase) with an optional prefix.
    Header {
        /// Lowercase name.
        name: HeaderName,
        /// Prefix stripped (compared case-insensitively).
        prefix: Option<String>,
    },
    /// A cookie.
    Cookie(String),
    /// A query parameter.
    Query(String),
}

/// A remote JWKS endpoint, validated.
#[derive(Debug, Clone)]
pub struct RemoteJwks {
    /// Cluster.
    pub cluster: String,
    /// Path.
    pub path: String,
    /// Authority.
    pub authority: Option<String>,
    /// Refresh interval, ns.
    pub refresh_ns: u64,
    /// Minimum interval between unknown-kid refetches, ns.
    pub min_refetch_ns: u64,
    /// Timeout.
    pub timeout_ms: u32,
}

/// A JWT provider, validated.
#[derive(Debug)]
pub struct Provider {
    /// Name.
    pub name: String,
    /// Issuer.
    pub issuer: String,
    /// Audiences.
    pub audiences: Vec<String>,
    /// Allowed algorithms (empty: any).
    pub algorithms: Vec<Algorithm>,
    /// Inline keys.
    pub inline: Option<Jwks>,
    /// Remote keys.
    pub remote: Option<RemoteJwks>,
    /// Skew, seconds.
    pub skew_s: u64,
    /// Whether `exp` is required.
    pub require_exp: bool,
    /// Token sources.
    pub from: Vec<Source>,
    /// Claim → header.
    pub claim_to_headers: Vec<ClaimHeader>,
    /// Forward the token.
    pub forward_token: bool,
    /// Verified-token cache size (0: disabled).
    pub cache_size: usize,
    /// Longest token the cache keeps, bytes.
    pub cache_max_token: usize,
}

/// An API key set, validated.
#[derive(Debug)]
pub struct ApiKeys {
    /// Name.
    pub name: String,
    /// Sources.
    pub from: Vec<Source>,
    /// sha256(key) → id.
    pub keys: HashMap<[u8; 32], String>,
    /// Header for the id.
    pub id_header: HeaderName,
    /// Forward the key.
    pub forward_key: bool,
}

/// A Basic user set, validated.
#[derive(Debug)]
pub struct Basic {
    /// Name.
    pub name: String,
    /// Realm.
    pub realm: String,
    /// Users.
    pub users: Htpasswd,
    /// Header for the user name.
    pub user_header: HeaderName,
    /// Forward the credentials.
    pub forward_credentials: bool,
}

/// External authorization, validated.
#[derive(Debug)]
pub struct ExtAuthz {
    /// Cluster.
    pub cluster: String,
    /// Path.
    pub path: String,
    /// Method.
    pub method: String,
    /// Lowercase header names forwarded to the check.
    pub forward_headers: Vec<HeaderName>,
    /// Lowercase header names copied upstream on allow.
    pub upstream_headers: Vec<HeaderName>,
    /// Lowercase header names copied to the client on deny; `None`: every
    /// field of the check's answer but the host-owned (`HOST_OWNED`) ones.
    pub client_headers: Option<Vec<HeaderName>>,
    /// Timeout.
    pub timeout_ms: u32,
    /// Allow on failure.
    pub failure_mode_allow: bool,
    /// Status on failure.
    pub status_on_error: u16,
}

/// An authenticator a rule may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthnRef {
    /// `providers[i]`.
    Jwt(usize),
    /// `api_keys[i]`.
    ApiKey(usize),
    /// `basic[i]`.
    Basic(usize),
}

/// How a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Prefix.
    Prefix(String),
    /// Exact path.
    Path(String),
}

impl Match {
    /// Whether `path` (query excluded) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Match::Prefix(p) => path.starts_with(p.as_str()),
            Match::Path(p) => path == p,
        }
    }
}

/// A rule, validated.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Matcher.
    pub matcher: Match,
    /// Any of these (empty: public).
    pub any: Vec<AuthnRef>,
    /// Missing credentials pass.
    pub allow_missing: bool,
    /// Required claims.
    pub claims: Vec<(String, Vec<String>)>,
    /// Run ext_authz.
    pub ext_authz: bool,
}

/// Everything the filter runs on.
#[derive(Debug)]
pub struct Settings {
    /// Realm.
    pub realm: String,
    /// JWT providers.
    pub providers: Vec<Provider>,
    /// API keys.
    pub api_keys: Vec<ApiKeys>,
    /// Basic.
    pub basic: Vec<Basic>,
    /// Ext authz.
    pub ext_authz: Option<ExtAuthz>,
    /// Rules, shared: a request's rule is borrowed while the filter (and its
    /// caches) are borrowed mutably.
    pub rules: std::rc::Rc<[Rule]>,
    /// CORS preflights pass unchecked ([`Config::bypass_cors_preflight`]).
    pub bypass_cors_preflight: bool,
    /// Every request header the host removes before any filter runs (declared
    /// at `configure` with `sanitize_request_headers`), so a client cannot
    /// forge an identity: each identity header the plugin writes
    /// ([`identity_headers`]) and, for a name with `-`, its `_` spelling
    /// (CGI/WSGI-style upstreams fold both to one variable). Sorted, no
    /// duplicates.
    pub strip_headers: Vec<HeaderName>,
}

/// Every identity header the plugin writes, with the field naming it:
/// `claim_to_headers[].header`, `id_header`, `user_header`, and
/// `ext_authz.upstream_headers` (what the check service vouches for must come
/// from it alone: a client's own copy is dropped even when the check, an allow
/// without the header, `failure_mode_allow` or a public rule, puts none in its
/// place).
pub fn identity_headers(
    providers: &[Provider],
    api_keys: &[ApiKeys],
    basic: &[Basic],
    ext_authz: Option<&ExtAuthz>,
) -> Vec<(HeaderName, String)> {
    let mut out = Vec::new();
    for (i, p) in providers.iter().enumerate() {
        for (j, c) in p.claim_to_headers.iter().enumerate() {
            out.push((
                c.header.clone(),
                format!("providers[{i}].claim_to_headers[{j}].header"),
            ));
        }
    }
    for (i, a) in api_keys.iter().enumerate() {
        out.push((a.id_header.clone(), format!("api_keys[{i}].id_header")));
    }
    for (i, b) in basic.iter().enumerate() {
        out.push((b.user_header.clone(), format!("basic[{i}].user_header")));
    }
    if let Some(e) = ext_authz {
        for (j, h) in e.upstream_headers.iter().enumerate() {
            out.push((h.clone(), format!("ext_authz.upstream_headers[{j}]")));
        }
    }
    out
}

/// The names removed from a request for identity header `name`: itself and,
/// if it has a `-`, its spelling with `_` (`x-user`: `x_user`). CGI, WSGI,
/// PHP, Rack and the like read both as `HTTP_X_USER`, so a client's `x_user:
/// admin` would reach them as the identity (Envoy's
/// `headers_with_underscores_action` exists for the same reason).
pub fn strip_names(name: &HeaderName) -> impl Iterator<Item = HeaderName> + '_ {
    let folded = name
        .contains('-')
        .then(|| HeaderName::from(name.replace('-', "_")));
    std::iter::once(name.clone()).chain(folded)
}

/// Fields the host owns (framing, connection management; host `denied_field`
/// in host/src/wasm/host.rs): a filter cannot write or remove them, and a
/// callout carrying one is refused.
pub(crate) const HOST_OWNED: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    "trailer",
    "host",
    "content-length",
];

/// Headers the ext_authz check request gets from the plugin itself.
const CHECK_OWN: [&str; 3] = ["x-forwarded-method", "x-forwarded-uri", "x-forwarded-host"];

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn header_name(field: &str, name: &str) -> Result<HeaderName, String> {
    if !valid_header_name(name) {
        return Err(format!(
            "{field}: {name:?} is not a valid header name (token characters only, e.g. x-user)"
        ));
    }
    Ok(name.to_ascii_lowercase().into())
}

fn sources(field: &str, from: &[SourceConfig], default: Source) -> Result<Vec<Source>, String> {
    if from.is_empty() {
        return Ok(vec![default]);
    }
    let mut out = Vec::new();
    for (i, s) in from.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let set = [s.header.is_some(), s.cookie.is_some(), s.query.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if set != 1 {
            return Err(format!(
                "{f}: set exactly one of `header`, `cookie`, `query`"
            ));
        }
        if s.prefix.is_some() && s.header.is_none() {
            return Err(format!("{f}.prefix: only valid with `header`"));
        }
        if let Some(h) = &s.header {
            out.push(Source::Header {
                name: header_name(&format!("{f}.header"), h)?,
                prefix: s.prefix.clone().filter(|p| !p.is_empty()),
            });
        } else if let Some(c) = &s.cookie {
            if c.is_empty() || c.contains([';', '=', ' ']) {
                return Err(format!("{f}.cookie: {c:?} is not a valid cookie name"));
            }
            out.push(Source::Cookie(c.clone()));
        } else if let Some(q) = &s.query {
            if q.is_empty() {
                return Err(format!("{f}.query: must not be empty"));
            }
            out.push(Source::Query(q.clone()));
        }
    }
    Ok(out)
}

/// The headers `sources` (validated from `config`, at field `field`) read a
/// credential from, each with its field: a header source, or `cookie` for a
/// cookie source. With no `from` written, the default source.
fn source_carriers(
    field: &str,
    config: &[SourceConfig],
    sources: &[Source],
) -> Vec<(HeaderName, String)> {
    sources
        .iter()
        .enumerate()
        .filter_map(|(j, s)| {
            let f = if config.is_empty() {
                format!("{field} (default)")
            } else {
                format!("{field}[{j}]")
            };
            match s {
                Source::Header { name, .. } => Some((name.clone(), f)),
                Source::Cookie(_) => Some(("cookie".into(), f)),
                Source::Query(_) => None,
            }
        })
        .collect()
}

/// Identity headers are removed from every request (with their `_`
/// spellings) before any credential is read: one that is also a credential's
/// header would remove every credential it carries, so every request would
/// fail. Refused, naming both fields.
fn check_identity_not_carrier(
    identity: &[(HeaderName, String)],
    carriers: &[(HeaderName, String)],
) -> Result<(), String> {
    for (name, field) in identity {
        for removed in strip_names(name) {
            if let Some((_, carrier)) = carriers.iter().find(|(c, _)| *c == removed) {
                let how = if removed == *name {
                    String::new()
                } else {
                    format!(" (as {removed:?}, its `_` spelling, also removed)")
                };
                return Err(format!(
                    "{field}: {name:?} is also a credential header{how}, read by {carrier}; identity headers are removed from every request before credentials are read, so every request would lose its credential: write the identity to another header (e.g. x-auth-user)"
                ));
            }
        }
    }
    Ok(())
}

fn check_path(field: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{field}: {path:?} must start with `/`"));
    }
    Ok(())
}

/// A rule's `match.prefix` or `match.path`: a path as filters see it, so that
/// the rule can match at all. Filters get the path without its query, after the
/// host's normalization (docs/config.md, `normalize_path`, on by default): dot
/// segments resolved, escapes of unreserved characters decoded and the others'
/// hex in upper case. A rule written otherwise would never match, and the
/// request would fall through to a later, perhaps public, rule. `*` is no
/// wildcard: a prefix already matches everything under it.
fn check_rule_path(field: &str, path: &str) -> Result<(), String> {
    check_path(field, path)?;
    let never = |why: String| Err(format!("{field}: {path:?} would never match: {why}"));
    if let Some(q) = path.find('?') {
        return never(format!(
            "rules match the path without its query; remove {:?} (a rule cannot match on the query)",
            &path[q..]
        ));
    }
    if path.contains('#') {
        return never("a fragment (`#...`) is never sent; remove it".to_owned());
    }
    if path.contains('*') {
        return never(
            "`*` is not a wildcard: `prefix` matches every path that starts with it (`prefix: /api/` for `/api/*`); `path` is one exact path"
                .to_owned(),
        );
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return never(
            "the host resolves `.` and `..` segments before filters run (`normalize_path`); write the resolved path"
                .to_owned(),
        );
    }
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'%' => {
                let Some(hex) = b
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                else {
                    return never(format!(
                        "at byte {i}: `%` must start an escape of two hex digits (`%25` for `%` itself)"
                    ));
                };
                // Two ASCII hex digits: always valid UTF-8 and a u8.
                let text = std::str::from_utf8(hex).unwrap_or("00");
                let decoded = u8::from_str_radix(text, 16).unwrap_or(0);
                if decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded) {
                    return never(format!(
                        "at byte {i}: the host decodes `%{text}` to `{}` before filters run; write `{}`",
                        decoded as char, decoded as char
                    ));
                }
                if hex.iter().any(u8::is_ascii_lowercase) {
                    return never(format!(
                        "at byte {i}: the host writes escapes in upper case before filters run; write `%{}`",
                        text.to_ascii_uppercase()
                    ));
                }
                i += 3;
            }
            c if c.is_ascii_alphanumeric() || b"-._~!$&'()+,;=:@/".contains(&c) => i += 1,
            b' ' => return never(format!("at byte {i}: a space arrives percent-encoded; write `%20`")),
            c if c.is_ascii_control() => {
                return never(format!("at byte {i}: control characters are not allowed"))
            }
            _ => {
                return never(format!(
                    "at byte {i}: this character arrives percent-encoded (UTF-8 bytes as `%XX`, upper case)"
                ))
            }
        }
    }
    Ok(())
}

/// A callout's path: origin-form (RFC 9112 3.2.1), a path and an optional
/// query as they go on a request line: `/` first, then RFC 3986 `pchar`s,
/// `/`, `?` and `%XX` escapes; no spaces, controls or fragment.
fn check_origin_form(field: &str, path: &str) -> Result<(), String> {
    check_path(field, path)?;
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let why = match c {
            b'#' => "a fragment (`#...`) is never sent: remove it",
            b' ' => "a space must be percent-encoded (`%20`)",
            b'%' if b
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
            {
                i += 3;
                continue;
            }
            b'%' => "`%` must start an escape of two hex digits (`%25` for `%` itself)",
            c if c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&c) => {
                i += 1;
                continue;
            }
            c if c.is_ascii_control() => "control characters are not allowed",
            _ => "this character must be percent-encoded",
        };
        return Err(format!(
            "{field}: {path:?} is not a request path (origin-form `/path?query`): at byte {i}: {why}"
        ));
    }
    Ok(())
}

/// A callout's `:authority`: `host[:port]`: a name or IPv4 address, or an
/// IPv6 address in brackets, and an optional port 1..=65535; no scheme,
/// user info or path.
fn check_authority(field: &str, authority: &str) -> Result<(), String> {
    let bad = || {
        Err(format!(
            "{field}: {authority:?} is not `host[:port]` (e.g. id.example.com or id.example.com:8443; IPv6 in brackets): no scheme, user info, path or spaces"
        ))
    };
    let (host_ok, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let Some((v6, after)) = rest.split_once(']') else {
                return bad();
            };
            let port = match after {
                "" => None,
                a => match a.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => return bad(),
                },
            };
            let ok = v6.contains(':')
                && v6
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
            (ok, port)
        }
        None => {
            let (h, port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            let ok = !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            (ok, port)
        }
    };
    let port_ok = port.is_none_or(|p| {
        (1..=5).contains(&p.len())
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|n| n > 0)
    });
    if host_ok && port_ok {
        Ok(())
    } else {
        bad()
    }
}

/// A realm goes into a quoted-string of `WWW-Authenticate`.
fn check_realm(field: &str, realm: &str) -> Result<(), String> {
    if realm.is_empty() || realm.contains(['"', '\\']) || realm.chars().any(char::is_control) {
        return Err(format!(
            "{field}: must not contain quotes, backslashes or control characters, and not be empty (got {realm:?})"
        ));
    }
    Ok(())
}

const SECONDS: u64 = 1_000_000_000;

impl Config {
    /// Validate into [`Settings`]; the error names the field in the SDK's form,
    /// ``invalid config: field `PATH`: WHAT`` (see [`sdk_form`]), so the host
    /// places it at that key's `file:line:col`.
    pub fn validate(self) -> Result<Settings, String> {
        self.check().map_err(sdk_form)
    }

    /// [`Config::validate`]'s checks; each message starts with the key path it
    /// is about (`providers[0].issuer: ...`).
    fn check(self) -> Result<Settings, String> {
        check_realm("realm", &self.realm)?;
        let mut names: HashMap<String, AuthnRef> = HashMap::new();
        let mut add_name = |field: &str, name: &str, r: AuthnRef| -> Result<(), String> {
            if name.is_empty() {
                return Err(format!("{field}: must not be empty"));
            }
            if names.insert(name.to_owned(), r).is_some() {
                return Err(format!(
                    "{field}: {name:?} is already used by another provider, api_keys or basic entry; names must be unique"
                ));
            }
            Ok(())
        };

        // Every header a credential is read from, with the field saying so.
        let mut carriers: Vec<(HeaderName, String)> = Vec::new();
        let mut providers = Vec::new();
        for (i, p) in self.providers.into_iter().enumerate() {
            let f = format!("providers[{i}]");
            add_name(&format!("{f}.name"), &p.name, AuthnRef::Jwt(i))?;
            if p.issuer.is_empty() {
                return Err(format!(
                    "{f}.issuer: must not be empty (the token's `iss` claim)"
                ));
            }
            let mut algorithms = Vec::new();
            for (j, a) in p.algorithms.iter().enumerate() {
                algorithms.push(Algorithm::parse(a).ok_or_else(|| {
                    format!(
                        "{f}.algorithms[{j}]: {a:?} is not supported (HS256, RS256, RS384, RS512, ES256, ES384, EdDSA)"
                    )
                })?);
            }
            let inline = match p.jwks {
                Some(v) => Some(Jwks::from_value(&v).map_err(|e| format!("{f}.jwks: {e}"))?),
                None => None,
            };
            if let Some(k) = &inline {
                if k.keys.is_empty() {
                    return Err(format!("{f}.jwks: has no usable key"));
                }
            }
            let remote = match p.remote_jwks {
                Some(r) => {
                    if r.cluster.is_empty() {
                        return Err(format!("{f}.remote_jwks.cluster: must not be empty"));
                    }
                    check_origin_form(&format!("{f}.remote_jwks.path"), &r.path)?;
                    if let Some(a) = &r.authority {
                        check_authority(&format!("{f}.remote_jwks.authority"), a)?;
                    }
                    if r.refresh_interval_s == 0 {
                        return Err(format!(
                            "{f}.remote_jwks.refresh_interval_s: must be at least 1"
                        ));
                    }
                    if r.min_refetch_interval_s == 0 {
                        return Err(format!(
                            "{f}.remote_jwks.min_refetch_interval_s: must be at least 1: a token with an unknown `kid` triggers a fetch at most once per interval per worker, and 0 would let any client make the plugin fetch the JWKS on every request (the default is {})",
                            default_refetch()
                        ));
                    }
                    if r.timeout_ms == 0 || r.timeout_ms > 30_000 {
                        return Err(format!(
                            "{f}.remote_jwks.timeout_ms: {} is outside 1..=30000",
                            r.timeout_ms
                        ));
                    }
                    Some(RemoteJwks {
                        cluster: r.cluster,
                        path: r.path,
                        authority: r.authority,
                        refresh_ns: r.refresh_interval_s.saturating_mul(SECONDS),
                        min_refetch_ns: r.min_refetch_interval_s.saturating_mul(SECONDS),
                        timeout_ms: r.timeout_ms,
                    })
                }
                None => None,
            };
            if inline.is_none() && remote.is_none() {
                return Err(format!(
                    "{f}: needs keys: set `jwks` (inline JWKS) and/or `remote_jwks`"
                ));
            }
            let from = sources(
                &format!("{f}.from"),
                &p.from,
                Source::Header {
                    name: "authorization".into(),
                    prefix: Some("Bearer ".to_owned()),
                },
            )?;
            carriers.extend(source_carriers(&format!("{f}.from"), &p.from, &from));
            let mut claim_to_headers = Vec::new();
            for (j, c) in p.claim_to_headers.into_iter().enumerate() {
                let cf = format!("{f}.claim_to_headers[{j}]");
                if c.claim.is_empty() {
                    return Err(format!("{cf}.claim: must not be empty"));
                }
                let header = header_name(&format!("{cf}.header"), &c.header)?;
                claim_to_headers.push(ClaimHeader {
                    claim: c.claim,
                    header,
                });
            }
            let (cache_size, cache_max_token) = p
                .cache
                .map_or((DEFAULT_CACHE_SIZE, DEFAULT_CACHE_MAX_TOKEN), |c| {
                    (c.size, c.max_token_size)
                });
            if cache_size > MAX_CACHE_SIZE {
                return Err(format!(
                    "{f}.cache.size: {cache_size} is above {MAX_CACHE_SIZE} (each entry holds a token and its claims, per worker; 0 disables the cache)"
                ));
            }
            if cache_max_token == 0 || cache_max_token > crate::jwt::MAX_TOKEN_LEN {
                return Err(format!(
                    "{f}.cache.max_token_size: {cache_max_token} is not between 1 and {} (the longest token accepted at all); to turn the cache off, set cache.size: 0",
                    crate::jwt::MAX_TOKEN_LEN
                ));
            }
            if p.clock_skew_s > MAX_SKEW_S {
                return Err(format!(
                    "{f}.clock_skew_s: {} is above {MAX_SKEW_S} (5 minutes, the usual upper bound; every second of skew keeps an expired token valid that much longer): keep the clocks in sync (NTP) and use a smaller value (default {})",
                    p.clock_skew_s,
                    default_skew()
                ));
            }
            providers.push(Provider {
                name: p.name,
                issuer: p.issuer,
                audiences: p.audiences,
                algorithms,
                inline,
                remote,
                skew_s: p.clock_skew_s,
                require_exp: p.require_exp,
                from,
                claim_to_headers,
                forward_token: p.forward_token,
                cache_size,
                cache_max_token,
            });
        }

        let mut api_keys = Vec::new();
        for (i, a) in self.api_keys.into_iter().enumerate() {
            let f = format!("api_keys[{i}]");
            add_name(&format!("{f}.name"), &a.name, AuthnRef::ApiKey(i))?;
            let from = sources(
                &format!("{f}.from"),
                &a.from,
                Source::Header {
                    name: "x-api-key".into(),
                    prefix: None,
                },
            )?;
            carriers.extend(source_carriers(&format!("{f}.from"), &a.from, &from));
            if a.keys.is_empty() {
                return Err(format!("{f}.keys: must list at least one key"));
            }
            let mut keys = HashMap::new();
            for (j, k) in a.keys.into_iter().enumerate() {
                let kf = format!("{f}.keys[{j}]");
                if k.id.is_empty() || k.id.bytes().any(|b| b < 0x20 || b == 0x7f) {
                    return Err(format!("{kf}.id: must be non-empty printable text"));
                }
                let digest = parse_hex32(&k.sha256).ok_or_else(|| {
                    format!(
                        "{kf}.sha256: expected 64 hex digits (the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`)"
                    )
                })?;
                if keys.insert(digest, k.id).is_some() {
                    return Err(format!("{kf}.sha256: the same key is listed twice"));
                }
            }
            api_keys.push(ApiKeys {
                name: a.name,
                from,
                keys,
                id_header: header_name(&format!("{f}.id_header"), &a.id_header)?,
                forward_key: a.forward_key,
            });
        }

        let mut basic = Vec::new();
        for (i, b) in self.basic.into_iter().enumerate() {
            let f = format!("basic[{i}]");
            add_name(&format!("{f}.name"), &b.name, AuthnRef::Basic(i))?;
            carriers.push((
                "authorization".into(),
                format!("{f} (Basic credentials come in `authorization`)"),
            ));
            let users =
                Htpasswd::parse(&b.htpasswd).map_err(|(j, e)| format!("{f}.htpasswd[{j}]: {e}"))?;
            if let Some(r) = &b.realm {
                check_realm(&format!("{f}.realm"), r)?;
            }
            basic.push(Basic {
                name: b.name,
                realm: b.realm.unwrap_or_else(|| self.realm.clone()),
                users,
                user_header: header_name(&format!("{f}.user_header"), &b.user_header)?,
                forward_credentials: b.forward_credentials,
            });
        }

        let ext_authz = match self.ext_authz {
            Some(e) => {
                if e.cluster.is_empty() {
                    return Err("ext_authz.cluster: must not be empty".to_owned());
                }
                check_origin_form("ext_authz.path", &e.path)?;
                if e.method.is_empty() || !e.method.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(format!(
                        "ext_authz.method: {:?} is not an HTTP method (e.g. GET, POST)",
                        e.method
                    ));
                }
                if e.timeout_ms == 0 || e.timeout_ms > 30_000 {
                    return Err(format!(
                        "ext_authz.timeout_ms: {} is outside 1..=30000",
                        e.timeout_ms
                    ));
                }
                if !(200..=599).contains(&e.status_on_error) {
                    return Err(format!(
                        "ext_authz.status_on_error: {} is outside 200..=599",
                        e.status_on_error
                    ));
                }
                let list = |field: &str, v: &[String]| -> Result<Vec<HeaderName>, String> {
                    let mut out: Vec<HeaderName> = Vec::new();
                    for (j, h) in v.iter().enumerate() {
                        let f = format!("ext_authz.{field}[{j}]");
                        let name = header_name(&f, h)?;
                        if out.contains(&name) {
                            return Err(format!(
                                "{f}: {name:?} is listed twice (names are compared without case); its values would be copied twice: remove one"
                            ));
                        }
                        out.push(name);
                    }
                    Ok(out)
                };
                let forward_headers = list("forward_headers", &e.forward_headers)?;
                for (j, h) in forward_headers.iter().enumerate() {
                    let f = format!("ext_authz.forward_headers[{j}]");
                    if HOST_OWNED.contains(&&**h) {
                        return Err(format!(
                            "{f}: {h:?} is a connection or framing field, which the host refuses in a callout: a request carrying it would fail its check (and pass unchecked with `failure_mode_allow`); remove it"
                        ));
                    }
                    if CHECK_OWN.contains(&&**h) {
                        return Err(format!(
                            "{f}: {h:?} is sent by the plugin itself (the request's method, URI and host); forwarding the client's copy would put it beside the plugin's: remove it"
                        ));
                    }
                }
                let client_headers = match &e.client_headers {
                    Some(v) => Some(list("client_headers", v)?),
                    None => None,
                };
                for (j, h) in client_headers.iter().flatten().enumerate() {
                    if HOST_OWNED.contains(&&**h) {
                        return Err(format!(
                            "ext_authz.client_headers[{j}]: {h:?} is a connection or framing field: in the plugin's answer the host drops it or sets its own (`content-length`), so the check service's value would never reach the client; remove it"
                        ));
                    }
                }
                Some(ExtAuthz {
                    forward_headers,
                    upstream_headers: list("upstream_headers", &e.upstream_headers)?,
                    client_headers,
                    cluster: e.cluster,
                    path: e.path,
                    method: e.method,
                    timeout_ms: e.timeout_ms,
                    failure_mode_allow: e.failure_mode_allow,
                    status_on_error: e.status_on_error,
                })
            }
            None => None,
        };

        let all: Vec<AuthnRef> = (0..providers.len())
            .map(AuthnRef::Jwt)
            .chain((0..api_keys.len()).map(AuthnRef::ApiKey))
            .chain((0..basic.len()).map(AuthnRef::Basic))
            .collect();
        let rules = match self.rules {
            None => {
                if all.is_empty() && ext_authz.is_none() {
                    return Err(
                        "nothing to do: configure `providers`, `api_keys`, `basic` or `ext_authz`"
                            .to_owned(),
                    );
                }
                vec![Rule {
                    matcher: Match::Prefix("/".to_owned()),
                    any: all,
                    allow_missing: false,
                    claims: Vec::new(),
                    ext_authz: true,
                }]
            }
            Some(rules) if rules.is_empty() => {
                return Err(
                    "rules: an empty list matches no request, so every request would be refused (403, no rule); list at least one rule (e.g. `{match: {prefix: /}, public: true}` last), or remove `rules` to require any configured authenticator on every path"
                        .to_owned(),
                );
            }
            Some(rules) => {
                let mut out = Vec::new();
                for (i, r) in rules.into_iter().enumerate() {
                    let f = format!("rules[{i}]");
                    let matcher = match (r.matcher.prefix, r.matcher.path) {
                        (Some(p), None) => {
                            check_rule_path(&format!("{f}.match.prefix"), &p)?;
                            Match::Prefix(p)
                        }
                        (None, Some(p)) => {
                            check_rule_path(&format!("{f}.match.path"), &p)?;
                            Match::Path(p)
                        }
                        _ => return Err(format!("{f}.match: set exactly one of `prefix`, `path`")),
                    };
                    let mut any = Vec::new();
                    match (&r.requires, r.public) {
                        (Some(_), true) => {
                            return Err(format!(
                                "{f}: `public: true` and `requires` contradict each other; keep one"
                            ))
                        }
                        (None, false) if ext_authz.is_none() || !r.ext_authz => {
                            return Err(format!(
                                "{f}: says nothing: set `requires: {{any: [...]}}` or `public: true`"
                            ))
                        }
                        _ => {}
                    }
                    if let Some(req) = &r.requires {
                        if req.any.is_empty() {
                            return Err(format!(
                                "{f}.requires.any: must name at least one authenticator"
                            ));
                        }
                        for (j, n) in req.any.iter().enumerate() {
                            let a = names.get(n).copied().ok_or_else(|| {
                                let mut known: Vec<&String> = names.keys().collect();
                                known.sort();
                                format!(
                                    "{f}.requires.any[{j}]: no provider, api_keys or basic entry is named {n:?} (known: {known:?})"
                                )
                            })?;
                            any.push(a);
                        }
                    } else if r.allow_missing {
                        return Err(format!("{f}.allow_missing: only valid with `requires`"));
                    }
                    if !r.claims.is_empty() {
                        check_claims_rule(&f, r.requires.as_ref(), r.allow_missing, &any)?;
                    }
                    let mut claims: Vec<(String, Vec<String>)> = r.claims.into_iter().collect();
                    claims.sort();
                    for (c, v) in &claims {
                        if v.is_empty() {
                            return Err(format!(
                                "{f}.claims.{c}: list at least one accepted value"
                            ));
                        }
                    }
                    out.push(Rule {
                        matcher,
                        any,
                        allow_missing: r.allow_missing,
                        claims,
                        ext_authz: r.ext_authz && !r.public,
                    });
                }
                out
            }
        };
        let identity = identity_headers(&providers, &api_keys, &basic, ext_authz.as_ref());
        for (name, field) in &identity {
            if HOST_OWNED.contains(&&**name) {
                return Err(format!(
                    "{field}: {name:?} is a connection or framing field, which the host owns and a filter cannot write or remove; use another header name (e.g. x-auth-user)"
                ));
            }
        }
        check_identity_not_carrier(&identity, &carriers)?;
        let mut strip_headers: Vec<HeaderName> =
            identity.iter().flat_map(|(h, _)| strip_names(h)).collect();
        strip_headers.sort();
        strip_headers.dedup();
        Ok(Settings {
            bypass_cors_preflight: self.bypass_cors_preflight,
            realm: self.realm,
            providers,
            api_keys,
            basic,
            ext_authz,
            rules: rules.into(),
            strip_headers,
        })
    }
}

/// `message` (one of [`Config::check`]'s, `PATH: WHAT`) in the SDK's form,
/// ``invalid config: field `PATH`: WHAT``, the form the SDK's `parse_config`
/// gives a field the schema refuses. The host reads the path from it and
/// places the error at that key's `file:line:col` (a path the YAML does not
/// spell out, a default, falls back to the deepest key it has); the form
/// `PATH: WHAT` was placed at the plugin's `config:` only. A nested index
/// naming a part of the field's value goes into the path too
/// (`providers[0].jwks: keys[1]: ...` is `providers[0].jwks.keys[1]`). A
/// message without a path is `invalid config: WHAT`.
fn sdk_form(message: String) -> String {
    let Some((first, mut rest)) = message.split_once(": ").filter(|(p, _)| is_key_path(p)) else {
        return format!("invalid config: {message}");
    };
    let mut path = first.to_owned();
    while let Some((part, after)) = rest.split_once(": ") {
        if !(part.contains('[') && is_key_path(part)) {
            break;
        }
        path.push('.');
        path.push_str(part);
        rest = after;
    }
    format!("invalid config: field `{path}`: {rest}")
}

/// `a.b[0].c`: keys (ASCII letters, digits, `_`; not starting with a digit),
/// each followed by any number of `[N]` indexes, joined by dots.
fn is_key_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            let (key, mut idx) = part.split_at(part.find('[').unwrap_or(part.len()));
            let key_ok = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            while let Some(inner) = idx.strip_prefix('[') {
                let Some((n, after)) = inner.split_once(']') else {
                    return false;
                };
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return false;
                }
                idx = after;
            }
            key_ok
        })
}

/// A rule with `claims` (`f`: its field path; `any`: its resolved
/// authenticators, in `requires.any` order) must admit a request only with a
/// token whose claims were checked: an API key or Basic credential carries no
/// claims, and `allow_missing` admits a request with no credential at all, so
/// either would let a request through the rule without the check.
fn check_claims_rule(
    f: &str,
    requires: Option<&RequiresConfig>,
    allow_missing: bool,
    any: &[AuthnRef],
) -> Result<(), String> {
    if !any.iter().any(|a| matches!(a, AuthnRef::Jwt(_))) {
        return Err(format!(
            "{f}.claims: needs a JWT provider in `requires.any` (claims come from tokens)"
        ));
    }
    let names = requires.map_or(&[][..], |q| &q.any[..]);
    for (j, a) in any.iter().enumerate() {
        let kind = match a {
            AuthnRef::Jwt(_) => continue,
            AuthnRef::ApiKey(_) => "an api_keys entry",
            AuthnRef::Basic(_) => "a basic entry",
        };
        let name = names.get(j).map_or("", String::as_str);
        return Err(format!(
            "{f}.requires.any[{j}]: {name:?} is {kind}, which carries no claims, so a request it admits would skip the rule's `claims`; list only JWT providers in a rule with `claims` (to let {name:?} in as well, drop `claims` from this rule)"
        ));
    }
    if allow_missing {
        return Err(format!(
            "{f}.allow_missing: a request with no token would pass without the rule's `claims`; remove `allow_missing` or `claims`"
        ));
    }
    Ok(())
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hi = (chunk[0] as char).to_digit(16)?;
        let lo = (chunk[1] as char).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}
