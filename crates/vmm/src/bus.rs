//! The port-I/O and MMIO buses: address ranges mapped to device handlers.
//!
//! A [`BusRange`] is a non-empty range that does not wrap (checked constructor). A
//! [`Bus`] keeps non-overlapping ranges in a `BTreeMap` keyed by base; a lookup succeeds
//! only when the *whole* access (`addr .. addr+len`) lies inside one range, so a device
//! never sees an offset or length outside what it registered. Everything else is
//! unassigned: reads return all-ones and writes are dropped, as on a PCI bus where a
//! transaction nobody claims ends in a master abort.
//!
//! The map sits behind an `RwLock`, but the lock is released before the handler runs:
//! a handler (PCI configuration write) may remap BARs on the same bus.

use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A fatal failure of a bus access: the device behind it is gone or broken, and the VM
/// must stop with this message.
#[derive(Debug, thiserror::Error)]
#[error("device {device} failed: {message}")]
pub struct BusFault {
    /// The device's name.
    pub device: String,
    /// What went wrong.
    pub message: String,
}

/// Errors of bus management.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A zero-length range or one that wraps the address space.
    #[error("invalid bus range at {base:#x} with length {len:#x}")]
    BadRange {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The new range overlaps one already on the bus.
    #[error("bus range [{base:#x}, +{len:#x}) overlaps an existing device")]
    Overlap {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// A non-empty, non-wrapping address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    base: u64,
    len: u64,
}

impl BusRange {
    /// `len` bytes at `base`; rejects a zero length and a range past `u64::MAX`.
    pub fn new(base: u64, len: u64) -> Result<Self, BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        Ok(BusRange { base, len })
    }
    /// First address.
    pub fn base(&self) -> u64 {
        self.base
    }
    /// Length (never zero).
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Last address (inclusive).
    pub fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }
    /// True when the ranges share an address.
    pub fn overlaps(&self, o: &BusRange) -> bool {
        self.base <= o.last() && o.base <= self.last()
    }
    /// Offset of the access `[addr, addr+len)` when it lies entirely inside.
    pub fn offset_of(&self, addr: u64, len: u64) -> Option<u64> {
        if len == 0 || addr < self.base {
            return None;
        }
        let off = addr - self.base;
        let end = off.checked_add(len)?;
        (end <= self.len).then_some(off)
    }
}

/// A device on a bus. `offset` is relative to the registered range and `offset +
/// data.len()` never exceeds the range length. Errors are fatal for the VM: a device that
/// merely refuses an access answers all-ones itself and returns `Ok`.
pub trait BusDevice: Send + Sync {
    /// Read `data.len()` bytes at `offset`.
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault>;
    /// Write `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault>;
}

struct Entry {
    range: BusRange,
    dev: Arc<dyn BusDevice>,
}

/// A bus: see the module documentation.
#[derive(Default)]
pub struct Bus {
    map: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `dev` at `range`; fails when the range overlaps another.
    pub fn insert(&self, range: BusRange, dev: Arc<dyn BusDevice>) -> Result<(), BusError> {
        let mut map = self.map.write();
        let clash = map
            .range(..=range.last())
            .next_back()
            .is_some_and(|(_, e)| e.range.overlaps(&range));
        if clash {
            return Err(BusError::Overlap {
                base: range.base,
                len: range.len,
            });
        }
        map.insert(range.base, Entry { range, dev });
        Ok(())
    }

    /// Remove the range that starts at `base`; true when there was one.
    pub fn remove(&self, base: u64) -> bool {
        self.map.write().remove(&base).is_some()
    }

    /// The device and offset for an access, if it lies wholly inside one range.
    pub fn resolve(&self, addr: u64, len: u64) -> Option<(Arc<dyn BusDevice>, u64)> {
        let map = self.map.read();
        let (_, e) = map.range(..=addr).next_back()?;
        let off = e.range.offset_of(addr, len)?;
        Some((e.dev.clone(), off))
    }

    /// Read; unassigned addresses read as all-ones. Returns whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<bool, BusFault> {
        match self.resolve(addr, data.len() as u64) {
            Some((dev, off)) => dev.read(off, data).map(|_| true),
            None => {
                data.fill(0xff);
                Ok(false)
            }
        }
    }

    /// Write; writes to unassigned addresses are dropped. Returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<bool, BusFault> {
        match self.resolve(addr, data.len() as u64) {
            Some((dev, off)) => dev.write(off, data).map(|_| true),
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Rec(Mutex<Vec<(u64, usize)>>);
    impl BusDevice for Rec {
        fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
            self.0.lock().push((offset, data.len()));
            data.fill(0x11);
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
            self.0.lock().push((offset, data.len()));
            Ok(())
        }
    }

    #[test]
    fn ranges_are_checked() {
        assert!(BusRange::new(0, 0).is_err());
        assert!(BusRange::new(u64::MAX, 2).is_err());
        let r = BusRange::new(u64::MAX, 1).unwrap();
        assert_eq!(r.offset_of(u64::MAX, 1), Some(0));
        assert_eq!(r.offset_of(u64::MAX, 2), None);
        let r = BusRange::new(0x1000, 0x100).unwrap();
        assert_eq!(r.offset_of(0x10fc, 4), Some(0xfc));
        assert_eq!(r.offset_of(0x10fe, 4), None, "straddles the end");
        assert_eq!(r.offset_of(0xfff, 2), None);
        assert_eq!(r.offset_of(0x1000, 0), None);
    }

    #[test]
    fn overlap_rejected_and_unassigned_reads_ones() {
        let bus = Bus::new();
        let d = Arc::new(Rec::default());
        bus.insert(BusRange::new(0x1000, 0x100).unwrap(), d.clone())
            .unwrap();
        assert!(bus
            .insert(BusRange::new(0x10ff, 1).unwrap(), d.clone())
            .is_err());
        assert!(bus
            .insert(BusRange::new(0xf00, 0x101).unwrap(), d.clone())
            .is_err());
        bus.insert(BusRange::new(0x1100, 0x10).unwrap(), d.clone())
            .unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0x1004, &mut b).unwrap());
        assert_eq!(b, [0x11; 4]);
        // Straddling two ranges: nobody claims it.
        assert!(!bus.read(0x10fe, &mut b).unwrap());
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0x2000, &[1]).unwrap());
        assert_eq!(*d.0.lock(), vec![(4, 4)]);
        assert!(bus.remove(0x1000));
        assert!(!bus.read(0x1004, &mut b).unwrap());
    }
}
