//! The flat DMA map table a vfio-user client (or a VMM) builds with DMA_MAP / DMA_UNMAP.
//!
//! Mappings never overlap and are found by a `BTreeMap` keyed on their start address. An
//! access may span adjacent mappings; every piece is checked (present, permitted) before
//! any byte moves, so an access outside the mappings or against their permissions has
//! no partial effect. (A fault found only while copying — a file its owner shrank, a
//! peer that refuses — can leave the pieces before it done, as on real hardware.)
//!
//! fd-backed mappings are classified at DMA_MAP time ([`crate::memfd::classify`]; seals
//! before size, so the sender cannot race the check):
//! - a tmpfs file sealed with `F_SEAL_SHRINK` (nestio's guest RAM, QEMU's default memfd)
//!   is mmapped once and accessed in place through `VolatileSlice` copies — zero copy;
//! - any other regular file could be truncated by its owner after the map, and touching
//!   an mmap past the new end raises SIGBUS; it is reopened privately (so the sender's
//!   later `O_APPEND` cannot redirect our writes) and accessed with `pread` (one system
//!   call) / `fstat` + `pwrite` (two), where a shrunk file is a short read or a refused
//!   write and so a reported fault;
//! - anything else (devices, sockets, anonymous inodes, FUSE files) is refused (EINVAL),
//!   as is an fd opened for less access than the mapping's permissions (EACCES).
//!
//! peer-backed mappings are copied by message through the [`DmaPeer`].
//!
//! Locking: one `RwLock`. Accesses take it shared; map/unmap take it exclusive, so an
//! unmap waits for in-flight copies (as an IOMMU unmap waits for the IOTLB flush). In-place
//! copies and file system calls (tmpfs or local files, never FUSE) run under it; peer
//! copies run after it is released (they may block on a socket).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

use crate::dirty::DirtyLog;
use crate::{Access, DmaError, DmaPeer, DmaRange, DmaSpace, Prot};

/// What backs a new mapping.
#[derive(Clone)]
pub enum DmaBacking {
    /// Memory shared by file descriptor: used in place when it is a sealed tmpfs file,
    /// by `pread`/`pwrite` otherwise (module documentation).
    Fd {
        /// The file (memfd, shared memory, a parent's guest RAM).
        fd: Arc<OwnedFd>,
        /// Offset of the mapping's first byte in the file.
        offset: u64,
    },
    /// Memory reachable only by messages to its owner.
    Peer(Arc<dyn DmaPeer>),
}

impl std::fmt::Debug for DmaBacking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DmaBacking::Fd { fd, offset } => f
                .debug_struct("Fd")
                .field("fd", &fd.as_raw_fd())
                .field("offset", offset)
                .finish(),
            DmaBacking::Peer(_) => f.write_str("Peer"),
        }
    }
}

/// A DMA_MAP request in checked form.
#[derive(Debug, Clone)]
pub struct DmaMapRequest {
    /// IOVA range.
    pub range: DmaRange,
    /// Device permissions.
    pub prot: Prot,
    /// Backing memory.
    pub backing: DmaBacking,
}

/// A mapping as listed by [`MapTable::mappings`].
#[derive(Debug, Clone)]
pub struct MappingInfo {
    /// IOVA range.
    pub range: DmaRange,
    /// Permissions.
    pub prot: Prot,
    /// The backing as given at map time.
    pub backing: DmaBacking,
}

/// Counters that show where DMA bytes went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MapTableStats {
    /// Bytes copied in place through mmapped fd-backed mappings (no message).
    pub in_place_bytes: u64,
    /// Bytes moved with `pread`/`pwrite` on fd-backed mappings whose file is not sealed
    /// against shrinking (no message, one system call per piece).
    pub file_bytes: u64,
    /// Bytes moved by messages to a peer.
    pub peer_bytes: u64,
    /// Number of peer messages.
    pub peer_ops: u64,
    /// Accesses refused (faults).
    pub faults: u64,
}

