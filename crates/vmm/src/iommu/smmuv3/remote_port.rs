//! The vfio-user client as a [`NestedIommuPort`]: nestio's nested-IOMMU extension
//! (`docs/vfio-user-nested-iommu.md`, `nestio_vfio_user::nested_iommu`) carries each
//! port call as one message; SMMUv3 commands travel as their 16 little-endian bytes.

use std::sync::mpsc::{channel, Receiver};

use nestio_vfio_user::Client;

use super::nested::{InvalidateOutcome, NestedCaps, NestedIommuPort, NestedPortError, PortFault};
use crate::remote::PostedWrites;

fn port_err(what: &'static str, e: nestio_device_model::DeviceError) -> NestedPortError {
    if crate::region_map::is_fatal(&e) {
        NestedPortError::Transport {
            what,
            detail: e.to_string(),
        }
    } else {
        NestedPortError::Refused {
            what,
            detail: e.to_string(),
        }
    }
}

impl NestedIommuPort for Client {
    fn nested_caps(&self) -> Option<NestedCaps> {
        self.nested_iommu().map(|c| NestedCaps {
            ias: c.ias,
            oas: c.oas,
            granules: c.granules,
            ssid_bits: c.ssid_bits,
        })
    }
    fn bind(&self, vsid: u32, ste: [u64; 2]) -> Result<(), NestedPortError> {
        self.iommu_bind(vsid, ste[0], ste[1])
            .map_err(|e| port_err("NESTIO_IOMMU_BIND", e))
    }
    fn unbind(&self) -> Result<(), NestedPortError> {
        self.iommu_unbind()
            .map_err(|e| port_err("NESTIO_IOMMU_UNBIND", e))
    }
    fn invalidate(&self, cmds: &[[u64; 2]]) -> Result<InvalidateOutcome, NestedPortError> {
        let raw: Vec<[u8; 16]> = cmds
            .iter()
            .map(|c| {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&c[0].to_le_bytes());
                b[8..].copy_from_slice(&c[1].to_le_bytes());
                b
            })
            .collect();
        let r = self
            .iommu_invalidate(&raw)
            .map_err(|e| port_err("NESTIO_IOMMU_INVALIDATE", e))?;
        Ok(InvalidateOutcome {
            done: r.done,
            cerror: r.cerror,
        })
    }
    fn take_faults(&self) -> Option<Receiver<PortFault>> {
        let faults = self.take_iommu_faults()?;
        // Re-typed on a small forwarding thread, which ends with the connection.
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("iommu-faults".into())
            .spawn(move || {
                while let Ok(f) = faults.recv() {
                    let f = PortFault {
                        lost_before: f.lost_before,
                        sequence: f.sequence,
                        record: f.record,
                    };
                    if tx.send(f).is_err() {
                        return;
                    }
                }
            })
            .ok()?;
        Some(rx)
    }
}

impl NestedIommuPort for PostedWrites {
    fn nested_caps(&self) -> Option<NestedCaps> {
        self.client().nested_caps()
    }
    fn bind(&self, vsid: u32, ste: [u64; 2]) -> Result<(), NestedPortError> {
        NestedIommuPort::bind(self.client(), vsid, ste)
    }
    fn unbind(&self) -> Result<(), NestedPortError> {
        NestedIommuPort::unbind(self.client())
    }
    fn invalidate(&self, cmds: &[[u64; 2]]) -> Result<InvalidateOutcome, NestedPortError> {
        NestedIommuPort::invalidate(self.client(), cmds)
    }
    fn take_faults(&self) -> Option<Receiver<PortFault>> {
        self.client().take_faults()
    }
}
