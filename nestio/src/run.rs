//! `nestio run`: a KVM guest with devices passed through as PCI functions. The guest
//! is a built-in or given `no_std` payload (`--guest`) or a Linux kernel (`--kernel`,
//! `--initrd`, `--cmdline`).
//!
//! Nesting levels (issue 6), as separate processes:
//! - `--export vfio-user=PATH [--export-window SIZE]` makes this process a level that
//!   passes its one `--device` on to the next level instead of assigning it to its own
//!   guest (as a real L1 binds a device to VFIO for its nested guest). The top SIZE bytes
//!   of this level's guest RAM (default: half, rounded down to 2 MiB) are the nested
//!   guest's window; the device is wrapped in `nestio_nested::ExportedDevice` (every DMA
//!   map of the child is checked against that window; interrupt eventfds pass straight
//!   through to the device process) and served with the vfio-user server on PATH, to
//!   exactly one child session (connections that never complete VERSION do not count).
//!   `PATH.mem` serves the RAM handoff ([`nestio_vmm::handoff`]): the window's memfd, its
//!   file offset and size, and the child's level number, to any number of clients of
//!   this process's uid (the child level, `nestio inspect`). A level with fresh RAM keeps
//!   the window in a memfd of its own, so the child gets its window and nothing else; a
//!   level whose RAM came from its parent hands down that one file (its own RAM).
//!   Several `--device`s are exported only as one FSL-MC container (`nestio device
//!   fsl-mc`'s layout: the DPRC's socket S first, then its objects' `S.<type>.<id>`):
//!   each is wrapped alike and served at PATH and `PATH.<type>.<id>`.
//!   Lifetime: this level's own guest runs as usual; when it has exited the process
//!   keeps serving until its child has connected and gone away, then exits with its own
//!   guest's status (a guest that exits at once, like `--guest hello`, is fine). The
//!   guest must leave the window alone, as an L1 hypervisor's OS would reserve it.
//!   With `--no-shared-memory` the RAM fd is not passed on to the device: the child's
//!   maps become peer mappings and the device's DMA is copied by this level within the
//!   window (exact when the child is the innermost guest). On exit the level prints one
//!   line of counters (`nestio: level N export: maps=.. fd_maps=.. peer_maps=.. copies=..`).
//! - `--memory-from PATH.mem` takes this level's guest RAM from its parent: the window
//!   received by the handoff becomes guest physical `0..size` (the RAM size is the
//!   window size, so `--memory` is refused), and DMA maps name the same file and
//!   offsets, which the parent's exporter checks. A level can hand down only memory it
//!   owns: combine `--memory-from` with `--export` for deeper stacks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use nestio_nested::{ExportConfig, ExportedDevice, LevelId, LevelRam, RamRegion, Window};
use nestio_sandbox::Profile;
use nestio_vmm::handoff::{mem_socket_path, RamHandoff};
use nestio_vmm::serial_input::ConsoleInput;
use nestio_vmm::{CpuModel, DeviceConfig, RamFile, ThreadHooks, ThreadRole, Vm, VmConfig};

