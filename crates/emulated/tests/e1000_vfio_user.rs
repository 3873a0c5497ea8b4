//! The e1000 served out of process: every test drives the device through a vfio-user
//! `Client` talking to a `Server` on a UNIX socket path, with a guest driver that only
//! uses the VFIO device API (memfd guest memory passed by DMA_MAP with its fd, irq
//! eventfds passed by SET_IRQS, registers by REGION_READ/WRITE messages).

mod common_e1000;

use std::net::{Ipv4Addr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common_e1000::driver::{
    guest_memory, reg, DmaVia, Driver, IrqMode, GATEWAY_IP, GUEST_IP, IOVA, MAPPED, NDESC, RX_RING,
};
use common_e1000::{guard, serve, serve_with, skip_or_fail, Served};
use nestio_device_model::{MigState, MigrationFlags, VfioDevice};
use nestio_emulated::e1000::{E1000Config, DEFAULT_MAC, E1000};
use nestio_net::packet::arp::{build_arp_request, ArpPacket, ARP_OP_REPLY, ARP_OP_REQUEST};
use nestio_net::packet::ethernet::{EthernetFrame, ETHERTYPE_ARP};
use nestio_net::packet::icmp::{build_icmp_echo_request, IcmpPacket, ICMP_ECHO_REPLY};
use nestio_net::packet::ipv4::{Ipv4Packet, PROTO_ICMP};
use nestio_net::packet::MacAddr;
use nestio_net::{NetBackend, TapBackend, UdpBackend};
use nestio_vfio_user::ClientConfig;

/// How long to wait for an interrupt or a reply: only a hang bound, generous for a
/// loaded 2-core CI machine.
const T: Duration = Duration::from_secs(60);

/// Serve a fresh e1000 on `backend` and bring up a driver on it: reset, EEPROM MAC
/// and checksum, rings.
fn bring_up(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> (Driver, Served) {
    bring_up_via(backend, mac, DmaVia::SharedFd, ClientConfig::default())
}

fn bring_up_via(
    backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    via: DmaVia,
    config: ClientConfig,
) -> (Driver, Served) {
    let mut cfg = E1000Config::new(backend);
    cfg.mac = mac;
    let dev = E1000::new(cfg).expect("create e1000");
    let served = serve_with(dev, config);
    let mut drv = Driver::new_via(
        served.client.clone(),
        guest_memory().unwrap(),
        IrqMode::Intx,
        via,
    )
    .expect("driver attaches over vfio-user");
    drv.reset().expect("CTRL.RST");
    assert_eq!(drv.probe().expect("EEPROM checksum"), mac);
    drv.setup().expect("rings");
    assert_ne!(drv.rd(reg::STATUS).unwrap() & reg::STATUS_LU, 0, "link up");
    (drv, served)
}

/// The exchange with the user network's gateway: ARP, then an ICMP echo.
fn user_exchange(backend: Box<dyn NetBackend>) {
    user_exchange_via(backend, DmaVia::SharedFd, ClientConfig::default());
}

/// Device state for a failure message.
fn diagnose(drv: &Driver) -> String {
    let r = |off| {
        drv.rd(off)
            .map(|v| format!("{v:#x}"))
            .unwrap_or_else(|e| e.to_string())
    };
    format!(
        "TDH {} TDT {} RDH {} RDT {} RCTL {} MPC {} GPTC {} GPRC {} ICR {} PCI status {:?}, \
         TX0 status {:?}, RX0 {:?}",
        r(reg::TDH),
        r(reg::TDT),
        r(reg::RDH),
        r(reg::RDT),
        r(reg::RCTL),
        r(reg::MPC),
        r(reg::GPTC),
        r(reg::GPRC),
        r(reg::ICR),
        drv.cfg_read16(6),
        drv.tx_status(0),
        drv.mem_read(RX_RING, 16),
    )
}

/// Wait for one interrupt; on timeout fail with the device state.
fn irq(drv: &mut Driver, what: &str) -> u32 {
    match drv.wait_irq(T) {
        Ok(icr) => icr,
        Err(e) => panic!("no interrupt for {what} ({e}); {}", diagnose(drv)),
    }
}

fn user_exchange_via(backend: Box<dyn NetBackend>, via: DmaVia, config: ClientConfig) {
    let twin = config.twin_socket;
    let (mut drv, served) = bring_up_via(backend, DEFAULT_MAC, via, config);
    assert_eq!(
        served.client.twin_socket(),
        twin,
        "twin socket as configured"
    );
    // Identity as the client sees it.
    let c = &served.client;
    assert_eq!(
        (drv.cfg_read16(0).unwrap(), drv.cfg_read16(2).unwrap()),
        (0x8086, 0x100E)
    );
    assert_eq!(
        c.info().num_regions,
        nestio_device_model::pci_index::NUM_REGIONS
    );
    assert_eq!(c.region_info(0).unwrap().size, 128 * 1024);
    assert_eq!(c.region_info(1).unwrap().size, 64);
    assert_eq!(
        c.irq_info(nestio_device_model::pci_index::INTX_IRQ)
            .unwrap()
            .count,
        1
    );
    let me = MacAddr(DEFAULT_MAC);
    // ARP: the reply arrives by RX DMA and is signalled on the INTx eventfd.
    drv.send(&build_arp_request(me, GUEST_IP, GATEWAY_IP))
        .unwrap();
    let icr = irq(&mut drv, "the ARP reply");
    assert_ne!(icr & reg::ICR_RXT0, 0, "RX cause in ICR");
    let f = drv.poll_rx().unwrap().expect("ARP reply in the RX ring");
    let e = EthernetFrame::parse(&f).unwrap();
    assert_eq!(e.ethertype, ETHERTYPE_ARP);
    assert_eq!(e.dst, me);
    let a = ArpPacket::parse(e.payload).unwrap();
    assert_eq!(a.op, ARP_OP_REPLY);
    assert_eq!(a.sender_ip, GATEWAY_IP);
    assert_eq!(a.target_mac, me);
    let gw = a.sender_mac;
    assert_eq!(gw, nestio_net::user::GATEWAY_MAC);
    // ICMP echo: same path.
    let payload = b"nestio e1000 over vfio-user";
    let req = build_icmp_echo_request(me, gw, GUEST_IP, GATEWAY_IP, 0x77, 1, payload).unwrap();
    drv.send(&req).unwrap();
    let icr = irq(&mut drv, "the echo reply");
    assert_ne!(icr & reg::ICR_RXT0, 0, "RX cause in ICR");
    let reply = drv.poll_rx().unwrap().expect("echo reply in the RX ring");
    let e = EthernetFrame::parse(&reply).unwrap();
    assert_eq!(e.dst, me);
    let p = Ipv4Packet::parse(e.payload).unwrap();
    assert_eq!(
        (p.protocol, p.src, p.dst),
        (PROTO_ICMP, GATEWAY_IP, GUEST_IP)
    );
    let i = IcmpPacket::parse(p.payload).unwrap();
    assert_eq!((i.icmp_type, i.id, i.seq), (ICMP_ECHO_REPLY, 0x77, 1));
    assert_eq!(i.payload, &payload[..]);
    assert_eq!(&reply[6..12], &gw.0, "reply comes from the gateway");
    // Both transmits were written back, both replies counted.
    assert_ne!(drv.tx_status(0).unwrap() & reg::TXD_STA_DD, 0);
    assert_ne!(drv.tx_status(1).unwrap() & reg::TXD_STA_DD, 0);
    assert_eq!(drv.rd(reg::TDH).unwrap(), 2);
    assert_eq!(drv.rd(reg::GPTC).unwrap(), 2);
    assert_eq!(drv.rd(reg::GPRC).unwrap(), 2);
    assert_eq!(drv.interrupts, 2, "one INTx per reply");
    assert!(drv.outside_untouched().unwrap());
    drop(drv);
    let stats = served.finish();
    assert_eq!(stats.error_replies, 0, "no request was refused");
}

#[test]
fn e1000_vfio_user_arp_and_ping_user_gateway() {
    let _g = guard("e1000_vfio_user_arp_and_ping_user_gateway");
    user_exchange(nestio_net::open_backend("user", None).unwrap());
}

/// The same exchange with no shared memory: the device reaches every ring and buffer
/// by DMA_READ / DMA_WRITE messages to the client, here over the twin socket.
#[test]
fn e1000_vfio_user_message_dma_twin_socket() {
    let _g = guard("e1000_vfio_user_message_dma_twin_socket");
    user_exchange_via(
        nestio_net::open_backend("user", None).unwrap(),
        DmaVia::Messages,
        ClientConfig::default(),
    );
}

/// Message DMA without a twin socket. The device's RX worker sends DMA_WRITE on the
/// main socket while the client is idle (waiting for the interrupt): the client's
/// reader thread (started when memory is mapped by message) must serve it, or the
/// interrupt never comes and the server's DMA timeout closes the session.
#[test]
fn e1000_vfio_user_message_dma_main_socket_idle_client() {
    let _g = guard("e1000_vfio_user_message_dma_main_socket_idle_client");
    user_exchange_via(
        nestio_net::open_backend("user", None).unwrap(),
        DmaVia::Messages,
        ClientConfig {
            twin_socket: false,
            ..ClientConfig::default()
        },
    );
}

use nestio_net::netns::{ip, Netns};

#[test]
fn e1000_vfio_user_tap_kernel_answers_in_netns() {
    let _g = guard("e1000_vfio_user_tap_kernel_answers_in_netns");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("the tap test needs root");
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        skip_or_fail("/dev/net/tun missing");
        return;
    }
    let pid = std::process::id();
    let ns = format!("nestio-e1k-{pid}");
    // A namespace of this name can only be left over from an earlier process with our
    // pid that died without cleaning up (e.g. a deadlock guard's abort): remove it.
    let _ = ip(&["netns", "del", &ns]);
    if let Err(e) = ip(&["netns", "add", &ns]) {
        skip_or_fail(&format!("cannot create a network namespace: {e}"));
        return;
    }
    let _ns = Netns(ns.clone());
    let ifname = format!("e1k{}", pid % 1_000_000_000);
    let tap = TapBackend::open(&ifname).expect("create tap");
    let (mut drv, served) = bring_up(Box::new(tap), DEFAULT_MAC);
    ip(&["link", "set", &ifname, "netns", &ns]).unwrap();
    ip(&["-n", &ns, "addr", "add", "10.0.4.1/24", "dev", &ifname]).unwrap();
    ip(&["-n", &ns, "link", "set", &ifname, "up"]).unwrap();
    let me = Ipv4Addr::new(10, 0, 4, 2);
    let kernel = Ipv4Addr::new(10, 0, 4, 1);
    let kmac = drv.arp(me, kernel, T).expect("the kernel answers ARP");
    assert_ne!(kmac, MacAddr(DEFAULT_MAC));
    let payload: Vec<u8> = (0..100u8).collect();
    drv.ping(me, kmac, kernel, 0xbeef, 1, &payload, T)
        .expect("the kernel answers the ping");
    assert!(drv.outside_untouched().unwrap());
    drop(drv);
    served.finish();
}

#[test]
fn e1000_vfio_user_two_devices_over_udp() {
    let _g = guard("e1000_vfio_user_two_devices_over_udp");
    let sa = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sb = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (aa, ab) = (sa.local_addr().unwrap(), sb.local_addr().unwrap());
    let mac_a = DEFAULT_MAC;
    let mac_b = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 0, 5, 1), Ipv4Addr::new(10, 0, 5, 2));
    let (mut a, served_a) = bring_up(Box::new(UdpBackend::from_socket(sa, ab).unwrap()), mac_a);
    let (mut b, served_b) = bring_up(Box::new(UdpBackend::from_socket(sb, aa).unwrap()), mac_b);

    // Broadcast from A arrives in B's RX ring; B's unicast reply arrives at A.
    let arp = |from: &mut Driver, to: &mut Driver, from_ip, to_ip| {
        let (fm, tm) = (MacAddr(from.mac), MacAddr(to.mac));
        from.send(&build_arp_request(fm, from_ip, to_ip)).unwrap();
        let req = to
            .recv_until(to_ip, T, "the peer's broadcast ARP request", |f| {
                let e = EthernetFrame::parse(f).ok()?;
                let a = ArpPacket::parse(e.payload).ok()?;
                (e.ethertype == ETHERTYPE_ARP
                    && e.dst == MacAddr::BROADCAST
                    && e.src == fm
                    && a.op == ARP_OP_REQUEST
                    && a.sender_ip == from_ip)
                    .then(|| f.to_vec())
            })
            .unwrap();
        assert!(to.answer_arp(&req, to_ip).unwrap(), "request is for us");
        from.recv_until(from_ip, T, "the peer's ARP reply", |f| {
            let e = EthernetFrame::parse(f).ok()?;
            let a = ArpPacket::parse(e.payload).ok()?;
            (e.dst == fm && e.src == tm && a.op == ARP_OP_REPLY && a.sender_ip == to_ip)
                .then_some(())
        })
        .unwrap();
    };
    arp(&mut a, &mut b, ip_a, ip_b);
    arp(&mut b, &mut a, ip_b, ip_a);
    for d in [&a, &b] {
        assert_eq!(d.rd(reg::GPTC).unwrap(), 2);
        assert_eq!(d.rd(reg::GPRC).unwrap(), 2);
    }
    drop((a, b));
    served_a.finish();
    served_b.finish();
}

