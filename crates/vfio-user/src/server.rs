//! The vfio-user server: serves one [`VfioDevice`] to one owner at a time.
//!
//! A session starts with VERSION (anything else first: error reply, session closed),
//! then handles commands in arrival order on the session's thread. Each command is
//! decoded by [`crate::proto`] (every length and flag checked), routed by
//! `Session::dispatch` to one handler per command, executed on the device, and answered
//! with the payload or an error reply carrying the errno of the
//! `DeviceError`/`DmaError`/`ProtoError`. The stream stays in sync after any error in a
//! message whose header is sane (the whole message has been read); a header whose size is
//! out of range means the stream cannot be trusted and the session ends.
//!
//! Sessions and owners (as VFIO has it: one open device fd at a time). Every connection
//! is served on its own thread ([`Server::serve_listener`]); its peer must pass the
//! [`PeerPolicy`] (`SO_PEERCRED` uid, default: the server's own) and complete VERSION
//! within [`ServerConfig::handshake_timeout`], else it is closed (logged). The first
//! connection to complete VERSION becomes the device's *owner*; a VERSION arriving while
//! there is an owner is answered with an error reply, `EBUSY`, and the connection closed.
//! An error reply to VERSION is the refusal clients already handle: QEMU's vfio-user-pci
//! checks the reply's error flag and fails with that errno ("version reply: Device or
//! resource busy"), as nestio's own client does (`ClientError::Busy`), whereas a bare
//! close reads as a broken server or a lost connection. Connections that have not negotiated
//! never touch the device, so a stray connect, garbage or an early close cannot hold it.
//! At most [`ServerConfig::max_connections`] connections are served at once; beyond, a
//! new one is closed at once (logged).
//!
//! DMA: a DMA_MAP with an fd maps the client's memory in place; without an fd the
//! mapping is backed by a [`DmaPeer`] that sends DMA_READ/DMA_WRITE to the client — over
//! the twin socket when negotiated, else over the main socket through the
//! [`Endpoint`] (the server thread waiting for the DMA reply becomes the reader and
//! queues any client command it reads meanwhile).
//!
//! Nested IOMMU (nestio's extension, [`crate::nested_iommu`]): answered in VERSION only
//! to a client that proposed it, for a device with a `DmaPort`, unless
//! [`ServerConfig::nested_iommu`] is off. Its commands get ENOTSUP on a session without
//! it (whatever the payload); BIND/UNBIND/INVALIDATE are handled by the session's
//! `NestedSession`, whose reporter thread sends FAULT records where DMA_READ/WRITE go.
//! What executes them is the server's [`NestedIommuBackend`] hook: by default
//! [`Stage1Backend`] (the device's own `DmaPort`), or one given with
//! [`Server::with_nested_backend`] (a level-1 exporter forwards to the level below).
//! The session's end unbinds.
//!
//! The server survives its client. When the owner goes away (disconnect, crash
//! mid-message, garbage) the device is *released* as Linux releases a VFIO device fd
//! ([`release_device`]): every DMA mapping removed (`dma_unmap_all`), every irq eventfd
//! dropped (`set_irqs(i, Trigger, 0, 0, None)`), dirty logging stopped, and the migration
//! state brought back to RUNNING (a device stuck in ERROR is reset, the only way out);
//! the sockets and received fds are closed. Register contents are kept for the next
//! owner, as before (an explicit DEVICE_RESET clears them).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use nestio_device_model::{region_flags, DeviceError, IrqAction, IrqData, MigState, VfioDevice};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaPeer, DmaRange, Prot};

use crate::endpoint::{Endpoint, EndpointError, Incoming};
use crate::nested_iommu::{self, IommuBind, NestedIommuBackend, NestedSession, Stage1Backend};
use crate::posted_ring::{PostedRing, RingConfig};
use crate::proto::{
    self, dma_flags, feature, irq_set_flags, Capabilities, Command, DeviceFeature, DeviceInfoMsg,
    DmaAccess, DmaMap, DmaUnmap, IoFdEntry, IoFdsMsg, IoFdsReply, IrqInfoMsg, IrqSet,
    LoggingControl, LoggingReport, MigData, RegionAccess, RegionInfoMsg, RegionInfoReply, Request,
    TwinSocket, Version, WriteMulti,
};
use crate::socket::{peer_credentials, Message, PeerCredentials, SocketError};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest data count of one region/DMA/migration transfer we accept.
    pub max_data_xfer_size: u32,
    /// Most fds we accept in one message.
    pub max_msg_fds: u32,
    /// Most DMA mappings (advertised; the device's table enforces its own limit).
    pub max_dma_maps: u32,
    /// Offer a twin socket for server->client commands when the client supports it.
    pub twin_socket: bool,
    /// Accept REGION_WRITE_MULTI when the client offers it.
    pub write_multiple: bool,
    /// How long a DMA_READ/DMA_WRITE to the client may wait for its reply; on expiry the
    /// DMA fails with ETIMEDOUT and the channel it used is closed. None: forever.
    pub dma_timeout: Option<std::time::Duration>,
    /// How long a new connection may take to complete VERSION; it is then closed.
    /// None: forever (not advised: an idle connection then holds a thread).
    pub handshake_timeout: Option<Duration>,
    /// Which peers may connect (checked by `SO_PEERCRED` before anything is read).
    pub peers: PeerPolicy,
    /// Most connections served at once (the owner and those still negotiating); a
    /// connection beyond is closed at once.
    pub max_connections: usize,
    /// How long a VERSION waits for the current owner to go before it is refused with
    /// EBUSY. A client that closes and reconnects at once (a VMM restarting) races with
    /// the server noticing the close; this grace covers that race.
    pub busy_grace: Duration,
    /// Answer a client's `nestio_nested_iommu` proposal (the device walks the guest's
    /// stage 1, `crate::nested_iommu`) when the server's nested IOMMU backend offers
    /// it (the default one: when the device has a DMA port). Off: the
    /// capability is never answered, so the client falls back to shadowing.
    pub nested_iommu: bool,
    /// Answer nestio's client's posted-write ring proposal ([`crate::posted_ring`]);
    /// None: posted writes keep coming over the socket.
    pub posted_ring: Option<RingConfig>,
}

/// Who may talk to the server, by the peer's effective uid at connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Any local user that can open the socket (its file mode is the only guard).
    AnyUid,
    /// Only these uids.
    Uids(Vec<u32>),
}

impl PeerPolicy {
    /// Only the uid this process runs as (the default).
    pub fn own_uid() -> PeerPolicy {
        // SAFETY: geteuid cannot fail and takes no pointers.
        PeerPolicy::Uids(vec![unsafe { libc::geteuid() }])
    }

    /// The own uid and `extra` (`--allow-uid`).
    pub fn own_uid_and(extra: &[u32]) -> PeerPolicy {
        let PeerPolicy::Uids(mut v) = PeerPolicy::own_uid() else {
            unreachable!("own_uid is a uid list")
        };
        for u in extra {
            if !v.contains(u) {
                v.push(*u);
            }
        }
        PeerPolicy::Uids(v)
    }

    /// Does the policy let `peer` in?
    pub fn allows(&self, peer: &PeerCredentials) -> bool {
        match self {
            PeerPolicy::AnyUid => true,
            PeerPolicy::Uids(v) => v.contains(&peer.uid),
        }
    }
}

/// Default [`ServerConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`ServerConfig::busy_grace`].
pub const DEFAULT_BUSY_GRACE: Duration = Duration::from_secs(1);
/// Default [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: proto::DEFAULT_MAX_DATA_XFER,
            max_msg_fds: 64,
            max_dma_maps: proto::DEFAULT_MAX_DMA_MAPS,
            twin_socket: true,
            write_multiple: true,
            dma_timeout: Some(std::time::Duration::from_secs(10)),
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            peers: PeerPolicy::own_uid(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            busy_grace: DEFAULT_BUSY_GRACE,
            nested_iommu: true,
            posted_ring: Some(RingConfig::default()),
        }
    }
}

