//! The sPAPR TCE hypercalls and DDW RTAS calls on the hypercall entry, served by a
//! [`TceIommu`].
//!
//! [`register`] adds `H_PUT_TCE`, `H_GET_TCE`, `H_PUT_TCE_INDIRECT`, `H_STUFF_TCE`
//! ([`H_TCE_ALL`]) and `ibm,query-pe-dma-window`, `ibm,create-pe-dma-window`,
//! `ibm,remove-pe-dma-window`, `ibm,reset-pe-dma-window` to a [`Hypercalls`] table. Each
//! call is decoded by `nestio_iommu::tce::abi` (argument layouts and PAPR codes are
//! documented there), run on the model under its lock, and its TCE changes are applied
//! to the attached devices as one batch ([`TceIommu::apply`]). `H_PUT_TCE_INDIRECT`
//! reads its list through [`GuestMem`] (bounds-checked; a list outside RAM is
//! `H_PARAMETER`). A device refusing the resulting DMA_MAP/UNMAP turns a successful
//! call into `H_HARDWARE` (RTAS: hardware error), logged with the reason.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use nestio_iommu::tce::abi::{self, DdwCall, TceCall, TceMemory, RTAS_DDW_CALLS};
use nestio_iommu::tce::TceError;

use super::guest_mem::GuestMem;
use super::papr::{HStatus, H_HARDWARE, H_TCE_ALL};
use super::rtas::{RtasStatus, RTAS_OUT_HW_ERROR};
use super::{Hcall, HcallContext, HcallReturn, HypercallError, Hypercalls};
use crate::iommu::tce::TceIommu;

/// Guest RAM as the TCE model reads it.
pub struct GuestTceMemory<'a>(pub &'a GuestMem<'a>);

impl TceMemory for GuestTceMemory<'_> {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), TceError> {
        self.0.read(gpa, buf).map_err(|e| TceError::GuestMemory {
            gpa: e.gpa,
            len: e.len,
        })
    }
}

/// Serve one TCE hypercall (also the fuzz target's entry).
pub fn tce_hcall(iommu: &TceIommu, ctx: &HcallContext<'_>, call: &Hcall) -> HcallReturn {
    iommu.stats().hcalls.fetch_add(1, Ordering::Relaxed);
    let Some(c) = TceCall::decode(call.opcode.raw(), &call.args) else {
        return HcallReturn::status(super::papr::H_FUNCTION);
    };
    let mem = GuestTceMemory(&ctx.mem);
    let (out, applied) = iommu.with_pe(|pe| {
        let o = abi::hcall(pe, &mem, c);
        (o.updates.clone(), o)
    });
    if let Some(e) = &out.error {
        tracing::debug!(?c, error = %e, "TCE hypercall refused");
    }
    if let Err(e) = applied {
        tracing::error!(?c, error = %e, "TCE change not applied to the device");
        return HcallReturn::status(H_HARDWARE);
    }
    let status = HStatus(out.status);
    match out.ret {
        Some(v) => HcallReturn::with_rets(status, [v]),
        None => HcallReturn::status(status),
    }
}

/// Serve one DDW RTAS call `name`.
pub fn ddw_rtas(iommu: &TceIommu, name: &str, args: &[u32], rets: &mut [u32]) -> RtasStatus {
    iommu.stats().rtas.fetch_add(1, Ordering::Relaxed);
    let call = match DdwCall::decode(name, args, rets.len() + 1) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "RTAS DDW call refused");
            return RtasStatus(e.rtas_status());
        }
    };
    let (out, applied) = iommu.with_pe(|pe| {
        let o = abi::rtas(pe, call);
        (o.updates.clone(), o)
    });
    if let Some(e) = &out.error {
        // The DMA-mask refusal is the one a user must see.
        if matches!(e, TceError::DmaMask { .. }) {
            tracing::error!(?call, error = %e, "DMA window refused");
        } else {
            tracing::debug!(?call, error = %e, "RTAS DDW call refused");
        }
    }
    if let Err(e) = applied {
        tracing::error!(?call, error = %e, "DMA window change not applied to the device");
        return RTAS_OUT_HW_ERROR;
    }
    for (r, v) in rets.iter_mut().zip(&out.outs) {
        *r = *v;
    }
    RtasStatus(out.status)
}

/// Register the TCE hypercalls and DDW RTAS calls of `iommu` in `hc`.
pub fn register(hc: &mut Hypercalls, iommu: &Arc<TceIommu>) -> Result<(), HypercallError> {
    let i = iommu.clone();
    hc.register_all(
        &H_TCE_ALL,
        Arc::new(move |ctx: &HcallContext<'_>, c: &Hcall| tce_hcall(&i, ctx, c)),
    )?;
    for name in RTAS_DDW_CALLS {
        let i = iommu.clone();
        hc.register_rtas(
            name,
            Arc::new(move |_: &HcallContext<'_>, a: &[u32], r: &mut [u32]| {
                ddw_rtas(&i, name, a, r)
            }),
        )?;
    }
    Ok(())
}