enum Kind {
    /// Mapped in place (the file cannot shrink).
    Mem(MmapRegion<()>),
    /// Accessed by `pread`/`pwrite`: the mapping's first byte is at `offset` in `file`.
    File { file: File, offset: u64 },
    /// Reached by messages.
    Peer(Arc<dyn DmaPeer>),
}

struct Mapping {
    range: DmaRange,
    prot: Prot,
    kind: Kind,
    backing: DmaBacking,
}

struct Inner {
    maps: BTreeMap<u64, Arc<Mapping>>,
    dirty: Option<DirtyLog>,
}

/// A flat, checked IOVA map. See the module documentation.
pub struct MapTable {
    inner: RwLock<Inner>,
    limit: usize,
    in_place_bytes: AtomicU64,
    file_bytes: AtomicU64,
    peer_bytes: AtomicU64,
    peer_ops: AtomicU64,
    faults: AtomicU64,
}

impl Default for MapTable {
    fn default() -> Self {
        Self::new(65535)
    }
}

/// One checked piece of an access.
struct Piece<'a> {
    map: &'a Arc<Mapping>,
    /// Offset inside the mapping.
    off: u64,
    /// Bytes in this piece.
    len: usize,
    /// Position of the piece in the caller's buffer.
    pos: usize,
}

impl MapTable {
    /// An empty table that holds at most `limit` mappings.
    pub fn new(limit: usize) -> Self {
        MapTable {
            inner: RwLock::new(Inner {
                maps: BTreeMap::new(),
                dirty: None,
            }),
            limit,
            in_place_bytes: AtomicU64::new(0),
            file_bytes: AtomicU64::new(0),
            peer_bytes: AtomicU64::new(0),
            peer_ops: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        }
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a mapping. Overlap gives [`DmaError::Overlap`] (EEXIST).
    pub fn map(&self, req: DmaMapRequest) -> Result<(), DmaError> {
        let DmaMapRequest {
            range,
            prot,
            backing,
        } = req;
        let size = usize::try_from(range.len())
            .map_err(|_| DmaError::Invalid(format!("mapping size {:#x} too large", range.len())))?;
        let kind = match &backing {
            DmaBacking::Fd { fd, offset } => open_fd(fd, *offset, size, prot, range)?,
            DmaBacking::Peer(p) => Kind::Peer(p.clone()),
        };
        let mut inner = self.write_lock();
        if inner.maps.len() >= self.limit {
            return Err(DmaError::TooManyMappings { limit: self.limit });
        }
        // The only candidates for overlap: the last mapping starting at or before our last
        // address.
        if let Some((_, m)) = inner.maps.range(..=range.last()).next_back() {
            if m.range.overlaps(&range) {
                return Err(DmaError::Overlap {
                    iova: range.start(),
                    size: range.len(),
                });
            }
        }
        tracing::debug!(
            iova = range.start(),
            size = range.len(),
            ?prot,
            ?backing,
            "dma map"
        );
        inner.maps.insert(
            range.start(),
            Arc::new(Mapping {
                range,
                prot,
                kind,
                backing,
            }),
        );
        Ok(())
    }

    /// Remove the mapping that is exactly `[iova, iova+size)`.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaError> {
        let mut inner = self.write_lock();
        match inner.maps.get(&iova) {
            Some(m) if m.range.len() == size => {
                inner.maps.remove(&iova);
                tracing::debug!(iova, size, "dma unmap");
                Ok(())
            }
            _ => Err(DmaError::NotMapped { iova, size }),
        }
    }

    /// Remove every mapping (client gone, or DMA_UNMAP with the "all" flag).
    pub fn unmap_all(&self) {
        let mut inner = self.write_lock();
        inner.maps.clear();
    }

    /// The current mappings, in address order.
    pub fn mappings(&self) -> Vec<MappingInfo> {
        self.read_lock()
            .maps
            .values()
            .map(|m| MappingInfo {
                range: m.range,
                prot: m.prot,
                backing: m.backing.clone(),
            })
            .collect()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.read_lock().maps.len()
    }

