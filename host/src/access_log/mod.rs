//! The access logs: one line per request (a JSON object, or a line in a format
//! of the config's: [`format`]), to stdout, stderr or a file; a listener writes
//! its own logs (`listeners[].access_log`) or the top-level ones, each log
//! whose filter passes the line ([`Logs`]).
//!
//! Workers never write a file. [`Logs::write`] formats the line and appends
//! it to a [`Writer`]'s buffer under a short lock; one writer thread per
//! destination (`legate-access-log`, a plain thread, not a worker) writes the
//! buffer out every `flush_interval`, or as soon as [`FLUSH_BYTES`] are
//! waiting, as Envoy's file access log does. Logs writing the same path share
//! that writer ([`Writers`]): one file handle, lines whole. So a slow disk
//! or a stdout pipe nobody reads holds up the log, never a request. The memory
//! is bounded: past `buffer_limit` new lines are dropped and counted
//! (`legate_access_log_dropped_total`). [`Writers::close`] writes what is left
//! when the process stops; a writer no log uses any more (a reload replaced
//! its listener) writes its last lines and ends by itself. A file is opened
//! for append, so logrotate's `copytruncate` works; [`Writers::reopen`]
//! (SIGUSR1, `POST /reopen_logs`, as Envoy and nginx) opens every path again
//! after the lines waiting are written, for logrotate's default `create`
//! (move, then signal).
//!
//! HTTP requests (`proxy.rs`) and TCP proxy sessions (`tcp_proxy.rs`, one line
//! per connection at its end, `protocol` `"TCP"`) write the same [`Line`];
//! [`timestamp`] and [`millis`] format its times for the TCP side.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;

use crate::config;
use crate::stats::{Counter, Stats};

mod filter;
pub mod format;

/// Waiting lines past this size wake the writer before its interval ends (Envoy's
/// `min_flush_size`).
pub const FLUSH_BYTES: usize = 64 * 1024;

/// What the kernel writes to a pipe in one piece (POSIX `PIPE_BUF` on Linux).
const PIPE_BUF: usize = 4096;

/// How long [`Writers::close`] waits for the writer to finish; a writer blocked
/// longer (a pipe nobody reads) must not keep the process from exiting.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// One access-log line (docs/config.md, `access_log`). Every line is this one
/// type, whatever wrote it (a request's end, an answer hyper sent by itself), so
/// every line has every key. Fields are in key order: the line reads as the
/// sorted JSON object it always was.
#[derive(serde::Serialize)]
pub struct Line<'a> {
    pub attempts: u32,
    pub authority: Option<&'a str>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub cause: Option<&'a str>,
    pub client: String,
    pub cluster: Option<&'a str>,
    pub downstream_peer_subject: Option<&'a str>,
    pub duration_ms: f64,
    pub listener: &'a str,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    /// The proxy a request came through (Envoy's direct remote address), when
    /// `client` is the one it reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub protocol: Option<String>,
    pub referer: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub requested_server_name: Option<&'a str>,
    /// From the request head to the upstream's response head (Envoy's
    /// `%RESPONSE_DURATION%`); `None` when no upstream answered.
    pub response_duration_ms: Option<f64>,
    pub route: Option<&'a str>,
    pub route_table: Option<&'a str>,
    pub start_time: String,
    pub status: u16,
    pub time: String,
    pub upstream: Option<String>,
    pub upstream_transport_failure_reason: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub virtual_host: Option<&'a str>,
    pub x_forwarded_for: Option<&'a str>,
    /// What only a configured format reads ([`format`]).
    #[serde(skip)]
    pub facts: Facts<'a>,
}

#[cfg(test)]
impl Line<'static> {
    /// A line with nothing in it, for tests to fill in what they read.
    pub(crate) fn blank() -> Self {
        Line {
            attempts: 0,
            authority: None,
            bytes_received: 0,
            bytes_sent: 0,
            cause: None,
            client: String::new(),
            cluster: None,
            downstream_peer_subject: None,
            duration_ms: 0.0,
            listener: "web",
            method: None,
            path: None,
            peer: None,
            protocol: None,
            referer: None,
            request_id: None,
            requested_server_name: None,
            response_duration_ms: None,
            route: None,
            route_table: None,
            start_time: String::new(),
            status: 0,
            time: String::new(),
            upstream: None,
            upstream_transport_failure_reason: None,
            user_agent: None,
            virtual_host: None,
            x_forwarded_for: None,
            facts: Facts::default(),
        }
    }
}

/// The facts of a [`Line`] that only `format` and `json_format` operators
/// read (not in the default JSON line).
#[derive(Default)]
pub struct Facts<'a> {
    /// When the request head arrived (the connection, for TCP): `%START_TIME(...)%`.
    pub start: Option<SystemTime>,
    /// The address the client connected to: `%DOWNSTREAM_LOCAL_ADDRESS%`.
    pub local: Option<std::net::SocketAddr>,
    /// `http` or `https`: `%REQ(:SCHEME)%`.
    pub scheme: Option<&'static str>,
    /// A gRPC request (`%GRPC_STATUS%` has a value only for one).
    pub grpc: bool,
    /// The downstream TLS session's version and cipher suite (IANA name).
    pub tls: Option<(&'static str, &'static str)>,
    /// The request, response and trailer fields the format asked for
    /// ([`format::Wants`]), in its order; empty when not captured.
    pub request: &'a [Option<String>],
    pub response: &'a [Option<String>],
    pub trailers: &'a [Option<String>],
}

