//! `nestio demo`: the main job on a built-in default. An e1000 is served by a separate
//! `nestio device` process on the built-in user network; a KVM guest gets it assigned as
//! a PCI function, and the guest's own driver pings the gateway over it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use nestio_vmm::{ConsoleOutput, DeviceConfig, VmConfig};

use crate::CmdResult;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Interrupt mode of the guest driver: msi or intx.
    #[arg(long, default_value = "msi", value_parser = ["msi", "intx"])]
    irq: String,
    /// Keep the device's traffic in this pcap file.
    #[arg(long)]
    pcap: Option<PathBuf>,
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

fn wait_for(path: &Path, child: &mut Child) -> Result<(), String> {
    let t0 = Instant::now();
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("the device process exited early ({st})"));
        }
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(format!("{} did not appear within 20 s", path.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

pub fn run(args: DemoArgs) -> CmdResult {
    let exe = std::env::current_exe()?;
    let socket = std::env::temp_dir().join(format!("nestio-demo-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    println!(
        "nestio demo: an e1000 emulated in one process, passed through to a KVM guest in another"
    );
    let mut cmd = Command::new(&exe);
    cmd.args(["device", "e1000", "--net", "user", "--once", "--socket"])
        .arg(&socket)
        .stdin(Stdio::null());
    if let Some(p) = &args.pcap {
        cmd.arg("--pcap").arg(p);
    }
    let child = cmd.spawn()?;
    let mut dev = DeviceProcess {
        child,
        socket: socket.clone(),
    };
    println!(
        "[1] device process (pid {}): `nestio device e1000 --net user --socket {}`",
        dev.child.id(),
        socket.display()
    );
    wait_for(&socket, &mut dev.child)?;

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
    let text =
        String::from_utf8_lossy(&console.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
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
