//! A test harness around [`crate::sample`]: the sample device with a gate on its BAR0
//! writes, for tests of posted (fire-and-forget) BAR writes that must hold whoever
//! executes them — a vfio-user server thread, a BAR channel's server — inside one write
//! and check what the other side may and may not do meanwhile.
//!
//! While the gate is closed, the first BAR0 write reports that it entered the device
//! (the `entered` receiver of [`GatedSample::new`]) and then waits, inside
//! `region_write`, until the test sends on the `open` sender (or drops it); later
//! writes pass straight through. Optionally, every BAR0 write at one offset is refused
//! (a device error), to test what a refused posted write does. Every other method is
//! the sample device's own (a [`Forwarding`] wrapper).

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use nestio_device_model::{pci_index, DeviceError, Forwarding, Result, VfioDevice};

use crate::sample::{sample_device, SampleDevice, SampleError};

/// The sample device with a gated BAR0 (see the module docs).
pub struct GatedSample {
    inner: Arc<SampleDevice>,
    gate: Mutex<Option<Receiver<()>>>,
    entered: Mutex<Option<Sender<()>>>,
    refused: Option<u64>,
}

/// The test's ends of a [`GatedSample`]'s gate.
pub struct Gate {
    /// Send (or drop) to let the held BAR0 write finish.
    pub open: Sender<()>,
    /// Receives once the first BAR0 write is inside the device.
    pub entered: Receiver<()>,
}

impl GatedSample {
    /// A fresh sample device behind a closed gate; BAR0 writes at `refused` (if any)
    /// fail with [`DeviceError::Invalid`] before reaching the gate.
    pub fn new(refused: Option<u64>) -> std::result::Result<(Arc<GatedSample>, Gate), SampleError> {
        let (open, gate) = mpsc::channel();
        let (entered_tx, entered) = mpsc::channel();
        let dev = GatedSample {
            inner: sample_device()?,
            gate: Mutex::new(Some(gate)),
            entered: Mutex::new(Some(entered_tx)),
            refused,
        };
        Ok((Arc::new(dev), Gate { open, entered }))
    }
}

/// A 32-bit little-endian read of region `index` at `offset` (panics on error: tests).
pub fn read32(dev: &dyn VfioDevice, index: u32, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.region_read(index, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Everything but BAR0 writes is the sample device's own.
impl Forwarding for GatedSample {
    fn forward_to(&self) -> &dyn VfioDevice {
        &*self.inner
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        if index == pci_index::BAR0 {
            if Some(offset) == self.refused {
                return Err(DeviceError::Invalid("refused on purpose".into()));
            }
            // A poisoned lock only means another test thread panicked: the gate is
            // then simply gone.
            if let Some(tx) = self.entered.lock().ok().and_then(|mut e| e.take()) {
                let _ = tx.send(());
            }
            let gate = self.gate.lock().ok().and_then(|mut g| g.take());
            if let Some(rx) = gate {
                let _ = rx.recv();
            }
        }
        self.inner.region_write(index, offset, data)
    }
}
nestio_device_model::impl_vfio_device_by_forwarding!(GatedSample);
