//! BAR channels between `nestio run` processes: how a channel is granted, carried down
//! level by level, used by the innermost level, and revoked (issue 12, item 5).
//!
//! [`crate::direct`] gives the innermost level one hop for BAR accesses when all levels
//! live in one process. Between processes the channel's fd must travel: the device
//! process opens it (it alone can serve it next to the device), every exporting level
//! passes it down, and the innermost `nestio run` wraps its device in [`ChannelBars`].
//!
//! # The grant: a nestio-private DEVICE_FEATURE on the export socket
//!
//! The fd rides on the vfio-user session each level already has with its parent (the
//! export socket; the RAM handoff on `PATH.mem` goes to any process of the uid, whereas
//! a BAR channel must go to the device's *owner* only, and end with its session). A
//! level asks with DEVICE_FEATURE index [`BAR_CHANNEL_FEATURE`] (outside the range Linux
//! numbers its VFIO features in):
//! - `PROBE | GET` (no data): answered without error when the parent can grant. Any
//!   server that does not know the feature answers ENOTTY (nestio's server, QEMU's and
//!   libvfio-user's do for unknown features), so an old parent — or a level started with
//!   `--bar-channel off` — just gives no channel, and an old child never asks.
//! - `GET` with room for [`MAX_GRANT_SIZE`] bytes: the reply's data is a [`GrantInfo`]
//!   and exactly one fd, the channel socket (a connected `AF_UNIX` `SOCK_STREAM`).
//!
//! [`GrantInfo`] wire form, little endian: `magic` "NESTIOBC" (8), `version` u32 (1),
//! `bar_mask` u8 (bit i: BAR i is carried; bits 6-7 zero), 3 reserved bytes (zero),
//! `levels` u32 (how many exporting levels the grant crossed), `count` u32 (≤
//! [`MAX_EXCLUSIONS`]), then `count` exclusions of 24 bytes: `bar` u32, reserved u32
//! (zero), `offset` u64, `len` u64 — page-aligned ranges of a carried BAR that the
//! channel refuses (EACCES) and that therefore stay on the mediated path.
//!
//! Who does what ([`ChannelGrants`], one per level, installed as the level's server
//! [`FeatureExtension`]):
//! - The **device process** ([`ChannelGrants::for_device`]) answers a GET by opening a
//!   fresh channel: a socketpair whose far end [`serve_bar_channel`] serves next to the
//!   device, restricted to the carried BARs minus the exclusions. It keeps a duplicate
//!   of the near end (for revocation) and the channel's [`BarChannelHandle`].
//! - An **exporting level** ([`ChannelGrants::from_parent`]) answers its child's GET by
//!   asking its own parent (one GET up the chain per grant), checks what comes back
//!   ([`Grant::from_reply`]: the data, exactly one fd, and that fd a connected UNIX
//!   stream socket), keeps a duplicate of the fd, adds itself to `levels` and hands the
//!   fd down in its reply. It never uses the channel.
//! - The **innermost level** (`nestio run` without `--export`) asks once at attach and
//!   again after each device reset it issues; with a grant from a parent at least one
//!   level up (`levels >= 1`) its device is a [`ChannelBars`].
//!
//! # Which BAR accesses may bypass the levels
//!
//! Only accesses to the BARs in `bar_mask` (memory or I/O BARs 0–5 that are readable or
//! writable) outside the exclusions, of 1..=[`MAX_ACCESS`] bytes. Excluded, and so
//! always mediated: the pages holding the MSI-X table and PBA (every level that wires
//! interrupts virtualises them — nestio's VMM serves them itself and programs vectors
//! with SET_IRQS —, and a raw access from below would bypass that). Never on the
//! channel: configuration space (it moves BARs, enables decoding, bus mastering and
//! interrupts), the ROM, interrupts (SET_IRQS), DMA maps, reset and migration — they
//! keep passing every level, which keeps mediating them. The device side enforces the
//! mask and the exclusions; the innermost level's routing only spares the round trip
//! of a refusal. A BAR being moved or its decoding turned off (configuration writes,
//! which every level sees) revokes nothing: a channel addresses a BAR by region index
//! and offset, which a move does not change, and the innermost VMM stops issuing
//! accesses to a BAR its guest no longer decodes (Linux sizes every BAR at probe;
//! revoking there would cost every guest its channel). A level that must see some
//! BAR's accesses itself (one that virtualises its contents) must not pass channels
//! down: the device side cannot know what it wants to see, and the innermost level is
//! not trusted to route around it.
//!
//! # Revocation
//!
//! Any level holding the channel's fd can revoke it, at any time, by
//! `shutdown(SHUT_WR)` on its duplicate (the socket is one object shared by every
//! process holding it). From then on the innermost level's sends fail (`EPIPE`), while
//! a request already sent is still read, executed and answered by the device side
//! before it sees the end of the stream. Since [`DirectBars`] sends one access and
//! waits for its answer before the next, each access is either answered on the channel
//! or refused at its send and never executed: [`ChannelBars`] then re-issues it on the
//! mediated path, which is ordered after every channel access. Nothing is lost and
//! nothing is done twice. That is why [`ChannelBars`] builds its [`DirectBars`] with
//! [`DirectBars::new_unposted`]: were channel writes posted, a fallback would first
//! have to wait for the channel's end-of-stream, or the mediated path could overtake
//! them. (The in-process `NestedStack`, whose channels nobody revokes, posts them.)
//!
//! A level revokes every grant it made: when its child's session ends (owner gone:
//! mandatory, a leaked fd must not outlive the session that was granted it), on a
//! DEVICE_RESET passing through it, and when the device leaves the RUNNING migration
//! state (grants are refused, EBUSY, until it is RUNNING again) — [`ChannelGate`], the
//! device wrapper each level serves, does that; `nestio run` also revokes on a test
//! trigger (`--bar-channel-test-revoke-at-set-irqs N`). The device process drops a
//! channel's handle (shutdown of both ends, thread joined) when its owner leaves. The
//! innermost level shuts a channel it replaces (a new grant after a reset) or drops.
//!
//! # Hostile peers
//!
//! A channel peer gets what [`crate::direct`]'s server allows (BARs only, bounds
//! checked by the device, fds refused, a malformed message ends the channel), minus the
//! exclusions (EACCES). The channel's server cannot be blocked by a peer that stops
//! reading: its replies time out after [`CHANNEL_SEND_TIMEOUT`] and end the channel. A
//! grant is checked field by field before its fd is used; every fd is owned from the
//! moment it arrives and closed on every error path. A level keeps at most
//! [`MAX_GRANTS`] grants: beyond, the oldest revoked ones (here or, seen by a zero-length
//! send failing with EPIPE, by another level) are released, and if none is
//! revoked a new GET is refused with EBUSY.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nestio_device_model::pci::MsixCap;
use nestio_device_model::{
    flags, pci_index, region_flags, DeviceError, DeviceInfo, Forwarding, IrqAction, IrqData,
    IrqInfo, MigState, RegionInfo, Result as DevResult, VfioDevice,
};
use nestio_vfio_user::proto::feature;
use nestio_vfio_user::{Client, FeatureExtension, FeatureReply};
use parking_lot::{Mutex, RwLock};

