//! A non-PCI (FSL-MC flagged) device under real KVM: `Vm::new` attaches it as a
//! platform device, not on PCI; its register region answers through the MMIO bus at
//! the address the VMM reports, its mmappable region is a KVM memory slot, and its
//! interrupt eventfd is a KVM irqfd.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nestio_device::{
    flags, irq_flags, region_flags, DeviceError, DeviceInfo, IrqAction, IrqData, IrqInfo,
    RegionInfo, Result, VfioDevice,
};
use nestio_vmm::platform::PLATFORM_MMIO_WINDOW;
use nestio_vmm::{payloads, DeviceConfig, StopReason, Vm, VmConfig};
use vmm_sys_util::eventfd::EventFd;

const REGS: u64 = 0x100;
const MEM: u64 = 0x2000;

/// A DPAA2-like object: region 0 registers (0x0 scratch, 0x4 ident), region 1 an
/// mmappable memfd, one interrupt.
struct FslMcDev {
    scratch: Mutex<u32>,
    writes: Mutex<Vec<(u64, Vec<u8>)>>,
    mem: Arc<OwnedFd>,
    irq: Mutex<Option<OwnedFd>>,
}

impl FslMcDev {
    fn new() -> Arc<Self> {
        Arc::new(FslMcDev {
            scratch: Mutex::new(0),
            writes: Mutex::new(Vec::new()),
            mem: Arc::new(nestio_dma::memfd::sealed_memfd(c"fslmc-test", MEM).unwrap()),
            irq: Mutex::new(None),
        })
    }
}

impl VfioDevice for FslMcDev {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: flags::FSL_MC,
            num_regions: 2,
            num_irqs: 1,
        }
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        match index {
            0 => Ok(RegionInfo::rw(0, REGS)),
            1 => Ok(RegionInfo {
                index: 1,
                flags: region_flags::READ | region_flags::WRITE | region_flags::MMAP,
                size: MEM,
                fd_offset: 0,
                sparse: Vec::new(),
                fd: Some(self.mem.clone()),
            }),
            _ => Err(DeviceError::NoSuchRegion(index)),
        }
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.region_info(index)?.check(offset, buf.len())?;
        let v = match offset {
            0 => *self.scratch.lock().unwrap(),
            4 => 0x6673_6c6d, // "mlsf"
            _ => 0,
        };
        let b = v.to_le_bytes();
        for (i, x) in buf.iter_mut().enumerate() {
            *x = b.get(i).copied().unwrap_or(0);
        }
        Ok(())
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.region_info(index)?.check(offset, data.len())?;
        if index == 0 && offset == 0 && data.len() == 4 {
            *self.scratch.lock().unwrap() = u32::from_le_bytes(data.try_into().unwrap());
        }
        self.writes.lock().unwrap().push((offset, data.to_vec()));
        Ok(())
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        match index {
            0 => Ok(IrqInfo {
                index: 0,
                flags: irq_flags::EVENTFD,
                count: 1,
            }),
            _ => Err(DeviceError::NoSuchIrq(index)),
        }
    }
    fn set_irqs(
        &self,
        index: u32,
        _action: IrqAction,
        _start: u32,
        _count: u32,
        data: IrqData,
    ) -> Result<()> {
        self.irq_info(index)?;
        *self.irq.lock().unwrap() = match data {
            IrqData::Eventfd(mut fds) => fds.pop().flatten(),
            _ => None,
        };
        Ok(())
    }
}

