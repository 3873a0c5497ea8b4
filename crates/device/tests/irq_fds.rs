//! Hostile interrupt fds (issue 10, finding 1): a peer hands SET_IRQS a pipe, a socket,
//! /dev/null or a blocking eventfd whose counter is full. None of them may hang the
//! device: the first three are refused with EINVAL, the full eventfd is accepted and a
//! raise on it is a dropped, counted interrupt. Each attack runs on its own thread with
//! a deadline: before the fix the raise blocked in write(2) forever (holding the irq
//! lock), which these tests report as a hang instead of hanging themselves.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use nestio_device::pci::PciIntr;
use nestio_device::pci_index::{INTX_IRQ, MSIX_IRQ, MSI_IRQ};
use nestio_device::{IrqAction, IrqData};

const DEADLINE: Duration = Duration::from_secs(20);

fn owned(raw: i32) -> OwnedFd {
    assert!(raw >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn eventfd(flags: i32) -> OwnedFd {
    // SAFETY: eventfd takes no pointers.
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | flags) })
}

fn read_counter(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        v
    } else {
        0
    }
}

/// Wire `fd` to MSI vector 0 of a fresh function and raise the vector `raises` times,
/// on a thread with a deadline. Returns the SET_IRQS errno (0 = accepted), how many
/// raises were delivered, and the interrupts counted as dropped.
fn attack(fd: OwnedFd, raises: u32) -> (i32, u32, u64) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let intr = PciIntr::new(true, 1, 0);
        let r = intr.set_irqs(
            MSI_IRQ,
            IrqAction::Trigger,
            0,
            1,
            IrqData::Eventfd(vec![Some(fd)]),
        );
        let errno = r.err().map_or(0, |e| e.errno());
        let mut delivered = 0;
        if errno == 0 {
            for _ in 0..raises {
                delivered += u32::from(intr.irqs().trigger(MSI_IRQ, 0));
            }
        }
        // The rest of the device still answers.
        assert!(intr.irq_info(INTX_IRQ).is_ok());
        let _ = tx.send((errno, delivered, intr.irqs().dropped(MSI_IRQ, 0)));
    });
    rx.recv_timeout(DEADLINE)
        .expect("raising an interrupt on a peer's fd hung the device")
}

#[test]
fn pipe_is_refused() {
    let mut p = [0; 2];
    // SAFETY: pipe writes two fds into the local array.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    let (_r, w) = (owned(p[0]), owned(p[1]));
    // 20000 raises of 8 bytes overflow the 64 KiB pipe buffer nobody drains.
    let (errno, _, _) = attack(w, 20_000);
    assert_eq!(
        errno,
        libc::EINVAL,
        "a pipe was accepted as an interrupt eventfd"
    );
}

#[test]
fn socket_is_refused() {
    let mut s = [0; 2];
    // SAFETY: socketpair writes two fds into the local array.
    let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, s.as_mut_ptr()) };
    assert_eq!(r, 0);
    let (a, _b) = (owned(s[0]), owned(s[1]));
    // Fill the socket buffer so the next blocking write waits forever.
    let chunk = [0u8; 4096];
    loop {
        // SAFETY: sends from a live local buffer; MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::send(
                a.as_raw_fd(),
                chunk.as_ptr().cast(),
                chunk.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            break;
        }
    }
    let (errno, _, _) = attack(a, 1);
    assert_eq!(
        errno,
        libc::EINVAL,
        "a socket was accepted as an interrupt eventfd"
    );
}

#[test]
fn dev_null_is_refused() {
    let null = OwnedFd::from(
        std::fs::File::options()
            .write(true)
            .open("/dev/null")
            .unwrap(),
    );
    let (errno, delivered, _) = attack(null, 3);
    assert_eq!(
        (errno, delivered),
        (libc::EINVAL, 0),
        "/dev/null was accepted: interrupts would silently vanish"
    );
}

#[test]
fn full_blocking_eventfd_drops_and_counts_instead_of_hanging() {
    let e = eventfd(0); // blocking
    let peer = e.try_clone().unwrap();
    // The counter's maximum: the next +1 would wait.
    let v: u64 = u64::MAX - 1;
    // SAFETY: writes 8 bytes from a local u64.
    let written = unsafe { libc::write(peer.as_raw_fd(), (&v as *const u64).cast(), 8) };
    assert_eq!(written, 8);
    let (errno, delivered, dropped) = attack(e, 3);
    assert_eq!(errno, 0, "an eventfd must be accepted");
    assert_eq!((delivered, dropped), (0, 3), "each raise is a counted drop");
    // The peer's counter is untouched; once it consumes, interrupts flow again.
    assert_eq!(read_counter(&peer), u64::MAX - 1);
}

#[test]
fn refused_request_changes_nothing_and_good_eventfds_still_work() {
    let intr = PciIntr::new(true, 0, 4);
    let good = eventfd(libc::EFD_NONBLOCK);
    intr.set_irqs(
        MSIX_IRQ,
        IrqAction::Trigger,
        1,
        1,
        IrqData::Eventfd(vec![Some(good.try_clone().unwrap())]),
    )
    .unwrap();
    // A batch with one bad fd among eventfds is refused as a whole.
    let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
    let e = intr
        .set_irqs(
            MSIX_IRQ,
            IrqAction::Trigger,
            0,
            3,
            IrqData::Eventfd(vec![Some(eventfd(0)), None, Some(null)]),
        )
        .unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("not an eventfd"), "{e}");
    assert!(!intr.irqs().has_eventfd(MSIX_IRQ, 0));
    assert!(
        intr.irqs().has_eventfd(MSIX_IRQ, 1),
        "vector 1 kept its eventfd"
    );
    assert!(intr.irqs().trigger(MSIX_IRQ, 1));
    assert_eq!(read_counter(&good), 1);
}
