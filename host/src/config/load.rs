//! Reading a config file: YAML parsing, then [`Config::validate`], with every error
//! rendered as `file:line:col: error: what` + the offending line + `help: how to fix`.
//!
//! serde's own messages speak Rust (`invalid type: sequence, expected struct Admin`,
//! `invalid u32`); they are rewritten here in the file's terms — the key path, what
//! was found, what is allowed — using an outline of the YAML text ([`Outline`]).

use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::{Error as YamlError, Location};

use super::source::{shorten, Kind, Outline, Path as KeyPath, Pos, Seg};
use super::validate::{did_you_mean, endpoint_health_check_issues, Issue};
use super::{Cluster, Config, EndpointHealthCheck};

/// One config error, with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line; 0 when unknown.
    pub line: u64,
    /// 1-based column; 0 when unknown.
    pub col: u64,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl ConfigError {
    /// An error at `loc` (unknown locations render without line:col). Control
    /// characters in `message` are escaped ([`one_line`]).
    pub fn at(loc: &Location, message: impl Into<String>) -> Self {
        ConfigError {
            line: loc.line(),
            col: loc.column(),
            message: one_line(message.into()),
            help: None,
        }
    }

    /// Adds the fix.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    fn place(&mut self, pos: Pos) {
        self.line = pos.line;
        self.col = pos.col;
    }
}

/// `message` with its control characters escaped as Rust writes them (`\n`,
/// `\t`, `\u{1b}`). Messages quote values from the file in backticks, and a
/// quoted YAML string may hold a newline (`content_type: "text/plain\n"`): printed
/// raw it would split the error line in two, or move the terminal's cursor.
pub(crate) fn one_line(message: String) -> String {
    if !message.contains(char::is_control) {
        return message;
    }
    message
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// All errors found in one file, with the file's name and text for rendering.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    /// The file as given by the user.
    pub file: String,
    /// Its contents, to quote the offending lines.
    pub source: String,
    /// The errors, in file order.
    pub errors: Vec<ConfigError>,
}

impl std::error::Error for ConfigErrors {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            // A message may quote a value from the file: masked as the line is.
            let message = mask_credentials(&e.message);
            if e.line == 0 {
                writeln!(f, "{}: error: {message}", self.file)?;
            } else {
                writeln!(f, "{}:{}:{}: error: {message}", self.file, e.line, e.col)?;
                if let Some(text) = self.source.lines().nth((e.line - 1) as usize) {
                    // The line is quoted as written, except a URL's password:
                    // errors end up in logs and in the admin API's reload answers.
                    let text = mask_credentials(text);
                    let text = text.as_str();
                    let gutter = e.line.to_string().len();
                    writeln!(f, "{:gutter$} |", "")?;
                    writeln!(f, "{} | {}", e.line, text)?;
                    // The caret goes under the column's character; tabs are kept so it
                    // lines up in a terminal however wide it draws them.
                    let pad: String = text
                        .chars()
                        .take((e.col.max(1) - 1) as usize)
                        .map(|c| if c == '\t' { '\t' } else { ' ' })
                        .collect();
                    writeln!(f, "{:gutter$} | {pad}^", "")?;
                }
            }
            if let Some(help) = &e.help {
                writeln!(f, "  help: {help}")?;
            }
        }
        if self.errors.len() > 1 {
            write!(f, "{} errors in {}", self.errors.len(), self.file)?;
        }
        Ok(())
    }
}

/// `line` with the credentials of every URL in it replaced by `***`
/// ([`mask_url`], which also masks `kv.url` in messages): the
/// userinfo (`redis://user:pass@host` → `redis://***@host`) and the
/// `user`/`pass`/`password` query parameters (`redis+unix://`). Only a URL's
/// authority is looked at for `@`, so a path or query holding one is kept.
fn mask_credentials(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(sep) = rest.find("://") {
        // The URL runs from the scheme to the first character YAML would end a
        // plain or quoted scalar with.
        let start = rest[..sep]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let len = rest[sep + 3..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '}' | ']'))
            .map_or(rest.len() - sep - 3, |n| n);
        let end = sep + 3 + len;
        out.push_str(&rest[..start]);
        out.push_str(&mask_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// One URL (`scheme://authority/path?query#fragment`) with its userinfo and
/// its credential query parameters masked (also `kv.url` in messages, and in
/// `/config_dump`).
pub(crate) fn mask_url(url: &str) -> String {
    let Some(sep) = url.find("://") else {
        return url.to_string();
    };
    let after = &url[sep + 3..];
    let authority_len = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, tail) = after.split_at(authority_len);
    let mut out = url[..sep + 3].to_string();
    match authority.rfind('@') {
        Some(at) => {
            out.push_str("***");
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let (path, query) = match tail.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (tail, None),
    };
    out.push_str(path);
    if let Some(q) = query {
        out.push('?');
        for (i, pair) in q.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((k, _))
                    if ["user", "username", "pass", "password"]
                        .iter()
                        .any(|s| k.eq_ignore_ascii_case(s)) =>
                {
                    out.push_str(k);
                    out.push_str("=***");
                }
                _ => out.push_str(pair),
            }
        }
    }
    out
}

/// Reads, parses and validates a config file. Relative paths in the config (certs,
/// log files) are resolved against the file's directory.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let (file, source, base) = read(path)?;
    parse_str(&file, &source, &base)
}

/// As [`load_file`], then reads the files the config names (certificates, keys,
/// CAs, endpoint files, plugin modules, the access log's directory) with
/// [`check_files`]: what `legate check` and `legate run` load.
pub fn check_file(path: &Path) -> Result<Config, ConfigErrors> {
    let (file, source, base) = read(path)?;
    let config = parse_str(&file, &source, &base)?;
    check_files(&file, &source, &base, &config)?;
    Ok(config)
}

/// The problems of the files `config` (from [`parse_str`] of `source`, with the
/// same `file` and `base`) names, all of them, each at the key that names the
/// file: a certificate, key or CA that cannot be read, does not parse or (a key)
/// does not match its certificate; an endpoint file, plugin module or data file
/// that cannot be read; an access log whose directory does not exist.
pub fn check_files(
    file: &str,
    source: &str,
    base: &Path,
    config: &Config,
) -> Result<(), ConfigErrors> {
    check_files_carrying(file, source, base, config, &|_| false)
}

/// As [`check_files`], for a reload: the endpoint files of the clusters
/// `carried` names (kept as they are, their files not read again) are not
/// checked.
pub fn check_files_carrying(
    file: &str,
    source: &str,
    base: &Path,
    config: &Config,
    carried: &dyn Fn(&str) -> bool,
) -> Result<(), ConfigErrors> {
    let issues = config.file_issues(base, carried);
    if issues.is_empty() {
        return Ok(());
    }
    Err(ConfigErrors {
        file: file.to_string(),
        source: source.to_string(),
        errors: placed(issues, source),
    })
}

