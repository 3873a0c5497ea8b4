//! nestio-net: network backends for the emulated e1000 NIC.
//!
//! A backend moves whole Ethernet frames (destination MAC first, no FCS)
//! between the emulated device and some network. The device sees only the
//! [`NetBackend`] trait and [`open_backend`]:
//! - [`user`]: an in-process virtual network (10.0.2.0/24, gateway 10.0.2.2
//!   answering ARP, ICMP echo, UDP echo on port 7 and DHCP);
//! - [`tap`]: a Linux tap interface (`/dev/net/tun`, IFF_TAP|IFF_NO_PI);
//! - [`udp`]: frames as UDP datagrams to a peer (QEMU `-netdev dgram` framing);
//! - [`pcap`]: a pcap writer and a wrapper recording both directions.
//!
//! [`packet`] holds the typed, defensive parsers and builders the user
//! network is made of; they are public for tests of other crates.
//!
//! All backends are non-blocking: `recv` never waits, and `poll_fd` is the
//! descriptor a device's event loop polls for POLLIN.

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

pub mod netns;
pub mod none;
pub mod packet;
pub mod pcap;
pub mod tap;
pub mod udp;
pub mod user;

pub use none::NoneBackend;
pub use packet::MacAddr;
pub use pcap::{PcapBackend, PcapWriter};
pub use tap::TapBackend;
pub use udp::UdpBackend;
pub use user::{UserBackend, UserNetwork, UserStats};

