//! The guest API: PAPR's `H_INT_*` hypercalls (LoPAPR "XIVE exploitation"), with the
//! argument checks and return codes of QEMU 7.2's sPAPR model (the reference the
//! scenario oracle compares against), on this model.
//!
//! | call | arguments | returns |
//! |---|---|---|
//! | `H_INT_GET_SOURCE_INFO` | flags, lisn | flags, EOI page, trigger page, page shift |
//! | `H_INT_SET_SOURCE_CONFIG` | flags (SET_EISN, MASK), lisn, target, prio, eisn | |
//! | `H_INT_GET_SOURCE_CONFIG` | flags, lisn | target, prio (0xFF masked), eisn |
//! | `H_INT_GET_QUEUE_INFO` | flags, target, prio | queue ESB page, qshift |
//! | `H_INT_SET_QUEUE_CONFIG` | flags (ALWAYS_NOTIFY), target, prio, qpage, qshift | |
//! | `H_INT_GET_QUEUE_CONFIG` | flags (DEBUG), target, prio | flags (+ generation << 62), qpage, qshift, index (DEBUG) |
//! | `H_INT_SET_OS_REPORTING_LINE` | flags, line | |
//! | `H_INT_GET_OS_REPORTING_LINE` | flags, target | line |
//! | `H_INT_ESB` | flags (STORE), lisn, offset, data | loaded value (-1 for a store) |
//! | `H_INT_SYNC` | flags, lisn | |
//! | `H_INT_RESET` | flags | |
//!
//! Every call answers `H_FUNCTION` until exploitation mode is selected
//! ([`Xive::set_exploitation`]). Checks run in QEMU's order: unknown flags
//! `H_PARAMETER`, then the source (`H_P2`), or the priority and the target (which
//! parameter is bad: `H_P2`..`H_P5`). A level-sensitive source is advertised with
//! `H_INT_ESB` (its EOI must go through the hypercall so the level can re-trigger it),
//! as QEMU does.
//!
//! Deliberate differences from QEMU 7.2, all stricter: a priority argument above 0xFF
//! is reserved (QEMU truncates it to 8 bits, so 0x100 is priority 0); an `H_INT_ESB`
//! offset must leave 8 bytes inside the management page (QEMU accepts up to twice
//! the page, reaching the next source's pages); the OS reporting line is implemented
//! (QEMU answers `H_FUNCTION`): a 128-byte aligned line in guest RAM, per vCPU. QEMU
//! 7.2's `H_INT_ESB` load value comes back byte-swapped on x86 hosts (a QEMU defect);
//! this model returns the value.

use crate::eq::{EventQueue, ALWAYS_NOTIFY};
use crate::router::{State, Xive};
use crate::source::{Eas, MAX_PRIO, PRIO_MASKED};

/// PAPR return codes used here (Linux `hvcall.h`).
pub mod rc {
    /// Success.
    pub const H_SUCCESS: i64 = 0;
    /// Hardware error.
    pub const H_HARDWARE: i64 = -1;
    /// Not supported.
    pub const H_FUNCTION: i64 = -2;
    /// Bad parameter (the flags).
    pub const H_PARAMETER: i64 = -4;
    /// Second parameter bad.
    pub const H_P2: i64 = -55;
    /// Third parameter bad.
    pub const H_P3: i64 = -56;
    /// Fourth parameter bad.
    pub const H_P4: i64 = -57;
    /// Fifth parameter bad.
    pub const H_P5: i64 = -58;
}

/// The opcodes (Linux `hvcall.h`).
pub mod op {
    /// H_INT_GET_SOURCE_INFO.
    pub const H_INT_GET_SOURCE_INFO: u64 = 0x3A8;
    /// H_INT_SET_SOURCE_CONFIG.
    pub const H_INT_SET_SOURCE_CONFIG: u64 = 0x3AC;
    /// H_INT_GET_SOURCE_CONFIG.
    pub const H_INT_GET_SOURCE_CONFIG: u64 = 0x3B0;
    /// H_INT_GET_QUEUE_INFO.
    pub const H_INT_GET_QUEUE_INFO: u64 = 0x3B4;
    /// H_INT_SET_QUEUE_CONFIG.
    pub const H_INT_SET_QUEUE_CONFIG: u64 = 0x3B8;
    /// H_INT_GET_QUEUE_CONFIG.
    pub const H_INT_GET_QUEUE_CONFIG: u64 = 0x3BC;
    /// H_INT_SET_OS_REPORTING_LINE.
    pub const H_INT_SET_OS_REPORTING_LINE: u64 = 0x3C0;
    /// H_INT_GET_OS_REPORTING_LINE.
    pub const H_INT_GET_OS_REPORTING_LINE: u64 = 0x3C4;
    /// H_INT_ESB.
    pub const H_INT_ESB: u64 = 0x3C8;
    /// H_INT_SYNC.
    pub const H_INT_SYNC: u64 = 0x3CC;
    /// H_INT_RESET.
    pub const H_INT_RESET: u64 = 0x3D0;
}

