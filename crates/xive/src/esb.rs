//! The Event State Buffer (ESB) of one source: two bits, P (pending) and Q (queued),
//! and the loads/stores of a source's two ESB pages that drive them.
//!
//! # The PQ machine (FACTS §4)
//!
//! | PQ | name | trigger | EOI |
//! |---|---|---|---|
//! | 00 | RESET | -> PENDING, **notify** | stays RESET |
//! | 10 | PENDING | -> QUEUED | -> RESET |
//! | 11 | QUEUED | stays QUEUED | -> PENDING, **notify** again |
//! | 01 | OFF | stays OFF (masked) | stays OFF |
//!
//! Level-sensitive sources (LSIs) use only P: a trigger while P is set is not
//! remembered in Q, but the source's *asserted* level is, and an EOI of a source whose
//! line is still asserted triggers it again.
//!
//! # The pages
//!
//! Each source has a *trigger page* (any store triggers, loads are invalid and return
//! all ones) and a *management page* (big-endian 8-byte accesses decoded by offset
//! within the page, [`MgmtLoad`] / [`MgmtStore`]): loads at `0x000..=0x7FF` EOI (the
//! value is 1 when the EOI forwarded a queued event, else 0),
//! `0x800..=0xBFF` get PQ, `0xC00`/`0xD00`/`0xE00`/`0xF00` (each `0xFF` wide) set PQ to
//! 00/01/10/11 and return the old value; stores at `0x000..=0x3FF` trigger,
//! `0xC00..=0xFFF` set PQ. Everything else is an invalid access (loads return all
//! ones, stores are ignored), as on QEMU's model. `0x400..=0x7FF` stores (store EOI)
//! are not offered: [`crate::hcall`] never advertises `STORE_EOI`.

/// The two ESB bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Pq {
    /// 00: idle, a trigger notifies.
    Reset,
    /// 01: off (masked): triggers are dropped.
    Off,
    /// 10: notified, not yet EOId.
    Pending,
    /// 11: notified, and triggered again since.
    Queued,
}

impl Pq {
    /// From the two-bit encoding (`P << 1 | Q`); higher bits are ignored.
    pub const fn from_bits(bits: u8) -> Pq {
        match bits & 3 {
            0 => Pq::Reset,
            1 => Pq::Off,
            2 => Pq::Pending,
            _ => Pq::Queued,
        }
    }

    /// The two-bit encoding (`P << 1 | Q`).
    pub const fn bits(self) -> u8 {
        match self {
            Pq::Reset => 0,
            Pq::Off => 1,
            Pq::Pending => 2,
            Pq::Queued => 3,
        }
    }

    /// A trigger (message-signalled semantics): the new state and whether the event
    /// is forwarded to the router.
    pub const fn trigger(self) -> (Pq, bool) {
        match self {
            Pq::Reset => (Pq::Pending, true),
            Pq::Pending | Pq::Queued => (Pq::Queued, false),
            Pq::Off => (Pq::Off, false),
        }
    }

    /// An EOI: the new state and whether a queued event is forwarded now.
    pub const fn eoi(self) -> (Pq, bool) {
        match self {
            Pq::Reset | Pq::Pending => (Pq::Reset, false),
            Pq::Queued => (Pq::Pending, true),
            Pq::Off => (Pq::Off, false),
        }
    }

    /// A trigger of a level-sensitive source: only P is used.
    pub const fn lsi_trigger(self) -> (Pq, bool) {
        match self {
            Pq::Reset => (Pq::Pending, true),
            other => (other, false),
        }
    }
}

/// Offsets in the management page (bits 11:0 of the address).
pub mod offset {
    /// Loads `0x000..=0x7FF`: EOI.
    pub const LOAD_EOI: u64 = 0x000;
    /// Loads `0x800..=0xBFF`: get PQ.
    pub const GET: u64 = 0x800;
    /// Load or store `0xC00..=0xCFF`: set PQ 00.
    pub const SET_PQ_00: u64 = 0xC00;
    /// Load or store `0xD00..=0xDFF`: set PQ 01.
    pub const SET_PQ_01: u64 = 0xD00;
    /// Load or store `0xE00..=0xEFF`: set PQ 10.
    pub const SET_PQ_10: u64 = 0xE00;
    /// Load or store `0xF00..=0xFFF`: set PQ 11.
    pub const SET_PQ_11: u64 = 0xF00;
}

/// What a load from the management page does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MgmtLoad {
    /// EOI; returns 1 when a queued event was forwarded, else 0.
    Eoi,
    /// Return the PQ bits.
    Get,
    /// Set PQ, return the old bits.
    Set(Pq),
}

/// What a store to the management page does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MgmtStore {
    /// Trigger the source.
    Trigger,
    /// Set PQ.
    Set(Pq),
    /// Not a defined offset: ignored.
    Invalid,
}

impl MgmtLoad {
    /// Decode a load at `off` (only bits 11:0 count).
    pub const fn decode(off: u64) -> MgmtLoad {
        match off & 0xFFF {
            0x000..=0x7FF => MgmtLoad::Eoi,
            0x800..=0xBFF => MgmtLoad::Get,
            o => MgmtLoad::Set(Pq::from_bits(((o >> 8) & 3) as u8)),
        }
    }
}

impl MgmtStore {
    /// Decode a store at `off` (only bits 11:0 count).
    pub const fn decode(off: u64) -> MgmtStore {
        match off & 0xFFF {
            0x000..=0x3FF => MgmtStore::Trigger,
            o @ 0xC00..=0xFFF => MgmtStore::Set(Pq::from_bits(((o >> 8) & 3) as u8)),
            _ => MgmtStore::Invalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_of_facts_4() {
        assert_eq!(Pq::Reset.trigger(), (Pq::Pending, true));
        assert_eq!(Pq::Pending.trigger(), (Pq::Queued, false));
        assert_eq!(Pq::Queued.trigger(), (Pq::Queued, false));
        assert_eq!(Pq::Off.trigger(), (Pq::Off, false));
        assert_eq!(Pq::Pending.eoi(), (Pq::Reset, false));
        assert_eq!(Pq::Queued.eoi(), (Pq::Pending, true));
        assert_eq!(Pq::Reset.eoi(), (Pq::Reset, false));
        assert_eq!(Pq::Off.eoi(), (Pq::Off, false));
        assert_eq!(Pq::Pending.lsi_trigger(), (Pq::Pending, false));
    }

    #[test]
    fn page_offsets_decode() {
        assert_eq!(MgmtLoad::decode(0), MgmtLoad::Eoi);
        assert_eq!(MgmtLoad::decode(0x7ff), MgmtLoad::Eoi);
        assert_eq!(MgmtLoad::decode(0x800), MgmtLoad::Get);
        assert_eq!(MgmtLoad::decode(0xc00), MgmtLoad::Set(Pq::Reset));
        assert_eq!(MgmtLoad::decode(0xd00), MgmtLoad::Set(Pq::Off));
        assert_eq!(MgmtLoad::decode(0xe08), MgmtLoad::Set(Pq::Pending));
        assert_eq!(MgmtLoad::decode(0xf00), MgmtLoad::Set(Pq::Queued));
        assert_eq!(MgmtStore::decode(0x3f8), MgmtStore::Trigger);
        assert_eq!(MgmtStore::decode(0x400), MgmtStore::Invalid);
        assert_eq!(MgmtStore::decode(0x800), MgmtStore::Invalid);
        assert_eq!(MgmtStore::decode(0xd00), MgmtStore::Set(Pq::Off));
        for b in 0..4 {
            assert_eq!(Pq::from_bits(b).bits(), b);
        }
    }
}
