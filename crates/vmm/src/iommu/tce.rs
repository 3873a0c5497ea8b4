//! The sPAPR TCE IOMMU in the VMM: the `nestio_iommu::tce` model of one PE, driven by
//! the guest's TCE hypercalls and DDW RTAS calls, turned into DMA_MAP / DMA_UNMAP of the
//! devices attached to it.
//!
//! # Design
//!
//! [`TceIommu`] is the platform's [`DmaDomain`] when the machine has a TCE IOMMU: a
//! device attaching gets nothing (a PE starts with an empty default window) but the
//! mappings currently in force. The guest's calls reach it through the hypercall entry
//! (`crate::hypercall::tce` registers `H_TCE_ALL` and the four `ibm,*-pe-dma-window`
//! RTAS calls); the model returns every TCE it changed ([`TceUpdate`]), and
//! [`TceIommu::apply`] turns one call's changes into as few device mappings as it can:
//!
//! - contiguous pages (bus address and guest-physical address both consecutive, same
//!   permission) of one call become **one** `dma_map` — an `H_PUT_TCE_INDIRECT` of 512
//!   consecutive pages is one mapping, a direct-mapped DDW filled with consecutive TCEs
//!   one large mapping per call;
//! - device mappings are tracked as runs; since a vfio-user `DMA_UNMAP` must name a whole
//!   mapping, a TCE write inside a run unmaps the whole run and maps back the parts
//!   that still hold (read from the table);
//! - mappings are by guest RAM's fd (zero copy, as with the identity domain);
//! - unmaps go out before maps, so a device never sees two mappings at one address.
//!
//! A window removed or reset under live DMA unmaps its runs: the device's next access
//! there is an unmapped-IOVA fault it reports (e1000: the queue stops), never an access
//! elsewhere. A device refusing a map or unmap makes the call fail with `H_HARDWARE`
//! and is logged with the device's stream; the table keeps the guest's value.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use nestio_device_model::VfioDevice;
use nestio_dma::Prot;
use nestio_iommu::tce::{Pe, PeConfig, TceAccess, TceError, TceUpdate};

use super::domain::{DmaDomain, DmaDomainError, GuestRamFile, ShadowDomain, StreamId};

/// One device mapping: `iova -> (gpa, size, prot)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    gpa: u64,
    size: u64,
    prot: Prot,
}

/// Counters of what the IOMMU did (for tests and benchmarks).
#[derive(Debug, Default)]
pub struct TceStats {
    /// TCE hypercalls served.
    pub hcalls: AtomicU64,
    /// RTAS calls served.
    pub rtas: AtomicU64,
    /// `dma_map` calls issued (per stream).
    pub maps: AtomicU64,
    /// `dma_unmap` calls issued (per stream).
    pub unmaps: AtomicU64,
}

/// Errors of the VMM's TCE IOMMU.
#[derive(Debug, thiserror::Error)]
pub enum TceIommuError {
    /// The model refused.
    #[error(transparent)]
    Model(#[from] TceError),
    /// A device refused a map or unmap.
    #[error(transparent)]
    Domain(#[from] DmaDomainError),
    /// Used before the VM gave it guest RAM.
    #[error("the TCE IOMMU has no guest RAM yet: pass TceIommu::domain_factory() as VmConfig::dma_domain")]
    NoRam,
}

/// The TCE IOMMU of one PE. See the module documentation.
pub struct TceIommu {
    pe: Mutex<Pe>,
    shadow: OnceLock<ShadowDomain>,
    streams: Mutex<Vec<StreamId>>,
    runs: Mutex<BTreeMap<u64, Run>>,
    stats: TceStats,
}

impl std::fmt::Debug for TceIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TceIommu")
            .field("pe", &*self.pe.lock())
            .field("runs", &self.runs.lock().len())
            .finish()
    }
}

fn prot_of(a: TceAccess) -> Option<Prot> {
    match a {
        TceAccess::None => None,
        TceAccess::Read => Some(Prot::READ),
        TceAccess::Write => Some(Prot::WRITE),
        TceAccess::ReadWrite => Some(Prot::RW),
    }
}

impl TceIommu {
    /// A TCE IOMMU for one PE.
    pub fn new(cfg: PeConfig) -> Result<Arc<TceIommu>, TceIommuError> {
        Ok(Arc::new(TceIommu {
            pe: Mutex::new(Pe::new(cfg)?),
            shadow: OnceLock::new(),
            streams: Mutex::new(Vec::new()),
            runs: Mutex::new(BTreeMap::new()),
            stats: TceStats::default(),
        }))
    }

