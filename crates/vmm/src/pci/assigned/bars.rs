//! BAR mapping of an assigned device.
//!
//! Sizes come from the device's region info (rounded up to a power of two, at least
//! 4 KiB for memory so areas can be mapped), type bits from its BAR registers. The VMM
//! assigns addresses at creation, as firmware would, and follows the guest's
//! reprogramming: a BAR is mapped only while its decode bit is on in the command
//! register and it lies inside a BAR window. A mapped BAR is (1) a bus range whose
//! accesses become region reads/writes (offsets checked against the region size; the
//! rest of a rounded-up BAR reads all-ones; MSI-X table and PBA accesses are the
//! VMM's, see [`super::interrupts`]), (2) one KVM memory slot per mmappable sparse area
//! (the guest touches the device's memory with no exit; an area that would cover the
//! MSI-X table or PBA is left to exits), and (3) the device's ioeventfds. (2) and (3)
//! are the bus-neutral [`crate::region_map::RegionMapper`]'s work.

use std::sync::{Arc, Weak};

use nestio_device::pci::MsixCap;
use nestio_device::VfioDevice;

use super::config::ConfigShadow;
use super::{is_fatal, AssignedDevice, State};
use crate::address_space::IoSpace;
use crate::bus::{BusDevice, BusFault};
use crate::pci::{PciHostError, PciRoot, MMIO_WINDOW};
use crate::region_map::{PreparedRegion, PAGE};

/// Largest memory BAR the VMM places (1 GiB) and largest I/O BAR (4 KiB).
const MAX_MEM_BAR: u64 = 1 << 30;
const MAX_IO_BAR: u64 = 0x1000;

/// One BAR of an assigned device, as the VMM placed it.
pub(super) struct AssignedBar {
    index: u32,
    io: bool,
    is64: bool,
    size: u64,
    mapped: Option<u64>,
    /// The device region behind the BAR, prepared by the region mapper.
    region: PreparedRegion,
}

impl AssignedBar {
    /// The BAR index.
    pub(super) fn index(&self) -> u32 {
        self.index
    }
    /// `(guest address, size)` while decoded.
    pub(super) fn mapping(&self) -> Option<(u64, u64)> {
        self.mapped.map(|a| (a, self.size))
    }
    /// Number of mmapped (exit-free) areas.
    pub(super) fn mapped_areas(&self) -> usize {
        self.region.mapped_areas()
    }
    /// The guest address the BAR registers hold now.
    fn programmed_address(&self, cfg: &ConfigShadow) -> u64 {
        let off = 0x10 + 4 * self.index as usize;
        let lo = cfg.u32(off);
        let mut addr = if self.io {
            (lo & !3) as u64
        } else {
            (lo & !0xf) as u64
        };
        if self.is64 {
            addr |= (cfg.u32(off + 4) as u64) << 32;
        }
        addr
    }
    /// Whether `addr` is a place the VMM decodes this BAR at.
    fn placeable(&self, addr: u64) -> bool {
        addr != 0
            && addr.checked_add(self.size).is_some_and(|end| {
                if self.io {
                    addr >= 0x1000 && end <= 0x1_0000
                } else {
                    (addr >= MMIO_WINDOW.0 && end <= MMIO_WINDOW.1)
                        || (addr >= 1 << 32 && end <= 1 << 40)
                }
            })
    }
}

/// Size, place and describe the device's BARs 0..6; their registers in `cfg` become
/// virtual with the assigned addresses. Mmappable areas are mmapped now (mapped into
/// the guest only while decoded), except over the MSI-X table or PBA.
pub(super) fn build_bars(
    root: &PciRoot,
    dev: &dyn VfioDevice,
    name: &str,
    raw: &[u8; super::config::CFG],
    cfg: &mut ConfigShadow,
    msix: Option<&MsixCap>,
) -> Result<Vec<AssignedBar>, PciHostError> {
    let derr = |message: String| PciHostError::Device {
        device: name.into(),
        message,
    };
    let mut bars = Vec::new();
    let mut i = 0u32;
    while i < 6 {
        let ri = dev
            .region_info(i)
            .map_err(|e| derr(format!("region {i}: {e}")))?;
        let off = 0x10 + 4 * i as usize;
        let reg = u32::from_le_bytes([raw[off], raw[off + 1], raw[off + 2], raw[off + 3]]);
        if ri.size == 0 {
            i += 1;
            continue;
        }
        let io = reg & 1 == 1;
        let is64 = !io && (reg >> 1) & 3 == 2 && i < 5;
        let min = if io { 4 } else { PAGE };
        let size = ri
            .size
            .checked_next_power_of_two()
            .map(|s| s.max(min))
            .filter(|&s| s <= if io { MAX_IO_BAR } else { MAX_MEM_BAR })
            .ok_or_else(|| derr(format!("BAR {i} size {:#x} is too large", ri.size)))?;
        let addr = root
            .alloc_bar(io, size)
            .ok_or_else(|| PciHostError::Exhausted {
                device: name.into(),
                what: if io {
                    "the I/O BAR window"
                } else {
                    "the MMIO BAR window"
                },
            })?;
        let type_bits = if io { 1 } else { reg & 0xe };
        let low_mask: u32 = !(size as u32 - 1) & if io { !3 } else { !0xf };
        cfg.set_virtual(
            off,
            &((addr as u32) | type_bits).to_le_bytes(),
            &low_mask.to_le_bytes(),
        );
        if is64 {
            cfg.set_virtual(
                off + 4,
                &((addr >> 32) as u32).to_le_bytes(),
                &u32::MAX.to_le_bytes(),
            );
        }
        let space = if io { IoSpace::Pio } else { IoSpace::Mmio };
        let keep_out = |offset, size| msix.is_some_and(|m| covers_msix(m, i, offset, size));
        let region = root
            .mapper()
            .prepare(dev, i, space, name, &keep_out)
            .map_err(|e| derr(e.to_string()))?;
        let bar = AssignedBar {
            index: i,
            io,
            is64,
            size,
            mapped: None,
            region,
        };
        bars.push(bar);
        i += if is64 { 2 } else { 1 };
    }
    Ok(bars)
}

