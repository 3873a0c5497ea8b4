//! The guest's physical memory map (BIOS e820 style), shared by both boot protocols.
//!
//! The map is computed, not read from anywhere: guest RAM is `[0, ram_size)` with the
//! part that would overlap the 32-bit PCI hole moved above 4 GiB. From low memory the
//! legacy PC ranges are cut out: `[EBDA_START, 0xa0000)` is reserved (it holds the MP
//! table), the VGA/option-ROM window `[0xa0000, 0xf0000)` is left as a gap and the BIOS
//! area `[0xf0000, 1 MiB)` is reserved. The PCI hole itself is left unlisted: Linux
//! places its PCI resource window in the largest gap below 4 GiB, which must be that
//! hole, and a "reserved" entry there would make the gap search fail.
//!
//! The same entries feed `boot_params.e820_table` (64-bit boot protocol) and the PVH
//! `hvm_memmap_table_entry` array, so the two protocols can never disagree.

use linux_loader::bootparam::boot_e820_entry;
use linux_loader::loader::elf::start_info::hvm_memmap_table_entry;

/// Start of the extended BIOS data area we reserve (the last KiB of base memory).
pub const EBDA_START: u64 = 0x9_fc00;
/// End of conventional memory (start of the VGA window).
pub const VGA_START: u64 = 0xa_0000;
/// Start of the system BIOS area.
pub const BIOS_START: u64 = 0xf_0000;
/// First byte above the legacy 1 MiB.
pub const HIGH_MEMORY: u64 = 0x10_0000;
/// 4 GiB.
pub const FOUR_GIB: u64 = 1 << 32;

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// Errors building the memory map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum E820Error {
    /// Too little RAM to hold the legacy layout and a kernel.
    #[error("guest RAM of {0:#x} bytes is too small for Linux: give it at least 32 MiB")]
    TooSmall(u64),
    /// The PCI hole start is not usable.
    #[error("PCI hole start {0:#x} must be 1 MiB aligned and between 16 MiB and 4 GiB")]
    BadHole(u64),
    /// RAM moved above 4 GiB overflows the address space.
    #[error("guest RAM of {0:#x} bytes does not fit in the 64-bit address space")]
    Overflow(u64),
    /// More entries than a zero page can hold.
    #[error("the memory map has {0} entries; the zero page holds at most 128")]
    TooManyEntries(usize),
}

/// One range of the memory map. Constructed only through [`E820Entry::new`], which
/// rejects empty and overflowing ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    addr: u64,
    size: u64,
    kind: u32,
}

impl E820Entry {
    /// A range `[addr, addr + size)` of type `kind`; `None` if empty or overflowing.
    pub fn new(addr: u64, size: u64, kind: u32) -> Option<Self> {
        if size == 0 {
            return None;
        }
        addr.checked_add(size - 1)?;
        Some(E820Entry { addr, size, kind })
    }

    /// First address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// e820 type ([`E820_RAM`], [`E820_RESERVED`]).
    pub fn kind(&self) -> u32 {
        self.kind
    }

    /// One past the last address (saturating at `u64::MAX` for a range ending there).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }

    /// Zero-page form.
    pub fn to_boot(self) -> boot_e820_entry {
        boot_e820_entry {
            addr: self.addr,
            size: self.size,
            r#type: self.kind,
        }
    }

    /// PVH form.
    pub fn to_hvm(self) -> hvm_memmap_table_entry {
        hvm_memmap_table_entry {
            addr: self.addr,
            size: self.size,
            type_: self.kind,
            reserved: 0,
        }
    }
}

/// Where guest RAM lives: `[0, low_end)` and, if RAM reaches into the PCI hole,
/// `[4 GiB, high_end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamLayout {
    /// End of RAM below the PCI hole.
    pub low_end: u64,
    /// RAM above 4 GiB as `(start, end)`, if any.
    pub high: Option<(u64, u64)>,
}

impl RamLayout {
    /// Split `ram_size` bytes of RAM around a PCI hole starting at `pci_hole_start`.
    pub fn new(ram_size: u64, pci_hole_start: u64) -> Result<Self, E820Error> {
        if pci_hole_start & (HIGH_MEMORY - 1) != 0
            || !(16 << 20..=FOUR_GIB).contains(&pci_hole_start)
        {
            return Err(E820Error::BadHole(pci_hole_start));
        }
        if ram_size < 32 << 20 {
            return Err(E820Error::TooSmall(ram_size));
        }
        if ram_size <= pci_hole_start {
            return Ok(RamLayout {
                low_end: ram_size,
                high: None,
            });
        }
        let above = ram_size - pci_hole_start;
        let end = FOUR_GIB
            .checked_add(above)
            .ok_or(E820Error::Overflow(ram_size))?;
        Ok(RamLayout {
            low_end: pci_hole_start,
            high: Some((FOUR_GIB, end)),
        })
    }
}

