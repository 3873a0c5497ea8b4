//! The MSI-X capability (ID 0x11) and the table / pending-bit array it points to.
//!
//! Capability layout: +2 message control (bits 0..10 table size - 1, read-only; bit 14
//! function mask; bit 15 enable), +4 table offset | BAR indicator (BIR, low 3 bits),
//! +8 PBA offset | BIR. The table lives in a memory BAR: 16-byte entries (address low,
//! address high, data, vector control with bit 0 = mask). The PBA holds one pending bit
//! per vector in 64-bit words; it is read-only to the driver.
//!
//! [`MsixTable`] emulates both arrays for the BAR handler: accesses must be 4 or 8
//! bytes, naturally aligned (as the specification requires of software); others are
//! refused with [`PciError::Unaligned`]. Entries start masked, as after reset. A vector
//! raised while masked (by its entry or by the function mask) sets its pending bit, and
//! [`MsixTable::take_deliverable`] hands those back once unmasked.
//!
//! With VFIO the VMM virtualises the table and delivers by eventfd (see
//! [`super::intr`]); the table here is what a driver reading the BAR sees.

use super::config::PciConfig;
use super::msi::MsiMessage;
use super::{cap_id, check_range, PciError};

const CTRL: usize = 2;
const TABLE: usize = 4;
const PBA: usize = 8;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const CTRL_ENABLE: u16 = 1 << 15;

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Most vectors an MSI-X capability can describe.
pub const MAX_VECTORS: u16 = 2048;

/// Handle of an MSI-X capability (offset and where its arrays live).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    offset: usize,
    vectors: u16,
    table_bar: usize,
    table_offset: u32,
    pba_bar: usize,
    pba_offset: u32,
}

fn pba_len(vectors: u16) -> u64 {
    u64::from(vectors).div_ceil(64) * 8
}

impl PciConfig {
    /// Add an MSI-X capability for `vectors` (1..=2048) vectors with the table at
    /// `table_offset` of BAR `table_bar` and the PBA at `pba_offset` of BAR `pba_bar`.
    /// The BARs must be declared memory BARs, the offsets 8-byte aligned, both arrays
    /// inside their BAR and not overlapping. At most one per function.
    pub fn add_msix(
        &mut self,
        vectors: u16,
        table_bar: usize,
        table_offset: u32,
        pba_bar: usize,
        pba_offset: u32,
    ) -> Result<MsixCap, PciError> {
        let err = |reason: String| PciError::Capability {
            id: cap_id::MSIX.into(),
            reason,
        };
        if self.msix.is_some() {
            return Err(err("the function already has an MSI-X capability".into()));
        }
        if vectors == 0 || vectors > MAX_VECTORS {
            return Err(err(format!("{vectors} vectors: MSI-X offers 1..=2048")));
        }
        let table_len = u64::from(vectors) * ENTRY_SIZE;
        let pba_len = pba_len(vectors);
        for (what, bar, off, len) in [
            ("table", table_bar, table_offset, table_len),
            ("PBA", pba_bar, pba_offset, pba_len),
        ] {
            let b = self
                .bar(bar)
                .filter(|b| b.kind().is_memory())
                .ok_or_else(|| err(format!("the {what} BAR {bar} is not a declared memory BAR")))?;
            if off % 8 != 0 {
                return Err(err(format!(
                    "the {what} offset {off:#x} is not 8-byte aligned"
                )));
            }
            if u64::from(off) + len > b.size() {
                return Err(err(format!(
                    "the {what} ({len} bytes at {off:#x}) does not fit in BAR {bar} ({:#x} bytes)",
                    b.size()
                )));
            }
        }
        if table_bar == pba_bar {
            let (t, p) = (u64::from(table_offset), u64::from(pba_offset));
            if t < p + pba_len && p < t + table_len {
                return Err(err("the table and the PBA overlap".into()));
            }
        }
        let off = self.add_capability(cap_id::MSIX, 12)?;
        self.set_u16(off + CTRL, vectors - 1);
        self.set_wmask_u16(off + CTRL, CTRL_ENABLE | CTRL_FUNCTION_MASK);
        self.set_u32(off + TABLE, table_offset | table_bar as u32);
        self.set_u32(off + PBA, pba_offset | pba_bar as u32);
        let cap = MsixCap {
            offset: off,
            vectors,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
        };
        self.msix = Some(cap);
        Ok(cap)
    }
}

