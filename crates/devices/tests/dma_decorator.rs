//! A translating DMA space stacked between a device and its map table: the device keeps
//! programming its own addresses, the decorator translates (or refuses), the table
//! checks, and faults come back to the device in its own addresses, reported exactly as
//! without the decorator (sample device: DMA_STATUS ERROR/FAULT and ERROR_ADDR).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use nestio_device::pci::command;
use nestio_device::{pci_index, VfioDevice};
use nestio_devices::sample::{cmd, dma_error, dma_status, regs, SampleDevice};
use nestio_dma::{Access, DmaBacking, DmaError, DmaMapRequest, DmaRange, DmaSpace, Prot};

/// Where the owner maps guest memory in the table.
const TABLE_IOVA: u64 = 0x40_0000;
const SIZE: u64 = 0x10000;
/// The decorator shows the table's `TABLE_IOVA` to the device at `DEVICE_IOVA`.
const DEVICE_IOVA: u64 = 0x1000;

/// A window decorator: device address `a` is table address `a - from + to`; faults are
/// rebased back to device addresses.
struct Offset {
    parent: Arc<dyn DmaSpace>,
    from: u64,
    to: u64,
    accesses: AtomicU32,
}

impl Offset {
    fn translate(&self, iova: u64, len: usize, access: Access) -> Result<u64, DmaError> {
        self.accesses.fetch_add(1, Ordering::SeqCst);
        iova.checked_sub(self.from)
            .and_then(|o| o.checked_add(self.to))
            .ok_or(DmaError::Unmapped {
                iova,
                len: len as u64,
                access,
            })
    }
    fn rebase(&self, e: DmaError) -> DmaError {
        e.map_fault_iova(|a| a - self.to + self.from)
    }
}

impl DmaSpace for Offset {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let t = self.translate(iova, buf.len(), Access::Read)?;
        self.parent.read(t, buf).map_err(|e| self.rebase(e))
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let t = self.translate(iova, data.len(), Access::Write)?;
        self.parent.write(t, data).map_err(|e| self.rebase(e))
    }
}

/// A decorator that refuses every write (a read-only IOMMU mapping).
struct ReadOnly(Arc<dyn DmaSpace>);

impl DmaSpace for ReadOnly {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.0.read(iova, buf)
    }
    fn write(&self, iova: u64, _: &[u8]) -> Result<(), DmaError> {
        Err(DmaError::Permission {
            iova,
            access: Access::Write,
        })
    }
}

fn wr(dev: &SampleDevice, off: u64, v: u32) {
    dev.region_write(pci_index::BAR0, off, &v.to_le_bytes())
        .unwrap();
}

fn rd(dev: &SampleDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.region_read(pci_index::BAR0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Run a FILL of `len` bytes at `dst`; returns (DMA_STATUS, ERROR_ADDR).
fn fill(dev: &SampleDevice, dst: u64, len: u32) -> (u32, u64) {
    wr(dev, regs::DMA_DST_LO, dst as u32);
    wr(dev, regs::DMA_DST_HI, (dst >> 32) as u32);
    wr(dev, regs::DMA_LEN, len);
    wr(dev, regs::DMA_PATTERN, 0xa5a5_a5a5);
    wr(dev, regs::DMA_CMD, cmd::FILL);
    let addr =
        u64::from(rd(dev, regs::ERROR_ADDR_HI)) << 32 | u64::from(rd(dev, regs::ERROR_ADDR_LO));
    (rd(dev, regs::DMA_STATUS), addr)
}

fn device_with_guest() -> (SampleDevice, File) {
    let dev = SampleDevice::new().unwrap();
    let file = File::from(nestio_dma::memfd::sealed_memfd(c"decorator-guest", SIZE).unwrap());
    dev.dma_map(DmaMapRequest {
        range: DmaRange::new(TABLE_IOVA, SIZE).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: Arc::new(OwnedFd::from(file.try_clone().unwrap())),
            offset: 0,
        },
    })
    .unwrap();
    dev.region_write(
        pci_index::CONFIG,
        4,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    )
    .unwrap();
    (dev, file)
}

const FAULT: u32 = dma_status::ERROR | dma_error::FAULT << dma_status::CODE_SHIFT;

#[test]
fn offset_decorator_translates_and_faults_are_reported_as_before() {
    let (dev, file) = device_with_guest();
    // Without a decorator: a fill that runs off the end of the mapping.
    let (st, direct_fault) = fill(&dev, TABLE_IOVA + SIZE - 0x10, 0x100);
    assert_eq!(st, FAULT);
    assert!((TABLE_IOVA + SIZE - 0x10..=TABLE_IOVA + SIZE).contains(&direct_fault));

    let port = dev.dma_port().expect("the sample device has a DMA port");
    let deco = Arc::new(Offset {
        parent: port.space(),
        from: DEVICE_IOVA,
        to: TABLE_IOVA,
        accesses: AtomicU32::new(0),
    });
    port.stack(|_| deco.clone());
    assert!(port.is_translated());

    // The device's own addresses now reach the table through the decorator.
    let (st, _) = fill(&dev, DEVICE_IOVA + 0x100, 0x20);
    assert_eq!(st, dma_status::DONE);
    let mut b = [0u8; 0x20];
    file.read_exact_at(&mut b, 0x100).unwrap();
    assert_eq!(b, [0xa5; 0x20]);
    assert!(
        deco.accesses.load(Ordering::SeqCst) > 0,
        "DMA bypassed the decorator"
    );

    // The same overrun, in device addresses: same status, fault address rebased.
    let (st, fault) = fill(&dev, DEVICE_IOVA + SIZE - 0x10, 0x100);
    assert_eq!(st, FAULT);
    assert_eq!(fault, direct_fault - TABLE_IOVA + DEVICE_IOVA);
    // The table's own address is not reachable by the device any more.
    let (st, _) = fill(&dev, TABLE_IOVA, 0x10);
    assert_eq!(st, FAULT);

    // DMA_MAP / dirty logging still work on the table under the decorator.
    dev.dma_logging_start(4096, &[DmaRange::new(TABLE_IOVA, SIZE).unwrap()])
        .unwrap();
    assert_eq!(fill(&dev, DEVICE_IOVA + 0x2000, 8).0, dma_status::DONE);
    let bits = dev
        .dma_logging_report(DmaRange::new(TABLE_IOVA, SIZE).unwrap(), 4096)
        .unwrap();
    assert_eq!(
        bits[0],
        1 << 2,
        "the write through the decorator dirtied page 2"
    );
    dev.dma_logging_stop().unwrap();

    port.reset_space();
    assert!(!port.is_translated());
    assert_eq!(fill(&dev, TABLE_IOVA, 0x10).0, dma_status::DONE);
}

#[test]
fn faulting_decorator_is_reported_by_the_device() {
    let (dev, _file) = device_with_guest();
    let port = dev.dma_port().unwrap();
    port.stack(|inner| Arc::new(ReadOnly(inner)));
    let (st, addr) = fill(&dev, TABLE_IOVA + 0x40, 0x10);
    assert_eq!(st, FAULT);
    assert_eq!(addr, TABLE_IOVA + 0x40);
    // Reads still go through: a checksum of mapped memory succeeds.
    wr(&dev, regs::DMA_SRC_LO, TABLE_IOVA as u32);
    wr(&dev, regs::DMA_SRC_HI, 0);
    wr(&dev, regs::DMA_LEN, 16);
    wr(&dev, regs::DMA_CMD, cmd::CHECKSUM);
    assert_eq!(rd(&dev, regs::DMA_STATUS), dma_status::DONE);
}
