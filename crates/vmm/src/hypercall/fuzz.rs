//! Fuzzing entry point of the hypercall entry (feature `harness`; cargo-fuzz target
//! `hypercall`, corpus replayed by `nestio/tests/fuzz_corpus.rs`).
//!
//! Everything a guest controls is taken from the input: the contents of guest RAM (two
//! regions with a hole between them, so a buffer can straddle it) and a sequence of
//! calls, each an opcode and nine arguments. The table has the built-in `H_RTAS` and
//! `H_NESTIO_RTAS_TOKEN`, an RTAS call, and an `H_PUT_TCE_INDIRECT`-shaped handler that
//! reads a TCE list from guest memory as the TCE model will. Checked for every call:
//! nothing panics; an opcode that is not a multiple of 4 up to `Opcode::MAX`, or not
//! registered, answers `H_FUNCTION`; a TCE list or RTAS buffer that is not entirely RAM
//! answers `H_PARAMETER`; a call that succeeds read only RAM.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::papr::{H_FUNCTION, H_PARAMETER, H_PUT_TCE_INDIRECT, H_RTAS, H_SUCCESS};
use super::rtas::{RTAS_OUT_PARAM_ERROR, RTAS_OUT_SUCCESS};
use super::{Hcall, HcallContext, HcallReturn, Hypercalls, Opcode, RtasCall, HCALL_ARGS};

/// The two RAM regions: `[0, 0x2000)` and `[0x3000, 0x4000)`.
const RAM: [(u64, usize); 2] = [(0, 0x2000), (0x3000, 0x1000)];
/// PAPR's limit for one `H_PUT_TCE_INDIRECT`.
const MAX_TCES: u64 = 512;

fn in_ram(gpa: u64, len: u64) -> bool {
    RAM.iter().any(|&(base, size)| {
        gpa >= base
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= base + size as u64)
    })
}

/// Feed `data` to the hypercall dispatcher (see the module documentation).
pub fn fuzz_hypercall(data: &[u8]) {
    let ranges: Vec<(GuestAddress, usize)> =
        RAM.iter().map(|&(b, s)| (GuestAddress(b), s)).collect();
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&ranges) else {
        return;
    };
    let ctx = HcallContext::new(&mem, 0);
    // Guest RAM from the first 0x3000 bytes of the input (the rest stays zero).
    let (ram_bytes, mut calls) = data.split_at(data.len().min(0x3000));
    for (i, chunk) in ram_bytes.chunks(0x1000).enumerate() {
        let gpa = [0u64, 0x1000, 0x3000][i];
        let _ = ctx.mem.write(gpa, chunk);
    }

    let mut table = Hypercalls::new();
    let tce_list = Arc::new(|ctx: &HcallContext<'_>, call: &Hcall| {
        let (list, count) = (call.arg(1), call.arg(2));
        if count == 0 || count > MAX_TCES {
            return HcallReturn::status(H_PARAMETER);
        }
        match ctx.mem.read_be_u64s(list, count) {
            Ok(tces) => {
                assert!(in_ram(list, count * 8), "a TCE list outside RAM was read");
                let sum = tces.iter().fold(0u64, |s, t| s.wrapping_add(*t));
                HcallReturn::with_rets(H_SUCCESS, [sum])
            }
            Err(_) => {
                assert!(
                    !in_ram(list, count * 8),
                    "a TCE list inside RAM was refused"
                );
                HcallReturn::status(H_PARAMETER)
            }
        }
    });
    if table.register(H_PUT_TCE_INDIRECT, tce_list).is_err() {
        return;
    }
    let sum: Arc<dyn RtasCall> = Arc::new(|_: &HcallContext<'_>, a: &[u32], r: &mut [u32]| {
        if r.is_empty() {
            return RTAS_OUT_PARAM_ERROR;
        }
        r[0] = a.iter().fold(0u32, |s, v| s.wrapping_add(*v));
        RTAS_OUT_SUCCESS
    });
    if table.register_rtas("nestio,sum", sum).is_err() {
        return;
    }

    // Each call: a u16 opcode selector and nine u64 arguments, little-endian.
    const CALL: usize = 2 + 8 * HCALL_ARGS;
    while calls.len() >= CALL {
        let (c, rest) = calls.split_at(CALL);
        calls = rest;
        let sel = u16::from_le_bytes([c[0], c[1]]);
        let mut args = [0u64; HCALL_ARGS];
        for (i, a) in args.iter_mut().enumerate() {
            let b = &c[2 + 8 * i..10 + 8 * i];
            *a = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        }
        // Mostly the registered opcodes, sometimes anything (odd, huge, unregistered).
        let raw = match sel % 4 {
            0 => H_PUT_TCE_INDIRECT.raw(),
            1 => H_RTAS.raw(),
            2 => u64::from(sel),
            _ => args[8],
        };
        let r = table.dispatch(&ctx, raw, args);
        let known = Opcode::new(raw).is_some_and(|o| table.is_registered(o));
        if !known {
            assert_eq!(r.status, H_FUNCTION, "opcode {raw:#x}");
        }
        if raw == H_RTAS.raw() && !in_ram(args[0], 12) {
            assert_eq!(r.status, H_PARAMETER, "RTAS buffer at {:#x}", args[0]);
        }
    }
}
