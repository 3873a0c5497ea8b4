//! A guest-side e1000 driver written against any [`VfioDevice`], and a
//! packets-per-second measurement built on it.
//!
//! The driver does what a guest's driver does behind a VMM, using only the VFIO
//! device API: guest memory is a memfd handed to the device with `dma_map`
//! (`DmaBacking::Fd`), the rings and packet buffers live in it, interrupts arrive on
//! an eventfd registered with `set_irqs`, and every register access is a
//! `region_read`/`region_write`. It therefore drives an in-process `E1000` and a
//! vfio-user `Client` (the device in another thread or process) alike.
//!
//! Without an IOMMU (a VFIO noiommu device) the device sees physical addresses: a
//! driver built with [`Driver::new_physical`] is given the physical address of every
//! page the device touches ([`device_pages`]: both rings and all buffers, each inside
//! one page), DMA_MAPs each physically contiguous run at its physical address, and
//! programs the device with those addresses ([`DeviceAddresses`]); its own accesses
//! still go through the memfd.
//!
//! It depends on nothing of the device model: register offsets are its own (from the
//! 8254x manual), so it checks the model rather than mirroring it. Guest memory is
//! accessed with `pread`/`pwrite` on the memfd, never through a Rust slice over shared
//! memory; every descriptor is read once into a local copy and validated.
//!
//! [`run`] measures round trips through the `user` network's gateway (ICMP echo to
//! 10.0.2.2) for 60-byte (64 on the wire with FCS) and 1500-byte frames, and compares
//! the per-packet cost with a raw socketpair round trip measured in the same run.
//!
//! The driver waits for an interrupt by blocking in `poll()` on the eventfd, or, as
//! KVM halt-polls a halted vCPU, by looking at it for a bounded window first
//! ([`IrqWait`]); it counts which way each wait ended, so a benchmark can show whether
//! a round trip still wakes the driver's thread.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestio_device_model::{pci_index, DeviceError, IrqAction, IrqData, VfioDevice};
use nestio_dma::{DmaBacking, DmaError, DmaMapRequest, DmaPeer, DmaRange, Prot};
use nestio_net::packet::arp::ARP_OP_REQUEST;
use nestio_net::packet::arp::{build_arp_reply, build_arp_request, ArpPacket, ARP_OP_REPLY};
use nestio_net::packet::ethernet::{EthernetFrame, ETHERTYPE_ARP, ETHERTYPE_IPV4};
use nestio_net::packet::icmp::{build_icmp_echo_request, IcmpPacket, ICMP_ECHO_REPLY};
use nestio_net::packet::ipv4::{Ipv4Packet, PROTO_ICMP};
use nestio_net::packet::MacAddr;

/// Register offsets and bits the driver uses: the device model's own definitions
/// (82540EM, BAR0), plus the few names a driver spells differently.
pub mod reg {
    pub use crate::e1000::regs::*;
    /// Receive address low, entry 0.
    pub const RAL0: u32 = RA;
    /// Receive address high, entry 0.
    pub const RAH0: u32 = RA + 4;
    /// TX command: end of packet.
    pub const TXD_EOP: u8 = TXD_CMD_EOP;
    /// TX command: insert FCS.
    pub const TXD_IFCS: u8 = 0x02;
    /// TX command: report status.
    pub const TXD_RS: u8 = TXD_CMD_RS;
    /// RAH: address valid.
    pub const RAH_AV: u32 = 1 << 31;
}

/// First IOVA of guest memory as the device sees it.
pub const IOVA: u64 = 0x10_0000;
/// Bytes of the memfd mapped for DMA (from file offset 0).
pub const MAPPED: u64 = 2 << 20;
/// Size of the memfd; `[MAPPED, FILE_SIZE)` is never mapped and must stay zero.
pub const FILE_SIZE: u64 = 3 << 20;
/// Descriptors per ring (512 bytes: a multiple of 128 as the device requires).
pub const NDESC: u32 = 32;
/// IOVA of the TX ring.
pub const TX_RING: u64 = IOVA;
/// IOVA of the RX ring.
pub const RX_RING: u64 = IOVA + 0x1000;
/// IOVA of the TX buffers (one 2 KiB buffer per descriptor).
pub const TX_BUF: u64 = IOVA + 0x1_0000;
/// IOVA of the RX buffers (one 2 KiB buffer per descriptor).
pub const RX_BUF: u64 = IOVA + 0x4_0000;
/// Size of one packet buffer (RCTL.BSIZE 2048).
pub const BUF_SIZE: u64 = 0x800;
/// Words 0x00-0x3F of the EEPROM sum to this.
pub const EEPROM_SUM: u16 = 0xBABA;

/// Where the device finds the driver's memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DeviceAddresses {
    /// The device sees the memfd at [`IOVA`] onwards (an IOMMU, or the device's own map
    /// table, translates): a driver address is a device address.
    #[default]
    Linear,
    /// No translation (VFIO noiommu): the device sees each page of [`device_pages`] at
    /// its physical address. Keys: memfd offsets of those pages; values: their
    /// physical addresses (the caller keeps the pages locked while the driver lives).
    Physical(BTreeMap<u64, u64>),
}

/// Page size of [`DeviceAddresses::Physical`].
pub const PAGE: u64 = 4096;

/// The memfd offsets of every page the device reads or writes (the rings and every
/// packet buffer), in order: what a noiommu driver must lock and map.
pub fn device_pages() -> Vec<u64> {
    let ring_bytes = u64::from(NDESC) * 16;
    let buf_bytes = u64::from(NDESC) * BUF_SIZE;
    let mut pages = Vec::new();
    for (start, len) in [
        (TX_RING, ring_bytes),
        (RX_RING, ring_bytes),
        (TX_BUF, buf_bytes),
        (RX_BUF, buf_bytes),
    ] {
        let first = (start - IOVA) / PAGE;
        let last = (start - IOVA + len - 1) / PAGE;
        pages.extend((first..=last).map(|p| p * PAGE));
    }
    pages.dedup();
    pages
}

/// Errors of the driver and the measurement.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A device call failed (for a vfio-user client: the server refused or went away).
    #[error("device call failed: {0}")]
    Device(#[from] DeviceError),
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0} (out of memory or file descriptors?)")]
    Memory(#[source] std::io::Error),
    /// A DMA range was malformed.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// An access outside the guest memory the driver owns.
    #[error("driver bug: guest memory access of {len} bytes at {iova:#x} is outside the memfd")]
    OutOfMemory {
        /// IOVA.
        iova: u64,
        /// Length.
        len: usize,
    },
    /// Nothing arrived in time.
    #[error("timed out after {0:?} waiting for {1}; is the device's backend connected?")]
    Timeout(Duration, String),
    /// The device broke the e1000 contract.
    #[error("device misbehaved: {0}")]
    Misbehaved(String),
    /// A frame could not be built.
    #[error("cannot build frame: {0}")]
    Packet(String),
    /// The socketpair floor measurement failed.
    #[error("socketpair floor measurement: {0}")]
    Floor(#[source] std::io::Error),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, DriverError>;

/// How the device interrupts the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqMode {
    /// Level INTx (automasked: the driver reads ICR and unmasks after each one).
    Intx,
    /// MSI (edge, one message per new cause).
    Msi,
}

/// How the device reaches guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaVia {
    /// The memfd is passed with DMA_MAP and mapped by the device (DMA in place).
    SharedFd,
    /// No fd: every DMA is a DMA_READ / DMA_WRITE message served by the driver side
    /// (vfio-user's fd-less mode; a local device cannot use it).
    Messages,
}

