//! Eventfds handed to the device by its peer (SET_IRQS trigger fds), checked and
//! signalled so that no peer can hang the device.
//!
//! A peer (a vfio-user client, a VMM, a child level) chooses the fds the device writes to
//! when it raises an interrupt. Taken on trust, any fd would do: a pipe or a socket whose
//! buffer the peer never drains, a blocking eventfd whose counter the peer left at
//! 2^64-2, `/dev/null` (interrupts silently vanish). A blocking `write(2)` on such an fd
//! never returns, and the thread that raised the interrupt — a server thread, the RX
//! worker — never serves anyone again.
//!
//! [`PeerEventFd::from_peer`] is the one way such an fd enters the device:
//! - it must be an eventfd: an anonymous inode (`fstat` shows no file type) whose
//!   `/proc/self/fd` link reads `anon_inode:[eventfd]`; anything else is refused with
//!   [`EventFdError::NotEventfd`] (EINVAL), naming what the fd is;
//! - it is made non-blocking (`O_NONBLOCK` on the open file description). That flag is
//!   shared with the peer, which is harmless for a well-behaved one: KVM irqfds ignore
//!   it and VMMs (QEMU, Cloud Hypervisor, nestio) create their interrupt eventfds
//!   non-blocking anyway. An eventfd cannot be reopened privately (`/proc/self/fd/N` of an
//!   anonymous inode gives ENXIO) and `pwritev2(RWF_NOWAIT)` is not supported on eventfds
//!   (EOPNOTSUPP), so the shared flag is the per-write guarantee available.
//!
//! [`PeerEventFd::signal`] adds 1 to the counter. A full counter (EAGAIN) is a dropped
//! interrupt: counted ([`PeerEventFd::dropped`]) and logged, never a wait. The caller
//! signals outside its own locks (see `irq.rs`).
//!
//! The peer can clear `O_NONBLOCK` again at any moment (it shares the flag), so the
//! write itself is guarded too: for the duration of the write the thread is registered
//! with a watchdog and has [`guard_signal`] unblocked (it is blocked at every other
//! time). A write still in progress after [`STALL_LIMIT`] — the peer made the fd blocking
//! and filled the counter — is interrupted by that signal (its handler does nothing and
//! is installed without `SA_RESTART`, so the write returns EINTR). The fd is then marked
//! stalled: its interrupts are dropped from then on without writing, so a hostile peer
//! costs one raise at most [`STALL_LIMIT`], once. A signal that arrives after the write
//! finished stays pending (blocked) and is consumed harmlessly at the next guarded write.
//!
//! Some peer eventfds are read rather than written: the INTx *unmask* eventfd (SET_IRQS
//! ACTION_UNMASK | DATA_EVENTFD), which the peer — typically KVM, through a resampling
//! irqfd — signals when the guest acknowledges the line. [`EventFdWatch`] gives such an
//! fd a small thread that polls it and, when readable, consumes the counter with
//! [`PeerEventFd::consume`]: the same guarded call, so a peer that makes the fd blocking
//! and drains it between the poll and the read costs one read [`STALL_LIMIT`] and the fd
//! is ignored from then on. The thread runs the device's callback (unmask) outside every
//! lock of this module.

use parking_lot::Mutex;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::time::{Duration, Instant};

/// How long a write to a peer's eventfd may take before the watchdog interrupts it.
pub const STALL_LIMIT: Duration = Duration::from_millis(50);

/// The signal the watchdog uses to interrupt a stalled write (`SIGRTMIN + 6`; nestio's
/// VMM kicks vCPUs with `SIGRTMIN + 2`).
pub fn guard_signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