impl MsixCap {
    /// The handle of an MSI-X capability found in a configuration space this crate did
    /// not build (a VMM reading an assigned device's): `offset` of the header and the
    /// raw message control, table and PBA registers. Checked like
    /// [`PciConfig::add_msix`] except for the BAR sizes, which the caller checks against
    /// the device's regions: BIRs 0..=5, both arrays inside 32-bit offsets and not
    /// overlapping when they share a BAR.
    pub fn from_registers(
        offset: usize,
        control: u16,
        table: u32,
        pba: u32,
    ) -> Result<MsixCap, PciError> {
        let err = |reason: String| PciError::Capability {
            id: cap_id::MSIX.into(),
            reason,
        };
        let vectors = (control & 0x7ff) + 1;
        let (table_bar, table_offset) = ((table & 7) as usize, table & !7);
        let (pba_bar, pba_offset) = ((pba & 7) as usize, pba & !7);
        let cap = MsixCap {
            offset,
            vectors,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
        };
        if table_bar > 5 || pba_bar > 5 {
            return Err(err(format!(
                "BAR indicator {table_bar}/{pba_bar} is not a BAR"
            )));
        }
        let (t, p) = (cap.table_offset(), cap.pba_offset());
        if t + cap.table_len() > 1 << 32 || p + cap.pba_len() > 1 << 32 {
            return Err(err("the table or the PBA ends beyond 4 GiB".into()));
        }
        if table_bar == pba_bar && t < p + cap.pba_len() && p < t + cap.table_len() {
            return Err(err("the table and the PBA overlap".into()));
        }
        Ok(cap)
    }

    /// Offset of the capability header.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.vectors
    }
    /// BAR holding the table.
    pub fn table_bar(&self) -> usize {
        self.table_bar
    }
    /// Offset of the table in its BAR.
    pub fn table_offset(&self) -> u64 {
        self.table_offset.into()
    }
    /// Size of the table in bytes.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * ENTRY_SIZE
    }
    /// BAR holding the PBA.
    pub fn pba_bar(&self) -> usize {
        self.pba_bar
    }
    /// Offset of the PBA in its BAR.
    pub fn pba_offset(&self) -> u64 {
        self.pba_offset.into()
    }
    /// Size of the PBA in bytes.
    pub fn pba_len(&self) -> u64 {
        pba_len(self.vectors)
    }
    /// MSI-X is enabled.
    pub fn enabled(&self, cfg: &PciConfig) -> bool {
        cfg.read_u16(self.offset + CTRL) & CTRL_ENABLE != 0
    }
    /// Every vector is masked by the function mask.
    pub fn function_masked(&self, cfg: &PciConfig) -> bool {
        cfg.read_u16(self.offset + CTRL) & CTRL_FUNCTION_MASK != 0
    }
    /// A fresh table sized for this capability.
    pub fn new_table(&self) -> MsixTable {
        MsixTable::with_vectors(self.vectors)
    }
}

/// Where a BAR access lands, as found by [`MsixCap::locate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixHit {
    /// Inside the table, at this offset from its start.
    Table(u64),
    /// Inside the PBA, at this offset from its start.
    Pba(u64),
}

