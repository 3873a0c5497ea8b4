//! The emulated SMMUv3 of the VMM (`--viommu smmuv3`), in shadow mode.
//!
//! # Design
//!
//! [`Smmuv3`] is a [`BusDevice`] in the platform MMIO window wrapping the
//! architecture model [`nestio_iommu::smmuv3::Smmu`], which reads the guest's
//! stream table, CDs, page tables and queues in guest RAM through
//! [`GuestRamView`]. Its stream IDs are the PCI requester IDs of the assigned
//! devices ([`StreamId::Pci`]).
//!
//! **Shadow mode** (works with any vfio-user device, which only knows DMA_MAP and
//! DMA_UNMAP): the devices live in a [`ShadowDomain`]. Whenever the guest may have
//! changed what a stream reaches — a write of CMDQ_PROD that consumed a CMD_SYNC
//! (which completes the invalidations before it), of CR0, GBPA or GERRORN — the
//! VMM asks the model
//! for each known stream's complete view ([`Smmu::stream_view`]: stage 1 composed
//! with stage 2, bypass, or nothing), coalesces it into maximal runs (contiguous
//! IOVA and GPA, same permission, inside guest RAM) and applies the difference to
//! the domain: `unmap` of the runs that went away or changed, `map` of the new
//! ones. So a device sees exactly the guest's translation as of its last
//! invalidation, at DMA_MAP granularity, and a DMA to an IOVA the guest unmapped
//! (and invalidated) fails in the device. Before the guest enables the SMMU
//! (SMMUEN = 0, GBPA bypass) every stream reaches all of RAM at IOVA = GPA, the
//! machine's behaviour without a vIOMMU.
//!
//! A device's DMA fault does not come back through vfio-user (the protocol has no
//! such message); the VMM reports faults it learns of with [`Smmuv3::report_fault`],
//! which runs the model's translation and so records the guest's event (its SID,
//! IOVA and direction) in the guest's event queue. MSI doorbells: the guest
//! programs a device's MSI address as an IOVA; [`Smmuv3::msi_doorbell`] translates
//! it to the guest-physical doorbell the VMM routes (the interrupt wiring calls it).
//! The SMMU's own MSIs (event queue, CMD_SYNC, GERROR) go to RAM when they target
//! RAM (CMD_SYNC polling) and otherwise to the sink given at construction.
//!
//! The limit of shadowing an SMMUv3: a new mapping (invalid → valid) needs no
//! invalidation in the architecture, and Linux issues none on map, so the VMM sees
//! it only at the next CMD_SYNC the guest sends for any reason (Linux sends them on
//! unmap and on configuration changes). A guest driver made for shadow mode
//! invalidates after mapping (`guest/payloads/src/smmu.rs`); for unmodified guests
//! nested mode, where the device walks stage 1 itself, is the answer.
//!
//! Cost: a re-sync walks the valid part of each stream's tables (bounded by
//! [`MAX_EXTENTS`]), so it is proportional to the mapped size, not to the change;
//! per-range re-syncs from the TLBI addresses are the next step.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;

use nestio_dma::Prot;
use nestio_iommu::smmuv3::{
    regs, MemoryError, Smmu, SmmuMemory, StreamView, Transaction, TranslateError,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::{BusDevice, BusFault};
use crate::iommu::{DmaDomain, DmaDomainError, ShadowDomain, StreamId};

/// Most extents one stream's shadow may have (a hostile table cannot make the VMM
/// allocate without bound): 1 Mi leaves.
pub const MAX_EXTENTS: usize = 1 << 20;

/// Errors of the SMMUv3 shadow.
#[derive(Debug, thiserror::Error)]
pub enum Smmuv3Error {
    /// The shadow domain refused a map or unmap.
    #[error("SMMUv3 shadow of {stream}: {err}")]
    Domain {
        /// The stream.
        stream: StreamId,
        /// Cause.
        err: DmaDomainError,
    },
    /// A stream ID that is not a PCI requester ID.
    #[error("{0}: the SMMUv3 serves PCI requester IDs only")]
    NotPci(StreamId),
}

/// A vIOMMU the machine gives its guest (`--viommu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viommu {
    /// An SMMUv3 in the platform MMIO window (the first range of the window, so a
    /// payload finds it at [`crate::platform::PLATFORM_MMIO_WINDOW`]`.0`), shadowing
    /// the guest's translation into DMA_MAP/UNMAP.
    Smmuv3,
}

