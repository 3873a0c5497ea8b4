//! XIVE exploitation from an x86 guest on 2 vCPUs (`--irqchip xive`).
//!
//! The boot vCPU starts the application processor (INIT/SIPI, a real-mode trampoline
//! as in `smptest`), then, with the `H_INT_*` hypercalls:
//! 1. checks `H_INT_GET_SOURCE_INFO` of IPI 0 (flags 0, EOI page = trigger page +
//!    4 KiB, shift 12) and a refused priority 7 (`H_P4`);
//! 2. configures a 4 KiB event queue at priority 6 for each vCPU
//!    (`H_INT_SET_QUEUE_CONFIG` with ALWAYS_NOTIFY) and reads it back;
//! 3. routes IPI `i` to vCPU `i` with EISN `i` and opens its ESB (PQ=00 by a load at
//!    0xC00 of the management page), then plays `rounds=N` (default 8) rounds of IPI
//!    ping-pong: vCPU 0 stores to IPI 1's trigger page, vCPU 1's handler answers on
//!    IPI 0's;
//! 4. routes the e1000's INTx source (its interrupt-line register holds the XIVE
//!    source number) to vCPU 0 and then to vCPU 1 with EISN 0x1000 + source, and raises
//!    a device interrupt each time through the e1000's ICS register (TXDW cause).
//!
//! Every notification arrives as x86 vector 0x3E on the target vCPU; the handler
//! acknowledges through its own TIMA OS page (2-byte load at 0x810: NSR must have the
//! EO bit, CPPR becomes 6), drains its queue with the generation-bit protocol (the
//! e1000's ICR read lowers the line), EOIs each source with an 8-byte load at offset 0
//! of its management page, and restores CPPR 0xFF with a 1-byte store at 0x11.
//!
//! `cede=1`: the second vCPU does not halt between interrupts but cedes with
//! `H_CEDE` (interrupts off around the call, on right after it, as a PAPR guest
//! does): the VMM takes its VP off its thread, and an IPI for it must wake it through
//! the queue's escalation. Prints `xive: cedes=N` (calls made by the second vCPU).
//!
//! Prints `xive: ipi rounds N ok`, `xive: e1000 irq on cpu K` and
//! `xive: done cpu0=A cpu1=B`; exits 0 when all checks passed, else the step number.
//!
//! `bench=N` (one vCPU is enough) measures instead the device-interrupt latency: N
//! times, write the e1000's ICS and halt until the handler has run, timing with the
//! TSC from the ICS write to the handler's entry; `chip=x86` takes the interrupt
//! through KVM's IOAPIC (the INTx pin in the interrupt-line register, vector 0x31)
//! instead of the XIVE. Prints `bench: chip=C n=N median_cycles=A min_cycles=M` (N at most 1000).
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nestio_guest::fmt::Dec;
use nestio_guest::hcall::hcall;
use nestio_guest::{cmdline_value, interrupts, io, pci, println};

nestio_guest::entry!(main);

const XIVE_VECTOR: u8 = 0x3e;
const ESB_BASE: u64 = 0xef00_0000;
const TIMA_BASE: u64 = 0xefc0_0000;
const TIMA_STRIDE: u64 = 0x4000;
const TIMA_OS_PAGE: u64 = 0x2000;

const H_INT_GET_SOURCE_INFO: u64 = 0x3A8;
const H_INT_SET_SOURCE_CONFIG: u64 = 0x3AC;
const H_INT_GET_SOURCE_CONFIG: u64 = 0x3B0;
const H_INT_SET_QUEUE_CONFIG: u64 = 0x3B8;
const H_INT_GET_QUEUE_CONFIG: u64 = 0x3BC;
const H_CEDE: u64 = 0xE0;
const H_P4: i64 = -57;
const SRC_SET_EISN: u64 = 2;
const EQ_ALWAYS_NOTIFY: u64 = 1;
const PRIO: u64 = 6;

const LAPIC: u64 = 0xfee0_0000;
const E1000_ICR: u64 = 0xc0;
const E1000_ICS: u64 = 0xc8;
const E1000_IMS: u64 = 0xd0;
const E1000_IMC: u64 = 0xd8;
const DEVICE_EISN: u32 = 0x1000;

#[repr(C, align(4096))]
struct Queue([u32; 1024]);

