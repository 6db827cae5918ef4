//! Hot restart (binary upgrade), as Pingora and Envoy do it: the new process takes
//! the running one's listening sockets, so no connection is refused and no request
//! fails across the switch.
//!
//! Every `legate run` serves an upgrade socket, a Unix socket (default: the config
//! file's path plus `.upgrade.sock`; `--upgrade-socket PATH`). `legate run
//! --upgrade` (same config, usually a new binary):
//!
//! 1. connects to it and sends `FDS`; the running process answers with a JSON line
//!    naming its listeners (name, address) and passes their sockets, then its admin
//!    socket, by `SCM_RIGHTS` (in batches of 250: Linux passes at most 253 in one
//!    message);
//! 2. starts with those sockets (a listener whose address is unchanged adopts the
//!    socket: the one of its name, or, renamed, the one at its address that no
//!    listener of that name keeps; others are bound as usual; the admin socket is
//!    adopted if it is bound at the new config's `admin.address`, else that
//!    address is bound, and a failure to bind it fails the upgrade), waits until
//!    its `dns` clusters have their first answers (each at most its
//!    `initial_fetch_timeout`: a connection it took before could only get 503),
//!    and accepts — both processes now accept on the same sockets, so
//!    connections queue in one backlog whoever accepts them;
//! 3. sends `DRAIN` with the names of the listeners whose sockets it adopted
//!    and whether it adopted the admin socket ([`Adopted`]): the old process
//!    stops accepting (including on the admin socket) and drains as on SIGTERM
//!    (in-flight requests finish; HTTP/1.1 connections get `Connection: close`
//!    on their next response, HTTP/2 a GOAWAY), answers `OK`, and exits when
//!    drained. A socket the new process did not adopt (its config dropped or
//!    moved that listener, or the admin address) stops listening at once, as on
//!    SIGTERM: a client is refused there instead of waiting in a backlog no one
//!    accepts from until the old process exits. (The adopted ones stay open:
//!    the new process serves on them.) With an older Legate on either side,
//!    which sends a bare `DRAIN` or does not offer [`Offer::adoption`], every
//!    socket is kept listening until the old process exits, as before;
//! 4. takes over the upgrade socket path for the next upgrade.
//!
//! If the new process fails before step 3 (bad config, crash), the old one keeps
//! serving: the handover is not committed until `DRAIN`.
//!
//! Whoever can connect to the upgrade socket can take the listening sockets and
//! drain the proxy, so the socket is made with mode 0600 whatever the umask
//! (`bind_private`), and a peer whose `SO_PEERCRED` uid is neither this
//! process's effective uid nor root is refused (`check_peer`).
//!
//! Counters and histograms (the registry's, and each cluster's by cluster name:
//! [`absorb_clusters`]) carry over, as Envoy's do across its hot restart: the
//! answer to `FDS` holds a copy of the old process's ([`Stats::carry`]), which the
//! new one adds to its own before it serves (so `/stats` never goes back), and the
//! old process sends its final copy on the same connection when it has drained,
//! of which the new one adds what was counted since the first. Gauges are per
//! process. After two hot restarts in a row the middle process may drain before
//! the first: it waits for the first one's final counts before it sends its own
//! (which include them), so none are lost ([`send_final_stats`]).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context as _};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use crate::server::Shared;
use crate::stats::Carried;

/// Most sockets one message passes: Linux refuses more than 253 (`SCM_MAX_FD`)
/// in one `SCM_RIGHTS`, so a handover of more goes in several messages.
const CHUNK_FDS: usize = 250;

/// Room for the sockets one message can carry (an older Legate sent up to 250).
const SCM_MAX_FD: usize = 253;

/// The default upgrade socket of a config file: next to it.
pub fn default_socket(config: &Path) -> PathBuf {
    let mut s = config.as_os_str().to_owned();
    s.push(".upgrade.sock");
    PathBuf::from(s)
}

