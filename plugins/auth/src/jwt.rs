//! JWT (JWS compact) verification: JWK/JWKS parsing into verifying keys, the
//! signature check for HS256, RS256/384/512, ES256/384 and EdDSA (Ed25519),
//! and the registered-claim checks (`iss`, `aud`, `exp`, `nbf`). Pure
//! RustCrypto, so it builds for wasm32-wasip2. Error texts never contain the
//! token or key material.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{Map, Value};

/// Tokens longer than this are rejected before any parsing (bounds CPU).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Minimum RSA modulus size accepted in a JWK.
const MIN_RSA_BITS: usize = 2048;

/// A supported `alg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// HMAC SHA-256.
    Hs256,
    /// RSASSA-PKCS1-v1_5 SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 SHA-512.
    Rs512,
    /// ECDSA P-256 SHA-256.
    Es256,
    /// ECDSA P-384 SHA-384.
    Es384,
    /// Ed25519.
    EdDsa,
}

impl Algorithm {
    /// Parse a JOSE `alg` name.
    pub fn parse(s: &str) -> Option<Algorithm> {
        Some(match s {
            "HS256" => Algorithm::Hs256,
            "RS256" => Algorithm::Rs256,
            "RS384" => Algorithm::Rs384,
            "RS512" => Algorithm::Rs512,
            "ES256" => Algorithm::Es256,
            "ES384" => Algorithm::Es384,
            "EdDSA" => Algorithm::EdDsa,
            _ => return None,
        })
    }
}

/// Key material for one JWK.
#[derive(Clone)]
pub enum KeyMaterial {
    /// A shared secret (`kty: oct`).
    Hmac(Vec<u8>),
    /// An RSA public key.
    Rsa(rsa::RsaPublicKey),
    /// A P-256 public key.
    P256(p256::ecdsa::VerifyingKey),
    /// A P-384 public key.
    P384(p384::ecdsa::VerifyingKey),
    /// An Ed25519 public key.
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl std::fmt::Debug for KeyMaterial {
    // Never print key material (an HMAC secret is a secret).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyMaterial::Hmac(_) => "Hmac(..)",
            KeyMaterial::Rsa(_) => "Rsa(..)",
            KeyMaterial::P256(_) => "P256(..)",
            KeyMaterial::P384(_) => "P384(..)",
            KeyMaterial::Ed25519(_) => "Ed25519(..)",
        })
    }
}

/// One verifying key.
#[derive(Debug, Clone)]
pub struct Jwk {
    /// `kid`, if any.
    pub kid: Option<String>,
    /// `alg`, if the JWK pins one.
    pub alg: Option<Algorithm>,
    /// The key.
    pub material: KeyMaterial,
}

impl Jwk {
    fn supports(&self, alg: Algorithm) -> bool {
        if self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        matches!(
            (&self.material, alg),
            (KeyMaterial::Hmac(_), Algorithm::Hs256)
                | (
                    KeyMaterial::Rsa(_),
                    Algorithm::Rs256 | Algorithm::Rs384 | Algorithm::Rs512
                )
                | (KeyMaterial::P256(_), Algorithm::Es256)
                | (KeyMaterial::P384(_), Algorithm::Es384)
                | (KeyMaterial::Ed25519(_), Algorithm::EdDsa)
        )
    }
}

/// A key set.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    /// The usable keys (encryption keys and unsupported types are skipped).
    pub keys: Vec<Jwk>,
}

fn b64(field: &str, v: &Map<String, Value>) -> Result<Vec<u8>, String> {
    let s = v
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string member `{field}`"))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("`{field}` is not base64url"))
}

impl Jwks {
    /// Parse a JWKS document (`{"keys": [...]}`). A key with an unsupported
    /// `kty`/`crv` or `use: enc` is skipped; a malformed supported key is an
    /// error naming its index (an inline `jwks` is config: strict).
    pub fn from_value(v: &Value) -> Result<Jwks, String> {
        let mut out = Vec::new();
        for (i, k) in Self::key_array(v)?.iter().enumerate() {
            match Jwk::from_value(k) {
                Ok(Some(k)) => out.push(k),
                Ok(None) => {}
                Err(e) => return Err(format!("keys[{i}]: {e}")),
            }
        }
        Ok(Jwks { keys: out })
    }

