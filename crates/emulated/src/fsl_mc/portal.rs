//! The MC portal command format: a 64-byte command, one little-endian header word and
//! seven parameter words (Linux `include/uapi/linux/fsl_mc.h` `struct fsl_mc_command`,
//! `include/linux/fsl/mc.h` `struct mc_cmd_header`, `enum mc_cmd_status`).
//!
//! Header (LE u64): `src_id` 7:0, `flags_hw` 15:8, `status` 23:16, `flags_sw` 31:24,
//! `token` 47:32, `cmd_id` 63:48 with `cmd_id = (id << 4) | version`. A driver writes the
//! parameters, then the header with status READY; the MC executes it and writes the
//! response parameters and the header with the final status (anything but READY).
//!
//! Every value here is built through a checked constructor and every parameter access
//! through [`Params`], which is bounds-checked by construction (offsets are constants
//! below 56). `tests/fsl_mc_linux.rs` checks these numbers against Linux's headers.
//!
//! A portal shared through memory (the container's own region memory, or a driver's
//! mapping of a region fd) is a `PortalMapping`: the eight command words are atomics,
//! written parameters first and header last (Release) and read header first (Acquire),
//! so whoever sees a header sees its parameters.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of one command (header + 7 parameters).
pub const COMMAND_SIZE: usize = 64;
/// Parameter words after the header (`MC_CMD_NUM_OF_PARAMS`).
pub const NUM_PARAMS: usize = 7;
/// Bytes of parameters.
pub const PARAMS_SIZE: usize = NUM_PARAMS * 8;
/// `MC_CMD_FLAG_PRI`, in `flags_hw`: high priority.
pub const FLAG_PRI: u8 = 0x80;
/// `MC_CMD_FLAG_INTR_DIS`, in `flags_sw`: no completion interrupt.
pub const FLAG_INTR_DIS: u8 = 0x01;

/// Errors decoding a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortalError {
    /// Not 64 bytes.
    #[error("an MC command is {COMMAND_SIZE} bytes, not {0}: write the parameters (offsets 8..64) then the header (offset 0)")]
    Size(usize),
    /// A command id out of range.
    #[error("command id {id:#x} version {version} does not fit (id < 0x1000, version < 16)")]
    CmdId {
        /// Id.
        id: u16,
        /// Version.
        version: u8,
    },
    /// An object type name that is not NUL-terminated printable ASCII.
    #[error("object type name is not a NUL-terminated lowercase ASCII name of at most 15 bytes")]
    TypeName,
}

/// `enum mc_cmd_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum McStatus {
    /// Completed successfully.
    Ok = 0x0,
    /// Ready to be processed (written by the driver).
    Ready = 0x1,
    /// Authentication error: the token is not open on this portal.
    AuthErr = 0x3,
    /// No privilege.
    NoPrivilege = 0x4,
    /// DMA or I/O error.
    DmaErr = 0x5,
    /// Configuration error (bad parameter, no such object).
    ConfigErr = 0x6,
    /// Timed out.
    Timeout = 0x7,
    /// No resources.
    NoResource = 0x8,
    /// No memory.
    NoMemory = 0x9,
    /// Busy.
    Busy = 0xA,
    /// Unsupported operation.
    UnsupportedOp = 0xB,
    /// Invalid state.
    InvalidState = 0xC,
}

