//! Entry points for the fuzz targets (kept in the crate so each target is two lines).
//!
//! [`fuzz_dispatch`] plays a client: it negotiates VERSION (with a twin socket, whose
//! DMA requests it answers with EFAULT so the server never waits forever, and the
//! nested-IOMMU extension, so BIND/INVALIDATE/UNBIND reach their handlers), writes the
//! fuzz bytes as the rest of the stream, closes its write side and drains every reply
//! until the server ends the session. The server must neither panic nor hang.
//!
//! [`fuzz_client`] turns it around: a scripted fake server (a thread on the other end of
//! a socketpair) answers a real [`crate::Client`]'s requests with replies built from the
//! fuzz bytes — well formed, mutated, errors, silence, stray fds, its own DMA commands —
//! while the client runs a fixed sequence of device operations. A device process below
//! us may be compromised: nothing it sends may panic, hang or leak an fd in the client.
//!
//! [`fuzz_sessions`] plays many clients at once against a listening server: connects,
//! VERSIONs, garbage, state-changing commands, half-closes and closes in any order. The
//! one-owner rule, the handshake timeout and the connection cap must hold, and once
//! everyone has left the device must be released to a clean state.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use crate::nested_iommu::{NestedIommuCap, NestedIommuCaps};
use crate::proto::{Capabilities, Command, Header, TwinSocket, Version};
use crate::server::{Server, ServerConfig};
use crate::socket::{recv_message, send_message};
use crate::testdev::TestDevice;

pub use crate::proto::fuzz_decode;

/// Feed `data` as a client byte stream to a server serving a [`TestDevice`].
pub fn fuzz_dispatch(data: &[u8]) {
    let Ok(dev) = TestDevice::new() else { return };
    let server = Server::new(
        Arc::new(dev),
        ServerConfig {
            max_data_xfer_size: 64 * 1024,
            max_msg_fds: 8,
            ..ServerConfig::default()
        },
    );
    let Ok((client, srv_end)) = UnixStream::pair() else {
        return;
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = server.serve_stream(srv_end);
        });
        if drive(s, &client, data).is_none() {
            // Handshake failed: unblock the server so the scope can end.
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
    });
}

fn drive<'s>(s: &'s std::thread::Scope<'s, '_>, client: &UnixStream, data: &[u8]) -> Option<()> {
    let v = Version {
        major: crate::proto::VERSION_MAJOR,
        minor: crate::proto::VERSION_MINOR,
        caps: Capabilities {
            twin_socket: Some(TwinSocket {
                supported: true,
                fd_index: None,
            }),
            write_multiple: true,
            nestio_nested_iommu: Some(NestedIommuCap::smmuv3(NestedIommuCaps::default())),
            ..Capabilities::default()
        },
    };
    let mut p = Vec::new();
    v.encode_into(&mut p);
    let h = Header::command(0, Command::Version, p.len()).ok()?;
    send_message(client, &h, &p, &[]).ok()?;
    let reply = recv_message(client, 1 << 20).ok()??;
    if let Some(fd) = reply.fds.into_iter().next() {
        let twin = UnixStream::from(fd);
        s.spawn(move || {
            while let Ok(Some(m)) = recv_message(&twin, 1 << 20) {
                let _ = send_message(&twin, &m.header.error_reply(libc::EFAULT), &[], &[]);
            }
        });
    }
    let mut drain = client.try_clone().ok()?;
    s.spawn(move || {
        let mut b = vec![0u8; 65536];
        while matches!(drain.read(&mut b), Ok(n) if n > 0) {}
    });
    let mut w = client;
    let _ = w.write_all(data);
    let _ = client.shutdown(std::net::Shutdown::Write);
    Some(())
}

// ---------------------------------------------------------------------------------
// The client facing a hostile server.

/// Bytes the fuzzer chose, read front to back; a read past the end gives `None` (the
/// `*_or0` forms give zero, so a reply is still built when the script runs dry).
struct Script<'a> {
    d: &'a [u8],
}

impl<'a> Script<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.d.split_first()?;
        self.d = rest;
        Some(b)
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.d.split_at(n.min(self.d.len()));
        self.d = b;
        a
    }
    fn b(&mut self) -> u8 {
        self.u8().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        let mut a = [0u8; 2];
        let t = self.take(2);
        a[..t.len()].copy_from_slice(t);
        u16::from_le_bytes(a)
    }
    fn u32(&mut self) -> u32 {
        let mut a = [0u8; 4];
        let t = self.take(4);
        a[..t.len()].copy_from_slice(t);
        u32::from_le_bytes(a)
    }
    fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        let t = self.take(8);
        a[..t.len()].copy_from_slice(t);
        u64::from_le_bytes(a)
    }
    /// Exactly `n` bytes: the script's next ones, zero-padded.
    fn fill(&mut self, n: usize) -> Vec<u8> {
        let mut v = self.take(n).to_vec();
        v.resize(n, 0);
        v
    }
}

/// Bytes at the start of a `fuzz_client` input: VERSION mode, client settings, and the
/// parameters of the client's operations; the rest is the fake server's script.
const CLIENT_PREFIX: usize = 18;
/// Where the client maps its peer-backed (message-served) DMA memory.
const PEER_IOVA: u64 = 0x10_0000;
const PEER_LEN: usize = 0x4000;
/// Where the client maps its fd-backed DMA memory.
const FD_IOVA: u64 = 0x20_0000;

/// Memory served by DMA_READ/DMA_WRITE messages.
struct VecPeer(parking_lot::Mutex<Vec<u8>>);

