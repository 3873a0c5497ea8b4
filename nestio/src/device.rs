//! `nestio device …`: serve an emulated device over vfio-user.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};
use nestio_device_model::VfioDevice;
use nestio_vfio_user::server::{bind_for, PeerPolicy, Server, ServerConfig};

use crate::CmdResult;

#[derive(Args, Debug)]
pub struct DeviceArgs {
    #[command(subcommand)]
    kind: DeviceKind,
}

#[derive(Subcommand, Debug)]
enum DeviceKind {
    /// The sample PCI device: a register BAR, a RAM BAR, a DMA engine and an interrupt.
    Sample {
        /// UNIX socket path to listen on.
        #[arg(long)]
        socket: PathBuf,
        #[command(flatten)]
        server: ServerOpts,
    },
    /// An Intel 82540EM (e1000) network card.
    E1000 {
        /// UNIX socket path to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// Network backend.
        #[arg(long, default_value = "user", help = nestio_net::NET_SPEC_HELP)]
        net: String,
        /// Write every frame (both directions) to this pcap file.
        #[arg(long)]
        pcap: Option<PathBuf>,
        /// MAC address (default 52:54:00:12:34:56).
        #[arg(long, value_parser = parse_mac)]
        mac: Option<[u8; 6]>,
        /// Offer an MSI capability (the 82540EM has none: off by default; turn it on for
        /// a VMM or guest driver that uses message interrupts).
        #[arg(long, default_value = "off", value_parser = ["on", "off"])]
        msi: String,
        #[command(flatten)]
        server: ServerOpts,
    },
    /// An NXP FSL-MC DPRC container of DPAA2 objects: the DPRC served on SOCKET, each
    /// object on SOCKET.<type>.<id> (one VFIO device per socket, as Linux's
    /// vfio-fsl-mc gives one device fd per object of the container).
    FslMc {
        /// UNIX socket path of the DPRC (objects: PATH.dpni.0, ...).
        #[arg(long)]
        socket: PathBuf,
        /// The container's objects, TYPE:COUNT,... (dpni, dpio, dpbp, dpcon, dpmcp, dpmac).
        #[arg(long, default_value = nestio_emulated::fsl_mc::DEFAULT_OBJECTS)]
        objects: String,
        /// The container id (dprc.N; 1 is the root container).
        #[arg(long, default_value_t = 2)]
        container_id: u32,
        #[command(flatten)]
        server: ServerOpts,
    },
    /// A device bound to a kernel VFIO driver (e.g. vfio-pci), served as it is: regions
    /// by pread/pwrite on the kernel device fd (BARs mmapped zero-copy by clients),
    /// interrupts as eventfds handed straight to the kernel, DMA maps through the
    /// container's IOMMU (none with a noiommu group: the device then DMAs physical
    /// addresses). Runs without the seccomp sandbox (the VFIO ioctls are not in the
    /// device allowlist).
    Vfio {
        /// The VFIO group node: /dev/vfio/N, or /dev/vfio/noiommu-N.
        #[arg(long)]
        group: PathBuf,
        /// The device's name in the group (PCI address, e.g. 0000:00:01.0).
        #[arg(long)]
        device: String,
        /// UNIX socket path to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// Only open the device, print its info, regions, irqs and PCI vendor:device
        /// (read through the kernel), and exit (used by the guest's /init).
        #[arg(long)]
        probe: bool,
        #[command(flatten)]
        server: ServerOpts,
    },
    /// A 16-pin GPIO card (outputs looped back to inputs, an interrupt on change).
    Gpio {
        /// UNIX socket path to listen on.
        #[arg(long)]
        socket: PathBuf,
        #[command(flatten)]
        server: ServerOpts,
    },
}

#[derive(Args, Debug)]
struct ServerOpts {
    /// Do not offer a twin socket (server->client DMA then uses the main socket).
    #[arg(long)]
    no_twin_socket: bool,
    /// Do not answer a client's `nestio_nested_iommu` proposal (its vIOMMU then
    /// shadows this device: `docs/vfio-user-nested-iommu.md`).
    #[arg(long)]
    no_nested_iommu: bool,
    /// Serve one client only, then exit (default: serve clients one after another).
    /// Connections that never complete VERSION do not count.
    #[arg(long)]
    once: bool,
    /// Also admit clients running as this uid (repeatable; by default only this
    /// process's own uid may connect, checked by SO_PEERCRED, and the socket is 0600;
    /// with --allow-uid it is 0666 and the SO_PEERCRED check alone admits).
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Seconds a new connection has to complete VERSION before it is closed.
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    handshake_timeout: f64,
    /// Grant BAR channels to the device's owner (`on`, the default, for PCI devices):
    /// the innermost of a stack of `nestio run --export` levels then reaches the BARs in
    /// one hop (see `nestio_nested::channel_handoff`).
    #[arg(long, default_value = "on", value_parser = crate::channel::parse_on_off, action = clap::ArgAction::Set)]
    bar_channel: bool,
    #[command(flatten)]
    sandbox: crate::SandboxOpts,
    /// Test only: make a system call outside the allowlist once serving (the sandbox
    /// test checks that it ends this process with a report naming the call).
    #[arg(long, hide = true)]
    seccomp_test_forbidden_call: bool,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86400.0 => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds in (0, 86400]")),
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!(
            "MAC '{s}' must be six hex bytes like 52:54:00:12:34:56"
        ));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m =
            u8::from_str_radix(p, 16).map_err(|_| format!("MAC '{s}': '{p}' is not a hex byte"))?;
    }
    Ok(mac)
}

