//! A [`VfioDevice`] backed by a Linux kernel VFIO device, so any device bound to a
//! kernel VFIO driver (vfio-pci, ...) can be served over vfio-user by nestio's server.
//!
//! Design:
//! - **Opening** ([`KernelVfioDevice::open_group`]): a fresh container
//!   (`/dev/vfio/vfio`), the group (`/dev/vfio/N` or `/dev/vfio/noiommu-N`) attached to
//!   it, the IOMMU type chosen from what the container offers (TYPE1v2, TYPE1, or
//!   NOIOMMU for a noiommu group), then the device fd by name.
//! - **Identity, regions, irqs** are read once at open (GET_INFO, GET_REGION_INFO with
//!   its capability chain, GET_IRQ_INFO) and cached; every request is checked against
//!   the cache before it reaches the kernel, so a hostile client cannot make nestio
//!   issue an out-of-range access.
//! - **Region access** is `pread`/`pwrite` on the device fd at the region's offset.
//!   A region the kernel lets us mmap is described with the device fd itself (shared,
//!   one dup) and its offset, with the sparse-mmap areas from the capability chain, so
//!   a vfio-user client maps BARs zero-copy from the kernel.
//! - **Interrupts**: SET_IRQS is passed to the kernel as is; eventfds the client sent
//!   go straight into the kernel's irq set, so an interrupt goes fd-to-fd.
//! - **DMA**: a client's DMA map carries an fd; IOVA, size and file offset must be
//!   page aligned and the map may not overlap another (EEXIST). With an IOMMU
//!   (type1) the fd is mmapped here (kept while mapped) and VFIO_IOMMU_MAP_DMA maps
//!   that virtual range at the IOVA; the kernel pins the pages. With a **noiommu**
//!   group there is no IOMMU and no MAP_DMA: the device DMAs physical addresses, so a
//!   map is accepted only when its IOVA *is* the physical address of every page of the
//!   range, which stays locked while mapped ([`noiommu`]; still unsafe, as Linux says).

pub mod ioctl;
pub mod noiommu;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use nestio_device_model::{
    DeviceError, DeviceInfo, IrqAction, IrqData, IrqInfo, RegionInfo, Result as DevResult,
    SparseArea, VfioDevice,
};
use nestio_dma::{DmaBacking, DmaError, DmaMapRequest};
use parking_lot::Mutex;
use vfio_bindings::bindings::vfio as vb;

use ioctl::{argsz, from_words, ioctl_buf, ioctl_val, to_words, IoctlError};

/// Errors opening a kernel VFIO device.
#[derive(Debug, thiserror::Error)]
pub enum KernelVfioError {
    /// A device node could not be opened.
    #[error(
        "cannot open {path} (is the vfio module loaded, the device bound to vfio-pci, and may this user open it?)"
    )]
    Open {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// An ioctl failed.
    #[error(transparent)]
    Ioctl(#[from] IoctlError),
    /// The kernel's VFIO API version is not the one this code speaks.
    #[error("VFIO API version {0} is not supported (expected {expected})", expected = vb::VFIO_API_VERSION)]
    ApiVersion(i32),
    /// The group is not viable.
    #[error(
        "VFIO group {0} is not viable: bind every device of the group to vfio-pci (or unbind it)"
    )]
    NotViable(String),
    /// No IOMMU type the container supports.
    #[error("the VFIO container supports no IOMMU type nestio can use (TYPE1v2, TYPE1, NOIOMMU)")]
    NoIommuType,
    /// The kernel gave malformed info.
    #[error("the kernel returned malformed VFIO info: {0}")]
    Malformed(String),
}

/// The IOMMU model of the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuType {
    /// VFIO_TYPE1v2_IOMMU.
    Type1v2,
    /// VFIO_TYPE1_IOMMU.
    Type1,
    /// VFIO_NOIOMMU_IOMMU: no translation, the device DMAs physical addresses.
    NoIommu,
}

impl IommuType {
    fn raw(self) -> u32 {
        match self {
            IommuType::Type1v2 => vb::VFIO_TYPE1v2_IOMMU,
            IommuType::Type1 => vb::VFIO_TYPE1_IOMMU,
            IommuType::NoIommu => vb::VFIO_NOIOMMU_IOMMU,
        }
    }
}

/// Most DMA maps one client may hold (vfio-user's advertised default).
pub const MAX_DMA_MAPS: usize = 65535;

