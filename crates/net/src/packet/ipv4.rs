//! IPv4 headers (RFC 791). The parser checks version, IHL (at least 5 words
//! and within the buffer), total length (at least the header and at most the
//! bytes present; Ethernet padding beyond it is cut off) and the header
//! checksum. Options are accepted and skipped. Fragments parse fine; the
//! caller decides (the user network drops them).

use super::checksum::internet_checksum;
use super::{be16, ip_at, need, PacketError};
use std::net::Ipv4Addr;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// Length of an option-less header.
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// Largest payload an option-less packet can carry.
pub const IPV4_MAX_PAYLOAD: usize = 65535 - IPV4_MIN_HEADER_LEN;
/// "Don't fragment" flag in the flags/fragment-offset word.
pub const IPV4_FLAG_DF: u16 = 0x4000;
/// "More fragments" flag.
pub const IPV4_FLAG_MF: u16 = 0x2000;

/// A parsed IPv4 packet (view into the caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Packet<'a> {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Protocol number.
    pub protocol: u8,
    /// Time to live.
    pub ttl: u8,
    /// Type of service / DSCP+ECN byte.
    pub tos: u8,
    /// Identification.
    pub identification: u16,
    /// Flags (top 3 bits) and fragment offset (low 13 bits, in 8-byte units).
    pub flags_fragment: u16,
    /// Header length in bytes (IHL * 4).
    pub header_len: usize,
    /// Payload, exactly `total length - header length` bytes.
    pub payload: &'a [u8],
}

impl<'a> Ipv4Packet<'a> {
    /// Parse and validate (including the header checksum).
    pub fn parse(buf: &'a [u8]) -> Result<Self, PacketError> {
        const L: &str = "ipv4";
        need(buf, IPV4_MIN_HEADER_LEN, L)?;
        let version = buf[0] >> 4;
        if version != 4 {
            return Err(PacketError::BadField {
                layer: L,
                field: "version",
                value: version.into(),
            });
        }
        let header_len = usize::from(buf[0] & 0x0f) * 4;
        if header_len < IPV4_MIN_HEADER_LEN {
            return Err(PacketError::BadField {
                layer: L,
                field: "IHL",
                value: (header_len / 4) as u32,
            });
        }
        need(buf, header_len, L)?;
        let total_len = usize::from(be16(buf, 2, L)?);
        if total_len < header_len {
            return Err(PacketError::BadField {
                layer: L,
                field: "total length",
                value: total_len as u32,
            });
        }
        need(buf, total_len, L)?;
        if internet_checksum(&buf[..header_len]) != 0 {
            return Err(PacketError::BadChecksum { layer: L });
        }
        Ok(Ipv4Packet {
            src: ip_at(buf, 12, L)?,
            dst: ip_at(buf, 16, L)?,
            protocol: buf[9],
            ttl: buf[8],
            tos: buf[1],
            identification: be16(buf, 4, L)?,
            flags_fragment: be16(buf, 6, L)?,
            header_len,
            payload: &buf[header_len..total_len],
        })
    }

    /// Is this a fragment (MF set or a non-zero offset)?
    pub fn is_fragment(&self) -> bool {
        self.flags_fragment & IPV4_FLAG_MF != 0 || self.flags_fragment & 0x1fff != 0
    }
}

/// Build an option-less IPv4 packet with DF set and a correct header checksum.
pub fn build_ipv4_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ttl: u8,
    identification: u16,
    payload: &[u8],
) -> Result<Vec<u8>, PacketError> {
    if payload.len() > IPV4_MAX_PAYLOAD {
        return Err(PacketError::TooLarge {
            layer: "ipv4",
            len: payload.len(),
            max: IPV4_MAX_PAYLOAD,
        });
    }
    let total = (IPV4_MIN_HEADER_LEN + payload.len()) as u16;
    let mut p = Vec::with_capacity(usize::from(total));
    p.push(0x45);
    p.push(0);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&identification.to_be_bytes());
    p.extend_from_slice(&IPV4_FLAG_DF.to_be_bytes());
    p.push(ttl);
    p.push(protocol);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let csum = internet_checksum(&p);
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(payload);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        build_ipv4_packet(
            Ipv4Addr::new(10, 0, 2, 15),
            Ipv4Addr::new(10, 0, 2, 2),
            PROTO_UDP,
            64,
            7,
            b"hello",
        )
        .unwrap()
    }

    #[test]
    fn roundtrip_and_padding_trimmed() {
        let mut p = sample();
        p.extend_from_slice(&[0; 10]); // Ethernet padding
        let v = Ipv4Packet::parse(&p).unwrap();
        assert_eq!(v.src, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(v.dst, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(v.protocol, PROTO_UDP);
        assert_eq!(v.payload, b"hello");
        assert!(!v.is_fragment());
    }

    #[test]
    fn rejects_bad_headers() {
        let good = sample();
        let mut v6 = good.clone();
        v6[0] = 0x65;
        assert!(Ipv4Packet::parse(&v6).is_err());
        let mut ihl = good.clone();
        ihl[0] = 0x44;
        assert!(Ipv4Packet::parse(&ihl).is_err());
        let mut big_ihl = good.clone();
        big_ihl[0] = 0x4f; // 60-byte header in a 25-byte packet
        assert!(Ipv4Packet::parse(&big_ihl).is_err());
        let mut long = good.clone();
        long[3] = 200; // total length beyond buffer
        assert!(matches!(
            Ipv4Packet::parse(&long),
            Err(PacketError::Truncated { .. })
        ));
        let mut short = good.clone();
        short[2] = 0;
        short[3] = 10; // total length below header length
        assert!(Ipv4Packet::parse(&short).is_err());
        let mut csum = good.clone();
        csum[8] ^= 1;
        assert_eq!(
            Ipv4Packet::parse(&csum),
            Err(PacketError::BadChecksum { layer: "ipv4" })
        );
    }

    #[test]
    fn too_large_payload_rejected() {
        let big = vec![0u8; IPV4_MAX_PAYLOAD + 1];
        assert!(
            build_ipv4_packet(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 17, 64, 0, &big).is_err()
        );
    }
}