/// Counters of a server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Sessions started.
    pub sessions: u64,
    /// Commands handled.
    pub commands: u64,
    /// Error replies sent.
    pub error_replies: u64,
    /// Sessions that ended on a broken stream (garbage, truncation).
    pub broken_sessions: u64,
    /// Sessions that completed VERSION and owned the device.
    pub owner_sessions: u64,
    /// Connections refused: a VERSION while another client owned the device (EBUSY).
    pub refused_busy: u64,
    /// Connections refused: the peer's uid is not allowed.
    pub refused_peers: u64,
    /// Connections closed: no VERSION within the handshake timeout, or over
    /// `max_connections`.
    pub dropped_idle: u64,
}

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Socket setup failed.
    #[error("vfio-user server socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The session ended because the client broke the protocol.
    #[error("vfio-user session ended: {0}")]
    Protocol(String),
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] EndpointError),
    /// The peer's uid is not allowed (see [`PeerPolicy`]).
    #[error("refused a connection from pid {} uid {} (allowed: {policy:?}); give its uid with --allow-uid to admit it", peer.pid, peer.uid)]
    PeerRefused {
        /// Who connected.
        peer: PeerCredentials,
        /// The policy it failed.
        policy: PeerPolicy,
    },
    /// Another client owns the device; this one got EBUSY to its VERSION.
    #[error("refused a second client: the device is owned by another client (one at a time)")]
    Busy,
    /// The connection did not complete VERSION in time.
    #[error("closed a connection that sent no VERSION within {0:?}")]
    HandshakeTimeout(Duration),
}

/// A DEVICE_FEATURE the server itself does not know, handled by its owner's code (a
/// nestio-private feature such as the BAR channel grant of `nestio_nested`). Routed only
/// for feature indexes the server has no handler of its own for; an old server simply
/// answers ENOTTY to them, which is how a client learns the feature is absent.
pub trait FeatureExtension: Send + Sync {
    /// Handle DEVICE_FEATURE `index` (`flags`: GET/SET/PROBE bits, `data`: the
    /// request's data, `room`: the request's argsz, the most the reply may hold). `None`:
    /// not this extension's feature (ENOTTY).
    fn feature(
        &self,
        index: u16,
        flags: u32,
        data: &[u8],
        room: usize,
    ) -> Option<Result<FeatureReply, i32>>;
    /// The session that owned the device has ended (before the device is released).
    fn owner_left(&self) {}
}

/// What a [`FeatureExtension`] answers: the feature data after the reply's
/// `argsz, flags` header, and fds to attach to the reply.
#[derive(Debug, Default)]
pub struct FeatureReply {
    /// Feature data.
    pub data: Vec<u8>,
    /// Fds sent with the reply (closed here once sent).
    pub fds: Vec<OwnedFd>,
}

/// A vfio-user server for one device. See the module documentation.
pub struct Server {
    device: Arc<dyn VfioDevice>,
    /// What handles the nested-IOMMU extension's commands (`crate::nested_iommu`).
    nested_backend: Arc<dyn NestedIommuBackend>,
    config: ServerConfig,
    sessions: AtomicU64,
    commands: AtomicU64,
    error_replies: AtomicU64,
    broken: AtomicU64,
    owner_sessions: AtomicU64,
    owners_ended: AtomicU64,
    refused_busy: AtomicU64,
    refused_peers: AtomicU64,
    dropped_idle: AtomicU64,
    /// A client owns the device (completed VERSION, still connected).
    owned: AtomicBool,
    /// Owner sessions still allowed (u64::MAX: no limit); see [`Server::serve_owners`].
    owner_budget: AtomicU64,
    /// Set by [`Server::stop`]: serving loops return.
    stop: AtomicBool,
    /// DEVICE_FEATUREs handled outside the server ([`Server::with_extension`]).
    extension: Option<Arc<dyn FeatureExtension>>,
}

/// Listen on an owner-only (0600) socket at `path`; a stale socket file there is
/// replaced, a live one is refused (see [`crate::socket::listen_private`]).
pub fn bind(path: impl AsRef<Path>) -> Result<UnixListener, SocketError> {
    crate::socket::listen_private(path.as_ref())
}

/// [`bind`] for a server admitting `peers`: owner-only (0600) when only this process's
/// uid is admitted, else 0666 so the admitted users can connect at all — the
/// `SO_PEERCRED` check of every connection is then the gate.
pub fn bind_for(path: impl AsRef<Path>, peers: &PeerPolicy) -> Result<UnixListener, SocketError> {
    let mode = if *peers == PeerPolicy::own_uid() {
        crate::socket::SOCKET_MODE
    } else {
        0o666
    };
    crate::socket::listen_with_mode(path.as_ref(), mode)
}

/// The `__SO_ACCEPTCON` bit of the Flags column of `/proc/net/unix`: listening.
const SO_ACCEPTCON: u32 = 0x1_0000;

/// True once a UNIX socket bound to `path` is listening, as the socket table of process
/// `pid`'s network namespace (`/proc/PID/net/unix`) shows.
///
/// A server's socket file appears at bind(), a moment before listen(); a client that
/// connects in between is refused. Whoever starts a server process and waits for it
/// should wait for this, not for the file (a one-shot server cannot be probed with a
/// connect). Without a readable socket table the file's existence is all there is.
pub fn listening(pid: u32, path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
        // No table for `pid`: a restricted /proc (fall back to the file), or the
        // process is gone (then nothing listens).
        return !Path::new("/proc/self/net/unix").exists() && path.exists();
    };
    let want = path.as_os_str().to_string_lossy();
    table.lines().skip(1).any(|line| {
        // Num RefCount Protocol Flags Type St Inode Path (the path may hold spaces).
        let mut rest = line;
        let mut fields = [""; 7];
        for f in &mut fields {
            rest = rest.trim_start();
            let end = rest.find(' ').unwrap_or(rest.len());
            *f = &rest[..end];
            rest = &rest[end..];
        }
        rest.strip_prefix(' ') == Some(&*want)
            && u32::from_str_radix(fields[3], 16).is_ok_and(|fl| fl & SO_ACCEPTCON != 0)
    })
}

enum Flow {
    Continue,
    /// Refused with EBUSY: another client owns the device.
    Busy,
    Close(String),
}

impl Server {
    /// A server for `device`.
    pub fn new(device: Arc<dyn VfioDevice>, config: ServerConfig) -> Self {
        Server {
            nested_backend: Arc::new(Stage1Backend::new(device.clone())),
            device,
            config,
            sessions: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            error_replies: AtomicU64::new(0),
            broken: AtomicU64::new(0),
            owner_sessions: AtomicU64::new(0),
            owners_ended: AtomicU64::new(0),
            refused_busy: AtomicU64::new(0),
            refused_peers: AtomicU64::new(0),
            dropped_idle: AtomicU64::new(0),
            owned: AtomicBool::new(false),
            owner_budget: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            extension: None,
        }
    }

    /// Route the DEVICE_FEATUREs this server does not know to `ext`, and tell it when
    /// an owner session ends.
    pub fn with_extension(mut self, ext: Arc<dyn FeatureExtension>) -> Self {
        self.extension = Some(ext);
        self
    }

    /// Put `backend` behind the nested-IOMMU extension instead of the default
    /// [`Stage1Backend`] over the device's `DmaPort` (a level-1 exporter forwards the
    /// commands to the level below: `nestio_nested::ForwardIommu`).
    pub fn with_nested_backend(mut self, backend: Arc<dyn NestedIommuBackend>) -> Self {
        self.nested_backend = backend;
        self
    }

    /// The served device.
    pub fn device(&self) -> &Arc<dyn VfioDevice> {
        &self.device
    }