impl MsixCap {
    /// Where an access of `len` bytes at `offset` of BAR `bar` lands: entirely inside
    /// the table or the PBA, or `None` (elsewhere, or only partly inside one of them).
    ///
    /// The location of both arrays is fixed when the capability is added, so a device
    /// keeps a copy of this handle next to its lock and routes a BAR access without
    /// taking the lock; only an access that hits the table or PBA needs the
    /// [`MsixTable`] behind it.
    pub fn locate(&self, bar: usize, offset: u64, len: usize) -> Option<MsixHit> {
        let end = offset.checked_add(len as u64)?;
        let inside = |start: u64, size: u64| offset >= start && end <= start + size;
        if bar == self.table_bar && inside(self.table_offset(), self.table_len()) {
            return Some(MsixHit::Table(offset - self.table_offset()));
        }
        if bar == self.pba_bar && inside(self.pba_offset(), self.pba_len()) {
            return Some(MsixHit::Pba(offset - self.pba_offset()));
        }
        None
    }

    /// True when an access of `len` bytes at `offset` of BAR `bar` touches any byte of
    /// the table or the PBA (lock-free, like [`MsixCap::locate`]).
    pub fn overlaps(&self, bar: usize, offset: u64, len: usize) -> bool {
        let end = offset.saturating_add(len as u64);
        let touches = |start: u64, size: u64| offset < start + size && end > start;
        (bar == self.table_bar && touches(self.table_offset(), self.table_len()))
            || (bar == self.pba_bar && touches(self.pba_offset(), self.pba_len()))
    }
}

/// One table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsixEntry {
    /// Message address, low dword.
    pub addr_lo: u32,
    /// Message address, high dword.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl MsixEntry {
    /// The vector is masked.
    pub fn masked(&self) -> bool {
        self.control & 1 != 0
    }
    /// The message it sends.
    pub fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

/// Driver write masks of the four dwords of an entry.
const ENTRY_WMASK: [u32; 4] = [0xffff_fffc, 0xffff_ffff, 0xffff_ffff, 0x1];

/// The MSI-X table and PBA of one function. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsixTable {
    entries: Vec<[u32; 4]>,
    pba: Vec<u64>,
}

fn check_access(what: &'static str, offset: u64, len: usize, size: u64) -> Result<usize, PciError> {
    let off = check_range(
        what,
        offset,
        len,
        usize::try_from(size).unwrap_or(usize::MAX),
    )?;
    if !matches!(len, 4 | 8) || off % len != 0 {
        return Err(PciError::Unaligned {
            what,
            offset,
            len,
            allowed: "4 or 8",
        });
    }
    Ok(off)
}

