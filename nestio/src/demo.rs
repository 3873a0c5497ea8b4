//! `nestio demo`: the main job on a built-in default. An e1000 is served by a separate
//! `nestio device` process on the built-in user network; a KVM guest gets it assigned as
//! a PCI function, and the guest's own driver pings the gateway over it.
//!
//! `nestio demo --linux` does the same with a real Linux guest: the kernel and initramfs
//! come from `linux/build.sh` (built and cached under `target/linux/` on first use),
//! Linux's own e1000 driver drives the passed-through NIC and the guest's `/init` pings
//! the gateway. The guest has [`LINUX_DEMO_CPUS`] vCPUs: the kernel brings the second
//! up itself (INIT/SIPI through the in-kernel LAPIC) and `/init` reports how many
//! `/proc/cpuinfo` lists. The transcript shows the key console lines with their arrival time on
//! the host clock, measured from VM start, and a summary of boot milestones.

use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use nestio_vmm::{ConsoleOutput, DeviceConfig, VmConfig};

use crate::CmdResult;

/// vCPUs of the `--linux` demo guest.
pub const LINUX_DEMO_CPUS: u8 = 2;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Interrupt mode of the guest driver: msi or intx.
    #[arg(long, default_value = "msi", value_parser = ["msi", "intx"])]
    irq: String,
    /// Keep the device's traffic in this pcap file.
    #[arg(long)]
    pcap: Option<PathBuf>,
    /// Boot a real Linux guest (built by linux/build.sh unless --kernel is given) and
    /// let Linux's own e1000 driver ping the gateway.
    #[arg(long)]
    linux: bool,
    /// With --linux: this kernel instead of linux/build.sh's.
    #[arg(long, requires = "linux")]
    kernel: Option<PathBuf>,
    /// With --linux --kernel: this initramfs.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// With --linux: print every console line, not only the milestones.
    #[arg(long, requires = "linux")]
    full_console: bool,
}

struct DeviceProcess {
    child: Child,
    socket: PathBuf,
}

