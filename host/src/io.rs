//! Byte streams: plain or TLS TCP ([`Conn`]); [`Tracked`], which records when a
//! downstream connection last moved bytes (or, for a TCP proxy, its upstream
//! socket: [`Tracked::other`]) so the connection task can enforce the
//! idle and header-read timeouts without a timer per read (and an HTTP/1.1
//! response's stream idle timeout sees its progress there:
//! [`Activity::last_progress`]); and [`Reclaim`], which gives a stream back
//! when hyper is done with it (for a lingering close).

use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

/// A TCP stream, optionally wrapped in TLS (client or server side).
pub enum Conn {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<TlsStream<TcpStream>>),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Conn::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

const NONE: u64 = u64::MAX;

/// When a connection last moved bytes, whether a request head is being read, and
/// how many requests are in flight. Atomics only because hyper wants `Send` I/O;
/// one worker touches them.
pub struct Activity {
    base: Instant,
    last_ms: AtomicU64,
    /// The last write that moved bytes, or the client's last acknowledgement
    /// of new bytes seen ([`Activity::last_progress`]) (`NONE`: none yet).
    last_write_ms: AtomicU64,
    /// The TCP socket, for its acknowledged byte count (-1: not known).
    fd: AtomicI32,
    /// The client's acknowledged byte count when last looked at.
    acked: AtomicU64,
    head_start_ms: AtomicU64,
    in_flight: AtomicUsize,
    rx: AtomicU64,
    tx: AtomicU64,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// When a request last started or finished: an HTTP/2 connection's
    /// idleness counts from it, not from its frames (a client's pings).
    last_request_ms: AtomicU64,
    /// 0 = protocol not known yet, 1 = HTTP/1, 2 = HTTP/2.
    proto: AtomicU8,
    /// The client ended its side: a read saw EOF or failed.
    read_closed: AtomicBool,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the watchdog should do.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing yet; look again at this instant.
    WaitUntil(Instant),
    /// No request and no bytes for the idle timeout: close gracefully.
    Idle,
    /// A request head has been arriving for longer than the header timeout.
    HeaderTimeout,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            last_write_ms: AtomicU64::new(NONE),
            fd: AtomicI32::new(-1),
            acked: AtomicU64::new(0),
            head_start_ms: AtomicU64::new(NONE),
            in_flight: AtomicUsize::new(0),
            rx: AtomicU64::new(0),
            tx: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            last_request_ms: AtomicU64::new(0),
            proto: AtomicU8::new(0),
            read_closed: AtomicBool::new(false),
        }
    }
}

impl Activity {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    /// Marks the connection as HTTP/2 (ALPN said so).
    pub fn set_h2(&self) {
        self.proto.store(2, Relaxed);
    }

    /// Learns the protocol from the first bytes a client sends.
    fn sniff(&self, first: &[u8]) {
        let n = first.len().min(H2_PREFACE.len());
        let h2 = first[..n] == H2_PREFACE[..n];
        self.proto.store(if h2 { 2 } else { 1 }, Relaxed);
    }

    fn on_read(&self, n: usize) {
        self.rx.fetch_add(n as u64, Relaxed);
        let now = self.now_ms();
        self.last_ms.store(now, Relaxed);
        if self.in_flight.load(Relaxed) == 0 && self.head_start_ms.load(Relaxed) == NONE {
            self.head_start_ms.store(now, Relaxed);
        }
    }