#[derive(Serialize, Deserialize)]
struct Offer {
    pid: u32,
    /// In the order of the passed sockets; the admin socket comes after them.
    listeners: Vec<Passed>,
    admin: bool,
    /// The old process understands `DRAIN` followed by [`Adopted`] (absent from
    /// a Legate that predates it, which is sent a bare `DRAIN`).
    #[serde(default)]
    adoption: bool,
    /// The old process's counters and histograms when it passed the sockets
    /// (absent from a Legate that predates carrying them).
    #[serde(default)]
    stats: Carried,
}

/// What the new process serves on of what it was passed: sent with `DRAIN`,
/// so the old process stops listening on the rest.
#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// The listeners (their names in the [`Offer`]) whose sockets it adopted.
    pub listeners: Vec<String>,
    /// Whether it adopted the admin socket.
    pub admin: bool,
}

/// A socket's identity whatever descriptor refers to it (a reload duplicates
/// a kept listener's socket): its device and inode.
pub type SocketId = (u64, u64);

/// The identity of socket `s`, if `fstat` works on it.
#[allow(
    clippy::unnecessary_cast,
    reason = "`st_dev` and `st_ino` are not u64 on every target"
)]
pub fn socket_id(s: &impl AsFd) -> Option<SocketId> {
    rustix::fs::fstat(s)
        .ok()
        .map(|st| (st.st_dev as u64, st.st_ino as u64))
}

/// Parses the new process's go-ahead: `DRAIN` alone (a Legate that does not
/// say what it adopted: `None`) or `DRAIN {json}`. A new process that failed
/// to start sends `FAIL` and its error as a JSON string ([`Inherited::refuse`]);
/// one that exited without a word (killed, stopped by a signal while
/// starting, or an older Legate that failed) closed the connection.
fn parse_drain(line: &str) -> anyhow::Result<Option<Adopted>> {
    if line.is_empty() {
        bail!(
            "the new process did not take over: it exited before it served (see its \
             log: a bad config, a crash, or stopped while starting)"
        );
    }
    let line = line.trim();
    if let Some(reason) = line.strip_prefix("FAIL ") {
        let reason = serde_json::from_str::<String>(reason).unwrap_or_else(|_| reason.to_string());
        bail!("the new process did not take over: {reason}");
    }
    match line.strip_prefix("DRAIN") {
        Some("") => Ok(None),
        Some(rest) if rest.starts_with(' ') => Ok(Some(
            serde_json::from_str(rest.trim()).context("the sockets the new process adopted")?,
        )),
        _ => bail!("the new process did not take over (it sent {line:?})"),
    }
}

#[derive(Serialize, Deserialize)]
struct Passed {
    name: String,
    address: String,
}

/// Sends the line `data` with the sockets `fds`, in order. Sockets beyond one
/// message's worth go first, each batch with one space (leading whitespace the
/// JSON line allows); the last batch goes with the line. Up to [`CHUNK_FDS`]
/// sockets this is the single message older Legates send and expect.
fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let batches: Vec<&[BorrowedFd<'_>]> = fds.chunks(CHUNK_FDS).collect();
    let Some((last, first)) = batches.split_last() else {
        return (&*stream).write_all(data);
    };
    for batch in first {
        send_batch(stream, b" ", batch)?;
    }
    send_batch(stream, data, last)
}

fn send_batch(stream: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many sockets for one message"));
    }
    let sent = sendmsg(
        stream,
        &[IoSlice::new(data)],
        &mut control,
        SendFlags::empty(),
    )?;
    // The sockets went with the first byte; the rest is plain data.
    (&*stream).write_all(&data[sent..])
}

/// Receives one line and every socket sent with it ([`send_with_fds`]). Each
/// read is a `recvmsg`: a plain read of a message that carries sockets would
/// close them. The kernel ends a read at each message with sockets, so one
/// read takes at most one batch.
fn recv_with_fds(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(SCM_MAX_FD))];
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while !buf.ends_with(b"\n") {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut chunk)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(passed) = msg {
                fds.extend(passed);
            }
        }
        if got.flags.contains(ReturnFlags::CTRUNC) {
            return Err(io::Error::other(
                "the running Legate passed more sockets in one message than fit",
            ));
        }
        if got.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the running Legate closed the upgrade connection mid-message",
            ));
        }
        buf.extend_from_slice(&chunk[..got.bytes]);
    }
    Ok((buf, fds))
}

