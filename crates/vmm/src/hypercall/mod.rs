//! The hypercall entry: PAPR hypercalls from a guest of this x86 KVM VMM, dispatched to
//! handlers the platform registers (the sPAPR TCE IOMMU, XIVE, the virtual terminal...).
//!
//! # Why a port doorbell
//!
//! On x86 KVM handles `vmcall`/`vmmcall` itself, in the kernel (the `KVM_HC_*` calls);
//! only `KVM_HC_MAP_GPA_RANGE` can be forwarded to user space (`KVM_CAP_EXIT_HYPERCALL`).
//! A user-space hypercall is therefore a port-I/O doorbell: one `out` to a fixed port
//! exits to the VMM, which reads the guest's registers (`KVM_GET_REGS`), runs the call,
//! writes the results back (`KVM_SET_REGS`) and resumes the guest after the `out`. The
//! KVM tests (`crates/vmm/tests/hypercall.rs`) check that register writes on this exit
//! reach the guest, on a host where KVM emulates the guest's instructions too.
//!
//! # The ABI (guest side: `nestio_guest::hcall`)
//!
//! PAPR passes the opcode in `r3`, up to 9 arguments in `r4..r12`, and gets the return
//! code in `r3` and up to 9 return values (the "retbuf") in `r4..r12`. On x86:
//!
//! | PAPR | x86 | in | out |
//! |---|---|---|---|
//! | r3 | `rax` | opcode | return code (sign-extended, [`HStatus`]) |
//! | r4..r12 | `rdi rsi rdx r10 r8 r9 r12 r13 r14` ([`ARG_REGS`]) | arguments 0..8 | return values 0..8 |
//!
//! then `out 0xe0, eax` ([`HYPERCALL_PORT`]; a 32-bit write in the immediate-port form,
//! which needs a port below 0x100 and keeps `dx` free for an argument; nothing on a PC
//! decodes 0xe0, and neither KVM's in-kernel PIC/PIT nor this VMM's bus has it). The nine argument registers are always overwritten with the
//! return buffer, 0 where the call returns nothing (like POWER's volatile `r4..r12`);
//! every other register, `rip` aside, is preserved. Other accesses to the port (8- or
//! 16-bit, string I/O, reads) are not hypercalls: writes are ignored, reads return
//! all-ones. Registers carry plain 64-bit values, no byte order; structures in guest
//! memory keep PAPR's big-endian layout (RTAS buffers, TCE lists), so traces of a POWER
//! guest replay unchanged.
//!
//! Only guest code allowed port I/O (CPL <= IOPL, or the TSS I/O bitmap) can ring the
//! doorbell; anything else takes a #GP inside the guest, the x86 counterpart of PAPR
//! reserving `sc 1` for the supervisor, so handlers do not check privilege.
//!
//! # Dispatch
//!
//! [`Hypercalls`] maps opcodes ([`Opcode`]: multiples of 4 up to `0xFFFC`) to
//! [`HypercallHandler`]s; one handler may serve several opcodes (all of XIVE's
//! `H_INT_*`, [`papr::H_INT_ALL`]). An opcode nobody registered, or a number that is not
//! an opcode, answers `H_FUNCTION`. `H_RTAS` is built in: its buffer is decoded and the
//! call dispatched by token to the [`rtas::RtasCall`] registered under its name
//! ([`Hypercalls::register_rtas`]); `H_NESTIO_RTAS_TOKEN` maps a name to its token.
//! The platform (`Vm::new`) adds the virtual terminal ([`console`]) unless
//! [`crate::VmConfig::hypercalls`] already claims its opcodes.
//!
//! Handlers get a [`HcallContext`] with checked guest memory ([`GuestMem`]): a
//! guest-physical address from an argument is hostile, so every access is bounds- and
//! overflow-checked and fails with an error the handler turns into `H_PARAMETER` (or
//! its call's PAPR code) — never a panic.
//!
//! # Plugging in a model
//!
//! ```
//! use std::sync::Arc;
//! use nestio_vmm::hypercall::papr::{H_GET_TCE, H_PARAMETER, H_SUCCESS};
//! use nestio_vmm::hypercall::rtas::{RTAS_OUT_PARAM_ERROR, RTAS_OUT_SUCCESS};
//! use nestio_vmm::hypercall::{Hcall, HcallContext, HcallReturn, Hypercalls};
//!
//! let mut hc = Hypercalls::new();
//! // H_GET_TCE(liobn, ioba) -> tce: a model would look the entry up in its table.
//! hc.register(H_GET_TCE, Arc::new(|_: &HcallContext<'_>, c: &Hcall| {
//!     if c.arg(0) != 0x8000_0000 {
//!         return HcallReturn::status(H_PARAMETER); // unknown LIOBN
//!     }
//!     HcallReturn::with_rets(H_SUCCESS, [0])
//! }))?;
//! // An RTAS call: 3 input cells, status + 1 output.
//! hc.register_rtas("ibm,query-pe-dma-window", Arc::new(
//!     |_: &HcallContext<'_>, args: &[u32], rets: &mut [u32]| {
//!         if args.len() != 3 || rets.len() != 1 {
//!             return RTAS_OUT_PARAM_ERROR;
//!         }
//!         rets[0] = 1; // e.g. windows available
//!         RTAS_OUT_SUCCESS
//!     },
//! ))?;
//! let mut cfg = nestio_vmm::VmConfig::new("payload.elf");
//! cfg.hypercalls = hc;
//! # Ok::<(), nestio_vmm::hypercall::HypercallError>(())
//! ```
//!
//! [`HcallContext::vcpu`] is the calling vCPU's index (always 0 while the VMM runs one
//! vCPU).
//!
//! Cost: the exit plus two register ioctls. With `KVM_CAP_SYNC_REGS` the registers
//! could travel in the run page instead (not done: it makes every exit copy them, and a
//! snapshot taken between the exit and the next entry would have to flush them).
//!
//! Not wired: `H_COPY_TOFROM_GUEST` (FACTS §3). `nestio_nested::copy` implements its
//! semantics, but an x86 payload has no nested guests registered with this VMM (no
//! `H_GUEST_CREATE` equivalent), so there is nothing for it to address yet; it plugs in
//! as an ordinary handler once levels are registered per VM.