impl nestio_dma::DmaPeer for VecPeer {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), i32> {
        let m = self.0.lock();
        let off = addr.checked_sub(PEER_IOVA).ok_or(libc::EFAULT)? as usize;
        let src = off
            .checked_add(buf.len())
            .and_then(|end| m.get(off..end))
            .ok_or(libc::EFAULT)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), i32> {
        let mut m = self.0.lock();
        let off = addr.checked_sub(PEER_IOVA).ok_or(libc::EFAULT)? as usize;
        let dst = off
            .checked_add(data.len())
            .and_then(|end| m.get_mut(off..end))
            .ok_or(libc::EFAULT)?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

fn eventfd() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd takes no pointers; the result is checked.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    // SAFETY: a new descriptor owned by nothing else.
    (raw >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// An fd of a kind the script picks: eventfd, sealed memfd, unsealed memfd, or one end
/// of a socketpair whose other end is closed.
fn junk_fd(kind: u8) -> Option<std::os::fd::OwnedFd> {
    match kind % 4 {
        0 => eventfd(),
        1 => nestio_dma::memfd::sealed_memfd(c"fuzz-region", 4096).ok(),
        2 => {
            use std::os::fd::FromRawFd;
            // SAFETY: memfd_create reads a NUL-terminated literal; the result is checked.
            let raw = unsafe { libc::memfd_create(c"fuzz-unsealed".as_ptr(), libc::MFD_CLOEXEC) };
            // SAFETY: a new descriptor owned by nothing else.
            (raw >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
        }
        _ => UnixStream::pair().ok().map(|(a, _)| a.into()),
    }
}

/// Feed `data` to a [`crate::Client`] as the behaviour of a hostile server: the server
/// answers VERSION (correctly or corrupted, as the first byte says) and then every
/// request with a reply built from the script — well formed, mutated (msg_id, command,
/// flags, size, payload), an error, raw bytes or silence, with fds attached, with DMA
/// commands of its own before the reply, or the connection closed. The client runs a
/// fixed sequence of device operations; each must return `Ok` or an error, none may
/// panic or hang, and a reply must never break the client's promises (sparse areas
/// inside their region, MMAP only with an fd).
pub fn fuzz_client(data: &[u8]) {
    client_run(data);
}

/// [`fuzz_client`]'s body; returns how many client operations succeeded.
fn client_run(data: &[u8]) -> usize {
    // A silent server costs one timeout: the connection is closed after it, and
    // every later call fails at once.
    client_run_timeout(data, std::time::Duration::from_millis(25))
}

/// [`client_run`] with the client's reply timeout `timeout` (tests that count
/// operations exactly use a long one, so a loaded host cannot make one time out).
fn client_run_timeout(data: &[u8], timeout: std::time::Duration) -> usize {
    let (prefix, script) = data.split_at(data.len().min(CLIENT_PREFIX));
    let mut p = Script { d: prefix };
    let v0 = p.b();
    let settings = p.b();
    let config = crate::ClientConfig {
        twin_socket: settings & 1 != 0,
        write_multiple: settings & 2 != 0,
        max_data_xfer_size: [1 << 20, 65536, 4096, 256][(settings as usize >> 2) & 3],
        max_msg_fds: 1 + u32::from(settings >> 4),
        reply_timeout: Some(timeout),
        // v0 bit 6: propose the nested-IOMMU extension.
        nested_iommu: (v0 & 0x40 != 0).then(NestedIommuCaps::default),
        posted_ring: settings & 0x80 != 0,
    };
    let Ok((client_end, server_end)) = UnixStream::pair() else {
        return 0;
    };
    let twin_offered = config.twin_socket;
    std::thread::scope(|s| {
        s.spawn(move || fake_server(server_end, v0, twin_offered, Script { d: script }));
        run_client(client_end, config, &mut p)
    })
}

/// The conformance suite ([`crate::conformance`]) against the same scripted hostile
/// server the client target plays: whatever the server answers, the suite ends with one
/// verdict per check and never panics or hangs.
pub fn fuzz_conformance(data: &[u8]) {
    let (prefix, script) = data.split_at(data.len().min(CLIENT_PREFIX));
    let v0 = Script { d: prefix }.b();
    let Ok((suite_end, server_end)) = UnixStream::pair() else {
        return;
    };
    let opts = crate::conformance::Options {
        reply_timeout: std::time::Duration::from_millis(20),
        irq_timeout: std::time::Duration::from_millis(5),
        ..crate::conformance::Options::default()
    };
    let report = std::thread::scope(|s| {
        s.spawn(move || fake_server(server_end, v0, false, Script { d: script }));
        crate::conformance::run(suite_end, &opts)
    });
    if let Ok(r) = report {
        let names: Vec<&str> = r.results.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            crate::conformance::CHECKS,
            "every check gets exactly one verdict, in order"
        );
    }
}

/// [`fuzz_conformance`], then check that no fd stayed open (the single-threaded fuzz
/// target only, as for [`fuzz_client_no_fd_leak`]).
pub fn fuzz_conformance_no_fd_leak(data: &[u8]) {
    let before = crate::socket::open_fd_count().ok();
    fuzz_conformance(data);
    let after = crate::socket::open_fd_count().ok();
    assert_eq!(before, after, "fuzz_conformance leaked fds");
}

/// [`fuzz_client`], then check that no fd stayed open. Only meaningful when nothing else
/// in the process opens or closes fds meanwhile (the single-threaded fuzz target).
pub fn fuzz_client_no_fd_leak(data: &[u8]) {
    let before = crate::socket::open_fd_count().ok();
    fuzz_client(data);
    let after = crate::socket::open_fd_count().ok();
    assert_eq!(before, after, "fuzz_client leaked fds");
}

/// Runs the client's operations; returns how many succeeded (0: no connection).
fn run_client(stream: UnixStream, config: crate::ClientConfig, p: &mut Script<'_>) -> usize {
    use nestio_device_model::{region_flags, IrqAction, IrqData, MigState, VfioDevice};
    use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};

    let Ok(c) = crate::Client::from_stream(stream, config) else {
        return 0;
    };
    let mut ok = 1;
    let mut count = |r: bool| ok += usize::from(r);
    let _ = (c.info(), c.version(), c.twin_socket(), c.write_multiple());
    // Memory the server may reach by message from now on.
    let peer = Arc::new(VecPeer(parking_lot::Mutex::new(vec![0u8; PEER_LEN])));
    if let Ok(range) = DmaRange::new(PEER_IOVA, PEER_LEN as u64) {
        count(
            c.dma_map(DmaMapRequest {
                range,
                prot: Prot::RW,
                backing: DmaBacking::Peer(peer),
            })
            .is_ok(),
        );
    }
    let extra = p.b();
    for idx in [0, 1, 2, 7, u32::from(extra % 16)] {
        if let Ok(r) = c.region_info(idx) {
            for a in &r.sparse {
                assert!(
                    a.offset.checked_add(a.size).is_some_and(|e| e <= r.size),
                    "client accepted sparse area {a:?} outside region {idx} of {:#x} bytes",
                    r.size
                );
            }
            assert!(
                r.fd.is_some() || r.flags & region_flags::MMAP == 0,
                "MMAP flag without an fd"
            );
            assert_eq!(
                r.flags & region_flags::CAPS,
                0,
                "CAPS flag leaked to the user"
            );
        }
    }
    if let Ok(fds) = c.region_io_fds(u32::from(extra >> 4)) {
        for f in &fds {
            assert!(f.offset.checked_add(f.size).is_some());
        }
    }
    for idx in [0, 2, u32::from(p.b() % 8)] {
        count(c.irq_info(idx).is_ok());
    }
    let off = u64::from(p.u16());
    let mut small = vec![0u8; 1 + usize::from(p.b() % 64)];
    count(c.region_read(0, off, &mut small).is_ok());
    let mut big = vec![0u8; 1 + usize::from(p.u16() % 4096)];
    count(c.region_read(2, off, &mut big).is_ok());
    count(c.region_read(7, off, &mut []).is_ok());
    count(c.region_write(0, off, &small).is_ok());
    count(c.region_write(1, off, &big).is_ok());
    if p.b() & 1 != 0 {
        // Larger than a socket buffer: a server that stops reading must not block us.
        count(c.region_write(1, 0, &vec![0x5a; 512 << 10]).is_ok());
    }
    let writes: Vec<_> = (0..3u8)
        .filter_map(|i| crate::proto::MultiWrite::new(0, off + u64::from(i) * 4, &[i; 4]))
        .collect();
    count(c.region_write_multi(&writes).is_ok());
    count(c.region_write_posted(0, off, &small[..1]).is_ok());
    count(
        c.set_irqs(1, IrqAction::Trigger, 0, 1, IrqData::None)
            .is_ok(),
    );
    count(
        c.set_irqs(2, IrqAction::Mask, 0, 2, IrqData::Bool(vec![true, false]))
            .is_ok(),
    );
    let sel = p.b();
    let fds: Vec<_> = (0..4)
        .map(|i| if sel & (1 << i) != 0 { eventfd() } else { None })
        .collect();
    count(
        c.set_irqs(
            2,
            IrqAction::Trigger,
            0,
            fds.len() as u32,
            IrqData::Eventfd(fds),
        )
        .is_ok(),
    );
    if let (Ok(fd), Ok(range)) = (
        nestio_dma::memfd::sealed_memfd(c"fuzz-ram", 0x10000),
        DmaRange::new(FD_IOVA, 0x10000),
    ) {
        count(
            c.dma_map(DmaMapRequest {
                range,
                prot: Prot::RW,
                backing: DmaBacking::Fd {
                    fd: Arc::new(fd),
                    offset: 0,
                },
            })
            .is_ok(),
        );
    }
    if let Ok(range) = DmaRange::new(PEER_IOVA, 1 + u64::from(p.u16())) {
        count(c.dma_logging_start(4096, &[range]).is_ok());
        count(c.dma_logging_report(range, 4096).is_ok());
        count(c.dma_logging_report(range, 1 << (p.b() % 24)).is_ok());
        count(c.dma_logging_stop().is_ok());
    }
    count(c.dma_unmap(FD_IOVA, 0x10000).is_ok());
    count(c.reset().is_ok());
    count(c.migration_flags().is_some());
    count(c.mig_state().is_ok());
    count(c.mig_set_state(MigState::StopCopy).is_ok());
    let mut mig = vec![0u8; 1 + usize::from(p.u16() % 2048)];
    count(c.mig_data_read(&mut mig).is_ok());
    count(c.mig_set_state(MigState::Resuming).is_ok());
    count(c.mig_data_write(&mig).is_ok());
    count(c.mig_set_state(MigState::Running).is_ok());
    // Two threads waiting at once: replies are demultiplexed by msg_id, whichever
    // thread reads them (a reply with a wrong id or command may reach the other one).
    let c2 = &c;
    let other = std::thread::scope(|s| {
        let t = s.spawn(move || {
            let mut b = [0u8; 8];
            (0..4u64)
                .filter(|&i| c2.region_read(0, i * 8, &mut b).is_ok())
                .count()
        });
        for i in 0..4 {
            count(c.irq_info(i).is_ok());
        }
        t.join().unwrap_or(0)
    });
    count(other > 0);
    // The nested-IOMMU extension (refused locally unless negotiated).
    let negotiated = c.nested_iommu();
    if let Some(n) = &negotiated {
        assert!(n.version >= 1 && n.ias >= 32 && n.oas >= 32 && !n.granules.is_empty());
    }
    let faults = c.take_iommu_faults();
    assert_eq!(faults.is_some(), negotiated.is_some());
    count(c.iommu_bind(p.u32(), p.u64() | 0xb, p.u64()).is_ok());
    let cmds: Vec<[u8; 16]> = (0..1 + usize::from(p.b()) * 2)
        .map(|i| {
            let mut c = [0u8; 16];
            c[0] = [0x10, 0x12, 0x46, 0x05][i % 4];
            c
        })
        .collect();
    if let Ok(r) = c.iommu_invalidate(&cmds) {
        assert!(r.done as usize <= cmds.len());
        assert_eq!(r.cerror == 0, r.done as usize == cmds.len());
        count(true);
    }
    count(c.iommu_unbind().is_ok());
    if let Some(rx) = faults {
        count(rx.try_iter().count() > 0);
    }
    count(c.dma_unmap(PEER_IOVA, PEER_LEN as u64).is_ok());
    count(c.dma_unmap_all().is_ok());
    count(c.region_read(0, 0, &mut small).is_ok());
    ok
}

/// The fake server: answer VERSION as `v0` says, then each request as the script says;
/// end (closing the socket) when the script runs out or the client goes away.
fn fake_server(sock: UnixStream, v0: u8, twin_offered: bool, mut s: Script<'_>) {
    use crate::proto::MsgType;
    let limit = std::time::Duration::from_secs(5);
    let _ = sock.set_read_timeout(Some(limit));
    let Ok(Some(req)) = recv_message(&sock, 1 << 20) else {
        return;
    };
    let Some(twin) = answer_version(&sock, &req, v0, twin_offered, &mut s) else {
        return;
    };
    if let Some(t) = &twin {
        let _ = t.set_read_timeout(Some(limit));
    }
    loop {
        let m = match recv_message(&sock, 4 << 20) {
            Ok(Some(m)) => m,
            _ => return,
        };
        // Replies to our own DMA commands, and posted writes, need no answer.
        if m.header.msg_type() == MsgType::Reply || m.header.no_reply() {
            continue;
        }
        let Some(mode) = s.u8() else { return };
        // Silence with the close bit: stop reading altogether (the client's sends
        // fill the socket) until the client hangs up.
        if mode == 0x87 {
            wait_for_hangup(&sock);
            return;
        }
        if !answer(&sock, twin.as_ref(), &m, mode, &mut s) {
            return;
        }
    }
}

/// Read nothing more and wait for the client to hang up. A client that stays blocked
/// (in a send to a server that stopped reading) despite its reply timeout is a hang:
/// panic, so the fuzzer reports it.
fn wait_for_hangup(sock: &UnixStream) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut p = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd for at most 50 ms.
        let r = unsafe { libc::poll(&mut p, 1, 50) };
        if r < 0 || p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the client stays blocked on a server that stopped reading"
        );
    }
}

