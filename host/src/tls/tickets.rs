//! Stateless TLS session tickets of a listener: keys read from files
//! (`session_ticket_keys`, as Envoy's `session_ticket_keys` and nginx's
//! `ssl_session_ticket_key`), or a random key of the listener (rustls's
//! rotating ticketer), both bound to the listener's client-certificate policy.
//!
//! **Key files.** Each file holds exactly 80 bytes, as Envoy and nginx (its
//! 80-byte form) take them: a 16-byte key name, then 64 bytes of secret
//! (Envoy and nginx split it into a 32-byte HMAC secret and a 32-byte AES key
//! for AES-256-CBC with HMAC-SHA256). Legate seals tickets with AES-256-GCM,
//! an AEAD, which needs one key and no HMAC: its key is HKDF-SHA256 of all 64
//! secret bytes (salt [`HKDF_SALT`], info the key name), so every byte of the
//! file counts, and the key is not the one nginx would use the same file's
//! bytes for. The ticket format is Legate's own (only Legate instances share
//! tickets):
//!
//! ```text
//! key name (16) | nonce (12, random) | AES-256-GCM(issued at, u64 BE seconds | rustls session) | tag (16)
//! ```
//!
//! with the key name and the listener's context (below) as the
//! associated data. The first key encrypts; a ticket is decrypted by the key
//! its name names. A ticket whose name no key has, that does not decrypt, or
//! older than [`TICKET_LIFETIME`] gives `None`: rustls then makes a full
//! handshake, never an error.
//!
//! **Context.** A ticket resumes a session with the client identity (or its
//! absence) verified when it was issued, and rustls does not check it again
//! (its `ServerConfig` docs warn of this). Two listeners that share key files
//! but not their `client_auth` would let a session of the one without
//! client certificates resume on the one that requires them. So each ticket
//! is bound to a digest of the listener's `client_auth` (whether and how it
//! verifies, the CA certificates, the CRL file's bytes): a ticket issued
//! under another policy does not decrypt, as OpenSSL's session id context
//! (which nginx and Envoy set from the same things) refuses it.

use std::fmt;
use std::sync::Arc;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

/// Bytes of a key file: name, then secret.
pub const KEY_FILE_LEN: usize = 80;

/// Bytes of a key's name: the first of its file, and of each ticket.
const NAME_LEN: usize = 16;

/// AES-256-GCM's nonce.
const NONCE_LEN: usize = 12;

/// The issue time at the start of each ticket's plaintext.
const ISSUED_LEN: usize = 8;

/// HKDF salt of the AES-256-GCM key of a key file: a version, so another
/// format takes other keys from the same files.
const HKDF_SALT: &[u8] = b"legate session ticket key v1";

/// How long a ticket sealed with a file's key resumes, seconds (and the
/// lifetime hint given to clients): 6 hours, the period rustls rotates the
/// random key at. A client back within a working session resumes; the
/// window in which a ticket (and, in TLS 1.2, the session's master secret
/// in it) is exposed by a leaked key stays bounded even when the key files
/// are rotated less often. Envoy (BoringSSL) hints 2 hours for TLS 1.2
/// tickets; RFC 8446 caps TLS 1.3 tickets at 7 days.
pub const TICKET_LIFETIME: u32 = 6 * 60 * 60;

/// How far in the future a ticket's issue time may be (another instance's
/// clock ahead of this one's).
const CLOCK_SKEW: u64 = 5 * 60;

/// One key: its name and AES-256-GCM key.
struct TicketKey {
    name: [u8; NAME_LEN],
    key: LessSafeKey,
}

impl TicketKey {
    /// The key of an 80-byte key file's bytes (`None` only if ring refuses
    /// a 32-byte AES-256-GCM key, which it does not).
    fn new(bytes: &[u8; KEY_FILE_LEN]) -> Option<Self> {
        let (name_bytes, secret) = bytes.split_at(NAME_LEN);
        let mut name = [0; NAME_LEN];
        name.copy_from_slice(name_bytes);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(secret);
        let info = [&name[..]];
        let mut aes = [0u8; 32];
        let key = prk
            .expand(&info, &AES_256_GCM)
            .and_then(|okm| okm.fill(&mut aes))
            .ok()
            .and_then(|()| UnboundKey::new(&AES_256_GCM, &aes).ok())
            .map(LessSafeKey::new);
        // (Not a guaranteed wipe: the compiler may drop this store, and the
        // key file's bytes stay in the listener's config; the process's
        // memory is what guards them.)
        aes.fill(0);
        Some(TicketKey { name, key: key? })
    }
}