/// One error at key path `keys` of the item at `anchor` (a listener's or
/// cluster's place in `source`), rendered as every config error is: what only
/// building finds (an address that cannot be bound, a host name that does not
/// resolve) told at its `file:line:col`, as a reload's other errors are.
pub fn error_at(
    file: &str,
    source: &str,
    anchor: &Location,
    keys: &[&str],
    message: String,
    help: Option<String>,
) -> ConfigErrors {
    let focus: Vec<Seg> = keys.iter().map(|k| Seg::Key((*k).to_string())).collect();
    error_at_focus(file, source, anchor, &focus, message, help)
}

/// [`error_at`] for key path `focus`, in one place for both its spellings.
fn error_at_focus(
    file: &str,
    source: &str,
    anchor: &Location,
    focus: &[Seg],
    message: String,
    help: Option<String>,
) -> ConfigErrors {
    let (line, col) = position(source, anchor, focus);
    ConfigErrors {
        file: file.to_string(),
        source: source.to_string(),
        errors: vec![ConfigError {
            line,
            col,
            message: one_line(message),
            help,
        }],
    }
}

/// `issues` placed in `source` (line and column of the key each names), in
/// file order.
fn placed(issues: Vec<Issue>, source: &str) -> Vec<ConfigError> {
    let outline = Outline::parse(source);
    let mut errors: Vec<ConfigError> = issues
        .into_iter()
        .map(|i| place(i, outline.as_ref()))
        .collect();
    errors.sort_by_key(|e| (e.line, e.col));
    errors
}

/// The config file's name as given, its text and its directory.
fn read(path: &Path) -> Result<(String, String, PathBuf), ConfigErrors> {
    let file = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: file.clone(),
        source: String::new(),
        errors: vec![ConfigError {
            line: 0,
            col: 0,
            message: format!("cannot read the config file: {e}"),
            help: Some("check the path given with -c/--config".into()),
        }],
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((file, source, base))
}

/// Parses and validates config text. `file` is only used in messages; `base` is the
/// directory relative paths are resolved against. The files the config names are
/// not read here ([`check_files`]).
///
/// A schema error (YAML syntax, an unknown key, a wrong type or enum value) stops
/// the parse at the first, in file order: serde_saphyr deserializes in one pass
/// and returns one error. Validation errors of a file that parses are all returned.
pub fn parse_str(file: &str, source: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        file: file.to_string(),
        source: source.to_string(),
        errors,
    };
    let mut config: Config =
        serde_saphyr::from_str_with_options(source, yaml_options()).map_err(|e| {
            fail(vec![yaml_error(
                &e,
                source,
                Outline::parse(source).as_ref(),
            )])
        })?;
    let issues = config.issues();
    if !issues.is_empty() {
        return Err(fail(placed(issues, source)));
    }
    config.resolve_paths(base);
    let zone = config.local_zone.clone();
    config.set_local_zone(zone);
    config.origin = Some(std::sync::Arc::new(Origin {
        file: file.to_string(),
        source: source.to_string(),
    }));
    config.source_sha256 = Some(crate::reload::sha256_hex(source.as_bytes()));
    Ok(config)
}

/// Where a [`Config`] was read from: the file's name as given and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file as given by the user.
    pub file: String,
    /// Its contents.
    pub source: String,
}

/// An error about the value at `path` under the item at `anchor` of the
/// config `origin` holds, rendered as every config error is: at the
/// `file:line:col` of the deepest key of `path` the file has (the item's own
/// place if it has none of it). `path` is written as messages write key
/// paths, `config.providers[0].issuer`.
pub(crate) fn error_at_path(
    origin: &Origin,
    anchor: &Location,
    path: &str,
    message: String,
    help: Option<String>,
) -> ConfigErrors {
    let mut focus = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        // `providers[0][1]`: the key, then each index.
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            focus.push(Seg::Key(key.to_string()));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let Some(end) = inner.find(']') else { break };
            match inner[..end].parse() {
                Ok(i) => focus.push(Seg::Index(i)),
                Err(_) => focus.push(Seg::Key(inner[..end].to_string())),
            }
            rest = &inner[end + 1..];
        }
    }
    error_at_focus(&origin.file, &origin.source, anchor, &focus, message, help)
}

/// How the config's YAML is read: booleans are the YAML 1.2 core schema's `true`
/// and `false` (also `True`/`TRUE`/`False`/`FALSE`), as docs/config.md says. YAML
/// 1.1's `yes`/`no`/`on`/`off`/`y`/`n` are an error for a boolean key and a
/// string everywhere else (a plugin's `config: { realm: NO }` gets `"NO"`).
pub(crate) fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { strict_booleans: true }
}

/// Where in `source` (YAML or JSON text read with the config's parser, such as an
/// endpoint file) key path `keys` of the item at `anchor` is, as far as the text has
/// it: `(line, col)`, 1-based; the item's own place when the text cannot be outlined.
pub(crate) fn key_position(source: &str, anchor: &Location, keys: &[&str]) -> (u64, u64) {
    let focus: Vec<Seg> = keys.iter().map(|k| Seg::Key((*k).to_string())).collect();
    position(source, anchor, &focus)
}

/// Where in `source` the path `focus` from the item at `anchor` is, as far as
/// the text has it (see [`key_position`]).
fn position(source: &str, anchor: &Location, focus: &[Seg]) -> (u64, u64) {
    Pos::of(anchor)
        .and_then(|a| Outline::parse(source).and_then(|o| o.descend(a, focus)))
        .map_or((anchor.line(), anchor.column()), |p| (p.line, p.col))
}

/// The errors of an endpoint file's entry (at `anchor` in `source`, the file's text)
/// with its own `health_check`, for `cluster`: the checks and messages of a
/// configured endpoint's, each placed at the key it is about.
pub(crate) fn endpoint_health_check_errors(
    source: &str,
    anchor: &Location,
    cluster: &Cluster,
    address: &str,
    own: &EndpointHealthCheck,
) -> Vec<ConfigError> {
    let issues = endpoint_health_check_issues(anchor, cluster, address, own);
    if issues.is_empty() {
        return Vec::new();
    }
    let outline = Outline::parse(source);
    issues
        .into_iter()
        .map(|i| place(i, outline.as_ref()))
        .collect()
}

/// Moves a validation error from its item to the key it is about.
fn place(issue: Issue, outline: Option<&Outline>) -> ConfigError {
    let mut error = issue.error;
    let Some(outline) = outline else {
        return error;
    };
    let pos = match &issue.anchor {
        Some(anchor) => Pos::of(anchor).and_then(|a| outline.descend(a, &issue.focus)),
        None => outline.descend_from_root(&issue.focus),
    };
    if let Some(pos) = pos {
        error.place(pos);
    }
    error
}

