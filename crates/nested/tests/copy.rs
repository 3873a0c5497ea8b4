//! The H_COPY_TOFROM_GUEST layer: host memfd memory, an L1 guest, an L2 guest whose own
//! page tables map its virtual addresses.

mod common;

use common::{pattern, PtBuilder};
use nestio_nested::walk::{PTE_RW, PTE_US};
use nestio_nested::{
    hcall_code, AccessMode, AddressSpace, CopyError, Cr3, GuestPhysMemory, HcallArgs, HcallStatus,
    LevelId, MmapMemory, NestedGuests, PageSize, Window, MAX_COPY_LEN, PHYSICAL_PID,
};

const HOST: u64 = 16 << 20;
const L1_BASE: u64 = 1 << 20;
const L1_SIZE: u64 = 12 << 20;
const L2_BASE: u64 = 2 << 20; // in L1's space
const L2_SIZE: u64 = 8 << 20;
const L2_HOST: u64 = L1_BASE + L2_BASE;

const PT_POOL: u64 = 0x10_0000; // L2 gpa of its page tables
const VA: u64 = 0x4000_0000; // two 4 KiB pages, not contiguous in gpa
const GPA_A: u64 = 0x30_0000;
const GPA_B: u64 = 0x30_9000;
const VA_RO: u64 = 0x4000_2000;
const GPA_RO: u64 = 0x31_0000;
const VA_HOLE: u64 = 0x4000_3000; // not mapped
const VA_2M: u64 = 0x8000_0000;
const GPA_2M: u64 = 0x40_0000;
const VA_1G: u64 = 0xffff_ff80_0000_0000; // 1 GiB page at gpa 0
const VA_FAR: u64 = 0x4000_4000; // maps beyond L2's memory
const VA_USER_NO: u64 = 0x4000_5000; // supervisor-only page

struct Env {
    nested: NestedGuests<MmapMemory>,
    l1: LevelId,
    l2: LevelId,
    cr3: Cr3,
}

fn env() -> Env {
    let host = MmapMemory::memfd(HOST).unwrap();
    let mut nested = NestedGuests::new(host).unwrap();
    let l1 = nested
        .add_level(LevelId::HOST, Window::new(L1_BASE, L1_SIZE).unwrap())
        .unwrap();
    let l2 = nested
        .add_level(l1, Window::new(L2_BASE, L2_SIZE).unwrap())
        .unwrap();
    let cr3 = {
        let mem = nested.memory(l2).unwrap();
        let mut b = PtBuilder::new(&mem, PT_POOL);
        let f = PTE_RW | PTE_US;
        b.map(VA, GPA_A, PageSize::Size4K, f);
        b.map(VA + 0x1000, GPA_B, PageSize::Size4K, f);
        b.map(VA_RO, GPA_RO, PageSize::Size4K, PTE_US);
        b.map(VA_2M, GPA_2M, PageSize::Size2M, f);
        b.map(VA_1G, 0, PageSize::Size1G, f);
        b.map(VA_FAR, 0x1_0000_0000, PageSize::Size4K, f);
        b.map(VA_USER_NO, GPA_A, PageSize::Size4K, PTE_RW);
        b.cr3
    };
    Env {
        nested,
        l1,
        l2,
        cr3: Cr3::new(cr3).unwrap(),
    }
}

fn virt(e: &Env) -> AddressSpace {
    AddressSpace::Virtual {
        cr3: e.cr3,
        user: false,
    }
}

fn host_bytes(e: &Env, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    e.nested.host().read(addr, &mut b).unwrap();
    b
}

#[test]
fn copy_virtual_across_pages_lands_in_each_page() {
    let e = env();
    let data = pattern(0x1800, 3);
    // Starts 0x800 before the end of page A, ends 0x1000 into page B.
    e.nested
        .copy_to_guest(e.l2, virt(&e), VA + 0x800, &data)
        .unwrap();
    assert_eq!(
        host_bytes(&e, L2_HOST + GPA_A + 0x800, 0x800),
        data[..0x800]
    );
    assert_eq!(host_bytes(&e, L2_HOST + GPA_B, 0x1000), data[0x800..]);
    // The byte after page A in gpa space was not written.
    assert_eq!(host_bytes(&e, L2_HOST + GPA_A + 0x1000, 1), [0]);
    let mut back = vec![0u8; data.len()];
    e.nested
        .copy_from_guest(e.l2, virt(&e), VA + 0x800, &mut back)
        .unwrap();
    assert_eq!(back, data);
    // Translation helper used by inspect.
    assert_eq!(
        e.nested
            .translate(e.l2, virt(&e), VA + 0x1004, AccessMode::READ)
            .unwrap(),
        GPA_B + 4
    );
}

