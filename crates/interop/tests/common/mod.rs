//! Shared helpers of the interop tests: a deadlock guard, fd helpers, the raw wire
//! format (written independently of both implementations so that each side is checked
//! against the spec, not against itself) and a recording socket proxy.
//!
//! The proxy sits between a client and a server, forwards bytes *and* SCM_RIGHTS fds in
//! both directions and records both byte streams. Tests use the record as wire-level
//! evidence (what exactly a peer sent), and use [`Proxy::cut_client`] to end a call
//! that is stuck waiting for bytes the server will never send, turning a hang into an
//! observable EOF.

#![allow(dead_code)]

pub mod their;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Seconds after which a test's guard aborts the whole test process: a hang bound only,
/// generous because a loaded 2-core CI machine can stall a test for a long time (and an
/// abort takes every other test of the binary down with it).
pub const GUARD_SECS: u64 = 180;

/// Aborts the process if the test that created it is still running after
/// [`GUARD_SECS`]: a deadlock fails fast with a message instead of hanging CI.
/// Dropping the guard (end of the test, or a panic unwinding) disarms it.
pub struct Guard {
    _disarm: mpsc::Sender<()>,
}

/// Arm a deadlock guard for test `name`.
pub fn guard(name: &'static str) -> Guard {
    let (tx, rx) = mpsc::channel::<()>();
    thread::Builder::new()
        .name(format!("guard-{name}"))
        .spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(Duration::from_secs(GUARD_SECS))
            {
                eprintln!(
                    "DEADLOCK GUARD: test `{name}` still running after {GUARD_SECS} s; \
                     aborting the test process (a vfio-user peer is probably waiting for \
                     bytes that will never come)"
                );
                std::process::abort();
            }
        })
        .expect("spawn guard thread");
    Guard { _disarm: tx }
}

/// A fresh, short socket path in the temp directory (not created).
pub fn sock_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!("nio-{}-{}-{}.sock", std::process::id(), tag, n));
    let _ = std::fs::remove_file(&p);
    p
}

/// A memfd of `size` bytes.
pub fn memfd(size: u64) -> OwnedFd {
    nestio_dma::memfd::sealed_memfd(c"nestio-interop", size).expect("memfd")
}

/// pwrite all of `data` at `off` of `fd`.
pub fn pwrite(fd: RawFd, off: u64, data: &[u8]) {
    // SAFETY: the buffer is valid for data.len() bytes; result checked.
    let r = unsafe {
        libc::pwrite(
            fd,
            data.as_ptr() as *const libc::c_void,
            data.len(),
            off as libc::off_t,
        )
    };
    assert_eq!(
        r,
        data.len() as isize,
        "pwrite: {}",
        std::io::Error::last_os_error()
    );
}

/// pread `len` bytes at `off` of `fd`.
pub fn pread(fd: RawFd, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: the buffer is valid for len bytes; result checked.
    let r = unsafe {
        libc::pread(
            fd,
            v.as_mut_ptr() as *mut libc::c_void,
            len,
            off as libc::off_t,
        )
    };
    assert_eq!(
        r,
        len as isize,
        "pread: {}",
        std::io::Error::last_os_error()
    );
    v
}

/// A non-blocking eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a new fd or -1, checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Read (and reset) an eventfd counter; 0 when it was not signalled.
pub fn eventfd_count(fd: RawFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64.
    let r = unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
    if r == 8 {
        v
    } else {
        0
    }
}

/// Identity of the open file behind `fd` (device, inode).
pub fn file_id(fd: RawFd) -> (u64, u64) {
    // SAFETY: zeroed stat is a valid out-parameter; result checked.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into st.
    let r = unsafe { libc::fstat(fd, &mut st) };
    assert_eq!(r, 0, "fstat: {}", std::io::Error::last_os_error());
    (st.st_dev, st.st_ino)
}

// ---- raw wire format (spec: QEMU docs/interop/vfio-user.rst) ----

