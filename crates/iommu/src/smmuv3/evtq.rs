//! Event records (32 bytes) and the event queue's producer side.
//!
//! The SMMU is the producer: it writes a record at PROD and advances PROD (index
//! plus a wrap bit at LOG2SIZE); software consumes and advances CONS. When the queue
//! is full the record is lost and PROD.OVFLG is toggled so that it differs from
//! CONS.OVACKFLG until software acknowledges the overflow. Layout (Linux's
//! `EVTQ_*` fields): dword0 type 7:0, SSV 11, SSID 31:12, SID 63:32; dword1 RnW 35,
//! S2 39, CLASS 41:40; dword2 the input address; dword3 the IPA (bits 51:12) of a
//! stage-2 fault or the fetch address (51:3) of a fetch abort.

use super::memory::{MemoryError, SmmuMemory};

/// Event type codes (the architecture's names).
#[allow(missing_docs)]
pub mod code {
    pub const C_BAD_STREAMID: u8 = 0x02;
    pub const F_STE_FETCH: u8 = 0x03;
    pub const C_BAD_STE: u8 = 0x04;
    pub const F_STREAM_DISABLED: u8 = 0x06;
    pub const C_BAD_SUBSTREAMID: u8 = 0x08;
    pub const F_CD_FETCH: u8 = 0x09;
    pub const C_BAD_CD: u8 = 0x0a;
    pub const F_WALK_EABT: u8 = 0x0b;
    pub const F_TRANSLATION: u8 = 0x10;
    pub const F_ADDR_SIZE: u8 = 0x11;
    pub const F_ACCESS: u8 = 0x12;
    pub const F_PERMISSION: u8 = 0x13;
}

/// What a fault was fetching when it happened (event CLASS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// Fetching a context descriptor (a stage-2 fault on the CD's IPA).
    Cd = 0,
    /// Fetching a stage-1 translation table descriptor.
    Ttd = 1,
    /// Translating the input address itself.
    In = 2,
}

/// One event record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Event type (see [`code`]).
    pub code: u8,
    /// Stream ID of the transaction.
    pub sid: u32,
    /// Substream ID, when the transaction had one (SSV).
    pub ssid: Option<u32>,
    /// The transaction was a read (RnW = 1).
    pub read: bool,
    /// The fault happened at stage 2.
    pub s2: bool,
    /// What was being translated (CLASS).
    pub class: FaultClass,
    /// The transaction's input address.
    pub input_addr: u64,
    /// IPA of a stage-2 fault, or the fetch address of a fetch abort.
    pub addr2: u64,
}

impl Event {
    /// A configuration event (no address fields).
    pub fn config(code: u8, sid: u32, ssid: Option<u32>) -> Self {
        Self {
            code,
            sid,
            ssid,
            read: false,
            s2: false,
            class: FaultClass::Cd,
            input_addr: 0,
            addr2: 0,
        }
    }

