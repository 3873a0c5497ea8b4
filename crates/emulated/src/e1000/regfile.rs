//! The register file and interrupt logic of the 82540EM, behind one lock.
//!
//! [`Core`] holds every piece of device state: the 32K-entry register array (BAR0 seen
//! as 32-bit registers; registers without special behaviour read back what was
//! written, limited to the bits the manual's register tables define — reserved bits
//! read 0, see `write_mask` — and start from the tables' initial values at reset,
//! e.g. VET 8100h, LEDCTL 07068302h, PBA 00100030h), the 64-bit statistics counters, EEPROM and PHY, the transmit assembly
//! state, the queue-halt flags, the pending receive queue, the PCI configuration
//! space and the interrupt throttle. Register accesses are done on whole 32-bit
//! registers: the device splits narrower accesses (see `mod.rs`).
//!
//! Interrupts (datasheet semantics, where QEMU departs the datasheet wins):
//! - a cause sets its bit in ICR; the interrupt line is asserted while `ICR & IMS != 0`;
//! - ICR reads return the causes and clear them; writes of 1 clear;
//!   ICS sets causes; ICS and IMC are write-only (read 0);
//! - delivery goes through the PCI helper [`PciIntr`]: the mode is MSI(-X) when the
//!   VMM wired message eventfds, else INTx;
//! - INTx is a level: it is raised when the line asserts and lowered when it
//!   deasserts; VFIO automasks the eventfd, and an unmask while the level is high
//!   signals again (done by `PciIntr::set_irqs`);
//! - MSI is an edge: one message per new enabled cause, only with bus mastering;
//! - ITR: with a non-zero interval, no two interrupts are sent less than ITR * 256 ns
//!   apart; an interrupt due earlier is deferred to the RX worker thread, which fires it
//!   at the deadline if the line is still asserted;
//! - the interrupt delay timers (TIDV/TADV for TXDW, RDTR/RADV for RXT0; see
//!   `delay.rs`) hold a cause back: its ICR bit is set only when a timer expires
//!   (the manual: TIDV is the time between the write-back and "when the IMS.TXDW
//!   interrupt bit is set"), so an ICR read before shows nothing. The same RX worker
//!   fires them ([`Core::delay_due`]); ITR then throttles the resulting interrupt like
//!   any other. Writing TIDV or RDTR with FPD (bit 31, self-clearing) delivers a pending
//!   delayed cause at once;
//! - nothing is signalled while the migration state machine is not running; the line is
//!   re-evaluated when it runs again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nestio_device_model::migration::{MigrationData, MigrationFsm};
use std::sync::Arc;

use nestio_device_model::pci::{IntrMode, PciFunction};

use super::delay::{ticks, DelayTimer};
use super::eeprom::{Eeprom, Microwire};
use super::phy::{Phy, PHY_ADDR};
use super::regs::*;
use super::tx::TxState;
use super::MAX_MIG_STREAM;

/// Bits of `Core::warned`: each problem is logged once until reset.
pub(crate) mod warn {
    pub const TX_DMA: u32 = 1 << 0;
    pub const RX_DMA: u32 = 1 << 1;
    pub const TX_RING: u32 = 1 << 2;
    pub const RX_RING: u32 = 1 << 3;
    pub const TX_OVERSIZE: u32 = 1 << 4;
    pub const TX_TSO: u32 = 1 << 5;
    pub const RX_BSIZE: u32 = 1 << 6;
    pub const RX_BME: u32 = 1 << 7;
    pub const TX_BME: u32 = 1 << 8;
}

/// Maximum number of received frames held while the device is stopped (migration).
pub const PENDING_MAX: usize = 64;

/// Index of the 64-bit counters in `Core::stats64`.
pub(crate) const S64_GORC: usize = 0;
pub(crate) const S64_GOTC: usize = 1;
pub(crate) const S64_TOR: usize = 2;
pub(crate) const S64_TOT: usize = 3;

/// All device state. See the module documentation.
pub(crate) struct Core {
    pub regs: Vec<u32>,
    pub stats64: [u64; 4],
    pub eeprom: Eeprom,
    pub mw: Microwire,
    pub phy: Phy,
    pub tx: TxState,
    pub tx_halted: bool,
    pub rx_halted: bool,
    /// Frames received while stopped, delivered when running again.
    pub pending: VecDeque<Vec<u8>>,
    /// Reused by the receiver to assemble a buffer chunk that spans the end of a frame
    /// and the padding / FCS (not device state: never migrated or reset).
    pub rx_scratch: Vec<u8>,
    /// The PCI function: configuration space (behind its own lock, taken after this
    /// one) and interrupts.
    pub pci: Arc<PciFunction>,
    pub fsm: MigrationFsm,
    /// Earliest time the next interrupt may be sent (ITR).
    pub next_irq: Option<Instant>,
    /// A throttled interrupt is due at this time.
    pub deferred_irq: Option<Instant>,
    /// TXDW held back by TIDV / TADV.
    pub tx_delay: DelayTimer,
    /// RXT0 held back by RDTR / RADV.
    pub rx_delay: DelayTimer,
    /// Problems already logged.
    pub warned: u32,
    /// Frames transmitted by the last register write, sent after the lock is dropped.
    pub out_frames: Vec<Vec<u8>>,
    /// The RX worker must re-evaluate (new buffers, deferred interrupt, resumed).
    pub wake_worker: bool,
    /// The migration data stream (STOP_COPY output, RESUMING input).
    pub mig: MigrationData,
    /// IOADDR of the I/O window.
    pub io_addr: u32,
}

