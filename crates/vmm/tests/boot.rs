//! Boot tests under real KVM: long mode, ELF loading, serial console, debug exit.

mod common;

use nestio_vmm::{payloads, StopReason, Vm, VmConfig};

#[test]
fn hello_prints_and_exits_with_its_status() {
    if !common::kvm_or_skip("hello_prints_and_exits_with_its_status") {
        return;
    }
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::HELLO);
    cfg.console = console;
    let mut vm = Vm::new(cfg).expect("build VM");
    let report = vm.run().expect("run VM");
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(42), "console: {out}");
    assert_eq!(report.exit_status(), 42);
    assert!(
        out.contains("hello from the guest (64 MiB)"),
        "console: {out}"
    );
}

#[test]
fn bad_payload_and_memory_are_clear_errors() {
    if !common::kvm_or_skip("bad_payload_and_memory_are_clear_errors") {
        return;
    }
    let mut cfg = VmConfig::new("/nonexistent/payload.elf");
    cfg.console = nestio_vmm::ConsoleOutput::Sink;
    let e = Vm::new(cfg)
        .err()
        .expect("missing payload must fail")
        .to_string();
    assert!(e.contains("/nonexistent/payload.elf"), "{e}");
    let mut cfg = VmConfig::new(payloads::HELLO);
    cfg.memory = 3 << 20;
    let e = Vm::new(cfg).err().expect("3 MiB must fail").to_string();
    assert!(e.contains("multiple of 2 MiB"), "{e}");
    // A host binary is an ELF linked below 2 MiB (or PIE): refused, not loaded.
    let mut cfg = VmConfig::new("/bin/true");
    cfg.console = nestio_vmm::ConsoleOutput::Sink;
    assert!(Vm::new(cfg).is_err());
}

#[test]
fn run_entry_point_returns_the_guest_status() {
    if !common::kvm_or_skip("run_entry_point_returns_the_guest_status") {
        return;
    }
    let mut cfg = VmConfig::new(payloads::HELLO);
    cfg.console = nestio_vmm::ConsoleOutput::Sink;
    cfg.memory = nestio_vmm::parse_size("8M").unwrap();
    assert_eq!(nestio_vmm::run(cfg).unwrap(), 42);
}
