//! The access log: one JSON object per line per request, to stdout, stderr or a file.
//!
//! Lines are written whole under a lock so workers never interleave them; the file
//! is opened for append, so logrotate's `copytruncate` works.

use std::fs::{File, OpenOptions};
use std::io::{self, LineWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};

use anyhow::Context as _;

enum Sink {
    Stdout,
    Stderr,
    File(Mutex<LineWriter<File>>),
}

/// Where access-log lines go.
pub struct AccessLog {
    sink: Sink,
    /// A write failed and none succeeded since: the failure was reported once
    /// (a full disk would otherwise log a warning per request).
    failing: AtomicBool,
}

impl AccessLog {
    /// Opens `stdout`, `stderr` or a file path for appending.
    pub fn open(path: &str) -> anyhow::Result<Self> {
        let sink = match path {
            "stdout" => Sink::Stdout,
            "stderr" => Sink::Stderr,
            p => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("cannot open access log `{p}`"))?;
                Sink::File(Mutex::new(LineWriter::new(f)))
            }
        };
        Ok(AccessLog {
            sink,
            failing: AtomicBool::new(false),
        })
    }

    /// Writes one line. A failing log never fails a request; it is reported once in
    /// the process log when writes start failing, and again when they recover.
    pub fn write(&self, entry: &serde_json::Value) {
        let mut line = entry.to_string();
        line.push('\n');
        let res = match &self.sink {
            Sink::Stdout => io::stdout().lock().write_all(line.as_bytes()),
            Sink::Stderr => io::stderr().lock().write_all(line.as_bytes()),
            Sink::File(f) => f
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write_all(line.as_bytes()),
        };
        match res {
            Err(e) if !self.failing.swap(true, Relaxed) => tracing::warn!(
                "access log write failed: {e}; lines are lost until writes succeed again \
                 (reported once)"
            ),
            Err(_) => {}
            Ok(()) if self.failing.load(Relaxed) && self.failing.swap(false, Relaxed) => {
                tracing::warn!("access log writes succeed again");
            }
            Ok(()) => {}
        }
    }
}
