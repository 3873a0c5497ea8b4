//! nestio's vfio-user extension for a nested IOMMU: the guest's SMMUv3 stage 1 walked
//! by the device process itself (`docs/vfio-user-nested-iommu.md` is the spec).
//!
//! # Wire
//!
//! - the `nestio_nested_iommu` VERSION capability ([`NestedIommuCap`]): proposed by a
//!   client only when its [`crate::ClientConfig::nested_iommu`] asks for it, answered
//!   by a server only when proposed (QEMU's client warns about unknown keys, so it is
//!   never sent unasked); both sides use the smaller of the two sets of values
//!   ([`NestedIommuCaps::negotiate`]);
//! - four commands in nestio's private range: [`IommuBind`] (0x1001), UNBIND (0x1002,
//!   no payload), [`IommuInvalidate`] (0x1003, raw 16-byte SMMUv3 commands, answered by
//!   an [`InvalidateReply`]) and [`IommuFault`] (0x1004, server to client, no reply).
//!   Every decoder checks argsz, the exact length, flags and reserved fields.
//!
//! # Server side ([`NestedSession`])
//!
//! The seam: what executes the commands is the server's [`NestedIommuBackend`] (one
//! [`NestedIommuBinding`] per session); [`NestedSession`] only negotiates, runs the
//! fault reporter and checks the backend's INVALIDATE answer before it goes out. The
//! default backend is [`Stage1Backend`], described below; an exporting level gives its
//! server a forwarding one (`nestio_nested::ForwardIommu`: commands to the level below,
//! its FAULT records relayed with [`FaultQueue::relay`]).
//!
//! Which devices [`Stage1Backend`] serves: the server owns a device's DMA whenever the
//! device exposes its [`nestio_device_model::DmaPort`] (every nestio device that does
//! DMA does); the capability is answered for such a device unless
//! [`crate::ServerConfig::nested_iommu`] turns it off (tests of the VMM's shadow
//! fallback do). A device without a port does its DMA outside the library and gets
//! no capability.
//!
//! BIND swaps the port's DMA space for a [`BoundSpace`]: the guest's stage 1
//! ([`Stage1Dma`]) over the port's map table (stage 2 = the client's DMA_MAPs, as the
//! spec says; a served device's port carries no other decorator). A new BIND replaces
//! the binding (fresh caches); UNBIND and the end of the session send the DMA straight
//! to the table again, unless another session sharing the device (`serve_stream`) has
//! bound it since. Every swap waits
//! for the DMAs still running on the replaced binding ([`Stage1Dma::quiesce`]) before
//! the reply goes out, and so does INVALIDATE, so a guest's CMD_SYNC completes only
//! after every DMA that used an invalidated translation.
//!
//! Faults: a DMA that faults fails with the map table's error for an unmapped address
//! (nothing is touched: [`Stage1Dma`] translates every page first), and the events its
//! walk recorded (the guest's CD.R decides) are drained into a [`FaultQueue`] of at
//! most [`FAULT_BUFFER`] records. A reporter thread per session sends them as FAULT
//! messages on the twin socket when there is one (else the main socket), where DMA_READ
//! and DMA_WRITE go too. A record that finds the queue full is dropped, and the next
//! one sent carries `LOST_EVENTS`; `sequence` counts every record the walk produced,
//! dropped ones included, so a gap says how many were lost.
//!
//! # Client side
//!
//! [`FaultInbox`] receives FAULT messages on whichever socket the client reads and
//! hands them to the VMM through a bounded `std::sync::mpsc` channel
//! ([`crate::Client::take_iommu_faults`]); a full channel drops and flags the next
//! record `lost_before`, so a hostile server cannot grow the client's memory.

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use nestio_dma::{DmaError, DmaSpace};
use nestio_iommu::smmuv3::stage1_dma::{self, Stage1Dma, Stage1Error};

use crate::endpoint::Endpoint;
use crate::proto::{Command, Cursor, ProtoError, Result as ProtoResult};
use crate::socket::Message;

/// The VERSION capability key.
pub const CAP_KEY: &str = "nestio_nested_iommu";
/// This document's version.
pub const SPEC_VERSION: u32 = 1;
/// Most commands in one INVALIDATE.
pub const MAX_COMMANDS: usize = 256;
/// Most fault records a server buffers before it drops with `LOST_EVENTS`.
pub const FAULT_BUFFER: usize = 64;
/// FAULT flag: records were dropped before this one.
pub const FAULT_LOST_EVENTS: u32 = 1;
/// INVALIDATE reply `cerror`: the command at index `done` is illegal.
pub const CERROR_ILL: u32 = 1;
/// Fault records a client holds for its VMM before it drops (and flags) new ones.
pub const CLIENT_FAULT_QUEUE: usize = 1024;
/// Stage-1 granules the server's walker implements.
pub const GRANULES: [u64; 3] = [4096, 16384, 65536];

/// Is `cmd` one of this extension's command numbers?
pub fn is_extension(cmd: u16) -> bool {
    (0x1000..=0x10ff).contains(&cmd)
}