/// Serves message-based DMA (IOVA → memfd offset) for [`DmaVia::Messages`].
struct MemfdPeer {
    mem: Arc<OwnedFd>,
}

impl MemfdPeer {
    fn offset(addr: u64, len: usize) -> std::result::Result<u64, i32> {
        let off = addr.checked_sub(IOVA).ok_or(libc::EFAULT)?;
        match off.checked_add(len as u64) {
            Some(end) if end <= MAPPED => Ok(off),
            _ => Err(libc::EFAULT),
        }
    }
}

impl DmaPeer for MemfdPeer {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> std::result::Result<(), i32> {
        let off = Self::offset(addr, buf.len())?;
        let data = file_read(&self.mem, off, buf.len()).map_err(|_| libc::EIO)?;
        buf.copy_from_slice(&data);
        Ok(())
    }
    fn dma_write(&self, addr: u64, data: &[u8]) -> std::result::Result<(), i32> {
        let off = Self::offset(addr, data.len())?;
        file_write(&self.mem, off, data).map_err(|_| libc::EIO)
    }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// A memfd of [`FILE_SIZE`] bytes: the guest's RAM.
pub fn guest_memory() -> Result<Arc<OwnedFd>> {
    nestio_dma::memfd::sealed_memfd(c"nestio-guest", FILE_SIZE)
        .map(Arc::new)
        .map_err(DriverError::Memory)
}

/// A non-blocking eventfd.
pub fn eventfd() -> Result<OwnedFd> {
    // SAFETY: no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(DriverError::Memory(errno()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Read and reset an eventfd counter (0 when not signalled).
fn take(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into a local u64.
    let r = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if r == 8 {
        v
    } else {
        0
    }
}

/// Wait until `fd` is readable or `timeout` passes; true when readable.
fn poll_in(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// How the driver waits for its interrupt eventfd.
///
/// A VMM's vCPU that halts waiting for an interrupt is not put to sleep at once: KVM
/// *halt-polls* (`halt_poll_ns`), checking for a pending interrupt for a bounded time
/// before it schedules the vCPU thread out, because a wake-up costs more than a short
/// spin when the interrupt comes soon (the irqfd then only sets a flag the spinning
/// vCPU sees). [`IrqWait::Adaptive`] (the default) is that mechanism as KVM runs it
/// ([`HaltPoll`]); [`IrqWait::HaltPoll`] and [`IrqWait::YieldPoll`] are fixed windows,
/// spinning or giving the CPU away between looks, for comparison; [`IrqWait::Block`]
/// blocks at once. A look is a `poll()` with a zero timeout on the eventfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqWait {
    /// Block in `poll()` at once: every interrupt that finds the driver waiting wakes
    /// its thread.
    Block,
    /// Spin (looking at the eventfd) for up to this long, then block; never longer
    /// than the caller's timeout. On the device's CPU the spin keeps the device from
    /// running until the window ends.
    HaltPoll(Duration),
    /// Like [`IrqWait::HaltPoll`], yielding the CPU between looks.
    YieldPoll(Duration),
    /// KVM's adaptive halt-polling, windows up to this long ([`HaltPoll`]).
    Adaptive(Duration),
}

impl Default for IrqWait {
    fn default() -> IrqWait {
        IrqWait::Adaptive(HaltPoll::KVM_MAX)
    }
}

impl IrqWait {
    /// The fixed polling window the benchmark compares (the posted-write ring's thread
    /// polls 50 µs).
    pub const DEFAULT_WINDOW: Duration = Duration::from_micros(50);
}

impl std::fmt::Display for IrqWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IrqWait::Block => write!(f, "blocking wait"),
            IrqWait::HaltPoll(w) => write!(f, "halt-polling wait ({} µs spin)", w.as_micros()),
            IrqWait::YieldPoll(w) => write!(f, "yield-polling wait ({} µs)", w.as_micros()),
            IrqWait::Adaptive(w) => write!(
                f,
                "adaptive halt-polling wait (KVM's, up to {} µs)",
                w.as_micros()
            ),
        }
    }
}

/// KVM's adaptive halt-polling (`kvm_vcpu_halt` in `virt/kvm/kvm_main.c`), for one
/// waiter: the window starts at zero; after each wait, a wait longer than the ceiling
/// shrinks it to zero (`halt_poll_ns_shrink` = 0), a wait that outlasted the window but
/// not the ceiling grows it (from `halt_poll_ns_grow_start` = 10 µs, doubling
/// (`halt_poll_ns_grow` = 2) up to the ceiling), and a wait the window covered keeps
/// it.
///
/// KVM polls only while its CPU has no other runnable task (`single_task_running`): a
/// spin then can only delay whoever would send the interrupt, if it shares the CPU. A
/// user-space waiter cannot see its run queue, so it asks the scheduler: when a window
/// ends without the interrupt, it yields once and times the yield. A yield that came
/// back late means another task ran here — the spin kept it off this CPU — so the
/// window drops to zero and polling stays off for a back-off that doubles each time
/// this recurs (16, 32, ... up to 4096 waits), and starts over at 16 after a poll that
/// found its interrupt. A yield that comes back at once means nobody else wanted the
/// CPU, and KVM's rules apply. So on one CPU shared with the device the waiter blocks
/// (after a short probe that the back-off makes rarer and rarer), and with the device
/// on another CPU it polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaltPoll {
    /// Ceiling of the window (`halt_poll_ns`).
    max: Duration,
    /// The current window (the vCPU's `halt_poll_ns`).
    window: Duration,
    /// Waits left before polling may start again.
    backoff_left: u32,
    /// The next back-off, in waits.
    backoff: u32,
    /// A yield longer than this means another task ran on this CPU.
    late: Duration,
}

/// How one adaptive wait went, for [`HaltPoll::update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Halted {
    /// The whole wait, look and block.
    pub took: Duration,
    /// A window ended without the interrupt, and the yield after it came back late.
    pub crowded: bool,
}

impl HaltPoll {
    /// KVM's x86 default `halt_poll_ns`.
    pub const KVM_MAX: Duration = Duration::from_micros(200);
    /// KVM's `halt_poll_ns_grow_start`.
    pub const GROW_START: Duration = Duration::from_micros(10);
    /// The first back-off after a crowded window, in waits.
    pub const BACKOFF_START: u32 = 16;
    /// The longest back-off, in waits.
    pub const BACKOFF_MAX: u32 = 4096;

    /// A poller with ceiling `max`; a yield is late when it takes more than three
    /// times the fastest of 16 yields timed now, plus 1 µs.
    pub fn new(max: Duration) -> HaltPoll {
        let fastest = (0..16)
            .map(|_| {
                let t = Instant::now();
                std::thread::yield_now();
                t.elapsed()
            })
            .min()
            .unwrap_or_default();
        HaltPoll::with_late(max, fastest * 3 + Duration::from_micros(1))
    }

    /// A poller with ceiling `max` that calls a yield late past `late`.
    pub fn with_late(max: Duration, late: Duration) -> HaltPoll {
        HaltPoll {
            max,
            window: Duration::ZERO,
            backoff_left: 0,
            backoff: Self::BACKOFF_START,
            late,
        }
    }

    /// The window the next wait polls for.
    pub fn window(&self) -> Duration {
        if self.backoff_left > 0 {
            Duration::ZERO
        } else {
            self.window
        }
    }

    /// Whether a yield that took `took` means another task ran on this CPU.
    pub fn is_late(&self, took: Duration) -> bool {
        took > self.late
    }

