//! Drives the VMM test device (1234:11e9) as a guest driver would: BAR sizing,
//! register access, the hardware-defined answers for unassigned MMIO and for offsets
//! beyond a BAR's region, an mmapped BAR page, an ioeventfd, and MSI interrupts taken
//! through the IDT and local APIC (not polled), ECAM, and a BAR moved by the guest.
//! Exit 0 = every check passed.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use nestio_guest::io::{mmio_read32, mmio_write32, wait_for_interrupt};
use nestio_guest::{interrupts, pci, println};

nestio_guest::entry!(main);

static IRQS: AtomicU32 = AtomicU32::new(0);

fn on_irq(v: u8) {
    if v == 0x30 {
        IRQS.fetch_add(1, Ordering::SeqCst);
    }
}

fn main(_ram: u64) -> u32 {
    interrupts::init_idt();
    interrupts::set_irq_handler(on_irq);
    interrupts::init_lapic();
    let Some(dev) = pci::find(0x1234, 0x11e9) else {
        println!("test device not found");
        return 10;
    };
    let (s0, s2) = (pci::bar_size(dev, 0), pci::bar_size(dev, 2));
    println!("bar0 size {:#x} bar2 size {:#x}", s0, s2);
    if s0 != 0x1000 || s2 != 0x2000 {
        return 11;
    }
    pci::enable(dev);
    let (b0, b2) = (pci::bar_address(dev, 0), pci::bar_address(dev, 2));
    println!("bar0 {:#x} bar2 {:#x}", b0, b2);
    if mmio_read32(b0 + 4) != u32::from_le_bytes(*b"nest") {
        return 12;
    }
    mmio_write32(b0, 0xcafe_f00d);
    if mmio_read32(b0) != 0xcafe_f00d {
        return 13;
    }
    // Inside the BAR but past the 2 KiB region; past the BAR; nowhere at all.
    let beyond_region = mmio_read32(b0 + 0xffc);
    let beyond_bar = mmio_read32(b0 + 0x1000);
    let unassigned = mmio_read32(0xd000_0000);
    mmio_write32(0xd000_0000, 1);
    println!(
        "beyond region {:#x} beyond bar {:#x} unassigned {:#x}",
        beyond_region, beyond_bar, unassigned
    );
    if beyond_region != u32::MAX || beyond_bar != u32::MAX || unassigned != u32::MAX {
        return 14;
    }
    // BAR2: page 0 is mapped into the guest (no exit), page 1 exits to the device.
    mmio_write32(b2, 0x1234_5678);
    if mmio_read32(b2) != 0x1234_5678 || mmio_read32(b2 + 0x1000) != 0x5a5a_5a5a {
        return 15;
    }
    // Three writes to the ioeventfd register.
    for i in 0..3 {
        mmio_write32(b0 + 0x10, i);
    }
    // ECAM sees the same function; empty slots and other functions read all-ones.
    let ecam = 0xe000_0000u64;
    if mmio_read32(ecam + ((dev.dev as u64) << 15)) != 0x11e9_1234
        || mmio_read32(ecam + (31 << 15)) != u32::MAX
        || pci::read32(
            pci::Bdf {
                dev: dev.dev,
                func: 1,
            },
            0,
        ) != u32::MAX
    {
        return 18;
    }
    // The guest moves BAR0: the old address goes dark, the new one answers.
    let cmd = pci::read32(dev, 4);
    pci::write32(dev, 4, cmd & !2);
    pci::write32(dev, 0x10, 0xc010_0000);
    pci::write32(dev, 4, cmd);
    if mmio_read32(0xc010_0004) != u32::from_le_bytes(*b"nest") || mmio_read32(b0 + 4) != u32::MAX {
        return 19;
    }
    let b0 = 0xc010_0000u64;
    // MSI: the doorbell makes the device signal its MSI eventfd (-> irqfd -> APIC).
    if !pci::enable_msi(dev, 0x30) {
        return 16;
    }
    for n in 1..=3u32 {
        mmio_write32(b0 + 8, 1);
        let mut spins = 0;
        while IRQS.load(Ordering::SeqCst) < n {
            wait_for_interrupt();
            spins += 1;
            if spins > 1000 {
                println!("no MSI after doorbell {:#x}", n);
                return 17;
            }
        }
        interrupts::disable();
    }
    println!(
        "msi interrupts taken: {}",
        nestio_guest::fmt::Dec(IRQS.load(Ordering::SeqCst) as u64)
    );
    0
}
