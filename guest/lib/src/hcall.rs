//! PAPR hypercalls through the nestio hypercall port (the VMM side is
//! `nestio_vmm::hypercall`, which documents the ABI).
//!
//! `rax` = opcode, `rdi rsi rdx r10 r8 r9 r12 r13 r14` = arguments 0..8, then a 32-bit
//! `out` to port 0xe0. On return `rax` holds the return code and the nine argument
//! registers the return values (0 where the call has none).

use core::arch::asm;

/// Guest/VMM contract: the hypercall doorbell port.
pub const HYPERCALL_PORT: u16 = 0xe0;

/// Success.
pub const H_SUCCESS: i64 = 0;
/// Function not supported.
pub const H_FUNCTION: i64 = -2;
/// Bad parameter.
pub const H_PARAMETER: i64 = -4;
/// Not found.
pub const H_NOT_FOUND: i64 = -7;

/// `H_GET_TCE`.
pub const H_GET_TCE: u64 = 0x1C;
/// `H_PUT_TCE`.
pub const H_PUT_TCE: u64 = 0x20;
/// `H_GET_TERM_CHAR`.
pub const H_GET_TERM_CHAR: u64 = 0x54;
/// `H_PUT_TERM_CHAR`.
pub const H_PUT_TERM_CHAR: u64 = 0x58;
/// `H_PUT_TCE_INDIRECT`.
pub const H_PUT_TCE_INDIRECT: u64 = 0x13C;
/// `H_RTAS`.
pub const H_RTAS: u64 = 0xF000;
/// nestio: RTAS token by name (`name_addr, name_len` -> token).
pub const H_NESTIO_RTAS_TOKEN: u64 = 0xFF00;

/// A hypercall's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HcallRet {
    /// Return code.
    pub status: i64,
    /// Return values 0..8.
    pub rets: [u64; 9],
}

/// Make hypercall `opcode` with `args` (missing ones are 0). Inlined, so constant
/// arguments become plain register loads: every guest instruction may be emulated.
#[inline(always)]
pub fn hcall(opcode: u64, args: &[u64]) -> HcallRet {
    let mut a = [0u64; 9];
    let n = args.len().min(9);
    a[..n].copy_from_slice(&args[..n]);
    let status: u64;
    // SAFETY: the out exits to the VMM, which may read and write guest memory named by
    // the arguments (hence no `nomem`: the compiler must not cache memory across it)
    // and replaces exactly the listed registers; the stack is untouched.
    unsafe {
        asm!(
            "out 0xe0, eax",
            inout("rax") opcode => status,
            inout("rdi") a[0] => a[0],
            inout("rsi") a[1] => a[1],
            inout("rdx") a[2] => a[2],
            inout("r10") a[3] => a[3],
            inout("r8") a[4] => a[4],
            inout("r9") a[5] => a[5],
            inout("r12") a[6] => a[6],
            inout("r13") a[7] => a[7],
            inout("r14") a[8] => a[8],
            options(nostack, preserves_flags),
        );
    }
    HcallRet {
        status: status as i64,
        rets: a,
    }
}

/// Write up to 16 bytes to the console terminal with `H_PUT_TERM_CHAR`; the return code.
pub fn put_term_chars(bytes: &[u8]) -> i64 {
    let mut b = [0u8; 16];
    let n = bytes.len().min(16);
    b[..n].copy_from_slice(&bytes[..n]);
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&b[..8]);
    lo.copy_from_slice(&b[8..]);
    hcall(
        H_PUT_TERM_CHAR,
        &[0, n as u64, u64::from_be_bytes(hi), u64::from_be_bytes(lo)],
    )
    .status
}

/// Read up to 16 waiting bytes from the console terminal into `buf`: the count, or the
/// (negative) return code.
pub fn get_term_chars(buf: &mut [u8; 16]) -> Result<usize, i64> {
    let r = hcall(H_GET_TERM_CHAR, &[0]);
    if r.status != H_SUCCESS {
        return Err(r.status);
    }
    buf[..8].copy_from_slice(&r.rets[1].to_be_bytes());
    buf[8..].copy_from_slice(&r.rets[2].to_be_bytes());
    Ok((r.rets[0] as usize).min(16))
}

/// The RTAS token of `name`, or the return code.
pub fn rtas_token(name: &str) -> Result<u32, i64> {
    let r = hcall(
        H_NESTIO_RTAS_TOKEN,
        &[name.as_ptr() as u64, name.len() as u64],
    );
    if r.status == H_SUCCESS {
        Ok(r.rets[0] as u32)
    } else {
        Err(r.status)
    }
}

/// A PAPR `rtas_args` buffer (big-endian cells), for `H_RTAS`.
#[repr(C, align(8))]
pub struct RtasArgs {
    /// token, nargs, nret, then args and rets: all big-endian.
    pub cells: [u32; 19],
}

impl RtasArgs {
    /// A call of `token` with `args` and room for `nret` return cells.
    pub fn new(token: u32, args: &[u32], nret: u32) -> RtasArgs {
        let mut cells = [0u32; 19];
        cells[0] = token.to_be();
        cells[1] = (args.len() as u32).to_be();
        cells[2] = nret.to_be();
        for (i, a) in args.iter().take(16).enumerate() {
            cells[3 + i] = a.to_be();
        }
        RtasArgs { cells }
    }

    /// Return cell `i` (`rets[0]` is the status), host order.
    pub fn ret(&self, i: usize) -> u32 {
        let nargs = u32::from_be(self.cells[1]) as usize;
        self.cells
            .get(3 + nargs + i)
            .map(|c| u32::from_be(*c))
            .unwrap_or(0)
    }

    /// Make the call: `H_RTAS` with this buffer's address.
    pub fn call(&mut self) -> i64 {
        let addr = self.cells.as_mut_ptr() as u64;
        hcall(H_RTAS, &[addr]).status
    }
}
