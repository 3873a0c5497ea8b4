//! DHCP (RFC 2131) messages over the BOOTP layout, with options (RFC 2132)
//! as TLVs after the magic cookie.
//!
//! The parser copies the fixed fields and the option list into an owned
//! [`DhcpMessage`]. Option parsing is defensive: PAD (0) is skipped, END
//! (255) stops, every other option needs its length byte and that many data
//! bytes or the message is rejected; a missing END is tolerated. Options in
//! the `sname`/`file` fields (overload, option 52) are not looked at.
//! Serialised messages are padded to the classic 300-byte BOOTP minimum,
//! which some clients require.

use super::ethernet::MacAddr;
use super::udp::build_udp_frame;
use super::{be16, be32, ip_at, need, PacketError};
use std::net::Ipv4Addr;

/// BOOTP request op.
pub const BOOTREQUEST: u8 = 1;
/// BOOTP reply op.
pub const BOOTREPLY: u8 = 2;
/// Server UDP port.
pub const DHCP_SERVER_PORT: u16 = 67;
/// Client UDP port.
pub const DHCP_CLIENT_PORT: u16 = 68;
/// The magic cookie 99.130.83.99.
pub const DHCP_MAGIC: u32 = 0x6382_5363;
/// Offset of the options (fixed BOOTP part + cookie).
pub const DHCP_OPTIONS_OFFSET: usize = 240;
/// Minimum serialised size (BOOTP's 300 bytes).
pub const DHCP_MIN_LEN: usize = 300;
/// BOOTP "broadcast" flag.
pub const DHCP_FLAG_BROADCAST: u16 = 0x8000;

/// Option codes used here.
pub mod opt {
    /// Pad.
    pub const PAD: u8 = 0;
    /// Subnet mask.
    pub const SUBNET_MASK: u8 = 1;
    /// Router list.
    pub const ROUTER: u8 = 3;
    /// DNS server list.
    pub const DNS: u8 = 6;
    /// Broadcast address.
    pub const BROADCAST_ADDR: u8 = 28;
    /// Requested IP address.
    pub const REQUESTED_IP: u8 = 50;
    /// Lease time (seconds).
    pub const LEASE_TIME: u8 = 51;
    /// DHCP message type.
    pub const MESSAGE_TYPE: u8 = 53;
    /// Server identifier.
    pub const SERVER_ID: u8 = 54;
    /// Parameter request list.
    pub const PARAM_REQUEST_LIST: u8 = 55;
    /// Renewal (T1) time.
    pub const RENEWAL_TIME: u8 = 58;
    /// Rebinding (T2) time.
    pub const REBINDING_TIME: u8 = 59;
    /// Client identifier.
    pub const CLIENT_ID: u8 = 61;
    /// End.
    pub const END: u8 = 255;
}

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DhcpMessageType {
    /// DHCPDISCOVER.
    Discover = 1,
    /// DHCPOFFER.
    Offer = 2,
    /// DHCPREQUEST.
    Request = 3,
    /// DHCPDECLINE.
    Decline = 4,
    /// DHCPACK.
    Ack = 5,
    /// DHCPNAK.
    Nak = 6,
    /// DHCPRELEASE.
    Release = 7,
    /// DHCPINFORM.
    Inform = 8,
}

impl DhcpMessageType {
    /// Map an option-53 value.
    pub fn from_u8(v: u8) -> Option<Self> {
        use DhcpMessageType::*;
        Some(match v {
            1 => Discover,
            2 => Offer,
            3 => Request,
            4 => Decline,
            5 => Ack,
            6 => Nak,
            7 => Release,
            8 => Inform,
            _ => return None,
        })
    }
}

/// One option TLV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpOption {
    /// Code (never PAD or END).
    pub code: u8,
    /// Data (0..=255 bytes).
    pub data: Vec<u8>,
}

/// A DHCP/BOOTP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpMessage {
    /// 1 request, 2 reply.
    pub op: u8,
    /// Hardware type (1 = Ethernet).
    pub htype: u8,
    /// Hardware address length.
    pub hlen: u8,
    /// Relay hops.
    pub hops: u8,
    /// Transaction id.
    pub xid: u32,
    /// Seconds since the client began.
    pub secs: u16,
    /// Flags (bit 15 broadcast).
    pub flags: u16,
    /// Client's current address.
    pub ciaddr: Ipv4Addr,
    /// "Your" (offered/assigned) address.
    pub yiaddr: Ipv4Addr,
    /// Next server address.
    pub siaddr: Ipv4Addr,
    /// Relay agent address.
    pub giaddr: Ipv4Addr,
    /// Client hardware address field (16 bytes).
    pub chaddr: [u8; 16],
    /// Options in wire order, without PAD/END.
    pub options: Vec<DhcpOption>,
}

