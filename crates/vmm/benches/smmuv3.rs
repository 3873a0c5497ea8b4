//! The SMMUv3 vIOMMU in one run, no vIOMMU vs shadow vs nested, with ratios:
//! - the model's per-translation cost (IOTLB hit and full 4-level walk), and a
//!   device's 64-byte DMA without a vIOMMU or in shadow mode (its DMA_MAP table does
//!   the translation) against nested mode (the device walks the guest's stage 1,
//!   `Stage1Dma`, IOTLB hit);
//! - map/unmap churn: a guest PTE change + TLBI + CMD_SYNC per unmap and per map,
//!   with 512 pages mapped — shadow with TLBI_NH_VA (range re-sync), shadow with
//!   TLBI_NH_ASID (whole re-sync), nested (the commands forwarded to an in-process
//!   device port, no DMA_MAP at all) — against the domain's own map/unmap (the floor);
//!   no vIOMMU has nothing to churn (all RAM mapped once);
//! - the e1000ping round trip (ARP + echo, TSC cycles reported by the guest): in
//!   process without a vIOMMU and in shadow mode, and over vfio-user (the e1000 served
//!   from a thread of this process) without a vIOMMU, in shadow and in nested mode.
//!
//! `cargo bench -p nestio-vmm --bench smmuv3` (the e1000 part needs /dev/kvm). Nothing
//! asserts a time: ratios are against a floor measured in the same run.

use std::sync::Arc;
use std::time::Instant;

use nestio_dma::Prot;
use nestio_dma::{DmaError, DmaSpace};
use nestio_iommu::smmuv3::stage1_dma::Stage1Dma;
use nestio_iommu::smmuv3::{regs, FlatMemory, Smmu, Transaction};
use nestio_vmm::bus::BusDevice;
use nestio_vmm::iommu::smmuv3::{
    GuestRamView, InvalidateOutcome, NestedCaps, NestedIommuPort, NestedPortError, PortFault,
    Smmuv3, Viommu,
};
use nestio_vmm::iommu::{DmaDomain, GuestRamFile, ShadowDomain, StreamId};
use nestio_vmm::memory::GuestRam;
use nestio_vmm::{payloads, StopReason, Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

const PTE: u64 = 3 | (1 << 10) | (1 << 6);

/// Tables for 512 pages at IOVA 0.. in `write(addr, value)` terms.
fn tables(write: &mut dyn FnMut(u64, u64)) {
    write(0x10_0000 + 8 * 64, 1 | (5 << 1) | 0x13_0000);
    write(
        0x13_0000,
        16 | (1 << 31) | (1 << 41) | (5 << 32) | (1 << 45) | (1 << 46) | (1 << 48),
    );
    write(0x13_0008, 0x14_0000);
    write(0x14_0000, 0x15_0000 | 3);
    write(0x15_0000, 0x15_1000 | 3);
    write(0x15_1000, 0x15_2000 | 3);
    for i in 0..512u64 {
        write(0x15_2000 + i * 8, (0x40_0000 + i * 0x1000) | PTE);
    }
}

fn translation_cost() {
    let mem = FlatMemory::new(0, 16 << 20);
    tables(&mut |a, v| mem.write_u64(a, v).unwrap());
    let mut smmu = Smmu::new();
    smmu.write(&mem, regs::STRTAB_BASE, 8, 0x10_0000);
    smmu.write(&mem, regs::STRTAB_BASE_CFG, 4, 5);
    smmu.write(&mem, regs::CMDQ_BASE, 8, 0x11_0000 | 4);
    smmu.write(&mem, regs::CR0, 4, 0xd);
    let t = |i: u64| Transaction {
        sid: 8,
        ssid: None,
        addr: (i % 512) * 0x1000,
        write: false,
    };
    let n = 200_000u64;
    let start = Instant::now();
    for i in 0..n {
        smmu.translate(&mem, t(i)).unwrap();
    }
    let hit = start.elapsed().as_nanos() as f64 / n as f64;
    let start = Instant::now();
    for i in 0..n / 10 {
        smmu.probe(&mem, t(i)).unwrap();
    }
    let walk = start.elapsed().as_nanos() as f64 / (n / 10) as f64;
    println!("smmuv3 translate: {hit:.0} ns (IOTLB hit), {walk:.0} ns (STE + CD + 4-level walk)");
}

/// Guest RAM as a device's DMA space (stage 2 = IPA = GPA).
struct GuestDma(vm_memory::GuestMemoryMmap);

impl DmaSpace for GuestDma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.0
            .read_slice(buf, GuestAddress(iova))
            .map_err(|_| DmaError::Unmapped {
                iova,
                len: buf.len() as u64,
                access: nestio_dma::Access::Read,
            })
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.0
            .write_slice(data, GuestAddress(iova))
            .map_err(|_| DmaError::Unmapped {
                iova,
                len: data.len() as u64,
                access: nestio_dma::Access::Write,
            })
    }
}

