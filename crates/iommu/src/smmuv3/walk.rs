//! AArch64 VMSAv8-64 translation table walks for stage 1 and stage 2.
//!
//! One walker serves both stages and the three granules (4, 16 and 64 KiB): a
//! level resolves `granule_bits - 3` bits, the start level follows from the input
//! size (stage 1: T0SZ) or from SL0 (stage 2, with up to 16 concatenated tables at
//! the start level). Descriptors are fetched through a closure so a nested walk can
//! translate each stage-1 table address through stage 2 (a fault there comes back
//! as the closure's error). Checks, in the architecture's order per level: invalid
//! or reserved descriptor → Translation; output address beyond the configured
//! output size → Address size; at the leaf, AF clear (unless AFFD) → Access, then
//! the access permissions (stage 1: AP[2] read-only, AP[1] unprivileged access,
//! APTable from table descriptors; stage 2: S2AP read/write) → Permission.
//! Transactions are unprivileged data accesses (PCI requesters).

use thiserror::Error;

/// Translation granule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granule {
    /// 4 KiB.
    K4,
    /// 16 KiB.
    K16,
    /// 64 KiB.
    K64,
}

impl Granule {
    /// log2 of the granule size.
    pub fn bits(self) -> u32 {
        match self {
            Granule::K4 => 12,
            Granule::K16 => 14,
            Granule::K64 => 16,
        }
    }
    /// Bits resolved per level.
    pub fn stride(self) -> u32 {
        self.bits() - 3
    }
    /// Stage-1 TG0 encoding (CD): 0 = 4K, 1 = 64K, 2 = 16K; also VTCR.TG0 (STE S2TG).
    pub fn from_tg0(tg: u64) -> Option<Self> {
        match tg {
            0 => Some(Granule::K4),
            1 => Some(Granule::K64),
            2 => Some(Granule::K16),
            _ => None,
        }
    }
    /// Whether a block descriptor is allowed at `level` (48-bit output addresses).
    fn block_allowed(self, level: u32) -> bool {
        match self {
            Granule::K4 => level == 1 || level == 2,
            Granule::K16 | Granule::K64 => level == 2,
        }
    }
}

/// Which stage a walk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Stage 1: IOVA → IPA (or PA).
    S1,
    /// Stage 2: IPA → PA.
    S2,
}

/// The kind of a translation fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FaultKind {
    #[error("translation fault")]
    /// No valid descriptor, or input address out of range.
    Translation,
    #[error("address size fault")]
    /// An output or table address beyond the output size.
    AddrSize,
    #[error("access flag fault")]
    /// The access flag is clear.
    Access,
    #[error("permission fault")]
    /// The permissions do not allow the access.
    Permission,
    /// The descriptor fetch itself failed (external abort).
    #[error("external abort on a table walk")]
    WalkAbort,
}

/// A fault of one walk, with the descriptor address for aborts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{kind} at level {level}")]
pub struct WalkFault {
    /// What went wrong.
    pub kind: FaultKind,
    /// The level of the walk where it did.
    pub level: u32,
    /// The descriptor address of a walk abort.
    pub fetch_addr: u64,
}

/// The static configuration of one walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkConfig {
    /// Stage 1 or 2.
    pub stage: Stage,
    /// Translation granule.
    pub granule: Granule,
    /// Input address size in bits (64 - T0SZ).
    pub input_bits: u32,
    /// First level of the walk.
    pub start_level: u32,
    /// Base of the (possibly concatenated) start table.
    pub ttb: u64,
    /// Output address size in bits (min(IPS/PS, OAS)).
    pub output_bits: u32,
    /// Access flag faults disabled.
    pub affd: bool,
}

/// Why a translation regime configuration is illegal (C_BAD_CD / C_BAD_STE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("T0SZ {0} is outside 16..=39")]
    /// T0SZ out of range.
    T0sz(u32),
    #[error("reserved granule encoding")]
    /// Reserved TG encoding.
    Granule,
    #[error("S2SL0 {sl0} and S2T0SZ {t0sz} are inconsistent for this granule")]
    /// S2SL0 does not fit S2T0SZ.
    StartLevel {
        /// S2SL0.
        sl0: u64,
        /// S2T0SZ.
        t0sz: u32,
    },
    #[error("the IPA size ({ia} bits) exceeds the output size ({pa} bits)")]
    /// S2T0SZ exceeds S2PS.
    InputTooLarge {
        /// Input size in bits.
        ia: u32,
        /// Output size in bits.
        pa: u32,
    },
}

