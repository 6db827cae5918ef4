//! The files a valid config names — listener certificates, keys, client CAs
//! and session ticket keys,
//! upstream CAs and client certificates, the KV store's Redis CA and client
//! certificate, endpoint files, plugin modules and data files, the access log
//! (opened for appending, or created and removed again) — read as loading them
//! would, each problem placed at the key that names the file, with a help line
//! chosen by the kind of problem the loader reports
//! ([`crate::tls::FileProblem`]), never by its message's wording.
//!
//! [`parse_str`](super::parse_str) does not read them (a config can be checked
//! for its form without its certificates at hand); `legate check` and `legate run`
//! do, through [`check_file`](super::check_file), and a reload through
//! [`check_files_carrying`](super::check_files_carrying), and report every such
//! problem of the file at once.

use std::path::Path;

use super::validate::{Issue, Issues};
use super::Config;
use crate::tls::{FileProblem, PairFile};

/// The end of every help line of a file that cannot be read.
const RELATIVE: &str = "a relative path is resolved against the directory of the config file, \
                        not the working directory";

/// Help for a certificate, key or CA file (`what`) with `problem`; `cert` is
/// the key that names the certificate of a key that does not match it.
fn help_for(problem: FileProblem, what: &str, cert: &str) -> String {
    match problem {
        FileProblem::Unreadable => {
            format!("check the path of the {what} and that Legate may read it; {RELATIVE}")
        }
        FileProblem::KeyMismatch => format!(
            "give the private key that belongs to the certificate: the first certificate of \
             `{cert}` must be the key's (compare `openssl x509 -noout -pubkey -in CERT` with \
             `openssl pkey -pubout -in KEY`)"
        ),
        FileProblem::Content => format!("check that the file is the {what} this key takes (PEM)"),
        FileProblem::Encrypted => "set `key_password_file` to a file whose first line is the \
                                   key's password, or give the key unencrypted (`openssl pkey \
                                   -in KEY -out NEW.key`)"
            .to_string(),
        FileProblem::WrongPassword => "check that the first line of `key_password_file` is the \
                                       key's password (`openssl pkey -in KEY -noout` asks for \
                                       it and says whether it decrypts)"
            .to_string(),
        FileProblem::UnsupportedEncryption => "convert the key to encrypted PKCS#8: `openssl \
                                               pkcs8 -topk8 -v2 aes-256-cbc -in KEY -out \
                                               NEW.key` (it asks for the old password, then a \
                                               new one)"
            .to_string(),
    }
}

/// Help for a CA file (`what`) with `problem`.
fn ca_help(problem: FileProblem, what: &str) -> String {
    help_for(problem, what, "")
}

/// What is wrong with the CRL file `crl` names, if any: the message
/// (through `shown`) and its help.
fn crl_problem(crl: Option<&Path>, shown: &dyn Fn(&str) -> String) -> Option<(String, String)> {
    let err = crate::tls::check_crls(crl?).err()?;
    Some((shown(&err.to_string()), crl_help(err.problem)))
}

/// Help for a CRL file with `problem`.
fn crl_help(problem: FileProblem) -> String {
    match problem {
        FileProblem::Content => "give a PEM file of `BEGIN X509 CRL` blocks (convert a DER CRL \
                                 with `openssl crl -inform DER -in FILE -out FILE.pem`)"
            .to_string(),
        other => help_for(other, "CRL file", ""),
    }
}

/// Help for an OCSP response file with `problem`.
fn ocsp_help(problem: FileProblem) -> String {
    match problem {
        FileProblem::Content => "give the certificate's current OCSP response in DER, as \
                                 `openssl ocsp -issuer CA -cert CERT -url URL -respout FILE` \
                                 writes it (a base64 one decodes with `base64 -d`)"
            .to_string(),
        other => help_for(other, "OCSP response file", ""),
    }
}

/// Help for a `session_ticket_keys` file with `problem`.
fn ticket_key_help(problem: FileProblem) -> String {
    match problem {
        FileProblem::Content => "each file holds one key of exactly 80 random bytes (a 16-byte \
                                 name, then 64 of secret), as Envoy takes them: make one with \
                                 `openssl rand 80 > FILE` (nginx's 48-byte keys are too short); \
                                 keys need distinct names, so list each file once"
            .to_string(),
        other => help_for(other, "session ticket key file", ""),
    }
}

/// A certificate, key or key password problem, as [`cert_key_problems`]
/// reports it.
struct PairProblem {
    /// The file it is in.
    file: PairFile,
    message: String,
    help: String,
}

impl PairProblem {
    /// The config key naming the file: `cert_key` (`cert`, `client_cert`),
    /// `key_key` (`key`, `client_key`) or `key_password_file`.
    fn key<'a>(&self, cert_key: &'a str, key_key: &'a str) -> &'a str {
        match self.file {
            PairFile::Cert => cert_key,
            PairFile::Key => key_key,
            PairFile::Password => "key_password_file",
        }
    }
}

