//! A guest e1000 (82540EM) driver that pings the gateway: reset, MAC from the EEPROM,
//! RX/TX rings in guest RAM (the device DMAs into them), interrupts taken through the
//! IDT/APIC — INTx via the IOAPIC pin in the interrupt-line register (default), MSI
//! (`irq=msi`), or through the XIVE (`irq=xive`, VM with `--irqchip xive`: the
//! interrupt-line register holds the XIVE source, routed by hypercall to vCPU 0's
//! priority-6 event queue; each notification, vector 0x3E, is acknowledged through the
//! TIMA, the queue drained and the source EOId through its ESB page) — then ARP for
//! 10.0.2.2 and an ICMP echo request; exit 0 on the reply. `pings=N` sends N echo
//! requests one after another (sequence 1..=N, each reply awaited; the reply line is
//! printed for the first and the last).
//!
//! `dma=outside` (isolation check, opt-in): after the echo reply, point the next RX
//! descriptor's buffer, then a TX descriptor's buffer, at `RAM size + 1 MiB` — a
//! guest-physical address outside this guest's RAM — and check that the device refused
//! both DMAs: no descriptor write-back, and PCI status "received master abort" set (it
//! is cleared before each step, so each step's fault is seen on its own). Exits
//! [`DMA_OUTSIDE_REFUSED`] when both faults were seen, 17/18 when the RX/TX DMA was not
//! refused.
//!
//! `smmu=ADDR` (the VMM's `--viommu smmuv3`): before touching the NIC, program the
//! SMMUv3 at ADDR (see `smmu.rs`) so the NIC's DMA is translated: rings and buffers
//! are mapped at IOVA = `smmu::IOVA_BASE` + GPA and the NIC is given IOVAs only.
//! `dma=unmap` (with `smmu=`, after the echo reply): unmap the page of the next RX
//! buffer under the live ring (TLBI_NH_VA + CMD_SYNC), have the gateway answer
//! another ARP, and check that the NIC's DMA was refused (master abort, descriptor
//! not written back) and that no byte of the poisoned buffer changed; exits
//! [`DMA_UNMAP_REFUSED`]. `dma=readonly`: the same with the page left mapped
//! read-only for the device (a permission fault instead of a translation fault).
//! `smmu_map=noinval` (with `smmu=`): map without invalidating, as Linux does
//! (enough on hardware and on a nested vIOMMU; a shadowing VMM never sees it).
//! With `smmu=` and `irq=msi` the MSI address is an IOVA (`smmu::MSI_IOVA`) the
//! payload maps to the doorbell 0xFEE0_0000; `msi=unmap` (after the echo reply):
//! unmap that page (TLBI_NH_VA + CMD_SYNC), exchange three ARPs with the RX ring
//! polled and interrupts enabled, and check that no interrupt arrived, the NIC has
//! RXT0 pending, and the event queue holds exactly one F_TRANSLATION for the NIC's
//! SID at the doorbell IOVA (a write); exits [`MSI_UNMAPPED_FAULTED`].
//! `tce=4g` / `tce=59` (the sPAPR TCE IOMMU, `nestio_vmm::iommu::tce`): before the
//! rings are set up, ask for a dynamic DMA window (`ibm,query-pe-dma-window`,
//! `ibm,create-pe-dma-window`: 4 KiB pages, as big as RAM), check it lands at 4 GiB /
//! 1 << 59, map the rings and buffers into it with one `H_PUT_TCE_INDIRECT` each
//! (bus address = window start + guest-physical address) and give the device only bus
//! addresses. A refused window exits [`TCE_CREATE_REFUSED`], a window elsewhere
//! [`TCE_WRONG_START`]. `tce_remove=1`: after the reply, remove the window
//! (`ibm,remove-pe-dma-window`) and send again: the device must fault (PCI "received
//! master abort", descriptor not written back): exits [`TCE_REMOVED_FAULTED`].
#![no_std]
#![no_main]

use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering};

use nestio_guest::hcall::{hcall, rtas_token, RtasArgs, H_GET_TCE, H_PUT_TCE_INDIRECT, H_SUCCESS};
use nestio_guest::io::{mmio_read32, mmio_write32, wait_for_interrupt};
use nestio_guest::{cmdline_value, interrupts, pci, println};

#[path = "../smmu.rs"]
mod smmu;

nestio_guest::entry!(main);