/// Why a peer's fd was refused as an interrupt eventfd.
#[derive(Debug, thiserror::Error)]
pub enum EventFdError {
    /// The fd is not an eventfd.
    #[error("fd {fd} is {kind}, not an eventfd: an interrupt fd must be created with eventfd(2)")]
    NotEventfd {
        /// The fd number (in this process).
        fd: i32,
        /// What it is, for the message.
        kind: String,
    },
    /// No thread could be started to watch the fd.
    #[error("cannot watch eventfd {fd}: {source} (out of threads or fds?)")]
    Watch {
        /// The fd number.
        fd: i32,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The fd could not be inspected or made non-blocking.
    #[error("cannot check interrupt fd {fd}: {source} (is /proc mounted?)")]
    Inspect {
        /// The fd number.
        fd: i32,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

/// What [`PeerEventFd::signal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The counter was incremented.
    Delivered,
    /// The counter is full (the peer does not consume it): the interrupt was dropped and
    /// counted.
    Dropped,
    /// The write failed otherwise (logged).
    Failed,
}

/// A checked, non-blocking eventfd received from the device's peer. See the module
/// documentation.
#[derive(Debug)]
pub struct PeerEventFd {
    fd: OwnedFd,
    dropped: AtomicU64,
    /// A write stalled: the peer made the fd blocking with a full counter.
    stalled: AtomicBool,
}

fn io_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// A short description of what `fd` is, from its `fstat` type and `/proc` link.
fn describe(mode: libc::mode_t, link: &str) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFIFO => "a pipe",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFLNK => "a symbolic link",
        0 => "an anonymous inode",
        _ => "an unknown file type",
    };
    format!("{kind} ({link})")
}

fn get_flags(fd: BorrowedFd<'_>) -> std::io::Result<libc::c_int> {
    // SAFETY: F_GETFL on a valid fd takes no pointer.
    let f = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if f < 0 {
        Err(io_err())
    } else {
        Ok(f)
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>, flags: libc::c_int) -> std::io::Result<()> {
    // SAFETY: F_SETFL on a valid fd with an integer argument takes no pointer.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        Err(io_err())
    } else {
        Ok(())
    }
}

impl PeerEventFd {
    /// Accept `fd` from a peer as an interrupt eventfd: refuse anything that is not an
    /// eventfd, and make it non-blocking.
    pub fn from_peer(fd: OwnedFd) -> Result<PeerEventFd, EventFdError> {
        let raw = fd.as_raw_fd();
        let inspect = |source| EventFdError::Inspect { fd: raw, source };
        // SAFETY: an all-zero `stat` is a valid value of a plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one `stat` into the local we own.
        if unsafe { libc::fstat(raw, &mut st) } < 0 {
            return Err(inspect(io_err()));
        }
        let link = std::fs::read_link(format!("/proc/self/fd/{raw}"))
            .map_err(inspect)?
            .to_string_lossy()
            .into_owned();
        if st.st_mode & libc::S_IFMT != 0 || link != "anon_inode:[eventfd]" {
            return Err(EventFdError::NotEventfd {
                fd: raw,
                kind: describe(st.st_mode, &link),
            });
        }
        let flags = get_flags(fd.as_fd()).map_err(inspect)?;
        if flags & libc::O_NONBLOCK == 0 {
            set_nonblocking(fd.as_fd(), flags).map_err(inspect)?;
        }
        Ok(PeerEventFd {
            fd,
            dropped: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
        })
    }

    /// Add 1 to the counter without ever blocking for long. See the module
    /// documentation.
    pub fn signal(&self) -> Signal {
        if self.stalled.load(Ordering::Relaxed) {
            return self.drop_one();
        }
        let one = 1u64.to_ne_bytes();
        match guarded_write(self.fd.as_fd(), &one) {
            Ok(8) => Signal::Delivered,
            Ok(n) => {
                tracing::warn!(written = n, "short write to an interrupt eventfd");
                Signal::Failed
            }
            Err(WriteError::Stalled) => {
                self.stalled.store(true, Ordering::Relaxed);
                tracing::warn!(
                    fd = self.fd.as_raw_fd(),
                    "the peer made its interrupt eventfd blocking with a full counter; its interrupts are dropped from now on"
                );
                self.drop_one()
            }
            Err(WriteError::Io(e)) if e.raw_os_error() == Some(libc::EAGAIN) => self.drop_one(),
            Err(WriteError::Io(e)) => {
                tracing::warn!(error = %e, "cannot signal an interrupt eventfd");
                Signal::Failed
            }
        }
    }

