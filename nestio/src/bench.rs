//! `nestio bench`: costs measured against floors measured in the same run, printed as
//! ratios (this machine is shared and noisy: compare ratios, not absolute times). All
//! threads run on one CPU (see `nestio_vfio_user::bench::Pin`).
//!
//! `--only nested` runs `nestio_nested::stack::measure_depths` on an in-process stack
//! (level 0's e1000 on a socket, exporters over socketpairs) at depth 1, 2 and 3, in
//! alternating rounds (best of each kept): with a small ICMP echo (round trip, region
//! access cost) and with 1500-byte IP packets (DMA throughput: the frame bytes the
//! device moves per round trip over its time, and the marginal DMA cost per KiB between
//! the two sizes), all as ratios to depth 1 — once with every BAR access forwarded level
//! by level and once with a BAR channel (`nestio_nested::direct`), interleaved.
//!
//! `--only e1000` runs the e1000 over vfio-user (with and without the register path's
//! inline receive, with and without posted BAR writes) and in process (inline receive
//! on and off), then prints the 60-byte round trip ratios side by side; then the
//! driver's interrupt wait (adaptive halt-polling as KVM runs a halted vCPU, the
//! default; blocking; fixed-window spinning or polling with yields:
//! `e1000_bench::IrqWait`) over vfio-user and in process, with all threads on one CPU
//! and unpinned, with the per-round-trip counts of socket messages, ring writes, ring
//! kicks, interrupts and blocking waits; and last the goal's verdict on two CPUs and on
//! one, next to the least any device outside the driver's thread can cost there (the
//! in-process round trip plus a hand-off round trip between two threads, measured in
//! the same rounds).

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use clap::Args;
use nestio_device_model::VfioDevice;
use nestio_emulated::e1000::{E1000Config, E1000};
use nestio_emulated::e1000_bench::{self, DmaVia, Driver, IrqMode, IrqWait, GATEWAY_IP, GUEST_IP};
use nestio_nested::stack::{best_rows, measure_depths_with, print_rows};
use nestio_nested::{BarChannels, DepthRow, NestedStack, RoundTrip, StackConfig};
use nestio_vfio_user::{Client, ClientConfig, Server, ServerConfig};

use crate::CmdResult;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Round trips per protocol measurement.
    #[arg(long, default_value_t = 20000)]
    iterations: u64,
    /// Packets per e1000 measurement.
    #[arg(long, default_value_t = 1000)]
    packets: u64,
    /// Round trips per batch of the nested depth measurement.
    #[arg(long, default_value_t = 200)]
    nested_iterations: u32,
    /// Rounds of the nested depth measurement (depths interleaved; best round kept).
    #[arg(long, default_value_t = 5)]
    nested_rounds: u32,
    /// Live 4 KiB mappings of the DMA map table churn measurement.
    #[arg(long, default_value_t = 100_000)]
    dma_maps: u64,
    /// TCEs per sPAPR TCE map/unmap rate measurement (a multiple of 512).
    #[arg(long, default_value_t = 16384)]
    tce_pages: u64,
    /// Guest runs of each kind for the e1000 round trip through a TCE window.
    #[arg(long, default_value_t = 5)]
    tce_runs: usize,
    /// Which benchmarks: protocol, e1000, nested (depth 1/2/3), dma (map table churn and copies), tce (sPAPR TCE IOMMU), or all.
    #[arg(long, default_value = "all", value_parser = ["all", "protocol", "e1000", "nested", "dma", "tce"])]
    only: String,
}

