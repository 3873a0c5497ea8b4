//! One partitionable endpoint (a PHB's DMA address space): its windows, the guest's
//! TCE hypercalls and DDW RTAS calls, the host's VFIO-SPAPR-style API, and the device's
//! translation.
//!
//! # Windows and LIOBNs
//!
//! A PE has at most [`PeConfig::max_windows`] (2, as VFIO SPAPR and QEMU have it)
//! windows, in slots whose LIOBNs are `liobn_base + slot`. At start (and after a reset)
//! slot 0 holds the default 32-bit window (`dma32_start`, `dma32_size`, 4 KiB pages).
//! A dynamic window goes into the first free slot: at `dma32_start` if no window is
//! active (the default was removed first), else at the 64-bit address: PAPR's
//! 1 << 59 by default, or 4 GiB — when the configuration asks for it
//! ([`Ddw64Placement::At`]), or, with [`Ddw64Placement::Auto`], when the device's DMA
//! mask cannot reach `1 << 59 + size`. A window the device's DMA mask cannot reach is
//! refused ([`TceError::DmaMask`]): the device could never use it.
//!
//! # Guest calls (QEMU's semantics, replayed against its traces)
//!
//! - `H_PUT_TCE(liobn, ioba, tce)`: `ioba` is rounded down to the window's page; an
//!   unknown LIOBN (or one above 32 bits) or an `ioba` outside the window is
//!   `H_PARAMETER`. The value is stored as given.
//! - `H_GET_TCE(liobn, ioba)`: same checks, returns the stored value.
//! - `H_PUT_TCE_INDIRECT(liobn, ioba, list, n)`: `n` 1..=512 TCEs read (big-endian)
//!   from the 4 KiB-aligned guest page `list`; entries are written in order and the
//!   call stops at the first one outside the window (`H_PARAMETER`, the earlier ones
//!   stay). `n == 0` is `H_PARAMETER`, as QEMU answers. A list outside guest RAM is
//!   `H_PARAMETER` before anything is written (QEMU would read all-ones).
//! - `H_STUFF_TCE(liobn, ioba, tce, n)`: `n` consecutive entries; `n` above the
//!   window's entries, or 0, is `H_PARAMETER`; running off the end writes what fits
//!   then answers `H_PARAMETER`.
//! - `ibm,query-pe-dma-window`, `ibm,create-pe-dma-window`,
//!   `ibm,remove-pe-dma-window`, `ibm,reset-pe-dma-window`: see [`super::rtas`].
//!
//! Every successful write is reported as a [`TceUpdate`] so the owner can turn it into
//! DMA_MAP / DMA_UNMAP of the assigned device.

use std::collections::BTreeMap;

use super::entry::{Tce, TceAccess};
use super::geometry::{PageShift, TableGeometry, MAX_LEVELS, PAGE_SHIFTS};
use super::table::{TceTable, DEFAULT_MAX_LEAVES};
use super::TceError;

/// PAPR's bus address of the 64-bit dynamic window.
pub const DDW_DEFAULT_START: u64 = 1 << 59;
/// The alternative 64-bit window address for devices with a narrow DMA mask.
pub const DDW_4G_START: u64 = 1 << 32;
/// Most TCEs in one `H_PUT_TCE_INDIRECT` (one 4 KiB page of them).
pub const MAX_INDIRECT: u64 = 512;
/// Alignment of an `H_PUT_TCE_INDIRECT` list.
pub const INDIRECT_LIST_ALIGN: u64 = 4096;

/// Where dynamic 64-bit windows go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ddw64Placement {
    /// 1 << 59, or 4 GiB when the device's DMA mask cannot reach 1 << 59.
    Auto,
    /// Always here (QEMU's `dma64_win_addr`).
    At(u64),
}

/// A PE's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeConfig {
    /// LIOBN of slot 0 (QEMU's first PHB: 0x8000_0000).
    pub liobn_base: u32,
    /// The PHB's BUID (QEMU's first PHB: 0x800_0000_2000_0000).
    pub buid: u64,
    /// Default window start.
    pub dma32_start: u64,
    /// Default window size (QEMU: 1 GiB).
    pub dma32_size: u64,
    /// Page sizes offered for dynamic windows, as a bitmap of `1 << shift`.
    pub page_sizes: u64,
    /// Where 64-bit dynamic windows go.
    pub ddw64: Ddw64Placement,
    /// Windows in total (default included): 2.
    pub max_windows: u32,
    /// The device's DMA mask width in bits (64: reaches everything).
    pub dma_mask_bits: u32,
    /// Host page shift: every table level is at least this big.
    pub host_page_shift: u32,
    /// Last-level tables per window (memory bound against hostile guests).
    pub max_leaves: u64,
    /// Whether the platform lets a window be put in bypass (IOVA = GPA).
    pub allow_bypass: bool,
}

