//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Skip (return true) with a loud message unless CI=true, where a missing
/// prerequisite is a failure.
pub fn skip_or_fail(reason: &str) -> bool {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("prerequisite missing under CI=true: {reason}");
    }
    eprintln!("SKIP: {reason}");
    true
}

/// poll() the fd for POLLIN with the given timeout in ms.
pub fn readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r == 1 && p.revents & libc::POLLIN != 0
}

/// Receive a frame from `b`, waiting on its poll fd until `deadline`.
pub fn recv_until(b: &mut dyn nestio_net::NetBackend, deadline: Duration) -> Option<Vec<u8>> {
    let end = Instant::now() + deadline;
    let mut buf = vec![0u8; 65536];
    loop {
        if let Some(n) = b.recv(&mut buf).expect("recv") {
            return Some(buf[..n].to_vec());
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        readable(b.poll_fd(), left.as_millis().min(1000) as i32);
    }
}

/// RFC 1071 checksum written independently of the crate (u32 accumulator,
/// carries folded after every word).
pub fn ref_checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let hi = bytes[i] as u32;
        let lo = if i + 1 < bytes.len() {
            bytes[i + 1] as u32
        } else {
            0
        };
        sum += (hi << 8) | lo;
        sum = (sum & 0xffff) + (sum >> 16);
        i += 2;
    }
    !(sum as u16)
}

/// Deterministic xorshift64* generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