pub mod console;
#[cfg(feature = "harness")]
pub mod fuzz;
pub mod guest_mem;
pub mod papr;
pub mod rtas;
pub mod tce;
pub mod xive;

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::kvm_regs;
use vm_memory::GuestMemoryMmap;

pub use guest_mem::{GuestMem, GuestMemError};
pub use papr::{HStatus, Opcode};
pub use rtas::{Rtas, RtasCall, RtasStatus, RtasToken};

use papr::{H_FUNCTION, H_NESTIO_RTAS_TOKEN, H_RTAS};

/// The hypercall doorbell port: a 32-bit `out` here is a hypercall.
pub const HYPERCALL_PORT: u16 = 0xe0;
/// Arguments (and return values) per call.
pub const HCALL_ARGS: usize = 9;
/// Return values per call (PAPR's `plpar_hcall9` retbuf).
pub const HCALL_RETS: usize = HCALL_ARGS;

/// Names of the x86 registers carrying arguments / return values 0..8, in order.
pub const ARG_REGS: [&str; HCALL_ARGS] =
    ["rdi", "rsi", "rdx", "r10", "r8", "r9", "r12", "r13", "r14"];

/// Errors of registering handlers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypercallError {
    /// The opcode already has a handler.
    #[error("hypercall {0} already has a handler; register each opcode once")]
    Duplicate(Opcode),
    /// The opcode is served by the VMM itself.
    #[error("hypercall {0} is built into the VMM; register RTAS calls with register_rtas instead")]
    Reserved(Opcode),
    /// An RTAS name registered twice.
    #[error("RTAS call {0:?} is already registered")]
    RtasDuplicate(String),
    /// An unusable RTAS name.
    #[error("RTAS call name {0:?} must be 1 to 64 ASCII characters")]
    RtasName(String),
}

/// One call as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hcall {
    /// The opcode.
    pub opcode: Opcode,
    /// Arguments 0..8 (PAPR `r4..r12`).
    pub args: [u64; HCALL_ARGS],
}

