//! A vfio-user conformance suite: named checks, derived from the vfio-user
//! specification (QEMU `docs/interop/vfio-user.rst`) and the VFIO rules it builds on
//! (`linux/vfio.h`), run against **any** vfio-user server over a connected socket.
//!
//! Design:
//! - The suite speaks the wire itself ([`Wire`]: raw headers and payloads through
//!   [`crate::socket`], typed payloads through [`crate::proto`]) rather than through
//!   nestio's [`crate::Client`], which hides what a conformance test must see: it retries
//!   short `argsz`, clears flags it cannot use and never sends malformed messages. Every
//!   reply is checked for the invariants of the header (same message id and command,
//!   the reply type, an error reply carries no payload).
//! - It proposes VERSION 0.2 with a plain capability set (no twin socket, no
//!   `write_multiple`), so the server must answer with a subset of those.
//! - Each check is a function returning a [`Verdict`]: `Pass`, `Fail(reason)`,
//!   `NotApplicable(reason)` (the device lacks what the check needs, e.g. no irq index
//!   with eventfds), or `Restricted(reason)`: the device refused a baseline request with
//!   a documented refusal errno that states a device restriction rather than a protocol
//!   error. The one restriction known today is DMA: a device that cannot translate
//!   addresses (a noiommu kernel VFIO device, whose IOVAs must be physical addresses)
//!   refuses an ordinary `DMA_MAP` with `ENOTSUP`, `EPERM` or `EFAULT`; every DMA check
//!   then reports RESTRICTED with that errno — visibly not a pass.
//! - Checks that fail on the spot also verify that the stream is still in sync (the next
//!   DEVICE_GET_INFO answers the same device). A lost connection fails the check that
//!   lost it and every later one (`connection lost earlier: ...`).
//! - The order is fixed, read-only checks first and the state-changing DEVICE_RESET
//!   last. Region writes are limited to a round trip on the PCI interrupt-line register
//!   (config space 0x3C, a scratch register for software, restored afterwards): the
//!   suite never writes device registers whose meaning it does not know.
//! - A [`Report`] prints one line per check (`PASS`, `FAIL`, `N/A`, `RESTRICTED`, the
//!   check's name, the detail) and a summary line.
//!
//! Use it with `nestio conformance --socket PATH`, or from a test with
//! [`run`] on a `UnixStream` connected to a server, or with [`run_in_process`] against
//! a [`Server`] of this process.

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nestio_device_model::{flags, irq_flags, pci_index, region_flags};

use crate::proto::{
    self, dma_flags, irq_set_flags, Capabilities, Command, DeviceInfoMsg, DmaMap, DmaUnmap, Header,
    IrqInfoMsg, IrqSet, RegionAccess, RegionInfoMsg, RegionInfoReply, TwinSocket, Version,
};
use crate::server::{Server, ServerError};
use crate::socket::{recv_message, send_message, Message};

/// Errors that stop the suite before any check runs.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// The socket could not be set up.
    #[error("cannot prepare the vfio-user socket for the conformance suite: {0}")]
    Socket(#[from] std::io::Error),
    /// [`run_in_process`]: the server's session did not end cleanly.
    #[error("the in-process server's session failed (see the server error): {0}")]
    Server(#[from] ServerError),
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The server behaved as the specification requires.
    Pass(String),
    /// It did not; the reason says what it did.
    Fail(String),
    /// The device lacks what the check needs.
    NotApplicable(String),
    /// The device refused a baseline request with a documented restriction errno (see
    /// the module documentation); the check could not be run as a pass.
    Restricted(String),
}

impl Verdict {
    fn tag(&self) -> &'static str {
        match self {
            Verdict::Pass(_) => "PASS",
            Verdict::Fail(_) => "FAIL",
            Verdict::NotApplicable(_) => "N/A",
            Verdict::Restricted(_) => "RESTRICTED",
        }
    }
    fn detail(&self) -> &str {
        match self {
            Verdict::Pass(s)
            | Verdict::Fail(s)
            | Verdict::NotApplicable(s)
            | Verdict::Restricted(s) => s,
        }
    }
    /// Is this a pass?
    pub fn is_pass(&self) -> bool {
        matches!(self, Verdict::Pass(_))
    }
    /// Is this a failure?
    pub fn is_fail(&self) -> bool {
        matches!(self, Verdict::Fail(_))
    }
}

/// One check's name and verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The check's stable name (e.g. `region.bounds`).
    pub name: &'static str,
    /// What happened.
    pub verdict: Verdict,
}

/// The results of a run, in the order the checks ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// One entry per check.
    pub results: Vec<CheckResult>,
}

impl Report {
    fn count(&self, f: impl Fn(&Verdict) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.verdict)).count()
    }
    /// Checks passed.
    pub fn passed(&self) -> usize {
        self.count(Verdict::is_pass)
    }
    /// Checks failed.
    pub fn failed(&self) -> usize {
        self.count(Verdict::is_fail)
    }
    /// Checks not applicable to this device.
    pub fn not_applicable(&self) -> usize {
        self.count(|v| matches!(v, Verdict::NotApplicable(_)))
    }
    /// Checks reported as restricted by the device.
    pub fn restricted(&self) -> usize {
        self.count(|v| matches!(v, Verdict::Restricted(_)))
    }
    /// The verdict of the check `name`, if it ran.
    pub fn verdict(&self, name: &str) -> Option<&Verdict> {
        self.results
            .iter()
            .find(|r| r.name == name)
            .map(|r| &r.verdict)
    }
    /// Names of the passed checks.
    pub fn passed_names(&self) -> Vec<&'static str> {
        self.results
            .iter()
            .filter(|r| r.verdict.is_pass())
            .map(|r| r.name)
            .collect()
    }
    /// The summary line: `pass N fail M na K restricted R`.
    pub fn summary(&self) -> String {
        format!(
            "pass {} fail {} na {} restricted {}",
            self.passed(),
            self.failed(),
            self.not_applicable(),
            self.restricted()
        )
    }
}

impl fmt::Display for Report {
    /// One line per check, then the summary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.results {
            writeln!(
                f,
                "CONFORMANCE {:<10} {:<22} {}",
                r.verdict.tag(),
                r.name,
                r.verdict.detail()
            )?;
        }
        write!(f, "CONFORMANCE summary: {}", self.summary())
    }
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long any reply may take; a server that sends nothing for this long loses the
    /// connection (every later check fails).
    pub reply_timeout: Duration,
    /// How long to wait for an eventfd the device should signal.
    pub irq_timeout: Duration,
    /// The IOVA where the DMA checks map (two pages and neighbours above it are used).
    pub dma_iova: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            reply_timeout: Duration::from_secs(10),
            irq_timeout: Duration::from_secs(2),
            dma_iova: 0x4000_0000,
        }
    }
}

/// The names of every check, in the order they run.
pub const CHECKS: &[&str] = &[
    "version",
    "version.repeat",
    "device_info",
    "device_info.argsz",
    "region_info",
    "region_info.argsz",
    "region_info.bad_index",
    "region.read",
    "region.write",
    "region.bounds",
    "irq_info",
    "irq_info.bad_index",
    "set_irqs.validation",
    "set_irqs.trigger",
    "set_irqs.mask",
    "dma.map_unmap",
    "dma.overlap",
    "dma.unmap_unmapped",
    "dma.unaligned",
    "dma.fd_count",
    "dma.bad_flags",
    "unknown_command",
    "bad_size",
    "no_reply",
    "device_reset",
];

/// Run every check on `stream`, a fresh connection to a vfio-user server (nothing sent
/// on it yet). The suite negotiates VERSION itself. The connection is closed at the end.
pub fn run(stream: UnixStream, opts: &Options) -> Result<Report, ConformanceError> {
    stream.set_read_timeout(Some(opts.reply_timeout))?;
    stream.set_write_timeout(Some(opts.reply_timeout))?;
    let mut s = Suite {
        wire: Wire {
            sock: stream,
            next_id: 1,
            lost: None,
        },
        opts: opts.clone(),
        info: None,
        caps: Capabilities::default(),
        regions: Vec::new(),
        irqs: Vec::new(),
        report: Report::default(),
    };
    s.run_all();
    let _ = s.wire.sock.shutdown(std::net::Shutdown::Both);
    Ok(s.report)
}

