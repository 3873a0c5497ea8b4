//! Every command through the real client and server over a socketpair.

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use common::*;
use nestio_device_model::{
    flags, irq_flags, region_flags, DeviceError, IrqAction, IrqData, MigState, VfioDevice,
};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use nestio_vfio_user::proto::MultiWrite;
use nestio_vfio_user::testdev::{reg, RAM_SIZE, REGS_SIZE};
use nestio_vfio_user::{ClientConfig, ServerConfig};

fn errno_of(e: DeviceError) -> i32 {
    match e {
        DeviceError::Remote { errno, .. } => errno,
        other => panic!("expected a remote error, got {other}"),
    }
}

fn fd_map(iova: u64, size: u64, fd: &std::os::fd::OwnedFd, offset: u64) -> DmaMapRequest {
    DmaMapRequest {
        range: DmaRange::new(iova, size).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: Arc::new(fd.try_clone().unwrap()),
            offset,
        },
    }
}

#[test]
fn version_negotiation_and_info() {
    let h = Harness::new(ServerConfig::default());
    let (c, _t) = h.client(ClientConfig::default());
    assert_eq!(c.version().major, 0);
    assert_eq!(c.version().minor, 2);
    assert!(c.twin_socket());
    assert!(c.write_multiple());
    assert_eq!(c.version().caps.max_msg_fds, 64);
    let info = c.info();
    assert_eq!(info.flags, flags::PCI | flags::RESET);
    assert_eq!((info.num_regions, info.num_irqs), (3, 2));

    let (c2, _t2) = h.client(ClientConfig {
        twin_socket: false,
        write_multiple: false,
        ..ClientConfig::default()
    });
    assert!(!c2.twin_socket());
    assert!(!c2.write_multiple());
}

#[test]
fn region_read_write_split_by_max_xfer() {
    let h = Harness::new(ServerConfig {
        max_data_xfer_size: 1024,
        ..ServerConfig::default()
    });
    let (c, _t) = h.client(ClientConfig::default());
    let before = h.server.stats().commands;
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    c.region_write(0, 100, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    c.region_read(0, 100, &mut back).unwrap();
    assert_eq!(back, data);
    // 10 writes + 10 reads of at most 1024 bytes each.
    assert_eq!(h.server.stats().commands - before, 20);
    // The device sees the same bytes.
    let mut d = vec![0u8; 16];
    h.dev.region_read(0, 100, &mut d).unwrap();
    assert_eq!(&d[..], &data[..16]);
    // Out of range and unknown region: EINVAL from the device.
    let e = c
        .region_read(0, RAM_SIZE as u64 - 2, &mut [0u8; 4])
        .unwrap_err();
    assert_eq!(errno_of(e), libc::EINVAL);
    let e = c.region_write(9, 0, &[1]).unwrap_err();
    assert_eq!(errno_of(e), libc::EINVAL);
    // Posted writes are ordered before a later read.
    c.region_write_posted(0, 0, &[9, 8, 7]).unwrap();
    let mut r = [0u8; 3];
    c.region_read(0, 0, &mut r).unwrap();
    assert_eq!(r, [9, 8, 7]);
}

#[test]
fn region_info_sparse_mmap_and_fd() {
    let h = Harness::new(ServerConfig::default());
    let (c, _t) = h.client(ClientConfig::default());
    let r0 = c.region_info(0).unwrap();
    assert_eq!(r0.size, RAM_SIZE as u64);
    assert!(r0.fd.is_none() && r0.sparse.is_empty());
    assert_eq!(r0.flags, region_flags::READ | region_flags::WRITE);
    let r2 = c.region_info(2).unwrap();
    assert_eq!(r2.flags & region_flags::MMAP, region_flags::MMAP);
    assert_eq!(r2.sparse.len(), 1);
    assert_eq!((r2.sparse[0].offset, r2.sparse[0].size), (0x1000, 0x1000));
    let fd = r2.fd.expect("region fd");
    // The fd is the device's memory: a write through it is seen by REGION_READ.
    pwrite(&fd, 0x1800, b"shared");
    let mut b = [0u8; 6];
    c.region_read(2, 0x1800, &mut b).unwrap();
    assert_eq!(&b, b"shared");
    assert!(c.region_info(5).is_err());
}

#[test]
fn region_io_fds() {
    let h = Harness::new(ServerConfig::default());
    let (c, _t) = h.client(ClientConfig::default());
    assert!(c.region_io_fds(0).unwrap().is_empty());
    let v = c.region_io_fds(1).unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].offset, reg::DOORBELL);
    assert_eq!(v[0].size, 4);
    assert_eq!(v[0].datamatch, Some(1));
    // It is an eventfd: writing 8 bytes works.
    let one = 1u64;
    // SAFETY: writes 8 bytes from a local.
    let r = unsafe {
        libc::write(
            v[0].fd.as_raw_fd(),
            &one as *const u64 as *const libc::c_void,
            8,
        )
    };
    assert_eq!(r, 8);
    assert!(c.region_io_fds(7).is_err());
}