/// Turns a YAML/serde error into a [`ConfigError`] that says, in the file's terms,
/// what is wrong, where, and how to fix it.
fn yaml_error(e: &YamlError, source: &str, outline: Option<&Outline>) -> ConfigError {
    let e = innermost(e);
    let loc = e.location().unwrap_or(Location::UNKNOWN);
    let pos = Pos::of(&loc);
    // The value node at the error, and its key path.
    let node = pos.and_then(|p| outline.and_then(|o| o.node_at(p)));
    let found = node.as_ref().map(|(_, n)| n.describe());
    // An enum written as a mapping (`lb_policy: { x: 1 }`) is reported at its key.
    let path = node.as_ref().map(|(p, _)| p.clone()).or_else(|| {
        pos.and_then(|p| outline.and_then(|o| o.map_of_key_at(p)))
            .map(|(p, _)| p)
    });
    let subject = |what: &str| match &path {
        Some(p) if p.is_root() => "the top level of the file".to_string(),
        Some(p) => format!("`{p}`"),
        None => what.to_string(),
    };
    let mut out = ConfigError::at(&loc, "");
    match e {
        YamlError::SerdeUnknownField {
            field, expected, ..
        } => {
            let owner = pos.and_then(|p| outline.and_then(|o| o.map_of_key_at(p)));
            let place = match &owner {
                Some((p, _)) if !p.is_root() => format!(" in `{p}`"),
                Some(_) => " at the top level".to_string(),
                None => String::new(),
            };
            out.message = format!(
                "unknown key `{field}`{place}; the keys allowed here are: {}",
                expected.join(", ")
            );
            let near = did_you_mean(field, expected.iter().copied())
                .or_else(|| unique_extension(field, expected));
            let value = pos
                .and_then(|p| outline.and_then(|o| o.value_of_key_at(p)))
                .and_then(|n| match &n.kind {
                    Kind::Scalar(s) if !s.is_empty() && !s.contains('\n') => Some(shorten(s)),
                    _ => None,
                });
            let nesting = owner
                .as_ref()
                .and_then(|(p, _)| misplaced(field, p, value.as_deref()));
            out.help = Some(match (nesting, near) {
                (Some(hint), _) => hint,
                (None, Some(near)) => format!("did you mean `{near}`?"),
                (None, None) => {
                    "remove the key or fix its spelling; docs/config.md describes every key"
                        .to_string()
                }
            });
        }
        YamlError::SerdeMissingField { field, .. } => {
            // serde-saphyr reports a missing field at the mapping's last key (or at the
            // mapping itself when it is empty); point at the start of the mapping.
            let owner = pos.and_then(|p| {
                outline.and_then(|o| {
                    o.map_of_key_at(p)
                        .or_else(|| o.node_at(p).filter(|(_, n)| matches!(n.kind, Kind::Map(_))))
                })
            });
            match owner {
                Some((p, map)) => {
                    out.place(map.pos);
                    out.message = if p.is_root() {
                        format!("the required top-level key `{field}` is missing")
                    } else {
                        format!("`{p}` is missing the required key `{field}`")
                    };
                    out.help = Some(missing_help(field, &p));
                }
                None => {
                    out.message = format!("the required key `{field}` is missing");
                    out.help = Some(missing_help(field, &KeyPath::default()));
                }
            }
        }
        YamlError::SerdeUnknownVariant {
            variant, expected, ..
        } => {
            out.message = format!(
                "{} cannot be `{variant}`; the values allowed are: {}",
                subject("the value"),
                expected.join(", ")
            );
            out.help = Some(
                match (
                    mixup(variant, expected),
                    did_you_mean(variant, expected.iter().copied()),
                ) {
                    (Some(hint), _) => hint,
                    (None, Some(near)) => format!("did you mean `{near}`?"),
                    (None, None) => {
                        "use one of the values listed; docs/config.md explains each".to_string()
                    }
                },
            );
        }
        YamlError::InvalidScalar { ty, .. } => {
            let (want, help) = scalar_type(ty);
            let text = node.as_ref().and_then(|(_, n)| match &n.kind {
                Kind::Scalar(s) => Some(s.as_str()),
                _ => None,
            });
            match text.and_then(without_leading_zeros) {
                Some(fixed) if want.starts_with("a whole number") => {
                    out.message = format!(
                        "{} must be {want} without leading zeros, not `{}`",
                        subject("the value"),
                        text.unwrap_or_default()
                    );
                    out.help = Some(format!(
                        "write `{fixed}` (YAML 1.1 reads a leading 0 as octal, so it is refused)"
                    ));
                }
                _ => {
                    out.message = format!(
                        "{} must be {want}, not {}",
                        subject("the value"),
                        found.as_deref().unwrap_or("this")
                    );
                    out.help = help.map(str::to_string);
                }
            }
        }
        YamlError::InvalidBooleanStrict { .. } => {
            out.message = format!(
                "{} must be `true` or `false`, not {}",
                subject("the value"),
                found.as_deref().unwrap_or("this")
            );
            let yaml11 = node.as_ref().is_some_and(|(_, n)| {
                matches!(&n.kind, Kind::Scalar(s) if ["y", "n", "yes", "no", "on", "off"]
                    .iter()
                    .any(|w| s.eq_ignore_ascii_case(w)))
            });
            out.help = Some(if yaml11 {
                "YAML booleans are `true` and `false`; YAML 1.1's `yes`/`no`/`on`/`off` are not \
                 booleans here"
                    .to_string()
            } else {
                "YAML booleans are `true` and `false`".to_string()
            });
        }
        YamlError::NonFiniteFloat { value, .. } => {
            let bare = value.trim().trim_start_matches(['+', '-']);
            if bare.starts_with('.') {
                out.message = format!(
                    "{} must be a finite number, not `{}`",
                    subject("the value"),
                    value.trim()
                );
            } else {
                out.message = format!(
                    "{} is out of range: `{}` is too large a number",
                    subject("the value"),
                    value.trim()
                );
            }
            out.help = Some("docs/config.md gives the range of this key".to_string());
        }
        YamlError::SerdeInvalidType {
            unexpected,
            expected,
            ..
        }
        | YamlError::SerdeInvalidValue {
            unexpected,
            expected,
            ..
        } => {
            let (want, help) = expected_kind(expected);
            let found = found.unwrap_or_else(|| unexpected.clone());
            out.message = format!("{} must be {want}, not {found}", subject("the value"));
            out.help = help;
        }
        YamlError::Unexpected { expected, .. }
            if matches!(*expected, "scalar" | "string scalar" | "value")
                && pos.and_then(|p| bracketed_address(source, p)).is_some() =>
        {
            let (written, quoted) = pos
                .and_then(|p| bracketed_address(source, p))
                .unwrap_or_default();
            // The text does not outline (YAML reads `[::1]:80` as a list, then
            // stumbles on `:80`): outline it with the value quoted.
            let key = path.clone().or_else(|| {
                pos.and_then(|p| {
                    let fixed = requote(source, p, &written, &quoted)?;
                    let outline = Outline::parse(&fixed)?;
                    outline.node_at(p).map(|(k, _)| k)
                })
            });
            let subject = match &key {
                Some(k) if !k.is_root() => format!("`{k}`"),
                _ => "the value".to_string(),
            };
            out.message = format!(
                "{subject} must be a single value, but YAML reads `{written}` as a list: an \
                 IPv6 address in brackets must be quoted"
            );
            out.help = Some(format!("quote it: `{quoted}`"));
        }
        YamlError::Unexpected { expected, .. } => {
            let want = match *expected {
                "mapping start" => "a mapping (`key: value` lines or `{ key: value }`)",
                "sequence start" => "a list (`- item` lines or `[a, b]`)",
                "scalar" | "string scalar" | "value" => "a single value",
                other => other,
            };
            out.message = format!(
                "{} must be {want}, not {}",
                subject("the value"),
                found.as_deref().unwrap_or("this")
            );
            let is_null = node
                .as_ref()
                .is_some_and(|(_, n)| matches!(&n.kind, Kind::Scalar(s) if s.is_empty() || s == "~" || s == "null"));
            out.help = Some(match *expected {
                _ if is_null => {
                    "write its value, or leave the key out to get the default".to_string()
                }
                "mapping start" => "docs/config.md shows the keys this section takes".to_string(),
                "sequence start" => {
                    "write the items as a YAML list, even when there is only one".to_string()
                }
                _ => "docs/config.md shows what this key takes".to_string(),
            });
        }
        YamlError::NullIntoString { .. } => {
            out.message = format!("{} has no value", subject("this key"));
            out.help = Some(
                "write the value after the `:`, or remove the key if it is optional".to_string(),
            );
        }
        YamlError::Message { msg, .. } => {
            // Our own scalar types (names, durations, sizes) explain themselves.
            out.message = match &path {
                Some(p) if !p.is_root() => format!("`{p}`: {msg}"),
                _ => msg.clone(),
            };
        }
        YamlError::DuplicateMappingKey { key, .. } => {
            let owner = pos
                .and_then(|p| outline.and_then(|o| o.map_of_key_at(p)))
                .map(|(p, _)| p);
            let place = match owner {
                Some(p) if !p.is_root() => format!(" in `{p}`"),
                _ => String::new(),
            };
            out.message = match key {
                Some(k) => format!("key `{k}` appears twice{place}"),
                None => format!("a key appears twice{place}"),
            };
            out.help = Some("remove one of them; each key may appear once".to_string());
        }
        YamlError::Eof { .. } if outline.is_none() && is_blank(source) => {
            out = ConfigError::at(&Location::UNKNOWN, "the config file is empty");
            out.help = Some(
                "start with `version: 1`; docs/config.md shows a complete example".to_string(),
            );
        }
        YamlError::Eof { .. } => {
            out.message = "the file ends in the middle of a value".to_string();
            out.help = Some("close every `[`, `{` and quote that was opened".to_string());
        }
        YamlError::MultipleDocuments { .. } => {
            out.message = "the file holds more than one YAML document (`---`)".to_string();
            out.help = Some("keep the whole config in one document".to_string());
        }
        _ => {
            let raw = e.render_with_options(serde_saphyr::render_options! {
                snippets: serde_saphyr::SnippetMode::Off,
            });
            let msg = strip_location_suffix(raw.trim());
            out.help = Some(if msg.contains("tab") {
                "indent with spaces: YAML does not allow tabs for indentation".to_string()
            } else if msg.contains("mapping values are not allowed") {
                "a `key: value` cannot start here: check that this key is indented like the keys \
                 above it, and quote values that contain `: `"
                    .to_string()
            } else {
                "this is not well-formed YAML; check the indentation, quotes and brackets here"
                    .to_string()
            });
            out.message = format!("YAML syntax: {msg}");
        }
    }
    out.message = one_line(out.message);
    out
}