pub fn run(args: BenchArgs) -> CmdResult {
    let all = args.only == "all";
    // Every thread (clients, servers, device workers) on one CPU: a wake-up across the
    // (virtual) CPUs of a nested VM costs tens of microseconds, and whether it happens
    // depends on the scheduler's placement, which would make each run bimodal.
    let _pin = nestio_vfio_user::bench::Pin::current();
    println!("(all benchmark threads pinned to one CPU)");
    if all || args.only == "protocol" {
        let r = nestio_vfio_user::bench::run(args.iterations)?;
        println!("{r}");
    }
    if all || args.only == "nested" {
        nested(args.nested_iterations, args.nested_rounds)?;
        crate::bench_levels::cross_process(args.nested_iterations, args.nested_rounds)?;
    }
    if all || args.only == "dma" {
        println!("{}", nestio_dma::bench::churn(args.dma_maps, 5)?);
        println!("{}", nestio_dma::bench::copy(5)?);
    }
    if all || args.only == "tce" {
        let e1000 =
            || -> Result<nestio_vmm::DeviceConfig, Box<dyn std::error::Error + Send + Sync>> {
                let backend = nestio_net::open_backend("user", None)?;
                Ok(nestio_vmm::DeviceConfig::Local {
                    name: "e1000".into(),
                    device: E1000::new(E1000Config::new(backend))?,
                })
            };
        println!(
            "{}",
            nestio_vmm::iommu::tce_bench::run(args.tce_pages, args.tce_runs, &e1000)?
        );
    }
    if all || args.only == "e1000" {
        e1000(args.packets)?;
    }
    Ok(0)
}

/// The e1000 measurements: over vfio-user and in process, each with the register
/// path's inline receive (the default) and without it (every received frame handed to
/// the RX worker thread, as before), so one run shows the difference; then the ratios.
fn e1000(packets: u64) -> CmdResult {
    let mut rows = Vec::new();
    // (remote, inline RX, posted writes through nestio's ring) -> report.
    let mut ring_rows = Vec::new();
    for (mode, via, inline_rx, posted, ring) in [
        (IrqMode::Msi, DmaVia::SharedFd, true, true, true),
        (IrqMode::Msi, DmaVia::SharedFd, true, true, false),
        (IrqMode::Msi, DmaVia::SharedFd, false, true, true),
        (IrqMode::Msi, DmaVia::SharedFd, true, false, false),
        (IrqMode::Msi, DmaVia::Messages, true, true, true),
    ] {
        let (client, server) = served_e1000_with(inline_rx, ring)?;
        println!(
            "e1000 over vfio-user (interrupts {mode:?}, DMA {via:?}, inline RX {}, posted BAR writes {}{}):",
            on_off(inline_rx),
            on_off(posted),
            if !posted { "" } else if ring { " through the ring" } else { " over the socket" }
        );
        // Posted: BAR writes as nestio's VMM and QEMU send them (no reply awaited).
        let dev: Arc<dyn VfioDevice> = if posted {
            Arc::new(nestio_vmm::remote::PostedWrites::new(client)?)
        } else {
            Arc::new(client)
        };
        let report = e1000_bench::run(dev, mode, via, packets)?;
        println!("{report}");
        if via == DmaVia::SharedFd && posted && inline_rx {
            ring_rows.push((ring, report.rows[0].ns_per_packet));
        }
        if via == DmaVia::SharedFd && posted && ring {
            rows.push((true, inline_rx, report));
        }
        let _ = server.join();
    }
    where_the_time_goes(packets)?;
    let verdict = irq_wait_comparison(packets)?;
    // INTx (level, automasked): the driver unmasks after each interrupt by UNMASK
    // message, or by writing the unmask eventfd it gave the device.
    let mut intx = Vec::new();
    for by_eventfd in [false, true] {
        let (client, server) = served_e1000(true)?;
        let dev: Arc<dyn VfioDevice> = Arc::new(nestio_vmm::remote::PostedWrites::new(client)?);
        let mut drv = Driver::new_via(
            dev,
            e1000_bench::guest_memory()?,
            IrqMode::Intx,
            DmaVia::SharedFd,
        )?;
        drv.reset()?;
        drv.probe()?;
        drv.setup()?;
        if by_eventfd && !drv.use_unmask_eventfd()? {
            return Err("the e1000 refused an INTx unmask eventfd".into());
        }
        let gw = drv.arp(GUEST_IP, GATEWAY_IP, std::time::Duration::from_secs(10))?;
        let row = e1000_bench::measure_row(&mut drv, gw, 60, packets)?;
        println!(
            "e1000 over vfio-user, INTx unmasked by {}: 60-byte frames {:.0} ns/packet, socketpair floor {:.0} ns, ratio {:.1}x; interrupts taken {}",
            if by_eventfd { "eventfd" } else { "UNMASK message" },
            row.ns_per_packet,
            row.floor_ns,
            row.ratio(),
            drv.interrupts
        );
        intx.push(row);
        drop(drv);
        let _ = server.join();
    }
    if let [msg, efd] = intx.as_slice() {
        println!(
            "  INTx round trip, unmask eventfd over UNMASK message: x{:.2}",
            efd.ns_per_packet / msg.ns_per_packet
        );
    }
    for inline_rx in [true, false] {
        let backend = nestio_net::open_backend("user", None)?;
        let local = E1000::new(E1000Config {
            inline_rx,
            ..E1000Config::new(backend).with_msi(true)
        })?;
        println!(
            "e1000 in process (no vfio-user hop, MSI, inline RX {}):",
            on_off(inline_rx)
        );
        let dev: Arc<dyn VfioDevice> = local.clone();
        let report = e1000_bench::run(dev, IrqMode::Msi, DmaVia::SharedFd, packets)?;
        println!("{report}");
        let (wakeups, inline) = local.rx_counters();
        let trips: u64 = report.rows.iter().map(|r| r.packets).sum();
        println!(
            "  RX worker wake-ups: {wakeups} ({:.2} per round trip); frames received inline by the register path: {inline}",
            wakeups as f64 / trips.max(1) as f64
        );
        rows.push((false, inline_rx, report));
    }
    let find = |remote: bool, inline: bool| {
        rows.iter()
            .find(|(r, i, _)| *r == remote && *i == inline)
            .map(|(_, _, rep)| rep)
    };
    println!("e1000 60-byte ICMP round trip, ratios (goals: in process <= 2x the socketpair floor, vfio-user <= 1.2x in process; vfio-user with posted BAR writes):");
    if let (Some(local), [(true, ring), (false, socket)]) = (find(false, true), &ring_rows[..]) {
        let l = local.rows[0].ns_per_packet;
        println!(
            "  inline RX on, posted BAR writes over the socket (before): {socket:>6.0} ns = {:.2}x in process; through nestio's ring (after): {ring:>6.0} ns = {:.2}x in process",
            socket / l,
            ring / l
        );
    }
    for inline in [false, true] {
        if let (Some(remote), Some(local)) = (find(true, inline), find(false, inline)) {
            let (r, l) = (&remote.rows[0], &local.rows[0]);
            println!(
                "  inline RX {:>3}: in process {:>6.0} ns = {:.2}x its floor; vfio-user {:>6.0} ns = {:.2}x its floor = {:.2}x in process",
                on_off(inline),
                l.ns_per_packet,
                l.ratio(),
                r.ns_per_packet,
                r.ratio(),
                r.ns_per_packet / l.ns_per_packet
            );
        }
    }
    println!("{verdict}");
    Ok(0)
}

