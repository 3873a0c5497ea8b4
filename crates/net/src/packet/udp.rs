//! UDP (RFC 768) over IPv4: 8-byte header, length field checked against the
//! bytes present (extra bytes are ignored), checksum verified unless zero
//! ("no checksum"); built datagrams always carry a checksum (0 sent as 0xffff).

use super::checksum::transport_checksum;
use super::ethernet::{build_ethernet_frame, MacAddr, ETHERTYPE_IPV4};
use super::ipv4::{build_ipv4_packet, IPV4_MAX_PAYLOAD, PROTO_UDP};
use super::{be16, need, PacketError};
use std::net::Ipv4Addr;

/// UDP header length.
pub const UDP_HEADER_LEN: usize = 8;

/// A parsed UDP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpDatagram<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// The checksum field as received (0 = none).
    pub checksum: u16,
    /// Payload (length field minus header).
    pub payload: &'a [u8],
}

impl<'a> UdpDatagram<'a> {
    /// Parse the IPv4 payload `seg` sent from `src` to `dst`.
    pub fn parse(seg: &'a [u8], src: Ipv4Addr, dst: Ipv4Addr) -> Result<Self, PacketError> {
        const L: &str = "udp";
        need(seg, UDP_HEADER_LEN, L)?;
        let len = usize::from(be16(seg, 4, L)?);
        if len < UDP_HEADER_LEN {
            return Err(PacketError::BadField {
                layer: L,
                field: "length",
                value: len as u32,
            });
        }
        need(seg, len, L)?;
        let seg = &seg[..len];
        let checksum = be16(seg, 6, L)?;
        if checksum != 0 && transport_checksum(src, dst, PROTO_UDP, seg) != Some(0) {
            return Err(PacketError::BadChecksum { layer: L });
        }
        Ok(UdpDatagram {
            src_port: be16(seg, 0, L)?,
            dst_port: be16(seg, 2, L)?,
            checksum,
            payload: &seg[UDP_HEADER_LEN..],
        })
    }
}

/// Build a UDP datagram (header + payload) with its checksum.
pub fn build_udp_datagram(
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Result<Vec<u8>, PacketError> {
    let max = IPV4_MAX_PAYLOAD - UDP_HEADER_LEN;
    if payload.len() > max {
        return Err(PacketError::TooLarge {
            layer: "udp",
            len: payload.len(),
            max,
        });
    }
    let len = (UDP_HEADER_LEN + payload.len()) as u16;
    let mut d = Vec::with_capacity(usize::from(len));
    d.extend_from_slice(&src_port.to_be_bytes());
    d.extend_from_slice(&dst_port.to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let c = match transport_checksum(src_ip, dst_ip, PROTO_UDP, &d) {
        Some(0) => 0xffff,
        Some(c) => c,
        None => {
            return Err(PacketError::TooLarge {
                layer: "udp",
                len: payload.len(),
                max,
            })
        }
    };
    d[6..8].copy_from_slice(&c.to_be_bytes());
    Ok(d)
}

/// A whole Ethernet frame carrying a UDP datagram (IP TTL 64, id 0).
#[allow(clippy::too_many_arguments)]
pub fn build_udp_frame(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    payload: &[u8],
) -> Result<Vec<u8>, PacketError> {
    let d = build_udp_datagram(src_ip, dst_ip, src_port, dst_port, payload)?;
    let ip = build_ipv4_packet(src_ip, dst_ip, PROTO_UDP, 64, 0, &d)?;
    Ok(build_ethernet_frame(dst_mac, src_mac, ETHERTYPE_IPV4, &ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

    #[test]
    fn roundtrip_and_checksum() {
        let d = build_udp_datagram(A, B, 1000, 7, b"ping").unwrap();
        let p = UdpDatagram::parse(&d, A, B).unwrap();
        assert_eq!((p.src_port, p.dst_port, p.payload), (1000, 7, &b"ping"[..]));
        assert_ne!(p.checksum, 0);
        // Wrong pseudo-header (other destination) must fail.
        assert_eq!(
            UdpDatagram::parse(&d, A, Ipv4Addr::new(10, 0, 2, 3)),
            Err(PacketError::BadChecksum { layer: "udp" })
        );
        // Zero checksum means "not computed" and is accepted.
        let mut z = d.clone();
        z[6] = 0;
        z[7] = 0;
        z[8] ^= 0xff;
        assert!(UdpDatagram::parse(&z, A, B).is_ok());
    }

    #[test]
    fn bad_lengths_rejected() {
        let d = build_udp_datagram(A, B, 1, 2, b"xyz").unwrap();
        let mut l = d.clone();
        l[5] = 4;
        assert!(UdpDatagram::parse(&l, A, B).is_err());
        let mut l = d.clone();
        l[5] = 200;
        assert!(matches!(
            UdpDatagram::parse(&l, A, B),
            Err(PacketError::Truncated { .. })
        ));
        assert!(UdpDatagram::parse(&d[..7], A, B).is_err());
    }
}
