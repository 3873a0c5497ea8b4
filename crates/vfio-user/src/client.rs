//! The vfio-user client: a device served by another process, used as a local
//! [`VfioDevice`].
//!
//! Connecting negotiates VERSION (offering twin_socket and write_multiple) and adopts the
//! server's limits: region accesses larger than its `max_data_xfer_size` are split, and
//! SET_IRQS eventfd lists longer than its `max_msg_fds` are sent in pieces. Every trait
//! method becomes the matching command; the device info is fetched once at connect.
//!
//! DMA: a mapping backed by an fd sends the fd (the server maps it in place) — unless
//! the server accepts no fds (`max_msg_fds` 0): the mapping then goes without one. Either
//! way the server may also reach that memory by DMA_READ/DMA_WRITE (the spec requires
//! it), served from the file with `pread`/`pwrite`. A mapping
//! backed by a [`DmaPeer`] sends no fd; the server then reaches that memory with
//! DMA_READ/DMA_WRITE, which this client serves by calling the peer — on the twin socket's
//! thread when negotiated, and inline on the main socket while one of our threads waits
//! for a reply (the endpoint's reader handles the server's commands it reads). Without a
//! twin socket, the first mapping by message also starts a reader thread that keeps
//! reading the main socket while no client thread waits, so DMA a device starts on its
//! own (a NIC receiving while its driver is idle) is served too. That thread costs each
//! request a hand-off, so it is started only when memory is mapped by message.
//!
//! Nested IOMMU (nestio's extension, [`crate::nested_iommu`]): proposed in VERSION only
//! when [`ClientConfig::nested_iommu`] is set; once negotiated, [`Client::iommu_bind`],
//! [`Client::iommu_unbind`] and [`Client::iommu_invalidate`] are plain requests, and the
//! server's FAULT records are taken wherever server commands are served (twin socket or
//! the main socket's reader; `iommu_bind` starts the idle reader without a twin socket)
//! and queued for [`Client::take_iommu_faults`]. Without negotiation these methods fail
//! locally with `DeviceError::Unsupported` and nothing is sent.
//!
//! A server that goes away turns every call into `DeviceError::Disconnected`; no call
//! hangs on a dead socket.

use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use nestio_device_model::{
    region_flags, DeviceError, DeviceInfo, IoEventFd, IrqAction, IrqData, IrqInfo, MigState,
    MigrationFlags, RegionInfo, Result, SparseArea, VfioDevice,
};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaPeer, DmaRange, Prot};

use crate::endpoint::{Endpoint, EndpointError, Incoming};
use crate::nested_iommu::{
    FaultInbox, InvalidateReply, IommuBind, IommuFault, IommuInvalidate, NestedIommuCap,
    NestedIommuCaps,
};
use crate::posted_ring::{PushError, RingProducer};
use crate::proto::{
    self, dma_flags, feature, irq_set_flags, Capabilities, Command, DeviceFeature, DeviceInfoMsg,
    DmaAccess, DmaMap, DmaUnmap, IoFdsMsg, IoFdsReply, IrqInfoMsg, IrqSet, LoggingControl,
    LoggingReport, MigData, MultiWrite, RegionInfoMsg, RegionInfoReply, Version, WriteMulti,
};
use crate::region_port::RegionPort;
use crate::socket::Message;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Offer twin-socket mode.
    pub twin_socket: bool,
    /// Offer REGION_WRITE_MULTI.
    pub write_multiple: bool,
    /// Largest DMA_READ/WRITE count we accept from the server.
    pub max_data_xfer_size: u32,
    /// Most fds we accept in one message.
    pub max_msg_fds: u32,
    /// Give up on a server that sends no reply for this long (the connection is then
    /// closed and every call fails with `Disconnected`). None: wait forever, as a
    /// DEVICE_RESET or migration step may legitimately take long.
    pub reply_timeout: Option<std::time::Duration>,
    /// Propose nestio's nested-IOMMU extension with these SMMUv3 parameters (what the
    /// client's vIOMMU can describe to its guest); `None`: not proposed (the default,
    /// so servers that do not know the key never see it).
    pub nested_iommu: Option<NestedIommuCaps>,
    /// Offer nestio's posted-write ring ([`crate::posted_ring`]); a server without it
    /// gets posted writes over the socket.
    pub posted_ring: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            twin_socket: true,
            write_multiple: true,
            max_data_xfer_size: proto::DEFAULT_MAX_DATA_XFER,
            max_msg_fds: 64,
            reply_timeout: None,
            nested_iommu: None,
            posted_ring: true,
        }
    }
}

/// Errors while connecting.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error.
    #[error("cannot connect to the vfio-user server: {0}")]
    Io(#[from] std::io::Error),
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] EndpointError),
    /// The server answered VERSION with an error.
    #[error("the vfio-user server refused our VERSION (errno {0}); is it a compatible server?")]
    Refused(i32),
    /// The server answered VERSION with EBUSY: another client owns the device.
    #[error("the device is busy: another client owns it (a vfio-user device serves one client at a time); stop that client or wait until it leaves")]
    Busy,
    /// The server's answer breaks the protocol.
    #[error("vfio-user server broke the protocol during negotiation: {0}")]
    Protocol(String),
    /// A device call failed during setup.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

struct PeerMapping {
    range: DmaRange,
    prot: Prot,
    peer: Arc<dyn DmaPeer>,
}

/// The peer-backed DMA mappings, by start address: what the server may DMA_READ/WRITE.
#[derive(Default)]
struct PeerMap {
    maps: RwLock<BTreeMap<u64, PeerMapping>>,
}

impl PeerMap {
    fn find(&self, addr: u64, len: u64, write: bool) -> std::result::Result<Arc<dyn DmaPeer>, i32> {
        let maps = self.maps.read();
        let last = addr
            .checked_add(len.checked_sub(1).ok_or(libc::EINVAL)?)
            .ok_or(libc::EINVAL)?;
        let (_, m) = maps.range(..=addr).next_back().ok_or(libc::EFAULT)?;
        if !m.range.contains(addr) || !m.range.contains(last) {
            return Err(libc::EFAULT);
        }
        let ok = if write {
            m.prot.writable()
        } else {
            m.prot.readable()
        };
        if !ok {
            return Err(libc::EPERM);
        }
        Ok(m.peer.clone())
    }

