//! RTAS through `H_RTAS`: the argument buffer decoded with checks, calls dispatched by
//! token to handlers registered by name.
//!
//! The guest passes the guest-physical address of a PAPR `rtas_args` buffer in the
//! first argument register. Its layout (all cells big-endian u32, as on POWER):
//!
//! ```text
//! +0   token
//! +4   nargs
//! +8   nret
//! +12  args[nargs]
//! +12+4*nargs  rets[nret]      rets[0] is the RTAS status
//! ```
//!
//! Checks, all before any handler runs: the 12-byte header and the whole
//! `args`+`rets` array must be guest RAM (overflow-checked); `nargs + nret` is at most
//! [`RTAS_MAX_CELLS`] (16, Linux's `struct rtas_args`); `nret` is at least 1 (the status
//! needs a cell). A buffer failing these gets `H_PARAMETER` and nothing is written (KVM
//! on POWER would stop the guest; QEMU would read and write past the buffer). A token no
//! call is registered for gets status [`RTAS_OUT_PARAM_ERROR`] in `rets[0]` and
//! `H_PARAMETER`, as QEMU answers. Otherwise the handler runs, its status goes to
//! `rets[0]`, its outputs to `rets[1..]`, and `H_RTAS` returns `H_SUCCESS`.
//!
//! Tokens are assigned at registration from [`RTAS_TOKEN_BASE`] (0x2000, like QEMU)
//! in registration order. A POWER guest learns them from the device tree's `/rtas`
//! node; these guests have none, so nestio answers
//! [`H_NESTIO_RTAS_TOKEN`](super::papr::H_NESTIO_RTAS_TOKEN) (`name_gpa, name_len` ->
//! token) instead.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::guest_mem::GuestMem;
use super::papr::{HStatus, H_NOT_FOUND, H_PARAMETER, H_SUCCESS};
use super::{HcallContext, HypercallError};

/// First token handed out.
pub const RTAS_TOKEN_BASE: u32 = 0x2000;
/// Most argument + return cells in one call (Linux's `rtas_args.args[16]`).
pub const RTAS_MAX_CELLS: u32 = 16;
/// Longest RTAS call name (`ibm,query-pe-dma-window` is 23).
pub const RTAS_MAX_NAME: usize = 64;
/// Bytes before `args`.
const HEADER: u64 = 12;

/// An RTAS status (PAPR; stored in `rets[0]` as a big-endian two's-complement cell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtasStatus(pub i32);

/// Success.
pub const RTAS_OUT_SUCCESS: RtasStatus = RtasStatus(0);
/// Hardware error.
pub const RTAS_OUT_HW_ERROR: RtasStatus = RtasStatus(-1);
/// Busy, retry.
pub const RTAS_OUT_BUSY: RtasStatus = RtasStatus(-2);
/// Parameter error (also "not supported" and "no such indicator": all -3 in PAPR).
pub const RTAS_OUT_PARAM_ERROR: RtasStatus = RtasStatus(-3);
/// Not authorised.
pub const RTAS_OUT_NOT_AUTHORIZED: RtasStatus = RtasStatus(-9002);

/// An RTAS token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RtasToken(pub u32);

/// One RTAS call (e.g. `ibm,create-pe-dma-window`).
pub trait RtasCall: Send + Sync {
    /// Serve a call: `args` are the `nargs` input cells, `rets` the `nret - 1` output
    /// cells after the status (zeroed); the returned status goes to `rets[0]`. Check
    /// `args.len()` / `rets.len()` against the call's layout (PAPR: parameter error).
    fn call(&self, ctx: &HcallContext<'_>, args: &[u32], rets: &mut [u32]) -> RtasStatus;
}

impl<F> RtasCall for F
where
    F: Fn(&HcallContext<'_>, &[u32], &mut [u32]) -> RtasStatus + Send + Sync,
{
    fn call(&self, ctx: &HcallContext<'_>, args: &[u32], rets: &mut [u32]) -> RtasStatus {
        self(ctx, args, rets)
    }
}

/// A decoded, checked `rtas_args` buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtasArgs {
    /// Guest-physical address of the buffer.
    pub gpa: u64,
    /// The token.
    pub token: RtasToken,
    /// Input cells.
    pub args: Vec<u32>,
    /// `nret` (at least 1).
    pub nret: u32,
}

impl RtasArgs {
    /// Read and check the buffer at `gpa` (see the module documentation).
    pub fn decode(mem: &GuestMem<'_>, gpa: u64) -> Result<RtasArgs, RtasDecodeError> {
        let cell = |i: u64| mem.read_be_u32(gpa.wrapping_add(4 * i));
        mem.check(gpa, HEADER)
            .map_err(|_| RtasDecodeError::Buffer { gpa })?;
        let (token, nargs, nret) = match (cell(0), cell(1), cell(2)) {
            (Ok(t), Ok(a), Ok(r)) => (t, a, r),
            _ => return Err(RtasDecodeError::Buffer { gpa }),
        };
        if nret == 0 || nargs.checked_add(nret).is_none_or(|n| n > RTAS_MAX_CELLS) {
            return Err(RtasDecodeError::Cells { nargs, nret });
        }
        let cells = u64::from(nargs + nret);
        mem.check(gpa + HEADER, 4 * cells)
            .map_err(|_| RtasDecodeError::Buffer { gpa })?;
        let mut args = Vec::with_capacity(nargs as usize);
        for i in 0..u64::from(nargs) {
            args.push(cell(3 + i).map_err(|_| RtasDecodeError::Buffer { gpa })?);
        }
        Ok(RtasArgs {
            gpa,
            token: RtasToken(token),
            args,
            nret,
        })
    }

