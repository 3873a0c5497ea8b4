//! Guest driver for the nestio sample device (1b36:7e57), wherever it runs (in the VMM
//! process or in another one over vfio-user). Command line `mode=`:
//! - `check` (default): ID and scratch registers, MSI interrupts (INT_SET soft cause)
//!   taken through the IDT/APIC, a DMA fill into guest RAM checked by the guest;
//! - `spin`: set up, print "spinning", then read registers forever (MMIO exits);
//! - `msix`: MSI-X instead of MSI: table programming, an interrupt, a masked vector left
//!   pending (PBA bit set, no interrupt) and delivered at unmask;
//! - `halt`: set up, print "waiting", then wait for an interrupt that never comes;
//! - `migrate`: keep the DMA engine busy and check memory while the VM may be migrated
//!   (`rounds=N`, default 1000): each round fills a 64 KiB block of region A by DMA with
//!   a pattern of the round, copies it by DMA to the same block of region B, has the
//!   device checksum B's block (Adler-32) into a table, writes a counter into a page of
//!   region C and a table, raises an MSI and waits for it, and re-checks one earlier
//!   block of A and B and one C page against the tables. At the end every block and page
//!   is checked again. Prints `round N` every 100 rounds, `migtest verified ...` at the
//!   end (exit 0), or `MISMATCH ...` (exit 40+);
//! - `bench`: MMIO round trips and interrupt delivery, timed with the TSC, for every
//!   sample device present; prints `bench dev=N read=C write=C irq=C` (cycles/op).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nestio_guest::cpu::rdtsc;
use nestio_guest::fmt::Dec;
use nestio_guest::io::{mmio_read32, mmio_write32, wait_for_interrupt};
use nestio_guest::{cmdline_value, interrupts, pci, println};

nestio_guest::entry!(main);

const ID: u64 = 0x00;
const SCRATCH: u64 = 0x08;
const INT_STATUS: u64 = 0x10;
const INT_MASK: u64 = 0x14;
const INT_SET: u64 = 0x18;
const DMA_DST_LO: u64 = 0x28;
const DMA_DST_HI: u64 = 0x2c;
const DMA_LEN: u64 = 0x30;
const DMA_CMD: u64 = 0x34;
const DMA_STATUS: u64 = 0x38;
const DMA_PATTERN: u64 = 0x3c;
const SOFT: u32 = 1 << 2;
const VECTOR: u8 = 0x30;
const MSIX_VECTOR: u8 = 0x33;

static IRQS: AtomicU32 = AtomicU32::new(0);
static IRQ_TSC: AtomicU64 = AtomicU64::new(0);
static BAR0: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(4096))]
struct Page([u8; 4096]);
static mut DMA_BUF: Page = Page([0; 4096]);

fn on_irq(v: u8) {
    if v == VECTOR || v == MSIX_VECTOR {
        IRQ_TSC.store(rdtsc(), Ordering::SeqCst);
        let b = BAR0.load(Ordering::SeqCst);
        let st = mmio_read32(b + INT_STATUS);
        mmio_write32(b + INT_STATUS, st);
        IRQS.fetch_add(1, Ordering::SeqCst);
    }
}

fn setup(dev: pci::Bdf) -> u64 {
    pci::enable(dev);
    let b0 = pci::bar_address(dev, 0);
    pci::enable_msi(dev, VECTOR);
    mmio_write32(b0 + INT_MASK, 0);
    b0
}

fn wait_irq(n: u32) -> bool {
    let mut spins = 0;
    while IRQS.load(Ordering::SeqCst) < n {
        wait_for_interrupt();
        spins += 1;
        if spins > 1000 {
            return false;
        }
    }
    interrupts::disable();
    true
}

