//! The XIVE as a VM's interrupt controller under real KVM: the `xivetest` payload on
//! 2 vCPUs configures its event queues by hypercall, plays IPI ping-pong between the
//! vCPUs through ESB trigger pages, and takes the e1000's INTx routed through XIVE to
//! each vCPU in turn, acknowledging through its TIMA and EOIing through the ESB.

mod common;

use common::child::DeviceProcess;
use nestio_vmm::irqchip::IrqChipKind;
use nestio_vmm::DeviceConfig;

/// Helper, not a test: serves a device when this binary runs as a device process
/// (started by `DeviceProcess` with `--ignored --exact child_device_server`).
#[test]
#[ignore = "device-process entry point, run only by DeviceProcess"]
fn child_device_server() {
    common::child::child_main();
}
use nestio_vmm::{payloads, StopReason, Vm, VmConfig};

#[test]
fn xive_ipis_and_e1000_interrupt_on_two_vcpus() {
    if !common::kvm_or_skip("xive_ipis_and_e1000_interrupt_on_two_vcpus") {
        return;
    }
    two_vcpus(common::local_e1000());
}

/// The same with the e1000 in another process over vfio-user: its INTx eventfd is
/// written by the device process and read by the XIVE delivery thread, which triggers
/// the source — no other hop.
#[test]
fn xive_routes_a_vfio_user_e1000_interrupt() {
    if !common::kvm_or_skip("xive_routes_a_vfio_user_e1000_interrupt") {
        return;
    }
    let p = DeviceProcess::start("e1000");
    two_vcpus(DeviceConfig::VfioUser {
        socket: p.socket.clone(),
    });
}

/// The xivetest payload on a 2-vCPU XIVE machine with `cmdline` and `devices`; the VM
/// and its console buffer.
fn xivetest_on_two_vcpus(
    cmdline: &str,
    devices: Vec<DeviceConfig>,
) -> (Vm, std::sync::Arc<parking_lot::Mutex<Vec<u8>>>) {
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::XIVETEST);
    cfg.console = console;
    cfg.cpus = 2;
    cfg.irqchip = IrqChipKind::Xive;
    cfg.cmdline = cmdline.into();
    cfg.devices = devices;
    (Vm::new(cfg).expect("build VM"), buf)
}

fn two_vcpus(dev: DeviceConfig) {
    let (mut vm, buf) = xivetest_on_two_vcpus("rounds=8", vec![dev]);
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

fn bench_run(chip: IrqChipKind, n: u32) -> (u64, u64) {
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::XIVETEST);
    cfg.console = console;
    cfg.irqchip = chip;
    let name = if chip == IrqChipKind::Xive {
        "xive"
    } else {
        "x86"
    };
    cfg.cmdline = format!("bench={n} chip={name}");
    cfg.devices.push(common::local_e1000());
    let report = Vm::new(cfg).unwrap().run().unwrap();
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console: {out}");
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("bench: chip={name} ")))
        .unwrap_or_else(|| panic!("no bench line: {out}"));
    let field = |k: &str| -> u64 {
        line.split(' ')
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    (field("median_cycles="), field("min_cycles="))
}

/// Benchmark (runs in the normal suite; numbers with `--nocapture`): device eventfd ->
/// guest interrupt handler latency, through the XIVE (poll thread -> model -> LAPIC
/// MSI) and through KVM's in-kernel IOAPIC (irqfd), in one run.
#[test]
fn bench_eventfd_to_guest_interrupt_xive_vs_x86() {
    if !common::kvm_or_skip("bench_eventfd_to_guest_interrupt_xive_vs_x86") {
        return;
    }
    let n = 200;
    let (x86_med, x86_min) = bench_run(IrqChipKind::X86, n);
    let (xive_med, xive_min) = bench_run(IrqChipKind::Xive, n);
    eprintln!(
        "eventfd -> guest interrupt, TSC cycles over {n} interrupts: x86 irqfd median \
         {x86_med} min {x86_min}; XIVE median {xive_med} min {xive_min}; XIVE/x86 median {:.2}",
        xive_med as f64 / x86_med as f64
    );
    assert!(x86_med > 0 && xive_med > 0);
}

