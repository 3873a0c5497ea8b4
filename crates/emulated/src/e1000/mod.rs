//! An emulated Intel 82540EM gigabit Ethernet controller (PCI 8086:100E, class
//! 0x020000) with VFIO semantics ([`nestio_device_model::VfioDevice`]).
//!
//! Regions (VFIO PCI indices): BAR0 = 128 KiB register file, BAR1 = 64-byte I/O
//! window (IOADDR at 0 selects a register, IODATA at 4 accesses it), region 7 = the
//! PCI configuration space (`config.rs`: power management at 0xDC as on the chip, an
//! MSI capability only when [`E1000Config::msi`] asks for one). Interrupts: INTx
//! (index 0, maskable, automasked: level) and, with the option, MSI (index 1, one
//! vector: edge).
//!
//! Structure:
//! - `regfile.rs`: the register file and interrupt logic behind one mutex (`Core`);
//! - `delay.rs`: the interrupt delay timers (TIDV/TADV, RDTR/RADV);
//! - `tx.rs`: the transmit ring, walked synchronously inside the TDT write;
//! - `rx.rs`: filtering and delivery of one received frame into the receive ring;
//! - `eeprom.rs`, `phy.rs`: EEPROM (EERD and Microwire bit-bang) and the MDIC PHY;
//! - `config.rs`: the PCI configuration space;
//! - `state.rs`: the migration stream's format (its transfer in chunks, and the
//!   errno of a request in the wrong state, are `nestio_device_model::migration::MigrationData`'s);
//! - this file: the [`E1000`] device (region dispatch, access-size checks, VFIO
//!   interrupts and migration) and its RX worker thread.
//!
//! **Receive on the register path.** After a transmit (a TDT write), the frames the
//! backend already has — the `user` network answers ARP and ICMP synchronously inside
//! `send` — are taken and delivered in the same register access, on the caller's thread,
//! and an RDT write does not wake the worker (`E1000Config::inline_rx`, on by default).
//! Without it every echo reply went backend -> worker thread -> guest: two worker
//! wake-ups per round trip (the backend's fd, then the RDT write), now 0.01 (`nestio
//! bench --only e1000` prints the counters, [`E1000::rx_counters`]). A frame is taken
//! from the backend and delivered under the backend lock (then the device lock), by the
//! register path or the worker alike, so the two never reorder frames.
//!
//! The RX worker polls the backend's fd and an eventfd of its own (stop, new receive
//! buffers, a deferred interrupt, migration state changes), with a timeout at the next
//! ITR-deferred interrupt or interrupt delay timer expiry (`ppoll`: a nanosecond
//! timeout, as the delays are microseconds); it is also what fires those interrupts, so
//! the timers cost no thread of their own. Received frames are delivered under the
//! device lock; while the device is stopped for migration it does no DMA: up to 64
//! frames wait in a queue that is part of the migration state, further frames are
//! counted as missed (MPC), and the delay timers are paused.
//!
//! Every DMA goes through the device's [`DmaPort`] (its map table, or a translating
//! space stacked on it) and only while the PCI command
//! register allows bus mastering. Register accesses must be 1, 2, 4 or 8 bytes and
//! naturally aligned (an 8-byte access is two 4-byte ones); anything else is refused
//! with EINVAL. A narrower read of a register with read side effects (ICR, statistics)
//! has the side effect of the full read. The command register's memory / I/O space
//! enable bits do not gate region accesses (the VMM maps BARs only when enabled);
//! Linux's e1000 driver issues CTRL.RST through the I/O window on the 82540, so a VMM
//! must route the I/O BAR.
//!
//! Departures from QEMU's e1000 (the datasheet wins): CTRL.RST resets the registers;
//! ICS and IMC read 0; TIPG reads back what was written; TXQE is raised only when
//! descriptors were used and the ring ran dry; RX starts as soon as RCTL.EN is set.
//! The register-level differences, each with the manual section that decides it, are
//! the table in `tests/e1000_qtest.rs` (checked against QEMU 7.2 through qtest).

mod config;
mod delay;
mod eeprom;
#[cfg(feature = "harness")]
mod fuzz;
mod phy;
mod regfile;
pub mod regs;
mod rx;
mod state;
mod tx;