impl DhcpMessage {
    /// Parse a UDP payload.
    pub fn parse(buf: &[u8]) -> Result<Self, PacketError> {
        const L: &str = "dhcp";
        need(buf, DHCP_OPTIONS_OFFSET, L)?;
        let cookie = be32(buf, 236, L)?;
        if cookie != DHCP_MAGIC {
            return Err(PacketError::BadField {
                layer: L,
                field: "magic cookie",
                value: cookie,
            });
        }
        let mut chaddr = [0u8; 16];
        chaddr.copy_from_slice(&buf[28..44]);
        let mut options = Vec::new();
        let mut i = DHCP_OPTIONS_OFFSET;
        while let Some(&code) = buf.get(i) {
            match code {
                opt::PAD => i += 1,
                opt::END => break,
                _ => {
                    let len = usize::from(*buf.get(i + 1).ok_or(PacketError::Truncated {
                        layer: L,
                        need: i + 2,
                        have: buf.len(),
                    })?);
                    let start = i + 2;
                    let end = start + len;
                    let data = buf.get(start..end).ok_or(PacketError::Truncated {
                        layer: L,
                        need: end,
                        have: buf.len(),
                    })?;
                    options.push(DhcpOption {
                        code,
                        data: data.to_vec(),
                    });
                    i = end;
                }
            }
        }
        Ok(DhcpMessage {
            op: buf[0],
            htype: buf[1],
            hlen: buf[2],
            hops: buf[3],
            xid: be32(buf, 4, L)?,
            secs: be16(buf, 8, L)?,
            flags: be16(buf, 10, L)?,
            ciaddr: ip_at(buf, 12, L)?,
            yiaddr: ip_at(buf, 16, L)?,
            siaddr: ip_at(buf, 20, L)?,
            giaddr: ip_at(buf, 24, L)?,
            chaddr,
            options,
        })
    }

    /// A new message with no options and all addresses zero.
    pub fn new(op: u8, xid: u32, client_mac: MacAddr) -> Self {
        let mut chaddr = [0u8; 16];
        chaddr[..6].copy_from_slice(&client_mac.0);
        DhcpMessage {
            op,
            htype: 1,
            hlen: 6,
            hops: 0,
            xid,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            options: Vec::new(),
        }
    }

    /// Serialise (options followed by END, padded to 300 bytes). Options
    /// longer than 255 bytes are cut to 255.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(DHCP_MIN_LEN);
        b.extend_from_slice(&[self.op, self.htype, self.hlen, self.hops]);
        b.extend_from_slice(&self.xid.to_be_bytes());
        b.extend_from_slice(&self.secs.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        for a in [self.ciaddr, self.yiaddr, self.siaddr, self.giaddr] {
            b.extend_from_slice(&a.octets());
        }
        b.extend_from_slice(&self.chaddr);
        b.resize(236, 0); // sname + file
        b.extend_from_slice(&DHCP_MAGIC.to_be_bytes());
        for o in &self.options {
            let data = &o.data[..o.data.len().min(255)];
            b.push(o.code);
            b.push(data.len() as u8);
            b.extend_from_slice(data);
        }
        b.push(opt::END);
        if b.len() < DHCP_MIN_LEN {
            b.resize(DHCP_MIN_LEN, 0);
        }
        b
    }

    /// Data of the first option with `code`.
    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|o| o.code == code)
            .map(|o| o.data.as_slice())
    }

    /// Append an option.
    pub fn push_option(&mut self, code: u8, data: &[u8]) {
        self.options.push(DhcpOption {
            code,
            data: data.to_vec(),
        });
    }

    /// Option 53, if present and known.
    pub fn message_type(&self) -> Option<DhcpMessageType> {
        match self.option(opt::MESSAGE_TYPE)? {
            [v] => DhcpMessageType::from_u8(*v),
            _ => None,
        }
    }

    /// An option holding exactly one IPv4 address (or the first of a list).
    pub fn option_ip(&self, code: u8) -> Option<Ipv4Addr> {
        match self.option(code)? {
            [a, b, c, d, ..] => Some(Ipv4Addr::new(*a, *b, *c, *d)),
            _ => None,
        }
    }

    /// An option holding a big-endian u32 (lease times).
    pub fn option_u32(&self, code: u8) -> Option<u32> {
        match self.option(code)? {
            [a, b, c, d] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => None,
        }
    }

    /// The client's Ethernet address when htype is Ethernet and hlen 6.
    pub fn client_mac(&self) -> Option<MacAddr> {
        if self.htype != 1 || self.hlen != 6 {
            return None;
        }
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.chaddr[..6]);
        Some(MacAddr(m))
    }
}

