//! The type-0 configuration space register file.
//!
//! Three parallel byte arrays: the contents, a write mask (bits a driver write may
//! change) and a write-1-to-clear mask. A driver write goes through
//! [`PciConfig::write`], which applies both masks byte by byte; the device model uses
//! the `set_*` setters, which bypass the masks (that is how read-only fields such as the
//! IDs, the interrupt status bit or the MSI pending bits are changed).
//!
//! Builder methods (`set_vendor_id`, [`PciConfig::add_bar`], the capability adders in
//! [`super::capability`], [`PciConfig::add_msi`], [`PciConfig::add_msix`]) are called
//! once at device creation. A device that needs a function-level reset keeps a clone of
//! the freshly built space and assigns it back.

use super::bar::{Bar, BarKind};
use super::msi::MsiCap;
use super::msix::MsixCap;
use super::{check_range, command, reg, status, PciError, CONFIG_SIZE, EXT_CONFIG_SIZE, NUM_BARS};

/// A type-0 PCI configuration space. See the module documentation.
#[derive(Debug, Clone)]
pub struct PciConfig {
    pub(super) data: Vec<u8>,
    pub(super) wmask: Vec<u8>,
    pub(super) w1c: Vec<u8>,
    pub(super) bars: [Option<Bar>; NUM_BARS],
    /// Offset of the last standard capability (0: none yet).
    pub(super) last_cap: usize,
    /// Next free offset for a standard capability.
    pub(super) next_cap: usize,
    /// Offset of the last extended capability (0: none yet).
    pub(super) last_ext_cap: usize,
    /// Next free offset for an extended capability.
    pub(super) next_ext_cap: usize,
    pub(super) msi: Option<MsiCap>,
    pub(super) msix: Option<MsixCap>,
}

impl Default for PciConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PciConfig {
    /// A 256-byte conventional PCI configuration space.
    pub fn new() -> Self {
        Self::with_size(CONFIG_SIZE)
    }

    /// A 4 KiB PCIe configuration space (extended capabilities at 0x100).
    pub fn new_extended() -> Self {
        Self::with_size(EXT_CONFIG_SIZE)
    }

    fn with_size(size: usize) -> Self {
        let mut c = PciConfig {
            data: vec![0; size],
            wmask: vec![0; size],
            w1c: vec![0; size],
            bars: [None; NUM_BARS],
            last_cap: 0,
            next_cap: 0x40,
            last_ext_cap: 0,
            next_ext_cap: 0x100,
            msi: None,
            msix: None,
        };
        c.set_wmask_u16(reg::COMMAND, command::WRITABLE);
        c.set_w1c_u16(reg::STATUS, status::W1C);
        c.set_wmask_u8(reg::CACHE_LINE_SIZE, 0xff);
        c.set_wmask_u8(reg::LATENCY_TIMER, 0xff);
        c.set_wmask_u8(reg::INTERRUPT_LINE, 0xff);
        c
    }

    /// Size in bytes (256 or 4096).
    pub fn size(&self) -> usize {
        self.data.len()
    }

    /// True for the 4 KiB PCIe space.
    pub fn is_extended(&self) -> bool {
        self.data.len() == EXT_CONFIG_SIZE
    }

    // ---- driver accesses -------------------------------------------------------------

