//! The UDP backend: each Ethernet frame travels as the whole payload of one
//! UDP datagram (the framing of QEMU's `-netdev dgram`, no extra header).
//!
//! The socket is bound to the local address and not connected; datagrams go
//! to the configured remote with `send_to`, and datagrams from any other
//! source are dropped (counted, logged at debug), so a stray sender cannot
//! inject frames. Datagrams are read into an internal 64 KiB buffer (no
//! truncation by the kernel) and runts shorter than an Ethernet header are
//! dropped.

use crate::packet::ethernet::ETH_HEADER_LEN;
use crate::{NetBackend, NetError};
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use tracing::debug;

/// Larger than any UDP payload.
const UDP_READ_BUF: usize = 65536;
/// Datagrams skipped (foreign, runt) in one `recv` before it yields.
const MAX_SKIPPED: usize = 64;

/// Frames over UDP to one peer.
#[derive(Debug)]
pub struct UdpBackend {
    sock: UdpSocket,
    local: SocketAddr,
    remote: SocketAddr,
    rxbuf: Vec<u8>,
    dropped_foreign: u64,
    dropped_runt: u64,
}

impl UdpBackend {
    /// Bind `local` and exchange frames with `remote`.
    pub fn new(local: SocketAddr, remote: SocketAddr) -> Result<Self, NetError> {
        let sock = UdpSocket::bind(local).map_err(|source| NetError::UdpBind {
            addr: local,
            source,
        })?;
        Self::from_socket(sock, remote)
    }

    /// Use an already bound socket (it is switched to non-blocking).
    pub fn from_socket(sock: UdpSocket, remote: SocketAddr) -> Result<Self, NetError> {
        let io = |what: &str, source| NetError::Io {
            what: what.to_string(),
            source,
        };
        sock.set_nonblocking(true)
            .map_err(|e| io("set UDP socket non-blocking", e))?;
        let local = sock
            .local_addr()
            .map_err(|e| io("query UDP socket address", e))?;
        Ok(UdpBackend {
            sock,
            local,
            remote,
            rxbuf: vec![0; UDP_READ_BUF],
            dropped_foreign: 0,
            dropped_runt: 0,
        })
    }

    /// The bound local address (with the actual port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Datagrams dropped because they came from another address than the peer.
    pub fn dropped_foreign(&self) -> u64 {
        self.dropped_foreign
    }

    /// Datagrams dropped because they were shorter than an Ethernet header.
    pub fn dropped_runt(&self) -> u64 {
        self.dropped_runt
    }
}

impl NetBackend for UdpBackend {
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        match self.sock.send_to(frame, self.remote) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Err(NetError::WouldBlock {
                backend: self.describe(),
            }),
            Err(e) => Err(NetError::Io {
                what: format!("send frame to {}", self.remote),
                source: e,
            }),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        // Bounded so a flood of foreign datagrams cannot pin the caller; the
        // fd stays readable and the caller comes back.
        for _ in 0..MAX_SKIPPED {
            let (n, from) = match self.sock.recv_from(&mut self.rxbuf) {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // An ICMP error for an earlier datagram (peer not listening yet): not fatal.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    return Err(NetError::Io {
                        what: format!("receive on {}", self.local),
                        source: e,
                    })
                }
            };
            if from != self.remote {
                self.dropped_foreign += 1;
                debug!(%from, expected = %self.remote, "udp backend: datagram from a foreign address dropped");
                continue;
            }
            if n < ETH_HEADER_LEN {
                self.dropped_runt += 1;
                debug!(
                    len = n,
                    "udp backend: datagram shorter than an Ethernet header dropped"
                );
                continue;
            }
            if n > buf.len() {
                return Err(NetError::FrameTooLarge {
                    len: n,
                    buf: buf.len(),
                });
            }
            buf[..n].copy_from_slice(&self.rxbuf[..n]);
            return Ok(Some(n));
        }
        Ok(None)
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    fn describe(&self) -> String {
        format!("udp {} -> {}", self.local, self.remote)
    }
}
