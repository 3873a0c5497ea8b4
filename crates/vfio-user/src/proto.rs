//! The vfio-user wire format: the 16-byte header, the command numbers, and one typed
//! struct per request and reply payload.
//!
//! Design: every payload type has `encode_into(&mut Vec<u8>)` (appends, so a caller can
//! reuse one buffer per connection) and `decode(&[u8]) -> Result<_, ProtoError>`. A
//! decoder reads through a bounds-checked [`Cursor`], checks that the payload has exactly
//! the length its fields imply (no truncation, no trailing bytes), that `argsz` does not
//! lie where it describes the request itself, that no unknown flag bit is set, and that
//! offset + count never overflows. Payloads that carry bulk data borrow it from the
//! received buffer, so the hot path copies data once.
//!
//! [`Request::decode`] and [`Reply::decode`] dispatch on the command; the server and the
//! fuzz target use them. All integers are host-endian (the protocol is host-local).
//!
//! # VERSION capabilities every real peer accepts
//!
//! The spec bounds no capability, but the parsers in the field do, and a peer outside
//! them is refused at the first message (QEMU exits with `malformed max_msg_fds`). What
//! each parser accepts, read from its source (QEMU 10.2 `hw/vfio-user/proxy.c`
//! `caps_check`; Cloud Hypervisor's `vfio_user` crate 0.1.x `negotiate_version` /
//! `Capabilities`; libvfio-user `lib/tran.c` `tran_parse_version_json`, used by its
//! server and by its sample client `samples/client.c`):
//!
//! | reply field (server -> client) | QEMU 10.2 client | Cloud Hypervisor (`vfio_user` 0.1) client | libvfio-user client | nestio client |
//! |---|---|---|---|---|
//! | minor | ≤ 0 (it proposes 0) | not checked (proposes 1) | ≤ 2 | ≤ 2 |
//! | JSON | NUL-terminated, object | last byte dropped, then `{"capabilities":{..}}` required | NUL-terminated | NUL optional |
//! | `max_msg_fds` | unsigned ≤ **16** | u32 | JSON int, cast to C `int` | u32 |
//! | `max_data_xfer_size` | unsigned ≤ 64 MiB | u32 | JSON int, cast to C `int` | u32, ≠ 0 |
//! | `pgsizes` | unsigned, no bit below 4 KiB | ignored | ignored | u64, ≠ 0 |
//! | `max_dma_maps` | unsigned ≤ 65535 | ignored | ignored | u32 |
//! | `migration` | object: `pgsize` no bit below 4 KiB, `max_bitmap_size` ≤ 256 MiB | object with a u32 `pgsize` (**required**) | object, int `pgsize` | object |
//! | `write_multiple` | bool | ignored | ignored | bool |
//! | `twin_socket` | warns "spurious capabilities" | ignored | object with bool `supported`; its sample client crashes on it (passes no out-pointer) | object |
//!
//! | proposal field (client -> server) | libvfio-user server (also QEMU's `x-remote-object`) | Cloud Hypervisor (`vfio_user` 0.1) server |
//! |---|---|---|
//! | `max_msg_fds` | JSON int, 0..=1024 | u32 |
//! | `max_data_xfer_size` | JSON int, cast to C `int` | u32 |
//! | `migration.pgsize` | must equal the host page size when the device migrates | u32, required in a `migration` object |
//! | `twin_socket` | object with bool `supported` | ignored |
//!
//! So nestio's server replies with [`Capabilities::server_reply`]: `max_msg_fds` at most
//! [`portable::MAX_MSG_FDS`] (16) unless the client itself proposed more (a client that
//! accepts 64 fds per message does not refuse a server that does; nestio's own client
//! proposes 64), never more than [`portable::MAX_MSG_FDS_LIMIT`]; `max_data_xfer_size` ≤
//! 64 MiB; `max_dma_maps` ≤ 65535; `pgsizes` and `migration.pgsize` 4 KiB;
//! `max_bitmap_size` ≤ 256 MiB; `twin_socket` only when the client offered it. The
//! server still *accepts* up to its configured limits; it only advertises no more than
//! every client parses. nestio's client proposes with [`Capabilities::client_offer`]:
//! `max_msg_fds` ≤ 1024, `max_data_xfer_size` ≤ 64 MiB, no `migration` object.
//!
//! nestio's own `nestio_nested_iommu` key ([`crate::nested_iommu`]) is sent by nestio's
//! client only when asked for, and answered by its server only to a client that sent
//! it, so no other peer ever sees it (QEMU's client warns about keys it does not know).
//! Its commands (0x1001–0x1004) are in [`Command`] like the standard ones.

use serde::{Deserialize, Serialize};

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;
/// The protocol major version we speak.
pub const VERSION_MAJOR: u16 = 0;
/// The protocol minor version we speak.
pub const VERSION_MINOR: u16 = 2;
/// Default `max_data_xfer_size` (1 MiB).
pub const DEFAULT_MAX_DATA_XFER: u32 = 1 << 20;
/// Default `max_dma_maps`.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// Default `pgsizes`.
pub const DEFAULT_PGSIZES: u64 = 4096;
/// Default `max_msg_fds`.
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;

/// Header flag bits.
pub mod hdr_flags {
    /// Mask of the type field.
    pub const TYPE_MASK: u32 = 0xf;
    /// Type: command.
    pub const TYPE_COMMAND: u32 = 0;
    /// Type: reply.
    pub const TYPE_REPLY: u32 = 1;
    /// The sender wants no reply.
    pub const NO_REPLY: u32 = 1 << 4;
    /// The reply reports an error (header only, `error` = errno).
    pub const ERROR: u32 = 1 << 5;
    /// Every defined bit.
    pub const KNOWN: u32 = TYPE_MASK | NO_REPLY | ERROR;
}

/// DMA_MAP flag bits.
pub mod dma_flags {
    /// Readable by the device.
    pub const READ: u32 = 1;
    /// Writable by the device.
    pub const WRITE: u32 = 2;
    /// DMA_UNMAP: return the dirty bitmap (legacy migration; not supported).
    pub const UNMAP_GET_DIRTY_BITMAP: u32 = 1;
    /// DMA_UNMAP: remove every mapping.
    pub const UNMAP_ALL: u32 = 2;
}

/// SET_IRQS flag bits (`VFIO_IRQ_SET_*`).
pub mod irq_set_flags {
    /// No data.
    pub const DATA_NONE: u32 = 1 << 0;
    /// One bool byte per vector.
    pub const DATA_BOOL: u32 = 1 << 1;
    /// Eventfds in the ancillary data.
    pub const DATA_EVENTFD: u32 = 1 << 2;
    /// Mask.
    pub const ACTION_MASK: u32 = 1 << 3;
    /// Unmask.
    pub const ACTION_UNMASK: u32 = 1 << 4;
    /// Trigger.
    pub const ACTION_TRIGGER: u32 = 1 << 5;
    /// Data type bits.
    pub const DATA_MASK: u32 = DATA_NONE | DATA_BOOL | DATA_EVENTFD;
    /// Action bits.
    pub const ACTION_MASK_ALL: u32 = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER;
}

/// DEVICE_FEATURE flags and feature indices (`VFIO_DEVICE_FEATURE_*`).
pub mod feature {
    /// Mask of the feature index.
    pub const INDEX_MASK: u32 = 0xffff;
    /// Get the feature's data.
    pub const GET: u32 = 1 << 16;
    /// Set the feature's data.
    pub const SET: u32 = 1 << 17;
    /// Probe for support.
    pub const PROBE: u32 = 1 << 18;
    /// Migration support flags.
    pub const MIGRATION: u16 = 1;
    /// Migration device state.
    pub const MIG_DEVICE_STATE: u16 = 2;
    /// Start DMA dirty logging.
    pub const DMA_LOGGING_START: u16 = 6;
    /// Stop DMA dirty logging.
    pub const DMA_LOGGING_STOP: u16 = 7;
    /// Report the DMA dirty bitmap.
    pub const DMA_LOGGING_REPORT: u16 = 8;
}

/// Region info capability ids (`VFIO_REGION_INFO_CAP_*`).
pub const REGION_CAP_SPARSE_MMAP: u16 = 1;
/// io-fd entry type: ioeventfd.
pub const IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// io-fd entry type: ioregionfd.
pub const IO_FD_TYPE_IOREGIONFD: u32 = 1;
/// ioeventfd flag: datamatch valid (`KVM_IOEVENTFD_FLAG_DATAMATCH`).
pub const IOEVENTFD_FLAG_DATAMATCH: u32 = 1;

/// Errors decoding or encoding a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Fewer bytes than the fields need.
    #[error("{what}: truncated message: need {need} bytes, have {have}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// More bytes than the fields describe.
    #[error("{what}: {extra} unexpected trailing bytes; the sender's size field is wrong")]
    Trailing {
        /// What was being decoded.
        what: &'static str,
        /// Extra bytes.
        extra: usize,
    },
    /// `argsz` disagrees with the payload.
    #[error("{what}: argsz {argsz} does not match the payload ({expected} bytes)")]
    Argsz {
        /// What was being decoded.
        what: &'static str,
        /// argsz sent.
        argsz: u32,
        /// What it should be.
        expected: usize,
    },
    /// Unknown flag bits set.
    #[error("{what}: unknown flag bits {flags:#x} set")]
    UnknownFlags {
        /// What was being decoded.
        what: &'static str,
        /// The offending bits.
        flags: u32,
    },
    /// The header's message size is outside the allowed range.
    #[error("message size {size} is invalid (must be {min}..={max}); the stream is out of sync")]
    BadMessageSize {
        /// Size in the header.
        size: u32,
        /// Minimum.
        min: usize,
        /// Maximum.
        max: usize,
    },
    /// A field has an invalid value.
    #[error("{what}: {detail}")]
    Invalid {
        /// What was being decoded.
        what: &'static str,
        /// Explanation.
        detail: String,
    },
    /// The VERSION JSON is malformed.
    #[error("VERSION capabilities JSON is invalid: {0}")]
    Json(String),
    /// A command number this implementation does not know.
    #[error("unknown vfio-user command {0}")]
    UnknownCommand(u16),
}