impl Drop for DeviceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Start `nestio device e1000 --net user` as its own process on a fresh socket and wait
/// until it serves; `step` numbers the transcript line.
fn start_e1000(
    tag: &str,
    pcap: Option<&Path>,
    step: u32,
) -> Result<DeviceProcess, Box<dyn std::error::Error + Send + Sync>> {
    let exe = std::env::current_exe()?;
    let socket = std::env::temp_dir().join(format!("{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new(&exe);
    // MSI on: the demo's guest may use message interrupts (`--irq msi`).
    cmd.args(["device", "e1000", "--net", "user", "--msi", "on", "--once"])
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null());
    if let Some(p) = pcap {
        cmd.arg("--pcap").arg(p);
    }
    let child = cmd.spawn()?;
    let mut dev = DeviceProcess { child, socket };
    println!(
        "[{step}] device process (pid {}): `nestio device e1000 --net user --socket {}`",
        dev.child.id(),
        dev.socket.display()
    );
    wait_for(&dev.socket, &mut dev.child)?;
    Ok(dev)
}

/// Wait until the device process listens on `path` (not merely until the file exists:
/// it appears at bind(), a moment before listen(), and the device serves one client).
fn wait_for(path: &Path, child: &mut Child) -> Result<(), String> {
    let t0 = Instant::now();
    while !nestio_vfio_user::listening(child.id(), path) {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("the device process exited early ({st})"));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "the device process did not listen on {} within 60 s",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

pub fn run(args: DemoArgs) -> CmdResult {
    if args.linux {
        return run_linux(args);
    }
    println!(
        "nestio demo: an e1000 emulated in one process, passed through to a KVM guest in another"
    );
    let dev = start_e1000("nestio-demo", args.pcap.as_deref(), 1)?;
    let socket = dev.socket.clone();

    let console = Arc::new(Mutex::new(Vec::new()));
    let mut cfg = VmConfig::new(nestio_vmm::payloads::E1000PING);
    cfg.memory = 64 << 20;
    cfg.console = ConsoleOutput::Buffer(console.clone());
    cfg.cmdline = format!("irq={}", args.irq);
    cfg.handle_sigint = true;
    cfg.devices = vec![DeviceConfig::VfioUser {
        socket: socket.clone(),
    }];
    println!(
        "[2] VM: 64 MiB guest RAM in a memfd shared with the device (DMA without copies), \
         the e1000 at PCI 00:01.0, guest driver payload `e1000ping` ({} interrupts)",
        args.irq.to_uppercase()
    );
    println!("[3] guest console:");
    let t0 = Instant::now();
    let mut vm = nestio_vmm::Vm::new(cfg)?;
    let report = vm.run()?;
    let elapsed = t0.elapsed();
    let text = String::from_utf8_lossy(&console.lock()).into_owned();
    let tsc_hz = host_tsc_hz();
    for line in text.lines() {
        println!("    | {}", with_time(line, tsc_hz));
    }
    let status = report.exit_status();
    println!(
        "[4] guest finished with status {status} after {:.2} s ({})",
        elapsed.as_secs_f64(),
        if status == 0 {
            "the gateway 10.0.2.2 answered over the passed-through NIC"
        } else {
            "FAILED: see the console above"
        }
    );
    if let Some(p) = &args.pcap {
        println!("    the frames are in {}", p.display());
    }
    drop(dev);
    Ok(status)
}

/// The host's TSC rate, measured over 20 ms (the guest's TSC runs at the same rate).
fn host_tsc_hz() -> f64 {
    // SAFETY: RDTSC has no memory effects.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_millis(20));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    t1.wrapping_sub(t0) as f64 / w0.elapsed().as_secs_f64()
}

/// Append wall time to the guest's "rtt N tsc cycles" figures.
fn with_time(line: &str, tsc_hz: f64) -> String {
    let Some(i) = line.find("rtt ") else {
        return line.to_string();
    };
    let rest = &line[i + 4..];
    let Some(end) = rest.find(" tsc cycles") else {
        return line.to_string();
    };
    match rest[..end].parse::<u64>() {
        Ok(c) if tsc_hz > 0.0 => {
            let cut = i + 4 + end + " tsc cycles".len();
            format!(
                "{} = {:.0} us{}",
                &line[..cut],
                c as f64 / tsc_hz * 1e6,
                &line[cut..]
            )
        }
        _ => line.to_string(),
    }
}

/// linux/build.sh of the source tree this binary was built from.
fn build_script() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../linux/build.sh");
    p.canonicalize().unwrap_or(p)
}

/// Run linux/build.sh (progress on stderr) and return (vmlinux, initramfs).
fn build_linux() -> Result<(PathBuf, PathBuf), String> {
    let script = build_script();
    if !script.exists() {
        return Err(format!(
            "{} not found: run the demo from a nestio source tree, or give --kernel and --initrd",
            script.display()
        ));
    }
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}); see its messages above",
            script.display(),
            out.status
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .ok_or_else(|| format!("{} printed no {key}", script.display()))
    };
    Ok((
        get("NESTIO_LINUX_VMLINUX=")?,
        get("NESTIO_LINUX_INITRAMFS=")?,
    ))
}

/// Console milestones, in host seconds since VM start.
#[derive(Debug, Default, Clone, Copy)]
struct Milestones {
    first_line: Option<f64>,
    e1000_probed: Option<f64>,
    init: Option<f64>,
    first_reply: Option<f64>,
    /// CPUs `/init` found in /proc/cpuinfo.
    cpus_online: Option<u32>,
}

/// Assembles the guest console into lines, timestamps them, prints the interesting
/// ones (or all) and records the milestones.
struct Transcript {
    t0: Instant,
    partial: Vec<u8>,
    full: bool,
    marks: Milestones,
    lines: Vec<String>,
}

impl Transcript {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.partial.clear();
                self.line(line);
            } else if self.partial.len() < 4096 {
                self.partial.push(b);
            }
        }
    }

    fn line(&mut self, line: String) {
        let t = self.t0.elapsed().as_secs_f64();
        let m = &mut self.marks;
        let first = |slot: &mut Option<f64>| {
            if slot.is_none() {
                *slot = Some(t);
            }
        };
        first(&mut m.first_line);
        if line.contains("eth0: Intel(R) PRO/1000 Network Connection") {
            first(&mut m.e1000_probed);
        }
        if line.contains("NESTIO-INIT: start") {
            first(&mut m.init);
        }
        if line.contains(" bytes from ") {
            first(&mut m.first_reply);
        }
        if let Some(rest) = line.split("NESTIO-CPUS: ").nth(1) {
            m.cpus_online = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        }
        if self.full || interesting(&line) {
            println!("    {t:6.2}s | {line}");
        }
        self.lines.push(line);
    }
}

