//! The "user" backend: a tiny virtual network that lives entirely in this
//! process, in the spirit of QEMU's user-mode ("slirp") conventions.
//!
//! Layout: network 10.0.2.0/24, gateway 10.0.2.2 with MAC 52:55:0a:00:02:02.
//! Services, all on the gateway address:
//! - ARP: answers requests for 10.0.2.2 (the only address it owns);
//! - ICMP: answers echo requests to 10.0.2.2 (checksums verified on input,
//!   computed on output, payload echoed);
//! - UDP echo on port [`UDP_ECHO_PORT`] (7) of 10.0.2.2;
//! - DHCP on port 67 (broadcast or unicast to 10.0.2.2): leases from
//!   10.0.2.15 (the first client), router 10.0.2.2, mask 255.255.255.0,
//!   broadcast 10.0.2.255, lease time one day. No DNS server is offered,
//!   since none is served. Nothing is routed beyond the gateway.
//!
//! Design: [`UserNetwork`] is the pure protocol logic (frame in, reply
//! frames out). [`UserBackend`] wraps it in a [`NetBackend`]: replies are
//! queued (bounded, [`MAX_QUEUED_FRAMES`]) and signalled through an eventfd
//! that is readable exactly while the queue is non-empty. Every frame that is
//! malformed, not addressed to the gateway or not understood is dropped,
//! counted in [`UserStats`] and logged at debug level.

pub mod dhcp_server;

use crate::packet::arp::{build_arp_reply, ArpPacket, ARP_OP_REQUEST};
use crate::packet::dhcp::{DhcpMessage, DHCP_CLIENT_PORT, DHCP_SERVER_PORT};
use crate::packet::ethernet::{EthernetFrame, ETHERTYPE_ARP, ETHERTYPE_IPV4};
use crate::packet::icmp::{build_icmp_echo_reply, IcmpPacket};
use crate::packet::ipv4::{Ipv4Packet, PROTO_ICMP, PROTO_UDP};
use crate::packet::udp::{build_udp_frame, UdpDatagram};
use crate::packet::MacAddr;
use crate::{NetBackend, NetError};
use dhcp_server::{DhcpServer, DhcpServerConfig};
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use tracing::debug;

/// Gateway address.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Gateway MAC.
pub const GATEWAY_MAC: MacAddr = MacAddr([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]);
/// Network address.
pub const NETWORK: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
/// Netmask (/24).
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// Subnet broadcast address.
pub const SUBNET_BROADCAST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 255);
/// First DHCP address, leased to the first client.
pub const FIRST_LEASE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// Number of DHCP pool addresses (10.0.2.15 ..= 10.0.2.30).
pub const LEASE_POOL_SIZE: u8 = 16;
/// DHCP lease time (seconds).
pub const LEASE_TIME_SECS: u32 = 86_400;
/// UDP echo service port on the gateway.
pub const UDP_ECHO_PORT: u16 = 7;
/// Replies queued beyond this are dropped (a guest flooding requests without
/// reading replies cannot grow memory without bound).
pub const MAX_QUEUED_FRAMES: usize = 256;

/// Counters of the user network.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UserStats {
    /// Frames received from the device.
    pub frames_in: u64,
    /// Reply frames generated.
    pub replies: u64,
    /// Dropped: failed to parse at some layer (truncated, bad checksum, ...).
    pub malformed: u64,
    /// Dropped: addressed to another MAC or IP.
    pub not_for_us: u64,
    /// Dropped: well-formed but not understood (other EtherTypes, protocols, ports, fragments).
    pub unsupported: u64,
    /// Understood, no answer due (ARP replies, DHCP for other servers, ...).
    pub ignored: u64,
    /// Replies dropped because the queue was full.
    pub queue_overflow: u64,
}

enum Verdict {
    Reply(Vec<u8>),
    Malformed(String),
    NotForUs,
    Unsupported(String),
    Ignored,
}

/// The protocol logic of the user network.
#[derive(Debug, Clone)]
pub struct UserNetwork {
    dhcp: DhcpServer,
    stats: UserStats,
}

