//! The flat DMA map table a vfio-user client (or a VMM) builds with DMA_MAP / DMA_UNMAP.
//!
//! Mappings never overlap and are found by a `BTreeMap` keyed on their start address, so
//! map, unmap and every access cost O(log n) at any number of mappings. An access may
//! span adjacent mappings; every piece is checked (present, permitted) before any byte
//! moves, so an access outside the mappings or against their permissions has no partial
//! effect. (A fault found only while copying — a file its owner shrank, a peer that
//! refuses — can leave the pieces before it done, as on real hardware.)
//!
//! # Files: one backing per file, not per mapping
//!
//! Every fd of a DMA_MAP is checked by [`crate::memfd::check_dma_file`] (no `O_PATH`,
//! a regular file, an access mode that allows the mapping; seals before size, so the
//! sender cannot race the check) and classified:
//! - a tmpfs file sealed with `F_SEAL_SHRINK` (nestio's guest RAM, QEMU's default memfd)
//!   is mmapped and accessed in place through `VolatileSlice` copies — zero copy;
//! - any other regular file (Cloud Hypervisor's guest RAM memfd, a plain file) could be
//!   truncated by its owner after the map, and touching an mmap past the new end raises
//!   SIGBUS. By default ([`UnsealedAccess::Guarded`]) it is mmapped in place all the
//!   same, and every access to it goes through the fault-tolerant copy of
//!   [`crate::guard`]: a page the owner took away is a SIGBUS recovered inside the copy
//!   and reported as a fault ([`DmaError::File`], errno 0: the file was shrunk), and the
//!   pages come back when the owner regrows the file — zero copy, at the cost of a
//!   process-wide SIGBUS/SIGSEGV handler that chains to the one before it. Such faults
//!   are found per page, as for any mmap: a file shrunk to a size that is not a whole
//!   number of pages leaves the rest of its last page reachable past the end of file
//!   (as it is through every mapping of the file, the client's own included), where
//!   `pread`/`pwrite` stop at the byte;
//! - with [`UnsealedAccess::SystemCalls`] (or where the guarded copy is not available, or
//!   the file cannot be mapped), such a file is reopened privately
//!   ([`crate::memfd::reopen_private`], never with more access than the sender's fd, so
//!   the sender's later `O_APPEND` cannot redirect our writes) and accessed with `pread`
//!   (one system call) / `fstat` + `pwrite` (two), where a shrunk file is a short read
//!   or a refused write and so the same reported fault;
//! - anything else (devices, sockets, anonymous inodes, FUSE files) is refused (EINVAL),
//!   an `O_PATH` fd with EBADF, an fd opened for less than the mapping's permissions
//!   with EACCES.
//!
//! All mappings of one file with the same permissions and the same classification share
//! one reference-counted backing, found by the file's identity (`st_dev`, `st_ino`; an
//! inode number cannot be reused while we hold the file open): **one** mmap of the whole
//! file (or one private fd) plus the first fd the file was mapped with, whatever the
//! number of mappings. The fds of later DMA_MAPs of the same file are checked and then
//! dropped. So a vIOMMU's hundred thousand page-sized maps of guest RAM cost two fds and
//! one VMA, where one mmap and two fds per mapping would run into `RLIMIT_NOFILE` and the
//! kernel's `vm.max_map_count` (65530) long before the advertised 65535 mappings. A file
//! that grew past its backing gets a new, larger backing for its new mappings (the old
//! one lives until its last mapping goes); a file too large to map whole (virtual address
//! space) is mapped per mapping, as before. The backing is unmapped and its fds closed
//! when its last mapping goes, after the table's lock is released.
//!
//! peer-backed mappings are copied by message through the [`DmaPeer`].
//!
//! # Unmap: exact on the wire, bisecting only when asked
//!
//! The issue that asked for "unmap of any sub-range (VFIO allows splitting)" is right only
//! for the legacy type1 v1 IOMMU. The primary sources:
//! - Linux `drivers/vfio/vfio_iommu_type1.c`, `vfio_dma_do_unmap`: on a v2 IOMMU (what
//!   every current VMM opens) an unmap whose first or last address falls inside a mapping
//!   without being its first or last byte is refused with EINVAL ("there must not be any
//!   previous mappings bisected by the range"); a range covering several *whole*
//!   mappings unmaps them all and reports the bytes unmapped (zero is success).
//!   The uAPI header adds: "No guarantee is made to the user that arbitrary unmaps of iova
//!   or size different from those used in the original mapping call will succeed."
//! - QEMU `docs/interop/vfio-user.rst`, VFIO_USER_DMA_UNMAP: "The address and size of the
//!   DMA region being unmapped must match exactly a previous mapping."
//! - libvfio-user `dma_controller_remove_region`: removes the region whose address *and*
//!   size equal the request, ENOENT otherwise.
//!
//! So the wire semantics stay exact ([`MapTable::unmap`], ENOENT otherwise), and the table
//! offers what an in-process vIOMMU (which owns its own page tables and may tear down any
//! page) needs as two explicit methods: [`MapTable::unmap_covered`], the type1 v2 rule
//! (whole mappings inside a range; a bisected one is EINVAL), and
//! [`MapTable::unmap_split`], which unmaps any [`SPLIT_GRANULE`]-aligned sub-range and
//! keeps the pieces outside it with their backing and file offsets.
//!
//! # Locking
//!
//! One `RwLock`. Accesses take it shared; map/unmap take it exclusive, so an unmap waits
//! for in-flight copies (as an IOMMU unmap waits for the IOTLB flush). In-place copies and
//! file system calls (tmpfs or local files, never FUSE) run under it; peer copies run after
//! it is released (they may block on a socket). Backings are released (munmap, close)
//! after the exclusive lock is dropped; no access can still use them, because accesses
//! borrow mappings only while they hold the shared lock.

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

