//! nestio-net: network backends for the emulated e1000 NIC.
//!
//! A backend moves whole Ethernet frames (destination MAC first, no FCS)
//! between the emulated device and some network. The device only sees the
//! [`NetBackend`] trait and [`open_backend`].

use std::os::fd::BorrowedFd;
use std::path::Path;

pub mod packet;

/// Errors of the network backends.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The backend spec could not be parsed.
    #[error("invalid --net spec {spec:?}: {reason} (expected \"user\", \"tap=NAME\" or \"udp=LOCALADDR:PORT,REMOTEADDR:PORT\")")]
    InvalidSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A frame did not fit the receive buffer; it was dropped.
    #[error("frame of {len} bytes does not fit the {buf} byte receive buffer; frame dropped (use a larger buffer)")]
    FrameTooLarge {
        /// Frame length.
        len: usize,
        /// Buffer length.
        buf: usize,
    },
    /// Not implemented yet.
    #[error("not implemented: {0}")]
    Unsupported(&'static str),
}

/// A network backend for an emulated NIC.
pub trait NetBackend: Send {
    /// Send one Ethernet frame (dest MAC first, no FCS) from the device to the network.
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError>;
    /// Non-blocking: copy the next frame for the device into `buf`, return its length;
    /// `Ok(None)` when nothing is pending. A frame longer than `buf` is dropped and
    /// `Err(NetError::FrameTooLarge{..})` returned.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError>;
    /// An fd that polls readable (POLLIN) whenever `recv` may return a frame.
    fn poll_fd(&self) -> BorrowedFd<'_>;
    /// Short human description, e.g. "user (10.0.2.0/24)", "tap nestio0".
    fn describe(&self) -> String;
}

/// Parse a --net spec: "user", "tap=NAME", "udp=LOCALADDR:PORT,REMOTEADDR:PORT";
/// `pcap: Some(path)` wraps the backend so every frame both ways is written to a pcap file.
pub fn open_backend(spec: &str, pcap: Option<&Path>) -> Result<Box<dyn NetBackend>, NetError> {
    let _ = pcap;
    Err(NetError::InvalidSpec {
        spec: spec.to_string(),
        reason: "backends not built yet".to_string(),
    })
}
