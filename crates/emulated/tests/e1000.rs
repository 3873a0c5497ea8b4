//! The e1000 driven through the VfioDevice trait the way a guest driver (behind a
//! VMM) would: guest memory is a memfd mapped with dma_map, rings and buffers live in
//! it, interrupts arrive on eventfds set with set_irqs (the guest: `e1000_guest`).

mod e1000_guest;

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nestio_device_model::migration::read_stream;
use nestio_device_model::{pci_index, IrqAction, IrqData, MigState, VfioDevice};
use nestio_dma::DmaRange;
use nestio_emulated::e1000::regs::*;
use nestio_emulated::e1000::{mta_hash, E1000Config, RxOutcome, DEFAULT_MAC, E1000};
use nestio_net::packet::arp::build_arp_request;
use nestio_net::packet::icmp::build_icmp_echo_request;
use nestio_net::{MacAddr, NetBackend, NetError};

use e1000_guest::{eventfd, take, wait_for, Guest, IOVA, RX_BUF, RX_RING, TX_BUF, TX_RING};

const MAPPED: u64 = 2 << 20;
const FILE_SIZE: u64 = 3 << 20;
const NDESC: u32 = 16;
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// Wait until `fd` is readable (up to 60 s: the bound only avoids hanging forever, and
/// is generous for a loaded CI machine).
fn wait(fd: &OwnedFd) -> bool {
    wait_for(fd, Duration::from_secs(60))
}

/// A backend recording sent frames; `push` makes a frame receivable.
#[derive(Clone)]
struct Capture {
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    inbox: Arc<Mutex<Vec<Vec<u8>>>>,
    fd: Arc<OwnedFd>,
    /// The result of every `recv` call in order (true: a frame was returned).
    recvs: Arc<Mutex<Vec<bool>>>,
}

impl Capture {
    fn new() -> Self {
        Capture {
            sent: Arc::default(),
            inbox: Arc::default(),
            fd: Arc::new(eventfd()),
            recvs: Arc::default(),
        }
    }
    /// The number of `recv` calls so far.
    fn recv_calls(&self) -> usize {
        self.recvs.lock().unwrap().len()
    }
    /// True once a `recv` call after the first `since` returned a frame and the
    /// backend was asked again afterwards. The RX worker handles a frame (delivers or
    /// queues it) between taking it and its next `recv`, so only that later call shows
    /// the frame is in the device (an empty inbox alone does not).
    fn frame_handled_since(&self, since: usize) -> bool {
        let log = self.recvs.lock().unwrap();
        let tail = log.get(since..).unwrap_or(&[]);
        tail.iter()
            .position(|&got| got)
            .is_some_and(|i| i + 1 < tail.len())
    }
    fn sent(&self) -> Vec<Vec<u8>> {
        self.sent.lock().unwrap().clone()
    }
    fn push(&self, f: Vec<u8>) {
        self.inbox.lock().unwrap().push(f);
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local u64.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }
}

impl NetBackend for Capture {
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        self.sent.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
        let mut q = self.inbox.lock().unwrap();
        self.recvs.lock().unwrap().push(!q.is_empty());
        if q.is_empty() {
            take(&self.fd);
            return Ok(None);
        }
        let f = q.remove(0);
        if q.is_empty() {
            take(&self.fd);
        }
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(Some(n))
    }
    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    fn describe(&self) -> String {
        "capture".into()
    }
}

fn memfd(size: u64) -> OwnedFd {
    nestio_dma::memfd::sealed_memfd(c"guest", size).unwrap()
}

impl Guest {
    fn new(backend: Box<dyn NetBackend>) -> Guest {
        Self::with_mem(backend, Arc::new(memfd(FILE_SIZE)))
    }

    fn with_mem(backend: Box<dyn NetBackend>, mem: Arc<OwnedFd>) -> Guest {
        Guest::on_memory(E1000Config::new(backend).with_msi(true), mem, MAPPED)
    }

    /// Bytes of the file that are not mapped for DMA must stay zero.
    fn assert_outside_untouched(&self) {
        let rest = self.mem_read_file(MAPPED, (FILE_SIZE - MAPPED) as usize);
        assert!(
            rest.iter().all(|&b| b == 0),
            "memory outside the mapping changed"
        );
    }

    fn eerd(&self, addr: u32) -> u16 {
        self.wr(EERD, EERD_START | (addr << 8));
        let v = self.rd(EERD);
        assert_ne!(v & EERD_DONE, 0, "EERD done");
        (v >> 16) as u16
    }

    fn reset(&self) {
        self.wr(CTRL, self.rd(CTRL) | CTRL_RST);
        assert_eq!(self.rd(CTRL) & CTRL_RST, 0, "RST self-clears");
    }

    fn setup_tx(&self) {
        self.wr(TCTL, 0);
        self.wr(TDBAL, (IOVA + TX_RING) as u32);
        self.wr(TDBAH, 0);
        self.wr(TDLEN, NDESC * 16);
        self.wr(TDH, 0);
        self.wr(TDT, 0);
        self.wr(TCTL, TCTL_EN | TCTL_PSP);
    }

