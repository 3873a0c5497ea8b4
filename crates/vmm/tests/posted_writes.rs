//! Posted MMIO writes to a remote device (`nestio_vmm::remote::PostedWrites`): writes
//! to plain memory BARs return without waiting for the server, a read after them sees
//! them (one socket, executed in order), config space stays synchronous, a write the
//! device refuses does not break the connection, and a dead server is noticed by the
//! next posted write. Served by nestio's real server; no KVM needed. Each behaviour is
//! checked with posted writes through nestio's shared-memory ring (the default between
//! nestio's client and server) and over the socket (what other servers get).

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use nestio_device_model::{pci_index, DeviceError, VfioDevice};
use nestio_emulated::gated_sample::{read32, GatedSample};
use nestio_emulated::sample::{regs, RAM_BAR};
use nestio_vfio_user::{Client, ClientConfig, Server, ServerConfig};
use nestio_vmm::remote::PostedWrites;

/// BAR0 writes here fail (the device behind the server is a [`GatedSample`]: while its
/// gate is closed, the server thread stops inside its first BAR0 write, and the client
/// cannot get a reply from it).
const REFUSED: u64 = 0xf00;

struct Setup {
    dev: Arc<PostedWrites>,
    /// The server's end, to kill the connection from the server side.
    server_end: UnixStream,
    open_gate: mpsc::Sender<()>,
    entered: mpsc::Receiver<()>,
}

/// The two ways a posted write travels: nestio's ring, and no_reply messages.
const MODES: [bool; 2] = [true, false];

fn setup(ring: bool) -> Setup {
    let (device, gate) = GatedSample::new(Some(REFUSED)).unwrap();
    let server = Server::new(device, ServerConfig::default());
    let (a, b) = UnixStream::pair().unwrap();
    let server_end = b.try_clone().unwrap();
    std::thread::spawn(move || server.serve_stream(b));
    let client = Client::from_stream(
        a,
        ClientConfig {
            posted_ring: ring,
            ..ClientConfig::default()
        },
    )
    .unwrap();
    assert_eq!(client.posted_ring().is_some(), ring);
    Setup {
        dev: Arc::new(PostedWrites::new(client).unwrap()),
        server_end,
        open_gate: gate.open,
        entered: gate.entered,
    }
}

#[test]
fn only_plain_memory_bars_are_posted() {
    let s = setup(true);
    assert!(s.dev.is_posted(pci_index::BAR0), "BAR0: registers");
    assert!(!s.dev.is_posted(RAM_BAR), "the RAM BAR is mmappable");
    assert!(
        !s.dev.is_posted(pci_index::CONFIG),
        "config space is synchronous"
    );
    assert!(!s.dev.is_posted(pci_index::ROM));
    assert!(!s.dev.is_posted(1), "an absent BAR");
    let _ = s.open_gate.send(());
}

/// Posted writes return while the server is stuck inside the device; a read issued
/// after them waits for them and sees the last one.
#[test]
fn posted_writes_do_not_wait_and_a_later_read_sees_them() {
    for ring in MODES {
        posted_writes_do_not_wait_and_a_later_read_sees_them_with(ring);
    }
}

fn posted_writes_do_not_wait_and_a_later_read_sees_them_with(ring: bool) {
    let s = setup(ring);
    // The first write stops the server inside the device (the gate is closed).
    s.dev
        .region_write(pci_index::BAR0, regs::SCRATCH, &0u32.to_le_bytes())
        .unwrap();
    s.entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the server executes the write");
    // 100 more writes return although the server answers nothing meanwhile. (Not many
    // more: the socket's send buffer holds a few hundred small messages, then a posted
    // write waits for the server to read — the back-pressure a stuck server exerts.)
    for i in 1..=100u32 {
        s.dev
            .region_write(pci_index::BAR0, regs::SCRATCH, &i.to_le_bytes())
            .unwrap();
    }
    // A read now cannot pass them: it waits until the gate opens.
    let (tx, rx) = mpsc::channel();
    let d = s.dev.clone();
    let reader = std::thread::spawn(move || {
        let v = read32(&*d, pci_index::BAR0, regs::SCRATCH);
        tx.send(v).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "a read overtook posted writes"
    );
    s.open_gate.send(()).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 100);
    reader.join().unwrap();
    // Interleaved: each read sees the write just before it.
    for i in 0..200u32 {
        let v = i.wrapping_mul(0x9e37_79b9);
        s.dev
            .region_write(pci_index::BAR0, regs::SCRATCH, &v.to_le_bytes())
            .unwrap();
        assert_eq!(read32(&*s.dev, pci_index::BAR0, regs::SCRATCH), v);
    }
}

