//! The user network's DHCP server: a fixed pool (by default 16 addresses
//! from 10.0.2.15, so the first client gets 10.0.2.15), one lease per client
//! MAC, no persistence and no lease expiry (the network lives as long as the
//! VM). DISCOVER gets an OFFER, REQUEST an ACK (or a NAK when it asks for an
//! address that is not its lease), RELEASE frees the lease, DECLINE retires
//! the address, INFORM gets the configuration without an address. Relayed messages (giaddr set) and
//! messages naming another server are ignored.

use crate::packet::dhcp::{
    opt, DhcpMessage, DhcpMessageType, BOOTREPLY, BOOTREQUEST, DHCP_FLAG_BROADCAST,
};
use crate::packet::MacAddr;
use std::net::Ipv4Addr;
use tracing::debug;

/// Server settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhcpServerConfig {
    /// Server identifier and router (the gateway).
    pub server_ip: Ipv4Addr,
    /// Subnet mask handed out.
    pub netmask: Ipv4Addr,
    /// First pool address.
    pub pool_start: Ipv4Addr,
    /// Number of pool addresses (1..=255, and the pool must stay in the subnet).
    pub pool_size: u8,
    /// Lease time in seconds.
    pub lease_time: u32,
}

/// Where and what to send in answer to a client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpReply {
    /// The reply message.
    pub msg: DhcpMessage,
    /// Destination IP (255.255.255.255 when broadcast).
    pub dst_ip: Ipv4Addr,
    /// Destination MAC (broadcast or the client's).
    pub dst_mac: MacAddr,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    mac: MacAddr,
    ip: Ipv4Addr,
}

/// DHCP server state.
#[derive(Debug, Clone)]
pub struct DhcpServer {
    cfg: DhcpServerConfig,
    leases: Vec<Lease>,
}

