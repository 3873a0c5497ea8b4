//! CPUID and MSR access; `try_rdmsr` / `try_wrmsr` report a #GP instead of dying.
//!
//! The #GP is caught by the exception handler installed with [`install_gp_catcher`]: when
//! a guarded MSR instruction faults, the handler records it and skips the 2-byte
//! instruction.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::interrupts::Frame;

static EXPECT_GP: AtomicBool = AtomicBool::new(false);
static GOT_GP: AtomicBool = AtomicBool::new(false);

/// CPUID leaf/subleaf: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is always available in long mode.
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, sub) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

fn gp_catcher(f: &mut Frame) -> bool {
    if f.vector == 13 && EXPECT_GP.load(Ordering::SeqCst) {
        GOT_GP.store(true, Ordering::SeqCst);
        f.rip += 2; // rdmsr / wrmsr are 0F 32 / 0F 30
        return true;
    }
    false
}

/// Install the #GP catcher as the exception handler (needs `interrupts::init_idt`).
pub fn install_gp_catcher() {
    crate::interrupts::set_exception_handler(gp_catcher);
}

/// RDMSR; `None` when it raised #GP.
pub fn try_rdmsr(msr: u32) -> Option<u64> {
    GOT_GP.store(false, Ordering::SeqCst);
    EXPECT_GP.store(true, Ordering::SeqCst);
    let (lo, hi): (u32, u32);
    // SAFETY: a #GP is caught by `gp_catcher`, which skips the instruction.
    unsafe {
        core::arch::asm!("xor eax, eax", "xor edx, edx", "rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack))
    }
    EXPECT_GP.store(false, Ordering::SeqCst);
    if GOT_GP.load(Ordering::SeqCst) {
        None
    } else {
        Some((hi as u64) << 32 | lo as u64)
    }
}

/// WRMSR; false when it raised #GP.
pub fn try_wrmsr(msr: u32, v: u64) -> bool {
    GOT_GP.store(false, Ordering::SeqCst);
    EXPECT_GP.store(true, Ordering::SeqCst);
    // SAFETY: a #GP is caught by `gp_catcher`, which skips the instruction.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack))
    }
    EXPECT_GP.store(false, Ordering::SeqCst);
    !GOT_GP.load(Ordering::SeqCst)
}

/// The time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC reads a counter; no memory effects.
    unsafe {
        core::arch::asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack))
    }
    (hi as u64) << 32 | lo as u64
}
