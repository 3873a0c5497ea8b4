//! Guest RAM backed by a memfd.
//!
//! The RAM is one memfd mapped `MAP_SHARED` in this process (vm-memory
//! `GuestMemoryMmap`) and registered with KVM as memory slot 0 at guest physical 0. The
//! memfd itself is kept as `Arc<OwnedFd>` so that every assigned device receives it in a
//! DMA_MAP (`DmaBacking::Fd`) and maps the very same pages: device DMA is zero-copy,
//! whether the device runs in this process or in another one.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Smallest RAM the guest layout needs (page tables, stack, payload at 2 MiB).
pub const MIN_RAM: u64 = 4 << 20;
/// Largest RAM: everything below the PCI MMIO window at 3 GiB.
pub const MAX_RAM: u64 = 0xc000_0000;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is unusable.
    #[error("guest memory of {size:#x} bytes is not possible: it must be a multiple of 2 MiB between 4 MiB and 3 GiB (e.g. --memory 64M)")]
    BadSize {
        /// Requested size.
        size: u64,
    },
    /// memfd_create / ftruncate failed.
    #[error("cannot create the guest RAM memfd: {0}")]
    Memfd(std::io::Error),
    /// Mapping the memfd failed.
    #[error("cannot map guest RAM: {0}")]
    Map(String),
}

/// Guest RAM: a memfd and its mapping.
pub struct GuestRam {
    fd: Arc<OwnedFd>,
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// RAM of `size` bytes at guest physical 0.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if !(MIN_RAM..=MAX_RAM).contains(&size) || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize { size });
        }
        // SAFETY: the name is a valid NUL-terminated string; the result is checked.
        let raw = unsafe { libc::memfd_create(c"nestio-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on an fd we own; the result is checked.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        let file = File::from(fd.try_clone().map_err(MemoryError::Memfd)?);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam {
            fd: Arc::new(fd),
            mem,
            size,
        })
    }

    /// The memfd (for DMA_MAP to devices).
    pub fn fd(&self) -> &Arc<OwnedFd> {
        &self.fd
    }

    /// The mapping.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of guest physical 0 (for the KVM memory slot).
    pub fn host_address(&self) -> u64 {
        use vm_memory::GuestMemoryBackend;
        // The single region starts at guest 0 and is `size` long (checked in `new`).
        self.mem
            .get_host_address(GuestAddress(0))
            .map(|p| p as u64)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn sizes_are_checked() {
        assert!(GuestRam::new(0).is_err());
        assert!(GuestRam::new(3 << 20).is_err());
        assert!(GuestRam::new(5 << 20).is_err());
        assert!(GuestRam::new(MAX_RAM + (2 << 20)).is_err());
    }

    #[test]
    fn memfd_shares_the_pages() {
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        let mut b = [0u8; 4];
        // SAFETY: pread into a local buffer from an fd we own.
        let n = unsafe { libc::pread(ram.fd().as_raw_fd(), b.as_mut_ptr().cast(), 4, 0x1000) };
        assert_eq!(n, 4);
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        assert_ne!(ram.host_address(), 0);
        assert!(ram.memory().read_obj::<u32>(GuestAddress(4 << 20)).is_err());
    }
}