use crate::dirty::DirtyLog;
use crate::memfd::{DmaFile, Sharing};
use crate::{Access, DmaError, DmaPeer, DmaRange, DmaSpace, Prot};

/// The alignment [`MapTable::unmap_split`] requires: the smallest IOMMU page.
pub const SPLIT_GRANULE: u64 = 4096;

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
    /// The backing: the peer as given, or for a file the fd the table keeps for it (the
    /// first fd that file was mapped with) and this mapping's offset in the file.
    pub backing: DmaBacking,
}

/// Counters that show where DMA bytes went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MapTableStats {
    /// Bytes copied in place through mmapped fd-backed mappings (no message).
    pub in_place_bytes: u64,
    /// Bytes moved on fd-backed mappings whose file is not sealed against shrinking (no
    /// message): in place by the fault-tolerant copy (also counted in `guarded_bytes`),
    /// or with `pread`/`pwrite` (one or two system calls per piece).
    pub file_bytes: u64,
    /// The part of `file_bytes` copied in place by the fault-tolerant routine (zero
    /// copy).
    pub guarded_bytes: u64,
    /// Bytes moved by messages to a peer.
    pub peer_bytes: u64,
    /// Number of peer messages.
    pub peer_ops: u64,
    /// Accesses refused (faults).
    pub faults: u64,
}

/// Identity of a shared backing: the file, how it is used, and with which permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    in_place: bool,
    prot: Prot,
}

/// How the mappings of files that are not sealed against shrinking are accessed
/// (module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnsealedAccess {
    /// Mapped in place and copied by the fault-tolerant routine (module `guard`): a
    /// page the owner truncated away is a reported fault. Falls back to
    /// [`UnsealedAccess::SystemCalls`] where the routine is not available (not x86_64
    /// Linux), the recovery handler cannot be installed, or the file cannot be mapped.
    #[default]
    Guarded,
    /// `pread` / `fstat` + `pwrite` on a private file description (one or two system
    /// calls per piece).
    SystemCalls,
}