    /// Bytes moved on another socket of the connection (a TCP proxy's
    /// upstream): activity for the idle timer, not the client's bytes.
    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Relaxed);
    }

    fn on_write(&self, n: usize) {
        self.tx.fetch_add(n as u64, Relaxed);
        let now = self.now_ms();
        self.last_ms.store(now, Relaxed);
        self.last_write_ms.store(now, Relaxed);
    }

    /// The connection's TCP socket, which [`Activity::last_progress`] asks
    /// how much the client acknowledged. Its owner (the connection) outlives
    /// every look.
    pub fn set_socket(&self, s: &TcpStream) {
        #[cfg(unix)]
        self.fd.store(std::os::fd::AsRawFd::as_raw_fd(s), Relaxed);
        #[cfg(not(unix))]
        let _ = s;
    }

    /// When the response last made its way to the client (to the
    /// millisecond), if it did: a write that moved bytes, or, seen now, the
    /// client acknowledging bytes since the last look (it read: its window
    /// opened). The kernel's send buffer (megabytes, autotuned) drains into a
    /// slow reader for long without a write; its acknowledgements show it
    /// reads. An HTTP/1.1 connection's one stream in flight.
    pub fn last_progress(&self) -> Option<Instant> {
        if let Some(acked) = tcp_bytes_acked(self.fd.load(Relaxed)) {
            if self.acked.swap(acked, Relaxed) != acked {
                self.last_write_ms.store(self.now_ms(), Relaxed);
            }
        }
        let ms = self.last_write_ms.load(Relaxed);
        (ms != NONE).then(|| self.at(ms))
    }

    /// When the first byte of the request head being read arrived, if one is
    /// (for the access-log line of a head hyper refused).
    pub fn head_started(&self) -> Option<Instant> {
        let ms = self.head_start_ms.load(Relaxed);
        (ms != NONE).then(|| self.at(ms))
    }

    /// A request head was parsed: the header timer stops, the request counts.
    pub fn request_started(&self) {
        self.requests.fetch_add(1, Relaxed);
        self.in_flight.fetch_add(1, Relaxed);
        self.head_start_ms.store(NONE, Relaxed);
        self.last_request_ms.store(self.now_ms(), Relaxed);
    }

    /// A response finished (or was abandoned).
    pub fn request_finished(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
        let now = self.now_ms();
        self.last_ms.store(now, Relaxed);
        self.last_request_ms.store(now, Relaxed);
    }

    /// Bytes read and written so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.rx.load(Relaxed), self.tx.load(Relaxed))
    }

    /// Whether the client spoke HTTP/1.x.
    pub fn is_h1(&self) -> bool {
        self.proto.load(Relaxed) == 1
    }

    /// Whether the client ended its side (EOF or a read error): it sends no more.
    pub fn read_closed(&self) -> bool {
        self.read_closed.load(Relaxed)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Decides whether a timeout has passed.
    ///
    /// The header timer runs from the first byte of a request head until the
    /// request starts. HTTP/2 connections are held to it only until the client's
    /// connection preface is in: afterwards their frames (settings, pings,
    /// window updates) are not heads, and a connection made ahead of its first
    /// request (a gRPC channel, a browser's preconnect) is idle, not slow.
    /// `header_timeout` is `None` for streams that carry no HTTP (the TCP proxy).
    pub fn check(&self, idle: Duration, header_timeout: Option<Duration>) -> Verdict {
        let now = self.now_ms();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE - 1);
        // An HTTP/2 connection is idle while it carries no request (since the
        // last one ended, or since it was accepted), whatever frames it
        // exchanges: a client pinging more often than the idle timeout (h2
        // answers each ping, which moves bytes too) would otherwise hold its
        // connection slot for ever, as Envoy's idle timeout does not allow
        // either. HTTP/1.x and TCP count bytes: a byte there is a new head
        // (under the header timer) or stream data.
        let h2 = self.proto.load(Relaxed) == 2;
        let since = if h2 {
            self.last_request_ms.load(Relaxed)
        } else {
            self.last_ms.load(Relaxed)
        };
        let idle_end = since.saturating_add(ms(idle));
        if self.in_flight.load(Relaxed) > 0 {
            return Verdict::WaitUntil(self.at(now.saturating_add(ms(idle))));
        }
        let header_timeout = header_timeout.filter(|_| {
            !h2 || (self.requests.load(Relaxed) == 0
                && self.rx.load(Relaxed) < H2_PREFACE.len() as u64)
        });
        let mut wake = idle_end;
        if let Some(ht) = header_timeout {
            let start = self.head_start_ms.load(Relaxed);
            if start != NONE {
                let end = start.saturating_add(ms(ht));
                if now >= end {
                    return Verdict::HeaderTimeout;
                }
                wake = wake.min(end);
            } else {
                // Bytes of a new head may arrive at any moment without waking the
                // watchdog; look again soon so a slow head is cut within 1.25x.
                wake = wake.min(now.saturating_add((ms(ht) / 4).max(10)));
            }
        }
        if now >= idle_end {
            return Verdict::Idle;
        }
        Verdict::WaitUntil(self.at(wake))
    }
}

