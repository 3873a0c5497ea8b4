//! Passing a device on to the next nesting level: [`ExportedDevice`] (issue 6, seed 000).
//!
//! Level n+1 was given a device (typically a vfio-user `Client` to level n, where the
//! device is emulated). To pass it on to its own guest (level n+2), level n+1 wraps it in
//! an [`ExportedDevice`] and serves that with the vfio-user `Server`; level n+2 connects a
//! `Client` and uses the device as its own. Stacking exporters gives any depth.
//!
//! What the exporter translates and checks:
//! - **DMA maps.** The child's memory is a [`Window`] of this level's guest-physical
//!   space (child GPA `0..size` is this level's GPA `base..base+size`). A child without a
//!   vIOMMU maps its RAM at IOVA == its GPA, and the device sees those IOVAs in the
//!   descriptors the child writes, so **the IOVA range passes through unchanged**; what is
//!   translated is the *target* memory, re-expressed in this level's terms and checked
//!   against the window. The target is found as follows:
//!   - a child map backed by an fd that is *this level's RAM file* (same device and inode;
//!     the child's memory is a window of it, as in real nesting) names a file offset;
//!     that offset is converted to this level's GPA through the [`RamRegion`] and must
//!     lie inside the window. Any other fd is refused (`EINVAL`): a child cannot bring
//!     memory that is not part of this level's RAM.
//!   - a child map backed by messages (no fd), or any map when this level's RAM is only
//!     reachable by copy ([`LevelRam::Copy`]): the target is the child GPA == IOVA.
//!
//!   A target outside the window (or wrapping) is refused with [`DmaError::Unmapped`]
//!   (`EFAULT` on the wire) before anything reaches the inner device, so a nested guest
//!   can never make the device reach memory outside its window.
//!   With shared memory the map is re-issued as `DmaBacking::Fd` of this level's RAM fd at
//!   the translated offset: the device ends up mapping the very pages the innermost guest
//!   uses, zero copy at every depth. With `no_shared_memory` (or [`LevelRam::Copy`]) it is
//!   re-issued as `DmaBacking::Peer`: each device DMA arrives here as a message and is
//!   copied through a [`NestedDma`] limited to that mapping's window of this level's
//!   memory (counted in [`ExportStats`]). A peer-backed child map is resolved with the
//!   IOVA == GPA rule, so `no_shared_memory` is exact on the level whose child is the
//!   innermost guest; an exporter above another peer-mode exporter cannot know the
//!   grandchild's target and must share memory.
//! - **Unmaps** must name exactly a mapping the child made through this exporter
//!   (`ENOENT` otherwise) and are forwarded unchanged; `dma_unmap_all` and reset are
//!   forwarded. When a child session ends, the server unmaps everything and drops the
//!   interrupt fds, which this exporter forwards: teardown propagates to the device.
//! - **Regions**: info (including the mmappable fd, passed down unchanged), reads, writes
//!   and ioeventfds are forwarded: one message hop per level for trapped accesses.
//! - **Interrupts**: `set_irqs` eventfds are handed to the inner device unchanged, so the
//!   device signals the innermost level's own eventfd; no intermediate process relays an
//!   interrupt (fd-to-fd wiring).
//! - **A level going away**: a dead inner connection makes every call fail with the inner
//!   client's `DeviceError::Disconnected`, which the server returns to the child as an
//!   error; the child's own client sees `Disconnected` when this level's socket closes.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nestio_device_model::{
    DeviceError, DeviceInfo, IoEventFd, IrqAction, IrqData, IrqInfo, MigState, MigrationFlags,
    RegionInfo, VfioDevice,
};
use nestio_dma::{
    Access, DmaBacking, DmaError, DmaMapRequest, DmaPeer, DmaRange, DmaSpace, MapTable, Prot,
};

use crate::dma::NestedDma;
use crate::level::{LevelId, Window};

