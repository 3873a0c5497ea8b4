//! A stand-in device for tests, fuzzing and benches of the IOMMU models: it has no
//! regions and no interrupts, and keeps its DMA in a real [`MapTable`] (exact unmaps,
//! the way a vfio-user server does), counting the DMA_MAPs it receives.

use std::sync::atomic::{AtomicU64, Ordering};

use nestio_device_model::{
    DeviceError, DeviceInfo, IrqAction, IrqData, IrqInfo, RegionInfo, Result as DevResult,
    VfioDevice,
};
use nestio_dma::{DmaMapRequest, MapTable};

/// A device whose DMA goes through a map table of at most `limit` mappings.
pub(crate) struct TableDevice {
    /// The device's DMA mappings.
    pub(crate) table: MapTable,
    /// DMA_MAP requests received so far.
    pub(crate) maps: AtomicU64,
}

impl TableDevice {
    /// A device whose map table holds at most `limit` mappings.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            table: MapTable::new(limit),
            maps: AtomicU64::new(0),
        }
    }
}

impl VfioDevice for TableDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: nestio_device_model::flags::PCI,
            num_regions: 0,
            num_irqs: 0,
        }
    }
    fn region_info(&self, index: u32) -> DevResult<RegionInfo> {
        Ok(RegionInfo::absent(index))
    }
    fn region_read(&self, i: u32, _: u64, _: &mut [u8]) -> DevResult<()> {
        Err(DeviceError::NoSuchRegion(i))
    }
    fn region_write(&self, i: u32, _: u64, _: &[u8]) -> DevResult<()> {
        Err(DeviceError::NoSuchRegion(i))
    }
    fn irq_info(&self, i: u32) -> DevResult<IrqInfo> {
        Err(DeviceError::NoSuchIrq(i))
    }
    fn set_irqs(&self, i: u32, _: IrqAction, _: u32, _: u32, _: IrqData) -> DevResult<()> {
        Err(DeviceError::NoSuchIrq(i))
    }
    fn dma_map(&self, req: DmaMapRequest) -> DevResult<()> {
        self.maps.fetch_add(1, Ordering::Relaxed);
        Ok(self.table.map(req)?)
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> DevResult<()> {
        Ok(self.table.unmap(iova, size)?)
    }
    fn dma_unmap_all(&self) -> DevResult<()> {
        self.table.unmap_all();
        Ok(())
    }
}
