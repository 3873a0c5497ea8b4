//! The x86-64 page walker against tables built in memfd-backed memory.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::{PtBuilder, Rng};
use nestio_nested::walk::{PTE_P, PTE_PS, PTE_RW, PTE_US, PTE_XD};
use nestio_nested::{
    fuzz_walk, walk, AccessMode, Cr3, FaultReason, GuestPhysMemory, MemError, MmapMemory, PageSize,
    PtLevel, WalkError,
};

const MEM: u64 = 4 << 20;
const POOL: u64 = 0x10_0000;
const VA_4K: u64 = 0x0000_0040_0000_0000 + 0x1234_5000; // distinct PML4 index
const VA_2M: u64 = 0x0000_0080_0000_0000 + 0x4000_0000 + 0x20_0000;
const VA_1G: u64 = 0xffff_8000_0000_0000 + 0x4000_0000;

fn rw_all() -> u64 {
    PTE_RW | PTE_US
}

struct Setup {
    mem: MmapMemory,
    cr3: Cr3,
}

fn setup() -> Setup {
    let mem = MmapMemory::memfd(MEM).unwrap();
    let cr3 = {
        let mut b = PtBuilder::new(&mem, POOL);
        b.map(VA_4K, 0x5000, PageSize::Size4K, rw_all());
        b.map(VA_2M, 0x20_0000, PageSize::Size2M, rw_all());
        b.map(VA_1G, 0x4000_0000, PageSize::Size1G, rw_all());
        b.cr3
    };
    Setup {
        mem,
        cr3: Cr3::new(cr3).unwrap(),
    }
}