    /// True once a write stalled (the peer's fd is ignored from then on).
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    fn drop_one(&self) -> Signal {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // Log the first drop and then every power of two: a peer that never reads its
        // eventfd cannot flood the log.
        if n.is_power_of_two() {
            tracing::warn!(
                dropped = n,
                "interrupt eventfd counter is full (the peer does not consume it): interrupt dropped"
            );
        }
        Signal::Dropped
    }

    /// Interrupts dropped because the counter was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl AsFd for PeerEventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for PeerEventFd {
    fn as_raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// What [`PeerEventFd::consume`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumed {
    /// The counter held this many signals; it is now 0.
    Signals(u64),
    /// The counter was 0 (the peer consumed it first, or a spurious wake-up).
    Empty,
    /// The read stalled (the peer made the fd blocking and keeps the counter at 0), or
    /// failed: the fd is ignored from now on.
    Stalled,
}

impl PeerEventFd {
    /// Read and reset the counter, never blocking for long (the same watchdog as
    /// [`PeerEventFd::signal`]: a peer that clears `O_NONBLOCK` and drains the counter
    /// first costs one read [`STALL_LIMIT`], once).
    pub fn consume(&self) -> Consumed {
        if self.stalled() {
            return Consumed::Stalled;
        }
        let mut buf = [0u8; 8];
        match guarded_read(self.fd.as_fd(), &mut buf) {
            Ok(8) => Consumed::Signals(u64::from_ne_bytes(buf)),
            Ok(n) => {
                tracing::warn!(read = n, "short read from a peer's eventfd; ignoring it");
                self.stalled.store(true, Ordering::Relaxed);
                Consumed::Stalled
            }
            Err(WriteError::Io(e)) if e.raw_os_error() == Some(libc::EAGAIN) => Consumed::Empty,
            Err(WriteError::Stalled) => {
                self.stalled.store(true, Ordering::Relaxed);
                tracing::warn!(
                    fd = self.fd.as_raw_fd(),
                    "the peer made its eventfd blocking and drained it; it is ignored from now on"
                );
                Consumed::Stalled
            }
            Err(WriteError::Io(e)) => {
                self.stalled.store(true, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot read a peer's eventfd; ignoring it");
                Consumed::Stalled
            }
        }
    }
}

/// A thread that waits for a peer's eventfd to be signalled and runs a callback each
/// time (the INTx unmask eventfd: see `irq.rs`).
///
/// The thread polls the eventfd and a private stop socket; when the eventfd is readable
/// it consumes the counter ([`PeerEventFd::consume`], guarded by the watchdog) and calls
/// `on_signal` once, however many signals had accumulated (an unmask is idempotent). A
/// stalled or broken fd ends the thread (logged). Dropping the watch stops the thread
/// and waits for it, so the fd is closed when `drop` returns — except when the last
/// reference is dropped by the callback's own thread, which then ends on its own. Drop
/// it outside any lock the callback takes.
pub struct EventFdWatch {
    fd: Arc<PeerEventFd>,
    stop: std::os::unix::net::UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for EventFdWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFdWatch")
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

impl EventFdWatch {
    /// Start watching `fd` on a new thread named `name`.
    pub fn spawn(
        name: &str,
        fd: Arc<PeerEventFd>,
        on_signal: impl Fn() + Send + 'static,
    ) -> Result<EventFdWatch, EventFdError> {
        let raw = fd.as_raw_fd();
        let watch_err = |source| EventFdError::Watch { fd: raw, source };
        let (stop, theirs) = std::os::unix::net::UnixStream::pair().map_err(watch_err)?;
        let watched = fd.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || watch_loop(&watched, &theirs, on_signal))
            .map_err(watch_err)?;
        Ok(EventFdWatch {
            fd,
            stop,
            thread: Some(thread),
        })
    }