    fn key_array(v: &Value) -> Result<&Vec<Value>, String> {
        v.get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| "expected an object with a `keys` array (a JWKS)".to_owned())
    }

    /// Parse a fetched JWKS: a malformed supported key is skipped, not fatal
    /// (one bad key an identity provider publishes must not stop the others,
    /// new ones included, from being used), and its error (`keys[i]: ...`)
    /// returned for the log. No usable key at all is an error, as in Envoy's
    /// jwt_verify_lib (`JwksNoValidKeys`): the keys held before stay in use.
    pub fn from_json_remote(text: &[u8]) -> Result<(Jwks, Vec<String>), String> {
        let v: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        for (i, k) in Self::key_array(&v)?.iter().enumerate() {
            match Jwk::from_value(k) {
                Ok(Some(k)) => out.push(k),
                Ok(None) => {}
                Err(e) => skipped.push(format!("keys[{i}]: {e}")),
            }
        }
        if out.is_empty() {
            return Err(match skipped.first() {
                Some(e) => format!(
                    "no usable key ({} malformed, the first: {e})",
                    skipped.len()
                ),
                None => "no usable key (none of a supported type for signatures)".to_owned(),
            });
        }
        Ok((Jwks { keys: out }, skipped))
    }
}

impl Jwk {
    /// Parse one JWK; `Ok(None)` for a key this plugin does not use.
    pub fn from_value(v: &Value) -> Result<Option<Jwk>, String> {
        let o = v.as_object().ok_or("expected a JSON object")?;
        if o.get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
        {
            return Ok(None);
        }
        let kid = o.get("kid").and_then(Value::as_str).map(str::to_owned);
        let alg = match o.get("alg").and_then(Value::as_str) {
            Some(a) => match Algorithm::parse(a) {
                Some(a) => Some(a),
                None => return Ok(None),
            },
            None => None,
        };
        let kty = o
            .get("kty")
            .and_then(Value::as_str)
            .ok_or("missing string member `kty`")?;
        let material = match kty {
            "oct" => {
                let k = b64("k", o)?;
                if k.len() < 32 {
                    return Err(format!(
                        "HS256 secret is {} bytes; at least 32 are required",
                        k.len()
                    ));
                }
                KeyMaterial::Hmac(k)
            }
            "RSA" => {
                let n = rsa::BigUint::from_bytes_be(&b64("n", o)?);
                let e = rsa::BigUint::from_bytes_be(&b64("e", o)?);
                let key = rsa::RsaPublicKey::new(n, e)
                    .map_err(|e| format!("invalid RSA public key: {e}"))?;
                let bits = rsa::traits::PublicKeyParts::size(&key) * 8;
                if bits < MIN_RSA_BITS {
                    return Err(format!(
                        "RSA key is {bits} bits; at least {MIN_RSA_BITS} are required"
                    ));
                }
                KeyMaterial::Rsa(key)
            }
            "EC" => {
                let crv = o.get("crv").and_then(Value::as_str).unwrap_or("");
                let x = b64("x", o)?;
                let y = b64("y", o)?;
                match crv {
                    "P-256" => {
                        if x.len() != 32 || y.len() != 32 {
                            return Err("P-256 `x`/`y` must be 32 bytes each".to_owned());
                        }
                        let pt = p256::EncodedPoint::from_affine_coordinates(
                            x.as_slice().into(),
                            y.as_slice().into(),
                            false,
                        );
                        KeyMaterial::P256(
                            p256::ecdsa::VerifyingKey::from_encoded_point(&pt)
                                .map_err(|_| "the P-256 point is not on the curve".to_owned())?,
                        )
                    }
                    "P-384" => {
                        if x.len() != 48 || y.len() != 48 {
                            return Err("P-384 `x`/`y` must be 48 bytes each".to_owned());
                        }
                        let pt = p384::EncodedPoint::from_affine_coordinates(
                            x.as_slice().into(),
                            y.as_slice().into(),
                            false,
                        );
                        KeyMaterial::P384(
                            p384::ecdsa::VerifyingKey::from_encoded_point(&pt)
                                .map_err(|_| "the P-384 point is not on the curve".to_owned())?,
                        )
                    }
                    _ => return Ok(None),
                }
            }
            "OKP" => {
                if o.get("crv").and_then(Value::as_str) != Some("Ed25519") {
                    return Ok(None);
                }
                let x: [u8; 32] = b64("x", o)?
                    .try_into()
                    .map_err(|_| "Ed25519 `x` must be 32 bytes".to_owned())?;
                KeyMaterial::Ed25519(
                    ed25519_dalek::VerifyingKey::from_bytes(&x)
                        .map_err(|_| "invalid Ed25519 public key".to_owned())?,
                )
            }
            _ => return Ok(None),
        };
        let jwk = Jwk { kid, alg, material };
        if let Some(a) = alg {
            if !jwk.supports(a) {
                return Err(format!("`alg` {a:?} does not fit key type {kty}"));
            }
        }
        Ok(Some(jwk))
    }
}

