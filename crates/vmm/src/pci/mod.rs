//! The PCI host bridge: configuration mechanism #1 (ports 0xCF8/0xCFC) and ECAM (MMIO),
//! bus 0, the host bridge itself at 00:00.0 and assigned devices at 00:NN.0.
//!
//! Both access paths decode to (device, register) and call the same
//! [`ConfigSpaceFunction`]; anything that addresses no function (another bus, function != 0, an
//! empty slot, an access crossing a dword) reads all-ones and ignores writes, as a
//! master abort does. The root also owns what assigned devices share: the BAR windows
//! (a bump allocator per window); BARs are mapped through the bus-neutral
//! [`RegionMapper`]. Interrupts go through
//! the platform's [`IrqChip`] (injected at creation): nothing here knows which
//! interrupt controller the guest has; INTx wiring is the chip's policy.

pub mod assigned;

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use nestio_device_model::VfioDevice;

use crate::bus::{BusDevice, BusFault};
use crate::iommu::DmaDomain;
use crate::irqchip::IrqChip;
use crate::region_map::RegionMapper;

pub use assigned::AssignedDevice;

/// ECAM base (bus 0 only).
pub const ECAM_BASE: u64 = 0xe000_0000;
/// ECAM size: one bus, 32 devices x 8 functions x 4 KiB.
pub const ECAM_SIZE: u64 = 1 << 20;
/// 32-bit MMIO window for BARs.
pub const MMIO_WINDOW: (u64, u64) = (0xc000_0000, 0xe000_0000);
/// Port window for I/O BARs.
pub const PIO_WINDOW: (u64, u64) = (0xc000, 0x1_0000);
/// Errors of the VMM's PCI host side (wiring assigned devices), as opposed to
/// `nestio_device_model::pci::PciError` of device models' configuration spaces.
#[derive(Debug, thiserror::Error)]
pub enum PciHostError {
    /// No free slot, window space, GSI or memory slot.
    #[error("cannot assign {device}: {what} exhausted")]
    Exhausted {
        /// Device.
        device: String,
        /// Resource.
        what: &'static str,
    },
    /// The device's description is unusable.
    #[error("cannot assign {device}: {message}")]
    Device {
        /// Device.
        device: String,
        /// Why.
        message: String,
    },
    /// A KVM ioctl failed.
    #[error("cannot assign {device}: {what} failed: {err}")]
    Kvm {
        /// Device.
        device: String,
        /// Step.
        what: &'static str,
        /// Cause.
        err: kvm_ioctls::Error,
    },
    /// The interrupt controller refused to wire an interrupt.
    #[error("cannot assign {device}: {err}")]
    Irq {
        /// Device.
        device: String,
        /// Cause.
        err: crate::irqchip::IrqChipError,
    },
    /// Connecting a vfio-user device failed.
    #[error("cannot connect to vfio-user device at {socket}: {message}")]
    Connect {
        /// Socket path.
        socket: String,
        /// Why.
        message: String,
    },
}

/// A function on the VMM's bus as the host bridge sees it: something that answers
/// configuration-register accesses (the host bridge itself, an [`AssignedDevice`]).
/// Not to be confused with a device model's `nestio_device_model::pci` helpers, which
/// implement a device's own configuration space behind `VfioDevice`.
pub trait ConfigSpaceFunction: Send + Sync {
    /// Read `data.len()` (1, 2 or 4) bytes at register `reg` (no dword crossing).
    fn config_read(&self, reg: u16, data: &mut [u8]) -> Result<(), BusFault>;
    /// Write `data` at register `reg`.
    fn config_write(&self, reg: u16, data: &[u8]) -> Result<(), BusFault>;
}

/// The host bridge at 00:00.0: identity only, read-only.
struct HostBridge {
    cfg: [u8; 64],
}

impl HostBridge {
    fn new() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
        cfg[2..4].copy_from_slice(&0x29c0u16.to_le_bytes());
        cfg[0x0b] = 0x06; // bridge
        cfg[0x0a] = 0x00; // host bridge
        HostBridge { cfg }
    }
}

impl ConfigSpaceFunction for HostBridge {
    fn config_read(&self, reg: u16, data: &mut [u8]) -> Result<(), BusFault> {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.cfg.get(reg as usize + i).copied().unwrap_or(0);
        }
        Ok(())
    }
    fn config_write(&self, _reg: u16, _data: &[u8]) -> Result<(), BusFault> {
        Ok(())
    }
}

