//! The XIVE as this x86 VMM's second [`IrqChip`]: the `nestio-xive` model wired to KVM
//! vCPUs, device eventfds and the MMIO bus.
//!
//! # How an interrupt travels
//!
//! 1. A device signals its eventfd (INTx, MSI, a platform line). The chip's delivery
//!    thread waits on every attached eventfd with `poll` (in the VMM's seccomp
//!    allowlist, unlike epoll); a readable one is read
//!    (the count is consumed) and its source is **triggered directly in the model**:
//!    no message, no other process — the same path for an in-process device and a
//!    vfio-user device whose process writes the eventfd (at any nesting depth the
//!    eventfd passes down unchanged).
//! 2. The model runs the PQ machine, writes the event into the guest's event queue
//!    and updates the target server's TIMA.
//! 3. When the server's OS ring signals (NSR), the chip injects [`XIVE_VECTOR`] into
//!    that vCPU's local APIC (`KVM_SIGNAL_MSI`, fixed delivery, physical destination
//!    = the vCPU's APIC ID, edge). The x86 vector stands in for POWER's external
//!    exception.
//! 4. The guest's handler acknowledges through its TIMA OS page (2-byte load at
//!    `0x810`), pops its queue, EOIs the source through the ESB management page (or
//!    `H_INT_ESB`) and restores CPPR with a 1-byte store at `0x11`.
//!
//! A wired line attached with a resample eventfd (PCI INTx) is an edge source in the
//! model whose EOI signals the resample eventfd, so the VMM's INTx path unmasks the
//! device, which signals again if its line is still up — the level semantics of
//! KVM's resample irqfd.
//!
//! # Guest-physical layout (x86)
//!
//! | what | where |
//! |---|---|
//! | ESB pages (4 KiB), source `n` | trigger page [`ESB_BASE`] `+ n * 8 KiB`, management page `+ 4 KiB` |
//! | TIMA of vCPU `i` | [`TIMA_BASE`] `+ i * 16 KiB`, four ring pages; the OS page at `+ 8 KiB` |
//!
//! KVM's XIVE device maps one region with the TIMA at page 0 and the ESB pages from
//! page 4 ([`nestio_xive::router::Layout::region_page`]); on POWER the TIMA address
//! shows the *current* thread's context. This VMM's bus does not know which vCPU made
//! an access, so each vCPU gets its own TIMA window instead. Both windows lie at the
//! top of the platform MMIO window (`0xef00_0000..0xf000_0000`); a platform device
//! placed there is refused by the bus (overlap) rather than shadowed.
//!
//! Source numbers: IPIs `0..cpus` (IPI `i` targets whatever the guest routes it to;
//! by convention vCPU `i`), fixed lines `32 + line`, then PCI INTx, platform lines and
//! MSIs from 64 up, so a PCI function's source fits its interrupt-line register.
//!
//! # MSI messages steer delivery
//!
//! As on sPAPR, where a device's MSI is a write of the interrupt number (data) to the
//! PHB's MSI window and QEMU triggers the source the data names, a message whose
//! address is [`MSI_ADDRESS`] selects the source its vector triggers: data = the XIVE
//! source number (LISN) of a message source allocated for a device (not an IPI, not a
//! line). So a device's MSI / MSI-X vectors reach distinct sources, each routed by
//! the guest (`H_INT_SET_SOURCE_CONFIG`) to its own server and priority, and the guest
//! can move a vector to another source by rewriting the message alone. A message to
//! [`MSI_ADDRESS`] whose data names no such source is refused ([`IrqChipError`]) and
//! that vector's events are dropped (counted, traced) until it is programmed again —
//! the write a real MSI window would ignore. A message to any other address (an x86
//! `0xfee0_0000` one left from before a run-time switch) or none keeps the vector on
//! the source allocated for it. The device's eventfd is still read by the delivery
//! thread; steering is a table lookup there (no message, no hop). The window is not
//! backed on the bus: device MSIs are eventfds here, never memory writes.
//!
//! # Cede and escalation (the vCPU halt/wake hook)
//!
//! `H_CEDE` (registered with the `H_INT_*` calls, [`XiveIrqChip::cede`]) takes the
//! calling vCPU's VP off its thread in the model ([`nestio_xive::escalation`]): its
//! queues' escalations are armed, and the vCPU thread sleeps on a per-vCPU condition
//! variable. An event for that VP then does not inject [`XIVE_VECTOR`] but fires the
//! queue's escalation once, whose handler ([`Notify::escalate`]) wakes the thread;
//! the VP is dispatched again (escalations off) and, the event having been presented
//! meanwhile, the vector is injected then. Further events while ceded coalesce in the
//! escalation's PQ (no storm of wake-ups). The sleep is bounded by [`CEDE_SLICE`]
//! (as a POWER decrementer would end it) so a VM pause never waits on a ceded vCPU;
//! a cede that finds an exception already signalled returns at once.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use nestio_device_model::pci::MsiMessage;
use nestio_xive::router::Layout;
use nestio_xive::{GuestMemory, MemError, Notify, Xive, XiveConfig};
use parking_lot::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    IrqChip, IrqChipError, IrqChipSnapshot, IrqSource, MessageState, SourceKind, SourceRequest,
    SourceState,
};
use crate::bus::{Bus, BusDevice, BusError, BusFault, BusRange};

const MODEL: &str = "xive";

/// The x86 vector a XIVE notification raises in the target vCPU.
pub const XIVE_VECTOR: u8 = 0x3e;
/// Sources of the model.
pub const NR_IRQS: u32 = 1024;
/// Most vCPUs (servers).
pub const MAX_SERVERS: u32 = 32;
/// First fixed-line source (`Line(n)` is `LINE_BASE + n`).
pub const LINE_BASE: u32 = 32;
/// First dynamically allocated source.
pub const DYNAMIC_BASE: u32 = 64;
/// ESB page size (log2).
pub const PAGE_SHIFT: u32 = 12;
/// Guest address of source 0's trigger page.
pub const ESB_BASE: u64 = 0xef00_0000;
/// Guest address of vCPU 0's TIMA (4 ring pages per vCPU).
pub const TIMA_BASE: u64 = 0xefc0_0000;
/// Bytes of one vCPU's TIMA window.
pub const TIMA_STRIDE: u64 = 4 << PAGE_SHIFT;
/// What `H_INT_GET_QUEUE_INFO` names as queue ESB pages (not backed).
pub const END_BASE: u64 = 0xefe0_0000;
/// The MSI address whose data names the XIVE source a vector triggers (see the
/// module documentation); between the ESB pages and the TIMA windows, not backed.
pub const MSI_ADDRESS: u64 = 0xef80_0000;
/// The longest an `H_CEDE` sleeps without an escalation.
pub const CEDE_SLICE: std::time::Duration = std::time::Duration::from_millis(10);

