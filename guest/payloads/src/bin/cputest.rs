//! The split-lock CPU model seen from the guest: reads CPUID.(7,0):EDX[30], then
//! IA32_CORE_CAPABILITIES, toggles MSR_TEST_CTRL.SPLIT_LOCK_DETECT and checks that
//! reserved bits raise #GP. Exit status 0 = every check passed, else the failed check's
//! number. Leaves split-lock detection ON when offered (the host checks the saved state).
#![no_std]
#![no_main]

use nestio_guest::cpu::{cpuid, install_gp_catcher, try_rdmsr, try_wrmsr};
use nestio_guest::{interrupts, println};

nestio_guest::entry!(main);

const TEST_CTRL: u32 = 0x33;
const CORE_CAPS: u32 = 0xcf;
const SLD: u64 = 1 << 29;

fn main(_ram: u64) -> u32 {
    interrupts::init_idt();
    install_gp_catcher();
    // Does leaf 7 come from the VMM? Its leaf 0x400000f0 says what it put there (some
    // hosts replace leaf 7 with their own).
    let nest = cpuid(0x4000_00f0, 0);
    let edx7 = cpuid(7, 0).3;
    let faithful = nest.0 == u32::from_le_bytes(*b"nest") && nest.1 == edx7;
    let cpuid_bit = edx7 & (1 << 30) != 0;
    // IA32_CORE_CAPABILITIES is enumerated by the CPUID bit; when leaf 7 is not the
    // VMM's, the MSR itself (readable or #GP) is the authority.
    let offered = if faithful {
        cpuid_bit
    } else {
        try_rdmsr(CORE_CAPS).is_some()
    };
    println!(
        "cpuid_leaf7_faithful={} cpuid_core_capabilities={}",
        faithful as u8, cpuid_bit as u8
    );
    println!("core_capabilities={}", offered as u8);
    if offered {
        let caps = try_rdmsr(CORE_CAPS);
        println!("IA32_CORE_CAPABILITIES={:#x}", caps.unwrap_or(0));
        if caps.map(|c| c & (1 << 5)) != Some(1 << 5) {
            return 1;
        }
        if try_rdmsr(TEST_CTRL) != Some(0) {
            return 2;
        }
        if !try_wrmsr(TEST_CTRL, SLD) || try_rdmsr(TEST_CTRL) != Some(SLD) {
            return 3;
        }
        if try_wrmsr(TEST_CTRL, 1 << 31) || try_wrmsr(TEST_CTRL, SLD | 1) {
            return 4; // reserved bits must fault
        }
        if try_rdmsr(TEST_CTRL) != Some(SLD) {
            return 5; // a faulting write changes nothing
        }
        if !try_wrmsr(TEST_CTRL, 0) || try_rdmsr(TEST_CTRL) != Some(0) {
            return 6;
        }
        if try_wrmsr(CORE_CAPS, 0) {
            return 7; // read-only
        }
        if !try_wrmsr(TEST_CTRL, SLD) {
            return 8;
        }
        println!("split-lock detection toggled, reserved bits fault");
    } else {
        if try_rdmsr(CORE_CAPS).is_some() {
            return 11;
        }
        if try_rdmsr(TEST_CTRL) != Some(0) {
            return 12;
        }
        if try_wrmsr(TEST_CTRL, SLD) {
            return 13;
        }
        println!("split-lock detection hidden: MSRs fault as expected");
    }
    0
}