use crate::direct::{serve_bar_channel, BarChannelHandle, DirectBars, DirectError, MAX_ACCESS};

/// The DEVICE_FEATURE index of a BAR channel grant (nestio-private).
pub const BAR_CHANNEL_FEATURE: u16 = 0x4e43;
/// The first bytes of a [`GrantInfo`].
pub const GRANT_MAGIC: [u8; 8] = *b"NESTIOBC";
/// The [`GrantInfo`] version this code speaks.
pub const GRANT_VERSION: u32 = 1;
/// Most exclusions in one grant.
pub const MAX_EXCLUSIONS: usize = 4;
const GRANT_HEADER: usize = 24;
const EXCLUSION_SIZE: usize = 24;
/// Largest [`GrantInfo`] on the wire.
pub const MAX_GRANT_SIZE: usize = GRANT_HEADER + MAX_EXCLUSIONS * EXCLUSION_SIZE;
/// Most grants a level keeps (live and revoked).
pub const MAX_GRANTS: usize = 64;
/// How long the device side of a channel waits to send one answer.
pub const CHANNEL_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// Deepest `levels` a grant may claim.
const MAX_LEVELS: u32 = crate::level::MAX_DEPTH;
const PAGE: u64 = 4096;
/// Bits of the BARs 0-5.
const BAR_BITS: u8 = 0x3f;

/// Errors of granting, carrying and using BAR channels.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A grant that does not parse or breaks a rule.
    #[error(
        "malformed BAR channel grant: {0}; is the level above a nestio level of this version?"
    )]
    Malformed(String),
    /// The grant's fd is not a connected UNIX stream socket.
    #[error("the BAR channel grant carried a file that is not a UNIX stream socket ({0}); no channel is used")]
    BadFd(String),
    /// The device has nothing a channel can carry, or the channel cannot be opened.
    #[error(transparent)]
    Direct(#[from] DirectError),
    /// A socket call failed.
    #[error("BAR channel socket: {0} (out of fds?)")]
    Io(#[from] std::io::Error),
    /// The device could not be described.
    #[error("cannot describe the device for a BAR channel: {0}")]
    Device(#[source] DeviceError),
    /// The device is not a PCI device (BARs are a PCI notion).
    #[error("BAR channels are offered for PCI devices only (VFIO flags {0:#x})")]
    NotPci(u32),
}

/// A range of a BAR a channel refuses (EACCES): it stays on the mediated path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exclusion {
    bar: u32,
    offset: u64,
    len: u64,
}

impl Exclusion {
    /// Checked constructor: BAR 0..=5, non-empty, no wrap.
    pub fn new(bar: u32, offset: u64, len: u64) -> Result<Exclusion, ChannelError> {
        if bar >= pci_index::ROM || len == 0 || offset.checked_add(len).is_none() {
            return Err(ChannelError::Malformed(format!(
                "exclusion of {len:#x} bytes at {offset:#x} of BAR {bar}"
            )));
        }
        Ok(Exclusion { bar, offset, len })
    }
    /// The BAR.
    pub fn bar(&self) -> u32 {
        self.bar
    }
    /// First byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Length.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Never true (the constructor refuses empty ranges).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Does an access of `len` bytes at `offset` of region `bar` touch this range?
    pub fn overlaps(&self, bar: u32, offset: u64, len: u64) -> bool {
        bar == self.bar
            && offset < self.offset + self.len
            && self.offset < offset.saturating_add(len.max(1))
    }
}

/// What a grant carries: see the module documentation for the wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantInfo {
    bar_mask: u8,
    levels: u32,
    exclusions: Vec<Exclusion>,
}

