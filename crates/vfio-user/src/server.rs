//! The vfio-user server: serves one [`VfioDevice`] to one client at a time.
//!
//! A session starts with VERSION (anything else first: error reply, session closed),
//! then handles commands in arrival order on the calling thread. Each command is decoded
//! by [`crate::proto`] (every length and flag checked), executed on the device, and
//! answered with the payload or an error reply carrying the errno of the
//! `DeviceError`/`DmaError`/`ProtoError`. The stream stays in sync after any error in a
//! message whose header is sane (the whole message has been read); a header whose size is
//! out of range means the stream cannot be trusted and the session ends.
//!
//! DMA: a DMA_MAP with an fd maps the client's memory in place; without an fd the
//! mapping is backed by a [`DmaPeer`] that sends DMA_READ/DMA_WRITE to the client — over
//! the twin socket when negotiated, else over the main socket through the
//! [`Endpoint`] (the server thread waiting for the DMA reply becomes the reader and
//! queues any client command it reads meanwhile).
//!
//! The server survives its client: when a session ends (disconnect, crash mid-message,
//! garbage) every DMA mapping is removed (`dma_unmap_all`), every irq eventfd dropped
//! (`set_irqs(i, Trigger, 0, 0, None)`), the sockets and received fds closed, and the
//! device state kept for the next client.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use nestio_device::{region_flags, DeviceError, IrqAction, IrqData, MigState, VfioDevice};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaPeer, DmaRange, Prot};

use crate::endpoint::{Endpoint, EndpointError, Incoming};
use crate::proto::{
    self, dma_flags, feature, irq_set_flags, Capabilities, Command, DeviceFeature, DeviceInfoMsg,
    DmaAccess, DmaUnmap, IoFdEntry, IoFdsMsg, IoFdsReply, IrqInfoMsg, LoggingControl,
    LoggingReport, MigData, RegionAccess, RegionInfoMsg, RegionInfoReply, Request, TwinSocket,
    Version,
};
use crate::socket::Message;

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: proto::DEFAULT_MAX_DATA_XFER,
            max_msg_fds: 64,
            max_dma_maps: proto::DEFAULT_MAX_DMA_MAPS,
            twin_socket: true,
            write_multiple: true,
            dma_timeout: Some(std::time::Duration::from_secs(10)),
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
}

/// A vfio-user server for one device. See the module documentation.
pub struct Server {
    device: Arc<dyn VfioDevice>,
    config: ServerConfig,
    sessions: AtomicU64,
    commands: AtomicU64,
    error_replies: AtomicU64,
    broken: AtomicU64,
}

/// Remove a stale socket file at `path` and bind a listener there.
pub fn bind(path: impl AsRef<Path>) -> std::io::Result<UnixListener> {
    let path = path.as_ref();
    if let Ok(md) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if md.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ));
        }
    }
    UnixListener::bind(path)
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
    Close(String),
}