/// [`run`] against `server` in this process: a thread serves one end of a socket pair
/// ([`Server::serve_stream`]) while the suite drives the other. Succeeds only if the
/// server's session also ended cleanly once the suite closed the connection.
pub fn run_in_process(server: &Server, opts: &Options) -> Result<Report, ConformanceError> {
    let (suite_end, server_end) = UnixStream::pair()?;
    std::thread::scope(|scope| {
        let session = scope.spawn(move || server.serve_stream(server_end));
        // `run` closes (or drops) its end on every path, so the session ends.
        let report = run(suite_end, opts);
        let ended = session
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let report = report?;
        ended?;
        Ok(report)
    })
}

// ---------------------------------------------------------------------------------
// The wire

/// A reply: the payload and fds, or the errno of an error reply.
enum Reply {
    Ok(Message),
    Err(i32),
}

/// The raw connection: requests out, replies in, checked against the header rules.
struct Wire {
    sock: UnixStream,
    next_id: u16,
    /// Why the connection can no longer be used.
    lost: Option<String>,
}

/// Largest reply accepted (1 MiB of data plus headers).
const MAX_REPLY: usize = (1 << 20) + 4096;

impl Wire {
    fn id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    fn lose(&mut self, why: String) -> String {
        let msg = format!("connection lost: {why}");
        self.lost.get_or_insert(msg.clone());
        msg
    }

    /// Send a message with an explicit header (size, flags) of our choosing.
    fn send_raw(&mut self, h: &Header, payload: &[u8], fds: &[RawFd]) -> Result<(), String> {
        if let Some(l) = &self.lost {
            return Err(format!("{l} (earlier)"));
        }
        send_message(&self.sock, h, payload, fds).map_err(|e| self.lose(format!("send: {e}")))
    }

    /// Read the reply to (`id`, `cmd`). Commands from the server (it may not send any:
    /// we map memory only by fd and offered no twin socket) are refused with EINVAL.
    fn recv_reply(&mut self, id: u16, cmd: u16) -> Result<Reply, String> {
        loop {
            let m = match recv_message(&self.sock, MAX_REPLY) {
                Ok(Some(m)) => m,
                Ok(None) => return Err(self.lose("the server closed the connection".into())),
                Err(e) => return Err(self.lose(format!("no valid reply: {e}"))),
            };
            let h = m.header;
            if h.flags & proto::hdr_flags::TYPE_MASK == proto::hdr_flags::TYPE_COMMAND {
                let _ = send_message(&self.sock, &h.error_reply(libc::EINVAL), &[], &[]);
                continue;
            }
            if h.msg_id != id || h.cmd != cmd {
                return Err(self.lose(format!(
                    "expected the reply to message {id} (command {cmd}), got one to message {} (command {})",
                    h.msg_id, h.cmd
                )));
            }
            if h.flags & !proto::hdr_flags::KNOWN != 0
                || h.flags & proto::hdr_flags::TYPE_MASK != proto::hdr_flags::TYPE_REPLY
            {
                return Err(self.lose(format!("reply header flags {:#x} are invalid", h.flags)));
            }
            if h.is_error() {
                if !m.payload.is_empty() {
                    return Err(self.lose(format!(
                        "error reply carries {} payload bytes (the spec allows only the header)",
                        m.payload.len()
                    )));
                }
                // The spec allows errno 0 with the error bit; count it as EIO.
                return Ok(Reply::Err(if h.error == 0 {
                    libc::EIO
                } else {
                    h.error as i32
                }));
            }
            return Ok(Reply::Ok(m));
        }
    }

    /// A command with a payload and fds; its reply.
    fn request(&mut self, cmd: u16, payload: &[u8], fds: &[RawFd]) -> Result<Reply, String> {
        let id = self.id();
        let h = Header {
            msg_id: id,
            cmd,
            size: (proto::HEADER_SIZE + payload.len()) as u32,
            flags: proto::hdr_flags::TYPE_COMMAND,
            error: 0,
        };
        self.send_raw(&h, payload, fds)?;
        self.recv_reply(id, cmd)
    }
}

fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EINVAL => "EINVAL",
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::ENOTSUP => "ENOTSUP",
        libc::ENOSYS => "ENOSYS",
        libc::EPERM => "EPERM",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EIO => "EIO",
        libc::ENOTTY => "ENOTTY",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::E2BIG => "E2BIG",
        libc::ENOSPC => "ENOSPC",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

/// A check's failure, or early exit with another verdict.
type Step<T> = Result<T, Verdict>;

fn fail<T>(why: impl Into<String>) -> Step<T> {
    Err(Verdict::Fail(why.into()))
}

/// A reply's `flags` must set no bit outside `known`; a failure says `unknown` and the
/// unknown bits.
fn only_known_flags(unknown: &str, flags: u32, known: u32) -> Step<()> {
    match flags & !known {
        0 => Ok(()),
        bits => fail(format!("{unknown} {bits:#x}")),
    }
}

/// A request payload: what `encode` appends to an empty buffer (every message type's
/// `encode_into` takes the buffer it appends to).
fn encoded(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = Vec::new();
    encode(&mut b);
    b
}