impl DhcpServer {
    /// A server with an empty lease table. `None` when the pool is empty or
    /// leaves the subnet of `server_ip`/`netmask`.
    pub fn new(cfg: DhcpServerConfig) -> Option<Self> {
        if cfg.pool_size == 0 {
            return None;
        }
        let start = u32::from(cfg.pool_start);
        let last = start.checked_add(u32::from(cfg.pool_size) - 1)?;
        let mask = u32::from(cfg.netmask);
        let net = u32::from(cfg.server_ip) & mask;
        let bcast = net | !mask;
        if start & mask != net || last & mask != net || start == net || last >= bcast {
            return None;
        }
        Some(DhcpServer {
            cfg,
            leases: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DhcpServerConfig {
        &self.cfg
    }

    /// The address leased (or offered) to `mac`, if any.
    pub fn lease_of(&self, mac: MacAddr) -> Option<Ipv4Addr> {
        self.leases.iter().find(|l| l.mac == mac).map(|l| l.ip)
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        let s = u32::from(self.cfg.pool_start);
        let i = u32::from(ip);
        i >= s && i - s < u32::from(self.cfg.pool_size)
    }

    fn allocate(&mut self, mac: MacAddr, want: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        if let Some(ip) = self.lease_of(mac) {
            return Some(ip);
        }
        let free = |ip: Ipv4Addr, leases: &[Lease]| leases.iter().all(|l| l.ip != ip);
        let ip = match want {
            Some(w) if self.in_pool(w) && free(w, &self.leases) => w,
            _ => {
                let s = u32::from(self.cfg.pool_start);
                (0..u32::from(self.cfg.pool_size))
                    .map(|k| Ipv4Addr::from(s + k))
                    .find(|ip| free(*ip, &self.leases))?
            }
        };
        self.leases.push(Lease { mac, ip });
        Some(ip)
    }

    fn reply(&self, req: &DhcpMessage, t: DhcpMessageType, yiaddr: Ipv4Addr) -> DhcpReply {
        let mut m = DhcpMessage {
            op: BOOTREPLY,
            htype: req.htype,
            hlen: req.hlen,
            hops: 0,
            xid: req.xid,
            secs: 0,
            flags: req.flags,
            ciaddr: req.ciaddr,
            yiaddr,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: req.giaddr,
            chaddr: req.chaddr,
            options: Vec::new(),
        };
        m.push_option(opt::MESSAGE_TYPE, &[t as u8]);
        m.push_option(opt::SERVER_ID, &self.cfg.server_ip.octets());
        if t != DhcpMessageType::Nak {
            if t != DhcpMessageType::Ack || yiaddr != Ipv4Addr::UNSPECIFIED {
                let lt = self.cfg.lease_time;
                m.push_option(opt::LEASE_TIME, &lt.to_be_bytes());
                m.push_option(opt::RENEWAL_TIME, &(lt / 2).to_be_bytes());
                m.push_option(opt::REBINDING_TIME, &(lt / 8 * 7).to_be_bytes());
            }
            let mask = u32::from(self.cfg.netmask);
            let bcast = Ipv4Addr::from(u32::from(self.cfg.server_ip) | !mask);
            m.push_option(opt::SUBNET_MASK, &self.cfg.netmask.octets());
            m.push_option(opt::ROUTER, &self.cfg.server_ip.octets());
            m.push_option(opt::BROADCAST_ADDR, &bcast.octets());
        }
        // RFC 2131 4.1 (no relays here): NAKs broadcast; a client with an
        // address gets unicast there; otherwise honour the broadcast flag,
        // else unicast to the new address at the client's MAC.
        let client_mac = req.client_mac().unwrap_or(MacAddr::BROADCAST);
        let (dst_ip, dst_mac) = if t == DhcpMessageType::Nak {
            (Ipv4Addr::BROADCAST, MacAddr::BROADCAST)
        } else if req.ciaddr != Ipv4Addr::UNSPECIFIED {
            (req.ciaddr, client_mac)
        } else if req.flags & DHCP_FLAG_BROADCAST != 0 {
            (Ipv4Addr::BROADCAST, MacAddr::BROADCAST)
        } else {
            (yiaddr, client_mac)
        };
        DhcpReply {
            msg: m,
            dst_ip,
            dst_mac,
        }
    }

    /// Handle one client message; `None` when no answer is due.
    pub fn handle(&mut self, req: &DhcpMessage) -> Option<DhcpReply> {
        if req.op != BOOTREQUEST || req.giaddr != Ipv4Addr::UNSPECIFIED {
            debug!(op = req.op, giaddr = %req.giaddr, "dhcp: not a direct client request, ignored");
            return None;
        }
        let Some(mac) = req.client_mac() else {
            debug!(
                htype = req.htype,
                hlen = req.hlen,
                "dhcp: not an Ethernet client, ignored"
            );
            return None;
        };
        if mac.is_multicast() || mac == MacAddr::ZERO {
            debug!(%mac, "dhcp: invalid client hardware address, ignored");
            return None;
        }
        let for_other_server = req
            .option_ip(opt::SERVER_ID)
            .is_some_and(|s| s != self.cfg.server_ip);
        let t = req.message_type()?;
        match t {
            DhcpMessageType::Discover => {
                let Some(ip) = self.allocate(mac, req.option_ip(opt::REQUESTED_IP)) else {
                    debug!(%mac, "dhcp: address pool exhausted, DISCOVER ignored");
                    return None;
                };
                Some(self.reply(req, DhcpMessageType::Offer, ip))
            }
            DhcpMessageType::Request => {
                if for_other_server {
                    debug!(%mac, "dhcp: client selected another server");
                    return None;
                }
                let wanted = req.option_ip(opt::REQUESTED_IP).unwrap_or(req.ciaddr);
                let ok = match self.lease_of(mac) {
                    Some(ip) => ip == wanted,
                    None => self.allocate(mac, Some(wanted)) == Some(wanted),
                };
                if ok {
                    Some(self.reply(req, DhcpMessageType::Ack, wanted))
                } else {
                    if self.lease_of(mac) != Some(wanted) {
                        // allocate() may have picked another address; a NAKed
                        // client starts over with DISCOVER anyway.
                        self.leases.retain(|l| l.mac != mac);
                    }
                    debug!(%mac, %wanted, "dhcp: REQUEST for an address that is not the client's lease, NAK");
                    Some(self.reply(req, DhcpMessageType::Nak, Ipv4Addr::UNSPECIFIED))
                }
            }
            DhcpMessageType::Release => {
                if !for_other_server {
                    self.leases
                        .retain(|l| !(l.mac == mac && l.ip == req.ciaddr));
                }
                None
            }
            DhcpMessageType::Inform => {
                if req.ciaddr == Ipv4Addr::UNSPECIFIED {
                    return None;
                }
                Some(self.reply(req, DhcpMessageType::Ack, Ipv4Addr::UNSPECIFIED))
            }
            DhcpMessageType::Decline => {
                // The client found the address in use: keep it reserved (under
                // the zero MAC) so it is not offered again, and forget the lease.
                let declined = req.option_ip(opt::REQUESTED_IP);
                if !for_other_server && declined.is_some() && declined == self.lease_of(mac) {
                    debug!(%mac, ip = ?declined, "dhcp: client declined its address; address reserved");
                    for l in self.leases.iter_mut().filter(|l| l.mac == mac) {
                        l.mac = MacAddr::ZERO;
                    }
                }
                None
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pool_size: u8) -> DhcpServerConfig {
        DhcpServerConfig {
            server_ip: Ipv4Addr::new(10, 0, 2, 2),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            pool_start: Ipv4Addr::new(10, 0, 2, 15),
            pool_size,
            lease_time: 3600,
        }
    }

    fn msg(t: DhcpMessageType, mac: u8) -> DhcpMessage {
        let mut m = DhcpMessage::new(BOOTREQUEST, 1, MacAddr([2, 0, 0, 0, 0, mac]));
        m.push_option(opt::MESSAGE_TYPE, &[t as u8]);
        m
    }

    #[test]
    fn config_checked() {
        assert!(DhcpServer::new(cfg(0)).is_none());
        assert!(DhcpServer::new(cfg(240)).is_some()); // .15 ..= .254
        assert!(DhcpServer::new(cfg(241)).is_none()); // would include .255
        let mut c = cfg(4);
        c.pool_start = Ipv4Addr::new(10, 0, 3, 1);
        assert!(DhcpServer::new(c).is_none());
        c.pool_start = Ipv4Addr::new(10, 0, 2, 0);
        assert!(DhcpServer::new(c).is_none());
    }

    #[test]
    fn pool_exhaustion_release_and_decline() {
        let mut s = DhcpServer::new(cfg(2)).unwrap();
        let a = s.handle(&msg(DhcpMessageType::Discover, 1)).unwrap();
        let b = s.handle(&msg(DhcpMessageType::Discover, 2)).unwrap();
        assert_eq!(a.msg.yiaddr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(b.msg.yiaddr, Ipv4Addr::new(10, 0, 2, 16));
        assert!(
            s.handle(&msg(DhcpMessageType::Discover, 3)).is_none(),
            "pool exhausted"
        );
        // Client 1 releases; client 3 now gets .15.
        let mut rel = msg(DhcpMessageType::Release, 1);
        rel.ciaddr = Ipv4Addr::new(10, 0, 2, 15);
        assert!(s.handle(&rel).is_none());
        assert_eq!(s.lease_of(MacAddr([2, 0, 0, 0, 0, 1])), None);
        let c = s.handle(&msg(DhcpMessageType::Discover, 3)).unwrap();
        assert_eq!(c.msg.yiaddr, Ipv4Addr::new(10, 0, 2, 15));
        // Client 3 declines .15: it stays reserved, and nothing is left.
        let mut dec = msg(DhcpMessageType::Decline, 3);
        dec.push_option(opt::REQUESTED_IP, &[10, 0, 2, 15]);
        assert!(s.handle(&dec).is_none());
        assert_eq!(s.lease_of(MacAddr([2, 0, 0, 0, 0, 3])), None);
        assert!(s.handle(&msg(DhcpMessageType::Discover, 3)).is_none());
    }

    #[test]
    fn inform_renew_and_ignored_requests() {
        let mut s = DhcpServer::new(cfg(4)).unwrap();
        let mut inf = msg(DhcpMessageType::Inform, 9);
        inf.ciaddr = Ipv4Addr::new(10, 0, 2, 100);
        let r = s.handle(&inf).unwrap();
        assert_eq!(r.msg.message_type(), Some(DhcpMessageType::Ack));
        assert_eq!(r.msg.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.msg.option(opt::LEASE_TIME), None);
        assert_eq!(
            r.msg.option_ip(opt::ROUTER),
            Some(Ipv4Addr::new(10, 0, 2, 2))
        );
        assert_eq!(
            (r.dst_ip, r.dst_mac),
            (inf.ciaddr, MacAddr([2, 0, 0, 0, 0, 9]))
        );

        // RENEWING: REQUEST with ciaddr, no option 50: ACK unicast to ciaddr.
        s.handle(&msg(DhcpMessageType::Discover, 1)).unwrap();
        let mut ren = msg(DhcpMessageType::Request, 1);
        ren.ciaddr = Ipv4Addr::new(10, 0, 2, 15);
        let r = s.handle(&ren).unwrap();
        assert_eq!(r.msg.message_type(), Some(DhcpMessageType::Ack));
        assert_eq!(r.dst_ip, ren.ciaddr);

        // Replies, relayed requests, non-Ethernet clients, no message type: ignored.
        let mut m = msg(DhcpMessageType::Discover, 5);
        m.op = BOOTREPLY;
        assert!(s.handle(&m).is_none());
        let mut m = msg(DhcpMessageType::Discover, 5);
        m.giaddr = Ipv4Addr::new(10, 0, 2, 1);
        assert!(s.handle(&m).is_none());
        let mut m = msg(DhcpMessageType::Discover, 5);
        m.hlen = 16;
        assert!(s.handle(&m).is_none());
        let m = DhcpMessage::new(BOOTREQUEST, 1, MacAddr([2, 0, 0, 0, 0, 5]));
        assert!(s.handle(&m).is_none());
        assert_eq!(s.lease_of(MacAddr([2, 0, 0, 0, 0, 5])), None);
    }
}
