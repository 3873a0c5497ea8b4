//! The MSI capability (ID 5), always in its 64-bit address form.
//!
//! Layout from the capability header: +2 message control, +4 address low, +8 address
//! high, +0xc data, and with per-vector masking +0x10 mask bits, +0x14 pending bits.
//! Message control: bit 0 enable, bits 1..3 multiple-message capable (log2, read-only),
//! bits 4..6 multiple-message enable (log2), bit 7 64-bit capable, bit 8 per-vector
//! masking capable. Vector `v` is sent as the programmed data with its low bits replaced
//! by `v`.
//!
//! Multiple Message Capable / Enable encode 1, 2, 4, 8, 16 or 32 vectors as log2 (0..=5);
//! 6 and 7 are reserved. The field a driver writes is stored as written (it is a plain
//! read-write field), but the vectors the function uses are [`MsiEnable`]: the enable
//! value clamped to what the function is capable of (and to 32), so a reserved value or
//! one above the capability never enables more than the function asks for. The number of
//! low data bits a vector replaces is log2 of that power of two, however many of the
//! vectors a VMM actually wires.
//!
//! [`MsiCap`] is a small copyable handle (offset and shape); its accessors read the
//! current values from the [`PciConfig`] that holds it.

use super::config::PciConfig;
use super::{cap_id, PciError};

const CTRL: usize = 2;
const ADDR_LO: usize = 4;
const ADDR_HI: usize = 8;
const DATA: usize = 0xc;
const MASK: usize = 0x10;
const PENDING: usize = 0x14;

const CTRL_ENABLE: u16 = 1 << 0;
const CTRL_64BIT: u16 = 1 << 7;
const CTRL_PVM: u16 = 1 << 8;

/// One MSI message: a DWORD write of `data` to `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// Address.
    pub address: u64,
    /// Data.
    pub data: u32,
}

/// Largest log2 of an MSI vector count (32 vectors); 6 and 7 are reserved encodings.
const LOG2_MAX: u8 = 5;

/// The vectors an enabled MSI function uses: a power of two 1..=32 (see the module
/// documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiEnable {
    log2: u8,
}

impl MsiEnable {
    /// From the Multiple Message Enable and Multiple Message Capable fields (log2
    /// encodings, any value 0..=7; higher bits are ignored): the enable value clamped to
    /// the capable one and to 32 vectors.
    pub fn new(multiple_message_enable: u8, multiple_message_capable: u8) -> Self {
        let mme = multiple_message_enable & 0b111;
        let mmc = (multiple_message_capable & 0b111).min(LOG2_MAX);
        MsiEnable { log2: mme.min(mmc) }
    }

    /// From a message control register value: `None` while MSI is disabled.
    pub fn from_control(control: u16) -> Option<Self> {
        if control & CTRL_ENABLE == 0 {
            return None;
        }
        Some(Self::new((control >> 4) as u8, (control >> 1) as u8))
    }

    /// log2 of the vector count (0..=5).
    pub fn log2(self) -> u8 {
        self.log2
    }

    /// Vectors enabled: 1, 2, 4, 8, 16 or 32.
    pub fn count(self) -> u32 {
        1 << self.log2
    }

    /// The message data of `vector`: the programmed `data` with its low log2(count)
    /// bits replaced by the vector number; `None` for a vector beyond the count.
    pub fn data(self, data: u16, vector: u32) -> Option<u32> {
        let n = self.count();
        (vector < n).then(|| u32::from(data) & !(n - 1) | vector)
    }
}

/// Handle of an MSI capability. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCap {
    offset: usize,
    /// log2 of the vectors the function asks for.
    log2_capable: u8,
    per_vector_mask: bool,
}