    /// A driver read of `buf.len()` bytes at `offset`. Any length inside the space is
    /// allowed (reads have no side effects).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), PciError> {
        let off = check_range("configuration space", offset, buf.len(), self.size())?;
        buf.copy_from_slice(&self.data[off..off + buf.len()]);
        Ok(())
    }

    /// A driver write: 1, 2 or 4 bytes, naturally aligned (see the module documentation
    /// of [`super`]). Read-only bits keep their value; write-1-to-clear bits are cleared
    /// where `data` has a one.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), PciError> {
        let off = check_range("configuration space", offset, data.len(), self.size())?;
        if !matches!(data.len(), 1 | 2 | 4) || off % data.len() != 0 {
            return Err(PciError::Unaligned {
                what: "configuration space",
                offset,
                len: data.len(),
                allowed: "1, 2 or 4",
            });
        }
        for (i, &b) in data.iter().enumerate() {
            let o = off + i;
            let (wm, w1c) = (self.wmask[o], self.w1c[o]);
            let old = self.data[o];
            self.data[o] = ((old & !wm) | (b & wm)) & !(b & w1c);
        }
        Ok(())
    }

    // ---- device-side accessors (no masks; out-of-range offsets read 0 / are ignored) --

    /// Device-side read of a byte.
    pub fn read_u8(&self, offset: usize) -> u8 {
        self.data.get(offset).copied().unwrap_or(0)
    }
    /// Device-side read of a little-endian u16.
    pub fn read_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.read_u8(offset), self.read_u8(offset.wrapping_add(1))])
    }
    /// Device-side read of a little-endian u32.
    pub fn read_u32(&self, offset: usize) -> u32 {
        u32::from(self.read_u16(offset)) | u32::from(self.read_u16(offset.wrapping_add(2))) << 16
    }

    fn set_bytes(v: &mut [u8], offset: usize, bytes: &[u8]) {
        match offset
            .checked_add(bytes.len())
            .and_then(|end| v.get_mut(offset..end))
        {
            Some(dst) => dst.copy_from_slice(bytes),
            None => tracing::warn!(offset, "device-side PCI config access out of range ignored"),
        }
    }

    /// Device-side write of a byte (ignores the write masks).
    pub fn set_u8(&mut self, offset: usize, v: u8) {
        Self::set_bytes(&mut self.data, offset, &[v]);
    }
    /// Device-side write of a little-endian u16.
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        Self::set_bytes(&mut self.data, offset, &v.to_le_bytes());
    }
    /// Device-side write of a little-endian u32.
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        Self::set_bytes(&mut self.data, offset, &v.to_le_bytes());
    }
    /// Set the driver write mask of a byte.
    pub fn set_wmask_u8(&mut self, offset: usize, mask: u8) {
        Self::set_bytes(&mut self.wmask, offset, &[mask]);
    }
    /// Set the driver write mask of a u16.
    pub fn set_wmask_u16(&mut self, offset: usize, mask: u16) {
        Self::set_bytes(&mut self.wmask, offset, &mask.to_le_bytes());
    }
    /// Set the driver write mask of a u32.
    pub fn set_wmask_u32(&mut self, offset: usize, mask: u32) {
        Self::set_bytes(&mut self.wmask, offset, &mask.to_le_bytes());
    }
    /// Set the write-1-to-clear mask of a u16 (those bits are also made not writable).
    pub fn set_w1c_u16(&mut self, offset: usize, mask: u16) {
        Self::set_bytes(&mut self.w1c, offset, &mask.to_le_bytes());
        let wm = self.read_mask_u16(offset) & !mask;
        self.set_wmask_u16(offset, wm);
    }
    /// Set the write-1-to-clear mask of a u32 (those bits are also made not writable).
    pub fn set_w1c_u32(&mut self, offset: usize, mask: u32) {
        Self::set_bytes(&mut self.w1c, offset, &mask.to_le_bytes());
        let lo = self.read_mask_u16(offset) & !(mask as u16);
        let hi = self.read_mask_u16(offset.wrapping_add(2)) & !((mask >> 16) as u16);
        self.set_wmask_u16(offset, lo);
        self.set_wmask_u16(offset.wrapping_add(2), hi);
    }
    fn read_mask_u16(&self, offset: usize) -> u16 {
        let b = |o: usize| self.wmask.get(o).copied().unwrap_or(0);
        u16::from_le_bytes([b(offset), b(offset.wrapping_add(1))])
    }

    // ---- identity ---------------------------------------------------------------------

    /// Vendor ID.
    pub fn set_vendor_id(&mut self, v: u16) {
        self.set_u16(reg::VENDOR_ID, v);
    }
    /// Device ID.
    pub fn set_device_id(&mut self, v: u16) {
        self.set_u16(reg::DEVICE_ID, v);
    }
    /// Revision ID.
    pub fn set_revision(&mut self, v: u8) {
        self.set_u8(reg::REVISION_ID, v);
    }
    /// The 24-bit class code: base class << 16 | sub-class << 8 | programming interface
    /// (e.g. 0x020000 for an Ethernet controller). Higher bits are ignored.
    pub fn set_class(&mut self, class_code: u32) {
        self.set_u8(reg::PROG_IF, class_code as u8);
        self.set_u8(reg::SUBCLASS, (class_code >> 8) as u8);
        self.set_u8(reg::CLASS, (class_code >> 16) as u8);
    }
    /// Subsystem vendor and subsystem IDs.
    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.set_u16(reg::SUBSYSTEM_VENDOR_ID, vendor);
        self.set_u16(reg::SUBSYSTEM_ID, id);
    }
    /// Interrupt pin: 0 none, 1..=4 INTA#..INTD#. Other values are refused.
    pub fn set_interrupt_pin(&mut self, pin: u8) -> Result<(), PciError> {
        if pin > 4 {
            return Err(PciError::Capability {
                id: 0,
                reason: format!("interrupt pin {pin} is not 0 (none) or 1..=4 (INTA..INTD)"),
            });
        }
        self.set_u8(reg::INTERRUPT_PIN, pin);
        Ok(())
    }
    /// Vendor ID.
    pub fn vendor_id(&self) -> u16 {
        self.read_u16(reg::VENDOR_ID)
    }
    /// Device ID.
    pub fn device_id(&self) -> u16 {
        self.read_u16(reg::DEVICE_ID)
    }
    /// 24-bit class code.
    pub fn class(&self) -> u32 {
        self.read_u32(reg::REVISION_ID) >> 8
    }
    /// Interrupt pin.
    pub fn interrupt_pin(&self) -> u8 {
        self.read_u8(reg::INTERRUPT_PIN)
    }
    /// Interrupt line (written by the driver / firmware).
    pub fn interrupt_line(&self) -> u8 {
        self.read_u8(reg::INTERRUPT_LINE)
    }

    // ---- command / status -------------------------------------------------------------

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(reg::COMMAND)
    }
    /// The status register.
    pub fn status(&self) -> u16 {
        self.read_u16(reg::STATUS)
    }
    /// Bus mastering (DMA, MSI) is enabled.
    pub fn bus_master(&self) -> bool {
        self.command() & command::BUS_MASTER != 0
    }
    /// Memory BARs decode.
    pub fn mem_enabled(&self) -> bool {
        self.command() & command::MEMORY != 0
    }
    /// I/O BARs decode.
    pub fn io_enabled(&self) -> bool {
        self.command() & command::IO != 0
    }
    /// INTx is disabled by the command register.
    pub fn intx_disabled(&self) -> bool {
        self.command() & command::INTX_DISABLE != 0
    }
    /// Device side: set or clear status bits (e.g. [`status::INTERRUPT`], or a W1C
    /// error bit the device raises).
    pub fn set_status_bits(&mut self, bits: u16, on: bool) {
        let s = self.status();
        self.set_u16(reg::STATUS, if on { s | bits } else { s & !bits });
    }

    // ---- BARs -------------------------------------------------------------------------

    /// Declare BAR `index` (see [`Bar::new`] for the checks). A 64-bit BAR also takes slot
    /// `index + 1`; both slots must be free.
    pub fn add_bar(&mut self, index: usize, kind: BarKind, size: u64) -> Result<(), PciError> {
        let bar = Bar::new(index, kind, size)?;
        for slot in index..index + kind.slots() {
            if self.bars[slot].is_some() || (slot > 0 && self.is_upper_half(slot)) {
                return Err(PciError::Bar {
                    index,
                    reason: format!("slot {slot} is already used"),
                });
            }
        }
        self.bars[index] = Some(bar);
        let (lo, hi) = bar.write_mask();
        let off = reg::BAR0 + 4 * index;
        self.set_u32(off, kind.type_bits());
        self.set_wmask_u32(off, lo);
        if kind.slots() == 2 {
            self.set_u32(off + 4, 0);
            self.set_wmask_u32(off + 4, hi);
        }
        Ok(())
    }

    fn is_upper_half(&self, slot: usize) -> bool {
        slot > 0
            && matches!(
                self.bars.get(slot - 1),
                Some(Some(b)) if b.kind().slots() == 2
            )
    }

    /// The BAR declared at `index` (None for an unused slot or the upper half of a 64-bit
    /// BAR).
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// The address the driver programmed into BAR `index` (type bits removed; 64-bit
    /// BARs combine both halves). None when `index` is not a declared BAR. While the
    /// driver is sizing the BAR this is the size mask, as on hardware.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let off = reg::BAR0 + 4 * index;
        let lo = u64::from(self.read_u32(off) & !bar.kind().flag_mask());
        let hi = if bar.kind().slots() == 2 {
            u64::from(self.read_u32(off + 4))
        } else {
            0
        };
        Some(hi << 32 | lo)
    }

    /// Device side: program BAR `index`'s address (ignored for an undeclared BAR; low
    /// bits below the BAR size are dropped).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bar(index) else {
            return;
        };
        let addr = addr & !(bar.size() - 1);
        let off = reg::BAR0 + 4 * index;
        let lo = (addr as u32 & !bar.kind().flag_mask()) | bar.kind().type_bits();
        self.set_u32(off, lo);
        if bar.kind().slots() == 2 {
            self.set_u32(off + 4, (addr >> 32) as u32);
        }
    }

    /// The MSI capability, when one was added.
    pub fn msi(&self) -> Option<MsiCap> {
        self.msi
    }

    /// The MSI-X capability, when one was added.
    pub fn msix(&self) -> Option<MsixCap> {
        self.msix
    }

    // ---- migration --------------------------------------------------------------------

    /// The raw contents (for a migration stream).
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.clone()
    }

    /// Restore driver-programmed state from [`PciConfig::snapshot`] bytes of a device
    /// built the same way. Only driver-writable bits (write mask and W1C bits) are taken
    /// from `bytes`; identity, capability structure and device-owned read-only bits stay
    /// as built, so a hostile stream can do nothing a driver write could not. The device
    /// re-asserts its own read-only state (e.g. the interrupt status bit) afterwards.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), PciError> {
        if bytes.len() != self.size() {
            return Err(PciError::OutOfRange {
                what: "configuration snapshot",
                offset: 0,
                len: bytes.len(),
                size: self.size(),
            });
        }
        for (i, &b) in bytes.iter().enumerate() {
            let m = self.wmask[i] | self.w1c[i];
            self.data[i] = (self.data[i] & !m) | (b & m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd32(c: &PciConfig, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }
    fn wr32(c: &mut PciConfig, off: u64, v: u32) {
        c.write(off, &v.to_le_bytes()).unwrap();
    }

    #[test]
    fn identity_fields() {
        let mut c = PciConfig::new();
        c.set_vendor_id(0x1b36);
        c.set_device_id(0x0042);
        c.set_revision(3);
        c.set_class(0xff0000);
        c.set_subsystem(0x1af4, 0x1100);
        c.set_interrupt_pin(1).unwrap();
        assert!(c.set_interrupt_pin(5).is_err());
        assert_eq!(rd32(&c, 0), 0x0042_1b36);
        assert_eq!(rd32(&c, 8), 0xff00_0003);
        assert_eq!(c.class(), 0xff0000);
        assert_eq!(rd32(&c, 0x2c), 0x1100_1af4);
        // The driver cannot change read-only identity.
        wr32(&mut c, 0, 0xffff_ffff);
        wr32(&mut c, 8, 0);
        assert_eq!(rd32(&c, 0), 0x0042_1b36);
        assert_eq!(c.class(), 0xff0000);
        // The interrupt line is writable, the pin is not.
        c.write(0x3c, &[0x0b]).unwrap();
        c.write(0x3d, &[0x03]).unwrap();
        assert_eq!((c.interrupt_line(), c.interrupt_pin()), (0x0b, 1));
    }

    #[test]
    fn bar_sizing_32_64_io() {
        let mut c = PciConfig::new();
        c.add_bar(0, BarKind::Mmio32, 4096).unwrap();
        c.add_bar(1, BarKind::Io, 32).unwrap();
        c.add_bar(2, BarKind::Mmio64 { prefetchable: true }, 1 << 33)
            .unwrap();
        c.add_bar(
            4,
            BarKind::Mmio64 {
                prefetchable: false,
            },
            64 * 1024,
        )
        .unwrap();
        // Slots are taken.
        assert!(c.add_bar(3, BarKind::Mmio32, 4096).is_err());
        assert!(c.add_bar(0, BarKind::Mmio32, 4096).is_err());
        assert!(c.add_bar(5, BarKind::Mmio32, 4096).is_err());

        for off in (0x10..0x28).step_by(4) {
            wr32(&mut c, off, 0xffff_ffff);
        }
        assert_eq!(rd32(&c, 0x10), 0xffff_f000);
        assert_eq!(rd32(&c, 0x14), 0xffff_ffe1);
        assert_eq!(rd32(&c, 0x18), 0x0000_000c);
        assert_eq!(rd32(&c, 0x1c), 0xffff_fffe);
        assert_eq!(rd32(&c, 0x20), 0xffff_0004);
        assert_eq!(rd32(&c, 0x24), 0xffff_ffff);
        let size64 = !((u64::from(rd32(&c, 0x1c)) << 32) | u64::from(rd32(&c, 0x18) & !0xf)) + 1;
        assert_eq!(size64, 1 << 33);

        wr32(&mut c, 0x10, 0xfebf_1234);
        assert_eq!(c.bar_address(0), Some(0xfebf_1000));
        wr32(&mut c, 0x14, 0xc0a5);
        assert_eq!(c.bar_address(1), Some(0xc0a0));
        assert_eq!(rd32(&c, 0x14) & 1, 1, "I/O type bit stays");
        wr32(&mut c, 0x18, 0);
        wr32(&mut c, 0x1c, 0x0000_0080);
        assert_eq!(c.bar_address(2), Some(0x80_0000_0000));
        assert_eq!(c.bar_address(3), None, "upper half is not a BAR");
        assert_eq!(c.bar_address(6), None);
        assert_eq!(c.bar(4).unwrap().size(), 64 * 1024);
        c.set_bar_address(4, 0x1_2345_6789);
        assert_eq!(c.bar_address(4), Some(0x1_2345_0000));
        assert_eq!(rd32(&c, 0x20) & 0xf, 0x4);
    }

    #[test]
    fn command_and_w1c_status() {
        let mut c = PciConfig::new();
        assert!(!c.bus_master() && !c.mem_enabled() && !c.io_enabled());
        c.write(4, &0xffffu16.to_le_bytes()).unwrap();
        assert_eq!(c.command(), command::WRITABLE);
        assert!(c.bus_master() && c.mem_enabled() && c.io_enabled() && c.intx_disabled());
        c.set_status_bits(status::REC_MASTER_ABORT | status::SIG_SYSTEM_ERROR, true);
        c.set_status_bits(status::INTERRUPT, true);
        // Writing zero clears nothing; ones on RO bits change nothing.
        c.write(6, &0u16.to_le_bytes()).unwrap();
        assert_eq!(
            c.status(),
            status::REC_MASTER_ABORT | status::SIG_SYSTEM_ERROR | status::INTERRUPT
        );
        c.write(6, &status::REC_MASTER_ABORT.to_le_bytes()).unwrap();
        assert_eq!(c.status(), status::SIG_SYSTEM_ERROR | status::INTERRUPT);
        // A dword write to command+status clears W1C bits in the upper half.
        wr32(&mut c, 4, 0xffff_0000);
        assert_eq!(c.status(), status::INTERRUPT);
        assert_eq!(c.command(), 0);
    }

    #[test]
    fn hostile_offsets_and_lengths() {
        let mut c = PciConfig::new();
        let mut b4 = [0u8; 4];
        assert!(c.read(256, &mut b4[..1]).is_err());
        assert!(c.read(254, &mut b4).is_err());
        assert!(c.read(u64::MAX, &mut b4).is_err());
        assert!(c.read(u64::MAX - 1, &mut b4).is_err());
        assert!(c.write(u64::MAX, &[0]).is_err());
        assert!(c.write(253, &[0; 4]).is_err());
        assert!(c.write(0x3c, &[]).is_err());
        assert!(c.write(0x3c, &[0; 3]).is_err());
        assert!(c.write(0x3d, &[0; 2]).is_err(), "unaligned u16");
        assert!(c.write(0x3e, &[0; 4]).is_err(), "unaligned u32");
        assert!(c.write(0x38, &[0; 8]).is_err());
        // The whole space can be read at once.
        let mut all = [0u8; 256];
        c.read(0, &mut all).unwrap();
        let mut empty = [0u8; 0];
        c.read(256, &mut empty).unwrap();
        // Device-side setters ignore bad offsets.
        c.set_u32(usize::MAX, 1);
        c.set_u32(254, 1);
        assert_eq!(c.read_u32(usize::MAX), 0);
        // 4 KiB space.
        let mut e = PciConfig::new_extended();
        assert!(e.read(4092, &mut b4).is_ok());
        assert!(e.read(4093, &mut b4).is_err());
        assert!(e.write(0x100, &[0; 4]).is_ok());
    }

    #[test]
    fn restore_takes_only_writable_bits() {
        let mut c = PciConfig::new();
        c.set_vendor_id(0x1234);
        c.add_bar(0, BarKind::Mmio32, 4096).unwrap();
        let mut other = c.clone();
        wr32(&mut other, 0x10, 0xfe00_0000);
        other.write(4, &[0x06]).unwrap();
        let mut snap = other.snapshot();
        snap[0] = 0xaa; // hostile: vendor ID
        snap[0x10] = 0xff; // hostile: BAR type/low bits
        c.restore(&snap).unwrap();
        assert_eq!(c.vendor_id(), 0x1234);
        assert_eq!(c.bar_address(0), Some(0xfe00_0000));
        assert_eq!(rd32(&c, 0x10) & 0xfff, 0);
        assert!(c.bus_master() && c.mem_enabled());
        assert!(c.restore(&snap[..100]).is_err());
    }
}
