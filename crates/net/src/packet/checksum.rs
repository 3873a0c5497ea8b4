//! The Internet checksum (RFC 1071): ones'-complement sum of 16-bit
//! big-endian words, plus the IPv4 pseudo-header used by UDP and TCP.
//!
//! Sums are accumulated in a `u64` and folded at the end, so no input length
//! a slice can have overflows the accumulator.

use std::net::Ipv4Addr;

/// Add `data` (as big-endian 16-bit words, odd tail padded with zero) to `acc`.
pub fn sum_words(data: &[u8], acc: u64) -> u64 {
    let mut acc = acc;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Fold a 64-bit accumulator into 16 bits and complement it.
pub fn finish(acc: u64) -> u16 {
    let mut acc = acc;
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The Internet checksum of `data`. A buffer that contains a correct checksum
/// field sums to 0 (this function then returns 0).
pub fn internet_checksum(data: &[u8]) -> u16 {
    finish(sum_words(data, 0))
}

/// Partial sum of the IPv4 pseudo-header (src, dst, zero+protocol, length).
pub fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: u16) -> u64 {
    let mut acc = sum_words(&src.octets(), 0);
    acc = sum_words(&dst.octets(), acc);
    acc + u64::from(protocol) + u64::from(len)
}

/// Checksum of a UDP/TCP segment including the pseudo-header. The caller
/// passes the segment with its checksum field zeroed (to compute) or intact
/// (to verify: the result is then 0). `segment.len()` must fit in a u16;
/// longer input yields `None`.
pub fn transport_checksum(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    segment: &[u8],
) -> Option<u16> {
    let len = u16::try_from(segment.len()).ok()?;
    Some(finish(sum_words(
        segment,
        pseudo_header_sum(src, dst, protocol, len),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example words: 0001 f203 f4f5 f6f7 -> sum ddf2 -> checksum 220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&data), !0xddf2u16);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(internet_checksum(&[0x12]), !0x1200u16);
        assert_eq!(internet_checksum(&[]), 0xffff);
    }

    #[test]
    fn known_ipv4_header() {
        // A classic example header with checksum 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
        h[10] = 0xb8;
        h[11] = 0x61;
        assert_eq!(internet_checksum(&h), 0);
    }
}
