//! The nestio sample device driven by the guest, in this process and in another
//! process over vfio-user; killing the device process ends the VM with a clear error.

mod common;

use std::time::{Duration, Instant};

use common::child::DeviceProcess;
use nestio_vmm::{payloads, DeviceConfig, StopReason, Vm, VmConfig, VmError};

/// Helper, not a test: serves a device when this binary runs as a device process
/// (started by `DeviceProcess` with `--ignored --exact child_device_server`).
#[test]
#[ignore = "device-process entry point, run only by DeviceProcess"]
fn child_device_server() {
    common::child::child_main();
}

fn sample_cfg(
    dev: DeviceConfig,
    mode: &str,
) -> (VmConfig, std::sync::Arc<parking_lot::Mutex<Vec<u8>>>) {
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::SAMPLETEST);
    cfg.console = console;
    cfg.cmdline = format!("mode={mode}");
    cfg.devices.push(dev);
    (cfg, buf)
}

/// Runs the sample payload in `mode` against `dev`, asserts the guest exited 0, and
/// returns the console text.
fn run_sample_ok(dev: DeviceConfig, mode: &str) -> String {
    let (cfg, buf) = sample_cfg(dev, mode);
    let report = Vm::new(cfg).unwrap().run().unwrap();
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console: {out}");
    out
}

/// The sample device served in this process.
fn local_sample() -> DeviceConfig {
    DeviceConfig::Local {
        name: "sample".into(),
        device: nestio_emulated::sample::sample_device().unwrap(),
    }
}

#[test]
fn in_process_sample_device_msi_and_dma() {
    if !common::kvm_or_skip("in_process_sample_device_msi_and_dma") {
        return;
    }
    let out = run_sample_ok(local_sample(), "check");
    assert!(out.contains("sample msi interrupts: 3"), "{out}");
    assert!(out.contains("msi mask: held while masked"), "{out}");
}

#[test]
fn msix_table_masking_and_pending_bit() {
    if !common::kvm_or_skip("msix_table_masking_and_pending_bit") {
        return;
    }
    let out = run_sample_ok(local_sample(), "msix");
    assert!(out.contains("delivered at unmask"), "{out}");
}

#[test]
fn msix_over_vfio_user() {
    if !common::kvm_or_skip("msix_over_vfio_user") {
        return;
    }
    let p = DeviceProcess::start("sample");
    run_sample_ok(
        DeviceConfig::VfioUser {
            socket: p.socket.clone(),
        },
        "msix",
    );
}

#[test]
fn bench_measures_both_devices() {
    if !common::kvm_or_skip("bench_measures_both_devices") {
        return;
    }
    let p = DeviceProcess::start("sample");
    let local = nestio_emulated::sample::sample_device().unwrap();
    let r = nestio_vmm::bench::exit_costs(payloads::SAMPLETEST, local, p.socket.clone())
        .expect("benchmark run");
    // Every figure was measured (no timing thresholds asserted).
    for c in [r.local, r.remote] {
        assert!(c.read > 0 && c.write > 0 && c.irq > 0, "{r:?}");
    }
    eprintln!("{r}");
}

#[test]
fn vfio_user_sample_device_in_another_process() {
    if !common::kvm_or_skip("vfio_user_sample_device_in_another_process") {
        return;
    }
    let proc_ = DeviceProcess::start("sample");
    let out = run_sample_ok(
        DeviceConfig::VfioUser {
            socket: proc_.socket.clone(),
        },
        "check",
    );
    assert!(out.contains("sample msi interrupts: 3"), "{out}");
    assert!(
        out.contains("first 0xa5a55a5a"),
        "DMA into guest RAM from the other process: {out}"
    );
}

/// A hang bound for the guest reaching a point or the VM stopping: generous for a
/// loaded 2-core CI machine.
const WAIT: Duration = Duration::from_secs(120);

fn kill_mid_run(mode: &str, wait_for: &str) -> VmError {
    let mut proc_ = DeviceProcess::start("sample");
    let socket = proc_.socket.clone();
    let (cfg, buf) = sample_cfg(
        DeviceConfig::VfioUser {
            socket: socket.clone(),
        },
        mode,
    );
    let mut vm = Vm::new(cfg).unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let t = Instant::now();
    while !common::text(&buf).contains(wait_for) {
        if t.elapsed() > WAIT {
            handle.stop();
            panic!("guest never reached {wait_for:?}: {}", common::text(&buf));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    proc_.kill();
    let t = Instant::now();
    while !runner.is_finished() {
        if t.elapsed() > WAIT {
            handle.stop();
            panic!("the VM did not stop after its device process died");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = runner
        .join()
        .unwrap()
        .expect_err("VM must fail when its device dies");
    let msg = err.to_string();
    eprintln!("VM error after the device process died: {msg}");
    assert!(
        msg.contains(&socket.display().to_string()),
        "error must name the device: {msg}"
    );
    assert!(
        msg.contains("went away") || msg.contains("connection"),
        "{msg}"
    );
    err
}

#[test]
fn killing_device_process_while_guest_polls_ends_vm() {
    if !common::kvm_or_skip("killing_device_process_while_guest_polls_ends_vm") {
        return;
    }
    let err = kill_mid_run("spin", "spinning");
    assert!(
        matches!(err, VmError::Vcpu(_) | VmError::DeviceLost { .. }),
        "{err}"
    );
}

#[test]
fn killing_device_process_while_guest_waits_for_irq_ends_vm() {
    if !common::kvm_or_skip("killing_device_process_while_guest_waits_for_irq_ends_vm") {
        return;
    }
    let err = kill_mid_run("halt", "waiting");
    assert!(matches!(err, VmError::DeviceLost { .. }), "{err}");
}