/// The error an alias or snippet wrapper carries.
pub(super) fn innermost(e: &YamlError) -> &YamlError {
    match e {
        YamlError::WithSnippet { error, .. } | YamlError::AliasError { error, .. } => {
            innermost(error)
        }
        other => other,
    }
}

/// An unquoted bracketed IPv6 address at `pos` (`[::1]:8080`, `[::]`): the text as
/// written and quoted as it should be (`"[::1]:8080"`, spaces after the `:` dropped).
/// YAML reads `[::1]` as a flow list, so the value is not the string it looks like.
fn bracketed_address(source: &str, pos: Pos) -> Option<(String, String)> {
    let line = source
        .lines()
        .nth(usize::try_from(pos.line).ok()?.checked_sub(1)?)?;
    let rest: String = line
        .chars()
        .skip(usize::try_from(pos.col).ok()?.checked_sub(1)?)
        .collect();
    let inside = rest.strip_prefix('[')?;
    let close = inside.find(']')?;
    let addr = &inside[..close];
    // Hex digits, `:` and `.`, and a zone after `%` (`fe80::1%eth0`).
    let (ip, _zone) = addr.split_once('%').unwrap_or((addr, ""));
    if !ip.contains(':')
        || !ip
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'))
        || !addr.is_ascii()
    {
        return None;
    }
    let after = &inside[close + 1..];
    let Some(port) = after.strip_prefix(':') else {
        return Some((format!("[{addr}]"), format!("\"[{addr}]:PORT\"")));
    };
    let spaces = port.len() - port.trim_start().len();
    let digits = port[spaces..]
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(port.len() - spaces);
    if digits == 0 {
        return None;
    }
    let port = &port[spaces..spaces + digits];
    let written = &rest[..addr.len() + 3 + spaces + digits];
    Some((written.to_string(), format!("\"[{addr}]:{port}\"")))
}

/// `source` with `written` at `pos` replaced by `quoted`.
fn requote(source: &str, pos: Pos, written: &str, quoted: &str) -> Option<String> {
    let line = usize::try_from(pos.line).ok()?.checked_sub(1)?;
    let col = usize::try_from(pos.col).ok()?.checked_sub(1)?;
    let mut out = String::with_capacity(source.len() + 2);
    for (i, text) in source.split_inclusive('\n').enumerate() {
        if i == line {
            let start = text.char_indices().nth(col).map(|(b, _)| b)?;
            let end = start + written.len();
            out.push_str(text.get(..start)?);
            out.push_str(quoted);
            out.push_str(text.get(end..)?);
        } else {
            out.push_str(text);
        }
    }
    Some(out)
}

/// `010` → `10`: an integer written with leading zeros, without them; `None` for
/// anything else.
fn without_leading_zeros(text: &str) -> Option<String> {
    let t = text.trim();
    let digits = t.strip_prefix('+').unwrap_or(t);
    if digits.len() < 2 || !digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let kept = digits.trim_start_matches('0');
    Some(if kept.is_empty() { "0" } else { kept }.to_string())
}

/// The keys of a section (a struct of the schema), as serde lists them for an
/// unknown key.
fn keys_of<T: serde::de::DeserializeOwned>() -> Vec<&'static str> {
    match serde_saphyr::from_str::<T>("__probe__: 1") {
        Err(e) => match innermost(&e) {
            YamlError::SerdeUnknownField { expected, .. } => expected.clone(),
            _ => Vec::new(),
        },
        Ok(_) => Vec::new(),
    }
}