impl PciConfig {
    /// Add an MSI capability for `vectors` vectors (1, 2, 4, 8, 16 or 32), with or
    /// without per-vector masking. At most one per function.
    pub fn add_msi(&mut self, vectors: u32, per_vector_mask: bool) -> Result<MsiCap, PciError> {
        let err = |reason: String| PciError::Capability {
            id: cap_id::MSI.into(),
            reason,
        };
        if self.msi.is_some() {
            return Err(err("the function already has an MSI capability".into()));
        }
        if !vectors.is_power_of_two() || vectors > 32 {
            return Err(err(format!(
                "{vectors} vectors: MSI offers 1, 2, 4, 8, 16 or 32"
            )));
        }
        let len = if per_vector_mask { 0x18 } else { 0x0e };
        let off = self.add_capability(cap_id::MSI, len)?;
        let log2 = vectors.trailing_zeros() as u8;
        let ctrl = CTRL_64BIT | u16::from(log2) << 1 | if per_vector_mask { CTRL_PVM } else { 0 };
        self.set_u16(off + CTRL, ctrl);
        self.set_wmask_u16(off + CTRL, CTRL_ENABLE | 0b111 << 4);
        self.set_wmask_u32(off + ADDR_LO, 0xffff_fffc);
        self.set_wmask_u32(off + ADDR_HI, 0xffff_ffff);
        self.set_wmask_u16(off + DATA, 0xffff);
        if per_vector_mask {
            let bits = if vectors == 32 {
                u32::MAX
            } else {
                (1u32 << vectors) - 1
            };
            self.set_wmask_u32(off + MASK, bits);
        }
        let cap = MsiCap {
            offset: off,
            log2_capable: log2,
            per_vector_mask,
        };
        self.msi = Some(cap);
        Ok(cap)
    }
}