fn fault(r: Result<nestio_nested::Translation, WalkError>) -> (PtLevel, FaultReason) {
    match r {
        Err(WalkError::Fault { level, reason, .. }) => (level, reason),
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[test]
fn walk_translates_4k_2m_1g_pages() {
    let s = setup();
    let t = walk(&s.mem, s.cr3, VA_4K + 0x123, AccessMode::READ).unwrap();
    assert_eq!(t.gpa, 0x5123);
    assert_eq!(t.page_size, PageSize::Size4K);
    assert_eq!(t.bytes_to_page_end(), 0x1000 - 0x123);
    assert!(t.writable && t.user && t.executable);

    let t = walk(&s.mem, s.cr3, VA_2M + 0x1_2345, AccessMode::WRITE).unwrap();
    assert_eq!(t.gpa, 0x21_2345);
    assert_eq!(t.page_size, PageSize::Size2M);

    let t = walk(
        &s.mem,
        s.cr3,
        VA_1G + 0x3456_789a,
        AccessMode::FETCH.as_user(),
    )
    .unwrap();
    assert_eq!(t.gpa, 0x4000_0000 + 0x3456_789a);
    assert_eq!(t.page_size, PageSize::Size1G);
    assert_eq!(t.bytes_to_page_end(), 0x4000_0000 - 0x3456_789a);
}

#[test]
fn walk_low_bits_of_cr3_are_ignored() {
    let s = setup();
    let cr3 = Cr3::new(s.cr3.raw() | 0x18 | 0x5).unwrap(); // PWT, PCD, PCID bits
    assert_eq!(
        walk(&s.mem, cr3, VA_4K, AccessMode::READ).unwrap().gpa,
        0x5000
    );
}

#[test]
fn walk_not_present_at_each_level() {
    for (level, va, pt) in [
        (4, VA_4K, PtLevel::Pml4),
        (3, VA_4K, PtLevel::Pdpt),
        (2, VA_4K, PtLevel::Pd),
        (1, VA_4K, PtLevel::Pt),
        (3, VA_1G, PtLevel::Pdpt),
        (2, VA_2M, PtLevel::Pd),
    ] {
        let s = setup();
        builder(&s).modify(va, level, 0, PTE_P);
        let err = walk(&s.mem, s.cr3, va, AccessMode::READ).unwrap_err();
        assert_eq!(err.level(), Some(pt), "{err}");
        assert_eq!(err.reason(), Some(FaultReason::NotPresent));
        // The message names the level and the reason.
        let msg = err.to_string();
        assert!(
            msg.contains(&pt.to_string()) && msg.contains("not present"),
            "{msg}"
        );
    }
}

fn builder(s: &Setup) -> PtBuilder<'_, MmapMemory> {
    PtBuilder::with_root(&s.mem, s.cr3.pml4(), POOL + 0x8_0000)
}

#[test]
fn walk_write_needs_rw_at_every_level() {
    let s = setup();
    builder(&s).modify(VA_4K, 3, 0, PTE_RW);
    // Reads still work; the translation says it is not writable.
    let t = walk(&s.mem, s.cr3, VA_4K, AccessMode::READ).unwrap();
    assert!(!t.writable);
    assert_eq!(
        fault(walk(&s.mem, s.cr3, VA_4K, AccessMode::WRITE)),
        (PtLevel::Pdpt, FaultReason::NotWritable)
    );
    // Leaf read-only on a 2 MiB page.
    builder(&s).modify(VA_2M, 2, 0, PTE_RW);
    assert_eq!(
        fault(walk(&s.mem, s.cr3, VA_2M, AccessMode::WRITE)),
        (PtLevel::Pd, FaultReason::NotWritable)
    );
}

#[test]
fn walk_user_needs_us_at_every_level() {
    let s = setup();
    builder(&s).modify(VA_4K, 2, 0, PTE_US);
    // Supervisor access to the page is fine (no SMAP model).
    walk(&s.mem, s.cr3, VA_4K, AccessMode::WRITE).unwrap();
    assert_eq!(
        fault(walk(&s.mem, s.cr3, VA_4K, AccessMode::READ.as_user())),
        (PtLevel::Pd, FaultReason::NotUser)
    );
    // A 1 GiB supervisor page.
    builder(&s).modify(VA_1G, 3, 0, PTE_US);
    assert_eq!(
        fault(walk(&s.mem, s.cr3, VA_1G, AccessMode::WRITE.as_user())),
        (PtLevel::Pdpt, FaultReason::NotUser)
    );
}

#[test]
fn walk_fetch_refused_by_xd_at_any_level() {
    let s = setup();
    builder(&s).modify(VA_4K, 1, PTE_XD, 0);
    let t = walk(&s.mem, s.cr3, VA_4K, AccessMode::READ).unwrap();
    assert!(!t.executable);
    assert_eq!(
        fault(walk(&s.mem, s.cr3, VA_4K, AccessMode::FETCH)),
        (PtLevel::Pt, FaultReason::NoExecute)
    );
    builder(&s).modify(VA_2M, 4, PTE_XD, 0);
    assert_eq!(
        fault(walk(&s.mem, s.cr3, VA_2M, AccessMode::FETCH)),
        (PtLevel::Pml4, FaultReason::NoExecute)
    );
}

#[test]
fn walk_not_present_beats_permission_like_hardware() {
    let s = setup();
    builder(&s).modify(VA_4K, 4, 0, PTE_RW);
    builder(&s).modify(VA_4K, 1, 0, PTE_P);
    assert_eq!(
        fault(walk(&s.mem, s.cr3, VA_4K, AccessMode::WRITE)),
        (PtLevel::Pt, FaultReason::NotPresent)
    );
}

#[test]
fn walk_reserved_bits() {
    let s = setup();
    // PS in a PML4 entry is reserved.
    builder(&s).modify(VA_4K, 4, PTE_PS, 0);
    assert_eq!(
        fault(walk(&s.mem, s.cr3, VA_4K, AccessMode::READ)),
        (PtLevel::Pml4, FaultReason::Reserved)
    );
    // A 2 MiB page whose address has bit 13 set.
    builder(&s).modify(VA_2M, 2, 1 << 13, 0);
    assert_eq!(
        fault(walk(&s.mem, s.cr3, VA_2M, AccessMode::READ)),
        (PtLevel::Pd, FaultReason::Reserved)
    );
    // A 1 GiB page whose address has bit 21 set.
    builder(&s).modify(VA_1G, 3, 1 << 21, 0);
    assert_eq!(
        fault(walk(&s.mem, s.cr3, VA_1G, AccessMode::READ)),
        (PtLevel::Pdpt, FaultReason::Reserved)
    );
}

#[test]
fn walk_large_page_pat_bit_is_not_address() {
    let s = setup();
    // Bit 12 of a large-page entry is PAT, not an address bit.
    builder(&s).modify(VA_2M, 2, 1 << 12, 0);
    let t = walk(&s.mem, s.cr3, VA_2M + 8, AccessMode::READ).unwrap();
    assert_eq!(t.gpa, 0x20_0008);
}

#[test]
fn walk_table_outside_memory() {
    let s = setup();
    let at = builder(&s).entry_addr(VA_4K, 3);
    let e = s.mem.read_u64(at).unwrap();
    // Point the PDPT entry at a PD far beyond the 4 MiB memory.
    s.mem
        .write_u64(at, (e & 0xfff) | 0x0000_0fff_0000_0000)
        .unwrap();
    let err = walk(&s.mem, s.cr3, VA_4K, AccessMode::READ).unwrap_err();
    assert!(
        matches!(
            err,
            WalkError::TableUnreadable {
                level: PtLevel::Pd,
                table: 0x0000_0fff_0000_0000,
                source: MemError::OutOfRange { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn walk_non_canonical() {
    let s = setup();
    let err = walk(&s.mem, s.cr3, 0x0000_8000_0000_0000, AccessMode::READ).unwrap_err();
    assert_eq!(
        err,
        WalkError::NonCanonical {
            va: 0x0000_8000_0000_0000
        }
    );
    assert_eq!(err.level(), None);
}

/// Counts reads; each must be one 8-byte entry.
struct Counting<'a> {
    inner: &'a MmapMemory,
    reads: AtomicUsize,
}

impl GuestPhysMemory for Counting<'_> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        assert_eq!(buf.len(), 8);
        assert_eq!(gpa % 8, 0);
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read(gpa, buf)
    }
    fn write(&self, _gpa: u64, _data: &[u8]) -> Result<(), MemError> {
        panic!("the walker must never write");
    }
}

#[test]
fn walk_reads_each_entry_once() {
    let s = setup();
    for (va, expect) in [(VA_4K, 4), (VA_2M, 3), (VA_1G, 2)] {
        let c = Counting {
            inner: &s.mem,
            reads: AtomicUsize::new(0),
        };
        walk(&c, s.cr3, va, AccessMode::WRITE.as_user()).unwrap();
        assert_eq!(c.reads.load(Ordering::Relaxed), expect);
    }
}

#[test]
fn walk_self_referencing_tables_terminate() {
    // A PML4 whose entry points to itself at every level: the walk is bounded by 4 reads
    // and ends in a 4 KiB "page" that is the PML4 itself.
    let mem = MmapMemory::memfd(0x10000).unwrap();
    mem.write_u64(0x1000, 0x1000 | PTE_P | PTE_RW).unwrap();
    let t = walk(&mem, Cr3::new(0x1000).unwrap(), 0x18, AccessMode::READ).unwrap();
    assert_eq!(t.gpa, 0x1018);
    assert_eq!(t.page_size, PageSize::Size4K);
}

#[test]
fn hostile_page_tables_never_panic() {
    let mut rng = Rng(0x6e65_7374_696f_0000);
    let mut data = vec![0u8; 18 + 64 * 1024];
    for i in 0..3000 {
        // Vary how much of memory is random to mix sparse and dense tables.
        let len = 18 + (rng.next_u64() as usize % (data.len() - 18));
        rng.fill(&mut data[..len]);
        // Half the runs fold addresses into memory so that walks reach the leaves.
        data[16] = (data[16] & !0x18) | if i % 2 == 0 { 0x18 } else { 0 };
        fuzz_walk(&data[..len]);
    }
    // Short and empty inputs.
    for len in 0..20 {
        fuzz_walk(&data[..len]);
    }
}