impl GrantInfo {
    /// Checked constructor: a non-empty mask of BARs 0-5, at most [`MAX_EXCLUSIONS`]
    /// exclusions, each on a carried BAR, `levels` at most the deepest nesting.
    pub fn new(
        bar_mask: u8,
        levels: u32,
        exclusions: Vec<Exclusion>,
    ) -> Result<GrantInfo, ChannelError> {
        let bad = |m: String| Err(ChannelError::Malformed(m));
        if bar_mask == 0 || bar_mask & !BAR_BITS != 0 {
            return bad(format!("BAR mask {bar_mask:#x} (BARs 0-5, at least one)"));
        }
        if levels > MAX_LEVELS {
            return bad(format!("{levels} levels (at most {MAX_LEVELS})"));
        }
        if exclusions.len() > MAX_EXCLUSIONS {
            return bad(format!(
                "{} exclusions (at most {MAX_EXCLUSIONS})",
                exclusions.len()
            ));
        }
        if let Some(e) = exclusions.iter().find(|e| bar_mask & (1 << e.bar) == 0) {
            return bad(format!("exclusion on BAR {}, which is not carried", e.bar));
        }
        Ok(GrantInfo {
            bar_mask,
            levels,
            exclusions,
        })
    }
    /// Bit i: BAR i is carried.
    pub fn bar_mask(&self) -> u8 {
        self.bar_mask
    }
    /// Exporting levels the grant crossed (0: straight from the device process).
    pub fn levels(&self) -> u32 {
        self.levels
    }
    /// Ranges the channel refuses.
    pub fn exclusions(&self) -> &[Exclusion] {
        &self.exclusions
    }
    /// May an access of `len` bytes at `offset` of `region` go over the channel?
    pub fn carries(&self, region: u32, offset: u64, len: usize) -> bool {
        region < pci_index::ROM
            && self.bar_mask & (1 << region) != 0
            && (1..=MAX_ACCESS).contains(&len)
            && !self
                .exclusions
                .iter()
                .any(|e| e.overlaps(region, offset, len as u64))
    }
    /// The same grant one exporting level further down.
    pub fn passed_down(&self) -> Result<GrantInfo, ChannelError> {
        let levels = self
            .levels
            .checked_add(1)
            .ok_or_else(|| ChannelError::Malformed("level count overflows".into()))?;
        GrantInfo::new(self.bar_mask, levels, self.exclusions.clone())
    }
    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(GRANT_HEADER + self.exclusions.len() * EXCLUSION_SIZE);
        b.extend_from_slice(&GRANT_MAGIC);
        b.extend_from_slice(&GRANT_VERSION.to_le_bytes());
        b.extend_from_slice(&[self.bar_mask, 0, 0, 0]);
        b.extend_from_slice(&self.levels.to_le_bytes());
        b.extend_from_slice(&(self.exclusions.len() as u32).to_le_bytes());
        for e in &self.exclusions {
            b.extend_from_slice(&e.bar.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&e.offset.to_le_bytes());
            b.extend_from_slice(&e.len.to_le_bytes());
        }
        b
    }
    /// Parse and check the wire form (exactly its length, nothing after it).
    pub fn decode(b: &[u8]) -> Result<GrantInfo, ChannelError> {
        let bad = |m: String| ChannelError::Malformed(m);
        let u32_at = |i: usize| -> u32 {
            let mut w = [0u8; 4];
            w.copy_from_slice(&b[i..i + 4]);
            u32::from_le_bytes(w)
        };
        let u64_at = |i: usize| -> u64 {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        if b.len() < GRANT_HEADER {
            return Err(bad(format!("{} bytes, at least {GRANT_HEADER}", b.len())));
        }
        if b[0..8] != GRANT_MAGIC {
            return Err(bad("wrong magic".into()));
        }
        let version = u32_at(8);
        if version != GRANT_VERSION {
            return Err(bad(format!(
                "version {version}, this level speaks {GRANT_VERSION}"
            )));
        }
        if b[13..16] != [0, 0, 0] {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let count = u32_at(20) as usize;
        if count > MAX_EXCLUSIONS {
            return Err(bad(format!(
                "{count} exclusions (at most {MAX_EXCLUSIONS})"
            )));
        }
        let want = GRANT_HEADER + count * EXCLUSION_SIZE;
        if b.len() != want {
            return Err(bad(format!(
                "{} bytes for {count} exclusions, expected {want}",
                b.len()
            )));
        }
        let mut exclusions = Vec::with_capacity(count);
        for i in 0..count {
            let at = GRANT_HEADER + i * EXCLUSION_SIZE;
            if u32_at(at + 4) != 0 {
                return Err(bad("reserved exclusion field is not zero".into()));
            }
            exclusions.push(Exclusion::new(u32_at(at), u64_at(at + 8), u64_at(at + 16))?);
        }
        GrantInfo::new(b[12], u32_at(16), exclusions)
    }
}

/// The fd must be a connected UNIX stream socket: anything else (a file, a pipe, a
/// datagram socket, a listening socket) is refused before it is used.
fn check_channel_fd(fd: &OwnedFd) -> Result<(), ChannelError> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a live local the kernel writes.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(ChannelError::BadFd(format!(
            "fstat: {}",
            std::io::Error::last_os_error()
        )));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(ChannelError::BadFd(format!(
            "file mode {:#o}",
            st.st_mode & libc::S_IFMT
        )));
    }
    let opt = |name: libc::c_int| -> Result<libc::c_int, ChannelError> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket fd; `v` and `len` are live locals of the sizes given.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(ChannelError::BadFd(format!(
                "getsockopt: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(v)
    };
    let (domain, ty, listening) = (
        opt(libc::SO_DOMAIN)?,
        opt(libc::SO_TYPE)?,
        opt(libc::SO_ACCEPTCONN)?,
    );
    if domain != libc::AF_UNIX || ty != libc::SOCK_STREAM || listening != 0 {
        return Err(ChannelError::BadFd(format!(
            "domain {domain}, type {ty}, listening {listening}"
        )));
    }
    Ok(())
}

/// A grant as received: what it carries and the channel's socket.
#[derive(Debug)]
pub struct Grant {
    info: GrantInfo,
    sock: UnixStream,
}

impl Grant {
    /// Check a GET reply's data and fds (all owned already; closed on error).
    pub fn from_reply(data: &[u8], mut fds: Vec<OwnedFd>) -> Result<Grant, ChannelError> {
        let info = GrantInfo::decode(data)?;
        if fds.len() != 1 {
            return Err(ChannelError::Malformed(format!(
                "{} file descriptors, expected 1",
                fds.len()
            )));
        }
        let fd = fds.remove(0);
        check_channel_fd(&fd)?;
        Ok(Grant {
            info,
            sock: UnixStream::from(fd),
        })
    }
    /// What the grant carries.
    pub fn info(&self) -> &GrantInfo {
        &self.info
    }
    /// The parts.
    pub fn into_parts(self) -> (GrantInfo, UnixStream) {
        (self.info, self.sock)
    }
}

/// Ask the level above (`parent`) for a BAR channel. `Ok(None)`: it offers none (an
/// old parent or one without channels answers the probe with an error; a parent that
/// refuses the GET, e.g. EBUSY while migrating, is logged).
pub fn request_grant(parent: &Client) -> Result<Option<Grant>, ChannelError> {
    let refused = |e: DeviceError| -> Result<Option<Grant>, ChannelError> {
        match e {
            DeviceError::Remote { errno, .. } => {
                tracing::debug!(errno, "the level above offers no BAR channel");
                Ok(None)
            }
            e => Err(ChannelError::Device(e)),
        }
    };
    if let Err(e) =
        parent.device_feature(BAR_CHANNEL_FEATURE, feature::PROBE | feature::GET, &[], 0)
    {
        return refused(e);
    }
    match parent.device_feature(BAR_CHANNEL_FEATURE, feature::GET, &[], MAX_GRANT_SIZE) {
        Ok((data, fds)) => Grant::from_reply(&data, fds).map(Some),
        Err(e) => refused(e),
    }
}

/// BARs 0-5 that exist and are readable or writable.
fn bar_mask(dev: &dyn VfioDevice) -> Result<u8, ChannelError> {
    let mut mask = 0u8;
    for index in pci_index::BAR0..pci_index::ROM {
        match dev.region_info(index) {
            Ok(i) if i.size != 0 && i.flags & (region_flags::READ | region_flags::WRITE) != 0 => {
                mask |= 1 << index
            }
            Ok(_) | Err(DeviceError::NoSuchRegion(_)) => {}
            Err(e) => return Err(ChannelError::Device(e)),
        }
    }
    if mask == 0 {
        return Err(DirectError::NoBars.into());
    }
    Ok(mask)
}

/// The pages of the MSI-X table and PBA, from the device's configuration space (none
/// without an MSI-X capability; a malformed one excludes nothing and is logged, since
/// then no level can wire MSI-X either).
fn msix_exclusions(dev: &dyn VfioDevice) -> Result<Vec<Exclusion>, ChannelError> {
    let mut cfg = [0u8; 256];
    dev.region_read(pci_index::CONFIG, 0, &mut cfg)
        .map_err(ChannelError::Device)?;
    let rd32 = |o: usize| u32::from_le_bytes([cfg[o], cfg[o + 1], cfg[o + 2], cfg[o + 3]]);
    if cfg[6] & 0x10 == 0 {
        return Ok(Vec::new());
    }
    let mut ptr = usize::from(cfg[0x34] & !3);
    // At most 48 capabilities fit in 192 bytes: a longer (looping) list is garbage.
    for _ in 0..48 {
        if ptr < 0x40 || ptr + 12 > cfg.len() {
            break;
        }
        if cfg[ptr] == 0x11 {
            let ctrl = u16::from_le_bytes([cfg[ptr + 2], cfg[ptr + 3]]);
            let m = match MsixCap::from_registers(ptr, ctrl, rd32(ptr + 4), rd32(ptr + 8)) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "MSI-X capability unusable; nothing excluded");
                    return Ok(Vec::new());
                }
            };
            let page = |bar: usize, off: u64, len: u64| -> Result<Exclusion, ChannelError> {
                let start = off & !(PAGE - 1);
                let end = off
                    .checked_add(len)
                    .and_then(|e| e.checked_next_multiple_of(PAGE))
                    .ok_or_else(|| ChannelError::Malformed("MSI-X range wraps".into()))?;
                Exclusion::new(bar as u32, start, end - start)
            };
            return Ok(vec![
                page(m.table_bar(), m.table_offset(), m.table_len())?,
                page(m.pba_bar(), m.pba_offset(), m.pba_len())?,
            ]);
        }
        ptr = usize::from(cfg[ptr + 1] & !3);
    }
    Ok(Vec::new())
}

