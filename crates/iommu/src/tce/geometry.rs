//! TCE table arithmetic: how a window of `2^window_shift` bytes in pages of
//! `2^page_shift` bytes is laid out as a table of 1 to 5 levels.
//!
//! A window has `2^(window_shift - page_shift)` entries of 8 bytes. A one-level table is
//! that array. With `levels > 1` the entry index is split evenly: every level is a
//! table of `2^(level_shift - 3)` 8-byte entries (`level_shift` = log2 of one level's
//! bytes), at least one host page, the upper levels holding `next_table | R | W`
//! entries and the last level the TCEs; the top level may be partly used. Validation
//! follows VFIO SPAPR TCE v2 (`VFIO_IOMMU_SPAPR_TCE_CREATE`) and FACTS §7: the window is
//! a power of two at least one IOMMU page, `levels` is 1..=5, the page shift is one the
//! platform offers, and `(level_shift - 3) * levels + page_shift < 60` (the bus address
//! bits the indirect levels can cover).

use super::TceError;

/// Most levels of a TCE table.
pub const MAX_LEVELS: u32 = 5;
/// Bytes of a TCE.
pub const TCE_BYTES: u64 = 8;
/// log2 of [`TCE_BYTES`].
const TCE_SHIFT: u32 = 3;
/// Bound on `(level_shift - 3) * levels + page_shift`.
pub const MAX_COVERED_SHIFT: u32 = 60;

/// IOMMU page sizes (as shifts) the sPAPR platform can offer: 4K, 64K, 2M, 16M, 256M, 1G.
pub const PAGE_SHIFTS: [u32; 6] = [12, 16, 21, 24, 28, 30];

/// A checked IOMMU page shift (one of [`PAGE_SHIFTS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageShift(u32);

impl PageShift {
    /// 4 KiB pages.
    pub const K4: PageShift = PageShift(12);
    /// 64 KiB pages.
    pub const K64: PageShift = PageShift(16);
    /// 2 MiB pages.
    pub const M2: PageShift = PageShift(21);
    /// 16 MiB pages.
    pub const M16: PageShift = PageShift(24);
    /// 256 MiB pages.
    pub const M256: PageShift = PageShift(28);
    /// 1 GiB pages.
    pub const G1: PageShift = PageShift(30);

    /// `shift` if it is one of [`PAGE_SHIFTS`].
    pub fn new(shift: u32) -> Result<PageShift, TceError> {
        if PAGE_SHIFTS.contains(&shift) {
            Ok(PageShift(shift))
        } else {
            Err(TceError::PageShift(shift))
        }
    }

    /// The shift.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The page size in bytes.
    pub const fn size(self) -> u64 {
        1 << self.0
    }

    /// `!(size - 1)`.
    pub const fn mask(self) -> u64 {
        !(self.size() - 1)
    }

    /// The bit of this size in a page-size bitmap (`1 << shift`, VFIO's `pgsizes`).
    pub const fn bit(self) -> u64 {
        1 << self.0
    }
}

/// The layout of one window's table. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableGeometry {
    page_shift: PageShift,
    window_shift: u32,
    levels: u32,
    level_shift: u32,
}

impl TableGeometry {
    /// The layout of a window of `window_size` bytes in pages of `page_shift`, with
    /// `levels` levels, each level at least one host page of `2^host_page_shift` bytes.
    pub fn new(
        page_shift: PageShift,
        window_size: u64,
        levels: u32,
        host_page_shift: u32,
    ) -> Result<TableGeometry, TceError> {
        if window_size == 0 || !window_size.is_power_of_two() {
            return Err(TceError::WindowSize(window_size));
        }
        let window_shift = window_size.trailing_zeros();
        if window_shift < page_shift.get() {
            return Err(TceError::WindowSmallerThanPage {
                window_size,
                page_size: page_shift.size(),
            });
        }
        if levels == 0 || levels > MAX_LEVELS {
            return Err(TceError::Levels(levels));
        }
        if !(12..=24).contains(&host_page_shift) {
            return Err(TceError::HostPageShift(host_page_shift));
        }
        let entries_shift = window_shift - page_shift.get();
        let level_shift = (entries_shift.div_ceil(levels) + TCE_SHIFT).max(host_page_shift);
        let covered = (level_shift - TCE_SHIFT) * levels + page_shift.get();
        if covered >= MAX_COVERED_SHIFT {
            return Err(TceError::TooDeep {
                levels,
                level_shift,
                page_shift: page_shift.get(),
            });
        }
        Ok(TableGeometry {
            page_shift,
            window_shift,
            levels,
            level_shift,
        })
    }