/// The bytes the peer of TCP socket `fd` acknowledged (Linux `TCP_INFO`),
/// if the OS tells.
#[cfg(target_os = "linux")]
fn tcp_bytes_acked(fd: i32) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    // SAFETY: an all-zero `tcp_info` is valid (plain integers).
    #[allow(unsafe_code)]
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes through the valid,
    // exclusively borrowed pointer, and stores the length it wrote in `len`.
    // `fd` is the connection's socket, open while hyper serves the connection
    // (the only time the stream idle timer asks); a stale descriptor would
    // only fail or count another socket's bytes, never touch memory.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    // Kernels before 4.1 fill less, without the count.
    let end = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    (rc == 0 && usize::try_from(len).ok()? >= end).then_some(info.tcpi_bytes_acked)
}

#[cfg(not(target_os = "linux"))]
fn tcp_bytes_acked(_fd: i32) -> Option<u64> {
    None
}

/// A stream that reports its reads and writes to an [`Activity`].
pub struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
    /// The client's socket (bytes counted, protocol sniffed, end noticed);
    /// another socket of the connection only marks it active.
    client: bool,
}

impl<T> Tracked<T> {
    /// Wraps `inner`, the client's socket.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Tracked {
            inner,
            activity,
            client: true,
        }
    }

    /// Wraps `inner`, another socket of the connection (a TCP proxy's
    /// upstream): the bytes it moves keep the connection from idling out,
    /// as Envoy's TCP proxy counts upstream reads and writes, but are not
    /// the client's bytes.
    pub fn other(inner: T, activity: Arc<Activity>) -> Self {
        Tracked {
            inner,
            activity,
            client: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if !self.client {
            if n > 0 {
                self.activity.touch();
            }
            return r;
        }
        match r {
            Poll::Ready(Ok(())) if n > 0 => {
                if self.activity.proto.load(Relaxed) == 0 {
                    self.activity.sniff(&buf.filled()[before..]);
                }
                self.activity.on_read(n);
            }
            Poll::Ready(Ok(())) if room => self.activity.read_closed.store(true, Relaxed),
            Poll::Ready(Err(_)) => self.activity.read_closed.store(true, Relaxed),
            _ => {}
        }
        r
    }
}