pub fn run(args: DeviceArgs) -> CmdResult {
    let (device, socket, opts): (Arc<dyn VfioDevice>, PathBuf, ServerOpts) = match args.kind {
        DeviceKind::Sample { socket, server } => {
            (nestio_emulated::sample::sample_device()?, socket, server)
        }
        DeviceKind::Gpio { socket, server } => (
            Arc::new(nestio_emulated::gpio::Gpio::new(true)?),
            socket,
            server,
        ),
        DeviceKind::E1000 {
            socket,
            net,
            pcap,
            mac,
            msi,
            server,
        } => {
            let backend = nestio_net::open_backend(&net, pcap.as_deref())?;
            eprintln!("nestio: e1000 network backend: {}", backend.describe());
            let mut cfg = nestio_emulated::e1000::E1000Config::new(backend).with_msi(msi == "on");
            if let Some(mac) = mac {
                cfg.mac = mac;
            }
            (nestio_emulated::e1000::E1000::new(cfg)?, socket, server)
        }
        DeviceKind::Vfio {
            group,
            device,
            socket,
            probe,
            server,
        } => {
            let dev = nestio_kernel_vfio::KernelVfioDevice::open_group(&group, &device)?;
            eprintln!(
                "nestio: kernel VFIO device {device} of {} (IOMMU {:?})",
                group.display(),
                dev.iommu()
            );
            if probe {
                return probe_device(Arc::new(dev), &socket);
            }
            return serve_unsandboxed(Arc::new(dev), socket, server);
        }
        DeviceKind::FslMc {
            socket,
            objects,
            container_id,
            server,
        } => return run_fsl_mc(socket, &objects, container_id, server),
    };
    let config = ServerConfig {
        twin_socket: !opts.no_twin_socket,
        nested_iommu: !opts.no_nested_iommu,
        handshake_timeout: Some(std::time::Duration::from_secs_f64(opts.handshake_timeout)),
        peers: PeerPolicy::own_uid_and(&opts.allow_uids),
        ..ServerConfig::default()
    };
    let listener = bind_for(&socket, &config.peers)?;
    // Set-up is done: from here on the process (the server, the e1000 worker and any
    // thread started later) only makes the calls of the device allowlist.
    opts.sandbox
        .install_process(nestio_sandbox::Profile::Device)?;
    eprintln!("nestio: serving on {}", socket.display());
    if opts.seccomp_test_forbidden_call {
        crate::forbidden_call_for_tests();
    }
    let (device, grants) = crate::channel::offer_device(device, opts.bar_channel);
    let server = crate::channel::with_grants(Server::new(device, config), grants);
    let r = if opts.once {
        server.serve_owners(listener, 1)
    } else {
        server.serve_listener(listener)
    };
    r.map_err(|e| format!("serving on {}: {e}", socket.display()))?;
    Ok(0)
}

/// `--probe`: what the kernel says about the device, as one line per item; then the
/// same device served over vfio-user on `socket` to a `Client` in this process, whose
/// view (identity, config space, BAR0's first register) must equal the direct one.
fn probe_device(dev: Arc<dyn VfioDevice>, socket: &std::path::Path) -> CmdResult {
    probe_print(&*dev, "")?;
    let config = ServerConfig {
        peers: PeerPolicy::own_uid(),
        ..ServerConfig::default()
    };
    let listener = bind_for(socket, &config.peers)?;
    let server = Server::new(dev.clone(), config);
    let thread = std::thread::spawn(move || server.serve_owners(listener, 1));
    let client = nestio_vfio_user::client::Client::connect(socket)
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    probe_print(&client, "client ")?;
    if client.info() != dev.info() {
        return Err(format!("client sees {:?}, kernel {:?}", client.info(), dev.info()).into());
    }
    let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
    dev.region_read(nestio_device_model::pci_index::CONFIG, 0, &mut a)?;
    client.region_read(nestio_device_model::pci_index::CONFIG, 0, &mut b)?;
    if a != b {
        return Err("config space differs between the kernel and the vfio-user client".into());
    }
    let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
    dev.region_read(0, 0, &mut a)?;
    client.region_read(0, 0, &mut b)?;
    if a != b {
        return Err(format!("BAR0[0] differs: kernel {a:02x?}, client {b:02x?}").into());
    }
    println!("NESTIO-VFIO-PROBE: client view matches (config 64 bytes, BAR0 CTRL {a:02x?})");
    drop(client);
    thread
        .join()
        .map_err(|_| "the probe's server thread panicked")?
        .map_err(|e| format!("serving the probe: {e}"))?;
    Ok(0)
}