/// Whether area `[offset, offset + size)` of BAR `bar` would cover a page of the MSI-X
/// table or PBA.
fn covers_msix(m: &MsixCap, bar: u32, offset: u64, size: u64) -> bool {
    [
        (m.table_bar(), m.table_offset(), m.table_len()),
        (m.pba_bar(), m.pba_offset(), m.pba_len()),
    ]
    .into_iter()
    .any(|(b, lo, len)| {
        b == bar as usize && offset < lo + len && lo & !(PAGE - 1) < offset.saturating_add(size)
    })
}

impl AssignedDevice {
    /// Re-map BARs after a BAR or command register change.
    pub(super) fn update_bars(self: &Arc<Self>, st: &mut State) {
        let Some(root) = self.root.upgrade() else {
            return;
        };
        let command = st.cfg.command();
        for bar in st.bars.iter_mut() {
            let addr = bar.programmed_address(&st.cfg);
            let decode = command & if bar.io { 1 } else { 2 } != 0;
            let want = (decode && bar.placeable(addr)).then_some(addr);
            if want == bar.mapped {
                continue;
            }
            if let Some(old) = bar.mapped.take() {
                self.unmap_bar(&root, bar, old);
            }
            if let Some(new) = want {
                if self.map_bar(&root, bar, new) {
                    bar.mapped = Some(new);
                }
            }
        }
    }

    fn map_bar(self: &Arc<Self>, root: &PciRoot, bar: &AssignedBar, addr: u64) -> bool {
        let handler = Arc::new(BarIo {
            dev: Arc::downgrade(self),
            index: bar.index,
            region_size: bar.region.size(),
        });
        match root
            .mapper()
            .map(&bar.region, addr, bar.size, handler, &self.name)
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(device = %self.name, bar = bar.index, addr, error = %e, "guest placed a BAR over another device; not decoded");
                false
            }
        }
    }

    fn unmap_bar(&self, root: &PciRoot, bar: &AssignedBar, addr: u64) {
        root.mapper().unmap(&bar.region, addr);
    }

    fn region_access(
        &self,
        index: u32,
        region_size: u64,
        offset: u64,
        read: Option<&mut [u8]>,
        write: Option<&[u8]>,
    ) -> Result<(), BusFault> {
        let len = crate::pci::access_len(&read, write) as u64;
        let inside = offset.checked_add(len).is_some_and(|e| e <= region_size);
        let (read, write) = match self.msix_access(index, offset, len, read, write) {
            None => return Ok(()),
            Some(rw) => rw,
        };
        match (read, write) {
            (Some(d), _) => {
                if !inside {
                    d.fill(0xff);
                    return Ok(());
                }
                if let Err(e) = self.dev.region_read(index, offset, d) {
                    if is_fatal(&e) {
                        return Err(self.fault(&format!("read of BAR {index} at {offset:#x}"), e));
                    }
                    tracing::debug!(device = %self.name, error = %e, "BAR read refused");
                    d.fill(0xff);
                }
                Ok(())
            }
            (None, Some(d)) => {
                if !inside {
                    return Ok(());
                }
                if let Err(e) = self.dev.region_write(index, offset, d) {
                    if is_fatal(&e) {
                        return Err(self.fault(&format!("write of BAR {index} at {offset:#x}"), e));
                    }
                    tracing::debug!(device = %self.name, error = %e, "BAR write refused");
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Accesses to a mapped BAR.
struct BarIo {
    dev: Weak<AssignedDevice>,
    index: u32,
    region_size: u64,
}

impl BusDevice for BarIo {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        match self.dev.upgrade() {
            Some(d) => d.region_access(self.index, self.region_size, offset, Some(data), None),
            None => {
                data.fill(0xff);
                Ok(())
            }
        }
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
        match self.dev.upgrade() {
            Some(d) => d.region_access(self.index, self.region_size, offset, None, Some(data)),
            None => Ok(()),
        }
    }
}
