//! A device served by the rust-vmm `vfio_user` 0.1.7 [`Server`]: a [`ServerBackend`]
//! that keeps real state (region memory, a DMA map table with spec semantics, irq
//! eventfds that it can fire) and records every call, so tests can check both what a
//! client caused and what the server passed on.

#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vfio_bindings::bindings::vfio::*;
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

/// Region 0: 4 KiB of plain memory, accessed by messages.
pub const R0_SIZE: u64 = 0x1000;
/// Region 1: 16 KiB, memfd-backed, mmappable in the sparse area [0x2000, 0x4000).
pub const R1_SIZE: u64 = 0x4000;
/// The sparse area of region 1.
pub const R1_SPARSE: (u64, u64) = (0x2000, 0x2000);
/// Region 2: 8 KiB, memfd-backed, mmappable as a whole (MMAP flag, no sparse cap).
pub const R2_SIZE: u64 = 0x2000;
/// Offset of region 2 inside its memfd (spec: the reply's `offset` is the mmap offset).
pub const R2_FD_OFFSET: u64 = 0x1000;

/// Everything the backend saw.
#[derive(Default, Debug)]
pub struct Log {
    pub resets: u32,
    /// (flags, offset, address, size, had_fd)
    pub maps: Vec<(u32, u64, u64, u64, bool)>,
    /// (flags, address, size)
    pub unmaps: Vec<(u32, u64, u64)>,
    /// (index, flags, start, count, number of fds)
    pub set_irqs: Vec<(u32, u32, u32, u32, usize)>,
    /// (region, offset, data)
    pub writes: Vec<(u32, u64, Vec<u8>)>,
    /// The irq eventfds currently installed, by (index, vector).
    pub irq_fds: Vec<((u32, u32), File)>,
}

/// The state shared between the backend (in the server thread) and the test.
pub struct Shared {
    pub log: Mutex<Log>,
    /// Region 0 contents.
    pub r0: Mutex<Vec<u8>>,
    /// Backing file of regions 1 and 2.
    pub memfd: OwnedFd,
    /// Current DMA mappings (address, size) with their fds.
    pub dma: Mutex<Vec<(u64, u64, Option<File>)>>,
}

impl Shared {
    /// Fire irq (index, vector) if the client installed an eventfd for it.
    pub fn fire(&self, index: u32, vector: u32) -> bool {
        let log = self.log.lock().unwrap();
        match log.irq_fds.iter().find(|(k, _)| *k == (index, vector)) {
            Some((_, f)) => {
                let one = 1u64.to_ne_bytes();
                // SAFETY: writes 8 bytes from a local array to an fd we own.
                let r = unsafe { libc::write(f.as_raw_fd(), one.as_ptr() as *const _, 8) };
                r == 8
            }
            None => false,
        }
    }
}

struct Backend(Arc<Shared>);

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

impl Backend {
    fn region_file_offset(region: u32, offset: u64, len: usize) -> io::Result<u64> {
        let (base, size) = match region {
            1 => (0, R1_SIZE),
            2 => (R2_FD_OFFSET, R2_SIZE),
            _ => return Err(err(libc::EINVAL)),
        };
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| err(libc::EINVAL))?;
        if end > size {
            return Err(err(libc::EINVAL));
        }
        Ok(base + offset)
    }
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        if region == 0 {
            let r0 = self.0.r0.lock().unwrap();
            let end = offset
                .checked_add(data.len() as u64)
                .ok_or_else(|| err(libc::EINVAL))?;
            if end > R0_SIZE {
                return Err(err(libc::EINVAL));
            }
            data.copy_from_slice(&r0[offset as usize..end as usize]);
            return Ok(());
        }
        let off = Self::region_file_offset(region, offset, data.len())?;
        let v = super::pread(self.0.memfd.as_raw_fd(), off, data.len());
        data.copy_from_slice(&v);
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0
            .log
            .lock()
            .unwrap()
            .writes
            .push((region, offset, data.to_vec()));
        if region == 0 {
            let mut r0 = self.0.r0.lock().unwrap();
            let end = offset
                .checked_add(data.len() as u64)
                .ok_or_else(|| err(libc::EINVAL))?;
            if end > R0_SIZE {
                return Err(err(libc::EINVAL));
            }
            r0[offset as usize..end as usize].copy_from_slice(data);
            return Ok(());
        }
        let off = Self::region_file_offset(region, offset, data.len())?;
        super::pwrite(self.0.memfd.as_raw_fd(), off, data);
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        self.0
            .log
            .lock()
            .unwrap()
            .maps
            .push((flags.bits(), offset, address, size, fd.is_some()));
        let end = address.checked_add(size).ok_or_else(|| err(libc::EINVAL))?;
        if size == 0 {
            return Err(err(libc::EINVAL));
        }
        let mut dma = self.0.dma.lock().unwrap();
        // Spec: a map over an existing region fails with EEXIST.
        if dma.iter().any(|(a, s, _)| address < a + s && *a < end) {
            return Err(err(libc::EEXIST));
        }
        dma.push((address, size, fd));
        Ok(())
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        self.0
            .log
            .lock()
            .unwrap()
            .unmaps
            .push((flags.bits(), address, size));
        let mut dma = self.0.dma.lock().unwrap();
        if flags.contains(DmaUnmapFlags::UNMAP_ALL) {
            dma.clear();
            return Ok(());
        }
        // Spec: address and size must match a previous mapping exactly.
        match dma.iter().position(|(a, s, _)| *a == address && *s == size) {
            Some(i) => {
                dma.remove(i);
                Ok(())
            }
            None => Err(err(libc::ENOENT)),
        }
    }

    fn reset(&mut self) -> io::Result<()> {
        self.0.log.lock().unwrap().resets += 1;
        self.0.r0.lock().unwrap().fill(0);
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        let mut log = self.0.log.lock().unwrap();
        log.set_irqs.push((index, flags, start, count, fds.len()));
        if flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 && flags & VFIO_IRQ_SET_ACTION_TRIGGER != 0 {
            if fds.len() != count as usize {
                return Err(err(libc::EINVAL));
            }
            for (i, f) in fds.into_iter().enumerate() {
                let key = (index, start + i as u32);
                log.irq_fds.retain(|(k, _)| *k != key);
                log.irq_fds.push((key, f));
            }
        } else if flags & VFIO_IRQ_SET_DATA_NONE != 0 && count == 0 {
            log.irq_fds.retain(|((i, _), _)| *i != index);
        }
        Ok(())
    }
}

