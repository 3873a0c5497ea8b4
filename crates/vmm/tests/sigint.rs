//! SIGINT ends a running VM cleanly (its own test binary: the handler is process-wide).

mod common;

use std::time::{Duration, Instant};

use nestio_vmm::{payloads, StopReason, Vm, VmConfig};

/// A hang bound for the guest starting or stopping: generous for a loaded 2-core CI
/// machine.
const WAIT: Duration = Duration::from_secs(120);

#[test]
fn sigint_stops_a_spinning_guest_with_status_130() {
    if !common::kvm_or_skip("sigint_stops_a_spinning_guest_with_status_130") {
        return;
    }
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::HELLO);
    cfg.console = console;
    cfg.cmdline = "mode=spin".into();
    cfg.handle_sigint = true;
    let mut vm = Vm::new(cfg).unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let t = Instant::now();
    while !common::text(&buf).contains("spinning") {
        assert!(t.elapsed() < WAIT, "guest never started");
        std::thread::sleep(Duration::from_millis(5));
    }
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

#[test]
fn stop_handle_stops_a_spinning_guest() {
    if !common::kvm_or_skip("stop_handle_stops_a_spinning_guest") {
        return;
    }
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::HELLO);
    cfg.console = console;
    cfg.cmdline = "mode=spin".into();
    let mut vm = Vm::new(cfg).unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let t = Instant::now();
    while !common::text(&buf).contains("spinning") {
        assert!(t.elapsed() < WAIT, "guest never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.stop();
    let report = runner.join().unwrap().expect("clean stop");
    assert_eq!(report.outcome, StopReason::Interrupted);
}