impl ProtoError {
    /// The errno a reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ProtoError::UnknownCommand(_) => libc::ENOSYS,
            _ => libc::EINVAL,
        }
    }
    fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        ProtoError::Invalid {
            what,
            detail: detail.into(),
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, ProtoError>;

/// A bounds-checked reader over a payload.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`; `what` names the payload in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, pos: 0, what }
    }
    /// Take the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(ProtoError::Truncated {
                what: self.what,
                need: self.pos.saturating_add(n),
                have: self.buf.len(),
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    /// Next u16.
    pub fn u16(&mut self) -> Result<u16> {
        let b = self.bytes(2)?;
        Ok(u16::from_ne_bytes([b[0], b[1]]))
    }
    /// Next u32.
    pub fn u32(&mut self) -> Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Next u64.
    pub fn u64(&mut self) -> Result<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_ne_bytes(a))
    }
    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
    /// Fail if bytes are left.
    pub fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(ProtoError::Trailing {
                what: self.what,
                extra,
            }),
        }
    }
}

fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_ne_bytes());
}
fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_ne_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_ne_bytes());
}

fn check_flags(what: &'static str, flags: u32, known: u32) -> Result<()> {
    if flags & !known != 0 {
        return Err(ProtoError::UnknownFlags {
            what,
            flags: flags & !known,
        });
    }
    Ok(())
}

fn len_u32(what: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| ProtoError::invalid(what, format!("length {n} exceeds 4 GiB")))
}

/// Message type (header flag bits 0-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    /// A command.
    Command,
    /// A reply.
    Reply,
}

/// The 16-byte message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Message id, echoed in the reply.
    pub msg_id: u16,
    /// Command number.
    pub cmd: u16,
    /// Whole message size, header included.
    pub size: u32,
    /// [`hdr_flags`].
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}

impl Header {
    /// A command header for a payload of `payload_len` bytes.
    pub fn command(msg_id: u16, cmd: Command, payload_len: usize) -> Result<Header> {
        Ok(Header {
            msg_id,
            cmd: cmd as u16,
            size: len_u32("header", HEADER_SIZE + payload_len)?,
            flags: hdr_flags::TYPE_COMMAND,
            error: 0,
        })
    }
    /// The reply header to this command for a payload of `payload_len` bytes.
    pub fn reply(&self, payload_len: usize) -> Result<Header> {
        Ok(Header {
            msg_id: self.msg_id,
            cmd: self.cmd,
            size: len_u32("header", HEADER_SIZE + payload_len)?,
            flags: hdr_flags::TYPE_REPLY,
            error: 0,
        })
    }
    /// The error reply header to this command.
    pub fn error_reply(&self, errno: i32) -> Header {
        Header {
            msg_id: self.msg_id,
            cmd: self.cmd,
            size: HEADER_SIZE as u32,
            flags: hdr_flags::TYPE_REPLY | hdr_flags::ERROR,
            error: errno as u32,
        }
    }
    /// Wire form.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.msg_id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.cmd.to_ne_bytes());
        b[4..8].copy_from_slice(&self.size.to_ne_bytes());
        b[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        b[12..16].copy_from_slice(&self.error.to_ne_bytes());
        b
    }
    /// Parse the first 16 bytes of `b` and check the size against `max_size`. Unknown
    /// flag bits and unknown types are reported by [`Header::check_flags`], not here:
    /// the size is still trustworthy so the caller can skip the message and stay in sync.
    pub fn decode(b: &[u8], max_size: usize) -> Result<Header> {
        let mut c = Cursor::new(b, "header");
        let h = Header {
            msg_id: c.u16()?,
            cmd: c.u16()?,
            size: c.u32()?,
            flags: c.u32()?,
            error: c.u32()?,
        };
        if (h.size as usize) < HEADER_SIZE || h.size as usize > max_size {
            return Err(ProtoError::BadMessageSize {
                size: h.size,
                min: HEADER_SIZE,
                max: max_size,
            });
        }
        Ok(h)
    }
    /// Check the flag bits (type 0 or 1, no unknown bit).
    pub fn check_flags(&self) -> Result<()> {
        check_flags("header flags", self.flags, hdr_flags::KNOWN)?;
        if self.flags & hdr_flags::TYPE_MASK > hdr_flags::TYPE_REPLY {
            return Err(ProtoError::invalid(
                "header",
                format!(
                    "message type {} is neither command (0) nor reply (1)",
                    self.flags & 0xf
                ),
            ));
        }
        Ok(())
    }
    /// Command or reply.
    pub fn msg_type(&self) -> MsgType {
        if self.flags & hdr_flags::TYPE_MASK == hdr_flags::TYPE_REPLY {
            MsgType::Reply
        } else {
            MsgType::Command
        }
    }
    /// The sender wants no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & hdr_flags::NO_REPLY != 0
    }
    /// An error reply.
    pub fn is_error(&self) -> bool {
        self.flags & hdr_flags::ERROR != 0
    }
    /// Payload length.
    pub fn payload_len(&self) -> usize {
        (self.size as usize).saturating_sub(HEADER_SIZE)
    }
}

/// vfio-user command numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Version and capability negotiation.
    Version = 1,
    /// Add a DMA mapping.
    DmaMap = 2,
    /// Remove a DMA mapping.
    DmaUnmap = 3,
    /// Device info.
    DeviceGetInfo = 4,
    /// Region info.
    DeviceGetRegionInfo = 5,
    /// Region ioeventfds.
    DeviceGetRegionIoFds = 6,
    /// Irq info.
    DeviceGetIrqInfo = 7,
    /// Set irqs.
    DeviceSetIrqs = 8,
    /// Read a region.
    RegionRead = 9,
    /// Write a region.
    RegionWrite = 10,
    /// Server reads client memory.
    DmaRead = 11,
    /// Server writes client memory.
    DmaWrite = 12,
    /// Reset.
    DeviceReset = 13,
    /// Unassigned (migration v1 dirty pages, removed); always refused.
    LegacyDirtyPages = 14,
    /// Batched small writes.
    RegionWriteMulti = 15,
    /// Device features (migration v2, dirty logging).
    DeviceFeature = 16,
    /// Read migration data.
    MigDataRead = 17,
    /// Write migration data.
    MigDataWrite = 18,
    /// nestio extension: bind the guest's stage-1 STE (`crate::nested_iommu`).
    NestioIommuBind = 0x1001,
    /// nestio extension: unbind stage 1.
    NestioIommuUnbind = 0x1002,
    /// nestio extension: forward the guest's invalidation commands.
    NestioIommuInvalidate = 0x1003,
    /// nestio extension: a fault record, server to client.
    NestioIommuFault = 0x1004,
}

impl Command {
    /// From the wire number.
    pub fn from_u16(v: u16) -> Option<Command> {
        use Command::*;
        Some(match v {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            14 => LegacyDirtyPages,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            0x1001 => NestioIommuBind,
            0x1002 => NestioIommuUnbind,
            0x1003 => NestioIommuInvalidate,
            0x1004 => NestioIommuFault,
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------
// VERSION

/// `twin_socket` capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TwinSocket {
    /// The sender supports (request) / enabled (reply) twin-socket mode.
    #[serde(default)]
    pub supported: bool,
    /// Reply only: index of the twin socket in the reply's fds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_index: Option<u32>,
}

/// `nestio_posted_ring` capability: nestio's posted-write ring
/// ([`crate::posted_ring`]). Proposed only by nestio's client, answered only by nestio's
/// server; every other peer ignores the unknown key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PostedRingCap {
    /// The sender supports (request) / enabled (reply) the ring.
    #[serde(default)]
    pub supported: bool,
    /// Reply only: entries in the ring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u32>,
    /// Reply only: index of the ring memfd in the reply's fds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd_index: Option<u32>,
    /// Reply only: index of the kick eventfd in the reply's fds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kick_fd_index: Option<u32>,
}

/// The legacy `migration` capability (sent for compatibility).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyMigration {
    /// Dirty page size.
    #[serde(default = "default_pgsizes")]
    pub pgsize: u64,
    /// Largest dirty bitmap.
    #[serde(default)]
    pub max_bitmap_size: u64,
}

fn default_max_msg_fds() -> u32 {
    DEFAULT_MAX_MSG_FDS
}
fn default_max_xfer() -> u32 {
    DEFAULT_MAX_DATA_XFER
}
fn default_max_dma_maps() -> u32 {
    DEFAULT_MAX_DMA_MAPS
}
fn default_pgsizes() -> u64 {
    DEFAULT_PGSIZES
}

/// VERSION capabilities. Unknown keys are ignored; a known key of the wrong type is an
/// error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Most fds the sender accepts in one message.
    #[serde(default = "default_max_msg_fds")]
    pub max_msg_fds: u32,
    /// Largest data count of one read/write message the sender accepts.
    #[serde(default = "default_max_xfer")]
    pub max_data_xfer_size: u32,
    /// Most DMA mappings.
    #[serde(default = "default_max_dma_maps")]
    pub max_dma_maps: u32,
    /// Supported DMA page sizes, or'ed.
    #[serde(default = "default_pgsizes")]
    pub pgsizes: u64,
    /// Twin socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_socket: Option<TwinSocket>,
    /// REGION_WRITE_MULTI supported.
    #[serde(default)]
    pub write_multiple: bool,
    /// Legacy migration capability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<LegacyMigration>,
    /// nestio's nested-IOMMU extension (`crate::nested_iommu`): sent by a client that
    /// asks for it, answered only to such a client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nestio_nested_iommu: Option<crate::nested_iommu::NestedIommuCap>,
    /// nestio's posted-write ring (an extension; see [`PostedRingCap`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nestio_posted_ring: Option<PostedRingCap>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            pgsizes: DEFAULT_PGSIZES,
            twin_socket: None,
            write_multiple: false,
            migration: None,
            nestio_nested_iommu: None,
            nestio_posted_ring: None,
        }
    }
}