    /// Serve a DMA_READ / DMA_WRITE from the server.
    fn serve(&self, max_xfer: usize, m: &Message) -> std::result::Result<Vec<u8>, i32> {
        if !m.fds.is_empty() {
            return Err(libc::EINVAL);
        }
        match Command::from_u16(m.header.cmd) {
            Some(Command::DmaRead) => {
                let a = DmaAccess::decode(&m.payload, false).map_err(|e| e.errno())?;
                if a.count > max_xfer as u64 {
                    return Err(libc::EINVAL);
                }
                let peer = self.find(a.addr, a.count, false)?;
                let mut out = Vec::with_capacity(DmaAccess::SIZE + a.count as usize);
                DmaAccess { data: &[], ..a }.encode_into(&mut out);
                out.resize(DmaAccess::SIZE + a.count as usize, 0);
                peer.dma_read(a.addr, &mut out[DmaAccess::SIZE..])?;
                Ok(out)
            }
            Some(Command::DmaWrite) => {
                let a = DmaAccess::decode(&m.payload, true).map_err(|e| e.errno())?;
                if a.count > max_xfer as u64 {
                    return Err(libc::EINVAL);
                }
                let peer = self.find(a.addr, a.count, true)?;
                peer.dma_write(a.addr, a.data)?;
                let mut out = Vec::with_capacity(DmaAccess::SIZE);
                DmaAccess { data: &[], ..a }.encode_into(&mut out);
                Ok(out)
            }
            _ => {
                tracing::warn!(
                    cmd = m.header.cmd,
                    "server sent a command a client does not serve"
                );
                Err(libc::ENOSYS)
            }
        }
    }
}

/// Memory shared with us by file, reached by the server through DMA_READ/WRITE
/// messages: always allowed (spec: the operations "must be supported ... even if the
/// corresponding memory ... has been shared as mappable"), and the only way when the
/// server takes no fds (`max_msg_fds` 0). `pread`/`pwrite` at the mapping's file offset;
/// the fd is the caller's, shared (no dup: a client may hold tens of thousands of
/// mappings).
struct FilePeer {
    fd: Arc<OwnedFd>,
    /// IOVA of the mapping's first byte.
    start: u64,
    /// File offset of the mapping's first byte.
    offset: u64,
}

impl FilePeer {
    /// The file offset of IOVA `addr` (the peer map already checked it is mapped).
    fn at(&self, addr: u64) -> std::result::Result<u64, i32> {
        addr.checked_sub(self.start)
            .and_then(|d| d.checked_add(self.offset))
            .filter(|&at| i64::try_from(at).is_ok())
            .ok_or(libc::EFAULT)
    }
}

/// End of file (0 from [`nestio_dma::file_io`]) is memory that is not there: a fault.
fn fault_at_eof(errno: i32) -> i32 {
    if errno == 0 {
        libc::EFAULT
    } else {
        errno
    }
}

impl DmaPeer for FilePeer {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> std::result::Result<(), i32> {
        let at = self.at(addr)?;
        nestio_dma::file_io::with_file(std::os::fd::AsFd::as_fd(&*self.fd), |f| {
            nestio_dma::file_io::read_at(f, at, buf)
        })
        .map_err(fault_at_eof)
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> std::result::Result<(), i32> {
        let at = self.at(addr)?;
        nestio_dma::file_io::with_file(std::os::fd::AsFd::as_fd(&*self.fd), |f| {
            nestio_dma::file_io::write_at(f, at, data)
        })
        .map_err(fault_at_eof)
    }
}

/// A connection to a vfio-user server, usable as a [`VfioDevice`].
pub struct Client {
    ep: Arc<Endpoint>,
    twin: Option<(Arc<Endpoint>, JoinHandle<()>)>,
    /// Without a twin socket: a thread that keeps reading the main socket once memory is
    /// mapped by message, so the server's DMA_READ/WRITE is served while no client thread
    /// waits for a reply (a NIC receiving while its driver is idle).
    idle_reader: Mutex<Option<JoinHandle<()>>>,
    version: Version,
    info: DeviceInfo,
    peers: Arc<PeerMap>,
    max_xfer: usize,
    max_fds: usize,
    write_multiple: bool,
    /// The negotiated nested-IOMMU parameters (`crate::nested_iommu`).
    nested: Option<NestedIommuCaps>,
    /// FAULT messages from the server, for [`Client::take_iommu_faults`].
    faults: Arc<FaultInbox>,
    /// nestio's posted-write ring, when the server enabled it.
    ring: Option<RingProducer>,
}

pub(crate) fn disconnected(e: EndpointError) -> DeviceError {
    match e {
        EndpointError::Closed(why) => DeviceError::Disconnected(format!(
            "vfio-user server went away ({why}); the device must be reset or reconnected"
        )),
        EndpointError::TimedOut(t) => DeviceError::Disconnected(format!(
            "vfio-user server sent no reply within {t:?}; the connection was closed, \
             reconnect to a restarted server"
        )),
        EndpointError::Build(why) => DeviceError::Invalid(why),
    }
}

pub(crate) fn reply_errno(m: &Message) -> i32 {
    match m.header.error as i32 {
        0 => libc::EIO,
        e => e,
    }
}

pub(crate) fn bad_reply(what: &str, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Invalid(format!(
        "malformed {what} reply from the vfio-user server: {e}"
    ))
}

impl Client {
    /// Connect to the server at `path` with default settings.
    pub fn connect(path: impl AsRef<Path>) -> std::result::Result<Client, ClientError> {
        let s = UnixStream::connect(path)?;
        Client::from_stream(s, ClientConfig::default())
    }

