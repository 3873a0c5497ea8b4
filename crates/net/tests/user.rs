//! The user-mode network: ARP, ICMP echo, UDP echo, DHCP, the eventfd
//! signalling, and hostile input (truncations, bit flips, random mutations).

mod common;

use common::{readable, ref_checksum, Rng};
use nestio_net::packet::arp::build_arp_request;
use nestio_net::packet::dhcp::{
    build_dhcp_discover, build_dhcp_request, opt, DhcpMessage, DhcpMessageType, BOOTREQUEST,
    DHCP_FLAG_BROADCAST,
};
use nestio_net::packet::icmp::build_icmp_echo_request;
use nestio_net::packet::udp::build_udp_frame;
use nestio_net::packet::MacAddr;
use nestio_net::user::{GATEWAY_IP, GATEWAY_MAC, MAX_QUEUED_FRAMES, UDP_ECHO_PORT};
use nestio_net::{open_backend, NetBackend, NetError, UserBackend, UserStats};
use std::net::Ipv4Addr;

const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

fn exchange(b: &mut UserBackend, frame: &[u8]) -> Vec<Vec<u8>> {
    b.send(frame).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 70000];
    while let Some(n) = b.recv(&mut buf).unwrap() {
        out.push(buf[..n].to_vec());
    }
    out
}

