//! DMA without an IOMMU (a VFIO **noiommu** container): locked mappings of a file and
//! the physical addresses of their pages.
//!
//! A noiommu container has no translation and no VFIO_IOMMU_MAP_DMA: the device reads
//! and writes *physical* addresses. A vfio-user client's DMA_MAP can therefore only be
//! honoured when the IOVA it names already *is* the physical address of the memory it
//! maps. [`pin_for_noiommu`] is the server's side of that contract, for each DMA_MAP:
//!
//! 1. the request is checked: an fd-backed mapping (no message-based DMA: the device
//!    cannot send messages), IOVA, size and file offset multiples of 4 KiB, and the
//!    file a sealed tmpfs file (a memfd sealed with `F_SEAL_SHRINK`, as nestio's guest
//!    memory always is) large enough for the range — a file that may shrink could lose
//!    pages the device still writes, and page-cache pages of a disk file are not
//!    marked dirty by DMA;
//! 2. the range is mmapped here; every page must already be in memory (`mincore`: the
//!    client locked them, as it must to know their addresses), so the server never
//!    allocates memory on a client's behalf — a hostile client cannot make it populate
//!    a huge sparse file; then it is **locked** (`mlock`), so its pages stay resident
//!    while mapped ([`LockedMapping::of_resident`], unlocked by `munmap` when the
//!    mapping is dropped at DMA_UNMAP or when the client leaves);
//! 3. every page's physical address is read from `/proc/self/pagemap` (which shows
//!    frame numbers to `CAP_SYS_ADMIN` only: the server runs as root, as noiommu VFIO
//!    needs `CAP_SYS_RAWIO` anyway) and the map is **refused with EPERM** when any
//!    page's address differs from `IOVA + offset of that page` (or a page is not in
//!    memory): the request is well formed, but without an IOMMU the device is not
//!    permitted to DMA there. A map without an fd is ENOTSUP (the device cannot reach
//!    memory through messages); malformed requests (unaligned) stay EINVAL. The
//!    vfio-user conformance suite reports such a device's DMA checks RESTRICTED.
//!
//! A client does the same from its side ([`LockedMapping::physical_addresses`],
//! [`contiguous_runs`]): lock its memory, read where each page is, and DMA_MAP each
//! physically contiguous run of pages at its physical address.
//!
//! **This stays unsafe**, exactly as Linux says of noiommu mode (it taints the kernel):
//! nothing confines the device, whose DMA reaches all physical memory whatever was
//! mapped (so whoever can program the device — any client of the socket — owns the
//! machine; the server admits only its own uid by default); `mlock` keeps pages
//! resident but does not forbid the kernel to *migrate* them (compaction, NUMA
//! balancing, memory hot-unplug), after which the device would write a page that now
//! belongs to someone else; and mapping permissions cannot be enforced. The check
//! catches a client that programs IOVAs as if an IOMMU existed; it does not make a
//! noiommu device safe. (The nestio test kernel has neither compaction nor migration.)

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use nestio_dma::memfd::{check_dma_file, Sharing};
use nestio_dma::{DmaBacking, DmaMapRequest, Prot};

/// The page size noiommu maps are checked at.
pub const PAGE_SIZE: u64 = 4096;