    /// Negotiate on an connected stream.
    pub fn from_stream(
        stream: UnixStream,
        config: ClientConfig,
    ) -> std::result::Result<Client, ClientError> {
        let peers = Arc::new(PeerMap::default());
        let faults = Arc::new(FaultInbox::default());
        let my_xfer = config.max_data_xfer_size.max(1) as usize;
        let (hp, hf) = (peers.clone(), faults.clone());
        let ep = Arc::new(Endpoint::new(
            stream,
            my_xfer.max(1 << 16) + 4096,
            Incoming::Handle(Box::new(move |m| {
                serve_server_command(&hp, &hf, my_xfer, m)
            })),
            "client",
        ));
        ep.set_reply_timeout(config.reply_timeout);
        let mut offer = Version {
            major: proto::VERSION_MAJOR,
            minor: proto::VERSION_MINOR,
            // Within every server parser's bounds (proto's table).
            caps: Capabilities::client_offer(
                config.max_msg_fds,
                u32::try_from(my_xfer).unwrap_or(u32::MAX),
                config.twin_socket,
                config.write_multiple,
            ),
        };
        offer.caps.nestio_nested_iommu = config.nested_iommu.clone().map(NestedIommuCap::smmuv3);
        offer.caps.nestio_posted_ring = config.posted_ring.then_some(proto::PostedRingCap {
            supported: true,
            ..Default::default()
        });
        let mut b = Vec::new();
        offer.encode_into(&mut b);
        let mut reply = ep.request(Command::Version, &b, &[])?;
        if reply.header.is_error() {
            return Err(match reply_errno(&reply) {
                libc::EBUSY => ClientError::Busy,
                e => ClientError::Refused(e),
            });
        }
        let v =
            Version::decode(&reply.payload).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if v.major != proto::VERSION_MAJOR || v.minor > proto::VERSION_MINOR {
            return Err(ClientError::Protocol(format!(
                "server answered version {}.{} to our {}.{}",
                v.major,
                v.minor,
                proto::VERSION_MAJOR,
                proto::VERSION_MINOR
            )));
        }
        // Data moves in both directions within one request/reply pair (a REGION_READ's
        // reply carries `count` bytes to us), so every count we ask for stays within both
        // sides' max_data_xfer_size, and what we accept is bounded by our own limit (or
        // the 1 MiB we allow a capability chain), never by the server's word.
        let server_xfer = (v.caps.max_data_xfer_size as usize).min(my_xfer);
        let nested = match (&config.nested_iommu, &v.caps.nestio_nested_iommu) {
            (
                Some(ours),
                Some(NestedIommuCap {
                    smmuv3: Some(theirs),
                }),
            ) => ours.negotiate(theirs),
            (None, Some(_)) => {
                tracing::warn!(
                    "server answered nestio_nested_iommu, which we did not propose; ignored"
                );
                None
            }
            _ => None,
        };
        if nested.is_some() {
            faults.enable();
        }
        ep.set_max_msg_size(my_xfer.max(1 << 20) + 4096);
        // Taken out by index (the twin socket's and the ring's), so none moves.
        let mut fds: Vec<Option<OwnedFd>> = reply.fds.drain(..).map(Some).collect();
        let ring = ring_from_reply(&config, &v.caps, &mut fds)?;
        let mut twin = None;
        if v.caps.twin_supported() {
            if !config.twin_socket {
                return Err(ClientError::Protocol(
                    "server enabled a twin socket we did not offer".into(),
                ));
            }
            let idx = v.caps.twin_socket.and_then(|t| t.fd_index).ok_or_else(|| {
                ClientError::Protocol("twin socket enabled without fd_index".into())
            })?;
            let n = fds.len();
            let fd: OwnedFd = fds
                .get_mut(idx as usize)
                .and_then(Option::take)
                .ok_or_else(|| {
                    ClientError::Protocol(format!(
                        "twin socket fd_index {idx} but the reply carries {n} fds (or the index is taken)"
                    ))
                })?;
            let stream = UnixStream::from(fd);
            let tep = Arc::new(Endpoint::new(
                stream,
                my_xfer + 4096,
                Incoming::Queue,
                "client-twin",
            ));
            let (t2, p2, f2) = (tep.clone(), peers.clone(), faults.clone());
            let handle = std::thread::Builder::new()
                .name("vfio-user-twin".into())
                .spawn(move || twin_loop(&t2, &p2, &f2, my_xfer))?;
            twin = Some((tep, handle));
        }
        drop(reply);
        let mut client = Client {
            ep,
            twin,
            idle_reader: Mutex::new(None),
            max_xfer: server_xfer.max(1),
            // 0 is a real value (spec: "maximum number of file descriptors that can be
            // received"): such a server gets no fd at all (see `dma_map`, `set_irqs`).
            max_fds: v.caps.max_msg_fds as usize,
            write_multiple: config.write_multiple && v.caps.write_multiple,
            nested,
            faults,
            ring,
            version: v,
            info: DeviceInfo {
                flags: 0,
                num_regions: 0,
                num_irqs: 0,
            },
            peers,
        };
        client.info = client.fetch_info()?;
        Ok(client)
    }

    /// The server's VERSION reply (negotiated minor and the server's capabilities).
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// Change how long a request waits for its reply (`None`: forever) from now on;
    /// the connection's negotiation used [`ClientConfig::reply_timeout`]. A request
    /// without a reply in time ends the connection (`DeviceError::Disconnected`): the
    /// stream can no longer be trusted to be in sync.
    pub fn set_reply_timeout(&self, timeout: Option<std::time::Duration>) {
        self.ep.set_reply_timeout(timeout);
    }

    /// Is twin-socket mode in use?
    pub fn twin_socket(&self) -> bool {
        self.twin.is_some()
    }

    /// Is REGION_WRITE_MULTI usable?
    pub fn write_multiple(&self) -> bool {
        self.write_multiple
    }

    fn call(&self, what: &str, cmd: Command, payload: &[u8], fds: &[RawFd]) -> Result<Message> {
        let m = self.ep.request(cmd, payload, fds).map_err(disconnected)?;
        if m.header.is_error() {
            return Err(DeviceError::Remote {
                what: what.to_string(),
                errno: reply_errno(&m),
            });
        }
        Ok(m)
    }

    fn fetch_info(&self) -> Result<DeviceInfo> {
        let mut b = Vec::with_capacity(16);
        DeviceInfoMsg {
            argsz: DeviceInfoMsg::SIZE as u32,
            flags: 0,
            num_regions: 0,
            num_irqs: 0,
        }
        .encode_into(&mut b);
        let m = self.call("DEVICE_GET_INFO", Command::DeviceGetInfo, &b, &[])?;
        let r = DeviceInfoMsg::decode(&m.payload).map_err(|e| bad_reply("DEVICE_GET_INFO", e))?;
        Ok(DeviceInfo {
            flags: r.flags,
            num_regions: r.num_regions,
            num_irqs: r.num_irqs,
        })
    }

