//! Builders for the guest-side structures a driver writes: a stage-1 STE, a CD, and
//! VMSAv8-64 stage-1 page tables with the 4 KiB granule (4 levels, 48-bit input).
//!
//! For tests and harnesses that play the guest: they write into any [`SmmuMemory`]
//! (guest RAM, a flat memory, a device's DMA space) with the field positions of
//! [`super::ste`] / [`super::cd`] (Linux's `STRTAB_STE_*` / `CTXDESC_CD_*`). Table pages
//! come from a caller-given pool; running out is an error, never a wild write.

use super::memory::{read_u64, MemoryError, SmmuMemory};

/// Leaf attributes: valid page, AF, AP = read/write at any EL.
pub const LEAF_RW: u64 = 3 | (1 << 10) | (1 << 6);
/// Leaf attributes: valid page, AF, AP = read-only at any EL.
pub const LEAF_RO: u64 = 3 | (1 << 10) | (3 << 6);
/// Output-address bits of a descriptor (4 KiB granule, 48-bit OA).
const OA_MASK: u64 = 0x0000_ffff_ffff_f000;

/// Dwords 0 and 1 of an STE with stage 1 translating and stage 2 bypassed
/// (Config 0b101), one linear CD (S1CDMax 0) at `cd`, S1DSS 0.
pub fn ste_stage1(cd: u64) -> [u64; 2] {
    [1 | (0b101 << 1) | (cd & 0x000f_ffff_ffff_ffc0), 0]
}

/// Dwords 0 and 1 of a CD: 48-bit input (T0SZ 16), 4 KiB granule, 48-bit IPS,
/// AArch64, TTB0 `ttb0`, `asid`; `record` sets CD.R (stage-1 faults are recorded).
pub fn cd(ttb0: u64, asid: u16, record: bool) -> [u64; 2] {
    let d0 = 16
        | (1 << 31)
        | (5 << 32)
        | (1 << 41)
        | (u64::from(record) << 45)
        | (u64::from(asid) << 48);
    [d0, ttb0 & 0x000f_ffff_ffff_fff0]
}

/// Write little-endian 64-bit words at `addr`.
pub fn write_words(mem: &dyn SmmuMemory, addr: u64, words: &[u64]) -> Result<(), MemoryError> {
    let mut b = Vec::with_capacity(words.len() * 8);
    for w in words {
        b.extend_from_slice(&w.to_le_bytes());
    }
    mem.write(addr, &b)
}

/// Errors building tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// Memory refused an access.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The pool of table pages is used up.
    #[error("the table page pool is exhausted: give the builder a larger pool")]
    PoolExhausted,
    /// The address is not 4 KiB aligned or beyond 48 bits.
    #[error("address {0:#x} is not a 4 KiB aligned 48-bit address")]
    BadAddress(u64),
}

/// A 4-level, 4 KiB-granule stage-1 table whose pages come from a pool. The root and
/// the pool must be zeroed memory.
#[derive(Debug, Clone)]
pub struct Stage1Tables {
    root: u64,
    next: u64,
    end: u64,
}

impl Stage1Tables {
    /// A table with its root page at `root`, further pages from `[pool, pool + size)`.
    pub fn new(root: u64, pool: u64, size: u64) -> Result<Self, TableError> {
        for a in [root, pool] {
            if a & 0xfff != 0 || a & !OA_MASK != 0 {
                return Err(TableError::BadAddress(a));
            }
        }
        Ok(Stage1Tables {
            root,
            next: pool,
            end: pool.saturating_add(size),
        })
    }

    /// The root (TTB0).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The address of `va`'s level-3 slot, allocating intermediate tables if `alloc`.
    fn leaf_slot(
        &mut self,
        mem: &dyn SmmuMemory,
        va: u64,
        alloc: bool,
    ) -> Result<Option<u64>, TableError> {
        if va & 0xfff != 0 || va >> 48 != 0 {
            return Err(TableError::BadAddress(va));
        }
        let mut table = self.root;
        for level in 0..3 {
            let slot = table + ((va >> (39 - 9 * level)) & 0x1ff) * 8;
            let d = read_u64(mem, slot)?;
            table = if d & 3 == 3 {
                d & OA_MASK
            } else if alloc {
                if self.next.checked_add(0x1000).is_none_or(|e| e > self.end) {
                    return Err(TableError::PoolExhausted);
                }
                let t = self.next;
                self.next += 0x1000;
                write_words(mem, slot, &[t | 3])?;
                t
            } else {
                return Ok(None);
            };
        }
        Ok(Some(table + ((va >> 12) & 0x1ff) * 8))
    }