    fn setup_rx(&self, bsize_code: u32, extra: u32) {
        for i in 0..u64::from(NDESC) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&(IOVA + RX_BUF + i * 0x800).to_le_bytes());
            self.mem_write(IOVA + RX_RING + i * 16, &d);
        }
        self.wr(RCTL, 0);
        self.wr(RDBAL, (IOVA + RX_RING) as u32);
        self.wr(RDBAH, 0);
        self.wr(RDLEN, NDESC * 16);
        self.wr(RDH, 0);
        self.wr(RDT, NDESC - 1);
        self.wr(
            RCTL,
            RCTL_EN | RCTL_BAM | RCTL_SECRC | (bsize_code << 16) | extra,
        );
    }

    /// Queue one frame in TX descriptor `idx` (single descriptor, EOP|RS|IFCS).
    fn tx_desc(&self, idx: u32, buf: u64, len: usize, cmd: u8) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&buf.to_le_bytes());
        d[8..10].copy_from_slice(&(len as u16).to_le_bytes());
        d[11] = cmd;
        self.mem_write(IOVA + TX_RING + u64::from(idx) * 16, &d);
    }

    fn send(&self, frame: &[u8]) {
        let t = self.rd(TDT);
        let buf = IOVA + TX_BUF + u64::from(t) * 0x800;
        self.mem_write(buf, frame);
        self.tx_desc(t, buf, frame.len(), TXD_CMD_EOP | TXD_CMD_RS | 0x02);
        self.wr(TDT, (t + 1) % NDESC);
    }

    fn tx_status(&self, idx: u32) -> u8 {
        self.mem_read(IOVA + TX_RING + u64::from(idx) * 16 + 12, 1)[0]
    }

    /// RX descriptor `idx`: (length, status).
    fn rx_desc(&self, idx: u32) -> (u16, u8) {
        let d = self.mem_read(IOVA + RX_RING + u64::from(idx) * 16, 16);
        (u16::from_le_bytes([d[8], d[9]]), d[12])
    }

    fn rx_frame(&self, idx: u32) -> Vec<u8> {
        let (len, st) = self.rx_desc(idx);
        assert_ne!(st & RXD_STA_DD, 0);
        self.mem_read(IOVA + RX_BUF + u64::from(idx) * 0x800, usize::from(len))
    }

    /// Hand descriptor `idx` back to the device (clear its status, advance RDT).
    fn rx_recycle(&self, idx: u32) {
        self.mem_write(IOVA + RX_RING + u64::from(idx) * 16 + 8, &[0u8; 8]);
        self.wr(RDT, idx);
    }

    fn msi_cap(&self) -> u64 {
        let mut p = u64::from(self.cfg_read8(0x34));
        while p != 0 {
            if self.cfg_read8(p) == 0x05 {
                return p;
            }
            p = u64::from(self.cfg_read8(p + 1));
        }
        panic!("no MSI capability");
    }
}

fn frame_to(dst: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
    f[12] = 0x08;
    f
}

#[test]
fn e1000_identity_reset_eeprom_phy() {
    let g = Guest::new(Box::new(Capture::new()));
    let info = g.dev.info();
    assert_eq!(info.num_regions, pci_index::NUM_REGIONS);
    assert_eq!(g.dev.region_info(0).unwrap().size, 128 * 1024);
    assert_eq!(g.dev.region_info(1).unwrap().size, 64);
    assert_eq!(g.dev.region_info(2).unwrap().size, 0);
    assert_eq!(g.cfg_read16(0), 0x8086);
    assert_eq!(g.cfg_read16(2), 0x100E);
    let mut class = [0u8; 3];
    g.dev.region_read(pci_index::CONFIG, 9, &mut class).unwrap();
    assert_eq!(class, [0x00, 0x00, 0x02]);
    g.msi_cap();
    let intx = g.dev.irq_info(pci_index::INTX_IRQ).unwrap();
    assert_eq!(intx.count, 1);
    assert_ne!(intx.flags & nestio_device_model::irq_flags::AUTOMASKED, 0);
    assert_eq!(g.dev.irq_info(pci_index::MSI_IRQ).unwrap().count, 1);

    // Reset clears programmed registers.
    g.wr(IMS, 0xFF);
    g.wr(TDLEN, 4096);
    g.wr(RA + 8, 0x1234);
    g.reset();
    assert_eq!(g.rd(IMS), 0);
    assert_eq!(g.rd(TDLEN), 0);
    assert_eq!(g.rd(RA + 8), 0);
    let st = g.rd(STATUS);
    assert_eq!(st & (STATUS_LU | STATUS_FD), STATUS_LU | STATUS_FD);
    // The driver setting link up raises LSC.
    g.rd(ICR);
    g.wr(CTRL, g.rd(CTRL) | CTRL_SLU);
    assert_eq!(g.rd(ICR), ICR_LSC);
    assert_eq!(st & (3 << 6), STATUS_SPEED_1000);

    // MAC and checksum from the EEPROM via EERD.
    let words: Vec<u16> = (0..64).map(|a| g.eerd(a)).collect();
    let sum = words.iter().fold(0u16, |a, w| a.wrapping_add(*w));
    assert_eq!(sum, 0xBABA);
    let mut mac = [0u8; 6];
    for i in 0..3 {
        mac[2 * i..2 * i + 2].copy_from_slice(&words[i].to_le_bytes());
    }
    assert_eq!(mac, DEFAULT_MAC);
    assert_eq!(g.eerd(0x80), 0, "past the EEPROM reads 0");
    // RAL0/RAH0 loaded from the EEPROM, AV set.
    assert_eq!(g.rd(RA), u32::from_le_bytes([0x52, 0x54, 0x00, 0x12]));
    assert_eq!(g.rd(RA + 4), 0x5634 | (1 << 31));

    // Microwire bit-bang read of word 1 through EECD, as Linux does on the 82540.
    g.wr(EECD, EECD_REQ);
    assert_ne!(g.rd(EECD) & EECD_GNT, 0);
    assert_ne!(g.rd(EECD) & EECD_PRES, 0);
    let base = EECD_REQ | EECD_CS;
    g.wr(EECD, base);
    let clock_in = |bit: bool| {
        let di = if bit { EECD_DI } else { 0 };
        g.wr(EECD, base | di);
        g.wr(EECD, base | di | EECD_SK);
        g.wr(EECD, base | di);
    };
    for b in [true, true, false, false, false, false, false, false, true] {
        clock_in(b);
    }
    let mut w = 0u16;
    for _ in 0..16 {
        g.wr(EECD, base | EECD_SK);
        w = (w << 1) | u16::from(g.rd(EECD) & EECD_DO != 0);
        g.wr(EECD, base);
    }
    assert_eq!(w, words[1]);
    g.wr(EECD, 0);

    // PHY over MDIC: id and link status.
    let mdic_read = |reg: u32| {
        g.wr(MDIC, MDIC_OP_READ | (1 << 21) | (reg << 16));
        let v = g.rd(MDIC);
        assert_ne!(v & MDIC_READY, 0);
        assert_eq!(v & MDIC_ERROR, 0);
        (v & 0xFFFF) as u16
    };
    assert_eq!(mdic_read(2), 0x0141);
    assert_ne!(mdic_read(1) & 0x0004, 0, "PHY link up");
    g.wr(MDIC, MDIC_OP_READ | (3 << 21));
    assert_ne!(g.rd(MDIC) & MDIC_ERROR, 0, "no PHY at address 3");

    // ICS is write-only, ICR read clears.
    g.wr(ICS, ICR_LSC);
    assert_eq!(g.rd(ICS), 0);
    assert_eq!(g.rd(ICR) & ICR_LSC, ICR_LSC);
    assert_eq!(g.rd(ICR), 0);

    // I/O window reaches the same registers.
    g.dev.region_write(1, 0, &ITR.to_le_bytes()).unwrap();
    g.dev.region_write(1, 4, &0x1234u32.to_le_bytes()).unwrap();
    assert_eq!(g.rd(ITR), 0x1234);
    let mut b = [0u8; 4];
    g.dev.region_read(1, 4, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x1234);
}