fn client_frame(client_mac: MacAddr, msg: &DhcpMessage) -> Result<Vec<u8>, PacketError> {
    build_udp_frame(
        client_mac,
        MacAddr::BROADCAST,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        DHCP_CLIENT_PORT,
        DHCP_SERVER_PORT,
        &msg.to_bytes(),
    )
}

/// A broadcast DHCPDISCOVER frame from `client_mac`.
pub fn build_dhcp_discover(client_mac: MacAddr, xid: u32) -> Result<Vec<u8>, PacketError> {
    let mut m = DhcpMessage::new(BOOTREQUEST, xid, client_mac);
    m.push_option(opt::MESSAGE_TYPE, &[DhcpMessageType::Discover as u8]);
    m.push_option(
        opt::PARAM_REQUEST_LIST,
        &[opt::SUBNET_MASK, opt::ROUTER, opt::DNS, opt::LEASE_TIME],
    );
    client_frame(client_mac, &m)
}

/// A broadcast DHCPREQUEST frame (SELECTING state: requested IP + server id).
pub fn build_dhcp_request(
    client_mac: MacAddr,
    xid: u32,
    requested_ip: Ipv4Addr,
    server_id: Ipv4Addr,
) -> Result<Vec<u8>, PacketError> {
    let mut m = DhcpMessage::new(BOOTREQUEST, xid, client_mac);
    m.push_option(opt::MESSAGE_TYPE, &[DhcpMessageType::Request as u8]);
    m.push_option(opt::REQUESTED_IP, &requested_ip.octets());
    m.push_option(opt::SERVER_ID, &server_id.octets());
    client_frame(client_mac, &m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_options() {
        let mac = MacAddr([2, 0, 0, 0, 0, 7]);
        let mut m = DhcpMessage::new(BOOTREQUEST, 0xdeadbeef, mac);
        m.push_option(opt::MESSAGE_TYPE, &[3]);
        m.push_option(opt::REQUESTED_IP, &[10, 0, 2, 15]);
        m.push_option(opt::LEASE_TIME, &86400u32.to_be_bytes());
        let b = m.to_bytes();
        assert_eq!(b.len(), DHCP_MIN_LEN);
        let p = DhcpMessage::parse(&b).unwrap();
        assert_eq!(p, m);
        assert_eq!(p.message_type(), Some(DhcpMessageType::Request));
        assert_eq!(
            p.option_ip(opt::REQUESTED_IP),
            Some(Ipv4Addr::new(10, 0, 2, 15))
        );
        assert_eq!(p.option_u32(opt::LEASE_TIME), Some(86400));
        assert_eq!(p.client_mac(), Some(mac));
    }

    #[test]
    fn hostile_options() {
        let m = DhcpMessage::new(BOOTREQUEST, 1, MacAddr::ZERO);
        let mut b = m.to_bytes();
        b.truncate(DHCP_OPTIONS_OFFSET);
        // Option code without a length byte.
        let mut t = b.clone();
        t.push(53);
        assert!(DhcpMessage::parse(&t).is_err());
        // Length running past the end.
        let mut t = b.clone();
        t.extend_from_slice(&[53, 10, 1]);
        assert!(DhcpMessage::parse(&t).is_err());
        // Pads only, no END: accepted, no options.
        let mut t = b.clone();
        t.extend_from_slice(&[0, 0, 0]);
        assert!(DhcpMessage::parse(&t).unwrap().options.is_empty());
        // Wrong-size message type is ignored, not trusted.
        let mut t = b.clone();
        t.extend_from_slice(&[53, 2, 1, 1, 255]);
        assert_eq!(DhcpMessage::parse(&t).unwrap().message_type(), None);
        // Bad cookie.
        let mut t = b.clone();
        t[236] = 0;
        assert!(DhcpMessage::parse(&t).is_err());
        assert!(DhcpMessage::parse(&b[..239]).is_err());
    }
}