    /// True when nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters since creation.
    pub fn stats(&self) -> MapTableStats {
        MapTableStats {
            in_place_bytes: self.in_place_bytes.load(Ordering::Relaxed),
            file_bytes: self.file_bytes.load(Ordering::Relaxed),
            peer_bytes: self.peer_bytes.load(Ordering::Relaxed),
            peer_ops: self.peer_ops.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
        }
    }

    /// Start dirty-page logging of `ranges` with granularity `page_size`.
    pub fn start_logging(&self, page_size: u64, ranges: &[DmaRange]) -> Result<(), DmaError> {
        let log = DirtyLog::new(page_size, ranges)?;
        let mut inner = self.write_lock();
        if inner.dirty.is_some() {
            return Err(DmaError::Invalid(
                "dirty logging is already on; stop it first".into(),
            ));
        }
        inner.dirty = Some(log);
        Ok(())
    }

    /// Stop dirty-page logging (no error when it was off).
    pub fn stop_logging(&self) {
        self.write_lock().dirty = None;
    }

    /// True while dirty logging is on.
    pub fn logging(&self) -> bool {
        self.read_lock().dirty.is_some()
    }

    /// Report (and clear) the dirty bitmap of `range` at `page_size` granularity: one bit
    /// per page, in little-endian u64 words as VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT.
    pub fn report_dirty(&self, range: DmaRange, page_size: u64) -> Result<Vec<u64>, DmaError> {
        let inner = self.read_lock();
        let log = inner
            .dirty
            .as_ref()
            .ok_or_else(|| DmaError::Invalid("dirty logging is not on".into()))?;
        log.report(range, page_size)
    }

    /// Mark `[iova, iova+len)` dirty (for devices that write memory by other paths).
    pub fn mark_dirty(&self, iova: u64, len: u64) {
        if let Some(log) = &self.read_lock().dirty {
            log.mark(iova, len);
        }
    }

    /// Walk an access piece by piece (one piece per mapping it touches), checking each
    /// piece for presence and permission; `visit` sees only checked pieces, and the
    /// walk stops at the first refused one. Nothing is allocated.
    fn walk<'a>(
        inner: &'a Inner,
        iova: u64,
        len: usize,
        access: Access,
        mut visit: impl FnMut(Piece<'a>) -> Result<(), DmaError>,
    ) -> Result<(), DmaError> {
        if len == 0 {
            return Ok(());
        }
        let total = len as u64;
        if iova.checked_add(total - 1).is_none() {
            return Err(DmaError::Overflow { iova, len: total });
        }
        let mut addr = iova;
        let mut left = total;
        let mut pos = 0usize;
        while left > 0 {
            let m = match inner.maps.range(..=addr).next_back() {
                Some((_, m)) if m.range.contains(addr) => m,
                _ => {
                    return Err(DmaError::Unmapped {
                        iova: addr,
                        len: left,
                        access,
                    })
                }
            };
            let allowed = match access {
                Access::Read => m.prot.readable(),
                Access::Write => m.prot.writable(),
            };
            if !allowed {
                return Err(DmaError::Permission { iova: addr, access });
            }
            let off = addr - m.range.start();
            let n = (m.range.len() - off).min(left);
            visit(Piece {
                map: m,
                off,
                len: n as usize,
                pos,
            })?;
            left -= n;
            pos += n as usize;
            if left > 0 {
                addr += n;
            }
        }
        Ok(())
    }

    fn fault(&self, e: DmaError) -> DmaError {
        self.faults.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %e, "dma fault");
        e
    }
}