/// A nested device in this process: the guest's stage 1 walked by `Stage1Dma`.
struct LocalPort {
    lower: Arc<dyn DmaSpace>,
    s1: parking_lot::Mutex<Option<Arc<Stage1Dma>>>,
}

impl NestedIommuPort for LocalPort {
    fn nested_caps(&self) -> Option<NestedCaps> {
        Some(NestedCaps {
            ias: 48,
            oas: 48,
            granules: vec![4096],
            ssid_bits: 0,
        })
    }
    fn bind(&self, vsid: u32, ste: [u64; 2]) -> Result<(), NestedPortError> {
        let s1 = Stage1Dma::bind(self.lower.clone(), vsid, ste).map_err(|e| {
            NestedPortError::Refused {
                what: "BIND",
                detail: e.to_string(),
            }
        })?;
        *self.s1.lock() = Some(Arc::new(s1));
        Ok(())
    }
    fn unbind(&self) -> Result<(), NestedPortError> {
        *self.s1.lock() = None;
        Ok(())
    }
    fn invalidate(&self, cmds: &[[u64; 2]]) -> Result<InvalidateOutcome, NestedPortError> {
        let s1 = self.s1.lock().clone();
        if let Some(s1) = s1 {
            for (i, c) in cmds.iter().enumerate() {
                if s1.command(*c).is_err() {
                    return Ok(InvalidateOutcome {
                        done: i as u32,
                        cerror: 1,
                    });
                }
            }
            s1.quiesce();
        }
        Ok(InvalidateOutcome {
            done: cmds.len() as u32,
            cerror: 0,
        })
    }
    fn take_faults(&self) -> Option<std::sync::mpsc::Receiver<PortFault>> {
        None
    }
}

fn ns_per(n: u64, f: impl FnMut(u64)) -> f64 {
    let mut f = f;
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn device_dma_cost() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let mem = ram.memory().clone();
    tables(&mut |a, v| mem.write_obj(v, GuestAddress(a)).unwrap());
    let flat: Arc<dyn DmaSpace> = Arc::new(GuestDma(mem.clone()));
    let s1 = Stage1Dma::bind(flat.clone(), 8, [1 | (5 << 1) | 0x13_0000, 0]).unwrap();
    let mut buf = [0u8; 64];
    let n = 200_000;
    let none = ns_per(n, |i| {
        flat.read(0x40_0000 + (i % 512) * 0x1000, &mut buf).unwrap()
    });
    let nested = ns_per(n, |i| s1.read((i % 512) * 0x1000, &mut buf).unwrap());
    println!(
        "device 64-byte DMA read: no vIOMMU {none:.0} ns, shadow {none:.0} ns (the DMA_MAP table translates: \
         same path), nested {nested:.0} ns (guest stage 1 in the device, IOTLB hit): nested/none {:.1}x",
        nested / none
    );
}

