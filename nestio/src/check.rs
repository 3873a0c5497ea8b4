//! `nestio check …`: drive a device served over vfio-user from this process, as a guest
//! driver would, and report whether a whole chain works.
//!
//! `nestio check e1000-ping --socket S` connects a vfio-user `Client` to an e1000 on `S`
//! and runs nestio's own e1000 driver (`nestio_emulated::e1000_bench::Driver`, the one
//! `nestio bench --only e1000` measures with) over it: reset, EEPROM, rings, ARP for the
//! peer, then `--count` ICMP echoes, each timed, and one summary line
//! (`NESTIO-E1000-PING: ok 3/3 median … ms`, or `fail N/M` and exit status 1).
//!
//! How the device reaches the driver's memory (`--dma`):
//! - `physical` (default): for a server whose device has **no IOMMU** — a kernel device
//!   on vfio-pci in noiommu mode, as inside a nestio Linux guest. The driver's memory is
//!   a sealed memfd; the pages the device touches (both rings, every packet buffer; each
//!   ring fits one page, so it is physically contiguous) are locked here, their
//!   physical addresses read from `/proc/self/pagemap` (root only), and each physically
//!   contiguous run is DMA_MAPped at IOVA = its physical address, which is also what the
//!   device is programmed with. `nestio device vfio` accepts exactly such maps and
//!   checks them (`nestio_kernel_vfio::noiommu`). The pages stay locked until the
//!   driver is done.
//! - `iova`: the memfd is mapped at one fixed IOVA (a server with an IOMMU, or an
//!   emulated device whose map table translates).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use nestio_device_model::VfioDevice;
use nestio_emulated::e1000_bench::{
    self, device_pages, DmaVia, Driver, DriverError, IrqMode, PAGE,
};
use nestio_kernel_vfio::noiommu::LockedMapping;

use crate::CmdResult;

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(subcommand)]
    what: CheckKind,
}

#[derive(Subcommand, Debug)]
enum CheckKind {
    /// Ping a peer through an e1000 served on a vfio-user socket, with nestio's e1000
    /// driver running in this process over a vfio-user client.
    E1000Ping {
        /// The vfio-user socket of the e1000 (e.g. `nestio device vfio --socket S`).
        #[arg(long)]
        socket: PathBuf,
        /// ICMP echo requests.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
        count: u16,
        /// Who to ping (the `user` network's gateway answers ARP and ICMP echo).
        #[arg(long, default_value = "10.0.2.2")]
        peer: Ipv4Addr,
        /// This driver's IPv4 address.
        #[arg(long, default_value = "10.0.2.15")]
        ip: Ipv4Addr,
        /// How the device reaches the driver's memory: `physical` (no IOMMU: locked
        /// pages mapped at IOVA = physical address, needs root) or `iova` (one mapping
        /// at a fixed IOVA, for a device behind an IOMMU or an emulated one).
        #[arg(long, default_value = "physical", value_parser = ["physical", "iova"])]
        dma: String,
        /// Seconds to wait for each reply.
        #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
        timeout: f64,
        /// Seconds to keep retrying the connection while nothing listens on the socket
        /// yet (a server just started creates the file before it listens).
        #[arg(long, default_value_t = 30.0, value_parser = parse_seconds)]
        connect_timeout: f64,
    },
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds in (0, 3600]")),
    }
}

pub fn run(args: CheckArgs) -> CmdResult {
    match args.what {
        CheckKind::E1000Ping {
            socket,
            count,
            peer,
            ip,
            dma,
            timeout,
            connect_timeout,
        } => {
            let client = connect(&socket, Duration::from_secs_f64(connect_timeout))?;
            e1000_ping(
                client,
                count,
                peer,
                ip,
                dma == "physical",
                Duration::from_secs_f64(timeout),
            )
        }
    }
}

