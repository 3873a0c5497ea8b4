//! Live migration of a VM with an assigned sample device (each side its own device
//! process): a guest that keeps the device's DMA engine busy and checks its memory
//! finishes on the destination with every checksum matching; failures roll back.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::child::DeviceProcess;
use nestio_device_model::{MigState, VfioDevice};
use nestio_vmm::migration::{MigrationError, MigrationParams, MigrationSource, Progress};
use nestio_vmm::{payloads, DeviceConfig, StopReason, Vm, VmConfig, VmError, VmReport};

/// Helper, not a test: serves a device when this binary runs as a device process.
#[test]
#[ignore = "device-process entry point, run only by DeviceProcess"]
fn child_device_server() {
    common::child::child_main();
}

type Console = Arc<parking_lot::Mutex<Vec<u8>>>;

fn cfg(socket: &std::path::Path, rounds: u32, cpus: u8) -> (VmConfig, Console) {
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::SAMPLETEST);
    cfg.console = console;
    cfg.cmdline = format!("mode=migrate rounds={rounds}");
    cfg.cpus = cpus;
    cfg.devices.push(DeviceConfig::VfioUser {
        socket: socket.to_path_buf(),
    });
    (cfg, buf)
}

fn wait_for(buf: &Console, what: &str, limit: Duration) {
    let t = Instant::now();
    while !common::text(buf).contains(what) {
        assert!(
            t.elapsed() < limit,
            "no {what:?} within {limit:?}: {}",
            common::text(buf)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The source VM's run thread.
type SourceThread = std::thread::JoinHandle<Result<VmReport, VmError>>;

/// Starts the source VM on its own thread and waits (up to `limit`) until its console
/// shows `marker`; returns its migration handle and its run thread.
fn start_source(
    cfg: VmConfig,
    out: &Console,
    marker: &str,
    limit: Duration,
) -> (MigrationSource, SourceThread) {
    let mut src = Vm::new(cfg).unwrap();
    let source = src.migration_source();
    let thread = std::thread::spawn(move || src.run());
    wait_for(out, marker, limit);
    (source, thread)
}

/// The source kept running after a failed migration: its guest finishes there, exits
/// with 0 and verified its memory.
fn assert_source_finished(thread: SourceThread, out: &Console) {
    let report = thread.join().unwrap().unwrap();
    let text = common::text(out);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "{text}");
    assert!(text.contains("migtest verified"), "{text}");
}

/// Source and destination in this process, each with its own sample device process;
/// the guest is migrated mid-run (pre-copy with the device in PRE_COPY, then
/// stop-and-copy), ends on the destination, and its checksums all match.
#[test]
fn payload_with_busy_dma_migrates_and_every_checksum_matches() {
    if !common::kvm_or_skip("payload_with_busy_dma_migrates_and_every_checksum_matches") {
        return;
    }
    let src_dev = DeviceProcess::start("sample");
    let dst_dev = DeviceProcess::start("sample");
    let (src_cfg, src_out) = cfg(&src_dev.socket, 4000, 2);
    let (dst_cfg, dst_out) = cfg(&dst_dev.socket, 4000, 2);
    let (source, src_thread) =
        start_source(src_cfg, &src_out, "round 200", Duration::from_secs(60));

    let (a, mut b) = UnixStream::pair().unwrap();
    let dst_thread = std::thread::spawn(move || {
        let mut vm = Vm::new(dst_cfg).unwrap();
        let got = vm.receive_migration(&mut b).map_err(|e| e.to_string())?;
        let report = vm.run().map_err(|e| e.to_string())?;
        Ok::<_, String>((got, report))
    });
    let mut passes = Vec::new();
    let report = source
        .migrate(a, MigrationParams::default(), &mut |p: &Progress| {
            eprintln!("{p}");
            passes.push(*p);
        })
        .expect("migration");
    eprintln!("{report}");
    assert!(source.migrated());
    assert!(report.passes >= 1 && report.bytes > 64 << 20, "{report:?}");
    assert!(
        report.device_bytes > 2 * 64 * 1024,
        "pre-copy and final snapshots: {report:?}"
    );
    assert!(passes.first().is_some_and(|p| p.pass == 0 && !p.stop_copy));
    assert!(passes.last().is_some_and(|p| p.stop_copy));
    let src_report = src_thread.join().unwrap().unwrap();
    assert_eq!(
        src_report.outcome,
        StopReason::Interrupted,
        "the source stopped"
    );
    let src_text = common::text(&src_out);
    assert!(!src_text.contains("migtest verified"), "{src_text}");

    let (got, dst_report) = dst_thread.join().unwrap().expect("destination");
    let out = common::text(&dst_out);
    assert!(got.pages >= (64 << 20) / 4096, "{got:?}");
    assert_eq!(
        dst_report.outcome,
        StopReason::GuestExit(0),
        "destination console: {out}\nsource console: {src_text}"
    );
    assert!(
        out.contains("migtest verified 32 blocks, 64 pages"),
        "{out}"
    );
    assert!(!out.contains("MISMATCH"), "{out}");
    // The destination's console continues where the source stopped: it never printed
    // the start line itself.
    assert!(!out.contains("migtest start"), "{out}");
}

/// The destination dies mid-stream (its end of the connection closes during the RAM
/// copy): the source rolls back, its device returns to RUNNING, and the guest runs on
/// to the end on the source with every checksum matching.
#[test]
fn destination_dying_during_precopy_rolls_back() {
    if !common::kvm_or_skip("destination_dying_during_precopy_rolls_back") {
        return;
    }
    let src_dev = DeviceProcess::start("sample");
    let (src_cfg, src_out) = cfg(&src_dev.socket, 600, 1);
    let (source, src_thread) =
        start_source(src_cfg, &src_out, "round 100", Duration::from_secs(60));
    let (a, mut b) = UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || {
        // Take 3 MiB of the stream, then die.
        let mut buf = vec![0u8; 3 << 20];
        let _ = std::io::Read::read_exact(&mut b, &mut buf);
    });
    let e = source
        .migrate(a, MigrationParams::default(), &mut |_| {})
        .unwrap_err();
    reader.join().unwrap();
    assert!(matches!(e, MigrationError::Format(_)), "{e}");
    assert!(!source.migrated());
    assert_source_finished(src_thread, &src_out);
}

/// The destination refuses in stop-and-copy (its device is of another kind, so the
/// machine check fails) — and a truncated stream: each leaves the source running.
#[test]
fn destination_refusal_and_truncated_stream_leave_the_source_running() {
    if !common::kvm_or_skip("destination_refusal_and_truncated_stream_leave_the_source_running") {
        return;
    }
    let src_dev = DeviceProcess::start("sample");
    let dst_dev = DeviceProcess::start("sample");
    let (src_cfg, src_out) = cfg(&src_dev.socket, 800, 1);
    let (source, src_thread) =
        start_source(src_cfg, &src_out, "round 100", Duration::from_secs(60));

    // A destination with different RAM refuses at the machine check.
    let (mut dst_cfg, _) = cfg(&dst_dev.socket, 800, 1);
    dst_cfg.memory = 128 << 20;
    let (a, mut b) = UnixStream::pair().unwrap();
    let dst = std::thread::spawn(move || {
        let mut vm = Vm::new(dst_cfg).unwrap();
        vm.receive_migration(&mut b)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let e = source
        .migrate(a, MigrationParams::default(), &mut |_| {})
        .unwrap_err();
    let dst_err = dst.join().unwrap().unwrap_err();
    assert!(dst_err.contains("does not match"), "{dst_err}");
    assert!(
        matches!(&e, MigrationError::Refused(m) if m.contains("does not match"))
            || matches!(&e, MigrationError::Format(_)),
        "{e}"
    );

    // A truncated stream: the destination sees the cut and refuses; nothing runs there.
    let (a, b) = UnixStream::pair().unwrap();
    let dst_dev2 = DeviceProcess::start("sample");
    let (dst_cfg, dst_out) = cfg(&dst_dev2.socket, 800, 1);
    let cut = std::thread::spawn(move || {
        // Forward only the first 5 MiB, then close both directions.
        let mut b = b;
        let (mut x, mut y) = UnixStream::pair().unwrap();
        let fwd = std::thread::spawn(move || {
            let mut vm = Vm::new(dst_cfg).unwrap();
            vm.receive_migration(&mut y)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        let mut buf = vec![0u8; 5 << 20];
        let _ = std::io::Read::read_exact(&mut b, &mut buf);
        let _ = std::io::Write::write_all(&mut x, &buf);
        drop(x);
        drop(b);
        fwd.join().unwrap()
    });
    let e2 = source
        .migrate(a, MigrationParams::default(), &mut |_| {})
        .unwrap_err();
    let dst_err = cut.join().unwrap().unwrap_err();
    assert!(
        dst_err.contains("I/O") || dst_err.contains("ended"),
        "{dst_err}"
    );
    assert!(
        !common::text(&dst_out).contains("round"),
        "nothing ran on the destination"
    );
    eprintln!("source saw: {e2}");

    assert_source_finished(src_thread, &src_out);
}

/// A device that refuses STOP_COPY: the source fails loudly naming the device, rolls
/// back, and the device is back in RUNNING while the guest finishes.
#[test]
fn source_device_refusing_a_state_rolls_back() {
    if !common::kvm_or_skip("source_device_refusing_a_state_rolls_back") {
        return;
    }
    let sample = nestio_emulated::sample::sample_device().unwrap();
    let dev: Arc<dyn VfioDevice> = Arc::new(RefusingStopCopy(sample.clone()));
    let (console, out) = common::console();
    let mut c = VmConfig::new(payloads::SAMPLETEST);
    c.console = console;
    c.cmdline = "mode=migrate rounds=600".into();
    c.devices.push(DeviceConfig::Local {
        name: "refusing-sample".into(),
        device: dev,
    });
    let (source, src_thread) = start_source(c, &out, "round 100", Duration::from_secs(60));
    let (a, mut b) = UnixStream::pair().unwrap();
    let sink = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut b, &mut v);
    });
    let e = source
        .migrate(a, MigrationParams::default(), &mut |_| {})
        .unwrap_err();
    assert!(e.to_string().contains("refusing-sample"), "{e}");
    assert!(e.to_string().contains("STOP_COPY"), "{e}");
    assert_eq!(sample.mig_state().unwrap(), MigState::Running);
    assert_source_finished(src_thread, &out);
    sink.join().unwrap();
}

/// A sample device whose STOP_COPY arc fails (as a device with a fault would).
struct RefusingStopCopy(Arc<nestio_emulated::sample::SampleDevice>);

impl VfioDevice for RefusingStopCopy {
    fn info(&self) -> nestio_device_model::DeviceInfo {
        self.0.info()
    }
    fn region_info(&self, i: u32) -> nestio_device_model::Result<nestio_device_model::RegionInfo> {
        self.0.region_info(i)
    }
    fn region_read(&self, i: u32, o: u64, b: &mut [u8]) -> nestio_device_model::Result<()> {
        self.0.region_read(i, o, b)
    }
    fn region_write(&self, i: u32, o: u64, d: &[u8]) -> nestio_device_model::Result<()> {
        self.0.region_write(i, o, d)
    }
    fn irq_info(&self, i: u32) -> nestio_device_model::Result<nestio_device_model::IrqInfo> {
        self.0.irq_info(i)
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
    fn reset(&self) -> nestio_device_model::Result<()> {
        self.0.reset()
    }
    fn dma_port(&self) -> Option<&nestio_device_model::DmaPort> {
        self.0.dma_port()
    }
    fn migration_flags(&self) -> Option<nestio_device_model::MigrationFlags> {
        self.0.migration_flags()
    }
    fn mig_state(&self) -> nestio_device_model::Result<MigState> {
        self.0.mig_state()
    }
    fn mig_set_state(&self, t: MigState) -> nestio_device_model::Result<MigState> {
        if t == MigState::StopCopy {
            return Err(nestio_device_model::DeviceError::Invalid(
                "injected STOP_COPY failure".into(),
            ));
        }
        self.0.mig_set_state(t)
    }
    fn mig_data_read(&self, b: &mut [u8]) -> nestio_device_model::Result<usize> {
        self.0.mig_data_read(b)
    }
    fn mig_data_write(&self, d: &[u8]) -> nestio_device_model::Result<()> {
        self.0.mig_data_write(d)
    }
}

/// The seed corpus of `fuzz/fuzz_targets/vm_migration.rs` is what the real encoders
/// write today: a format change that leaves the seeds stale fails here. With
/// `NESTIO_WRITE_FUZZ_SEEDS=1` the seeds are (re)written instead
/// (`NESTIO_WRITE_FUZZ_SEEDS=1 cargo test -p nestio-vmm --test migration fuzz_seeds`).
#[test]
fn fuzz_seeds_are_the_encoders_output() {
    let write = std::env::var("NESTIO_WRITE_FUZZ_SEEDS").as_deref() == Ok("1");
    use nestio_vmm::migration::format::{StreamWriter, Tag};
    use nestio_vmm::migration::state;
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/vm_migration");
    if write {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let mut vcpu = nestio_vmm::vcpu::VcpuMigState::default();
    vcpu.regs.rip = 0x20_0000;
    vcpu.msrs.push(kvm_bindings::kvm_msr_entry {
        index: 0x10,
        data: 5,
        ..Default::default()
    });
    let cfg = state::MachineConfig {
        memory: 64 << 20,
        cpus: 1,
        devices: vec![(1, 0x1b36, 0x7e57)],
    };
    let pci = nestio_vmm::pci::assigned::PciMigState {
        shadow: vec![0; 256],
        virt: (0..256).map(|i| (0x10..0x28).contains(&i)).collect(),
        command: 6,
        msix: vec![[0xfee0_0000, 0, 0x41, 0]; 2],
    };
    let mut chips = state::PlatformState::default();
    for (i, c) in chips.irqchips.iter_mut().enumerate() {
        c.chip_id = i as u32;
    }
    let mut ram = 0x1000u64.to_le_bytes().to_vec();
    ram.extend(vec![0xa5; 4096]);
    let serial = vm_superio::serial::SerialState {
        in_buffer: b"hi".to_vec(),
        ..Default::default()
    };
    type Sections = Vec<(Tag, u32, Vec<u8>)>;
    let sections: Vec<(&str, Sections)> = vec![
        ("header_only", vec![]),
        ("config", vec![(Tag::Config, 0, cfg.encode())]),
        ("ram", vec![(Tag::Ram, 0, ram)]),
        ("vcpu", vec![(Tag::Vcpu, 0, state::encode_vcpu(&vcpu))]),
        ("pci", vec![(Tag::Pci, 1, state::encode_pci(&pci))]),
        (
            "platform",
            vec![
                (Tag::Irqchip, 0, chips.encode_irqchip()),
                (
                    Tag::Pit,
                    0,
                    vec![0; std::mem::size_of::<kvm_bindings::kvm_pit_state2>()],
                ),
                (
                    Tag::Clock,
                    0,
                    vec![0; std::mem::size_of::<kvm_bindings::kvm_clock_data>()],
                ),
                (Tag::Serial, 0, state::encode_serial(&serial)),
            ],
        ),
        (
            "device_end",
            vec![
                (Tag::DeviceData, 1, vec![1, 2, 3]),
                (Tag::DeviceEnd, 1, vec![]),
                (Tag::End, 0, vec![]),
            ],
        ),
    ];
    for (name, secs) in sections {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        for (t, i, p) in secs {
            w.section(t, i, &p).unwrap();
        }
        let path = dir.join(name);
        if write {
            std::fs::write(&path, w.get_mut()).unwrap();
        } else {
            let committed = std::fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (write the seeds: see this test's doc)",
                    path.display()
                )
            });
            assert!(
                committed == *w.get_mut(),
                "{} is stale: the encoders now write something else; rewrite the seeds \
                 with NESTIO_WRITE_FUZZ_SEEDS=1 (see this test's doc)",
                path.display()
            );
        }
    }
}

/// A Linux guest pinging 10.0.2.2 every 200 ms through Linux's e1000 driver on an e1000
/// device process is migrated mid-ping to a new VMM with a new e1000 process: the
/// console goes on on the destination, at most the downtime's worth of sequence numbers
/// is lost, and the driver reports no error or reset.
#[test]
fn linux_ping_migrates_to_a_new_vmm_and_e1000() {
    let name = "linux_ping_migrates_to_a_new_vmm_and_e1000";
    if !common::kvm_or_skip(name) {
        return;
    }
    let Some((kernel, initrd)) = common::guest_linux(name) else {
        return;
    };
    const COUNT: u32 = 60;
    let src_dev = DeviceProcess::start("e1000");
    let dst_dev = DeviceProcess::start("e1000");
    let mk = |sock: &std::path::Path| {
        let (console, buf) = common::console();
        let mut cfg = VmConfig::linux(kernel.clone(), Some(initrd.clone()));
        cfg.console = console;
        cfg.cmdline = format!(
            "{} nestio.count={COUNT}",
            nestio_vmm::default_linux_cmdline()
        );
        cfg.devices.push(DeviceConfig::VfioUser {
            socket: sock.to_path_buf(),
        });
        (cfg, buf)
    };
    let (src_cfg, src_out) = mk(&src_dev.socket);
    let (dst_cfg, dst_out) = mk(&dst_dev.socket);
    let (source, src_thread) =
        start_source(src_cfg, &src_out, "icmp_seq=10 ", Duration::from_secs(400));

    let (a, mut b) = UnixStream::pair().unwrap();
    let dst_thread = std::thread::spawn(move || {
        let mut vm = Vm::new(dst_cfg).unwrap();
        vm.receive_migration(&mut b).map_err(|e| e.to_string())?;
        vm.run().map_err(|e| e.to_string())
    });
    let report = source
        .migrate(a, MigrationParams::default(), &mut |p| eprintln!("{p}"))
        .expect("migration");
    eprintln!("{report}");
    src_thread.join().unwrap().unwrap();
    let dst_report = dst_thread.join().unwrap().expect("destination");
    let src_text = common::text(&src_out);
    let dst_text = common::text(&dst_out);
    eprintln!("--- destination console ---\n{dst_text}");
    let seqs = |t: &str| -> Vec<u32> {
        t.lines()
            .filter_map(|l| l.split("icmp_seq=").nth(1))
            .filter_map(|r| r.split_whitespace().next()?.parse().ok())
            .collect()
    };
    let (before, after) = (seqs(&src_text), seqs(&dst_text));
    let last_src = *before.iter().max().unwrap();
    let first_dst = *after.iter().min().expect("the destination answered pings");
    assert!(
        after.iter().all(|&s| s > last_src),
        "{before:?} then {after:?}"
    );
    let lost = COUNT - (before.len() + after.len()) as u32;
    let allowed = (report.downtime.as_millis() / 200) as u32 + 2;
    eprintln!(
        "seq {last_src} on the source, {first_dst} first on the destination; {lost} lost, downtime {} ms",
        report.downtime.as_millis()
    );
    assert!(
        lost <= allowed,
        "{lost} replies lost (allowed {allowed})\n{dst_text}"
    );
    for bad in [
        "Hardware Error",
        "Reset adapter",
        "TX Unit Hang",
        "NETDEV WATCHDOG",
        "WARNING",
        "Oops",
    ] {
        assert!(
            !dst_text.contains(bad) && !src_text.contains(bad),
            "{bad}: {dst_text}"
        );
    }
    assert!(dst_text.contains("NESTIO-INIT: exit"), "{dst_text}");
    assert!(
        matches!(
            dst_report.outcome,
            StopReason::GuestExit(0) | StopReason::GuestExit(1)
        ),
        "{dst_report:?}"
    );
}

/// The destination dies in stop-and-copy: it reads the whole stream, up to the end
/// marker, and closes without answering. The source must not take that for success:
/// it rolls back, and the guest (paused meanwhile) runs on to a verified end.
#[test]
fn destination_dying_in_stop_and_copy_rolls_back() {
    if !common::kvm_or_skip("destination_dying_in_stop_and_copy_rolls_back") {
        return;
    }
    use nestio_vmm::migration::format::{StreamReader, Tag};
    let src_dev = DeviceProcess::start("sample");
    let (src_cfg, src_out) = cfg(&src_dev.socket, 800, 2);
    let (source, src_thread) =
        start_source(src_cfg, &src_out, "round 100", Duration::from_secs(60));
    let (a, b) = UnixStream::pair().unwrap();
    let dst = std::thread::spawn(move || {
        let mut r = StreamReader::new(b).unwrap();
        let mut tags = Vec::new();
        loop {
            let s = r.next_section().unwrap();
            tags.push(s.tag);
            if s.tag == Tag::End {
                return tags; // dies here: no answer
            }
        }
    });
    let e = source
        .migrate(a, MigrationParams::default(), &mut |_| {})
        .unwrap_err();
    let tags = dst.join().unwrap();
    for t in [
        Tag::Config,
        Tag::Ram,
        Tag::DeviceData,
        Tag::DeviceEnd,
        Tag::Pci,
        Tag::Vcpu,
        Tag::Irqchip,
        Tag::Pit,
        Tag::Clock,
        Tag::Serial,
    ] {
        assert!(tags.contains(&t), "{t:?} missing from the stream");
    }
    assert_eq!(
        tags.iter().filter(|&&t| t == Tag::Vcpu).count(),
        2,
        "both vCPUs"
    );
    assert!(matches!(e, MigrationError::Format(_)), "{e}");
    assert!(!source.migrated());
    assert_source_finished(src_thread, &src_out);
}

/// Benchmark: an idle 256 MiB guest (waiting for an interrupt) and one dirtying memory
/// by DMA and CPU at a steady rate, each migrated in this run; prints total time,
/// downtime, bytes and passes (`-- --nocapture`). Checks what must hold whatever the
/// host's speed: the idle guest sends little more than its RAM once.
#[test]
fn migration_benchmark_idle_and_dirtying_256m() {
    if !common::kvm_or_skip("migration_benchmark_idle_and_dirtying_256m") {
        return;
    }
    let mut rows = Vec::new();
    for (label, mode, marker) in [
        ("idle", "mode=halt", "waiting"),
        ("dirtying", "mode=migrate rounds=100000", "round 100"),
    ] {
        let src_dev = DeviceProcess::start("sample");
        let dst_dev = DeviceProcess::start("sample");
        let mk = |sock: &std::path::Path| {
            let (mut c, buf) = cfg(sock, 0, 1);
            c.memory = 256 << 20;
            c.cmdline = mode.into();
            (c, buf)
        };
        let (src_cfg, src_out) = mk(&src_dev.socket);
        let (dst_cfg, _dst_out) = mk(&dst_dev.socket);
        let (source, src_thread) = start_source(src_cfg, &src_out, marker, Duration::from_secs(60));
        let (a, mut b) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dst_thread = std::thread::spawn(move || {
            let mut vm = Vm::new(dst_cfg).unwrap();
            vm.receive_migration(&mut b).unwrap();
            let h = vm.handle();
            tx.send(h).unwrap();
            vm.run().unwrap()
        });
        let report = source
            .migrate(a, MigrationParams::default(), &mut |_| {})
            .expect("migration");
        src_thread.join().unwrap().unwrap();
        let h = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        h.stop();
        dst_thread.join().unwrap();
        rows.push((label, report));
    }
    eprintln!("guest      total ms  downtime ms  MiB sent  passes");
    for (label, r) in &rows {
        eprintln!(
            "{label:<10} {:>8} {:>12} {:>9.1} {:>7}",
            r.total.as_millis(),
            r.downtime.as_millis(),
            r.bytes as f64 / (1 << 20) as f64,
            r.passes
        );
    }
    let idle = &rows[0].1;
    assert!(
        idle.bytes >= 256 << 20 && idle.bytes < (256 + 16) << 20,
        "{idle:?}"
    );
    assert_eq!(idle.passes, 1, "{idle:?}");
}
