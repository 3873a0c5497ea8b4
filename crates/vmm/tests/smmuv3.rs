//! End to end through the emulated SMMUv3 in shadow mode (`--viommu smmuv3`): the
//! e1000ping payload programs the stream table, a CD and stage-1 tables that put its
//! rings and buffers at IOVA = GPA + 512 GiB (outside RAM), and pings the gateway
//! through an e1000 — in this process and over vfio-user — that only ever sees
//! IOVAs; then it unmaps a buffer under the live RX ring and checks the NIC's DMA
//! there is refused without a byte written.

mod common;

use common::child::DeviceProcess;
use nestio_vmm::iommu::smmuv3::Viommu;
use nestio_vmm::platform::PLATFORM_MMIO_WINDOW;
use nestio_vmm::{payloads, DeviceConfig, StopReason, Vm, VmConfig};

/// Helper, not a test: serves a device when this binary runs as a device process.
#[test]
#[ignore = "device-process entry point, run only by DeviceProcess"]
fn child_device_server() {
    common::child::child_main();
}

fn run(dev: DeviceConfig, extra: &str) -> (StopReason, String) {
    run_irq(dev, "intx", extra)
}

fn run_irq(dev: DeviceConfig, irq: &str, extra: &str) -> (StopReason, String) {
    run_mode(Viommu::Smmuv3, dev, irq, extra)
}

fn run_mode(mode: Viommu, dev: DeviceConfig, irq: &str, extra: &str) -> (StopReason, String) {
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::E1000PING);
    cfg.console = console;
    cfg.cmdline = format!("irq={irq} smmu={:#x} {extra}", PLATFORM_MMIO_WINDOW.0);
    cfg.viommu = Some(mode);
    cfg.devices.push(dev);
    let report = Vm::new(cfg).unwrap().run().unwrap();
    (report.outcome, common::text(&buf))
}

fn remote_e1000(p: &DeviceProcess) -> DeviceConfig {
    DeviceConfig::VfioUser {
        socket: p.socket.clone(),
    }
}

/// [`run_mode`] on an e1000 served by a fresh device process (stopped after the run).
fn run_remote(mode: Viommu, irq: &str, extra: &str) -> (StopReason, String) {
    let p = DeviceProcess::start("e1000");
    run_mode(mode, remote_e1000(&p), irq, extra)
}

/// The guest exited 0 after the gateway answered its ping.
fn assert_pinged(outcome: StopReason, out: &str) {
    assert_eq!(outcome, StopReason::GuestExit(0), "console: {out}");
    assert!(out.contains("ping: echo reply from 10.0.2.2"), "{out}");
}

/// [`assert_pinged`], with the MSI address an IOVA the SMMU translated.
fn assert_pinged_by_doorbell_iova(outcome: StopReason, out: &str) {
    assert_eq!(outcome, StopReason::GuestExit(0), "console: {out}");
    assert!(
        out.contains("msi: address 0x803fe00000 is an IOVA"),
        "{out}"
    );
    assert!(out.contains("ping: echo reply from 10.0.2.2"), "{out}");
}

/// The payload's DMA check (exit 8) found the NIC's write refused: the buffer was
/// untouched and the console says `what` was done to the page.
fn assert_dma_refused(outcome: StopReason, out: &str, what: &str) {
    assert_eq!(outcome, StopReason::GuestExit(8), "console: {out}");
    assert!(out.contains(what), "{out}");
    assert!(out.contains("buffer untouched"), "{out}");
}

#[test]
fn guest_pings_through_smmuv3_shadow_in_process() {
    if !common::kvm_or_skip("guest_pings_through_smmuv3_shadow_in_process") {
        return;
    }
    let (outcome, out) = run(common::local_e1000(), "");
    assert!(out.contains("smmu: translating sid 0x8"), "{out}");
    assert_pinged(outcome, &out);
}

#[test]
fn guest_pings_through_smmuv3_shadow_over_vfio_user() {
    if !common::kvm_or_skip("guest_pings_through_smmuv3_shadow_over_vfio_user") {
        return;
    }
    let (outcome, out) = run_remote(Viommu::Smmuv3, "intx", "");
    assert_pinged(outcome, &out);
}

#[test]
fn msi_through_a_doorbell_iova_in_process() {
    // The MSI address is an IOVA (not 0xFEE00000) the guest maps to the doorbell:
    // the VMM translates it through the SMMU and routes the real MSI.
    if !common::kvm_or_skip("msi_through_a_doorbell_iova_in_process") {
        return;
    }
    let (outcome, out) = run_irq(common::local_e1000(), "msi", "");
    assert_pinged_by_doorbell_iova(outcome, &out);
}

#[test]
fn msi_through_a_doorbell_iova_over_vfio_user() {
    if !common::kvm_or_skip("msi_through_a_doorbell_iova_over_vfio_user") {
        return;
    }
    let (outcome, out) = run_remote(Viommu::Smmuv3, "msi", "");
    assert_pinged_by_doorbell_iova(outcome, &out);
}

