//! ARM SMMUv3 model: the programming interface, stage-1/stage-2/nested translation,
//! the command and event queues.
//!
//! # Design
//!
//! [`Smmu`] is the device state: its registers, a configuration cache (decoded STEs
//! and CDs, invalidated only by CFGI_* commands, as on hardware: a guest that edits
//! an STE without CFGI_STE keeps the old configuration) and an [`iotlb::Iotlb`]
//! tagged (VMID, ASID, IOVA) invalidated only by TLBI_* commands. It owns no memory:
//! every table, queue and event access goes through the [`SmmuMemory`] the caller
//! passes in, so the VMM, a device process and the tests drive the same code.
//!
//! - MMIO: [`Smmu::read`] / [`Smmu::write`] (32- and 64-bit accesses; 64-bit
//!   registers also by 32-bit halves). Writing CMDQ_PROD, enabling CMDQEN or
//!   acknowledging a command error consumes the command queue synchronously.
//! - DMA: [`Smmu::translate`] for one transaction (stream ID, optional substream
//!   ID, address, direction) returns the output address and the leaf size, or the
//!   fault — after recording its event in the guest's event queue when the
//!   configuration says so (CD.R for stage-1 faults, STE.S2R for stage-2 faults,
//!   always for configuration errors). [`Smmu::probe`] is the same walk without
//!   side effects (no event, no IOTLB fill), for a VMM that shadows the tables.
//! - Submodules: [`regs`] (offsets, IDR values), [`ste`] / [`cd`] (decoding and
//!   table lookups), [`walk`] (VMSAv8-64 walks), [`iotlb`], [`cmdq`] (decoding),
//!   [`evtq`] (records and the producer), [`memory`] (the memory trait).
//!
//! What is implemented is exactly what the IDRs advertise: stage 1 and stage 2
//! (AArch64 tables, little-endian, 4/16/64 KiB granules, 48-bit output), 16-bit
//! ASIDs and VMIDs, 2-level stream tables, substreams (8 bits; CD tables linear or
//! 2-level), MSIs, no ATS/PRI/stall, no Secure state, no HTTU, no range TLBI.

pub mod cd;
pub mod cmdq;
pub mod evtq;
pub mod fuzz;
pub mod iotlb;
pub mod memory;
pub mod regs;
pub mod stage1_dma;
pub mod ste;
pub mod tables;
pub mod walk;

use std::collections::HashMap;
use std::convert::Infallible;

use cd::{Cd, CdError, CdLocation};
use cmdq::{Command, SyncSignal};
use evtq::{code, Event, FaultClass, Push, QueueIndex};
pub use memory::{FlatMemory, MemoryError, SmmuMemory, WiredIrq};
use ste::{S1Dss, Ste, SteError, StreamTable};
use thiserror::Error;
use walk::{FaultKind, Perm, Stage, WalkConfig, WalkFault};

/// One DMA transaction presented to the SMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transaction {
    /// Stream ID (the PCI requester ID).
    pub sid: u32,
    /// Substream ID (PASID), if the transaction carries one.
    pub ssid: Option<u32>,
    /// Input address (IOVA).
    pub addr: u64,
    /// A write (else a read).
    pub write: bool,
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Output (physical) address of the transaction's address.
    pub addr: u64,
    /// log2 of the size of the naturally aligned range around the input address
    /// that translates contiguously with the same permissions.
    pub size_bits: u32,
    /// Permissions of the translation.
    pub perm: Perm,
}

/// Why a transaction was not translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TranslateError {
    /// Aborted without an event (SMMU disabled with GBPA.ABORT, or STE.Config
    /// abort).
    #[error("the transaction was aborted by configuration (no event)")]
    Aborted,
    /// Terminated with this event (recorded in the event queue if enabled and the
    /// configuration asks for it; `recorded` tells).
    #[error("the transaction faulted (event {:#04x})", .event.code)]
    Fault {
        /// The event describing the fault.
        event: Event,
        /// Whether it was written to the event queue.
        recorded: bool,
    },
}

/// What a stream's DMA reaches, as a shadowing VMM needs it ([`Smmu::stream_view`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamView {
    /// Untranslated: input address = output address (SMMU disabled with GBPA
    /// bypass, or STE bypass).
    Bypass,
    /// Nothing reachable (abort, invalid configuration, or no valid leaf).
    Mapped(Vec<walk::Extent>),
}

/// Counters for tests and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commands executed.
    pub commands: u64,
    /// Event records written.
    pub events: u64,
    /// CMD_SYNCs completed.
    pub syncs: u64,
    /// Events dropped (queue disabled, full or aborted).
    pub events_lost: u64,
}

#[derive(Debug, Clone, Copy)]
struct StreamState {
    ste: Ste,
}