#[test]
fn e1000_vfio_user_pcap_decodes_with_tshark() {
    let _g = guard("e1000_vfio_user_pcap_decodes_with_tshark");
    if Command::new("tshark").arg("--version").output().is_err() {
        skip_or_fail("tshark is not installed");
        return;
    }
    let path = std::env::temp_dir().join(format!("nestio-e1k-{}.pcap", std::process::id()));
    user_exchange(nestio_net::open_backend("user", Some(&path)).unwrap());
    let out = Command::new("tshark")
        .arg("-r")
        .arg(&path)
        .args(["-T", "fields", "-E", "separator=;"])
        .args(["-e", "frame.protocols", "-e", "eth.src", "-e", "eth.dst"])
        .args(["-e", "arp.opcode", "-e", "icmp.type"])
        .output()
        .expect("run tshark");
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split(';').collect()).collect();
    assert_eq!(rows.len(), 4, "four frames captured: {text}");
    let ours = "52:54:00:12:34:56";
    let has = |proto: &str, from_us: bool, field: usize, value: &str| {
        rows.iter().any(|r| {
            r.len() == 5
                && r[0].split(':').any(|p| p == proto)
                && (if from_us { r[1] } else { r[2] }) == ours
                && r[field] == value
        })
    };
    assert!(has("arp", true, 3, "1"), "ARP request from us: {text}");
    assert!(has("arp", false, 3, "2"), "ARP reply to us: {text}");
    assert!(has("icmp", true, 4, "8"), "echo request from us: {text}");
    assert!(has("icmp", false, 4, "0"), "echo reply to us: {text}");
}

