//! The GPIO example device over vfio-user: a `Client` drives its registers through a
//! `Server`, exactly as a VMM in another process would.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use nestio_device::pci::{status, PciDevice};
use nestio_device::{flags, pci_index, IrqAction, IrqData, VfioDevice};
use nestio_devices::gpio::{regs, Gpio, BAR0_SIZE};
use nestio_vfio_user::{Client, ClientConfig, Server, ServerConfig};

fn serve(dev: Arc<Gpio>) -> Client {
    let (a, b) = UnixStream::pair().unwrap();
    let server = Server::new(dev, ServerConfig::default());
    std::thread::spawn(move || {
        let _ = server.serve_stream(b);
    });
    let c = Client::from_stream(a, ClientConfig::default()).unwrap();
    c.set_reply_timeout(Some(Duration::from_secs(20)));
    c
}

fn owned(raw: i32) -> OwnedFd {
    assert!(raw >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn eventfd(flags: i32) -> OwnedFd {
    // SAFETY: eventfd takes no pointers.
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | flags) })
}

fn counter(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from a non-blocking eventfd.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        v
    } else {
        0
    }
}

fn wire(c: &Client, index: u32, fd: &OwnedFd) {
    c.set_irqs(
        index,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfd(vec![Some(fd.try_clone().unwrap())]),
    )
    .unwrap();
}

fn rd(c: &Client, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(pci_index::BAR0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn wr(c: &Client, off: u64, v: u32) {
    c.region_write(pci_index::BAR0, off, &v.to_le_bytes())
        .unwrap();
}

fn cfg16(c: &Client, off: u64) -> u16 {
    let mut b = [0u8; 2];
    c.region_read(pci_index::CONFIG, off, &mut b).unwrap();
    u16::from_le_bytes(b)
}

#[test]
fn identity_regions_and_irqs() {
    let c = serve(Arc::new(Gpio::new(true).unwrap()));
    let info = c.info();
    assert_eq!(
        info.flags & (flags::PCI | flags::RESET),
        flags::PCI | flags::RESET
    );
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));
    assert_eq!((cfg16(&c, 0), cfg16(&c, 2)), (0x1b36, 0x7e58));
    assert_eq!(c.region_info(pci_index::BAR0).unwrap().size, BAR0_SIZE);
    assert_eq!(c.region_info(pci_index::CONFIG).unwrap().size, 256);
    assert_eq!(c.region_info(2).unwrap().size, 0, "BAR2 absent");
    assert_eq!(c.irq_info(pci_index::INTX_IRQ).unwrap().count, 1);
    assert_eq!(c.irq_info(pci_index::MSI_IRQ).unwrap().count, 1);
    assert_eq!(c.irq_info(pci_index::MSIX_IRQ).unwrap().count, 0);
}

#[test]
fn loopback_change_raises_msi_once_per_change() {
    let c = serve(Arc::new(Gpio::new(true).unwrap()));
    let msi = eventfd(libc::EFD_NONBLOCK);
    wire(&c, pci_index::MSI_IRQ, &msi);
    wr(&c, regs::IRQ_ENABLE, 0b101);
    wr(&c, regs::OUTPUT, 0xffff_0001); // bits above the 16 pins are dropped
    assert_eq!(rd(&c, regs::OUTPUT), 1);
    assert_eq!(rd(&c, regs::INPUT), 1);
    assert_eq!(rd(&c, regs::CHANGED), 1);
    assert_eq!(counter(&msi), 1);
    wr(&c, regs::OUTPUT, 1);
    assert_eq!(counter(&msi), 0, "no change, no interrupt");
    wr(&c, regs::OUTPUT, 0b11); // pin 1 changes but is not enabled
    assert_eq!(rd(&c, regs::CHANGED), 0b11);
    assert_eq!(counter(&msi), 0, "pin 0 was already pending");
    wr(&c, regs::CHANGED, 0b11);
    wr(&c, regs::OUTPUT, 0b111);
    assert_eq!(counter(&msi), 1, "pin 2 is enabled");
    c.reset().unwrap();
    assert_eq!(
        (rd(&c, regs::OUTPUT), rd(&c, regs::CHANGED)),
        (0, 0),
        "reset clears the pins"
    );
}