/// The upgrade socket a process serves ([`serve`]): its file is removed when
/// the process stops, unless a successor took the path over.
pub struct UpgradeSocket {
    path: PathBuf,
    handed_over: tokio::sync::watch::Receiver<bool>,
}

impl UpgradeSocket {
    /// Removes the socket file, unless it now belongs to the process this one
    /// handed over to. Called once the drain began: the serving thread removes
    /// it too, but only at its next poll, which a quick exit does not wait
    /// for (the file was left behind).
    pub fn remove(&self) {
        if !*self.handed_over.borrow() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves upgrade requests on `path` for the running process, whose admin socket
/// is `admin` (a duplicate). Fails if another live process serves on `path`,
/// unless `replace` (this process just took over from it).
pub fn serve(
    shared: &Arc<Shared>,
    path: &Path,
    admin: std::net::TcpListener,
    replace: bool,
) -> anyhow::Result<UpgradeSocket> {
    if replace {
        let _ = std::fs::remove_file(path);
    } else if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "another Legate serves upgrades on {}; stop it, upgrade it with `legate run \
                 --upgrade`, or give this one another --upgrade-socket",
                path.display()
            );
        }
        // A stale socket file from a process that is gone.
        let _ = std::fs::remove_file(path);
    }
    let listener = bind_private(path)
        .with_context(|| format!("binding the upgrade socket {}", path.display()))?;
    listener.set_nonblocking(true)?;
    // Receivers outlive `Shared`, so the exit decision works even after it is gone.
    let (draining, handed_over) = (shared.drain_signal(), shared.handed_over.subscribe());
    let socket = UpgradeSocket {
        path: path.to_path_buf(),
        handed_over: shared.handed_over.subscribe(),
    };
    let shared = Arc::downgrade(shared);
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("legate-upgrade".into())
        .spawn(move || loop {
            let s = shared.upgrade();
            if s.is_none() || *draining.borrow() {
                // After a handover the path belongs to the new process.
                if !*handed_over.borrow() {
                    let _ = std::fs::remove_file(&path);
                }
                return;
            }
            let Some(s) = s else { return };
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = check_peer(&stream) {
                        tracing::warn!("hot restart: refused a connection: {e:#}");
                    } else if let Err(e) = hand_over(&s, &admin, stream) {
                        tracing::error!("hot restart: {e:#}; still serving");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(s);
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::warn!("upgrade socket accept: {e}");
                    drop(s);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
        .context("starting the upgrade thread")?;
    Ok(socket)
}

/// Binds a Unix socket at `path` (replacing what is there) that only this
/// user can connect to: mode 0600 whatever the umask, with no moment at another
/// mode. It is bound in a fresh directory of mode 0700 next to `path`, where no
/// one else can reach it, made 0600, then renamed into place. (A socket's mode
/// cannot be set before `bind` creates it, and `fchmod` on it does not change
/// the file; setting the umask around `bind` would change it for every thread.)
fn bind_private(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut private = name.to_owned();
    private.push(format!(".{}.tmp", std::process::id()));
    let dir = path.with_file_name(private);
    // Left by a process of this pid that died here.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let bound = (|| {
        // The umask may have taken the owner's bits too.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let socket = dir.join("socket");
        let listener = UnixListener::bind(&socket)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&socket, path)?;
        io::Result::Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(bound?)
}

/// Refuses a peer that is neither this process's user nor root (by the
/// credentials the kernel recorded when it connected).
fn check_peer(stream: &UnixStream) -> anyhow::Result<()> {
    let peer = rustix::net::sockopt::socket_peercred(stream).context("SO_PEERCRED")?;
    let me = rustix::process::geteuid();
    if peer.uid == me || peer.uid.is_root() {
        return Ok(());
    }
    bail!(
        "process {} runs as uid {}, neither this process's uid {} nor root",
        peer.pid.as_raw_nonzero(),
        peer.uid.as_raw(),
        me.as_raw()
    )
}

/// The old process's side of one upgrade.
fn hand_over(
    shared: &Shared,
    admin: &std::net::TcpListener,
    stream: UnixStream,
) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    // The new process may take long to start (compiling plugins), but not forever.
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim() != "FDS" {
        bail!("unexpected upgrade request {:?}", line.trim());
    }
    let set = shared.listener_set();
    let offer = Offer {
        pid: std::process::id(),
        listeners: set
            .iter()
            .map(|b| Passed {
                name: b.ctx.name.to_string(),
                address: b.ctx.cfg.address.value.clone(),
            })
            .collect(),
        admin: true,
        adoption: true,
        stats: carry(shared),
    };
    let mut fds: Vec<BorrowedFd<'_>> = set.iter().map(|b| b.socket.as_fd()).collect();
    fds.push(admin.as_fd());
    let mut msg = serde_json::to_vec(&offer)?;
    msg.push(b'\n');
    send_with_fds(&stream, &msg, &fds)?;
    tracing::info!(
        "hot restart: passed {} sockets; waiting for the new process",
        fds.len()
    );
    line.clear();
    reader.read_line(&mut line)?;
    let adopted = parse_drain(&line)?;
    if let Some(a) = &adopted {
        let ids = set
            .iter()
            .filter(|b| a.listeners.iter().any(|n| *n == b.ctx.name.as_str()))
            .filter_map(|b| socket_id(&b.socket))
            .collect();
        *shared
            .adopted
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(ids);
        if !a.admin {
            // The new process bound another admin address: this one is not
            // served after this process, so it stops listening now.
            let _ = socket2::SockRef::from(admin).shutdown(std::net::Shutdown::Read);
        }
        let released = set
            .iter()
            .filter(|b| !a.listeners.iter().any(|n| *n == b.ctx.name.as_str()))
            .count();
        if released > 0 || !a.admin {
            tracing::info!(
                "hot restart: the new process did not take {released} listening socket(s){}; \
                 they stop listening now",
                if a.admin { "" } else { " and the admin socket" }
            );
        }
    }
    // Held from before the drain starts until `OK` is sent and the stream is
    // kept for the final counts ([`send_final_stats`]): a process with nothing
    // in flight drains at once, and its last step found no successor, so it
    // exited without waiting for its predecessor's counts (which then met a
    // broken pipe) and, before `OK` was sent, left the new process unsure it
    // had taken over.
    let mut successor = shared
        .successor
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    shared.handed_over.send_replace(true);
    shared.start_drain();
    (&stream).write_all(b"OK\n")?;
    *successor = Some(stream);
    drop(successor);
    tracing::info!("hot restart: the new process took over; draining");
    Ok(())
}