impl Capabilities {
    /// Is twin-socket mode offered / enabled?
    pub fn twin_supported(&self) -> bool {
        self.twin_socket.is_some_and(|t| t.supported)
    }
}

/// The capability bounds that every client and server in the field accepts (see the
/// module documentation's table).
pub mod portable {
    /// QEMU's client refuses a server `max_msg_fds` above 16 (`VFIO_USER_MAX_MAX_FDS`).
    pub const MAX_MSG_FDS: u32 = 16;
    /// libvfio-user's server refuses a client `max_msg_fds` above 1024; no peer needs
    /// more, so no side of nestio advertises more even when asked.
    pub const MAX_MSG_FDS_LIMIT: u32 = 1024;
    /// QEMU's client refuses a `max_data_xfer_size` above 64 MiB; libvfio-user reads it
    /// into a C `int`.
    pub const MAX_DATA_XFER: u32 = 64 << 20;
    /// QEMU's client refuses a `max_dma_maps` above 65535 (the kernel's
    /// `dma_entry_limit`).
    pub const MAX_DMA_MAPS: u32 = 65535;
    /// QEMU's client refuses a page size with a bit below 4 KiB; libvfio-user's server
    /// wants exactly the host page size for migration.
    pub const PGSIZE: u64 = 4096;
    /// QEMU's client refuses a `migration.max_bitmap_size` above 256 MiB.
    pub const MAX_BITMAP: u64 = 256 << 20;
}

/// The limits a server is configured with, before they are fitted to a client by
/// [`Capabilities::server_reply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOffer {
    /// Most fds the server accepts in one message.
    pub max_msg_fds: u32,
    /// Largest data count of one message the server accepts.
    pub max_data_xfer_size: u32,
    /// Most DMA mappings.
    pub max_dma_maps: u32,
    /// REGION_WRITE_MULTI accepted.
    pub write_multiple: bool,
}

impl Capabilities {
    /// The capabilities of a server's VERSION reply to a client that proposed `client`:
    /// the server's limits, lowered into the bounds every client parser accepts (module
    /// documentation). `max_msg_fds` goes above 16 only when the client proposed more
    /// (it then accepts such a value), and never above 1024. `twin_socket` is left
    /// unset: the server adds it when it creates one for a client that offered it.
    pub fn server_reply(offer: &ServerOffer, client: &Capabilities) -> Capabilities {
        let fds_bound = client
            .max_msg_fds
            .clamp(portable::MAX_MSG_FDS, portable::MAX_MSG_FDS_LIMIT);
        let max_data_xfer_size = offer.max_data_xfer_size.min(portable::MAX_DATA_XFER);
        Capabilities {
            max_msg_fds: offer.max_msg_fds.min(fds_bound),
            max_data_xfer_size,
            max_dma_maps: offer.max_dma_maps.min(portable::MAX_DMA_MAPS),
            pgsizes: portable::PGSIZE,
            twin_socket: None,
            write_multiple: offer.write_multiple && client.write_multiple,
            migration: Some(LegacyMigration {
                pgsize: portable::PGSIZE,
                max_bitmap_size: u64::from(max_data_xfer_size).min(portable::MAX_BITMAP),
            }),
            nestio_nested_iommu: None,
            nestio_posted_ring: None,
        }
    }

    /// The capabilities of a client's VERSION proposal: what it accepts, lowered into
    /// the bounds every server parser accepts (module documentation). Proposing less
    /// than the client accepts is always safe: the server only sends less.
    pub fn client_offer(
        max_msg_fds: u32,
        max_data_xfer_size: u32,
        twin_socket: bool,
        write_multiple: bool,
    ) -> Capabilities {
        Capabilities {
            max_msg_fds: max_msg_fds.min(portable::MAX_MSG_FDS_LIMIT),
            max_data_xfer_size: max_data_xfer_size.clamp(1, portable::MAX_DATA_XFER),
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            pgsizes: portable::PGSIZE,
            twin_socket: twin_socket.then_some(TwinSocket {
                supported: true,
                fd_index: None,
            }),
            write_multiple,
            migration: None,
            nestio_nested_iommu: None,
            nestio_posted_ring: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct VersionJson {
    #[serde(default)]
    capabilities: Capabilities,
}

/// VERSION request and reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Major.
    pub major: u16,
    /// Minor.
    pub minor: u16,
    /// Capabilities.
    pub caps: Capabilities,
}

impl Version {
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u16(b, self.major);
        put_u16(b, self.minor);
        let json = serde_json::to_vec(&VersionJson {
            capabilities: self.caps.clone(),
        })
        .unwrap_or_default();
        b.extend_from_slice(&json);
        b.push(0);
    }
    /// Parse.
    pub fn decode(p: &[u8]) -> Result<Version> {
        let mut c = Cursor::new(p, "VERSION");
        let major = c.u16()?;
        let minor = c.u16()?;
        let mut json = c.rest();
        if let Some(stripped) = json.strip_suffix(&[0]) {
            json = stripped;
        }
        let caps = if json.is_empty() {
            Capabilities::default()
        } else {
            let v: VersionJson =
                serde_json::from_slice(json).map_err(|e| ProtoError::Json(e.to_string()))?;
            v.capabilities
        };
        if caps.max_data_xfer_size == 0 {
            return Err(ProtoError::invalid(
                "VERSION",
                "max_data_xfer_size 0 would forbid every region access",
            ));
        }
        if caps.pgsizes == 0 {
            return Err(ProtoError::invalid(
                "VERSION",
                "pgsizes 0 names no page size",
            ));
        }
        Ok(Version { major, minor, caps })
    }
}

// ---------------------------------------------------------------------------------
// DMA_MAP / DMA_UNMAP

/// DMA_MAP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMap {
    /// [`dma_flags`] READ/WRITE.
    pub flags: u32,
    /// Offset in the attached fd.
    pub offset: u64,
    /// IOVA.
    pub addr: u64,
    /// Size.
    pub size: u64,
}

impl DmaMap {
    /// Payload size.
    pub const SIZE: usize = 32;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, Self::SIZE as u32);
        put_u32(b, self.flags);
        put_u64(b, self.offset);
        put_u64(b, self.addr);
        put_u64(b, self.size);
    }
    /// Parse.
    pub fn decode(p: &[u8]) -> Result<DmaMap> {
        let mut c = Cursor::new(p, "DMA_MAP");
        let argsz = c.u32()?;
        let m = DmaMap {
            flags: c.u32()?,
            offset: c.u64()?,
            addr: c.u64()?,
            size: c.u64()?,
        };
        c.finish()?;
        if argsz as usize != Self::SIZE {
            return Err(ProtoError::Argsz {
                what: "DMA_MAP",
                argsz,
                expected: Self::SIZE,
            });
        }
        check_flags("DMA_MAP", m.flags, dma_flags::READ | dma_flags::WRITE)?;
        if m.size == 0 || m.addr.checked_add(m.size - 1).is_none() {
            return Err(ProtoError::invalid(
                "DMA_MAP",
                format!("range {:#x}+{:#x} is empty or wraps", m.addr, m.size),
            ));
        }
        if m.offset.checked_add(m.size).is_none() {
            return Err(ProtoError::invalid(
                "DMA_MAP",
                "file offset + size overflows",
            ));
        }
        Ok(m)
    }
}

/// DMA_UNMAP request (and reply: the same entry echoed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaUnmap {
    /// Request: largest reply payload; reply: its size.
    pub argsz: u32,
    /// [`dma_flags`] UNMAP_*.
    pub flags: u32,
    /// IOVA.
    pub addr: u64,
    /// Size.
    pub size: u64,
}

impl DmaUnmap {
    /// Payload size without a bitmap.
    pub const SIZE: usize = 24;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, self.argsz);
        put_u32(b, self.flags);
        put_u64(b, self.addr);
        put_u64(b, self.size);
    }
    /// Parse a request. With GET_DIRTY_BITMAP a 16-byte bitmap descriptor follows (it is
    /// accepted here so the caller can refuse the flag with ENOTSUP).
    pub fn decode(p: &[u8]) -> Result<DmaUnmap> {
        let mut c = Cursor::new(p, "DMA_UNMAP");
        let u = DmaUnmap {
            argsz: c.u32()?,
            flags: c.u32()?,
            addr: c.u64()?,
            size: c.u64()?,
        };
        check_flags(
            "DMA_UNMAP",
            u.flags,
            dma_flags::UNMAP_ALL | dma_flags::UNMAP_GET_DIRTY_BITMAP,
        )?;
        if u.flags & dma_flags::UNMAP_GET_DIRTY_BITMAP != 0 {
            c.bytes(16)?;
            c.rest();
        }
        c.finish()?;
        // argsz is the largest reply payload accepted; the reply echoes the 24-byte entry.
        if (u.argsz as usize) < Self::SIZE {
            return Err(ProtoError::Argsz {
                what: "DMA_UNMAP",
                argsz: u.argsz,
                expected: Self::SIZE,
            });
        }
        // vfio.h: with ALL, iova and size must be 0, and no dirty bitmap can be asked for.
        if u.flags & dma_flags::UNMAP_ALL != 0 {
            if u.flags & dma_flags::UNMAP_GET_DIRTY_BITMAP != 0 {
                return Err(ProtoError::invalid(
                    "DMA_UNMAP",
                    "the ALL and GET_DIRTY_BITMAP flags exclude each other",
                ));
            }
            if u.addr != 0 || u.size != 0 {
                return Err(ProtoError::invalid(
                    "DMA_UNMAP",
                    format!(
                        "unmap-all must carry address 0 and size 0, not {:#x}+{:#x}",
                        u.addr, u.size
                    ),
                ));
            }
        } else if u.size == 0 || u.addr.checked_add(u.size - 1).is_none() {
            return Err(ProtoError::invalid(
                "DMA_UNMAP",
                format!("range {:#x}+{:#x} is empty or wraps", u.addr, u.size),
            ));
        }
        Ok(u)
    }
}

