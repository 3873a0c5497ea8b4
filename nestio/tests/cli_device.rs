//! The `nestio device` command as a user runs it: a separate process serving a device on
//! a socket path, driven by nestio's vfio-user client from this (test) process.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestio_device_model::{pci_index, IrqAction, IrqData, VfioDevice};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use nestio_emulated::sample::{cmd, dma_status, regs, DEVICE_ID, ID_VALUE, VENDOR_ID};
use nestio_vfio_user::Client;

struct Served {
    child: Child,
    path: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(args: &[&str], tag: &str) -> Served {
    let path = std::env::temp_dir().join(format!("nestio-cli-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let child = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .arg("device")
        .args(args)
        .arg("--socket")
        .arg(&path)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn nestio device");
    let mut s = Served { child, path };
    wait_for_socket(&mut s.child, &s.path);
    s
}

/// Wait until `child` listens on `p` (the socket file appears at bind(), before
/// listen(), when a connect would still be refused).
fn wait_for_socket(child: &mut Child, p: &Path) {
    let t0 = Instant::now();
    while !common::listening(child.id(), p) {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "nestio device exited before listening on {}: {st}",
                p.display()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "nothing ever listened on {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn memfd(size: u64) -> Arc<OwnedFd> {
    Arc::new(nestio_dma::memfd::sealed_memfd(c"cli-test", size).unwrap())
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a new fd or -1, checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn wait_event(fd: &OwnedFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd on the stack.
    unsafe { libc::poll(&mut p, 1, timeout_ms) == 1 }
}

fn r32(c: &Client, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(pci_index::BAR0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn w32(c: &Client, off: u64, v: u32) {
    c.region_write(pci_index::BAR0, off, &v.to_le_bytes())
        .unwrap();
}

#[test]
fn sample_device_process_driven_by_client() {
    let served = serve(&["sample"], "sample");
    let c = Client::connect(&served.path).expect("connect to nestio device sample");
    // Identity through config space.
    let mut id = [0u8; 4];
    c.region_read(pci_index::CONFIG, 0, &mut id).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), VENDOR_ID);
    assert_eq!(u16::from_le_bytes([id[2], id[3]]), DEVICE_ID);
    assert_eq!(r32(&c, regs::ID), ID_VALUE);
    // Bus master + memory on.
    c.region_write(pci_index::CONFIG, 4, &6u16.to_le_bytes())
        .unwrap();
    // Guest memory shared by fd.
    let mem = memfd(0x10000);
    c.dma_map(DmaMapRequest {
        range: DmaRange::new(0x10_0000, 0x10000).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: mem.clone(),
            offset: 0,
        },
    })
    .unwrap();
    let ev = eventfd();
    c.set_irqs(
        pci_index::INTX_IRQ,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfd(vec![Some(ev.try_clone().unwrap())]),
    )
    .unwrap();
    // Fill 256 bytes at 0x100100 with a pattern by device DMA.
    w32(&c, regs::DMA_DST_LO, 0x10_0100);
    w32(&c, regs::DMA_DST_HI, 0);
    w32(&c, regs::DMA_LEN, 256);
    w32(&c, regs::DMA_PATTERN, 0xa5a5_a5a5);
    w32(&c, regs::DMA_CMD, cmd::FILL);
    assert!(
        wait_event(&ev, 60_000),
        "completion interrupt from the device process"
    );
    assert_eq!(
        r32(&c, regs::DMA_STATUS) & dma_status::DONE,
        dma_status::DONE
    );
    let mut got = vec![0u8; 0x300];
    let f = std::fs::File::from(mem.try_clone().unwrap());
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 0).unwrap();
    assert!(
        got[..0x100].iter().all(|&b| b == 0),
        "before the buffer untouched"
    );
    assert!(
        got[0x100..0x200].iter().all(|&b| b == 0xa5),
        "filled by device DMA"
    );
    assert!(
        got[0x200..].iter().all(|&b| b == 0),
        "after the buffer untouched"
    );
    // A DMA outside the mapping is a reported fault, not a crash of the server.
    w32(&c, regs::DMA_DST_LO, 0x20_0000);
    w32(&c, regs::DMA_CMD, cmd::FILL);
    let st = r32(&c, regs::DMA_STATUS);
    assert_eq!(st & dma_status::ERROR, dma_status::ERROR, "status {st:#x}");
    assert_eq!(r32(&c, regs::ERROR_ADDR_LO), 0x20_0000);
    drop(c);
    // The server outlives its client: a second client is served, device state kept.
    let c2 = Client::connect(&served.path).expect("second client");
    assert_eq!(
        r32(&c2, regs::ERROR_ADDR_LO),
        0x20_0000,
        "device state kept"
    );
}

#[test]
fn e1000_device_process_serves_and_rejects_bad_arguments() {
    let served = serve(
        &["e1000", "--net", "user", "--mac", "52:54:00:aa:bb:cc"],
        "e1000",
    );
    let c = Client::connect(&served.path).expect("connect to nestio device e1000");
    let mut id = [0u8; 4];
    c.region_read(pci_index::CONFIG, 0, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0x100e_8086);
    // RAL0/RAH0 hold the configured MAC.
    let mut ral = [0u8; 4];
    c.region_read(pci_index::BAR0, 0x5400, &mut ral).unwrap();
    assert_eq!(ral, [0x52, 0x54, 0x00, 0xaa]);
    // As on the chip: power management at 0xDC and no MSI capability by default.
    let cfg8 = |c: &Client, off: u64| {
        let mut b = [0u8; 1];
        c.region_read(pci_index::CONFIG, off, &mut b).unwrap();
        b[0]
    };
    assert_eq!(
        (cfg8(&c, 0x34), cfg8(&c, 0xDC), cfg8(&c, 0xDD)),
        (0xDC, 1, 0)
    );
    drop(c);
    drop(served);
    // --msi on: MSI follows power management in the capability list.
    let served = serve(&["e1000", "--net", "none", "--msi", "on"], "e1000-msi");
    let c = Client::connect(&served.path).expect("connect to nestio device e1000");
    let next = cfg8(&c, 0xDD);
    assert_ne!(next, 0, "a capability after power management");
    assert_eq!(cfg8(&c, u64::from(next)), 5, "it is MSI");
    drop(c);
    drop(served);

    let out = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args([
            "device",
            "e1000",
            "--socket",
            "/tmp/never.sock",
            "--net",
            "bogus",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus"), "error names the bad spec: {err}");
}