impl MsixTable {
    /// A table of `vectors` vectors (clamped to 1..=2048), every entry masked.
    pub fn with_vectors(vectors: u16) -> Self {
        let n = vectors.clamp(1, MAX_VECTORS);
        MsixTable {
            entries: vec![[0, 0, 0, 1]; n.into()],
            pba: vec![0; usize::from(n).div_ceil(64)],
        }
    }
    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }
    /// Size of the table in bytes.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }
    /// Size of the PBA in bytes.
    pub fn pba_len(&self) -> u64 {
        self.pba.len() as u64 * 8
    }
    /// Back to the reset state: every entry zero and masked, nothing pending.
    pub fn reset(&mut self) {
        self.entries.iter_mut().for_each(|e| *e = [0, 0, 0, 1]);
        self.pba.iter_mut().for_each(|p| *p = 0);
    }
    /// Entry `vector`.
    pub fn entry(&self, vector: u16) -> Option<MsixEntry> {
        self.entries.get(usize::from(vector)).map(|e| MsixEntry {
            addr_lo: e[0],
            addr_hi: e[1],
            data: e[2],
            control: e[3],
        })
    }
    /// Entry `vector` is masked (true for a vector beyond the table).
    pub fn masked(&self, vector: u16) -> bool {
        self.entry(vector).is_none_or(|e| e.masked())
    }
    /// Pending bit of `vector`.
    pub fn pending(&self, vector: u16) -> bool {
        self.pba
            .get(usize::from(vector) / 64)
            .is_some_and(|w| w & (1 << (vector % 64)) != 0)
    }
    /// Device side: set or clear the pending bit of `vector`.
    pub fn set_pending(&mut self, vector: u16, pending: bool) {
        if usize::from(vector) >= self.entries.len() {
            return;
        }
        if let Some(w) = self.pba.get_mut(usize::from(vector) / 64) {
            let bit = 1u64 << (vector % 64);
            if pending {
                *w |= bit
            } else {
                *w &= !bit
            }
        }
    }
    /// Device side: raise `vector`. Returns the message to send when the vector is not
    /// masked (by its entry or `function_masked`); otherwise records it as pending.
    pub fn raise(&mut self, vector: u16, function_masked: bool) -> Option<MsiMessage> {
        let e = self.entry(vector)?;
        if function_masked || e.masked() {
            self.set_pending(vector, true);
            return None;
        }
        Some(e.message())
    }
    /// Vectors that are pending and no longer masked; their pending bits are cleared
    /// (the caller sends them). Call after a table write or a function-mask change.
    pub fn take_deliverable(&mut self, function_masked: bool) -> Vec<(u16, MsiMessage)> {
        if function_masked {
            return Vec::new();
        }
        let mut out = Vec::new();
        for v in 0..self.vectors() {
            if self.pending(v) && !self.masked(v) {
                self.set_pending(v, false);
                if let Some(e) = self.entry(v) {
                    out.push((v, e.message()));
                }
            }
        }
        out
    }

    /// A driver read of the table at `offset` (relative to the table start).
    pub fn read_table(&self, offset: u64, buf: &mut [u8]) -> Result<(), PciError> {
        let off = check_access("MSI-X table", offset, buf.len(), self.table_len())?;
        for (i, chunk) in buf.chunks_exact_mut(4).enumerate() {
            let dw = off / 4 + i;
            chunk.copy_from_slice(&self.entries[dw / 4][dw % 4].to_le_bytes());
        }
        Ok(())
    }
    /// A driver write of the table at `offset` (relative to the table start). Reserved
    /// bits keep their value.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Result<(), PciError> {
        let off = check_access("MSI-X table", offset, data.len(), self.table_len())?;
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let dw = off / 4 + i;
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let m = ENTRY_WMASK[dw % 4];
            let e = &mut self.entries[dw / 4][dw % 4];
            *e = (*e & !m) | (v & m);
        }
        Ok(())
    }
    /// A driver read of the PBA at `offset` (relative to the PBA start).
    pub fn read_pba(&self, offset: u64, buf: &mut [u8]) -> Result<(), PciError> {
        let off = check_access("MSI-X PBA", offset, buf.len(), self.pba_len())?;
        for (i, chunk) in buf.chunks_exact_mut(4).enumerate() {
            let dw = off / 4 + i;
            let word = self.pba[dw / 2];
            let v = if dw % 2 == 0 {
                word as u32
            } else {
                (word >> 32) as u32
            };
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }
    /// A driver write of the PBA: checked like a read, then ignored (read-only).
    pub fn write_pba(&mut self, offset: u64, data: &[u8]) -> Result<(), PciError> {
        check_access("MSI-X PBA", offset, data.len(), self.pba_len())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::BarKind;

    fn rd(t: &MsixTable, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read_table(off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn from_registers_checks_bars_and_overlap() {
        let c = MsixCap::from_registers(0x50, 7, 0x800, 0xc00 | 2).unwrap();
        assert_eq!(
            (c.offset(), c.vectors(), c.table_bar(), c.table_offset()),
            (0x50, 8, 0, 0x800)
        );
        assert_eq!((c.pba_bar(), c.pba_offset(), c.pba_len()), (2, 0xc00, 8));
        assert_eq!(c.locate(0, 0x810, 4), Some(MsixHit::Table(0x10)));
        assert!(MsixCap::from_registers(0x50, 0, 6, 0).is_err(), "BIR 6");
        assert!(
            MsixCap::from_registers(0x50, 7, 0x800, 0x810).is_err(),
            "overlap"
        );
        assert!(MsixCap::from_registers(0x50, 0x7ff, 0xffff_f000, 0x1).is_err());
    }

    #[test]
    fn capability_checks() {
        let mut c = PciConfig::new();
        c.add_bar(0, BarKind::Mmio32, 4096).unwrap();
        c.add_bar(1, BarKind::Io, 32).unwrap();
        assert!(c.add_msix(0, 0, 0, 0, 0x800).is_err());
        assert!(c.add_msix(2049, 0, 0, 0, 0x800).is_err());
        assert!(c.add_msix(4, 1, 0, 0, 0x800).is_err(), "I/O BAR");
        assert!(c.add_msix(4, 2, 0, 0, 0x800).is_err(), "undeclared BAR");
        assert!(c.add_msix(4, 0, 4, 0, 0x800).is_err(), "unaligned");
        assert!(c.add_msix(4, 0, 0, 0, 0x20).is_err(), "overlap");
        assert!(
            c.add_msix(4, 0, 4096 - 32, 0, 0x800).is_err(),
            "past the BAR"
        );
        assert!(c.add_msix(4, 0, u32::MAX - 7, 0, 0x800).is_err());
        let m = c.add_msix(4, 0, 0, 0, 0x800).unwrap();
        assert!(c.add_msix(4, 0, 0x100, 0, 0x900).is_err(), "only one");
        assert_eq!(c.msix(), Some(m));
        let o = m.offset();
        assert_eq!(c.read_u8(o), cap_id::MSIX);
        assert_eq!(c.read_u16(o + 2), 3);
        assert_eq!(c.read_u32(o + 4), 0);
        assert_eq!(c.read_u32(o + 8), 0x800);
        assert_eq!((m.table_len(), m.pba_len()), (64, 8));
        assert!(!m.enabled(&c) && !m.function_masked(&c));
        c.write(o as u64 + 2, &0xffffu16.to_le_bytes()).unwrap();
        assert!(m.enabled(&c) && m.function_masked(&c));
        assert_eq!(c.read_u16(o + 2), 0xc003, "table size is read-only");
        c.write(o as u64 + 4, &0xffff_ffffu32.to_le_bytes())
            .unwrap();
        assert_eq!(c.read_u32(o + 4), 0, "table offset is read-only");
    }

    #[test]
    fn locate_is_exact() {
        let mut c = PciConfig::new();
        c.add_bar(0, BarKind::Mmio32, 4096).unwrap();
        c.add_bar(2, BarKind::Mmio32, 4096).unwrap();
        let m = c.add_msix(3, 0, 0x800, 2, 0x40).unwrap();
        assert_eq!(m.locate(0, 0x800, 4), Some(MsixHit::Table(0)));
        assert_eq!(m.locate(0, 0x828, 8), Some(MsixHit::Table(0x28)));
        assert_eq!(m.locate(0, 0x82c, 4), Some(MsixHit::Table(0x2c)));
        assert_eq!(m.locate(0, 0x82c, 8), None, "straddles the table end");
        assert_eq!(m.locate(0, 0x7fc, 8), None, "straddles the table start");
        assert_eq!(m.locate(0, 0x40, 4), None, "the PBA is in BAR 2");
        assert_eq!(m.locate(2, 0x800, 4), None, "the table is in BAR 0");
        assert_eq!(m.locate(2, 0x44, 4), Some(MsixHit::Pba(4)));
        assert_eq!(m.locate(2, 0x48, 4), None);
        assert_eq!(m.locate(0, u64::MAX - 3, 8), None, "no overflow");
        assert_eq!(m.locate(0, u64::MAX, usize::MAX), None);
        assert!(m.overlaps(0, 0x7fc, 8) && m.overlaps(0, 0x82c, 8));
        assert!(m.overlaps(2, 0x3c, 8) && !m.overlaps(2, 0x38, 8));
        assert!(!m.overlaps(0, 0x830, 4) && !m.overlaps(1, 0x800, 4));
        assert!(!m.overlaps(0, u64::MAX, 8));
        // Against the definition, for every small access around both arrays.
        for bar in 0..3usize {
            for offset in 0x0..0x900u64 {
                for len in [0usize, 1, 2, 4, 8, 16] {
                    let end = offset + len as u64;
                    let want = if bar == 0 && offset >= 0x800 && end <= 0x830 {
                        Some(MsixHit::Table(offset - 0x800))
                    } else if bar == 2 && offset >= 0x40 && end <= 0x48 {
                        Some(MsixHit::Pba(offset - 0x40))
                    } else {
                        None
                    };
                    assert_eq!(m.locate(bar, offset, len), want, "{bar} {offset:#x} {len}");
                }
            }
        }
    }

    #[test]
    fn table_masks_and_pending() {
        let mut t = MsixTable::with_vectors(65);
        assert_eq!((t.table_len(), t.pba_len()), (65 * 16, 16));
        assert!(t.masked(0) && t.masked(64) && t.masked(65));
        t.write_table(16, &0xfee0_0003u32.to_le_bytes()).unwrap();
        t.write_table(20, &1u32.to_le_bytes()).unwrap();
        t.write_table(24, &0x4021u32.to_le_bytes()).unwrap();
        assert_eq!(rd(&t, 16), 0xfee0_0000, "address bits 1:0 are reserved");
        assert_eq!(rd(&t, 28), 1);
        // Raise while masked: pending.
        assert_eq!(t.raise(1, false), None);
        assert!(t.pending(1));
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba).unwrap();
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        t.write_pba(0, &[0; 8]).unwrap();
        assert!(t.pending(1), "PBA is read-only");
        // Unmask with a qword write over data + control; reserved control bits stay 0.
        let mut q = [0u8; 8];
        q[..4].copy_from_slice(&0x4021u32.to_le_bytes());
        q[4..].copy_from_slice(&0xffff_fffeu32.to_le_bytes());
        t.write_table(24, &q).unwrap();
        assert_eq!(rd(&t, 28), 0);
        assert!(
            t.take_deliverable(true).is_empty(),
            "function mask holds it"
        );
        let d = t.take_deliverable(false);
        assert_eq!(
            d,
            vec![(
                1,
                MsiMessage {
                    address: 0x1_fee0_0000,
                    data: 0x4021
                }
            )]
        );
        assert!(!t.pending(1));
        assert!(t.raise(1, false).is_some());
        assert_eq!(t.raise(1, true), None);
        assert!(t.pending(1));
        t.set_pending(64, true);
        let mut hi = [0u8; 4];
        t.read_pba(8, &mut hi).unwrap();
        assert_eq!(u32::from_le_bytes(hi), 1);
        t.set_pending(65, true);
        assert!(!t.pending(65));
        assert_eq!(t.raise(100, false), None);
        t.reset();
        assert!(t.masked(1) && !t.pending(1) && !t.pending(64));
    }

    #[test]
    fn hostile_table_accesses() {
        let mut t = MsixTable::with_vectors(2);
        let mut b = [0u8; 16];
        assert!(t.read_table(32, &mut b[..4]).is_err());
        assert!(t.read_table(28, &mut b[..8]).is_err());
        assert!(t.read_table(2, &mut b[..4]).is_err());
        assert!(
            t.read_table(4, &mut b[..8]).is_err(),
            "qword must be 8-aligned"
        );
        assert!(t.read_table(0, &mut b[..2]).is_err());
        assert!(t.read_table(0, &mut b).is_err());
        assert!(t.read_table(u64::MAX - 3, &mut b[..4]).is_err());
        assert!(t.write_table(u64::MAX, &[0; 4]).is_err());
        assert!(t.write_table(0, &[0; 1]).is_err());
        assert!(t.read_pba(8, &mut b[..4]).is_err());
        assert!(t.write_pba(4, &[0; 8]).is_err());
        assert_eq!(MsixTable::with_vectors(0).vectors(), 1);
        assert_eq!(MsixTable::with_vectors(u16::MAX).vectors(), 2048);
    }
}