/// The access log's `time` and `start_time`: RFC 3339, UTC, milliseconds
/// (the format of `proxy.rs`'s lines), without a date crate.
pub fn timestamp(t: SystemTime) -> String {
    let c = civil(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        c.year,
        c.month,
        c.day,
        c.hour,
        c.minute,
        c.second,
        c.nanos / 1_000_000
    )
}

/// A time's calendar fields, UTC.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    /// Day of the year, 1..=366.
    yday: u32,
    /// 0 = Sunday.
    weekday: u32,
    hour: u32,
    minute: u32,
    second: u32,
    nanos: u32,
    /// Seconds since the Unix epoch.
    epoch: u64,
}

/// `t`'s calendar fields, without a date crate.
fn civil(t: SystemTime) -> Civil {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // `doy` counts from March 1st: January and February are days 306.. of
    // the year before.
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let yday = if doy >= 306 {
        doy - 306 + 1
    } else {
        doy + 59 + i64::from(leap) + 1
    };
    let small = |v: i64| u32::try_from(v).unwrap_or(0);
    Civil {
        year,
        month: small(month),
        day: small(day),
        yday: small(yday),
        // 1970-01-01 was a Thursday.
        weekday: small(((days + 4) % 7) as i64),
        hour: (rem / 3600) as u32,
        minute: ((rem % 3600) / 60) as u32,
        second: (rem % 60) as u32,
        nanos: d.subsec_nanos(),
        epoch: secs,
    }
}

/// A request header's value as the access log writes it (`user_agent`, and
/// `authority` from `Host`): its text, with each byte that is not part of valid
/// UTF-8 (obs-text, such as Latin-1, which HTTP allows) as `\xHH`, and so a
/// backslash as `\x5C`, as nginx escapes its log variables: the bytes the
/// client sent can be told from one another (a lossy conversion made them all
/// U+FFFD) and from text that reads `\xHH`.
pub fn header_text(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\x5C");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02X}"));
        }
    }
    out
}

/// The access log's `duration_ms`: milliseconds, to the microsecond.
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

/// One writer thread and its destination (`stdout`, `stderr` or a file),
/// shared by every configured log that writes there ([`Writers`]): one file
/// handle, one buffer, so the lines of two logs never mix mid-line.
pub struct Writer {
    shared: Arc<Buffered>,
    /// `flush_interval` and `buffer_limit`: logs share a writer only when these
    /// agree (`validate` refuses a config whose logs of one path differ).
    settings: (Duration, usize),
    /// The writer thread and the channel it closes when it ends; taken by `close`.
    thread: Mutex<Option<Thread>>,
    /// Where a writer whose last log went away leaves its thread to finish,
    /// so the process's exit waits for its last lines ([`Writers::close`]).
    registry: Weak<Mutex<Registry>>,
}

/// A writer thread, and the channel it closes when it ends.
type Thread = (JoinHandle<()>, mpsc::Receiver<()>);

/// The writers of the process, by destination ([`destination`]): logs of
/// every listener, and of configs a reload put in force, writing one path
/// share one [`Writer`]. A reload that keeps a path keeps its writer (the file
/// is not opened again).
#[derive(Default)]
pub struct Writers(Arc<Mutex<Registry>>);

#[derive(Default)]
struct Registry {
    /// The writers in use, by destination: usually one; more while a reload
    /// that changed a destination's settings drains the connections of the
    /// old one (or after a reload that failed kept it), each reopened and
    /// closed with the others.
    open: std::collections::HashMap<String, Vec<Weak<Writer>>>,
    /// Threads of writers no log uses any more, writing their last lines.
    closing: Vec<Thread>,
    /// Start is over: a FIFO a reload opens must have its reader already
    /// (a reload never waits for one).
    serving: bool,
}

/// One configured log: where its lines go, how they are written, which ones.
pub struct AccessLog {
    writer: Arc<Writer>,
    /// How lines are written (`format`, `json_format`, or the default JSON).
    format: format::Format,
    /// Which lines are written (`filter`); `None` = every line.
    filter: Option<config::AccessLogFilter>,
}

/// The logs a listener writes (its own, or the top-level ones): every log
/// whose filter passes gets the line.
pub struct Logs {
    logs: Vec<AccessLog>,
    /// The header fields any of the formats reads: the union, which each
    /// format's operators index into.
    wants: format::Wants,
}

/// The key of a log's destination: its path with `.` and repeated `/`
/// taken out (`stdout` and `stderr` as they are). Logs with one key share one
/// writer.
pub fn destination(path: &str) -> String {
    if matches!(path, "stdout" | "stderr") {
        return path.to_string();
    }
    std::path::Path::new(path)
        .components()
        .collect::<PathBuf>()
        .display()
        .to_string()
}

/// What the workers and the writer share.
struct Buffered {
    pending: Mutex<Pending>,
    /// Wakes the writer early: [`FLUSH_BYTES`] are waiting, or the log is closing.
    wake: Condvar,
    /// The most bytes `pending` may hold.
    limit: usize,
    /// Lines not written because `pending` was full (or the log already closed).
    dropped: Counter,
    /// Lines are being dropped and that was reported. Set by the worker that
    /// drops the first line, which warns: the writer cannot, being the one
    /// blocked when a pipe nobody reads fills the buffer. Cleared, with a
    /// second report, by the writer once a batch goes by without drops.
    dropping: AtomicBool,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    closed: bool,
    /// The file is to be opened again once the lines waiting are written.
    reopen: bool,
}

