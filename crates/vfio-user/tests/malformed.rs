//! Hostile input written as raw bytes to the server socket: the server answers with the
//! right errno and stays in sync, or ends the session when the stream cannot be trusted;
//! either way the next client is served.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use common::*;
use nestio_device_model::VfioDevice;
use nestio_vfio_user::proto::{hdr_flags, Command, DmaMap, RegionAccess};
use nestio_vfio_user::{ClientConfig, ServerConfig};

fn region_write_payload(region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    RegionAccess {
        offset,
        region,
        count: data.len() as u32,
        data,
    }
    .encode_into(&mut p);
    p
}

/// A client that maps memory by message and then stops reading: the device's DMA_WRITE
/// requests and the replies pile up in its socket until the buffer is full. The server
/// must not block in `sendmsg` for ever (nor the device thread behind it): a send waits
/// at most the DMA timeout, then the session ends and the next client is served.
#[test]
fn client_that_stops_reading_cannot_block_the_server() {
    use nestio_vfio_user::proto::DmaMap;
    use nestio_vfio_user::testdev::reg;
    let h = Harness::new(ServerConfig {
        dma_timeout: Some(std::time::Duration::from_millis(100)),
        ..ServerConfig::default()
    });
    // A small send buffer on the server's end: one 64 KiB DMA_WRITE does not fit, so
    // the server's send blocks until the client reads (which it never does).
    let (s, server_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt with a valid int option value on our socket.
    let r = unsafe {
        libc::setsockopt(
            server_end.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
    let srv = h.server.clone();
    let t = std::thread::spawn(move || srv.serve_stream(server_end));
    raw_version(&s);
    let mut p = Vec::new();
    DmaMap {
        flags: nestio_vfio_user::proto::dma_flags::READ | nestio_vfio_user::proto::dma_flags::WRITE,
        offset: 0,
        addr: 0x100000,
        size: 0x100000,
    }
    .encode_into(&mut p);
    send(&s, 2, Command::DmaMap as u16, &p, &[]);
    assert!(!recv(&s).unwrap().header.is_error());
    // From here on the client only writes: each DMA command makes the device send a
    // 64 KiB DMA_WRITE that nobody reads.
    let mut id = 3u16;
    let mut reg_write = |off: u64, v: u64| {
        let _ = nestio_vfio_user::socket::send_message(
            &s,
            &nestio_vfio_user::proto::Header {
                msg_id: id,
                cmd: Command::RegionWrite as u16,
                size: (16 + 16 + 8) as u32,
                flags: hdr_flags::NO_REPLY,
                error: 0,
            },
            &region_write_payload(1, off, &v.to_le_bytes()),
            &[],
        );
        id = id.wrapping_add(1);
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(t.join());
    });
    for _ in 0..64 {
        reg_write(reg::DMA_ADDR, 0x100000);
        reg_write(reg::DMA_LEN, nestio_vfio_user::testdev::RAM_SIZE as u64);
        reg_write(reg::DMA_OFF, 0);
        reg_write(reg::DMA_CMD, 2);
        if rx.try_recv().is_ok() {
            break;
        }
    }
    // A watchdog for the old hang, not a timing assertion.
    let ended = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the server stayed blocked sending to a client that stopped reading");
    let why = format!("{:?}", ended.unwrap());
    assert!(why.contains("stopped reading"), "{why}");
    waiter.join().unwrap();
    drop(s);
    next_client_works(&h);
}

/// After the session ended, a fresh client still gets served by the same device.
fn next_client_works(h: &Harness) {
    let (c, _t) = h.client(ClientConfig::default());
    let mut b = [0u8; 4];
    c.region_read(0, 0, &mut b).unwrap();
}

#[test]
fn command_before_version_closes_session() {
    let h = Harness::new(ServerConfig::default());
    let (s, t) = h.session();
    send(
        &s,
        5,
        Command::DeviceGetInfo as u16,
        &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
    );
    expect_error(&s, 5, libc::EINVAL);
    assert!(recv(&s).is_none(), "session closed");
    assert!(t.join().unwrap().is_err());
    next_client_works(&h);
}

#[test]
fn bad_version_major_and_second_version() {
    let h = Harness::new(ServerConfig::default());
    let (s, t) = h.session();
    send(&s, 1, Command::Version as u16, &[7, 0, 0, 0], &[]);
    expect_error(&s, 1, libc::ENOTSUP);
    assert!(recv(&s).is_none());
    t.join().unwrap().unwrap_err();
    // Wrong JSON type: refused.
    let (s, _t) = h.session();
    let mut p = vec![0, 0, 2, 0];
    p.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":\"lots\"}}\0");
    send(&s, 1, Command::Version as u16, &p, &[]);
    expect_error(&s, 1, libc::EINVAL);
    // A second VERSION after a good one: EINVAL, stream in sync.
    let (s, _t) = h.session();
    raw_version(&s);
    send(&s, 2, Command::Version as u16, &[0, 0, 0, 0], &[]);
    expect_error(&s, 2, libc::EINVAL);
    assert_eq!(raw_get_info(&s, 3), 3);
}

#[test]
fn unknown_command_keeps_stream_in_sync() {
    let h = Harness::new(ServerConfig::default());
    let (s, _t) = h.session();
    raw_version(&s);
    send(&s, 2, 99, &[0xee; 37], &[]);
    expect_error(&s, 2, libc::ENOSYS);
    send(&s, 3, 14, &[0xee; 8], &[]);
    expect_error(&s, 3, libc::ENOSYS);
    assert_eq!(raw_get_info(&s, 4), 3);
}

#[test]
fn lying_sizes_truncated_and_oversized_payloads() {
    let h = Harness::new(ServerConfig {
        max_data_xfer_size: 4096,
        ..ServerConfig::default()
    });
    let (s, _t) = h.session();
    raw_version(&s);
    // DMA_MAP with 20 bytes instead of 32.
    send(&s, 2, Command::DmaMap as u16, &[0u8; 20], &[]);
    expect_error(&s, 2, libc::EINVAL);
    // DMA_MAP whose argsz lies.
    let mut p = Vec::new();
    DmaMap {
        flags: 3,
        offset: 0,
        addr: 0x1000,
        size: 0x1000,
    }
    .encode_into(&mut p);
    p[0] = 64;
    send(&s, 3, Command::DmaMap as u16, &p, &[]);
    expect_error(&s, 3, libc::EINVAL);
    // REGION_WRITE whose count says 100 but carries 4 bytes.
    let mut p = region_write_payload(0, 0, &[1, 2, 3, 4]);
    p[12] = 100;
    send(&s, 4, Command::RegionWrite as u16, &p, &[]);
    expect_error(&s, 4, libc::EINVAL);
    // REGION_WRITE with trailing garbage.
    let mut p = region_write_payload(0, 0, &[1, 2, 3, 4]);
    p.extend_from_slice(&[0; 3]);
    send(&s, 5, Command::RegionWrite as u16, &p, &[]);
    expect_error(&s, 5, libc::EINVAL);
    // REGION_READ larger than max_data_xfer_size.
    let mut p = Vec::new();
    RegionAccess {
        offset: 0,
        region: 0,
        count: 8192,
        data: &[],
    }
    .encode_into(&mut p);
    send(&s, 6, Command::RegionRead as u16, &p, &[]);
    expect_error(&s, 6, libc::EINVAL);
    // offset + count wrapping.
    let mut p = Vec::new();
    RegionAccess {
        offset: u64::MAX - 1,
        region: 0,
        count: 4,
        data: &[],
    }
    .encode_into(&mut p);
    send(&s, 7, Command::RegionRead as u16, &p, &[]);
    expect_error(&s, 7, libc::EINVAL);
    // Unknown header flag bits.
    let hdr = nestio_vfio_user::Header {
        msg_id: 8,
        cmd: 4,
        size: 32,
        flags: 1 << 9,
        error: 0,
    };
    nestio_vfio_user::socket::send_message(
        &s,
        &hdr,
        &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
    )
    .unwrap();
    expect_error(&s, 8, libc::EINVAL);
    // Still in sync.
    assert_eq!(raw_get_info(&s, 9), 3);
    // Nothing was written by any refused message.
    let mut b = [9u8; 4];
    h.dev.region_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
}

#[test]
fn header_size_out_of_range_closes_session() {
    let h = Harness::new(ServerConfig::default());
    for size in [8u32, 0, 15, u32::MAX, (2 << 20) as u32] {
        let (mut s, t) = h.session();
        raw_version(&s);
        let hdr = nestio_vfio_user::Header {
            msg_id: 2,
            cmd: 4,
            size,
            flags: 0,
            error: 0,
        };
        s.write_all(&hdr.encode()).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap(), 0, "size {size}: session closed");
        assert!(t.join().unwrap().is_err());
    }
    assert!(h.server.stats().broken_sessions >= 5);
    next_client_works(&h);
}

