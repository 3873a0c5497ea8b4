//! Context descriptors (64 bytes) and the CD table lookup (linear or two-level).
//!
//! Field positions are Linux's `CTXDESC_CD_*`: dword0 T0SZ 5:0, TG0 7:6, EPD0 14,
//! ENDI 15, V 31, IPS 34:32, AFFD 35, AA64 41, R 45, A 46, ASID 63:48; dword1 TTB0
//! 51:4. Only the TTB0 (lower) range is walked: an input address in the upper range
//! faults as untranslatable, as with EPD1 = 1.

use super::regs;
use super::walk::{ConfigError, Granule, WalkConfig};
use thiserror::Error;

/// Why a CD is illegal (C_BAD_CD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CdError {
    #[error("the CD is invalid or uses a feature this SMMU does not implement: {0}")]
    /// A field is invalid or unsupported (the reason).
    Bad(&'static str),
    #[error("the CD's translation fields are illegal: {0}")]
    /// T0SZ/TG0 describe no legal walk.
    Walk(ConfigError),
}

/// A decoded CD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cd {
    /// ASID tagging the IOTLB entries of this context.
    pub asid: u16,
    /// The TTB0 walk, or None when EPD0 disables it (every access faults).
    pub walk: Option<WalkConfig>,
    /// R: record stage-1 faults.
    pub record: bool,
}

fn bits(v: u64, hi: u32, lo: u32) -> u64 {
    (v >> lo) & ((1u64 << (hi - lo + 1)) - 1)
}

impl Cd {
    /// Decode the first two dwords of a CD.
    pub fn decode(d: &[u64; 2]) -> Result<Cd, CdError> {
        let d0 = d[0];
        if d0 & (1 << 31) == 0 {
            return Err(CdError::Bad("V is 0"));
        }
        if d0 & (1 << 41) == 0 {
            return Err(CdError::Bad(
                "AA64 is 0 (AArch32 stage 1 is not implemented)",
            ));
        }
        if d0 & (1 << 15) != 0 {
            return Err(CdError::Bad("ENDI big-endian tables are not implemented"));
        }
        let record = d0 & (1 << 45) != 0;
        let asid = bits(d0, 63, 48) as u16;
        let walk = if d0 & (1 << 14) != 0 {
            None
        } else {
            let granule = Granule::from_tg0(bits(d0, 7, 6)).ok_or(CdError::Bad("reserved TG0"))?;
            Some(
                WalkConfig::stage1(
                    granule,
                    bits(d0, 5, 0) as u32,
                    d[1] & 0x000f_ffff_ffff_fff0,
                    regs::pa_bits(bits(d0, 34, 32)),
                    d0 & (1 << 35) != 0,
                )
                .map_err(CdError::Walk)?,
            )
        };
        Ok(Cd { asid, walk, record })
    }
}

/// Where a substream's CD lives: its address, or the L1 descriptor to read first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CdLocation {
    /// The CD is at this address.
    Direct(u64),
    /// Two-level: read the L1 descriptor at `l1`; the CD is at L2Ptr + `offset`.
    Indirect {
        /// Address of the L1 descriptor.
        l1: u64,
        /// Offset of the CD in the L2 table.
        offset: u64,
    },
}

/// Locate CD `ssid` of a table at `ptr` with S1Fmt `fmt`.
pub fn locate(ptr: u64, fmt: u8, ssid: u32) -> CdLocation {
    let ssid = u64::from(ssid);
    match fmt {
        0 => CdLocation::Direct(ptr + ssid * 64),
        _ => {
            let split = if fmt == 1 { 6 } else { 10 };
            CdLocation::Indirect {
                l1: ptr + (ssid >> split) * 8,
                offset: (ssid & ((1 << split) - 1)) * 64,
            }
        }
    }
}

/// The L2 pointer of an L1 CD descriptor (V bit 0, L2Ptr 51:12), if valid.
pub fn l1_target(desc: u64) -> Option<u64> {
    (desc & 1 != 0).then_some(desc & 0x000f_ffff_ffff_f000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_and_locate() {
        let d0 = 16 | (1 << 31) | (1 << 41) | (5 << 32) | (1 << 45) | (0x42u64 << 48);
        let cd = Cd::decode(&[d0, 0x8000]).unwrap();
        assert_eq!(cd.asid, 0x42);
        assert!(cd.record);
        let w = cd.walk.unwrap();
        assert_eq!((w.ttb, w.start_level, w.output_bits), (0x8000, 0, 48));
        assert_eq!(
            Cd::decode(&[d0 & !(1 << 31), 0]),
            Err(CdError::Bad("V is 0"))
        );
        assert!(Cd::decode(&[d0 & !(1 << 41), 0]).is_err());
        assert!(Cd::decode(&[(d0 & !0x3f) | 40, 0]).is_err());
        assert_eq!(Cd::decode(&[d0 | (1 << 14), 0]).unwrap().walk, None);
        assert_eq!(locate(0x1000, 0, 3), CdLocation::Direct(0x10c0));
        assert_eq!(
            locate(0x1000, 1, 65),
            CdLocation::Indirect {
                l1: 0x1008,
                offset: 64
            }
        );
        assert_eq!(l1_target(0x5001), Some(0x5000));
        assert_eq!(l1_target(0x5000), None);
    }
}
