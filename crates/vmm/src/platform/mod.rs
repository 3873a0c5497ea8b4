//! Platform (non-PCI) devices: VFIO devices without PCI configuration space —
//! `VFIO_DEVICE_FLAGS_PLATFORM`, `_AMBA` and `_FSL_MC` (a DPAA2 object behind an
//! FSL-MC DPRC container) — attached at fixed MMIO addresses.
//!
//! There is no configuration space to discover them through, so the VMM places them:
//! every non-empty region of the device gets a page-aligned range of the platform MMIO
//! window ([`PlatformMmioAllocator`], by default [`PLATFORM_MMIO_WINDOW`]) and is
//! mapped there through the bus-neutral [`RegionMapper`] (a bus range of plain region
//! reads/writes, mmappable areas as memory slots, ioeventfds), and every interrupt of
//! the device becomes a wired source of the platform's [`IrqChip`]
//! ([`SourceRequest::PlatformLine`]) with the device's eventfd attached (edge
//! triggered). Its DMA is the platform's [`DmaDomain`]'s, under a platform
//! [`StreamId`] (the FSL-MC ICID's place). Where a device
//! landed is reported by [`PlatformDevice::placement`] and logged; a guest learns it
//! from the firmware description the platform gives it (a device tree node per device
//! on Arm/Power; an FSL-MC DPRC lists its objects) — the x86 payloads here are told by
//! their command line.
//!
//! # The platform MMIO window
//!
//! The guest physical map of this machine: RAM from 0 up to at most 3 GiB
//! ([`crate::memory::MAX_RAM`]), the PCI BAR window 3 GiB..3.5 GiB
//! ([`crate::pci::MMIO_WINDOW`]), ECAM at 3.5 GiB (1 MiB), the platform window
//! 0xe800_0000..0xf000_0000 (128 MiB), the IOAPIC at 0xfec0_0000, the LAPIC at
//! 0xfee0_0000, KVM's TSS at 0xfffb_d000, and 64-bit PCI BARs between 4 GiB and 1 TiB.
//! [`PlatformMmioAllocator::new`] refuses a window that overlaps any of these.

pub mod fsl_mc;

use parking_lot::Mutex;
use std::sync::Arc;