    /// The watched eventfd.
    pub fn fd(&self) -> &Arc<PeerEventFd> {
        &self.fd
    }
}

impl Drop for EventFdWatch {
    fn drop(&mut self) {
        // Closing our end wakes the thread (POLLHUP on its end).
        let _ = self.stop.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

fn watch_loop(fd: &PeerEventFd, stop: &std::os::unix::net::UnixStream, on_signal: impl Fn()) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two valid fds (both owned for the thread's life) described by a
        // local array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io_err().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::warn!(error = %io_err(), "cannot poll a peer's eventfd; no longer watching it");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let r = fds[0].revents;
        if r & (libc::POLLERR | libc::POLLNVAL) != 0 {
            tracing::warn!(
                revents = r,
                "a peer's eventfd reports an error; no longer watching it"
            );
            return;
        }
        if r & libc::POLLIN != 0 {
            match fd.consume() {
                Consumed::Signals(_) => on_signal(),
                Consumed::Empty => {}
                Consumed::Stalled => return,
            }
        }
    }
}

/// A write that was interrupted or failed.
#[derive(Debug)]
enum WriteError {
    /// The watchdog interrupted it after [`STALL_LIMIT`].
    Stalled,
    /// The system error.
    Io(std::io::Error),
}

/// A thread that writes peer eventfds, as the watchdog sees it.
struct Writer {
    thread: libc::pthread_t,
    /// Nanoseconds since [`epoch`] (+1) when the current write began; 0 = not writing.
    since: AtomicU64,
    /// The watchdog interrupted the current write.
    kicked: AtomicBool,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn writers() -> &'static Mutex<Vec<Arc<Writer>>> {
    static WRITERS: Mutex<Vec<Arc<Writer>>> = Mutex::new(Vec::new());
    &WRITERS
}

/// This thread's registration; removed from the watchdog's list when the thread exits.
struct Registration(Arc<Writer>);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut w = writers().lock();
        w.retain(|x| !Arc::ptr_eq(x, &self.0));
    }
}

thread_local! {
    static ME: Registration = {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        let me = Arc::new(Writer {
            thread,
            since: AtomicU64::new(0),
            kicked: AtomicBool::new(false),
        });
        writers().lock().push(me.clone());
        Registration(me)
    };
}

extern "C" fn on_guard_signal(_: libc::c_int) {}

fn sigset(sig: libc::c_int) -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is valid storage; sigemptyset / sigaddset initialise
    // and fill it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        set
    }
}

fn set_mask(how: libc::c_int, sig: libc::c_int) {
    let set = sigset(sig);
    // SAFETY: pthread_sigmask reads a valid sigset_t; the old mask is not requested.
    unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
}

/// Install the no-op handler (no SA_RESTART) and start the watchdog, once per process.
fn start_guard() {
    static START: Once = Once::new();
    START.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid starting value; the handler is an
        // `extern "C" fn(c_int)` that does nothing (async-signal-safe), and sa_flags
        // leaves out SA_RESTART so an interrupted write returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_guard_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            if libc::sigaction(guard_signal(), &sa, std::ptr::null_mut()) != 0 {
                tracing::error!(error = %io_err(), "cannot install the interrupt-write guard handler");
            }
        }
        let spawned = std::thread::Builder::new()
            .name("nestio-irq-guard".into())
            .spawn(|| {
                // The watchdog itself never receives the signal.
                set_mask(libc::SIG_BLOCK, guard_signal());
                loop {
                    std::thread::sleep(STALL_LIMIT / 4);
                    let now = epoch().elapsed().as_nanos() as u64 + 1;
                    let limit = STALL_LIMIT.as_nanos() as u64;
                    for w in writers().lock().iter() {
                        let since = w.since.load(Ordering::SeqCst);
                        if since != 0 && now.saturating_sub(since) > limit {
                            w.kicked.store(true, Ordering::SeqCst);
                            // SAFETY: the thread is registered, so alive (it deregisters
                            // under this lock when it exits); the signal is handled by a
                            // no-op handler and blocked outside guarded writes.
                            unsafe { libc::pthread_kill(w.thread, guard_signal()) };
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the interrupt-write watchdog");
        }
    });
}

/// `write(2)` to a peer's fd, interrupted by the watchdog after [`STALL_LIMIT`].
fn guarded_write(fd: BorrowedFd<'_>, data: &[u8]) -> Result<usize, WriteError> {
    // SAFETY: writes `data.len()` bytes from a live slice to a valid fd.
    guarded(|| unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) })
}