    /// Several small writes in one message (REGION_WRITE_MULTI when negotiated, else one
    /// REGION_WRITE each).
    pub fn region_write_multi(&self, writes: &[MultiWrite]) -> Result<()> {
        if !self.write_multiple {
            for w in writes {
                self.region_write(w.region, w.offset, w.bytes())?;
            }
            return Ok(());
        }
        let per_msg = (self.max_xfer / WriteMulti::ENTRY).max(1);
        let mut b = Vec::with_capacity(8 + writes.len().min(per_msg) * WriteMulti::ENTRY);
        for chunk in writes.chunks(per_msg) {
            b.clear();
            WriteMulti::encode_writes_into(chunk, &mut b);
            let m = self.call("REGION_WRITE_MULTI", Command::RegionWriteMulti, &b, &[])?;
            let n = proto::decode_write_multi_reply(&m.payload)
                .map_err(|e| bad_reply("REGION_WRITE_MULTI", e))?;
            if n != chunk.len() as u64 {
                return Err(bad_reply(
                    "REGION_WRITE_MULTI",
                    format!("{n} of {} writes done", chunk.len()),
                ));
            }
        }
        Ok(())
    }

    /// Region accesses over the main socket (shared with the BAR channel, see
    /// [`crate::region_port`]).
    fn port(&self) -> RegionPort<'_> {
        RegionPort::new(&self.ep, self.max_xfer)
    }

    /// A region write that asks for no reply (posted, like PCI MMIO writes). Errors are
    /// only logged by the server. With nestio's posted-write ring, a write of at most 8
    /// bytes goes into the ring; a larger one, or one that finds the ring full, is sent
    /// synchronously (which keeps the order, see [`crate::posted_ring`]).
    pub fn region_write_posted(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if let Some(ring) = &self.ring {
            return match ring.push(index, offset, data) {
                Ok(()) => Ok(()),
                Err(PushError::Full | PushError::TooLarge) => {
                    self.region_write(index, offset, data)
                }
                Err(PushError::Closed) => Err(DeviceError::Disconnected(
                    "vfio-user server ended the session (its posted-write ring is closed); \
                     the device must be reset or reconnected"
                        .into(),
                )),
            };
        }
        self.port().write_posted(index, offset, data)
    }

    /// nestio's posted-write ring, when the server enabled it.
    pub fn posted_ring(&self) -> Option<&RingProducer> {
        self.ring.as_ref()
    }

    /// Give the device an INTx unmask eventfd (SET_IRQS ACTION_UNMASK | DATA_EVENTFD on
    /// the INTx index), or remove it with `None` (fd -1). Signalling `fd` then unmasks
    /// INTx in the device with no message: hand it the resample eventfd of a
    /// level-triggered KVM irqfd and each EOI unmasks on its own. The INTx trigger
    /// eventfd must be set first; a server without the feature answers ENOTSUP and the
    /// caller keeps unmasking by message.
    pub fn set_intx_unmask_eventfd(&self, fd: Option<std::os::fd::BorrowedFd<'_>>) -> Result<()> {
        let fd = fd
            .map(|f| f.try_clone_to_owned())
            .transpose()
            .map_err(DeviceError::Io)?;
        self.set_irqs(
            nestio_device_model::pci_index::INTX_IRQ,
            IrqAction::Unmask,
            0,
            1,
            IrqData::Eventfd(vec![fd]),
        )
    }

    fn feature(&self, what: &str, flags: u32, data: &[u8], reply_data: usize) -> Result<Message> {
        let mut b = Vec::with_capacity(8 + data.len());
        DeviceFeature {
            argsz: (DeviceFeature::SIZE + reply_data.max(data.len())) as u32,
            flags,
            data,
        }
        .encode_into(&mut b);
        self.call(what, Command::DeviceFeature, &b, &[])
    }

    /// DEVICE_FEATURE `index` with `flags` (GET/SET/PROBE) and `data`, leaving room for
    /// `reply_data` bytes of reply data: the reply's feature data and the fds that came
    /// with it (owned; the caller checks them). For features this client has no method
    /// for (a server answering ENOTTY does not have the feature).
    pub fn device_feature(
        &self,
        index: u16,
        flags: u32,
        data: &[u8],
        reply_data: usize,
    ) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        let flags = (flags & !proto::feature::INDEX_MASK) | u32::from(index);
        let m = self.feature("DEVICE_FEATURE", flags, data, reply_data)?;
        let f = DeviceFeature::decode(&m.payload).map_err(|e| bad_reply("DEVICE_FEATURE", e))?;
        if f.data.len() > reply_data.max(data.len()) {
            return Err(bad_reply(
                "DEVICE_FEATURE",
                format!(
                    "{} data bytes, at most {reply_data} asked for",
                    f.data.len()
                ),
            ));
        }
        let data = f.data.to_vec();
        Ok((data, m.fds))
    }

    fn feature_data<'a>(what: &str, m: &'a Message, len: usize) -> Result<&'a [u8]> {
        let f = DeviceFeature::decode(&m.payload).map_err(|e| bad_reply(what, e))?;
        if f.data.len() != len {
            return Err(bad_reply(
                what,
                format!("{} data bytes, expected {len}", f.data.len()),
            ));
        }
        Ok(f.data)
    }

    fn mig_state_call(&self, flags: u32, data: &[u8]) -> Result<MigState> {
        let m = self.feature("MIG_DEVICE_STATE", flags, data, 8)?;
        let d = Self::feature_data("MIG_DEVICE_STATE", &m, 8)?;
        let s = proto::decode_mig_state(d).map_err(|e| bad_reply("MIG_DEVICE_STATE", e))?;
        MigState::from_u32(s)
            .ok_or_else(|| bad_reply("MIG_DEVICE_STATE", format!("unknown state {s}")))
    }

    fn send_irqs(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        bools: &[u8],
        fds: &[RawFd],
    ) -> Result<()> {
        let mut b = Vec::with_capacity(IrqSet::SIZE + bools.len());
        IrqSet {
            flags,
            index,
            start,
            count,
            data: bools,
        }
        .encode_into(&mut b);
        self.call("DEVICE_SET_IRQS", Command::DeviceSetIrqs, &b, fds)?;
        Ok(())
    }
}

