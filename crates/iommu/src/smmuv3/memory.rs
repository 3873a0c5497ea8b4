//! The guest memory the SMMU reads its tables from and writes its events to.
//!
//! The model owns no memory: the VMM (guest RAM), a device process walking stage 1
//! itself (its DMA space), the tests and the fuzzer implement [`SmmuMemory`]. MSI
//! writes go through [`SmmuMemory::write_msi`] so an embedder can route a doorbell
//! to its interrupt controller; wired interrupts through [`SmmuMemory::raise`].

use thiserror::Error;

/// A failed access of the SMMU to memory (an external abort in the architecture).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error(
    "SMMU access of {len} bytes at {addr:#x} failed: the address is not backed by guest memory"
)]
pub struct MemoryError {
    /// First address of the access.
    pub addr: u64,
    /// Length of the access in bytes.
    pub len: usize,
}

/// The wired interrupts of an SMMU without MSI (or with an MSI address of 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WiredIrq {
    /// A record was written to the event queue.
    EventQueue,
    /// A CMD_SYNC with CS = SIG_IRQ and no MSI address completed.
    CmdSync,
    /// A global error became active.
    GlobalError,
}

/// Memory as the SMMU sees it (physical addresses of its own side).
pub trait SmmuMemory {
    /// Read `buf.len()` bytes at `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Write `data` at `addr`.
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError>;
    /// An MSI write of 32-bit `data` at `addr`. The default writes memory (what a
    /// CMD_SYNC whose MSI targets the command queue itself relies on).
    fn write_msi(&self, addr: u64, data: u32) -> Result<(), MemoryError> {
        self.write(addr, &data.to_le_bytes())
    }
    /// A wired interrupt edge. The default drops it.
    fn raise(&self, _irq: WiredIrq) {}
}

/// Read one little-endian 64-bit word.
pub(crate) fn read_u64(mem: &dyn SmmuMemory, addr: u64) -> Result<u64, MemoryError> {
    let mut b = [0u8; 8];
    mem.read(addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Read `N` little-endian 64-bit words.
pub(crate) fn read_words<const N: usize>(
    mem: &dyn SmmuMemory,
    addr: u64,
) -> Result<[u64; N], MemoryError> {
    let mut out = [0u64; N];
    let mut buf = vec![0u8; N * 8];
    mem.read(addr, &mut buf)?;
    for (i, w) in out.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[i * 8..i * 8 + 8]);
        *w = u64::from_le_bytes(b);
    }
    Ok(out)
}

/// A flat, bounds-checked memory for tests and the fuzzer: `size` bytes at `base`,
/// plus a log of the MSI writes and wired interrupts.
#[derive(Debug)]
pub struct FlatMemory {
    base: u64,
    bytes: parking_lot::Mutex<Vec<u8>>,
    msis: parking_lot::Mutex<Vec<(u64, u32)>>,
    irqs: parking_lot::Mutex<Vec<WiredIrq>>,
}

impl FlatMemory {
    /// `size` zeroed bytes at `base`.
    pub fn new(base: u64, size: usize) -> Self {
        Self {
            base,
            bytes: parking_lot::Mutex::new(vec![0; size]),
            msis: parking_lot::Mutex::new(Vec::new()),
            irqs: parking_lot::Mutex::new(Vec::new()),
        }
    }

    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, MemoryError> {
        let err = MemoryError { addr, len };
        let off = addr.checked_sub(self.base).ok_or(err)?;
        let off = usize::try_from(off).map_err(|_| err)?;
        let end = off.checked_add(len).ok_or(err)?;
        if end > self.bytes.lock().len() {
            return Err(err);
        }
        Ok(off..end)
    }

    /// Write one little-endian 64-bit word.
    pub fn write_u64(&self, addr: u64, v: u64) -> Result<(), MemoryError> {
        self.write(addr, &v.to_le_bytes())
    }

    /// Read one little-endian 64-bit word.
    pub fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        read_u64(self, addr)
    }

    /// The MSI writes seen so far (address, data), drained.
    pub fn take_msis(&self) -> Vec<(u64, u32)> {
        std::mem::take(&mut self.msis.lock())
    }

    /// The wired interrupts seen so far, drained.
    pub fn take_irqs(&self) -> Vec<WiredIrq> {
        std::mem::take(&mut self.irqs.lock())
    }
}

impl SmmuMemory for FlatMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock()[r]);
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let r = self.range(addr, data.len())?;
        self.bytes.lock()[r].copy_from_slice(data);
        Ok(())
    }

    fn write_msi(&self, addr: u64, data: u32) -> Result<(), MemoryError> {
        self.msis.lock().push((addr, data));
        // Also land in memory when it is RAM (CMD_SYNC polling on memory).
        if self.range(addr, 4).is_ok() {
            self.write(addr, &data.to_le_bytes())?;
        }
        Ok(())
    }

    fn raise(&self, irq: WiredIrq) {
        self.irqs.lock().push(irq);
    }
}
