//! PAPR hypercalls through the nestio hypercall port, checked from the guest.
//!
//! Expects the handlers `crates/vmm/tests/hypercall.rs` registers: `H_GET_TCE` returns
//! its 9 arguments reversed; `H_PUT_TCE_INDIRECT` (`liobn, ioba, list, count`) returns
//! the sum of `count <= 512` big-endian u64 at `list`, `H_PARAMETER` for a bad list;
//! RTAS `nestio,sum` returns the sum of its arguments in `rets[1]` (nret must be 2).
//! Also: the built-in virtual terminal, unknown opcodes, and hostile addresses.
//!
//! Prints `ok <check>` or `FAIL <check>` per check; exit status = number of failures.
//! `input=1`: also read a line through `H_GET_TERM_CHAR` and print `got input: <line>`.
//! `bench=N`: only make N unregistered hypercalls (H_FUNCTION) and exit 0; with `port=1`
//! N plain 32-bit writes to port 0x80 instead (the exit without the hypercall's work).
#![no_std]
#![no_main]

use nestio_guest::hcall::{self, *};
use nestio_guest::{io, println};

nestio_guest::entry!(main);

static mut FAILS: u32 = 0;

fn check(name: &str, ok: bool) {
    if ok {
        println!("ok {}", name);
    } else {
        println!("FAIL {}", name);
        // SAFETY: single-threaded guest.
        unsafe { FAILS += 1 };
    }
}

/// Return codes are small negative numbers: print them without core's i64 Display.
struct Code(i64);
impl core::fmt::Display for Code {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 < 0 {
            write!(f, "-{}", nestio_guest::fmt::Dec(self.0.unsigned_abs()))
        } else {
            write!(f, "{}", nestio_guest::fmt::Dec(self.0 as u64))
        }
    }
}

fn status(name: &str, got: i64, want: i64) {
    if got != want {
        println!("{}: got {} want {}", name, Code(got), Code(want));
    }
    check(name, got == want);
}

#[repr(C, align(8))]
struct TceList([u64; 4]);
static mut TCES: TceList = TceList([0; 4]);

fn main(ram: u64) -> u32 {
    if let Some(n) = nestio_guest::cmdline_value("bench") {
        let n: u64 = n.parse().unwrap_or(0);
        if nestio_guest::cmdline_value("port") == Some("1") {
            // Baseline: the same number of plain port exits (POST code port).
            for _ in 0..n {
                io::outl(0x80, 0);
            }
        } else {
            for _ in 0..n {
                hcall(0x400, &[]);
            }
        }
        return 0;
    }

    // The virtual terminal (built into the VMM).
    // One line in three calls (statuses checked after, so no other output interleaves).
    let a = put_term_chars(b"hvterm says ");
    let b = put_term_chars(b"hello world 0123");
    let c = put_term_chars(b"\n");
    status("put_term_char", a, H_SUCCESS);
    status("put_term_char 16", b, H_SUCCESS);
    status("put_term_char newline", c, H_SUCCESS);
    status(
        "put_term_char len 17",
        hcall(H_PUT_TERM_CHAR, &[0, 17, 0, 0]).status,
        H_PARAMETER,
    );
    status(
        "put_term_char termno 1",
        hcall(H_PUT_TERM_CHAR, &[1, 1, 0x41 << 56, 0]).status,
        H_PARAMETER,
    );

    // Unknown numbers.
    status("unregistered opcode", hcall(0x400, &[]).status, H_FUNCTION);
    status(
        "unregistered H_PUT_TCE",
        hcall(H_PUT_TCE, &[1, 2, 3]).status,
        H_FUNCTION,
    );
    status(
        "opcode not a multiple of 4",
        hcall(0x21, &[]).status,
        H_FUNCTION,
    );
    status(
        "opcode past 0xfffc",
        hcall(0x1_0000, &[]).status,
        H_FUNCTION,
    );

    // All nine argument and return registers.
    let r = hcall(H_GET_TCE, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    status("nine registers status", r.status, H_SUCCESS);
    check(
        "nine registers each way",
        r.rets == [9, 8, 7, 6, 5, 4, 3, 2, 1],
    );

    // Guest memory named by an argument: valid, past RAM, wrapping, too many entries.
    // SAFETY: single-threaded guest; the VMM reads the list during the call below.
    let list = unsafe {
        TCES.0 = [1u64.to_be(), 2u64.to_be(), 3u64.to_be(), 40u64.to_be()];
        core::ptr::addr_of!(TCES) as u64
    };
    let r = hcall(H_PUT_TCE_INDIRECT, &[7, 0, list, 4]);
    status("tce list status", r.status, H_SUCCESS);
    check("tce list read from guest memory", r.rets[0] == 46);
    for (name, addr, count) in [
        ("tce list past RAM", ram - 16, 4),
        ("tce list wrapping", u64::MAX - 7, 2),
        ("tce list count 513", list, 513),
        ("tce list count overflow", list, u64::MAX / 4),
    ] {
        status(
            name,
            hcall(H_PUT_TCE_INDIRECT, &[7, 0, addr, count]).status,
            H_PARAMETER,
        );
    }

    // RTAS.
    let token = rtas_token("nestio,sum");
    check("rtas token found", token.is_ok());
    let token = token.unwrap_or(0);
    status(
        "rtas token unknown name",
        rtas_token("nestio,none").err().unwrap_or(0),
        H_NOT_FOUND,
    );
    status(
        "rtas token name past RAM",
        hcall(H_NESTIO_RTAS_TOKEN, &[ram - 2, 10]).status,
        H_PARAMETER,
    );
    let mut a = RtasArgs::new(token, &[1, 2, 3], 2);
    status("rtas call", a.call(), H_SUCCESS);
    check("rtas status", a.ret(0) == 0);
    check("rtas result", a.ret(1) == 6);
    let mut a = RtasArgs::new(0x1234, &[1], 1);
    status("rtas unknown token", a.call(), H_PARAMETER);
    check("rtas unknown token status -3", a.ret(0) as i32 == -3);
    let mut a = RtasArgs::new(token, &[], 1);
    a.cells[1] = 20u32.to_be();
    status("rtas nargs 20", a.call(), H_PARAMETER);
    status(
        "rtas buffer past RAM",
        hcall(H_RTAS, &[ram - 4]).status,
        H_PARAMETER,
    );
    status(
        "rtas buffer wrapping",
        hcall(H_RTAS, &[u64::MAX - 3]).status,
        H_PARAMETER,
    );

    // The port outside the ABI: not hypercalls.
    io::outb(hcall::HYPERCALL_PORT, 1);
    check(
        "port read is all-ones",
        io::inl(hcall::HYPERCALL_PORT) == 0xffff_ffff,
    );

    if nestio_guest::cmdline_value("input") == Some("1") {
        let mut line = [0u8; 64];
        let mut n = 0;
        let mut tries = 0u32;
        'read: while tries < 2_000_000 {
            tries += 1;
            let mut b = [0u8; 16];
            match get_term_chars(&mut b) {
                Ok(k) => {
                    for &c in &b[..k] {
                        if c == b'\n' || n == line.len() {
                            break 'read;
                        }
                        line[n] = c;
                        n += 1;
                    }
                }
                Err(e) => {
                    status("get_term_char", e, H_SUCCESS);
                    break;
                }
            }
        }
        println!(
            "got input: {}",
            core::str::from_utf8(&line[..n]).unwrap_or("?")
        );
    }

    // SAFETY: single-threaded guest.
    let fails = unsafe { FAILS };
    println!(
        "hcalltest done, {} failed",
        nestio_guest::fmt::Dec(fails as u64)
    );
    fails
}