impl Default for PeConfig {
    fn default() -> Self {
        PeConfig {
            liobn_base: 0x8000_0000,
            buid: 0x0800_0000_2000_0000,
            dma32_start: 0,
            dma32_size: 1 << 30,
            page_sizes: PageShift::K4.bit()
                | PageShift::K64.bit()
                | PageShift::M2.bit()
                | PageShift::M16.bit()
                | PageShift::M256.bit()
                | PageShift::G1.bit(),
            ddw64: Ddw64Placement::Auto,
            max_windows: 2,
            dma_mask_bits: 64,
            host_page_shift: 12,
            max_leaves: DEFAULT_MAX_LEAVES,
            allow_bypass: false,
        }
    }
}

/// One active window.
#[derive(Debug)]
pub struct Window {
    liobn: u32,
    start: u64,
    table: TceTable,
    default: bool,
    bypass: bool,
}

impl Window {
    /// Its LIOBN.
    pub fn liobn(&self) -> u32 {
        self.liobn
    }
    /// Bus address of its first byte.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.table.geometry().window_size()
    }
    /// Its page size.
    pub fn page_shift(&self) -> PageShift {
        self.table.geometry().page_shift()
    }
    /// Its table.
    pub fn table(&self) -> &TceTable {
        &self.table
    }
    /// Whether it is the default 32-bit window.
    pub fn is_default(&self) -> bool {
        self.default
    }
    /// Whether `iova` is inside.
    pub fn contains(&self, iova: u64) -> bool {
        iova.wrapping_sub(self.start) < self.size()
    }
    fn index_of(&self, ioba: u64) -> Result<u64, TceError> {
        let ps = self.page_shift();
        let index = (ioba & ps.mask()).wrapping_sub(self.start) >> ps.get();
        if index >= self.table.geometry().entries() {
            return Err(TceError::OutsideWindow {
                liobn: self.liobn,
                ioba,
                start: self.start,
                size: self.size(),
            });
        }
        Ok(index)
    }
}

/// One TCE write that changed what the device may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TceUpdate {
    /// The window's LIOBN.
    pub liobn: u32,
    /// Bus address of the page.
    pub iova: u64,
    /// Page size.
    pub page_shift: PageShift,
    /// The entry before.
    pub old: Tce,
    /// The entry now.
    pub new: Tce,
}

/// A device access translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address of the access.
    pub gpa: u64,
    /// Bytes from there to the end of the IOMMU page.
    pub len: u64,
    /// What the entry permits.
    pub access: TceAccess,
    /// The window's LIOBN (`None` in bypass).
    pub liobn: Option<u32>,
}

/// The answer to `ibm,query-pe-dma-window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DdwQuery {
    /// Windows that can still be created.
    pub available: u32,
    /// Largest block of TCEs (QEMU: 0x8000_0000 in the 5-output form,
    /// 0x20_0000_0000 in the 6-output form).
    pub largest_block: u64,
    /// Page sizes in the LoPAPR query encoding ([`lopapr_page_mask`]).
    pub page_mask: u32,
}

/// A created window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreatedWindow {
    /// Its LIOBN.
    pub liobn: u32,
    /// Its bus address.
    pub start: u64,
}

/// VFIO_IOMMU_SPAPR_TCE_GET_INFO's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TceInfo {
    /// Default window start.
    pub dma32_window_start: u64,
    /// Default window size.
    pub dma32_window_size: u64,
    /// Dynamic windows: page sizes bitmap (`1 << shift`).
    pub ddw_pgsizes: u64,
    /// Dynamic windows: most windows at once.
    pub ddw_max_dynamic_windows_supported: u32,
    /// Dynamic windows: most table levels.
    pub ddw_levels: u32,
}

/// VFIO_IOMMU_SPAPR_TCE_CREATE's argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateWindow {
    /// IOMMU page shift.
    pub page_shift: u32,
    /// Window size in bytes (a power of two).
    pub window_size: u64,
    /// Table levels (1..=5).
    pub levels: u32,
}

/// The LoPAPR encoding of page sizes in `ibm,query-pe-dma-window`'s output: 4K 0x1,
/// 64K 0x2, 16M 0x4, 32M 0x8, 64M 0x10, 128M 0x20, 256M 0x40, 16G 0x80, 2M 0x100.
pub fn lopapr_page_mask(page_sizes: u64) -> u32 {
    const BITS: [(u32, u32); 9] = [
        (12, 0x1),
        (16, 0x2),
        (24, 0x4),
        (25, 0x8),
        (26, 0x10),
        (27, 0x20),
        (28, 0x40),
        (34, 0x80),
        (21, 0x100),
    ];
    BITS.iter()
        .filter(|(s, _)| page_sizes & (1u64 << s) != 0)
        .fold(0, |m, (_, b)| m | b)
}

/// A registered (preregistered, VFIO SPAPR v2) guest memory range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registered {
    size: u64,
}

/// One PE. See the module documentation.
#[derive(Debug)]
pub struct Pe {
    cfg: PeConfig,
    slots: Vec<Option<Window>>,
    registered: BTreeMap<u64, Registered>,
}