/// The device as a channel's server sees it: the carried BARs minus the exclusions
/// (EACCES), nothing else.
struct Excluding {
    dev: Arc<dyn VfioDevice>,
    exclusions: Vec<Exclusion>,
}

impl Excluding {
    fn check(&self, index: u32, offset: u64, len: usize) -> DevResult<()> {
        if self
            .exclusions
            .iter()
            .any(|e| e.overlaps(index, offset, len as u64))
        {
            return Err(DeviceError::Io(std::io::Error::from_raw_os_error(
                libc::EACCES,
            )));
        }
        Ok(())
    }
}

impl VfioDevice for Excluding {
    fn info(&self) -> DeviceInfo {
        self.dev.info()
    }
    fn region_info(&self, index: u32) -> DevResult<RegionInfo> {
        self.dev.region_info(index)
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.check(index, offset, buf.len())?;
        self.dev.region_read(index, offset, buf)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> DevResult<()> {
        self.check(index, offset, data.len())?;
        self.dev.region_write(index, offset, data)
    }
    fn irq_info(&self, _index: u32) -> DevResult<IrqInfo> {
        Err(DeviceError::Unsupported("not over a BAR channel".into()))
    }
    fn set_irqs(&self, _: u32, _: IrqAction, _: u32, _: u32, _: IrqData) -> DevResult<()> {
        Err(DeviceError::Unsupported("not over a BAR channel".into()))
    }
}

/// Where a level's grants come from.
enum Source {
    /// The device is here: open channels to it.
    Device {
        dev: Arc<dyn VfioDevice>,
        mask: u8,
        exclusions: Vec<Exclusion>,
    },
    /// The level above (its client): ask it for each grant.
    Parent(Arc<Client>),
}

/// One grant a level made.
struct Live {
    /// A duplicate of the channel's near end: `shutdown(SHUT_WR)` on it revokes.
    near: UnixStream,
    /// The channel's server (device process only), held for its drop: the far end
    /// shut down and the serving thread joined.
    _handle: Option<BarChannelHandle>,
    revoked: bool,
}

impl Live {
    /// Has another holder revoked the channel (`shutdown(SHUT_WR)` on the shared
    /// socket)? A zero-length send transmits nothing and fails with EPIPE exactly then.
    fn shut_elsewhere(&self) -> bool {
        // SAFETY: a zero-length send on a valid socket reads no memory (the pointer is
        // never dereferenced for length 0) and does not block (MSG_DONTWAIT).
        let r = unsafe {
            libc::send(
                self.near.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPIPE)
    }

    fn revoke(&mut self) -> bool {
        if std::mem::replace(&mut self.revoked, true) {
            return false;
        }
        if let Err(e) = self.near.shutdown(std::net::Shutdown::Write) {
            tracing::debug!(error = %e, "BAR channel already closed");
        }
        true
    }
}

#[derive(Default)]
struct GrantState {
    grants: VecDeque<Live>,
    /// Why grants are refused now (migration in progress).
    blocked: Option<&'static str>,
}

/// Counters of a level's grants.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GrantStats {
    /// Grants handed to the child.
    pub granted: u64,
    /// Grants revoked.
    pub revoked: u64,
    /// GETs refused (blocked, full, the parent had none, a bad grant from above).
    pub refused: u64,
}

/// A level's BAR channel grants: made on its child's GET (the server extension),
/// revoked by [`ChannelGrants::revoke_all`]. See the module documentation.
pub struct ChannelGrants {
    source: Source,
    state: Mutex<GrantState>,
    granted: AtomicU64,
    revoked: AtomicU64,
    refused: AtomicU64,
}

impl ChannelGrants {
    /// Grants for the device `dev` in this process (the device process): BARs 0-5 that
    /// are readable or writable, minus the MSI-X table and PBA pages. PCI devices only.
    pub fn for_device(dev: Arc<dyn VfioDevice>) -> Result<Arc<ChannelGrants>, ChannelError> {
        let f = dev.info().flags;
        if f & flags::PCI == 0 {
            return Err(ChannelError::NotPci(f));
        }
        let mask = bar_mask(dev.as_ref())?;
        let exclusions = msix_exclusions(dev.as_ref())?;
        // The exclusions must sit on carried BARs (else the grant would not encode).
        GrantInfo::new(mask, 0, exclusions.clone())?;
        Ok(Arc::new(ChannelGrants::with_source(Source::Device {
            dev,
            mask,
            exclusions,
        })))
    }

    /// Grants passed on from the level above, reached through `parent`.
    pub fn from_parent(parent: Arc<Client>) -> Arc<ChannelGrants> {
        Arc::new(ChannelGrants::with_source(Source::Parent(parent)))
    }

