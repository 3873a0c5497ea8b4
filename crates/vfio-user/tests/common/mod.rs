//! Shared helpers for the vfio-user integration tests: a server on a thread serving the
//! crate's TestDevice, raw-socket helpers for malformed input, a Vec-backed DmaPeer.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nestio_dma::DmaPeer;
use nestio_vfio_user::proto::{Capabilities, Command, Header, TwinSocket, Version};
use nestio_vfio_user::socket::{recv_message, send_message, Message};
use nestio_vfio_user::testdev::TestDevice;
use nestio_vfio_user::{Client, ClientConfig, Server, ServerConfig, ServerError};

pub struct Harness {
    pub dev: Arc<TestDevice>,
    pub server: Arc<Server>,
}

impl Harness {
    pub fn new(config: ServerConfig) -> Harness {
        let dev = Arc::new(TestDevice::new().unwrap());
        let server = Arc::new(Server::new(dev.clone(), config));
        Harness { dev, server }
    }

    /// Serve one session on a thread; returns our end of the socket.
    pub fn session(&self) -> (UnixStream, JoinHandle<Result<(), ServerError>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let s = self.server.clone();
        (a, std::thread::spawn(move || s.serve_stream(b)))
    }

    pub fn client(&self, config: ClientConfig) -> (Client, JoinHandle<Result<(), ServerError>>) {
        let (a, h) = self.session();
        (Client::from_stream(a, config).unwrap(), h)
    }
}

pub fn send(sock: &UnixStream, id: u16, cmd: u16, payload: &[u8], fds: &[RawFd]) {
    let h = Header {
        msg_id: id,
        cmd,
        size: (16 + payload.len()) as u32,
        flags: 0,
        error: 0,
    };
    send_message(sock, &h, payload, fds).unwrap();
}

pub fn recv(sock: &UnixStream) -> Option<Message> {
    recv_message(sock, 1 << 22).unwrap()
}

/// Expect a successful reply to message `id`; returns it.
pub fn expect_ok(sock: &UnixStream, id: u16) -> Message {
    let m = recv(sock).expect("a reply");
    assert_eq!(m.header.msg_id, id);
    assert!(!m.header.is_error(), "expected a reply, got {:?}", m.header);
    m
}

/// Expect an error reply with `errno` to message `id`.
pub fn expect_error(sock: &UnixStream, id: u16, errno: i32) {
    let m = recv(sock).expect("a reply");
    assert_eq!(m.header.msg_id, id);
    assert!(
        m.header.is_error(),
        "expected an error reply, got {:?}",
        m.header
    );
    assert_eq!(m.header.error as i32, errno, "errno");
    assert!(m.payload.is_empty());
}

/// Negotiate VERSION on a raw socket (no twin socket).
pub fn raw_version(sock: &UnixStream) -> Version {
    raw_version_with(sock, Capabilities::default())
}

/// [`raw_version`] proposing `caps` (its twin socket turned off).
pub fn raw_version_with(sock: &UnixStream, caps: Capabilities) -> Version {
    let v = Version {
        major: 0,
        minor: 2,
        caps: Capabilities {
            twin_socket: Some(TwinSocket {
                supported: false,
                fd_index: None,
            }),
            ..caps
        },
    };
    let mut p = Vec::new();
    v.encode_into(&mut p);
    send(sock, 1, Command::Version as u16, &p, &[]);
    let m = recv(sock).unwrap();
    assert!(!m.header.is_error());
    assert!(m.fds.is_empty());
    Version::decode(&m.payload).unwrap()
}

/// GET_INFO on a raw socket; returns num_regions.
pub fn raw_get_info(sock: &UnixStream, id: u16) -> u32 {
    let mut p = Vec::new();
    for v in [16u32, 0, 0, 0] {
        p.extend_from_slice(&v.to_ne_bytes());
    }
    send(sock, id, Command::DeviceGetInfo as u16, &p, &[]);
    let m = recv(sock).unwrap();
    assert_eq!(m.header.msg_id, id);
    assert!(!m.header.is_error(), "GET_INFO failed: {:?}", m.header);
    u32::from_ne_bytes(m.payload[8..12].try_into().unwrap())
}

pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a new fd or -1, checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: fresh fd owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

pub fn eventfd_count(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64.
    let r = unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    if r == 8 {
        v
    } else {
        0
    }
}

pub fn memfd(size: u64) -> OwnedFd {
    nestio_dma::memfd::sealed_memfd(c"nestio-test", size).expect("memfd")
}

pub fn pwrite(fd: &OwnedFd, off: u64, data: &[u8]) {
    // SAFETY: writes from a live buffer.
    let r = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            data.as_ptr() as *const libc::c_void,
            data.len(),
            off as libc::off_t,
        )
    };
    assert_eq!(r as usize, data.len());
}

pub fn pread(fd: &OwnedFd, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: reads into a live buffer of len bytes.
    let r = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            v.as_mut_ptr() as *mut libc::c_void,
            len,
            off as libc::off_t,
        )
    };
    assert_eq!(r as usize, len);
    v
}

/// Memory owned by the client side, reached by the server through DMA_READ/WRITE.
pub struct VecPeer {
    pub base: u64,
    pub mem: Mutex<Vec<u8>>,
    pub ops: Mutex<u64>,
}

impl VecPeer {
    pub fn new(base: u64, len: usize) -> Arc<VecPeer> {
        Arc::new(VecPeer {
            base,
            mem: Mutex::new(vec![0; len]),
            ops: Mutex::new(0),
        })
    }
    fn span(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, i32> {
        let off = addr.checked_sub(self.base).ok_or(libc::EFAULT)? as usize;
        let end = off.checked_add(len).ok_or(libc::EFAULT)?;
        if end > self.mem.lock().unwrap().len() {
            return Err(libc::EFAULT);
        }
        Ok(off..end)
    }
}

impl DmaPeer for VecPeer {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), i32> {
        let r = self.span(addr, buf.len())?;
        buf.copy_from_slice(&self.mem.lock().unwrap()[r]);
        *self.ops.lock().unwrap() += 1;
        Ok(())
    }
    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), i32> {
        let r = self.span(addr, data.len())?;
        self.mem.lock().unwrap()[r].copy_from_slice(data);
        *self.ops.lock().unwrap() += 1;
        Ok(())
    }
}

/// Program the test device's DMA engine through `dev` and return DMA_STATUS.
pub fn device_dma(
    dev: &dyn nestio_device_model::VfioDevice,
    addr: u64,
    len: u64,
    off: u64,
    cmd: u64,
) -> u64 {
    use nestio_vfio_user::testdev::reg;
    dev.region_write(1, reg::DMA_ADDR, &addr.to_le_bytes())
        .unwrap();
    dev.region_write(1, reg::DMA_LEN, &len.to_le_bytes())
        .unwrap();
    dev.region_write(1, reg::DMA_OFF, &off.to_le_bytes())
        .unwrap();
    dev.region_write(1, reg::DMA_CMD, &cmd.to_le_bytes())
        .unwrap();
    let mut s = [0u8; 8];
    dev.region_read(1, reg::DMA_STATUS, &mut s).unwrap();
    u64::from_le_bytes(s)
}