#[test]
fn intx_level_follows_pending_changes() {
    let dev = Arc::new(Gpio::new(false).unwrap());
    let c = serve(dev.clone());
    let intx = eventfd(libc::EFD_NONBLOCK);
    wire(&c, pci_index::INTX_IRQ, &intx);
    wr(&c, regs::IRQ_ENABLE, 0xffff);
    wr(&c, regs::OUTPUT, 0xff);
    assert_eq!(
        rd(&c, regs::INPUT),
        0,
        "no loopback: outputs do not drive inputs"
    );
    dev.drive_inputs(0x8000);
    assert_eq!(counter(&intx), 1);
    assert_ne!(cfg16(&c, 6) & status::INTERRUPT, 0, "INTx asserted");
    wr(&c, regs::CHANGED, 0x8000);
    assert_eq!(cfg16(&c, 6) & status::INTERRUPT, 0, "INTx dropped");
}

#[test]
fn bad_register_accesses_are_einval() {
    let c = serve(Arc::new(Gpio::new(true).unwrap()));
    let errno = |r: nestio_device::Result<()>| r.unwrap_err().errno();
    assert_eq!(errno(c.region_read(0, 2, &mut [0; 2])), libc::EINVAL);
    assert_eq!(errno(c.region_read(0, 1, &mut [0; 4])), libc::EINVAL);
    assert_eq!(errno(c.region_write(0, BAR0_SIZE, &[0; 4])), libc::EINVAL);
    assert_eq!(
        errno(c.region_write(0, u64::MAX - 1, &[0; 4])),
        libc::EINVAL
    );
    assert_eq!(
        errno(c.region_write(pci_index::CONFIG, 3, &[0; 2])),
        libc::EINVAL
    );
    assert_eq!(errno(c.region_read(9, 0, &mut [0; 4])), libc::EINVAL);
    assert_eq!(rd(&c, regs::OUTPUT), 0, "the device still answers");
}

/// Issue 10 finding 1 over the wire: a client's pipe is refused with EINVAL, and its
/// full blocking eventfd makes a raise a dropped interrupt, not a hung server.
#[test]
fn hostile_interrupt_fds_over_vfio_user() {
    let dev = Arc::new(Gpio::new(true).unwrap());
    let c = serve(dev.clone());
    let mut p = [0; 2];
    // SAFETY: pipe writes two fds into the local array.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    let (_r, w) = (owned(p[0]), owned(p[1]));
    let e = c
        .set_irqs(
            pci_index::MSI_IRQ,
            IrqAction::Trigger,
            0,
            1,
            IrqData::Eventfd(vec![Some(w)]),
        )
        .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");

    let full = eventfd(0);
    let v = u64::MAX - 1;
    // SAFETY: writes 8 bytes from a local u64.
    let written = unsafe { libc::write(full.as_raw_fd(), (&v as *const u64).cast(), 8) };
    assert_eq!(written, 8);
    wire(&c, pci_index::MSI_IRQ, &full);
    let (tx, rx) = mpsc::channel();
    let d = dev.clone();
    std::thread::spawn(move || {
        wr(&c, regs::IRQ_ENABLE, 1);
        wr(&c, regs::OUTPUT, 1); // raises the MSI on the full eventfd
        let dropped = d.pci().irqs().dropped(pci_index::MSI_IRQ, 0);
        let _ = tx.send((rd(&c, regs::CHANGED), dropped));
    });
    let (changed, dropped) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a full eventfd hung the device server");
    assert_eq!((changed, dropped), (1, 1));
}
