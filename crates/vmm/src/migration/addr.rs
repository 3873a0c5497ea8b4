//! Where a migration stream goes: a UNIX socket path (`unix:PATH`, or any value with a
//! `/`) or TCP (`tcp:HOST:PORT`). The stream is neither encrypted nor authenticated, so
//! a destination listens on TCP only on a loopback address, and on a UNIX socket that
//! only its own user may connect to (mode 0600, peer uid checked).

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

/// Errors of a migration address.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// Not understood.
    #[error("migration address {0:?} is not understood: use unix:PATH, a path with a '/', or tcp:HOST:PORT")]
    Parse(String),
    /// A TCP listener off loopback.
    #[error("refusing to listen for a migration on {0}: the stream is not encrypted or authenticated; use a UNIX socket or a loopback address (127.0.0.1 / [::1])")]
    NotLoopback(SocketAddr),
    /// Socket trouble.
    #[error("migration socket {addr}: {err}")]
    Io {
        /// The address.
        addr: String,
        /// Cause.
        err: std::io::Error,
    },
    /// A peer of another user.
    #[error("migration connection from uid {0} refused (only this process's own user may migrate into it)")]
    Peer(u32),
}

/// A migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationAddr {
    /// A UNIX socket.
    Unix(PathBuf),
    /// TCP.
    Tcp(String),
}

impl std::str::FromStr for MigrationAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, AddrError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(AddrError::Parse(s.into()));
            }
            return Ok(MigrationAddr::Unix(p.into()));
        }
        if let Some(t) = s.strip_prefix("tcp:") {
            if t.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(AddrError::Parse(s.into()));
            }
            return Ok(MigrationAddr::Tcp(t.into()));
        }
        if s.contains('/') {
            return Ok(MigrationAddr::Unix(s.into()));
        }
        Err(AddrError::Parse(s.into()))
    }
}

impl std::fmt::Display for MigrationAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A connected migration stream (either kind).
pub enum Stream {
    /// UNIX.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl std::io::Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl std::io::Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

impl super::MigrationStream for Stream {
    fn set_timeout(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Stream {
    /// A stream from a received socket fd (UNIX or TCP; anything else is refused).
    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Stream> {
        use std::os::fd::AsRawFd;
        let mut domain: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `domain` and `len` are live locals of the sizes the kernel is told.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_DOMAIN,
                &mut domain as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        if r != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the migration stream is not a socket",
            ));
        }
        match domain {
            libc::AF_UNIX => Ok(Stream::Unix(UnixStream::from(fd))),
            libc::AF_INET | libc::AF_INET6 => Ok(Stream::Tcp(TcpStream::from(fd))),
            d => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the migration stream is a socket of family {d}, not UNIX or TCP"),
            )),
        }
    }

    /// The stream as an fd (to hand to a VMM over its control socket).
    pub fn into_fd(self) -> OwnedFd {
        match self {
            Stream::Unix(s) => s.into(),
            Stream::Tcp(s) => s.into(),
        }
    }
}

impl MigrationAddr {
    fn io(&self, err: std::io::Error) -> AddrError {
        AddrError::Io {
            addr: self.to_string(),
            err,
        }
    }

    /// Connect to a listening destination.
    pub fn connect(&self) -> Result<Stream, AddrError> {
        match self {
            MigrationAddr::Unix(p) => UnixStream::connect(p)
                .map(Stream::Unix)
                .map_err(|e| self.io(e)),
            MigrationAddr::Tcp(a) => TcpStream::connect(a.as_str())
                .map(|s| {
                    let _ = s.set_nodelay(true);
                    Stream::Tcp(s)
                })
                .map_err(|e| self.io(e)),
        }
    }

    /// Listen and accept one migration (a UNIX peer must be this process's user).
    pub fn accept_one(&self) -> Result<Stream, AddrError> {
        match self {
            MigrationAddr::Unix(p) => {
                let l: UnixListener = nestio_vfio_user::socket::listen_private(p)
                    .map_err(|e| self.io(std::io::Error::other(e.to_string())))?;
                let (s, _) = l.accept().map_err(|e| self.io(e))?;
                let _ = std::fs::remove_file(p);
                let cred =
                    nestio_vfio_user::socket::peer_credentials(&s).map_err(|e| self.io(e))?;
                // SAFETY: geteuid has no preconditions.
                let me = unsafe { libc::geteuid() };
                if cred.uid != me {
                    return Err(AddrError::Peer(cred.uid));
                }
                Ok(Stream::Unix(s))
            }
            MigrationAddr::Tcp(a) => {
                let addr = a
                    .to_socket_addrs()
                    .map_err(|e| self.io(e))?
                    .next()
                    .ok_or_else(|| AddrError::Parse(a.clone()))?;
                if !addr.ip().is_loopback() {
                    return Err(AddrError::NotLoopback(addr));
                }
                let l = TcpListener::bind(addr).map_err(|e| self.io(e))?;
                let (s, _) = l.accept().map_err(|e| self.io(e))?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<MigrationAddr>().unwrap(),
            MigrationAddr::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            "./m.sock".parse::<MigrationAddr>().unwrap(),
            MigrationAddr::Unix("./m.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<MigrationAddr>().unwrap(),
            MigrationAddr::Tcp("127.0.0.1:4444".into())
        );
        for bad in [
            "",
            "unix:",
            "tcp:1.2.3.4",
            "tcp::80",
            "tcp:h:99999",
            "m.sock",
        ] {
            assert!(bad.parse::<MigrationAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tcp_listen_is_loopback_only() {
        let a: MigrationAddr = "tcp:0.0.0.0:0".parse().unwrap();
        assert!(matches!(a.accept_one(), Err(AddrError::NotLoopback(_))));
    }
}
