//! An e1000 driven in this process through the `VfioDevice` trait the way a guest
//! driver behind a VMM would, shared by `e1000.rs` and `e1000_delay.rs`: guest memory is
//! a memfd mapped with `dma_map` at [`IOVA`], rings and buffers live in it, interrupts
//! arrive on eventfds set with `set_irqs`. Each test file adds the ring handling it
//! needs (its own ring sizes and layout) in its own `impl Guest`.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nestio_device_model::{pci_index, IrqAction, IrqData, VfioDevice};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use nestio_emulated::e1000::{E1000Config, E1000};

/// Where guest memory starts in the device's DMA space (file offset 0).
pub const IOVA: u64 = 0x10_0000;
/// The guest's memory layout, as offsets from [`IOVA`]: the TX descriptor ring (up to
/// 256 descriptors), the RX ring, and the 2 KiB TX and RX buffers (one per descriptor:
/// up to 96 TX buffers before the RX ones).
pub const TX_RING: u64 = 0x0;
pub const RX_RING: u64 = 0x1000;
pub const TX_BUF: u64 = 0x1_0000;
pub const RX_BUF: u64 = 0x4_0000;

/// A fresh non-blocking eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers; checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd failed");
    // SAFETY: fresh descriptor owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Read and reset an eventfd counter (0 when not signalled).
pub fn take(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64.
    let r = unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    if r == 8 {
        v
    } else {
        0
    }
}

/// Wait until `fd` is readable, at most `d`.
pub fn wait_for(fd: &OwnedFd, d: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// A guest: device, memory, interrupt eventfds.
pub struct Guest {
    pub dev: Arc<E1000>,
    pub mem: Arc<OwnedFd>,
    pub intx: OwnedFd,
    /// Wired only once the guest enables MSI ([`Guest::wire_msi`]).
    pub msi: OwnedFd,
}

impl Guest {
    /// The e1000 of `config` with the first `mapped` bytes of `mem` mapped at [`IOVA`],
    /// INTx wired to `intx`, and memory decoding and bus mastering on.
    pub fn on_memory(config: E1000Config, mem: Arc<OwnedFd>, mapped: u64) -> Guest {
        let dev = E1000::new(config).unwrap();
        dev.dma_map(DmaMapRequest {
            range: DmaRange::new(IOVA, mapped).unwrap(),
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd: mem.clone(),
                offset: 0,
            },
        })
        .unwrap();
        let intx = eventfd();
        let msi = eventfd();
        dev.set_irqs(
            pci_index::INTX_IRQ,
            IrqAction::Trigger,
            0,
            1,
            IrqData::Eventfd(vec![Some(intx.try_clone().unwrap())]),
        )
        .unwrap();
        let g = Guest {
            dev,
            mem,
            intx,
            msi,
        };
        // Memory + bus master.
        g.cfg_write16(4, 0x6);
        g
    }

    /// What a VMM does when the guest enables MSI: wire the MSI eventfd.
    pub fn wire_msi(&self) {
        self.dev
            .set_irqs(
                pci_index::MSI_IRQ,
                IrqAction::Trigger,
                0,
                1,
                IrqData::Eventfd(vec![Some(self.msi.try_clone().unwrap())]),
            )
            .unwrap();
    }

    /// A register read (BAR 0).
    pub fn rd(&self, off: u32) -> u32 {
        let mut b = [0u8; 4];
        self.dev.region_read(0, u64::from(off), &mut b).unwrap();
        u32::from_le_bytes(b)
    }
    /// A register write (BAR 0).
    pub fn wr(&self, off: u32, v: u32) {
        self.dev
            .region_write(0, u64::from(off), &v.to_le_bytes())
            .unwrap();
    }
    pub fn cfg_read16(&self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.dev
            .region_read(pci_index::CONFIG, off, &mut b)
            .unwrap();
        u16::from_le_bytes(b)
    }
    pub fn cfg_read8(&self, off: u64) -> u8 {
        let mut b = [0u8; 1];
        self.dev
            .region_read(pci_index::CONFIG, off, &mut b)
            .unwrap();
        b[0]
    }
    pub fn cfg_write16(&self, off: u64, v: u16) {
        self.dev
            .region_write(pci_index::CONFIG, off, &v.to_le_bytes())
            .unwrap();
    }
    /// Write guest memory at DMA address `iova`.
    pub fn mem_write(&self, iova: u64, data: &[u8]) {
        let off = iova - IOVA;
        // SAFETY: writes from a valid slice to our memfd.
        let r = unsafe {
            libc::pwrite(
                self.mem.as_raw_fd(),
                data.as_ptr() as *const libc::c_void,
                data.len(),
                off as libc::off_t,
            )
        };
        assert_eq!(r, data.len() as isize);
    }
    /// Read the memory file at `off` (mapped for DMA or not).
    pub fn mem_read_file(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        // SAFETY: reads into a valid buffer from our memfd.
        let r = unsafe {
            libc::pread(
                self.mem.as_raw_fd(),
                v.as_mut_ptr() as *mut libc::c_void,
                len,
                off as libc::off_t,
            )
        };
        assert_eq!(r, len as isize);
        v
    }
    /// Read guest memory at DMA address `iova`.
    pub fn mem_read(&self, iova: u64, len: usize) -> Vec<u8> {
        self.mem_read_file(iova - IOVA, len)
    }
}
