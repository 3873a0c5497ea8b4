//! Whole vfio-user messages over an AF_UNIX stream socket, with fds by SCM_RIGHTS.
//!
//! Sending: one `sendmsg` with two iovecs (header, payload) and the fds; a short write
//! is continued without fds. `MSG_NOSIGNAL` keeps a dead peer from raising SIGPIPE.
//!
//! Receiving: the 16-byte header first (so we never read into the next message), the
//! size checked against the limit *before* the payload buffer is allocated, then the
//! payload. Every `recvmsg` collects fds; each becomes an [`OwnedFd`] at once, so any
//! error path (including MSG_CTRUNC, which means the kernel dropped fds) closes them.
//!
//! Listening sockets ([`listen_private`]) are owner-only from birth: the socket's own
//! inode is `fchmod`ed to 0600 before `bind`, so Linux creates the file with that mode
//! (less the umask) and there is no moment when another user may connect; the mode is
//! checked after `bind`, before `listen`. A socket file already at the path is probed with
//! a connect: a live server there is never replaced (clear error naming the path), a
//! stale file (connection refused) is. Accepted peers are identified by `SO_PEERCRED`
//! ([`peer_credentials`]); what to allow is the server's policy. A server that admits
//! other uids listens with [`listen_with_mode`] 0666 (widened past the umask before
//! `listen`), and the peer check is then the gate. Every error names the path it is
//! about.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::proto::{Header, ProtoError, HEADER_SIZE};

/// Most fds accepted in one `recvmsg` (the kernel's SCM_MAX_FD).
pub const MAX_RECV_FDS: usize = 253;

/// Socket-level errors.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The peer closed the connection in the middle of a message.
    #[error("peer closed the connection in the middle of a message ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The header cannot be trusted (size out of range).
    #[error("bad message header: {0}")]
    Header(#[from] ProtoError),
    /// The kernel dropped fds (MSG_CTRUNC).
    #[error("file descriptors were dropped by the kernel (too many in one message)")]
    FdsTruncated,
    /// No data arrived before the deadline.
    #[error("the peer sent nothing before the deadline")]
    TimedOut,
    /// A system call failed.
    #[error("socket I/O failed: {0}")]
    Io(#[from] io::Error),
    /// A server is already listening at the path.
    #[error("{} is a live socket: another server accepted a connection there; stop it or choose another socket path", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something that is not a socket is at the path.
    #[error("{} exists and is not a socket; refusing to replace it (choose another socket path)", path.display())]
    NotSocket {
        /// The path.
        path: PathBuf,
    },
    /// Creating, binding or listening failed.
    #[error("cannot listen on {}: {source} (does the directory exist and is it writable?)", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket file did not get owner-only permissions.
    #[error("{} was created with mode {mode:o}, wider than asked; refusing to listen on it", path.display())]
    Mode {
        /// The socket path.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// Owner-only: read and write for the owner (connecting needs write permission).
pub const SOCKET_MODE: u32 = 0o600;
/// Pending connections the kernel queues for a listener.
const BACKLOG: i32 = 64;

fn listen_err(path: &Path) -> impl Fn(io::Error) -> SocketError + '_ {
    move |source| SocketError::Listen {
        path: path.to_path_buf(),
        source,
    }
}

/// Listen on a new owner-only (0600) UNIX socket at `path` whatever the umask. A stale
/// socket file there is replaced; a live one (a connect succeeds) or anything that is not
/// a socket is refused. See the module documentation.
pub fn listen_private(path: &Path) -> Result<UnixListener, SocketError> {
    listen_with_mode(path, SOCKET_MODE)
}

/// [`listen_private`] with another file mode (at most 0666; the umask still applies):
/// 0666 lets every local user connect, for a server whose peer check
/// ([`peer_credentials`]) admits other uids.
pub fn listen_with_mode(path: &Path, mode: u32) -> Result<UnixListener, SocketError> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = listen_err(path);
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse { path: path.into() }),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                tracing::info!(path = %path.display(), "replacing a stale socket file");
                std::fs::remove_file(path).map_err(&err)?;
            }
            Err(e) => return Err(err(e)),
        },
        Ok(_) => return Err(SocketError::NotSocket { path: path.into() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a socket path must be 1 to {} bytes without NUL",
                addr.sun_path.len() - 1
            ),
        )));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let want = mode & 0o666;
    // The socket inode's mode becomes the file's mode at bind (less the umask).
    // SAFETY: fchmod on a valid descriptor, no pointers.
    if unsafe { libc::fchmod(fd.as_raw_fd(), want as libc::mode_t) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a live sockaddr_un and `len` covers the family, the path and its
    // NUL, within the struct (checked above).
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // Nobody can connect before listen(): check the file's mode now, and widen it to
    // `want` if the umask narrowed it (through an O_PATH handle of the very socket file:
    // never through a symlink put in its place).
    let mut mode = std::fs::symlink_metadata(path)
        .map_err(&err)?
        .permissions()
        .mode()
        & 0o777;
    if mode != want && mode & !want == 0 {
        chmod_socket_file(path, want).map_err(&err)?;
        mode = want;
    }
    if mode & !want != 0 {
        let _ = std::fs::remove_file(path);
        return Err(SocketError::Mode {
            path: path.into(),
            mode,
        });
    }
    // SAFETY: listen on a valid bound socket, no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    Ok(UnixListener::from(fd))
}