impl Buffered {
    /// An empty buffer of at most `limit` bytes, counting its drops in `dropped`.
    fn new(limit: usize, dropped: Counter) -> Self {
        Buffered {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            limit,
            dropped,
            dropping: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one whole line, or drops and counts it. Returns whether the writer
    /// should be woken (the buffer just passed [`FLUSH_BYTES`]), so the caller
    /// notifies once per batch rather than once per line.
    fn push(&self, line: &[u8]) -> bool {
        let mut p = self.lock();
        if p.closed || p.lines.len() + line.len() > self.limit {
            let closed = p.closed;
            drop(p);
            self.dropped.inc();
            // Once per episode (a line after `close` is no news).
            if !closed && !self.dropping.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "access log: the buffer is full ({} bytes waiting for slow or blocked \
                     writes); new lines are dropped and counted in \
                     legate_access_log_dropped_total (reported once)",
                    self.limit
                );
            }
            return false;
        }
        let before = p.lines.len();
        p.lines.extend_from_slice(line);
        before < FLUSH_BYTES && p.lines.len() >= FLUSH_BYTES
    }

    /// After a batch: if lines were being dropped and none was since the last
    /// batch (`seen`, the count then, updated), the buffer has room again:
    /// reported, and the next drop is reported as a new episode.
    fn settle(&self, seen: &mut u64) {
        let dropped = self.dropped.get();
        if dropped == *seen && self.dropping.swap(false, Ordering::Relaxed) {
            tracing::warn!("access log: lines fit in the buffer again");
        }
        *seen = dropped;
    }

    /// Waits until a batch is due (`deadline`, [`FLUSH_BYTES`] waiting, closing, or
    /// a reopen asked for) and takes it, leaving `spare` (empty, with its capacity)
    /// as the new buffer. Returns the batch, whether it is the last one, and
    /// whether the file is to be opened again after it.
    fn take(&self, deadline: Instant, spare: Vec<u8>) -> (Vec<u8>, bool, bool) {
        let mut p = self.lock();
        while !p.closed && !p.reopen && p.lines.len() < FLUSH_BYTES {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            p = self
                .wake
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let reopen = std::mem::take(&mut p.reopen);
        (std::mem::replace(&mut p.lines, spare), p.closed, reopen)
    }
}

enum Target {
    Stdout,
    Stderr,
    File(File, PathBuf),
}

/// The writer's end: the target and how to cut batches for it.
struct Sink {
    target: Target,
    /// Not a regular file (a pipe, a socket, a terminal): batches are written in
    /// pieces of whole lines of at most [`PIPE_BUF`] bytes, which the kernel writes
    /// unbroken, so a line of another process on the same pipe (the other side of
    /// a hot restart) never lands inside one of ours. Writes to a regular file
    /// opened for append are whole anyway.
    pipe: bool,
    /// A write failed part-way through a line: the next write starts with a
    /// newline, so the lines after the fragment stay whole.
    mid_line: bool,
}

impl Sink {
    fn write(&mut self, batch: &[u8]) -> io::Result<()> {
        let max = if self.pipe { PIPE_BUF } else { usize::MAX };
        for piece in pieces(batch, max) {
            // The std handles' locks are taken per piece: the process log
            // (tracing, on stderr) is never held up by a whole batch, nor lands
            // inside a line.
            let mid = &mut self.mid_line;
            match &mut self.target {
                Target::Stdout => {
                    let mut out = io::stdout().lock();
                    write_whole(&mut out, piece, mid)?;
                    out.flush()?;
                }
                Target::Stderr => write_whole(&mut io::stderr().lock(), piece, mid)?,
                Target::File(f, _) => write_whole(f, piece, mid)?,
            }
        }
        Ok(())
    }

    /// Opens a file target's path again (it was moved away: logrotate's
    /// `create`); on failure the old file stays in use.
    fn reopen(&mut self) {
        let Target::File(_, path) = &self.target else {
            return;
        };
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => {
                tracing::info!("access log: reopened {}", path.display());
                self.pipe = !is_regular(f.as_fd());
                let path = path.clone();
                self.target = Target::File(f, path);
                self.mid_line = false;
            }
            Err(e) => tracing::warn!(
                "access log: cannot reopen {}: {e}; still writing to the file it had open",
                path.display()
            ),
        }
    }
}

/// Writes `piece` (whole lines) to `w`, after a newline if the last write stopped
/// mid-line (`mid`), which it sets if this one does.
fn write_whole(w: &mut impl Write, piece: &[u8], mid: &mut bool) -> io::Result<()> {
    if *mid {
        w.write_all(b"\n")?;
        *mid = false;
    }
    let mut rest = piece;
    while !rest.is_empty() {
        match w.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                rest = rest.get(n..).unwrap_or_default();
                *mid = !rest.is_empty();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `batch` (whole lines) in pieces of whole lines of at most `max` bytes; a line
/// longer than that is a piece of its own.
fn pieces(batch: &[u8], max: usize) -> impl Iterator<Item = &[u8]> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = if rest.len() <= max {
            rest.len()
        } else {
            match rest[..max].iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None => rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(rest.len(), |i| i + 1),
            }
        };
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// Whether `fd` is a regular file (`false` when unknown: cutting is always safe).
fn is_regular(fd: BorrowedFd<'_>) -> bool {
    fd.try_clone_to_owned()
        .map(File::from)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.is_file())
}