/// `read(2)` from a peer's fd, interrupted by the watchdog after [`STALL_LIMIT`].
fn guarded_read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, WriteError> {
    // SAFETY: reads at most `buf.len()` bytes into a live, exclusively borrowed slice.
    guarded(|| unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// Run one system call `op` on a peer's fd with this thread registered with the
/// watchdog and the guard signal unblocked, so that it is interrupted after
/// [`STALL_LIMIT`].
fn guarded(mut op: impl FnMut() -> isize) -> Result<usize, WriteError> {
    start_guard();
    let sig = guard_signal();
    ME.with(|me| {
        let w = &me.0;
        w.kicked.store(false, Ordering::SeqCst);
        loop {
            w.since
                .store(epoch().elapsed().as_nanos() as u64 + 1, Ordering::SeqCst);
            set_mask(libc::SIG_UNBLOCK, sig);
            let r = op();
            let e = io_err();
            set_mask(libc::SIG_BLOCK, sig);
            w.since.store(0, Ordering::SeqCst);
            if r >= 0 {
                return Ok(r as usize);
            }
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(WriteError::Io(e));
            }
            if w.kicked.swap(false, Ordering::SeqCst) {
                return Err(WriteError::Stalled);
            }
            // Another signal interrupted the call: try again.
        }
    })
}

/// Eventfds for the crate's unit tests: one the test owns, and its counter.
#[cfg(test)]
pub(crate) mod test_fds {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A fresh non-blocking eventfd.
    pub(crate) fn eventfd() -> OwnedFd {
        // SAFETY: eventfd returns a new fd or -1; we check and take ownership.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh, valid descriptor owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// Read and reset `fd`'s counter (0 when not signalled).
    pub(crate) fn count(fd: &OwnedFd) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local u64.
        let r = unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        if r == 8 {
            v
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn owned(raw: i32) -> OwnedFd {
        assert!(raw >= 0, "{}", io_err());
        // SAFETY: a fresh fd owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(raw) }
    }

    #[test]
    fn refuses_what_is_not_an_eventfd_and_names_it() {
        let mut p = [0; 2];
        // SAFETY: pipe writes two fds into the local array.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        let (r, w) = (owned(p[0]), owned(p[1]));
        let e = PeerEventFd::from_peer(w).unwrap_err();
        assert!(e.to_string().contains("a pipe"), "{e}");
        drop(r);
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let e = PeerEventFd::from_peer(null).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        // SAFETY: timerfd_create takes no pointers.
        let t = owned(unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, 0) });
        let e = PeerEventFd::from_peer(t).unwrap_err();
        assert!(e.to_string().contains("timerfd"), "{e}");
    }

    #[test]
    fn full_counter_is_dropped_and_counted_and_a_reblocked_fd_stalls_once() {
        // SAFETY: eventfd takes no pointers.
        let raw = owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) });
        let peer = raw.try_clone().unwrap();
        let ev = PeerEventFd::from_peer(raw).unwrap();
        assert_ne!(get_flags(peer.as_fd()).unwrap() & libc::O_NONBLOCK, 0);
        assert_eq!(ev.signal(), Signal::Delivered);
        // The counter is 1; the peer fills it to 2^64-2: raises are counted drops.
        let v: u64 = u64::MAX - 2;
        // SAFETY: writes 8 bytes from a local u64.
        let n = unsafe { libc::write(peer.as_raw_fd(), (&v as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(ev.signal(), Signal::Dropped);
        assert!(!ev.stalled());
        // The peer makes the fd blocking again: the next write would wait forever; the
        // watchdog interrupts it, and the fd is ignored from then on.
        // SAFETY: F_SETFL with an integer argument.
        let blocking = unsafe { libc::fcntl(peer.as_raw_fd(), libc::F_SETFL, 0) };
        assert_eq!(blocking, 0);
        let t = Instant::now();
        assert_eq!(ev.signal(), Signal::Dropped);
        assert!(ev.stalled());
        assert!(t.elapsed() >= STALL_LIMIT, "{:?}", t.elapsed());
        let t = Instant::now();
        assert_eq!(ev.signal(), Signal::Dropped);
        assert!(
            t.elapsed() < STALL_LIMIT,
            "a stalled fd is not written again"
        );
        assert_eq!(ev.dropped(), 3);
        // The thread keeps working: a good eventfd is still signalled.
        // SAFETY: eventfd takes no pointers.
        let good = PeerEventFd::from_peer(owned(unsafe { libc::eventfd(0, 0) })).unwrap();
        assert_eq!(good.signal(), Signal::Delivered);
    }

    fn write_u64(fd: &OwnedFd, v: u64) {
        // SAFETY: writes 8 bytes from a local u64.
        let n = unsafe { libc::write(fd.as_raw_fd(), (&v as *const u64).cast(), 8) };
        assert_eq!(n, 8);
    }

    fn make_blocking(fd: &OwnedFd) {
        // SAFETY: F_SETFL with an integer argument.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, 0) };
        assert_eq!(r, 0);
    }

    #[test]
    fn consume_reads_the_counter_and_a_reblocked_drained_fd_stalls_once() {
        // SAFETY: eventfd takes no pointers.
        let raw = owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) });
        let peer = raw.try_clone().unwrap();
        let ev = PeerEventFd::from_peer(raw).unwrap();
        assert_eq!(ev.consume(), Consumed::Empty);
        let three = 3u64;
        write_u64(&peer, three);
        assert_eq!(ev.consume(), Consumed::Signals(3));
        assert_eq!(ev.consume(), Consumed::Empty);
        // The peer makes it blocking with the counter at 0: the read would wait forever;
        // the watchdog interrupts it and the fd is ignored from then on.
        make_blocking(&peer);
        let t = Instant::now();
        assert_eq!(ev.consume(), Consumed::Stalled);
        assert!(t.elapsed() >= STALL_LIMIT, "{:?}", t.elapsed());
        assert!(ev.stalled());
        let t = Instant::now();
        assert_eq!(ev.consume(), Consumed::Stalled);
        assert!(t.elapsed() < STALL_LIMIT);
    }

    #[test]
    fn a_watch_calls_back_per_signal_batch_and_stops_on_drop() {
        use std::sync::atomic::AtomicU32;
        // SAFETY: eventfd takes no pointers.
        let raw = owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) });
        let peer = raw.try_clone().unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let w = EventFdWatch::spawn(
            "test-watch",
            Arc::new(PeerEventFd::from_peer(raw).unwrap()),
            move || {
                c.fetch_add(1, Ordering::SeqCst);
            },
        )
        .unwrap();
        for i in 1..=3u32 {
            let one = 1u64;
            write_u64(&peer, one);
            let t = Instant::now();
            while calls.load(Ordering::SeqCst) < i {
                assert!(t.elapsed() < Duration::from_secs(5), "no callback {i}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        drop(w);
        let one = 1u64;
        write_u64(&peer, one);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "a dropped watch still called back"
        );
    }
}
