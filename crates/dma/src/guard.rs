//! Fault-tolerant copies to and from memory a peer can take away: in-place DMA on files
//! that are not sealed against shrinking.
//!
//! A client's guest RAM that is not sealed with `F_SEAL_SHRINK` (Cloud Hypervisor's
//! memfd, a plain file) can be truncated by the client at any time. A page of a shared
//! mapping past the new end of file raises SIGBUS when touched, whose default action
//! kills the whole server. This module makes such a mapping safe to use in place, the way
//! the Linux kernel's `copy_from_user` survives a bad user pointer with its exception
//! table:
//!
//! - Every device access to a guarded mapping goes through one small copy routine
//!   written in assembly ([`load`], [`store`]). Its only instructions that touch guest
//!   memory lie between two known labels, and it keeps (at least) the count of bytes
//!   still to copy in `rcx` (a `rep movsb` updates `rcx` as it goes; the SSE2 loop for
//!   mid-sized copies subtracts each block once it is stored), so after a fault it says
//!   how far the copy got. The guest side of the copy, `[lo, hi)`, is kept in `r9`/`r8`, which
//!   the routine never changes.
//! - A process-wide SIGBUS and SIGSEGV handler ([`install`], once) looks at the
//!   interrupted context. When the faulting instruction lies inside the routine, the
//!   signal came from the kernel (a fault, not a `kill`) and the faulting address lies in
//!   the guest range `[r9, r8)`, it moves the instruction pointer to the routine's fixup
//!   label and puts the signal number in `rdx`; the fixup returns `rcx` (bytes not
//!   copied) in `rax`. The caller turns that into a DMA fault ([`Copied`]).
//! - Every other fault — anywhere else in the program, or inside the routine on the
//!   caller's side of the copy (a bug, not a peer's doing) — is passed on to the
//!   handler that was installed before ours (Rust's stack-overflow reporter, a
//!   sanitizer, ...) or, when there was none, the default action is restored and the
//!   fault repeats, so real crashes still crash with the same signal.
//!
//! No per-thread state is needed: the handler looks only at the interrupted registers.
//!
//! # Signal safety
//!
//! The handler calls no allocator, takes no lock and touches no thread-local: it reads
//! `siginfo_t`, reads and writes the interrupted `ucontext_t` (memory the kernel gives
//! the handler), compares addresses with the routine's labels (link-time constants), and
//! reads the previous handlers from a `OnceLock` that is filled *before* our handler is
//! installed (a plain atomic load once initialised). Chaining calls the previous handler
//! directly, or `sigaction` and `raise`, both async-signal-safe (POSIX.1-2017 2.4.3).
//! The routine itself only moves bytes between registers and memory; resuming it at the
//! fixup label leaves no Rust state half-updated, because it has none: the caller sees
//! an ordinary return value. The guarded bytes are never the subject of a Rust reference
//! (the routine is opaque to the compiler, so every access is as volatile as vm-memory's).
//!
//! Small naturally aligned accesses (2, 4 or 8 bytes whose guest address is aligned to
//! their size) are one load and one store, as vm-memory's `VolatileSlice` copies do, so a
//! device reading a descriptor field never sees it torn; copies of 16 to 2047 bytes are
//! unaligned 16-byte SSE2 moves (where `rep movsb` still pays its start-up cost), and
//! everything else is `rep movsb` (fast on CPUs with ERMS/FSRM).
//! A store first probes the last guest byte it will write, so a write to a file cut short
//! before it starts has no effect (a truncation racing the copy can still leave a prefix
//! written, as real DMA would).
//!
//! Limits: x86_64 Linux only (elsewhere [`install`] fails with ENOTSUP and unsealed
//! files keep the `pread`/`pwrite` path); a library that later installs its own SIGBUS or SIGSEGV
//! handler without chaining to ours would turn a recovered fault back into a crash.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use std::sync::OnceLock;

    // The routine. Arguments (System V): rdi = destination, rsi = source, rdx = length,
    // rcx = first guest byte (lo), r8 = one past the last guest byte (hi). Returns
    // rax = bytes not copied, rdx = the signal that stopped the copy (0: none).
    core::arch::global_asm!(
        ".pushsection .text.nestio_dma_guarded,\"ax\",@progbits",
        ".p2align 4",
        ".globl nestio_dma_guarded_start",
        ".hidden nestio_dma_guarded_start",
        ".globl nestio_dma_guarded_store",
        ".hidden nestio_dma_guarded_store",
        ".globl nestio_dma_guarded_load",
        ".hidden nestio_dma_guarded_load",
        ".globl nestio_dma_guarded_fixup",
        ".hidden nestio_dma_guarded_fixup",
        "nestio_dma_guarded_start:",
        "nestio_dma_guarded_store:",
        "    mov r9, rcx",
        "    mov rcx, rdx",
        "    test rdx, rdx",
        "    jz .Lnestio_done",
        // Probe the last guest byte before any is written.
        "    movzx eax, byte ptr [rdi + rdx - 1]",
        "    jmp .Lnestio_copy",
        "nestio_dma_guarded_load:",
        "    mov r9, rcx",
        "    mov rcx, rdx",
        ".Lnestio_copy:",
        "    cmp rdx, 8",
        "    jne .Lnestio_not8",
        "    test r9, 7",
        "    jnz .Lnestio_bytes",
        "    mov rax, qword ptr [rsi]",
        "    mov qword ptr [rdi], rax",
        "    jmp .Lnestio_done",
        ".Lnestio_not8:",
        "    cmp rdx, 4",
        "    jne .Lnestio_not4",
        "    test r9, 3",
        "    jnz .Lnestio_bytes",
        "    mov eax, dword ptr [rsi]",
        "    mov dword ptr [rdi], eax",
        "    jmp .Lnestio_done",
        ".Lnestio_not4:",
        "    cmp rdx, 2",
        "    jne .Lnestio_mid",
        "    test r9, 1",
        "    jnz .Lnestio_bytes",
        "    mov ax, word ptr [rsi]",
        "    mov word ptr [rdi], ax",
        "    jmp .Lnestio_done",
        // 16 ..= 2047 bytes: SSE2 moves (where `rep movsb` still pays its start-up),
        // 64 bytes a turn, then 16, then the last 16 bytes again (overlapping).
        ".Lnestio_mid:",
        "    cmp rdx, 16",
        "    jb .Lnestio_bytes",
        "    cmp rdx, 2048",
        "    jae .Lnestio_bytes",
        ".Lnestio_loop64:",
        "    cmp rcx, 64",
        "    jb .Lnestio_loop16",
        "    movups xmm0, xmmword ptr [rsi]",
        "    movups xmm1, xmmword ptr [rsi + 16]",
        "    movups xmm2, xmmword ptr [rsi + 32]",
        "    movups xmm3, xmmword ptr [rsi + 48]",
        "    movups xmmword ptr [rdi], xmm0",
        "    movups xmmword ptr [rdi + 16], xmm1",
        "    movups xmmword ptr [rdi + 32], xmm2",
        "    movups xmmword ptr [rdi + 48], xmm3",
        "    add rsi, 64",
        "    add rdi, 64",
        "    sub rcx, 64",
        "    jmp .Lnestio_loop64",
        ".Lnestio_loop16:",
        "    cmp rcx, 16",
        "    jb .Lnestio_tail",
        "    movups xmm0, xmmword ptr [rsi]",
        "    movups xmmword ptr [rdi], xmm0",
        "    add rsi, 16",
        "    add rdi, 16",
        "    sub rcx, 16",
        "    jmp .Lnestio_loop16",
        ".Lnestio_tail:",
        "    test rcx, rcx",
        "    jz .Lnestio_done",
        "    movups xmm0, xmmword ptr [rsi + rcx - 16]",
        "    movups xmmword ptr [rdi + rcx - 16], xmm0",
        "    jmp .Lnestio_done",
        ".Lnestio_bytes:",
        "    rep movsb",
        ".Lnestio_done:",
        "    xor eax, eax",
        "    xor edx, edx",
        "    ret",
        // Reached only from the signal handler, which has put the signal in rdx.
        "nestio_dma_guarded_fixup:",
        "    mov rax, rcx",
        "    ret",
        ".popsection",
    );

    /// What the routine returns in rax:rdx.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Copied {
        /// Bytes not copied (0: all were; after a fault, at least the bytes not copied).
        pub left: usize,
        /// The signal that stopped the copy (0: none).
        pub signal: usize,
    }

    extern "C" {
        fn nestio_dma_guarded_load(
            dst: *mut u8,
            src: *const u8,
            len: usize,
            lo: usize,
            hi: usize,
        ) -> Copied;
        fn nestio_dma_guarded_store(
            dst: *mut u8,
            src: *const u8,
            len: usize,
            lo: usize,
            hi: usize,
        ) -> Copied;
        static nestio_dma_guarded_start: u8;
        static nestio_dma_guarded_fixup: u8;
    }

    /// The routine's first instruction (only the label's address is taken).
    fn start() -> usize {
        std::ptr::addr_of!(nestio_dma_guarded_start) as usize
    }

    /// The fixup label: the end of the instructions that may fault.
    fn fixup() -> usize {
        std::ptr::addr_of!(nestio_dma_guarded_fixup) as usize
    }

    /// Copy `len` guest bytes at `src` to `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes of writes and not overlap `src`; `src` must
    /// lie in a live mapping of at least `len` bytes (whose pages may be taken away:
    /// that is a recovered fault) and [`install`] must have succeeded.
    pub unsafe fn load(dst: *mut u8, src: *const u8, len: usize) -> Copied {
        let lo = src as usize;
        // SAFETY: the caller's contract; the routine touches only [src, src+len) and
        // [dst, dst+len).
        unsafe { nestio_dma_guarded_load(dst, src, len, lo, lo.wrapping_add(len)) }
    }

    /// Copy `len` bytes at `src` to guest memory at `dst`.
    ///
    /// # Safety
    /// `src` must be valid for `len` bytes of reads and not overlap `dst`; `dst` must lie
    /// in a live readable and writable mapping of at least `len` bytes (whose pages may
    /// be taken away) and [`install`] must have succeeded.
    pub unsafe fn store(dst: *mut u8, src: *const u8, len: usize) -> Copied {
        let lo = dst as usize;
        // SAFETY: as in `load`.
        unsafe { nestio_dma_guarded_store(dst, src, len, lo, lo.wrapping_add(len)) }
    }

    /// The handlers that were installed before ours, for SIGBUS and SIGSEGV.
    static PREVIOUS: [OnceLock<libc::sigaction>; 2] = [OnceLock::new(), OnceLock::new()];
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

    fn slot(sig: libc::c_int) -> usize {
        usize::from(sig == libc::SIGSEGV)
    }

    /// The handler recorded as the one before ours for `sig` (SIG_DFL when none).
    #[cfg(test)]
    pub fn previous(sig: libc::c_int) -> usize {
        PREVIOUS[slot(sig)]
            .get()
            .map_or(libc::SIG_DFL, |p| p.sa_sigaction)
    }

    extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo_t and ucontext_t for an SA_SIGINFO
        // handler; they live on the signal stack for the duration of this call and no
        // one else accesses them. Only plain loads and stores are made (see the module
        // documentation for the signal-safety argument).
        unsafe {
            let uc = ctx.cast::<libc::ucontext_t>();
            let gregs = std::ptr::addr_of_mut!((*uc).uc_mcontext.gregs);
            let rip = (*gregs)[libc::REG_RIP as usize] as usize;
            let from_kernel = (*info).si_code > 0;
            if from_kernel && rip >= start() && rip < fixup() {
                let addr = (*info).si_addr() as usize;
                let lo = (*gregs)[libc::REG_R9 as usize] as usize;
                let hi = (*gregs)[libc::REG_R8 as usize] as usize;
                if addr >= lo && addr < hi {
                    (*gregs)[libc::REG_RIP as usize] = fixup() as i64;
                    (*gregs)[libc::REG_RDX as usize] = i64::from(sig);
                    return;
                }
            }
            chain(sig, info, ctx);
        }
    }

    /// Hand a fault that is not ours to the handler installed before ours.
    ///
    /// # Safety
    /// Called only from `on_fault` with its arguments.
    unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        let prev = PREVIOUS[slot(sig)].get();
        let handler = prev.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
        let flags = prev.map_or(0, |p| p.sa_flags);
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            // SAFETY: `info` is valid (see `on_fault`).
            let from_kernel = unsafe { (*info).si_code } > 0;
            if handler == libc::SIG_IGN && !from_kernel {
                return; // an ignored signal sent by kill
            }
            // Restore the default action: a fault repeats when we return and now kills
            // the process with this signal; a signal sent by kill is raised again (it is
            // blocked until we return).
            // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask; sigaction and
            // raise are async-signal-safe.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
                if !from_kernel {
                    libc::raise(sig);
                }
            }
            return;
        }
        // The previous handler is called directly, in our signal frame (its own
        // `sa_mask` is not applied: the signal itself stays blocked, as it would be).
        if flags & libc::SA_SIGINFO != 0 {
            // SAFETY: the previous handler was installed with SA_SIGINFO, so this is its
            // three-argument entry point, called as the kernel would.
            unsafe {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(handler);
                f(sig, info, ctx);
            }
        } else {
            // SAFETY: without SA_SIGINFO the previous handler is a one-argument function.
            unsafe {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
                f(sig);
            }
        }
    }

    fn install_once() -> Result<(), i32> {
        for sig in [libc::SIGBUS, libc::SIGSEGV] {
            // SAFETY: a zeroed sigaction is a valid value; sigaction reads `new` and
            // writes `old`, both live for the calls; results are checked.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) < 0 {
                    return Err(std::io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EINVAL));
                }
                // Recorded before ours is installed, so the handler always finds it.
                let _ = PREVIOUS[slot(sig)].set(old);
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_fault as *const () as usize;
                new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut new.sa_mask);
                if libc::sigaction(sig, &new, std::ptr::null_mut()) < 0 {
                    return Err(std::io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EINVAL));
                }
            }
        }
        tracing::debug!("SIGBUS/SIGSEGV recovery for guarded DMA copies installed");
        Ok(())
    }

    /// Install the process-wide handler (once; later calls return the first result, an
    /// errno on failure).
    pub fn install() -> Result<(), i32> {
        *INSTALLED.get_or_init(install_once)
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    /// What a guarded copy returns.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Copied {
        /// Bytes not copied.
        pub left: usize,
        /// The signal that stopped the copy.
        pub signal: usize,
    }

    /// Not available on this target.
    pub fn install() -> Result<(), i32> {
        Err(libc::ENOTSUP)
    }

    /// Not available on this target: never called ([`install`] fails).
    ///
    /// # Safety
    /// None needed; it copies nothing.
    pub unsafe fn load(_dst: *mut u8, _src: *const u8, len: usize) -> Copied {
        Copied {
            left: len,
            signal: 0,
        }
    }

    /// Not available on this target: never called ([`install`] fails).
    ///
    /// # Safety
    /// None needed; it copies nothing.
    pub unsafe fn store(_dst: *mut u8, _src: *const u8, len: usize) -> Copied {
        Copied {
            left: len,
            signal: 0,
        }
    }
}

