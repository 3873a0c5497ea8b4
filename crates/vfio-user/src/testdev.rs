//! A small device for tests, the fuzzer and the benchmark.
//!
//! Regions:
//! - 0: 64 KiB of RAM ("BAR0"), read/write by message;
//! - 1: 64 bytes of registers: a DMA engine. `DMA_ADDR` (0x00), `DMA_LEN` (0x08),
//!   `DMA_OFF` (0x10, offset in region 0), `DMA_CMD` (0x18: write 1 = copy guest memory
//!   into region 0, 2 = copy region 0 to guest memory), `DMA_STATUS` (0x20: errno of the
//!   last DMA, 0 = ok), `DOORBELL` (0x28, also offered as an ioeventfd). A finished DMA
//!   raises MSI vector 0 (irq index 1). The DMA runs inside the register write, i.e. while
//!   the client waits for the REGION_WRITE reply;
//! - 2: 8 KiB backed by a memfd, mmappable in the sparse area [0x1000, 0x2000).
//!
//! Irqs: index 0 INTx (1 vector, maskable, automasked), index 1 MSI (4 vectors).
//! Migration v2 with STOP_COPY: the state is region 0 followed by the registers.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use nestio_device::irq::Irqs;
use nestio_device::migration::{MigrationData, MigrationFsm};
use nestio_device::{
    flags, irq_flags, region_flags, DeviceError, DeviceInfo, DmaPort, IoEventFd, IrqAction,
    IrqData, IrqInfo, MigState, MigrationFlags, RegionInfo, Result, SparseArea, VfioDevice,
};
use nestio_dma::DmaSpace;

/// Size of region 0.
pub const RAM_SIZE: usize = 64 * 1024;
/// Size of region 1.
pub const REGS_SIZE: usize = 64;
/// Size of region 2.
pub const MEMFD_SIZE: u64 = 8192;
/// Register offsets of region 1.
pub mod reg {
    /// Guest address.
    pub const DMA_ADDR: u64 = 0x00;
    /// Length.
    pub const DMA_LEN: u64 = 0x08;
    /// Offset in region 0.
    pub const DMA_OFF: u64 = 0x10;
    /// Command: 1 = guest -> region 0, 2 = region 0 -> guest.
    pub const DMA_CMD: u64 = 0x18;
    /// errno of the last DMA.
    pub const DMA_STATUS: u64 = 0x20;
    /// Doorbell (ioeventfd).
    pub const DOORBELL: u64 = 0x28;
}

struct State {
    ram: Vec<u8>,
    regs: [u8; REGS_SIZE],
    mig: MigrationData,
}

/// The test device. See the module documentation.
pub struct TestDevice {
    state: Mutex<State>,
    fsm: Mutex<MigrationFsm>,
    memfd: Arc<OwnedFd>,
    doorbell: Arc<OwnedFd>,
    irqs: Irqs,
    dma: DmaPort,
    resets: AtomicU32,
}