/// Check an fd-backed mapping and choose how it is accessed: mmapped in place when its
/// file cannot shrink, by `pread`/`pwrite` otherwise (module documentation).
fn open_fd(
    fd: &Arc<OwnedFd>,
    offset: u64,
    size: usize,
    prot: Prot,
    range: DmaRange,
) -> Result<Kind, DmaError> {
    let refuse = |errno: i32, reason: String| DmaError::BadFile {
        iova: range.start(),
        size: range.len(),
        errno,
        reason,
    };
    let io_refuse = |what: &str, e: std::io::Error| {
        refuse(
            e.raw_os_error().unwrap_or(libc::EBADF),
            format!("{what} failed: {e}"),
        )
    };
    let end = offset.checked_add(range.len()).ok_or(DmaError::Overflow {
        iova: offset,
        len: range.len(),
    })?;
    let file = File::from(fd.try_clone().map_err(|e| io_refuse("dup", e))?);
    // 1. How the file may be used — before its size: a seal, once seen, stays, so the
    //    size check below cannot be undone by the sender (see `memfd`).
    let sharing = crate::memfd::classify(&file)
        .map_err(|e| io_refuse("fstat", e))?
        .map_err(|why| refuse(libc::EINVAL, why.into()))?;
    // 2. The mapping must lie inside the file.
    let len = file.metadata().map_err(|e| io_refuse("fstat", e))?.len();
    if len < end {
        return Err(DmaError::Invalid(format!(
            "DMA mapping needs bytes up to {end:#x} of its file, which has only {len:#x}"
        )));
    }
    // 3. The sender's access mode must allow what the mapping permits.
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(io_refuse("fcntl(F_GETFL)", std::io::Error::last_os_error()));
    }
    let mode = fl & libc::O_ACCMODE;
    if (prot.readable() && mode == libc::O_WRONLY) || (prot.writable() && mode == libc::O_RDONLY) {
        return Err(refuse(
            libc::EACCES,
            format!("the file was opened for less access than the mapping's {prot:?}"),
        ));
    }
    if sharing == crate::memfd::Sharing::SystemCalls {
        tracing::debug!(
            iova = range.start(),
            size = range.len(),
            "DMA mapping's file is not a sealed tmpfs file: accessed with pread/pwrite"
        );
        // A private open file description, so flags the sender sets on its own later
        // (O_APPEND would turn every pwrite into an append) cannot reach ours. Opened
        // for exactly the access the mapping permits, never more than the sender had.
        if !prot.readable() && !prot.writable() {
            return Ok(Kind::File { file, offset });
        }
        let own = std::fs::OpenOptions::new()
            .read(prot.readable())
            .write(prot.writable())
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| io_refuse("reopening the file through /proc/self/fd", e))?;
        return Ok(Kind::File { file: own, offset });
    }
    let mut mprot = 0;
    if prot.readable() {
        mprot |= libc::PROT_READ;
    }
    if prot.writable() {
        mprot |= libc::PROT_WRITE;
    }
    if mprot == 0 {
        mprot = libc::PROT_NONE;
    }
    MmapRegion::build(
        Some(FileOffset::new(file, offset)),
        size,
        mprot,
        libc::MAP_SHARED,
    )
    .map(Kind::Mem)
    .map_err(|e| match e {
        vm_memory::mmap::MmapRegionError::Mmap(io) => DmaError::Mmap {
            iova: range.start(),
            size: range.len(),
            errno: io.raw_os_error().unwrap_or(libc::EINVAL),
            errno_text: io.to_string(),
        },
        other => DmaError::Invalid(format!("cannot map DMA region: {other}")),
    })
}