/// Answer VERSION. `None`: the server gives up (closes); `Some(twin)`: go on, with our
/// end of the twin socket if one was handed over.
fn answer_version(
    sock: &UnixStream,
    req: &crate::socket::Message,
    v0: u8,
    twin_offered: bool,
    s: &mut Script<'_>,
) -> Option<Option<UnixStream>> {
    let mode = v0 % 16;
    let mut caps = Capabilities {
        max_msg_fds: u32::from(s.b()),
        max_data_xfer_size: match s.b() % 4 {
            0 => 1 << 20,
            1 => u32::from(s.u16()) + 1,
            2 => 8,
            _ => s.u32().max(1),
        },
        write_multiple: v0 & 0x20 != 0,
        ..Capabilities::default()
    };
    let mut v = Version {
        major: crate::proto::VERSION_MAJOR,
        minor: u16::from(s.b() % 3),
        caps: caps.clone(),
    };
    let mut fds: Vec<std::os::fd::OwnedFd> = Vec::new();
    let mut ours = None;
    let want_twin = (twin_offered && v0 & 0x10 != 0) || mode == 13;
    if want_twin {
        if let Ok((a, b)) = UnixStream::pair() {
            fds.push(b.into());
            ours = Some(a);
            caps.twin_socket = Some(TwinSocket {
                supported: true,
                fd_index: Some(0),
            });
        }
    }
    match mode {
        9 => v.major = 1,
        10 => v.minor = 3 + u16::from(s.b()),
        12 => {
            caps.twin_socket = Some(TwinSocket {
                supported: true,
                fd_index: Some(u32::from(s.b() % 4)),
            });
            for _ in 0..s.b() % 3 {
                fds.extend(junk_fd(s.b()));
            }
        }
        _ => {}
    }
    // The nested-IOMMU capability: mirrored to a client that proposed it (bit 7 of v0:
    // with the script's values, any of them possibly unusable), or sent unasked.
    let proposed = crate::proto::Version::decode(&req.payload)
        .ok()
        .and_then(|v| v.caps.nestio_nested_iommu)
        .is_some();
    if proposed || mode == 7 {
        let n = if v0 & 0x80 != 0 {
            NestedIommuCaps {
                version: u32::from(s.b() % 3),
                ias: u32::from(s.b()),
                oas: u32::from(s.b()),
                granules: [4096u64, 8192, 16384, 65536]
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| s.b() & (1 << i) != 0)
                    .map(|(_, g)| g)
                    .collect(),
                ssid_bits: u32::from(s.b()),
            }
        } else {
            NestedIommuCaps::default()
        };
        caps.nestio_nested_iommu = Some(NestedIommuCap::smmuv3(n));
    }
    v.caps = caps;
    let mut p = Vec::new();
    match mode {
        11 => {
            p.extend_from_slice(&[0, 0, 2, 0]);
            let n = usize::from(s.b());
            p.extend_from_slice(s.take(n));
        }
        15 => return None,
        _ => v.encode_into(&mut p),
    }
    let mut h = req.header.reply(p.len()).ok()?;
    match mode {
        8 => {
            h = req.header.error_reply(i32::from(s.b()));
            p.clear();
        }
        14 => {
            h.msg_id ^= s.u16();
            h.cmd ^= s.u16();
            h.flags ^= s.u32();
        }
        _ => {}
    }
    let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
    send_message(sock, &h, &p, &raw).ok()?;
    Some(ours)
}

