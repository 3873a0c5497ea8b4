//! Window composition at depth 3, isolation, and the nested DMA adaptor.

mod common;

use std::sync::Arc;

use common::{pattern, PtBuilder};
use nestio_dma::{Access, DmaBacking, DmaError, DmaMapRequest, DmaRange, DmaSpace, MapTable, Prot};
use nestio_nested::walk::{PTE_RW, PTE_US};
use nestio_nested::{
    nested_dma_space, AddressSpace, Cr3, DmaMemory, GuestPhysMemory, LevelError, LevelId, MemError,
    MmapMemory, NestedDma, NestedGuests, PageSize, Window,
};

const HOST: u64 = 16 << 20;
// L1 = host [2 MiB, +8 MiB); L2 = L1 [1 MiB, +4 MiB); L3 = L2 [512 KiB, +1 MiB).
const W1: (u64, u64) = (2 << 20, 8 << 20);
const W2: (u64, u64) = (1 << 20, 4 << 20);
const W3: (u64, u64) = (512 << 10, 1 << 20);
const L3_HOST: u64 = W1.0 + W2.0 + W3.0;

fn three_levels() -> (NestedGuests<MmapMemory>, [LevelId; 3]) {
    let mut n = NestedGuests::new(MmapMemory::memfd(HOST).unwrap()).unwrap();
    let l1 = n
        .add_level(LevelId::HOST, Window::new(W1.0, W1.1).unwrap())
        .unwrap();
    let l2 = n.add_level(l1, Window::new(W2.0, W2.1).unwrap()).unwrap();
    let l3 = n.add_level(l2, Window::new(W3.0, W3.1).unwrap()).unwrap();
    (n, [l1, l2, l3])
}

fn host_snapshot(n: &NestedGuests<MmapMemory>) -> Vec<u8> {
    let mut b = vec![0u8; HOST as usize];
    n.host().read(0, &mut b).unwrap();
    b
}

#[test]
fn depth3_windows_compose_to_host() {
    let (n, [l1, l2, l3]) = three_levels();
    let lv = n.levels();
    assert_eq!(lv.to_host(l3, 0x10, 1).unwrap(), L3_HOST + 0x10);
    assert_eq!(lv.to_parent(l3, 0x10, 1).unwrap(), W3.0 + 0x10);
    assert_eq!(lv.to_host(l2, W3.0 + 0x10, 1).unwrap(), L3_HOST + 0x10);
    assert_eq!(
        lv.host_window(l3).unwrap(),
        Window::new(L3_HOST, W3.1).unwrap()
    );
    assert_eq!(lv.chain(l3).unwrap(), vec![l3, l2, l1, LevelId::HOST]);
    assert_eq!(lv.get(l3).unwrap().depth(), 3);
    assert!(lv.is_child_of(l3, l2) && !lv.is_child_of(l3, l1));
    // A write through L3's view is visible to every ancestor at the composed address.
    let data = pattern(0x300, 2);
    n.memory(l3).unwrap().write(0x1000, &data).unwrap();
    let mut b = vec![0u8; data.len()];
    n.memory(l1)
        .unwrap()
        .read(W2.0 + W3.0 + 0x1000, &mut b)
        .unwrap();
    assert_eq!(b, data);
    n.host().read(L3_HOST + 0x1000, &mut b).unwrap();
    assert_eq!(b, data);
}