/// Per 60-byte round trip over vfio-user (MSI, shared-fd DMA, inline RX), posted BAR
/// writes over the socket and through nestio's ring: socket messages the server
/// handled, ring writes, kicks of a sleeping ring thread, interrupts, and the time.
fn where_the_time_goes(packets: u64) -> CmdResult {
    println!("e1000 over vfio-user, per 60-byte round trip (MSI, shared-fd DMA, inline RX on):");
    for ring in [false, true] {
        let (client, thread, server) = served_e1000_counted(true, ring)?;
        let dev = Arc::new(nestio_vmm::remote::PostedWrites::new(client)?);
        let mut drv = Driver::new_via(
            dev.clone(),
            e1000_bench::guest_memory()?,
            IrqMode::Msi,
            DmaVia::SharedFd,
        )?;
        drv.reset()?;
        drv.probe()?;
        drv.setup()?;
        let gw = drv.arp(GUEST_IP, GATEWAY_IP, std::time::Duration::from_secs(10))?;
        let ring_stats = || dev.client().posted_ring().map_or((0, 0), |r| r.stats());
        let (c0, (p0, k0), i0) = (server.stats().commands, ring_stats(), drv.interrupts);
        let row = e1000_bench::measure_row(&mut drv, gw, 60, packets)?;
        let (c1, (p1, k1), i1) = (server.stats().commands, ring_stats(), drv.interrupts);
        // Warm-up pings included: 16 of them.
        let trips = (row.packets + 16) as f64;
        println!(
            "  posted BAR writes {:<17} {:>6.0} ns = {:.2}x socketpair floor; socket messages {:.2}, ring writes {:.2}, kicks {:.2}, interrupts {:.2}",
            if ring { "through the ring:" } else { "over the socket:" },
            row.ns_per_packet,
            row.ratio(),
            (c1 - c0) as f64 / trips,
            (p1 - p0) as f64 / trips,
            (k1 - k0) as f64 / trips,
            (i1 - i0) as f64 / trips,
        );
        drop(drv);
        drop(dev);
        let _ = thread.join();
    }
    Ok(0)
}