/// Answer one request; false: close the connection.
fn answer(
    sock: &UnixStream,
    twin: Option<&UnixStream>,
    m: &crate::socket::Message,
    mode: u8,
    s: &mut Script<'_>,
) -> bool {
    if mode & 0x10 != 0 {
        let (h, p) = dma_command(s);
        if send_message(sock, &h, &p, &[]).is_err() {
            return false;
        }
    }
    if let (true, Some(t)) = (mode & 0x20 != 0, twin) {
        let (h, p) = dma_command(s);
        if send_message(t, &h, &p, &[]).is_err() {
            return false;
        }
        if !h.no_reply() {
            // The client's twin thread answers on its own; a broken twin ends in EOF
            // or the read timeout.
            let _ = recv_message(t, 4 << 20);
        }
    }
    if mode & 0x40 != 0 {
        let mut h = m.header.error_reply(libc::EIO);
        h.msg_id = s.u16();
        if send_message(sock, &h, &[], &[]).is_err() {
            return false;
        }
    }
    let mut fds = Vec::new();
    if mode & 0x08 != 0 {
        for _ in 0..1 + s.b() % 3 {
            fds.extend(junk_fd(s.b()));
        }
    }
    let (mut payload, more) = build_reply(m, s);
    fds.extend(more);
    let Ok(mut h) = m.header.reply(payload.len()) else {
        return false;
    };
    match mode & 7 {
        4 => {
            h = m.header.error_reply(i32::from(s.u16()));
            payload.clear();
        }
        5 => {
            let what = s.b();
            if what & 1 != 0 {
                h.msg_id ^= s.u16() | 1;
            }
            if what & 2 != 0 {
                h.cmd = s.u16() % 24;
            }
            if what & 4 != 0 {
                h.flags = s.u32();
            }
            if what & 8 != 0 {
                payload.truncate(usize::from(s.b()));
            }
            if what & 0x10 != 0 {
                let n = usize::from(s.b());
                payload.extend_from_slice(s.take(n));
            }
            h.size = (crate::proto::HEADER_SIZE + payload.len()) as u32;
            if what & 0x20 != 0 {
                // A size that does not match what follows: the stream is out of step.
                h.size = s.u32();
            }
        }
        6 => {
            let n = usize::from(s.b()) * 2;
            payload = s.take(n).to_vec();
            h.size = (crate::proto::HEADER_SIZE + payload.len()) as u32;
        }
        7 => return true,
        _ => {}
    }
    let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
    if send_message(sock, &h, &payload, &raw).is_err() {
        return false;
    }
    mode & 0x80 == 0
}

