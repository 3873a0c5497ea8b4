//! `H_PUT_TERM_CHAR` / `H_GET_TERM_CHAR`: the PAPR virtual terminal on the VMM's console.
//!
//! Terminal number 0 is the console (a POWER guest learns a vty's number from the
//! device tree; these guests have one terminal). Up to 16 characters travel in two
//! registers, packed big-endian: the first character is the top byte of `chars0_7`.
//! Output goes to the same place as the 16550's (the same lock, so bytes from the UART
//! and from the hypercall never interleave mid-write); input is taken from the UART's
//! receive FIFO, i.e. from `--console-input`. Errors: another terminal number or a
//! length over 16 is `H_PARAMETER`.

use std::sync::Arc;

use super::papr::{H_GET_TERM_CHAR, H_PARAMETER, H_PUT_TERM_CHAR, H_SUCCESS};
use super::{Hcall, HcallContext, HcallReturn, HypercallHandler};

/// The console's terminal number.
pub const CONSOLE_TERMNO: u64 = 0;
/// Most characters per call.
pub const MAX_TERM_CHARS: usize = 16;

/// Where a virtual terminal's characters go and come from.
pub trait Terminal: Send + Sync {
    /// Output `bytes`.
    fn put(&self, bytes: &[u8]);
    /// Input: fill the front of `buf`; the number of bytes (0 when none is waiting).
    fn get(&self, buf: &mut [u8]) -> usize;
}

impl Terminal for crate::serial::SerialConsole {
    fn put(&self, bytes: &[u8]) {
        self.write_output(bytes);
    }
    fn get(&self, buf: &mut [u8]) -> usize {
        self.take_input(buf)
    }
}

/// The two terminal calls on one [`Terminal`].
pub struct TermHandler {
    term: Arc<dyn Terminal>,
}

impl TermHandler {
    /// Calls on `term`.
    pub fn new(term: Arc<dyn Terminal>) -> Self {
        TermHandler { term }
    }
}

/// Serve the terminal calls on `term`, each unless `table` already has a handler for it
/// (a platform's own terminal wins).
pub fn register_default(table: &mut super::Hypercalls, term: Arc<dyn Terminal>) {
    let h: Arc<dyn HypercallHandler> = Arc::new(TermHandler::new(term));
    for o in [H_PUT_TERM_CHAR, H_GET_TERM_CHAR] {
        if !table.is_registered(o) {
            // Cannot fail: the opcode is free and not reserved.
            let _ = table.register(o, h.clone());
        }
    }
}

/// Pack up to 16 bytes into two big-endian registers.
pub fn pack_chars(bytes: &[u8]) -> (u64, u64) {
    let mut b = [0u8; MAX_TERM_CHARS];
    let n = bytes.len().min(MAX_TERM_CHARS);
    b[..n].copy_from_slice(&bytes[..n]);
    let (hi, lo) = b.split_at(8);
    (
        u64::from_be_bytes(hi.try_into().unwrap_or([0; 8])),
        u64::from_be_bytes(lo.try_into().unwrap_or([0; 8])),
    )
}

impl HypercallHandler for TermHandler {
    fn hcall(&self, _ctx: &HcallContext<'_>, call: &Hcall) -> HcallReturn {
        if call.arg(0) != CONSOLE_TERMNO {
            return HcallReturn::status(H_PARAMETER);
        }
        if call.opcode == H_PUT_TERM_CHAR {
            let len = call.arg(1);
            if len > MAX_TERM_CHARS as u64 {
                return HcallReturn::status(H_PARAMETER);
            }
            let mut b = [0u8; MAX_TERM_CHARS];
            b[..8].copy_from_slice(&call.arg(2).to_be_bytes());
            b[8..].copy_from_slice(&call.arg(3).to_be_bytes());
            self.term.put(&b[..len as usize]);
            HcallReturn::status(H_SUCCESS)
        } else if call.opcode == H_GET_TERM_CHAR {
            let mut b = [0u8; MAX_TERM_CHARS];
            let n = self.term.get(&mut b).min(MAX_TERM_CHARS);
            let (c0, c1) = pack_chars(&b[..n]);
            HcallReturn::with_rets(H_SUCCESS, [n as u64, c0, c1])
        } else {
            HcallReturn::status(super::papr::H_FUNCTION)
        }
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;

    use super::super::guest_mem::tests::ram;
    use super::super::papr::H_FUNCTION;
    use super::super::Opcode;
    use super::*;

    #[derive(Default)]
    struct Fake {
        out: Mutex<Vec<u8>>,
        input: Mutex<Vec<u8>>,
    }
    impl Terminal for Fake {
        fn put(&self, bytes: &[u8]) {
            self.out.lock().extend_from_slice(bytes);
        }
        fn get(&self, buf: &mut [u8]) -> usize {
            let mut i = self.input.lock();
            let n = i.len().min(buf.len());
            buf[..n].copy_from_slice(&i[..n]);
            i.drain(..n);
            n
        }
    }

    fn call(opcode: Opcode, args: &[u64]) -> Hcall {
        let mut a = [0u64; super::super::HCALL_ARGS];
        a[..args.len()].copy_from_slice(args);
        Hcall { opcode, args: a }
    }

    #[test]
    fn put_and_get_pack_big_endian() {
        let m = ram(0x1000);
        let ctx = HcallContext::new(&m, 0);
        let fake = Arc::new(Fake::default());
        let h = TermHandler::new(fake.clone());
        let (c0, c1) = pack_chars(b"hello, terminal!");
        assert_eq!(c0, u64::from_be_bytes(*b"hello, t"));
        let r = h.hcall(&ctx, &call(H_PUT_TERM_CHAR, &[0, 16, c0, c1]));
        assert_eq!(r.status, H_SUCCESS);
        let r = h.hcall(&ctx, &call(H_PUT_TERM_CHAR, &[0, 3, c0, c1]));
        assert_eq!(r.status, H_SUCCESS);
        assert_eq!(&*fake.out.lock(), b"hello, terminal!hel");
        // Too long, another terminal: nothing written.
        for args in [[0, 17, c0, c1], [1, 1, c0, c1], [0, u64::MAX, c0, c1]] {
            assert_eq!(
                h.hcall(&ctx, &call(H_PUT_TERM_CHAR, &args)).status,
                H_PARAMETER
            );
        }
        assert_eq!(fake.out.lock().len(), 19);
        // Input: 20 bytes waiting come out 16 + 4, then none.
        fake.input.lock().extend_from_slice(b"0123456789abcdefWXYZ");
        let r = h.hcall(&ctx, &call(H_GET_TERM_CHAR, &[0]));
        assert_eq!(r.status, H_SUCCESS);
        assert_eq!(r.rets[0], 16);
        assert_eq!(r.rets[1], u64::from_be_bytes(*b"01234567"));
        assert_eq!(r.rets[2], u64::from_be_bytes(*b"89abcdef"));
        let r = h.hcall(&ctx, &call(H_GET_TERM_CHAR, &[0]));
        assert_eq!(&r.rets[..3], &[4, u64::from_be_bytes(*b"WXYZ\0\0\0\0"), 0]);
        let r = h.hcall(&ctx, &call(H_GET_TERM_CHAR, &[0]));
        assert_eq!((r.status, r.rets[0]), (H_SUCCESS, 0));
        assert_eq!(
            h.hcall(&ctx, &call(H_GET_TERM_CHAR, &[7])).status,
            H_PARAMETER
        );
        assert_eq!(
            h.hcall(&ctx, &call(super::super::papr::H_CEDE, &[0]))
                .status,
            H_FUNCTION
        );
    }
}