use crate::CmdResult;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Guest payload: a static x86-64 ELF, or the name of a built-in payload
    /// (hello, cputest, pcitest, sampletest, e1000ping, smptest).
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
    /// A device to assign: `vfio-user=SOCKET[,posted-writes=on|off][,posted-ring=on|off]`
    /// (repeatable; PCI slots in order). Posted writes (default on): guest MMIO writes to
    /// the device's memory BARs do not wait for the device's reply; with a nestio device
    /// server they go through a shared-memory ring, not a message each (posted-ring,
    /// default on).
    #[arg(long = "device", value_parser = parse_device_config)]
    devices: Vec<DeviceConfig>,
    /// CPU model: `host`, `split-lock-detect=on|off`, `+split-lock-detect`,
    /// `-split-lock-detect`.
    #[arg(long, default_value = "host")]
    cpu: CpuModel,
    /// Number of vCPUs (1 to 32; local APIC IDs 0..N-1, one host thread each). A Linux
    /// guest brings the others up itself (INIT/SIPI); the `smptest` payload does it
    /// when given `--cmdline cpus=N`.
    #[arg(long, default_value = "1", value_parser = parse_cpus)]
    cpus: u8,
    /// Interrupt controller: `x86` (KVM's IOAPIC/PIC/LAPIC) or `xive` (the XIVE model:
    /// H_INT_* hypercalls, ESB/TIMA MMIO, notifications as vector 0x3E; see the
    /// `xivetest` payload).
    #[arg(long, default_value = "x86", value_parser = parse_irqchip)]
    irqchip: nestio_vmm::irqchip::IrqChipKind,
    /// Command line passed to the payload, or the kernel command line (default for
    /// --kernel: "console=ttyS0 reboot=k noapic noxsave clearcpuid=smap,popcnt
    /// nestio.mode=ping").
    #[arg(long)]
    cmdline: Option<String>,
    /// Pass this level's (single) --device on to the next nesting level, served over
    /// vfio-user at `vfio-user=PATH`; the RAM handoff is served on `PATH.mem`. The
    /// device is then not assigned to this level's own guest.
    #[arg(long, value_parser = parse_device)]
    export: Option<PathBuf>,
    /// Size of the nested guest's window: the top SIZE bytes of this level's RAM
    /// (multiple of 2 MiB, at least 4M, less than the RAM; default: half the RAM).
    #[arg(long, value_parser = parse_memory, requires = "export")]
    export_window: Option<u64>,
    /// Never pass this level's RAM fd down to the device: the exported device's DMA
    /// arrives here as messages (DMA_READ/WRITE) and is copied within the child's window.
    /// Exact for a level whose child is the innermost guest.
    #[arg(long, requires = "export")]
    no_shared_memory: bool,
    /// BAR channels (`on`, the default): as an exporting level, pass the device's BAR
    /// channel grants down to the child (and revoke them when its session ends, on a
    /// device reset, or while the device is migrating); as the innermost level (with
    /// --memory-from and no --export), ask for one, so the guest's BAR accesses skip
    /// the exporting levels (configuration space, interrupts and DMA still pass them).
    #[arg(long, default_value = "on", value_parser = crate::channel::parse_on_off, action = clap::ArgAction::Set)]
    bar_channel: bool,
    /// Test only: an exporting level revokes its BAR channel grants when its child's
    /// N-th SET_IRQS arrives.
    #[arg(long, hide = true, requires = "export")]
    bar_channel_test_revoke_at_set_irqs: Option<u64>,
    /// Take guest RAM from the parent level's memory socket (`PATH.mem` of the parent's
    /// `--export vfio-user=PATH`); the RAM size is the parent's window.
    #[arg(long, conflicts_with = "memory")]
    memory_from: Option<PathBuf>,
    /// What the guest's serial console receives: `stdin` (this process's standard
    /// input; a terminal is switched to raw mode while the VM runs, Ctrl-C still stops
    /// it), `none`, or `auto` (stdin when it is a terminal).
    #[arg(long, value_enum, default_value_t = ConsoleInputArg::Auto)]
    console_input: ConsoleInputArg,
    /// After set-up the whole process runs under the VMM allowlist, and the vCPU
    /// thread, the control loop, the console input pump and the export threads each
    /// under a narrower one of their own.
    #[command(flatten)]
    sandbox: crate::SandboxOpts,
    /// Test only: the vCPU thread makes a system call outside its allowlist before
    /// running the guest.
    #[arg(long, hide = true)]
    seccomp_test_forbidden_call: bool,
    /// ACPI tables for a --kernel guest (`on` or `off`; the MP table is there either
    /// way). Default: on when nestio_vmm::vm::DEFAULT_LINUX_ACPI says so.
    #[arg(long, value_parser = parse_on_off, requires = "kernel", conflicts_with = "guest")]
    acpi: Option<bool>,
    /// A vIOMMU for the assigned PCI devices: `smmuv3[,mode=shadow|nested]` (an SMMUv3
    /// at the start of the platform MMIO window, 0xe8000000; stream ID = requester ID;
    /// nested: vfio-user devices that negotiate it walk the guest's stage 1).
    #[arg(long)]
    viommu: Option<nestio_vmm::iommu::smmuv3::Viommu>,
    /// A control socket for this VM (`nestio status|stop|migrate --vm PATH`).
    #[arg(long, value_name = "PATH", conflicts_with = "export")]
    control: Option<PathBuf>,
    /// Destination of a live migration: wait for the source's stream on this address
    /// (unix:PATH, a path, or tcp:HOST:PORT on loopback), load it into the VM built from
    /// the other options (same --memory / --cpus / kinds of --device, each device a new
    /// process), then run it.
    #[arg(long, value_name = "ADDR", conflicts_with = "export")]
    migrate_listen: Option<nestio_vmm::migration::addr::MigrationAddr>,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: use on or off")),
    }
}