#[test]
fn copy_through_2m_and_1g_pages() {
    let e = env();
    let data = pattern(0x3000, 9);
    // Crosses 4 KiB boundaries inside one 2 MiB page.
    e.nested
        .copy_to_guest(e.l2, virt(&e), VA_2M + 0xf00, &data)
        .unwrap();
    assert_eq!(host_bytes(&e, L2_HOST + GPA_2M + 0xf00, data.len()), data);
    // The 1 GiB page maps gpa 0: the same bytes are visible at VA_1G + GPA_2M.
    let mut back = vec![0u8; data.len()];
    e.nested
        .copy_from_guest(e.l2, virt(&e), VA_1G + GPA_2M + 0xf00, &mut back)
        .unwrap();
    assert_eq!(back, data);
}

#[test]
fn copy_physical_reads_level_memory() {
    let e = env();
    let data = pattern(0x2100, 1);
    e.nested
        .copy_to_guest(e.l2, AddressSpace::Physical, 0x5_0f00, &data)
        .unwrap();
    assert_eq!(host_bytes(&e, L2_HOST + 0x5_0f00, data.len()), data);
    // L1 sees L2's memory at L2_BASE.
    let mut back = vec![0u8; data.len()];
    e.nested
        .copy_from_guest(e.l1, AddressSpace::Physical, L2_BASE + 0x5_0f00, &mut back)
        .unwrap();
    assert_eq!(back, data);
}

fn hargs(e: &Env, pid: u64, eaddr: u64, gp_to: u64, gp_from: u64, n: u64) -> HcallArgs {
    HcallArgs {
        lpid: u64::from(e.l2.raw()),
        pid,
        eaddr,
        gp_to,
        gp_from,
        n,
    }
}

#[test]
fn hcall_parameter_errors() {
    let e = env();
    let cr3 = e.cr3.raw();
    type Check = fn(&CopyError) -> bool;
    let cases: Vec<(HcallArgs, Check)> = vec![
        (hargs(&e, cr3, VA, 0x1000, 0x2000, 8), |x| {
            matches!(x, CopyError::BothDirections { .. })
        }),
        (hargs(&e, cr3, VA, 0, 0, 8), |x| {
            matches!(x, CopyError::NoDirection)
        }),
        // Bits 63:52 set on a physical address.
        (hargs(&e, PHYSICAL_PID, 1 << 52, 0x1000, 0, 8), |x| {
            matches!(x, CopyError::BadAddress { .. })
        }),
        (
            hargs(&e, PHYSICAL_PID, 0xfff0_0000_0000_0000, 0x1000, 0, 8),
            |x| matches!(x, CopyError::BadAddress { .. }),
        ),
        // Non-canonical virtual address.
        (hargs(&e, cr3, 0x0000_8000_0000_0000, 0x1000, 0, 8), |x| {
            matches!(x, CopyError::BadAddress { .. })
        }),
        // A pid that is not a CR3.
        (hargs(&e, 1 << 60, VA, 0x1000, 0, 8), |x| {
            matches!(x, CopyError::BadAddressSpace { .. })
        }),
        // Unknown level ids, including the host and ids that do not fit.
        (
            HcallArgs {
                lpid: 77,
                ..hargs(&e, cr3, VA, 0x1000, 0, 8)
            },
            |x| matches!(x, CopyError::UnknownLevel { lpid: 77 }),
        ),
        (
            HcallArgs {
                lpid: 0,
                ..hargs(&e, cr3, VA, 0x1000, 0, 8)
            },
            |x| matches!(x, CopyError::UnknownLevel { .. }),
        ),
        (
            HcallArgs {
                lpid: u64::MAX,
                ..hargs(&e, cr3, VA, 0x1000, 0, 8)
            },
            |x| matches!(x, CopyError::UnknownLevel { .. }),
        ),
    ];
    for (args, check) in cases {
        let r = e.nested.h_copy_tofrom_guest(e.l1, &args);
        let err = r.clone().unwrap_err();
        assert!(check(&err), "{args:?}: {err:?}");
        assert_eq!(err.status(), HcallStatus::Parameter);
        assert_eq!(hcall_code(&r), -4);
        assert_eq!(e.nested.hcall(e.l1, &args), -4);
    }
    // The host may not name its grandchild: only a level's own nested guests.
    let r = e
        .nested
        .h_copy_tofrom_guest(LevelId::HOST, &hargs(&e, cr3, VA, 0x1000, 0, 8));
    assert!(matches!(r, Err(CopyError::NotChild { .. })), "{r:?}");
    assert_eq!(hcall_code(&r), -4);
}

