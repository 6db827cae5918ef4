//! Test keys and tokens, made with the same RustCrypto crates the plugin
//! verifies with: keys are generated per test run, tokens signed here.

#![allow(clippy::unwrap_used, dead_code)]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand_core::OsRng;
use serde_json::{json, Value};

/// The harness wall clock used by the tests (Unix seconds).
pub const NOW: u64 = 1_767_225_600;

pub fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// A signing key of one algorithm, with its public JWK.
pub enum Signer {
    Hs256(Vec<u8>),
    Rsa(&'static rsa::RsaPrivateKey, &'static str),
    Es256(p256::ecdsa::SigningKey),
    Es384(p384::ecdsa::SigningKey),
    EdDsa(ed25519_dalek::SigningKey),
}

fn rsa_key() -> &'static rsa::RsaPrivateKey {
    // RSA key generation is slow in debug builds: one key per test binary.
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap())
}

/// `token` with one signature bit flipped.
pub fn corrupt(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig[0] ^= 0x01;
    format!("{input}.{}", b64(&sig))
}

impl Signer {
    /// A fresh key (for RS*: the binary's one RSA key).
    pub fn new(alg: &str) -> Signer {
        match alg {
            "HS256" => {
                let mut k = vec![0u8; 32];
                rand_core::RngCore::fill_bytes(&mut OsRng, &mut k);
                Signer::Hs256(k)
            }
            "RS256" => Signer::Rsa(rsa_key(), "RS256"),
            "RS384" => Signer::Rsa(rsa_key(), "RS384"),
            "RS512" => Signer::Rsa(rsa_key(), "RS512"),
            "ES256" => Signer::Es256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            "ES384" => Signer::Es384(p384::ecdsa::SigningKey::random(&mut OsRng)),
            "EdDSA" => Signer::EdDsa(ed25519_dalek::SigningKey::generate(&mut OsRng)),
            other => panic!("no signer for {other}"),
        }
    }

    pub fn alg(&self) -> &'static str {
        match self {
            Signer::Hs256(_) => "HS256",
            Signer::Rsa(_, a) => a,
            Signer::Es256(_) => "ES256",
            Signer::Es384(_) => "ES384",
            Signer::EdDsa(_) => "EdDSA",
        }
    }

    /// The public JWK (the secret for HS256) with `kid`.
    pub fn jwk(&self, kid: &str) -> Value {
        match self {
            Signer::Hs256(k) => json!({"kty": "oct", "kid": kid, "k": b64(k)}),
            Signer::Rsa(k, _) => {
                use rsa::traits::PublicKeyParts;
                json!({"kty": "RSA", "kid": kid, "use": "sig",
                       "n": b64(&k.n().to_bytes_be()), "e": b64(&k.e().to_bytes_be())})
            }
            Signer::Es256(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-256", "kid": kid,
                       "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap())})
            }
            Signer::Es384(k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({"kty": "EC", "crv": "P-384", "kid": kid,
                       "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap())})
            }
            Signer::EdDsa(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(k.verifying_key().as_bytes())})
            }
        }
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use rsa::signature::{SignatureEncoding, Signer as _};
        match self {
            Signer::Hs256(k) => {
                use hmac::Mac;
                let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(k).unwrap();
                m.update(msg);
                m.finalize().into_bytes().to_vec()
            }
            Signer::Rsa(k, "RS256") => rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new((*k).clone())
                .sign(msg)
                .to_vec(),
            Signer::Rsa(k, "RS384") => rsa::pkcs1v15::SigningKey::<sha2::Sha384>::new((*k).clone())
                .sign(msg)
                .to_vec(),
            Signer::Rsa(k, _) => rsa::pkcs1v15::SigningKey::<sha2::Sha512>::new((*k).clone())
                .sign(msg)
                .to_vec(),
            Signer::Es256(k) => {
                let s: p256::ecdsa::Signature = k.sign(msg);
                s.to_bytes().to_vec()
            }
            Signer::Es384(k) => {
                let s: p384::ecdsa::Signature = k.sign(msg);
                s.to_bytes().to_vec()
            }
            Signer::EdDsa(k) => {
                use ed25519_dalek::Signer as _;
                k.sign(msg).to_bytes().to_vec()
            }
        }
    }

    /// A compact JWS of `claims` with header `{alg, kid}`.
    pub fn token(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = json!({"alg": self.alg(), "typ": "JWT"});
        if let Some(k) = kid {
            header["kid"] = json!(k);
        }
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.sign(input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }
}

/// Standard valid claims for issuer `iss` and audience `api`.
pub fn claims(iss: &str) -> Value {
    json!({"iss": iss, "aud": "api", "sub": "alice", "exp": NOW + 300, "nbf": NOW - 10,
           "role": "admin", "scope": "read write", "org": {"id": 42}})
}

/// A JWKS document.
pub fn jwks(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

/// sha256(key) in hex.
pub fn sha256_hex(key: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