/// `--console-input`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleInputArg {
    /// Standard input when it is a terminal, else nothing.
    Auto,
    /// Standard input (a terminal, a pipe, a file).
    Stdin,
    /// Nothing.
    None,
}

impl ConsoleInputArg {
    fn resolve(self) -> ConsoleInput {
        use std::io::IsTerminal;
        match self {
            ConsoleInputArg::Stdin => ConsoleInput::Stdin,
            ConsoleInputArg::Auto if std::io::stdin().is_terminal() => ConsoleInput::Stdin,
            ConsoleInputArg::Auto | ConsoleInputArg::None => ConsoleInput::None,
        }
    }
}

fn parse_memory(s: &str) -> Result<u64, String> {
    nestio_vmm::parse_size(s).map_err(|e| e.to_string())
}

fn parse_irqchip(s: &str) -> Result<nestio_vmm::irqchip::IrqChipKind, String> {
    match s {
        "x86" => Ok(nestio_vmm::irqchip::IrqChipKind::X86),
        "xive" => Ok(nestio_vmm::irqchip::IrqChipKind::Xive),
        _ => Err(format!(
            "unknown interrupt controller {s:?}: use x86 or xive"
        )),
    }
}

fn parse_cpus(s: &str) -> Result<u8, String> {
    nestio_vmm::parse_cpus(s).map_err(|e| e.to_string())
}

fn parse_device(s: &str) -> Result<PathBuf, String> {
    match s.split_once('=') {
        Some(("vfio-user", path)) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(format!(
            "device '{s}' is not understood: use vfio-user=PATH (the socket of `nestio device ...`)"
        )),
    }
}

/// `--device vfio-user=PATH[,posted-writes=on|off][,posted-ring=on|off]`.
fn parse_device_config(s: &str) -> Result<DeviceConfig, String> {
    s.parse::<DeviceConfig>().map_err(|e| {
        format!("device '{s}' is not understood: {e} (PATH: the socket of `nestio device ...`)")
    })
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
        "smptest" => p::SMPTEST,
        "fslmctest" => p::FSLMCTEST,
        other => other,
    })
}