/// Why [`check`] finds that the access log could not be opened.
#[derive(Debug)]
pub struct CheckError {
    /// The file does not exist and neither does its directory (else the file
    /// exists and cannot be opened for appending).
    pub no_directory: bool,
    message: String,
}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CheckError {}

/// Whether [`Writers::open`] would open `cfg`'s file (`legate check`):
/// an existing file must open for appending (it is not truncated); a new
/// one is created, as `nginx -t` does, and removed again, so a directory
/// Legate may not write in (or a file system that takes no new files, such
/// as `/proc`) fails here rather than at start. An existing FIFO is opened
/// without waiting for its reader.
pub fn check(cfg: &config::AccessLog) -> Result<(), CheckError> {
    let p = std::path::Path::new(cfg.path.as_str());
    if matches!(cfg.path.as_str(), "stdout" | "stderr") {
        return Ok(());
    }
    let cannot = |e: io::Error| CheckError {
        no_directory: false,
        message: format!("cannot open access log `{}`: {e}", p.display()),
    };
    if let Ok(meta) = std::fs::metadata(p) {
        if meta.file_type().is_fifo() {
            // Opening a FIFO for writing waits for a reader (`run` does, as
            // nginx): `check` must not hang on a log shipper not started
            // yet. Without waiting, the permission is checked first, then
            // the lack of a reader is `ENXIO`, which `run` would wait out.
            return match OpenOptions::new()
                .append(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(p)
            {
                Err(e) if e.raw_os_error() != Some(libc::ENXIO) => Err(cannot(e)),
                _ => Ok(()),
            };
        }
        OpenOptions::new().append(true).open(p).map_err(cannot)?;
        return Ok(());
    }
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        return Err(CheckError {
            no_directory: true,
            message: format!(
                "cannot open access log `{}`: directory `{}` does not exist",
                p.display(),
                dir.display()
            ),
        });
    }
    match OpenOptions::new().append(true).create_new(true).open(p) {
        // Ours (`create_new`): removed, so `check` leaves nothing behind.
        Ok(_) => {
            let _ = std::fs::remove_file(p);
            Ok(())
        }
        // Created meanwhile by someone else: it must open as it is.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            OpenOptions::new().append(true).open(p).map_err(cannot)?;
            Ok(())
        }
        Err(e) => Err(CheckError {
            no_directory: false,
            message: format!("cannot create access log `{}`: {e}", p.display()),
        }),
    }
}

/// Opens log file `p` for appending (created if need be). A FIFO is opened
/// without blocking unless `wait`: no reader is an error then, and the file
/// is made blocking again once open (the writer thread blocks on it, as on
/// any file).
fn open_log(p: &str, wait: bool) -> anyhow::Result<File> {
    let fifo = !wait && std::fs::metadata(p).is_ok_and(|m| m.file_type().is_fifo());
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    if fifo {
        options.custom_flags(libc::O_NONBLOCK);
    }
    let f = options.open(p).map_err(|e| {
        if fifo && e.raw_os_error() == Some(libc::ENXIO) {
            anyhow::anyhow!(
                "cannot open access log `{p}`: it is a FIFO no process reads; start its reader \
                 first (a reload does not wait for one, as the start does)"
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot open access log `{p}`"))
        }
    })?;
    if fifo {
        let flags = rustix::fs::fcntl_getfl(&f)
            .with_context(|| format!("access log `{p}`: reading its flags"))?;
        rustix::fs::fcntl_setfl(&f, flags - rustix::fs::OFlags::NONBLOCK)
            .with_context(|| format!("access log `{p}`: making it blocking"))?;
    }
    Ok(f)
}

impl Writer {
    /// Opens `stdout`, `stderr` or a file path for appending, and starts the
    /// writer thread (not shared: [`Writers::open`] shares them). A FIFO
    /// waits for its reader if `wait` (at start, as nginx does), else one
    /// without a reader is an error (a reload must not hang on it).
    fn open(cfg: &config::AccessLog, stats: &Stats, wait: bool) -> anyhow::Result<Self> {
        let target = match cfg.path.as_str() {
            "stdout" => Target::Stdout,
            "stderr" => Target::Stderr,
            p => Target::File(open_log(p, wait)?, PathBuf::from(p)),
        };
        let pipe = !match &target {
            Target::Stdout => is_regular(io::stdout().as_fd()),
            Target::Stderr => is_regular(io::stderr().as_fd()),
            Target::File(f, _) => is_regular(f.as_fd()),
        };
        let limit = usize::try_from(cfg.buffer_limit.0).unwrap_or(usize::MAX);
        let dropped = stats.counter(
            "legate_access_log_dropped_total",
            "Access-log lines dropped because the buffer was full (writes were slower than \
             requests, or blocked).",
            &[],
        );
        Self::start(
            Sink {
                target,
                pipe,
                mid_line: false,
            },
            cfg.flush_interval.get(),
            limit,
            dropped,
        )
        .context("starting the access-log writer thread")
    }

    fn start(sink: Sink, interval: Duration, limit: usize, dropped: Counter) -> io::Result<Self> {
        let shared = Arc::new(Buffered::new(limit, dropped));
        let (done_tx, done_rx) = mpsc::channel();
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("legate-access-log".into())
                .spawn(move || {
                    run_writer(&shared, sink, interval);
                    drop(done_tx);
                })?
        };
        Ok(Writer {
            shared,
            settings: (interval, limit),
            thread: Mutex::new(Some((writer, done_rx))),
            registry: Weak::new(),
        })
    }

    /// Hands the bytes of one line (without its line break) to the writer.
    fn hand_over(&self, mut line: Vec<u8>) {
        line.push(b'\n');
        if self.shared.push(&line) {
            self.shared.wake.notify_one();
        }
    }

    /// Has the writer open the file's path again once the lines handed over so
    /// far are written (SIGUSR1, `POST /reopen_logs`); nothing for stdout or
    /// stderr.
    fn reopen(&self) {
        self.shared.lock().reopen = true;
        self.shared.wake.notify_one();
    }

    /// Tells the writer to write what it holds and end (a line handed over
    /// after this is dropped); its thread, to wait for, the first time.
    fn end(&self) -> Option<Thread> {
        let taken = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        Some(taken)
    }

    /// Writes out every line handed over so far and stops the writer
    /// (idempotent), waiting at most [`CLOSE_WAIT`] for a writer that is
    /// blocked.
    #[cfg(test)]
    fn close(&self) {
        join(
            self.end().into_iter().collect(),
            Instant::now() + CLOSE_WAIT,
        );
    }
}