/// Flag bits (PAPR numbers bits from the left: `PPC_BIT(63)` is 1).
pub mod flags {
    /// Source info: EOI through `H_INT_ESB`.
    pub const SRC_H_INT_ESB: u64 = 1 << 3;
    /// Source info: level-sensitive.
    pub const SRC_LSI: u64 = 1 << 2;
    /// Source info: single page (trigger == EOI page).
    pub const SRC_TRIGGER: u64 = 1 << 1;
    /// Source info: store EOI supported.
    pub const SRC_STORE_EOI: u64 = 1;
    /// Set source config: set the EISN.
    pub const SRC_SET_EISN: u64 = 1 << 1;
    /// Set source config: mask.
    pub const SRC_MASK: u64 = 1;
    /// Queue config: notify on every event.
    pub const EQ_ALWAYS_NOTIFY: u64 = 1;
    /// Get queue config: return the producer position.
    pub const EQ_DEBUG: u64 = 1;
    /// H_INT_ESB: a store.
    pub const ESB_STORE: u64 = 1;
}

/// A call's outcome: return code and up to four return values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HcallOutcome {
    /// Return code ([`rc`]).
    pub rc: i64,
    /// Return values (`r4..r7`).
    pub rets: [u64; 4],
}

impl HcallOutcome {
    fn rc(rc: i64) -> Self {
        HcallOutcome { rc, rets: [0; 4] }
    }
    fn ok(rets: [u64; 4]) -> Self {
        HcallOutcome {
            rc: rc::H_SUCCESS,
            rets,
        }
    }
}

/// How many return registers (`r4..`) a successful call writes (PAPR; the others keep
/// whatever they held, as on QEMU).
pub fn ret_count(opcode: u64) -> usize {
    match opcode {
        op::H_INT_GET_SOURCE_INFO | op::H_INT_GET_QUEUE_CONFIG => 4,
        op::H_INT_GET_SOURCE_CONFIG => 3,
        op::H_INT_GET_QUEUE_INFO => 2,
        op::H_INT_ESB | op::H_INT_GET_OS_REPORTING_LINE => 1,
        _ => 0,
    }
}

/// Every `H_INT_*` opcode.
pub const ALL: [u64; 11] = [
    op::H_INT_GET_SOURCE_INFO,
    op::H_INT_SET_SOURCE_CONFIG,
    op::H_INT_GET_SOURCE_CONFIG,
    op::H_INT_GET_QUEUE_INFO,
    op::H_INT_SET_QUEUE_CONFIG,
    op::H_INT_GET_QUEUE_CONFIG,
    op::H_INT_SET_OS_REPORTING_LINE,
    op::H_INT_GET_OS_REPORTING_LINE,
    op::H_INT_ESB,
    op::H_INT_SYNC,
    op::H_INT_RESET,
];

/// A priority argument: `Some` when usable (0..=6).
fn prio_arg(p: u64) -> Option<u8> {
    u8::try_from(p).ok().filter(|&p| p <= MAX_PRIO)
}

/// A target argument: `Some` when a connected server.
fn target_arg(st: &State, t: u64) -> Option<u32> {
    u32::try_from(t).ok().filter(|t| st.servers.contains_key(t))
}

impl Xive {
    /// Serve hypercall `opcode` made by vCPU `caller` with `args` (`r4..`; missing
    /// arguments are 0). Never panics.
    pub fn hcall(&self, caller: u32, opcode: u64, args: &[u64]) -> HcallOutcome {
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        if !self.state.lock().exploitation {
            return HcallOutcome::rc(rc::H_FUNCTION);
        }
        let out = match opcode {
            op::H_INT_GET_SOURCE_INFO => self.get_source_info(a(0), a(1)),
            op::H_INT_SET_SOURCE_CONFIG => self.set_source_cfg(a(0), a(1), a(2), a(3), a(4)),
            op::H_INT_GET_SOURCE_CONFIG => self.get_source_cfg(a(0), a(1)),
            op::H_INT_GET_QUEUE_INFO => self.get_queue_info(a(0), a(1), a(2)),
            op::H_INT_SET_QUEUE_CONFIG => self.set_queue_cfg(a(0), a(1), a(2), a(3), a(4)),
            op::H_INT_GET_QUEUE_CONFIG => self.get_queue_cfg(a(0), a(1), a(2)),
            op::H_INT_SET_OS_REPORTING_LINE => self.set_reporting_line(caller, a(0), a(1)),
            op::H_INT_GET_OS_REPORTING_LINE => self.get_reporting_line(a(0), a(1)),
            op::H_INT_ESB => self.int_esb(a(0), a(1), a(2), a(3)),
            op::H_INT_SYNC => self.int_sync(a(0), a(1)),
            op::H_INT_RESET => {
                if a(0) != 0 {
                    HcallOutcome::rc(rc::H_PARAMETER)
                } else {
                    self.reset();
                    HcallOutcome::ok([0; 4])
                }
            }
            _ => HcallOutcome::rc(rc::H_FUNCTION),
        };
        tracing::trace!(caller, opcode, ?args, rc = out.rc, "xive hcall");
        out
    }

