//! The bus-neutral region mapper: how one region of a [`VfioDevice`] appears in the
//! guest's address space, whichever bus placed it (a PCI BAR, a platform device's MMIO
//! window).
//!
//! A region is mapped in three layers, as vfio-pci VMMs do:
//! 1. a **bus range** (PIO or MMIO) whose accesses reach a handler the caller supplies
//!    (PCI BARs intercept the MSI-X table; platform regions use [`RegionIo`], plain
//!    region reads/writes checked against the region size);
//! 2. one **memory slot** per mmappable sparse area (the guest touches the device's
//!    memory with no exit); areas are mmapped once, at [`RegionMapper::prepare`], and
//!    go in and out of the guest with [`RegionMapper::map`] / [`RegionMapper::unmap`]
//!    as the bus moves the region;
//! 3. the device's **ioeventfds** (guest writes that become eventfd signals).
//!
//! The mapper owns the memory-slot numbers (slot 0 is guest RAM) and talks to KVM
//! through [`VmAddressSpace`], so it is testable without `/dev/kvm`.

use parking_lot::Mutex;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Weak};

use nestio_device_model::{region_flags, DeviceError, VfioDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::address_space::{IoEventSpec, IoSpace, VmAddressSpace};
use crate::bus::{Bus, BusDevice, BusError, BusFault, BusRange};

/// Page size: mmapped areas must be page aligned.
pub const PAGE: u64 = 4096;
/// First memory slot the mapper hands out (0 is guest RAM).
const FIRST_SLOT: u32 = 1;
/// Slots the mapper hands out up to (KVM supports at least 509 user slots).
const SLOT_LIMIT: u32 = 500;

/// Errors of the region mapper.
#[derive(Debug, thiserror::Error)]
pub enum RegionMapError {
    /// The device's description of the region is unusable.
    #[error("region {index}: {message}")]
    Region {
        /// Region index.
        index: u32,
        /// Why.
        message: String,
    },
    /// The guest range is taken or invalid.
    #[error("region {index} at {addr:#x}: {err}")]
    Bus {
        /// Region index.
        index: u32,
        /// Guest address.
        addr: u64,
        /// Cause.
        err: BusError,
    },
}

/// One mmapped sparse area of a region.
struct MmapArea {
    offset: u64,
    size: u64,
    host: usize,
    slot: u32,
}

impl Drop for MmapArea {
    fn drop(&mut self) {
        // SAFETY: `host`/`size` came from a successful mmap owned by this value; its
        // memory slot was removed by `RegionMapper::unmap` before (the owner unmaps a
        // mapped region before dropping it).
        unsafe { libc::munmap(self.host as *mut libc::c_void, self.size as usize) };
    }
}

struct IoEvent {
    offset: u64,
    datamatch: Option<(u64, u64)>,
    fd: EventFd,
}

/// A region prepared for mapping: its mmapped areas and ioeventfds.
pub struct PreparedRegion {
    index: u32,
    space: IoSpace,
    size: u64,
    areas: Vec<MmapArea>,
    ioevents: Vec<IoEvent>,
}

impl PreparedRegion {
    /// The device's region index.
    pub fn index(&self) -> u32 {
        self.index
    }
    /// The region's size (the device's, before any rounding by the bus).
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Number of mmapped (exit-free) areas.
    pub fn mapped_areas(&self) -> usize {
        self.areas.len()
    }
    /// Memory slots of the mmapped areas, with their offsets in the region.
    pub fn slots(&self) -> Vec<(u64, u32)> {
        self.areas.iter().map(|a| (a.offset, a.slot)).collect()
    }
    fn ioevent_spec(&self, addr: u64, ev: &IoEvent) -> IoEventSpec {
        IoEventSpec {
            space: self.space,
            addr: addr + ev.offset,
            datamatch: ev.datamatch,
        }
    }
}

/// See the module documentation.
pub struct RegionMapper {
    space: Arc<dyn VmAddressSpace>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    next_slot: Mutex<u32>,
}

pub(crate) fn dup_eventfd(fd: &impl AsRawFd) -> std::io::Result<EventFd> {
    // SAFETY: dup of a valid fd; the result is checked and owned by the EventFd.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `n` is a fresh descriptor referring to an eventfd.
    Ok(unsafe { EventFd::from_raw_fd(n) })
}

/// A duplicate of `fd` as an owned descriptor (to hand to a device by SET_IRQS).
pub(crate) fn owned_dup(fd: &impl AsRawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: dup of a valid fd; the result is checked and owned.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `n` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

impl RegionMapper {
    /// A mapper over these buses and this VM.
    pub fn new(space: Arc<dyn VmAddressSpace>, pio: Arc<Bus>, mmio: Arc<Bus>) -> Arc<Self> {
        Arc::new(RegionMapper {
            space,
            pio,
            mmio,
            next_slot: Mutex::new(FIRST_SLOT),
        })
    }

    /// The port bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }
    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }

    fn alloc_slot(&self) -> Option<u32> {
        let mut n = self.next_slot.lock();
        if *n >= SLOT_LIMIT {
            return None;
        }
        *n += 1;
        Some(*n - 1)
    }

    fn bus(&self, space: IoSpace) -> &Arc<Bus> {
        match space {
            IoSpace::Pio => &self.pio,
            IoSpace::Mmio => &self.mmio,
        }
    }

    /// Prepare region `index` of `dev` for mapping in `space`: mmap its mmappable
    /// sparse areas (MMIO only; an area for which `keep_out(offset, size)` is true is
    /// left to exits) and take its ioeventfds. Areas that cannot be mapped are logged
    /// and left to exits; an ioeventfd outside the region is ignored.
    pub fn prepare(
        &self,
        dev: &dyn VfioDevice,
        index: u32,
        space: IoSpace,
        name: &str,
        keep_out: &dyn Fn(u64, u64) -> bool,
    ) -> Result<PreparedRegion, RegionMapError> {
        let rerr = |message: String| RegionMapError::Region { index, message };
        let ri = dev.region_info(index).map_err(|e| rerr(e.to_string()))?;
        let mut r = PreparedRegion {
            index,
            space,
            size: ri.size,
            areas: Vec::new(),
            ioevents: Vec::new(),
        };
        if let (IoSpace::Mmio, true, Some(fd)) = (space, ri.flags & region_flags::MMAP != 0, &ri.fd)
        {
            let areas = if ri.sparse.is_empty() {
                vec![nestio_device_model::SparseArea {
                    offset: 0,
                    size: ri.size,
                }]
            } else {
                ri.sparse.clone()
            };
            for a in areas {
                if keep_out(a.offset, a.size) {
                    tracing::info!(device = %name, region = index, offset = a.offset, "sparse area kept out of the mapping; left to exits");
                    continue;
                }
                match self.mmap_area(fd, ri.fd_offset, ri.size, a.offset, a.size) {
                    Ok(m) => r.areas.push(m),
                    Err(why) => tracing::warn!(
                        device = %name, region = index, offset = a.offset, size = a.size,
                        "sparse area not mapped, accesses will exit: {why}"
                    ),
                }
            }
        }
        match dev.region_io_fds(index) {
            Ok(fds) => {
                for e in fds {
                    let end = e.offset.checked_add(e.size);
                    if !matches!(e.size, 1 | 2 | 4 | 8) || end.is_none_or(|x| x > ri.size) {
                        tracing::warn!(device = %name, region = index, offset = e.offset, "ioeventfd outside its region ignored");
                        continue;
                    }
                    let fd = dup_eventfd(&*e.fd).map_err(|e| rerr(format!("ioeventfd: {e}")))?;
                    r.ioevents.push(IoEvent {
                        offset: e.offset,
                        datamatch: e.datamatch.map(|d| (d, e.size)),
                        fd,
                    });
                }
            }
            Err(e) => tracing::debug!(device = %name, region = index, error = %e, "no ioeventfds"),
        }
        Ok(r)
    }

    fn mmap_area(
        &self,
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
        let slot = self.alloc_slot().ok_or("out of KVM memory slots")?;
        // SAFETY: a fresh shared mapping of the device's fd; checked for failure; owned
        // by the returned MmapArea (built exactly once), which unmaps it on drop.
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

    /// Put `region` in the guest at `addr`: a bus range of `len` bytes (at least the
    /// region's size; a bus may round up) handled by `handler`, its areas as memory
    /// slots, its ioeventfds registered. A failing slot or ioeventfd is logged (the
    /// accesses then exit); a taken bus range is an error and maps nothing.
    pub fn map(
        &self,
        region: &PreparedRegion,
        addr: u64,
        len: u64,
        handler: Arc<dyn BusDevice>,
        name: &str,
    ) -> Result<(), RegionMapError> {
        let berr = |err| RegionMapError::Bus {
            index: region.index,
            addr,
            err,
        };
        let range = BusRange::new(addr, len).map_err(berr)?;
        self.bus(region.space)
            .insert(range, handler)
            .map_err(berr)?;
        for a in &region.areas {
            // SAFETY: the area is a live mmap owned by `region`, whose owner removes
            // the slot (`unmap`) before dropping it.
            let r = unsafe {
                self.space
                    .set_memory_slot(a.slot, addr + a.offset, a.size, a.host as u64)
            };
            if let Err(e) = r {
                tracing::warn!(device = %name, region = region.index, error = %e, "cannot map sparse area into the guest; accesses will exit");
            }
        }
        for ev in &region.ioevents {
            let spec = region.ioevent_spec(addr, ev);
            if let Err(e) = self.space.register_ioevent(&ev.fd, &spec) {
                tracing::warn!(device = %name, region = region.index, error = %e, "cannot register ioeventfd; writes will exit");
            }
        }
        Ok(())
    }

    /// Take `region` (mapped at `addr`) out of the guest.
    pub fn unmap(&self, region: &PreparedRegion, addr: u64) {
        self.bus(region.space).remove(addr);
        for a in &region.areas {
            // SAFETY: removing a slot (size 0) never gives KVM new memory.
            let _ = unsafe {
                self.space
                    .set_memory_slot(a.slot, addr + a.offset, 0, a.host as u64)
            };
        }
        for ev in &region.ioevents {
            let _ = self
                .space
                .unregister_ioevent(&ev.fd, &region.ioevent_spec(addr, ev));
        }
    }
}

/// A device error that means the device is gone (disconnected, I/O error).
pub(crate) fn is_fatal(e: &DeviceError) -> bool {
    matches!(e, DeviceError::Disconnected(_) | DeviceError::Io(_))
}

/// The plain bus handler of a region: accesses become region reads/writes at the same
/// offset; beyond the region's size reads are all-ones and writes are dropped; a
/// refused access reads all-ones; a fatal device error is a [`BusFault`] naming the
/// device (and is remembered in `lost`).
pub struct RegionIo {
    dev: Weak<dyn VfioDevice>,
    name: String,
    index: u32,
    size: u64,
    lost: Arc<Mutex<Option<String>>>,
}

impl RegionIo {
    /// The handler of region `index` (`size` bytes) of `dev`.
    pub fn new(
        dev: &Arc<dyn VfioDevice>,
        name: &str,
        index: u32,
        size: u64,
        lost: Arc<Mutex<Option<String>>>,
    ) -> Self {
        RegionIo {
            dev: Arc::downgrade(dev),
            name: name.into(),
            index,
            size,
            lost,
        }
    }

    fn fault(&self, what: &str, offset: u64, e: DeviceError) -> BusFault {
        let message = format!("{what} of region {} at {offset:#x}: {e}", self.index);
        *self.lost.lock() = Some(message.clone());
        BusFault {
            device: self.name.clone(),
            message,
        }
    }

    fn inside(&self, offset: u64, len: usize) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|e| e <= self.size)
    }
}