#[test]
fn no_reply_is_honoured() {
    let h = Harness::new(ServerConfig::default());
    let (s, _t) = h.session();
    raw_version(&s);
    let p = region_write_payload(0, 0, &[4, 3, 2, 1]);
    let hdr = nestio_vfio_user::Header {
        msg_id: 2,
        cmd: Command::RegionWrite as u16,
        size: (16 + p.len()) as u32,
        flags: hdr_flags::NO_REPLY,
        error: 0,
    };
    nestio_vfio_user::socket::send_message(&s, &hdr, &p, &[]).unwrap();
    // A failing no_reply command also sends nothing.
    let bad = region_write_payload(9, 0, &[1]);
    let hdr2 = nestio_vfio_user::Header {
        msg_id: 3,
        size: (16 + bad.len()) as u32,
        ..hdr
    };
    nestio_vfio_user::socket::send_message(&s, &hdr2, &bad, &[]).unwrap();
    // The next reply is GET_INFO's.
    assert_eq!(raw_get_info(&s, 4), 3);
    let mut b = [0u8; 4];
    h.dev.region_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [4, 3, 2, 1]);
}

#[test]
fn too_many_and_unexpected_fds_are_refused_and_closed() {
    let h = Harness::new(ServerConfig {
        max_msg_fds: 4,
        ..ServerConfig::default()
    });
    let (s, _t) = h.session();
    raw_version(&s);
    let fds: Vec<_> = (0..6).map(|_| eventfd()).collect();
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // SET_IRQS eventfd with 6 fds > max_msg_fds 4.
    let mut p = Vec::new();
    nestio_vfio_user::proto::IrqSet {
        flags: 4 | 32,
        index: 1,
        start: 0,
        count: 4,
        data: &[],
    }
    .encode_into(&mut p);
    send(&s, 2, Command::DeviceSetIrqs as u16, &p, &raw);
    expect_error(&s, 2, libc::EINVAL);
    // fds that do not match count.
    send(&s, 3, Command::DeviceSetIrqs as u16, &p, &raw[..3]);
    expect_error(&s, 3, libc::EINVAL);
    // An fd on a command that takes none.
    send(
        &s,
        4,
        Command::DeviceGetInfo as u16,
        &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &raw[..1],
    );
    expect_error(&s, 4, libc::EINVAL);
    // Two fds on DMA_MAP.
    let mut m = Vec::new();
    DmaMap {
        flags: 3,
        offset: 0,
        addr: 0x1000,
        size: 0x1000,
    }
    .encode_into(&mut m);
    send(&s, 5, Command::DmaMap as u16, &m, &raw[..2]);
    expect_error(&s, 5, libc::EINVAL);
    // Found by the fuzzer: DATA_EVENTFD without fds and a huge count (de-assign) must be
    // refused before anything is allocated for it.
    let mut p = Vec::new();
    nestio_vfio_user::proto::IrqSet {
        flags: 4 | 32,
        index: 1,
        start: 0,
        count: u32::MAX,
        data: &[],
    }
    .encode_into(&mut p);
    send(&s, 6, Command::DeviceSetIrqs as u16, &p, &[]);
    expect_error(&s, 6, libc::EINVAL);
    assert!(!h.dev.irqs().has_eventfd(1, 0));
    assert_eq!(h.dev.dma_table().unwrap().len(), 0);
    assert_eq!(raw_get_info(&s, 7), 3);
}

