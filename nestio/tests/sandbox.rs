//! The seccomp sandbox of `nestio device` and `nestio run` as a user meets it: a system
//! call outside the allowlist ends that process — only that process — with one line
//! naming the call, while the same processes serve and run guests normally with the
//! sandbox on (the default).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nestio_device_model::VfioDevice;
use nestio_sandbox::{BLOCKED_EXIT_STATUS, BLOCKED_MESSAGE};

fn socket(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("nestio-sandbox-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn nestio() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nestio"));
    c.stdin(Stdio::null());
    c
}

/// The one report line of a blocked call in `stderr`.
fn report_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(BLOCKED_MESSAGE))
        .collect();
    assert_eq!(lines.len(), 1, "one report expected in: {stderr}");
    lines[0]
}

fn kvm_or_skip(name: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{name}: /dev/kvm is missing in CI"
    );
    eprintln!("SKIP: {name}: /dev/kvm is missing on this machine (KVM tests need it)");
    false
}

struct Device {
    child: Child,
    path: PathBuf,
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_sample(tag: &str) -> Device {
    serve_sample_with(tag, &[])
}

fn serve_sample_with(tag: &str, extra: &[&str]) -> Device {
    let path = socket(tag);
    let child = nestio()
        .args(["device", "sample", "--once"])
        .args(extra)
        .arg("--socket")
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nestio device");
    let mut d = Device { child, path };
    let t0 = Instant::now();
    while !common::listening(d.child.id(), &d.path) {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!("nestio device exited before listening: {st}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    d
}

#[test]
fn forbidden_call_ends_only_the_device_process_with_its_name() {
    let path = socket("forbidden");
    let out: Output = nestio()
        .args([
            "device",
            "sample",
            "--seccomp-test-forbidden-call",
            "--socket",
        ])
        .arg(&path)
        .output()
        .expect("run nestio device");
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(BLOCKED_EXIT_STATUS), "{stderr}");
    assert!(
        stderr.contains("nestio: serving on"),
        "it got past set-up: {stderr}"
    );
    assert_eq!(
        report_line(&stderr),
        format!(
            "nestio: system call 59 (execve) {BLOCKED_MESSAGE} (device filter); rerun with \
             --seccomp=log to find it"
        )
    );

    // Without the sandbox the same call goes through: the process becomes /bin/true.
    let out = nestio()
        .args([
            "device",
            "sample",
            "--seccomp=off",
            "--seccomp-test-forbidden-call",
            "--socket",
        ])
        .arg(&path)
        .output()
        .expect("run nestio device");
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains(BLOCKED_MESSAGE));

    // This process (the parent) is unaffected, and a sandboxed device still serves it.
    let dev = serve_sample("serves");
    let client = nestio_vfio_user::Client::connect(&dev.path).expect("connect");
    let info = client.info();
    assert!(info.num_regions > 0, "{info:?}");
    drop(client);
}

#[test]
fn forbidden_call_in_the_vcpu_thread_ends_the_vmm_with_its_name() {
    if !kvm_or_skip("forbidden_call_in_the_vcpu_thread_ends_the_vmm_with_its_name") {
        return;
    }
    let out = nestio()
        .args(["run", "--guest", "hello", "--seccomp-test-forbidden-call"])
        .output()
        .expect("run nestio run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(BLOCKED_EXIT_STATUS), "{stderr}");
    assert_eq!(
        report_line(&stderr),
        format!(
            "nestio: system call 59 (execve) {BLOCKED_MESSAGE} (vcpu filter); rerun with \
             --seccomp=log to find it"
        )
    );
    // The guest never ran: the vCPU thread was stopped before its first KVM_RUN.
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("hello"),
        "{out:?}"
    );
}

#[test]
fn a_guest_runs_with_every_thread_sandboxed_and_in_log_mode() {
    if !kvm_or_skip("a_guest_runs_with_every_thread_sandboxed_and_in_log_mode") {
        return;
    }
    for mode in ["on", "log", "off"] {
        let dev = serve_sample(&format!("run-{mode}"));
        let out = nestio()
            .args(["run", "--guest", "sampletest", "--console-input", "none"])
            .arg(format!("--seccomp={mode}"))
            .arg("--device")
            .arg(format!("vfio-user={}", dev.path.display()))
            .output()
            .expect("run nestio run");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "--seccomp={mode}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("dma status 0x2"),
            "--seccomp={mode}: {stdout}"
        );
        assert!(!stderr.contains(BLOCKED_MESSAGE), "{stderr}");
    }
    let e = nestio()
        .args(["run", "--guest", "hello", "--seccomp=trap"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success());
    assert!(
        stderr.contains("on (trap forbidden calls, the default)"),
        "{stderr}"
    );
}

/// The `Name:` line of `/proc/PID/status`, whitespace-collapsed.
fn status_line(pid: u32, name: &str) -> String {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find(|l| l.starts_with(name))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[test]
fn device_gives_up_root_and_is_confined_after_set_up() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIP: device_gives_up_root_and_is_confined_after_set_up: needs root to switch users"
        );
        return;
    }
    let dev = serve_sample_with("user", &["--user", "65534"]);
    let pid = dev.child.id();
    assert_eq!(status_line(pid, "Uid:"), "Uid: 65534 65534 65534 65534");
    assert_eq!(status_line(pid, "Gid:"), "Gid: 65534 65534 65534 65534");
    assert_eq!(status_line(pid, "Groups:"), "Groups: 65534");
    assert_eq!(status_line(pid, "NoNewPrivs:"), "NoNewPrivs: 1");
    assert_eq!(status_line(pid, "Seccomp:"), "Seccomp: 2", "filter mode");
    // Still a working device for its (root) client.
    let client = nestio_vfio_user::Client::connect(&dev.path).expect("connect");
    assert!(client.info().num_regions > 0);
    drop(client);

    // The default: root stays root (nothing asked), and the filter is on.
    let dev = serve_sample("root");
    assert_eq!(status_line(dev.child.id(), "Uid:"), "Uid: 0 0 0 0");
    assert_eq!(status_line(dev.child.id(), "Seccomp:"), "Seccomp: 2");
    let dev = serve_sample_with("off", &["--seccomp=off"]);
    assert_eq!(status_line(dev.child.id(), "Seccomp:"), "Seccomp: 0");

    let out = nestio()
        .args([
            "device",
            "sample",
            "--user",
            "no-such-user-nestio",
            "--socket",
            "/tmp/x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no such user"),
        "{out:?}"
    );
}