/// Errors building an exporter.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A RAM region that is empty or wraps.
    #[error("RAM region of {size:#x} bytes at GPA {gpa:#x} / file offset {fd_offset:#x} is empty or wraps the 64-bit space")]
    BadRegion {
        /// GPA.
        gpa: u64,
        /// Size.
        size: u64,
        /// File offset.
        fd_offset: u64,
    },
    /// The RAM file cannot be inspected.
    #[error("cannot fstat the RAM file: {0}")]
    Stat(#[source] std::io::Error),
    /// The RAM file is smaller than the region.
    #[error("the RAM file has {file_size:#x} bytes but the region needs {needed:#x}; truncate it to size first")]
    FileTooSmall {
        /// Bytes in the file.
        file_size: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// Building the copy space failed.
    #[error("cannot map this level's RAM for copies: {0}")]
    Map(#[from] DmaError),
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value to be overwritten by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, and `st` is a live local the kernel writes.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// This level's guest RAM as a file: GPA `gpa..gpa+size` lives at file offsets
/// `fd_offset..fd_offset+size` of `fd` (a KVM memory slot).
#[derive(Debug, Clone)]
pub struct RamRegion {
    fd: Arc<OwnedFd>,
    gpa: u64,
    size: u64,
    fd_offset: u64,
    dev: u64,
    ino: u64,
}

impl RamRegion {
    /// Checked constructor: non-empty, no wrap in GPA or file offsets, file large enough.
    pub fn new(
        fd: Arc<OwnedFd>,
        gpa: u64,
        size: u64,
        fd_offset: u64,
    ) -> Result<RamRegion, ExportError> {
        let bad = ExportError::BadRegion {
            gpa,
            size,
            fd_offset,
        };
        if size == 0 || gpa.checked_add(size - 1).is_none() {
            return Err(bad);
        }
        let Some(needed) = fd_offset.checked_add(size) else {
            return Err(bad);
        };
        let st = fstat(&fd).map_err(ExportError::Stat)?;
        let file_size = u64::try_from(st.st_size).unwrap_or(0);
        if file_size < needed {
            return Err(ExportError::FileTooSmall { file_size, needed });
        }
        Ok(RamRegion {
            fd,
            gpa,
            size,
            fd_offset,
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
    /// The RAM file.
    pub fn fd(&self) -> &Arc<OwnedFd> {
        &self.fd
    }
    /// First GPA.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// File offset of the first GPA.
    pub fn fd_offset(&self) -> u64 {
        self.fd_offset
    }
    /// File offset of `[gpa, gpa+len)`, if the whole range is RAM.
    pub fn gpa_to_file(&self, gpa: u64, len: u64) -> Option<u64> {
        let rel = gpa.checked_sub(self.gpa)?;
        let end = rel.checked_add(len)?;
        (end <= self.size).then(|| self.fd_offset + rel)
    }
    /// GPA of file range `[off, off+len)`, if the whole range is RAM.
    pub fn file_to_gpa(&self, off: u64, len: u64) -> Option<u64> {
        let rel = off.checked_sub(self.fd_offset)?;
        let end = rel.checked_add(len)?;
        (end <= self.size).then(|| self.gpa + rel)
    }
    /// True when `fd` is the same file as this RAM (same device and inode).
    pub fn same_file(&self, fd: &OwnedFd) -> bool {
        fstat(fd)
            .map(|st| st.st_dev == self.dev && st.st_ino == self.ino)
            .unwrap_or(false)
    }
}

/// How this level reaches its own guest RAM.
#[derive(Clone)]
pub enum LevelRam {
    /// A file that can be passed down by fd (zero copy unless `no_shared_memory`).
    Shared(RamRegion),
    /// Reachable only by copy: this level's GPA space as a DMA space (for example a
    /// parent's peer). Maps are always re-issued as peer mappings.
    Copy(Arc<dyn DmaSpace>),
}

impl std::fmt::Debug for LevelRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LevelRam::Shared(r) => f.debug_tuple("Shared").field(r).finish(),
            LevelRam::Copy(_) => f.write_str("Copy"),
        }
    }
}

/// Counters of an exporter (what crossed this level).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExportStats {
    /// DMA maps forwarded.
    pub maps: u64,
    /// Of those, forwarded as fd mappings (zero copy).
    pub fd_maps: u64,
    /// Of those, forwarded as peer mappings (copies).
    pub peer_maps: u64,
    /// DMA maps refused (outside the window, foreign fd, ...).
    pub refused_maps: u64,
    /// Unmaps forwarded (single and all).
    pub unmaps: u64,
    /// Region reads forwarded.
    pub region_reads: u64,
    /// Region writes forwarded.
    pub region_writes: u64,
    /// SET_IRQS forwarded.
    pub set_irqs: u64,
    /// Resets forwarded.
    pub resets: u64,
    /// Device DMA copies made through this level (peer mappings).
    pub copy_ops: u64,
    /// Bytes copied.
    pub copy_bytes: u64,
    /// Device DMA copies refused.
    pub copy_faults: u64,
}

#[derive(Default)]
struct Counters {
    maps: AtomicU64,
    fd_maps: AtomicU64,
    peer_maps: AtomicU64,
    refused_maps: AtomicU64,
    unmaps: AtomicU64,
    region_reads: AtomicU64,
    region_writes: AtomicU64,
    set_irqs: AtomicU64,
    resets: AtomicU64,
    copy_ops: AtomicU64,
    copy_bytes: AtomicU64,
    copy_faults: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Settings of an exporter.
#[derive(Debug, Clone, Copy)]
pub struct ExportConfig {
    /// The child's memory in this level's GPA space.
    pub window: Window,
    /// Never pass this level's RAM fd down; serve device DMA by copy instead.
    pub no_shared_memory: bool,
    /// The child's level id (for diagnostics and [`NestedDma`]).
    pub child: LevelId,
}

/// The device peer of one peer-backed mapping: copies between the device and this
/// level's memory, limited to the mapping's window.
struct ExportPeer {
    iova: u64,
    space: NestedDma,
    counters: Arc<Counters>,
}

impl ExportPeer {
    fn offset(&self, addr: u64) -> Result<u64, i32> {
        addr.checked_sub(self.iova).ok_or(libc::EFAULT)
    }
    fn done(&self, r: Result<(), DmaError>, len: usize) -> Result<(), i32> {
        match r {
            Ok(()) => {
                bump(&self.counters.copy_ops);
                self.counters
                    .copy_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                bump(&self.counters.copy_faults);
                tracing::debug!(error = %e, "device DMA through an exported level refused");
                Err(e.errno())
            }
        }
    }
}

impl DmaPeer for ExportPeer {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), i32> {
        let off = self.offset(addr)?;
        let len = buf.len();
        let r = self.space.read(off, buf);
        self.done(r, len)
    }
    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), i32> {
        let off = self.offset(addr)?;
        let r = self.space.write(off, data);
        self.done(r, data.len())
    }
}

/// A device passed on to the next level. See the module documentation.
pub struct ExportedDevice {
    inner: Arc<dyn VfioDevice>,
    config: ExportConfig,
    ram: LevelRam,
    /// This level's GPA space for copies (peer mode only).
    copy_space: Option<Arc<dyn DmaSpace>>,
    /// The child's mappings, IOVA -> size (for exact unmaps).
    maps: Mutex<BTreeMap<u64, u64>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for ExportedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportedDevice")
            .field("config", &self.config)
            .field("ram", &self.ram)
            .finish()
    }
}