use nestio_device_model::{flags, irq_flags, IrqAction, IrqData, VfioDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::address_space::IoSpace;
use crate::iommu::{DmaDomain, StreamId};
use crate::irqchip::{IrqChip, IrqChipError, IrqSource, SourceRequest};
use crate::region_map::{
    is_fatal, owned_dup, PreparedRegion, RegionIo, RegionMapError, RegionMapper, PAGE,
};

/// The default platform MMIO window: `(start, end)`, end exclusive.
pub const PLATFORM_MMIO_WINDOW: (u64, u64) = (0xe800_0000, 0xf000_0000);

/// The device flags that make a device a platform device.
pub const PLATFORM_FLAGS: u32 = flags::PLATFORM | flags::AMBA | flags::FSL_MC;

/// Guest-physical ranges a platform window must not overlap: `(start, end, what)`.
const RESERVED: [(u64, u64, &str); 7] = [
    (0, crate::memory::MAX_RAM, "guest RAM"),
    (
        crate::pci::MMIO_WINDOW.0,
        crate::pci::MMIO_WINDOW.1,
        "the PCI BAR window",
    ),
    (
        crate::pci::ECAM_BASE,
        crate::pci::ECAM_BASE + crate::pci::ECAM_SIZE,
        "PCI ECAM",
    ),
    (0xfec0_0000, 0xfec0_1000, "the IOAPIC"),
    (0xfee0_0000, 0xfee0_1000, "the LAPIC"),
    (0xfffb_d000, 0xfffc_0000, "KVM's TSS"),
    (1 << 32, 1 << 40, "the 64-bit PCI BAR window"),
];

/// Errors of platform devices.
#[derive(Debug, thiserror::Error)]
pub enum PlatformDeviceError {
    /// A platform MMIO window that cannot be used.
    #[error("platform MMIO window of {size:#x} bytes at {base:#x} refused: {reason}")]
    Window {
        /// Start.
        base: u64,
        /// Size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// The window has no room left.
    #[error("cannot attach {device}: the platform MMIO window has no room for region {index} ({size:#x} bytes); attach fewer or smaller platform devices")]
    WindowFull {
        /// Device.
        device: String,
        /// Region index.
        index: u32,
        /// Size.
        size: u64,
    },
    /// The device's description is unusable.
    #[error("cannot attach {device}: {message}")]
    Device {
        /// Device.
        device: String,
        /// Why.
        message: String,
    },
    /// Mapping a region failed.
    #[error("cannot attach {device}: {err}")]
    Region {
        /// Device.
        device: String,
        /// Cause.
        err: RegionMapError,
    },
    /// Wiring an interrupt failed.
    #[error("cannot attach {device}: {err}")]
    Irq {
        /// Device.
        device: String,
        /// Cause.
        err: IrqChipError,
    },
}

/// A bump allocator of page-aligned ranges in the platform MMIO window. See the module
/// documentation for where the window may lie.
#[derive(Debug)]
pub struct PlatformMmioAllocator {
    next: u64,
    end: u64,
}

impl PlatformMmioAllocator {
    /// A window of `size` bytes at `base`: both page aligned, non-empty, not wrapping,
    /// and clear of RAM, the PCI windows, ECAM, the IOAPIC / LAPIC and KVM's TSS.
    pub fn new(base: u64, size: u64) -> Result<Self, PlatformDeviceError> {
        let refuse = |reason: String| PlatformDeviceError::Window { base, size, reason };
        if size == 0 {
            return Err(refuse("it is empty".into()));
        }
        if !base.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
            return Err(refuse("base and size must be multiples of 4 KiB".into()));
        }
        let end = base
            .checked_add(size)
            .ok_or_else(|| refuse("it wraps around the address space".into()))?;
        if let Some((_, _, what)) = RESERVED.iter().find(|(s, e, _)| base < *e && *s < end) {
            return Err(refuse(format!("it overlaps {what}")));
        }
        Ok(PlatformMmioAllocator { next: base, end })
    }

    /// The default window, [`PLATFORM_MMIO_WINDOW`].
    pub fn default_window() -> Self {
        PlatformMmioAllocator {
            next: PLATFORM_MMIO_WINDOW.0,
            end: PLATFORM_MMIO_WINDOW.1,
        }
    }

    /// A page-aligned range of `size` bytes (rounded up to whole pages), or `None`
    /// when it does not fit.
    pub fn alloc(&mut self, size: u64) -> Option<u64> {
        if size == 0 {
            return None;
        }
        let len = size.checked_next_multiple_of(PAGE)?;
        let base = self.next;
        let end = base.checked_add(len).filter(|&e| e <= self.end)?;
        self.next = end;
        Some(base)
    }
}

/// Where one region of a platform device landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionPlacement {
    /// The device's region index.
    pub index: u32,
    /// Guest physical address.
    pub addr: u64,
    /// Size of the guest range (the region's size rounded up to pages).
    pub size: u64,
    /// Mmapped areas mapped as memory slots (no exits).
    pub mapped_areas: usize,
}

/// Where one interrupt of a platform device is wired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqPlacement {
    /// The device's interrupt index.
    pub index: u32,
    /// The interrupt controller's source number (an x86 GSI).
    pub source: u32,
}

/// Where a platform device landed in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    /// Its regions.
    pub regions: Vec<RegionPlacement>,
    /// Its interrupts.
    pub irqs: Vec<IrqPlacement>,
}

/// A platform device attached to the VM. See the module documentation.
pub struct PlatformDevice {
    name: String,
    dev: Arc<dyn VfioDevice>,
    mapper: Arc<RegionMapper>,
    irqchip: Arc<dyn IrqChip>,
    dma: Arc<dyn DmaDomain>,
    stream: StreamId,
    regions: Vec<(PreparedRegion, u64)>,
    irqs: Vec<(IrqSource, EventFd)>,
    placement: Placement,
    lost: Arc<Mutex<Option<String>>>,
}

impl PlatformDevice {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The device.
    pub fn device(&self) -> &Arc<dyn VfioDevice> {
        &self.dev
    }
    /// Where its regions and interrupts are.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }
    /// `Some((name, what))` once the device is seen dead: a fatal error on an earlier
    /// access, or now on a cheap probe (REGION_INFO, a round trip for a remote device),
    /// so that a guest waiting for an interrupt does not wait forever.
    pub fn check_alive(&self) -> Option<(String, String)> {
        let mut lost = self.lost.lock();
        if lost.is_none() {
            if let Some(e) = self.dev.region_info(0).err().filter(is_fatal) {
                *lost = Some(format!("liveness probe: {e}"));
            }
        }
        lost.clone().map(|m| (self.name.clone(), m))
    }
}