    fn lisn_arg(st: &State, lisn: u64) -> Option<u32> {
        u32::try_from(lisn)
            .ok()
            .filter(|l| st.sources.contains_key(l))
    }

    fn get_source_info(&self, fl: u64, lisn: u64) -> HcallOutcome {
        if fl != 0 {
            return HcallOutcome::rc(rc::H_PARAMETER);
        }
        let st = self.state.lock();
        let Some(l) = Self::lisn_arg(&st, lisn) else {
            return HcallOutcome::rc(rc::H_P2);
        };
        let lay = self.cfg.layout;
        if st.sources[&l].lsi {
            HcallOutcome::ok([
                flags::SRC_H_INT_ESB | flags::SRC_LSI,
                u64::MAX,
                u64::MAX,
                u64::from(lay.page_shift),
            ])
        } else {
            HcallOutcome::ok([
                0,
                lay.mgmt_page(l),
                lay.trigger_page(l),
                u64::from(lay.page_shift),
            ])
        }
    }

    fn set_source_cfg(
        &self,
        fl: u64,
        lisn: u64,
        target: u64,
        prio: u64,
        eisn: u64,
    ) -> HcallOutcome {
        if fl & !(flags::SRC_SET_EISN | flags::SRC_MASK) != 0 {
            return HcallOutcome::rc(rc::H_PARAMETER);
        }
        let mut st = self.state.lock();
        let Some(l) = Self::lisn_arg(&st, lisn) else {
            return HcallOutcome::rc(rc::H_P2);
        };
        if prio == u64::from(PRIO_MASKED) {
            if let Some(s) = st.sources.get_mut(&l) {
                s.eas = Eas::RESET;
            }
            return HcallOutcome::ok([0; 4]);
        }
        let Some(p) = prio_arg(prio) else {
            return HcallOutcome::rc(rc::H_P4);
        };
        let Some(server) = target_arg(&st, target) else {
            return HcallOutcome::rc(rc::H_P3);
        };
        if let Some(s) = st.sources.get_mut(&l) {
            s.eas.server = server;
            s.eas.prio = p;
            s.eas.masked = fl & flags::SRC_MASK != 0;
            if fl & flags::SRC_SET_EISN != 0 {
                s.eas.eisn = (eisn & 0x7FFF_FFFF) as u32;
            }
        }
        HcallOutcome::ok([0; 4])
    }

    fn get_source_cfg(&self, fl: u64, lisn: u64) -> HcallOutcome {
        if fl != 0 {
            return HcallOutcome::rc(rc::H_PARAMETER);
        }
        let st = self.state.lock();
        let Some(l) = Self::lisn_arg(&st, lisn) else {
            return HcallOutcome::rc(rc::H_P2);
        };
        let e = st.sources[&l].eas;
        let prio = if e.masked { PRIO_MASKED } else { e.prio };
        HcallOutcome::ok([u64::from(e.server), u64::from(prio), u64::from(e.eisn), 0])
    }

    fn queue_args(st: &State, prio: u64, target: u64) -> Result<(u32, u8), HcallOutcome> {
        let p = prio_arg(prio).ok_or(HcallOutcome::rc(rc::H_P3))?;
        let t = target_arg(st, target).ok_or(HcallOutcome::rc(rc::H_P2))?;
        Ok((t, p))
    }

    fn get_queue_info(&self, fl: u64, target: u64, prio: u64) -> HcallOutcome {
        if fl != 0 {
            return HcallOutcome::rc(rc::H_PARAMETER);
        }
        let st = self.state.lock();
        let (t, p) = match Self::queue_args(&st, prio, target) {
            Ok(v) => v,
            Err(o) => return o,
        };
        let lay = self.cfg.layout;
        let idx = u64::from(t) * 8 + u64::from(p);
        let page = lay
            .end_base
            .wrapping_add(idx.wrapping_mul(1 << (lay.page_shift + 1)));
        let q = &st.servers[&t].eqs[usize::from(p)];
        HcallOutcome::ok([page, u64::from(q.qshift), 0, 0])
    }