fn one_reply(b: &mut UserBackend, frame: &[u8]) -> Vec<u8> {
    let mut r = exchange(b, frame);
    assert_eq!(r.len(), 1, "exactly one reply expected");
    r.pop().unwrap()
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn stats_balance(s: &UserStats) {
    assert_eq!(
        s.frames_in,
        s.replies + s.malformed + s.not_for_us + s.unsupported + s.ignored,
        "every frame is accounted for exactly once: {s:?}"
    );
}

/// Check the IPv4 header at frame[14..] independently; returns (header_len, total_len).
fn check_ipv4(f: &[u8], proto: u8, src: Ipv4Addr, dst: Ipv4Addr) -> (usize, usize) {
    assert_eq!(be16(f, 12), 0x0800);
    assert_eq!(f[14], 0x45, "version 4, IHL 5");
    let total = be16(f, 16) as usize;
    assert!(14 + total <= f.len());
    assert_eq!(f[23], proto);
    assert!(f[22] > 0, "TTL");
    assert_eq!(&f[26..30], &src.octets());
    assert_eq!(&f[30..34], &dst.octets());
    assert_eq!(ref_checksum(&[&f[14..34]]), 0, "IPv4 header checksum");
    (20, total)
}

fn check_udp_checksum(f: &[u8], total: usize) {
    let seg = &f[34..14 + total];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    assert_ne!(be16(seg, 6), 0, "checksum present");
    assert_eq!(ref_checksum(&[&pseudo, seg]), 0, "UDP checksum");
}

#[test]
fn arp_request_for_gateway_gets_reply() {
    let mut b = UserBackend::new().unwrap();
    let r = one_reply(&mut b, &build_arp_request(GUEST_MAC, GUEST_IP, GATEWAY_IP));
    assert_eq!(&r[0..6], &GUEST_MAC.0, "eth dst = requester");
    assert_eq!(&r[6..12], &GATEWAY_MAC.0, "eth src = gateway");
    assert_eq!(be16(&r, 12), 0x0806);
    assert_eq!(be16(&r, 14), 1, "htype Ethernet");
    assert_eq!(be16(&r, 16), 0x0800, "ptype IPv4");
    assert_eq!((r[18], r[19]), (6, 4));
    assert_eq!(be16(&r, 20), 2, "op reply");
    assert_eq!(&r[22..28], &[0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]);
    assert_eq!(&r[28..32], &[10, 0, 2, 2]);
    assert_eq!(&r[32..38], &GUEST_MAC.0);
    assert_eq!(&r[38..42], &[10, 0, 2, 15]);
    assert_eq!(r.len(), 60, "padded to the Ethernet minimum");
}

#[test]
fn arp_for_other_addresses_and_replies_are_ignored() {
    let mut b = UserBackend::new().unwrap();
    assert!(exchange(
        &mut b,
        &build_arp_request(GUEST_MAC, GUEST_IP, Ipv4Addr::new(10, 0, 2, 99))
    )
    .is_empty());
    // An ARP reply addressed to the gateway needs no answer.
    let reply =
        nestio_net::packet::arp::build_arp_reply(GUEST_MAC, GUEST_IP, GATEWAY_MAC, GATEWAY_IP);
    assert!(exchange(&mut b, &reply).is_empty());
    let s = b.stats();
    assert_eq!(s.ignored, 2);
    assert_eq!(s.replies, 0);
    stats_balance(&s);
}

fn ping(b: &mut UserBackend, id: u16, seq: u16, payload: &[u8]) {
    let req = build_icmp_echo_request(
        GUEST_MAC,
        GATEWAY_MAC,
        GUEST_IP,
        GATEWAY_IP,
        id,
        seq,
        payload,
    )
    .unwrap();
    let r = one_reply(b, &req);
    assert_eq!(&r[0..6], &GUEST_MAC.0);
    assert_eq!(&r[6..12], &GATEWAY_MAC.0);
    let (_, total) = check_ipv4(&r, 1, GATEWAY_IP, GUEST_IP);
    assert_eq!(total, 20 + 8 + payload.len());
    let icmp = &r[34..14 + total];
    assert_eq!((icmp[0], icmp[1]), (0, 0), "echo reply");
    assert_eq!(ref_checksum(&[icmp]), 0, "ICMP checksum");
    assert_eq!(be16(icmp, 4), id);
    assert_eq!(be16(icmp, 6), seq);
    assert_eq!(&icmp[8..], payload, "payload echoed");
}

#[test]
fn icmp_echo_to_gateway_gets_reply_with_valid_checksums() {
    let mut b = UserBackend::new().unwrap();
    let payload: Vec<u8> = (0..56u8).collect();
    ping(&mut b, 0x4242, 1, &payload);
    ping(&mut b, 0xffff, 0xfffe, b"odd"); // odd length
    ping(&mut b, 7, 3, &[]);
    ping(&mut b, 7, 4, &vec![0xff; 1472]); // full-MTU ping, carries galore
    assert_eq!(b.stats().replies, 4);
}

#[test]
fn icmp_with_bad_checksum_or_not_for_gateway_gets_no_reply() {
    let mut b = UserBackend::new().unwrap();
    let mut req =
        build_icmp_echo_request(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 1, 1, b"abcd")
            .unwrap();
    req[40] ^= 0x01; // inside the ICMP data
    assert!(exchange(&mut b, &req).is_empty());
    assert_eq!(b.stats().malformed, 1);
    let other = build_icmp_echo_request(
        GUEST_MAC,
        GATEWAY_MAC,
        GUEST_IP,
        Ipv4Addr::new(8, 8, 8, 8),
        1,
        1,
        b"x",
    )
    .unwrap();
    assert!(exchange(&mut b, &other).is_empty());
    let wrong_mac = build_icmp_echo_request(
        GUEST_MAC,
        MacAddr([2, 0, 0, 0, 0, 1]),
        GUEST_IP,
        GATEWAY_IP,
        1,
        1,
        b"x",
    )
    .unwrap();
    assert!(exchange(&mut b, &wrong_mac).is_empty());
    assert_eq!(b.stats().not_for_us, 2);
    stats_balance(&b.stats());
}

#[test]
fn every_ipv4_header_bit_flip_suppresses_the_echo_reply() {
    let mut b = UserBackend::new().unwrap();
    let req = build_icmp_echo_request(GUEST_MAC, GATEWAY_MAC, GUEST_IP, GATEWAY_IP, 9, 9, b"flip")
        .unwrap();
    for bit in 0..20 * 8 {
        let mut f = req.clone();
        f[14 + bit / 8] ^= 1 << (bit % 8);
        assert!(exchange(&mut b, &f).is_empty(), "bit {bit}");
    }
    assert_eq!(b.stats().replies, 0);
    stats_balance(&b.stats());
}

#[test]
fn udp_echo_service_on_port_7() {
    let mut b = UserBackend::new().unwrap();
    let f = build_udp_frame(
        GUEST_MAC,
        GATEWAY_MAC,
        GUEST_IP,
        GATEWAY_IP,
        40000,
        UDP_ECHO_PORT,
        b"hello, gateway",
    )
    .unwrap();
    let r = one_reply(&mut b, &f);
    assert_eq!(&r[0..6], &GUEST_MAC.0);
    let (_, total) = check_ipv4(&r, 17, GATEWAY_IP, GUEST_IP);
    assert_eq!(be16(&r, 34), UDP_ECHO_PORT);
    assert_eq!(be16(&r, 36), 40000);
    assert_eq!(be16(&r, 38) as usize, total - 20, "UDP length");
    assert_eq!(&r[42..14 + total], b"hello, gateway");
    check_udp_checksum(&r, total);

    // Another port: dropped as unsupported.
    let f = build_udp_frame(
        GUEST_MAC,
        GATEWAY_MAC,
        GUEST_IP,
        GATEWAY_IP,
        40000,
        9999,
        b"x",
    )
    .unwrap();
    assert!(exchange(&mut b, &f).is_empty());
    assert_eq!(b.stats().unsupported, 1);
}

fn dhcp_reply(r: &[u8], dst_mac: MacAddr, dst_ip: Ipv4Addr) -> DhcpMessage {
    assert_eq!(&r[0..6], &dst_mac.0);
    assert_eq!(&r[6..12], &GATEWAY_MAC.0);
    let (_, total) = check_ipv4(r, 17, GATEWAY_IP, dst_ip);
    assert_eq!((be16(r, 34), be16(r, 36)), (67, 68));
    check_udp_checksum(r, total);
    DhcpMessage::parse(&r[42..14 + total]).expect("DHCP reply parses")
}

fn assert_config_options(m: &DhcpMessage) {
    assert_eq!(m.option_ip(opt::SERVER_ID), Some(GATEWAY_IP));
    assert_eq!(
        m.option_ip(opt::SUBNET_MASK),
        Some(Ipv4Addr::new(255, 255, 255, 0))
    );
    assert_eq!(m.option_ip(opt::ROUTER), Some(GATEWAY_IP));
    assert_eq!(
        m.option_ip(opt::BROADCAST_ADDR),
        Some(Ipv4Addr::new(10, 0, 2, 255))
    );
    assert_eq!(m.option_u32(opt::LEASE_TIME), Some(86400));
    assert_eq!(m.option_u32(opt::RENEWAL_TIME), Some(43200));
    assert_eq!(m.option_u32(opt::REBINDING_TIME), Some(75600));
}

#[test]
fn dhcp_discover_offer_request_ack() {
    let mut b = UserBackend::new().unwrap();
    let r = one_reply(
        &mut b,
        &build_dhcp_discover(GUEST_MAC, 0x1234_5678).unwrap(),
    );
    // No broadcast flag, no ciaddr: unicast to the offered address.
    let offer = dhcp_reply(&r, GUEST_MAC, GUEST_IP);
    assert_eq!(offer.op, 2);
    assert_eq!(offer.xid, 0x1234_5678);
    assert_eq!(offer.message_type(), Some(DhcpMessageType::Offer));
    assert_eq!(offer.yiaddr, GUEST_IP, "the first client gets 10.0.2.15");
    assert_eq!(offer.client_mac(), Some(GUEST_MAC));
    assert_config_options(&offer);

    let r = one_reply(
        &mut b,
        &build_dhcp_request(GUEST_MAC, 0x1234_5678, GUEST_IP, GATEWAY_IP).unwrap(),
    );
    let ack = dhcp_reply(&r, GUEST_MAC, GUEST_IP);
    assert_eq!(ack.message_type(), Some(DhcpMessageType::Ack));
    assert_eq!(ack.yiaddr, GUEST_IP);
    assert_eq!(ack.xid, 0x1234_5678);
    assert_config_options(&ack);
    assert_eq!(b.network().dhcp().lease_of(GUEST_MAC), Some(GUEST_IP));

    // Same client again: same address.
    let r = one_reply(&mut b, &build_dhcp_discover(GUEST_MAC, 2).unwrap());
    assert_eq!(dhcp_reply(&r, GUEST_MAC, GUEST_IP).yiaddr, GUEST_IP);
}

#[test]
fn dhcp_second_client_broadcast_flag_nak_and_foreign_server() {
    let mut b = UserBackend::new().unwrap();
    one_reply(&mut b, &build_dhcp_discover(GUEST_MAC, 1).unwrap());
    // A second client asking for a broadcast reply gets the next address.
    let mac2 = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
    let mut d = DhcpMessage::new(BOOTREQUEST, 77, mac2);
    d.flags = DHCP_FLAG_BROADCAST;
    d.push_option(opt::MESSAGE_TYPE, &[DhcpMessageType::Discover as u8]);
    let f = build_udp_frame(
        mac2,
        MacAddr::BROADCAST,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        68,
        67,
        &d.to_bytes(),
    )
    .unwrap();
    let r = one_reply(&mut b, &f);
    let offer = dhcp_reply(&r, MacAddr::BROADCAST, Ipv4Addr::BROADCAST);
    assert_eq!(offer.yiaddr, Ipv4Addr::new(10, 0, 2, 16));

    // Requesting the first client's address: NAK, broadcast.
    let r = one_reply(
        &mut b,
        &build_dhcp_request(mac2, 78, GUEST_IP, GATEWAY_IP).unwrap(),
    );
    let nak = dhcp_reply(&r, MacAddr::BROADCAST, Ipv4Addr::BROADCAST);
    assert_eq!(nak.message_type(), Some(DhcpMessageType::Nak));
    assert_eq!(nak.yiaddr, Ipv4Addr::UNSPECIFIED);
    assert_eq!(nak.option(opt::LEASE_TIME), None);

    // A REQUEST naming another server is not ours to answer.
    let f = build_dhcp_request(
        mac2,
        79,
        Ipv4Addr::new(10, 0, 2, 16),
        Ipv4Addr::new(10, 0, 2, 4),
    )
    .unwrap();
    assert!(exchange(&mut b, &f).is_empty());
    assert_eq!(b.stats().ignored, 1);
}

#[test]
fn eventfd_is_readable_exactly_while_frames_are_queued() {
    let mut b = UserBackend::new().unwrap();
    assert!(!readable(b.poll_fd(), 0));
    let arp = build_arp_request(GUEST_MAC, GUEST_IP, GATEWAY_IP);
    b.send(&arp).unwrap();
    b.send(&arp).unwrap();
    assert!(readable(b.poll_fd(), 0));
    let mut buf = [0u8; 1514];
    assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
    assert!(readable(b.poll_fd(), 0), "one frame still queued");
    assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
    assert!(!readable(b.poll_fd(), 0));
    assert_eq!(b.recv(&mut buf).unwrap(), None);
}

#[test]
fn held_notifications_keep_the_fd_quiet_until_released_with_frames_left() {
    let mut b = UserBackend::new().unwrap();
    let arp = build_arp_request(GUEST_MAC, GUEST_IP, GATEWAY_IP);
    let mut buf = [0u8; 1514];
    // Held: the answer is queued but the fd stays quiet; the caller receives it.
    b.hold_notifications(true);
    b.send(&arp).unwrap();
    assert!(!readable(b.poll_fd(), 0), "a held answer woke the fd");
    assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
    b.hold_notifications(false);
    assert!(
        !readable(b.poll_fd(), 0),
        "nothing is left, nothing to signal"
    );
    // Held with two answers, one taken: releasing signals the one left.
    b.hold_notifications(true);
    b.send(&arp).unwrap();
    b.send(&arp).unwrap();
    assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
    assert!(!readable(b.poll_fd(), 0));
    b.hold_notifications(false);
    assert!(readable(b.poll_fd(), 0), "the frame left was not signalled");
    assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
    assert!(!readable(b.poll_fd(), 0));
    // Not held: every answer signals, as before.
    b.send(&arp).unwrap();
    assert!(readable(b.poll_fd(), 0));
    // A wrapper forwards the hold.
    let mut p = nestio_net::PcapBackend::create(
        Box::new(UserBackend::new().unwrap()),
        &std::env::temp_dir().join(format!("nestio-hold-{}.pcap", std::process::id())),
    )
    .unwrap();
    p.hold_notifications(true);
    p.send(&arp).unwrap();
    assert!(
        !readable(p.poll_fd(), 0),
        "the pcap wrapper dropped the hold"
    );
    p.hold_notifications(false);
    assert!(readable(p.poll_fd(), 0));
    let _ = std::fs::remove_file(
        std::env::temp_dir().join(format!("nestio-hold-{}.pcap", std::process::id())),
    );
}

#[test]
fn frame_larger_than_buffer_is_dropped_with_error() {
    let mut b = UserBackend::new().unwrap();
    b.send(&build_arp_request(GUEST_MAC, GUEST_IP, GATEWAY_IP))
        .unwrap();
    let mut small = [0u8; 59];
    match b.recv(&mut small) {
        Err(NetError::FrameTooLarge { len: 60, buf: 59 }) => {}
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    assert_eq!(
        b.recv(&mut [0u8; 100]).unwrap(),
        None,
        "oversized frame was dropped"
    );
    assert!(!readable(b.poll_fd(), 0));
}

#[test]
fn reply_queue_is_bounded() {
    let mut b = UserBackend::new().unwrap();
    let arp = build_arp_request(GUEST_MAC, GUEST_IP, GATEWAY_IP);
    for _ in 0..MAX_QUEUED_FRAMES + 44 {
        b.send(&arp).unwrap();
    }
    assert_eq!(b.pending(), MAX_QUEUED_FRAMES);
    assert_eq!(b.stats().queue_overflow, 44);
}

#[test]
fn other_ethertypes_multicast_and_runts_are_counted_and_dropped() {
    let mut b = UserBackend::new().unwrap();
    // IPv6 to a multicast MAC (what a guest sends at link-up).
    let mut v6 = vec![0x33, 0x33, 0, 0, 0, 0x16];
    v6.extend_from_slice(&GUEST_MAC.0);
    v6.extend_from_slice(&[0x86, 0xdd]);
    v6.resize(90, 0);
    assert!(exchange(&mut b, &v6).is_empty());
    // IPv6 broadcast-addressed: an unsupported EtherType.
    v6[..6].copy_from_slice(&[0xff; 6]);
    assert!(exchange(&mut b, &v6).is_empty());
    assert!(exchange(&mut b, &[0u8; 13]).is_empty());
    assert!(exchange(&mut b, &[]).is_empty());
    let s = b.stats();
    assert_eq!(s.unsupported, 2);
    assert_eq!(s.malformed, 2);
    stats_balance(&s);
}

fn sample_frames() -> Vec<Vec<u8>> {
    vec![
        build_arp_request(GUEST_MAC, GUEST_IP, GATEWAY_IP),
        build_icmp_echo_request(
            GUEST_MAC,
            GATEWAY_MAC,
            GUEST_IP,
            GATEWAY_IP,
            1,
            2,
            &[0xab; 64],
        )
        .unwrap(),
        build_udp_frame(
            GUEST_MAC,
            GATEWAY_MAC,
            GUEST_IP,
            GATEWAY_IP,
            1234,
            7,
            b"echo me",
        )
        .unwrap(),
        build_dhcp_discover(GUEST_MAC, 5).unwrap(),
        build_dhcp_request(GUEST_MAC, 5, GUEST_IP, GATEWAY_IP).unwrap(),
    ]
}

/// Length a frame needs for its protocol data to be complete (beyond it is padding).
fn meaningful_len(f: &[u8]) -> usize {
    match be16(f, 12) {
        0x0806 => 14 + 28,
        _ => 14 + be16(f, 16) as usize,
    }
}

#[test]
fn every_truncation_of_every_layer_is_dropped_without_panic() {
    for f in sample_frames() {
        let need = meaningful_len(&f);
        for n in 0..f.len() {
            let mut b = UserBackend::new().unwrap();
            let r = exchange(&mut b, &f[..n]);
            if n < need {
                assert!(r.is_empty(), "truncated to {n} of {need}: no reply");
                assert_eq!(b.stats().malformed, 1, "counted as malformed at {n}");
            } else {
                assert_eq!(r.len(), 1, "only padding removed at {n}");
            }
        }
    }
}

#[test]
fn randomized_mutations_never_panic_and_replies_stay_well_formed() {
    let mut rng = Rng(0x6e65_7374_696f_0001);
    let bases = sample_frames();
    // A long-lived backend so DHCP state accumulates across mutations.
    let mut b = UserBackend::new().unwrap();
    let mut buf = vec![0u8; 70000];
    for _ in 0..20_000 {
        let mut f = bases[rng.below(bases.len())].clone();
        match rng.below(4) {
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(f.len());
                    f[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = rng.below(f.len());
                f[i] = rng.next() as u8;
                f.truncate(rng.below(f.len() + 1));
            }
            2 => {
                for _ in 0..rng.below(64) {
                    f.push(rng.next() as u8);
                }
                let i = rng.below(f.len());
                f[i] = rng.next() as u8;
            }
            _ => {
                // Random bytes in the upper-layer headers, keep Ethernet intact.
                let i = 14 + rng.below(f.len() - 14);
                f[i] = rng.next() as u8;
            }
        }
        b.send(&f).unwrap();
        while let Some(n) = b.recv(&mut buf).unwrap() {
            nestio_net::user::check_reply(&buf[..n]);
        }
        nestio_net::fuzz_user_backend(&f);
    }
    let s = b.stats();
    stats_balance(&s);
    assert!(s.malformed > 1000, "mutations were mostly caught: {s:?}");
    assert!(
        s.replies > 100,
        "some mutations (e.g. padding, payload) still answered: {s:?}"
    );
}

#[test]
fn fuzz_entry_point_handles_length_prefixed_sequences() {
    // DISCOVER then REQUEST as a length-prefixed sequence, then junk with a huge prefix.
    let mut data = Vec::new();
    for f in [
        build_dhcp_discover(GUEST_MAC, 9).unwrap(),
        build_dhcp_request(GUEST_MAC, 9, GUEST_IP, GATEWAY_IP).unwrap(),
    ] {
        data.extend_from_slice(&(f.len() as u16).to_be_bytes());
        data.extend_from_slice(&f);
    }
    data.extend_from_slice(&[0xff, 0xff, 1, 2, 3]);
    nestio_net::fuzz_user_backend(&data);
    nestio_net::fuzz_user_backend(&[]);
    nestio_net::fuzz_user_backend(&[0]);
}

#[test]
fn open_backend_parses_specs() {
    let b = open_backend("user", None).unwrap();
    assert_eq!(b.describe(), "user (10.0.2.0/24)");
    let mut n = open_backend("none", None).unwrap();
    assert_eq!(n.describe(), "none (no peer)");
    n.send(&[0u8; 60]).unwrap();
    assert_eq!(n.recv(&mut [0u8; 2048]).unwrap(), None);
    for bad in [
        "",
        "usr",
        "user=1",
        "none=1",
        "tap",
        "tap=",
        "tap=waytoolonginterfacename",
        "udp=1.2.3.4:5",
        "udp=a,b",
        "udp=127.0.0.1:0,127.0.0.1:0",
        "udp=127.0.0.1:0,[::1]:5",
        "udp=127.0.0.1:0,0.0.0.0:5",
    ] {
        let e = open_backend(bad, None)
            .err()
            .unwrap_or_else(|| panic!("{bad:?} accepted"));
        assert!(
            matches!(e, NetError::InvalidSpec { .. } | NetError::TapName { .. }),
            "{bad:?}: {e}"
        );
        assert!(!e.to_string().is_empty());
    }
    let u = open_backend("udp=127.0.0.1:0,127.0.0.1:9", None).unwrap();
    assert!(
        u.describe().starts_with("udp 127.0.0.1:"),
        "{}",
        u.describe()
    );
    assert!(u.describe().ends_with("-> 127.0.0.1:9"), "{}", u.describe());
}
