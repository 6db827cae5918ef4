//! TLS termination (listeners) and origination (clusters), on rustls with the *ring*
//! provider.
//!
//! This module owns everything between a config's `tls:` section and a ready
//! `rustls::{ServerConfig, ClientConfig}`: reading and checking PEM files (every error
//! names the file and what is wrong with it), choosing a listener certificate by SNI,
//! client-certificate verification (mTLS), revocation lists (a listener's for client
//! certificates, a cluster's for upstream ones), protocol versions, ALPN and session
//! resumption. It also extracts the facts about an established downstream session that
//! the request path, access log and (later) filters need: [`TlsInfo`].
//!
//! Config building reads files synchronously; it runs at startup and on reload, off the
//! request path (callers on a runtime should use `spawn_blocking`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, DnsName, PrivateKeyDer, ServerName,
};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerConfig, ServerConnection, ServerSessionMemoryCache,
    WebPkiClientVerifier,
};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CipherSuite, InconsistentKeys, ProtocolVersion, RootCertStore, SupportedProtocolVersion,
};
use x509_parser::asn1_rs::{Any, Tag, ToDer};
use x509_parser::x509::X509Name;

use crate::config::{self, CertificateConfig, TlsVersion};

mod tickets;

/// Server-side session cache for TLS 1.2 session-ID resumption (TLS 1.3 and TLS 1.2
/// clients that support tickets use stateless tickets instead; with
/// `session_tickets: false`, TLS 1.3 resumes from it too). rustls' default of 256
/// is small for an edge listener; 4096 entries cost at most a few MiB.
const SESSION_CACHE_SIZE: usize = 4096;

/// Label substituted for `*` when asking webpki whether a wildcard name is one the
/// certificate is really valid for.
const WILDCARD_PROBE_LABEL: &str = "legate-sni-probe";

/// The crypto provider for every config this module builds. The workspace compiles
/// rustls without aws-lc-rs, so there is no process default to fall back on.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// [`provider`] with only the cipher suites and key exchange groups named
/// (`cipher_suites`, `ecdh_curves`; an empty list keeps all of its kind).
/// Config validation has refused an unknown name already.
fn provider_with(suites: &[String], groups: &[String]) -> anyhow::Result<Arc<CryptoProvider>> {
    let mut provider = rustls::crypto::ring::default_provider();
    if !suites.is_empty() {
        provider.cipher_suites = suites
            .iter()
            .map(|n| cipher_suite(n).ok_or_else(|| anyhow!("unknown cipher suite `{n}`")))
            .collect::<anyhow::Result<_>>()?;
    }
    if !groups.is_empty() {
        provider.kx_groups = groups
            .iter()
            .map(|n| kx_group(n).ok_or_else(|| anyhow!("unknown ECDH curve `{n}`")))
            .collect::<anyhow::Result<_>>()?;
    }
    Ok(Arc::new(provider))
}

/// The names `cipher_suites` takes, for messages: TLS 1.3's by their IANA
/// name, TLS 1.2's by OpenSSL's (their IANA names are taken too).
pub const CIPHER_SUITE_NAMES: &str = "TLS_AES_256_GCM_SHA384, TLS_AES_128_GCM_SHA256, \
     TLS_CHACHA20_POLY1305_SHA256 (TLS 1.3); ECDHE-ECDSA-AES256-GCM-SHA384, \
     ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-ECDSA-CHACHA20-POLY1305, ECDHE-RSA-AES256-GCM-SHA384, \
     ECDHE-RSA-AES128-GCM-SHA256, ECDHE-RSA-CHACHA20-POLY1305 (TLS 1.2)";

/// The names `ecdh_curves` takes, for messages.
pub const ECDH_CURVE_NAMES: &str = "X25519, P-256, P-384";

/// The suite a `cipher_suites` entry names: an IANA name (rustls's
/// `TLS13_` spelling too) or OpenSSL's, as Envoy and nginx configs write it.
fn cipher_suite(name: &str) -> Option<rustls::SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite as cs;
    Some(match name {
        "TLS_AES_256_GCM_SHA384" | "TLS13_AES_256_GCM_SHA384" => cs::TLS13_AES_256_GCM_SHA384,
        "TLS_AES_128_GCM_SHA256" | "TLS13_AES_128_GCM_SHA256" => cs::TLS13_AES_128_GCM_SHA256,
        "TLS_CHACHA20_POLY1305_SHA256" | "TLS13_CHACHA20_POLY1305_SHA256" => {
            cs::TLS13_CHACHA20_POLY1305_SHA256
        }
        "ECDHE-ECDSA-AES256-GCM-SHA384" | "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => {
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        }
        "ECDHE-ECDSA-AES128-GCM-SHA256" | "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => {
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        }
        "ECDHE-ECDSA-CHACHA20-POLY1305" | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "ECDHE-RSA-AES256-GCM-SHA384" | "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => {
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        }
        "ECDHE-RSA-AES128-GCM-SHA256" | "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => {
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        }
        "ECDHE-RSA-CHACHA20-POLY1305" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        _ => return None,
    })
}

/// Whether `name` is a suite `cipher_suites` takes, and if so whether it
/// is a TLS 1.3 one (config validation).
pub fn cipher_suite_is_tls13(name: &str) -> Option<bool> {
    cipher_suite(name).map(|s| matches!(s, rustls::SupportedCipherSuite::Tls13(_)))
}

/// The group an `ecdh_curves` entry names (OpenSSL's aliases too).
fn kx_group(name: &str) -> Option<&'static dyn rustls::crypto::SupportedKxGroup> {
    use rustls::crypto::ring::kx_group;
    Some(match name {
        "X25519" | "x25519" => kx_group::X25519,
        "P-256" | "prime256v1" | "secp256r1" => kx_group::SECP256R1,
        "P-384" | "secp384r1" => kx_group::SECP384R1,
        _ => return None,
    })
}

/// Whether `name` is a group `ecdh_curves` takes (config validation).
pub fn is_ecdh_curve(name: &str) -> bool {
    kx_group(name).is_some()
}

/// Builds the server config for a listener: all certificates loaded and checked, SNI
/// certificate selection, minimum protocol version, client-certificate verification,
/// ALPN (`alpn` in preference order, e.g. `[b"h2", b"http/1.1"]`) and resumption.
pub fn server_config(
    cfg: &config::ListenerTls,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<ServerConfig>> {
    Ok(server_parts(cfg, alpn, None)?.config)
}

/// A listener's TLS: the acceptor, and what the request path needs to know of
/// the certificates it serves.
pub struct ServerTls {
    /// Accepts connections with [`server_config`].
    pub acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<SniResolver>,
    /// The certificates it serves, then the client CAs it trusts: what `GET
    /// /certs` and the expiry series show.
    pub certificates: Arc<[LoadedCerts]>,
    /// The random-key ticketer (no `session_ticket_keys`), which a rebuild
    /// for the same `tls` settings keeps ([`ServerTls::new`]).
    random_tickets: Option<Arc<dyn rustls::server::ProducesTickets>>,
    /// The settings it was built from.
    settings: config::ListenerTls,
}

impl ServerTls {
    /// As [`server_config`]. `previous` is the listener's TLS this one
    /// replaces (a reload, a renewal of its files): when its `tls` settings
    /// are these, its random ticket key is kept (without
    /// `session_ticket_keys`), so clients resume across the reload. Its
    /// tickets are bound to the client CA and CRL read now, so a renewal of
    /// those refuses the tickets issued before it.
    pub fn new(
        cfg: &config::ListenerTls,
        alpn: &[&[u8]],
        previous: Option<&ServerTls>,
    ) -> anyhow::Result<Self> {
        let kept = previous
            .filter(|p| same_settings(&p.settings, cfg))
            .and_then(|p| p.random_tickets.clone());
        let ServerParts {
            config,
            resolver,
            client_cas,
            random_tickets,
        } = server_parts(cfg, alpn, kept)?;
        let mut certificates: Vec<LoadedCerts> = cfg
            .certificates
            .iter()
            .zip(&resolver.certs)
            .map(|(c, k)| LoadedCerts::new(CertRole::Chain, &c.value.cert, &k.cert))
            .collect();
        if let (Some(auth), Some(cas)) = (&cfg.client_auth, client_cas) {
            certificates.push(LoadedCerts::new(CertRole::Ca, &auth.ca, &cas));
        }
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            resolver,
            certificates: certificates.into(),
            random_tickets,
            settings: cfg.clone(),
        })
    }

    /// Describes an established session: [`tls_info`], and the URI SANs of the
    /// certificate this listener served it (chosen by SNI as the handshake did).
    pub fn info(&self, conn: &ServerConnection) -> TlsInfo {
        let mut info = tls_info(conn);
        let index = conn
            .server_name()
            .and_then(|sni| self.resolver.lookup(sni))
            .unwrap_or(0);
        if let Some(uris) = self.resolver.uri_sans.get(index) {
            info.local_uri_sans = uris.clone();
        }
        info
    }
}

/// Whether two `tls` settings are the same (as the config file would write
/// them).
fn same_settings(a: &config::ListenerTls, b: &config::ListenerTls) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// What [`server_parts`] builds.
struct ServerParts {
    config: Arc<ServerConfig>,
    resolver: Arc<SniResolver>,
    /// The client CA file's certificates (with `client_auth`).
    client_cas: Option<Vec<CertificateDer<'static>>>,
    /// The random-key ticketer, without `session_ticket_keys`.
    random_tickets: Option<Arc<dyn rustls::server::ProducesTickets>>,
}

/// `kept`: the random-key ticketer to go on with (else a new one is made
/// when one is needed).
fn server_parts(
    cfg: &config::ListenerTls,
    alpn: &[&[u8]],
    kept: Option<Arc<dyn rustls::server::ProducesTickets>>,
) -> anyhow::Result<ServerParts> {
    let provider = provider_with(&cfg.cipher_suites, &cfg.ecdh_curves)?;
    let resolver = Arc::new(SniResolver::load(&cfg.certificates, &provider)?);

    let versions: &[&'static SupportedProtocolVersion] = match cfg.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("TLS protocol versions")?;
    let mut client_cas = None;
    let builder = match &cfg.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let cas = load_certs(&auth.ca, "client CA file")?;
            let verifier = client_verifier(auth, cas.clone(), &provider)?;
            client_cas = Some(cas);
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
    // Stateless tickets: resumption works across this listener's workers without a
    // shared cache; with key files, across instances and restarts too.
    let context = ticket_context(cfg.client_auth.as_ref(), client_cas.as_deref());
    let mut random_tickets = None;
    config.ticketer = if !cfg.session_tickets {
        Arc::new(tickets::NoTickets)
    } else if cfg.session_ticket_keys.is_empty() {
        // rustls's: a random key, rotated every 6 hours (the one before
        // still decrypts).
        let inner = match kept {
            Some(inner) => inner,
            None => rustls::crypto::ring::Ticketer::new()
                .map_err(|e| anyhow!("cannot create a TLS session ticket key: {e}"))?,
        };
        random_tickets = Some(inner.clone());
        Arc::new(tickets::BoundTicketer::new(inner, context))
    } else {
        let keys = load_ticket_keys(&cfg.session_ticket_keys).map_err(|(_, e)| e)?;
        Arc::new(
            tickets::FileTicketer::new(&keys, context)
                .ok_or_else(|| anyhow!("cannot derive the TLS session ticket keys"))?,
        )
    };
    Ok(ServerParts {
        config: Arc::new(config),
        resolver,
        client_cas,
        random_tickets,
    })
}

/// What a session ticket is bound to: the listener's client-certificate
/// policy (none, optional or required; the CA certificates; the CRL file's
/// bytes and how it is checked). A ticket issued under another one does not
/// resume (see [`tickets`]).
fn ticket_context(
    auth: Option<&config::ClientAuth>,
    cas: Option<&[CertificateDer<'static>]>,
) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"legate session ticket context v1");
    let Some(auth) = auth else {
        h.update([0]);
        return h.finalize().into();
    };
    h.update([if auth.required { 2 } else { 1 }]);
    for ca in cas.unwrap_or_default() {
        h.update((ca.len() as u64).to_le_bytes());
        h.update(ca.as_ref());
    }
    match auth.crl.as_ref().map(std::fs::read) {
        None => h.update([0]),
        Some(Ok(crl)) => {
            h.update([1, u8::from(auth.only_verify_leaf_cert_crl)]);
            h.update((crl.len() as u64).to_le_bytes());
            h.update(&crl);
        }
        // Read by the verifier a moment ago; a ticket of this context
        // resumes nowhere else.
        Some(Err(e)) => h.update(format!("error: {e}").as_bytes()),
    }
    h.finalize().into()
}

/// Reads one `session_ticket_keys` file: exactly
/// [`tickets::KEY_FILE_LEN`] bytes.
fn read_ticket_key(path: &Path) -> Result<[u8; tickets::KEY_FILE_LEN], FileError> {
    let bytes = read_file(path, "session ticket key file", PairFile::Cert)?;
    <[u8; tickets::KEY_FILE_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
        FileError::content(format!(
            "session ticket key file `{}` holds {} bytes, not {}",
            path.display(),
            bytes.len(),
            tickets::KEY_FILE_LEN
        ))
    })
}

/// Reads the `session_ticket_keys` files in order; the first problem, with
/// the index of its entry.
fn load_ticket_keys(
    paths: &[std::path::PathBuf],
) -> Result<Vec<[u8; tickets::KEY_FILE_LEN]>, (usize, FileError)> {
    let mut keys: Vec<[u8; tickets::KEY_FILE_LEN]> = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        let key = read_ticket_key(path).map_err(|e| (i, e))?;
        if let Some(j) = keys
            .iter()
            .position(|k| tickets::key_name(k) == tickets::key_name(&key))
        {
            return Err((i, duplicate_name(path, j, &paths[j])));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// Key file `path` has the name of entry `index`, `first`.
fn duplicate_name(path: &Path, index: usize, first: &Path) -> FileError {
    FileError::content(format!(
        "session ticket key file `{}` has the key name (its first 16 bytes) of entry {index}, \
         `{}`",
        path.display(),
        first.display()
    ))
}

/// The problems of the `session_ticket_keys` files as loading them finds
/// them, each with the index of its entry: every file that cannot be read
/// or is not 80 bytes, and every key whose name an earlier one has
/// (`legate check`).
pub fn check_ticket_keys(paths: &[std::path::PathBuf]) -> Vec<(usize, FileError)> {
    let mut problems = Vec::new();
    let mut names: Vec<([u8; 16], usize)> = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        match read_ticket_key(path) {
            Err(e) => problems.push((i, e)),
            Ok(key) => {
                let name = tickets::key_name(&key);
                match names.iter().find(|(n, _)| *n == name) {
                    Some(&(_, j)) => problems.push((i, duplicate_name(path, j, &paths[j]))),
                    None => names.push((name, i)),
                }
            }
        }
    }
    problems
}

/// Loads a certificate chain and its key as [`server_config`] and
/// [`client_config`] do, and checks that they belong together (`legate check`).
/// Silent about a certificate outside its validity (and an unencrypted key
/// with a password): building the config loads it again and warns then, once.
/// `password` is the key's `key_password_file`.
pub fn check_certified_key(
    cert: &Path,
    key: &Path,
    password: Option<&Path>,
) -> Result<(), FileError> {
    load_key_pair(cert, key, password, &provider()).map(|_| ())
}

/// Loads a CA file as [`server_config`] (`what`: `client CA file`) and
/// [`client_config`] (`upstream CA file`) do (`legate check`).
pub fn check_roots(path: &Path, what: &str) -> Result<(), FileError> {
    load_roots(path, what).map(|_| ())
}

/// What is wrong with a PEM file a TLS setting names: what `legate check`
/// chooses its help by, rather than by the message's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileProblem {
    /// The file cannot be read (missing, not permitted, a directory).
    Unreadable,
    /// The file is read but does not hold what its key takes: no PEM block of
    /// the kind, malformed PEM, an unusable key or certificate.
    Content,
    /// The private key is not the key of the certificate it goes with.
    KeyMismatch,
    /// The private key is encrypted and no `key_password_file` is given.
    Encrypted,
    /// The encrypted private key does not decrypt with the password given.
    WrongPassword,
    /// The private key is encrypted in a way Legate does not read: OpenSSL's
    /// legacy PEM encryption (`Proc-Type: 4,ENCRYPTED`), PBES1 or PKCS#12
    /// algorithms.
    UnsupportedEncryption,
}