impl ExportedDevice {
    /// Export `inner` to the child whose memory is `config.window` of this level's `ram`.
    pub fn new(
        inner: Arc<dyn VfioDevice>,
        ram: LevelRam,
        config: ExportConfig,
    ) -> Result<ExportedDevice, ExportError> {
        let copy_space: Option<Arc<dyn DmaSpace>> = match &ram {
            LevelRam::Copy(s) => Some(s.clone()),
            LevelRam::Shared(r) if config.no_shared_memory => {
                let t = MapTable::new(1);
                t.map(DmaMapRequest {
                    range: DmaRange::new(r.gpa, r.size)?,
                    prot: Prot::RW,
                    backing: DmaBacking::Fd {
                        fd: r.fd.clone(),
                        offset: r.fd_offset,
                    },
                })?;
                Some(Arc::new(t))
            }
            LevelRam::Shared(_) => None,
        };
        Ok(ExportedDevice {
            inner,
            config,
            ram,
            copy_space,
            maps: Mutex::new(BTreeMap::new()),
            counters: Arc::new(Counters::default()),
        })
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<dyn VfioDevice> {
        &self.inner
    }
    /// The settings.
    pub fn config(&self) -> ExportConfig {
        self.config
    }
    /// Counters.
    pub fn stats(&self) -> ExportStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportStats {
            maps: l(&c.maps),
            fd_maps: l(&c.fd_maps),
            peer_maps: l(&c.peer_maps),
            refused_maps: l(&c.refused_maps),
            unmaps: l(&c.unmaps),
            region_reads: l(&c.region_reads),
            region_writes: l(&c.region_writes),
            set_irqs: l(&c.set_irqs),
            resets: l(&c.resets),
            copy_ops: l(&c.copy_ops),
            copy_bytes: l(&c.copy_bytes),
            copy_faults: l(&c.copy_faults),
        }
    }
    /// The child's current mappings (IOVA, size).
    pub fn child_mappings(&self) -> Vec<(u64, u64)> {
        self.lock_maps().iter().map(|(a, s)| (*a, *s)).collect()
    }