/// The SMMUv3 parameters of the capability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NestedIommuCaps {
    /// The spec's version (1).
    pub version: u32,
    /// Largest stage-1 input size in bits the server walks.
    pub ias: u32,
    /// Largest stage-1 output (IPA) size in bits.
    pub oas: u32,
    /// Stage-1 granules walked, in bytes.
    pub granules: Vec<u64>,
    /// Substream ID bits (0: none).
    pub ssid_bits: u32,
}

impl Default for NestedIommuCaps {
    /// What nestio's walker implements (the SMMUv3 model's IDRs): 48-bit input and
    /// output, 4/16/64 KiB granules, 8 substream bits.
    fn default() -> Self {
        NestedIommuCaps {
            version: SPEC_VERSION,
            ias: 48,
            oas: nestio_iommu::smmuv3::regs::OAS_BITS,
            granules: GRANULES.to_vec(),
            ssid_bits: nestio_iommu::smmuv3::regs::SSID_BITS,
        }
    }
}

impl NestedIommuCaps {
    /// The values both sides can use (the smaller of each, the common granules), or
    /// `None` when nothing usable is left: version 0, a size below 32 bits, no common
    /// granule. Values above what anyone implements are capped (sizes at 52 bits,
    /// substreams at 20 bits), the version at ours.
    pub fn negotiate(&self, peer: &NestedIommuCaps) -> Option<NestedIommuCaps> {
        let version = self.version.min(peer.version).min(SPEC_VERSION);
        let ias = self.ias.min(peer.ias).min(52);
        let oas = self.oas.min(peer.oas).min(52);
        let mut granules: Vec<u64> = GRANULES
            .iter()
            .copied()
            .filter(|g| self.granules.contains(g) && peer.granules.contains(g))
            .collect();
        granules.dedup();
        if version == 0 || ias < 32 || oas < 32 || granules.is_empty() {
            return None;
        }
        Some(NestedIommuCaps {
            version,
            ias,
            oas,
            granules,
            ssid_bits: self.ssid_bits.min(peer.ssid_bits).min(20),
        })
    }
}

/// The capability object: `{"smmuv3": {...}}` (other IOMMU kinds may follow).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NestedIommuCap {
    /// SMMUv3 nesting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smmuv3: Option<NestedIommuCaps>,
}

impl NestedIommuCap {
    /// The capability for SMMUv3 parameters `caps`.
    pub fn smmuv3(caps: NestedIommuCaps) -> NestedIommuCap {
        NestedIommuCap { smmuv3: Some(caps) }
    }
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_ne_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_ne_bytes());
}

fn check_argsz(what: &'static str, argsz: u32, expected: usize) -> ProtoResult<()> {
    if argsz as usize != expected {
        return Err(ProtoError::Argsz {
            what,
            argsz,
            expected,
        });
    }
    Ok(())
}

fn check_reserved(what: &'static str, v: u32) -> ProtoResult<()> {
    if v != 0 {
        return Err(ProtoError::Invalid {
            what,
            detail: format!("reserved field is {v:#x}, must be 0"),
        });
    }
    Ok(())
}

/// `VFIO_USER_NESTIO_IOMMU_BIND` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IommuBind {
    /// The guest's stream ID for the device (put in fault records).
    pub vsid: u32,
    /// Dword 0 of the guest's STE.
    pub ste0: u64,
    /// Dword 1 of the guest's STE (only S1DSS is honoured).
    pub ste1: u64,
}

impl IommuBind {
    /// Payload size.
    pub const SIZE: usize = 32;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, Self::SIZE as u32);
        put_u32(b, 0);
        put_u32(b, self.vsid);
        put_u32(b, 0);
        put_u64(b, self.ste0);
        put_u64(b, self.ste1);
    }
    /// Parse (argsz 32, flags 0, reserved 0, exact length).
    pub fn decode(p: &[u8]) -> ProtoResult<IommuBind> {
        const WHAT: &str = "NESTIO_IOMMU_BIND";
        let mut c = Cursor::new(p, WHAT);
        let argsz = c.u32()?;
        let flags = c.u32()?;
        let vsid = c.u32()?;
        let reserved = c.u32()?;
        let b = IommuBind {
            vsid,
            ste0: c.u64()?,
            ste1: c.u64()?,
        };
        c.finish()?;
        check_argsz(WHAT, argsz, Self::SIZE)?;
        if flags != 0 {
            return Err(ProtoError::UnknownFlags { what: WHAT, flags });
        }
        check_reserved(WHAT, reserved)?;
        Ok(b)
    }
}

/// `VFIO_USER_NESTIO_IOMMU_INVALIDATE` request: 1..=256 raw SMMUv3 commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInvalidate {
    /// The commands, in order, as the guest wrote them (little-endian dwords).
    pub commands: Vec<[u8; 16]>,
}

