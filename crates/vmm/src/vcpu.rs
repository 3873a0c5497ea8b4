//! The vCPU loop as an explicit state machine, and vCPU state save/restore.
//!
//! States: [`RunState::Ready`] (registers set, never entered) -> `Running` (one KVM_RUN
//! and the handling of its exit per step) -> `Stopped(reason)`. Every exit is handled to
//! completion in [`Vcpu::step`], which returns the next state; nothing else changes it.
//!
//! Run control ([`VcpuControl`], one per VM, shared by all its vCPU threads): a stop
//! request (SIGINT, a device that died, another vCPU that stopped,
//! [`crate::VmHandle::stop`]) or a pause request sets a flag and then kicks every vCPU
//! thread with a signal ([`kick_signal`]). The signal handler sets the interrupted
//! thread's `kvm_run.immediate_exit`, so a kick that lands between the flag check and
//! KVM_RUN still makes KVM_RUN return `EINTR` at once instead of entering the guest (or
//! blocking in the in-kernel LAPIC, as an AP waiting for its SIPI does). The loop clears
//! `immediate_exit` and checks the flags before every entry: on stop it ends with
//! [`StopReason::Interrupted`]; on pause it parks on a condition variable until resumed
//! (or stopped). [`VcpuControl::pause`] returns once every vCPU of the VM is parked, so
//! no vCPU is inside KVM_RUN and the vCPU state can be read or written consistently.
//!
//! Exits: port I/O and MMIO go to the buses (unclaimed reads are all-ones); the
//! debug-exit port ends the VM; a 32-bit write to the hypercall port
//! ([`crate::hypercall::HYPERCALL_PORT`]) is a PAPR hypercall: the registers are read,
//! the call dispatched to the platform's [`Hypercalls`] and the outcome written back
//! before the guest resumes; MSR exits go to the CPU model; #AC and bus-lock exits
//! are explained ([`crate::cpu`]); a KVM emulation failure stops with the guest RIP and the
//! instruction bytes; a triple fault stops with the RIP.

use parking_lot::{Condvar, Mutex, MutexGuard};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::{Bus, BusFault};
use crate::cpu::{self, AcAction, CpuModel, CpuState, HostSplitLockPolicy, SplitLockEvent};
use crate::hypercall::{HcallContext, Hypercalls, HYPERCALL_PORT};

/// Guest/VMM contract: a write to this port ends the VM with the low byte as exit status.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The keyboard controller's command port: 0xFE there is a reset (Linux `reboot=k`).
pub const RESET_PORT: u16 = 0x64;
const RESET_VALUE: u8 = 0xfe;

/// Why the vCPU stopped (not an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote its exit status to the debug-exit port.
    GuestExit(u8),
    /// A stop was requested (SIGINT, `VmHandle::stop`).
    Interrupted,
    /// The guest halted with interrupts off, or asked for power-off.
    Halted,
    /// The guest asked for a reset (0xFE to port 0x64, or a KVM reset event).
    Reset,
}

/// Why the vCPU could not go on.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A device failed on an access (e.g. its process died).
    #[error("{0}; the VM was stopped")]
    Device(#[from] BusFault),
    /// A split-locked access the guest did not ask to see.
    #[error("{0}")]
    SplitLock(String),
    /// Triple fault.
    #[error("the guest triple-faulted (KVM shutdown exit) at RIP {rip:#x}: an exception occurred that the guest could not handle (no IDT yet, or a fault in the handler)")]
    TripleFault {
        /// Guest RIP.
        rip: u64,
    },
    /// KVM could not emulate an instruction.
    #[error("KVM could not emulate the guest instruction at RIP {rip:#x} (bytes {bytes}, internal error suberror {suberror}); this host runs guest code through KVM's instruction emulator, which lacks this instruction: avoid it in the guest")]
    Emulation {
        /// Guest RIP.
        rip: u64,
        /// Instruction bytes, hex.
        bytes: String,
        /// KVM suberror.
        suberror: u32,
    },
    /// KVM_RUN failed.
    #[error("KVM_RUN failed: {0}")]
    Run(kvm_ioctls::Error),
    /// VM entry failed.
    #[error("KVM could not enter the guest (hardware entry failure reason {0:#x}); the initial vCPU state is invalid")]
    FailEntry(u64),
    /// An exit this VMM does not handle.
    #[error("unexpected KVM exit {what} at RIP {rip:#x}")]
    Unexpected {
        /// The exit.
        what: String,
        /// Guest RIP.
        rip: u64,
    },
    /// Reading or writing vCPU state failed.
    #[error("cannot {what} vCPU state: {err}")]
    State {
        /// Operation.
        what: &'static str,
        /// Cause.
        err: kvm_ioctls::Error,
    },
}