/// What keeps a DMA map's memory usable while it exists (held only for its `Drop`,
/// which unmaps — and for noiommu unlocks — the client's memory; hence never read).
enum Keep {
    /// The client's memory mapped here for VFIO_IOMMU_MAP_DMA (the kernel pins it).
    Iommu(#[allow(dead_code)] Mapping),
    /// The client's memory locked here, its physical addresses checked (noiommu).
    NoIommu(#[allow(dead_code)] noiommu::LockedMapping),
}

/// A client memory mapping made for VFIO_IOMMU_MAP_DMA.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is only an address range owned by this struct; it is never
// dereferenced by nestio, only handed to the kernel, so it may move between threads.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !self.addr.is_null() {
            // SAFETY: `addr`/`len` are exactly a mapping this struct made and owns.
            unsafe { libc::munmap(self.addr, self.len) };
        }
    }
}

/// A kernel VFIO device (see the crate documentation).
pub struct KernelVfioDevice {
    // Field order = drop order: the device fd before the group, the group before the
    // container.
    device: File,
    _group: File,
    container: File,
    iommu: IommuType,
    info: DeviceInfo,
    regions: Vec<RegionInfo>,
    irqs: Vec<IrqInfo>,
    maps: Mutex<DmaMaps<Keep>>,
}

fn open_rw(path: &str) -> Result<File, KernelVfioError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| KernelVfioError::Open {
            path: path.to_string(),
            source,
        })
}