fn main(_ram: u64) -> u32 {
    interrupts::init_idt();
    interrupts::set_irq_handler(on_irq);
    interrupts::init_lapic();
    let mode = cmdline_value("mode").unwrap_or("check");
    let Some(dev) = pci::find(0x1b36, 0x7e57) else {
        println!("sample device not found");
        return 10;
    };
    match mode {
        "bench" => return bench(),
        "spin" => {
            let b0 = setup(dev);
            println!("spinning");
            loop {
                mmio_read32(b0 + SCRATCH);
            }
        }
        "msix" => return msix(dev),
        "migrate" => return migrate(dev),
        "halt" => {
            setup(dev);
            println!("waiting");
            loop {
                wait_for_interrupt();
            }
        }
        _ => {}
    }
    let b0 = setup(dev);
    BAR0.store(b0, Ordering::SeqCst);
    if mmio_read32(b0 + ID) != 0x6e65_7374 {
        return 11;
    }
    mmio_write32(b0 + SCRATCH, 0x5eed_1234);
    if mmio_read32(b0 + SCRATCH) != 0x5eed_1234 {
        return 12;
    }
    for n in 1..=3 {
        mmio_write32(b0 + INT_SET, SOFT);
        if !wait_irq(n) {
            println!("no MSI after INT_SET {:#x}", n);
            return 13;
        }
    }
    println!(
        "sample msi interrupts: {}",
        Dec(IRQS.load(Ordering::SeqCst) as u64)
    );
    // Per-vector masking: a masked vector stays pending and arrives at unmask.
    let cap = pci::find_capability(dev, 0x05).unwrap_or(0);
    if cap != 0 && pci::read32(dev, cap) & (1 << 24) != 0 {
        pci::write32(dev, cap + 0x10, 1);
        mmio_write32(b0 + INT_SET, SOFT);
        for _ in 0..20 {
            mmio_read32(b0 + SCRATCH);
        }
        if IRQS.load(Ordering::SeqCst) != 3 {
            println!("masked MSI vector was delivered");
            return 15;
        }
        pci::write32(dev, cap + 0x10, 0);
        if !wait_irq(4) {
            println!("masked MSI not delivered at unmask");
            return 16;
        }
        println!("msi mask: held while masked, delivered at unmask");
    }
    // The device fills our buffer by DMA (through the guest RAM it mapped by fd).
    let buf = core::ptr::addr_of_mut!(DMA_BUF) as u64;
    mmio_write32(b0 + DMA_DST_LO, buf as u32);
    mmio_write32(b0 + DMA_DST_HI, (buf >> 32) as u32);
    mmio_write32(b0 + DMA_LEN, 4096);
    mmio_write32(b0 + DMA_PATTERN, 0xa5a5_5a5a);
    mmio_write32(b0 + DMA_CMD, 2);
    let st = mmio_read32(b0 + DMA_STATUS);
    // SAFETY: the buffer is ours; the device wrote it before DMA_CMD completed.
    let (first, last) = unsafe {
        (
            core::ptr::read_volatile(buf as *const u32),
            core::ptr::read_volatile((buf + 4092) as *const u32),
        )
    };
    println!("dma status {:#x} first {:#x} last {:#x}", st, first, last);
    if st & 2 == 0 || first != 0xa5a5_5a5a || last != 0xa5a5_5a5a {
        return 14;
    }
    0
}

fn bench() -> u32 {
    const N: u64 = 200;
    let mut n = 0;
    while let Some(dev) = pci::find_nth(0x1b36, 0x7e57, n) {
        let b0 = setup(dev);
        BAR0.store(b0, Ordering::SeqCst);
        let t0 = rdtsc();
        for _ in 0..N {
            mmio_read32(b0 + SCRATCH);
        }
        let read = (rdtsc() - t0) / N;
        let t0 = rdtsc();
        for i in 0..N {
            mmio_write32(b0 + SCRATCH, i as u32);
        }
        let write = (rdtsc() - t0) / N;
        // Interrupt: INT_SET write -> device signals its MSI eventfd -> irqfd -> handler.
        let mut irq = 0;
        let rounds = 20u32;
        let base = IRQS.load(Ordering::SeqCst);
        for r in 1..=rounds {
            let t0 = rdtsc();
            mmio_write32(b0 + INT_SET, SOFT);
            if !wait_irq(base + r) {
                return 13;
            }
            irq += IRQ_TSC.load(Ordering::SeqCst) - t0;
        }
        println!(
            "bench dev={} read={} write={} irq={}",
            Dec(n as u64),
            Dec(read),
            Dec(write),
            Dec(irq / rounds as u64)
        );
        n += 1;
    }
    if n == 0 {
        return 10;
    }
    0
}