impl Pe {
    /// A PE with its default window.
    pub fn new(cfg: PeConfig) -> Result<Pe, TceError> {
        if cfg.max_windows == 0 || cfg.max_windows > 16 {
            return Err(TceError::Config(format!(
                "max_windows {} must be 1..=16",
                cfg.max_windows
            )));
        }
        if !(12..=64).contains(&cfg.dma_mask_bits) {
            return Err(TceError::Config(format!(
                "dma_mask_bits {} must be 12..=64",
                cfg.dma_mask_bits
            )));
        }
        if cfg.page_sizes & !PAGE_SHIFTS.iter().fold(0, |m, s| m | 1u64 << s) != 0 {
            return Err(TceError::Config(format!(
                "page sizes {:#x} include sizes other than 4K/64K/2M/16M/256M/1G",
                cfg.page_sizes
            )));
        }
        let mut pe = Pe {
            slots: (0..cfg.max_windows).map(|_| None).collect(),
            cfg,
            registered: BTreeMap::new(),
        };
        pe.reset_windows()?;
        Ok(pe)
    }

    /// The configuration.
    pub fn config(&self) -> &PeConfig {
        &self.cfg
    }

    /// The active windows, by slot.
    pub fn windows(&self) -> impl Iterator<Item = &Window> {
        self.slots.iter().flatten()
    }

    /// The active window with `liobn`.
    pub fn window(&self, liobn: u64) -> Option<&Window> {
        self.windows().find(|w| u64::from(w.liobn) == liobn)
    }

    fn window_mut(&mut self, liobn: u64) -> Result<&mut Window, TceError> {
        self.slots
            .iter_mut()
            .flatten()
            .find(|w| u64::from(w.liobn) == liobn)
            .ok_or(TceError::NoSuchLiobn(liobn))
    }

    fn active(&self) -> u32 {
        self.windows().count() as u32
    }

    /// The default window only, every TCE cleared (`ibm,reset-pe-dma-window`, and the
    /// state at creation). Returns the TCEs that were set, as updates to clear.
    fn reset_windows(&mut self) -> Result<Vec<TceUpdate>, TceError> {
        let mut gone = Vec::new();
        for w in self.slots.iter_mut().filter_map(Option::take) {
            gone.extend(cleared(&w));
        }
        let g = self.geometry(PageShift::K4, self.cfg.dma32_size, None)?;
        self.slots[0] = Some(Window {
            liobn: self.cfg.liobn_base,
            start: self.cfg.dma32_start,
            table: TceTable::with_budget(g, self.cfg.max_leaves),
            default: true,
            bypass: false,
        });
        Ok(gone)
    }

    fn geometry(
        &self,
        page_shift: PageShift,
        size: u64,
        levels: Option<u32>,
    ) -> Result<TableGeometry, TceError> {
        let host = self.cfg.host_page_shift;
        match levels {
            Some(l) => TableGeometry::new(page_shift, size, l, host),
            None => {
                // The fewest levels whose tables are at most 1 MiB each, else any valid.
                let mut first = None;
                for l in 1..=MAX_LEVELS {
                    match TableGeometry::new(page_shift, size, l, host) {
                        Ok(g) if g.level_shift() <= 20 => return Ok(g),
                        Ok(g) => first = first.or(Some(g)),
                        Err(
                            e @ (TceError::WindowSize(_) | TceError::WindowSmallerThanPage { .. }),
                        ) => return Err(e),
                        Err(_) => {}
                    }
                }
                first.ok_or(TceError::TooDeep {
                    levels: MAX_LEVELS,
                    level_shift: host,
                    page_shift: page_shift.get(),
                })
            }
        }
    }

    // ----- guest: hypercalls --------------------------------------------------------

    /// `H_PUT_TCE`.
    pub fn put_tce(&mut self, liobn: u64, ioba: u64, tce: u64) -> Result<TceUpdate, TceError> {
        let w = self.window_mut(liobn)?;
        let index = w.index_of(ioba)?;
        let old = w.table.set(index, Tce(tce))?;
        Ok(update(w, index, old, Tce(tce)))
    }

    /// `H_GET_TCE`.
    pub fn get_tce(&self, liobn: u64, ioba: u64) -> Result<Tce, TceError> {
        let w = self.window(liobn).ok_or(TceError::NoSuchLiobn(liobn))?;
        w.table.get(w.index_of(ioba)?)
    }