#[test]
fn region_info_argsz_retry() {
    let h = Harness::new(ServerConfig::default());
    let (s, _t) = h.session();
    raw_version(&s);
    let mut p = Vec::new();
    nestio_vfio_user::proto::RegionInfoMsg {
        argsz: 32,
        index: 2,
        ..Default::default()
    }
    .encode_into(&mut p);
    send(&s, 2, Command::DeviceGetRegionInfo as u16, &p, &[]);
    let m = recv(&s).unwrap();
    let r = nestio_vfio_user::proto::RegionInfoReply::decode(&m.payload).unwrap();
    assert_eq!(r.info.argsz, 64, "needs 32 + sparse cap of one area");
    assert_eq!(r.info.cap_offset, 0);
    assert!(r.sparse.is_empty());
    assert_eq!(m.payload.len(), 32);
    // QEMU's client (hw/vfio-user/device.c) refuses CAPS with a cap_offset outside the
    // reply before it retries: CAPS only comes with the capabilities themselves.
    assert_eq!(
        r.info.flags & nestio_device_model::region_flags::CAPS,
        0,
        "CAPS set in a reply too short for the capabilities"
    );
    p[0] = 64;
    send(&s, 4, Command::DeviceGetRegionInfo as u16, &p, &[]);
    let m = recv(&s).unwrap();
    let r = nestio_vfio_user::proto::RegionInfoReply::decode(&m.payload).unwrap();
    assert_ne!(r.info.flags & nestio_device_model::region_flags::CAPS, 0);
    assert_eq!((r.info.argsz, r.info.cap_offset), (64, 32));
    assert_eq!(r.sparse.len(), 1);
    p[0] = 32;
    // argsz below the fixed part: EINVAL.
    p[0] = 16;
    send(&s, 3, Command::DeviceGetRegionInfo as u16, &p, &[]);
    expect_error(&s, 3, libc::EINVAL);
}

