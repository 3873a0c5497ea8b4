//! Several vCPUs under real KVM: the `smptest` payload starts every application
//! processor with INIT/SIPI through the in-kernel LAPIC and counts those that ran code;
//! pause/resume parks all vCPUs; every way a VM ends (exit port on an AP, reset, stop
//! request, a dead device, an emulation failure on an AP) ends all vCPU threads.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::testdev::TestDev;
use nestio_vmm::vcpu::VcpuError;
use nestio_vmm::{payloads, DeviceConfig, StopReason, Vm, VmConfig, VmError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A hang bound for starting or stopping: generous for a loaded 2-core CI machine.
const WAIT: Duration = Duration::from_secs(120);
/// Where `smptest after=spin` keeps its per-vCPU loop counters.
const SPIN_COUNTERS: u64 = 0x6000;

fn smp_config(cpus: u8, cmdline: &str) -> (VmConfig, Arc<parking_lot::Mutex<Vec<u8>>>) {
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::SMPTEST);
    cfg.console = console;
    cfg.cpus = cpus;
    cfg.cmdline = format!("cpus={cpus} {cmdline}");
    (cfg, buf)
}

fn wait_for(buf: &Arc<parking_lot::Mutex<Vec<u8>>>, what: &str) {
    let t = Instant::now();
    while !common::text(buf).contains(what) {
        assert!(
            t.elapsed() < WAIT,
            "guest never printed {what:?}: {}",
            common::text(buf)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn counters(mem: &GuestMemoryMmap, cpus: u8) -> Vec<u64> {
    (0..u64::from(cpus))
        .map(|i| mem.read_obj(GuestAddress(SPIN_COUNTERS + 8 * i)).unwrap())
        .collect()
}

#[test]
fn payload_runs_code_on_1_2_and_4_vcpus() {
    if !common::kvm_or_skip("payload_runs_code_on_1_2_and_4_vcpus") {
        return;
    }
    for cpus in [1u8, 2, 4] {
        let (cfg, buf) = smp_config(cpus, "");
        let mut vm = Vm::new(cfg).expect("build VM");
        assert_eq!(vm.vcpu_count(), usize::from(cpus));
        let report = vm.run().expect("run VM");
        let out = common::text(&buf);
        assert_eq!(
            report.outcome,
            StopReason::GuestExit(cpus),
            "{cpus} vCPUs: {out}"
        );
        let all = (1u64 << cpus) - 1;
        assert!(
            out.contains(&format!("{cpus} of {cpus} cpus ran code; lapic_ids={all} ")),
            "every LAPIC ID 0..{cpus} reported in: {out}"
        );
        if out.contains(&format!("cpuid_apic_ids={all} ")) {
            assert!(out.contains(&format!("cpuid_logical={cpus}")), "{out}");
        } else {
            eprintln!("NOTE: this host does not show the VMM's CPUID leaf 1 to the guest: {out}");
        }
    }
}

#[test]
fn too_many_or_zero_vcpus_are_refused() {
    if !common::kvm_or_skip("too_many_or_zero_vcpus_are_refused") {
        return;
    }
    for cpus in [0, nestio_vmm::MAX_VCPUS + 1] {
        let (cfg, _) = smp_config(cpus, "");
        let err = Vm::new(cfg).err().expect("refused");
        assert!(matches!(err, VmError::Cpus { .. }), "{err}");
        assert!(err.to_string().contains("--cpus"), "{err}");
    }
}

#[test]
fn pause_parks_every_vcpu_and_resume_lets_them_run() {
    if !common::kvm_or_skip("pause_parks_every_vcpu_and_resume_lets_them_run") {
        return;
    }
    let cpus = 3;
    let (cfg, buf) = smp_config(cpus, "after=spin ap=spin");
    let mut vm = Vm::new(cfg).unwrap();
    let mem = vm.ram().memory().clone();
    let handle = vm.handle();
    assert_eq!(
        handle.pause(Duration::from_secs(1)),
        Err(nestio_vmm::PauseError::NotRunning)
    );
    let runner = std::thread::spawn(move || vm.run());
    wait_for(&buf, "spinning");
    // Every vCPU counts its loops.
    let t = Instant::now();
    while counters(&mem, cpus).contains(&0) {
        assert!(t.elapsed() < WAIT, "{:?}", counters(&mem, cpus));
        std::thread::sleep(Duration::from_millis(5));
    }
    for round in 0..3 {
        handle.pause(WAIT).expect("pause");
        assert!(handle.is_paused());
        let before = counters(&mem, cpus);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            counters(&mem, cpus),
            before,
            "round {round}: a paused vCPU ran guest code"
        );
        handle.resume();
        assert!(!handle.is_paused());
        let t = Instant::now();
        loop {
            let now = counters(&mem, cpus);
            if now.iter().zip(&before).all(|(n, b)| n > b) {
                break;
            }
            assert!(
                t.elapsed() < WAIT,
                "round {round}: not every vCPU ran after resume: {before:?} -> {now:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // A stop while paused ends the VM too.
    handle.pause(WAIT).expect("pause");
    handle.stop();
    let report = runner.join().unwrap().expect("clean stop");
    assert_eq!(report.outcome, StopReason::Interrupted);
    assert_eq!(
        handle.pause(Duration::from_secs(1)),
        Err(nestio_vmm::PauseError::NotRunning)
    );
}

#[test]
fn exit_port_on_an_ap_ends_every_vcpu() {
    if !common::kvm_or_skip("exit_port_on_an_ap_ends_every_vcpu") {
        return;
    }
    let (cfg, buf) = smp_config(4, "ap=exit");
    let report = Vm::new(cfg).unwrap().run().expect("run");
    assert_eq!(
        report.outcome,
        StopReason::GuestExit(77),
        "{}",
        common::text(&buf)
    );
    assert_ne!(report.vcpu, 0, "an application processor ended the VM");
}

#[test]
fn bsp_exit_stops_spinning_aps() {
    if !common::kvm_or_skip("bsp_exit_stops_spinning_aps") {
        return;
    }
    let (cfg, buf) = smp_config(4, "ap=spin");
    let report = Vm::new(cfg).unwrap().run().expect("run");
    assert_eq!(
        report.outcome,
        StopReason::GuestExit(4),
        "{}",
        common::text(&buf)
    );
    assert_eq!(report.vcpu, 0);
}

#[test]
fn reset_with_several_vcpus() {
    if !common::kvm_or_skip("reset_with_several_vcpus") {
        return;
    }
    let (cfg, buf) = smp_config(2, "after=reset ap=spin");
    let report = Vm::new(cfg).unwrap().run().expect("run");
    assert_eq!(report.outcome, StopReason::Reset, "{}", common::text(&buf));
}

#[test]
fn stop_handle_ends_halted_and_spinning_vcpus() {
    if !common::kvm_or_skip("stop_handle_ends_halted_and_spinning_vcpus") {
        return;
    }
    // APs halted in the guest (blocked in KVM), and APs never started (waiting for a
    // SIPI inside KVM_RUN): both must leave KVM_RUN on a stop.
    for (cpus, cmdline) in [(4u8, "cpus=4 after=spin"), (3, "cpus=1 after=spin")] {
        let (mut cfg, buf) = smp_config(cpus, "");
        cfg.cmdline = cmdline.into();
        let mut vm = Vm::new(cfg).unwrap();
        let handle = vm.handle();
        let runner = std::thread::spawn(move || vm.run());
        wait_for(&buf, "spinning");
        handle.stop();
        let t = Instant::now();
        while !runner.is_finished() {
            assert!(t.elapsed() < WAIT, "{cmdline}: the stop did not end the VM");
            std::thread::sleep(Duration::from_millis(5));
        }
        let report = runner.join().unwrap().expect("clean stop");
        assert_eq!(report.outcome, StopReason::Interrupted, "{cmdline}");
    }
}

#[test]
fn emulation_failure_on_an_ap_stops_the_vm() {
    if !common::kvm_or_skip("emulation_failure_on_an_ap_stops_the_vm") {
        return;
    }
    let (cfg, buf) = smp_config(2, "ap=fault");
    let err = Vm::new(cfg)
        .unwrap()
        .run()
        .expect_err("an x87 load from MMIO cannot be emulated");
    let msg = err.to_string();
    assert!(
        matches!(err, VmError::Vcpu(VcpuError::Emulation { .. })),
        "{msg}; console: {}",
        common::text(&buf)
    );
    assert!(msg.contains("could not emulate"), "{msg}");
}

/// The test device, but its liveness probe (the INTx IRQ info the VM's control loop
/// asks for) fails once the device is dead: a device that dies while the guest does not
/// touch it.
struct Probed(Arc<TestDev>);

impl nestio_device_model::VfioDevice for Probed {
    fn info(&self) -> nestio_device_model::DeviceInfo {
        self.0.info()
    }
    fn region_info(
        &self,
        index: u32,
    ) -> nestio_device_model::Result<nestio_device_model::RegionInfo> {
        self.0.region_info(index)
    }
    fn region_read(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> nestio_device_model::Result<()> {
        self.0.region_read(index, offset, buf)
    }
    fn region_write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> nestio_device_model::Result<()> {
        self.0.region_write(index, offset, data)
    }
    fn irq_info(&self, index: u32) -> nestio_device_model::Result<nestio_device_model::IrqInfo> {
        if self.0.dead.load(Ordering::SeqCst) {
            return Err(nestio_device_model::DeviceError::Disconnected(
                "test device killed".into(),
            ));
        }
        self.0.irq_info(index)
    }
    fn set_irqs(
        &self,
        index: u32,
        action: nestio_device_model::IrqAction,
        start: u32,
        count: u32,
        data: nestio_device_model::IrqData,
    ) -> nestio_device_model::Result<()> {
        self.0.set_irqs(index, action, start, count, data)
    }
}

#[test]
fn dead_device_stops_every_vcpu() {
    if !common::kvm_or_skip("dead_device_stops_every_vcpu") {
        return;
    }
    let dev = TestDev::new();
    let (mut cfg, buf) = smp_config(2, "after=spin ap=spin");
    cfg.devices.push(DeviceConfig::Local {
        name: "testdev".into(),
        device: Arc::new(Probed(dev.clone())),
    });
    let mut vm = Vm::new(cfg).unwrap();
    let runner = std::thread::spawn(move || vm.run());
    wait_for(&buf, "spinning");
    dev.dead.store(true, Ordering::SeqCst);
    let t = Instant::now();
    while !runner.is_finished() {
        assert!(t.elapsed() < WAIT, "a dead device did not stop the VM");
        std::thread::sleep(Duration::from_millis(5));
    }
    let err = runner.join().unwrap().expect_err("device lost");
    assert!(
        matches!(err, VmError::DeviceLost { ref device, .. } if device == "testdev"),
        "{err}"
    );
    assert!(err.to_string().contains("killed"), "{err}");
}