impl Server {
    /// A server for `device`.
    pub fn new(device: Arc<dyn VfioDevice>, config: ServerConfig) -> Self {
        Server {
            device,
            config,
            sessions: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            error_replies: AtomicU64::new(0),
            broken: AtomicU64::new(0),
        }
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
        }
    }

    fn max_msg_size(&self) -> usize {
        self.config.max_data_xfer_size as usize + 4096
    }

    /// Serve clients from `listener` one at a time, forever (until accept fails).
    pub fn serve_listener(&self, listener: UnixListener) -> Result<(), ServerError> {
        loop {
            let (stream, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            match self.serve_stream(stream) {
                Ok(()) => tracing::info!("vfio-user client disconnected"),
                Err(e) => tracing::warn!(error = %e, "vfio-user session ended with an error"),
            }
        }
    }

    /// Serve one client until it goes away. `Ok` on a clean disconnect.
    pub fn serve_stream(&self, stream: UnixStream) -> Result<(), ServerError> {
        self.sessions.fetch_add(1, Ordering::Relaxed);
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
            out: Vec::with_capacity(4096),
        };
        let result = loop {
            let m = match ep.next_command() {
                Ok(Some(m)) => m,
                Ok(None) => break Ok(()),
                Err(e) => {
                    self.broken.fetch_add(1, Ordering::Relaxed);
                    break Err(ServerError::Connection(e));
                }
            };
            self.commands.fetch_add(1, Ordering::Relaxed);
            match s.handle(m) {
                Ok(Flow::Continue) => {}
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

struct Session<'a> {
    server: &'a Server,
    ep: Arc<Endpoint>,
    twin: Option<Arc<Endpoint>>,
    client: Option<Capabilities>,
    out: Vec<u8>,
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

    fn cleanup(&mut self) {
        let dev = self.device();
        if let Err(e) = dev.dma_unmap_all() {
            tracing::warn!(error = %e, "cannot unmap the departed client's DMA");
        }
        for i in 0..dev.info().num_irqs {
            if let Err(e) = dev.set_irqs(i, IrqAction::Trigger, 0, 0, IrqData::None) {
                tracing::debug!(index = i, error = %e, "cannot drop irq eventfds");
            }
        }
        self.ep.shutdown("session ended");
        if let Some(t) = self.twin.take() {
            t.shutdown("session ended");
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
        if m.fds.len() > self.cfg().max_msg_fds as usize {
            tracing::warn!(fds = m.fds.len(), "too many fds in one message");
            m.fds.clear();
            self.send_reply(&m, Err(libc::EINVAL))?;
            return Ok(Flow::Continue);
        }
        let r = match Request::decode(h.cmd, &m.payload) {
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

    fn version(&mut self, m: Message) -> Result<Flow, EndpointError> {
        if m.header.cmd != Command::Version as u16 {
            self.send_reply(&m, Err(libc::EINVAL))?;
            return Ok(Flow::Close(format!(
                "client sent command {} before VERSION",
                m.header.cmd
            )));
        }
        let v = match Version::decode(&m.payload) {
            Ok(v) => v,
            Err(e) => {
                self.send_reply(&m, Err(e.errno()))?;
                return Ok(Flow::Close(format!("bad VERSION: {e}")));
            }
        };
        if v.major != proto::VERSION_MAJOR {
            self.send_reply(&m, Err(libc::ENOTSUP))?;
            return Ok(Flow::Close(format!(
                "client speaks major version {}, we speak {}",
                v.major,
                proto::VERSION_MAJOR
            )));
        }
        if !m.fds.is_empty() {
            self.send_reply(&m, Err(libc::EINVAL))?;
            return Ok(Flow::Close("VERSION carried file descriptors".into()));
        }
        let cfg = self.cfg().clone();
        let twin = cfg.twin_socket && v.caps.twin_supported();
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
        let mut client_end: Option<OwnedFd> = None;
        if twin {
            match UnixStream::pair() {
                Ok((ours, theirs)) => {
                    let twin = Endpoint::new(ours, limit, Incoming::Refuse, "server-twin");
                    twin.set_send_timeout(self.cfg().dma_timeout);
                    self.twin = Some(Arc::new(twin));
                    client_end = Some(theirs.into());
                    caps.twin_socket = Some(TwinSocket {
                        supported: true,
                        fd_index: Some(0),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the twin socket; continuing without")
                }
            }
        }
        let reply = Version {
            major: proto::VERSION_MAJOR,
            minor: v.minor.min(proto::VERSION_MINOR),
            caps,
        };
        reply.encode_into(&mut self.out);
        let raw: Vec<RawFd> = client_end.iter().map(|f| f.as_raw_fd()).collect();
        self.ep.reply(&m.header, Ok(&self.out), &raw)?;
        drop(client_end);
        tracing::info!(
            minor = reply.minor,
            twin,
            write_multiple = reply.caps.write_multiple,
            "vfio-user client negotiated"
        );
        self.client = Some(v.caps);
        Ok(Flow::Continue)
    }

    fn no_fds(m: &Message) -> Result<(), i32> {
        if m.fds.is_empty() {
            Ok(())
        } else {
            Err(libc::EINVAL)
        }
    }

    fn dispatch(&mut self, req: Request<'_>, m: &Message) -> Result<Fds, i32> {
        match req {
            Request::Version(_) => Err(libc::EINVAL),
            Request::DmaMap(d) => {
                if m.fds.len() > 1 {
                    return Err(libc::EINVAL);
                }
                let range = DmaRange::new(d.addr, d.size).map_err(|e| e.errno())?;
                let prot = Prot::from_bits(d.flags).ok_or(libc::EINVAL)?;
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
                Ok(Vec::new())
            }
            Request::DmaUnmap(u) => {
                Self::no_fds(m)?;
                if u.flags & dma_flags::UNMAP_GET_DIRTY_BITMAP != 0 {
                    return Err(libc::ENOTSUP);
                }
                if u.flags & dma_flags::UNMAP_ALL != 0 {
                    self.device().dma_unmap_all().map_err(dev_err)?;
                } else {
                    self.device().dma_unmap(u.addr, u.size).map_err(dev_err)?;
                }
                DmaUnmap {
                    argsz: DmaUnmap::SIZE as u32,
                    ..u
                }
                .encode_into(&mut self.out);
                Ok(Vec::new())
            }
            Request::GetInfo(i) => {
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
            Request::GetRegionInfo(r) => {
                Self::no_fds(m)?;
                if (r.argsz as usize) < RegionInfoMsg::SIZE {
                    return Err(libc::EINVAL);
                }
                let ri = self.device().region_info(r.index).map_err(dev_err)?;
                let reply = RegionInfoReply {
                    info: RegionInfoMsg {
                        argsz: 0,
                        flags: ri.flags & !region_flags::CAPS,
                        index: r.index,
                        cap_offset: 0,
                        size: ri.size,
                        offset: ri.fd_offset,
                    },
                    sparse: ri.sparse.iter().map(|a| (a.offset, a.size)).collect(),
                };
                reply.encode_into(r.argsz, &mut self.out);
                let mut fds = Vec::new();
                if ri.flags & region_flags::MMAP != 0 {
                    if let Some(fd) = ri.fd {
                        fds.push(fd);
                    }
                }
                Ok(fds)
            }
            Request::GetRegionIoFds(r) => {
                Self::no_fds(m)?;
                if (r.argsz as usize) < IoFdsMsg::SIZE {
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
            Request::GetIrqInfo(i) => {
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
            Request::SetIrqs(s) => {
                // count 0 is only the "disable the whole index" form: start 0, DATA_NONE,
                // ACTION_TRIGGER (spec; libvfio-user refuses the rest too).
                if s.count == 0
                    && (s.start != 0
                        || s.flags != irq_set_flags::DATA_NONE | irq_set_flags::ACTION_TRIGGER)
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
                    _ => {
                        let n = s.count as usize;
                        if m.fds.is_empty() {
                            IrqData::Eventfd((0..n).map(|_| None).collect())
                        } else if m.fds.len() == n {
                            let mut v = Vec::with_capacity(n);
                            for f in &m.fds {
                                v.push(Some(
                                    f.try_clone()
                                        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?,
                                ));
                            }
                            IrqData::Eventfd(v)
                        } else {
                            tracing::warn!(
                                fds = m.fds.len(),
                                count = n,
                                "SET_IRQS fds do not match count"
                            );
                            return Err(libc::EINVAL);
                        }
                    }
                };
                self.device()
                    .set_irqs(s.index, action, s.start, s.count, data)
                    .map_err(dev_err)?;
                Ok(Vec::new())
            }
            Request::RegionRead(a) => {
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
            Request::RegionWrite(a) => {
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
            Request::DmaRead(_) | Request::DmaWrite(_) => {
                tracing::warn!("client sent DMA_READ/WRITE, a server->client command");
                Err(libc::EINVAL)
            }
            Request::Reset => {
                Self::no_fds(m)?;
                self.device().reset().map_err(dev_err)?;
                Ok(Vec::new())
            }
            Request::WriteMulti(w) => {
                Self::no_fds(m)?;
                let negotiated = self.cfg().write_multiple
                    && self.client.as_ref().is_some_and(|c| c.write_multiple);
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
            Request::Feature(f) => {
                Self::no_fds(m)?;
                self.feature(f)?;
                Ok(Vec::new())
            }
            Request::MigDataRead(d) => {
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
            Request::MigDataWrite(d) => {
                Self::no_fds(m)?;
                if d.size as usize > self.max_xfer() {
                    return Err(libc::EINVAL);
                }
                self.device().mig_data_write(d.data).map_err(dev_err)?;
                Ok(Vec::new())
            }
        }
    }

    /// DEVICE_FEATURE. Writes the reply into `self.out`.
    fn feature(&mut self, f: DeviceFeature<'_>) -> Result<(), i32> {
        let get = f.flags & feature::GET != 0;
        let set = f.flags & feature::SET != 0;
        let probe = f.flags & feature::PROBE != 0;
        let dev = &*self.server.device;
        let mig = dev.migration_flags();
        let head = |out: &mut Vec<u8>, extra: usize| {
            DeviceFeature {
                argsz: (DeviceFeature::SIZE + extra) as u32,
                flags: f.flags,
                data: &[],
            }
            .encode_into(out)
        };
        let room = f.argsz as usize;
        // Dirty logging is offered by devices with a DMA table or with migration.
        let logging = dev.dma_table().is_some() || mig.is_some();
        match f.index() {
            feature::MIGRATION => {
                let flags = mig.ok_or(libc::ENOTTY)?;
                if set {
                    return Err(libc::EINVAL);
                }
                if probe {
                    head(&mut self.out, 0);
                    return Ok(());
                }
                if !get || room < DeviceFeature::SIZE + 8 {
                    return Err(libc::EINVAL);
                }
                head(&mut self.out, 8);
                self.out.extend_from_slice(&flags.0.to_ne_bytes());
                Ok(())
            }
            feature::MIG_DEVICE_STATE => {
                mig.ok_or(libc::ENOTTY)?;
                if probe {
                    head(&mut self.out, 0);
                    return Ok(());
                }
                if room < DeviceFeature::SIZE + 8 {
                    return Err(libc::EINVAL);
                }
                let state = if set {
                    let want = proto::decode_mig_state(f.data).map_err(|e| e.errno())?;
                    let target = MigState::from_u32(want).ok_or(libc::EINVAL)?;
                    dev.mig_set_state(target).map_err(dev_err)?
                } else if get {
                    if !f.data.is_empty() && f.data.len() != 8 {
                        return Err(libc::EINVAL);
                    }
                    dev.mig_state().map_err(dev_err)?
                } else {
                    return Err(libc::EINVAL);
                };
                head(&mut self.out, 8);
                proto::encode_mig_state(state as u32, &mut self.out);
                Ok(())
            }
            feature::DMA_LOGGING_START => {
                if set_only_feature(logging, get, probe, set)? {
                    head(&mut self.out, 0);
                    return Ok(());
                }
                // The reply repeats the control data: argsz must have room for it.
                if room < DeviceFeature::SIZE + f.data.len() {
                    return Err(libc::EINVAL);
                }
                let lc = LoggingControl::decode(f.data).map_err(|e| e.errno())?;
                if lc.ranges.len() > MAX_LOG_RANGES {
                    return Err(libc::E2BIG);
                }
                let mut ranges = Vec::with_capacity(lc.ranges.len());
                for &(iova, len) in &lc.ranges {
                    ranges.push(DmaRange::new(iova, len).map_err(|e| e.errno())?);
                }
                // Spec: zero ranges means "log every write". A device with a DMA table
                // logs what is mapped now (contiguous mappings merged); any other device
                // gets the empty list and its own meaning of it.
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
                head(&mut self.out, f.data.len());
                self.out.extend_from_slice(f.data);
                Ok(())
            }
            feature::DMA_LOGGING_STOP => {
                if set_only_feature(logging, get, probe, set)? {
                    head(&mut self.out, 0);
                    return Ok(());
                }
                dev.dma_logging_stop().map_err(dev_err)?;
                head(&mut self.out, 0);
                Ok(())
            }
            feature::DMA_LOGGING_REPORT => {
                if !logging {
                    return Err(libc::ENOTTY);
                }
                // GET-only.
                if set {
                    return Err(libc::EINVAL);
                }
                if probe {
                    head(&mut self.out, 0);
                    return Ok(());
                }
                if !get {
                    return Err(libc::EINVAL);
                }
                let r = LoggingReport::decode(f.data).map_err(|e| e.errno())?;
                let bytes = r.bitmap_bytes().ok_or(libc::EINVAL)?;
                if bytes > self.max_xfer() {
                    return Err(libc::E2BIG);
                }
                let needed = DeviceFeature::SIZE + LoggingReport::SIZE + bytes;
                if room < needed {
                    return Err(libc::EINVAL);
                }
                let range = DmaRange::new(r.iova, r.length).map_err(|e| e.errno())?;
                let words = dev
                    .dma_logging_report(range, r.page_size)
                    .map_err(dev_err)?;
                if words.len() * 8 != bytes {
                    tracing::warn!(
                        got = words.len(),
                        want = bytes / 8,
                        "device returned a bitmap of the wrong size"
                    );
                    return Err(libc::EIO);
                }
                head(&mut self.out, LoggingReport::SIZE + bytes);
                r.encode_into(&mut self.out);
                for w in words {
                    self.out.extend_from_slice(&w.to_ne_bytes());
                }
                Ok(())
            }
            _ => Err(libc::ENOTTY),
        }
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
