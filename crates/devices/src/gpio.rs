//! A 16-pin GPIO card: the smallest useful PCI device, and the example of
//! [`PciDevice`] — the device is its registers; [`PciFunction`] owns configuration
//! space, SET_IRQS and interrupt delivery.
//!
//! Identity: 1b36:7e58 (an ID chosen for nestio's examples, under QEMU's vendor ID for
//! emulated devices), class 0x088000 (other system peripheral), INTA# and one MSI vector.
//! BAR0 is 16 bytes of 32-bit registers; an access must be 4 bytes, aligned (EINVAL
//! otherwise):
//!
//! | offset | register | |
//! |---|---|---|
//! | 0x0 | `OUTPUT` | output pins 0..15 (read/write; bits 16..31 read 0) |
//! | 0x4 | `INPUT` | input pins 0..15 (read only) |
//! | 0x8 | `CHANGED` | input pins that changed since cleared (write 1 to clear) |
//! | 0xc | `IRQ_ENABLE` | pins whose change raises the interrupt |
//!
//! A change of an enabled input pin sets its `CHANGED` bit and raises vector 0; the INTx
//! level stays up until `CHANGED & IRQ_ENABLE` is cleared. Inputs are driven from outside
//! with [`Gpio::drive_inputs`], or, with loopback, by the outputs (what `nestio device
//! gpio` serves, so a driver can test the card alone).

use nestio_device::pci::{BarKind, PciConfig, PciDevice, PciError, PciFunction};
use nestio_device::{pci_index, DeviceError, RegionInfo, Result};
use parking_lot::Mutex;

/// BAR0 register offsets.
pub mod regs {
    /// Output pins.
    pub const OUTPUT: u64 = 0x0;
    /// Input pins.
    pub const INPUT: u64 = 0x4;
    /// Changed input pins (write 1 to clear).
    pub const CHANGED: u64 = 0x8;
    /// Interrupt enable per pin.
    pub const IRQ_ENABLE: u64 = 0xc;
}
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 16;
/// The 16 pins.
pub const PINS: u32 = 0xffff;

#[derive(Default)]
struct Pins {
    output: u32,
    input: u32,
    changed: u32,
    enable: u32,
}

/// The GPIO card. See the module documentation.
pub struct Gpio {
    pci: PciFunction,
    pins: Mutex<Pins>,
    loopback: bool,
}

impl Gpio {
    /// A card; with `loopback` the outputs drive the inputs.
    pub fn new(loopback: bool) -> std::result::Result<Gpio, PciError> {
        let mut c = PciConfig::new();
        c.set_vendor_id(0x1b36);
        c.set_device_id(0x7e58);
        c.set_class(0x088000);
        c.set_interrupt_pin(1)?;
        c.add_bar(0, BarKind::Mmio32, BAR0_SIZE)?;
        c.add_msi(1, false)?;
        let pci = PciFunction::new(c);
        Ok(Gpio {
            pci,
            pins: Mutex::new(Pins::default()),
            loopback,
        })
    }

    /// Drive the input pins to `level` (bits 0..15).
    pub fn drive_inputs(&self, level: u32) {
        let mut p = self.pins.lock();
        self.set_inputs(&mut p, level);
    }

    fn set_inputs(&self, p: &mut Pins, level: u32) {
        let before = p.changed & p.enable;
        p.changed |= (p.input ^ level) & PINS;
        p.input = level & PINS;
        if p.changed & p.enable & !before != 0 {
            self.pci.raise(0);
        }
    }
}

impl PciDevice for Gpio {
    fn pci(&self) -> &PciFunction {
        &self.pci
    }

    fn bar_info(&self, index: u32) -> Result<RegionInfo> {
        Ok(match index {
            pci_index::BAR0 => RegionInfo::rw(index, BAR0_SIZE),
            _ => RegionInfo::absent(index),
        })
    }

    fn bar_read(&self, _: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let p = self.pins.lock();
        let v = match register(offset, buf.len())? {
            regs::OUTPUT => p.output,
            regs::INPUT => p.input,
            regs::CHANGED => p.changed,
            _ => p.enable,
        };
        buf.copy_from_slice(&v.to_le_bytes());
        Ok(())
    }

    fn bar_write(&self, _: u32, offset: u64, data: &[u8]) -> Result<()> {
        let reg = register(offset, data.len())?;
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & PINS;
        let mut p = self.pins.lock();
        match reg {
            regs::OUTPUT => {
                p.output = v;
                if self.loopback {
                    self.set_inputs(&mut p, v);
                }
            }
            regs::CHANGED => p.changed &= !v,
            regs::IRQ_ENABLE => p.enable = v,
            _ => {}
        }
        if p.changed & p.enable == 0 {
            self.pci.lower_intx();
        }
        Ok(())
    }

    fn reset_registers(&self) {
        *self.pins.lock() = Pins::default();
    }
}

/// The register an access names: 4 bytes, aligned.
fn register(offset: u64, len: usize) -> Result<u64> {
    if len != 4 || !offset.is_multiple_of(4) {
        return Err(DeviceError::Invalid(format!(
            "GPIO register access of {len} bytes at {offset:#x}: use aligned 4-byte accesses"
        )));
    }
    Ok(offset)
}
