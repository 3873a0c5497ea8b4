//! `nestio run`: a KVM guest with devices passed through as PCI functions. The guest
//! is a built-in or given `no_std` payload (`--guest`) or a Linux kernel (`--kernel`,
//! `--initrd`, `--cmdline`).

use std::path::PathBuf;

use clap::Args;
use nestio_vmm::{CpuModel, DeviceConfig, VmConfig};

use crate::CmdResult;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest payload: a static x86-64 ELF, or the name of a built-in payload
    /// (hello, cputest, pcitest, sampletest, e1000ping).
    #[arg(long, required_unless_present = "kernel", conflicts_with = "kernel")]
    guest: Option<String>,
    /// Boot this Linux kernel instead of a payload (a vmlinux with a PVH note, or a
    /// bzImage; linux/build.sh builds one and prints its path).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial RAM disk for --kernel (e.g. linux/build.sh's initramfs.cpio).
    #[arg(long, requires = "kernel", conflicts_with = "guest")]
    initrd: Option<PathBuf>,
    /// Guest RAM (e.g. 64M, 1G; default 64M for a payload, 128M for --kernel).
    #[arg(long, value_parser = parse_memory)]
    memory: Option<u64>,
    /// A device to assign: `vfio-user=SOCKET` (repeatable; PCI slots in order).
    #[arg(long = "device", value_parser = parse_device)]
    devices: Vec<PathBuf>,
    /// CPU model: `host`, `split-lock-detect=on|off`, `+split-lock-detect`,
    /// `-split-lock-detect`.
    #[arg(long, default_value = "host")]
    cpu: CpuModel,
    /// Command line passed to the payload, or the kernel command line (default for
    /// --kernel: "console=ttyS0 reboot=k noapic noxsave clearcpuid=smap,popcnt
    /// nestio.mode=ping").
    #[arg(long)]
    cmdline: Option<String>,
}

fn parse_memory(s: &str) -> Result<u64, String> {
    nestio_vmm::parse_size(s).map_err(|e| e.to_string())
}

fn parse_device(s: &str) -> Result<PathBuf, String> {
    match s.split_once('=') {
        Some(("vfio-user", path)) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(format!(
            "device '{s}' is not understood: use vfio-user=PATH (the socket of `nestio device ...`)"
        )),
    }
}

/// The path of a built-in payload, or `name` itself.
pub fn payload_path(name: &str) -> PathBuf {
    use nestio_vmm::payloads as p;
    PathBuf::from(match name {
        "hello" => p::HELLO,
        "cputest" => p::CPUTEST,
        "pcitest" => p::PCITEST,
        "sampletest" => p::SAMPLETEST,
        "e1000ping" => p::E1000PING,
        other => other,
    })
}

pub fn run(args: RunArgs) -> CmdResult {
    Ok(nestio_vmm::run(config(args)?)?)
}

/// The VM config of `nestio run` (also used by `nestio demo --linux`).
pub fn config(args: RunArgs) -> Result<VmConfig, String> {
    let mut cfg = match (&args.kernel, &args.guest) {
        (Some(kernel), _) => VmConfig::linux(kernel, args.initrd.clone()),
        (None, Some(guest)) => VmConfig::new(payload_path(guest)),
        (None, None) => return Err("give --guest PAYLOAD or --kernel VMLINUX".into()),
    };
    if let Some(m) = args.memory {
        cfg.memory = m;
    }
    if let Some(c) = args.cmdline {
        cfg.cmdline = c;
    }
    cfg.cpu = args.cpu;
    cfg.handle_sigint = true;
    cfg.devices = args
        .devices
        .into_iter()
        .map(|socket| DeviceConfig::VfioUser { socket })
        .collect();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use nestio_vmm::Boot;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<VmConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        config(cli.run)
    }

    #[test]
    fn kernel_gets_linux_defaults() {
        let cfg = parse(&["--kernel", "/k/vmlinux", "--initrd", "/k/initramfs.cpio"]).unwrap();
        assert_eq!(
            cfg.boot,
            Boot::Linux {
                kernel: "/k/vmlinux".into(),
                initrd: Some("/k/initramfs.cpio".into()),
            }
        );
        assert_eq!(cfg.memory, 128 << 20);
        assert_eq!(
            cfg.cmdline,
            "console=ttyS0 reboot=k noapic noxsave clearcpuid=smap,popcnt nestio.mode=ping"
        );
        let cfg = parse(&[
            "--kernel",
            "/k/vmlinux",
            "--memory",
            "256M",
            "--cmdline",
            "console=ttyS0 nestio.mode=boot",
            "--device",
            "vfio-user=/tmp/e.sock",
        ])
        .unwrap();
        assert_eq!(cfg.memory, 256 << 20);
        assert_eq!(cfg.cmdline, "console=ttyS0 nestio.mode=boot");
        assert_eq!(cfg.devices.len(), 1);
        assert!(matches!(cfg.boot, Boot::Linux { initrd: None, .. }));
    }

    #[test]
    fn payload_keeps_its_defaults_and_options_conflict() {
        let cfg = parse(&["--guest", "hello"]).unwrap();
        assert_eq!(cfg.boot, Boot::Payload(nestio_vmm::payloads::HELLO.into()));
        assert_eq!((cfg.memory, cfg.cmdline.as_str()), (64 << 20, ""));
        assert!(parse(&[]).is_err(), "--guest or --kernel is required");
        assert!(parse(&["--guest", "hello", "--kernel", "/k"]).is_err());
        assert!(parse(&["--guest", "hello", "--initrd", "/rd"]).is_err());
    }
}
