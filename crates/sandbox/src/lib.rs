//! seccomp sandboxing for nestio's processes, as Firecracker and Cloud Hypervisor do it:
//! once set-up is done (sockets bound, KVM VM created, devices connected), a process
//! may only make the system calls its work needs, with the arguments it needs.
//!
//! # Design
//!
//! - **Allowlists** ([`Profile`], in `filters.rs`) are compiled to classic BPF with the
//!   rust-vmm `seccompiler` crate. A call outside the list hits the *mismatch action*.
//! - **Modes** ([`Mode`], `--seccomp=on|log|off`): `on` (the default) traps
//!   (`SECCOMP_RET_TRAP`): the kernel sends SIGSYS, whose handler writes one line naming
//!   the call — `nestio: system call 59 (execve) blocked by nestio's seccomp sandbox
//!   (device filter); rerun with --seccomp=log to find it` — with `write(2)` only and
//!   ends the process with `_exit(`[`BLOCKED_EXIT_STATUS`]`)`. The handler is
//!   async-signal-safe: no allocation, no locks, only `write` and `exit_group`, which
//!   every profile allows. `log` allows every call but has the kernel log the ones
//!   outside the list (`SECCOMP_RET_LOG`: audit records `type=1326` in `dmesg` or the
//!   audit log name the `syscall=` number), for finding what a new code path needs.
//!   `off` installs nothing.
//! - **Process-wide and per-thread**: [`Sandbox::install_process`] installs a filter on
//!   every thread of the process at once (`SECCOMP_FILTER_FLAG_TSYNC`) — for threads
//!   that already exist, such as the e1000 worker or a vfio-user client's twin-socket
//!   thread — and every thread started later inherits it. [`Sandbox::install_thread`]
//!   installs a filter on the calling thread only; installed on top of the process-wide
//!   one, it narrows it (the kernel runs every filter of a thread and the strictest
//!   answer wins). Because TSYNC refuses to run once any thread has a filter of its own,
//!   the process-wide filter comes first.
//! - `nestio device` installs [`Profile::Device`] process-wide after binding its
//!   socket. `nestio run` installs [`Profile::Vmm`] process-wide after set-up; then its
//!   vCPU thread, control loop, serial input pump and export threads each narrow it
//!   with their own profile as they start (through `nestio_vmm::ThreadHook`).
//!
//! Threads started after the filter inherit it, so they need what starting a thread
//! needs (`clone` with `CLONE_THREAD`, `set_robust_list`, `rseq`, `mmap`, `mprotect`
//! of the stack guard); `clone3`, whose flags BPF cannot read, fails with ENOSYS
//! ([`compile_no_clone3`]) so that glibc falls back to the checked `clone`. No profile allows `execve`, `ptrace`, credential
//! changes, `socket`/`connect`/`bind`, or executable mappings.
//!
//! x86-64 only (like the VMM); on other architectures installing reports
//! [`SandboxError::Unsupported`] and the CLI says to use `--seccomp=off`.

mod filters;
pub mod names;
mod trap;
mod user;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

pub use filters::{Profile, KVMIO};
pub use seccompiler::BpfProgram;
use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
pub use user::{User, UserError};

/// The exit status of a process ended by a blocked system call: 128 + SIGSYS, as a
/// shell reports a process killed by SIGSYS.
pub const BLOCKED_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// The text every blocked-call message contains (tests look for it).
pub const BLOCKED_MESSAGE: &str = "blocked by nestio's seccomp sandbox";

