//! The map count a server advertises is reachable: `max_dma_maps` (65,535) DMA_MAPs of
//! one memfd, each carrying its own fd over the socket, cost the server a constant
//! number of fds. (Alone in its binary: /proc/self/fd is per process.)

mod common;

use std::sync::Arc;

use common::*;
use nestio_device::VfioDevice;
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use nestio_vfio_user::proto::DEFAULT_MAX_DMA_MAPS;
use nestio_vfio_user::socket::open_fd_count;
use nestio_vfio_user::{ClientConfig, ServerConfig};

const PAGE: u64 = 4096;

#[test]
fn the_advertised_map_count_is_reachable_with_constant_fds() {
    let maps = u64::from(DEFAULT_MAX_DMA_MAPS);
    let h = Harness::new(ServerConfig::default());
    let (c, t) = h.client(ClientConfig::default());
    let mem = Arc::new(memfd(maps * PAGE));
    let before = open_fd_count().unwrap();
    for i in 0..maps {
        c.dma_map(DmaMapRequest {
            range: DmaRange::new(0x1_0000_0000 + i * PAGE, PAGE).unwrap(),
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd: mem.clone(),
                offset: i * PAGE,
            },
        })
        .unwrap_or_else(|e| panic!("DMA_MAP {i} of {maps}: {e}"));
    }
    let table = h.dev.dma_table().unwrap();
    assert_eq!(table.len(), maps as usize);
    let held = open_fd_count().unwrap() - before;
    assert!(held <= 2, "{held} fds held for {maps} maps of one memfd");
    assert_eq!(table.file_backings(), 1);
    // One more is refused by the limit, not by running out of fds.
    let e = c
        .dma_map(DmaMapRequest {
            range: DmaRange::new(0x1000, PAGE).unwrap(),
            prot: Prot::RW,
            backing: DmaBacking::Fd {
                fd: mem.clone(),
                offset: 0,
            },
        })
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    drop(c);
    t.join().unwrap().unwrap();
}
