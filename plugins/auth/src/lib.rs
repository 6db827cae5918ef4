//! # legate-plugin-auth: authentication and authorization for Legate
//!
//! A Legate HTTP filter (Wasm component, built with `legate-sdk`) that runs
//! in `on_request_headers`:
//!
//! 1. picks the first `rules[]` entry whose `match` fits the path (none: 403);
//! 2. authenticates with any of the rule's authenticators: JWT providers
//!    ([`jwt`], keys inline or fetched from a cluster with a callout, cached
//!    and refetched on an unknown `kid`; verified tokens remembered per
//!    provider by [`cache`]), API keys (SHA-256 hashes) or HTTP
//!    Basic ([`basic`], htpasswd bcrypt/`{SHA}`); writes the identity (claims,
//!    key id, user) into request headers, after removing client-sent copies;
//! 3. optionally asks an external authorization service (a callout) that
//!    allows (its selected headers go upstream) or denies (its status and
//!    body go back to the client).
//!
//! 401 carries `WWW-Authenticate`; 403 is a policy failure (a rule's claims,
//! no rule) or, as Envoy's jwt_authn, a verified token minted for another
//! audience (with the invalid-token challenge). Tokens, keys and
//! passwords are never logged. See `plugins/auth/README.md` for the schema.

pub mod basic;
pub mod cache;
pub mod config;
pub mod jwt;

use std::cell::RefCell;
use std::rc::Rc;

use legate_sdk::callout::{self, CalloutId, CalloutRequest, CalloutResponse};
use legate_sdk::metrics::Counter;
use legate_sdk::{
    clock, debug, warn, Action, Direction, Error, Exchange, Headers, HttpFilter, LocalResponse,
    Setup,
};
use serde_json::{Map, Value};
use sha2::Digest as _;

use crate::cache::TokenCache;
use crate::config::{AuthnRef, Basic, Config, HeaderName, Provider, Rule, Settings, Source};
use crate::jwt::{Jwk, JwtError};

/// How often `on_tick` looks at remote JWKS ages.
const TICK_MS: u32 = 1000;

/// The request id field the host sets (or keeps) on every request; the
/// ext_authz check carries it.
const REQUEST_ID: &str = "x-request-id";

/// The most fields the host takes in a local response (abi/README.md §5.1):
/// one more and it refuses the response, failing the call, so the client
/// would get the failure policy's `503` instead of an ext_authz denial.
pub const MAX_LOCAL_FIELDS: usize = 1024;
/// The longest field value the host takes in a local response (abi/README.md
/// §5.1), in bytes: a longer one fails the call the same way.
pub const MAX_LOCAL_VALUE: usize = 64 * 1024;

/// Per provider, per instance: the keys fetched from `remote_jwks`.
#[derive(Debug, Default)]
struct KeyCache {
    keys: Vec<Jwk>,
    /// Monotonic ns of the last successful fetch.
    fetched_at: Option<u64>,
    /// Monotonic ns of the last fetch started (any trigger).
    started_at: Option<u64>,
    /// Monotonic ns of the last failed fetch.
    failed_at: Option<u64>,
    /// A refresh sent from `on_tick`, not answered yet.
    tick_fetch: Option<CalloutId>,
    /// SHA-256 of the last JWKS body used: an unchanged refresh keeps the
    /// verified-token cache, a changed one flushes it.
    body_digest: Option<[u8; 32]>,
}

/// What an exchange is waiting for.
#[derive(Debug, Default)]
enum Waiting {
    #[default]
    Nothing,
    /// A JWKS fetch for `providers[provider]`.
    Jwks { provider: usize, id: CalloutId },
    /// The external authorization check.
    ExtAuthz { id: CalloutId },
}

/// Per-exchange state.
#[derive(Debug, Default)]
pub struct Ctx {
    waiting: Waiting,
    /// This exchange already fetched a JWKS: never twice.
    fetched: bool,
    /// The rule that matched.
    rule: Option<usize>,
}

/// Decision counters, one handle per result label.
struct Counters {
    allowed: Counter,
    anonymous: Counter,
    public: Counter,
    /// CORS preflights let through by `bypass_cors_preflight`.
    cors_preflight: Counter,
    missing: Counter,
    invalid: Counter,
    forbidden: Counter,
    no_rule: Counter,
    jwks_unavailable: Counter,
    ext_denied: Counter,
    ext_error: Counter,
    /// Headers of ext_authz denials not passed to the client: over the
    /// host's caps on a local response ([`MAX_LOCAL_FIELDS`],
    /// [`MAX_LOCAL_VALUE`]).
    ext_headers_dropped: Counter,
    jwks_ok: Counter,
    /// Fetched and used, with malformed keys skipped.
    jwks_partial: Counter,
    jwks_error: Counter,
    /// Per provider (same index).
    providers: Vec<ProviderCounters>,
    /// Per `basic` entry (same index): password hashes computed, an unknown
    /// user's included (remembered successes compute none).
    basic_checks: Vec<Counter>,
}

/// Per-provider token cache and signature-check counters.
struct ProviderCounters {
    /// A token served from the cache: no signature check.
    cache_hit: Counter,
    /// A token looked up and not found (then verified).
    cache_miss: Counter,
    /// Signature checks run (whatever the cache).
    signature_checks: Counter,
}