/// Whether `file` is read after `stopped` (certificate, key, then password):
/// a load stopped by `stopped` did not look at it.
fn file_after(file: PairFile, stopped: PairFile) -> bool {
    let order = |f| match f {
        PairFile::Cert => 0,
        PairFile::Key => 1,
        PairFile::Password => 2,
    };
    order(file) > order(stopped)
}

/// The problems of a certificate, its key and the key's password file, as
/// loading them would find them, each with its message (through `shown`) and
/// help. `cert_key` is the key that names the certificate (`cert`,
/// `client_cert`).
fn cert_key_problems(
    cert: &Path,
    key: &Path,
    password: Option<&Path>,
    cert_key: &str,
    shown: &dyn Fn(&str) -> String,
) -> Vec<PairProblem> {
    let Err(err) = crate::tls::check_certified_key(cert, key, password) else {
        return Vec::new();
    };
    let what = |file| match file {
        PairFile::Cert => "certificate file",
        PairFile::Key => "private key file",
        PairFile::Password => "key password file",
    };
    let mut out = vec![PairProblem {
        file: err.file,
        message: shown(&err.to_string()),
        help: help_for(err.problem, what(err.file), cert_key),
    }];
    // The certificate (or key) stopped the load: a key or password file that
    // cannot be read is reported too (worded as the loader words it).
    let later = [(PairFile::Key, Some(key)), (PairFile::Password, password)];
    for (file, path) in later {
        let Some(path) = path.filter(|_| file_after(file, err.file)) else {
            continue;
        };
        if let Err(e) = std::fs::metadata(path) {
            out.push(PairProblem {
                file,
                message: shown(&format!(
                    "cannot read {} `{}`: {e}",
                    what(file),
                    path.display()
                )),
                help: help_for(FileProblem::Unreadable, what(file), cert_key),
            });
        }
    }
    out
}

