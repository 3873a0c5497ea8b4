//! nestio-guest: the smallest useful runtime for nestio guest payloads.
//!
//! Payloads are `no_std`, `no_main` static ELF files built for the host target and loaded
//! by the nestio VMM at 2 MiB. The VMM enters `_start` in 64-bit long mode, ring 0, with
//! the first 4 GiB identity-mapped by 2 MiB pages, a stack below 2 MiB and `rdi` holding
//! the RAM size. Every guest instruction may be emulated (~1 µs each on some hosts), so
//! this library does the minimum: port and MMIO accessors ([`io`]), serial output
//! ([`serial`], `println!`), the debug-exit port ([`exit`]), PCI configuration access
//! and enumeration ([`pci`]), an IDT with exception and interrupt dispatch plus the
//! local APIC ([`interrupts`]), CPUID / MSR access that survives #GP ([`cpu`]), and
//! PAPR hypercalls through the VMM's hypercall port ([`hcall`]), and starting the
//! other vCPUs ([`smp`]).
#![no_std]

pub mod cpu;
pub mod exit;
pub mod fmt;
pub mod hcall;
pub mod interrupts;
pub mod io;
mod mem;
pub mod pci;
pub mod serial;
pub mod smp;

/// Guest/VMM contract: the port whose 32-bit write ends the VM; the low byte is the exit
/// status of the VMM process.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Guest/VMM contract: base of the 16550 UART.
pub const SERIAL_PORT: u16 = 0x3f8;

static CMDLINE: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

#[doc(hidden)]
pub fn set_cmdline(addr: usize) {
    CMDLINE.store(addr, core::sync::atomic::Ordering::SeqCst);
}

/// The command line the VMM passed (empty if none or not valid UTF-8).
pub fn cmdline() -> &'static str {
    let p = CMDLINE.load(core::sync::atomic::Ordering::SeqCst) as *const u8;
    if p.is_null() {
        return "";
    }
    let mut n = 0;
    // SAFETY: the VMM writes a NUL-terminated string of at most 4095 bytes at `p`,
    // in RAM the guest owns and never writes.
    while n < 4095 && unsafe { p.add(n).read_volatile() } != 0 {
        n += 1;
    }
    // SAFETY: `n` bytes at `p` were just read and stay unchanged.
    let b = unsafe { core::slice::from_raw_parts(p, n) };
    core::str::from_utf8(b).unwrap_or("")
}

/// The value of `key=value` in the command line.
pub fn cmdline_value(key: &str) -> Option<&'static str> {
    cmdline().split(' ').find_map(|w| {
        let (k, v) = w.split_once('=')?;
        (k == key).then_some(v)
    })
}

/// Define the payload entry point: `entry!(main)` with `fn main(ram_size: u64) -> u32`;
/// the return value becomes the VM's exit status. Also installs the panic handler
/// (prints the message, exits with status 101).
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[no_mangle]
        #[link_section = ".text._start"]
        pub extern "C" fn _start(ram_size: u64, cmdline: usize) -> ! {
            $crate::set_cmdline(cmdline);
            let f: fn(u64) -> u32 = $main;
            let code = f(ram_size);
            $crate::exit::exit(code)
        }

        #[panic_handler]
        fn panic(info: &core::panic::PanicInfo) -> ! {
            $crate::println!("guest panic: {}", info);
            $crate::exit::exit(101)
        }
    };
}

/// The precompiled `core` of the host target is built for unwinding and references this
/// symbol; payloads abort on panic, so it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