/// One checked piece of an access, handed to the copy routine.
enum Seg<'a> {
    /// In place: `len` bytes at offset `off` of the mapped region, buffer position `pos`.
    Mem(&'a MmapRegion<()>, usize, usize, usize),
    /// By system call: `len` bytes at file offset `at`, buffer position `pos`.
    File(&'a File, u64, usize, usize),
    /// By message: `len` bytes at peer address `addr`, buffer position `pos`.
    Peer(&'a dyn DmaPeer, u64, usize, usize),
}

impl MapTable {
    /// Check a whole access, then copy it piece by piece with `copy`: in-place pieces
    /// under the shared lock, peer pieces after it is released. Counters and dirty bits
    /// are kept here, so reads and writes differ only in their copy routine.
    fn access(
        &self,
        iova: u64,
        len: usize,
        access: Access,
        mut copy: impl FnMut(Seg<'_>) -> Result<(), i32>,
    ) -> Result<(), DmaError> {
        let inner = self.read_lock();
        // First the whole access is checked, so a refused one has no partial effect.
        Self::walk(&inner, iova, len, access, |_| Ok(())).map_err(|e| self.fault(e))?;
        if access == Access::Write {
            if let Some(log) = &inner.dirty {
                log.mark(iova, len as u64);
            }
        }
        // Peer pieces wait until the lock is released (they block on a socket); the
        // list allocates only if there are any.
        let mut peer: Vec<(Arc<dyn DmaPeer>, u64, usize, usize)> = Vec::new();
        Self::walk(&inner, iova, len, access, |p| {
            let (n, pos) = (p.len, p.pos);
            match &p.map.kind {
                Kind::Mem(region) => {
                    copy(Seg::Mem(region, p.off as usize, pos, n))
                        .map_err(|_| DmaError::Invalid("mapping smaller than recorded".into()))?;
                    self.in_place_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Kind::File { file, offset } => {
                    // The mapping was checked to fit its file at map time, so this sum
                    // cannot overflow; a file shrunk since then is a short read.
                    let at = offset + p.off;
                    copy(Seg::File(file, at, pos, n)).map_err(|errno| {
                        self.fault(DmaError::File {
                            iova: p.map.range.start() + p.off,
                            len: n as u64,
                            access,
                            errno,
                        })
                    })?;
                    self.file_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Kind::Peer(dev) => peer.push((dev.clone(), p.map.range.start() + p.off, pos, n)),
            }
            Ok(())
        })?;
        drop(inner);
        for (dev, addr, pos, n) in peer {
            copy(Seg::Peer(dev.as_ref(), addr, pos, n)).map_err(|errno| {
                self.fault(DmaError::Peer {
                    iova: addr,
                    len: n as u64,
                    access,
                    errno,
                })
            })?;
            self.peer_bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.peer_ops.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl DmaSpace for MapTable {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.access(iova, buf.len(), Access::Read, |seg| match seg {
            Seg::Mem(region, off, pos, n) => {
                let s = region.get_slice(off, n).map_err(|_| libc::EFAULT)?;
                s.copy_to(&mut buf[pos..pos + n]);
                Ok(())
            }
            Seg::File(file, at, pos, n) => file
                .read_exact_at(&mut buf[pos..pos + n], at)
                .map_err(|e| e.raw_os_error().unwrap_or(0)),
            Seg::Peer(peer, addr, pos, n) => peer.dma_read(addr, &mut buf[pos..pos + n]),
        })
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.access(iova, data.len(), Access::Write, |seg| match seg {
            Seg::Mem(region, off, pos, n) => {
                let s = region.get_slice(off, n).map_err(|_| libc::EFAULT)?;
                s.copy_from(&data[pos..pos + n]);
                Ok(())
            }
            Seg::File(file, at, pos, n) => {
                // pwrite past the end would grow the file back; a write to memory the
                // owner has cut off is a fault, like a read of it. (A truncate between
                // this check and the pwrite still grows the file back — sparse, and
                // harmless to us.)
                let size = file
                    .metadata()
                    .map_err(|e| e.raw_os_error().unwrap_or(0))?
                    .len();
                if size < at + n as u64 {
                    return Err(0);
                }
                file.write_all_at(&data[pos..pos + n], at)
                    .map_err(|e| e.raw_os_error().unwrap_or(0))
            }
            Seg::Peer(peer, addr, pos, n) => peer.dma_write(addr, &data[pos..pos + n]),
        })
    }
}