/// The x86 layout.
pub const LAYOUT: Layout = Layout {
    esb_base: ESB_BASE,
    end_base: END_BASE,
    page_shift: PAGE_SHIFT,
};

/// Guest RAM for the model, with the dirty log EQ_SYNC writes.
pub struct VmXiveMemory {
    mem: GuestMemoryMmap,
    dirty: Mutex<Vec<(u64, u64)>>,
}

impl VmXiveMemory {
    /// Over `mem`.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        VmXiveMemory {
            mem,
            dirty: Mutex::new(Vec::new()),
        }
    }
    /// The ranges marked dirty since the last call.
    pub fn take_dirty(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.dirty.lock())
    }
}

impl GuestMemory for VmXiveMemory {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        len != 0
            && crate::hypercall::GuestMem::new(&self.mem)
                .check(gpa, len)
                .is_ok()
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        // vm-memory copies with volatile accesses: no reference over guest RAM.
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| MemError::OutOfRange {
                gpa,
                len: data.len() as u64,
            })
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemError::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })
    }
    fn mark_dirty(&self, gpa: u64, len: u64) {
        self.dirty.lock().push((gpa, len));
    }
}

/// Turns the model's signals into vCPU interrupts, resample signals and wake-ups of
/// ceded vCPUs.
struct Signals {
    inject: Box<dyn Fn(u32) + Send + Sync>,
    resample: Mutex<BTreeMap<u32, EventFd>>,
    /// Per vCPU: an escalation fired since it ceded.
    wakers: Vec<Waker>,
}

#[derive(Default)]
struct Waker {
    woken: Mutex<bool>,
    cv: parking_lot::Condvar,
}

/// What the `H_CEDE` calls of a VM came to ([`XiveIrqChip::cede_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CedeStats {
    /// Calls.
    pub cedes: u64,
    /// Ended by an escalation.
    pub escalated: u64,
    /// Ended by [`CEDE_SLICE`].
    pub timed_out: u64,
    /// Returned at once (an exception was signalled).
    pub signalled: u64,
}

/// How an `H_CEDE` ended ([`XiveIrqChip::cede`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CedeOutcome {
    /// An exception was already signalled: no sleep.
    Signalled,
    /// An escalation woke the vCPU.
    Escalated,
    /// [`CEDE_SLICE`] passed.
    TimedOut,
    /// No such vCPU.
    UnknownVcpu,
}

impl Notify for Signals {
    fn notify(&self, server: u32) {
        (self.inject)(server);
    }
    fn escalate(&self, server: u32, _prio: u8) {
        if let Some(w) = self.wakers.get(server as usize) {
            *w.woken.lock() = true;
            w.cv.notify_all();
        }
    }
    fn eoi(&self, lisn: u32) {
        if let Some(fd) = self.resample.lock().get(&lisn) {
            if let Err(e) = fd.write(1) {
                tracing::warn!(lisn, error = %e, "xive: resample eventfd write failed");
            }
        }
    }
}

/// Inject [`XIVE_VECTOR`] into vCPU `server` through its local APIC.
fn lapic_inject(vm: &VmFd, server: u32) {
    let msi = kvm_msi {
        address_lo: 0xfee0_0000 | ((server & 0xff) << 12),
        address_hi: 0,
        data: u32::from(XIVE_VECTOR),
        ..Default::default()
    };
    if let Err(e) = vm.signal_msi(msi) {
        tracing::warn!(server, error = %e, "xive: KVM_SIGNAL_MSI failed, notification lost");
    }
}

struct Attachment {
    lisn: u32,
    /// The caller's fd number, to find the attachment at detach.
    caller_fd: i32,
    fd: EventFd,
}

/// Where a message source's events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Steer {
    /// To this source (the message's data).
    To(u32),
    /// Nowhere: the message named no source.
    Nowhere,
}

#[derive(Default)]
struct ChipState {
    kinds: BTreeMap<u32, SourceKind>,
    messages: BTreeMap<u32, MsiMessage>,
    /// Vectors whose message names their source ([`MSI_ADDRESS`]).
    steer: BTreeMap<u32, Steer>,
    /// Events dropped because their vector's message named no source.
    dropped: u64,
    intx: BTreeMap<(u8, u8), u32>,
    next: u32,
    attachments: BTreeMap<u64, Attachment>,
    next_token: u64,
    /// Detached eventfds the delivery thread may still be polling: closed by it once
    /// it rebuilt its poll set (so a number it polls is never closed and reused).
    retired: Vec<EventFd>,
    /// Set by the chip's Drop: the delivery thread ends at its next wake-up.
    closing: bool,
}

/// The XIVE interrupt controller of an x86 VM (see the module documentation).
pub struct XiveIrqChip {
    xive: Arc<Xive>,
    /// Guest RAM with the EQ_SYNC dirty log, when the chip owns one.
    ram: Option<Arc<VmXiveMemory>>,
    signals: Arc<Signals>,
    /// Shared with the delivery thread, which holds no reference to the chip itself:
    /// the chip's last owner always runs its Drop, which joins the thread.
    state: Arc<Mutex<ChipState>>,
    /// Wakes the delivery thread: the attachments changed, or the chip is going.
    wake: EventFd,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    cpus: u32,
    cede_stats: Mutex<CedeStats>,
}

impl std::fmt::Debug for XiveIrqChip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XiveIrqChip")
            .field("cpus", &self.cpus)
            .finish()
    }
}

fn invalid(reason: impl Into<String>) -> IrqChipError {
    IrqChipError::Invalid {
        chip: MODEL,
        reason: reason.into(),
    }
}

impl XiveIrqChip {
    /// A XIVE for a KVM VM with `cpus` vCPUs over guest RAM `mem`: notifications are
    /// LAPIC interrupts; [`XiveIrqChip::take_dirty`] reads the EQ_SYNC dirty log.
    pub fn new(
        vm: Arc<VmFd>,
        mem: Arc<VmXiveMemory>,
        cpus: u32,
    ) -> Result<Arc<Self>, IrqChipError> {
        let chip = Self::build(
            mem.clone(),
            cpus,
            Box::new(move |s| lapic_inject(&vm, s)),
            Some(mem),
        )?;
        Ok(chip)
    }

    /// The guest-RAM ranges EQ_SYNC (and so [`Xive::save`]) marked dirty since the
    /// last call: the event-queue pages a migration must send again.
    pub fn take_dirty(&self) -> Vec<(u64, u64)> {
        self.ram
            .as_ref()
            .map(|m| m.take_dirty())
            .unwrap_or_default()
    }

    /// A XIVE whose notifications call `inject(server)` (tests, benchmarks).
    pub fn with_injector(
        mem: Arc<dyn GuestMemory>,
        cpus: u32,
        inject: Box<dyn Fn(u32) + Send + Sync>,
    ) -> Result<Arc<Self>, IrqChipError> {
        Self::build(mem, cpus, inject, None)
    }

