//! The tap backend against the real Linux stack: a tap interface moved into
//! a private network namespace, where the kernel (10.0.3.1/24) answers our
//! ARP and ICMP echo requests sent as 10.0.3.2.

mod common;

use common::{recv_until, ref_checksum, skip_or_fail};
use nestio_net::packet::arp::{
    build_arp_reply, build_arp_request, ArpPacket, ARP_OP_REPLY, ARP_OP_REQUEST,
};
use nestio_net::packet::ethernet::{EthernetFrame, ETHERTYPE_ARP, ETHERTYPE_IPV4};
use nestio_net::packet::icmp::{build_icmp_echo_request, IcmpPacket, ICMP_ECHO_REPLY};
use nestio_net::packet::ipv4::{Ipv4Packet, PROTO_ICMP};
use nestio_net::packet::MacAddr;
use nestio_net::{NetBackend, TapBackend};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const OUR_MAC: MacAddr = MacAddr([0x02, 0x6e, 0x65, 0x00, 0x03, 0x02]);
const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 2);
const KERNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 1);

use nestio_net::netns::{ip, Netns};

/// How long to wait for the kernel's answer: a hang bound only, generous for a loaded
/// 2-core CI machine.
const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// Receive frames until `want` accepts one, answering the kernel's ARP
/// requests for our address meanwhile. Gives up after [`ANSWER_WAIT`].
fn wait_for<T>(tap: &mut TapBackend, mut want: impl FnMut(&[u8]) -> Option<T>) -> T {
    let end = Instant::now() + ANSWER_WAIT;
    while Instant::now() < end {
        let Some(f) = recv_until(tap, Duration::from_millis(500)) else {
            continue;
        };
        if let Some(t) = want(&f) {
            return t;
        }
        if let Ok(e) = EthernetFrame::parse(&f) {
            if e.ethertype == ETHERTYPE_ARP {
                if let Ok(a) = ArpPacket::parse(e.payload) {
                    if a.op == ARP_OP_REQUEST && a.target_ip == OUR_IP {
                        tap.send(&build_arp_reply(OUR_MAC, OUR_IP, a.sender_mac, a.sender_ip))
                            .unwrap();
                    }
                }
            }
        }
    }
    panic!("expected frame not received from the kernel within {ANSWER_WAIT:?}");
}

#[test]
fn kernel_answers_arp_and_icmp_through_tap_in_netns() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("tap test needs root");
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        skip_or_fail("/dev/net/tun missing");
        return;
    }
    let pid = std::process::id();
    let ns_name = format!("nestio-test-{pid}");
    // A namespace of this name can only be left over from an earlier process with our
    // pid that died without cleaning up (e.g. a deadlock guard's abort): remove it.
    let _ = ip(&["netns", "del", &ns_name]);
    if let Err(e) = ip(&["netns", "add", &ns_name]) {
        skip_or_fail(&format!("cannot create a network namespace: {e}"));
        return;
    }
    let _ns = Netns(ns_name.clone());
    let ifname = format!("nt{}", pid % 1_000_000_000);
    // Declared after the namespace guard: dropped first, which deletes the tap.
    let mut tap = TapBackend::open(&ifname).expect("create tap");
    assert_eq!(tap.name(), ifname);
    assert_eq!(tap.describe(), format!("tap {ifname}"));
    // The fd keeps working after the interface moves to the namespace.
    ip(&["link", "set", &ifname, "netns", &ns_name]).unwrap();
    ip(&["-n", &ns_name, "addr", "add", "10.0.3.1/24", "dev", &ifname]).unwrap();
    ip(&["-n", &ns_name, "link", "set", &ifname, "up"]).unwrap();

    tap.send(&build_arp_request(OUR_MAC, OUR_IP, KERNEL_IP))
        .unwrap();
    let kernel_mac = wait_for(&mut tap, |f| {
        let e = EthernetFrame::parse(f).ok()?;
        if e.ethertype != ETHERTYPE_ARP || e.dst != OUR_MAC {
            return None;
        }
        let a = ArpPacket::parse(e.payload).ok()?;
        (a.op == ARP_OP_REPLY && a.sender_ip == KERNEL_IP).then(|| {
            assert_eq!(a.target_mac, OUR_MAC);
            assert_eq!(a.target_ip, OUR_IP);
            assert_eq!(e.src, a.sender_mac);
            a.sender_mac
        })
    });

    let payload: Vec<u8> = (0..100u8).collect();
    let req = build_icmp_echo_request(OUR_MAC, kernel_mac, OUR_IP, KERNEL_IP, 0xbeef, 1, &payload)
        .unwrap();
    tap.send(&req).unwrap();
    wait_for(&mut tap, |f| {
        let e = EthernetFrame::parse(f).ok()?;
        if e.ethertype != ETHERTYPE_IPV4 {
            return None;
        }
        let p = Ipv4Packet::parse(e.payload).ok()?;
        if p.protocol != PROTO_ICMP || p.src != KERNEL_IP {
            return None;
        }
        let i = IcmpPacket::parse(p.payload).ok()?;
        (i.icmp_type == ICMP_ECHO_REPLY && i.id == 0xbeef).then(|| {
            assert_eq!(e.dst, OUR_MAC);
            assert_eq!(p.dst, OUR_IP);
            assert_eq!(i.seq, 1);
            assert_eq!(i.payload, &payload[..]);
            assert_eq!(ref_checksum(&[&e.payload[..p.header_len]]), 0);
            assert_eq!(ref_checksum(&[p.payload]), 0);
        })
    });
}

#[test]
fn tap_open_errors_are_helpful() {
    let e = TapBackend::open("bad/name").unwrap_err();
    assert!(e.to_string().contains("bad/name"), "{e}");
}
