//! Runs code on every vCPU. The boot vCPU starts the others with
//! `nestio_guest::smp::start_aps` (INIT and STARTUP to a real-mode trampoline) and
//! waits until every application processor has reported in; it prints the masks of
//! the APIC IDs seen and exits with the number of processors that ran code (itself
//! included).
//!
//! Each AP, in 64-bit mode on its own stack, calls [`ap_main`], which
//! sets its bits in the masks (by LAPIC ID register and by CPUID's initial APIC ID) and
//! counts itself.
//!
//! Command line: `cpus=N` (processors expected, default 1); `after=` what the guest does
//! once all reported in: `exit` (default), `spin` (the BSP and the APs busy-loop, for
//! pause and stop tests; each vCPU counts its loops in the u64 at `0x6000 + 8 * APIC ID`),
//! `reset` (0xFE to port 0x64); `ap=` what the APs do after
//! reporting: `halt` (default), `spin`, `exit` (the last AP to arrive writes status 77
//! to the exit port while the BSP keeps waiting), `fault` (the last AP executes an x87
//! load from unbacked MMIO, which KVM cannot emulate).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nestio_guest::fmt::Dec;
use nestio_guest::{cmdline_value, io, println};

nestio_guest::entry!(main);

const LAPIC: u64 = 0xfee0_0000;
/// The spin counters (one u64 per APIC ID), in free RAM below the command line.
const SPIN_COUNTERS: u64 = 0x6000;
/// Unbacked guest-physical address (no RAM, no device) for `ap=fault`.
const UNBACKED_MMIO: u64 = 0x8000_0000;

static ARRIVED: AtomicU32 = AtomicU32::new(0);
static LAPIC_MASK: AtomicU64 = AtomicU64::new(0);
static CPUID_MASK: AtomicU64 = AtomicU64::new(0);
static EXPECTED: AtomicU32 = AtomicU32::new(1);
static AP_MODE: AtomicU32 = AtomicU32::new(0);

const AP_HALT: u32 = 0;
const AP_SPIN: u32 = 1;
const AP_EXIT: u32 = 2;
const AP_FAULT: u32 = 3;

/// An application processor, in 64-bit mode on its own stack (`0x20000 + (id+1) * 4K`).
extern "C" fn ap_main(apic_id: u32) -> ! {
    let cpuid_id = nestio_guest::cpu::cpuid(1, 0).1 >> 24;
    LAPIC_MASK.fetch_or(1u64 << (apic_id & 63), Ordering::SeqCst);
    CPUID_MASK.fetch_or(1u64 << (cpuid_id & 63), Ordering::SeqCst);
    let me = ARRIVED.fetch_add(1, Ordering::SeqCst) + 1;
    let last = me + 1 == EXPECTED.load(Ordering::SeqCst);
    match AP_MODE.load(Ordering::SeqCst) {
        AP_EXIT if last => nestio_guest::exit::exit(77),
        AP_FAULT if last => {
            // SAFETY: deliberately faults the VM: an x87 load from unbacked MMIO, which
            // KVM's instruction emulator does not implement (the VMM reports it).
            unsafe {
                core::arch::asm!("fld dword ptr [{}]", in(reg) UNBACKED_MMIO, options(nostack))
            };
            nestio_guest::exit::exit(78)
        }
        AP_SPIN => spin(),
        _ => loop {
            // SAFETY: parks this AP (interrupts off); the VMM stops it with the VM.
            unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) }
        },
    }
}

/// Busy-loop, counting: the u64 at `SPIN_COUNTERS + 8 * apic_id` grows while this vCPU
/// runs (the host reads it to see which vCPUs execute, e.g. while paused).
fn spin() -> ! {
    let id = io::mmio_read32(LAPIC + 0x20) >> 24;
    let counter = (SPIN_COUNTERS + 8 * u64::from(id & 63)) as *mut u64;
    loop {
        // SAFETY: SPIN_COUNTERS..+0x200 is free guest RAM below the command line page,
        // one u64 per APIC ID, written only by the vCPU with that ID.
        unsafe { counter.write_volatile(counter.read_volatile().wrapping_add(1)) };
    }
}

/// Spin until `n` APs arrived or about `rounds` polls passed.
fn wait_arrivals(n: u32, rounds: u32) -> bool {
    for _ in 0..rounds {
        if ARRIVED.load(Ordering::SeqCst) >= n {
            return true;
        }
        core::hint::spin_loop();
    }
    ARRIVED.load(Ordering::SeqCst) >= n
}

fn main(_ram: u64) -> u32 {
    let cpus: u32 = cmdline_value("cpus")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .clamp(1, 64);
    EXPECTED.store(cpus, Ordering::SeqCst);
    AP_MODE.store(
        match cmdline_value("ap") {
            Some("spin") => AP_SPIN,
            Some("exit") => AP_EXIT,
            Some("fault") => AP_FAULT,
            _ => AP_HALT,
        },
        Ordering::SeqCst,
    );
    let bsp_lapic = io::mmio_read32(LAPIC + 0x20) >> 24;
    let bsp_cpuid = nestio_guest::cpu::cpuid(1, 0).1 >> 24;
    LAPIC_MASK.fetch_or(1 << (bsp_lapic & 63), Ordering::SeqCst);
    CPUID_MASK.fetch_or(1 << (bsp_cpuid & 63), Ordering::SeqCst);
    let aps = cpus - 1;
    if aps > 0 {
        nestio_guest::interrupts::init_lapic();
        nestio_guest::smp::start_aps(ap_main);
        if !wait_arrivals(aps, 200_000) {
            nestio_guest::smp::resend_startup();
            wait_arrivals(aps, 2_000_000);
        }
    }
    let arrived = ARRIVED.load(Ordering::SeqCst);
    println!(
        "smp: {} of {} cpus ran code; lapic_ids={} cpuid_apic_ids={} cpuid_logical={}",
        Dec(u64::from(arrived + 1)),
        Dec(u64::from(cpus)),
        Dec(LAPIC_MASK.load(Ordering::SeqCst)),
        Dec(CPUID_MASK.load(Ordering::SeqCst)),
        Dec(u64::from((nestio_guest::cpu::cpuid(1, 0).1 >> 16) & 0xff))
    );
    match cmdline_value("after") {
        Some("spin") => {
            println!("spinning");
            spin()
        }
        Some("reset") => {
            io::outb(0x64, 0xfe);
            spin()
        }
        _ => {}
    }
    if AP_MODE.load(Ordering::SeqCst) >= AP_EXIT {
        // The AP ends the VM; keep the BSP busy meanwhile.
        spin()
    }
    arrived + 1
}
