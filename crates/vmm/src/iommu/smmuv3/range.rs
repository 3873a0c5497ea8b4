//! What a batch of guest commands invalidated, and the shadow's bookkeeping of leaves
//! and runs, for range-targeted re-syncs.
//!
//! The VMM learns what the guest invalidated by reading the commands the model just
//! consumed (CMDQ_CONS before → after the MMIO write) from the guest's queue and
//! classifying them ([`Pending::consume`]): the batch up to a CMD_SYNC of only `TLBI_NH_VA` / `TLBI_NH_VAA`
//! (plus CMD_SYNC and prefetches) is a set of IOVA ranges ([`Scope::Ranges`]); any
//! other invalidation, a configuration command, or a bare CMD_SYNC is
//! [`Scope::All`] (a bare CMD_SYNC re-syncs everything so that a guest which maps
//! without invalidating — Linux — is still seen at its next CMD_SYNC). The guest can
//! rewrite its queue between the model's read and this one; that only makes its own
//! device's view stale, which it could do anyway by not invalidating.
//!
//! Address range of a TLBI: the page of `Address` — the leaf covering it, whatever
//! its size, is re-walked by the caller — or, when the SMMU advertises range
//! invalidation (IDR3.RIL) and the command's TG is non-zero, `(NUM + 1) << SCALE`
//! granules of size TG from `Address` (Linux's `CMDQ_TLBI_0_NUM` 16:12,
//! `CMDQ_TLBI_0_SCALE` 24:20, `CMDQ_TLBI_1_TG` 11:10).

use std::collections::BTreeMap;

use nestio_dma::Prot;
use nestio_iommu::smmuv3::cmdq::op;

/// Most commands of one batch classified; a longer batch re-syncs everything.
pub const MAX_SCAN: u32 = 4096;

/// What the guest invalidated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Only these IOVA ranges `(start, len)`, for every stream.
    Ranges(Vec<(u64, u64)>),
    /// Anything may have changed.
    All,
}

/// The IOVA range one TLBI_NH_VA / VAA covers (see the module documentation).
pub fn tlbi_range(raw: &[u64; 2], ril: bool) -> (u64, u64) {
    let addr = raw[1] & !0xfff;
    let tg = (raw[1] >> 10) & 3;
    if ril && tg != 0 {
        let granule_bits = [12u32, 12, 14, 16][tg as usize];
        let num = (raw[0] >> 12) & 0x1f;
        let scale = ((raw[0] >> 20) & 0x1f) as u32;
        // At most the 48-bit input address space (a hostile NUM/SCALE cannot make
        // the caller walk more, and the shift cannot overflow: 5 + 31 + 16 < 64).
        let len = ((num + 1) << (scale + granule_bits)).min(1 << 48);
        (addr & !((1u64 << granule_bits) - 1), len)
    } else {
        (addr, 0x1000)
    }
}

/// Most ranges accumulated before a CMD_SYNC; more become [`Scope::All`].
const MAX_RANGES: usize = 256;

/// The invalidations consumed since the last CMD_SYNC.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending(Option<Scope>);

impl Pending {
    fn add(&mut self, s: Scope) {
        self.0 = Some(match (self.0.take(), s) {
            (None, s) => s,
            (Some(Scope::Ranges(mut a)), Scope::Ranges(b)) if a.len() + b.len() <= MAX_RANGES => {
                a.extend(b);
                Scope::Ranges(a)
            }
            _ => Scope::All,
        });
    }

    /// Account the consumed commands `cmds` in order; returns what the CMD_SYNCs
    /// among them complete (None: no CMD_SYNC). A CMD_SYNC with nothing before it
    /// completes [`Scope::All`] (see the module documentation).
    pub fn consume(&mut self, cmds: &[[u64; 2]], ril: bool) -> Option<Scope> {
        let mut done: Option<Pending> = None;
        for raw in cmds {
            match raw[0] as u8 {
                op::TLBI_NH_VA | op::TLBI_NH_VAA => {
                    self.add(Scope::Ranges(vec![tlbi_range(raw, ril)]))
                }
                op::PREFETCH_CONFIG | op::PREFETCH_ADDR => {}
                op::CMD_SYNC => {
                    let scope = self.0.take().unwrap_or(Scope::All);
                    done.get_or_insert_with(Pending::default).add(scope);
                }
                _ => self.add(Scope::All),
            }
        }
        done.and_then(|d| d.0)
    }
}

/// Leaves of a stream's composed translation inside RAM: IOVA → (GPA, size, prot).
pub type Leaves = BTreeMap<u64, (u64, u64, Prot)>;
/// Runs installed in the domain (maximal coalesced leaves): IOVA → (GPA, size, prot).
pub type Runs = BTreeMap<u64, (u64, u64, Prot)>;

/// Coalesce `leaves` (in IOVA order) into maximal runs: contiguous IOVA and GPA, the
/// same permission.
pub fn coalesce<'a>(leaves: impl IntoIterator<Item = (&'a u64, &'a (u64, u64, Prot))>) -> Runs {
    let mut runs = Runs::new();
    let mut cur: Option<(u64, u64, u64, Prot)> = None;
    for (&iova, &(gpa, size, prot)) in leaves {
        match &mut cur {
            Some((i, g, len, p))
                if i.checked_add(*len) == Some(iova)
                    && g.checked_add(*len) == Some(gpa)
                    && *p == prot =>
            {
                *len += size;
            }
            _ => {
                if let Some((i, g, len, p)) = cur.take() {
                    runs.insert(i, (g, len, p));
                }
                cur = Some((iova, gpa, size, prot));
            }
        }
    }
    if let Some((i, g, len, p)) = cur {
        runs.insert(i, (g, len, p));
    }
    runs
}

