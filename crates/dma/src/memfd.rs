//! Memory files that are safe to share for DMA, and the check that tells them apart.
//!
//! A process that mmaps a file it received from a peer (guest RAM sent with DMA_MAP, a
//! parent level's RAM) is at the peer's mercy if the peer can shrink the file later:
//! touching a mapped page past the new end of file raises SIGBUS and kills the process.
//! Linux memfd seals close that hole. A memfd sealed with `F_SEAL_SHRINK` can never get
//! smaller, so an in-place mapping of it stays valid for its whole life.
//!
//! - [`sealed_memfd`] makes the memory files nestio hands out (guest RAM, test memory):
//!   sized once, then sealed against shrinking, growing and further sealing, as QEMU's
//!   `memory-backend-memfd` does by default.
//! - [`classify`] is what the receiving side asks before it uses a file for DMA. Only a
//!   regular file on tmpfs/shmem (a memfd, a `/dev/shm` file) sealed with
//!   `F_SEAL_SHRINK` is [`Sharing::InPlace`]: its pages cannot go away under a mapping
//!   (hugetlbfs can lose a page to a punched hole even when sealed, so it does not
//!   qualify). Other regular files are [`Sharing::SystemCalls`]: accessed with
//!   `pread`/`pwrite` ([`crate::MapTable`] does this), which sees a shrunk file as a
//!   short read — a reported fault, never a signal. Anything else (devices, sockets,
//!   anonymous inodes such as a KVM vCPU fd, FUSE files whose reads the sender could
//!   block forever) is refused.
//!
//! The seals are read before the size: once `F_SEAL_SHRINK` is on it cannot be taken
//! off, so a size check made after seeing it stays true. (Checking the size first would
//! let a sender shrink and then seal the file between the two checks.)

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// Seals [`sealed_memfd`] applies: the size is fixed and no one may change the seals.
pub const RAM_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A new memfd of `size` bytes (zero-filled), close-on-exec, sealed with [`RAM_SEALS`].
/// `name` shows in `/proc/PID/fd` and `/proc/PID/maps` (as `/memfd:NAME`).
pub fn sealed_memfd(name: &CStr, size: u64) -> io::Result<OwnedFd> {
    let size = libc::off_t::try_from(size).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("memory file size {size:#x} is larger than the largest file"),
        )
    })?;
    // SAFETY: memfd_create reads a NUL-terminated string that outlives the call; the
    // result is checked before use.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate and fcntl on a descriptor we own; results are checked.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; F_ADD_SEALS takes an int argument.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, RAM_SEALS) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The seals on `fd`, or `None` when it is not a file that supports sealing.
pub fn seals(fd: impl AsFd) -> Option<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument and only reads the descriptor's file.
    let s = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_GET_SEALS) };
    (s >= 0).then_some(s)
}

/// `statfs` magic of tmpfs/shmem (memfds, `/dev/shm`).
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `statfs` magic of FUSE file systems.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// How a file handed over for DMA (or as guest RAM) can be used safely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// A sealed tmpfs file: mmap it and use it in place.
    InPlace,
    /// A regular file that may shrink or lose pages: `pread`/`pwrite` only.
    SystemCalls,
}

/// Decide how `file` may be used (module documentation); `Err` with the reason for a
/// file that must be refused. Call it *before* checking the file's size.
pub fn classify(file: &File) -> io::Result<Result<Sharing, &'static str>> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Err(
            "it is not a regular file (memory must be shared as a memfd, a /dev/shm file \
             or another regular file)",
        ));
    }
    // SAFETY: statfs is plain data; zeroed is a valid value, and fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `st`, which lives for the call; the result is checked.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let fs = st.f_type as i64;
    if fs == FUSE_SUPER_MAGIC {
        return Ok(Err(
            "it is on a FUSE file system, whose reads its server could block forever",
        ));
    }
    let sealed = seals(file).is_some_and(|s| s & libc::F_SEAL_SHRINK != 0);
    Ok(Ok(if sealed && fs == TMPFS_MAGIC {
        Sharing::InPlace
    } else {
        Sharing::SystemCalls
    }))
}

/// True when `file` is safe to mmap and use in place for good ([`Sharing::InPlace`]).
pub fn shrink_proof(file: &File) -> io::Result<bool> {
    Ok(classify(file)? == Ok(Sharing::InPlace))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_memfd_has_its_size_and_cannot_shrink_or_grow() {
        let fd = sealed_memfd(c"memfd-test", 8192).unwrap();
        let file = File::from(fd);
        assert_eq!(file.metadata().unwrap().len(), 8192);
        assert!(shrink_proof(&file).unwrap());
        let err = file.set_len(4096).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        let err = file.set_len(16384).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        // F_SEAL_SEAL: the seals themselves are fixed.
        // SAFETY: fcntl on a descriptor we own.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(r, -1);
        assert_eq!(seals(&file), Some(RAM_SEALS));
    }

    #[test]
    fn unsealed_memfd_and_plain_files_are_not_shrink_proof() {
        // SAFETY: memfd_create with a literal name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a new descriptor we own.
        let file = unsafe { File::from_raw_fd(raw) };
        file.set_len(4096).unwrap();
        assert!(!shrink_proof(&file).unwrap());
        let dir = std::env::temp_dir().join(format!("nestio-memfd-{}", std::process::id()));
        let plain = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert!(!shrink_proof(&plain).unwrap());
        assert_eq!(classify(&plain).unwrap(), Ok(Sharing::SystemCalls));
        assert_eq!(classify(&file).unwrap(), Ok(Sharing::SystemCalls));
    }

    #[test]
    fn devices_sockets_and_anonymous_inodes_are_refused() {
        let zero = File::open("/dev/zero").unwrap();
        assert!(classify(&zero).unwrap().is_err());
        assert!(!shrink_proof(&zero).unwrap());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(classify(&File::from(OwnedFd::from(a))).unwrap().is_err());
        // SAFETY: eventfd returns a new fd or -1 (checked).
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        let ev = unsafe { File::from_raw_fd(raw) };
        assert!(classify(&ev).unwrap().is_err());
    }

    #[test]
    fn huge_sizes_are_refused() {
        let e = sealed_memfd(c"huge", u64::MAX).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