/// Errors of the network backends.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The backend spec could not be parsed.
    #[error("invalid --net spec {spec:?}: {reason} (expected \"user\", \"tap=NAME\", \"udp=LOCALADDR:PORT,REMOTEADDR:PORT\" or \"none\")")]
    InvalidSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A frame did not fit the receive buffer; it was dropped.
    #[error("frame of {len} bytes does not fit the {buf}-byte receive buffer; frame dropped (use a larger receive buffer)")]
    FrameTooLarge {
        /// Frame length.
        len: usize,
        /// Buffer length.
        buf: usize,
    },
    /// The user or none backend could not create its eventfd.
    #[error("cannot create an eventfd for the network backend: {0} (out of file descriptors? raise `ulimit -n`)")]
    Eventfd(#[source] std::io::Error),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0} (need root or CAP_NET_ADMIN, and the tun driver: `modprobe tun`)")]
    TapOpen(#[source] std::io::Error),
    /// The tap interface name is unusable.
    #[error("invalid tap interface name {name:?}: {reason}")]
    TapName {
        /// The name given.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// TUNSETIFF failed.
    #[error("cannot create or attach tap interface {name}: {source} (need root or CAP_NET_ADMIN; EBUSY means another process holds it, EINVAL that a non-tap interface has that name)")]
    TapCreate {
        /// Interface name.
        name: String,
        /// The ioctl error.
        #[source]
        source: std::io::Error,
    },
    /// A UDP socket could not be bound.
    #[error("cannot bind UDP socket to {addr}: {source} (is the port in use, or the address not on this host?)")]
    UdpBind {
        /// Local address.
        addr: std::net::SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The pcap file could not be created.
    #[error("cannot create pcap file {}: {source} (does the directory exist and is it writable?)", path.display())]
    PcapCreate {
        /// Path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Writing a pcap record failed.
    #[error("cannot write pcap data: {0} (disk full?)")]
    PcapWrite(#[source] std::io::Error),
    /// The backend cannot take a frame now; it was dropped (like a congested wire).
    #[error("{backend}: send buffer full, frame dropped (the peer is not reading fast enough)")]
    WouldBlock {
        /// Backend description.
        backend: String,
    },
    /// Another I/O error on a backend's descriptor.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A network backend for an emulated NIC.
pub trait NetBackend: Send {
    /// Send one Ethernet frame (dest MAC first, no FCS) from the device to the network.
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError>;
    /// Non-blocking: copy the next frame for the device into `buf`, return its length;
    /// `Ok(None)` when nothing is pending. A frame longer than `buf` is dropped and
    /// `Err(NetError::FrameTooLarge{..})` returned.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetError>;
    /// An fd that polls readable (POLLIN) whenever `recv` may return a frame (except
    /// while notifications are held: [`NetBackend::hold_notifications`]).
    fn poll_fd(&self) -> BorrowedFd<'_>;
    /// Event suppression, as virtio's `VRING_F_NO_NOTIFY`: while held, frames the
    /// backend queues in answer to `send` do not make `poll_fd` readable, because the
    /// caller receives them itself right after sending (a device's register path
    /// receiving a synchronous peer's answer), so a thread waiting on the fd would be
    /// woken for nothing. Releasing makes the fd readable again if any frame is still
    /// pending. A caller that holds must release before anyone relies on the fd. The
    /// default ignores it: backends whose frames come from outside (a TAP, a socket)
    /// always notify.
    fn hold_notifications(&mut self, _hold: bool) {}
    /// Short human description, e.g. "user (10.0.2.0/24)", "tap nestio0".
    fn describe(&self) -> String;
}

/// One-line help for a CLI `--net` option.
pub const NET_SPEC_HELP: &str = "network backend: \"user\" (built-in 10.0.2.0/24 network: gateway/DHCP 10.0.2.2, \
guest 10.0.2.15, ping and UDP echo on port 7), \"tap=NAME\" (Linux tap interface, needs CAP_NET_ADMIN), \
\"udp=LOCALADDR:PORT,REMOTEADDR:PORT\" (one Ethernet frame per UDP datagram, QEMU -netdev dgram framing), \
or \"none\" (no peer: transmitted frames are dropped, nothing is received)";

/// A parsed `--net` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetSpec {
    /// "user".
    User,
    /// "none".
    None,
    /// "tap=NAME".
    Tap(String),
    /// "udp=LOCAL,REMOTE".
    Udp {
        /// Local bind address.
        local: std::net::SocketAddr,
        /// Peer address.
        remote: std::net::SocketAddr,
    },
}

impl std::str::FromStr for NetSpec {
    type Err = NetError;

    fn from_str(spec: &str) -> Result<Self, NetError> {
        let bad = |reason: String| NetError::InvalidSpec {
            spec: spec.to_string(),
            reason,
        };
        let (kind, arg) = match spec.split_once('=') {
            Some((k, a)) => (k, Some(a)),
            None => (spec, None),
        };
        match (kind, arg) {
            ("user", None) => Ok(NetSpec::User),
            ("user", Some(_)) => Err(bad("\"user\" takes no arguments".into())),
            ("none", None) => Ok(NetSpec::None),
            ("none", Some(_)) => Err(bad("\"none\" takes no arguments".into())),
            ("tap", Some(name)) => {
                tap::validate_ifname(name)?;
                Ok(NetSpec::Tap(name.to_string()))
            }
            ("udp", Some(addrs)) => {
                let (l, r) = addrs
                    .split_once(',')
                    .ok_or_else(|| bad("udp needs LOCALADDR:PORT,REMOTEADDR:PORT".into()))?;
                let local: std::net::SocketAddr = l.parse().map_err(|e| {
                    bad(format!(
                        "local address {l:?}: {e} (use a numeric IP:PORT, [v6]:PORT)"
                    ))
                })?;
                let remote: std::net::SocketAddr = r.parse().map_err(|e| {
                    bad(format!(
                        "remote address {r:?}: {e} (use a numeric IP:PORT, [v6]:PORT)"
                    ))
                })?;
                if remote.port() == 0 || remote.ip().is_unspecified() {
                    return Err(bad(format!(
                        "remote address {remote} needs a real address and a non-zero port"
                    )));
                }
                if local.is_ipv4() != remote.is_ipv4() {
                    return Err(bad(
                        "local and remote addresses must both be IPv4 or both IPv6".into(),
                    ));
                }
                Ok(NetSpec::Udp { local, remote })
            }
            ("tap", None) | ("udp", None) => {
                Err(bad(format!("{kind} needs an argument after '='")))
            }
            _ => Err(bad(format!("unknown backend {kind:?}"))),
        }
    }
}

/// Parse a --net spec: "user", "tap=NAME", "udp=LOCALADDR:PORT,REMOTEADDR:PORT", "none";
/// `pcap: Some(path)` wraps the backend so every frame both ways is written to a pcap file.
pub fn open_backend(spec: &str, pcap: Option<&Path>) -> Result<Box<dyn NetBackend>, NetError> {
    let backend: Box<dyn NetBackend> = match spec.parse::<NetSpec>()? {
        NetSpec::User => Box::new(UserBackend::new()?),
        NetSpec::None => Box::new(NoneBackend::new()?),
        NetSpec::Tap(name) => Box::new(TapBackend::open(&name)?),
        NetSpec::Udp { local, remote } => Box::new(UdpBackend::new(local, remote)?),
    };
    match pcap {
        Some(path) => Ok(Box::new(PcapBackend::create(backend, path)?)),
        None => Ok(backend),
    }
}

/// Fuzzing entry point: feed arbitrary bytes to a fresh user backend, first
/// as one frame, then as a sequence of frames each prefixed by a big-endian
/// u16 length (so stateful exchanges such as DISCOVER then REQUEST are
/// reachable). Every reply is checked to be a well-formed frame from the
/// gateway with valid checksums; a violation panics (a fuzzing finding).
#[cfg(feature = "harness")]
pub fn fuzz_user_backend(data: &[u8]) {
    let Ok(mut b) = UserBackend::new() else {
        return;
    };
    let mut buf = vec![0u8; 65536 + 64];
    let mut feed = |b: &mut UserBackend, frame: &[u8]| {
        b.send(frame).expect("user backend send never fails");
        while let Some(n) = b.recv(&mut buf).expect("reply fits a 64 KiB buffer") {
            user::check_reply(&buf[..n]);
        }
    };
    feed(&mut b, data);
    let mut rest = data;
    while let [hi, lo, tail @ ..] = rest {
        let n = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (frame, next) = tail.split_at(n);
        feed(&mut b, frame);
        rest = next;
    }
}