/// One 60-byte round trip measurement of [`irq_wait_comparison`].
struct WaitRow {
    row: e1000_bench::PpsRow,
    /// Per round trip: socket messages the server handled, ring writes, kicks of a
    /// sleeping ring thread, interrupts, waits ended by the driver's look, waits that
    /// blocked.
    per_trip: [f64; 6],
}

/// Where the comparison's threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Every thread on the CPU the bench pinned itself to.
    OneCpu,
    /// The driver on that CPU, the device's threads (server and ring) on another: a
    /// vCPU and a device process on CPUs of their own.
    Split(usize),
    /// Every thread free to run on any CPU.
    Unpinned,
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placement::OneCpu => write!(f, "one CPU (all threads pinned to it)"),
            Placement::Split(c) => write!(
                f,
                "two CPUs (the driver on its CPU, the device's threads pinned to CPU {c})"
            ),
            Placement::Unpinned => write!(f, "unpinned (any thread on any CPU)"),
        }
    }
}

/// The goal's verdict from [`irq_wait_comparison`]: per placement, vfio-user over in
/// process with the driver waiting as a KVM vCPU does, next to the least any device
/// outside the driver's thread can cost there.
struct Verdict {
    /// The fastest in-process round trip (any placement, any wait), ns.
    local: f64,
    /// Per placement: the vfio-user round trip with the default (adaptive) wait, and
    /// the hand-off floor ([`e1000_bench::handoff_floor_between`]), ns.
    rows: Vec<(Placement, f64, f64)>,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = self.local;
        writeln!(
            f,
            "e1000 60-byte round trip, vfio-user over the fastest in-process round trip ({l:.0} ns), the driver waiting as a KVM vCPU does ({}); goal <= 1.2x:",
            IrqWait::default()
        )?;
        for (placement, remote, handoff) in &self.rows {
            let least = (l + handoff) / l;
            let ratio = remote / l;
            writeln!(
                f,
                "  {placement}: {remote:.0} ns = {ratio:.2}x ({}); the least any device outside the driver's thread can cost here: in process + one hand-off round trip ({handoff:.0} ns) = {least:.2}x",
                if ratio <= 1.2 {
                    "goal met"
                } else if least > 1.2 {
                    "goal below this floor"
                } else {
                    "goal not met"
                },
            )?;
        }
        Ok(())
    }
}