/// A bump allocator over a BAR window, aligned to each request's size.
#[derive(Debug)]
struct BarWindow {
    next: u64,
    end: u64,
}

impl BarWindow {
    fn alloc(&mut self, size: u64) -> Option<u64> {
        let base = self.next.checked_next_multiple_of(size)?;
        let end = base.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(base)
    }
}

struct Shared {
    mmio_window: BarWindow,
    pio_window: BarWindow,
}

/// Bus 0: see the module documentation.
pub struct PciRoot {
    irqchip: Arc<dyn IrqChip>,
    mapper: Arc<RegionMapper>,
    dma: Arc<dyn DmaDomain>,
    functions: Mutex<BTreeMap<u8, Arc<dyn ConfigSpaceFunction>>>,
    devices: Mutex<Vec<Arc<AssignedDevice>>>,
    shared: Mutex<Shared>,
    config_address: Mutex<u32>,
}

impl PciRoot {
    /// An empty bus with the host bridge, wiring interrupts into `irqchip`, mapping
    /// BARs through `mapper` and attaching devices' DMA to `dma`.
    pub fn new(
        irqchip: Arc<dyn IrqChip>,
        mapper: Arc<RegionMapper>,
        dma: Arc<dyn DmaDomain>,
    ) -> Arc<Self> {
        let root = Arc::new(PciRoot {
            irqchip,
            mapper,
            dma,
            functions: Mutex::new(BTreeMap::new()),
            devices: Mutex::new(Vec::new()),
            shared: Mutex::new(Shared {
                mmio_window: BarWindow {
                    next: MMIO_WINDOW.0,
                    end: MMIO_WINDOW.1,
                },
                pio_window: BarWindow {
                    next: PIO_WINDOW.0,
                    end: PIO_WINDOW.1,
                },
            }),
            config_address: Mutex::new(0),
        });
        root.functions.lock().insert(0, Arc::new(HostBridge::new()));
        root
    }

    /// Assign `device` at 00:`slot`.0: attach it to the DMA domain, allocate and map
    /// BARs, register ioeventfds, wire INTx.
    pub fn assign(
        self: &Arc<Self>,
        slot: u8,
        name: String,
        device: Arc<dyn VfioDevice>,
    ) -> Result<Arc<AssignedDevice>, PciHostError> {
        if slot == 0 || slot >= 32 {
            return Err(PciHostError::Exhausted {
                device: name,
                what: "PCI slots (31 devices on bus 0)",
            });
        }
        let dev = AssignedDevice::new(self.clone(), slot, name, device)?;
        self.functions.lock().insert(slot, Arc::new(dev.clone()));
        self.devices.lock().push(dev.clone());
        Ok(dev)
    }

    /// Assigned devices.
    pub fn devices(&self) -> Vec<Arc<AssignedDevice>> {
        self.devices.lock().clone()
    }

    /// First device found dead: (name, what happened).
    pub fn check_devices(&self) -> Option<(String, String)> {
        self.devices().iter().find_map(|d| d.check_alive())
    }

    /// The port device for 0xCF8..0xD00.
    pub fn config_io(self: &Arc<Self>) -> Arc<dyn BusDevice> {
        Arc::new(ConfigIo(Arc::downgrade(self)))
    }

    /// The ECAM MMIO device.
    pub fn ecam(self: &Arc<Self>) -> Arc<dyn BusDevice> {
        Arc::new(Ecam(Arc::downgrade(self)))
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<Arc<dyn ConfigSpaceFunction>> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.functions.lock().get(&dev).cloned()
    }