#[test]
fn e1000_vfio_user_hostile_descriptor_stops_queue() {
    let _g = guard("e1000_vfio_user_hostile_descriptor_stops_queue");
    let (mut drv, served) = bring_up(nestio_net::open_backend("user", None).unwrap(), DEFAULT_MAC);
    // A TX buffer straddling the end of the mapping (the memfd continues there).
    drv.tx_desc_raw(0, IOVA + MAPPED - 16, 64, reg::TXD_EOP | reg::TXD_RS)
        .unwrap();
    drv.wr(reg::TDT, 1).unwrap();
    assert_eq!(drv.tx_status(0).unwrap(), 0, "no write-back when faulted");
    assert_ne!(
        drv.cfg_read16(6).unwrap() & (1 << 13),
        0,
        "master abort recorded in the PCI status"
    );
    // The queue is stopped: a good frame behind it is not sent.
    drv.next_tx = 1;
    drv.send(&build_arp_request(
        MacAddr(DEFAULT_MAC),
        GUEST_IP,
        GATEWAY_IP,
    ))
    .unwrap();
    assert_eq!(drv.rd(reg::GPTC).unwrap(), 0, "halted queue sends nothing");
    // Registers are still served through the socket.
    assert_ne!(drv.rd(reg::STATUS).unwrap() & reg::STATUS_LU, 0);
    assert_eq!(
        drv.eeprom_read(0).unwrap(),
        u16::from_le_bytes([0x52, 0x54])
    );
    assert!(drv.outside_untouched().unwrap());

    // The driver's reset path brings the queue back.
    drv.setup().unwrap();
    let gw = drv
        .arp(GUEST_IP, GATEWAY_IP, T)
        .expect("works after re-init");

    // An RX buffer pointing past the mapping: the reply is not written anywhere and
    // the receive queue stops (counted as missed).
    let idx = drv.next_rx;
    drv.mem_write(
        RX_RING + u64::from(idx) * 16,
        &(IOVA + MAPPED - 8).to_le_bytes(),
    )
    .unwrap();
    drv.rd(reg::GPTC).unwrap(); // clear on read
    let me = MacAddr(DEFAULT_MAC);
    let req = build_icmp_echo_request(me, gw, GUEST_IP, GATEWAY_IP, 9, 9, b"x").unwrap();
    drv.send(&req).unwrap();
    assert_eq!(drv.rd(reg::GPTC).unwrap(), 1, "the request went out");
    let mut missed = 0;
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        missed += drv.rd(reg::MPC).unwrap();
        if missed > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(missed, 1, "the reply was dropped as missed");
    let d = drv.mem_read(RX_RING + u64::from(idx) * 16, 16).unwrap();
    assert_eq!(d[12] & reg::RXD_STA_DD, 0, "no write-back");
    assert!(drv.outside_untouched().unwrap(), "outside memory untouched");
    assert_ne!(drv.rd(reg::STATUS).unwrap() & reg::STATUS_LU, 0);
    drop(drv);
    served.finish();
}