impl McStatus {
    /// Every status with Linux's enumerator name.
    pub const ALL: [(McStatus, &'static str); 12] = [
        (McStatus::Ok, "MC_CMD_STATUS_OK"),
        (McStatus::Ready, "MC_CMD_STATUS_READY"),
        (McStatus::AuthErr, "MC_CMD_STATUS_AUTH_ERR"),
        (McStatus::NoPrivilege, "MC_CMD_STATUS_NO_PRIVILEGE"),
        (McStatus::DmaErr, "MC_CMD_STATUS_DMA_ERR"),
        (McStatus::ConfigErr, "MC_CMD_STATUS_CONFIG_ERR"),
        (McStatus::Timeout, "MC_CMD_STATUS_TIMEOUT"),
        (McStatus::NoResource, "MC_CMD_STATUS_NO_RESOURCE"),
        (McStatus::NoMemory, "MC_CMD_STATUS_NO_MEMORY"),
        (McStatus::Busy, "MC_CMD_STATUS_BUSY"),
        (McStatus::UnsupportedOp, "MC_CMD_STATUS_UNSUPPORTED_OP"),
        (McStatus::InvalidState, "MC_CMD_STATUS_INVALID_STATE"),
    ];

    /// The status of a raw byte, if it is one.
    pub fn from_u8(v: u8) -> Option<McStatus> {
        Self::ALL.iter().map(|(s, _)| *s).find(|s| *s as u8 == v)
    }
}

/// A command id: `(id << 4) | version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CmdId(u16);

impl CmdId {
    /// `id` (12 bits) at `version` (4 bits).
    pub const fn new(id: u16, version: u8) -> Result<CmdId, PortalError> {
        if id >= 0x1000 || version >= 16 {
            return Err(PortalError::CmdId { id, version });
        }
        Ok(CmdId((id << 4) | version as u16))
    }
    /// Version 1 of `id` (for constants; `id` must be below 0x1000).
    pub const fn v1(id: u16) -> CmdId {
        CmdId(((id & 0xfff) << 4) | 1)
    }
    /// Version `v` of `id` (for constants).
    pub const fn v(id: u16, v: u8) -> CmdId {
        CmdId(((id & 0xfff) << 4) | (v & 0xf) as u16)
    }
    /// The raw 16-bit field.
    pub const fn raw(self) -> u16 {
        self.0
    }
    /// From the raw field (every value is a valid id/version pair).
    pub const fn from_raw(raw: u16) -> CmdId {
        CmdId(raw)
    }
    /// The 12-bit command number.
    pub const fn id(self) -> u16 {
        self.0 >> 4
    }
    /// The 4-bit version.
    pub const fn version(self) -> u8 {
        (self.0 & 0xf) as u8
    }
}

/// `struct mc_cmd_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Source id.
    pub src_id: u8,
    /// Hardware flags ([`FLAG_PRI`]).
    pub flags_hw: u8,
    /// Raw status byte (see [`McStatus`]).
    pub status: u8,
    /// Software flags ([`FLAG_INTR_DIS`]).
    pub flags_sw: u8,
    /// Object token (0 for commands that need none).
    pub token: u16,
    /// Command id.
    pub cmd_id: CmdId,
}

impl Header {
    /// A command header as Linux's `mc_encode_cmd_header` builds it: status READY.
    pub fn command(cmd_id: CmdId, token: u16) -> Header {
        Header {
            src_id: 0,
            flags_hw: 0,
            status: McStatus::Ready as u8,
            flags_sw: 0,
            token,
            cmd_id,
        }
    }
    /// Decode the little-endian header word.
    pub fn decode(w: u64) -> Header {
        Header {
            src_id: w as u8,
            flags_hw: (w >> 8) as u8,
            status: (w >> 16) as u8,
            flags_sw: (w >> 24) as u8,
            token: (w >> 32) as u16,
            cmd_id: CmdId::from_raw((w >> 48) as u16),
        }
    }
    /// Encode the header word.
    pub fn encode(&self) -> u64 {
        self.src_id as u64
            | (self.flags_hw as u64) << 8
            | (self.status as u64) << 16
            | (self.flags_sw as u64) << 24
            | (self.token as u64) << 32
            | (self.cmd_id.raw() as u64) << 48
    }
    /// The status, if the byte is a known one.
    pub fn mc_status(&self) -> Option<McStatus> {
        McStatus::from_u8(self.status)
    }
}

/// The seven parameter words, accessed by byte offset as Linux's
/// `struct ..._cmd_...` / `_rsp_...` overlays do. Reads past the end give 0 and writes
/// past the end are dropped (offsets are constants below 56; this only keeps a typo from
/// panicking).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Params(pub [u64; NUM_PARAMS]);