use parking_lot::{Mutex, MutexGuard};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use nestio_device_model::irq::signal_eventfd;
use nestio_device_model::migration::MigrationFsm;
use nestio_device_model::pci::{PciError, PciFunction};
use nestio_device_model::{
    pci_index, DeviceError, DeviceInfo, DmaPort, IrqAction, IrqData, IrqInfo, MigState,
    MigrationFlags, RegionInfo, Result, VfioDevice,
};
use nestio_net::NetBackend;

use self::regfile::{Core, PENDING_MAX};
pub use eeprom::{Eeprom, EEPROM_SUM, EEPROM_WORDS};
#[cfg(feature = "harness")]
pub use fuzz::fuzz_e1000;
pub use rx::{crc32, mta_hash, RxOutcome};
pub use state::StateError;

/// PCI vendor ID (Intel).
pub const VENDOR_ID: u16 = 0x8086;
/// PCI device ID (82540EM).
pub const DEVICE_ID: u16 = 0x100E;
/// PCI class code (Ethernet controller).
pub const CLASS_CODE: u32 = 0x020000;
/// The default MAC address (QEMU's conventional first NIC).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Migration states offered: STOP_COPY and PRE_COPY (an empty pre-copy stream).
const MIGRATION_FLAGS: u64 = MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY;
/// Largest migration stream accepted while RESUMING.
pub const MAX_MIG_STREAM: usize = 16 << 20;

/// Configuration of a new device.
pub struct E1000Config {
    /// MAC address stored in the EEPROM (and loaded into RAL0/RAH0 at reset).
    pub mac: [u8; 6],
    /// Where frames go and come from.
    pub backend: Box<dyn NetBackend>,
    /// Offer an MSI capability (the 82540EM has none; default off, as on the chip).
    /// Turn it on for a VMM or driver that uses message interrupts.
    pub msi: bool,
    /// Receive on the register path (default): right after a transmit, frames the
    /// backend already has (the `user` network answers synchronously) are delivered
    /// within the same register access instead of waking the RX worker, and an RDT
    /// write does not wake the worker. Off: every received frame goes through the
    /// worker thread (the design before; kept to measure the difference).
    pub inline_rx: bool,
}

/// Parse a MAC address `aa:bb:cc:dd:ee:ff` (or with `-`); multicast addresses and the
/// all-zero address are refused (a NIC's own address is unicast).
pub fn parse_mac(text: &str) -> std::result::Result<[u8; 6], E1000Error> {
    let bad = |reason| E1000Error::Mac {
        given: text.to_string(),
        reason,
    };
    let mut mac = [0u8; 6];
    let mut n = 0;
    for part in text.split([':', '-']) {
        if n == 6 {
            return Err(bad("more than six bytes"));
        }
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("each byte is two hex digits"));
        }
        mac[n] = u8::from_str_radix(part, 16).map_err(|_| bad("not a hex digit"))?;
        n += 1;
    }
    if n != 6 {
        return Err(bad("fewer than six bytes"));
    }
    if mac[0] & 1 != 0 {
        return Err(bad("multicast address"));
    }
    if mac == [0; 6] {
        return Err(bad("all-zero address"));
    }
    Ok(mac)
}

impl E1000Config {
    /// A configuration with [`DEFAULT_MAC`].
    pub fn new(backend: Box<dyn NetBackend>) -> Self {
        E1000Config {
            mac: DEFAULT_MAC,
            backend,
            msi: false,
            inline_rx: true,
        }
    }

    /// The same configuration with the MSI capability on or off.
    pub fn with_msi(mut self, msi: bool) -> Self {
        self.msi = msi;
        self
    }
}