/// Waits for writer threads that were told to end, until `deadline` at most.
fn join(threads: Vec<Thread>, deadline: Instant) {
    for (writer, done) in threads {
        match done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Err(mpsc::RecvTimeoutError::Timeout) => tracing::warn!(
                "access log: the writer is still blocked after {CLOSE_WAIT:?}; exiting without \
                 the lines it holds"
            ),
            // The sender is only ever dropped: the writer ended.
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = writer.join();
            }
        }
    }
}

impl Drop for Writer {
    /// The last log writing here went away (a reload replaced its listener,
    /// whose last connection closed): the writer writes its last lines and
    /// ends. Not waited for here (this may be a worker's thread), but at
    /// the process's exit ([`Writers::close`]).
    fn drop(&mut self) {
        let Some(thread) = self.end() else {
            return;
        };
        match self.registry.upgrade() {
            Some(r) => {
                let mut r = r.lock().unwrap_or_else(PoisonError::into_inner);
                r.closing.retain(|(t, _)| !t.is_finished());
                r.closing.push(thread);
            }
            None => join(vec![thread], Instant::now() + CLOSE_WAIT),
        }
    }
}

impl Writers {
    /// The writer of `cfg`'s destination: the one in use if its settings are
    /// `cfg`'s, else a new one (which a reload's new settings get; the old
    /// one ends when its last log goes).
    pub fn open(&self, cfg: &config::AccessLog, stats: &Stats) -> anyhow::Result<Arc<Writer>> {
        let key = destination(&cfg.path);
        let settings = (
            cfg.flush_interval.get(),
            usize::try_from(cfg.buffer_limit.0).unwrap_or(usize::MAX),
        );
        let (in_use, serving) = {
            let r = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let live: Vec<Arc<Writer>> = r
                .open
                .get(&key)
                .map(|ws| ws.iter().filter_map(Weak::upgrade).collect())
                .unwrap_or_default();
            (live, r.serving)
        };
        // (Dropped outside the lock, which `Writer::drop` takes.)
        if let Some(w) = in_use.into_iter().find(|w| w.settings == settings) {
            return Ok(w);
        }
        // Opened without the lock: a FIFO's open waits for its reader at
        // start, and SIGUSR1 and the exit must not wait for it. (Start and
        // reloads, which open logs, run one at a time.)
        let mut w = Writer::open(cfg, stats, !serving)?;
        w.registry = Arc::downgrade(&self.0);
        let w = Arc::new(w);
        let mut r = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for ws in r.open.values_mut() {
            ws.retain(|w| w.strong_count() > 0);
        }
        r.open.retain(|_, ws| !ws.is_empty());
        r.open.entry(key).or_default().push(Arc::downgrade(&w));
        Ok(w)
    }

    /// The writers in use.
    fn live(&self) -> Vec<Arc<Writer>> {
        let r = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        r.open
            .values()
            .flatten()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Start is over: from now on (reloads) a FIFO log is opened only if a
    /// process reads it, never waited for.
    pub fn serving(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .serving = true;
    }

    /// Has every writer in use open its file's path again (SIGUSR1, `POST
    /// /reopen_logs`) once the lines waiting are written; how many there are.
    pub fn reopen(&self) -> usize {
        let live = self.live();
        for w in &live {
            w.reopen();
        }
        live.len()
    }

    /// Writes out every line handed over so far, to every writer, and stops
    /// them (idempotent). Called when the workers have stopped; a line handed
    /// over after this is dropped. Waits at most [`CLOSE_WAIT`] for writers
    /// that are blocked.
    pub fn close(&self) {
        let live = self.live();
        let mut threads: Vec<Thread> = live.iter().filter_map(|w| w.end()).collect();
        threads.append(
            &mut self
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .closing,
        );
        join(threads, Instant::now() + CLOSE_WAIT);
        drop(live);
    }
}

impl Logs {
    /// The logs `cfgs` describe, on the writers of `writers`; `None` for none
    /// (`access_log: off`): a listener without logs builds no line.
    pub fn open(
        cfgs: &[config::AccessLog],
        writers: &Writers,
        stats: &Stats,
    ) -> anyhow::Result<Option<Arc<Logs>>> {
        if cfgs.is_empty() {
            return Ok(None);
        }
        let mut wants = format::Wants::default();
        let mut logs = Vec::with_capacity(cfgs.len());
        for cfg in cfgs {
            // (Checked by `validate` already.)
            let format = format::parse_into(cfg, &mut wants)
                .map_err(|e| anyhow::anyhow!("access_log: {} ({})", e.message, e.help))?;
            logs.push(AccessLog {
                writer: writers.open(cfg, stats)?,
                format,
                filter: cfg.filter.clone(),
            });
        }
        Ok(Some(Arc::new(Logs { logs, wants })))
    }

