//! rust-vmm `vfio_user` 0.1.7 `Client` -> nestio's vfio-user `Server`.
//!
//! nestio's server serves [`common::ours::TestDevice`] (message-only BAR0 with a doorbell
//! and DMA registers, a memfd-backed BAR1 with a sparse mmap area, a config region,
//! five irq indices, DMA through a checked map table) over a socketpair; a recording
//! proxy (tests/common) sits between it and their client, so the tests see exactly
//! what went over the wire. Every command their client has is exercised: VERSION,
//! DEVICE_GET_INFO, DEVICE_GET_REGION_INFO (with the sparse capability and the fd),
//! DMA_MAP (memfd) / DMA_UNMAP, DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS (eventfds fired by
//! the device), REGION_READ / REGION_WRITE, DEVICE_RESET, and error replies.
//!
//! Their client's bugs are pinned where they show (tests named `..._bug_...` assert the
//! wrong behaviour, with the spec rule in the comment).

mod common;
#[path = "common/ours.rs"]
mod ours;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use common::*;
use nestio_device_model::{flags, pci_index, VfioDevice};
use nestio_vfio_user::server::ServerConfig;
use ours::TestDevice;
use vfio_bindings::bindings::vfio::*;

/// nestio's server on one end of a socketpair, the proxy on the other.
struct Setup {
    dev: Arc<TestDevice>,
    proxy: Proxy,
    server: Option<JoinHandle<Result<(), nestio_vfio_user::server::ServerError>>>,
}

impl Setup {
    fn new(tag: &str, device_flags: u32) -> Setup {
        Self::with(tag, TestDevice::new(device_flags), ServerConfig::default())
    }

    fn with(tag: &str, dev: Arc<TestDevice>, config: ServerConfig) -> Setup {
        let (ours_end, proxy_end) = UnixStream::pair().expect("socketpair");
        let server =
            nestio_vfio_user::server::Server::new(dev.clone() as Arc<dyn VfioDevice>, config);
        let server = std::thread::spawn(move || server.serve_stream(ours_end));
        let proxy = Proxy::start(tag, proxy_end);
        Setup {
            dev,
            proxy,
            server: Some(server),
        }
    }

    fn client(&self) -> vfio_user::Client {
        vfio_user::Client::new(&self.proxy.path).expect("their Client::new against our server")
    }

    /// Wait for the server's session to end (the client must be gone) and return how.
    fn finish(&mut self) -> Result<(), nestio_vfio_user::server::ServerError> {
        self.server
            .take()
            .expect("finished twice")
            .join()
            .expect("our server thread panicked")
    }

    /// The last message the server sent.
    fn last_reply(&self) -> (Hdr, Vec<u8>) {
        self.proxy.server_messages().pop().expect("a reply")
    }
}

fn map_memfd(size: u64) -> OwnedFd {
    let fd = memfd(size);
    let pattern: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
    pwrite(fd.as_raw_fd(), 0, &pattern);
    fd
}