#[test]
fn e1000_access_checks() {
    let g = Guest::new(Box::new(Capture::new()));
    let mut b3 = [0u8; 3];
    assert!(g.dev.region_read(0, 0, &mut b3).is_err(), "3-byte access");
    let mut b4 = [0u8; 4];
    assert!(g.dev.region_read(0, 2, &mut b4).is_err(), "unaligned");
    assert!(
        g.dev.region_read(0, 128 * 1024, &mut b4).is_err(),
        "past the end"
    );
    assert!(
        g.dev.region_read(0, u64::MAX - 1, &mut b4).is_err(),
        "wrapping"
    );
    assert!(g.dev.region_write(1, 64, &[0; 4]).is_err());
    assert!(g.dev.region_read(9, 0, &mut b4).is_err(), "no such region");
    assert!(g.dev.region_read(3, 0, &mut b4).is_err(), "absent BAR");
    let mut b16 = [0u8; 16];
    assert!(g.dev.region_read(0, 0, &mut b16).is_err());
    // 8-byte write splits into two registers.
    let v = 0x0000_0001_2345_6780u64;
    g.dev
        .region_write(0, u64::from(TDBAL), &v.to_le_bytes())
        .unwrap();
    assert_eq!(g.rd(TDBAL), 0x2345_6780);
    assert_eq!(g.rd(TDBAH), 1);
    // Narrow writes merge into the register.
    g.dev.region_write(0, u64::from(ITR) + 1, &[0xAB]).unwrap();
    assert_eq!(g.rd(ITR), 0xAB00);
    let mut b2 = [0u8; 2];
    g.dev.region_read(0, u64::from(RA) + 4, &mut b2).unwrap();
    assert_eq!(u16::from_le_bytes(b2), 0x5634);
    // A narrow write to ICR (write 1 to clear) clears only the bits written.
    g.wr(ICS, ICR_TXDW | ICR_RXT0);
    g.dev
        .region_write(0, u64::from(ICR), &[ICR_TXDW as u8])
        .unwrap();
    assert_eq!(g.rd(ICR), ICR_RXT0);
    // The device still works after all the refused accesses.
    assert_ne!(g.rd(STATUS) & STATUS_LU, 0);
}

/// Full path through the user network: ARP for the gateway, ping it, receive both
/// replies by DMA and interrupt.
#[test]
fn e1000_arp_and_ping_through_user_backend() {
    let backend = nestio_net::open_backend("user", None).expect("user backend");
    let g = Guest::new(backend);
    g.reset();
    let mac = MacAddr(DEFAULT_MAC);
    g.setup_tx();
    g.setup_rx(0, 0);
    g.wr(IMS, ICR_RXT0 | ICR_TXDW);
    // Drain any stale interrupt.
    take(&g.intx);

    let arp = build_arp_request(mac, GUEST_IP, GW_IP);
    g.send(&arp);
    assert_ne!(g.tx_status(0) & TXD_STA_DD, 0, "TX write-back");
    assert_eq!(g.rd(TDH), 1);

    // Wait for the RX interrupt and the reply.
    let mut rx_idx = 0;
    let mut gw_mac = None;
    for _ in 0..100 {
        assert!(wait(&g.intx), "no INTx within the timeout");
        take(&g.intx);
        let icr = g.rd(ICR);
        g.dev
            .set_irqs(pci_index::INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
            .unwrap();
        if icr & ICR_RXT0 == 0 {
            continue;
        }
        let f = g.rx_frame(rx_idx);
        let (_, st) = g.rx_desc(rx_idx);
        assert_eq!(st & RXD_STA_EOP, RXD_STA_EOP);
        g.rx_recycle(rx_idx);
        rx_idx += 1;
        // ARP reply: ethertype 0x0806, op 2, sender IP 10.0.2.2, target our MAC.
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 2]);
        assert_eq!(&f[28..32], &GW_IP.octets());
        assert_eq!(&f[32..38], &DEFAULT_MAC);
        let mut m = [0u8; 6];
        m.copy_from_slice(&f[22..28]);
        gw_mac = Some(MacAddr(m));
        break;
    }
    let gw_mac = gw_mac.expect("ARP reply");

    let ping = build_icmp_echo_request(mac, gw_mac, GUEST_IP, GW_IP, 0x77, 1, b"nestio e1000 ping")
        .unwrap();
    g.send(&ping);
    let mut got = false;
    for _ in 0..100 {
        if g.rx_desc(rx_idx).1 & RXD_STA_DD == 0 {
            assert!(wait(&g.intx), "no INTx within the timeout");
            take(&g.intx);
            g.rd(ICR);
            g.dev
                .set_irqs(pci_index::INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
                .unwrap();
            continue;
        }
        let f = g.rx_frame(rx_idx);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[14 + 9], 1, "ICMP");
        assert_eq!(&f[14 + 12..14 + 16], &GW_IP.octets());
        let icmp = &f[34..];
        assert_eq!(icmp[0], 0, "echo reply");
        assert_eq!(&icmp[4..6], &0x77u16.to_be_bytes());
        assert!(f.windows(17).any(|w| w == b"nestio e1000 ping"));
        got = true;
        break;
    }
    assert!(got, "ICMP echo reply");
    assert_eq!(g.rd(GPTC), 2);
    assert_eq!(g.rd(GPTC), 0, "statistics clear on read");
    assert_eq!(g.rd(GPRC), 2);
    assert_eq!(g.rd(TPT), 2);
    assert!(g.rd(GOTCL) > 0);
    assert_eq!(g.rd(GOTCH), 0);
    assert_eq!(
        g.rd(GOTCL),
        0,
        "64-bit counter cleared by reading the high half"
    );
    g.assert_outside_untouched();
}

