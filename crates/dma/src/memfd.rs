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
//!
//! # The checks on a file a peer sends for DMA
//!
//! [`check_dma_file`] is the one place a received file is judged before a DMA mapping
//! uses it ([`crate::MapTable`] calls it for every fd-backed DMA_MAP):
//!
//! 1. An `O_PATH` descriptor is refused with **EBADF**. It grants no access to the file's
//!    contents at all (only a name for `fstat`, `openat` and friends), and it is exactly
//!    the errno the kernel gives for `mmap`, `read` and `pread` on one — so a vfio-user
//!    server that simply mmaps the received fd (libvfio-user's `dma_map_region`) fails
//!    with EBADF too. Refusing it first matters because everything after the check could
//!    otherwise turn a name into access: the pread/pwrite path reopens the file, and a
//!    reopen through `/proc/self/fd` is checked against *this process's* credentials,
//!    not the sender's — a client running as `nobody` could read `/etc/shadow` with a
//!    root server's rights.
//! 2. The kind of file ([`classify`], seals before size), then its size.
//! 3. The descriptor's own access mode (`F_GETFL`) must allow the mapping's permissions:
//!    a readable mapping needs `O_RDONLY`/`O_RDWR`, a writable one `O_WRONLY`/`O_RDWR`
//!    (**EACCES**, as `mmap` answers a read-only fd asked for a shared writable map).
//!
//! [`reopen_private`] then opens the private file description the pread/pwrite path needs
//! (so the sender's later `fcntl(F_SETFL, O_APPEND)` cannot redirect our writes) with
//! exactly the access the mapping permits — never more than the sender's descriptor had,
//! so this process's own rights never widen what the peer can reach — and checks that
//! the reopened file is the one that was checked.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use crate::Prot;

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
    Ok(classify_fd(file.as_fd())?.0)
}

/// [`classify`] of a borrowed descriptor, with the file's `fstat` taken *after* its
/// seals were read (so its size is one a sealed file keeps).
fn classify_fd(fd: BorrowedFd<'_>) -> io::Result<(Result<Sharing, &'static str>, libc::stat)> {
    // SAFETY: statfs is plain data; zeroed is a valid value, and fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `st`, which lives for the call; the result is checked.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let fs = st.f_type as i64;
    let sealed = seals(fd).is_some_and(|s| s & libc::F_SEAL_SHRINK != 0);
    let meta = fstat(fd)?;
    let verdict = if meta.st_mode & libc::S_IFMT != libc::S_IFREG {
        Err(
            "it is not a regular file (memory must be shared as a memfd, a /dev/shm file \
             or another regular file)",
        )
    } else if fs == FUSE_SUPER_MAGIC {
        Err("it is on a FUSE file system, whose reads its server could block forever")
    } else if sealed && fs == TMPFS_MAGIC {
        Ok(Sharing::InPlace)
    } else {
        Ok(Sharing::SystemCalls)
    };
    Ok((verdict, meta))
}

/// True when `file` is safe to mmap and use in place for good ([`Sharing::InPlace`]).
pub fn shrink_proof(file: &File) -> io::Result<bool> {
    Ok(classify(file)? == Ok(Sharing::InPlace))
}

/// `fstat` of a descriptor (works on `O_PATH` descriptors too).
fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; zeroed is a valid value, and fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, which lives for the call; the result is checked.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Why a file sent for DMA was refused ([`check_dma_file`], [`reopen_private`]).
#[derive(Debug, thiserror::Error)]
pub enum FileRefusal {
    /// An `O_PATH` descriptor: a name, not an open file.
    #[error(
        "the descriptor was opened with O_PATH, which grants no access to the file's \
         contents; send a descriptor opened for reading (and writing, for a writable mapping)"
    )]
    PathOnly,
    /// The descriptor's access mode does not allow the mapping's permissions.
    #[error(
        "the descriptor was opened {mode} but the mapping asks for {wanted}; open the file \
         for {wanted} or map it with fewer permissions"
    )]
    AccessMode {
        /// How the descriptor was opened (`O_RDONLY`, ...).
        mode: &'static str,
        /// What the mapping needs ("reading", "writing", "reading and writing").
        wanted: &'static str,
    },
    /// A file that cannot back DMA at all.
    #[error("{0}")]
    Unsuitable(&'static str),
    /// The file reopened for private use is not the file that was checked.
    #[error("the file changed identity while it was reopened; retry the mapping")]
    Changed,
    /// A system call on the descriptor failed.
    #[error("{what} failed: {source}")]
    Io {
        /// The call.
        what: &'static str,
        /// Its error.
        source: io::Error,
    },
}