/// (thread name, number of seccomp filters) of every thread of `pid`.
fn thread_filters(pid: u32) -> Vec<(String, u32)> {
    let mut v = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return v;
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let filters = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        v.push((name.trim().to_string(), filters));
    }
    v.sort();
    v
}

#[test]
fn every_thread_of_an_exporting_level_is_confined() {
    if !kvm_or_skip("every_thread_of_an_exporting_level_is_confined") {
        return;
    }
    let dev = serve_sample("level-dev");
    let export = socket("level-export");
    let mut level = Device {
        child: nestio()
            .args(["run", "--guest", "hello", "--console-input", "none"])
            .arg("--device")
            .arg(format!("vfio-user={}", dev.path.display()))
            .arg("--export")
            .arg(format!("vfio-user={}", export.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the level"),
        path: export.clone(),
    };
    // Its guest exits at once; the level then waits for its child with the control
    // loop's filter on the main thread, beside the export threads and the client's.
    let pid = level.child.id();
    let t0 = Instant::now();
    let threads = loop {
        let threads = thread_filters(pid);
        let main = threads.iter().find(|(n, _)| n == "nestio").map(|t| t.1);
        if main == Some(3) && threads.iter().any(|(n, _)| n == "export") {
            break threads;
        }
        if let Ok(Some(st)) = level.child.try_wait() {
            panic!("the level exited early: {st}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the level never reached its waiting state: {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for (name, filters) in &threads {
        match name.as_str() {
            // The process-wide VMM filter (with its clone3 companion) plus the thread's own.
            "nestio" | "export" | "export-mem" => assert_eq!(*filters, 3, "{threads:?}"),
            // KVM's own worker (`kvm-nx-lpage-recovery`), started by the vCPU's first
            // KVM_RUN, copies that thread's filters.
            n if n.starts_with("kvm-") => assert!(*filters >= 1, "{threads:?}"),
            // Started during set-up (the vfio-user client's twin-socket thread):
            // covered by the process-wide filter and its clone3 companion.
            _ => assert_eq!(*filters, 2, "thread {name}: {threads:?}"),
        }
    }
    assert!(
        threads.iter().any(|(n, _)| n == "export-mem"),
        "{threads:?}"
    );
    let _ = level.child.kill();
    let _ = level.child.wait();
    let _ = std::fs::remove_file(nestio_vmm::handoff::mem_socket_path(&export));
}

#[test]
fn a_sandboxed_device_survives_a_client_that_blocks_its_interrupt_fd() {
    use nestio_device_model::{pci_index, IrqAction, IrqData};
    use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
    use nestio_emulated::sample::{cmd, dma_status, regs};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::Arc;

    let mut dev = serve_sample_with("hostile-irq", &[]);
    let c = nestio_vfio_user::Client::connect(&dev.path).expect("connect");
    let w32 = |off: u64, v: u32| {
        c.region_write(pci_index::BAR0, off, &v.to_le_bytes())
            .unwrap()
    };
    let r32 = |off: u64| {
        let mut b = [0u8; 4];
        c.region_read(pci_index::BAR0, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    c.region_write(pci_index::CONFIG, 4, &6u16.to_le_bytes())
        .unwrap();
    let mem = Arc::new(nestio_dma::memfd::sealed_memfd(c"sandbox-test", 0x10000).unwrap());
    c.dma_map(DmaMapRequest {
        range: DmaRange::new(0x10_0000, 0x10000).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: mem.clone(),
            offset: 0,
        },
    })
    .unwrap();
    // SAFETY: eventfd returns a new fd or -1, checked.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: a fresh fd nobody else owns.
    let ev = unsafe { OwnedFd::from_raw_fd(raw) };
    c.set_irqs(
        pci_index::INTX_IRQ,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfd(vec![Some(ev.try_clone().unwrap())]),
    )
    .unwrap();
    // The hostile part: the fd made blocking again and its counter filled, so the
    // device's next interrupt write would wait for ever. The device's watchdog
    // (a thread, a signal handler, a signal) must work inside the sandbox.
    // SAFETY: F_SETFL with an integer argument on a valid fd.
    assert_eq!(unsafe { libc::fcntl(ev.as_raw_fd(), libc::F_SETFL, 0) }, 0);
    let full: u64 = u64::MAX - 1;
    // SAFETY: writes 8 bytes from a local u64.
    let n = unsafe { libc::write(ev.as_raw_fd(), (&full as *const u64).cast(), 8) };
    assert_eq!(n, 8);
    for round in 0..2 {
        w32(regs::DMA_DST_LO, 0x10_0100);
        w32(regs::DMA_DST_HI, 0);
        w32(regs::DMA_LEN, 256);
        w32(regs::DMA_PATTERN, 0x5a5a_5a5a);
        w32(regs::DMA_CMD, cmd::FILL);
        let st = r32(regs::DMA_STATUS);
        assert_eq!(
            st & dma_status::DONE,
            dma_status::DONE,
            "round {round}: {st:#x}"
        );
    }
    assert!(
        dev.child.try_wait().unwrap().is_none(),
        "the device process died"
    );
    drop(c);
    let _ = dev.child.kill();
    let out = dev.child.wait_with_output_stderr();
    assert!(!out.contains(BLOCKED_MESSAGE), "{out}");
}

trait StderrOf {
    fn wait_with_output_stderr(&mut self) -> String;
}

impl StderrOf for Child {
    /// The child's stderr once it has ended (it was spawned with a piped stderr).
    fn wait_with_output_stderr(&mut self) -> String {
        use std::io::Read;
        let _ = self.wait();
        let mut s = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}
