//! Benchmark of the sPAPR TCE IOMMU (feature `harness`; `nestio bench --only tce`).
//!
//! In one run:
//! - **map/unmap rate** through the real hypercall entry (`Hypercalls::dispatch`, the
//!   model, and the DMA_MAP/DMA_UNMAP it issues to a device with a map table):
//!   `H_PUT_TCE` one page at a time, `H_PUT_TCE_INDIRECT` 512 pages per call,
//!   `H_STUFF_TCE` clearing 512 pages per call; each in ns per TCE, and the model alone
//!   (no device) as the floor;
//! - **e1000 round trip** of the `e1000ping` guest through a dynamic TCE window at
//!   1 << 59 against the same guest without an IOMMU (identity domain), in TSC cycles
//!   as the guest measures them, median of alternating runs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use nestio_iommu::tce::PeConfig;

use super::table_device::TableDevice;
use super::tce::TceIommu;
use super::{GuestRamFile, StreamId};
use crate::hypercall::papr::{H_PUT_TCE, H_PUT_TCE_INDIRECT, H_STUFF_TCE, H_SUCCESS};
use crate::hypercall::{HcallContext, Hypercalls};
use crate::memory::GuestRam;

type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// One map/unmap rate.
#[derive(Debug, Clone)]
pub struct RateRow {
    /// What was measured.
    pub what: &'static str,
    /// TCEs written.
    pub tces: u64,
    /// Hypercalls made.
    pub calls: u64,
    /// Device mappings issued.
    pub device_maps: u64,
    /// Nanoseconds per TCE.
    pub ns_per_tce: f64,
}

/// The e1000 round trips.
#[derive(Debug, Clone)]
pub struct RoundTrips {
    /// Median ping round trip without an IOMMU (TSC cycles).
    pub identity: u64,
    /// Median ping round trip through the TCE window (TSC cycles).
    pub tce: u64,
    /// Runs of each.
    pub runs: usize,
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct TceBench {
    /// Map/unmap rates.
    pub rates: Vec<RateRow>,
    /// e1000 round trips (None without /dev/kvm).
    pub round_trips: Option<RoundTrips>,
}

impl std::fmt::Display for TceBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "sPAPR TCE IOMMU: map/unmap through the hypercall entry (4 KiB pages)"
        )?;
        writeln!(
            f,
            "  {:<44} {:>8} {:>7} {:>11} {:>10}",
            "", "TCEs", "calls", "dev maps", "ns/TCE"
        )?;
        for r in &self.rates {
            writeln!(
                f,
                "  {:<44} {:>8} {:>7} {:>11} {:>10.1}",
                r.what, r.tces, r.calls, r.device_maps, r.ns_per_tce
            )?;
        }
        match &self.round_trips {
            Some(rt) => writeln!(
                f,
                "e1000ping round trip (median of {} runs each, TSC cycles): no IOMMU {}, TCE window at 1<<59 {} ({:.2}x)",
                rt.runs,
                rt.identity,
                rt.tce,
                rt.tce as f64 / rt.identity.max(1) as f64
            ),
            None => writeln!(f, "e1000ping round trip: SKIP (no /dev/kvm)"),
        }
    }
}

struct Rig {
    ram: GuestRam,
    hc: Hypercalls,
    dev: Arc<TableDevice>,
}

fn rig(with_device: bool) -> Result<Rig, BenchError> {
    let ram = GuestRam::new(64 << 20)?;
    let iommu = TceIommu::new(PeConfig::default())?;
    let dom = iommu.domain_factory().build(GuestRamFile::of(&ram));
    let dev = Arc::new(TableDevice::new(1 << 20));
    if with_device {
        dom.attach(StreamId::pci(0, 1, 0), dev.clone())?;
    }
    let mut hc = Hypercalls::new();
    crate::hypercall::tce::register(&mut hc, &iommu)?;
    Ok(Rig { ram, hc, dev })
}

const LIOBN: u64 = 0x8000_0000;

fn call(r: &Rig, ctx: &HcallContext<'_>, op: u64, a: [u64; 4]) -> Result<(), BenchError> {
    let s =
        r.hc.dispatch(ctx, op, [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0])
            .status;
    if s != H_SUCCESS {
        return Err(format!("hypercall {op:#x} failed: {s}").into());
    }
    Ok(())
}

