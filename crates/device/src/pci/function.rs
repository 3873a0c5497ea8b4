//! A PCI function's VFIO plumbing in one place, so a device is its registers.
//!
//! Every emulated PCI device answers the same things the same way: device info (PCI,
//! RESET, nine regions, five irq indices), the configuration region (index 7) read and
//! written through [`PciConfig`] with the INTx-disable bit tracked, SET_IRQS and irq info
//! laid out as vfio-pci does (INTx, MSI, MSI-X from the capabilities), interrupts raised
//! in whichever mode the driver enabled, and the PCI part of a reset. [`PciFunction`]
//! owns that state — the configuration space (behind its own lock), the power-on copy
//! of it, and the [`PciIntr`] — in the style of libvfio-user, whose context owns config
//! space, SET_IRQS and DMA while a device supplies its BAR callbacks.
//!
//! Two ways to use it:
//! - a device that is only registers implements [`PciDevice`] (its BARs, optionally its
//!   [`DmaPort`] and a register reset) and gets [`VfioDevice`] from the blanket impl
//!   here: `crates/devices/src/gpio.rs` is the example;
//! - a device with more to say (migration, its own locking) implements [`VfioDevice`]
//!   itself and forwards the PCI parts to its function (`sample.rs`).
//!
//! Lock order: a device may call into its function (raise, bus master, config access)
//! while holding its own state lock; the function never calls back into the device, and
//! it holds its configuration lock only inside its own methods.

use super::intr::{Delivery, IntrMode, PciIntr};
use super::PciConfig;
use crate::irq::Irqs;
use crate::{
    flags, pci_index, DeviceError, DeviceInfo, DmaPort, IoEventFd, IrqAction, IrqData, IrqInfo,
    RegionInfo, Result, VfioDevice,
};
use parking_lot::{Mutex, MutexGuard};

/// A PCI function's configuration space and interrupts. See the module documentation.
pub struct PciFunction {
    config: Mutex<PciConfig>,
    power_on: PciConfig,
    intr: PciIntr,
}

impl std::fmt::Debug for PciFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.lock_config();
        f.debug_struct("PciFunction")
            .field("vendor", &format_args!("{:#06x}", c.vendor_id()))
            .field("device", &format_args!("{:#06x}", c.device_id()))
            .field("mode", &self.intr.mode())
            .finish()
    }
}

impl PciFunction {
    /// A function with configuration space `config` (identity, BARs, capabilities
    /// already added); its irq indices follow from it ([`PciIntr::for_config`]).
    pub fn new(config: PciConfig) -> PciFunction {
        PciFunction {
            intr: PciIntr::for_config(&config),
            power_on: config.clone(),
            config: Mutex::new(config),
        }
    }