impl KernelVfioDevice {
    /// Open device `name` (e.g. `0000:00:01.0`) of the VFIO group at `group_path`.
    pub fn open_group(group_path: &Path, name: &str) -> Result<Self, KernelVfioError> {
        let container = open_rw("/dev/vfio/vfio")?;
        let v = ioctl_val(
            &container,
            "VFIO_GET_API_VERSION",
            ioctl::GET_API_VERSION,
            0,
        )?;
        if v != vb::VFIO_API_VERSION as i32 {
            return Err(KernelVfioError::ApiVersion(v));
        }
        let gp = group_path.display().to_string();
        let group = open_rw(&gp)?;
        if ioctl::group_status(&group)? & vb::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(KernelVfioError::NotViable(gp));
        }
        ioctl::group_set_container(&group, &container)?;
        // A noiommu group (`/dev/vfio/noiommu-N`) only works with the NOIOMMU model, even
        // when the type1 driver is loaded too.
        let noiommu_group = group_path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("noiommu-"));
        let candidates: &[IommuType] = if noiommu_group {
            &[IommuType::NoIommu]
        } else {
            &[IommuType::Type1v2, IommuType::Type1, IommuType::NoIommu]
        };
        let iommu = candidates
            .iter()
            .copied()
            .into_iter()
            .find(|t| {
                ioctl_val(
                    &container,
                    "VFIO_CHECK_EXTENSION",
                    ioctl::CHECK_EXTENSION,
                    t.raw() as _,
                )
                .map(|r| r > 0)
                .unwrap_or(false)
            })
            .ok_or(KernelVfioError::NoIommuType)?;
        ioctl_val(
            &container,
            "VFIO_SET_IOMMU",
            ioctl::SET_IOMMU,
            iommu.raw() as _,
        )?;
        if iommu == IommuType::NoIommu {
            tracing::warn!(
                group = %gp,
                "noiommu VFIO: nothing confines the device's DMA; DMA maps are accepted only \
                 at IOVA = physical address of locked pages (see nestio_kernel_vfio::noiommu)"
            );
        }
        let device = ioctl::group_get_device_fd(&group, name)?;
        tracing::info!(group = %gp, device = name, ?iommu, "kernel VFIO device opened");
        Self::from_parts(container, group, device, iommu)
    }

    fn from_parts(
        container: File,
        group: File,
        device: File,
        iommu: IommuType,
    ) -> Result<Self, KernelVfioError> {
        let di = vb::vfio_device_info {
            argsz: argsz::<vb::vfio_device_info>(),
            ..Default::default()
        };
        let mut w = to_words(&di, 0);
        ioctl_buf(
            &device,
            "VFIO_DEVICE_GET_INFO",
            ioctl::DEVICE_GET_INFO,
            &mut w,
        )?;
        let di: vb::vfio_device_info =
            from_words(&w, 0).ok_or_else(|| KernelVfioError::Malformed("device info".into()))?;
        // Bound what we will cache: a real device has a handful of each.
        if di.num_regions > 64 || di.num_irqs > 64 {
            return Err(KernelVfioError::Malformed(format!(
                "{} regions, {} irqs",
                di.num_regions, di.num_irqs
            )));
        }
        let device_fd: Arc<OwnedFd> = Arc::new(
            device
                .try_clone()
                .map_err(|source| KernelVfioError::Open {
                    path: "device fd (dup)".into(),
                    source,
                })?
                .into(),
        );
        let mut regions = Vec::new();
        for index in 0..di.num_regions {
            // vfio-pci answers EINVAL for a region the device lacks (e.g. the VGA
            // region of a non-VGA device): that region is absent, not an error.
            match region_info(&device, index, &device_fd) {
                Err(KernelVfioError::Ioctl(e)) if e.errno() == libc::EINVAL => {
                    tracing::debug!(index, "region absent (EINVAL)");
                    regions.push(RegionInfo::absent(index));
                }
                r => regions.push(r?),
            }
        }
        let mut irqs = Vec::new();
        for index in 0..di.num_irqs {
            let ii = vb::vfio_irq_info {
                argsz: argsz::<vb::vfio_irq_info>(),
                index,
                ..Default::default()
            };
            let mut w = to_words(&ii, 0);
            match ioctl_buf(
                &device,
                "VFIO_DEVICE_GET_IRQ_INFO",
                ioctl::DEVICE_GET_IRQ_INFO,
                &mut w,
            ) {
                // An irq index the device lacks: zero vectors.
                Err(e) if e.errno() == libc::EINVAL => {
                    irqs.push(IrqInfo {
                        index,
                        flags: 0,
                        count: 0,
                    });
                    continue;
                }
                r => r?,
            };
            let ii: vb::vfio_irq_info =
                from_words(&w, 0).ok_or_else(|| KernelVfioError::Malformed("irq info".into()))?;
            irqs.push(IrqInfo {
                index,
                flags: ii.flags,
                count: ii.count,
            });
        }
        Ok(KernelVfioDevice {
            device,
            _group: group,
            container,
            iommu,
            info: DeviceInfo {
                flags: di.flags & !nestio_device_model::flags::CAPS,
                num_regions: di.num_regions,
                num_irqs: di.num_irqs,
            },
            regions,
            irqs,
            maps: Mutex::new(DmaMaps::new()),
        })
    }

    /// The container's IOMMU model.
    pub fn iommu(&self) -> IommuType {
        self.iommu
    }

    fn region(&self, index: u32) -> DevResult<&RegionInfo> {
        self.regions
            .get(index as usize)
            .ok_or(DeviceError::NoSuchRegion(index))
    }

    /// Where `len` bytes at `offset` of region `index` are in the device fd, once the
    /// range is inside the region and the region allows `access`.
    fn region_access(&self, index: u32, offset: u64, len: usize, access: Access) -> DevResult<u64> {
        let r = self.region(index)?;
        r.check(offset, len)?;
        let (flag, what) = match access {
            Access::Read => (vb::VFIO_REGION_INFO_FLAG_READ, "readable"),
            Access::Write => (vb::VFIO_REGION_INFO_FLAG_WRITE, "writable"),
        };
        if r.flags & flag == 0 {
            return Err(DeviceError::Invalid(format!(
                "region {index} is not {what}"
            )));
        }
        r.fd_offset
            .checked_add(offset)
            .ok_or(DeviceError::Invalid("offset overflows".into()))
    }
}

/// A region access's direction.
#[derive(Debug, Clone, Copy)]
enum Access {
    Read,
    Write,
}