fn probe_print(dev: &dyn VfioDevice, who: &str) -> CmdResult {
    let info = dev.info();
    println!(
        "NESTIO-VFIO-PROBE: {who}flags {:#x} regions {} irqs {}",
        info.flags, info.num_regions, info.num_irqs
    );
    for i in 0..info.num_regions {
        let r = dev.region_info(i)?;
        if r.size > 0 {
            println!(
                "NESTIO-VFIO-PROBE: region {i} size {:#x} flags {:#x} mmap-areas {}",
                r.size,
                r.flags,
                r.sparse.len()
            );
        }
    }
    for i in 0..info.num_irqs {
        let q = dev.irq_info(i)?;
        println!(
            "NESTIO-VFIO-PROBE: irq {i} count {} flags {:#x}",
            q.count, q.flags
        );
    }
    if info.flags & nestio_device_model::flags::PCI != 0 {
        let mut id = [0u8; 4];
        dev.region_read(nestio_device_model::pci_index::CONFIG, 0, &mut id)?;
        println!(
            "NESTIO-VFIO-PROBE: {who}pci {:04x}:{:04x}",
            u16::from_le_bytes([id[0], id[1]]),
            u16::from_le_bytes([id[2], id[3]])
        );
    }
    Ok(0)
}

/// Serve a device whose every call is a kernel ioctl the device sandbox does not allow.
fn serve_unsandboxed(device: Arc<dyn VfioDevice>, socket: PathBuf, opts: ServerOpts) -> CmdResult {
    let config = ServerConfig {
        twin_socket: !opts.no_twin_socket,
        nested_iommu: !opts.no_nested_iommu,
        handshake_timeout: Some(std::time::Duration::from_secs_f64(opts.handshake_timeout)),
        peers: PeerPolicy::own_uid_and(&opts.allow_uids),
        ..ServerConfig::default()
    };
    let listener = bind_for(&socket, &config.peers)?;
    eprintln!("nestio: serving on {}", socket.display());
    let server = Server::new(device, config);
    let r = if opts.once {
        server.serve_owners(listener, 1)
    } else {
        server.serve_listener(listener)
    };
    r.map_err(|e| format!("serving on {}: {e}", socket.display()))?;
    Ok(0)
}

/// `nestio device fsl-mc`: every device of the container on its own socket, each served
/// by its own server thread.
fn run_fsl_mc(socket: PathBuf, objects: &str, id: u32, opts: ServerOpts) -> CmdResult {
    use nestio_emulated::fsl_mc::{parse_object_list, FslMcContainer};
    let list = parse_object_list(objects)?;
    let container = FslMcContainer::new(id, &list)?;
    let config = ServerConfig {
        twin_socket: !opts.no_twin_socket,
        nested_iommu: !opts.no_nested_iommu,
        handshake_timeout: Some(std::time::Duration::from_secs_f64(opts.handshake_timeout)),
        peers: PeerPolicy::own_uid_and(&opts.allow_uids),
        ..ServerConfig::default()
    };
    let mut listeners = Vec::new();
    for (i, dev) in container.devices().iter().enumerate() {
        let path = if i == 0 {
            socket.clone()
        } else {
            PathBuf::from(format!("{}.{}", socket.display(), dev.name()))
        };
        let l = bind_for(&path, &config.peers)?;
        listeners.push((dev.clone(), path, l));
    }
    container.start_poller()?;
    opts.sandbox
        .install_process(nestio_sandbox::Profile::Device)?;
    for (dev, path, _) in &listeners {
        eprintln!("nestio: serving {} on {}", dev.name(), path.display());
    }
    if opts.seccomp_test_forbidden_call {
        crate::forbidden_call_for_tests();
    }
    let once = opts.once;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|(dev, path, l)| {
            let config = config.clone();
            std::thread::spawn(move || {
                let server = Server::new(dev, config);
                let r = if once {
                    server.serve_owners(l, 1)
                } else {
                    server.serve_listener(l)
                };
                r.map_err(|e| format!("serving on {}: {e}", path.display()))
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "an FSL-MC server thread panicked")??;
    }
    Ok(0)
}