    /// Counters.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            sessions: self.sessions.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
            error_replies: self.error_replies.load(Ordering::Relaxed),
            broken_sessions: self.broken.load(Ordering::Relaxed),
            owner_sessions: self.owner_sessions.load(Ordering::Relaxed),
            refused_busy: self.refused_busy.load(Ordering::Relaxed),
            refused_peers: self.refused_peers.load(Ordering::Relaxed),
            dropped_idle: self.dropped_idle.load(Ordering::Relaxed),
        }
    }

    /// Make [`Server::serve_listener`] / [`Server::serve_owners`] return: within 50 ms,
    /// or at once on the next connection; sessions in progress are served to their end.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// True while a client owns the device.
    pub fn owned(&self) -> bool {
        self.owned.load(Ordering::Acquire)
    }

    /// Make the caller the owner, waiting up to the busy grace for the current one to go.
    fn claim_owner_within_grace(&self) -> bool {
        let t0 = std::time::Instant::now();
        loop {
            if self.claim_owner() {
                return true;
            }
            if t0.elapsed() >= self.config.busy_grace || self.stop.load(Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Make the caller the owner, if nobody is and the owner budget allows.
    fn claim_owner(&self) -> bool {
        if self
            .owned
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        let budget = self
            .owner_budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                if b == u64::MAX {
                    Some(b)
                } else {
                    b.checked_sub(1)
                }
            });
        if budget.is_err() {
            self.owned.store(false, Ordering::Release);
            return false;
        }
        self.owner_sessions.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The owner has gone: release the device, then let the next one in.
    fn end_owner(&self) {
        release_device(&*self.device);
        self.owned.store(false, Ordering::Release);
        self.owners_ended.fetch_add(1, Ordering::AcqRel);
    }

    fn max_msg_size(&self) -> usize {
        self.config.max_data_xfer_size as usize + 4096
    }

    /// Serve connections from `listener`, forever (until accept fails): each on its own
    /// thread, one owner at a time (see the module documentation).
    pub fn serve_listener(&self, listener: UnixListener) -> Result<(), ServerError> {
        self.serve_connections(listener, None)
    }

    /// Like [`Server::serve_listener`], but return once `owners` owner sessions (that
    /// completed VERSION) have ended; connections that never negotiate do not count, so a
    /// stray connect, garbage or an early close does not use up the budget. Later
    /// VERSIONs are refused with EBUSY. Connections still negotiating are closed within
    /// the handshake timeout before this returns.
    pub fn serve_owners(&self, listener: UnixListener, owners: u64) -> Result<(), ServerError> {
        self.serve_connections(listener, Some(owners))
    }

    fn serve_connections(
        &self,
        listener: UnixListener,
        owners: Option<u64>,
    ) -> Result<(), ServerError> {
        let start = self.owners_ended.load(Ordering::Acquire);
        if let Some(n) = owners {
            self.owner_budget.store(n, Ordering::Release);
        }
        // Accept without blocking so the loop sees the budget run out or a stop.
        listener.set_nonblocking(true)?;
        let live = AtomicUsize::new(0);
        std::thread::scope(|scope| loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            if let Some(n) = owners {
                let ended = self.owners_ended.load(Ordering::Acquire) - start;
                if ended >= n && !self.owned() {
                    return Ok(());
                }
            }
            if !poll_readable(&listener, 50)? {
                continue;
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted
                            | std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            if let Err(e) = stream.set_nonblocking(false) {
                tracing::warn!(error = %e, "cannot set up an accepted connection; closed");
                continue;
            }
            if live.load(Ordering::Acquire) >= self.config.max_connections {
                self.dropped_idle.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    max = self.config.max_connections,
                    "too many vfio-user connections at once; closed the newest"
                );
                continue;
            }
            live.fetch_add(1, Ordering::AcqRel);
            let live = &live;
            let spawned = std::thread::Builder::new()
                .name("vfio-user-conn".into())
                .spawn_scoped(scope, move || {
                    log_session_end(self.serve_connection(stream, true));
                    live.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                live.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(error = %e, "cannot start a connection thread; connection closed");
            }
        })
    }

    /// Serve one connection the caller set up (a socketpair, an accepted stream) until it
    /// goes away: check the peer, negotiate VERSION within the handshake timeout, then
    /// serve commands, and release the device at the end. `Ok` on a clean disconnect.
    ///
    /// The caller decides who connects here, so this does not take part in the
    /// one-owner rule of [`Server::serve_listener`] (a test may run sessions side by
    /// side on purpose); serve untrusted connections through a listener.
    pub fn serve_stream(&self, stream: UnixStream) -> Result<(), ServerError> {
        self.serve_connection(stream, false)
    }

    /// `exclusive`: the session must own the device (one owner at a time).
    fn serve_connection(&self, stream: UnixStream, exclusive: bool) -> Result<(), ServerError> {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        let peer = peer_credentials(&stream)?;
        if !self.config.peers.allows(&peer) {
            self.refused_peers.fetch_add(1, Ordering::Relaxed);
            return Err(ServerError::PeerRefused {
                peer,
                policy: self.config.peers.clone(),
            });
        }
        let ep = Arc::new(Endpoint::new(
            stream,
            self.max_msg_size(),
            Incoming::Queue,
            "server",
        ));
        // A client that stops reading (a full socket buffer) must not block the server
        // (or a device thread sending DMA_READ/WRITE) forever: a send waits at most the
        // DMA timeout, then the session ends.
        ep.set_send_timeout(self.config.dma_timeout);
        let mut s = Session {
            server: self,
            ep: ep.clone(),
            twin: None,
            client: None,
            exclusive,
            owner: false,
            out: Vec::with_capacity(4096),
            nested: NestedSession::default(),
            dma_ranges: std::collections::BTreeMap::new(),
            ring: None,
        };
        let handshake = self
            .config
            .handshake_timeout
            .map(|t| (std::time::Instant::now() + t, t));
        let result = loop {
            let next = match handshake {
                Some((deadline, t)) if s.client.is_none() => ep.next_command_until(deadline, t),
                _ => ep.next_command(),
            };
            let m = match next {
                Ok(Some(m)) => m,
                Ok(None) => break Ok(()),
                Err(EndpointError::TimedOut(t)) if s.client.is_none() => {
                    self.dropped_idle.fetch_add(1, Ordering::Relaxed);
                    break Err(ServerError::HandshakeTimeout(t));
                }
                Err(e) => {
                    self.broken.fetch_add(1, Ordering::Relaxed);
                    break Err(ServerError::Connection(e));
                }
            };
            self.commands.fetch_add(1, Ordering::Relaxed);
            match s.handle(m) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Busy) => break Err(ServerError::Busy),
                Ok(Flow::Close(why)) => {
                    self.broken.fetch_add(1, Ordering::Relaxed);
                    break Err(ServerError::Protocol(why));
                }
                Err(e) => break Err(e.into()),
            }
        };
        s.cleanup();
        result
    }
}

/// Log how a connection ended (refusals at warn: someone tried and failed).
fn log_session_end(r: Result<(), ServerError>) {
    match r {
        Ok(()) => tracing::info!("vfio-user client disconnected"),
        Err(e @ ServerError::Busy) => tracing::warn!(error = %e, "answered VERSION with EBUSY"),
        Err(e) => tracing::warn!(error = %e, "vfio-user session ended with an error"),
    }
}

/// Wait up to `ms` milliseconds for a connection on `listener`.
fn poll_readable(listener: &UnixListener, ms: i32) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd for at most `ms` milliseconds.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(r > 0)
}

/// Release `dev` as Linux releases a VFIO device fd when its owner closes it: DMA
/// mappings removed, interrupt eventfds dropped, dirty logging stopped, migration state
/// back to RUNNING (a device that cannot get there, e.g. in ERROR, is reset). Each step
/// is tried whatever the others do; what a device does not support is skipped.
pub fn release_device(dev: &dyn VfioDevice) {
    if let Err(e) = dev.dma_unmap_all() {
        tracing::warn!(error = %e, "cannot unmap the departed client's DMA");
    }
    for i in 0..dev.info().num_irqs {
        if let Err(e) = dev.set_irqs(i, IrqAction::Trigger, 0, 0, IrqData::None) {
            tracing::debug!(index = i, error = %e, "cannot drop irq eventfds");
        }
    }
    if let Err(e) = dev.dma_logging_stop() {
        tracing::debug!(error = %e, "dirty logging not stopped (unsupported or off)");
    }
    if dev.migration_flags().is_some() {
        let back = match dev.mig_state() {
            Ok(MigState::Running) => return,
            Ok(_) => dev.mig_set_state(MigState::Running),
            Err(e) => Err(e),
        };
        if let Err(e) = back {
            tracing::warn!(error = %e, "migration state not back to RUNNING; resetting the device");
            if let Err(e) = dev.reset() {
                tracing::warn!(error = %e, "cannot reset the device after its owner left");
            }
        }
    }
}