#[test]
fn hcall_huge_length_is_no_mem_without_allocating() {
    let e = env();
    for n in [MAX_COPY_LEN + 1, 1 << 40, u64::MAX] {
        let r = e
            .nested
            .h_copy_tofrom_guest(e.l1, &hargs(&e, e.cr3.raw(), VA, 0x1000, 0, n));
        assert!(matches!(r, Err(CopyError::TooLong { .. })), "{r:?}");
        assert_eq!(hcall_code(&r), -9);
    }
    // Exactly the limit is accepted: the copy is attempted, and L2's 8 MiB run out
    // (short copy) while L1's 12 MiB cannot hold a 16 MiB buffer at gp_to.
    let r = e
        .nested
        .h_copy_tofrom_guest(e.l1, &hargs(&e, PHYSICAL_PID, 0, 0x1000, 0, MAX_COPY_LEN));
    assert!(matches!(r, Err(CopyError::ParentMemory { .. })), "{r:?}");
    assert_eq!(hcall_code(&r), -7, "H_NOT_FOUND");
    // Within both memories: a short copy of exactly L2's memory.
    let r = e.nested.h_copy_tofrom_guest(
        e.l1,
        &hargs(&e, PHYSICAL_PID, L2_SIZE - 0x1000, 0x1000, 0, 0x3000),
    );
    assert_eq!(r.unwrap_err().copied(), 0x1000);
}

#[test]
fn hcall_translation_failure_is_not_found() {
    let e = env();
    let cr3 = e.cr3.raw();
    for (eaddr, gp_to, gp_from) in [
        (VA_HOLE, 0x1000, 0), // not present
        (VA_RO, 0, 0x1000),   // write to read-only
        (VA_FAR, 0x1000, 0),  // maps beyond the guest's memory
    ] {
        let r = e
            .nested
            .h_copy_tofrom_guest(e.l1, &hargs(&e, cr3, eaddr, gp_to, gp_from, 16));
        let err = r.clone().unwrap_err();
        assert_eq!(err.status(), HcallStatus::NotFound, "{err}");
        assert_eq!(hcall_code(&r), -7, "H_NOT_FOUND");
        assert_eq!(err.copied(), 0);
    }
    // The read-only page was not modified.
    assert_eq!(host_bytes(&e, L2_HOST + GPA_RO, 16), [0u8; 16]);
    // A user access to a supervisor page fails in the Rust form.
    let mut b = [0u8; 4];
    let r = e.nested.copy_from_guest(
        e.l2,
        AddressSpace::Virtual {
            cr3: e.cr3,
            user: true,
        },
        VA_USER_NO,
        &mut b,
    );
    assert!(matches!(r, Err(CopyError::Translate { .. })), "{r:?}");
    // A parent buffer outside the caller's memory is NotFound too.
    let r = e
        .nested
        .h_copy_tofrom_guest(e.l1, &hargs(&e, cr3, VA, L1_SIZE, 0, 16));
    assert!(matches!(r, Err(CopyError::ParentMemory { .. })), "{r:?}");
    assert_eq!(hcall_code(&r), -7, "H_NOT_FOUND");
}

#[test]
fn hcall_roundtrip_through_parent_memory() {
    let e = env();
    let data = pattern(0x1200, 5);
    let l1_mem = e.nested.memory(e.l1).unwrap();
    // The L1 hypervisor's buffer at its gpa 0x8000.
    l1_mem.write(0x8000, &data).unwrap();
    let args = hargs(&e, e.cr3.raw(), VA + 0xe00, 0, 0x8000, data.len() as u64);
    assert_eq!(
        e.nested.h_copy_tofrom_guest(e.l1, &args),
        Ok(data.len() as u64)
    );
    assert_eq!(e.nested.hcall(e.l1, &args), 0);
    let args = hargs(&e, e.cr3.raw(), VA + 0xe00, 0x2_0000, 0, data.len() as u64);
    assert_eq!(e.nested.hcall(e.l1, &args), 0);
    let mut back = vec![0u8; data.len()];
    l1_mem.read(0x2_0000, &mut back).unwrap();
    assert_eq!(back, data);
    // n = 0 succeeds and copies nothing.
    let args = hargs(&e, e.cr3.raw(), VA, 0x3_0000, 0, 0);
    assert_eq!(e.nested.h_copy_tofrom_guest(e.l1, &args), Ok(0));
}