impl std::str::FromStr for Viommu {
    type Err = String;
    /// `smmuv3` or `smmuv3,mode=shadow`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        if parts.next() != Some("smmuv3") {
            return Err(format!("{s:?}: the only vIOMMU is smmuv3[,mode=shadow]"));
        }
        for opt in parts {
            match opt {
                "mode=shadow" => {}
                "mode=nested" => {
                    return Err("smmuv3 mode=nested is not implemented yet: use mode=shadow".into())
                }
                other => return Err(format!("{other:?}: smmuv3 takes mode=shadow")),
            }
        }
        Ok(Viommu::Smmuv3)
    }
}

/// Where the SMMU's MSIs outside RAM go: `(address, data)`.
pub type MsiSink = Box<dyn Fn(u64, u32) + Send + Sync>;

/// Guest RAM as the SMMU sees it.
pub struct GuestRamView {
    mem: GuestMemoryMmap,
    msi: Option<MsiSink>,
}

impl GuestRamView {
    /// `mem`, with SMMU MSIs outside RAM delivered to `msi` (dropped if None).
    pub fn new(mem: GuestMemoryMmap, msi: Option<MsiSink>) -> Self {
        GuestRamView { mem, msi }
    }
}

impl SmmuMemory for GuestRamView {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemoryError {
                addr,
                len: buf.len(),
            })
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| MemoryError {
                addr,
                len: data.len(),
            })
    }
    fn write_msi(&self, addr: u64, data: u32) -> Result<(), MemoryError> {
        if self.write(addr, &data.to_le_bytes()).is_ok() {
            return Ok(());
        }
        match &self.msi {
            Some(sink) => {
                sink(addr, data);
                Ok(())
            }
            None => {
                tracing::debug!(addr, data, "SMMUv3 MSI outside RAM dropped (no sink)");
                Ok(())
            }
        }
    }
}

/// One shadowed run: IOVA → (GPA, size, prot).
type Runs = BTreeMap<u64, (u64, u64, Prot)>;

struct Inner {
    smmu: Smmu,
    /// The shadow of each known stream (by SID).
    shadows: BTreeMap<u32, Runs>,
    resyncs: u64,
}

/// The VMM's SMMUv3 (see the module documentation).
pub struct Smmuv3 {
    inner: Mutex<Inner>,
    mem: GuestRamView,
    domain: Arc<ShadowDomain>,
    ram_size: u64,
}

fn prot_of(p: nestio_iommu::smmuv3::walk::Perm) -> Prot {
    match (p.read, p.write) {
        (true, true) => Prot::RW,
        (true, false) => Prot::READ,
        (false, true) => Prot::WRITE,
        (false, false) => Prot::NONE,
    }
}

/// Coalesce a view into maximal runs inside RAM.
fn runs_of(view: &StreamView, ram_size: u64) -> Runs {
    let mut runs = Runs::new();
    match view {
        StreamView::Bypass => {
            runs.insert(0, (0, ram_size, Prot::RW));
        }
        StreamView::Mapped(extents) => {
            let mut cur: Option<(u64, u64, u64, Prot)> = None;
            for e in extents {
                let size = 1u64 << e.size_bits;
                let inside = e
                    .output
                    .checked_add(size)
                    .is_some_and(|end| end <= ram_size);
                if !inside {
                    // MMIO (an MSI doorbell) or beyond RAM: not a DMA_MAP.
                    continue;
                }
                let prot = prot_of(e.perm);
                match &mut cur {
                    Some((iova, gpa, len, p))
                        if *iova + *len == e.input && *gpa + *len == e.output && *p == prot =>
                    {
                        *len += size;
                    }
                    _ => {
                        if let Some((iova, gpa, len, p)) = cur.take() {
                            runs.insert(iova, (gpa, len, p));
                        }
                        cur = Some((e.input, e.output, size, prot));
                    }
                }
            }
            if let Some((iova, gpa, len, p)) = cur {
                runs.insert(iova, (gpa, len, p));
            }
        }
    }
    runs
}

impl Smmuv3 {
    /// An SMMU (reset state) whose devices are in `domain`, over guest RAM `mem` of
    /// `ram_size` bytes.
    pub fn new(mem: GuestRamView, domain: Arc<ShadowDomain>, ram_size: u64) -> Self {
        Smmuv3 {
            inner: Mutex::new(Inner {
                smmu: Smmu::new(),
                shadows: BTreeMap::new(),
                resyncs: 0,
            }),
            mem,
            domain,
            ram_size,
        }
    }