/// Which file of a certificate, its key and the key's password a
/// [`FileError`] is in (a CA or CRL file's is [`PairFile::Cert`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairFile {
    /// The certificate (or CA, CRL) file.
    Cert,
    /// The private key file.
    Key,
    /// The file holding the private key's password (`key_password_file`).
    Password,
}

/// A certificate, key, password or CA file that cannot be loaded: the
/// message (which names the file and says what is wrong), what kind of
/// problem it is, and which file it is in. A mismatch is the key's: the
/// certificate is the one the names come from; a wrong password is the
/// password file's.
#[derive(Debug)]
pub struct FileError {
    /// What kind of problem it is.
    pub problem: FileProblem,
    /// The file the problem is in.
    pub file: PairFile,
    message: String,
}

impl FileError {
    fn new(problem: FileProblem, file: PairFile, message: String) -> Self {
        FileError {
            problem,
            file,
            message,
        }
    }

    /// The file of a certificate or CA does not hold what it should.
    fn content(message: String) -> Self {
        Self::new(FileProblem::Content, PairFile::Cert, message)
    }

    /// The private key file does not hold what it should (`problem`).
    fn key(problem: FileProblem, message: String) -> Self {
        Self::new(problem, PairFile::Key, message)
    }
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FileError {}

/// The files a listener's TLS section names (certificates, keys, their
/// password files and OCSP responses, client CA and CRLs, session ticket
/// keys), in order.
pub fn files(cfg: &config::ListenerTls) -> impl Iterator<Item = &std::path::PathBuf> {
    cfg.certificates
        .iter()
        .flat_map(|c| {
            [Some(&c.value.cert), Some(&c.value.key)]
                .into_iter()
                .chain([
                    c.value.key_password_file.as_ref(),
                    c.value.ocsp_staple.as_ref(),
                ])
                .flatten()
        })
        .chain(
            cfg.client_auth
                .iter()
                .flat_map(|a| std::iter::once(&a.ca).chain(&a.crl)),
        )
        .chain(&cfg.session_ticket_keys)
}

/// The files a cluster's `tls` names (CA, client certificate, key and its
/// password file, CRLs).
pub fn upstream_files(cfg: &config::UpstreamTls) -> impl Iterator<Item = &std::path::PathBuf> {
    [
        &cfg.ca,
        &cfg.client_cert,
        &cfg.client_key,
        &cfg.key_password_file,
        &cfg.crl,
    ]
    .into_iter()
    .flatten()
}

/// The files `kv.tls` names (CA, client certificate, key and its password
/// file).
pub fn kv_files(cfg: &config::KvTls) -> impl Iterator<Item = &std::path::PathBuf> {
    [
        &cfg.ca,
        &cfg.client_cert,
        &cfg.client_key,
        &cfg.key_password_file,
    ]
    .into_iter()
    .flatten()
}

/// The PEM of `kv.tls.client_key` for the Redis client, which reads only
/// unencrypted keys: the file as it is without `password`, else the key
/// decrypted with it (PKCS#8 PEM, in memory only).
pub fn kv_client_key_pem(key: &Path, password: Option<&Path>) -> Result<Vec<u8>, FileError> {
    let Some(password) = password else {
        return read_file(key, "private key file", PairFile::Key);
    };
    let loaded = load_key(key, Some(password))?;
    let label = match &loaded.key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    pkcs8::der::pem::encode_string(label, pkcs8::LineEnding::LF, loaded.key.secret_der())
        .map(String::into_bytes)
        .map_err(|e| {
            FileError::key(
                FileProblem::Content,
                format!("private key file `{}`: {e}", key.display()),
            )
        })
}

/// As [`files_digest`], for `kv.tls`: the file watch reloads the config when
/// it differs from the one taken before the KV store's plugins loaded.
pub fn kv_files_digest(cfg: &config::KvTls) -> [u8; 32] {
    digest_files(kv_files(cfg))
}

/// A digest of [`files`]. A reload compares it to tell a renewed certificate
/// behind an unchanged config: the listener then takes the new files
/// ([`crate::listener::ListenerCtx::renew_tls`]).
pub fn files_digest(cfg: &config::ListenerTls) -> [u8; 32] {
    digest_files(files(cfg))
}

/// As [`files_digest`], for a cluster's `tls` (its settings are renewed:
/// [`crate::server::ClusterEntry::renewed`]).
pub fn upstream_files_digest(cfg: &config::UpstreamTls) -> [u8; 32] {
    digest_files(upstream_files(cfg))
}

/// A file that cannot be read digests as its error, so the rebuild that follows
/// reports it.
fn digest_files<'a>(paths: impl Iterator<Item = &'a std::path::PathBuf>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for path in paths {
        match std::fs::read(path) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(e) => h.update(format!("error: {e}").as_bytes()),
        }
    }
    h.finalize().into()
}

/// Builds the client config for a cluster: trusts `ca` if given (else the Mozilla roots
/// from webpki-roots), presents `client_cert`/`client_key` if given (mTLS), and offers
/// `alpn` (e.g. `[b"h2"]`, `[b"h2", b"http/1.1"]` or `[b"http/1.1"]`).
///
/// The SNI and verified name are chosen per connection by the caller: `cfg.sni`, else
/// the endpoint's host.
pub fn client_config(
    cfg: &config::UpstreamTls,
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<ClientConfig>> {
    Ok(client_parts(cfg, alpn)?.0)
}

/// [`client_config`], and the certificates it presents and trusts (its
/// `client_cert`, then its `ca`; not the built-in roots): what `GET /certs`
/// and the expiry series show of a cluster.
pub fn client_parts(
    cfg: &config::UpstreamTls,
    alpn: &[&[u8]],
) -> anyhow::Result<(Arc<ClientConfig>, Vec<LoadedCerts>)> {
    let provider = provider_with(&cfg.cipher_suites, &cfg.ecdh_curves)?;
    let mut certificates = Vec::new();
    let roots = match &cfg.ca {
        Some(ca) => {
            let certs = load_certs(ca, "upstream CA file")?;
            let roots = roots_of(ca, "upstream CA file", certs.clone())?;
            certificates.push(LoadedCerts::new(CertRole::Ca, ca, &certs));
            roots
        }
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let webpki = match &cfg.crl {
        None if cfg.match_subject_alt_names.is_empty() => None,
        None => Some(
            Revocation::none()
                .server_verifier(Arc::new(roots.clone()), provider.clone())
                .map_err(|e| anyhow!("upstream CA: {e}"))?,
        ),
        Some(crl) => Some(
            Revocation::load(crl, cfg.only_verify_leaf_cert_crl)?
                .server_verifier(Arc::new(roots.clone()), provider.clone())
                .map_err(|e| anyhow!("upstream CRL file `{}`: {e}", crl.display()))?,
        ),
    };
    let builder = match webpki {
        None => builder.with_root_certificates(roots),
        Some(webpki) if cfg.match_subject_alt_names.is_empty() => {
            builder.with_webpki_verifier(webpki)
        }
        Some(webpki) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SanVerifier::new(
                webpki,
                &cfg.match_subject_alt_names,
            )?)),
    };
    let mut config = match (&cfg.client_cert, &cfg.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let password = cfg.key_password_file.as_deref();
            let certified = load_certified_key(cert, key, password, &provider)?;
            certificates.insert(0, LoadedCerts::new(CertRole::Chain, cert, &certified.cert));
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
        // Config validation rejects this; kept as an error rather than a panic.
        _ => bail!("upstream TLS: `client_cert` and `client_key` go together"),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok((Arc::new(config), certificates))
}

/// What a PEM file's certificates are to a TLS config in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRole {
    /// A certificate chain served (listener) or presented (cluster mTLS).
    Chain,
    /// Certificate authorities trusted to verify the peer.
    Ca,
}

/// One PEM file's certificates as a TLS config in force holds them, read when
/// it was built (a renewal builds another): `GET /certs`, and the series
/// `legate_tls_certificate_expiration_timestamp_seconds` and
/// `legate_server_days_until_first_cert_expiring` (Envoy's `/certs` and
/// `server.days_until_first_cert_expiring`).
#[derive(Clone, Debug)]
pub struct LoadedCerts {
    /// What they are to the config.
    pub role: CertRole,
    /// The file they were read from.
    pub path: std::path::PathBuf,
    /// Each certificate of the file, in its order (a chain's leaf first).
    pub certs: Vec<CertDetails>,
}

/// What an operator checks of one certificate.
#[derive(Clone, Debug)]
pub struct CertDetails {
    /// The subject, RFC 4514 (`CN=api.example.com,O=Example`).
    pub subject: String,
    /// The serial number, lowercase hex.
    pub serial_number: String,
    /// subjectAltName entries as Envoy's `/certs` names them: `dns`, `uri`,
    /// `ip_address`, `email`.
    pub subject_alt_names: Vec<(&'static str, String)>,
    /// notBefore, seconds since the Unix epoch.
    pub not_before: i64,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: i64,
}

impl LoadedCerts {
    fn new(role: CertRole, path: &Path, certs: &[CertificateDer<'_>]) -> Self {
        LoadedCerts {
            role,
            path: path.to_path_buf(),
            certs: certs.iter().filter_map(CertDetails::of).collect(),
        }
    }

    /// `"cert_chain"` or `"ca_cert"`, the keys of Envoy's `/certs`.
    pub fn role_name(&self) -> &'static str {
        match self.role {
            CertRole::Chain => "cert_chain",
            CertRole::Ca => "ca_cert",
        }
    }
}

impl CertDetails {
    /// `None` for a certificate that does not parse (rustls loaded it as
    /// opaque bytes; webpki would refuse it at a handshake).
    fn of(cert: &CertificateDer<'_>) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let mut subject_alt_names = Vec::new();
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                let entry = match name {
                    GeneralName::DNSName(d) => ("dns", (*d).to_owned()),
                    GeneralName::URI(u) => ("uri", (*u).to_owned()),
                    GeneralName::RFC822Name(e) => ("email", (*e).to_owned()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => (
                            "ip_address",
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string(),
                        ),
                        16 => (
                            "ip_address",
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string(),
                        ),
                        _ => continue,
                    },
                    _ => continue,
                };
                subject_alt_names.push(entry);
            }
        }
        let validity = parsed.validity();
        Some(CertDetails {
            subject: format_name(parsed.subject()),
            serial_number: parsed.raw_serial_as_string().replace(':', ""),
            subject_alt_names,
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }

    /// Whole days left until it expires at `now` (seconds since the epoch); 0
    /// once expired, as Envoy counts them.
    pub fn days_until_expiration(&self, now: i64) -> i64 {
        Self::days_between(now, self.not_after)
    }

    /// Whole days from `now` until `not_after` (seconds since the epoch), 0
    /// once passed.
    pub fn days_between(now: i64, not_after: i64) -> i64 {
        (not_after.saturating_sub(now) / 86_400).max(0)
    }

    /// As one entry of Envoy's `/certs`, with `path`.
    pub fn to_json(&self, path: &Path, now: i64) -> serde_json::Value {
        let time = |t: i64| {
            let t = std::time::UNIX_EPOCH
                .checked_add(std::time::Duration::from_secs(t.max(0).unsigned_abs()))
                .unwrap_or(std::time::UNIX_EPOCH);
            crate::access_log::timestamp(t)
        };
        let sans: Vec<_> = self
            .subject_alt_names
            .iter()
            .map(|(kind, value)| serde_json::json!({ *kind: value }))
            .collect();
        serde_json::json!({
            "path": path.display().to_string(),
            "subject": self.subject,
            "serial_number": self.serial_number,
            "subject_alt_names": sans,
            "days_until_expiration": self.days_until_expiration(now),
            "valid_from": time(self.not_before),
            "expiration_time": time(self.not_after),
        })
    }
}

/// What the request path and logs need to know about a downstream TLS session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    /// The server name the client asked for (lowercase), if it sent SNI.
    pub sni: Option<String>,
    /// The negotiated ALPN protocol, if any (e.g. `b"h2"`).
    pub alpn: Option<Vec<u8>>,
    /// `"TLSv1.2"` or `"TLSv1.3"`.
    pub version: &'static str,
    /// IANA name of the negotiated cipher suite, e.g. `TLS_AES_128_GCM_SHA256`.
    pub cipher: &'static str,
    /// The certificate the client presented (which the verifier then accepted:
    /// the handshake fails otherwise), if it presented one.
    pub peer: Option<Arc<PeerCert>>,
    /// The chain the client presented, its certificate first (empty without one).
    pub peer_certs: Vec<CertificateDer<'static>>,
    /// The URI SANs of the certificate the listener served (XFCC's `By`).
    pub local_uri_sans: Arc<[String]>,
}

/// Counts an established downstream session that resumed an earlier one
/// (`legate_listener_tls_session_reused_total`).
pub fn count_resumed(conn: &ServerConnection, stats: &crate::listener::ListenerStats) {
    if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        stats.cx_tls_resumed.inc();
    }
}

/// Describes an established downstream session. Call after the handshake completes.
pub fn tls_info(conn: &ServerConnection) -> TlsInfo {
    let peer = conn.peer_certificates().and_then(|chain| chain.first());
    TlsInfo {
        sni: conn.server_name().map(str::to_owned),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        },
        cipher: conn
            .negotiated_cipher_suite()
            .map_or("unknown", |suite| cipher_name(suite.suite())),
        peer: peer.map(|cert| Arc::new(PeerCert::of(cert))),
        peer_certs: conn
            .peer_certificates()
            .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default(),
        local_uri_sans: Arc::from([]),
    }
}

impl TlsInfo {
    /// The subject of the client's verified certificate, if any.
    pub fn peer_subject(&self) -> Option<&str> {
        self.peer.as_ref().and_then(|p| p.subject.as_deref())
    }
}

/// What a connection's verified client certificate says about the client, read
/// once at the handshake: the access log, `x-forwarded-client-cert`, route
/// matches (`match.client_cert`) and filters read it from here.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PeerCert {
    /// The subject as an RFC 4514 string (most specific RDN first, as Envoy
    /// and nginx print it), e.g. `CN=client,O=Example`; `None` if it does not
    /// parse.
    pub subject: Option<String>,
    /// Its subjectAltName URIs (SPIFFE ids), in the certificate's order.
    pub uri_sans: Box<[String]>,
    /// Its subjectAltName DNS names, in the certificate's order.
    pub dns_sans: Box<[String]>,
}

impl PeerCert {
    /// Reads a client certificate (nothing but what parses).
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        let (uris, dns) = alt_names(cert);
        PeerCert {
            subject: subject_rfc4514(cert),
            uri_sans: uris.into(),
            dns_sans: dns.into(),
        }
    }
}

/// The subjectAltName URIs and DNS names of a certificate (none if it does not
/// parse), in the certificate's order.
pub fn alt_names(cert: &CertificateDer<'_>) -> (Vec<String>, Vec<String>) {
    use x509_parser::extensions::GeneralName;
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) {
        if let Ok(Some(san)) = parsed.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => uris.push((*u).to_owned()),
                    GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                    _ => {}
                }
            }
        }
    }
    (uris, dns)
}

/// The IANA name of a cipher suite, as Envoy and nginx log it. rustls names TLS 1.2
/// suites the IANA way already, but prefixes TLS 1.3 ones with `TLS13_`.
fn cipher_name(suite: CipherSuite) -> &'static str {
    match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        CipherSuite::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        other => other.as_str().unwrap_or("unknown"),
    }
}