const CTRL: u64 = 0x0;
const STATUS: u64 = 0x8;
const EERD: u64 = 0x14;
const ICR: u64 = 0xc0;
const IMS: u64 = 0xd0;
const IMC: u64 = 0xd8;
const RCTL: u64 = 0x100;
const TCTL: u64 = 0x400;
const TIPG: u64 = 0x410;
const RDBAL: u64 = 0x2800;
const RDBAH: u64 = 0x2804;
const RDLEN: u64 = 0x2808;
const RDH: u64 = 0x2810;
const RDT: u64 = 0x2818;
const TDBAL: u64 = 0x3800;
const TDBAH: u64 = 0x3804;
const TDLEN: u64 = 0x3808;
const TDH: u64 = 0x3810;
const TDT: u64 = 0x3818;
const MTA: u64 = 0x5200;
const ICR_RXT0: u32 = 0x80;
const VECTOR: u8 = 0x31;
const N: usize = 8;
const BUF: usize = 2048;
const MY_IP: [u8; 4] = [10, 0, 2, 15];
/// PCI status "received master abort" (bit 13 of the status word).
const STATUS_MASTER_ABORT: u32 = 1 << 13;
/// Exit status of `dma=outside` when the device refused both out-of-RAM DMAs.
const DMA_OUTSIDE_REFUSED: u32 = 7;
const GW_IP: [u8; 4] = [10, 0, 2, 2];
/// Exit status of `dma=unmap` when the NIC's DMA to the unmapped page was refused.
const DMA_UNMAP_REFUSED: u32 = 8;
/// `msi=unmap`: the unmapped doorbell IOVA gave one event and no interrupt.
const MSI_UNMAPPED_FAULTED: u32 = 9;

/// What the NIC is told for a guest-physical address: IOVA = GPA + this (0 without
/// an SMMU or a TCE window; `smmu::IOVA_BASE` with `smmu=`, the window start with `tce=`).
static mut IOVA_OFF: u64 = 0;

fn dma(gpa: u64) -> u64 {
    // SAFETY: written once before the NIC is given any address.
    gpa + unsafe { IOVA_OFF }
}

/// `tce=`: the window could not be created.
const TCE_CREATE_REFUSED: u32 = 21;
/// `tce=`: the window is not where it was expected.
const TCE_WRONG_START: u32 = 22;
/// `tce=`: an RTAS call or a TCE hypercall failed.
const TCE_CALL_FAILED: u32 = 23;
/// `tce_remove=1`: the device faulted after the window was removed.
const TCE_REMOVED_FAULTED: u32 = 8;
/// The PHB's BUID (nestio's `PeConfig` default, as QEMU's first PHB).
const BUID: u64 = 0x0800_0000_2000_0000;

#[repr(C, align(4096))]
struct TceList([u64; 512]);
static mut TCE_LIST: TceList = TceList([0; 512]);

/// Create the dynamic window and map `objs` into it: `Ok((liobn, start))`.
fn tce_setup(ram: u64, want: u64, objs: &[(u64, u64)]) -> Result<(u32, u64), u32> {
    let (Ok(query), Ok(create)) = (
        rtas_token("ibm,query-pe-dma-window"),
        rtas_token("ibm,create-pe-dma-window"),
    ) else {
        println!("tce: no DDW RTAS calls");
        return Err(TCE_CALL_FAILED);
    };
    let (hi, lo) = ((BUID >> 32) as u32, BUID as u32);
    let mut q = RtasArgs::new(query, &[0x800, hi, lo], 5);
    if q.call() != H_SUCCESS || q.ret(0) != 0 {
        println!("tce: query-pe-dma-window failed: {:#x}", q.ret(0));
        return Err(TCE_CALL_FAILED);
    }
    println!(
        "tce: {} window(s) available, page sizes {:#x}",
        q.ret(1),
        q.ret(3)
    );
    let shift = 64 - (ram - 1).leading_zeros();
    let mut c = RtasArgs::new(create, &[0x800, hi, lo, 12, shift], 4);
    if c.call() != H_SUCCESS || c.ret(0) != 0 {
        println!(
            "tce: create-pe-dma-window refused: status {}",
            c.ret(0) as i32
        );
        return Err(TCE_CREATE_REFUSED);
    }
    let liobn = c.ret(1);
    let start = u64::from(c.ret(2)) << 32 | u64::from(c.ret(3));
    println!(
        "tce: window liobn {:#x} at {:#x}, 2^{} bytes of 4 KiB pages",
        liobn, start, shift
    );
    if start != want {
        println!("tce: expected the window at {:#x}", want);
        return Err(TCE_WRONG_START);
    }
    for &(gpa, len) in objs {
        let first = gpa & !0xfff;
        let pages = ((gpa + len + 0xfff) & !0xfff) - first;
        let n = (pages >> 12).min(512);
        for k in 0..n {
            // SAFETY: the list is ours; the VMM reads it during the hypercall only.
            unsafe { (*addr_of_mut!(TCE_LIST)).0[k as usize] = ((first + (k << 12)) | 3).to_be() };
        }
        let list = addr_of_mut!(TCE_LIST) as u64;
        let r = hcall(
            H_PUT_TCE_INDIRECT,
            &[u64::from(liobn), start + first, list, n],
        );
        if r.status != H_SUCCESS {
            println!(
                "tce: H_PUT_TCE_INDIRECT of {} pages at {:#x}: {}",
                n, first, r.status
            );
            return Err(TCE_CALL_FAILED);
        }
        let g = hcall(H_GET_TCE, &[u64::from(liobn), start + first]);
        if g.status != H_SUCCESS || g.rets[0] != first | 3 {
            println!("tce: H_GET_TCE gave {:#x}", g.rets[0]);
            return Err(TCE_CALL_FAILED);
        }
    }
    // SAFETY: single-threaded, before the device gets any address.
    unsafe { IOVA_OFF = start };
    Ok((liobn, start))
}