impl FileRefusal {
    /// The errno a vfio-user reply carries for this refusal.
    pub fn errno(&self) -> i32 {
        match self {
            FileRefusal::PathOnly => libc::EBADF,
            FileRefusal::AccessMode { .. } => libc::EACCES,
            FileRefusal::Unsuitable(_) => libc::EINVAL,
            FileRefusal::Changed => libc::EAGAIN,
            FileRefusal::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// A file that passed [`check_dma_file`] for some permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFile {
    /// Device of the file (`st_dev`): with `ino`, the file's identity while it is open.
    pub dev: u64,
    /// Inode number (`st_ino`).
    pub ino: u64,
    /// Size when checked (after the seals were read, so a sealed file keeps at least it).
    pub size: u64,
    /// How it may be used.
    pub sharing: Sharing,
}

fn mode_name(mode: libc::c_int) -> &'static str {
    match mode {
        libc::O_RDONLY => "O_RDONLY",
        libc::O_WRONLY => "O_WRONLY",
        libc::O_RDWR => "O_RDWR",
        _ => "with an unknown access mode",
    }
}

fn wanted(prot: Prot) -> &'static str {
    match (prot.readable(), prot.writable()) {
        (true, true) => "reading and writing",
        (false, true) => "writing",
        _ => "reading",
    }
}

/// Check a descriptor a peer sent for a DMA mapping with permissions `prot` (module
/// documentation, "The checks on a file a peer sends for DMA"): not `O_PATH`, a file
/// [`classify`] accepts, and an access mode that allows `prot`. Nothing is opened.
pub fn check_dma_file(fd: BorrowedFd<'_>, prot: Prot) -> Result<DmaFile, FileRefusal> {
    // SAFETY: F_GETFL only reads the descriptor's status flags (allowed on O_PATH).
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(FileRefusal::Io {
            what: "fcntl(F_GETFL)",
            source: io::Error::last_os_error(),
        });
    }
    if fl & libc::O_PATH != 0 {
        return Err(FileRefusal::PathOnly);
    }
    let io = |what| move |source| FileRefusal::Io { what, source };
    // Seals before size: see the module documentation.
    let (sharing, st) = classify_fd(fd).map_err(io("fstat/fstatfs"))?;
    let sharing = sharing.map_err(FileRefusal::Unsuitable)?;
    let mode = fl & libc::O_ACCMODE;
    let can_read = mode == libc::O_RDONLY || mode == libc::O_RDWR;
    let can_write = mode == libc::O_WRONLY || mode == libc::O_RDWR;
    if (prot.readable() && !can_read) || (prot.writable() && !can_write) {
        return Err(FileRefusal::AccessMode {
            mode: mode_name(mode),
            wanted: wanted(prot),
        });
    }
    Ok(DmaFile {
        dev: st.st_dev,
        ino: st.st_ino,
        size: u64::try_from(st.st_size).unwrap_or(0),
        sharing,
    })
}

/// A private open file description of the file behind `fd` (checked as `checked` for
/// `prot` by [`check_dma_file`]), opened for exactly the access `prot` needs — which
/// that check proved the sender's descriptor has, so this process's own credentials never
/// widen it. `None` for `Prot::NONE`: such a mapping is never accessed.
pub fn reopen_private(
    fd: BorrowedFd<'_>,
    checked: &DmaFile,
    prot: Prot,
) -> Result<Option<File>, FileRefusal> {
    if !prot.readable() && !prot.writable() {
        return Ok(None);
    }
    // Re-check: the caller's promise is what keeps this open from widening access.
    let again = check_dma_file(fd, prot)?;
    if (again.dev, again.ino) != (checked.dev, checked.ino) {
        return Err(FileRefusal::Changed);
    }
    let file = std::fs::OpenOptions::new()
        .read(prot.readable())
        .write(prot.writable())
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|source| FileRefusal::Io {
            what: "reopening the file through /proc/self/fd",
            source,
        })?;
    let meta = file.metadata().map_err(|source| FileRefusal::Io {
        what: "fstat of the reopened file",
        source,
    })?;
    if (meta.dev(), meta.ino()) != (checked.dev, checked.ino) {
        return Err(FileRefusal::Changed);
    }
    Ok(Some(file))
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
