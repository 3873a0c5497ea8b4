//! `nestio bench`: costs measured against floors measured in the same run, printed as
//! ratios (this machine is shared and noisy: compare ratios, not absolute times). All
//! threads run on one CPU (see `nestio_vfio_user::bench::Pin`).
//!
//! `--only nested` runs `nestio_nested::stack::measure_depths` on an in-process stack
//! (level 0's e1000 on a socket, exporters over socketpairs) at depth 1, 2 and 3, in
//! alternating rounds (best of each kept): with a small ICMP echo (round trip, region
//! access cost) and with 1500-byte IP packets (DMA throughput: the frame bytes the
//! device moves per round trip over its time, and the marginal DMA cost per KiB between
//! the two sizes), all as ratios to depth 1.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use clap::Args;
use nestio_device_model::VfioDevice;
use nestio_emulated::e1000::{E1000Config, E1000};
use nestio_emulated::e1000_bench::{self, DmaVia, Driver, IrqMode, GATEWAY_IP, GUEST_IP};
use nestio_nested::stack::{best_rows, measure_depths, print_rows};
use nestio_nested::{DepthRow, NestedStack, RoundTrip, StackConfig};
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
        for (mode, via) in [
            (IrqMode::Msi, DmaVia::SharedFd),
            (IrqMode::Msi, DmaVia::Messages),
        ] {
            let (client, server) = served_e1000()?;
            println!("e1000 over vfio-user (interrupts {mode:?}, DMA {via:?}):");
            let dev: Arc<dyn VfioDevice> = client.clone();
            let report = e1000_bench::run(dev, mode, via, args.packets)?;
            println!("{report}");
            drop(client);
            let _ = server.join();
        }
        let backend = nestio_net::open_backend("user", None)?;
        let local = E1000::new(E1000Config::new(backend))?;
        println!("e1000 in process (no vfio-user hop, MSI):");
        println!(
            "{}",
            e1000_bench::run(local, IrqMode::Msi, DmaVia::SharedFd, args.packets)?
        );
    }
    Ok(0)
}

/// An e1000 on the `user` network served over a socketpair by a server thread.
fn served_e1000(
) -> Result<(Arc<Client>, std::thread::JoinHandle<()>), Box<dyn std::error::Error + Send + Sync>> {
    let backend = nestio_net::open_backend("user", None)?;
    let dev = E1000::new(E1000Config::new(backend))?;
    let (a, b) = UnixStream::pair()?;
    let h = std::thread::spawn(move || {
        let server = Server::new(dev, ServerConfig::default());
        if let Err(e) = server.serve_stream(b) {
            eprintln!("nestio bench: e1000 server session ended with an error: {e}");
        }
    });
    let client = Arc::new(Client::from_stream(a, ClientConfig::default())?);
    Ok((client, h))
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
        let dev: Arc<dyn VfioDevice> = stack.client();
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
    let dev: Arc<dyn VfioDevice> = E1000::new(E1000Config::new(backend))?;
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
    let mut small_rounds = Vec::new();
    let mut large_rounds = Vec::new();
    let mut measured = || -> Result<(), nestio_nested::StackError> {
        for _ in 0..rounds.max(1) {
            small_rounds.push(measure_depths(&path, &depths, iterations, cfg, &mut small)?);
            large_rounds.push(measure_depths(&path, &depths, iterations, cfg, &mut large)?);
        }
        Ok(())
    };
    let r = measured();
    let _ = std::fs::remove_file(&path);
    r?;
    let (small_rows, large_rows) = (best_rows(&small_rounds), best_rows(&large_rounds));
    println!(
        "nested e1000 (in-process levels over socketpairs, shared-memory DMA, MSI; best of \
         {rounds} rounds), {SMALL_PAYLOAD}-byte ICMP echo:"
    );
    print_rows(&small_rows);
    println!("nested e1000, {LARGE_PAYLOAD}-byte ICMP echo (1500-byte IP packets):");
    print_rows(&large_rows);
    print_dma(&small_rows, &large_rows);
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