    /// Guest-physical address of `rets[0]`.
    fn rets_gpa(&self) -> u64 {
        self.gpa + HEADER + 4 * self.args.len() as u64
    }

    /// Store the status and outputs (`outs.len() == nret - 1`).
    fn write_rets(&self, mem: &GuestMem<'_>, status: RtasStatus, outs: &[u32]) {
        let base = self.rets_gpa();
        // The range was checked in `decode`; guest RAM does not shrink.
        let mut r = mem.write_be_u32(base, status.0 as u32);
        for (i, v) in outs.iter().enumerate() {
            r = r.and(mem.write_be_u32(base + 4 * (i as u64 + 1), *v));
        }
        if let Err(e) = r {
            tracing::warn!(error = %e, "RTAS return cells not written");
        }
    }
}

/// A bad `rtas_args` buffer (the call answers `H_PARAMETER`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RtasDecodeError {
    /// The buffer is not (entirely) guest RAM.
    #[error("the RTAS argument buffer at guest-physical {gpa:#x} is not (entirely) guest RAM")]
    Buffer {
        /// Its address.
        gpa: u64,
    },
    /// Impossible cell counts.
    #[error("RTAS call with nargs {nargs} and nret {nret}: nret must be at least 1 and nargs + nret at most 16")]
    Cells {
        /// nargs.
        nargs: u32,
        /// nret.
        nret: u32,
    },
}

struct Entry {
    name: String,
    call: Arc<dyn RtasCall>,
}

/// The platform's RTAS calls, by token and by name.
#[derive(Clone, Default)]
pub struct Rtas {
    by_token: BTreeMap<RtasToken, Arc<Entry>>,
    by_name: BTreeMap<String, RtasToken>,
}

impl std::fmt::Debug for Rtas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.by_name.iter().map(|(n, t)| (n, format!("{:#x}", t.0))))
            .finish()
    }
}

impl Rtas {
    /// Register `call` under `name`; returns its token.
    pub fn register(
        &mut self,
        name: &str,
        call: Arc<dyn RtasCall>,
    ) -> Result<RtasToken, HypercallError> {
        if name.is_empty() || name.len() > RTAS_MAX_NAME || !name.is_ascii() {
            return Err(HypercallError::RtasName(name.into()));
        }
        if self.by_name.contains_key(name) {
            return Err(HypercallError::RtasDuplicate(name.into()));
        }
        let token = RtasToken(RTAS_TOKEN_BASE + self.by_token.len() as u32);
        self.by_token.insert(
            token,
            Arc::new(Entry {
                name: name.into(),
                call,
            }),
        );
        self.by_name.insert(name.into(), token);
        Ok(token)
    }

    /// The token of `name`.
    pub fn token(&self, name: &str) -> Option<RtasToken> {
        self.by_name.get(name).copied()
    }