/// The posted-write ring the server's VERSION reply enables, taking its fds out of
/// `fds`. Indices that do not name two distinct fds break the protocol; memory that is
/// unsafe to map (not sealed, too small) is refused with a warning and posted writes go
/// over the socket.
fn ring_from_reply(
    config: &ClientConfig,
    caps: &Capabilities,
    fds: &mut [Option<OwnedFd>],
) -> std::result::Result<Option<RingProducer>, ClientError> {
    let Some(r) = caps.nestio_posted_ring.filter(|r| r.supported) else {
        return Ok(None);
    };
    if !config.posted_ring {
        return Err(ClientError::Protocol(
            "server enabled a posted-write ring we did not offer".into(),
        ));
    }
    let (Some(entries), Some(mi), Some(ki)) = (r.entries, r.fd_index, r.kick_fd_index) else {
        return Err(ClientError::Protocol(
            "posted-write ring enabled without entries, fd_index and kick_fd_index".into(),
        ));
    };
    let n = fds.len();
    let mut take = |i: u32, what: &str| {
        fds.get_mut(i as usize)
            .and_then(Option::take)
            .ok_or_else(|| {
                ClientError::Protocol(format!(
                    "posted-write ring {what} {i} but the reply carries {n} fds (or the index is taken)"
                ))
            })
    };
    let memfd = take(mi, "fd_index")?;
    let kick = take(ki, "kick_fd_index")?;
    match RingProducer::attach(memfd, kick, entries) {
        Ok(p) => Ok(Some(p)),
        Err(e) => {
            tracing::warn!(error = %e, "not using the server's posted-write ring");
            Ok(None)
        }
    }
}

/// A command from the server: DMA_READ/WRITE for the peer mappings, or a nested-IOMMU
/// fault record for the VMM.
fn serve_server_command(
    peers: &PeerMap,
    faults: &FaultInbox,
    max_xfer: usize,
    m: &Message,
) -> std::result::Result<Vec<u8>, i32> {
    if m.header.cmd == Command::NestioIommuFault as u16 {
        return faults.deliver(m);
    }
    peers.serve(max_xfer, m)
}

fn twin_loop(ep: &Endpoint, peers: &PeerMap, faults: &FaultInbox, max_xfer: usize) {
    loop {
        match ep.next_command() {
            Ok(Some(m)) => {
                let r = if m.header.check_flags().is_err() {
                    Err(libc::EINVAL)
                } else {
                    serve_server_command(peers, faults, max_xfer, &m)
                };
                let res = match &r {
                    Ok(p) => ep.reply(&m.header, Ok(p), &[]),
                    Err(e) => ep.reply(&m.header, Err(*e), &[]),
                };
                if res.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "twin socket closed");
                break;
            }
        }
    }
    // The server's FAULTs came here: a receiver waiting for them sees the end.
    faults.close();
}

impl Drop for Client {
    fn drop(&mut self) {
        self.ep.shutdown("client dropped");
        if let Some((t, h)) = self.twin.take() {
            t.shutdown("client dropped");
            let _ = h.join();
        }
        let idle = self.idle_reader.get_mut().take();
        if let Some(h) = idle {
            let _ = h.join();
        }
    }
}

impl Client {
    /// Without a twin socket, make sure a thread reads the main socket while the client
    /// is idle, so that server-initiated DMA is always served. (It costs request threads
    /// a hand-off, so it starts only once memory is mapped by message.)
    fn ensure_idle_reader(&self) -> std::io::Result<()> {
        if self.twin.is_some() {
            return Ok(());
        }
        let mut slot = self.idle_reader.lock();
        if slot.is_some() {
            return Ok(());
        }
        let ep = self.ep.clone();
        let faults = self.faults.clone();
        let h = std::thread::Builder::new()
            .name("vfio-user-reader".into())
            .spawn(move || {
                // In handle mode this reads until the connection closes: replies are
                // parked for their waiters, DMA commands are served inline.
                if let Err(e) = ep.next_command() {
                    tracing::debug!(error = %e, "vfio-user reader stopped");
                }
                // The connection is gone: a receiver of FAULTs sees the end.
                faults.close();
            })?;
        *slot = Some(h);
        Ok(())
    }
}

/// nestio's nested-IOMMU extension (`crate::nested_iommu`, spec in
/// `docs/vfio-user-nested-iommu.md`).
impl Client {
    /// The negotiated nested-IOMMU parameters (the smaller of ours and the server's),
    /// or `None` when [`ClientConfig::nested_iommu`] was not set or the server did not
    /// answer the capability (then use shadow mode).
    pub fn nested_iommu(&self) -> Option<NestedIommuCaps> {
        self.nested.clone()
    }

    fn require_nested(&self, what: &str) -> Result<()> {
        if self.nested.is_none() {
            return Err(DeviceError::Unsupported(format!(
                "{what}: the server did not negotiate the nested IOMMU extension \
                 (propose it with ClientConfig::nested_iommu, or use shadow mode)"
            )));
        }
        Ok(())
    }

    /// Bind the guest's STE (dwords 0 and 1) for virtual stream `vsid`: from the reply
    /// on, every DMA of the device goes through the guest's stage 1. Replaces an
    /// earlier binding. EINVAL (as `DeviceError::Remote`) for an STE without stage 1.
    pub fn iommu_bind(&self, vsid: u32, ste0: u64, ste1: u64) -> Result<()> {
        self.require_nested("NESTIO_IOMMU_BIND")?;
        // Faults come as server commands: without a twin socket, make sure a thread
        // reads the main socket while the client is idle.
        self.ensure_idle_reader()?;
        let mut b = Vec::with_capacity(IommuBind::SIZE);
        IommuBind { vsid, ste0, ste1 }.encode_into(&mut b);
        self.call("NESTIO_IOMMU_BIND", Command::NestioIommuBind, &b, &[])?;
        Ok(())
    }

    /// Drop the binding: the device's DMA addresses are IPAs (stage 2 only) again.
    pub fn iommu_unbind(&self) -> Result<()> {
        self.require_nested("NESTIO_IOMMU_UNBIND")?;
        self.call("NESTIO_IOMMU_UNBIND", Command::NestioIommuUnbind, &[], &[])?;
        Ok(())
    }

    /// Forward the guest's raw 16-byte SMMUv3 commands (TLBI_NH_*, CFGI_CD*, CMD_SYNC)
    /// in order, in messages of at most 256. Returns once every DMA that used an
    /// invalidated translation has completed. `done` counts the commands executed;
    /// a nonzero `cerror` (`CERROR_ILL`) is for the command at index `done`, and
    /// nothing after it was sent. An empty list sends nothing.
    pub fn iommu_invalidate(&self, commands: &[[u8; 16]]) -> Result<InvalidateReply> {
        self.require_nested("NESTIO_IOMMU_INVALIDATE")?;
        let mut total = InvalidateReply::default();
        let mut b = Vec::with_capacity(IommuInvalidate::HEAD + 16 * commands.len().min(256));
        for chunk in commands.chunks(crate::nested_iommu::MAX_COMMANDS) {
            b.clear();
            IommuInvalidate::encode_into(chunk, &mut b);
            let m = self.call(
                "NESTIO_IOMMU_INVALIDATE",
                Command::NestioIommuInvalidate,
                &b,
                &[],
            )?;
            let r = InvalidateReply::decode(&m.payload)
                .map_err(|e| bad_reply("NESTIO_IOMMU_INVALIDATE", e))?;
            let n = chunk.len() as u32;
            if r.done > n || (r.cerror == 0) != (r.done == n) {
                return Err(bad_reply(
                    "NESTIO_IOMMU_INVALIDATE",
                    format!("done {} cerror {} for {n} commands", r.done, r.cerror),
                ));
            }
            total.done += r.done;
            if r.cerror != 0 {
                total.cerror = r.cerror;
                break;
            }
        }
        Ok(total)
    }