/// The key name of a key file's bytes (for the duplicate check).
pub fn key_name(bytes: &[u8; KEY_FILE_LEN]) -> [u8; NAME_LEN] {
    let mut name = [0; NAME_LEN];
    name.copy_from_slice(&bytes[..NAME_LEN]);
    name
}

/// Tickets sealed with the keys of `session_ticket_keys`: the first key
/// seals, each opens the tickets that name it.
pub struct FileTicketer {
    keys: Vec<TicketKey>,
    context: [u8; 32],
    rng: SystemRandom,
}

impl fmt::Debug for FileTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_struct("FileTicketer")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl FileTicketer {
    /// The ticketer of the key files' bytes, in their order (at least one;
    /// names distinct: the loader checked), for tickets of `context`.
    pub fn new(keys: &[[u8; KEY_FILE_LEN]], context: [u8; 32]) -> Option<Self> {
        Some(FileTicketer {
            keys: keys.iter().map(TicketKey::new).collect::<Option<_>>()?,
            context,
            rng: SystemRandom::new(),
        })
    }

    fn aad(&self, name: &[u8; NAME_LEN]) -> [u8; NAME_LEN + 32] {
        let mut aad = [0; NAME_LEN + 32];
        aad[..NAME_LEN].copy_from_slice(name);
        aad[NAME_LEN..].copy_from_slice(&self.context);
        aad
    }

    /// As [`ProducesTickets::encrypt`], issued at `now` (Unix seconds).
    fn seal(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let key = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(
            NAME_LEN + NONCE_LEN + ISSUED_LEN + plain.len() + AES_256_GCM.tag_len(),
        );
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&now.to_be_bytes());
        out.extend_from_slice(plain);
        let tag = key
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(&key.name)),
                &mut out[NAME_LEN + NONCE_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    /// As [`ProducesTickets::decrypt`], at `now` (Unix seconds).
    fn open(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() < NAME_LEN + NONCE_LEN + ISSUED_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = self.keys.iter().find(|k| k.name[..] == *name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain_len = key
            .key
            .open_in_place(nonce, Aad::from(self.aad(&key.name)), &mut buf)
            .ok()?
            .len();
        buf.truncate(plain_len);
        let issued = u64::from_be_bytes(buf.get(..ISSUED_LEN)?.try_into().ok()?);
        let fresh = issued <= now.saturating_add(CLOCK_SKEW)
            && now.saturating_sub(issued) <= u64::from(TICKET_LIFETIME);
        if !fresh {
            return None;
        }
        buf.drain(..ISSUED_LEN);
        Some(buf)
    }
}

/// Seconds since the Unix epoch.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ProducesTickets for FileTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, now_secs())
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        self.open(ticket, now_secs())
    }
}

/// rustls's rotating random-key ticketer, its tickets bound to a context:
/// the context leads the plaintext the inner AEAD seals, and a ticket that
/// opens to another context is refused. The inner ticketer is kept by a
/// reload that leaves the listener's `tls` as it is
/// ([`crate::tls::ServerTls::new`]), while the context is taken from the
/// files then (a renewed client CA or CRL refuses the tickets issued before).
pub struct BoundTicketer {
    inner: Arc<dyn ProducesTickets>,
    context: [u8; 32],
}

impl fmt::Debug for BoundTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundTicketer").finish_non_exhaustive()
    }
}

impl BoundTicketer {
    /// `inner`'s tickets, for `context`.
    pub fn new(inner: Arc<dyn ProducesTickets>, context: [u8; 32]) -> Self {
        BoundTicketer { inner, context }
    }
}

impl ProducesTickets for BoundTicketer {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut bound = Vec::with_capacity(self.context.len() + plain.len());
        bound.extend_from_slice(&self.context);
        bound.extend_from_slice(plain);
        self.inner.encrypt(&bound)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let mut plain = self.inner.decrypt(ticket)?;
        if plain.get(..self.context.len())? != self.context {
            return None;
        }
        plain.drain(..self.context.len());
        Some(plain)
    }
}

