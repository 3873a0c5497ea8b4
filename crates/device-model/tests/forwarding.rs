//! `impl VfioDevice for Arc<T>` forwards every method: a probe device that records each
//! call, used through an `Arc`, must see every method in `VFIO_DEVICE_METHODS` (the list
//! generated with the trait). A method missing from the forwarding impl would run the
//! trait's default instead ("unsupported", or no DMA table) and be missing here; a method
//! added to the trait but not called below is missing too, so this test grows with it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use nestio_device_model::{
    DeviceInfo, DmaPort, IoEventFd, IrqAction, IrqData, IrqInfo, MigState, MigrationFlags,
    RegionInfo, Result, VfioDevice, VFIO_DEVICE_METHODS,
};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, MapTable, Prot};

#[derive(Default)]
struct Probe {
    calls: Mutex<BTreeSet<&'static str>>,
    port: DmaPort,
}

impl Probe {
    fn hit(&self, name: &'static str) {
        self.calls.lock().unwrap().insert(name);
    }
}

impl VfioDevice for Probe {
    fn info(&self) -> DeviceInfo {
        self.hit("info");
        DeviceInfo {
            flags: 0,
            num_regions: 0,
            num_irqs: 0,
        }
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.hit("region_info");
        Ok(RegionInfo::absent(index))
    }
    fn region_read(&self, _: u32, _: u64, _: &mut [u8]) -> Result<()> {
        self.hit("region_read");
        Ok(())
    }
    fn region_write(&self, _: u32, _: u64, _: &[u8]) -> Result<()> {
        self.hit("region_write");
        Ok(())
    }
    fn region_io_fds(&self, _: u32) -> Result<Vec<IoEventFd>> {
        self.hit("region_io_fds");
        Ok(Vec::new())
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.hit("irq_info");
        Ok(IrqInfo {
            index,
            flags: 0,
            count: 0,
        })
    }
    fn set_irqs(&self, _: u32, _: IrqAction, _: u32, _: u32, _: IrqData) -> Result<()> {
        self.hit("set_irqs");
        Ok(())
    }
    fn reset(&self) -> Result<()> {
        self.hit("reset");
        Ok(())
    }
    fn dma_port(&self) -> Option<&DmaPort> {
        self.hit("dma_port");
        Some(&self.port)
    }
    fn dma_table(&self) -> Option<&MapTable> {
        self.hit("dma_table");
        Some(self.port.table())
    }
    fn dma_map(&self, _: DmaMapRequest) -> Result<()> {
        self.hit("dma_map");
        Ok(())
    }
    fn dma_unmap(&self, _: u64, _: u64) -> Result<()> {
        self.hit("dma_unmap");
        Ok(())
    }
    fn dma_unmap_all(&self) -> Result<()> {
        self.hit("dma_unmap_all");
        Ok(())
    }
    fn migration_flags(&self) -> Option<MigrationFlags> {
        self.hit("migration_flags");
        Some(MigrationFlags(MigrationFlags::STOP_COPY))
    }
    fn mig_state(&self) -> Result<MigState> {
        self.hit("mig_state");
        Ok(MigState::Running)
    }
    fn mig_set_state(&self, target: MigState) -> Result<MigState> {
        self.hit("mig_set_state");
        Ok(target)
    }
    fn mig_data_read(&self, _: &mut [u8]) -> Result<usize> {
        self.hit("mig_data_read");
        Ok(0)
    }
    fn mig_data_write(&self, _: &[u8]) -> Result<()> {
        self.hit("mig_data_write");
        Ok(())
    }
    fn dma_logging_start(&self, _: u64, _: &[DmaRange]) -> Result<()> {
        self.hit("dma_logging_start");
        Ok(())
    }
    fn dma_logging_stop(&self) -> Result<()> {
        self.hit("dma_logging_stop");
        Ok(())
    }
    fn dma_logging_report(&self, _: DmaRange, _: u64) -> Result<Vec<u64>> {
        self.hit("dma_logging_report");
        Ok(Vec::new())
    }
}

