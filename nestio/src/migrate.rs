//! `nestio status|stop|migrate --vm CONTROL_SOCKET`: talk to a running `nestio run
//! --control CONTROL_SOCKET` (see `nestio_vmm::control`).

use std::path::PathBuf;

use nestio_vmm::control;
use nestio_vmm::migration::addr::MigrationAddr;

use crate::CmdResult;

/// `nestio status` / `nestio stop`.
#[derive(clap::Args, Debug)]
pub struct VmArgs {
    /// The VM's control socket (`nestio run --control PATH`).
    #[arg(long = "vm", value_name = "CONTROL_SOCKET")]
    vm: PathBuf,
}

/// `nestio migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The VM's control socket (`nestio run --control PATH`).
    #[arg(long = "vm", value_name = "CONTROL_SOCKET")]
    vm: PathBuf,
    /// The destination (`nestio run ... --migrate-listen ADDR`): unix:PATH, a path, or
    /// tcp:HOST:PORT.
    #[arg(long = "to", value_name = "ADDR")]
    to: MigrationAddr,
    /// Stop-and-copy once the remaining dirty memory is expected to take at most this.
    #[arg(long = "downtime-ms", default_value_t = 300)]
    downtime_ms: u64,
}

/// `nestio status --vm PATH`.
pub fn status(a: VmArgs) -> CmdResult {
    let r = control::request(&a.vm, "status", None, &mut |l| println!("{l}"))?;
    println!("{r}");
    Ok(0)
}

/// `nestio stop --vm PATH`.
pub fn stop(a: VmArgs) -> CmdResult {
    control::request(&a.vm, "stop", None, &mut |l| println!("{l}"))?;
    println!("stop requested");
    Ok(0)
}

/// `nestio migrate --vm PATH --to ADDR`: connect to the destination here and hand the
/// connection to the VMM, which streams the VM into it and reports progress.
pub fn migrate(a: MigrateArgs) -> CmdResult {
    let stream = a.to.connect()?;
    let r = control::request(
        &a.vm,
        &format!("migrate {}", a.downtime_ms),
        Some(stream.into_fd()),
        &mut |l| println!("{}", l.strip_prefix("progress ").unwrap_or(l)),
    )?;
    println!("{r}");
    Ok(0)
}