// ---------------------------------------------------------------------------------
// DEVICE_GET_INFO, GET_IRQ_INFO

/// DEVICE_GET_INFO request and reply (`argsz, flags, num_regions, num_irqs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfoMsg {
    /// argsz.
    pub argsz: u32,
    /// Device flags.
    pub flags: u32,
    /// Regions.
    pub num_regions: u32,
    /// Irq indices.
    pub num_irqs: u32,
}

impl DeviceInfoMsg {
    /// Payload size.
    pub const SIZE: usize = 16;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, self.argsz);
        put_u32(b, self.flags);
        put_u32(b, self.num_regions);
        put_u32(b, self.num_irqs);
    }
    /// Parse (request or reply).
    pub fn decode(p: &[u8]) -> Result<DeviceInfoMsg> {
        let mut c = Cursor::new(p, "DEVICE_GET_INFO");
        let m = DeviceInfoMsg {
            argsz: c.u32()?,
            flags: c.u32()?,
            num_regions: c.u32()?,
            num_irqs: c.u32()?,
        };
        c.finish()?;
        Ok(m)
    }
}

/// DEVICE_GET_IRQ_INFO request and reply (`argsz, flags, index, count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfoMsg {
    /// argsz.
    pub argsz: u32,
    /// Irq flags.
    pub flags: u32,
    /// Index.
    pub index: u32,
    /// Vectors.
    pub count: u32,
}

impl IrqInfoMsg {
    /// Payload size.
    pub const SIZE: usize = 16;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, self.argsz);
        put_u32(b, self.flags);
        put_u32(b, self.index);
        put_u32(b, self.count);
    }
    /// Parse.
    pub fn decode(p: &[u8]) -> Result<IrqInfoMsg> {
        let mut c = Cursor::new(p, "DEVICE_GET_IRQ_INFO");
        let m = IrqInfoMsg {
            argsz: c.u32()?,
            flags: c.u32()?,
            index: c.u32()?,
            count: c.u32()?,
        };
        c.finish()?;
        Ok(m)
    }
}

// ---------------------------------------------------------------------------------
// DEVICE_GET_REGION_INFO

/// The fixed part of `vfio_region_info` (request, and the first 32 bytes of the reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionInfoMsg {
    /// argsz.
    pub argsz: u32,
    /// Region flags.
    pub flags: u32,
    /// Index.
    pub index: u32,
    /// Offset of the first capability (0: none).
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// mmap offset in the region fd.
    pub offset: u64,
}

/// A parsed region info reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfoReply {
    /// Fixed part.
    pub info: RegionInfoMsg,
    /// Sparse mmap areas (offset, size), from the capability chain.
    pub sparse: Vec<(u64, u64)>,
}

impl RegionInfoMsg {
    /// Payload size of the fixed part.
    pub const SIZE: usize = 32;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, self.argsz);
        put_u32(b, self.flags);
        put_u32(b, self.index);
        put_u32(b, self.cap_offset);
        put_u64(b, self.size);
        put_u64(b, self.offset);
    }
    fn read(c: &mut Cursor<'_>) -> Result<RegionInfoMsg> {
        Ok(RegionInfoMsg {
            argsz: c.u32()?,
            flags: c.u32()?,
            index: c.u32()?,
            cap_offset: c.u32()?,
            size: c.u64()?,
            offset: c.u64()?,
        })
    }
    /// Parse a request.
    pub fn decode(p: &[u8]) -> Result<RegionInfoMsg> {
        let mut c = Cursor::new(p, "DEVICE_GET_REGION_INFO");
        let m = Self::read(&mut c)?;
        c.finish()?;
        Ok(m)
    }
}

/// Size of the sparse mmap capability with `n` areas.
pub fn sparse_cap_len(n: usize) -> usize {
    16 + 16 * n
}

impl RegionInfoReply {
    /// Append the reply: fixed part plus, when `room` (the client's argsz) allows, the
    /// sparse capability. `info.argsz` is set to the full size needed either way.
    pub fn encode_into(&self, room: u32, b: &mut Vec<u8>) {
        let mut info = self.info;
        let caps_len = if self.sparse.is_empty() {
            0
        } else {
            sparse_cap_len(self.sparse.len())
        };
        let full = RegionInfoMsg::SIZE + caps_len;
        info.argsz = full as u32;
        let with_caps = caps_len > 0 && room as usize >= full;
        // CAPS only when the capabilities are in this reply (as libvfio-user does):
        // QEMU's client refuses a reply with CAPS whose cap_offset is not inside it
        // (EINVAL before it retries with the larger argsz), and the grown argsz alone
        // already tells every client to ask again.
        if with_caps {
            info.flags |= nestio_device_model::region_flags::CAPS;
        }
        info.cap_offset = if with_caps {
            RegionInfoMsg::SIZE as u32
        } else {
            0
        };
        info.encode_into(b);
        if with_caps {
            put_u16(b, REGION_CAP_SPARSE_MMAP);
            put_u16(b, 1);
            put_u32(b, 0);
            put_u32(b, self.sparse.len() as u32);
            put_u32(b, 0);
            for &(o, s) in &self.sparse {
                put_u64(b, o);
                put_u64(b, s);
            }
        }
    }

    /// Parse a reply, walking the capability chain with bounds checks (offsets must
    /// strictly increase, so a looping chain is refused).
    pub fn decode(p: &[u8]) -> Result<RegionInfoReply> {
        const WHAT: &str = "DEVICE_GET_REGION_INFO reply";
        let mut c = Cursor::new(p, WHAT);
        let info = RegionInfoMsg::read(&mut c)?;
        let mut sparse = Vec::new();
        let mut off = info.cap_offset as usize;
        let mut last = 0usize;
        while off != 0 {
            if off < RegionInfoMsg::SIZE || off <= last {
                return Err(ProtoError::invalid(
                    WHAT,
                    format!("capability offset {off} is inside the header or loops back"),
                ));
            }
            let cap = p.get(off..).ok_or(ProtoError::Truncated {
                what: WHAT,
                need: off,
                have: p.len(),
            })?;
            let mut cc = Cursor::new(cap, WHAT);
            let id = cc.u16()?;
            let _version = cc.u16()?;
            let next = cc.u32()? as usize;
            if id == REGION_CAP_SPARSE_MMAP {
                let n = cc.u32()? as usize;
                let _reserved = cc.u32()?;
                if n > cc.remaining() / 16 {
                    return Err(ProtoError::Truncated {
                        what: WHAT,
                        need: off + 16 + n.saturating_mul(16),
                        have: p.len(),
                    });
                }
                for _ in 0..n {
                    let o = cc.u64()?;
                    let s = cc.u64()?;
                    sparse.push((o, s));
                }
            }
            last = off;
            off = next;
        }
        Ok(RegionInfoReply { info, sparse })
    }
}

// ---------------------------------------------------------------------------------
// DEVICE_GET_REGION_IO_FDS

/// GET_REGION_IO_FDS request and the reply's fixed part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoFdsMsg {
    /// argsz.
    pub argsz: u32,
    /// Flags (0).
    pub flags: u32,
    /// Region.
    pub index: u32,
    /// Entries.
    pub count: u32,
}

/// One sub-region entry (40 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoFdEntry {
    /// Offset in the region.
    pub offset: u64,
    /// Access size.
    pub size: u64,
    /// Index into the reply's fds.
    pub fd_index: u32,
    /// [`IO_FD_TYPE_IOEVENTFD`] or ioregionfd.
    pub kind: u32,
    /// KVM ioeventfd flags.
    pub flags: u32,
    /// datamatch / user_data.
    pub datamatch: u64,
}

/// A parsed GET_REGION_IO_FDS reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoFdsReply {
    /// Fixed part.
    pub hdr: IoFdsMsg,
    /// Entries (empty when the client's argsz was too small).
    pub entries: Vec<IoFdEntry>,
}

impl IoFdsMsg {
    /// Fixed size.
    pub const SIZE: usize = 16;
    /// Entry size.
    pub const ENTRY: usize = 40;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, self.argsz);
        put_u32(b, self.flags);
        put_u32(b, self.index);
        put_u32(b, self.count);
    }
    /// Parse a request.
    pub fn decode(p: &[u8]) -> Result<IoFdsMsg> {
        let mut c = Cursor::new(p, "DEVICE_GET_REGION_IO_FDS");
        let m = IoFdsMsg {
            argsz: c.u32()?,
            flags: c.u32()?,
            index: c.u32()?,
            count: c.u32()?,
        };
        c.finish()?;
        check_flags("DEVICE_GET_REGION_IO_FDS", m.flags, 0)?;
        Ok(m)
    }
}