/// The old process's last step, once drained: its final counters and histograms
/// go to the process that took over (nothing if none did). A failure is logged:
/// the counts made while draining are then missing from the new process.
///
/// `predecessor` is the thread that receives the final counts of the process
/// this one took over from ([`Inherited::finish`]). Two hot restarts in a row
/// can leave that one still draining when this one has drained (it handed over
/// to a third): this one then waits for those counts (or that process's exit,
/// within its `drain_timeout`), adds them, and sends them on with its own, so
/// what the first process counted while draining still reaches the newest.
pub fn send_final_stats(shared: &Shared, predecessor: Option<std::thread::JoinHandle<()>>) {
    let Some(stream) = shared
        .successor
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    else {
        return;
    };
    if let Some(p) = predecessor {
        if !p.is_finished() {
            tracing::info!(
                "hot restart: waiting for the final counts of the process this one took \
                 over from, to pass them on"
            );
        }
        let _ = p.join();
    }
    let sent = serde_json::to_vec(&carry(shared))
        .map_err(io::Error::other)
        .and_then(|mut line| {
            line.push(b'\n');
            (&stream).write_all(&line)
        });
    if let Err(e) = sent {
        tracing::warn!("hot restart: the final counts did not reach the new process: {e}");
    }
}

/// This process's counts to hand over: the registry's counters and histograms,
/// and each cluster's counters.
fn carry(shared: &Shared) -> Carried {
    let mut carried = shared.stats.carry();
    let snap = shared.snapshot.load();
    carried.clusters = snap
        .clusters
        .iter()
        .map(|(name, entry)| {
            let counters = entry.cluster().stats.snapshot().into_iter();
            let counters = counters.filter(|(n, _)| !crate::cluster::is_gauge(n));
            let counters = counters.map(|(n, v)| (n.to_string(), v)).collect();
            (name.to_string(), counters)
        })
        .collect();
    carried
}