    /// Serve `H_RTAS` with the buffer at `gpa`.
    pub fn hcall(&self, ctx: &HcallContext<'_>, gpa: u64) -> HStatus {
        let a = match RtasArgs::decode(&ctx.mem, gpa) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "H_RTAS refused");
                return H_PARAMETER;
            }
        };
        let mut outs = vec![0u32; a.nret as usize - 1];
        let Some(entry) = self.by_token.get(&a.token) else {
            tracing::debug!(token = a.token.0, "H_RTAS: unknown token");
            a.write_rets(&ctx.mem, RTAS_OUT_PARAM_ERROR, &outs);
            return H_PARAMETER;
        };
        let status = entry.call.call(ctx, &a.args, &mut outs);
        tracing::trace!(call = %entry.name, ?status, "RTAS");
        a.write_rets(&ctx.mem, status, &outs);
        H_SUCCESS
    }

    /// Serve `H_NESTIO_RTAS_TOKEN`: the name is `len` bytes at `gpa`; the token in
    /// `ret 0`. A bad buffer or length is `H_PARAMETER`, an unknown name `H_NOT_FOUND`.
    pub fn token_hcall(&self, ctx: &HcallContext<'_>, gpa: u64, len: u64) -> (HStatus, u64) {
        if len == 0 || len > RTAS_MAX_NAME as u64 {
            return (H_PARAMETER, 0);
        }
        let mut name = vec![0u8; len as usize];
        if ctx.mem.read(gpa, &mut name).is_err() {
            return (H_PARAMETER, 0);
        }
        match std::str::from_utf8(&name).ok().and_then(|n| self.token(n)) {
            Some(t) => (H_SUCCESS, u64::from(t.0)),
            None => (H_NOT_FOUND, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::guest_mem::tests::ram;
    use super::*;

    fn put(mem: &GuestMem<'_>, gpa: u64, cells: &[u32]) {
        for (i, c) in cells.iter().enumerate() {
            mem.write_be_u32(gpa + 4 * i as u64, *c).unwrap();
        }
    }

    fn sum_table() -> (Rtas, RtasToken) {
        let mut r = Rtas::default();
        let sum: Arc<dyn RtasCall> = Arc::new(|_: &HcallContext<'_>, a: &[u32], r: &mut [u32]| {
            if r.len() != 1 {
                return RTAS_OUT_PARAM_ERROR;
            }
            r[0] = a.iter().fold(0u32, |s, v| s.wrapping_add(*v));
            RTAS_OUT_SUCCESS
        });
        let t = r.register("nestio,sum", sum).unwrap();
        (r, t)
    }

    #[test]
    fn decodes_and_dispatches_by_token() {
        let m = ram(0x10000);
        let ctx = HcallContext::new(&m, 0);
        let (rtas, token) = sum_table();
        assert_eq!(token, RtasToken(RTAS_TOKEN_BASE));
        put(&ctx.mem, 0x1000, &[token.0, 3, 2, 1, 2, 3, 0xaaaa, 0xbbbb]);
        let a = RtasArgs::decode(&ctx.mem, 0x1000).unwrap();
        assert_eq!(a.args, vec![1, 2, 3]);
        assert_eq!(a.nret, 2);
        assert_eq!(rtas.hcall(&ctx, 0x1000), H_SUCCESS);
        assert_eq!(ctx.mem.read_be_u32(0x1000 + 24).unwrap(), 0, "status");
        assert_eq!(ctx.mem.read_be_u32(0x1000 + 28).unwrap(), 6, "sum");
        // The handler's own parameter check: wrong nret.
        put(
            &ctx.mem,
            0x1000,
            &[token.0, 1, 3, 5, 0xaaaa, 0xbbbb, 0xcccc],
        );
        assert_eq!(rtas.hcall(&ctx, 0x1000), H_SUCCESS);
        assert_eq!(ctx.mem.read_be_u32(0x1000 + 16).unwrap() as i32, -3);
        assert_eq!(
            ctx.mem.read_be_u32(0x1000 + 20).unwrap(),
            0,
            "outputs zeroed"
        );
    }

    #[test]
    fn bad_buffers_are_h_parameter_and_write_nothing() {
        let m = ram(0x10000);
        let ctx = HcallContext::new(&m, 0);
        let (rtas, token) = sum_table();
        // Header past RAM, wrapping, straddling the end.
        for gpa in [0x10000, u64::MAX - 3, 0x10000 - 8] {
            assert_eq!(
                RtasArgs::decode(&ctx.mem, gpa),
                Err(RtasDecodeError::Buffer { gpa })
            );
            assert_eq!(rtas.hcall(&ctx, gpa), H_PARAMETER);
        }
        // Cells past RAM: header fits, args do not.
        put(&ctx.mem, 0x10000 - 12, &[token.0, 3, 1]);
        assert_eq!(rtas.hcall(&ctx, 0x10000 - 12), H_PARAMETER);
        // Counts.
        for (nargs, nret) in [(0, 0), (16, 1), (1, 16), (u32::MAX, 2), (2, u32::MAX)] {
            put(
                &ctx.mem,
                0x2000,
                &[token.0, nargs, nret, 0x05e4_71e1, 0x05e4_71e1],
            );
            assert_eq!(
                RtasArgs::decode(&ctx.mem, 0x2000),
                Err(RtasDecodeError::Cells { nargs, nret })
            );
            assert_eq!(rtas.hcall(&ctx, 0x2000), H_PARAMETER);
            assert_eq!(
                ctx.mem.read_be_u32(0x200c).unwrap(),
                0x05e4_71e1,
                "untouched"
            );
            assert_eq!(
                ctx.mem.read_be_u32(0x2010).unwrap(),
                0x05e4_71e1,
                "untouched"
            );
        }
        // 15 + 1 is the most.
        let mut cells = vec![token.0, 15, 1];
        cells.extend(1..=15u32);
        cells.push(0xffff_ffff);
        put(&ctx.mem, 0x3000, &cells);
        assert!(RtasArgs::decode(&ctx.mem, 0x3000).is_ok());
    }

    #[test]
    fn random_buffers_never_panic_and_obey_the_limits() {
        let m = ram(0x1000);
        let ctx = HcallContext::new(&m, 0);
        let (rtas, token) = sum_table();
        // xorshift: deterministic, no dependency.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let gpa = match next() % 4 {
                0 => next(),
                1 => 0x1000 - (next() % 80),
                _ => next() % 0x1000,
            };
            let small = |v: u64| (v % 20) as u32;
            let cells = [
                if next() % 2 == 0 {
                    token.0
                } else {
                    next() as u32
                },
                if next() % 4 == 0 {
                    next() as u32
                } else {
                    small(next())
                },
                if next() % 4 == 0 {
                    next() as u32
                } else {
                    small(next())
                },
            ];
            if gpa <= 0x1000 - 12 {
                put(&ctx.mem, gpa, &cells);
            }
            match RtasArgs::decode(&ctx.mem, gpa) {
                Ok(a) => {
                    assert!(a.nret >= 1 && a.args.len() as u32 + a.nret <= RTAS_MAX_CELLS);
                    let end = gpa + HEADER + 4 * (a.args.len() as u64 + u64::from(a.nret));
                    assert!(end <= 0x1000, "decoded a buffer running past RAM");
                }
                Err(_) => assert_eq!(rtas.hcall(&ctx, gpa), H_PARAMETER),
            }
        }
    }

    #[test]
    fn unknown_token_gets_param_error_status() {
        let m = ram(0x10000);
        let ctx = HcallContext::new(&m, 0);
        let (rtas, _) = sum_table();
        put(&ctx.mem, 0x1000, &[0x1234, 0, 2, 0x5555, 0x6666]);
        assert_eq!(rtas.hcall(&ctx, 0x1000), H_PARAMETER);
        assert_eq!(ctx.mem.read_be_u32(0x100c).unwrap() as i32, -3);
        assert_eq!(ctx.mem.read_be_u32(0x1010).unwrap(), 0);
    }

    #[test]
    fn names_and_token_lookup() {
        let m = ram(0x10000);
        let ctx = HcallContext::new(&m, 0);
        let (mut rtas, token) = sum_table();
        let nop: Arc<dyn RtasCall> =
            Arc::new(|_: &HcallContext<'_>, _: &[u32], _: &mut [u32]| RTAS_OUT_SUCCESS);
        assert!(matches!(
            rtas.register("nestio,sum", nop.clone()),
            Err(HypercallError::RtasDuplicate(_))
        ));
        assert!(rtas.register("", nop.clone()).is_err());
        assert!(rtas.register(&"x".repeat(65), nop.clone()).is_err());
        let t2 = rtas.register("ibm,create-pe-dma-window", nop).unwrap();
        assert_eq!(t2, RtasToken(RTAS_TOKEN_BASE + 1));
        ctx.mem.write(0x100, b"nestio,sum").unwrap();
        assert_eq!(
            rtas.token_hcall(&ctx, 0x100, 10),
            (H_SUCCESS, token.0 as u64)
        );
        assert_eq!(rtas.token_hcall(&ctx, 0x100, 9), (H_NOT_FOUND, 0));
        assert_eq!(rtas.token_hcall(&ctx, 0x100, 0), (H_PARAMETER, 0));
        assert_eq!(rtas.token_hcall(&ctx, 0x100, 1 << 40), (H_PARAMETER, 0));
        assert_eq!(rtas.token_hcall(&ctx, 0xfffc, 10), (H_PARAMETER, 0));
        assert_eq!(rtas.token_hcall(&ctx, u64::MAX, 10), (H_PARAMETER, 0));
        assert!(format!("{rtas:?}").contains("ibm,create-pe-dma-window"));
    }
}