    /// The header fields the formats read: what a request captures for its
    /// line ([`format::capture`]).
    pub fn wants(&self) -> &format::Wants {
        &self.wants
    }

    /// Hands one line to the writer of every log whose filter passes it.
    /// Never blocks on I/O and never fails a request: a line that does not fit
    /// in a buffer is dropped and counted.
    pub fn write(&self, line: &Line<'_>) {
        for log in &self.logs {
            log.write(line);
        }
    }
}

/// The logs listener `cfg` writes: its own (none for `off`), else the top
/// level's, `top`.
pub fn for_listener(
    cfg: &config::Listener,
    top: Option<&Arc<Logs>>,
    writers: &Writers,
    stats: &Stats,
) -> anyhow::Result<Option<Arc<Logs>>> {
    match &cfg.access_log {
        None => Ok(top.cloned()),
        Some(own) => Logs::open(own.logs(), writers, stats)
            .with_context(|| format!("listener `{}`", cfg.name)),
    }
}

impl AccessLog {
    fn write(&self, line: &Line<'_>) {
        if let Some(f) = &self.filter {
            if !filter::admits(f, line) {
                return;
            }
        }
        let mut bytes = Vec::with_capacity(512);
        self.format.render(line, &mut bytes);
        self.writer.hand_over(bytes);
    }
}

/// The writer thread: a batch per interval (or per [`FLUSH_BYTES`]) until closed.
/// Write failures are reported once in the process log when they start, and
/// again when they stop (a full disk would otherwise warn per batch); so are
/// drops, whose start the worker that drops reports ([`Buffered::push`]).
fn run_writer(shared: &Buffered, mut sink: Sink, interval: Duration) {
    let mut spare = Vec::new();
    let mut failing = false;
    let mut dropped_seen = shared.dropped.get();
    loop {
        let (mut batch, last, reopen) = shared.take(Instant::now() + interval, spare);
        if !batch.is_empty() {
            match sink.write(&batch) {
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(
                        "access log write failed: {e}; lines are lost until writes succeed \
                         again (reported once)"
                    );
                }
                Err(_) => {}
                Ok(()) if failing => {
                    failing = false;
                    tracing::warn!("access log writes succeed again");
                }
                Ok(()) => {}
            }
        }
        shared.settle(&mut dropped_seen);
        if last {
            return;
        }
        if reopen {
            sink.reopen();
        }
        batch.clear();
        // A burst's large buffer is not kept for good.
        if batch.capacity() > 4 * FLUSH_BYTES {
            batch.shrink_to(FLUSH_BYTES);
        }
        spare = batch;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_with_milliseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(timestamp(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(millis(Duration::from_micros(1_234_567)), 1234.567);
    }

    #[test]
    fn header_bytes_that_are_not_utf8_are_escaped_as_nginx_does() {
        assert_eq!(header_text(b"curl/8.5"), "curl/8.5");
        assert_eq!(header_text("café".as_bytes()), "café");
        // Latin-1 `é`, a lone 0xFF, a truncated UTF-8 sequence: each byte.
        assert_eq!(header_text(b"caf\xe9 \xff \xc3"), "caf\\xE9 \\xFF \\xC3");
        // A backslash too, so `\xE9` typed by the client is not the byte.
        assert_eq!(header_text(b"a\\xE9"), "a\\x5CxE9");
    }

    fn line(i: usize, len: usize) -> Vec<u8> {
        let mut l = format!("{i:08}").into_bytes();
        l.resize(len - 1, b'x');
        l.push(b'\n');
        l
    }

    #[test]
    fn a_full_buffer_drops_and_counts_new_lines() {
        let b = Buffered::new(100, Counter::default());
        for i in 0..4 {
            b.push(&line(i, 25));
        }
        assert_eq!(b.dropped.get(), 0);
        // 100 bytes held: the fifth line does not fit, a later one neither.
        b.push(&line(4, 25));
        b.push(&line(5, 1));
        assert_eq!(b.dropped.get(), 2);
        // The writer takes the batch: there is room again, in order.
        let (batch, last, _) = b.take(Instant::now(), Vec::new());
        assert!(!last);
        assert_eq!(
            batch,
            [line(0, 25), line(1, 25), line(2, 25), line(3, 25)].concat()
        );
        b.push(&line(6, 25));
        assert_eq!(b.dropped.get(), 2);
        // Once closed, the last batch goes out and later lines are dropped.
        b.lock().closed = true;
        let (batch, last, _) = b.take(Instant::now() + Duration::from_secs(60), Vec::new());
        assert!(last);
        assert_eq!(batch, line(6, 25));
        b.push(&line(7, 25));
        assert_eq!(b.dropped.get(), 3);
    }

    use crate::testing::warnings;

    /// The first dropped line is reported by the worker that drops it: the
    /// writer, which reported it before, is the one stuck when a pipe nobody
    /// reads filled the buffer, so drops went unreported (only counted).
    /// Reported once per episode; the writer reports its end.
    #[test]
    fn drops_are_reported_while_the_writer_is_blocked() {
        let b = Buffered::new(100, Counter::default());
        // The writer is blocked: nothing takes the lines.
        let warns = warnings(|| {
            for i in 0..10 {
                b.push(&line(i, 25));
            }
        });
        assert_eq!(b.dropped.get(), 6);
        assert_eq!(warns.len(), 1, "{warns:?}");
        assert!(warns[0].contains("the buffer is full"), "{warns:?}");
        // The writer gets going: a batch that saw drops says nothing yet, the
        // next one without drops says they ended.
        let mut seen = 0;
        let warns = warnings(|| {
            b.take(Instant::now(), Vec::new());
            b.settle(&mut seen);
            b.take(Instant::now(), Vec::new());
            b.settle(&mut seen);
        });
        assert_eq!(warns.len(), 1, "{warns:?}");
        assert!(warns[0].contains("fit in the buffer again"), "{warns:?}");
        // A new episode is reported again.
        let warns = warnings(|| {
            for i in 0..6 {
                b.push(&line(i, 25));
            }
        });
        assert_eq!(warns.len(), 1, "{warns:?}");
        assert_eq!(b.dropped.get(), 8);
    }

    #[test]
    fn the_writer_is_woken_once_per_batch() {
        let b = Buffered::new(1 << 20, Counter::default());
        let wakes = (0..200)
            .filter(|&i| b.push(&line(i, 1000)))
            .collect::<Vec<_>>();
        // The 66th line of 1000 bytes passes 64KiB; later lines do not wake again.
        assert_eq!(wakes, [65]);
    }

    #[test]
    fn pipe_writes_are_cut_at_line_ends() {
        let long = line(99, 5000);
        let batch = [
            line(0, 3000),
            line(1, 1000),
            line(2, 200),
            long,
            line(3, 10),
        ]
        .concat();
        let got: Vec<&[u8]> = pieces(&batch, PIPE_BUF).collect();
        assert_eq!(got.concat(), batch);
        assert_eq!(
            got.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [4000, 200, 5000, 10]
        );
        assert!(got.iter().all(|p| p.ends_with(b"\n")));
        assert_eq!(pieces(&batch, usize::MAX).collect::<Vec<_>>(), [&batch[..]]);
    }

    #[test]
    fn close_writes_every_line_handed_over() {
        let dir = std::env::temp_dir().join(format!("legate-alog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("close.log");
        let _ = std::fs::remove_file(&path);
        let cfg = config::AccessLog {
            path: path.display().to_string(),
            // Longer than the test: only `close` can have written the lines.
            flush_interval: config::Dur::secs(60),
            buffer_limit: config::ByteSize(16 << 20),
            format: None,
            json_format: None,
            filter: None,
        };
        let stats = Stats::new();
        let log = Writer::open(&cfg, &stats, true).unwrap();
        for i in 0..10 {
            log.hand_over(serde_json::to_vec(&serde_json::json!({ "i": i })).unwrap());
        }
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let got: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let want: Vec<serde_json::Value> = (0..10).map(|i| serde_json::json!({ "i": i })).collect();
        assert_eq!(got, want);
        // After close a line is dropped and counted, not written.
        log.hand_over(serde_json::to_vec(&serde_json::json!({ "i": 10 })).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert_eq!(
            stats
                .counter("legate_access_log_dropped_total", "", &[])
                .get(),
            1
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reopen_writes_the_waiting_lines_then_opens_the_path_again() {
        let dir = std::env::temp_dir().join(format!("legate-alog-reopen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.log");
        let moved = dir.join("a.log.1");
        let _ = std::fs::remove_file(&path);
        let cfg = config::AccessLog {
            path: path.display().to_string(),
            // Longer than the test: only `reopen` and `close` write.
            flush_interval: config::Dur::secs(60),
            buffer_limit: config::ByteSize(16 << 20),
            format: None,
            json_format: None,
            filter: None,
        };
        let log = Writer::open(&cfg, &Stats::new(), true).unwrap();
        log.hand_over(serde_json::to_vec(&serde_json::json!({ "i": 0 })).unwrap());
        // logrotate's `create`: the file is moved, then the signal comes.
        std::fs::rename(&path, &moved).unwrap();
        log.reopen();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !path.exists() {
            assert!(Instant::now() < deadline, "the path was not opened again");
            std::thread::sleep(Duration::from_millis(5));
        }
        log.hand_over(serde_json::to_vec(&serde_json::json!({ "i": 1 })).unwrap());
        log.close();
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "{\"i\":0}\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"i\":1}\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A reload does not wait for a FIFO's reader: without one the open
    /// fails (naming the cause); with one it succeeds, and the file is
    /// blocking again for the writer thread.
    #[test]
    fn a_fifo_without_a_reader_fails_a_reload_instead_of_waiting() {
        let dir = std::env::temp_dir().join(format!("legate-alog-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("ship");
        let _ = std::fs::remove_file(&fifo);
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let p = fifo.display().to_string();
        let e = open_log(&p, false).unwrap_err();
        assert!(format!("{e:#}").contains("FIFO no process reads"), "{e:#}");
        let _reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let f = open_log(&p, false).unwrap();
        let flags = rustix::fs::fcntl_getfl(&f).unwrap();
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn log_cfg(path: &std::path::Path, format: Option<&str>) -> config::AccessLog {
        config::AccessLog {
            path: path.display().to_string(),
            flush_interval: config::Dur::secs(60),
            buffer_limit: config::ByteSize(16 << 20),
            format: format.map(str::to_string),
            json_format: None,
            filter: None,
        }
    }

    /// Logs of one destination share its writer (one handle, one buffer),
    /// spelled differently too; other settings get a writer of their own. A
    /// listener's formats capture the union of the header fields they read.
    #[test]
    fn logs_of_one_path_share_a_writer() {
        let dir = std::env::temp_dir().join(format!("legate-alog-share-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.log");
        let _ = std::fs::remove_file(&path);
        let (writers, stats) = (Writers::default(), Stats::new());
        let a = writers.open(&log_cfg(&path, None), &stats).unwrap();
        let same = writers
            .open(&log_cfg(&dir.join(".//a.log"), None), &stats)
            .unwrap();
        assert!(Arc::ptr_eq(&a, &same));
        let mut other = log_cfg(&path, None);
        other.flush_interval = config::Dur::secs(1);
        let b = writers.open(&other, &stats).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        // Both stay registered (a reload that changed the settings drains
        // the old one): reopened and closed with the others.
        assert_eq!(writers.live().len(), 2);
        assert_eq!(writers.reopen(), 2);
        assert!(Arc::ptr_eq(
            &writers.open(&log_cfg(&path, None), &stats).unwrap(),
            &a
        ));
        drop((a, same, b));
        let logs = Logs::open(
            &[
                log_cfg(&path, Some("%REQ(X-A)% %RESP(X-R)%")),
                log_cfg(&path, Some("%REQ(X-B)% %REQ(X-A)%")),
            ],
            &writers,
            &stats,
        )
        .unwrap()
        .unwrap();
        assert_eq!(writers.live().len(), 1);
        assert_eq!(logs.wants().request, ["x-a", "x-b"]);
        assert_eq!(logs.wants().response, ["x-r"]);
        let request = [Some("1".to_string()), Some("2".to_string())];
        let response = [Some("r".to_string())];
        let mut line = Line::blank();
        line.facts.request = &request;
        line.facts.response = &response;
        logs.write(&line);
        writers.close();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1 r\n2 1\n");
        assert!(Logs::open(&[], &writers, &stats).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A writer no log uses any more writes its last lines and ends by
    /// itself; the process's close waits for it.
    #[test]
    fn a_writer_left_behind_writes_its_last_lines() {
        let dir = std::env::temp_dir().join(format!("legate-alog-left-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.log");
        let _ = std::fs::remove_file(&path);
        let (writers, stats) = (Writers::default(), Stats::new());
        let logs = Logs::open(&[log_cfg(&path, Some("%RESPONSE_CODE%"))], &writers, &stats)
            .unwrap()
            .unwrap();
        let mut line = Line::blank();
        line.status = 204;
        logs.write(&line);
        drop(logs);
        assert!(writers.live().is_empty());
        writers.close();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "204\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An existing FIFO (a log shipper's) is checked without waiting for its
    /// reader: `legate check` hung in `open` until one came, forever if none.
    #[test]
    fn check_does_not_wait_for_a_fifos_reader() {
        let dir = std::env::temp_dir().join(format!("legate-alog-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("access.fifo");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo: {made}");
        let cfg = config::AccessLog {
            path: fifo.display().to_string(),
            flush_interval: config::Dur::secs(1),
            buffer_limit: config::ByteSize(16 << 20),
            format: None,
            json_format: None,
            filter: None,
        };
        let (tx, rx) = mpsc::channel();
        // On a thread of its own: without a reader the old check never returned
        // (the thread is left blocked then; the bound only guards the test).
        std::thread::spawn(move || {
            let _ = tx.send(check(&cfg).map_err(|e| e.to_string()));
        });
        let got = rx.recv_timeout(Duration::from_secs(10));
        assert!(
            matches!(got, Ok(Ok(()))),
            "check of a FIFO without a reader: {got:?}"
        );
        // A reader present: the same.
        let cfg = config::AccessLog {
            path: fifo.display().to_string(),
            flush_interval: config::Dur::secs(1),
            buffer_limit: config::ByteSize(16 << 20),
            format: None,
            json_format: None,
            filter: None,
        };
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        assert!(check(&cfg).is_ok());
        drop(reader);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Takes `room` bytes, then fails until given more room.
    struct Full {
        out: Vec<u8>,
        room: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::other("no space left"));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_cut_mid_line_leaves_the_next_lines_whole() {
        let mut w = Full {
            out: Vec::new(),
            room: 5,
        };
        let mut mid = false;
        assert!(write_whole(&mut w, b"{\"i\":0}\n", &mut mid).is_err());
        assert!(mid);
        w.room = 100;
        write_whole(&mut w, b"{\"i\":1}\n", &mut mid).unwrap();
        assert!(!mid);
        assert_eq!(w.out, b"{\"i\":\n{\"i\":1}\n");
        // A write that failed before any byte leaves no empty line.
        w.room = 0;
        assert!(write_whole(&mut w, b"{\"i\":2}\n", &mut mid).is_err());
        assert!(!mid);
    }
}