/// How a file's bytes are reached.
enum FileAccess {
    /// Mapped in place; the region's first byte is at file offset `base`. `guarded`: the
    /// file may shrink, so every copy goes through [`crate::guard`].
    Mem {
        region: MmapRegion<()>,
        base: u64,
        guarded: bool,
    },
    /// By `pread`/`pwrite` on a private file description.
    Calls(File),
    /// Nothing: a mapping without permissions is never accessed.
    Nothing,
}

/// One file's backing, shared by all its mappings with the same key.
struct FileBacking {
    /// The registry entry this backing is counted in (`None`: a private backing).
    key: Option<FileKey>,
    /// The fd reported by [`MapTable::mappings`].
    fd: Arc<OwnedFd>,
    access: FileAccess,
    /// Mappings in the table that use this backing.
    maps: AtomicUsize,
}

impl FileBacking {
    /// True when this backing reaches file bytes `[offset, end)`.
    fn covers(&self, offset: u64, end: u64) -> bool {
        match &self.access {
            FileAccess::Mem { region, base, .. } => {
                offset >= *base && end - base <= region.size() as u64
            }
            FileAccess::Calls(_) | FileAccess::Nothing => true,
        }
    }
}

enum Kind {
    /// File-backed: the mapping's first byte is at `offset` in the file.
    File {
        backing: Arc<FileBacking>,
        offset: u64,
    },
    /// Reached by messages.
    Peer(Arc<dyn DmaPeer>),
}

struct Mapping {
    range: DmaRange,
    prot: Prot,
    kind: Kind,
}

impl Mapping {
    /// The part of this mapping in `[start, start+len)` (which must lie inside it), with
    /// the same backing and the file offset moved along.
    fn piece(&self, start: u64, len: u64) -> Result<Mapping, DmaError> {
        let delta = start - self.range.start();
        Ok(Mapping {
            range: DmaRange::new(start, len)?,
            prot: self.prot,
            kind: match &self.kind {
                Kind::File { backing, offset } => Kind::File {
                    backing: backing.clone(),
                    offset: offset + delta,
                },
                Kind::Peer(p) => Kind::Peer(p.clone()),
            },
        })
    }
}

struct Inner {
    maps: BTreeMap<u64, Mapping>,
    /// The backing new mappings of a file use; an entry goes when its backing's last
    /// mapping does.
    files: HashMap<FileKey, Arc<FileBacking>>,
    dirty: Option<DirtyLog>,
}

impl Inner {
    /// Remove the mapping at `start` and uncount its backing; the caller drops it after
    /// releasing the lock.
    fn remove(&mut self, start: u64) -> Option<Mapping> {
        let m = self.maps.remove(&start)?;
        self.uncount(&m);
        Some(m)
    }

    /// Count a mapping entering the table against its backing.
    fn count(&mut self, m: &Mapping) {
        if let Kind::File { backing, .. } = &m.kind {
            // Changed only under the exclusive lock: the atomic is for `Sync`.
            backing.maps.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Uncount a mapping leaving the table; the last mapping of a registered backing
    /// takes its registry entry with it (so the registry never holds more than the
    /// files mapped now).
    fn uncount(&mut self, m: &Mapping) {
        if let Kind::File { backing, .. } = &m.kind {
            if backing.maps.fetch_sub(1, Ordering::Relaxed) == 1 {
                if let Some(key) = backing.key {
                    if self
                        .files
                        .get(&key)
                        .is_some_and(|b| Arc::ptr_eq(b, backing))
                    {
                        self.files.remove(&key);
                    }
                }
            }
        }
    }

    /// The mapping containing `addr`, if any.
    fn containing(&self, addr: u64) -> Option<&Mapping> {
        self.maps
            .range(..=addr)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.range.contains(addr))
    }
}

/// A flat, checked IOVA map. See the module documentation.
pub struct MapTable {
    inner: RwLock<Inner>,
    limit: usize,
    unsealed: UnsealedAccess,
    in_place_bytes: AtomicU64,
    file_bytes: AtomicU64,
    guarded_bytes: AtomicU64,
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
    map: &'a Mapping,
    /// Offset inside the mapping.
    off: u64,
    /// Bytes in this piece.
    len: usize,
    /// Position of the piece in the caller's buffer.
    pos: usize,
}

impl MapTable {
    /// An empty table that holds at most `limit` mappings; unsealed files are accessed
    /// in place with fault-tolerant copies ([`UnsealedAccess::Guarded`]).
    pub fn new(limit: usize) -> Self {
        Self::with_unsealed_access(limit, UnsealedAccess::Guarded)
    }