impl IommuInvalidate {
    /// Size of the fixed part (argsz, count).
    pub const HEAD: usize = 8;
    /// Append the wire form (the caller keeps `commands` within 1..=256).
    pub fn encode_into(commands: &[[u8; 16]], b: &mut Vec<u8>) {
        put_u32(b, (Self::HEAD + 16 * commands.len()) as u32);
        put_u32(b, commands.len() as u32);
        for c in commands {
            b.extend_from_slice(c);
        }
    }
    /// Parse (count 1..=256, argsz = 8 + 16 * count, exact length).
    pub fn decode(p: &[u8]) -> ProtoResult<IommuInvalidate> {
        const WHAT: &str = "NESTIO_IOMMU_INVALIDATE";
        let mut c = Cursor::new(p, WHAT);
        let argsz = c.u32()?;
        let count = c.u32()? as usize;
        if !(1..=MAX_COMMANDS).contains(&count) {
            return Err(ProtoError::Invalid {
                what: WHAT,
                detail: format!("count {count} is outside 1..={MAX_COMMANDS}"),
            });
        }
        let body = c.bytes(16 * count)?;
        c.finish()?;
        check_argsz(WHAT, argsz, Self::HEAD + 16 * count)?;
        let commands = body
            .chunks_exact(16)
            .map(|ch| {
                let mut a = [0u8; 16];
                a.copy_from_slice(ch);
                a
            })
            .collect();
        Ok(IommuInvalidate { commands })
    }
}

/// The reply to INVALIDATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InvalidateReply {
    /// Commands executed.
    pub done: u32,
    /// 0, or [`CERROR_ILL`] for the command at index `done`.
    pub cerror: u32,
}

impl InvalidateReply {
    /// Payload size.
    pub const SIZE: usize = 16;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, Self::SIZE as u32);
        put_u32(b, self.done);
        put_u32(b, self.cerror);
        put_u32(b, 0);
    }
    /// Parse (argsz 16, cerror 0 or 1, reserved 0, done ≤ 256).
    pub fn decode(p: &[u8]) -> ProtoResult<InvalidateReply> {
        const WHAT: &str = "NESTIO_IOMMU_INVALIDATE reply";
        let mut c = Cursor::new(p, WHAT);
        let argsz = c.u32()?;
        let r = InvalidateReply {
            done: c.u32()?,
            cerror: c.u32()?,
        };
        let reserved = c.u32()?;
        c.finish()?;
        check_argsz(WHAT, argsz, Self::SIZE)?;
        check_reserved(WHAT, reserved)?;
        if r.cerror > CERROR_ILL || r.done as usize > MAX_COMMANDS {
            return Err(ProtoError::Invalid {
                what: WHAT,
                detail: format!("done {} / cerror {} out of range", r.done, r.cerror),
            });
        }
        Ok(r)
    }
}

/// `VFIO_USER_NESTIO_IOMMU_FAULT` (server to client): one SMMUv3 event record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IommuFault {
    /// Records were dropped before this one (`LOST_EVENTS`).
    pub lost_before: bool,
    /// Counts every record the server's walk produced (wraps).
    pub sequence: u32,
    /// The 32-byte event record; StreamID = the bound vsid.
    pub record: [u8; 32],
}

impl IommuFault {
    /// Payload size.
    pub const SIZE: usize = 48;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, Self::SIZE as u32);
        put_u32(
            b,
            if self.lost_before {
                FAULT_LOST_EVENTS
            } else {
                0
            },
        );
        put_u32(b, self.sequence);
        put_u32(b, 0);
        b.extend_from_slice(&self.record);
    }
    /// Parse (argsz 48, only `LOST_EVENTS` in flags, reserved 0, exact length).
    pub fn decode(p: &[u8]) -> ProtoResult<IommuFault> {
        const WHAT: &str = "NESTIO_IOMMU_FAULT";
        let mut c = Cursor::new(p, WHAT);
        let argsz = c.u32()?;
        let flags = c.u32()?;
        let sequence = c.u32()?;
        let reserved = c.u32()?;
        let mut record = [0u8; 32];
        record.copy_from_slice(c.bytes(32)?);
        c.finish()?;
        check_argsz(WHAT, argsz, Self::SIZE)?;
        if flags & !FAULT_LOST_EVENTS != 0 {
            return Err(ProtoError::UnknownFlags {
                what: WHAT,
                flags: flags & !FAULT_LOST_EVENTS,
            });
        }
        check_reserved(WHAT, reserved)?;
        Ok(IommuFault {
            lost_before: flags & FAULT_LOST_EVENTS != 0,
            sequence,
            record,
        })
    }
}

