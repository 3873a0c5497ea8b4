//! IDT, exception and interrupt dispatch, and the local APIC (xAPIC at 0xFEE00000).
//!
//! Vectors 0-63 have 16-byte stubs in one table (`nestio_isr_table`): each pushes a
//! dummy error code where the CPU pushes none, then the vector, and jumps to a common
//! path that saves the general registers and calls [`nestio_isr_dispatch`] with a
//! pointer to the [`Frame`]. Exceptions go to the handler set by [`set_exception_handler`]
//! (default: print and exit with status 3); vectors 32-63 go to the handler set by
//! [`set_irq_handler`], then the APIC gets its EOI.

use core::sync::atomic::{AtomicUsize, Ordering};

/// Local APIC base address (xAPIC mode).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Spurious-interrupt vector programmed in the APIC.
pub const SPURIOUS_VECTOR: u8 = 0x3f;
const NVECTORS: usize = 64;

/// Registers saved on entry to a handler (handlers may change them, e.g. `rip`).
#[repr(C)]
#[derive(Debug)]
#[allow(missing_docs)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

core::arch::global_asm!(
    ".section .text",
    ".global nestio_isr_table",
    ".p2align 4",
    "nestio_isr_table:",
    ".set i, 0",
    ".rept 64",
    ".p2align 4",
    ".if (i == 8) || ((i >= 10) && (i <= 14)) || (i == 17) || (i == 21) || (i == 29) || (i == 30)",
    "nop",
    "nop",
    ".else",
    "push 0",
    ".endif",
    "push i",
    "jmp nestio_isr_common",
    ".set i, i + 1",
    ".endr",
    "nestio_isr_common:",
    "push rax",
    "push rcx",
    "push rdx",
    "push rbx",
    "push rbp",
    "push rsi",
    "push rdi",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov rdi, rsp",
    "cld",
    "call nestio_isr_dispatch",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rbp",
    "pop rbx",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "add rsp, 16",
    "iretq",
);

extern "C" {
    static nestio_isr_table: u8;
}

#[repr(C, align(16))]
struct Idt([u64; NVECTORS * 2]);

static mut IDT: Idt = Idt([0; NVECTORS * 2]);

static EXC_HANDLER: AtomicUsize = AtomicUsize::new(0);
static IRQ_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// An exception handler: returns true when it handled the fault (e.g. moved `rip`).
pub type ExceptionHandler = fn(&mut Frame) -> bool;
/// An interrupt handler, called with the vector (EOI is sent after it returns).
pub type IrqHandler = fn(u8);

/// Install the handler for exceptions (vectors 0-31).
pub fn set_exception_handler(h: ExceptionHandler) {
    EXC_HANDLER.store(h as usize, Ordering::SeqCst);
}

/// Install the handler for interrupts (vectors 32-63).
pub fn set_irq_handler(h: IrqHandler) {
    IRQ_HANDLER.store(h as usize, Ordering::SeqCst);
}

#[no_mangle]
extern "C" fn nestio_isr_dispatch(f: &mut Frame) {
    let v = f.vector as u8;
    if v < 32 {
        let h = EXC_HANDLER.load(Ordering::SeqCst);
        if h != 0 {
            // SAFETY: only `set_exception_handler` stores here, always a valid fn pointer.
            let h: ExceptionHandler = unsafe { core::mem::transmute::<usize, ExceptionHandler>(h) };
            if h(f) {
                return;
            }
        }
        crate::println!(
            "guest: unexpected exception {} (error {:#x}) at rip {:#x}",
            v,
            f.error,
            f.rip
        );
        crate::exit::exit(3);
    }
    if v == SPURIOUS_VECTOR {
        return;
    }
    let h = IRQ_HANDLER.load(Ordering::SeqCst);
    if h != 0 {
        // SAFETY: only `set_irq_handler` stores here, always a valid fn pointer.
        let h: IrqHandler = unsafe { core::mem::transmute::<usize, IrqHandler>(h) };
        h(v);
    }
    lapic_eoi();
}

/// Load the IDT (vectors 0-63 on the stub table, interrupt gates, selector 0x08).
pub fn init_idt() {
    let base = core::ptr::addr_of!(nestio_isr_table) as u64;
    // SAFETY: single vCPU, called before interrupts are enabled; nothing else uses IDT.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for v in 0..NVECTORS {
        let h = base + 16 * v as u64;
        idt.0[2 * v] = (h & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((h >> 16) & 0xffff) << 48;
        idt.0[2 * v + 1] = h >> 32;
    }
    #[repr(C, packed)]
    struct Desc {
        limit: u16,
        base: u64,
    }
    let d = Desc {
        limit: (NVECTORS * 16 - 1) as u16,
        base: idt.0.as_ptr() as u64,
    };
    // SAFETY: `d` describes the static IDT filled above.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &d, options(readonly, nostack)) }
}

/// Software-enable the local APIC (spurious vector register) with TPR 0.
pub fn init_lapic() {
    crate::io::mmio_write32(LAPIC_BASE + 0x80, 0);
    crate::io::mmio_write32(LAPIC_BASE + 0xf0, 0x100 | SPURIOUS_VECTOR as u32);
}

/// Signal end of interrupt to the local APIC.
pub fn lapic_eoi() {
    crate::io::mmio_write32(LAPIC_BASE + 0xb0, 0);
}

/// IDT and APIC, then enable interrupts.
pub fn init() {
    init_idt();
    init_lapic();
    enable();
}

/// Enable interrupts.
pub fn enable() {
    // SAFETY: handlers are installed.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) }
}

/// Disable interrupts.
pub fn disable() {
    // SAFETY: clears IF only.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) }
}

/// Program IOAPIC pin `pin` to deliver `vector` to APIC 0, level-triggered, active high.
pub fn ioapic_route(pin: u8, vector: u8) {
    const IOAPIC: u64 = 0xfec0_0000;
    let reg = 0x10 + 2 * pin as u32;
    crate::io::mmio_write32(IOAPIC, reg + 1);
    crate::io::mmio_write32(IOAPIC + 0x10, 0);
    crate::io::mmio_write32(IOAPIC, reg);
    crate::io::mmio_write32(IOAPIC + 0x10, (1 << 15) | vector as u32);
}