    /// The fault records the server reports (once: later calls return `None`; also
    /// `None` without the extension). Each carries the guest's vSID as StreamID; put
    /// it in the guest's event queue. At most 1024 wait here: a full queue drops new
    /// records and flags the next one delivered `lost_before`. The channel ends (`recv`
    /// fails) when the connection does (or the client is dropped).
    pub fn take_iommu_faults(&self) -> Option<std::sync::mpsc::Receiver<IommuFault>> {
        self.nested.as_ref()?;
        self.faults.take_receiver()
    }
}

impl VfioDevice for Client {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let mut room = (RegionInfoMsg::SIZE + proto::sparse_cap_len(8)) as u32;
        for _ in 0..3 {
            let mut b = Vec::with_capacity(32);
            RegionInfoMsg {
                argsz: room,
                index,
                ..RegionInfoMsg::default()
            }
            .encode_into(&mut b);
            let mut m = self.call(
                "DEVICE_GET_REGION_INFO",
                Command::DeviceGetRegionInfo,
                &b,
                &[],
            )?;
            // The fixed part first: a server that needs more room than we offered says
            // so in argsz, whatever it put in cap_offset (some leave it set with no
            // capability data following), so retry before parsing any capability.
            let head = m.payload.get(..RegionInfoMsg::SIZE).unwrap_or(&m.payload);
            let fixed =
                RegionInfoMsg::decode(head).map_err(|e| bad_reply("DEVICE_GET_REGION_INFO", e))?;
            if fixed.argsz > room {
                if fixed.argsz > (1 << 20) {
                    return Err(bad_reply(
                        "DEVICE_GET_REGION_INFO",
                        "capability chain over 1 MiB",
                    ));
                }
                room = fixed.argsz;
                continue;
            }
            let r = RegionInfoReply::decode(&m.payload)
                .map_err(|e| bad_reply("DEVICE_GET_REGION_INFO", e))?;
            // Every sparse area is a part of the region (and of the mmap fd's range).
            for &(offset, size) in &r.sparse {
                let inside = offset
                    .checked_add(size)
                    .is_some_and(|end| end <= r.info.size)
                    && r.info.offset.checked_add(offset).is_some();
                if !inside {
                    return Err(bad_reply(
                        "DEVICE_GET_REGION_INFO",
                        format!(
                            "sparse area {offset:#x}+{size:#x} lies outside region {index} ({:#x} bytes)",
                            r.info.size
                        ),
                    ));
                }
            }
            let fd = if m.fds.is_empty() {
                None
            } else {
                Some(Arc::new(m.fds.swap_remove(0)))
            };
            // Without an fd the region cannot be mmapped here, whatever the flags say:
            // clear MMAP so users fall back to REGION_READ/WRITE.
            let mut flags = r.info.flags & !region_flags::CAPS;
            if fd.is_none() {
                flags &= !region_flags::MMAP;
            }
            return Ok(RegionInfo {
                index,
                flags,
                size: r.info.size,
                fd_offset: r.info.offset,
                sparse: r
                    .sparse
                    .iter()
                    .map(|&(offset, size)| SparseArea { offset, size })
                    .collect(),
                fd,
            });
        }
        Err(bad_reply("DEVICE_GET_REGION_INFO", "argsz kept growing"))
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.port().read(index, offset, buf)
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.port().write(index, offset, data)
    }

    fn region_io_fds(&self, index: u32) -> Result<Vec<IoEventFd>> {
        let mut room = (IoFdsMsg::SIZE + IoFdsMsg::ENTRY * 16) as u32;
        for _ in 0..3 {
            let mut b = Vec::with_capacity(16);
            IoFdsMsg {
                argsz: room,
                flags: 0,
                index,
                count: 0,
            }
            .encode_into(&mut b);
            let m = self.call(
                "DEVICE_GET_REGION_IO_FDS",
                Command::DeviceGetRegionIoFds,
                &b,
                &[],
            )?;
            let r = IoFdsReply::decode(&m.payload)
                .map_err(|e| bad_reply("DEVICE_GET_REGION_IO_FDS", e))?;
            if r.hdr.count > 0 && r.entries.is_empty() {
                if r.hdr.argsz <= room || r.hdr.argsz > (1 << 20) {
                    return Err(bad_reply(
                        "DEVICE_GET_REGION_IO_FDS",
                        "no entries despite room",
                    ));
                }
                room = r.hdr.argsz;
                continue;
            }
            let fds: Vec<Arc<OwnedFd>> = m.fds.into_iter().map(Arc::new).collect();
            if r.entries.is_empty() {
                return Ok(Vec::new());
            }
            // Spec: the client verifies the sub-regions (e.g. that they stay inside the
            // region) before wiring them to a guest address.
            let region_size = self.region_info(index)?.size;
            let mut out = Vec::with_capacity(r.entries.len());
            for e in r.entries {
                let inside = e
                    .offset
                    .checked_add(e.size)
                    .is_some_and(|end| end <= region_size);
                if !inside {
                    return Err(bad_reply(
                        "DEVICE_GET_REGION_IO_FDS",
                        format!(
                            "sub-region {:#x}+{:#x} lies outside region {index} ({region_size:#x} bytes)",
                            e.offset, e.size
                        ),
                    ));
                }
                if e.kind != proto::IO_FD_TYPE_IOEVENTFD {
                    tracing::debug!(kind = e.kind, "skipping a non-ioeventfd io fd");
                    continue;
                }
                // An IoEventFd is an MMIO ioeventfd, optionally with datamatch: an entry
                // with any other KVM flag (PIO, virtio-ccw notify) cannot be described
                // by it and must not be wired as MMIO.
                if e.flags & !proto::IOEVENTFD_FLAG_DATAMATCH != 0 {
                    tracing::debug!(
                        flags = e.flags,
                        "skipping an ioeventfd with flags other than DATAMATCH"
                    );
                    continue;
                }
                let fd = fds.get(e.fd_index as usize).ok_or_else(|| {
                    bad_reply("DEVICE_GET_REGION_IO_FDS", "fd_index out of range")
                })?;
                out.push(IoEventFd {
                    offset: e.offset,
                    size: e.size,
                    datamatch: (e.flags & proto::IOEVENTFD_FLAG_DATAMATCH != 0)
                        .then_some(e.datamatch),
                    fd: fd.clone(),
                });
            }
            return Ok(out);
        }
        Err(bad_reply("DEVICE_GET_REGION_IO_FDS", "argsz kept growing"))
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        let mut b = Vec::with_capacity(16);
        IrqInfoMsg {
            argsz: IrqInfoMsg::SIZE as u32,
            flags: 0,
            index,
            count: 0,
        }
        .encode_into(&mut b);
        let m = self.call("DEVICE_GET_IRQ_INFO", Command::DeviceGetIrqInfo, &b, &[])?;
        let r = IrqInfoMsg::decode(&m.payload).map_err(|e| bad_reply("DEVICE_GET_IRQ_INFO", e))?;
        Ok(IrqInfo {
            index,
            flags: r.flags,
            count: r.count,
        })
    }

    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        let act = match action {
            IrqAction::Mask => irq_set_flags::ACTION_MASK,
            IrqAction::Unmask => irq_set_flags::ACTION_UNMASK,
            IrqAction::Trigger => irq_set_flags::ACTION_TRIGGER,
        };
        match data {
            IrqData::None => self.send_irqs(
                index,
                irq_set_flags::DATA_NONE | act,
                start,
                count,
                &[],
                &[],
            ),
            IrqData::Bool(b) => {
                if b.len() != count as usize {
                    return Err(DeviceError::Invalid(format!(
                        "{} bools for {count} vectors",
                        b.len()
                    )));
                }
                let bytes: Vec<u8> = b.iter().map(|&x| x as u8).collect();
                self.send_irqs(
                    index,
                    irq_set_flags::DATA_BOOL | act,
                    start,
                    count,
                    &bytes,
                    &[],
                )
            }
            IrqData::Eventfd(fds) => {
                if fds.len() != count as usize {
                    return Err(DeviceError::Invalid(format!(
                        "{} eventfds for {count} vectors",
                        fds.len()
                    )));
                }
                let flags = irq_set_flags::DATA_EVENTFD | act;
                if fds.iter().all(|f| f.is_none()) {
                    return self.send_irqs(index, flags, start, count, &[], &[]);
                }
                if self.max_fds == 0 {
                    return Err(DeviceError::Unsupported(format!(
                        "eventfds for irq index {index}: the vfio-user server accepts no \
                         file descriptors (max_msg_fds 0); use interrupts by message"
                    )));
                }
                // Runs of present fds (at most max_fds per message) and runs of absent
                // ones (sent without fds: de-assign).
                let mut i = 0usize;
                while i < fds.len() {
                    let present = fds[i].is_some();
                    let mut j = i;
                    while j < fds.len() && fds[j].is_some() == present && (j - i) < self.max_fds {
                        j += 1;
                    }
                    let raw: Vec<RawFd> = fds[i..j]
                        .iter()
                        .filter_map(|f| f.as_ref().map(|f| f.as_raw_fd()))
                        .collect();
                    self.send_irqs(index, flags, start + i as u32, (j - i) as u32, &[], &raw)?;
                    i = j;
                }
                Ok(())
            }
        }
    }

    fn reset(&self) -> Result<()> {
        self.call("DEVICE_RESET", Command::DeviceReset, &[], &[])?;
        Ok(())
    }

    fn dma_map(&self, mut req: DmaMapRequest) -> Result<()> {
        // Spec, read and write operations: "all of these operations must be supported by
        // the client and/or server, even if the corresponding memory or device region
        // has been shared as mappable" — so memory shared by fd is also served to the
        // server's DMA_READ/WRITE, from the file.
        let file_peer = |fd: &Arc<OwnedFd>, offset: u64| FilePeer {
            fd: fd.clone(),
            start: req.range.start(),
            offset,
        };
        // A server that takes no fds (max_msg_fds 0) cannot map the file: the mapping is
        // sent without it and reached by message only (spec, DMA_MAP: "if the DMA region
        // cannot be directly mapped by the server, no file descriptor must be sent").
        if self.max_fds == 0 {
            if let DmaBacking::Fd { fd, offset } = &req.backing {
                let p = file_peer(fd, *offset);
                req.backing = DmaBacking::Peer(Arc::new(p));
            }
        }
        let by_message = matches!(req.backing, DmaBacking::Peer(_));
        let mut b = Vec::with_capacity(DmaMap::SIZE);
        let (offset, fd) = match &req.backing {
            DmaBacking::Fd { fd, offset } => (*offset, Some(fd.as_raw_fd())),
            DmaBacking::Peer(_) => (0, None),
        };
        DmaMap {
            flags: req.prot.bits(),
            offset,
            addr: req.range.start(),
            size: req.range.len(),
        }
        .encode_into(&mut b);
        let start = req.range.start();
        let peer: Arc<dyn DmaPeer> = match &req.backing {
            DmaBacking::Peer(p) => p.clone(),
            DmaBacking::Fd { fd, offset } => Arc::new(file_peer(fd, *offset)),
        };
        let registered = {
            let mut maps = self.peers.maps.write();
            // Mappings never overlap: only the last one starting at or before our end
            // can reach into our range.
            let overlap = maps
                .range(..=req.range.last())
                .next_back()
                .is_some_and(|(_, m)| m.range.overlaps(&req.range));
            if overlap && by_message {
                return Err(nestio_dma::DmaError::Overlap {
                    iova: start,
                    size: req.range.len(),
                }
                .into());
            }
            // An overlapping fd mapping is the server's to refuse (EEXIST).
            if !overlap {
                maps.insert(
                    start,
                    PeerMapping {
                        range: req.range,
                        prot: req.prot,
                        peer,
                    },
                );
            }
            !overlap
        };
        if by_message {
            self.ensure_idle_reader()?;
        }
        let fds: Vec<RawFd> = fd.into_iter().collect();
        let r = self.call("DMA_MAP", Command::DmaMap, &b, &fds);
        if r.is_err() && registered {
            self.peers.maps.write().remove(&start);
        }
        r.map(|_| ())
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        let mut b = Vec::with_capacity(DmaUnmap::SIZE);
        DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            flags: 0,
            addr: iova,
            size,
        }
        .encode_into(&mut b);
        self.call("DMA_UNMAP", Command::DmaUnmap, &b, &[])?;
        let mut maps = self.peers.maps.write();
        if maps.get(&iova).is_some_and(|m| m.range.len() == size) {
            maps.remove(&iova);
        }
        Ok(())
    }

    fn dma_unmap_all(&self) -> Result<()> {
        let mut b = Vec::with_capacity(DmaUnmap::SIZE);
        DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            flags: dma_flags::UNMAP_ALL,
            addr: 0,
            size: 0,
        }
        .encode_into(&mut b);
        self.call("DMA_UNMAP", Command::DmaUnmap, &b, &[])?;
        self.peers.maps.write().clear();
        Ok(())
    }

    fn migration_flags(&self) -> Option<MigrationFlags> {
        let m = self
            .feature(
                "MIGRATION",
                feature::GET | feature::MIGRATION as u32,
                &[],
                8,
            )
            .ok()?;
        let d = Self::feature_data("MIGRATION", &m, 8).ok()?;
        let flags = proto::decode_migration_flags(d).ok()?;
        // Spec, VFIO_DEVICE_FEATURE_MIGRATION: "at least VFIO_MIGRATION_STOP_COPY must be
        // set". Without it no migration can be driven (STOP_COPY and RESUMING are the
        // states that move the data), so such a device does not migrate.
        if flags & MigrationFlags::STOP_COPY == 0 {
            tracing::warn!(
                flags,
                "vfio-user server offers migration without STOP_COPY; treating the device as not migratable"
            );
            return None;
        }
        Some(MigrationFlags(flags))
    }

    fn mig_state(&self) -> Result<MigState> {
        self.mig_state_call(feature::GET | feature::MIG_DEVICE_STATE as u32, &[])
    }

    fn mig_set_state(&self, target: MigState) -> Result<MigState> {
        let mut d = Vec::with_capacity(8);
        proto::encode_mig_state(target as u32, &mut d);
        self.mig_state_call(feature::SET | feature::MIG_DEVICE_STATE as u32, &d)
    }

    fn mig_data_read(&self, buf: &mut [u8]) -> Result<usize> {
        let n = buf.len().min(self.max_xfer);
        let mut b = Vec::with_capacity(MigData::SIZE);
        MigData {
            argsz: (MigData::SIZE + n) as u32,
            size: n as u32,
            data: &[],
        }
        .encode_into(&mut b);
        let m = self.call("MIG_DATA_READ", Command::MigDataRead, &b, &[])?;
        let r = MigData::decode(&m.payload, true).map_err(|e| bad_reply("MIG_DATA_READ", e))?;
        if r.size as usize > n {
            return Err(bad_reply("MIG_DATA_READ", "more data than asked for"));
        }
        buf[..r.data.len()].copy_from_slice(r.data);
        Ok(r.data.len())
    }

    fn mig_data_write(&self, data: &[u8]) -> Result<()> {
        let mut b = Vec::with_capacity(MigData::SIZE + data.len().min(self.max_xfer));
        for chunk in data.chunks(self.max_xfer) {
            b.clear();
            // The spec calls argsz the largest reply (none here), libvfio-user checks
            // it against the request (8 + size): this value satisfies both.
            MigData {
                argsz: (MigData::SIZE + chunk.len()) as u32,
                size: chunk.len() as u32,
                data: chunk,
            }
            .encode_into(&mut b);
            self.call("MIG_DATA_WRITE", Command::MigDataWrite, &b, &[])?;
        }
        Ok(())
    }

    fn dma_logging_start(&self, page_size: u64, ranges: &[DmaRange]) -> Result<()> {
        let mut d = Vec::new();
        LoggingControl {
            page_size,
            ranges: ranges.iter().map(|r| (r.start(), r.len())).collect(),
        }
        .encode_into(&mut d);
        self.feature(
            "DMA_LOGGING_START",
            feature::SET | feature::DMA_LOGGING_START as u32,
            &d,
            d.len(),
        )?;
        Ok(())
    }

    fn dma_logging_stop(&self) -> Result<()> {
        self.feature(
            "DMA_LOGGING_STOP",
            feature::SET | feature::DMA_LOGGING_STOP as u32,
            &[],
            0,
        )?;
        Ok(())
    }

    fn dma_logging_report(&self, range: DmaRange, page_size: u64) -> Result<Vec<u64>> {
        if !page_size.is_power_of_two() {
            return Err(DeviceError::Invalid(
                "dirty page size must be a power of two".into(),
            ));
        }
        // Pages per request: a multiple of 64 whose bitmap fits the server's limit.
        let pages_per = ((self.max_xfer as u64 * 8) / 64 * 64).max(64);
        let chunk_len = pages_per.saturating_mul(page_size);
        let mut out = Vec::new();
        let mut iova = range.start();
        let end = range.last();
        loop {
            let len = chunk_len.min(end - iova + 1);
            let r = LoggingReport {
                iova,
                length: len,
                page_size,
            };
            let bytes = r
                .bitmap_bytes()
                .ok_or_else(|| DeviceError::Invalid("dirty bitmap too large".into()))?;
            let mut d = Vec::with_capacity(LoggingReport::SIZE);
            r.encode_into(&mut d);
            let m = self.feature(
                "DMA_LOGGING_REPORT",
                feature::GET | feature::DMA_LOGGING_REPORT as u32,
                &d,
                LoggingReport::SIZE + bytes,
            )?;
            let data = Self::feature_data("DMA_LOGGING_REPORT", &m, LoggingReport::SIZE + bytes)?;
            let first = out.len();
            for w in data[LoggingReport::SIZE..].chunks_exact(8) {
                let mut a = [0u8; 8];
                a.copy_from_slice(w);
                out.push(u64::from_ne_bytes(a));
            }
            // Spec: bits past the requested range are zero; do not trust the server.
            let pages = len.div_ceil(page_size);
            let tail = pages % 64;
            if tail != 0 && out.len() > first {
                if let Some(last) = out.last_mut() {
                    *last &= (1u64 << tail) - 1;
                }
            }
            match iova.checked_add(len) {
                Some(n) if n <= end => iova = n,
                _ => break,
            }
        }
        Ok(out)
    }
}