    /// `H_PUT_TCE_INDIRECT` with the list already read: writes `tces` from `ioba` on.
    /// The updates made before a failure are returned with it (they stay).
    pub fn put_tce_indirect(
        &mut self,
        liobn: u64,
        ioba: u64,
        list_gpa: u64,
        tces: &[u64],
    ) -> (Vec<TceUpdate>, Result<(), TceError>) {
        let w = match self.window_mut(liobn) {
            Ok(w) => w,
            Err(e) => return (Vec::new(), Err(e)),
        };
        if tces.is_empty() || tces.len() as u64 > MAX_INDIRECT {
            return (Vec::new(), Err(TceError::IndirectCount(tces.len() as u64)));
        }
        if !list_gpa.is_multiple_of(INDIRECT_LIST_ALIGN) {
            return (Vec::new(), Err(TceError::IndirectAlign(list_gpa)));
        }
        let ps = w.page_shift();
        let mut out = Vec::with_capacity(tces.len());
        let mut at = ioba & ps.mask();
        for &t in tces {
            let r = w
                .index_of(at)
                .and_then(|i| Ok((i, w.table.set(i, Tce(t))?)));
            match r {
                Ok((i, old)) => out.push(update(w, i, old, Tce(t))),
                Err(e) => return (out, Err(e)),
            }
            at = at.wrapping_add(ps.size());
        }
        (out, Ok(()))
    }

    /// `H_STUFF_TCE`. Clearing skips table parts never written, so clearing a huge
    /// window costs what was mapped in it.
    pub fn stuff_tce(
        &mut self,
        liobn: u64,
        ioba: u64,
        tce: u64,
        count: u64,
    ) -> (Vec<TceUpdate>, Result<(), TceError>) {
        let w = match self.window_mut(liobn) {
            Ok(w) => w,
            Err(e) => return (Vec::new(), Err(e)),
        };
        let entries = w.table.geometry().entries();
        if count == 0 || count > entries {
            return (Vec::new(), Err(TceError::StuffCount { count, entries }));
        }
        let first = match w.index_of(ioba) {
            Ok(i) => i,
            Err(e) => return (Vec::new(), Err(e)),
        };
        let fit = count.min(entries - first);
        let mut out = Vec::new();
        if tce == 0 {
            let mut hits = Vec::new();
            w.table
                .for_each_populated_in(first, fit, |i, _| hits.push(i));
            for i in hits {
                match w.table.set(i, Tce::CLEAR) {
                    Ok(old) => out.push(update(w, i, old, Tce::CLEAR)),
                    Err(e) => return (out, Err(e)),
                }
            }
        } else {
            for i in first..first + fit {
                match w.table.set(i, Tce(tce)) {
                    Ok(old) => out.push(update(w, i, old, Tce(tce))),
                    Err(e) => return (out, Err(e)),
                }
            }
        }
        if fit < count {
            let ioba_end = w.start.wrapping_add(entries << w.page_shift().get());
            return (
                out,
                Err(TceError::OutsideWindow {
                    liobn: w.liobn,
                    ioba: ioba_end,
                    start: w.start,
                    size: w.size(),
                }),
            );
        }
        (out, Ok(()))
    }

    // ----- guest: RTAS (dynamic DMA windows) -----------------------------------------

    fn check_buid(&self, buid: u64) -> Result<(), TceError> {
        if buid != self.cfg.buid {
            return Err(TceError::NoSuchBuid(buid));
        }
        Ok(())
    }

    /// `ibm,query-pe-dma-window`.
    pub fn ddw_query(&self, buid: u64, wide: bool) -> Result<DdwQuery, TceError> {
        self.check_buid(buid)?;
        Ok(DdwQuery {
            available: self.cfg.max_windows - self.active(),
            largest_block: if wide { 1 << 37 } else { 0x8000_0000 },
            page_mask: lopapr_page_mask(self.cfg.page_sizes),
        })
    }

    /// Where the next window of `size` bytes goes (see the module documentation).
    fn next_start(&self, size: u64) -> Result<u64, TceError> {
        if self.active() == 0 {
            return Ok(self.cfg.dma32_start);
        }
        let reach = |start: u64| {
            self.cfg.dma_mask_bits >= 64
                || start
                    .checked_add(size)
                    .is_some_and(|end| end <= 1u64 << self.cfg.dma_mask_bits)
        };
        let start = match self.cfg.ddw64 {
            Ddw64Placement::At(a) => a,
            Ddw64Placement::Auto if reach(DDW_DEFAULT_START) => DDW_DEFAULT_START,
            Ddw64Placement::Auto => DDW_4G_START,
        };
        if !reach(start) {
            return Err(TceError::DmaMask {
                start,
                size,
                bits: self.cfg.dma_mask_bits,
            });
        }
        Ok(start)
    }

    fn create(
        &mut self,
        page_shift: u32,
        window_size: u64,
        levels: Option<u32>,
    ) -> Result<CreatedWindow, TceError> {
        let ps = PageShift::new(page_shift)
            .ok()
            .filter(|p| self.cfg.page_sizes & p.bit() != 0)
            .ok_or(TceError::PageShift(page_shift))?;
        let g = self.geometry(ps, window_size, levels)?;
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(TceError::NoFreeWindow(self.cfg.max_windows))?;
        let start = self.next_start(window_size)?;
        let end = start.checked_add(window_size).ok_or(TceError::Overlap {
            start,
            size: window_size,
        })?;
        if self
            .windows()
            .any(|w| start < w.start.saturating_add(w.size()) && w.start < end)
        {
            return Err(TceError::Overlap {
                start,
                size: window_size,
            });
        }
        let liobn = self.cfg.liobn_base.wrapping_add(slot as u32);
        self.slots[slot] = Some(Window {
            liobn,
            start,
            table: TceTable::with_budget(g, self.cfg.max_leaves),
            default: false,
            bypass: false,
        });
        tracing::debug!(
            liobn,
            start,
            window_size,
            page_shift,
            levels = g.levels(),
            "TCE window created"
        );
        Ok(CreatedWindow { liobn, start })
    }

