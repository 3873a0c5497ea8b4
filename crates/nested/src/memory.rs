//! Guest-physical memory: read and write bytes at a guest-physical address.
//!
//! [`GuestPhysMemory`] is the one interface the page walker, the copy layer and the level
//! views use. Every access names an address and a length; the implementation checks the
//! whole range (no wrap, inside the memory) *before* any byte moves, so a refused access has
//! no partial effect, and reports a [`MemError`] instead of panicking.
//!
//! Implementations:
//! - [`MmapMemory`]: a volatile mapping of a memfd (shared, can be handed to a VMM or a
//!   device process by fd) or of anonymous memory. Accessed only through vm-memory's
//!   `VolatileSlice` copies: guest memory is shared with the guest, so no Rust reference
//!   (`&[u8]`) is ever formed over it.
//! - [`DmaMemory`]: any [`nestio_dma::DmaSpace`] (a vfio-user DMA map table, a peer reached
//!   by messages, a [`crate::NestedDma`] chain) with a known extent.
//! - vm-memory's `GuestMemoryMmap` (a running VMM's guest RAM), extent = highest address + 1;
//!   holes between regions are errors.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nestio_dma::{DmaError, DmaSpace};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory,
};

use crate::level::LevelError;

/// A refused guest-physical memory access, or a memory that could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The access reaches past the end of the memory.
    #[error("access of {len} bytes at guest-physical {gpa:#x} is outside the guest's {size:#x} bytes of memory; use an address below the guest's memory size")]
    OutOfRange {
        /// First address of the access.
        gpa: u64,
        /// Length of the access.
        len: u64,
        /// Size of the memory.
        size: u64,
    },
    /// Address plus length wraps the 64-bit space.
    #[error("access of {len} bytes at guest-physical {gpa:#x} wraps the 64-bit address space")]
    Overflow {
        /// First address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A level window refused the access on the way to host memory.
    #[error("nested window check failed: {0}")]
    Window(#[from] LevelError),
    /// The DMA space backing this memory refused the access.
    #[error("guest-physical access at {gpa:#x} refused by the DMA space: {source}")]
    Dma {
        /// Address of the access.
        gpa: u64,
        /// The DMA error.
        #[source]
        source: DmaError,
    },
    /// vm-memory refused the access (address in a hole between regions).
    #[error(
        "guest memory access at {gpa:#x} failed: {reason}; the address is not backed by guest RAM"
    )]
    Backend {
        /// Address of the access.
        gpa: u64,
        /// vm-memory's message.
        reason: String,
    },
    /// The memory could not be created or mapped.
    #[error("cannot set up guest memory of {size:#x} bytes: {reason}")]
    Create {
        /// Requested size.
        size: u64,
        /// What failed.
        reason: String,
    },
}

/// Check that `[gpa, gpa+len)` lies inside `[0, size)`.
pub(crate) fn check_range(gpa: u64, len: u64, size: u64) -> Result<(), MemError> {
    let end = gpa
        .checked_add(len)
        .ok_or(MemError::Overflow { gpa, len })?;
    if end > size {
        return Err(MemError::OutOfRange { gpa, len, size });
    }
    Ok(())
}

/// Byte access to a guest's physical address space `[0, size())`.
pub trait GuestPhysMemory: Send + Sync {
    /// Bytes of guest-physical address space: valid addresses are `0..size()`.
    fn size(&self) -> u64;
    /// Copy `buf.len()` bytes at `gpa` into `buf`; all or nothing.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copy `data` to `gpa`; all or nothing.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError>;

    /// Read a little-endian u64 (one read of 8 bytes).
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Write a little-endian u64.
    fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemError> {
        self.write(gpa, &v.to_le_bytes())
    }
}

impl<T: GuestPhysMemory + ?Sized> GuestPhysMemory for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        (**self).read(gpa, buf)
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        (**self).write(gpa, data)
    }
}

impl<T: GuestPhysMemory + ?Sized> GuestPhysMemory for &T {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        (**self).read(gpa, buf)
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        (**self).write(gpa, data)
    }
}

/// Guest memory as a volatile mmap (memfd-backed or anonymous).
pub struct MmapMemory {
    region: MmapRegion<()>,
    fd: Option<Arc<OwnedFd>>,
}

