//! Base address registers: kinds, checked sizes, and the register encoding.
//!
//! A BAR's size is a power of two. The register's low bits hold read-only type bits
//! (I/O, 64-bit, prefetchable) and the address bits below the size are read-only zero,
//! which is what makes the "write all ones, read back the size" probe work: the
//! configuration space only needs the right write mask (see [`Bar::write_mask`]).

use super::PciError;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory, not prefetchable.
    Mmio32,
    /// 64-bit memory; takes two BAR slots (the next one holds the high half).
    Mmio64 {
        /// Reads have no side effects and may be merged/prefetched.
        prefetchable: bool,
    },
    /// I/O ports.
    Io,
}

impl BarKind {
    /// The read-only type bits of the register's low dword.
    pub fn type_bits(self) -> u32 {
        match self {
            BarKind::Mmio32 => 0,
            BarKind::Mmio64 { prefetchable } => 0b100 | if prefetchable { 0b1000 } else { 0 },
            BarKind::Io => 0b1,
        }
    }
    /// Number of BAR slots used.
    pub fn slots(self) -> usize {
        match self {
            BarKind::Mmio64 { .. } => 2,
            _ => 1,
        }
    }
    /// True for memory BARs.
    pub fn is_memory(self) -> bool {
        !matches!(self, BarKind::Io)
    }
    /// Bits of the low dword that are not address bits.
    pub fn flag_mask(self) -> u32 {
        match self {
            BarKind::Io => 0x3,
            _ => 0xf,
        }
    }
    /// Smallest and largest size allowed.
    pub fn size_limits(self) -> (u64, u64) {
        match self {
            // An I/O BAR decodes at most 256 ports (PCI local bus spec).
            BarKind::Io => (4, 256),
            BarKind::Mmio32 => (16, 1 << 31),
            BarKind::Mmio64 { .. } => (16, 1 << 63),
        }
    }
}

/// A BAR as declared by the device: kind and size. Construct with [`Bar::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    kind: BarKind,
    size: u64,
}

impl Bar {
    /// A BAR of `kind` and `size` at slot `index` (0..=5; 0..=4 for 64-bit BARs). The size
    /// must be a power of two inside [`BarKind::size_limits`].
    pub fn new(index: usize, kind: BarKind, size: u64) -> Result<Bar, PciError> {
        let err = |reason: String| PciError::Bar { index, reason };
        if index
            .checked_add(kind.slots())
            .is_none_or(|end| end > super::NUM_BARS)
        {
            return Err(err(format!(
                "a {kind:?} BAR needs {} slot(s) and there are only 6 (0..=5)",
                kind.slots()
            )));
        }
        let (min, max) = kind.size_limits();
        if !size.is_power_of_two() || size < min || size > max {
            return Err(err(format!(
                "size {size:#x} must be a power of two between {min:#x} and {max:#x} for a {kind:?} BAR"
            )));
        }
        Ok(Bar { kind, size })
    }
    /// Kind.
    pub fn kind(&self) -> BarKind {
        self.kind
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Write masks of the low and high dwords (high is 0 for a 32-bit BAR).
    pub fn write_mask(&self) -> (u32, u32) {
        let addr = !(self.size - 1);
        let lo = (addr as u32) & !self.kind.flag_mask();
        let hi = match self.kind {
            BarKind::Mmio64 { .. } => (addr >> 32) as u32,
            _ => 0,
        };
        (lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_sizes() {
        assert!(Bar::new(0, BarKind::Mmio32, 4096).is_ok());
        assert!(Bar::new(0, BarKind::Mmio32, 4095).is_err());
        assert!(Bar::new(0, BarKind::Mmio32, 0).is_err());
        assert!(Bar::new(0, BarKind::Mmio32, 8).is_err());
        assert!(Bar::new(0, BarKind::Mmio32, 1 << 32).is_err());
        assert!(Bar::new(0, BarKind::Io, 512).is_err());
        assert!(Bar::new(0, BarKind::Io, 2).is_err());
        assert!(Bar::new(5, BarKind::Io, 4).is_ok());
        assert!(Bar::new(6, BarKind::Io, 4).is_err());
        assert!(Bar::new(usize::MAX, BarKind::Io, 4).is_err());
        let k = BarKind::Mmio64 { prefetchable: true };
        assert!(Bar::new(5, k, 4096).is_err(), "64-bit BAR needs two slots");
        assert!(Bar::new(4, k, 1 << 40).is_ok());
        assert_eq!(
            Bar::new(4, k, 1 << 40).unwrap().write_mask(),
            (0, 0xffff_ff00)
        );
        assert_eq!(
            Bar::new(0, BarKind::Io, 32).unwrap().write_mask(),
            (0xffff_ffe0, 0)
        );
    }
}
