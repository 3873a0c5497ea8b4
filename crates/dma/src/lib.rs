//! DMA address spaces.
//!
//! Every DMA a device makes goes through a [`DmaSpace`]: the device names an I/O virtual
//! address (IOVA) and a length, and the space either copies the bytes or reports a
//! [`DmaError`] — it never touches memory outside what the device's owner granted.
//!
//! The building blocks:
//! - [`MapTable`] is the flat map that a vfio-user client (or a VMM) builds with DMA_MAP /
//!   DMA_UNMAP. A mapping is backed either by a file descriptor (guest RAM shared by fd,
//!   mmapped here and accessed in place — zero copy — with vm-memory's volatile copies
//!   when the file is sealed against shrinking, see [`memfd`]; with a fault-tolerant
//!   copy routine otherwise, whose SIGBUS on a page the peer truncated away is recovered
//!   and reported as a DMA fault, so a peer cannot crash us by truncating it (module
//!   `guard`); or, when asked, with `pread`/`pwrite`), or by a
//!   [`DmaPeer`], the owner of the memory reached by messages (vfio-user DMA_READ/WRITE).
//!   All mappings of one file share one backing (one mmap or one private fd), so a
//!   vIOMMU's hundreds of thousands of page-sized maps cost O(1) fds and VMAs; every fd
//!   a peer sends is checked first by [`memfd::check_dma_file`].
//! - [`DirtyLog`] records the pages a device wrote while logging is on (VFIO
//!   DMA_LOGGING_START/REPORT), so migration can copy only what changed.
//!
//! Guest memory is shared with the guest and other processes, so no Rust reference is
//! ever created over it: all access goes through vm-memory's `VolatileSlice`.
//!
//! Translating spaces (SMMUv3 stages, sPAPR TCE windows, nested levels) are further
//! implementations of [`DmaSpace`] that translate, check, and then delegate.

#[cfg(feature = "harness")]
pub mod bench;
mod dirty;
mod error;
pub mod file_io;
#[cfg(feature = "harness")]
pub mod fuzzing;
mod guard;
mod map_table;
pub mod memfd;
mod range;

pub use dirty::DirtyLog;
pub use error::{Access, DmaError};
pub use map_table::{
    DmaBacking, DmaMapRequest, MapTable, MapTableStats, MappingInfo, UnsealedAccess, SPLIT_GRANULE,
};
pub use range::{DmaRange, Prot};

/// The side that owns memory a device can reach only by messages (vfio-user DMA_READ /
/// DMA_WRITE sent to the client). Errors are errno values reported by the peer.
pub trait DmaPeer: Send + Sync {
    /// Read `buf.len()` bytes at peer address `addr`.
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), i32>;
    /// Write `data` at peer address `addr`.
    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), i32>;
}

/// A device's view of memory: every access is translated and checked.
pub trait DmaSpace: Send + Sync {
    /// Copy `buf.len()` bytes from IOVA `iova` into `buf`.
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    /// Copy `data` to IOVA `iova`.
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError>;
}

/// Typed helpers over any [`DmaSpace`] (little-endian, as PCI devices see memory).
pub trait DmaSpaceExt: DmaSpace {
    /// Read a little-endian u16.
    fn read_u16(&self, iova: u64) -> Result<u16, DmaError> {
        let mut b = [0u8; 2];
        self.read(iova, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    /// Read a little-endian u32.
    fn read_u32(&self, iova: u64) -> Result<u32, DmaError> {
        let mut b = [0u8; 4];
        self.read(iova, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    /// Read a little-endian u64.
    fn read_u64(&self, iova: u64) -> Result<u64, DmaError> {
        let mut b = [0u8; 8];
        self.read(iova, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Write a little-endian u16.
    fn write_u16(&self, iova: u64, v: u16) -> Result<(), DmaError> {
        self.write(iova, &v.to_le_bytes())
    }
    /// Write a little-endian u32.
    fn write_u32(&self, iova: u64, v: u32) -> Result<(), DmaError> {
        self.write(iova, &v.to_le_bytes())
    }
    /// Write a little-endian u64.
    fn write_u64(&self, iova: u64, v: u64) -> Result<(), DmaError> {
        self.write(iova, &v.to_le_bytes())
    }
}

impl<T: DmaSpace + ?Sized> DmaSpaceExt for T {}

impl<T: DmaSpace + ?Sized> DmaSpace for std::sync::Arc<T> {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        (**self).read(iova, buf)
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        (**self).write(iova, data)
    }
}
