//! The SMMUv3 vIOMMU in one run: the model's per-translation cost (IOTLB hit and
//! full 4-level walk), shadow-mode map/unmap churn (guest PTE write + TLBI_NH_VA +
//! CMD_SYNC, each re-synced into DMA_MAP/DMA_UNMAP of a ShadowDomain) against the
//! domain's own map/unmap (the floor) and no vIOMMU (identity: nothing to churn), and
//! the e1000ping round trip (ARP + echo, TSC cycles reported by the guest) without a
//! vIOMMU and through the SMMUv3 in shadow mode.
//! `cargo bench -p nestio-vmm --bench smmuv3` (the e1000 part needs /dev/kvm).

use std::sync::Arc;
use std::time::Instant;

use nestio_dma::Prot;
use nestio_iommu::smmuv3::{regs, FlatMemory, Smmu, Transaction};
use nestio_vmm::bus::BusDevice;
use nestio_vmm::iommu::smmuv3::{GuestRamView, Smmuv3, Viommu};
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

fn churn() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let mem = ram.memory().clone();
    let domain = Arc::new(ShadowDomain::new(GuestRamFile::of(&ram)));
    let stream = StreamId::pci(0, 1, 0);
    let smmu = Smmuv3::new(
        GuestRamView::new(mem.clone(), None),
        domain.clone(),
        16 << 20,
    );
    smmu.add_stream(stream).unwrap();
    tables(&mut |a, v| mem.write_obj(v, GuestAddress(a)).unwrap());
    let reg = |off: u64, v: u64, n: usize| smmu.write(off, &v.to_le_bytes()[..n]).unwrap();
    reg(regs::STRTAB_BASE, 0x10_0000, 8);
    reg(regs::STRTAB_BASE_CFG, 5, 4);
    reg(regs::CMDQ_BASE, 0x11_0000 | 4, 8);
    reg(regs::CR0, 0xd, 4);
    let mut prod = 0u32;
    let mut cmd = |d0: u64, d1: u64| {
        let slot = 0x11_0000 + u64::from(prod & 15) * 16;
        mem.write_obj(d0, GuestAddress(slot)).unwrap();
        mem.write_obj(d1, GuestAddress(slot + 8)).unwrap();
        prod = (prod + 1) & 31;
        reg(regs::CMDQ_PROD, u64::from(prod), 4);
    };
    let n = 2000u64;
    let start = Instant::now();
    for i in 0..n {
        // Unmap page 7, invalidate, map it back, invalidate.
        let pte = 0x15_2000 + 7 * 8;
        mem.write_obj(0u64, GuestAddress(pte)).unwrap();
        cmd(0x12 | (1 << 48), 0x7000);
        cmd(0x46, 0);
        mem.write_obj(
            (0x40_0000 + 7 * 0x1000 + (i & 1) * 0x10_0000) | PTE,
            GuestAddress(pte),
        )
        .unwrap();
        cmd(0x12 | (1 << 48), 0x7000);
        cmd(0x46, 0);
    }
    let shadow = start.elapsed().as_nanos() as f64 / n as f64;
    let start = Instant::now();
    for _ in 0..n {
        domain.unmap(stream, 0x20_0000, 0x1000).unwrap();
        domain
            .map(stream, 0x20_0000, 0x20_0000, 0x1000, Prot::RW)
            .unwrap();
    }
    let floor = start.elapsed().as_nanos() as f64 / n as f64;
    println!(
        "map/unmap churn (one page of 512 mapped; no device attached, so VMM-side cost only): shadow SMMUv3 {:.1} us per unmap+map cycle \
         (guest PTE + TLBI_NH_VA + CMD_SYNC, a full re-sync of the stream per CMD_SYNC), ShadowDomain map/unmap alone {:.1} us, \
         no vIOMMU: none (all RAM mapped once)",
        shadow / 1000.0,
        floor / 1000.0
    );
}

fn rtt(viommu: bool) -> Option<u64> {
    let console = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut cfg = VmConfig::new(payloads::E1000PING);
    cfg.console = nestio_vmm::ConsoleOutput::Buffer(console.clone());
    cfg.cmdline = "irq=intx".into();
    if viommu {
        cfg.cmdline += &format!(" smmu={:#x}", nestio_vmm::platform::PLATFORM_MMIO_WINDOW.0);
        cfg.viommu = Some(Viommu::Smmuv3);
    }
    let backend = nestio_net::open_backend("user", None).ok()?;
    let dev = nestio_emulated::e1000::E1000::new(nestio_emulated::e1000::E1000Config::new(backend))
        .ok()?;
    cfg.devices.push(nestio_vmm::DeviceConfig::Local {
        name: "e1000".into(),
        device: dev,
    });
    let report = Vm::new(cfg).ok()?.run().ok()?;
    if report.outcome != StopReason::GuestExit(0) {
        return None;
    }
    let out = String::from_utf8_lossy(&console.lock()).into_owned();
    out.split("(rtt ").nth(1)?.split(' ').next()?.parse().ok()
}

fn main() {
    translation_cost();
    churn();
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIP: /dev/kvm is missing; no e1000 round trip");
        return;
    }
    for (name, v) in [("no vIOMMU", false), ("SMMUv3 shadow", true)] {
        let mut r: Vec<u64> = (0..5).filter_map(|_| rtt(v)).collect();
        r.sort_unstable();
        match r.get(r.len() / 2) {
            Some(m) => println!(
                "e1000 ARP + echo round trip, {name}: median {m} TSC cycles of {} runs",
                r.len()
            ),
            None => println!("e1000 round trip, {name}: no successful run"),
        }
    }
}