    /// Give it guest RAM (done by the VM through [`TceIommu::domain_factory`]).
    pub fn set_ram(&self, ram: GuestRamFile) {
        if self.shadow.set(ShadowDomain::new(ram)).is_err() {
            tracing::warn!("TCE IOMMU given guest RAM twice; keeping the first");
        }
    }

    /// The value for `VmConfig::dma_domain`: the VM hands over guest RAM and uses this
    /// IOMMU as its DMA domain.
    pub fn domain_factory(self: &Arc<Self>) -> super::DmaDomainFactory {
        let me = self.clone();
        super::DmaDomainFactory::new(move |ram| {
            me.set_ram(ram);
            me.clone() as Arc<dyn DmaDomain>
        })
    }

    /// The model (locked).
    pub fn pe(&self) -> parking_lot::MutexGuard<'_, Pe> {
        self.pe.lock()
    }

    /// Counters.
    pub fn stats(&self) -> &TceStats {
        &self.stats
    }

    /// The device mappings in force, `(iova, gpa, size, prot)`, by IOVA.
    pub fn mappings(&self) -> Vec<(u64, u64, u64, Prot)> {
        self.runs
            .lock()
            .iter()
            .map(|(&i, r)| (i, r.gpa, r.size, r.prot))
            .collect()
    }

    /// Run `f` on the model and apply the updates it returns to the devices, holding
    /// the model's lock throughout so calls apply in order.
    pub fn with_pe<R>(
        &self,
        f: impl FnOnce(&mut Pe) -> (Vec<TceUpdate>, R),
    ) -> (R, Result<(), TceIommuError>) {
        let mut pe = self.pe.lock();
        let (updates, r) = f(&mut pe);
        let applied = self.apply(&pe, &updates);
        (r, applied)
    }

    /// Turn one call's TCE changes into device unmaps and maps (see the module docs).
    /// `pe` is the model after the call.
    pub fn apply(&self, pe: &Pe, updates: &[TceUpdate]) -> Result<(), TceIommuError> {
        if updates.is_empty() {
            return Ok(());
        }
        let shadow = self.shadow.get().ok_or(TceIommuError::NoRam)?;
        let mut runs = self.runs.lock();
        // 1. Every run touched by an update goes; its pages are re-derived below.
        let mut redo: Vec<(u64, u64)> = Vec::new(); // (iova, size) to re-derive
        let mut gone: Vec<(u64, Run)> = Vec::new();
        for u in updates {
            let size = u.page_shift.size();
            let overlapping: Vec<u64> = runs
                .range(..u.iova.saturating_add(size))
                .rev()
                .take_while(|(&i, r)| i.saturating_add(r.size) > u.iova)
                .map(|(&i, _)| i)
                .collect();
            for i in overlapping {
                if let Some(r) = runs.remove(&i) {
                    gone.push((i, r));
                    redo.push((i, r.size));
                }
            }
            redo.push((u.iova, size));
        }
        let streams = self.streams.lock().clone();
        for (iova, r) in &gone {
            for s in &streams {
                self.stats.unmaps.fetch_add(1, Ordering::Relaxed);
                shadow.unmap(*s, *iova, r.size)?;
            }
        }
        // 2. Re-derive the pages of the touched ranges from the table, coalesce, map.
        redo.sort_unstable();
        let mut pages: BTreeMap<u64, (u64, u64, Prot)> = BTreeMap::new(); // iova -> (gpa, len, prot)
        for (start, size) in redo {
            let mut at = start;
            let end = start.saturating_add(size);
            while at < end {
                let Some(t) = pe.translate(at) else { break };
                let len = t.len.min(end - at);
                if let Some(p) = prot_of(t.access) {
                    if t.liobn.is_some() {
                        pages.insert(at, (t.gpa, len, p));
                    }
                }
                at = at.saturating_add(len.max(1));
            }
        }
        let mut merged: Vec<(u64, Run)> = Vec::new();
        for (iova, (gpa, len, prot)) in pages {
            if let Some((li, lr)) = merged.last_mut() {
                // A hostile TCE may name a page at the very top of the address space:
                // an end that does not fit in 64 bits continues nothing.
                if li.checked_add(lr.size) == Some(iova)
                    && lr.gpa.checked_add(lr.size) == Some(gpa)
                    && lr.prot == prot
                {
                    lr.size += len;
                    continue;
                }
            }
            merged.push((
                iova,
                Run {
                    gpa,
                    size: len,
                    prot,
                },
            ));
        }
        for (iova, r) in merged {
            // A page may reach past guest RAM (a hostile TCE): the shadow refuses it and
            // the device gets nothing there.
            let mut ok = true;
            for s in &streams {
                self.stats.maps.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = shadow.map(*s, iova, r.gpa, r.size, r.prot) {
                    match e {
                        DmaDomainError::OutsideRam { .. } => {
                            tracing::debug!(
                                iova,
                                gpa = r.gpa,
                                "TCE points outside guest RAM: not mapped"
                            );
                            ok = false;
                            break;
                        }
                        e => return Err(e.into()),
                    }
                }
            }
            if ok {
                runs.insert(iova, r);
            }
        }
        Ok(())
    }
}