impl Core {
    pub fn new(mac: [u8; 6], pci: Arc<PciFunction>, fsm: MigrationFsm) -> Self {
        let mut c = Core {
            regs: vec![0; NUM_REGS],
            stats64: [0; 4],
            eeprom: Eeprom::new(mac),
            mw: Microwire::default(),
            phy: Phy::default(),
            tx: TxState::default(),
            tx_halted: false,
            rx_halted: false,
            pending: VecDeque::new(),
            rx_scratch: Vec::new(),
            pci,
            fsm,
            next_irq: None,
            deferred_irq: None,
            tx_delay: DelayTimer::default(),
            rx_delay: DelayTimer::default(),
            warned: 0,
            out_frames: Vec::new(),
            wake_worker: false,
            mig: MigrationData::new("e1000", MAX_MIG_STREAM),
            io_addr: 0,
        };
        c.reset_regs();
        c
    }

    pub fn reg(&self, off: u32) -> u32 {
        self.regs.get((off / 4) as usize).copied().unwrap_or(0)
    }

    pub fn set_reg(&mut self, off: u32, v: u32) {
        if let Some(r) = self.regs.get_mut((off / 4) as usize) {
            *r = v;
        }
    }

    /// Log `msg` at warn level the first time `bit` is seen (until reset).
    pub fn warn_once(&mut self, bit: u32, msg: std::fmt::Arguments<'_>) {
        if self.warned & bit == 0 {
            self.warned |= bit;
            tracing::warn!("e1000: {msg}");
        }
    }

