//! Prints a greeting and exits with status 42; with `mode=spin` it prints "spinning"
//! and never exits (for stop/SIGINT tests).
#![no_std]
#![no_main]

use nestio_guest::println;

nestio_guest::entry!(main);

fn main(ram: u64) -> u32 {
    println!(
        "hello from the guest ({} MiB)",
        nestio_guest::fmt::Dec(ram >> 20)
    );
    if nestio_guest::cmdline_value("mode") == Some("spin") {
        println!("spinning");
        let x = 0u32;
        loop {
            // SAFETY: reads a local; keeps the loop from being optimised out.
            unsafe { core::ptr::read_volatile(&x) };
        }
    }
    42
}
