//! The emulated SMMUv3 of the VMM (`--viommu smmuv3[,mode=shadow|nested]`).
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
//! **Nested mode** (`smmuv3/nested.rs`, `mode=nested`): a vfio-user device whose server
//! negotiates nestio's nested-IOMMU extension walks the guest's stage 1 itself; the
//! SMMU gives it all of RAM as stage 2, binds the guest's STE, forwards the guest's
//! invalidations before the model consumes them and puts the device's fault records
//! in the guest's event queue. Other devices of the machine are shadowed.
//!
//! A shadowed device's DMA fault does not come back through vfio-user (the protocol
//! has no such message); the VMM reports faults it learns of with [`Smmuv3::report_fault`],
//! which runs the model's translation and so records the guest's event (its SID,
//! IOVA and direction) in the guest's event queue.
//!
//! **MSI doorbells** ([`crate::iommu::msi`]): the guest programs a device's MSI
//! address as an IOVA. The SMMU is its domain's [`MsiTranslator`]
//! ([`Smmuv3::translate_msis`]): the assigned device's interrupt wiring asks it for
//! every message it programs, and the SMMU translates it as the device's MSI write
//! (a DMA write of the stream) — a fault records the guest's event (once per
//! address until it translates again: re-programming cannot flood the event queue)
//! and leaves the vector without a route; an address that translates outside the
//! doorbell window is refused too. After every re-sync the watchers of the
//! invalidated ranges translate again. The SMMU's own MSIs (event queue, CMD_SYNC,
//! GERROR) go to RAM when they target RAM (CMD_SYNC polling) and otherwise to the
//! sink given at construction.
//!
//! The limit of shadowing an SMMUv3: a new mapping (invalid → valid) needs no
//! invalidation in the architecture, and Linux issues none on map, so the VMM sees
//! it only at the next CMD_SYNC the guest sends that is not range-only (a bare
//! CMD_SYNC, TLBI_NH_ASID / _ALL, CFGI_*). A guest driver made for shadow mode
//! invalidates after mapping (`guest/payloads/src/smmu.rs`); for unmodified guests
//! nested mode, where the device walks stage 1 itself, is the answer.
//!
//! **Cost** (`range`): a whole re-sync walks the valid part of each stream's tables
//! (bounded by [`MAX_EXTENTS`]). A batch whose invalidations are only TLBI_NH_VA /
//! VAA (single pages, or TG/NUM/SCALE ranges if IDR3.RIL is advertised) re-walks
//! only those ranges, page by page through [`Smmu::probe`], widened to every old
//! or new leaf that overlaps them (a TLBI inside a block invalidates the block), and
//! redoes only the runs that overlap or touch them. The shadow keeps each stream's
//! leaves (for the widening) and its coalesced runs (what the domain holds).

mod nested;
mod range;
mod remote_port;

pub use nested::{InvalidateOutcome, NestedCaps, NestedIommuPort, NestedPortError, PortFault};

use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use nestio_dma::Prot;
use nestio_iommu::smmuv3::evtq::code;
use nestio_iommu::smmuv3::{
    regs, MemoryError, Smmu, SmmuMemory, StreamView, Transaction, TranslateError,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::{BusDevice, BusFault};
use crate::iommu::msi::{self, MsiError, MsiTranslator, MsiWatcher, Watchers};
use crate::iommu::{DmaDomain, DmaDomainError, ShadowDomain, StreamId};
use range::{Leaves, Runs, Scope};

/// Most extents one stream's shadow may have (a hostile table cannot make the VMM
/// allocate without bound): 1 Mi leaves.
pub const MAX_EXTENTS: usize = 1 << 20;

/// Largest range (in 4 KiB pages) re-walked page by page on a TLBI; a larger one
/// re-syncs the whole stream (the walk of the valid part is then cheaper).
pub const MAX_RANGE_PAGES: u64 = 1 << 14;

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
    /// A nested-mode device refused or lost a request.
    #[error("SMMUv3 nested mode of {stream}: {err}")]
    Nested {
        /// The stream.
        stream: StreamId,
        /// Cause.
        err: NestedPortError,
    },
}

/// A vIOMMU the machine gives its guest (`--viommu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viommu {
    /// An SMMUv3 in the platform MMIO window (the first range of the window, so a
    /// payload finds it at [`crate::platform::PLATFORM_MMIO_WINDOW`]`.0`), shadowing
    /// the guest's translation into DMA_MAP/UNMAP.
    Smmuv3,
    /// The same SMMUv3 in nested mode (`smmuv3/nested.rs`): vfio-user devices whose server
    /// negotiates nestio's nested-IOMMU extension walk the guest's stage 1
    /// themselves; the others are shadowed.
    Smmuv3Nested,
}

impl std::str::FromStr for Viommu {
    type Err = String;
    /// `smmuv3`, `smmuv3,mode=shadow` or `smmuv3,mode=nested`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        if parts.next() != Some("smmuv3") {
            return Err(format!(
                "{s:?}: the only vIOMMU is smmuv3[,mode=shadow|nested]"
            ));
        }
        let mut v = Viommu::Smmuv3;
        for opt in parts {
            v = match opt {
                "mode=shadow" => Viommu::Smmuv3,
                "mode=nested" => Viommu::Smmuv3Nested,
                other => {
                    return Err(format!(
                        "{other:?}: smmuv3 takes mode=shadow or mode=nested"
                    ))
                }
            };
        }
        Ok(v)
    }
}

/// Where the SMMU's MSIs outside RAM go: `(address, data)`.
pub type MsiSink = Box<dyn Fn(u64, u32) + Send + Sync>;

/// Guest RAM as the SMMU sees it.
pub struct GuestRamView {
    mem: GuestMemoryMmap,
    msi: Option<MsiSink>,
    /// Guest-memory reads so far (table walks, queues): the cost the benchmark shows.
    reads: AtomicU64,
}

