//! Posted BAR writes through shared memory: a nestio extension of vfio-user.
//!
//! A posted REGION_WRITE over the socket still costs the writer one `sendmsg` and the
//! server one wake-up per write. With this extension the client puts each small posted
//! write into a single-producer ring in a memfd the server created and sent once, at
//! VERSION, and kicks an eventfd only when the server has said it is going to sleep.
//!
//! # Negotiation
//!
//! nestio's client proposes `"nestio_posted_ring":{"supported":true}` in its VERSION
//! capabilities; only nestio's server answers it, with `entries` and the indices of the
//! ring memfd and the kick eventfd among the VERSION reply's fds. Other servers ignore an
//! unknown key (the reply then has no such object and the client keeps posting over the
//! socket); QEMU's and Cloud Hypervisor's clients never propose it, so nestio's server
//! never sends it to them.
//!
//! # Layout (host-endian; the memfd is sealed against shrinking and growing)
//!
//! | offset | field | written by |
//! |---|---|---|
//! | 0 | `producer` u32: entries published (free-running) | client |
//! | 64 | `consumer` u32: entries executed (free-running) | server |
//! | 68 | `sleeping` u32: 1 while the server waits on the kick eventfd | server |
//! | 72 | `closed` u32: 1 once the session has ended | server |
//! | 76 | `errors` u32: ring writes the device refused or that were malformed | server |
//! | 128 + 32·i | entry i: `region` u32, `len` u32 (1..=8), `offset` u64, `data` [u8; 8], reserved u64 | client |
//!
//! # Ordering
//!
//! The client publishes an entry with a release store of `producer`. The server drains
//! the ring (executes every published entry, in order) **before it handles any socket
//! message**: a message sent after an entry was published finds `producer` past that
//! entry when it is received, so a read, a config access, SET_IRQS or DMA_MAP sent after
//! posted writes is executed after them, and a read sees them — as a PCI read pushes
//! earlier posted writes ahead of it. A posted write that does not fit a ring entry (more
//! than 8 bytes) or finds the ring full is sent as a *synchronous* REGION_WRITE: the
//! server drains the ring first, and the write has been executed when the call returns,
//! so nothing written later can overtake it. With the ring, nothing is posted over the
//! socket at all.
//!
//! # Event suppression
//!
//! The server's ring thread drains, then polls for at most [`RingConfig::poll`] (yielding
//! the CPU between looks, so a writer pinned to the same CPU runs), then stores
//! `sleeping = 1`, re-reads `producer` (both sequentially consistent) and waits on the
//! eventfd only if nothing came. The writer stores `producer`, then reads `sleeping`
//! (sequentially consistent) and kicks only when it is 1. One of the two always sees
//! the other's store, so no entry is left unexecuted while the server sleeps.
//!
//! # Errors and hostile peers
//!
//! A ring write the device refuses is logged by the server and counted in `errors` — the
//! asynchronous report a refused posted write over the socket already has. Every entry
//! is copied out of shared memory once and checked (a BAR region 0..=5, 1..=8 bytes, no
//! offset overflow); a malformed entry is counted and skipped. A `producer` more than
//! `entries` ahead of the server's own consumer index is a corrupted ring: the session
//! ends, as it does on a malformed message. Nothing the peer writes to the ring is
//! trusted as an index into memory. On the client's side, a `consumer` the server
//! moves wrongly can only make the client overwrite entries the server has not read, or
//! fall back to synchronous writes; a session that ended (`closed`) turns the next
//! posted write into `Disconnected`. A server that dies without ending the session is
//! noticed when the ring fills (at most `entries` writes later), by the synchronous
//! fallback.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestio_device_model::VfioDevice;
use parking_lot::Mutex;
use std::os::fd::FromRawFd;