    /// Learn from a wait.
    pub fn update(&mut self, h: Halted) {
        if self.backoff_left > 0 {
            self.backoff_left -= 1;
            return;
        }
        if h.crowded {
            self.window = Duration::ZERO;
            self.backoff_left = self.backoff;
            self.backoff = (self.backoff * 2).min(Self::BACKOFF_MAX);
            return;
        }
        if !self.window.is_zero() && h.took <= self.window {
            // The poll found it: the CPU is not shared with the sender.
            self.backoff = Self::BACKOFF_START;
            return;
        }
        if h.took <= self.window {
            return;
        }
        if !self.window.is_zero() && h.took > self.max {
            self.window = Duration::ZERO;
        } else if self.window < self.max && h.took < self.max {
            self.window = (self.window * 2).max(Self::GROW_START).min(self.max);
        }
    }
}

/// How a wait for the interrupt eventfd ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WaitEnd {
    /// The eventfd became readable.
    ready: bool,
    /// The bounded look found it (no blocking wait, so no wake-up of this thread).
    looked: bool,
    /// The look found nothing, and the probing yield after it came back late.
    crowded: bool,
}

/// Wait until `fd` is readable or `timeout` passes: look for up to `window` (yielding
/// between looks when `yielding`); when the look finds nothing and `probe` is given,
/// yield once, timed, and look again; then block.
fn wait_in(
    fd: &OwnedFd,
    window: Duration,
    yielding: bool,
    probe: Option<&HaltPoll>,
    timeout: Duration,
) -> WaitEnd {
    let window = window.min(timeout);
    if window.is_zero() {
        let ready = poll_in(fd, timeout);
        return WaitEnd {
            ready,
            looked: false,
            crowded: false,
        };
    }
    let t0 = Instant::now();
    loop {
        if poll_in(fd, Duration::ZERO) {
            return WaitEnd {
                ready: true,
                looked: true,
                crowded: false,
            };
        }
        if t0.elapsed() >= window {
            break;
        }
        std::hint::spin_loop();
        if yielding {
            std::thread::yield_now();
        }
    }
    let mut crowded = false;
    if let Some(h) = probe {
        let t = Instant::now();
        std::thread::yield_now();
        crowded = h.is_late(t.elapsed());
    }
    let left = timeout.saturating_sub(t0.elapsed());
    WaitEnd {
        ready: !left.is_zero() && poll_in(fd, left),
        looked: false,
        crowded,
    }
}

/// Round trip of a hand-off between two threads that wait by looking at a shared word
/// and yielding the CPU between looks: the least any exchange with a device outside the
/// caller's thread costs (no system call but `sched_yield`). On one CPU it is two
/// context switches; on two, two cache-line transfers. Best of 10 batches, nanoseconds.
pub fn handoff_floor(iterations: u64) -> f64 {
    handoff_floor_between(iterations, || {})
}

/// [`handoff_floor`] with the peer thread first running `place_peer` (to set its CPU
/// affinity, say; the caller's thread stays where it is).
pub fn handoff_floor_between(iterations: u64, place_peer: impl FnOnce() + Send + 'static) -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let word = Arc::new(AtomicU64::new(0));
    let total = iterations.max(1) * BATCHES;
    let w2 = word.clone();
    let peer = std::thread::spawn(move || {
        place_peer();
        for i in 0..total {
            // Wait for the ping numbered 2i+1, answer with 2i+2.
            while w2.load(Ordering::Acquire) != 2 * i + 1 {
                std::thread::yield_now();
            }
            w2.store(2 * i + 2, Ordering::Release);
        }
    });
    let mut batches = Vec::new();
    let mut n = 0u64;
    for _ in 0..BATCHES {
        let t = Instant::now();
        for _ in 0..iterations.max(1) {
            word.store(2 * n + 1, Ordering::Release);
            while word.load(Ordering::Acquire) != 2 * n + 2 {
                std::thread::yield_now();
            }
            n += 1;
        }
        batches.push(t.elapsed().as_nanos() as f64 / iterations.max(1) as f64);
    }
    let _ = peer.join();
    best(&batches)
}

/// Write `data` at file offset `off` of `fd`.
pub fn file_write(fd: &OwnedFd, off: u64, data: &[u8]) -> Result<()> {
    // SAFETY: the kernel reads `data.len()` bytes from a valid slice.
    let r = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            off as libc::off_t,
        )
    };
    if r < 0 {
        return Err(DriverError::Memory(errno()));
    }
    if r as usize != data.len() {
        return Err(DriverError::Memory(std::io::Error::other("short write")));
    }
    Ok(())
}

/// Read `len` bytes at file offset `off` of `fd`.
pub fn file_read(fd: &OwnedFd, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    // SAFETY: the kernel writes at most `len` bytes into our own buffer.
    let r = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            v.as_mut_ptr().cast(),
            len,
            off as libc::off_t,
        )
    };
    if r < 0 {
        return Err(DriverError::Memory(errno()));
    }
    if r as usize != len {
        return Err(DriverError::Memory(std::io::Error::other("short read")));
    }
    Ok(v)
}

/// The guest side of one e1000. See the module documentation.
pub struct Driver {
    /// The device (local model or vfio-user client).
    pub dev: Arc<dyn VfioDevice>,
    /// Guest memory (file offset = IOVA - [`IOVA`]).
    pub mem: Arc<OwnedFd>,
    irq: OwnedFd,
    mode: IrqMode,
    /// Next TX descriptor to fill.
    pub next_tx: u32,
    /// Next RX descriptor to look at.
    pub next_rx: u32,
    /// TX descriptors handed to the device and not yet seen done.
    tx_busy: [bool; NDESC as usize],
    /// Our MAC (read from the EEPROM by [`Driver::probe`]).
    pub mac: [u8; 6],
    /// Interrupts taken.
    pub interrupts: u64,
    /// INTx unmask eventfd given to the device ([`Driver::use_unmask_eventfd`]): an
    /// unmask is a write to it, as KVM's resample irqfd does at EOI, not a message.
    unmask_fd: Option<OwnedFd>,
    /// How driver addresses become device addresses.
    addrs: DeviceAddresses,
    /// How the driver waits for an interrupt ([`Driver::set_irq_wait`]).
    irq_wait: IrqWait,
    /// The adaptive window's state, for [`IrqWait::Adaptive`].
    halt_poll: HaltPoll,
    /// Interrupt waits the bounded look ended (no blocking wait, no wake-up).
    pub polled_waits: u64,
    /// Interrupt waits that blocked in `poll()`.
    pub blocked_waits: u64,
}

impl Driver {
    /// Give `dev` the guest memory (shared by fd) and an interrupt eventfd, touching
    /// no register (what a migration destination does before RESUMING).
    pub fn attach(dev: Arc<dyn VfioDevice>, mem: Arc<OwnedFd>, mode: IrqMode) -> Result<Driver> {
        Self::attach_via(dev, mem, mode, DmaVia::SharedFd)
    }

    /// [`Driver::attach`] with a choice of how the device reaches guest memory.
    pub fn attach_via(
        dev: Arc<dyn VfioDevice>,
        mem: Arc<OwnedFd>,
        mode: IrqMode,
        via: DmaVia,
    ) -> Result<Driver> {
        let backing = match via {
            DmaVia::SharedFd => DmaBacking::Fd {
                fd: mem.clone(),
                offset: 0,
            },
            DmaVia::Messages => DmaBacking::Peer(Arc::new(MemfdPeer { mem: mem.clone() })),
        };
        let map = DmaMapRequest {
            range: DmaRange::new(IOVA, MAPPED)?,
            prot: Prot::RW,
            backing,
        };
        Self::attach_maps(dev, mem, mode, vec![map], DeviceAddresses::Linear)
    }

