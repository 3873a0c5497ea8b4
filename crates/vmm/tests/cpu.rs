//! The split-lock CPU model under real KVM: the guest reads the capability, toggles
//! MSR_TEST_CTRL, checks that reserved bits fault; the value is part of the saved state.

mod common;

use nestio_vmm::cpu::TEST_CTRL_SPLIT_LOCK_DETECT;
use nestio_vmm::{payloads, CpuModel, StopReason, Vm, VmConfig};

fn run_cputest(cpu: CpuModel) -> (Vm, nestio_vmm::VmReport, String) {
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::CPUTEST);
    cfg.console = console;
    cfg.cpu = cpu;
    let mut vm = Vm::new(cfg).expect("build VM");
    let report = vm.run().expect("run VM");
    let out = common::text(&buf);
    (vm, report, out)
}

#[test]
fn guest_toggles_split_lock_detect_and_reserved_bits_fault() {
    if !common::kvm_or_skip("guest_toggles_split_lock_detect_and_reserved_bits_fault") {
        return;
    }
    let (mut vm, report, out) = run_cputest("split-lock-detect=on".parse().unwrap());
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console: {out}");
    assert!(out.contains("\ncore_capabilities=1"), "{out}");
    if out.contains("cpuid_leaf7_faithful=1") {
        assert!(out.contains("cpuid_core_capabilities=1"), "{out}");
    } else {
        eprintln!("NOTE: this host replaces CPUID leaf 7; the capability was read from IA32_CORE_CAPABILITIES");
    }
    assert!(out.contains("reserved bits fault"), "{out}");
    assert!(report.stats.msr.load(std::sync::atomic::Ordering::Relaxed) >= 10);
    // MSR_TEST_CTRL is part of the saved vCPU state...
    let snap = report.snapshot.expect("snapshot");
    assert_eq!(snap.cpu.test_ctrl, TEST_CTRL_SPLIT_LOCK_DETECT);
    assert_eq!(
        vm.cpu_state().unwrap().test_ctrl,
        TEST_CTRL_SPLIT_LOCK_DETECT
    );
    // ...and restored into another vCPU.
    let (_vm2, mut cfg) = ((), VmConfig::new(payloads::HELLO));
    cfg.console = nestio_vmm::ConsoleOutput::Sink;
    let mut other = Vm::new(cfg).unwrap();
    let vcpu = other.vcpu_mut().unwrap();
    assert_eq!(vcpu.cpu_state().test_ctrl, 0);
    vcpu.restore(&snap).unwrap();
    let again = vcpu.save().unwrap();
    assert_eq!(again.cpu.test_ctrl, TEST_CTRL_SPLIT_LOCK_DETECT);
    assert_eq!(again.regs.rip, snap.regs.rip);
    assert_eq!(again.sregs.cr3, snap.sregs.cr3);
    let _ = vm.vcpu_mut();
}

#[test]
fn hidden_capability_faults_in_the_guest() {
    if !common::kvm_or_skip("hidden_capability_faults_in_the_guest") {
        return;
    }
    let (_vm, report, out) = run_cputest("-split-lock-detect".parse().unwrap());
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console: {out}");
    assert!(out.contains("\ncore_capabilities=0"), "{out}");
    if out.contains("cpuid_leaf7_faithful=1") {
        assert!(out.contains("cpuid_core_capabilities=0"), "{out}");
    }
    assert_eq!(report.snapshot.unwrap().cpu.test_ctrl, 0);
}