/// The input address size a T0SZ (or S2T0SZ) field selects: 64 - t0sz bits, 25 to 48.
fn input_bits(t0sz: u32) -> Result<u32, ConfigError> {
    if !(16..=39).contains(&t0sz) {
        return Err(ConfigError::T0sz(t0sz));
    }
    Ok(64 - t0sz)
}

impl WalkConfig {
    /// A stage-1 regime from CD fields.
    pub fn stage1(
        granule: Granule,
        t0sz: u32,
        ttb: u64,
        output_bits: u32,
        affd: bool,
    ) -> Result<Self, ConfigError> {
        let ia = input_bits(t0sz)?;
        let g = granule.bits();
        let s = granule.stride();
        let levels = (ia - g).div_ceil(s);
        Ok(Self {
            stage: Stage::S1,
            granule,
            input_bits: ia,
            start_level: 4 - levels,
            ttb,
            output_bits,
            affd,
        })
    }

    /// A stage-2 regime from STE fields (VTCR: S2T0SZ, S2SL0, S2TG, S2PS).
    pub fn stage2(
        granule: Granule,
        t0sz: u32,
        sl0: u64,
        ttb: u64,
        output_bits: u32,
        affd: bool,
    ) -> Result<Self, ConfigError> {
        let ia = input_bits(t0sz)?;
        let bad = ConfigError::StartLevel { sl0, t0sz };
        let start_level = match (granule, sl0) {
            (Granule::K4, 0..=2) => 2 - sl0 as u32,
            (Granule::K16 | Granule::K64, 0..=2) => 3 - sl0 as u32,
            _ => return Err(bad),
        };
        if granule == Granule::K64 && start_level == 0 {
            return Err(bad);
        }
        let g = granule.bits();
        let s = granule.stride();
        // Bits below the start level, and what one start table resolves.
        let below = g + s * (3 - start_level);
        // At most 16 concatenated tables (4 extra bits); the walk must not be able to
        // start one level lower.
        if ia > below + s + 4 || ia <= below {
            return Err(bad);
        }
        if ia > output_bits {
            return Err(ConfigError::InputTooLarge {
                ia,
                pa: output_bits,
            });
        }
        Ok(Self {
            stage: Stage::S2,
            granule,
            input_bits: ia,
            start_level,
            ttb,
            output_bits,
            affd,
        })
    }

    fn shift(&self, level: u32) -> u32 {
        self.granule.bits() + self.granule.stride() * (3 - level)
    }
}

/// Permissions of a translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
}

impl Perm {
    /// Read and write.
    pub const RW: Perm = Perm {
        read: true,
        write: true,
    };
    /// Whether the access (write or read) is allowed.
    pub fn allows(&self, write: bool) -> bool {
        if write {
            self.write
        } else {
            self.read
        }
    }
    /// The intersection of two permissions.
    pub fn and(self, o: Perm) -> Perm {
        Perm {
            read: self.read && o.read,
            write: self.write && o.write,
        }
    }
}

/// A successful walk: the output address of the input address, and the leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// Output address of the input address (offset included).
    pub output: u64,
    /// log2 of the leaf (page or block) size.
    pub size_bits: u32,
    /// Permissions of the leaf (for the unprivileged data access).
    pub perm: Perm,
}

const VALID: u64 = 1;
const TABLE: u64 = 2;
const AF: u64 = 1 << 10;

fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Walk `cfg` for `addr`. `fetch(desc_addr)` reads one 64-bit descriptor (for a
/// nested stage 1 it translates the descriptor's IPA first; its error is returned
/// unchanged so the caller can tell a stage-2 fault from this walk's faults).
/// Permission is not checked here (see [`check`]).
pub fn walk<E>(
    cfg: &WalkConfig,
    addr: u64,
    mut fetch: impl FnMut(u64) -> Result<Option<u64>, E>,
) -> Result<Result<Leaf, WalkFault>, E> {
    let fault = |kind, level| WalkFault {
        kind,
        level,
        fetch_addr: 0,
    };
    if addr & !mask(cfg.input_bits) != 0 {
        return Ok(Err(fault(FaultKind::Translation, cfg.start_level)));
    }
    let g = cfg.granule.bits();
    let oa_mask = mask(48) & !mask(g);
    let mut level = cfg.start_level;
    let start_bits = cfg.input_bits - cfg.shift(level);
    let mut table = cfg.ttb & mask(48) & !mask(start_bits + 3);
    if cfg.ttb & !mask(cfg.output_bits) & mask(48) != 0 {
        return Ok(Err(fault(FaultKind::AddrSize, level)));
    }
    let mut idx_bits = start_bits;
    // Hierarchical stage-1 controls from APTable: no write, no unprivileged access.
    let mut no_write = false;
    let mut no_unpriv = false;
    loop {
        let shift = cfg.shift(level);
        let idx = (addr >> shift) & mask(idx_bits);
        let desc_addr = table + idx * 8;
        let desc = match fetch(desc_addr)? {
            Some(d) => d,
            None => {
                return Ok(Err(WalkFault {
                    kind: FaultKind::WalkAbort,
                    level,
                    fetch_addr: desc_addr,
                }))
            }
        };
        if desc & VALID == 0 {
            return Ok(Err(fault(FaultKind::Translation, level)));
        }
        let is_table = desc & TABLE != 0 && level < 3;
        let is_page = desc & TABLE != 0 && level == 3;
        if !is_table && !is_page && !cfg.granule.block_allowed(level) {
            return Ok(Err(fault(FaultKind::Translation, level)));
        }
        // Output address (next table or leaf) beyond the output size.
        if desc & oa_mask & !mask(cfg.output_bits) != 0 {
            return Ok(Err(fault(FaultKind::AddrSize, level)));
        }
        if is_table {
            if cfg.stage == Stage::S1 {
                no_write |= desc & (1 << 62) != 0;
                no_unpriv |= desc & (1 << 61) != 0;
            }
            table = desc & oa_mask;
            level += 1;
            idx_bits = cfg.granule.stride();
            continue;
        }
        if desc & AF == 0 && !cfg.affd {
            return Ok(Err(fault(FaultKind::Access, level)));
        }
        let out_base = desc & mask(48) & !mask(shift);
        let perm = match cfg.stage {
            Stage::S1 => {
                let ap2 = desc & (1 << 7) != 0;
                let ap1 = desc & (1 << 6) != 0;
                // Unprivileged access needs AP[1] and no APTable[0] on the way.
                let user = ap1 && !no_unpriv;
                Perm {
                    read: user,
                    write: user && !ap2 && !no_write,
                }
            }
            Stage::S2 => Perm {
                read: desc & (1 << 6) != 0,
                write: desc & (1 << 7) != 0,
            },
        };
        return Ok(Ok(Leaf {
            output: out_base | (addr & mask(shift)),
            size_bits: shift,
            perm,
        }));
    }
}

/// Check `leaf` allows the access; a Permission fault at the leaf's level otherwise.
pub fn check(leaf: &Leaf, write: bool) -> Result<(), FaultKind> {
    if leaf.perm.allows(write) {
        Ok(())
    } else {
        Err(FaultKind::Permission)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Build 4 KiB-granule tables in a sparse memory: map `va` → `pa` at level 3.
    struct Tables {
        mem: HashMap<u64, u64>,
        next: u64,
    }

    impl Tables {
        fn new() -> Self {
            Self {
                mem: HashMap::new(),
                next: 0x10_0000,
            }
        }
        fn alloc(&mut self) -> u64 {
            let a = self.next;
            self.next += 0x1000;
            a
        }
        fn map(&mut self, root: u64, start: u32, va: u64, leaf: u64, leaf_level: u32) {
            let mut table = root;
            for level in start..leaf_level {
                let shift = 12 + 9 * (3 - level);
                let slot = table + ((va >> shift) & 0x1ff) * 8;
                let d = self.mem.get(&slot).copied().unwrap_or(0);
                table = if d & 1 == 0 {
                    let t = self.alloc();
                    self.mem.insert(slot, t | 3);
                    t
                } else {
                    d & 0xffff_ffff_f000
                };
            }
            let shift = 12 + 9 * (3 - leaf_level);
            self.mem.insert(table + ((va >> shift) & 0x1ff) * 8, leaf);
        }
        fn walk(&self, cfg: &WalkConfig, va: u64) -> Result<Leaf, WalkFault> {
            walk::<()>(cfg, va, |a| {
                Ok(Some(self.mem.get(&a).copied().unwrap_or(0)))
            })
            .unwrap()
        }
    }

    const S1_RW: u64 = 3 | AF | (1 << 6);

    #[test]
    fn stage1_start_levels_follow_t0sz() {
        let c = WalkConfig::stage1(Granule::K4, 16, 0, 48, false).unwrap();
        assert_eq!(c.start_level, 0);
        let c = WalkConfig::stage1(Granule::K4, 25, 0, 48, false).unwrap();
        assert_eq!(c.start_level, 1);
        let c = WalkConfig::stage1(Granule::K4, 34, 0, 48, false).unwrap();
        assert_eq!(c.start_level, 2);
        let c = WalkConfig::stage1(Granule::K64, 16, 0, 48, false).unwrap();
        assert_eq!(c.start_level, 1);
        assert_eq!(
            WalkConfig::stage1(Granule::K4, 40, 0, 48, false),
            Err(ConfigError::T0sz(40))
        );
        assert_eq!(
            WalkConfig::stage1(Granule::K4, 15, 0, 48, false),
            Err(ConfigError::T0sz(15))
        );
    }

    #[test]
    fn stage2_sl0_consistency() {
        // 40-bit IPA, 4K: SL0=1 (level 1) with 2 concatenated tables is legal.
        let c = WalkConfig::stage2(Granule::K4, 24, 1, 0, 48, false).unwrap();
        assert_eq!(c.start_level, 1);
        // 40-bit IPA cannot start at level 2 (would need 512 tables).
        assert!(WalkConfig::stage2(Granule::K4, 24, 0, 0, 48, false).is_err());
        // 32-bit IPA starting at level 0 could start lower: illegal.
        assert!(WalkConfig::stage2(Granule::K4, 32, 2, 0, 48, false).is_err());
        // IPA larger than the PA size.
        assert_eq!(
            WalkConfig::stage2(Granule::K4, 16, 2, 0, 40, false),
            Err(ConfigError::InputTooLarge { ia: 48, pa: 40 })
        );
        assert!(WalkConfig::stage2(Granule::K4, 24, 3, 0, 48, false).is_err());
    }

    #[test]
    fn page_block_and_faults() {
        let mut t = Tables::new();
        let root = t.alloc();
        t.map(root, 0, 0x1234_5000, 0x8000_0000 | S1_RW, 3);
        t.map(
            root,
            0,
            0x4000_0000,
            0x9000_0000 | 1 | AF | (1 << 6) | (1 << 7),
            2,
        );
        let cfg = WalkConfig::stage1(Granule::K4, 16, root, 48, false).unwrap();
        let l = t.walk(&cfg, 0x1234_5678).unwrap();
        assert_eq!(l.output, 0x8000_0678);
        assert_eq!(l.size_bits, 12);
        assert!(l.perm.write);
        // A read-only 2 MiB block.
        let l = t.walk(&cfg, 0x4012_3456).unwrap();
        assert_eq!(l.output, 0x9012_3456);
        assert_eq!(l.size_bits, 21);
        assert_eq!(check(&l, true), Err(FaultKind::Permission));
        assert_eq!(check(&l, false), Ok(()));
        // Unmapped neighbour page: translation fault at level 3.
        let f = t.walk(&cfg, 0x1234_6000).unwrap_err();
        assert_eq!((f.kind, f.level), (FaultKind::Translation, 3));
        // Out of the T0SZ range.
        let f = t.walk(&cfg, 1 << 48).unwrap_err();
        assert_eq!(f.kind, FaultKind::Translation);
        // AF clear.
        t.map(root, 0, 0x5000, 0x7000 | 3 | (1 << 6), 3);
        assert_eq!(t.walk(&cfg, 0x5000).unwrap_err().kind, FaultKind::Access);
        let affd = WalkConfig { affd: true, ..cfg };
        assert_eq!(t.walk(&affd, 0x5000).unwrap().output, 0x7000);
        // AP[1] clear: no unprivileged access at all.
        t.map(root, 0, 0x6000, 0x7000 | 3 | AF, 3);
        let l = t.walk(&cfg, 0x6000).unwrap();
        assert!(!l.perm.read && !l.perm.write);
        // Output beyond a 40-bit IPS: address size fault.
        t.map(root, 0, 0x8000, (1 << 44) | S1_RW, 3);
        let small = WalkConfig {
            output_bits: 40,
            ..cfg
        };
        assert_eq!(
            t.walk(&small, 0x8000).unwrap_err().kind,
            FaultKind::AddrSize
        );
        assert_eq!(t.walk(&cfg, 0x8000).unwrap().output, 1 << 44);
        // Reserved: a block at level 0 with 4K; a "block" encoding at level 3.
        t.mem.insert(root + 8 * 5, (5u64 << 39) | 1 | AF);
        assert_eq!(
            t.walk(&cfg, 5 << 39).unwrap_err().kind,
            FaultKind::Translation
        );
        t.map(root, 0, 0x9000, 0x7000 | 1 | AF | (1 << 6), 3);
        assert_eq!(
            t.walk(&cfg, 0x9000).unwrap_err().kind,
            FaultKind::Translation
        );
    }

    #[test]
    fn aptable_restricts_the_subtree() {
        let mut t = Tables::new();
        let root = t.alloc();
        t.map(root, 0, 0x1000, 0x2000 | S1_RW, 3);
        // Set APTable[1] (no write) on the level-0 table descriptor.
        let d = t.mem.get_mut(&root).unwrap();
        *d |= 1 << 62;
        let cfg = WalkConfig::stage1(Granule::K4, 16, root, 48, false).unwrap();
        let l = t.walk(&cfg, 0x1000).unwrap();
        assert!(l.perm.read && !l.perm.write);
    }

    #[test]
    fn stage2_concatenated_start_tables_and_s2ap() {
        let mut t = Tables::new();
        // 40-bit IPA at level 1: two concatenated 4 KiB tables (8 KiB aligned).
        let root = 0x20_0000;
        let ipa = 0x80_4000_1000u64; // index 512 at level 1 → second table
        let l2 = t.alloc();
        t.mem.insert(root + ((ipa >> 30) & 0x3ff) * 8, l2 | 3);
        let l3 = t.alloc();
        t.mem.insert(l2 + ((ipa >> 21) & 0x1ff) * 8, l3 | 3);
        t.mem
            .insert(l3 + ((ipa >> 12) & 0x1ff) * 8, 0x5000 | 3 | AF | (1 << 6));
        let cfg = WalkConfig::stage2(Granule::K4, 24, 1, root, 48, false).unwrap();
        let l = t.walk(&cfg, ipa | 0x10).unwrap();
        assert_eq!(l.output, 0x5010);
        assert!(l.perm.read && !l.perm.write);
    }

    #[test]
    fn granule_64k_walk() {
        let mut mem = HashMap::new();
        // T0SZ 32: 32-bit input, 64K granule → start level 2 (bits 31:29, 3 bits).
        let root = 0x10_0000u64;
        let l3 = 0x20_0000u64;
        let va = 0x4567_8000u64;
        mem.insert(root + ((va >> 29) & 7) * 8, l3 | 3);
        mem.insert(l3 + ((va >> 16) & 0x1fff) * 8, 0x3_0000 | 3 | AF | (1 << 6));
        let cfg = WalkConfig::stage1(Granule::K64, 32, root, 48, false).unwrap();
        assert_eq!(cfg.start_level, 2);
        let l = walk::<()>(&cfg, va, |a| Ok(Some(mem.get(&a).copied().unwrap_or(0))))
            .unwrap()
            .unwrap();
        assert_eq!(l.output, 0x3_8000);
        assert_eq!(l.size_bits, 16);
    }
}

/// A leaf found by [`enumerate`]: `1 << size_bits` bytes at `input` map to `output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Input address of the leaf (aligned to its size).
    pub input: u64,
    /// Output address of `input`.
    pub output: u64,
    /// log2 of the leaf size.
    pub size_bits: u32,
    /// Permissions of the leaf.
    pub perm: Perm,
}

/// Why [`enumerate`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EnumerateError {
    /// More valid leaves than the caller allows (a hostile or huge table).
    #[error("the translation table has more than {0} valid leaves")]
    TooMany(usize),
}

