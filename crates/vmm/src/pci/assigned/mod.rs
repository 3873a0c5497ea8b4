//! An assigned device: a [`VfioDevice`] wired into the VM as PCI function 00:NN.0.
//!
//! Three parts, one module each:
//! - `config`: configuration-space virtualisation (a shadow of the VMM-owned
//!   registers with write masks; everything else is the device's);
//! - `bars`: BAR placement and mapping (bus ranges, mmappable sparse areas as KVM
//!   memory slots, ioeventfds), following the guest's reprogramming;
//! - `interrupts`: INTx, MSI and MSI-X wired through the platform's
//!   [`crate::irqchip::IrqChip`] (the MSI-X table is `nestio_device_model`'s `MsixTable`).
//!
//! `AssignedDevice::new` reads the device's configuration space and hands it to each
//! part in turn. What the device reaches by DMA is the platform's
//! [`crate::iommu::DmaDomain`]'s decision: the device is attached to it under its
//! requester ID at creation and detached when it goes away.
//!
//! A device error that means the device is gone (disconnected, I/O error) is fatal for
//! the VM and names the device; any other refused access reads all-ones.

mod bars;
mod config;
mod interrupts;
mod migration;

pub use migration::PciMigState;

use parking_lot::Mutex;
use std::sync::{Arc, Weak};

use nestio_device_model::pci::MsixCap;
use nestio_device_model::{pci_index, DeviceError, IrqAction, IrqData, VfioDevice};

use super::{ConfigSpaceFunction, PciHostError, PciRoot};
use crate::bus::BusFault;
use crate::iommu::{DmaDomain, StreamId};
use bars::AssignedBar;
use config::{ConfigShadow, INTERRUPT_PIN};
use interrupts::{Intx, Msi, Msix};

/// Everything that changes under the guest's configuration writes.
struct State {
    cfg: ConfigShadow,
    bars: Vec<AssignedBar>,
    msi: Option<Msi>,
    msix: Option<Msix>,
}

/// See the module documentation.
pub struct AssignedDevice {
    root: Weak<PciRoot>,
    slot: u8,
    name: String,
    dev: Arc<dyn VfioDevice>,
    config_size: u64,
    /// MSI-X table/PBA location (immutable; `None` without usable MSI-X), so a BAR
    /// access is classified without taking the state lock.
    msix_cap: Option<MsixCap>,
    state: Mutex<State>,
    lost: Mutex<Option<String>>,
    intx: Option<Intx>,
    intx_pin: u8,
    /// The DMA domain the device is attached to, under its requester ID.
    dma: Arc<dyn DmaDomain>,
    stream: StreamId,
}

use crate::region_map::is_fatal;

impl AssignedDevice {
    pub(super) fn new(
        root: Arc<PciRoot>,
        slot: u8,
        name: String,
        dev: Arc<dyn VfioDevice>,
    ) -> Result<Arc<Self>, PciHostError> {
        let derr = |message: String| PciHostError::Device {
            device: name.clone(),
            message,
        };
        if dev.info().flags & nestio_device_model::flags::PCI == 0 {
            return Err(derr(
                "it is not a PCI device (VFIO_DEVICE_FLAGS_PCI clear)".into(),
            ));
        }
        let (raw, config_size) = config::read_device_config(&*dev).map_err(derr)?;

        // DMA: whatever the platform's domain gives requester 00:slot.0.
        let (dma, stream) = (root.dma_domain().clone(), StreamId::pci(0, slot, 0));
        dma.attach(stream, dev.clone())
            .map_err(|e| derr(e.to_string()))?;
        let wired = Self::wire(&root, slot, &name, &dev, &raw);
        let (state, intx) = match wired {
            Ok(w) => w,
            Err(e) => {
                // Nothing keeps guest memory reachable from a device that is not attached.
                dma.detach(stream);
                return Err(e);
            }
        };
        let msix_cap = state.msix.as_ref().map(Msix::cap);
        let this = Arc::new(AssignedDevice {
            root: Arc::downgrade(&root),
            slot,
            name,
            dev,
            config_size,
            msix_cap,
            state: Mutex::new(state),
            lost: Mutex::new(None),
            intx,
            intx_pin: raw[INTERRUPT_PIN],
            dma,
            stream,
        });
        // Behind a vIOMMU the MSI addresses are IOVAs: translate them again when the
        // guest invalidates (crate::iommu::msi).
        let watcher: Arc<dyn crate::iommu::msi::MsiWatcher> = this.clone();
        this.dma
            .msi_translator()
            .watch(stream, Arc::downgrade(&watcher));
        Ok(this)
    }

