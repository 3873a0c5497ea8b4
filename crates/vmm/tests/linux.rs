//! A real Linux guest (linux/build.sh) on the VMM: Linux's own e1000 driver probes the
//! assigned e1000 (8259 INTx line, I/O BAR reset, MMIO BAR), the guest's /init pings
//! the user-network gateway, and the VM ends with /init's status on port 0xf4.

mod common;

use std::time::Duration;

use nestio_vmm::{StopReason, Vm, VmConfig};

/// One Linux guest at a time: guests emulated at ~1 µs per instruction on a 2-core
/// machine slow each other down past the watchdogs when they run side by side.
static ONE_GUEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_guest() -> std::sync::MutexGuard<'static, ()> {
    ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn linux_e1000_driver_pings_the_gateway_in_process() {
    let name = "linux_e1000_driver_pings_the_gateway_in_process";
    if !common::kvm_or_skip(name) {
        return;
    }
    let Some((kernel, initrd)) = common::guest_linux(name) else {
        return;
    };
    let _one = one_guest();
    let (console, buf) = common::console();
    let mut cfg = VmConfig::linux(kernel, Some(initrd));
    cfg.console = console;
    cfg.devices.push(common::local_e1000());
    let mut vm = Vm::new(cfg).unwrap();
    let dev = vm.pci().devices()[0].clone();
    assert_eq!(dev.intx_gsi(), Some(11), "00:01.0 INTA on 8259 line 11");
    // A watchdog: a hung guest fails the test instead of hanging it.
    let handle = vm.handle();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(180)).is_err() {
            handle.stop();
        }
    });
    let report = vm.run().unwrap();
    let _ = tx.send(());
    watchdog.join().unwrap();
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console:\n{out}");
    assert!(
        out.contains("e1000 0000:00:01.0 eth0: Intel(R) PRO/1000 Network Connection"),
        "{out}"
    );
    assert!(out.contains("NESTIO-PING: ok 3/3"), "{out}");
    assert!(out.contains("64 bytes from 10.0.2.2: icmp_seq=3"), "{out}");
    let bad = nestio_vmm::linux::platform::kernel_problems(&out);
    assert!(bad.is_empty(), "bad kernel lines {bad:?} in:\n{out}");
    // The I/O BAR was decoded (Linux's e1000 resets the 82540 through it).
    assert!(dev.bar_mapping(1).is_some(), "I/O BAR1 mapped");
}

#[test]
fn linux_boots_smp_on_2_vcpus_and_pings() {
    let name = "linux_boots_smp_on_2_vcpus_and_pings";
    if !common::kvm_or_skip(name) {
        return;
    }
    let Some((kernel, initrd)) = common::guest_linux(name) else {
        return;
    };
    let _one = one_guest();
    let (console, buf) = common::console();
    let mut cfg = VmConfig::linux(kernel, Some(initrd));
    cfg.console = console;
    cfg.cpus = 2;
    cfg.devices.push(common::local_e1000());
    let mut vm = Vm::new(cfg).unwrap();
    assert_eq!(vm.vcpu_count(), 2);
    let handle = vm.handle();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(240)).is_err() {
            handle.stop();
        }
    });
    let report = vm.run().unwrap();
    let _ = tx.send(());
    watchdog.join().unwrap();
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console:\n{out}");
    // The kernel found both processors in the MP table and started the AP itself
    // (INIT/SIPI through the in-kernel LAPIC).
    assert!(out.contains("smp: Brought up 1 node, 2 CPUs"), "{out}");
    assert!(out.contains("NESTIO-CPUS: 2 in /proc/cpuinfo"), "{out}");
    assert!(out.contains("NESTIO-PING: ok 3/3"), "{out}");
    let bad = nestio_vmm::linux::platform::kernel_problems(&out);
    assert!(bad.is_empty(), "bad kernel lines {bad:?} in:\n{out}");
}

#[test]
fn linux_boot_errors_name_the_file() {
    if !common::kvm_or_skip("linux_boot_errors_name_the_file") {
        return;
    }
    let cfg = VmConfig::linux("/nonexistent/vmlinux", None);
    let e = Vm::new(cfg).err().expect("a missing kernel is an error");
    let msg = e.to_string();
    assert!(
        matches!(e, nestio_vmm::VmError::Linux(_)) && msg.contains("/nonexistent/vmlinux"),
        "{msg}"
    );
    // Not a kernel: a payload ELF linked at 2 MiB is loaded, but an initrd that does not
    // exist is named.
    let mut cfg = VmConfig::linux(
        nestio_vmm::payloads::HELLO,
        Some("/nonexistent/initrd".into()),
    );
    cfg.memory = 64 << 20;
    let msg = Vm::new(cfg).err().expect("missing initrd").to_string();
    assert!(msg.contains("/nonexistent/initrd"), "{msg}");
    let mut cfg = VmConfig::linux(nestio_vmm::payloads::HELLO, None);
    cfg.cmdline = "x".repeat(5000);
    let msg = Vm::new(cfg).err().expect("cmdline too long").to_string();
    assert!(msg.contains("command line"), "{msg}");
}
