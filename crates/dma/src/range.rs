//! Checked address ranges and access permissions.

use crate::DmaError;

/// A non-empty range of I/O virtual addresses that does not wrap the 64-bit space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DmaRange {
    start: u64,
    len: u64,
}

impl DmaRange {
    /// A range of `len` bytes at `start`; rejects a zero length and a range that wraps.
    pub fn new(start: u64, len: u64) -> Result<Self, DmaError> {
        if len == 0 {
            return Err(DmaError::Invalid(format!(
                "zero-length range at {start:#x}"
            )));
        }
        if start.checked_add(len - 1).is_none() {
            return Err(DmaError::Overflow { iova: start, len });
        }
        Ok(DmaRange { start, len })
    }
    /// First address.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// Length in bytes (never zero).
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Always false: a `DmaRange` is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Last address (inclusive).
    pub fn last(&self) -> u64 {
        self.start + (self.len - 1)
    }
    /// True when the two ranges share at least one address.
    pub fn overlaps(&self, other: &DmaRange) -> bool {
        self.start <= other.last() && other.start <= self.last()
    }
    /// True when `addr` lies in the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr <= self.last()
    }
}

/// DMA permissions, with the bit values of vfio-user DMA_MAP flags (READ=1, WRITE=2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Prot(u32);

impl Prot {
    /// The device may read.
    pub const READ: Prot = Prot(1);
    /// The device may write.
    pub const WRITE: Prot = Prot(2);
    /// Read and write.
    pub const RW: Prot = Prot(3);
    /// No access.
    pub const NONE: Prot = Prot(0);

    /// From wire bits; unknown bits are an error.
    pub fn from_bits(bits: u32) -> Option<Prot> {
        (bits & !3 == 0).then_some(Prot(bits))
    }
    /// Wire bits.
    pub fn bits(self) -> u32 {
        self.0
    }
    /// Reading allowed.
    pub fn readable(self) -> bool {
        self.0 & 1 != 0
    }
    /// Writing allowed.
    pub fn writable(self) -> bool {
        self.0 & 2 != 0
    }
}

impl std::ops::BitOr for Prot {
    type Output = Prot;
    fn bitor(self, rhs: Prot) -> Prot {
        Prot(self.0 | rhs.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_rejects_zero_and_wrap() {
        assert!(DmaRange::new(0, 0).is_err());
        assert!(DmaRange::new(u64::MAX, 2).is_err());
        let r = DmaRange::new(u64::MAX, 1).unwrap();
        assert_eq!(r.last(), u64::MAX);
        let a = DmaRange::new(0x1000, 0x1000).unwrap();
        assert!(a.overlaps(&DmaRange::new(0x1fff, 1).unwrap()));
        assert!(!a.overlaps(&DmaRange::new(0x2000, 1).unwrap()));
        assert!(!a.overlaps(&DmaRange::new(0, 0x1000).unwrap()));
    }

    #[test]
    fn prot_bits() {
        assert_eq!(Prot::from_bits(3), Some(Prot::RW));
        assert_eq!(Prot::from_bits(4), None);
        assert!(Prot::READ.readable() && !Prot::READ.writable());
    }
}
