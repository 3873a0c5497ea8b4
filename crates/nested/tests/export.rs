//! Nested passthrough end to end (issue 6): an e1000 emulated at level 0 and served over
//! vfio-user, exported by level 1 (and level 2) with `ExportedDevice`, and driven by the
//! innermost level's guest driver (`e1000_bench::Driver`) whose RAM is a piece of level
//! 1's memfd. Every test runs under a deadlock guard.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use nestio_device_model::{
    pci_index, DeviceError, DeviceInfo, IrqAction, IrqData, IrqInfo, RegionInfo, VfioDevice,
};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, MapTableStats, Prot};
use nestio_emulated::e1000::{E1000Config, E1000};
use nestio_emulated::e1000_bench::{
    file_read, file_write, reg, DmaVia, Driver, IrqMode, GATEWAY_IP, GUEST_IP, IOVA, MAPPED,
    RX_RING,
};
use nestio_nested::stack::socket_path;
use nestio_nested::{bench_depths, NestedStack, RoundTrip, StackConfig};
use nestio_vfio_user::{Client, ClientConfig, Server, ServerConfig};

/// How long one wait (an interrupt, a reply, a fault) may take: a hang bound only,
/// generous for a loaded 2-core CI machine.
const T: Duration = Duration::from_secs(60);

/// Aborts the test process if the holder runs longer than 300 s.
struct Guard(#[allow(dead_code)] mpsc::Sender<()>);

fn guard(name: &'static str) -> Guard {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(300)) {
            eprintln!("DEADLOCK GUARD: {name} still running after 300 s; aborting");
            std::process::abort();
        }
    });
    Guard(tx)
}

/// Level 0: an e1000 on the user network, served on a socket path, one client at a time.
struct Level0 {
    e1000: Arc<E1000>,
    path: PathBuf,
}

fn level0() -> Level0 {
    let backend = nestio_net::open_backend("user", None).expect("user network backend");
    let e1000 = E1000::new(E1000Config::new(backend).with_msi(true)).expect("e1000");
    let path = socket_path("l0");
    let listener = nestio_vfio_user::bind(&path).expect("bind level 0");
    let dev: Arc<dyn VfioDevice> = e1000.clone();
    std::thread::spawn(move || {
        let server = Server::new(dev, ServerConfig::default());
        let _ = server.serve_listener(listener);
    });
    Level0 { e1000, path }
}

impl Drop for Level0 {
    fn drop(&mut self) {
        // The serving thread lives until the process ends; the socket file need not.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Level0 {
    fn stats(&self) -> MapTableStats {
        self.e1000.dma_table().expect("e1000 does DMA").stats()
    }
}

/// The eventfd-id of an eventfd (from /proc/self/fdinfo).
fn eventfd_id(fd: i32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("eventfd-id:"))
        .map(|v| v.trim().to_string())
}

/// How many open fds of this process refer to the eventfd with `id`.
fn eventfd_holders(id: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|fd| eventfd_id(*fd).as_deref() == Some(id))
        .count()
}

/// The innermost guest's view of its device: forwards everything, and notes the
/// eventfd-id of the interrupt fd it registers.
struct IrqSpy {
    dev: Arc<dyn VfioDevice>,
    id: std::sync::Mutex<Option<String>>,
    set_irqs: AtomicU64,
}