/// Errors of the server side.
#[derive(Debug, thiserror::Error)]
pub enum NestedIommuError {
    /// The capability was not negotiated on this connection.
    #[error("the nested IOMMU extension was not negotiated on this connection (propose `nestio_nested_iommu` in VERSION)")]
    NotNegotiated,
    /// The served device has no DMA port the server can translate.
    #[error("the served device does its DMA outside the library: it cannot walk a stage 1")]
    NoDmaPort,
    /// The guest's STE cannot be bound.
    #[error("cannot bind the guest's STE: {0}")]
    Bind(#[from] Stage1Error),
    /// A forwarding backend's level below refused or failed the command (its errno is
    /// the reply's).
    #[error("the level below refused {what}: {source}")]
    Upstream {
        /// The command forwarded.
        what: &'static str,
        /// The level below's error.
        #[source]
        source: nestio_device_model::DeviceError,
    },
    /// The backend's INVALIDATE answer does not fit the request (a hostile or broken
    /// level below).
    #[error("inconsistent INVALIDATE answer: done {done} cerror {cerror} for {count} commands; the level below is broken")]
    BadReply {
        /// Commands said done.
        done: u32,
        /// The error code.
        cerror: u32,
        /// Commands sent.
        count: u32,
    },
}

impl NestedIommuError {
    /// The errno of the reply.
    pub fn errno(&self) -> i32 {
        match self {
            NestedIommuError::NotNegotiated | NestedIommuError::NoDmaPort => libc::ENOTSUP,
            NestedIommuError::Bind(_) => libc::EINVAL,
            NestedIommuError::Upstream { source, .. } => source.errno(),
            NestedIommuError::BadReply { .. } => libc::EIO,
        }
    }
}

#[derive(Default)]
struct QueueState {
    records: VecDeque<IommuFault>,
    next_sequence: u32,
    lost: bool,
    closed: bool,
}

/// The server's unsent fault records: at most [`FAULT_BUFFER`]; see the module docs.
#[derive(Default)]
pub struct FaultQueue {
    state: Mutex<QueueState>,
    cond: Condvar,
}

impl FaultQueue {
    /// Queue one record produced by the walk (`lost` more were dropped before it by
    /// the walker's own queue).
    pub fn push(&self, record: [u8; 32], lost: u64) {
        let mut st = self.state.lock();
        if st.closed {
            return;
        }
        // The walker's own drops count in the sequence too.
        st.next_sequence = st.next_sequence.wrapping_add(lost as u32);
        st.lost |= lost > 0;
        let sequence = st.next_sequence;
        st.next_sequence = sequence.wrapping_add(1);
        if st.records.len() >= FAULT_BUFFER {
            st.lost = true;
            tracing::debug!(sequence, "nested IOMMU fault buffer full; record dropped");
            return;
        }
        let lost_before = std::mem::take(&mut st.lost);
        st.records.push_back(IommuFault {
            lost_before,
            sequence,
            record,
        });
        drop(st);
        self.cond.notify_one();
    }

    /// Queue a record another level's server produced, unchanged (its `sequence`, so
    /// a gap still counts what was lost below; `lost_before` kept, and set when this
    /// queue dropped one since the last record it sent).
    pub fn relay(&self, f: IommuFault) {
        let mut st = self.state.lock();
        if st.closed {
            return;
        }
        st.next_sequence = f.sequence.wrapping_add(1);
        if st.records.len() >= FAULT_BUFFER {
            st.lost = true;
            tracing::debug!(
                sequence = f.sequence,
                "nested IOMMU fault buffer full; relayed record dropped"
            );
            return;
        }
        let lost_before = std::mem::take(&mut st.lost) || f.lost_before;
        st.records.push_back(IommuFault { lost_before, ..f });
        drop(st);
        self.cond.notify_one();
    }

    /// Wait for records (all of them, in order); `None` once closed.
    fn wait(&self) -> Option<Vec<IommuFault>> {
        let mut st = self.state.lock();
        loop {
            if st.closed {
                return None;
            }
            if !st.records.is_empty() {
                return Some(st.records.drain(..).collect());
            }
            self.cond.wait(&mut st);
        }
    }

    fn close(&self) {
        self.state.lock().closed = true;
        self.cond.notify_all();
    }

    /// Records waiting to be sent.
    pub fn len(&self) -> usize {
        self.state.lock().records.len()
    }

    /// No record waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The device's DMA space while bound: the guest's stage 1 over the space the port
/// had before, forwarding the walk's events to the session's [`FaultQueue`].
pub struct BoundSpace {
    stage1: Stage1Dma,
    faults: Arc<FaultQueue>,
}

impl BoundSpace {
    fn report(&self) {
        let (events, lost) = self.stage1.drain_events();
        let mut lost = lost;
        for e in events {
            self.faults.push(e.encode(), std::mem::take(&mut lost));
        }
        if lost > 0 {
            tracing::warn!(lost, "nested IOMMU: the walker's event queue overflowed");
        }
    }