struct Session<'a> {
    server: &'a Server,
    ep: Arc<Endpoint>,
    twin: Option<Arc<Endpoint>>,
    client: Option<Capabilities>,
    /// The session must own the device: a VERSION while another owns it gets EBUSY.
    exclusive: bool,
    /// This session owns the device (its VERSION was accepted).
    owner: bool,
    out: Vec<u8>,
    /// The nested-IOMMU extension's state (`crate::nested_iommu`).
    nested: NestedSession,
    /// The owner's DMA mappings (start -> size), so DMA_MAP over an existing mapping is
    /// EEXIST and DMA_UNMAP must name one exactly (ENOENT) whatever the device keeps: a
    /// device without a map table (no DMA of its own) records nothing itself.
    dma_ranges: std::collections::BTreeMap<u64, u64>,
    /// nestio's posted-write ring, when the client proposed it: drained before every
    /// socket message.
    ring: Option<PostedRing>,
}

/// What a handler hands back: fds to attach to the reply.
type Fds = Vec<Arc<OwnedFd>>;

fn dev_err(e: DeviceError) -> i32 {
    tracing::debug!(error = %e, "device refused a request");
    e.errno()
}

impl Session<'_> {
    fn device(&self) -> &dyn VfioDevice {
        &*self.server.device
    }

    fn cfg(&self) -> &ServerConfig {
        &self.server.config
    }

    fn max_xfer(&self) -> usize {
        self.cfg().max_data_xfer_size as usize
    }

    /// The connection is over: close it; if it owned the device, release the device and
    /// let the next owner in.
    fn cleanup(&mut self) {
        self.ep.shutdown("session ended");
        if let Some(t) = self.twin.take() {
            t.shutdown("session ended");
        }
        // After the sockets: a fault reporter blocked in a send fails at once.
        self.nested.end();
        // No ring write runs after the session: the ring thread is joined (and the
        // ring marked closed for the client) before the device is released. (After the
        // sockets: a ring write waiting for DMA by message then fails at once.)
        drop(self.ring.take());
        if std::mem::take(&mut self.owner) {
            if let Some(x) = &self.server.extension {
                x.owner_left();
            }
            if self.exclusive {
                self.server.end_owner();
            } else {
                release_device(&*self.server.device);
            }
        }
    }

    fn send_reply(&mut self, m: &Message, r: Result<Fds, i32>) -> Result<(), EndpointError> {
        match r {
            Ok(fds) => {
                let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                self.ep.reply(&m.header, Ok(&self.out), &raw)
            }
            Err(errno) => {
                self.server.error_replies.fetch_add(1, Ordering::Relaxed);
                self.ep.reply(&m.header, Err(errno), &[])
            }
        }
    }

    fn handle(&mut self, mut m: Message) -> Result<Flow, EndpointError> {
        self.out.clear();
        let h = m.header;
        if let Err(e) = h.check_flags() {
            tracing::warn!(error = %e, "bad header flags");
            self.server.error_replies.fetch_add(1, Ordering::Relaxed);
            // Answer even if no_reply is (maybe wrongly) set: the flags are garbage.
            self.ep.send(&h.error_reply(libc::EINVAL), &[], &[])?;
            return Ok(Flow::Continue);
        }
        if self.client.is_none() {
            return self.version(m);
        }
        // Ordering: every posted write in the ring before this message runs first.
        if let Some(ring) = &self.ring {
            if let Err(e) = ring.drain() {
                tracing::warn!(error = %e, "posted-write ring");
                return Ok(Flow::Close(e.to_string()));
            }
        }
        if m.fds.len() > self.cfg().max_msg_fds as usize {
            tracing::warn!(fds = m.fds.len(), "too many fds in one message");
            m.fds.clear();
            self.send_reply(&m, Err(libc::EINVAL))?;
            return Ok(Flow::Continue);
        }
        let r = match Request::decode(h.cmd, &m.payload) {
            // An extension command without the capability: ENOTSUP, whatever it holds.
            _ if nested_iommu::is_extension(h.cmd) && !self.nested.negotiated() => {
                tracing::warn!(cmd = h.cmd, "nested IOMMU command without the capability");
                Err(libc::ENOTSUP)
            }
            Ok(req) => self.dispatch(req, &m),
            Err(e) => {
                tracing::warn!(cmd = h.cmd, error = %e, "malformed request");
                Err(e.errno())
            }
        };
        // The fds that came with the request are closed before the reply goes out (the
        // device holds its own duplicates of those it keeps), so when the client sees
        // the reply, the server holds exactly what the device kept.
        m.fds.clear();
        self.send_reply(&m, r)?;
        Ok(Flow::Continue)
    }

    /// VERSION, the first message of every session: checked, the owner slot claimed
    /// (EBUSY when taken), capabilities answered, the twin socket offered.
    fn version(&mut self, m: Message) -> Result<Flow, EndpointError> {
        let v = match Self::check_version(&m) {
            Ok(v) => v,
            Err((errno, why)) => {
                self.send_reply(&m, Err(errno))?;
                return Ok(Flow::Close(why));
            }
        };
        if !self.exclusive {
            self.server.owner_sessions.fetch_add(1, Ordering::Relaxed);
        } else if !self.server.claim_owner_within_grace() {
            self.server.refused_busy.fetch_add(1, Ordering::Relaxed);
            self.send_reply(&m, Err(libc::EBUSY))?;
            return Ok(Flow::Busy);
        }
        self.owner = true;
        let cfg = self.cfg().clone();
        // What every client parser accepts (proto's table); we still accept our limits.
        let offer = proto::ServerOffer {
            max_msg_fds: cfg.max_msg_fds,
            max_data_xfer_size: cfg.max_data_xfer_size,
            max_dma_maps: cfg.max_dma_maps,
            write_multiple: cfg.write_multiple,
        };
        let mut caps = Capabilities::server_reply(&offer, &v.caps);
        // Client commands are bounded by our own max_data_xfer_size, and replies to our
        // DMA requests by the chunk we ask for, which never exceeds it either: the
        // client's (possibly huge) limit must not raise what we accept (a header alone
        // would otherwise size our payload buffer).
        let limit = self.server.max_msg_size();
        self.ep.set_max_msg_size(limit);
        // Spec, max_msg_fds: the most fds the client receives in one message; this
        // reply's fds (twin socket, then the ring's two) stay within it.
        let fd_room = v.caps.max_msg_fds as usize;
        let client_end = if cfg.twin_socket && v.caps.twin_supported() && fd_room >= 1 {
            self.open_twin(limit)
        } else {
            None
        };
        caps.nestio_nested_iommu = self.nested.negotiate(
            cfg.nested_iommu,
            Some(&*self.server.nested_backend),
            v.caps.nestio_nested_iommu.as_ref(),
        );
        let twin = client_end.is_some();
        if twin {
            caps.twin_socket = Some(TwinSocket {
                supported: true,
                fd_index: Some(0),
            });
        }
        let ring_fds = if fd_room >= usize::from(twin) + 2 {
            self.open_ring(&v.caps, &mut caps, usize::from(twin))
        } else {
            None
        };
        let reply = Version {
            major: proto::VERSION_MAJOR,
            minor: v.minor.min(proto::VERSION_MINOR),
            caps,
        };
        reply.encode_into(&mut self.out);
        let mut raw: Vec<RawFd> = client_end.iter().map(|f| f.as_raw_fd()).collect();
        if let Some(r) = &ring_fds {
            raw.extend([r.memfd.as_raw_fd(), r.kick.as_raw_fd()]);
        }
        self.ep.reply(&m.header, Ok(&self.out), &raw)?;
        drop(client_end);
        drop(ring_fds);
        tracing::info!(
            minor = reply.minor,
            twin,
            write_multiple = reply.caps.write_multiple,
            "vfio-user client negotiated"
        );
        self.client = Some(v.caps);
        Ok(Flow::Continue)
    }

    /// The first message must be a well-formed VERSION of our major, without fds; else
    /// the errno to answer and why the session ends.
    fn check_version(m: &Message) -> Result<Version, (i32, String)> {
        if m.header.cmd != Command::Version as u16 {
            return Err((
                libc::EINVAL,
                format!("client sent command {} before VERSION", m.header.cmd),
            ));
        }
        let v =
            Version::decode(&m.payload).map_err(|e| (e.errno(), format!("bad VERSION: {e}")))?;
        if v.major != proto::VERSION_MAJOR {
            return Err((
                libc::ENOTSUP,
                format!(
                    "client speaks major version {}, we speak {}",
                    v.major,
                    proto::VERSION_MAJOR
                ),
            ));
        }
        if !m.fds.is_empty() {
            return Err((libc::EINVAL, "VERSION carried file descriptors".into()));
        }
        Ok(v)
    }

    /// Start nestio's posted-write ring when the client proposed it and we offer it, and
    /// describe it in `caps` with its fds at `first_fd` and `first_fd + 1` of the reply.
    /// A ring that cannot be set up is logged and left out: writes come by socket.
    fn open_ring(
        &mut self,
        client: &Capabilities,
        caps: &mut Capabilities,
        first_fd: usize,
    ) -> Option<crate::posted_ring::RingFds> {
        let config = self.cfg().posted_ring?;
        if !client.nestio_posted_ring.is_some_and(|r| r.supported) {
            return None;
        }
        let ep = Arc::downgrade(&self.ep);
        let on_corrupt = Box::new(move |e: &crate::posted_ring::RingError| {
            if let Some(ep) = ep.upgrade() {
                ep.shutdown(&e.to_string());
            }
        });
        match PostedRing::start(self.server.device.clone(), config, on_corrupt) {
            Ok((ring, fds)) => {
                caps.nestio_posted_ring = Some(proto::PostedRingCap {
                    supported: true,
                    entries: Some(ring.entries()),
                    fd_index: Some(first_fd as u32),
                    kick_fd_index: Some(first_fd as u32 + 1),
                });
                self.ring = Some(ring);
                Some(fds)
            }
            Err(e) => {
                tracing::warn!(error = %e, "continuing without the posted-write ring");
                None
            }
        }
    }

    /// Create the twin socket (server->client commands); returns the client's end, or
    /// None (logged) when it cannot be made: the session goes on without.
    fn open_twin(&mut self, limit: usize) -> Option<OwnedFd> {
        match UnixStream::pair() {
            Ok((ours, theirs)) => {
                let twin = Endpoint::new(ours, limit, Incoming::Refuse, "server-twin");
                twin.set_send_timeout(self.cfg().dma_timeout);
                self.twin = Some(Arc::new(twin));
                Some(theirs.into())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the twin socket; continuing without");
                None
            }
        }
    }

    fn no_fds(m: &Message) -> Result<(), i32> {
        if m.fds.is_empty() {
            Ok(())
        } else {
            Err(libc::EINVAL)
        }
    }

    /// Routes one decoded command to its handler. Each handler writes its reply payload
    /// into `self.out` and returns the fds to attach, or an errno for an error reply.
    fn dispatch(&mut self, req: Request<'_>, m: &Message) -> Result<Fds, i32> {
        match req {
            Request::Version(_) => Err(libc::EINVAL),
            Request::DmaMap(d) => self.dma_map(d, m),
            Request::DmaUnmap(u) => self.dma_unmap(u, m),
            Request::GetInfo(i) => self.get_info(i, m),
            Request::GetRegionInfo(r) => self.get_region_info(r, m),
            Request::GetRegionIoFds(r) => self.get_region_io_fds(r, m),
            Request::GetIrqInfo(i) => self.get_irq_info(i, m),
            Request::SetIrqs(s) => self.set_irqs(s, m),
            Request::RegionRead(a) => self.region_read(a, m),
            Request::RegionWrite(a) => self.region_write(a, m),
            Request::DmaRead(_) | Request::DmaWrite(_) => {
                tracing::warn!("client sent DMA_READ/WRITE, a server->client command");
                Err(libc::EINVAL)
            }
            Request::Reset => {
                Self::no_fds(m)?;
                self.device().reset().map_err(dev_err)?;
                Ok(Vec::new())
            }
            Request::WriteMulti(w) => self.write_multi(w, m),
            Request::Feature(f) => {
                Self::no_fds(m)?;
                if let Some(r) = self.extension_feature(&f) {
                    return r;
                }
                self.feature(f)?;
                Ok(Vec::new())
            }
            Request::MigDataRead(d) => self.mig_data_read(d, m),
            Request::MigDataWrite(d) => self.mig_data_write(d, m),
            Request::IommuBind(b) => self.iommu_bind(b, m),
            Request::IommuUnbind => {
                Self::no_fds(m)?;
                self.nested.unbind().map_err(|e| e.errno())?;
                Ok(Vec::new())
            }
            Request::IommuInvalidate(i) => {
                Self::no_fds(m)?;
                let r = self.nested.invalidate(&i).map_err(|e| {
                    tracing::warn!(error = %e, "nested IOMMU INVALIDATE failed");
                    e.errno()
                })?;
                r.encode_into(&mut self.out);
                Ok(Vec::new())
            }
            Request::IommuFault(_) => {
                tracing::warn!("client sent NESTIO_IOMMU_FAULT, a server->client command");
                Err(libc::EINVAL)
            }
        }
    }

    /// NESTIO_IOMMU_BIND: the device's DMA goes through the guest's stage 1 from the
    /// reply on (`crate::nested_iommu`); faults go out on the twin socket if any.
    fn iommu_bind(&mut self, b: IommuBind, m: &Message) -> Result<Fds, i32> {
        Self::no_fds(m)?;
        let ep = self.twin.as_ref().unwrap_or(&self.ep).clone();
        self.nested.bind(b, &ep).map_err(|e| {
            tracing::warn!(error = %e, "nested IOMMU BIND refused");
            e.errno()
        })?;
        Ok(Vec::new())
    }

    /// DMA_MAP: the client's memory by fd (mapped in place) or, without an fd, reached
    /// by DMA_READ/DMA_WRITE messages (over the twin socket when there is one).
    fn dma_map(&mut self, d: DmaMap, m: &Message) -> Result<Fds, i32> {
        if m.fds.len() > 1 {
            return Err(libc::EINVAL);
        }
        let range = DmaRange::new(d.addr, d.size).map_err(|e| e.errno())?;
        let prot = Prot::from_bits(d.flags).ok_or(libc::EINVAL)?;
        // Spec: a map over an existing mapping fails with EEXIST.
        if let Some((&s, &l)) = self.dma_ranges.range(..=range.last()).next_back() {
            if s.saturating_add(l - 1) >= range.start() {
                return Err(libc::EEXIST);
            }
        }
        // Spec, max_dma_maps: the "maximum number [of] DMA map windows that can be valid
        // simultaneously" — our configured limit (what we advertise is at most that), not
        // whatever the device's own table would take. ENOSPC as VFIO's type1 IOMMU.
        if self.dma_ranges.len() >= self.cfg().max_dma_maps as usize {
            tracing::warn!(
                limit = self.cfg().max_dma_maps,
                "DMA_MAP beyond max_dma_maps refused"
            );
            return Err(libc::ENOSPC);
        }
        let backing = match m.fds.first() {
            Some(fd) => DmaBacking::Fd {
                fd: Arc::new(
                    fd.try_clone()
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?,
                ),
                offset: d.offset,
            },
            None => {
                let ep = self.twin.as_ref().unwrap_or(&self.ep);
                let client_xfer = self
                    .client
                    .as_ref()
                    .map_or(proto::DEFAULT_MAX_DATA_XFER, |c| c.max_data_xfer_size);
                DmaBacking::Peer(Arc::new(SessionPeer {
                    ep: Arc::downgrade(ep),
                    timeout: self.cfg().dma_timeout,
                    chunk: (client_xfer as usize).min(self.max_xfer()).max(1),
                }))
            }
        };
        self.device()
            .dma_map(DmaMapRequest {
                range,
                prot,
                backing,
            })
            .map_err(dev_err)?;
        self.dma_ranges.insert(range.start(), range.len());
        Ok(Vec::new())
    }

    /// DMA_UNMAP: one exact mapping, or all of them (dirty bitmaps on unmap: ENOTSUP).
    fn dma_unmap(&mut self, u: DmaUnmap, m: &Message) -> Result<Fds, i32> {
        Self::no_fds(m)?;
        if u.flags & dma_flags::UNMAP_GET_DIRTY_BITMAP != 0 {
            return Err(libc::ENOTSUP);
        }
        if u.flags & dma_flags::UNMAP_ALL != 0 {
            self.device().dma_unmap_all().map_err(dev_err)?;
            self.dma_ranges.clear();
        } else {
            // Spec: the range must match a previous mapping exactly.
            if self.dma_ranges.get(&u.addr) != Some(&u.size) {
                return Err(libc::ENOENT);
            }
            self.device().dma_unmap(u.addr, u.size).map_err(dev_err)?;
            self.dma_ranges.remove(&u.addr);
        }
        // Spec: "The server responds with the original DMA entry in the request" — argsz
        // included, as libvfio-user does.
        u.encode_into(&mut self.out);
        Ok(Vec::new())
    }

    /// DEVICE_GET_INFO.
    fn get_info(&mut self, i: DeviceInfoMsg, m: &Message) -> Result<Fds, i32> {
        Self::no_fds(m)?;
        if (i.argsz as usize) < DeviceInfoMsg::SIZE {
            return Err(libc::EINVAL);
        }
        let info = self.device().info();
        DeviceInfoMsg {
            argsz: DeviceInfoMsg::SIZE as u32,
            flags: info.flags,
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
        }
        .encode_into(&mut self.out);
        Ok(Vec::new())
    }

    /// DEVICE_GET_REGION_INFO: the info, the sparse-mmap capability, and the region's fd
    /// when it is mappable.
    fn get_region_info(&mut self, r: RegionInfoMsg, m: &Message) -> Result<Fds, i32> {
        Self::no_fds(m)?;
        if (r.argsz as usize) < RegionInfoMsg::SIZE {
            return Err(libc::EINVAL);
        }
        let ri = self.device().region_info(r.index).map_err(dev_err)?;
        // Spec: with MMAP "the reply will include a file descriptor", and a client
        // receives at most its max_msg_fds per message: a client that takes none gets
        // the region as not mappable (no MMAP, no sparse mmap areas), reached by
        // REGION_READ/WRITE.
        let fd_ok = self.client.as_ref().is_none_or(|c| c.max_msg_fds >= 1);
        let fd = ri
            .fd
            .filter(|_| ri.flags & region_flags::MMAP != 0 && fd_ok);
        let mut flags = ri.flags & !region_flags::CAPS;
        if !fd_ok {
            flags &= !region_flags::MMAP;
        }
        let sparse = if fd_ok {
            ri.sparse.iter().map(|a| (a.offset, a.size)).collect()
        } else {
            Vec::new()
        };
        let reply = RegionInfoReply {
            info: RegionInfoMsg {
                argsz: 0,
                flags,
                index: r.index,
                cap_offset: 0,
                size: ri.size,
                offset: ri.fd_offset,
            },
            sparse,
        };
        reply.encode_into(r.argsz, &mut self.out);
        Ok(fd.into_iter().collect())
    }

    /// DEVICE_GET_REGION_IO_FDS: the region's ioeventfds, each distinct fd sent once.
    fn get_region_io_fds(&mut self, r: IoFdsMsg, m: &Message) -> Result<Fds, i32> {
        Self::no_fds(m)?;
        // Spec: "index is the index of memory region being queried; all other fields
        // must be zero" (flags is checked by the parser; libvfio-user refuses both).
        if (r.argsz as usize) < IoFdsMsg::SIZE || r.count != 0 {
            return Err(libc::EINVAL);
        }
        let list = self.device().region_io_fds(r.index).map_err(dev_err)?;
        let mut fds: Fds = Vec::new();
        let mut entries = Vec::with_capacity(list.len());
        for e in &list {
            let idx = match fds.iter().position(|f| Arc::ptr_eq(f, &e.fd)) {
                Some(i) => i,
                None => {
                    fds.push(e.fd.clone());
                    fds.len() - 1
                }
            };
            entries.push(IoFdEntry {
                offset: e.offset,
                size: e.size,
                fd_index: idx as u32,
                kind: proto::IO_FD_TYPE_IOEVENTFD,
                flags: if e.datamatch.is_some() {
                    proto::IOEVENTFD_FLAG_DATAMATCH
                } else {
                    0
                },
                datamatch: e.datamatch.unwrap_or(0),
            });
        }
        let client_fds = self.client.as_ref().map_or(1, |c| c.max_msg_fds) as usize;
        if fds.len() > client_fds {
            return Err(libc::E2BIG);
        }
        let needed = IoFdsMsg::SIZE + IoFdsMsg::ENTRY * entries.len();
        let fits = r.argsz as usize >= needed;
        let reply = IoFdsReply {
            hdr: IoFdsMsg {
                argsz: needed as u32,
                flags: 0,
                index: r.index,
                count: entries.len() as u32,
            },
            entries: if fits { entries } else { Vec::new() },
        };
        reply.encode_into(&mut self.out);
        Ok(if fits { fds } else { Vec::new() })
    }

    /// DEVICE_GET_IRQ_INFO.
    fn get_irq_info(&mut self, i: IrqInfoMsg, m: &Message) -> Result<Fds, i32> {
        Self::no_fds(m)?;
        if (i.argsz as usize) < IrqInfoMsg::SIZE {
            return Err(libc::EINVAL);
        }
        let info = self.device().irq_info(i.index).map_err(dev_err)?;
        IrqInfoMsg {
            argsz: IrqInfoMsg::SIZE as u32,
            flags: info.flags,
            index: i.index,
            count: info.count,
        }
        .encode_into(&mut self.out);
        Ok(Vec::new())
    }

    /// DEVICE_SET_IRQS: the action (mask, unmask, trigger) and its data (none, bools,
    /// eventfds), checked against the index's vector count before anything is built.
    fn set_irqs(&mut self, s: IrqSet<'_>, m: &Message) -> Result<Fds, i32> {
        // count 0 is only the "disable the whole index" form: start 0, DATA_NONE,
        // ACTION_TRIGGER (spec; libvfio-user refuses the rest too).
        if s.count == 0
            && (s.start != 0 || s.flags != irq_set_flags::DATA_NONE | irq_set_flags::ACTION_TRIGGER)
        {
            return Err(libc::EINVAL);
        }
        // Bound count by the index's vectors before anything is allocated for it.
        let info = self.device().irq_info(s.index).map_err(dev_err)?;
        if s.start as u64 + s.count as u64 > info.count as u64 {
            return Err(libc::EINVAL);
        }
        let action = match s.flags & irq_set_flags::ACTION_MASK_ALL {
            irq_set_flags::ACTION_MASK => IrqAction::Mask,
            irq_set_flags::ACTION_UNMASK => IrqAction::Unmask,
            _ => IrqAction::Trigger,
        };
        let data = match s.flags & irq_set_flags::DATA_MASK {
            irq_set_flags::DATA_NONE => {
                Self::no_fds(m)?;
                IrqData::None
            }
            irq_set_flags::DATA_BOOL => {
                Self::no_fds(m)?;
                IrqData::Bool(s.data.iter().map(|&b| b != 0).collect())
            }
            _ => Self::irq_eventfds(s.count as usize, m)?,
        };
        self.device()
            .set_irqs(s.index, action, s.start, s.count, data)
            .map_err(dev_err)?;
        Ok(Vec::new())
    }

    /// The eventfds of a SET_IRQS with DATA_EVENTFD: none (unset all `n`), or exactly
    /// `n`, duplicated for the device to keep.
    fn irq_eventfds(n: usize, m: &Message) -> Result<IrqData, i32> {
        if m.fds.is_empty() {
            return Ok(IrqData::Eventfd((0..n).map(|_| None).collect()));
        }
        if m.fds.len() != n {
            tracing::warn!(
                fds = m.fds.len(),
                count = n,
                "SET_IRQS fds do not match count"
            );
            return Err(libc::EINVAL);
        }
        let mut v = Vec::with_capacity(n);
        for f in &m.fds {
            v.push(Some(
                f.try_clone()
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?,
            ));
        }
        Ok(IrqData::Eventfd(v))
    }

    /// REGION_READ: the reply repeats the request header followed by the data.
    fn region_read(&mut self, a: RegionAccess<'_>, m: &Message) -> Result<Fds, i32> {
        Self::no_fds(m)?;
        let n = a.count as usize;
        if n > self.max_xfer() {
            return Err(libc::EINVAL);
        }
        RegionAccess { data: &[], ..a }.encode_into(&mut self.out);
        self.out.resize(RegionAccess::SIZE + n, 0);
        let dev = &*self.server.device;
        dev.region_read(a.region, a.offset, &mut self.out[RegionAccess::SIZE..])
            .map_err(dev_err)?;
        Ok(Vec::new())
    }

    /// REGION_WRITE: the reply repeats the request header without the data.
    fn region_write(&mut self, a: RegionAccess<'_>, m: &Message) -> Result<Fds, i32> {
        Self::no_fds(m)?;
        if a.count as usize > self.max_xfer() {
            return Err(libc::EINVAL);
        }
        self.device()
            .region_write(a.region, a.offset, a.data)
            .map_err(dev_err)?;
        RegionAccess { data: &[], ..a }.encode_into(&mut self.out);
        Ok(Vec::new())
    }

    /// REGION_WRITE_MULTI (only when negotiated): the writes in order; the reply is the
    /// count done.
    fn write_multi(&mut self, w: WriteMulti, m: &Message) -> Result<Fds, i32> {
        Self::no_fds(m)?;
        let negotiated =
            self.cfg().write_multiple && self.client.as_ref().is_some_and(|c| c.write_multiple);
        if !negotiated {
            return Err(libc::ENOTSUP);
        }
        for wr in &w.writes {
            self.device()
                .region_write(wr.region, wr.offset, wr.bytes())
                .map_err(dev_err)?;
        }
        self.out
            .extend_from_slice(&(w.writes.len() as u64).to_ne_bytes());
        Ok(Vec::new())
    }

    /// MIG_DATA_READ: up to `size` bytes of the device's migration stream; a short read
    /// ends the stream.
    fn mig_data_read(&mut self, d: MigData<'_>, m: &Message) -> Result<Fds, i32> {
        Self::no_fds(m)?;
        let n = d.size as usize;
        if n > self.max_xfer() || (d.argsz as usize) < MigData::SIZE + n {
            return Err(libc::EINVAL);
        }
        self.out.resize(MigData::SIZE + n, 0);
        let dev = &*self.server.device;
        let got = dev
            .mig_data_read(&mut self.out[MigData::SIZE..])
            .map_err(dev_err)?;
        if got > n {
            return Err(libc::EIO);
        }
        self.out.truncate(MigData::SIZE + got);
        let hdr = MigData {
            argsz: (MigData::SIZE + got) as u32,
            size: got as u32,
            data: &[],
        };
        let mut b = Vec::with_capacity(8);
        hdr.encode_into(&mut b);
        self.out[..8].copy_from_slice(&b);
        Ok(Vec::new())
    }

    /// MIG_DATA_WRITE: the next piece of the migration stream, to the device.
    fn mig_data_write(&mut self, d: MigData<'_>, m: &Message) -> Result<Fds, i32> {
        Self::no_fds(m)?;
        if d.size as usize > self.max_xfer() {
            return Err(libc::EINVAL);
        }
        self.device().mig_data_write(d.data).map_err(dev_err)?;
        Ok(Vec::new())
    }

    /// A DEVICE_FEATURE the server has no handler for, given to the extension (if any):
    /// the reply (`argsz, flags` + its data) is written into `self.out`.
    fn extension_feature(&mut self, f: &DeviceFeature<'_>) -> Option<Result<Fds, i32>> {
        let index = f.index();
        let known = [
            feature::MIGRATION,
            feature::MIG_DEVICE_STATE,
            feature::DMA_LOGGING_START,
            feature::DMA_LOGGING_STOP,
            feature::DMA_LOGGING_REPORT,
        ];
        if known.contains(&index) {
            return None;
        }
        let ext = self.server.extension.clone()?;
        let r = ext.feature(index, f.flags, f.data, f.argsz as usize)?;
        Some(r.and_then(|reply| {
            let size = DeviceFeature::SIZE + reply.data.len();
            if size > f.argsz as usize || size > self.max_xfer() {
                return Err(libc::EINVAL);
            }
            DeviceFeature {
                argsz: size as u32,
                flags: f.flags,
                data: &reply.data,
            }
            .encode_into(&mut self.out);
            Ok(reply.fds.into_iter().map(Arc::new).collect())
        }))
    }

    /// DEVICE_FEATURE: routed by feature index. Writes the reply into `self.out`.
    fn feature(&mut self, f: DeviceFeature<'_>) -> Result<(), i32> {
        let index = f.index();
        let request = f.clone();
        let req = FeatureReq {
            get: f.flags & feature::GET != 0,
            set: f.flags & feature::SET != 0,
            probe: f.flags & feature::PROBE != 0,
            room: f.argsz as usize,
            f,
        };
        match index {
            feature::MIGRATION => self.feature_migration(&req),
            feature::MIG_DEVICE_STATE => self.feature_mig_state(&req),
            feature::DMA_LOGGING_START => self.logging_start(&req),
            feature::DMA_LOGGING_STOP => self.logging_stop(&req),
            feature::DMA_LOGGING_REPORT => self.logging_report(&req),
            _ => Err(libc::ENOTTY),
        }?;
        // Spec: "The reply payload must be the same as the request payload for setting or
        // probing a feature" (argsz and data included). A state change still reports the
        // state it reached (the one asked for, as it succeeded).
        if req.probe || req.set {
            let reached = (index == feature::MIG_DEVICE_STATE && !req.probe)
                .then(|| self.out.get(8..12).map(<[u8]>::to_vec))
                .flatten();
            self.out.clear();
            request.encode_into(&mut self.out);
            if let (Some(s), Some(dst)) = (reached, self.out.get_mut(8..12)) {
                dst.copy_from_slice(&s);
            }
        }
        Ok(())
    }

    /// Dirty logging is offered by devices with a DMA table or with migration.
    fn logging_supported(&self) -> bool {
        let dev = self.device();
        dev.dma_table().is_some() || dev.migration_flags().is_some()
    }

    /// MIGRATION (GET-only): the device's migration flags.
    fn feature_migration(&mut self, r: &FeatureReq<'_>) -> Result<(), i32> {
        let flags = self.device().migration_flags().ok_or(libc::ENOTTY)?;
        if r.set {
            return Err(libc::EINVAL);
        }
        if r.probe {
            r.head(&mut self.out, 0);
            return Ok(());
        }
        if !r.get || r.room < DeviceFeature::SIZE + 8 {
            return Err(libc::EINVAL);
        }
        r.head(&mut self.out, 8);
        self.out.extend_from_slice(&flags.0.to_ne_bytes());
        Ok(())
    }

    /// MIG_DEVICE_STATE: GET the state, or SET a new one (the reply is the state reached).
    fn feature_mig_state(&mut self, r: &FeatureReq<'_>) -> Result<(), i32> {
        let dev = &*self.server.device;
        dev.migration_flags().ok_or(libc::ENOTTY)?;
        if r.probe {
            r.head(&mut self.out, 0);
            return Ok(());
        }
        if r.room < DeviceFeature::SIZE + 8 {
            return Err(libc::EINVAL);
        }
        let state = if r.set {
            let want = proto::decode_mig_state(r.f.data).map_err(|e| e.errno())?;
            let target = MigState::from_u32(want).ok_or(libc::EINVAL)?;
            dev.mig_set_state(target).map_err(dev_err)?
        } else if r.get {
            if !r.f.data.is_empty() && r.f.data.len() != 8 {
                return Err(libc::EINVAL);
            }
            dev.mig_state().map_err(dev_err)?
        } else {
            return Err(libc::EINVAL);
        };
        r.head(&mut self.out, 8);
        proto::encode_mig_state(state as u32, &mut self.out);
        Ok(())
    }

    /// DMA_LOGGING_START (SET-only): start dirty logging of the given ranges (none: every
    /// mapping); the reply repeats the control data.
    fn logging_start(&mut self, r: &FeatureReq<'_>) -> Result<(), i32> {
        if set_only_feature(self.logging_supported(), r.get, r.probe, r.set)? {
            r.head(&mut self.out, 0);
            return Ok(());
        }
        let data = r.f.data;
        // The reply repeats the control data: argsz must have room for it.
        if r.room < DeviceFeature::SIZE + data.len() {
            return Err(libc::EINVAL);
        }
        let lc = LoggingControl::decode(data).map_err(|e| e.errno())?;
        if lc.ranges.len() > MAX_LOG_RANGES {
            return Err(libc::E2BIG);
        }
        let mut ranges = Vec::with_capacity(lc.ranges.len());
        for &(iova, len) in &lc.ranges {
            ranges.push(DmaRange::new(iova, len).map_err(|e| e.errno())?);
        }
        let dev = &*self.server.device;
        // Spec: zero ranges means "log every write". A device with a DMA table logs what
        // is mapped now (contiguous mappings merged); any other device gets the empty
        // list and its own meaning of it.
        if ranges.is_empty() {
            if let Some(t) = dev.dma_table() {
                ranges = merged_mappings(t.mappings().iter().map(|m| m.range));
                if ranges.is_empty() {
                    return Err(libc::EINVAL);
                }
                if ranges.len() > MAX_LOG_RANGES {
                    return Err(libc::E2BIG);
                }
            }
        }
        dev.dma_logging_start(lc.page_size, &ranges)
            .map_err(dev_err)?;
        r.head(&mut self.out, data.len());
        self.out.extend_from_slice(data);
        Ok(())
    }

    /// DMA_LOGGING_STOP (SET-only).
    fn logging_stop(&mut self, r: &FeatureReq<'_>) -> Result<(), i32> {
        if set_only_feature(self.logging_supported(), r.get, r.probe, r.set)? {
            r.head(&mut self.out, 0);
            return Ok(());
        }
        self.device().dma_logging_stop().map_err(dev_err)?;
        r.head(&mut self.out, 0);
        Ok(())
    }

    /// DMA_LOGGING_REPORT (GET-only): the dirty bitmap of one range, read and cleared.
    fn logging_report(&mut self, r: &FeatureReq<'_>) -> Result<(), i32> {
        if !self.logging_supported() {
            return Err(libc::ENOTTY);
        }
        if r.set {
            return Err(libc::EINVAL);
        }
        if r.probe {
            r.head(&mut self.out, 0);
            return Ok(());
        }
        if !r.get {
            return Err(libc::EINVAL);
        }
        let rep = LoggingReport::decode(r.f.data).map_err(|e| e.errno())?;
        let bytes = rep.bitmap_bytes().ok_or(libc::EINVAL)?;
        if bytes > self.max_xfer() {
            return Err(libc::E2BIG);
        }
        let needed = DeviceFeature::SIZE + LoggingReport::SIZE + bytes;
        if r.room < needed {
            return Err(libc::EINVAL);
        }
        let range = DmaRange::new(rep.iova, rep.length).map_err(|e| e.errno())?;
        let words = self
            .device()
            .dma_logging_report(range, rep.page_size)
            .map_err(dev_err)?;
        if words.len() * 8 != bytes {
            tracing::warn!(
                got = words.len(),
                want = bytes / 8,
                "device returned a bitmap of the wrong size"
            );
            return Err(libc::EIO);
        }
        r.head(&mut self.out, LoggingReport::SIZE + bytes);
        rep.encode_into(&mut self.out);
        for w in words {
            self.out.extend_from_slice(&w.to_ne_bytes());
        }
        Ok(())
    }
}

