//! Guest RAM backed by a memfd.
//!
//! The RAM is one memfd mapped `MAP_SHARED` in this process (vm-memory
//! `GuestMemoryMmap`) and registered with KVM as memory slot 0 at guest physical 0. The
//! memfd itself is kept as `Arc<OwnedFd>` so that every assigned device receives it in a
//! DMA_MAP (`DmaBacking::Fd`) and maps the very same pages: device DMA is zero-copy,
//! whether the device runs in this process or in another one.
//!
//! A nested level's RAM is not a fresh memfd but a window of its parent's RAM file
//! ([`GuestRam::from_file`], `nestio run --memory-from`): the same file at a non-zero
//! offset, so DMA maps name that offset ([`GuestRam::fd_offset`]).
//!
//! A level that exports a device to a nested guest builds its RAM from two memfds
//! ([`GuestRam::with_window`]): the nested guest's window (the top of RAM) is a file of
//! its own, so the RAM handoff can give the child exactly its window and nothing of the
//! parent's other memory (a memfd cannot be handed down in part). Each file is one
//! [`RamPart`] and one KVM memory slot.

use std::fs::File;
use std::os::fd::OwnedFd;
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
    /// A RAM file window that is not usable.
    #[error(
        "the RAM window of {size:#x} bytes at file offset {offset:#x} is not usable: {reason}"
    )]
    BadWindow {
        /// File offset.
        offset: u64,
        /// Size.
        size: u64,
        /// Why.
        reason: String,
    },
}

fn check_size(size: u64) -> Result<(), MemoryError> {
    if !(MIN_RAM..=MAX_RAM).contains(&size) || !size.is_multiple_of(2 << 20) {
        return Err(MemoryError::BadSize { size });
    }
    Ok(())
}

/// One file-backed piece of guest RAM: GPA `gpa..gpa+size` is `fd` at file offsets
/// `fd_offset..fd_offset+size` (one KVM memory slot).
#[derive(Debug, Clone)]
pub struct RamPart {
    /// First guest-physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// The file.
    pub fd: Arc<OwnedFd>,
    /// File offset of `gpa`.
    pub fd_offset: u64,
}

/// Guest RAM: one memfd (or two, see [`GuestRam::with_window`]) and its mapping.
pub struct GuestRam {
    fd: Arc<OwnedFd>,
    mem: GuestMemoryMmap,
    size: u64,
    fd_offset: u64,
    parts: Vec<RamPart>,
}