/// Connect to `socket`, retrying while it does not exist or refuses connections, for
/// at most `wait`.
fn connect(
    socket: &std::path::Path,
    wait: Duration,
) -> Result<nestio_vfio_user::client::Client, String> {
    use nestio_vfio_user::client::{Client, ClientError};
    let t0 = Instant::now();
    loop {
        match Client::connect(socket) {
            Err(ClientError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && t0.elapsed() < wait =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r.map_err(|e| format!("connecting to {}: {e}", socket.display())),
        }
    }
}

/// Lock the pages of `mem` the e1000 touches and read their physical addresses: the
/// table `Driver::new_physical` wants, and the mappings that keep the pages locked.
fn lock_device_pages(
    mem: &std::os::fd::OwnedFd,
) -> Result<(BTreeMap<u64, u64>, Vec<LockedMapping>), nestio_kernel_vfio::noiommu::NoIommuError> {
    // Consecutive memfd pages are locked as one mapping.
    let mut groups: Vec<(u64, u64)> = Vec::new();
    for page in device_pages() {
        match groups.last_mut() {
            Some((start, len)) if *start + *len == page => *len += PAGE,
            _ => groups.push((page, PAGE)),
        }
    }
    let mut table = BTreeMap::new();
    let mut locked = Vec::new();
    for (start, len) in groups {
        let m = LockedMapping::new(mem.as_fd(), start, len)?;
        for (i, pa) in m.physical_addresses()?.into_iter().enumerate() {
            table.insert(start + i as u64 * PAGE, pa);
        }
        locked.push(m);
    }
    Ok((table, locked))
}

fn e1000_ping(
    client: nestio_vfio_user::client::Client,
    count: u16,
    peer: Ipv4Addr,
    ip: Ipv4Addr,
    physical: bool,
    timeout: Duration,
) -> CmdResult {
    const TAG: &str = "NESTIO-E1000-PING:";
    let dev: Arc<dyn VfioDevice> = Arc::new(client);
    let mem = e1000_bench::guest_memory()?;
    let t0 = Instant::now();
    // `_locked` keeps the pages resident at their physical addresses until the end.
    let (mut drv, _locked) = if physical {
        let (table, locked) = lock_device_pages(&mem)?;
        // DMA maps the driver makes: runs consecutive in the memfd and in memory.
        let runs = table
            .iter()
            .zip(table.iter().skip(1))
            .filter(|((o, p), (o2, p2))| **o2 != *o + PAGE || p.checked_add(PAGE) != Some(**p2))
            .count()
            + 1;
        println!(
            "{TAG} {} pages locked at physical addresses {:#x}..{:#x} ({} DMA maps at IOVA = physical address)",
            table.len(),
            table.values().min().copied().unwrap_or(0),
            table.values().max().copied().unwrap_or(0) + PAGE,
            runs
        );
        (
            Driver::new_physical(dev, mem, IrqMode::Intx, table)?,
            locked,
        )
    } else {
        (
            Driver::new_via(dev, mem, IrqMode::Intx, DmaVia::SharedFd)?,
            Vec::new(),
        )
    };
    let mapped_ms = t0.elapsed().as_secs_f64() * 1e3;
    let result = ping_with(&mut drv, count, peer, ip, timeout, mapped_ms);
    // Quiesce the device before its memory goes away: without an IOMMU a device left
    // running would go on writing received frames into pages this process frees.
    let quiesced = drv.reset().and_then(|()| drv.cfg_write16(4, 0));
    let status = result?;
    quiesced?;
    Ok(status)
}

/// Probe, set up, ARP, then `count` timed echoes; the exit status.
fn ping_with(
    drv: &mut Driver,
    count: u16,
    peer: Ipv4Addr,
    ip: Ipv4Addr,
    timeout: Duration,
    mapped_ms: f64,
) -> CmdResult {
    const TAG: &str = "NESTIO-E1000-PING:";
    let mut t = Instant::now();
    let mut lap = || {
        let ms = t.elapsed().as_secs_f64() * 1e3;
        t = Instant::now();
        ms
    };
    drv.reset()?;
    let mac = drv.probe()?;
    let probe_ms = lap();
    drv.setup()?;
    let setup_ms = lap();
    let gw = drv.arp(ip, peer, timeout)?;
    let arp_ms = lap();
    println!(
        "{TAG} e1000 {} ready: DMA maps {mapped_ms:.0} ms, reset + EEPROM {probe_ms:.0} ms, \
         rings {setup_ms:.0} ms, ARP {arp_ms:.0} ms; {peer} is at {gw}",
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    );
    let payload: Vec<u8> = (0..56u8).collect();
    let mut rtts = Vec::new();
    for seq in 1..=count {
        let sent = Instant::now();
        match drv.ping(ip, gw, peer, 0x4e18, seq, &payload, timeout) {
            Ok(reply) => {
                let ms = sent.elapsed().as_secs_f64() * 1e3;
                println!(
                    "{TAG} {} bytes from {peer}: icmp_seq={seq} time={ms:.3} ms",
                    reply.len().saturating_sub(14 + 20)
                );
                rtts.push(ms);
            }
            Err(DriverError::Timeout(..)) => {
                println!("{TAG} no reply from {peer} for icmp_seq={seq} within {timeout:?}");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let got = rtts.len();
    rtts.sort_by(f64::total_cmp);
    if got == usize::from(count) {
        println!(
            "{TAG} ok {got}/{count} median {:.3} ms min {:.3} ms max {:.3} ms (interrupts {})",
            rtts[got / 2],
            rtts[0],
            rtts[got - 1],
            drv.interrupts
        );
        Ok(0)
    } else {
        println!("{TAG} fail {got}/{count}");
        Ok(1)
    }
}