/// A running `vfio_user::Server`.
pub struct TheirServer {
    pub path: PathBuf,
    pub shared: Arc<Shared>,
    /// The server thread: `Server::run` serves exactly one connection.
    pub thread: Option<JoinHandle<Result<(), vfio_user::Error>>>,
}

impl TheirServer {
    /// Wait for the server thread (it ends when its one client disconnects); Err if it
    /// panicked.
    pub fn join(&mut self) -> std::thread::Result<Result<(), vfio_user::Error>> {
        self.thread.take().expect("joined twice").join()
    }
}

/// The irq table the test server offers: INTx (1 vector, maskable), MSI-X (4 vectors).
pub fn irq_table() -> Vec<IrqInfo> {
    vec![
        IrqInfo {
            index: VFIO_PCI_INTX_IRQ_INDEX,
            flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
            count: 1,
        },
        IrqInfo {
            index: VFIO_PCI_MSI_IRQ_INDEX,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: 0,
        },
        IrqInfo {
            index: VFIO_PCI_MSIX_IRQ_INDEX,
            flags: VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
            count: 4,
        },
    ]
}

/// Start their server with regions 0 (message-only), 1 (sparse mmap) and 2 (whole
/// mmap), the irq table of [`irq_table`], and `resettable` as the RESET flag.
pub fn start(tag: &str, resettable: bool) -> TheirServer {
    start_with(tag, resettable, 1)
}

/// Like [`start`], with `r1_areas` sparse areas in region 1: the first is [`R1_SPARSE`],
/// the others 16-byte areas inside [0x100, 0x2000) (not mappable in practice: only the
/// capability encoding matters to the tests that use them).
pub fn start_with(tag: &str, resettable: bool, r1_areas: usize) -> TheirServer {
    let path = super::sock_path(tag);
    let memfd = super::memfd(R2_FD_OFFSET + R2_SIZE.max(R1_SIZE));
    let mmap_raw = memfd.as_raw_fd();
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    let region = |index: u32, flags: u32, size: u64, offset: u64| vfio_region_info {
        argsz: std::mem::size_of::<vfio_region_info>() as u32,
        flags,
        index,
        cap_offset: 0,
        size,
        offset,
    };
    let regions = vec![
        ServerRegion {
            region_info: region(0, rw, R0_SIZE, 0),
            sparse_areas: Vec::new(),
            mmap_fd: None,
        },
        ServerRegion {
            region_info: region(1, rw | VFIO_REGION_INFO_FLAG_MMAP, R1_SIZE, 0),
            sparse_areas: (0..r1_areas as u64)
                .map(|i| vfio_user::SparseArea {
                    area: if i == 0 {
                        vfio_region_sparse_mmap_area {
                            offset: R1_SPARSE.0,
                            size: R1_SPARSE.1,
                        }
                    } else {
                        vfio_region_sparse_mmap_area {
                            offset: 0x100 * i,
                            size: 0x10,
                        }
                    },
                })
                .collect(),
            mmap_fd: Some(mmap_raw),
        },
        ServerRegion {
            region_info: region(2, rw | VFIO_REGION_INFO_FLAG_MMAP, R2_SIZE, R2_FD_OFFSET),
            sparse_areas: Vec::new(),
            mmap_fd: Some(mmap_raw),
        },
    ];
    let shared = Arc::new(Shared {
        log: Mutex::default(),
        r0: Mutex::new(vec![0u8; R0_SIZE as usize]),
        memfd,
        dma: Mutex::default(),
    });
    let server = Server::new(&path, resettable, irq_table(), regions).expect("their Server::new");
    let mut backend = Backend(shared.clone());
    let thread = std::thread::spawn(move || server.run(&mut backend));
    TheirServer {
        path,
        shared,
        thread: Some(thread),
    }
}
