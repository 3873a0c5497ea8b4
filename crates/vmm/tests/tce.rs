//! End to end through the sPAPR TCE IOMMU: the guest's own e1000 driver creates a
//! dynamic DMA window by RTAS, maps its rings and buffers with `H_PUT_TCE_INDIRECT` and
//! pings the gateway with the device seeing only bus addresses — at 4 GiB, at 1 << 59,
//! over vfio-user; a 40-bit device refusing 1 << 59; a window removed under live DMA.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::child::DeviceProcess;
use nestio_iommu::tce::{Ddw64Placement, PeConfig};
use nestio_vmm::iommu::tce::TceIommu;
use nestio_vmm::{payloads, DeviceConfig, StopReason, Vm, VmConfig};

/// Helper, not a test: serves a device when this binary runs as a device process.
#[test]
#[ignore = "device-process entry point, run only by DeviceProcess"]
fn child_device_server() {
    common::child::child_main();
}

fn run(pe: PeConfig, dev: DeviceConfig, cmdline: &str) -> (StopReason, String, Arc<TceIommu>) {
    let iommu = TceIommu::new(pe).unwrap();
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::E1000PING);
    cfg.console = console;
    cfg.cmdline = cmdline.into();
    cfg.devices.push(dev);
    nestio_vmm::hypercall::tce::register(&mut cfg.hypercalls, &iommu).unwrap();
    cfg.dma_domain = Some(iommu.domain_factory());
    let report = Vm::new(cfg).unwrap().run().unwrap();
    (report.outcome, common::text(&buf), iommu)
}

fn pings(out: &str, iommu: &TceIommu, start: u64) {
    assert!(out.contains("ping: echo reply from 10.0.2.2"), "{out}");
    assert!(
        out.contains(&format!("window liobn 0x80000001 at {start:#x}")),
        "{out}"
    );
    // Rings and buffers: four H_PUT_TCE_INDIRECT, each one device mapping (the two
    // rings may share a page, so 3 or 4 runs), all at the window.
    let maps = iommu.mappings();
    assert!((3..=4).contains(&maps.len()), "{maps:x?}");
    assert!(
        maps.iter().all(|m| m.0 >= start && m.0 - start == m.1),
        "{maps:x?}"
    );
    assert!(iommu.stats().maps.load(Ordering::Relaxed) <= 4);
}

#[test]
fn e1000_pings_through_a_dynamic_window_at_4g() {
    if !common::kvm_or_skip("e1000_pings_through_a_dynamic_window_at_4g") {
        return;
    }
    let pe = PeConfig {
        ddw64: Ddw64Placement::At(1 << 32),
        ..PeConfig::default()
    };
    let (outcome, out, iommu) = run(pe, common::local_e1000(), "irq=intx tce=4g");
    assert_eq!(outcome, StopReason::GuestExit(0), "{out}");
    pings(&out, &iommu, 1 << 32);
}

#[test]
fn e1000_pings_through_a_dynamic_window_at_1_shl_59_over_vfio_user() {
    if !common::kvm_or_skip("e1000_pings_through_a_dynamic_window_at_1_shl_59_over_vfio_user") {
        return;
    }
    let p = DeviceProcess::start("e1000");
    let dev = DeviceConfig::VfioUser {
        socket: p.socket.clone(),
    };
    let (outcome, out, iommu) = run(PeConfig::default(), dev, "irq=msi tce=59");
    assert_eq!(outcome, StopReason::GuestExit(0), "{out}");
    pings(&out, &iommu, 1 << 59);
}

#[test]
fn a_40_bit_device_refuses_1_shl_59_and_works_at_4g() {
    if !common::kvm_or_skip("a_40_bit_device_refuses_1_shl_59_and_works_at_4g") {
        return;
    }
    // Forced to 1 << 59: the window is refused (RTAS hardware error), nothing mapped.
    let pe = PeConfig {
        dma_mask_bits: 40,
        ddw64: Ddw64Placement::At(1 << 59),
        ..PeConfig::default()
    };
    let (outcome, out, iommu) = run(pe, common::local_e1000(), "irq=intx tce=59");
    assert_eq!(outcome, StopReason::GuestExit(21), "{out}");
    assert!(
        out.contains("create-pe-dma-window refused: status -1"),
        "{out}"
    );
    assert!(iommu.mappings().is_empty());
    // Automatic placement: the same device gets its window at 4 GiB and pings.
    let pe = PeConfig {
        dma_mask_bits: 40,
        ..PeConfig::default()
    };
    let (outcome, out, iommu) = run(pe, common::local_e1000(), "irq=intx tce=4g");
    assert_eq!(outcome, StopReason::GuestExit(0), "{out}");
    pings(&out, &iommu, 1 << 32);
}

#[test]
fn removing_the_window_under_live_dma_faults_the_device() {
    if !common::kvm_or_skip("removing_the_window_under_live_dma_faults_the_device") {
        return;
    }
    let (outcome, out, iommu) = run(
        PeConfig::default(),
        common::local_e1000(),
        "irq=intx tce=59 tce_remove=1",
    );
    assert_eq!(outcome, StopReason::GuestExit(8), "{out}");
    assert!(
        out.contains("device faulted after the window was removed"),
        "{out}"
    );
    assert!(iommu.mappings().is_empty(), "every run unmapped");
}