    /// Map `maps`, then wire the interrupt eventfd.
    fn attach_maps(
        dev: Arc<dyn VfioDevice>,
        mem: Arc<OwnedFd>,
        mode: IrqMode,
        maps: Vec<DmaMapRequest>,
        addrs: DeviceAddresses,
    ) -> Result<Driver> {
        for map in maps {
            dev.dma_map(map)?;
        }
        let irq = eventfd()?;
        let index = match mode {
            IrqMode::Intx => pci_index::INTX_IRQ,
            IrqMode::Msi => pci_index::MSI_IRQ,
        };
        dev.set_irqs(
            index,
            IrqAction::Trigger,
            0,
            1,
            IrqData::Eventfd(vec![Some(irq.try_clone().map_err(DriverError::Memory)?)]),
        )?;
        Ok(Driver {
            dev,
            mem,
            irq,
            mode,
            next_tx: 0,
            next_rx: 0,
            tx_busy: [false; NDESC as usize],
            mac: [0; 6],
            interrupts: 0,
            unmask_fd: None,
            addrs,
            irq_wait: IrqWait::default(),
            halt_poll: HaltPoll::new(HaltPoll::KVM_MAX),
            polled_waits: 0,
            blocked_waits: 0,
        })
    }

    /// A driver for a device without an IOMMU (module documentation): `pages` maps the
    /// memfd offset of every page of [`device_pages`] to its physical address. Each
    /// physically contiguous run is DMA_MAPped at its physical address (IOVA = PA),
    /// then memory space and bus mastering are enabled.
    pub fn new_physical(
        dev: Arc<dyn VfioDevice>,
        mem: Arc<OwnedFd>,
        mode: IrqMode,
        pages: BTreeMap<u64, u64>,
    ) -> Result<Driver> {
        let mut maps: Vec<DmaMapRequest> = Vec::new();
        let mut run: Option<(u64, u64, u64)> = None; // (memfd offset, PA, bytes)
        let mut flush = |run: Option<(u64, u64, u64)>| -> Result<()> {
            if let Some((offset, pa, len)) = run {
                maps.push(DmaMapRequest {
                    range: DmaRange::new(pa, len)?,
                    prot: Prot::RW,
                    backing: DmaBacking::Fd {
                        fd: mem.clone(),
                        offset,
                    },
                });
            }
            Ok(())
        };
        for page in device_pages() {
            let pa = *pages.get(&page).ok_or(DriverError::OutOfMemory {
                iova: IOVA + page,
                len: PAGE as usize,
            })?;
            if pa % PAGE != 0 {
                return Err(DriverError::Misbehaved(format!(
                    "physical address {pa:#x} of page {page:#x} is not page aligned"
                )));
            }
            run = match run {
                Some((o, p, l)) if o + l == page && p.checked_add(l) == Some(pa) => {
                    Some((o, p, l + PAGE))
                }
                other => {
                    flush(other)?;
                    Some((page, pa, PAGE))
                }
            };
        }
        flush(run)?;
        let d = Self::attach_maps(
            dev,
            mem.clone(),
            mode,
            maps,
            DeviceAddresses::Physical(pages),
        )?;
        d.cfg_write16(4, 0x6)?;
        Ok(d)
    }

    /// The address the device must be given for `len` bytes at driver address `iova`
    /// (which must lie in one page when the device sees physical addresses).
    pub fn dev_addr(&self, iova: u64, len: u64) -> Result<u64> {
        match &self.addrs {
            DeviceAddresses::Linear => Ok(iova),
            DeviceAddresses::Physical(pages) => {
                let bad = || DriverError::OutOfMemory {
                    iova,
                    len: len as usize,
                };
                let off = iova.checked_sub(IOVA).ok_or_else(bad)?;
                let in_page = off % PAGE;
                if len == 0 || len > PAGE - in_page {
                    return Err(bad());
                }
                let pa = pages.get(&(off - in_page)).ok_or_else(bad)?;
                Ok(pa + in_page)
            }
        }
    }

    /// [`Driver::attach`], then enable memory space and bus mastering (and MSI in
    /// the capability when `mode` is MSI).
    pub fn new(dev: Arc<dyn VfioDevice>, mem: Arc<OwnedFd>, mode: IrqMode) -> Result<Driver> {
        Self::new_via(dev, mem, mode, DmaVia::SharedFd)
    }

    /// [`Driver::new`] with a choice of how the device reaches guest memory.
    pub fn new_via(
        dev: Arc<dyn VfioDevice>,
        mem: Arc<OwnedFd>,
        mode: IrqMode,
        via: DmaVia,
    ) -> Result<Driver> {
        let d = Self::attach_via(dev, mem, mode, via)?;
        d.cfg_write16(4, 0x6)?;
        if mode == IrqMode::Msi {
            let cap = d.find_cap(0x05)?;
            let ctrl = d.cfg_read16(cap + 2)?;
            d.cfg_write16(cap + 2, ctrl | 1)?;
        }
        Ok(d)
    }

    /// Take over the ring positions of `other` (the migration source's driver).
    pub fn adopt_rings(&mut self, other: &Driver) {
        self.next_tx = other.next_tx;
        self.next_rx = other.next_rx;
        self.tx_busy = other.tx_busy;
        self.mac = other.mac;
    }

