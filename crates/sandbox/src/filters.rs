//! The allowlists, built from what the code really calls (measured with `strace -f` on
//! the demo, `nestio device sample|e1000` with a client, `nestio run` with guest
//! payloads, the Linux guest and nested levels; see the crate documentation).
//!
//! Each [`Profile`] is a union of small named groups, so the difference between two
//! profiles is visible here rather than in two long lists. Argument filters are kept
//! where they are cheap and meaningful:
//! - `mmap` / `mprotect` never with `PROT_EXEC` (no new code after set-up);
//! - `ioctl` only `FIONBIO`/`FIOCLEX`/`FIONCLEX` everywhere (std's `set_nonblocking`),
//!   KVM requests (type byte `KVMIO`, 0xAE) in the VMM, and a handful of terminal
//!   requests where the raw-mode console is restored: no VFIO, no network or block
//!   device ioctls;
//! - `rt_sigaction` for any signal but SIGSYS (the blocked-call report cannot be
//!   replaced), and only where dispositions change after set-up;
//! - `fcntl` only the descriptor-flag, dup and seal commands the code uses;
//! - `clone` only with `CLONE_THREAD` (threads, never a new process); `clone3` is
//!   answered ENOSYS by a companion filter (`compile_no_clone3`), so glibc uses `clone`;
//! - `openat` never with `O_CREAT`/`O_TRUNC`/`O_APPEND` (the device reopens a peer's
//!   file privately through `/proc/self/fd` and reads `/proc/self/fdinfo`; it creates
//!   nothing);
//! - `setsockopt` / `getsockopt` only at `SOL_SOCKET` level; `socketpair` only
//!   `AF_UNIX` (the twin socket of a vfio-user session); no `socket`, `connect` or
//!   `bind` at all after set-up.
//!
//! Nothing lets a sandboxed process start a program (`execve`), trace another
//! (`ptrace`), change its credentials, load modules or mount anything.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::SandboxError;

/// Which allowlist: one per process kind and per VMM thread role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Profile {
    /// `nestio device`: every thread of the device process (installed process-wide
    /// after the socket is bound: the server threads, the e1000 worker).
    Device,
    /// `nestio run`: every thread of the VMM process (installed process-wide after
    /// set-up: vfio-user client threads, INTx resample threads, and the base of every
    /// thread started later).
    Vmm,
    /// A vCPU thread (on top of [`Profile::Vmm`]).
    Vcpu,
    /// The VMM's control loop: the main thread once the vCPU runs, until exit.
    Control,
    /// The serial console's input pump.
    SerialInput,
    /// A level's export threads (the vfio-user server for the child level and the RAM
    /// handoff socket).
    Export,
}

impl Profile {
    /// Every profile (for tests and documentation).
    pub const ALL: [Profile; 6] = [
        Profile::Device,
        Profile::Vmm,
        Profile::Vcpu,
        Profile::Control,
        Profile::SerialInput,
        Profile::Export,
    ];

    /// The profile's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Device => "device",
            Profile::Vmm => "vmm",
            Profile::Vcpu => "vcpu",
            Profile::Control => "control",
            Profile::SerialInput => "serial-input",
            Profile::Export => "export",
        }
    }

    /// Whether this profile narrows a thread of a process that already runs under
    /// [`Profile::Vmm`] (its calls must be a subset of it; checked by a test).
    pub fn is_vmm_thread(self) -> bool {
        !matches!(self, Profile::Device | Profile::Vmm)
    }

    /// The profile's groups of allowed calls.
    fn groups(self) -> &'static [Group] {
        use Group::*;
        match self {
            Profile::Device => &[
                Base,
                Threads,
                PeerSockets,
                Accept,
                Files,
                OpenNoCreate,
                Signals,
                PostedRing,
            ],
            Profile::Vmm => &[
                Base,
                Threads,
                PeerSockets,
                Accept,
                Files,
                OpenNoCreate,
                Kvm,
                Terminal,
                Eventfds,
                Signals,
                Unlink,
                Narrowing,
                PostedRing,
            ],
            Profile::Vcpu => &[Base, Threads, PeerSockets, Files, Kvm, Eventfds],
            Profile::Control => &[Base, PeerSockets, Kvm, Terminal, Signals, Unlink],
            Profile::SerialInput => &[Base, Kvm],
            Profile::Export => &[
                Base,
                Threads,
                PeerSockets,
                Accept,
                Files,
                OpenNoCreate,
                PostedRing,
            ],
        }
    }

    /// The allowlist: syscall number -> rules (an empty rule list allows every call of
    /// it; otherwise a call is allowed when any rule matches).
    pub fn rules(self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
        let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
        for g in self.groups() {
            for (nr, conds) in g.calls() {
                let entry = map.entry(nr).or_insert_with(|| Some(Vec::new()));
                match (entry.as_mut(), conds) {
                    // Already unconditional: stays so.
                    (None, _) => {}
                    // Unconditional in this group: the whole call is allowed.
                    (Some(_), None) => *entry = None,
                    (Some(rules), Some(alternatives)) => {
                        for conds in alternatives {
                            rules.push(rule(conds)?);
                        }
                    }
                }
            }
        }
        // A call listed with conditions only keeps them; `None` becomes "no rules" =
        // unconditional in seccompiler's terms.
        Ok(map
            .into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect())
    }

    /// The syscall numbers this profile allows (with or without argument rules).
    pub fn syscalls(self) -> Vec<i64> {
        let mut v: Vec<i64> = self
            .groups()
            .iter()
            .flat_map(|g| g.calls().into_iter().map(|(nr, _)| nr))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// One argument comparison: (argument index, operator).
type Cond = (u8, SeccompCmpOp, u64);

/// `None`: the call is allowed whatever its arguments; `Some(alternatives)`: allowed
/// when all conditions of one alternative hold.
type Calls = Vec<(i64, Option<Vec<Vec<Cond>>>)>;

fn rule(conds: Vec<Cond>) -> Result<SeccompRule, SandboxError> {
    let conds = conds
        .into_iter()
        .map(|(arg, op, value)| SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value))
        .collect::<Result<Vec<_>, _>>()
        .map_err(SandboxError::Rule)?;
    SeccompRule::new(conds).map_err(SandboxError::Rule)
}

