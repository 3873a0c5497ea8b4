//! The PCI configuration space of the 82540EM, as the 8254x manual (section 4.1) has
//! it.
//!
//! - Identity: vendor 8086, device 100E, revision 3, class 020000 (Ethernet), one
//!   interrupt pin (INTA#); the subsystem vendor ID and subsystem ID come from the
//!   EEPROM (words 0x0C and 0x0B, loaded because initialization control word 1 says so).
//! - BAR0: 128 KiB memory (the register file); BAR1: 64-byte I/O window.
//! - Capabilities: the capability pointer (0x34) names the PCI power management
//!   capability at 0xDC, the only one the 82540EM has: version 2, D3hot and D3cold
//!   PME support, DSI set (PMC 0xC822), PMCSR with a writable power state (bits 1:0),
//!   data select (12:9) and PME enable (8), PME status write-1-to-clear (15); the data
//!   register reads 0.
//! - MSI, as an explicit option ([`E1000Config::msi`](super::E1000Config::msi)): the
//!   82540EM has no MSI capability, but a VMM that wants message interrupts can ask
//!   for one. It is a 64-bit, single-vector MSI capability linked after power
//!   management (PM at 0xDC names it as next; it sits at the first free offset, 0x40),
//!   so the manual's capability comes first and a driver that walks the list finds
//!   both.

use nestio_device_model::pci::{BarKind, PciConfig, PciError};

use super::eeprom::Eeprom;
use super::{regs, CLASS_CODE, DEVICE_ID, VENDOR_ID};

/// Offset of the power management capability.
pub const PM_CAP: usize = 0xDC;
/// PCI capability ID of power management.
const CAP_ID_PM: u8 = 0x01;
/// Power management capabilities: PME from D0, D3hot, D3cold (bits 15:11 = 11001b),
/// DSI (bit 5), version 2 (PCI PM 1.1).
pub const PMC: u16 = 0xC822;
/// PMCSR bits a driver writes: power state, PME enable, data select.
const PMCSR_WRITABLE: u16 = 0x1F03;
/// PMCSR PME status (write 1 to clear).
const PMCSR_PME_STATUS: u16 = 1 << 15;
/// Capability pointer register.
const CAP_PTR: usize = 0x34;
/// Status register bit: capability list present.
const STATUS_CAP_LIST: u16 = 1 << 4;

/// Build the configuration space for a device whose EEPROM is `eeprom`, with an MSI
/// capability when `msi`.
pub(crate) fn build(eeprom: &Eeprom, msi: bool) -> Result<PciConfig, PciError> {
    let mut c = PciConfig::new();
    c.set_vendor_id(VENDOR_ID);
    c.set_device_id(DEVICE_ID);
    c.set_revision(0x03);
    c.set_class(CLASS_CODE);
    let (sub_vendor, sub_id) = eeprom.subsystem();
    c.set_subsystem(sub_vendor, sub_id);
    c.set_interrupt_pin(1)?;
    c.add_bar(0, BarKind::Mmio32, regs::MMIO_SIZE)?;
    c.add_bar(1, BarKind::Io, regs::IO_SIZE)?;
    // MSI first (the allocator places it at the first free offset), then the power
    // management capability at its fixed place, made head of the list.
    let msi_at = if msi {
        Some(c.add_msi(1, false)?.offset())
    } else {
        None
    };
    c.set_u8(PM_CAP, CAP_ID_PM);
    c.set_u8(PM_CAP + 1, msi_at.map_or(0, |o| o as u8));
    c.set_u16(PM_CAP + 2, PMC);
    c.set_u16(PM_CAP + 4, 0);
    c.set_wmask_u16(PM_CAP + 4, PMCSR_WRITABLE);
    c.set_w1c_u16(PM_CAP + 4, PMCSR_PME_STATUS);
    c.set_u8(CAP_PTR, PM_CAP as u8);
    c.set_status_bits(STATUS_CAP_LIST, true);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_layout_and_msi_option() {
        let e = Eeprom::new([2, 0, 0, 0, 0, 1]);
        let c = build(&e, false).unwrap();
        let caps = c.capabilities();
        assert_eq!(caps.len(), 1);
        assert_eq!((caps[0].id, caps[0].offset), (1, PM_CAP));
        assert!(c.msi().is_none());
        assert_eq!(c.read_u32(0x2C), 0x100E_8086, "subsystem from the EEPROM");
        assert_eq!(c.read_u16(PM_CAP + 2), PMC);

        let mut c = build(&e, true).unwrap();
        let ids: Vec<u16> = c.capabilities().iter().map(|k| k.id).collect();
        assert_eq!(ids, [1, 5], "PM first, then MSI");
        assert!(c.msi().is_some());
        // PMCSR: power state and PME enable writable, PME status write-1-to-clear,
        // reserved bits stay 0.
        c.write((PM_CAP + 4) as u64, &0xFFFFu16.to_le_bytes())
            .unwrap();
        assert_eq!(c.read_u16(PM_CAP + 4), PMCSR_WRITABLE);
        c.set_u16(PM_CAP + 4, 0x8003);
        c.write((PM_CAP + 4) as u64, &0x8000u16.to_le_bytes())
            .unwrap();
        assert_eq!(c.read_u16(PM_CAP + 4), 0);
        // The capability body is read-only.
        c.write(PM_CAP as u64, &0xFFFF_FFFFu32.to_le_bytes())
            .unwrap();
        assert_eq!(c.read_u16(PM_CAP + 2), PMC);
        assert_eq!(c.read_u8(PM_CAP), 1);
    }
}
