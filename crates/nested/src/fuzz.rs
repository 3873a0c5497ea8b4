//! Fuzzing entry point for the page walker and the copy path (`cargo fuzz` wires
//! [`fuzz_walk`] as a target; the crate's tests call it with seeded random input).
//!
//! Input layout: bytes 0..8 the virtual address, 8..16 the CR3 value, byte 16 flags
//! (bits 1:0 access kind 0/3 read, 1 write, 2 fetch; bit 2 user; bit 3 "tame": every
//! 8-byte word's address bits are folded into the test memory so walks go deep; bit 4
//! fold CR3 likewise), byte 17 copy length in 61-byte units, the rest the contents of a
//! 64 KiB guest memory (zero padded). Everything is hostile; the function asserts the
//! walker's invariants and panics only on a real bug.

use crate::copy::{AddressSpace, NestedGuests};
use crate::level::LevelId;
use crate::memory::{GuestPhysMemory, MmapMemory};
use crate::walk::{self, AccessKind, AccessMode, Cr3, WalkError, PTE_ADDR_MASK};

const MEM_SIZE: u64 = 16 * 4096;

fn le64(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = data.get(at..) {
        let n = s.len().min(8);
        b[..n].copy_from_slice(&s[..n]);
    }
    u64::from_le_bytes(b)
}

/// Fold a random word into an entry that points inside the test memory, biased towards
/// present entries and valid large pages so that walks often reach a leaf.
fn fold(v: u64) -> u64 {
    use crate::walk::{PTE_P, PTE_PS};
    let mut page = ((v & PTE_ADDR_MASK) >> 12) % (MEM_SIZE >> 12);
    let mut e = v & !PTE_ADDR_MASK;
    // PS only when bit 8 agrees (1 in 4), present 3 in 4.
    if v & (1 << 8) == 0 {
        e &= !PTE_PS;
    }
    if v & (1 << 10) != 0 {
        e |= PTE_P;
    }
    // Half the large pages get a correctly aligned (zero) address.
    if e & PTE_PS != 0 && v & (1 << 9) != 0 {
        page = 0;
    }
    e | (page << 12)
}

/// Walk a random address through random page tables and check the results.
pub fn fuzz_walk(data: &[u8]) {
    run(data);
}

/// What a run ended in (for the coverage test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Skipped,
    Ok(crate::walk::PageSize),
    NonCanonical,
    Fault(crate::walk::PtLevel, crate::walk::FaultReason),
    Unreadable,
}

