//! Port I/O and MMIO accessors (volatile, no caching assumptions).

use core::arch::asm;

/// Write a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the guest owns the machine.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}
/// Write a u16 to an I/O port.
#[inline(always)]
pub fn outw(port: u16, v: u16) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}
/// Write a u32 to an I/O port.
#[inline(always)]
pub fn outl(port: u16, v: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}
/// Read a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}
/// Read a u16 from an I/O port.
#[inline(always)]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags))
    }
    v
}
/// Read a u32 from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Read a u32 at a physical (identity-mapped) address.
#[inline(always)]
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the VMM identity-maps the first 4 GiB; a device or unassigned address answers.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}
/// Write a u32 at a physical (identity-mapped) address.
#[inline(always)]
pub fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as in `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}
/// Read a u8 at a physical address.
#[inline(always)]
pub fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: as in `mmio_read32`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}
/// Read a u64 at a physical address.
#[inline(always)]
pub fn mmio_read64(addr: u64) -> u64 {
    // SAFETY: as in `mmio_read32`.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}
/// Write a u64 at a physical address.
#[inline(always)]
pub fn mmio_write64(addr: u64, v: u64) {
    // SAFETY: as in `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// Halt until the next interrupt (with interrupts enabled: `sti; hlt` is atomic).
#[inline(always)]
pub fn wait_for_interrupt() {
    // SAFETY: enables interrupts and halts; handlers are installed by `interrupts::init`.
    unsafe { asm!("sti", "hlt", options(nomem, nostack)) }
}