impl Hcall {
    /// Argument `i` (0 when `i` is out of range).
    pub fn arg(&self, i: usize) -> u64 {
        self.args.get(i).copied().unwrap_or(0)
    }
}

/// A call's outcome: the return code and the return buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HcallReturn {
    /// Return code.
    pub status: HStatus,
    /// Return values 0..8 (0 where the call has none).
    pub rets: [u64; HCALL_RETS],
}

impl HcallReturn {
    /// A return code without values.
    pub fn status(status: HStatus) -> Self {
        HcallReturn {
            status,
            rets: [0; HCALL_RETS],
        }
    }

    /// A return code with `N <= 9` values.
    pub fn with_rets<const N: usize>(status: HStatus, rets: [u64; N]) -> Self {
        const { assert!(N <= HCALL_RETS, "PAPR returns at most 9 values") };
        let mut r = Self::status(status);
        r.rets[..N].copy_from_slice(&rets);
        r
    }
}

/// What a handler may use besides its arguments.
pub struct HcallContext<'a> {
    /// Guest RAM, checked.
    pub mem: GuestMem<'a>,
    /// The calling vCPU's index.
    pub vcpu: u32,
}

impl<'a> HcallContext<'a> {
    /// A context over `mem` for vCPU `vcpu`.
    pub fn new(mem: &'a GuestMemoryMmap, vcpu: u32) -> Self {
        HcallContext {
            mem: GuestMem::new(mem),
            vcpu,
        }
    }
}

/// A handler of one or more hypercalls.
///
/// Runs on the calling vCPU's thread while that vCPU waits: keep it short, never block
/// on the guest. Must not panic on any argument.
pub trait HypercallHandler: Send + Sync {
    /// Serve `call`.
    fn hcall(&self, ctx: &HcallContext<'_>, call: &Hcall) -> HcallReturn;
}

impl<F> HypercallHandler for F
where
    F: Fn(&HcallContext<'_>, &Hcall) -> HcallReturn + Send + Sync,
{
    fn hcall(&self, ctx: &HcallContext<'_>, call: &Hcall) -> HcallReturn {
        self(ctx, call)
    }
}

/// The platform's hypercall table (see the module documentation).
#[derive(Clone, Default)]
pub struct Hypercalls {
    handlers: BTreeMap<Opcode, Arc<dyn HypercallHandler>>,
    rtas: Rtas,
}

impl std::fmt::Debug for Hypercalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hypercalls")
            .field("hcalls", &self.handlers.keys().collect::<Vec<_>>())
            .field("rtas", &self.rtas)
            .finish()
    }
}

impl Hypercalls {
    /// An empty table (only the built-in `H_RTAS` and `H_NESTIO_RTAS_TOKEN`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Serve `opcode` with `handler`.
    pub fn register(
        &mut self,
        opcode: Opcode,
        handler: Arc<dyn HypercallHandler>,
    ) -> Result<(), HypercallError> {
        self.register_all(&[opcode], handler)
    }

    /// Serve every opcode of `opcodes` with `handler`; all or nothing.
    pub fn register_all(
        &mut self,
        opcodes: &[Opcode],
        handler: Arc<dyn HypercallHandler>,
    ) -> Result<(), HypercallError> {
        for (i, &o) in opcodes.iter().enumerate() {
            if o == H_RTAS || o == H_NESTIO_RTAS_TOKEN {
                return Err(HypercallError::Reserved(o));
            }
            if self.handlers.contains_key(&o) || opcodes[..i].contains(&o) {
                return Err(HypercallError::Duplicate(o));
            }
        }
        for &o in opcodes {
            self.handlers.insert(o, handler.clone());
        }
        Ok(())
    }

    /// Whether `opcode` is served.
    pub fn is_registered(&self, opcode: Opcode) -> bool {
        opcode == H_RTAS || opcode == H_NESTIO_RTAS_TOKEN || self.handlers.contains_key(&opcode)
    }

    /// Serve the RTAS call `name` with `call`; returns its token.
    pub fn register_rtas(
        &mut self,
        name: &str,
        call: Arc<dyn RtasCall>,
    ) -> Result<RtasToken, HypercallError> {
        self.rtas.register(name, call)
    }