/// Keys of the entries of `map` (IOVA → (_, size, _)) overlapping `[lo, hi)`, or
/// touching it when `touching` (ending at `lo` or starting at `hi`).
pub fn overlapping(
    map: &BTreeMap<u64, (u64, u64, Prot)>,
    lo: u64,
    hi: u64,
    touching: bool,
) -> Vec<u64> {
    let mut keys: Vec<u64> = map
        .range(..=hi)
        .rev()
        .take_while(|(&k, &(_, size, _))| {
            let end = k.saturating_add(size);
            end > lo || (touching && end == lo)
        })
        .filter(|(&k, _)| k < hi || (touching && k == hi))
        .map(|(&k, _)| k)
        .collect();
    keys.reverse();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlbi_ranges() {
        // Single page without RIL or without TG, whatever NUM/SCALE say.
        let va = [
            0x12 | (3 << 12) | (1 << 20) | (1 << 48),
            0x1234_5000 | (1 << 10),
        ];
        assert_eq!(tlbi_range(&va, false), (0x1234_5000, 0x1000));
        assert_eq!(
            tlbi_range(&[va[0], 0x1234_5000], true),
            (0x1234_5000, 0x1000)
        );
        // RIL, TG 4 KiB, NUM 3, SCALE 1: (3 + 1) << 1 = 8 pages.
        assert_eq!(tlbi_range(&va, true), (0x1234_5000, 8 << 12));
        // TG 64 KiB: aligned down to the granule, NUM 0 SCALE 0: one granule.
        assert_eq!(
            tlbi_range(&[0x13, 0x1234_5000 | (3 << 10)], true),
            (0x1234_0000, 0x1_0000)
        );
        // Hostile: NUM 31, SCALE 31, 64 KiB: no overflow, a bounded huge range.
        let huge = tlbi_range(&[0x12 | (31 << 12) | (31 << 20), 3 << 10], true);
        assert_eq!(huge, (0, 1 << 48));
    }

    #[test]
    fn batches() {
        let va = [0x12u64, 0x5000];
        let vaa = [0x13u64, 0x9000];
        let sync = [0x46u64, 0];
        let mut p = Pending::default();
        assert_eq!(
            p.consume(&[va, vaa, sync], false),
            Some(Scope::Ranges(vec![(0x5000, 0x1000), (0x9000, 0x1000)]))
        );
        // Commands written one PROD update at a time accumulate until the CMD_SYNC.
        assert_eq!(p.consume(&[va], false), None);
        assert_eq!(p.consume(&[vaa], false), None);
        assert_eq!(
            p.consume(&[sync], false),
            Some(Scope::Ranges(vec![(0x5000, 0x1000), (0x9000, 0x1000)]))
        );
        assert_eq!(
            p.consume(&[va, [0x11, 0], sync], false),
            Some(Scope::All),
            "TLBI_NH_ASID"
        );
        assert_eq!(
            p.consume(&[[0x03, 0], va, sync], false),
            Some(Scope::All),
            "CFGI_STE"
        );
        assert_eq!(
            p.consume(&[sync], false),
            Some(Scope::All),
            "a bare CMD_SYNC"
        );
        assert_eq!(p.consume(&[], false), None);
        // What follows the last CMD_SYNC waits for the next one.
        assert_eq!(
            p.consume(&[va, sync, vaa], false),
            Some(Scope::Ranges(vec![(0x5000, 0x1000)]))
        );
        assert_eq!(
            p.consume(&[sync], false),
            Some(Scope::Ranges(vec![(0x9000, 0x1000)]))
        );
        // Too many ranges before one CMD_SYNC: everything.
        let many = vec![va; MAX_RANGES + 1];
        assert_eq!(p.consume(&many, false), None);
        assert_eq!(p.consume(&[sync], false), Some(Scope::All));
    }

    #[test]
    fn coalescing_and_overlap() {
        let mut l = Leaves::new();
        l.insert(0x1000, (0x40_0000, 0x1000, Prot::RW));
        l.insert(0x2000, (0x40_1000, 0x1000, Prot::RW));
        l.insert(0x3000, (0x40_2000, 0x1000, Prot::READ));
        l.insert(0x5000, (0x80_0000, 0x1000, Prot::RW));
        let r = coalesce(&l);
        assert_eq!(
            r.into_iter().collect::<Vec<_>>(),
            vec![
                (0x1000, (0x40_0000, 0x2000, Prot::RW)),
                (0x3000, (0x40_2000, 0x1000, Prot::READ)),
                (0x5000, (0x80_0000, 0x1000, Prot::RW)),
            ]
        );
        assert_eq!(overlapping(&l, 0x2000, 0x3000, false), vec![0x2000]);
        assert_eq!(
            overlapping(&l, 0x2000, 0x3000, true),
            vec![0x1000, 0x2000, 0x3000]
        );
        assert_eq!(overlapping(&l, 0x4000, 0x5000, false), Vec::<u64>::new());
        assert_eq!(overlapping(&l, 0x4000, 0x5000, true), vec![0x3000, 0x5000]);
        assert_eq!(overlapping(&l, 0, u64::MAX, false).len(), 4);
    }
}