// ---------------------------------------------------------------------------------
// Local resources: eventfds, memfds

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a negative return is an error.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wait up to `t` for `fd` to be signalled; consume and return its counter (0: not
/// signalled in time).
fn wait_eventfd(fd: &OwnedFd, t: Duration) -> u64 {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(t.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n <= 0 {
        return 0;
    }
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into `v`; the fd is non-blocking.
    let r = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if r == 8 {
        v
    } else {
        0
    }
}

/// A sealed (no shrinking) memfd of `len` bytes: what a VMM maps for DMA.
fn dma_memfd(len: u64) -> std::io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated name; a negative return is an error.
    let fd = unsafe {
        libc::memfd_create(
            c"nestio-conformance".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len =
        libc::off_t::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain fd calls on our own fd.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), len) != 0
            || libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}

// ---------------------------------------------------------------------------------
// The suite

#[derive(Debug, Clone, Copy)]
struct DevInfo {
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
}

#[derive(Debug, Clone, Copy)]
struct Region {
    index: u32,
    flags: u32,
    size: u64,
}

#[derive(Debug, Clone, Copy)]
struct Irq {
    index: u32,
    flags: u32,
    count: u32,
}

/// Known device flag bits (`VFIO_DEVICE_FLAGS_*`) and the bus-type bits among them.
const DEVICE_FLAGS_KNOWN: u32 = flags::RESET
    | flags::PCI
    | flags::PLATFORM
    | flags::AMBA
    | flags::CCW
    | flags::AP
    | flags::FSL_MC
    | flags::CAPS
    | flags::CDX;
const DEVICE_BUS_FLAGS: u32 = flags::PCI
    | flags::PLATFORM
    | flags::AMBA
    | flags::CCW
    | flags::AP
    | flags::FSL_MC
    | flags::CDX;
const REGION_FLAGS_KNOWN: u32 =
    region_flags::READ | region_flags::WRITE | region_flags::MMAP | region_flags::CAPS;
const IRQ_FLAGS_KNOWN: u32 =
    irq_flags::EVENTFD | irq_flags::MASKABLE | irq_flags::AUTOMASKED | irq_flags::NORESIZE;
/// A command number no vfio-user version assigns.
const UNKNOWN_COMMAND: u16 = 0x7ff0;
/// Refusals of a baseline DMA_MAP that state a device restriction (module docs).
const DMA_RESTRICTION_ERRNOS: &[i32] = &[libc::ENOTSUP, libc::EPERM, libc::EFAULT];

struct Suite {
    wire: Wire,
    opts: Options,
    info: Option<DevInfo>,
    caps: Capabilities,
    regions: Vec<Region>,
    irqs: Vec<Irq>,
    report: Report,
}

impl Suite {
    fn record(&mut self, name: &'static str, v: Step<Verdict>) {
        let verdict = v.unwrap_or_else(|e| e);
        match &verdict {
            Verdict::Fail(why) => tracing::warn!(check = name, %why, "conformance check failed"),
            v => tracing::debug!(check = name, verdict = ?v, "conformance check"),
        }
        self.report.results.push(CheckResult { name, verdict });
    }

    fn run_all(&mut self) {
        let v = self.version();
        let negotiated = v.as_ref().is_ok_and(|v| v.is_pass());
        self.record("version", v);
        if !negotiated {
            for &name in &CHECKS[1..] {
                self.record(
                    name,
                    Ok(Verdict::Fail("not run: VERSION negotiation failed".into())),
                );
            }
            return;
        }
        let v = self.version_repeat();
        self.record("version.repeat", v);
        let v = self.device_info();
        self.record("device_info", v);
        let v = self.device_info_argsz();
        self.record("device_info.argsz", v);
        let v = self.region_info();
        self.record("region_info", v);
        let v = self.region_info_argsz();
        self.record("region_info.argsz", v);
        let v = self.region_info_bad_index();
        self.record("region_info.bad_index", v);
        let v = self.region_read();
        self.record("region.read", v);
        let v = self.region_write();
        self.record("region.write", v);
        let v = self.region_bounds();
        self.record("region.bounds", v);
        let v = self.irq_info();
        self.record("irq_info", v);
        let v = self.irq_info_bad_index();
        self.record("irq_info.bad_index", v);
        let v = self.set_irqs_validation();
        self.record("set_irqs.validation", v);
        let v = self.set_irqs_trigger();
        self.record("set_irqs.trigger", v);
        let v = self.set_irqs_mask();
        self.record("set_irqs.mask", v);
        self.dma_checks();
        let v = self.unknown_command();
        self.record("unknown_command", v);
        let v = self.bad_size();
        self.record("bad_size", v);
        let v = self.no_reply();
        self.record("no_reply", v);
        // State-changing checks last.
        let v = self.device_reset();
        self.record("device_reset", v);
        debug_assert_eq!(
            self.report
                .results
                .iter()
                .map(|r| r.name)
                .collect::<Vec<_>>(),
            CHECKS
        );
    }

    // -- helpers -------------------------------------------------------------------

    fn request(&mut self, cmd: Command, payload: &[u8], fds: &[RawFd]) -> Step<Reply> {
        self.wire
            .request(cmd as u16, payload, fds)
            .map_err(Verdict::Fail)
    }

    /// Expect a successful reply.
    fn ok(&mut self, what: &str, cmd: Command, payload: &[u8], fds: &[RawFd]) -> Step<Message> {
        match self.request(cmd, payload, fds)? {
            Reply::Ok(m) => Ok(m),
            Reply::Err(e) => fail(format!("{what}: error reply {}", errno_name(e))),
        }
    }

    /// Expect an error reply whose errno is one of `want`, then check the stream is
    /// still in sync. Returns the errno.
    fn refused(
        &mut self,
        what: &str,
        cmd: u16,
        payload: &[u8],
        fds: &[RawFd],
        want: &[i32],
    ) -> Step<i32> {
        match self
            .wire
            .request(cmd, payload, fds)
            .map_err(Verdict::Fail)?
        {
            Reply::Ok(_) => fail(format!("{what}: accepted (must be refused)")),
            Reply::Err(e) if !want.is_empty() && !want.contains(&e) => {
                let names: Vec<String> = want.iter().map(|&w| errno_name(w)).collect();
                fail(format!(
                    "{what}: refused with {} (expected {})",
                    errno_name(e),
                    names.join(" or ")
                ))
            }
            Reply::Err(e) => {
                self.in_sync(what)?;
                Ok(e)
            }
        }
    }

    /// [`Self::refused`] expecting EINVAL.
    fn einval(&mut self, what: &str, cmd: Command, payload: &[u8], fds: &[RawFd]) -> Step<i32> {
        self.refused(what, cmd as u16, payload, fds, &[libc::EINVAL])
    }

    /// One request without fds that must be refused with EINVAL; passes as
    /// "`passed` refused with ERRNO".
    fn einval_check(
        &mut self,
        what: &str,
        cmd: Command,
        payload: &[u8],
        passed: &str,
    ) -> Step<Verdict> {
        let e = self.einval(what, cmd, payload, &[])?;
        Ok(Verdict::Pass(format!(
            "{passed} refused with {}",
            errno_name(e)
        )))
    }

    /// Each `(what, payload)` of `cases` sent as `cmd` with `fds` must be refused with
    /// EINVAL (the stream staying in sync). Returns how many were.
    fn all_einval(
        &mut self,
        cmd: Command,
        fds: &[RawFd],
        cases: Vec<(&str, Vec<u8>)>,
    ) -> Step<usize> {
        let n = cases.len();
        for (what, payload) in cases {
            self.einval(what, cmd, &payload, fds)?;
        }
        Ok(n)
    }

    /// A DEVICE_GET_INFO request payload with `argsz`.
    fn device_info_request(argsz: u32) -> Vec<u8> {
        encoded(|b| {
            DeviceInfoMsg {
                argsz,
                flags: 0,
                num_regions: 0,
                num_irqs: 0,
            }
            .encode_into(b)
        })
    }

    fn get_info(&mut self, argsz: u32) -> Step<Reply> {
        self.request(
            Command::DeviceGetInfo,
            &Self::device_info_request(argsz),
            &[],
        )
    }

    /// After an error: the next DEVICE_GET_INFO must answer the same device.
    fn in_sync(&mut self, after: &str) -> Step<()> {
        let m = match self.get_info(DeviceInfoMsg::SIZE as u32)? {
            Reply::Ok(m) => m,
            Reply::Err(e) => {
                return fail(format!(
                    "after {after}: DEVICE_GET_INFO failed with {} (stream out of sync?)",
                    errno_name(e)
                ))
            }
        };
        let d = DeviceInfoMsg::decode(&m.payload).map_err(|e| {
            Verdict::Fail(format!(
                "after {after}: DEVICE_GET_INFO reply malformed ({e}): stream out of sync"
            ))
        })?;
        if let Some(i) = self.info {
            if (d.flags, d.num_regions, d.num_irqs) != (i.flags, i.num_regions, i.num_irqs) {
                return fail(format!(
                    "after {after}: DEVICE_GET_INFO answers a different device: stream out of sync"
                ));
            }
        }
        Ok(())
    }

    fn need_info(&self) -> Step<DevInfo> {
        self.info.ok_or_else(|| {
            Verdict::Fail("not run: DEVICE_GET_INFO did not give the device's shape".into())
        })
    }

    /// A PCI device with its config space region (index 7).
    fn is_pci(&self) -> bool {
        self.info
            .is_some_and(|i| i.flags & flags::PCI != 0 && i.num_regions > pci_index::CONFIG)
    }

    fn region_access(offset: u64, region: u32, count: u32, data: &[u8]) -> Vec<u8> {
        encoded(|b| {
            RegionAccess {
                offset,
                region,
                count,
                data,
            }
            .encode_into(b)
        })
    }

    /// REGION_READ that must succeed; returns the data after checking the echo.
    fn read(&mut self, region: u32, offset: u64, count: u32) -> Step<Vec<u8>> {
        let what = format!("REGION_READ region {region} {offset:#x}+{count}");
        let b = Self::region_access(offset, region, count, &[]);
        let m = self.ok(&what, Command::RegionRead, &b, &[])?;
        let r = RegionAccess::decode(&m.payload, true)
            .map_err(|e| Verdict::Fail(format!("{what}: malformed reply: {e}")))?;
        if (r.offset, r.region, r.count) != (offset, region, count) {
            return fail(format!(
                "{what}: reply describes {:#x}+{} of region {}",
                r.offset, r.count, r.region
            ));
        }
        Ok(r.data.to_vec())
    }

    /// REGION_WRITE that must succeed (echo checked).
    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Step<()> {
        let what = format!("REGION_WRITE region {region} {offset:#x}+{}", data.len());
        let b = Self::region_access(offset, region, data.len() as u32, data);
        let m = self.ok(&what, Command::RegionWrite, &b, &[])?;
        let r = RegionAccess::decode(&m.payload, false)
            .map_err(|e| Verdict::Fail(format!("{what}: malformed reply: {e}")))?;
        if (r.offset, r.region, r.count as usize) != (offset, region, data.len()) {
            return fail(format!(
                "{what}: reply describes {:#x}+{} of region {}",
                r.offset, r.count, r.region
            ));
        }
        Ok(())
    }

    fn irq_set(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
        encoded(|b| {
            IrqSet {
                flags,
                index,
                start,
                count,
                data,
            }
            .encode_into(b)
        })
    }

    // -- VERSION ---------------------------------------------------------------------

    fn version(&mut self) -> Step<Verdict> {
        let offer = Version {
            major: proto::VERSION_MAJOR,
            minor: proto::VERSION_MINOR,
            caps: Capabilities {
                max_msg_fds: 8,
                max_data_xfer_size: proto::DEFAULT_MAX_DATA_XFER,
                twin_socket: Some(TwinSocket {
                    supported: false,
                    fd_index: None,
                }),
                write_multiple: false,
                ..Capabilities::default()
            },
        };
        let b = encoded(|b| offer.encode_into(b));
        let m = self.ok("VERSION", Command::Version, &b, &[])?;
        if !m.fds.is_empty() {
            return fail(format!(
                "VERSION reply carries {} fds though we offered no twin socket",
                m.fds.len()
            ));
        }
        if m.payload.last() != Some(&0) {
            return fail("VERSION reply's JSON is not NUL-terminated");
        }
        let v = Version::decode(&m.payload)
            .map_err(|e| Verdict::Fail(format!("VERSION reply malformed: {e}")))?;
        if v.major != proto::VERSION_MAJOR {
            return fail(format!(
                "major {} differs from the proposed {}",
                v.major,
                proto::VERSION_MAJOR
            ));
        }
        if v.minor > proto::VERSION_MINOR {
            return fail(format!(
                "minor {} exceeds the proposed {}",
                v.minor,
                proto::VERSION_MINOR
            ));
        }
        let c = &v.caps;
        if c.max_msg_fds == 0 {
            return fail("max_msg_fds 0: no message could carry an fd");
        }
        if c.pgsizes & 0xfff != 0 {
            return fail(format!("pgsizes {:#x} names a page below 4 KiB", c.pgsizes));
        }
        if c.twin_supported() {
            return fail("twin_socket enabled though we did not offer it (not a subset)");
        }
        if c.write_multiple {
            return fail("write_multiple enabled though we did not offer it (not a subset)");
        }
        let detail = format!(
            "{}.{}, max_msg_fds {}, max_data_xfer_size {}, pgsizes {:#x}, max_dma_maps {}",
            v.major, v.minor, c.max_msg_fds, c.max_data_xfer_size, c.pgsizes, c.max_dma_maps
        );
        self.caps = v.caps;
        Ok(Verdict::Pass(detail))
    }

    fn version_repeat(&mut self) -> Step<Verdict> {
        let b = encoded(|b| {
            Version {
                major: proto::VERSION_MAJOR,
                minor: proto::VERSION_MINOR,
                caps: Capabilities::default(),
            }
            .encode_into(b)
        });
        match self
            .wire
            .request(Command::Version as u16, &b, &[])
            .map_err(Verdict::Fail)?
        {
            Reply::Err(e) => {
                self.in_sync("a second VERSION")?;
                Ok(Verdict::Pass(format!("refused with {}", errno_name(e))))
            }
            // The spec defines VERSION as the first message only; answering a second one
            // with a valid VERSION reply is a re-negotiation, not a protocol error.
            Reply::Ok(m) => match Version::decode(&m.payload) {
                Ok(_) => {
                    self.in_sync("a second VERSION")?;
                    Ok(Verdict::NotApplicable(
                        "a second VERSION is answered as a re-negotiation (the spec defines only the first)".into(),
                    ))
                }
                Err(e) => fail(format!("a second VERSION got a malformed reply: {e}")),
            },
        }
    }

    // -- DEVICE_GET_INFO -------------------------------------------------------------

    fn device_info(&mut self) -> Step<Verdict> {
        let m = match self.get_info(DeviceInfoMsg::SIZE as u32)? {
            Reply::Ok(m) => m,
            Reply::Err(e) => return fail(format!("error reply {}", errno_name(e))),
        };
        if !m.fds.is_empty() {
            return fail("reply carries fds");
        }
        let d = DeviceInfoMsg::decode(&m.payload)
            .map_err(|e| Verdict::Fail(format!("reply malformed: {e}")))?;
        if (d.argsz as usize) < DeviceInfoMsg::SIZE {
            return fail(format!("reply argsz {} below the 16-byte reply", d.argsz));
        }
        only_known_flags("unknown device flag bits", d.flags, DEVICE_FLAGS_KNOWN)?;
        if (d.flags & DEVICE_BUS_FLAGS).count_ones() > 1 {
            return fail(format!("flags {:#x} name more than one bus type", d.flags));
        }
        if d.num_regions > 4096 || d.num_irqs > 4096 {
            return fail(format!(
                "implausible counts: {} regions, {} irq indices",
                d.num_regions, d.num_irqs
            ));
        }
        // The shape is usable by the later checks even if the PCI rule below fails.
        self.info = Some(DevInfo {
            flags: d.flags,
            num_regions: d.num_regions,
            num_irqs: d.num_irqs,
        });
        if d.flags & flags::PCI != 0 && d.num_regions <= pci_index::CONFIG {
            // QEMU's vfio-user-pci reads config space through region 7.
            return fail(format!(
                "a PCI device with {} regions has no config space region (index 7)",
                d.num_regions
            ));
        }
        Ok(Verdict::Pass(format!(
            "flags {:#x}, {} regions, {} irq indices",
            d.flags, d.num_regions, d.num_irqs
        )))
    }

    fn device_info_argsz(&mut self) -> Step<Verdict> {
        self.need_info()?;
        let b = Self::device_info_request(8);
        self.einval_check(
            "DEVICE_GET_INFO with argsz 8",
            Command::DeviceGetInfo,
            &b,
            "argsz 8",
        )
    }

    // -- DEVICE_GET_REGION_INFO ------------------------------------------------------

    fn region_info_request(index: u32, argsz: u32) -> Vec<u8> {
        encoded(|b| {
            RegionInfoMsg {
                argsz,
                index,
                ..RegionInfoMsg::default()
            }
            .encode_into(b)
        })
    }

    /// One region's info, checked: fixed part first with argsz 32, then (if the server
    /// needs more room) again with the size it asked for.
    /// `shape` gets the region's flags and size as soon as the fixed part is read, so
    /// later checks can use a region whose capability chain (say) is broken.
    fn one_region(&mut self, index: u32, shape: &mut Option<Region>) -> Step<Region> {
        let what = format!("region {index}");
        let b = Self::region_info_request(index, RegionInfoMsg::SIZE as u32);
        let m = self.ok(&what, Command::DeviceGetRegionInfo, &b, &[])?;
        let head = m
            .payload
            .get(..RegionInfoMsg::SIZE)
            .ok_or_else(|| Verdict::Fail(format!("{what}: reply of {} bytes", m.payload.len())))?;
        let fixed = RegionInfoMsg::decode(head)
            .map_err(|e| Verdict::Fail(format!("{what}: malformed reply: {e}")))?;
        if (fixed.argsz as usize) < RegionInfoMsg::SIZE {
            return fail(format!("{what}: reply argsz {} below 32", fixed.argsz));
        }
        if fixed.index != index {
            return fail(format!("{what}: reply names index {}", fixed.index));
        }
        *shape = Some(Region {
            index,
            flags: fixed.flags,
            size: fixed.size,
        });
        if m.payload.len() > RegionInfoMsg::SIZE {
            return fail(format!(
                "{what}: {} bytes returned with argsz 32 (more than the client accepts)",
                m.payload.len()
            ));
        }
        let full = if fixed.argsz as usize > RegionInfoMsg::SIZE {
            if fixed.argsz > 1 << 20 {
                return fail(format!("{what}: argsz {} over 1 MiB", fixed.argsz));
            }
            let b = Self::region_info_request(index, fixed.argsz);
            let m2 = self.ok(&what, Command::DeviceGetRegionInfo, &b, &[])?;
            if m2.payload.len() > fixed.argsz as usize {
                return fail(format!(
                    "{what}: {} bytes returned with argsz {}",
                    m2.payload.len(),
                    fixed.argsz
                ));
            }
            m2
        } else {
            m
        };
        let r = RegionInfoReply::decode(&full.payload)
            .map_err(|e| Verdict::Fail(format!("{what}: capability chain malformed: {e}")))?;
        let i = r.info;
        only_known_flags(
            &format!("{what}: unknown flag bits"),
            i.flags,
            REGION_FLAGS_KNOWN,
        )?;
        let has_caps = i.cap_offset != 0;
        if has_caps != (i.flags & region_flags::CAPS != 0) {
            return fail(format!(
                "{what}: CAPS flag {} but cap_offset {}",
                i.flags & region_flags::CAPS != 0,
                i.cap_offset
            ));
        }
        if has_caps && i.cap_offset as usize >= full.payload.len() {
            return fail(format!(
                "{what}: cap_offset {} outside the {}-byte reply",
                i.cap_offset,
                full.payload.len()
            ));
        }
        for &(o, s) in &r.sparse {
            if o.checked_add(s).is_none_or(|e| e > i.size) {
                return fail(format!(
                    "{what}: sparse area {o:#x}+{s:#x} outside the region ({:#x} bytes)",
                    i.size
                ));
            }
        }
        if i.flags & region_flags::MMAP != 0 && full.fds.is_empty() {
            return fail(format!("{what}: MMAP flag set but no file descriptor sent"));
        }
        if i.flags & region_flags::MMAP == 0 && !full.fds.is_empty() {
            return fail(format!(
                "{what}: a file descriptor sent without the MMAP flag"
            ));
        }
        if i.size == 0 && i.flags & (region_flags::READ | region_flags::WRITE) != 0 {
            // vfio-pci reports absent regions as size 0, flags 0.
            return fail(format!("{what}: size 0 but readable or writable"));
        }
        Ok(Region {
            index,
            flags: i.flags,
            size: i.size,
        })
    }

    fn region_info(&mut self) -> Step<Verdict> {
        let info = self.need_info()?;
        let mut regions = Vec::new();
        let mut first_failure = None;
        for index in 0..info.num_regions {
            let mut shape = None;
            if let Err(v) = self.one_region(index, &mut shape) {
                first_failure.get_or_insert(v);
            }
            regions.extend(shape);
            if self.wire.lost.is_some() {
                break;
            }
        }
        // Later checks use what could be read, even past a failing region.
        self.regions = regions.clone();
        if let Some(v) = first_failure {
            return Err(v);
        }
        if self.is_pci() {
            let cfg = regions[pci_index::CONFIG as usize];
            if cfg.size < 256
                || cfg.flags & (region_flags::READ | region_flags::WRITE)
                    != region_flags::READ | region_flags::WRITE
            {
                return fail(format!(
                    "PCI config region: size {:#x} flags {:#x} (want >= 256 bytes, read/write)",
                    cfg.size, cfg.flags
                ));
            }
        }
        let present = regions.iter().filter(|r| r.size > 0).count();
        let mmap = regions
            .iter()
            .filter(|r| r.flags & region_flags::MMAP != 0)
            .count();
        Ok(Verdict::Pass(format!(
            "{} regions ({present} present, {mmap} mmappable)",
            self.regions.len()
        )))
    }

    fn region_info_argsz(&mut self) -> Step<Verdict> {
        self.need_info()?;
        let b = Self::region_info_request(0, 16);
        self.einval_check(
            "DEVICE_GET_REGION_INFO with argsz 16",
            Command::DeviceGetRegionInfo,
            &b,
            "argsz 16",
        )
    }

    fn region_info_bad_index(&mut self) -> Step<Verdict> {
        let info = self.need_info()?;
        let b = Self::region_info_request(info.num_regions, RegionInfoMsg::SIZE as u32);
        self.einval_check(
            "DEVICE_GET_REGION_INFO of index num_regions",
            Command::DeviceGetRegionInfo,
            &b,
            &format!("index {}", info.num_regions),
        )
    }

    // -- REGION_READ / REGION_WRITE --------------------------------------------------

    fn readable(&self) -> Vec<Region> {
        self.regions
            .iter()
            .filter(|r| r.size > 0 && r.flags & region_flags::READ != 0)
            .copied()
            .collect()
    }

    fn region_read(&mut self) -> Step<Verdict> {
        self.need_info()?;
        let regions = self.readable();
        if regions.is_empty() {
            return Ok(Verdict::NotApplicable("no readable region".into()));
        }
        for r in &regions {
            let n = r.size.min(4) as u32;
            let first = self.read(r.index, 0, n)?;
            if first.len() != n as usize {
                return fail(format!("region {}: {} bytes for {n}", r.index, first.len()));
            }
            // The last bytes of the region: the end is inclusive.
            self.read(r.index, r.size - n as u64, n)?;
        }
        if self.is_pci() {
            let a = self.read(pci_index::CONFIG, 0, 4)?;
            let b = self.read(pci_index::CONFIG, 0, 4)?;
            if a != b {
                return fail(format!(
                    "PCI vendor/device id reads differ: {a:02x?} then {b:02x?}"
                ));
            }
        }
        Ok(Verdict::Pass(format!(
            "first and last bytes of {} readable regions",
            regions.len()
        )))
    }

    fn region_write(&mut self) -> Step<Verdict> {
        self.need_info()?;
        if !self.is_pci() {
            return Ok(Verdict::NotApplicable(
                "the suite writes only the PCI interrupt-line register; not a PCI device".into(),
            ));
        }
        const LINE: u64 = 0x3c;
        let old = self.read(pci_index::CONFIG, LINE, 1)?[0];
        let probe = if old == 0x0a { 0x05 } else { 0x0a };
        self.write(pci_index::CONFIG, LINE, &[probe])?;
        let back = self.read(pci_index::CONFIG, LINE, 1)?[0];
        self.write(pci_index::CONFIG, LINE, &[old])?;
        let restored = self.read(pci_index::CONFIG, LINE, 1)?[0];
        if back != probe || restored != old {
            return fail(format!(
                "interrupt line: wrote {probe:#x}, read {back:#x}; restored {old:#x}, read {restored:#x}"
            ));
        }
        Ok(Verdict::Pass(format!(
            "config 0x3c round trip ({old:#x} -> {probe:#x} -> {old:#x})"
        )))
    }

    fn region_bounds(&mut self) -> Step<Verdict> {
        let info = self.need_info()?;
        let regions = self.readable();
        let Some(r) = regions.first().copied() else {
            return Ok(Verdict::NotApplicable("no readable region".into()));
        };
        let rd = Command::RegionRead;
        let wr = Command::RegionWrite;
        let size = r.size;
        let cases: Vec<(String, Command, Vec<u8>)> = vec![
            (
                format!("read at the end of region {}", r.index),
                rd,
                Self::region_access(size, r.index, 4, &[]),
            ),
            (
                format!("read straddling the end of region {}", r.index),
                rd,
                Self::region_access(size.saturating_sub(2), r.index, 4, &[]),
            ),
            (
                format!("read far past region {}", r.index),
                rd,
                Self::region_access(size.saturating_add(1 << 32), r.index, 4, &[]),
            ),
            (
                "read whose offset + count overflows".to_string(),
                rd,
                Self::region_access(u64::MAX - 1, r.index, 4, &[]),
            ),
            (
                format!("write at the end of region {}", r.index),
                wr,
                Self::region_access(size, r.index, 4, &[0; 4]),
            ),
            (
                format!("read of region index {}", info.num_regions),
                rd,
                Self::region_access(0, info.num_regions, 4, &[]),
            ),
        ];
        let n = cases.len();
        for (what, cmd, payload) in cases {
            self.einval(&what, cmd, &payload, &[])?;
        }
        Ok(Verdict::Pass(format!(
            "{n} out-of-bounds accesses refused with EINVAL, stream in sync"
        )))
    }

    // -- DEVICE_GET_IRQ_INFO ---------------------------------------------------------

    fn irq_info_request(index: u32, argsz: u32) -> Vec<u8> {
        encoded(|b| {
            IrqInfoMsg {
                argsz,
                flags: 0,
                index,
                count: 0,
            }
            .encode_into(b)
        })
    }

    fn irq_info(&mut self) -> Step<Verdict> {
        let info = self.need_info()?;
        let mut irqs = Vec::new();
        for index in 0..info.num_irqs {
            let what = format!("irq index {index}");
            let b = Self::irq_info_request(index, IrqInfoMsg::SIZE as u32);
            let m = self.ok(&what, Command::DeviceGetIrqInfo, &b, &[])?;
            let q = IrqInfoMsg::decode(&m.payload)
                .map_err(|e| Verdict::Fail(format!("{what}: malformed reply: {e}")))?;
            if q.index != index {
                return fail(format!("{what}: reply names index {}", q.index));
            }
            if (q.argsz as usize) < IrqInfoMsg::SIZE {
                return fail(format!("{what}: reply argsz {}", q.argsz));
            }
            only_known_flags(
                &format!("{what}: unknown flag bits"),
                q.flags,
                IRQ_FLAGS_KNOWN,
            )?;
            if info.flags & flags::PCI != 0 && index == pci_index::INTX_IRQ && q.count > 1 {
                return fail(format!("PCI INTx with {} vectors", q.count));
            }
            irqs.push(Irq {
                index,
                flags: q.flags,
                count: q.count,
            });
        }
        let vectors: u64 = irqs.iter().map(|q| q.count as u64).sum();
        self.irqs = irqs;
        let b = Self::irq_info_request(0, 8);
        if info.num_irqs > 0 {
            self.einval(
                "DEVICE_GET_IRQ_INFO with argsz 8",
                Command::DeviceGetIrqInfo,
                &b,
                &[],
            )?;
        }
        Ok(Verdict::Pass(format!(
            "{} indices, {vectors} vectors; argsz 8 refused",
            self.irqs.len()
        )))
    }

    fn irq_info_bad_index(&mut self) -> Step<Verdict> {
        let info = self.need_info()?;
        let b = Self::irq_info_request(info.num_irqs, IrqInfoMsg::SIZE as u32);
        self.einval_check(
            "DEVICE_GET_IRQ_INFO of index num_irqs",
            Command::DeviceGetIrqInfo,
            &b,
            &format!("index {}", info.num_irqs),
        )
    }

    // -- DEVICE_SET_IRQS -------------------------------------------------------------

    /// The first irq index with eventfd support and at least one vector.
    fn eventfd_irq(&self) -> Option<Irq> {
        self.irqs
            .iter()
            .find(|q| q.count > 0 && q.flags & irq_flags::EVENTFD != 0)
            .copied()
    }

    fn set_irqs_validation(&mut self) -> Step<Verdict> {
        let info = self.need_info()?;
        let cmd = Command::DeviceSetIrqs;
        let trig_none = irq_set_flags::DATA_NONE | irq_set_flags::ACTION_TRIGGER;
        let mut n = self.all_einval(
            cmd,
            &[],
            vec![
                (
                    "SET_IRQS of index num_irqs",
                    Self::irq_set(trig_none, info.num_irqs, 0, 1, &[]),
                ),
                (
                    "SET_IRQS with two data types",
                    Self::irq_set(
                        irq_set_flags::DATA_NONE
                            | irq_set_flags::DATA_BOOL
                            | irq_set_flags::ACTION_TRIGGER,
                        0,
                        0,
                        1,
                        &[1],
                    ),
                ),
                (
                    "SET_IRQS with an unknown flag bit",
                    Self::irq_set(trig_none | (1 << 12), 0, 0, 1, &[]),
                ),
                (
                    "SET_IRQS with count 0 and start 1",
                    Self::irq_set(trig_none, 0, 1, 0, &[]),
                ),
            ],
        )?;
        let Some(q) = self.irqs.iter().find(|q| q.count > 0).copied() else {
            return Ok(Verdict::Pass(format!(
                "{n} malformed requests refused with EINVAL (no index with vectors for the rest)"
            )));
        };
        n += self.all_einval(
            cmd,
            &[],
            vec![
                (
                    "SET_IRQS past the index's vectors",
                    Self::irq_set(trig_none, q.index, q.count, 1, &[]),
                ),
                (
                    "SET_IRQS whose start + count overflows",
                    Self::irq_set(trig_none, q.index, u32::MAX, 2, &[]),
                ),
            ],
        )?;
        if q.flags & irq_flags::EVENTFD != 0 {
            let (a, b) = (eventfd().map_err(io_fail)?, eventfd().map_err(io_fail)?);
            n += self.all_einval(
                cmd,
                &[a.as_raw_fd(), b.as_raw_fd()],
                vec![(
                    "SET_IRQS with 2 eventfds for 1 vector",
                    Self::irq_set(
                        irq_set_flags::DATA_EVENTFD | irq_set_flags::ACTION_TRIGGER,
                        q.index,
                        0,
                        1,
                        &[],
                    ),
                )],
            )?;
        }
        Ok(Verdict::Pass(format!(
            "{n} malformed requests refused with EINVAL, stream in sync"
        )))
    }

    fn set_irqs_trigger(&mut self) -> Step<Verdict> {
        self.need_info()?;
        let Some(q) = self.eventfd_irq() else {
            return Ok(Verdict::NotApplicable(
                "no irq index with eventfd support and vectors".into(),
            ));
        };
        let r = self.trigger_on(q);
        // Whatever happened, take the eventfd away again (count 0: the whole index).
        let off = Self::irq_set(
            irq_set_flags::DATA_NONE | irq_set_flags::ACTION_TRIGGER,
            q.index,
            0,
            0,
            &[],
        );
        let cleanup = self.ok(
            "SET_IRQS disabling the index (count 0)",
            Command::DeviceSetIrqs,
            &off,
            &[],
        );
        let v = r?;
        cleanup?;
        Ok(v)
    }

    /// SET_IRQS with `flags` on vector 0 of index `q` (one vector), which must succeed.
    fn set_vector0(
        &mut self,
        what: &str,
        flags: u32,
        q: Irq,
        data: &[u8],
        fds: &[RawFd],
    ) -> Step<()> {
        let b = Self::irq_set(flags, q.index, 0, 1, data);
        self.ok(what, Command::DeviceSetIrqs, &b, fds).map(drop)
    }

    fn trigger_on(&mut self, q: Irq) -> Step<Verdict> {
        let efd = eventfd().map_err(io_fail)?;
        let t = self.opts.irq_timeout;
        self.set_vector0(
            &format!("SET_IRQS trigger eventfd on index {}", q.index),
            irq_set_flags::DATA_EVENTFD | irq_set_flags::ACTION_TRIGGER,
            q,
            &[],
            &[efd.as_raw_fd()],
        )?;
        // A loopback trigger (DATA_NONE, or DATA_BOOL with 1 | ACTION_TRIGGER) makes the
        // device raise it.
        use irq_set_flags::{DATA_BOOL, DATA_NONE};
        for (what, kind, data_type, data) in [
            ("SET_IRQS loopback trigger", "DATA_NONE", DATA_NONE, &[][..]),
            (
                "SET_IRQS DATA_BOOL trigger",
                "DATA_BOOL",
                DATA_BOOL,
                &[1][..],
            ),
        ] {
            let flags = data_type | irq_set_flags::ACTION_TRIGGER;
            self.set_vector0(what, flags, q, data, &[])?;
            if wait_eventfd(&efd, t) == 0 {
                return fail(format!(
                    "index {}: the eventfd was not signalled within {t:?} of a {kind} trigger",
                    q.index
                ));
            }
            if q.flags & irq_flags::AUTOMASKED != 0 {
                // It masked itself when it fired: unmask before the next trigger.
                let unmask = irq_set_flags::DATA_NONE | irq_set_flags::ACTION_UNMASK;
                self.set_vector0("SET_IRQS unmask", unmask, q, &[], &[])?;
                wait_eventfd(&efd, Duration::from_millis(50));
            }
        }
        Ok(Verdict::Pass(format!(
            "index {}: eventfd signalled by DATA_NONE and DATA_BOOL triggers",
            q.index
        )))
    }

    fn set_irqs_mask(&mut self) -> Step<Verdict> {
        self.need_info()?;
        let Some(q) = self
            .irqs
            .iter()
            .find(|q| {
                q.count > 0
                    && q.flags & irq_flags::MASKABLE != 0
                    && q.flags & irq_flags::EVENTFD != 0
            })
            .copied()
        else {
            return Ok(Verdict::NotApplicable("no maskable irq index".into()));
        };
        let efd = eventfd().map_err(io_fail)?;
        self.set_vector0(
            "SET_IRQS trigger eventfd",
            irq_set_flags::DATA_EVENTFD | irq_set_flags::ACTION_TRIGGER,
            q,
            &[],
            &[efd.as_raw_fd()],
        )?;
        let r = (|| {
            use irq_set_flags::{ACTION_MASK, ACTION_UNMASK, DATA_BOOL, DATA_NONE};
            for (flags, data, what) in [
                (DATA_NONE | ACTION_MASK, &[][..], "mask (DATA_NONE)"),
                (DATA_NONE | ACTION_UNMASK, &[][..], "unmask (DATA_NONE)"),
                (DATA_BOOL | ACTION_MASK, &[1][..], "mask (DATA_BOOL)"),
                (DATA_BOOL | ACTION_UNMASK, &[1][..], "unmask (DATA_BOOL)"),
            ] {
                self.set_vector0(&format!("SET_IRQS {what}"), flags, q, data, &[])?;
            }
            // Mask past the index's vectors.
            let b = Self::irq_set(
                irq_set_flags::DATA_NONE | irq_set_flags::ACTION_MASK,
                q.index,
                q.count,
                1,
                &[],
            );
            self.einval(
                "SET_IRQS mask past the vectors",
                Command::DeviceSetIrqs,
                &b,
                &[],
            )?;
            Ok(Verdict::Pass(format!(
                "index {}: mask/unmask with DATA_NONE and DATA_BOOL accepted, out of range refused",
                q.index
            )))
        })();
        let off = Self::irq_set(
            irq_set_flags::DATA_NONE | irq_set_flags::ACTION_TRIGGER,
            q.index,
            0,
            0,
            &[],
        );
        let cleanup = self.ok("SET_IRQS disable", Command::DeviceSetIrqs, &off, &[]);
        let v = r?;
        cleanup?;
        Ok(v)
    }

    // -- DMA_MAP / DMA_UNMAP ---------------------------------------------------------

    fn dma_map_payload(flags: u32, offset: u64, addr: u64, size: u64) -> Vec<u8> {
        encoded(|b| {
            DmaMap {
                flags,
                offset,
                addr,
                size,
            }
            .encode_into(b)
        })
    }

    fn dma_unmap_payload(addr: u64, size: u64) -> Vec<u8> {
        Self::dma_unmap_flags_payload(0, addr, size)
    }

    fn dma_unmap_flags_payload(flags: u32, addr: u64, size: u64) -> Vec<u8> {
        encoded(|b| {
            DmaUnmap {
                argsz: DmaUnmap::SIZE as u32,
                flags,
                addr,
                size,
            }
            .encode_into(b)
        })
    }

    fn unmap(&mut self, addr: u64, size: u64) -> Step<()> {
        let what = format!("DMA_UNMAP {addr:#x}+{size:#x}");
        let m = self.ok(
            &what,
            Command::DmaUnmap,
            &Self::dma_unmap_payload(addr, size),
            &[],
        )?;
        // The reply echoes the entry (spec); a header-only reply is tolerated by
        // clients but the spec asks for the entry.
        let u = DmaUnmap::decode(&m.payload)
            .map_err(|e| Verdict::Fail(format!("{what}: reply is not the entry: {e}")))?;
        if (u.addr, u.size) != (addr, size) {
            return fail(format!("{what}: reply echoes {:#x}+{:#x}", u.addr, u.size));
        }
        Ok(())
    }

    fn dma_checks(&mut self) {
        // The DMA checks' names, in order: those of CHECKS under `dma.`.
        let names = || CHECKS.iter().copied().filter(|n| n.starts_with("dma."));
        let page = 4096u64;
        let len = 4 * page;
        let fd = match dma_memfd(len) {
            Ok(fd) => fd,
            Err(e) => {
                for n in names() {
                    self.record(n, Ok(Verdict::Fail(format!("cannot create a memfd: {e}"))));
                }
                return;
            }
        };
        let iova = self.opts.dma_iova;
        let rw = dma_flags::READ | dma_flags::WRITE;
        // The baseline map decides whether the device restricts DMA.
        let base = Self::dma_map_payload(rw, 0, iova, 2 * page);
        let first = self
            .wire
            .request(Command::DmaMap as u16, &base, &[fd.as_raw_fd()])
            .map_err(Verdict::Fail);
        match first {
            Ok(Reply::Err(e)) if DMA_RESTRICTION_ERRNOS.contains(&e) => {
                let why = format!(
                    "the device refuses an ordinary DMA_MAP with {} (a device restriction, e.g. no IOMMU: IOVA must be physical)",
                    errno_name(e)
                );
                for n in names() {
                    self.record(n, Ok(Verdict::Restricted(why.clone())));
                }
                return;
            }
            Ok(Reply::Err(e)) => {
                let why = format!(
                    "not run: DMA_MAP of {iova:#x}+{:#x} by fd failed with {}",
                    2 * page,
                    errno_name(e)
                );
                self.record(
                    "dma.map_unmap",
                    Ok(Verdict::Fail(format!(
                        "DMA_MAP of {iova:#x}+{:#x} by fd refused with {}",
                        2 * page,
                        errno_name(e)
                    ))),
                );
                for n in names().skip(1) {
                    self.record(n, Ok(Verdict::Fail(why.clone())));
                }
                return;
            }
            Err(v) => {
                for n in names() {
                    self.record(n, Ok(v.clone()));
                }
                return;
            }
            Ok(Reply::Ok(m)) if !m.payload.is_empty() => {
                self.record(
                    "dma.map_unmap",
                    Ok(Verdict::Fail(format!(
                        "DMA_MAP reply carries {} payload bytes (the spec's reply has none)",
                        m.payload.len()
                    ))),
                );
            }
            Ok(Reply::Ok(_)) => {
                // Mapped: the mapping stays for the overlap check, then is removed.
                let v = self.map_unmap_rest(&fd, iova, page);
                self.record("dma.map_unmap", v);
            }
        }
        let v = self.dma_overlap(&fd, iova, page);
        self.record("dma.overlap", v);
        let v = self.dma_unmap_unmapped(iova, page);
        self.record("dma.unmap_unmapped", v);
        let v = self.dma_unaligned(&fd, iova, page);
        self.record("dma.unaligned", v);
        let v = self.dma_fd_count(&fd, iova, page);
        self.record("dma.fd_count", v);
        let v = self.dma_bad_flags(&fd, iova, page);
        self.record("dma.bad_flags", v);
        // Leave nothing mapped (DMA_UNMAP with the ALL flag).
        let b = Self::dma_unmap_flags_payload(dma_flags::UNMAP_ALL, 0, 0);
        if let Err(Verdict::Fail(why)) = self.ok("DMA_UNMAP all", Command::DmaUnmap, &b, &[]) {
            if let Some(r) = self
                .report
                .results
                .iter_mut()
                .find(|r| r.name == "dma.map_unmap" && r.verdict.is_pass())
            {
                r.verdict = Verdict::Fail(why);
            }
        }
    }

    /// With `iova`+2 pages mapped: unmap it exactly, map again (the mapping the next
    /// checks overlap with).
    fn map_unmap_rest(&mut self, fd: &OwnedFd, iova: u64, page: u64) -> Step<Verdict> {
        self.unmap(iova, 2 * page)?;
        let base = Self::dma_map_payload(dma_flags::READ | dma_flags::WRITE, 0, iova, 2 * page);
        self.ok(
            "DMA_MAP again after its unmap",
            Command::DmaMap,
            &base,
            &[fd.as_raw_fd()],
        )?;
        // A read-only map of another page, and its unmap.
        let ro = Self::dma_map_payload(dma_flags::READ, 2 * page, iova + 4 * page, page);
        self.ok("DMA_MAP read-only", Command::DmaMap, &ro, &[fd.as_raw_fd()])?;
        self.unmap(iova + 4 * page, page)?;
        Ok(Verdict::Pass(
            "map by fd, exact unmap (entry echoed), map again, read-only map".into(),
        ))
    }

    fn dma_overlap(&mut self, fd: &OwnedFd, iova: u64, page: u64) -> Step<Verdict> {
        let rw = dma_flags::READ | dma_flags::WRITE;
        for (addr, what) in [
            (iova + page, "starting inside"),
            (iova - page, "covering the start of"),
            (iova, "identical to"),
        ] {
            let b = Self::dma_map_payload(rw, 0, addr, 2 * page);
            self.refused(
                &format!("DMA_MAP {what} an existing mapping"),
                Command::DmaMap as u16,
                &b,
                &[fd.as_raw_fd()],
                &[libc::EEXIST],
            )?;
        }
        Ok(Verdict::Pass(
            "3 overlapping maps refused with EEXIST".into(),
        ))
    }

    fn dma_unmap_unmapped(&mut self, iova: u64, page: u64) -> Step<Verdict> {
        // The spec requires an exact match and names no errno: ENOENT (libvfio-user,
        // nestio) and EINVAL (vfio type1's checks) are both refusals clients handle.
        let want = [libc::ENOENT, libc::EINVAL];
        let e1 = self.refused(
            "DMA_UNMAP of a range never mapped",
            Command::DmaUnmap as u16,
            &Self::dma_unmap_payload(iova + 64 * page, page),
            &[],
            &want,
        )?;
        let e2 = self.refused(
            "DMA_UNMAP of a range larger than the mapping",
            Command::DmaUnmap as u16,
            &Self::dma_unmap_payload(iova, 3 * page),
            &[],
            &want,
        )?;
        Ok(Verdict::Pass(format!(
            "unmapped range refused with {}, inexact range with {}",
            errno_name(e1),
            errno_name(e2)
        )))
    }

    fn dma_unaligned(&mut self, fd: &OwnedFd, iova: u64, page: u64) -> Step<Verdict> {
        let addr = iova + 16 * page + 0x10;
        let b = Self::dma_map_payload(dma_flags::READ | dma_flags::WRITE, 0, addr, page);
        match self
            .wire
            .request(Command::DmaMap as u16, &b, &[fd.as_raw_fd()])
            .map_err(Verdict::Fail)?
        {
            Reply::Err(libc::EINVAL) => {
                self.in_sync("an unaligned DMA_MAP")?;
                Ok(Verdict::Pass(format!(
                    "map at {addr:#x} (not aligned to {:#x}) refused with EINVAL",
                    self.caps.pgsizes
                )))
            }
            Reply::Err(e) => fail(format!(
                "unaligned DMA_MAP refused with {} (expected EINVAL)",
                errno_name(e)
            )),
            Reply::Ok(_) => {
                self.unmap(addr, page)?;
                Ok(Verdict::NotApplicable(format!(
                    "the server accepts a map at {addr:#x}, not aligned to its pgsizes {:#x} (the spec names no alignment rule); unmapped exactly",
                    self.caps.pgsizes
                )))
            }
        }
    }

    fn dma_fd_count(&mut self, fd: &OwnedFd, iova: u64, page: u64) -> Step<Verdict> {
        let b = Self::dma_map_payload(
            dma_flags::READ | dma_flags::WRITE,
            0,
            iova + 32 * page,
            page,
        );
        let e = self.einval(
            "DMA_MAP with two fds",
            Command::DmaMap,
            &b,
            &[fd.as_raw_fd(), fd.as_raw_fd()],
        )?;
        self.refused(
            "DMA_UNMAP carrying an fd",
            Command::DmaUnmap as u16,
            &Self::dma_unmap_payload(iova + 32 * page, page),
            &[fd.as_raw_fd()],
            &[libc::EINVAL, libc::ENOENT],
        )?;
        Ok(Verdict::Pass(format!(
            "DMA_MAP with 2 fds refused with {}, DMA_UNMAP with an fd refused",
            errno_name(e)
        )))
    }

    fn dma_bad_flags(&mut self, fd: &OwnedFd, iova: u64, page: u64) -> Step<Verdict> {
        let rw = dma_flags::READ | dma_flags::WRITE;
        self.all_einval(
            Command::DmaMap,
            &[fd.as_raw_fd()],
            vec![
                (
                    "DMA_MAP with an unknown flag bit",
                    Self::dma_map_payload(rw | (1 << 8), 0, iova + 48 * page, page),
                ),
                (
                    "DMA_MAP of size 0",
                    Self::dma_map_payload(rw, 0, iova + 48 * page, 0),
                ),
                (
                    "DMA_MAP whose address + size wraps",
                    Self::dma_map_payload(rw, 0, u64::MAX - page + 1, 2 * page),
                ),
            ],
        )?;
        Ok(Verdict::Pass(
            "unknown flag, size 0 and wrapping range refused with EINVAL".into(),
        ))
    }

    // -- framing ---------------------------------------------------------------------

    fn unknown_command(&mut self) -> Step<Verdict> {
        self.need_info()?;
        let e1 = self.refused(
            "an unknown command",
            UNKNOWN_COMMAND,
            &[1, 2, 3, 4, 5, 6, 7, 8],
            &[],
            &[],
        )?;
        let e2 = self.refused("command 14 (unassigned)", 14, &[0; 8], &[], &[])?;
        Ok(Verdict::Pass(format!(
            "command {UNKNOWN_COMMAND:#x} refused with {}, command 14 with {}; in sync",
            errno_name(e1),
            errno_name(e2)
        )))
    }

    fn bad_size(&mut self) -> Step<Verdict> {
        self.need_info()?;
        let cases: [(&str, u16, Vec<u8>); 4] = [
            (
                "DEVICE_GET_INFO with a 12-byte payload",
                Command::DeviceGetInfo as u16,
                vec![16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                "DEVICE_GET_INFO with 8 trailing bytes",
                Command::DeviceGetInfo as u16,
                {
                    let mut b = Self::device_info_request(16);
                    b.extend_from_slice(&[0; 8]);
                    b
                },
            ),
            (
                "REGION_READ with a 10-byte payload",
                Command::RegionRead as u16,
                vec![0; 10],
            ),
            (
                "REGION_WRITE whose count exceeds its data",
                Command::RegionWrite as u16,
                Self::region_access(0, pci_index::CONFIG, 64, &[0; 4]),
            ),
        ];
        let n = cases.len();
        for (what, cmd, payload) in cases {
            self.refused(what, cmd, &payload, &[], &[])?;
        }
        Ok(Verdict::Pass(format!(
            "{n} messages with wrong payload sizes refused; in sync"
        )))
    }

    fn no_reply(&mut self) -> Step<Verdict> {
        self.need_info()?;
        let id = self.wire.id();
        let b = Self::device_info_request(16);
        let h = Header {
            msg_id: id,
            cmd: Command::DeviceGetInfo as u16,
            size: (proto::HEADER_SIZE + b.len()) as u32,
            flags: proto::hdr_flags::TYPE_COMMAND | proto::hdr_flags::NO_REPLY,
            error: 0,
        };
        self.wire.send_raw(&h, &b, &[]).map_err(Verdict::Fail)?;
        // The next reply must be to the next request, not to the no-reply one.
        self.in_sync("a command sent with NO_REPLY")?;
        Ok(Verdict::Pass(
            "a NO_REPLY command got no reply; the next request got its own".into(),
        ))
    }

    // -- state-changing checks -------------------------------------------------------

    fn device_reset(&mut self) -> Step<Verdict> {
        let info = self.need_info()?;
        if info.flags & flags::RESET == 0 {
            let e = self.refused(
                "DEVICE_RESET of a device without the RESET flag",
                Command::DeviceReset as u16,
                &[],
                &[],
                &[],
            )?;
            return Ok(Verdict::Pass(format!(
                "no RESET flag: DEVICE_RESET refused with {}",
                errno_name(e)
            )));
        }
        let id_before = if self.is_pci() {
            Some(self.read(pci_index::CONFIG, 0, 4)?)
        } else {
            None
        };
        let m = self.ok("DEVICE_RESET", Command::DeviceReset, &[], &[])?;
        if !m.payload.is_empty() {
            return fail(format!(
                "DEVICE_RESET reply carries {} bytes",
                m.payload.len()
            ));
        }
        self.in_sync("DEVICE_RESET")?;
        if let Some(before) = id_before {
            let after = self.read(pci_index::CONFIG, 0, 4)?;
            if before != after {
                return fail(format!(
                    "PCI id changed by reset: {before:02x?} -> {after:02x?}"
                ));
            }
        }
        Ok(Verdict::Pass(
            "reset accepted; the device answers as before".into(),
        ))
    }
}

fn io_fail(e: std::io::Error) -> Verdict {
    Verdict::Fail(format!("local resource: {e}"))
}