    /// Encode as the 32-byte little-endian record.
    pub fn encode(&self) -> [u8; 32] {
        let mut d = [0u64; 4];
        d[0] = u64::from(self.code) | (u64::from(self.sid) << 32);
        if let Some(ssid) = self.ssid {
            d[0] |= (1 << 11) | (u64::from(ssid & 0xf_ffff) << 12);
        }
        match self.code {
            code::F_TRANSLATION | code::F_ADDR_SIZE | code::F_ACCESS | code::F_PERMISSION => {
                // CLASS qualifies stage-2 faults (what the IPA was for); a
                // stage-1 fault is always on the input address and leaves it 0,
                // as QEMU's model does.
                let class = if self.s2 { self.class as u64 } else { 0 };
                d[1] = (u64::from(self.read) << 35) | (u64::from(self.s2) << 39) | (class << 40);
                d[2] = self.input_addr;
                d[3] = self.addr2 & 0x000f_ffff_ffff_f000;
            }
            code::F_WALK_EABT => {
                d[1] = (u64::from(self.read) << 35) | ((self.class as u64) << 40);
                d[2] = self.input_addr;
                d[3] = self.addr2 & 0x000f_ffff_ffff_fff8;
            }
            code::F_STE_FETCH | code::F_CD_FETCH => {
                d[3] = self.addr2 & 0x000f_ffff_ffff_fff8;
            }
            _ => {}
        }
        let mut out = [0u8; 32];
        for (i, w) in d.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Decode a 32-byte record (the inverse of [`Event::encode`] for the fields it
    /// writes); used by tests, the differential harness and the VMM.
    pub fn decode(rec: &[u8; 32]) -> Self {
        let w = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&rec[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let (d0, d1) = (w(0), w(1));
        let class = match (d1 >> 40) & 3 {
            0 => FaultClass::Cd,
            1 => FaultClass::Ttd,
            _ => FaultClass::In,
        };
        Self {
            code: d0 as u8,
            sid: (d0 >> 32) as u32,
            ssid: (d0 & (1 << 11) != 0).then_some(((d0 >> 12) & 0xf_ffff) as u32),
            read: d1 & (1 << 35) != 0,
            s2: d1 & (1 << 39) != 0,
            class,
            input_addr: w(2),
            addr2: w(3),
        }
    }
}

/// Outcome of a record write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// The record is in the queue.
    Written,
    /// The queue was full: the record is lost, OVFLG toggled (if not already
    /// pending).
    Overflow,
    /// Writing the record failed (EVTQ_ABT_ERR).
    Abort(MemoryError),
}

/// Queue index arithmetic with a wrap bit at `log2` (shared with the command queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueIndex {
    log2: u32,
}

impl QueueIndex {
    /// Indices of a queue of 2^`log2` entries.
    pub fn new(log2: u32) -> Self {
        Self { log2 }
    }
    /// Index and wrap bits of a PROD/CONS value.
    pub fn mask(&self) -> u32 {
        ((1u64 << (self.log2 + 1)) - 1) as u32
    }
    /// The index part of a PROD/CONS value.
    pub fn idx(&self, v: u32) -> u32 {
        v & (((1u64 << self.log2) - 1) as u32)
    }
    /// The wrap bit of a PROD/CONS value.
    pub fn wrap(&self, v: u32) -> bool {
        v & (1 << self.log2) != 0
    }
    /// No entries between CONS and PROD.
    pub fn empty(&self, prod: u32, cons: u32) -> bool {
        (prod & self.mask()) == (cons & self.mask())
    }
    /// PROD is a full lap ahead of CONS.
    pub fn full(&self, prod: u32, cons: u32) -> bool {
        self.idx(prod) == self.idx(cons) && self.wrap(prod) != self.wrap(cons)
    }
    /// `v` advanced by one, wrap bit flipped on wrap-around (bits above kept).
    pub fn inc(&self, v: u32) -> u32 {
        let m = self.mask();
        (v & !m) | (v.wrapping_add(1) & m)
    }
}

/// Write `ev` into the queue at `base` (`log2` entries) with the given PROD/CONS
/// register values; returns the new PROD.
pub fn push(
    mem: &dyn SmmuMemory,
    base: u64,
    log2: u32,
    prod: u32,
    cons: u32,
    ev: &Event,
) -> (u32, Push) {
    let q = QueueIndex::new(log2);
    if q.full(prod, cons) {
        // Overflow: signal once (OVFLG differs from OVACKFLG while unacknowledged).
        let pending = (prod ^ cons) & super::regs::EVENTQ_OVFLG != 0;
        let prod = if pending {
            prod
        } else {
            prod ^ super::regs::EVENTQ_OVFLG
        };
        return (prod, Push::Overflow);
    }
    let addr = base + u64::from(q.idx(prod)) * 32;
    match mem.write(addr, &ev.encode()) {
        Ok(()) => (q.inc(prod), Push::Written),
        Err(e) => (prod, Push::Abort(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_and_layout() {
        let ev = Event {
            code: code::F_TRANSLATION,
            sid: 0x10,
            ssid: Some(3),
            read: true,
            s2: true,
            class: FaultClass::Ttd,
            input_addr: 0xdead_b000,
            addr2: 0x1234_5000,
        };
        let rec = ev.encode();
        assert_eq!(rec[0], 0x10);
        assert_eq!(u32::from_le_bytes(rec[4..8].try_into().unwrap()), 0x10);
        assert_eq!(u32::from_le_bytes(rec[0..4].try_into().unwrap()) >> 12, 3);
        // RnW is bit 35 = byte 12 bit 3; S2 bit 39 = byte 12 bit 7; CLASS byte 13.
        assert_eq!(rec[12], 0x88);
        assert_eq!(rec[13], 1);
        assert_eq!(Event::decode(&rec), ev);
    }

    #[test]
    fn queue_wraps_and_overflows_once() {
        let q = QueueIndex::new(1);
        assert_eq!(q.inc(1), 2);
        assert_eq!(q.inc(3), 0);
        assert!(q.full(2, 0));
        assert!(!q.full(1, 0));
        let mem = super::super::memory::FlatMemory::new(0, 4096);
        let ev = Event::config(code::C_BAD_STE, 1, None);
        let (p, r) = push(&mem, 0, 1, 0, 0, &ev);
        assert_eq!((p, r), (1, Push::Written));
        let (p, _) = push(&mem, 0, 1, p, 0, &ev);
        assert_eq!(p, 2);
        let (p, r) = push(&mem, 0, 1, p, 0, &ev);
        assert_eq!(r, Push::Overflow);
        assert_eq!(p, 2 | super::super::regs::EVENTQ_OVFLG);
        // Still pending: OVFLG is not toggled back.
        let (p2, r) = push(&mem, 0, 1, p, 0, &ev);
        assert_eq!((p2, r), (p, Push::Overflow));
    }
}