impl DmaDomain for TceIommu {
    fn model(&self) -> &'static str {
        "spapr-tce"
    }

    fn attach(&self, stream: StreamId, dev: Arc<dyn VfioDevice>) -> Result<(), DmaDomainError> {
        let shadow = self.shadow.get().ok_or(DmaDomainError::Unsupported {
            model: "spapr-tce",
            what: "attach a device before the VM gave it guest RAM",
        })?;
        let _pe = self.pe.lock(); // no TCE call in between
        {
            let mut s = self.streams.lock();
            if !s.contains(&stream) {
                s.push(stream);
                // A new stream: give it the runs in force through the shadow domain.
                for (&iova, r) in self.runs.lock().iter() {
                    shadow.map(stream, iova, r.gpa, r.size, r.prot)?;
                }
            }
        }
        shadow.attach(stream, dev)
    }

    fn detach(&self, stream: StreamId) {
        if let Some(shadow) = self.shadow.get() {
            shadow.detach(stream);
        }
        self.streams.lock().retain(|s| *s != stream);
    }

    fn map(&self, _: StreamId, _: u64, _: u64, _: u64, _: Prot) -> Result<(), DmaDomainError> {
        Err(DmaDomainError::Unsupported {
            model: "spapr-tce",
            what: "map outside the guest's TCE tables (use H_PUT_TCE or TceIommu::with_pe)",
        })
    }

    fn unmap(&self, _: StreamId, _: u64, _: u64) -> Result<(), DmaDomainError> {
        Err(DmaDomainError::Unsupported {
            model: "spapr-tce",
            what: "unmap outside the guest's TCE tables (use H_PUT_TCE or TceIommu::with_pe)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::papr::{
        HStatus, H_GET_TCE, H_HARDWARE, H_PARAMETER, H_PUT_TCE, H_PUT_TCE_INDIRECT, H_STUFF_TCE,
        H_SUCCESS,
    };
    use crate::hypercall::{HcallContext, Hypercalls};
    use crate::iommu::table_device::TableDevice;
    use crate::memory::GuestRam;
    use nestio_dma::DmaSpace;

    const L0: u64 = 0x8000_0000;
    const BUID: u32 = 0x2000_0000;

    struct Rig {
        ram: GuestRam,
        iommu: Arc<TceIommu>,
        hc: Hypercalls,
        dev: Arc<TableDevice>,
    }

    fn rig(cfg: PeConfig) -> Rig {
        let ram = GuestRam::new(8 << 20).unwrap();
        let iommu = TceIommu::new(cfg).unwrap();
        let dom = iommu.domain_factory().build(GuestRamFile::of(&ram));
        let dev = Arc::new(TableDevice::new(65535));
        dom.attach(StreamId::pci(0, 1, 0), dev.clone()).unwrap();
        let mut hc = Hypercalls::new();
        crate::hypercall::tce::register(&mut hc, &iommu).unwrap();
        Rig {
            ram,
            iommu,
            hc,
            dev,
        }
    }

    impl Rig {
        fn call(&self, op: crate::hypercall::Opcode, a: &[u64]) -> (HStatus, u64) {
            let ctx = HcallContext::new(self.ram.memory(), 0);
            let mut args = [0u64; 9];
            args[..a.len()].copy_from_slice(a);
            let r = self.hc.dispatch(&ctx, op.raw(), args);
            (r.status, r.rets[0])
        }
        /// An RTAS call: returns the status and outputs.
        fn rtas(&self, name: &str, args: &[u32], nret: u32) -> (i32, Vec<u32>) {
            let ctx = HcallContext::new(self.ram.memory(), 0);
            let token = self.hc.rtas().token(name).unwrap().0;
            let buf = 0x7f_0000u64;
            let mut cells = vec![token, args.len() as u32, nret];
            cells.extend_from_slice(args);
            cells.extend(std::iter::repeat_n(0xdead_beef, nret as usize));
            for (i, c) in cells.iter().enumerate() {
                ctx.mem.write_be_u32(buf + 4 * i as u64, *c).unwrap();
            }
            let mut a = [0u64; 9];
            a[0] = buf;
            let r = self
                .hc
                .dispatch(&ctx, crate::hypercall::papr::H_RTAS.raw(), a);
            assert_eq!(r.status, H_SUCCESS);
            let base = buf + 12 + 4 * args.len() as u64;
            let st = ctx.mem.read_be_u32(base).unwrap() as i32;
            let outs = (1..nret)
                .map(|i| ctx.mem.read_be_u32(base + 4 * u64::from(i)).unwrap())
                .collect();
            (st, outs)
        }
        fn tce_list(&self, gpa: u64, tces: &[u64]) {
            let ctx = HcallContext::new(self.ram.memory(), 0);
            for (i, t) in tces.iter().enumerate() {
                ctx.mem.write_be_u64(gpa + 8 * i as u64, *t).unwrap();
            }
        }
    }

    #[test]
    fn tce_at_the_top_of_the_address_space_is_not_merged_and_not_mapped() {
        // Fuzz finding (tce target): a TCE naming the last page of the 64-bit space,
        // followed by a page it could be coalesced with, overflowed `gpa + size` while
        // the runs were merged. The hostile page is refused (outside RAM), the good one
        // is mapped alone, and the call succeeds.
        let r = rig(PeConfig::default());
        r.tce_list(0x1000, &[0xffff_ffff_ffff_f003, 0x20_0003]);
        assert_eq!(
            r.call(H_PUT_TCE_INDIRECT, &[L0, 0x10_0000, 0x1000, 2]).0,
            H_SUCCESS
        );
        assert_eq!(
            r.iommu.mappings(),
            vec![(0x10_1000, 0x20_0000, 0x1000, Prot::RW)]
        );
    }

    #[test]
    fn indirect_is_one_map_and_a_cleared_page_splits_the_run() {
        let r = rig(PeConfig::default());
        // 512 consecutive 4 KiB pages of RAM from 2 MiB, read-write: one DMA_MAP.
        let tces: Vec<u64> = (0..512).map(|i| (0x20_0000 + i * 0x1000) | 3).collect();
        r.tce_list(0x1000, &tces);
        assert_eq!(
            r.call(H_PUT_TCE_INDIRECT, &[L0, 0x10_0000, 0x1000, 512]).0,
            H_SUCCESS
        );
        assert_eq!(r.dev.maps.load(Ordering::Relaxed), 1);
        assert_eq!(
            r.iommu.mappings(),
            vec![(0x10_0000, 0x20_0000, 0x20_0000, Prot::RW)]
        );
        // The device reaches RAM through the window, zero copy.
        let ctx = HcallContext::new(r.ram.memory(), 0);
        ctx.mem.write(0x20_5008, b"tce!").unwrap();
        let mut b = [0u8; 4];
        r.dev.table.read(0x10_5008, &mut b).unwrap();
        assert_eq!(&b, b"tce!");
        // Clear one page in the middle: the run is unmapped and its two parts mapped.
        assert_eq!(r.call(H_PUT_TCE, &[L0, 0x10_5000, 0]).0, H_SUCCESS);
        assert_eq!(
            r.iommu.mappings(),
            vec![
                (0x10_0000, 0x20_0000, 0x5000, Prot::RW),
                (0x10_6000, 0x20_6000, 0x1f_a000, Prot::RW)
            ]
        );
        assert!(
            r.dev.table.read(0x10_5008, &mut b).is_err(),
            "cleared page faults"
        );
        assert_eq!(r.call(H_GET_TCE, &[L0, 0x10_5000]), (H_SUCCESS, 0));
        assert_eq!(r.call(H_GET_TCE, &[L0, 0x10_6000]), (H_SUCCESS, 0x20_6003));
        // Stuff 0 over everything: nothing left.
        assert_eq!(r.call(H_STUFF_TCE, &[L0, 0, 0, 1 << 18]).0, H_SUCCESS);
        assert!(r.iommu.mappings().is_empty());
        assert_eq!(r.dev.table.len(), 0);
        // Hostile: list outside RAM, unaligned list, TCE pointing past RAM.
        assert_eq!(
            r.call(H_PUT_TCE_INDIRECT, &[L0, 0, 1 << 40, 1]).0,
            H_PARAMETER
        );
        assert_eq!(
            r.call(H_PUT_TCE_INDIRECT, &[L0, 0, 0x1008, 1]).0,
            H_PARAMETER
        );
        assert_eq!(r.call(H_PUT_TCE, &[L0, 0, (1 << 40) | 3]).0, H_SUCCESS);
        assert!(r.iommu.mappings().is_empty(), "a TCE past RAM maps nothing");
        assert_ne!(r.call(H_PUT_TCE, &[L0, 1 << 30, 3]).0, H_HARDWARE);
    }

    #[test]
    fn ddw_at_1_shl_59_maps_all_ram_in_one_mapping_and_remove_faults_the_device() {
        let r = rig(PeConfig::default());
        let (st, q) = r.rtas("ibm,query-pe-dma-window", &[0x800, 0x0800_0000, BUID], 5);
        assert_eq!((st, q[0]), (0, 1));
        // 64 KiB pages, 8 MiB window (all of RAM).
        let (st, c) = r.rtas(
            "ibm,create-pe-dma-window",
            &[0x800, 0x0800_0000, BUID, 16, 23],
            4,
        );
        assert_eq!(st, 0);
        let (liobn, start) = (u64::from(c[0]), u64::from(c[1]) << 32 | u64::from(c[2]));
        assert_eq!((liobn, start), (0x8000_0001, 1 << 59));
        let tces: Vec<u64> = (0..128).map(|i| (i << 16) | 3).collect();
        r.tce_list(0x3000, &tces);
        let before = r.dev.maps.load(Ordering::Relaxed);
        assert_eq!(
            r.call(H_PUT_TCE_INDIRECT, &[liobn, start, 0x3000, 128]).0,
            H_SUCCESS
        );
        assert_eq!(
            r.dev.maps.load(Ordering::Relaxed) - before,
            1,
            "one large mapping"
        );
        assert_eq!(r.iommu.mappings(), vec![(start, 0, 8 << 20, Prot::RW)]);
        let mut b = [0u8; 8];
        r.dev.table.read(start + 0x7f_0000, &mut b).unwrap();
        // Remove the window under "live DMA": the device faults, never reaches RAM.
        let (st, _) = r.rtas("ibm,remove-pe-dma-window", &[liobn as u32], 1);
        assert_eq!(st, 0);
        assert!(r.dev.table.read(start + 0x7f_0000, &mut b).is_err());
        assert!(r.iommu.mappings().is_empty());
        // Bad cell counts and unknown BUID: parameter error.
        assert_eq!(
            r.rtas("ibm,create-pe-dma-window", &[0, 0, 0, 16, 23], 4).0,
            -3
        );
        assert_eq!(
            r.rtas("ibm,query-pe-dma-window", &[0x800, 0x0800_0000, BUID], 2)
                .0,
            -3
        );
    }

    #[test]
    fn narrow_device_window_lands_at_4g_or_is_refused() {
        let r = rig(PeConfig {
            dma_mask_bits: 40,
            ..PeConfig::default()
        });
        let (st, c) = r.rtas(
            "ibm,create-pe-dma-window",
            &[0, 0x0800_0000, BUID, 16, 23],
            4,
        );
        assert_eq!((st, c[1], c[2]), (0, 1, 0), "at 4 GiB");
        let r = rig(PeConfig {
            dma_mask_bits: 40,
            ddw64: nestio_iommu::tce::Ddw64Placement::At(1 << 59),
            ..PeConfig::default()
        });
        let (st, _) = r.rtas(
            "ibm,create-pe-dma-window",
            &[0, 0x0800_0000, BUID, 16, 23],
            4,
        );
        assert_eq!(st, -1, "hardware error: the device cannot reach 1 << 59");
    }
}
