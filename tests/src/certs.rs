//! Test certificates: a throwaway CA (rcgen) issuing server and client certificates,
//! written as PEM files into a temporary directory so they can be named in a config.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A directory under the system temp dir, removed (with its contents) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh, uniquely named directory.
    pub fn new() -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("legate-test-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A test certificate authority. Certificates it issues are written next to its own
/// `ca.pem` in one temporary directory that lives as long as the `Ca` or any
/// [`TlsFiles`] it issued.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: Arc<TempDir>,
    /// The CA certificate, PEM file.
    pub cert_path: PathBuf,
    /// The CA certificate, DER.
    pub cert_der: CertificateDer<'static>,
    serial: AtomicU64,
}

/// A certificate (leaf, then nothing: the CA is not in the chain) with its key, as
/// files and as DER for in-process rustls configs.
#[derive(Clone)]
pub struct TlsFiles {
    /// PEM certificate chain file.
    pub cert: PathBuf,
    /// PEM PKCS#8 private key file.
    pub key: PathBuf,
    /// PEM file of the issuing CA (what a peer must trust).
    pub ca: PathBuf,
    /// The chain, DER.
    pub chain: Vec<CertificateDer<'static>>,
    /// The issuing CA certificate, DER.
    pub ca_der: CertificateDer<'static>,
    /// Its serial number (what a CRL names it by).
    pub serial: u64,
    key_der: Vec<u8>,
    _dir: Arc<TempDir>,
}

impl TlsFiles {
    /// A listener's `tls:` block serving this certificate, indented to sit under
    /// `  - name: …` in a config's `listeners:`.
    pub fn listener_tls_yaml(&self) -> String {
        format!(
            "    tls:\n      certificates:\n        - cert: {}\n          key: {}\n",
            self.cert.display(),
            self.key.display()
        )
    }

    /// Writes (or rewrites) the key encrypted with `password` (encrypted
    /// PKCS#8 PEM, PBES2: PBKDF2-HMAC-SHA256 and AES-256-CBC, as `openssl
    /// pkcs8 -topk8 -v2 aes-256-cbc` writes it) to `key_name`, and `password`
    /// on the first line of `password_name`, both in the certificate's
    /// directory; returns (key, password file).
    pub fn write_encrypted_key(
        &self,
        key_name: &str,
        password_name: &str,
        password: &str,
    ) -> (PathBuf, PathBuf) {
        use pkcs8::der::Decode;
        let info = pkcs8::PrivateKeyInfo::from_der(&self.key_der).expect("PKCS#8 key");
        // A fixed salt and IV: these keys protect nothing.
        let params = pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(
            2048,
            b"legate-test-salt",
            &[7; 16],
        )
        .expect("PBES2 parameters");
        let pem = info
            .encrypt_with_params(params, password)
            .expect("encrypt key")
            .to_pem("ENCRYPTED PRIVATE KEY", pkcs8::LineEnding::LF)
            .expect("PEM");
        let key = self._dir.write(key_name, pem.as_bytes());
        let pass = self._dir.write(password_name, format!("{password}\n"));
        (key, pass)
    }

    /// Writes (or rewrites) `name` in the certificate's directory: a DER OCSP
    /// response (RFC 6960) saying this certificate is good, produced on
    /// `produced` (year, month, day) and current until `next_update` if given.
    /// Its CertID hashes and signature are placeholders (Legate checks the
    /// serial number, a client the signature): the bytes are what a test
    /// compares.
    pub fn write_ocsp_response(
        &self,
        name: &str,
        produced: Day,
        next_update: Option<Day>,
    ) -> PathBuf {
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
        let time = |(y, m, d): Day| der(0x18, format!("{y:04}{m:02}{d:02}000000Z").as_bytes());
        let serial: Vec<u8> = {
            let bytes = self.serial.to_be_bytes();
            let first = bytes.iter().position(|&b| b != 0).unwrap_or(7);
            let mut v = bytes[first..].to_vec();
            if v[0] & 0x80 != 0 {
                v.insert(0, 0);
            }
            v
        };
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
                der(0x02, &serial),
            ]
            .concat(),
        );
        let mut single = [cert_id, vec![0x80, 0], time(produced)].concat();
        if let Some(day) = next_update {
            single.extend(der(0xa0, &time(day)));
        }
        let data = der(
            0x30,
            &[
                der(0xa2, &der(0x04, &[3; 20])),
                time(produced),
                der(0x30, &der(0x30, &single)),
            ]
            .concat(),
        );
        // ecdsa-with-SHA256, an empty signature.
        let alg = der(
            0x30,
            &der(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]),
        );
        let basic = der(0x30, &[data, alg, der(0x03, &[0])].concat());
        // id-pkix-ocsp-basic
        let oid = [0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x01];
        let bytes = der(0x30, &[der(0x06, &oid), der(0x04, &basic)].concat());
        let response = der(0x30, &[der(0x0a, &[0]), der(0xa0, &bytes)].concat());
        self._dir.write(name, response)
    }

    /// The private key, DER.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("ca", &self.ca)
            .finish()
    }
}