static mut QUEUES: [Queue; 2] = [Queue([0; 1024]), Queue([0; 1024])];
static TOGGLE: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(0)];
static INDEX: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(0)];
/// Per vCPU: IPIs taken, device interrupts taken, notifications without EO.
static IPIS: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(0)];
static DEVICE: [AtomicU32; 2] = [AtomicU32::new(0), AtomicU32::new(0)];
static SPURIOUS: AtomicU32 = AtomicU32::new(0);
static BAD_ACK: AtomicU32 = AtomicU32::new(0);
static ARRIVED: AtomicU32 = AtomicU32::new(0);
/// `cede=1`: the second vCPU cedes instead of halting; H_CEDE calls it made.
static CEDE: AtomicU32 = AtomicU32::new(0);
static CEDES: AtomicU32 = AtomicU32::new(0);
static BAR0: AtomicU64 = AtomicU64::new(0);
static DEVICE_LISN: AtomicU32 = AtomicU32::new(u32::MAX);
/// TSC at the handler's entry (bench).
static ENTRY_TSC: AtomicU64 = AtomicU64::new(0);
const X86_VECTOR: u8 = 0x31;

fn apic_id() -> usize {
    (io::mmio_read32(LAPIC + 0x20) >> 24) as usize & 1
}

fn tima_os(cpu: usize) -> u64 {
    TIMA_BASE + cpu as u64 * TIMA_STRIDE + TIMA_OS_PAGE
}

fn trigger_page(lisn: u32) -> u64 {
    ESB_BASE + u64::from(lisn) * 0x2000
}

fn mgmt_page(lisn: u32) -> u64 {
    trigger_page(lisn) + 0x1000
}

fn esb_load(lisn: u32, off: u64) -> u64 {
    u64::from_be(io::mmio_read64(mgmt_page(lisn) + off))
}

fn set_cppr(cpu: usize, cppr: u8) {
    // SAFETY: a 1-byte store to this vCPU's TIMA OS page (MMIO, identity-mapped).
    unsafe { write_volatile((tima_os(cpu) + 0x11) as *mut u8, cppr) }
}

fn queue_entry(cpu: usize, idx: u32) -> u32 {
    // SAFETY: reads entry `idx` (< 1024) of this vCPU's queue, which the VMM writes
    // concurrently: volatile, read once.
    u32::from_be(unsafe { read_volatile(addr_of!(QUEUES[cpu].0[idx as usize & 1023])) })
}

/// One event from the queue of `cpu`.
fn handle(cpu: usize, data: u32) {
    if data == DEVICE_EISN + DEVICE_LISN.load(Ordering::SeqCst) {
        // Reading ICR clears the causes and lowers INTx.
        io::mmio_read32(BAR0.load(Ordering::SeqCst) + E1000_ICR);
        DEVICE[cpu].fetch_add(1, Ordering::SeqCst);
        esb_load(data - DEVICE_EISN, 0);
    } else if data < 2 {
        IPIS[cpu].fetch_add(1, Ordering::SeqCst);
        esb_load(data, 0);
        if cpu == 1 {
            // Answer the ping on IPI 0.
            io::mmio_write64(trigger_page(0), 0);
        }
    }
}

fn on_irq(v: u8) {
    ENTRY_TSC.store(nestio_guest::cpu::rdtsc(), Ordering::SeqCst);
    if v == X86_VECTOR {
        io::mmio_read32(BAR0.load(Ordering::SeqCst) + E1000_ICR);
        DEVICE[0].fetch_add(1, Ordering::SeqCst);
        return;
    }
    if v != XIVE_VECTOR {
        return;
    }
    let cpu = apic_id();
    // SAFETY: the 2-byte acknowledge load of this vCPU's TIMA OS page.
    let ack = u16::from_be(unsafe { read_volatile((tima_os(cpu) + 0x810) as *const u16) });
    if ack >> 8 & 0x80 == 0 {
        SPURIOUS.fetch_add(1, Ordering::SeqCst);
        return;
    }
    if ack & 0xff != PRIO as u16 {
        BAD_ACK.fetch_add(1, Ordering::SeqCst);
    }
    let (mut toggle, mut idx) = (
        TOGGLE[cpu].load(Ordering::SeqCst),
        INDEX[cpu].load(Ordering::SeqCst),
    );
    loop {
        let e = queue_entry(cpu, idx);
        if e >> 31 == toggle {
            break;
        }
        idx = (idx + 1) % 1024;
        if idx == 0 {
            toggle ^= 1;
        }
        handle(cpu, e & 0x7fff_ffff);
    }
    TOGGLE[cpu].store(toggle, Ordering::SeqCst);
    INDEX[cpu].store(idx, Ordering::SeqCst);
    set_cppr(cpu, 0xff);
}