/// Registers compared across migration.
const MIG_REGS: [u32; 14] = [
    reg::RDBAL,
    reg::RDBAH,
    reg::RDLEN,
    reg::RDH,
    reg::RDT,
    reg::TDBAL,
    reg::TDLEN,
    reg::TDH,
    reg::TDT,
    reg::RAL0,
    reg::RAH0,
    reg::IMS,
    reg::RCTL,
    reg::TCTL,
];

#[test]
fn e1000_vfio_user_migration_stop_copy_resume_ping() {
    let _g = guard("e1000_vfio_user_migration_stop_copy_resume_ping");
    let (mut a, served_a) = bring_up(nestio_net::open_backend("user", None).unwrap(), DEFAULT_MAC);
    let gw = a.arp(GUEST_IP, GATEWAY_IP, T).unwrap();
    a.ping(GUEST_IP, gw, GATEWAY_IP, 1, 1, b"before", T)
        .unwrap();
    // Quiesce the interrupt: no cause pending, INTx unmasked.
    a.rd(reg::ICR).unwrap();
    a.dev
        .set_irqs(
            nestio_device_model::pci_index::INTX_IRQ,
            nestio_device_model::IrqAction::Unmask,
            0,
            1,
            nestio_device_model::IrqData::None,
        )
        .unwrap();
    a.wr(0x00C4, 0x55).unwrap(); // ITR
    let flags = served_a
        .client
        .migration_flags()
        .expect("migration offered");
    assert_ne!(flags.0 & MigrationFlags::STOP_COPY, 0);
    let mut regs: Vec<u32> = MIG_REGS.iter().map(|&r| a.rd(r).unwrap()).collect();
    regs.push(a.rd(0x00C4).unwrap());
    assert_eq!(regs[0] as u64, RX_RING);
    assert_eq!(regs[2], NDESC * 16);

    // Source: DEVICE_FEATURE MIG_DEVICE_STATE = STOP_COPY, MIG_DATA_READ until short.
    let ca = served_a.client.clone();
    assert_eq!(
        ca.mig_set_state(MigState::StopCopy).unwrap(),
        MigState::StopCopy
    );
    assert_eq!(ca.mig_state().unwrap(), MigState::StopCopy);
    let mut stream = Vec::new();
    let mut chunk = vec![0u8; 512];
    loop {
        let n = ca.mig_data_read(&mut chunk).unwrap();
        stream.extend_from_slice(&chunk[..n]);
        if n < chunk.len() {
            break;
        }
    }
    assert!(stream.len() > 512, "state spans several reads");

    // Destination: a second served e1000 sharing the guest memory (as after RAM copy).
    let dev_b = E1000::new(E1000Config::new(
        nestio_net::open_backend("user", None).unwrap(),
    ))
    .unwrap();
    let served_b = serve(dev_b);
    let cb = served_b.client.clone();
    let mut b = Driver::attach(cb.clone(), a.mem.clone(), IrqMode::Intx).unwrap();
    assert_eq!(
        cb.mig_set_state(MigState::Resuming).unwrap(),
        MigState::Resuming
    );
    for c in stream.chunks(700) {
        cb.mig_data_write(c).unwrap();
    }
    assert_eq!(
        cb.mig_set_state(MigState::Running).unwrap(),
        MigState::Running
    );
    let mut after: Vec<u32> = MIG_REGS.iter().map(|&r| b.rd(r).unwrap()).collect();
    after.push(b.rd(0x00C4).unwrap());
    assert_eq!(after, regs, "registers equal after resume");
    assert_eq!(b.cfg_read16(4).unwrap() & 0x6, 0x6, "memory + bus master");

    // The resumed device carries on where the source stopped.
    b.adopt_rings(&a);
    drop(ca);
    drop(a);
    let req = build_icmp_echo_request(
        MacAddr(DEFAULT_MAC),
        gw,
        GUEST_IP,
        GATEWAY_IP,
        2,
        2,
        b"after migration",
    )
    .unwrap();
    b.send(&req).unwrap();
    let icr = b.wait_irq(T).expect("the resumed device interrupts");
    assert_ne!(icr & reg::ICR_RXT0, 0);
    let f = b.poll_rx().unwrap().expect("echo reply after resume");
    let e = EthernetFrame::parse(&f).unwrap();
    let p = Ipv4Packet::parse(e.payload).unwrap();
    let i = IcmpPacket::parse(p.payload).unwrap();
    assert_eq!((i.icmp_type, i.seq), (ICMP_ECHO_REPLY, 2));
    assert_eq!(i.payload, b"after migration");
    assert!(b.outside_untouched().unwrap());
    drop(b);
    drop(cb);
    served_a.finish();
    served_b.finish();
}