/// Guest RAM with 512 pages mapped at IOVA 0.. for stream 00:01.0 behind an enabled
/// SMMU (nested through `port` if given, else shadowed): RAM, SMMU, domain.
fn churn_rig(port: Option<Arc<dyn NestedIommuPort>>) -> (GuestRam, Arc<Smmuv3>, Arc<ShadowDomain>) {
    let ram = GuestRam::new(16 << 20).unwrap();
    let mem = ram.memory().clone();
    let domain = Arc::new(ShadowDomain::new(GuestRamFile::of(&ram)));
    let stream = StreamId::pci(0, 1, 0);
    let smmu = Arc::new(Smmuv3::new(
        GuestRamView::new(mem.clone(), None),
        domain.clone(),
        16 << 20,
    ));
    match port {
        Some(p) => {
            smmu.add_nested_stream(stream, p).unwrap();
        }
        None => smmu.add_stream(stream).unwrap(),
    }
    tables(&mut |a, v| mem.write_obj(v, GuestAddress(a)).unwrap());
    let reg = |off: u64, v: u64, n: usize| smmu.write(off, &v.to_le_bytes()[..n]).unwrap();
    reg(regs::STRTAB_BASE, 0x10_0000, 8);
    reg(regs::STRTAB_BASE_CFG, 5, 4);
    reg(regs::CMDQ_BASE, 0x11_0000 | 4, 8);
    reg(regs::CR0, 0xd, 4);
    (ram, smmu, domain)
}

/// Per unmap+map cycle of page 7: (ns, DMA messages, guest-memory reads).
fn churn_cycle(smmu: &Smmuv3, ram: &GuestRam, tlbi: u64) -> (f64, f64, f64) {
    let mem = ram.memory().clone();
    let mut prod = smmu_prod(smmu);
    let mut cmd = |d0: u64, d1: u64| {
        let slot = 0x11_0000 + u64::from(prod & 15) * 16;
        mem.write_obj(d0, GuestAddress(slot)).unwrap();
        mem.write_obj(d1, GuestAddress(slot + 8)).unwrap();
        prod = (prod + 1) & 31;
        smmu.write(regs::CMDQ_PROD, &prod.to_le_bytes()).unwrap();
    };
    let (s0, r0) = (smmu.stats(), smmu.memory_reads());
    let n = 2000u64;
    let ns = ns_per(n, |i| {
        let pte = 0x15_2000 + 7 * 8;
        mem.write_obj(0u64, GuestAddress(pte)).unwrap();
        cmd(tlbi, 0x7000);
        cmd(0x46, 0);
        mem.write_obj(
            (0x40_0000 + 7 * 0x1000 + (i & 1) * 0x10_0000) | PTE,
            GuestAddress(pte),
        )
        .unwrap();
        cmd(tlbi, 0x7000);
        cmd(0x46, 0);
    });
    let (s1, r1) = (smmu.stats(), smmu.memory_reads());
    let msgs = (s1.dma_maps + s1.dma_unmaps - s0.dma_maps - s0.dma_unmaps) as f64 / n as f64;
    (ns, msgs, (r1 - r0) as f64 / n as f64)
}

