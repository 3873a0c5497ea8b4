//! `none`: a NIC with no cable. Frames the device transmits are counted and dropped;
//! nothing is ever received. For devices that must exist without a network (tests,
//! benchmarks, a guest that only needs the NIC to probe).
//!
//! `recv` never has a frame, so `poll_fd` is an eventfd that is never signalled: a
//! worker polling it sleeps until it is woken for another reason.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{NetBackend, NetError};

/// The `none` backend. See the module documentation.
pub struct NoneBackend {
    idle: OwnedFd,
    sent: Arc<AtomicU64>,
}

impl NoneBackend {
    /// A backend with no peer.
    pub fn new() -> Result<Self, NetError> {
        // SAFETY: eventfd returns a new descriptor or -1 (checked).
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(NetError::Eventfd(std::io::Error::last_os_error()));
        }
        Ok(NoneBackend {
            // SAFETY: a fresh descriptor owned by nobody else.
            idle: unsafe { OwnedFd::from_raw_fd(fd) },
            sent: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Frames dropped so far.
    pub fn frames_dropped(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The dropped-frame counter, readable after the backend was handed to a device.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }
}

impl NetBackend for NoneBackend {
    fn send(&mut self, _frame: &[u8]) -> Result<(), NetError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn recv(&mut self, _buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        Ok(None)
    }
    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.idle.as_fd()
    }
    fn describe(&self) -> String {
        "none (no peer)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_what_it_is_given_and_never_receives() {
        let mut b = NoneBackend::new().unwrap();
        b.send(&[0u8; 60]).unwrap();
        b.send(&[0u8; 1514]).unwrap();
        assert_eq!(b.frames_dropped(), 2);
        let counter = b.dropped_counter();
        b.send(&[0u8; 60]).unwrap();
        assert_eq!(counter.load(Ordering::Relaxed), 3);
        assert_eq!(b.recv(&mut [0u8; 2048]).unwrap(), None);
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&b.poll_fd()),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 0, "never readable");
    }
}
