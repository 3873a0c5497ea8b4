//! SIGINT ends a VM of several vCPUs, halted and spinning ones alike (its own test
//! binary: the handler is process-wide).

mod common;

use std::time::{Duration, Instant};

use nestio_vmm::{payloads, StopReason, Vm, VmConfig};

/// A hang bound for the guest starting or stopping: generous for a loaded 2-core CI
/// machine.
const WAIT: Duration = Duration::from_secs(120);

#[test]
fn sigint_stops_every_vcpu_with_status_130() {
    if !common::kvm_or_skip("sigint_stops_every_vcpu_with_status_130") {
        return;
    }
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::SMPTEST);
    cfg.console = console;
    cfg.cpus = 4;
    // The APs are halted in the guest (blocked inside KVM), the BSP spins.
    cfg.cmdline = "cpus=4 after=spin ap=halt".into();
    cfg.handle_sigint = true;
    let mut vm = Vm::new(cfg).unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let t = Instant::now();
    while !common::text(&buf).contains("spinning") {
        assert!(t.elapsed() < WAIT, "guest never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        common::text(&buf).contains("4 of 4 cpus ran code"),
        "{}",
        common::text(&buf)
    );
    // SAFETY: sends SIGINT to this process; `run` installed a handler for it.
    unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
    let t = Instant::now();
    while !runner.is_finished() {
        if t.elapsed() > WAIT {
            handle.stop();
            panic!("SIGINT did not stop the VM");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let report = runner.join().unwrap().expect("clean stop");
    assert_eq!(report.outcome, StopReason::Interrupted);
    assert_eq!(report.exit_status(), 130);
}