    fn build(
        mem: Arc<dyn GuestMemory>,
        cpus: u32,
        inject: Box<dyn Fn(u32) + Send + Sync>,
        ram: Option<Arc<VmXiveMemory>>,
    ) -> Result<Arc<Self>, IrqChipError> {
        if cpus == 0 || cpus > MAX_SERVERS {
            return Err(invalid(format!("{cpus} vCPUs (1..={MAX_SERVERS})")));
        }
        let cfg = XiveConfig::new(NR_IRQS, MAX_SERVERS, LAYOUT)
            .ok_or_else(|| invalid("bad XIVE configuration"))?;
        let signals = Arc::new(Signals {
            inject,
            resample: Mutex::new(BTreeMap::new()),
            wakers: (0..cpus).map(|_| Waker::default()).collect(),
        });
        let xive = Arc::new(Xive::new(cfg, mem, signals.clone()));
        let ctl = |e: nestio_xive::ControlError| invalid(e.to_string());
        xive.set_nr_servers(cpus).map_err(ctl)?;
        let mut st = ChipState {
            next: DYNAMIC_BASE,
            ..Default::default()
        };
        for i in 0..cpus {
            xive.connect_vcpu(i).map_err(ctl)?;
            xive.set_source(u64::from(i), 0).map_err(ctl)?;
            st.kinds.insert(i, SourceKind::Msi);
        }
        let os = |e: std::io::Error| invalid(format!("eventfd/thread for XIVE delivery: {e}"));
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(os)?;
        let thread_wake = wake.try_clone().map_err(os)?;
        let state = Arc::new(Mutex::new(st));
        let chip = Arc::new(XiveIrqChip {
            xive,
            ram,
            signals,
            state: state.clone(),
            wake,
            thread: Mutex::new(None),
            cpus,
            cede_stats: Mutex::new(CedeStats::default()),
        });
        let xive = chip.xive.clone();
        let t = std::thread::Builder::new()
            .name("xive-delivery".into())
            .spawn(move || delivery_loop(&thread_wake, &state, &xive))
            .map_err(os)?;
        *chip.thread.lock() = Some(t);
        Ok(chip)
    }

    /// The model (hypercalls, migration, tests).
    pub fn model(&self) -> &Arc<Xive> {
        &self.xive
    }

    /// Put the ESB and TIMA windows on the MMIO bus.
    pub fn attach_mmio(&self, mmio: &Bus) -> Result<(), BusError> {
        let esb_len = u64::from(NR_IRQS) << (PAGE_SHIFT + 1);
        mmio.insert(
            BusRange::new(ESB_BASE, esb_len)?,
            Arc::new(EsbMmio(self.xive.clone())),
        )?;
        mmio.insert(
            BusRange::new(TIMA_BASE, u64::from(self.cpus) * TIMA_STRIDE)?,
            Arc::new(TimaMmio(self.xive.clone())),
        )?;
        Ok(())
    }

    fn token_of(st: &ChipState, lisn: u32, fd: i32) -> Option<u64> {
        st.attachments
            .iter()
            .find(|(_, a)| a.lisn == lisn && a.caller_fd == fd)
            .map(|(&t, _)| t)
    }

    /// Read a ready eventfd and trigger its source (or the source its message
    /// names).
    fn deliver(state: &Mutex<ChipState>, xive: &Xive, token: u64) {
        let lisn = {
            let mut st = state.lock();
            let Some(a) = st.attachments.get(&token) else {
                return;
            };
            let own = match a.fd.read() {
                Ok(_) => a.lisn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(lisn = a.lisn, error = %e, "xive: eventfd read failed");
                    return;
                }
            };
            match st.steer.get(&own) {
                None => own,
                Some(Steer::To(l)) => *l,
                Some(Steer::Nowhere) => {
                    st.dropped += 1;
                    tracing::debug!(
                        lisn = own,
                        "xive: event dropped, its MSI message names no source"
                    );
                    return;
                }
            }
        };
        xive.trigger(lisn);
    }

    /// The source the events of message source `vector` trigger now (itself unless
    /// its message steers them; `None` when they are dropped).
    pub fn msi_target(&self, vector: IrqSource) -> Option<u32> {
        match self.state.lock().steer.get(&vector.number()) {
            None => Some(vector.number()),
            Some(Steer::To(l)) => Some(*l),
            Some(Steer::Nowhere) => None,
        }
    }

    /// Events dropped because their vector's message named no source.
    pub fn dropped_events(&self) -> u64 {
        self.state.lock().dropped
    }

    /// `H_CEDE` of vCPU `vcpu` (see the module documentation): the VP leaves its
    /// thread in the model, the calling thread sleeps until an escalation or
    /// `max` (at most [`CEDE_SLICE`]), then the VP is dispatched again.
    pub fn cede(&self, vcpu: u32, max: std::time::Duration) -> CedeOutcome {
        let Some(w) = self.signals.wakers.get(vcpu as usize) else {
            return CedeOutcome::UnknownVcpu;
        };
        *w.woken.lock() = false;
        let outcome = match self.xive.cede(vcpu) {
            None => return CedeOutcome::UnknownVcpu,
            Some(true) => CedeOutcome::Signalled,
            Some(false) => {
                let deadline = std::time::Instant::now() + max.min(CEDE_SLICE);
                let mut woken = w.woken.lock();
                while !*woken {
                    if w.cv.wait_until(&mut woken, deadline).timed_out() {
                        break;
                    }
                }
                let o = if *woken {
                    CedeOutcome::Escalated
                } else {
                    CedeOutcome::TimedOut
                };
                *woken = false;
                o
            }
        };
        self.xive.dispatch(vcpu);
        tracing::trace!(vcpu, ?outcome, "xive: H_CEDE");
        let mut st = self.cede_stats.lock();
        st.cedes += 1;
        match outcome {
            CedeOutcome::Escalated => st.escalated += 1,
            CedeOutcome::TimedOut => st.timed_out += 1,
            CedeOutcome::Signalled => st.signalled += 1,
            CedeOutcome::UnknownVcpu => {}
        }
        outcome
    }

    /// What the `H_CEDE` calls came to so far.
    pub fn cede_stats(&self) -> CedeStats {
        *self.cede_stats.lock()
    }
}