/// Pagemap entry: page present.
const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entry: page frame number (bits 0-54).
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Why a locked mapping or a noiommu DMA map could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NoIommuError {
    /// An address, size or offset is not page aligned.
    #[error("noiommu DMA map: the {what} {value:#x} is not a multiple of the 4 KiB page size; map whole pages")]
    Unaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// The mapping is not backed by a file descriptor.
    #[error("noiommu DMA map without a file descriptor: a device without an IOMMU DMAs physical memory directly and cannot reach memory by vfio-user messages; send the memory's fd")]
    NoFd,
    /// The file cannot back noiommu DMA.
    #[error("noiommu DMA map: {0}")]
    File(String),
    /// The file's checks failed with an errno.
    #[error("noiommu DMA map: {reason}")]
    FileErrno {
        /// Why.
        reason: String,
        /// The errno for the reply.
        errno: i32,
    },
    /// The range is larger than this process can map.
    #[error("a mapping of {0:#x} bytes is larger than this process's address space")]
    TooLarge(u64),
    /// mmap failed.
    #[error("cannot mmap {len:#x} bytes at file offset {offset:#x}: {source}")]
    Mmap {
        /// File offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The error.
        source: io::Error,
    },
    /// mlock failed.
    #[error("cannot lock {len:#x} bytes in memory: {source} (run as root or raise RLIMIT_MEMLOCK: noiommu DMA needs resident pages)")]
    Lock {
        /// Length.
        len: u64,
        /// The error.
        source: io::Error,
    },
    /// /proc/self/pagemap could not be read.
    #[error("cannot read /proc/self/pagemap: {0} (the kernel needs CONFIG_PROC_PAGE_MONITOR)")]
    Pagemap(io::Error),
    /// The kernel hides frame numbers from this process.
    #[error("/proc/self/pagemap hides physical addresses from this process: reading them needs CAP_SYS_ADMIN (run as root)")]
    Hidden,
    /// A page of the map is not in memory (the client did not lock it).
    #[error("noiommu DMA map refused: page {index} of the range is not in memory; a client without an IOMMU must lock its pages (mlock) and DMA_MAP them at their physical addresses")]
    NotResident {
        /// Page index in the mapping.
        index: u64,
    },
    /// mincore failed.
    #[error("cannot tell which pages of the mapping are in memory: mincore: {0}")]
    Mincore(io::Error),
    /// A locked page is not resident (should not happen).
    #[error("page {index} of a locked mapping is not resident")]
    NotPresent {
        /// Page index in the mapping.
        index: usize,
    },
    /// A page is not at the physical address the IOVA names.
    #[error("noiommu DMA map [{iova:#x}, +{len:#x}) refused: its page {index} is at physical address {pa:#x}, not at {want:#x}; without an IOMMU the device uses physical addresses, so map each physically contiguous run of locked pages at its physical address (see /proc/self/pagemap)")]
    Mismatch {
        /// IOVA of the map.
        iova: u64,
        /// Length of the map.
        len: u64,
        /// The first page that differs.
        index: usize,
        /// Its physical address.
        pa: u64,
        /// The IOVA of that page.
        want: u64,
    },
}

impl NoIommuError {
    /// The errno a vfio-user reply carries.
    pub fn errno(&self) -> i32 {
        match self {
            NoIommuError::Unaligned { .. }
            | NoIommuError::File(_)
            | NoIommuError::NotPresent { .. } => libc::EINVAL,
            NoIommuError::Mismatch { .. } | NoIommuError::NotResident { .. } => libc::EPERM,
            NoIommuError::NoFd => libc::ENOTSUP,
            NoIommuError::FileErrno { errno, .. } => *errno,
            NoIommuError::TooLarge(_) => libc::ENOMEM,
            NoIommuError::Mmap { source, .. }
            | NoIommuError::Lock { source, .. }
            | NoIommuError::Mincore(source)
            | NoIommuError::Pagemap(source) => source.raw_os_error().unwrap_or(libc::EIO),
            NoIommuError::Hidden => libc::EPERM,
        }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, NoIommuError>;

/// A shared mapping of part of a file, locked in memory for its whole life (module
/// documentation). Never dereferenced by nestio: it only keeps pages resident and
/// tells where they are.
pub struct LockedMapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is an address range owned by this struct; nestio never reads or
// writes through it (only the kernel looks at it: mlock, pagemap), so it may move
// between threads and be shared.
unsafe impl Send for LockedMapping {}
// SAFETY: as above; every method takes `&self` and only reads the two fields.
unsafe impl Sync for LockedMapping {}

impl std::fmt::Debug for LockedMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedMapping")
            .field("addr", &self.addr)
            .field("len", &self.len)
            .finish()
    }
}

