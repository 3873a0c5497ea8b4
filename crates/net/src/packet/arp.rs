//! ARP for Ethernet/IPv4 (RFC 826): the only hardware/protocol pair the
//! user network handles. Other pairs parse as [`PacketError::BadField`].

use super::ethernet::{build_ethernet_frame, MacAddr, ETHERTYPE_ARP, ETHERTYPE_IPV4};
use super::{be16, ip_at, need, PacketError};
use std::net::Ipv4Addr;

/// ARP request opcode.
pub const ARP_OP_REQUEST: u16 = 1;
/// ARP reply opcode.
pub const ARP_OP_REPLY: u16 = 2;
/// Length of an Ethernet/IPv4 ARP packet.
pub const ARP_LEN: usize = 28;

/// A parsed Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpPacket {
    /// Operation (1 request, 2 reply).
    pub op: u16,
    /// Sender hardware address.
    pub sender_mac: MacAddr,
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: MacAddr,
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
}

impl ArpPacket {
    /// Parse the ARP payload of an Ethernet frame (trailing padding ignored).
    pub fn parse(buf: &[u8]) -> Result<Self, PacketError> {
        const L: &str = "arp";
        need(buf, ARP_LEN, L)?;
        let htype = be16(buf, 0, L)?;
        let ptype = be16(buf, 2, L)?;
        if htype != 1 {
            return Err(PacketError::BadField {
                layer: L,
                field: "hardware type",
                value: htype.into(),
            });
        }
        if ptype != ETHERTYPE_IPV4 {
            return Err(PacketError::BadField {
                layer: L,
                field: "protocol type",
                value: ptype.into(),
            });
        }
        if buf[4] != 6 || buf[5] != 4 {
            return Err(PacketError::BadField {
                layer: L,
                field: "address lengths",
                value: u32::from(buf[4]) << 8 | u32::from(buf[5]),
            });
        }
        Ok(ArpPacket {
            op: be16(buf, 6, L)?,
            sender_mac: MacAddr::read(buf, 8, L)?,
            sender_ip: ip_at(buf, 14, L)?,
            target_mac: MacAddr::read(buf, 18, L)?,
            target_ip: ip_at(buf, 24, L)?,
        })
    }

    /// Serialise to the 28-byte wire form.
    pub fn to_bytes(&self) -> [u8; ARP_LEN] {
        let mut b = [0u8; ARP_LEN];
        b[0..2].copy_from_slice(&1u16.to_be_bytes());
        b[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        b[4] = 6;
        b[5] = 4;
        b[6..8].copy_from_slice(&self.op.to_be_bytes());
        b[8..14].copy_from_slice(&self.sender_mac.0);
        b[14..18].copy_from_slice(&self.sender_ip.octets());
        b[18..24].copy_from_slice(&self.target_mac.0);
        b[24..28].copy_from_slice(&self.target_ip.octets());
        b
    }
}

/// A broadcast "who has `target_ip`" frame from `src_mac`/`src_ip`.
pub fn build_arp_request(src_mac: MacAddr, src_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let arp = ArpPacket {
        op: ARP_OP_REQUEST,
        sender_mac: src_mac,
        sender_ip: src_ip,
        target_mac: MacAddr::ZERO,
        target_ip,
    };
    build_ethernet_frame(MacAddr::BROADCAST, src_mac, ETHERTYPE_ARP, &arp.to_bytes())
}

/// A unicast "`src_ip` is at `src_mac`" frame sent to `dst_mac`/`dst_ip`.
pub fn build_arp_reply(
    src_mac: MacAddr,
    src_ip: Ipv4Addr,
    dst_mac: MacAddr,
    dst_ip: Ipv4Addr,
) -> Vec<u8> {
    let arp = ArpPacket {
        op: ARP_OP_REPLY,
        sender_mac: src_mac,
        sender_ip: src_ip,
        target_mac: dst_mac,
        target_ip: dst_ip,
    };
    build_ethernet_frame(dst_mac, src_mac, ETHERTYPE_ARP, &arp.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::super::ethernet::EthernetFrame;
    use super::*;

    #[test]
    fn request_roundtrip() {
        let mac = MacAddr([2, 0, 0, 0, 0, 9]);
        let f = build_arp_request(mac, Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2));
        let e = EthernetFrame::parse(&f).unwrap();
        assert!(e.dst.is_broadcast());
        assert_eq!(e.ethertype, ETHERTYPE_ARP);
        let a = ArpPacket::parse(e.payload).unwrap();
        assert_eq!(a.op, ARP_OP_REQUEST);
        assert_eq!(a.sender_mac, mac);
        assert_eq!(a.sender_ip, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(a.target_ip, Ipv4Addr::new(10, 0, 2, 2));
    }

    #[test]
    fn rejects_other_hardware_and_lengths() {
        let a = ArpPacket {
            op: 1,
            sender_mac: MacAddr::ZERO,
            sender_ip: Ipv4Addr::UNSPECIFIED,
            target_mac: MacAddr::ZERO,
            target_ip: Ipv4Addr::UNSPECIFIED,
        };
        let good = a.to_bytes();
        for (i, v) in [(1usize, 6u8), (3, 0xdd), (4, 8), (5, 16)] {
            let mut b = good;
            b[i] = v;
            assert!(
                matches!(ArpPacket::parse(&b), Err(PacketError::BadField { .. })),
                "byte {i}"
            );
        }
        assert!(matches!(
            ArpPacket::parse(&good[..27]),
            Err(PacketError::Truncated { .. })
        ));
    }
}