/// State of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Set up, not entered yet.
    Ready,
    /// Entering / handling exits.
    Running,
    /// Done (the outcome was returned by `run`).
    Stopped,
}

/// The transition out of one step.
#[derive(Debug)]
pub enum Step {
    /// Stay `Running`.
    Continue,
    /// Go to `Stopped` with this outcome.
    Stop(Result<StopReason, VcpuError>),
}

/// Exit counters (for tests and the benchmark).
#[derive(Debug, Default)]
pub struct ExitStats {
    /// Port I/O exits.
    pub pio: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// MMIO or port reads nobody claimed (answered all-ones).
    pub unclaimed: AtomicU64,
    /// MSR exits.
    pub msr: AtomicU64,
    /// Bus-lock exits.
    pub bus_lock: AtomicU64,
    /// Hypercalls (doorbell writes), whatever their outcome.
    pub hypercall: AtomicU64,
}

/// What a vCPU shares with the rest of the VM.
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// CPU model.
    pub cpu: CpuModel,
    /// Host split-lock policy (for reports).
    pub policy: HostSplitLockPolicy,
    /// Guest memory (for instruction bytes in reports).
    pub mem: GuestMemoryMmap,
    /// Stop and pause requests (shared by every vCPU of the VM).
    pub control: Arc<VcpuControl>,
    /// This vCPU's index (= its local APIC ID; 0 is the boot vCPU).
    pub index: u8,
    /// Counters.
    pub stats: Arc<ExitStats>,
    /// Size of the vCPU's kvm_run mapping (KVM_GET_VCPU_MMAP_SIZE).
    pub run_size: usize,
    /// The platform's hypercall handlers.
    pub hypercalls: Arc<Hypercalls>,
}

/// The saved state of a vCPU, including the CPU model's part.
#[derive(Clone)]
pub struct VcpuSnapshot {
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// FPU / SSE.
    pub fpu: kvm_fpu,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending events.
    pub events: kvm_vcpu_events,
    /// MSRs kept by KVM.
    pub msrs: Vec<kvm_msr_entry>,
    /// MSRs kept by the CPU model (MSR_TEST_CTRL).
    pub cpu: CpuState,
}