/// Command numbers.
pub mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    pub const DEVICE_SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DMA_READ: u16 = 11;
    pub const DMA_WRITE: u16 = 12;
    pub const DEVICE_RESET: u16 = 13;
    pub const REGION_WRITE_MULTI: u16 = 15;
    pub const DEVICE_FEATURE: u16 = 16;
}

/// Header flag bits.
pub const F_REPLY: u32 = 1;
pub const F_NO_REPLY: u32 = 1 << 4;
pub const F_ERROR: u32 = 1 << 5;

/// A decoded 16-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hdr {
    pub id: u16,
    pub cmd: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Hdr {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.cmd.to_ne_bytes());
        b[4..8].copy_from_slice(&self.size.to_ne_bytes());
        b[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        b[12..16].copy_from_slice(&self.error.to_ne_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> Hdr {
        Hdr {
            id: u16::from_ne_bytes([b[0], b[1]]),
            cmd: u16::from_ne_bytes([b[2], b[3]]),
            size: u32::from_ne_bytes(b[4..8].try_into().unwrap()),
            flags: u32::from_ne_bytes(b[8..12].try_into().unwrap()),
            error: u32::from_ne_bytes(b[12..16].try_into().unwrap()),
        }
    }
    pub fn is_error(&self) -> bool {
        self.flags & F_ERROR != 0
    }
}

/// A command message: header (size computed) + payload.
pub fn command(id: u16, cmd: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Hdr {
        id,
        cmd,
        size: (16 + payload.len()) as u32,
        flags: 0,
        error: 0,
    }
    .encode()
    .to_vec();
    v.extend_from_slice(payload);
    v
}

/// Concatenate native-endian u32 words.
pub fn u32s(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}

pub fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
}

/// A VERSION command proposing 0.1 with `json` (NUL appended).
pub fn version_command(id: u16, json: &str) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&0u16.to_ne_bytes());
    p.extend_from_slice(&1u16.to_ne_bytes());
    p.extend_from_slice(json.as_bytes());
    p.push(0);
    command(id, cmd::VERSION, &p)
}

/// Read one whole message (header + payload) from a raw stream.
pub fn read_msg(s: &mut UnixStream) -> std::io::Result<(Hdr, Vec<u8>)> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h)?;
    let hdr = Hdr::decode(&h);
    let len = (hdr.size as usize).checked_sub(16).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "message size below 16")
    })?;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p)?;
    Ok((hdr, p))
}

/// Split a recorded byte stream into messages (a trailing partial message is dropped).
pub fn split_messages(mut b: &[u8]) -> Vec<(Hdr, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 16 {
        let h = Hdr::decode(b);
        let size = h.size as usize;
        if size < 16 || size > b.len() {
            break;
        }
        out.push((h, b[16..size].to_vec()));
        b = &b[size..];
    }
    out
}

// ---- recording proxy ----

#[derive(Default)]
struct Record {
    /// client -> server bytes
    c2s: Vec<u8>,
    /// server -> client bytes
    s2c: Vec<u8>,
    /// number of fds forwarded client -> server / server -> client
    c2s_fds: usize,
    s2c_fds: usize,
    /// bytes of `c2s` / `s2c` already written to the other side
    c2s_forwarded: usize,
    s2c_forwarded: usize,
}

/// A recording proxy between one client connection and `upstream` (the server side).
pub struct Proxy {
    pub path: PathBuf,
    rec: Arc<(Mutex<Record>, Condvar)>,
    client: Arc<Mutex<Option<UnixStream>>>,
}

