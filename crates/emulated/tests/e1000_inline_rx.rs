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
    // The backend holds its notifications while the register path receives, so the
    // worker does not return from its wait for these frames.
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

/// Thread ids of this process's threads named `name`.
fn threads_named(name: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .is_ok_and(|c| c.trim_end() == name)
        })
        .collect()
}

/// Voluntary context switches of thread `tid` (each time it slept and was woken).
fn voluntary_switches(tid: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn answers_taken_inline_do_not_wake_the_sleeping_worker() {
    // The worker sleeps in ppoll() on the backend's fd; if the backend signalled the fd
    // for an answer the register path takes inline, the kernel would wake the worker
    // (two context switches) to find nothing, once per round trip, without ppoll()
    // ever returning. Its voluntary switches show it.
    let before: Vec<String> = threads_named("e1000-rx");
    let (e, mut drv) = device(true);
    let ours: Vec<String> = threads_named("e1000-rx")
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    assert!(!ours.is_empty(), "the device's RX worker was not found");
    let gw = drv
        .arp(GUEST_IP, GATEWAY_IP, Duration::from_secs(5))
        .unwrap();
    // Let the worker settle into its wait.
    std::thread::sleep(Duration::from_millis(20));
    let switches = || ours.iter().map(|t| voluntary_switches(t)).sum::<u64>();
    let (s0, (_, inline0)) = (switches(), e.rx_counters());
    for seq in 0..200u16 {
        drv.ping(
            GUEST_IP,
            gw,
            GATEWAY_IP,
            9,
            seq,
            &[1; 16],
            Duration::from_secs(5),
        )
        .unwrap();
    }
    let (s1, (_, inline1)) = (switches(), e.rx_counters());
    assert_eq!(inline1 - inline0, 200, "every reply taken inline");
    // (Another test's worker created at the same moment may add a few.)
    assert!(
        s1 - s0 < 40,
        "the RX worker was woken {} times in 200 inline round trips",
        s1 - s0
    );
}