impl VfioDevice for IrqSpy {
    fn info(&self) -> DeviceInfo {
        self.dev.info()
    }
    fn region_info(&self, index: u32) -> nestio_device_model::Result<RegionInfo> {
        self.dev.region_info(index)
    }
    fn region_read(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> nestio_device_model::Result<()> {
        self.dev.region_read(index, offset, buf)
    }
    fn region_write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> nestio_device_model::Result<()> {
        self.dev.region_write(index, offset, data)
    }
    fn irq_info(&self, index: u32) -> nestio_device_model::Result<IrqInfo> {
        self.dev.irq_info(index)
    }
    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> nestio_device_model::Result<()> {
        self.set_irqs.fetch_add(1, Ordering::Relaxed);
        if let IrqData::Eventfd(fds) = &data {
            if let Some(Some(fd)) = fds.first() {
                *self.id.lock().unwrap() = eventfd_id(fd.as_raw_fd());
            }
        }
        self.dev.set_irqs(index, action, start, count, data)
    }
    fn reset(&self) -> nestio_device_model::Result<()> {
        self.dev.reset()
    }
    fn dma_map(&self, req: DmaMapRequest) -> nestio_device_model::Result<()> {
        self.dev.dma_map(req)
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> nestio_device_model::Result<()> {
        self.dev.dma_unmap(iova, size)
    }
    fn dma_unmap_all(&self) -> nestio_device_model::Result<()> {
        self.dev.dma_unmap_all()
    }
}

/// Attach the innermost guest's driver, reset, read the MAC, set up the rings.
fn bring_up(stack: &NestedStack, mode: IrqMode, via: DmaVia) -> (Driver, Arc<IrqSpy>) {
    let spy = Arc::new(IrqSpy {
        dev: stack.client(),
        id: std::sync::Mutex::new(None),
        set_irqs: AtomicU64::new(0),
    });
    let mut drv = Driver::new_via(spy.clone(), stack.ram().clone(), mode, via)
        .expect("the innermost driver attaches through every level");
    drv.reset().expect("CTRL.RST");
    drv.probe().expect("EEPROM MAC and checksum");
    drv.setup().expect("rings");
    assert_ne!(drv.rd(reg::STATUS).unwrap() & reg::STATUS_LU, 0, "link up");
    (drv, spy)
}

/// ARP the gateway, then one ICMP echo; both replies arrive by interrupt.
fn ping_gateway(drv: &mut Driver, seq: u16) {
    let gw = drv
        .arp(GUEST_IP, GATEWAY_IP, T)
        .expect("ARP reply from the gateway");
    let payload = b"nestio nested passthrough";
    drv.ping(GUEST_IP, gw, GATEWAY_IP, 0x6e, seq, payload, T)
        .expect("ICMP echo reply from the gateway");
}

fn shared_ping_at_depth(depth: u32) {
    let l0 = level0();
    let mut stack = NestedStack::build(&l0.path, depth, StackConfig::default()).unwrap();
    let (mut drv, spy) = bring_up(&stack, IrqMode::Msi, DmaVia::SharedFd);

    // The interrupt fd: after SET_IRQS exactly two fds in the whole process refer to
    // it, the driver's own and the device's copy: no intermediate level kept (or
    // relays through) one, at any depth. A level's server drops the fds it received
    // only after sending its reply, so a third holder may linger for a moment: wait
    // for the count to settle (a level that keeps one never gets there).
    let id = spy
        .id
        .lock()
        .unwrap()
        .clone()
        .expect("eventfd-id in fdinfo");
    let deadline = std::time::Instant::now() + T;
    loop {
        let holders = eventfd_holders(&id);
        if holders == 2 {
            break;
        }
        assert!(
            holders > 2 && std::time::Instant::now() < deadline,
            "the device holds the innermost level's own eventfd: {holders} holders"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let before = l0.stats();
    let exp_before: Vec<_> = (1..depth)
        .map(|l| stack.exporter(l).unwrap().stats())
        .collect();
    let irqs_before = drv.interrupts;
    ping_gateway(&mut drv, 1);
    let after = l0.stats();
    if drv.interrupts == irqs_before {
        // The replies were already in the ring when the driver looked: the MSI is
        // still pending on the innermost level's own eventfd.
        drv.wait_irq(T)
            .expect("the device signalled the innermost eventfd");
    }
    assert!(drv.interrupts > irqs_before, "replies came by interrupt");
    assert!(
        after.in_place_bytes > before.in_place_bytes,
        "the e1000 moved the frames in place"
    );
    assert_eq!(after.peer_ops, 0, "no DMA message at any level");
    assert_eq!(after.faults, 0);
    for (i, b) in exp_before.iter().enumerate() {
        let level = i as u32 + 1;
        let s = stack.exporter(level).unwrap().stats();
        assert_eq!(s.copy_ops, 0, "level {level} copied nothing");
        assert_eq!(s.peer_maps, 0);
        assert_eq!(s.fd_maps, 1, "level {level} passed the RAM fd down");
        assert_eq!(
            s.set_irqs, b.set_irqs,
            "no interrupt traffic crossed level {level} during the ping"
        );
        assert!(s.region_writes > b.region_writes, "doorbells are forwarded");
    }
    // The mapping the e1000 holds is the innermost IOVA range, backed by the memfd.
    let maps = l0.e1000.dma_table().unwrap().mappings();
    assert_eq!(maps.len(), 1);
    assert_eq!((maps[0].range.start(), maps[0].range.len()), (IOVA, MAPPED));
    assert!(matches!(maps[0].backing, DmaBacking::Fd { offset: 0, .. }));

    // Unmap propagates down to the device.
    drv.dev
        .dma_unmap(IOVA, MAPPED)
        .expect("unmap through every level");
    assert!(
        l0.e1000.dma_table().unwrap().is_empty(),
        "unmapped at level 0"
    );
    for l in 1..depth {
        assert!(stack.exporter(l).unwrap().child_mappings().is_empty());
    }
    // Reset propagates too (the e1000's VFIO reset drops its irq wiring and registers).
    assert_ne!(drv.rd(reg::RCTL).unwrap() & reg::RCTL_EN, 0, "RX on before");
    assert_ne!(drv.cfg_read16(4).unwrap() & 0x6, 0, "bus master on before");
    drv.dev.reset().expect("reset through every level");
    assert_eq!(
        drv.rd(reg::RCTL).unwrap() & reg::RCTL_EN,
        0,
        "level 0 reset RCTL"
    );
    assert_eq!(
        drv.cfg_read16(4).unwrap() & 0x6,
        0,
        "level 0 reset the command register"
    );
    for l in 1..depth {
        assert_eq!(stack.exporter(l).unwrap().stats().resets, 1);
    }
    drop(drv);
    drop(spy);
    stack.kill_level(1);
}

#[test]
fn nested_shared_ping_depth2() {
    let _g = guard("nested_shared_ping_depth2");
    shared_ping_at_depth(2);
}

#[test]
fn nested_shared_ping_depth3() {
    let _g = guard("nested_shared_ping_depth3");
    shared_ping_at_depth(3);
}

#[test]
fn nested_no_shared_memory_ping_copies() {
    let _g = guard("nested_no_shared_memory_ping_copies");
    let l0 = level0();
    for depth in [2, 3] {
        let cfg = StackConfig {
            no_shared_memory: true,
            ..StackConfig::default()
        };
        let stack = NestedStack::build(&l0.path, depth, cfg).unwrap();
        let (mut drv, _spy) = bring_up(&stack, IrqMode::Intx, DmaVia::SharedFd);
        let before = l0.stats();
        ping_gateway(&mut drv, 2);
        let after = l0.stats();
        assert!(
            after.peer_ops > before.peer_ops,
            "depth {depth}: DMA went by messages"
        );
        let s = stack.exporter(1).unwrap().stats();
        assert_eq!(s.peer_maps, 1);
        assert!(s.copy_ops > 0 && s.copy_bytes > 0, "level 1 copied: {s:?}");
        assert_eq!(s.copy_faults, 0);
        if depth == 3 {
            // Level 2 shares its memory with level 1: it passes the fd on.
            assert_eq!(stack.exporter(2).unwrap().stats().fd_maps, 1);
        }
        drop(drv);
    }
}

#[test]
fn nested_messages_driver_is_served_by_the_exporter() {
    // The innermost guest itself maps without an fd (IOVA == GPA): level 1 resolves the
    // target through its window and, sharing memory, still hands the device its fd.
    let _g = guard("nested_messages_driver_is_served_by_the_exporter");
    let l0 = level0();
    let stack = NestedStack::build(&l0.path, 2, StackConfig::default()).unwrap();
    let (mut drv, _spy) = bring_up(&stack, IrqMode::Intx, DmaVia::Messages);
    ping_gateway(&mut drv, 3);
    let st = l0.stats();
    assert_eq!(st.peer_ops, 0, "no copy: the exporter passed its RAM fd");
    assert!(st.in_place_bytes > 0);
    assert_eq!(stack.exporter(1).unwrap().stats().fd_maps, 1);
}

#[test]
fn nested_isolation_window_enforced() {
    let _g = guard("nested_isolation_window_enforced");
    let l0 = level0();
    let stack = NestedStack::build(&l0.path, 2, StackConfig::default()).unwrap();
    let (mut drv, _spy) = bring_up(&stack, IrqMode::Intx, DmaVia::SharedFd);
    let ram = stack.ram().clone();
    let r1 = stack.region(1).unwrap().size();
    let r2 = stack.region(2).unwrap().size();
    assert!(r2 < r1);
    // Level 1's own memory beyond the child's window: fill with a pattern, snapshot.
    let pattern: Vec<u8> = (0..(r1 - r2)).map(|i| (i * 7 + 3) as u8).collect();
    file_write(&ram, r2, &pattern).unwrap();
    let snap = file_read(&ram, r2, pattern.len()).unwrap();

    let dev = drv.dev.clone();
    let l2_end = stack.window(2).unwrap().size();
    let efault = |r: nestio_device_model::Result<()>| match r {
        Err(DeviceError::Remote { errno, .. }) => errno == libc::EFAULT,
        other => panic!("expected an EFAULT refusal, got {other:?}"),
    };
    // 1. Mapping level 1's memory beyond the window by file offset.
    assert!(efault(dev.dma_map(DmaMapRequest {
        range: DmaRange::new(0x4000_0000, 0x1000).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: ram.clone(),
            offset: r2,
        },
    })));
    // 2. A range straddling the window's end.
    assert!(efault(dev.dma_map(DmaMapRequest {
        range: DmaRange::new(0x4000_0000, 0x2000).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: ram.clone(),
            offset: r2 - 0x1000,
        },
    })));
    // 3. No fd: IOVA == GPA beyond the window; and one whose end wraps.
    struct Nobody;
    impl nestio_dma::DmaPeer for Nobody {
        fn dma_read(&self, _: u64, _: &mut [u8]) -> Result<(), i32> {
            Err(libc::EIO)
        }
        fn dma_write(&self, _: u64, _: &[u8]) -> Result<(), i32> {
            Err(libc::EIO)
        }
    }
    assert!(efault(dev.dma_map(DmaMapRequest {
        range: DmaRange::new(l2_end, 0x1000).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Peer(Arc::new(Nobody)),
    })));
    // 4. A foreign file is not the child's memory.
    let foreign = nestio_emulated::e1000_bench::guest_memory().unwrap();
    match dev.dma_map(DmaMapRequest {
        range: DmaRange::new(0x4000_0000, 0x1000).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: foreign,
            offset: 0,
        },
    }) {
        Err(DeviceError::Remote { errno, .. }) => assert_eq!(errno, libc::EINVAL),
        other => panic!("foreign fd accepted: {other:?}"),
    }
    let s = stack.exporter(1).unwrap().stats();
    assert_eq!(s.refused_maps, 4);
    assert_eq!(
        l0.e1000.dma_table().unwrap().len(),
        1,
        "nothing reached level 0"
    );

    // 5. Descriptors pointing outside the window: an RX buffer (device write) and a TX
    //    buffer (device read) at the first GPA past the window.
    let mut rx = [0u8; 16];
    rx[..8].copy_from_slice(&l2_end.to_le_bytes());
    drv.mem_write(RX_RING + u64::from(drv.next_rx) * 16, &rx)
        .unwrap();
    // A valid ARP request: the gateway's reply is DMA'd to the hostile RX buffer.
    let rx_faults = l0.stats().faults;
    let me = nestio_net::packet::MacAddr(drv.mac);
    drv.send(&nestio_net::packet::arp::build_arp_request(
        me, GUEST_IP, GATEWAY_IP,
    ))
    .unwrap();
    let deadline = std::time::Instant::now() + T;
    while l0.stats().faults == rx_faults {
        assert!(
            std::time::Instant::now() < deadline,
            "the RX DMA outside the window never faulted"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(drv.poll_rx().unwrap(), None, "no frame delivered");
    assert_eq!(drv.rd(reg::GPTC).unwrap(), 1, "the valid ARP went out"); // clears
    drv.tx_desc_raw(drv.next_tx, l2_end, 64, reg::TXD_EOP | reg::TXD_RS)
        .unwrap();
    let faults = l0.stats().faults;
    drv.wr(
        reg::TDT,
        (drv.next_tx + 1) % nestio_emulated::e1000_bench::NDESC,
    )
    .unwrap();
    assert_eq!(
        drv.tx_status(drv.next_tx).unwrap(),
        0,
        "no write-back when faulted"
    );
    assert!(l0.stats().faults > faults, "the device faulted");
    assert_ne!(
        drv.cfg_read16(6).unwrap() & (1 << 13),
        0,
        "master abort recorded"
    );
    assert_eq!(
        drv.rd(reg::GPTC).unwrap(),
        0,
        "the halted queue sent nothing"
    );
    assert_eq!(
        file_read(&ram, r2, pattern.len()).unwrap(),
        snap,
        "level 1's memory outside the window is untouched"
    );
}

#[test]
fn nested_dead_intermediate_level() {
    let _g = guard("nested_dead_intermediate_level");
    let l0 = level0();
    let mut stack = NestedStack::build(&l0.path, 2, StackConfig::default()).unwrap();
    let (mut drv, _spy) = bring_up(&stack, IrqMode::Intx, DmaVia::SharedFd);
    ping_gateway(&mut drv, 4);
    stack.kill_level(1);
    match drv.dev.region_read(pci_index::CONFIG, 0, &mut [0u8; 2]) {
        Err(DeviceError::Disconnected(_)) => {}
        other => panic!("expected Disconnected after level 1 died, got {other:?}"),
    }
    assert!(matches!(
        drv.dev.dma_unmap(IOVA, MAPPED),
        Err(DeviceError::Disconnected(_))
    ));
    // Level 0 survived, dropped the dead session's mappings and serves a new client.
    let deadline = std::time::Instant::now() + T;
    while !l0.e1000.dma_table().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "level 0 session not torn down"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let stream = UnixStream::connect(&l0.path).unwrap();
    let c = Arc::new(Client::from_stream(stream, ClientConfig::default()).unwrap());
    let mut d1 = Driver::new(
        c,
        nestio_emulated::e1000_bench::guest_memory().unwrap(),
        IrqMode::Intx,
    )
    .expect("level 0 serves a new client");
    d1.reset().unwrap();
    d1.probe().unwrap();
    d1.setup().unwrap();
    ping_gateway(&mut d1, 5);
}

#[test]
fn nested_dead_level_at_depth3_gives_clear_error() {
    let _g = guard("nested_dead_level_at_depth3_gives_clear_error");
    let l0 = level0();
    let mut stack = NestedStack::build(&l0.path, 3, StackConfig::default()).unwrap();
    let (mut drv, _spy) = bring_up(&stack, IrqMode::Intx, DmaVia::SharedFd);
    ping_gateway(&mut drv, 6);
    stack.kill_level(1);
    // Level 2 is alive but its device is gone: level 3 gets ENOTCONN from it.
    match drv.dev.region_read(pci_index::CONFIG, 0, &mut [0u8; 2]) {
        Err(DeviceError::Remote { errno, .. }) => assert_eq!(errno, libc::ENOTCONN),
        other => panic!("expected ENOTCONN from level 2, got {other:?}"),
    }
    // Level 2 going away as well: now the socket itself is dead.
    stack.kill_level(2);
    assert!(matches!(
        drv.dev.region_read(pci_index::CONFIG, 0, &mut [0u8; 2]),
        Err(DeviceError::Disconnected(_))
    ));
}

#[test]
fn nested_bench_depths_runs() {
    let _g = guard("nested_bench_depths_runs");
    let l0 = level0();
    let mut seq = 0u16;
    let mut workload = |stack: &NestedStack| -> Result<RoundTrip, String> {
        let (mut drv, _) = bring_up(stack, IrqMode::Msi, DmaVia::SharedFd);
        let gw = drv
            .arp(GUEST_IP, GATEWAY_IP, T)
            .map_err(|e| e.to_string())?;
        seq = seq.wrapping_add(100);
        let mut s = seq;
        Ok(Box::new(move || {
            s = s.wrapping_add(1);
            drv.ping(GUEST_IP, gw, GATEWAY_IP, 0x42, s, b"bench", T)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }))
    };
    let rows = bench_depths(
        &l0.path,
        &[1, 2, 3],
        100,
        StackConfig::default(),
        &mut workload,
    )
    .expect("benchmark runs");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows.iter().map(|r| r.depth).collect::<Vec<_>>(), [1, 2, 3]);
    assert!((rows[0].round_trip_ratio - 1.0).abs() < 1e-9);
    for r in &rows {
        assert!(r.round_trip_ns > 0.0 && r.region_access_ns > 0.0);
        // A ping rings TDT and hands back an RX descriptor (RDT): trapped accesses.
        assert!(r.accesses_per_round_trip.unwrap() >= 2.0, "{r:?}");
        assert!(r.dma_irq_ns.is_some());
    }
    assert_eq!(l0.stats().peer_ops, 0, "the benchmark never copied");
}

#[test]
fn nested_stack_rejects_bad_layouts() {
    let _g = guard("nested_stack_rejects_bad_layouts");
    let l0 = level0();
    assert!(NestedStack::build(&l0.path, 0, StackConfig::default()).is_err());
    let tiny = StackConfig {
        ram_size: 1 << 20,
        ..StackConfig::default()
    };
    assert!(NestedStack::build(&l0.path, 3, tiny).is_err());
}