/// Save/restore mid-traffic: while the guest plays IPI ping-pong between its two vCPUs,
/// the host repeatedly pauses the vCPUs, saves the XIVE (sources stopped, EQ pages
/// marked dirty, state captured) and resumes it; no IPI may be lost (the payload fails
/// a round whose answer never comes), and every save finds each configured event
/// queue's pages in the chip's dirty log (EQ_SYNC).
#[test]
fn xive_save_resume_mid_traffic_loses_no_interrupt() {
    if !common::kvm_or_skip("xive_save_resume_mid_traffic_loses_no_interrupt") {
        return;
    }
    let (mut vm, buf) = xivetest_on_two_vcpus("rounds=300", Vec::new());
    let chip = vm.xive().expect("XIVE chip").clone();
    let handle = vm.handle();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let saver = std::thread::spawn(move || {
        let mut saves = 0u32;
        let mut queued = 0usize;
        let mut dirty_checked = 0usize;
        while !d.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(2));
            if handle.pause(std::time::Duration::from_secs(30)).is_err() {
                break;
            }
            let snap = chip.model().save();
            queued += snap.sources.iter().filter(|s| s.requeue).count();
            // EQ_SYNC marked both vCPUs' queue pages dirty.
            let dirty = chip.take_dirty();
            for q in &snap.queues {
                assert!(dirty.contains(&(q.qaddr, 1 << q.qshift)), "{dirty:?} {q:?}");
            }
            dirty_checked += snap.queues.len();
            std::thread::sleep(std::time::Duration::from_millis(1));
            chip.model().resume().expect("resume");
            handle.resume();
            saves += 1;
        }
        (saves, queued, dirty_checked)
    });
    let report = vm.run().expect("run VM");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (saves, queued, dirty_checked) = saver.join().unwrap();
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console: {out}");
    assert!(out.contains("xive: ipi rounds 300 ok"), "{out}");
    eprintln!(
        "{saves} save/resume cycles during 300 IPI rounds, {queued} events caught while \
         stopped, {dirty_checked} queue pages found in the dirty log"
    );
    assert!(saves > 0, "no save happened while the guest ran");
    assert!(dirty_checked > 0, "no configured queue was ever saved");
}

/// The e1000ping guest driver with its interrupts through the XIVE (`irq=xive`): ARP and
/// an ICMP echo to the user network's gateway, every RX interrupt acknowledged through
/// the TIMA, its queue drained and EOId through the ESB.
#[test]
fn e1000_ping_through_xive() {
    if !common::kvm_or_skip("e1000_ping_through_xive") {
        return;
    }
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::E1000PING);
    cfg.console = console;
    cfg.irqchip = IrqChipKind::Xive;
    cfg.cmdline = "irq=xive".into();
    cfg.devices.push(common::local_e1000());
    let report = Vm::new(cfg).unwrap().run().unwrap();
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console: {out}");
    assert!(out.contains("interrupts: XIVE source"), "{out}");
    assert!(out.contains("ping: echo reply from 10.0.2.2"), "{out}");
}

/// Escalations under real KVM: vCPU 1 idles in `H_CEDE` (`cede=1`) instead of `hlt`,
/// so its VP is off its thread when vCPU 0's IPIs arrive. Every round must still be
/// answered (the queue's escalation wakes the ceded vCPU, which takes the IPI once
/// dispatched); escalations fired, and never more than one per cede (no storm).
#[test]
fn xive_ceded_vcpu_is_woken_by_its_queue_escalation() {
    if !common::kvm_or_skip("xive_ceded_vcpu_is_woken_by_its_queue_escalation") {
        return;
    }
    let (mut vm, buf) = xivetest_on_two_vcpus("rounds=40 cede=1", Vec::new());
    let chip = vm.xive().expect("XIVE chip").clone();
    let t = std::time::Instant::now();
    let report = vm.run().expect("run VM");
    let elapsed = t.elapsed();
    let out = common::text(&buf);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console: {out}");
    assert!(out.contains("xive: ipi rounds 40 ok"), "{out}");
    let guest_cedes: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("xive: cedes="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cedes line: {out}"));
    let st = chip.cede_stats();
    let esc = chip.model().escalation(1).expect("vCPU 1");
    eprintln!(
        "40 IPI rounds to a ceding vCPU in {elapsed:?}: {st:?}, model escalations \
         fired={} coalesced={}, guest counted {guest_cedes} cedes",
        esc.fired, esc.coalesced
    );
    assert!(st.cedes >= guest_cedes && guest_cedes > 0, "{st:?}");
    // vCPU 1 spends nearly all its time ceded: most rounds must have woken it by
    // escalation (a quarter leaves room for a loaded host), not by the cede slice.
    assert!(
        st.escalated >= 10,
        "the ceded vCPU was not woken by its escalations: {st:?}"
    );
    assert!(esc.fired >= st.escalated, "{esc:?} {st:?}");
    assert!(
        esc.fired <= st.cedes,
        "more escalations than cedes (a storm): {esc:?} {st:?}"
    );
    assert_eq!(
        chip.model().escalation(0).unwrap().fired,
        0,
        "vCPU 0 never ceded"
    );
    assert!(esc.dispatched);
}