/// Named groups of calls.
#[derive(Debug, Clone, Copy)]
enum Group {
    /// What any thread of a Rust program does: memory, futexes, time, reading and
    /// writing fds it holds, polling, leaving, and the SIGSYS report itself.
    Base,
    /// Starting threads (clone with CLONE_THREAD only) and what a new thread does first.
    Threads,
    /// vfio-user peers: messages with fds on connected UNIX sockets.
    PeerSockets,
    /// Accepting connections on a socket bound during set-up.
    Accept,
    /// Inspecting and accessing files a peer passed (DMA maps by fd).
    Files,
    /// Reopening a peer's file privately (`/proc/self/fd/N`), reading `/proc/self/...`.
    OpenNoCreate,
    /// KVM ioctls (vCPU run and state, irqfd, ioeventfd, memory slots, GSI routes).
    Kvm,
    /// The raw-mode console: terminal ioctls.
    Terminal,
    /// Creating eventfds (MSI vectors enabled at run time).
    Eventfds,
    /// Signal dispositions (SIGINT handler, the vCPU kick signal, a device's write
    /// watchdog), never SIGSYS's.
    Signals,
    /// Removing the level's own socket files on exit.
    Unlink,
    /// A vfio-user server's posted-write ring (`nestio_vfio_user::posted_ring`), made
    /// per session: a close-on-exec sealable memfd, sized by `pwrite` (no `ftruncate`,
    /// which could shrink a peer's file), sealed with exactly the ring's seals, and a
    /// non-blocking kick eventfd.
    PostedRing,
    /// A thread adding its own, narrower filter (what seccompiler's install does:
    /// `PR_SET_NO_NEW_PRIVS`, then `seccomp(SECCOMP_SET_MODE_FILTER)`). A filter can
    /// only take rights away, so this widens nothing.
    Narrowing,
}

fn any(nrs: &[i64]) -> Calls {
    nrs.iter().map(|&nr| (nr, None)).collect()
}

/// `arg & mask == 0`.
fn none_of(arg: u8, mask: u64) -> Cond {
    (arg, SeccompCmpOp::MaskedEq(mask), 0)
}

fn eq(arg: u8, value: u64) -> Cond {
    (arg, SeccompCmpOp::Eq, value)
}

/// KVM's ioctl type byte (`KVMIO`).
pub const KVMIO: u64 = 0xAE;