#[test]
fn short_read_reports_count_and_zero_fills_tail() {
    let e = env();
    let data = pattern(0x1000, 7);
    e.nested
        .copy_to_guest(e.l2, AddressSpace::Physical, GPA_RO, &data)
        .unwrap();
    // VA_RO is mapped, VA_HOLE (next page) is not: a read from VA_RO+0x800 of 0x1000
    // bytes copies 0x800 and stops.
    let mut buf = vec![0xffu8; 0x1000];
    let err = e
        .nested
        .copy_from_guest(e.l2, virt(&e), VA_RO + 0x800, &mut buf)
        .unwrap_err();
    assert_eq!(err.copied(), 0x800);
    assert_eq!(err.status(), HcallStatus::NotFound);
    assert_eq!(buf[..0x800], data[0x800..]);
    assert!(buf[0x800..].iter().all(|&b| b == 0));

    // The hcall delivers the copied part and the zero tail to gp_to.
    let l1_mem = e.nested.memory(e.l1).unwrap();
    l1_mem.write(0x4000, &[0xff; 0x1000]).unwrap();
    let args = hargs(&e, e.cr3.raw(), VA_RO + 0x800, 0x4000, 0, 0x1000);
    let r = e.nested.h_copy_tofrom_guest(e.l1, &args);
    assert_eq!(hcall_code(&r), -7, "H_NOT_FOUND");
    assert_eq!(r.unwrap_err().copied(), 0x800);
    let mut got = vec![0u8; 0x1000];
    l1_mem.read(0x4000, &mut got).unwrap();
    assert_eq!(got[..0x800], data[0x800..]);
    assert!(got[0x800..].iter().all(|&b| b == 0));

    // A refused copy (parameter error) leaves a zeroed buffer, not stale bytes.
    let mut buf = vec![0xffu8; 64];
    let r = e
        .nested
        .copy_from_guest(e.l2, AddressSpace::Physical, 1 << 60, &mut buf);
    assert_eq!(r.unwrap_err().status(), HcallStatus::Parameter);
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn short_write_reports_count_and_stops() {
    let e = env();
    // Page B of VA is writable; the page after it (VA_RO) is read-only.
    let data = pattern(0x1000, 11);
    let err = e
        .nested
        .copy_to_guest(e.l2, virt(&e), VA + 0x1c00, &data)
        .unwrap_err();
    assert_eq!(err.copied(), 0x400);
    assert_eq!(
        host_bytes(&e, L2_HOST + GPA_B + 0xc00, 0x400),
        data[..0x400]
    );
    assert_eq!(host_bytes(&e, L2_HOST + GPA_RO, 0x1000), vec![0u8; 0x1000]);
}

#[test]
fn physical_copy_stops_at_window_end() {
    let e = env();
    let data = pattern(0x2000, 13);
    let before = host_bytes(&e, L2_HOST + L2_SIZE, 0x1000);
    let err = e
        .nested
        .copy_to_guest(e.l2, AddressSpace::Physical, L2_SIZE - 0x1000, &data)
        .unwrap_err();
    assert_eq!(err.copied(), 0x1000);
    assert_eq!(err.status(), HcallStatus::NotFound);
    assert_eq!(
        host_bytes(&e, L2_HOST + L2_SIZE - 0x1000, 0x1000),
        data[..0x1000]
    );
    // The host memory right after L2's window is untouched.
    assert_eq!(host_bytes(&e, L2_HOST + L2_SIZE, 0x1000), before);
}

#[test]
fn virtual_copy_running_into_the_canonical_hole_is_short() {
    let e = env();
    let mut buf = [0xffu8; 16];
    // The last page below the hole is unmapped anyway; the wrap at the top of the
    // address space is a short copy, not a panic.
    let err = e
        .nested
        .copy_from_guest(e.l2, virt(&e), u64::MAX - 7, &mut buf)
        .unwrap_err();
    assert_eq!(err.status(), HcallStatus::NotFound);
    assert_eq!(buf, [0u8; 16]);
}

#[test]
fn page_tables_cannot_reach_outside_the_guest_window() {
    let e = env();
    // Put a recognisable "table" in L1's memory just past L2's window, then point L2's
    // PDPT entry for VA at it: the walker must refuse, not read L1's memory.
    let l1_mem = e.nested.memory(e.l1).unwrap();
    let outside = L2_BASE + L2_SIZE; // L1 gpa right after L2's window
    l1_mem.write_u64(outside, 0x1000 | 0x7).unwrap();
    let l2_mem = e.nested.memory(e.l2).unwrap();
    let at = PtBuilder::with_root(&l2_mem, e.cr3.pml4(), 0x7_0000).entry_addr(VA, 3);
    // Tables are addressed in L2's own space: L2 gpa L2_SIZE is just past its memory.
    l2_mem.write_u64(at, L2_SIZE | 0x7).unwrap();
    let mut b = [0u8; 8];
    let err = e
        .nested
        .copy_from_guest(e.l2, virt(&e), VA, &mut b)
        .unwrap_err();
    match &err {
        CopyError::Translate {
            source: nestio_nested::WalkError::TableUnreadable { level, table, .. },
            ..
        } => {
            assert_eq!(*level, nestio_nested::PtLevel::Pd);
            assert_eq!(*table, L2_SIZE);
        }
        other => panic!("expected an unreadable table, got {other:?}"),
    }
    assert_eq!(err.status(), HcallStatus::NotFound);
}