/// Picks a listener certificate from the client's SNI: an exact name first, then a
/// `*.suffix` wildcard, then the first certificate (also used without SNI).
#[derive(Debug)]
struct SniResolver {
    /// Each certificate, with its OCSP response if it has one to staple.
    certs: Vec<Arc<CertifiedKey>>,
    /// For each certificate of `certs` that staples a response: until when,
    /// and the certificate without it, served once the response is past its
    /// `nextUpdate`.
    staples: Vec<Option<Staple>>,
    /// The URI SANs of each certificate of `certs`.
    uri_sans: Vec<Arc<[String]>>,
    /// Lowercase name → index into `certs`. The first certificate to claim a name wins.
    exact: HashMap<String, usize>,
    /// Lowercase parent domain of a `*.parent` pattern → index into `certs`.
    wildcard: HashMap<String, usize>,
}

/// A name a certificate serves, normalized to lowercase without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NamePattern {
    Exact(String),
    /// `*.parent`, matching exactly one label in front of `parent`.
    Wildcard(String),
}

impl NamePattern {
    /// Parses an exact DNS name or `*.suffix`; `None` if it is neither.
    fn parse(raw: &str) -> Option<Self> {
        let name = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
        let (pattern, dns) = match name.strip_prefix("*.") {
            Some(parent) => (NamePattern::Wildcard(parent.to_owned()), parent),
            None => (NamePattern::Exact(name.clone()), name.as_str()),
        };
        // DnsName rejects `*` and other characters a hostname cannot contain.
        DnsName::try_from(dns).ok()?;
        Some(pattern)
    }

    /// Whether webpki accepts the certificate for this name, i.e. whether a verifying
    /// client would. Wildcards are checked with a representative label.
    fn covered_by(&self, cert: &webpki::EndEntityCert<'_>) -> bool {
        let probe = match self {
            NamePattern::Exact(name) => name.clone(),
            NamePattern::Wildcard(parent) => format!("{WILDCARD_PROBE_LABEL}.{parent}"),
        };
        ServerName::try_from(probe)
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    }
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NamePattern::Exact(name) => f.write_str(name),
            NamePattern::Wildcard(parent) => write!(f, "*.{parent}"),
        }
    }
}

impl SniResolver {
    fn load(
        certificates: &[config::Spanned<CertificateConfig>],
        provider: &CryptoProvider,
    ) -> anyhow::Result<Self> {
        if certificates.is_empty() {
            bail!("TLS listener has no certificates");
        }
        let mut resolver = SniResolver {
            certs: Vec::with_capacity(certificates.len()),
            staples: Vec::with_capacity(certificates.len()),
            uri_sans: Vec::with_capacity(certificates.len()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for (index, spanned) in certificates.iter().enumerate() {
            let c = &spanned.value;
            let password = c.key_password_file.as_deref();
            let mut certified = load_certified_key(&c.cert, &c.key, password, provider)?;
            let mut staple = None;
            if let (Some(path), Some(leaf)) = (&c.ocsp_staple, certified.cert.first()) {
                let response = load_ocsp(path, &c.cert, leaf)?;
                // A response past its nextUpdate is not stapled, as Envoy's
                // lenient stapling (its default) and nginx do: an expired
                // staple makes a client that checks it fail the handshake.
                match response.next_update.filter(|&t| now_secs() <= t) {
                    Some(next_update) => {
                        let unstapled = Arc::new(certified.clone());
                        certified.ocsp = Some(response.der);
                        staple = Some(Staple {
                            next_update,
                            unstapled,
                            path: path.clone(),
                            warned: std::sync::atomic::AtomicBool::new(false),
                        });
                    }
                    None => warn_stale_ocsp(path, response.next_update),
                }
            }
            let mut selectable = index == 0;
            for pattern in served_names(c, &certified, index == 0)? {
                let (table, key) = match pattern {
                    NamePattern::Exact(name) => (&mut resolver.exact, name),
                    NamePattern::Wildcard(parent) => (&mut resolver.wildcard, parent),
                };
                // Earlier certificates keep the names they claim (config order decides).
                if let std::collections::hash_map::Entry::Vacant(entry) = table.entry(key) {
                    entry.insert(index);
                    selectable = true;
                }
            }
            if !selectable {
                tracing::warn!(
                    cert = %c.cert.display(),
                    "every name this certificate serves is claimed by an earlier certificate, \
                     so SNI never selects it"
                );
            }
            let uris = certified
                .cert
                .first()
                .map(|leaf| alt_names(leaf).0)
                .unwrap_or_default();
            resolver.uri_sans.push(Arc::from(uris));
            resolver.certs.push(Arc::new(certified));
            resolver.staples.push(staple);
        }
        Ok(resolver)
    }

    /// Index of the certificate serving `sni`, if any serves it.
    fn lookup(&self, sni: &str) -> Option<usize> {
        // rustls already lowercases SNI and clients strip the trailing dot; normalize
        // anyway, without allocating in the common case.
        let sni = sni.strip_suffix('.').unwrap_or(sni);
        let lowered;
        let sni = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = sni.to_ascii_lowercase();
            lowered.as_str()
        } else {
            sni
        };
        if let Some(&index) = self.exact.get(sni) {
            return Some(index);
        }
        match sni.split_once('.') {
            Some((label, parent)) if !label.is_empty() => self.wildcard.get(parent).copied(),
            _ => None,
        }
    }
}

impl SniResolver {
    /// The certificate at `index` as served at `now` (seconds since the
    /// epoch): with its OCSP response until the response's `nextUpdate`,
    /// without it after (warned about once).
    fn served(&self, index: usize, now: i64) -> Option<Arc<CertifiedKey>> {
        let certified = self.certs.get(index)?;
        match self.staples.get(index) {
            Some(Some(staple)) if now > staple.next_update => {
                if !staple
                    .warned
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    warn_stale_ocsp(&staple.path, Some(staple.next_update));
                }
                Some(staple.unstapled.clone())
            }
            _ => Some(certified.clone()),
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let index = client_hello
            .server_name()
            .and_then(|sni| self.lookup(sni))
            .unwrap_or(0);
        // The clock is read only for a certificate that staples.
        let now = match self.staples.get(index) {
            Some(Some(_)) => now_secs(),
            _ => 0,
        };
        self.served(index, now)
    }
}

/// A listener certificate's stapled OCSP response, as [`SniResolver`] holds
/// it.
#[derive(Debug)]
struct Staple {
    /// The response's `nextUpdate`, seconds since the epoch: after it, the
    /// certificate is served without the response.
    next_update: i64,
    /// The certificate without the response.
    unstapled: Arc<CertifiedKey>,
    /// The response's file, for the warning.
    path: std::path::PathBuf,
    /// The warning that the response expired was logged.
    warned: std::sync::atomic::AtomicBool,
}

/// Seconds since the Unix epoch, now.
fn now_secs() -> i64 {
    x509_parser::time::ASN1Time::now().timestamp()
}

/// Warns that the OCSP response of `path` is not stapled: past its
/// `nextUpdate`, or without one (a response that says nothing of when it
/// stops being current is treated as expired, as Envoy does).
fn warn_stale_ocsp(path: &Path, next_update: Option<i64>) {
    match next_update.and_then(|t| x509_parser::time::ASN1Time::from_timestamp(t).ok()) {
        Some(t) => tracing::warn!(
            ocsp_staple = %path.display(),
            next_update = %t,
            "OCSP response has expired (past its nextUpdate); the certificate is served without \
             it until the file is renewed"
        ),
        None => tracing::warn!(
            ocsp_staple = %path.display(),
            "OCSP response has no nextUpdate, so it is never current; the certificate is served \
             without it"
        ),
    }
}

/// What a listener needs of an OCSP response file.
struct OcspResponse {
    /// The file's bytes, stapled as they are.
    der: Vec<u8>,
    /// Its `nextUpdate`, seconds since the epoch, if it has one.
    next_update: Option<i64>,
}

/// Loads the OCSP response `path` names for the certificate `leaf` (of
/// `cert_path`), as [`server_config`] does, without the warnings (`legate
/// check`).
pub fn check_ocsp_staple(cert_path: &Path, path: &Path) -> Result<(), FileError> {
    let certs = load_certs(cert_path, "certificate file")?;
    match certs.first() {
        Some(leaf) => load_ocsp(path, cert_path, leaf).map(|_| ()),
        None => Ok(()),
    }
}

/// Reads and checks an OCSP response file: a DER OCSPResponse (RFC 6960) of
/// status `successful`, a basic response about one certificate, `leaf`
/// (by serial number, as Envoy checks it). Its signature is not verified:
/// the client does that, and the file comes from the operator (as Envoy).
fn load_ocsp(
    path: &Path,
    cert_path: &Path,
    leaf: &CertificateDer<'_>,
) -> Result<OcspResponse, FileError> {
    let der = read_file(path, "OCSP response file", PairFile::Cert)?;
    let shown = path.display();
    let facts = parse_ocsp(&der)
        .map_err(|e| FileError::content(format!("OCSP response file `{shown}` {e}")))?;
    let serial = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map(|(_, c)| c.raw_serial().to_vec())
        .unwrap_or_default();
    if trim_integer(&serial) != trim_integer(&facts.serial) {
        return Err(FileError::content(format!(
            "OCSP response file `{shown}` is about the certificate with serial number {}, not \
             the one in `{}` ({})",
            hex_serial(&facts.serial),
            cert_path.display(),
            hex_serial(&serial)
        )));
    }
    if facts.revoked {
        tracing::warn!(
            ocsp_staple = %shown,
            cert = %cert_path.display(),
            "OCSP response says the certificate is revoked; clients that check it will refuse it"
        );
    }
    Ok(OcspResponse {
        der,
        next_update: facts.next_update,
    })
}

/// An INTEGER's content without the leading zero bytes of its sign.
fn trim_integer(bytes: &[u8]) -> &[u8] {
    let zeros = bytes.iter().take_while(|&&b| b == 0).count();
    &bytes[zeros.min(bytes.len().saturating_sub(1))..]
}

/// A serial number as `openssl` prints it: hex bytes joined by `:`.
fn hex_serial(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, b) in trim_integer(bytes).iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// What [`parse_ocsp`] reads of a response.
#[derive(Debug, PartialEq, Eq)]
struct OcspFacts {
    /// The serial number of the certificate it is about (INTEGER content).
    serial: Vec<u8>,
    /// `nextUpdate`, seconds since the epoch.
    next_update: Option<i64>,
    /// Its `certStatus` is `revoked`.
    revoked: bool,
}

/// The DER tags an OCSP response is made of.
mod der_tag {
    pub const SEQUENCE: u8 = 0x30;
    pub const ENUMERATED: u8 = 0x0a;
    pub const OID: u8 = 0x06;
    pub const OCTET_STRING: u8 = 0x04;
    pub const INTEGER: u8 = 0x02;
    pub const GENERALIZED_TIME: u8 = 0x18;
    /// `[0]`, `[1]`, `[2]` constructed (EXPLICIT).
    pub const CTX0: u8 = 0xa0;
    pub const CTX1: u8 = 0xa1;
    pub const CTX2: u8 = 0xa2;
    /// `[0]` and `[2]` primitive (certStatus good, unknown: IMPLICIT).
    pub const CTX0_PRIM: u8 = 0x80;
    pub const CTX2_PRIM: u8 = 0x82;
}

/// id-pkix-ocsp-basic (1.3.6.1.5.5.7.48.1.1), the OID's content bytes.
const OCSP_BASIC_OID: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x01];

/// A DER element read by [`der_element`]: its tag, its contents, the whole
/// element (tag and length too), and the input after it.
type DerElement<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

/// A DER element of an expected tag ([`der_expect`]): its contents, the
/// whole element, and the input after it.
type DerExpected<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// One DER element of `input`. Single-byte tags only (OCSP has no others);
/// `None` if it is not DER.
fn der_element(input: &[u8]) -> Option<DerElement<'_>> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let whole = &input[..input.len() - (rest.len() - len)];
    Some((tag, &rest[..len], whole, &rest[len..]))
}

/// The element of `input` with tag `tag`, or an error naming `what`.
fn der_expect<'a>(input: &'a [u8], tag: u8, what: &str) -> Result<DerExpected<'a>, String> {
    match der_element(input) {
        Some((t, contents, whole, rest)) if t == tag => Ok((contents, whole, rest)),
        _ => Err(not_ocsp(what)),
    }
}

/// The error of a file that is not an OCSP response: no `what` where one
/// belongs.
fn not_ocsp(what: &str) -> String {
    format!(
        "is not a DER OCSP response, as `openssl ocsp -respout` writes one (no {what} where one \
         belongs)"
    )
}

/// Reads an OCSPResponse (RFC 6960 4.2.1) as far as stapling needs: its
/// status, and of its basic response's one SingleResponse the certificate's
/// serial number, status and `nextUpdate`. The error completes "OCSP
/// response file `F` ...".
fn parse_ocsp(der: &[u8]) -> Result<OcspFacts, String> {
    use der_tag::*;
    let (response, _, trailing) = der_expect(der, SEQUENCE, "OCSPResponse SEQUENCE")?;
    if !trailing.is_empty() {
        return Err("holds more than one DER element".into());
    }
    let (status, _, response) = der_expect(response, ENUMERATED, "responseStatus")?;
    let name = match status {
        [0] => None,
        [1] => Some("malformedRequest"),
        [2] => Some("internalError"),
        [3] => Some("tryLater"),
        [5] => Some("sigRequired"),
        [6] => Some("unauthorized"),
        _ => Some("unknown"),
    };
    if let Some(name) = name {
        return Err(format!(
            "has status {name}, not successful: it says nothing of the certificate"
        ));
    }
    let (bytes, _, _) = der_expect(response, CTX0, "responseBytes")?;
    let (bytes, _, _) = der_expect(bytes, SEQUENCE, "ResponseBytes SEQUENCE")?;
    let (oid, _, bytes) = der_expect(bytes, OID, "responseType")?;
    if oid != OCSP_BASIC_OID {
        return Err("is not a basic OCSP response (id-pkix-ocsp-basic)".into());
    }
    let (basic, _, _) = der_expect(bytes, OCTET_STRING, "response OCTET STRING")?;
    let (basic, _, _) = der_expect(basic, SEQUENCE, "BasicOCSPResponse SEQUENCE")?;
    let (mut data, _, _) = der_expect(basic, SEQUENCE, "ResponseData SEQUENCE")?;
    if let Some((CTX0, _, _, rest)) = der_element(data) {
        data = rest; // version
    }
    data = match der_element(data) {
        Some((CTX1 | CTX2, _, _, rest)) => rest,
        _ => return Err(not_ocsp("responderID")),
    };
    let (_, _, data) = der_expect(data, GENERALIZED_TIME, "producedAt")?;
    let (mut responses, _, _) = der_expect(data, SEQUENCE, "responses SEQUENCE")?;
    let mut singles = Vec::new();
    while !responses.is_empty() {
        let (single, _, rest) = der_expect(responses, SEQUENCE, "SingleResponse SEQUENCE")?;
        singles.push(single);
        responses = rest;
    }
    let [single] = singles[..] else {
        return Err(format!(
            "holds {} certificate statuses; a stapled response must be about its certificate \
             only",
            singles.len()
        ));
    };
    let (cert_id, _, single) = der_expect(single, SEQUENCE, "CertID SEQUENCE")?;
    let (_, _, cert_id) = der_expect(cert_id, SEQUENCE, "hashAlgorithm")?;
    let (_, _, cert_id) = der_expect(cert_id, OCTET_STRING, "issuerNameHash")?;
    let (_, _, cert_id) = der_expect(cert_id, OCTET_STRING, "issuerKeyHash")?;
    let (serial, _, _) = der_expect(cert_id, INTEGER, "serialNumber")?;
    let (revoked, single) = match der_element(single) {
        Some((CTX0_PRIM | CTX2_PRIM, _, _, rest)) => (false, rest),
        Some((CTX1, _, _, rest)) => (true, rest),
        _ => return Err(not_ocsp("certStatus")),
    };
    let (_, _, single) = der_expect(single, GENERALIZED_TIME, "thisUpdate")?;
    let next_update = match der_element(single) {
        Some((CTX0, explicit, _, _)) => {
            let (_, time, _) = der_expect(explicit, GENERALIZED_TIME, "nextUpdate")?;
            use x509_parser::prelude::FromDer;
            let (_, time) = x509_parser::time::ASN1Time::from_der(time)
                .map_err(|e| format!("has a nextUpdate that does not parse: {e}"))?;
            Some(time.timestamp())
        }
        _ => None,
    };
    Ok(OcspFacts {
        serial: serial.to_vec(),
        next_update,
        revoked,
    })
}

