//! Nested mode (`--viommu smmuv3,mode=nested`): the device walks the guest's stage 1
//! itself (`docs/vfio-user-nested-iommu.md`).
//!
//! # Design
//!
//! A device whose peer negotiated the nested-IOMMU capability is reached through a
//! [`NestedIommuPort`] (implemented by the vfio-user client connection in
//! `crate::remote`; a fake in the tests). For such a stream the SMMU does not
//! shadow anything:
//!
//! - **Stage 2** is the VM's: all of guest RAM at IPA = GPA, one DMA_MAP through the
//!   domain (removed while the guest's configuration aborts the stream).
//! - **Binding**: the guest's STE for the stream is read from its stream table
//!   whenever it may have changed — a CR0 / GBPA write, a consumed CFGI_STE,
//!   CFGI_STE_RANGE or CFGI_ALL — and the device is bound to it (`BIND` with STE
//!   dwords 0 and 1, re-sent every time: a re-BIND also drops the device's cached
//!   translations), unbound for a bypass (SMMU disabled with GBPA bypass, or a
//!   bypass STE: IOVA = IPA), and unbound with its stage 2 removed for an abort, an
//!   invalid STE or one this mode cannot forward (a guest stage 2). An STE the
//!   device refuses (EINVAL: illegal for its walker) aborts the stream the same way
//!   and puts a C_BAD_STE event in the guest's queue.
//! - **Invalidations**: before the model consumes the guest's commands (the write of
//!   CMDQ_PROD, or of GERRORN / CR0 that restarts the queue), the VMM reads them and
//!   forwards, in order, the TLBI_NH_* commands to every nested device and CFGI_CD /
//!   CFGI_CD_ALL to the device of their SID, each device's batch closed by the
//!   CMD_SYNCs among them; the scan stops at the first command the model would find
//!   illegal. The reply comes before the model runs, so a guest CMD_SYNC completes
//!   after the device has dropped what it invalidated. A device refusing a command
//!   (`cerror`) stops the guest's queue exactly there: the model consumes up to it and
//!   raises CMDQ_CONS.ERR / GERROR.CMDQ_ERR at that index.
//! - **Faults**: a thread per device drains its fault records and appends each to the
//!   guest's event queue with the guest's stream ID, through the model's own producer
//!   (its enable and overflow rules apply).
//!
//! A peer without the capability gets shadow mode (a log line says so).

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Weak};

use nestio_iommu::smmuv3::cmdq::{op, Command};
use nestio_iommu::smmuv3::evtq::Event;
use nestio_iommu::smmuv3::ste::StreamTable;
use nestio_iommu::smmuv3::{regs, SmmuMemory};

use super::{Inner, Smmuv3, Smmuv3Error};
use crate::iommu::{DmaDomain, StreamId};

/// What a peer's nested IOMMU walks (the capability's fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestedCaps {
    /// Largest stage-1 input size in bits.
    pub ias: u32,
    /// Largest stage-1 output (IPA) size in bits.
    pub oas: u32,
    /// Stage-1 granules walked, in bytes.
    pub granules: Vec<u64>,
    /// Substream ID bits.
    pub ssid_bits: u32,
}

/// A command batch's outcome: `done` commands executed; `cerror` (0 or CERROR_ILL)
/// for the command at index `done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InvalidateOutcome {
    /// Commands executed.
    pub done: u32,
    /// 0, or the command error of command `done`.
    pub cerror: u32,
}

/// One fault record a device reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortFault {
    /// The device dropped records before this one.
    pub lost_before: bool,
    /// The device's sequence number (wraps).
    pub sequence: u32,
    /// The 32-byte SMMUv3 event record.
    pub record: [u8; 32],
}

/// Why a port request failed.
#[derive(Debug, thiserror::Error)]
pub enum NestedPortError {
    /// The device answered with an error.
    #[error("the device refused {what}: {detail}")]
    Refused {
        /// The request.
        what: &'static str,
        /// The device's answer.
        detail: String,
    },
    /// The connection failed.
    #[error("{what} failed: {detail} (is the device process still running?)")]
    Transport {
        /// The request.
        what: &'static str,
        /// Cause.
        detail: String,
    },
}

/// A device that walks stage 1 itself. See the module documentation.
pub trait NestedIommuPort: Send + Sync {
    /// What the peer negotiated (None: no nested IOMMU, use shadow mode).
    fn nested_caps(&self) -> Option<NestedCaps>;
    /// Bind the guest's STE (dwords 0 and 1) for stream `vsid`.
    fn bind(&self, vsid: u32, ste: [u64; 2]) -> Result<(), NestedPortError>;
    /// Back to stage 2 only.
    fn unbind(&self) -> Result<(), NestedPortError>;
    /// Forward raw commands (at most 256); the reply is their completion.
    fn invalidate(&self, cmds: &[[u64; 2]]) -> Result<InvalidateOutcome, NestedPortError>;
    /// The device's fault records (once; None afterwards).
    fn take_faults(&self) -> Option<Receiver<PortFault>>;
}