/// A DMA_READ or DMA_WRITE command from the server, mostly aimed at the client's peer
/// memory.
fn dma_command(s: &mut Script<'_>) -> (Header, Vec<u8>) {
    let sel = s.b();
    let addr = if sel & 2 != 0 {
        PEER_IOVA + u64::from(s.u16())
    } else {
        s.u64()
    };
    let count = if sel & 4 != 0 {
        s.u64()
    } else {
        u64::from(s.u16() % 4096)
    };
    let mut p = Vec::new();
    let cmd = if sel & 0x40 != 0 {
        // A nested-IOMMU fault record (maybe malformed: argsz, flags, reserved, length).
        crate::nested_iommu::IommuFault {
            lost_before: sel & 0x80 != 0,
            sequence: s.u32(),
            record: {
                let mut r = [0u8; 32];
                r.copy_from_slice(&s.fill(32));
                r
            },
        }
        .encode_into(&mut p);
        if sel & 8 != 0 {
            let at = usize::from(s.b()) % p.len();
            p[at] ^= s.b() | 1;
        }
        if sel & 1 != 0 {
            p.truncate(usize::from(s.b()) % p.len());
        }
        Command::NestioIommuFault
    } else if sel & 1 != 0 {
        crate::proto::DmaAccess {
            addr,
            count,
            data: &[],
        }
        .encode_into(&mut p);
        Command::DmaRead
    } else {
        crate::proto::DmaAccess {
            addr,
            count,
            data: &[],
        }
        .encode_into(&mut p);
        let n = if sel & 8 != 0 {
            usize::from(s.b())
        } else {
            count.min(4096) as usize
        };
        p.extend(s.fill(n));
        Command::DmaWrite
    };
    let mut h = Header {
        msg_id: s.u16(),
        cmd: cmd as u16,
        size: (crate::proto::HEADER_SIZE + p.len()) as u32,
        flags: crate::proto::hdr_flags::TYPE_COMMAND,
        error: 0,
    };
    if sel & 0x10 != 0 {
        h.flags |= crate::proto::hdr_flags::NO_REPLY;
    }
    if sel & 0x20 != 0 {
        h.flags |= 1 << 9;
    }
    (h, p)
}