/// A DEVICE_FEATURE request with its flags decoded.
struct FeatureReq<'a> {
    f: DeviceFeature<'a>,
    get: bool,
    set: bool,
    probe: bool,
    /// The reply payload the client accepts (its argsz).
    room: usize,
}

impl FeatureReq<'_> {
    /// The reply's feature header, announcing `extra` bytes of data after it.
    fn head(&self, out: &mut Vec<u8>, extra: usize) {
        DeviceFeature {
            argsz: (DeviceFeature::SIZE + extra) as u32,
            flags: self.f.flags,
            data: &[],
        }
        .encode_into(out)
    }
}

/// Most ranges one DMA_LOGGING_START may name (Linux's LOG_MAX_RANGES; more is E2BIG).
const MAX_LOG_RANGES: usize = 256;

/// Address-ordered ranges with touching neighbours merged into one.
fn merged_mappings(ranges: impl Iterator<Item = DmaRange>) -> Vec<DmaRange> {
    let mut out: Vec<DmaRange> = Vec::new();
    for r in ranges {
        if let Some(last) = out.last_mut() {
            if last.last().checked_add(1) == Some(r.start()) {
                if let Ok(m) = DmaRange::new(last.start(), last.len().saturating_add(r.len())) {
                    *last = m;
                    continue;
                }
            }
        }
        out.push(r);
    }
    out
}

