//! Eventfds handed to the device by its peer (SET_IRQS trigger fds), checked and
//! signalled so that no peer can hang the device.
//!
//! A peer (a vfio-user client, a VMM, a child level) chooses the fds the device writes to
//! when it raises an interrupt. Taken on trust, any fd would do: a pipe or a socket whose
//! buffer the peer never drains, a blocking eventfd whose counter the peer left at
//! 2^64-2, `/dev/null` (interrupts silently vanish). A blocking `write(2)` on such an fd
//! never returns, and the thread that raised the interrupt — a server thread, the RX
//! worker — never serves anyone again.
//!
//! [`PeerEventFd::from_peer`] is the one way such an fd enters the device:
//! - it must be an eventfd: an anonymous inode (`fstat` shows no file type) whose
//!   `/proc/self/fd` link reads `anon_inode:[eventfd]`; anything else is refused with
//!   [`EventFdError::NotEventfd`] (EINVAL), naming what the fd is;
//! - it is made non-blocking (`O_NONBLOCK` on the open file description). That flag is
//!   shared with the peer, which is harmless for a well-behaved one: KVM irqfds ignore
//!   it and VMMs (QEMU, Cloud Hypervisor, nestio) create their interrupt eventfds
//!   non-blocking anyway. An eventfd cannot be reopened privately (`/proc/self/fd/N` of an
//!   anonymous inode gives ENXIO) and `pwritev2(RWF_NOWAIT)` is not supported on eventfds
//!   (EOPNOTSUPP), so the shared flag is the per-write guarantee available.
//!
//! [`PeerEventFd::signal`] re-asserts `O_NONBLOCK` when the peer cleared it since (logged
//! once per fd), then adds 1 to the counter. A full counter (EAGAIN) is a dropped
//! interrupt: counted ([`PeerEventFd::dropped`]) and logged, never a wait. The caller
//! signals outside its own locks (see `irq.rs`), so even a peer racing to clear the flag
//! between the check and the write stalls only the raising thread, not the device's
//! interrupt state.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Why a peer's fd was refused as an interrupt eventfd.
#[derive(Debug, thiserror::Error)]
pub enum EventFdError {
    /// The fd is not an eventfd.
    #[error("fd {fd} is {kind}, not an eventfd: an interrupt fd must be created with eventfd(2)")]
    NotEventfd {
        /// The fd number (in this process).
        fd: i32,
        /// What it is, for the message.
        kind: String,
    },
    /// The fd could not be inspected or made non-blocking.
    #[error("cannot check interrupt fd {fd}: {source} (is /proc mounted?)")]
    Inspect {
        /// The fd number.
        fd: i32,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

/// What [`PeerEventFd::signal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The counter was incremented.
    Delivered,
    /// The counter is full (the peer does not consume it): the interrupt was dropped and
    /// counted.
    Dropped,
    /// The write failed otherwise (logged).
    Failed,
}

/// A checked, non-blocking eventfd received from the device's peer. See the module
/// documentation.
#[derive(Debug)]
pub struct PeerEventFd {
    fd: OwnedFd,
    dropped: AtomicU64,
    tamper_logged: AtomicBool,
}

fn io_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// A short description of what `fd` is, from its `fstat` type and `/proc` link.
fn describe(mode: libc::mode_t, link: &str) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFIFO => "a pipe",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        0 => "an anonymous inode",
        _ => "an unknown file type",
    };
    format!("{kind} ({link})")
}

fn get_flags(fd: BorrowedFd<'_>) -> std::io::Result<libc::c_int> {
    // SAFETY: F_GETFL on a valid fd takes no pointer.
    let f = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if f < 0 {
        Err(io_err())
    } else {
        Ok(f)
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>, flags: libc::c_int) -> std::io::Result<()> {
    // SAFETY: F_SETFL on a valid fd with an integer argument takes no pointer.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        Err(io_err())
    } else {
        Ok(())
    }
}