pub fn run(args: RunArgs) -> CmdResult {
    let export = args.export.clone();
    let window = args.export_window;
    let no_shared_memory = args.no_shared_memory;
    let memory_from = args.memory_from.clone();
    let sandbox = args.sandbox.clone();
    let forbidden_call = args.seccomp_test_forbidden_call;
    let control = args.control.clone();
    let migrate_listen = args.migrate_listen.clone();
    let bar_channel = args.bar_channel;
    let revoke_at = args.bar_channel_test_revoke_at_set_irqs;
    let mut cfg = config(args)?;
    cfg.thread_hooks = thread_hooks(sandbox.sandbox(), forbidden_call);
    let mut level = 1;
    if let Some(path) = &memory_from {
        let h = RamHandoff::fetch(path)?;
        tracing::info!(
            level = h.level,
            offset = h.offset,
            size = h.size,
            "RAM from the parent level"
        );
        cfg.memory = h.size;
        cfg.ram_file = Some(RamFile {
            fd: h.fd,
            offset: h.offset,
        });
        level = h.level;
    }
    match export {
        None => {
            let sockets: Vec<String> = cfg
                .devices
                .iter()
                .filter_map(|d| match d {
                    DeviceConfig::VfioUser { socket } => Some(socket.display().to_string()),
                    _ => None,
                })
                .collect();
            let waiting = (!sockets.is_empty()).then(|| {
                WaitNotice::after(
                    NOTICE_AFTER,
                    format!(
                        "nestio: still waiting for the device server at {} to answer (a \
                         server that has another client answers \"busy\"; one that never \
                         answers is not a vfio-user server or is stuck)",
                        sockets.join(", ")
                    ),
                )
            });
            // A nested level's vfio-user devices ask their parent for a BAR channel.
            let mut channels = Vec::new();
            let nested_viommu = cfg.viommu == Some(nestio_vmm::iommu::smmuv3::Viommu::Smmuv3Nested);
            if bar_channel && memory_from.is_some() {
                for d in cfg.devices.iter_mut() {
                    let DeviceConfig::VfioUser { socket } = d else {
                        continue;
                    };
                    let (device, bars, nested) =
                        crate::channel::innermost_device(socket, nested_viommu)?;
                    channels.extend(bars);
                    *d = DeviceConfig::Connected {
                        name: format!("vfio-user:{}", socket.display()),
                        device,
                        nested,
                    };
                }
            }
            let mut vm = Vm::new(cfg)?;
            drop(waiting);
            if let Some(addr) = &migrate_listen {
                eprintln!("nestio: waiting for an incoming migration on {addr}");
                let mut stream = addr.accept_one()?;
                let got = vm.receive_migration(&mut stream)?;
                eprintln!(
                    "nestio: migration received ({:.1} MiB, {} pages); the VM resumes here",
                    got.bytes as f64 / (1 << 20) as f64,
                    got.pages
                );
            }
            let source = vm.migration_source();
            let _control = match &control {
                Some(path) => Some(nestio_vmm::control::ControlServer::start(
                    path,
                    nestio_vmm::control::ControlTarget {
                        handle: vm.handle(),
                        source: source.clone(),
                    },
                )?),
                None => None,
            };
            sandbox.install_process(Profile::Vmm)?;
            let report = vm.run()?;
            crate::channel::report(&channels);
            if source.migrated() {
                eprintln!("nestio: the VM was migrated away; this VMM ends");
                return Ok(0);
            }
            Ok(report.exit_status())
        }
        Some(path) => run_exporting(
            cfg,
            level,
            &path,
            window,
            no_shared_memory,
            sandbox,
            (bar_channel, revoke_at),
        ),
    }
}

/// Each VMM thread confines itself to its role's allowlist as it starts (on top of
/// the process-wide [`Profile::Vmm`] installed after set-up).
fn thread_hooks(sandbox: nestio_sandbox::Sandbox, forbidden_call: bool) -> ThreadHooks {
    ThreadHooks::new(move |role| {
        let profile = match role {
            ThreadRole::Vcpu(_) => Profile::Vcpu,
            ThreadRole::Control => Profile::Control,
            ThreadRole::SerialInput => Profile::SerialInput,
        };
        sandbox.confine_thread_or_exit(profile);
        if forbidden_call && matches!(role, ThreadRole::Vcpu(_)) {
            crate::forbidden_call_for_tests();
        }
    })
}

/// The nested guest's window size: `requested`, or half of `ram` rounded down to
/// 2 MiB; a multiple of 2 MiB, at least 4 MiB, smaller than `ram`.
pub fn export_window(ram: u64, requested: Option<u64>) -> Result<u64, String> {
    const TWO_MIB: u64 = 2 << 20;
    let w = requested.unwrap_or((ram / 2) & !(TWO_MIB - 1));
    if w < nestio_vmm::memory::MIN_RAM || !w.is_multiple_of(TWO_MIB) || w >= ram {
        return Err(format!(
            "export window of {w:#x} bytes does not fit {ram:#x} bytes of RAM: it must be a \
             multiple of 2 MiB, at least 4M and less than the RAM (give more --memory or a \
             smaller --export-window)"
        ));
    }
    Ok(w)
}

/// When a notice about a slow device connection is printed.
const NOTICE_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// Prints a line to stderr if it is still alive after a delay: says what `nestio run`
/// waits for when a device server is slow to answer. Dropping it cancels the notice.
struct WaitNotice(Option<std::sync::mpsc::Sender<()>>);

