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
    /// What an unknown user's password is checked against, so that the answer
    /// takes as long as a known user's wrong password (no user enumeration by
    /// timing): a listed bcrypt hash of the highest cost, else a listed
    /// `{SHA}` digest. `None` only for an empty set, which `parse` refuses.
    dummy: Option<Hash>,
    /// Password hashes computed so far (bcrypt or SHA-1, the dummy's included).
    hashes: u64,
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
                if cost > out.max_bcrypt_cost {
                    out.max_bcrypt_cost = cost;
                    out.dummy = Some(Hash::Bcrypt(hash.to_owned()));
                }
                Hash::Bcrypt(hash.to_owned())
            } else {
                return Err((
                    i,
                    "unsupported hash: use bcrypt (`htpasswd -B`, $2y$) or {SHA} (`htpasswd -s`)"
                        .to_owned(),
                ));
            };
            if out.dummy.is_none() {
                out.dummy = Some(h.clone());
            }
            if out.users.insert(user.to_owned(), h).is_some() {
                return Err((i, format!("user {user:?} is listed twice")));
            }
        }
        Ok(out)
    }

    /// Whether `user`/`password` match. An unknown user's password is hashed
    /// too, against the dummy hash (the costliest listed one), so that the
    /// answer does not come sooner than for a known user with a wrong password.
    pub fn check(&mut self, user: &str, password: &str) -> bool {
        let Some(hash) = self.users.get(user) else {
            if let Some(dummy) = &self.dummy {
                // Computed for its time only: a password that happens to
                // match the dummy's user is still refused.
                let _ = verify(&mut self.hashes, dummy, password);
            }
            return false;
        };
        let Hash::Bcrypt(h) = hash else {
            return verify(&mut self.hashes, hash, password);
        };
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
        let ok = verify(&mut self.hashes, hash, password);
        if ok {
            if self.verified.len() >= BCRYPT_CACHE_MAX {
                self.verified.clear();
            }
            self.verified.insert(key);
        }
        ok
    }

    /// Password hashes computed so far by [`Htpasswd::check`]: one per check,
    /// an unknown user's included, none for a remembered bcrypt success.
    pub fn hashes(&self) -> u64 {
        self.hashes
    }
}

/// Whether `password` matches `hash`: the full computation, never remembered;
/// counted in `hashes`.
fn verify(hashes: &mut u64, hash: &Hash, password: &str) -> bool {
    *hashes += 1;
    match hash {
        Hash::Sha1(expected) => {
            let got: [u8; 20] = sha1::Sha1::digest(password.as_bytes()).into();
            constant_eq(&got, expected)
        }
        Hash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_dummy_is_the_costliest_listed_hash() {
        let sha = "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=";
        let sha_hash = Hash::Sha1(STANDARD.decode(&sha[5..]).unwrap().try_into().unwrap());
        let b4 = format!("$2y$04${}", "a".repeat(53));
        let b6 = format!("$2y$06${}", "b".repeat(53));
        for (set, dummy) in [
            (vec![format!("a:{sha}")], sha_hash),
            (
                vec![format!("a:{b4}"), format!("b:{sha}"), format!("c:{b6}")],
                Hash::Bcrypt(b6.clone()),
            ),
            (
                vec![format!("a:{b6}"), format!("b:{b4}")],
                Hash::Bcrypt(b6.clone()),
            ),
        ] {
            assert_eq!(Htpasswd::parse(&set).unwrap().dummy, Some(dummy), "{set:?}");
        }
    }
}