/// The names one listener certificate serves: its `server_names`, or else the DNS names
/// it is valid for (subjectAltName, wildcards included, as webpki reads them).
fn served_names(
    c: &CertificateConfig,
    certified: &CertifiedKey,
    is_default: bool,
) -> anyhow::Result<Vec<NamePattern>> {
    let cert_path = c.cert.display();
    let leaf = certified
        .end_entity_cert()
        .map_err(|e| anyhow!("certificate file `{cert_path}`: {e}"))?;
    // An X.509 v1 certificate, which webpki does not read, has no
    // subjectAltName: it is valid for no DNS name a verifying client checks.
    let ee = match webpki::EndEntityCert::try_from(leaf) {
        Ok(ee) => Some(ee),
        Err(_) if is_x509_v1(leaf) => None,
        Err(e) => {
            bail!("certificate file `{cert_path}`: first certificate is not valid X.509: {e}")
        }
    };

    if !c.server_names.is_empty() {
        let mut names = Vec::with_capacity(c.server_names.len());
        for raw in &c.server_names {
            let pattern = NamePattern::parse(raw).ok_or_else(|| {
                anyhow!(
                    "certificate file `{cert_path}`: server name `{raw}` is neither a DNS name \
                     nor a `*.suffix` wildcard"
                )
            })?;
            if !ee.as_ref().is_some_and(|ee| pattern.covered_by(ee)) {
                tracing::warn!(
                    cert = %cert_path,
                    "certificate is configured to serve `{pattern}` but is not valid for it; \
                     clients that verify the server will reject it"
                );
            }
            names.push(pattern);
        }
        return Ok(names);
    }

    // webpki only lists names it could parse; keep the ones it would also accept for
    // this certificate, so selection agrees with what verifying clients will check.
    let names: Vec<NamePattern> = ee
        .iter()
        .flat_map(|ee| ee.valid_dns_names())
        .filter_map(NamePattern::parse)
        .filter(|pattern| ee.as_ref().is_some_and(|ee| pattern.covered_by(ee)))
        .collect();
    if names.is_empty() && !is_default {
        bail!(
            "certificate file `{cert_path}` has no DNS names in its subjectAltName and no \
             `server_names`, so SNI can never select it; add `server_names` or make it the \
             first (default) certificate"
        );
    }
    Ok(names)
}

/// Loads a certificate chain and its private key (decrypted with the first
/// line of `password_path`, its `key_password_file`, if it is encrypted) and
/// checks that they belong together; warns if the certificate is outside its
/// validity, or if a password is given for a key that is not encrypted.
fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
    password_path: Option<&Path>,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, FileError> {
    let (certified, encrypted) = load_key_pair_with(cert_path, key_path, password_path, provider)?;
    if let Some(leaf) = certified.cert.first() {
        warn_if_outside_validity(leaf, cert_path);
    }
    if let (Some(password), false) = (password_path, encrypted) {
        // As nginx and Envoy, which do not ask for the password of a key that
        // is not encrypted: a renewal that drops the encryption keeps working.
        tracing::warn!(
            key = %key_path.display(),
            password = %password.display(),
            "key_password_file is set but the private key is not encrypted; the password is not used"
        );
    }
    Ok(certified)
}

/// [`load_certified_key`] without the warnings.
fn load_key_pair(
    cert_path: &Path,
    key_path: &Path,
    password_path: Option<&Path>,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, FileError> {
    load_key_pair_with(cert_path, key_path, password_path, provider).map(|(c, _)| c)
}

/// [`load_key_pair`], and whether the key was encrypted.
fn load_key_pair_with(
    cert_path: &Path,
    key_path: &Path,
    password_path: Option<&Path>,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, bool), FileError> {
    let chain = load_certs(cert_path, "certificate file")?;
    let LoadedKey { key, encrypted } = load_key(key_path, password_path)?;
    let signing_key = provider.key_provider.load_private_key(key).map_err(|e| {
        FileError::new(
            FileProblem::Content,
            PairFile::Key,
            format!(
                "private key file `{}`: unusable key (supported: RSA, ECDSA P-256/P-384, \
                 Ed25519): {e}",
                key_path.display()
            ),
        )
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    let matched = match v1_keys_match(&certified) {
        Some(true) => Ok(()),
        Some(false) => Err(rustls::Error::InconsistentKeys(
            InconsistentKeys::KeyMismatch,
        )),
        None => certified.keys_match(),
    };
    match matched {
        // ring keys always know their public key; `Unknown` would mean a provider that
        // cannot tell, which rustls itself treats as acceptable.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            return Err(FileError::new(
                FileProblem::KeyMismatch,
                PairFile::Key,
                format!(
                    "private key file `{}` does not match the certificate in `{}` (the first \
                     certificate in the file must be the one the key belongs to)",
                    key_path.display(),
                    cert_path.display()
                ),
            ))
        }
        Err(e) => {
            return Err(FileError::content(format!(
                "certificate file `{}`: first certificate is not usable: {e}",
                cert_path.display()
            )))
        }
    }
    Ok((certified, encrypted))
}

/// Whether `cert` is an X.509 v1 certificate: one without extensions (no
/// subjectAltName), what `openssl x509 -req` issues without `-extfile`.
/// webpki (and so rustls's own checks) refuses them; Envoy and nginx serve
/// them, and so does Legate (a verifying client decides whether to accept
/// one).
fn is_x509_v1(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .is_ok_and(|(_, c)| c.version() == x509_parser::x509::X509Version::V1)
}

/// Whether the key belongs to the certificate, for an X.509 v1 certificate
/// (`None` for any other: rustls's `keys_match` checks those). The same test
/// as rustls's: the key's SubjectPublicKeyInfo is the certificate's.
fn v1_keys_match(certified: &CertifiedKey) -> Option<bool> {
    let leaf = certified.cert.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    if parsed.version() != x509_parser::x509::X509Version::V1 {
        return None;
    }
    // ring keys always know their public key (as for `Unknown` above).
    let Some(spki) = certified.key.public_key() else {
        return Some(true);
    };
    Some(spki.as_ref() == parsed.public_key().raw)
}

/// An expired certificate is served anyway (refusing to start would turn an expiry into
/// an outage of every name on the listener), but the operator must hear about it.
fn warn_if_outside_validity(cert: &CertificateDer<'_>, path: &Path) {
    match outside_validity(cert) {
        Some(Outside::Expired(not_after)) => {
            tracing::warn!(cert = %path.display(), %not_after, "certificate has expired");
        }
        Some(Outside::NotYet(not_before)) => {
            tracing::warn!(cert = %path.display(), %not_before, "certificate is not valid yet");
        }
        None => {}
    }
}

/// A certificate outside its validity period, with the date it ended or starts.
enum Outside {
    Expired(String),
    NotYet(String),
}

/// Whether `cert` is outside its validity period now (nothing if it does not
/// parse: loading it says so).
fn outside_validity(cert: &CertificateDer<'_>) -> Option<Outside> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now().timestamp();
    if validity.not_after.timestamp() < now {
        Some(Outside::Expired(validity.not_after.to_string()))
    } else if validity.not_before.timestamp() > now {
        Some(Outside::NotYet(validity.not_before.to_string()))
    } else {
        None
    }
}

/// What is wrong with the validity period of the first certificate in the PEM
/// file at `path` (`expired on ...`, `not valid until ...`), if anything: a
/// reload's outcome says so in its `notes`, since it serves the certificate
/// anyway and answers `ok`. Nothing for a file that does not read or parse
/// (loading it reports that).
pub fn validity_problem(path: &Path) -> Option<String> {
    let pem = std::fs::read(path).ok()?;
    let leaf = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
    Some(match outside_validity(&leaf)? {
        Outside::Expired(date) => format!("expired on {date}"),
        Outside::NotYet(date) => format!("not valid until {date}"),
    })
}

/// The bytes of `path`, a `what` (`file`: which file it is).
fn read_file(path: &Path, what: &str, file: PairFile) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|e| {
        FileError::new(
            FileProblem::Unreadable,
            file,
            format!("cannot read {what} `{}`: {e}", path.display()),
        )
    })
}

/// All certificates in a PEM file, in order; other PEM sections (such as a key) are
/// skipped. Fails if there is none.
fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let pem = read_file(path, what, PairFile::Cert)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            FileError::content(format!("{what} `{}`: malformed PEM: {e}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(FileError::content(format!(
            "{what} `{}` contains no certificate (expected a PEM `BEGIN CERTIFICATE` block)",
            path.display()
        )));
    }
    Ok(certs)
}

/// A private key as read from its file.
struct LoadedKey {
    key: PrivateKeyDer<'static>,
    /// It was encrypted (and decrypted with its password).
    encrypted: bool,
}

/// The label of an encrypted PKCS#8 PEM block (RFC 5958, what `openssl
/// pkcs8 -topk8 -v2 aes-256-cbc` and `openssl genpkey -aes256` write).
const ENCRYPTED_PKCS8_LABEL: &str = "ENCRYPTED PRIVATE KEY";

/// How to turn a key Legate cannot decrypt into one it can, for messages.
const CONVERT_KEY: &str = "convert it to encrypted PKCS#8 with `openssl pkcs8 -topk8 -v2 \
                           aes-256-cbc -in KEY -out NEW.key`";

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1), or its
/// encrypted PKCS#8 key decrypted with the first line of `password_path`.
/// The password file is read whenever it is given: one that cannot be read
/// is an error even for a key that is not encrypted (the next renewal's may
/// be).
fn load_key(path: &Path, password_path: Option<&Path>) -> Result<LoadedKey, FileError> {
    let pem = read_file(path, "private key file", PairFile::Key)?;
    let password = password_path.map(read_password).transpose()?;
    let shown = path.display();
    let text = String::from_utf8_lossy(&pem);
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(FileError::key(
            FileProblem::UnsupportedEncryption,
            format!(
                "private key file `{shown}` is encrypted in OpenSSL's legacy PEM format \
                 (`Proc-Type: 4,ENCRYPTED`), which Legate does not read; {CONVERT_KEY}"
            ),
        ));
    }
    if let Some(block) = pem_block(&text, ENCRYPTED_PKCS8_LABEL) {
        let Some((password, password_path)) = password.zip(password_path) else {
            return Err(FileError::key(
                FileProblem::Encrypted,
                format!(
                    "private key file `{shown}`: the key is encrypted: set key_password_file \
                     to a file holding its password"
                ),
            ));
        };
        let key = decrypt_pkcs8(block, &password).map_err(|e| match e {
            Decrypt::Malformed(e) => FileError::key(
                FileProblem::Content,
                format!("private key file `{shown}`: {e}"),
            ),
            Decrypt::Unsupported(e) => FileError::key(
                FileProblem::UnsupportedEncryption,
                format!(
                    "private key file `{shown}` is encrypted with an algorithm Legate does not \
                     support ({e}; supported: PBES2 with PBKDF2 or scrypt, and AES-CBC); \
                     {CONVERT_KEY}"
                ),
            ),
            Decrypt::Failed => FileError::new(
                FileProblem::WrongPassword,
                PairFile::Password,
                format!(
                    "could not decrypt private key file `{shown}` with the password in `{}` \
                     (wrong password?)",
                    password_path.display()
                ),
            ),
        })?;
        return Ok(LoadedKey {
            key,
            encrypted: true,
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        let message = match e {
            pem::Error::NoItemsFound => format!(
                "private key file `{shown}` contains no private key (expected a PEM `BEGIN \
                 PRIVATE KEY`, `BEGIN RSA PRIVATE KEY`, `BEGIN EC PRIVATE KEY` or, with \
                 key_password_file, `BEGIN ENCRYPTED PRIVATE KEY` block)"
            ),
            e => format!("private key file `{shown}`: malformed PEM: {e}"),
        };
        FileError::key(FileProblem::Content, message)
    })?;
    Ok(LoadedKey {
        key,
        encrypted: false,
    })
}

/// The password in a `key_password_file`: its first line, without the line
/// end (as nginx's `ssl_password_file`; Envoy's `password` file is read
/// whole, so a one-line file means the same to both).
fn read_password(path: &Path) -> Result<pkcs8::der::zeroize::Zeroizing<Vec<u8>>, FileError> {
    let bytes = pkcs8::der::zeroize::Zeroizing::new(read_file(
        path,
        "key password file",
        PairFile::Password,
    )?);
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Ok(pkcs8::der::zeroize::Zeroizing::new(line.to_vec()))
}

/// The first `-----BEGIN label-----` ... `-----END label-----` block of a
/// PEM file, both lines included.
fn pem_block<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = start + text[start..].find(&end)? + end.len();
    Some(&text[start..stop])
}

/// Why an encrypted PKCS#8 key does not decrypt.
enum Decrypt {
    /// The PEM or its DER is not an EncryptedPrivateKeyInfo.
    Malformed(String),
    /// An encryption scheme pkcs5 does not decrypt.
    Unsupported(String),
    /// Decryption failed, or did not give a PKCS#8 key: the password is wrong
    /// (a wrong key fails CBC's padding check, or rarely passes it with bytes
    /// that are not DER).
    Failed,
}

/// Decrypts an encrypted PKCS#8 PEM block with `password`.
fn decrypt_pkcs8(block: &str, password: &[u8]) -> Result<PrivateKeyDer<'static>, Decrypt> {
    use pkcs8::der::Decode;
    use pkcs8::pkcs5::Error as Pkcs5;
    let (_, doc) = pkcs8::Document::from_pem(block)
        .map_err(|e| Decrypt::Malformed(format!("malformed encrypted key PEM: {e}")))?;
    let info = pkcs8::EncryptedPrivateKeyInfo::from_der(doc.as_bytes()).map_err(|e| {
        // An algorithm identifier pkcs5 has no type for (PKCS#12's) does not
        // parse: it is still an encrypted key, of a scheme not supported.
        Decrypt::Unsupported(format!("cannot read its encryption parameters: {e}"))
    })?;
    let plain = match info.decrypt(password) {
        Ok(plain) => plain,
        // pkcs5 0.7 reports CBC's padding check failing as `EncryptFailed`.
        Err(pkcs8::Error::EncryptedPrivateKey(Pkcs5::DecryptFailed | Pkcs5::EncryptFailed)) => {
            return Err(Decrypt::Failed)
        }
        Err(pkcs8::Error::EncryptedPrivateKey(e)) => {
            return Err(Decrypt::Unsupported(e.to_string()))
        }
        // The decrypted bytes are not DER.
        Err(_) => return Err(Decrypt::Failed),
    };
    if pkcs8::PrivateKeyInfo::from_der(plain.as_bytes()).is_err() {
        return Err(Decrypt::Failed);
    }
    Ok(PrivateKeyDer::Pkcs8(plain.as_bytes().to_vec().into()))
}

/// A trust store holding every certificate of a PEM file; any unusable one is an error
/// rather than silently skipped, so a broken CA bundle is noticed at load.
fn load_roots(path: &Path, what: &str) -> Result<RootCertStore, FileError> {
    roots_of(path, what, load_certs(path, what)?)
}

/// [`load_roots`] of certificates read from `path` already.
fn roots_of(
    path: &Path,
    what: &str,
    certs: Vec<CertificateDer<'static>>,
) -> Result<RootCertStore, FileError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            FileError::content(format!(
                "{what} `{}`: certificate #{} is not a usable trust anchor: {e}",
                path.display(),
                i + 1
            ))
        })?;
    }
    Ok(roots)
}