pub use imp::{install, load, store, Copied};

#[cfg(all(test, target_arch = "x86_64", target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A shared mapping of two pages of a memfd whose second page is cut off.
    struct Cut {
        map: *mut u8,
        _fd: OwnedFd,
    }

    impl Cut {
        fn new() -> Cut {
            // SAFETY: memfd_create with a literal name, ftruncate and mmap of the new
            // fd; every result is checked.
            unsafe {
                let raw = libc::memfd_create(c"guard-unit".as_ptr(), libc::MFD_CLOEXEC);
                assert!(raw >= 0);
                let fd = OwnedFd::from_raw_fd(raw);
                assert_eq!(libc::ftruncate(fd.as_raw_fd(), 8192), 0);
                let map = libc::mmap(
                    std::ptr::null_mut(),
                    8192,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                );
                assert_ne!(map, libc::MAP_FAILED);
                let map = map.cast::<u8>();
                for i in 0..4096 {
                    map.add(i).write_volatile(i as u8 ^ 0x5a);
                }
                assert_eq!(libc::ftruncate(fd.as_raw_fd(), 4096), 0);
                Cut { map, _fd: fd }
            }
        }
    }

    impl Drop for Cut {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`, unmapped once.
            unsafe { libc::munmap(self.map.cast(), 8192) };
        }
    }

    /// Every length from 0 to 300 (all the routine's paths: single moves, the SSE2
    /// loop and its tail, `rep movsb`) and 4096, at offsets that end before, at and past
    /// the end of file: what is inside copies exactly, what crosses it is a SIGBUS
    /// reported with bytes left, and nothing is written by a store that would cross it.
    #[test]
    fn every_length_copies_or_faults_at_the_end_of_file() {
        install().unwrap();
        let cut = Cut::new();
        let mut buf = vec![0u8; 4096];
        for len in (0..=300).chain([2047, 2048, 4096]) {
            for end in [4096usize - 8, 4095, 4096, 4097, 4096 + 64] {
                let Some(start) = end.checked_sub(len) else {
                    continue;
                };
                let inside = end <= 4096 || len == 0; // nothing to touch: no fault
                                                      // SAFETY: [start, start+len) lies in the 8192-byte mapping; `buf` holds
                                                      // at least `len` bytes.
                let got = unsafe { load(buf.as_mut_ptr(), cut.map.add(start), len) };
                if inside {
                    assert_eq!(got, Copied { left: 0, signal: 0 }, "load {len} at {start}");
                    for (i, b) in buf[..len].iter().enumerate() {
                        assert_eq!(*b, (start + i) as u8 ^ 0x5a, "load {len} at {start}");
                    }
                } else {
                    assert!(
                        got.left > 0 && got.left <= len,
                        "load {len} at {start}: {got:?}"
                    );
                    assert_eq!(got.signal, libc::SIGBUS as usize);
                }
                let data = vec![0xc3u8; len];
                // SAFETY: as above.
                let put = unsafe { store(cut.map.add(start), data.as_ptr(), len) };
                if inside {
                    assert_eq!(put.left, 0, "store {len} at {start}");
                    // Put the pattern back.
                    for i in start..end {
                        // SAFETY: inside the first (live) page.
                        unsafe { cut.map.add(i).write_volatile(i as u8 ^ 0x5a) };
                    }
                } else {
                    assert_eq!(put.left, len, "store {len} at {start}: nothing written");
                    for i in start..4096 {
                        // SAFETY: inside the first (live) page.
                        let b = unsafe { cut.map.add(i).read_volatile() };
                        assert_eq!(b, i as u8 ^ 0x5a, "store {len} at {start} wrote {i}");
                    }
                }
            }
        }
    }

    /// Installing twice keeps the first handler (and its record of the previous ones).
    #[test]
    fn install_is_idempotent() {
        assert_eq!(install(), Ok(()));
        let now = current(libc::SIGBUS);
        assert_eq!(install(), Ok(()));
        let again = current(libc::SIGBUS);
        assert_eq!(now.sa_sigaction, again.sa_sigaction);
        let previous = imp::previous(libc::SIGBUS);
        assert_ne!(
            previous, now.sa_sigaction,
            "ours is not recorded as the previous one"
        );
    }

    fn current(sig: libc::c_int) -> libc::sigaction {
        // SAFETY: sigaction is plain data; all zeroes is SIG_DFL with an empty mask.
        let mut now: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: reads the current action into `now`, which lives for the call.
        let r = unsafe { libc::sigaction(sig, std::ptr::null(), &mut now) };
        assert_eq!(r, 0);
        now
    }
}