/// MSRs that KVM keeps and a snapshot saves.
const SAVED_MSRS: [u32; 11] = [
    0x10,        // IA32_TSC
    0x1b,        // IA32_APIC_BASE
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // FMASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// One vCPU: see the module documentation.
pub struct Vcpu {
    fd: VcpuFd,
    ctx: VcpuContext,
    cpu_state: CpuState,
    state: RunState,
}

enum Deferred {
    None,
    Stop(Result<StopReason, VcpuError>),
    Exception,
    Pio,
    BusLock,
    Internal,
    Shutdown,
    Unexpected(String),
}

impl Vcpu {
    /// A vCPU ready to run.
    pub fn new(fd: VcpuFd, ctx: VcpuContext) -> Self {
        Vcpu {
            fd,
            ctx,
            cpu_state: CpuState::default(),
            state: RunState::Ready,
        }
    }

    /// The KVM vCPU.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The CPU model state (MSR_TEST_CTRL).
    pub fn cpu_state(&self) -> CpuState {
        self.cpu_state
    }

    /// Current state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Run until stopped: `Ready`/`Running` -> step -> ... -> `Stopped`.
    ///
    /// While it runs, a [`kick_signal`] sent to this thread (see [`VcpuControl`]) makes
    /// KVM_RUN return at once.
    pub fn run(&mut self) -> Result<StopReason, VcpuError> {
        self.state = RunState::Running;
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KICK_RUN.with(|c| c.set(run));
        let r = loop {
            if let Step::Stop(r) = self.step() {
                break r;
            }
        };
        KICK_RUN.with(|c| c.set(std::ptr::null_mut()));
        self.state = RunState::Stopped;
        if let Err(e) = &r {
            tracing::warn!(vcpu = self.ctx.index, error = %e, "vCPU stopped with an error");
        }
        r
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// One KVM_RUN and its exit.
    pub fn step(&mut self) -> Step {
        // Clear a kick first, then look at the requests: a kick after this point either
        // finds its flag below or makes the KVM_RUN below return EINTR at once.
        self.fd.set_kvm_immediate_exit(0);
        if self.ctx.control.stop_requested() {
            return Step::Stop(Ok(StopReason::Interrupted));
        }
        let parked = {
            let (fd, cpu_state) = (&self.fd, self.cpu_state);
            self.ctx
                .control
                .park_if_paused_with(self.ctx.index, &|| save_migration(fd, cpu_state))
        };
        if parked {
            return Step::Stop(Ok(StopReason::Interrupted));
        }
        let ctx = &self.ctx;
        let cpu_state = &mut self.cpu_state;
        let deferred = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Deferred::None,
            Err(e) => Deferred::Stop(Err(VcpuError::Run(e))),
            Ok(exit) => match exit {
                VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {
                    ctx.stats.pio.fetch_add(1, Ordering::Relaxed);
                    Deferred::Pio
                }
                VcpuExit::MmioRead(addr, data) => {
                    ctx.stats.mmio.fetch_add(1, Ordering::Relaxed);
                    match ctx.mmio.read(addr, data) {
                        Ok(claimed) => {
                            if !claimed {
                                ctx.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(addr, len = data.len(), "unclaimed MMIO read");
                            }
                            Deferred::None
                        }
                        Err(f) => Deferred::Stop(Err(f.into())),
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    ctx.stats.mmio.fetch_add(1, Ordering::Relaxed);
                    match ctx.mmio.write(addr, data) {
                        Ok(_) => Deferred::None,
                        Err(f) => Deferred::Stop(Err(f.into())),
                    }
                }
                VcpuExit::X86Rdmsr(m) => {
                    ctx.stats.msr.fetch_add(1, Ordering::Relaxed);
                    match ctx.cpu.rdmsr(cpu_state, m.index) {
                        Some(v) => *m.data = v,
                        None => {
                            tracing::debug!(msr = m.index, "guest RDMSR refused with #GP");
                            *m.error = 1;
                        }
                    }
                    Deferred::None
                }
                VcpuExit::X86Wrmsr(m) => {
                    ctx.stats.msr.fetch_add(1, Ordering::Relaxed);
                    if !ctx.cpu.wrmsr(cpu_state, m.index, m.data) {
                        tracing::debug!(
                            msr = m.index,
                            value = m.data,
                            "guest WRMSR refused with #GP"
                        );
                        *m.error = 1;
                    }
                    Deferred::None
                }
                VcpuExit::Hlt => Deferred::Stop(Ok(StopReason::Halted)),
                VcpuExit::Intr => Deferred::None,
                VcpuExit::Shutdown => Deferred::Shutdown,
                VcpuExit::Exception => Deferred::Exception,
                VcpuExit::InternalError => Deferred::Internal,
                VcpuExit::Unsupported(cpu::KVM_EXIT_X86_BUS_LOCK) => Deferred::BusLock,
                VcpuExit::FailEntry(reason, _) => Deferred::Stop(Err(VcpuError::FailEntry(reason))),
                VcpuExit::SystemEvent(..) => Deferred::Stop(Ok(StopReason::Halted)),
                other => Deferred::Unexpected(format!("{other:?}")),
            },
        };
        // A bus lock can also be flagged on any other exit.
        let flags = self.fd.get_kvm_run().flags as u32;
        if flags & kvm_bindings::KVM_RUN_X86_BUS_LOCK != 0 && !matches!(deferred, Deferred::BusLock)
        {
            self.report_bus_lock();
        }
        match deferred {
            Deferred::None => Step::Continue,
            Deferred::Stop(r) => Step::Stop(r),
            Deferred::BusLock => {
                self.report_bus_lock();
                Step::Continue
            }
            Deferred::Exception => self.on_exception(),
            Deferred::Pio => self.on_pio(),
            Deferred::Internal => self.on_internal_error(),
            Deferred::Shutdown => Step::Stop(Err(VcpuError::TripleFault { rip: self.rip() })),
            Deferred::Unexpected(what) => Step::Stop(Err(VcpuError::Unexpected {
                what,
                rip: self.rip(),
            })),
        }
    }

    fn report_bus_lock(&self) {
        self.ctx.stats.bus_lock.fetch_add(1, Ordering::Relaxed);
        let msg = cpu::explain(
            SplitLockEvent::BusLock { rip: self.rip() },
            &self.ctx.policy,
            &self.cpu_state,
        );
        tracing::warn!("{msg}");
        eprintln!("nestio: {msg}");
    }

    /// Port I/O, including string I/O (`rep outsb`): KVM hands `count` accesses of
    /// `size` bytes at `data_offset` in the run page; each goes to the bus separately.
    fn on_pio(&mut self) -> Step {
        let run_size = self.ctx.run_size;
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the active union field.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = io.size as usize;
        let off = io.data_offset as usize;
        let len = size.checked_mul(io.count as usize);
        let fits = len
            .and_then(|l| off.checked_add(l))
            .is_some_and(|end| end <= run_size);
        if !matches!(size, 1 | 2 | 4) || !fits || off < std::mem::size_of::<kvm_bindings::kvm_run>()
        {
            return Step::Stop(Err(VcpuError::Unexpected {
                what: format!(
                    "malformed I/O exit (size {size}, count {}, offset {off})",
                    io.count
                ),
                rip: 0,
            }));
        }
        let len = len.unwrap_or(0);
        let base = run as *mut kvm_bindings::kvm_run as *mut u8;
        // SAFETY: KVM put `len` bytes at `off` inside the kvm_run mapping of `run_size`
        // bytes (checked above, past the kvm_run header); nothing else touches them
        // until the next KVM_RUN.
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(off), len) };
        let port = io.port;
        let out = io.direction as u32 == kvm_bindings::KVM_EXIT_IO_OUT;
        if port == HYPERCALL_PORT {
            if out && size == 4 && io.count == 1 {
                return self.on_hypercall();
            }
            if !out {
                data.fill(0xff);
            }
            tracing::debug!(
                size,
                count = io.count,
                out,
                "access to the hypercall port that is not a 32-bit write: ignored"
            );
            return Step::Continue;
        }
        for chunk in data.chunks_mut(size) {
            if out {
                if port == DEBUG_EXIT_PORT {
                    return Step::Stop(Ok(StopReason::GuestExit(chunk[0])));
                }
                if port == RESET_PORT && chunk[0] == RESET_VALUE {
                    return Step::Stop(Ok(StopReason::Reset));
                }
                if let Err(f) = self.ctx.pio.write(port as u64, chunk) {
                    return Step::Stop(Err(f.into()));
                }
            } else {
                match self.ctx.pio.read(port as u64, chunk) {
                    Ok(true) => {}
                    Ok(false) => {
                        self.ctx.stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(f) => return Step::Stop(Err(f.into())),
                }
            }
        }
        Step::Continue
    }

    /// A doorbell write: the call is in the registers (see [`crate::hypercall`]).
    fn on_hypercall(&mut self) -> Step {
        self.ctx.stats.hypercall.fetch_add(1, Ordering::Relaxed);
        let mut regs = match self.fd.get_regs() {
            Ok(r) => r,
            Err(err) => return Step::Stop(Err(VcpuError::State { what: "read", err })),
        };
        let ctx = HcallContext::new(&self.ctx.mem, u32::from(self.ctx.index));
        self.ctx.hypercalls.dispatch_regs(&ctx, &mut regs);
        match self.fd.set_regs(&regs) {
            Ok(()) => Step::Continue,
            Err(err) => Step::Stop(Err(VcpuError::State { what: "write", err })),
        }
    }

    fn on_exception(&mut self) -> Step {
        // SAFETY: the exit reason is KVM_EXIT_EXCEPTION, so `ex` is the active union field.
        let ex = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.ex };
        let rip = self.rip();
        if ex.exception != cpu::AC_VECTOR {
            return Step::Stop(Err(VcpuError::Unexpected {
                what: format!(
                    "exception vector {} (error code {:#x})",
                    ex.exception, ex.error_code
                ),
                rip,
            }));
        }
        match cpu::on_alignment_check(&self.cpu_state, rip, ex.error_code, &self.ctx.policy) {
            AcAction::Stop(msg) => Step::Stop(Err(VcpuError::SplitLock(msg))),
            AcAction::InjectIntoGuest => {
                let mut ev = match self.fd.get_vcpu_events() {
                    Ok(e) => e,
                    Err(err) => return Step::Stop(Err(VcpuError::State { what: "read", err })),
                };
                ev.exception.injected = 1;
                ev.exception.nr = cpu::AC_VECTOR as u8;
                ev.exception.has_error_code = 1;
                ev.exception.error_code = ex.error_code;
                match self.fd.set_vcpu_events(&ev) {
                    Ok(()) => Step::Continue,
                    Err(err) => Step::Stop(Err(VcpuError::State { what: "write", err })),
                }
            }
        }
    }

    fn on_internal_error(&mut self) -> Step {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is active.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let rip = self.rip();
        let mut bytes = [0u8; 15];
        let phys = self
            .fd
            .translate_gva(rip)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| t.physical_address)
            .unwrap_or(rip);
        let text = match self.ctx.mem.read_slice(&mut bytes, GuestAddress(phys)) {
            Ok(()) => bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
            Err(_) => "unreadable".into(),
        };
        Step::Stop(Err(VcpuError::Emulation {
            rip,
            bytes: text,
            suberror,
        }))
    }

    /// Save the vCPU state (KVM's part and the CPU model's).
    pub fn save(&self) -> Result<VcpuSnapshot, VcpuError> {
        let e = |err| VcpuError::State { what: "save", err };
        let mut msrs = Msrs::from_entries(
            &SAVED_MSRS
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|_| VcpuError::State {
            what: "save",
            err: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let n = self.fd.get_msrs(&mut msrs).map_err(e)?;
        Ok(VcpuSnapshot {
            regs: self.fd.get_regs().map_err(e)?,
            sregs: self.fd.get_sregs().map_err(e)?,
            fpu: self.fd.get_fpu().map_err(e)?,
            lapic: self.fd.get_lapic().map_err(e)?,
            events: self.fd.get_vcpu_events().map_err(e)?,
            msrs: msrs.as_slice()[..n.min(msrs.as_slice().len())].to_vec(),
            cpu: self.cpu_state,
        })
    }

    /// Restore a saved state (the vCPU becomes `Ready`).
    pub fn restore(&mut self, s: &VcpuSnapshot) -> Result<(), VcpuError> {
        let e = |err| VcpuError::State {
            what: "restore",
            err,
        };
        self.fd.set_sregs(&s.sregs).map_err(e)?;
        self.fd.set_regs(&s.regs).map_err(e)?;
        self.fd.set_fpu(&s.fpu).map_err(e)?;
        self.fd.set_lapic(&s.lapic).map_err(e)?;
        let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VcpuError::State {
            what: "restore",
            err: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        self.fd.set_msrs(&msrs).map_err(e)?;
        self.fd.set_vcpu_events(&s.events).map_err(e)?;
        self.cpu_state = s.cpu;
        self.state = RunState::Ready;
        Ok(())
    }
}

/// The complete architectural state of one vCPU, as live migration moves it: every
/// register file KVM exposes, the LAPIC, pending events, the multiprocessing state and
/// every MSR KVM can save (the list is the host's `KVM_GET_MSR_INDEX_LIST`, taken by
/// [`set_migration_msrs`]), plus the CPU model's own MSR state.
#[derive(Default)]
pub struct VcpuMigState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU / SSE / AVX state in XSAVE layout (`KVM_GET_XSAVE`).
    pub xsave: kvm_bindings::kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_bindings::kvm_xcrs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMI, SMM.
    pub events: kvm_vcpu_events,
    /// Running, halted, or waiting for INIT/SIPI.
    pub mp_state: kvm_bindings::kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_bindings::kvm_debugregs,
    /// MSRs kept by KVM.
    pub msrs: Vec<kvm_msr_entry>,
    /// MSRs kept by the CPU model (MSR_TEST_CTRL).
    pub cpu: CpuState,
}

static MIGRATION_MSRS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();

/// Record the MSRs a migration saves (the host's `KVM_GET_MSR_INDEX_LIST`); called once
/// per process by [`crate::Vm::new`]. Without it the snapshot list is used.
pub fn set_migration_msrs(list: &[u32]) {
    let _ = MIGRATION_MSRS.set(list.to_vec());
}

fn migration_msr_list() -> Vec<u32> {
    let mut l = MIGRATION_MSRS
        .get()
        .cloned()
        .unwrap_or_else(|| SAVED_MSRS.to_vec());
    // The TSC first: KVM computes the TSC deadline and offsets relative to it.
    l.sort_by_key(|&m| (m != 0x10, m));
    l.dedup();
    l
}

/// KVM_GET_MSRS stops at the first MSR it cannot read: read the list in pieces, skipping
/// each refused MSR.
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let mut msrs = Msrs::from_entries(
            &chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|_| VcpuError::State {
            what: "save",
            err: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|err| VcpuError::State { what: "save", err })?
            .min(chunk.len());
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Entry n (if any) was refused: skip it.
        let skip = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[skip..];
    }
    Ok(out)
}

