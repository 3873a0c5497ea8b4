//! Typed parsers and builders for the few protocols the user-mode network
//! speaks: Ethernet II, ARP (Ethernet/IPv4), IPv4, ICMP echo, UDP and DHCP.
//!
//! Design: every parser takes an untrusted byte slice and returns either a
//! small typed view or a [`PacketError`]; every length and offset is checked
//! before use, so hostile input never panics. Builders produce complete,
//! checksummed packets (or whole Ethernet frames, padded to the 60-byte
//! minimum) and are public so tests of other crates can craft traffic.

pub mod arp;
pub mod checksum;
pub mod dhcp;
pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod udp;

pub use ethernet::MacAddr;

/// Why a packet could not be parsed or built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer bytes than the header or a length field requires.
    #[error("{layer} packet truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Protocol layer.
        layer: &'static str,
        /// Bytes required.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A header field has a value this implementation does not accept.
    #[error("{layer}: unsupported or invalid {field} {value:#x}")]
    BadField {
        /// Protocol layer.
        layer: &'static str,
        /// Field name.
        field: &'static str,
        /// Offending value.
        value: u32,
    },
    /// A checksum did not verify.
    #[error("{layer} checksum mismatch")]
    BadChecksum {
        /// Protocol layer.
        layer: &'static str,
    },
    /// The payload does not fit in the packet's length field.
    #[error("{layer} payload of {len} bytes is too large (max {max})")]
    TooLarge {
        /// Protocol layer.
        layer: &'static str,
        /// Payload length.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
}

/// Read a big-endian u16 at `off`, or report truncation.
pub(crate) fn be16(buf: &[u8], off: usize, layer: &'static str) -> Result<u16, PacketError> {
    let end = off.checked_add(2).ok_or(PacketError::Truncated {
        layer,
        need: usize::MAX,
        have: buf.len(),
    })?;
    match buf.get(off..end) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(PacketError::Truncated {
            layer,
            need: end,
            have: buf.len(),
        }),
    }
}

/// Read a big-endian u32 at `off`, or report truncation.
pub(crate) fn be32(buf: &[u8], off: usize, layer: &'static str) -> Result<u32, PacketError> {
    let end = off.checked_add(4).ok_or(PacketError::Truncated {
        layer,
        need: usize::MAX,
        have: buf.len(),
    })?;
    match buf.get(off..end) {
        Some(b) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(PacketError::Truncated {
            layer,
            need: end,
            have: buf.len(),
        }),
    }
}

/// Require `buf` to hold at least `need` bytes.
pub(crate) fn need(buf: &[u8], need: usize, layer: &'static str) -> Result<(), PacketError> {
    if buf.len() < need {
        Err(PacketError::Truncated {
            layer,
            need,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

/// Read an IPv4 address at `off`.
pub(crate) fn ip_at(
    buf: &[u8],
    off: usize,
    layer: &'static str,
) -> Result<std::net::Ipv4Addr, PacketError> {
    be32(buf, off, layer).map(std::net::Ipv4Addr::from)
}