    /// Map the 4 KiB page at `va` to `pa` with leaf attributes `attrs` ([`LEAF_RW`],
    /// [`LEAF_RO`]).
    pub fn map(
        &mut self,
        mem: &dyn SmmuMemory,
        va: u64,
        pa: u64,
        attrs: u64,
    ) -> Result<(), TableError> {
        if pa & 0xfff != 0 || pa & !OA_MASK != 0 {
            return Err(TableError::BadAddress(pa));
        }
        let slot = self
            .leaf_slot(mem, va, true)?
            .ok_or(TableError::PoolExhausted)?;
        write_words(mem, slot, &[pa | (attrs & !OA_MASK)])?;
        Ok(())
    }

    /// Unmap the page at `va` (its leaf becomes invalid; tables stay).
    pub fn unmap(&mut self, mem: &dyn SmmuMemory, va: u64) -> Result<(), TableError> {
        if let Some(slot) = self.leaf_slot(mem, va, false)? {
            write_words(mem, slot, &[0])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::memory::FlatMemory;
    use super::super::{regs, Smmu, Transaction};
    use super::*;

    #[test]
    fn built_tables_translate_through_the_model() {
        let mem = FlatMemory::new(0, 0x10_0000);
        let mut t = Stage1Tables::new(0x1000, 0x2000, 0x4000).unwrap();
        t.map(&mem, 0x4000_0000, 0x8000, LEAF_RW).unwrap();
        t.map(&mem, 0x4000_1000, 0x9000, LEAF_RO).unwrap();
        write_words(&mem, 0x200, &cd(t.root(), 3, true)).unwrap();
        // Stream table of one STE at 0x100, queues at 0xa000/0xb000.
        write_words(&mem, 0x0, &ste_stage1(0x200)).unwrap();
        let mut smmu = Smmu::new();
        smmu.write(&mem, regs::STRTAB_BASE, 8, 0);
        smmu.write(&mem, regs::STRTAB_BASE_CFG, 4, 0);
        smmu.write(&mem, regs::CMDQ_BASE, 8, 0xa000 | 6);
        smmu.write(&mem, regs::EVENTQ_BASE, 8, 0xb000 | 6);
        smmu.write(&mem, regs::CR0, 4, 0xd);
        let tr = |smmu: &mut Smmu, addr, write| {
            smmu.translate(
                &mem,
                Transaction {
                    sid: 0,
                    ssid: None,
                    addr,
                    write,
                },
            )
        };
        assert_eq!(tr(&mut smmu, 0x4000_0123, true).unwrap().addr, 0x8123);
        assert_eq!(tr(&mut smmu, 0x4000_1008, false).unwrap().addr, 0x9008);
        assert!(tr(&mut smmu, 0x4000_1008, true).is_err(), "read-only");
        assert!(tr(&mut smmu, 0x4000_2000, false).is_err(), "unmapped");
        t.unmap(&mem, 0x4000_0000).unwrap();
        // Root 0x1000, then pool pages 0x2000 (L1), 0x3000 (L2), 0x4000 (L3).
        assert_eq!(mem.read_u64(0x4000).unwrap(), 0);
        assert_eq!(mem.read_u64(0x4008).unwrap(), 0x9000 | LEAF_RO);
        // Errors: pool exhaustion, misaligned addresses.
        let mut small = Stage1Tables::new(0x20000, 0x21000, 0x1000).unwrap();
        assert_eq!(
            small.map(&mem, 0x1000, 0x1000, LEAF_RW),
            Err(TableError::PoolExhausted)
        );
        assert_eq!(
            t.map(&mem, 0x4000_0001, 0x8000, LEAF_RW),
            Err(TableError::BadAddress(0x4000_0001))
        );
        assert!(Stage1Tables::new(0x1001, 0x2000, 0).is_err());
    }
}