impl GuestRamView {
    /// `mem`, with SMMU MSIs outside RAM delivered to `msi` (dropped if None).
    pub fn new(mem: GuestMemoryMmap, msi: Option<MsiSink>) -> Self {
        GuestRamView {
            mem,
            msi,
            reads: AtomicU64::new(0),
        }
    }
}

impl SmmuMemory for GuestRamView {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
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

/// What the VMM has installed for one stream.
#[derive(Default, Clone)]
struct Shadow {
    /// The view was a bypass (all of RAM at IOVA = GPA): no TLBI can change it.
    bypass: bool,
    /// The composed leaves inside RAM.
    leaves: Leaves,
    /// The coalesced runs installed in the domain.
    runs: Runs,
}

/// Counters of the shadow (tests, benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShadowStats {
    /// Re-syncs of every stream's whole view.
    pub full: u64,
    /// Range-targeted re-syncs (one per TLBI range and stream).
    pub ranged: u64,
    /// Pages probed by range re-syncs.
    pub probes: u64,
    /// DMA_MAPs and DMA_UNMAPs sent to the domain.
    pub dma_maps: u64,
    /// DMA_UNMAPs sent to the domain.
    pub dma_unmaps: u64,
}

struct Inner {
    smmu: Smmu,
    /// The shadow of each known stream (by SID).
    shadows: BTreeMap<u32, Shadow>,
    stats: ShadowStats,
    /// MSI addresses `(sid, iova)` whose fault was already recorded: recorded again
    /// only after they translated once (no event storm from re-programming).
    msi_faults: BTreeSet<(u32, u64)>,
    /// Invalidations consumed since the last CMD_SYNC.
    pending: range::Pending,
    /// The streams in nested mode (by SID), not shadowed.
    nested: BTreeMap<u32, nested::NestedStream>,
}

/// The VMM's SMMUv3 (see the module documentation).
pub struct Smmuv3 {
    inner: Mutex<Inner>,
    mem: GuestRamView,
    domain: Arc<ShadowDomain>,
    ram_size: u64,
    doorbell: (u64, u64),
    watchers: Watchers,
}

fn prot_of(p: nestio_iommu::smmuv3::walk::Perm) -> Prot {
    match (p.read, p.write) {
        (true, true) => Prot::RW,
        (true, false) => Prot::READ,
        (false, true) => Prot::WRITE,
        (false, false) => Prot::NONE,
    }
}

/// The leaves of a view that a DMA_MAP can give: inside RAM, with some permission.
fn leaves_of(view: &StreamView, ram_size: u64) -> (bool, Leaves) {
    let mut leaves = Leaves::new();
    match view {
        StreamView::Bypass => {
            leaves.insert(0, (0, ram_size, Prot::RW));
            (true, leaves)
        }
        StreamView::Mapped(extents) => {
            for e in extents {
                let Some(size) = 1u64.checked_shl(e.size_bits) else {
                    continue;
                };
                let inside = e
                    .output
                    .checked_add(size)
                    .is_some_and(|end| end <= ram_size);
                let prot = prot_of(e.perm);
                // MMIO (an MSI doorbell) or beyond RAM: not a DMA_MAP.
                if inside && prot != Prot::NONE {
                    leaves.insert(e.input, (e.output, size, prot));
                }
            }
            (false, leaves)
        }
    }
}

/// What one re-sync changed, told to the MSI watchers once the lock is dropped.
enum Changed {
    Nothing,
    All,
    Ranges(Vec<(u64, u64)>),
}

impl Smmuv3 {
    /// An SMMU (reset state) whose devices are in `domain`, over guest RAM `mem` of
    /// `ram_size` bytes. Its MSI doorbell window is the x86 one
    /// ([`msi::X86_DOORBELL`]); give the domain this SMMU as its MSI translator with
    /// [`Smmuv3::translate_msis`].
    pub fn new(mem: GuestRamView, domain: Arc<ShadowDomain>, ram_size: u64) -> Self {
        Smmuv3 {
            inner: Mutex::new(Inner {
                smmu: Smmu::new(),
                shadows: BTreeMap::new(),
                stats: ShadowStats::default(),
                msi_faults: BTreeSet::new(),
                pending: range::Pending::default(),
                nested: BTreeMap::new(),
            }),
            mem,
            domain,
            ram_size,
            doorbell: msi::X86_DOORBELL,
            watchers: Watchers::default(),
        }
    }