#[test]
fn fsl_mc_device_is_placed_in_the_platform_window_and_wired_into_kvm() {
    if !common::kvm_or_skip("fsl_mc_device_is_placed_in_the_platform_window_and_wired_into_kvm") {
        return;
    }
    let dev = FslMcDev::new();
    let (console, buf) = common::console();
    let mut cfg = VmConfig::new(payloads::HELLO);
    cfg.console = console;
    cfg.devices.push(DeviceConfig::Local {
        name: "dpni.0".into(),
        device: dev.clone(),
    });
    let mut vm = Vm::new(cfg).expect("an FSL-MC device is attached, not refused");
    assert!(vm.pci().devices().is_empty(), "not on PCI");
    let pd = vm.platform().devices()[0].clone();
    let place = pd.placement().clone();
    assert_eq!(place.regions.len(), 2, "{place:?}");
    let (regs, mem) = (&place.regions[0], &place.regions[1]);
    assert_eq!((regs.index, regs.size, regs.mapped_areas), (0, 0x1000, 0));
    assert_eq!((mem.index, mem.size, mem.mapped_areas), (1, MEM, 1));
    for r in &place.regions {
        assert!(r.addr >= PLATFORM_MMIO_WINDOW.0 && r.addr + r.size <= PLATFORM_MMIO_WINDOW.1);
    }
    assert!(regs.addr + regs.size <= mem.addr, "no overlap");

    // Register accesses through the MMIO bus reach the device.
    let mmio = vm.platform().mapper().mmio_bus().clone();
    mmio.write(regs.addr, &0xdead_beefu32.to_le_bytes())
        .unwrap();
    assert_eq!(*dev.scratch.lock().unwrap(), 0xdead_beef);
    let mut b = [0u8; 4];
    mmio.read(regs.addr + 4, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x6673_6c6d);
    // Beyond the region (inside the page) reads all-ones and never reaches the device.
    let n = dev.writes.lock().unwrap().len();
    mmio.write(regs.addr + REGS, &[1, 2, 3, 4]).unwrap();
    mmio.read(regs.addr + REGS, &mut b).unwrap();
    assert_eq!(b, [0xff; 4]);
    assert_eq!(dev.writes.lock().unwrap().len(), n);

    // The mmappable region is a KVM memory slot: KVM refuses another slot over it.
    let host = vm.ram().host_address();
    let clash = kvm_bindings::kvm_userspace_memory_region {
        slot: 450,
        flags: 0,
        guest_phys_addr: mem.addr,
        memory_size: 0x1000,
        userspace_addr: host,
    };
    // SAFETY: KVM refuses the overlapping slot (asserted); had it accepted, the slot
    // would point at guest RAM, which outlives the VM fd.
    let r = unsafe { vm.vm_fd().set_user_memory_region(clash) };
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::EEXIST));

    // The device's interrupt eventfd is a KVM irqfd on the reported source: KVM
    // refuses to register the same eventfd on that GSI again.
    let fd = dev.irq.lock().unwrap().as_ref().map(|f| f.as_raw_fd());
    let fd = fd.expect("the device received an eventfd");
    // SAFETY: dup of a live fd, owned by the EventFd.
    let dup = unsafe { EventFd::from_raw_fd(libc::dup(fd)) };
    assert_eq!(place.irqs.len(), 1);
    let gsi = place.irqs[0].source;
    let again = vm.vm_fd().register_irqfd(&dup, gsi);
    assert_eq!(again.map_err(|e| e.errno()), Err(libc::EBUSY));

    // The interrupt controller describes the wiring for migration: the UART's line
    // and the platform line, each with one eventfd attached, edge-triggered.
    let snap = vm.pci().irqchip().snapshot();
    assert_eq!(snap.model, "kvm-x86");
    let line = snap
        .sources
        .iter()
        .find(|s| s.number == gsi)
        .expect("platform line");
    assert_eq!((line.attached, line.resample), (1, false));
    assert!(snap
        .sources
        .iter()
        .any(|s| s.number == 4 && s.attached == 1));
    let json = serde_json::to_string(&snap).unwrap();
    let back: nestio_vmm::irqchip::IrqChipSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snap);

    // The guest still runs.
    let report = vm.run().unwrap();
    assert_eq!(
        report.outcome,
        StopReason::GuestExit(42),
        "{}",
        common::text(&buf)
    );
    drop(pd);
    drop(vm);
    assert!(
        dev.irq.lock().unwrap().is_none(),
        "the eventfd was taken back when the VM went away"
    );
}