    /// The configuration space, locked (device-side setters, typed capability reads).
    pub fn lock_config(&self) -> MutexGuard<'_, PciConfig> {
        self.config.lock()
    }

    /// A copy of the configuration space.
    pub fn config(&self) -> PciConfig {
        self.lock_config().clone()
    }

    /// The configuration space as built (what [`PciFunction::reset_to_power_on`]
    /// restores; a base to restore a migrated configuration onto).
    pub fn power_on_config(&self) -> PciConfig {
        self.power_on.clone()
    }

    /// The interrupt indices.
    pub fn intr(&self) -> &PciIntr {
        &self.intr
    }

    /// The underlying irq state (eventfds, masks).
    pub fn irqs(&self) -> &Irqs {
        self.intr.irqs()
    }

    /// `VfioDevice::info` of a resettable PCI function.
    pub fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: flags::PCI | flags::RESET,
            num_regions: pci_index::NUM_REGIONS,
            num_irqs: self.intr.num_irqs(),
        }
    }

    /// `VfioDevice::region_info`: the configuration region here, BARs (and ROM, VGA)
    /// from `bar`, EINVAL past the last PCI region.
    pub fn region_info(
        &self,
        index: u32,
        bar: impl FnOnce(u32) -> Result<RegionInfo>,
    ) -> Result<RegionInfo> {
        match index {
            pci_index::CONFIG => Ok(RegionInfo::rw(index, self.power_on.size() as u64)),
            i if i < pci_index::NUM_REGIONS => bar(i),
            i => Err(DeviceError::NoSuchRegion(i)),
        }
    }

    /// Read the configuration region.
    pub fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self.lock_config().read(offset, buf)?)
    }

    /// Write the configuration region (driver-writable bits only); a cleared
    /// INTx-disable bit re-signals a pending INTx level.
    pub fn config_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut c = self.lock_config();
        c.write(offset, data)?;
        self.intr.command_written(&c);
        Ok(())
    }

    /// `VfioDevice::irq_info`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.intr.irq_info(index)
    }

    /// `VfioDevice::set_irqs` (eventfds are checked: see [`crate::eventfd`]).
    pub fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        self.intr.set_irqs(index, action, start, count, data)
    }

    /// Raise `vector` in the mode the driver enabled (MSI-X, MSI or INTx).
    pub fn raise(&self, vector: u32) -> Delivery {
        self.intr.raise(&mut self.lock_config(), vector)
    }

    /// Drop the INTx level (the cause was cleared).
    pub fn lower_intx(&self) {
        self.intr.lower_intx(&mut self.lock_config());
    }

    /// The interrupt mode a raise would use now.
    pub fn mode(&self) -> IntrMode {
        self.intr.mode()
    }

    /// True when the driver allows bus mastering (DMA and message interrupts).
    pub fn bus_master(&self) -> bool {
        self.lock_config().bus_master()
    }

    /// The PCI part of a function reset: the INTx level drops, eventfds stay wired
    /// (the owner's), the configuration space is kept (the VFIO core saves and restores
    /// it around a reset).
    pub fn reset(&self) {
        self.intr.reset(&mut self.lock_config());
    }

    /// A reset that also returns the configuration space to its power-on values.
    pub fn reset_to_power_on(&self) {
        let mut c = self.lock_config();
        *c = self.power_on.clone();
        self.intr.reset(&mut c);
    }
}

/// A PCI device that is its registers: [`PciFunction`] does the rest. Implementing this
/// gives the type [`VfioDevice`] (see the module documentation).
pub trait PciDevice: Send + Sync {
    /// The function's configuration space and interrupts.
    fn pci(&self) -> &PciFunction;
    /// Describe region `index` (0..=6 and 8; never the configuration region 7):
    /// [`RegionInfo::absent`] for a BAR the device does not implement.
    fn bar_info(&self, index: u32) -> Result<RegionInfo>;
    /// Read a BAR (the access was checked against `bar_info`'s size).
    fn bar_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Write a BAR (the access was checked against `bar_info`'s size).
    fn bar_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()>;
    /// ioeventfds of BAR `index` (none by default).
    fn bar_io_fds(&self, index: u32) -> Result<Vec<IoEventFd>> {
        let _ = index;
        Ok(Vec::new())
    }
    /// Return the registers to their reset values (the PCI state is reset by the
    /// function).
    fn reset_registers(&self) {}
    /// The DMA port of a device that does DMA.
    fn dma_port(&self) -> Option<&DmaPort> {
        None
    }
}

impl<T: PciDevice> VfioDevice for T {
    fn info(&self) -> DeviceInfo {
        self.pci().device_info()
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.pci().region_info(index, |i| self.bar_info(i))
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        if index == pci_index::CONFIG {
            return self.pci().config_read(offset, buf);
        }
        self.region_info(index)?.check(offset, buf.len())?;
        self.bar_read(index, offset, buf)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        if index == pci_index::CONFIG {
            return self.pci().config_write(offset, data);
        }
        self.region_info(index)?.check(offset, data.len())?;
        self.bar_write(index, offset, data)
    }
    fn region_io_fds(&self, index: u32) -> Result<Vec<IoEventFd>> {
        self.region_info(index)?;
        self.bar_io_fds(index)
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.pci().irq_info(index)
    }
    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        self.pci().set_irqs(index, action, start, count, data)
    }
    fn reset(&self) -> Result<()> {
        self.reset_registers();
        self.pci().reset();
        Ok(())
    }
    fn dma_port(&self) -> Option<&DmaPort> {
        PciDevice::dma_port(self)
    }
}
