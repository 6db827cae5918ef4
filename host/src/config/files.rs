//! The files a valid config names — listener certificates, keys and client CAs,
//! upstream CAs and client certificates, endpoint files, plugin modules and data
//! files, the access log's directory — read as loading them would, each problem
//! placed at the key that names the file, with a help line.
//!
//! [`parse_str`](super::parse_str) does not read them (a config can be checked
//! for its form without its certificates at hand); `legate check` and `legate run`
//! do, through [`check_file`](super::check_file), and report every such problem of
//! the file at once.

use std::path::Path;

use super::validate::{Issue, Issues};
use super::Config;

/// The end of every help line of a file that cannot be read.
const RELATIVE: &str = "a relative path is resolved against the directory of the config file, \
                        not the working directory";

/// Help for a file that cannot be read or is not what its key takes.
fn help_for(message: &str, what: &str) -> String {
    if message.contains("cannot read") || message.contains("does not exist") {
        format!("check the path of the {what} and that Legate may read it; {RELATIVE}")
    } else if message.contains("does not match") {
        "give the private key that belongs to the certificate: the first certificate of \
         `cert` must be the key's (compare `openssl x509 -noout -pubkey -in CERT` with \
         `openssl pkey -pubout -in KEY`)"
            .to_string()
    } else {
        format!("check that the file is the {what} this key takes (PEM)")
    }
}

/// The error of a file that cannot be read, worded as the TLS loader words it.
fn unreadable(path: &Path, what: &str, shown: &dyn Fn(&anyhow::Error) -> String) -> Option<String> {
    std::fs::metadata(path).err().map(|e| {
        shown(&anyhow::anyhow!(
            "cannot read {what} `{}`: {e}",
            path.display()
        ))
    })
}

/// The problems of a certificate and its key, as loading them would find
/// them: each with whether it is the key's (else the certificate's), its
/// message and its help.
fn cert_key_problems(
    cert: &Path,
    key: &Path,
    shown: &dyn Fn(&anyhow::Error) -> String,
) -> Vec<(bool, String, String)> {
    let Err(err) = crate::tls::check_certified_key(cert, key) else {
        return Vec::new();
    };
    let msg = shown(&err);
    // Problems of the key file start with its name; a mismatch is the key's
    // too (the certificate is the one the names come from).
    let on_key = msg.starts_with("private key file");
    let what = if on_key {
        "private key file"
    } else {
        "certificate file"
    };
    let mut out = vec![(on_key, msg.clone(), help_for(&msg, what))];
    // The certificate stopped the load: a missing key is reported too.
    if !on_key {
        if let Some(msg) = unreadable(key, "private key file", shown) {
            let help = help_for(&msg, "private key file");
            out.push((true, msg, help));
        }
    }
    out
}

impl Config {
    /// The problems of the files this (resolved) config names. `base` is the
    /// directory relative paths were resolved against: messages show a path
    /// under it as the file wrote it.
    pub(crate) fn file_issues(&self, base: &Path) -> Vec<Issue> {
        let mut e = Issues::default();
        let prefix = base.to_string_lossy().into_owned();
        let shown = |err: &anyhow::Error| -> String {
            let msg = format!("{err:#}");
            if prefix.is_empty() {
                msg
            } else {
                msg.replace(&format!("{}/", prefix.trim_end_matches('/')), "")
            }
        };
        for l in &self.listeners {
            let loc = &l.referenced;
            let l = &l.value;
            let Some(tls) = &l.tls else { continue };
            for c in &tls.certificates {
                for (on_key, msg, help) in cert_key_problems(&c.value.cert, &c.value.key, &shown) {
                    e.at(&c.referenced, format!("listener `{}`: {msg}", l.name), help)
                        .key(if on_key { "key" } else { "cert" });
                }
            }
            if let Some(auth) = &tls.client_auth {
                if let Err(err) = crate::tls::check_roots(&auth.ca, "client CA file") {
                    let msg = shown(&err);
                    let help = help_for(&msg, "client CA file");
                    e.at(loc, format!("listener `{}`: {msg}", l.name), help)
                        .key("tls")
                        .key("client_auth")
                        .key("ca");
                }
            }
        }
        for c in &self.clusters {
            let loc = &c.referenced;
            let c = &c.value;
            if let Some(tls) = &c.tls {
                if let Some(ca) = &tls.ca {
                    if let Err(err) = crate::tls::check_roots(ca, "upstream CA file") {
                        let msg = shown(&err);
                        let help = help_for(&msg, "upstream CA file");
                        e.at(loc, format!("cluster `{}`: {msg}", c.name), help)
                            .key("tls")
                            .key("ca");
                    }
                }
                if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
                    for (on_key, msg, help) in cert_key_problems(cert, key, &shown) {
                        e.at(loc, format!("cluster `{}`: {msg}", c.name), help)
                            .key("tls")
                            .key(if on_key { "client_key" } else { "client_cert" });
                    }
                }
            }
            if let Some(path) = &c.discovery.path {
                if let Err(err) = std::fs::metadata(path) {
                    let err =
                        anyhow::anyhow!("cannot read endpoint file `{}`: {err}", path.display());
                    e.at(
                        loc,
                        format!("cluster `{}`: {}", c.name, shown(&err)),
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
        for p in &self.plugins {
            let loc = &p.referenced;
            let p = &p.value;
            if let Some(module) = p.module_file() {
                if let Err(err) = std::fs::metadata(module) {
                    let err = anyhow::anyhow!("cannot read module `{}`: {err}", module.display());
                    e.at(
                        loc,
                        format!("plugin `{}`: {}", p.name, shown(&err)),
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
                    let err = anyhow::anyhow!("cannot read file `{}`: {err}", path.display());
                    e.at(
                        loc,
                        format!("plugin `{}`: `files.{name}`: {}", p.name, shown(&err)),
                        format!("check the path of the data file; {RELATIVE}"),
                    )
                    .key("files")
                    .key(name.as_str());
                }
            }
        }
        if let Some(log) = &self.access_log {
            if let Err(err) = crate::access_log::AccessLog::check(log) {
                let msg = shown(&err);
                let help = if msg.contains("does not exist") {
                    format!(
                        "create the directory, or give a path in one that exists (or `stdout`, \
                         `stderr`); {RELATIVE}"
                    )
                } else {
                    format!("check that Legate may write the file; {RELATIVE}")
                };
                e.top(msg, help).key("access_log").key("path");
            }
        }
        e.0
    }
}