/// Save the full state of the vCPU behind `fd` (see [`VcpuMigState`]).
pub(crate) fn save_migration(fd: &VcpuFd, cpu: CpuState) -> Result<VcpuMigState, VcpuError> {
    let e = |err| VcpuError::State { what: "save", err };
    Ok(VcpuMigState {
        regs: fd.get_regs().map_err(e)?,
        sregs: fd.get_sregs().map_err(e)?,
        xsave: fd.get_xsave().map_err(e)?,
        xcrs: fd.get_xcrs().map_err(e)?,
        lapic: fd.get_lapic().map_err(e)?,
        events: fd.get_vcpu_events().map_err(e)?,
        mp_state: fd.get_mp_state().map_err(e)?,
        debugregs: fd.get_debug_regs().map_err(e)?,
        msrs: read_msrs(fd, &migration_msr_list())?,
        cpu,
    })
}

impl Vcpu {
    /// Save the full state for migration (when not running; a running VM's vCPUs are
    /// saved on their own threads by [`VcpuControl::capture`]).
    pub fn save_migration(&self) -> Result<VcpuMigState, VcpuError> {
        save_migration(&self.fd, self.cpu_state)
    }

    /// Load a migrated state (before the VM runs). The order follows KVM's
    /// dependencies: special registers (mode) before general ones, the MSRs (the TSC
    /// first) before the LAPIC (its deadline timer), events and MP state last.
    pub fn restore_migration(&mut self, s: &VcpuMigState) -> Result<(), VcpuError> {
        let e = |err| VcpuError::State {
            what: "restore",
            err,
        };
        self.fd.set_sregs(&s.sregs).map_err(e)?;
        self.fd.set_regs(&s.regs).map_err(e)?;
        // SAFETY: `xsave` is a full `kvm_xsave` buffer as KVM_GET_XSAVE returns it (the
        // legacy 4 KiB layout); KVM validates its contents.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(e)?;
        self.fd.set_xcrs(&s.xcrs).map_err(e)?;
        let msrs = Msrs::from_entries(&s.msrs).map_err(|_| VcpuError::State {
            what: "restore",
            err: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = self.fd.set_msrs(&msrs).map_err(e)?;
        if n != s.msrs.len() {
            let refused = s.msrs.get(n).map(|m| m.index).unwrap_or(0);
            return Err(VcpuError::State {
                what: "restore (MSR refused by this host's KVM)",
                err: kvm_ioctls::Error::new(libc::EINVAL),
            })
            .inspect_err(|_| tracing::warn!(msr = refused, "migrated MSR refused"));
        }
        self.fd.set_lapic(&s.lapic).map_err(e)?;
        self.fd.set_debug_regs(&s.debugregs).map_err(e)?;
        self.fd.set_vcpu_events(&s.events).map_err(e)?;
        self.fd.set_mp_state(s.mp_state).map_err(e)?;
        self.cpu_state = s.cpu;
        self.state = RunState::Ready;
        Ok(())
    }
}

thread_local! {
    /// The kvm_run page of the vCPU this thread runs (null when none): the kick signal
    /// handler sets its `immediate_exit`.
    static KICK_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialised thread-local without destructor is a plain TLS slot: safe to
    // read in a signal handler.
    let run = KICK_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: `run` is this thread's vCPU kvm_run mapping, set by `Vcpu::run` for as
        // long as the vCPU (which owns the mapping) runs on this thread; a one-byte
        // volatile store is what KVM expects of a signal handler (immediate_exit).
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The real-time signal that kicks a vCPU thread out of KVM_RUN (`SIGRTMIN + 2`).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

/// Install the kick signal's handler (once per process).
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            tracing::warn!(error = %e, "cannot install the vCPU kick signal handler");
        }
    });
}