/// Every valid leaf of `cfg`'s tables, in input-address order, at most `limit`.
/// Invalid, reserved, out-of-range or unreadable descriptors contribute nothing
/// (a DMA there faults, which is what a shadow of this table must give). Leaves
/// with AF = 0 are skipped unless AFFD. The walk visits only valid table
/// descriptors, so its cost is proportional to the mapped part of the table.
pub fn enumerate(
    cfg: &WalkConfig,
    fetch: &mut dyn FnMut(u64) -> Option<u64>,
    limit: usize,
) -> Result<Vec<Extent>, EnumerateError> {
    let mut out = Vec::new();
    if cfg.ttb & !mask(cfg.output_bits) & mask(48) != 0 {
        return Ok(out);
    }
    let start_bits = cfg.input_bits - cfg.shift(cfg.start_level);
    let table = cfg.ttb & mask(48) & !mask(start_bits + 3);
    let ctx = EnumCtx { cfg, limit };
    ctx.table(
        fetch,
        &mut out,
        table,
        cfg.start_level,
        start_bits,
        0,
        (false, false),
    )?;
    Ok(out)
}

struct EnumCtx<'a> {
    cfg: &'a WalkConfig,
    limit: usize,
}

impl EnumCtx<'_> {
    #[allow(clippy::too_many_arguments)]
    fn table(
        &self,
        fetch: &mut dyn FnMut(u64) -> Option<u64>,
        out: &mut Vec<Extent>,
        table: u64,
        level: u32,
        idx_bits: u32,
        base: u64,
        (no_write, no_unpriv): (bool, bool),
    ) -> Result<(), EnumerateError> {
        let cfg = self.cfg;
        let shift = cfg.shift(level);
        let oa_mask = mask(48) & !mask(cfg.granule.bits());
        for idx in 0..(1u64 << idx_bits) {
            let Some(desc) = fetch(table + idx * 8) else {
                continue;
            };
            if desc & VALID == 0 {
                continue;
            }
            let input = base | (idx << shift);
            let is_table = desc & TABLE != 0 && level < 3;
            let is_page = desc & TABLE != 0 && level == 3;
            if !is_table && !is_page && !cfg.granule.block_allowed(level) {
                continue;
            }
            if desc & oa_mask & !mask(cfg.output_bits) != 0 {
                continue;
            }
            if is_table {
                let (nw, nu) = if cfg.stage == Stage::S1 {
                    (
                        no_write || desc & (1 << 62) != 0,
                        no_unpriv || desc & (1 << 61) != 0,
                    )
                } else {
                    (false, false)
                };
                self.table(
                    fetch,
                    out,
                    desc & oa_mask,
                    level + 1,
                    cfg.granule.stride(),
                    input,
                    (nw, nu),
                )?;
                continue;
            }
            if desc & AF == 0 && !cfg.affd {
                continue;
            }
            let perm = match cfg.stage {
                Stage::S1 => {
                    let user = desc & (1 << 6) != 0 && !no_unpriv;
                    Perm {
                        read: user,
                        write: user && desc & (1 << 7) == 0 && !no_write,
                    }
                }
                Stage::S2 => Perm {
                    read: desc & (1 << 6) != 0,
                    write: desc & (1 << 7) != 0,
                },
            };
            if !perm.read && !perm.write {
                continue;
            }
            if out.len() >= self.limit {
                return Err(EnumerateError::TooMany(self.limit));
            }
            out.push(Extent {
                input,
                output: desc & mask(48) & !mask(shift),
                size_bits: shift,
                perm,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod enumerate_tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn enumerates_pages_and_blocks_with_permissions() {
        let mut mem: HashMap<u64, u64> = HashMap::new();
        // T0SZ 25 (39-bit): start level 1, 512 entries.
        let root = 0x1000u64;
        let l2 = 0x2000u64;
        let l3 = 0x3000u64;
        mem.insert(root, l2 | 3); // VA 0..1G
        mem.insert(l2 + 8, 0x4000_0000 | 1 | AF | (1 << 6) | (1 << 7)); // 2M..4M RO block
        mem.insert(l2, l3 | 3);
        mem.insert(l3 + 8 * 5, 0x9000 | 3 | AF | (1 << 6)); // VA 0x5000 RW
        mem.insert(l3 + 8 * 6, 0xa000 | 3 | (1 << 6)); // AF clear: skipped
        mem.insert(l3 + 8 * 7, 0xb000 | 3 | AF); // no unprivileged access: skipped
        let cfg = WalkConfig::stage1(Granule::K4, 25, root, 48, false).unwrap();
        let mut f = |a: u64| Some(mem.get(&a).copied().unwrap_or(0));
        let e = enumerate(&cfg, &mut f, 100).unwrap();
        assert_eq!(
            e,
            vec![
                Extent {
                    input: 0x5000,
                    output: 0x9000,
                    size_bits: 12,
                    perm: Perm::RW
                },
                Extent {
                    input: 0x20_0000,
                    output: 0x4000_0000,
                    size_bits: 21,
                    perm: Perm {
                        read: true,
                        write: false
                    }
                },
            ]
        );
        assert_eq!(enumerate(&cfg, &mut f, 1), Err(EnumerateError::TooMany(1)));
    }
}