    /// An empty table that holds at most `limit` mappings and accesses the mappings of
    /// files not sealed against shrinking as `unsealed` says.
    pub fn with_unsealed_access(limit: usize, unsealed: UnsealedAccess) -> Self {
        MapTable {
            inner: RwLock::new(Inner {
                maps: BTreeMap::new(),
                files: HashMap::new(),
                dirty: None,
            }),
            limit,
            unsealed,
            in_place_bytes: AtomicU64::new(0),
            file_bytes: AtomicU64::new(0),
            guarded_bytes: AtomicU64::new(0),
            peer_bytes: AtomicU64::new(0),
            peer_ops: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        }
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read()
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write()
    }

    /// Add a mapping. Overlap gives [`DmaError::Overlap`] (EEXIST).
    pub fn map(&self, req: DmaMapRequest) -> Result<(), DmaError> {
        let DmaMapRequest {
            range,
            prot,
            backing,
        } = req;
        usize::try_from(range.len())
            .map_err(|_| DmaError::Invalid(format!("mapping size {:#x} too large", range.len())))?;
        // The file is checked before the lock: the checks are system calls on the
        // sender's fd only.
        let checked = match &backing {
            DmaBacking::Fd { fd, offset } => Some(check_file(fd, *offset, prot, range)?),
            DmaBacking::Peer(_) => None,
        };
        let mut inner = self.write_lock();
        if inner.maps.len() >= self.limit {
            return Err(DmaError::TooManyMappings { limit: self.limit });
        }
        // The only candidate for overlap: the last mapping starting at or before our last
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
        let kind = match (backing, checked) {
            (DmaBacking::Fd { fd, offset }, Some(file)) => Kind::File {
                backing: file_backing(&mut inner, fd, offset, prot, range, &file, self.unsealed)?,
                offset,
            },
            (DmaBacking::Peer(p), _) => Kind::Peer(p),
            (DmaBacking::Fd { .. }, None) => unreachable!("fd backings are always checked"),
        };
        let m = Mapping { range, prot, kind };
        inner.count(&m);
        inner.maps.insert(range.start(), m);
        Ok(())
    }

    /// Remove the mapping that is exactly `[iova, iova+size)` (vfio-user DMA_UNMAP;
    /// anything else is [`DmaError::NotMapped`], ENOENT).
    pub fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaError> {
        let mut inner = self.write_lock();
        // One tree walk: find and remove in place.
        let gone = match inner.maps.entry(iova) {
            Entry::Occupied(e) if e.get().range.len() == size => e.remove(),
            _ => return Err(DmaError::NotMapped { iova, size }),
        };
        inner.uncount(&gone);
        drop(inner);
        drop(gone);
        tracing::debug!(iova, size, "dma unmap");
        Ok(())
    }