/// Adds to the clusters of `snapshot` what the old process's clusters of the
/// same names counted in `now` since `before` (its previous copy, if any): a
/// cluster's counters go on across a hot restart as the registry's do. A
/// cluster the new config no longer has is dropped.
pub fn absorb_clusters(
    snapshot: &crate::server::Snapshot,
    now: &Carried,
    before: Option<&Carried>,
) {
    for (name, counters) in &now.clusters {
        let Some(entry) = crate::config::Name::new(name)
            .ok()
            .and_then(|n| snapshot.clusters.get(&n))
        else {
            continue;
        };
        let was = before
            .and_then(|b| b.clusters.iter().find(|(n, _)| n == name))
            .map(|(_, c)| c.as_slice())
            .unwrap_or_default();
        let cluster = entry.cluster();
        for (counter, v) in counters {
            let prev = was
                .iter()
                .find(|(n, _)| n == counter)
                .map_or(0, |(_, p)| *p);
            cluster.stats.add_to(counter, v.saturating_sub(prev));
        }
    }
}

/// What the new process got from the running one.
pub struct Inherited {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// Listening sockets by listener name: (configured address, socket).
    pub listeners: HashMap<String, (String, std::net::TcpListener)>,
    /// The admin socket.
    pub admin: Option<std::net::TcpListener>,
    /// The old process.
    pub pid: u32,
    /// The old process's counters and histograms when it passed the sockets: to
    /// start from ([`crate::server::ProcessOptions::inherited_stats`]).
    pub stats: Carried,
    /// The old process takes [`Adopted`] with `DRAIN`.
    adoption: bool,
}

/// Connects to the running process on `path` and receives its sockets.
pub fn take_over(path: &Path) -> anyhow::Result<Inherited> {
    let stream = UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to the running Legate's upgrade socket {} (is it running with this \
             config? see --upgrade-socket)",
            path.display()
        )
    })?;
    (&stream).write_all(b"FDS\n")?;
    let (msg, fds) = recv_with_fds(&stream).context("receiving the listening sockets")?;
    let offer: Offer = serde_json::from_slice(&msg).context("the running Legate's answer")?;
    let want = offer.listeners.len() + usize::from(offer.admin);
    if fds.len() != want {
        bail!(
            "expected {want} sockets from the running Legate, got {}",
            fds.len()
        );
    }
    let mut fds = fds.into_iter();
    let mut listeners = HashMap::new();
    for (p, fd) in offer.listeners.into_iter().zip(fds.by_ref()) {
        listeners.insert(p.name, (p.address, std::net::TcpListener::from(fd)));
    }
    let admin = fds.next().map(std::net::TcpListener::from);
    let reader = BufReader::new(stream.try_clone()?);
    tracing::info!(
        "hot restart: took {} listening sockets from process {}",
        listeners.len(),
        offer.pid
    );
    Ok(Inherited {
        stream,
        reader,
        listeners,
        admin,
        pid: offer.pid,
        stats: offer.stats,
        adoption: offer.adoption,
    })
}

impl Inherited {
    /// Tells the old process that this one failed to start, and why (`FAIL`
    /// and the error as a JSON string): it keeps serving and logs the reason.
    /// An old process that predates `FAIL` logs it as an unexpected line.
    pub fn refuse(self, reason: &anyhow::Error) {
        let mut line = b"FAIL ".to_vec();
        if serde_json::to_writer(&mut line, &format!("{reason:#}")).is_ok() {
            line.push(b'\n');
            let _ = (&self.stream).write_all(&line);
        }
    }

