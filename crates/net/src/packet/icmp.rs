//! ICMP (RFC 792), echo request/reply only: `type, code, checksum, id, seq,
//! data`. The checksum covers the whole ICMP message and is verified on parse.

use super::checksum::internet_checksum;
use super::ethernet::{build_ethernet_frame, MacAddr, ETHERTYPE_IPV4};
use super::ipv4::{build_ipv4_packet, PROTO_ICMP};
use super::{be16, need, PacketError};
use std::net::Ipv4Addr;

/// Echo reply type.
pub const ICMP_ECHO_REPLY: u8 = 0;
/// Echo request type.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMP header length (type, code, checksum, 4 bytes rest-of-header).
pub const ICMP_HEADER_LEN: usize = 8;

/// A parsed ICMP message with a verified checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpPacket<'a> {
    /// Message type.
    pub icmp_type: u8,
    /// Code.
    pub code: u8,
    /// The checksum field as received.
    pub checksum: u16,
    /// Echo identifier (bytes 4-5; meaningful for echo types).
    pub id: u16,
    /// Echo sequence number (bytes 6-7).
    pub seq: u16,
    /// Data after the 8-byte header.
    pub payload: &'a [u8],
}

impl<'a> IcmpPacket<'a> {
    /// Parse an ICMP message (the IPv4 payload) and verify its checksum.
    pub fn parse(buf: &'a [u8]) -> Result<Self, PacketError> {
        const L: &str = "icmp";
        need(buf, ICMP_HEADER_LEN, L)?;
        if internet_checksum(buf) != 0 {
            return Err(PacketError::BadChecksum { layer: L });
        }
        Ok(IcmpPacket {
            icmp_type: buf[0],
            code: buf[1],
            checksum: be16(buf, 2, L)?,
            id: be16(buf, 4, L)?,
            seq: be16(buf, 6, L)?,
            payload: &buf[ICMP_HEADER_LEN..],
        })
    }

    /// Is this an echo request (type 8, code 0)?
    pub fn is_echo_request(&self) -> bool {
        self.icmp_type == ICMP_ECHO_REQUEST && self.code == 0
    }
}

/// Build an echo message (request or reply) with a correct checksum.
pub fn build_icmp_echo(icmp_type: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(ICMP_HEADER_LEN + payload.len());
    m.push(icmp_type);
    m.push(0);
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = internet_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A whole Ethernet frame carrying an ICMP echo request.
pub fn build_icmp_echo_request(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    id: u16,
    seq: u16,
    payload: &[u8],
) -> Result<Vec<u8>, PacketError> {
    let icmp = build_icmp_echo(ICMP_ECHO_REQUEST, id, seq, payload);
    let ip = build_ipv4_packet(src_ip, dst_ip, PROTO_ICMP, 64, seq, &icmp)?;
    Ok(build_ethernet_frame(dst_mac, src_mac, ETHERTYPE_IPV4, &ip))
}

/// A whole Ethernet frame carrying an ICMP echo reply.
pub fn build_icmp_echo_reply(
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src_ip: Ipv4Addr,
    dst_ip: Ipv4Addr,
    id: u16,
    seq: u16,
    payload: &[u8],
) -> Result<Vec<u8>, PacketError> {
    let icmp = build_icmp_echo(ICMP_ECHO_REPLY, id, seq, payload);
    let ip = build_ipv4_packet(src_ip, dst_ip, PROTO_ICMP, 64, seq, &icmp)?;
    Ok(build_ethernet_frame(dst_mac, src_mac, ETHERTYPE_IPV4, &ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_roundtrip_and_checksum() {
        let m = build_icmp_echo(ICMP_ECHO_REQUEST, 0x1234, 9, b"abc");
        let p = IcmpPacket::parse(&m).unwrap();
        assert!(p.is_echo_request());
        assert_eq!((p.id, p.seq, p.payload), (0x1234, 9, &b"abc"[..]));
        let mut bad = m.clone();
        bad[9] ^= 0x40;
        assert_eq!(
            IcmpPacket::parse(&bad),
            Err(PacketError::BadChecksum { layer: "icmp" })
        );
        assert!(IcmpPacket::parse(&m[..7]).is_err());
    }
}