fn msix(dev: pci::Bdf) -> u32 {
    pci::enable(dev);
    let b0 = pci::bar_address(dev, 0);
    BAR0.store(b0, Ordering::SeqCst);
    let Some(cap) = pci::find_capability(dev, 0x11) else {
        return 20;
    };
    let t = pci::read32(dev, cap + 4);
    let p = pci::read32(dev, cap + 8);
    let table = pci::bar_address(dev, (t & 7) as u8) + (t & !7) as u64;
    let pba = pci::bar_address(dev, (p & 7) as u8) + (p & !7) as u64;
    // Entries 0 and 1 -> APIC 0; the soft cause uses vector 1.
    for (e, vec) in [(0u64, 0x32u32), (1, MSIX_VECTOR as u32)] {
        let a = table + 16 * e;
        mmio_write32(a, 0xfee0_0000);
        mmio_write32(a + 4, 0);
        mmio_write32(a + 8, vec);
        mmio_write32(a + 12, 0);
    }
    let ctrl = pci::read32(dev, cap);
    pci::write32(dev, cap, ctrl | (0x8000 << 16));
    mmio_write32(b0 + INT_MASK, 0);
    mmio_write32(b0 + INT_SET, SOFT);
    if !wait_irq(1) {
        println!("no MSI-X interrupt");
        return 21;
    }
    // Mask vector 1: the interrupt stays pending.
    mmio_write32(table + 16 + 12, 1);
    mmio_write32(b0 + INT_SET, SOFT);
    for _ in 0..20 {
        mmio_read32(b0 + SCRATCH);
    }
    let pending = mmio_read32(pba);
    if IRQS.load(Ordering::SeqCst) != 1 || pending & 2 == 0 {
        println!(
            "masked vector: irqs {:#x} pba {:#x}",
            IRQS.load(Ordering::SeqCst),
            pending
        );
        return 22;
    }
    mmio_write32(table + 16 + 12, 0);
    if !wait_irq(2) {
        println!("pending MSI-X not delivered at unmask");
        return 23;
    }
    println!(
        "msix: delivered, masked-pending (pba {:#x}), delivered at unmask",
        pending
    );
    0
}

const DMA_SRC_LO: u64 = 0x20;
const DMA_SRC_HI: u64 = 0x24;
const DMA_RESULT: u64 = 0x40;
/// Blocks of 64 KiB in regions A and B; pages in region C.
const BLOCKS: usize = 32;
const BLOCK: u64 = 64 * 1024;
const REGION_A: u64 = 32 << 20;
const REGION_B: u64 = REGION_A + BLOCKS as u64 * BLOCK;
const REGION_C: u64 = REGION_B + BLOCKS as u64 * BLOCK;
const C_PAGES: usize = 64;

static mut SUM_A: [u32; BLOCKS] = [0; BLOCKS];
static mut SUM_B: [u32; BLOCKS] = [0; BLOCKS];
static mut C_TABLE: [u64; C_PAGES] = [0; C_PAGES];

fn dma(b0: u64, cmd: u32, src: u64, dst: u64, len: u32, pattern: u32) -> u32 {
    mmio_write32(b0 + DMA_SRC_LO, src as u32);
    mmio_write32(b0 + DMA_SRC_HI, (src >> 32) as u32);
    mmio_write32(b0 + DMA_DST_LO, dst as u32);
    mmio_write32(b0 + DMA_DST_HI, (dst >> 32) as u32);
    mmio_write32(b0 + DMA_LEN, len);
    mmio_write32(b0 + DMA_PATTERN, pattern);
    mmio_write32(b0 + DMA_CMD, cmd);
    mmio_read32(b0 + DMA_STATUS)
}