#[test]
fn an_unmapped_doorbell_iova_is_one_event_and_no_interrupt() {
    if !common::kvm_or_skip("an_unmapped_doorbell_iova_is_one_event_and_no_interrupt") {
        return;
    }
    let (outcome, out) = run_irq(common::local_e1000(), "msi", "msi=unmap");
    assert_eq!(outcome, StopReason::GuestExit(9), "console: {out}");
    assert!(
        out.contains("event 0x10 sid 0x8 iova 0x803fe00000 write; 0 more"),
        "{out}"
    );
    assert!(out.contains("0 interrupts delivered"), "{out}");
    println!("{out}");
}

#[test]
fn nested_mode_pings_through_tables_the_vmm_never_saw_invalidated() {
    // The guest maps its rings without any invalidation (as Linux does). In nested
    // mode the e1000 server walks the guest's live stage 1 itself and pings; the
    // shadowing VMM (the control) never learns of the mappings and the ping fails.
    if !common::kvm_or_skip("nested_mode_pings_through_tables_the_vmm_never_saw_invalidated") {
        return;
    }
    let (outcome, out) = run_remote(Viommu::Smmuv3Nested, "intx", "smmu_map=noinval");
    assert_pinged(outcome, &out);
    let (outcome, out) = run_remote(Viommu::Smmuv3, "intx", "smmu_map=noinval");
    assert_ne!(
        outcome,
        StopReason::GuestExit(0),
        "shadow mode cannot see it: {out}"
    );
    assert!(!out.contains("ping: echo reply"), "{out}");
}

#[test]
fn nested_mode_with_msi_through_a_doorbell_iova() {
    if !common::kvm_or_skip("nested_mode_with_msi_through_a_doorbell_iova") {
        return;
    }
    let (outcome, out) = run_remote(Viommu::Smmuv3Nested, "msi", "");
    assert_pinged_by_doorbell_iova(outcome, &out);
}

#[test]
fn nested_mode_device_faults_are_the_guests_events() {
    // A page unmapped under the live RX ring: the device's own stage-1 walk faults,
    // the fault record comes back over vfio-user and the VMM puts it in the guest's
    // event queue with the guest's SID and the IOVA (a write: RnW clear).
    if !common::kvm_or_skip("nested_mode_device_faults_are_the_guests_events") {
        return;
    }
    let (outcome, out) = run_remote(Viommu::Smmuv3Nested, "intx", "dma=unmap");
    assert_dma_refused(outcome, &out, "unmapped under the live ring");
    let iova = out
        .lines()
        .find_map(|l| l.strip_prefix("dma unmap: iova "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the unmapped IOVA")
        .to_string();
    assert!(
        out.contains(&format!("dma unmap: event 0x10 sid 0x8 iova {iova} read 0")),
        "F_TRANSLATION for SID 8 at {iova}: {out}"
    );
    println!("{out}");
}

#[test]
fn nested_mode_a_read_only_page_is_a_permission_event() {
    // The same with the page left mapped read-only: the device's walk finds a
    // permission fault (F_PERMISSION, 0x13) and reports it.
    if !common::kvm_or_skip("nested_mode_a_read_only_page_is_a_permission_event") {
        return;
    }
    let (outcome, out) = run_remote(Viommu::Smmuv3Nested, "intx", "dma=readonly");
    assert_dma_refused(outcome, &out, "made read-only under the live ring");
    assert!(
        out.contains("dma unmap: event 0x13 sid 0x8 iova 0x80"),
        "{out}"
    );
}

#[test]
fn dma_to_a_page_unmapped_under_the_live_ring_is_refused() {
    if !common::kvm_or_skip("dma_to_a_page_unmapped_under_the_live_ring_is_refused") {
        return;
    }
    let (outcome, out) = run(common::local_e1000(), "dma=unmap");
    assert_dma_refused(outcome, &out, "unmapped under the live ring");
    println!("{out}");
}

#[test]
fn dma_to_a_page_made_read_only_under_the_live_ring_is_refused() {
    if !common::kvm_or_skip("dma_to_a_page_made_read_only_under_the_live_ring_is_refused") {
        return;
    }
    let (outcome, out) = run(common::local_e1000(), "dma=readonly");
    assert_dma_refused(outcome, &out, "made read-only under the live ring");
}

#[test]
fn without_the_smmu_programmed_iovas_outside_ram_fail() {
    // Control: the same payload on a machine without the vIOMMU cannot program an
    // SMMU there (unassigned MMIO reads all-ones: CR0ACK never matches) and stops
    // before giving the NIC an IOVA.
    if !common::kvm_or_skip("without_the_smmu_programmed_iovas_outside_ram_fail") {
        return;
    }
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::E1000PING);
    cfg.console = console;
    cfg.cmdline = format!("irq=intx smmu={:#x}", PLATFORM_MMIO_WINDOW.0);
    cfg.devices.push(common::local_e1000());
    let report = Vm::new(cfg).unwrap().run().unwrap();
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(21), "console: {out}");
    assert!(out.contains("smmu: CR0ACK"), "{out}");
}