/// Why [`VcpuControl::pause`] did not pause the VM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    /// No vCPU thread is running (the VM has not started or has ended).
    #[error("the VM is not running: start it with Vm::run before pausing it")]
    NotRunning,
    /// The VM stopped while the pause was pending.
    #[error("the VM stopped while it was being paused")]
    Stopped,
    /// Some vCPU did not park in time (the pause was withdrawn).
    #[error("{parked} of {active} vCPUs parked within {waited:?}; the pause was withdrawn (a vCPU thread may be stuck in a device access): try again")]
    Timeout {
        /// vCPUs parked.
        parked: usize,
        /// vCPUs running.
        active: usize,
        /// How long `pause` waited.
        waited: Duration,
    },
}

/// Why [`VcpuControl::capture`] returned no state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaptureError {
    /// The VM is not paused (pause it first), or stopped meanwhile.
    #[error(
        "the vCPUs are not all paused (or the VM stopped): pause the VM before saving its vCPUs"
    )]
    NotPaused,
    /// Some vCPU did not answer in time.
    #[error("the vCPUs did not save their state within {0:?}")]
    Timeout(Duration),
    /// A vCPU could not read its state.
    #[error("vCPU {index} could not save its state: {error}")]
    Vcpu {
        /// vCPU index.
        index: usize,
        /// What failed.
        error: String,
    },
}