#[test]
fn depth3_isolation_writes_outside_refused_memory_untouched() {
    let (n, [_, _, l3]) = three_levels();
    let mem = n.memory(l3).unwrap();
    // Fill L3 so that "untouched" is not trivially zero.
    mem.write(0, &pattern(W3.1 as usize, 4)).unwrap();
    let before = host_snapshot(&n);
    for (gpa, len) in [
        (W3.1, 1),
        (W3.1 - 4, 8),
        (u64::MAX - 3, 8),
        (u64::MAX, 1),
        (1 << 40, 16),
    ] {
        let err = mem.write(gpa, &vec![0xee; len]).unwrap_err();
        assert!(
            matches!(err, MemError::OutOfRange { .. } | MemError::Overflow { .. }),
            "{gpa:#x}+{len}: {err:?}"
        );
    }
    // Through the per-level translation too.
    assert!(matches!(
        n.levels().to_host(l3, W3.1, 1),
        Err(LevelError::OutOfWindow { .. })
    ));
    assert!(matches!(
        n.levels().to_host(l3, u64::MAX, 2),
        Err(LevelError::Overflow { .. })
    ));
    // Copies with the copy API are refused (short, nothing written) as well.
    let err = n
        .copy_to_guest(l3, AddressSpace::Physical, W3.1, &[0xee; 32])
        .unwrap_err();
    assert_eq!(err.copied(), 0);
    assert_eq!(host_snapshot(&n), before);
}

#[test]
fn child_window_outside_parent_is_refused() {
    let (mut n, [l1, l2, l3]) = three_levels();
    for (parent, base, size) in [
        (l3, 0, W3.1 + 1),
        (l3, W3.1, 1),
        (l2, W2.1 - 0x1000, 0x2000),
        (l1, u64::MAX - 0x1000, 0x1000),
        (LevelId::HOST, HOST - 1, 2),
    ] {
        let err = n
            .add_level(parent, Window::new(base, size).unwrap())
            .unwrap_err();
        assert!(matches!(err, LevelError::OutsideParent { .. }), "{err}");
    }
    // Exactly the parent's memory is fine.
    let l4 = n.add_level(l3, Window::new(0, W3.1).unwrap()).unwrap();
    assert_eq!(n.levels().host_window(l4).unwrap().base(), L3_HOST);
    assert!(matches!(
        n.remove_level(l3),
        Err(LevelError::HasChildren(_))
    ));
    n.remove_level(l4).unwrap();
    n.remove_level(l3).unwrap();
    assert!(n.memory(l3).is_err());
}

#[test]
fn virtual_copy_in_a_depth3_guest() {
    let (n, [_, l2, l3]) = three_levels();
    let cr3 = {
        let mem = n.memory(l3).unwrap();
        let mut b = PtBuilder::new(&mem, 0x8_0000);
        b.map(0x7000_0000, 0x2000, PageSize::Size4K, PTE_RW | PTE_US);
        b.map(0x7000_1000, 0x5000, PageSize::Size4K, PTE_RW | PTE_US);
        Cr3::new(b.cr3).unwrap()
    };
    let space = AddressSpace::Virtual { cr3, user: true };
    let data = pattern(0x1000, 6);
    n.copy_to_guest(l3, space, 0x7000_0800, &data).unwrap();
    let mut b = vec![0u8; 0x800];
    n.host().read(L3_HOST + 0x2800, &mut b).unwrap();
    assert_eq!(b, data[..0x800]);
    n.host().read(L3_HOST + 0x5000, &mut b).unwrap();
    assert_eq!(b, data[0x800..]);
    // L3's parent (L2) issues the hcall for its nested guest.
    let args = nestio_nested::HcallArgs {
        lpid: u64::from(l3.raw()),
        pid: cr3.raw(),
        eaddr: 0x7000_0800,
        gp_to: 0x3000,
        gp_from: 0,
        n: 0x1000,
    };
    assert_eq!(n.hcall(l2, &args), 0);
    let mut got = vec![0u8; 0x1000];
    n.memory(l2).unwrap().read(0x3000, &mut got).unwrap();
    assert_eq!(got, data);
}

fn host_dma(host: &MmapMemory) -> Arc<MapTable> {
    let t = Arc::new(MapTable::default());
    t.map(DmaMapRequest {
        range: DmaRange::new(0, HOST).unwrap(),
        prot: Prot::RW,
        backing: DmaBacking::Fd {
            fd: host.fd().unwrap().clone(),
            offset: 0,
        },
    })
    .unwrap();
    t
}

