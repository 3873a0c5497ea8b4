//! `nestio run`: a KVM guest with devices passed through as PCI functions.

use std::path::PathBuf;

use clap::Args;
use nestio_vmm::{CpuModel, DeviceConfig, VmConfig};

use crate::CmdResult;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest payload: a static x86-64 ELF, or the name of a built-in payload
    /// (hello, cputest, pcitest, sampletest, e1000ping).
    #[arg(long)]
    guest: String,
    /// Guest RAM (e.g. 64M, 1G).
    #[arg(long, default_value = "64M", value_parser = parse_memory)]
    memory: u64,
    /// A device to assign: `vfio-user=SOCKET` (repeatable; PCI slots in order).
    #[arg(long = "device", value_parser = parse_device)]
    devices: Vec<PathBuf>,
    /// CPU model: `host`, `split-lock-detect=on|off`, `+split-lock-detect`,
    /// `-split-lock-detect`.
    #[arg(long, default_value = "host")]
    cpu: CpuModel,
    /// Command line passed to the payload.
    #[arg(long, default_value = "")]
    cmdline: String,
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
    let mut cfg = VmConfig::new(payload_path(&args.guest));
    cfg.memory = args.memory;
    cfg.cpu = args.cpu;
    cfg.cmdline = args.cmdline;
    cfg.handle_sigint = true;
    cfg.devices = args
        .devices
        .into_iter()
        .map(|socket| DeviceConfig::VfioUser { socket })
        .collect();
    Ok(nestio_vmm::run(cfg)?)
}