impl Counters {
    fn define(providers: &[Provider], basic: &[Basic]) -> Result<Counters, String> {
        let d = Counter::define(
            "auth_decisions_total",
            "Requests by authentication/authorization outcome",
            &["result"],
        )
        .map_err(|e| format!("defining auth_decisions_total: {e}"))?;
        let f = Counter::define(
            "auth_jwks_fetches_total",
            "Remote JWKS fetches by result",
            &["result"],
        )
        .map_err(|e| format!("defining auth_jwks_fetches_total: {e}"))?;
        let l = |c: &Counter, v: &str| {
            c.with_labels(&[v])
                .map_err(|e| format!("defining auth metric label {v}: {e}"))
        };
        let cache = Counter::define(
            "auth_jwt_cache_total",
            "Verified-token cache lookups by provider and result (hit: no signature check)",
            &["provider", "result"],
        )
        .map_err(|e| format!("defining auth_jwt_cache_total: {e}"))?;
        let checks = Counter::define(
            "auth_jwt_signature_checks_total",
            "JWT signature verifications run, by provider",
            &["provider"],
        )
        .map_err(|e| format!("defining auth_jwt_signature_checks_total: {e}"))?;
        let mut per_provider = Vec::new();
        for p in providers {
            let n = p.name.as_str();
            let err = |e| format!("defining auth metric labels for provider {n:?}: {e}");
            per_provider.push(ProviderCounters {
                cache_hit: cache.with_labels(&[n, "hit"]).map_err(err)?,
                cache_miss: cache.with_labels(&[n, "miss"]).map_err(err)?,
                signature_checks: checks.with_labels(&[n]).map_err(err)?,
            });
        }
        let ext_headers_dropped = Counter::define(
            "auth_ext_authz_denial_headers_dropped_total",
            "Headers of ext_authz denials not passed to the client (over the host's caps on a local response)",
            &[],
        )
        .map_err(|e| format!("defining auth_ext_authz_denial_headers_dropped_total: {e}"))?;
        let hashes = Counter::define(
            "auth_basic_password_checks_total",
            "Basic password hashes computed, by basic entry (unknown users included)",
            &["basic"],
        )
        .map_err(|e| format!("defining auth_basic_password_checks_total: {e}"))?;
        let basic_checks = basic
            .iter()
            .map(|b| {
                hashes
                    .with_labels(&[b.name.as_str()])
                    .map_err(|e| format!("defining auth metric labels for basic {:?}: {e}", b.name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Counters {
            providers: per_provider,
            basic_checks,
            allowed: l(&d, "allowed")?,
            anonymous: l(&d, "anonymous")?,
            public: l(&d, "public")?,
            cors_preflight: l(&d, "cors_preflight")?,
            missing: l(&d, "missing_credentials")?,
            invalid: l(&d, "invalid_credentials")?,
            forbidden: l(&d, "forbidden")?,
            no_rule: l(&d, "no_rule")?,
            jwks_unavailable: l(&d, "jwks_unavailable")?,
            ext_denied: l(&d, "ext_authz_denied")?,
            ext_error: l(&d, "ext_authz_error")?,
            ext_headers_dropped,
            jwks_ok: l(&f, "ok")?,
            jwks_partial: l(&f, "partial")?,
            jwks_error: l(&f, "error")?,
        })
    }
}

/// What the token cache keeps of a verified token: its claims, shared with the
/// requests it authenticates, and its validity window, all a hit rechecks.
type Verified = (Rc<Map<String, Value>>, jwt::Window);

/// The auth filter.
pub struct AuthFilter {
    s: Settings,
    caches: Vec<KeyCache>,
    counters: Counters,
    /// Per provider (same index): tokens it verified. Clients reuse tokens,
    /// and a signature check costs far more than the time checks, which
    /// still run on every hit (issuer and audience are fixed per token).
    /// Flushed when that provider's remote JWKS changes (a removed key must
    /// stop working). RefCell: verification runs under `&self` while the
    /// settings are borrowed.
    tokens: Vec<RefCell<TokenCache<Verified>>>,
}

/// The identity to write into the request once authenticated.
#[derive(Debug, Default)]
struct Identity {
    set: Vec<(HeaderName, String)>,
    remove: Vec<HeaderName>,
}

/// Result of trying a rule's authenticators.
#[derive(Debug)]
enum Authn {
    Ok(Identity),
    /// No credential for any authenticator.
    Missing,
    /// A credential was present and bad; `token`: a JWT provider's was
    /// (the Bearer challenge then says `error="invalid_token"`).
    Invalid {
        reason: String,
        token: bool,
    },
    /// Authenticated, but the rule's claims are not met.
    Forbidden(String),
    /// A token verified (signature, issuer, time) but minted for another
    /// audience: 403, as Envoy's `JwtAudienceNotAllowed`.
    Audience(String),
    /// `providers[i]` needs a JWKS fetch first.
    NeedKeys(usize),
    /// `providers[i]` has no keys and cannot fetch now.
    KeysUnavailable(usize),
}

impl HttpFilter for AuthFilter {
    type Config = Config;
    type Context = Ctx;

    fn configure(config: Config) -> Result<Self, String> {
        let s = config.validate()?;
        // A cluster the plugin may not call would fail every request that
        // needs it: refused at load instead, placed at its key (the host adds
        // what to grant).
        let remote = s.providers.iter().enumerate().filter_map(|(i, p)| {
            let r = p.remote.as_ref()?;
            Some((format!("providers[{i}].remote_jwks.cluster"), &r.cluster))
        });
        let authz = s
            .ext_authz
            .iter()
            .map(|a| ("ext_authz.cluster".to_owned(), &a.cluster));
        for (path, cluster) in remote.chain(authz) {
            match legate_sdk::callout::check_cluster(cluster) {
                Ok(()) => {}
                Err(legate_sdk::Error::Denied) => {
                    return Err(format!(
                        "invalid config: field `{path}`: this plugin may not call cluster \
                         `{cluster}`"
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "invalid config: field `{path}`: cluster `{cluster}` could not be \
                         checked ({e})"
                    ))
                }
            }
        }
        // The host removes them from every request of the listener, before
        // any filter and on every route: also where a route disables this
        // plugin or runs it with another config, so a forged identity never
        // reaches an upstream (as Envoy's jwt_authn sanitizes filter-wide).
        let strip: Vec<&str> = s.strip_headers.iter().map(|h| &**h).collect();
        legate_sdk::sanitize_request_headers(&strip).map_err(|e| {
            format!(
                "the host refused the {} identity header names to remove from requests \
                 (with their `_` spellings): {e}",
                strip.len()
            )
        })?;
        let counters = Counters::define(&s.providers, &s.basic)?;
        for b in &s.basic {
            if b.users.max_bcrypt_cost > basic::BCRYPT_COST_WARN {
                warn!(
                    "auth: basic {:?} has bcrypt cost {}: a first check may exceed the plugin's call deadline (raise limits.cpu or use cost <= {})",
                    b.name,
                    b.users.max_bcrypt_cost,
                    basic::BCRYPT_COST_WARN
                );
            }
        }
        let caches = s.providers.iter().map(|_| KeyCache::default()).collect();
        let tokens = s
            .providers
            .iter()
            .map(|p| RefCell::new(TokenCache::new(p.cache_size, p.cache_max_token)))
            .collect();
        Ok(AuthFilter {
            s,
            caches,
            counters,
            tokens,
        })
    }

    fn setup(&self) -> Setup {
        let setup = Setup::new().on_request_headers();
        if self.s.providers.iter().any(|p| p.remote.is_some()) {
            setup.tick_every_ms(TICK_MS)
        } else {
            setup
        }
    }

    fn on_request_headers(
        &mut self,
        ctx: &mut Ctx,
        exchange: &Exchange<'_>,
        headers: &Headers<'_>,
        _end_of_stream: bool,
    ) -> Action {
        let action = self.request_headers(ctx, exchange, headers);
        settle(ctx, exchange, &action);
        action
    }

    fn on_callout_response(
        &mut self,
        ctx: &mut Ctx,
        exchange: &Exchange<'_>,
        id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) -> Action {
        let action = self.callout_response(ctx, exchange, id, response);
        settle(ctx, exchange, &action);
        action
    }

    fn on_tick(&mut self) {
        let now = clock::monotonic_now();
        for (i, p) in self.s.providers.iter().enumerate() {
            let Some(r) = &p.remote else { continue };
            let c = &mut self.caches[i];
            if c.tick_fetch.is_some() {
                // The host delivers every callout (a timeout at worst); a
                // refresh unanswered long after its timeout is forgotten so
                // refreshing can never stop for good.
                let limit = u64::from(r.timeout_ms) * 2_000_000 + 5_000_000_000;
                if c.started_at.is_some_and(|t| now.saturating_sub(t) < limit) {
                    continue;
                }
                c.tick_fetch = None;
            }
            let due = c
                .fetched_at
                .is_none_or(|t| now.saturating_sub(t) >= r.refresh_ns);
            // After a failure, wait before retrying (at least a second).
            let backoff = r.min_refetch_ns.max(1_000_000_000);
            let cooled = c.failed_at.is_none_or(|t| now.saturating_sub(t) >= backoff)
                && c.started_at
                    .is_none_or(|t| now.saturating_sub(t) >= 1_000_000_000);
            if due && cooled {
                c.started_at = Some(now);
                match callout::send(&jwks_request(p)) {
                    Ok(id) => c.tick_fetch = Some(id),
                    Err(e) => {
                        c.failed_at = Some(now);
                        self.counters.jwks_error.inc();
                        warn!("auth: provider {:?}: JWKS refresh not sent: {e}", p.name);
                    }
                }
            }
        }
    }

    fn on_tick_callout_response(
        &mut self,
        id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) {
        if let Some(i) = self.caches.iter().position(|c| c.tick_fetch == Some(id)) {
            self.caches[i].tick_fetch = None;
            self.jwks_arrived(i, response);
        }
    }
}

legate_sdk::export!(AuthFilter);

/// After a call: once the decision is made (no callout awaited), this filter
/// needs no more calls for the exchange, not even `on-done` (its context is
/// dropped now). `detach` fails only with a callout outstanding, which a
/// `pause` means: then the callout's response decides.
fn settle(ctx: &Ctx, exchange: &Exchange<'_>, action: &Action) {
    if !matches!(action, Action::Pause) && matches!(ctx.waiting, Waiting::Nothing) {
        let _ = exchange.detach();
    }
}

fn jwks_request(p: &Provider) -> CalloutRequest {
    let Some(r) = &p.remote else {
        return CalloutRequest::new("", "GET", "/");
    };
    let mut req = CalloutRequest::new(r.cluster.clone(), "GET", r.path.clone())
        .header("accept", "application/json")
        .timeout_ms(r.timeout_ms);
    if let Some(a) = &r.authority {
        req = req.authority(a.clone());
    }
    req
}

/// A state the plugin's own logic rules out: refuse the request (500) rather
/// than let it through unchecked, and say so in the log.
fn internal_error(what: &str) -> Action {
    warn!("auth: internal error, request refused: {what}");
    Action::Respond(json_response(
        500,
        "internal",
        "authentication could not complete",
        "auth_internal_error",
    ))
}

fn json_response(status: u16, error: &str, reason: &str, details: &str) -> LocalResponse {
    let body = serde_json::json!({ "error": error, "reason": reason }).to_string() + "\n";
    LocalResponse::new(status)
        .header("content-type", "application/json")
        .body(body)
        .details(details)
}

impl AuthFilter {
    /// The request-headers phase (before [`settle`]).
    fn request_headers(
        &mut self,
        ctx: &mut Ctx,
        exchange: &Exchange<'_>,
        headers: &Headers<'_>,
    ) -> Action {
        // The identity headers are gone already (the host removed them,
        // `configure`): a preflight reaches the
        // upstream with no identity, as any unauthenticated request.
        if self.s.bypass_cors_preflight && is_cors_preflight(exchange, headers) {
            self.counters.cors_preflight.inc();
            return Action::Continue;
        }
        let path = exchange.path();
        let path_only = path.split('?').next().unwrap_or("");
        let Some(rule_idx) = self
            .s
            .rules
            .iter()
            .position(|r| r.matcher.matches(path_only))
        else {
            self.counters.no_rule.inc();
            return Action::Respond(json_response(
                403,
                "forbidden",
                "no auth rule matches this path",
                "auth_no_rule",
            ));
        };
        ctx.rule = Some(rule_idx);
        if self.s.rules[rule_idx].any.is_empty() && !self.s.rules[rule_idx].ext_authz {
            self.counters.public.inc();
            return Action::Continue;
        }
        self.decide(ctx, exchange, headers, Some(&path))
    }

    /// A callout's response (before [`settle`]).
    fn callout_response(
        &mut self,
        ctx: &mut Ctx,
        exchange: &Exchange<'_>,
        id: CalloutId,
        response: Result<CalloutResponse, Error>,
    ) -> Action {
        match std::mem::take(&mut ctx.waiting) {
            Waiting::Jwks { provider, id: want } if want == id => {
                self.jwks_arrived(provider, response);
                let Some(headers) = exchange.headers(Direction::Request) else {
                    // Cannot happen (the request head exists while its
                    // headers phase is paused); never let a request through
                    // unchecked.
                    return internal_error("request headers unavailable after a JWKS fetch");
                };
                self.decide(ctx, exchange, &headers, None)
            }
            Waiting::ExtAuthz { id: want } if want == id => {
                self.ext_authz_arrived(exchange, response)
            }
            other => {
                // Not the callout this exchange waits for (there is only one
                // at a time, so this is defensive): keep waiting if paused.
                let waiting = !matches!(other, Waiting::Nothing);
                ctx.waiting = other;
                if waiting {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
        }
    }

    /// Authenticate with the matched rule, then run ext_authz or answer.
    /// `path`: the request path if the caller has it (else asked from the host).
    fn decide(
        &mut self,
        ctx: &mut Ctx,
        exchange: &Exchange<'_>,
        headers: &Headers<'_>,
        path: Option<&str>,
    ) -> Action {
        let Some(rule_idx) = ctx.rule else {
            // Cannot happen (set before any call here): fail closed.
            return internal_error("no rule recorded for the exchange");
        };
        let rules = std::rc::Rc::clone(&self.s.rules);
        let rule = &rules[rule_idx];
        let path = match path {
            Some(p) => std::borrow::Cow::Borrowed(p),
            None => std::borrow::Cow::Owned(exchange.path()),
        };
        let result = if rule.any.is_empty() {
            Authn::Missing
        } else {
            self.authenticate(rule, headers, &path, !ctx.fetched)
        };
        match result {
            Authn::Ok(identity) => {
                for h in &identity.remove {
                    let _ = headers.remove(h);
                }
                for (n, v) in &identity.set {
                    if let Err(e) = headers.set(n, v) {
                        // An unusual claim value (e.g. a control character):
                        // skip the header rather than fail the request.
                        debug!("auth: header {n} not set: {e}");
                    }
                }
                self.authorized(ctx, exchange, headers, rule, true)
            }
            Authn::Missing if rule.allow_missing || rule.any.is_empty() => {
                self.authorized(ctx, exchange, headers, rule, false)
            }
            Authn::Missing => {
                self.counters.missing.inc();
                Action::Respond(self.unauthorized(rule, None, false))
            }
            Authn::Invalid { reason, token } => {
                self.counters.invalid.inc();
                debug!(
                    "auth: {} {}: rejected: {reason}",
                    exchange.method(),
                    exchange.request_id()
                );
                Action::Respond(self.unauthorized(rule, Some(&reason), token))
            }
            Authn::Audience(reason) => {
                self.counters.invalid.inc();
                debug!(
                    "auth: {} {}: rejected: {reason}",
                    exchange.method(),
                    exchange.request_id()
                );
                // Envoy's jwt_authn: 403 with the invalid-token challenge.
                let challenge =
                    format!("Bearer realm=\"{}\", error=\"invalid_token\"", self.s.realm);
                Action::Respond(
                    json_response(403, "forbidden", &reason, "auth_invalid_credentials")
                        .header("www-authenticate", challenge),
                )
            }
            Authn::Forbidden(reason) => {
                self.counters.forbidden.inc();
                debug!("auth: {}: forbidden: {reason}", exchange.request_id());
                let challenge = format!(
                    "Bearer realm=\"{}\", error=\"insufficient_scope\"",
                    self.s.realm
                );
                Action::Respond(
                    json_response(403, "forbidden", &reason, "auth_forbidden")
                        .header("www-authenticate", challenge),
                )
            }
            Authn::NeedKeys(i) => {
                let p = &self.s.providers[i];
                let now = clock::monotonic_now();
                self.caches[i].started_at = Some(now);
                ctx.fetched = true;
                match callout::send(&jwks_request(p)) {
                    Ok(id) => {
                        ctx.waiting = Waiting::Jwks { provider: i, id };
                        Action::Pause
                    }
                    Err(e) => {
                        warn!("auth: provider {:?}: JWKS fetch not sent: {e}", p.name);
                        self.caches[i].failed_at = Some(now);
                        self.counters.jwks_error.inc();
                        self.decide(ctx, exchange, headers, Some(&path))
                    }
                }
            }
            Authn::KeysUnavailable(i) => {
                self.counters.jwks_unavailable.inc();
                warn!(
                    "auth: provider {:?}: no signing keys (remote JWKS unavailable)",
                    self.s.providers[i].name
                );
                Action::Respond(json_response(
                    503,
                    "unavailable",
                    "token signing keys are not available",
                    "auth_jwks_unavailable",
                ))
            }
        }
    }

    /// Authentication passed (or was optional): external authorization or go.
    fn authorized(
        &mut self,
        ctx: &mut Ctx,
        exchange: &Exchange<'_>,
        headers: &Headers<'_>,
        rule: &Rule,
        authenticated: bool,
    ) -> Action {
        let Some(ext) = self.s.ext_authz.as_ref().filter(|_| rule.ext_authz) else {
            if authenticated {
                self.counters.allowed.inc();
            } else {
                self.counters.anonymous.inc();
            }
            return Action::Continue;
        };
        let mut req =
            CalloutRequest::new(ext.cluster.clone(), ext.method.clone(), ext.path.clone())
                .timeout_ms(ext.timeout_ms)
                .header("x-forwarded-method", exchange.method())
                .header("x-forwarded-uri", exchange.path())
                .header("x-forwarded-host", exchange.authority());
        // The request's id, as Envoy's ext_authz forwards it: the check
        // service's log lines then correlate with the access log's and the
        // upstream's. Sent once, whether or not `forward_headers` lists it.
        if let Some(id) = headers.get(REQUEST_ID) {
            req = req.header(REQUEST_ID, id);
        }
        for name in &ext.forward_headers {
            if &**name == REQUEST_ID {
                continue;
            }
            for v in headers.get_all(name) {
                req = req.header(&**name, v);
            }
        }
        match callout::send(&req) {
            Ok(id) => {
                ctx.waiting = Waiting::ExtAuthz { id };
                Action::Pause
            }
            Err(e) => {
                warn!("auth: ext_authz check not sent: {e}");
                self.ext_authz_failed()
            }
        }
    }

    fn ext_authz_failed(&mut self) -> Action {
        self.counters.ext_error.inc();
        match &self.s.ext_authz {
            Some(e) if e.failure_mode_allow => Action::Continue,
            Some(e) => Action::Respond(json_response(
                e.status_on_error,
                "forbidden",
                "authorization service unavailable",
                "auth_ext_authz_error",
            )),
            // Cannot happen (only called when configured): fail closed.
            None => internal_error("ext_authz failure without ext_authz config"),
        }
    }

    fn ext_authz_arrived(
        &mut self,
        exchange: &Exchange<'_>,
        response: Result<CalloutResponse, Error>,
    ) -> Action {
        let Some(ext) = &self.s.ext_authz else {
            // Cannot happen (only sent when configured): fail closed.
            return internal_error("ext_authz answer without ext_authz config");
        };
        match response {
            // As Envoy's HTTP ext_authz (RawHttpClientImpl::toResponse):
            // 200 OK alone allows; a 5xx is an error of the service (so
            // `failure_mode_allow` or `status_on_error` applies); any other
            // status is a denial passed back to the client.
            Ok(r) if r.status == 200 => {
                if let Some(h) = exchange.headers(Direction::Request) {
                    for name in &ext.upstream_headers {
                        if let Some(v) = r.header_value(name) {
                            if let Err(e) = h.set(name, v) {
                                // The service asked for it and the upstream
                                // goes without: the operator must see it.
                                warn!("auth: ext_authz header {name} not set on the request: {e}");
                            }
                        }
                    }
                }
                self.counters.allowed.inc();
                Action::Continue
            }
            Ok(r) if (201..=499).contains(&r.status) => {
                self.counters.ext_denied.inc();
                let mut resp = LocalResponse::new(r.status)
                    .body(r.body.clone())
                    .details("auth_ext_authz_denied");
                // As Envoy's `allowed_client_headers`: unset, every field
                // of the answer (a login redirect's `location`, a
                // `set-cookie`) but the connection and framing ones, which
                // the host owns; set, those listed.
                let (mut kept, mut dropped) = (0usize, 0u64);
                for (n, v) in &r.headers {
                    let name = n.to_ascii_lowercase();
                    let pass = match &ext.client_headers {
                        Some(list) => list.iter().any(|h| **h == *name),
                        None => {
                            !name.starts_with(':') && !config::HOST_OWNED.contains(&name.as_str())
                        }
                    };
                    if !pass {
                        continue;
                    }
                    // Within the host's caps on a local response, or the
                    // host refuses the whole answer: the first fields in
                    // the service's order are kept, a value too long for
                    // the host is left out; the denial's status and body
                    // always reach the client.
                    if kept == MAX_LOCAL_FIELDS || v.len() > MAX_LOCAL_VALUE {
                        dropped += 1;
                        continue;
                    }
                    kept += 1;
                    resp = resp.header(name, v.clone());
                }
                if dropped > 0 {
                    self.counters.ext_headers_dropped.add(dropped);
                    warn!(
                        "auth: ext_authz denial {}: {dropped} header(s) not passed to the client \
                         (the host takes at most {MAX_LOCAL_FIELDS} fields and {} KiB a value \
                         in a local response)",
                        r.status,
                        MAX_LOCAL_VALUE / 1024
                    );
                }
                Action::Respond(resp)
            }
            Ok(r) => {
                warn!("auth: ext_authz answered status {}", r.status);
                self.ext_authz_failed()
            }
            Err(e) => {
                warn!("auth: ext_authz check failed: {e}");
                self.ext_authz_failed()
            }
        }
    }

    fn jwks_arrived(&mut self, i: usize, response: Result<CalloutResponse, Error>) {
        let now = clock::monotonic_now();
        let name = &self.s.providers[i].name;
        let c = &mut self.caches[i];
        let parsed = match response {
            Ok(r) if r.status == 200 => jwt::Jwks::from_json_remote(&r.body)
                .map(|(j, skipped)| (j.keys, skipped, sha2::Sha256::digest(&r.body).into())),
            Ok(r) => Err(format!("status {}", r.status)),
            Err(e) => Err(e.to_string()),
        };
        match parsed {
            Ok((keys, skipped, digest)) => {
                if skipped.is_empty() {
                    self.counters.jwks_ok.inc();
                } else {
                    self.counters.jwks_partial.inc();
                    warn!(
                        "auth: provider {name:?}: JWKS has {} malformed key(s), skipped (the other {} are used); first: {}",
                        skipped.len(),
                        keys.len(),
                        skipped
                            .iter()
                            .take(3)
                            .map(String::as_str)
                            .collect::<Vec<_>>()
                            .join("; ")
                    );
                }
                c.keys = keys;
                if c.body_digest != Some(digest) {
                    // New keys: a token signed by a removed key must stop
                    // working, so nothing verified before is trusted.
                    c.body_digest = Some(digest);
                    self.tokens[i].borrow_mut().clear();
                }
                c.fetched_at = Some(now);
                c.failed_at = None;
                debug!(
                    "auth: provider {name:?}: JWKS fetched, {} keys",
                    c.keys.len()
                );
            }
            Err(e) => {
                c.failed_at = Some(now);
                self.counters.jwks_error.inc();
                // Where it was fetched from, so the operator knows which
                // cluster and path to check.
                let from = self.s.providers[i]
                    .remote
                    .as_ref()
                    .map(|r| format!(" (cluster {:?}, path {:?})", r.cluster, r.path))
                    .unwrap_or_default();
                warn!("auth: provider {name:?}: JWKS fetch failed{from}: {e}");
            }
        }
    }

    /// The 401 for `rule`: `invalid` is the reason a credential was refused
    /// (none: there was none); `bad_token`: a JWT provider's token was among
    /// them. Only then does the Bearer challenge say `error="invalid_token"`
    /// (RFC 6750 §3.1: the access token provided is invalid): an OAuth
    /// client reading it drops or refreshes its token, which a wrong API key
    /// or password says nothing about.
    fn unauthorized(&self, rule: &Rule, invalid: Option<&str>, bad_token: bool) -> LocalResponse {
        let mut resp = json_response(
            401,
            "unauthorized",
            invalid.unwrap_or("credentials required"),
            if invalid.is_some() {
                "auth_invalid_credentials"
            } else {
                "auth_missing_credentials"
            },
        );
        let realm = &self.s.realm;
        let mut bearer = false;
        let mut api_key = false;
        for a in &rule.any {
            match a {
                AuthnRef::Jwt(_) => bearer = true,
                AuthnRef::ApiKey(_) => api_key = true,
                AuthnRef::Basic(b) => {
                    resp = resp.header(
                        "www-authenticate",
                        format!("Basic realm=\"{}\"", self.s.basic[*b].realm),
                    );
                }
            }
        }
        if bearer {
            let v = if bad_token {
                format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
            } else {
                format!("Bearer realm=\"{realm}\"")
            };
            resp = resp.header("www-authenticate", v);
        }
        if api_key {
            resp = resp.header("www-authenticate", format!("ApiKey realm=\"{realm}\""));
        }
        resp
    }

    fn authenticate(
        &mut self,
        rule: &Rule,
        headers: &Headers<'_>,
        path: &str,
        may_fetch: bool,
    ) -> Authn {
        let mut invalid: Option<String> = None;
        // A JWT provider's token is among the invalid credentials.
        let mut bad_token = false;
        // "wrong issuer": the token is another provider's, whose own refusal
        // (say "bad signature", after a key rotation) is the one to tell, so
        // it comes last.
        let mut other_issuer: Option<String> = None;
        let mut audience: Option<String> = None;
        let mut forbidden: Option<String> = None;
        let mut pending: Option<Authn> = None;
        for a in &rule.any {
            match *a {
                AuthnRef::Jwt(i) => {
                    let p = &self.s.providers[i];
                    let Some(token) = find_credential(&p.from, headers, path) else {
                        continue;
                    };
                    match self.verify_jwt(i, token.value(), may_fetch) {
                        Ok(claims) => {
                            // This provider's token alone: a token of an
                            // earlier provider that failed the claims must
                            // not stop a later one that meets them.
                            let unmet = rule.claims.iter().find(|(c, accepted)| {
                                !jwt::claim(&claims, c)
                                    .is_some_and(|v| jwt::claim_accepts(v, accepted))
                            });
                            if let Some((c, _)) = unmet {
                                forbidden.get_or_insert_with(|| {
                                    format!("claim `{c}` does not allow this route")
                                });
                                continue;
                            }
                            let mut id = Identity {
                                set: Vec::with_capacity(p.claim_to_headers.len()),
                                remove: Vec::new(),
                            };
                            for m in &p.claim_to_headers {
                                if let Some(v) = jwt::claim(&claims, &m.claim) {
                                    id.set.push((m.header.clone(), jwt::claim_header_value(v)));
                                }
                            }
                            if !p.forward_token {
                                if let Some(h) = token.carrier {
                                    id.remove.push(h);
                                }
                            }
                            return Authn::Ok(id);
                        }
                        Err(JwtCheck::Need) => {
                            pending.get_or_insert(Authn::NeedKeys(i));
                        }
                        Err(JwtCheck::Unavailable) => {
                            pending.get_or_insert(Authn::KeysUnavailable(i));
                        }
                        Err(JwtCheck::Bad(e)) => {
                            debug!("auth: provider {:?}: {e}", p.name);
                            bad_token |= e != JwtError::Audience;
                            let slot = match e {
                                JwtError::Audience => &mut audience,
                                JwtError::Issuer => &mut other_issuer,
                                _ => &mut invalid,
                            };
                            slot.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
                AuthnRef::ApiKey(i) => {
                    let k = &self.s.api_keys[i];
                    let Some(key) = find_credential(&k.from, headers, path) else {
                        continue;
                    };
                    let digest: [u8; 32] = sha2::Sha256::digest(key.value()).into();
                    let carrier = key.carrier;
                    match k.keys.get(&digest) {
                        Some(id) => {
                            let mut ident = Identity::default();
                            ident.set.push((k.id_header.clone(), id.clone()));
                            if !k.forward_key {
                                if let Some(h) = carrier {
                                    ident.remove.push(h);
                                }
                            }
                            return Authn::Ok(ident);
                        }
                        None => {
                            debug!("auth: api_keys {:?}: unknown key", k.name);
                            invalid.get_or_insert_with(|| "unknown API key".to_owned());
                        }
                    }
                }
                AuthnRef::Basic(i) => {
                    let Some(value) = headers.get_str("authorization") else {
                        continue;
                    };
                    let Some((user, password)) = basic::decode_basic(&value) else {
                        // Another scheme (e.g. Bearer): not a Basic credential.
                        continue;
                    };
                    let b = &mut self.s.basic[i];
                    let hashes = b.users.hashes();
                    let ok = b.users.check(&user, &password);
                    self.counters.basic_checks[i].add(b.users.hashes() - hashes);
                    if ok {
                        let mut ident = Identity::default();
                        ident.set.push((b.user_header.clone(), user));
                        if !b.forward_credentials {
                            ident.remove.push("authorization".into());
                        }
                        return Authn::Ok(ident);
                    }
                    debug!("auth: basic {:?}: bad user or password", b.name);
                    invalid.get_or_insert_with(|| "bad user or password".to_owned());
                }
            }
        }
        if let Some(p) = pending {
            return p;
        }
        if let Some(f) = forbidden {
            return Authn::Forbidden(f);
        }
        if let Some(a) = audience {
            return Authn::Audience(a);
        }
        if let Some(e) = invalid.or(other_issuer) {
            return Authn::Invalid {
                reason: e,
                token: bad_token,
            };
        }
        Authn::Missing
    }

    /// The claims of `token` if provider `i` accepts it now: from the
    /// verified-token cache (claims rechecked at the current time) or parsed,
    /// signature-checked and claim-checked, then cached. Only a token that
    /// passed every check is cached, so a bad one cannot poison the cache.
    fn verify_jwt(
        &self,
        i: usize,
        token: &[u8],
        may_fetch: bool,
    ) -> Result<Rc<Map<String, Value>>, JwtCheck> {
        let p = &self.s.providers[i];
        let counters = &self.counters.providers[i];
        let rules = jwt::ClaimRules {
            issuer: &p.issuer,
            audiences: &p.audiences,
            now_s: clock::wall_now() / 1_000_000_000,
            skew_s: p.skew_s,
            require_exp: p.require_exp,
        };
        let mut tokens = self.tokens[i].borrow_mut();
        let cached = tokens.admits(token);
        if cached {
            if let Some((claims, window)) = tokens.get(token) {
                counters.cache_hit.inc();
                // Signature, issuer and audience are fixed per token; time
                // moves: an expired (or, after a clock step back, not yet
                // valid) token is evicted and refused.
                return match jwt::check_window(window, &rules) {
                    Ok(()) => Ok(claims),
                    Err(e) => {
                        tokens.remove(token);
                        Err(JwtCheck::Bad(e))
                    }
                };
            }
        }
        let token = std::str::from_utf8(token)
            .map_err(|_| JwtCheck::Bad(JwtError::Malformed("not UTF-8")))?;
        let t = jwt::parse(token).map_err(JwtCheck::Bad)?;
        // Several providers may read the same header: a token for another
        // issuer is not this provider's, whatever its signature.
        if t.claims.get("iss").and_then(Value::as_str) != Some(p.issuer.as_str()) {
            return Err(JwtCheck::Bad(JwtError::Issuer));
        }
        // A request paused for a JWKS fetch comes back here: count its miss
        // once, when the signature is actually checked.
        let checked = self.verify_signature(i, &t, may_fetch);
        if cached && !matches!(checked, Err(JwtCheck::Need | JwtCheck::Unavailable)) {
            counters.cache_miss.inc();
        }
        checked?;
        let window = jwt::check_claims(&t.claims, &rules).map_err(JwtCheck::Bad)?;
        let claims = Rc::new(t.claims);
        if cached {
            tokens.insert(token, (Rc::clone(&claims), window));
        }
        Ok(claims)
    }

    /// The key lookup (possibly asking for a fetch) and signature check.
    fn verify_signature(
        &self,
        i: usize,
        t: &jwt::Parsed<'_>,
        may_fetch: bool,
    ) -> Result<(), JwtCheck> {
        let p = &self.s.providers[i];
        let now = clock::monotonic_now();
        let cache = &self.caches[i];
        let mut keys: Vec<Jwk> = p
            .inline
            .as_ref()
            .map(|j| j.keys.clone())
            .unwrap_or_default();
        keys.extend(cache.keys.iter().cloned());
        if let Some(r) = &p.remote {
            let cold = cache.fetched_at.is_none();
            let recently_failed = cache
                .failed_at
                .is_some_and(|t| now.saturating_sub(t) < r.min_refetch_ns);
            if cold && keys.is_empty() {
                return Err(if may_fetch && !recently_failed {
                    JwtCheck::Need
                } else {
                    JwtCheck::Unavailable
                });
            }
        }
        if let Some(c) = self.counters.providers.get(i) {
            c.signature_checks.inc();
        }
        match jwt::verify_signature(t, &keys, &p.algorithms) {
            Ok(()) => Ok(()),
            Err(JwtError::UnknownKid) => {
                if let Some(r) = &p.remote {
                    // Key rotation: an unknown kid refetches, at most once per
                    // min_refetch_interval per instance.
                    let recent = cache
                        .started_at
                        .is_some_and(|t| now.saturating_sub(t) < r.min_refetch_ns);
                    if may_fetch && !recent {
                        return Err(JwtCheck::Need);
                    }
                }
                Err(JwtCheck::Bad(JwtError::UnknownKid))
            }
            Err(e) => Err(JwtCheck::Bad(e)),
        }
    }
}

#[derive(Debug)]
enum JwtCheck {
    Need,
    Unavailable,
    Bad(JwtError),
}

/// A credential found in a request: `text[range]`, and the header carrying it
/// (for removal when it must not go upstream).
struct Credential {
    /// The header value (or decoded cookie or query value) holding it: a
    /// bearer token is used in place, not copied out of its header. Bytes:
    /// a key is compared and a token looked up in the cache as bytes, so a
    /// header value is not checked for UTF-8 (~1.8k Wasm instructions for a
    /// 500-byte bearer header) unless a token must be parsed.
    text: Vec<u8>,
    range: std::ops::Range<usize>,
    carrier: Option<HeaderName>,
}

impl Credential {
    /// `text`, whole, from a source without a header.
    fn whole(text: String) -> Self {
        Credential {
            range: 0..text.len(),
            text: text.into_bytes(),
            carrier: None,
        }
    }

    fn value(&self) -> &[u8] {
        self.text.get(self.range.clone()).unwrap_or_default()
    }
}

/// The first credential found in `sources`.
fn find_credential(sources: &[Source], headers: &Headers<'_>, path: &str) -> Option<Credential> {
    for s in sources {
        match s {
            Source::Header { name, prefix } => {
                let Some(v) = headers.get(name) else {
                    continue;
                };
                let start = match prefix {
                    Some(p) => {
                        let Some(head) = v.get(..p.len()) else {
                            continue;
                        };
                        if !head.eq_ignore_ascii_case(p.as_bytes()) {
                            continue;
                        }
                        p.len()
                    }
                    None => 0,
                };
                // Trimmed (a field value's spaces and tabs), as offsets into `v`.
                let rest = v.get(start..).unwrap_or_default();
                let start = start + (rest.len() - rest.trim_ascii_start().len());
                let end = start + rest.trim_ascii().len();
                if start < end {
                    return Some(Credential {
                        text: v,
                        range: start..end,
                        carrier: Some(name.clone()),
                    });
                }
            }
            Source::Cookie(c) => {
                for line in headers.get_all("cookie") {
                    let Ok(line) = String::from_utf8(line) else {
                        continue;
                    };
                    for pair in line.split(';') {
                        if let Some((n, v)) = pair.trim().split_once('=') {
                            if n == c && !v.is_empty() {
                                return Some(Credential::whole(v.trim_matches('"').to_owned()));
                            }
                        }
                    }
                }
            }
            Source::Query(q) => {
                let Some((_, query)) = path.split_once('?') else {
                    continue;
                };
                for pair in query.split('&') {
                    let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if percent_decode(n).as_deref() == Some(q.as_str()) {
                        if let Some(v) = percent_decode(v).filter(|v| !v.is_empty()) {
                            return Some(Credential::whole(v));
                        }
                    }
                }
            }
        }
    }
    None
}

/// A CORS preflight as browsers send it, read as Envoy's jwt_authn reads it
/// (its `isCorsPreflightRequest`): `OPTIONS` with a non-empty `Origin` and
/// `Access-Control-Request-Method`.
fn is_cors_preflight(exchange: &Exchange<'_>, headers: &Headers<'_>) -> bool {
    let present = |name: &str| headers.get(name).is_some_and(|v| !v.is_empty());
    exchange.method() == "OPTIONS" && present("origin") && present("access-control-request-method")
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}
