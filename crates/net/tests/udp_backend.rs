//! The UDP (dgram) backend: two backends wired back to back on 127.0.0.1.

mod common;

use common::{readable, recv_until};
use nestio_net::packet::arp::build_arp_request;
use nestio_net::packet::icmp::build_icmp_echo_request;
use nestio_net::packet::MacAddr;
use nestio_net::{NetBackend, NetError, UdpBackend};
use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

/// A hang bound only, generous for a loaded 2-core CI machine.
const WAIT: Duration = Duration::from_secs(60);

fn pair() -> (UdpBackend, UdpBackend) {
    let sa = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sb = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    (
        UdpBackend::from_socket(sa, ab).unwrap(),
        UdpBackend::from_socket(sb, aa).unwrap(),
    )
}

#[test]
fn frames_pass_both_ways() {
    let (mut a, mut b) = pair();
    assert_eq!(a.recv(&mut [0u8; 64]).unwrap(), None, "nothing pending yet");
    let m1 = MacAddr([2, 0, 0, 0, 0, 1]);
    let m2 = MacAddr([2, 0, 0, 0, 0, 2]);
    let arp = build_arp_request(m1, Ipv4Addr::new(10, 9, 0, 1), Ipv4Addr::new(10, 9, 0, 2));
    a.send(&arp).unwrap();
    assert_eq!(recv_until(&mut b, WAIT).expect("frame a->b"), arp);

    let ping = build_icmp_echo_request(
        m2,
        m1,
        Ipv4Addr::new(10, 9, 0, 2),
        Ipv4Addr::new(10, 9, 0, 1),
        3,
        4,
        &[0x5a; 1400],
    )
    .unwrap();
    b.send(&ping).unwrap();
    assert_eq!(recv_until(&mut a, WAIT).expect("frame b->a"), ping);

    // A jumbo frame keeps its size (one frame per datagram).
    let jumbo: Vec<u8> = (0..9018u32).map(|i| i as u8).collect();
    a.send(&jumbo).unwrap();
    assert_eq!(recv_until(&mut b, WAIT).expect("jumbo"), jumbo);
    assert!(a.describe().starts_with("udp 127.0.0.1:"));
}

#[test]
fn foreign_senders_and_runts_are_dropped() {
    let (mut a, mut b) = pair();
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger.send_to(&[0xee; 60], a.local_addr()).unwrap();
    b.send(&[1, 2, 3]).unwrap(); // shorter than an Ethernet header
    let good = [0x77u8; 64];
    b.send(&good).unwrap();
    assert_eq!(
        recv_until(&mut a, WAIT).expect("the good frame"),
        good.to_vec()
    );
    // Datagrams from two senders need not be queued in send order (loopback delivery
    // may run on another CPU): the stranger's may still be on its way. Take it; it
    // must be dropped too, and nothing else may arrive.
    let end = std::time::Instant::now() + WAIT;
    while a.dropped_foreign() + a.dropped_runt() < 2 && std::time::Instant::now() < end {
        readable(a.poll_fd(), 100);
        assert_eq!(
            a.recv(&mut [0u8; 1600]).unwrap(),
            None,
            "only one good frame"
        );
    }
    assert_eq!(a.dropped_foreign(), 1);
    assert_eq!(a.dropped_runt(), 1);
}

#[test]
fn oversized_frame_is_dropped_with_error() {
    let (mut a, mut b) = pair();
    a.send(&[0x11; 200]).unwrap();
    a.send(&[0x22; 60]).unwrap();
    // Taken in whatever order they were queued (the loopback may process two sends on
    // different CPUs under load): the big one is refused, the small one received.
    let (mut refused, mut frames) = (0, Vec::new());
    let end = std::time::Instant::now() + WAIT;
    while (refused == 0 || frames.is_empty()) && std::time::Instant::now() < end {
        readable(b.poll_fd(), 100);
        let mut buf = [0u8; 100];
        match b.recv(&mut buf) {
            Err(NetError::FrameTooLarge { len: 200, buf: 100 }) => refused += 1,
            Ok(Some(n)) => frames.push(buf[..n].to_vec()),
            Ok(None) => {}
            other => panic!("expected FrameTooLarge or the small frame, got {other:?}"),
        }
    }
    assert_eq!(refused, 1, "the oversized frame is refused once");
    assert_eq!(frames, vec![vec![0x22; 60]], "the next frame still arrives");
}

#[test]
fn bind_error_names_the_address() {
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let e = UdpBackend::new(addr, "127.0.0.1:9".parse().unwrap()).unwrap_err();
    assert!(matches!(e, NetError::UdpBind { .. }));
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}