/// Most data bytes one ring entry carries (a register write is 1, 2, 4 or 8 bytes).
pub const MAX_DATA: usize = 8;
/// Default number of entries.
pub const DEFAULT_ENTRIES: u32 = 256;
/// Most entries a ring may have.
pub const MAX_ENTRIES: u32 = 4096;
/// Default [`RingConfig::poll`].
pub const DEFAULT_POLL: Duration = Duration::from_micros(50);

const PRODUCER: usize = 0;
const CONSUMER: usize = 64;
const SLEEPING: usize = 68;
const CLOSED: usize = 72;
const ERRORS: usize = 76;
const ENTRIES: usize = 128;
const ENTRY_SIZE: usize = 32;
/// Regions a ring entry may name: the BARs.
const LAST_BAR: u32 = 5;

/// Errors of the posted-write ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The memfd or eventfd could not be created or mapped.
    #[error("cannot set up the posted-write ring: {0} (out of memory or fds?)")]
    Setup(#[source] std::io::Error),
    /// A ring size that is not a power of two in 1..=MAX_ENTRIES.
    #[error(
        "a posted-write ring has a power-of-two number of entries up to {MAX_ENTRIES}, not {0}"
    )]
    BadSize(u32),
    /// The peer's ring memfd is not sealed or too small, or its kick fd no eventfd.
    #[error(
        "the server's posted-write ring is unsafe to use: {0}; posting over the socket instead"
    )]
    UnsafeMemory(&'static str),
    /// The producer index is further ahead than the ring holds: the ring is corrupted.
    #[error("corrupted posted-write ring: producer {producer} is more than {entries} entries past consumer {consumer}; the session ends")]
    Corrupted {
        /// The producer index read.
        producer: u32,
        /// The server's consumer index.
        consumer: u32,
        /// The ring's size.
        entries: u32,
    },
}

/// A ring's geometry: a checked number of entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    entries: u32,
}

impl Geometry {
    /// `entries` must be a power of two in 1..=[`MAX_ENTRIES`].
    pub fn new(entries: u32) -> Result<Geometry, RingError> {
        if entries == 0 || entries > MAX_ENTRIES || !entries.is_power_of_two() {
            return Err(RingError::BadSize(entries));
        }
        Ok(Geometry { entries })
    }

    /// Number of entries.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Bytes of shared memory: header and entries, rounded up to 4 KiB pages.
    pub fn bytes(&self) -> usize {
        (ENTRIES + self.entries as usize * ENTRY_SIZE).next_multiple_of(4096)
    }

    fn slot(&self, index: u32) -> usize {
        ENTRIES + (index & (self.entries - 1)) as usize * ENTRY_SIZE
    }
}

/// Server settings of the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    /// Entries (a power of two up to [`MAX_ENTRIES`]).
    pub entries: u32,
    /// How long the server's ring thread keeps looking for new entries after the last
    /// one before it sleeps (and writers must kick it). Zero: sleep at once.
    pub poll: Duration,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            entries: DEFAULT_ENTRIES,
            poll: DEFAULT_POLL,
        }
    }
}