    /// Tells the old process to stop accepting and drain (call once this process
    /// serves on the sockets `adopted` says); waits for its `OK`. Its final
    /// counts, sent when it has drained, are added to `stats` as they arrive,
    /// by the thread returned (done when they arrived or the old process
    /// exited): [`send_final_stats`] waits for it.
    pub fn finish(
        mut self,
        shared: Arc<Shared>,
        adopted: &Adopted,
    ) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let mut go = b"DRAIN".to_vec();
        if self.adoption {
            go.push(b' ');
            serde_json::to_writer(&mut go, adopted)?;
        }
        go.push(b'\n');
        (&self.stream).write_all(&go)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if line.trim() != "OK" {
            bail!(
                "the old process did not confirm the handover ({:?})",
                line.trim()
            );
        }
        tracing::info!("hot restart: process {} is draining", self.pid);
        let Inherited {
            mut reader,
            stats: first,
            pid,
            ..
        } = self;
        let thread = std::thread::Builder::new()
            .name("legate-upgrade-stats".into())
            .spawn(move || {
                let mut line = String::new();
                // EOF: the old process exited (an older Legate sends nothing).
                match reader.read_line(&mut line) {
                    Ok(0) => {}
                    Ok(_) => match serde_json::from_str::<Carried>(&line) {
                        Ok(last) => {
                            shared.stats.absorb(&last, Some(&first));
                            absorb_clusters(&shared.snapshot.load(), &last, Some(&first));
                            tracing::info!(
                                "hot restart: process {pid} drained; its counts are added"
                            );
                        }
                        Err(e) => tracing::warn!("hot restart: process {pid}'s final counts: {e}"),
                    },
                    Err(e) => tracing::warn!("hot restart: process {pid}'s final counts: {e}"),
                }
            })
            .context("starting the upgrade stats thread")?;
        Ok(thread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The upgrade socket gives nobody but its owner access, even under umask 0
    /// (with which `bind` makes it 0777), and it replaces a stale file.
    #[test]
    fn the_upgrade_socket_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("legate-upgrade-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("legate.yaml.upgrade.sock");
        std::fs::write(&path, "stale").unwrap();
        let old = rustix::process::umask(rustix::fs::Mode::empty());
        let bound = bind_private(&path);
        rustix::process::umask(old);
        let listener = bound.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        // The socket at `path` is the one listening, and nothing is left behind.
        let _client = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `DRAIN` alone is an older Legate's (every socket kept); with what was
    /// adopted, the rest is released; anything else fails the handover.
    #[test]
    fn the_go_ahead_says_what_the_new_process_adopted() {
        assert_eq!(parse_drain("DRAIN\n").unwrap(), None);
        let a = Adopted {
            listeners: vec!["web".into()],
            admin: false,
        };
        let line = format!("DRAIN {}\n", serde_json::to_string(&a).unwrap());
        assert_eq!(parse_drain(&line).unwrap(), Some(a));
        assert!(parse_drain("DRAINED\n").is_err());
        assert!(parse_drain("DRAIN {\n").is_err());
        assert!(parse_drain("FDS\n").is_err());
    }

    /// A failed new process's reason reaches the old one's log; one that
    /// exited without a word is said to have.
    #[test]
    fn a_refusal_says_why() {
        let e = parse_drain("FAIL \"starting legate: plugin `x`: no such file\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the new process did not take over: starting legate: plugin `x`: no such file"
        );
        let e = parse_drain("").unwrap_err().to_string();
        assert!(e.contains("exited before it served"), "{e}");
    }

    /// A duplicated descriptor is the same socket; another socket is not.
    #[test]
    fn a_socket_is_known_whatever_its_descriptor() {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let id = socket_id(&a).unwrap();
        assert_eq!(socket_id(&a.try_clone().unwrap()), Some(id));
        assert_ne!(socket_id(&b), Some(id));
    }

    #[test]
    fn a_peer_of_this_user_is_accepted() {
        let (a, _b) = UnixStream::pair().unwrap();
        check_peer(&a).unwrap();
    }
}
