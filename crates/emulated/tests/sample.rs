//! The sample device driven through the `VfioDevice` trait, with a memfd as guest
//! memory mapped by `dma_map`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nestio_device_model::migration::read_stream;
use nestio_device_model::pci::{command, status};
use nestio_device_model::{
    pci_index, region_flags, IrqAction, IrqData, MigState, SparseArea, VfioDevice,
};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use nestio_emulated::sample::{
    cmd, dma_error, dma_status, intr, regs, sample_device, SampleDevice, BAR0_SIZE, DEVICE_ID,
    ID_VALUE, MSIX_TABLE_OFFSET, RAM_BAR, RAM_MMAP_SIZE, RAM_SIZE, STREAM_LEN, VENDOR_ID,
};

const GUEST_IOVA: u64 = 0x10_0000;
const GUEST_SIZE: u64 = 2 << 20;

fn memfd(size: u64) -> File {
    File::from(nestio_dma::memfd::sealed_memfd(c"sample-test-guest", size).unwrap())
}

fn eventfd() -> OwnedFd {
    // SAFETY: returns a new fd or -1 (checked).
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Read and reset an eventfd counter (0 when nothing was signalled).
fn fired(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from a non-blocking eventfd.
    let r = unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    if r == 8 {
        v
    } else {
        0
    }
}

/// Guest memory: a memfd of `size` bytes with its first `mapped` bytes mapped at
/// GUEST_IOVA.
struct Guest {
    file: File,
}

impl Guest {
    fn map(dev: &SampleDevice, size: u64, mapped: u64, prot: Prot) -> Guest {
        let file = memfd(size);
        let fd = Arc::new(OwnedFd::from(file.try_clone().unwrap()));
        dev.dma_map(DmaMapRequest {
            range: DmaRange::new(GUEST_IOVA, mapped).unwrap(),
            prot,
            backing: DmaBacking::Fd { fd, offset: 0 },
        })
        .unwrap();
        Guest { file }
    }
    fn write(&self, iova: u64, data: &[u8]) {
        self.file.write_all_at(data, iova - GUEST_IOVA).unwrap();
    }
    fn read(&self, iova: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.file.read_exact_at(&mut v, iova - GUEST_IOVA).unwrap();
        v
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

fn cfg_rd32(dev: &SampleDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.region_read(pci_index::CONFIG, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn cfg_wr(dev: &SampleDevice, off: u64, data: &[u8]) {
    dev.region_write(pci_index::CONFIG, off, data).unwrap();
}

fn enable_bus_master(dev: &SampleDevice) {
    cfg_wr(
        dev,
        4,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
}

fn wire(dev: &SampleDevice, index: u32, fds: &[&OwnedFd]) {
    dev.set_irqs(
        index,
        IrqAction::Trigger,
        0,
        fds.len() as u32,
        IrqData::Eventfd(fds.iter().map(|f| Some(f.try_clone().unwrap())).collect()),
    )
    .unwrap();
}

fn dma(dev: &SampleDevice, command: u32, src: u64, dst: u64, len: u32) {
    wr(dev, regs::DMA_SRC_LO, src as u32);
    wr(dev, regs::DMA_SRC_HI, (src >> 32) as u32);
    wr(dev, regs::DMA_DST_LO, dst as u32);
    wr(dev, regs::DMA_DST_HI, (dst >> 32) as u32);
    wr(dev, regs::DMA_LEN, len);
    wr(dev, regs::DMA_CMD, command);
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u64, 0u64);
    for &x in data {
        a = (a + u64::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16 | a) as u32
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect()
}

fn error_code(status: u32) -> u32 {
    (status >> dma_status::CODE_SHIFT) & 0xff
}

#[test]
fn identity_and_regions() {
    let dev = sample_device().unwrap();
    let info = dev.info();
    assert_ne!(info.flags & nestio_device_model::flags::PCI, 0);
    assert_ne!(info.flags & nestio_device_model::flags::RESET, 0);
    assert_eq!(info.num_regions, pci_index::NUM_REGIONS);
    assert_eq!(info.num_irqs, pci_index::NUM_IRQS);
    assert_eq!(
        cfg_rd32(&dev, 0),
        u32::from(DEVICE_ID) << 16 | u32::from(VENDOR_ID)
    );
    assert_eq!(cfg_rd32(&dev, 8) >> 8, 0xff0000);
    assert_eq!(rd(&dev, regs::ID), ID_VALUE);
    assert_eq!(dev.region_info(0).unwrap().size, BAR0_SIZE);
    assert_eq!(dev.region_info(7).unwrap().size, 256);
    for absent in [1, 3, 4, 5, 6, 8] {
        assert_eq!(dev.region_info(absent).unwrap().size, 0);
    }
    assert!(dev.region_info(9).is_err());
    assert_eq!(dev.irq_info(pci_index::INTX_IRQ).unwrap().count, 1);
    assert_eq!(dev.irq_info(pci_index::MSI_IRQ).unwrap().count, 2);
    assert_eq!(dev.irq_info(pci_index::MSIX_IRQ).unwrap().count, 2);
    assert!(dev.irq_info(5).is_err());
}

#[test]
fn bar_sizing_and_capabilities_via_config_space() {
    let dev = SampleDevice::new().unwrap();
    for bar in 0..6u64 {
        cfg_wr(&dev, 0x10 + 4 * bar, &u32::MAX.to_le_bytes());
    }
    assert_eq!(
        cfg_rd32(&dev, 0x10),
        0xffff_f000,
        "BAR0: 4 KiB, 32-bit MMIO"
    );
    assert_eq!(cfg_rd32(&dev, 0x14), 0);
    assert_eq!(
        cfg_rd32(&dev, 0x18),
        0xffff_000c,
        "BAR2: 64 KiB, 64-bit prefetchable"
    );
    assert_eq!(cfg_rd32(&dev, 0x1c), 0xffff_ffff);
    assert_eq!(cfg_rd32(&dev, 0x20), 0);
    assert_eq!(cfg_rd32(&dev, 0x24), 0);
    cfg_wr(&dev, 0x18, &0xc000_0000u32.to_le_bytes());
    cfg_wr(&dev, 0x1c, &0x1u32.to_le_bytes());
    assert_eq!(dev.config().bar_address(2), Some(0x1_c000_0000));
    // Capability chain: status bit, pointer, MSI then MSI-X.
    assert_ne!(cfg_rd32(&dev, 4) >> 16 & u32::from(status::CAP_LIST), 0);
    let mut ids = Vec::new();
    let mut ptr = cfg_rd32(&dev, 0x34) & 0xfc;
    while ptr != 0 && ids.len() < 10 {
        let h = cfg_rd32(&dev, ptr.into());
        ids.push(h & 0xff);
        ptr = (h >> 8) & 0xfc;
    }
    assert_eq!(ids, vec![0x05, 0x11]);
}

#[test]
fn dma_copy_fill_checksum_with_intx() {
    let dev = SampleDevice::new().unwrap();
    let g = Guest::map(&dev, GUEST_SIZE, GUEST_SIZE, Prot::RW);
    let intx = eventfd();
    wire(&dev, pci_index::INTX_IRQ, &[&intx]);
    enable_bus_master(&dev);

    // Copy 40000 bytes (three chunks, the last partial).
    let src = GUEST_IOVA + 0x1000;
    let dst = GUEST_IOVA + 0x10_0000;
    let data = pattern(40_000, 1);
    g.write(src, &data);
    dma(&dev, cmd::COPY, src, dst, data.len() as u32);
    assert_eq!(rd(&dev, regs::DMA_STATUS), dma_status::DONE);
    assert_eq!(g.read(dst, data.len()), data);
    assert_eq!(g.read(dst + data.len() as u64, 16), vec![0; 16]);
    assert_eq!(rd(&dev, regs::INT_STATUS), intr::DMA_DONE);
    assert_eq!(fired(&intx), 1);
    assert_ne!(dev.config().status() & status::INTERRUPT, 0);
    // Acknowledge: W1C drops the level, unmask stays quiet.
    wr(&dev, regs::INT_STATUS, intr::DMA_DONE);
    assert_eq!(rd(&dev, regs::INT_STATUS), 0);
    assert_eq!(dev.config().status() & status::INTERRUPT, 0);
    dev.set_irqs(pci_index::INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
        .unwrap();
    assert_eq!(fired(&intx), 0);

    // Fill with a pattern at an odd length.
    wr(&dev, regs::DMA_PATTERN, 0xdead_beef);
    dma(&dev, cmd::FILL, 0, dst, 20_003);
    assert_eq!(rd(&dev, regs::DMA_STATUS), dma_status::DONE);
    let filled = g.read(dst, 20_004);
    for (i, b) in filled[..20_003].iter().enumerate() {
        assert_eq!(*b, 0xdead_beefu32.to_le_bytes()[i % 4], "byte {i}");
    }
    assert_eq!(filled[20_003], data[20_003], "nothing past LEN");
    assert_eq!(fired(&intx), 1);
    wr(&dev, regs::INT_STATUS, intr::ALL);
    dev.set_irqs(pci_index::INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
        .unwrap();

    // Checksum of 1 MiB (the maximum).
    let big = pattern(1 << 20, 7);
    g.write(GUEST_IOVA, &big);
    dma(&dev, cmd::CHECKSUM, GUEST_IOVA, 0, 1 << 20);
    assert_eq!(rd(&dev, regs::DMA_STATUS), dma_status::DONE);
    assert_eq!(rd(&dev, regs::DMA_RESULT), adler32(&big));
    assert_eq!(fired(&intx), 1);

    // Overlapping copy behaves as memmove.
    let small = pattern(10_000, 3);
    g.write(GUEST_IOVA, &small);
    dma(&dev, cmd::COPY, GUEST_IOVA, GUEST_IOVA + 100, 10_000);
    assert_eq!(g.read(GUEST_IOVA + 100, 10_000), small);
    g.write(GUEST_IOVA + 40_000, &big[..40_000]);
    dma(
        &dev,
        cmd::COPY,
        GUEST_IOVA + 40_000,
        GUEST_IOVA + 20_000,
        40_000,
    );
    assert_eq!(g.read(GUEST_IOVA + 20_000, 40_000), &big[..40_000]);
}

#[test]
fn interrupts_msi_msix_and_mask_register() {
    let dev = SampleDevice::new().unwrap();
    let g = Guest::map(&dev, 1 << 16, 1 << 16, Prot::RW);
    enable_bus_master(&dev);
    let intx = eventfd();
    let msi = [eventfd(), eventfd()];
    wire(&dev, pci_index::INTX_IRQ, &[&intx]);
    wire(&dev, pci_index::MSI_IRQ, &[&msi[0], &msi[1]]);
    g.write(GUEST_IOVA, &[1, 2, 3, 4]);
    dma(&dev, cmd::CHECKSUM, GUEST_IOVA, 0, 4);
    assert_eq!(fired(&msi[0]), 1, "DMA completion on MSI vector 0");
    assert_eq!(fired(&intx), 0);
    assert_eq!(dev.config().status() & status::INTERRUPT, 0);
    wr(&dev, regs::INT_SET, intr::SOFT);
    assert_eq!(fired(&msi[1]), 1, "software interrupt on vector 1");
    assert_eq!(rd(&dev, regs::INT_STATUS), intr::DMA_DONE | intr::SOFT);
    assert_eq!(rd(&dev, regs::INT_SET), 0);
    // Masked causes do not interrupt; unmasking a pending cause does.
    wr(&dev, regs::INT_STATUS, intr::ALL);
    wr(&dev, regs::INT_MASK, intr::SOFT);
    wr(&dev, regs::INT_SET, intr::SOFT);
    assert_eq!(fired(&msi[1]), 0);
    assert_eq!(rd(&dev, regs::INT_STATUS), intr::SOFT);
    wr(&dev, regs::INT_MASK, 0);
    assert_eq!(fired(&msi[1]), 1);
    // MSI-X wins once wired.
    let msix = [eventfd(), eventfd()];
    wire(&dev, pci_index::MSIX_IRQ, &[&msix[0], &msix[1]]);
    wr(&dev, regs::INT_STATUS, intr::ALL);
    dma(&dev, cmd::CHECKSUM, GUEST_IOVA, 0, 4);
    assert_eq!(fired(&msix[0]), 1);
    assert_eq!(fired(&msi[0]), 0);
    // The MSI-X table in BAR0 is emulated: entries start masked, control bit writable.
    let ctrl = MSIX_TABLE_OFFSET + 12;
    assert_eq!(rd(&dev, ctrl), 1);
    wr(&dev, ctrl, 0xffff_fffe);
    assert_eq!(rd(&dev, ctrl), 0);
    wr(&dev, MSIX_TABLE_OFFSET, 0xfee0_0000);
    assert_eq!(rd(&dev, MSIX_TABLE_OFFSET), 0xfee0_0000);
}

#[test]
fn dma_fault_sets_error_and_writes_nothing_outside() {
    let dev = SampleDevice::new().unwrap();
    // 128 KiB file, only the first 64 KiB mapped.
    let g = Guest::map(&dev, 128 << 10, 64 << 10, Prot::RW);
    let intx = eventfd();
    wire(&dev, pci_index::INTX_IRQ, &[&intx]);
    enable_bus_master(&dev);
    let end = GUEST_IOVA + (64 << 10);
    let src = pattern(8192, 9);
    g.write(GUEST_IOVA, &src);
    let before = g.read(GUEST_IOVA, 128 << 10);

    // Destination straddles the end of the mapping.
    dma(&dev, cmd::COPY, GUEST_IOVA, end - 4096, 8192);
    let st = rd(&dev, regs::DMA_STATUS);
    assert_eq!(
        st & (dma_status::ERROR | dma_status::DONE),
        dma_status::ERROR
    );
    assert_eq!(error_code(st), dma_error::FAULT);
    let fault =
        u64::from(rd(&dev, regs::ERROR_ADDR_LO)) | u64::from(rd(&dev, regs::ERROR_ADDR_HI)) << 32;
    assert_eq!(fault, end);
    assert_eq!(rd(&dev, regs::INT_STATUS), intr::DMA_ERROR);
    assert_eq!(fired(&intx), 1);
    assert_eq!(g.read(GUEST_IOVA, 128 << 10), before, "no byte moved");

    // Fill far outside every mapping.
    wr(&dev, regs::INT_STATUS, intr::ALL);
    dma(&dev, cmd::FILL, 0, 0xdead_0000_0000, 64);
    assert_eq!(error_code(rd(&dev, regs::DMA_STATUS)), dma_error::FAULT);
    assert_eq!(rd(&dev, regs::ERROR_ADDR_HI), 0xdead);
    assert_eq!(rd(&dev, regs::ERROR_ADDR_LO), 0);
    // Source unmapped.
    dma(&dev, cmd::CHECKSUM, end + 4096, 0, 16);
    assert_eq!(error_code(rd(&dev, regs::DMA_STATUS)), dma_error::FAULT);
    assert_eq!(rd(&dev, regs::ERROR_ADDR_LO), (end + 4096) as u32);
    // Address that wraps the 64-bit space.
    dma(&dev, cmd::FILL, 0, u64::MAX - 8, 64);
    assert_eq!(error_code(rd(&dev, regs::DMA_STATUS)), dma_error::FAULT);
    // A long copy whose later chunk faults: earlier chunks land, nothing beyond the map.
    dma(
        &dev,
        cmd::COPY,
        GUEST_IOVA,
        GUEST_IOVA + (48 << 10),
        48 << 10,
    );
    assert_eq!(error_code(rd(&dev, regs::DMA_STATUS)), dma_error::FAULT);
    assert_eq!(rd(&dev, regs::ERROR_ADDR_LO), end as u32);
    assert_eq!(
        g.read(GUEST_IOVA + (48 << 10), 16 << 10),
        before[..16 << 10].to_vec(),
        "the first chunk landed"
    );
    assert_eq!(
        g.read(end, 64 << 10),
        before[64 << 10..].to_vec(),
        "nothing written past the mapping"
    );
    assert_eq!(g.read(GUEST_IOVA, 8192), src);
    assert!(dev.dma_table().unwrap().stats().faults >= 4);
}

#[test]
fn dma_permission_and_argument_errors() {
    let dev = SampleDevice::new().unwrap();
    let g = Guest::map(&dev, 1 << 16, 1 << 16, Prot::READ);
    g.write(GUEST_IOVA, &[0x11; 64]);
    // Bus master off: refused before any access.
    dma(&dev, cmd::FILL, 0, GUEST_IOVA, 16);
    assert_eq!(
        error_code(rd(&dev, regs::DMA_STATUS)),
        dma_error::NO_BUS_MASTER
    );
    enable_bus_master(&dev);
    // Read-only mapping: a write faults.
    dma(&dev, cmd::FILL, 0, GUEST_IOVA, 16);
    assert_eq!(error_code(rd(&dev, regs::DMA_STATUS)), dma_error::FAULT);
    assert_eq!(rd(&dev, regs::ERROR_ADDR_LO), GUEST_IOVA as u32);
    assert_eq!(g.read(GUEST_IOVA, 64), vec![0x11; 64]);
    // But it can be read.
    dma(&dev, cmd::CHECKSUM, GUEST_IOVA, 0, 64);
    assert_eq!(rd(&dev, regs::DMA_STATUS), dma_status::DONE);
    assert_eq!(rd(&dev, regs::DMA_RESULT), adler32(&[0x11; 64]));
    dma(&dev, cmd::CHECKSUM, GUEST_IOVA, 0, 0);
    assert_eq!(
        error_code(rd(&dev, regs::DMA_STATUS)),
        dma_error::BAD_LENGTH
    );
    dma(&dev, cmd::CHECKSUM, GUEST_IOVA, 0, (1 << 20) + 1);
    assert_eq!(
        error_code(rd(&dev, regs::DMA_STATUS)),
        dma_error::BAD_LENGTH
    );
    dma(&dev, 99, GUEST_IOVA, 0, 4);
    assert_eq!(
        error_code(rd(&dev, regs::DMA_STATUS)),
        dma_error::BAD_COMMAND
    );
    assert_eq!(rd(&dev, regs::DMA_CMD), 99);
}

#[test]
fn ram_bar_sparse_mmap() {
    let dev = SampleDevice::new().unwrap();
    let info = dev.region_info(RAM_BAR).unwrap();
    assert_eq!(info.size, RAM_SIZE);
    assert_eq!(
        info.flags,
        region_flags::READ | region_flags::WRITE | region_flags::MMAP
    );
    assert_eq!(
        info.sparse,
        vec![SparseArea {
            offset: 0,
            size: RAM_MMAP_SIZE
        }]
    );
    let fd = info.fd.clone().expect("RAM BAR has an fd");
    let len = info.sparse[0].size as usize;
    // SAFETY: maps `len` bytes of the RAM BAR memfd (which is RAM_SIZE long) shared; the
    // mapping is only accessed with volatile reads/writes below and unmapped at the end.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            info.fd_offset as libc::off_t,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let p = p as *mut u8;
    dev.region_write(RAM_BAR, 100, &[0xab, 0xcd]).unwrap();
    // SAFETY: offsets 100, 101 and 4000 are inside the `len`-byte mapping.
    let (a, b) = unsafe {
        std::ptr::write_volatile(p.add(4000), 0x5a);
        (
            std::ptr::read_volatile(p.add(100)),
            std::ptr::read_volatile(p.add(101)),
        )
    };
    assert_eq!(
        (a, b),
        (0xab, 0xcd),
        "region writes are visible in the mmap"
    );
    let mut one = [0u8; 1];
    dev.region_read(RAM_BAR, 4000, &mut one).unwrap();
    assert_eq!(one[0], 0x5a, "mmap writes are visible to region reads");
    // SAFETY: unmaps exactly the mapping made above.
    assert_eq!(unsafe { libc::munmap(p as *mut libc::c_void, len) }, 0);
    // The part outside the sparse area works by message.
    dev.region_write(RAM_BAR, RAM_SIZE - 4, &[1, 2, 3, 4])
        .unwrap();
    let mut four = [0u8; 4];
    dev.region_read(RAM_BAR, RAM_SIZE - 4, &mut four).unwrap();
    assert_eq!(four, [1, 2, 3, 4]);
    assert!(dev.region_read(RAM_BAR, RAM_SIZE - 3, &mut four).is_err());
    assert!(dev.region_write(RAM_BAR, u64::MAX - 1, &four).is_err());
    assert_eq!(dev.ram_contents().unwrap()[100], 0xab);
}

#[test]
fn hostile_region_accesses() {
    let dev = SampleDevice::new().unwrap();
    let mut b = [0u8; 16];
    for (off, len) in [
        (0u64, 1usize),
        (0, 2),
        (2, 4),
        (4, 8),
        (0, 16),
        (BAR0_SIZE, 4),
        (BAR0_SIZE - 4, 8),
        (u64::MAX - 3, 4),
        (u64::MAX, 1),
    ] {
        assert!(
            dev.region_read(0, off, &mut b[..len]).is_err(),
            "{off:#x}+{len}"
        );
        assert!(
            dev.region_write(0, off, &b[..len]).is_err(),
            "{off:#x}+{len}"
        );
    }
    // 8-byte accesses are two registers.
    dev.region_write(0, regs::DMA_SRC_LO, &0x1122_3344_5566_7788u64.to_le_bytes())
        .unwrap();
    assert_eq!(dev.registers().src, 0x1122_3344_5566_7788);
    // MSI-X table: out of table range is a register access; odd sizes refused.
    assert!(dev
        .region_read(0, MSIX_TABLE_OFFSET + 1, &mut b[..2])
        .is_err());
    assert!(dev
        .region_read(pci_index::CONFIG, 255, &mut b[..2])
        .is_err());
    assert!(dev.region_write(pci_index::CONFIG, 0x3d, &[0, 0]).is_err());
    assert!(dev.region_write(pci_index::CONFIG, 0x10, &[0; 8]).is_err());
    assert!(dev
        .region_read(pci_index::CONFIG, u64::MAX, &mut b[..1])
        .is_err());
    let mut all = [0u8; 256];
    dev.region_read(pci_index::CONFIG, 0, &mut all).unwrap();
    assert!(dev.region_read(1, 0, &mut b[..4]).is_err());
    assert!(dev.region_write(8, 0, &b[..4]).is_err());
    assert!(dev.region_read(100, 0, &mut b[..4]).is_err());
    assert!(dev
        .set_irqs(7, IrqAction::Trigger, 0, 0, IrqData::None)
        .is_err());
}

/// Drive the device through STOP_COPY and return the whole stream, read in 1000-byte
/// chunks.
fn save(dev: &SampleDevice) -> Vec<u8> {
    assert_eq!(
        dev.mig_set_state(MigState::StopCopy).unwrap(),
        MigState::StopCopy
    );
    read_stream(dev, 1000).unwrap()
}

fn load(dev: &SampleDevice, stream: &[u8]) -> nestio_device_model::Result<MigState> {
    dev.mig_set_state(MigState::Resuming)?;
    for c in stream.chunks(4096) {
        dev.mig_data_write(c)?;
    }
    dev.mig_set_state(MigState::Running)
}

#[test]
fn migration_round_trip_with_dirty_logging() {
    let a = SampleDevice::new().unwrap();
    let g = Guest::map(&a, 1 << 20, 1 << 20, Prot::RW);
    enable_bus_master(&a);
    cfg_wr(&a, 0x10, &0xfebf_0000u32.to_le_bytes());
    a.dma_logging_start(4096, &[DmaRange::new(GUEST_IOVA, 1 << 20).unwrap()])
        .unwrap();
    wr(&a, regs::SCRATCH, 0x1234_5678);
    wr(&a, regs::INT_MASK, intr::DMA_DONE);
    wr(&a, regs::DMA_PATTERN, 0x0102_0304);
    dma(&a, cmd::FILL, 0, GUEST_IOVA + 0x3000, 0x2000);
    let dirty = a
        .dma_logging_report(DmaRange::new(GUEST_IOVA, 1 << 20).unwrap(), 4096)
        .unwrap();
    assert_eq!(dirty[0], 0b11000, "pages 3 and 4 dirtied by the fill");
    assert_eq!(g.read(GUEST_IOVA + 0x3000, 4), vec![4, 3, 2, 1]);
    g.write(GUEST_IOVA, &[9; 32]);
    dma(&a, cmd::CHECKSUM, GUEST_IOVA, 0, 32);
    wr(&a, MSIX_TABLE_OFFSET + 16, 0xfee0_1000);
    wr(&a, MSIX_TABLE_OFFSET + 28, 0);
    let ram = pattern(RAM_SIZE as usize, 5);
    a.region_write(RAM_BAR, 0, &ram).unwrap();
    let regs_a = a.registers();
    assert_eq!(regs_a.int_status, intr::DMA_DONE);
    assert_eq!(regs_a.result, adler32(&[9; 32]));

    let stream = save(&a);
    assert_eq!(stream.len(), STREAM_LEN);
    // Frozen while stopped.
    assert!(a.region_write(0, regs::SCRATCH, &[0; 4]).is_err());
    assert!(a.mig_data_write(&[0]).is_err());

    let b = SampleDevice::new().unwrap();
    let intx = eventfd();
    wire(&b, pci_index::INTX_IRQ, &[&intx]);
    assert_eq!(load(&b, &stream).unwrap(), MigState::Running);
    assert_eq!(b.registers(), regs_a);
    assert_eq!(b.ram_contents().unwrap(), ram);
    assert_eq!(b.config().snapshot(), a.config().snapshot());
    assert_eq!(b.config().bar_address(0), Some(0xfebf_0000));
    assert!(b.config().bus_master());
    assert_eq!(rd(&b, MSIX_TABLE_OFFSET + 16), 0xfee0_1000);
    assert_eq!(rd(&b, MSIX_TABLE_OFFSET + 28), 0);
    assert_eq!(rd(&b, MSIX_TABLE_OFFSET + 12), 1);
    assert_eq!(fired(&intx), 0, "DMA_DONE is pending but masked");
    wr(&b, regs::INT_MASK, 0);
    assert_eq!(fired(&intx), 1);
    // The source resumes too.
    assert_eq!(
        a.mig_set_state(MigState::Running).unwrap(),
        MigState::Running
    );
    wr(&a, regs::SCRATCH, 1);
}

#[test]
fn migration_rejects_bad_streams() {
    let a = SampleDevice::new().unwrap();
    wr(&a, regs::SCRATCH, 42);
    let stream = save(&a);
    assert!(a.mig_data_read(&mut [0u8; 8]).is_ok());

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("truncated", stream[..stream.len() - 1].to_vec()),
        ("header only", stream[..12].to_vec()),
    ];
    let mut corrupt = stream.clone();
    corrupt[5000] ^= 0x40;
    cases.push(("corrupted RAM byte", corrupt));
    let mut magic = stream.clone();
    magic[0] ^= 1;
    cases.push(("bad magic", magic));
    let mut version = stream.clone();
    version[4] = 9;
    cases.push(("bad version", version));
    let mut trailer = stream.clone();
    let n = trailer.len();
    trailer[n - 1] ^= 0xff;
    cases.push(("bad checksum", trailer));

    for (what, data) in cases {
        let b = SampleDevice::new().unwrap();
        assert!(load(&b, &data).is_err(), "{what} accepted");
        assert_eq!(b.mig_state().unwrap(), MigState::Error, "{what}");
        assert_eq!(b.registers().scratch, 0, "{what}: nothing applied");
        // Only a reset leaves ERROR.
        assert!(b.mig_set_state(MigState::Running).is_err());
        b.reset().unwrap();
        assert_eq!(b.mig_state().unwrap(), MigState::Running);
    }
    // Too long: refused at write time.
    let b = SampleDevice::new().unwrap();
    b.mig_set_state(MigState::Resuming).unwrap();
    b.mig_data_write(&stream).unwrap();
    assert!(b.mig_data_write(&[0]).is_err());
    assert!(b.mig_data_read(&mut [0u8; 8]).is_err());
    assert_eq!(
        b.mig_set_state(MigState::Running).unwrap(),
        MigState::Running
    );
    assert_eq!(b.registers().scratch, 42);
}

#[test]
fn reset_clears_registers_keeps_maps() {
    let dev = SampleDevice::new().unwrap();
    let g = Guest::map(&dev, 1 << 16, 1 << 16, Prot::RW);
    let intx = eventfd();
    wire(&dev, pci_index::INTX_IRQ, &[&intx]);
    enable_bus_master(&dev);
    wr(&dev, regs::SCRATCH, 5);
    wr(&dev, regs::INT_MASK, intr::SOFT);
    wr(&dev, MSIX_TABLE_OFFSET + 12, 0);
    dev.region_write(RAM_BAR, 0, &[7; 8]).unwrap();
    dma(&dev, cmd::FILL, 0, GUEST_IOVA, 8);
    assert_eq!(fired(&intx), 1);
    assert_ne!(dev.config().status() & status::INTERRUPT, 0);
    dev.mig_set_state(MigState::Stop).unwrap();

    dev.reset().unwrap();
    assert_eq!(dev.registers(), Default::default());
    assert_eq!(rd(&dev, regs::INT_STATUS), 0);
    assert_eq!(rd(&dev, regs::ID), ID_VALUE);
    assert_eq!(
        rd(&dev, MSIX_TABLE_OFFSET + 12),
        1,
        "MSI-X entries masked again"
    );
    assert_eq!(dev.config().status() & status::INTERRUPT, 0);
    assert_eq!(dev.mig_state().unwrap(), MigState::Running);
    assert_eq!(dev.dma_table().unwrap().len(), 1, "DMA maps survive reset");
    assert_eq!(dev.ram_contents().unwrap()[..8], [7; 8]);
    // The eventfd stays wired and DMA works right away.
    dev.set_irqs(pci_index::INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)
        .unwrap();
    wr(&dev, regs::DMA_PATTERN, 0x6666_6666);
    dma(&dev, cmd::FILL, 0, GUEST_IOVA, 8);
    assert_eq!(rd(&dev, regs::DMA_STATUS), dma_status::DONE);
    assert_eq!(g.read(GUEST_IOVA, 8), vec![0x66; 8]);
    assert_eq!(fired(&intx), 1);
    // Unmap-all still works afterwards.
    dev.dma_unmap_all().unwrap();
    dma(&dev, cmd::FILL, 0, GUEST_IOVA, 8);
    assert_eq!(error_code(rd(&dev, regs::DMA_STATUS)), dma_error::FAULT);
}

#[test]
fn concurrent_commands_never_corrupt_state() {
    let dev = sample_device().unwrap();
    let g = Guest::map(&dev, 1 << 21, 1 << 21, Prot::RW);
    enable_bus_master(&dev);
    g.write(GUEST_IOVA, &pattern(1 << 20, 11));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let d = dev.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    dma(&d, cmd::COPY, GUEST_IOVA, GUEST_IOVA + (1 << 20), 1 << 20);
                    let st = rd(&d, regs::DMA_STATUS);
                    assert!(
                        st == dma_status::DONE
                            || st == dma_status::BUSY
                            || error_code(st) == dma_error::BUSY,
                        "status {st:#x}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Whichever commands ran, the copy is intact.
    assert_eq!(
        g.read(GUEST_IOVA + (1 << 20), 1 << 20),
        pattern(1 << 20, 11)
    );
}

/// Memory reached by messages: the peer answers from a Vec and, on every access, reads a
/// device register — which would deadlock if the device held its state lock during DMA.
struct ReentrantPeer {
    mem: std::sync::Mutex<Vec<u8>>,
    dev: std::sync::Mutex<std::sync::Weak<SampleDevice>>,
    base: u64,
}

impl nestio_dma::DmaPeer for ReentrantPeer {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.poke();
        let m = self.mem.lock().unwrap();
        let off = (addr - self.base) as usize;
        buf.copy_from_slice(m.get(off..off + buf.len()).ok_or(libc::EFAULT)?);
        Ok(())
    }
    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), i32> {
        self.poke();
        let mut m = self.mem.lock().unwrap();
        let off = (addr - self.base) as usize;
        m.get_mut(off..off + data.len())
            .ok_or(libc::EFAULT)?
            .copy_from_slice(data);
        Ok(())
    }
}

impl ReentrantPeer {
    fn poke(&self) {
        if let Some(d) = self.dev.lock().unwrap().upgrade() {
            assert_eq!(rd(&d, regs::DMA_STATUS), dma_status::BUSY);
        }
    }
}

#[test]
fn peer_dma_does_not_hold_the_device_lock() {
    let dev = sample_device().unwrap();
    let peer = Arc::new(ReentrantPeer {
        mem: std::sync::Mutex::new(pattern(64 << 10, 21)),
        dev: std::sync::Mutex::new(Arc::downgrade(&dev)),
        base: GUEST_IOVA,
    });
    dev.dma_map(DmaMapRequest {
        range: DmaRange::new(GUEST_IOVA, 64 << 10).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Peer(peer.clone()),
    })
    .unwrap();
    enable_bus_master(&dev);
    dma(&dev, cmd::COPY, GUEST_IOVA, GUEST_IOVA + (32 << 10), 20_000);
    assert_eq!(rd(&dev, regs::DMA_STATUS), dma_status::DONE);
    let m = peer.mem.lock().unwrap().clone();
    assert_eq!(m[32 << 10..(32 << 10) + 20_000], m[..20_000]);
    assert!(dev.dma_table().unwrap().stats().peer_ops >= 4);
}

/// A tiny deterministic generator for hostile inputs.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 11
    }
    fn offset(&mut self) -> u64 {
        match self.next() % 4 {
            0 => u64::MAX - self.next() % 16,
            1 => self.next() % 0x1_1000,
            _ => self.next() % 0x1000,
        }
    }
}

#[test]
fn random_region_accesses_never_panic() {
    let dev = SampleDevice::new().unwrap();
    let _g = Guest::map(&dev, 1 << 16, 1 << 16, Prot::RW);
    let mut r = Lcg(0x5eed);
    let mut buf = [0u8; 64];
    for _ in 0..20_000 {
        let index = (r.next() % 10) as u32;
        let off = r.offset();
        let len = [0usize, 1, 2, 3, 4, 8, 16, 64][(r.next() % 8) as usize];
        if r.next().is_multiple_of(2) {
            let _ = dev.region_read(index, off, &mut buf[..len]);
        } else {
            for b in &mut buf[..len] {
                *b = r.next() as u8;
            }
            // Keep DMA lengths small so the loop stays quick.
            if index == 0 && off == regs::DMA_LEN && len == 4 {
                buf[2] = 0;
                buf[3] = 0;
            }
            let _ = dev.region_write(index, off, &buf[..len]);
        }
    }
    // Still a working device.
    assert_eq!(rd(&dev, regs::ID), ID_VALUE);
    dev.reset().unwrap();
    assert_eq!(dev.registers(), Default::default());
}

#[test]
fn random_migration_streams_rejected() {
    let a = SampleDevice::new().unwrap();
    let stream = save(&a);
    let mut r = Lcg(77);
    for i in 0..20 {
        let mut s = stream.clone();
        match i % 3 {
            0 => {
                let at = (r.next() as usize) % s.len();
                s[at] ^= 1 << (r.next() % 8);
            }
            1 => s.truncate((r.next() as usize) % s.len()),
            _ => s.iter_mut().for_each(|b| *b = r.next() as u8),
        }
        let b = SampleDevice::new().unwrap();
        assert!(load(&b, &s).is_err(), "case {i}");
        assert_eq!(b.mig_state().unwrap(), MigState::Error);
    }
}