/// GET_REGION_INFO with its capability chain (sparse mmap areas).
fn region_info(
    device: &File,
    index: u32,
    fd: &Arc<OwnedFd>,
) -> Result<RegionInfo, KernelVfioError> {
    let ri = vb::vfio_region_info {
        argsz: argsz::<vb::vfio_region_info>(),
        index,
        ..Default::default()
    };
    let mut w = to_words(&ri, 0);
    ioctl_buf(
        device,
        "VFIO_DEVICE_GET_REGION_INFO",
        ioctl::DEVICE_GET_REGION_INFO,
        &mut w,
    )?;
    let mut ri: vb::vfio_region_info =
        from_words(&w, 0).ok_or_else(|| KernelVfioError::Malformed("region info".into()))?;
    if ri.argsz as usize > std::mem::size_of::<vb::vfio_region_info>() {
        // Capabilities follow: ask again with the size the kernel wants (bounded).
        if ri.argsz > 64 * 1024 {
            return Err(KernelVfioError::Malformed(format!(
                "region {index} info of {} bytes",
                ri.argsz
            )));
        }
        let want = vb::vfio_region_info {
            argsz: ri.argsz,
            index,
            ..Default::default()
        };
        w = to_words(&want, ri.argsz as usize);
        ioctl_buf(
            device,
            "VFIO_DEVICE_GET_REGION_INFO",
            ioctl::DEVICE_GET_REGION_INFO,
            &mut w,
        )?;
        ri = from_words(&w, 0).ok_or_else(|| KernelVfioError::Malformed("region info".into()))?;
    }
    let mut sparse = None;
    if ri.flags & vb::VFIO_REGION_INFO_FLAG_CAPS != 0 {
        sparse = parse_sparse(&w, ri.cap_offset as usize, ri.size).ok_or_else(|| {
            KernelVfioError::Malformed(format!("region {index} capability chain"))
        })?;
    }
    let mut flags = ri.flags & !vb::VFIO_REGION_INFO_FLAG_CAPS;
    // A sparse cap with no areas (e.g. the MSI-X table fills the BAR) means nothing can
    // be mapped; nestio's convention for "MMAP with no areas" is the whole region.
    if sparse.as_ref().is_some_and(|a| a.is_empty()) {
        flags &= !vb::VFIO_REGION_INFO_FLAG_MMAP;
    }
    let sparse = sparse.unwrap_or_default();
    let mmap = flags & vb::VFIO_REGION_INFO_FLAG_MMAP != 0;
    Ok(RegionInfo {
        index,
        flags,
        size: ri.size,
        fd_offset: ri.offset,
        sparse,
        fd: mmap.then(|| fd.clone()),
    })
}

/// Walk a capability chain in `w` from byte `off` and return the sparse-mmap areas
/// (`Some(None)` when there is no sparse cap). None if the chain is malformed: loops,
/// out of bounds, or areas outside the region.
pub fn parse_sparse(
    w: &[u64],
    mut off: usize,
    region_size: u64,
) -> Option<Option<Vec<SparseArea>>> {
    let mut out = None;
    let mut hops = 0;
    while off != 0 {
        hops += 1;
        if hops > 16 {
            return None;
        }
        let h: vb::vfio_info_cap_header = from_words(w, off)?;
        if h.id as u32 == vb::VFIO_REGION_INFO_CAP_SPARSE_MMAP {
            let nr: u32 = from_words(w, off + 8)?;
            if nr > 64 {
                return None;
            }
            let areas: &mut Vec<SparseArea> = out.insert(Vec::new());
            for i in 0..nr as usize {
                let a: vb::vfio_region_sparse_mmap_area = from_words(w, off + 16 + i * 16)?;
                let end = a.offset.checked_add(a.size)?;
                if end > region_size {
                    return None;
                }
                areas.push(SparseArea {
                    offset: a.offset,
                    size: a.size,
                });
            }
        }
        let next = h.next as usize;
        if next != 0 && next <= off {
            return None;
        }
        off = next;
    }
    Some(out)
}

fn dev_err(e: IoctlError) -> DeviceError {
    DeviceError::Io(std::io::Error::from_raw_os_error(e.errno()))
}