    /// Size of the MMIO window to give it.
    pub fn mmio_size() -> u64 {
        regs::MMIO_SIZE
    }

    /// Start shadowing `stream` (a PCI function behind this SMMU) and give it its
    /// current view (all of RAM while the SMMU is disabled).
    pub fn add_stream(&self, stream: StreamId) -> Result<(), Smmuv3Error> {
        let StreamId::Pci(rid) = stream else {
            return Err(Smmuv3Error::NotPci(stream));
        };
        let mut inner = self.inner.lock();
        inner.shadows.entry(u32::from(rid)).or_default();
        self.resync(&mut inner)
    }

    /// Number of re-syncs so far (tests, benchmark).
    pub fn resyncs(&self) -> u64 {
        self.inner.lock().resyncs
    }

    /// The shadowed runs of `sid`: `(iova, gpa, size, prot)`.
    pub fn shadow(&self, sid: u32) -> Vec<(u64, u64, u64, Prot)> {
        self.inner
            .lock()
            .shadows
            .get(&sid)
            .map(|r| r.iter().map(|(i, (g, s, p))| (*i, *g, *s, *p)).collect())
            .unwrap_or_default()
    }

    fn resync(&self, inner: &mut Inner) -> Result<(), Smmuv3Error> {
        inner.resyncs += 1;
        let sids: Vec<u32> = inner.shadows.keys().copied().collect();
        for sid in sids {
            let stream = StreamId::Pci(sid as u16);
            let view = inner
                .smmu
                .stream_view(&self.mem, sid, MAX_EXTENTS)
                .unwrap_or_else(|e| {
                    tracing::warn!(sid, error = %e, "SMMUv3: stream tables too large to shadow; mapping nothing");
                    StreamView::Mapped(Vec::new())
                });
            let want = runs_of(&view, self.ram_size);
            let have = inner.shadows.get(&sid).cloned().unwrap_or_default();
            let dom = |err| Smmuv3Error::Domain { stream, err };
            for (iova, run) in &have {
                if want.get(iova) != Some(run) {
                    self.domain.unmap(stream, *iova, run.1).map_err(dom)?;
                }
            }
            for (iova, run) in &want {
                if have.get(iova) != Some(run) {
                    self.domain
                        .map(stream, *iova, run.0, run.1, run.2)
                        .map_err(dom)?;
                }
            }
            tracing::debug!(sid, runs = want.len(), "SMMUv3 shadow synced");
            inner.shadows.insert(sid, want);
        }
        Ok(())
    }

    /// Report a DMA fault of `stream` at `iova` as the SMMU would: the model
    /// translates it and records the event (F_TRANSLATION, F_PERMISSION, ...) in the
    /// guest's event queue. Returns the error the translation gave, or None if the
    /// address translates now (the guest mapped it meanwhile).
    pub fn report_fault(&self, stream: StreamId, iova: u64, write: bool) -> Option<TranslateError> {
        let StreamId::Pci(rid) = stream else {
            return None;
        };
        let t = Transaction {
            sid: u32::from(rid),
            ssid: None,
            addr: iova,
            write,
        };
        self.inner.lock().smmu.translate(&self.mem, t).err()
    }

    /// The guest-physical address a device's MSI write to `iova` reaches (its MSI
    /// doorbell), or None if the guest's tables do not map it writable.
    pub fn msi_doorbell(&self, stream: StreamId, iova: u64) -> Option<u64> {
        let StreamId::Pci(rid) = stream else {
            return None;
        };
        let t = Transaction {
            sid: u32::from(rid),
            ssid: None,
            addr: iova,
            write: true,
        };
        self.inner
            .lock()
            .smmu
            .probe(&self.mem, t)
            .ok()
            .map(|t| t.addr)
    }
}