#[test]
fn irqs_eventfd_trigger_mask_and_disable() {
    let h = Harness::new(ServerConfig::default());
    let (c, _t) = h.client(ClientConfig::default());
    let i1 = c.irq_info(1).unwrap();
    assert_eq!((i1.index, i1.count, i1.flags), (1, 4, irq_flags::EVENTFD));
    assert!(c.irq_info(3).is_err());
    let (e0, e2) = (eventfd(), eventfd());
    c.set_irqs(
        1,
        IrqAction::Trigger,
        0,
        3,
        IrqData::Eventfd(vec![
            Some(e0.try_clone().unwrap()),
            None,
            Some(e2.try_clone().unwrap()),
        ]),
    )
    .unwrap();
    assert!(h.dev.trigger(1, 0));
    assert!(!h.dev.trigger(1, 1));
    assert!(h.dev.trigger(1, 2));
    assert_eq!(eventfd_count(&e0), 1);
    assert_eq!(eventfd_count(&e2), 1);
    // Trigger by the client (DATA_BOOL).
    c.set_irqs(
        1,
        IrqAction::Trigger,
        0,
        3,
        IrqData::Bool(vec![false, false, true]),
    )
    .unwrap();
    assert_eq!(eventfd_count(&e2), 1);
    assert_eq!(eventfd_count(&e0), 0);
    // INTx: automasked, unmask delivers the pending one.
    let ix = eventfd();
    c.set_irqs(
        0,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfd(vec![Some(ix.try_clone().unwrap())]),
    )
    .unwrap();
    assert!(h.dev.trigger(0, 0));
    assert!(!h.dev.trigger(0, 0), "automasked");
    c.set_irqs(0, IrqAction::Unmask, 0, 1, IrqData::None)
        .unwrap();
    assert_eq!(eventfd_count(&ix), 2);
    // Disable all of index 1.
    c.set_irqs(1, IrqAction::Trigger, 0, 0, IrqData::None)
        .unwrap();
    assert!(!h.dev.irqs().has_eventfd(1, 0));
    // Mask on a non-maskable index: EINVAL.
    let e = c
        .set_irqs(1, IrqAction::Mask, 0, 1, IrqData::None)
        .unwrap_err();
    assert_eq!(errno_of(e), libc::EINVAL);
}

#[test]
fn dma_fd_mapping_and_device_dma() {
    let h = Harness::new(ServerConfig::default());
    let (c, _t) = h.client(ClientConfig::default());
    let mem = memfd(0x10000);
    c.dma_map(fd_map(0x100000, 0x8000, &mem, 0x4000)).unwrap();
    pwrite(&mem, 0x4000 + 0x10, b"from guest memory");
    // Device copies guest -> region 0.
    assert_eq!(device_dma(&c, 0x100010, 17, 0x200, 1), 0);
    let mut b = [0u8; 17];
    c.region_read(0, 0x200, &mut b).unwrap();
    assert_eq!(&b, b"from guest memory");
    // Device copies region 0 -> guest.
    assert_eq!(device_dma(&c, 0x100800, 17, 0x200, 2), 0);
    assert_eq!(pread(&mem, 0x4800, 17), b"from guest memory");
    // Outside every mapping: the device sees a fault (EFAULT).
    assert_eq!(device_dma(&c, 0x200000, 4, 0, 1), libc::EFAULT as u64);
    // Overlap: EEXIST. Unmap of a non-mapping: ENOENT.
    let e = c.dma_map(fd_map(0x104000, 0x1000, &mem, 0)).unwrap_err();
    assert_eq!(errno_of(e), libc::EEXIST);
    let e = c.dma_unmap(0x100000, 0x1000).unwrap_err();
    assert_eq!(errno_of(e), libc::ENOENT);
    c.dma_unmap(0x100000, 0x8000).unwrap();
    assert_eq!(h.dev.dma_table().unwrap().len(), 0);
    c.dma_map(fd_map(0x100000, 0x1000, &mem, 0)).unwrap();
    c.dma_map(fd_map(0x300000, 0x1000, &mem, 0)).unwrap();
    assert_eq!(h.dev.dma_table().unwrap().len(), 2);
    c.dma_unmap_all().unwrap();
    assert_eq!(h.dev.dma_table().unwrap().len(), 0);
}