    /// The IOMMU page shift.
    pub fn page_shift(&self) -> PageShift {
        self.page_shift
    }

    /// log2 of the window size.
    pub fn window_shift(&self) -> u32 {
        self.window_shift
    }

    /// The window size in bytes.
    pub fn window_size(&self) -> u64 {
        1 << self.window_shift
    }

    /// The number of levels.
    pub fn levels(&self) -> u32 {
        self.levels
    }

    /// log2 of the bytes of one level's table.
    pub fn level_shift(&self) -> u32 {
        self.level_shift
    }

    /// Index bits resolved by each non-top level.
    pub fn bits_per_level(&self) -> u32 {
        self.level_shift - TCE_SHIFT
    }

    /// Entries (TCEs) of the window.
    pub fn entries(&self) -> u64 {
        1 << (self.window_shift - self.page_shift.get())
    }

    /// Entries of one table at `level` (0 = top). The top level holds only what the
    /// window needs; the others are full.
    pub fn entries_at(&self, level: u32) -> u64 {
        let per = 1u64 << self.bits_per_level();
        if level == 0 {
            let below = self.bits_per_level() * (self.levels - 1);
            let total_bits = self.window_shift - self.page_shift.get();
            1u64 << total_bits.saturating_sub(below).min(self.bits_per_level())
        } else {
            per
        }
    }

    /// The per-level indices of entry `index` (top level first); `None` past the window.
    pub fn indices(&self, index: u64) -> Option<[u64; MAX_LEVELS as usize]> {
        if index >= self.entries() {
            return None;
        }
        let mut out = [0u64; MAX_LEVELS as usize];
        let bits = self.bits_per_level();
        let mask = (1u64 << bits) - 1;
        for l in 0..self.levels {
            let shift = bits * (self.levels - 1 - l);
            out[l as usize] = (index >> shift) & mask;
        }
        Some(out)
    }