    /// Configuration virtualisation, BARs and interrupts of a new device.
    fn wire(
        root: &Arc<PciRoot>,
        slot: u8,
        name: &str,
        dev: &Arc<dyn VfioDevice>,
        raw: &[u8; config::CFG],
    ) -> Result<(State, Option<Intx>), PciHostError> {
        let mut cfg = ConfigShadow::new(raw);
        // MSI-X first, so that no mmapped area covers its table or PBA.
        let msix = Msix::probe(&**dev, name, raw, &mut cfg);
        let msix_cap = msix.as_ref().map(Msix::cap);
        let bars = bars::build_bars(root, &**dev, name, raw, &mut cfg, msix_cap.as_ref())?;
        let pin = raw[INTERRUPT_PIN];
        let intx = interrupts::wire_intx(root, dev, slot, name, pin, &mut cfg)?;
        let msi = Msi::probe(&**dev, raw, &mut cfg);
        let state = State {
            cfg,
            bars,
            msi,
            msix,
        };
        Ok((state, intx))
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// PCI slot (device number on bus 0).
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn VfioDevice> {
        &self.dev
    }

    /// The interrupt controller's number of the INTx line (a GSI on x86), if wired.
    pub fn intx_gsi(&self) -> Option<u32> {
        self.intx.as_ref().map(|i| i.source.number())
    }

    /// INTx pin from configuration space (1 = INTA .. 4 = INTD; 0: none).
    pub fn intx_pin(&self) -> u8 {
        self.intx_pin
    }

    /// Where BAR `index` is mapped now (None: not decoded).
    pub fn bar_mapping(&self, index: u32) -> Option<(u64, u64)> {
        let st = self.lock();
        st.bars
            .iter()
            .find(|b| b.index() == index)
            .and_then(AssignedBar::mapping)
    }

    /// Number of mmapped (exit-free) areas of BAR `index`.
    pub fn mapped_areas(&self, index: u32) -> usize {
        let st = self.lock();
        st.bars
            .iter()
            .find(|b| b.index() == index)
            .map(AssignedBar::mapped_areas)
            .unwrap_or(0)
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// `Some((name, what))` once the device is seen dead: a fatal error on an earlier
    /// access, or now on a cheap probe (GET_IRQ_INFO, a round trip for a remote device),
    /// so that a guest waiting in HLT for an interrupt does not wait forever.
    pub fn check_alive(&self) -> Option<(String, String)> {
        let known = self.lost.lock().clone();
        if let Some(m) = known {
            return Some((self.name.clone(), m));
        }
        match self.dev.irq_info(pci_index::INTX_IRQ) {
            Err(e) if is_fatal(&e) => {
                let f = self.fault("liveness probe", e);
                Some((f.device, f.message))
            }
            _ => None,
        }
    }

    fn fault(&self, what: &str, e: DeviceError) -> BusFault {
        let message = format!("{what}: {e}");
        *self.lost.lock() = Some(message.clone());
        BusFault {
            device: self.name.clone(),
            message,
        }
    }
}

impl Drop for AssignedDevice {
    /// The VM is gone: stop the INTx thread, take every eventfd back from the device and
    /// unmap guest RAM from it (a device shared with others must not keep the RAM).
    fn drop(&mut self) {
        if let Some(i) = &self.intx {
            let _ = i.stop.write(1);
        }
        for index in [pci_index::INTX_IRQ, pci_index::MSI_IRQ, pci_index::MSIX_IRQ] {
            let _ = self
                .dev
                .set_irqs(index, IrqAction::Trigger, 0, 0, IrqData::None);
        }
        self.dma.detach(self.stream);
    }
}

impl ConfigSpaceFunction for Arc<AssignedDevice> {
    fn config_read(&self, reg: u16, data: &mut [u8]) -> Result<(), BusFault> {
        (**self).config_read_inner(reg, data)
    }
    fn config_write(&self, reg: u16, data: &[u8]) -> Result<(), BusFault> {
        AssignedDevice::config_write_inner(self, reg, data)
    }
}

#[cfg(test)]
mod wiring_tests;
