//! pcap capture of user-network traffic, checked by parsing the file and,
//! when available, by tshark's dissectors.

mod common;

use common::skip_or_fail;
use nestio_net::packet::arp::build_arp_request;
use nestio_net::packet::dhcp::build_dhcp_discover;
use nestio_net::packet::icmp::build_icmp_echo_request;
use nestio_net::packet::MacAddr;
use nestio_net::user::{GATEWAY_IP, GATEWAY_MAC};
use nestio_net::{open_backend, NetError};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp(name: &str) -> TempFile {
    TempFile(std::env::temp_dir().join(format!("nestio-net-{}-{name}.pcap", std::process::id())))
}

/// Run ARP + ICMP + DHCP DISCOVER through a pcap-wrapped user backend;
/// returns the frames in wire order.
fn capture(path: &std::path::Path) -> Vec<Vec<u8>> {
    let mut b = open_backend("user", Some(path)).unwrap();
    assert!(
        b.describe().starts_with("user (10.0.2.0/24), pcap "),
        "{}",
        b.describe()
    );
    let mut frames = Vec::new();
    let mut buf = [0u8; 2048];
    for f in [
        build_arp_request(GUEST_MAC, GUEST_IP, GATEWAY_IP),
        build_icmp_echo_request(
            GUEST_MAC,
            GATEWAY_MAC,
            GUEST_IP,
            GATEWAY_IP,
            1,
            1,
            b"pcap test payload",
        )
        .unwrap(),
        build_dhcp_discover(GUEST_MAC, 0xabcd).unwrap(),
    ] {
        b.send(&f).unwrap();
        frames.push(f);
        let n = b.recv(&mut buf).unwrap().expect("reply");
        frames.push(buf[..n].to_vec());
    }
    frames
}

#[test]
fn pcap_file_holds_both_directions() {
    let t = temp("records");
    let frames = capture(&t.0);
    let data = std::fs::read(&t.0).unwrap();
    assert_eq!(&data[..4], &[0xd4, 0xc3, 0xb2, 0xa1], "pcap magic");
    assert_eq!(
        u32::from_le_bytes(data[20..24].try_into().unwrap()),
        1,
        "LINKTYPE_ETHERNET"
    );
    let mut off = 24;
    for f in &frames {
        let incl = u32::from_le_bytes(data[off + 8..off + 12].try_into().unwrap()) as usize;
        let orig = u32::from_le_bytes(data[off + 12..off + 16].try_into().unwrap()) as usize;
        let usec = u32::from_le_bytes(data[off + 4..off + 8].try_into().unwrap());
        assert!(usec < 1_000_000);
        assert_eq!((incl, orig), (f.len(), f.len()));
        assert_eq!(&data[off + 16..off + 16 + incl], &f[..]);
        off += 16 + incl;
    }
    assert_eq!(off, data.len(), "exactly one record per frame");
}

#[test]
fn tshark_decodes_arp_icmp_and_dhcp() {
    if Command::new("tshark")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        skip_or_fail("tshark not installed");
        return;
    }
    let t = temp("tshark");
    capture(&t.0);
    let out = Command::new("tshark")
        .args(["-r"])
        .arg(&t.0)
        .args([
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "frame.protocols",
            "-e",
            "ip.checksum.status",
            "-e",
            "icmp.checksum.status",
            "-e",
            "udp.checksum.status",
            "-e",
            "dhcp.option.dhcp",
            "-e",
            "dhcp.ip.your",
            "-e",
            "_ws.malformed",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(lines.len(), 6, "{text}");
    for l in &lines[0..2] {
        assert_eq!(l[0], "eth:ethertype:arp", "{text}");
    }
    for l in &lines[2..4] {
        assert!(l[0].starts_with("eth:ethertype:ip:icmp"), "{text}");
        assert_eq!(l[1], "1", "IP checksum good: {text}");
        assert_eq!(l[2], "1", "ICMP checksum good: {text}");
    }
    for l in &lines[4..6] {
        assert_eq!(l[0], "eth:ethertype:ip:udp:dhcp", "{text}");
        assert_eq!(l[1], "1", "IP checksum good: {text}");
        assert_eq!(l[3], "1", "UDP checksum good: {text}");
    }
    assert_eq!(lines[4][4], "1", "DISCOVER: {text}");
    assert_eq!(lines[5][4], "2", "OFFER: {text}");
    assert_eq!(lines[5][5], "10.0.2.15", "{text}");
    assert!(
        lines.iter().all(|l| l[6].is_empty()),
        "no malformed packets: {text}"
    );
}

#[test]
fn pcap_create_error_names_the_path() {
    let e = open_backend(
        "user",
        Some(std::path::Path::new("/nonexistent-dir/x.pcap")),
    )
    .err()
    .unwrap();
    assert!(matches!(e, NetError::PcapCreate { .. }));
    assert!(e.to_string().contains("/nonexistent-dir/x.pcap"), "{e}");
}