#[test]
fn e1000_tx_multi_descriptor_oversize_and_checksum() {
    let cap = Capture::new();
    let g = Guest::new(Box::new(cap.clone()));
    g.setup_tx();
    assert_eq!(g.rd(ICR), 0, "enabling an idle queue raises nothing");
    // One packet over three descriptors.
    let parts: [&[u8]; 3] = [&[0xAA; 20], &[0xBB; 30], &[0xCC; 40]];
    for (i, p) in parts.iter().enumerate() {
        let buf = IOVA + TX_BUF + i as u64 * 0x800;
        g.mem_write(buf, p);
        let cmd = if i == 2 { TXD_CMD_EOP | TXD_CMD_RS } else { 0 };
        g.tx_desc(i as u32, buf, p.len(), cmd);
    }
    g.wr(TDT, 3);
    let sent = cap.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].len(), 90);
    assert_eq!(&sent[0][..20], &[0xAA; 20]);
    assert_eq!(&sent[0][50..], &[0xCC; 40]);
    assert_eq!(g.tx_status(0) & TXD_STA_DD, 0, "no RS, no write-back");
    assert_ne!(g.tx_status(2) & TXD_STA_DD, 0);
    let icr = g.rd(ICR);
    assert_eq!(icr & (ICR_TXDW | ICR_TXQE), ICR_TXDW | ICR_TXQE);

    // An oversized packet (> 16 KiB over several descriptors) is consumed and dropped.
    for i in 3..8u32 {
        let cmd = if i == 7 { TXD_CMD_EOP | TXD_CMD_RS } else { 0 };
        g.tx_desc(i, IOVA + TX_BUF, 4000, cmd);
    }
    g.wr(TDT, 8);
    assert_eq!(cap.sent().len(), 1, "oversized packet dropped");
    assert_eq!(g.rd(TDH), 8);
    assert_ne!(g.tx_status(7) & TXD_STA_DD, 0);

    // Legacy checksum insertion (IC): CSS 14, CSO 24 over an IPv4 header.
    let mut f = frame_to([2, 0, 0, 0, 0, 1], 34);
    f[14..34].copy_from_slice(&[
        0x45, 0, 0, 20, 0, 0, 0x40, 0, 0x40, 17, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2,
    ]);
    let buf = IOVA + TX_BUF;
    g.mem_write(buf, &f);
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&buf.to_le_bytes());
    d[8..10].copy_from_slice(&34u16.to_le_bytes());
    d[10] = 24; // CSO
    d[11] = TXD_CMD_EOP | TXD_CMD_RS | TXD_CMD_IC;
    d[13] = 14; // CSS
    g.mem_write(IOVA + TX_RING + 8 * 16, &d);
    g.wr(TDT, 9);
    let sent = cap.sent();
    assert_eq!(sent.len(), 2);
    let ip = &sent[1][14..34];
    let sum = ip
        .chunks(2)
        .fold(0u32, |a, c| a + u32::from(u16::from_be_bytes([c[0], c[1]])));
    let folded = (sum & 0xFFFF) + (sum >> 16);
    assert_eq!(folded, 0xFFFF, "inserted IP header checksum is valid");
    assert_eq!(sent[1].len(), 60, "PSP pads short frames");

    // Without bus mastering nothing is DMAed; enabling it resumes the queue.
    g.cfg_write16(4, 0x2);
    g.send(&frame_to([2, 0, 0, 0, 0, 1], 60));
    assert_eq!(cap.sent().len(), 2);
    g.cfg_write16(4, 0x6);
    assert_eq!(cap.sent().len(), 3);
    g.assert_outside_untouched();
}