fn client_verifier(
    auth: &config::ClientAuth,
    cas: Vec<CertificateDer<'static>>,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let roots = roots_of(&auth.ca, "client CA file", cas)?;
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !auth.required {
        builder = builder.allow_unauthenticated();
    }
    if let Some(crl) = &auth.crl {
        let revocation = Revocation::load(crl, auth.only_verify_leaf_cert_crl)?;
        builder = builder
            .with_crls(revocation.crls)
            .enforce_revocation_expiration();
        if revocation.leaf_only {
            builder = builder.only_check_end_entity_revocation();
        }
        return builder
            .build()
            .map_err(|e| anyhow!("client CRL file `{}`: {e}", crl.display()));
    }
    builder
        .build()
        .map_err(|e| anyhow!("client CA file `{}`: {e}", auth.ca.display()))
}

/// The revocation lists of a `crl` file and how far up a chain they are
/// checked. As Envoy (BoringSSL) does: a certificate whose CA has no list in
/// the file is refused (unless only the leaf is checked and its issuer's list
/// is there), and a list past its `nextUpdate` refuses what it covers until
/// the file is renewed (the file watch picks the new one up).
struct Revocation {
    crls: Vec<CertificateRevocationListDer<'static>>,
    leaf_only: bool,
}

impl Revocation {
    /// No lists: the chain is checked, no revocation.
    fn none() -> Self {
        Revocation {
            crls: Vec::new(),
            leaf_only: false,
        }
    }

    fn load(path: &Path, leaf_only: bool) -> Result<Self, FileError> {
        let crls = load_crls(path)?;
        warn_if_expired_crls(&crls, path);
        Ok(Revocation { crls, leaf_only })
    }

    fn server_verifier(
        self,
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<rustls::client::WebPkiServerVerifier>, rustls::client::VerifierBuilderError>
    {
        let mut builder =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .with_crls(self.crls)
                .enforce_revocation_expiration();
        if self.leaf_only {
            builder = builder.only_check_end_entity_revocation();
        }
        builder.build()
    }
}

/// An upstream's certificate checked as webpki checks it (chain, validity,
/// CRLs), then against `match_subject_alt_names` instead of the SNI
/// (Envoy's `match_typed_subject_alt_names`).
#[derive(Debug)]
struct SanVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    /// Whether each test is of URI SANs (else DNS ones).
    tests: Vec<(bool, crate::router::StrTest)>,
}

impl SanVerifier {
    fn new(
        webpki: Arc<rustls::client::WebPkiServerVerifier>,
        matches: &[config::SanMatch],
    ) -> anyhow::Result<Self> {
        let mut tests = Vec::with_capacity(matches.len());
        for (i, m) in matches.iter().enumerate() {
            let (uri, t) = match (&m.uri, &m.dns) {
                (Some(t), None) => (true, t),
                (None, Some(t)) => (false, t),
                // Config validation rejects this; kept as an error rather than a panic.
                _ => bail!("match_subject_alt_names[{i}] needs exactly one of `uri` and `dns`"),
            };
            let test = crate::router::StrTest::new(t)
                .with_context(|| format!("match_subject_alt_names[{i}]"))?;
            tests.push((uri, test));
        }
        Ok(SanVerifier { webpki, tests })
    }
}

impl rustls::client::danger::ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        // webpki checks the name last, once the chain, validity and CRLs
        // passed: a name error says everything else did. The name is what
        // the SANs below stand in for (unit-tested: an untrusted or revoked
        // certificate with a matching SAN is still refused).
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let (uris, dns) = alt_names(end_entity);
        let matched = self.tests.iter().any(|(uri, t)| {
            let names = if *uri { &uris } else { &dns };
            names.iter().any(|n| t.test(n))
        });
        if matched {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(SanMismatch {
                uris,
                dns,
            }))),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// An upstream certificate none of whose SANs `match_subject_alt_names`
/// allows. Its `Debug` is what the connect failure's reason shows (rustls
/// prints the error it wraps that way).
struct SanMismatch {
    uris: Vec<String>,
    dns: Vec<String>,
}

impl std::fmt::Display for SanMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .uris
            .iter()
            .map(|u| format!("URI:{u}"))
            .chain(self.dns.iter().map(|d| format!("DNS:{d}")))
            .collect();
        let names = if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        };
        write!(
            f,
            "no subjectAltName of the certificate matches match_subject_alt_names (it has: {names})"
        )
    }
}

impl std::fmt::Debug for SanMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for SanMismatch {}

/// Every revocation list of a PEM file, each parsed as the verifier will
/// parse it, so a broken list fails the load rather than every handshake.
fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, FileError> {
    let pem = read_file(path, "CRL file", PairFile::Cert)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            FileError::content(format!("CRL file `{}`: malformed PEM: {e}", path.display()))
        })?;
    if crls.is_empty() {
        return Err(FileError::content(format!(
            "CRL file `{}` contains no revocation list (expected a PEM `BEGIN X509 CRL` block)",
            path.display()
        )));
    }
    for (i, crl) in crls.iter().enumerate() {
        webpki::OwnedCertRevocationList::from_der(crl.as_ref()).map_err(|e| {
            FileError::content(format!(
                "CRL file `{}`: revocation list #{} does not parse: {e:?}",
                path.display(),
                i + 1
            ))
        })?;
    }
    Ok(crls)
}

/// Loads a CRL file as a listener's `client_auth.crl` and a cluster's
/// `tls.crl` are loaded (`legate check`).
pub fn check_crls(path: &Path) -> Result<(), FileError> {
    load_crls(path).map(|_| ())
}

/// Warns about each list of `crls` past its `nextUpdate`: the certificates
/// it covers are refused until the file is renewed.
fn warn_if_expired_crls(crls: &[CertificateRevocationListDer<'_>], path: &Path) {
    let now = x509_parser::time::ASN1Time::now();
    for (i, crl) in crls.iter().enumerate() {
        let Ok((_, parsed)) = x509_parser::parse_x509_crl(crl.as_ref()) else {
            continue;
        };
        if let Some(next) = parsed.next_update().filter(|next| *next < now) {
            tracing::warn!(
                crl = %path.display(),
                list = i + 1,
                issuer = %parsed.issuer(),
                next_update = %next,
                "revocation list is past its nextUpdate: the certificates it covers are refused \
                 until the file is renewed"
            );
        }
    }
}

/// The subject of a certificate as an RFC 4514 string; `None` if it does not parse.
fn subject_rfc4514(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(format_name(parsed.subject()))
}

/// RFC 4514: RDNs last-to-first, separated by `,`; multi-valued RDNs joined by `+`.
fn format_name(name: &X509Name<'_>) -> String {
    let rdns: Vec<_> = name.iter_rdn().collect();
    let mut out = String::new();
    for (i, rdn) in rdns.into_iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.attr_type().to_id_string();
            out.push_str(attribute_short_name(&oid).unwrap_or(&oid));
            out.push('=');
            push_attribute_value(&mut out, atv.attr_value());
        }
    }
    out
}

/// The short names of RFC 4514 §3, plus OpenSSL's names for two attributes common in
/// client certificates. Other attributes are written as dotted OIDs, as the RFC says.
fn attribute_short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return None,
    })
}

fn push_attribute_value(out: &mut String, value: &Any<'_>) {
    let data = value.data;
    let text: Option<String> = match value.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString => std::str::from_utf8(data).ok().map(str::to_owned),
        // T.61 in practice carries Latin-1, which is how OpenSSL reads it too.
        Tag::T61String => Some(data.iter().map(|&b| char::from(b)).collect()),
        Tag::BmpString if data.len().is_multiple_of(2) => char::decode_utf16(
            data.chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]])),
        )
        .collect::<Result<String, _>>()
        .ok(),
        Tag::UniversalString if data.len().is_multiple_of(4) => data
            .chunks_exact(4)
            .map(|quad| char::from_u32(u32::from_be_bytes([quad[0], quad[1], quad[2], quad[3]])))
            .collect(),
        _ => None,
    };
    match text {
        Some(text) => escape_attribute_value(out, &text),
        // RFC 4514 §2.4: values that are not strings are written as `#` and the hex of
        // their BER encoding.
        None => {
            out.push('#');
            let der = value.to_der_vec().unwrap_or_else(|_| data.to_vec());
            for byte in der {
                let _ = write!(out, "{byte:02x}");
            }
        }
    }
}