/// Most commands in one forwarded batch (the protocol's limit).
const MAX_BATCH: usize = 256;

/// What a nested stream is bound to now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Binding {
    /// Nothing decided yet.
    Unset,
    /// IOVA = IPA: unbound, stage 2 mapped.
    Bypass,
    /// Nothing reachable: unbound, stage 2 unmapped.
    Abort,
    /// The guest's STE dwords 0 and 1.
    Bound([u64; 2]),
}

/// One stream in nested mode.
pub(super) struct NestedStream {
    pub(super) port: Arc<dyn NestedIommuPort>,
    pub(super) binding: Binding,
    pub(super) s2_mapped: bool,
}

/// The commands a guest batch forwards to each device: `(guest queue index, raw)`.
type Batches = Vec<(u32, Vec<(u32, [u64; 2])>)>;

impl Smmuv3 {
    /// Put `stream` in nested mode through `port` if its peer negotiated the
    /// capability (returns true), else shadow it as [`Smmuv3::add_stream`] does.
    pub fn add_nested_stream(
        self: &Arc<Self>,
        stream: StreamId,
        port: Arc<dyn NestedIommuPort>,
    ) -> Result<bool, Smmuv3Error> {
        let StreamId::Pci(rid) = stream else {
            return Err(Smmuv3Error::NotPci(stream));
        };
        let Some(caps) = port.nested_caps() else {
            tracing::warn!(%stream, "SMMUv3 mode=nested: the device has no nested IOMMU (capability not negotiated); shadow mode for it");
            self.add_stream(stream)?;
            return Ok(false);
        };
        tracing::info!(%stream, ?caps, "SMMUv3: nested mode (the device walks stage 1)");
        let sid = u32::from(rid);
        if let Some(faults) = port.take_faults() {
            let smmu = Arc::downgrade(self);
            std::thread::Builder::new()
                .name(format!("smmu-faults-{sid:#x}"))
                .spawn(move || fault_loop(smmu, sid, faults))
                .map_err(|e| Smmuv3Error::Nested {
                    stream,
                    err: NestedPortError::Transport {
                        what: "the fault thread",
                        detail: e.to_string(),
                    },
                })?;
        }
        let mut inner = self.inner.lock();
        inner.shadows.remove(&sid);
        inner.nested.insert(
            sid,
            NestedStream {
                port,
                binding: Binding::Unset,
                s2_mapped: false,
            },
        );
        self.rebind(&mut inner, &|s| s == sid)?;
        Ok(true)
    }

    /// Whether `sid` is in nested mode, and its binding (tests).
    pub fn nested_binding(&self, sid: u32) -> Option<Option<[u64; 2]>> {
        self.inner.lock().nested.get(&sid).map(|n| match n.binding {
            Binding::Bound(s) => Some(s),
            _ => None,
        })
    }

    /// What the guest's configuration says for `sid` now.
    fn wanted_binding(&self, inner: &Inner, sid: u32) -> Binding {
        if !inner.smmu.enabled() {
            return if inner.smmu.read(regs::GBPA, 4) as u32 & regs::GBPA_ABORT != 0 {
                Binding::Abort
            } else {
                Binding::Bypass
            };
        }
        let st = StreamTable {
            base: inner.smmu.read(regs::STRTAB_BASE, 8),
            cfg: inner.smmu.read(regs::STRTAB_BASE_CFG, 4) as u32,
        };
        let Ok(addr) = st.ste_addr(&self.mem, sid) else {
            return Binding::Abort;
        };
        let mut b = [0u8; 16];
        if SmmuMemory::read(&self.mem, addr, &mut b).is_err() {
            return Binding::Abort;
        }
        let d0 = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let d1 = u64::from_le_bytes(b[8..].try_into().unwrap_or_default());
        if d0 & 1 == 0 {
            return Binding::Abort;
        }
        match (d0 >> 1) & 7 {
            0b100 => Binding::Bypass,
            0b101 => Binding::Bound([d0, d1]),
            0b110 | 0b111 => {
                tracing::warn!(sid, "SMMUv3 nested mode: the guest's STE uses its own stage 2, which cannot be forwarded; the stream aborts");
                Binding::Abort
            }
            _ => Binding::Abort,
        }
    }