impl WaitNotice {
    fn after(delay: std::time::Duration, message: String) -> WaitNotice {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("wait-notice".into())
            .spawn(move || {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(delay) {
                    eprintln!("{message}");
                }
            });
        WaitNotice(spawned.is_ok().then_some(tx))
    }
}

impl Drop for WaitNotice {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Removes the export sockets when the level ends.
struct SocketFiles(Vec<PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The sockets a level exports: `(device socket, exported socket)`. One device is
/// exported at PATH; several must be one FSL-MC container as `nestio device fsl-mc`
/// serves it — its DPRC's socket S first, then objects at `S.<type>.<id>` — and are
/// exported at PATH and `PATH.<type>.<id>` (so the child finds them as it would at
/// level 0).
fn export_sockets(
    devices: &[DeviceConfig],
    path: &Path,
) -> Result<Vec<(PathBuf, PathBuf)>, String> {
    let refuse = || {
        "--export passes on exactly one device (or one FSL-MC container: its DPRC's \
         --device vfio-user=S first, then its objects' S.<type>.<id> sockets): give \
         --device vfio-user=PATH (it is not assigned to this level's own guest)"
            .to_string()
    };
    let sockets: Vec<PathBuf> = devices
        .iter()
        .map(|d| match d {
            DeviceConfig::VfioUser { socket } | DeviceConfig::VfioUserWith { socket, .. } => {
                Ok(socket.clone())
            }
            _ => Err(refuse()),
        })
        .collect::<Result<_, _>>()?;
    let Some(first) = sockets.first() else {
        return Err(refuse());
    };
    let base = first.display().to_string();
    let mut out = vec![(first.clone(), path.to_path_buf())];
    for s in &sockets[1..] {
        let suffix = s
            .display()
            .to_string()
            .strip_prefix(&base)
            .filter(|x| x.starts_with('.') && x.len() > 1)
            .map(str::to_string)
            .ok_or_else(refuse)?;
        out.push((
            s.clone(),
            PathBuf::from(format!("{}{suffix}", path.display())),
        ));
    }
    Ok(out)
}

/// Several exported devices must be one FSL-MC container: the DPRC (FSL-MC + RESET)
/// first, FSL-MC objects after it.
fn check_fsl_mc_container(
    clients: &[nestio_vfio_user::Client],
    sockets: &[(PathBuf, PathBuf)],
) -> Result<(), String> {
    use nestio_device_model::{flags, VfioDevice};
    if clients.len() < 2 {
        return Ok(());
    }
    for (i, (c, (s, _))) in clients.iter().zip(sockets).enumerate() {
        let f = c.info().flags;
        let want = if i == 0 {
            flags::FSL_MC | flags::RESET
        } else {
            flags::FSL_MC
        };
        if f & want != want {
            return Err(format!(
                "--export with several devices passes on one FSL-MC container, but {} is not \
                 {} (VFIO flags {f:#x})",
                s.display(),
                if i == 0 {
                    "its DPRC"
                } else {
                    "an FSL-MC object"
                }
            ));
        }
    }
    Ok(())
}

fn add_stats(
    a: nestio_nested::ExportStats,
    b: nestio_nested::ExportStats,
) -> nestio_nested::ExportStats {
    nestio_nested::ExportStats {
        maps: a.maps + b.maps,
        fd_maps: a.fd_maps + b.fd_maps,
        peer_maps: a.peer_maps + b.peer_maps,
        refused_maps: a.refused_maps + b.refused_maps,
        unmaps: a.unmaps + b.unmaps,
        region_reads: a.region_reads + b.region_reads,
        region_writes: a.region_writes + b.region_writes,
        set_irqs: a.set_irqs + b.set_irqs,
        resets: a.resets + b.resets,
        copy_ops: a.copy_ops + b.copy_ops,
        copy_bytes: a.copy_bytes + b.copy_bytes,
        copy_faults: a.copy_faults + b.copy_faults,
    }
}

/// A level that passes its device on (see the module documentation).
fn run_exporting(
    mut cfg: VmConfig,
    level: u32,
    path: &Path,
    window: Option<u64>,
    no_shared_memory: bool,
    sandbox: crate::SandboxOpts,
    (bar_channel, revoke_at): (bool, Option<u64>),
) -> CmdResult {
    let sockets = export_sockets(&cfg.devices, path)?;
    let socket = sockets[0].0.clone();
    let win = export_window(cfg.memory, window)?;
    cfg.devices.clear();
    // Fresh RAM keeps the child's window in a memfd of its own, handed down alone. RAM
    // received from a parent (`--memory-from`) is one file already and cannot be split:
    // then the handoff names the window's place in it.
    if cfg.ram_file.is_none() {
        cfg.ram_window = Some(win);
    }
    let waiting = WaitNotice::after(
        NOTICE_AFTER,
        format!(
            "nestio: still waiting for the device server at {} to answer",
            socket.display()
        ),
    );
    let mut clients = Vec::new();
    for (socket, _) in &sockets {
        // Propose the nested-IOMMU extension: what the level below agrees to is what
        // this level offers its child (`nestio_nested::ForwardIommu`).
        let config = nestio_vfio_user::ClientConfig {
            nested_iommu: Some(nestio_vfio_user::nested_iommu::NestedIommuCaps::default()),
            ..nestio_vfio_user::ClientConfig::default()
        };
        let client = std::os::unix::net::UnixStream::connect(socket)
            .map_err(nestio_vfio_user::ClientError::from)
            .and_then(|s| nestio_vfio_user::Client::from_stream(s, config))
            .map_err(|e| {
                format!(
                    "cannot connect to the device to export at {}: {e} (is its server running?)",
                    socket.display()
                )
            })?;
        clients.push(client);
    }
    drop(waiting);
    check_fsl_mc_container(&clients, &sockets)?;
    let mut vm = Vm::new(cfg)?;
    let ram = vm.ram();
    let size = ram.size();
    let base = size
        .checked_sub(win)
        .ok_or("export window larger than the RAM")?;
    let child = level.checked_add(1).ok_or("nesting level overflow")?;
    // This level's RAM as the exporter sees it, and the file and offset handed down.
    let (region, handoff) = match ram.parts() {
        [_, w] if w.gpa == base && w.size == win => (
            RamRegion::new(w.fd.clone(), w.gpa, w.size, w.fd_offset)?,
            RamHandoff::new(w.fd.clone(), w.fd_offset, win, child)?,
        ),
        [_] => {
            let file_offset = ram
                .fd_offset()
                .checked_add(base)
                .ok_or("window offset overflow")?;
            (
                RamRegion::new(ram.fd().clone(), 0, size, ram.fd_offset())?,
                RamHandoff::new(ram.fd().clone(), file_offset, win, child)?,
            )
        }
        _ => return Err("this level's RAM is not laid out as its export window needs".into()),
    };
    // One exporter per device (an FSL-MC container: the DPRC and each object), all with
    // the same window.
    let mut exports = Vec::new();
    let mut files = SocketFiles(Vec::new());
    // BAR channels for a single exported device (an FSL-MC container has no BARs).
    let pass_channels = bar_channel && sockets.len() == 1;
    for (client, (_, out)) in clients.into_iter().zip(&sockets) {
        let client = Arc::new(client);
        let grants = nestio_nested::ChannelGrants::from_parent(client.clone());
        let iommu = Arc::new(nestio_nested::ForwardIommu::new(client.clone()));
        let exported = Arc::new(ExportedDevice::new(
            client,
            LevelRam::Shared(region.clone()),
            ExportConfig {
                window: Window::new(base, win)?,
                no_shared_memory,
                child: LevelId::from_raw(u64::from(child)).ok_or("bad level id")?,
            },
        )?);
        // Served behind a gate: it counts what crosses this level and revokes the
        // child's BAR channels on a reset or a migration.
        let gate = Arc::new(nestio_nested::ChannelGate::new(
            exported.clone(),
            grants.clone(),
        ));
        if let Some(n) = revoke_at {
            gate.revoke_at_set_irqs(n);
        }
        let listener = nestio_vfio_user::bind(out).map_err(|e| format!("export socket: {e}"))?;
        files.0.push(out.clone());
        let server = crate::channel::with_grants(
            nestio_vfio_user::Server::new(gate.clone(), nestio_vfio_user::ServerConfig::default())
                .with_nested_backend(iommu),
            pass_channels.then_some(grants),
        );
        exports.push(((exported, gate), server, listener, out.clone()));
    }

    let mem_path = mem_socket_path(path);
    let mem_listener =
        nestio_vfio_user::bind(&mem_path).map_err(|e| format!("memory socket: {e}"))?;
    files.0.push(mem_path);
    // Who may fetch the RAM handoff: this process's uid as it is now, before `--user`.
    let mem_peers = nestio_vfio_user::PeerPolicy::own_uid();
    // Set-up is done (VM built, sockets bound, server configured): every thread from
    // here on is confined.
    sandbox.install_process(Profile::Vmm)?;
    let confine = sandbox.sandbox();
    // Detached: it only answers connections, and ends with the process.
    std::thread::Builder::new()
        .name("export-mem".into())
        .spawn(move || {
            confine.confine_thread_or_exit(Profile::Export);
            if let Err(e) = handoff.serve_to(mem_listener, &mem_peers) {
                tracing::warn!(error = %e, "memory socket stopped");
            }
        })?;
    let mut serves = Vec::new();
    let mut exported_devices = Vec::new();
    let mut gates = Vec::new();
    for ((exported, gate), server, listener, export_path) in exports {
        exported_devices.push(exported);
        gates.push(gate);
        serves.push(std::thread::Builder::new().name("export".into()).spawn(
            move || -> Result<(), String> {
                confine.confine_thread_or_exit(Profile::Export);
                // One child session: connections that never negotiate (a stray connect,
                // garbage, an early close) are dropped and do not use it up.
                server
                    .serve_owners(listener, 1)
                    .map_err(|e| format!("serving {}: {e}", export_path.display()))
            },
        )?);
    }
    tracing::info!(level, export = %path.display(), window_base = base, window_size = win, "exporting the device to level {child}");

    let status = vm.run()?.exit_status();
    // The guest is done; keep serving until the child level has come and gone.
    if serves.iter().any(|s| !s.is_finished()) {
        eprintln!(
            "nestio: level {level}: guest done; waiting for the level-{child} child to connect \
             to {} and leave",
            path.display()
        );
    }
    for serve in serves {
        match serve.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!(
                    "nestio: level {level}: the level-{child} session ended with an error: {e}"
                )
            }
            Err(_) => return Err("the export thread panicked".into()),
        }
    }
    drop(files);
    let st = exported_devices
        .iter()
        .map(|e| e.stats())
        .fold(nestio_nested::ExportStats::default(), add_stats);
    // One line for the user (and the tests): what crossed this level. `copies=0` with
    // `peer_maps=0` means device DMA reached the innermost guest's pages directly.
    let (mut bar_accesses, mut config_accesses, mut granted, mut revoked) = (0, 0, 0, 0);
    for g in &gates {
        let (gs, cs) = (g.stats(), g.grants().stats());
        bar_accesses += gs.bar_accesses;
        config_accesses += gs.config_accesses;
        granted += cs.granted;
        revoked += cs.revoked;
    }
    // `bar_accesses`: the child's BAR accesses that crossed this level (0 when its BAR
    // channel carried them all); `channel_grants`: BAR channels passed down.
    eprintln!(
        "nestio: level {level} export: maps={} fd_maps={} peer_maps={} refused_maps={} \
         unmaps={} copies={} copy_bytes={} set_irqs={} region_reads={} region_writes={} \
         bar_accesses={bar_accesses} config_accesses={config_accesses} \
         channel_grants={granted} channel_revocations={revoked}",
        st.maps,
        st.fd_maps,
        st.peer_maps,
        st.refused_maps,
        st.unmaps,
        st.copy_ops,
        st.copy_bytes,
        st.set_irqs,
        st.region_reads,
        st.region_writes
    );
    Ok(status)
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
    if let Some(acpi) = args.acpi {
        cfg.acpi = acpi;
    }
    cfg.cpus = args.cpus;
    cfg.irqchip = args.irqchip;
    cfg.viommu = args.viommu;
    cfg.handle_sigint = true;
    cfg.console_input = args.console_input.resolve();
    cfg.devices = args.devices;
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
    fn viommu_flag() {
        use nestio_vmm::iommu::smmuv3::Viommu;
        assert_eq!(parse(&["--guest", "hello"]).unwrap().viommu, None);
        assert_eq!(
            parse(&["--guest", "hello", "--viommu", "smmuv3,mode=shadow"])
                .unwrap()
                .viommu,
            Some(Viommu::Smmuv3)
        );
        assert_eq!(
            parse(&["--guest", "hello", "--viommu", "smmuv3,mode=nested"])
                .unwrap()
                .viommu,
            Some(Viommu::Smmuv3Nested)
        );
        assert!(parse(&["--guest", "hello", "--viommu", "smmuv3,mode=both"]).is_err());
    }

