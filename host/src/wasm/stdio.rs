//! A component guest's WASI stdout and stderr, as host log lines: stdout at
//! `info`, stderr at `error`, each with the plugin's name, as Envoy does for Wasm
//! filters (and as this host does for proxy-wasm modules). So a `println!` while
//! debugging, and a Rust guest's panic message (written to stderr before the
//! trap), reach the operator instead of being discarded.
//!
//! Output is split into lines; a line longer than [`MAX_LINE`] is logged in
//! pieces, and a partial line is logged when the instance is dropped (not on
//! flush: WASI stdio flushes after every write, and Rust's `eprintln!` writes
//! one line in several).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use legate_abi_rules::log::one_line;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// The longest line logged as one (as the `log` host call's cap).
pub const MAX_LINE: usize = 4096;

/// Which standard stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// stdout: logged at `info`.
    Stdout,
    /// stderr: logged at `error`.
    Stderr,
}

/// A guest's stdout or stderr (give it to `WasiCtxBuilder::stdout`/`stderr`).
/// The guest may open a new handle for every write (Rust's unbuffered stderr
/// does), so the partial line is kept here, shared by the handles.
#[derive(Clone)]
pub struct GuestOutput(Arc<Shared>);

struct Shared {
    plugin: Arc<str>,
    which: Which,
    partial: Mutex<Vec<u8>>,
    /// The length of each line logged, for the tests.
    #[cfg(test)]
    emitted: Mutex<Vec<usize>>,
}

impl GuestOutput {
    /// Output of plugin `plugin` on `which`.
    pub fn new(plugin: Arc<str>, which: Which) -> Self {
        GuestOutput(Arc::new(Shared {
            plugin,
            which,
            partial: Mutex::new(Vec::new()),
            #[cfg(test)]
            emitted: Mutex::default(),
        }))
    }

    fn lines(&self) -> Lines {
        Lines(self.0.clone())
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.lines())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.lines())
    }
}

impl Shared {
    fn push(&self, mut data: &[u8]) {
        let mut partial = self.partial.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            partial.extend_from_slice(&data[..nl]);
            self.emit_long(&mut partial);
            self.emit(&mut partial);
            data = &data[nl + 1..];
        }
        partial.extend_from_slice(data);
        self.emit_long(&mut partial);
    }

    /// Logs `MAX_LINE`-byte pieces of `partial` while it is longer, keeping
    /// the rest: no logged line is longer (a write ending in a newline too).
    fn emit_long(&self, partial: &mut Vec<u8>) {
        while partial.len() > MAX_LINE {
            let rest = partial.split_off(MAX_LINE);
            self.emit(partial);
            *partial = rest;
        }
    }

    fn flush(&self) {
        let mut partial = self.partial.lock().unwrap_or_else(PoisonError::into_inner);
        self.emit(&mut partial);
    }

    /// Logs `partial` as one line (nothing if empty) and clears it.
    fn emit(&self, partial: &mut Vec<u8>) {
        if partial.is_empty() {
            return;
        }
        #[cfg(test)]
        self.emitted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(partial.len());
        let text = String::from_utf8_lossy(partial);
        let text = one_line(text.trim_end_matches('\r'), MAX_LINE);
        let plugin = &*self.plugin;
        match self.which {
            Which::Stdout => tracing::info!(plugin, stream = "stdout", "{text}"),
            Which::Stderr => tracing::error!(plugin, stream = "stderr", "{text}"),
        }
        partial.clear();
    }
}

impl Drop for Shared {
    /// The instance is gone: what it wrote without a newline is logged.
    fn drop(&mut self) {
        self.flush();
    }
}

/// One stream handle of a [`GuestOutput`].
struct Lines(Arc<Shared>);

#[wasmtime_wasi::async_trait]
impl Pollable for Lines {
    /// Always writable: logging never waits.
    async fn ready(&mut self) {}
}

impl OutputStream for Lines {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.0.push(&bytes);
        Ok(())
    }

    /// Not a line end: WASI stdio flushes after every write (Rust's `eprintln!`
    /// writes a line in pieces), so a partial line waits for its newline.
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl AsyncWrite for Lines {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.flush();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_at_newlines_and_at_the_cap() {
        let out = GuestOutput::new("p".into(), Which::Stdout);
        let partial = |o: &GuestOutput| o.0.partial.lock().map(|p| p.len()).unwrap_or(0);
        // Two handles, one line: the partial line is shared.
        out.lines().0.push(b"one\ntw");
        assert_eq!(partial(&out), 2);
        out.lines().0.push(b"o\n");
        assert_eq!(partial(&out), 0);
        out.lines().0.push(&vec![b'x'; MAX_LINE * 2 + 3]);
        assert_eq!(partial(&out), 3);
        out.0.flush();
        assert_eq!(partial(&out), 0);
        // One write of a long line ending in a newline: cut at the cap too.
        out.lines()
            .0
            .push(&[vec![b'y'; MAX_LINE * 3], b"\n".to_vec()].concat());
        let lines = out.0.emitted.lock().unwrap().clone();
        assert_eq!(
            lines,
            [3, 3, MAX_LINE, MAX_LINE, 3, MAX_LINE, MAX_LINE, MAX_LINE]
        );
    }
}