impl BusDevice for RegionIo {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        let dev = match self.dev.upgrade() {
            Some(d) if self.inside(offset, data.len()) => d,
            _ => {
                data.fill(0xff);
                return Ok(());
            }
        };
        if let Err(e) = dev.region_read(self.index, offset, data) {
            if is_fatal(&e) {
                return Err(self.fault("read", offset, e));
            }
            tracing::debug!(device = %self.name, error = %e, "region read refused");
            data.fill(0xff);
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
        let dev = match self.dev.upgrade() {
            Some(d) if self.inside(offset, data.len()) => d,
            _ => return Ok(()),
        };
        if let Err(e) = dev.region_write(self.index, offset, data) {
            if is_fatal(&e) {
                return Err(self.fault("write", offset, e));
            }
            tracing::debug!(device = %self.name, error = %e, "region write refused");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address_space::fake::{RecordingSpace, SpaceCall};
    use nestio_emulated::sample::{SampleDevice, RAM_BAR};

    struct Nothing;
    impl BusDevice for Nothing {
        fn read(&self, _: u64, d: &mut [u8]) -> Result<(), BusFault> {
            d.fill(0);
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), BusFault> {
            Ok(())
        }
    }

    fn mapper() -> (Arc<RecordingSpace>, Arc<RegionMapper>) {
        let space = Arc::new(RecordingSpace::default());
        let m = RegionMapper::new(space.clone(), Arc::new(Bus::new()), Arc::new(Bus::new()));
        (space, m)
    }

    #[test]
    fn mmappable_areas_become_slots_while_mapped_and_kept_out_areas_do_not() {
        let (space, m) = mapper();
        let dev = SampleDevice::new().unwrap();
        let r = m
            .prepare(&dev, RAM_BAR, IoSpace::Mmio, "sample", &|_, _| false)
            .unwrap();
        assert_eq!((r.index(), r.mapped_areas()), (RAM_BAR, 1));
        assert_eq!(r.slots(), vec![(0, FIRST_SLOT)]);
        assert!(space.take().is_empty(), "prepared, not mapped");
        m.map(&r, 0xe800_0000, r.size(), Arc::new(Nothing), "sample")
            .unwrap();
        let calls = space.take();
        assert!(matches!(
            calls.as_slice(),
            [SpaceCall::Slot { slot: FIRST_SLOT, gpa: 0xe800_0000, size }] if *size > 0
        ));
        assert!(m.mmio_bus().resolve(0xe800_0000, 4).is_some());
        // The same guest range cannot be taken twice.
        let e = m.map(&r, 0xe800_0000, 0x1000, Arc::new(Nothing), "sample");
        assert!(matches!(e, Err(RegionMapError::Bus { .. })));
        m.unmap(&r, 0xe800_0000);
        assert_eq!(
            space.take(),
            vec![SpaceCall::Slot {
                slot: FIRST_SLOT,
                gpa: 0xe800_0000,
                size: 0
            }]
        );
        assert!(m.mmio_bus().resolve(0xe800_0000, 4).is_none());
        // An area the caller keeps out stays unmapped; ports never get slots.
        let kept = m
            .prepare(&dev, RAM_BAR, IoSpace::Mmio, "sample", &|o, _| o == 0)
            .unwrap();
        assert_eq!(kept.mapped_areas(), 0);
        let pio = m
            .prepare(&dev, RAM_BAR, IoSpace::Pio, "sample", &|_, _| false)
            .unwrap();
        assert_eq!(pio.mapped_areas(), 0);
        assert!(m
            .prepare(&dev, 99, IoSpace::Mmio, "sample", &|_, _| false)
            .is_err());
    }
}