impl Default for UserNetwork {
    fn default() -> Self {
        Self::new()
    }
}

impl UserNetwork {
    /// A fresh network with an empty lease table.
    pub fn new() -> Self {
        let dhcp = DhcpServer::new(DhcpServerConfig {
            server_ip: GATEWAY_IP,
            netmask: NETMASK,
            pool_start: FIRST_LEASE_IP,
            pool_size: LEASE_POOL_SIZE,
            lease_time: LEASE_TIME_SECS,
        })
        .expect("built-in DHCP pool lies inside 10.0.2.0/24");
        UserNetwork {
            dhcp,
            stats: UserStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> UserStats {
        self.stats
    }

    /// The DHCP server (to look up leases).
    pub fn dhcp(&self) -> &DhcpServer {
        &self.dhcp
    }

    /// Process one frame from the device; returns the reply, if any.
    pub fn handle_frame(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        self.stats.frames_in += 1;
        match self.dispatch(frame) {
            Verdict::Reply(r) => {
                self.stats.replies += 1;
                return Some(r);
            }
            Verdict::Malformed(why) => {
                self.stats.malformed += 1;
                debug!(
                    len = frame.len(),
                    "user net: malformed frame dropped: {why}"
                );
            }
            Verdict::NotForUs => {
                self.stats.not_for_us += 1;
                debug!(
                    len = frame.len(),
                    "user net: frame not addressed to the gateway, dropped"
                );
            }
            Verdict::Unsupported(why) => {
                self.stats.unsupported += 1;
                debug!(
                    len = frame.len(),
                    "user net: unsupported frame dropped: {why}"
                );
            }
            Verdict::Ignored => self.stats.ignored += 1,
        }
        None
    }

    fn dispatch(&mut self, frame: &[u8]) -> Verdict {
        let eth = match EthernetFrame::parse(frame) {
            Ok(e) => e,
            Err(e) => return Verdict::Malformed(e.to_string()),
        };
        if eth.src.is_multicast() {
            return Verdict::Malformed(format!("multicast source MAC {}", eth.src));
        }
        if eth.dst != GATEWAY_MAC && !eth.dst.is_broadcast() {
            return if eth.dst.is_multicast() {
                Verdict::Unsupported(format!("multicast destination {}", eth.dst))
            } else {
                Verdict::NotForUs
            };
        }
        match eth.ethertype {
            ETHERTYPE_ARP => self.arp(eth.payload),
            ETHERTYPE_IPV4 => self.ipv4(eth.src, eth.dst, eth.payload),
            t => Verdict::Unsupported(format!("EtherType {t:#06x}")),
        }
    }

    fn arp(&mut self, payload: &[u8]) -> Verdict {
        let arp = match ArpPacket::parse(payload) {
            Ok(a) => a,
            Err(e) => return Verdict::Malformed(e.to_string()),
        };
        if arp.op != ARP_OP_REQUEST {
            return Verdict::Ignored;
        }
        if arp.target_ip != GATEWAY_IP {
            return Verdict::Ignored;
        }
        if arp.sender_mac.is_multicast() || arp.sender_mac == MacAddr::ZERO {
            return Verdict::Malformed(format!("ARP sender MAC {}", arp.sender_mac));
        }
        Verdict::Reply(build_arp_reply(
            GATEWAY_MAC,
            GATEWAY_IP,
            arp.sender_mac,
            arp.sender_ip,
        ))
    }

    fn ipv4(&mut self, src_mac: MacAddr, dst_mac: MacAddr, payload: &[u8]) -> Verdict {
        let ip = match Ipv4Packet::parse(payload) {
            Ok(p) => p,
            Err(e) => return Verdict::Malformed(e.to_string()),
        };
        if ip.is_fragment() {
            return Verdict::Unsupported("IPv4 fragment".into());
        }
        let to_gateway = ip.dst == GATEWAY_IP && dst_mac == GATEWAY_MAC;
        let broadcast = ip.dst == Ipv4Addr::BROADCAST || ip.dst == SUBNET_BROADCAST;
        if !to_gateway && !broadcast {
            return Verdict::NotForUs;
        }
        match ip.protocol {
            PROTO_ICMP if to_gateway => self.icmp(src_mac, &ip),
            PROTO_UDP => self.udp(src_mac, to_gateway, &ip),
            p => Verdict::Unsupported(format!("IP protocol {p} to {}", ip.dst)),
        }
    }

    fn valid_unicast_src(ip: Ipv4Addr) -> bool {
        !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip == SUBNET_BROADCAST)
    }

    fn icmp(&mut self, src_mac: MacAddr, ip: &Ipv4Packet<'_>) -> Verdict {
        let icmp = match IcmpPacket::parse(ip.payload) {
            Ok(i) => i,
            Err(e) => return Verdict::Malformed(e.to_string()),
        };
        if !icmp.is_echo_request() {
            return Verdict::Unsupported(format!(
                "ICMP type {} code {}",
                icmp.icmp_type, icmp.code
            ));
        }
        if !Self::valid_unicast_src(ip.src) {
            return Verdict::Malformed(format!("echo request from {}", ip.src));
        }
        match build_icmp_echo_reply(
            GATEWAY_MAC,
            src_mac,
            GATEWAY_IP,
            ip.src,
            icmp.id,
            icmp.seq,
            icmp.payload,
        ) {
            Ok(f) => Verdict::Reply(f),
            Err(e) => Verdict::Malformed(e.to_string()),
        }
    }

    fn udp(&mut self, src_mac: MacAddr, to_gateway: bool, ip: &Ipv4Packet<'_>) -> Verdict {
        let udp = match UdpDatagram::parse(ip.payload, ip.src, ip.dst) {
            Ok(u) => u,
            Err(e) => return Verdict::Malformed(e.to_string()),
        };
        match udp.dst_port {
            DHCP_SERVER_PORT => self.dhcp_request(udp.src_port, udp.payload),
            UDP_ECHO_PORT if to_gateway => {
                if !Self::valid_unicast_src(ip.src) || udp.src_port == 0 {
                    return Verdict::Malformed(format!(
                        "UDP echo from {}:{}",
                        ip.src, udp.src_port
                    ));
                }
                match build_udp_frame(
                    GATEWAY_MAC,
                    src_mac,
                    GATEWAY_IP,
                    ip.src,
                    UDP_ECHO_PORT,
                    udp.src_port,
                    udp.payload,
                ) {
                    Ok(f) => Verdict::Reply(f),
                    Err(e) => Verdict::Malformed(e.to_string()),
                }
            }
            p => Verdict::Unsupported(format!("UDP port {p} on {}", ip.dst)),
        }
    }

    fn dhcp_request(&mut self, src_port: u16, payload: &[u8]) -> Verdict {
        if src_port != DHCP_CLIENT_PORT {
            return Verdict::Unsupported(format!("DHCP from port {src_port}"));
        }
        let msg = match DhcpMessage::parse(payload) {
            Ok(m) => m,
            Err(e) => return Verdict::Malformed(e.to_string()),
        };
        let Some(reply) = self.dhcp.handle(&msg) else {
            return Verdict::Ignored;
        };
        match build_udp_frame(
            GATEWAY_MAC,
            reply.dst_mac,
            GATEWAY_IP,
            reply.dst_ip,
            DHCP_SERVER_PORT,
            DHCP_CLIENT_PORT,
            &reply.msg.to_bytes(),
        ) {
            Ok(f) => Verdict::Reply(f),
            Err(e) => Verdict::Malformed(e.to_string()),
        }
    }
}

/// The user network as a [`NetBackend`].
#[derive(Debug)]
pub struct UserBackend {
    net: UserNetwork,
    queue: VecDeque<Vec<u8>>,
    event: OwnedFd,
    /// The eventfd holds a count (written and not read back since).
    signalled: bool,
    /// Notifications held ([`NetBackend::hold_notifications`]).
    held: bool,
}

impl UserBackend {
    /// Create the network and its eventfd.
    pub fn new() -> Result<Self, NetError> {
        // SAFETY: eventfd has no memory arguments; the return value is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(NetError::Eventfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let event = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(UserBackend {
            net: UserNetwork::new(),
            queue: VecDeque::new(),
            event,
            signalled: false,
            held: false,
        })
    }

    /// Counters of the network.
    pub fn stats(&self) -> UserStats {
        self.net.stats()
    }

    /// The protocol state (leases).
    pub fn network(&self) -> &UserNetwork {
        &self.net
    }

    /// Frames waiting for the device.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    fn signal(&mut self) {
        if self.signalled {
            return;
        }
        self.signalled = true;
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let r = unsafe { libc::write(self.event.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if r != 8 {
            // Only EAGAIN (counter saturated) is possible; the fd stays readable.
            debug!(
                "user net: eventfd write: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    fn unsignal(&mut self) {
        if !self.signalled {
            return;
        }
        self.signalled = false;
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own eventfd.
        let _ = unsafe { libc::read(self.event.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

impl NetBackend for UserBackend {
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        if let Some(reply) = self.net.handle_frame(frame) {
            if self.queue.len() >= MAX_QUEUED_FRAMES {
                self.net.stats.queue_overflow += 1;
                debug!("user net: reply queue full ({MAX_QUEUED_FRAMES}), reply dropped");
            } else {
                self.queue.push_back(reply);
                if !self.held {
                    self.signal();
                }
            }
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        let Some(frame) = self.queue.pop_front() else {
            self.unsignal();
            return Ok(None);
        };
        if self.queue.is_empty() {
            self.unsignal();
        }
        if frame.len() > buf.len() {
            return Err(NetError::FrameTooLarge {
                len: frame.len(),
                buf: buf.len(),
            });
        }
        buf[..frame.len()].copy_from_slice(&frame);
        Ok(Some(frame.len()))
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }

    fn hold_notifications(&mut self, hold: bool) {
        self.held = hold;
        if !hold && !self.queue.is_empty() {
            self.signal();
        }
    }

    fn describe(&self) -> String {
        "user (10.0.2.0/24)".to_string()
    }
}

/// Assert that `frame` is a reply the user network may legitimately emit:
/// from the gateway MAC, at least 60 bytes, ARP or IPv4 from 10.0.2.2 with
/// valid IP/ICMP/UDP checksums. Used by the fuzz entry point; panics on a
/// violation.
pub fn check_reply(frame: &[u8]) {
    let eth = EthernetFrame::parse(frame).expect("reply has an Ethernet header");
    assert_eq!(eth.src, GATEWAY_MAC, "reply from the gateway MAC");
    assert!(
        frame.len() >= crate::packet::ethernet::ETH_MIN_FRAME_LEN,
        "reply padded"
    );
    assert!(
        !eth.dst.is_multicast() || eth.dst.is_broadcast(),
        "reply to a unicast or broadcast MAC"
    );
    match eth.ethertype {
        ETHERTYPE_ARP => {
            let a = ArpPacket::parse(eth.payload).expect("reply ARP parses");
            assert_eq!(a.sender_ip, GATEWAY_IP);
            assert_eq!(a.sender_mac, GATEWAY_MAC);
        }
        ETHERTYPE_IPV4 => {
            let ip =
                Ipv4Packet::parse(eth.payload).expect("reply IPv4 parses with a valid checksum");
            assert_eq!(ip.src, GATEWAY_IP);
            match ip.protocol {
                PROTO_ICMP => {
                    IcmpPacket::parse(ip.payload).expect("reply ICMP checksum valid");
                }
                PROTO_UDP => {
                    let u = UdpDatagram::parse(ip.payload, ip.src, ip.dst)
                        .expect("reply UDP checksum valid");
                    assert_ne!(u.checksum, 0, "replies carry a UDP checksum");
                    if u.src_port == DHCP_SERVER_PORT {
                        DhcpMessage::parse(u.payload).expect("reply DHCP parses");
                    }
                }
                p => panic!("unexpected reply protocol {p}"),
            }
        }
        t => panic!("unexpected reply EtherType {t:#x}"),
    }
}