    /// The binding's stage 1.
    pub fn stage1(&self) -> &Stage1Dma {
        &self.stage1
    }
}

impl DmaSpace for BoundSpace {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let r = self.stage1.read(iova, buf);
        if r.is_err() {
            self.report();
        }
        r
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let r = self.stage1.write(iova, data);
        if r.is_err() {
            self.report();
        }
        r
    }
}

/// What a served device puts behind the extension's commands: the *nested IOMMU
/// backend* hook of the server. The server asks it what it offers in VERSION and opens
/// one [`NestedIommuBinding`] per session that negotiated the capability.
///
/// Two implementations exist: [`Stage1Backend`] (the default for a device with a
/// `DmaPort`: the device walks the guest's stage 1 itself, in this process) and the
/// level-1 exporter's forwarding backend (`nestio_nested::ForwardIommu`: every command
/// goes on to the level below, whose device walks, and its FAULT records come back).
pub trait NestedIommuBackend: Send + Sync {
    /// The values this backend offers; `None`: the capability is not answered.
    fn offer(&self) -> Option<NestedIommuCaps>;
    /// One session's state; its fault records go to `faults` (the server's reporter
    /// thread sends them as FAULT messages).
    fn open(&self, faults: Arc<FaultQueue>) -> Box<dyn NestedIommuBinding>;
}

/// One session's binding, opened by a [`NestedIommuBackend`]. Each call returns only
/// once the spec's ordering holds (every DMA on a replaced binding or an invalidated
/// translation has completed).
pub trait NestedIommuBinding: Send {
    /// BIND: replace the binding with the guest's STE.
    fn bind(&mut self, b: IommuBind) -> Result<(), NestedIommuError>;
    /// UNBIND: the device's DMA addresses are IPAs again.
    fn unbind(&mut self) -> Result<(), NestedIommuError>;
    /// INVALIDATE: the commands in order, stopping at the first illegal one.
    fn invalidate(&mut self, cmds: &IommuInvalidate) -> Result<InvalidateReply, NestedIommuError>;
    /// The session is over: unbind (the device's next owner starts with IPAs).
    fn end(&mut self);
}

/// The default backend: the served device's DMA goes through the guest's stage 1
/// ([`Stage1Dma`]) over its `DmaPort`'s map table, in this process.
pub struct Stage1Backend {
    device: Arc<dyn nestio_device_model::VfioDevice>,
}

impl Stage1Backend {
    /// The backend for `device`; it offers the capability only when the device
    /// exposes its `DmaPort`.
    pub fn new(device: Arc<dyn nestio_device_model::VfioDevice>) -> Stage1Backend {
        Stage1Backend { device }
    }
}

impl NestedIommuBackend for Stage1Backend {
    fn offer(&self) -> Option<NestedIommuCaps> {
        self.device.dma_port().map(|_| NestedIommuCaps::default())
    }
    fn open(&self, faults: Arc<FaultQueue>) -> Box<dyn NestedIommuBinding> {
        Box::new(Stage1Binding {
            device: self.device.clone(),
            bound: None,
            faults,
        })
    }
}

/// One session's binding of a [`Stage1Backend`].
struct Stage1Binding {
    device: Arc<dyn nestio_device_model::VfioDevice>,
    bound: Option<Arc<BoundSpace>>,
    faults: Arc<FaultQueue>,
}

impl Stage1Binding {
    fn port(&self) -> Result<&nestio_device_model::DmaPort, NestedIommuError> {
        self.device.dma_port().ok_or(NestedIommuError::NoDmaPort)
    }

    /// Send the device's DMA straight to its map table again — only if it still goes
    /// through this session's binding (sessions side by side on one device,
    /// `Server::serve_stream`, must not undo each other's) — and retire the binding.
    fn restore(&mut self) {
        let bound = self.bound.take();
        if let (Some(ours), Some(port)) = (&bound, self.device.dma_port()) {
            let ours = Arc::as_ptr(ours) as *const ();
            let table: Arc<dyn DmaSpace> = port.shared_table();
            port.stack(|cur| {
                if Arc::as_ptr(&cur) as *const () == ours {
                    table
                } else {
                    cur
                }
            });
        }
        retire(bound);
    }
}

/// Wait for the DMAs still running on a replaced binding, then report its faults.
fn retire(old: Option<Arc<BoundSpace>>) {
    if let Some(old) = old {
        old.stage1.quiesce();
        old.report();
    }
}

impl NestedIommuBinding for Stage1Binding {
    fn bind(&mut self, b: IommuBind) -> Result<(), NestedIommuError> {
        let port = self.port()?;
        let stage2: Arc<dyn DmaSpace> = port.shared_table();
        let stage1 = Stage1Dma::bind(stage2, b.vsid, [b.ste0, b.ste1])?;
        let bound = Arc::new(BoundSpace {
            stage1,
            faults: self.faults.clone(),
        });
        port.set_space(bound.clone());
        let old = self.bound.replace(bound);
        retire(old);
        tracing::info!(
            vsid = b.vsid,
            ste0 = format_args!("{:#x}", b.ste0),
            "nested IOMMU: guest stage 1 bound"
        );
        Ok(())
    }

    fn unbind(&mut self) -> Result<(), NestedIommuError> {
        self.port()?;
        self.restore();
        Ok(())
    }

