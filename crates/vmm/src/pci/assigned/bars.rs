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
//! MSI-X table or PBA is left to exits), and (3) the device's ioeventfds.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Weak};

use nestio_device::pci::MsixCap;
use nestio_device::{region_flags, VfioDevice};
use vmm_sys_util::eventfd::EventFd;

use super::config::ConfigShadow;
use super::interrupts::dup_eventfd;
use super::{is_fatal, AssignedDevice, State};
use crate::address_space::{IoEventSpec, IoSpace};
use crate::bus::{Bus, BusDevice, BusFault, BusRange};
use crate::pci::{PciError, PciRoot, MMIO_WINDOW};

const PAGE: u64 = 4096;
/// Largest memory BAR the VMM places (1 GiB) and largest I/O BAR (4 KiB).
const MAX_MEM_BAR: u64 = 1 << 30;
const MAX_IO_BAR: u64 = 0x1000;

/// One mmapped sparse area of a BAR.
struct MmapArea {
    offset: u64,
    size: u64,
    host: usize,
    slot: u32,
}

impl Drop for MmapArea {
    fn drop(&mut self) {
        // SAFETY: `host`/`size` came from a successful mmap owned by this value.
        unsafe { libc::munmap(self.host as *mut libc::c_void, self.size as usize) };
    }
}

struct IoEvent {
    offset: u64,
    datamatch: Option<(u64, u64)>,
    fd: EventFd,
}

/// One BAR of an assigned device, as the VMM placed it.
pub(super) struct AssignedBar {
    index: u32,
    io: bool,
    is64: bool,
    size: u64,
    region_size: u64,
    mapped: Option<u64>,
    areas: Vec<MmapArea>,
    ioevents: Vec<IoEvent>,
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
        self.areas.len()
    }
    /// The bus the BAR decodes on.
    fn bus<'r>(&self, root: &'r PciRoot) -> &'r Arc<Bus> {
        if self.io {
            root.pio_bus()
        } else {
            root.mmio_bus()
        }
    }
    /// The ioeventfd at guest address `addr` inside this BAR.
    fn ioevent_spec(&self, addr: u64, datamatch: Option<(u64, u64)>) -> IoEventSpec {
        IoEventSpec {
            space: if self.io { IoSpace::Pio } else { IoSpace::Mmio },
            addr,
            datamatch,
        }
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
) -> Result<Vec<AssignedBar>, PciError> {
    let derr = |message: String| PciError::Device {
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
            .ok_or_else(|| PciError::Exhausted {
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
        let mut bar = AssignedBar {
            index: i,
            io,
            is64,
            size,
            region_size: ri.size,
            mapped: None,
            areas: Vec::new(),
            ioevents: Vec::new(),
        };
        if let (false, true, Some(fd)) = (io, ri.flags & region_flags::MMAP != 0, &ri.fd) {
            let areas = if ri.sparse.is_empty() {
                vec![nestio_device::SparseArea {
                    offset: 0,
                    size: ri.size,
                }]
            } else {
                ri.sparse.clone()
            };
            for a in areas {
                if msix.is_some_and(|m| covers_msix(m, i, a.offset, a.size)) {
                    tracing::info!(device = %name, bar = i, "sparse area overlaps the MSI-X table/PBA; left to exits");
                    continue;
                }
                match map_area(root, fd, ri.fd_offset, ri.size, a.offset, a.size) {
                    Ok(m) => bar.areas.push(m),
                    Err(why) => tracing::warn!(
                        device = %name, bar = i, offset = a.offset, size = a.size,
                        "sparse area not mapped, accesses will exit: {why}"
                    ),
                }
            }
        }
        match dev.region_io_fds(i) {
            Ok(fds) => {
                for e in fds {
                    let end = e.offset.checked_add(e.size);
                    if !matches!(e.size, 1 | 2 | 4 | 8) || end.is_none_or(|x| x > ri.size) {
                        tracing::warn!(device = %name, bar = i, offset = e.offset, "ioeventfd outside its region ignored");
                        continue;
                    }
                    let fd = dup_eventfd(&*e.fd).map_err(|e| derr(format!("ioeventfd: {e}")))?;
                    bar.ioevents.push(IoEvent {
                        offset: e.offset,
                        datamatch: e.datamatch.map(|d| (d, e.size)),
                        fd,
                    });
                }
            }
            Err(e) => tracing::debug!(device = %name, bar = i, error = %e, "no ioeventfds"),
        }
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

fn map_area(
    root: &PciRoot,
    fd: &OwnedFd,
    fd_offset: u64,
    region_size: u64,
    offset: u64,
    size: u64,
) -> Result<MmapArea, String> {
    if size == 0 || !offset.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
        return Err("not page aligned".into());
    }
    if offset.checked_add(size).is_none_or(|e| e > region_size) {
        return Err("outside the region".into());
    }
    let file_off = fd_offset
        .checked_add(offset)
        .filter(|o| *o <= i64::MAX as u64)
        .ok_or("file offset overflows")?;
    let slot = root.alloc_slot().ok_or("out of KVM memory slots")?;
    // SAFETY: a fresh shared mapping of the device's fd; checked for failure; owned by
    // the returned MmapArea (built exactly once), which unmaps it on drop.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            file_off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    Ok(MmapArea {
        offset,
        size,
        host: p as usize,
        slot,
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
        let bus = bar.bus(root);
        let Ok(range) = BusRange::new(addr, bar.size) else {
            return false;
        };
        let handler = Arc::new(BarIo {
            dev: Arc::downgrade(self),
            index: bar.index,
            region_size: bar.region_size,
        });
        if let Err(e) = bus.insert(range, handler) {
            tracing::warn!(device = %self.name, bar = bar.index, addr, error = %e, "guest placed a BAR over another device; not decoded");
            return false;
        }
        for a in &bar.areas {
            // SAFETY: the area is a live mmap owned by this device, unmapped from KVM
            // (size 0) before the mmap goes away.
            let r = unsafe {
                root.space()
                    .set_memory_slot(a.slot, addr + a.offset, a.size, a.host as u64)
            };
            if let Err(e) = r {
                tracing::warn!(device = %self.name, bar = bar.index, error = %e, "cannot map sparse area into the guest; accesses will exit");
            }
        }
        for ev in &bar.ioevents {
            let spec = bar.ioevent_spec(addr + ev.offset, ev.datamatch);
            if let Err(e) = root.space().register_ioevent(&ev.fd, &spec) {
                tracing::warn!(device = %self.name, bar = bar.index, error = %e, "cannot register ioeventfd; writes will exit");
            }
        }
        true
    }

    fn unmap_bar(&self, root: &PciRoot, bar: &AssignedBar, addr: u64) {
        let bus = bar.bus(root);
        bus.remove(addr);
        for a in &bar.areas {
            // SAFETY: removing a slot (size 0) never gives KVM new memory.
            let _ = unsafe {
                root.space()
                    .set_memory_slot(a.slot, addr + a.offset, 0, a.host as u64)
            };
        }
        for ev in &bar.ioevents {
            let spec = bar.ioevent_spec(addr + ev.offset, ev.datamatch);
            let _ = root.space().unregister_ioevent(&ev.fd, &spec);
        }
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