/// The client's memory reached by DMA_READ/DMA_WRITE messages.
struct SessionPeer {
    ep: Weak<Endpoint>,
    timeout: Option<std::time::Duration>,
    chunk: usize,
}

fn endpoint_errno(e: EndpointError) -> i32 {
    match e {
        EndpointError::TimedOut(_) => libc::ETIMEDOUT,
        _ => libc::ENOTCONN,
    }
}

fn reply_errno(m: &Message) -> i32 {
    match m.header.error as i32 {
        0 => libc::EIO,
        e => e,
    }
}

impl SessionPeer {
    /// Encodes into `req` the DMA_READ/WRITE request for the next chunk (at most
    /// `self.chunk` bytes) of a `len`-byte access at `addr`, `done` bytes in; `data` is
    /// the whole write buffer (`None` for a read). Returns the chunk's address and length.
    fn encode_dma_chunk(
        &self,
        req: &mut Vec<u8>,
        addr: u64,
        len: usize,
        done: usize,
        data: Option<&[u8]>,
    ) -> Result<(u64, usize), i32> {
        let n = len.saturating_sub(done).min(self.chunk);
        let a = addr.checked_add(done as u64).ok_or(libc::EINVAL)?;
        let chunk = match data {
            Some(d) => d.get(done..done + n).ok_or(libc::EINVAL)?,
            None => &[],
        };
        req.clear();
        DmaAccess {
            addr: a,
            count: n as u64,
            data: chunk,
        }
        .encode_into(req);
        Ok((a, n))
    }
}

