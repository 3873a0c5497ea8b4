//! The SIGSYS handler of [`Mode::On`]: one line naming the blocked call, then
//! `_exit(BLOCKED_EXIT_STATUS)`.
//!
//! It runs in the thread that made the call, inside a signal handler, under the very
//! filter that blocked it: it uses only `write(2)` and `exit_group(2)` (allowed by every
//! profile), no allocation and no locks. The profile names it reports come from a
//! process-wide atomic and a `const`-initialised thread-local `Cell` (no destructor,
//! no lazy initialisation: a plain TLS load).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use crate::{names, Mode, Profile, SandboxError, BLOCKED_EXIT_STATUS, BLOCKED_MESSAGE};

/// `SYS_SECCOMP`: `si_code` of a SIGSYS sent by a seccomp filter.
const SYS_SECCOMP: i32 = 1;

/// Index + 1 into [`Profile::ALL`] of the process-wide profile (0: none).
static PROCESS_PROFILE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_PROFILE: Cell<Option<Profile>> = const { Cell::new(None) };
}

static HANDLER: Once = Once::new();

/// Install the SIGSYS handler (once per process, for [`Mode::On`]) and remember the
/// process-wide profile.
pub(crate) fn prepare(mode: Mode, process: Option<Profile>) -> Result<(), SandboxError> {
    if let Some(p) = process {
        let i = Profile::ALL
            .iter()
            .position(|&q| q == p)
            .map_or(0, |i| i + 1);
        PROCESS_PROFILE.store(i, Ordering::SeqCst);
    }
    if mode != Mode::On {
        return Ok(());
    }
    let mut result = Ok(());
    HANDLER.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; we set an SA_SIGINFO handler that is
        // async-signal-safe (see the module documentation) and an empty mask.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(SandboxError::Handler(std::io::Error::last_os_error()));
        }
    });
    result
}

/// Remember the calling thread's own profile for the report.
pub(crate) fn set_thread_profile(p: Profile) {
    THREAD_PROFILE.with(|c| c.set(Some(p)));
}

/// A fixed buffer that silently truncates: formatting without allocation.
struct Line {
    buf: [u8; 320],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_num(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut v = n.unsigned_abs();
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report line for a blocked call `nr` under `profile`.
pub(crate) fn report(nr: i64, profile: Option<Profile>) -> ([u8; 320], usize) {
    let mut l = Line {
        buf: [0; 320],
        len: 0,
    };
    l.push(b"nestio: system call ");
    l.push_num(nr);
    if let Some(name) = names::name(nr) {
        l.push(b" (");
        l.push(name.as_bytes());
        l.push(b")");
    }
    l.push(b" ");
    l.push(BLOCKED_MESSAGE.as_bytes());
    if let Some(p) = profile {
        l.push(b" (");
        l.push(p.name().as_bytes());
        l.push(b" filter)");
    }
    l.push(b"; rerun with --seccomp=log to find it\n");
    (l.buf, l.len)
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler. For SIGSYS
    // with si_code SYS_SECCOMP its union holds `_sigsys { void *call_addr; int
    // syscall; unsigned arch; }`, which starts at byte 16 on 64-bit Linux: `syscall`
    // is the i32 at byte 24.
    let (code, nr) = unsafe {
        let code = (*info).si_code;
        let nr = std::ptr::read_unaligned((info as *const u8).add(24) as *const i32);
        (code, nr)
    };
    let nr = if code == SYS_SECCOMP {
        i64::from(nr)
    } else {
        -1
    };
    let profile = THREAD_PROFILE.with(|c| c.get()).or_else(|| {
        let i = PROCESS_PROFILE.load(Ordering::Relaxed);
        i.checked_sub(1).and_then(|i| Profile::ALL.get(i).copied())
    });
    let (buf, len) = report(nr, profile);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..len]` is initialised.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(BLOCKED_EXIT_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_the_call_and_the_filter() {
        let (buf, len) = report(59, Some(Profile::Vcpu));
        let s = std::str::from_utf8(&buf[..len]).unwrap();
        assert_eq!(
            s,
            "nestio: system call 59 (execve) blocked by nestio's seccomp sandbox (vcpu \
             filter); rerun with --seccomp=log to find it\n"
        );
        let (buf, len) = report(100_000, None);
        let s = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(s.starts_with("nestio: system call 100000 blocked"), "{s}");
        let (buf, len) = report(-1, None);
        assert!(std::str::from_utf8(&buf[..len])
            .unwrap()
            .starts_with("nestio: system call -1 blocked"));
    }
}