#[test]
fn dma_unmap_flags() {
    let h = Harness::new(ServerConfig::default());
    let (s, _t) = h.session();
    raw_version(&s);
    let mut u = Vec::new();
    nestio_vfio_user::proto::DmaUnmap {
        argsz: 24,
        flags: 1,
        addr: 0x1000,
        size: 0x1000,
    }
    .encode_into(&mut u);
    u.extend_from_slice(&[0u8; 16]);
    send(&s, 2, Command::DmaUnmap as u16, &u, &[]);
    expect_error(&s, 2, libc::ENOTSUP);
    let mut u = Vec::new();
    nestio_vfio_user::proto::DmaUnmap {
        argsz: 24,
        flags: 2,
        addr: 0x1000,
        size: 0,
    }
    .encode_into(&mut u);
    send(&s, 3, Command::DmaUnmap as u16, &u, &[]);
    // vfio.h: with ALL, iova and size must be 0 (QEMU asserts iova == 0 and sends size
    // 0); anything else is EINVAL (see spec_review.rs).
    expect_error(&s, 3, libc::EINVAL);
    let mut u = Vec::new();
    nestio_vfio_user::proto::DmaUnmap {
        argsz: 24,
        flags: 2,
        addr: 0,
        size: 0,
    }
    .encode_into(&mut u);
    send(&s, 4, Command::DmaUnmap as u16, &u, &[]);
    // The entry is echoed.
    let m = recv(&s).unwrap();
    assert!(!m.header.is_error());
    assert_eq!(m.payload, u);
    // A wrapping range without ALL: EINVAL.
    let mut u = Vec::new();
    nestio_vfio_user::proto::DmaUnmap {
        argsz: 24,
        flags: 0,
        addr: u64::MAX,
        size: 2,
    }
    .encode_into(&mut u);
    send(&s, 5, Command::DmaUnmap as u16, &u, &[]);
    expect_error(&s, 5, libc::EINVAL);
    let mut u = Vec::new();
    nestio_vfio_user::proto::DmaUnmap {
        argsz: 24,
        flags: 4,
        addr: 0,
        size: 0,
    }
    .encode_into(&mut u);
    send(&s, 4, Command::DmaUnmap as u16, &u, &[]);
    expect_error(&s, 4, libc::EINVAL);
}

