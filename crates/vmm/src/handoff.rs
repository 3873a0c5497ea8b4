//! The RAM handoff between nesting levels (`nestio run --export vfio-user=PATH` serves
//! it on `PATH.mem`; `nestio run --memory-from PATH.mem` and `nestio inspect` take it).
//!
//! A nested guest's memory is a window of its parent guest's RAM. The parent level
//! hands that window down as its RAM file (a memfd) plus the window's place in the file;
//! the child maps exactly that window as its own guest RAM ([`crate::memory::GuestRam::from_file`])
//! and names the same file and offsets in its DMA maps, which the parent's exporter checks
//! against the window (`nestio_nested::ExportedDevice`).
//!
//! Wire format: the server accepts a connection on a UNIX stream socket, sends one
//! message and closes the connection. The message is framed like a vfio-user message so
//! that both ends reuse the checked fd-passing code of `nestio_vfio_user::socket`:
//! - a 16-byte header in host byte order: `msg_id` 0, `cmd` [`HANDOFF_CMD`], `size` 48
//!   (header included), `flags` 0, `error` 0;
//! - exactly one file descriptor (SCM_RIGHTS, on the first byte): the parent's RAM file;
//! - a 32-byte payload, little endian: `magic` [`HANDOFF_MAGIC`] (8 bytes), `level` u32
//!   (the level of the guest that will use this memory; the top-level VMM is level 1),
//!   `reserved` u32 (0), `offset` u64 (file offset of the window, child GPA 0), `size`
//!   u64 (window size in bytes = the child's RAM size).
//!
//! Who gets it: the server checks each client's uid (`SO_PEERCRED`) against a
//! [`PeerPolicy`] (default: this process's own uid) and closes any other connection
//! without sending (logged); the socket itself is owner-only
//! (`nestio_vfio_user::bind`). The fd is the child's window alone when the parent built
//! its RAM with a separate window memfd (`GuestRam::with_window`, what `nestio run
//! --export` does for fresh RAM), so the child cannot reach the rest of its parent's RAM.
//!
//! The receiver treats the message as hostile: wrong command, size, magic, reserved
//! bits, fd count, a level of 0 or beyond the deepest allowed, an empty or wrapping
//! window are each refused with a clear error; the fd is owned from the moment it
//! arrives. Whether the window fits the file is checked when it is mapped.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nestio_vfio_user::socket::{peer_credentials, recv_message, send_message, SocketError};
use nestio_vfio_user::{Header, PeerPolicy};

/// The header command number of a handoff message ("NM").
pub const HANDOFF_CMD: u16 = 0x4e4d;
/// The payload's first 8 bytes.
pub const HANDOFF_MAGIC: [u8; 8] = *b"NESTIOM1";
/// Payload bytes.
pub const HANDOFF_PAYLOAD: usize = 32;
/// Deepest level a handoff may name.
pub const MAX_LEVEL: u32 = 64;
/// How long a receiver waits for the message.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the handoff.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// Connecting or socket setup failed.
    #[error("cannot reach the parent level's memory socket {path}: {source} (is `nestio run --export vfio-user=...` running?)")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Receiving failed.
    #[error("receiving the memory handoff failed: {0}")]
    Socket(#[from] SocketError),
    /// The peer closed without sending.
    #[error("the parent level closed the memory socket without sending its RAM (it sends only to its own uid: run this level as the same user)")]
    Closed,
    /// The message is not a valid handoff.
    #[error(
        "malformed memory handoff: {0}; is this socket a `PATH.mem` of `nestio run --export`?"
    )]
    Malformed(String),
    /// Sending failed.
    #[error("sending the memory handoff failed: {0}")]
    Send(#[source] std::io::Error),
}

/// A window of a level's RAM file, handed to the level below.
#[derive(Debug, Clone)]
pub struct RamHandoff {
    /// The parent's RAM file.
    pub fd: Arc<OwnedFd>,
    /// File offset of the window (child GPA 0).
    pub offset: u64,
    /// Window size (the child's RAM size).
    pub size: u64,
    /// Level of the guest that uses the window (1 = top-level VMM).
    pub level: u32,
}