    /// Read a BAR0 register.
    pub fn rd(&self, off: u32) -> Result<u32> {
        let mut b = [0u8; 4];
        self.dev.region_read(0, u64::from(off), &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Write a BAR0 register.
    pub fn wr(&self, off: u32, v: u32) -> Result<()> {
        Ok(self.dev.region_write(0, u64::from(off), &v.to_le_bytes())?)
    }

    /// Read 16 bits of configuration space.
    pub fn cfg_read16(&self, off: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.dev.region_read(pci_index::CONFIG, off, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Write 16 bits of configuration space.
    pub fn cfg_write16(&self, off: u64, v: u16) -> Result<()> {
        Ok(self
            .dev
            .region_write(pci_index::CONFIG, off, &v.to_le_bytes())?)
    }

    fn find_cap(&self, id: u8) -> Result<u64> {
        let mut p = u64::from(self.cfg_read16(0x34)? & 0xFC);
        for _ in 0..48 {
            if p == 0 {
                break;
            }
            let w = self.cfg_read16(p)?;
            if w as u8 == id {
                return Ok(p);
            }
            p = u64::from((w >> 8) & 0xFC);
        }
        Err(DriverError::Misbehaved(format!(
            "no PCI capability {id:#x} in the chain"
        )))
    }

    fn mem_off(iova: u64, len: usize) -> Result<u64> {
        let end = iova.checked_add(len as u64);
        match (iova.checked_sub(IOVA), end) {
            (Some(off), Some(end)) if end - IOVA <= FILE_SIZE => Ok(off),
            _ => Err(DriverError::OutOfMemory { iova, len }),
        }
    }

    /// Write guest memory at `iova`.
    pub fn mem_write(&self, iova: u64, data: &[u8]) -> Result<()> {
        file_write(&self.mem, Self::mem_off(iova, data.len())?, data)
    }

    /// Read guest memory at `iova`.
    pub fn mem_read(&self, iova: u64, len: usize) -> Result<Vec<u8>> {
        file_read(&self.mem, Self::mem_off(iova, len)?, len)
    }

    /// Are the bytes of the memfd that were never mapped for DMA all still zero?
    pub fn outside_untouched(&self) -> Result<bool> {
        let rest = file_read(&self.mem, MAPPED, (FILE_SIZE - MAPPED) as usize)?;
        Ok(rest.iter().all(|&b| b == 0))
    }

    /// Software reset through CTRL.RST; the bit must self-clear.
    pub fn reset(&mut self) -> Result<()> {
        let ctrl = self.rd(reg::CTRL)?;
        self.wr(reg::CTRL, ctrl | reg::CTRL_RST)?;
        for _ in 0..100 {
            if self.rd(reg::CTRL)? & reg::CTRL_RST == 0 {
                self.next_tx = 0;
                self.next_rx = 0;
                self.tx_busy = [false; NDESC as usize];
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(DriverError::Misbehaved(
            "CTRL.RST did not self-clear".into(),
        ))
    }

    /// Read one EEPROM word through EERD.
    pub fn eeprom_read(&self, addr: u8) -> Result<u16> {
        self.wr(reg::EERD, reg::EERD_START | (u32::from(addr) << 8))?;
        for _ in 0..1000 {
            let v = self.rd(reg::EERD)?;
            if v & reg::EERD_DONE != 0 {
                return Ok((v >> 16) as u16);
            }
        }
        Err(DriverError::Misbehaved(format!(
            "EERD read of word {addr:#x} never completed"
        )))
    }

    /// Read the EEPROM, verify its checksum and take the MAC from words 0-2.
    pub fn probe(&mut self) -> Result<[u8; 6]> {
        let mut sum = 0u16;
        let mut mac = [0u8; 6];
        for a in 0..0x40u8 {
            let w = self.eeprom_read(a)?;
            sum = sum.wrapping_add(w);
            if a < 3 {
                let i = usize::from(a) * 2;
                mac[i..i + 2].copy_from_slice(&w.to_le_bytes());
            }
        }
        if sum != EEPROM_SUM {
            return Err(DriverError::Misbehaved(format!(
                "EEPROM checksum {sum:#06x}, expected {EEPROM_SUM:#06x}"
            )));
        }
        self.mac = mac;
        Ok(mac)
    }

    /// Link up, receive address, both rings and the interrupt mask.
    pub fn setup(&mut self) -> Result<()> {
        let ctrl = self.rd(reg::CTRL)?;
        self.wr(reg::CTRL, ctrl | reg::CTRL_SLU)?;
        let m = self.mac;
        self.wr(reg::RAL0, u32::from_le_bytes([m[0], m[1], m[2], m[3]]))?;
        self.wr(
            reg::RAH0,
            u32::from(u16::from_le_bytes([m[4], m[5]])) | reg::RAH_AV,
        )?;
        // TX.
        self.wr(reg::TCTL, 0)?;
        let tx_ring = self.dev_addr(TX_RING, u64::from(NDESC) * 16)?;
        self.wr(reg::TDBAL, tx_ring as u32)?;
        self.wr(reg::TDBAH, (tx_ring >> 32) as u32)?;
        self.wr(reg::TDLEN, NDESC * 16)?;
        self.wr(reg::TDH, 0)?;
        self.wr(reg::TDT, 0)?;
        self.wr(reg::TCTL, reg::TCTL_EN | reg::TCTL_PSP)?;
        // RX: every descriptor gets its buffer; RDT one behind the head.
        for i in 0..NDESC {
            self.rx_give(i)?;
        }
        self.wr(reg::RCTL, 0)?;
        let rx_ring = self.dev_addr(RX_RING, u64::from(NDESC) * 16)?;
        self.wr(reg::RDBAL, rx_ring as u32)?;
        self.wr(reg::RDBAH, (rx_ring >> 32) as u32)?;
        self.wr(reg::RDLEN, NDESC * 16)?;
        self.wr(reg::RDH, 0)?;
        self.wr(reg::RDT, NDESC - 1)?;
        self.wr(reg::RCTL, reg::RCTL_EN | reg::RCTL_BAM | reg::RCTL_SECRC)?;
        self.next_tx = 0;
        self.next_rx = 0;
        self.tx_busy = [false; NDESC as usize];
        self.wr(reg::IMC, u32::MAX)?;
        self.rd(reg::ICR)?;
        take(&self.irq);
        if self.mode == IrqMode::Intx {
            self.unmask()?;
        }
        self.wr(reg::IMS, reg::ICR_RXT0 | reg::ICR_RXO)?;
        Ok(())
    }

    fn unmask(&self) -> Result<()> {
        if let Some(fd) = &self.unmask_fd {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a local u64 to our own eventfd.
            let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            if n != 8 {
                return Err(DriverError::Memory(std::io::Error::last_os_error()));
            }
            return Ok(());
        }
        Ok(self
            .dev
            .set_irqs(pci_index::INTX_IRQ, IrqAction::Unmask, 0, 1, IrqData::None)?)
    }

    /// In INTx mode, give the device an unmask eventfd (SET_IRQS ACTION_UNMASK |
    /// DATA_EVENTFD) and unmask by writing it from then on, as a VMM with a resampling
    /// irqfd does. Returns false (and keeps unmasking by message) when the device
    /// refuses it or the mode is MSI.
    pub fn use_unmask_eventfd(&mut self) -> Result<bool> {
        if self.mode != IrqMode::Intx {
            return Ok(false);
        }
        let fd = eventfd()?;
        let theirs = fd.try_clone().map_err(DriverError::Memory)?;
        match self.dev.set_irqs(
            pci_index::INTX_IRQ,
            IrqAction::Unmask,
            0,
            1,
            IrqData::Eventfd(vec![Some(theirs)]),
        ) {
            Ok(()) => {
                self.unmask_fd = Some(fd);
                Ok(true)
            }
            Err(DeviceError::Unsupported(_)) => Ok(false),
            Err(DeviceError::Remote { errno, .. }) if errno == libc::ENOTSUP => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Write RX descriptor `idx` afresh: its buffer address, status clear.
    fn rx_give(&self, idx: u32) -> Result<()> {
        let mut d = [0u8; 16];
        let buf = self.dev_addr(RX_BUF + u64::from(idx) * BUF_SIZE, BUF_SIZE)?;
        d[..8].copy_from_slice(&buf.to_le_bytes());
        self.mem_write(RX_RING + u64::from(idx) * 16, &d)
    }

    /// Write a raw TX descriptor into slot `idx` (for hostile-descriptor tests).
    pub fn tx_desc_raw(&self, idx: u32, addr: u64, len: u16, cmd: u8) -> Result<()> {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..10].copy_from_slice(&len.to_le_bytes());
        d[11] = cmd;
        self.mem_write(TX_RING + u64::from(idx % NDESC) * 16, &d)
    }

    /// Status byte of TX descriptor `idx`.
    pub fn tx_status(&self, idx: u32) -> Result<u8> {
        Ok(self.mem_read(TX_RING + u64::from(idx % NDESC) * 16 + 12, 1)?[0])
    }

    /// Choose how the driver waits for its interrupts (see [`IrqWait`]). An adaptive
    /// wait starts over (window zero, its yield timed again).
    pub fn set_irq_wait(&mut self, how: IrqWait) {
        self.irq_wait = how;
        if let IrqWait::Adaptive(max) = how {
            self.halt_poll = HaltPoll::new(max);
        }
    }

    /// Wait for the interrupt eventfd as [`Driver::set_irq_wait`] chose; counts which
    /// way each wait ended.
    fn wait_irq_fd(&mut self, timeout: Duration) -> bool {
        let fd = &self.irq;
        let end = match self.irq_wait {
            IrqWait::Block => wait_in(fd, Duration::ZERO, false, None, timeout),
            IrqWait::HaltPoll(w) => wait_in(fd, w, false, None, timeout),
            IrqWait::YieldPoll(w) => wait_in(fd, w, true, None, timeout),
            IrqWait::Adaptive(_) => {
                let t0 = Instant::now();
                let h = &self.halt_poll;
                let end = wait_in(fd, h.window(), false, Some(h), timeout);
                self.halt_poll.update(Halted {
                    took: t0.elapsed(),
                    crowded: end.crowded,
                });
                end
            }
        };
        if end.looked {
            self.polled_waits += 1;
        } else {
            self.blocked_waits += 1;
        }
        end.ready
    }

    /// Queue one frame and ring the doorbell (TDT).
    pub fn send(&mut self, frame: &[u8]) -> Result<()> {
        if frame.is_empty() || frame.len() as u64 > BUF_SIZE {
            return Err(DriverError::Packet(format!(
                "frame of {} bytes does not fit a {BUF_SIZE}-byte buffer",
                frame.len()
            )));
        }
        let idx = self.next_tx;
        if self.tx_busy[idx as usize] {
            if self.tx_status(idx)? & reg::TXD_STA_DD == 0 {
                return Err(DriverError::Misbehaved(format!(
                    "TX ring full: descriptor {idx} not written back"
                )));
            }
            self.tx_busy[idx as usize] = false;
        }
        let buf = TX_BUF + u64::from(idx) * BUF_SIZE;
        self.mem_write(buf, frame)?;
        self.tx_desc_raw(
            idx,
            self.dev_addr(buf, BUF_SIZE)?,
            frame.len() as u16,
            reg::TXD_EOP | reg::TXD_IFCS | reg::TXD_RS,
        )?;
        self.tx_busy[idx as usize] = true;
        self.next_tx = (idx + 1) % NDESC;
        self.wr(reg::TDT, self.next_tx)
    }

    /// Take the next received frame if one is complete in the ring.
    pub fn poll_rx(&mut self) -> Result<Option<Vec<u8>>> {
        let mut frame = Vec::new();
        let mut idx = self.next_rx;
        for _ in 0..NDESC {
            // One local copy of the descriptor, validated before use.
            let d = self.mem_read(RX_RING + u64::from(idx) * 16, 16)?;
            let len = usize::from(u16::from_le_bytes([d[8], d[9]]));
            let status = d[12];
            if status & reg::RXD_STA_DD == 0 {
                return Ok(None);
            }
            if len as u64 > BUF_SIZE {
                return Err(DriverError::Misbehaved(format!(
                    "RX descriptor {idx} length {len} exceeds the {BUF_SIZE}-byte buffer"
                )));
            }
            frame.extend(self.mem_read(RX_BUF + u64::from(idx) * BUF_SIZE, len)?);
            if status & reg::RXD_STA_EOP != 0 {
                // Hand the descriptors back: clear them, move RDT to the last one.
                let mut i = self.next_rx;
                loop {
                    self.rx_give(i)?;
                    if i == idx {
                        break;
                    }
                    i = (i + 1) % NDESC;
                }
                self.wr(reg::RDT, idx)?;
                self.next_rx = (idx + 1) % NDESC;
                return Ok(Some(frame));
            }
            idx = (idx + 1) % NDESC;
        }
        Err(DriverError::Misbehaved(
            "a frame spans the whole RX ring without EOP".into(),
        ))
    }

    /// Wait up to `timeout` for one received frame (by interrupt).
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(f) = self.poll_rx()? {
                return Ok(Some(f));
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.wait_irq_fd(left) {
                return Ok(None);
            }
            self.interrupts += take(&self.irq);
            if self.mode == IrqMode::Intx {
                // Level: acknowledge the causes, then unmask.
                self.rd(reg::ICR)?;
                self.unmask()?;
            }
        }
    }

    /// Wait up to `timeout` for one interrupt and acknowledge it; returns the causes
    /// read from ICR (INTx) or 0 (MSI, where the driver does not read ICR).
    pub fn wait_irq(&mut self, timeout: Duration) -> Result<u32> {
        if !self.wait_irq_fd(timeout) {
            return Err(DriverError::Timeout(timeout, "an interrupt".into()));
        }
        self.interrupts += take(&self.irq);
        if self.mode == IrqMode::Intx {
            let icr = self.rd(reg::ICR)?;
            self.unmask()?;
            return Ok(icr);
        }
        Ok(0)
    }

    /// Receive frames until `want` accepts one; ARP requests for `my_ip` are answered
    /// meanwhile. Fails after `timeout`.
    pub fn recv_until<T>(
        &mut self,
        my_ip: Ipv4Addr,
        timeout: Duration,
        what: &str,
        mut want: impl FnMut(&[u8]) -> Option<T>,
    ) -> Result<T> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let Some(f) = self.recv(left)? else {
                return Err(DriverError::Timeout(timeout, what.to_string()));
            };
            if let Some(t) = want(&f) {
                return Ok(t);
            }
            self.answer_arp(&f, my_ip)?;
        }
    }

    /// If `frame` asks who has `my_ip`, answer it.
    pub fn answer_arp(&mut self, frame: &[u8], my_ip: Ipv4Addr) -> Result<bool> {
        let Ok(e) = EthernetFrame::parse(frame) else {
            return Ok(false);
        };
        if e.ethertype != ETHERTYPE_ARP {
            return Ok(false);
        }
        let Ok(a) = ArpPacket::parse(e.payload) else {
            return Ok(false);
        };
        if a.op != ARP_OP_REQUEST || a.target_ip != my_ip {
            return Ok(false);
        }
        let reply = build_arp_reply(MacAddr(self.mac), my_ip, a.sender_mac, a.sender_ip);
        self.send(&reply)?;
        Ok(true)
    }

    /// ARP for `target` from `my_ip`; the MAC of the answer.
    pub fn arp(&mut self, my_ip: Ipv4Addr, target: Ipv4Addr, timeout: Duration) -> Result<MacAddr> {
        let me = MacAddr(self.mac);
        self.send(&build_arp_request(me, my_ip, target))?;
        self.recv_until(my_ip, timeout, "an ARP reply", |f| {
            let e = EthernetFrame::parse(f).ok()?;
            if e.ethertype != ETHERTYPE_ARP || e.dst != me {
                return None;
            }
            let a = ArpPacket::parse(e.payload).ok()?;
            (a.op == ARP_OP_REPLY && a.sender_ip == target && a.target_mac == me)
                .then_some(a.sender_mac)
        })
    }

    /// One ICMP echo to `dst`; returns the whole reply frame after checking it
    /// echoes `id`, `seq` and `payload`.
    #[allow(clippy::too_many_arguments)]
    pub fn ping(
        &mut self,
        my_ip: Ipv4Addr,
        dst_mac: MacAddr,
        dst: Ipv4Addr,
        id: u16,
        seq: u16,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let me = MacAddr(self.mac);
        let req = build_icmp_echo_request(me, dst_mac, my_ip, dst, id, seq, payload)
            .map_err(|e| DriverError::Packet(e.to_string()))?;
        self.send(&req)?;
        self.recv_until(my_ip, timeout, "an ICMP echo reply", |f| {
            let e = EthernetFrame::parse(f).ok()?;
            if e.ethertype != ETHERTYPE_IPV4 || e.dst != me {
                return None;
            }
            let p = Ipv4Packet::parse(e.payload).ok()?;
            if p.protocol != PROTO_ICMP || p.src != dst || p.dst != my_ip {
                return None;
            }
            let i = IcmpPacket::parse(p.payload).ok()?;
            (i.icmp_type == ICMP_ECHO_REPLY && i.id == id && i.seq == seq && i.payload == payload)
                .then(|| f.to_vec())
        })
    }
}

/// The `user` network's addresses as a guest uses them.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The `user` network's gateway.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// One row of the measurement.
#[derive(Debug, Clone, Copy)]
pub struct PpsRow {
    /// Frame length without FCS (60 = 64 on the wire).
    pub frame_len: usize,
    /// Round trips measured.
    pub packets: u64,
    /// Nanoseconds per packet (one TX through the device and its RX echo), best batch.
    pub ns_per_packet: f64,
    /// Raw socketpair round trip of a message of `frame_len` bytes, measured in
    /// batches interleaved with the device's (the best batch of each is reported).
    pub floor_ns: f64,
}

impl PpsRow {
    /// Round trips per second.
    pub fn pps(&self) -> f64 {
        1e9 / self.ns_per_packet
    }
    /// Per-packet cost over the socketpair floor.
    pub fn ratio(&self) -> f64 {
        self.ns_per_packet / self.floor_ns
    }
}

/// The whole measurement.
#[derive(Debug, Clone)]
pub struct PpsReport {
    /// One row per frame size.
    pub rows: Vec<PpsRow>,
    /// One register read (STATUS) through the device API, nanoseconds (best batch).
    pub register_read_ns: f64,
    /// Interrupts the driver took.
    pub interrupts: u64,
    /// How the driver waited for them.
    pub wait: IrqWait,
    /// Waits the bounded look ended, and waits that blocked in `poll()`.
    pub waits: (u64, u64),
}

impl std::fmt::Display for PpsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "e1000 over the VfioDevice API: ICMP echo to the user gateway, TX + RX by DMA and interrupt"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "  {:>4}-byte frames: {:>8} round trips, {:>9.0} ns/packet, {:>8.0} pps; socketpair floor {:>7.0} ns; ratio {:>6.1}x",
                r.frame_len,
                r.packets,
                r.ns_per_packet,
                r.pps(),
                r.floor_ns,
                r.ratio()
            )?;
        }
        write!(
            f,
            "  one register read: {:.0} ns; interrupts taken: {}; {}: {} waits ended by the look, {} blocked",
            self.register_read_ns, self.interrupts, self.wait, self.waits.0, self.waits.1
        )
    }
}