/// The driver's interrupt wait, adaptive halt-polling (the default), blocking,
/// fixed-window halt-polling and yield-polling ([`IrqWait`]), over vfio-user (posted
/// writes through the ring, inline RX, MSI) and in process, per [`Placement`], in
/// alternating rounds (best of each kept); with the per-round-trip counts of everything
/// that could send a message or wake a thread, and the hand-off floor measured in the
/// same rounds, placed as the driver and the device are.
fn irq_wait_comparison(packets: u64) -> Result<Verdict, Box<dyn std::error::Error + Send + Sync>> {
    const ROUNDS: usize = 7;
    let waits = [
        IrqWait::default(),
        IrqWait::Block,
        IrqWait::HaltPoll(IrqWait::DEFAULT_WINDOW),
        IrqWait::YieldPoll(IrqWait::DEFAULT_WINDOW),
    ];
    println!(
        "e1000 60-byte round trip, driver's interrupt wait: adaptive halt-polling, blocking, halt-polling (spin) or yield-polling ({ROUNDS} rounds, best kept):"
    );
    // SAFETY: sched_getcpu has no preconditions.
    let here = usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0);
    let mut placements = vec![Placement::OneCpu];
    if let Some(other) = (0..nestio_vfio_user::bench::cpus()).find(|&c| c != here) {
        placements.push(Placement::Split(other));
    }
    placements.push(Placement::Unpinned);
    // The fastest in-process round trip so far (any placement, any wait).
    let mut fastest_local = f64::INFINITY;
    let mut verdict = Vec::new();
    // One CPU first, so the later rows are compared with the fastest in-process round
    // trip of all.
    for placement in placements {
        // The driver's own thread: on `here` unless unpinned (restored when dropped).
        let _placed = match placement {
            Placement::Unpinned => nestio_vfio_user::bench::Pin::all(),
            _ => nestio_vfio_user::bench::Pin::to(here),
        };
        let device_cpu = match placement {
            Placement::Split(c) => Some(c),
            _ => None,
        };
        // [remote][wait] -> best row.
        let mut best: [[Option<WaitRow>; 4]; 2] = Default::default();
        let mut handoff = f64::INFINITY;
        for _ in 0..ROUNDS {
            handoff = handoff.min(e1000_bench::handoff_floor_between(
                (packets / 10).max(1),
                move || {
                    // The peer stands for the device: placed as its threads are, for the
                    // peer's whole life.
                    if let Some(c) = device_cpu {
                        std::mem::forget(nestio_vfio_user::bench::Pin::to(c));
                    }
                },
            ));
            for (remote, slot) in best.iter_mut().enumerate() {
                for (w, wait) in waits.iter().enumerate() {
                    let r = wait_row(remote == 1, *wait, packets, device_cpu)?;
                    if slot[w]
                        .as_ref()
                        .is_none_or(|b| r.row.ns_per_packet < b.row.ns_per_packet)
                    {
                        slot[w] = Some(r);
                    }
                }
            }
        }
        println!("  {placement} (hand-off floor {handoff:.0} ns):");
        for local in best[0].iter().flatten() {
            fastest_local = fastest_local.min(local.row.ns_per_packet);
        }
        if let Some(r) = &best[1][0] {
            verdict.push((placement, r.row.ns_per_packet, handoff));
        }
        for (w, wait) in waits.iter().enumerate() {
            let (Some(local), Some(remote)) = (&best[0][w], &best[1][w]) else {
                continue;
            };
            for (name, r) in [("in process", local), ("vfio-user ", remote)] {
                let [m, p, k, i, lk, bl] = r.per_trip;
                println!(
                    "    {wait}, {name}: {:>6.0} ns = {:.2}x socketpair floor ({:.0} ns); per round trip: socket messages {m:.2}, ring writes {p:.2}, kicks {k:.2}, interrupts {i:.2}, waits ended by the look {lk:.2}, blocked {bl:.2}",
                    r.row.ns_per_packet,
                    r.row.ratio(),
                    r.row.floor_ns,
                );
            }
            println!(
                "    {wait}: vfio-user = {:.2}x in process (goal <= 1.2x); {:.2}x the fastest in-process round trip so far ({:.0} ns)",
                remote.row.ns_per_packet / local.row.ns_per_packet,
                remote.row.ns_per_packet / fastest_local,
                fastest_local
            );
        }
    }
    Ok(Verdict {
        local: fastest_local,
        rows: verdict,
    })
}