    /// The RTAS calls.
    pub fn rtas(&self) -> &Rtas {
        &self.rtas
    }

    /// Run the call `raw_opcode` with `args`.
    pub fn dispatch(
        &self,
        ctx: &HcallContext<'_>,
        raw_opcode: u64,
        args: [u64; HCALL_ARGS],
    ) -> HcallReturn {
        let Some(opcode) = Opcode::new(raw_opcode) else {
            tracing::debug!(opcode = raw_opcode, "not a hypercall number: H_FUNCTION");
            return HcallReturn::status(H_FUNCTION);
        };
        let r = if opcode == H_RTAS {
            HcallReturn::status(self.rtas.hcall(ctx, args[0]))
        } else if opcode == H_NESTIO_RTAS_TOKEN {
            let (s, t) = self.rtas.token_hcall(ctx, args[0], args[1]);
            HcallReturn::with_rets(s, [t])
        } else if let Some(h) = self.handlers.get(&opcode) {
            h.hcall(ctx, &Hcall { opcode, args })
        } else {
            tracing::debug!(%opcode, "unregistered hypercall: H_FUNCTION");
            HcallReturn::status(H_FUNCTION)
        };
        tracing::trace!(%opcode, ?args, status = %r.status, "hypercall");
        r
    }

    /// Run the call described by the guest's registers and store the outcome in them
    /// (the ABI of the module documentation).
    pub fn dispatch_regs(&self, ctx: &HcallContext<'_>, regs: &mut kvm_regs) -> HStatus {
        let r = self.dispatch(ctx, regs.rax, args_from_regs(regs));
        write_return(regs, &r);
        r.status
    }
}

/// The arguments in the guest's registers.
pub fn args_from_regs(r: &kvm_regs) -> [u64; HCALL_ARGS] {
    [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9, r.r12, r.r13, r.r14]
}

/// Store an outcome in the guest's registers.
pub fn write_return(r: &mut kvm_regs, ret: &HcallReturn) {
    r.rax = ret.status.to_reg();
    let [a, b, c, d, e, f, g, h, i] = ret.rets;
    (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9, r.r12, r.r13, r.r14) = (a, b, c, d, e, f, g, h, i);
}

#[cfg(test)]
mod tests {
    use super::guest_mem::tests::ram;
    use super::papr::*;
    use super::*;

