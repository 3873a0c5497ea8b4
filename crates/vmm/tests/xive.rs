//! The XIVE as a VM's interrupt controller under real KVM: the `xivetest` payload on
//! 2 vCPUs configures its event queues by hypercall, plays IPI ping-pong between the
//! vCPUs through ESB trigger pages, and takes the e1000's INTx routed through XIVE to
//! each vCPU in turn, acknowledging through its TIMA and EOIing through the ESB.

mod common;

use nestio_vmm::irqchip::IrqChipKind;
use nestio_vmm::{payloads, StopReason, Vm, VmConfig};

#[test]
fn xive_ipis_and_e1000_interrupt_on_two_vcpus() {
    if !common::kvm_or_skip("xive_ipis_and_e1000_interrupt_on_two_vcpus") {
        return;
    }
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::XIVETEST);
    cfg.console = console;
    cfg.cpus = 2;
    cfg.irqchip = IrqChipKind::Xive;
    cfg.cmdline = "rounds=8".into();
    cfg.devices.push(common::local_e1000());
    let mut vm = Vm::new(cfg).expect("build VM");
    let xive = vm.xive().expect("XIVE chip").model().clone();
    let report = vm.run().expect("run VM");
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console: {out}");
    assert!(out.contains("xive: ipi rounds 8 ok"), "{out}");
    assert!(out.contains("xive: e1000 irq on cpu 0"), "{out}");
    assert!(out.contains("xive: e1000 irq on cpu 1"), "{out}");
    // 8 IPIs + 1 device interrupt each; the queues' producer positions agree.
    assert!(out.contains("xive: done cpu0=9 cpu1=9"), "{out}");
    assert_eq!(xive.queue_position(0, 6), Some((1, 9)));
    assert_eq!(xive.queue_position(1, 6), Some((1, 9)));
}
