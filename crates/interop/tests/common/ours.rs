//! A small PCI-like device implementing nestio's [`VfioDevice`], served by nestio's
//! vfio-user server in the "their client -> our server" tests.
//!
//! Layout (PCI region/irq indices):
//! - region 0 (BAR0), 4 KiB, accessed by messages only. Registers:
//!   - 0x10 (u32 write): raise MSI-X vector `value`;
//!   - 0x20 (u64 write): DMA-read 8 bytes at IOVA `value` into 0x28 (on a fault,
//!     0x28 reads all ones and `faults` counts it);
//!   - 0x30 (u64 write): DMA-write the 8 bytes at 0x38 to IOVA `value`.
//! - region 1 (BAR1), 16 KiB backed by a memfd, READ|WRITE|MMAP with one sparse mmap
//!   area [0x2000, 0x4000); messages and mmap see the same bytes.
//! - region 7 (config), 256 bytes, messages only. Others absent.
//! - irqs: INTx (1, maskable, automasked), MSI (0), MSI-X (4, noresize), ERR (1), REQ (1).
//! - DMA through a `nestio_dma::MapTable` (mappings checked on every access).

#![allow(dead_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use nestio_device_model::irq::Irqs;
use nestio_device_model::{
    flags, irq_flags, pci_index, region_flags, DeviceError, DeviceInfo, IrqAction, IrqData,
    IrqInfo, RegionInfo, Result, SparseArea, VfioDevice,
};
use nestio_dma::{DmaSpace, MapTable};

pub const BAR0_SIZE: u64 = 0x1000;
pub const BAR1_SIZE: u64 = 0x4000;
pub const BAR1_SPARSE: SparseArea = SparseArea {
    offset: 0x2000,
    size: 0x2000,
};
pub const CONFIG_SIZE: u64 = 256;
pub const REG_DOORBELL: u64 = 0x10;
pub const REG_DMA_READ: u64 = 0x20;
pub const REG_DMA_READ_DATA: u64 = 0x28;
pub const REG_DMA_WRITE: u64 = 0x30;
pub const REG_DMA_WRITE_DATA: u64 = 0x38;

pub struct TestDevice {
    pub flags: u32,
    /// A region index whose `region_info` fails (to provoke error replies).
    pub fail_region: Option<u32>,
    bar0: Mutex<Vec<u8>>,
    config: Mutex<Vec<u8>>,
    pub bar1_fd: Arc<OwnedFd>,
    pub irqs: Irqs,
    pub table: MapTable,
    pub resets: AtomicU32,
    pub faults: AtomicU32,
}

impl TestDevice {
    /// A device with VFIO device flags `flags` (e.g. `flags::PCI | flags::RESET`).
    pub fn new(device_flags: u32) -> Arc<TestDevice> {
        Self::with_failing_region(device_flags, None)
    }

    /// Like [`TestDevice::new`], but `region_info(fail_region)` returns an error.
    pub fn with_failing_region(device_flags: u32, fail_region: Option<u32>) -> Arc<TestDevice> {
        let infos = [
            IrqInfo {
                index: pci_index::INTX_IRQ,
                flags: irq_flags::EVENTFD | irq_flags::MASKABLE | irq_flags::AUTOMASKED,
                count: 1,
            },
            IrqInfo {
                index: pci_index::MSI_IRQ,
                flags: irq_flags::EVENTFD,
                count: 0,
            },
            IrqInfo {
                index: pci_index::MSIX_IRQ,
                flags: irq_flags::EVENTFD | irq_flags::NORESIZE,
                count: 4,
            },
            IrqInfo {
                index: pci_index::ERR_IRQ,
                flags: irq_flags::EVENTFD,
                count: 1,
            },
            IrqInfo {
                index: pci_index::REQ_IRQ,
                flags: irq_flags::EVENTFD,
                count: 1,
            },
        ];
        Arc::new(TestDevice {
            flags: device_flags,
            fail_region,
            bar0: Mutex::new(vec![0u8; BAR0_SIZE as usize]),
            config: Mutex::new((0..CONFIG_SIZE).map(|i| i as u8).collect()),
            bar1_fd: Arc::new(crate::common::memfd(BAR1_SIZE)),
            irqs: Irqs::new(&infos),
            table: MapTable::new(64),
            resets: AtomicU32::new(0),
            faults: AtomicU32::new(0),
        })
    }