/// Lines of the filtered transcript.
fn interesting(line: &str) -> bool {
    const KEYS: [&str; 17] = [
        "Linux version",
        "smp: Brought up",
        "Command line:",
        "Hypervisor detected",
        "pci 0000:00:0",
        "e1000",
        "Run /init",
        "NESTIO-",
        " bytes from ",
        "packets transmitted",
        "rtt min",
        "no reply",
        "WARNING",
        "BUG",
        "panic",
        "rror",
        "Call Trace",
    ];
    KEYS.iter().any(|k| line.contains(k))
}

fn run_linux(args: DemoArgs) -> CmdResult {
    println!(
        "nestio demo --linux: Linux's own e1000 driver, in a KVM guest, drives an e1000 emulated in another process"
    );
    let (kernel, initrd) = match (&args.kernel, &args.initrd) {
        (Some(k), rd) => {
            println!("[1] guest kernel: {}", k.display());
            (k.clone(), rd.clone())
        }
        (None, _) => {
            println!(
                "[1] guest kernel: building/finding it with {} (the first build installs Debian \
                 packages and compiles Linux 6.1: a few minutes; cached under target/linux/ afterwards)",
                build_script().display()
            );
            let (k, rd) = build_linux()?;
            println!("    kernel {}\n    initramfs {}", k.display(), rd.display());
            (k, Some(rd))
        }
    };

    let dev = start_e1000("nestio-demo-linux", args.pcap.as_deref(), 2)?;
    let socket = dev.socket.clone();

    let mut cfg = VmConfig::linux(&kernel, initrd);
    cfg.cpus = LINUX_DEMO_CPUS;
    let cmdline = cfg.cmdline.clone();
    cfg.handle_sigint = true;
    cfg.devices = vec![DeviceConfig::VfioUser {
        socket: socket.clone(),
    }];
    println!(
        "[3] VM: {} vCPUs (one host thread each, listed in the MP table), {} MiB guest RAM in a \
         memfd shared with the device, the e1000 at PCI 00:01.0 (INTx on 8259 IRQ 11), kernel \
         command line \"{cmdline}\"",
        cfg.cpus,
        cfg.memory >> 20
    );
    println!(
        "    guest console ({}; seconds since VM start on the host clock):",
        if args.full_console {
            "every line"
        } else {
            "milestones only, --full-console for everything"
        }
    );
    let t0 = Instant::now();
    let transcript = Arc::new(Mutex::new(Transcript {
        t0,
        partial: Vec::new(),
        full: args.full_console,
        marks: Milestones::default(),
        lines: Vec::new(),
    }));
    let sink = transcript.clone();
    cfg.console = ConsoleOutput::Callback(Arc::new(move |b: &[u8]| sink.lock().feed(b)));
    let mut vm = nestio_vmm::Vm::new(cfg)?;
    let report = vm.run()?;
    let end = t0.elapsed().as_secs_f64();
    drop(vm);
    drop(dev);
    let tr = transcript.lock();
    let status = report.exit_status();
    let m = tr.marks;
    let show = |what: &str, t: Option<f64>| match (t, m.first_line) {
        (Some(t), Some(f)) => println!(
            "    {what:<34} {t:6.2} s after VM start ({:5.2} s after the first console line)",
            t - f
        ),
        (Some(t), None) => println!("    {what:<34} {t:6.2} s after VM start"),
        (None, _) => println!("    {what:<34}  never"),
    };
    println!("[4] milestones (host clock):");
    show("first kernel console line", m.first_line);
    show("e1000 probed (eth0)", m.e1000_probed);
    show("/init running (NESTIO-INIT: start)", m.init);
    show("first ping reply", m.first_reply);
    show("VM exit", Some(end));
    match m.cpus_online {
        Some(n) => println!(
            "    {:<34} {n} of {LINUX_DEMO_CPUS} (/proc/cpuinfo in the guest)",
            "CPUs online"
        ),
        None => println!("    {:<34} not reported", "CPUs online"),
    }
    let ok = status == 0 && tr.lines.iter().any(|l| l.contains("NESTIO-PING: ok"));
    println!(
        "[5] guest finished with status {status}: {}",
        if ok {
            "Linux's e1000 driver reached the gateway 10.0.2.2 through the out-of-process NIC"
        } else {
            "FAILED: see the console above (--full-console shows every line)"
        }
    );
    if let Some(p) = &args.pcap {
        println!("    the frames are in {}", p.display());
    }
    Ok(if ok { 0 } else { status.max(1) })
}