/// The memory map for `ram`, sorted by address, non-overlapping.
pub fn memory_map(ram: &RamLayout) -> Vec<E820Entry> {
    let mut v = Vec::with_capacity(5);
    // [0, EBDA) RAM, [EBDA, 0xa0000) reserved, [0xf0000, 1M) reserved, [1M, low_end) RAM.
    v.extend(E820Entry::new(0, EBDA_START, E820_RAM));
    v.extend(E820Entry::new(
        EBDA_START,
        VGA_START - EBDA_START,
        E820_RESERVED,
    ));
    v.extend(E820Entry::new(
        BIOS_START,
        HIGH_MEMORY - BIOS_START,
        E820_RESERVED,
    ));
    v.extend(E820Entry::new(
        HIGH_MEMORY,
        ram.low_end.saturating_sub(HIGH_MEMORY),
        E820_RAM,
    ));
    if let Some((start, end)) = ram.high {
        v.extend(E820Entry::new(start, end.saturating_sub(start), E820_RAM));
    }
    v
}

/// Whether `[addr, addr + len)` lies entirely inside one RAM entry of `map`.
pub fn is_ram(map: &[E820Entry], addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    map.iter()
        .any(|e| e.kind == E820_RAM && e.addr <= addr && end <= e.end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_rejects_empty_and_overflow() {
        assert!(E820Entry::new(0, 0, E820_RAM).is_none());
        assert!(E820Entry::new(u64::MAX, 2, E820_RAM).is_none());
        assert!(E820Entry::new(u64::MAX, 1, E820_RAM).is_some());
    }

    #[test]
    fn small_ram_map() {
        let ram = RamLayout::new(128 << 20, 0xc000_0000).unwrap();
        assert_eq!(ram.high, None);
        let m = memory_map(&ram);
        assert_eq!(m.len(), 4);
        assert_eq!(
            (m[0].addr(), m[0].end(), m[0].kind()),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!(m[1].kind(), E820_RESERVED);
        assert_eq!((m[2].addr(), m[2].end()), (BIOS_START, HIGH_MEMORY));
        assert_eq!(
            (m[3].addr(), m[3].end(), m[3].kind()),
            (HIGH_MEMORY, 128 << 20, E820_RAM)
        );
        for w in m.windows(2) {
            assert!(w[0].end() <= w[1].addr(), "sorted, no overlap: {w:?}");
        }
        // The VGA window is a gap, not RAM.
        assert!(!is_ram(&m, VGA_START, 1));
        assert!(is_ram(&m, 0x100_0000, 0x1000));
        assert!(!is_ram(&m, (128 << 20) - 0x800, 0x1000));
        assert!(!is_ram(&m, u64::MAX, 2));
    }

    #[test]
    fn ram_above_the_hole_moves_to_4g() {
        let ram = RamLayout::new(4 << 30, 0xc000_0000).unwrap();
        assert_eq!(ram.low_end, 0xc000_0000);
        assert_eq!(ram.high, Some((FOUR_GIB, FOUR_GIB + (1 << 30))));
        let m = memory_map(&ram);
        assert_eq!(m.len(), 5);
        assert_eq!(m[4].addr(), FOUR_GIB);
        assert_eq!(m[4].size(), 1 << 30);
        // The hole itself stays unlisted.
        assert!(!m
            .iter()
            .any(|e| e.addr() < FOUR_GIB && e.end() > 0xc000_0000));
    }

    #[test]
    fn bad_inputs() {
        assert_eq!(
            RamLayout::new(16 << 20, 0xc000_0000),
            Err(E820Error::TooSmall(16 << 20))
        );
        assert_eq!(
            RamLayout::new(1 << 30, 0xc000_0001),
            Err(E820Error::BadHole(0xc000_0001))
        );
        assert_eq!(
            RamLayout::new(1 << 30, 1 << 33),
            Err(E820Error::BadHole(1 << 33))
        );
        assert_eq!(
            RamLayout::new(u64::MAX, 0xc000_0000),
            Err(E820Error::Overflow(u64::MAX))
        );
    }

    #[test]
    fn conversions_keep_fields() {
        let e = E820Entry::new(0x1000, 0x2000, E820_RESERVED).unwrap();
        let b = e.to_boot();
        let (a, s, t) = (b.addr, b.size, b.r#type);
        assert_eq!((a, s, t), (0x1000, 0x2000, E820_RESERVED));
        let h = e.to_hvm();
        assert_eq!(
            (h.addr, h.size, h.type_, h.reserved),
            (0x1000, 0x2000, E820_RESERVED, 0)
        );
    }
}