/// The sections whose keys people put one level off: where each is in the file (its
/// key path without list indices) and its keys.
fn sections() -> Vec<(&'static str, Vec<&'static str>)> {
    use super::{
        AccessLog, AdaptiveConcurrency, Admin, Capabilities, CircuitBreakers, ClientAuth,
        DirectResponse, Discovery, HashOn, HealthCheck, HttpHealthCheck, HttpListener, KvConfig,
        Limits, Listener, ListenerTls, Mirror, OutlierDetection, Plugin, PluginLimits, Redirect,
        RetryPolicy, Rewrite, Route, RouteMatch, RouteTable, SanMatch, TcpHealthCheck, TcpProxy,
        UpstreamTls, VirtualHost, ZoneAware,
    };
    vec![
        ("", keys_of::<Config>()),
        ("admin", keys_of::<Admin>()),
        ("access_log", keys_of::<AccessLog>()),
        ("listeners", keys_of::<Listener>()),
        ("listeners.access_log", keys_of::<AccessLog>()),
        ("listeners.http", keys_of::<HttpListener>()),
        ("listeners.tcp", keys_of::<TcpProxy>()),
        ("listeners.tls", keys_of::<ListenerTls>()),
        ("listeners.tls.client_auth", keys_of::<ClientAuth>()),
        ("listeners.limits", keys_of::<Limits>()),
        ("plugins", keys_of::<Plugin>()),
        ("plugins.limits", keys_of::<PluginLimits>()),
        ("plugins.capabilities", keys_of::<Capabilities>()),
        ("routes", keys_of::<RouteTable>()),
        ("routes.virtual_hosts", keys_of::<VirtualHost>()),
        ("routes.virtual_hosts.routes", keys_of::<Route>()),
        ("routes.virtual_hosts.routes.match", keys_of::<RouteMatch>()),
        (
            "routes.virtual_hosts.routes.redirect",
            keys_of::<Redirect>(),
        ),
        (
            "routes.virtual_hosts.routes.direct_response",
            keys_of::<DirectResponse>(),
        ),
        ("routes.virtual_hosts.routes.rewrite", keys_of::<Rewrite>()),
        (
            "routes.virtual_hosts.routes.retry",
            keys_of::<RetryPolicy>(),
        ),
        ("routes.virtual_hosts.routes.mirror", keys_of::<Mirror>()),
        ("clusters", keys_of::<Cluster>()),
        ("clusters.tls", keys_of::<UpstreamTls>()),
        (
            "clusters.tls.match_subject_alt_names",
            keys_of::<SanMatch>(),
        ),
        ("clusters.health_check", keys_of::<HealthCheck>()),
        ("clusters.health_check.http", keys_of::<HttpHealthCheck>()),
        ("clusters.health_check.tcp", keys_of::<TcpHealthCheck>()),
        ("clusters.outlier_detection", keys_of::<OutlierDetection>()),
        ("clusters.circuit_breakers", keys_of::<CircuitBreakers>()),
        ("clusters.discovery", keys_of::<Discovery>()),
        ("clusters.hash_on", keys_of::<HashOn>()),
        (
            "clusters.adaptive_concurrency",
            keys_of::<AdaptiveConcurrency>(),
        ),
        ("clusters.zone_aware", keys_of::<ZoneAware>()),
        ("kv", keys_of::<KvConfig>()),
    ]
}

/// A hint for an unknown key `field` of the mapping at `owner` that is a key one
/// level off: of a section inside it (`prefix` on a route belongs under `match:`;
/// `routes` on a listener under `http:`, when `http:` was left empty above it), or of
/// the section around it. `value` is the key's value, for the example.
fn misplaced(field: &str, owner: &KeyPath, value: Option<&str>) -> Option<String> {
    let pattern = owner.pattern();
    let sections = sections();
    let keys = |pat: &str| sections.iter().find(|(p, _)| *p == pat).map(|(_, k)| k);
    // A section inside this one.
    let prefix = if pattern.is_empty() {
        String::new()
    } else {
        format!("{pattern}.")
    };
    let child = keys(&pattern).and_then(|own| {
        own.iter()
            .find(|k| keys(&format!("{prefix}{k}")).is_some_and(|ks| ks.contains(&field)))
    });
    if let Some(child) = child {
        return Some(format!(
            "`{field}` is a key of `{child}`, not of {}: write it under `{child}:` \
             (`{child}: {{ {field}: {} }}`)",
            place_name(owner),
            value.unwrap_or("...")
        ));
    }
    // The section around this one.
    let (outer, inner) = pattern.rsplit_once('.').unwrap_or(("", pattern.as_str()));
    if inner.is_empty() || !keys(outer)?.contains(&field) {
        return None;
    }
    let outer_name = owner.parent_section();
    Some(format!(
        "`{field}` is a key of {}, not of `{inner}`: move it out of `{inner}:`, indented like \
         `{inner}` itself",
        place_name(&outer_name)
    ))
}

/// `` `listeners[0]` `` or `the top level`.
fn place_name(path: &KeyPath) -> String {
    if path.is_root() {
        "the top level".to_string()
    } else {
        format!("`{path}`")
    }
}

/// How a person writes a value of a Rust scalar type, and a hint.
fn scalar_type(ty: &str) -> (String, Option<&'static str>) {
    let max = match ty {
        "u8" => Some(u64::from(u8::MAX)),
        "u16" => Some(u64::from(u16::MAX)),
        "u32" => Some(u64::from(u32::MAX)),
        "u64" | "usize" => Some(u64::MAX),
        _ => None,
    };
    match (ty, max) {
        (_, Some(max)) => (
            format!("a whole number from 0 to {max}"),
            Some("write digits only, without quotes, units or a sign"),
        ),
        ("bool" | "boolean", _) => (
            "`true` or `false`".to_string(),
            Some("YAML booleans are `true` and `false`"),
        ),
        ("f32" | "f64", _) => ("a number".to_string(), None),
        (other, _) => (format!("a valid {other}"), None),
    }
}

/// Values people write for an enum that edit distance would misread (`http2` is one
/// letter from `http1`, but means `h2`).
fn mixup(variant: &str, expected: &[&str]) -> Option<String> {
    let v = variant.to_ascii_lowercase();
    if expected.contains(&"h2") {
        if matches!(v.as_str(), "http2" | "http/2" | "http_2" | "h2c" | "grpc") {
            return Some("HTTP/2 is `h2` (cleartext h2c when the cluster has no `tls`)".into());
        }
        if matches!(
            v.as_str(),
            "http" | "http/1.1" | "http1.1" | "http11" | "h1"
        ) {
            return Some("HTTP/1.1 is `http1`".into());
        }
    }
    if expected.contains(&"1.2") {
        let bare = v.trim_start_matches(|c: char| c.is_ascii_alphabetic() || c == ' ');
        if matches!(bare, "1" | "1.0" | "1.1") {
            return Some(
                "TLS 1.0 and 1.1 are deprecated (RFC 8996) and not offered; the lowest is `1.2`"
                    .into(),
            );
        }
        if bare != v && expected.contains(&bare) {
            return Some(format!("write the version number alone: `\"{bare}\"`"));
        }
    }
    None
}

