//! The fds and mmaps a map table holds do not grow with the number of mappings of one
//! file: 100,000 live 4 KiB maps of one memfd hold O(1) fds and O(1) VMAs. (Its own
//! test binary, so no other test opens or closes fds while it counts them.)

use std::sync::Arc;

use nestio_dma::memfd::sealed_memfd;
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, DmaSpaceExt, MapTable, Prot};

const MAPS: u64 = 100_000;
const PAGE: u64 = 4096;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn vmas() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

#[test]
fn a_hundred_thousand_maps_of_one_memfd_hold_constant_fds_and_vmas() {
    let mem = sealed_memfd(c"fd-count", MAPS * PAGE).unwrap();
    let t = MapTable::new(MAPS as usize);
    let (fds0, vmas0) = (open_fds(), vmas());
    for i in 0..MAPS {
        // Every DMA_MAP brings its own fd, as a server receives one per message.
        let fd = Arc::new(mem.try_clone().unwrap());
        t.map(DmaMapRequest {
            range: DmaRange::new(i * PAGE, PAGE).unwrap(),
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd,
                offset: i * PAGE,
            },
        })
        .unwrap();
    }
    assert_eq!(t.len(), MAPS as usize);
    let (fds1, vmas1) = (open_fds(), vmas());
    assert!(
        fds1 <= fds0 + 2,
        "{} fds held for {MAPS} maps of one file",
        fds1 - fds0
    );
    assert!(
        vmas1 <= vmas0 + 4,
        "{} VMAs added for {MAPS} maps of one file",
        vmas1.saturating_sub(vmas0)
    );
    assert_eq!(t.file_backings(), 1);

    // Every mapping still reaches its own page of the file.
    for i in [0, 1, MAPS / 2, MAPS - 1] {
        t.write_u64(i * PAGE + 8, i ^ 0x5a5a).unwrap();
    }
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::from(mem.try_clone().unwrap());
    for i in [0, 1, MAPS / 2, MAPS - 1] {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, i * PAGE + 8).unwrap();
        assert_eq!(u64::from_le_bytes(b), i ^ 0x5a5a);
    }
    drop(f);

    // The limit still holds.
    let e = t
        .map(DmaMapRequest {
            range: DmaRange::new(MAPS * PAGE, PAGE).unwrap(),
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd: Arc::new(mem.try_clone().unwrap()),
                offset: 0,
            },
        })
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC);

    // Unmapping them all releases the backing: fds and VMAs come back.
    for i in 0..MAPS {
        t.unmap(i * PAGE, PAGE).unwrap();
    }
    assert!(t.is_empty());
    assert_eq!(t.file_backings(), 0);
    assert_eq!(open_fds(), fds0, "the backing's fds are closed");
    assert!(vmas() <= vmas0, "the backing's mmap is gone");
}