    #[test]
    fn acpi_flag() {
        let default = parse(&["--kernel", "/k/vmlinux"]).unwrap();
        assert_eq!(default.acpi, nestio_vmm::vm::DEFAULT_LINUX_ACPI);
        assert!(
            parse(&["--kernel", "/k/vmlinux", "--acpi", "on"])
                .unwrap()
                .acpi
        );
        assert!(
            !parse(&["--kernel", "/k/vmlinux", "--acpi", "off"])
                .unwrap()
                .acpi
        );
        assert!(parse(&["--kernel", "/k/vmlinux", "--acpi", "yes"]).is_err());
        assert!(
            parse(&["--guest", "hello", "--acpi", "on"]).is_err(),
            "Linux only"
        );
        assert!(!parse(&["--guest", "hello"]).unwrap().acpi);
    }

    #[test]
    fn export_window_defaults_to_half_and_is_checked() {
        assert_eq!(export_window(64 << 20, None).unwrap(), 32 << 20);
        assert_eq!(export_window(10 << 20, None).unwrap(), 4 << 20);
        assert_eq!(export_window(64 << 20, Some(48 << 20)).unwrap(), 48 << 20);
        assert!(export_window(6 << 20, None).is_err(), "half is below 4M");
        assert!(
            export_window(64 << 20, Some(64 << 20)).is_err(),
            "whole RAM"
        );
        assert!(
            export_window(64 << 20, Some(5 << 20)).is_err(),
            "not 2M aligned"
        );
        assert!(export_window(64 << 20, Some(u64::MAX)).is_err());
    }