    /// Bind every nested stream `pick` selects to what the guest's configuration
    /// says now.
    pub(super) fn rebind(
        &self,
        inner: &mut Inner,
        pick: &dyn Fn(u32) -> bool,
    ) -> Result<(), Smmuv3Error> {
        let sids: Vec<u32> = inner.nested.keys().copied().filter(|s| pick(*s)).collect();
        let mut first_err = None;
        for sid in sids {
            let want = self.wanted_binding(inner, sid);
            if let Err(e) = self.apply_binding(inner, sid, want) {
                tracing::error!(sid, error = %e, "SMMUv3 nested: binding failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn apply_binding(&self, inner: &mut Inner, sid: u32, want: Binding) -> Result<(), Smmuv3Error> {
        let stream = StreamId::Pci(sid as u16);
        let perr = |err| Smmuv3Error::Nested { stream, err };
        let dom = |err| Smmuv3Error::Domain { stream, err };
        let Some(n) = inner.nested.get(&sid) else {
            return Ok(());
        };
        let (port, was, s2_mapped) = (n.port.clone(), n.binding, n.s2_mapped);
        let s2 = !matches!(want, Binding::Abort);
        if s2 && !s2_mapped {
            self.domain
                .map(stream, 0, 0, self.ram_size, nestio_dma::Prot::RW)
                .map_err(dom)?;
            Self::nested_mut(inner, sid).s2_mapped = true;
        }
        match want {
            Binding::Bound(ste) => match port.bind(sid, ste) {
                Ok(()) => {}
                Err(NestedPortError::Refused { what, detail }) => {
                    // The device found the STE illegal: the stream aborts, as the
                    // SMMU would, and the guest gets the C_BAD_STE it would get.
                    tracing::warn!(
                        sid,
                        what,
                        detail,
                        "SMMUv3 nested: the device refused the guest's STE; the stream aborts"
                    );
                    let ev = Event::config(nestio_iommu::smmuv3::evtq::code::C_BAD_STE, sid, None);
                    inner.smmu.inject_event(&self.mem, &ev);
                    return self.apply_binding(inner, sid, Binding::Abort);
                }
                Err(e) => return Err(perr(e)),
            },
            Binding::Bypass | Binding::Abort | Binding::Unset => {
                if matches!(was, Binding::Bound(_)) {
                    port.unbind().map_err(perr)?;
                    Self::nested_mut(inner, sid).binding = Binding::Unset;
                }
            }
        }
        if !s2 && Self::nested_mut(inner, sid).s2_mapped {
            self.domain.unmap(stream, 0, self.ram_size).map_err(dom)?;
            Self::nested_mut(inner, sid).s2_mapped = false;
        }
        tracing::debug!(sid, ?want, "SMMUv3 nested binding");
        Self::nested_mut(inner, sid).binding = want;
        Ok(())
    }

    fn nested_mut(inner: &mut Inner, sid: u32) -> &mut NestedStream {
        inner
            .nested
            .get_mut(&sid)
            .expect("a nested stream (checked by the caller)")
    }

    /// The guest commands from CMDQ_CONS up to `prod` (index with wrap bit) the
    /// model would execute, with their queue indices; stops at an illegal one.
    fn pending_commands(&self, inner: &Inner, prod: u32) -> Vec<(u32, [u64; 2])> {
        let base = inner.smmu.read(regs::CMDQ_BASE, 8);
        let log2 = regs::queue_log2(base, regs::CMDQS);
        let index_mask = (2u32 << log2) - 1;
        let cons = inner.smmu.read(regs::CMDQ_CONS, 4) as u32 & index_mask;
        let n = prod.wrapping_sub(cons) & index_mask;
        let mut out = Vec::new();
        for i in 0..n.min(super::range::MAX_SCAN) {
            let idx = cons.wrapping_add(i) & index_mask;
            let Some(raw) = self.read_command(base, log2, idx) else {
                break;
            };
            if Command::decode(&raw).is_err() {
                break;
            }
            out.push((idx, raw));
        }
        out
    }

    /// Split `cmds` into per-device batches (see the module documentation).
    fn batches(inner: &Inner, cmds: &[(u32, [u64; 2])]) -> Batches {
        let mut out: Batches = inner.nested.keys().map(|&s| (s, Vec::new())).collect();
        for &(idx, raw) in cmds {
            let opcode = raw[0] as u8;
            let sid = (raw[0] >> 32) as u32;
            for (s, batch) in out.iter_mut() {
                let take = match opcode {
                    op::TLBI_NH_ALL | op::TLBI_NH_ASID | op::TLBI_NH_VA | op::TLBI_NH_VAA => true,
                    op::CFGI_CD | op::CFGI_CD_ALL => sid == *s,
                    op::CMD_SYNC => batch.last().is_some_and(|l| l.1[0] as u8 != op::CMD_SYNC),
                    _ => false,
                };
                if take {
                    batch.push((idx, raw));
                }
            }
        }
        out.retain(|(_, b)| !b.is_empty());
        out
    }

    /// Forward the guest's commands up to `prod` to the nested devices; the guest
    /// queue index of the first command a device refused, if any.
    pub(super) fn forward(&self, inner: &Inner, prod: u32) -> Option<u32> {
        if inner.nested.is_empty() {
            return None;
        }
        let cmds = self.pending_commands(inner, prod);
        let mut refused: Option<(usize, u32)> = None;
        for (sid, batch) in Self::batches(inner, &cmds) {
            let port = &inner.nested[&sid].port;
            for chunk in batch.chunks(MAX_BATCH) {
                let raws: Vec<[u64; 2]> = chunk.iter().map(|c| c.1).collect();
                match port.invalidate(&raws) {
                    Ok(r) if r.cerror != 0 => {
                        let Some(&(idx, raw)) = chunk.get(r.done as usize) else {
                            tracing::warn!(
                                sid,
                                ?r,
                                "SMMUv3 nested: a reply's index is outside the batch; ignored"
                            );
                            break;
                        };
                        tracing::info!(
                            sid,
                            idx,
                            opcode = raw[0] as u8,
                            "SMMUv3 nested: the device refused a command"
                        );
                        // The earliest in guest order wins (a queue stops once).
                        let rank = cmds.iter().position(|c| c.0 == idx).unwrap_or(usize::MAX);
                        if refused.is_none_or(|(r0, _)| rank < r0) {
                            refused = Some((rank, idx));
                        }
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // The device is gone; the assigned device's liveness check
                        // stops the VM. The guest's queue goes on.
                        tracing::error!(sid, error = %e, "SMMUv3 nested: forwarding invalidations failed");
                        break;
                    }
                }
            }
        }
        refused.map(|r| r.1)
    }

    /// Whether the consumed commands reconfigured stream `sid` (CFGI_STE of it,
    /// CFGI_STE_RANGE covering it, CFGI_ALL).
    pub(super) fn reconfigures(cmds: &[[u64; 2]], sid: u32) -> bool {
        cmds.iter().any(|c| match Command::decode(c) {
            Ok(Command::CfgiSte { sid: s }) => s == sid,
            Ok(Command::CfgiSteRange { sid: s, range }) => {
                range >= 31 || (u64::from(s) ^ u64::from(sid)) >> (range + 1) == 0
            }
            Ok(Command::CfgiAll) => true,
            _ => false,
        })
    }

    /// Append a device's fault record to the guest's event queue with `sid`.
    pub fn inject_fault(&self, sid: u32, f: &PortFault) -> bool {
        let mut ev = Event::decode(&f.record);
        ev.sid = sid;
        if f.lost_before {
            tracing::warn!(
                sid,
                sequence = f.sequence,
                "SMMUv3 nested: the device dropped fault records"
            );
        }
        let mut inner = self.inner.lock();
        inner.smmu.inject_event(&self.mem, &ev)
    }
}

fn fault_loop(smmu: Weak<Smmuv3>, sid: u32, faults: Receiver<PortFault>) {
    while let Ok(f) = faults.recv() {
        let Some(s) = smmu.upgrade() else { return };
        let written = s.inject_fault(sid, &f);
        tracing::debug!(
            sid,
            sequence = f.sequence,
            written,
            "SMMUv3 nested: device fault"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::iommu::recorder::DmaRecorder;
    use crate::iommu::smmuv3::GuestRamView;
    use crate::iommu::{GuestRamFile, ShadowDomain};
    use crate::memory::GuestRam;
    use nestio_dma::Prot;
    use parking_lot::Mutex;
    use std::sync::mpsc::{channel, Sender};
    use vm_memory::{Bytes, GuestAddress};

    const RAM: u64 = 16 << 20;
    const STRTAB: u64 = 0x10_0000;
    const CMDQ: u64 = 0x11_0000;
    const EVTQ: u64 = 0x12_0000;
    const CD: u64 = 0x13_0000;

    /// A device with a nested IOMMU that records what it is asked and refuses one
    /// opcode.
    #[derive(Default)]
    struct FakePort {
        caps: bool,
        binds: Mutex<Vec<(u32, [u64; 2])>>,
        unbinds: Mutex<u32>,
        invalidations: Mutex<Vec<Vec<[u64; 2]>>>,
        refuse: Mutex<Option<u8>>,
        refuse_bind: Mutex<bool>,
        faults: Mutex<Option<Receiver<PortFault>>>,
    }

    impl NestedIommuPort for FakePort {
        fn nested_caps(&self) -> Option<NestedCaps> {
            self.caps.then(|| NestedCaps {
                ias: 48,
                oas: 48,
                granules: vec![4096],
                ssid_bits: 0,
            })
        }
        fn bind(&self, vsid: u32, ste: [u64; 2]) -> Result<(), NestedPortError> {
            if *self.refuse_bind.lock() {
                return Err(NestedPortError::Refused {
                    what: "BIND",
                    detail: "EINVAL".into(),
                });
            }
            self.binds.lock().push((vsid, ste));
            Ok(())
        }
        fn unbind(&self) -> Result<(), NestedPortError> {
            *self.unbinds.lock() += 1;
            Ok(())
        }
        fn invalidate(&self, cmds: &[[u64; 2]]) -> Result<InvalidateOutcome, NestedPortError> {
            self.invalidations.lock().push(cmds.to_vec());
            let refuse = *self.refuse.lock();
            Ok(match cmds.iter().position(|c| Some(c[0] as u8) == refuse) {
                Some(i) => InvalidateOutcome {
                    done: i as u32,
                    cerror: regs::CERROR_ILL,
                },
                None => InvalidateOutcome {
                    done: cmds.len() as u32,
                    cerror: 0,
                },
            })
        }
        fn take_faults(&self) -> Option<Receiver<PortFault>> {
            self.faults.lock().take()
        }
    }

    struct Rig {
        ram: GuestRam,
        smmu: Arc<Smmuv3>,
        dev: Arc<DmaRecorder>,
        port: Arc<FakePort>,
        faults: Sender<PortFault>,
        prod: u32,
    }

    impl Rig {
        fn new(caps: bool) -> (Self, bool) {
            let ram = GuestRam::new(RAM).unwrap();
            let domain = Arc::new(ShadowDomain::new(GuestRamFile::of(&ram)));
            let dev = Arc::new(DmaRecorder::default());
            let stream = StreamId::pci(0, 1, 0);
            domain.attach(stream, dev.clone()).unwrap();
            let smmu = Arc::new(Smmuv3::new(
                GuestRamView::new(ram.memory().clone(), None),
                domain,
                RAM,
            ));
            let (tx, rx) = channel();
            let port = Arc::new(FakePort {
                caps,
                faults: Mutex::new(Some(rx)),
                ..FakePort::default()
            });
            let nested = smmu.add_nested_stream(stream, port.clone()).unwrap();
            let r = Rig {
                ram,
                smmu,
                dev,
                port,
                faults: tx,
                prod: 0,
            };
            (r, nested)
        }
        fn w64(&self, addr: u64, v: u64) {
            self.ram.memory().write_obj(v, GuestAddress(addr)).unwrap();
        }
        fn r64(&self, addr: u64) -> u64 {
            self.ram.memory().read_obj(GuestAddress(addr)).unwrap()
        }
        fn reg(&self, off: u64, v: u64, size: usize) {
            self.smmu.write(off, &v.to_le_bytes()[..size]).unwrap();
        }
        fn read32(&self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            BusDevice::read(&*self.smmu, off, &mut b).unwrap();
            u32::from_le_bytes(b)
        }
        /// Queue commands and publish them with one CMDQ_PROD write.
        fn cmds(&mut self, cmds: &[[u64; 2]]) {
            for c in cmds {
                let slot = CMDQ + u64::from(self.prod & 15) * 16;
                self.w64(slot, c[0]);
                self.w64(slot + 8, c[1]);
                self.prod = (self.prod + 1) & 31;
            }
            self.reg(regs::CMDQ_PROD, u64::from(self.prod), 4);
        }
        fn ste0(cd: u64) -> u64 {
            1 | (0b101 << 1) | cd
        }
        fn enable(&self) {
            self.w64(STRTAB + 8 * 64, Self::ste0(CD));
            self.w64(STRTAB + 8 * 64 + 8, 0);
            self.reg(regs::STRTAB_BASE, STRTAB, 8);
            self.reg(regs::STRTAB_BASE_CFG, 5, 4);
            self.reg(regs::CMDQ_BASE, CMDQ | 4, 8);
            self.reg(regs::EVENTQ_BASE, EVTQ | 4, 8);
            self.reg(regs::CR0, 0xd, 4);
        }
    }

    const SYNC: [u64; 2] = [0x46, 0];

    #[test]
    fn stage2_is_the_vms_ram_and_the_guests_ste_is_bound_and_rebound() {
        let (mut r, nested) = Rig::new(true);
        assert!(nested);
        // SMMU disabled (GBPA bypass): stage 2 only, IPA = GPA.
        assert_eq!(r.dev.map_ranges(), vec![(0, RAM, Prot::RW)]);
        assert_eq!(r.smmu.nested_binding(8), Some(None));
        assert!(r.smmu.shadow(8).is_empty(), "not shadowed");
        r.enable();
        assert_eq!(*r.port.binds.lock(), vec![(8, [Rig::ste0(CD), 0])]);
        assert_eq!(r.smmu.nested_binding(8), Some(Some([Rig::ste0(CD), 0])));
        assert_eq!(r.dev.maps.lock().len(), 1, "stage 2 mapped once");
        // The guest edits the STE: nothing until CFGI_STE, then a re-BIND.
        r.w64(STRTAB + 8 * 64, Rig::ste0(CD + 0x1000));
        r.cmds(&[[0x11 | (1 << 48), 0]]);
        assert_eq!(r.port.binds.lock().len(), 1);
        r.cmds(&[[0x03 | (16 << 32), 0], [0x04 | (16 << 32), 2], SYNC]);
        assert_eq!(r.port.binds.lock().len(), 1, "other streams' CFGI_STE*");
        r.cmds(&[[0x03 | (8 << 32), 0], SYNC]);
        assert_eq!(
            r.port.binds.lock().last(),
            Some(&(8, [Rig::ste0(CD + 0x1000), 0]))
        );
        // A bypass STE unbinds (stage 2 stays); an invalid one also drops stage 2.
        r.w64(STRTAB + 8 * 64, 1 | (0b100 << 1));
        r.cmds(&[[0x03 | (8 << 32), 0], SYNC]);
        assert_eq!(
            (*r.port.unbinds.lock(), r.smmu.nested_binding(8)),
            (1, Some(None))
        );
        assert!(r.dev.unmaps.lock().is_empty());
        r.w64(STRTAB + 8 * 64, 0);
        r.cmds(&[[0x04, 31], SYNC]);
        assert_eq!(*r.port.unbinds.lock(), 1, "already unbound");
        assert_eq!(*r.dev.unmaps.lock(), vec![(0, RAM)]);
        // Valid again: stage 2 back, bound.
        r.w64(STRTAB + 8 * 64, Rig::ste0(CD));
        r.cmds(&[[0x07, 0], SYNC]);
        assert_eq!(r.dev.maps.lock().len(), 2);
        assert_eq!(r.smmu.nested_binding(8), Some(Some([Rig::ste0(CD), 0])));
    }

    #[test]
    fn guest_invalidations_are_forwarded_and_a_refusal_stops_the_queue_there() {
        let (mut r, _) = Rig::new(true);
        r.enable();
        let va = [0x12 | (1 << 48), 0x5000];
        let cfgi_cd_other = [0x05 | (16 << 32), 0];
        r.cmds(&[va, cfgi_cd_other, [0x03 | (16 << 32), 0], SYNC]);
        assert_eq!(
            *r.port.invalidations.lock(),
            vec![vec![va, SYNC]],
            "TLBIs and this stream's CFGI_CD only, closed by the CMD_SYNC"
        );
        assert_eq!(r.read32(regs::CMDQ_CONS), 4);
        // The device refuses CFGI_CD: the guest's queue stops at its index (5).
        *r.port.refuse.lock() = Some(0x05);
        let asid = [0x11 | (1 << 48), 0];
        r.cmds(&[asid, [0x05 | (8 << 32), 0], SYNC]);
        assert_eq!(r.read32(regs::CMDQ_CONS), 5 | (regs::CERROR_ILL << 24));
        assert_eq!(r.read32(regs::GERROR) & regs::GERROR_CMDQ_ERR, 1);
        assert_eq!(r.read32(regs::CMDQ_PROD), 7, "PROD is the guest's");
        // The guest replaces it and acknowledges: forwarding resumes from there.
        *r.port.refuse.lock() = None;
        r.w64(CMDQ + 5 * 16, 0x10);
        r.w64(CMDQ + 5 * 16 + 8, 0);
        let gerror = r.read32(regs::GERROR);
        r.reg(regs::GERRORN, u64::from(gerror), 4);
        assert_eq!(r.read32(regs::CMDQ_CONS) & 0x1f, 7);
        assert_eq!(
            r.port.invalidations.lock().last(),
            Some(&vec![[0x10, 0], SYNC])
        );
    }

    #[test]
    fn device_faults_land_in_the_guests_event_queue_with_its_sid() {
        let (r, _) = Rig::new(true);
        r.enable();
        let ev = Event {
            code: nestio_iommu::smmuv3::evtq::code::F_TRANSLATION,
            sid: 0x77,
            ssid: None,
            read: false,
            s2: false,
            class: nestio_iommu::smmuv3::evtq::FaultClass::In,
            input_addr: 0x80_0000_5000,
            addr2: 0,
        };
        r.faults
            .send(PortFault {
                lost_before: false,
                sequence: 0,
                record: ev.encode(),
            })
            .unwrap();
        for _ in 0..200 {
            if r.read32(regs::EVENTQ_PROD) == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(r.read32(regs::EVENTQ_PROD), 1);
        let d0 = r.r64(EVTQ);
        assert_eq!(
            (d0 & 0xff, d0 >> 32),
            (0x10, 8),
            "F_TRANSLATION with the guest's SID"
        );
        assert_eq!(r.r64(EVTQ + 16), 0x80_0000_5000);
    }

    #[test]
    fn hostile_register_and_queue_programs_neither_panic_nor_desync_the_device() {
        // A nested stream (SID 8, fake port) and a shadowed one (SID 16, a real map
        // table with exact unmaps) under random register writes and random queue and
        // table contents: no panic, and the shadowed device always holds exactly the
        // runs the SMMU believes it installed.
        use crate::iommu::table_device::TableDevice;
        let (r, _) = Rig::new(true);
        let shadowed = Arc::new(TableDevice::new(1 << 16));
        let s16 = StreamId::pci(0, 2, 0);
        r.smmu.domain.attach(s16, shadowed.clone()).unwrap();
        r.smmu.add_stream(s16).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let offsets = [
            regs::CR0,
            regs::GBPA,
            regs::IRQ_CTRL,
            regs::GERRORN,
            regs::STRTAB_BASE,
            regs::STRTAB_BASE_CFG,
            regs::CMDQ_BASE,
            regs::CMDQ_PROD,
            regs::CMDQ_CONS,
            regs::EVENTQ_BASE,
            regs::EVENTQ_CONS,
        ];
        let opcodes = [
            0x01u64, 0x03, 0x04, 0x05, 0x06, 0x07, 0x10, 0x11, 0x12, 0x13, 0x28, 0x2a, 0x30, 0x46,
            0xff,
        ];
        // Start from a working configuration: SID 8 bound, SID 16 translating through
        // the CD's 4-level tables with some pages mapped.
        r.enable();
        r.w64(STRTAB + 16 * 64, Rig::ste0(CD));
        r.w64(
            CD,
            16 | (1 << 31) | (1 << 41) | (5 << 32) | (1 << 45) | (1 << 46) | (1 << 48),
        );
        r.w64(CD + 8, 0x14_0000);
        r.w64(0x14_0000, 0x15_0000 | 3);
        r.w64(0x15_0000, 0x15_1000 | 3);
        r.w64(0x15_1000, 0x15_2000 | 3);
        let pte = |page: u64| (0x40_0000 + page * 0x1000) | 3 | (1 << 10) | (1 << 6);
        for p in 0..32 {
            r.w64(0x15_2000 + p * 8, pte(p));
        }
        let mut prod = r.read32(regs::CMDQ_PROD);
        for _ in 0..3000 {
            match rnd(10) {
                0..=3 => {
                    // Publish 1-3 commands: mostly TLBI_NH_VA + CMD_SYNC, sometimes
                    // anything with random operands.
                    for _ in 0..=rnd(3) {
                        let (d0, d1) = match rnd(3) {
                            0 => (0x12 | (1 << 48), rnd(64) << 12),
                            1 => (0x46, 0),
                            _ => (
                                opcodes[rnd(opcodes.len() as u64) as usize]
                                    | (rnd(24) << 32)
                                    | (rnd(4) << 48),
                                rnd(1 << 24) << 12 | rnd(1 << 12),
                            ),
                        };
                        let slot = CMDQ + u64::from(prod & 15) * 16;
                        r.w64(slot, d0);
                        r.w64(slot + 8, d1);
                        prod = (prod + 1) & 31;
                    }
                    r.reg(regs::CMDQ_PROD, u64::from(prod), 4);
                }
                4..=6 => {
                    // Page-table changes: leaves, sometimes a table entry or a block.
                    let p = rnd(64);
                    let v = match rnd(5) {
                        0 => 0,
                        1 => (rnd(8) << 21) | 1 | (1 << 10),
                        _ => pte(rnd(64)) | (rnd(2) << 7),
                    };
                    let a = if rnd(8) == 0 {
                        0x15_1000 + rnd(2) * 8
                    } else {
                        0x15_2000 + p * 8
                    };
                    r.w64(a, v);
                }
                7 => {
                    // STE / CD garbage (or a valid STE back).
                    let a = [STRTAB + 8 * 64, STRTAB + 16 * 64, CD, CD + 8][rnd(4) as usize];
                    let v = match rnd(3) {
                        0 => rnd(u64::MAX),
                        1 => 1 | (rnd(8) << 1) | CD,
                        _ => Rig::ste0(CD),
                    };
                    r.w64(a, v);
                }
                _ => {
                    let off = offsets[rnd(offsets.len() as u64) as usize];
                    let v = match off {
                        regs::CMDQ_PROD => rnd(64),
                        regs::CR0 => [0xd, rnd(16)][rnd(2) as usize],
                        regs::GERRORN => u64::from(r.read32(regs::GERROR)),
                        regs::STRTAB_BASE => [STRTAB, rnd(u64::MAX)][rnd(2) as usize],
                        regs::STRTAB_BASE_CFG => [5, 8, rnd(u64::MAX)][rnd(3) as usize],
                        regs::CMDQ_BASE => [CMDQ | 4, rnd(u64::MAX)][rnd(2) as usize],
                        _ => rnd(u64::MAX),
                    };
                    let size = if rnd(2) == 0 { 4 } else { 8 };
                    r.reg(off, v, size);
                    prod = r.read32(regs::CMDQ_PROD);
                }
            }
            let mut held: Vec<(u64, u64)> = shadowed
                .table
                .mappings()
                .iter()
                .map(|m| (m.range.start(), m.range.len()))
                .collect();
            held.sort_unstable();
            let want: Vec<(u64, u64)> = r.smmu.shadow(16).iter().map(|x| (x.0, x.2)).collect();
            assert!(
                held == want,
                "the shadowed device's table and the SMMU's runs differ"
            );
        }
        assert!(r.smmu.nested_binding(8).is_some(), "still nested");
        let s = r.smmu.stats();
        let (binds, invs) = (r.port.binds.lock().len(), r.port.invalidations.lock().len());
        println!("{s:?}, {binds} binds, {invs} forwarded batches");
        // The program reached the interesting paths, not only the register file.
        assert!(
            s.full > 100 && s.ranged > 0 && binds > 0 && invs > 0,
            "{s:?} {binds} {invs}"
        );
    }

    #[test]
    fn an_ste_the_device_refuses_aborts_the_stream_with_c_bad_ste() {
        let (mut r, _) = Rig::new(true);
        r.enable();
        assert_eq!(r.port.binds.lock().len(), 1);
        *r.port.refuse_bind.lock() = true;
        r.w64(STRTAB + 8 * 64, Rig::ste0(CD) | (3 << 4)); // a reserved S1Fmt, say
        r.cmds(&[[0x03 | (8 << 32), 0], SYNC]);
        assert_eq!(r.smmu.nested_binding(8), Some(None));
        assert_eq!(*r.port.unbinds.lock(), 1, "the old binding is dropped");
        assert_eq!(*r.dev.unmaps.lock(), vec![(0, RAM)], "stage 2 removed");
        assert_eq!(r.read32(regs::EVENTQ_PROD), 1);
        let d0 = r.r64(EVTQ);
        assert_eq!((d0 & 0xff, d0 >> 32), (0x04, 8), "C_BAD_STE for SID 8");
        // Fixed and re-validated: bound again, stage 2 back.
        *r.port.refuse_bind.lock() = false;
        r.w64(STRTAB + 8 * 64, Rig::ste0(CD));
        r.cmds(&[[0x03 | (8 << 32), 0], SYNC]);
        assert_eq!(r.smmu.nested_binding(8), Some(Some([Rig::ste0(CD), 0])));
        assert_eq!(r.dev.maps.lock().len(), 2);
    }

    #[test]
    fn which_cfgi_commands_reconfigure_a_stream() {
        let r = |cmds: &[[u64; 2]]| Smmuv3::reconfigures(cmds, 8);
        assert!(r(&[[0x03 | (8 << 32), 0]]));
        assert!(!r(&[[0x03 | (9 << 32), 0]]));
        // CFGI_STE_RANGE: 2^(range + 1) streams from SID aligned down.
        assert!(r(&[[0x04 | (9 << 32), 0]]), "8..=9");
        assert!(!r(&[[0x04 | (10 << 32), 0]]), "10..=11");
        assert!(r(&[[0x04 | (15 << 32), 2]]), "8..=15");
        assert!(!r(&[[0x04 | (16 << 32), 2]]), "16..=23");
        assert!(r(&[[0x04 | (0x1234 << 32), 31]]), "all");
        assert!(r(&[[0x07, 0]]), "CFGI_ALL");
        assert!(
            !r(&[[0x05 | (8 << 32), 0], [0x11, 0], SYNC]),
            "CDs and TLBs are not STEs"
        );
        assert!(
            !r(&[[0x03 | (8 << 32) | (1 << 10), 0]]),
            "illegal (SSec): not executed"
        );
    }

    #[test]
    fn a_peer_without_the_capability_is_shadowed() {
        let (r, nested) = Rig::new(false);
        assert!(!nested);
        assert_eq!(r.smmu.nested_binding(8), None);
        assert_eq!(r.smmu.shadow(8), vec![(0, 0, RAM, Prot::RW)]);
        r.enable();
        assert!(r.port.binds.lock().is_empty());
    }
}