impl Params {
    fn bytes(&self) -> [u8; PARAMS_SIZE] {
        let mut b = [0u8; PARAMS_SIZE];
        for (c, w) in b.chunks_exact_mut(8).zip(self.0) {
            c.copy_from_slice(&w.to_le_bytes());
        }
        b
    }
    fn set_bytes(&mut self, off: usize, v: &[u8]) {
        let mut b = self.bytes();
        let Some(end) = off.checked_add(v.len()).filter(|&e| e <= PARAMS_SIZE) else {
            return;
        };
        b[off..end].copy_from_slice(v);
        for (w, c) in self.0.iter_mut().zip(b.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            *w = u64::from_le_bytes(a);
        }
    }
    fn get<const N: usize>(&self, off: usize) -> [u8; N] {
        let b = self.bytes();
        let mut out = [0u8; N];
        if let Some(s) = off.checked_add(N).and_then(|e| b.get(off..e)) {
            out.copy_from_slice(s);
        }
        out
    }
    /// u8 at `off`.
    pub fn u8(&self, off: usize) -> u8 {
        self.get::<1>(off)[0]
    }
    /// LE u16 at `off`.
    pub fn u16(&self, off: usize) -> u16 {
        u16::from_le_bytes(self.get(off))
    }
    /// LE u32 at `off`.
    pub fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.get(off))
    }
    /// LE u64 at `off`.
    pub fn u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.get(off))
    }
    /// A 16-byte object type name at `off` (`u8 type[16]`): NUL-terminated lowercase
    /// ASCII, checked.
    pub fn type_name(&self, off: usize) -> Result<String, PortalError> {
        let raw: [u8; 16] = self.get(off);
        let len = raw
            .iter()
            .position(|&c| c == 0)
            .ok_or(PortalError::TypeName)?;
        let name = &raw[..len];
        if name
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
        {
            Ok(String::from_utf8_lossy(name).into_owned())
        } else {
            Err(PortalError::TypeName)
        }
    }
    /// Set a u8.
    pub fn set_u8(&mut self, off: usize, v: u8) {
        self.set_bytes(off, &[v]);
    }
    /// Set a LE u16.
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.set_bytes(off, &v.to_le_bytes());
    }
    /// Set a LE u32.
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.set_bytes(off, &v.to_le_bytes());
    }
    /// Set a LE u64.
    pub fn set_u64(&mut self, off: usize, v: u64) {
        self.set_bytes(off, &v.to_le_bytes());
    }
    /// Set a 16-byte type name (truncated to 15 bytes, NUL-padded).
    pub fn set_type_name(&mut self, off: usize, name: &str) {
        let mut raw = [0u8; 16];
        let n = name.len().min(15);
        raw[..n].copy_from_slice(&name.as_bytes()[..n]);
        self.set_bytes(off, &raw);
    }
}

/// One 64-byte command (or response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// Header.
    pub header: Header,
    /// Parameters.
    pub params: Params,
}

impl Command {
    /// A command to send: header with status READY.
    pub fn new(cmd_id: CmdId, token: u16, params: Params) -> Command {
        Command {
            header: Header::command(cmd_id, token),
            params,
        }
    }
    /// From the eight little-endian words of a portal.
    pub fn from_words(w: [u64; 8]) -> Command {
        let mut p = [0u64; NUM_PARAMS];
        p.copy_from_slice(&w[1..]);
        Command {
            header: Header::decode(w[0]),
            params: Params(p),
        }
    }
    /// The eight words.
    pub fn to_words(&self) -> [u64; 8] {
        let mut w = [0u64; 8];
        w[0] = self.header.encode();
        w[1..].copy_from_slice(&self.params.0);
        w
    }
    /// From exactly 64 bytes.
    pub fn from_bytes(b: &[u8]) -> Result<Command, PortalError> {
        if b.len() != COMMAND_SIZE {
            return Err(PortalError::Size(b.len()));
        }
        let mut w = [0u64; 8];
        for (w, c) in w.iter_mut().zip(b.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            *w = u64::from_le_bytes(a);
        }
        Ok(Command::from_words(w))
    }
    /// The 64 bytes.
    pub fn to_bytes(&self) -> [u8; COMMAND_SIZE] {
        let mut b = [0u8; COMMAND_SIZE];
        for (c, w) in b.chunks_exact_mut(8).zip(self.to_words()) {
            c.copy_from_slice(&w.to_le_bytes());
        }
        b
    }
}

/// A shared mapping of `len` bytes (page aligned, at least [`COMMAND_SIZE`]) of a file
/// at `offset`, holding an MC portal (see the module docs). Unmapped on drop.
pub(crate) struct PortalMapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory that other processes write concurrently anyway;
// this process touches it only through atomics (header and parameter words) and
// volatile byte copies, never through Rust references to plain bytes.
unsafe impl Send for PortalMapping {}
// SAFETY: as above.
unsafe impl Sync for PortalMapping {}