/// Call every method of `dev` once, with arguments the probe accepts.
fn call_every_method(dev: &dyn VfioDevice) {
    dev.info();
    dev.region_info(0).unwrap();
    dev.region_read(0, 0, &mut []).unwrap();
    dev.region_write(0, 0, &[]).unwrap();
    dev.region_io_fds(0).unwrap();
    dev.irq_info(0).unwrap();
    dev.set_irqs(0, IrqAction::Trigger, 0, 0, IrqData::None)
        .unwrap();
    dev.reset().unwrap();
    assert!(dev.dma_port().is_some());
    assert!(dev.dma_table().is_some());
    dev.dma_map(DmaMapRequest {
        range: page(),
        prot: Prot::READ,
        backing: DmaBacking::Peer(Arc::new(NoPeer)),
    })
    .unwrap();
    dev.dma_unmap(0, 4096).unwrap();
    dev.dma_unmap_all().unwrap();
    assert!(dev.migration_flags().is_some());
    dev.mig_state().unwrap();
    dev.mig_set_state(MigState::Stop).unwrap();
    dev.mig_data_read(&mut []).unwrap();
    dev.mig_data_write(&[]).unwrap();
    dev.dma_logging_start(4096, &[]).unwrap();
    dev.dma_logging_stop().unwrap();
    dev.dma_logging_report(page(), 4096).unwrap();
}

fn page() -> DmaRange {
    DmaRange::new(0, 4096).unwrap()
}

struct NoPeer;
impl nestio_dma::DmaPeer for NoPeer {
    fn dma_read(&self, _: u64, _: &mut [u8]) -> std::result::Result<(), i32> {
        Err(libc::EFAULT)
    }
    fn dma_write(&self, _: u64, _: &[u8]) -> std::result::Result<(), i32> {
        Err(libc::EFAULT)
    }
}

#[test]
fn arc_forwards_every_method() {
    let probe = Arc::new(Probe::default());
    // Through one Arc layer and through two (Arc<Arc<T>> as a trait object).
    for dev in [
        Arc::new(probe.clone()) as Arc<dyn VfioDevice>,
        Arc::new(Arc::new(probe.clone())) as Arc<dyn VfioDevice>,
    ] {
        probe.calls.lock().unwrap().clear();
        call_every_method(&*dev);
        let seen = probe.calls.lock().unwrap().clone();
        let all: BTreeSet<&str> = VFIO_DEVICE_METHODS.iter().copied().collect();
        let missing: Vec<_> = all.difference(&seen).collect();
        assert!(
            missing.is_empty(),
            "methods not forwarded to the device (or not called by this test): {missing:?}"
        );
        assert_eq!(seen.len(), VFIO_DEVICE_METHODS.len());
    }
}

/// A wrapper that overrides nothing: `impl_vfio_device_by_forwarding!` must forward every
/// method to the wrapped device, exactly as `Arc<T>` does.
struct Plain(Arc<Probe>);

impl nestio_device_model::Forwarding for Plain {
    fn forward_to(&self) -> &dyn VfioDevice {
        &*self.0
    }
}
nestio_device_model::impl_vfio_device_by_forwarding!(Plain);

/// A wrapper that overrides one method: that one is its own, the rest are forwarded.
struct Hiding(Arc<Probe>);

impl nestio_device_model::Forwarding for Hiding {
    fn forward_to(&self) -> &dyn VfioDevice {
        &*self.0
    }
    fn reset(&self) -> Result<()> {
        Ok(())
    }
}
nestio_device_model::impl_vfio_device_by_forwarding!(Hiding);

#[test]
fn forwarding_wrappers_forward_every_method_they_do_not_override() {
    let probe = Arc::new(Probe::default());
    let all: BTreeSet<&str> = VFIO_DEVICE_METHODS.iter().copied().collect();
    call_every_method(&Plain(probe.clone()));
    let seen = probe.calls.lock().unwrap().clone();
    assert_eq!(seen, all, "a Forwarding wrapper must forward every method");

    probe.calls.lock().unwrap().clear();
    call_every_method(&Hiding(probe.clone()));
    let seen = probe.calls.lock().unwrap().clone();
    let mut want = all.clone();
    want.remove("reset");
    assert_eq!(
        seen, want,
        "only the overridden method stays with the wrapper"
    );
}