    /// Bytes of the whole table when every entry is populated (all levels; every table
    /// of every level is `2^level_shift` bytes).
    pub fn table_bytes(&self) -> u64 {
        let mut tables = 1u64;
        let mut total = 0u64;
        for l in 0..self.levels {
            total = total.saturating_add(tables.saturating_mul(1 << self.level_shift));
            tables = tables.saturating_mul(self.entries_at(l));
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference, from the PAPR / VFIO text read literally: "the table of a window
    /// has window_size / page_size entries of 8 bytes; with N levels the index is split
    /// into N equal parts, each level being at least one (host) page; a window is
    /// refused when it is not a power of two, when levels is 0 or more than 5, or when
    /// (level_shift - 3) * levels + page_shift >= 60". Written with divisions and
    /// loops instead of shifts, to be independent of the implementation.
    fn reference(page: u64, window: u64, levels: u32, host_page: u64) -> Option<(u64, u64)> {
        if window == 0 || window & (window - 1) != 0 || window < page || !(1..=5).contains(&levels)
        {
            return None;
        }
        let entries = window / page;
        // Smallest per-level size (a power of two, at least a host page) whose
        // `levels` levels of 8-byte entries index every TCE.
        let mut level_bytes = host_page;
        loop {
            let mut cover: u128 = 1;
            for _ in 0..levels {
                cover *= u128::from(level_bytes / 8);
            }
            if cover >= u128::from(entries) {
                break;
            }
            level_bytes *= 2;
        }
        let log2 = |mut v: u64| {
            let mut n = 0;
            while v > 1 {
                v /= 2;
                n += 1;
            }
            n
        };
        if (log2(level_bytes) - 3) * u64::from(levels) + log2(page) >= 60 {
            return None;
        }
        Some((entries, level_bytes))
    }

    proptest! {
        #[test]
        fn geometry_matches_the_reference(
            p in 0usize..6, w in 0u32..64, odd in any::<bool>(), levels in 0u32..7, host in prop::sample::select(vec![12u32, 16])
        ) {
            let page = PageShift::new(PAGE_SHIFTS[p]).unwrap();
            let window = if odd && w > 1 { (1u64 << w) + 1 } else { 1u64 << w };
            let got = TableGeometry::new(page, window, levels, host);
            let want = reference(page.size(), window, levels, 1 << host);
            match (got, want) {
                (Ok(g), Some((entries, level_bytes))) => {
                    prop_assert_eq!(g.entries(), entries);
                    // One level: the table is the array itself (at least a host page).
                    prop_assert_eq!(1u64 << g.level_shift(), level_bytes);
                    // Indices round-trip for the first, last and a middle entry.
                    for i in [0, entries / 3, entries - 1] {
                        let idx = g.indices(i).unwrap();
                        let mut back = 0u64;
                        for l in 0..g.levels() {
                            prop_assert!(idx[l as usize] < g.entries_at(l));
                            back = (back << g.bits_per_level()) | idx[l as usize];
                        }
                        prop_assert_eq!(back, i);
                    }
                    prop_assert!(g.indices(entries).is_none());
                }
                (Err(_), None) => {}
                (g, r) => prop_assert!(false, "implementation {:?} vs reference {:?}", g, r),
            }
        }
    }

    #[test]
    fn known_layouts() {
        // QEMU's default 32-bit window: 1 GiB of 4 KiB pages, one level: 2 MiB of TCEs.
        let g = TableGeometry::new(PageShift::K4, 1 << 30, 1, 12).unwrap();
        assert_eq!((g.entries(), g.level_shift()), (1 << 18, 21));
        assert_eq!(g.table_bytes(), 2 << 20);
        // Linux's DDW under QEMU: 2 GiB of 16 MiB pages: 128 entries in one host page.
        let g = TableGeometry::new(PageShift::M16, 2 << 30, 1, 12).unwrap();
        assert_eq!((g.entries(), g.level_shift()), (128, 12));
        // A 2^59 window of 4 KiB pages: 2^47 entries; one level (2^50 bytes) passes the
        // rule, two levels of 2^27 bytes cover 2*24 + 12 = 60 bits: refused.
        assert!(TableGeometry::new(PageShift::K4, 1 << 59, 1, 12).is_ok());
        assert!(matches!(
            TableGeometry::new(PageShift::K4, 1 << 59, 2, 12),
            Err(TceError::TooDeep { .. })
        ));
        // 1 TiB of 4 KiB pages in 2 levels: 2^28 entries, 14 index bits per level.
        let g = TableGeometry::new(PageShift::K4, 1 << 40, 2, 12).unwrap();
        assert_eq!((g.bits_per_level(), g.level_shift()), (14, 17));
        assert_eq!(g.entries_at(0), 1 << 14);
        assert_eq!(g.indices((1 << 14) + 5).unwrap()[..2], [1, 5]);
        assert_eq!(g.table_bytes(), (1 << 17) + (1 << 14) * (1 << 17));
        // A 64 GiB window of 64 KiB pages in 3 levels with 64 KiB host pages.
        let g = TableGeometry::new(PageShift::K64, 1 << 36, 3, 16).unwrap();
        assert_eq!((g.bits_per_level(), g.entries_at(0)), (13, 1));
        assert!(matches!(
            TableGeometry::new(PageShift::K4, 3 << 20, 1, 12),
            Err(TceError::WindowSize(_))
        ));
        assert!(matches!(
            TableGeometry::new(PageShift::K4, 1 << 20, 6, 12),
            Err(TceError::Levels(6))
        ));
        assert!(PageShift::new(13).is_err());
    }
}