/// A well-formed reply to `m` with values from the script, and the fds it carries.
fn build_reply(
    m: &crate::socket::Message,
    s: &mut Script<'_>,
) -> (Vec<u8>, Vec<std::os::fd::OwnedFd>) {
    use crate::proto::{
        feature, DeviceFeature, DeviceInfoMsg, IoFdEntry, IoFdsMsg, IoFdsReply, IrqInfoMsg,
        LoggingReport, MigData, RegionAccess, RegionInfoMsg, RegionInfoReply, Request,
    };
    let mut b = Vec::new();
    let mut fds = Vec::new();
    let Ok(req) = Request::decode(m.header.cmd, &m.payload) else {
        let n = usize::from(s.b());
        return (s.take(n).to_vec(), fds);
    };
    match req {
        Request::Version(v) => v.encode_into(&mut b),
        Request::GetInfo(_) => DeviceInfoMsg {
            argsz: DeviceInfoMsg::SIZE as u32,
            flags: s.u32(),
            num_regions: u32::from(s.b() % 12),
            num_irqs: u32::from(s.b() % 8),
        }
        .encode_into(&mut b),
        Request::GetRegionInfo(r) => {
            let size = match s.b() % 4 {
                0 => 0x1000,
                1 => u64::from(s.u32()),
                2 => s.u64(),
                _ => 0,
            };
            let sparse = (0..s.b() % 5)
                .map(|_| (u64::from(s.u16()) * 16, u64::from(s.u16()) * 16))
                .collect();
            let sel = s.b();
            RegionInfoReply {
                info: RegionInfoMsg {
                    argsz: 0,
                    flags: u32::from(sel & 0xf),
                    index: if sel & 0x10 != 0 { s.u32() } else { r.index },
                    cap_offset: 0,
                    size,
                    offset: if sel & 0x20 != 0 { s.u64() } else { 0 },
                },
                sparse,
            }
            .encode_into(r.argsz, &mut b);
            if sel & 0x40 != 0 {
                fds.extend(junk_fd(1));
            }
        }
        Request::GetRegionIoFds(r) => {
            let n = u32::from(s.b() % 4);
            let full = IoFdsMsg::SIZE as u32 + n * IoFdsMsg::ENTRY as u32;
            let entries: Vec<IoFdEntry> = if full <= r.argsz {
                (0..n)
                    .map(|_| IoFdEntry {
                        offset: u64::from(s.u16()),
                        size: [1, 2, 4, 8][usize::from(s.b() % 4)],
                        fd_index: u32::from(s.b() % 3),
                        kind: u32::from(s.b() % 2),
                        flags: u32::from(s.b() % 4),
                        datamatch: s.u64(),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            for _ in 0..entries.len() {
                fds.extend(eventfd());
            }
            IoFdsReply {
                hdr: IoFdsMsg {
                    argsz: full,
                    flags: 0,
                    index: r.index,
                    count: n,
                },
                entries,
            }
            .encode_into(&mut b);
        }
        Request::GetIrqInfo(r) => IrqInfoMsg {
            argsz: IrqInfoMsg::SIZE as u32,
            flags: u32::from(s.b() % 16),
            index: r.index,
            count: if s.b() & 1 != 0 {
                s.u32()
            } else {
                u32::from(s.b() % 8)
            },
        }
        .encode_into(&mut b),
        Request::DmaUnmap(u) => u.encode_into(&mut b),
        Request::RegionRead(a) => {
            let data = s.fill(a.count as usize);
            RegionAccess { data: &data, ..a }.encode_into(&mut b);
        }
        Request::RegionWrite(a) => RegionAccess { data: &[], ..a }.encode_into(&mut b),
        Request::WriteMulti(w) => b.extend_from_slice(&(w.writes.len() as u64).to_ne_bytes()),
        Request::Feature(f) => {
            let data = match f.index() {
                feature::MIGRATION => s.u64().to_ne_bytes().to_vec(),
                feature::MIG_DEVICE_STATE => {
                    let mut d = Vec::new();
                    crate::proto::encode_mig_state(u32::from(s.b() % 10), &mut d);
                    d
                }
                feature::DMA_LOGGING_REPORT => {
                    let mut d = f.data.to_vec();
                    let n = LoggingReport::decode(f.data)
                        .ok()
                        .and_then(|r| r.bitmap_bytes())
                        .unwrap_or(0)
                        .min(1 << 16);
                    d.extend(s.fill(n));
                    d
                }
                _ => Vec::new(),
            };
            DeviceFeature {
                argsz: (DeviceFeature::SIZE + data.len()) as u32,
                flags: f.flags,
                data: &data,
            }
            .encode_into(&mut b);
        }
        Request::MigDataRead(d) => {
            let n = u32::from(s.u16()).min(d.size);
            let data = s.fill(n as usize);
            MigData {
                argsz: MigData::SIZE as u32 + n,
                size: n,
                data: &data,
            }
            .encode_into(&mut b);
        }
        Request::IommuInvalidate(i) => {
            let n = i.commands.len() as u32;
            let done = if s.b() & 1 != 0 { s.u32() % (n + 2) } else { n };
            crate::nested_iommu::InvalidateReply {
                done,
                cerror: u32::from(done < n),
            }
            .encode_into(&mut b)
        }
        Request::SetIrqs(_)
        | Request::Reset
        | Request::DmaMap(_)
        | Request::MigDataWrite(_)
        | Request::DmaRead(_)
        | Request::DmaWrite(_)
        | Request::IommuBind(_)
        | Request::IommuUnbind
        | Request::IommuFault(_) => {}
    }
    (b, fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client prefix of a run: settings, then the operations' parameters.
    fn input(v0: u8, settings: u8, script: &[u8]) -> Vec<u8> {
        let mut d = vec![
            v0, settings, 0x12, 2, 0x10, 0, 8, 100, 0, 5, 0xff, 0x0f, 12, 100, 0,
        ];
        d.resize(CLIENT_PREFIX, 0);
        d.extend_from_slice(script);
        d
    }

    /// A script of well-formed replies (all values zero) gets the client connected and
    /// most operations done: the harness reaches past the handshake.
    #[test]
    fn well_behaved_server_serves_most_operations() {
        let mut script = vec![8, 0, 2];
        script.resize(2000, 0);
        for (v0, settings) in [(0x30, 0x03), (0x20, 0x02), (0x30, 0x0b)] {
            let ok = client_run(&input(v0, settings, &script));
            assert!(
                ok >= 30,
                "only {ok} operations succeeded ({v0:#x}/{settings:#x})"
            );
        }
    }

    /// With the nested-IOMMU extension proposed and mirrored, BIND, INVALIDATE and
    /// UNBIND get through too (three more operations than without), and a FAULT the
    /// server sends (DMA command mode 0x10 with selector bit 6) reaches the receiver.
    #[test]
    fn nested_iommu_operations_reach_the_server() {
        let run = |d: &[u8]| client_run_timeout(d, std::time::Duration::from_secs(5));
        let mut script = vec![8, 0, 2];
        script.resize(2000, 0);
        let plain = run(&input(0x30, 0x03, &script));
        let nested = run(&input(0x70, 0x03, &script));
        assert_eq!(nested, plain + 3, "BIND, INVALIDATE, UNBIND");
        // The reply to the first request (GET_INFO at connect) is preceded by a
        // well-formed FAULT (mode 0x10, selector 0x40: address u64, count u16,
        // sequence, record, msg_id): the client delivers it, one more success.
        let mut faulty = vec![8, 0, 2, 0x10, 0x40];
        faulty.extend_from_slice(&[0; 10]);
        faulty.extend_from_slice(&7u32.to_le_bytes());
        faulty.extend_from_slice(&[0x10; 32]);
        faulty.extend_from_slice(&[0; 2]);
        faulty.resize(2000, 0);
        assert_eq!(run(&input(0x70, 0x03, &faulty)), nested + 1);
        // Without the capability the same FAULT is refused (not delivered).
        assert_eq!(run(&input(0x30, 0x03, &faulty)), plain);
    }

    /// Running out of script closes the connection: the client fails fast, and a
    /// refused VERSION or a silent server ends the run too.
    #[test]
    fn short_or_hostile_scripts_end_the_run() {
        assert_eq!(client_run(&input(0x30, 0x03, &[])), 0);
        assert_eq!(
            client_run(&input(8, 0x03, &[8, 0, 2, 5])),
            0,
            "VERSION refused"
        );
        assert_eq!(client_run(&input(15, 0x03, &[8, 0, 2])), 0, "server closes");
        // Silence after VERSION: the first call times out, later calls fail at once.
        let ok = client_run(&input(0x30, 0x03, &[8, 0, 2, 7, 0, 0]));
        assert_eq!(ok, 0, "DEVICE_GET_INFO got no reply");
    }

    /// A server that enables a twin socket we did not offer is refused.
    #[test]
    fn unoffered_twin_socket_is_refused() {
        let mut script = vec![8, 0, 2];
        script.resize(500, 0);
        assert_eq!(client_run(&input(13, 0x02, &script)), 0);
        assert!(client_run(&input(13, 0x03, &script)) > 0);
    }
}

#[cfg(test)]
mod stalled_server {
    use super::*;
    use nestio_device_model::{DeviceError, VfioDevice};

    /// Regression (found while writing the `client` target's stalling server): a server
    /// that answers the handshake and then stops reading used to block a client's
    /// large write forever in `sendmsg`, whatever its reply timeout. With a timeout the
    /// send is bounded too and the connection is closed (`Disconnected`); a posted
    /// write is bounded the same way.
    #[test]
    fn client_send_to_a_server_that_stops_reading_fails_instead_of_hanging() {
        for posted in [false, true] {
            let (c_end, s_end) = UnixStream::pair().unwrap();
            let srv = std::thread::spawn(move || {
                // VERSION and DEVICE_GET_INFO, then never read again.
                for _ in 0..2 {
                    let m = recv_message(&s_end, 1 << 20).unwrap().unwrap();
                    let mut p = Vec::new();
                    if m.header.cmd == Command::Version as u16 {
                        Version {
                            major: 0,
                            minor: 2,
                            caps: Capabilities::default(),
                        }
                        .encode_into(&mut p);
                    } else {
                        p = build_reply(&m, &mut Script { d: &[] }).0;
                    }
                    send_message(&s_end, &m.header.reply(p.len()).unwrap(), &p, &[]).unwrap();
                }
                wait_for_hangup(&s_end);
            });
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let c = crate::Client::from_stream(
                    c_end,
                    crate::ClientConfig {
                        twin_socket: false,
                        reply_timeout: Some(std::time::Duration::from_millis(25)),
                        ..Default::default()
                    },
                )
                .unwrap();
                let big = vec![0u8; 1 << 20];
                let r = if posted {
                    // Several posted writes fill any socket buffer.
                    (0..8).try_for_each(|_| c.region_write_posted(0, 0, &big))
                } else {
                    c.region_write(0, 0, &big)
                };
                let after = c.region_read(0, 0, &mut [0u8; 4]);
                let _ = tx.send((r, after));
            });
            // A watchdog for the old hang, not a timing assertion.
            let (r, after) = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("the client hung in a send to a server that stopped reading");
            assert!(matches!(r, Err(DeviceError::Disconnected(_))), "{r:?}");
            assert!(
                matches!(after, Err(DeviceError::Disconnected(_))),
                "the connection stays closed: {after:?}"
            );
            srv.join().unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------
// Session handling: many connections, in any order.

/// Most connections a [`fuzz_sessions`] script keeps open at once.
const SESSION_CONNS: usize = 6;

/// Feed `data` as a script of connection events against a server listening on an
/// abstract UNIX socket (one owner at a time, 30 ms handshake timeout, at most 4
/// connections): each step picks an op and a connection slot — connect, send VERSION,
/// send garbage, send a valid command (DMA_MAP of a memfd, SET_IRQS with an eventfd,
/// migration to STOP, dirty logging start, nested-IOMMU BIND, GET_INFO), half-close,
/// close, drain replies. At the end every connection is closed and the server stopped;
/// then nobody owns the device and it is released (no DMA maps, no eventfds, logging
/// off, RUNNING, no stage-1 binding). Never panics, never hangs, never leaks an fd.
pub fn fuzz_sessions(data: &[u8]) {
    use nestio_device_model::VfioDevice;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("nestio-fuzz-sessions-{}-{n}", std::process::id());
    let Ok(addr) = SocketAddr::from_abstract_name(name.as_bytes()) else {
        return;
    };
    let Ok(listener) = UnixListener::bind_addr(&addr) else {
        return;
    };
    let Ok(dev) = TestDevice::new() else { return };
    let dev = Arc::new(dev);
    let server = Server::new(
        dev.clone(),
        ServerConfig {
            handshake_timeout: Some(std::time::Duration::from_millis(30)),
            max_connections: 4,
            busy_grace: std::time::Duration::from_millis(5),
            dma_timeout: Some(std::time::Duration::from_millis(200)),
            ..ServerConfig::default()
        },
    );
    std::thread::scope(|s| {
        let srv = s.spawn(|| server.serve_listener(listener));
        let mut conns: Vec<Option<UnixStream>> = (0..SESSION_CONNS).map(|_| None).collect();
        let mut script = Script { d: data };
        let mut id = 1u16;
        while let Some(op) = script.u8() {
            let slot = (op >> 4) as usize % SESSION_CONNS;
            id = id.wrapping_add(1);
            match op & 0xf {
                0 | 1 => {
                    if let Ok(c) = UnixStream::connect_addr(&addr) {
                        let _ = c.set_nonblocking(true);
                        conns[slot] = Some(c);
                    }
                }
                2 | 3 => {
                    if let Some(c) = &conns[slot] {
                        let b = script.b();
                        let v = Version {
                            major: u16::from(b & 1),
                            minor: crate::proto::VERSION_MINOR,
                            caps: Capabilities {
                                nestio_nested_iommu: (b & 2 != 0)
                                    .then(|| NestedIommuCap::smmuv3(NestedIommuCaps::default())),
                                ..Capabilities::default()
                            },
                        };
                        let mut p = Vec::new();
                        v.encode_into(&mut p);
                        session_send(c, id, Command::Version as u16, &p, &[]);
                    }
                }
                4 => {
                    if let Some(c) = &conns[slot] {
                        let len = script.b() as usize;
                        let g = script.take(len);
                        let _ = (&*c).write(g);
                    }
                }
                5..=9 => {
                    if let Some(c) = &conns[slot] {
                        session_command(c, id, op & 0xf, &mut script);
                    }
                }
                10 => {
                    if let Some(c) = &conns[slot] {
                        let _ = c.shutdown(std::net::Shutdown::Write);
                    }
                }
                11 | 12 => conns[slot] = None,
                13 => std::thread::sleep(std::time::Duration::from_millis(script.b() as u64 % 40)),
                _ => {
                    if let Some(c) = &conns[slot] {
                        let mut b = [0u8; 4096];
                        while matches!((&*c).read(&mut b), Ok(n) if n > 0) {}
                    }
                }
            }
        }
        drop(conns);
        // Every connection is closed: the owner (if any) goes, the device is released.
        let t0 = std::time::Instant::now();
        while server.owned() {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(5),
                "the device is still owned after every client left"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        server.stop();
        let _ = UnixStream::connect_addr(&addr);
        let _ = srv.join();
    });
    assert!(!server.owned());
    let st = server.stats();
    assert!(st.owner_sessions <= st.sessions);
    if let Some(port) = dev.dma_port() {
        assert!(
            !port.is_translated(),
            "a nested-IOMMU binding left after the owner went"
        );
    }
    if let Some(t) = dev.dma_table() {
        assert_eq!(t.len(), 0, "DMA maps left after the owner went");
        assert!(!t.logging(), "dirty logging left on after the owner went");
    }
    assert!(
        !dev.irqs().has_eventfd(1, 0),
        "an eventfd left after the owner went"
    );
    assert_eq!(
        dev.mig_state().ok(),
        Some(nestio_device_model::MigState::Running),
        "migration state not RUNNING after the owner went"
    );
}

fn session_send(c: &UnixStream, id: u16, cmd: u16, payload: &[u8], fds: &[std::os::fd::RawFd]) {
    let h = Header {
        msg_id: id,
        cmd,
        size: (crate::proto::HEADER_SIZE + payload.len()) as u32,
        flags: 0,
        error: 0,
    };
    // Non-blocking: a full socket buffer drops the message (the stream may then be out
    // of step, which is one more kind of garbage).
    let _ = send_message(c, &h, payload, fds);
}

/// One valid command that changes device state an owner must not leave behind.
fn session_command(c: &UnixStream, id: u16, which: u8, script: &mut Script<'_>) {
    use std::os::fd::AsRawFd;
    let words = |v: &[u32]| v.iter().flat_map(|w| w.to_ne_bytes()).collect::<Vec<u8>>();
    match which {
        5 => {
            let Ok(fd) = nestio_dma::memfd::sealed_memfd(c"fuzz-sessions", 0x4000) else {
                return;
            };
            let mut p = words(&[32, 3]);
            p.extend_from_slice(&0u64.to_ne_bytes());
            p.extend_from_slice(&((script.b() as u64) << 14).to_ne_bytes());
            p.extend_from_slice(&0x4000u64.to_ne_bytes());
            session_send(c, id, Command::DmaMap as u16, &p, &[fd.as_raw_fd()]);
        }
        6 => {
            // SAFETY: eventfd takes no pointers; the result is checked.
            let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if raw < 0 {
                return;
            }
            // SAFETY: a new descriptor owned by nothing else.
            let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
            // index 1 (MSI), vector 0, DATA_EVENTFD | ACTION_TRIGGER.
            let p = words(&[20, (1 << 2) | (1 << 5), 1, 0, 1]);
            session_send(c, id, Command::DeviceSetIrqs as u16, &p, &[fd.as_raw_fd()]);
        }
        7 => {
            // DEVICE_FEATURE SET MIG_DEVICE_STATE = STOP (1) or STOP_COPY (3).
            let state = if script.b() & 1 == 0 { 1u32 } else { 3 };
            let p = words(&[16, (1 << 17) | 2, state, 0]);
            session_send(c, id, Command::DeviceFeature as u16, &p, &[]);
        }
        8 => {
            // DEVICE_FEATURE SET DMA_LOGGING_START: page 4 KiB, one range.
            let mut p = words(&[40, (1 << 17) | 6]);
            p.extend_from_slice(&4096u64.to_ne_bytes());
            p.extend_from_slice(&words(&[1, 0]));
            p.extend_from_slice(&0u64.to_ne_bytes());
            p.extend_from_slice(&0x4000u64.to_ne_bytes());
            session_send(c, id, Command::DeviceFeature as u16, &p, &[]);
        }
        _ if script.b() & 1 != 0 => {
            // NESTIO_IOMMU_BIND of a stage-1 STE: the binding must not outlive the owner.
            let mut p = Vec::new();
            crate::nested_iommu::IommuBind {
                vsid: 1,
                ste0: 0xb | (u64::from(script.b()) << 12),
                ste1: 0,
            }
            .encode_into(&mut p);
            session_send(c, id, Command::NestioIommuBind as u16, &p, &[]);
        }
        _ => {
            let p = words(&[16, 0, 0, 0]);
            session_send(c, id, Command::DeviceGetInfo as u16, &p, &[]);
        }
    }
}