fn checksum(b0: u64, addr: u64) -> Option<u32> {
    let st = dma(b0, 3, addr, 0, BLOCK as u32, 0);
    (st & 2 != 0).then(|| mmio_read32(b0 + DMA_RESULT))
}

fn check_block(b0: u64, i: usize) -> u32 {
    // SAFETY: the tables are only touched by this single-threaded guest.
    let (a, b) = unsafe { (SUM_A[i], SUM_B[i]) };
    if a == 0 {
        return 0;
    }
    let ga = checksum(b0, REGION_A + i as u64 * BLOCK);
    let gb = checksum(b0, REGION_B + i as u64 * BLOCK);
    if ga != Some(a) || gb != Some(b) {
        println!(
            "MISMATCH block {}: A {:#x} (want {:#x}) B {:#x} (want {:#x})",
            Dec(i as u64),
            ga.unwrap_or(0),
            a,
            gb.unwrap_or(0),
            b
        );
        return 41;
    }
    0
}

fn check_page(k: usize) -> u32 {
    // SAFETY: region C is ours (identity-mapped RAM above the payload); the table is
    // only touched by this guest.
    let (got, want) = unsafe {
        (
            core::ptr::read_volatile((REGION_C + k as u64 * 4096) as *const u64),
            core::ptr::read_volatile(core::ptr::addr_of!(C_TABLE[k])),
        )
    };
    if got != want {
        println!(
            "MISMATCH page {}: {:#x} want {:#x}",
            Dec(k as u64),
            got,
            want
        );
        return 42;
    }
    0
}

fn migrate(dev: pci::Bdf) -> u32 {
    let b0 = setup(dev);
    BAR0.store(b0, Ordering::SeqCst);
    let rounds: u64 = cmdline_value("rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    println!("migtest start");
    for r in 1..=rounds {
        let i = (r as usize) % BLOCKS;
        let a = REGION_A + i as u64 * BLOCK;
        let b = REGION_B + i as u64 * BLOCK;
        let pattern = (r as u32).wrapping_mul(0x9e37_79b9) | 1;
        if dma(b0, 2, 0, a, BLOCK as u32, pattern) & 2 == 0
            || dma(b0, 1, a, b, BLOCK as u32, 0) & 2 == 0
        {
            println!("MISMATCH dma failed in round {}", Dec(r));
            return 40;
        }
        let (Some(sa), Some(sb)) = (checksum(b0, a), checksum(b0, b)) else {
            return 40;
        };
        if sa != sb {
            println!("MISMATCH copy in round {}", Dec(r));
            return 43;
        }
        // SAFETY: single-threaded guest; region C is identity-mapped RAM.
        unsafe {
            SUM_A[i] = sa;
            SUM_B[i] = sb;
            let k = (r as usize * 7) % C_PAGES;
            core::ptr::write_volatile((REGION_C + k as u64 * 4096) as *mut u64, r);
            core::ptr::write_volatile(core::ptr::addr_of_mut!(C_TABLE[k]), r);
        }
        let n = IRQS.load(Ordering::SeqCst);
        mmio_write32(b0 + INT_SET, SOFT);
        if !wait_irq(n + 1) {
            println!("MISMATCH no MSI in round {}", Dec(r));
            return 44;
        }
        let e =
            check_block(b0, (r as usize * 13) % BLOCKS) | check_page((r as usize * 5) % C_PAGES);
        if e != 0 {
            return e;
        }
        if r % 100 == 0 {
            println!("round {}", Dec(r));
        }
    }
    for i in 0..BLOCKS {
        let e = check_block(b0, i);
        if e != 0 {
            return e;
        }
    }
    for k in 0..C_PAGES {
        let e = check_page(k);
        if e != 0 {
            return e;
        }
    }
    println!(
        "migtest verified {} blocks, {} pages, {} interrupts",
        Dec(BLOCKS as u64),
        Dec(C_PAGES as u64),
        Dec(IRQS.load(Ordering::SeqCst) as u64)
    );
    0
}