    fn config_access(
        &self,
        bus: u8,
        dev: u8,
        func: u8,
        reg: u16,
        read: Option<&mut [u8]>,
        write: Option<&[u8]>,
    ) -> Result<(), BusFault> {
        let len = access_len(&read, write);
        let ok_size = matches!(len, 1 | 2 | 4) && (reg as usize % 4) + len <= 4;
        let f = if ok_size {
            self.function(bus, dev, func)
        } else {
            None
        };
        match (f, read, write) {
            (Some(f), Some(d), _) => f.config_read(reg, d),
            (Some(f), None, Some(d)) => f.config_write(reg, d),
            (None, Some(d), _) => {
                d.fill(0xff);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The interrupt controller devices are wired into.
    pub fn irqchip(&self) -> &Arc<dyn IrqChip> {
        &self.irqchip
    }

    /// The DMA domain devices are attached to.
    pub fn dma_domain(&self) -> &Arc<dyn DmaDomain> {
        &self.dma
    }

    /// The region mapper BARs are mapped through.
    pub fn mapper(&self) -> &Arc<RegionMapper> {
        &self.mapper
    }

    pub(crate) fn alloc_bar(&self, io: bool, size: u64) -> Option<u64> {
        let mut s = self.shared.lock();
        if io {
            s.pio_window.alloc(size)
        } else {
            s.mmio_window.alloc(size)
        }
    }
}

/// The root owns the buses these handlers sit on, so they hold it weakly (no cycle).
struct ConfigIo(Weak<PciRoot>);

impl BusDevice for ConfigIo {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        let Some(root) = self.0.upgrade() else {
            data.fill(0xff);
            return Ok(());
        };
        root.config_io_read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
        match self.0.upgrade() {
            Some(root) => root.config_io_write(offset, data),
            None => Ok(()),
        }
    }
}

impl PciRoot {
    fn config_io_read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        if offset == 0 && data.len() == 4 {
            let a = *self.config_address.lock();
            data.copy_from_slice(&a.to_le_bytes());
            return Ok(());
        }
        if offset < 4 {
            data.fill(0xff);
            return Ok(());
        }
        let Some((bus, dev, func, reg)) = self.config_target(offset) else {
            data.fill(0xff);
            return Ok(());
        };
        self.config_access(bus, dev, func, reg, Some(data), None)
    }
    fn config_io_write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
        if offset == 0 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            *self.config_address.lock() = v & 0x80ff_fffc;
            return Ok(());
        }
        if offset < 4 {
            return Ok(());
        }
        let Some((bus, dev, func, reg)) = self.config_target(offset) else {
            return Ok(());
        };
        self.config_access(bus, dev, func, reg, None, Some(data))
    }

    /// (bus, device, function, register) that CONFIG_DATA at `offset` (4..8) addresses
    /// through the latched CONFIG_ADDRESS, or `None` while its enable bit is clear.
    fn config_target(&self, offset: u64) -> Option<(u8, u8, u8, u16)> {
        let a = *self.config_address.lock();
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let reg = (a & 0xfc) as u16 + ((offset - 4) & 3) as u16;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
            reg,
        ))
    }
}

struct Ecam(Weak<PciRoot>);

/// Bytes of an access given as a read buffer or write data.
pub(crate) fn access_len(read: &Option<&mut [u8]>, write: Option<&[u8]>) -> usize {
    read.as_ref()
        .map_or_else(|| write.map_or(0, <[u8]>::len), |d| d.len())
}

fn ecam_decode(offset: u64) -> (u8, u8, u8, u16) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 7) as u8,
        (offset & 0xfff) as u16,
    )
}

impl BusDevice for Ecam {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        let (b, d, f, r) = ecam_decode(offset);
        match self.0.upgrade() {
            Some(root) => root.config_access(b, d, f, r, Some(data), None),
            None => {
                data.fill(0xff);
                Ok(())
            }
        }
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
        let (b, d, f, r) = ecam_decode(offset);
        match self.0.upgrade() {
            Some(root) => root.config_access(b, d, f, r, None, Some(data)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_aligns_and_refuses_overflow() {
        let mut w = BarWindow {
            next: 0x1000,
            end: 0x10000,
        };
        assert_eq!(w.alloc(0x4000), Some(0x4000));
        assert_eq!(w.alloc(0x1000), Some(0x8000));
        assert_eq!(w.alloc(0x8000), None);
        assert_eq!(w.alloc(0x1000), Some(0x9000));
        let mut w = BarWindow {
            next: u64::MAX - 10,
            end: u64::MAX,
        };
        assert_eq!(w.alloc(1 << 63), None);
    }

    #[test]
    fn ecam_decodes() {
        assert_eq!(ecam_decode(0x0000_8004), (0, 1, 0, 4));
        assert_eq!(ecam_decode(0x000f_ffff), (0, 31, 7, 0xfff));
    }
}
