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

/// Fuzzing entry (feature `harness`; cargo-fuzz target `tce`, corpus replayed by
/// `nestio/tests/fuzz_corpus.rs`): guest RAM contents and a sequence of TCE hypercalls
/// and DDW RTAS calls from the input, through the real hypercall entry, into a
/// [`TceIommu`] with a device whose DMA goes through a map table. Checked after every
/// call: nothing panicked; the return code is one a TCE call may give; the device's
/// mappings are exactly the IOMMU's runs, each inside guest RAM and equal to what the
/// model translates.
#[cfg(feature = "harness")]
pub fn fuzz_tce(data: &[u8]) {
    use super::papr::{H_PARAMETER, H_RTAS, H_SUCCESS};
    use crate::iommu::table_device::TableDevice;
    use crate::iommu::{GuestRamFile, StreamId};
    use crate::memory::GuestRam;
    use nestio_iommu::tce::PeConfig;

    const RAM: u64 = 4 << 20;
    let Ok(ram) = GuestRam::new(RAM) else { return };
    let cfg = PeConfig {
        dma_mask_bits: if data.first().is_some_and(|b| b & 1 == 1) {
            40
        } else {
            64
        },
        max_leaves: 64,
        ..PeConfig::default()
    };
    let Ok(iommu) = TceIommu::new(cfg) else {
        return;
    };
    let dom = iommu.domain_factory().build(GuestRamFile::of(&ram));
    let dev = Arc::new(TableDevice::new(65535));
    if dom.attach(StreamId::pci(0, 1, 0), dev.clone()).is_err() {
        return;
    }
    let mut hc = Hypercalls::new();
    if register(&mut hc, &iommu).is_err() {
        return;
    }
    let ctx = HcallContext::new(ram.memory(), 0);
    // The first 8 KiB of input: guest RAM at 0 (TCE lists, RTAS buffers).
    let (ram_bytes, mut calls) = data.split_at(data.len().min(0x2000));
    let _ = ctx.mem.write(0, ram_bytes);
    let tokens: Vec<u32> = RTAS_DDW_CALLS
        .iter()
        .filter_map(|n| hc.rtas().token(n).map(|t| t.0))
        .collect();
    // Each call: a selector byte and five u64 arguments, little-endian.
    const CALL: usize = 1 + 8 * 5;
    while calls.len() >= CALL {
        let (c, rest) = calls.split_at(CALL);
        calls = rest;
        let mut a = [0u64; super::HCALL_ARGS];
        for (i, v) in a.iter_mut().take(5).enumerate() {
            *v = u64::from_le_bytes(c[1 + 8 * i..9 + 8 * i].try_into().unwrap_or([0; 8]));
        }
        // Steer LIOBNs and addresses towards the interesting ones now and then.
        if c[0] & 0x80 != 0 {
            a[0] = 0x8000_0000 | (a[0] & 1);
        }
        if c[0] & 0x20 != 0 {
            // A list in the input-filled page, a count up to 513, an ioba in a window.
            a[1] = if a[1] & 1 == 0 {
                a[1] % (1 << 30)
            } else {
                (1 << 59) + a[1] % (1 << 32)
            };
            a[2] = (a[2] % 0x2000) & !0xfff;
            a[3] %= 514;
        }
        let op = H_TCE_ALL[usize::from(c[0] & 3)];
        let r = if c[0] & 0x40 != 0 {
            // An RTAS call: build the buffer at 0x1f00 from the arguments.
            let token = tokens[usize::from(c[0] >> 2 & 3)];
            let nargs = (a[1] % 7) as u32;
            let nret = (a[2] % 7) as u32;
            let mut cells = vec![token, nargs, nret];
            for k in 0..nargs as usize {
                cells.push(match k {
                    1 => 0x0800_0000,
                    2 => 0x2000_0000,
                    3 => [12, 16, 21, 24, 13, 40][(a[3] % 6) as usize],
                    4 => (a[4] % 64) as u32,
                    _ => a[3] as u32,
                });
            }
            for (k, v) in cells.iter().enumerate() {
                let _ = ctx.mem.write_be_u32(0x3f_0000 + 4 * k as u64, *v);
            }
            let mut args = [0u64; super::HCALL_ARGS];
            args[0] = 0x3f_0000;
            hc.dispatch(&ctx, H_RTAS.raw(), args)
        } else {
            hc.dispatch(&ctx, op.raw(), a)
        };
        assert!(
            [H_SUCCESS, H_PARAMETER, H_HARDWARE].contains(&r.status),
            "{op}: unexpected {}",
            r.status
        );
        let runs = iommu.mappings();
        let maps = dev.table.mappings();
        assert_eq!(runs.len(), maps.len(), "device and IOMMU disagree");
        let pe = iommu.pe();
        for (iova, gpa, size, _) in runs {
            assert!(
                gpa.checked_add(size).is_some_and(|e| e <= RAM),
                "mapped outside RAM"
            );
            let t = pe.translate(iova).expect("a run outside every window");
            assert_eq!(t.gpa, gpa, "run at {iova:#x} disagrees with the table");
        }
    }
}
