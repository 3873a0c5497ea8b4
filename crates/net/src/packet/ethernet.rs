//! Ethernet II framing: 6-byte destination, 6-byte source, 2-byte EtherType,
//! payload; no FCS (backends and the NIC model never carry it).
//!
//! Frames built here are padded with zeros to the 60-byte minimum a real
//! wire delivers; parsers of upper layers rely on their own length fields
//! and ignore that padding.

use super::{be16, need, PacketError};
use std::fmt;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6 (recognised only to be dropped).
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Ethernet header length.
pub const ETH_HEADER_LEN: usize = 14;
/// Minimum frame length without FCS; shorter built frames are zero-padded.
pub const ETH_MIN_FRAME_LEN: usize = 60;

/// A 48-bit MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    /// 00:00:00:00:00:00.
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// Is this the broadcast address?
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// Is the group (multicast, including broadcast) bit set?
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// The raw bytes.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// Read a MAC address at `off`.
    pub fn read(buf: &[u8], off: usize, layer: &'static str) -> Result<MacAddr, PacketError> {
        let end = off.saturating_add(6);
        match buf.get(off..end) {
            Some(b) => {
                let mut m = [0u8; 6];
                m.copy_from_slice(b);
                Ok(MacAddr(m))
            }
            None => Err(PacketError::Truncated {
                layer,
                need: end,
                have: buf.len(),
            }),
        }
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = PacketError;

    /// Parse "aa:bb:cc:dd:ee:ff".
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = PacketError::BadField {
            layer: "ethernet",
            field: "MAC address text",
            value: s.len() as u32,
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(|| bad.clone())?;
            if p.len() != 2 {
                return Err(bad);
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad.clone())?;
        }
        if parts.next().is_some() {
            return Err(bad);
        }
        Ok(MacAddr(out))
    }
}

/// A parsed Ethernet II frame (view into the caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetFrame<'a> {
    /// Destination MAC.
    pub dst: MacAddr,
    /// Source MAC.
    pub src: MacAddr,
    /// EtherType (values below 0x0600 are 802.3 lengths; callers treat them as unknown).
    pub ethertype: u16,
    /// Everything after the header, including any padding.
    pub payload: &'a [u8],
}

impl<'a> EthernetFrame<'a> {
    /// Parse the 14-byte header.
    pub fn parse(frame: &'a [u8]) -> Result<Self, PacketError> {
        need(frame, ETH_HEADER_LEN, "ethernet")?;
        Ok(EthernetFrame {
            dst: MacAddr::read(frame, 0, "ethernet")?,
            src: MacAddr::read(frame, 6, "ethernet")?,
            ethertype: be16(frame, 12, "ethernet")?,
            payload: &frame[ETH_HEADER_LEN..],
        })
    }
}

/// Build a frame: header + payload, zero-padded to [`ETH_MIN_FRAME_LEN`].
pub fn build_ethernet_frame(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let len = (ETH_HEADER_LEN + payload.len()).max(ETH_MIN_FRAME_LEN);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f.resize(len, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_build_roundtrip() {
        let a: MacAddr = "52:55:0a:00:02:02".parse().unwrap();
        let b = MacAddr([2, 0, 0, 0, 0, 1]);
        let f = build_ethernet_frame(a, b, ETHERTYPE_ARP, &[1, 2, 3]);
        assert_eq!(f.len(), ETH_MIN_FRAME_LEN);
        let p = EthernetFrame::parse(&f).unwrap();
        assert_eq!(p.dst, a);
        assert_eq!(p.src, b);
        assert_eq!(p.ethertype, ETHERTYPE_ARP);
        assert_eq!(&p.payload[..3], &[1, 2, 3]);
        assert_eq!(a.to_string(), "52:55:0a:00:02:02");
    }

    #[test]
    fn short_frame_rejected() {
        for n in 0..ETH_HEADER_LEN {
            assert!(matches!(
                EthernetFrame::parse(&[0u8; 14][..n]),
                Err(PacketError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn bad_mac_text_rejected() {
        for s in [
            "",
            "1:2:3:4:5:6",
            "52:55:0a:00:02",
            "52:55:0a:00:02:02:03",
            "zz:55:0a:00:02:02",
        ] {
            assert!(s.parse::<MacAddr>().is_err(), "{s}");
        }
        assert!(MacAddr::BROADCAST.is_multicast());
        assert!(!MacAddr([2, 0, 0, 0, 0, 1]).is_multicast());
    }
}
