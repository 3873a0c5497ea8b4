//! Serial output on the 16550 at 0x3f8. The VMM's UART is always ready to transmit, so
//! bytes go straight to THR without polling LSR, as one string I/O instruction per
//! string (`rep outsb`: one exit for many bytes).

/// A `core::fmt::Write` sink for the serial port.
pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len();
        // SAFETY: reads `n` bytes of `s` and writes them to the port; DF is clear.
        unsafe {
            core::arch::asm!(
                "rep outsb",
                inout("rcx") n => _,
                inout("rsi") s.as_ptr() => _,
                in("dx") crate::SERIAL_PORT,
                options(nostack, preserves_flags, readonly)
            )
        }
        Ok(())
    }
}

/// Print to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Serial, format_args!($($arg)*));
    }};
}

/// Print a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::print!("\n");
    }};
}