/// A config-space write waits for its reply: it does not return while the server is
/// stuck in an earlier posted write.
#[test]
fn config_writes_stay_synchronous() {
    for ring in MODES {
        config_writes_stay_synchronous_with(ring);
    }
}

fn config_writes_stay_synchronous_with(ring: bool) {
    let s = setup(ring);
    s.dev
        .region_write(pci_index::BAR0, regs::SCRATCH, &1u32.to_le_bytes())
        .unwrap();
    s.entered.recv_timeout(Duration::from_secs(10)).unwrap();
    let (tx, rx) = mpsc::channel();
    let d = s.dev.clone();
    let writer = std::thread::spawn(move || {
        // Command register: memory decode + bus master.
        let r = d.region_write(pci_index::CONFIG, 0x4, &0x6u16.to_le_bytes());
        tx.send(r.is_ok()).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "a config write returned before the device executed it"
    );
    s.open_gate.send(()).unwrap();
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    writer.join().unwrap();
    let mut cmd = [0u8; 2];
    s.dev.region_read(pci_index::CONFIG, 0x4, &mut cmd).unwrap();
    assert_eq!(u16::from_le_bytes(cmd) & 0x6, 0x6);
}

/// With the gate open: a posted write the device refuses returns at once, and a
/// posted write after it (77 to `SCRATCH`) is read back.
fn post_refused_then_77(s: &Setup) {
    s.open_gate.send(()).unwrap();
    s.dev
        .region_write(pci_index::BAR0, REFUSED, &1u32.to_le_bytes())
        .expect("a posted write does not wait for the refusal");
    s.dev
        .region_write(pci_index::BAR0, regs::SCRATCH, &77u32.to_le_bytes())
        .unwrap();
    assert_eq!(read32(&*s.dev, pci_index::BAR0, regs::SCRATCH), 77);
}

/// A posted write the device refuses is dropped (the server logs it); the connection
/// stays in step and later accesses work. A server that goes away is noticed by the
/// next posted write: the device is reported disconnected (fatal for the VM).
#[test]
fn refused_posted_write_is_dropped_and_a_dead_server_is_noticed() {
    let s = setup(false);
    post_refused_then_77(&s);
    // The server side goes away.
    s.server_end.shutdown(std::net::Shutdown::Both).unwrap();
    let mut last = Ok(());
    for i in 0..64u32 {
        last = s
            .dev
            .region_write(pci_index::BAR0, regs::SCRATCH, &i.to_le_bytes());
        if last.is_err() {
            break;
        }
    }
    match last {
        Err(DeviceError::Disconnected(_)) => {}
        other => panic!("a posted write to a dead server gave {other:?}"),
    }
}

/// The same through nestio's ring: the refused write is counted in the ring, and the
/// end of the session (the server closes the ring when its socket goes) is noticed by
/// a later posted write; with the server gone, at the latest when the ring is full.
#[test]
fn through_the_ring_a_refused_write_is_counted_and_a_dead_server_is_noticed() {
    let s = setup(true);
    post_refused_then_77(&s);
    assert_eq!(s.dev.client().posted_ring().unwrap().errors(), 1);
    s.server_end.shutdown(std::net::Shutdown::Both).unwrap();
    let t0 = std::time::Instant::now();
    let last = loop {
        let r = s
            .dev
            .region_write(pci_index::BAR0, regs::SCRATCH, &1u32.to_le_bytes());
        if r.is_err() || t0.elapsed() > Duration::from_secs(10) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    match last {
        Err(DeviceError::Disconnected(_)) => {}
        other => panic!("a posted write to a dead server gave {other:?}"),
    }
}

/// `posted-writes=off` and the default reach the VMM's device list as options.
#[test]
fn the_option_is_per_device() {
    use nestio_vmm::DeviceConfig;
    match "vfio-user=/tmp/a.sock,posted-writes=off"
        .parse::<DeviceConfig>()
        .unwrap()
    {
        DeviceConfig::VfioUserWith { socket, options } => {
            assert_eq!(socket, std::path::PathBuf::from("/tmp/a.sock"));
            assert!(!options.posted_writes);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        "vfio-user=/tmp/a.sock,posted-writes=on".parse::<DeviceConfig>(),
        Ok(DeviceConfig::VfioUser { .. })
    ));
    let e = "vfio-user=/tmp/a.sock,posted=off"
        .parse::<DeviceConfig>()
        .unwrap_err();
    assert!(e.to_string().contains("posted-writes=on|off"), "{e}");
}