impl IoFdsReply {
    /// Append the wire form (entries only if `with_entries`).
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        self.hdr.encode_into(b);
        for e in &self.entries {
            put_u64(b, e.offset);
            put_u64(b, e.size);
            put_u32(b, e.fd_index);
            put_u32(b, e.kind);
            put_u32(b, e.flags);
            put_u32(b, 0);
            put_u64(b, e.datamatch);
        }
    }
    /// Parse a reply. Entries are present only when the payload holds them all. The
    /// entry size is the entries' bytes divided by `count`, at least 40 (spec: "currently
    /// this is 40 bytes for both IO FD types, but this is not to be relied on"); bytes of
    /// a larger entry past the 40 known ones are skipped.
    pub fn decode(p: &[u8]) -> Result<IoFdsReply> {
        const WHAT: &str = "DEVICE_GET_REGION_IO_FDS reply";
        let mut c = Cursor::new(p, WHAT);
        let hdr = IoFdsMsg {
            argsz: c.u32()?,
            flags: c.u32()?,
            index: c.u32()?,
            count: c.u32()?,
        };
        let mut entries = Vec::new();
        if c.remaining() > 0 {
            let n = hdr.count as usize;
            let have = c.remaining();
            if n == 0 || !have.is_multiple_of(n) || have / n < IoFdsMsg::ENTRY {
                return Err(ProtoError::invalid(
                    WHAT,
                    format!("{have} bytes of entries for count {n}"),
                ));
            }
            let stride = have / n;
            for _ in 0..n {
                let offset = c.u64()?;
                let size = c.u64()?;
                let fd_index = c.u32()?;
                let kind = c.u32()?;
                let flags = c.u32()?;
                let _pad = c.u32()?;
                let datamatch = c.u64()?;
                c.bytes(stride - IoFdsMsg::ENTRY)?;
                entries.push(IoFdEntry {
                    offset,
                    size,
                    fd_index,
                    kind,
                    flags,
                    datamatch,
                });
            }
        }
        c.finish()?;
        Ok(IoFdsReply { hdr, entries })
    }
}

// ---------------------------------------------------------------------------------
// DEVICE_SET_IRQS

/// SET_IRQS request (`vfio_irq_set`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqSet<'a> {
    /// [`irq_set_flags`].
    pub flags: u32,
    /// Index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Vectors.
    pub count: u32,
    /// DATA_BOOL: one byte per vector; else empty.
    pub data: &'a [u8],
}

impl<'a> IrqSet<'a> {
    /// Fixed size.
    pub const SIZE: usize = 20;
    /// Append the wire form (argsz = whole payload).
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, (Self::SIZE + self.data.len()) as u32);
        put_u32(b, self.flags);
        put_u32(b, self.index);
        put_u32(b, self.start);
        put_u32(b, self.count);
        b.extend_from_slice(self.data);
    }
    /// Parse.
    pub fn decode(p: &'a [u8]) -> Result<IrqSet<'a>> {
        const WHAT: &str = "DEVICE_SET_IRQS";
        let mut c = Cursor::new(p, WHAT);
        let argsz = c.u32()?;
        let flags = c.u32()?;
        let index = c.u32()?;
        let start = c.u32()?;
        let count = c.u32()?;
        check_flags(
            WHAT,
            flags,
            irq_set_flags::DATA_MASK | irq_set_flags::ACTION_MASK_ALL,
        )?;
        let data_bits = flags & irq_set_flags::DATA_MASK;
        let action_bits = flags & irq_set_flags::ACTION_MASK_ALL;
        if data_bits.count_ones() != 1 || action_bits.count_ones() != 1 {
            return Err(ProtoError::invalid(
                WHAT,
                format!("flags {flags:#x} must name exactly one data type and one action"),
            ));
        }
        if start.checked_add(count).is_none() {
            return Err(ProtoError::invalid(WHAT, "start + count overflows"));
        }
        let data = if data_bits == irq_set_flags::DATA_BOOL {
            c.bytes(count as usize)?
        } else {
            &[]
        };
        c.finish()?;
        if argsz as usize != p.len() {
            return Err(ProtoError::Argsz {
                what: WHAT,
                argsz,
                expected: p.len(),
            });
        }
        Ok(IrqSet {
            flags,
            index,
            start,
            count,
            data,
        })
    }
}

// ---------------------------------------------------------------------------------
// REGION_READ / REGION_WRITE

/// REGION_READ / REGION_WRITE fixed part (`offset, region, count`) plus data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionAccess<'a> {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Byte count.
    pub count: u32,
    /// Data (write request, read reply); empty otherwise.
    pub data: &'a [u8],
}

impl<'a> RegionAccess<'a> {
    /// Fixed size.
    pub const SIZE: usize = 16;
    /// Append the fixed part and the data.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u64(b, self.offset);
        put_u32(b, self.region);
        put_u32(b, self.count);
        b.extend_from_slice(self.data);
    }
    /// Parse; `with_data` says whether `count` data bytes follow (write request, read
    /// reply) or none (read request, write reply).
    pub fn decode(p: &'a [u8], with_data: bool) -> Result<RegionAccess<'a>> {
        const WHAT: &str = "REGION_READ/WRITE";
        let mut c = Cursor::new(p, WHAT);
        let offset = c.u64()?;
        let region = c.u32()?;
        let count = c.u32()?;
        let data = if with_data {
            c.bytes(count as usize)?
        } else {
            &[]
        };
        c.finish()?;
        if offset.checked_add(count as u64).is_none() {
            return Err(ProtoError::invalid(WHAT, "offset + count overflows"));
        }
        Ok(RegionAccess {
            offset,
            region,
            count,
            data,
        })
    }
}

// ---------------------------------------------------------------------------------
// DMA_READ / DMA_WRITE

/// DMA_READ / DMA_WRITE (`address u64, count u64`) plus data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaAccess<'a> {
    /// Client address.
    pub addr: u64,
    /// Byte count.
    pub count: u64,
    /// Data (write request, read reply).
    pub data: &'a [u8],
}

impl<'a> DmaAccess<'a> {
    /// Fixed size.
    pub const SIZE: usize = 16;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u64(b, self.addr);
        put_u64(b, self.count);
        b.extend_from_slice(self.data);
    }
    /// A DMA_WRITE reply: 16 bytes, or 12 (the spec's table gives `count` 4 bytes there).
    pub fn decode_write_reply(p: &'a [u8]) -> Result<DmaAccess<'a>> {
        if p.len() == 12 {
            let mut c = Cursor::new(p, "DMA_WRITE reply");
            let addr = c.u64()?;
            let count = c.u32()? as u64;
            return Ok(DmaAccess {
                addr,
                count,
                data: &[],
            });
        }
        Self::decode(p, false)
    }

    /// Parse; `with_data` as for [`RegionAccess::decode`].
    pub fn decode(p: &'a [u8], with_data: bool) -> Result<DmaAccess<'a>> {
        const WHAT: &str = "DMA_READ/WRITE";
        let mut c = Cursor::new(p, WHAT);
        let addr = c.u64()?;
        let count = c.u64()?;
        let data = if with_data {
            let n = usize::try_from(count)
                .map_err(|_| ProtoError::invalid(WHAT, "count does not fit in memory"))?;
            c.bytes(n)?
        } else {
            &[]
        };
        c.finish()?;
        if count == 0 || addr.checked_add(count - 1).is_none() {
            return Err(ProtoError::invalid(
                WHAT,
                "count is 0 or address + count wraps",
            ));
        }
        Ok(DmaAccess { addr, count, data })
    }
}

// ---------------------------------------------------------------------------------
// REGION_WRITE_MULTI

/// One write of REGION_WRITE_MULTI (24 bytes; at most 8 data bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultiWrite {
    /// Offset.
    pub offset: u64,
    /// Region.
    pub region: u32,
    /// Bytes, 1..=8.
    pub count: u32,
    /// Data (first `count` bytes used).
    pub data: [u8; 8],
}

impl MultiWrite {
    /// A write of `data` (1..=8 bytes).
    pub fn new(region: u32, offset: u64, data: &[u8]) -> Option<MultiWrite> {
        if data.is_empty() || data.len() > 8 {
            return None;
        }
        let mut d = [0u8; 8];
        d[..data.len()].copy_from_slice(data);
        Some(MultiWrite {
            offset,
            region,
            count: data.len() as u32,
            data: d,
        })
    }
    /// The data bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..(self.count as usize).min(8)]
    }
}

/// REGION_WRITE_MULTI request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteMulti {
    /// The writes, in order.
    pub writes: Vec<MultiWrite>,
}

impl WriteMulti {
    /// Entry size.
    pub const ENTRY: usize = 24;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        Self::encode_writes_into(&self.writes, b);
    }
    /// Append the wire form of a request carrying `writes`, without building a
    /// `WriteMulti` (no copy of the slice).
    pub fn encode_writes_into(writes: &[MultiWrite], b: &mut Vec<u8>) {
        put_u64(b, writes.len() as u64);
        for w in writes {
            put_u64(b, w.offset);
            put_u32(b, w.region);
            put_u32(b, w.count);
            b.extend_from_slice(&w.data);
        }
    }
    /// Parse.
    pub fn decode(p: &[u8]) -> Result<WriteMulti> {
        const WHAT: &str = "REGION_WRITE_MULTI";
        let mut c = Cursor::new(p, WHAT);
        let n = c.u64()?;
        if n == 0 || n != (c.remaining() / Self::ENTRY) as u64 {
            return Err(ProtoError::invalid(
                WHAT,
                format!(
                    "wr_cnt {n} does not match {} bytes of writes",
                    c.remaining()
                ),
            ));
        }
        let mut writes = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let offset = c.u64()?;
            let region = c.u32()?;
            let count = c.u32()?;
            let mut data = [0u8; 8];
            data.copy_from_slice(c.bytes(8)?);
            if count == 0 || count > 8 {
                return Err(ProtoError::invalid(
                    WHAT,
                    format!("a write of {count} bytes (must be 1..=8)"),
                ));
            }
            if offset.checked_add(count as u64).is_none() {
                return Err(ProtoError::invalid(WHAT, "offset + count overflows"));
            }
            writes.push(MultiWrite {
                offset,
                region,
                count,
                data,
            });
        }
        c.finish()?;
        Ok(WriteMulti { writes })
    }
}

