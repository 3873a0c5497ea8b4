//! The XIVE guest API on the hypercall entry: every `H_INT_*` opcode
//! ([`super::papr::H_INT_ALL`]) goes to one handler that runs the call on the
//! `nestio-xive` model as the calling vCPU (`r4..` = `rdi rsi rdx r10 ...`), and
//! returns its PAPR code with up to four values. The model's return codes and opcodes
//! are its own constants (the crate depends on no VMM); the tests below pin them to
//! [`super::papr`], which is itself checked against Linux's `hvcall.h`.
//!
//! With a XIVE VM, `H_CEDE` is served too ([`register_cede`]): the calling vCPU's VP
//! leaves its thread and the thread sleeps until the VP's escalation fires (an event
//! for it) or [`crate::irqchip::xive::CEDE_SLICE`] passes — the one hypercall that
//! waits, boundedly (see `irqchip::xive`'s "Cede and escalation").

use std::sync::Arc;

use nestio_xive::Xive;

use super::papr::{HStatus, H_INT_ALL};
use super::{Hcall, HcallContext, HcallReturn, HypercallError, Hypercalls};

/// Serve the `H_INT_*` calls with `xive`.
pub fn register(hc: &mut Hypercalls, xive: Arc<Xive>) -> Result<(), HypercallError> {
    hc.register_all(
        &H_INT_ALL,
        Arc::new(move |ctx: &HcallContext<'_>, c: &Hcall| {
            let o = xive.hcall(ctx.vcpu, c.opcode.raw(), &c.args);
            HcallReturn::with_rets(HStatus(o.rc), o.rets)
        }),
    )
}

/// Serve `H_CEDE` with the XIVE chip's cede (always `H_SUCCESS`: PAPR's cede returns
/// when an interrupt may be pending, and spurious returns are allowed).
pub fn register_cede(
    hc: &mut Hypercalls,
    chip: Arc<crate::irqchip::xive::XiveIrqChip>,
) -> Result<(), HypercallError> {
    hc.register(
        super::papr::H_CEDE,
        Arc::new(move |ctx: &HcallContext<'_>, _c: &Hcall| {
            chip.cede(ctx.vcpu, crate::irqchip::xive::CEDE_SLICE);
            HcallReturn::status(HStatus(0))
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::super::papr::*;
    use super::*;
    use nestio_xive::hcall::{op, rc};
    use nestio_xive::router::Layout;
    use nestio_xive::{VecMemory, XiveConfig};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn model_constants_are_papr_numbers() {
        let ours = nestio_xive::hcall::ALL;
        for (o, p) in ours.iter().zip(H_INT_ALL) {
            assert_eq!(*o, p.raw());
        }
        assert_eq!(op::H_INT_GET_SOURCE_INFO, H_INT_GET_SOURCE_INFO.raw());
        assert_eq!(op::H_INT_RESET, H_INT_RESET.raw());
        for (m, p) in [
            (rc::H_SUCCESS, H_SUCCESS),
            (rc::H_HARDWARE, H_HARDWARE),
            (rc::H_FUNCTION, H_FUNCTION),
            (rc::H_PARAMETER, H_PARAMETER),
            (rc::H_P2, H_P2),
            (rc::H_P3, H_P3),
            (rc::H_P4, H_P4),
            (rc::H_P5, H_P5),
        ] {
            assert_eq!(HStatus(m), p);
        }
    }

    #[test]
    fn dispatch_reaches_the_model_as_the_calling_vcpu() {
        let cfg = XiveConfig::new(64, 4, Layout::PSERIES).unwrap();
        let x = Arc::new(Xive::new(
            cfg,
            Arc::new(VecMemory::new(0, 1 << 16)),
            Arc::new(|_: u32| {}),
        ));
        x.connect_vcpu(0).unwrap();
        x.connect_vcpu(1).unwrap();
        x.set_source(5, 0).unwrap();
        let mut hc = Hypercalls::new();
        register(&mut hc, x.clone()).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let ctx = HcallContext::new(&mem, 1);
        let r = hc.dispatch(
            &ctx,
            H_INT_GET_SOURCE_INFO.raw(),
            [0, 5, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(r.status, H_SUCCESS);
        assert_eq!(r.rets[1], Layout::PSERIES.mgmt_page(5));
        let r = hc.dispatch(
            &ctx,
            H_INT_SET_OS_REPORTING_LINE.raw(),
            [0, 0x80, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(r.status, H_SUCCESS);
        let r = hc.dispatch(
            &ctx,
            H_INT_GET_OS_REPORTING_LINE.raw(),
            [0, 1, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(
            (r.status, r.rets[0]),
            (H_SUCCESS, 0x80),
            "set by vCPU 1 for itself"
        );
        let r = hc.dispatch(
            &ctx,
            H_INT_GET_SOURCE_INFO.raw(),
            [0, 6, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(r.status, H_P2);
        assert!(register(&mut hc, x).is_err(), "registered twice");
    }
}