/// Errors creating a device.
#[derive(Debug, thiserror::Error)]
pub enum E1000Error {
    /// The worker's eventfd could not be created.
    #[error("cannot create an eventfd for the e1000 RX worker: {0} (out of file descriptors? raise `ulimit -n`)")]
    Eventfd(#[source] std::io::Error),
    /// The worker thread could not be started.
    #[error("cannot start the e1000 RX worker thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A MAC address that cannot be used.
    #[error("invalid MAC address {given:?}: {reason} (expected six hex bytes like 52:54:00:12:34:56, unicast)")]
    Mac {
        /// The text given.
        given: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Building the PCI configuration space failed (a bug).
    #[error("cannot build the e1000 PCI configuration space: {0}")]
    Pci(#[from] PciError),
}

/// The backend and the receive buffer of the register path's inline receive, under one
/// lock. Lock order: this, then the device lock (`core`); a frame is taken from the
/// backend and delivered under this lock, so the worker and the register path never
/// reorder frames.
struct Net {
    backend: Box<dyn NetBackend>,
    buf: Vec<u8>,
}

/// Largest frame a backend may hand over (64 KiB, plus slack).
const RX_BUF: usize = 65536 + 64;
/// Frames the register path takes from the backend per access; more are left to the
/// worker.
const INLINE_RX_BATCH: usize = 16;

struct Inner {
    core: Mutex<Core>,
    /// Configuration space and interrupts (shared with the register file).
    pci: Arc<PciFunction>,
    dma: DmaPort,
    backend: Mutex<Net>,
    backend_fd: RawFd,
    inline_rx: bool,
    /// Times the worker's poll returned (a wake-up: a thread hand-off when it did work).
    worker_wakeups: AtomicU64,
    /// Frames the register path received inline.
    inline_frames: AtomicU64,
    wake: OwnedFd,
    stop: AtomicBool,
}

/// The emulated 82540EM. See the module documentation.
pub struct E1000 {
    inner: Arc<Inner>,
    worker: Mutex<Option<JoinHandle<()>>>,
    describe: String,
}

fn new_eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn drain_eventfd(fd: &OwnedFd) {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into a local u64; the fd is non-blocking.
    unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// The configuration space of a device with the default EEPROM and an MSI capability
/// (unit tests of the register file).
#[cfg(test)]
fn build_config() -> std::result::Result<nestio_device_model::pci::PciConfig, PciError> {
    config::build(&Eeprom::new(DEFAULT_MAC), true)
}

impl E1000 {
    /// Create the device and start its RX worker (stopped when the device is dropped).
    pub fn new(config: E1000Config) -> std::result::Result<Arc<E1000>, E1000Error> {
        let pci = Arc::new(PciFunction::new(config::build(
            &Eeprom::new(config.mac),
            config.msi,
        )?));
        let core = Core::new(
            config.mac,
            pci.clone(),
            MigrationFsm::new(MigrationFlags(MIGRATION_FLAGS)),
        );
        let backend_fd = config.backend.poll_fd().as_raw_fd();
        let describe = config.backend.describe();
        let inner = Arc::new(Inner {
            core: Mutex::new(core),
            pci,
            dma: DmaPort::default(),
            backend: Mutex::new(Net {
                backend: config.backend,
                buf: Vec::new(),
            }),
            backend_fd,
            inline_rx: config.inline_rx,
            worker_wakeups: AtomicU64::new(0),
            inline_frames: AtomicU64::new(0),
            wake: new_eventfd().map_err(E1000Error::Eventfd)?,
            stop: AtomicBool::new(false),
        });
        let w = inner.clone();
        let handle = std::thread::Builder::new()
            .name("e1000-rx".into())
            .spawn(move || w.worker())
            .map_err(E1000Error::Thread)?;
        tracing::info!(backend = %describe, "e1000 created");
        Ok(Arc::new(E1000 {
            inner,
            worker: Mutex::new(Some(handle)),
            describe,
        }))
    }

    /// How often the RX worker woke up so far, and how many frames the register path
    /// received inline (without the worker). For benchmarks: each worker wake-up that
    /// does work is a thread hand-off on the packet's way.
    pub fn rx_counters(&self) -> (u64, u64) {
        (
            self.inner.worker_wakeups.load(Ordering::Relaxed),
            self.inner.inline_frames.load(Ordering::Relaxed),
        )
    }

    /// The backend's description.
    pub fn backend_description(&self) -> &str {
        &self.describe
    }

    /// Offer `frame` (no FCS) to the receiver synchronously, as if the backend had
    /// delivered it (tests and fuzzing). While the device is stopped for migration the
    /// frame is queued like a frame from the backend.
    pub fn inject_frame(&self, frame: &[u8]) -> Option<RxOutcome> {
        let (r, _) = self.inner.offer_frame(frame);
        self.inner.after_access();
        r
    }

    /// The MAC address in the EEPROM.
    pub fn mac(&self) -> [u8; 6] {
        self.inner.lock().eeprom.mac()
    }

    /// Stop the RX worker (also done on drop). Register accesses keep working; frames
    /// are no longer taken from the backend.
    pub fn stop_worker(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        let _ = signal_eventfd(&self.inner.wake);
        let h = self.worker.lock().take();
        if let Some(h) = h {
            if h.join().is_err() {
                tracing::error!("e1000 RX worker panicked");
            }
        }
    }
}

impl Drop for E1000 {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock()
    }

    /// Send frames queued by a transmit and wake the worker if asked; called after
    /// every access with the device lock released. With inline receive, frames the
    /// backend has ready after the transmit (a synchronous peer's answers) are
    /// delivered here, in the caller's thread: no hand-off to the worker.
    fn after_access(&self) {
        let (frames, mut wake) = {
            let mut c = self.lock();
            (
                std::mem::take(&mut c.out_frames),
                std::mem::take(&mut c.wake_worker),
            )
        };
        if !frames.is_empty() {
            let mut net = self.backend.lock();
            // Answers this thread receives inline must not wake the worker polling the
            // backend's fd (two context switches per round trip, for nothing).
            net.backend.hold_notifications(self.inline_rx);
            for f in frames {
                if let Err(e) = net.backend.send(&f) {
                    tracing::debug!(error = %e, "e1000: backend dropped a frame");
                }
            }
            if self.inline_rx && self.receive_ready(&mut net, INLINE_RX_BATCH) > 0 {
                // Receiving may have armed a timer or deferred an interrupt.
                wake |= std::mem::take(&mut self.lock().wake_worker);
            }
            // Whatever is left (more than a batch, or a full ring) is the worker's.
            net.backend.hold_notifications(false);
        }
        if wake {
            if let Err(e) = signal_eventfd(&self.wake) {
                tracing::warn!(error = %e, "e1000: cannot wake the RX worker");
            }
        }
    }

    /// Deliver a frame now, or queue it while the device is stopped for migration
    /// (frames that could never be received are not queued; a full queue counts the
    /// frame as missed). Returns the outcome when delivered now, and whether the
    /// pending queue is full.
    fn offer_frame(&self, frame: &[u8]) -> (Option<RxOutcome>, bool) {
        let mut c = self.lock();
        if c.running() {
            return (Some(c.receive(frame, &self.pci, &self.dma)), false);
        }
        if frame.len() > rx::MAX_LONG_FRAME {
            c.stat_inc(regs::ROC);
        } else if c.pending.len() < PENDING_MAX {
            c.pending.push_back(frame.to_vec());
        } else {
            c.stat_inc(regs::MPC);
        }
        (None, c.pending.len() >= PENDING_MAX)
    }

    /// Take up to `max` frames the backend has ready (never waiting) and offer each to
    /// the receiver; returns how many were taken. `net` is the locked backend.
    fn receive_ready(&self, net: &mut Net, max: usize) -> usize {
        let Net { backend, buf } = net;
        if buf.len() < RX_BUF {
            buf.resize(RX_BUF, 0);
        }
        let mut taken = 0;
        while taken < max {
            match backend.recv(buf) {
                Ok(Some(n)) => {
                    taken += 1;
                    self.inline_frames.fetch_add(1, Ordering::Relaxed);
                    let (_, full) = self.offer_frame(&buf[..n.min(buf.len())]);
                    if full {
                        break;
                    }
                }
                Ok(None) => break,
                Err(nestio_net::NetError::FrameTooLarge { len, .. }) => {
                    tracing::debug!(len, "e1000: oversized frame from backend dropped");
                    self.lock().stat_inc(regs::ROC);
                }
                // Errors are the worker's to report and pace.
                Err(_) => break,
            }
        }
        taken
    }

    fn worker(self: Arc<Self>) {
        let mut buf = vec![0u8; 65536 + 64];
        let mut backend_errors = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            let (poll_backend, timeout) = {
                let mut c = self.lock();
                c.wake_worker = false;
                let now = Instant::now();
                c.delay_due(&self.pci, now);
                c.deferred_due(&self.pci, now);
                if c.running() {
                    while let Some(f) = c.pending.pop_front() {
                        c.receive(&f, &self.pci, &self.dma);
                    }
                }
                // Delay timers count only while running (paused ones have no deadline).
                let delay = if c.running() {
                    c.delay_deadline()
                } else {
                    None
                };
                let next = match (c.deferred_irq, delay) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let timeout = next.map(|t| {
                    let d = t.saturating_duration_since(now);
                    libc::timespec {
                        // At most about 67 ms (the longest delay) or the ITR interval.
                        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
                        tv_nsec: d.subsec_nanos() as libc::c_long,
                    }
                });
                (c.running() || c.pending.len() < PENDING_MAX, timeout)
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if poll_backend { self.backend_fd } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let tp = timeout
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: fds is a valid array of 2 pollfd and tp null or a valid timespec,
            // both alive for the duration of the call; no signal mask is changed.
            let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, tp, std::ptr::null()) };
            self.worker_wakeups.fetch_add(1, Ordering::Relaxed);
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!(error = %e, "e1000 RX worker: poll failed; worker stops");
                    return;
                }
                continue;
            }
            if fds[0].revents != 0 {
                drain_eventfd(&self.wake);
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            if fds[1].revents == 0 {
                continue;
            }
            if fds[1].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                // A broken backend descriptor stays "ready": do not spin on it.
                if backend_errors == 0 {
                    tracing::warn!(
                        revents = fds[1].revents,
                        backend = %self.backend.lock().backend.describe(),
                        "e1000: backend descriptor reports an error or hang-up"
                    );
                }
                backend_errors = backend_errors.saturating_add(1);
                std::thread::sleep(std::time::Duration::from_millis(10));
                if fds[1].revents & libc::POLLIN == 0 {
                    continue;
                }
            }
            // Take a bounded batch, then re-check stop / deferred interrupts.
            for _ in 0..64 {
                // The frame is offered under the backend lock: the register path's
                // inline receive cannot overtake it.
                let mut net = self.backend.lock();
                let got = net.backend.recv(&mut buf);
                match got {
                    Ok(Some(n)) => {
                        backend_errors = 0;
                        let n = n.min(buf.len());
                        let (_, full) = self.offer_frame(&buf[..n]);
                        drop(net);
                        self.after_access();
                        if full {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(nestio_net::NetError::FrameTooLarge { len, .. }) => {
                        tracing::debug!(len, "e1000: oversized frame from backend dropped");
                        self.lock().stat_inc(regs::ROC);
                    }
                    Err(e) => {
                        if backend_errors == 0 {
                            tracing::warn!(error = %e, "e1000: backend receive failed");
                        }
                        backend_errors = backend_errors.saturating_add(1);
                        // Do not spin on a descriptor that stays readable with errors.
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        break;
                    }
                }
            }
        }
    }

    /// Check a BAR access: inside the region, 1/2/4/8 bytes, naturally aligned.
    fn check_access(region: u32, offset: u64, len: usize, size: u64) -> Result<()> {
        let info = RegionInfo::rw(region, size);
        info.check(offset, len)?;
        if !matches!(len, 1 | 2 | 4 | 8) || !offset.is_multiple_of(len as u64) {
            return Err(DeviceError::Invalid(format!(
                "e1000 region {region}: access of {len} bytes at {offset:#x}; use a naturally aligned access of 1, 2, 4 or 8 bytes"
            )));
        }
        Ok(())
    }

    /// Read `buf.len()` (1, 2 or 4) bytes of the register file at `off`.
    fn mmio_read32(&self, c: &mut Core, off: u32, buf: &mut [u8]) {
        let reg = off & !3;
        let shift = (off & 3) * 8;
        let v = c.read(reg, &self.pci) >> shift;
        let bytes = v.to_le_bytes();
        buf.copy_from_slice(&bytes[..buf.len()]);
    }

    fn mmio_write32(&self, c: &mut Core, off: u32, data: &[u8]) {
        let reg = off & !3;
        let shift = (off & 3) * 8;
        let mut b = [0u8; 4];
        b[..data.len()].copy_from_slice(data);
        let val = u32::from_le_bytes(b);
        let v = if data.len() == 4 {
            val
        } else {
            let mask = ((1u64 << (data.len() * 8)) - 1) as u32;
            // ICR is write-1-to-clear: the bytes not written are zeros, not the
            // current causes (which would clear them all).
            let base = if reg == regs::ICR { 0 } else { c.peek(reg) };
            (base & !(mask << shift)) | ((val & mask) << shift)
        };
        c.write(reg, v, &self.pci, &self.dma);
    }

    fn mmio_read(&self, c: &mut Core, off: u64, buf: &mut [u8]) {
        if buf.len() == 8 {
            let (a, b) = buf.split_at_mut(4);
            self.mmio_read32(c, off as u32, a);
            self.mmio_read32(c, off as u32 + 4, b);
        } else {
            self.mmio_read32(c, off as u32, buf);
        }
    }

    fn mmio_write(&self, c: &mut Core, off: u64, data: &[u8]) {
        if data.len() == 8 {
            self.mmio_write32(c, off as u32, &data[..4]);
            self.mmio_write32(c, off as u32 + 4, &data[4..]);
        } else {
            self.mmio_write32(c, off as u32, data);
        }
    }

    /// The I/O window: IOADDR (0..4) holds a register offset, IODATA (4..8) accesses it;
    /// the rest reads 0 and ignores writes.
    fn io_read(&self, c: &mut Core, off: u64, buf: &mut [u8]) {
        buf.fill(0);
        if buf.len() == 8 {
            let (a, b) = buf.split_at_mut(4);
            self.io_read(c, off, a);
            self.io_read(c, off + 4, b);
            return;
        }
        match off {
            0..=3 => {
                let v = c.io_addr.to_le_bytes();
                let o = off as usize;
                buf.copy_from_slice(&v[o..o + buf.len()]);
            }
            4..=7 => {
                let reg = c.io_addr & (regs::MMIO_SIZE as u32 - 4);
                self.mmio_read32(c, reg + (off as u32 - 4), buf);
            }
            _ => {}
        }
    }

    fn io_write(&self, c: &mut Core, off: u64, data: &[u8]) {
        if data.len() == 8 {
            self.io_write(c, off, &data[..4]);
            self.io_write(c, off + 4, &data[4..]);
            return;
        }
        match off {
            0..=3 => {
                let mut v = c.io_addr.to_le_bytes();
                let o = off as usize;
                v[o..o + data.len()].copy_from_slice(data);
                c.io_addr = u32::from_le_bytes(v);
            }
            4..=7 => {
                let reg = c.io_addr & (regs::MMIO_SIZE as u32 - 4);
                self.mmio_write32(c, reg + (off as u32 - 4), data);
            }
            _ => {}
        }
    }

    fn mig_step(&self, c: &mut Core, from: MigState, to: MigState) -> Result<()> {
        match (from, to) {
            // PRE_COPY streams nothing ahead (the whole state is small): it opens an
            // empty stream while the device keeps running, and STOP_COPY continues it
            // with the state; entered from STOP, STOP_COPY opens a new stream.
            (MigState::Running, MigState::PreCopy) => c.mig.begin_save(Vec::new()),
            (MigState::PreCopy, MigState::Running) => c.mig.close(),
            (MigState::PreCopy, MigState::StopCopy) => {
                let data = state::save(c);
                c.mig.continue_save(data);
            }
            (MigState::Stop, MigState::StopCopy) => {
                let data = state::save(c);
                c.mig.begin_save(data);
            }
            (MigState::StopCopy, _) => c.mig.close(),
            (_, MigState::Resuming) => c.mig.begin_resume(),
            (MigState::Resuming, _) => {
                let data = c.mig.finish_resume()?;
                state::load(c, &data).map_err(|e| DeviceError::Invalid(e.to_string()))?;
            }
            _ => {}
        }
        Ok(())
    }
}

impl VfioDevice for E1000 {
    fn info(&self) -> DeviceInfo {
        self.inner.pci.device_info()
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.inner.pci.region_info(index, |i| {
            Ok(match i {
                0 => RegionInfo::rw(0, regs::MMIO_SIZE),
                1 => RegionInfo::rw(1, regs::IO_SIZE),
                i => RegionInfo::absent(i),
            })
        })
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.region_info(index)?.size;
        if index == pci_index::CONFIG {
            return self.inner.pci.config_read(offset, buf);
        }
        Inner::check_access(index, offset, buf.len(), size)?;
        {
            let mut c = self.inner.lock();
            match index {
                0 => self.inner.mmio_read(&mut c, offset, buf),
                _ => self.inner.io_read(&mut c, offset, buf),
            }
        }
        self.inner.after_access();
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let size = self.region_info(index)?.size;
        if index == pci_index::CONFIG {
            let mut c = self.inner.lock();
            let msg_before = regfile::message_mode(&self.inner.pci) && self.inner.pci.bus_master();
            self.inner.pci.config_write(offset, data)?;
            // Bus mastering or MSI enable may have changed: restart what waited.
            c.process_tx(&self.inner.pci, &self.inner.dma);
            // Bus mastering just enabled with a message interrupt due: send it.
            let edge = c.asserted()
                && regfile::message_mode(&self.inner.pci)
                && self.inner.pci.bus_master()
                && !msg_before;
            c.update_irq(&self.inner.pci, edge);
            c.wake_worker = true;
            drop(c);
            self.inner.after_access();
            return Ok(());
        }
        Inner::check_access(index, offset, data.len(), size)?;
        {
            let mut c = self.inner.lock();
            match index {
                0 => {
                    let woken = c.wake_worker;
                    self.inner.mmio_write(&mut c, offset, data);
                    // New receive buffers need no worker: a frame that arrives is
                    // taken by the worker (woken by the backend's fd) or inline, and
                    // one that found the ring full was dropped and counted already.
                    if self.inner.inline_rx && offset & !3 == u64::from(regs::RDT) && !woken {
                        c.wake_worker = false;
                    }
                }
                _ => self.inner.io_write(&mut c, offset, data),
            }
        }
        self.inner.after_access();
        Ok(())
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.inner.pci.irq_info(index)
    }

    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        // Under the device lock, so a raise and an unmask do not interleave.
        let c = self.inner.lock();
        self.inner.pci.set_irqs(index, action, start, count, data)?;
        drop(c);
        self.inner.after_access();
        Ok(())
    }

