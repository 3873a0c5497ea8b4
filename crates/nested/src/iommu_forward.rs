//! A level-1 exporter's nested IOMMU: the vfio-user extension
//! (`docs/vfio-user-nested-iommu.md`) passed on to the level below (issue 13).
//!
//! A level that re-exports a device ([`crate::ExportedDevice`]) has no DMA of its own:
//! the device walks at level 0. So instead of walking a stage 1 itself, it forwards:
//! [`ForwardIommu`] is the [`NestedIommuBackend`] its vfio-user server is given
//! (`Server::with_nested_backend`).
//!
//! - **Offer**: the capability is offered to the child only when this level's own
//!   upstream connection negotiated it, and with the upstream's negotiated values (so
//!   the child never asks for more than level 0 walks).
//! - **BIND / UNBIND / INVALIDATE** go on unchanged to the level below over the
//!   upstream `Client`; the child gets the level below's answer (its errno for a
//!   refusal; `done`/`cerror` for INVALIDATE, checked for consistency by the client and
//!   again by the server before it is relayed).
//! - **Why stage 2 is right at level 0**: in nested mode the child maps its RAM at
//!   IPA = its GPA; the exporter passes IOVAs through unchanged and re-issues each map
//!   as this level's RAM at the translated offset, so level 0's map table takes the
//!   child's IPAs to the child's own pages. The stage-1 tables' addresses are the
//!   child's IPAs too, so level 0 resolves them through the same table, exactly as the
//!   child's DMA addresses.
//! - **FAULT records** arrive from level 0 (with the child's vSID: the BIND carried it)
//!   and are relayed unchanged (sequence included) into the child session's fault
//!   queue, whose reporter sends them on. A record whose StreamID is not the bound
//!   vSID, or that arrives while no child is bound, is dropped (logged): level 0 is
//!   not trusted to name another stream.
//! - **Session end**: a bound child that goes away is unbound at level 0, so the next
//!   child starts with IPAs.
//!
//! One child session at a time owns the relay (the exporter serves one owner); a newer
//! session takes it over.

use parking_lot::Mutex;
use std::sync::Arc;

use nestio_vfio_user::nested_iommu::{
    FaultQueue, InvalidateReply, IommuBind, IommuFault, IommuInvalidate, NestedIommuBackend,
    NestedIommuBinding, NestedIommuCaps, NestedIommuError,
};
use nestio_vfio_user::Client;

/// Where relayed records go: the child session's queue and the vSID it bound.
#[derive(Default)]
struct Sink {
    queue: Option<Arc<FaultQueue>>,
    vsid: Option<u32>,
    /// Records dropped (no child, wrong StreamID) since the last one relayed.
    dropped: u64,
}

struct Shared {
    upstream: Arc<Client>,
    caps: Option<NestedIommuCaps>,
    sink: Mutex<Sink>,
}

/// The forwarding [`NestedIommuBackend`] of an exporting level. See the module docs.
pub struct ForwardIommu {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ForwardIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardIommu")
            .field("caps", &self.shared.caps)
            .finish_non_exhaustive()
    }
}

/// The StreamID of a 32-byte SMMUv3 event record (dword 0, bits 63:32).
pub fn record_sid(record: &[u8; 32]) -> u32 {
    u32::from_le_bytes([record[4], record[5], record[6], record[7]])
}

impl ForwardIommu {
    /// The backend over `upstream`, the connection to the level below. When that
    /// connection negotiated the extension, its FAULT records are taken (once) and a
    /// relay thread started, which ends with the connection.
    pub fn new(upstream: Arc<Client>) -> ForwardIommu {
        let caps = upstream.nested_iommu();
        let shared = Arc::new(Shared {
            upstream,
            caps,
            sink: Mutex::new(Sink::default()),
        });
        if shared.caps.is_some() {
            match shared.upstream.take_iommu_faults() {
                Some(rx) => {
                    let s = Arc::downgrade(&shared);
                    let spawned = std::thread::Builder::new()
                        .name("iommu-relay".into())
                        .spawn(move || {
                            while let Ok(f) = rx.recv() {
                                let Some(s) = s.upgrade() else { return };
                                s.relay(f);
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "cannot start the nested IOMMU fault relay; the child will get no fault records");
                    }
                }
                None => tracing::warn!(
                    "the upstream's nested IOMMU faults were already taken; the child will get no fault records"
                ),
            }
        }
        ForwardIommu { shared }
    }

    /// Did the level below agree to the extension (so the child is offered it)?
    pub fn available(&self) -> bool {
        self.shared.caps.is_some()
    }
}

impl Sink {
    /// Where `f` goes: the child session's queue with the record (flagged
    /// `lost_before` when this relay dropped any since the last one), or `None` (and
    /// counted as dropped) when no child is bound or the record names another stream.
    fn accept(&mut self, f: IommuFault) -> Option<(Arc<FaultQueue>, IommuFault)> {
        let sid = record_sid(&f.record);
        match (&self.queue, self.vsid) {
            (Some(q), Some(vsid)) if vsid == sid => {
                let lost = std::mem::take(&mut self.dropped) > 0;
                Some((
                    q.clone(),
                    IommuFault {
                        lost_before: f.lost_before || lost,
                        ..f
                    },
                ))
            }
            (_, vsid) => {
                self.dropped += 1;
                tracing::warn!(
                    sid,
                    bound = ?vsid,
                    sequence = f.sequence,
                    "nested IOMMU: dropped a fault record from the level below that names no bound stream of the child"
                );
                None
            }
        }
    }
}

impl Shared {
    fn relay(&self, f: IommuFault) {
        let accepted = self.sink.lock().accept(f);
        if let Some((q, f)) = accepted {
            q.relay(f);
        }
    }
}

impl NestedIommuBackend for ForwardIommu {
    fn offer(&self) -> Option<NestedIommuCaps> {
        self.shared.caps.clone()
    }