impl PortalMapping {
    /// Map `len` bytes of `fd` at `offset`, shared and read/write (EINVAL below
    /// [`COMMAND_SIZE`]: the command words must lie inside).
    pub(crate) fn new(fd: &OwnedFd, offset: u64, len: usize) -> std::io::Result<PortalMapping> {
        if len < COMMAND_SIZE {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a new shared mapping of `len` bytes of a file the caller lent us; the
        // result is checked, and unmapped exactly once in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(PortalMapping { ptr: p.cast(), len })
    }

    /// Command word `i` (0: the header).
    pub(crate) fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < 8, "portal word index");
        // SAFETY: the mapping is page aligned and at least 64 bytes long, so word `i`
        // (< 8) is an aligned u64 inside it that lives as long as `self`; AtomicU64
        // tolerates concurrent writers (guest, other processes).
        unsafe { &*(self.ptr.add(i * 8) as *const AtomicU64) }
    }

    /// The header word (Acquire: the parameters written before it are visible).
    pub(crate) fn header(&self) -> u64 {
        self.word(0).load(Ordering::Acquire)
    }

    /// The command whose header word is `header` (read with [`Self::header`]) and
    /// whose parameters are in the portal now.
    pub(crate) fn command(&self, header: u64) -> Command {
        let mut w = [0u64; 8];
        w[0] = header;
        for (i, x) in w.iter_mut().enumerate().skip(1) {
            *x = self.word(i).load(Ordering::Relaxed);
        }
        Command::from_words(w)
    }

    /// Store parameters (before the header that publishes them).
    pub(crate) fn store_params(&self, params: &Params) {
        for (i, v) in params.0.iter().enumerate() {
            self.word(i + 1).store(*v, Ordering::Relaxed);
        }
    }

    /// Read `buf.len()` bytes at `offset` (the caller checked `offset + len <= len`):
    /// an aligned command word atomically, anything else byte by byte.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) {
        let off = offset as usize;
        if buf.len() == 8 && off.is_multiple_of(8) && off < COMMAND_SIZE {
            buf.copy_from_slice(&self.word(off / 8).load(Ordering::Acquire).to_le_bytes());
            return;
        }
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: the caller checked offset + len <= self.len.
            *b = unsafe { std::ptr::read_volatile(self.ptr.add(off + i)) };
        }
    }

    /// Write `data` at `offset` (the caller checked `offset + len <= len`): an aligned
    /// command word atomically, anything else byte by byte.
    pub(crate) fn write(&self, offset: u64, data: &[u8]) {
        let off = offset as usize;
        if data.len() == 8 && off.is_multiple_of(8) && off < COMMAND_SIZE {
            let mut a = [0u8; 8];
            a.copy_from_slice(data);
            self.word(off / 8)
                .store(u64::from_le_bytes(a), Ordering::Release);
            return;
        }
        for (i, b) in data.iter().enumerate() {
            // SAFETY: the caller checked offset + len <= self.len.
            unsafe { std::ptr::write_volatile(self.ptr.add(off + i), *b) };
        }
    }
}

impl Drop for PortalMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_places_fields_as_linux() {
        let h = Header {
            src_id: 0x11,
            flags_hw: FLAG_PRI,
            status: 1,
            flags_sw: FLAG_INTR_DIS,
            token: 0xbeef,
            cmd_id: CmdId::new(0x805, 1).unwrap(),
        };
        let w = h.encode();
        assert_eq!(w, 0x8051_beef_0101_8011);
        assert_eq!(Header::decode(w), h);
        assert_eq!(h.cmd_id.id(), 0x805);
        assert_eq!(h.cmd_id.version(), 1);
        assert!(CmdId::new(0x1000, 1).is_err());
        assert!(CmdId::new(1, 16).is_err());
    }

    #[test]
    fn params_are_little_endian_overlays_and_checked() {
        let mut p = Params::default();
        p.set_u32(4, 0xaabb_ccdd);
        p.set_u16(8, 0x1957);
        p.set_type_name(24, "dpni");
        assert_eq!(p.0[0], 0xaabb_ccdd_0000_0000);
        assert_eq!(p.u16(8), 0x1957);
        assert_eq!(p.type_name(24).unwrap(), "dpni");
        assert_eq!(p.u64(60), 0, "past the end reads 0");
        p.set_u64(52, u64::MAX); // dropped, no panic
        let mut bad = Params::default();
        bad.set_bytes(24, &[b'x'; 16]);
        assert_eq!(bad.type_name(24), Err(PortalError::TypeName));
        bad.set_bytes(24, b"DP\0");
        assert_eq!(bad.type_name(24), Err(PortalError::TypeName));
        let c = Command::new(CmdId::v1(0x159), 7, p);
        assert_eq!(Command::from_bytes(&c.to_bytes()).unwrap(), c);
        assert_eq!(Command::from_bytes(&[0; 63]), Err(PortalError::Size(63)));
        assert_eq!(McStatus::from_u8(0xC), Some(McStatus::InvalidState));
        assert_eq!(McStatus::from_u8(2), None);
    }
}
