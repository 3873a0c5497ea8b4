//! The tap backend: a Linux tap interface opened through `/dev/net/tun`
//! with `IFF_TAP | IFF_NO_PI` (plain Ethernet frames, no packet-info
//! header), non-blocking and close-on-exec.
//!
//! One `read` returns one frame and one `write` sends one. The kernel
//! silently truncates a frame read into a short buffer, so frames are read
//! into an internal 64 KiB buffer first; a frame larger than the caller's
//! buffer is then dropped with [`NetError::FrameTooLarge`] instead of being
//! delivered cut. Creating an interface needs CAP_NET_ADMIN; an fd opened
//! keeps working when the interface is later moved to another network
//! namespace.

use crate::{NetBackend, NetError};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use tracing::debug;

/// Largest frame read from the tap (64 KiB covers any MTU the kernel allows
/// for a tap without offloads).
const TAP_READ_BUF: usize = 65536;
/// IFNAMSIZ including the NUL.
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as TUNSETIFF uses it: name, then the flags short, padded
/// to the kernel's 40-byte size.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Check an interface name: 1..=15 bytes, none of '/', ':', whitespace or
/// NUL, not "." or "..". A "%d" template is allowed (the kernel picks the number).
pub fn validate_ifname(name: &str) -> Result<(), NetError> {
    let bad = |reason| NetError::TapName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() >= IFNAMSIZ {
        return Err(bad("longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(bad("not a valid interface name"));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(bad("contains '/', ':', NUL or whitespace"));
    }
    Ok(())
}

/// A tap interface.
#[derive(Debug)]
pub struct TapBackend {
    file: File,
    name: String,
    rxbuf: Vec<u8>,
}

impl TapBackend {
    /// Create (or attach to) tap interface `name`.
    pub fn open(name: &str) -> Result<Self, NetError> {
        validate_ifname(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(NetError::TapOpen)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` is a live,
        // correctly sized (40-byte) repr(C) value for the duration of the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(NetError::TapCreate {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        // The kernel writes back the actual name (it expands "%d").
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        debug!(%name, "tap interface attached");
        Ok(TapBackend {
            file,
            name,
            rxbuf: vec![0; TAP_READ_BUF],
        })
    }

    /// The interface name the kernel assigned.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for TapBackend {
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        match self.file.write(frame) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Err(NetError::WouldBlock {
                backend: self.describe(),
            }),
            Err(e) => Err(NetError::Io {
                what: format!("write to tap {} (is the interface up?)", self.name),
                source: e,
            }),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        loop {
            match self.file.read(&mut self.rxbuf) {
                Ok(0) => return Ok(None),
                Ok(n) if n > buf.len() => {
                    return Err(NetError::FrameTooLarge {
                        len: n,
                        buf: buf.len(),
                    })
                }
                Ok(n) => {
                    buf[..n].copy_from_slice(&self.rxbuf[..n]);
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(NetError::Io {
                        what: format!("read from tap {}", self.name),
                        source: e,
                    })
                }
            }
        }
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn describe(&self) -> String {
        format!("tap {}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout_matches_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn ifname_validation() {
        for ok in ["nestio0", "tap%d", "a", "x23456789012345"] {
            validate_ifname(ok).unwrap();
        }
        for bad in [
            "",
            "x234567890123456",
            "a/b",
            "a b",
            ".",
            "..",
            "a:1",
            "a\0",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }
}