/// Why a token was rejected. The texts are safe to log and to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url parts of JSON.
    Malformed(&'static str),
    /// `alg` unsupported or not allowed by the provider.
    Algorithm,
    /// No key with the token's `kid` (a refetch may help).
    UnknownKid,
    /// No key fits the algorithm.
    NoKey,
    /// The signature does not verify.
    Signature,
    /// `iss` differs.
    Issuer,
    /// `aud` does not contain an accepted audience.
    Audience,
    /// Expired.
    Expired,
    /// Not valid yet.
    NotYetValid,
    /// `exp` required but absent.
    MissingExp,
}

impl std::fmt::Display for JwtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtError::Malformed(w) => write!(f, "malformed token: {w}"),
            JwtError::Algorithm => f.write_str("algorithm not accepted"),
            JwtError::UnknownKid => f.write_str("unknown key id"),
            JwtError::NoKey => f.write_str("no key for the algorithm"),
            JwtError::Signature => f.write_str("bad signature"),
            JwtError::Issuer => f.write_str("wrong issuer"),
            JwtError::Audience => f.write_str("audience not accepted"),
            JwtError::Expired => f.write_str("token expired"),
            JwtError::NotYetValid => f.write_str("token not yet valid"),
            JwtError::MissingExp => f.write_str("token has no exp"),
        }
    }
}

/// A token split and decoded, not verified yet.
#[derive(Debug)]
pub struct Parsed<'t> {
    /// `header.payload`, the signed input.
    pub signing_input: &'t str,
    /// The decoded signature.
    pub signature: Vec<u8>,
    /// `alg` (validated as supported).
    pub alg: Algorithm,
    /// `kid`.
    pub kid: Option<String>,
    /// The claims.
    pub claims: Map<String, Value>,
}

fn decode_json(part: &str, what: &'static str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed(what))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtError::Malformed(what)),
    }
}

/// Split and decode a compact JWS.
pub fn parse(token: &str) -> Result<Parsed<'_>, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed("too long"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three dot-separated parts"));
    };
    let header = decode_json(h, "header is not base64url JSON")?;
    if header.contains_key("crit") {
        // RFC 7515 4.1.11: unknown critical extensions must be rejected.
        return Err(JwtError::Malformed("unsupported `crit` header"));
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(Algorithm::parse)
        .ok_or(JwtError::Algorithm)?;
    let kid = header.get("kid").and_then(Value::as_str).map(str::to_owned);
    let claims = decode_json(p, "payload is not base64url JSON")?;
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwtError::Malformed("signature is not base64url"))?;
    Ok(Parsed {
        signing_input: &token[..h.len() + 1 + p.len()],
        signature,
        alg,
        kid,
        claims,
    })
}