    /// Remove every mapping that lies wholly inside `range` (VFIO type1 v2 unmap: see the
    /// module documentation) and return the bytes unmapped (0 when none was there). A
    /// mapping that `range` would bisect is [`DmaError::Bisect`] (EINVAL), and then
    /// nothing is removed.
    pub fn unmap_covered(&self, range: DmaRange) -> Result<u64, DmaError> {
        let mut inner = self.write_lock();
        for addr in [range.start(), range.last()] {
            if let Some(m) = inner.containing(addr) {
                if m.range.start() < range.start() || m.range.last() > range.last() {
                    return Err(DmaError::Bisect {
                        iova: range.start(),
                        size: range.len(),
                        map_iova: m.range.start(),
                        map_size: m.range.len(),
                    });
                }
            }
        }
        let starts: Vec<u64> = inner
            .maps
            .range(range.start()..=range.last())
            .map(|(s, _)| *s)
            .collect();
        let gone: Vec<Mapping> = starts.iter().filter_map(|s| inner.remove(*s)).collect();
        drop(inner);
        let bytes = gone.iter().map(|m| m.range.len()).sum();
        tracing::debug!(
            iova = range.start(),
            size = range.len(),
            mappings = gone.len(),
            bytes,
            "dma unmap (covered)"
        );
        Ok(bytes)
    }

    /// Unmap every mapped byte of `range`, splitting the mappings it cuts: the pieces
    /// outside `range` stay mapped with their backing, permissions and file offsets. This
    /// is what an in-process vIOMMU needs to tear down any page; vfio-user DMA_UNMAP does
    /// not allow it (module documentation). `range` must start and end on a
    /// [`SPLIT_GRANULE`] boundary (EINVAL). Returns the bytes unmapped. A split that
    /// would take the table past its limit is [`DmaError::TooManyMappings`] (ENOSPC) and
    /// changes nothing.
    pub fn unmap_split(&self, range: DmaRange) -> Result<u64, DmaError> {
        if !range.start().is_multiple_of(SPLIT_GRANULE)
            || !range.len().is_multiple_of(SPLIT_GRANULE)
        {
            return Err(DmaError::Invalid(format!(
                "split unmap [{:#x}, +{:#x}) must start and end on a {SPLIT_GRANULE:#x} boundary",
                range.start(),
                range.len()
            )));
        }
        let mut inner = self.write_lock();
        // The pieces that survive: the part of a mapping before the range and the part
        // after it.
        let mut keep = Vec::new();
        if let Some(m) = inner.containing(range.start()) {
            if m.range.start() < range.start() {
                keep.push(m.piece(m.range.start(), range.start() - m.range.start())?);
            }
        }
        if let Some(m) = inner.containing(range.last()) {
            if m.range.last() > range.last() {
                let after = range.last() + 1;
                keep.push(m.piece(after, m.range.last() - range.last())?);
            }
        }
        // Every mapping touching the range: the one starting before it, and those
        // starting inside it.
        let mut starts: Vec<u64> = Vec::new();
        if let Some(m) = inner.containing(range.start()) {
            if m.range.start() < range.start() {
                starts.push(m.range.start());
            }
        }
        let inside = inner.maps.range(range.start()..=range.last());
        starts.extend(inside.map(|(s, _)| *s));
        if inner.maps.len() - starts.len() + keep.len() > self.limit {
            return Err(DmaError::TooManyMappings { limit: self.limit });
        }
        // The pieces are counted before the mappings they come from go, so a backing
        // whose only mapping is split stays registered for later maps of its file.
        for m in &keep {
            inner.count(m);
        }
        let gone: Vec<Mapping> = starts.iter().filter_map(|s| inner.remove(*s)).collect();
        for m in keep {
            inner.maps.insert(m.range.start(), m);
        }
        drop(inner);
        let bytes = gone
            .iter()
            .map(|m| {
                let lo = m.range.start().max(range.start());
                let hi = m.range.last().min(range.last());
                hi - lo + 1
            })
            .sum();
        tracing::debug!(
            iova = range.start(),
            size = range.len(),
            bytes,
            "dma unmap (split)"
        );
        Ok(bytes)
    }

