//! The plugin's configuration: the serde schema (`deny_unknown_fields`, every
//! field defaulted) and its validation into [`Cors`], ready for the request
//! path. Errors name the field and say how to fix it, e.g.
//! ``invalid config: field `cors.allowed_origins[0]`: "example.com" is not an origin ...``.

use serde::Deserialize;

/// Headers a gRPC-Web client sends (grpc-web's JS and Rust clients): allowed
/// in preflights unless `cors.allowed_headers` says otherwise.
pub const DEFAULT_ALLOWED_HEADERS: [&str; 6] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "authorization",
    "x-request-id",
];

/// Response headers a browser script may read: the gRPC status of a
/// trailers-only response is in the headers.
pub const DEFAULT_EXPOSE_HEADERS: [&str; 2] = ["grpc-status", "grpc-message"];

/// Preflight cache lifetime, seconds (browsers cap it: Chrome at 2 h).
pub const DEFAULT_MAX_AGE_S: u32 = 86_400;

/// The plugin's `config:` (all optional: `{}` converts gRPC-Web with CORS off).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// CORS for browser clients on other origins; absent: no CORS handling
    /// (preflights pass through to the upstream, no CORS response headers).
    #[serde(default)]
    pub cors: Option<CorsConfig>,
}

/// `cors:` as configured.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed, exactly as browsers send them (`https://app.example.com`,
    /// `http://localhost:8080`), or `"*"` for any.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Request headers a preflight may ask for (case-insensitive).
    #[serde(default)]
    pub allowed_headers: Option<Vec<String>>,
    /// Response headers exposed to scripts.
    #[serde(default)]
    pub expose_headers: Option<Vec<String>>,
    /// How long a browser may cache a preflight answer, seconds.
    #[serde(default)]
    pub max_age_s: Option<u32>,
    /// Allow credentials (cookies, HTTP auth): sends
    /// `access-control-allow-credentials: true`. Refused with `"*"` in
    /// `allowed_origins` (any site could act with the user's session):
    /// the origins must be listed.
    #[serde(default)]
    pub allow_credentials: bool,
}

/// Validated CORS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// `None`: any origin (answered `*`; never with credentials, which
    /// validation refuses with `"*"`).
    pub origins: Option<Vec<String>>,
    /// Lower-case header names.
    pub allowed_headers: Vec<String>,
    /// Lower-case header names.
    pub expose_headers: Vec<String>,
    /// Seconds.
    pub max_age_s: u32,
    /// Credentials allowed.
    pub allow_credentials: bool,
}

impl Cors {
    /// The `access-control-allow-origin` value for a request from `origin`, or
    /// `None` if that origin is not allowed.
    pub fn allow_origin(&self, origin: &str) -> Option<String> {
        match &self.origins {
            None => Some("*".to_owned()),
            Some(list) => list
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin))
                .then(|| origin.to_owned()),
        }
    }
}

impl Config {
    /// Checks the config; `Ok(None)` when CORS is off.
    pub fn validate(&self) -> Result<Option<Cors>, String> {
        let Some(c) = &self.cors else {
            return Ok(None);
        };
        if c.allowed_origins.is_empty() {
            return Err(
                "invalid config: field `cors.allowed_origins`: must list at least one \
                 origin (e.g. \"https://app.example.com\") or \"*\"; remove `cors` to turn \
                 CORS off"
                    .to_owned(),
            );
        }
        let mut origins = Vec::new();
        let mut any = false;
        for (i, o) in c.allowed_origins.iter().enumerate() {
            if o == "*" {
                any = true;
            } else if valid_origin(o) {
                origins.push(o.to_ascii_lowercase());
            } else {
                return Err(format!(
                    "invalid config: field `cors.allowed_origins[{i}]`: {o:?} is not an origin: \
                     write scheme://host[:port] with no path or trailing slash \
                     (e.g. \"https://app.example.com\"), or \"*\" for any"
                ));
            }
        }
        if c.allow_credentials {
            if let Some(i) = c.allowed_origins.iter().position(|o| o == "*") {
                // Browsers refuse `*` with credentials, so honouring it would
                // mean echoing every origin: any site could then call with
                // the user's cookies. Envoy's cors filter does echo; Legate
                // asks for the list instead.
                return Err(format!(
                    "invalid config: field `cors.allowed_origins[{i}]`: \"*\" cannot be used \
                     with `cors.allow_credentials: true` (it would let any site make calls \
                     with the user's cookies and HTTP authentication): list the origins \
                     allowed instead (e.g. \"https://app.example.com\"), or set \
                     `allow_credentials: false`"
                ));
            }
        }
        let names = |field: &str, list: &Option<Vec<String>>, default: &[&str]| {
            let list: Vec<String> = match list {
                None => default.iter().map(|s| (*s).to_owned()).collect(),
                Some(l) => l.clone(),
            };
            for (i, h) in list.iter().enumerate() {
                if h.is_empty() || !h.bytes().all(is_tchar) {
                    return Err(format!(
                        "invalid config: field `cors.{field}[{i}]`: {h:?} is not a header name \
                         (letters, digits and !#$%&'*+-.^_`|~ only)"
                    ));
                }
            }
            Ok(list.iter().map(|h| h.to_ascii_lowercase()).collect())
        };
        Ok(Some(Cors {
            origins: (!any).then_some(origins),
            allowed_headers: names(
                "allowed_headers",
                &c.allowed_headers,
                &DEFAULT_ALLOWED_HEADERS,
            )?,
            expose_headers: names("expose_headers", &c.expose_headers, &DEFAULT_EXPOSE_HEADERS)?,
            max_age_s: c.max_age_s.unwrap_or(DEFAULT_MAX_AGE_S),
            allow_credentials: c.allow_credentials,
        }))
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `scheme://host[:port]` as a browser's `Origin` header carries it.
fn valid_origin(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    let scheme_ok = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 literal's colons are inside brackets.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (rest, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    scheme_ok && host_ok && port_ok
}