impl LockedMapping {
    /// Map `len` bytes of `fd` from `offset` (both page aligned, `len` > 0) shared and
    /// read-only, and lock them in memory (which faults every page in: the owner's
    /// side, e.g. a driver locking its own memory).
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<Self> {
        Self::map_and_lock(fd, offset, len, false)
    }

    /// [`LockedMapping::new`] for memory someone else owns (a server locking a
    /// client's pages): refused unless every page is already in memory, so nothing is
    /// allocated here.
    pub fn of_resident(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<Self> {
        Self::map_and_lock(fd, offset, len, true)
    }

    fn map_and_lock(fd: BorrowedFd<'_>, offset: u64, len: u64, resident: bool) -> Result<Self> {
        check_aligned("file offset", offset)?;
        check_aligned("size", len)?;
        if len == 0 {
            return Err(NoIommuError::Unaligned {
                what: "size",
                value: 0,
            });
        }
        let ulen = usize::try_from(len).map_err(|_| NoIommuError::TooLarge(len))?;
        let off = libc::off_t::try_from(offset).map_err(|_| NoIommuError::Mmap {
            offset,
            len,
            source: io::Error::from_raw_os_error(libc::EOVERFLOW),
        })?;
        // SAFETY: a new shared read-only mapping chosen by the kernel; the result is
        // checked, and nestio never dereferences it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(NoIommuError::Mmap {
                offset,
                len,
                source: io::Error::last_os_error(),
            });
        }
        // Owned from here: an error below unmaps it.
        let m = LockedMapping { addr, len: ulen };
        if resident {
            m.check_resident()?;
        }
        // SAFETY: `addr`/`ulen` are exactly the mapping made above.
        if unsafe { libc::mlock(m.addr, m.len) } != 0 {
            return Err(NoIommuError::Lock {
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(m)
    }

    /// Fail unless every page of the mapping is in the page cache (without faulting any
    /// in). `mincore` is asked in chunks, so a huge mapping costs no huge vector.
    fn check_resident(&self) -> Result<()> {
        const CHUNK: usize = 4096; // pages per mincore call
        let pages = self.pages();
        let mut vec = vec![0u8; CHUNK.min(pages)];
        let mut first = 0usize;
        while first < pages {
            let n = CHUNK.min(pages - first);
            // SAFETY: the range is inside our own mapping (page `first`, `n` pages) and
            // `vec` has room for `n` bytes, one per page.
            let r = unsafe {
                libc::mincore(
                    (self.addr as *mut u8)
                        .add(first * PAGE_SIZE as usize)
                        .cast(),
                    n * PAGE_SIZE as usize,
                    vec.as_mut_ptr(),
                )
            };
            if r != 0 {
                return Err(NoIommuError::Mincore(io::Error::last_os_error()));
            }
            if let Some(i) = vec[..n].iter().position(|&b| b & 1 == 0) {
                return Err(NoIommuError::NotResident {
                    index: (first + i) as u64,
                });
            }
            first += n;
        }
        Ok(())
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Always false: a locked mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Pages in the mapping.
    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE as usize
    }

    /// The physical address of each page, from `/proc/self/pagemap`.
    pub fn physical_addresses(&self) -> Result<Vec<u64>> {
        let f = std::fs::File::open("/proc/self/pagemap").map_err(NoIommuError::Pagemap)?;
        let first = self.addr as u64 / PAGE_SIZE;
        let n = self.pages();
        let mut raw = vec![0u8; n * 8];
        f.read_exact_at(&mut raw, first * 8)
            .map_err(NoIommuError::Pagemap)?;
        raw.chunks_exact(8)
            .enumerate()
            .map(|(index, e)| {
                let e = u64::from_ne_bytes(e.try_into().expect("8-byte chunk"));
                if e & PM_PRESENT == 0 {
                    return Err(NoIommuError::NotPresent { index });
                }
                match e & PM_PFN_MASK {
                    0 => Err(NoIommuError::Hidden),
                    pfn => pfn.checked_mul(PAGE_SIZE).ok_or_else(|| {
                        NoIommuError::Pagemap(io::Error::other(format!(
                            "frame number {pfn:#x} of page {index} is beyond 64-bit addresses"
                        )))
                    }),
                }
            })
            .collect()
    }
}

impl Drop for LockedMapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly a mapping this struct made and owns; munmap
        // also unlocks it.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

fn check_aligned(what: &'static str, value: u64) -> Result<()> {
    if !value.is_multiple_of(PAGE_SIZE) {
        return Err(NoIommuError::Unaligned { what, value });
    }
    Ok(())
}

/// Check that page `i` of a map at `iova` is at physical address `iova + i * 4 KiB`.
pub fn check_identity(iova: u64, pas: &[u64]) -> Result<()> {
    let len = (pas.len() as u64).saturating_mul(PAGE_SIZE);
    for (index, &pa) in pas.iter().enumerate() {
        let want = (index as u64)
            .checked_mul(PAGE_SIZE)
            .and_then(|o| iova.checked_add(o));
        if want != Some(pa) {
            return Err(NoIommuError::Mismatch {
                iova,
                len,
                index,
                pa,
                want: want.unwrap_or(u64::MAX),
            });
        }
    }
    Ok(())
}

/// A physically contiguous run of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Index of its first page in the list it came from.
    pub first: usize,
    /// Physical address of that page.
    pub pa: u64,
    /// Pages in the run.
    pub pages: usize,
}

