//! The guest memory the model writes event queues into, as a small trait the VMM
//! implements over its guest RAM (tests use [`VecMemory`]).
//!
//! Event queues live in guest memory the guest reads concurrently; an implementation
//! must use volatile/atomic-safe copies (vm-memory's `Bytes`), never a Rust reference
//! over the guest's pages. Every address comes from the guest and is checked by the
//! implementation (overflow and bounds).

use parking_lot::Mutex;

/// Errors of guest memory accesses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The range is not backed by guest RAM.
    #[error("guest-physical range {gpa:#x}+{len:#x} is not in guest RAM: configure the event queue in RAM")]
    OutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// Guest RAM as the XIVE model needs it.
pub trait GuestMemory: Send + Sync {
    /// Whether `gpa..gpa+len` is entirely guest RAM (overflow is "no").
    fn contains(&self, gpa: u64, len: u64) -> bool;
    /// Write `data` at `gpa`.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError>;
    /// Read into `buf` from `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Record `gpa..gpa+len` as dirty for migration (EQ_SYNC). The default does
    /// nothing (no dirty log).
    fn mark_dirty(&self, _gpa: u64, _len: u64) {}
}

/// A RAM of `len` bytes at guest-physical `base` in a `Vec`, with a dirty-range log:
/// for tests, the fuzz target and the scenario runner.
#[derive(Debug)]
pub struct VecMemory {
    base: u64,
    bytes: Mutex<Vec<u8>>,
    dirty: Mutex<Vec<(u64, u64)>>,
}

impl VecMemory {
    /// `len` zero bytes at `base`.
    pub fn new(base: u64, len: usize) -> VecMemory {
        VecMemory {
            base,
            bytes: Mutex::new(vec![0; len]),
            dirty: Mutex::new(Vec::new()),
        }
    }

    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, MemError> {
        let err = MemError::OutOfRange {
            gpa,
            len: len as u64,
        };
        let off = gpa.checked_sub(self.base).ok_or(err.clone())?;
        let off = usize::try_from(off).map_err(|_| err.clone())?;
        let end = off.checked_add(len).ok_or(err.clone())?;
        if end > self.bytes.lock().len() {
            return Err(err);
        }
        Ok(off..end)
    }

    /// A big-endian u32 at `gpa` (tests).
    pub fn read_be32(&self, gpa: u64) -> Result<u32, MemError> {
        let mut b = [0; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    /// The dirty ranges logged so far, and forget them.
    pub fn take_dirty(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.dirty.lock())
    }
}

impl GuestMemory for VecMemory {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|l| self.range(gpa, l).is_ok())
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let r = self.range(gpa, data.len())?;
        self.bytes.lock()[r].copy_from_slice(data);
        Ok(())
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock()[r]);
        Ok(())
    }
    fn mark_dirty(&self, gpa: u64, len: u64) {
        self.dirty.lock().push((gpa, len));
    }
}
