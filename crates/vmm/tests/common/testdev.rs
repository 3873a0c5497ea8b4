//! A small PCI test device (1234:11e9) implementing `VfioDevice`, for the VMM tests.
//!
//! BAR0: 4 KiB BAR over a 2 KiB register region: 0x0 scratch, 0x4 ident "nest",
//! 0x8 doorbell (raises MSI vector 0, or INTx), 0x10 ioeventfd register (offered via
//! `region_io_fds`). BAR2: 8 KiB memfd-backed region whose first page is an mmappable
//! sparse area; the second page reads 0x5a bytes through region reads. MSI capability
//! (64-bit, 1 vector) at 0x40; INTA. Configuration space and SET_IRQS are its
//! `PciFunction`'s.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use nestio_device::pci::{BarKind, PciConfig, PciFunction};
use nestio_device::{
    pci_index, region_flags, DeviceError, DeviceInfo, DmaPort, IoEventFd, IrqAction, IrqData,
    IrqInfo, RegionInfo, Result, SparseArea, VfioDevice,
};
use nestio_dma::MapTable;

pub struct TestDev {
    pci: PciFunction,
    scratch: AtomicU32,
    mem: Arc<OwnedFd>,
    ioevent: Arc<OwnedFd>,
    dma: DmaPort,
    /// Set to make every access fail as if the device process died.
    pub dead: AtomicBool,
    /// Region accesses to BAR2's mmappable first page (must stay 0: no exits).
    pub mapped_page_accesses: AtomicU32,
}

fn memfd(size: u64) -> OwnedFd {
    nestio_dma::memfd::sealed_memfd(c"testdev", size).unwrap()
}

fn eventfd() -> OwnedFd {
    // SAFETY: plain eventfd; result checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

impl TestDev {
    pub fn new() -> Arc<Self> {
        let mut c = PciConfig::new();
        c.set_vendor_id(0x1234);
        c.set_device_id(0x11e9);
        c.set_class(0xff0000);
        c.set_interrupt_pin(1).unwrap(); // INTA
        c.add_bar(0, BarKind::Mmio32, 0x1000).unwrap();
        c.add_bar(
            2,
            BarKind::Mmio64 {
                prefetchable: false,
            },
            0x2000,
        )
        .unwrap();
        let msi = c.add_msi(1, false).unwrap();
        assert_eq!(msi.offset(), 0x40);
        Arc::new(TestDev {
            pci: PciFunction::new(c),
            scratch: AtomicU32::new(0),
            mem: Arc::new(memfd(0x2000)),
            ioevent: Arc::new(eventfd()),
            dma: DmaPort::new(MapTable::new(16)),
            dead: AtomicBool::new(false),
            mapped_page_accesses: AtomicU32::new(0),
        })
    }

    /// The BAR2 memory word at `off`, as the device sees it.
    pub fn mem_u32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        // SAFETY: pread into a local buffer.
        let n = unsafe { libc::pread(self.mem.as_raw_fd(), b.as_mut_ptr().cast(), 4, off as i64) };
        assert_eq!(n, 4);
        u32::from_le_bytes(b)
    }

    /// The ioeventfd counter (consumed).
    pub fn ioevent_count(&self) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local u64.
        let n = unsafe { libc::read(self.ioevent.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    pub fn scratch(&self) -> u32 {
        self.scratch.load(Ordering::SeqCst)
    }

    pub fn dma_mappings(&self) -> usize {
        self.dma.table().mappings().len()
    }

    fn check_alive(&self) -> Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            Err(DeviceError::Disconnected("test device killed".into()))
        } else {
            Ok(())
        }
    }
}

impl VfioDevice for TestDev {
    fn info(&self) -> DeviceInfo {
        self.pci.device_info()
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.pci.region_info(index, |i| {
            Ok(match i {
                0 => RegionInfo::rw(0, 0x800),
                2 => RegionInfo {
                    index: 2,
                    flags: region_flags::READ | region_flags::WRITE | region_flags::MMAP,
                    size: 0x2000,
                    fd_offset: 0,
                    sparse: vec![SparseArea {
                        offset: 0,
                        size: 0x1000,
                    }],
                    fd: Some(self.mem.clone()),
                },
                i => RegionInfo::absent(i),
            })
        })
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_alive()?;
        let info = self.region_info(index)?;
        info.check(offset, buf.len())?;
        match index {
            0 => {
                let v: u32 = match offset {
                    0 => self.scratch.load(Ordering::SeqCst),
                    4 => u32::from_le_bytes(*b"nest"),
                    _ => 0,
                };
                let b = v.to_le_bytes();
                for (i, x) in buf.iter_mut().enumerate() {
                    *x = b.get(i).copied().unwrap_or(0);
                }
            }
            2 => {
                if offset < 0x1000 {
                    self.mapped_page_accesses.fetch_add(1, Ordering::SeqCst);
                    // SAFETY: pread into the caller's buffer.
                    unsafe {
                        libc::pread(
                            self.mem.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            offset as i64,
                        )
                    };
                } else {
                    buf.fill(0x5a);
                }
            }
            7 => self.pci.config_read(offset, buf)?,
            _ => return Err(DeviceError::NoSuchRegion(index)),
        }
        Ok(())
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.check_alive()?;
        let info = self.region_info(index)?;
        info.check(offset, data.len())?;
        match index {
            0 => match offset {
                0 if data.len() == 4 => self.scratch.store(
                    u32::from_le_bytes(data.try_into().unwrap()),
                    Ordering::SeqCst,
                ),
                8 => {
                    let irqs = self.pci.irqs();
                    let _ =
                        irqs.trigger(pci_index::MSI_IRQ, 0) || irqs.trigger(pci_index::INTX_IRQ, 0);
                }
                _ => {}
            },
            2 => {
                if offset < 0x1000 {
                    self.mapped_page_accesses.fetch_add(1, Ordering::SeqCst);
                }
                // SAFETY: pwrite from the caller's buffer.
                unsafe {
                    libc::pwrite(
                        self.mem.as_raw_fd(),
                        data.as_ptr().cast(),
                        data.len(),
                        offset as i64,
                    )
                };
            }
            7 => self.pci.config_write(offset, data)?,
            _ => return Err(DeviceError::NoSuchRegion(index)),
        }
        Ok(())
    }
    fn region_io_fds(&self, index: u32) -> Result<Vec<IoEventFd>> {
        Ok(if index == 0 {
            vec![IoEventFd {
                offset: 0x10,
                size: 4,
                datamatch: None,
                fd: self.ioevent.clone(),
            }]
        } else {
            Vec::new()
        })
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.pci.irq_info(index)
    }
    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        self.check_alive()?;
        self.pci.set_irqs(index, action, start, count, data)
    }
    fn dma_port(&self) -> Option<&DmaPort> {
        Some(&self.dma)
    }
}