impl Proxy {
    /// Listen on a fresh path; the first connection is forwarded to `upstream`.
    pub fn start(tag: &str, upstream: UnixStream) -> Proxy {
        let path = sock_path(tag);
        let listener = UnixListener::bind(&path).expect("bind proxy socket");
        let rec: Arc<(Mutex<Record>, Condvar)> = Arc::default();
        let client: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let (rec2, client2) = (rec.clone(), client.clone());
        thread::spawn(move || {
            let Ok((c, _)) = listener.accept() else {
                return;
            };
            *client2.lock().unwrap() = Some(c.try_clone().expect("clone"));
            let (c_r, u_w) = (
                c.try_clone().expect("clone"),
                upstream.try_clone().expect("clone"),
            );
            let rec_a = rec2.clone();
            thread::spawn(move || pump(c_r, u_w, rec_a, true));
            pump(upstream, c, rec2, false);
        });
        Proxy { path, rec, client }
    }

    /// Bytes the client sent so far.
    pub fn c2s(&self) -> Vec<u8> {
        self.rec.0.lock().unwrap().c2s.clone()
    }
    /// Bytes the server sent so far.
    pub fn s2c(&self) -> Vec<u8> {
        self.rec.0.lock().unwrap().s2c.clone()
    }
    /// fds forwarded (client->server, server->client).
    pub fn fds(&self) -> (usize, usize) {
        let r = self.rec.0.lock().unwrap();
        (r.c2s_fds, r.s2c_fds)
    }
    /// Messages the client sent so far.
    pub fn client_messages(&self) -> Vec<(Hdr, Vec<u8>)> {
        split_messages(&self.c2s())
    }
    /// Messages the server sent so far.
    pub fn server_messages(&self) -> Vec<(Hdr, Vec<u8>)> {
        split_messages(&self.s2c())
    }
    /// Block until the server has sent (and the proxy forwarded to the client) `n`
    /// whole messages.
    pub fn wait_server_messages(&self, n: usize) -> Vec<(Hdr, Vec<u8>)> {
        let (m, cv) = &*self.rec;
        let mut r = m.lock().unwrap();
        loop {
            let msgs = split_messages(&r.s2c[..r.s2c_forwarded]);
            if msgs.len() >= n {
                return msgs;
            }
            r = cv.wait(r).unwrap();
        }
    }
    /// Close the client's side of the connection: a client blocked in a read gets EOF.
    pub fn cut_client(&self) {
        if let Some(c) = self.client.lock().unwrap().as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn pump(from: UnixStream, mut to: UnixStream, rec: Arc<(Mutex<Record>, Condvar)>, c2s: bool) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let mut fds = [-1 as RawFd; 16];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, valid for its length, and `fds` has room
        // for 16 descriptors; both outlive the call.
        let r = unsafe { from.recv_with_fds(&mut iov, &mut fds) };
        let (n, nfds) = match r {
            Ok((0, _)) | Err(_) => break,
            Ok(v) => v,
        };
        // Take ownership so every forwarded fd is closed here after sending.
        let owned: Vec<OwnedFd> = fds[..nfds]
            .iter()
            // SAFETY: the kernel just installed these descriptors for us.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        // Recorded before forwarding: once a peer has received bytes, the record has them.
        {
            let (m, _) = &*rec;
            let mut r = m.lock().unwrap();
            if c2s {
                r.c2s.extend_from_slice(&buf[..n]);
                r.c2s_fds += nfds;
            } else {
                r.s2c.extend_from_slice(&buf[..n]);
                r.s2c_fds += nfds;
            }
        }
        let ok = if owned.is_empty() {
            to.write_all(&buf[..n]).is_ok()
        } else {
            let raw: Vec<RawFd> = owned.iter().map(|f| f.as_raw_fd()).collect();
            match to.send_with_fds(&[&buf[..n]], &raw) {
                Ok(sent) => sent == n || to.write_all(&buf[sent..n]).is_ok(),
                Err(_) => false,
            }
        };
        // Forwarded bytes count separately: a test waiting on them knows the peer can
        // already read them.
        {
            let (m, cv) = &*rec;
            let mut r = m.lock().unwrap();
            if c2s {
                r.c2s_forwarded += n;
            } else {
                r.s2c_forwarded += n;
            }
            cv.notify_all();
        }
        if !ok {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