#[test]
fn disconnect_mid_message_cleans_up_and_next_client_works() {
    let h = Harness::new(ServerConfig::default());
    // A client that maps memory and sets eventfds, then dies mid-message.
    let (c, t) = h.client(ClientConfig::default());
    let mem = memfd(0x1000);
    c.dma_map(nestio_dma::DmaMapRequest {
        range: nestio_dma::DmaRange::new(0x1000, 0x1000).unwrap(),
        prot: nestio_dma::Prot::RW,
        backing: nestio_dma::DmaBacking::Fd {
            fd: Arc::new(mem.try_clone().unwrap()),
            offset: 0,
        },
    })
    .unwrap();
    c.set_irqs(
        1,
        nestio_device_model::IrqAction::Trigger,
        0,
        1,
        nestio_device_model::IrqData::Eventfd(vec![Some(eventfd())]),
    )
    .unwrap();
    c.region_write(0, 0, b"kept").unwrap();
    assert_eq!(h.dev.dma_table().unwrap().len(), 1);
    assert!(h.dev.irqs().has_eventfd(1, 0));
    drop(c);
    t.join().unwrap().unwrap();
    assert_eq!(h.dev.dma_table().unwrap().len(), 0, "DMA unmapped");
    assert!(!h.dev.irqs().has_eventfd(1, 0), "eventfds dropped");

    // Raw client: half a message, then gone.
    let (mut s, t) = h.session();
    raw_version(&s);
    let p = region_write_payload(0, 0, &[1; 100]);
    let hdr = nestio_vfio_user::Header {
        msg_id: 2,
        cmd: 10,
        size: (16 + p.len()) as u32,
        flags: 0,
        error: 0,
    };
    s.write_all(&hdr.encode()).unwrap();
    s.write_all(&p[..30]).unwrap();
    drop(s);
    assert!(t.join().unwrap().is_err(), "truncated message is an error");
    // Garbage.
    let (mut s, t) = h.session();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&garbage);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let _ = t.join().unwrap();
    // Device state kept; next client served.
    let (c, _t) = h.client(ClientConfig::default());
    let mut b = [0u8; 4];
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(&b, b"kept");
}