impl VfioDevice for KernelVfioDevice {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    fn region_info(&self, index: u32) -> DevResult<RegionInfo> {
        self.region(index).cloned()
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> DevResult<()> {
        let at = self.region_access(index, offset, buf.len(), Access::Read)?;
        self.device.read_exact_at(buf, at)?;
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> DevResult<()> {
        let at = self.region_access(index, offset, data.len(), Access::Write)?;
        self.device.write_all_at(data, at)?;
        Ok(())
    }

    fn irq_info(&self, index: u32) -> DevResult<IrqInfo> {
        self.irqs
            .get(index as usize)
            .copied()
            .ok_or(DeviceError::NoSuchIrq(index))
    }

    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> DevResult<()> {
        let info = self.irq_info(index)?;
        match start.checked_add(count) {
            Some(end) if end <= info.count => {}
            _ if count == 0 => {}
            _ => {
                return Err(DeviceError::Invalid(format!(
                    "irq vectors {start}+{count} outside {}",
                    info.count
                )))
            }
        }
        let act = match action {
            IrqAction::Mask => vb::VFIO_IRQ_SET_ACTION_MASK,
            IrqAction::Unmask => vb::VFIO_IRQ_SET_ACTION_UNMASK,
            IrqAction::Trigger => vb::VFIO_IRQ_SET_ACTION_TRIGGER,
        };
        // The payload: bools as u8, eventfds as i32 (-1 removes); `data` owns the fds
        // until the ioctl returns (the kernel takes its own references).
        let (dflag, payload): (u32, Vec<u8>) = match &data {
            IrqData::None => (vb::VFIO_IRQ_SET_DATA_NONE, Vec::new()),
            IrqData::Bool(b) => (
                vb::VFIO_IRQ_SET_DATA_BOOL,
                b.iter().map(|&x| x as u8).collect(),
            ),
            IrqData::Eventfd(fds) => (
                vb::VFIO_IRQ_SET_DATA_EVENTFD,
                fds.iter()
                    .flat_map(|f| {
                        f.as_ref()
                            .map(|f| f.as_raw_fd())
                            .unwrap_or(-1)
                            .to_ne_bytes()
                    })
                    .collect(),
            ),
        };
        let n = match &data {
            IrqData::None => count as usize,
            IrqData::Bool(b) => b.len(),
            IrqData::Eventfd(f) => f.len(),
        };
        if n != count as usize {
            return Err(DeviceError::Invalid(format!(
                "{n} data items for {count} vectors"
            )));
        }
        let head = std::mem::size_of::<vb::vfio_irq_set>();
        let total = head + payload.len();
        let set = vb::vfio_irq_set {
            argsz: total as u32,
            flags: dflag | act,
            index,
            start,
            count,
            ..Default::default()
        };
        let mut w = to_words(&set, total);
        // SAFETY: `w` holds `total` bytes (to_words rounded up); the payload goes at
        // bytes head..total, inside it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                payload.as_ptr(),
                (w.as_mut_ptr() as *mut u8).add(head),
                payload.len(),
            );
        }
        ioctl_buf(
            &self.device,
            "VFIO_DEVICE_SET_IRQS",
            ioctl::DEVICE_SET_IRQS,
            &mut w,
        )
        .map_err(dev_err)?;
        drop(data);
        Ok(())
    }

    fn reset(&self) -> DevResult<()> {
        if self.info.flags & nestio_device_model::flags::RESET == 0 {
            return Err(DeviceError::Unsupported(
                "reset (the kernel device has no reset)".into(),
            ));
        }
        ioctl_val(&self.device, "VFIO_DEVICE_RESET", ioctl::DEVICE_RESET, 0).map_err(dev_err)?;
        Ok(())
    }