/// Split per-page physical addresses into runs of consecutive pages: what a client
/// DMA_MAPs one by one, each at its physical address.
pub fn contiguous_runs(pas: &[u64]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (i, &pa) in pas.iter().enumerate() {
        match runs.last_mut() {
            Some(r)
                if (r.pages as u64)
                    .checked_mul(PAGE_SIZE)
                    .and_then(|o| r.pa.checked_add(o))
                    == Some(pa) =>
            {
                r.pages += 1
            }
            _ => runs.push(Run {
                first: i,
                pa,
                pages: 1,
            }),
        }
    }
    runs
}

/// The server's side of a DMA_MAP in a noiommu container (module documentation):
/// checks the request and the file, locks the range and proves `IOVA == physical
/// address` for every page. The returned mapping must be kept while the map exists.
pub fn pin_for_noiommu(req: &DmaMapRequest) -> Result<LockedMapping> {
    let iova = req.range.start();
    let len = req.range.len();
    check_aligned("IOVA", iova)?;
    check_aligned("size", len)?;
    let DmaBacking::Fd { fd, offset } = &req.backing else {
        return Err(NoIommuError::NoFd);
    };
    check_aligned("file offset", *offset)?;
    // The permissions are checked against the fd's access mode as for any mapping,
    // although without an IOMMU nothing can enforce them on the device.
    let prot = if req.prot == Prot::NONE {
        Prot::READ
    } else {
        req.prot
    };
    let file = check_dma_file(fd.as_fd(), prot).map_err(|e| NoIommuError::FileErrno {
        errno: e.errno(),
        reason: e.to_string(),
    })?;
    if file.sharing != Sharing::InPlace {
        return Err(NoIommuError::File(
            "the file is not a sealed tmpfs file: send a memfd sealed with F_SEAL_SHRINK, \
             whose pages cannot be truncated away under the device"
                .into(),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file.size => {}
        _ => {
            return Err(NoIommuError::File(format!(
                "[{offset:#x}, +{len:#x}) is outside the file's {:#x} bytes",
                file.size
            )))
        }
    }
    let m = LockedMapping::of_resident(fd.as_fd(), *offset, len)?;
    check_identity(iova, &m.physical_addresses()?)?;
    Ok(m)
}