fn smmu_prod(smmu: &Smmuv3) -> u32 {
    let mut b = [0u8; 4];
    smmu.read(regs::CMDQ_PROD, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn churn() {
    let (ram, smmu, _) = churn_rig(None);
    let range = churn_cycle(&smmu, &ram, 0x12 | (1 << 48));
    let full = churn_cycle(&smmu, &ram, 0x11 | (1 << 48));
    let port = Arc::new(LocalPort {
        lower: Arc::new(GuestDma(ram.memory().clone())),
        s1: parking_lot::Mutex::new(None),
    });
    let (nram, nsmmu, _) = churn_rig(Some(port));
    let nested = churn_cycle(&nsmmu, &nram, 0x12 | (1 << 48));
    let (_, _, domain) = churn_rig(None);
    let stream = StreamId::pci(0, 1, 0);
    let floor = ns_per(2000, |_| {
        domain.unmap(stream, 0x20_0000, 0x1000).unwrap();
        domain
            .map(stream, 0x20_0000, 0x20_0000, 0x1000, Prot::RW)
            .unwrap();
    });
    println!("map/unmap churn, 512 pages mapped, per unmap+map cycle (guest PTE + TLBI + CMD_SYNC each; no device attached: VMM-side cost):");
    for (name, (ns, msgs, reads)) in [
        ("shadow, TLBI_NH_VA (range re-sync)", range),
        ("shadow, TLBI_NH_ASID (whole re-sync)", full),
        ("nested (forwarded to the device's stage 1)", nested),
    ] {
        println!(
            "  {name}: {:.1} us, {msgs:.1} DMA_MAP/UNMAP, {reads:.0} guest-memory reads; {:.1}x the ShadowDomain floor",
            ns / 1000.0,
            ns / floor
        );
    }
    println!(
        "  ShadowDomain map/unmap alone (floor): {:.1} us; no vIOMMU: nothing to churn (all RAM mapped once); \
         whole/range re-sync {:.1}x",
        floor / 1000.0,
        full.0 / range.0
    );
}

/// The guest's reported round trip in TSC cycles, or None.
fn run_rtt(cfg: VmConfig, console: Arc<parking_lot::Mutex<Vec<u8>>>) -> Option<u64> {
    let report = Vm::new(cfg).ok()?.run().ok()?;
    if report.outcome != StopReason::GuestExit(0) {
        return None;
    }
    let out = String::from_utf8_lossy(&console.lock()).into_owned();
    out.split("(rtt ").nth(1)?.split(' ').next()?.parse().ok()
}

fn e1000() -> Option<Arc<dyn nestio_device_model::VfioDevice>> {
    let backend = nestio_net::open_backend("user", None).ok()?;
    let dev = nestio_emulated::e1000::E1000::new(nestio_emulated::e1000::E1000Config::new(backend))
        .ok()?;
    Some(dev)
}

/// One e1000ping run: in process (`remote` false) or over vfio-user with the e1000
/// served from a thread.
fn rtt(viommu: Option<Viommu>, remote: bool) -> Option<u64> {
    let console = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut cfg = VmConfig::new(payloads::E1000PING);
    cfg.console = nestio_vmm::ConsoleOutput::Buffer(console.clone());
    cfg.cmdline = "irq=intx".into();
    if viommu.is_some() {
        cfg.cmdline += &format!(" smmu={:#x}", nestio_vmm::platform::PLATFORM_MMIO_WINDOW.0);
        cfg.viommu = viommu;
    }
    if !remote {
        cfg.devices.push(nestio_vmm::DeviceConfig::Local {
            name: "e1000".into(),
            device: e1000()?,
        });
        return run_rtt(cfg, console);
    }
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let socket = std::env::temp_dir().join(format!(
        "nestio-bench-smmuv3-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let listener = nestio_vfio_user::bind(&socket).ok()?;
    let server = Arc::new(nestio_vfio_user::Server::new(
        e1000()?,
        nestio_vfio_user::ServerConfig::default(),
    ));
    let s = server.clone();
    let t = std::thread::spawn(move || {
        let _ = s.serve_stream(listener.accept().ok()?.0);
        Some(())
    });
    cfg.devices.push(nestio_vmm::DeviceConfig::VfioUser {
        socket: socket.clone(),
    });
    let r = run_rtt(cfg, console);
    let _ = t.join();
    let _ = std::fs::remove_file(&socket);
    r
}

fn median(v: Option<Viommu>, remote: bool) -> Option<u64> {
    let mut r: Vec<u64> = (0..5).filter_map(|_| rtt(v, remote)).collect();
    r.sort_unstable();
    r.get(r.len() / 2).copied()
}

fn main() {
    translation_cost();
    device_dma_cost();
    churn();
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: /dev/kvm is missing; no e1000 round trip");
        return;
    }
    for (place, remote, modes) in [
        ("in process", false, &[None, Some(Viommu::Smmuv3)][..]),
        (
            "over vfio-user",
            true,
            &[None, Some(Viommu::Smmuv3), Some(Viommu::Smmuv3Nested)][..],
        ),
    ] {
        let floor = median(None, remote);
        for &m in modes {
            let name = match m {
                None => "no vIOMMU",
                Some(Viommu::Smmuv3) => "SMMUv3 shadow",
                Some(Viommu::Smmuv3Nested) => "SMMUv3 nested",
            };
            let got = if m.is_none() {
                floor
            } else {
                median(m, remote)
            };
            match (got, floor) {
                (Some(c), Some(f)) => println!(
                    "e1000 ARP + echo round trip {place}, {name}: median {c} TSC cycles of 5 runs ({:.2}x no vIOMMU)",
                    c as f64 / f as f64
                ),
                (Some(c), None) => {
                    println!("e1000 round trip {place}, {name}: median {c} TSC cycles")
                }
                (None, _) => println!("e1000 round trip {place}, {name}: no successful run"),
            }
        }
    }
}