    #[test]
    fn nesting_options_parse_and_conflict() {
        let cli = Cli::try_parse_from([
            "run",
            "--guest",
            "hello",
            "--device",
            "vfio-user=/tmp/s0",
            "--export",
            "vfio-user=/tmp/s1",
            "--export-window",
            "16M",
        ])
        .unwrap();
        assert_eq!(cli.run.export, Some(PathBuf::from("/tmp/s1")));
        assert_eq!(cli.run.export_window, Some(16 << 20));
        assert!(Cli::try_parse_from(["run", "--guest", "hello", "--export", "/tmp/s1"]).is_err());
        assert!(
            Cli::try_parse_from(["run", "--guest", "hello", "--export-window", "16M"]).is_err(),
            "--export-window needs --export"
        );
        assert!(Cli::try_parse_from([
            "run",
            "--guest",
            "hello",
            "--memory-from",
            "/tmp/s1.mem",
            "--memory",
            "64M"
        ])
        .is_err());
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

    #[test]
    fn cpus_flag_is_checked() {
        assert_eq!(parse(&["--guest", "hello"]).unwrap().cpus, 1);
        assert_eq!(
            parse(&["--kernel", "/k", "--cpus", "2"]).unwrap().cpus,
            2,
            "the VM config carries the count (the MP table and MADT read it)"
        );
        assert_eq!(
            parse(&["--guest", "smptest", "--cpus", "32"]).unwrap().cpus,
            32
        );
        for bad in ["0", "33", "256", "x"] {
            let e = parse(&["--guest", "hello", "--cpus", bad]).unwrap_err();
            assert!(e.contains("1 to 32"), "{bad}: {e}");
        }
        assert!(parse(&["--guest", "hello", "--cpus", "-1"]).is_err());
    }
}
