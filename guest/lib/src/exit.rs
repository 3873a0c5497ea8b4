//! Ending the VM: a 32-bit write to the debug-exit port; the VMM exits with its low byte.

/// End the VM with `code` as the VMM's exit status. Never returns.
pub fn exit(code: u32) -> ! {
    crate::io::outl(crate::DEBUG_EXIT_PORT, code);
    loop {
        // SAFETY: `cli; hlt` stops this vCPU; reached only if the VMM ignored the port.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
