//! Assigned-device wiring under real KVM with an in-process test device: BARs, config
//! virtualisation, unassigned / beyond-BAR accesses, mmapped areas, ioeventfds, MSI via
//! irqfd, DMA_MAP of guest RAM, and a device that dies mid-run.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::testdev::TestDev;
use nestio_vmm::{payloads, DeviceConfig, StopReason, Vm, VmConfig, VmError};

fn config(dev: &Arc<TestDev>) -> (VmConfig, Arc<parking_lot::Mutex<Vec<u8>>>) {
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::PCITEST);
    cfg.console = console;
    cfg.devices.push(DeviceConfig::Local {
        name: "testdev".into(),
        device: dev.clone(),
    });
    (cfg, buf)
}

#[test]
fn guest_drives_assigned_device_and_takes_msi() {
    if !common::kvm_or_skip("guest_drives_assigned_device_and_takes_msi") {
        return;
    }
    let dev = TestDev::new();
    let (cfg, buf) = config(&dev);
    let mut vm = Vm::new(cfg).expect("build VM");
    assert_eq!(
        dev.dma_mappings(),
        1,
        "guest RAM is DMA-mapped to the device"
    );
    let assigned = vm.pci().devices()[0].clone();
    assert_eq!(
        assigned.mapped_areas(2),
        1,
        "BAR2 page 0 is an mmapped area"
    );
    assert_eq!(
        assigned.bar_mapping(0),
        None,
        "decode is off until the guest enables it"
    );
    let report = vm.run().expect("run VM");
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console: {out}");
    assert!(out.contains("msi interrupts taken: 3"), "{out}");
    assert_eq!(dev.scratch(), 0xcafe_f00d);
    assert_eq!(
        dev.mem_u32(0),
        0x1234_5678,
        "the guest wrote the device's memory in place"
    );
    assert_eq!(
        dev.ioevent_count(),
        3,
        "writes to the ioeventfd register signalled it"
    );
    assert!(report.stats.unclaimed.load(Ordering::Relaxed) >= 2);
    let (b0, size) = assigned.bar_mapping(0).expect("BAR0 decoded");
    assert_eq!(size, 0x1000);
    assert_eq!(b0, 0xc010_0000, "the guest moved BAR0 and the VMM followed");
    // Tearing the VM down hands everything back: DMA mappings, eventfds, references.
    drop(assigned);
    drop(vm);
    assert_eq!(dev.dma_mappings(), 0, "guest RAM unmapped from the device");
    // Threads of the VM may let go of their references a moment later: wait (a hang
    // bound only, generous for a loaded CI machine).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while Arc::strong_count(&dev) > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(Arc::strong_count(&dev), 1, "the VM still holds the device");
}

#[test]
fn dead_device_stops_the_vm_with_its_name() {
    if !common::kvm_or_skip("dead_device_stops_the_vm_with_its_name") {
        return;
    }
    let dev = TestDev::new();
    let (cfg, _buf) = config(&dev);
    let mut vm = Vm::new(cfg).expect("build VM");
    dev.dead.store(true, Ordering::SeqCst);
    let err = vm.run().expect_err("a dead device must stop the VM");
    let msg = err.to_string();
    assert!(matches!(err, VmError::Vcpu(_)), "{msg}");
    assert!(msg.contains("testdev"), "{msg}");
    assert!(
        msg.contains("connection lost") || msg.contains("killed"),
        "{msg}"
    );
}