/// The only allowed key that starts with what was written (`lb` → `lb_policy`):
/// abbreviations are too far from the full key for edit distance to find them.
fn unique_extension<'a>(field: &str, expected: &[&'a str]) -> Option<&'a str> {
    let mut hits = expected
        .iter()
        .filter(|k| k.starts_with(field) && k.len() > field.len());
    match (hits.next(), hits.next()) {
        (Some(k), None) if field.len() >= 2 => Some(k),
        _ => None,
    }
}

fn is_blank(source: &str) -> bool {
    source
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
}

/// serde's "expected" phrase in the file's terms, and a hint.
fn expected_kind(expected: &str) -> (String, Option<String>) {
    if expected.starts_with("struct ") {
        return (
            "a mapping (`key: value` lines or `{ key: value }`)".into(),
            Some("docs/config.md shows the keys this section takes".into()),
        );
    }
    match expected {
        "a sequence" => (
            "a list (`- item` lines or `[a, b]`)".into(),
            Some("write the items as a YAML list, even when there is only one".into()),
        ),
        "a map" => (
            "a mapping of names to values".into(),
            Some("write it like `{ x-env: prod }`".into()),
        ),
        "a string" => (
            "a string".into(),
            Some("quote the value if YAML reads it as something else".into()),
        ),
        "a boolean" => ("`true` or `false`".into(), None),
        other => {
            let (want, help) = scalar_type(other);
            if want.starts_with("a valid ") {
                (other.to_string(), None)
            } else {
                (want, help.map(str::to_string))
            }
        }
    }
}

/// How to add a missing key; keys whose value has an obvious shape get an example.
fn missing_help(field: &str, path: &KeyPath) -> String {
    let example = match (field, path.last_key()) {
        ("version", _) => "version: 1",
        ("routes", Some("http")) => "routes: TABLE_NAME",
        ("cluster", _) => "cluster: CLUSTER_NAME",
        ("address", _) if path.to_string().starts_with("listeners") => "address: 0.0.0.0:8080",
        ("address", _) => "address: HOST:PORT",
        ("domains", _) => "domains: [\"*\"]",
        ("certificates", _) => "certificates: [{ cert: FILE, key: FILE }]",
        ("retry_on", _) => "retry_on: [5xx, connect-failure]",
        ("status", _) => "status: 404",
        _ => "",
    };
    if example.is_empty() {
        format!("add `{field}:` here; docs/config.md lists the required keys of each section")
    } else {
        format!("add `{example}` here; docs/config.md lists the required keys of each section")
    }
}

/// serde-saphyr appends ` at line N column M`; we print the place in front instead.
fn strip_location_suffix(msg: &str) -> String {
    let msg = match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains("column") => &msg[..i],
        _ => msg,
    };
    shorten_message(msg.trim_end_matches(['.', ' ']))
}

/// Parser messages can quote input; keep them on one line.
fn shorten_message(msg: &str) -> String {
    if msg.contains('\n') {
        shorten(msg)
    } else {
        msg.to_string()
    }
}