    fn dma_map(&self, req: DmaMapRequest) -> DevResult<()> {
        let iova = req.range.start();
        let len = req.range.len();
        let mut maps = self.maps.lock();
        maps.check_insert(iova, len)?;
        if self.iommu == IommuType::NoIommu {
            // No translation exists: only memory whose IOVA is its physical address.
            let locked = noiommu::pin_for_noiommu(&req).map_err(|e| {
                tracing::warn!(iova, len, "{e}");
                DeviceError::Dma(DmaError::BadFile {
                    iova,
                    size: len,
                    errno: e.errno(),
                    reason: e.to_string(),
                })
            })?;
            tracing::debug!(
                iova,
                len,
                "noiommu DMA map: physical addresses checked, pages locked"
            );
            maps.insert(iova, len, Keep::NoIommu(locked));
            return Ok(());
        }
        for (what, v) in [("IOVA", iova), ("size", len)] {
            if !v.is_multiple_of(noiommu::PAGE_SIZE) {
                return Err(DeviceError::Dma(DmaError::Invalid(format!(
                    "the DMA map's {what} {v:#x} is not a multiple of the 4 KiB page size"
                ))));
            }
        }
        let DmaBacking::Fd { fd, offset } = &req.backing else {
            return Err(DeviceError::Unsupported(
                "DMA map without an fd (kernel VFIO needs memory it can pin)".into(),
            ));
        };
        if !offset.is_multiple_of(noiommu::PAGE_SIZE) {
            return Err(DeviceError::Dma(DmaError::Invalid(format!(
                "the DMA map's file offset {offset:#x} is not a multiple of the 4 KiB page size"
            ))));
        }
        let ulen =
            usize::try_from(len).map_err(|_| DeviceError::Invalid("map too large".into()))?;
        let off = libc::off_t::try_from(*offset)
            .map_err(|_| DeviceError::Invalid("offset too large".into()))?;
        let bits = req.prot.bits();
        let prot = (if bits & 1 != 0 { libc::PROT_READ } else { 0 })
            | (if bits & 2 != 0 { libc::PROT_WRITE } else { 0 });
        // SAFETY: a new shared mapping of the client's fd; the kernel checks the range
        // against the file, and nestio never dereferences it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                prot.max(libc::PROT_READ),
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        let m = Mapping { addr, len: ulen };
        let dm = vb::vfio_iommu_type1_dma_map {
            argsz: argsz::<vb::vfio_iommu_type1_dma_map>(),
            flags: (if bits & 1 != 0 {
                vb::VFIO_DMA_MAP_FLAG_READ
            } else {
                0
            }) | (if bits & 2 != 0 {
                vb::VFIO_DMA_MAP_FLAG_WRITE
            } else {
                0
            }),
            vaddr: addr as u64,
            iova,
            size: len,
        };
        let mut w = to_words(&dm, 0);
        ioctl_buf(
            &self.container,
            "VFIO_IOMMU_MAP_DMA",
            ioctl::IOMMU_MAP_DMA,
            &mut w,
        )
        .map_err(dev_err)?;
        maps.insert(iova, len, Keep::Iommu(m));
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> DevResult<()> {
        let mut maps = self.maps.lock();
        maps.check_exact(iova, size)?;
        if self.iommu != IommuType::NoIommu {
            let um = vb::vfio_iommu_type1_dma_unmap {
                argsz: argsz::<vb::vfio_iommu_type1_dma_unmap>(),
                iova,
                size,
                ..Default::default()
            };
            let mut w = to_words(&um, 0);
            ioctl_buf(
                &self.container,
                "VFIO_IOMMU_UNMAP_DMA",
                ioctl::IOMMU_UNMAP_DMA,
                &mut w,
            )
            .map_err(dev_err)?;
        }
        // Dropping the entry unmaps (and, for noiommu, unlocks) our view of the memory.
        maps.remove(iova);
        Ok(())
    }

    fn dma_unmap_all(&self) -> DevResult<()> {
        let keys = self.maps.lock().ranges();
        for (k, l) in keys {
            self.dma_unmap(k, l)?;
        }
        Ok(())
    }
}

/// The DMA maps of a device by IOVA: the bookkeeping shared by both IOMMU models.
struct DmaMaps<T> {
    by_iova: BTreeMap<u64, (u64, T)>,
}

impl<T> DmaMaps<T> {
    fn new() -> Self {
        DmaMaps {
            by_iova: BTreeMap::new(),
        }
    }

    /// May `[iova, +len)` be added? (EEXIST on overlap, ENOSPC past [`MAX_DMA_MAPS`].)
    fn check_insert(&self, iova: u64, len: u64) -> Result<(), DmaError> {
        let range = nestio_dma::DmaRange::new(iova, len)?;
        if let Some((&s, &(l, _))) = self.by_iova.range(..=range.last()).next_back() {
            // `s <= last`; it overlaps unless it ends before `iova`.
            if s.checked_add(l).is_none_or(|end| end > iova) {
                return Err(DmaError::Overlap { iova, size: len });
            }
        }
        if self.by_iova.len() >= MAX_DMA_MAPS {
            return Err(DmaError::TooManyMappings {
                limit: MAX_DMA_MAPS,
            });
        }
        Ok(())
    }

    fn insert(&mut self, iova: u64, len: u64, keep: T) {
        self.by_iova.insert(iova, (len, keep));
    }

    /// Is there a map of exactly `[iova, +size)`? (ENOENT otherwise.)
    fn check_exact(&self, iova: u64, size: u64) -> Result<(), DmaError> {
        match self.by_iova.get(&iova) {
            Some(&(l, _)) if l == size => Ok(()),
            _ => Err(DmaError::NotMapped { iova, size }),
        }
    }

    fn remove(&mut self, iova: u64) -> Option<T> {
        self.by_iova.remove(&iova).map(|(_, t)| t)
    }

    fn ranges(&self) -> Vec<(u64, u64)> {
        self.by_iova.iter().map(|(&k, &(l, _))| (k, l)).collect()
    }
}

#[cfg(test)]
mod tests;