#[derive(Default)]
struct Parking {
    /// vCPU threads started and not yet finished.
    active: usize,
    /// vCPU threads parked by a pause.
    parked: usize,
    /// Registered vCPU threads (to kick).
    threads: Vec<libc::pthread_t>,
    /// Generation of the latest capture request ([`VcpuControl::capture`]).
    capture_gen: u64,
    /// Per vCPU index: the state saved for the latest capture request.
    captured: Vec<Option<Result<VcpuMigState, String>>>,
}

/// Stop / pause / resume of all the vCPUs of one VM: see the module documentation.
#[derive(Default)]
pub struct VcpuControl {
    stop: AtomicBool,
    pause: AtomicBool,
    parking: Mutex<Parking>,
    cv: Condvar,
}

impl VcpuControl {
    /// A control with nothing requested.
    pub fn new() -> Arc<Self> {
        Arc::new(VcpuControl::default())
    }

    fn lock(&self) -> MutexGuard<'_, Parking> {
        // A vCPU thread that panicked leaves plain counters behind: still usable.
        self.parking.lock()
    }

    /// True once a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Ask every vCPU to stop: sets the flag, wakes parked vCPUs and kicks the others.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Taking the lock orders the store before a parked vCPU's re-check.
        drop(self.lock());
        self.cv.notify_all();
        self.kick_all();
    }

    /// Send the kick signal to every registered vCPU thread.
    pub fn kick_all(&self) {
        let p = self.lock();
        for &t in &p.threads {
            // SAFETY: `t` is a live thread: vCPU threads deregister (under this lock)
            // before they end; the kick signal's handler is installed by the VM first.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Called by the VM before it starts `n` vCPU threads.
    pub fn begin(&self, n: usize) {
        let mut p = self.lock();
        p.active = n;
        p.parked = 0;
        p.threads.clear();
    }

    /// Called on a vCPU thread before it runs: registers the thread for kicks.
    pub fn enter(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().threads.push(me);
    }

    /// Called on a vCPU thread when its vCPU has stopped.
    pub fn leave(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut p = self.lock();
        p.threads.retain(|&t| t != me);
        p.active = p.active.saturating_sub(1);
        drop(p);
        self.cv.notify_all();
    }

    /// On a vCPU thread: park while a pause is requested, saving this vCPU's state for
    /// every capture request ([`Self::capture`]) that arrives while parked. Returns true
    /// if a stop was requested meanwhile (the vCPU then stops).
    fn park_if_paused_with(
        &self,
        index: u8,
        save: &dyn Fn() -> Result<VcpuMigState, VcpuError>,
    ) -> bool {
        if !self.pause.load(Ordering::SeqCst) {
            return false;
        }
        let mut p = self.lock();
        p.parked += 1;
        self.cv.notify_all();
        let mut served = 0u64;
        while self.pause.load(Ordering::SeqCst) && !self.stop_requested() {
            if p.capture_gen != served {
                served = p.capture_gen;
                let r = save().map_err(|e| e.to_string());
                let slot = usize::from(index);
                if p.captured.len() <= slot {
                    p.captured.resize_with(slot + 1, || None);
                }
                p.captured[slot] = Some(r);
                self.cv.notify_all();
                continue;
            }
            self.cv.wait(&mut p);
        }
        p.parked -= 1;
        drop(p);
        self.cv.notify_all();
        self.stop_requested()
    }

    /// Pause every vCPU: returns once all running vCPUs are out of KVM_RUN and parked
    /// (their registers, LAPIC and the guest RAM are then stable until [`Self::resume`]).
    /// Waits at most `timeout`; on failure the pause is withdrawn.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        let start = Instant::now();
        let mut p = self.lock();
        if p.active == 0 {
            return Err(PauseError::NotRunning);
        }
        self.pause.store(true, Ordering::SeqCst);
        loop {
            if self.stop_requested() || p.active == 0 {
                self.pause.store(false, Ordering::SeqCst);
                return Err(PauseError::Stopped);
            }
            if p.parked == p.active {
                tracing::debug!(vcpus = p.active, waited = ?start.elapsed(), "VM paused");
                return Ok(());
            }
            let waited = start.elapsed();
            if waited >= timeout {
                let (parked, active) = (p.parked, p.active);
                self.pause.store(false, Ordering::SeqCst);
                drop(p);
                self.cv.notify_all();
                return Err(PauseError::Timeout {
                    parked,
                    active,
                    waited,
                });
            }
            for &t in &p.threads {
                // SAFETY: as in `kick_all` (the lock is held, so `t` is live).
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
            let slice = (timeout - waited).min(Duration::from_millis(20));
            self.cv.wait_for(&mut p, slice);
        }
    }

    /// While paused ([`Self::pause`]): have every parked vCPU save its full state
    /// ([`VcpuMigState`]) on its own thread, and return the states by vCPU index. Waits
    /// at most `timeout`. The vCPUs stay parked.
    pub fn capture(&self, timeout: Duration) -> Result<Vec<VcpuMigState>, CaptureError> {
        let start = Instant::now();
        let mut p = self.lock();
        if !self.pause.load(Ordering::SeqCst) || p.parked != p.active || p.active == 0 {
            return Err(CaptureError::NotPaused);
        }
        let n = p.active;
        p.capture_gen += 1;
        p.captured.clear();
        p.captured.resize_with(n, || None);
        self.cv.notify_all();
        loop {
            if p.captured.iter().filter(|c| c.is_some()).count() >= n {
                break;
            }
            if self.stop_requested() || !self.pause.load(Ordering::SeqCst) {
                return Err(CaptureError::NotPaused);
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(CaptureError::Timeout(waited));
            }
            self.cv.wait_for(&mut p, timeout - waited);
        }
        let mut out = Vec::with_capacity(n);
        for (i, c) in p.captured.drain(..).enumerate() {
            match c {
                Some(Ok(s)) => out.push(s),
                Some(Err(e)) => return Err(CaptureError::Vcpu { index: i, error: e }),
                None => return Err(CaptureError::Timeout(start.elapsed())),
            }
        }
        Ok(out)
    }

    /// Let paused vCPUs run again (no effect when not paused).
    pub fn resume(&self) {
        let _p = self.lock();
        self.pause.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// True while a pause is requested or in force.
    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    /// Number of vCPUs parked right now.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }
}