fn verify_with(key: &Jwk, alg: Algorithm, msg: &[u8], sig: &[u8]) -> bool {
    use hmac::Mac as _;
    use rsa::signature::Verifier as _;
    match (&key.material, alg) {
        (KeyMaterial::Hmac(k), Algorithm::Hs256) => {
            let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(k) else {
                return false;
            };
            mac.update(msg);
            mac.verify_slice(sig).is_ok()
        }
        (KeyMaterial::Rsa(k), a) => {
            let Ok(sig) = rsa::pkcs1v15::Signature::try_from(sig) else {
                return false;
            };
            match a {
                Algorithm::Rs256 => rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(k.clone())
                    .verify(msg, &sig)
                    .is_ok(),
                Algorithm::Rs384 => rsa::pkcs1v15::VerifyingKey::<sha2::Sha384>::new(k.clone())
                    .verify(msg, &sig)
                    .is_ok(),
                Algorithm::Rs512 => rsa::pkcs1v15::VerifyingKey::<sha2::Sha512>::new(k.clone())
                    .verify(msg, &sig)
                    .is_ok(),
                _ => false,
            }
        }
        (KeyMaterial::P256(k), Algorithm::Es256) => match p256::ecdsa::Signature::from_slice(sig) {
            Ok(s) => k.verify(msg, &s).is_ok(),
            Err(_) => false,
        },
        (KeyMaterial::P384(k), Algorithm::Es384) => match p384::ecdsa::Signature::from_slice(sig) {
            Ok(s) => k.verify(msg, &s).is_ok(),
            Err(_) => false,
        },
        (KeyMaterial::Ed25519(k), Algorithm::EdDsa) => {
            match ed25519_dalek::Signature::from_slice(sig) {
                Ok(s) => k.verify_strict(msg, &s).is_ok(),
                Err(_) => false,
            }
        }
        _ => false,
    }
}

/// Check the signature of `t` against `keys`. With a `kid`, the keys with
/// that `kid` are tried first, then the keys without one (as Envoy's
/// jwt_verify_lib, which skips a key only when both have a `kid` and they
/// differ); no key with that `kid` and none without one that verifies:
/// [`JwtError::UnknownKid`] (a refetch may bring it). Without a `kid`, every
/// key that fits the algorithm.
pub fn verify_signature(
    t: &Parsed<'_>,
    keys: &[Jwk],
    allowed: &[Algorithm],
) -> Result<(), JwtError> {
    if !allowed.is_empty() && !allowed.contains(&t.alg) {
        return Err(JwtError::Algorithm);
    }
    let kid = t.kid.as_deref();
    let named = keys
        .iter()
        .filter(|k| kid.is_some() && k.kid.as_deref() == kid);
    let unnamed = keys.iter().filter(|k| kid.is_none() || k.kid.is_none());
    let mut any_named = false;
    let mut any_fit = false;
    for k in named.chain(unnamed) {
        if kid.is_some() && k.kid.is_some() {
            any_named = true;
        }
        if !k.supports(t.alg) {
            continue;
        }
        any_fit = true;
        if verify_with(k, t.alg, t.signing_input.as_bytes(), &t.signature) {
            return Ok(());
        }
    }
    if kid.is_some() && !any_named {
        return Err(JwtError::UnknownKid);
    }
    if !any_fit {
        return Err(JwtError::NoKey);
    }
    Err(JwtError::Signature)
}

/// What the registered claims are checked against.
#[derive(Debug, Clone)]
pub struct ClaimRules<'a> {
    /// Required `iss`.
    pub issuer: &'a str,
    /// Accepted audiences (empty: unchecked).
    pub audiences: &'a [String],
    /// Now, Unix seconds.
    pub now_s: u64,
    /// Tolerance, seconds.
    pub skew_s: u64,
    /// `exp` required.
    pub require_exp: bool,
}

/// A NumericDate claim (`exp`, `nbf`) as Unix seconds. RFC 7519 §2 makes it
/// any JSON number, so a negative one is a date before 1970: it counts as 0
/// (an `exp` long past, an `nbf` long passed), not as "not a number".
/// Fractions are dropped. `None`: not a JSON number.
fn as_seconds(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_i64()
                .map(|_| 0)
                .or_else(|| n.as_f64().map(|f| if f > 0.0 { f as u64 } else { 0 }))
        }),
        _ => None,
    }
}

