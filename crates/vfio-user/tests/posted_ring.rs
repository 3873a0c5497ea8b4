//! nestio's posted-write ring (`nestio_vfio_user::posted_ring`) between nestio's client
//! and server: negotiated only when both sides have it, every posted write executed
//! before any later socket request (a read sees them all), a sleeping server woken by
//! the kick alone, a corrupted ring ending only its session, and a finished session
//! reported to the writer.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::{recv, send, Harness};
use nestio_device_model::VfioDevice;
use nestio_vfio_user::posted_ring::RingConfig;
use nestio_vfio_user::proto::{Capabilities, Command, PostedRingCap, Version};
use nestio_vfio_user::testdev::RAM_SIZE;
use nestio_vfio_user::{ClientConfig, ServerConfig};

fn read_u32(dev: &dyn VfioDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.region_read(0, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn posted_writes_in_the_ring_are_executed_before_a_later_read() {
    let h = Harness::new(ServerConfig::default());
    let (c, _t) = h.client(ClientConfig::default());
    assert!(
        c.posted_ring().is_some(),
        "nestio's peers negotiate the ring"
    );
    // N values, more than the ring holds (the overflow goes synchronously), then read
    // every one back over the socket.
    let n = 3000u32;
    for i in 0..n {
        let off = u64::from(i) * 4 % RAM_SIZE as u64;
        c.region_write_posted(0, off, &i.wrapping_mul(0x9e37_79b9).to_le_bytes())
            .unwrap();
    }
    for i in (n - (RAM_SIZE as u32 / 4).min(n))..n {
        let off = u64::from(i) * 4 % RAM_SIZE as u64;
        assert_eq!(
            read_u32(&c, off),
            i.wrapping_mul(0x9e37_79b9),
            "offset {off:#x}"
        );
    }
    // Interleaved: each read sees the write just before it; widths 1, 2, 8 too.
    for i in 0..300u32 {
        let v = u64::from(i) << 32 | u64::from(i ^ 0xa5a5);
        c.region_write_posted(0, 64, &v.to_le_bytes()).unwrap();
        c.region_write_posted(0, 72, &[i as u8]).unwrap();
        c.region_write_posted(0, 74, &(i as u16).to_le_bytes())
            .unwrap();
        let mut b = [0u8; 12];
        c.region_read(0, 64, &mut b).unwrap();
        assert_eq!(&b[..8], &v.to_le_bytes());
        assert_eq!(b[8], i as u8);
        assert_eq!(&b[10..12], &(i as u16).to_le_bytes());
    }
    // A write larger than an entry goes synchronously, after the ring entries before
    // it, and before the ones after it.
    c.region_write_posted(0, 256, &[1; 4]).unwrap();
    c.region_write_posted(0, 256, &[2; 16]).unwrap();
    c.region_write_posted(0, 260, &[3; 4]).unwrap();
    let mut b = [0u8; 16];
    c.region_read(0, 256, &mut b).unwrap();
    assert_eq!(b, [2, 2, 2, 2, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2]);
    let (pushed, kicks) = c.posted_ring().unwrap().stats();
    assert!(pushed >= 300 * 3, "the small writes went through the ring");
    assert!(kicks <= pushed);
    assert_eq!(c.posted_ring().unwrap().errors(), 0);
}

/// The kick alone wakes a sleeping server: with no socket message after it, the write
/// reaches the device.
#[test]
fn a_sleeping_server_is_woken_by_the_kick() {
    let h = Harness::new(ServerConfig {
        posted_ring: Some(RingConfig {
            poll: Duration::ZERO,
            ..RingConfig::default()
        }),
        ..ServerConfig::default()
    });
    let (c, _t) = h.client(ClientConfig::default());
    for i in 1..=5u32 {
        // Let the ring thread go to sleep.
        std::thread::sleep(Duration::from_millis(20));
        c.region_write_posted(0, 8, &i.to_le_bytes()).unwrap();
        let t0 = Instant::now();
        while read_u32(&*h.dev, 8) != i {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "write {i} never reached the device"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let (_, kicks) = c.posted_ring().unwrap().stats();
    assert!(kicks >= 1, "a sleeping server needs a kick");
}

/// A peer without the capability on either side: posted writes go over the socket.
#[test]
fn without_the_capability_writes_are_posted_over_the_socket() {
    for (server_ring, client_ring) in [(None, true), (Some(RingConfig::default()), false)] {
        let h = Harness::new(ServerConfig {
            posted_ring: server_ring,
            ..ServerConfig::default()
        });
        let (c, _t) = h.client(ClientConfig {
            posted_ring: client_ring,
            ..ClientConfig::default()
        });
        assert!(c.posted_ring().is_none());
        assert!(c.version().caps.nestio_posted_ring.is_none());
        for i in 0..100u32 {
            c.region_write_posted(0, 16, &i.to_le_bytes()).unwrap();
        }
        assert_eq!(read_u32(&c, 16), 99);
    }
}

/// A client that scribbles a producer index far past the ring ends its own session;
/// the server serves the next one.
#[test]
fn a_corrupted_ring_ends_only_its_session() {
    let h = Harness::new(ServerConfig::default());
    let (sock, t) = h.session();
    let v = Version {
        major: 0,
        minor: 2,
        caps: Capabilities {
            nestio_posted_ring: Some(PostedRingCap {
                supported: true,
                ..PostedRingCap::default()
            }),
            // The reply carries the ring's two fds: a client takes them (spec,
            // max_msg_fds: "if not specified then the receiver must assume 1").
            max_msg_fds: 2,
            ..Capabilities::default()
        },
    };
    let mut p = Vec::new();
    v.encode_into(&mut p);
    send(&sock, 1, Command::Version as u16, &p, &[]);
    let m = recv(&sock).unwrap();
    assert!(!m.header.is_error());
    let r = Version::decode(&m.payload).unwrap();
    let cap = r
        .caps
        .nestio_posted_ring
        .expect("the server answers the ring");
    let memfd = &m.fds[cap.fd_index.unwrap() as usize];
    // The producer index (offset 0) far ahead of anything the ring holds.
    let bad = 100_000u32.to_ne_bytes();
    // SAFETY: pwrite of 4 bytes from a live buffer into the ring memfd.
    let w = unsafe { libc::pwrite(memfd.as_raw_fd(), bad.as_ptr().cast(), 4, 0) };
    assert_eq!(w, 4);
    // Any request now finds the corruption first.
    send(&sock, 2, Command::DeviceReset as u16, &[], &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match nestio_vfio_user::socket::recv_message(&sock, 1 << 20) {
            Ok(None) | Err(_) => break,
            Ok(Some(m)) => assert!(
                m.header.msg_id != 2 || Instant::now() < deadline,
                "the session went on"
            ),
        }
    }
    assert!(
        t.join().unwrap().is_err(),
        "the session ended with an error"
    );
    let (c, _t) = h.client(ClientConfig::default());
    c.region_write_posted(0, 0, &7u32.to_le_bytes()).unwrap();
    assert_eq!(read_u32(&c, 0), 7);
}

/// When the server ends the session, the ring is marked closed and the next posted
/// write reports the device disconnected.
#[test]
fn an_ended_session_is_reported_to_the_writer() {
    let h = Harness::new(ServerConfig::default());
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let server_end = b.try_clone().unwrap();
    let s = h.server.clone();
    let t = std::thread::spawn(move || s.serve_stream(b));
    let c = nestio_vfio_user::Client::from_stream(a, ClientConfig::default()).unwrap();
    c.region_write_posted(0, 0, &1u32.to_le_bytes()).unwrap();
    server_end.shutdown(std::net::Shutdown::Both).unwrap();
    t.join().unwrap().unwrap();
    match c.region_write_posted(0, 0, &2u32.to_le_bytes()) {
        Err(nestio_device_model::DeviceError::Disconnected(_)) => {}
        other => panic!("a posted write after the session ended gave {other:?}"),
    }
}
