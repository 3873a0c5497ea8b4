//! INTx unmask by eventfd over vfio-user (SET_IRQS ACTION_UNMASK | DATA_EVENTFD): a
//! client registers the eventfd, the device asserts INTx (automasked), the client
//! signals the eventfd — as KVM signals a resampling irqfd's resample fd at EOI — and
//! the device unmasks and re-asserts with no UNMASK message.

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;
use nestio_device_model::{DeviceError, IrqAction, IrqData, VfioDevice};
use nestio_vfio_user::{ClientConfig, ServerConfig};

fn signal(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a local u64.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    assert_eq!(n, 8);
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Wait up to 5 s for `fd` to count; returns (and consumes) the count.
fn wait_count(fd: &OwnedFd) -> u64 {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid fd described by a local.
    unsafe { libc::poll(&mut p, 1, 5000) };
    eventfd_count(fd)
}

fn errno(e: DeviceError) -> i32 {
    e.errno()
}

#[test]
fn unmask_eventfd_unmasks_and_reasserts() {
    let h = Harness::new(ServerConfig::default());
    let (c, t) = h.client(ClientConfig::default());
    let (trigger, unmask) = (eventfd(), eventfd());
    // Before the trigger eventfd: refused, as vfio-pci refuses it.
    assert_eq!(
        errno(c.set_intx_unmask_eventfd(Some(unmask.as_fd())).unwrap_err()),
        libc::EINVAL
    );
    c.set_irqs(
        0,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfd(vec![Some(trigger.try_clone().unwrap())]),
    )
    .unwrap();
    c.set_intx_unmask_eventfd(Some(unmask.as_fd())).unwrap();
    assert!(h.dev.irqs().has_unmask_eventfd(0, 0));
    for round in 0..20 {
        // Asserted once, automasked: a second assertion is pending.
        assert!(h.dev.trigger(0, 0), "round {round}");
        assert!(!h.dev.trigger(0, 0), "round {round}: automasked");
        assert_eq!(eventfd_count(&trigger), 1);
        // The EOI: the device unmasks and the pending assertion fires again.
        signal(&unmask);
        assert_eq!(wait_count(&trigger), 1, "round {round}: re-asserted");
        assert!(h.dev.irqs().is_masked(0, 0), "automasked again");
        // Unmask once more so the next round starts unmasked.
        signal(&unmask);
        wait_for("unmask", || !h.dev.irqs().is_masked(0, 0));
    }
    // Index 1 (MSI-like, not maskable): EINVAL; mask by eventfd: ENOTSUP.
    let e = c
        .set_irqs(
            1,
            IrqAction::Unmask,
            0,
            1,
            IrqData::Eventfd(vec![Some(eventfd())]),
        )
        .unwrap_err();
    assert_eq!(errno(e), libc::EINVAL);
    let e = c
        .set_irqs(
            0,
            IrqAction::Mask,
            0,
            1,
            IrqData::Eventfd(vec![Some(eventfd())]),
        )
        .unwrap_err();
    assert_eq!(errno(e), libc::ENOTSUP);
    // fd -1 removes it.
    c.set_intx_unmask_eventfd(None).unwrap();
    assert!(!h.dev.irqs().has_unmask_eventfd(0, 0));
    // The owner leaving drops it (release_device).
    c.set_intx_unmask_eventfd(Some(unmask.as_fd())).unwrap();
    assert!(h.dev.irqs().has_unmask_eventfd(0, 0));
    drop(c);
    t.join().unwrap().unwrap();
    assert!(!h.dev.irqs().has_unmask_eventfd(0, 0));
    assert!(!h.dev.irqs().has_eventfd(0, 0));
}