/// The SMMUv3 device.
#[derive(Debug, Default)]
pub struct Smmu {
    cr0: u32,
    cr1: u32,
    cr2: u32,
    gbpa: u32,
    irq_ctrl: u32,
    gerror: u32,
    gerrorn: u32,
    gerror_irq_cfg0: u64,
    gerror_irq_cfg1: u32,
    gerror_irq_cfg2: u32,
    strtab_base: u64,
    strtab_base_cfg: u32,
    cmdq_base: u64,
    cmdq_prod: u32,
    cmdq_cons: u32,
    eventq_base: u64,
    eventq_prod: u32,
    eventq_cons: u32,
    eventq_irq_cfg0: u64,
    eventq_irq_cfg1: u32,
    eventq_irq_cfg2: u32,
    streams: HashMap<u32, StreamState>,
    cds: HashMap<(u32, u32), Cd>,
    iotlb: iotlb::Iotlb,
    stats: Stats,
}

fn set_lo(reg: &mut u64, v: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(v);
}
fn set_hi(reg: &mut u64, v: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(v) << 32);
}

/// A fault found while translating, before deciding whether to record it.
struct Pending {
    event: Event,
    record: bool,
}

impl Smmu {
    /// A device in its reset state (everything disabled, GBPA = bypass).
    pub fn new() -> Self {
        Self::default()
    }

    /// Counters since reset.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The IOTLB (for tests and statistics).
    pub fn iotlb(&self) -> &iotlb::Iotlb {
        &self.iotlb
    }

    /// Whether translation is enabled (CR0.SMMUEN).
    pub fn enabled(&self) -> bool {
        self.cr0 & regs::CR0_SMMUEN != 0
    }

    /// MMIO read of `size` (4 or 8) bytes at `offset`; unknown offsets read 0.
    pub fn read(&self, offset: u64, size: u32) -> u64 {
        let r32 = |o: u64| -> u32 {
            match o {
                regs::IDR0 => regs::IDR0_VALUE,
                regs::IDR1 => regs::IDR1_VALUE,
                regs::IDR5 => regs::IDR5_VALUE,
                regs::IIDR => regs::IIDR_VALUE,
                regs::AIDR => regs::AIDR_VALUE,
                regs::CR0 => self.cr0,
                regs::CR0ACK => self.cr0 & regs::CR0_IMPLEMENTED,
                regs::CR1 => self.cr1,
                regs::CR2 => self.cr2,
                regs::GBPA => self.gbpa,
                regs::IRQ_CTRL => self.irq_ctrl,
                regs::IRQ_CTRLACK => self.irq_ctrl,
                regs::GERROR => self.gerror,
                regs::GERRORN => self.gerrorn,
                regs::GERROR_IRQ_CFG0 => self.gerror_irq_cfg0 as u32,
                0x6c => (self.gerror_irq_cfg0 >> 32) as u32,
                regs::GERROR_IRQ_CFG1 => self.gerror_irq_cfg1,
                regs::GERROR_IRQ_CFG2 => self.gerror_irq_cfg2,
                regs::STRTAB_BASE => self.strtab_base as u32,
                0x84 => (self.strtab_base >> 32) as u32,
                regs::STRTAB_BASE_CFG => self.strtab_base_cfg,
                regs::CMDQ_BASE => self.cmdq_base as u32,
                0x94 => (self.cmdq_base >> 32) as u32,
                regs::CMDQ_PROD => self.cmdq_prod,
                regs::CMDQ_CONS => self.cmdq_cons,
                regs::EVENTQ_BASE => self.eventq_base as u32,
                0xa4 => (self.eventq_base >> 32) as u32,
                regs::EVENTQ_PROD | regs::EVENTQ_PROD_P0 => self.eventq_prod,
                regs::EVENTQ_CONS | regs::EVENTQ_CONS_P0 => self.eventq_cons,
                regs::EVENTQ_IRQ_CFG0 => self.eventq_irq_cfg0 as u32,
                0xb4 => (self.eventq_irq_cfg0 >> 32) as u32,
                regs::EVENTQ_IRQ_CFG1 => self.eventq_irq_cfg1,
                regs::EVENTQ_IRQ_CFG2 => self.eventq_irq_cfg2,
                _ => 0,
            }
        };
        let lo = u64::from(r32(offset));
        if size == 8 {
            lo | (u64::from(r32(offset + 4)) << 32)
        } else {
            lo
        }
    }

    /// MMIO write of `size` (4 or 8) bytes at `offset`.
    pub fn write(&mut self, mem: &dyn SmmuMemory, offset: u64, size: u32, value: u64) {
        if size == 8 {
            self.write32(mem, offset, value as u32);
            self.write32(mem, offset + 4, (value >> 32) as u32);
        } else {
            self.write32(mem, offset, value as u32);
        }
    }