/// An audience as it is compared, as Envoy's jwt_verify_lib does
/// (`sanitizeAudience`): without an `http://` or `https://` scheme prefix and
/// without one trailing `/`, so `https://api.example.com/` and
/// `api.example.com` are one audience.
pub fn sanitize_audience(aud: &str) -> &str {
    let a = aud
        .strip_prefix("http://")
        .or_else(|| aud.strip_prefix("https://"))
        .unwrap_or(aud);
    // Envoy looks for the `/` on the whole value: `http://` alone is empty.
    a.strip_suffix('/').unwrap_or(a)
}

/// Check `iss`, `exp`, `nbf`, then `aud`; the token's validity window if it
/// passes.
/// `aud` matches when one of its values equals an accepted audience once both
/// are sanitized ([`sanitize_audience`]).
pub fn check_claims(claims: &Map<String, Value>, r: &ClaimRules<'_>) -> Result<Window, JwtError> {
    if claims.get("iss").and_then(Value::as_str) != Some(r.issuer) {
        return Err(JwtError::Issuer);
    }
    let exp = match claims.get("exp") {
        Some(v) => Some(as_seconds(v).ok_or(JwtError::Malformed("`exp` is not a number"))?),
        None if r.require_exp => return Err(JwtError::MissingExp),
        None => None,
    };
    // Expiry is checked before `nbf` is read: an expired token is refused as
    // expired whatever its `nbf`.
    check_window(Window { exp, nbf: None }, r)?;
    let nbf = match claims.get("nbf") {
        Some(v) => Some(as_seconds(v).ok_or(JwtError::Malformed("`nbf` is not a number"))?),
        None => None,
    };
    check_window(Window { exp: None, nbf }, r)?;
    // The audience last: a token refused for it is valid otherwise (signed,
    // this issuer's, in time), and its answer (403) says it is not for us.
    if !r.audiences.is_empty() {
        let accepted = |a: &str| {
            let a = sanitize_audience(a);
            r.audiences.iter().any(|x| sanitize_audience(x) == a)
        };
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => accepted(a),
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(accepted),
            _ => false,
        };
        if !ok {
            return Err(JwtError::Audience);
        }
    }
    Ok(Window { exp, nbf })
}

/// A checked token's validity window (`exp`, `nbf`, Unix seconds; `None`:
/// absent). Kept with a cached token: on a hit only time has moved, and this
/// is all of the claims that depends on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    /// `exp`.
    pub exp: Option<u64>,
    /// `nbf`.
    pub nbf: Option<u64>,
}

/// Whether `now` (with the skew) is inside `w`.
pub fn check_window(w: Window, r: &ClaimRules<'_>) -> Result<(), JwtError> {
    if w.exp
        .is_some_and(|exp| r.now_s >= exp.saturating_add(r.skew_s))
    {
        return Err(JwtError::Expired);
    }
    if w.nbf
        .is_some_and(|nbf| r.now_s.saturating_add(r.skew_s) < nbf)
    {
        return Err(JwtError::NotYetValid);
    }
    Ok(())
}

/// Look up claim `path` (`a.b` walks objects).
pub fn claim<'c>(claims: &'c Map<String, Value>, path: &str) -> Option<&'c Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut cur = claims.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

/// A claim as a header value: strings as they are, other JSON compactly.
pub fn claim_header_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Whether claim value `v` holds one of `accepted`: a string equal to one (or,
/// space-separated like `scope`, containing one), or an array containing one.
pub fn claim_accepts(v: &Value, accepted: &[String]) -> bool {
    match v {
        Value::String(s) => {
            accepted.iter().any(|a| a == s) || s.split(' ').any(|w| accepted.iter().any(|a| a == w))
        }
        Value::Array(list) => list
            .iter()
            .filter_map(Value::as_str)
            .any(|s| accepted.iter().any(|a| a == s)),
        Value::Bool(b) => accepted.iter().any(|a| a == &b.to_string()),
        Value::Number(n) => accepted.iter().any(|a| a == &n.to_string()),
        _ => false,
    }
}