fn rates(pages: u64) -> Result<Vec<RateRow>, BenchError> {
    let mut rows = Vec::new();
    for with_device in [false, true] {
        // Single: map `pages` pages one by one, then clear them one by one.
        let r = rig(with_device)?;
        let ctx = HcallContext::new(r.ram.memory(), 0);
        let t = Instant::now();
        for i in 0..pages {
            call(
                &r,
                &ctx,
                H_PUT_TCE.raw(),
                [LIOBN, i << 12, (i << 12) | 3, 0],
            )?;
        }
        for i in 0..pages {
            call(&r, &ctx, H_PUT_TCE.raw(), [LIOBN, i << 12, 0, 0])?;
        }
        rows.push(RateRow {
            what: if with_device {
                "H_PUT_TCE map + clear"
            } else {
                "H_PUT_TCE map + clear (model only)"
            },
            tces: 2 * pages,
            calls: 2 * pages,
            device_maps: r.dev.maps.load(Ordering::Relaxed),
            ns_per_tce: t.elapsed().as_nanos() as f64 / (2 * pages) as f64,
        });
        // Indirect 512 per call, then H_STUFF_TCE 0 over each 512.
        let r = rig(with_device)?;
        let ctx = HcallContext::new(r.ram.memory(), 0);
        let list = 0x3f0_0000u64;
        let batches = pages / 512;
        let t = Instant::now();
        for b in 0..batches {
            for k in 0..512u64 {
                let gpa = (b * 512 + k) << 12;
                ctx.mem.write_be_u64(list + 8 * k, gpa | 3)?;
            }
            call(
                &r,
                &ctx,
                H_PUT_TCE_INDIRECT.raw(),
                [LIOBN, (b * 512) << 12, list, 512],
            )?;
        }
        let mapped = t.elapsed();
        let t = Instant::now();
        for b in 0..batches {
            call(
                &r,
                &ctx,
                H_STUFF_TCE.raw(),
                [LIOBN, (b * 512) << 12, 0, 512],
            )?;
        }
        let cleared = t.elapsed();
        let n = batches * 512;
        rows.push(RateRow {
            what: if with_device {
                "H_PUT_TCE_INDIRECT x512 map"
            } else {
                "H_PUT_TCE_INDIRECT x512 map (model only)"
            },
            tces: n,
            calls: batches,
            device_maps: r.dev.maps.load(Ordering::Relaxed),
            ns_per_tce: mapped.as_nanos() as f64 / n as f64,
        });
        rows.push(RateRow {
            what: if with_device {
                "H_STUFF_TCE x512 clear"
            } else {
                "H_STUFF_TCE x512 clear (model only)"
            },
            tces: n,
            calls: batches,
            device_maps: 0,
            ns_per_tce: cleared.as_nanos() as f64 / n as f64,
        });
    }
    Ok(rows)
}

fn ping_cycles(tce: bool, dev: crate::DeviceConfig) -> Result<u64, BenchError> {
    let mut cfg = crate::VmConfig::new(crate::payloads::E1000PING);
    let buf = Arc::new(parking_lot::Mutex::new(Vec::new()));
    cfg.console = crate::ConsoleOutput::Buffer(buf.clone());
    cfg.devices.push(dev);
    if tce {
        let iommu = TceIommu::new(PeConfig::default())?;
        crate::hypercall::tce::register(&mut cfg.hypercalls, &iommu)?;
        cfg.dma_domain = Some(iommu.domain_factory());
        cfg.cmdline = "irq=msi tce=59".into();
    } else {
        cfg.cmdline = "irq=msi".into();
    }
    let report = crate::Vm::new(cfg)?.run()?;
    let out = String::from_utf8_lossy(&buf.lock()).into_owned();
    if report.outcome != crate::StopReason::GuestExit(0) {
        return Err(format!("e1000ping failed: {:?}: {out}", report.outcome).into());
    }
    out.split("ping: echo reply from 10.0.2.2 seq=1 (rtt ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("no rtt in: {out}").into())
}

/// Run the benchmark: `pages` TCEs per rate (a multiple of 512), `runs` guest runs of
/// each kind for the round trip, each with a fresh e1000 from `e1000`.
pub fn run(
    pages: u64,
    runs: usize,
    e1000: &dyn Fn() -> Result<crate::DeviceConfig, BenchError>,
) -> Result<TceBench, BenchError> {
    let rates = rates(pages.max(512))?;
    let round_trips = if std::path::Path::new("/dev/kvm").exists() {
        let (mut id, mut tce) = (Vec::new(), Vec::new());
        for _ in 0..runs.max(1) {
            id.push(ping_cycles(false, e1000()?)?);
            tce.push(ping_cycles(true, e1000()?)?);
        }
        id.sort_unstable();
        tce.sort_unstable();
        Some(RoundTrips {
            identity: id[id.len() / 2],
            tce: tce[tce.len() / 2],
            runs: id.len(),
        })
    } else {
        None
    };
    Ok(TceBench { rates, round_trips })
}