fn run(data: &[u8]) -> Outcome {
    let va = le64(data, 0);
    let flags = data.get(16).copied().unwrap_or(0);
    let copy_units = data.get(17).copied().unwrap_or(0);
    let mut cr3_raw = le64(data, 8);
    if flags & 0x10 != 0 {
        cr3_raw = fold(cr3_raw) & (PTE_ADDR_MASK | 0xfff);
    }
    let kind = match flags & 3 {
        1 => AccessKind::Write,
        2 => AccessKind::Fetch,
        _ => AccessKind::Read,
    };
    let access = AccessMode {
        kind,
        user: flags & 4 != 0,
    };
    let Ok(mem) = MmapMemory::anonymous(MEM_SIZE) else {
        return Outcome::Skipped;
    };
    let body = data.get(18..).unwrap_or(&[]);
    let body = &body[..body.len().min(MEM_SIZE as usize)];
    if flags & 8 != 0 {
        for (i, w) in body.chunks(8).enumerate() {
            let v = fold(le64(w, 0));
            mem.write_u64(i as u64 * 8, v).expect("in range");
        }
    } else {
        mem.write(0, body).expect("in range");
    }
    let Some(cr3) = Cr3::new(cr3_raw) else {
        return Outcome::Skipped;
    };

    let r1 = walk::walk(&mem, cr3, va, access);
    let r2 = walk::walk(&mem, cr3, va, access);
    assert_eq!(r1, r2, "the walk must not change memory or depend on state");
    let outcome = match &r1 {
        Ok(t) => Outcome::Ok(t.page_size),
        Err(WalkError::NonCanonical { .. }) => Outcome::NonCanonical,
        Err(WalkError::Fault { level, reason, .. }) => Outcome::Fault(*level, *reason),
        Err(WalkError::TableUnreadable { .. }) => Outcome::Unreadable,
    };
    match &r1 {
        Ok(t) => {
            let size = t.page_size.bytes();
            assert_eq!(t.gpa & (size - 1), va & (size - 1));
            assert!(t.gpa < 1 << 52);
            assert!(t.bytes_to_page_end() >= 1 && t.bytes_to_page_end() <= size);
            match kind {
                AccessKind::Write => assert!(t.writable),
                AccessKind::Fetch => assert!(t.executable),
                AccessKind::Read => {}
            }
            if access.user {
                assert!(t.user);
            }
        }
        Err(WalkError::NonCanonical { va: v }) => {
            assert_eq!(*v, va);
            assert!(!walk::is_canonical(va));
        }
        Err(WalkError::Fault {
            table,
            entry,
            level,
            ..
        }) => {
            assert!(walk::is_canonical(va));
            let shift = 12 + 9 * (*level as u32 - 1);
            let at = table | (((va >> shift) & 0x1ff) << 3);
            assert_eq!(
                mem.read_u64(at).ok(),
                Some(*entry),
                "reported entry must be the one read"
            );
        }
        Err(WalkError::TableUnreadable { table, .. }) => {
            assert!(
                *table >= MEM_SIZE,
                "a table inside memory is always readable"
            );
        }
    }

    // The copy path over the same memory: never panics, zero-fills the tail.
    let Ok(mut nested) = NestedGuests::new(&mem) else {
        return outcome;
    };
    let Ok(window) = crate::level::Window::new(0, MEM_SIZE) else {
        return outcome;
    };
    let Ok(l1) = nested.add_level(LevelId::HOST, window) else {
        return outcome;
    };
    let mut buf = vec![0xaau8; usize::from(copy_units) * 61];
    let space = AddressSpace::Virtual {
        cr3,
        user: access.user,
    };
    match nested.copy_from_guest(l1, space, va, &mut buf) {
        Ok(()) => {}
        Err(e) => {
            let copied = usize::try_from(e.copied()).unwrap_or(usize::MAX);
            assert!(copied <= buf.len());
            assert!(
                buf[copied..].iter().all(|&b| b == 0),
                "tail must be zero-filled"
            );
            assert!(e.hcall_code() < 0);
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::walk::{FaultReason, PageSize, PtLevel};
    use std::collections::HashSet;

    /// The seeded random inputs reach every page size and every fault class, so the
    /// never-panics property is checked on deep walks, not just on early exits.
    #[test]
    fn seeded_inputs_cover_all_outcomes() {
        let mut x: u64 = 0x5eed_0000_0000_0001;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut seen = HashSet::new();
        let mut data = vec![0u8; 18 + 4 * 4096];
        for i in 0..4000u32 {
            for c in data.chunks_mut(8) {
                let v = next().to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
            // Mostly canonical low addresses; folded tables, or raw tables under a
            // folded CR3 (entries then point anywhere).
            if i % 8 != 0 {
                data[5] &= 0x7f;
                data[6] = 0;
                data[7] = 0;
            }
            if i % 4 != 0 {
                data[16] |= 0x18;
            } else {
                data[16] = (data[16] & !0x08) | 0x10;
            }
            seen.insert(run(&data));
        }
        for o in [
            Outcome::Ok(PageSize::Size4K),
            Outcome::Ok(PageSize::Size2M),
            Outcome::Ok(PageSize::Size1G),
            Outcome::NonCanonical,
            Outcome::Fault(PtLevel::Pml4, FaultReason::NotPresent),
            Outcome::Fault(PtLevel::Pdpt, FaultReason::NotPresent),
            Outcome::Fault(PtLevel::Pd, FaultReason::NotPresent),
            Outcome::Fault(PtLevel::Pt, FaultReason::NotPresent),
            Outcome::Fault(PtLevel::Pml4, FaultReason::Reserved),
            Outcome::Fault(PtLevel::Pdpt, FaultReason::Reserved),
            Outcome::Fault(PtLevel::Pd, FaultReason::Reserved),
            Outcome::Unreadable,
        ] {
            assert!(seen.contains(&o), "never reached {o:?}; seen {seen:?}");
        }
        assert!(seen
            .iter()
            .any(|o| matches!(o, Outcome::Fault(_, FaultReason::NotWritable))));
        assert!(seen
            .iter()
            .any(|o| matches!(o, Outcome::Fault(_, FaultReason::NoExecute))));
        assert!(seen
            .iter()
            .any(|o| matches!(o, Outcome::Fault(_, FaultReason::NotUser))));
    }
}