    /// Remove every mapping (client gone, or DMA_UNMAP with the "all" flag).
    pub fn unmap_all(&self) {
        let mut inner = self.write_lock();
        let maps = std::mem::take(&mut inner.maps);
        inner.files.clear();
        drop(inner);
        drop(maps);
    }

    /// The current mappings, in address order.
    pub fn mappings(&self) -> Vec<MappingInfo> {
        self.read_lock()
            .maps
            .values()
            .map(|m| MappingInfo {
                range: m.range,
                prot: m.prot,
                backing: match &m.kind {
                    Kind::File { backing, offset } => DmaBacking::Fd {
                        fd: backing.fd.clone(),
                        offset: *offset,
                    },
                    Kind::Peer(p) => DmaBacking::Peer(p.clone()),
                },
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

    /// Number of distinct file backings the table holds (each is one mmap or one private
    /// fd, plus one kept fd), whatever the number of mappings of those files.
    pub fn file_backings(&self) -> usize {
        let inner = self.read_lock();
        let mut seen: Vec<*const FileBacking> = inner
            .maps
            .values()
            .filter_map(|m| match &m.kind {
                Kind::File { backing, .. } => Some(Arc::as_ptr(backing)),
                Kind::Peer(_) => None,
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }

    /// Counters since creation.
    pub fn stats(&self) -> MapTableStats {
        let guarded = self.guarded_bytes.load(Ordering::Relaxed);
        MapTableStats {
            in_place_bytes: self.in_place_bytes.load(Ordering::Relaxed),
            file_bytes: self.file_bytes.load(Ordering::Relaxed) + guarded,
            guarded_bytes: guarded,
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
            let Some(m) = inner.containing(addr) else {
                return Err(DmaError::Unmapped {
                    iova: addr,
                    len: left,
                    access,
                });
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

/// Check the fd of a new mapping ([`crate::memfd::check_dma_file`]) and that the mapping
/// lies inside its file.
fn check_file(
    fd: &Arc<OwnedFd>,
    offset: u64,
    prot: Prot,
    range: DmaRange,
) -> Result<DmaFile, DmaError> {
    let end = offset.checked_add(range.len()).ok_or(DmaError::Overflow {
        iova: offset,
        len: range.len(),
    })?;
    let file = crate::memfd::check_dma_file(fd.as_fd(), prot).map_err(|e| refuse(range, e))?;
    if file.size < end {
        return Err(DmaError::Invalid(format!(
            "DMA mapping needs bytes up to {end:#x} of its file, which has only {:#x}",
            file.size
        )));
    }
    Ok(file)
}

fn refuse(range: DmaRange, e: crate::memfd::FileRefusal) -> DmaError {
    DmaError::BadFile {
        iova: range.start(),
        size: range.len(),
        errno: e.errno(),
        reason: e.to_string(),
    }
}

/// The shared backing for a checked file: the registered one when it reaches the
/// mapping, otherwise a new one (registered in its place when it maps the whole file).
fn file_backing(
    inner: &mut Inner,
    fd: Arc<OwnedFd>,
    offset: u64,
    prot: Prot,
    range: DmaRange,
    file: &DmaFile,
    unsealed: UnsealedAccess,
) -> Result<Arc<FileBacking>, DmaError> {
    let end = offset + range.len(); // checked in `check_file`
    let in_place = file.sharing == Sharing::InPlace;
    let key = FileKey {
        dev: file.dev,
        ino: file.ino,
        in_place,
        prot,
    };
    if let Some(b) = inner.files.get(&key) {
        if b.covers(offset, end) {
            return Ok(b.clone());
        }
    }
    // The whole file mapped once (registered), or, for a file too large to map whole,
    // just this mapping's pages (private to the mapping).
    let map_in_place = |guarded: bool| -> Result<(FileAccess, bool), DmaError> {
        match mmap(&fd, 0, file.size, prot, range) {
            Ok(region) => Ok((
                FileAccess::Mem {
                    region,
                    base: 0,
                    guarded,
                },
                true,
            )),
            Err(whole) => {
                tracing::debug!(error = %whole, size = file.size, "mapping only the DMA range of a file too large to map whole");
                let base = offset & !(page_size() - 1);
                let region = mmap(&fd, base, end - base, prot, range)?;
                Ok((
                    FileAccess::Mem {
                        region,
                        base,
                        guarded,
                    },
                    false,
                ))
            }
        }
    };
    let calls = || -> Result<FileAccess, DmaError> {
        tracing::debug!(
            iova = range.start(),
            size = range.len(),
            "DMA mapping's file is not a sealed tmpfs file: accessed with pread/pwrite"
        );
        Ok(
            match crate::memfd::reopen_private(fd.as_fd(), file, prot)
                .map_err(|e| refuse(range, e))?
            {
                Some(own) => FileAccess::Calls(own),
                None => FileAccess::Nothing,
            },
        )
    };
    let (access, shared) = if in_place {
        map_in_place(false)?
    } else if unsealed == UnsealedAccess::Guarded && (prot.readable() || prot.writable()) {
        // Checked first, so the file is never mapped unguarded; a file that cannot be
        // mapped (a write-only fd, a hugetlbfs file not mapped at its huge page size)
        // keeps the system-call path.
        match crate::guard::install().map_err(|errno| DmaError::Mmap {
            iova: range.start(),
            size: range.len(),
            errno,
            errno_text: "the SIGBUS/SIGSEGV recovery handler cannot be installed".into(),
        }) {
            Ok(()) => match map_in_place(true) {
                Ok(done) => {
                    tracing::debug!(
                        iova = range.start(),
                        size = range.len(),
                        "DMA mapping's file is not sealed: mapped in place with fault-tolerant copies"
                    );
                    done
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot map an unsealed DMA file in place");
                    (calls()?, true)
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "unsealed DMA files fall back to pread/pwrite");
                (calls()?, true)
            }
        }
    } else {
        (calls()?, true)
    };
    let backing = Arc::new(FileBacking {
        key: shared.then_some(key),
        fd,
        access,
        maps: AtomicUsize::new(0),
    });
    if shared {
        // A backing this file had (too small: the file grew) keeps serving its mappings
        // until they go; new mappings of the file use the new one.
        inner.files.insert(key, backing.clone());
    }
    Ok(backing)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// mmap `[base, base+len)` of the file shared, with the mapping's permissions.
fn mmap(
    fd: &OwnedFd,
    base: u64,
    len: u64,
    prot: Prot,
    range: DmaRange,
) -> Result<MmapRegion<()>, DmaError> {
    let mmap_err = |errno: i32, text: String| DmaError::Mmap {
        iova: range.start(),
        size: range.len(),
        errno,
        errno_text: text,
    };
    let size = usize::try_from(len).map_err(|_| mmap_err(libc::ENOMEM, "too large".into()))?;
    let file = File::from(
        fd.try_clone()
            .map_err(|e| mmap_err(e.raw_os_error().unwrap_or(libc::EBADF), e.to_string()))?,
    );
    let mut mprot = libc::PROT_NONE;
    if prot.readable() {
        mprot |= libc::PROT_READ;
    }
    if prot.writable() {
        mprot |= libc::PROT_WRITE;
    }
    MmapRegion::build(
        Some(FileOffset::new(file, base)),
        size,
        mprot,
        libc::MAP_SHARED,
    )
    .map_err(|e| match e {
        vm_memory::mmap::MmapRegionError::Mmap(io) => {
            mmap_err(io.raw_os_error().unwrap_or(libc::EINVAL), io.to_string())
        }
        other => DmaError::Invalid(format!("cannot map DMA region: {other}")),
    })
}

/// One checked piece of an access, handed to the copy routine.
enum Seg<'a> {
    /// In place: `len` bytes at offset `off` of the mapped region, buffer position `pos`.
    Mem(&'a MmapRegion<()>, usize, usize, usize),
    /// In place with the fault-tolerant routine ([`crate::guard`]): as `Mem`.
    Guarded(&'a MmapRegion<()>, usize, usize, usize),
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
                Kind::File { backing, offset } => match &backing.access {
                    FileAccess::Mem {
                        region,
                        base,
                        guarded: true,
                    } => {
                        // The backing covers the mapping (checked at map time); a page the
                        // owner truncated away is a fault, as a short pread is.
                        let at = (offset + p.off - base) as usize;
                        copy(Seg::Guarded(region, at, pos, n)).map_err(|errno| {
                            self.fault(DmaError::File {
                                iova: p.map.range.start() + p.off,
                                len: n as u64,
                                access,
                                errno,
                            })
                        })?;
                        // Also reported in `file_bytes` (see `stats`): one atomic here.
                        self.guarded_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    FileAccess::Mem { region, base, .. } => {
                        // The backing covers the mapping (checked at map time).
                        let at = (offset + p.off - base) as usize;
                        copy(Seg::Mem(region, at, pos, n)).map_err(|_| {
                            DmaError::Invalid("mapping smaller than recorded".into())
                        })?;
                        self.in_place_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    FileAccess::Calls(file) => {
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
                    // Only a mapping without permissions has no access, and the walk refuses
                    // every access to one.
                    FileAccess::Nothing => {
                        return Err(self.fault(DmaError::Permission {
                            iova: p.map.range.start() + p.off,
                            access,
                        }))
                    }
                },
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
            Seg::Guarded(region, off, pos, n) => {
                let buf = &mut buf[pos..pos + n];
                let src = guarded_ptr(region, off, n)?;
                // SAFETY: `src` is `n` bytes inside the live mapping `region` (checked by
                // `guarded_ptr`; the table's shared lock keeps it mapped), whose pages
                // the owner may take away (a recovered fault); `buf` is our own memory
                // and cannot overlap a file mapping; the handler was installed before
                // the backing was created.
                let done = unsafe { crate::guard::load(buf.as_mut_ptr(), src, n) };
                guarded_result(done)
            }
            Seg::File(file, at, pos, n) => {
                crate::file_io::read_at(file, at, &mut buf[pos..pos + n])
            }
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
            Seg::Guarded(region, off, pos, n) => {
                let data = &data[pos..pos + n];
                let dst = guarded_ptr(region, off, n)?;
                // SAFETY: as in `read`. The routine's probe reads the last byte: x86
                // pages that are writable are also readable.
                let done = unsafe { crate::guard::store(dst, data.as_ptr(), n) };
                guarded_result(done)
            }
            // A write to memory the owner has cut off is a fault, like a read of it.
            Seg::File(file, at, pos, n) => crate::file_io::write_at(file, at, &data[pos..pos + n]),
            Seg::Peer(peer, addr, pos, n) => peer.dma_write(addr, &data[pos..pos + n]),
        })
    }
}

/// The address of `n` bytes at `off` in `region`, checked to lie inside it.
fn guarded_ptr(region: &MmapRegion<()>, off: usize, n: usize) -> Result<*mut u8, i32> {
    if off.checked_add(n).is_none_or(|end| end > region.size()) {
        return Err(libc::EFAULT);
    }
    // SAFETY: `off` is inside the region (checked above), so the pointer stays within
    // its allocation.
    Ok(unsafe { region.as_ptr().add(off) })
}

/// A guarded copy's outcome as the errno of a [`DmaError::File`]: 0 (end of file) when
/// the owner truncated the file under the mapping (SIGBUS), EFAULT otherwise.
fn guarded_result(done: crate::guard::Copied) -> Result<(), i32> {
    match done.left {
        0 => Ok(()),
        _ if done.signal == libc::SIGBUS as usize => Err(0),
        _ => Err(libc::EFAULT),
    }
}