fn new_fd(r: libc::c_int) -> std::io::Result<OwnedFd> {
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: r is a fresh fd returned by the kernel and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

impl TestDevice {
    /// A new device.
    pub fn new() -> std::io::Result<Self> {
        let memfd = nestio_dma::memfd::sealed_memfd(c"nestio-testdev", MEMFD_SIZE)?;
        // SAFETY: eventfd returns a new fd or -1 (checked by new_fd).
        let doorbell = new_fd(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        Ok(TestDevice {
            state: Mutex::new(State {
                ram: vec![0; RAM_SIZE],
                regs: [0; REGS_SIZE],
                mig: MigrationData::new("test device", RAM_SIZE + REGS_SIZE),
            }),
            fsm: Mutex::new(MigrationFsm::new(MigrationFlags(MigrationFlags::STOP_COPY))),
            memfd: Arc::new(memfd),
            doorbell: Arc::new(doorbell),
            irqs: Irqs::new(&[
                IrqInfo {
                    index: 0,
                    flags: irq_flags::EVENTFD | irq_flags::MASKABLE | irq_flags::AUTOMASKED,
                    count: 1,
                },
                IrqInfo {
                    index: 1,
                    flags: irq_flags::EVENTFD,
                    count: 4,
                },
            ]),
            dma: DmaPort::default(),
            resets: AtomicU32::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of resets so far.
    pub fn resets(&self) -> u32 {
        self.resets.load(Ordering::Relaxed)
    }

    /// The interrupt state (tests check eventfds).
    pub fn irqs(&self) -> &Irqs {
        &self.irqs
    }

    /// Raise an interrupt as the device would.
    pub fn trigger(&self, index: u32, vector: u32) -> bool {
        self.irqs.trigger(index, vector)
    }

    fn reg(regs: &[u8; REGS_SIZE], off: u64) -> u64 {
        let o = off as usize;
        let mut a = [0u8; 8];
        a.copy_from_slice(&regs[o..o + 8]);
        u64::from_le_bytes(a)
    }

    /// Run the DMA engine as programmed; returns the errno (0 = ok).
    fn run_dma(&self, st: &mut State, cmd: u64) -> i32 {
        let addr = Self::reg(&st.regs, reg::DMA_ADDR);
        let len = Self::reg(&st.regs, reg::DMA_LEN) as usize;
        let off = Self::reg(&st.regs, reg::DMA_OFF) as usize;
        let Some(end) = off.checked_add(len).filter(|&e| e <= RAM_SIZE) else {
            return libc::EINVAL;
        };
        let r = match cmd {
            1 => self.dma.read(addr, &mut st.ram[off..end]),
            2 => self.dma.write(addr, &st.ram[off..end]),
            _ => return libc::EINVAL,
        };
        match r {
            Ok(()) => {
                self.irqs.trigger(1, 0);
                0
            }
            Err(e) => e.errno(),
        }
    }

    fn snapshot(st: &State) -> Vec<u8> {
        let mut v = st.ram.clone();
        v.extend_from_slice(&st.regs);
        v
    }
}

impl VfioDevice for TestDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: flags::PCI | flags::RESET,
            num_regions: 3,
            num_irqs: 2,
        }
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        match index {
            0 => Ok(RegionInfo::rw(0, RAM_SIZE as u64)),
            1 => Ok(RegionInfo::rw(1, REGS_SIZE as u64)),
            2 => Ok(RegionInfo {
                index: 2,
                flags: region_flags::READ | region_flags::WRITE | region_flags::MMAP,
                size: MEMFD_SIZE,
                fd_offset: 0,
                sparse: vec![SparseArea {
                    offset: 0x1000,
                    size: 0x1000,
                }],
                fd: Some(self.memfd.clone()),
            }),
            _ => Err(DeviceError::NoSuchRegion(index)),
        }
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.region_info(index)?.check(offset, buf.len())?;
        let st = self.lock();
        match index {
            0 => buf.copy_from_slice(&st.ram[offset as usize..offset as usize + buf.len()]),
            1 => buf.copy_from_slice(&st.regs[offset as usize..offset as usize + buf.len()]),
            _ => {
                // SAFETY: pread into a live, exclusively borrowed buffer of buf.len() bytes.
                let r = unsafe {
                    libc::pread(
                        self.memfd.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        offset as libc::off_t,
                    )
                };
                if r < 0 || r as usize != buf.len() {
                    return Err(DeviceError::Io(std::io::Error::last_os_error()));
                }
            }
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.region_info(index)?.check(offset, data.len())?;
        let mut st = self.lock();
        let o = offset as usize;
        match index {
            0 => st.ram[o..o + data.len()].copy_from_slice(data),
            1 => {
                st.regs[o..o + data.len()].copy_from_slice(data);
                if offset == reg::DMA_CMD && data.len() == 8 {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(data);
                    let status = self.run_dma(&mut st, u64::from_le_bytes(a));
                    let s = reg::DMA_STATUS as usize;
                    st.regs[s..s + 8].copy_from_slice(&(status as u64).to_le_bytes());
                }
            }
            _ => {
                // SAFETY: pwrite from a live buffer of data.len() bytes.
                let r = unsafe {
                    libc::pwrite(
                        self.memfd.as_raw_fd(),
                        data.as_ptr() as *const libc::c_void,
                        data.len(),
                        offset as libc::off_t,
                    )
                };
                if r < 0 || r as usize != data.len() {
                    return Err(DeviceError::Io(std::io::Error::last_os_error()));
                }
            }
        }
        Ok(())
    }

    fn region_io_fds(&self, index: u32) -> Result<Vec<IoEventFd>> {
        self.region_info(index)?;
        if index != 1 {
            return Ok(Vec::new());
        }
        Ok(vec![IoEventFd {
            offset: reg::DOORBELL,
            size: 4,
            datamatch: Some(1),
            fd: self.doorbell.clone(),
        }])
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
        // Lock order everywhere: fsm, then state.
        let mut fsm = self.fsm.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        st.ram.fill(0);
        st.regs = [0; REGS_SIZE];
        st.mig.close();
        fsm.reset();
        self.resets.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn dma_port(&self) -> Option<&DmaPort> {
        Some(&self.dma)
    }

    fn migration_flags(&self) -> Option<MigrationFlags> {
        Some(self.fsm.lock().unwrap_or_else(|e| e.into_inner()).flags())
    }

    fn mig_state(&self) -> Result<MigState> {
        Ok(self.fsm.lock().unwrap_or_else(|e| e.into_inner()).state())
    }

    fn mig_set_state(&self, target: MigState) -> Result<MigState> {
        let mut fsm = self.fsm.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        fsm.transition(target, |from, to| {
            match (from, to) {
                (MigState::Stop, MigState::StopCopy) => {
                    let snap = Self::snapshot(&st);
                    st.mig.begin_save(snap);
                }
                (MigState::Stop, MigState::Resuming) => st.mig.begin_resume(),
                (MigState::Resuming, MigState::Stop) => {
                    let data = st.mig.finish_resume()?;
                    if data.len() != RAM_SIZE + REGS_SIZE {
                        return Err(DeviceError::Invalid(format!(
                            "migration stream has {} bytes, expected {}",
                            data.len(),
                            RAM_SIZE + REGS_SIZE
                        )));
                    }
                    st.ram.copy_from_slice(&data[..RAM_SIZE]);
                    st.regs.copy_from_slice(&data[RAM_SIZE..]);
                }
                (MigState::StopCopy, _) => st.mig.close(),
                _ => {}
            }
            Ok(())
        })
    }

    fn mig_data_read(&self, buf: &mut [u8]) -> Result<usize> {
        // Lock order: fsm, then state.
        let fsm = self.fsm.lock().unwrap_or_else(|e| e.into_inner());
        self.lock().mig.read(fsm.state(), buf)
    }

    fn mig_data_write(&self, data: &[u8]) -> Result<()> {
        let fsm = self.fsm.lock().unwrap_or_else(|e| e.into_inner());
        self.lock().mig.write(fsm.state(), data)
    }
}
