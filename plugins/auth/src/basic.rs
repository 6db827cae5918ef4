//! HTTP Basic: htpasswd parsing (bcrypt `$2y$`/`$2a$`/`$2b$` and `{SHA}`)
//! and credential checks. Successful bcrypt checks are remembered per
//! instance (keyed by a SHA-256 of the credentials, never the password), since
//! one bcrypt verification costs milliseconds and the plugin's per-call CPU
//! deadline is small.

use std::collections::{HashMap, HashSet};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha1::Digest as _;

/// bcrypt costs above this are warned about at configure time: one check
/// would likely exceed the default 5 ms call deadline in wasm.
pub const BCRYPT_COST_WARN: u32 = 4;

/// Cached successful bcrypt checks per instance, before the cache is cleared.
const BCRYPT_CACHE_MAX: usize = 1024;

/// How a password is stored.
#[derive(Clone, PartialEq, Eq)]
pub enum Hash {
    /// A bcrypt hash string.
    Bcrypt(String),
    /// `{SHA}`: SHA-1 of the password.
    Sha1([u8; 20]),
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hash::Bcrypt(_) => "Bcrypt(..)",
            Hash::Sha1(_) => "Sha1(..)",
        })
    }
}

/// Users and their hashes.
#[derive(Debug, Default)]
pub struct Htpasswd {
    users: HashMap<String, Hash>,
    /// The highest bcrypt cost seen (0: none).
    pub max_bcrypt_cost: u32,
    verified: HashSet<[u8; 32]>,
}

impl Htpasswd {
    /// Parse htpasswd lines; the error carries the line index and what is
    /// wrong (never the hash).
    pub fn parse(lines: &[String]) -> Result<Htpasswd, (usize, String)> {
        let mut out = Htpasswd::default();
        if lines.is_empty() {
            return Err((0, "list at least one `user:hash` line".to_owned()));
        }
        for (i, line) in lines.iter().enumerate() {
            let line = line.trim();
            let Some((user, hash)) = line.split_once(':') else {
                return Err((i, "expected `user:hash`".to_owned()));
            };
            if user.is_empty() {
                return Err((i, "the user name is empty".to_owned()));
            }
            let h = if let Some(b64) = hash.strip_prefix("{SHA}") {
                let bytes = STANDARD
                    .decode(b64)
                    .map_err(|_| (i, "`{SHA}` hash is not base64".to_owned()))?;
                Hash::Sha1(
                    bytes
                        .try_into()
                        .map_err(|_| (i, "`{SHA}` hash is not 20 bytes".to_owned()))?,
                )
            } else if hash.starts_with("$2y$")
                || hash.starts_with("$2a$")
                || hash.starts_with("$2b$")
            {
                let cost = hash
                    .get(4..6)
                    .and_then(|c| c.parse::<u32>().ok())
                    .filter(|c| (4..=31).contains(c))
                    .ok_or_else(|| (i, "malformed bcrypt hash (cost)".to_owned()))?;
                if hash.len() != 60 {
                    return Err((
                        i,
                        "malformed bcrypt hash (expected 60 characters)".to_owned(),
                    ));
                }
                out.max_bcrypt_cost = out.max_bcrypt_cost.max(cost);
                Hash::Bcrypt(hash.to_owned())
            } else {
                return Err((
                    i,
                    "unsupported hash: use bcrypt (`htpasswd -B`, $2y$) or {SHA} (`htpasswd -s`)"
                        .to_owned(),
                ));
            };
            if out.users.insert(user.to_owned(), h).is_some() {
                return Err((i, format!("user {user:?} is listed twice")));
            }
        }
        Ok(out)
    }

    /// Whether `user`/`password` match.
    pub fn check(&mut self, user: &str, password: &str) -> bool {
        let Some(hash) = self.users.get(user) else {
            return false;
        };
        match hash {
            Hash::Sha1(expected) => {
                let got: [u8; 20] = sha1::Sha1::digest(password.as_bytes()).into();
                constant_eq(&got, expected)
            }
            Hash::Bcrypt(h) => {
                let mut d = sha2::Sha256::new();
                d.update(user.as_bytes());
                d.update([0]);
                d.update(password.as_bytes());
                d.update([0]);
                d.update(h.as_bytes());
                let key: [u8; 32] = d.finalize().into();
                if self.verified.contains(&key) {
                    return true;
                }
                let ok = bcrypt::verify(password, h).unwrap_or(false);
                if ok {
                    if self.verified.len() >= BCRYPT_CACHE_MAX {
                        self.verified.clear();
                    }
                    self.verified.insert(key);
                }
                ok
            }
        }
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decode an `authorization: Basic ...` value into user and password.
pub fn decode_basic(value: &str) -> Option<(String, String)> {
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let bytes = STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}