    fn bar0_reg(&self, offset: u64) -> u64 {
        let b = self.bar0.lock().unwrap();
        u64::from_le_bytes(b[offset as usize..offset as usize + 8].try_into().unwrap())
    }

    /// Device-side effects of a BAR0 write.
    fn bar0_side_effects(&self, offset: u64, len: usize) {
        let hit = |reg: u64| offset <= reg && reg < offset + len as u64;
        if hit(REG_DOORBELL) {
            let v = self.bar0_reg(REG_DOORBELL) as u32;
            self.irqs.trigger(pci_index::MSIX_IRQ, v);
        }
        if hit(REG_DMA_READ) {
            let iova = self.bar0_reg(REG_DMA_READ);
            let mut buf = [0u8; 8];
            if self.table.read(iova, &mut buf).is_err() {
                self.faults.fetch_add(1, Ordering::SeqCst);
                buf = [0xff; 8];
            }
            let mut b = self.bar0.lock().unwrap();
            b[REG_DMA_READ_DATA as usize..REG_DMA_READ_DATA as usize + 8].copy_from_slice(&buf);
        }
        if hit(REG_DMA_WRITE) {
            let iova = self.bar0_reg(REG_DMA_WRITE);
            let data = self.bar0_reg(REG_DMA_WRITE_DATA).to_le_bytes();
            if self.table.write(iova, &data).is_err() {
                self.faults.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn info_of(&self, index: u32) -> Result<RegionInfo> {
        if self.fail_region == Some(index) {
            return Err(DeviceError::Busy(format!(
                "region {index} made to fail by the test"
            )));
        }
        Ok(match index {
            0 => RegionInfo::rw(0, BAR0_SIZE),
            1 => RegionInfo {
                index: 1,
                flags: region_flags::READ | region_flags::WRITE | region_flags::MMAP,
                size: BAR1_SIZE,
                fd_offset: 0,
                sparse: vec![BAR1_SPARSE],
                fd: Some(self.bar1_fd.clone()),
            },
            7 => RegionInfo::rw(7, CONFIG_SIZE),
            i if i < pci_index::NUM_REGIONS => RegionInfo::absent(i),
            i => return Err(DeviceError::NoSuchRegion(i)),
        })
    }
}

impl VfioDevice for TestDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: self.flags,
            num_regions: pci_index::NUM_REGIONS,
            num_irqs: pci_index::NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.info_of(index)
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let info = self.info_of(index)?;
        info.check(offset, buf.len())?;
        match index {
            0 => buf.copy_from_slice(
                &self.bar0.lock().unwrap()[offset as usize..offset as usize + buf.len()],
            ),
            7 => buf.copy_from_slice(
                &self.config.lock().unwrap()[offset as usize..offset as usize + buf.len()],
            ),
            1 => buf.copy_from_slice(&crate::common::pread(
                self.bar1_fd.as_raw_fd(),
                offset,
                buf.len(),
            )),
            _ => return Err(DeviceError::NoSuchRegion(index)),
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let info = self.info_of(index)?;
        info.check(offset, data.len())?;
        match index {
            0 => {
                self.bar0.lock().unwrap()[offset as usize..offset as usize + data.len()]
                    .copy_from_slice(data);
                self.bar0_side_effects(offset, data.len());
            }
            7 => self.config.lock().unwrap()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(data),
            1 => crate::common::pwrite(self.bar1_fd.as_raw_fd(), offset, data),
            _ => return Err(DeviceError::NoSuchRegion(index)),
        }
        Ok(())
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.irqs.info(index)
    }

    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        self.irqs.set_irqs(index, action, start, count, data)
    }

    fn reset(&self) -> Result<()> {
        if self.flags & flags::RESET == 0 {
            return Err(DeviceError::Unsupported("reset".into()));
        }
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.bar0.lock().unwrap().fill(0);
        Ok(())
    }

    fn dma_table(&self) -> Option<&MapTable> {
        Some(&self.table)
    }
}