    fn lock_maps(&self) -> parking_lot::MutexGuard<'_, BTreeMap<u64, u64>> {
        self.maps.lock()
    }

    /// This level's GPA of the child map's target, checked against the window.
    fn resolve(&self, req: &DmaMapRequest) -> Result<u64, DeviceError> {
        let iova = req.range.start();
        let len = req.range.len();
        let outside = || DmaError::Unmapped {
            iova,
            len,
            access: Access::Read,
        };
        let w = self.config.window;
        let gpa = match (&self.ram, &req.backing) {
            (LevelRam::Shared(r), DmaBacking::Fd { fd, offset }) => {
                if !r.same_file(fd) {
                    return Err(DeviceError::Invalid(format!(
                        "DMA map of [{iova:#x}, +{len:#x}) brings a file that is not this level's \
                         RAM; a nested guest's memory must be a window of its parent's RAM"
                    )));
                }
                let gpa = r.file_to_gpa(*offset, len).ok_or_else(outside)?;
                // The range must lie inside the child's window.
                let child = gpa.checked_sub(w.base()).ok_or_else(outside)?;
                w.translate(child, len).ok_or_else(outside)?
            }
            // No fd (or no fd to compare with): the child maps IOVA == its GPA.
            _ => w.translate(iova, len).ok_or_else(outside)?,
        };
        Ok(gpa)
    }
}