    fn with_source(source: Source) -> ChannelGrants {
        ChannelGrants {
            source,
            state: Mutex::new(GrantState::default()),
            granted: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Counters.
    pub fn stats(&self) -> GrantStats {
        GrantStats {
            granted: self.granted.load(Ordering::Relaxed),
            revoked: self.revoked.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Grants not revoked yet.
    pub fn live(&self) -> usize {
        self.state
            .lock()
            .grants
            .iter()
            .filter(|g| !g.revoked)
            .count()
    }

    /// A new grant for the child, or the errno to refuse it with.
    pub fn grant(&self) -> Result<Grant, i32> {
        let r = self.try_grant();
        if r.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn try_grant(&self) -> Result<Grant, i32> {
        {
            let mut st = self.state.lock();
            if let Some(why) = st.blocked {
                tracing::info!(why, "BAR channel refused for now");
                return Err(libc::EBUSY);
            }
            if st.grants.len() >= MAX_GRANTS {
                // Grants another level revoked count as revoked here too.
                for g in st.grants.iter_mut().filter(|g| !g.revoked) {
                    g.revoked = g.shut_elsewhere();
                }
                // Release the oldest revoked grant (long drained by now), if any.
                match st.grants.iter().position(|g| g.revoked) {
                    Some(i) => drop(st.grants.remove(i)),
                    None => return Err(libc::EBUSY),
                }
            }
        }
        let (info, sock, handle) = match &self.source {
            Source::Device {
                dev,
                mask,
                exclusions,
            } => {
                let io = |e: std::io::Error| {
                    tracing::warn!(error = %e, "cannot open a BAR channel");
                    e.raw_os_error().unwrap_or(libc::EIO)
                };
                let (near, far) = UnixStream::pair().map_err(io)?;
                far.set_write_timeout(Some(CHANNEL_SEND_TIMEOUT))
                    .map_err(io)?;
                let served: Arc<dyn VfioDevice> = Arc::new(Excluding {
                    dev: dev.clone(),
                    exclusions: exclusions.clone(),
                });
                let handle = serve_bar_channel(served, *mask, far).map_err(|e| {
                    tracing::warn!(error = %e, "cannot serve a BAR channel");
                    libc::EAGAIN
                })?;
                let info = GrantInfo::new(*mask, 0, exclusions.clone()).map_err(|e| {
                    tracing::warn!(error = %e, "BAR channel grant");
                    libc::EINVAL
                })?;
                (info, near, Some(handle))
            }
            Source::Parent(parent) => {
                let g = match request_grant(parent) {
                    Ok(Some(g)) => g,
                    Ok(None) => return Err(libc::ENOTTY),
                    Err(e) => {
                        tracing::warn!(error = %e, "no BAR channel from the level above");
                        return Err(libc::EIO);
                    }
                };
                let (info, sock) = g.into_parts();
                let info = info.passed_down().map_err(|_| libc::EINVAL)?;
                (info, sock, None)
            }
        };
        let near = sock.try_clone().map_err(|e| {
            tracing::warn!(error = %e, "cannot keep a BAR channel's revocation fd");
            e.raw_os_error().unwrap_or(libc::EMFILE)
        })?;
        let mut st = self.state.lock();
        if let Some(why) = st.blocked {
            // Blocked while the grant was being made: it never leaves.
            tracing::info!(why, "BAR channel refused for now");
            let _ = near.shutdown(std::net::Shutdown::Both);
            return Err(libc::EBUSY);
        }
        st.grants.push_back(Live {
            near,
            _handle: handle,
            revoked: false,
        });
        self.granted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            levels = info.levels(),
            bars = format!("{:#04x}", info.bar_mask()),
            "BAR channel granted to the level below"
        );
        Ok(Grant { info, sock })
    }

    /// Revoke every grant this level made (see the module documentation: answered
    /// accesses stay answered, later ones fall back to the mediated path). Returns how
    /// many were live.
    pub fn revoke_all(&self, why: &str) -> usize {
        let mut st = self.state.lock();
        let n = st
            .grants
            .iter_mut()
            .map(Live::revoke)
            .filter(|r| *r)
            .count();
        drop(st);
        if n > 0 {
            self.revoked.fetch_add(n as u64, Ordering::Relaxed);
            tracing::info!(why, channels = n, "BAR channels revoked");
        }
        n
    }

    /// Refuse new grants (`why`) and revoke the live ones, until [`ChannelGrants::unblock`].
    pub fn block(&self, why: &'static str) {
        self.state.lock().blocked = Some(why);
        self.revoke_all(why);
    }

    /// Grant again.
    pub fn unblock(&self) {
        self.state.lock().blocked = None;
    }

    /// The owner's session ended: revoke everything and release the channels' servers.
    fn release_all(&self) {
        self.revoke_all("the session that was granted them ended");
        let gone: Vec<Live> = self.state.lock().grants.drain(..).collect();
        // Handles are dropped (sockets shut, threads joined) outside the lock.
        drop(gone);
    }
}

impl Drop for ChannelGrants {
    fn drop(&mut self) {
        self.release_all();
    }
}

impl FeatureExtension for ChannelGrants {
    fn feature(
        &self,
        index: u16,
        flags: u32,
        data: &[u8],
        room: usize,
    ) -> Option<Result<FeatureReply, i32>> {
        if index != BAR_CHANNEL_FEATURE {
            return None;
        }
        Some((|| {
            if flags & feature::SET != 0 || !data.is_empty() {
                return Err(libc::EINVAL);
            }
            if flags & feature::PROBE != 0 {
                return Ok(FeatureReply::default());
            }
            if flags & feature::GET == 0 || room < 8 + MAX_GRANT_SIZE {
                return Err(libc::EINVAL);
            }
            let (info, sock) = self.grant()?.into_parts();
            Ok(FeatureReply {
                data: info.encode(),
                fds: vec![OwnedFd::from(sock)],
            })
        })())
    }

    fn owner_left(&self) {
        self.release_all();
    }
}

/// Counters of a [`ChannelGate`]: what crossed this level.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GateStats {
    /// BAR (regions 0-5) reads and writes that came through this level.
    pub bar_accesses: u64,
    /// Configuration-space reads and writes.
    pub config_accesses: u64,
    /// SET_IRQS.
    pub set_irqs: u64,
}

/// The device a level serves to its child, wrapped so that the level's grants follow
/// the device's life: a DEVICE_RESET revokes them (before it is forwarded), leaving
/// RUNNING for a migration state revokes them and refuses new ones until RUNNING again.
/// Also counts what crosses the level ([`GateStats`]). Everything is forwarded.
pub struct ChannelGate {
    inner: Arc<dyn VfioDevice>,
    grants: Arc<ChannelGrants>,
    bar: AtomicU64,
    config: AtomicU64,
    irqs: AtomicU64,
    /// Test trigger: revoke at the n-th SET_IRQS (0: never).
    revoke_at_set_irqs: AtomicU64,
}

impl ChannelGate {
    /// Wrap `inner`, whose channels `grants` hands out.
    pub fn new(inner: Arc<dyn VfioDevice>, grants: Arc<ChannelGrants>) -> ChannelGate {
        ChannelGate {
            inner,
            grants,
            bar: AtomicU64::new(0),
            config: AtomicU64::new(0),
            irqs: AtomicU64::new(0),
            revoke_at_set_irqs: AtomicU64::new(0),
        }
    }
    /// The grants.
    pub fn grants(&self) -> &Arc<ChannelGrants> {
        &self.grants
    }
    /// Revoke every grant when the child's `n`-th SET_IRQS arrives (a deterministic
    /// point in a guest's life for tests of the fallback; 0 turns it off).
    pub fn revoke_at_set_irqs(&self, n: u64) {
        self.revoke_at_set_irqs.store(n, Ordering::Relaxed);
    }
    /// Counters.
    pub fn stats(&self) -> GateStats {
        GateStats {
            bar_accesses: self.bar.load(Ordering::Relaxed),
            config_accesses: self.config.load(Ordering::Relaxed),
            set_irqs: self.irqs.load(Ordering::Relaxed),
        }
    }
    fn count(&self, index: u32) {
        if index < pci_index::ROM {
            self.bar.fetch_add(1, Ordering::Relaxed);
        } else if index == pci_index::CONFIG {
            self.config.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Forwarding for ChannelGate {
    fn forward_to(&self) -> &dyn VfioDevice {
        &*self.inner
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.count(index);
        self.inner.region_read(index, offset, buf)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> DevResult<()> {
        self.count(index);
        self.inner.region_write(index, offset, data)
    }
    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> DevResult<()> {
        let n = self.irqs.fetch_add(1, Ordering::Relaxed) + 1;
        if self.revoke_at_set_irqs.load(Ordering::Relaxed) == n {
            self.grants
                .revoke_all("test trigger: SET_IRQS count reached");
        }
        self.inner.set_irqs(index, action, start, count, data)
    }
    fn reset(&self) -> DevResult<()> {
        self.grants.revoke_all("device reset");
        self.inner.reset()
    }
    fn mig_set_state(&self, target: MigState) -> DevResult<MigState> {
        if target != MigState::Running {
            self.grants.block("device migration in progress");
        }
        let r = self.inner.mig_set_state(target);
        if target == MigState::Running && r.is_ok() {
            self.grants.unblock();
        }
        r
    }
}
nestio_device_model::impl_vfio_device_by_forwarding!(ChannelGate);

/// How [`ChannelBars`] asks for a new grant after a reset (the level above, through the
/// mediated session).
pub type Regrant = Box<dyn Fn() -> Result<Option<Grant>, ChannelError> + Send + Sync>;

/// Counters of a [`ChannelBars`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChannelBarsStats {
    /// BAR accesses answered over the channel.
    pub channel: u64,
    /// BAR accesses on the mediated path (no channel, excluded, or after a revocation).
    pub mediated: u64,
    /// Accesses that found the channel revoked and were re-issued on the mediated path.
    pub fallbacks: u64,
    /// Grants installed (the first and those after resets).
    pub grants: u64,
}

/// The innermost level's device with a BAR channel: carried BAR accesses over the
/// channel ([`DirectBars`]), everything else — and everything once the channel is
/// revoked — through `inner`, the mediated session. See the module documentation.
pub struct ChannelBars {
    inner: Arc<dyn VfioDevice>,
    chan: RwLock<Option<(Arc<DirectBars>, GrantInfo)>>,
    /// A duplicate of the channel in use: shut when it is replaced or this device is
    /// dropped, so the device side's server ends and every level sees it revoked.
    chan_fd: Mutex<Option<UnixStream>>,
    regrant: Option<Regrant>,
    channel: AtomicU64,
    mediated: AtomicU64,
    fallbacks: AtomicU64,
    grants: AtomicU64,
}

impl ChannelBars {
    /// `inner` (the mediated device) with `grant`'s channel; `regrant` asks for a new
    /// one after a reset this level issues.
    pub fn new(
        inner: Arc<dyn VfioDevice>,
        grant: Grant,
        regrant: Option<Regrant>,
    ) -> Result<ChannelBars, ChannelError> {
        let b = ChannelBars {
            inner,
            chan: RwLock::new(None),
            chan_fd: Mutex::new(None),
            regrant,
            channel: AtomicU64::new(0),
            mediated: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            grants: AtomicU64::new(0),
        };
        b.install(grant)?;
        Ok(b)
    }

    fn install(&self, grant: Grant) -> Result<(), ChannelError> {
        let (info, sock) = grant.into_parts();
        let dup = sock.try_clone()?;
        // Unposted: see the module documentation's revocation rule.
        let direct = DirectBars::new_unposted(self.inner.clone(), sock)?;
        *self.chan.write() = Some((Arc::new(direct), info));
        if let Some(old) = self.chan_fd.lock().replace(dup) {
            let _ = old.shutdown(std::net::Shutdown::Write);
        }
        self.grants.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Counters.
    pub fn stats(&self) -> ChannelBarsStats {
        ChannelBarsStats {
            channel: self.channel.load(Ordering::Relaxed),
            mediated: self.mediated.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            grants: self.grants.load(Ordering::Relaxed),
        }
    }

    /// Is a channel in use now?
    pub fn has_channel(&self) -> bool {
        self.chan.read().is_some()
    }

    /// The mediated device underneath.
    pub fn inner(&self) -> &Arc<dyn VfioDevice> {
        &self.inner
    }

    /// The channel for an access, if it carries it.
    fn route(&self, index: u32, offset: u64, len: usize) -> Option<Arc<DirectBars>> {
        let c = self.chan.read();
        let (d, info) = c.as_ref()?;
        info.carries(index, offset, len).then(|| d.clone())
    }

    /// One BAR access `op`: over the channel when it carries the range, else (or when
    /// the channel was revoked under it: not executed there) on the mediated path.
    fn access(
        &self,
        index: u32,
        offset: u64,
        len: usize,
        mut op: impl FnMut(&dyn VfioDevice) -> DevResult<()>,
    ) -> DevResult<()> {
        if let Some(d) = self.route(index, offset, len) {
            match op(&*d) {
                Ok(()) => {
                    self.channel.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    self.channel_failed(&d, e)?;
                }
            }
        }
        if index < pci_index::ROM {
            self.mediated.fetch_add(1, Ordering::Relaxed);
        }
        op(&*self.inner)
    }

    /// An access over `d` failed: a revoked or lost channel is dropped (the access was
    /// not executed and is re-issued mediated: `Ok(true)`); the device's own refusal is
    /// the access's result.
    fn channel_failed(&self, d: &Arc<DirectBars>, e: DeviceError) -> DevResult<bool> {
        match e {
            DeviceError::Disconnected(why) => {
                let mut c = self.chan.write();
                if c.as_ref().is_some_and(|(cur, _)| Arc::ptr_eq(cur, d)) {
                    *c = None;
                    tracing::info!(
                        why,
                        "BAR channel revoked; BAR accesses take the mediated path"
                    );
                }
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            e => Err(e),
        }
    }
}

impl Drop for ChannelBars {
    fn drop(&mut self) {
        if let Some(c) = self.chan_fd.get_mut().take() {
            let _ = c.shutdown(std::net::Shutdown::Write);
        }
    }
}

impl Forwarding for ChannelBars {
    fn forward_to(&self) -> &dyn VfioDevice {
        &*self.inner
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.access(index, offset, buf.len(), |dev| {
            dev.region_read(index, offset, buf)
        })
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> DevResult<()> {
        self.access(index, offset, data.len(), |dev| {
            dev.region_write(index, offset, data)
        })
    }
    fn reset(&self) -> DevResult<()> {
        // Every level revokes its grants on the way down; ask again afterwards.
        self.inner.reset()?;
        if let Some(ask) = &self.regrant {
            match ask() {
                Ok(Some(g)) => {
                    if let Err(e) = self.install(g) {
                        tracing::warn!(error = %e, "BAR channel after reset unusable");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "no BAR channel after reset"),
            }
        }
        Ok(())
    }
}
nestio_device_model::impl_vfio_device_by_forwarding!(ChannelBars);

/// The fuzz target's entry point (`fuzz/fuzz_targets/bar_channel.rs`). The first byte
/// picks what is hostile:
/// - bit 7 clear: a grant as a level receives it — the rest as a [`GrantInfo`], with
///   0..2 fds of bits 0-3's choosing (a UNIX stream socket, a datagram socket, an
///   eventfd), through [`Grant::from_reply`]; an accepted grant must round-trip and
///   route nothing to an exclusion, configuration space or an oversized access.
/// - bit 7 set: a channel peer — a grant from [`ChannelGrants::for_device`] over a small
///   PCI device with an MSI-X table and PBA page in BAR 0, the rest written raw into the
///   channel, its answers read until the end; the device must never see an access to
///   the excluded page, and the grants must release (thread joined) without hanging.
///
/// Never panics, never leaks an fd.
#[cfg(feature = "harness")]
pub fn fuzz_bar_channel(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    if sel & 0x80 != 0 {
        fuzz_channel_peer(rest);
    } else {
        fuzz_grant(sel, rest);
    }
}

#[cfg(feature = "harness")]
fn fuzz_grant(sel: u8, rest: &[u8]) {
    use std::os::fd::FromRawFd;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for kind in [sel & 3, (sel >> 2) & 3] {
        match kind {
            1 => {
                if let Ok((a, _b)) = UnixStream::pair() {
                    fds.push(a.into());
                }
            }
            2 => {
                if let Ok((a, _b)) = std::os::unix::net::UnixDatagram::pair() {
                    fds.push(a.into());
                }
            }
            3 => {
                // SAFETY: eventfd takes no pointers; the result is checked.
                let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
                if raw >= 0 {
                    // SAFETY: a new descriptor owned by nothing else.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            _ => {}
        }
    }
    let decoded = GrantInfo::decode(rest);
    if let Ok(info) = &decoded {
        assert_eq!(GrantInfo::decode(&info.encode()).ok().as_ref(), Some(info));
        assert!(info.bar_mask() != 0 && info.bar_mask() & !BAR_BITS == 0);
        for e in info.exclusions() {
            assert!(!info.carries(e.bar(), e.offset(), 1));
            assert!(!info.carries(e.bar(), e.offset() + e.len() - 1, 1));
        }
        assert!(!info.carries(pci_index::CONFIG, 0, 4));
        assert!(!info.carries(0, 0, 0) && !info.carries(0, 0, MAX_ACCESS + 1));
    }
    if let Ok(g) = Grant::from_reply(rest, fds) {
        assert_eq!(Some(g.info()), decoded.as_ref().ok());
        let kinds = [sel & 3, (sel >> 2) & 3];
        assert!(kinds.contains(&1), "only a stream socket is accepted");
        assert_ne!(g.sock.as_raw_fd(), -1);
    }
}

/// BAR 0 (8 KiB) of scratch with the MSI-X table and PBA on its second page.
#[cfg(feature = "harness")]
struct FuzzDevice {
    bar: Mutex<Vec<u8>>,
    touched_msix: std::sync::atomic::AtomicBool,
}

#[cfg(feature = "harness")]
impl VfioDevice for FuzzDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: flags::PCI,
            num_regions: pci_index::NUM_REGIONS,
            num_irqs: 0,
        }
    }
    fn region_info(&self, index: u32) -> DevResult<RegionInfo> {
        Ok(match index {
            0 => RegionInfo::rw(0, 0x2000),
            pci_index::CONFIG => RegionInfo::rw(index, 256),
            i => RegionInfo::absent(i),
        })
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        self.region_info(index)?.check(offset, buf.len())?;
        match index {
            0 => {
                if offset + buf.len() as u64 > 0x1000 {
                    self.touched_msix.store(true, Ordering::SeqCst);
                }
                buf.copy_from_slice(&self.bar.lock()[offset as usize..][..buf.len()]);
            }
            pci_index::CONFIG => {
                let mut cfg = [0u8; 256];
                cfg[6] = 0x10;
                cfg[0x34] = 0x40;
                cfg[0x40] = 0x11;
                cfg[0x44..0x48].copy_from_slice(&0x1000u32.to_le_bytes());
                cfg[0x48..0x4c].copy_from_slice(&0x1800u32.to_le_bytes());
                buf.copy_from_slice(&cfg[offset as usize..][..buf.len()]);
            }
            _ => return Err(DeviceError::NoSuchRegion(index)),
        }
        Ok(())
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> DevResult<()> {
        self.region_info(index)?.check(offset, data.len())?;
        if index != 0 {
            return Err(DeviceError::NoSuchRegion(index));
        }
        if offset + data.len() as u64 > 0x1000 {
            self.touched_msix.store(true, Ordering::SeqCst);
        }
        self.bar.lock()[offset as usize..][..data.len()].copy_from_slice(data);
        Ok(())
    }
    fn irq_info(&self, index: u32) -> DevResult<IrqInfo> {
        Err(DeviceError::NoSuchIrq(index))
    }
    fn set_irqs(&self, index: u32, _: IrqAction, _: u32, _: u32, _: IrqData) -> DevResult<()> {
        Err(DeviceError::NoSuchIrq(index))
    }
}

#[cfg(feature = "harness")]
fn fuzz_channel_peer(bytes: &[u8]) {
    use std::io::{Read, Write};
    let dev = Arc::new(FuzzDevice {
        bar: Mutex::new(vec![0; 0x2000]),
        touched_msix: std::sync::atomic::AtomicBool::new(false),
    });
    let grants = ChannelGrants::for_device(dev.clone()).expect("the fuzz device has BAR 0");
    let Ok(g) = grants.grant() else {
        return;
    };
    let (info, mut sock) = g.into_parts();
    assert_eq!(info.exclusions().len(), 2);
    let _ = sock.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = sock.write_all(bytes);
    let _ = sock.shutdown(std::net::Shutdown::Write);
    // Wait until the server has consumed everything sent (our bytes still queued to it:
    // SIOCOUTQ) or stopped making progress (it ended the channel on garbage), draining
    // its answers meanwhile; then release the grant, which joins its thread after the
    // message in hand.
    let _ = sock.set_read_timeout(Some(Duration::from_millis(2)));
    let unread = |s: &UnixStream| -> Option<libc::c_int> {
        let mut n: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) on a valid socket writes one int into `n`.
        let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        (r == 0).then_some(n)
    };
    let t0 = std::time::Instant::now();
    let (mut last, mut since) = (None, std::time::Instant::now());
    let mut sink = [0u8; 4096];
    loop {
        let q = unread(&sock);
        if q.is_none_or(|q| q == 0) || t0.elapsed() > Duration::from_secs(2) {
            break;
        }
        if q != last {
            (last, since) = (q, std::time::Instant::now());
        } else if since.elapsed() > Duration::from_millis(20) {
            break;
        }
        let _ = sock.read(&mut sink);
    }
    drop(grants);
    drop(sock);
    assert!(
        !dev.touched_msix.load(Ordering::SeqCst),
        "a channel access reached the MSI-X page"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> GrantInfo {
        GrantInfo::new(0b101, 2, vec![Exclusion::new(2, 0x1000, 0x1000).unwrap()]).unwrap()
    }

    #[test]
    fn grant_info_round_trips_and_routes() {
        let i = info();
        let b = i.encode();
        assert_eq!(b.len(), GRANT_HEADER + EXCLUSION_SIZE);
        assert_eq!(GrantInfo::decode(&b).unwrap(), i);
        assert!(i.carries(0, 0, 4));
        assert!(i.carries(2, 0xffc, 4));
        assert!(!i.carries(2, 0xffe, 4), "straddles the excluded page");
        assert!(!i.carries(2, 0x1800, 4));
        assert!(i.carries(2, 0x2000, 4));
        assert!(!i.carries(1, 0, 4), "BAR 1 is not carried");
        assert!(!i.carries(pci_index::CONFIG, 0, 4));
        assert!(!i.carries(0, 0, 0) && !i.carries(0, 0, MAX_ACCESS + 1));
        assert!(i.carries(0, u64::MAX, 1), "the device checks bounds");
        assert_eq!(i.passed_down().unwrap().levels(), 3);
    }

    #[test]
    fn hostile_grant_infos_are_refused() {
        let good = info().encode();
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        let mut m = good.clone();
        m[0] ^= 1;
        cases.push((m, "magic"));
        let mut m = good.clone();
        m[8] = 2;
        cases.push((m, "version"));
        let mut m = good.clone();
        m[12] = 0;
        cases.push((m, "empty mask"));
        let mut m = good.clone();
        m[12] = 0x40;
        cases.push((m, "BAR 6"));
        let mut m = good.clone();
        m[13] = 1;
        cases.push((m, "reserved"));
        let mut m = good.clone();
        m[16..20].copy_from_slice(&(MAX_LEVELS + 1).to_le_bytes());
        cases.push((m, "too deep"));
        let mut m = good.clone();
        m[20..24].copy_from_slice(&2u32.to_le_bytes());
        cases.push((m, "count longer than the data"));
        let mut m = good.clone();
        m[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        cases.push((m, "huge count"));
        let mut m = good.clone();
        m.push(0);
        cases.push((m, "trailing byte"));
        cases.push((good[..GRANT_HEADER - 1].to_vec(), "short"));
        let mut m = good.clone();
        m[24..28].copy_from_slice(&1u32.to_le_bytes());
        cases.push((m, "exclusion on an uncarried BAR"));
        let mut m = good.clone();
        m[24..28].copy_from_slice(&6u32.to_le_bytes());
        cases.push((m, "exclusion on the ROM"));
        let mut m = good.clone();
        m[28] = 1;
        cases.push((m, "exclusion reserved"));
        let mut m = good.clone();
        m[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push((m, "wrapping exclusion"));
        let mut m = good.clone();
        m[40..48].copy_from_slice(&0u64.to_le_bytes());
        cases.push((m, "empty exclusion"));
        for (b, what) in cases {
            assert!(
                matches!(GrantInfo::decode(&b), Err(ChannelError::Malformed(_))),
                "{what}"
            );
        }
    }

    #[test]
    fn a_grant_takes_exactly_one_connected_stream_socket() {
        let data = info().encode();
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(Grant::from_reply(&data, vec![a.into()]).is_ok());
        assert!(matches!(
            Grant::from_reply(&data, vec![]),
            Err(ChannelError::Malformed(_))
        ));
        let (a, b) = UnixStream::pair().unwrap();
        assert!(matches!(
            Grant::from_reply(&data, vec![a.into(), b.into()]),
            Err(ChannelError::Malformed(_))
        ));
        let (d, _e) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert!(matches!(
            Grant::from_reply(&data, vec![d.into()]),
            Err(ChannelError::BadFd(_))
        ));
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            Grant::from_reply(&data, vec![f.into()]),
            Err(ChannelError::BadFd(_))
        ));
        let dir = std::env::temp_dir().join(format!("nestio-grant-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let l = std::os::unix::net::UnixListener::bind(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        assert!(
            matches!(
                Grant::from_reply(&data, vec![l.into()]),
                Err(ChannelError::BadFd(_))
            ),
            "a listening socket"
        );
    }

    #[cfg(feature = "harness")]
    #[test]
    fn fuzz_entry_survives_samples() {
        let good = info().encode();
        for sel in 0..16u8 {
            let mut d = vec![sel];
            d.extend_from_slice(&good);
            fuzz_bar_channel(&d);
            fuzz_bar_channel(&d[..d.len() / 2]);
        }
        fuzz_bar_channel(&[]);
        // A channel peer: an honest read, a read of the MSI-X page, a write of it, a
        // truncated message.
        let mut peer = vec![0x80u8];
        for (id, cmd, offset) in [(1u16, 9u16, 0u64), (2, 9, 0x1000), (3, 10, 0x1800)] {
            let write = cmd == 10;
            let body = 16 + if write { 4 } else { 0 };
            peer.extend_from_slice(&id.to_ne_bytes());
            peer.extend_from_slice(&cmd.to_ne_bytes());
            peer.extend_from_slice(&((16 + body) as u32).to_ne_bytes());
            peer.extend_from_slice(&0u64.to_ne_bytes());
            peer.extend_from_slice(&offset.to_le_bytes());
            peer.extend_from_slice(&0u32.to_le_bytes());
            peer.extend_from_slice(&4u32.to_le_bytes());
            if write {
                peer.extend_from_slice(&[1, 2, 3, 4]);
            }
        }
        fuzz_bar_channel(&peer);
        peer.extend_from_slice(&[9, 9, 9]);
        fuzz_bar_channel(&peer);
    }
}