extern "C" fn ap_main(_apic_id: u32) -> ! {
    // The boot vCPU filled the shared IDT before starting this one; init_idt writes the
    // same entries again and loads the IDT register of this vCPU.
    interrupts::init_idt();
    interrupts::init_lapic();
    set_cppr(1, 0xff);
    ARRIVED.fetch_add(1, Ordering::SeqCst);
    loop {
        if CEDE.load(Ordering::SeqCst) == 1 {
            // PAPR's idle loop: interrupts off, cede, then take what woke us.
            interrupts::disable();
            hcall(H_CEDE, &[]);
            CEDES.fetch_add(1, Ordering::SeqCst);
            // Woken with an exception signalled (NSR.EO in a raw TIMA load of the OS
            // ring's first word): the vector is on its way, halt until it is taken
            // (sti; hlt has no window); otherwise just open a window and cede again.
            // SAFETY: a 4-byte load of this vCPU's TIMA OS page.
            let w0 = u32::from_be(unsafe { read_volatile((tima_os(1) + 0x10) as *const u32) });
            if w0 >> 24 & 0x80 != 0 {
                io::wait_for_interrupt();
            } else {
                interrupts::enable();
                core::hint::spin_loop();
            }
        } else {
            io::wait_for_interrupt();
        }
    }
}

fn wait_until(what: impl Fn() -> bool) -> bool {
    for _ in 0..200_000 {
        if what() {
            return true;
        }
        interrupts::enable();
        core::hint::spin_loop();
    }
    what()
}

fn start_ap() -> bool {
    nestio_guest::smp::start_aps(ap_main);
    wait_until(|| ARRIVED.load(Ordering::SeqCst) == 1)
}

fn route(lisn: u32, cpu: u64, eisn: u32) -> bool {
    let r = hcall(
        H_INT_SET_SOURCE_CONFIG,
        &[SRC_SET_EISN, lisn.into(), cpu, PRIO, eisn.into()],
    );
    let g = hcall(H_INT_GET_SOURCE_CONFIG, &[0, lisn.into()]);
    r.status == 0 && g.status == 0 && g.rets[..3] == [cpu, PRIO, eisn.into()]
}

/// Most samples of the `bench=N` mode.
const SAMPLES: usize = 1000;

/// The `bench=N` mode (see the module documentation).
fn bench(n: u32, x86: bool) -> u32 {
    let Some(dev) = pci::find(0x8086, 0x100e) else {
        return 20;
    };
    pci::enable(dev);
    BAR0.store(pci::bar_address(dev, 0), Ordering::SeqCst);
    let bar = BAR0.load(Ordering::SeqCst);
    io::mmio_write32(bar + E1000_IMC, u32::MAX);
    io::mmio_read32(bar + E1000_ICR);
    let line = pci::read32(dev, 0x3c) & 0xff;
    DEVICE_LISN.store(line, Ordering::SeqCst);
    if x86 {
        interrupts::ioapic_route(line as u8, X86_VECTOR);
    } else {
        // SAFETY: only the address of the static queue is taken.
        let q = unsafe { addr_of_mut!(QUEUES[0]) } as u64;
        if hcall(H_INT_SET_QUEUE_CONFIG, &[EQ_ALWAYS_NOTIFY, 0, PRIO, q, 12]).status != 0
            || !route(line, 0, DEVICE_EISN + line)
            || esb_load(line, 0xc00) != 1
        {
            return 21;
        }
        set_cppr(0, 0xff);
    }
    io::mmio_write32(bar + E1000_IMS, 1);
    interrupts::enable();
    let n = n.min(SAMPLES as u32);
    let mut samples = [0u64; SAMPLES];
    for i in 1..=n {
        interrupts::disable();
        let t0 = nestio_guest::cpu::rdtsc();
        io::mmio_write32(bar + E1000_ICS, 1);
        // Halt until the interrupt (sti; hlt has no window: the interrupt shadow of
        // sti covers the hlt), so the vCPU does not compete with the delivery thread.
        while DEVICE[0].load(Ordering::SeqCst) < i {
            io::wait_for_interrupt();
            interrupts::disable();
        }
        samples[i as usize - 1] = ENTRY_TSC.load(Ordering::SeqCst).wrapping_sub(t0);
    }
    let s = &mut samples[..n as usize];
    s.sort_unstable();
    println!(
        "bench: chip={} n={} median_cycles={} min_cycles={}",
        if x86 { "x86" } else { "xive" },
        Dec(n.into()),
        Dec(s[s.len() / 2]),
        Dec(s[0])
    );
    0
}