#[repr(C, align(128))]
struct Ring([[u64; 2]; N]);
#[repr(C, align(4096))]
struct Bufs([[u8; BUF]; N]);

static mut RX_RING: Ring = Ring([[0; 2]; N]);
static mut TX_RING: Ring = Ring([[0; 2]; N]);
static mut RX_BUF: Bufs = Bufs([[0; BUF]; N]);
static mut TX_BUF: Bufs = Bufs([[0; BUF]; N]);

static IRQS: AtomicU32 = AtomicU32::new(0);
static CAUSES: AtomicU32 = AtomicU32::new(0);
/// Interrupts whose cause included RXT0 (a frame was received).
static RX_IRQS: AtomicU32 = AtomicU32::new(0);
/// RX_IRQS when the last frame was sent: receive() waits for an RX interrupt after it.
static RX_MARK: AtomicU32 = AtomicU32::new(0);
static mut BAR0: u64 = 0;

fn reg(off: u64) -> u64 {
    // SAFETY: written once before interrupts are enabled.
    unsafe { BAR0 + off }
}

/// The XIVE mode (`irq=xive`): layout of `nestio_vmm::irqchip::xive` for vCPU 0.
mod xive {
    use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
    use core::sync::atomic::{AtomicU32, Ordering};

    pub const VECTOR: u8 = 0x3e;
    const ESB_BASE: u64 = 0xef00_0000;
    const TIMA_OS: u64 = 0xefc0_0000 + 0x2000;

    #[repr(C, align(4096))]
    struct Queue([u32; 1024]);
    static mut QUEUE: Queue = Queue([0; 1024]);
    static TOGGLE: AtomicU32 = AtomicU32::new(0);
    static INDEX: AtomicU32 = AtomicU32::new(0);
    pub static SOURCE: AtomicU32 = AtomicU32::new(u32::MAX);

    fn eoi(lisn: u32) {
        nestio_guest::io::mmio_read64(ESB_BASE + u64::from(lisn) * 0x2000 + 0x1000);
    }

    /// Queue at priority 6 for vCPU 0, `lisn` routed there with EISN = `lisn`, PQ=00.
    pub fn setup(lisn: u32) -> bool {
        use nestio_guest::hcall::hcall;
        SOURCE.store(lisn, Ordering::SeqCst);
        // SAFETY: only the address of the static queue is taken.
        let q = unsafe { addr_of_mut!(QUEUE) } as u64;
        let ok = hcall(0x3B8, &[1, 0, 6, q, 12]).status == 0
            && hcall(0x3AC, &[2, lisn.into(), 0, 6, lisn.into()]).status == 0;
        // PQ=00 (a load at 0xC00 of the management page).
        let old = nestio_guest::io::mmio_read64(ESB_BASE + u64::from(lisn) * 0x2000 + 0x1C00);
        // SAFETY: 1-byte store of CPPR 0xFF to vCPU 0's TIMA OS page.
        unsafe { write_volatile((TIMA_OS + 0x11) as *mut u8, 0xff) };
        ok && u64::from_be(old) == 1
    }

    /// A notification: ack, drain (calling `f` for the device's events), EOI, CPPR.
    pub fn take(f: impl Fn()) {
        // SAFETY: the 2-byte acknowledge load of vCPU 0's TIMA OS page.
        let ack = u16::from_be(unsafe { read_volatile((TIMA_OS + 0x810) as *const u16) });
        if ack & 0x8000 == 0 {
            return;
        }
        let (mut t, mut i) = (TOGGLE.load(Ordering::SeqCst), INDEX.load(Ordering::SeqCst));
        loop {
            // SAFETY: entry i (< 1024) of the queue the VMM writes: read once, volatile.
            let e = u32::from_be(unsafe { read_volatile(addr_of!(QUEUE.0[i as usize & 1023])) });
            if e >> 31 == t {
                break;
            }
            i = (i + 1) % 1024;
            if i == 0 {
                t ^= 1;
            }
            let lisn = e & 0x7fff_ffff;
            if lisn == SOURCE.load(Ordering::SeqCst) {
                f();
            }
            eoi(lisn);
        }
        TOGGLE.store(t, Ordering::SeqCst);
        INDEX.store(i, Ordering::SeqCst);
        // SAFETY: CPPR back to 0xFF on vCPU 0's TIMA OS page.
        unsafe { write_volatile((TIMA_OS + 0x11) as *mut u8, 0xff) };
    }
}