    fn invalidate(&mut self, cmds: &IommuInvalidate) -> Result<InvalidateReply, NestedIommuError> {
        let mut reply = InvalidateReply::default();
        for c in &cmds.commands {
            let mut d = [0u64; 2];
            for (i, w) in d.iter_mut().enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(&c[i * 8..i * 8 + 8]);
                *w = u64::from_le_bytes(b);
            }
            let r = match &self.bound {
                Some(b) => b.stage1.command(d),
                // Nothing cached while unbound: only legality is checked, as the
                // model would (opcode forwardable, operands legal).
                None if !stage1_dma::forwardable(d[0] as u8) => {
                    Err(Stage1Error::NotForwardable(d[0] as u8))
                }
                None => nestio_iommu::smmuv3::cmdq::Command::decode(&d)
                    .map(|_| ())
                    .map_err(|_| Stage1Error::Illegal(CERROR_ILL)),
            };
            if let Err(e) = r {
                tracing::debug!(index = reply.done, error = %e, "nested IOMMU: command refused");
                reply.cerror = CERROR_ILL;
                break;
            }
            reply.done += 1;
        }
        if let Some(b) = &self.bound {
            b.stage1.quiesce();
        }
        Ok(reply)
    }

    fn end(&mut self) {
        self.restore();
    }
}

/// One session's nested-IOMMU state (server side): the negotiated values, the
/// backend's binding for this session, its fault queue and reporter. See the module
/// documentation.
#[derive(Default)]
pub struct NestedSession {
    /// The negotiated values, when the capability was agreed on.
    caps: Option<NestedIommuCaps>,
    binding: Option<Box<dyn NestedIommuBinding>>,
    faults: Arc<FaultQueue>,
    reporter: Option<JoinHandle<()>>,
}

impl NestedSession {
    /// The server's answer to a client's proposal: the backend's values when the
    /// client proposed usable ones, the server allows it and the backend offers it;
    /// else nothing (and the key stays out of the reply).
    pub fn negotiate(
        &mut self,
        enabled: bool,
        backend: Option<&dyn NestedIommuBackend>,
        proposed: Option<&NestedIommuCap>,
    ) -> Option<NestedIommuCap> {
        let theirs = proposed?.smmuv3.as_ref()?;
        if !enabled {
            return None;
        }
        let backend = backend?;
        let ours = backend.offer()?;
        self.caps = Some(ours.negotiate(theirs)?);
        self.binding = Some(backend.open(self.faults.clone()));
        Some(NestedIommuCap::smmuv3(ours))
    }

    /// Was the capability agreed on?
    pub fn negotiated(&self) -> bool {
        self.caps.is_some()
    }

    fn binding(&mut self) -> Result<&mut Box<dyn NestedIommuBinding>, NestedIommuError> {
        self.binding.as_mut().ok_or(NestedIommuError::NotNegotiated)
    }

    /// BIND: replace the binding with the guest's STE; `reporter_ep` is where FAULT
    /// messages go (the twin socket when there is one).
    pub fn bind(
        &mut self,
        b: IommuBind,
        reporter_ep: &Arc<Endpoint>,
    ) -> Result<(), NestedIommuError> {
        self.binding()?;
        self.start_reporter(reporter_ep);
        self.binding()?.bind(b)
    }

    /// UNBIND: the device's DMA addresses are IPAs again.
    pub fn unbind(&mut self) -> Result<(), NestedIommuError> {
        self.binding()?.unbind()
    }

    /// INVALIDATE: forward the commands in order, stop at the first illegal one, then
    /// wait for every DMA that may have used an invalidated translation.
    pub fn invalidate(
        &mut self,
        cmds: &IommuInvalidate,
    ) -> Result<InvalidateReply, NestedIommuError> {
        let r = self.binding()?.invalidate(cmds)?;
        let n = cmds.commands.len() as u32;
        // Whatever the backend (a forwarding one relays another process's answer):
        // only a consistent reply goes out.
        if r.done > n || r.cerror > CERROR_ILL || (r.cerror == 0) != (r.done == n) {
            return Err(NestedIommuError::BadReply {
                done: r.done,
                cerror: r.cerror,
                count: n,
            });
        }
        Ok(r)
    }

    fn start_reporter(&mut self, ep: &Arc<Endpoint>) {
        if self.reporter.is_some() {
            return;
        }
        let faults = self.faults.clone();
        let ep: Weak<Endpoint> = Arc::downgrade(ep);
        let spawned = std::thread::Builder::new()
            .name("vfio-user-faults".into())
            .spawn(move || report_loop(&faults, &ep));
        match spawned {
            Ok(h) => self.reporter = Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the nested IOMMU fault reporter; faults will not be reported")
            }
        }
    }

    /// The session is over: the backend unbinds, the reporter stops.
    pub fn end(&mut self) {
        if let Some(mut b) = self.binding.take() {
            b.end();
        }
        self.faults.close();
        if let Some(h) = self.reporter.take() {
            let _ = h.join();
        }
    }

    /// The session's fault queue (tests look at it).
    pub fn faults(&self) -> &Arc<FaultQueue> {
        &self.faults
    }
}

/// Send queued records as FAULT messages until the queue closes or the socket fails.
fn report_loop(faults: &FaultQueue, ep: &Weak<Endpoint>) {
    let mut b = Vec::with_capacity(IommuFault::SIZE);
    while let Some(records) = faults.wait() {
        let Some(ep) = ep.upgrade() else { return };
        for r in records {
            b.clear();
            r.encode_into(&mut b);
            if let Err(e) = ep.post(Command::NestioIommuFault, &b, &[]) {
                tracing::debug!(error = %e, "nested IOMMU fault reporter stopped");
                return;
            }
        }
    }
}