    fn set_queue_cfg(
        &self,
        fl: u64,
        target: u64,
        prio: u64,
        qpage: u64,
        qshift: u64,
    ) -> HcallOutcome {
        if fl & !flags::EQ_ALWAYS_NOTIFY != 0 {
            return HcallOutcome::rc(rc::H_PARAMETER);
        }
        let mut st = self.state.lock();
        let (t, p) = match Self::queue_args(&st, prio, target) {
            Ok(v) => v,
            Err(o) => return o,
        };
        let q = match qshift {
            0 => EventQueue::RESET,
            12 | 16 | 21 | 24 => {
                match EventQueue::configure(
                    self.mem.as_ref(),
                    qpage,
                    qshift as u32,
                    fl & flags::EQ_ALWAYS_NOTIFY != 0,
                ) {
                    Ok(q) => q,
                    Err(_) => return HcallOutcome::rc(rc::H_P4),
                }
            }
            _ => return HcallOutcome::rc(rc::H_P5),
        };
        if let Some(s) = st.servers.get_mut(&t) {
            s.eqs[usize::from(p)] = q;
        }
        HcallOutcome::ok([0; 4])
    }

    fn get_queue_cfg(&self, fl: u64, target: u64, prio: u64) -> HcallOutcome {
        if fl & !flags::EQ_DEBUG != 0 {
            return HcallOutcome::rc(rc::H_PARAMETER);
        }
        let st = self.state.lock();
        let (t, p) = match Self::queue_args(&st, prio, target) {
            Ok(v) => v,
            Err(o) => return o,
        };
        let q = &st.servers[&t].eqs[usize::from(p)];
        let mut r = [0u64; 4];
        if q.always_notify {
            r[0] |= u64::from(ALWAYS_NOTIFY);
        }
        if q.enabled() {
            r[1] = q.qaddr;
            r[2] = u64::from(q.qshift);
        }
        if fl & flags::EQ_DEBUG != 0 {
            r[0] |= u64::from(q.toggle & 1) << 62;
            r[3] = u64::from(q.index);
        }
        HcallOutcome::ok(r)
    }

    fn set_reporting_line(&self, caller: u32, fl: u64, line: u64) -> HcallOutcome {
        if fl != 0 {
            return HcallOutcome::rc(rc::H_PARAMETER);
        }
        if line & 127 != 0 || !self.mem.contains(line, 128) {
            return HcallOutcome::rc(rc::H_P2);
        }
        let mut st = self.state.lock();
        match st.servers.get_mut(&caller) {
            Some(s) => {
                s.reporting_line = line;
                HcallOutcome::ok([0; 4])
            }
            None => HcallOutcome::rc(rc::H_HARDWARE),
        }
    }

    fn get_reporting_line(&self, fl: u64, target: u64) -> HcallOutcome {
        if fl != 0 {
            return HcallOutcome::rc(rc::H_PARAMETER);
        }
        let st = self.state.lock();
        match target_arg(&st, target) {
            Some(t) => HcallOutcome::ok([st.servers[&t].reporting_line, 0, 0, 0]),
            None => HcallOutcome::rc(rc::H_P2),
        }
    }

    fn int_esb(&self, fl: u64, lisn: u64, offset: u64, data: u64) -> HcallOutcome {
        if fl & !flags::ESB_STORE != 0 {
            return HcallOutcome::rc(rc::H_PARAMETER);
        }
        let l = {
            let st = self.state.lock();
            match Self::lisn_arg(&st, lisn) {
                Some(l) => l,
                None => return HcallOutcome::rc(rc::H_P2),
            }
        };
        let page = 1u64 << self.cfg.layout.page_shift;
        if offset.checked_add(8).is_none_or(|end| end > page) {
            return HcallOutcome::rc(rc::H_P3);
        }
        if fl & flags::ESB_STORE != 0 {
            self.esb_store(l, true, offset, 8, data);
            HcallOutcome::ok([u64::MAX, 0, 0, 0])
        } else {
            HcallOutcome::ok([self.esb_load(l, true, offset, 8), 0, 0, 0])
        }
    }

    fn int_sync(&self, fl: u64, lisn: u64) -> HcallOutcome {
        if fl != 0 {
            return HcallOutcome::rc(rc::H_PARAMETER);
        }
        let st = self.state.lock();
        match Self::lisn_arg(&st, lisn) {
            Some(_) => HcallOutcome::ok([0; 4]),
            None => HcallOutcome::rc(rc::H_P2),
        }
    }
}