    /// `ibm,create-pe-dma-window`: a window of `2^window_shift` bytes in pages of
    /// `2^page_shift`.
    pub fn ddw_create(
        &mut self,
        buid: u64,
        page_shift: u32,
        window_shift: u32,
    ) -> Result<CreatedWindow, TceError> {
        self.check_buid(buid)?;
        if window_shift < page_shift || window_shift >= 64 {
            return Err(TceError::WindowShift {
                window_shift,
                page_shift,
            });
        }
        self.create(page_shift, 1u64 << window_shift, None)
    }

    /// `ibm,remove-pe-dma-window`. Removing the last window restores the default one
    /// unless the default is what was removed (LoPAPR). Returns the TCEs taken away
    /// and whether the default window was restored.
    pub fn ddw_remove(&mut self, liobn: u64) -> Result<(Vec<TceUpdate>, bool), TceError> {
        let slot = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|w| u64::from(w.liobn) == liobn))
            .ok_or(TceError::NoSuchLiobn(liobn))?;
        let w = self.slots[slot].take().ok_or(TceError::Internal)?;
        let mut gone = cleared(&w);
        let restored = self.active() == 0 && !w.default;
        if restored {
            gone.extend(self.reset_windows()?);
        }
        tracing::debug!(liobn, restored, "TCE window removed");
        Ok((gone, restored))
    }

    /// `ibm,reset-pe-dma-window`: back to the default window alone, empty.
    pub fn ddw_reset(&mut self, buid: u64) -> Result<Vec<TceUpdate>, TceError> {
        self.check_buid(buid)?;
        self.reset_windows()
    }

    /// Put window `liobn` in bypass (device addresses are guest-physical) or back.
    pub fn set_bypass(&mut self, liobn: u64, bypass: bool) -> Result<(), TceError> {
        if bypass && !self.cfg.allow_bypass {
            return Err(TceError::BypassNotAllowed);
        }
        self.window_mut(liobn)?.bypass = bypass;
        Ok(())
    }

    // ----- host: VFIO SPAPR TCE v2 semantics -----------------------------------------

    /// VFIO_IOMMU_SPAPR_TCE_GET_INFO.
    pub fn info(&self) -> TceInfo {
        TceInfo {
            dma32_window_start: self.cfg.dma32_start,
            dma32_window_size: self.cfg.dma32_size,
            ddw_pgsizes: self.cfg.page_sizes,
            ddw_max_dynamic_windows_supported: self.cfg.max_windows,
            ddw_levels: MAX_LEVELS,
        }
    }

    /// VFIO_IOMMU_SPAPR_TCE_CREATE: returns the window's start address.
    pub fn create_window(&mut self, req: CreateWindow) -> Result<u64, TceError> {
        Ok(self
            .create(req.page_shift, req.window_size, Some(req.levels))?
            .start)
    }

    /// VFIO_IOMMU_SPAPR_TCE_REMOVE: the window starting at `start_addr`.
    pub fn remove_window(&mut self, start_addr: u64) -> Result<Vec<TceUpdate>, TceError> {
        let slot = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|w| w.start == start_addr))
            .ok_or(TceError::NoWindowAt(start_addr))?;
        let w = self.slots[slot].take().ok_or(TceError::Internal)?;
        Ok(cleared(&w))
    }

    /// VFIO_IOMMU_SPAPR_REGISTER_MEMORY: guest memory `gpa..gpa + size` may be mapped.
    pub fn register_memory(&mut self, gpa: u64, size: u64) -> Result<(), TceError> {
        let end = page_range(gpa, size)?;
        if self
            .registered
            .iter()
            .any(|(&s, r)| gpa < s + r.size && s < end)
        {
            return Err(TceError::RegisteredOverlap { gpa, size });
        }
        self.registered.insert(gpa, Registered { size });
        Ok(())
    }

    /// VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY: exactly a registered range, not in use by
    /// any TCE.
    pub fn unregister_memory(&mut self, gpa: u64, size: u64) -> Result<(), TceError> {
        if self.registered.get(&gpa) != Some(&Registered { size }) {
            return Err(TceError::NotRegistered { gpa, size });
        }
        let end = gpa + size;
        let mut busy = false;
        for w in self.windows() {
            let mask = w.page_shift().mask();
            w.table.for_each_populated(|_, t| {
                let p = t.page_addr(mask);
                busy |= p < end && gpa < p + w.page_shift().size();
            });
        }
        if busy {
            return Err(TceError::RegisteredBusy { gpa, size });
        }
        self.registered.remove(&gpa);
        Ok(())
    }

    fn is_registered(&self, gpa: u64, size: u64) -> bool {
        self.registered
            .range(..=gpa)
            .next_back()
            .is_some_and(|(&s, r)| gpa.checked_add(size).is_some_and(|e| e <= s + r.size))
    }

    /// VFIO_IOMMU_MAP_DMA (SPAPR v2): map registered guest memory at `iova`, page by
    /// page of the window containing it. Nothing is written when any check fails.
    pub fn map(
        &mut self,
        iova: u64,
        gpa: u64,
        size: u64,
        access: TceAccess,
    ) -> Result<Vec<TceUpdate>, TceError> {
        if access == TceAccess::None {
            return Err(TceError::NoAccess);
        }
        if !self.is_registered(gpa, size) {
            return Err(TceError::NotRegistered { gpa, size });
        }
        let (slot, first, n) = self.host_range(iova, size)?;
        let w = self.slots[slot].as_mut().ok_or(TceError::Internal)?;
        if gpa & !w.page_shift().mask() != 0 {
            return Err(TceError::Unaligned { iova, size });
        }
        let ps = w.page_shift();
        let mut out = Vec::with_capacity(n as usize);
        for k in 0..n {
            let t = Tce::new(gpa + (k << ps.get()), access);
            let old = w.table.set(first + k, t)?;
            out.push(update(w, first + k, old, t));
        }
        Ok(out)
    }

    /// VFIO_IOMMU_UNMAP_DMA (SPAPR v2).
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<Vec<TceUpdate>, TceError> {
        let (slot, first, n) = self.host_range(iova, size)?;
        let w = self.slots[slot].as_mut().ok_or(TceError::Internal)?;
        let mut hits = Vec::new();
        w.table.for_each_populated_in(first, n, |i, _| hits.push(i));
        let mut out = Vec::with_capacity(hits.len());
        for i in hits {
            let old = w.table.set(i, Tce::CLEAR)?;
            out.push(update(w, i, old, Tce::CLEAR));
        }
        Ok(out)
    }

    /// The slot, first index and page count of a host range inside one window.
    fn host_range(&self, iova: u64, size: u64) -> Result<(usize, u64, u64), TceError> {
        let (slot, w) = self
            .slots
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.as_ref().filter(|w| w.contains(iova)).map(|w| (i, w)))
            .ok_or(TceError::NoWindowFor(iova))?;
        let ps = w.page_shift();
        let last = size
            .checked_sub(1)
            .and_then(|s| iova.checked_add(s))
            .ok_or(TceError::Unaligned { iova, size })?;
        if iova & !ps.mask() != 0 || size & !ps.mask() != 0 || !w.contains(last) {
            return Err(TceError::Unaligned { iova, size });
        }
        Ok((slot, (iova - w.start) >> ps.get(), size >> ps.get()))
    }

    // ----- device: translation -------------------------------------------------------

    /// Translate a device access at bus address `iova`. `None`: no window covers it.
    pub fn translate(&self, iova: u64) -> Option<Translation> {
        let w = self.windows().find(|w| w.contains(iova))?;
        if w.bypass {
            return Some(Translation {
                gpa: iova - w.start,
                len: w.size() - (iova - w.start),
                access: TceAccess::ReadWrite,
                liobn: None,
            });
        }
        let ps = w.page_shift();
        let index = (iova - w.start) >> ps.get();
        let tce = w.table.get(index).ok()?;
        let off = iova & !ps.mask();
        Some(Translation {
            gpa: tce.page_addr(ps.mask()) | off,
            len: ps.size() - off,
            access: tce.access(),
            liobn: Some(w.liobn),
        })
    }
}