impl<T> Tracked<T> {
    fn wrote(&self, n: usize) {
        match (n > 0, self.client) {
            (true, true) => self.activity.on_write(n),
            (true, false) => self.activity.touch(),
            (false, _) => {}
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(n);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(n);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where a [`Reclaim`]ed stream comes back.
pub type Reclaimed<T> = Arc<Mutex<Option<T>>>;

/// A stream that goes back to its owner when dropped. hyper owns a downstream
/// connection's stream while it serves it and drops it when the connection ends
/// (it has no way to hand it back from an `auto` connection); the connection
/// task takes it from [`Reclaimed`] for a lingering close instead of closing it
/// there and then.
pub struct Reclaim<T> {
    /// `None` only once dropped.
    inner: Option<T>,
    back: Reclaimed<T>,
}

impl<T> Reclaim<T> {
    /// Wraps `inner`; it lands in the returned slot when the wrapper drops.
    pub fn new(inner: T) -> (Self, Reclaimed<T>) {
        let back = Reclaimed::default();
        (
            Reclaim {
                inner: Some(inner),
                back: back.clone(),
            },
            back,
        )
    }

    fn inner(&mut self) -> std::io::Result<Pin<&mut T>>
    where
        T: Unpin,
    {
        match self.inner.as_mut() {
            Some(s) => Ok(Pin::new(s)),
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

impl<T> Drop for Reclaim<T> {
    fn drop(&mut self) {
        if let (Some(s), Ok(mut back)) = (self.inner.take(), self.back.lock()) {
            *back = Some(s);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Reclaim<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.inner()?.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Reclaim<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.inner()?.poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.inner()?.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(T::is_write_vectored)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner()?.poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner()?.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let a = Activity::default();
        let zero = Duration::ZERO;
        let ten = Duration::from_secs(10);
        // No bytes, no request: idle at once with a zero idle timeout.
        assert_eq!(a.check(zero, Some(ten)), Verdict::Idle);
        // Bytes of a head arrived: the header timer runs.
        a.sniff(b"GET / HTTP/1.1\r\n");
        a.on_read(1);
        assert!(matches!(a.check(ten, Some(ten)), Verdict::WaitUntil(_)));
        assert_eq!(a.check(ten, Some(zero)), Verdict::HeaderTimeout);
        // A request in flight is never idle nor timed out.
        a.request_started();
        assert!(matches!(a.check(zero, Some(zero)), Verdict::WaitUntil(_)));
        a.request_finished();
        assert_eq!(a.check(zero, Some(ten)), Verdict::Idle);
    }

    #[tokio::test]
    async fn the_client_closing_is_seen_and_the_stream_comes_back() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (ours, mut client) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::default());
        let (ours, back) = Reclaim::new(ours);
        let mut ours = Tracked::new(ours, activity.clone());
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(ours.read(&mut buf).await.unwrap(), 3);
        assert!(activity.is_h1());
        assert!(!activity.read_closed());
        client.shutdown().await.unwrap();
        assert_eq!(ours.read(&mut buf).await.unwrap(), 0);
        assert!(activity.read_closed());
        assert!(back.lock().unwrap().is_none());
        drop(ours);
        let mut ours = back.lock().unwrap().take().unwrap();
        // The same stream, still open towards the client.
        ours.write_all(b"ok").await.unwrap();
        let mut got = [0u8; 2];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ok");
    }

    #[test]
    fn h2_is_timed_until_its_preface_is_in() {
        let a = Activity::default();
        let ten = Duration::from_secs(10);
        a.sniff(&H2_PREFACE[..10]);
        a.on_read(10);
        assert_eq!(a.check(ten, Some(Duration::ZERO)), Verdict::HeaderTimeout);
        // The preface is in: waiting for a first request is being idle.
        a.on_read(14);
        assert!(matches!(
            a.check(ten, Some(Duration::ZERO)),
            Verdict::WaitUntil(_)
        ));
        assert_eq!(a.check(Duration::ZERO, Some(ten)), Verdict::Idle);
        a.request_started();
        a.request_finished();
        // A ping after the first request is not a slow head.
        a.on_read(17);
        assert!(matches!(
            a.check(ten, Some(Duration::ZERO)),
            Verdict::WaitUntil(_)
        ));
    }

    #[test]
    fn pings_do_not_keep_an_http2_connection_from_idling() {
        let a = Activity::default();
        a.sniff(H2_PREFACE);
        a.on_read(24);
        a.request_started();
        a.request_finished();
        // Pings (and their answers) keep coming, no request does.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(30));
            a.on_read(17);
            a.on_write(17);
        }
        assert_eq!(
            a.check(Duration::from_millis(60), Some(Duration::from_secs(10))),
            Verdict::Idle
        );
        // HTTP/1.1: a byte is a new head (the header timer's), so bytes count.
        let b = Activity::default();
        b.sniff(b"GET / HTTP/1.1\r\n");
        b.on_read(16);
        b.request_started();
        b.request_finished();
        std::thread::sleep(Duration::from_millis(70));
        b.on_read(3);
        assert!(matches!(
            b.check(Duration::from_millis(60), Some(Duration::from_secs(10))),
            Verdict::WaitUntil(_)
        ));
    }
}
