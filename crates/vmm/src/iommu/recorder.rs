//! Test support: a device that records the DMA calls an IOMMU domain makes, shared by
//! the domain, SMMUv3 and TCE tests.

use nestio_device_model::{
    DeviceError, DeviceInfo, IrqAction, IrqData, IrqInfo, RegionInfo, Result, VfioDevice,
};
use nestio_dma::{DmaBacking, DmaMapRequest, Prot};
use parking_lot::Mutex;
use std::os::fd::AsRawFd;

/// A device that records its DMA calls: `(iova, len, prot, fd, file offset)` maps and
/// `(iova, len)` unmaps; `u64::MAX` length for unmap-all.
pub(crate) type MapCall = (u64, u64, Prot, i32, u64);

#[derive(Default)]
pub(crate) struct DmaRecorder {
    /// Maps received.
    pub(crate) maps: Mutex<Vec<MapCall>>,
    /// Unmaps received.
    pub(crate) unmaps: Mutex<Vec<(u64, u64)>>,
    /// Refuse every map.
    pub(crate) refuse: bool,
}

impl VfioDevice for DmaRecorder {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: nestio_device_model::flags::PCI,
            num_regions: 0,
            num_irqs: 0,
        }
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        Ok(RegionInfo::absent(index))
    }
    fn region_read(&self, i: u32, _: u64, _: &mut [u8]) -> Result<()> {
        Err(DeviceError::NoSuchRegion(i))
    }
    fn region_write(&self, i: u32, _: u64, _: &[u8]) -> Result<()> {
        Err(DeviceError::NoSuchRegion(i))
    }
    fn irq_info(&self, i: u32) -> Result<IrqInfo> {
        Err(DeviceError::NoSuchIrq(i))
    }
    fn set_irqs(&self, i: u32, _: IrqAction, _: u32, _: u32, _: IrqData) -> Result<()> {
        Err(DeviceError::NoSuchIrq(i))
    }
    fn dma_map(&self, req: DmaMapRequest) -> Result<()> {
        if self.refuse {
            return Err(DeviceError::Invalid("not this file".into()));
        }
        let (fd, off) = match &req.backing {
            DmaBacking::Fd { fd, offset } => (fd.as_raw_fd(), *offset),
            DmaBacking::Peer(_) => (-1, 0),
        };
        self.maps
            .lock()
            .push((req.range.start(), req.range.len(), req.prot, fd, off));
        Ok(())
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.unmaps.lock().push((iova, size));
        Ok(())
    }
    fn dma_unmap_all(&self) -> Result<()> {
        self.unmaps.lock().push((0, u64::MAX));
        Ok(())
    }
}

impl DmaRecorder {
    /// The maps as `(iova, len, prot)`.
    pub(crate) fn map_ranges(&self) -> Vec<(u64, u64, Prot)> {
        self.maps.lock().iter().map(|m| (m.0, m.1, m.2)).collect()
    }
}
