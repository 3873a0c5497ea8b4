//! Stream table entries (64 bytes) and the stream table lookup.
//!
//! Decoding is strict: a field this model cannot honour makes the STE illegal
//! (C_BAD_STE), never silently ignored. Field positions are Linux's
//! `STRTAB_STE_*`: dword0 V 0, Config 3:1, S1Fmt 5:4, S1ContextPtr 51:6, S1CDMax
//! 63:59; dword1 S1DSS 1:0; dword2 S2VMID 15:0, VTCR 50:32 (S2T0SZ 5:0, S2SL0 7:6,
//! S2TG 15:14, S2PS 18:16), S2AA64 51, S2ENDI 52, S2AFFD 53, S2R 58; dword3 S2TTB
//! 51:4.

use super::memory::{read_u64, read_words, SmmuMemory};
use super::regs;
use super::walk::{ConfigError, Granule, WalkConfig};
use thiserror::Error;

/// Why a stream's configuration could not be obtained (the event to record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SteError {
    #[error("stream ID {0:#x} is outside the stream table")]
    /// The stream ID is beyond the table (C_BAD_STREAMID).
    BadStreamId(u32),
    #[error("fetching the STE at {addr:#x} failed")]
    /// Reading the STE failed (F_STE_FETCH).
    Fetch {
        /// Address of the STE or L1 descriptor.
        addr: u64,
    },
    #[error("the STE is invalid or uses a configuration this SMMU does not implement: {0}")]
    /// The STE is invalid or unsupported (the reason).
    Bad(&'static str),
    #[error("the STE's stage-2 fields are illegal: {0}")]
    /// The stage-2 walk parameters are illegal.
    BadS2(ConfigError),
}

/// What STE.S1DSS says about transactions without a substream ID when S1CDMax > 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S1Dss {
    /// Terminate them with F_STREAM_DISABLED.
    Terminate,
    /// Bypass stage 1 for them.
    Bypass,
    /// Translate them with substream 0's CD.
    Substream0,
}

/// The stage-1 part of an STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S1Config {
    /// S1Fmt: 0 linear, 1 two-level with 4 KiB leaves (split 6), 2 two-level with
    /// 64 KiB leaves (split 10).
    pub fmt: u8,
    /// S1ContextPtr: the CD table (an IPA when stage 2 is enabled).
    pub cd_ptr: u64,
    /// log2 of the number of CDs (0: one CD, no substreams).
    pub cd_max: u32,
    /// S1DSS.
    pub dss: S1Dss,
}

/// The stage-2 part of an STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S2Config {
    /// S2VMID.
    pub vmid: u16,
    /// The stage-2 walk.
    pub walk: WalkConfig,
    /// S2R: record stage-2 faults.
    pub record: bool,
}

/// A decoded STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ste {
    /// Config 0b000: transactions aborted, no event.
    Abort,
    /// Config 0b100.
    Bypass,
    /// Config 0b101 / 0b110 / 0b111.
    Translate {
        /// Stage 1, if enabled.
        s1: Option<S1Config>,
        /// Stage 2, if enabled.
        s2: Option<S2Config>,
        /// VMID tagging the TLB entries (S2VMID; also used by S1-only streams).
        vmid: u16,
    },
}

fn bits(v: u64, hi: u32, lo: u32) -> u64 {
    (v >> lo) & ((1u64 << (hi - lo + 1)) - 1)
}

impl Ste {
    /// Decode the four meaningful dwords of an STE.
    pub fn decode(d: &[u64; 4]) -> Result<Ste, SteError> {
        if d[0] & 1 == 0 {
            return Err(SteError::Bad("V is 0"));
        }
        let config = bits(d[0], 3, 1);
        match config {
            0b000 => return Ok(Ste::Abort),
            0b100 => return Ok(Ste::Bypass),
            0b101..=0b111 => {}
            _ => return Err(SteError::Bad("reserved Config")),
        }
        let vmid = bits(d[2], 15, 0) as u16;
        let s1 = if config & 1 != 0 {
            let fmt = bits(d[0], 5, 4) as u8;
            if fmt == 3 {
                return Err(SteError::Bad("reserved S1Fmt"));
            }
            let cd_max = bits(d[0], 63, 59) as u32;
            if cd_max > regs::SSID_BITS {
                return Err(SteError::Bad("S1CDMax exceeds SSIDSIZE"));
            }
            if cd_max == 0 && fmt != 0 {
                return Err(SteError::Bad("two-level CD table with S1CDMax 0"));
            }
            let dss = match bits(d[1], 1, 0) {
                0 => S1Dss::Terminate,
                1 => S1Dss::Bypass,
                2 => S1Dss::Substream0,
                _ => return Err(SteError::Bad("reserved S1DSS")),
            };
            Some(S1Config {
                fmt,
                cd_ptr: d[0] & 0x000f_ffff_ffff_ffc0,
                cd_max,
                dss,
            })
        } else {
            None
        };
        let s2 = if config & 2 != 0 {
            if d[2] & (1 << 51) == 0 {
                return Err(SteError::Bad(
                    "S2AA64 is 0 (AArch32 stage 2 is not implemented)",
                ));
            }
            if d[2] & (1 << 52) != 0 {
                return Err(SteError::Bad(
                    "S2ENDI big-endian tables are not implemented",
                ));
            }
            let vtcr = bits(d[2], 50, 32);
            let granule =
                Granule::from_tg0(bits(vtcr, 15, 14)).ok_or(SteError::Bad("reserved S2TG"))?;
            let pa = regs::pa_bits(bits(vtcr, 18, 16));
            let walk = WalkConfig::stage2(
                granule,
                bits(vtcr, 5, 0) as u32,
                bits(vtcr, 7, 6),
                d[3] & 0x000f_ffff_ffff_fff0,
                pa,
                d[2] & (1 << 53) != 0,
            )
            .map_err(SteError::BadS2)?;
            Some(S2Config {
                vmid,
                walk,
                record: d[2] & (1 << 58) != 0,
            })
        } else {
            None
        };
        Ok(Ste::Translate { s1, s2, vmid })
    }
}