/// The delivery thread: `poll` on the wake eventfd (its own duplicate) and every
/// attached eventfd; the set is rebuilt after each wake-up. It holds the chip's state
/// and model but never the chip, so the chip's Drop always runs on its owner's thread
/// and joins this one: no delivery thread outlives its chip. (It used to upgrade a
/// `Weak` to the chip; when the owner let go meanwhile, the chip was dropped here and
/// the thread ran on detached after the owner had returned — a fuzz finding.)
fn delivery_loop(wake: &EventFd, state: &Mutex<ChipState>, xive: &Xive) {
    let wake_fd = wake.as_raw_fd();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut tokens: Vec<u64> = Vec::new();
    loop {
        {
            let mut st = state.lock();
            if st.closing {
                return;
            }
            st.retired.clear();
            fds.clear();
            tokens.clear();
            fds.push(libc::pollfd {
                fd: wake_fd,
                events: libc::POLLIN,
                revents: 0,
            });
            for (&t, a) in &st.attachments {
                fds.push(libc::pollfd {
                    fd: a.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                tokens.push(t);
            }
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries; every fd in it
        // stays open until this thread rebuilds the set (detached ones are retired, not
        // closed, and the wake eventfd lives as long as the chip, which joins us).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "xive: poll failed, delivery stops");
            return;
        }
        if fds[0].revents != 0 {
            // A change or the end: drain the counter and rebuild (or notice the end).
            let _ = wake.read();
        }
        for (pfd, &t) in fds[1..].iter().zip(&tokens) {
            if pfd.revents != 0 {
                XiveIrqChip::deliver(state, xive, t);
            }
        }
    }
}

impl Drop for XiveIrqChip {
    fn drop(&mut self) {
        self.state.lock().closing = true;
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl IrqChip for XiveIrqChip {
    fn model(&self) -> &'static str {
        MODEL
    }

    fn allocate(&self, request: SourceRequest) -> Result<IrqSource, IrqChipError> {
        let mut st = self.state.lock();
        let (lisn, kind) = match request {
            SourceRequest::Line(n) if n < DYNAMIC_BASE - LINE_BASE => {
                (LINE_BASE + n, SourceKind::Line)
            }
            SourceRequest::Line(n) => return Err(invalid(format!("line {n} (0..32)"))),
            SourceRequest::PciIntx { slot, pin } if (1..=4).contains(&pin) => {
                match st.intx.get(&(slot, pin)) {
                    Some(&l) => (l, SourceKind::Line),
                    None => {
                        let l = st.next;
                        st.intx.insert((slot, pin), l);
                        (l, SourceKind::Line)
                    }
                }
            }
            SourceRequest::PciIntx { pin, .. } => {
                return Err(invalid(format!("INTx pin {pin} (use 1..=4)")))
            }
            SourceRequest::PlatformLine => (st.next, SourceKind::Line),
            SourceRequest::Msi => (st.next, SourceKind::Msi),
        };
        if lisn >= NR_IRQS {
            return Err(IrqChipError::Exhausted {
                chip: MODEL,
                what: "XIVE sources",
            });
        }
        if lisn == st.next {
            st.next += 1;
        }
        if let std::collections::btree_map::Entry::Vacant(v) = st.kinds.entry(lisn) {
            v.insert(kind);
            self.xive
                .set_source(u64::from(lisn), 0)
                .map_err(|e| invalid(e.to_string()))?;
        }
        Ok(IrqSource::new(lisn, kind))
    }

    fn attach(
        &self,
        source: IrqSource,
        trigger: &EventFd,
        resample: Option<&EventFd>,
    ) -> Result<(), IrqChipError> {
        let lisn = source.number();
        let mut st = self.state.lock();
        if !st.kinds.contains_key(&lisn) {
            return Err(IrqChipError::UnknownSource(lisn));
        }
        if resample.is_some() && st.kinds[&lisn] == SourceKind::Msi {
            return Err(invalid(
                "a message source cannot be level-triggered (no resample)",
            ));
        }
        if Self::token_of(&st, lisn, trigger.as_raw_fd()).is_some() {
            return Ok(());
        }
        let os = |e: std::io::Error| invalid(format!("eventfd for source {lisn}: {e}"));
        let fd = trigger.try_clone().map_err(os)?;
        // SAFETY: F_SETFL on an fd we own; non-blocking so a read that races with a
        // detach never blocks the delivery thread (devices' eventfds already are).
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        if let Some(rs) = resample {
            let rs = rs.try_clone().map_err(os)?;
            self.signals.resample.lock().insert(lisn, rs);
        }
        let token = st.next_token;
        st.next_token += 1;
        st.attachments.insert(
            token,
            Attachment {
                lisn,
                caller_fd: trigger.as_raw_fd(),
                fd,
            },
        );
        drop(st);
        let _ = self.wake.write(1);
        Ok(())
    }

    fn detach(&self, source: IrqSource, trigger: &EventFd) -> Result<(), IrqChipError> {
        let lisn = source.number();
        let mut st = self.state.lock();
        let Some(token) = Self::token_of(&st, lisn, trigger.as_raw_fd()) else {
            return Err(IrqChipError::UnknownSource(lisn));
        };
        if let Some(a) = st.attachments.remove(&token) {
            st.retired.push(a.fd);
        }
        if !st.attachments.values().any(|a| a.lisn == lisn) {
            self.signals.resample.lock().remove(&lisn);
        }
        drop(st);
        let _ = self.wake.write(1);
        Ok(())
    }

    fn program_msi(&self, updates: &[(IrqSource, Option<MsiMessage>)]) -> Result<(), IrqChipError> {
        let mut st = self.state.lock();
        for (s, _) in updates {
            if st.kinds.get(&s.number()) != Some(&SourceKind::Msi) {
                return Err(IrqChipError::UnknownSource(s.number()));
            }
        }
        let mut refused = None;
        for (s, m) in updates {
            let n = s.number();
            match m {
                Some(m) => {
                    st.messages.insert(n, *m);
                    if m.address == MSI_ADDRESS {
                        let target = m.data;
                        let ok = target >= DYNAMIC_BASE
                            && st.kinds.get(&target) == Some(&SourceKind::Msi);
                        if ok {
                            st.steer.insert(n, Steer::To(target));
                        } else {
                            st.steer.insert(n, Steer::Nowhere);
                            refused.get_or_insert(target);
                        }
                    } else {
                        st.steer.remove(&n);
                    }
                }
                None => {
                    st.messages.remove(&n);
                    st.steer.remove(&n);
                }
            }
        }
        match refused {
            None => Ok(()),
            Some(t) => Err(invalid(format!(
                "MSI data {t:#x} names no device message source: program the source \
                 number of an MSI/MSI-X vector (its events are dropped until then)"
            ))),
        }
    }

    fn snapshot(&self) -> IrqChipSnapshot {
        let st = self.state.lock();
        let resample = self.signals.resample.lock();
        IrqChipSnapshot {
            model: MODEL.into(),
            sources: st
                .kinds
                .iter()
                .map(|(&n, &kind)| SourceState {
                    number: n,
                    kind,
                    message: st.messages.get(&n).map(|&m| MessageState::from(m)),
                    attached: st.attachments.values().filter(|a| a.lisn == n).count() as u32,
                    resample: resample.contains_key(&n),
                })
                .collect(),
        }
    }
}

/// One device interrupt as the bus wired it: what it asked for, its eventfds, and
/// (for a message source) its programmed message.
pub struct Wire<'a> {
    /// The request the bus made.
    pub request: SourceRequest,
    /// The device's trigger eventfd.
    pub trigger: &'a EventFd,
    /// The resample eventfd of a level-triggered line.
    pub resample: Option<&'a EventFd>,
    /// The programmed message.
    pub message: Option<MsiMessage>,
}

/// Switch a running VM's device interrupts from one interrupt controller to another
/// (the x86 routing to the XIVE or back, or a XIVE to a re-created one): every wire is
/// detached from `from` (its eventfd keeps counting meanwhile), allocated on `to`, then
/// all messages are programmed (so a message steering to another wire's source finds
/// it allocated) and the wires re-attached, so a signal raised during the switch is delivered
/// by the new controller. Returns the new sources, in `wires` order. The old
/// controller is torn down when its last reference goes (a XIVE's delivery thread
/// stops; KVM's routes are replaced by the new chip's).
pub fn rewire(
    from: &dyn IrqChip,
    old: &[IrqSource],
    to: &dyn IrqChip,
    wires: &[Wire<'_>],
) -> Result<Vec<IrqSource>, IrqChipError> {
    if old.len() != wires.len() {
        return Err(invalid("rewire needs one old source per wire"));
    }
    for (s, w) in old.iter().zip(wires) {
        from.detach(*s, w.trigger)?;
    }
    // Every source first, then the messages (a message may name another wire's source,
    // [`MSI_ADDRESS`]), then the eventfds.
    let new = wires
        .iter()
        .map(|w| to.allocate(w.request))
        .collect::<Result<Vec<_>, _>>()?;
    let messages: Vec<_> = new
        .iter()
        .zip(wires)
        .filter_map(|(s, w)| w.message.map(|m| (*s, Some(m))))
        .collect();
    if !messages.is_empty() {
        to.program_msi(&messages)?;
    }
    for (s, w) in new.iter().zip(wires) {
        to.attach(*s, w.trigger, w.resample)?;
    }
    tracing::info!(
        from = from.model(),
        to = to.model(),
        wires = wires.len(),
        "interrupt controller switched"
    );
    Ok(new)
}

/// Fuzz entry point (feature `harness`, the `xive` fuzz target with the model's): a
/// byte string drives one chip with 2 vCPUs through source allocation of every kind,
/// attach/detach of eventfds, eventfd signals, MSI messages with any address and data
/// (the steering of the module documentation), `H_CEDE` of any vCPU (no sleep), and
/// the `H_INT_*` routing calls. Checks: nothing panics; a vector's events go to itself
/// or to a device message source its message named, or nowhere only after a refused
/// message; a refused `program_msi` is exactly a message to [`MSI_ADDRESS`] naming no
/// such source; a cede of an unknown vCPU is refused and leaves every VP dispatched.
#[cfg(feature = "harness")]
pub fn fuzz_xive_chip(data: &[u8]) {
    use nestio_xive::VecMemory;
    let mem = Arc::new(VecMemory::new(0, 1 << 20));
    let Ok(chip) = XiveIrqChip::with_injector(mem, 2, Box::new(|_| {})) else {
        return;
    };
    let mut it = data.iter().copied();
    let mut sources: Vec<IrqSource> = Vec::new();
    let mut fds: BTreeMap<u32, EventFd> = BTreeMap::new();
    let pick = |b: u8, v: &[IrqSource]| v.get(usize::from(b) % v.len().max(1)).copied();
    let word = |it: &mut dyn Iterator<Item = u8>| {
        (0..4).fold(0u32, |w, _| (w << 8) | u32::from(it.next().unwrap_or(0)))
    };
    while let Some(op) = it.next() {
        let arg = it.next().unwrap_or(0);
        match op % 7 {
            0 => {
                let req = match arg % 4 {
                    0 => SourceRequest::Msi,
                    1 => SourceRequest::PlatformLine,
                    2 => SourceRequest::PciIntx {
                        slot: arg >> 3,
                        pin: arg & 7,
                    },
                    _ => SourceRequest::Line(u32::from(arg >> 2)),
                };
                if let Ok(s) = chip.allocate(req) {
                    sources.push(s);
                }
            }
            1 => {
                let Some(s) = pick(arg, &sources) else {
                    continue;
                };
                let to_window = it.next().unwrap_or(0) & 1 == 1;
                let data = match it.next().unwrap_or(0) % 3 {
                    0 => pick(it.next().unwrap_or(0), &sources).map_or(0, |t| t.number()),
                    1 => u32::from(it.next().unwrap_or(0)),
                    _ => word(&mut it),
                };
                let address = if to_window { MSI_ADDRESS } else { 0xfee0_0000 };
                let r = chip.program_msi(&[(s, Some(MsiMessage { address, data }))]);
                let kinds = chip.state.lock().kinds.clone();
                if s.kind() != SourceKind::Msi || kinds.get(&s.number()) != Some(&SourceKind::Msi) {
                    assert!(r.is_err(), "a line took a message");
                    continue;
                }
                let valid = data >= DYNAMIC_BASE && kinds.get(&data) == Some(&SourceKind::Msi);
                assert_eq!(r.is_err(), to_window && !valid, "{address:#x} {data:#x}");
                let want = match (to_window, valid) {
                    (false, _) => Some(s.number()),
                    (true, true) => Some(data),
                    (true, false) => None,
                };
                assert_eq!(chip.msi_target(s), want);
            }
            2 => {
                let Some(s) = pick(arg, &sources) else {
                    continue;
                };
                let Ok(fd) = EventFd::new(libc::EFD_NONBLOCK) else {
                    continue;
                };
                let resample = EventFd::new(libc::EFD_NONBLOCK).ok();
                let rs = if it.next().unwrap_or(0) & 1 == 1 {
                    resample.as_ref()
                } else {
                    None
                };
                if chip.attach(s, &fd, rs).is_ok() {
                    if let Some(old) = fds.insert(s.number(), fd) {
                        let _ = chip.detach(s, &old);
                    }
                }
            }
            3 => {
                let Some(s) = pick(arg, &sources) else {
                    continue;
                };
                if let Some(fd) = fds.remove(&s.number()) {
                    chip.detach(s, &fd).expect("detach an attached eventfd");
                }
            }
            4 => {
                if let Some(fd) = pick(arg, &sources).and_then(|s| fds.get(&s.number())) {
                    let _ = fd.write(u64::from(it.next().unwrap_or(1)).max(1));
                }
            }
            5 => {
                let vcpu = u32::from(arg % 4);
                let o = chip.cede(vcpu, std::time::Duration::ZERO);
                assert_eq!(o == CedeOutcome::UnknownVcpu, vcpu >= 2, "{o:?}");
                for v in 0..2 {
                    assert!(chip.xive.escalation(v).is_some_and(|e| e.dispatched));
                }
            }
            _ => {
                // Route a source (or an IPI) to a vCPU's queue, as the guest does.
                let lisn = pick(arg, &sources).map_or(u32::from(arg % 2), |s| s.number());
                let server = u64::from(it.next().unwrap_or(0) % 3);
                let prio = u64::from(it.next().unwrap_or(6) % 8);
                let q = 0x1_0000 + server * 0x8000 + prio * 0x1000;
                chip.xive.hcall(
                    0,
                    nestio_xive::hcall::op::H_INT_SET_QUEUE_CONFIG,
                    &[1, server, prio, q, 12],
                );
                chip.xive.hcall(
                    0,
                    nestio_xive::hcall::op::H_INT_SET_SOURCE_CONFIG,
                    &[2, lisn.into(), server, prio, lisn.into()],
                );
                chip.xive.esb_load(lisn, true, 0xc00, 8);
            }
        }
    }
}

/// Big-endian bytes of the low `data.len()` bytes of `v`.
fn put_be(v: u64, data: &mut [u8]) {
    let b = v.to_be_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[8 - n..]);
}

fn get_be(data: &[u8]) -> u64 {
    data.iter().take(8).fold(0, |v, &b| (v << 8) | u64::from(b))
}

/// The ESB window: 2 pages per source.
struct EsbMmio(Arc<Xive>);

impl EsbMmio {
    fn decode(offset: u64) -> (u32, bool, u64) {
        let page = offset >> PAGE_SHIFT;
        (
            (page / 2) as u32,
            page % 2 == 1,
            offset & ((1 << PAGE_SHIFT) - 1),
        )
    }
}

impl BusDevice for EsbMmio {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        let (lisn, mgmt, off) = Self::decode(offset);
        put_be(self.0.esb_load(lisn, mgmt, off, data.len() as u32), data);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
        let (lisn, mgmt, off) = Self::decode(offset);
        self.0
            .esb_store(lisn, mgmt, off, data.len() as u32, get_be(data));
        Ok(())
    }
}

/// The per-vCPU TIMA windows.
struct TimaMmio(Arc<Xive>);

impl TimaMmio {
    fn decode(offset: u64) -> (u32, u8, u64) {
        let server = (offset / TIMA_STRIDE) as u32;
        let in_win = offset % TIMA_STRIDE;
        (
            server,
            (in_win >> PAGE_SHIFT) as u8,
            in_win & ((1 << PAGE_SHIFT) - 1),
        )
    }
}

impl BusDevice for TimaMmio {
    fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), BusFault> {
        let (server, ring, off) = Self::decode(offset);
        put_be(self.0.tima_load(server, ring, off, data.len() as u32), data);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BusFault> {
        let (server, ring, off) = Self::decode(offset);
        self.0
            .tima_store(server, ring, off, data.len() as u32, get_be(data));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nestio_xive::hcall::{flags, op};
    use nestio_xive::VecMemory;
    use std::sync::mpsc;
    use std::time::Duration;

    fn chip(cpus: u32) -> (Arc<XiveIrqChip>, Arc<VecMemory>, mpsc::Receiver<u32>) {
        let mem = Arc::new(VecMemory::new(0, 1 << 20));
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let c = XiveIrqChip::with_injector(
            mem.clone(),
            cpus,
            Box::new(move |s| {
                let _ = tx.lock().send(s);
            }),
        )
        .unwrap();
        (c, mem, rx)
    }

    fn route(c: &XiveIrqChip, lisn: u32, server: u64) {
        let x = c.model();
        for s in 0..c.cpus {
            let q = 0x1_0000 + u64::from(s) * 0x1000;
            assert_eq!(
                x.hcall(s, op::H_INT_SET_QUEUE_CONFIG, &[1, s.into(), 6, q, 12])
                    .rc,
                0
            );
            x.tima_store(s, 2, 0x11, 1, 0xff);
        }
        let r = x.hcall(
            0,
            op::H_INT_SET_SOURCE_CONFIG,
            &[flags::SRC_SET_EISN, lisn.into(), server, 6, lisn.into()],
        );
        assert_eq!(r.rc, 0);
        x.esb_load(lisn, true, 0xc00, 8);
    }

    #[test]
    fn dropping_the_chip_during_a_delivery_joins_the_delivery_thread() {
        // Fuzz finding (xive target, LeakSanitizer): the delivery thread upgraded a
        // `Weak` to the chip for each delivery; an owner letting go meanwhile returned at
        // once, the chip was dropped on the delivery thread and that thread ran on,
        // detached. Now the owner's drop joins it, whatever it is doing.
        let mem = Arc::new(VecMemory::new(0, 1 << 20));
        let (entered_tx, entered_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (entered_tx, go_rx) = (Mutex::new(entered_tx), Mutex::new(go_rx));
        let c = XiveIrqChip::with_injector(
            mem,
            1,
            Box::new(move |_| {
                let _ = entered_tx.lock().send(());
                // Hold this delivery while the owner drops the chip (bounded: the
                // fixed chip's Drop waits for it).
                let _ = go_rx.lock().recv_timeout(Duration::from_millis(300));
            }),
        )
        .unwrap();
        let s = c.allocate(SourceRequest::Msi).unwrap();
        route(&c, s.number(), 0);
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        c.attach(s, &fd, None).unwrap();
        let model = c.model().clone();
        fd.write(1).unwrap();
        entered_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        drop(c);
        assert_eq!(
            Arc::strong_count(&model),
            1,
            "the delivery thread (holding the model) ended before the owner's drop returned"
        );
        drop(go_tx);
    }

    #[test]
    fn eventfd_triggers_its_source_and_notifies_the_target_vcpu() {
        let (c, mem, rx) = chip(2);
        let s = c.allocate(SourceRequest::Msi).unwrap();
        assert_eq!(s.number(), DYNAMIC_BASE);
        route(&c, s.number(), 1);
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        c.attach(s, &fd, None).unwrap();
        fd.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(mem.read_be32(0x1_1000).unwrap(), 0x8000_0000 | DYNAMIC_BASE);
        // Masked = detached: the count waits in the eventfd and arrives at unmask.
        c.model().esb_load(s.number(), true, 0, 8);
        c.mask(s, &fd).unwrap();
        fd.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        c.unmask(s, &fd).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(
            c.snapshot()
                .sources
                .iter()
                .find(|x| x.number == s.number())
                .unwrap()
                .attached,
            1
        );
    }

    #[test]
    fn intx_with_resample_signals_at_eoi() {
        let (c, _mem, rx) = chip(1);
        let s = c
            .allocate(SourceRequest::PciIntx { slot: 1, pin: 1 })
            .unwrap();
        assert_eq!(
            c.allocate(SourceRequest::PciIntx { slot: 1, pin: 1 })
                .unwrap(),
            s
        );
        route(&c, s.number(), 0);
        let (fd, rs) = (
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        c.attach(s, &fd, Some(&rs)).unwrap();
        fd.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        assert!(rs.read().is_err(), "no resample before the EOI");
        c.model().esb_load(s.number(), true, 0, 8);
        assert_eq!(rs.read().unwrap(), 1);
        let msi = c.allocate(SourceRequest::Msi).unwrap();
        assert!(c.attach(msi, &fd, Some(&rs)).is_err());
        c.detach(s, &fd).unwrap();
        assert!(matches!(
            c.detach(s, &fd),
            Err(IrqChipError::UnknownSource(_))
        ));
    }

    #[test]
    fn runtime_switch_rewires_devices_and_tears_down() {
        use crate::irqchip::fake::{IrqCall, RecordingIrqChip};
        let x86 = RecordingIrqChip::default();
        let (intx, rs, msi) = (
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        let wires = [
            Wire {
                request: SourceRequest::PciIntx { slot: 1, pin: 1 },
                trigger: &intx,
                resample: Some(&rs),
                message: None,
            },
            Wire {
                request: SourceRequest::Msi,
                trigger: &msi,
                resample: None,
                message: Some(msg),
            },
        ];
        let old: Vec<_> = wires
            .iter()
            .map(|w| {
                let s = x86.allocate(w.request).unwrap();
                x86.attach(s, w.trigger, w.resample).unwrap();
                s
            })
            .collect();
        x86.take();
        // x86 -> XIVE: a signal raised before the guest configured anything waits in
        // the source (PQ) and nothing is lost.
        let (xive, _mem, rx) = chip(2);
        let new = rewire(&x86, &old, xive.as_ref(), &wires).unwrap();
        assert_eq!(
            x86.take(),
            vec![
                IrqCall::Detach {
                    source: old[0].number()
                },
                IrqCall::Detach {
                    source: old[1].number()
                }
            ]
        );
        let snap = xive.snapshot();
        assert_eq!(snap.sources.iter().filter(|s| s.attached == 1).count(), 2);
        assert!(snap
            .sources
            .iter()
            .any(|s| s.message == Some(MessageState::from(msg))));
        route(&xive, new[1].number(), 1);
        msi.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        // XIVE -> a re-created XIVE with the state migrated: routing survives.
        let saved = xive.model().save();
        let (xive2, _mem2, rx2) = chip(2);
        let again = rewire(xive.as_ref(), &new, xive2.as_ref(), &wires).unwrap();
        assert_eq!(again, new, "same numbers on the same allocation order");
        drop(xive);
        xive2.model().restore(&saved).unwrap();
        xive2.model().esb_load(new[1].number(), true, 0, 8); // the guest's EOI
        msi.write(1).unwrap();
        assert_eq!(rx2.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "old XIVE torn down"
        );
        // XIVE -> x86.
        let back = RecordingIrqChip::default();
        rewire(xive2.as_ref(), &again, &back, &wires).unwrap();
        assert_eq!(
            back.snapshot()
                .sources
                .iter()
                .map(|s| s.attached)
                .sum::<u32>(),
            2
        );
        assert!(xive2.snapshot().sources.iter().all(|s| s.attached == 0));
    }

    /// Configure a priority-`prio` queue on every server and CPPR 0xFF.
    fn queues(c: &XiveIrqChip, prio: u8) {
        let x = c.model();
        for s in 0..c.cpus {
            let q = 0x2_0000 + u64::from(s) * 0x8000 + u64::from(prio) * 0x1000;
            assert_eq!(
                x.hcall(
                    s,
                    op::H_INT_SET_QUEUE_CONFIG,
                    &[1, s.into(), prio.into(), q, 12]
                )
                .rc,
                0
            );
            x.tima_store(s, 2, 0x11, 1, 0xff);
        }
    }

    fn route_to(c: &XiveIrqChip, lisn: u32, server: u32, prio: u8) {
        let r = c.model().hcall(
            0,
            op::H_INT_SET_SOURCE_CONFIG,
            &[
                flags::SRC_SET_EISN,
                lisn.into(),
                server.into(),
                prio.into(),
                lisn.into(),
            ],
        );
        assert_eq!(r.rc, 0);
        c.model().esb_load(lisn, true, 0xc00, 8);
    }

    /// A device with three MSI-X vectors: each message names a source (data = LISN at
    /// [`MSI_ADDRESS`]) routed to its own (server, priority); each vector's eventfd
    /// lands in that queue — including a vector steered to another vector's source
    /// and back. A message naming no message source is refused and its events dropped;
    /// an x86 message keeps the vector on its own source.
    #[test]
    fn msi_data_selects_the_source_and_so_the_queue() {
        let (c, mem, rx) = chip(2);
        for p in [3, 5, 6] {
            queues(&c, p);
        }
        let v: Vec<IrqSource> = (0..3)
            .map(|_| c.allocate(SourceRequest::Msi).unwrap())
            .collect();
        let fds: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        for (s, fd) in v.iter().zip(&fds) {
            c.attach(*s, fd, None).unwrap();
        }
        // Vector i -> source of vector (2 - i) (crossed on purpose), routed:
        // v[0]'s source -> server 1 prio 3, v[1]'s -> server 0 prio 5,
        // v[2]'s -> server 1 prio 6.
        let dest = [(1u32, 3u8), (0, 5), (1, 6)];
        for (i, s) in v.iter().enumerate() {
            route_to(&c, s.number(), dest[i].0, dest[i].1);
        }
        let msg = |lisn: u32| MsiMessage {
            address: MSI_ADDRESS,
            data: lisn,
        };
        let updates: Vec<_> = (0..3)
            .map(|i| (v[i], Some(msg(v[2 - i].number()))))
            .collect();
        c.program_msi(&updates).unwrap();
        let q = |server: u32, prio: u8| {
            0x2_0000 + u64::from(server) * 0x8000 + u64::from(prio) * 0x1000
        };
        for i in 0..3 {
            assert_eq!(c.msi_target(v[i]), Some(v[2 - i].number()));
            fds[i].write(1).unwrap();
            let (server, prio) = dest[2 - i];
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(5)).unwrap(),
                server,
                "vector {i}"
            );
            let pos = c.model().queue_position(server, prio).unwrap();
            assert_eq!(
                pos,
                (1, 1),
                "vector {i}: one event in queue {server}/{prio}"
            );
            assert_eq!(
                mem.read_be32(q(server, prio)).unwrap(),
                0x8000_0000 | v[2 - i].number(),
                "vector {i}: the EISN of the source its data named"
            );
        }
        // The guest moves vector 0 to its own source by rewriting the message alone.
        c.model().esb_load(v[2].number(), true, 0, 8);
        c.model().esb_load(v[0].number(), true, 0, 8);
        c.program_msi(&[(v[0], Some(msg(v[0].number())))]).unwrap();
        fds[0].write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(
            c.model().queue_position(1, 3),
            Some((1, 2)),
            "server 1 prio 3"
        );
        assert_eq!(c.model().queue_position(1, 6), Some((1, 1)), "unchanged");
        // Data naming an IPI, a line or nothing: refused, the vector drops its events.
        let line = c.allocate(SourceRequest::PlatformLine).unwrap();
        for bad in [1, line.number(), NR_IRQS + 5, 0xffff_ffff] {
            assert!(
                c.program_msi(&[(v[1], Some(msg(bad)))]).is_err(),
                "{bad:#x}"
            );
            assert_eq!(c.msi_target(v[1]), None);
        }
        fds[1].write(1).unwrap();
        let t = std::time::Instant::now();
        while c.dropped_events() == 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "event not dropped");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        // An x86 message (left from before a switch): back to its own source.
        c.program_msi(&[(
            v[1],
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x31,
            }),
        )])
        .unwrap();
        assert_eq!(c.msi_target(v[1]), Some(v[1].number()));
        c.model().esb_load(v[1].number(), true, 0, 8);
        fds[1].write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        assert_eq!(
            c.model().queue_position(0, 5),
            Some((1, 2)),
            "server 0 prio 5"
        );
        // Removing the message removes the steering too.
        c.program_msi(&[(v[2], None)]).unwrap();
        assert_eq!(c.msi_target(v[2]), Some(v[2].number()));
    }

    /// A vector steered to another vector's source keeps its steering across a switch
    /// to a re-created XIVE (all sources exist before any message is programmed).
    #[test]
    fn rewire_keeps_msi_steering_between_wires() {
        let (a, _m, _rx) = chip(2);
        let fds: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let first = a.allocate(SourceRequest::Msi).unwrap();
        let second = a.allocate(SourceRequest::Msi).unwrap();
        let msg = MsiMessage {
            address: MSI_ADDRESS,
            data: second.number(),
        };
        a.program_msi(&[(first, Some(msg))]).unwrap();
        let wires = [
            Wire {
                request: SourceRequest::Msi,
                trigger: &fds[0],
                resample: None,
                message: Some(msg),
            },
            Wire {
                request: SourceRequest::Msi,
                trigger: &fds[1],
                resample: None,
                message: None,
            },
        ];
        for (s, w) in [first, second].iter().zip(&wires) {
            a.attach(*s, w.trigger, None).unwrap();
        }
        let (b, mem, rx) = chip(2);
        let new = rewire(a.as_ref(), &[first, second], b.as_ref(), &wires).unwrap();
        assert_eq!(b.msi_target(new[0]), Some(new[1].number()));
        queues(&b, 6);
        route_to(&b, new[1].number(), 1, 6);
        fds[0].write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(
            mem.read_be32(0x2_0000 + 0x8000 + 6 * 0x1000).unwrap(),
            0x8000_0000 | new[1].number()
        );
    }

    /// `H_CEDE`: a ceded vCPU is woken by an event for its queue (escalation), not by
    /// an injection; 100 more events while it sleeps do not wake it again (one
    /// escalation per cede); at dispatch the vector is injected once. A cede with an
    /// exception already signalled does not sleep; without any event it times out.
    #[test]
    fn cede_sleeps_until_an_escalation_and_never_storms() {
        let (c, _mem, rx) = chip(2);
        let s = c.allocate(SourceRequest::Msi).unwrap();
        queues(&c, 6);
        route_to(&c, s.number(), 1, 6);
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        c.attach(s, &fd, None).unwrap();
        assert_eq!(
            c.cede(1, Duration::from_millis(1)),
            CedeOutcome::TimedOut,
            "nothing pending"
        );
        assert_eq!(c.cede(7, CEDE_SLICE), CedeOutcome::UnknownVcpu);
        let c2 = c.clone();
        let sleeper = std::thread::spawn(move || c2.cede(1, Duration::from_secs(60)));
        // Wait until the VP is off its thread, then signal the device's eventfd.
        let t = std::time::Instant::now();
        while c.model().escalation(1).unwrap().dispatched {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::yield_now();
        }
        fd.write(1).unwrap();
        let outcome = sleeper.join().unwrap();
        // CEDE_SLICE bounds the sleep: either the escalation woke it, or (on a very
        // slow host) the slice ended first; the counters tell which.
        let e = c.model().escalation(1).unwrap();
        if outcome == CedeOutcome::Escalated {
            assert_eq!(e.fired, 1);
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(5)).unwrap(),
                1,
                "injected at dispatch"
            );
        } else {
            assert_eq!(outcome, CedeOutcome::TimedOut);
        }
        assert!(e.dispatched);
        // Now a storm while ceded, with the guest never acking (the VP is away).
        c.model().tima_load(1, 2, 0x810, 2);
        c.model().esb_load(s.number(), true, 0, 8);
        c.model().tima_store(1, 2, 0x11, 1, 0xff);
        while rx.try_recv().is_ok() {}
        let before = c.model().escalation(1).unwrap();
        assert_eq!(c.model().cede(1), Some(false));
        for _ in 0..100 {
            c.model().trigger(s.number());
            c.model().esb_load(s.number(), true, 0, 8); // EOI: the next one forwards
        }
        let after = c.model().escalation(1).unwrap();
        assert_eq!(after.fired, before.fired + 1, "one escalation per cede");
        assert_eq!(after.coalesced, before.coalesced + 99);
        assert!(rx.try_recv().is_err(), "no injection while ceded");
        // A cede with the exception still signalled does not sleep.
        assert_eq!(c.cede(1, Duration::from_secs(60)), CedeOutcome::Signalled);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        assert!(c.model().escalation(1).unwrap().dispatched);
    }

    #[test]
    fn mmio_windows_are_big_endian_and_per_vcpu() {
        let (c, _mem, rx) = chip(2);
        let bus = Bus::new();
        c.attach_mmio(&bus).unwrap();
        route(&c, 1, 1);
        // vCPU 0 sends IPI 1 with a store to its trigger page.
        assert!(bus.write(ESB_BASE + (1 << 13), &[0; 8]).unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        let mut ack = [0u8; 2];
        bus.read(TIMA_BASE + TIMA_STRIDE + 0x2000 + 0x810, &mut ack)
            .unwrap();
        assert_eq!(ack, [0x80, 6]);
        bus.read(TIMA_BASE + 0x2000 + 0x810, &mut ack).unwrap();
        assert_eq!(ack, [0, 0xff], "vCPU 0's own ring is idle");
        let mut pq = [0u8; 8];
        bus.read(ESB_BASE + (1 << 13) + 0x1000 + 0x800, &mut pq)
            .unwrap();
        assert_eq!(pq, [0, 0, 0, 0, 0, 0, 0, 2], "PENDING");
    }
}