fn update(w: &Window, index: u64, old: Tce, new: Tce) -> TceUpdate {
    TceUpdate {
        liobn: w.liobn,
        iova: w.start + (index << w.page_shift().get()),
        page_shift: w.page_shift(),
        old,
        new,
    }
}

/// Every populated TCE of a window going away, as updates to "cleared".
fn cleared(w: &Window) -> Vec<TceUpdate> {
    let mut out = Vec::new();
    w.table
        .for_each_populated(|i, t| out.push(update(w, i, t, Tce::CLEAR)));
    out
}

fn page_range(gpa: u64, size: u64) -> Result<u64, TceError> {
    let end = gpa.checked_add(size);
    match end {
        Some(e) if size > 0 && gpa.is_multiple_of(4096) && size.is_multiple_of(4096) => Ok(e),
        _ => Err(TceError::Unaligned { iova: gpa, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L0: u64 = 0x8000_0000;
    const L1: u64 = 0x8000_0001;
    const BUID: u64 = 0x0800_0000_2000_0000;

    fn pe(cfg: PeConfig) -> Pe {
        Pe::new(cfg).unwrap()
    }

    #[test]
    fn default_window_put_get_translate() {
        let mut p = pe(PeConfig::default());
        let w = p.window(L0).unwrap();
        assert_eq!(
            (w.start(), w.size(), w.page_shift()),
            (0, 1 << 30, PageShift::K4)
        );
        // ioba is rounded down to the page; the value is stored as given.
        let u = p.put_tce(L0, 0x5123, 0x7654_3003).unwrap();
        assert_eq!(
            (u.iova, u.old, u.new),
            (0x5000, Tce::CLEAR, Tce(0x7654_3003))
        );
        assert_eq!(p.get_tce(L0, 0x5fff).unwrap(), Tce(0x7654_3003));
        let t = p.translate(0x5123).unwrap();
        assert_eq!(
            (t.gpa, t.len, t.access),
            (0x7654_3123, 0x1000 - 0x123, TceAccess::ReadWrite)
        );
        assert_eq!(p.translate(0x6000).unwrap().access, TceAccess::None);
        assert!(p.translate(1 << 30).is_none(), "past the window");
        // Unknown LIOBN, LIOBN above 32 bits, ioba past the window.
        assert_eq!(p.put_tce(L1, 0, 1), Err(TceError::NoSuchLiobn(L1)));
        assert!(p.put_tce(L0 | 1 << 32, 0, 1).is_err());
        assert!(matches!(
            p.put_tce(L0, 1 << 30, 1),
            Err(TceError::OutsideWindow { .. })
        ));
        assert!(p.get_tce(L0, u64::MAX).is_err());
    }

    #[test]
    fn indirect_and_stuff_stop_at_the_window_end_keeping_what_was_written() {
        let mut p = pe(PeConfig::default());
        let last = (1 << 30) - 0x1000;
        let (u, r) = p.put_tce_indirect(L0, last - 0x1000, 0x2000, &[0x1001, 0x2001, 0x3001]);
        assert!(matches!(r, Err(TceError::OutsideWindow { .. })));
        assert_eq!(u.len(), 2);
        assert_eq!(p.get_tce(L0, last).unwrap(), Tce(0x2001));
        assert!(matches!(
            p.put_tce_indirect(L0, 0, 0x2000, &[]).1,
            Err(TceError::IndirectCount(0))
        ));
        assert!(matches!(
            p.put_tce_indirect(L0, 0, 0x2008, &[1]).1,
            Err(TceError::IndirectAlign(0x2008))
        ));
        assert!(p.put_tce_indirect(L0, 0, 0x2000, &[1; 513]).1.is_err());
        // Stuff: clears what is set, runs off the end with H_PARAMETER.
        let (u, r) = p.stuff_tce(L0, last - 0x1000, 0, 4);
        assert!(r.is_err());
        assert_eq!(u.len(), 2, "two populated entries cleared");
        assert_eq!(p.window(L0).unwrap().table().populated(), 0);
        let (u, r) = p.stuff_tce(L0, 0x10_0000, 0x9003, 8);
        assert!(r.is_ok());
        assert_eq!(u.len(), 8);
        assert!(p.stuff_tce(L0, 0, 0, 0).1.is_err());
        assert!(p.stuff_tce(L0, 0, 0, (1 << 18) + 1).1.is_err());
    }

    #[test]
    fn ddw_at_1_shl_59_then_limits_remove_and_reset() {
        let mut p = pe(PeConfig::default());
        assert_eq!(p.ddw_query(BUID, false).unwrap().available, 1);
        assert!(p.ddw_query(BUID + 1, false).is_err());
        assert_eq!(
            p.ddw_create(BUID, 24, 31).unwrap(),
            CreatedWindow {
                liobn: L1 as u32,
                start: 1 << 59
            }
        );
        assert_eq!(p.ddw_query(BUID, true).unwrap().available, 0);
        assert_eq!(p.ddw_create(BUID, 16, 32), Err(TceError::NoFreeWindow(2)));
        assert_eq!(p.ddw_create(BUID, 13, 32), Err(TceError::PageShift(13)));
        p.put_tce(L1, (1 << 59) + (5 << 24) + 77, 0x4000_0003)
            .unwrap();
        assert_eq!(
            p.translate((1 << 59) + (5 << 24) + 77).unwrap().gpa,
            0x4000_0000 + 77
        );
        // Removing the DDW leaves the default; removing it again fails.
        let (gone, restored) = p.ddw_remove(L1).unwrap();
        assert_eq!((gone.len(), restored), (1, false));
        assert_eq!(gone[0].new, Tce::CLEAR);
        assert!(p.ddw_remove(L1).is_err());
        // Remove the default, create: the first window goes at the 32-bit start.
        p.put_tce(L0, 0, 0x1003).unwrap();
        let (gone, restored) = p.ddw_remove(L0).unwrap();
        assert_eq!((gone.len(), restored), (1, false));
        assert_eq!(p.ddw_query(BUID, false).unwrap().available, 2);
        assert_eq!(
            p.ddw_create(BUID, 16, 30).unwrap(),
            CreatedWindow {
                liobn: L0 as u32,
                start: 0
            }
        );
        let w = p.ddw_create(BUID, 21, 34).unwrap();
        assert_eq!(w.start, 1 << 59);
        // Removing the last non-default window restores the default one.
        p.ddw_remove(L0).unwrap();
        let (_, restored) = p.ddw_remove(u64::from(w.liobn)).unwrap();
        assert!(restored);
        assert!(p.window(L0).unwrap().is_default());
        // Reset: default only, empty.
        p.ddw_create(BUID, 16, 32).unwrap();
        p.put_tce(L1, 1 << 59, 0x2003).unwrap();
        assert_eq!(p.ddw_reset(BUID).unwrap().len(), 1);
        assert_eq!(p.windows().count(), 1);
    }

    #[test]
    fn narrow_dma_mask_gets_4g_or_a_clear_refusal() {
        // Automatic placement: a 40-bit device gets its window at 4 GiB.
        let mut p = pe(PeConfig {
            dma_mask_bits: 40,
            ..PeConfig::default()
        });
        assert_eq!(p.ddw_create(BUID, 16, 32).unwrap().start, 1 << 32);
        // Fixed at 1 << 59: refused, with a message that says what to do.
        let mut p = pe(PeConfig {
            dma_mask_bits: 40,
            ddw64: Ddw64Placement::At(DDW_DEFAULT_START),
            ..PeConfig::default()
        });
        let e = p.ddw_create(BUID, 16, 32).unwrap_err();
        assert_eq!(e.rtas_status(), super::super::abi::RTAS_HW_ERROR);
        let msg = e.to_string();
        assert!(
            msg.contains("40-bit DMA mask") && msg.contains("4 GiB"),
            "{msg}"
        );
        assert_eq!(p.windows().count(), 1, "nothing created");
        // A window too big for the mask even at 4 GiB.
        let mut p = pe(PeConfig {
            dma_mask_bits: 40,
            ..PeConfig::default()
        });
        assert!(matches!(
            p.ddw_create(BUID, 24, 40),
            Err(TceError::DmaMask { .. })
        ));
        // 4 GiB requested explicitly with a 64-bit device.
        let mut p = pe(PeConfig {
            ddw64: Ddw64Placement::At(DDW_4G_START),
            ..PeConfig::default()
        });
        assert_eq!(p.ddw_create(BUID, 24, 31).unwrap().start, 1 << 32);
    }

    #[test]
    fn host_api_has_vfio_spapr_semantics() {
        let mut p = pe(PeConfig::default());
        let info = p.info();
        assert_eq!(
            (
                info.dma32_window_size,
                info.ddw_max_dynamic_windows_supported,
                info.ddw_levels
            ),
            (1 << 30, 2, 5)
        );
        assert!(info.ddw_pgsizes & (1 << 24) != 0);
        let start = p
            .create_window(CreateWindow {
                page_shift: 16,
                window_size: 1 << 40,
                levels: 2,
            })
            .unwrap();
        assert_eq!(start, 1 << 59);
        assert_eq!(p.window(L1).unwrap().table().geometry().levels(), 2);
        // Map needs preregistered memory.
        assert!(matches!(
            p.map(start, 0x10_0000, 0x2_0000, TceAccess::ReadWrite),
            Err(TceError::NotRegistered { .. })
        ));
        p.register_memory(0, 64 << 20).unwrap();
        assert!(p.register_memory(0x1000, 0x1000).is_err(), "overlap");
        let u = p
            .map(start + 0x1_0000, 0x10_0000, 0x2_0000, TceAccess::Read)
            .unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(p.translate(start + 0x2_0004).unwrap().gpa, 0x11_0004);
        assert_eq!(
            p.translate(start + 0x2_0004).unwrap().access,
            TceAccess::Read
        );
        assert!(
            p.map(start + 0x1000, 0, 0x1_0000, TceAccess::Read).is_err(),
            "unaligned"
        );
        assert!(p.map(start, 0, 0x1_0000, TceAccess::None).is_err());
        assert!(matches!(
            p.unregister_memory(0, 64 << 20),
            Err(TceError::RegisteredBusy { .. })
        ));
        assert_eq!(p.unmap(start, 0x10_0000).unwrap().len(), 2);
        p.unregister_memory(0, 64 << 20).unwrap();
        assert!(p.unregister_memory(0, 64 << 20).is_err());
        assert_eq!(p.remove_window(start).unwrap().len(), 0);
        assert!(p.remove_window(start).is_err());
    }

    #[test]
    fn bypass_only_where_allowed() {
        let mut p = pe(PeConfig::default());
        assert_eq!(p.set_bypass(L0, true), Err(TceError::BypassNotAllowed));
        let mut p = pe(PeConfig {
            allow_bypass: true,
            ..PeConfig::default()
        });
        p.set_bypass(L0, true).unwrap();
        let t = p.translate(0x1234).unwrap();
        assert_eq!((t.gpa, t.liobn), (0x1234, None));
    }
}