/// The stream table as programmed in STRTAB_BASE / STRTAB_BASE_CFG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTable {
    /// STRTAB_BASE.
    pub base: u64,
    /// STRTAB_BASE_CFG.
    pub cfg: u32,
}

impl StreamTable {
    /// The address of `sid`'s STE, or why there is none.
    pub fn ste_addr(&self, mem: &dyn SmmuMemory, sid: u32) -> Result<u64, SteError> {
        let base = self.base & regs::STRTAB_BASE_ADDR_MASK;
        let log2 = (self.cfg & regs::STRTAB_CFG_LOG2SIZE_MASK).min(regs::SID_BITS);
        if u64::from(sid) >> log2 != 0 {
            return Err(SteError::BadStreamId(sid));
        }
        let fmt = (self.cfg >> regs::STRTAB_CFG_FMT_SHIFT) & regs::STRTAB_CFG_FMT_MASK;
        match fmt {
            regs::STRTAB_FMT_LINEAR => Ok(base + u64::from(sid) * 64),
            regs::STRTAB_FMT_2LVL => {
                // SPLIT 6, 8 or 10; other values behave as the nearest legal one
                // below (and never exceed LOG2SIZE).
                let split = match (self.cfg >> regs::STRTAB_CFG_SPLIT_SHIFT)
                    & regs::STRTAB_CFG_SPLIT_MASK
                {
                    0..=7 => 6,
                    8..=9 => 8,
                    _ => 10,
                }
                .min(log2);
                let l1 = base + (u64::from(sid) >> split) * 8;
                let desc = read_u64(mem, l1).map_err(|_| SteError::Fetch { addr: l1 })?;
                let span = (desc & 0x1f) as u32;
                if span == 0 || span > split + 1 {
                    return Err(SteError::BadStreamId(sid));
                }
                let low = u64::from(sid) & ((1u64 << split) - 1);
                if low >> (span - 1) != 0 {
                    return Err(SteError::BadStreamId(sid));
                }
                Ok((desc & 0x000f_ffff_ffff_ffc0) + low * 64)
            }
            _ => Err(SteError::Bad("reserved STRTAB_BASE_CFG.FMT")),
        }
    }

    /// Fetch and decode `sid`'s STE.
    pub fn fetch(&self, mem: &dyn SmmuMemory, sid: u32) -> Result<Ste, SteError> {
        let addr = self.ste_addr(mem, sid)?;
        let d: [u64; 4] = read_words(mem, addr).map_err(|_| SteError::Fetch { addr })?;
        Ste::decode(&d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smmuv3::memory::FlatMemory;

    #[test]
    fn decode_configs() {
        assert_eq!(Ste::decode(&[0, 0, 0, 0]), Err(SteError::Bad("V is 0")));
        assert_eq!(Ste::decode(&[1, 0, 0, 0]), Ok(Ste::Abort));
        assert_eq!(Ste::decode(&[1 | (4 << 1), 0, 0, 0]), Ok(Ste::Bypass));
        assert!(Ste::decode(&[1 | (2 << 1), 0, 0, 0]).is_err());
        let s1 = Ste::decode(&[1 | (5 << 1) | 0x8000, 0, 7, 0]).unwrap();
        match s1 {
            Ste::Translate {
                s1: Some(c),
                s2: None,
                vmid: 7,
            } => assert_eq!(c.cd_ptr, 0x8000),
            other => panic!("{other:?}"),
        }
        // S2 without AA64 is refused; with a consistent VTCR it is accepted.
        assert!(Ste::decode(&[1 | (6 << 1), 0, 0, 0]).is_err());
        let vtcr: u64 = 24 | (1 << 6) | (5 << 16);
        let ste = Ste::decode(&[1 | (6 << 1), 0, (vtcr << 32) | (1 << 51) | 3, 0x4000]).unwrap();
        match ste {
            Ste::Translate {
                s1: None,
                s2: Some(s2),
                ..
            } => {
                assert_eq!(s2.vmid, 3);
                assert_eq!(s2.walk.start_level, 1);
                assert_eq!(s2.walk.ttb, 0x4000);
            }
            other => panic!("{other:?}"),
        }
        // S1CDMax beyond SSIDSIZE.
        assert!(Ste::decode(&[1 | (5 << 1) | (9 << 59), 0, 0, 0]).is_err());
    }

    #[test]
    fn two_level_stream_table() {
        let mem = FlatMemory::new(0, 0x10000);
        // 16-bit SIDs, split 8: L1 entry for SID 0x0102 is index 1.
        mem.write_u64(0x1000 + 8, 0x4000 | 3).unwrap(); // span 3 → 4 STEs
        let st = StreamTable {
            base: 0x1000,
            cfg: 16 | (8 << 6) | (1 << 16),
        };
        assert_eq!(st.ste_addr(&mem, 0x0102).unwrap(), 0x4000 + 2 * 64);
        assert_eq!(st.ste_addr(&mem, 0x0104), Err(SteError::BadStreamId(0x104)));
        assert_eq!(st.ste_addr(&mem, 0x0202), Err(SteError::BadStreamId(0x202)));
        let lin = StreamTable {
            base: 0x1000,
            cfg: 4,
        };
        assert_eq!(lin.ste_addr(&mem, 15).unwrap(), 0x1000 + 15 * 64);
        assert_eq!(lin.ste_addr(&mem, 16), Err(SteError::BadStreamId(16)));
    }
}