fn on_irq(v: u8) {
    if v == xive::VECTOR {
        xive::take(|| on_irq(VECTOR));
        return;
    }
    if v == VECTOR {
        // Reading ICR clears it and drops the INTx level before the EOI.
        let icr = mmio_read32(reg(ICR));
        CAUSES.fetch_or(icr, Ordering::SeqCst);
        IRQS.fetch_add(1, Ordering::SeqCst);
        if icr & ICR_RXT0 != 0 {
            RX_IRQS.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn eeprom(word: u32) -> u16 {
    mmio_write32(reg(EERD), (word << 8) | 1);
    for _ in 0..1000 {
        let v = mmio_read32(reg(EERD));
        if v & 0x10 != 0 {
            return (v >> 16) as u16;
        }
    }
    0xffff
}

fn rx_ring() -> *mut [u64; 2] {
    addr_of_mut!(RX_RING) as *mut [u64; 2]
}
fn tx_ring() -> *mut [u64; 2] {
    addr_of_mut!(TX_RING) as *mut [u64; 2]
}
fn rx_buf(i: usize) -> *mut u8 {
    // SAFETY: i < N; pointer arithmetic inside the static.
    unsafe { (addr_of_mut!(RX_BUF) as *mut u8).add(i * BUF) }
}
fn tx_buf(i: usize) -> *mut u8 {
    // SAFETY: i < N; pointer arithmetic inside the static.
    unsafe { (addr_of_mut!(TX_BUF) as *mut u8).add(i * BUF) }
}

struct Nic {
    tx_next: usize,
    rx_next: usize,
    mac: [u8; 6],
}

impl Nic {
    fn send(&mut self, frame: &[u8]) -> bool {
        let i = self.tx_next;
        let len = frame.len().max(60);
        let b = tx_buf(i);
        for k in 0..len {
            // SAFETY: k < len <= BUF inside buffer i.
            unsafe { write_volatile(b.add(k), frame.get(k).copied().unwrap_or(0)) }
        }
        // cmd: EOP | IFCS | RS
        let d1 = len as u64 | (0x0b << 24);
        // SAFETY: descriptor i of the TX ring.
        unsafe {
            write_volatile(&mut (*tx_ring().add(i))[0], dma(b as u64));
            write_volatile(&mut (*tx_ring().add(i))[1], d1);
        }
        self.tx_next = (i + 1) % N;
        RX_MARK.store(RX_IRQS.load(Ordering::SeqCst), Ordering::SeqCst);
        mmio_write32(reg(TDT), self.tx_next as u32);
        // Flush the posted TDT write (a read is ordered after it), as drivers do
        // (E1000_WRITE_FLUSH): a VMM may post MMIO writes, so the device may not have
        // seen TDT yet when the vCPU resumes.
        mmio_read32(reg(STATUS));
        for _ in 0..1000 {
            // SAFETY: reading the status byte the device writes back.
            let st = unsafe { read_volatile(&(*tx_ring().add(i))[1]) } >> 32;
            if st & 1 != 0 {
                return true;
            }
        }
        false
    }

    /// Wait for a frame (interrupt-driven: the ring is looked at only after an RX
    /// interrupt since the last send) and pass it to `f`; true when `f` accepts it.
    fn receive(&mut self, mut f: impl FnMut(&[u8]) -> bool) -> bool {
        interrupts::disable();
        while RX_IRQS.load(Ordering::SeqCst) == RX_MARK.load(Ordering::SeqCst) {
            wait_for_interrupt();
            interrupts::disable();
        }
        for _ in 0..200 {
            loop {
                let i = self.rx_next;
                // SAFETY: descriptor i of the RX ring, written by the device.
                let d1 = unsafe { read_volatile(&(*rx_ring().add(i))[1]) };
                let status = (d1 >> 32) as u8;
                if status & 1 == 0 {
                    break;
                }
                let len = ((d1 & 0xffff) as usize).min(BUF);
                let mut frame = [0u8; 128];
                let n = len.min(frame.len());
                for (k, x) in frame.iter_mut().enumerate().take(n) {
                    // SAFETY: k < n <= BUF inside buffer i.
                    *x = unsafe { read_volatile(rx_buf(i).add(k)) };
                }
                // SAFETY: give the descriptor back.
                unsafe { write_volatile(&mut (*rx_ring().add(i))[1], 0) };
                mmio_write32(reg(RDT), i as u32);
                self.rx_next = (i + 1) % N;
                if f(&frame[..n]) {
                    return true;
                }
            }
            let before = IRQS.load(Ordering::SeqCst);
            while IRQS.load(Ordering::SeqCst) == before {
                wait_for_interrupt();
            }
            interrupts::disable();
        }
        false
    }
}

fn csum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        s += (c[0] as u32) << 8 | c.get(1).copied().unwrap_or(0) as u32;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn main(ram: u64) -> u32 {
    interrupts::init_idt();
    interrupts::set_irq_handler(on_irq);
    interrupts::init_lapic();
    let Some(dev) = pci::find(0x8086, 0x100e) else {
        println!("e1000 not found");
        return 10;
    };
    pci::enable(dev);
    // SAFETY: single-threaded init before interrupts are enabled.
    unsafe { BAR0 = pci::bar_address(dev, 0) };
    let mut iommu = None;
    if let Some(v) = cmdline_value("smmu") {
        let Some(base) = smmu::parse_u64(v) else {
            return 20;
        };
        let sid = u16::from(dev.dev) << 3 | u16::from(dev.func);
        let mapped = smmu::Smmu::init(base, sid).and_then(|mut s| {
            s.set_invalidate_on_map(cmdline_value("smmu_map") != Some("noinval"));
            s.map(rx_ring() as u64, core::mem::size_of::<Ring>() as u64)?;
            s.map(tx_ring() as u64, core::mem::size_of::<Ring>() as u64)?;
            s.map(rx_buf(0) as u64, core::mem::size_of::<Bufs>() as u64)?;
            s.map(tx_buf(0) as u64, core::mem::size_of::<Bufs>() as u64)?;
            Ok(s)
        });
        match mapped {
            Ok(s) => iommu = Some(s),
            Err(e) => {
                println!("smmu: {}", e);
                return 21;
            }
        }
        // SAFETY: single-threaded, before the NIC is given any address.
        unsafe { IOVA_OFF = smmu::IOVA_BASE };
        println!(
            "smmu: translating sid {:#x} at {:#x}: IOVA = GPA + {:#x}",
            sid,
            base,
            smmu::IOVA_BASE
        );
    }
    mmio_write32(reg(IMC), u32::MAX);
    mmio_write32(reg(CTRL), mmio_read32(reg(CTRL)) | (1 << 26));
    let mut n = 0;
    while mmio_read32(reg(CTRL)) & (1 << 26) != 0 && n < 1000 {
        n += 1;
    }
    mmio_write32(reg(IMC), u32::MAX);
    mmio_read32(reg(ICR));
    mmio_write32(reg(CTRL), mmio_read32(reg(CTRL)) | (1 << 6)); // SLU
    let mut mac = [0u8; 6];
    for w in 0..3 {
        let v = eeprom(w as u32);
        mac[2 * w] = v as u8;
        mac[2 * w + 1] = (v >> 8) as u8;
    }
    println!(
        "e1000 at {:#x}, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        reg(0),
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5]
    );
    for i in 0..128 {
        mmio_write32(reg(MTA + 4 * i), 0);
    }
    let tce = match cmdline_value("tce") {
        None => None,
        Some(mode) => {
            let want = if mode == "4g" { 1u64 << 32 } else { 1u64 << 59 };
            let objs = [
                (rx_ring() as u64, (N * 16) as u64),
                (tx_ring() as u64, (N * 16) as u64),
                (rx_buf(0) as u64, (N * BUF) as u64),
                (tx_buf(0) as u64, (N * BUF) as u64),
            ];
            match tce_setup(ram, want, &objs) {
                Ok(w) => Some(w),
                Err(code) => return code,
            }
        }
    };
    // Rings: all RX descriptors owned by the device.
    for i in 0..N {
        // SAFETY: descriptor i of the RX ring.
        unsafe {
            write_volatile(&mut (*rx_ring().add(i))[0], dma(rx_buf(i) as u64));
            write_volatile(&mut (*rx_ring().add(i))[1], 0);
        }
    }
    let rx = dma(rx_ring() as u64);
    let tx = dma(tx_ring() as u64);
    mmio_write32(reg(RDBAL), rx as u32);
    mmio_write32(reg(RDBAH), (rx >> 32) as u32);
    mmio_write32(reg(RDLEN), (N * 16) as u32);
    mmio_write32(reg(RDH), 0);
    mmio_write32(reg(RDT), (N - 1) as u32);
    mmio_write32(reg(TDBAL), tx as u32);
    mmio_write32(reg(TDBAH), (tx >> 32) as u32);
    mmio_write32(reg(TDLEN), (N * 16) as u32);
    mmio_write32(reg(TDH), 0);
    mmio_write32(reg(TDT), 0);
    mmio_write32(reg(TIPG), 10 | (8 << 10) | (6 << 20));
    mmio_write32(reg(TCTL), (1 << 1) | (1 << 3) | (0x0f << 4) | (0x40 << 12));
    mmio_write32(reg(RCTL), (1 << 1) | (1 << 15) | (1 << 26));
    // Interrupts.
    let use_msi = cmdline_value("irq") == Some("msi");
    if cmdline_value("irq") == Some("xive") {
        let line = pci::read32(dev, 0x3c) & 0xff;
        if !xive::setup(line) {
            return 13;
        }
        println!("interrupts: XIVE source {} -> cpu 0 prio 6", line);
    } else if use_msi {
        // Behind the SMMU the MSI address is an IOVA the SMMU maps to the doorbell.
        let addr = match iommu.as_mut() {
            Some(s) => match s.map_at(smmu::MSI_IOVA, 0xfee0_0000) {
                Ok(()) => smmu::MSI_IOVA,
                Err(e) => {
                    println!("smmu: {}", e);
                    return 21;
                }
            },
            None => 0xfee0_0000,
        };
        if !pci::enable_msi_at(dev, addr, VECTOR) {
            return 11;
        }
        println!("interrupts: MSI vector {:#x}", VECTOR);
        if addr != 0xfee0_0000 {
            println!(
                "msi: address {:#x} is an IOVA mapped to the doorbell 0xfee00000",
                addr
            );
        }
    } else {
        let line = (pci::read32(dev, 0x3c) & 0xff) as u8;
        if line == 0xff || line >= 24 {
            return 12;
        }
        interrupts::ioapic_route(line, VECTOR);
        println!("interrupts: INTx on IOAPIC pin {}", line);
    }
    mmio_write32(reg(IMS), ICR_RXT0);
    let mut nic = Nic {
        tx_next: 0,
        rx_next: 0,
        mac,
    };

    // ARP who-has 10.0.2.2.
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&MY_IP);
    f[38..42].copy_from_slice(&GW_IP);
    let t_arp = nestio_guest::cpu::rdtsc();
    if !nic.send(&f) {
        return 13;
    }
    let mut gw = [0u8; 6];
    let got = nic.receive(|fr| {
        if fr.len() >= 42
            && fr[12..14] == [0x08, 0x06]
            && fr[20..22] == [0, 2]
            && fr[28..32] == GW_IP
        {
            gw.copy_from_slice(&fr[22..28]);
            true
        } else {
            false
        }
    });
    if !got {
        println!("no ARP reply");
        return 14;
    }
    let arp_cycles = nestio_guest::cpu::rdtsc().wrapping_sub(t_arp);
    println!(
        "arp: 10.0.2.2 is at {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} (rtt {} tsc cycles)",
        gw[0],
        gw[1],
        gw[2],
        gw[3],
        gw[4],
        gw[5],
        nestio_guest::fmt::Dec(arp_cycles)
    );

    // ICMP echo requests (`pings=N`, default 1, at most 1000; sequence 1..=N).
    let pings: u16 = cmdline_value("pings")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .clamp(1, 1000);
    for seq in 1..=pings {
        let payload = b"nestio-ping-0001";
        let mut p = [0u8; 14 + 20 + 8 + 16];
        p[0..6].copy_from_slice(&gw);
        p[6..12].copy_from_slice(&nic.mac);
        p[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut p[14..34];
        ip[0] = 0x45;
        let total = (20 + 8 + payload.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[4..6].copy_from_slice(&[0x4e, 0x53]);
        ip[8] = 64;
        ip[9] = 1;
        ip[12..16].copy_from_slice(&MY_IP);
        ip[16..20].copy_from_slice(&GW_IP);
        let c = csum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let icmp = &mut p[34..];
        icmp[0] = 8;
        icmp[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        icmp[6..8].copy_from_slice(&seq.to_be_bytes());
        icmp[8..].copy_from_slice(payload);
        let c = csum(icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let t_ping = nestio_guest::cpu::rdtsc();
        if !nic.send(&p) {
            return 15;
        }
        let got = nic.receive(|fr| {
            fr.len() >= 42 + 16
                && fr[12..14] == [0x08, 0x00]
                && fr[23] == 1
                && fr[26..30] == GW_IP
                && fr[34] == 0
                && fr[38..40] == 0x1234u16.to_be_bytes()
                && fr[40..42] == seq.to_be_bytes()
                && &fr[42..58] == payload
        });
        if !got {
            println!("no echo reply");
            return 16;
        }
        let ping_cycles = nestio_guest::cpu::rdtsc().wrapping_sub(t_ping);
        if seq != 1 && seq != pings {
            continue;
        }
        println!(
            "ping: echo reply from 10.0.2.2 seq={} (rtt {} tsc cycles; {} interrupts, {} with RXT0, causes {:#x})",
            nestio_guest::fmt::Dec(seq.into()),
            nestio_guest::fmt::Dec(ping_cycles),
            nestio_guest::fmt::Dec(IRQS.load(Ordering::SeqCst) as u64),
            nestio_guest::fmt::Dec(RX_IRQS.load(Ordering::SeqCst) as u64),
            CAUSES.load(Ordering::SeqCst)
        );
    }
    if cmdline_value("dma") == Some("outside") {
        return dma_outside(dev, ram, &mut nic, &f);
    }
    if cmdline_value("dma") == Some("unmap") {
        let Some(iommu) = iommu.as_mut() else {
            println!("dma unmap: needs smmu=");
            return 22;
        };
        return dma_unmap(dev, iommu, &mut nic, &f, false);
    }
    if cmdline_value("dma") == Some("readonly") {
        let Some(iommu) = iommu.as_mut() else {
            println!("dma readonly: needs smmu=");
            return 22;
        };
        return dma_unmap(dev, iommu, &mut nic, &f, true);
    }
    if cmdline_value("msi") == Some("unmap") {
        let (Some(iommu), true) = (iommu.as_mut(), use_msi) else {
            println!("msi unmap: needs smmu= and irq=msi");
            return 22;
        };
        let sid = u32::from(dev.dev) << 3 | u32::from(dev.func);
        return msi_unmap(iommu, &mut nic, &f, sid);
    }
    if let (Some((liobn, _)), Some("1")) = (tce, cmdline_value("tce_remove")) {
        return tce_remove(dev, liobn, &mut nic, &f);
    }
    0
}

/// `msi=unmap` (see the module documentation).
fn msi_unmap(iommu: &mut smmu::Smmu, nic: &mut Nic, arp: &[u8], sid: u32) -> u32 {
    while iommu.next_event().is_some() {}
    if let Err(e) = iommu.unmap_page(smmu::MSI_IOVA) {
        println!("msi unmap: {}", e);
        return 26;
    }
    let irqs = IRQS.load(Ordering::SeqCst);
    interrupts::enable();
    // Three ARP exchanges, each a TX and an RX the NIC would interrupt for; the RX
    // ring is polled (interrupts enabled, so a delivered one would be counted).
    let mut frames = 0;
    for _ in 0..3 {
        if !nic.send(arp) {
            return 13;
        }
        for _ in 0..2_000_000 {
            let i = nic.rx_next;
            // SAFETY: descriptor i of the RX ring, written by the device.
            let d1 = unsafe { read_volatile(&(*rx_ring().add(i))[1]) };
            if (d1 >> 32) as u8 & 1 != 0 {
                // SAFETY: give the descriptor back.
                unsafe { write_volatile(&mut (*rx_ring().add(i))[1], 0) };
                mmio_write32(reg(RDT), i as u32);
                nic.rx_next = (i + 1) % N;
                frames += 1;
                break;
            }
        }
    }
    interrupts::disable();
    let delivered = IRQS.load(Ordering::SeqCst) - irqs;
    let pending = mmio_read32(reg(ICR));
    let ev = iommu.next_event();
    let more = iommu.next_event().is_some();
    let Some(ev) = ev else {
        println!("msi unmap: no event recorded");
        return 27;
    };
    println!(
        "msi: doorbell IOVA {:#x} unmapped: event {:#x} sid {:#x} iova {:#x} {}; {} more; {} frames received, {} interrupts delivered, causes {:#x} pending",
        smmu::MSI_IOVA,
        ev.code,
        ev.sid,
        ev.iova,
        if ev.read { "read" } else { "write" },
        more as u32,
        frames,
        delivered,
        pending
    );
    if ev.code != 0x10 || ev.sid != sid || ev.iova != smmu::MSI_IOVA || ev.read || more {
        return 27;
    }
    if delivered != 0 || frames == 0 || pending & ICR_RXT0 == 0 {
        return 28;
    }
    println!("msi: no interrupt through the unmapped doorbell, one F_TRANSLATION event");
    MSI_UNMAPPED_FAULTED
}

/// `tce_remove=1` (see the module documentation).
fn tce_remove(dev: pci::Bdf, liobn: u32, nic: &mut Nic, arp: &[u8]) -> u32 {
    let Ok(remove) = rtas_token("ibm,remove-pe-dma-window") else {
        return TCE_CALL_FAILED;
    };
    clear_master_abort(dev);
    let mut r = RtasArgs::new(remove, &[liobn], 1);
    if r.call() != H_SUCCESS || r.ret(0) != 0 {
        println!("tce: remove-pe-dma-window failed: {:#x}", r.ret(0));
        return TCE_CALL_FAILED;
    }
    println!("tce: window {:#x} removed; sending again", liobn);
    let t = nic.tx_next;
    let sent = nic.send(arp);
    let fault = wait_master_abort(dev);
    // SAFETY: descriptor t of the TX ring.
    let st = unsafe { read_volatile(&(*tx_ring().add(t))[1]) } >> 32;
    if sent || !fault || st & 1 != 0 {
        println!(
            "tce: DMA after remove not refused (sent {}, master abort {}, status {:#x})",
            sent as u32, fault as u32, st
        );
        return 24;
    }
    println!("tce: device faulted after the window was removed (master abort, no write-back)");
    TCE_REMOVED_FAULTED
}

/// PCI status "received master abort", as the device reports it in config space.
fn master_abort(dev: pci::Bdf) -> bool {
    (pci::read32(dev, 4) >> 16) & STATUS_MASTER_ABORT != 0
}

/// Clear "received master abort" (write 1 to clear), keeping the command word.
fn clear_master_abort(dev: pci::Bdf) {
    let cmd = pci::read32(dev, 4) & 0xffff;
    pci::write32(dev, 4, cmd | (STATUS_MASTER_ABORT << 16));
}

/// Poll (bounded) until the device reports a master abort.
fn wait_master_abort(dev: pci::Bdf) -> bool {
    for _ in 0..2000 {
        if master_abort(dev) {
            return true;
        }
    }
    false
}

/// The `dma=outside` isolation check (see the module documentation).
fn dma_outside(dev: pci::Bdf, ram: u64, nic: &mut Nic, arp: &[u8]) -> u32 {
    let outside = ram + (1 << 20);
    println!("dma outside: target gpa {:#x} (ram {:#x})", outside, ram);
    clear_master_abort(dev);
    if master_abort(dev) {
        println!("dma outside: master abort does not clear");
        return 19;
    }
    // RX: the device fills descriptor rx_next for the next frame; its buffer is now
    // outside RAM. The gateway's answer to another ARP request is that frame.
    let i = nic.rx_next;
    // SAFETY: descriptor i of the RX ring.
    unsafe {
        write_volatile(&mut (*rx_ring().add(i))[0], outside);
        write_volatile(&mut (*rx_ring().add(i))[1], 0);
    }
    if !nic.send(arp) {
        return 13;
    }
    let rx_fault = wait_master_abort(dev);
    // SAFETY: descriptor i of the RX ring (the device would have written DD there).
    let rx_status = unsafe { read_volatile(&(*rx_ring().add(i))[1]) } >> 32;
    if !rx_fault || rx_status & 1 != 0 {
        println!(
            "dma outside: RX DMA not refused (status {:#x}, master abort {:#x})",
            rx_status, rx_fault as u32
        );
        return 17;
    }
    println!("dma outside: RX fault: master abort, descriptor not written back");
    clear_master_abort(dev);
    // TX: a descriptor whose buffer lies outside RAM (the device must read it).
    let t = nic.tx_next;
    // SAFETY: descriptor t of the TX ring.
    unsafe {
        write_volatile(&mut (*tx_ring().add(t))[0], outside);
        write_volatile(&mut (*tx_ring().add(t))[1], 60 | (0x0b << 24));
    }
    nic.tx_next = (t + 1) % N;
    mmio_write32(reg(TDT), nic.tx_next as u32);
    let tx_fault = wait_master_abort(dev);
    // SAFETY: descriptor t of the TX ring.
    let tx_status = unsafe { read_volatile(&(*tx_ring().add(t))[1]) } >> 32;
    if !tx_fault || tx_status & 1 != 0 {
        println!(
            "dma outside: TX DMA not refused (status {:#x}, master abort {:#x})",
            tx_status, tx_fault as u32
        );
        return 18;
    }
    println!("dma outside: TX fault: master abort, descriptor not written back");
    DMA_OUTSIDE_REFUSED
}

/// The `dma=unmap` check, or with `readonly` the `dma=readonly` one (the page stays
/// mapped, read-only: a permission fault). See the module documentation.
fn dma_unmap(
    dev: pci::Bdf,
    iommu: &mut smmu::Smmu,
    nic: &mut Nic,
    arp: &[u8],
    readonly: bool,
) -> u32 {
    let i = nic.rx_next;
    let buf = rx_buf(i);
    for k in 0..BUF {
        // SAFETY: k < BUF inside buffer i.
        unsafe { write_volatile(buf.add(k), 0xa5) }
    }
    let iova = dma(buf as u64);
    let r = if readonly {
        iommu.protect_page(iova)
    } else {
        iommu.unmap_page(iova)
    };
    if let Err(e) = r {
        println!("dma unmap: {}", e);
        return 23;
    }
    println!(
        "dma unmap: iova {:#x} (rx buffer {}) {} under the live ring",
        iova,
        i,
        if readonly {
            "made read-only"
        } else {
            "unmapped"
        }
    );
    clear_master_abort(dev);
    if !nic.send(arp) {
        return 13;
    }
    let fault = wait_master_abort(dev);
    // SAFETY: descriptor i of the RX ring.
    let status = unsafe { read_volatile(&(*rx_ring().add(i))[1]) } >> 32;
    let mut touched = 0;
    for k in 0..BUF {
        // SAFETY: k < BUF inside buffer i.
        if unsafe { read_volatile(buf.add(k)) } != 0xa5 {
            touched += 1;
        }
    }
    // A device that walks stage 1 itself (nested vIOMMU) reports its fault through
    // the VMM a little later: wait (bounded) for the first record.
    let mut first = None;
    for _ in 0..20_000 {
        first = iommu.next_event();
        if first.is_some() {
            break;
        }
    }
    while let Some(e) = first.take().or_else(|| iommu.next_event()) {
        println!(
            "dma unmap: event {:#x} sid {:#x} iova {:#x} read {}",
            e.code as u32, e.sid, e.iova, e.read as u32
        );
    }
    if !fault || status & 1 != 0 || touched != 0 {
        println!(
            "dma unmap: RX DMA not refused (master abort {}, status {:#x}, {} bytes touched)",
            fault as u32, status, touched
        );
        return 24;
    }
    println!("dma unmap: RX fault: master abort, descriptor not written back, buffer untouched");
    DMA_UNMAP_REFUSED
}