    fn write32(&mut self, mem: &dyn SmmuMemory, offset: u64, v: u32) {
        tracing::trace!(offset, v, "smmuv3 write");
        match offset {
            regs::CR0 => {
                let was = self.cr0;
                self.cr0 = v & regs::CR0_IMPLEMENTED;
                if self.cr0 & regs::CR0_CMDQEN != 0 && was & regs::CR0_CMDQEN == 0 {
                    self.consume_commands(mem);
                }
            }
            regs::CR1 => self.cr1 = v,
            regs::CR2 => self.cr2 = v,
            regs::GBPA => {
                if v & regs::GBPA_UPDATE != 0 {
                    self.gbpa = v & !regs::GBPA_UPDATE;
                }
            }
            regs::IRQ_CTRL => self.irq_ctrl = v & regs::IRQ_CTRL_IMPLEMENTED,
            regs::GERRORN => {
                let was_active = self.cmdq_error_active();
                self.gerrorn = v & regs::GERROR_IMPLEMENTED;
                if was_active && !self.cmdq_error_active() {
                    self.consume_commands(mem);
                }
            }
            regs::GERROR_IRQ_CFG0 => set_lo(&mut self.gerror_irq_cfg0, v & !3),
            0x6c => set_hi(&mut self.gerror_irq_cfg0, v & 0xf_ffff),
            regs::GERROR_IRQ_CFG1 => self.gerror_irq_cfg1 = v,
            regs::GERROR_IRQ_CFG2 => self.gerror_irq_cfg2 = v,
            regs::STRTAB_BASE => set_lo(&mut self.strtab_base, v),
            0x84 => set_hi(&mut self.strtab_base, v),
            regs::STRTAB_BASE_CFG => self.strtab_base_cfg = v,
            regs::CMDQ_BASE => set_lo(&mut self.cmdq_base, v),
            0x94 => set_hi(&mut self.cmdq_base, v),
            regs::CMDQ_PROD => {
                self.cmdq_prod = v & QueueIndex::new(self.cmdq_log2()).mask();
                self.consume_commands(mem);
            }
            regs::CMDQ_CONS => {
                // Software may only set CONS while the queue is disabled.
                if self.cr0 & regs::CR0_CMDQEN == 0 {
                    self.cmdq_cons =
                        v & (QueueIndex::new(self.cmdq_log2()).mask() | regs::CMDQ_CONS_ERR_MASK);
                }
            }
            regs::EVENTQ_BASE => set_lo(&mut self.eventq_base, v),
            0xa4 => set_hi(&mut self.eventq_base, v),
            regs::EVENTQ_PROD | regs::EVENTQ_PROD_P0 => {
                if self.cr0 & regs::CR0_EVTQEN == 0 {
                    self.eventq_prod =
                        v & (QueueIndex::new(self.eventq_log2()).mask() | regs::EVENTQ_OVFLG);
                }
            }
            regs::EVENTQ_CONS | regs::EVENTQ_CONS_P0 => {
                self.eventq_cons =
                    v & (QueueIndex::new(self.eventq_log2()).mask() | regs::EVENTQ_OVFLG);
            }
            regs::EVENTQ_IRQ_CFG0 => set_lo(&mut self.eventq_irq_cfg0, v & !3),
            0xb4 => set_hi(&mut self.eventq_irq_cfg0, v & 0xf_ffff),
            regs::EVENTQ_IRQ_CFG1 => self.eventq_irq_cfg1 = v,
            regs::EVENTQ_IRQ_CFG2 => self.eventq_irq_cfg2 = v,
            _ => tracing::debug!(
                offset,
                v,
                "smmuv3: write to a read-only or unknown register"
            ),
        }
    }

    fn cmdq_log2(&self) -> u32 {
        regs::queue_log2(self.cmdq_base, regs::CMDQS)
    }
    fn eventq_log2(&self) -> u32 {
        regs::queue_log2(self.eventq_base, regs::EVENTQS)
    }
    fn cmdq_error_active(&self) -> bool {
        (self.gerror ^ self.gerrorn) & regs::GERROR_CMDQ_ERR != 0
    }

    /// Raise global error `bit` (if not already active) and its interrupt.
    fn global_error(&mut self, mem: &dyn SmmuMemory, bit: u32) {
        if (self.gerror ^ self.gerrorn) & bit != 0 {
            return;
        }
        self.gerror ^= bit;
        if self.irq_ctrl & regs::IRQ_CTRL_GERROR_EN != 0 {
            if self.gerror_irq_cfg0 != 0 {
                if mem
                    .write_msi(self.gerror_irq_cfg0, self.gerror_irq_cfg1)
                    .is_err()
                    && (self.gerror ^ self.gerrorn) & regs::GERROR_MSI_GERROR_ABT_ERR == 0
                {
                    self.gerror ^= regs::GERROR_MSI_GERROR_ABT_ERR;
                }
            } else {
                mem.raise(WiredIrq::GlobalError);
            }
        }
    }