    fn reset(&self) -> Result<()> {
        let mut c = self.inner.lock();
        c.reset_regs();
        self.inner.pci.reset_to_power_on();
        c.io_addr = 0;
        c.fsm.reset();
        c.mig.close();
        c.out_frames.clear();
        c.wake_worker = true;
        drop(c);
        self.inner.after_access();
        Ok(())
    }

    fn dma_port(&self) -> Option<&DmaPort> {
        Some(&self.inner.dma)
    }

    fn migration_flags(&self) -> Option<MigrationFlags> {
        Some(MigrationFlags(MIGRATION_FLAGS))
    }

    fn mig_state(&self) -> Result<MigState> {
        Ok(self.inner.lock().fsm.state())
    }

    fn mig_set_state(&self, target: MigState) -> Result<MigState> {
        let mut c = self.inner.lock();
        let mut fsm = c.fsm.clone();
        let r = fsm.transition(target, |from, to| self.inner.mig_step(&mut c, from, to));
        c.fsm = fsm;
        // Delay timers count only while running (after a failed transition too: the
        // state may have changed on the way).
        c.sync_delay_clock(Instant::now());
        let s = r?;
        if c.running() {
            // Resume: transmit what was queued meanwhile, deliver pending frames, and
            // re-signal an interrupt still asserted.
            c.process_tx(&self.inner.pci, &self.inner.dma);
            let asserted = c.asserted();
            c.update_irq(&self.inner.pci, asserted);
        }
        c.wake_worker = true;
        drop(c);
        self.inner.after_access();
        Ok(s)
    }

    fn mig_data_read(&self, buf: &mut [u8]) -> Result<usize> {
        let mut c = self.inner.lock();
        let state = c.fsm.state();
        c.mig.read(state, buf)
    }

    fn mig_data_write(&self, data: &[u8]) -> Result<()> {
        let mut c = self.inner.lock();
        let state = c.fsm.state();
        c.mig.write(state, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("52:54:00:12:34:56").unwrap(), DEFAULT_MAC);
        assert_eq!(parse_mac("02-00-00-00-00-0a").unwrap(), [2, 0, 0, 0, 0, 10]);
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5g",
            "525:4:00:12:34:56",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "+2:00:00:00:00:00",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?} accepted");
        }
    }
}