impl PeerEventFd {
    /// Accept `fd` from a peer as an interrupt eventfd: refuse anything that is not an
    /// eventfd, and make it non-blocking.
    pub fn from_peer(fd: OwnedFd) -> Result<PeerEventFd, EventFdError> {
        let raw = fd.as_raw_fd();
        let inspect = |source| EventFdError::Inspect { fd: raw, source };
        // SAFETY: an all-zero `stat` is a valid value of a plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one `stat` into the local we own.
        if unsafe { libc::fstat(raw, &mut st) } < 0 {
            return Err(inspect(io_err()));
        }
        let link = std::fs::read_link(format!("/proc/self/fd/{raw}"))
            .map_err(inspect)?
            .to_string_lossy()
            .into_owned();
        if st.st_mode & libc::S_IFMT != 0 || link != "anon_inode:[eventfd]" {
            return Err(EventFdError::NotEventfd {
                fd: raw,
                kind: describe(st.st_mode, &link),
            });
        }
        let flags = get_flags(fd.as_fd()).map_err(inspect)?;
        if flags & libc::O_NONBLOCK == 0 {
            set_nonblocking(fd.as_fd(), flags).map_err(inspect)?;
        }
        Ok(PeerEventFd {
            fd,
            dropped: AtomicU64::new(0),
            tamper_logged: AtomicBool::new(false),
        })
    }

    /// Add 1 to the counter without ever blocking. See the module documentation.
    pub fn signal(&self) -> Signal {
        let fd = self.fd.as_fd();
        match get_flags(fd) {
            Ok(f) if f & libc::O_NONBLOCK == 0 => {
                if !self.tamper_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        fd = fd.as_raw_fd(),
                        "the peer made its interrupt eventfd blocking again; nestio keeps it non-blocking"
                    );
                }
                if let Err(e) = set_nonblocking(fd, f) {
                    tracing::warn!(error = %e, "cannot make an interrupt eventfd non-blocking; interrupt dropped");
                    return self.drop_one();
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read an interrupt eventfd's flags");
                return Signal::Failed;
            }
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid local u64 to a valid fd; the fd is
        // non-blocking, so the call returns at once.
        let r = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if r == 8 {
            return Signal::Delivered;
        }
        let e = io_err();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            return self.drop_one();
        }
        tracing::warn!(error = %e, "cannot signal an interrupt eventfd");
        Signal::Failed
    }

    fn drop_one(&self) -> Signal {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // Log the first drop and then every power of two: a peer that never reads its
        // eventfd cannot flood the log.
        if n.is_power_of_two() {
            tracing::warn!(
                dropped = n,
                "interrupt eventfd counter is full (the peer does not consume it): interrupt dropped"
            );
        }
        Signal::Dropped
    }

    /// Interrupts dropped because the counter was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl AsFd for PeerEventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for PeerEventFd {
    fn as_raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn owned(raw: i32) -> OwnedFd {
        assert!(raw >= 0, "{}", io_err());
        // SAFETY: a fresh fd owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(raw) }
    }

    #[test]
    fn refuses_what_is_not_an_eventfd_and_names_it() {
        let mut p = [0; 2];
        // SAFETY: pipe writes two fds into the local array.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        let (r, w) = (owned(p[0]), owned(p[1]));
        let e = PeerEventFd::from_peer(w).unwrap_err();
        assert!(e.to_string().contains("a pipe"), "{e}");
        drop(r);
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let e = PeerEventFd::from_peer(null).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        // SAFETY: timerfd_create takes no pointers.
        let t = owned(unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, 0) });
        let e = PeerEventFd::from_peer(t).unwrap_err();
        assert!(e.to_string().contains("timerfd"), "{e}");
    }

    #[test]
    fn full_counter_is_dropped_and_counted_and_flag_is_restored() {
        // SAFETY: eventfd takes no pointers.
        let raw = owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) });
        let peer = raw.try_clone().unwrap();
        let ev = PeerEventFd::from_peer(raw).unwrap();
        assert_ne!(get_flags(peer.as_fd()).unwrap() & libc::O_NONBLOCK, 0);
        assert_eq!(ev.signal(), Signal::Delivered);
        // The peer clears O_NONBLOCK and fills the counter to 2^64-2.
        // SAFETY: F_SETFL with an integer argument.
        assert_eq!(
            unsafe { libc::fcntl(peer.as_raw_fd(), libc::F_SETFL, 0) },
            0
        );
        let v: u64 = u64::MAX - 2;
        // SAFETY: writes 8 bytes from a local u64.
        let n = unsafe { libc::write(peer.as_raw_fd(), (&v as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(ev.signal(), Signal::Dropped);
        assert_eq!(ev.signal(), Signal::Dropped);
        assert_eq!(ev.dropped(), 2);
    }
}