/// Set the mode of the socket file at `path` (not following a symlink).
fn chmod_socket_file(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a NUL-terminated path; the result is checked.
    let raw = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    if !std::fs::metadata(&proc_path)?.file_type().is_socket() {
        return Err(io::Error::other("the path is no longer our socket"));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&proc_path, std::fs::Permissions::from_mode(mode))
}

/// Who is at the other end of a UNIX socket (`SO_PEERCRED`: as of `connect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// The credentials of `sock`'s peer.
pub fn peer_credentials(sock: &UnixStream) -> io::Result<PeerCredentials> {
    let mut c = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` and `len` are live locals of the sizes the kernel is told.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut c as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCredentials {
        pid: c.pid,
        uid: c.uid,
        gid: c.gid,
    })
}

/// A received message.
#[derive(Debug)]
pub struct Message {
    /// Header.
    pub header: Header,
    /// Payload (header excluded).
    pub payload: Vec<u8>,
    /// Received fds, owned.
    pub fds: Vec<OwnedFd>,
}

/// Send one message. `fds` ride on the first `sendmsg`.
pub fn send_message(
    sock: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    let hdr = header.encode();
    let total = HEADER_SIZE + payload.len();
    let mut sent = 0usize;
    let mut cmsg_buf = [0u64; (MAX_RECV_FDS * 4 + 64) / 8];
    if fds.len() > MAX_RECV_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} fds exceed the {MAX_RECV_FDS} one message can carry",
                fds.len()
            ),
        ));
    }
    while sent < total {
        let mut iov = [
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
        ];
        let mut n_iov = 0;
        if sent < HEADER_SIZE {
            iov[n_iov] = libc::iovec {
                iov_base: hdr[sent..].as_ptr() as *mut libc::c_void,
                iov_len: HEADER_SIZE - sent,
            };
            n_iov += 1;
        }
        let pstart = sent.saturating_sub(HEADER_SIZE);
        if pstart < payload.len() {
            iov[n_iov] = libc::iovec {
                iov_base: payload[pstart..].as_ptr() as *mut libc::c_void,
                iov_len: payload.len() - pstart,
            };
            n_iov += 1;
        }
        // SAFETY: an all-zero msghdr is a valid empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n_iov as _;
        if sent == 0 && !fds.is_empty() {
            // SAFETY: CMSG_SPACE is a pure computation.
            let space = unsafe { libc::CMSG_SPACE((fds.len() * 4) as u32) } as usize;
            msg.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points to a buffer of at least `space` bytes (the
            // buffer holds MAX_RECV_FDS fds plus headroom and fds.len() <= that), so the
            // first header and its data lie inside it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as _;
                let data = libc::CMSG_DATA(c) as *mut RawFd;
                for (i, fd) in fds.iter().enumerate() {
                    data.add(i).write_unaligned(*fd);
                }
            }
        }
        // SAFETY: msg points at live iovecs over `hdr`/`payload` and a live control
        // buffer; the kernel only reads them.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "socket accepted no bytes",
            ));
        }
        sent += r as usize;
    }
    Ok(())
}

/// One `recvmsg` into `buf`, appending received fds to `fds`. Returns bytes read.
fn recv_some(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, SocketError> {
    let mut cmsg_buf = [0u64; (MAX_RECV_FDS * 4 + 64) / 8];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cmsg_buf) as _;
        // SAFETY: iov covers `buf` (writable, exclusively borrowed) and the control
        // buffer is live and writable for its stated length.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        // Take ownership of every fd first, so that any error below closes them.
        if msg.msg_controllen > 0 {
            // SAFETY: the kernel filled msg_control with msg_controllen bytes of
            // well-formed cmsg headers; CMSG_FIRSTHDR/NXTHDR stay inside that length.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let data = libc::CMSG_DATA(c) as *const RawFd;
                        let hdr_len = libc::CMSG_LEN(0) as usize;
                        let n = ((*c).cmsg_len as usize).saturating_sub(hdr_len) / 4;
                        for i in 0..n {
                            let fd = data.add(i).read_unaligned();
                            if fd >= 0 {
                                // The kernel installed this fd for us; nobody else owns it.
                                fds.push(OwnedFd::from_raw_fd(fd));
                            }
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(SocketError::FdsTruncated);
        }
        return Ok(r as usize);
    }
}

fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    already: usize,
    want_total: usize,
) -> Result<(), SocketError> {
    let mut got = 0;
    while got < buf.len() {
        let n = recv_some(sock, &mut buf[got..], fds)?;
        if n == 0 {
            return Err(SocketError::Truncated {
                got: already + got,
                want: want_total,
            });
        }
        got += n;
    }
    Ok(())
}

/// Receive one whole message. `Ok(None)`: the peer closed the connection cleanly at a
/// message boundary. Messages larger than `max_size` (header included) are refused
/// before any allocation.
pub fn recv_message(sock: &UnixStream, max_size: usize) -> Result<Option<Message>, SocketError> {
    let mut fds = Vec::new();
    let mut hdr = [0u8; HEADER_SIZE];
    let n = recv_some(sock, &mut hdr, &mut fds)?;
    if n == 0 {
        return Ok(None);
    }
    if n < HEADER_SIZE {
        recv_exact(sock, &mut hdr[n..], &mut fds, n, HEADER_SIZE)?;
    }
    let header = Header::decode(&hdr, max_size)?;
    let mut payload = vec![0u8; header.payload_len()];
    recv_exact(
        sock,
        &mut payload,
        &mut fds,
        HEADER_SIZE,
        header.size as usize,
    )?;
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

/// Count this process's open fds (from /proc/self/fd), for leak checks.
pub fn open_fd_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

/// Wait until `sock` is readable or `deadline` passes (no deadline: return at once).
fn wait_readable(sock: &UnixStream, deadline: Option<Instant>) -> Result<(), SocketError> {
    let Some(deadline) = deadline else {
        return Ok(());
    };
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(SocketError::TimedOut);
        }
        let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd for at most `ms` milliseconds.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(());
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
    }
}

/// Size of a [`Receiver`]'s read-ahead buffer.
pub const RECV_BUF: usize = 64 * 1024;

/// A buffered message reader: one `recvmsg` usually brings a whole message (often
/// several), instead of one call for the header and one for the payload.
///
/// fds and read-ahead: the kernel ends a stream read right after the segment that
/// carried fds, and each sender `sendmsg` starts with a message header, so the fds of one
/// read belong to the message that contains the *last byte* of that read. Each fd batch
/// is recorded with that stream offset and handed to the message covering it. Payloads
/// larger than what is buffered are read straight into the message's own buffer (never
/// past the message end).
pub struct Receiver {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    pos: u64,
    fds: std::collections::VecDeque<(u64, Vec<OwnedFd>)>,
}

impl Default for Receiver {
    fn default() -> Self {
        Receiver {
            buf: vec![0u8; RECV_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            pos: 0,
            fds: std::collections::VecDeque::new(),
        }
    }
}

impl Receiver {
    /// An empty receiver.
    pub fn new() -> Self {
        Self::default()
    }

    /// Read more into the buffer; false on EOF.
    fn fill(&mut self, sock: &UnixStream, deadline: Option<Instant>) -> Result<bool, SocketError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let mut fds = Vec::new();
        wait_readable(sock, deadline)?;
        let n = recv_some(sock, &mut self.buf[self.end..], &mut fds)?;
        if n == 0 {
            return Ok(false);
        }
        if !fds.is_empty() {
            let last = self.pos + (self.end - self.start + n - 1) as u64;
            self.fds.push_back((last, fds));
        }
        self.end += n;
        Ok(true)
    }

    /// Receive one whole message (see [`recv_message`] for the contract).
    pub fn recv(
        &mut self,
        sock: &UnixStream,
        max_size: usize,
    ) -> Result<Option<Message>, SocketError> {
        self.recv_until(sock, max_size, None)
    }

    /// [`Receiver::recv`], giving up with [`SocketError::TimedOut`] when the socket stays
    /// silent until `deadline` (the stream is then unusable: the caller closes it).
    pub fn recv_until(
        &mut self,
        sock: &UnixStream,
        max_size: usize,
        deadline: Option<Instant>,
    ) -> Result<Option<Message>, SocketError> {
        while self.end - self.start < HEADER_SIZE {
            if !self.fill(sock, deadline)? {
                let got = self.end - self.start;
                if got == 0 && self.fds.is_empty() {
                    return Ok(None);
                }
                return Err(SocketError::Truncated {
                    got,
                    want: HEADER_SIZE,
                });
            }
        }
        let header = Header::decode(&self.buf[self.start..self.start + HEADER_SIZE], max_size)?;
        let msg_start = self.pos;
        let size = header.size as usize;
        let msg_end = msg_start + size as u64;
        let plen = header.payload_len();
        let mut payload = Vec::with_capacity(plen);
        let buffered = (self.end - self.start - HEADER_SIZE).min(plen);
        let from = self.start + HEADER_SIZE;
        payload.extend_from_slice(&self.buf[from..from + buffered]);
        self.start = from + buffered;
        self.pos += (HEADER_SIZE + buffered) as u64;
        if payload.len() < plen {
            // The buffer is empty now: read the rest straight into the payload.
            payload.resize(plen, 0);
            let mut got = buffered;
            while got < plen {
                let mut fds = Vec::new();
                wait_readable(sock, deadline)?;
                let n = recv_some(sock, &mut payload[got..], &mut fds)?;
                if n == 0 {
                    return Err(SocketError::Truncated {
                        got: HEADER_SIZE + got,
                        want: size,
                    });
                }
                if !fds.is_empty() {
                    self.fds.push_back((self.pos + n as u64 - 1, fds));
                }
                got += n;
                self.pos += n as u64;
            }
        }
        let mut fds = Vec::new();
        while self.fds.front().is_some_and(|(at, _)| *at < msg_end) {
            if let Some((_, f)) = self.fds.pop_front() {
                fds.extend(f);
            }
        }
        Ok(Some(Message {
            header,
            payload,
            fds,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Command;

    fn eventfd_with(count: u64) -> OwnedFd {
        // SAFETY: eventfd returns a new fd or -1 (asserted).
        let fd = unsafe { libc::eventfd(count as u32, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn counter(fd: &OwnedFd) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local.
        let r = unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        assert_eq!(r, 8);
        v
    }

    #[test]
    fn pipelined_messages_keep_their_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        // (payload length, eventfd counters attached)
        let plan: Vec<(usize, Vec<u64>)> = vec![
            (100, vec![]),
            (8, vec![11, 12]),
            (0, vec![]),
            (100_000, vec![13]),
            (3, vec![14]),
            (70_000, vec![]),
            (1, vec![15, 16, 17]),
        ];
        let p2 = plan.clone();
        let sender = std::thread::spawn(move || {
            for (i, (len, fds)) in p2.iter().enumerate() {
                let owned: Vec<OwnedFd> = fds.iter().map(|&c| eventfd_with(c)).collect();
                let raw: Vec<RawFd> = owned.iter().map(|f| f.as_raw_fd()).collect();
                let payload = vec![i as u8; *len];
                let h = Header::command(i as u16, Command::RegionWrite, *len).unwrap();
                send_message(&a, &h, &payload, &raw).unwrap();
            }
        });
        let mut r = Receiver::new();
        for (i, (len, fds)) in plan.iter().enumerate() {
            let m = r.recv(&b, 1 << 20).unwrap().unwrap();
            assert_eq!(m.header.msg_id, i as u16);
            assert_eq!(m.payload.len(), *len);
            assert!(m.payload.iter().all(|&x| x == i as u8));
            let got: Vec<u64> = m.fds.iter().map(counter).collect();
            assert_eq!(&got, fds, "fds of message {i}");
        }
        sender.join().unwrap();
        assert!(r.recv(&b, 1 << 20).unwrap().is_none());
    }

    #[test]
    fn oversized_and_truncated() {
        let (a, b) = UnixStream::pair().unwrap();
        let h = Header::command(1, Command::RegionWrite, 5000).unwrap();
        send_message(&a, &h, &[0; 5000], &[]).unwrap();
        assert!(matches!(
            Receiver::new().recv(&b, 4096),
            Err(SocketError::Header(ProtoError::BadMessageSize { .. }))
        ));
        let (a, b) = UnixStream::pair().unwrap();
        let mut raw = h.encode().to_vec();
        raw.extend_from_slice(&[0; 10]);
        use std::io::Write;
        (&a).write_all(&raw).unwrap();
        drop(a);
        assert!(matches!(
            Receiver::new().recv(&b, 1 << 20),
            Err(SocketError::Truncated { .. })
        ));
    }
}