impl RamHandoff {
    /// Checked constructor: non-empty window without wrap, level in `1..=MAX_LEVEL`.
    pub fn new(
        fd: Arc<OwnedFd>,
        offset: u64,
        size: u64,
        level: u32,
    ) -> Result<RamHandoff, HandoffError> {
        if size == 0 || offset.checked_add(size).is_none() {
            return Err(HandoffError::Malformed(format!(
                "window of {size:#x} bytes at file offset {offset:#x} is empty or wraps"
            )));
        }
        if level == 0 || level > MAX_LEVEL {
            return Err(HandoffError::Malformed(format!(
                "level {level} is outside 1..={MAX_LEVEL}"
            )));
        }
        Ok(RamHandoff {
            fd,
            offset,
            size,
            level,
        })
    }

    /// The 32-byte payload.
    pub fn encode(&self) -> [u8; HANDOFF_PAYLOAD] {
        let mut b = [0u8; HANDOFF_PAYLOAD];
        b[0..8].copy_from_slice(&HANDOFF_MAGIC);
        b[8..12].copy_from_slice(&self.level.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    /// Parse and check a payload with the fds that came with it (all owned already).
    pub fn decode(payload: &[u8], mut fds: Vec<OwnedFd>) -> Result<RamHandoff, HandoffError> {
        let bad = |m: String| HandoffError::Malformed(m);
        if payload.len() != HANDOFF_PAYLOAD {
            return Err(bad(format!(
                "payload of {} bytes, expected {HANDOFF_PAYLOAD}",
                payload.len()
            )));
        }
        if payload[0..8] != HANDOFF_MAGIC {
            return Err(bad("wrong magic".into()));
        }
        let u32_at = |i: usize| {
            u32::from_le_bytes([payload[i], payload[i + 1], payload[i + 2], payload[i + 3]])
        };
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&payload[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if u32_at(12) != 0 {
            return Err(bad("reserved field is not zero".into()));
        }
        if fds.len() != 1 {
            return Err(bad(format!("{} file descriptors, expected 1", fds.len())));
        }
        let fd = fds.remove(0);
        RamHandoff::new(Arc::new(fd), u64_at(16), u64_at(24), u32_at(8))
    }

    /// Send this handoff on a connected stream.
    pub fn send(&self, stream: &UnixStream) -> Result<(), HandoffError> {
        let header = Header {
            msg_id: 0,
            cmd: HANDOFF_CMD,
            size: (nestio_vfio_user::proto::HEADER_SIZE + HANDOFF_PAYLOAD) as u32,
            flags: 0,
            error: 0,
        };
        send_message(stream, &header, &self.encode(), &[self.fd.as_raw_fd()])
            .map_err(HandoffError::Send)
    }

    /// Receive one handoff from a connected stream.
    pub fn recv(stream: &UnixStream) -> Result<RamHandoff, HandoffError> {
        let max = nestio_vfio_user::proto::HEADER_SIZE + HANDOFF_PAYLOAD;
        let m = recv_message(stream, max)?.ok_or(HandoffError::Closed)?;
        if m.header.cmd != HANDOFF_CMD || m.header.flags != 0 || m.header.error != 0 {
            return Err(HandoffError::Malformed(format!(
                "header command {:#x} flags {:#x} error {} (expected command {HANDOFF_CMD:#x}, no flags)",
                m.header.cmd, m.header.flags, m.header.error
            )));
        }
        RamHandoff::decode(&m.payload, m.fds)
    }

    /// Connect to `path` and receive the handoff.
    pub fn fetch(path: &Path) -> Result<RamHandoff, HandoffError> {
        let connect_err = |source| HandoffError::Connect {
            path: path.display().to_string(),
            source,
        };
        let s = UnixStream::connect(path).map_err(connect_err)?;
        s.set_read_timeout(Some(RECV_TIMEOUT))
            .map_err(connect_err)?;
        RamHandoff::recv(&s)
    }

    /// Send this handoff to every client of `listener` that runs as this process's uid,
    /// forever (until accept fails).
    pub fn serve(&self, listener: UnixListener) -> std::io::Result<()> {
        self.serve_to(listener, &PeerPolicy::own_uid())
    }

    /// Send this handoff to every client of `listener` that `peers` allows; close the
    /// others without sending (logged). Forever (until accept fails).
    pub fn serve_to(&self, listener: UnixListener, peers: &PeerPolicy) -> std::io::Result<()> {
        loop {
            let (s, _) = match listener.accept() {
                Ok(c) => c,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            match peer_credentials(&s) {
                Ok(p) if peers.allows(&p) => {}
                Ok(p) => {
                    tracing::warn!(
                        pid = p.pid,
                        uid = p.uid,
                        "memory handoff refused to a peer of another uid"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot identify a memory socket peer; closed");
                    continue;
                }
            }
            if let Err(e) = self.send(&s) {
                tracing::warn!(error = %e, "memory handoff to a client failed");
            }
        }
    }
}

/// The memory socket path of an export socket: `PATH.mem`.
pub fn mem_socket_path(export: &Path) -> std::path::PathBuf {
    let mut s = export.as_os_str().to_owned();
    s.push(".mem");
    std::path::PathBuf::from(s)
}

/// The fuzz target's entry point (`fuzz/fuzz_targets/handoff.rs`): a hostile parent's
/// handoff. The first byte picks 0..2 fds to come with the message (an 8 MiB sealed
/// memfd — sparse, so it costs nothing — or an eventfd, the wrong kind of file) and
/// whether the rest is the payload for [`RamHandoff::decode`] or a whole message
/// (header + payload) sent over a socketpair to [`RamHandoff::recv`]. A handoff that is
/// accepted is then mapped as the child's RAM ([`crate::memory::GuestRam::from_file`],
/// which must refuse windows the file cannot hold) and its last byte read. Never
/// panics, never raises SIGBUS, never leaks an fd.
pub fn fuzz_handoff(data: &[u8]) {
    use std::os::fd::FromRawFd;
    use vm_memory::{Bytes, GuestAddress};
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut fds = Vec::new();
    for kind in [sel & 3, (sel >> 2) & 3] {
        match kind {
            1 => fds.extend(nestio_dma::memfd::sealed_memfd(c"fuzz-handoff", 8 << 20).ok()),
            2 => {
                // SAFETY: eventfd takes no pointers; the result is checked.
                let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
                if raw >= 0 {
                    // SAFETY: a new descriptor owned by nothing else.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            _ => {}
        }
    }
    let result = if sel & 0x10 != 0 {
        let Ok((a, b)) = UnixStream::pair() else {
            return;
        };
        let word = |i: usize| {
            let mut w = [0u8; 4];
            for (k, x) in w.iter_mut().enumerate() {
                *x = rest.get(i + k).copied().unwrap_or(0);
            }
            u32::from_ne_bytes(w)
        };
        // The header's fields as the fuzzer wrote them (size included: it may lie).
        let header = Header {
            msg_id: word(0) as u16,
            cmd: (word(0) >> 16) as u16,
            size: word(4),
            flags: word(8),
            error: word(12),
        };
        let payload = rest
            .get(nestio_vfio_user::proto::HEADER_SIZE..)
            .unwrap_or(&[]);
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let _ = b.set_read_timeout(Some(Duration::from_secs(1)));
        if send_message(&a, &header, payload, &raw).is_err() {
            return;
        }
        drop(fds);
        drop(a);
        RamHandoff::recv(&b)
    } else {
        RamHandoff::decode(rest, fds)
    };
    let Ok(h) = result else {
        return;
    };
    assert!(h.size > 0 && h.offset.checked_add(h.size).is_some());
    assert!((1..=MAX_LEVEL).contains(&h.level));
    if let Ok(ram) = crate::memory::GuestRam::from_file(h.fd.clone(), h.offset, h.size) {
        let mut b = [0u8; 1];
        assert!(ram
            .memory()
            .read_slice(&mut b, GuestAddress(h.size - 1))
            .is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd() -> Arc<OwnedFd> {
        // SAFETY: literal name; checked.
        let raw = unsafe { libc::memfd_create(c"handoff-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: fresh fd.
        Arc::new(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    #[test]
    fn round_trip_over_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let h = RamHandoff::new(memfd(), 32 << 20, 16 << 20, 2).unwrap();
        h.send(&a).unwrap();
        let r = RamHandoff::recv(&b).unwrap();
        assert_eq!((r.offset, r.size, r.level), (32 << 20, 16 << 20, 2));
        // SAFETY: fstat into locals.
        let ino = |fd: &OwnedFd| unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::fstat(fd.as_raw_fd(), &mut st), 0);
            (st.st_dev, st.st_ino)
        };
        assert_eq!(ino(&r.fd), ino(&h.fd), "the same file arrives");
        drop(a);
        assert!(matches!(RamHandoff::recv(&b), Err(HandoffError::Closed)));
    }

    #[test]
    fn hostile_payloads_are_refused() {
        let h = RamHandoff::new(memfd(), 0, 4 << 20, 1).unwrap();
        let good = h.encode();
        let fds = || vec![memfd().try_clone().unwrap()];
        assert!(RamHandoff::decode(&good, fds()).is_ok());
        assert!(RamHandoff::decode(&good, vec![]).is_err(), "no fd");
        assert!(
            RamHandoff::decode(&good, vec![fds().remove(0), fds().remove(0)]).is_err(),
            "two fds"
        );
        assert!(RamHandoff::decode(&good[..31], fds()).is_err());
        let mut m = good;
        m[0] ^= 1;
        assert!(RamHandoff::decode(&m, fds()).is_err(), "magic");
        let mut m = good;
        m[12] = 1;
        assert!(RamHandoff::decode(&m, fds()).is_err(), "reserved");
        let mut m = good;
        m[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(RamHandoff::decode(&m, fds()).is_err(), "level 0");
        let mut m = good;
        m[8..12].copy_from_slice(&(MAX_LEVEL + 1).to_le_bytes());
        assert!(RamHandoff::decode(&m, fds()).is_err(), "too deep");
        let mut m = good;
        m[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(RamHandoff::decode(&m, fds()).is_err(), "wraps");
        let mut m = good;
        m[24..32].copy_from_slice(&0u64.to_le_bytes());
        assert!(RamHandoff::decode(&m, fds()).is_err(), "empty");
        // A vfio-user message that is not a handoff.
        let (a, b) = UnixStream::pair().unwrap();
        let hdr = Header {
            cmd: 1,
            size: 48,
            ..Header::default()
        };
        send_message(&a, &hdr, &good, &[]).unwrap();
        assert!(matches!(
            RamHandoff::recv(&b),
            Err(HandoffError::Malformed(_))
        ));
    }

    #[test]
    fn the_handoff_goes_only_to_allowed_peers() {
        let dir = std::env::temp_dir().join(format!("nestio-handoff-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let h = RamHandoff::new(memfd(), 0, 4 << 20, 2).unwrap();
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let refused = dir.join("refused.mem");
        let l = nestio_vfio_user::bind(&refused).unwrap();
        let h2 = h.clone();
        std::thread::spawn(move || h2.serve_to(l, &PeerPolicy::Uids(vec![me.wrapping_add(7)])));
        assert!(
            matches!(RamHandoff::fetch(&refused), Err(HandoffError::Closed)),
            "another uid gets nothing"
        );
        let ok = dir.join("ok.mem");
        let l = nestio_vfio_user::bind(&ok).unwrap();
        std::thread::spawn(move || h.serve(l));
        assert_eq!(RamHandoff::fetch(&ok).unwrap().size, 4 << 20);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mem_path_appends_suffix() {
        assert_eq!(
            mem_socket_path(Path::new("/tmp/l1.sock")),
            Path::new("/tmp/l1.sock.mem")
        );
    }
}