#[test]
fn e1000_intx_level_and_msi_edge() {
    let g = Guest::new(Box::new(Capture::new()));
    g.setup_rx(0, 0);
    g.wr(IMS, ICR_RXT0);
    let f = frame_to(DEFAULT_MAC, 60);
    assert_eq!(g.dev.inject_frame(&f), Some(RxOutcome::Delivered));
    assert_eq!(take(&g.intx), 1);
    assert_ne!(g.cfg_read16(6) & 0x8, 0, "PCI status: interrupt pending");
    // Automasked: a second cause does not signal until unmask.
    assert_eq!(g.dev.inject_frame(&f), Some(RxOutcome::Delivered));
    assert_eq!(take(&g.intx), 0);
    // Unmask while still asserted: the level interrupt fires again.
    g.dev
        .set_irqs(pci_index::INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
        .unwrap();
    assert_eq!(take(&g.intx), 1);
    // Handled (ICR read clears), unmask: nothing more.
    assert_ne!(g.rd(ICR) & ICR_RXT0, 0);
    assert_eq!(g.cfg_read16(6) & 0x8, 0, "PCI status: level dropped");
    g.dev
        .set_irqs(pci_index::INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
        .unwrap();
    assert_eq!(take(&g.intx), 0);
    // INTx disabled in the command register: no signal until it is enabled again.
    g.cfg_write16(4, 0x6 | (1 << 10));
    g.dev.inject_frame(&f);
    assert_eq!(take(&g.intx), 0);
    g.cfg_write16(4, 0x6);
    assert_eq!(take(&g.intx), 1, "level still high when INTx is re-enabled");
    g.rd(ICR);
    g.dev
        .set_irqs(pci_index::INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
        .unwrap();
    assert_eq!(take(&g.intx), 0);
    // A disabled cause does not interrupt.
    g.wr(IMC, ICR_RXT0);
    g.dev.inject_frame(&f);
    assert_eq!(take(&g.intx), 0);
    assert_ne!(g.rd(ICR) & ICR_RXT0, 0);

    // MSI: the guest enables it in the capability and the VMM wires the MSI eventfd;
    // each new cause is one message, INTx is quiet.
    let cap = g.msi_cap();
    let ctrl = g.cfg_read16(cap + 2);
    g.cfg_write16(cap + 2, ctrl | 1);
    g.wire_msi();
    g.wr(IMS, ICR_RXT0);
    g.dev.inject_frame(&f);
    assert_eq!(take(&g.msi), 1);
    g.dev.inject_frame(&f);
    assert_eq!(take(&g.msi), 1, "edge per event");
    assert_eq!(take(&g.intx), 0);
    g.rd(ICR);

    // ITR throttling: a deferred interrupt is still delivered (by the worker).
    g.wr(ITR, 0x2000); // ~2 ms
    g.dev.inject_frame(&f);
    g.dev.inject_frame(&f);
    let mut n = 0;
    while n < 2 {
        assert!(wait(&g.msi), "throttled interrupt never delivered");
        n += take(&g.msi);
    }
}

#[test]
fn e1000_rx_filtering() {
    let g = Guest::new(Box::new(Capture::new()));
    g.setup_rx(0, 0);
    let ours = frame_to(DEFAULT_MAC, 60);
    let other = frame_to([0x02, 1, 2, 3, 4, 5], 60);
    let bcast = frame_to([0xFF; 6], 60);
    let mcast_addr = [0x01, 0x00, 0x5E, 0x00, 0x00, 0xFB];
    let mcast = frame_to(mcast_addr, 60);
    assert_eq!(g.dev.inject_frame(&ours), Some(RxOutcome::Delivered));
    assert_eq!(g.dev.inject_frame(&other), Some(RxOutcome::Filtered));
    assert_eq!(g.dev.inject_frame(&bcast), Some(RxOutcome::Delivered));
    assert_eq!(g.dev.inject_frame(&mcast), Some(RxOutcome::Filtered));
    // MTA hash (MO = 0).
    let h = mta_hash(&mcast_addr, 0);
    g.wr(MTA + 4 * (h >> 5), 1 << (h & 31));
    assert_eq!(g.dev.inject_frame(&mcast), Some(RxOutcome::Delivered));
    // A second perfect-filter entry.
    g.wr(RA + 8, u32::from_le_bytes([0x02, 1, 2, 3]));
    g.wr(RA + 12, 0x0504);
    assert_eq!(
        g.dev.inject_frame(&other),
        Some(RxOutcome::Filtered),
        "AV clear"
    );
    g.wr(RA + 12, 0x0504 | (1 << 31));
    assert_eq!(g.dev.inject_frame(&other), Some(RxOutcome::Delivered));
    // Promiscuous modes; BAM off.
    let third = frame_to([0x02, 9, 9, 9, 9, 9], 60);
    let rctl = g.rd(RCTL);
    g.wr(RCTL, (rctl | RCTL_UPE) & !RCTL_BAM);
    assert_eq!(g.dev.inject_frame(&third), Some(RxOutcome::Delivered));
    assert_eq!(g.dev.inject_frame(&bcast), Some(RxOutcome::Filtered));
    g.wr(RCTL, rctl | RCTL_MPE);
    assert_eq!(
        g.dev.inject_frame(&frame_to([0x33, 0x33, 0, 0, 0, 1], 60)),
        Some(RxOutcome::Delivered)
    );
    assert_eq!(g.rd(BPRC), 1);
    assert_eq!(g.rd(MPRC), 2);
    // SECRC off: the FCS is stored (length 64 for a 60-byte frame).
    g.wr(RCTL, rctl & !RCTL_SECRC);
    let idx = g.rd(RDH);
    assert_eq!(g.dev.inject_frame(&ours), Some(RxOutcome::Delivered));
    let (len, _) = g.rx_desc(idx);
    assert_eq!(len, 64);
    let stored = g.mem_read(IOVA + RX_BUF + u64::from(idx) * 0x800, 64);
    let fcs = nestio_emulated::e1000::crc32(&stored[..60]);
    assert_eq!(&stored[60..], &fcs.to_le_bytes());
    // Receiver disabled.
    g.wr(RCTL, 0);
    assert_eq!(g.dev.inject_frame(&ours), Some(RxOutcome::Disabled));
}

#[test]
fn e1000_rx_overrun_multi_descriptor_and_long_frames() {
    let g = Guest::new(Box::new(Capture::new()));
    // 256-byte buffers.
    g.setup_rx(3, 0);
    g.wr(IMS, ICR_RXO | ICR_RXT0 | ICR_RXDMT0);
    let big = frame_to(DEFAULT_MAC, 1000);
    assert_eq!(g.dev.inject_frame(&big), Some(RxOutcome::Delivered));
    assert_eq!(g.rd(RDH), 4);
    for i in 0..3 {
        let (len, st) = g.rx_desc(i);
        assert_eq!(len, 256);
        assert_eq!(st & (RXD_STA_DD | RXD_STA_EOP), RXD_STA_DD);
    }
    let (len, st) = g.rx_desc(3);
    assert_eq!(len, 1000 - 768);
    assert_eq!(st & RXD_STA_EOP, RXD_STA_EOP);
    let mut got = Vec::new();
    for i in 0..4u64 {
        let (len, _) = g.rx_desc(i as u32);
        got.extend(g.mem_read(IOVA + RX_BUF + i * 0x800, usize::from(len)));
    }
    assert_eq!(got, big);

    // Too long without LPE: dropped and counted.
    let long = frame_to(DEFAULT_MAC, 2000);
    assert_eq!(g.dev.inject_frame(&long), Some(RxOutcome::Oversize));
    assert_eq!(g.rd(ROC), 1);
    let rctl = g.rd(RCTL);
    g.wr(RCTL, rctl | RCTL_LPE);
    assert_eq!(g.dev.inject_frame(&long), Some(RxOutcome::Delivered));
    assert_eq!(g.rd(RDH), 12);
    assert_ne!(g.rd(ICR) & ICR_RXDMT0, 0, "few free descriptors left");

    // Overrun: 3 free descriptors, a frame needing 8.
    assert_eq!(g.dev.inject_frame(&long), Some(RxOutcome::NoBuffers));
    assert_eq!(g.rd(MPC), 1, "missed packet counted");
    assert_eq!(g.rd(MPC), 0);
    assert_eq!(g.rd(RNBC), 1);
    assert_ne!(g.rd(ICR) & ICR_RXO, 0);
    // Ring full (head == tail): every frame is counted.
    g.wr(RDT, g.rd(RDH));
    for _ in 0..5 {
        assert_eq!(
            g.dev.inject_frame(&frame_to(DEFAULT_MAC, 60)),
            Some(RxOutcome::NoBuffers)
        );
    }
    assert_eq!(g.rd(MPC), 5);
    g.assert_outside_untouched();
}

#[test]
fn e1000_hostile_descriptors() {
    let cap = Capture::new();
    let g = Guest::new(Box::new(cap.clone()));
    g.setup_tx();
    // TX buffer outside every mapping.
    g.tx_desc(0, 0xDEAD_0000_0000, 64, TXD_CMD_EOP | TXD_CMD_RS);
    g.wr(TDT, 1);
    assert!(cap.sent().is_empty());
    assert_eq!(g.tx_status(0), 0, "no write-back for a faulted descriptor");
    assert_ne!(g.cfg_read16(6) & (1 << 13), 0, "received master abort");
    // Registers keep being served; the halted queue does nothing on new tails.
    assert_ne!(g.rd(STATUS) & STATUS_LU, 0);
    g.send(&frame_to([2, 0, 0, 0, 0, 1], 60));
    assert!(cap.sent().is_empty(), "queue halted");
    // Re-initialise the queue (as a driver's reset path would) and it runs again.
    g.wr(TCTL, 0);
    g.wr(TDH, 0);
    g.wr(TDT, 0);
    g.wr(TCTL, TCTL_EN);
    g.send(&frame_to([2, 0, 0, 0, 0, 1], 60));
    assert_eq!(cap.sent().len(), 1);

    // Ring base at the very end of the mapping: descriptor straddles the end.
    g.wr(TCTL, 0);
    g.wr(TDBAL, (IOVA + MAPPED - 16) as u32);
    g.wr(TDLEN, 128);
    g.wr(TDH, 1);
    g.wr(TDT, 2);
    g.wr(TCTL, TCTL_EN);
    assert_eq!(cap.sent().len(), 1);

    // Ring length not a multiple of 128: low bits are ignored.
    g.wr(TDLEN, 1000);
    assert_eq!(g.rd(TDLEN), 896);
    g.wr(RDLEN, 100);
    assert_eq!(g.rd(RDLEN), 0);

    // Head beyond the ring: the queue stops, nothing is read or written.
    g.setup_tx();
    g.wr(TDH, 200);
    g.wr(TDT, 3);
    assert_eq!(g.rd(TDH), 200);
    assert_eq!(cap.sent().len(), 1);

    // RX ring outside the mappings: frame counted as missed, queue halted.
    g.setup_rx(0, 0);
    g.wr(RDBAL, 0xF000_0000);
    let f = frame_to(DEFAULT_MAC, 60);
    assert_eq!(g.dev.inject_frame(&f), Some(RxOutcome::Halted));
    assert_eq!(g.dev.inject_frame(&f), Some(RxOutcome::Halted));
    assert_eq!(g.rd(MPC), 2);
    // RX descriptor whose buffer lies outside: same.
    g.setup_rx(0, 0);
    g.mem_write(IOVA + RX_RING, &0xF000_0000u64.to_le_bytes());
    g.wr(RCTL, 0);
    g.wr(RCTL, RCTL_EN | RCTL_SECRC);
    assert_eq!(g.dev.inject_frame(&f), Some(RxOutcome::Halted));
    // RX head beyond the ring.
    g.setup_rx(0, 0);
    g.wr(RDH, 999);
    assert_eq!(g.dev.inject_frame(&f), Some(RxOutcome::Halted));
    assert_eq!(g.rd(RDH), 999);
    // Reserved buffer size (BSEX with BSIZE 0).
    g.setup_rx(0, RCTL_BSEX);
    assert_eq!(g.dev.inject_frame(&f), Some(RxOutcome::Halted));
    g.assert_outside_untouched();
}

#[test]
fn e1000_migration_round_trip() {
    let mem = Arc::new(memfd(FILE_SIZE));
    let cap_a = Capture::new();
    let a = Guest::with_mem(Box::new(cap_a.clone()), mem.clone());
    a.setup_tx();
    a.setup_rx(0, 0);
    a.wr(IMS, ICR_RXT0 | ICR_TXDW);
    a.wr(ITR, 0x55);
    a.wr(RA + 8, 0x0403_0201);
    a.wr(RA + 12, 0x0605 | (1 << 31));
    a.send(&frame_to([2, 0, 0, 0, 0, 1], 60));
    assert_eq!(
        a.dev.inject_frame(&frame_to(DEFAULT_MAC, 60)),
        Some(RxOutcome::Delivered)
    );
    a.dev
        .dma_logging_start(4096, &[DmaRange::new(IOVA, MAPPED).unwrap()])
        .unwrap();
    // Device writes while running are logged: the RX buffer page and the ring page.
    let idx = a.rd(RDH);
    assert_eq!(
        a.dev.inject_frame(&frame_to(DEFAULT_MAC, 60)),
        Some(RxOutcome::Delivered)
    );
    let bitmap = a
        .dev
        .dma_logging_report(DmaRange::new(IOVA, MAPPED).unwrap(), 4096)
        .unwrap();
    let dirty = |page: u64| bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0;
    assert!(dirty(RX_RING / 4096), "descriptor write-back logged");
    assert!(
        dirty((RX_BUF + u64::from(idx) * 0x800) / 4096),
        "buffer write logged"
    );
    assert!(!dirty(TX_BUF / 4096), "TX buffers were only read");

    assert_eq!(a.dev.mig_set_state(MigState::Stop).unwrap(), MigState::Stop);
    // While stopped: no DMA; received frames (from the backend through the worker,
    // or injected) wait in the pending queue.
    let rdh = a.rd(RDH);
    let calls = cap_a.recv_calls();
    cap_a.push(frame_to(DEFAULT_MAC, 80));
    // Wait until the worker has queued the frame, not merely taken it from the backend:
    // otherwise the injected frame below could be queued first, or the state read
    // before the frame is in it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cap_a.frame_handled_since(calls) {
        assert!(
            Instant::now() < deadline,
            "worker takes frames while stopped"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(cap_a.inbox.lock().unwrap().is_empty());
    assert_eq!(a.dev.inject_frame(&frame_to(DEFAULT_MAC, 70)), None);
    assert_eq!(a.rx_desc(rdh).1 & RXD_STA_DD, 0, "no DMA while stopped");
    let bitmap = a
        .dev
        .dma_logging_report(DmaRange::new(IOVA, MAPPED).unwrap(), 4096)
        .unwrap();
    assert!(
        bitmap.iter().all(|w| *w == 0),
        "nothing dirtied while stopped"
    );

    assert_eq!(
        a.dev.mig_set_state(MigState::StopCopy).unwrap(),
        MigState::StopCopy
    );
    let stream = read_stream(&*a.dev, 1000).unwrap();
    assert!(stream.starts_with(b"NE1K"));

    // A corrupted stream is refused and the device enters ERROR.
    let bad = Guest::with_mem(Box::new(Capture::new()), Arc::new(memfd(FILE_SIZE)));
    bad.dev.mig_set_state(MigState::Resuming).unwrap();
    bad.dev.mig_data_write(&stream[..stream.len() - 3]).unwrap();
    assert!(bad.dev.mig_set_state(MigState::Running).is_err());
    assert_eq!(bad.dev.mig_state().unwrap(), MigState::Error);

    // The real destination shares the guest memory (as after a memory copy).
    let b = Guest::with_mem(Box::new(Capture::new()), mem);
    b.dev.mig_set_state(MigState::Resuming).unwrap();
    for c in stream.chunks(333) {
        b.dev.mig_data_write(c).unwrap();
    }
    assert_eq!(
        b.dev.mig_set_state(MigState::Running).unwrap(),
        MigState::Running
    );
    assert_eq!(b.rd(IMS), ICR_RXT0 | ICR_TXDW);
    assert_eq!(b.rd(ITR), 0x55);
    assert_eq!(b.rd(RA + 12), 0x0605 | (1 << 31));
    assert_eq!(b.rd(TDLEN), NDESC * 16);
    assert_eq!(b.rd(TDH), 1);
    assert_eq!(b.eerd(0), u16::from_le_bytes([0x52, 0x54]));
    assert_ne!(b.cfg_read16(4) & 0x4, 0, "bus master restored");
    // The pending frames are delivered, in order, by the destination's worker.
    let deadline = Instant::now() + Duration::from_secs(60);
    while b.rx_desc(rdh + 1).1 & RXD_STA_DD == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (len, st) = b.rx_desc(rdh);
    assert_ne!(st & RXD_STA_DD, 0, "pending frame delivered after resume");
    assert_eq!(len, 80);
    let (len, st) = b.rx_desc(rdh + 1);
    assert_ne!(st & RXD_STA_DD, 0, "pending frame delivered after resume");
    assert_eq!(len, 70);
    assert_eq!(b.rd(RDH), rdh + 2);
    // Transmit keeps working on the destination.
    b.send(&frame_to([2, 0, 0, 0, 0, 1], 60));
    assert_eq!(b.rd(TDH), 2);
    // Reading migration data outside STOP_COPY is refused.
    assert!(b.dev.mig_data_read(&mut [0u8; 1000]).is_err());
}

#[test]
fn e1000_rx_worker_delivers_backend_frames() {
    let cap = Capture::new();
    let g = Guest::new(Box::new(cap.clone()));
    g.setup_rx(0, 0);
    g.wr(IMS, ICR_RXT0);
    take(&g.intx);
    cap.push(frame_to(DEFAULT_MAC, 100));
    cap.push(frame_to([0xFF; 6], 80));
    let mut seen = 0;
    while seen < 2 {
        if g.rx_desc(seen).1 & RXD_STA_DD != 0 {
            seen += 1;
            continue;
        }
        assert!(wait(&g.intx), "no interrupt");
        take(&g.intx);
        g.rd(ICR);
        g.dev
            .set_irqs(pci_index::INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
            .unwrap();
    }
    assert_eq!(g.rx_desc(0).0, 100);
    assert_eq!(g.rx_desc(1).0, 80);
    // A VFIO reset returns the device to its power-on state.
    g.dev.reset().unwrap();
    assert_eq!(g.rd(RCTL), 0);
    assert_eq!(g.cfg_read16(4) & 0x4, 0, "bus mastering off after reset");
    // Dropping the device stops its worker and releases the backend.
    drop(g);
    assert_eq!(Arc::strong_count(&cap.sent), 1, "backend released on drop");
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum as u16
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// TCP segmentation offload as Linux's e1000 driver uses it: a context descriptor
/// with TSE, HDRLEN and MSS, then data descriptors with POPTS IXSM|TXSM.
#[test]
fn e1000_tx_tcp_segmentation() {
    let cap = Capture::new();
    let g = Guest::new(Box::new(cap.clone()));
    g.setup_tx();
    let src = [10u8, 0, 2, 15];
    let dst = [10u8, 0, 2, 2];
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let mut pkt = frame_to([2, 0, 0, 0, 0, 1], 54);
    pkt[14..34].copy_from_slice(&[
        0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, src[0], src[1], src[2], src[3], dst[0],
        dst[1], dst[2], dst[3],
    ]);
    // TCP header: ports, seq 1000, ack 0, data offset 5, flags PSH|ACK|FIN.
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&1234u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18 | 0x01;
    // Pseudo-header sum without the length, as the driver seeds it.
    let seed = csum_fold(sum16(&src) + sum16(&dst) + 6);
    tcp[16..18].copy_from_slice(&seed.to_be_bytes());
    pkt[34..54].copy_from_slice(&tcp);
    pkt.extend_from_slice(&payload);

    // Context descriptor (slot 0).
    let mut c = [0u8; 16];
    c[0] = 14; // IPCSS
    c[1] = 24; // IPCSO
    c[2..4].copy_from_slice(&33u16.to_le_bytes()); // IPCSE
    c[4] = 34; // TUCSS
    c[5] = 50; // TUCSO
    c[8..11].copy_from_slice(&3000u32.to_le_bytes()[..3]); // PAYLEN
    c[11] = TXD_CMD_DEXT | TXD_CMD_TSE | 0x02 | 0x01; // TUCMD: IP, TCP
    c[13] = 54; // HDRLEN
    c[14..16].copy_from_slice(&1000u16.to_le_bytes()); // MSS
    g.mem_write(IOVA + TX_RING, &c);
    // Two data descriptors: header+part, rest.
    let buf = IOVA + TX_BUF;
    g.mem_write(buf, &pkt);
    let split = 1500usize;
    for (i, (off, len, last)) in [(0usize, split, false), (split, pkt.len() - split, true)]
        .into_iter()
        .enumerate()
    {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&(buf + off as u64).to_le_bytes());
        d[8..11].copy_from_slice(&(len as u32).to_le_bytes()[..3]);
        d[10] |= 0x10; // DTYP = data
        d[11] = TXD_CMD_DEXT | TXD_CMD_TSE | if last { TXD_CMD_EOP | TXD_CMD_RS } else { 0 };
        d[13] = TXD_POPTS_IXSM | TXD_POPTS_TXSM;
        g.mem_write(IOVA + TX_RING + (i as u64 + 1) * 16, &d);
    }
    g.wr(TDT, 3);
    let sent = cap.sent();
    assert_eq!(sent.len(), 3, "3000 bytes at MSS 1000");
    let mut got = Vec::new();
    for (i, f) in sent.iter().enumerate() {
        assert_eq!(f.len(), 54 + 1000);
        let ip = &f[14..34];
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 1040, "IP total length");
        assert_eq!(
            u16::from_be_bytes([ip[4], ip[5]]),
            0x1234 + i as u16,
            "IP id"
        );
        assert_eq!(csum_fold(sum16(ip)), 0xFFFF, "IP checksum");
        let t = &f[34..];
        assert_eq!(
            u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
            1000 + 1000 * i as u32,
            "sequence"
        );
        let last = i == 2;
        assert_eq!(t[13] & 0x09 != 0, last, "FIN/PSH only on the last segment");
        let pseudo = sum16(&src) + sum16(&dst) + 6 + t.len() as u32;
        assert_eq!(csum_fold(pseudo + sum16(t)), 0xFFFF, "TCP checksum");
        got.extend_from_slice(&t[20..]);
    }
    assert_eq!(got, payload);
    assert_eq!(g.rd(GPTC), 3);
    assert_eq!(g.rd(TSCTC), 1);
    assert_ne!(g.tx_status(2) & TXD_STA_DD, 0);

    // An inconsistent context (header longer than the packet) drops the packet.
    c[13] = 200;
    g.mem_write(IOVA + TX_RING + 3 * 16, &c);
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&buf.to_le_bytes());
    d[8..10].copy_from_slice(&100u16.to_le_bytes());
    d[10] = 0x10;
    d[11] = TXD_CMD_DEXT | TXD_CMD_TSE | TXD_CMD_EOP | TXD_CMD_RS;
    d[13] = TXD_POPTS_TXSM;
    g.mem_write(IOVA + TX_RING + 4 * 16, &d);
    g.wr(TDT, 5);
    assert_eq!(cap.sent().len(), 3);
    assert_eq!(g.rd(TDH), 5);
}

/// The 82540EM has no MSI: by default the device offers none (INTx only, power
/// management the only capability); the option adds a one-vector MSI capability after
/// it, and SET_IRQS on the MSI index is refused without it.
#[test]
fn e1000_msi_is_an_explicit_option() {
    let cfg8 = |d: &E1000, off: u64| {
        let mut b = [0u8; 1];
        d.region_read(pci_index::CONFIG, off, &mut b).unwrap();
        b[0]
    };
    let none = || Box::new(nestio_net::NoneBackend::new().unwrap());
    let plain = E1000::new(E1000Config::new(none())).unwrap();
    assert_eq!(plain.irq_info(pci_index::MSI_IRQ).unwrap().count, 0);
    assert_eq!(plain.irq_info(pci_index::INTX_IRQ).unwrap().count, 1);
    assert_eq!(
        (cfg8(&plain, 0x34), cfg8(&plain, 0xDC), cfg8(&plain, 0xDD)),
        (0xDC, 1, 0)
    );
    assert!(plain
        .set_irqs(
            pci_index::MSI_IRQ,
            IrqAction::Trigger,
            0,
            1,
            IrqData::Eventfd(vec![Some(eventfd())]),
        )
        .is_err());
    let msi = E1000::new(E1000Config::new(none()).with_msi(true)).unwrap();
    assert_eq!(msi.irq_info(pci_index::MSI_IRQ).unwrap().count, 1);
    let next = cfg8(&msi, 0xDD);
    assert_eq!(
        cfg8(&msi, u64::from(next)),
        0x05,
        "MSI after power management"
    );
}