/// The client's receiving end of FAULT messages. See the module documentation.
pub struct FaultInbox {
    enabled: AtomicBool,
    lost: AtomicBool,
    tx: Mutex<Option<SyncSender<IommuFault>>>,
    rx: Mutex<Option<Receiver<IommuFault>>>,
}

impl Default for FaultInbox {
    fn default() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(CLIENT_FAULT_QUEUE);
        FaultInbox {
            enabled: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            tx: Mutex::new(Some(tx)),
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl FaultInbox {
    /// Accept FAULT messages from now on (the capability was negotiated).
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    /// The receiver, once.
    pub fn take_receiver(&self) -> Option<Receiver<IommuFault>> {
        self.rx.lock().take()
    }

    /// The channel the server's FAULTs arrive on has closed: the receiver sees the
    /// end (after the records already queued) instead of waiting for ever.
    pub fn close(&self) {
        self.tx.lock().take();
    }

    /// Handle a FAULT message from the server: checked, queued for the VMM. The reply
    /// (sent only if the server asked for one) is empty; ENOTSUP when the capability
    /// was not negotiated, EINVAL for a malformed record or attached fds.
    pub fn deliver(&self, m: &Message) -> Result<Vec<u8>, i32> {
        if !self.enabled.load(Ordering::Acquire) {
            tracing::warn!("server sent a nested IOMMU fault without the capability");
            return Err(libc::ENOTSUP);
        }
        if !m.fds.is_empty() {
            return Err(libc::EINVAL);
        }
        let mut f = IommuFault::decode(&m.payload).map_err(|e| {
            tracing::warn!(error = %e, "malformed nested IOMMU fault from the server");
            e.errno()
        })?;
        f.lost_before |= self.lost.swap(false, Ordering::AcqRel);
        let tx = self.tx.lock();
        if let Some(tx) = tx.as_ref() {
            match tx.try_send(f) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.lost.store(true, Ordering::Release);
                    tracing::debug!("nested IOMMU fault queue full; record dropped");
                }
                // Nobody listens any more: drop silently.
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_roundtrip_and_checks() {
        let b = IommuBind {
            vsid: 0x42,
            ste0: 0x1000 | 0xb,
            ste1: 1,
        };
        let mut p = Vec::new();
        b.encode_into(&mut p);
        assert_eq!(p.len(), IommuBind::SIZE);
        assert_eq!(IommuBind::decode(&p).unwrap(), b);
        for n in 0..p.len() {
            assert!(IommuBind::decode(&p[..n]).is_err(), "truncated to {n}");
        }
        let mut long = p.clone();
        long.push(0);
        assert!(IommuBind::decode(&long).is_err());
        let mut argsz = p.clone();
        argsz[0] = 33;
        assert!(matches!(
            IommuBind::decode(&argsz),
            Err(ProtoError::Argsz { .. })
        ));
        let mut flags = p.clone();
        flags[4] = 1;
        assert!(matches!(
            IommuBind::decode(&flags),
            Err(ProtoError::UnknownFlags { .. })
        ));
        let mut res = p.clone();
        res[12] = 1;
        assert!(IommuBind::decode(&res).is_err());
    }

    #[test]
    fn invalidate_count_bounds_and_argsz() {
        let cmds = vec![[7u8; 16]; 3];
        let mut p = Vec::new();
        IommuInvalidate::encode_into(&cmds, &mut p);
        assert_eq!(IommuInvalidate::decode(&p).unwrap().commands, cmds);
        let mut zero = Vec::new();
        IommuInvalidate::encode_into(&[], &mut zero);
        assert!(IommuInvalidate::decode(&zero).is_err());
        let mut big = Vec::new();
        IommuInvalidate::encode_into(&vec![[0u8; 16]; 257], &mut big);
        assert!(IommuInvalidate::decode(&big).is_err());
        let mut max = Vec::new();
        IommuInvalidate::encode_into(&vec![[0u8; 16]; 256], &mut max);
        assert_eq!(IommuInvalidate::decode(&max).unwrap().commands.len(), 256);
        let mut lie = p.clone();
        lie[0] = 0;
        assert!(IommuInvalidate::decode(&lie).is_err());
        // A count that promises more than is there.
        let mut cnt = p.clone();
        cnt[4] = 4;
        assert!(IommuInvalidate::decode(&cnt).is_err());
        assert!(IommuInvalidate::decode(&p[..p.len() - 1]).is_err());
    }

    #[test]
    fn replies_and_faults_roundtrip_and_checks() {
        let r = InvalidateReply { done: 3, cerror: 1 };
        let mut p = Vec::new();
        r.encode_into(&mut p);
        assert_eq!(InvalidateReply::decode(&p).unwrap(), r);
        let mut bad = p.clone();
        bad[8] = 2;
        assert!(InvalidateReply::decode(&bad).is_err());
        let mut res = p.clone();
        res[12] = 1;
        assert!(InvalidateReply::decode(&res).is_err());
        let f = IommuFault {
            lost_before: true,
            sequence: 9,
            record: [0x10; 32],
        };
        let mut q = Vec::new();
        f.encode_into(&mut q);
        assert_eq!(IommuFault::decode(&q).unwrap(), f);
        let mut fl = q.clone();
        fl[4] = 3;
        assert!(IommuFault::decode(&fl).is_err());
        assert!(IommuFault::decode(&q[..47]).is_err());
    }

    #[test]
    fn negotiation_takes_the_smaller_values() {
        let ours = NestedIommuCaps::default();
        let theirs = NestedIommuCaps {
            version: 7,
            ias: 40,
            oas: 44,
            granules: vec![65536, 4096, 8192],
            ssid_bits: 20,
        };
        let n = ours.negotiate(&theirs).unwrap();
        assert_eq!(
            n,
            NestedIommuCaps {
                version: 1,
                ias: 40,
                oas: 44,
                granules: vec![4096, 65536],
                ssid_bits: 8
            }
        );
        let none = NestedIommuCaps {
            granules: vec![8192],
            ..theirs.clone()
        };
        assert!(ours.negotiate(&none).is_none());
        let v0 = NestedIommuCaps {
            version: 0,
            ..theirs
        };
        assert!(ours.negotiate(&v0).is_none());
    }

    /// A backend answering INVALIDATE with a fixed reply (a forwarding backend relays
    /// another process's answer, which may be anything).
    struct Fixed {
        offer: Option<NestedIommuCaps>,
        reply: InvalidateReply,
    }
    struct FixedBinding(InvalidateReply);
    impl NestedIommuBackend for Fixed {
        fn offer(&self) -> Option<NestedIommuCaps> {
            self.offer.clone()
        }
        fn open(&self, _: Arc<FaultQueue>) -> Box<dyn NestedIommuBinding> {
            Box::new(FixedBinding(self.reply))
        }
    }
    impl NestedIommuBinding for FixedBinding {
        fn bind(&mut self, _: IommuBind) -> Result<(), NestedIommuError> {
            Ok(())
        }
        fn unbind(&mut self) -> Result<(), NestedIommuError> {
            Ok(())
        }
        fn invalidate(&mut self, _: &IommuInvalidate) -> Result<InvalidateReply, NestedIommuError> {
            Ok(self.0)
        }
        fn end(&mut self) {}
    }

    fn session_with(offer: Option<NestedIommuCaps>, reply: InvalidateReply) -> NestedSession {
        let mut s = NestedSession::default();
        let proposal = NestedIommuCap::smmuv3(NestedIommuCaps::default());
        let answer = s.negotiate(true, Some(&Fixed { offer, reply }), Some(&proposal));
        assert_eq!(answer.is_some(), s.negotiated());
        s
    }

    #[test]
    fn the_backend_decides_the_offer() {
        let r = InvalidateReply::default();
        assert!(!session_with(None, r).negotiated());
        let narrow = NestedIommuCaps {
            ias: 40,
            granules: vec![4096],
            ..NestedIommuCaps::default()
        };
        let mut s = NestedSession::default();
        let proposal = NestedIommuCap::smmuv3(NestedIommuCaps::default());
        let backend = Fixed {
            offer: Some(narrow.clone()),
            reply: r,
        };
        assert_eq!(
            s.negotiate(true, Some(&backend), Some(&proposal)),
            Some(NestedIommuCap::smmuv3(narrow))
        );
        // The server's switch still wins.
        let mut off = NestedSession::default();
        assert!(off
            .negotiate(false, Some(&backend), Some(&proposal))
            .is_none());
        assert!(!off.negotiated());
    }

    #[test]
    fn an_inconsistent_backend_reply_is_refused_with_eio() {
        let three = IommuInvalidate {
            commands: vec![[0u8; 16]; 3],
        };
        for (done, cerror, ok) in [
            (3, 0, true),
            (1, CERROR_ILL, true),
            (4, 0, false),
            (2, 0, false),
            (3, CERROR_ILL, false),
            (0, 7, false),
        ] {
            let mut s = session_with(
                Some(NestedIommuCaps::default()),
                InvalidateReply { done, cerror },
            );
            let r = s.invalidate(&three);
            assert_eq!(r.is_ok(), ok, "done {done} cerror {cerror}");
            if let Err(e) = r {
                assert_eq!(e.errno(), libc::EIO);
            }
            s.end();
        }
    }

    #[test]
    fn fault_queue_drops_past_64_and_flags_the_next_record() {
        let q = FaultQueue::default();
        for i in 0..70u8 {
            q.push([i; 32], 0);
        }
        let got = q.wait().unwrap();
        assert_eq!(got.len(), FAULT_BUFFER);
        assert!(got.iter().all(|f| !f.lost_before));
        assert_eq!(got[63].sequence, 63);
        q.push([0xaa; 32], 0);
        let next = q.wait().unwrap();
        assert_eq!(next.len(), 1);
        assert!(next[0].lost_before);
        assert_eq!(next[0].sequence, 70, "the gap says six were lost");
        q.close();
        assert!(q.wait().is_none());
    }
}