impl VfioDevice for ExportedDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn region_info(&self, index: u32) -> nestio_device_model::Result<RegionInfo> {
        // Passed down unchanged: an mmappable region's fd reaches the child as is.
        self.inner.region_info(index)
    }
    fn region_read(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> nestio_device_model::Result<()> {
        bump(&self.counters.region_reads);
        self.inner.region_read(index, offset, buf)
    }
    fn region_write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> nestio_device_model::Result<()> {
        bump(&self.counters.region_writes);
        self.inner.region_write(index, offset, data)
    }
    fn region_io_fds(&self, index: u32) -> nestio_device_model::Result<Vec<IoEventFd>> {
        self.inner.region_io_fds(index)
    }
    fn irq_info(&self, index: u32) -> nestio_device_model::Result<IrqInfo> {
        self.inner.irq_info(index)
    }
    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> nestio_device_model::Result<()> {
        bump(&self.counters.set_irqs);
        // The child's eventfds go to the device unchanged (fd-to-fd).
        self.inner.set_irqs(index, action, start, count, data)
    }
    fn reset(&self) -> nestio_device_model::Result<()> {
        bump(&self.counters.resets);
        self.inner.reset()
    }
    fn dma_map(&self, req: DmaMapRequest) -> nestio_device_model::Result<()> {
        let gpa = match self.resolve(&req) {
            Ok(g) => g,
            Err(e) => {
                bump(&self.counters.refused_maps);
                tracing::warn!(child = %self.config.child, error = %e, "nested DMA map refused");
                return Err(e);
            }
        };
        let iova = req.range.start();
        let len = req.range.len();
        let backing = match (&self.ram, &self.copy_space) {
            (LevelRam::Shared(r), None) => {
                let offset = r.gpa_to_file(gpa, len).ok_or_else(|| {
                    bump(&self.counters.refused_maps);
                    DeviceError::Dma(DmaError::Unmapped {
                        iova,
                        len,
                        access: Access::Read,
                    })
                })?;
                DmaBacking::Fd {
                    fd: r.fd.clone(),
                    offset,
                }
            }
            (_, Some(space)) => {
                let window =
                    Window::new(gpa, len).map_err(|e| DeviceError::Invalid(e.to_string()))?;
                DmaBacking::Peer(Arc::new(ExportPeer {
                    iova,
                    space: NestedDma::new(space.clone(), window, self.config.child),
                    counters: self.counters.clone(),
                }))
            }
            (LevelRam::Copy(_), None) => {
                return Err(DeviceError::Invalid("copy RAM without a copy space".into()))
            }
        };
        let fd_backed = matches!(backing, DmaBacking::Fd { .. });
        // Hold the table across the forward so map/unmap of the same range stay ordered.
        let mut maps = self.lock_maps();
        self.inner.dma_map(DmaMapRequest {
            range: req.range,
            prot: req.prot,
            backing,
        })?;
        maps.insert(iova, len);
        bump(&self.counters.maps);
        bump(if fd_backed {
            &self.counters.fd_maps
        } else {
            &self.counters.peer_maps
        });
        Ok(())
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> nestio_device_model::Result<()> {
        let mut maps = self.lock_maps();
        if maps.get(&iova) != Some(&size) {
            return Err(DeviceError::Dma(DmaError::NotMapped { iova, size }));
        }
        self.inner.dma_unmap(iova, size)?;
        maps.remove(&iova);
        bump(&self.counters.unmaps);
        Ok(())
    }
    fn dma_unmap_all(&self) -> nestio_device_model::Result<()> {
        let mut maps = self.lock_maps();
        self.inner.dma_unmap_all()?;
        maps.clear();
        bump(&self.counters.unmaps);
        Ok(())
    }
    fn migration_flags(&self) -> Option<MigrationFlags> {
        self.inner.migration_flags()
    }
    fn mig_state(&self) -> nestio_device_model::Result<MigState> {
        self.inner.mig_state()
    }
    fn mig_set_state(&self, target: MigState) -> nestio_device_model::Result<MigState> {
        self.inner.mig_set_state(target)
    }
    fn mig_data_read(&self, buf: &mut [u8]) -> nestio_device_model::Result<usize> {
        self.inner.mig_data_read(buf)
    }
    fn mig_data_write(&self, data: &[u8]) -> nestio_device_model::Result<()> {
        self.inner.mig_data_write(data)
    }
    fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[DmaRange],
    ) -> nestio_device_model::Result<()> {
        self.inner.dma_logging_start(page_size, ranges)
    }
    fn dma_logging_stop(&self) -> nestio_device_model::Result<()> {
        self.inner.dma_logging_stop()
    }
    fn dma_logging_report(
        &self,
        range: DmaRange,
        page_size: u64,
    ) -> nestio_device_model::Result<Vec<u64>> {
        self.inner.dma_logging_report(range, page_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[derive(Default)]
    struct Recorder {
        maps: Mutex<Vec<DmaMapRequest>>,
        unmaps: Mutex<Vec<(u64, u64)>>,
        irq_fds: Mutex<Vec<OwnedFd>>,
        region_fd: Option<Arc<OwnedFd>>,
    }

    impl VfioDevice for Recorder {
        fn info(&self) -> DeviceInfo {
            DeviceInfo {
                flags: nestio_device_model::flags::PCI,
                num_regions: 1,
                num_irqs: 1,
            }
        }
        fn region_info(&self, index: u32) -> nestio_device_model::Result<RegionInfo> {
            let mut r = RegionInfo::rw(index, 0x1000);
            if let Some(fd) = &self.region_fd {
                r.flags |= nestio_device_model::region_flags::MMAP;
                r.fd = Some(fd.clone());
            }
            Ok(r)
        }
        fn region_read(&self, _: u32, _: u64, buf: &mut [u8]) -> nestio_device_model::Result<()> {
            buf.fill(0xAB);
            Ok(())
        }
        fn region_write(&self, _: u32, _: u64, _: &[u8]) -> nestio_device_model::Result<()> {
            Ok(())
        }
        fn irq_info(&self, index: u32) -> nestio_device_model::Result<IrqInfo> {
            Ok(IrqInfo {
                index,
                flags: 0,
                count: 1,
            })
        }
        fn set_irqs(
            &self,
            _: u32,
            _: IrqAction,
            _: u32,
            _: u32,
            data: IrqData,
        ) -> nestio_device_model::Result<()> {
            if let IrqData::Eventfd(fds) = data {
                self.irq_fds.lock().extend(fds.into_iter().flatten());
            }
            Ok(())
        }
        fn dma_map(&self, req: DmaMapRequest) -> nestio_device_model::Result<()> {
            self.maps.lock().push(req);
            Ok(())
        }
        fn dma_unmap(&self, iova: u64, size: u64) -> nestio_device_model::Result<()> {
            self.unmaps.lock().push((iova, size));
            Ok(())
        }
    }

    fn memfd(size: u64) -> Arc<OwnedFd> {
        Arc::new(nestio_dma::memfd::sealed_memfd(c"export-test", size).unwrap())
    }

    fn pread(fd: &OwnedFd, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        // SAFETY: the kernel writes at most `len` bytes into our buffer.
        let r = unsafe { libc::pread(fd.as_raw_fd(), v.as_mut_ptr().cast(), len, off as i64) };
        assert_eq!(r, len as isize);
        v
    }

    const RAM_GPA: u64 = 0x20_0000;
    const RAM_SIZE: u64 = 8 << 20;
    const FD_OFF: u64 = 0x1000;

    fn setup(no_shared: bool) -> (Arc<Recorder>, ExportedDevice, Arc<OwnedFd>) {
        let fd = memfd(RAM_SIZE + FD_OFF);
        let region = RamRegion::new(fd.clone(), RAM_GPA, RAM_SIZE, FD_OFF).unwrap();
        let rec = Arc::new(Recorder::default());
        let exp = ExportedDevice::new(
            rec.clone(),
            LevelRam::Shared(region),
            ExportConfig {
                window: Window::new(0x10_0000, 4 << 20).unwrap(),
                no_shared_memory: no_shared,
                child: LevelId::from_raw(2).unwrap(),
            },
        )
        .unwrap();
        (rec, exp, fd)
    }

    struct NoPeer;
    impl DmaPeer for NoPeer {
        fn dma_read(&self, _: u64, _: &mut [u8]) -> Result<(), i32> {
            Err(libc::EIO)
        }
        fn dma_write(&self, _: u64, _: &[u8]) -> Result<(), i32> {
            Err(libc::EIO)
        }
    }

    fn peer_req(iova: u64, len: u64) -> DmaMapRequest {
        DmaMapRequest {
            range: DmaRange::new(iova, len).unwrap(),
            prot: Prot::RW,
            backing: DmaBacking::Peer(Arc::new(NoPeer)),
        }
    }

    #[test]
    fn ram_region_is_checked() {
        let fd = memfd(0x10_000);
        assert!(RamRegion::new(fd.clone(), 0, 0, 0).is_err());
        assert!(RamRegion::new(fd.clone(), u64::MAX, 2, 0).is_err());
        assert!(RamRegion::new(fd.clone(), 0, 0x1000, u64::MAX).is_err());
        assert!(matches!(
            RamRegion::new(fd.clone(), 0, 0x20_000, 0),
            Err(ExportError::FileTooSmall { .. })
        ));
        let r = RamRegion::new(fd.clone(), 0x1000, 0x8000, 0x2000).unwrap();
        assert_eq!(r.gpa_to_file(0x1000, 0x8000), Some(0x2000));
        assert_eq!(r.gpa_to_file(0x8fff, 1), Some(0x9fff));
        assert_eq!(r.gpa_to_file(0x8fff, 2), None);
        assert_eq!(r.gpa_to_file(0xfff, 1), None);
        assert_eq!(r.gpa_to_file(0x1000, u64::MAX), None);
        assert_eq!(r.file_to_gpa(0x2000, 0x10), Some(0x1000));
        assert_eq!(r.file_to_gpa(0x1fff, 1), None);
        assert!(r.same_file(&fd));
        assert!(!r.same_file(&memfd(0x1000)));
    }

    #[test]
    fn shared_map_keeps_iova_and_translates_target() {
        let (rec, exp, fd) = setup(false);
        // No fd: child GPA == IOVA 0x18_0000 -> own GPA 0x28_0000 -> file 0x81000.
        exp.dma_map(peer_req(0x18_0000, 0x1000)).unwrap();
        // The same memory named by the child through the shared file.
        exp.dma_map(DmaMapRequest {
            range: DmaRange::new(0x9000_0000, 0x1000).unwrap(),
            prot: Prot::READ,
            backing: DmaBacking::Fd {
                fd: fd.clone(),
                offset: 0x8_1000,
            },
        })
        .unwrap();
        let maps = rec.maps.lock();
        assert_eq!(maps.len(), 2);
        for (m, iova) in maps.iter().zip([0x18_0000u64, 0x9000_0000]) {
            assert_eq!(m.range.start(), iova, "IOVA unchanged");
            match &m.backing {
                DmaBacking::Fd { fd: f, offset } => {
                    assert_eq!(*offset, 0x8_1000);
                    assert_eq!(f.as_raw_fd(), fd.as_raw_fd(), "this level's RAM fd");
                }
                DmaBacking::Peer(_) => panic!("shared mode forwarded a peer"),
            }
        }
        assert_eq!(maps[1].prot, Prot::READ);
        drop(maps);
        assert_eq!(exp.stats().fd_maps, 2);
    }

    #[test]
    fn maps_outside_window_or_ram_are_refused() {
        let (rec, exp, fd) = setup(false);
        let errno = |r: nestio_device_model::Result<()>| r.unwrap_err().errno();
        // Child GPA 0 is own GPA 0x10_0000: inside the window, below RAM.
        assert_eq!(errno(exp.dma_map(peer_req(0, 0x1000))), libc::EFAULT);
        // Past the window end, straddling it, wrapping.
        assert_eq!(errno(exp.dma_map(peer_req(4 << 20, 0x1000))), libc::EFAULT);
        assert_eq!(
            errno(exp.dma_map(peer_req((4 << 20) - 0x1000, 0x2000))),
            libc::EFAULT
        );
        assert_eq!(
            errno(exp.dma_map(peer_req(u64::MAX - 0xfff, 0x1000))),
            libc::EFAULT
        );
        // File offsets of RAM outside the window (own GPA 0x50_0000+).
        let beyond = DmaMapRequest {
            range: DmaRange::new(0x1000, 0x1000).unwrap(),
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd: fd.clone(),
                offset: FD_OFF + 0x30_0000,
            },
        };
        assert_eq!(errno(exp.dma_map(beyond)), libc::EFAULT);
        let foreign = DmaMapRequest {
            range: DmaRange::new(0x1000, 0x1000).unwrap(),
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd: memfd(0x10000),
                offset: 0,
            },
        };
        assert_eq!(errno(exp.dma_map(foreign)), libc::EINVAL);
        assert!(rec.maps.lock().is_empty(), "nothing forwarded");
        assert_eq!(exp.stats().refused_maps, 6);
    }

    #[test]
    fn unmap_must_match_exactly() {
        let (rec, exp, _fd) = setup(false);
        exp.dma_map(peer_req(0x20_0000, 0x2000)).unwrap();
        let e = exp.dma_unmap(0x20_0000, 0x1000).unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT);
        assert!(rec.unmaps.lock().is_empty());
        exp.dma_unmap(0x20_0000, 0x2000).unwrap();
        assert_eq!(*rec.unmaps.lock(), vec![(0x20_0000, 0x2000)]);
        assert!(exp.child_mappings().is_empty());
        assert_eq!(
            exp.dma_unmap(0x20_0000, 0x2000).unwrap_err().errno(),
            libc::ENOENT
        );
    }

    #[test]
    fn no_shared_memory_copies_within_the_mapping() {
        let (rec, exp, fd) = setup(true);
        exp.dma_map(peer_req(0x18_0000, 0x1000)).unwrap();
        let peer = match &rec.maps.lock()[0].backing {
            DmaBacking::Peer(p) => p.clone(),
            DmaBacking::Fd { .. } => panic!("no_shared_memory passed the fd"),
        };
        peer.dma_write(0x18_0010, b"nested").unwrap();
        assert_eq!(pread(&fd, 0x8_1010, 6), b"nested");
        let mut b = [0u8; 6];
        peer.dma_read(0x18_0010, &mut b).unwrap();
        assert_eq!(&b, b"nested");
        // Past the mapping (the RAM continues there) and below it.
        assert_eq!(peer.dma_write(0x18_0ffc, &[1; 8]), Err(libc::EFAULT));
        assert_eq!(peer.dma_read(0x17_ffff, &mut b), Err(libc::EFAULT));
        assert_eq!(
            pread(&fd, 0x8_2000, 4),
            [0; 4],
            "nothing written past the mapping"
        );
        let s = exp.stats();
        assert_eq!((s.copy_ops, s.copy_bytes, s.copy_faults), (2, 12, 1));
        assert_eq!(s.peer_maps, 1);
    }

    #[test]
    fn eventfds_pass_through_unchanged() {
        let (rec, exp, _fd) = setup(false);
        // SAFETY: no pointers; checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: fresh fd.
        let ours = unsafe { OwnedFd::from_raw_fd(raw) };
        exp.set_irqs(
            0,
            IrqAction::Trigger,
            0,
            1,
            IrqData::Eventfd(vec![Some(ours.try_clone().unwrap())]),
        )
        .unwrap();
        let fds = rec.irq_fds.lock();
        assert_eq!(fds.len(), 1);
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local.
        let w = unsafe { libc::write(fds[0].as_raw_fd(), (&one as *const u64).cast(), 8) };
        assert_eq!(w, 8);
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local.
        let r = unsafe { libc::read(ours.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!((r, v), (8, 1), "the device signals the child's own eventfd");
        assert_eq!(exp.stats().set_irqs, 1);
    }

    #[test]
    fn regions_forwarded_and_mmap_fd_passes_down() {
        let fd = memfd(0x1000);
        let rec = Arc::new(Recorder {
            region_fd: Some(fd.clone()),
            ..Recorder::default()
        });
        let ram = RamRegion::new(memfd(0x10000), 0, 0x10000, 0).unwrap();
        let exp = ExportedDevice::new(
            rec,
            LevelRam::Shared(ram),
            ExportConfig {
                window: Window::new(0x1000, 0x1000).unwrap(),
                no_shared_memory: false,
                child: LevelId::from_raw(2).unwrap(),
            },
        )
        .unwrap();
        let info = exp.region_info(0).unwrap();
        assert!(
            Arc::ptr_eq(info.fd.as_ref().unwrap(), &fd),
            "same fd, unchanged"
        );
        let mut b = [0u8; 4];
        exp.region_read(0, 0, &mut b).unwrap();
        assert_eq!(b, [0xAB; 4]);
        exp.region_write(0, 0, &b).unwrap();
        let s = exp.stats();
        assert_eq!((s.region_reads, s.region_writes), (1, 1));
    }
}