/// What the sandbox does with a call outside the allowlist (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Trap: report the call by name and end the process (the default).
    #[default]
    On,
    /// Allow it, but have the kernel log it (to find what a code path needs).
    Log,
    /// No filter at all.
    Off,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!(
                "seccomp mode '{s}' is not one of on (trap forbidden calls, the default), \
                 log (allow them but log them in the kernel log) or off"
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::On => "on",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// An argument rule is malformed (a bug in the allowlist).
    #[error("seccomp rule of the allowlist is malformed: {0}")]
    Rule(seccompiler::BackendError),
    /// The allowlist does not compile to BPF (a bug in the allowlist).
    #[error("the {profile} seccomp filter does not compile: {source}")]
    Compile {
        /// The profile.
        profile: &'static str,
        /// seccompiler's reason.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error(
        "cannot install the {profile} seccomp filter: {source} (a kernel without \
         seccomp filters, or a container that forbids them: run with --seccomp=off)"
    )]
    Install {
        /// The profile.
        profile: &'static str,
        /// The kernel's answer.
        source: seccompiler::Error,
    },
    /// Another thread already has a filter of its own, so TSYNC cannot cover it.
    #[error(
        "cannot install the {profile} seccomp filter on every thread: thread {tid} already \
         has a filter of its own (the process-wide filter must come before per-thread ones)"
    )]
    ThreadSync {
        /// The profile.
        profile: &'static str,
        /// The thread that could not be synchronised.
        tid: i64,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler of the seccomp sandbox: {0}")]
    Handler(std::io::Error),
    /// `--user` could not be resolved or switched to.
    #[error(transparent)]
    User(#[from] UserError),
    /// This architecture has no allowlists.
    #[error("the seccomp sandbox has allowlists for x86-64 only, not {0}: run with --seccomp=off")]
    Unsupported(&'static str),
}

/// The BPF program of `profile` in `mode` (`None` for [`Mode::Off`]).
pub fn compile(profile: Profile, mode: Mode) -> Result<Option<BpfProgram>, SandboxError> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::On => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    if std::env::consts::ARCH != "x86_64" {
        return Err(SandboxError::Unsupported(std::env::consts::ARCH));
    }
    let filter = SeccompFilter::new(
        profile.rules()?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SandboxError::Compile {
        profile: profile.name(),
        source,
    })?;
    let prog: BpfProgram = filter.try_into().map_err(|source| SandboxError::Compile {
        profile: profile.name(),
        source,
    })?;
    Ok(Some(prog))
}

/// The companion filter of every allowlist: `clone3` fails with ENOSYS. Its flags sit
/// in a struct that BPF cannot read, so the allowlists cannot tell a thread from a new
/// process there; refused, glibc falls back to `clone`, whose flags the allowlists check
/// (`CLONE_THREAD` only). (An allowlist must still allow `clone3`: the kernel takes the
/// strictest answer of all filters, and its trap would beat this errno.)
pub fn compile_no_clone3() -> Result<BpfProgram, SandboxError> {
    if std::env::consts::ARCH != "x86_64" {
        return Err(SandboxError::Unsupported(std::env::consts::ARCH));
    }
    let compile_err = |source| SandboxError::Compile {
        profile: "clone3",
        source,
    };
    let filter = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(compile_err)?;
    filter.try_into().map_err(compile_err)
}

/// Whether [`Sandbox::install_process`] has installed the `clone3` filter every thread
/// inherits (then [`Sandbox::install_thread`] does not add it again).
static PROCESS_FILTERED: AtomicBool = AtomicBool::new(false);

/// The sandbox of one process: its mode, and the installers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sandbox {
    mode: Mode,
}

impl Sandbox {
    /// A sandbox in `mode`.
    pub fn new(mode: Mode) -> Self {
        Sandbox { mode }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Install `profile` on every thread of this process (TSYNC); threads started later
    /// inherit it. Call once, after set-up and before any [`Sandbox::install_thread`].
    pub fn install_process(&self, profile: Profile) -> Result<(), SandboxError> {
        let Some(prog) = compile(profile, self.mode)? else {
            return Ok(());
        };
        trap::prepare(self.mode, Some(profile))?;
        let sync_err = |source| match source {
            seccompiler::Error::ThreadSync(tid) => SandboxError::ThreadSync {
                profile: profile.name(),
                tid,
            },
            source => SandboxError::Install {
                profile: profile.name(),
                source,
            },
        };
        seccompiler::apply_filter_all_threads(&compile_no_clone3()?).map_err(sync_err)?;
        seccompiler::apply_filter_all_threads(&prog).map_err(sync_err)?;
        PROCESS_FILTERED.store(true, Ordering::SeqCst);
        tracing::info!(profile = profile.name(), mode = %self.mode, "seccomp filter installed on every thread");
        Ok(())
    }

    /// Install `profile` on the calling thread only (narrowing any filter it has).
    pub fn install_thread(&self, profile: Profile) -> Result<(), SandboxError> {
        let Some(prog) = compile(profile, self.mode)? else {
            return Ok(());
        };
        trap::prepare(self.mode, None)?;
        let err = |source| SandboxError::Install {
            profile: profile.name(),
            source,
        };
        if !PROCESS_FILTERED.load(Ordering::SeqCst) {
            seccompiler::apply_filter(&compile_no_clone3()?).map_err(err)?;
        }
        seccompiler::apply_filter(&prog).map_err(err)?;
        trap::set_thread_profile(profile);
        tracing::debug!(profile = profile.name(), mode = %self.mode, "seccomp filter installed on this thread");
        Ok(())
    }

    /// [`Sandbox::install_thread`] for a thread that has no way to report an error: a
    /// thread that cannot be confined must not run unconfined, so on failure this prints
    /// the reason and ends the process.
    pub fn confine_thread_or_exit(&self, profile: Profile) {
        if let Err(e) = self.install_thread(profile) {
            eprintln!("nestio: error: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests;