    /// Consume commands from CONS to PROD while the queue is enabled and no command
    /// error is pending.
    fn consume_commands(&mut self, mem: &dyn SmmuMemory) {
        if self.cr0 & regs::CR0_CMDQEN == 0 || self.cmdq_error_active() {
            return;
        }
        let q = QueueIndex::new(self.cmdq_log2());
        let base = self.cmdq_base & regs::Q_BASE_ADDR_MASK;
        // Bounded by the queue size: PROD never runs more than one lap ahead.
        while !q.empty(self.cmdq_prod, self.cmdq_cons) {
            let addr = base + u64::from(q.idx(self.cmdq_cons)) * 16;
            let raw = match memory::read_words::<2>(mem, addr) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(%e, "smmuv3: command fetch abort");
                    self.command_error(mem, regs::CERROR_ABT);
                    return;
                }
            };
            match Command::decode(&raw) {
                Ok(cmd) => {
                    self.stats.commands += 1;
                    if let Err(err) = self.execute(mem, cmd) {
                        self.command_error(mem, err);
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(%e, "smmuv3: illegal command");
                    self.command_error(mem, regs::CERROR_ILL);
                    return;
                }
            }
            // CONS.ERR keeps the last error code (it is meaningful only while
            // GERROR.CMDQ_ERR is active; QEMU keeps it too).
            self.cmdq_cons =
                (self.cmdq_cons & regs::CMDQ_CONS_ERR_MASK) | q.inc(self.cmdq_cons) & q.mask();
        }
    }

    fn command_error(&mut self, mem: &dyn SmmuMemory, err: u32) {
        self.cmdq_cons =
            (self.cmdq_cons & !regs::CMDQ_CONS_ERR_MASK) | (err << regs::CMDQ_CONS_ERR_SHIFT);
        self.global_error(mem, regs::GERROR_CMDQ_ERR);
    }

    /// Execute one command; an error is a CERROR code.
    fn execute(&mut self, mem: &dyn SmmuMemory, cmd: Command) -> Result<(), u32> {
        tracing::trace!(?cmd, "smmuv3 command");
        if matches!(cmd, Command::Sync(_)) {
            self.stats.syncs += 1;
        }
        match cmd {
            Command::Prefetch => {}
            Command::CfgiSte { sid } => {
                self.streams.remove(&sid);
                self.cds.retain(|k, _| k.0 != sid);
            }
            Command::CfgiSteRange { sid, range } => {
                if range >= 31 {
                    self.streams.clear();
                    self.cds.clear();
                } else {
                    let mask = (1u64 << (range + 1)) - 1;
                    let start = u64::from(sid) & !mask;
                    let inside = |s: u32| (u64::from(s) & !mask) == start;
                    self.streams.retain(|s, _| !inside(*s));
                    self.cds.retain(|k, _| !inside(k.0));
                }
            }
            Command::CfgiCd { sid, ssid } => {
                self.cds.remove(&(sid, ssid));
            }
            Command::CfgiCdAll { sid } => self.cds.retain(|k, _| k.0 != sid),
            Command::CfgiAll => {
                self.streams.clear();
                self.cds.clear();
            }
            Command::TlbiNhAll { vmid } => self.iotlb.invalidate_nh_all(vmid),
            Command::TlbiNhAsid { vmid, asid } => self.iotlb.invalidate_asid(vmid, asid),
            Command::TlbiNhVa { vmid, asid, addr } => {
                self.iotlb.invalidate_va(vmid, Some(asid), addr)
            }
            Command::TlbiNhVaa { vmid, addr } => self.iotlb.invalidate_va(vmid, None, addr),
            Command::TlbiS12Vmall { vmid } => self.iotlb.invalidate_vmid(vmid),
            Command::TlbiS2Ipa { vmid, ipa } => self.iotlb.invalidate_ipa(vmid, ipa),
            Command::TlbiNsnhAll => self.iotlb.invalidate_all(),
            Command::Sync(SyncSignal::Irq { addr, data }) => {
                if addr != 0 {
                    if mem.write_msi(addr, data).is_err() {
                        self.global_error(mem, regs::GERROR_MSI_CMDQ_ABT_ERR);
                    }
                } else {
                    mem.raise(WiredIrq::CmdSync);
                }
            }
            Command::Sync(_) => {}
        }
        Ok(())
    }

    /// Record `ev` in the event queue (if enabled) and signal it.
    fn record(&mut self, mem: &dyn SmmuMemory, ev: &Event) -> bool {
        if self.cr0 & regs::CR0_EVTQEN == 0 {
            self.stats.events_lost += 1;
            return false;
        }
        let base = self.eventq_base & regs::Q_BASE_ADDR_MASK;
        let (prod, r) = evtq::push(
            mem,
            base,
            self.eventq_log2(),
            self.eventq_prod,
            self.eventq_cons,
            ev,
        );
        self.eventq_prod = prod;
        match r {
            Push::Written => {
                self.stats.events += 1;
                if self.irq_ctrl & regs::IRQ_CTRL_EVTQ_EN != 0 {
                    if self.eventq_irq_cfg0 != 0 {
                        if mem
                            .write_msi(self.eventq_irq_cfg0, self.eventq_irq_cfg1)
                            .is_err()
                        {
                            self.global_error(mem, regs::GERROR_MSI_EVTQ_ABT_ERR);
                        }
                    } else {
                        mem.raise(WiredIrq::EventQueue);
                    }
                }
                true
            }
            Push::Overflow => {
                self.stats.events_lost += 1;
                false
            }
            Push::Abort(e) => {
                tracing::warn!(%e, "smmuv3: event queue write abort");
                self.stats.events_lost += 1;
                self.global_error(mem, regs::GERROR_EVTQ_ABT_ERR);
                false
            }
        }
    }

    /// Record `ev` in the event queue as if this SMMU had found it (the queue's
    /// enable and overflow rules apply, and its interrupt is signalled): for a VMM
    /// whose device walks stage 1 itself and reports its faults (nested mode).
    /// Returns whether the record was written.
    pub fn inject_event(&mut self, mem: &dyn SmmuMemory, ev: &Event) -> bool {
        self.record(mem, ev)
    }

    /// Stop the command queue at CMDQ_CONS with command error `cerror` (a
    /// `regs::CERROR_*` code), as if the command there had failed: for a VMM whose
    /// device refused that command when it was forwarded (nested mode).
    pub fn raise_command_error(&mut self, mem: &dyn SmmuMemory, cerror: u32) {
        self.command_error(mem, cerror);
    }

    /// Translate one transaction, recording its fault event.
    pub fn translate(
        &mut self,
        mem: &dyn SmmuMemory,
        t: Transaction,
    ) -> Result<Translation, TranslateError> {
        match self.resolve(mem, t, true) {
            Ok(Some(tr)) => Ok(tr),
            Ok(None) => Err(TranslateError::Aborted),
            Err(p) => {
                let recorded = p.record && self.record(mem, &p.event);
                tracing::debug!(event = ?p.event, recorded, "smmuv3 fault");
                Err(TranslateError::Fault {
                    event: p.event,
                    recorded,
                })
            }
        }
    }

    /// The same walk as [`Smmu::translate`] without side effects: no event, no
    /// IOTLB fill, no configuration cached (it reads the tables as they are now).
    pub fn probe(
        &self,
        mem: &dyn SmmuMemory,
        t: Transaction,
    ) -> Result<Translation, TranslateError> {
        let mut scratch = Smmu {
            cr0: self.cr0,
            gbpa: self.gbpa,
            strtab_base: self.strtab_base,
            strtab_base_cfg: self.strtab_base_cfg,
            ..Smmu::default()
        };
        match scratch.resolve(mem, t, false) {
            Ok(Some(tr)) => Ok(tr),
            Ok(None) => Err(TranslateError::Aborted),
            Err(p) => Err(TranslateError::Fault {
                event: p.event,
                recorded: false,
            }),
        }
    }

    /// Everything stream `sid` (without substream) can reach through the tables as
    /// they are in memory now: stage 1 composed with stage 2, split where either
    /// stage's leaves end, at most `limit` extents. A configuration that would
    /// fault every transaction gives an empty list. No side effects.
    pub fn stream_view(
        &self,
        mem: &dyn SmmuMemory,
        sid: u32,
        limit: usize,
    ) -> Result<StreamView, walk::EnumerateError> {
        if !self.enabled() {
            return Ok(if self.gbpa & regs::GBPA_ABORT == 0 {
                StreamView::Bypass
            } else {
                StreamView::Mapped(Vec::new())
            });
        }
        let none = Ok(StreamView::Mapped(Vec::new()));
        let st = StreamTable {
            base: self.strtab_base,
            cfg: self.strtab_base_cfg,
        };
        let (s1, s2, _) = match st.fetch(mem, sid) {
            Ok(Ste::Bypass) => return Ok(StreamView::Bypass),
            Ok(Ste::Translate { s1, s2, vmid }) => (s1, s2, vmid),
            Ok(Ste::Abort) | Err(_) => return none,
        };
        let s2_read = |ipa: u64| -> Option<(u64, walk::Leaf)> {
            match s2 {
                None => Some((
                    ipa,
                    walk::Leaf {
                        output: ipa,
                        size_bits: 64,
                        perm: Perm::RW,
                    },
                )),
                Some(c) => {
                    match walk::walk::<Infallible>(&c.walk, ipa, |a| {
                        Ok(memory::read_u64(mem, a).ok())
                    }) {
                        Ok(Ok(l)) => Some((l.output, l)),
                        _ => None,
                    }
                }
            }
        };
        let s1_extents = match s1 {
            None => None,
            Some(s1c) => {
                let t = Transaction {
                    sid,
                    ssid: None,
                    addr: 0,
                    write: false,
                };
                let ssid = match (s1c.cd_max, s1c.dss) {
                    (0, _) | (_, S1Dss::Substream0) => Some(0),
                    (_, S1Dss::Bypass) => None,
                    (_, S1Dss::Terminate) => return none,
                };
                match ssid {
                    None => None,
                    Some(ssid) => {
                        let mut scratch = Smmu::default();
                        let Ok(cd) = scratch.context(mem, &t, s1c, s2.as_ref(), ssid, false) else {
                            return none;
                        };
                        let Some(w) = cd.walk else { return none };
                        let mut fetch = |ipa: u64| {
                            let (pa, l) = s2_read(ipa)?;
                            if !l.perm.read {
                                return None;
                            }
                            memory::read_u64(mem, pa).ok()
                        };
                        Some(walk::enumerate(&w, &mut fetch, limit)?)
                    }
                }
            }
        };
        let Some(c2) = s2 else {
            return Ok(StreamView::Mapped(s1_extents.unwrap_or_default()));
        };
        // Compose with stage 2: split each stage-1 extent (or, stage 2 only, the
        // stage-2 leaves themselves) where the stage-2 leaves end.
        let inputs = match s1_extents {
            Some(e) => e,
            None => walk::enumerate(&c2.walk, &mut |a| memory::read_u64(mem, a).ok(), limit)?
                .into_iter()
                .map(|e| walk::Extent {
                    output: e.input,
                    perm: Perm::RW,
                    ..e
                })
                .collect(),
        };
        let mut out = Vec::new();
        for e in inputs {
            let size = 1u64 << e.size_bits;
            let mut off = 0u64;
            while off < size {
                let ipa = e.output + off;
                let Some((pa, l)) = s2_read(ipa) else {
                    off += 1 << c2.walk.granule.bits();
                    continue;
                };
                // The largest naturally aligned block inside both leaves.
                let step_bits = l.size_bits.min(e.size_bits).min(ipa.trailing_zeros());
                let step = 1u64 << step_bits;
                let perm = e.perm.and(l.perm);
                if perm.read || perm.write {
                    if out.len() >= limit {
                        return Err(walk::EnumerateError::TooMany(limit));
                    }
                    out.push(walk::Extent {
                        input: e.input + off,
                        output: pa,
                        size_bits: step_bits,
                        perm,
                    });
                }
                off += step;
            }
        }
        Ok(StreamView::Mapped(out))
    }

    fn stream(&mut self, mem: &dyn SmmuMemory, sid: u32, cache: bool) -> Result<Ste, SteError> {
        if let Some(s) = self.streams.get(&sid) {
            return Ok(s.ste);
        }
        let st = StreamTable {
            base: self.strtab_base,
            cfg: self.strtab_base_cfg,
        };
        let ste = st.fetch(mem, sid)?;
        if cache {
            self.streams.insert(sid, StreamState { ste });
        }
        Ok(ste)
    }

    /// `Ok(None)`: aborted without event.
    fn resolve(
        &mut self,
        mem: &dyn SmmuMemory,
        t: Transaction,
        cache: bool,
    ) -> Result<Option<Translation>, Pending> {
        let identity = Translation {
            addr: t.addr,
            size_bits: 12,
            perm: Perm::RW,
        };
        if !self.enabled() {
            return Ok((self.gbpa & regs::GBPA_ABORT == 0).then_some(identity));
        }
        let cfg_event = |code| Pending {
            event: Event::config(code, t.sid, t.ssid),
            record: true,
        };
        let ste = match self.stream(mem, t.sid, cache) {
            Ok(s) => s,
            Err(SteError::BadStreamId(_)) => return Err(cfg_event(code::C_BAD_STREAMID)),
            Err(SteError::Fetch { addr }) => {
                let mut p = cfg_event(code::F_STE_FETCH);
                p.event.addr2 = addr;
                return Err(p);
            }
            Err(SteError::Bad(_) | SteError::BadS2(_)) => return Err(cfg_event(code::C_BAD_STE)),
        };
        let (s1, s2, vmid) = match ste {
            Ste::Abort => return Ok(None),
            Ste::Bypass => return Ok(Some(identity)),
            Ste::Translate { s1, s2, vmid } => (s1, s2, vmid),
        };
        // Which CD, if any.
        let cd = match s1 {
            None => {
                if t.ssid.is_some() {
                    return Err(cfg_event(code::C_BAD_SUBSTREAMID));
                }
                None
            }
            Some(s1) => {
                let ssid = match t.ssid {
                    None if s1.cd_max == 0 => Some(0),
                    None => match s1.dss {
                        S1Dss::Terminate => return Err(cfg_event(code::F_STREAM_DISABLED)),
                        S1Dss::Bypass => None,
                        S1Dss::Substream0 => Some(0),
                    },
                    Some(ssid) if s1.cd_max == 0 || u64::from(ssid) >> s1.cd_max != 0 => {
                        return Err(cfg_event(code::C_BAD_SUBSTREAMID))
                    }
                    Some(ssid) => Some(ssid),
                };
                match ssid {
                    None => None,
                    Some(ssid) => Some(self.context(mem, &t, s1, s2.as_ref(), ssid, cache)?),
                }
            }
        };
        let asid = cd.map(|c| c.asid);
        if let Some(e) = self.iotlb.lookup(vmid, asid, t.addr) {
            let tr = Translation {
                addr: e.out_base + (t.addr - e.in_base),
                size_bits: e.size_bits,
                perm: e.perm,
            };
            if tr.perm.allows(t.write) {
                return Ok(Some(tr));
            }
            // A cached leaf without the permission: report as the walk would.
            // Fall through to a full walk to find the faulting stage.
        }
        // Stage 1.
        let (ipa, s1_leaf) = match cd {
            None => (t.addr, None),
            Some(cd) => {
                let Some(w) = cd.walk else {
                    return Err(self.fault(&t, FaultKind::Translation, Stage::S1, cd.record, 0));
                };
                let leaf = self.walk_s1(mem, &t, &w, s2.as_ref(), cd.record)?;
                if !leaf.perm.allows(t.write) {
                    return Err(self.fault(&t, FaultKind::Permission, Stage::S1, cd.record, 0));
                }
                (leaf.output, Some(leaf))
            }
        };
        // Stage 2 of the final IPA.
        let (out, perm, size_bits, s2_size) = match s2 {
            None => {
                let l = s1_leaf.unwrap_or(walk::Leaf {
                    output: ipa,
                    size_bits: 12,
                    perm: Perm::RW,
                });
                (l.output, l.perm, l.size_bits, 0)
            }
            Some(s2c) => {
                let leaf = match walk::walk::<Infallible>(&s2c.walk, ipa, |a| {
                    Ok(memory::read_u64(mem, a).ok())
                }) {
                    Ok(Ok(l)) => l,
                    Ok(Err(f)) => {
                        return Err(self.s2_fault(&t, f, FaultClass::In, ipa, s2c.record))
                    }
                    Err(never) => match never {},
                };
                if !leaf.perm.allows(t.write) {
                    let f = WalkFault {
                        kind: FaultKind::Permission,
                        level: 3,
                        fetch_addr: 0,
                    };
                    return Err(self.s2_fault(&t, f, FaultClass::In, ipa, s2c.record));
                }
                let (perm, size) = match s1_leaf {
                    Some(l) => (l.perm.and(leaf.perm), l.size_bits.min(leaf.size_bits)),
                    None => (leaf.perm, leaf.size_bits),
                };
                (leaf.output, perm, size, leaf.size_bits)
            }
        };
        let tr = Translation {
            addr: out,
            size_bits,
            perm,
        };
        if cache {
            let in_base = t.addr & !((1u64 << size_bits) - 1);
            self.iotlb.insert(
                vmid,
                asid,
                t.addr,
                iotlb::Entry {
                    in_base,
                    size_bits,
                    out_base: out - (t.addr - in_base),
                    perm,
                    ipa_base: s2.map(|_| ipa & !((1u64 << s2_size) - 1)),
                    ipa_size_bits: s2_size,
                },
            );
        }
        Ok(Some(tr))
    }

    /// Fetch (or take from the cache) CD `ssid`; the CD table is an IPA when stage
    /// 2 is enabled.
    fn context(
        &mut self,
        mem: &dyn SmmuMemory,
        t: &Transaction,
        s1: ste::S1Config,
        s2: Option<&ste::S2Config>,
        ssid: u32,
        cache: bool,
    ) -> Result<Cd, Pending> {
        if let Some(cd) = self.cds.get(&(t.sid, ssid)) {
            return Ok(*cd);
        }
        let ev_ssid = t.ssid;
        let cfg_event = |code| Pending {
            event: Event::config(code, t.sid, ev_ssid),
            record: true,
        };
        let fetch_abort = |addr: u64| {
            let mut p = cfg_event(code::F_CD_FETCH);
            p.event.addr2 = addr;
            p
        };
        // IPA → PA of a CD-table access through stage 2 (a stage-2 fault: CLASS CD).
        let to_pa = |this: &mut Self, ipa: u64| -> Result<u64, Pending> {
            let Some(s2c) = s2 else { return Ok(ipa) };
            match walk::walk::<Infallible>(&s2c.walk, ipa, |a| Ok(memory::read_u64(mem, a).ok())) {
                Ok(Ok(l)) if l.perm.read => Ok(l.output),
                Ok(Ok(_)) => {
                    let f = WalkFault {
                        kind: FaultKind::Permission,
                        level: 3,
                        fetch_addr: 0,
                    };
                    Err(this.s2_fault(t, f, FaultClass::Cd, ipa, s2c.record))
                }
                Ok(Err(f)) => Err(this.s2_fault(t, f, FaultClass::Cd, ipa, s2c.record)),
                Err(never) => match never {},
            }
        };
        let cd_addr = match cd::locate(s1.cd_ptr, s1.fmt, ssid) {
            CdLocation::Direct(a) => a,
            CdLocation::Indirect { l1, offset } => {
                let pa = to_pa(self, l1)?;
                let desc = memory::read_u64(mem, pa).map_err(|_| fetch_abort(pa))?;
                match cd::l1_target(desc) {
                    Some(l2) => l2 + offset,
                    None => return Err(cfg_event(code::C_BAD_SUBSTREAMID)),
                }
            }
        };
        let pa = to_pa(self, cd_addr)?;
        let d: [u64; 2] = memory::read_words(mem, pa).map_err(|_| fetch_abort(pa))?;
        let cd = Cd::decode(&d).map_err(|e: CdError| {
            tracing::debug!(%e, sid = t.sid, ssid, "smmuv3: bad CD");
            cfg_event(code::C_BAD_CD)
        })?;
        if cache {
            self.cds.insert((t.sid, ssid), cd);
        }
        Ok(cd)
    }

    /// The stage-1 walk, each descriptor fetched through stage 2 when nested.
    fn walk_s1(
        &mut self,
        mem: &dyn SmmuMemory,
        t: &Transaction,
        w: &WalkConfig,
        s2: Option<&ste::S2Config>,
        record: bool,
    ) -> Result<walk::Leaf, Pending> {
        let r = walk::walk::<Pending>(w, t.addr, |desc_ipa| {
            let pa = match s2 {
                None => desc_ipa,
                Some(s2c) => {
                    match walk::walk::<Infallible>(&s2c.walk, desc_ipa, |a| {
                        Ok(memory::read_u64(mem, a).ok())
                    }) {
                        Ok(Ok(l)) if l.perm.read => l.output,
                        Ok(Ok(_)) => {
                            let f = WalkFault {
                                kind: FaultKind::Permission,
                                level: 3,
                                fetch_addr: 0,
                            };
                            return Err(self.s2_fault(t, f, FaultClass::Ttd, desc_ipa, s2c.record));
                        }
                        Ok(Err(f)) => {
                            return Err(self.s2_fault(t, f, FaultClass::Ttd, desc_ipa, s2c.record))
                        }
                        Err(never) => match never {},
                    }
                }
            };
            Ok(memory::read_u64(mem, pa).ok())
        });
        match r {
            Err(p) => Err(p),
            Ok(Ok(leaf)) => Ok(leaf),
            Ok(Err(f)) if f.kind == FaultKind::WalkAbort => Err(Pending {
                event: Event {
                    code: code::F_WALK_EABT,
                    sid: t.sid,
                    ssid: t.ssid,
                    read: !t.write,
                    s2: false,
                    class: FaultClass::Ttd,
                    input_addr: t.addr,
                    addr2: f.fetch_addr,
                },
                record: true,
            }),
            Ok(Err(f)) => Err(self.fault(t, f.kind, Stage::S1, record, 0)),
        }
    }

    fn fault(
        &self,
        t: &Transaction,
        kind: FaultKind,
        stage: Stage,
        record: bool,
        ipa: u64,
    ) -> Pending {
        let code = match kind {
            FaultKind::Translation => code::F_TRANSLATION,
            FaultKind::AddrSize => code::F_ADDR_SIZE,
            FaultKind::Access => code::F_ACCESS,
            FaultKind::Permission => code::F_PERMISSION,
            FaultKind::WalkAbort => code::F_WALK_EABT,
        };
        Pending {
            event: Event {
                code,
                sid: t.sid,
                ssid: t.ssid,
                read: !t.write,
                s2: stage == Stage::S2,
                class: FaultClass::In,
                input_addr: t.addr,
                addr2: ipa,
            },
            record,
        }
    }

    fn s2_fault(
        &self,
        t: &Transaction,
        f: WalkFault,
        class: FaultClass,
        ipa: u64,
        record: bool,
    ) -> Pending {
        if f.kind == FaultKind::WalkAbort {
            return Pending {
                event: Event {
                    code: code::F_WALK_EABT,
                    sid: t.sid,
                    ssid: t.ssid,
                    read: !t.write,
                    s2: true,
                    class,
                    input_addr: t.addr,
                    addr2: f.fetch_addr,
                },
                record: true,
            };
        }
        let mut p = self.fault(t, f.kind, Stage::S2, record, ipa);
        p.event.class = class;
        p
    }
}

#[cfg(test)]
mod tests;