/// RFC 4514 §2.4 escaping. Control characters are hex-escaped too (the RFC allows any
/// character to be), so a subject can never break a log line.
fn escape_attribute_value(out: &mut String, value: &str) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '#' if i == 0 => out.push_str("\\#"),
            c if c.is_control() => {
                let mut utf8 = [0u8; 4];
                for byte in c.encode_utf8(&mut utf8).bytes() {
                    let _ = write!(out, "\\{byte:02x}");
                }
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::UnixTime;
    use rustls::{DigitallySignedStruct, HandshakeKind, SignatureScheme};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use crate::config::{unspanned, ClientAuth, ListenerTls, UpstreamTls};

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "legate-tls-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A certificate and key written as PEM files.
    struct Leaf {
        cert: PathBuf,
        key: PathBuf,
        der: CertificateDer<'static>,
    }

    /// A test CA that issues server and client certificates into a temp dir.
    struct Pki {
        dir: TempDir,
        issuer: Issuer<'static, KeyPair>,
        ca: PathBuf,
    }

    impl Pki {
        fn new() -> Self {
            let dir = TempDir::new();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name = DistinguishedName::new();
            // Distinct names per CA: with equal names webpki would try the other CA as
            // issuer and report a bad signature instead of an unknown issuer.
            let name = dir.0.file_name().unwrap().to_string_lossy().into_owned();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let ca = dir.0.join("ca.pem");
            std::fs::write(&ca, cert.pem()).unwrap();
            Pki {
                dir,
                issuer: Issuer::new(params, key),
                ca,
            }
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.dir.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }

        fn write_bytes(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.dir.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }

        fn issue(&self, stem: &str, mut params: CertificateParams) -> Leaf {
            let key = KeyPair::generate().unwrap();
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            Leaf {
                cert: self.write(&format!("{stem}.crt"), &cert.pem()),
                key: self.write(&format!("{stem}.key"), &key.serialize_pem()),
                der: cert.der().clone(),
            }
        }

        /// A server certificate for `sans` (DNS names, wildcards allowed).
        fn server(&self, stem: &str, sans: &[&str]) -> Leaf {
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, stem);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            self.issue(stem, params)
        }

        /// A client certificate with subject `O=Legate Test, CN=<cn>`.
        fn client(&self, stem: &str, cn: &str) -> Leaf {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name = DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::OrganizationName, "Legate Test");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            self.issue(stem, params)
        }
    }

    fn listener(certs: &[(&Leaf, &[&str])]) -> ListenerTls {
        ListenerTls {
            certificates: certs
                .iter()
                .map(|(leaf, names)| {
                    unspanned(CertificateConfig {
                        cert: leaf.cert.clone(),
                        key: leaf.key.clone(),
                        key_password_file: None,
                        ocsp_staple: None,
                        server_names: names.iter().map(|n| n.to_string()).collect(),
                    })
                })
                .collect(),
            min_version: TlsVersion::V1_2,
            client_auth: None,
            cipher_suites: Vec::new(),
            ecdh_curves: Vec::new(),
            session_ticket_keys: Vec::new(),
            session_tickets: true,
        }
    }

    fn upstream(ca: Option<&Path>, client: Option<&Leaf>) -> UpstreamTls {
        UpstreamTls {
            sni: None,
            ca: ca.map(Path::to_path_buf),
            client_cert: client.map(|c| c.cert.clone()),
            client_key: client.map(|c| c.key.clone()),
            key_password_file: None,
            crl: None,
            only_verify_leaf_cert_crl: false,
            match_subject_alt_names: Vec::new(),
            cipher_suites: Vec::new(),
            ecdh_curves: Vec::new(),
        }
    }

    /// Accepts any server certificate (still checking handshake signatures), so a test
    /// can see which certificate the server chose even for names it does not cover.
    #[derive(Debug)]
    struct AcceptAnyServerCert(Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAnyServerCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    fn any_cert_client(
        versions: &[&'static SupportedProtocolVersion],
        alpn: &[&[u8]],
        sni: bool,
    ) -> Arc<ClientConfig> {
        let provider = provider();
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.enable_sni = sni;
        Arc::new(config)
    }

    /// What the client saw of a successful connection.
    #[derive(Debug)]
    struct ClientView {
        server_cert: CertificateDer<'static>,
        alpn: Option<Vec<u8>>,
        resumed: bool,
    }

    struct Outcome {
        server: Result<TlsInfo, String>,
        client: Result<ClientView, String>,
    }

    /// One connection over loopback: the server completes the handshake, records
    /// `tls_info` and writes `hello`; the client handshakes and reads it. Reading matters:
    /// in TLS 1.3 a server rejects a missing client certificate only after the client
    /// considers its handshake done.
    async fn connect(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>, sni: &str) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server.clone());
        let server_side = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let info = tls_info(tls.get_ref().1);
            tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
            let _ = tls.shutdown().await;
            Ok::<_, String>(info)
        });
        let connector = TlsConnector::from(client.clone());
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        let client_side = async move {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"hello");
            let conn = tls.get_ref().1;
            Ok::<_, String>(ClientView {
                server_cert: conn.peer_certificates().unwrap()[0].clone(),
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
            })
        };
        let limit = Duration::from_secs(10);
        let client = tokio::time::timeout(limit, client_side)
            .await
            .expect("client timed out");
        let server = tokio::time::timeout(limit, server_side)
            .await
            .expect("server timed out")
            .unwrap();
        Outcome { server, client }
    }

    fn error_text(result: anyhow::Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", result.expect_err("expected an error"))
    }

    const H2_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
    const BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

    #[tokio::test]
    async fn sni_selects_by_server_names_and_falls_back_to_first() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let b = pki.server("b", &["b.test"]);
        let server =
            server_config(&listener(&[(&a, &["a.test"]), (&b, &["b.test"])]), &[]).unwrap();
        let client = any_cert_client(BOTH, &[], true);
        for (sni, expected) in [
            ("a.test", &a),
            ("b.test", &b),
            ("B.Test", &b),
            ("unknown.test", &a),
        ] {
            let out = connect(&server, &client, sni).await;
            assert_eq!(out.client.unwrap().server_cert, expected.der, "SNI {sni}");
            assert_eq!(
                out.server.unwrap().sni.as_deref(),
                Some(sni.to_ascii_lowercase().as_str())
            );
        }
        let no_sni = any_cert_client(BOTH, &[], false);
        let out = connect(&server, &no_sni, "b.test").await;
        assert_eq!(out.client.unwrap().server_cert, a.der);
        assert_eq!(out.server.unwrap().sni, None);
    }

    #[tokio::test]
    async fn wildcard_server_names_match_one_label_and_lose_to_exact() {
        let pki = Pki::new();
        let default = pki.server("default", &["default.test"]);
        let wild = pki.server("wild", &["*.wild.test"]);
        let exact = pki.server("exact", &["exact.wild.test"]);
        let cfg = listener(&[
            (&default, &["default.test"]),
            (&wild, &["*.WILD.test"]),
            (&exact, &["exact.wild.test"]),
        ]);
        let server = server_config(&cfg, &[]).unwrap();
        let client = any_cert_client(BOTH, &[], true);
        for (sni, expected) in [
            ("foo.wild.test", &wild),
            ("exact.wild.test", &exact),
            ("a.b.wild.test", &default),
            ("wild.test", &default),
        ] {
            let out = connect(&server, &client, sni).await;
            assert_eq!(out.client.unwrap().server_cert, expected.der, "SNI {sni}");
        }
    }

    #[tokio::test]
    async fn names_come_from_the_certificate_when_server_names_is_empty() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test", "*.wc.test"]);
        let b = pki.server("b", &["b.test"]);
        let server = server_config(&listener(&[(&a, &[]), (&b, &[])]), &[]).unwrap();
        // A verifying client: the chosen certificate must really be valid for the name.
        let verifying = client_config(&upstream(Some(&pki.ca), None), &[]).unwrap();
        for (sni, expected) in [("a.test", &a), ("x.wc.test", &a), ("b.test", &b)] {
            let out = connect(&server, &verifying, sni).await;
            assert_eq!(out.client.unwrap().server_cert, expected.der, "SNI {sni}");
        }
        let any = any_cert_client(BOTH, &[], true);
        let out = connect(&server, &any, "x.b.test").await;
        assert_eq!(out.client.unwrap().server_cert, a.der);
    }

    #[test]
    fn certificate_that_sni_can_never_select_is_an_error() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        let ip_only = pki.issue("ip-only", params);
        let err = error_text(server_config(&listener(&[(&a, &[]), (&ip_only, &[])]), &[]));
        assert!(
            err.contains("ip-only.crt") && err.contains("no DNS names"),
            "{err}"
        );
        // As the first certificate it is the default, which is fine.
        assert!(server_config(&listener(&[(&ip_only, &[]), (&a, &[])]), &[]).is_ok());
    }

    #[test]
    fn invalid_server_name_is_an_error() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        for bad in ["a.*.test", "*", "foo*.test", "a b.test", ""] {
            let err = error_text(server_config(&listener(&[(&a, &[bad])]), &[]));
            assert!(
                err.contains(&format!("server name `{bad}`")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn name_lookup_table() {
        let resolver = SniResolver {
            certs: Vec::new(),
            staples: Vec::new(),
            uri_sans: Vec::new(),
            exact: HashMap::from([("a.test".to_owned(), 1), ("x.wc.test".to_owned(), 2)]),
            wildcard: HashMap::from([("wc.test".to_owned(), 3)]),
        };
        assert_eq!(resolver.lookup("a.test"), Some(1));
        assert_eq!(resolver.lookup("A.TEST."), Some(1));
        assert_eq!(resolver.lookup("x.wc.test"), Some(2));
        assert_eq!(resolver.lookup("y.wc.test"), Some(3));
        assert_eq!(resolver.lookup(".wc.test"), None);
        assert_eq!(resolver.lookup("wc.test"), None);
        assert_eq!(resolver.lookup("z.y.wc.test"), None);
        assert_eq!(resolver.lookup("test"), None);
    }

    #[tokio::test]
    async fn min_version_1_3_rejects_tls12_only_client() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let tls12_only = any_cert_client(&[&rustls::version::TLS12], &[], true);

        let mut cfg = listener(&[(&a, &[])]);
        let out = connect(&server_config(&cfg, &[]).unwrap(), &tls12_only, "a.test").await;
        let info = out.server.unwrap();
        assert_eq!(info.version, "TLSv1.2");
        assert!(
            info.cipher.starts_with("TLS_ECDHE_ECDSA_WITH_"),
            "{}",
            info.cipher
        );
        assert!(out.client.is_ok());

        cfg.min_version = TlsVersion::V1_3;
        let server = server_config(&cfg, &[]).unwrap();
        let out = connect(&server, &tls12_only, "a.test").await;
        let err = out.server.unwrap_err();
        assert!(err.contains("Tls12NotOfferedOrEnabled"), "{err}");
        assert!(out.client.is_err());

        let out = connect(&server, &any_cert_client(BOTH, &[], true), "a.test").await;
        let info = out.server.unwrap();
        assert_eq!(info.version, "TLSv1.3");
        assert!(
            [
                "TLS_AES_128_GCM_SHA256",
                "TLS_AES_256_GCM_SHA384",
                "TLS_CHACHA20_POLY1305_SHA256"
            ]
            .contains(&info.cipher),
            "{}",
            info.cipher
        );
    }

    #[test]
    fn crl_files_that_hold_no_usable_list_fail_naming_the_file() {
        let pki = Pki::new();
        let missing = pki.dir.0.join("missing.crl");
        let err = check_crls(&missing).unwrap_err();
        assert_eq!(err.problem, FileProblem::Unreadable);
        assert!(err.to_string().starts_with("cannot read CRL file"), "{err}");

        let err = check_crls(&pki.ca).unwrap_err();
        assert_eq!(err.problem, FileProblem::Content);
        assert!(
            err.to_string().contains("contains no revocation list"),
            "{err}"
        );

        // A PEM block of the right kind whose DER is not a CRL.
        let bogus = pki.write(
            "bogus.crl",
            "-----BEGIN X509 CRL-----\nMAMCAQE=\n-----END X509 CRL-----\n",
        );
        let err = check_crls(&bogus).unwrap_err();
        assert!(
            err.to_string()
                .contains("revocation list #1 does not parse"),
            "{err}"
        );
    }

    /// As Envoy's: with a `crl`, each CA of the client's chain needs its list
    /// (a certificate whose status cannot be known is refused), unless only
    /// the leaf is checked.
    #[tokio::test]
    async fn a_crl_covers_the_whole_chain_unless_only_the_leaf_is_checked() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        // An intermediate CA under the root issues the client's certificate.
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let intermediate_cert = params.signed_by(&key, &pki.issuer).unwrap();
        let intermediate = Issuer::new(params, key);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "client");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &intermediate).unwrap();
        let client_leaf = Leaf {
            cert: pki.write("chain.crt", &(cert.pem() + &intermediate_cert.pem())),
            key: pki.write("chain.key", &key.serialize_pem()),
            der: cert.der().clone(),
        };
        // The intermediate's list, revoking nothing; none from the root.
        let list = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2100, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = pki.write(
            "intermediate.crl",
            &list.signed_by(&intermediate).unwrap().pem().unwrap(),
        );
        let client = client_config(&upstream(Some(&pki.ca), Some(&client_leaf)), &[]).unwrap();
        let auth = ClientAuth {
            ca: pki.ca.clone(),
            required: true,
            crl: Some(crl),
            only_verify_leaf_cert_crl: false,
        };
        let mut cfg = listener(&[(&a, &[])]);
        cfg.client_auth = Some(auth.clone());
        let out = connect(&server_config(&cfg, &[]).unwrap(), &client, "a.test").await;
        let err = out.server.unwrap_err();
        assert!(err.contains("UnknownRevocationStatus"), "{err}");

        cfg.client_auth = Some(ClientAuth {
            only_verify_leaf_cert_crl: true,
            ..auth
        });
        let out = connect(&server_config(&cfg, &[]).unwrap(), &client, "a.test").await;
        assert!(out.server.unwrap().peer.is_some());
    }

    /// `cipher_suites` and `ecdh_curves` limit what a handshake may use, on
    /// both sides, by IANA or OpenSSL names.
    #[tokio::test]
    async fn cipher_suites_and_curves_limit_the_handshake() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let any = any_cert_client(BOTH, &[], true);

        let mut cfg = listener(&[(&a, &[])]);
        cfg.cipher_suites = names(&["TLS_AES_256_GCM_SHA384"]);
        let out = connect(&server_config(&cfg, &[]).unwrap(), &any, "a.test").await;
        assert_eq!(out.server.unwrap().cipher, "TLS_AES_256_GCM_SHA384");

        cfg.cipher_suites = names(&["ECDHE-ECDSA-AES128-GCM-SHA256"]);
        let out = connect(&server_config(&cfg, &[]).unwrap(), &any, "a.test").await;
        let info = out.server.unwrap();
        assert_eq!(
            (info.version, info.cipher),
            ("TLSv1.2", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256")
        );

        // A client (an upstream cluster's config) offering only X25519 cannot
        // meet a listener accepting only P-384; one offering both can.
        cfg.cipher_suites = Vec::new();
        cfg.ecdh_curves = names(&["P-384"]);
        let server = server_config(&cfg, &[]).unwrap();
        let mut up = upstream(Some(&pki.ca), None);
        up.ecdh_curves = names(&["X25519"]);
        let out = connect(&server, &client_config(&up, &[]).unwrap(), "a.test").await;
        assert!(out.client.is_err());
        up.ecdh_curves = names(&["X25519", "secp384r1"]);
        let out = connect(&server, &client_config(&up, &[]).unwrap(), "a.test").await;
        assert!(out.client.is_ok(), "{:?}", out.client.err());
    }

    /// `match_subject_alt_names` stands in for the SNI check only: the
    /// chain and CRLs are checked as without it.
    #[tokio::test]
    async fn upstream_subject_alt_names_replace_the_name_check_only() {
        let pki = Pki::new();
        let spiffe = "spiffe://mesh.test/ns/app/sa/api";
        // A mesh peer's certificate: a URI SAN, no DNS name.
        let peer = |pki: &Pki, stem: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name = DistinguishedName::new();
            params
                .subject_alt_names
                .push(SanType::URI(spiffe.try_into().unwrap()));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            pki.issue(stem, params)
        };
        let api = peer(&pki, "api");
        let server = server_config(&listener(&[(&api, &[])]), &[]).unwrap();
        let client = |matches: &[config::SanMatch], crl: Option<PathBuf>| {
            let mut cfg = upstream(Some(&pki.ca), None);
            cfg.match_subject_alt_names = matches.to_vec();
            cfg.crl = crl;
            client_config(&cfg, &[]).unwrap()
        };
        let uri = |m: config::StringMatch| config::SanMatch {
            uri: Some(m),
            dns: None,
        };
        let exact = |s: &str| config::StringMatch {
            exact: Some(s.to_string()),
            ..Default::default()
        };
        let prefix = |s: &str| config::StringMatch {
            prefix: Some(s.to_string()),
            ..Default::default()
        };

        // Without it, the SNI check refuses a certificate without DNS names.
        let err = connect(&server, &client(&[], None), "api.mesh.test")
            .await
            .client
            .unwrap_err();
        assert!(err.contains("not valid for name"), "{err}");

        let ok = connect(
            &server,
            &client(&[uri(exact(spiffe))], None),
            "api.mesh.test",
        )
        .await;
        assert!(ok.client.is_ok(), "{:?}", ok.client.err());
        let ok = connect(
            &server,
            &client(
                &[
                    uri(exact("spiffe://other")),
                    uri(prefix("spiffe://mesh.test/ns/app/")),
                ],
                None,
            ),
            "api.mesh.test",
        )
        .await;
        assert!(ok.client.is_ok(), "{:?}", ok.client.err());

        let err = connect(
            &server,
            &client(&[uri(prefix("spiffe://mesh.test/ns/db/"))], None),
            "api.mesh.test",
        )
        .await
        .client
        .unwrap_err();
        assert!(
            err.contains("no subjectAltName of the certificate matches match_subject_alt_names (it has: URI:spiffe://mesh.test/ns/app/sa/api)"),
            "{err}"
        );
        let dns_only = config::SanMatch {
            uri: None,
            dns: Some(exact("api.mesh.test")),
        };
        assert!(
            connect(&server, &client(&[dns_only], None), "api.mesh.test")
                .await
                .client
                .is_err()
        );

        // Another CA's certificate with the same SAN is still refused.
        let stranger = Pki::new();
        let foreign = server_config(&listener(&[(&peer(&stranger, "foreign"), &[])]), &[]).unwrap();
        let err = connect(
            &foreign,
            &client(&[uri(exact(spiffe))], None),
            "api.mesh.test",
        )
        .await
        .client
        .unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");

        // So is a revoked one.
        let serial = x509_parser::parse_x509_certificate(api.der.as_ref())
            .unwrap()
            .1
            .raw_serial()
            .to_vec();
        let list = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2100, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&serial),
                revocation_time: rcgen::date_time_ymd(2020, 1, 2),
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = pki.write(
            "api.crl",
            &list.signed_by(&pki.issuer).unwrap().pem().unwrap(),
        );
        let err = connect(
            &server,
            &client(&[uri(exact(spiffe))], Some(crl)),
            "api.mesh.test",
        )
        .await
        .client
        .unwrap_err();
        assert!(err.contains("Revoked"), "{err}");
    }

    #[tokio::test]
    async fn required_client_auth_rejects_anonymous_and_foreign_clients() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let client_leaf = pki.client("client", "client.test");
        let mut cfg = listener(&[(&a, &[])]);
        cfg.client_auth = Some(ClientAuth {
            ca: pki.ca.clone(),
            required: true,
            crl: None,
            only_verify_leaf_cert_crl: false,
        });
        let server = server_config(&cfg, &[]).unwrap();

        let anonymous = client_config(&upstream(Some(&pki.ca), None), &[]).unwrap();
        let out = connect(&server, &anonymous, "a.test").await;
        let err = out.server.unwrap_err();
        assert!(err.contains("no certificates"), "{err}");
        assert!(out.client.is_err());

        let other_pki = Pki::new();
        let foreign_leaf = other_pki.client("foreign", "foreign.test");
        let foreign = client_config(&upstream(Some(&pki.ca), Some(&foreign_leaf)), &[]).unwrap();
        let out = connect(&server, &foreign, "a.test").await;
        assert!(out.server.is_err());
        assert!(out.client.is_err());

        let with_cert = client_config(&upstream(Some(&pki.ca), Some(&client_leaf)), &[]).unwrap();
        let out = connect(&server, &with_cert, "a.test").await;
        assert!(!out.client.unwrap().resumed);
        let info = out.server.unwrap();
        assert!(info.peer.is_some());
        assert_eq!(info.peer_subject(), Some("CN=client.test,O=Legate Test"));

        // A resumed session still carries the client's identity.
        let out = connect(&server, &with_cert, "a.test").await;
        assert!(out.client.unwrap().resumed);
        let resumed = out.server.unwrap();
        assert!(resumed.peer.is_some());
        assert_eq!(resumed.peer, info.peer);
    }

    #[tokio::test]
    async fn optional_client_auth_accepts_both() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let client_leaf = pki.client("client", "client.test");
        let mut cfg = listener(&[(&a, &[])]);
        cfg.client_auth = Some(ClientAuth {
            ca: pki.ca.clone(),
            required: false,
            crl: None,
            only_verify_leaf_cert_crl: false,
        });
        let server = server_config(&cfg, &[]).unwrap();

        let anonymous = client_config(&upstream(Some(&pki.ca), None), &[]).unwrap();
        let out = connect(&server, &anonymous, "a.test").await;
        assert!(out.client.is_ok());
        let info = out.server.unwrap();
        assert!(info.peer.is_none());
        assert_eq!(info.peer_subject(), None);

        let with_cert = client_config(&upstream(Some(&pki.ca), Some(&client_leaf)), &[]).unwrap();
        let out = connect(&server, &with_cert, "a.test").await;
        let info = out.server.unwrap();
        assert!(info.peer.is_some());
        assert_eq!(info.peer_subject(), Some("CN=client.test,O=Legate Test"));

        // A certificate that does not chain to the CA is still refused.
        let other_pki = Pki::new();
        let foreign_leaf = other_pki.client("foreign", "foreign.test");
        let foreign = client_config(&upstream(Some(&pki.ca), Some(&foreign_leaf)), &[]).unwrap();
        assert!(connect(&server, &foreign, "a.test").await.server.is_err());
    }

    #[tokio::test]
    async fn alpn_result_is_in_tls_info() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let server = server_config(&listener(&[(&a, &[])]), H2_H1).unwrap();
        for (offered, expected) in [
            (&[b"h2".as_slice()][..], Some(b"h2".to_vec())),
            (&[b"http/1.1".as_slice()][..], Some(b"http/1.1".to_vec())),
            // The server's preference decides, not the client's order.
            (
                &[b"http/1.1".as_slice(), b"h2".as_slice()][..],
                Some(b"h2".to_vec()),
            ),
            (&[][..], None),
        ] {
            let client = client_config(&upstream(Some(&pki.ca), None), offered).unwrap();
            let out = connect(&server, &client, "a.test").await;
            assert_eq!(out.server.unwrap().alpn, expected);
            assert_eq!(out.client.unwrap().alpn, expected);
        }
    }

    #[tokio::test]
    async fn client_config_trusts_only_the_configured_ca() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let server = server_config(&listener(&[(&a, &[])]), &[]).unwrap();

        let trusting = client_config(&upstream(Some(&pki.ca), None), &[]).unwrap();
        assert!(connect(&server, &trusting, "a.test").await.client.is_ok());
        // Right CA, wrong name.
        let err = connect(&server, &trusting, "b.test")
            .await
            .client
            .unwrap_err();
        assert!(err.contains("not valid for name \"b.test\""), "{err}");

        let other_pki = Pki::new();
        let wrong_ca = client_config(&upstream(Some(&other_pki.ca), None), &[]).unwrap();
        let err = connect(&server, &wrong_ca, "a.test")
            .await
            .client
            .unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");

        // Default trust is the public web PKI, which does not include a private CA.
        let public_roots = client_config(&upstream(None, None), &[]).unwrap();
        let err = connect(&server, &public_roots, "a.test")
            .await
            .client
            .unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    #[tokio::test]
    async fn sessions_resume() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let server = server_config(&listener(&[(&a, &[])]), &[]).unwrap();
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let client = any_cert_client(versions, &[], true);
            let first = connect(&server, &client, "a.test").await.client.unwrap();
            assert!(!first.resumed);
            let second = connect(&server, &client, "a.test").await.client.unwrap();
            assert!(second.resumed, "{versions:?}");
        }
    }

    #[test]
    fn file_errors_name_the_file_and_the_problem() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let b = pki.server("b", &["b.test"]);
        let with = |cert: &Path, key: &Path| {
            let mut cfg = listener(&[(&a, &[])]);
            cfg.certificates[0].value.cert = cert.to_path_buf();
            cfg.certificates[0].value.key = key.to_path_buf();
            error_text(server_config(&cfg, &[]))
        };

        let missing = pki.dir.0.join("missing.crt");
        let err = with(&missing, &a.key);
        assert!(err.starts_with("cannot read certificate file"), "{err}");
        assert!(err.contains("missing.crt"), "{err}");

        let err = with(&a.cert, &pki.dir.0.join("missing.key"));
        assert!(err.starts_with("cannot read private key file"), "{err}");
        assert!(err.contains("missing.key"), "{err}");

        let err = with(&a.cert, &b.key);
        assert!(
            err.contains("b.key") && err.contains("does not match") && err.contains("a.crt"),
            "{err}"
        );

        let empty = pki.write("empty.pem", "");
        let err = with(&empty, &a.key);
        assert!(
            err.contains("empty.pem") && err.contains("contains no certificate"),
            "{err}"
        );

        // A key file holding only a certificate.
        let err = with(&a.cert, &a.cert);
        assert!(
            err.contains("a.crt") && err.contains("contains no private key"),
            "{err}"
        );

        let garbage = pki.write(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let err = with(&garbage, &a.key);
        assert!(
            err.contains("garbage.pem") && err.contains("malformed PEM"),
            "{err}"
        );

        let mut cfg = listener(&[(&a, &[])]);
        cfg.client_auth = Some(ClientAuth {
            ca: empty.clone(),
            required: true,
            crl: None,
            only_verify_leaf_cert_crl: false,
        });
        let err = error_text(server_config(&cfg, &[]));
        assert!(
            err.starts_with("client CA file") && err.contains("contains no certificate"),
            "{err}"
        );

        let err = error_text(client_config(&upstream(Some(&missing), None), &[]));
        assert!(err.starts_with("cannot read upstream CA file"), "{err}");

        let mut mismatched = upstream(Some(&pki.ca), Some(&a));
        mismatched.client_key = Some(b.key.clone());
        let err = error_text(client_config(&mismatched, &[]));
        assert!(err.contains("does not match"), "{err}");
    }

    /// `legate check` chooses its help by the kind of problem and the file it
    /// is in, not by the message: each is what the loader found.
    #[test]
    fn file_errors_say_what_is_wrong_and_where() {
        let pki = Pki::new();
        let (a, b) = (pki.server("a", &["a.test"]), pki.server("b", &["b.test"]));
        let missing = pki.dir.0.join("missing.pem");
        let kind = |r: Result<(), FileError>| {
            let e = r.unwrap_err();
            (e.problem, e.file)
        };
        use FileProblem::{Content, KeyMismatch, Unreadable};
        use PairFile::{Cert, Key};
        assert_eq!(
            kind(check_certified_key(&missing, &a.key, None)),
            (Unreadable, Cert)
        );
        assert_eq!(
            kind(check_certified_key(&a.cert, &missing, None)),
            (Unreadable, Key)
        );
        assert_eq!(
            kind(check_certified_key(&a.key, &a.key, None)),
            (Content, Cert)
        );
        assert_eq!(
            kind(check_certified_key(&a.cert, &a.cert, None)),
            (Content, Key)
        );
        assert_eq!(
            kind(check_certified_key(&a.cert, &b.key, None)),
            (KeyMismatch, Key)
        );
        assert_eq!(kind(check_roots(&missing, "CA file")), (Unreadable, Cert));
        assert_eq!(kind(check_roots(&a.key, "CA file")), (Content, Cert));
        assert!(check_certified_key(&a.cert, &a.key, None).is_ok());
        assert!(check_roots(&pki.ca, "CA file").is_ok());
        // The messages are the loader's, naming the file.
        let e = check_certified_key(&a.cert, &missing, None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read private key file `"), "{e}");
    }

    /// An X.509 v1 certificate (`openssl x509 -req` without `-extfile`,
    /// here P-256, for `CN=v1.example`, valid until 2126) and its key.
    const V1_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBJjCBzQIUBKSvtN9hukCymgf2lF6ItdWM/M4wCgYIKoZIzj0EAwIwFTETMBEG\nA1UEAwwKdjEgdGVzdCBDQTAgFw0yNjEyMDcwMTM4MDNaGA8yMTI2MTExMzAxMzgw\nM1owFTETMBEGA1UEAwwKdjEuZXhhbXBsZTBZMBMGByqGSM49AgEGCCqGSM49AwEH\nA0IABHYkjmYEAdSPunddcv9zWhXBjuU8N4VnivKmsHmNgbNArzhoA5VeJZCiT2ua\n5p98iqnmFbHeXcWivDj4nBOVG+4wCgYIKoZIzj0EAwIDSAAwRQIgK5T1u4+Bs6v1\ntwZ5Qt2vdbv/WphE452q3Bkbfx5/NGgCIQDFM2SfGbmVqXhmrLOV6mWPIvdQIxcM\nVx1ihpphcxO8Mg==\n-----END CERTIFICATE-----\n";
    const V1_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgXorqBMa3tNKvrg/m\nYZYmguiNvsWcoBjWnwQVfOgCmJihRANCAAR2JI5mBAHUj7p3XXL/c1oVwY7lPDeF\nZ4ryprB5jYGzQK84aAOVXiWQok9rmuaffIqp5hWx3l3Forw4+JwTlRvu\n-----END PRIVATE KEY-----\n";
    const OTHER_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgcQynHf3XhsDqyAMU\nbrOTpZ+qc/P6ZC5YDYUJixQMgLChRANCAAShqpM1cDHWeTXHTmen+f1LobP+ebLd\nDAD3fDd7BkIjCVitn0pgm6qoGNj8zk3bRKKUxmsAnc3gjsHa7QTMZIXj\n-----END PRIVATE KEY-----\n";

    /// One P-256 key (`openssl genpkey`), then as OpenSSL 3 encrypts it with
    /// the password `legate-test`: `openssl pkcs8 -topk8 -v2 aes-256-cbc`
    /// (PBKDF2-HMAC-SHA256), `-v2 aes-128-cbc -v2prf hmacWithSHA1` (OpenSSL
    /// 1.0's PRF), `-scrypt`, `-v1 PBE-SHA1-3DES` (PKCS#12, not supported), and
    /// `openssl ec -aes256` (legacy PEM encryption, not supported).
    const PLAIN_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg56WrTas2k+06KEax\nKDDZW0/ceyw+xsQFa0ENkMU0GwWhRANCAAQBqwtfOdQKmP32rE8fluerOSs0hee8\nYLKAl6su6awMAaTHRkzEm6m+7Z6xONbrz73i0c3Py405jQXi8Oz5uzYS\n-----END PRIVATE KEY-----\n";
    const PBKDF2_SHA256_KEY: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAiSHthO62eoaQICCAAw\nDAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEH7f7eE4bQFrwe3xXCcqqLgEgZDj\nV4yr5/4XcuSmLEwJ1uIEYgabx3tFa6AcprgW7mrLlB6e5r48cmXxK/4i+LNS1u3m\nHYMoU4p0ohGIB016MuhLYI/9BDb5vlgkeR2g2fpsZhhRsIQt5YnImsplYzks+lEf\nmbLw4hH6UE5MCTccwCWt5FtCRBQpfvTe0pxZ5u2WK6aP7UvlZZwsGT3wvxo/rhU=\n-----END ENCRYPTED PRIVATE KEY-----\n";
    const PBKDF2_SHA1_KEY: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIHeMEkGCSqGSIb3DQEFDTA8MBsGCSqGSIb3DQEFDDAOBAjGrV8b7vDi+QICCAAw\nHQYJYIZIAWUDBAECBBDMJRZNnEnAjZp5dfHPdlDdBIGQIhZnV9Siu3HAF87KtFzr\ntEGlBnpDXId2PblWTexUtstYkN5kgRjaqp5diUqgoqWGftK2gRitSpthJuBrXGpD\nDGLRngVCzYrGZwb5BhsqLloKh37eSmnOdGtFQQ1qymvasTvtSE8hVYg10jhKioU4\nsDNYR3SeluRDIzySeKXR6HmjoLyF5MhWYuwdrKAyvvEc\n-----END ENCRYPTED PRIVATE KEY-----\n";
    const SCRYPT_KEY: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIHkME8GCSqGSIb3DQEFDTBCMCEGCSsGAQQB2kcECzAUBAjZajCfWaPE2AICQAAC\nAQgCAQEwHQYJYIZIAWUDBAEqBBAm194p++KAofrnnK9Xv5upBIGQf+wz0cpPYn6E\nKVuWU+CqDuSYsWHrmpDGrbDMngYCU5OTjR+lhnmN7wncSOaFJRH0k2W99GOTL20V\nvOryeQu0nOEbj2lwIGTt5GPVbAYVkPnEHNfLoLVxtIiTW/ozP61EyBc7htxwj/xM\njruG0tipUHiQkIi4DcHVFoATQR31vSah3tqzYQdaNe1B63LLM8hK\n-----END ENCRYPTED PRIVATE KEY-----\n";
    const PKCS12_KEY: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIGxMBwGCiqGSIb3DQEMAQMwDgQIr46xwmO74cQCAggABIGQLv6Y7I/4J2oOKI/3\nXh5f3b3TUrtXgWFUOifzXRtVxzCXEQzSJD6rvjMUP+boaGR2qu2ybg8CVkN0syWN\nazUKbdES9hG9jwzpbgCVJzDof1itWWHVoNpA8YDbuAACXydFI0sKTY6+zqmxg5P0\n5zt+kRY313Lwa/0Ky9junfaDsmR7ernJA/ihmMQGxCUZrZMg\n-----END ENCRYPTED PRIVATE KEY-----\n";
    const LEGACY_KEY: &str = "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,0EC7582CE8F9E8A3F1FB6FF78F5744EA\n\nECkIxP59snKznS7XDGJkRo0f1gSiCMNXilY0Q+gA7E1E1WcHfm8EqT49qG1hQ1E6\nJwj3T0TWFjyMaQcmX0NJmQykbGCevtm6eG3XX0nvEViX2YgYOVnEfmiSBJYoUfls\n1TvwwSzc0uJ1k78Jkn5cDWDOfEmSofM9KbfzAcsoq6U=\n-----END EC PRIVATE KEY-----\n";

    /// Writes `leaf`'s key encrypted (PBES2: PBKDF2-HMAC-SHA256, AES-256-CBC)
    /// with `password`, and a password file holding it on its first line.
    fn encrypted_key(pki: &Pki, leaf: &Leaf, password: &str) -> (PathBuf, PathBuf) {
        use pkcs8::der::Decode;
        let pem = std::fs::read_to_string(&leaf.key).unwrap();
        let (_, doc) = pkcs8::SecretDocument::from_pem(&pem).unwrap();
        let info = pkcs8::PrivateKeyInfo::from_der(doc.as_bytes()).unwrap();
        let params =
            pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(2048, b"saltsalt", &[7; 16])
                .unwrap();
        let encrypted = info.encrypt_with_params(params, password).unwrap();
        let stem = leaf.key.file_stem().unwrap().to_string_lossy().into_owned();
        let key = pki.write(
            &format!("{stem}.enc.key"),
            &encrypted
                .to_pem("ENCRYPTED PRIVATE KEY", pkcs8::LineEnding::LF)
                .unwrap(),
        );
        let password = pki.write(&format!("{stem}.pass"), &format!("{password}\n"));
        (key, password)
    }

    /// What OpenSSL writes decrypts to the key it encrypted: PBKDF2 with
    /// HMAC-SHA256 or HMAC-SHA1, scrypt; the password is the first line of
    /// the file, without its line end (CRLF too).
    #[test]
    fn encrypted_pkcs8_keys_openssl_writes_decrypt() {
        let pki = Pki::new();
        let plain = pki.write("plain.key", PLAIN_KEY);
        let expected = load_key(&plain, None).unwrap();
        assert!(!expected.encrypted);
        let lf = pki.write("lf.pass", "legate-test\nsecond line\n");
        let crlf = pki.write("crlf.pass", "legate-test\r\n");
        let bare = pki.write("bare.pass", "legate-test");
        for (name, pem) in [
            ("sha256", PBKDF2_SHA256_KEY),
            ("sha1", PBKDF2_SHA1_KEY),
            ("scrypt", SCRYPT_KEY),
        ] {
            let key = pki.write(&format!("{name}.key"), pem);
            for password in [&lf, &crlf, &bare] {
                let loaded =
                    load_key(&key, Some(password)).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(loaded.encrypted);
                assert_eq!(loaded.key.secret_der(), expected.key.secret_der(), "{name}");
            }
        }
        // The Redis client gets it decrypted, as PKCS#8 PEM.
        let sha256 = pki.dir.0.join("sha256.key");
        let pem = kv_client_key_pem(&sha256, Some(&lf)).unwrap();
        assert_eq!(String::from_utf8(pem).unwrap(), PLAIN_KEY);
        assert_eq!(
            kv_client_key_pem(&plain, None).unwrap(),
            PLAIN_KEY.as_bytes()
        );
    }

    /// Each problem of an encrypted key is named, in the file it is in: no
    /// password, a wrong one, a password file that cannot be read, an
    /// encryption Legate does not read (with how to convert it).
    #[test]
    fn encrypted_key_errors_say_what_to_do() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let (key, password) = encrypted_key(&pki, &a, "s3cret");
        check_certified_key(&a.cert, &key, Some(&password)).unwrap();
        let err = |key: &Path, password: Option<&Path>| {
            let e = check_certified_key(&a.cert, key, password).unwrap_err();
            (e.problem, e.file, e.to_string())
        };

        let (problem, file, msg) = err(&key, None);
        assert_eq!((problem, file), (FileProblem::Encrypted, PairFile::Key));
        assert!(
            msg.contains("the key is encrypted: set key_password_file"),
            "{msg}"
        );
        assert!(msg.contains(&key.display().to_string()), "{msg}");

        let wrong = pki.write("wrong.pass", "not-it\n");
        let (problem, file, msg) = err(&key, Some(&wrong));
        assert_eq!(
            (problem, file),
            (FileProblem::WrongPassword, PairFile::Password)
        );
        assert!(
            msg.starts_with("could not decrypt private key file `")
                && msg.contains("wrong.pass")
                && msg.ends_with("(wrong password?)"),
            "{msg}"
        );

        let missing = pki.dir.0.join("missing.pass");
        let (problem, file, msg) = err(&key, Some(&missing));
        assert_eq!(
            (problem, file),
            (FileProblem::Unreadable, PairFile::Password)
        );
        assert!(msg.starts_with("cannot read key password file `"), "{msg}");
        // Read even for a key that is not encrypted (the next one may be).
        let (problem, file, _) = err(&a.key, Some(&missing));
        assert_eq!(
            (problem, file),
            (FileProblem::Unreadable, PairFile::Password)
        );

        let test_password = pki.write("test.pass", "legate-test\n");
        for (name, pem) in [("pkcs12", PKCS12_KEY), ("legacy", LEGACY_KEY)] {
            let key = pki.write(&format!("{name}.key"), pem);
            let e = load_key(&key, Some(&test_password)).err().unwrap();
            let msg = e.to_string();
            assert_eq!(
                (e.problem, e.file),
                (FileProblem::UnsupportedEncryption, PairFile::Key)
            );
            assert!(
                msg.contains("openssl pkcs8 -topk8 -v2 aes-256-cbc"),
                "{name}: {msg}"
            );
        }
        let legacy = load_key(&pki.dir.0.join("legacy.key"), None).err().unwrap();
        assert!(
            legacy.to_string().contains("Proc-Type: 4,ENCRYPTED"),
            "{legacy}"
        );
    }

    /// A listener serves a certificate whose key is encrypted, and a cluster
    /// presents one; a password for a key that is not encrypted is used by
    /// neither and warned about (once per load, as nginx and Envoy accept it).
    #[tokio::test]
    async fn encrypted_keys_serve_and_present() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let (key, password) = encrypted_key(&pki, &a, "s3cret");
        let mut cfg = listener(&[(&a, &[])]);
        cfg.certificates[0].value.key = key.clone();
        cfg.certificates[0].value.key_password_file = Some(password.clone());
        let server = server_config(&cfg, &[]).unwrap();
        let client = any_cert_client(BOTH, &[], true);
        let seen = connect(&server, &client, "a.test").await;
        assert_eq!(seen.client.unwrap().server_cert, a.der);

        let client = pki.client("c", "client");
        let (client_key, client_password) = encrypted_key(&pki, &client, "other");
        let mut up = upstream(Some(&pki.ca), Some(&client));
        up.client_key = Some(client_key);
        up.key_password_file = Some(client_password);
        client_config(&up, &[]).unwrap();

        let mut plain = listener(&[(&a, &[])]);
        plain.certificates[0].value.key_password_file = Some(password.clone());
        assert_eq!(
            warnings(|| check_certified_key(&a.cert, &a.key, Some(&password)).unwrap()),
            0
        );
        assert_eq!(warnings(|| drop(server_config(&plain, &[]).unwrap())), 1);
    }

    /// An OCSP response `openssl ocsp -respout` wrote (`good`, nextUpdate in
    /// 2126) for `ocsp.pem` (serial 0x1234, key `ocsp.key`), and others: one
    /// about serial 0x5678, one of status tryLater (tests/ui/invalid/certs).
    const OCSP_FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/ui/invalid/certs");

    fn fixture(name: &str) -> PathBuf {
        Path::new(OCSP_FIXTURES).join(name)
    }

    /// A DER element.
    fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match contents.len() {
            n @ 0..=0x7f => out.push(n as u8),
            n @ 0x80..=0xff => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend(contents);
        out
    }

    /// An unsigned OCSP response (Legate does not verify the signature) about
    /// `serial`, good, with `next_update` (GeneralizedTime text) if given.
    fn ocsp_der(serial: &[u8], next_update: Option<&str>) -> Vec<u8> {
        let time = |t: &str| der(0x18, t.as_bytes());
        let sha1 = der(
            0x30,
            &[der(0x06, &[0x2b, 0x0e, 0x03, 0x02, 0x1a]), vec![5, 0]].concat(),
        );
        let cert_id = der(
            0x30,
            &[
                sha1,
                der(0x04, &[1; 20]),
                der(0x04, &[2; 20]),
                der(0x02, serial),
            ]
            .concat(),
        );
        let mut single = [cert_id, vec![0x80, 0], time("20200101000000Z")].concat();
        if let Some(t) = next_update {
            single.extend(der(0xa0, &time(t)));
        }
        let data = der(
            0x30,
            &[
                der(0xa2, &der(0x04, &[3; 20])),
                time("20200101000000Z"),
                der(0x30, &der(0x30, &single)),
            ]
            .concat(),
        );
        let alg = der(
            0x30,
            &der(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]),
        );
        let basic = der(0x30, &[data, alg, der(0x03, &[0])].concat());
        let bytes = der(
            0x30,
            &[der(0x06, OCSP_BASIC_OID), der(0x04, &basic)].concat(),
        );
        der(0x30, &[der(0x0a, &[0]), der(0xa0, &bytes)].concat())
    }

    /// Accepts any server certificate, recording the OCSP response stapled
    /// to it (empty: none).
    #[derive(Debug)]
    struct RecordOcsp {
        inner: AcceptAnyServerCert,
        seen: std::sync::Mutex<Vec<Vec<u8>>>,
    }

    impl ServerCertVerifier for RecordOcsp {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            self.seen.lock().unwrap().push(ocsp_response.to_vec());
            self.inner
                .verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    /// The OCSP response a client is given by `server` with each TLS version.
    async fn stapled(server: &Arc<ServerConfig>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let verifier = Arc::new(RecordOcsp {
                inner: AcceptAnyServerCert(provider()),
                seen: Default::default(),
            });
            let client = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_no_client_auth();
            let outcome = connect(server, &Arc::new(client), "ocsp.test").await;
            outcome.client.unwrap();
            let seen = verifier.seen.lock().unwrap().clone();
            assert_eq!(seen.len(), 1, "{version:?}");
            out.extend(seen);
        }
        out
    }

    fn ocsp_listener(staple: Option<PathBuf>) -> ListenerTls {
        let leaf = Leaf {
            cert: fixture("ocsp.pem"),
            key: fixture("ocsp.key"),
            der: load_certs(&fixture("ocsp.pem"), "c").unwrap()[0].clone(),
        };
        let mut cfg = listener(&[(&leaf, &[])]);
        cfg.certificates[0].value.ocsp_staple = staple;
        cfg
    }

    /// The response `ocsp_staple` names is stapled as it is, to TLS 1.3 and
    /// 1.2 handshakes; without it, none is.
    #[tokio::test]
    async fn a_current_ocsp_response_is_stapled_byte_for_byte() {
        let bytes = std::fs::read(fixture("ocsp.der")).unwrap();
        let facts = parse_ocsp(&bytes).unwrap();
        assert_eq!(facts.serial, [0x12, 0x34]);
        assert!(!facts.revoked);
        assert_eq!(
            facts
                .next_update
                .map(|t| t > now_secs() + 50 * 365 * 86_400),
            Some(true)
        );
        let server = server_config(&ocsp_listener(Some(fixture("ocsp.der"))), &[]).unwrap();
        assert_eq!(stapled(&server).await, [bytes.clone(), bytes]);
        let server = server_config(&ocsp_listener(None), &[]).unwrap();
        assert_eq!(stapled(&server).await, [Vec::<u8>::new(), Vec::new()]);
    }

    /// A response past its nextUpdate (or without one) loads, warned about,
    /// and is not stapled; one that expires while served stops being stapled
    /// then (warned about once), as Envoy's lenient stapling.
    #[tokio::test]
    async fn an_expired_ocsp_response_is_not_stapled() {
        let pki = Pki::new();
        for next_update in [Some("20210101000000Z"), None] {
            let path = pki.write_bytes("expired.der", &ocsp_der(&[0x12, 0x34], next_update));
            let cfg = ocsp_listener(Some(path.clone()));
            check_ocsp_staple(&fixture("ocsp.pem"), &path).unwrap();
            let mut server = None;
            assert_eq!(
                warnings(|| server = Some(server_config(&cfg, &[]).unwrap())),
                1
            );
            assert_eq!(
                stapled(&server.unwrap()).await,
                [Vec::<u8>::new(), Vec::new()]
            );
        }

        let provider = provider();
        let cfg = ocsp_listener(Some(fixture("ocsp.der")));
        let resolver = SniResolver::load(&cfg.certificates, &provider).unwrap();
        let next_update = parse_ocsp(&std::fs::read(fixture("ocsp.der")).unwrap())
            .unwrap()
            .next_update
            .unwrap();
        assert!(resolver.served(0, next_update).unwrap().ocsp.is_some());
        let count = warnings(|| {
            for _ in 0..2 {
                assert!(resolver.served(0, next_update + 1).unwrap().ocsp.is_none());
            }
        });
        assert_eq!(count, 1);
    }

    /// A file that is not a successful DER OCSP response about the
    /// certificate fails the load, saying what it is instead.
    #[test]
    fn ocsp_response_errors_say_what_is_wrong() {
        let pki = Pki::new();
        let cert = fixture("ocsp.pem");
        let err = |staple: &Path| {
            let e = check_ocsp_staple(&cert, staple).unwrap_err();
            assert_eq!(e.file, PairFile::Cert);
            let built = error_text(server_config(
                &ocsp_listener(Some(staple.to_path_buf())),
                &[],
            ));
            assert_eq!(built, e.to_string());
            (e.problem, e.to_string())
        };
        let (problem, msg) = err(&fixture("ocsp-trylater.der"));
        assert_eq!(problem, FileProblem::Content);
        assert!(msg.contains("has status tryLater, not successful"), "{msg}");
        let (_, msg) = err(&fixture("ocsp-other.der"));
        assert!(
            msg.contains("is about the certificate with serial number 56:78, not the one in")
                && msg.contains("(12:34)"),
            "{msg}"
        );
        let (_, msg) = err(&cert);
        assert!(msg.contains("is not a DER OCSP response"), "{msg}");
        let (problem, msg) = err(&pki.dir.0.join("missing.der"));
        assert_eq!(problem, FileProblem::Unreadable);
        assert!(msg.starts_with("cannot read OCSP response file `"), "{msg}");
        let two = {
            let mut r = ocsp_der(&[0x12, 0x34], Some("21000101000000Z"));
            r.push(0);
            pki.write_bytes("two.der", &r)
        };
        let (_, msg) = err(&two);
        assert!(msg.contains("more than one DER element"), "{msg}");
        // The hand-made response parses as the checks above expect.
        let facts = parse_ocsp(&ocsp_der(&[0, 0x99], Some("21000101000000Z"))).unwrap();
        assert_eq!(trim_integer(&facts.serial), [0x99]);
        assert_eq!(parse_ocsp(&ocsp_der(&[1], None)).unwrap().next_update, None);
    }

    /// A `session_ticket_keys` file that is not 80 bytes, cannot be read or
    /// repeats a key's name fails the build with the message `legate check`
    /// gives for its entry.
    #[test]
    fn session_ticket_key_errors_name_the_entry() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let key = |name: &str, bytes: &[u8]| pki.write_bytes(name, bytes);
        let good = key("good.key", &[1; 80]);
        let other = key("other.key", &[2; 80]);
        let mut renamed = [3u8; 80];
        renamed[..16].copy_from_slice(&[1; 16]);
        let same_name = key("same-name.key", &renamed);
        let short = key("short.key", &[4; 48]);
        let missing = pki.dir.0.join("missing.key");
        let build = |keys: &[&PathBuf]| {
            let mut cfg = listener(&[(&a, &[])]);
            cfg.session_ticket_keys = keys.iter().map(|k| k.to_path_buf()).collect();
            server_config(&cfg, &[])
        };
        build(&[&good, &other]).unwrap();
        let cases: [(&[&PathBuf], usize, &str); 3] = [
            (&[&good, &short], 1, "holds 48 bytes, not 80"),
            (&[&missing], 0, "cannot read session ticket key file `"),
            (
                &[&good, &other, &same_name],
                2,
                "has the key name (its first 16 bytes) of entry 0",
            ),
        ];
        for (keys, index, text) in cases {
            let owned: Vec<PathBuf> = keys.iter().map(|k| k.to_path_buf()).collect();
            let problems = check_ticket_keys(&owned);
            assert_eq!(problems.len(), 1, "{text}");
            assert_eq!(problems[0].0, index);
            let msg = problems[0].1.to_string();
            assert!(msg.contains(text), "{msg}");
            assert_eq!(error_text(build(keys)), msg);
        }
        // Every problem of the list at once, for `legate check`.
        let all = check_ticket_keys(&[short, missing, good.clone(), good]);
        let indices: Vec<usize> = all.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, [0, 1, 3]);
    }

    /// Envoy and nginx serve an X.509 v1 certificate (no extensions), which
    /// webpki does not parse: Legate loads it too, checking that the key is
    /// its key, as a listener certificate and as a cluster's client
    /// certificate.
    #[test]
    fn an_x509_v1_certificate_is_accepted() {
        let pki = Pki::new();
        let cert = pki.write("v1.pem", V1_CERT);
        let key = pki.write("v1.key", V1_KEY);
        let other = pki.write("other.key", OTHER_KEY);
        assert!(is_x509_v1(&load_certs(&cert, "c").unwrap()[0]));
        check_certified_key(&cert, &key, None).unwrap();
        let e = check_certified_key(&cert, &other, None).unwrap_err();
        assert_eq!(
            (e.problem, e.file),
            (FileProblem::KeyMismatch, PairFile::Key)
        );
        let leaf = Leaf {
            cert: cert.clone(),
            key: key.clone(),
            der: load_certs(&cert, "c").unwrap()[0].clone(),
        };
        server_config(&listener(&[(&leaf, &[])]), &[]).unwrap();
        server_config(&listener(&[(&leaf, &["v1.example"])]), &[]).unwrap();
        client_config(&upstream(Some(&pki.ca), Some(&leaf)), &[]).unwrap();
    }

    /// Counts the WARN events of the current thread while `f` runs.
    fn warnings(f: impl FnOnce()) -> usize {
        crate::testing::warnings(f).len()
    }

    /// An expired certificate is warned about once per load: `legate check`,
    /// `legate run` and a reload check the files first, then build the
    /// config, and only the build warns.
    #[test]
    fn an_expired_certificate_is_warned_about_once() {
        let pki = Pki::new();
        let mut params = CertificateParams::new(vec!["old.test".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let old = pki.issue("old", params);
        assert_eq!(
            warnings(|| check_certified_key(&old.cert, &old.key, None).unwrap()),
            0
        );
        assert_eq!(
            warnings(|| {
                server_config(&listener(&[(&old, &[])]), &[]).unwrap();
            }),
            1
        );
    }

    #[test]
    fn certificate_and_key_may_share_one_file() {
        let pki = Pki::new();
        let a = pki.server("a", &["a.test"]);
        let combined = format!(
            "{}{}",
            std::fs::read_to_string(&a.key).unwrap(),
            std::fs::read_to_string(&a.cert).unwrap()
        );
        let both = pki.write("both.pem", &combined);
        let mut cfg = listener(&[(&a, &[])]);
        cfg.certificates[0].value.cert = both.clone();
        cfg.certificates[0].value.key = both;
        assert!(server_config(&cfg, &[]).is_ok());
    }

    #[test]
    fn subject_is_rfc4514_with_escaping() {
        let pki = Pki::new();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CountryName, "NL");
        params
            .distinguished_name
            .push(DnType::OrganizationName, " Acme, Inc.");
        params
            .distinguished_name
            .push(DnType::CommonName, "#a+b;c\\\n");
        let leaf = pki.issue("odd", params);
        assert_eq!(
            subject_rfc4514(&leaf.der).as_deref(),
            Some("CN=\\#a\\+b\\;c\\\\\\0a,O=\\ Acme\\, Inc.,C=NL")
        );
    }

    #[test]
    fn attribute_value_escaping() {
        let escape = |s: &str| {
            let mut out = String::new();
            escape_attribute_value(&mut out, s);
            out
        };
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape(" a b "), "\\ a b\\ ");
        assert_eq!(escape(" "), "\\ ");
        assert_eq!(escape("a#b"), "a#b");
        assert_eq!(escape("\"<x>\""), "\\\"\\<x\\>\\\"");
        assert_eq!(escape("tab\there\u{0}"), "tab\\09here\\00");
        assert_eq!(escape("c1\u{85}"), "c1\\c2\\85");
        assert_eq!(escape("Zoë"), "Zoë");
    }
}
