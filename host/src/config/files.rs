//! The files a valid config names — listener certificates, keys and client CAs,
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
use crate::tls::FileProblem;

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

/// A certificate or key problem, as [`cert_key_problems`] reports it.
struct PairProblem {
    /// It is the key's (else the certificate's).
    in_key: bool,
    message: String,
    help: String,
}

/// The problems of a certificate and its key, as loading them would find
/// them, each with its message (through `shown`) and help. `cert_key` is the
/// key that names the certificate (`cert`, `client_cert`).
fn cert_key_problems(
    cert: &Path,
    key: &Path,
    cert_key: &str,
    shown: &dyn Fn(&str) -> String,
) -> Vec<PairProblem> {
    let Err(err) = crate::tls::check_certified_key(cert, key) else {
        return Vec::new();
    };
    let what = |in_key| {
        if in_key {
            "private key file"
        } else {
            "certificate file"
        }
    };
    let mut out = vec![PairProblem {
        in_key: err.in_key,
        message: shown(&err.to_string()),
        help: help_for(err.problem, what(err.in_key), cert_key),
    }];
    // The certificate stopped the load: a key that cannot be read is reported
    // too (worded as the loader words it).
    if !err.in_key {
        if let Err(e) = std::fs::metadata(key) {
            out.push(PairProblem {
                in_key: true,
                message: shown(&format!(
                    "cannot read private key file `{}`: {e}",
                    key.display()
                )),
                help: help_for(FileProblem::Unreadable, what(true), cert_key),
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
            for c in &tls.certificates {
                for p in cert_key_problems(&c.value.cert, &c.value.key, "cert", &shown) {
                    e.at(
                        &c.referenced,
                        format!("listener `{}`: {}", l.name, p.message),
                        p.help,
                    )
                    .key(if p.in_key { "key" } else { "cert" });
                }
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
                    for p in cert_key_problems(cert, key, "client_cert", &shown) {
                        e.at(loc, format!("cluster `{}`: {}", c.name, p.message), p.help)
                            .key("tls")
                            .key(if p.in_key {
                                "client_key"
                            } else {
                                "client_cert"
                            });
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
                for p in cert_key_problems(cert, key, "client_cert", &shown) {
                    e.top(format!("`kv.tls`: {}", p.message), p.help)
                        .key("kv")
                        .key("tls")
                        .key(if p.in_key {
                            "client_key"
                        } else {
                            "client_cert"
                        });
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
        if let Some(log) = &self.access_log {
            if let Err(err) = crate::access_log::AccessLog::check(log) {
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
                e.top(msg, help).key("access_log").key("path");
            }
        }
        e.0
    }
}