impl Drop for PlatformDevice {
    /// Take the regions out of the guest, the eventfds (from the device and the
    /// interrupt controller) and guest RAM back from the device.
    fn drop(&mut self) {
        for (r, addr) in &self.regions {
            self.mapper.unmap(r, *addr);
        }
        let mut indices: Vec<u32> = self.placement.irqs.iter().map(|i| i.index).collect();
        indices.dedup();
        for index in indices {
            let _ = self
                .dev
                .set_irqs(index, IrqAction::Trigger, 0, 0, IrqData::None);
        }
        for (source, fd) in &self.irqs {
            let _ = self.irqchip.detach(*source, fd);
        }
        self.dma.detach(self.stream);
    }
}

/// The platform devices of a VM and what they share: the MMIO window, the region
/// mapper and the interrupt controller.
pub struct PlatformBus {
    irqchip: Arc<dyn IrqChip>,
    mapper: Arc<RegionMapper>,
    dma: Arc<dyn DmaDomain>,
    window: Mutex<PlatformMmioAllocator>,
    devices: Mutex<Vec<Arc<PlatformDevice>>>,
}

impl PlatformBus {
    /// An empty platform bus placing devices in `window`, their interrupts in
    /// `irqchip` and their DMA in `dma`.
    pub fn new(
        irqchip: Arc<dyn IrqChip>,
        mapper: Arc<RegionMapper>,
        dma: Arc<dyn DmaDomain>,
        window: PlatformMmioAllocator,
    ) -> Self {
        PlatformBus {
            irqchip,
            mapper,
            dma,
            window: Mutex::new(window),
            devices: Mutex::new(Vec::new()),
        }
    }

    /// The region mapper (and through it the buses).
    pub fn mapper(&self) -> &Arc<RegionMapper> {
        &self.mapper
    }

    /// Attached devices.
    pub fn devices(&self) -> Vec<Arc<PlatformDevice>> {
        self.devices.lock().clone()
    }

    /// First device found dead: (name, what happened).
    pub fn check_devices(&self) -> Option<(String, String)> {
        self.devices().iter().find_map(|d| d.check_alive())
    }