impl Config {
    /// Makes file paths in the config absolute relative to `base`.
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for l in &mut self.listeners {
            if let Some(tls) = &mut l.value.tls {
                for c in &mut tls.certificates {
                    fix(&mut c.value.cert);
                    fix(&mut c.value.key);
                    for p in [&mut c.value.key_password_file, &mut c.value.ocsp_staple]
                        .into_iter()
                        .flatten()
                    {
                        fix(p);
                    }
                }
                for key in &mut tls.session_ticket_keys {
                    fix(key);
                }
                if let Some(auth) = &mut tls.client_auth {
                    fix(&mut auth.ca);
                    if let Some(crl) = &mut auth.crl {
                        fix(crl);
                    }
                }
            }
        }
        for c in &mut self.clusters {
            if let Some(tls) = &mut c.value.tls {
                for p in [
                    &mut tls.ca,
                    &mut tls.client_cert,
                    &mut tls.client_key,
                    &mut tls.key_password_file,
                    &mut tls.crl,
                ]
                .into_iter()
                .flatten()
                {
                    fix(p);
                }
            }
            if let Some(p) = &mut c.value.discovery.path {
                fix(p);
            }
        }
        for p in &mut self.plugins {
            // `native:NAME` and `builtin:NAME` are compiled into the host, not files.
            if p.value.module_file().is_some() {
                fix(&mut p.value.module);
            }
            for f in p.value.files.values_mut() {
                fix(f);
            }
        }
        if let Some(tls) = &mut self.kv.tls {
            let tls = &mut tls.value;
            for p in [
                &mut tls.ca,
                &mut tls.client_cert,
                &mut tls.client_key,
                &mut tls.key_password_file,
            ]
            .into_iter()
            .flatten()
            {
                fix(p);
            }
        }
        let listener_logs = self
            .listeners
            .iter_mut()
            .filter_map(|l| l.value.access_log.as_mut());
        for logs in self.access_log.as_mut().into_iter().chain(listener_logs) {
            for log in logs.logs_mut() {
                if !matches!(log.path.as_str(), "stdout" | "stderr")
                    && Path::new(&log.path).is_relative()
                {
                    log.path = base.join(&log.path).display().to_string();
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn messages_escape_control_characters() {
        assert_eq!(
            one_line("content_type `text/plain\nx`".into()),
            "content_type `text/plain\\nx`"
        );
        assert_eq!(one_line("a\tb\u{1b}[31m".into()), "a\\tb\\u{1b}[31m");
        assert_eq!(one_line("plain `é`".into()), "plain `é`");
        let e = ConfigError::at(&Location::UNKNOWN, "bad `x\ny`");
        assert_eq!(e.message, "bad `x\\ny`");
    }

    const WITH_PATHS: &str = "\
version: 1
access_log: { path: logs/access.log }
listeners:
  - name: web
    address: 0.0.0.0:8443
    http: { routes: main }
    tls:
      certificates:
        - { cert: certs/web.pem, key: /abs/web.key }
      client_auth: { ca: ../shared/ca.pem }
routes:
  - name: main
    virtual_hosts: [{ name: all, domains: [\"*\"], routes: [{ cluster: app }] }]
clusters:
  - name: app
    endpoints: [{ address: \"10.0.0.1:443\" }]
    tls: { ca: ca.pem, client_cert: /abs/client.pem, client_key: client.key }
";

    #[test]
    fn relative_paths_are_resolved_against_the_base() {
        let c = parse_str("x.yaml", WITH_PATHS, Path::new("/etc/legate")).unwrap();
        assert_eq!(
            c.access_log.unwrap().logs()[0].path,
            "/etc/legate/logs/access.log"
        );
        let tls = c.listeners[0].value.tls.as_ref().unwrap();
        let cert = &tls.certificates[0].value;
        assert_eq!(cert.cert, Path::new("/etc/legate/certs/web.pem"));
        assert_eq!(cert.key, Path::new("/abs/web.key"), "absolute paths stay");
        assert_eq!(
            tls.client_auth.as_ref().unwrap().ca,
            Path::new("/etc/legate/../shared/ca.pem")
        );
        let up = c.clusters[0].value.tls.as_ref().unwrap();
        assert_eq!(up.ca.as_deref(), Some(Path::new("/etc/legate/ca.pem")));
        assert_eq!(
            up.client_cert.as_deref(),
            Some(Path::new("/abs/client.pem"))
        );
        assert_eq!(
            up.client_key.as_deref(),
            Some(Path::new("/etc/legate/client.key"))
        );
    }

    #[test]
    fn standard_streams_are_not_paths() {
        for stream in ["stdout", "stderr"] {
            let src = WITH_PATHS.replace("logs/access.log", stream);
            let c = parse_str("x.yaml", &src, Path::new("/etc/legate")).unwrap();
            assert_eq!(c.access_log.unwrap().logs()[0].path, stream);
        }
    }

    #[test]
    fn load_file_resolves_against_the_file_directory() {
        let dir = std::env::temp_dir().join(format!("legate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("plugins.yaml");
        std::fs::write(&file, WITH_PATHS).unwrap();
        let c = load_file(&file);
        std::fs::remove_dir_all(&dir).unwrap();
        let c = c.unwrap();
        let cert = &c.listeners[0].value.tls.as_ref().unwrap().certificates[0].value;
        assert_eq!(cert.cert, dir.join("certs/web.pem"));
    }

    #[test]
    fn unreadable_file_is_one_unlocated_error() {
        let e = load_file(Path::new("/nonexistent/legate/plugins.yaml")).unwrap_err();
        assert_eq!(e.errors.len(), 1);
        assert_eq!((e.errors[0].line, e.errors[0].col), (0, 0));
        let text = e.to_string();
        assert!(
            text.starts_with(
                "/nonexistent/legate/plugins.yaml: error: cannot read the config file"
            ),
            "{text}"
        );
        assert!(
            text.contains("help: check the path given with -c/--config"),
            "{text}"
        );
    }

    const TWO_ISSUES: &str = "\
version: 1
clusters:
  - name: a
    lb_policy: ring_hash
    endpoints: [{ address: \"10.0.0.1:80\" }]
  - name: b
    hash_on: { cookie: s }
    endpoints: [{ address: \"10.0.0.2:80\" }]
";

    #[test]
    fn validation_errors_point_at_the_offending_key() {
        let e = parse_str("x.yaml", TWO_ISSUES, Path::new(".")).unwrap_err();
        let at: Vec<(u64, u64)> = e.errors.iter().map(|e| (e.line, e.col)).collect();
        // `lb_policy` of `a`, `hash_on` of `b`: not the clusters' first lines.
        assert_eq!(at, [(4, 5), (7, 5)]);
        let text = e.to_string();
        assert!(text.ends_with("2 errors in x.yaml"), "{text}");
        assert!(
            text.contains("7 |     hash_on: { cookie: s }\n  |     ^\n"),
            "{text}"
        );
    }

    #[test]
    fn validate_without_text_locates_errors_at_their_item() {
        let c: Config = serde_saphyr::from_str(TWO_ISSUES).unwrap();
        let at: Vec<(u64, u64)> = c.validate().iter().map(|e| (e.line, e.col)).collect();
        assert_eq!(at, [(3, 5), (6, 5)]);
    }

    #[test]
    fn caret_keeps_tabs_so_it_lines_up() {
        let errors = ConfigErrors {
            file: "f.yaml".into(),
            source: "a:\n\tb: [x y]\n".into(),
            errors: vec![ConfigError {
                line: 2,
                col: 6,
                message: "m".into(),
                help: None,
            }],
        };
        assert_eq!(
            errors.to_string(),
            "f.yaml:2:6: error: m\n  |\n2 | \tb: [x y]\n  | \t    ^\n"
        );
    }

    #[test]
    fn quoted_lines_mask_url_credentials() {
        let errors = ConfigErrors {
            file: "f.yaml".into(),
            source: "kv:\n  url: redis://:Sup3rS3cret@127.0.0.1:21280/x\n".into(),
            errors: vec![ConfigError {
                line: 2,
                col: 3,
                message: "m".into(),
                help: None,
            }],
        };
        let text = errors.to_string();
        assert!(!text.contains("Sup3rS3cret"), "{text}");
        assert!(
            text.contains("2 |   url: redis://***@127.0.0.1:21280/x\n"),
            "{text}"
        );
        for (line, masked) in [
            (
                "url: \"rediss://app:pw@h:6380/0\" # x://y",
                "url: \"rediss://***@h:6380/0\" # x://y",
            ),
            (
                "{ url: redis+unix:///run/r.sock?db=0&pass=pw&user=u }",
                "{ url: redis+unix:///run/r.sock?db=0&pass=***&user=*** }",
            ),
            (
                "to: https://example.com/a@b?x=1",
                "to: https://example.com/a@b?x=1",
            ),
            ("plain: no url here", "plain: no url here"),
        ] {
            assert_eq!(mask_credentials(line), masked);
        }
    }

    #[test]
    fn abbreviated_keys_are_completed_when_unambiguous() {
        let keys = ["lb_policy", "hash_on", "idle_timeout", "ignore"];
        assert_eq!(unique_extension("lb", &keys), Some("lb_policy"));
        assert_eq!(unique_extension("i", &keys), None, "too short");
        assert_eq!(unique_extension("ig", &keys), Some("ignore"));
        assert_eq!(
            unique_extension("idle_timeout", &keys),
            None,
            "not an extension"
        );
        let keys = ["max_idle", "max_conn"];
        assert_eq!(unique_extension("max", &keys), None, "ambiguous");
    }

    /// The first error of `src` rendered: `message` and `help`.
    fn first_error(src: &str) -> (String, String) {
        let e = parse_str("x.yaml", src, Path::new(".")).unwrap_err();
        let first = e.errors[0].clone();
        (first.message, first.help.unwrap_or_default())
    }

    const PLUGIN: &str = "\
version: 1
plugins:
  - name: auth
    module: auth.wasm
    config: { realm: NO, on: yes, flag: true }
listeners:
  - name: web
    address: 0.0.0.0:8080
    http: { routes: main }
routes:
  - name: main
    virtual_hosts: [{ name: all, domains: [\"*\"], routes: [{ cluster: app }] }]
clusters:
  - name: app
    endpoints: [{ address: \"10.0.0.1:80\" }]
";

    #[test]
    fn proxy_wasm_start_cpu_defaults_to_1s_and_is_bounded() {
        let with = |d: &str| {
            PLUGIN.replace(
                "    config: { realm: NO, on: yes, flag: true }\n",
                &format!("    proxy_wasm: {{ {d} }}\n"),
            )
        };
        let start = |src: &str| {
            let c = parse_str("x.yaml", src, Path::new(".")).unwrap();
            c.plugins[0].value.proxy_wasm.as_ref().unwrap().start_cpu()
        };
        assert_eq!(start(&with("")), std::time::Duration::from_secs(1));
        assert_eq!(
            start(&with("start_cpu: 60s")),
            std::time::Duration::from_secs(60)
        );
        let (message, help) = first_error(&with("start_cpu: 61s"));
        assert_eq!(
            message,
            "plugin `auth`: `proxy_wasm.start_cpu` 61s is out of range"
        );
        assert_eq!(help, "use between `1ms` and `60s`");
    }

    #[test]
    fn booleans_are_yaml_1_2() {
        let c = parse_str("x.yaml", PLUGIN, Path::new(".")).unwrap();
        let config = c.plugins[0].value.config.as_ref().unwrap();
        assert_eq!(config["realm"], serde_json::json!("NO"));
        assert_eq!(config["on"], serde_json::json!("yes"));
        assert_eq!(config["flag"], serde_json::json!(true));
        for word in ["no", "yes", "off", "on", "n", "y", "No"] {
            let src = PLUGIN.replace(
                "http: { routes: main }",
                &format!("http: {{ routes: main, generate_request_id: {word} }}"),
            );
            let (message, help) = first_error(&src);
            assert_eq!(
                message,
                format!(
                    "`listeners[0].http.generate_request_id` must be `true` or `false`, not `{word}`"
                )
            );
            assert!(help.contains("YAML 1.1"), "{help}");
        }
        let src = PLUGIN.replace(
            "http: { routes: main }",
            "http: { routes: main, generate_request_id: False }",
        );
        assert!(parse_str("x.yaml", &src, Path::new(".")).is_ok());
    }

    #[test]
    fn unquoted_ipv6_addresses_are_named_and_quoted() {
        for (written, quoted) in [
            ("[::1]:22300", "\"[::1]:22300\""),
            ("[::]:8443", "\"[::]:8443\""),
            ("[fe80::1%eth0]: 80", "\"[fe80::1%eth0]:80\""),
        ] {
            let src = PLUGIN.replace("0.0.0.0:8080", written);
            let (message, help) = first_error(&src);
            assert!(
                message.starts_with("`listeners[0].address` must be a single value"),
                "{message}"
            );
            assert!(message.contains("must be quoted"), "{message}");
            assert_eq!(help, format!("quote it: `{quoted}`"));
        }
        let src = PLUGIN.replace("\"10.0.0.1:80\"", "[::1]:80");
        let (message, help) = first_error(&src);
        assert!(
            message.starts_with("`clusters[0].endpoints[0].address`"),
            "{message}"
        );
        assert_eq!(help, "quote it: `\"[::1]:80\"`");
        let src = PLUGIN.replace("0.0.0.0:8080", "[::1]");
        let (message, help) = first_error(&src);
        assert!(
            message.starts_with("`listeners[0].address` must be a single value"),
            "{message}"
        );
        assert_eq!(help, "quote it: `\"[::1]:PORT\"`");
        // Not an address: no IPv6 hint.
        assert_eq!(
            bracketed_address("a: [x, y]:1", Pos { line: 1, col: 4 }),
            None
        );
    }

    #[test]
    fn keys_one_level_off_name_their_section() {
        let route = |extra: &str| {
            PLUGIN.replace(
                "routes: [{ cluster: app }]",
                &format!("routes: [{{ cluster: app, {extra} }}]"),
            )
        };
        let (_, help) = first_error(&route("prefix: /api"));
        assert_eq!(
            help,
            "`prefix` is a key of `match`, not of `routes[0].virtual_hosts[0].routes[0]`: \
             write it under `match:` (`match: { prefix: /api }`)"
        );
        let (_, help) = first_error(&route("retry_on: [5xx]"));
        assert!(
            help.starts_with("`retry_on` is a key of `retry`, not of")
                && help.ends_with("write it under `retry:` (`retry: { retry_on: ... }`)"),
            "{help}"
        );
        let src = PLUGIN.replace("http: { routes: main }", "http:\n    routes: main");
        let (message, help) = first_error(&src);
        assert!(
            message.starts_with("unknown key `routes` in `listeners[0]`"),
            "{message}"
        );
        assert_eq!(
            help,
            "`routes` is a key of `http`, not of `listeners[0]`: write it under `http:` \
             (`http: { routes: main }`)"
        );
        // A listener key inside `http`.
        let src = PLUGIN.replace(
            "http: { routes: main }",
            "http: { routes: main, address: x }",
        );
        let (_, help) = first_error(&src);
        assert_eq!(
            help,
            "`address` is a key of `listeners[0]`, not of `http`: move it out of `http:`, \
             indented like `http` itself"
        );
    }

    #[test]
    fn number_messages_say_what_is_wrong() {
        let (message, help) = first_error(&PLUGIN.replace("version: 1", "version: 010"));
        assert_eq!(
            message,
            "`version` must be a whole number from 0 to 4294967295 without leading zeros, \
             not `010`"
        );
        assert!(help.starts_with("write `10`"), "{help}");
        let src = PLUGIN.replace("- name: app\n", "- name: app\n    panic_threshold: 1e400\n");
        let (message, help) = first_error(&src);
        assert_eq!(
            message,
            "`clusters[0].panic_threshold` is out of range: `1e400` is too large a number"
        );
        assert!(!help.contains("YAML"), "{help}");
        assert_eq!(without_leading_zeros("000"), Some("0".into()));
        assert_eq!(without_leading_zeros("0"), None);
        assert_eq!(without_leading_zeros("0x10"), None);
    }

    #[test]
    fn sizes_are_reported_at_their_key() {
        for (line, key, text) in [
            (
                "limits: { max_request_headers_size: 99999999999999999999 }",
                "listeners[0].limits.max_request_headers_size",
                "too large",
            ),
            (
                "limits: { max_request_headers_size: 1.5e3 }",
                "listeners[0].limits.max_request_headers_size",
                "digits only: `1500`",
            ),
        ] {
            let src = PLUGIN.replace(
                "http: { routes: main }",
                &format!("http: {{ routes: main }}\n    {line}"),
            );
            let e = parse_str("x.yaml", &src, Path::new(".")).unwrap_err();
            let first = &e.errors[0];
            assert!(
                first.message.starts_with(&format!("`{key}`: size"))
                    && first.message.contains(text),
                "{}",
                first.message
            );
            // At the value, not at the key or the section.
            assert_eq!((first.line, first.col), (10, 41));
        }
    }

    #[test]
    fn every_section_of_the_hint_table_has_keys() {
        for (pattern, keys) in sections() {
            assert!(!keys.is_empty(), "{pattern}");
        }
    }

    #[test]
    fn enum_mixups_get_a_specific_hint() {
        let h2 = ["http1", "h2", "auto"];
        assert!(mixup("HTTP2", &h2).unwrap().contains("`h2`"));
        assert!(mixup("http", &h2).unwrap().contains("`http1`"));
        assert_eq!(mixup("h3", &h2), None);
        let tls = ["1.2", "1.3"];
        assert!(mixup("1.1", &tls).unwrap().contains("RFC 8996"));
        assert!(mixup("TLSv1.3", &tls).unwrap().contains("`\"1.3\"`"));
        assert_eq!(mixup("2.0", &tls), None);
    }
}