impl GuestRam {
    /// RAM of `size` bytes at guest physical 0.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        // Sealed against resizing: devices and child levels that receive this fd map it
        // in place, which is safe only because it can never shrink under them.
        let fd = nestio_dma::memfd::sealed_memfd(c"nestio-guest-ram", size)
            .map_err(MemoryError::Memfd)?;
        Self::map(Arc::new(fd), 0, size)
    }

    /// RAM of `size` bytes whose top `window` bytes (a nested guest's window: a multiple
    /// of 2 MiB, at least 4 MiB, less than `size`) are a separate sealed memfd, so that
    /// window alone can be handed to a child level. Two [`RamPart`]s.
    pub fn with_window(size: u64, window: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let base = size.wrapping_sub(window);
        if window < MIN_RAM || window >= size || !window.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadWindow {
                offset: base,
                size: window,
                reason: format!(
                    "a separate window must be a multiple of 2 MiB, at least 4 MiB and less \
                     than the {size:#x} bytes of RAM"
                ),
            });
        }
        let low = Arc::new(
            nestio_dma::memfd::sealed_memfd(c"nestio-guest-ram", base)
                .map_err(MemoryError::Memfd)?,
        );
        let win = Arc::new(
            nestio_dma::memfd::sealed_memfd(c"nestio-guest-ram-window", window)
                .map_err(MemoryError::Memfd)?,
        );
        let file = |fd: &Arc<OwnedFd>| -> Result<File, MemoryError> {
            Ok(File::from(fd.try_clone().map_err(MemoryError::Memfd)?))
        };
        let mem = GuestMemoryMmap::from_ranges_with_files([
            (
                GuestAddress(0),
                base as usize,
                Some(FileOffset::new(file(&low)?, 0)),
            ),
            (
                GuestAddress(base),
                window as usize,
                Some(FileOffset::new(file(&win)?, 0)),
            ),
        ])
        .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam {
            fd: low.clone(),
            mem,
            size,
            fd_offset: 0,
            parts: vec![
                RamPart {
                    gpa: 0,
                    size: base,
                    fd: low,
                    fd_offset: 0,
                },
                RamPart {
                    gpa: base,
                    size: window,
                    fd: win,
                    fd_offset: 0,
                },
            ],
        })
    }

    /// RAM of `size` bytes at guest physical 0 backed by `fd` at file offsets
    /// `offset..offset+size` (a window of a parent level's RAM, received from it).
    /// The size obeys the rules of [`GuestRam::new`]; the offset must be page aligned
    /// and the file a tmpfs file sealed against shrinking (the parent's guest RAM memfd,
    /// see [`nestio_dma::memfd`]) at least `offset + size` bytes long.
    pub fn from_file(fd: Arc<OwnedFd>, offset: u64, size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let bad = |reason: String| MemoryError::BadWindow {
            offset,
            size,
            reason,
        };
        if !offset.is_multiple_of(4096) {
            return Err(bad("the offset is not 4 KiB aligned".into()));
        }
        let end = offset
            .checked_add(size)
            .ok_or_else(|| bad("offset + size wraps".into()))?;
        let file = File::from(fd.try_clone().map_err(MemoryError::Memfd)?);
        // Guest RAM is used in place (and by KVM); a file its owner could still shrink
        // would turn the next access into SIGBUS. The seal is checked before the size:
        // once seen it stays, so the size cannot change after the check.
        if !nestio_dma::memfd::shrink_proof(&file).map_err(MemoryError::Memfd)? {
            return Err(bad(
                "the file is not a tmpfs file sealed against shrinking (F_SEAL_SHRINK); the \
                 parent must hand down its sealed guest RAM memfd"
                    .into(),
            ));
        }
        let len = file.metadata().map_err(MemoryError::Memfd)?.len();
        if len < end {
            return Err(bad(format!(
                "the file has only {len:#x} bytes, the window ends at {end:#x}"
            )));
        }
        Self::map(fd, offset, size)
    }

    fn map(fd: Arc<OwnedFd>, offset: u64, size: u64) -> Result<Self, MemoryError> {
        let file = File::from(fd.try_clone().map_err(MemoryError::Memfd)?);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file, offset)),
        )])
        .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam {
            parts: vec![RamPart {
                gpa: 0,
                size,
                fd: fd.clone(),
                fd_offset: offset,
            }],
            fd,
            mem,
            size,
            fd_offset: offset,
        })
    }

    /// The file-backed pieces of the RAM, by address (one unless built
    /// [`GuestRam::with_window`]).
    pub fn parts(&self) -> &[RamPart] {
        &self.parts
    }

    /// Host address of guest physical `gpa` (0 if it is not RAM).
    pub fn host_address_of(&self, gpa: u64) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .unwrap_or(0)
    }

    /// File offset of guest physical 0 in [`GuestRam::fd`] (0 unless the RAM is a
    /// window of a parent's RAM).
    pub fn fd_offset(&self) -> u64 {
        self.fd_offset
    }

    /// The memfd of guest physical 0 (for DMA_MAP to devices). It holds the whole RAM
    /// unless the RAM was built [`GuestRam::with_window`]: then only the first of
    /// [`GuestRam::parts`].
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
        let file = std::fs::File::from(ram.fd().try_clone().unwrap());
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        // Sealed: a device or child level that maps this fd can rely on its size.
        assert_eq!(
            file.set_len(1 << 20).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        assert_ne!(ram.host_address(), 0);
        assert!(ram.memory().read_obj::<u32>(GuestAddress(4 << 20)).is_err());
    }

    #[test]
    fn window_of_a_file_is_checked_and_shares_the_pages() {
        let parent = GuestRam::new(16 << 20).unwrap();
        let fd = parent.fd().clone();
        let child = GuestRam::from_file(fd.clone(), 8 << 20, 8 << 20).unwrap();
        assert_eq!(child.fd_offset(), 8 << 20);
        child
            .memory()
            .write_obj(0x1234_5678u32, GuestAddress(0x10))
            .unwrap();
        let v: u32 = parent
            .memory()
            .read_obj(GuestAddress((8 << 20) + 0x10))
            .unwrap();
        assert_eq!(
            v, 0x1234_5678,
            "the child's GPA 0x10 is the parent's 8M+0x10"
        );
        // Past the end of the file, unaligned, wrapping, bad sizes.
        assert!(matches!(
            GuestRam::from_file(fd.clone(), 10 << 20, 8 << 20),
            Err(MemoryError::BadWindow { .. })
        ));
        assert!(GuestRam::from_file(fd.clone(), 0x800, 4 << 20).is_err());
        assert!(GuestRam::from_file(fd.clone(), u64::MAX - 0xfff, 4 << 20).is_err());
        assert!(GuestRam::from_file(fd.clone(), 0, 3 << 20).is_err());
    }

    #[test]
    fn a_separate_window_is_its_own_file_and_the_ram_is_seamless() {
        let ram = GuestRam::with_window(16 << 20, 6 << 20).unwrap();
        let parts = ram.parts();
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].gpa, parts[0].size), (0, 10 << 20));
        assert_eq!(
            (parts[1].gpa, parts[1].size, parts[1].fd_offset),
            (10 << 20, 6 << 20, 0)
        );
        let len = |fd: &Arc<OwnedFd>| {
            File::from(fd.try_clone().unwrap())
                .metadata()
                .unwrap()
                .len()
        };
        assert_eq!(len(&parts[0].fd), 10 << 20);
        assert_eq!(
            len(&parts[1].fd),
            6 << 20,
            "the window file holds the window only"
        );
        // An access across the boundary lands in both files.
        ram.memory()
            .write_slice(&[1, 2, 3, 4], GuestAddress((10 << 20) - 2))
            .unwrap();
        let mut b = [0u8; 2];
        let w = File::from(parts[1].fd.try_clone().unwrap());
        std::os::unix::fs::FileExt::read_exact_at(&w, &mut b, 0).unwrap();
        assert_eq!(b, [3, 4]);
        // A child maps the window file whole, as its RAM.
        let child = GuestRam::from_file(parts[1].fd.clone(), 0, 6 << 20).unwrap();
        assert_eq!(
            child.memory().read_obj::<u16>(GuestAddress(0)).unwrap(),
            0x0403
        );
        assert!(GuestRam::from_file(parts[1].fd.clone(), 0, 8 << 20).is_err());
        assert_ne!(ram.host_address_of(10 << 20), 0);
        assert!(GuestRam::with_window(16 << 20, 16 << 20).is_err());
        assert!(GuestRam::with_window(16 << 20, 2 << 20).is_err());
        assert!(GuestRam::with_window(16 << 20, 5 << 20).is_err());
    }

    #[test]
    fn a_window_of_a_file_that_can_shrink_is_refused() {
        // SAFETY: memfd_create with a literal name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        let file = File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
        file.set_len(16 << 20).unwrap();
        let fd = Arc::new(OwnedFd::from(file));
        let e = GuestRam::from_file(fd, 0, 8 << 20).err().expect("refused");
        assert!(e.to_string().contains("F_SEAL_SHRINK"), "{e}");
    }
}