/// A shared mapping of the ring memfd.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above: every access is an atomic load or store.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a new shared mapping of `len` bytes of `fd`; no existing memory is
        // affected and the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "ring layout offset"
        );
        // SAFETY: in bounds and aligned (checked above; the mapping is page aligned);
        // the memory lives as long as `self`, and is only accessed atomically.
        unsafe { &*self.ptr.add(off).cast::<AtomicU32>() }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(
            off.is_multiple_of(8) && off + 8 <= self.len,
            "ring layout offset"
        );
        // SAFETY: as in `u32_at`.
        unsafe { &*self.ptr.add(off).cast::<AtomicU64>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One write read from the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingWrite {
    /// Region (a BAR, 0..=5).
    pub region: u32,
    /// Offset in the region.
    pub offset: u64,
    len: u8,
    data: [u8; MAX_DATA],
}

impl RingWrite {
    /// The bytes written.
    pub fn data(&self) -> &[u8] {
        &self.data[..self.len as usize]
    }
}

/// A close-on-exec memfd of `bytes` (> 0) zero bytes, sealed with
/// [`nestio_dma::memfd::RAM_SEALS`] as guest RAM is. Sized by writing its last byte
/// rather than `ftruncate`, which a sandboxed device process may not call (it could
/// shrink a peer's file); `nestio_sandbox` allows exactly these calls.
fn ring_memfd(bytes: usize) -> Result<OwnedFd, RingError> {
    let err = |_| RingError::Setup(std::io::Error::last_os_error());
    // SAFETY: memfd_create reads a NUL-terminated literal; the result is checked.
    let raw = unsafe {
        libc::memfd_create(
            c"nestio-posted-ring".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(err(()));
    }
    // SAFETY: `raw` is a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let last = libc::off_t::try_from(bytes.saturating_sub(1)).map_err(|_| {
        RingError::Setup(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "ring too large",
        ))
    })?;
    // SAFETY: writes one byte from a live buffer into our memfd.
    if unsafe { libc::pwrite(fd.as_raw_fd(), [0u8].as_ptr().cast(), 1, last) } != 1 {
        return Err(err(()));
    }
    // SAFETY: F_ADD_SEALS on our own memfd takes an int argument; checked.
    if unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            nestio_dma::memfd::RAM_SEALS,
        )
    } < 0
    {
        return Err(err(()));
    }
    Ok(fd)
}