fn main(_ram: u64) -> u32 {
    interrupts::init_idt();
    interrupts::set_irq_handler(on_irq);
    interrupts::init_lapic();
    if let Some(n) = cmdline_value("bench").and_then(|v| v.parse::<u32>().ok()) {
        return bench(n.max(1), cmdline_value("chip") == Some("x86"));
    }
    if cmdline_value("cede") == Some("1") {
        CEDE.store(1, Ordering::SeqCst);
    }
    if !start_ap() {
        println!("xive: the second vCPU did not start");
        return 1;
    }
    // 1. Source information.
    let info = hcall(H_INT_GET_SOURCE_INFO, &[0, 0]);
    if info.status != 0 || info.rets[..4] != [0, mgmt_page(0), trigger_page(0), 12] {
        println!("xive: bad source info {:#x}", info.rets[1]);
        return 2;
    }
    if hcall(H_INT_SET_SOURCE_CONFIG, &[0, 0, 0, 7, 0]).status != H_P4 {
        return 2;
    }
    // 2. Queues.
    for cpu in 0..2u64 {
        // SAFETY: only the address of the static queue is taken.
        let q = unsafe { addr_of_mut!(QUEUES[cpu as usize]) } as u64;
        let r = hcall(
            H_INT_SET_QUEUE_CONFIG,
            &[EQ_ALWAYS_NOTIFY, cpu, PRIO, q, 12],
        );
        let g = hcall(H_INT_GET_QUEUE_CONFIG, &[0, cpu, PRIO]);
        if r.status != 0 || g.status != 0 || g.rets[..3] != [EQ_ALWAYS_NOTIFY, q, 12] {
            println!("xive: queue of cpu {} refused ({})", Dec(cpu), r.status);
            return 3;
        }
    }
    set_cppr(0, 0xff);
    interrupts::enable();
    // 3. IPI ping-pong.
    let rounds: u32 = cmdline_value("rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    for ipi in 0..2u32 {
        if !route(ipi, ipi.into(), ipi) || esb_load(ipi, 0xc00) != 1 {
            return 4;
        }
    }
    for r in 1..=rounds {
        io::mmio_write64(trigger_page(1), 0);
        if !wait_until(|| IPIS[0].load(Ordering::SeqCst) >= r) {
            println!("xive: ipi round {} lost", Dec(r.into()));
            return 5;
        }
    }
    println!("xive: ipi rounds {} ok", Dec(rounds.into()));
    // 4. The e1000's interrupt, to each vCPU in turn.
    if let Some(dev) = pci::find(0x8086, 0x100e) {
        pci::enable(dev);
        BAR0.store(pci::bar_address(dev, 0), Ordering::SeqCst);
        let bar = BAR0.load(Ordering::SeqCst);
        io::mmio_write32(bar + E1000_IMC, u32::MAX);
        io::mmio_read32(bar + E1000_ICR);
        let lisn = pci::read32(dev, 0x3c) & 0xff;
        DEVICE_LISN.store(lisn, Ordering::SeqCst);
        if !route(lisn, 0, DEVICE_EISN + lisn) || esb_load(lisn, 0xc00) != 1 {
            return 6;
        }
        io::mmio_write32(bar + E1000_IMS, 1);
        for cpu in 0..2usize {
            if !route(lisn, cpu as u64, DEVICE_EISN + lisn) {
                return 6;
            }
            io::mmio_write32(bar + E1000_ICS, 1);
            if !wait_until(|| DEVICE[cpu].load(Ordering::SeqCst) >= 1) {
                println!("xive: e1000 irq never reached cpu {}", Dec(cpu as u64));
                return 7;
            }
            println!(
                "xive: e1000 irq on cpu {} (source {})",
                Dec(cpu as u64),
                Dec(lisn.into())
            );
        }
    }
    let (c0, c1) = (
        IPIS[0].load(Ordering::SeqCst) + DEVICE[0].load(Ordering::SeqCst),
        IPIS[1].load(Ordering::SeqCst) + DEVICE[1].load(Ordering::SeqCst),
    );
    println!(
        "xive: done cpu0={} cpu1={} spurious={} bad_ack={}",
        Dec(c0.into()),
        Dec(c1.into()),
        Dec(SPURIOUS.load(Ordering::SeqCst).into()),
        Dec(BAD_ACK.load(Ordering::SeqCst).into())
    );
    if CEDE.load(Ordering::SeqCst) == 1 {
        println!("xive: cedes={}", Dec(CEDES.load(Ordering::SeqCst).into()));
    }
    if BAD_ACK.load(Ordering::SeqCst) != 0 {
        return 8;
    }
    0
}