/// A client may hand over a memory file it can still truncate (an unsealed memfd). Had
/// the server mmapped it, shrinking the file would make the next device DMA raise
/// SIGBUS and kill the server (here: this test process). Instead the device gets a fault
/// and the server keeps serving.
#[test]
fn shrinking_an_unsealed_mapped_file_is_a_dma_fault_not_a_crash() {
    let h = Harness::new(ServerConfig::default());
    let (c, _t) = h.client(ClientConfig::default());
    // SAFETY: memfd_create with a literal name; the result is checked.
    let raw = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor owned by nobody else.
    let mem = std::fs::File::from(unsafe {
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw)
    });
    mem.set_len(0x4000).unwrap();
    let mem = std::os::fd::OwnedFd::from(mem);
    c.dma_map(fd_map(0x100000, 0x4000, &mem, 0)).unwrap();
    pwrite(&mem, 0x3000, b"still here");
    assert_eq!(device_dma(&c, 0x103000, 10, 0x100, 1), 0);
    let stats = h.dev.dma_table().unwrap().stats();
    assert_eq!((stats.file_bytes, stats.in_place_bytes), (10, 0));

    std::fs::File::from(mem.try_clone().unwrap())
        .set_len(0x1000)
        .unwrap();
    assert_eq!(device_dma(&c, 0x103000, 10, 0x100, 1), libc::EFAULT as u64);
    assert_eq!(device_dma(&c, 0x103000, 10, 0x100, 2), libc::EFAULT as u64);
    // The server is alive and the device state intact.
    let mut b = [0u8; 10];
    c.region_read(0, 0x100, &mut b).unwrap();
    assert_eq!(&b, b"still here");
    // Below the new end of file the mapping still works.
    assert_eq!(device_dma(&c, 0x100000, 10, 0x100, 2), 0);
    assert_eq!(pread(&mem, 0, 10), b"still here");
}

fn peer_dma(twin: bool) {
    let h = Harness::new(ServerConfig::default());
    let (c, _t) = h.client(ClientConfig {
        twin_socket: twin,
        // Small transfers so that one device DMA takes several messages.
        max_data_xfer_size: 4096,
        ..ClientConfig::default()
    });
    assert_eq!(c.twin_socket(), twin);
    let peer = VecPeer::new(0x40000, 0x10000);
    peer.mem.lock().unwrap()[0x100..0x100 + 9000].fill(0xab);
    c.dma_map(DmaMapRequest {
        range: DmaRange::new(0x40000, 0x10000).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Peer(peer.clone()),
    })
    .unwrap();
    // The device reads 9000 bytes of peer memory while the client waits for the
    // REGION_WRITE reply: served inline (main socket) or by the twin thread.
    assert_eq!(device_dma(&c, 0x40100, 9000, 0, 1), 0);
    assert!(
        *peer.ops.lock().unwrap() >= 3,
        "split into <= 4096-byte messages"
    );
    let mut b = vec![0u8; 9000];
    c.region_read(0, 0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0xab));
    // And writes back.
    c.region_write(0, 0x1000, b"peer write").unwrap();
    assert_eq!(device_dma(&c, 0x48000, 10, 0x1000, 2), 0);
    assert_eq!(&peer.mem.lock().unwrap()[0x8000..0x800a], b"peer write");
    // Beyond the peer mapping: fault.
    assert_eq!(device_dma(&c, 0x4fff0, 0x20, 0, 1), libc::EFAULT as u64);
    if twin {
        // Server-initiated DMA while the client is idle: only the twin socket can carry it.
        use nestio_dma::DmaSpace;
        h.dev.dma_table().unwrap().write(0x40000, b"idle").unwrap();
        assert_eq!(&peer.mem.lock().unwrap()[..4], b"idle");
    }
    // A read-only peer mapping refuses device writes.
    let ro = VecPeer::new(0x80000, 0x1000);
    c.dma_map(DmaMapRequest {
        range: DmaRange::new(0x80000, 0x1000).unwrap(),
        prot: Prot::READ,
        backing: DmaBacking::Peer(ro),
    })
    .unwrap();
    assert_ne!(device_dma(&c, 0x80000, 4, 0, 2), 0);
    c.dma_unmap(0x40000, 0x10000).unwrap();
    assert_eq!(device_dma(&c, 0x40100, 4, 0, 1), libc::EFAULT as u64);
}

