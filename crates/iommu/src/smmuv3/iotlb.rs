//! The IOTLB: complete translations tagged (VMID, ASID, IOVA).
//!
//! An entry caches one leaf of the combined walk (stage 1 then stage 2, or one
//! stage), keyed by its 4 KiB input page so lookups are one hash probe; the entry
//! remembers its leaf range so an invalidation by address removes every page of a
//! block. Stage-2-only streams have no ASID (`None`). Stage-2 IPAs are kept with
//! each entry so TLBI_S2_IPA can drop the combined entries built from them (more
//! than the architecture requires, which it permits). The cache is bounded: when
//! full it is flushed, which only costs walks.

use super::walk::Perm;
use std::collections::HashMap;

/// Maximum number of cached pages before a flush.
pub const CAPACITY: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    vmid: u16,
    asid: Option<u16>,
    page: u64,
}

/// One cached translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Input range of the leaf: base and log2 size.
    pub in_base: u64,
    /// log2 of the leaf size.
    pub size_bits: u32,
    /// Output address of `in_base`.
    pub out_base: u64,
    /// Combined permissions of all stages.
    pub perm: Perm,
    /// IPA of `in_base` for stage-2 translations (nested or stage 2 only).
    pub ipa_base: Option<u64>,
    /// Size of the stage-2 leaf the IPA came through.
    pub ipa_size_bits: u32,
}

impl Entry {
    fn covers(&self, addr: u64) -> bool {
        addr >> self.size_bits == self.in_base >> self.size_bits
    }
    fn covers_ipa(&self, ipa: u64) -> bool {
        self.ipa_base
            .is_some_and(|b| ipa >> self.ipa_size_bits == b >> self.ipa_size_bits)
    }
}

#[derive(Debug, Default)]
/// The translation cache of one SMMU.
pub struct Iotlb {
    map: HashMap<Key, Entry>,
    hits: u64,
    misses: u64,
}

impl Iotlb {
    /// The cached translation of `iova` for (VMID, ASID), if any.
    pub fn lookup(&mut self, vmid: u16, asid: Option<u16>, iova: u64) -> Option<Entry> {
        let r = self
            .map
            .get(&Key {
                vmid,
                asid,
                page: iova >> 12,
            })
            .copied();
        if r.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        r
    }

    /// Cache the translation `e` of the page of `iova`.
    pub fn insert(&mut self, vmid: u16, asid: Option<u16>, iova: u64, e: Entry) {
        if self.map.len() >= CAPACITY {
            self.map.clear();
        }
        self.map.insert(
            Key {
                vmid,
                asid,
                page: iova >> 12,
            },
            e,
        );
    }

    /// Number of cached pages.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// (hits, misses) since creation.
    pub fn stats(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// Number of entries tagged with `vmid`.
    pub fn count_vmid(&self, vmid: u16) -> usize {
        self.map.keys().filter(|k| k.vmid == vmid).count()
    }

    /// TLBI_NSNH_ALL: everything.
    pub fn invalidate_all(&mut self) {
        self.map.clear();
    }

    /// TLBI_NH_ALL: every stage-1 (ASID-tagged) entry of `vmid`.
    pub fn invalidate_nh_all(&mut self, vmid: u16) {
        self.map
            .retain(|k, _| !(k.vmid == vmid && k.asid.is_some()));
    }

    /// TLBI_NH_ASID.
    pub fn invalidate_asid(&mut self, vmid: u16, asid: u16) {
        self.map
            .retain(|k, _| !(k.vmid == vmid && k.asid == Some(asid)));
    }

    /// TLBI_NH_VA (`asid` Some) / TLBI_NH_VAA (`asid` None: every ASID).
    pub fn invalidate_va(&mut self, vmid: u16, asid: Option<u16>, va: u64) {
        self.map.retain(|k, e| {
            let tagged = k.vmid == vmid && k.asid.is_some() && (asid.is_none() || k.asid == asid);
            !(tagged && e.covers(va))
        });
    }

    /// TLBI_S12_VMALL: every entry of `vmid`.
    pub fn invalidate_vmid(&mut self, vmid: u16) {
        self.map.retain(|k, _| k.vmid != vmid);
    }

    /// TLBI_S2_IPA: the entries of `vmid` translated through `ipa`.
    pub fn invalidate_ipa(&mut self, vmid: u16, ipa: u64) {
        self.map
            .retain(|k, e| !(k.vmid == vmid && e.covers_ipa(ipa)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(in_base: u64, size_bits: u32, ipa: Option<u64>) -> Entry {
        Entry {
            in_base,
            size_bits,
            out_base: 0x1000,
            perm: Perm::RW,
            ipa_base: ipa,
            ipa_size_bits: 12,
        }
    }

    #[test]
    fn invalidations_are_scoped() {
        let mut t = Iotlb::default();
        t.insert(1, Some(5), 0x1000, e(0x1000, 12, None));
        t.insert(1, Some(6), 0x1000, e(0x1000, 12, None));
        t.insert(2, Some(5), 0x1000, e(0x1000, 12, None));
        t.insert(1, None, 0x3000, e(0x3000, 12, Some(0x3000)));
        // Two pages of one 2 MiB block.
        t.insert(1, Some(5), 0x20_0000, e(0x20_0000, 21, None));
        t.insert(1, Some(5), 0x20_1000, e(0x20_0000, 21, None));
        assert!(t.lookup(1, Some(5), 0x1fff).is_some());
        assert!(t.lookup(1, Some(7), 0x1000).is_none());
        t.invalidate_va(1, Some(5), 0x20_1234);
        assert!(t.lookup(1, Some(5), 0x20_0000).is_none());
        assert!(t.lookup(1, Some(5), 0x20_1000).is_none());
        assert_eq!(t.len(), 4);
        t.invalidate_asid(1, 5);
        assert!(t.lookup(1, Some(5), 0x1000).is_none());
        assert!(t.lookup(1, Some(6), 0x1000).is_some());
        t.invalidate_ipa(1, 0x3fff);
        assert!(t.lookup(1, None, 0x3000).is_none());
        t.invalidate_nh_all(1);
        assert!(t.lookup(1, Some(6), 0x1000).is_none());
        assert!(t.lookup(2, Some(5), 0x1000).is_some());
        t.invalidate_vmid(2);
        assert!(t.is_empty());
    }
}