/// A calendar day: (year, month, day).
pub type Day = (i32, u8, u8);

impl Ca {
    /// A new self-signed CA with common name `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("generate CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign CA");
        let dir = Arc::new(TempDir::new());
        let cert_path = dir.write("ca.pem", issuer.pem());
        let cert_der = issuer.der().clone();
        Ca {
            issuer,
            dir,
            cert_path,
            cert_der,
            serial: AtomicU64::new(1),
        }
    }

    /// The directory the files are written to.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `names` (DNS names or IP addresses, all put in the
    /// subjectAltName; the first is also the common name).
    pub fn server(&self, names: &[&str]) -> TlsFiles {
        self.leaf(names, &[], ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// [`Ca::server`] with URI SANs `uris` too (a SPIFFE id).
    pub fn server_with_uris(&self, names: &[&str], uris: &[&str]) -> TlsFiles {
        self.leaf(names, uris, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// [`Ca::client`] with URI SANs `uris` too (a SPIFFE id).
    pub fn client_with_uris(&self, cn: &str, uris: &[&str]) -> TlsFiles {
        self.leaf(&[cn], uris, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A client certificate with common name `cn` (also a DNS SAN, as some verifiers
    /// want one).
    pub fn client(&self, cn: &str) -> TlsFiles {
        self.leaf(&[cn], &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// [`Ca::server`], valid only in January 2020: expired.
    pub fn expired_server(&self, names: &[&str]) -> TlsFiles {
        self.leaf_valid(
            names,
            &[],
            ExtendedKeyUsagePurpose::ServerAuth,
            Some(((2020, 1, 1), (2020, 2, 1))),
        )
    }

    /// Writes (or rewrites) `name` in the CA's directory: a PEM CRL of this
    /// CA revoking `revoked`, valid until 2100.
    pub fn crl(&self, name: &str, revoked: &[&TlsFiles]) -> PathBuf {
        self.crl_until(name, revoked, (2100, 1, 1))
    }

    /// [`Ca::crl`] whose `nextUpdate` was in January 2021: expired.
    pub fn expired_crl(&self, name: &str, revoked: &[&TlsFiles]) -> PathBuf {
        self.crl_until(name, revoked, (2021, 1, 1))
    }

    fn crl_until(&self, name: &str, revoked: &[&TlsFiles], (y, m, d): Day) -> PathBuf {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(y, m, d),
            crl_number: rcgen::SerialNumber::from(self.serial.fetch_add(1, Ordering::Relaxed)),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|leaf| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(leaf.serial),
                    revocation_time: rcgen::date_time_ymd(2020, 1, 2),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).expect("sign CRL");
        self.dir.write(name, crl.pem().expect("CRL PEM"))
    }

    fn leaf(&self, names: &[&str], uris: &[&str], usage: ExtendedKeyUsagePurpose) -> TlsFiles {
        self.leaf_valid(names, uris, usage, None)
    }

    /// A leaf, valid from the day (year, month, day) `.0` to `.1` if given
    /// (rcgen's default period otherwise).
    fn leaf_valid(
        &self,
        names: &[&str],
        uris: &[&str],
        usage: ExtendedKeyUsagePurpose,
        validity: Option<(Day, Day)>,
    ) -> TlsFiles {
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("certificate params");
        if let Some(((y0, m0, d0), (y1, m1, d1))) = validity {
            params.not_before = rcgen::date_time_ymd(y0, m0, d0);
            params.not_after = rcgen::date_time_ymd(y1, m1, d1);
        }
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().expect("URI SAN is IA5")));
        }
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("legate-test"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        params.serial_number = Some(rcgen::SerialNumber::from(n));
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let stem = format!(
            "{}-{n}",
            names
                .first()
                .copied()
                .unwrap_or("leaf")
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        );
        let cert_path = self.dir.write(&format!("{stem}.crt"), cert.pem());
        let key_path = self.dir.write(&format!("{stem}.key"), key.serialize_pem());
        TlsFiles {
            cert: cert_path,
            key: key_path,
            ca: self.cert_path.clone(),
            chain: vec![cert.der().clone()],
            ca_der: self.cert_der.clone(),
            serial: n,
            key_der: key.serialize_der(),
            _dir: self.dir.clone(),
        }
    }
}