#[test]
fn dma_peer_over_main_socket() {
    peer_dma(false);
}

#[test]
fn dma_peer_over_twin_socket() {
    peer_dma(true);
}

#[test]
fn reset_and_migration_between_two_servers() {
    let src = Harness::new(ServerConfig::default());
    let (c, _t) = src.client(ClientConfig::default());
    let pattern: Vec<u8> = (0..RAM_SIZE).map(|i| (i % 251) as u8).collect();
    c.region_write(0, 0, &pattern).unwrap();
    assert_eq!(c.migration_flags().unwrap().0 & 1, 1);
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
    assert_eq!(
        c.mig_set_state(MigState::StopCopy).unwrap(),
        MigState::StopCopy
    );
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 10_000];
    loop {
        let n = c.mig_data_read(&mut buf).unwrap();
        stream.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            break;
        }
    }
    assert_eq!(stream.len(), RAM_SIZE + REGS_SIZE);
    // A data read in RUNNING fails: no stream is open (EINVAL, as every nestio device).
    c.mig_set_state(MigState::Running).unwrap();
    assert_eq!(
        errno_of(c.mig_data_read(&mut buf).unwrap_err()),
        libc::EINVAL
    );

    let dst = Harness::new(ServerConfig::default());
    let (d, _t2) = dst.client(ClientConfig::default());
    assert_eq!(
        d.mig_set_state(MigState::Resuming).unwrap(),
        MigState::Resuming
    );
    d.mig_data_write(&stream).unwrap();
    assert_eq!(
        d.mig_set_state(MigState::Running).unwrap(),
        MigState::Running
    );
    let mut back = vec![0u8; RAM_SIZE];
    d.region_read(0, 0, &mut back).unwrap();
    assert_eq!(back, pattern);
    // Invalid target state (ERROR cannot be asked for).
    assert!(d.mig_set_state(MigState::Error).is_err());

    c.reset().unwrap();
    assert_eq!(src.dev.resets(), 1);
    let mut z = [1u8; 8];
    c.region_read(0, 8, &mut z).unwrap();
    assert_eq!(z, [0; 8]);
}

#[test]
fn dirty_logging_reports_device_writes() {
    let h = Harness::new(ServerConfig::default());
    let (c, _t) = h.client(ClientConfig::default());
    let mem = memfd(0x40000);
    c.dma_map(fd_map(0x1000000, 0x40000, &mem, 0)).unwrap();
    let range = DmaRange::new(0x1000000, 0x40000).unwrap();
    c.dma_logging_start(4096, &[range]).unwrap();
    assert_eq!(device_dma(&c, 0x1000000 + 5 * 4096 + 10, 8, 0, 2), 0);
    // Outside the mapping: a fault, nothing logged.
    assert_eq!(
        device_dma(&c, 0x1000000 + 70 * 4096, 8, 0, 2),
        libc::EFAULT as u64
    );
    let bm = c.dma_logging_report(range, 4096).unwrap();
    assert_eq!(bm.len(), 1);
    assert_eq!(bm[0], 1 << 5);
    assert_eq!(device_dma(&c, 0x1000000 + 63 * 4096, 8, 0, 2), 0);
    let bm = c.dma_logging_report(range, 4096).unwrap();
    assert_eq!(bm[0], 1 << 63, "report clears; only the new page is dirty");
    c.dma_logging_stop().unwrap();
    assert!(!h.dev.dma_table().unwrap().logging());
}

