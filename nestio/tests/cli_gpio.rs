//! `nestio device gpio` as a user runs it: a separate process serving the GPIO example
//! device, driven by nestio's vfio-user client from this (test) process.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nestio_device::{pci_index, IrqAction, IrqData, VfioDevice};
use nestio_devices::gpio::regs;
use nestio_vfio_user::Client;

#[test]
fn nestio_device_gpio_serves_the_example_device() {
    let path = std::env::temp_dir().join(format!("nestio-cli-gpio-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut child = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args(["device", "gpio", "--once", "--socket"])
        .arg(&path)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn nestio device gpio");
    let t0 = Instant::now();
    while !common::listening(child.id(), &path) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "nestio device gpio exited before listening"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "nothing listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = Client::connect(&path).expect("connect");
    let mut id = [0u8; 4];
    c.region_read(pci_index::CONFIG, 0, &mut id).unwrap();
    assert_eq!(id, [0x36, 0x1b, 0x58, 0x7e], "1b36:7e58");
    // SAFETY: eventfd takes no pointers; the result is checked.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh fd owned by nobody else.
    let msi = unsafe { OwnedFd::from_raw_fd(raw) };
    c.set_irqs(
        pci_index::MSI_IRQ,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfd(vec![Some(msi.try_clone().unwrap())]),
    )
    .unwrap();
    c.region_write(0, regs::IRQ_ENABLE, &1u32.to_le_bytes())
        .unwrap();
    c.region_write(0, regs::OUTPUT, &1u32.to_le_bytes())
        .unwrap();
    let mut b = [0u8; 4];
    c.region_read(0, regs::INPUT, &mut b).unwrap();
    assert_eq!(
        u32::from_le_bytes(b),
        1,
        "outputs are looped back to inputs"
    );
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64.
    let n = unsafe { libc::read(msi.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    assert_eq!((n, v), (8, 1), "the change raised the MSI");
    drop(c);
    let st = child.wait().unwrap();
    assert!(st.success(), "--once: exits cleanly after the client: {st}");
    let _ = std::fs::remove_file(&path);
}