/// VERSION + DEVICE_GET_INFO + every DEVICE_GET_REGION_INFO, as `Client::new` does them:
/// regions, sizes, flags, the sparse mmap area and the fd all arrive; the fd their client
/// gets is our BAR1 memfd (same inode), and a write through its mmap of the sparse area is
/// what a REGION_READ of that offset returns.
#[test]
fn their_client_enumerates_our_device() {
    let _g = guard("their_client_enumerates_our_device");
    let s = Setup::new("enum", flags::PCI | flags::RESET);
    let client = s.client();

    let r0 = client.region(0).expect("region 0");
    assert_eq!(r0.size, ours::BAR0_SIZE);
    assert_eq!(
        r0.flags & (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE),
        3
    );
    assert!(r0.file_offset.is_none(), "BAR0 has no fd");
    assert!(r0.sparse_areas.is_empty());

    let r1 = client.region(1).expect("region 1");
    assert_eq!(r1.size, ours::BAR1_SIZE);
    assert_ne!(r1.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert_ne!(r1.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(r1.sparse_areas.len(), 1);
    assert_eq!(
        (r1.sparse_areas[0].offset, r1.sparse_areas[0].size),
        (ours::BAR1_SPARSE.offset, ours::BAR1_SPARSE.size)
    );
    let fo = r1.file_offset.as_ref().expect("BAR1 fd passed");
    assert_eq!(fo.start(), 0);
    assert_eq!(
        file_id(fo.file().as_raw_fd()),
        file_id(s.dev.bar1_fd.as_raw_fd()),
        "the fd is our BAR1 memfd"
    );
    let r7 = client.region(pci_index::CONFIG).expect("config region");
    assert_eq!(r7.size, ours::CONFIG_SIZE);
    let r6 = client.region(pci_index::ROM).expect("absent ROM listed");
    assert_eq!(r6.size, 0);

    // Write through the mapping their client got; read back by message.
    let len = ours::BAR1_SPARSE.size as usize;
    // SAFETY: maps `len` bytes of the memfd at the sparse area's offset; the mapping is
    // only accessed through volatile writes below and unmapped before returning.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fo.file().as_raw_fd(),
            (fo.start() + ours::BAR1_SPARSE.offset) as libc::off_t,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    for (i, b) in [0xde_u8, 0xad, 0xbe, 0xef].iter().enumerate() {
        // SAFETY: i < 4 <= len, inside the mapping.
        unsafe { std::ptr::write_volatile((p as *mut u8).add(0x40 + i), *b) };
    }
    // SAFETY: unmaps exactly the mapping created above.
    unsafe { libc::munmap(p, len) };
    let mut client = client;
    let mut buf = [0u8; 4];
    client
        .region_read(1, ours::BAR1_SPARSE.offset + 0x40, &mut buf)
        .unwrap();
    assert_eq!(buf, [0xde, 0xad, 0xbe, 0xef]);

    // Wire checks: the first message is VERSION, all replies matched their requests.
    let cm = s.proxy.client_messages();
    let sm = s.proxy.server_messages();
    assert_eq!(cm[0].0.cmd, cmd::VERSION);
    assert_eq!(cm.len(), sm.len());
    for ((ch, _), (sh, _)) in cm.iter().zip(&sm) {
        assert_eq!((sh.cmd, sh.flags & 0xf), (ch.cmd, F_REPLY));
        assert!(!sh.is_error(), "no error reply during enumeration: {sh:?}");
    }
    // The server's VERSION reply: major 0, minor <= 1 (their client proposed 0.1).
    let v = &sm[0].1;
    assert_eq!(u16::from_ne_bytes([v[0], v[1]]), 0);
    assert!(u16::from_ne_bytes([v[2], v[3]]) <= 1, "minor <= proposed");
    // BAR1's fd is the only one; our server attaches it to both GET_REGION_INFO replies
    // of region 1 (the argsz-too-small one and the full one), their client keeps one.
    let (c2s_fds, s2c_fds) = s.proxy.fds();
    assert_eq!(c2s_fds, 0);
    assert!(s2c_fds >= 1);
    drop(client);
    let mut s = s;
    s.finish().expect("clean end of session");
}

/// BUG pinned: `Client::resettable()` is inverted in vfio_user 0.1.7 (it sets
/// `resettable = flags & RESET != RESET`). Spec: VFIO_DEVICE_FLAGS_RESET "indicates that
/// the device supports the VFIO_USER_DEVICE_RESET message".
#[test]
fn their_client_bug_resettable_is_inverted() {
    let _g = guard("their_client_bug_resettable_is_inverted");
    let s = Setup::new("rst1", flags::PCI | flags::RESET);
    let c = s.client();
    let info = &s.proxy.server_messages()[1];
    assert_eq!(info.0.cmd, cmd::DEVICE_GET_INFO);
    assert_ne!(
        u32_at(&info.1, 4) & VFIO_DEVICE_FLAGS_RESET,
        0,
        "we say RESET"
    );
    assert!(
        !c.resettable(),
        "BUG pinned: RESET device reported not resettable"
    );
    drop(c);

    let s = Setup::new("rst0", flags::PCI);
    let c = s.client();
    assert!(
        c.resettable(),
        "BUG pinned: device without RESET reported resettable"
    );
}

/// DMA_MAP with a memfd, device DMA through the mapping (both directions), DMA_UNMAP,
/// and the device faulting once the mapping is gone.
#[test]
fn their_client_dma_map_unmap_memfd() {
    let _g = guard("their_client_dma_map_unmap_memfd");
    let mut s = Setup::new("dma", flags::PCI | flags::RESET);
    let mut c = s.client();
    let mem = map_memfd(0x3000);
    let iova = 0x10_0000u64;
    c.dma_map(0x1000, iova, 0x2000, mem.as_raw_fd()).unwrap();
    let maps = s.dev.table.mappings();
    assert_eq!(maps.len(), 1);
    assert_eq!((maps[0].range.start(), maps[0].range.len()), (iova, 0x2000));
    assert!(maps[0].prot.readable() && maps[0].prot.writable());

    // Device reads 8 bytes at iova + 0x10 = memfd offset 0x1010.
    c.region_write(0, ours::REG_DMA_READ, &(iova + 0x10).to_le_bytes())
        .unwrap();
    let mut got = [0u8; 8];
    c.region_read(0, ours::REG_DMA_READ_DATA, &mut got).unwrap();
    assert_eq!(got.to_vec(), pread(mem.as_raw_fd(), 0x1010, 8));

    // Device writes 8 bytes at iova + 0x1ff8 (last 8 bytes of the mapping).
    c.region_write(
        0,
        ours::REG_DMA_WRITE_DATA,
        &0x1122_3344_5566_7788u64.to_le_bytes(),
    )
    .unwrap();
    c.region_write(0, ours::REG_DMA_WRITE, &(iova + 0x1ff8).to_le_bytes())
        .unwrap();
    assert_eq!(
        pread(mem.as_raw_fd(), 0x2ff8, 8),
        0x1122_3344_5566_7788u64.to_le_bytes().to_vec()
    );
    assert_eq!(s.dev.faults.load(std::sync::atomic::Ordering::SeqCst), 0);

    c.dma_unmap(iova, 0x2000).unwrap();
    assert!(s.dev.table.is_empty());
    c.region_write(0, ours::REG_DMA_READ, &(iova + 0x10).to_le_bytes())
        .unwrap();
    c.region_read(0, ours::REG_DMA_READ_DATA, &mut got).unwrap();
    assert_eq!(got, [0xff; 8], "device faulted: mapping gone");
    assert_eq!(s.dev.faults.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The DMA_UNMAP reply echoes the request (spec).
    let (h, p) = s
        .proxy
        .server_messages()
        .into_iter()
        .find(|(h, _)| h.cmd == cmd::DMA_UNMAP)
        .unwrap();
    assert!(!h.is_error());
    assert_eq!((u64_at(&p, 8), u64_at(&p, 16)), (iova, 0x2000));
    drop(c);
    s.finish().expect("clean end of session");
}

/// GET_IRQ_INFO, SET_IRQS with eventfds (MSI-X vectors 1 and 2), the device raising a
/// vector from a doorbell write (the eventfd fires), mask/unmask on INTx with DATA_NONE,
/// and disabling an index (count 0).
#[test]
fn their_client_irqs_with_eventfds() {
    let _g = guard("their_client_irqs_with_eventfds");
    let mut s = Setup::new("irq", flags::PCI | flags::RESET);
    let mut c = s.client();
    let msix = c.get_irq_info(pci_index::MSIX_IRQ).unwrap();
    assert_eq!((msix.index, msix.count), (pci_index::MSIX_IRQ, 4));
    assert_ne!(msix.flags & VFIO_IRQ_INFO_EVENTFD, 0);
    let intx = c.get_irq_info(pci_index::INTX_IRQ).unwrap();
    assert_eq!(intx.count, 1);
    assert_ne!(intx.flags & VFIO_IRQ_INFO_MASKABLE, 0);

    let (e1, e2) = (eventfd(), eventfd());
    c.set_irqs(
        pci_index::MSIX_IRQ,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        1,
        2,
        &[e1.as_raw_fd(), e2.as_raw_fd()],
    )
    .unwrap();
    assert!(s.dev.irqs.has_eventfd(pci_index::MSIX_IRQ, 1));
    assert!(s.dev.irqs.has_eventfd(pci_index::MSIX_IRQ, 2));
    assert!(!s.dev.irqs.has_eventfd(pci_index::MSIX_IRQ, 0));

    c.region_write(0, ours::REG_DOORBELL, &2u32.to_le_bytes())
        .unwrap();
    assert_eq!(eventfd_count(e2.as_raw_fd()), 1, "vector 2 fired");
    assert_eq!(eventfd_count(e1.as_raw_fd()), 0);
    assert!(s.dev.irqs.trigger(pci_index::MSIX_IRQ, 1));
    assert_eq!(eventfd_count(e1.as_raw_fd()), 1, "vector 1 fired");

    // INTx: eventfd, mask (DATA_NONE), trigger stays pending, unmask delivers.
    let ei = eventfd();
    c.set_irqs(
        pci_index::INTX_IRQ,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[ei.as_raw_fd()],
    )
    .unwrap();
    c.set_irqs(
        pci_index::INTX_IRQ,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK,
        0,
        1,
        &[],
    )
    .unwrap();
    assert!(s.dev.irqs.is_masked(pci_index::INTX_IRQ, 0));
    assert!(!s.dev.irqs.trigger(pci_index::INTX_IRQ, 0));
    assert_eq!(eventfd_count(ei.as_raw_fd()), 0);
    c.set_irqs(
        pci_index::INTX_IRQ,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
        0,
        1,
        &[],
    )
    .unwrap();
    assert_eq!(
        eventfd_count(ei.as_raw_fd()),
        1,
        "pending INTx delivered at unmask"
    );

    // Disable every MSI-X vector: count 0, DATA_NONE | TRIGGER.
    c.set_irqs(
        pci_index::MSIX_IRQ,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        0,
        &[],
    )
    .unwrap();
    assert!(!s.dev.irqs.has_eventfd(pci_index::MSIX_IRQ, 1));
    assert!(!s.proxy.server_messages().iter().any(|(h, _)| h.is_error()));
    drop(c);
    s.finish().expect("clean end of session");
}

/// REGION_READ / REGION_WRITE on BAR0, BAR1 (through the memfd) and config space, then
/// DEVICE_RESET (BAR0 cleared, config kept).
#[test]
fn their_client_region_io_and_reset() {
    let _g = guard("their_client_region_io_and_reset");
    let mut s = Setup::new("rw", flags::PCI | flags::RESET);
    let mut c = s.client();
    let mut cfg = [0u8; 8];
    c.region_read(pci_index::CONFIG, 0x10, &mut cfg).unwrap();
    assert_eq!(cfg, [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]);
    c.region_write(pci_index::CONFIG, 0x40, &[9, 8, 7]).unwrap();
    let mut b = [0u8; 3];
    c.region_read(pci_index::CONFIG, 0x40, &mut b).unwrap();
    assert_eq!(b, [9, 8, 7]);

    let big: Vec<u8> = (0..0x800u32).map(|i| (i % 251) as u8).collect();
    c.region_write(1, 0x100, &big).unwrap();
    assert_eq!(pread(s.dev.bar1_fd.as_raw_fd(), 0x100, big.len()), big);
    let mut back = vec![0u8; big.len()];
    c.region_read(1, 0x100, &mut back).unwrap();
    assert_eq!(back, big);

    c.region_write(0, 0x80, &[1, 2, 3, 4]).unwrap();
    c.reset().unwrap();
    assert_eq!(s.dev.resets.load(std::sync::atomic::Ordering::SeqCst), 1);
    let mut r = [0xaa_u8; 4];
    c.region_read(0, 0x80, &mut r).unwrap();
    assert_eq!(r, [0; 4], "reset cleared BAR0");
    c.region_read(pci_index::CONFIG, 0x40, &mut b).unwrap();
    assert_eq!(b, [9, 8, 7]);
    assert!(!s.proxy.server_messages().iter().any(|(h, _)| h.is_error()));
    drop(c);
    s.finish().expect("clean end of session");
}

/// BUG pinned: vfio_user 0.1.7's client ignores the Error flag on replies that have no
/// payload (DMA_MAP, SET_IRQS, DEVICE_RESET): it reads the 16-byte header and returns
/// `Ok(())`. Spec: "Error in a reply message indicates the command being acknowledged
/// had an error"; DMA_MAP over an existing mapping "must be failed ... with EEXIST".
/// Our server does send the errors (checked on the wire); their client reports success.
#[test]
fn their_client_bug_ignores_error_replies() {
    let _g = guard("their_client_bug_ignores_error_replies");
    let s = Setup::new("err", flags::PCI); // no RESET
    let mut c = s.client();
    let mem = map_memfd(0x1000);
    c.dma_map(0, 0x4000, 0x1000, mem.as_raw_fd()).unwrap();
    let overlap = c.dma_map(0, 0x4800, 0x1000, mem.as_raw_fd());
    let (h, _) = s.last_reply();
    assert_eq!(h.cmd, cmd::DMA_MAP);
    assert!(h.is_error());
    assert_eq!(
        h.error,
        libc::EEXIST as u32,
        "our server: EEXIST, as the spec requires"
    );
    assert!(overlap.is_ok(), "BUG pinned: their client reports success");
    assert_eq!(s.dev.table.len(), 1);

    let r = c.reset();
    let (h, _) = s.last_reply();
    assert_eq!(h.cmd, cmd::DEVICE_RESET);
    assert!(h.is_error(), "device without RESET refuses");
    assert!(r.is_ok(), "BUG pinned: reset failure reported as success");

    let r = c.set_irqs(
        pci_index::MSIX_IRQ,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        3,
        2, // vectors 3..5 of 4: out of range
        &[],
    );
    let (h, _) = s.last_reply();
    assert_eq!(h.cmd, cmd::DEVICE_SET_IRQS);
    assert!(h.is_error());
    assert_eq!(h.error, libc::EINVAL as u32);
    assert!(
        r.is_ok(),
        "BUG pinned: SET_IRQS failure reported as success"
    );
}

/// BUG pinned: for commands whose reply has a payload (DMA_UNMAP, DEVICE_GET_IRQ_INFO,
/// REGION_READ, REGION_WRITE) vfio_user 0.1.7's client reads the fixed reply size even
/// when the reply is an error reply, which the spec says is header-only ("If an error
/// occurs, the reply message must only include the reply header"). The client then
/// waits for bytes that never come: a deadlock (or, if another reply follows, a
/// desync). The proxy shows the complete 16-byte error reply was delivered; the call
/// only returns because the proxy then closes the connection (EOF).
#[test]
fn their_client_bug_hangs_on_error_reply_with_payload() {
    let _g = guard("their_client_bug_hangs_on_error_reply_with_payload");
    type Op = fn(&mut vfio_user::Client) -> Result<(), vfio_user::Error>;
    let ops: [(&str, u16, i32, Op); 5] = [
        ("dma_unmap of nothing", cmd::DMA_UNMAP, libc::ENOENT, |c| {
            c.dma_unmap(0x9000_0000, 0x1000)
        }),
        (
            "irq info of index 99",
            cmd::DEVICE_GET_IRQ_INFO,
            libc::EINVAL,
            |c| c.get_irq_info(99).map(|_| ()),
        ),
        ("read past BAR0", cmd::REGION_READ, libc::EINVAL, |c| {
            c.region_read(0, ours::BAR0_SIZE, &mut [0u8; 4])
        }),
        ("write past BAR0", cmd::REGION_WRITE, libc::EINVAL, |c| {
            c.region_write(0, ours::BAR0_SIZE, &[0u8; 4])
        }),
        // Spec: "The count field must not exceed the value of max_data_xfer_size of the
        // peer". Their client parses the server's max_data_xfer_size but never splits a
        // transfer by it: an 8 KiB read from a server that said 4 KiB is refused.
        (
            "read above max_data_xfer_size",
            cmd::REGION_READ,
            libc::EINVAL,
            |c| c.region_read(1, 0, &mut [0u8; 0x2000]),
        ),
    ];
    for (what, command, errno, op) in ops {
        let config = ServerConfig {
            max_data_xfer_size: 0x1000,
            ..ServerConfig::default()
        };
        let s = Setup::with("hang", TestDevice::new(flags::PCI | flags::RESET), config);
        let mut c = s.client();
        let before = s.proxy.server_messages().len();
        let t = std::thread::spawn(move || {
            let r = op(&mut c);
            (r, c)
        });
        let msgs = s.proxy.wait_server_messages(before + 1);
        let (h, p) = &msgs[before];
        assert_eq!(h.cmd, command, "{what}");
        assert!(
            h.is_error() && p.is_empty(),
            "{what}: header-only error reply sent"
        );
        assert_eq!(h.error, errno as u32, "{what}");
        // The client has the whole error reply but keeps reading: cut it loose.
        s.proxy.cut_client();
        let (r, _c) = t.join().unwrap();
        match r {
            Err(vfio_user::Error::StreamRead(e)) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof,
                "{what}: BUG pinned: read past the error reply"
            ),
            other => panic!("{what}: expected StreamRead(EOF), got {other:?}"),
        }
    }
}

/// BUG pinned: an error reply to DEVICE_GET_REGION_INFO is swallowed by vfio_user
/// 0.1.7's `Client::new`: it receives the 16-byte error header into a zeroed
/// `vfio_region_info` and records a region with index 0, size 0, no flags. The real
/// region (3 here) is missing from the client's list and `Client::new` succeeds. Spec:
/// an error reply "indicates the command being acknowledged had an error".
#[test]
fn their_client_bug_swallows_region_info_error() {
    let _g = guard("their_client_bug_swallows_region_info_error");
    let dev = TestDevice::with_failing_region(flags::PCI | flags::RESET, Some(3));
    let mut s = Setup::with("rierr", dev, ServerConfig::default());
    let c = vfio_user::Client::new(&s.proxy.path);
    let errors: Vec<Hdr> = s
        .proxy
        .server_messages()
        .into_iter()
        .map(|(h, _)| h)
        .filter(|h| h.is_error())
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "our server refused exactly one GET_REGION_INFO"
    );
    assert_eq!(errors[0].cmd, cmd::DEVICE_GET_REGION_INFO);
    assert_eq!(errors[0].error, libc::EBUSY as u32);
    let c = c.expect("BUG pinned: Client::new succeeds despite the error reply");
    assert!(c.region(3).is_none(), "BUG pinned: region 3 vanished");
    assert_eq!(c.region(0).map(|r| r.size), Some(ours::BAR0_SIZE));
    drop(c);
    s.finish().expect("clean end of session");
}

/// Spec, "Client Disconnection": the server unmaps all client memory and closes the irq
/// eventfds of a departed client, and keeps the device state. Checked on nestio's
/// server after their client (holding a DMA mapping and MSI-X eventfds) goes away.
#[test]
fn our_server_cleans_up_when_their_client_leaves() {
    let _g = guard("our_server_cleans_up_when_their_client_leaves");
    let mut s = Setup::new("leave", flags::PCI | flags::RESET);
    let mut c = s.client();
    let mem = map_memfd(0x1000);
    c.dma_map(0, 0x7000, 0x1000, mem.as_raw_fd()).unwrap();
    let e = eventfd();
    c.set_irqs(
        pci_index::MSIX_IRQ,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[e.as_raw_fd()],
    )
    .unwrap();
    c.region_write(pci_index::CONFIG, 0x80, &[0x77]).unwrap();
    assert_eq!(s.dev.table.len(), 1);
    assert!(s.dev.irqs.has_eventfd(pci_index::MSIX_IRQ, 0));
    drop(c);
    s.finish().expect("clean end of session");
    assert!(s.dev.table.is_empty(), "DMA mappings removed");
    assert!(
        !s.dev.irqs.has_eventfd(pci_index::MSIX_IRQ, 0),
        "eventfds dropped"
    );
    let mut b = [0u8; 1];
    s.dev.region_read(pci_index::CONFIG, 0x80, &mut b).unwrap();
    assert_eq!(b, [0x77], "device state kept");
}

/// Limitation pinned: the spec lets a client map memory without an fd (the server then
/// uses DMA_READ/DMA_WRITE), but vfio_user 0.1.7's `Client::dma_map` always sends the
/// fd it is given (`send_with_fd`): with -1 ("no fd") the send itself fails (EBADF) and
/// nothing reaches the server. The connection stays usable.
#[test]
fn their_client_cannot_map_without_fd() {
    let _g = guard("their_client_cannot_map_without_fd");
    let mut s = Setup::new("nofd", flags::PCI | flags::RESET);
    let mut c = s.client();
    let before = s.proxy.client_messages().len();
    let r = c.dma_map(0, 0x5000, 0x1000, -1);
    assert!(
        matches!(&r, Err(vfio_user::Error::SendWithFd(e)) if e.errno() == libc::EBADF),
        "{r:?}"
    );
    assert_eq!(s.proxy.client_messages().len(), before, "nothing was sent");
    assert!(s.dev.table.is_empty());
    let mut b = [0u8; 2];
    c.region_read(pci_index::CONFIG, 0, &mut b).unwrap();
    assert_eq!(b, [0, 1]);
    drop(c);
    s.finish().expect("clean end of session");
}

/// BUG pinned: vfio_user 0.1.7's client ignores the server's `max_msg_fds` (spec:
/// "Maximum number of file descriptors that can be received by the sender in one
/// message"): it sends 4 eventfds in one SET_IRQS to a server that said 2. Our server
/// refuses the message (EINVAL, on the wire); their client reports success (error flag
/// ignored), and no vector has an eventfd.
#[test]
fn their_client_bug_ignores_max_msg_fds() {
    let _g = guard("their_client_bug_ignores_max_msg_fds");
    let config = ServerConfig {
        max_msg_fds: 2,
        ..ServerConfig::default()
    };
    let mut s = Setup::with("fds", TestDevice::new(flags::PCI | flags::RESET), config);
    let mut c = s.client();
    let v = &s.proxy.server_messages()[0].1;
    let json: serde_json::Value = serde_json::from_slice(&v[4..v.len() - 1]).unwrap();
    assert_eq!(json["capabilities"]["max_msg_fds"], 2, "our server says 2");
    let efds: Vec<OwnedFd> = (0..4).map(|_| eventfd()).collect();
    let raw: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
    let r = c.set_irqs(
        pci_index::MSIX_IRQ,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        4,
        &raw,
    );
    assert_eq!(s.proxy.fds().0, 4, "4 fds sent in one message");
    let (h, _) = s.last_reply();
    assert_eq!(h.cmd, cmd::DEVICE_SET_IRQS);
    assert!(h.is_error());
    assert_eq!(h.error, libc::EINVAL as u32);
    assert!(
        r.is_ok(),
        "BUG pinned: refused SET_IRQS reported as success"
    );
    assert!(!s.dev.irqs.has_eventfd(pci_index::MSIX_IRQ, 0));
    drop(c);
    s.finish().expect("clean end of session");
}
