//! `DirectBars` posts writes to plain memory BARs over its BAR channel and keeps them
//! ordered before later accesses: a BAR read on the channel, and a mediated access (a
//! config-space write through `inner`) waits for the channel's barrier. The device's
//! BAR0 writes are gated so the channel's server can be held inside one.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use nestio_device_model::{pci_index, VfioDevice};
use nestio_emulated::gated_sample::{read32, GatedSample};
use nestio_emulated::sample::regs;
use nestio_nested::{BarChannels, DirectBars};

#[test]
fn posted_bar_writes_stay_ahead_of_reads_and_mediated_accesses() {
    let (dev, gate) = GatedSample::new(None).unwrap();
    let (near, _handle) = BarChannels::new(dev.clone()).unwrap().open().unwrap();
    let d = Arc::new(DirectBars::new(dev.clone(), near).unwrap());
    // Posted: returns although the channel's server is stuck inside this very write.
    d.region_write(pci_index::BAR0, regs::SCRATCH, &1u32.to_le_bytes())
        .unwrap();
    gate.entered
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
    gate.open.send(()).unwrap();
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
