//! INTx unmask eventfds leave no fds or threads behind: replaced, removed with fd -1,
//! removed with the trigger eventfd, and dropped with the device (alone in its binary:
//! /proc/self/fd is per process).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nestio_device_model::pci::PciIntr;
use nestio_device_model::pci_index::INTX_IRQ;
use nestio_device_model::{IrqAction, IrqData};

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers; the result is checked before being owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn set(intr: &PciIntr, action: IrqAction, fd: Option<OwnedFd>) {
    intr.set_irqs(INTX_IRQ, action, 0, 1, IrqData::Eventfd(vec![fd]))
        .unwrap();
}

#[test]
fn unmask_eventfds_leave_no_fds_or_threads() {
    let mut baseline = None;
    for round in 0..8 {
        {
            let intr = PciIntr::new(true, 1, 0);
            set(&intr, IrqAction::Trigger, Some(eventfd()));
            for _ in 0..10 {
                set(&intr, IrqAction::Unmask, Some(eventfd()));
            }
            // Raised (automasked), then unmasked by a signal the watch thread consumed.
            assert!(intr.irqs().trigger(INTX_IRQ, 0));
            assert!(intr.irqs().is_masked(INTX_IRQ, 0));
            let e = eventfd();
            let peer = e.try_clone().unwrap();
            set(&intr, IrqAction::Unmask, Some(e));
            let one = 1u64;
            // SAFETY: writes 8 bytes from a local u64.
            let n = unsafe { libc::write(peer.as_raw_fd(), (&one as *const u64).cast(), 8) };
            assert_eq!(n, 8);
            let t = std::time::Instant::now();
            while intr.irqs().is_masked(INTX_IRQ, 0) {
                assert!(
                    t.elapsed().as_secs() < 5,
                    "the unmask eventfd did not unmask"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            set(&intr, IrqAction::Unmask, None);
            set(&intr, IrqAction::Unmask, Some(eventfd()));
            set(&intr, IrqAction::Trigger, None);
            assert!(!intr.irqs().has_unmask_eventfd(INTX_IRQ, 0));
            set(&intr, IrqAction::Trigger, Some(eventfd()));
            set(&intr, IrqAction::Unmask, Some(eventfd()));
            // Dropped with the device.
        }
        let now = (open_fds(), threads());
        match baseline {
            None => baseline = Some(now),
            Some(b) => assert_eq!(now, b, "fds/threads grew in round {round}"),
        }
    }
}
