//! `DirectBars` posts writes to plain memory BARs over its BAR channel and keeps them
//! ordered before later accesses: a BAR read on the channel, and a mediated access (a
//! config-space write through `inner`) waits for the channel's barrier. The device's
//! BAR0 writes are gated so the channel's server can be held inside one.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nestio_device_model::{
    pci_index, DeviceInfo, IrqAction, IrqData, IrqInfo, RegionInfo, Result, VfioDevice,
};
use nestio_emulated::sample::{regs, sample_device, SampleDevice};
use nestio_nested::{BarChannels, DirectBars};

/// The sample device; while the gate is closed, the first BAR0 write stops inside
/// `region_write`.
struct Gated {
    inner: Arc<SampleDevice>,
    gate: Mutex<Option<mpsc::Receiver<()>>>,
    entered: Mutex<Option<mpsc::Sender<()>>>,
}

impl VfioDevice for Gated {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.inner.region_info(index)
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.region_read(index, offset, buf)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        if index == pci_index::BAR0 {
            if let Some(tx) = self.entered.lock().unwrap().take() {
                let _ = tx.send(());
            }
            let gate = self.gate.lock().unwrap().take();
            if let Some(rx) = gate {
                let _ = rx.recv();
            }
        }
        self.inner.region_write(index, offset, data)
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.inner.irq_info(index)
    }
    fn set_irqs(
        &self,
        index: u32,
        action: IrqAction,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<()> {
        self.inner.set_irqs(index, action, start, count, data)
    }
}

fn read32(dev: &dyn VfioDevice, index: u32, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.region_read(index, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn posted_bar_writes_stay_ahead_of_reads_and_mediated_accesses() {
    let (gate_tx, gate_rx) = mpsc::channel();
    let (entered_tx, entered_rx) = mpsc::channel();
    let dev = Arc::new(Gated {
        inner: sample_device().unwrap(),
        gate: Mutex::new(Some(gate_rx)),
        entered: Mutex::new(Some(entered_tx)),
    });
    let (near, _handle) = BarChannels::new(dev.clone()).unwrap().open().unwrap();
    let d = Arc::new(DirectBars::new(dev.clone(), near).unwrap());
    // Posted: returns although the channel's server is stuck inside this very write.
    d.region_write(pci_index::BAR0, regs::SCRATCH, &1u32.to_le_bytes())
        .unwrap();
    entered_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the channel executes the write");
    for i in 2..=50u32 {
        d.region_write(pci_index::BAR0, regs::SCRATCH, &i.to_le_bytes())
            .unwrap();
    }
    // A config write (mediated: straight to `inner` here) must not overtake them.
    let (tx, rx) = mpsc::channel();
    let d2 = d.clone();
    let t = std::thread::spawn(move || {
        let r = d2.region_write(pci_index::CONFIG, 0x4, &0x6u16.to_le_bytes());
        tx.send(r.is_ok()).unwrap();
    });
    let early = rx.recv_timeout(Duration::from_millis(200));
    // Open the gate before judging, so a failure cannot leave the channel stuck.
    gate_tx.send(()).unwrap();
    assert!(
        early.is_err(),
        "a mediated access overtook BAR writes posted before it"
    );
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    t.join().unwrap();
    // The barrier ran after every posted write: the device already holds the last.
    assert_eq!(read32(&*dev, pci_index::BAR0, regs::SCRATCH), 50);
    // A BAR read over the channel sees the write just before it.
    for i in 0..100u32 {
        d.region_write(pci_index::BAR0, regs::SCRATCH, &i.to_le_bytes())
            .unwrap();
        assert_eq!(read32(&*d, pci_index::BAR0, regs::SCRATCH), i);
    }
    assert!(d.channel_accesses() >= 250);
}