/// A kick eventfd: non-blocking (a kick never blocks the writer), close-on-exec.
fn kick_fd() -> Result<OwnedFd, RingError> {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(RingError::Setup(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Add 1 to eventfd `fd`. EAGAIN (the counter is saturated) means the reader is being
/// woken anyway.
fn kick(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64 to an fd we own.
    let r = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if r < 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "posted-ring kick not delivered");
    }
}

/// Reset eventfd `fd` (non-blocking).
fn unkick(fd: &OwnedFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a live u64 from an fd we own; EAGAIN is fine.
    unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

// ---------------------------------------------------------------------------------
// Client side

/// Why a write was not put into the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// More than [`MAX_DATA`] bytes, or none.
    TooLarge,
    /// The server has not caught up: no free entry.
    Full,
    /// The server ended the session.
    Closed,
}

/// The client's end: publishes posted writes.
pub struct RingProducer {
    map: Mapping,
    geo: Geometry,
    kick: OwnedFd,
    /// The next producer index (writers from several vCPUs are serialised).
    next: Mutex<u32>,
    kicks: AtomicU64,
    pushed: AtomicU64,
}

impl RingProducer {
    /// Map the server's ring `memfd` (checked: sealed against shrinking, large enough)
    /// of `entries` entries, kicking `kick`.
    pub fn attach(memfd: OwnedFd, kick: OwnedFd, entries: u32) -> Result<RingProducer, RingError> {
        let geo = Geometry::new(entries)?;
        // Seals before size: a sealed file's size cannot go down afterwards.
        let seals = nestio_dma::memfd::seals(memfd.as_fd())
            .ok_or(RingError::UnsafeMemory("it is not a sealable memfd"))?;
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(RingError::UnsafeMemory(
                "it is not sealed against shrinking",
            ));
        }
        let size = std::fs::File::from(memfd.try_clone().map_err(RingError::Setup)?)
            .metadata()
            .map_err(RingError::Setup)?
            .len();
        if size < geo.bytes() as u64 {
            return Err(RingError::UnsafeMemory("it is smaller than its entries"));
        }
        // The kick is written on every vCPU's path: it must be an eventfd (a pipe or
        // socket could block the writer, a file would be written to).
        let link = std::fs::read_link(format!("/proc/self/fd/{}", kick.as_raw_fd()))
            .map_err(RingError::Setup)?;
        if link.as_os_str() != "anon_inode:[eventfd]" {
            return Err(RingError::UnsafeMemory("its kick fd is not an eventfd"));
        }
        let map = Mapping::new(memfd.as_fd(), geo.bytes()).map_err(RingError::Setup)?;
        let start = map.u32_at(PRODUCER).load(Ordering::Acquire);
        Ok(RingProducer {
            map,
            geo,
            kick,
            next: Mutex::new(start),
            kicks: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
        })
    }

    /// Publish one posted write of 1..=[`MAX_DATA`] bytes to a BAR.
    pub fn push(&self, region: u32, offset: u64, data: &[u8]) -> Result<(), PushError> {
        if data.is_empty() || data.len() > MAX_DATA {
            return Err(PushError::TooLarge);
        }
        let mut next = self.next.lock();
        if self.map.u32_at(CLOSED).load(Ordering::Acquire) != 0 {
            return Err(PushError::Closed);
        }
        let consumer = self.map.u32_at(CONSUMER).load(Ordering::Acquire);
        if next.wrapping_sub(consumer) >= self.geo.entries {
            return Err(PushError::Full);
        }
        let slot = self.geo.slot(*next);
        let mut d = [0u8; MAX_DATA];
        d[..data.len()].copy_from_slice(data);
        self.map.u64_at(slot).store(
            u64::from(region) | (data.len() as u64) << 32,
            Ordering::Relaxed,
        );
        self.map.u64_at(slot + 8).store(offset, Ordering::Relaxed);
        self.map
            .u64_at(slot + 16)
            .store(u64::from_ne_bytes(d), Ordering::Relaxed);
        *next = next.wrapping_add(1);
        self.map.u32_at(PRODUCER).store(*next, Ordering::SeqCst);
        drop(next);
        self.pushed.fetch_add(1, Ordering::Relaxed);
        // Pairs with the server's `sleeping = 1; fence; re-read producer`.
        fence(Ordering::SeqCst);
        if self.map.u32_at(SLEEPING).load(Ordering::SeqCst) != 0 {
            self.kicks.fetch_add(1, Ordering::Relaxed);
            kick(&self.kick);
        }
        Ok(())
    }

    /// Writes published so far, and how many of them kicked the server awake.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.pushed.load(Ordering::Relaxed),
            self.kicks.load(Ordering::Relaxed),
        )
    }

    /// Ring writes the server reported as refused or malformed (asynchronous errors).
    pub fn errors(&self) -> u32 {
        self.map.u32_at(ERRORS).load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------
// Server side

/// The server's end: reads and checks entries. Index state lives here, never in the
/// shared memory the client can write.
pub struct RingConsumer {
    map: Arc<Mapping>,
    geo: Geometry,
    consumer: u32,
    errors: u32,
}

impl RingConsumer {
    fn new(memfd: &OwnedFd, geo: Geometry) -> Result<RingConsumer, RingError> {
        let map = Arc::new(Mapping::new(memfd.as_fd(), geo.bytes()).map_err(RingError::Setup)?);
        Ok(RingConsumer {
            map,
            geo,
            consumer: 0,
            errors: 0,
        })
    }

    /// Are entries waiting?
    fn pending(&self) -> bool {
        self.map.u32_at(PRODUCER).load(Ordering::SeqCst) != self.consumer
    }

    /// Execute every published entry in order with `exec`, which returns the errno of a
    /// write the device refused. Returns the number of entries taken.
    pub fn drain(
        &mut self,
        exec: &mut dyn FnMut(&RingWrite) -> Result<(), i32>,
    ) -> Result<usize, RingError> {
        let producer = self.map.u32_at(PRODUCER).load(Ordering::Acquire);
        let ahead = producer.wrapping_sub(self.consumer);
        if ahead > self.geo.entries {
            return Err(RingError::Corrupted {
                producer,
                consumer: self.consumer,
                entries: self.geo.entries,
            });
        }
        for _ in 0..ahead {
            let slot = self.geo.slot(self.consumer);
            let w0 = self.map.u64_at(slot).load(Ordering::Relaxed);
            let offset = self.map.u64_at(slot + 8).load(Ordering::Relaxed);
            let data = self.map.u64_at(slot + 16).load(Ordering::Relaxed);
            let region = w0 as u32;
            let len = (w0 >> 32) as u32;
            let valid = region <= LAST_BAR
                && (1..=MAX_DATA as u32).contains(&len)
                && offset.checked_add(u64::from(len)).is_some();
            let r = if valid {
                exec(&RingWrite {
                    region,
                    offset,
                    len: len as u8,
                    data: data.to_ne_bytes(),
                })
            } else {
                tracing::warn!(region, len, offset, "malformed posted-ring entry skipped");
                Err(libc::EINVAL)
            };
            if let Err(errno) = r {
                tracing::warn!(region, offset, errno, "posted write (ring) failed");
                self.errors = self.errors.wrapping_add(1);
                self.map
                    .u32_at(ERRORS)
                    .store(self.errors, Ordering::Relaxed);
            }
            self.consumer = self.consumer.wrapping_add(1);
            self.map
                .u32_at(CONSUMER)
                .store(self.consumer, Ordering::Release);
        }
        Ok(ahead as usize)
    }
}

struct Shared {
    consumer: Mutex<RingConsumer>,
    /// The consumer's mapping, for the flags (without the consumer's lock).
    map: Arc<Mapping>,
    device: Arc<dyn VfioDevice>,
    kick: OwnedFd,
    stop: AtomicBool,
    /// Times the ring thread went to sleep on the eventfd.
    sleeps: AtomicU64,
}

impl Shared {
    fn drain(&self) -> Result<usize, RingError> {
        let dev = &*self.device;
        self.consumer.lock().drain(&mut |w| {
            dev.region_write(w.region, w.offset, w.data())
                .map_err(|e| e.errno())
        })
    }
}

/// A session's ring on the server: the memory, the kick eventfd and the thread that
/// executes entries. [`PostedRing::drain`] is called before each socket message;
/// dropping it ends the ring (marked `closed` for the client, thread joined).
pub struct PostedRing {
    shared: Arc<Shared>,
    geo: Geometry,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the server sends the client at VERSION.
pub struct RingFds {
    /// The ring memory.
    pub memfd: OwnedFd,
    /// The kick eventfd.
    pub kick: OwnedFd,
}

impl PostedRing {
    /// Create a ring writing to `device`. `on_corrupt` is called (from the ring thread)
    /// when the client corrupts the ring; it should end the session.
    pub fn start(
        device: Arc<dyn VfioDevice>,
        config: RingConfig,
        on_corrupt: Box<dyn Fn(&RingError) + Send>,
    ) -> Result<(PostedRing, RingFds), RingError> {
        let geo = Geometry::new(config.entries)?;
        let memfd = ring_memfd(geo.bytes())?;
        let consumer = RingConsumer::new(&memfd, geo)?;
        let kick = kick_fd()?;
        let client_kick = kick.try_clone().map_err(RingError::Setup)?;
        let shared = Arc::new(Shared {
            map: consumer.map.clone(),
            consumer: Mutex::new(consumer),
            device,
            kick,
            stop: AtomicBool::new(false),
            sleeps: AtomicU64::new(0),
        });
        let s2 = shared.clone();
        let poll = config.poll;
        let thread = std::thread::Builder::new()
            .name("vfio-user-ring".into())
            .spawn(move || ring_loop(&s2, poll, &*on_corrupt))
            .map_err(RingError::Setup)?;
        Ok((
            PostedRing {
                shared,
                geo,
                thread: Some(thread),
            },
            RingFds {
                memfd,
                kick: client_kick,
            },
        ))
    }

    /// Entries of this ring.
    pub fn entries(&self) -> u32 {
        self.geo.entries
    }

    /// Execute every entry published so far (the server calls this before handling a
    /// socket message: the ordering rule).
    pub fn drain(&self) -> Result<usize, RingError> {
        self.shared.drain()
    }

    /// Times the ring thread slept on the eventfd (each needed a kick to wake).
    pub fn sleeps(&self) -> u64 {
        self.shared.sleeps.load(Ordering::Relaxed)
    }
}

impl Drop for PostedRing {
    fn drop(&mut self) {
        self.shared.map.u32_at(CLOSED).store(1, Ordering::Release);
        self.shared.stop.store(true, Ordering::Release);
        kick(&self.shared.kick);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ring_loop(s: &Shared, poll: Duration, on_corrupt: &dyn Fn(&RingError)) {
    let sleeping = |v: u32| s.map.u32_at(SLEEPING).store(v, Ordering::SeqCst);
    loop {
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        match s.drain() {
            Ok(0) => {}
            Ok(_) => {
                // Adaptive: look again for up to `poll` before sleeping; give the CPU
                // away between looks so a writer on the same CPU can run.
                let t0 = Instant::now();
                while t0.elapsed() < poll && !s.consumer.lock().pending() {
                    if s.stop.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::yield_now();
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "posted-write ring");
                on_corrupt(&e);
                return;
            }
        }
        sleeping(1);
        fence(Ordering::SeqCst);
        if s.consumer.lock().pending() || s.stop.load(Ordering::Acquire) {
            sleeping(0);
            continue;
        }
        s.sleeps.fetch_add(1, Ordering::Relaxed);
        wait_readable(s.kick.as_raw_fd());
        unkick(&s.kick);
        sleeping(0);
    }
}

/// Block until `fd` is readable (or a signal interrupts).
fn wait_readable(fd: std::os::fd::RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd that lives for the call.
    unsafe { libc::poll(&mut p, 1, -1) };
}

// ---------------------------------------------------------------------------------
// Fuzzing

/// Fuzz the ring consumer: `data` is written over a ring's shared memory (header and
/// entries, as a hostile client could) between drains; every executed write must be a
/// checked one and nothing may panic.
#[cfg(feature = "harness")]
pub fn fuzz_ring(data: &[u8]) {
    let Some((&shape, rest)) = data.split_first() else {
        return;
    };
    let Ok(geo) = Geometry::new(1 << (shape % 6)) else {
        return;
    };
    let Ok(memfd) = ring_memfd(geo.bytes()) else {
        return;
    };
    let Ok(mut c) = RingConsumer::new(&memfd, geo) else {
        return;
    };
    let Ok(writer) = Mapping::new(memfd.as_fd(), geo.bytes()) else {
        return;
    };
    // Each chunk: a u16 word index into the mapping and a u64 value, or a drain.
    for chunk in rest.chunks(10) {
        if chunk.len() < 10 || chunk[0] == 0xff {
            let mut seen = 0u32;
            let r = c.drain(&mut |w| {
                assert!(w.region <= LAST_BAR && (1..=MAX_DATA).contains(&w.data().len()));
                assert!(w.offset.checked_add(w.data().len() as u64).is_some());
                seen += 1;
                if w.offset & 1 == 0 {
                    Ok(())
                } else {
                    Err(libc::EINVAL)
                }
            });
            if let Ok(n) = r {
                assert!(n <= geo.entries() as usize && seen as usize <= n);
            }
            continue;
        }
        let word = u16::from_le_bytes([chunk[0], chunk[1]]) as usize * 8 % geo.bytes();
        let mut v = [0u8; 8];
        v.copy_from_slice(&chunk[2..10]);
        writer
            .u64_at(word)
            .store(u64::from_le_bytes(v), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(entries: u32) -> (RingProducer, RingConsumer, OwnedFd) {
        let geo = Geometry::new(entries).unwrap();
        let memfd = ring_memfd(geo.bytes()).unwrap();
        let c = RingConsumer::new(&memfd, geo).unwrap();
        let kick = kick_fd().unwrap();
        let p = RingProducer::attach(
            memfd.try_clone().unwrap(),
            kick.try_clone().unwrap(),
            entries,
        )
        .unwrap();
        (p, c, memfd)
    }

    #[test]
    fn geometry_is_checked() {
        assert!(Geometry::new(0).is_err());
        assert!(Geometry::new(3).is_err());
        assert!(Geometry::new(MAX_ENTRIES * 2).is_err());
        assert_eq!(
            Geometry::new(256).unwrap().bytes(),
            128 + 256 * 32 + 4096 - 128
        );
    }

    #[test]
    fn entries_come_out_in_order_and_a_full_ring_says_so() {
        let (p, mut c, _m) = pair(4);
        for i in 0..4u32 {
            p.push(0, u64::from(i) * 4, &i.to_le_bytes()).unwrap();
        }
        assert_eq!(p.push(0, 0, &[1]), Err(PushError::Full));
        assert_eq!(p.push(0, 0, &[0; 9]), Err(PushError::TooLarge));
        assert_eq!(p.push(0, 0, &[]), Err(PushError::TooLarge));
        let mut got = Vec::new();
        let n = c
            .drain(&mut |w| {
                got.push((w.offset, w.data().to_vec()));
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 4);
        let want: Vec<_> = (0..4u32)
            .map(|i| (u64::from(i) * 4, i.to_le_bytes().to_vec()))
            .collect();
        assert_eq!(got, want);
        // Space again; indices wrap around the ring.
        for i in 0..10u32 {
            p.push(1, 8, &[i as u8, 0]).unwrap();
            let mut last = None;
            c.drain(&mut |w| {
                last = Some(w.data().to_vec());
                Ok(())
            })
            .unwrap();
            assert_eq!(last, Some(vec![i as u8, 0]));
        }
    }

    #[test]
    fn hostile_entries_and_indices_are_errors_not_panics() {
        let (p, mut c, m) = pair(8);
        let w = Mapping::new(m.as_fd(), Geometry::new(8).unwrap().bytes()).unwrap();
        p.push(0, 0, &[1, 2, 3, 4]).unwrap();
        // Rewrite the entry: config space (region 7), then a length of 200.
        w.u64_at(ENTRIES).store(7 | 4 << 32, Ordering::Relaxed);
        p.push(0, 0, &[1]).unwrap();
        w.u64_at(ENTRIES + ENTRY_SIZE)
            .store(200 << 32, Ordering::Relaxed);
        p.push(2, u64::MAX - 1, &[1, 2, 3, 4]).unwrap();
        let mut ran = 0;
        assert_eq!(
            c.drain(&mut |_| {
                ran += 1;
                Ok(())
            })
            .unwrap(),
            3
        );
        assert_eq!(ran, 0, "no malformed entry reaches the device");
        assert_eq!(p.errors(), 3);
        // A producer index far ahead: corrupted, reported.
        w.u32_at(PRODUCER).store(1000, Ordering::Relaxed);
        assert!(matches!(
            c.drain(&mut |_| Ok(())),
            Err(RingError::Corrupted { producer: 1000, .. })
        ));
    }

    #[test]
    fn unsealed_memory_is_refused() {
        // SAFETY: memfd_create with a literal name; the result is checked.
        let raw = unsafe { libc::memfd_create(c"unsealed-ring".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a new fd we own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        // SAFETY: ftruncate on our fd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 1 << 16) }, 0);
        let kick = kick_fd().unwrap();
        assert!(matches!(
            RingProducer::attach(fd, kick, 256),
            Err(RingError::UnsafeMemory(_))
        ));
    }

    #[test]
    fn a_kick_fd_that_is_no_eventfd_is_refused() {
        let geo = Geometry::new(8).unwrap();
        let memfd = ring_memfd(geo.bytes()).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            RingProducer::attach(memfd, OwnedFd::from(a), 8),
            Err(RingError::UnsafeMemory(_))
        ));
    }

    #[cfg(feature = "harness")]
    #[test]
    fn fuzz_inputs_do_not_panic() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..200 {
            let data: Vec<u8> = (0..300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            fuzz_ring(&data);
        }
    }
}