impl MsiCap {
    /// Offset of the capability header.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Vectors the function asks for (multiple-message capable).
    pub fn vectors_capable(&self) -> u32 {
        1 << self.log2_capable
    }
    /// Per-vector masking is implemented.
    pub fn has_per_vector_mask(&self) -> bool {
        self.per_vector_mask
    }
    /// Message control.
    pub fn control(&self, cfg: &PciConfig) -> u16 {
        cfg.read_u16(self.offset + CTRL)
    }
    /// MSI is enabled.
    pub fn enabled(&self, cfg: &PciConfig) -> bool {
        self.control(cfg) & CTRL_ENABLE != 0
    }
    /// Message address.
    pub fn address(&self, cfg: &PciConfig) -> u64 {
        u64::from(cfg.read_u32(self.offset + ADDR_HI)) << 32
            | u64::from(cfg.read_u32(self.offset + ADDR_LO))
    }
    /// Message data.
    pub fn data(&self, cfg: &PciConfig) -> u16 {
        cfg.read_u16(self.offset + DATA)
    }
    /// The vectors in use, `None` while MSI is disabled. A multiple-message enable
    /// larger than the capability (or reserved) is clamped to it.
    pub fn enable(&self, cfg: &PciConfig) -> Option<MsiEnable> {
        let ctrl = self.control(cfg);
        if ctrl & CTRL_ENABLE == 0 {
            return None;
        }
        Some(MsiEnable::new((ctrl >> 4) as u8, self.log2_capable))
    }
    /// Vectors enabled by the driver (0 while MSI is disabled). A multiple-message
    /// enable larger than the capability (or reserved) is clamped to it.
    pub fn vectors_enabled(&self, cfg: &PciConfig) -> u32 {
        self.enable(cfg).map_or(0, MsiEnable::count)
    }
    /// Vector `vector` is masked (always false without per-vector masking; true for a
    /// vector beyond the capability).
    pub fn masked(&self, cfg: &PciConfig, vector: u32) -> bool {
        if vector >= self.vectors_capable() {
            return true;
        }
        self.per_vector_mask && cfg.read_u32(self.offset + MASK) & (1 << vector) != 0
    }
    /// Pending bit of `vector` (false without per-vector masking).
    pub fn pending(&self, cfg: &PciConfig, vector: u32) -> bool {
        self.per_vector_mask
            && vector < self.vectors_capable()
            && cfg.read_u32(self.offset + PENDING) & (1 << vector) != 0
    }
    /// Device side: set or clear the pending bit of `vector` (no-op without per-vector
    /// masking or for a vector beyond the capability).
    pub fn set_pending(&self, cfg: &mut PciConfig, vector: u32, pending: bool) {
        if !self.per_vector_mask || vector >= self.vectors_capable() {
            return;
        }
        let p = cfg.read_u32(self.offset + PENDING);
        let bit = 1u32 << vector;
        cfg.set_u32(
            self.offset + PENDING,
            if pending { p | bit } else { p & !bit },
        );
    }
    /// The message for `vector`, when MSI is enabled and the vector is among the enabled
    /// ones (masking is not considered; see [`MsiCap::masked`]).
    pub fn message(&self, cfg: &PciConfig, vector: u32) -> Option<MsiMessage> {
        let data = self.enable(cfg)?.data(self.data(cfg), vector)?;
        Some(MsiMessage {
            address: self.address(cfg),
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(c: &mut PciConfig, off: usize, v: &[u8]) {
        c.write(off as u64, v).unwrap();
    }

    #[test]
    fn enable_vectors_and_message() {
        let mut c = PciConfig::new();
        assert!(c.add_msi(3, false).is_err());
        assert!(c.add_msi(64, false).is_err());
        assert!(c.add_msi(0, false).is_err());
        let m = c.add_msi(8, false).unwrap();
        assert!(c.add_msi(1, false).is_err(), "only one MSI capability");
        assert_eq!(c.msi(), Some(m));
        let o = m.offset();
        assert_eq!(c.read_u8(o), cap_id::MSI);
        assert_eq!(m.control(&c), CTRL_64BIT | 3 << 1);
        assert!(!m.enabled(&c));
        assert_eq!(m.vectors_enabled(&c), 0);
        assert_eq!(m.message(&c, 0), None);
        w(&mut c, o + 4, &0xfee0_1003u32.to_le_bytes());
        w(&mut c, o + 8, &0x1u32.to_le_bytes());
        w(&mut c, o + 0xc, &0x4041u16.to_le_bytes());
        // Enable with 4 vectors; the read-only capable field cannot be changed.
        w(&mut c, o + 2, &0xffffu16.to_le_bytes());
        assert_eq!(m.control(&c), CTRL_64BIT | 3 << 1 | 0b111 << 4 | 1);
        w(&mut c, o + 2, &0x0021u16.to_le_bytes());
        assert!(m.enabled(&c));
        assert_eq!(m.control(&c) & 0x8e, CTRL_64BIT | 3 << 1);
        assert_eq!(m.vectors_enabled(&c), 4);
        assert_eq!(
            m.address(&c),
            0x1_fee0_1000,
            "low address bits are read-only"
        );
        assert_eq!(
            m.message(&c, 3),
            Some(MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4043
            })
        );
        assert_eq!(m.message(&c, 4), None);
        // MME beyond MMC is clamped.
        w(&mut c, o + 2, &0x0071u16.to_le_bytes());
        assert_eq!(m.vectors_enabled(&c), 8);
        assert!(!m.masked(&c, 0), "no per-vector masking");
        assert!(m.masked(&c, 8));
        m.set_pending(&mut c, 0, true);
        assert!(!m.pending(&c, 0));
    }

    /// Every Multiple Message Enable value 0..=7 against every capability: the count is
    /// the enable value clamped to the capability, and vector i's data has exactly the
    /// low log2(count) bits replaced by i.
    #[test]
    fn every_mme_against_every_mmc() {
        for log2_cap in 0..=5u8 {
            let mut c = PciConfig::new();
            let m = c.add_msi(1 << log2_cap, false).unwrap();
            let o = m.offset();
            for data in [0x0000u16, 0x4041, 0xffff] {
                w(&mut c, o + 0xc, &data.to_le_bytes());
                for mme in 0..=7u16 {
                    w(&mut c, o + 2, &(1 | mme << 4).to_le_bytes());
                    assert_eq!(
                        (m.control(&c) >> 4) & 7,
                        mme,
                        "the field reads back as written"
                    );
                    let log2 = (mme as u8).min(log2_cap);
                    let n = 1u32 << log2;
                    assert_eq!(m.vectors_enabled(&c), n, "MMC {log2_cap} MME {mme}");
                    assert_eq!(m.enable(&c).map(MsiEnable::log2), Some(log2));
                    for v in 0..n {
                        let want = (u32::from(data) >> log2 << log2) | v;
                        assert_eq!(
                            m.message(&c, v).map(|msg| msg.data),
                            Some(want),
                            "MMC {log2_cap} MME {mme} data {data:#x} vector {v}"
                        );
                        // Bits above the vector field are the programmed ones.
                        assert_eq!(want & !(n - 1), u32::from(data) & !(n - 1));
                    }
                    assert_eq!(m.message(&c, n), None);
                    assert_eq!(m.message(&c, 32), None);
                    assert_eq!(m.message(&c, u32::MAX), None);
                }
                w(&mut c, o + 2, &0x0070u16.to_le_bytes());
                assert_eq!(m.vectors_enabled(&c), 0, "disabled");
                assert_eq!(m.message(&c, 0), None);
            }
        }
    }

    /// The raw helper, as a VMM uses it on a shadow control register: reserved
    /// capability encodings (6, 7) count as 32 vectors, never more; the data of a vector
    /// depends on the enabled count, not on how many vectors a caller wired.
    #[test]
    fn msi_enable_from_raw_control() {
        for mmc in 0..=7u16 {
            for mme in 0..=7u16 {
                let ctrl = CTRL_64BIT | mmc << 1 | mme << 4;
                assert_eq!(MsiEnable::from_control(ctrl), None, "disabled");
                let e = MsiEnable::from_control(ctrl | CTRL_ENABLE).unwrap();
                let log2 = mme.min(mmc).min(5) as u8;
                assert_eq!(e, MsiEnable::new(mme as u8, mmc as u8));
                assert_eq!(e.log2(), log2);
                assert_eq!(e.count(), 1 << log2);
                assert!(e.count() <= 32);
                assert_eq!(e.data(0xffff, e.count()), None);
                assert_eq!(e.data(0xffff, u32::MAX), None);
                for v in 0..e.count() {
                    assert_eq!(e.data(0xffff, v), Some(0xffff & !(e.count() - 1) | v));
                    assert_eq!(e.data(0x0000, v), Some(v));
                }
            }
        }
        // Eight vectors enabled: vector 2 replaces three low bits, whatever the data.
        let e = MsiEnable::new(3, 5);
        assert_eq!(e.data(0x4047, 2), Some(0x4042));
        assert_eq!(e.data(0x4040, 7), Some(0x4047));
        // Higher bits of the raw fields are ignored.
        assert_eq!(MsiEnable::new(0xfb, 0xff).count(), 8);
    }

    #[test]
    fn per_vector_mask_and_pending() {
        let mut c = PciConfig::new();
        let m = c.add_msi(2, true).unwrap();
        let o = m.offset();
        assert!(m.has_per_vector_mask());
        w(&mut c, o + 0x10, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(
            c.read_u32(o + 0x10),
            0b11,
            "only implemented vectors are maskable"
        );
        assert!(m.masked(&c, 0) && m.masked(&c, 1));
        w(&mut c, o + 0x10, &0b10u32.to_le_bytes());
        assert!(!m.masked(&c, 0) && m.masked(&c, 1));
        m.set_pending(&mut c, 1, true);
        assert!(m.pending(&c, 1));
        // The driver cannot write pending bits.
        w(&mut c, o + 0x14, &0u32.to_le_bytes());
        assert!(m.pending(&c, 1));
        m.set_pending(&mut c, 1, false);
        assert!(!m.pending(&c, 1));
        m.set_pending(&mut c, 40, true);
        let mut c32 = PciConfig::new();
        let m32 = c32.add_msi(32, true).unwrap();
        c32.write(m32.offset() as u64 + 0x10, &u32::MAX.to_le_bytes())
            .unwrap();
        assert!(m32.masked(&c32, 31));
    }
}
