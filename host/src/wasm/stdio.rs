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
//!
//! What a guest writes to stderr (and, for proxy-wasm, logs at `error` or
//! above) during a call is also kept for that call ([`record`]), so a trap
//! can be described by the guest's own reason ([`call_failure_reason`]): a
//! Rust panic's message and location rather than `unreachable`.

use std::cell::RefCell;
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

/// How much of a call's error output is kept (the end of it).
const KEPT: usize = 8 * 1024;

thread_local! {
    /// The error output of the call last armed on this thread (calls on a
    /// thread never overlap; see [`super::engine::arm`]).
    static CALL_STDERR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A new call starts on this thread: forget the last one's error output.
pub fn call_started() {
    CALL_STDERR.with(|s| s.borrow_mut().clear());
}

/// Keeps `text`, written to stderr by the guest running on this thread (or
/// logged at `error` or above), for [`call_failure_reason`].
pub fn record(text: &str) {
    CALL_STDERR.with(|s| {
        let mut s = s.borrow_mut();
        s.push_str(text);
        s.push('\n');
        if s.len() > KEPT {
            let mut cut = s.len() - KEPT;
            while !s.is_char_boundary(cut) {
                cut += 1;
            }
            s.drain(..cut);
        }
    });
}

/// Why the guest says the call running on this thread failed, from its
/// error output (see [`reason_in`]).
pub fn call_failure_reason() -> Option<String> {
    CALL_STDERR.with(|s| reason_in(&s.borrow()))
}

/// The guest's reason for a failure in `stderr`, its error output during the
/// call, as one line:
///
/// - a Python exception (componentize-py): the exception line of the last
///   `Traceback (most recent call last):` block and its innermost frame
///   (`RuntimeError: boom (File "/0/app.py", line 21, in configure)`), not the
///   panic of componentize-py's runtime that follows it (`Python function
///   threw an unexpected exception`);
/// - a JavaScript exception (componentize-js/SpiderMonkey, which prints the
///   message, a `Stack:` block of `function@file:line:col` frames, then
///   `Redirecting call to abort() to mozalloc_abort`): the message and the
///   innermost frame (`boom (at onRequestHeaders@app.js:17:11)`);
/// - a Rust panic (`panicked at src/lib.rs:51:13: boom`, from std's `thread
///   '…' panicked at LOCATION:` + message lines, or the proxy-wasm SDK's
///   `panicked at LOCATION:` + message, or the old `panicked at 'MESSAGE',
///   LOCATION`);
/// - an allocation failure (`memory allocation of N bytes failed`);
/// - else the last line written, labelled so (`the guest's last error line:
///   …`).
pub fn reason_in(stderr: &str) -> Option<String> {
    const MAX: usize = 1024;
    if let Some(reason) = python_exception(stderr).or_else(|| js_exception(stderr)) {
        return Some(one_line(&reason, MAX));
    }
    if let Some(at) = stderr.rfind("panicked at ") {
        let mut lines = stderr[at..].lines();
        let mut out = lines.next().unwrap_or_default().trim_end().to_string();
        for line in lines {
            let line = line.trim_end();
            if line.is_empty()
                || line.starts_with("note: run with")
                || line.starts_with("stack backtrace:")
            {
                break;
            }
            out.push(' ');
            out.push_str(line);
        }
        return Some(one_line(&out, MAX));
    }
    let mut lines = stderr.lines().map(str::trim).filter(|l| !l.is_empty());
    if let Some(alloc) = lines
        .clone()
        .rev()
        .find(|l| l.starts_with("memory allocation of "))
    {
        return Some(one_line(alloc, MAX));
    }
    let last = lines.next_back()?;
    Some(format!(
        "the guest's last error line: {}",
        one_line(last, MAX)
    ))
}

/// The exception of the last Python traceback in `stderr`: its exception
/// line (the first unindented line after the frames), with the innermost
/// frame's `File "…", line N, in F` when there is one.
fn python_exception(stderr: &str) -> Option<String> {
    const HEADER: &str = "Traceback (most recent call last):";
    let at = stderr.rfind(HEADER)?;
    let mut frame = None;
    for line in stderr[at + HEADER.len()..].lines() {
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with(char::is_whitespace) {
            let l = line.trim();
            if l.starts_with("File ") {
                frame = Some(l);
            }
            continue;
        }
        let exception = line.trim_end();
        return Some(match frame {
            Some(f) => format!("{exception} ({f})"),
            None => exception.to_string(),
        });
    }
    None
}

/// The exception SpiderMonkey (componentize-js) printed before aborting:
/// the line before the last `Stack:` line, with the innermost frame (the
/// first indented `function@file:line:col` line after it). Only in that
/// form: a frame or the abort line after `Stack:`, and no Rust panic.
fn js_exception(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr.lines().collect();
    let stack = lines.iter().rposition(|l| l.trim_end() == "Stack:")?;
    let message = lines[..stack]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())?;
    let frame = lines[stack + 1..]
        .first()
        .filter(|l| l.starts_with(char::is_whitespace))
        .map(|l| l.trim())
        .filter(|l| l.contains('@'));
    let after = &lines[stack + 1..];
    let aborted = after.iter().any(|l| l.contains("mozalloc_abort"));
    // A `Stack:` line some other guest wrote: not SpiderMonkey's form.
    if (frame.is_none() && !aborted) || after.iter().any(|l| l.contains("panicked at ")) {
        return None;
    }
    Some(match frame {
        Some(f) => format!("{message} (at {f})"),
        None => message.to_string(),
    })
}

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
            Which::Stderr => {
                record(&text);
                tracing::error!(plugin, stream = "stderr", "{text}");
            }
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
    fn the_reason_is_a_panic_s_message_and_location_on_one_line() {
        // std's default hook (Rust 1.73 on), as a component's stderr.
        let std = "debug: starting\nthread '<unnamed>' panicked at src/lib.rs:51:13:\n\
                   boom in configure\nnote: run with `RUST_BACKTRACE=1` environment \
                   variable to display a backtrace\n";
        assert_eq!(
            reason_in(std).as_deref(),
            Some("panicked at src/lib.rs:51:13: boom in configure")
        );
        // The proxy-wasm SDK's hook: one `proxy_log` at critical.
        assert_eq!(
            reason_in("panicked at src/lib.rs:9:5:\nbad config\n").as_deref(),
            Some("panicked at src/lib.rs:9:5: bad config")
        );
        // Older Rust.
        assert_eq!(
            reason_in("thread 'main' panicked at 'boom', src/lib.rs:3:1\n").as_deref(),
            Some("panicked at 'boom', src/lib.rs:3:1")
        );
        assert_eq!(
            reason_in("memory allocation of 1048576 bytes failed\n").as_deref(),
            Some("memory allocation of 1048576 bytes failed")
        );
        assert_eq!(
            reason_in("one\nAssertion failed: x > 0\n\n").as_deref(),
            Some("the guest's last error line: Assertion failed: x > 0")
        );
        assert_eq!(reason_in(""), None);
        // A Rust guest that printed a `Stack:` line before panicking is
        // still described by its panic.
        assert_eq!(
            reason_in("oops\nStack:\nthread '<unnamed>' panicked at src/lib.rs:2:3:\nboom\n")
                .as_deref(),
            Some("panicked at src/lib.rs:2:3: boom")
        );
    }

    #[test]
    fn a_python_exception_is_the_reason_not_componentize_py_s_panic() {
        // Captured from a componentize-py 0.25.1 filter whose `configure`
        // raises RuntimeError("boom"), run by legate. The reason was
        // "panicked at runtime/src/lib.rs:1293:29: Python function threw an
        // unexpected exception".
        let stderr = "Traceback (most recent call last):\n  \
                      File \"/0/app.py\", line 21, in configure\n\
                      RuntimeError: boom\n\
                      thread '<unnamed>' (1) panicked at runtime/src/lib.rs:1293:29:\n\
                      Python function threw an unexpected exception\n\
                      note: run with `RUST_BACKTRACE=1` environment variable to display a \
                      backtrace\n";
        assert_eq!(
            reason_in(stderr).as_deref(),
            Some("RuntimeError: boom (File \"/0/app.py\", line 21, in configure)")
        );
        // With source lines and carets (CPython with its sources), a chained
        // exception: the last traceback's exception and innermost frame.
        let stderr = "Traceback (most recent call last):\n  \
                      File \"/app.py\", line 5, in f\n    x = d[\"k\"]\n        ~^^^^^\n\
                      KeyError: 'k'\n\n\
                      During handling of the above exception, another exception occurred:\n\n\
                      Traceback (most recent call last):\n  \
                      File \"/app.py\", line 9, in configure\n    g()\n  \
                      File \"/app.py\", line 7, in g\n    raise ValueError(\"bad config\")\n\
                      ValueError: bad config\n\
                      thread '<unnamed>' (1) panicked at runtime/src/lib.rs:1293:29:\n\
                      Python function threw an unexpected exception\n";
        assert_eq!(
            reason_in(stderr).as_deref(),
            Some("ValueError: bad config (File \"/app.py\", line 7, in g)")
        );
    }

    #[test]
    fn a_javascript_exception_is_the_reason_not_spidermonkey_s_abort_line() {
        // Captured from a componentize-js 0.23.0 filter (built with `-d http
        // -d fetch-event`) whose onRequestHeaders throws
        // `new Error('boom in js headers')`, run by legate. The reason was
        // "the guest's last error line: Redirecting call to abort() to
        // mozalloc_abort".
        let stderr = "boom in js headers\n\
                      Stack:\n  \
                      onRequestHeaders@app.js:17:11\n  \
                      export_httpHandler_0_1_2$onRequestHeaders@/tmp/8ac8c1963af7/sources/\
                      initializer.js:5089:17\n\
                      Redirecting call to abort() to mozalloc_abort\n";
        assert_eq!(
            reason_in(stderr).as_deref(),
            Some("boom in js headers (at onRequestHeaders@app.js:17:11)")
        );
        // `configure` throwing an Error (not a string): componentize-js's
        // own complaint, which is the reason.
        let stderr = "expected a string, received [object]\n\
                      Stack:\n  \
                      _utf8AllocateAndEncode@/tmp/8ac8c1963af7/sources/initializer.js:108:11\n  \
                      export_httpHandler_0_1_2$configure@/tmp/8ac8c1963af7/sources/\
                      initializer.js:4936:45\n\
                      Redirecting call to abort() to mozalloc_abort\n";
        assert_eq!(
            reason_in(stderr).as_deref(),
            Some(
                "expected a string, received [object] (at \
                 _utf8AllocateAndEncode@/tmp/8ac8c1963af7/sources/initializer.js:108:11)"
            )
        );
    }

    #[test]
    fn a_call_keeps_its_own_stderr_only_and_a_bounded_end_of_it() {
        record("panicked at a.rs:1:1:\nold");
        call_started();
        assert_eq!(call_failure_reason(), None);
        // A component's stderr is recorded as it is logged.
        let err = GuestOutput::new("p".into(), Which::Stderr);
        err.lines()
            .0
            .push(b"thread '<unnamed>' panicked at src/lib.rs:2:3:\nnew\n");
        assert_eq!(
            call_failure_reason().as_deref(),
            Some("panicked at src/lib.rs:2:3: new")
        );
        record(&"x".repeat(KEPT * 2));
        CALL_STDERR.with(|s| assert!(s.borrow().len() <= KEPT));
        call_started();
    }

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