#[test]
fn write_multi_and_fallback() {
    let h = Harness::new(ServerConfig::default());
    let (c, _t) = h.client(ClientConfig::default());
    let writes = [
        MultiWrite::new(0, 0, &[1, 2, 3, 4]).unwrap(),
        MultiWrite::new(0, 4, &[5; 8]).unwrap(),
        MultiWrite::new(0, 12, &[6]).unwrap(),
    ];
    let before = h.server.stats().commands;
    c.region_write_multi(&writes).unwrap();
    assert_eq!(h.server.stats().commands - before, 1);
    let mut b = [0u8; 13];
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6]);
    let bad = [MultiWrite::new(9, 0, &[1]).unwrap()];
    assert_eq!(
        errno_of(c.region_write_multi(&bad).unwrap_err()),
        libc::EINVAL
    );

    let (c2, _t2) = h.client(ClientConfig {
        write_multiple: false,
        ..ClientConfig::default()
    });
    let before = h.server.stats().commands;
    c2.region_write_multi(&writes).unwrap();
    assert_eq!(
        h.server.stats().commands - before,
        3,
        "one REGION_WRITE per write"
    );
}

#[test]
fn server_gone_gives_disconnected() {
    let h = Harness::new(ServerConfig::default());
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let s = h.server.clone();
    let t = std::thread::spawn(move || {
        // Serve exactly VERSION + GET_INFO, then vanish.
        let _ = s.serve_stream(b);
    });
    let c = nestio_vfio_user::Client::from_stream(a.try_clone().unwrap(), ClientConfig::default())
        .unwrap();
    c.region_write(0, 0, &[1]).unwrap();
    // Kill the connection from underneath (as if the server process died).
    a.shutdown(std::net::Shutdown::Both).unwrap();
    t.join().unwrap();
    match c.region_read(0, 0, &mut [0u8; 1]) {
        Err(DeviceError::Disconnected(msg)) => assert!(msg.contains("went away"), "{msg}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(matches!(c.reset(), Err(DeviceError::Disconnected(_))));
}

#[test]
fn concurrent_threads_share_one_client_and_server_worker_dma() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let h = Harness::new(ServerConfig::default());
    // No twin socket: every server->client DMA travels on the main socket, read by
    // whichever client thread is waiting, while the server's own loop parks the replies.
    let (c, _t) = h.client(ClientConfig {
        twin_socket: false,
        ..ClientConfig::default()
    });
    let c = Arc::new(c);
    let peer = VecPeer::new(0x90000, 0x1000);
    c.dma_map(DmaMapRequest {
        range: DmaRange::new(0x90000, 0x1000).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Peer(peer.clone()),
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for t in 0..4u64 {
        let c = c.clone();
        workers.push(std::thread::spawn(move || {
            for i in 0..300u64 {
                let off = t * 1024 + (i % 64) * 8;
                let v = (t << 32) | i;
                c.region_write(0, off, &v.to_le_bytes()).unwrap();
                let mut b = [0u8; 8];
                c.region_read(0, off, &mut b).unwrap();
                assert_eq!(u64::from_le_bytes(b), v, "thread {t} iteration {i}");
            }
        }));
    }
    // Meanwhile a device-side worker thread (not the server loop) writes peer memory.
    let dev = h.dev.clone();
    let s2 = stop.clone();
    let dma = std::thread::spawn(move || {
        use nestio_dma::DmaSpace;
        let mut n = 0u32;
        while !s2.load(Ordering::Relaxed) && n < 50 {
            dev.dma_table()
                .unwrap()
                .write(0x90000 + (n as u64 % 16) * 4, &n.to_le_bytes())
                .unwrap();
            n += 1;
        }
        n
    });
    for w in workers {
        w.join().unwrap();
    }
    // Keep a waiting client thread around until the device worker is done.
    while !dma.is_finished() {
        let mut b = [0u8; 4];
        c.region_read(0, 0, &mut b).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let n = dma.join().unwrap();
    assert_eq!(n, 50);
    assert_eq!(*peer.ops.lock().unwrap(), 50);
    let mem = peer.mem.lock().unwrap();
    // Write 49 went to slot 49 % 16 = 1.
    let last = u32::from_le_bytes(mem[4..8].try_into().unwrap());
    assert_eq!(last, 49);
}

#[test]
fn silent_server_gives_disconnected_after_reply_timeout() {
    use nestio_vfio_user::proto::{Capabilities, Command, DeviceInfoMsg, Version};
    use nestio_vfio_user::socket::{recv_message, send_message};
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    // A server that negotiates, answers GET_INFO, then never answers again.
    let fake = std::thread::spawn(move || {
        let v = recv_message(&b, 1 << 20).unwrap().unwrap();
        assert_eq!(v.header.cmd, Command::Version as u16);
        let mut p = Vec::new();
        Version {
            major: 0,
            minor: 0,
            caps: Capabilities::default(),
        }
        .encode_into(&mut p);
        send_message(&b, &v.header.reply(p.len()).unwrap(), &p, &[]).unwrap();
        let i = recv_message(&b, 1 << 20).unwrap().unwrap();
        let mut p = Vec::new();
        DeviceInfoMsg {
            argsz: 16,
            flags: 0,
            num_regions: 1,
            num_irqs: 0,
        }
        .encode_into(&mut p);
        send_message(&b, &i.header.reply(p.len()).unwrap(), &p, &[]).unwrap();
        // Swallow everything until the client closes.
        while let Ok(Some(_)) = recv_message(&b, 1 << 20) {}
    });
    // Negotiate without a timeout (the fake thread may be scheduled late on a loaded
    // machine), then wait at most 200 ms for each reply.
    let c = nestio_vfio_user::Client::from_stream(a, ClientConfig::default()).unwrap();
    assert_eq!(c.info().num_regions, 1);
    c.set_reply_timeout(Some(std::time::Duration::from_millis(200)));
    match c.region_read(0, 0, &mut [0u8; 4]) {
        Err(DeviceError::Disconnected(m)) => assert!(m.contains("no reply within"), "{m}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(matches!(c.reset(), Err(DeviceError::Disconnected(_))));
    drop(c);
    fake.join().unwrap();
}

/// A peer that takes too long: each read blocks until the test releases it (or 120 s
/// pass), so it answers after the server's DMA timeout however loaded the machine is
/// (a fixed sleep could end before a starved server thread looks at its clock).
struct SlowPeer(std::sync::Mutex<std::sync::mpsc::Receiver<()>>);

impl nestio_dma::DmaPeer for SlowPeer {
    fn dma_read(&self, _addr: u64, _buf: &mut [u8]) -> Result<(), i32> {
        let release = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = release.recv_timeout(std::time::Duration::from_secs(120));
        Ok(())
    }
    fn dma_write(&self, _addr: u64, _data: &[u8]) -> Result<(), i32> {
        Ok(())
    }
}

#[test]
fn client_that_does_not_answer_dma_gets_etimedout() {
    let h = Harness::new(ServerConfig {
        dma_timeout: Some(std::time::Duration::from_millis(100)),
        ..ServerConfig::default()
    });
    let (c, _t) = h.client(ClientConfig::default());
    assert!(c.twin_socket());
    // Dropped before the client (declared after it), even on a failed assertion: the
    // blocked peer is released before the client goes.
    let (_release, blocked) = std::sync::mpsc::channel::<()>();
    c.dma_map(DmaMapRequest {
        range: DmaRange::new(0x50000, 0x1000).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Peer(Arc::new(SlowPeer(std::sync::Mutex::new(blocked)))),
    })
    .unwrap();
    assert_eq!(device_dma(&c, 0x50000, 8, 0, 1), libc::ETIMEDOUT as u64);
    // The main channel still works; the DMA channel is closed for this session.
    let mut b = [0u8; 4];
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(device_dma(&c, 0x50000, 8, 0, 1), libc::ENOTCONN as u64);
}