/// REGION_WRITE_MULTI reply: writes completed.
pub fn decode_write_multi_reply(p: &[u8]) -> Result<u64> {
    let mut c = Cursor::new(p, "REGION_WRITE_MULTI reply");
    let n = c.u64()?;
    c.finish()?;
    Ok(n)
}

// ---------------------------------------------------------------------------------
// DEVICE_FEATURE

/// DEVICE_FEATURE request and reply (`argsz, flags` + feature data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFeature<'a> {
    /// argsz.
    pub argsz: u32,
    /// Index and GET/SET/PROBE bits.
    pub flags: u32,
    /// Feature data.
    pub data: &'a [u8],
}

impl<'a> DeviceFeature<'a> {
    /// Fixed size.
    pub const SIZE: usize = 8;
    /// Feature index.
    pub fn index(&self) -> u16 {
        (self.flags & feature::INDEX_MASK) as u16
    }
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, self.argsz);
        put_u32(b, self.flags);
        b.extend_from_slice(self.data);
    }
    /// Parse (request or reply).
    pub fn decode(p: &'a [u8]) -> Result<DeviceFeature<'a>> {
        const WHAT: &str = "DEVICE_FEATURE";
        let mut c = Cursor::new(p, WHAT);
        let argsz = c.u32()?;
        let flags = c.u32()?;
        // Every reply holds at least `argsz, flags`.
        if (argsz as usize) < Self::SIZE {
            return Err(ProtoError::Argsz {
                what: WHAT,
                argsz,
                expected: Self::SIZE,
            });
        }
        check_flags(
            WHAT,
            flags,
            feature::INDEX_MASK | feature::GET | feature::SET | feature::PROBE,
        )?;
        if flags & (feature::GET | feature::SET) == feature::GET | feature::SET
            && flags & feature::PROBE == 0
        {
            return Err(ProtoError::invalid(
                WHAT,
                "GET and SET together are only valid with PROBE",
            ));
        }
        Ok(DeviceFeature {
            argsz,
            flags,
            data: c.rest(),
        })
    }
}

/// DMA_LOGGING_START data: page size and ranges (iova, length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingControl {
    /// Page size.
    pub page_size: u64,
    /// Ranges (empty: everything).
    pub ranges: Vec<(u64, u64)>,
}

impl LoggingControl {
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u64(b, self.page_size);
        put_u32(b, self.ranges.len() as u32);
        put_u32(b, 0);
        for &(i, l) in &self.ranges {
            put_u64(b, i);
            put_u64(b, l);
        }
    }
    /// Parse.
    pub fn decode(p: &[u8]) -> Result<LoggingControl> {
        const WHAT: &str = "DMA_LOGGING_START";
        let mut c = Cursor::new(p, WHAT);
        let page_size = c.u64()?;
        let n = c.u32()? as usize;
        let _reserved = c.u32()?;
        if n.saturating_mul(16) != c.remaining() {
            return Err(ProtoError::invalid(
                WHAT,
                format!(
                    "num_ranges {n} does not match {} bytes of ranges",
                    c.remaining()
                ),
            ));
        }
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            ranges.push((c.u64()?, c.u64()?));
        }
        c.finish()?;
        if !page_size.is_power_of_two() {
            return Err(ProtoError::invalid(WHAT, "page size is not a power of two"));
        }
        Ok(LoggingControl { page_size, ranges })
    }
}

/// DMA_LOGGING_REPORT request data (`iova, length, page_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggingReport {
    /// Start.
    pub iova: u64,
    /// Length.
    pub length: u64,
    /// Bitmap granularity.
    pub page_size: u64,
}

impl LoggingReport {
    /// Size.
    pub const SIZE: usize = 24;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u64(b, self.iova);
        put_u64(b, self.length);
        put_u64(b, self.page_size);
    }
    /// Parse the request data.
    pub fn decode(p: &[u8]) -> Result<LoggingReport> {
        const WHAT: &str = "DMA_LOGGING_REPORT";
        let mut c = Cursor::new(p, WHAT);
        let r = LoggingReport {
            iova: c.u64()?,
            length: c.u64()?,
            page_size: c.u64()?,
        };
        c.finish()?;
        if !r.page_size.is_power_of_two() {
            return Err(ProtoError::invalid(WHAT, "page size is not a power of two"));
        }
        if r.length == 0 || r.iova.checked_add(r.length - 1).is_none() {
            return Err(ProtoError::invalid(WHAT, "range is empty or wraps"));
        }
        Ok(r)
    }
    /// Bytes of the bitmap for this report (u64 words), or None when absurd.
    pub fn bitmap_bytes(&self) -> Option<usize> {
        let pages = self.length.div_ceil(self.page_size);
        let words = pages.div_ceil(64);
        usize::try_from(words.checked_mul(8)?).ok()
    }
}

/// MIG_DEVICE_STATE data (`device_state u32, data_fd u32`).
pub fn encode_mig_state(state: u32, b: &mut Vec<u8>) {
    put_u32(b, state);
    put_u32(b, u32::MAX);
}

/// Parse MIG_DEVICE_STATE data: the state.
pub fn decode_mig_state(p: &[u8]) -> Result<u32> {
    let mut c = Cursor::new(p, "MIG_DEVICE_STATE");
    let s = c.u32()?;
    let _fd = c.u32()?;
    c.finish()?;
    Ok(s)
}

/// Parse MIGRATION feature data: the flags.
pub fn decode_migration_flags(p: &[u8]) -> Result<u64> {
    let mut c = Cursor::new(p, "MIGRATION feature");
    let f = c.u64()?;
    c.finish()?;
    Ok(f)
}

// ---------------------------------------------------------------------------------
// MIG_DATA_READ / MIG_DATA_WRITE

/// MIG_DATA_READ / MIG_DATA_WRITE (`argsz, size` + data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigData<'a> {
    /// argsz.
    pub argsz: u32,
    /// Size.
    pub size: u32,
    /// Data (write request, read reply).
    pub data: &'a [u8],
}

impl<'a> MigData<'a> {
    /// Fixed size.
    pub const SIZE: usize = 8;
    /// Append the wire form.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        put_u32(b, self.argsz);
        put_u32(b, self.size);
        b.extend_from_slice(self.data);
    }
    /// Parse; `with_data` as for [`RegionAccess::decode`].
    pub fn decode(p: &'a [u8], with_data: bool) -> Result<MigData<'a>> {
        let mut c = Cursor::new(p, "MIG_DATA_READ/WRITE");
        let argsz = c.u32()?;
        let size = c.u32()?;
        let data = if with_data {
            c.bytes(size as usize)?
        } else {
            &[]
        };
        c.finish()?;
        Ok(MigData { argsz, size, data })
    }
}

// ---------------------------------------------------------------------------------
// Dispatch