/// Never issues a ticket (`session_tickets: false`): rustls then sends no
/// TLS 1.2 SessionTicket extension, and its TLS 1.3 tickets are ids of
/// sessions kept in the listener's in-memory session cache.
#[derive(Debug)]
pub struct NoTickets;

impl ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }

    fn lifetime(&self) -> u32 {
        0
    }

    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn decrypt(&self, _ticket: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key(seed: u8) -> [u8; KEY_FILE_LEN] {
        std::array::from_fn(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_ticket_opens_with_the_key_that_sealed_it() {
        let t = FileTicketer::new(&[key(1)], [7; 32]).unwrap();
        let ticket = t.seal(b"session", NOW).unwrap();
        assert_eq!(&ticket[..NAME_LEN], &key(1)[..NAME_LEN]);
        assert!(!ticket.windows(7).any(|w| w == b"session"));
        assert_eq!(t.open(&ticket, NOW).unwrap(), b"session");
        // Two tickets of one session differ (random nonce).
        assert_ne!(t.seal(b"session", NOW).unwrap(), ticket);
        // Through the trait, at the real time.
        assert_eq!(t.decrypt(&t.encrypt(b"x").unwrap()).unwrap(), b"x");
        assert!(t.enabled());
        assert_eq!(t.lifetime(), TICKET_LIFETIME);
    }

    #[test]
    fn the_first_key_seals_and_every_key_opens() {
        let old = FileTicketer::new(&[key(1)], [7; 32]).unwrap();
        let rotated = FileTicketer::new(&[key(2), key(1)], [7; 32]).unwrap();
        let before = old.seal(b"a", NOW).unwrap();
        assert_eq!(rotated.open(&before, NOW).unwrap(), b"a");
        let after = rotated.seal(b"b", NOW).unwrap();
        assert_eq!(&after[..NAME_LEN], &key(2)[..NAME_LEN]);
        assert_eq!(old.open(&after, NOW), None);
    }

    #[test]
    fn unknown_names_tampering_and_other_contexts_are_refused() {
        let t = FileTicketer::new(&[key(1)], [7; 32]).unwrap();
        let ticket = t.seal(b"session", NOW).unwrap();
        assert_eq!(
            FileTicketer::new(&[key(3)], [7; 32])
                .unwrap()
                .open(&ticket, NOW),
            None
        );
        // The same name, another secret.
        let mut same_name = key(3);
        same_name[..NAME_LEN].copy_from_slice(&key(1)[..NAME_LEN]);
        assert_eq!(
            FileTicketer::new(&[same_name], [7; 32])
                .unwrap()
                .open(&ticket, NOW),
            None
        );
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(t.open(&bad, NOW), None, "byte {i} flipped");
        }
        for len in 0..ticket.len() {
            assert_eq!(t.open(&ticket[..len], NOW), None, "cut to {len}");
        }
        assert_eq!(
            FileTicketer::new(&[key(1)], [8; 32])
                .unwrap()
                .open(&ticket, NOW),
            None
        );
    }

    #[test]
    fn a_ticket_past_its_lifetime_is_refused() {
        let t = FileTicketer::new(&[key(1)], [7; 32]).unwrap();
        let ticket = t.seal(b"s", NOW).unwrap();
        let life = u64::from(TICKET_LIFETIME);
        assert!(t.open(&ticket, NOW + life).is_some());
        assert_eq!(t.open(&ticket, NOW + life + 1), None);
        assert!(t.open(&ticket, NOW - CLOCK_SKEW).is_some());
        assert_eq!(t.open(&ticket, NOW - CLOCK_SKEW - 1), None);
    }

    #[test]
    fn the_random_ticketer_is_bound_to_its_context() {
        let inner = rustls::crypto::ring::Ticketer::new().unwrap();
        let a = BoundTicketer::new(inner.clone(), [1; 32]);
        let b = BoundTicketer::new(inner.clone(), [2; 32]);
        let ticket = a.encrypt(b"session").unwrap();
        assert_eq!(a.decrypt(&ticket).unwrap(), b"session");
        assert_eq!(b.decrypt(&ticket), None);
        assert_eq!(inner.decrypt(&ticket).unwrap()[..32], [1; 32]);
        assert!(!NoTickets.enabled());
    }
}