impl Config {
    /// The problems of the files this (resolved) config names. `base` is the
    /// directory relative paths were resolved against: messages show a path
    /// under it as the file wrote it. The endpoint files of the clusters
    /// `carried` names (a reload keeps them without reading them) are skipped.
    pub(crate) fn file_issues(&self, base: &Path, carried: &dyn Fn(&str) -> bool) -> Vec<Issue> {
        let mut e = Issues::default();
        let prefix = base.to_string_lossy().into_owned();
        let shown = |msg: &str| -> String {
            if prefix.is_empty() {
                msg.to_string()
            } else {
                msg.replace(&format!("{}/", prefix.trim_end_matches('/')), "")
            }
        };
        for l in &self.listeners {
            let loc = &l.referenced;
            let l = &l.value;
            let Some(tls) = &l.tls else { continue };
            for certificate in &tls.certificates {
                let c = &certificate.value;
                let password = c.key_password_file.as_deref();
                let problems = cert_key_problems(&c.cert, &c.key, password, "cert", &shown);
                let cert_loads = !problems.iter().any(|p| p.file == PairFile::Cert);
                for p in problems {
                    let at = p.key("cert", "key");
                    e.at(
                        &certificate.referenced,
                        format!("listener `{}`: {}", l.name, p.message),
                        p.help,
                    )
                    .key(at);
                }
                // Checked against the certificate, so only once it loads.
                if let Some(staple) = c.ocsp_staple.as_deref().filter(|_| cert_loads) {
                    if let Err(err) = crate::tls::check_ocsp_staple(&c.cert, staple) {
                        e.at(
                            &certificate.referenced,
                            format!("listener `{}`: {}", l.name, shown(&err.to_string())),
                            ocsp_help(err.problem),
                        )
                        .key("ocsp_staple");
                    }
                }
            }
            for (i, err) in crate::tls::check_ticket_keys(&tls.session_ticket_keys) {
                e.at(
                    loc,
                    format!("listener `{}`: {}", l.name, shown(&err.to_string())),
                    ticket_key_help(err.problem),
                )
                .key("tls")
                .key("session_ticket_keys")
                .index(i);
            }
            if let Some(auth) = &tls.client_auth {
                if let Err(err) = crate::tls::check_roots(&auth.ca, "client CA file") {
                    let msg = shown(&err.to_string());
                    let help = ca_help(err.problem, "client CA file");
                    e.at(loc, format!("listener `{}`: {msg}", l.name), help)
                        .key("tls")
                        .key("client_auth")
                        .key("ca");
                }
                if let Some((msg, help)) = crl_problem(auth.crl.as_deref(), &shown) {
                    e.at(loc, format!("listener `{}`: {msg}", l.name), help)
                        .key("tls")
                        .key("client_auth")
                        .key("crl");
                }
            }
        }
        for c in &self.clusters {
            let loc = &c.referenced;
            let c = &c.value;
            if let Some(tls) = &c.tls {
                if let Some(ca) = &tls.ca {
                    if let Err(err) = crate::tls::check_roots(ca, "upstream CA file") {
                        let msg = shown(&err.to_string());
                        let help = ca_help(err.problem, "upstream CA file");
                        e.at(loc, format!("cluster `{}`: {msg}", c.name), help)
                            .key("tls")
                            .key("ca");
                    }
                }
                if let Some((msg, help)) = crl_problem(tls.crl.as_deref(), &shown) {
                    e.at(loc, format!("cluster `{}`: {msg}", c.name), help)
                        .key("tls")
                        .key("crl");
                }
                if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
                    let password = tls.key_password_file.as_deref();
                    for p in cert_key_problems(cert, key, password, "client_cert", &shown) {
                        let at = p.key("client_cert", "client_key");
                        e.at(loc, format!("cluster `{}`: {}", c.name, p.message), p.help)
                            .key("tls")
                            .key(at);
                    }
                }
            }
            if let Some(path) = c
                .discovery
                .path
                .as_ref()
                .filter(|_| !carried(c.name.as_str()))
            {
                if let Err(err) = std::fs::metadata(path) {
                    let msg = format!("cannot read endpoint file `{}`: {err}", path.display());
                    e.at(
                        loc,
                        format!("cluster `{}`: {}", c.name, shown(&msg)),
                        format!(
                            "check the path and that Legate may read it (the file must exist \
                             when the config is loaded); {RELATIVE}"
                        ),
                    )
                    .key("discovery")
                    .key("path");
                }
            }
        }
        if let Some(tls) = &self.kv.tls {
            let tls = &tls.value;
            if let Some(ca) = &tls.ca {
                if let Err(err) = crate::tls::check_roots(ca, "Redis CA file") {
                    e.top(
                        format!("`kv.tls`: {}", shown(&err.to_string())),
                        ca_help(err.problem, "Redis CA file"),
                    )
                    .key("kv")
                    .key("tls")
                    .key("ca");
                }
            }
            if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
                let password = tls.key_password_file.as_deref();
                for p in cert_key_problems(cert, key, password, "client_cert", &shown) {
                    let at = p.key("client_cert", "client_key");
                    e.top(format!("`kv.tls`: {}", p.message), p.help)
                        .key("kv")
                        .key("tls")
                        .key(at);
                }
            }
        }
        for p in &self.plugins {
            let loc = &p.referenced;
            let p = &p.value;
            if let Some(module) = p.module_file() {
                if let Err(err) = std::fs::metadata(module) {
                    let msg = format!("cannot read module `{}`: {err}", module.display());
                    e.at(
                        loc,
                        format!("plugin `{}`: {}", p.name, shown(&msg)),
                        format!(
                            "check the path of the `.wasm` file, or build it first (`legate \
                             plugin build DIR`); {RELATIVE}"
                        ),
                    )
                    .key("module");
                }
            }
            for (name, path) in &p.files {
                if let Err(err) = std::fs::metadata(path) {
                    let msg = format!("cannot read file `{}`: {err}", path.display());
                    e.at(
                        loc,
                        format!("plugin `{}`: `files.{name}`: {}", p.name, shown(&msg)),
                        format!("check the path of the data file; {RELATIVE}"),
                    )
                    .key("files")
                    .key(name.as_str());
                }
            }
        }
        // Each destination once (logs may share one).
        let mut checked = std::collections::HashSet::new();
        let top = self.access_log.as_ref().map(|a| (None, a));
        let listeners = self.listeners.iter().filter_map(|l| {
            l.value
                .access_log
                .as_ref()
                .map(|a| (Some(&l.referenced), a))
        });
        for (anchor, logs) in top.into_iter().chain(listeners) {
            let list = matches!(logs, super::AccessLogs::List(_));
            for (i, log) in logs.logs().iter().enumerate() {
                if !checked.insert(crate::access_log::destination(&log.path)) {
                    continue;
                }
                let Err(err) = crate::access_log::check(log) else {
                    continue;
                };
                let msg = shown(&err.to_string());
                let help = if err.no_directory {
                    format!(
                        "create the directory, or give a path in one that exists (or `stdout`, \
                         `stderr`); {RELATIVE}"
                    )
                } else {
                    format!(
                        "check that Legate may write the file, or create it in its directory \
                         (`check` creates a new one and removes it again); {RELATIVE}"
                    )
                };
                let issue = match anchor {
                    Some(loc) => e.at(loc, msg, help),
                    None => e.top(msg, help),
                };
                issue.key("access_log");
                if list {
                    issue.index(i);
                }
                issue.key("path");
            }
        }
        e.0
    }
}