    fn echo() -> Arc<dyn HypercallHandler> {
        // Returns its arguments reversed and the opcode as the 9th value.
        Arc::new(|_: &HcallContext<'_>, c: &Hcall| {
            let mut r = c.args;
            r.reverse();
            r[8] = c.opcode.raw();
            HcallReturn {
                status: H_SUCCESS,
                rets: r,
            }
        })
    }

    #[test]
    fn dispatches_registered_calls_and_answers_h_function_otherwise() {
        let m = ram(0x1000);
        let ctx = HcallContext::new(&m, 0);
        let mut hc = Hypercalls::new();
        hc.register_all(&H_TCE_ALL, echo()).unwrap();
        let args = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        let r = hc.dispatch(&ctx, H_PUT_TCE.raw(), args);
        assert_eq!(r.status, H_SUCCESS);
        assert_eq!(r.rets, [9, 8, 7, 6, 5, 4, 3, 2, 0x20]);
        assert_eq!(hc.dispatch(&ctx, H_STUFF_TCE.raw(), args).rets[8], 0x138);
        for bad in [0x24, 0x21, 0x1_0000, u64::MAX, H_INT_ESB.raw()] {
            let r = hc.dispatch(&ctx, bad, args);
            assert_eq!(r, HcallReturn::status(H_FUNCTION), "{bad:#x}");
        }
        assert!(hc.is_registered(H_GET_TCE) && hc.is_registered(H_RTAS));
        assert!(!hc.is_registered(H_INT_ESB));
    }

    #[test]
    fn registration_is_checked_and_all_or_nothing() {
        let mut hc = Hypercalls::new();
        hc.register(H_GET_TCE, echo()).unwrap();
        assert_eq!(
            hc.register(H_GET_TCE, echo()),
            Err(HypercallError::Duplicate(H_GET_TCE))
        );
        assert_eq!(
            hc.register_all(&H_TCE_ALL, echo()),
            Err(HypercallError::Duplicate(H_GET_TCE))
        );
        assert!(!hc.is_registered(H_PUT_TCE), "nothing of a failed batch");
        assert_eq!(
            hc.register_all(&[H_INT_ESB, H_INT_ESB], echo()),
            Err(HypercallError::Duplicate(H_INT_ESB))
        );
        assert_eq!(
            hc.register(H_RTAS, echo()),
            Err(HypercallError::Reserved(H_RTAS))
        );
        assert_eq!(
            hc.register(H_NESTIO_RTAS_TOKEN, echo()),
            Err(HypercallError::Reserved(H_NESTIO_RTAS_TOKEN))
        );
        hc.register_all(&H_INT_ALL, echo()).unwrap();
        assert!(format!("{hc:?}").contains("H_INT_RESET"));
    }

    #[test]
    fn registers_carry_the_call_and_its_outcome() {
        let m = ram(0x1000);
        let ctx = HcallContext::new(&m, 0);
        let mut hc = Hypercalls::new();
        hc.register(H_GET_TCE, echo()).unwrap();
        let mut regs = kvm_regs {
            rax: H_GET_TCE.raw(),
            rdi: 1,
            rsi: 2,
            rdx: 3,
            r10: 4,
            r8: 5,
            r9: 6,
            r12: 7,
            r13: 8,
            r14: 9,
            rbx: 0xb,
            rcx: 0xc,
            r11: 0x11,
            r15: 0x15,
            rbp: 0xbb,
            rsp: 0x55,
            rip: 0x1234,
            ..Default::default()
        };
        assert_eq!(hc.dispatch_regs(&ctx, &mut regs), H_SUCCESS);
        assert_eq!(regs.rax, 0);
        assert_eq!(
            args_from_regs(&regs),
            [9, 8, 7, 6, 5, 4, 3, 2, H_GET_TCE.raw()]
        );
        assert_eq!(
            (regs.rbx, regs.rcx, regs.r11, regs.r15, regs.rbp, regs.rsp, regs.rip),
            (0xb, 0xc, 0x11, 0x15, 0xbb, 0x55, 0x1234),
            "other registers untouched"
        );
        // Unknown: H_FUNCTION, and the argument registers are cleared.
        regs.rax = 0x400;
        assert_eq!(hc.dispatch_regs(&ctx, &mut regs), H_FUNCTION);
        assert_eq!(regs.rax as i64, -2);
        assert_eq!(args_from_regs(&regs), [0; 9]);
    }

    #[test]
    fn rtas_goes_through_the_table() {
        let m = ram(0x2000);
        let ctx = HcallContext::new(&m, 0);
        let mut hc = Hypercalls::new();
        let t = hc
            .register_rtas(
                "nestio,answer",
                Arc::new(|_: &HcallContext<'_>, _: &[u32], r: &mut [u32]| {
                    r[0] = 42;
                    rtas::RTAS_OUT_SUCCESS
                }),
            )
            .unwrap();
        ctx.mem.write(0x10, b"nestio,answer").unwrap();
        let r = hc.dispatch(
            &ctx,
            H_NESTIO_RTAS_TOKEN.raw(),
            [0x10, 13, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!((r.status, r.rets[0]), (H_SUCCESS, u64::from(t.0)));
        for (i, c) in [t.0, 0, 2, 7, 7].iter().enumerate() {
            ctx.mem.write_be_u32(0x100 + 4 * i as u64, *c).unwrap();
        }
        let r = hc.dispatch(&ctx, H_RTAS.raw(), [0x100, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.status, H_SUCCESS);
        assert_eq!(ctx.mem.read_be_u32(0x10c).unwrap(), 0);
        assert_eq!(ctx.mem.read_be_u32(0x110).unwrap(), 42);
        let r = hc.dispatch(&ctx, H_RTAS.raw(), [0x1ffc, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.status, H_PARAMETER);
    }

    #[test]
    fn with_rets_fills_the_front() {
        let r = HcallReturn::with_rets(H_SUCCESS, [1, 2]);
        assert_eq!(r.rets, [1, 2, 0, 0, 0, 0, 0, 0, 0]);
    }
}
