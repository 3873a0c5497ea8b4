//! No fd leaks across many sessions (alone in its binary: /proc/self/fd is per process).

mod common;

use std::sync::Arc;

use common::*;
use nestio_device_model::{IrqAction, IrqData, VfioDevice};
use nestio_dma::{DmaBacking, DmaMapRequest, DmaRange, Prot};
use nestio_vfio_user::socket::open_fd_count;
use nestio_vfio_user::{ClientConfig, ServerConfig};

#[test]
fn sessions_leave_no_fds_behind() {
    let h = Harness::new(ServerConfig::default());
    let mut baseline = None;
    for round in 0..12 {
        {
            let (c, t) = h.client(ClientConfig {
                twin_socket: round % 2 == 0,
                ..ClientConfig::default()
            });
            let mem = memfd(0x2000);
            c.dma_map(DmaMapRequest {
                range: DmaRange::new(0x10000, 0x2000).unwrap(),
                prot: Prot::RW,
                backing: DmaBacking::Fd {
                    fd: Arc::new(mem),
                    offset: 0,
                },
            })
            .unwrap();
            let peer = VecPeer::new(0x40000, 0x1000);
            c.dma_map(DmaMapRequest {
                range: DmaRange::new(0x40000, 0x1000).unwrap(),
                prot: Prot::RW,
                backing: DmaBacking::Peer(peer),
            })
            .unwrap();
            c.set_irqs(
                1,
                IrqAction::Trigger,
                0,
                4,
                IrqData::Eventfd((0..4).map(|_| Some(eventfd())).collect()),
            )
            .unwrap();
            // INTx with an unmask eventfd (a watch thread in the device), left for the
            // release to drop.
            c.set_irqs(
                0,
                IrqAction::Trigger,
                0,
                1,
                IrqData::Eventfd(vec![Some(eventfd())]),
            )
            .unwrap();
            let unmask = eventfd();
            c.set_intx_unmask_eventfd(Some(std::os::fd::AsFd::as_fd(&unmask)))
                .unwrap();
            drop(unmask);
            let ri = c.region_info(2).unwrap();
            assert!(ri.fd.is_some());
            let io = c.region_io_fds(1).unwrap();
            assert_eq!(io.len(), 1);
            assert_eq!(device_dma(&c, 0x40000, 16, 0, 1), 0);
            // A refused message carrying fds.
            let e = c.set_irqs(
                1,
                IrqAction::Trigger,
                0,
                5,
                IrqData::Eventfd((0..5).map(|_| Some(eventfd())).collect()),
            );
            assert!(e.is_err());
            drop((ri, io));
            drop(c);
            t.join().unwrap().unwrap();
        }
        let n = open_fd_count().unwrap();
        // The first round may allocate lazily initialised fds; later rounds must not grow.
        match baseline {
            None if round >= 1 => baseline = Some(n),
            Some(b) => assert_eq!(n, b, "fd count grew in round {round}"),
            None => {}
        }
    }
    assert_eq!(h.dev.dma_table().unwrap().len(), 0);
}