impl BusDevice for Smmuv3 {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        let v = match data.len() {
            4 | 8 if offset.is_multiple_of(4) => {
                self.inner.lock().smmu.read(offset, data.len() as u32)
            }
            _ => u64::MAX,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data.fill(0xff);
        data[..n].copy_from_slice(&bytes[..n]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
        let v = match data.len() {
            4 => u64::from(u32::from_le_bytes(data.try_into().unwrap_or([0; 4]))),
            8 => u64::from_le_bytes(data.try_into().unwrap_or([0; 8])),
            n => {
                tracing::debug!(
                    offset,
                    n,
                    "SMMUv3: ignoring an access that is not 32/64-bit"
                );
                return Ok(());
            }
        };
        if !offset.is_multiple_of(4) {
            return Ok(());
        }
        let mut inner = self.inner.lock();
        let before = inner.smmu.stats().syncs;
        inner.smmu.write(&self.mem, offset, data.len() as u32, v);
        // Invalidations are complete at CMD_SYNC (the architecture's rule, and what
        // every driver waits for): re-sync once per consumed CMD_SYNC batch.
        let consumed = inner.smmu.stats().syncs != before;
        let config = matches!(offset, regs::CR0 | regs::GBPA | regs::GERRORN);
        if consumed || config {
            if let Err(e) = self.resync(&mut inner) {
                // The device refused: its DMA stays as it was; the guest's view and
                // the device's differ, which the log must say.
                tracing::error!(error = %e, "SMMUv3 shadow re-sync failed");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::recorder::DmaRecorder;
    use crate::iommu::GuestRamFile;
    use crate::memory::GuestRam;

    const RAM: u64 = 16 << 20;
    const STRTAB: u64 = 0x10_0000;
    const CMDQ: u64 = 0x11_0000;
    const EVTQ: u64 = 0x12_0000;
    const CD: u64 = 0x13_0000;
    const L0: u64 = 0x14_0000;
    const PTE_RW: u64 = 3 | (1 << 10) | (1 << 6);

    struct Rig {
        ram: GuestRam,
        smmu: Smmuv3,
        dev: Arc<DmaRecorder>,
        prod: u32,
    }

    impl Rig {
        fn new() -> Self {
            let ram = GuestRam::new(RAM).unwrap();
            let domain = Arc::new(ShadowDomain::new(GuestRamFile::of(&ram)));
            let dev = Arc::new(DmaRecorder::default());
            let stream = StreamId::pci(0, 1, 0);
            domain.attach(stream, dev.clone()).unwrap();
            let smmu = Smmuv3::new(GuestRamView::new(ram.memory().clone(), None), domain, RAM);
            smmu.add_stream(stream).unwrap();
            Rig {
                ram,
                smmu,
                dev,
                prod: 0,
            }
        }
        fn w64(&self, addr: u64, v: u64) {
            self.ram.memory().write_obj(v, GuestAddress(addr)).unwrap();
        }
        fn r64(&self, addr: u64) -> u64 {
            self.ram.memory().read_obj(GuestAddress(addr)).unwrap()
        }
        fn reg(&self, off: u64, v: u64, size: usize) {
            self.smmu.write(off, &v.to_le_bytes()[..size]).unwrap();
        }
        fn cmd(&mut self, d0: u64, d1: u64) {
            let slot = CMDQ + u64::from(self.prod & 15) * 16;
            self.w64(slot, d0);
            self.w64(slot + 8, d1);
            self.prod = (self.prod + 1) & 31;
            self.reg(regs::CMDQ_PROD, u64::from(self.prod), 4);
        }
        /// Map IOVA page `iova` → `gpa` in the 4-level tables at L0 (tables at
        /// 0x150000.. one per level, IOVAs below 2 MiB share them).
        fn map(&self, iova: u64, gpa: u64) {
            self.w64(L0, 0x15_0000 | 3);
            self.w64(0x15_0000, 0x15_1000 | 3);
            self.w64(0x15_1000, 0x15_2000 | 3);
            self.w64(0x15_2000 + ((iova >> 12) & 0x1ff) * 8, gpa | PTE_RW);
        }
    }

    #[test]
    fn shadow_follows_the_guest_tables_on_invalidation() {
        let mut r = Rig::new();
        // Disabled SMMU: all of RAM at IOVA = GPA.
        assert_eq!(r.dev.map_ranges(), vec![(0, RAM, Prot::RW)]);
        assert_eq!(r.smmu.shadow(8), vec![(0, 0, RAM, Prot::RW)]);
        // Guest programs tables: SID 8 → CD → two contiguous pages and one apart.
        r.w64(STRTAB + 8 * 64, 1 | (5 << 1) | CD);
        r.w64(
            CD,
            16 | (1 << 31) | (1 << 41) | (5 << 32) | (1 << 45) | (1 << 46) | (1 << 48),
        );
        r.w64(CD + 8, L0);
        r.map(0x1000, 0x40_0000);
        r.map(0x2000, 0x40_1000);
        r.map(0x5000, 0x80_0000);
        r.reg(regs::STRTAB_BASE, STRTAB, 8);
        r.reg(regs::STRTAB_BASE_CFG, 5, 4);
        r.reg(regs::CMDQ_BASE, CMDQ | 4, 8);
        r.reg(regs::EVENTQ_BASE, EVTQ | 4, 8);
        r.reg(regs::CR0, 0xd, 4);
        assert_eq!(
            r.smmu.shadow(8),
            vec![
                (0x1000, 0x40_0000, 0x2000, Prot::RW),
                (0x5000, 0x80_0000, 0x1000, Prot::RW)
            ],
            "coalesced runs of the guest's translation"
        );
        assert_eq!(*r.dev.unmaps.lock(), vec![(0, RAM)]);
        assert!(r.dev.map_ranges().contains(&(0x1000, 0x2000, Prot::RW)));
        // Unmap 0x2000 in the guest: nothing changes until the invalidation.
        r.w64(0x15_2000 + 2 * 8, 0);
        r.reg(regs::IRQ_CTRL, 0, 4);
        assert_eq!(r.smmu.shadow(8).len(), 2);
        r.cmd(0x12 | (1u64 << 48), 0x2000);
        r.cmd(0x46, 0);
        assert_eq!(
            r.smmu.shadow(8),
            vec![
                (0x1000, 0x40_0000, 0x1000, Prot::RW),
                (0x5000, 0x80_0000, 0x1000, Prot::RW)
            ]
        );
        assert!(r.dev.unmaps.lock().contains(&(0x1000, 0x2000)));
        // A DMA the device reports at the unmapped IOVA becomes the guest's event.
        let err = r.smmu.report_fault(StreamId::pci(0, 1, 0), 0x2010, true);
        assert!(
            matches!(err, Some(TranslateError::Fault { recorded: true, .. })),
            "{err:?}"
        );
        let rec0 = r.r64(EVTQ);
        assert_eq!(rec0 & 0xff, 0x10, "F_TRANSLATION");
        assert_eq!(rec0 >> 32, 8, "the guest's SID");
        assert_eq!(r.r64(EVTQ + 16), 0x2010, "the IOVA");
        assert_eq!(r.smmu.read_u32(regs::EVENTQ_PROD), 1);
        // MSI doorbell: IOVA 0x5000 reaches GPA 0x800000.
        assert_eq!(
            r.smmu.msi_doorbell(StreamId::pci(0, 1, 0), 0x5004),
            Some(0x80_0004)
        );
        assert_eq!(r.smmu.msi_doorbell(StreamId::pci(0, 1, 0), 0x9000), None);
    }

    #[test]
    fn viommu_option() {
        assert_eq!("smmuv3".parse::<Viommu>(), Ok(Viommu::Smmuv3));
        assert_eq!("smmuv3,mode=shadow".parse::<Viommu>(), Ok(Viommu::Smmuv3));
        assert!("smmuv3,mode=nested"
            .parse::<Viommu>()
            .unwrap_err()
            .contains("not implemented"));
        assert!("intel".parse::<Viommu>().is_err());
        assert!("smmuv3,x=1".parse::<Viommu>().is_err());
    }

    #[test]
    fn bad_accesses_are_harmless() {
        let r = Rig::new();
        let mut b = [0u8; 2];
        r.smmu.read(0x20, &mut b).unwrap();
        assert_eq!(b, [0xff, 0xff]);
        let mut big = [0u8; 16];
        r.smmu.read(0x20, &mut big).unwrap();
        assert_eq!(big, [0xff; 16], "an oversized access answers all-ones");
        r.smmu.write(0x21, &[1, 2, 3, 4]).unwrap();
        r.smmu.write(0x20, &[1]).unwrap();
        assert_eq!(r.smmu.read_u32(regs::CR0), 0);
        assert!(matches!(
            r.smmu.add_stream(StreamId::Platform(3)),
            Err(Smmuv3Error::NotPci(_))
        ));
    }

    impl Smmuv3 {
        fn read_u32(&self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            BusDevice::read(self, off, &mut b).unwrap();
            u32::from_le_bytes(b)
        }
    }
}
