//! Receive on the register path (issue 12, item 5): with the `user` network, the echo
//! reply to a transmitted ping is in the RX ring when the TDT write returns, and the RX
//! worker thread was not involved; with `inline_rx` off the same reply takes the worker
//! (a wake-up per frame), and both deliver the same frames in order.

use std::sync::Arc;
use std::time::Duration;

use nestio_device_model::VfioDevice;
use nestio_emulated::e1000::{E1000Config, E1000};
use nestio_emulated::e1000_bench::{guest_memory, DmaVia, Driver, IrqMode, GATEWAY_IP, GUEST_IP};
use nestio_net::packet::icmp::build_icmp_echo_request;
use nestio_net::packet::MacAddr;

fn device(inline_rx: bool) -> (Arc<E1000>, Driver) {
    let backend = nestio_net::open_backend("user", None).unwrap();
    let e = E1000::new(E1000Config {
        inline_rx,
        ..E1000Config::new(backend).with_msi(true)
    })
    .unwrap();
    let dev: Arc<dyn VfioDevice> = e.clone();
    let mut drv =
        Driver::new_via(dev, guest_memory().unwrap(), IrqMode::Msi, DmaVia::SharedFd).unwrap();
    drv.reset().unwrap();
    drv.probe().unwrap();
    drv.setup().unwrap();
    (e, drv)
}

#[test]
fn echo_reply_is_received_within_the_tdt_write() {
    let (e, mut drv) = device(true);
    let gw = drv
        .arp(GUEST_IP, GATEWAY_IP, Duration::from_secs(5))
        .unwrap();
    let (wakeups_before, inline_before) = e.rx_counters();
    for seq in 0..50u16 {
        let req = build_icmp_echo_request(
            MacAddr(drv.mac),
            gw,
            GUEST_IP,
            GATEWAY_IP,
            7,
            seq,
            &[seq as u8; 32],
        )
        .unwrap();
        drv.send(&req).unwrap();
        // No waiting: the reply was delivered by the TDT write itself.
        let reply = drv
            .poll_rx()
            .unwrap()
            .unwrap_or_else(|| panic!("seq {seq}: no reply in the ring after the TDT write"));
        assert_eq!(reply.len(), req.len().max(60), "seq {seq}");
        // ICMP sequence number (Ethernet 14 + IP 20 + ICMP offset 6).
        assert_eq!(&reply[40..42], &seq.to_be_bytes(), "replies in order");
    }
    let (wakeups, inline) = e.rx_counters();
    assert_eq!(inline - inline_before, 50, "every reply taken inline");
    // The backend still signals its fd; the worker may wake to find nothing, but not
    // once per frame.
    assert!(
        wakeups - wakeups_before < 25,
        "{} worker wake-ups for 50 round trips",
        wakeups - wakeups_before
    );
}

#[test]
fn without_inline_rx_the_worker_delivers() {
    let (e, mut drv) = device(false);
    let gw = drv
        .arp(GUEST_IP, GATEWAY_IP, Duration::from_secs(5))
        .unwrap();
    for seq in 0..10u16 {
        drv.ping(
            GUEST_IP,
            gw,
            GATEWAY_IP,
            9,
            seq,
            &[1, 2, 3],
            Duration::from_secs(5),
        )
        .unwrap();
    }
    let (wakeups, inline) = e.rx_counters();
    assert_eq!(inline, 0);
    assert!(wakeups >= 11, "{wakeups} worker wake-ups for 11 replies");
}

#[test]
fn intx_driver_unmasks_by_eventfd_and_takes_every_interrupt() {
    // Inline receive off, so each reply comes with an interrupt the driver must take.
    let backend = nestio_net::open_backend("user", None).unwrap();
    let e = E1000::new(E1000Config {
        inline_rx: false,
        ..E1000Config::new(backend)
    })
    .unwrap();
    let dev: Arc<dyn VfioDevice> = e.clone();
    let mut drv = Driver::new_via(
        dev,
        guest_memory().unwrap(),
        IrqMode::Intx,
        DmaVia::SharedFd,
    )
    .unwrap();
    drv.reset().unwrap();
    drv.probe().unwrap();
    drv.setup().unwrap();
    assert!(
        drv.use_unmask_eventfd().unwrap(),
        "the e1000 takes an unmask eventfd"
    );
    let gw = drv
        .arp(GUEST_IP, GATEWAY_IP, Duration::from_secs(5))
        .unwrap();
    let before = drv.interrupts;
    for seq in 0..20u16 {
        drv.ping(
            GUEST_IP,
            gw,
            GATEWAY_IP,
            3,
            seq,
            &[7; 8],
            Duration::from_secs(5),
        )
        .unwrap();
    }
    // Every reply needed an interrupt, so INTx was unmasked (by eventfd) every time.
    assert!(
        drv.interrupts - before >= 20,
        "{} interrupts",
        drv.interrupts - before
    );
}