impl DmaPeer for SessionPeer {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), i32> {
        let ep = self.ep.upgrade().ok_or(libc::ENOTCONN)?;
        let mut req = Vec::with_capacity(DmaAccess::SIZE);
        let mut done = 0usize;
        while done < buf.len() {
            let (a, n) = self.encode_dma_chunk(&mut req, addr, buf.len(), done, None)?;
            let m = ep
                .request_timeout(Command::DmaRead, &req, &[], self.timeout)
                .map_err(endpoint_errno)?;
            if m.header.is_error() {
                return Err(reply_errno(&m));
            }
            let r = DmaAccess::decode(&m.payload, true).map_err(|_| libc::EIO)?;
            if r.addr != a || r.count != n as u64 {
                return Err(libc::EIO);
            }
            buf[done..done + n].copy_from_slice(r.data);
            done += n;
        }
        Ok(())
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), i32> {
        let ep = self.ep.upgrade().ok_or(libc::ENOTCONN)?;
        let mut req = Vec::with_capacity(DmaAccess::SIZE + data.len().min(self.chunk));
        let mut done = 0usize;
        while done < data.len() {
            let (a, n) = self.encode_dma_chunk(&mut req, addr, data.len(), done, Some(data))?;
            let m = ep
                .request_timeout(Command::DmaWrite, &req, &[], self.timeout)
                .map_err(endpoint_errno)?;
            if m.header.is_error() {
                return Err(reply_errno(&m));
            }
            // QEMU's client acknowledges a DMA_WRITE with the bare header; a payload, when
            // present, must describe this very write.
            if !m.payload.is_empty() {
                let r = DmaAccess::decode_write_reply(&m.payload).map_err(|_| libc::EIO)?;
                if r.addr != a || r.count != n as u64 {
                    return Err(libc::EIO);
                }
            }
            done += n;
        }
        Ok(())
    }
}

/// Checks of a SET-only feature (DMA logging start/stop): ENOTTY when the device lacks
/// it, EINVAL for a GET (probed or not) or for neither SET nor PROBE. `Ok(true)`: a probe
/// that succeeded (the caller answers it); `Ok(false)`: go on with the SET.
fn set_only_feature(supported: bool, get: bool, probe: bool, set: bool) -> Result<bool, i32> {
    if !supported {
        return Err(libc::ENOTTY);
    }
    if get {
        return Err(libc::EINVAL);
    }
    if probe {
        return Ok(true);
    }
    if !set {
        return Err(libc::EINVAL);
    }
    Ok(false)
}