#[test]
fn listener_serves_clients_one_after_another() {
    let dir = std::env::temp_dir().join(format!("nestio-vu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dev.sock");
    // A stale socket file is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let listener = nestio_vfio_user::bind(&path).unwrap();
    let h = Harness::new(ServerConfig::default());
    let s = h.server.clone();
    std::thread::spawn(move || {
        let _ = s.serve_listener(listener);
    });
    for i in 0..3u8 {
        let c = nestio_vfio_user::Client::connect(&path).unwrap();
        c.region_write(0, i as u64, &[i + 1]).unwrap();
        drop(c);
    }
    let c = nestio_vfio_user::Client::connect(&path).unwrap();
    let mut b = [0u8; 3];
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3]);
    // A regular file is not replaced.
    let f = dir.join("plain");
    std::fs::write(&f, b"x").unwrap();
    assert!(nestio_vfio_user::bind(&f).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `listening` tells a bound-but-not-listening socket (the moment between bind() and
/// listen() in which a connect is refused) from a listening one, paths with spaces
/// included.
#[test]
fn listening_sees_listen_not_bind() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let dir = std::env::temp_dir().join(format!("nestio vu listen {}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dev sock");
    let me = std::process::id();
    assert!(!nestio_vfio_user::listening(me, &path));
    // SAFETY: socket() returns a new fd or -1 (checked).
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: addr is a valid sockaddr_un of the given size; sock is ours.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    assert!(path.exists());
    assert!(!nestio_vfio_user::listening(me, &path), "bound only");
    // SAFETY: listen on our bound socket.
    assert_eq!(unsafe { libc::listen(sock.as_raw_fd(), 1) }, 0);
    assert!(nestio_vfio_user::listening(me, &path));
    // A process that does not exist shows nothing.
    assert!(!nestio_vfio_user::listening(u32::MAX, &path));
    drop(sock);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn device_feature_probe_unknown_and_short_argsz() {
    use nestio_vfio_user::proto::{feature, DeviceFeature};
    let h = Harness::new(ServerConfig::default());
    let (s, _t) = h.session();
    raw_version(&s);
    let msg = |flags: u32, argsz: u32, data: &[u8]| {
        let mut p = Vec::new();
        DeviceFeature { argsz, flags, data }.encode_into(&mut p);
        p
    };
    // PROBE of MIGRATION and of DMA logging: reply echoes argsz/flags only.
    for (id, idx, op) in [
        (2u16, feature::MIGRATION, feature::GET),
        (3, feature::DMA_LOGGING_START, feature::SET),
    ] {
        let f = feature::PROBE | op | idx as u32;
        send(&s, id, Command::DeviceFeature as u16, &msg(f, 8, &[]), &[]);
        let m = recv(&s).unwrap();
        assert!(!m.header.is_error(), "probe {idx}");
        assert_eq!(m.payload.len(), 8);
    }
    // PROBE of SET on the GET-only MIGRATION feature: EINVAL.
    send(
        &s,
        10,
        Command::DeviceFeature as u16,
        &msg(feature::PROBE | feature::SET | 1, 8, &[]),
        &[],
    );
    expect_error(&s, 10, libc::EINVAL);
    // Unknown feature: ENOTTY.
    send(
        &s,
        4,
        Command::DeviceFeature as u16,
        &msg(feature::GET | 3, 64, &[]),
        &[],
    );
    expect_error(&s, 4, libc::ENOTTY);
    // GET MIGRATION with no room for the data: EINVAL.
    send(
        &s,
        5,
        Command::DeviceFeature as u16,
        &msg(feature::GET | 1, 8, &[]),
        &[],
    );
    expect_error(&s, 5, libc::EINVAL);
    // GET MIGRATION: flags = STOP_COPY.
    send(
        &s,
        6,
        Command::DeviceFeature as u16,
        &msg(feature::GET | 1, 16, &[]),
        &[],
    );
    let m = recv(&s).unwrap();
    assert_eq!(m.payload.len(), 16);
    assert_eq!(u64::from_ne_bytes(m.payload[8..16].try_into().unwrap()), 1);
    // SET MIG_DEVICE_STATE to an unknown state number: EINVAL; state unchanged.
    let mut d = Vec::new();
    nestio_vfio_user::proto::encode_mig_state(42, &mut d);
    send(
        &s,
        7,
        Command::DeviceFeature as u16,
        &msg(feature::SET | 2, 16, &d),
        &[],
    );
    expect_error(&s, 7, libc::EINVAL);
    assert_eq!(
        h.dev.mig_state().unwrap(),
        nestio_device_model::MigState::Running
    );
    // DMA_LOGGING_REPORT with a bitmap larger than max_data_xfer_size: E2BIG.
    let mut r = Vec::new();
    nestio_vfio_user::proto::LoggingReport {
        iova: 0,
        length: 1 << 50,
        page_size: 4096,
    }
    .encode_into(&mut r);
    send(
        &s,
        8,
        Command::DeviceFeature as u16,
        &msg(feature::GET | 8, u32::MAX, &r),
        &[],
    );
    expect_error(&s, 8, libc::E2BIG);
    assert_eq!(raw_get_info(&s, 9), 3);
}

/// nestio's nested-IOMMU commands: with the capability, a malformed one gets EINVAL
/// (a no_reply one nothing) and an unassigned number of the private range ENOSYS;
/// without it every number of the range gets ENOTSUP. The stream stays in sync.
#[test]
fn nested_iommu_commands_malformed_and_unnegotiated() {
    use nestio_vfio_user::nested_iommu::{
        IommuBind, IommuInvalidate, NestedIommuCap, NestedIommuCaps,
    };
    use nestio_vfio_user::proto::Capabilities;
    let h = Harness::new(ServerConfig::default());
    let (s, _t) = h.session();
    let v = raw_version_with(
        &s,
        Capabilities {
            nestio_nested_iommu: Some(NestedIommuCap::smmuv3(NestedIommuCaps::default())),
            ..Capabilities::default()
        },
    );
    assert!(v.caps.nestio_nested_iommu.is_some());
    let bind = Command::NestioIommuBind as u16;
    let inv = Command::NestioIommuInvalidate as u16;
    let mut good = Vec::new();
    IommuBind {
        vsid: 3,
        ste0: 0xb | 0x1000,
        ste1: 0,
    }
    .encode_into(&mut good);
    // Truncated, extended, and a count that promises more than is there.
    send(&s, 2, bind, &good[..31], &[]);
    expect_error(&s, 2, libc::EINVAL);
    let mut long = good.clone();
    long.extend_from_slice(&[0; 8]);
    send(&s, 3, bind, &long, &[]);
    expect_error(&s, 3, libc::EINVAL);
    let mut p = Vec::new();
    IommuInvalidate::encode_into(&[[0x10; 16]; 2], &mut p);
    p[4] = 200;
    send(&s, 4, inv, &p, &[]);
    expect_error(&s, 4, libc::EINVAL);
    // A malformed no_reply BIND: no reply, and the next message is answered.
    let hdr = nestio_vfio_user::Header {
        msg_id: 5,
        cmd: bind,
        size: 16 + 31,
        flags: hdr_flags::NO_REPLY,
        error: 0,
    };
    nestio_vfio_user::socket::send_message(&s, &hdr, &good[..31], &[]).unwrap();
    // Unassigned numbers of the private range.
    send(&s, 6, 0x1005, &[], &[]);
    expect_error(&s, 6, libc::ENOSYS);
    send(&s, 7, 0x10ff, &[1, 2, 3], &[]);
    expect_error(&s, 7, libc::ENOSYS);
    assert_eq!(raw_get_info(&s, 8), 3);
    assert!(!h.dev.dma_port().unwrap().is_translated());

    // Without the capability: ENOTSUP for every number of the range.
    let (s2, _t2) = h.session();
    assert!(raw_version(&s2).caps.nestio_nested_iommu.is_none());
    for (id, cmd) in [
        (2u16, 0x1000u16),
        (3, bind),
        (4, 0x1002),
        (5, inv),
        (6, 0x1004),
    ] {
        send(&s2, id, cmd, &good, &[]);
        expect_error(&s2, id, libc::ENOTSUP);
    }
    assert_eq!(raw_get_info(&s2, 9), 3);
}