    /// Attach `dev` (a device with one of [`PLATFORM_FLAGS`]): attached to the DMA
    /// domain under the next platform stream ID (0, 1, ... in attach order), each
    /// non-empty region mapped in the platform window, each interrupt wired.
    pub fn attach(
        &self,
        name: String,
        dev: Arc<dyn VfioDevice>,
    ) -> Result<Arc<PlatformDevice>, PlatformDeviceError> {
        let derr = |message: String| PlatformDeviceError::Device {
            device: name.clone(),
            message,
        };
        let info = dev.info();
        if info.flags & PLATFORM_FLAGS == 0 {
            return Err(derr(
                "it is not a platform device (none of VFIO_DEVICE_FLAGS_PLATFORM / AMBA / FSL_MC)"
                    .into(),
            ));
        }
        let mut devices = self.devices.lock();
        let stream = StreamId::Platform(devices.len() as u32);
        self.dma
            .attach(stream, dev.clone())
            .map_err(|e| derr(e.to_string()))?;
        let lost = Arc::new(Mutex::new(None));
        let mut pd = PlatformDevice {
            name: name.clone(),
            dev: dev.clone(),
            mapper: self.mapper.clone(),
            irqchip: self.irqchip.clone(),
            dma: self.dma.clone(),
            stream,
            regions: Vec::new(),
            irqs: Vec::new(),
            placement: Placement::default(),
            lost: lost.clone(),
        };
        // On an error below, dropping `pd` unmaps what was mapped so far.
        for index in 0..info.num_regions {
            let ri = dev
                .region_info(index)
                .map_err(|e| derr(format!("region {index}: {e}")))?;
            if ri.size == 0 {
                continue;
            }
            let addr = self.window.lock().alloc(ri.size).ok_or_else(|| {
                PlatformDeviceError::WindowFull {
                    device: name.clone(),
                    index,
                    size: ri.size,
                }
            })?;
            let len = ri.size.next_multiple_of(PAGE);
            let rerr = |err| PlatformDeviceError::Region {
                device: name.clone(),
                err,
            };
            let region = self
                .mapper
                .prepare(&*dev, index, IoSpace::Mmio, &name, &|_, _| false)
                .map_err(rerr)?;
            let handler = Arc::new(RegionIo::new(&dev, &name, index, ri.size, lost.clone()));
            self.mapper
                .map(&region, addr, len, handler, &name)
                .map_err(rerr)?;
            pd.placement.regions.push(RegionPlacement {
                index,
                addr,
                size: len,
                mapped_areas: region.mapped_areas(),
            });
            pd.regions.push((region, addr));
        }
        for index in 0..info.num_irqs {
            let Ok(ii) = dev.irq_info(index) else {
                continue;
            };
            if ii.count == 0 || ii.flags & irq_flags::EVENTFD == 0 {
                continue;
            }
            let mut fds = Vec::new();
            for _ in 0..ii.count {
                let ierr = |err| PlatformDeviceError::Irq {
                    device: name.clone(),
                    err,
                };
                let source = self
                    .irqchip
                    .allocate(SourceRequest::PlatformLine)
                    .map_err(ierr)?;
                let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| derr(e.to_string()))?;
                self.irqchip.attach(source, &fd, None).map_err(ierr)?;
                fds.push(Some(owned_dup(&fd).map_err(|e| derr(e.to_string()))?));
                pd.placement.irqs.push(IrqPlacement {
                    index,
                    source: source.number(),
                });
                pd.irqs.push((source, fd));
            }
            dev.set_irqs(
                index,
                IrqAction::Trigger,
                0,
                ii.count,
                IrqData::Eventfd(fds),
            )
            .map_err(|e| {
                if is_fatal(&e) {
                    derr(format!("the device is gone: {e}"))
                } else {
                    derr(format!("SET_IRQS({index}) refused: {e}"))
                }
            })?;
        }
        tracing::info!(
            device = %name,
            regions = ?pd.placement.regions.iter().map(|r| (r.index, format!("{:#x}+{:#x}", r.addr, r.size))).collect::<Vec<_>>(),
            irqs = ?pd.placement.irqs.iter().map(|i| (i.index, i.source)).collect::<Vec<_>>(),
            "platform device attached"
        );
        let pd = Arc::new(pd);
        devices.push(pd.clone());
        Ok(pd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_constructor_refuses_bad_ranges() {
        let ok = PlatformMmioAllocator::new(PLATFORM_MMIO_WINDOW.0, 0x10_0000);
        assert!(ok.is_ok());
        for (base, size, why) in [
            (0xe800_0000, 0, "empty"),
            (0xe800_0800, 0x1000, "4 KiB"),
            (0xe800_0000, 0x800, "4 KiB"),
            (u64::MAX - 0xfff, 0x2000, "wraps"),
            (0x1000_0000, 0x1000, "guest RAM"),
            (0xdfff_f000, 0x2000, "PCI BAR window"),
            (0xe000_0000, 0x1000, "ECAM"),
            (0xfec0_0000, 0x1000, "IOAPIC"),
            (0xfe00_0000, 0x100_0000, "IOAPIC"),
            (0xfee0_0000, 0x1000, "LAPIC"),
            (0xfffb_e000, 0x1000, "TSS"),
            (0x1_0000_0000, 0x1000, "64-bit"),
        ] {
            let e = PlatformMmioAllocator::new(base, size)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{base:#x}+{size:#x}: {e}");
        }
        // Above the 64-bit BAR window is fine.
        assert!(PlatformMmioAllocator::new(1 << 40, 1 << 20).is_ok());
    }

    #[test]
    fn window_hands_out_page_aligned_ranges_until_full() {
        let mut w = PlatformMmioAllocator::new(0xe800_0000, 0x4000).unwrap();
        assert_eq!(w.alloc(0), None);
        assert_eq!(w.alloc(1), Some(0xe800_0000));
        assert_eq!(w.alloc(0x1001), Some(0xe800_1000));
        assert_eq!(w.alloc(0x2000), None, "only one page left");
        assert_eq!(w.alloc(0x1000), Some(0xe800_3000));
        assert_eq!(w.alloc(1), None);
        assert_eq!(w.alloc(u64::MAX), None);
        let mut d = PlatformMmioAllocator::default_window();
        assert_eq!(d.alloc(0x1000), Some(PLATFORM_MMIO_WINDOW.0));
        assert!(PlatformMmioAllocator::new(
            PLATFORM_MMIO_WINDOW.0,
            PLATFORM_MMIO_WINDOW.1 - PLATFORM_MMIO_WINDOW.0
        )
        .is_ok());
    }
}