impl std::fmt::Debug for MmapMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmapMemory")
            .field("size", &self.region.size())
            .field("fd", &self.fd.as_ref().map(|fd| fd.as_raw_fd()))
            .finish()
    }
}

fn create_err(size: u64, what: &str, e: impl std::fmt::Display) -> MemError {
    MemError::Create {
        size,
        reason: format!("{what}: {e}"),
    }
}

impl MmapMemory {
    /// `size` bytes of zeroed memory in a new memfd, mapped shared (the fd can be passed to
    /// another process with [`MmapMemory::fd`]).
    pub fn memfd(size: u64) -> Result<Self, MemError> {
        if size == 0 {
            return Err(create_err(size, "size", "must not be zero"));
        }
        let fd = nestio_dma::memfd::sealed_memfd(c"nestio-nested", size)
            .map_err(|e| create_err(size, "memfd_create", e))?;
        Self::from_fd(Arc::new(fd), 0, size)
    }

    /// Map `size` bytes of `fd` starting at `offset` (shared). The file must be a tmpfs
    /// file sealed against shrinking (a level's guest RAM memfd; see
    /// [`nestio_dma::memfd`]) at least `offset + size` bytes long: a mapping past EOF,
    /// or of a file its owner can still shrink, would SIGBUS on access.
    pub fn from_fd(fd: Arc<OwnedFd>, offset: u64, size: u64) -> Result<Self, MemError> {
        let len = usize::try_from(size).map_err(|e| create_err(size, "size", e))?;
        if len == 0 {
            return Err(create_err(size, "size", "must not be zero"));
        }
        let end = offset
            .checked_add(size)
            .ok_or_else(|| create_err(size, "offset + size", "wraps"))?;
        let file = File::from(fd.try_clone().map_err(|e| create_err(size, "dup", e))?);
        // Seals before size (a seal, once seen, stays; see nestio_dma::memfd).
        if !nestio_dma::memfd::shrink_proof(&file).map_err(|e| create_err(size, "fstat", e))? {
            return Err(create_err(
                size,
                "file",
                "not a tmpfs file sealed against shrinking (F_SEAL_SHRINK): mapping it \
                 would let its owner crash this process",
            ));
        }
        let meta = file.metadata().map_err(|e| create_err(size, "fstat", e))?;
        if meta.len() < end {
            return Err(create_err(
                size,
                "file too small",
                format!("needs {end:#x} bytes, has {:#x}", meta.len()),
            ));
        }
        let region = MmapRegion::build(
            Some(FileOffset::new(file, offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| create_err(size, "mmap", e))?;
        Ok(MmapMemory {
            region,
            fd: Some(fd),
        })
    }

    /// `size` bytes of private anonymous zeroed memory (tests, fuzzing).
    pub fn anonymous(size: u64) -> Result<Self, MemError> {
        let len = usize::try_from(size).map_err(|e| create_err(size, "size", e))?;
        if len == 0 {
            return Err(create_err(size, "size", "must not be zero"));
        }
        let region = MmapRegion::new(len).map_err(|e| create_err(size, "mmap", e))?;
        Ok(MmapMemory { region, fd: None })
    }

    /// The memfd behind this memory, if any.
    pub fn fd(&self) -> Option<&Arc<OwnedFd>> {
        self.fd.as_ref()
    }

    fn slice(&self, gpa: u64, len: usize) -> Result<vm_memory::VolatileSlice<'_>, MemError> {
        check_range(gpa, len as u64, self.size())?;
        // In range, so gpa < size <= usize::MAX.
        self.region
            .get_slice(gpa as usize, len)
            .map_err(|e| MemError::Backend {
                gpa,
                reason: e.to_string(),
            })
    }
}

impl GuestPhysMemory for MmapMemory {
    fn size(&self) -> u64 {
        self.region.size() as u64
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        if buf.is_empty() {
            return check_range(gpa, 0, self.size());
        }
        self.slice(gpa, buf.len())?.copy_to(buf);
        Ok(())
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        if data.is_empty() {
            return check_range(gpa, 0, self.size());
        }
        self.slice(gpa, data.len())?.copy_from(data);
        Ok(())
    }
}

/// A [`DmaSpace`] seen as guest-physical memory of a given extent.
pub struct DmaMemory<D: DmaSpace> {
    space: D,
    size: u64,
}

impl<D: DmaSpace> DmaMemory<D> {
    /// Addresses `0..size` of `space`. Accesses beyond `size` are refused here; inside it,
    /// the DMA space makes its own checks.
    pub fn new(space: D, size: u64) -> Self {
        DmaMemory { space, size }
    }
    /// The underlying DMA space.
    pub fn space(&self) -> &D {
        &self.space
    }
}

impl<D: DmaSpace> GuestPhysMemory for DmaMemory<D> {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        check_range(gpa, buf.len() as u64, self.size)?;
        self.space
            .read(gpa, buf)
            .map_err(|source| MemError::Dma { gpa, source })
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        check_range(gpa, data.len() as u64, self.size)?;
        self.space
            .write(gpa, data)
            .map_err(|source| MemError::Dma { gpa, source })
    }
}

