//! End to end: the guest's own e1000 driver pings the user-network gateway through an
//! e1000 assigned to the VM, in this process and in another process over vfio-user.

mod common;

use common::child::DeviceProcess;
use nestio_vmm::{payloads, DeviceConfig, StopReason, Vm, VmConfig};

/// Helper, not a test: serves a device when this binary runs as a device process
/// (started by `DeviceProcess` with `--ignored --exact child_device_server`).
#[test]
#[ignore = "device-process entry point, run only by DeviceProcess"]
fn child_device_server() {
    common::child::child_main();
}

fn ping(dev: DeviceConfig, irq: &str) -> String {
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::E1000PING);
    cfg.console = console;
    cfg.cmdline = format!("irq={irq}");
    cfg.devices.push(dev);
    let report = Vm::new(cfg).unwrap().run().unwrap();
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console: {out}");
    assert!(out.contains("ping: echo reply from 10.0.2.2"), "{out}");
    // The driver looks at its RX ring only after an RX interrupt: both replies (ARP and
    // echo) must have come with one.
    let rx_irqs: u64 = out
        .split(" with RXT0")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no RX interrupt count in: {out}"));
    assert!(
        rx_irqs >= 2,
        "RX interrupts taken: {rx_irqs}; console: {out}"
    );
    out
}

#[test]
fn guest_pings_through_in_process_e1000_with_intx() {
    if !common::kvm_or_skip("guest_pings_through_in_process_e1000_with_intx") {
        return;
    }
    let out = ping(common::local_e1000(), "intx");
    assert!(out.contains("INTx on IOAPIC pin"), "{out}");
    assert!(out.contains("mac 52:54:00:12:34:56"), "{out}");
}

#[test]
fn guest_pings_through_vfio_user_e1000_with_msi() {
    if !common::kvm_or_skip("guest_pings_through_vfio_user_e1000_with_msi") {
        return;
    }
    let p = DeviceProcess::start("e1000");
    let out = ping(
        DeviceConfig::VfioUser {
            socket: p.socket.clone(),
        },
        "msi",
    );
    assert!(out.contains("MSI vector"), "{out}");
}

#[test]
fn guest_pings_through_vfio_user_e1000_with_intx() {
    if !common::kvm_or_skip("guest_pings_through_vfio_user_e1000_with_intx") {
        return;
    }
    let p = DeviceProcess::start("e1000");
    ping(
        DeviceConfig::VfioUser {
            socket: p.socket.clone(),
        },
        "intx",
    );
}