/// Any request, decoded.
#[derive(Debug)]
pub enum Request<'a> {
    /// VERSION.
    Version(Version),
    /// DMA_MAP.
    DmaMap(DmaMap),
    /// DMA_UNMAP.
    DmaUnmap(DmaUnmap),
    /// DEVICE_GET_INFO.
    GetInfo(DeviceInfoMsg),
    /// DEVICE_GET_REGION_INFO.
    GetRegionInfo(RegionInfoMsg),
    /// DEVICE_GET_REGION_IO_FDS.
    GetRegionIoFds(IoFdsMsg),
    /// DEVICE_GET_IRQ_INFO.
    GetIrqInfo(IrqInfoMsg),
    /// DEVICE_SET_IRQS.
    SetIrqs(IrqSet<'a>),
    /// REGION_READ.
    RegionRead(RegionAccess<'a>),
    /// REGION_WRITE.
    RegionWrite(RegionAccess<'a>),
    /// DMA_READ.
    DmaRead(DmaAccess<'a>),
    /// DMA_WRITE.
    DmaWrite(DmaAccess<'a>),
    /// DEVICE_RESET.
    Reset,
    /// REGION_WRITE_MULTI.
    WriteMulti(WriteMulti),
    /// DEVICE_FEATURE.
    Feature(DeviceFeature<'a>),
    /// MIG_DATA_READ.
    MigDataRead(MigData<'a>),
    /// MIG_DATA_WRITE.
    MigDataWrite(MigData<'a>),
    /// NESTIO_IOMMU_BIND.
    IommuBind(crate::nested_iommu::IommuBind),
    /// NESTIO_IOMMU_UNBIND.
    IommuUnbind,
    /// NESTIO_IOMMU_INVALIDATE.
    IommuInvalidate(crate::nested_iommu::IommuInvalidate),
    /// NESTIO_IOMMU_FAULT (server to client).
    IommuFault(crate::nested_iommu::IommuFault),
}

impl<'a> Request<'a> {
    /// Decode the payload of a command `cmd`.
    pub fn decode(cmd: u16, p: &'a [u8]) -> Result<Request<'a>> {
        let c = Command::from_u16(cmd).ok_or(ProtoError::UnknownCommand(cmd))?;
        Ok(match c {
            Command::Version => Request::Version(Version::decode(p)?),
            Command::DmaMap => Request::DmaMap(DmaMap::decode(p)?),
            Command::DmaUnmap => Request::DmaUnmap(DmaUnmap::decode(p)?),
            Command::DeviceGetInfo => Request::GetInfo(DeviceInfoMsg::decode(p)?),
            Command::DeviceGetRegionInfo => Request::GetRegionInfo(RegionInfoMsg::decode(p)?),
            Command::DeviceGetRegionIoFds => Request::GetRegionIoFds(IoFdsMsg::decode(p)?),
            Command::DeviceGetIrqInfo => Request::GetIrqInfo(IrqInfoMsg::decode(p)?),
            Command::DeviceSetIrqs => Request::SetIrqs(IrqSet::decode(p)?),
            Command::RegionRead => Request::RegionRead(RegionAccess::decode(p, false)?),
            Command::RegionWrite => Request::RegionWrite(RegionAccess::decode(p, true)?),
            Command::DmaRead => Request::DmaRead(DmaAccess::decode(p, false)?),
            Command::DmaWrite => Request::DmaWrite(DmaAccess::decode(p, true)?),
            Command::DeviceReset => {
                Cursor::new(p, "DEVICE_RESET").finish()?;
                Request::Reset
            }
            Command::LegacyDirtyPages => return Err(ProtoError::UnknownCommand(cmd)),
            Command::RegionWriteMulti => Request::WriteMulti(WriteMulti::decode(p)?),
            Command::DeviceFeature => Request::Feature(DeviceFeature::decode(p)?),
            Command::MigDataRead => Request::MigDataRead(MigData::decode(p, false)?),
            Command::MigDataWrite => Request::MigDataWrite(MigData::decode(p, true)?),
            Command::NestioIommuBind => {
                Request::IommuBind(crate::nested_iommu::IommuBind::decode(p)?)
            }
            Command::NestioIommuUnbind => {
                Cursor::new(p, "NESTIO_IOMMU_UNBIND").finish()?;
                Request::IommuUnbind
            }
            Command::NestioIommuInvalidate => {
                Request::IommuInvalidate(crate::nested_iommu::IommuInvalidate::decode(p)?)
            }
            Command::NestioIommuFault => {
                Request::IommuFault(crate::nested_iommu::IommuFault::decode(p)?)
            }
        })
    }
}

/// Any reply, decoded (for the fuzzer and diagnostics; the client decodes the one it
/// expects directly).
#[derive(Debug)]
pub enum Reply<'a> {
    /// VERSION.
    Version(Version),
    /// No payload.
    Empty,
    /// DMA_UNMAP.
    DmaUnmap(DmaUnmap),
    /// DEVICE_GET_INFO.
    GetInfo(DeviceInfoMsg),
    /// DEVICE_GET_REGION_INFO.
    RegionInfo(RegionInfoReply),
    /// DEVICE_GET_REGION_IO_FDS.
    IoFds(IoFdsReply),
    /// DEVICE_GET_IRQ_INFO.
    IrqInfo(IrqInfoMsg),
    /// REGION_READ/WRITE.
    Region(RegionAccess<'a>),
    /// DMA_READ/WRITE.
    Dma(DmaAccess<'a>),
    /// REGION_WRITE_MULTI.
    WriteMulti(u64),
    /// DEVICE_FEATURE.
    Feature(DeviceFeature<'a>),
    /// MIG_DATA_READ.
    MigData(MigData<'a>),
    /// NESTIO_IOMMU_INVALIDATE.
    IommuInvalidate(crate::nested_iommu::InvalidateReply),
}

impl<'a> Reply<'a> {
    /// Decode the payload of a reply to `cmd`.
    pub fn decode(cmd: u16, p: &'a [u8]) -> Result<Reply<'a>> {
        let c = Command::from_u16(cmd).ok_or(ProtoError::UnknownCommand(cmd))?;
        let empty = |what| Cursor::new(p, what).finish().map(|_| Reply::Empty);
        Ok(match c {
            Command::Version => Reply::Version(Version::decode(p)?),
            Command::DmaMap => empty("DMA_MAP reply")?,
            Command::DmaUnmap => Reply::DmaUnmap(DmaUnmap::decode(p)?),
            Command::DeviceGetInfo => Reply::GetInfo(DeviceInfoMsg::decode(p)?),
            Command::DeviceGetRegionInfo => Reply::RegionInfo(RegionInfoReply::decode(p)?),
            Command::DeviceGetRegionIoFds => Reply::IoFds(IoFdsReply::decode(p)?),
            Command::DeviceGetIrqInfo => Reply::IrqInfo(IrqInfoMsg::decode(p)?),
            Command::DeviceSetIrqs | Command::DeviceReset | Command::MigDataWrite => {
                empty("reply")?
            }
            Command::RegionRead => Reply::Region(RegionAccess::decode(p, true)?),
            Command::RegionWrite => Reply::Region(RegionAccess::decode(p, false)?),
            Command::DmaRead => Reply::Dma(DmaAccess::decode(p, true)?),
            Command::DmaWrite => Reply::Dma(DmaAccess::decode_write_reply(p)?),
            Command::LegacyDirtyPages => return Err(ProtoError::UnknownCommand(cmd)),
            Command::RegionWriteMulti => Reply::WriteMulti(decode_write_multi_reply(p)?),
            Command::DeviceFeature => Reply::Feature(DeviceFeature::decode(p)?),
            Command::MigDataRead => Reply::MigData(MigData::decode(p, true)?),
            Command::NestioIommuBind | Command::NestioIommuUnbind | Command::NestioIommuFault => {
                empty("reply")?
            }
            Command::NestioIommuInvalidate => {
                Reply::IommuInvalidate(crate::nested_iommu::InvalidateReply::decode(p)?)
            }
        })
    }
}

/// Decode one whole message (header + payload) as both a request and a reply: the fuzz
/// target's entry point. Never panics.
pub fn fuzz_decode(data: &[u8]) {
    let Ok(h) = Header::decode(data, 1 << 24) else {
        return;
    };
    let _ = h.check_flags();
    let end = (h.size as usize).min(data.len());
    let p = &data[HEADER_SIZE.min(end)..end];
    let _ = Request::decode(h.cmd, p);
    let _ = Reply::decode(h.cmd, p);
    let _ = Version::decode(p);
    let _ = RegionInfoReply::decode(p);
    let _ = LoggingControl::decode(p);
    let _ = LoggingReport::decode(p);
    let _ = crate::nested_iommu::IommuBind::decode(p);
    let _ = crate::nested_iommu::IommuInvalidate::decode(p);
    let _ = crate::nested_iommu::InvalidateReply::decode(p);
    let _ = crate::nested_iommu::IommuFault::decode(p);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_size_checks() {
        let h = Header::command(7, Command::RegionRead, 16).unwrap();
        let b = h.encode();
        let d = Header::decode(&b, 4096).unwrap();
        assert_eq!(d, h);
        assert_eq!(d.payload_len(), 16);
        let mut small = h;
        small.size = 8;
        assert!(matches!(
            Header::decode(&small.encode(), 4096),
            Err(ProtoError::BadMessageSize { .. })
        ));
        assert!(Header::decode(&b, 20).is_err());
        assert!(Header::decode(&b[..10], 4096).is_err());
        let mut bad = h;
        bad.flags = 1 << 7;
        assert!(bad.check_flags().is_err());
        bad.flags = 3;
        assert!(bad.check_flags().is_err());
    }

    #[test]
    fn version_json_defaults_unknown_keys_and_wrong_types() {
        let mut p = vec![0, 0, 2, 0];
        p.extend_from_slice(br#"{"capabilities":{"max_msg_fds":8,"future":{"x":1},"twin_socket":{"supported":true}}}"#);
        p.push(0);
        let v = Version::decode(&p).unwrap();
        assert_eq!(v.minor, 2);
        assert_eq!(v.caps.max_msg_fds, 8);
        assert_eq!(v.caps.max_data_xfer_size, DEFAULT_MAX_DATA_XFER);
        assert!(v.caps.twin_supported());
        let mut bad = vec![0, 0, 2, 0];
        bad.extend_from_slice(br#"{"capabilities":{"max_msg_fds":"8"}}"#);
        assert!(matches!(Version::decode(&bad), Err(ProtoError::Json(_))));
        let mut neg = vec![0, 0, 2, 0];
        neg.extend_from_slice(br#"{"capabilities":{"max_data_xfer_size":-1}}"#);
        assert!(Version::decode(&neg).is_err());
        let mut zero = vec![0, 0, 2, 0];
        zero.extend_from_slice(br#"{"capabilities":{"max_data_xfer_size":0}}"#);
        assert!(Version::decode(&zero).is_err());
        // Round trip.
        let mut b = Vec::new();
        v.encode_into(&mut b);
        assert_eq!(Version::decode(&b).unwrap(), v);
        // No JSON at all: defaults.
        assert_eq!(
            Version::decode(&[0, 0, 0, 0]).unwrap().caps,
            Capabilities::default()
        );
    }

    #[test]
    fn dma_map_checks() {
        let m = DmaMap {
            flags: 3,
            offset: 0,
            addr: 0x1000,
            size: 0x1000,
        };
        let mut b = Vec::new();
        m.encode_into(&mut b);
        assert_eq!(DmaMap::decode(&b).unwrap(), m);
        assert!(DmaMap::decode(&b[..31]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            DmaMap::decode(&long),
            Err(ProtoError::Trailing { .. })
        ));
        let mut lie = b.clone();
        lie[0] = 40;
        assert!(matches!(
            DmaMap::decode(&lie),
            Err(ProtoError::Argsz { .. })
        ));
        let mut fl = b.clone();
        fl[4] = 4;
        assert!(matches!(
            DmaMap::decode(&fl),
            Err(ProtoError::UnknownFlags { .. })
        ));
        let wrap = DmaMap {
            addr: u64::MAX,
            size: 2,
            ..m
        };
        let mut w = Vec::new();
        wrap.encode_into(&mut w);
        assert!(DmaMap::decode(&w).is_err());
    }

    #[test]
    fn region_info_caps_roundtrip_and_loops() {
        let r = RegionInfoReply {
            info: RegionInfoMsg {
                argsz: 0,
                flags: 7,
                index: 2,
                cap_offset: 0,
                size: 0x2000,
                offset: 0,
            },
            sparse: vec![(0x1000, 0x1000)],
        };
        let mut b = Vec::new();
        r.encode_into(1024, &mut b);
        let d = RegionInfoReply::decode(&b).unwrap();
        assert_eq!(d.sparse, r.sparse);
        assert_eq!(d.info.argsz as usize, 32 + 32);
        // Too little room: argsz says what is needed, no caps.
        let mut s = Vec::new();
        r.encode_into(32, &mut s);
        let d = RegionInfoReply::decode(&s).unwrap();
        assert_eq!(d.info.argsz, 64);
        assert!(d.sparse.is_empty());
        // A cap chain pointing at itself is refused.
        let mut lp = b.clone();
        lp[36..40].copy_from_slice(&32u32.to_ne_bytes());
        assert!(RegionInfoReply::decode(&lp).is_err());
        // nr_areas that lies.
        let mut nr = b.clone();
        nr[40..44].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(RegionInfoReply::decode(&nr).is_err());
    }

    #[test]
    fn irq_set_checks() {
        let s = IrqSet {
            flags: irq_set_flags::DATA_BOOL | irq_set_flags::ACTION_TRIGGER,
            index: 1,
            start: 0,
            count: 2,
            data: &[1, 0],
        };
        let mut b = Vec::new();
        s.encode_into(&mut b);
        assert_eq!(IrqSet::decode(&b).unwrap(), s);
        assert!(IrqSet::decode(&b[..21]).is_err());
        let mut two = b.clone();
        two[4] = (irq_set_flags::DATA_BOOL | irq_set_flags::DATA_NONE | 0x20) as u8;
        assert!(IrqSet::decode(&two).is_err());
        let mut lie = b.clone();
        lie[0] = 99;
        assert!(IrqSet::decode(&lie).is_err());
    }

    #[test]
    fn region_access_and_multi() {
        let a = RegionAccess {
            offset: 8,
            region: 1,
            count: 4,
            data: &[1, 2, 3, 4],
        };
        let mut b = Vec::new();
        a.encode_into(&mut b);
        assert_eq!(RegionAccess::decode(&b, true).unwrap(), a);
        assert!(RegionAccess::decode(&b[..19], true).is_err());
        assert!(RegionAccess::decode(&b, false).is_err());
        let mut lie = b.clone();
        lie[12] = 200;
        assert!(RegionAccess::decode(&lie, true).is_err());
        let m = WriteMulti {
            writes: vec![MultiWrite::new(0, 4, &[9, 9]).unwrap()],
        };
        let mut mb = Vec::new();
        m.encode_into(&mut mb);
        assert_eq!(WriteMulti::decode(&mb).unwrap(), m);
        let mut bad = mb.clone();
        bad[0] = 2;
        assert!(WriteMulti::decode(&bad).is_err());
        let mut cnt = mb.clone();
        cnt[20] = 9;
        assert!(WriteMulti::decode(&cnt).is_err());
        assert!(MultiWrite::new(0, 0, &[0; 9]).is_none());
    }

    #[test]
    fn feature_and_logging() {
        let f = DeviceFeature::decode(&[8, 0, 0, 0, 1, 0, 3, 0]);
        assert!(f.is_err(), "GET|SET without PROBE");
        let f = DeviceFeature::decode(&[8, 0, 0, 0, 1, 0, 0x1, 0]).unwrap();
        assert_eq!(f.index(), 1);
        assert!(DeviceFeature::decode(&[8, 0, 0, 0, 1, 0, 0x8, 0]).is_err());
        let lc = LoggingControl {
            page_size: 4096,
            ranges: vec![(0, 0x10000)],
        };
        let mut b = Vec::new();
        lc.encode_into(&mut b);
        assert_eq!(LoggingControl::decode(&b).unwrap(), lc);
        b[8] = 5;
        assert!(LoggingControl::decode(&b).is_err());
        let r = LoggingReport {
            iova: 0,
            length: 65 * 4096,
            page_size: 4096,
        };
        assert_eq!(r.bitmap_bytes(), Some(16));
    }

    #[test]
    fn unknown_command() {
        assert_eq!(Request::decode(99, &[]).unwrap_err().errno(), libc::ENOSYS);
        assert!(Request::decode(14, &[]).is_err());
        assert!(Request::decode(13, &[1]).is_err());
        assert!(matches!(Request::decode(13, &[]).unwrap(), Request::Reset));
    }

    fn valid_requests() -> Vec<(Command, Vec<u8>)> {
        let mut v = Vec::new();
        let mut b = Vec::new();
        DmaMap {
            flags: 3,
            offset: 0,
            addr: 0x1000,
            size: 0x1000,
        }
        .encode_into(&mut b);
        v.push((Command::DmaMap, std::mem::take(&mut b)));
        DmaUnmap {
            argsz: 24,
            flags: 0,
            addr: 0x1000,
            size: 0x1000,
        }
        .encode_into(&mut b);
        v.push((Command::DmaUnmap, std::mem::take(&mut b)));
        DeviceInfoMsg {
            argsz: 16,
            flags: 0,
            num_regions: 0,
            num_irqs: 0,
        }
        .encode_into(&mut b);
        v.push((Command::DeviceGetInfo, std::mem::take(&mut b)));
        RegionInfoMsg {
            argsz: 32,
            index: 1,
            ..Default::default()
        }
        .encode_into(&mut b);
        v.push((Command::DeviceGetRegionInfo, std::mem::take(&mut b)));
        IoFdsMsg {
            argsz: 16,
            flags: 0,
            index: 1,
            count: 0,
        }
        .encode_into(&mut b);
        v.push((Command::DeviceGetRegionIoFds, std::mem::take(&mut b)));
        IrqInfoMsg {
            argsz: 16,
            flags: 0,
            index: 1,
            count: 0,
        }
        .encode_into(&mut b);
        v.push((Command::DeviceGetIrqInfo, std::mem::take(&mut b)));
        IrqSet {
            flags: irq_set_flags::DATA_BOOL | irq_set_flags::ACTION_TRIGGER,
            index: 1,
            start: 0,
            count: 3,
            data: &[1, 0, 1],
        }
        .encode_into(&mut b);
        v.push((Command::DeviceSetIrqs, std::mem::take(&mut b)));
        RegionAccess {
            offset: 0,
            region: 0,
            count: 4,
            data: &[],
        }
        .encode_into(&mut b);
        v.push((Command::RegionRead, std::mem::take(&mut b)));
        RegionAccess {
            offset: 0,
            region: 0,
            count: 4,
            data: &[1, 2, 3, 4],
        }
        .encode_into(&mut b);
        v.push((Command::RegionWrite, std::mem::take(&mut b)));
        DmaAccess {
            addr: 0x1000,
            count: 4,
            data: &[],
        }
        .encode_into(&mut b);
        v.push((Command::DmaRead, std::mem::take(&mut b)));
        DmaAccess {
            addr: 0x1000,
            count: 4,
            data: &[1, 2, 3, 4],
        }
        .encode_into(&mut b);
        v.push((Command::DmaWrite, std::mem::take(&mut b)));
        WriteMulti {
            writes: vec![
                MultiWrite::new(0, 0, &[1]).unwrap(),
                MultiWrite::new(0, 8, &[2; 8]).unwrap(),
            ],
        }
        .encode_into(&mut b);
        v.push((Command::RegionWriteMulti, std::mem::take(&mut b)));
        MigData {
            argsz: 8 + 64,
            size: 64,
            data: &[],
        }
        .encode_into(&mut b);
        v.push((Command::MigDataRead, std::mem::take(&mut b)));
        MigData {
            argsz: 8,
            size: 3,
            data: &[7, 8, 9],
        }
        .encode_into(&mut b);
        v.push((Command::MigDataWrite, std::mem::take(&mut b)));
        crate::nested_iommu::IommuBind {
            vsid: 8,
            ste0: 0xb,
            ste1: 0,
        }
        .encode_into(&mut b);
        v.push((Command::NestioIommuBind, std::mem::take(&mut b)));
        crate::nested_iommu::IommuInvalidate::encode_into(&[[0x12; 16], [0x46; 16]], &mut b);
        v.push((Command::NestioIommuInvalidate, std::mem::take(&mut b)));
        crate::nested_iommu::IommuFault {
            lost_before: false,
            sequence: 1,
            record: [0x10; 32],
        }
        .encode_into(&mut b);
        v.push((Command::NestioIommuFault, std::mem::take(&mut b)));
        v
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        for (cmd, p) in valid_requests() {
            assert!(Request::decode(cmd as u16, &p).is_ok(), "{cmd:?} valid");
            for n in 0..p.len() {
                assert!(
                    Request::decode(cmd as u16, &p[..n]).is_err(),
                    "{cmd:?} truncated to {n}"
                );
            }
            let mut long = p.clone();
            long.push(0);
            assert!(
                Request::decode(cmd as u16, &long).is_err(),
                "{cmd:?} with a trailing byte"
            );
        }
    }
}