    fn open(&self, faults: Arc<FaultQueue>) -> Box<dyn NestedIommuBinding> {
        let mut sink = self.shared.sink.lock();
        sink.queue = Some(faults.clone());
        sink.vsid = None;
        drop(sink);
        Box::new(ForwardBinding {
            shared: self.shared.clone(),
            faults,
            bound: false,
        })
    }
}

/// One child session's binding: everything forwarded to the level below.
struct ForwardBinding {
    shared: Arc<Shared>,
    faults: Arc<FaultQueue>,
    bound: bool,
}

fn upstream(
    what: &'static str,
) -> impl FnOnce(nestio_device_model::DeviceError) -> NestedIommuError {
    move |source| {
        tracing::warn!(what, error = %source, "nested IOMMU: the level below refused a forwarded command");
        NestedIommuError::Upstream { what, source }
    }
}

impl ForwardBinding {
    fn owns_sink(&self, sink: &Sink) -> bool {
        sink.queue
            .as_ref()
            .is_some_and(|q| Arc::ptr_eq(q, &self.faults))
    }
}

impl NestedIommuBinding for ForwardBinding {
    fn bind(&mut self, b: IommuBind) -> Result<(), NestedIommuError> {
        // Accept the new vSID's records before level 0 can produce any (they may
        // overtake the reply: FAULTs travel on the twin socket).
        let previous = {
            let mut sink = self.shared.sink.lock();
            if !self.owns_sink(&sink) {
                sink.queue = Some(self.faults.clone());
            }
            sink.vsid.replace(b.vsid)
        };
        let r = self
            .shared
            .upstream
            .iommu_bind(b.vsid, b.ste0, b.ste1)
            .map_err(upstream("NESTIO_IOMMU_BIND"));
        match r {
            Ok(()) => {
                self.bound = true;
                tracing::info!(
                    vsid = b.vsid,
                    "nested IOMMU: child's stage 1 bound at the level below"
                );
                Ok(())
            }
            Err(e) => {
                let mut sink = self.shared.sink.lock();
                if self.owns_sink(&sink) {
                    sink.vsid = previous;
                }
                Err(e)
            }
        }
    }

    fn unbind(&mut self) -> Result<(), NestedIommuError> {
        self.shared
            .upstream
            .iommu_unbind()
            .map_err(upstream("NESTIO_IOMMU_UNBIND"))?;
        self.bound = false;
        Ok(())
    }

    fn invalidate(&mut self, cmds: &IommuInvalidate) -> Result<InvalidateReply, NestedIommuError> {
        // `cmds` was decoded with 1..=256 commands, so it is one message below too.
        self.shared
            .upstream
            .iommu_invalidate(&cmds.commands)
            .map_err(upstream("NESTIO_IOMMU_INVALIDATE"))
    }

    fn end(&mut self) {
        if std::mem::take(&mut self.bound) {
            if let Err(e) = self.shared.upstream.iommu_unbind() {
                tracing::warn!(error = %e, "nested IOMMU: cannot unbind the departed child at the level below");
            }
        }
        let mut sink = self.shared.sink.lock();
        if self.owns_sink(&sink) {
            *sink = Sink::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sid: u32) -> [u8; 32] {
        let mut r = [0u8; 32];
        r[0] = 0x10;
        r[4..8].copy_from_slice(&sid.to_le_bytes());
        r
    }

    fn fault(sid: u32, sequence: u32) -> IommuFault {
        IommuFault {
            lost_before: false,
            sequence,
            record: record(sid),
        }
    }

    #[test]
    fn record_sid_reads_dword0_high_half() {
        assert_eq!(record_sid(&record(0x108)), 0x108);
    }

    #[test]
    fn only_the_bound_vsid_is_relayed_and_drops_are_flagged() {
        let q = Arc::new(FaultQueue::default());
        let mut sink = Sink::default();
        // No child session: dropped.
        assert!(sink.accept(fault(8, 0)).is_none());
        sink.queue = Some(q.clone());
        // A child session that has not bound yet: dropped.
        assert!(sink.accept(fault(8, 1)).is_none());
        sink.vsid = Some(8);
        // A hostile level below naming another stream: dropped.
        assert!(sink.accept(fault(9, 2)).is_none());
        // The bound stream: relayed unchanged but for the flag saying records were lost.
        let (to, f) = sink.accept(fault(8, 3)).expect("relayed");
        assert!(Arc::ptr_eq(&to, &q));
        assert_eq!((f.sequence, f.lost_before), (3, true));
        assert_eq!(f.record, record(8));
        let (_, f) = sink.accept(fault(8, 4)).expect("relayed");
        assert_eq!((f.sequence, f.lost_before), (4, false));
        // The level below's own LOST_EVENTS is kept.
        let (_, f) = sink
            .accept(IommuFault {
                lost_before: true,
                ..fault(8, 9)
            })
            .expect("relayed");
        assert!(f.lost_before);
    }

    #[test]
    fn relayed_records_keep_their_sequence_in_the_queue() {
        let q = FaultQueue::default();
        q.relay(fault(8, 41));
        q.relay(fault(8, 42));
        assert_eq!(q.len(), 2);
    }
}