impl Group {
    fn calls(self) -> Calls {
        use libc::*;
        let no_exec = || Some(vec![vec![none_of(2, PROT_EXEC as u64)]]);
        match self {
            Group::Base => {
                let mut v = any(&[
                    SYS_read,
                    SYS_write,
                    SYS_readv,
                    SYS_writev,
                    SYS_close,
                    SYS_futex,
                    SYS_exit,
                    SYS_exit_group,
                    SYS_rt_sigreturn,
                    SYS_rt_sigprocmask,
                    SYS_sigaltstack,
                    SYS_munmap,
                    SYS_brk,
                    SYS_mremap,
                    SYS_clock_gettime,
                    SYS_clock_nanosleep,
                    SYS_nanosleep,
                    SYS_sched_yield,
                    SYS_sched_getaffinity,
                    SYS_gettid,
                    SYS_getpid,
                    SYS_getrandom,
                    SYS_poll,
                    SYS_ppoll,
                    SYS_restart_syscall,
                    // panic = abort and `std::process::abort` raise SIGABRT at themselves.
                    SYS_tgkill,
                    // Who am I (a peer-uid policy compares SO_PEERCRED with these).
                    SYS_getuid,
                    SYS_geteuid,
                    SYS_getgid,
                    SYS_getegid,
                ]);
                // std's set_nonblocking is ioctl(FIONBIO); close-on-exec by ioctl.
                v.push((
                    SYS_ioctl,
                    Some(
                        [FIONBIO, FIOCLEX, FIONCLEX]
                            .iter()
                            .map(|&r| vec![eq(1, r)])
                            .collect(),
                    ),
                ));
                v.push((SYS_mmap, no_exec()));
                v.push((SYS_mprotect, no_exec()));
                v.push((
                    SYS_madvise,
                    Some(vec![
                        vec![eq(2, MADV_DONTNEED as u64)],
                        vec![eq(2, MADV_FREE as u64)],
                    ]),
                ));
                v.push((
                    SYS_fcntl,
                    Some(
                        [
                            F_GETFD,
                            F_SETFD,
                            F_GETFL,
                            F_SETFL,
                            F_DUPFD_CLOEXEC,
                            F_GET_SEALS,
                        ]
                        .iter()
                        .map(|&c| vec![eq(1, c as u64)])
                        .collect(),
                    ),
                ));
                v
            }
            Group::Threads => {
                let mut v = any(&[SYS_clone3, SYS_set_robust_list, SYS_rseq]);
                v.push((
                    SYS_clone,
                    Some(vec![vec![(
                        0,
                        SeccompCmpOp::MaskedEq(CLONE_THREAD as u64),
                        CLONE_THREAD as u64,
                    )]]),
                ));
                // Naming the new thread.
                v.push((SYS_prctl, Some(vec![vec![eq(0, PR_SET_NAME as u64)]])));
                v
            }
            Group::PeerSockets => {
                let mut v = any(&[
                    SYS_sendmsg,
                    SYS_recvmsg,
                    SYS_sendto,
                    SYS_recvfrom,
                    SYS_shutdown,
                    SYS_getsockname,
                    SYS_getpeername,
                ]);
                let sol = Some(vec![vec![eq(1, SOL_SOCKET as u64)]]);
                v.push((SYS_setsockopt, sol.clone()));
                v.push((SYS_getsockopt, sol));
                v.push((SYS_socketpair, Some(vec![vec![eq(0, AF_UNIX as u64)]])));
                v
            }
            Group::Accept => any(&[SYS_accept4, SYS_accept]),
            Group::Files => any(&[
                SYS_fstat,
                SYS_newfstatat,
                SYS_statx,
                SYS_fstatfs,
                SYS_lseek,
                SYS_pread64,
                SYS_pwrite64,
                SYS_preadv,
                SYS_pwritev,
                SYS_readlink,
                SYS_readlinkat,
            ]),
            Group::OpenNoCreate => vec![(
                SYS_openat,
                Some(vec![vec![none_of(
                    2,
                    (O_CREAT | O_TRUNC | O_APPEND) as u64,
                )]]),
            )],
            Group::Kvm => vec![(
                SYS_ioctl,
                Some(vec![vec![(1, SeccompCmpOp::MaskedEq(0xff00), KVMIO << 8)]]),
            )],
            Group::Terminal => vec![(
                SYS_ioctl,
                Some(
                    [
                        TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ, FIONBIO, FIONREAD,
                    ]
                    .iter()
                    .map(|&r| vec![eq(1, r)])
                    .collect(),
                ),
            )],
            Group::Eventfds => any(&[SYS_eventfd2]),
            Group::PostedRing => vec![
                (
                    SYS_memfd_create,
                    Some(vec![vec![eq(1, (MFD_CLOEXEC | MFD_ALLOW_SEALING) as u64)]]),
                ),
                (
                    SYS_fcntl,
                    Some(vec![vec![
                        eq(1, F_ADD_SEALS as u64),
                        eq(2, (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) as u64),
                    ]]),
                ),
                (
                    SYS_eventfd2,
                    Some(vec![vec![eq(1, (EFD_NONBLOCK | EFD_CLOEXEC) as u64)]]),
                ),
            ],
            // Any signal's disposition but SIGSYS's: the blocked-call report stays.
            Group::Signals => vec![(
                SYS_rt_sigaction,
                Some(vec![vec![(0, SeccompCmpOp::Ne, SIGSYS as u64)]]),
            )],
            Group::Unlink => any(&[SYS_unlink, SYS_unlinkat]),
            Group::Narrowing => vec![
                (
                    SYS_prctl,
                    Some(vec![vec![eq(0, PR_SET_NO_NEW_PRIVS as u64)]]),
                ),
                (
                    SYS_seccomp,
                    Some(vec![vec![eq(0, SECCOMP_SET_MODE_FILTER as u64)]]),
                ),
            ],
        }
    }
}