    /// Make this SMMU the MSI translator of its domain's devices
    /// ([`crate::iommu::msi`]): their MSI addresses are IOVAs from now on.
    pub fn translate_msis(self: &Arc<Self>) {
        let t: Arc<dyn MsiTranslator> = self.clone();
        self.domain.set_msi_translator(Arc::downgrade(&t));
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

    /// Number of re-syncs so far, full and ranged (tests, benchmark).
    pub fn resyncs(&self) -> u64 {
        let s = self.inner.lock().stats;
        s.full + s.ranged
    }

    /// The shadow's counters.
    pub fn stats(&self) -> ShadowStats {
        self.inner.lock().stats
    }

    /// Guest-memory reads the model and the shadow made so far (walks, queues).
    pub fn memory_reads(&self) -> u64 {
        self.mem.reads.load(Ordering::Relaxed)
    }

    /// The shadowed runs of `sid`: `(iova, gpa, size, prot)`.
    pub fn shadow(&self, sid: u32) -> Vec<(u64, u64, u64, Prot)> {
        self.inner
            .lock()
            .shadows
            .get(&sid)
            .map(|r| {
                r.runs
                    .iter()
                    .map(|(i, (g, s, p))| (*i, *g, *s, *p))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Make the domain's runs of `stream` in `old` become `new` (only the differing
    /// runs are unmapped and mapped).
    fn apply(
        &self,
        stats: &mut ShadowStats,
        stream: StreamId,
        old: &Runs,
        new: &Runs,
    ) -> Result<(), Smmuv3Error> {
        let dom = |err| Smmuv3Error::Domain { stream, err };
        for (iova, run) in old {
            if new.get(iova) != Some(run) {
                stats.dma_unmaps += 1;
                self.domain.unmap(stream, *iova, run.1).map_err(dom)?;
            }
        }
        for (iova, run) in new {
            if old.get(iova) != Some(run) {
                stats.dma_maps += 1;
                self.domain
                    .map(stream, *iova, run.0, run.1, run.2)
                    .map_err(dom)?;
            }
        }
        Ok(())
    }

    /// Re-sync every stream's whole view.
    fn resync(&self, inner: &mut Inner) -> Result<(), Smmuv3Error> {
        inner.stats.full += 1;
        let sids: Vec<u32> = inner.shadows.keys().copied().collect();
        for sid in sids {
            self.resync_stream(inner, sid)?;
        }
        Ok(())
    }

    fn resync_stream(&self, inner: &mut Inner, sid: u32) -> Result<(), Smmuv3Error> {
        let stream = StreamId::Pci(sid as u16);
        let view = inner
            .smmu
            .stream_view(&self.mem, sid, MAX_EXTENTS)
            .unwrap_or_else(|e| {
                tracing::warn!(sid, error = %e, "SMMUv3: stream tables too large to shadow; mapping nothing");
                StreamView::Mapped(Vec::new())
            });
        let (bypass, leaves) = leaves_of(&view, self.ram_size);
        let runs = range::coalesce(&leaves);
        let old = inner.shadows.get(&sid).cloned().unwrap_or_default();
        // Record the new state before applying it: a refused map leaves the device
        // short of the guest's view, which the next re-sync retries.
        let r = self.apply(&mut inner.stats, stream, &old.runs, &runs);
        tracing::debug!(sid, runs = runs.len(), "SMMUv3 shadow synced");
        inner.shadows.insert(
            sid,
            Shadow {
                bypass,
                leaves,
                runs,
            },
        );
        r
    }

    /// The composed leaf around `addr` as the guest's tables are now, if it is a
    /// DMA_MAP-able one: `Ok(Some((iova, gpa, size, prot)))`; `Ok(None)` if `addr`
    /// faults; `Err(())` if it bypasses (a whole-stream re-sync is needed).
    fn probe_leaf(
        &self,
        inner: &mut Inner,
        sid: u32,
        addr: u64,
    ) -> Result<Option<(u64, u64, u64, Prot)>, ()> {
        inner.stats.probes += 1;
        let t = |write| Transaction {
            sid,
            ssid: None,
            addr,
            write,
        };
        let tr = match inner.smmu.probe(&self.mem, t(false)) {
            Err(TranslateError::Fault { event, .. }) if event.code == code::F_PERMISSION => {
                inner.smmu.probe(&self.mem, t(true))
            }
            r => r,
        };
        let Ok(tr) = tr else { return Ok(None) };
        if tr.size_bits >= 48 {
            return Err(());
        }
        let size = 1u64 << tr.size_bits;
        let base = addr & !(size - 1);
        let Some(gpa) = tr.addr.checked_sub(addr - base) else {
            return Ok(None);
        };
        let prot = prot_of(tr.perm);
        let inside = gpa.checked_add(size).is_some_and(|e| e <= self.ram_size);
        Ok((inside && prot != Prot::NONE).then_some((base, gpa, size, prot)))
    }

    /// Re-walk `[start, start + len)` of stream `sid` (and every leaf, old or new,
    /// that overlaps it) and apply the difference. Falls back to a whole-stream
    /// re-sync when the range grows beyond [`MAX_RANGE_PAGES`] or the stream bypasses.
    fn resync_range(
        &self,
        inner: &mut Inner,
        sid: u32,
        start: u64,
        len: u64,
    ) -> Result<(), Smmuv3Error> {
        let Some(old) = inner.shadows.get(&sid) else {
            return Ok(());
        };
        if old.bypass || !inner.smmu.enabled() {
            // An SMMU bypass or a bypass STE: TLBIs cannot change it (CR0, GBPA and
            // CFGI_* re-sync the whole view).
            return Ok(());
        }
        inner.stats.ranged += 1;
        let mut lo = start & !0xfff;
        let mut hi = start.saturating_add(len).saturating_add(0xfff) & !0xfff;
        let mut fresh = Leaves::new();
        let mut settled = false;
        for _ in 0..8 {
            let old = &inner.shadows[&sid];
            for k in range::overlapping(&old.leaves, lo, hi, false) {
                let size = old.leaves[&k].1;
                lo = lo.min(k);
                hi = hi.max(k.saturating_add(size));
            }
            if (hi - lo) >> 12 > MAX_RANGE_PAGES {
                break;
            }
            fresh.clear();
            let (mut nlo, mut nhi) = (lo, hi);
            let mut addr = lo;
            let mut bypass = false;
            while addr < hi {
                match self.probe_leaf(inner, sid, addr) {
                    Err(()) => {
                        bypass = true;
                        break;
                    }
                    Ok(None) => addr += 0x1000,
                    Ok(Some((base, gpa, size, prot))) => {
                        fresh.insert(base, (gpa, size, prot));
                        nlo = nlo.min(base);
                        nhi = nhi.max(base.saturating_add(size));
                        addr = base.saturating_add(size).max(addr + 0x1000);
                    }
                }
            }
            if bypass {
                break;
            }
            if nlo == lo && nhi == hi {
                settled = true;
                break;
            }
            (lo, hi) = (nlo, nhi);
        }
        if !settled {
            return self.resync_stream(inner, sid);
        }
        let stream = StreamId::Pci(sid as u16);
        let sh = inner.shadows.get_mut(&sid).expect("checked above");
        for k in range::overlapping(&sh.leaves, lo, hi, false) {
            sh.leaves.remove(&k);
        }
        sh.leaves.extend(fresh);
        // The runs to redo: those overlapping or touching the range (so that the new
        // leaves coalesce with their neighbours as a whole re-sync would).
        let touched = range::overlapping(&sh.runs, lo, hi, true);
        let rlo = touched.first().map_or(lo, |&k| k.min(lo));
        let rhi = touched
            .last()
            .map_or(hi, |&k| k.saturating_add(sh.runs[&k].1).max(hi));
        let old_runs: Runs = touched.iter().map(|k| (*k, sh.runs[k])).collect();
        let new_runs = range::coalesce(sh.leaves.range(rlo..rhi));
        for k in &touched {
            sh.runs.remove(k);
        }
        sh.runs.extend(new_runs.iter().map(|(k, v)| (*k, *v)));
        tracing::debug!(
            sid,
            lo,
            hi,
            runs = new_runs.len(),
            "SMMUv3 shadow range synced"
        );
        let mut stats = inner.stats;
        let r = self.apply(&mut stats, stream, &old_runs, &new_runs);
        inner.stats = stats;
        r
    }

    /// The command at queue index `idx` of the queue at `base` (2^`log2` slots).
    fn read_command(&self, base: u64, log2: u32, idx: u32) -> Option<[u64; 2]> {
        let slot = idx & ((1u32 << log2) - 1);
        let addr = (base & regs::Q_BASE_ADDR_MASK) + u64::from(slot) * 16;
        let mut b = [0u8; 16];
        SmmuMemory::read(&self.mem, addr, &mut b).ok()?;
        let (d0, d1) = b.split_at(8);
        Some([
            u64::from_le_bytes(d0.try_into().ok()?),
            u64::from_le_bytes(d1.try_into().ok()?),
        ])
    }

    /// The commands the model consumed between CMDQ_CONS `before` and now.
    fn consumed(&self, inner: &Inner, before: u32) -> Option<Vec<[u64; 2]>> {
        let base = inner.smmu.read(regs::CMDQ_BASE, 8);
        let log2 = regs::queue_log2(base, regs::CMDQS);
        let index_mask = (2u32 << log2) - 1;
        let after = inner.smmu.read(regs::CMDQ_CONS, 4) as u32;
        let n = after.wrapping_sub(before) & index_mask;
        if n > range::MAX_SCAN {
            return None;
        }
        (0..n)
            .map(|i| self.read_command(base, log2, before.wrapping_add(i)))
            .collect()
    }

    /// Whether a write of `v` at `offset` leaves the command queue enabled without
    /// an active command error (so the model consumes commands at it).
    fn consumes_after(inner: &Inner, offset: u64, v: u32) -> bool {
        let r = |o| inner.smmu.read(o, 4) as u32;
        let enabled = if offset == regs::CR0 { v } else { r(regs::CR0) } & regs::CR0_CMDQEN != 0;
        let gerrorn = if offset == regs::GERRORN {
            v
        } else {
            r(regs::GERRORN)
        };
        let error = (r(regs::GERROR) ^ gerrorn) & regs::GERROR_CMDQ_ERR != 0;
        enabled && !error
    }

    /// The model's MMIO write, with nested-mode forwarding first: the guest's
    /// commands go to the nested devices before the model consumes them, and a
    /// command a device refused stops the guest's queue at its index.
    fn model_write(&self, inner: &mut Inner, offset: u64, size: u32, v: u64) {
        let trigger = matches!(offset, regs::CMDQ_PROD | regs::GERRORN | regs::CR0);
        let refused = if trigger
            && !inner.nested.is_empty()
            && Self::consumes_after(inner, offset, v as u32)
        {
            let mask =
                (2u32 << regs::queue_log2(inner.smmu.read(regs::CMDQ_BASE, 8), regs::CMDQS)) - 1;
            let prod = if offset == regs::CMDQ_PROD {
                v as u32 & mask
            } else {
                inner.smmu.read(regs::CMDQ_PROD, 4) as u32
            };
            self.forward(inner, prod).map(|k| (k, prod))
        } else {
            None
        };
        let Some((k, prod)) = refused else {
            inner.smmu.write(&self.mem, offset, size, v);
            return;
        };
        // Consume up to the refused command, stop there with CERROR_ILL, then let
        // PROD be the guest's (nothing more is consumed while the error is active).
        inner
            .smmu
            .write(&self.mem, regs::CMDQ_PROD, 4, u64::from(k));
        if offset != regs::CMDQ_PROD {
            inner.smmu.write(&self.mem, offset, size, v);
        }
        let mask = (2u32 << regs::queue_log2(inner.smmu.read(regs::CMDQ_BASE, 8), regs::CMDQS)) - 1;
        let at_k = inner.smmu.read(regs::CMDQ_CONS, 4) as u32 & mask == k;
        if at_k && Self::consumes_after(inner, regs::CMDQ_PROD, 0) {
            inner.smmu.raise_command_error(&self.mem, regs::CERROR_ILL);
        }
        inner
            .smmu
            .write(&self.mem, regs::CMDQ_PROD, 4, u64::from(prod));
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

impl MsiTranslator for Smmuv3 {
    /// The device's MSI write goes through the SMMU as a DMA write would: a fault is
    /// recorded in the guest's event queue (once per address until it translates).
    fn translate(&self, stream: StreamId, iova: u64) -> Result<u64, MsiError> {
        let StreamId::Pci(rid) = stream else {
            return Err(MsiError::Fault { stream, iova });
        };
        let sid = u32::from(rid);
        let t = Transaction {
            sid,
            ssid: None,
            addr: iova,
            write: true,
        };
        let mut inner = self.inner.lock();
        let r = if inner.msi_faults.contains(&(sid, iova)) {
            inner.smmu.probe(&self.mem, t)
        } else {
            inner.smmu.translate(&self.mem, t)
        };
        match r {
            Ok(tr) => {
                inner.msi_faults.remove(&(sid, iova));
                if msi::in_doorbell(self.doorbell, tr.addr) {
                    Ok(tr.addr)
                } else {
                    Err(MsiError::NotDoorbell {
                        stream,
                        iova,
                        addr: tr.addr,
                    })
                }
            }
            Err(_) => {
                inner.msi_faults.insert((sid, iova));
                Err(MsiError::Fault { stream, iova })
            }
        }
    }

    fn watch(&self, stream: StreamId, watcher: Weak<dyn MsiWatcher>) {
        self.watchers.add(stream, watcher);
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
        let changed = {
            let mut inner = self.inner.lock();
            let before = inner.smmu.stats().syncs;
            let cons = inner.smmu.read(regs::CMDQ_CONS, 4) as u32;
            self.model_write(&mut inner, offset, data.len() as u32, v);
            // Invalidations are complete at CMD_SYNC (the architecture's rule, and what
            // every driver waits for): re-sync once per consumed CMD_SYNC batch, only
            // the ranges it invalidated when it invalidated only ranges.
            let synced = inner.smmu.stats().syncs != before;
            let config = matches!(offset, regs::CR0 | regs::GBPA | regs::GERRORN);
            let ril = inner.smmu.read(regs::IDR3, 4) & (1 << 10) != 0;
            let cmds = self.consumed(&inner, cons);
            if !inner.nested.is_empty() {
                // Re-read the STEs the guest may have changed: all of them at a
                // configuration write or an unreadable batch, else those its CFGI_STE*
                // commands name. The device's errors are logged (in `rebind`).
                let pick =
                    |sid| config || cmds.as_deref().is_none_or(|c| Self::reconfigures(c, sid));
                let _ = self.rebind(&mut inner, &pick);
            }
            let completed = match cmds {
                Some(cmds) => inner.pending.consume(&cmds, ril),
                None => {
                    // Too many to classify: whatever they were, all of it.
                    inner.pending = range::Pending::default();
                    Some(Scope::All)
                }
            };
            let scope = match (config, synced, completed) {
                (true, _, _) | (_, true, None) => Scope::All,
                (false, _, Some(s)) => s,
                (false, false, None) => return Ok(()),
            };
            let r = match &scope {
                Scope::All => self.resync(&mut inner),
                Scope::Ranges(ranges) => {
                    let sids: Vec<u32> = inner.shadows.keys().copied().collect();
                    sids.iter().try_for_each(|&sid| {
                        ranges
                            .iter()
                            .try_for_each(|&(s, l)| self.resync_range(&mut inner, sid, s, l))
                    })
                }
            };
            if let Err(e) = r {
                // The device refused: its DMA stays as it was; the guest's view and
                // the device's differ, which the log must say.
                tracing::error!(error = %e, "SMMUv3 shadow re-sync failed");
            }
            match scope {
                Scope::All => Changed::All,
                Scope::Ranges(r) if r.is_empty() => Changed::Nothing,
                Scope::Ranges(r) => Changed::Ranges(r),
            }
        };
        // The lock is dropped: the MSI watchers translate again through it.
        match changed {
            Changed::Nothing => {}
            Changed::All => self.watchers.notify(None, None),
            Changed::Ranges(r) => {
                for range in r {
                    self.watchers.notify(None, Some(range));
                }
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

    /// Through `w64` (a 64-bit guest RAM write): SID 8's STE (stage 1, its CD at `CD`)
    /// and that CD (valid, AArch64, 4 KiB granule, 48-bit input, ASID 1, table at `L0`).
    fn ste_and_cd_of_sid8(w64: &dyn Fn(u64, u64)) {
        w64(STRTAB + 8 * 64, 1 | (5 << 1) | CD);
        w64(
            CD,
            16 | (1 << 31) | (1 << 41) | (5 << 32) | (1 << 45) | (1 << 46) | (1 << 48),
        );
        w64(CD + 8, L0);
    }

    /// The guest programs tables (SID 8 → CD → 0x1000-0x2fff → 0x400000, two
    /// contiguous pages, and 0x5000 → 0x800000 apart) and enables the SMMU.
    fn program_sid8(r: &Rig) {
        ste_and_cd_of_sid8(&|a, v| r.w64(a, v));
        r.map(0x1000, 0x40_0000);
        r.map(0x2000, 0x40_1000);
        r.map(0x5000, 0x80_0000);
        r.reg(regs::STRTAB_BASE, STRTAB, 8);
        r.reg(regs::STRTAB_BASE_CFG, 5, 4);
        r.reg(regs::CMDQ_BASE, CMDQ | 4, 8);
        r.reg(regs::EVENTQ_BASE, EVTQ | 4, 8);
        r.reg(regs::CR0, 0xd, 4);
    }

    #[test]
    fn shadow_follows_the_guest_tables_on_invalidation() {
        let mut r = Rig::new();
        // Disabled SMMU: all of RAM at IOVA = GPA.
        assert_eq!(r.dev.map_ranges(), vec![(0, RAM, Prot::RW)]);
        assert_eq!(r.smmu.shadow(8), vec![(0, 0, RAM, Prot::RW)]);
        program_sid8(&r);
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

    /// The rig of `shadow_follows_the_guest_tables_on_invalidation`, enabled, with
    /// 0x1000-0x2fff → 0x400000 and 0x5000 → 0x800000; the recorder cleared.
    fn enabled_rig() -> Rig {
        let r = Rig::new();
        program_sid8(&r);
        r.dev.maps.lock().clear();
        r.dev.unmaps.lock().clear();
        r
    }

    #[test]
    fn a_tlbi_of_one_page_re_walks_and_remaps_only_that_page() {
        let mut r = enabled_rig();
        let full = r.smmu.stats().full;
        // The guest unmaps 0x2000 and invalidates it; it also retargets 0x5000
        // without invalidating (the SMMU may keep using the old entry: a TLB does).
        r.w64(0x15_2000 + 2 * 8, 0);
        r.w64(0x15_2000 + 5 * 8, 0x90_0000 | PTE_RW);
        r.cmd(0x12 | (1u64 << 48), 0x2000);
        r.cmd(0x46, 0);
        let s = r.smmu.stats();
        assert_eq!(
            (s.full, s.ranged),
            (full, 1),
            "one range re-sync, no full one"
        );
        assert!(s.probes <= 2, "only the invalidated page was walked: {s:?}");
        assert_eq!(
            r.smmu.shadow(8),
            vec![
                (0x1000, 0x40_0000, 0x1000, Prot::RW),
                (0x5000, 0x80_0000, 0x1000, Prot::RW)
            ],
            "0x5000 was not invalidated: still the old translation"
        );
        assert_eq!(*r.dev.unmaps.lock(), vec![(0x1000, 0x2000)]);
        assert_eq!(r.dev.map_ranges(), vec![(0x1000, 0x1000, Prot::RW)]);
        // Now 0x5000 is invalidated (TLBI_NH_VAA): exactly its run is redone.
        r.dev.maps.lock().clear();
        r.dev.unmaps.lock().clear();
        r.cmd(0x13, 0x5000);
        r.cmd(0x46, 0);
        assert_eq!(*r.dev.unmaps.lock(), vec![(0x5000, 0x1000)]);
        assert_eq!(r.dev.map_ranges(), vec![(0x5000, 0x1000, Prot::RW)]);
        assert_eq!(r.dev.maps.lock()[0].4, r.ram.fd_offset() + 0x90_0000);
        // Mapping 0x2000 back and invalidating it coalesces with its neighbour, as a
        // whole re-sync would.
        r.dev.maps.lock().clear();
        r.dev.unmaps.lock().clear();
        r.map(0x2000, 0x40_1000);
        r.cmd(0x12 | (1u64 << 48), 0x2000);
        r.cmd(0x46, 0);
        assert_eq!(r.smmu.shadow(8)[0], (0x1000, 0x40_0000, 0x2000, Prot::RW));
        assert_eq!(*r.dev.unmaps.lock(), vec![(0x1000, 0x1000)]);
        assert_eq!(r.dev.map_ranges(), vec![(0x1000, 0x2000, Prot::RW)]);
        assert_eq!(r.smmu.stats().full, full, "still no full re-sync");
        // TLBI_NH_ASID is not a range: the whole view is re-synced.
        r.cmd(0x11 | (1u64 << 48), 0);
        r.cmd(0x46, 0);
        assert_eq!(r.smmu.stats().full, full + 1);
    }

    #[test]
    fn a_tlbi_inside_an_old_block_re_walks_the_whole_block() {
        let mut r = enabled_rig();
        // A 2 MiB block at IOVA 0x200000 → GPA 0xa00000.
        let block = 0xa0_0000 | 1 | (1 << 10) | (1 << 6);
        r.w64(0x15_1000 + 8, block);
        r.cmd(0x11 | (1u64 << 48), 0);
        r.cmd(0x46, 0);
        assert!(r
            .smmu
            .shadow(8)
            .contains(&(0x20_0000, 0xa0_0000, 0x20_0000, Prot::RW)));
        r.dev.maps.lock().clear();
        r.dev.unmaps.lock().clear();
        // The block becomes a table with one page; the guest invalidates one address
        // in it: the old block's whole range goes, the one page comes.
        r.w64(0x15_3000 + 3 * 8, 0xb0_3000 | PTE_RW);
        r.w64(0x15_1000 + 8, 0x15_3000 | 3);
        r.cmd(0x12 | (1u64 << 48), 0x20_3000);
        r.cmd(0x46, 0);
        assert_eq!(*r.dev.unmaps.lock(), vec![(0x20_0000, 0x20_0000)]);
        assert_eq!(r.dev.map_ranges(), vec![(0x20_3000, 0x1000, Prot::RW)]);
        assert!(r.smmu.stats().probes >= 512, "the old block was re-walked");
    }

    #[test]
    fn msi_addresses_translate_to_the_doorbell_or_fault_once() {
        let r = enabled_rig();
        let s = StreamId::pci(0, 1, 0);
        // IOVA 0x7000 → the x86 doorbell page; 0x5000 is RAM; 0x9000 is unmapped.
        r.w64(0x15_2000 + 7 * 8, 0xfee0_0000 | PTE_RW);
        assert_eq!(
            MsiTranslator::translate(&r.smmu, s, 0x7004),
            Ok(0xfee0_0004)
        );
        assert!(matches!(
            MsiTranslator::translate(&r.smmu, s, 0x5000),
            Err(MsiError::NotDoorbell {
                addr: 0x80_0000,
                ..
            })
        ));
        assert_eq!(r.smmu.read_u32(regs::EVENTQ_PROD), 0);
        assert_eq!(
            MsiTranslator::translate(&r.smmu, s, 0x9000),
            Err(MsiError::Fault {
                stream: s,
                iova: 0x9000
            })
        );
        assert_eq!(r.smmu.read_u32(regs::EVENTQ_PROD), 1, "one event");
        let rec0 = r.r64(EVTQ);
        assert_eq!((rec0 & 0xff, rec0 >> 32), (0x10, 8), "F_TRANSLATION, SID 8");
        assert_eq!(r.r64(EVTQ + 16), 0x9000);
        assert!(r.r64(EVTQ + 8) & (1 << 35) == 0, "a write (RnW clear)");
        // Programming it again does not flood the event queue.
        for _ in 0..5 {
            assert!(MsiTranslator::translate(&r.smmu, s, 0x9000).is_err());
        }
        assert_eq!(r.smmu.read_u32(regs::EVENTQ_PROD), 1, "still one event");
        // Once it translates, a later fault is reported again.
        r.w64(0x15_2000 + 9 * 8, 0xfee0_0000 | PTE_RW);
        assert_eq!(
            MsiTranslator::translate(&r.smmu, s, 0x9000),
            Ok(0xfee0_0000)
        );
        r.w64(0x15_2000 + 9 * 8, 0);
        let mut r = r;
        r.cmd(0x12 | (1u64 << 48), 0x9000);
        r.cmd(0x46, 0);
        assert!(MsiTranslator::translate(&r.smmu, s, 0x9000).is_err());
        assert_eq!(r.smmu.read_u32(regs::EVENTQ_PROD), 2);
    }

    #[test]
    fn an_assigned_devices_msi_is_routed_through_the_smmu_and_follows_invalidations() {
        use crate::address_space::fake::RecordingSpace;
        use crate::bus::Bus;
        use crate::irqchip::fake::{IrqCall, RecordingIrqChip};
        use crate::pci::{ConfigSpaceFunction, PciRoot};
        use crate::region_map::RegionMapper;
        use nestio_device_model::pci::MsiMessage;

        let ram = GuestRam::new(RAM).unwrap();
        let domain = Arc::new(ShadowDomain::new(GuestRamFile::of(&ram)));
        let smmu = Arc::new(Smmuv3::new(
            GuestRamView::new(ram.memory().clone(), None),
            domain.clone(),
            RAM,
        ));
        smmu.translate_msis();
        let chip = Arc::new(RecordingIrqChip::default());
        let space = Arc::new(RecordingSpace::default());
        let mapper = RegionMapper::new(space, Arc::new(Bus::new()), Arc::new(Bus::new()));
        let root = PciRoot::new(chip.clone(), mapper, domain);
        let sample = Arc::new(nestio_emulated::sample::SampleDevice::new().unwrap());
        let dev = root.assign(1, "sample".into(), sample).unwrap();
        smmu.add_stream(StreamId::pci(0, 1, 0)).unwrap();
        let w64 = |a: u64, v: u64| ram.memory().write_obj(v, GuestAddress(a)).unwrap();
        let reg = |o: u64, v: u64, n: usize| smmu.write(o, &v.to_le_bytes()[..n]).unwrap();
        // Tables: SID 8 → CD → IOVA 0x7000 → the doorbell page.
        ste_and_cd_of_sid8(&w64);
        w64(L0, 0x15_0000 | 3);
        w64(0x15_0000, 0x15_1000 | 3);
        w64(0x15_1000, 0x15_2000 | 3);
        w64(0x15_2000 + 7 * 8, 0xfee0_0000 | PTE_RW);
        reg(regs::STRTAB_BASE, STRTAB, 8);
        reg(regs::STRTAB_BASE_CFG, 5, 4);
        reg(regs::CMDQ_BASE, CMDQ | 4, 8);
        reg(regs::EVENTQ_BASE, EVTQ | 4, 8);
        reg(regs::CR0, 0xd, 4);
        // The guest programs MSI with the IOVA and enables one vector.
        let mut p = {
            let mut b = [0u8; 4];
            dev.config_read(0x34, &mut b).unwrap();
            u16::from(b[0] & 0xfc)
        };
        let cap = loop {
            let mut b = [0u8; 4];
            dev.config_read(p, &mut b).unwrap();
            if b[0] == 0x05 {
                break p;
            }
            p = u16::from(b[1] & 0xfc);
            assert_ne!(p, 0, "no MSI capability");
        };
        dev.config_write(cap + 4, &0x7000u32.to_le_bytes()).unwrap();
        dev.config_write(cap + 8, &0u32.to_le_bytes()).unwrap();
        dev.config_write(cap + 0xc, &0x41u16.to_le_bytes()).unwrap();
        chip.take();
        dev.config_write(cap + 2, &1u16.to_le_bytes()).unwrap();
        let routed = |calls: &[IrqCall]| {
            calls.iter().rev().find_map(|c| match c {
                IrqCall::ProgramMsi(v) => Some(v[0].1),
                _ => None,
            })
        };
        let doorbell = Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        });
        assert_eq!(
            routed(&chip.take()),
            Some(doorbell),
            "the translated address"
        );
        // The guest unmaps the doorbell IOVA and invalidates it: the route goes
        // (the vector is masked) and the guest gets an event.
        w64(0x15_2000 + 7 * 8, 0);
        let cmd = |i: u64, d0: u64, d1: u64| {
            w64(CMDQ + i * 16, d0);
            w64(CMDQ + i * 16 + 8, d1);
            reg(regs::CMDQ_PROD, i + 1, 4);
        };
        cmd(0, 0x12 | (1 << 48), 0x7000);
        cmd(1, 0x46, 0);
        assert_eq!(routed(&chip.take()), Some(None), "no route: masked");
        assert_eq!(smmu.read_u32(regs::EVENTQ_PROD), 1);
        assert_eq!(
            ram.memory()
                .read_obj::<u64>(GuestAddress(EVTQ + 16))
                .unwrap(),
            0x7000
        );
        // An invalidation elsewhere does not touch the vector.
        cmd(2, 0x12 | (1 << 48), 0x40_0000);
        cmd(3, 0x46, 0);
        assert_eq!(routed(&chip.take()), None, "not covered: not reprogrammed");
        // Mapped again (a new doorbell page offset) and invalidated: routed again.
        w64(0x15_2000 + 7 * 8, 0xfee0_0000 | PTE_RW);
        cmd(4, 0x12 | (1 << 48), 0x7000);
        cmd(5, 0x46, 0);
        assert_eq!(routed(&chip.take()), Some(doorbell));
        assert_eq!(smmu.read_u32(regs::EVENTQ_PROD), 1, "no event storm");
    }

    #[test]
    fn range_resyncs_agree_with_whole_resyncs_under_random_changes() {
        // Differential: a guest that changes only what it then invalidates must get
        // from the range re-syncs exactly what a whole re-sync gives, and the device
        // (a real map table: exact unmaps) must hold exactly those runs.
        use crate::iommu::table_device::TableDevice;
        let ram = GuestRam::new(RAM).unwrap();
        let domain = Arc::new(ShadowDomain::new(GuestRamFile::of(&ram)));
        let dev = Arc::new(TableDevice::new(1 << 16));
        let stream = StreamId::pci(0, 1, 0);
        domain.attach(stream, dev.clone()).unwrap();
        let smmu = Smmuv3::new(GuestRamView::new(ram.memory().clone(), None), domain, RAM);
        smmu.add_stream(stream).unwrap();
        let w64 = |a: u64, v: u64| ram.memory().write_obj(v, GuestAddress(a)).unwrap();
        let reg = |o: u64, v: u64, n: usize| smmu.write(o, &v.to_le_bytes()[..n]).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        const L3: u64 = 0x16_0000;
        let leaf = |rnd: &mut dyn FnMut(u64) -> u64, page: u64| -> u64 {
            match rnd(4) {
                0 => 0,
                1 => (0x40_0000 + (page + rnd(2)) * 0x1000) | PTE_RW | (1 << 7),
                _ => (0x40_0000 + (page + rnd(2)) * 0x1000) | PTE_RW,
            }
        };
        ste_and_cd_of_sid8(&w64);
        w64(L0, 0x15_0000 | 3);
        w64(0x15_0000, 0x15_1000 | 3);
        for t in 0..4u64 {
            w64(0x15_1000 + t * 8, (L3 + t * 0x1000) | 3);
            for i in 0..512u64 {
                w64(L3 + t * 0x1000 + i * 8, leaf(&mut rnd, t * 512 + i));
            }
        }
        reg(regs::STRTAB_BASE, STRTAB, 8);
        reg(regs::STRTAB_BASE_CFG, 5, 4);
        reg(regs::CMDQ_BASE, CMDQ | 4, 8);
        reg(regs::CR0, 0xd, 4);
        let mut prod = 0u32;
        let mut cmd = |d0: u64, d1: u64| {
            let slot = CMDQ + u64::from(prod & 15) * 16;
            w64(slot, d0);
            w64(slot + 8, d1);
            prod = (prod + 1) & 31;
            smmu.write(regs::CMDQ_PROD, &prod.to_le_bytes()).unwrap();
        };
        let full = smmu.stats().full;
        for step in 0..300 {
            let t = rnd(4);
            // The address invalidated: the changed page, or any page of a swapped
            // 2 MiB region.
            let mut page = rnd(512);
            if rnd(10) == 0 {
                // Swap a whole 2 MiB region between an L3 table and a block.
                let l2 = 0x15_1000 + t * 8;
                let cur: u64 = ram.memory().read_obj(GuestAddress(l2)).unwrap();
                let new = if cur & 2 != 0 {
                    (rnd(7) << 21) | 1 | (1 << 10) | (1 << 6)
                } else {
                    (L3 + t * 0x1000) | 3
                };
                w64(l2, new);
            } else {
                let i = page;
                w64(L3 + t * 0x1000 + i * 8, leaf(&mut rnd, t * 512 + i));
                page = i;
            }
            let addr = (t << 21) | (page << 12);
            cmd(0x12 | (1 << 48), addr);
            cmd(0x46, 0);
            let want: Vec<(u64, u64, u64, Prot)> = {
                let inner = smmu.inner.lock();
                let view = inner.smmu.stream_view(&smmu.mem, 8, MAX_EXTENTS).unwrap();
                let (_, leaves) = leaves_of(&view, RAM);
                range::coalesce(&leaves)
                    .into_iter()
                    .map(|(i, (g, s, p))| (i, g, s, p))
                    .collect()
            };
            let got = smmu.shadow(8);
            let first = got.iter().zip(&want).position(|(a, b)| a != b);
            assert!(
                got == want,
                "step {step}: {} runs, want {}; first difference at {first:?}: {:?} vs {:?}",
                got.len(),
                want.len(),
                first.map(|i| got[i]),
                first.map(|i| want[i])
            );
            let mut held: Vec<(u64, u64, Prot)> = dev
                .table
                .mappings()
                .iter()
                .map(|m| (m.range.start(), m.range.len(), m.prot))
                .collect();
            held.sort_unstable_by_key(|h| h.0);
            let want: Vec<(u64, u64, Prot)> = want.iter().map(|r| (r.0, r.2, r.3)).collect();
            assert!(held == want, "the device's table at step {step}");
        }
        let s = smmu.stats();
        assert_eq!(s.full, full, "never fell back to a whole re-sync");
        assert_eq!(s.ranged, 300);
    }

    #[test]
    fn viommu_option() {
        assert_eq!("smmuv3".parse::<Viommu>(), Ok(Viommu::Smmuv3));
        assert_eq!("smmuv3,mode=shadow".parse::<Viommu>(), Ok(Viommu::Smmuv3));
        assert_eq!(
            "smmuv3,mode=nested".parse::<Viommu>(),
            Ok(Viommu::Smmuv3Nested)
        );
        assert!("smmuv3,mode=both"
            .parse::<Viommu>()
            .unwrap_err()
            .contains("mode=shadow or mode=nested"));
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