/// One 60-byte round trip measurement with the driver waiting as `wait` says, over
/// vfio-user (`remote`; the device's threads on `device_cpu` when given) or in process.
fn wait_row(
    remote: bool,
    wait: IrqWait,
    packets: u64,
    device_cpu: Option<usize>,
) -> Result<WaitRow, Box<dyn std::error::Error + Send + Sync>> {
    let measure = |dev: Arc<dyn VfioDevice>,
                   counters: &dyn Fn() -> (u64, u64, u64)|
     -> Result<WaitRow, Box<dyn std::error::Error + Send + Sync>> {
        let mut drv = Driver::new_via(
            dev,
            e1000_bench::guest_memory()?,
            IrqMode::Msi,
            DmaVia::SharedFd,
        )?;
        drv.set_irq_wait(wait);
        drv.reset()?;
        drv.probe()?;
        drv.setup()?;
        let gw = drv.arp(GUEST_IP, GATEWAY_IP, std::time::Duration::from_secs(10))?;
        let before = (
            counters(),
            drv.interrupts,
            drv.polled_waits,
            drv.blocked_waits,
        );
        let row = e1000_bench::measure_row(&mut drv, gw, 60, packets)?;
        let after = (
            counters(),
            drv.interrupts,
            drv.polled_waits,
            drv.blocked_waits,
        );
        // Warm-up pings included: 16 of them.
        let trips = (row.packets + 16) as f64;
        let d = |a: u64, b: u64| (a - b) as f64 / trips;
        Ok(WaitRow {
            row,
            per_trip: [
                d(after.0 .0, before.0 .0),
                d(after.0 .1, before.0 .1),
                d(after.0 .2, before.0 .2),
                d(after.1, before.1),
                d(after.2, before.2),
                d(after.3, before.3),
            ],
        })
    };
    if remote {
        // The server thread (and the ring thread it starts) inherit this affinity.
        let pin = device_cpu.map(nestio_vfio_user::bench::Pin::to);
        let served = served_e1000_counted(true, true);
        drop(pin);
        let (client, thread, server) = served?;
        let dev = Arc::new(nestio_vmm::remote::PostedWrites::new(client)?);
        let d2 = dev.clone();
        let counters = move || {
            let (p, k) = d2.client().posted_ring().map_or((0, 0), |r| r.stats());
            (server.stats().commands, p, k)
        };
        let r = measure(dev, &counters);
        drop(counters);
        let _ = thread.join();
        r
    } else {
        let backend = nestio_net::open_backend("user", None)?;
        let local = E1000::new(E1000Config::new(backend).with_msi(true))?;
        measure(local, &|| (0, 0, 0))
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// An e1000 on the `user` network served over a socketpair by a server thread (the
/// thread ends when the client is dropped).
fn served_e1000(
    inline_rx: bool,
) -> Result<(Client, std::thread::JoinHandle<()>), Box<dyn std::error::Error + Send + Sync>> {
    served_e1000_with(inline_rx, true)
}

/// [`served_e1000`], with nestio's posted-write ring offered or not (`ring`).
fn served_e1000_with(
    inline_rx: bool,
    ring: bool,
) -> Result<(Client, std::thread::JoinHandle<()>), Box<dyn std::error::Error + Send + Sync>> {
    served_e1000_counted(inline_rx, ring).map(|(c, t, _)| (c, t))
}

/// [`served_e1000_with`], and the server (for its message counters).
#[allow(clippy::type_complexity)]
fn served_e1000_counted(
    inline_rx: bool,
    ring: bool,
) -> Result<
    (Client, std::thread::JoinHandle<()>, Arc<Server>),
    Box<dyn std::error::Error + Send + Sync>,
> {
    let backend = nestio_net::open_backend("user", None)?;
    let dev = E1000::new(E1000Config {
        inline_rx,
        ..E1000Config::new(backend).with_msi(true)
    })?;
    let (a, b) = UnixStream::pair()?;
    let mut config = ServerConfig::default();
    // The ring thread's polling window, for experiments (default 50 µs).
    if let Some(ring) = nestio_vfio_user::bench::ring_config_from_env() {
        config.posted_ring = Some(ring);
    }
    let server = Arc::new(Server::new(dev, config));
    let s2 = server.clone();
    let h = std::thread::spawn(move || {
        if let Err(e) = s2.serve_stream(b) {
            eprintln!("nestio bench: e1000 server session ended with an error: {e}");
        }
    });
    let client = Client::from_stream(
        a,
        ClientConfig {
            posted_ring: ring,
            ..ClientConfig::default()
        },
    )?;
    Ok((client, h, server))
}

/// ICMP payload of the small echo (42 + 16 = 58-byte frames, padded to 60).
const SMALL_PAYLOAD: usize = 16;
/// ICMP payload of the large echo: a 1500-byte IP packet, a 1514-byte frame.
const LARGE_PAYLOAD: usize = 1500 - 20 - 8;

/// Ethernet frame length of an echo with `payload` bytes (without FCS, min 60).
fn frame_len(payload: usize) -> usize {
    (14 + 20 + 8 + payload).max(60)
}

/// A workload for [`measure_depths`]: the innermost driver attaches to the stack's device,
/// ARPs the gateway, and each round trip is one ICMP echo carrying `payload` bytes.
fn echo_workload(payload: usize) -> impl FnMut(&NestedStack) -> Result<RoundTrip, String> {
    let mut seq = 0u16;
    move |stack: &NestedStack| -> Result<RoundTrip, String> {
        let dev: Arc<dyn VfioDevice> = stack.device();
        let mut drv = Driver::new_via(dev, stack.ram().clone(), IrqMode::Msi, DmaVia::SharedFd)
            .map_err(|e| e.to_string())?;
        drv.reset().map_err(|e| e.to_string())?;
        drv.probe().map_err(|e| e.to_string())?;
        drv.setup().map_err(|e| e.to_string())?;
        let gw = drv
            .arp(
                GUEST_IP,
                GATEWAY_IP,
                nestio_nested::stack::ROUND_TRIP_TIMEOUT,
            )
            .map_err(|e| e.to_string())?;
        let data: Vec<u8> = (0..payload).map(|i| i as u8).collect();
        seq = seq.wrapping_add(1000);
        let mut s = seq;
        Ok(Box::new(move || {
            s = s.wrapping_add(1);
            drv.ping(
                GUEST_IP,
                gw,
                GATEWAY_IP,
                0x6e,
                s,
                &data,
                nestio_nested::stack::ROUND_TRIP_TIMEOUT,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        }))
    }
}

/// Depth 1, 2 and 3 of an in-process nested stack: round trip, region access and DMA
/// throughput, each as a ratio to depth 1.
fn nested(iterations: u32, rounds: u32) -> CmdResult {
    let backend = nestio_net::open_backend("user", None)?;
    let dev: Arc<dyn VfioDevice> = E1000::new(E1000Config::new(backend).with_msi(true))?;
    // The device side's BAR channels (level 1 opens one for the innermost level).
    let channels = BarChannels::new(dev.clone())?;
    let path = nestio_nested::stack::socket_path("bench-l0");
    let listener = nestio_vfio_user::bind(&path)?;
    // Level 0 serves one stack after another; the thread ends with the process.
    std::thread::spawn(move || {
        let server = Server::new(dev, ServerConfig::default());
        if let Err(e) = server.serve_listener(listener) {
            eprintln!("nestio bench: level-0 e1000 server ended with an error: {e}");
        }
    });
    let depths = [1, 2, 3];
    let cfg = StackConfig::default();
    let mut small = echo_workload(SMALL_PAYLOAD);
    let mut large = echo_workload(LARGE_PAYLOAD);
    // Small and large rounds alternate, so load on the shared machine hits both alike.
    // Every BAR access passed level by level (mediated), and with a BAR channel from
    // depth 2 on (direct), interleaved so both see the same machine load.
    let mut small_rounds = [Vec::new(), Vec::new()];
    let mut large_rounds = [Vec::new(), Vec::new()];
    let mut measured = || -> Result<(), nestio_nested::StackError> {
        for _ in 0..rounds.max(1) {
            for (i, ch) in [None, Some(&channels)].into_iter().enumerate() {
                small_rounds[i].push(measure_depths_with(
                    &path, &depths, iterations, cfg, ch, &mut small,
                )?);
                large_rounds[i].push(measure_depths_with(
                    &path, &depths, iterations, cfg, ch, &mut large,
                )?);
            }
        }
        Ok(())
    };
    let r = measured();
    let _ = std::fs::remove_file(&path);
    r?;
    let mut summary = Vec::new();
    for (i, how) in [
        "every BAR access forwarded by each level",
        "BAR channel from the innermost level to the device",
    ]
    .iter()
    .enumerate()
    {
        let (small_rows, large_rows) = (best_rows(&small_rounds[i]), best_rows(&large_rounds[i]));
        println!(
            "nested e1000 ({how}; in-process levels over socketpairs, shared-memory DMA, MSI; \
             best of {rounds} rounds), {SMALL_PAYLOAD}-byte ICMP echo:"
        );
        print_rows(&small_rows);
        println!("nested e1000 ({how}), {LARGE_PAYLOAD}-byte ICMP echo (1500-byte IP packets):");
        print_rows(&large_rows);
        print_dma(&small_rows, &large_rows);
        if let Some(deepest) = small_rows.last() {
            summary.push((
                how,
                deepest.depth,
                deepest.bar_ratio,
                deepest.round_trip_ratio,
            ));
        }
    }
    println!("nested register access at the deepest level over depth 1 (goal <= 1.5x):");
    for (how, depth, bar, rt) in summary {
        println!(
            "  {how}: depth {depth} register read x{}, round trip x{rt:.2}",
            bar.map(|b| format!("{b:.2}"))
                .unwrap_or_else(|| "n/a".into())
        );
    }
    Ok(0)
}

/// DMA throughput per depth from the two runs: frame bytes moved by the device per
/// large round trip (read for TX, written for RX) over its time, and the marginal cost
/// of the extra bytes (large minus small round trip, per KiB moved).
fn print_dma(small: &[DepthRow], large: &[DepthRow]) {
    let moved = 2.0 * frame_len(LARGE_PAYLOAD) as f64;
    let extra = 2.0 * (frame_len(LARGE_PAYLOAD) - frame_len(SMALL_PAYLOAD)) as f64;
    let mut base: Option<(f64, f64)> = None;
    println!("nested DMA throughput ({moved} frame bytes per 1500-byte round trip):");
    for (s, l) in small.iter().zip(large) {
        let mb_s = moved / l.round_trip_ns * 1e3;
        // Negative when noise exceeds the extra bytes' cost: shown as below noise.
        let ns_per_kib = (l.round_trip_ns - s.round_trip_ns) / extra * 1024.0;
        let (b_tp, b_kib) = *base.get_or_insert((mb_s, ns_per_kib));
        let marginal = if ns_per_kib <= 0.0 {
            "below noise".to_string()
        } else if b_kib > 0.0 {
            format!("{ns_per_kib:.1} ns per KiB (x{:.2})", ns_per_kib / b_kib)
        } else {
            format!("{ns_per_kib:.1} ns per KiB")
        };
        println!(
            "depth {}: {:.1} MB/s (x{:.2}), marginal DMA cost {marginal}",
            l.depth,
            mb_s,
            mb_s / b_tp,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_names_met_missed_and_below_the_floor() {
        let v = Verdict {
            local: 5000.0,
            rows: vec![
                // 1.10x: met.
                (Placement::Unpinned, 5500.0, 400.0),
                // 1.5x with a floor of 1.08x: not met.
                (Placement::Split(1), 7500.0, 400.0),
                // 2x with a floor of 1.4x: the goal is below what any device can do.
                (Placement::OneCpu, 10000.0, 2000.0),
            ],
        };
        let text = v.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].contains("unpinned") && lines[1].contains("1.10x (goal met)"));
        assert!(lines[2].contains("CPU 1") && lines[2].contains("1.50x (goal not met)"));
        assert!(lines[2].ends_with("(400 ns) = 1.08x"), "{}", lines[2]);
        assert!(lines[3].contains("2.00x (goal below this floor)"));
        assert!(lines[3].ends_with("(2000 ns) = 1.40x"), "{}", lines[3]);
    }

    #[test]
    fn a_short_e1000_bench_runs_every_placement() {
        let v = irq_wait_comparison(20).expect("the comparison runs");
        assert!(v.local.is_finite() && v.local > 0.0);
        let placements: Vec<Placement> = v.rows.iter().map(|r| r.0).collect();
        assert_eq!(placements.first(), Some(&Placement::OneCpu));
        assert_eq!(placements.last(), Some(&Placement::Unpinned));
        if nestio_vfio_user::bench::cpus() > 1 {
            assert_eq!(placements.len(), 3, "{placements:?}");
        }
        for (p, remote, handoff) in &v.rows {
            assert!(remote.is_finite() && *remote > 0.0, "{p}: {remote}");
            assert!(handoff.is_finite() && *handoff > 0.0, "{p}: {handoff}");
        }
    }
}
