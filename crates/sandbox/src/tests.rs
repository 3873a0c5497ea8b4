//! Each filter compiles for x86-64 and answers as intended, checked by running the
//! compiled BPF on synthetic `seccomp_data` with a small classic-BPF interpreter.

use super::*;

const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_LOG: u32 = 0x7ffc_0000;

/// Runs `prog` on a `seccomp_data` { nr, arch, ip = 0, args }.
fn run(prog: &BpfProgram, arch: u32, nr: i64, args: [u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&(nr as i32).to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let (mut acc, mut pc) = (0u32, 0usize);
    loop {
        let ins = &prog[pc];
        pc += 1;
        match ins.code {
            0x20 => {
                let k = ins.k as usize;
                acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
            }
            0x54 => acc &= ins.k,
            0x05 => pc += ins.k as usize,
            0x15 | 0x25 | 0x35 => {
                let t = match ins.code {
                    0x15 => acc == ins.k,
                    0x25 => acc > ins.k,
                    _ => acc >= ins.k,
                };
                pc += usize::from(if t { ins.jt } else { ins.jf });
            }
            0x06 => return ins.k,
            c => panic!("BPF opcode {c:#x} not interpreted"),
        }
    }
}

fn check(p: Profile, nr: i64, args: [u64; 6]) -> u32 {
    let prog = compile(p, Mode::On).unwrap().unwrap();
    run(&prog, AUDIT_ARCH_X86_64, nr, args)
}

const KVM_RUN: u64 = 0xae80;
const VFIO_DEVICE_GET_INFO: u64 = 0x3b6b;

#[test]
fn every_profile_compiles_for_x86_64_in_every_mode() {
    for p in Profile::ALL {
        for mode in [Mode::On, Mode::Log] {
            let prog = compile(p, mode).unwrap().expect("a program");
            assert!(
                !prog.is_empty() && prog.len() < 4096,
                "{p:?}: {}",
                prog.len()
            );
        }
        assert!(compile(p, Mode::Off).unwrap().is_none());
    }
}

#[test]
fn mismatch_action_follows_the_mode() {
    let on = compile(Profile::Device, Mode::On).unwrap().unwrap();
    let log = compile(Profile::Device, Mode::Log).unwrap().unwrap();
    let execve = [0; 6];
    assert_eq!(
        run(&on, AUDIT_ARCH_X86_64, libc::SYS_execve, execve),
        RET_TRAP
    );
    assert_eq!(
        run(&log, AUDIT_ARCH_X86_64, libc::SYS_execve, execve),
        RET_LOG
    );
    assert_eq!(
        run(&on, AUDIT_ARCH_X86_64, libc::SYS_write, execve),
        RET_ALLOW
    );
    assert_eq!(
        run(&log, AUDIT_ARCH_X86_64, libc::SYS_write, execve),
        RET_ALLOW
    );
}

#[test]
fn a_foreign_architecture_is_refused() {
    // seccompiler kills a call made under another ABI (e.g. i386 int 0x80).
    let prog = compile(Profile::Device, Mode::On).unwrap().unwrap();
    let r = run(&prog, 3 | 0x4000_0000, libc::SYS_write, [0; 6]);
    assert_ne!(r, RET_ALLOW);
}

#[test]
fn dangerous_calls_are_in_no_profile() {
    use libc::*;
    for p in Profile::ALL {
        for nr in [
            SYS_execve,
            SYS_execveat,
            SYS_ptrace,
            SYS_socket,
            SYS_connect,
            SYS_bind,
            SYS_setuid,
            SYS_setgid,
            SYS_mount,
            SYS_init_module,
            SYS_kill,
            SYS_fork,
            SYS_vfork,
            SYS_process_vm_writev,
        ] {
            assert_eq!(
                check(p, nr, [0; 6]),
                RET_TRAP,
                "{p:?} allows {:?}",
                names::name(nr)
            );
        }
    }
}

#[test]
fn only_the_vmm_profile_lets_threads_narrow_it() {
    use libc::*;
    let nnp = [PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0];
    let filter = [SECCOMP_SET_MODE_FILTER as u64, 0, 0, 0, 0, 0];
    let strict = [SECCOMP_SET_MODE_STRICT as u64, 0, 0, 0, 0, 0];
    let dumpable = [PR_SET_DUMPABLE as u64, 1, 0, 0, 0, 0];
    assert_eq!(check(Profile::Vmm, SYS_prctl, nnp), RET_ALLOW);
    assert_eq!(check(Profile::Vmm, SYS_seccomp, filter), RET_ALLOW);
    assert_eq!(check(Profile::Vmm, SYS_seccomp, strict), RET_TRAP);
    for p in Profile::ALL {
        assert_eq!(check(p, SYS_prctl, dumpable), RET_TRAP, "{p:?}");
        if p != Profile::Vmm {
            assert_eq!(check(p, SYS_seccomp, filter), RET_TRAP, "{p:?}");
            assert_eq!(check(p, SYS_prctl, nnp), RET_TRAP, "{p:?}");
        }
    }
}

#[test]
fn arguments_are_filtered() {
    use libc::*;
    let prot_rw = (PROT_READ | PROT_WRITE) as u64;
    let prot_x = (PROT_READ | PROT_EXEC) as u64;
    for p in Profile::ALL {
        assert_eq!(
            check(p, SYS_mmap, [0, 4096, prot_rw, 1, 3, 0]),
            RET_ALLOW,
            "{p:?}"
        );
        assert_eq!(
            check(p, SYS_mmap, [0, 4096, prot_x, 2, 3, 0]),
            RET_TRAP,
            "{p:?}"
        );
        assert_eq!(check(p, SYS_mprotect, [0, 4096, prot_x, 0, 0, 0]), RET_TRAP);
        assert_eq!(
            check(p, SYS_fcntl, [3, F_GETFD as u64, 0, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(
            check(p, SYS_fcntl, [3, F_SETOWN as u64, 0, 0, 0, 0]),
            RET_TRAP
        );
    }
    // Threads, never processes (clone3: see clone3_fails_with_enosys_so_that_clone_is_used).
    let thread = (CLONE_VM | CLONE_THREAD | CLONE_SIGHAND) as u64;
    assert_eq!(
        check(Profile::Device, SYS_clone, [thread, 0, 0, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(
        check(Profile::Device, SYS_clone, [SIGCHLD as u64, 0, 0, 0, 0, 0]),
        RET_TRAP
    );
    // UNIX socket pairs only.
    assert_eq!(
        check(
            Profile::Device,
            SYS_socketpair,
            [AF_UNIX as u64, 1, 0, 0, 0, 0]
        ),
        RET_ALLOW
    );
    assert_eq!(
        check(
            Profile::Device,
            SYS_socketpair,
            [AF_INET as u64, 1, 0, 0, 0, 0]
        ),
        RET_TRAP
    );
    // Reopen, never create.
    let rdwr = (O_RDWR | O_CLOEXEC) as u64;
    let create = (O_WRONLY | O_CREAT) as u64;
    assert_eq!(
        check(Profile::Device, SYS_openat, [0, 0, rdwr, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(
        check(Profile::Device, SYS_openat, [0, 0, create, 0, 0, 0]),
        RET_TRAP
    );
    // KVM ioctls in the VMM, none in the device; no VFIO anywhere.
    assert_eq!(
        check(Profile::Vcpu, SYS_ioctl, [5, KVM_RUN, 0, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(
        check(Profile::Vmm, SYS_ioctl, [5, KVM_RUN, 0, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(
        check(Profile::Device, SYS_ioctl, [5, KVM_RUN, 0, 0, 0, 0]),
        RET_TRAP
    );
    for p in Profile::ALL {
        let r = check(p, SYS_ioctl, [5, VFIO_DEVICE_GET_INFO, 0, 0, 0, 0]);
        assert_eq!(r, RET_TRAP, "{p:?}");
    }
    // Non-blocking mode everywhere, by std's ioctl.
    for p in Profile::ALL {
        assert_eq!(
            check(p, SYS_ioctl, [5, FIONBIO, 0, 0, 0, 0]),
            RET_ALLOW,
            "{p:?}"
        );
    }
    // Signal dispositions where needed, never SIGSYS's (the report stays).
    let sigint = [SIGINT as u64, 0, 0, 0, 0, 0];
    let sigsys = [SIGSYS as u64, 0, 0, 0, 0, 0];
    for p in [Profile::Vmm, Profile::Control, Profile::Device] {
        assert_eq!(check(p, SYS_rt_sigaction, sigint), RET_ALLOW, "{p:?}");
        assert_eq!(check(p, SYS_rt_sigaction, sigsys), RET_TRAP, "{p:?}");
    }
    assert_eq!(check(Profile::Vcpu, SYS_rt_sigaction, sigint), RET_TRAP);
    // The terminal only where the console is restored.
    assert_eq!(
        check(Profile::Control, SYS_ioctl, [0, TCSETS, 0, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(
        check(Profile::Vcpu, SYS_ioctl, [0, TCSETS, 0, 0, 0, 0]),
        RET_TRAP
    );
}

#[test]
fn thread_profiles_narrow_the_vmm_profile() {
    let vmm = Profile::Vmm.syscalls();
    for p in Profile::ALL.into_iter().filter(|p| p.is_vmm_thread()) {
        let extra: Vec<_> = p
            .syscalls()
            .into_iter()
            .filter(|nr| !vmm.contains(nr))
            .map(names::name)
            .collect();
        assert!(
            extra.is_empty(),
            "{p:?} allows calls the vmm profile does not: {extra:?}"
        );
        assert!(
            p.syscalls().len() < vmm.len(),
            "{p:?} does not narrow anything"
        );
    }
    // A thread role without sockets cannot accept or create them.
    assert_eq!(
        check(Profile::SerialInput, libc::SYS_recvmsg, [0; 6]),
        RET_TRAP
    );
    assert_eq!(check(Profile::Vcpu, libc::SYS_accept4, [0; 6]), RET_TRAP);
    assert_eq!(check(Profile::Control, libc::SYS_openat, [0; 6]), RET_TRAP);
}

#[test]
fn clone3_fails_with_enosys_so_that_clone_is_used() {
    let prog = compile_no_clone3().unwrap();
    let enosys = 0x0005_0000 | libc::ENOSYS as u32;
    assert_eq!(
        run(&prog, AUDIT_ARCH_X86_64, libc::SYS_clone3, [0; 6]),
        enosys
    );
    for nr in [libc::SYS_clone, libc::SYS_write, libc::SYS_execve] {
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, nr, [0; 6]), RET_ALLOW);
    }
    // Allowlists that start threads let clone3 through to that errno rather than
    // trapping it; the others trap both.
    let thread = (libc::CLONE_VM | libc::CLONE_THREAD) as u64;
    for p in Profile::ALL {
        let clone = check(p, libc::SYS_clone, [thread, 0, 0, 0, 0, 0]);
        assert_eq!(check(p, libc::SYS_clone3, [0; 6]), clone, "{p:?}");
    }
    assert_eq!(check(Profile::Control, libc::SYS_clone3, [0; 6]), RET_TRAP);
    assert_eq!(check(Profile::Vcpu, libc::SYS_clone3, [0; 6]), RET_ALLOW);
}

#[test]
fn modes_parse_and_print() {
    for m in [Mode::On, Mode::Log, Mode::Off] {
        assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
    }
    assert_eq!(Mode::default(), Mode::On);
    let e = "trap".parse::<Mode>().unwrap_err();
    assert!(
        e.contains("on") && e.contains("log") && e.contains("off"),
        "{e}"
    );
}

#[test]
fn syscall_names_are_known() {
    assert_eq!(names::name(0), Some("read"));
    assert_eq!(names::name(59), Some("execve"));
    assert_eq!(names::name(libc::SYS_ioctl), Some("ioctl"));
    assert_eq!(names::name(-1), None);
    assert_eq!(names::name(100_000), None);
}
