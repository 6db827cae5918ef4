//! Reading a config file: YAML parsing, then [`Config::validate`], with every error
//! rendered as `file:line:col: error: what` + the offending line + `help: how to fix`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_saphyr::Location;

use super::Config;

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
    /// An error at `loc` (unknown locations render without line:col).
    pub fn at(loc: &Location, message: impl Into<String>) -> Self {
        ConfigError {
            line: loc.line(),
            col: loc.column(),
            message: message.into(),
            help: None,
        }
    }

    /// Adds the fix.
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
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
            if e.line == 0 {
                writeln!(f, "{}: error: {}", self.file, e.message)?;
            } else {
                writeln!(f, "{}:{}:{}: error: {}", self.file, e.line, e.col, e.message)?;
                if let Some(text) = self.source.lines().nth((e.line - 1) as usize) {
                    let gutter = e.line.to_string().len();
                    writeln!(f, "{:gutter$} |", "")?;
                    writeln!(f, "{} | {}", e.line, text)?;
                    let pad = (e.col.max(1) - 1) as usize;
                    writeln!(f, "{:gutter$} | {:pad$}^", "", "")?;
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

/// Reads, parses and validates a config file. Relative paths in the config (certs,
/// log files) are resolved against the file's directory.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
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
    parse_str(&file, &source, &base)
}

/// Parses and validates config text. `file` is only used in messages; `base` is the
/// directory relative paths are resolved against.
pub fn parse_str(file: &str, source: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        file: file.to_string(),
        source: source.to_string(),
        errors,
    };
    let mut config: Config = serde_saphyr::from_str(source).map_err(|e| fail(vec![yaml_error(&e)]))?;
    let mut errors = config.validate();
    errors.sort_by_key(|e| (e.line, e.col));
    if !errors.is_empty() {
        return Err(fail(errors));
    }
    config.resolve_paths(base);
    Ok(config)
}

/// Turns a YAML/serde error into a [`ConfigError`] with a hint for the common cases.
fn yaml_error(e: &serde_saphyr::Error) -> ConfigError {
    let loc = e.location().unwrap_or(Location::UNKNOWN);
    let raw = e
        .without_snippet()
        .render_with_options(serde_saphyr::render_options! {
            snippets: serde_saphyr::SnippetMode::Off,
        });
    let message = strip_location_suffix(raw.trim());
    let help = if message.contains("unknown field") {
        Some(
            "remove the key or fix its spelling; the keys allowed here are listed in the message \
             and in docs/config.md"
                .to_string(),
        )
    } else if message.contains("missing field") {
        Some("add the field; docs/config.md lists what each section needs".to_string())
    } else if message.contains("unknown variant") {
        Some("use one of the values listed in the message".to_string())
    } else {
        None
    };
    ConfigError {
        line: loc.line(),
        col: loc.column(),
        message,
        help,
    }
}

/// serde-saphyr appends ` at line N column M`; we print the place in front instead.
fn strip_location_suffix(msg: &str) -> String {
    let msg = match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains("column") => &msg[..i],
        _ => msg,
    };
    msg.trim_end_matches(['.', ' ']).to_string()
}

impl Config {
    /// Makes file paths in the config absolute relative to `base`.
    fn resolve_paths(&mut self, base: &Path) {
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
                }
                if let Some(ca) = &mut tls.client_auth {
                    fix(&mut ca.ca);
                }
            }
        }
        for c in &mut self.clusters {
            if let Some(tls) = &mut c.value.tls {
                for p in [&mut tls.ca, &mut tls.client_cert, &mut tls.client_key]
                    .into_iter()
                    .flatten()
                {
                    fix(p);
                }
            }
        }
        if let Some(log) = &mut self.access_log {
            if !matches!(log.path.as_str(), "stdout" | "stderr") && Path::new(&log.path).is_relative()
            {
                log.path = base.join(&log.path).display().to_string();
            }
        }
    }
}