    /// The software reset (CTRL.RST): registers to their defaults, queues stopped,
    /// in-flight frames dropped. PCI configuration space and EEPROM are kept.
    pub fn reset_regs(&mut self) {
        self.regs.iter_mut().for_each(|r| *r = 0);
        self.stats64 = [0; 4];
        self.mw = Microwire::default();
        self.phy = Phy::default();
        self.tx = TxState::default();
        self.tx_halted = false;
        self.rx_halted = false;
        self.pending.clear();
        self.next_irq = None;
        self.deferred_irq = None;
        self.tx_delay.clear();
        self.rx_delay.clear();
        self.warned = 0;
        // SLU starts clear: the driver sets it, which raises LSC (link up). STATUS
        // reports link up regardless (the PHY always has link).
        self.set_reg(CTRL, CTRL_FD | CTRL_SPEED_1000);
        // Initial values of the manual's register tables (chapter 13): VLAN EtherType,
        // the LED defaults (LED0 link up, LED1 blinking activity, LED2 link 100,
        // LED3 link 1000), the packet buffer split (48 KB receive, 16 KB transmit).
        self.set_reg(VET, VET_DEFAULT);
        self.set_reg(LEDCTL, LEDCTL_DEFAULT);
        self.write_pba(PBA_RXA_DEFAULT);
        // The receive address 0 is loaded from the EEPROM at reset.
        let mac = self.eeprom.mac();
        self.set_reg(RA, u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]));
        self.set_reg(
            RA + 4,
            u32::from(u16::from_le_bytes([mac[4], mac[5]])) | (1 << 31),
        );
    }

    // ---- statistics -------------------------------------------------------------------

    pub fn stat_inc(&mut self, off: u32) {
        let v = self.reg(off).saturating_add(1);
        self.set_reg(off, v);
    }

    pub fn stat_add64(&mut self, idx: usize, n: u64) {
        self.stats64[idx] = self.stats64[idx].saturating_add(n);
    }

    fn stat_read(&mut self, off: u32) -> u32 {
        for (i, (lo, hi)) in STATS64.iter().enumerate() {
            if off == *lo {
                return self.stats64[i] as u32;
            }
            if off == *hi {
                let v = (self.stats64[i] >> 32) as u32;
                self.stats64[i] = 0;
                return v;
            }
        }
        let v = self.reg(off);
        self.set_reg(off, 0);
        v
    }

    // ---- register access ---------------------------------------------------------------

    /// Value of a register without side effects (for merging narrow writes).
    pub fn peek(&self, off: u32) -> u32 {
        match off {
            EECD => self.eecd_value(),
            STATUS => STATUS_FD | STATUS_LU | STATUS_SPEED_1000,
            ICS | IMC => 0,
            _ if is_stat(off) => 0,
            _ => self.reg(off),
        }
    }

    fn eecd_value(&self) -> u32 {
        let stored = self.reg(EECD);
        let mut v = stored & (EECD_SK | EECD_CS | EECD_DI | EECD_FWE_MASK | EECD_REQ);
        v |= EECD_PRES;
        if stored & EECD_REQ != 0 {
            v |= EECD_GNT;
        }
        if self.mw.dout(&self.eeprom) {
            v |= EECD_DO;
        }
        v
    }

    /// A 32-bit register read by the driver (with side effects: ICR and statistics
    /// clear on read).
    pub fn read(&mut self, off: u32, irqs: &PciFunction) -> u32 {
        match off {
            ICR => {
                // (No INT_ASSERTED bit: bits 31:17 are reserved on the 82540EM.)
                let v = self.reg(ICR);
                self.set_reg(ICR, 0);
                self.update_irq(irqs, false);
                v
            }
            _ if is_stat(off) => self.stat_read(off),
            _ => self.peek(off),
        }
    }

    /// A 32-bit register write by the driver.
    pub fn write(&mut self, off: u32, v: u32, irqs: &PciFunction, dma: &dyn nestio_dma::DmaSpace) {
        match off {
            CTRL => {
                if v & CTRL_RST != 0 {
                    tracing::debug!("e1000: software reset (CTRL.RST)");
                    self.reset_regs();
                    self.update_irq(irqs, false);
                    return;
                }
                let old = self.reg(CTRL);
                self.set_reg(CTRL, v & !(CTRL_RST | CTRL_PHY_RST));
                if v & CTRL_SLU != 0 && old & CTRL_SLU == 0 {
                    self.raise(ICR_LSC, irqs);
                }
            }
            STATUS => {}
            EECD => {
                let keep = EECD_SK | EECD_CS | EECD_DI | EECD_FWE_MASK | EECD_REQ;
                self.set_reg(EECD, v & keep);
                let eeprom = self.eeprom.clone();
                self.mw.clock(
                    &eeprom,
                    v & EECD_CS != 0,
                    v & EECD_SK != 0,
                    v & EECD_DI != 0,
                );
            }
            EERD => {
                if v & EERD_START != 0 {
                    let addr = (v >> EERD_ADDR_SHIFT) & 0xFF;
                    let data = u32::from(self.eeprom.word(addr as usize));
                    self.set_reg(
                        EERD,
                        EERD_DONE | (addr << EERD_ADDR_SHIFT) | (data << EERD_DATA_SHIFT),
                    );
                } else {
                    self.set_reg(EERD, v & !(EERD_DONE | (0xFFFF << EERD_DATA_SHIFT)));
                }
            }
            MDIC => self.mdic(v, irqs),
            ICR => {
                let icr = self.reg(ICR) & !v;
                self.set_reg(ICR, icr);
                self.update_irq(irqs, false);
            }
            ICS => self.raise(v & ICR_VALID, irqs),
            IMS => {
                let ims = self.reg(IMS) | (v & ICR_VALID);
                self.set_reg(IMS, ims);
                let newly = self.reg(ICR) & v != 0;
                self.update_irq(irqs, newly);
            }
            IMC => {
                let ims = self.reg(IMS) & !v;
                self.set_reg(IMS, ims);
                self.update_irq(irqs, false);
            }
            ITR => self.set_reg(ITR, v & 0xFFFF),
            TIDV | RDTR => {
                log_delay_write(off, v);
                self.set_reg(off, v & DELAY_MASK);
                if v & DELAY_FPD != 0 {
                    self.flush_delay(off == TIDV, irqs);
                }
            }
            TADV | RADV => {
                log_delay_write(off, v);
                self.set_reg(off, v & DELAY_MASK);
            }
            RCTL => {
                let old = self.reg(RCTL);
                self.set_reg(RCTL, v);
                if v & RCTL_EN != 0 && old & RCTL_EN == 0 {
                    self.rx_halted = false;
                    self.warned &= !(warn::RX_DMA | warn::RX_RING);
                }
                self.wake_worker = true;
            }
            TCTL => {
                let old = self.reg(TCTL);
                self.set_reg(TCTL, v);
                if v & TCTL_EN != 0 && old & TCTL_EN == 0 {
                    self.tx_halted = false;
                    self.warned &= !(warn::TX_DMA | warn::TX_RING);
                }
                self.process_tx(irqs, dma);
            }
            PBA => self.write_pba(v),
            RDBAL | TDBAL => self.set_reg(off, v & RING_BASE_LOW_MASK),
            RDLEN | TDLEN => self.set_reg(off, v & RING_LEN_MASK),
            RDH | TDH => self.set_reg(off, v & RING_PTR_MASK),
            RDT => {
                self.set_reg(RDT, v & RING_PTR_MASK);
                self.wake_worker = true;
            }
            TDT => {
                self.set_reg(TDT, v & RING_PTR_MASK);
                self.process_tx(irqs, dma);
            }
            _ if is_stat(off) => {}
            _ => self.set_reg(off, v & write_mask(off)),
        }
    }

    /// PBA: the receive allocation (bits 6:0, KB) is written; the transmit allocation
    /// (bits 31:16) is what remains of the 64 KB packet buffer (read-only).
    fn write_pba(&mut self, v: u32) {
        let rxa = v & PBA_RXA_MASK;
        let txa = PBA_TOTAL_KB.saturating_sub(rxa);
        self.set_reg(PBA, (txa << 16) | rxa);
    }

    fn mdic(&mut self, v: u32, irqs: &PciFunction) {
        let phy = (v >> MDIC_PHY_SHIFT) & 0x1F;
        let reg = ((v >> MDIC_REG_SHIFT) & 0x1F) as usize;
        let op = v & (3 << 26);
        let mut out = v & !(MDIC_READY | MDIC_ERROR | (1 << 29));
        // A register the PHY does not implement does not answer: MDIC.E, as for an
        // absent PHY.
        if phy != PHY_ADDR || (op != MDIC_OP_READ && op != MDIC_OP_WRITE) || !self.phy.exists(reg) {
            out |= MDIC_ERROR;
        } else if op == MDIC_OP_READ {
            out = (out & !MDIC_DATA_MASK) | u32::from(self.phy.read(reg));
        } else {
            self.phy.write(reg, (v & MDIC_DATA_MASK) as u16);
        }
        self.set_reg(MDIC, out | MDIC_READY);
        // Interrupt-on-completion bit (29).
        if v & (1 << 29) != 0 {
            self.raise(ICR_MDAC, irqs);
        }
    }

    // ---- interrupts -------------------------------------------------------------------

    /// Set cause bits in ICR and signal if enabled.
    pub fn raise(&mut self, causes: u32, irqs: &PciFunction) {
        if causes == 0 {
            return;
        }
        let icr = self.reg(ICR) | causes;
        self.set_reg(ICR, icr);
        let newly = causes & self.reg(IMS) != 0;
        self.update_irq(irqs, newly);
    }

    pub fn asserted(&self) -> bool {
        self.reg(ICR) & self.reg(IMS) != 0
    }

    pub fn running(&self) -> bool {
        use nestio_device_model::MigState;
        matches!(
            self.fsm.state(),
            MigState::Running | MigState::RunningP2p | MigState::PreCopy | MigState::PreCopyP2p
        )
    }

    /// Transmit descriptors were written back at `now`: `immediate` ones with RS and
    /// without IDE (or with TIDV 0), `delayed` ones with RS and IDE after the last
    /// immediate one. Returns the causes to raise now. An immediate TXDW also delivers
    /// what was delayed (the manual: it halts the absolute timer).
    pub fn tx_written_back(&mut self, now: Instant, immediate: bool, delayed: bool) -> u32 {
        let mut causes = 0;
        if immediate {
            self.tx_delay.clear();
            causes |= ICR_TXDW;
        }
        if delayed {
            match ticks(self.reg(TIDV)) {
                Some(d) => {
                    let before = self.delay_deadline();
                    let abs = ticks(self.reg(TADV));
                    self.tx_delay.arm(now, d, abs);
                    self.note_deadline(before);
                }
                None => {
                    self.tx_delay.clear();
                    causes |= ICR_TXDW;
                }
            }
        }
        causes
    }

    /// A frame was stored in host memory at `now`: returns RXT0 when it is due at
    /// once (RDTR 0), else (re)starts the receive delay timers and returns 0.
    pub fn rx_stored(&mut self, now: Instant) -> u32 {
        match ticks(self.reg(RDTR)) {
            Some(d) => {
                let before = self.delay_deadline();
                // RADV counts only while the packet timer is in use (RDTR != 0).
                let abs = ticks(self.reg(RADV));
                self.rx_delay.arm(now, d, abs);
                self.note_deadline(before);
                0
            }
            None => {
                self.rx_delay.clear();
                ICR_RXT0
            }
        }
    }

    /// The earliest delay timer deadline (none while the device is stopped: its
    /// timers are paused then).
    pub fn delay_deadline(&self) -> Option<Instant> {
        match (self.tx_delay.deadline(), self.rx_delay.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Wake the worker when a timer now expires before anything it waits for.
    fn note_deadline(&mut self, before: Option<Instant>) {
        if let Some(new) = self.delay_deadline() {
            if before.is_none_or(|b| new < b) {
                self.wake_worker = true;
            }
        }
    }

    /// FPD written to TIDV (`tx`) or RDTR: a pending delayed cause is delivered now.
    /// (With nothing pending there is nothing to flush: no interrupt.)
    fn flush_delay(&mut self, tx: bool, irqs: &PciFunction) {
        let (timer, cause) = if tx {
            (&mut self.tx_delay, ICR_TXDW)
        } else {
            (&mut self.rx_delay, ICR_RXT0)
        };
        if timer.pending() {
            timer.clear();
            self.raise(cause, irqs);
        }
    }

    /// Deliver the delayed causes whose timer expired by `now` (called by the worker;
    /// nothing happens while the device is stopped).
    pub fn delay_due(&mut self, intr: &PciFunction, now: Instant) {
        if !self.running() {
            return;
        }
        let mut causes = 0;
        if self.tx_delay.expire(now) {
            causes |= ICR_TXDW;
        }
        if self.rx_delay.expire(now) {
            causes |= ICR_RXT0;
        }
        if causes != 0 {
            tracing::trace!(causes, "e1000: delayed interrupt causes due");
        }
        self.raise(causes, intr);
    }

    /// Stop (the device stopped for migration) or restart (running again) the delay
    /// timers' countdowns, according to the migration state.
    pub fn sync_delay_clock(&mut self, now: Instant) {
        if self.running() {
            self.tx_delay.resume(now);
            self.rx_delay.resume(now);
            self.wake_worker = true;
        } else {
            self.tx_delay.pause(now);
            self.rx_delay.pause(now);
        }
    }

    fn throttle_interval(&self) -> Option<Duration> {
        let itr = self.reg(ITR) & 0xFFFF;
        (itr != 0).then(|| Duration::from_nanos(u64::from(itr) * 256))
    }

    /// Re-evaluate the interrupt line. `new_event`: an enabled cause was just set (a
    /// message interrupt is sent once per such event).
    pub fn update_irq(&mut self, intr: &PciFunction, new_event: bool) {
        let asserted = self.asserted();
        let msg = message_mode(intr);
        // The INTx level follows the line, in INTx mode only.
        if (!asserted || msg) && intr.intr().intx_asserted() {
            intr.lower_intx();
        }
        if !asserted {
            self.deferred_irq = None;
            return;
        }
        if !self.running() {
            return;
        }
        if msg && !new_event {
            return;
        }
        if !msg && intr.intr().intx_asserted() {
            // Already high: the VFIO side signals again at unmask.
            return;
        }
        let now = Instant::now();
        if let Some(next) = self.next_irq {
            if now < next {
                if self.deferred_irq.is_none() {
                    self.deferred_irq = Some(next);
                    self.wake_worker = true;
                }
                return;
            }
        }
        self.fire(intr, now);
    }

    fn fire(&mut self, intr: &PciFunction, now: Instant) {
        self.deferred_irq = None;
        self.next_irq = self.throttle_interval().and_then(|d| now.checked_add(d));
        // A message interrupt is a memory write: it needs bus mastering.
        if message_mode(intr) && !intr.bus_master() {
            return;
        }
        let d = intr.raise(0);
        tracing::trace!(delivery = ?d, "e1000 interrupt");
    }

    /// Fire a deferred interrupt whose time has come (called by the worker).
    pub fn deferred_due(&mut self, intr: &PciFunction, now: Instant) {
        if let Some(t) = self.deferred_irq {
            if now >= t {
                self.deferred_irq = None;
                if self.asserted()
                    && self.running()
                    && (message_mode(intr) || !intr.intr().intx_asserted())
                {
                    self.fire(intr, now);
                }
            }
        }
    }
}

/// VET initial value (the 802.1Q EtherType).
const VET_DEFAULT: u32 = 0x8100;
/// LEDCTL initial value.
const LEDCTL_DEFAULT: u32 = 0x0706_8302;
/// PBA: receive allocation at reset (48 KB), its writable bits, the buffer size.
const PBA_RXA_DEFAULT: u32 = 0x30;
const PBA_RXA_MASK: u32 = 0x7F;
const PBA_TOTAL_KB: u32 = 64;

/// The bits a driver write keeps in a register without special behaviour (the
/// manual's register tables, chapter 13: reserved bits read as 0). Registers not
/// listed keep all 32 bits.
fn write_mask(off: u32) -> u32 {
    match off {
        // Bits 3:0 (GPI_EN, 82544 only), 13 (EE_RST, self-clearing), 14, 16,
        // 21:18 and 31:24 reserved or not on the 82540EM.
        CTRL_EXT => 0x00C2_9FF0,
        // 16-bit fields: flow control address high, type, VLAN EtherType, pause time.
        FCAH | FCT | VET | FCTTV => 0xFFFF,
        // Transmit configuration word (15:0), TxConfig (30), ANE (31).
        TXCW => 0xC000_FFFF,
        // Receive configuration word: status of the TBI / SerDes link, read-only (the
        // 82540EM is copper only: nothing is received).
        RXCW => 0,
        // IPGT 9:0, IPGR1 19:10, IPGR2 29:20; 31:30 reserved.
        TIPG => 0x3FFF_FFFF,
        // Per LED: mode 3:0, invert 6, blink 7; bits 5:4 reserved.
        LEDCTL => 0xCFCF_CFCF,
        // Thresholds in 8-byte units, bits 15:3 (XONE is not on the 82540EM).
        FCRTL | FCRTH => 0xFFF8,
        // PTHRESH 5:0, HTHRESH 13:8, WTHRESH 21:16, GRAN 24.
        RXDCTL => 0x013F_3F3F,
        // ... and LWTHRESH 31:25 for transmit.
        TXDCTL => 0xFF3F_3F3F,
        // Small receive packet detect size, bits 11:0.
        RSRPD => 0x0FFF,
        // Descriptor prefetch prevention (bit 0).
        TXDMAC => 0x1,
        // PCSS 7:0, IPOFLD 8, TUOFLD 9.
        RXCSUM => 0x03FF,
        // Management control: bits 2:0 and 20:8; 7:3 and 31:21 reserved.
        MANC => 0x001F_FF07,
        // Receive address high: address 15:0, select 17:16, valid 31.
        o if (RA..RA + RA_ENTRIES * 8).contains(&o) && o % 8 == 4 => 0x8003_FFFF,
        // Flexible filter length (10:0) and mask (3:0) tables: low dword only.
        o if (FFLT..FFLT + 4 * 8).contains(&o) => {
            if o % 8 == 0 {
                0x07FF
            } else {
                0
            }
        }
        o if (FFMT..FFMT + 128 * 8).contains(&o) => {
            if o % 8 == 0 {
                0xF
            } else {
                0
            }
        }
        _ => u32::MAX,
    }
}

fn log_delay_write(off: u32, v: u32) {
    tracing::debug!(
        reg = %format_args!("{off:#06x}"),
        value = %format_args!("{v:#x}"),
        "e1000: interrupt delay register written"
    );
}

/// True when interrupts go out as messages (the VMM wired MSI or MSI-X eventfds).
pub(crate) fn message_mode(intr: &PciFunction) -> bool {
    matches!(intr.mode(), IntrMode::Msi | IntrMode::MsiX)
}

#[cfg(test)]
mod tests {
    //! The delay timers driven with synthetic time (no sleeping, no wall clock).
    use super::super::delay::{Countdown, MAX_DELAY, TICK_NS};
    use super::super::{build_config, state};
    use super::*;
    use nestio_device_model::MigrationFlags;
    use nestio_dma::MapTable;

    fn core() -> (Core, Arc<PciFunction>, MapTable) {
        let intr = Arc::new(PciFunction::new(build_config().unwrap()));
        let c = Core::new(
            [2, 0, 0, 0, 0, 1],
            intr.clone(),
            MigrationFsm::new(MigrationFlags(MigrationFlags::STOP_COPY)),
        );
        (c, intr, MapTable::default())
    }

    fn ticks(n: u64) -> Duration {
        Duration::from_nanos(n * TICK_NS)
    }

    /// Read ICR (clears it) and return it.
    fn icr(c: &mut Core, intr: &PciFunction) -> u32 {
        c.read(ICR, intr)
    }

    #[test]
    fn tidv_delays_txdw_and_restarts() {
        let (mut c, intr, dma) = core();
        c.write(TIDV, 100, &intr, &dma);
        let t0 = Instant::now();
        assert_eq!(
            c.tx_written_back(t0, false, true),
            0,
            "delayed: no cause now"
        );
        c.delay_due(&intr, t0 + ticks(99));
        assert_eq!(icr(&mut c, &intr), 0, "ICR does not show a delayed cause");
        // A second delayed write-back restarts the countdown.
        assert_eq!(c.tx_written_back(t0 + ticks(50), false, true), 0);
        c.delay_due(&intr, t0 + ticks(149));
        assert_eq!(icr(&mut c, &intr), 0);
        c.delay_due(&intr, t0 + ticks(150));
        assert_eq!(icr(&mut c, &intr), ICR_TXDW);
        assert!(!c.tx_delay.pending());
        c.delay_due(&intr, t0 + ticks(10_000));
        assert_eq!(icr(&mut c, &intr), 0, "fired once");
    }

    #[test]
    fn immediate_txdw_without_ide_or_tidv() {
        let (mut c, intr, dma) = core();
        let t0 = Instant::now();
        // TIDV 0: even IDE write-backs interrupt at once.
        assert_eq!(c.tx_written_back(t0, false, true), ICR_TXDW);
        c.write(TIDV, 100, &intr, &dma);
        assert_eq!(c.tx_written_back(t0, true, false), ICR_TXDW);
        // An immediate TXDW delivers what was delayed and stops its timers.
        assert_eq!(c.tx_written_back(t0, false, true), 0);
        assert!(c.tx_delay.pending());
        assert_eq!(c.tx_written_back(t0 + ticks(1), true, false), ICR_TXDW);
        assert!(!c.tx_delay.pending());
        // Immediate then delayed in one walk: TXDW now, and a new delayed one.
        assert_eq!(c.tx_written_back(t0 + ticks(2), true, true), ICR_TXDW);
        assert!(c.tx_delay.pending());
    }

    #[test]
    fn tadv_caps_a_stream_of_restarts() {
        let (mut c, intr, dma) = core();
        c.write(TIDV, 0xFFFF, &intr, &dma);
        c.write(TADV, 1000, &intr, &dma);
        let t0 = Instant::now();
        for k in 0..100u64 {
            let t = t0 + ticks(k * 10);
            c.delay_due(&intr, t);
            assert_eq!(icr(&mut c, &intr), 0, "nothing before TADV ({k})");
            assert_eq!(c.tx_written_back(t, false, true), 0);
        }
        c.delay_due(&intr, t0 + ticks(999));
        assert_eq!(icr(&mut c, &intr), 0);
        c.delay_due(&intr, t0 + ticks(1000));
        assert_eq!(
            icr(&mut c, &intr),
            ICR_TXDW,
            "TADV after the first write-back"
        );
        // TADV 0 disables the cap: only the packet timer counts.
        c.write(TADV, 0, &intr, &dma);
        c.write(TIDV, 100, &intr, &dma);
        let t1 = t0 + ticks(5000);
        c.tx_written_back(t1, false, true);
        assert_eq!(c.tx_delay.absolute, Countdown::Idle);
        assert_eq!(c.delay_deadline(), Some(t1 + ticks(100)));
    }

    #[test]
    fn fpd_flushes_a_pending_cause() {
        let (mut c, intr, dma) = core();
        c.write(TIDV, 0xFFFF, &intr, &dma);
        c.write(RDTR, 0xFFFF, &intr, &dma);
        // FPD with nothing pending: nothing to deliver.
        c.write(TIDV, 0xFFFF | DELAY_FPD, &intr, &dma);
        c.write(RDTR, 0xFFFF | DELAY_FPD, &intr, &dma);
        assert_eq!(icr(&mut c, &intr), 0);
        assert_eq!(c.read(TIDV, &intr), 0xFFFF, "FPD self-clears");
        assert_eq!(c.read(RDTR, &intr), 0xFFFF, "FPD self-clears");
        let t0 = Instant::now();
        c.tx_written_back(t0, false, true);
        assert_eq!(c.rx_stored(t0), 0);
        c.write(TIDV, 0xFFFF | DELAY_FPD, &intr, &dma);
        assert_eq!(icr(&mut c, &intr), ICR_TXDW);
        assert!(c.rx_delay.pending(), "TIDV.FPD leaves RX alone");
        c.write(RDTR, 0xFFFF | DELAY_FPD, &intr, &dma);
        assert_eq!(icr(&mut c, &intr), ICR_RXT0);
        assert_eq!(c.delay_deadline(), None);
        c.delay_due(&intr, t0 + MAX_DELAY);
        assert_eq!(icr(&mut c, &intr), 0, "flushed timers do not fire again");
    }

    #[test]
    fn rdtr_restarts_and_radv_caps() {
        let (mut c, intr, dma) = core();
        let t0 = Instant::now();
        // RDTR 0: RXT0 at once, RADV ignored.
        c.write(RADV, 8, &intr, &dma);
        assert_eq!(c.rx_stored(t0), ICR_RXT0);
        assert!(!c.rx_delay.pending());
        c.write(RDTR, 100, &intr, &dma);
        c.write(RADV, 0, &intr, &dma);
        assert_eq!(c.rx_stored(t0), 0);
        assert_eq!(c.rx_stored(t0 + ticks(80)), 0);
        c.delay_due(&intr, t0 + ticks(179));
        assert_eq!(icr(&mut c, &intr), 0);
        c.delay_due(&intr, t0 + ticks(180));
        assert_eq!(icr(&mut c, &intr), ICR_RXT0);
        // RADV caps a stream of frames arriving faster than RDTR.
        c.write(RADV, 300, &intr, &dma);
        let t1 = t0 + ticks(1000);
        for k in 0..30u64 {
            c.delay_due(&intr, t1 + ticks(k * 10));
            assert_eq!(icr(&mut c, &intr), 0);
            c.rx_stored(t1 + ticks(k * 10));
        }
        c.delay_due(&intr, t1 + ticks(300));
        assert_eq!(icr(&mut c, &intr), ICR_RXT0);
        // Expiry stopped both: the next frame starts a fresh absolute period.
        c.rx_stored(t1 + ticks(400));
        assert_eq!(c.rx_delay.absolute, Countdown::Running(t1 + ticks(700)));
    }

    #[test]
    fn hostile_values_do_not_overflow() {
        let (mut c, intr, dma) = core();
        for r in [TIDV, TADV, RDTR, RADV] {
            c.write(r, u32::MAX, &intr, &dma);
            assert_eq!(c.read(r, &intr), 0xFFFF);
        }
        let t0 = Instant::now();
        c.tx_written_back(t0, false, true);
        c.rx_stored(t0);
        assert_eq!(c.delay_deadline(), Some(t0 + MAX_DELAY));
        c.delay_due(&intr, t0 + MAX_DELAY);
        assert_eq!(icr(&mut c, &intr), ICR_TXDW | ICR_RXT0);
    }

    #[test]
    fn reset_clears_timers() {
        let (mut c, intr, dma) = core();
        c.write(TIDV, 10, &intr, &dma);
        c.write(RDTR, 10, &intr, &dma);
        let t0 = Instant::now();
        c.tx_written_back(t0, false, true);
        c.rx_stored(t0);
        c.write(CTRL, CTRL_RST, &intr, &dma);
        assert!(!c.tx_delay.pending() && !c.rx_delay.pending());
        assert_eq!(c.read(TIDV, &intr), 0);
        c.delay_due(&intr, t0 + Duration::from_secs(1));
        assert_eq!(icr(&mut c, &intr), 0);
    }

    #[test]
    fn stopped_device_keeps_time_left_through_migration() {
        use nestio_device_model::MigState;
        let (mut c, intr, dma) = core();
        c.write(TIDV, 1000, &intr, &dma);
        c.write(TADV, 3000, &intr, &dma);
        c.write(RDTR, 500, &intr, &dma);
        let t0 = Instant::now();
        c.tx_written_back(t0, false, true);
        c.rx_stored(t0);
        c.fsm.transition(MigState::Stop, |_, _| Ok(())).unwrap();
        c.sync_delay_clock(t0 + ticks(100));
        // Stopped: no time passes, nothing fires.
        c.delay_due(&intr, t0 + Duration::from_secs(10));
        assert_eq!(icr(&mut c, &intr), 0);
        assert_eq!(c.delay_deadline(), None);
        let s1 = state::save(&c);
        assert_eq!(s1[4..8], state::VERSION.to_le_bytes());
        assert_eq!(state::save(&c), s1, "a stopped device saves the same bytes");

        let (mut d, intr2, _) = core();
        d.fsm.transition(MigState::Stop, |_, _| Ok(())).unwrap();
        state::load(&mut d, &s1).unwrap();
        assert_eq!(d.tx_delay.packet, Countdown::Paused(ticks(900)));
        assert_eq!(d.tx_delay.absolute, Countdown::Paused(ticks(2900)));
        assert_eq!(d.rx_delay.packet, Countdown::Paused(ticks(400)));
        assert_eq!(state::save(&d), s1, "restore + save is a fixed point");
        // Running again: the time left counts from then.
        d.fsm.transition(MigState::Running, |_, _| Ok(())).unwrap();
        let t1 = t0 + Duration::from_secs(60);
        d.sync_delay_clock(t1);
        d.delay_due(&intr2, t1 + ticks(399));
        assert_eq!(icr(&mut d, &intr2), 0);
        d.delay_due(&intr2, t1 + ticks(400));
        assert_eq!(icr(&mut d, &intr2), ICR_RXT0);
        d.delay_due(&intr2, t1 + ticks(900));
        assert_eq!(icr(&mut d, &intr2), ICR_TXDW);

        // A version 1 stream (no timers, no options byte) still loads, with nothing
        // pending.
        let mut v1 = s1.clone();
        v1[4..8].copy_from_slice(&1u32.to_le_bytes());
        v1.truncate(v1.len() - 4 * 9 - 1);
        let (mut e, _, _) = core();
        state::load(&mut e, &v1).unwrap();
        assert!(!e.tx_delay.pending() && !e.rx_delay.pending());
        assert_eq!(e.reg(TIDV), 1000);
        // Hostile timer fields are refused (the timers end before the options byte).
        let n = s1.len() - 1;
        let mut bad = s1.clone();
        bad[n - 8..n].copy_from_slice(&u64::MAX.to_le_bytes());
        bad[n - 9] = 1;
        assert!(
            state::load(&mut e, &bad).is_err(),
            "time left beyond 0xFFFF ticks"
        );
        let mut bad = s1.clone();
        bad[n - 9] = 2;
        assert!(state::load(&mut e, &bad).is_err(), "flag neither 0 nor 1");
        let mut bad = s1;
        bad[n - 9] = 0;
        bad[n - 1] = 1;
        assert!(state::load(&mut e, &bad).is_err(), "idle with time left");
    }

    fn core_msi(msi: bool) -> Core {
        let cfg = super::super::config::build(&Eeprom::new([2, 0, 0, 0, 0, 1]), msi).unwrap();
        Core::new(
            [2, 0, 0, 0, 0, 1],
            Arc::new(PciFunction::new(cfg)),
            MigrationFsm::new(MigrationFlags(MigrationFlags::STOP_COPY)),
        )
    }

    #[test]
    fn msi_option_travels_in_the_stream() {
        use nestio_device_model::MigState;
        let mut src = core_msi(false);
        src.fsm.transition(MigState::Stop, |_, _| Ok(())).unwrap();
        let s = state::save(&src);
        assert_eq!(*s.last().unwrap(), 0, "options: no MSI");
        let mut same = core_msi(false);
        state::load(&mut same, &s).unwrap();
        let mut other = core_msi(true);
        assert!(matches!(
            state::load(&mut other, &s),
            Err(state::StateError::Options {
                stream_msi: false,
                device_msi: true
            })
        ));
        // An unknown option bit is refused.
        let mut bad = s.clone();
        *bad.last_mut().unwrap() = 0x80;
        assert!(state::load(&mut same, &bad).is_err());
        // A version 2 stream (always from a device with MSI) loads only with MSI on.
        let mut msi = core_msi(true);
        msi.fsm.transition(MigState::Stop, |_, _| Ok(())).unwrap();
        let mut v2 = state::save(&msi);
        v2[4..8].copy_from_slice(&2u32.to_le_bytes());
        v2.pop();
        state::load(&mut other, &v2).unwrap();
        assert!(matches!(
            state::load(&mut same, &v2),
            Err(state::StateError::Options {
                stream_msi: true,
                ..
            })
        ));
    }

    #[test]
    fn reserved_bits_read_zero_and_reset_values() {
        let (mut c, intr, dma) = core();
        assert_eq!(c.read(VET, &intr), 0x8100);
        assert_eq!(c.read(PBA, &intr), 0x0010_0030);
        assert_eq!(c.read(LEDCTL, &intr), 0x0706_8302);
        for (r, mask) in [
            (CTRL_EXT, 0x00C2_9FF0),
            (FCT, 0xFFFF),
            (TIPG, 0x3FFF_FFFF),
            (RXCSUM, 0x3FF),
            (MANC, 0x001F_FF07),
            (RXCW, 0),
            (RA + 12, 0x8003_FFFF),
        ] {
            c.write(r, u32::MAX, &intr, &dma);
            assert_eq!(c.read(r, &intr), mask, "register {r:#x}");
        }
        // PBA: the transmit share follows the receive share.
        c.write(PBA, 0x0000_0028, &intr, &dma);
        assert_eq!(c.read(PBA, &intr), 0x0018_0028);
        // CTRL.RST brings the initial values back.
        c.write(CTRL, CTRL_RST, &intr, &dma);
        assert_eq!(c.read(PBA, &intr), 0x0010_0030);
        assert_eq!(c.read(TIPG, &intr), 0);
        // MDIC: an absent PHY register fails the access with MDIC.E.
        c.write(
            MDIC,
            MDIC_OP_READ | (1 << MDIC_PHY_SHIFT) | (11 << MDIC_REG_SHIFT),
            &intr,
            &dma,
        );
        assert_ne!(c.read(MDIC, &intr) & MDIC_ERROR, 0);
        c.write(
            MDIC,
            MDIC_OP_READ | (1 << MDIC_PHY_SHIFT) | (2 << MDIC_REG_SHIFT),
            &intr,
            &dma,
        );
        let v = c.read(MDIC, &intr);
        assert_eq!(v & MDIC_ERROR, 0);
        assert_eq!(v & 0xFFFF, 0x0141);
    }
}