#[test]
fn nested_dma_confines_a_level3_device_to_its_window() {
    let (n, [_, _, l3]) = three_levels();
    let table = host_dma(n.host());
    let dma = nested_dma_space(n.levels(), l3, table.clone()).unwrap();
    let data = pattern(0x100, 8);
    dma.write(0x40, &data).unwrap();
    let mut b = vec![0u8; data.len()];
    n.host().read(L3_HOST + 0x40, &mut b).unwrap();
    assert_eq!(b, data);
    dma.read(W3.1 - 0x100, &mut b).unwrap();

    let before = host_snapshot(&n);
    for (iova, len, access) in [
        (W3.1, 1usize, Access::Write),
        (W3.1 - 8, 16, Access::Write),
        (u64::MAX - 7, 16, Access::Write),
        (u64::MAX, 1, Access::Read),
        (1 << 50, 8, Access::Read),
    ] {
        let err = match access {
            Access::Write => dma.write(iova, &vec![0xee; len]).unwrap_err(),
            Access::Read => dma.read(iova, &mut vec![0; len]).unwrap_err(),
        };
        assert_eq!(
            err,
            DmaError::Unmapped {
                iova,
                len: len as u64,
                access
            }
        );
    }
    assert_eq!(
        host_snapshot(&n),
        before,
        "no byte outside the window changed"
    );
    // Zero-length accesses are no-ops, as in the map table.
    dma.write(u64::MAX, &[]).unwrap();
}

#[test]
fn nested_dma_rebases_parent_errors_to_child_addresses() {
    let host = MmapMemory::memfd(HOST).unwrap();
    // The host grants only its first 3 MiB to DMA (read-only above 2.5 MiB).
    let table = Arc::new(MapTable::default());
    for (start, len, prot, off) in [
        (0u64, 0x28_0000u64, Prot::RW, 0u64),
        (0x28_0000, 0x8_0000, Prot::READ, 0x28_0000),
    ] {
        table
            .map(DmaMapRequest {
                range: DmaRange::new(start, len).unwrap(),
                prot,
                backing: DmaBacking::Fd {
                    fd: host.fd().unwrap().clone(),
                    offset: off,
                },
            })
            .unwrap();
    }
    let l1 = NestedDma::new(
        table,
        Window::new(0x20_0000, 0x20_0000).unwrap(),
        LevelId::HOST,
    );
    // Child 0x8_0000 = host 0x28_0000: read-only there.
    let err = l1.write(0x8_0000, &[1]).unwrap_err();
    assert_eq!(
        err,
        DmaError::Permission {
            iova: 0x8_0000,
            access: Access::Write
        }
    );
    // Child 0x10_0000 = host 0x30_0000: not mapped by the host.
    let err = l1.read(0x10_0000, &mut [0; 4]).unwrap_err();
    assert!(
        matches!(
            err,
            DmaError::Unmapped {
                iova: 0x10_0000,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(l1.window().base(), 0x20_0000);
}

#[test]
fn copy_api_over_dma_backed_host_memory() {
    let host = MmapMemory::memfd(HOST).unwrap();
    let table = host_dma(&host);
    let mut n = NestedGuests::new(DmaMemory::new(table.clone(), HOST)).unwrap();
    let l1 = n
        .add_level(LevelId::HOST, Window::new(W1.0, W1.1).unwrap())
        .unwrap();
    let cr3 = {
        let mem = n.memory(l1).unwrap();
        let mut b = PtBuilder::new(&mem, 0x10_0000);
        b.map(0x1000_0000, 0x20_0000, PageSize::Size2M, PTE_RW);
        Cr3::new(b.cr3).unwrap()
    };
    let space = AddressSpace::Virtual { cr3, user: false };
    let data = pattern(0x1800, 12);
    n.copy_to_guest(l1, space, 0x1000_0ff0, &data).unwrap();
    let mut b = vec![0u8; data.len()];
    host.read(W1.0 + 0x20_0ff0, &mut b).unwrap();
    assert_eq!(b, data);
    assert!(table.stats().in_place_bytes >= data.len() as u64);
}
