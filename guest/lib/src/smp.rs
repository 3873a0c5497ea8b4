//! Starting the application processors (APs).
//!
//! [`start_aps`] copies a real-mode trampoline to [`TRAMPOLINE`] (below 1 MiB, where a
//! STARTUP IPI can point) and sends INIT and STARTUP to all other processors through
//! the local APIC (xAPIC MMIO, "all excluding self"). Each AP starts in real mode at the
//! trampoline, loads the VMM's GDT (0x500), turns on PAE, long mode and paging with the
//! VMM's identity page tables (0x9000) in one step, jumps to 64-bit code, takes a stack
//! from its local APIC ID (`0x20000 + (id + 1) * 4 KiB`) and calls the entry given to
//! [`start_aps`] with that ID.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::io;

/// Where the trampoline is copied: SIPI vector 0x08.
pub const TRAMPOLINE: u64 = 0x8000;
const LAPIC: u64 = 0xfee0_0000;
const ICR_LOW: u64 = LAPIC + 0x300;
const ICR_HIGH: u64 = LAPIC + 0x310;
/// ICR: INIT, level assert, destination shorthand "all excluding self".
const ICR_INIT_ALL_BUT_SELF: u32 = 0x000c_4500;
/// ICR: STARTUP, shorthand "all excluding self"; the vector is the page number.
const ICR_SIPI_ALL_BUT_SELF: u32 = 0x000c_4600 | (TRAMPOLINE >> 12) as u32;

/// The AP entry the trampoline calls (an `extern "C" fn(u32) -> !`).
static AP_ENTRY: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
    .section .text.nestio_ap_trampoline, "ax"
    .global nestio_ap_tramp_start
    .global nestio_ap_tramp_end
    .code16
nestio_ap_tramp_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (2f - nestio_ap_tramp_start + 0x8000)
    movl $0x20, %eax
    movl %eax, %cr4
    movl $0x9000, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $0x80000011, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(1f - nestio_ap_tramp_start + 0x8000)
    .code64
1:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $0xfee00020, %eax
    movl (%rax), %eax
    shrl $24, %eax
    movl %eax, %edi
    incl %eax
    shll $12, %eax
    addl $0x20000, %eax
    movq %rax, %rsp
    movabsq ${entry}, %rax
    movq (%rax), %rax
    callq *%rax
3:
    cli
    hlt
    jmp 3b
    .balign 8
2:
    .word 0x27
    .long 0x500
nestio_ap_tramp_end:
    .text
"#,
    entry = sym AP_ENTRY,
    options(att_syntax)
);

extern "C" {
    static nestio_ap_tramp_start: u8;
    static nestio_ap_tramp_end: u8;
}

fn wait_icr_idle() {
    for _ in 0..1000 {
        if io::mmio_read32(ICR_LOW) & (1 << 12) == 0 {
            return;
        }
    }
}

fn send_ipi(icr: u32) {
    io::mmio_write32(ICR_HIGH, 0);
    io::mmio_write32(ICR_LOW, icr);
    wait_icr_idle();
}

/// Copy the trampoline and send INIT then STARTUP to every other processor; each calls
/// `entry(apic_id)` on its own stack. The local APIC must be enabled.
pub fn start_aps(entry: extern "C" fn(u32) -> !) {
    AP_ENTRY.store(entry as usize as u64, Ordering::SeqCst);
    // Both symbols are labels of the trampoline above, in this order, in the same
    // section; the range is about a hundred bytes of code and data.
    let (start, end) = (
        core::ptr::addr_of!(nestio_ap_tramp_start),
        core::ptr::addr_of!(nestio_ap_tramp_end),
    );
    let len = end as usize - start as usize;
    // SAFETY: copies the trampoline to guest RAM at 0x8000..0x9000, which the VMM's
    // layout leaves free (between the command line page and the page tables).
    unsafe { core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len.min(0x1000)) };
    send_ipi(ICR_INIT_ALL_BUT_SELF);
    send_ipi(ICR_SIPI_ALL_BUT_SELF);
}

/// A second STARTUP, which real hardware wants when the first was missed; one that
/// finds an AP running is ignored.
pub fn resend_startup() {
    send_ipi(ICR_SIPI_ALL_BUT_SELF);
}