/// Round-trip time of `len`-byte messages over a UNIX socketpair with an echo thread:
/// the floor any out-of-process device exchange pays.
pub fn socketpair_floor(len: usize, iterations: u64) -> Result<f64> {
    use std::io::{Read, Write};
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().map_err(DriverError::Floor)?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; len];
        loop {
            match b.read_exact(&mut buf) {
                Ok(()) => b.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut buf = vec![0x5Au8; len];
    let t = Instant::now();
    for _ in 0..iterations {
        a.write_all(&buf).map_err(DriverError::Floor)?;
        a.read_exact(&mut buf).map_err(DriverError::Floor)?;
    }
    let ns = t.elapsed().as_nanos() as f64 / iterations.max(1) as f64;
    drop(a);
    match echo.join() {
        Ok(r) => r.map_err(DriverError::Floor)?,
        Err(_) => {
            return Err(DriverError::Floor(std::io::Error::other(
                "echo thread panicked",
            )))
        }
    }
    Ok(ns)
}

/// Measurement batches per row (device and floor alternate).
const BATCHES: u64 = 10;

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Ping the gateway `packets` times with frames of `frame_len` bytes (>= 42).
pub fn measure_row(
    drv: &mut Driver,
    gw: MacAddr,
    frame_len: usize,
    packets: u64,
) -> Result<PpsRow> {
    let payload_len = frame_len.checked_sub(14 + 20 + 8).ok_or_else(|| {
        DriverError::Packet(format!("frame length {frame_len} is below 42 bytes"))
    })?;
    let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
    let timeout = Duration::from_secs(10);
    // Warm up.
    for seq in 0..16u16 {
        drv.ping(GUEST_IP, gw, GATEWAY_IP, 0x4e10, seq, &payload, timeout)?;
    }
    // Interleave device batches with floor batches so both see the same machine load;
    // report the best batch of each (the one least disturbed by other load).
    let batch = (packets / BATCHES).max(1);
    let mut dev_ns = Vec::new();
    let mut floor = Vec::new();
    let mut seq = 0u16;
    for _ in 0..BATCHES {
        let t = Instant::now();
        for _ in 0..batch {
            seq = seq.wrapping_add(1);
            let f = drv.ping(GUEST_IP, gw, GATEWAY_IP, 0x4e11, seq, &payload, timeout)?;
            if f.len() != frame_len {
                return Err(DriverError::Misbehaved(format!(
                    "echo reply of {} bytes to a {frame_len}-byte request",
                    f.len()
                )));
            }
        }
        dev_ns.push(t.elapsed().as_nanos() as f64 / batch as f64);
        floor.push(socketpair_floor(frame_len, batch)?);
    }
    let ns_per_packet = best(&dev_ns);
    let floor_ns = best(&floor);
    let packets = batch * BATCHES;
    Ok(PpsRow {
        frame_len,
        packets,
        ns_per_packet,
        floor_ns,
    })
}

/// Measure packets per second through `dev`, an e1000 (typically a vfio-user client
/// of a served device) whose backend is the `user` network, for `packets` round trips
/// per frame size. Resets and programs the device; `via` chooses shared-fd or
/// message DMA (a local device needs `SharedFd`).
pub fn run(
    dev: Arc<dyn VfioDevice>,
    mode: IrqMode,
    via: DmaVia,
    packets: u64,
) -> Result<PpsReport> {
    run_waiting(dev, mode, via, packets, IrqWait::default())
}

/// [`run`] with the driver waiting for interrupts as `wait` says.
pub fn run_waiting(
    dev: Arc<dyn VfioDevice>,
    mode: IrqMode,
    via: DmaVia,
    packets: u64,
    wait: IrqWait,
) -> Result<PpsReport> {
    let mut drv = Driver::new_via(dev, guest_memory()?, mode, via)?;
    drv.set_irq_wait(wait);
    drv.reset()?;
    drv.probe()?;
    drv.setup()?;
    let gw = drv.arp(GUEST_IP, GATEWAY_IP, Duration::from_secs(10))?;
    let mut rows = Vec::new();
    for len in [60usize, 1500] {
        rows.push(measure_row(&mut drv, gw, len, packets)?);
    }
    let reads = (packets / BATCHES).max(1);
    let mut batches = Vec::new();
    for _ in 0..BATCHES {
        let t = Instant::now();
        for _ in 0..reads {
            drv.rd(reg::STATUS)?;
        }
        batches.push(t.elapsed().as_nanos() as f64 / reads as f64);
    }
    let register_read_ns = best(&batches);
    Ok(PpsReport {
        rows,
        register_read_ns,
        interrupts: drv.interrupts,
        wait,
        waits: (drv.polled_waits, drv.blocked_waits),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(fd: &OwnedFd) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local u64.
        let r = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        assert_eq!(r, 8, "eventfd write: {}", errno());
    }

    /// The fixed-window waits: yielding between looks or not.
    const POLLING: [bool; 2] = [false, true];

    fn wait(fd: &OwnedFd, window: Duration, yielding: bool, timeout: Duration) -> (bool, bool) {
        let e = wait_in(fd, window, yielding, None, timeout);
        assert!(!e.crowded, "no probe was asked for");
        (e.ready, e.looked)
    }

    #[test]
    fn bounded_look_times_out_when_nothing_is_signalled() {
        let fd = eventfd().unwrap();
        for yielding in POLLING {
            let t0 = Instant::now();
            let r = wait(
                &fd,
                Duration::from_millis(5),
                yielding,
                Duration::from_millis(30),
            );
            let took = t0.elapsed();
            assert_eq!(r, (false, false));
            // It looked for the whole window, then blocked until the timeout.
            assert!(took >= Duration::from_millis(25), "returned after {took:?}");
            // A timeout shorter than the window bounds the look too.
            let t0 = Instant::now();
            let r = wait(
                &fd,
                Duration::from_secs(5),
                yielding,
                Duration::from_millis(2),
            );
            assert!(!r.0);
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "looked past the timeout"
            );
        }
    }

    #[test]
    fn bounded_look_returns_on_a_signal_during_the_look_and_after_it() {
        let fd = Arc::new(eventfd().unwrap());
        for yielding in POLLING {
            // Already signalled: found by the look.
            signal(&fd);
            let r = wait(
                &fd,
                Duration::from_millis(50),
                yielding,
                Duration::from_secs(5),
            );
            assert_eq!(r, (true, true));
            assert_eq!(take(&fd), 1);
            // Signalled by another thread during a long look.
            let f2 = fd.clone();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(5));
                signal(&f2);
            });
            let r = wait(
                &fd,
                Duration::from_secs(3),
                yielding,
                Duration::from_secs(5),
            );
            t.join().unwrap();
            assert_eq!(r, (true, true));
            assert_eq!(take(&fd), 1);
            // Signalled after a short look ended: the blocking wait returns on it.
            let f2 = fd.clone();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                signal(&f2);
            });
            let t0 = Instant::now();
            let r = wait(
                &fd,
                Duration::from_micros(100),
                yielding,
                Duration::from_secs(5),
            );
            t.join().unwrap();
            assert!(r.0, "the signal after the look was missed");
            assert!(t0.elapsed() < Duration::from_secs(4));
            assert_eq!(take(&fd), 1);
        }
        // A zero window blocks at once.
        signal(&fd);
        assert_eq!(
            wait(&fd, Duration::ZERO, false, Duration::from_secs(5)),
            (true, false)
        );
        assert_eq!(take(&fd), 1);
        assert_eq!(
            wait(&fd, Duration::ZERO, false, Duration::from_millis(1)),
            (false, false)
        );
    }

    const US: fn(u64) -> Duration = Duration::from_micros;

    fn took(d: Duration) -> Halted {
        Halted {
            took: d,
            crowded: false,
        }
    }

    const CROWDED: Halted = Halted {
        took: Duration::from_micros(15),
        crowded: true,
    };

    #[test]
    fn halt_poll_grows_from_the_start_value_doubling_to_the_ceiling() {
        let mut h = HaltPoll::with_late(US(200), US(5));
        assert_eq!(h.window(), Duration::ZERO);
        // Waits that outlast the window but not the ceiling grow it: 10, 20, 40, 80,
        // 160, then the ceiling.
        let mut seen = Vec::new();
        for _ in 0..6 {
            h.update(took((h.window() + US(1)).min(US(199))));
            seen.push(h.window().as_micros());
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 200]);
        // A wait the window covered keeps it.
        h.update(took(US(3)));
        assert_eq!(h.window(), US(200));
    }

    #[test]
    fn halt_poll_shrinks_to_zero_after_a_wait_past_the_ceiling() {
        let mut h = HaltPoll::with_late(US(200), US(5));
        h.update(took(US(5)));
        h.update(took(US(15)));
        assert_eq!(h.window(), US(20));
        h.update(took(US(201)));
        assert_eq!(h.window(), Duration::ZERO);
        // From zero a long wait changes nothing (KVM shrinks only a polling vCPU, and
        // grows only on waits below the ceiling).
        h.update(took(Duration::from_millis(10)));
        assert_eq!(h.window(), Duration::ZERO);
        h.update(took(US(50)));
        assert_eq!(h.window(), US(10));
    }

    #[test]
    fn a_crowded_window_stops_polling_for_a_doubling_back_off() {
        let mut h = HaltPoll::with_late(US(200), US(5));
        let mut backoffs = Vec::new();
        for _ in 0..4 {
            h.update(took(US(5)));
            assert_eq!(h.window(), US(10), "grew again after the back-off");
            h.update(CROWDED);
            let mut n = 0;
            while h.window().is_zero() {
                h.update(took(US(5)));
                n += 1;
                assert!(n < 1000, "the back-off never ended");
            }
            // n - 1 waits of back-off learnt nothing; the last one grew the window.
            backoffs.push(n - 1);
            h.update(took(Duration::from_millis(1)));
            assert_eq!(h.window(), Duration::ZERO);
        }
        assert_eq!(backoffs, [16, 32, 64, 128]);
        // A poll that finds its interrupt starts the back-off over.
        h.update(took(US(5)));
        h.update(took(US(4)));
        assert_eq!(h.window(), US(10));
        h.update(CROWDED);
        let mut n = 0;
        while h.window().is_zero() {
            h.update(took(US(5)));
            n += 1;
        }
        assert_eq!(n - 1, HaltPoll::BACKOFF_START);
    }

    #[test]
    fn a_yield_is_late_only_when_another_thread_ran() {
        // A thread pinned with a busy peer on its CPU sees its yield come back late;
        // alone on its CPU it does not.
        let cpu = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = std::thread::spawn(move || {
            // The CPU this thread runs on now (one it is allowed to use).
            // SAFETY: sched_getcpu has no preconditions.
            let here = usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0);
            let _pin = nestio_vfio_user::bench::Pin::to(here);
            let h = HaltPoll::new(HaltPoll::KVM_MAX);
            let alone = (0..64).all(|_| {
                let t = Instant::now();
                std::thread::yield_now();
                !h.is_late(t.elapsed())
            });
            // A busy peer on the same CPU: yields hand it the CPU.
            let stop = cpu.clone();
            let peer = std::thread::spawn(move || {
                let _pin = nestio_vfio_user::bench::Pin::to(here);
                let t0 = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && t0.elapsed() < Duration::from_secs(5)
                {
                    std::hint::black_box(t0.elapsed());
                }
            });
            std::thread::sleep(Duration::from_millis(5));
            let crowded = (0..64).any(|_| {
                let t = Instant::now();
                std::thread::yield_now();
                h.is_late(t.elapsed())
            });
            cpu.store(true, std::sync::atomic::Ordering::Relaxed);
            peer.join().unwrap();
            (alone, crowded)
        });
        let (alone, crowded) = t.join().unwrap();
        assert!(
            crowded,
            "yields next to a busy thread on one CPU never came back late"
        );
        // Alone is best effort on a shared machine: another process may run on CPU 0.
        if !alone {
            eprintln!("note: a yield came back late with no peer (another process on this CPU)");
        }
        assert_eq!(IrqWait::default(), IrqWait::Adaptive(US(200)));
    }

    #[test]
    fn handoff_floor_measures_a_round_trip() {
        let ns = handoff_floor(50);
        assert!(ns.is_finite() && ns > 0.0, "floor {ns}");
    }
}