fn guest_mem_size(mem: &GuestMemoryMmap<()>) -> u64 {
    if mem.num_regions() == 0 {
        0
    } else {
        mem.last_addr().0.saturating_add(1)
    }
}

impl GuestPhysMemory for GuestMemoryMmap<()> {
    fn size(&self) -> u64 {
        guest_mem_size(self)
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        check_range(gpa, buf.len() as u64, guest_mem_size(self))?;
        self.read_slice(buf, GuestAddress(gpa))
            .map_err(|e| MemError::Backend {
                gpa,
                reason: e.to_string(),
            })
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        check_range(gpa, data.len() as u64, guest_mem_size(self))?;
        self.write_slice(data, GuestAddress(gpa))
            .map_err(|e| MemError::Backend {
                gpa,
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_memory_bounds_and_roundtrip() {
        let m = MmapMemory::memfd(0x2000).unwrap();
        assert!(m.fd().is_some());
        m.write(0x1ffc, &[1, 2, 3, 4]).unwrap();
        let mut b = [0u8; 4];
        m.read(0x1ffc, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(matches!(
            m.write(0x1ffd, &[1, 2, 3, 4]),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.read(u64::MAX, &mut b),
            Err(MemError::Overflow { .. })
        ));
        // The refused write left memory untouched.
        m.read(0x1ffc, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(MmapMemory::memfd(0).is_err());
    }

    #[test]
    fn fd_too_small_is_refused() {
        let m = MmapMemory::memfd(0x1000).unwrap();
        let fd = m.fd().unwrap().clone();
        assert!(matches!(
            MmapMemory::from_fd(fd.clone(), 0x800, 0x1000),
            Err(MemError::Create { .. })
        ));
        // A second mapping of the same fd sees the same bytes.
        let m2 = MmapMemory::from_fd(fd, 0, 0x1000).unwrap();
        m.write_u64(8, 0xdead_beef).unwrap();
        assert_eq!(m2.read_u64(8).unwrap(), 0xdead_beef);
    }

    #[test]
    fn guest_memory_mmap_holes_are_errors() {
        let gm = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x2000), 0x1000),
        ])
        .unwrap();
        assert_eq!(GuestPhysMemory::size(&gm), 0x3000);
        GuestPhysMemory::write(&gm, 0x2000, &[7; 8]).unwrap();
        let mut b = [0u8; 8];
        GuestPhysMemory::read(&gm, 0x2000, &mut b).unwrap();
        assert_eq!(b, [7; 8]);
        assert!(GuestPhysMemory::read(&gm, 0x1800, &mut b).is_err());
        assert!(matches!(
            GuestPhysMemory::read(&gm, 0x2ffc, &mut b),
            Err(MemError::OutOfRange { .. })
        ));
    }

    #[test]
    fn dma_memory_maps_errors() {
        struct Fail;
        impl DmaSpace for Fail {
            fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
                Err(DmaError::Unmapped {
                    iova,
                    len: buf.len() as u64,
                    access: nestio_dma::Access::Read,
                })
            }
            fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
                Err(DmaError::Unmapped {
                    iova,
                    len: data.len() as u64,
                    access: nestio_dma::Access::Write,
                })
            }
        }
        let m = DmaMemory::new(Fail, 0x1000);
        let mut b = [0u8; 4];
        assert!(matches!(
            m.read(0, &mut b),
            Err(MemError::Dma { gpa: 0, .. })
        ));
        assert!(matches!(
            m.read(0xffe, &mut b),
            Err(MemError::OutOfRange { .. })
        ));
    }
}
