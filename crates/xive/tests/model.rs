//! End-to-end behaviour of the model through its three interfaces: the control API
//! (errno), the hypercalls (PAPR codes) and the ESB/TIMA pages, plus migration.

use std::sync::Arc;

use nestio_xive::control::{ctrl, group, libc_errno as errno, EqConfig, SourceConfig};
use nestio_xive::hcall::{flags, op, rc};
use nestio_xive::router::Layout;
use nestio_xive::{Pq, VecMemory, Xive, XiveConfig};
use parking_lot::Mutex;

const RAM: usize = 1 << 22;

struct Rig {
    xive: Xive,
    mem: Arc<VecMemory>,
    notes: Arc<Mutex<Vec<u32>>>,
}

fn rig(servers: u32) -> Rig {
    let mem = Arc::new(VecMemory::new(0, RAM));
    let notes = Arc::new(Mutex::new(Vec::new()));
    let n = notes.clone();
    let cfg = XiveConfig::new(0x2000, 16, Layout::PSERIES).unwrap();
    let xive = Xive::new(cfg, mem.clone(), Arc::new(move |s: u32| n.lock().push(s)));
    for s in 0..servers {
        xive.connect_vcpu(s).unwrap();
    }
    Rig { xive, mem, notes }
}

impl Rig {
    fn h(&self, caller: u32, opcode: u64, args: &[u64]) -> (i64, [u64; 4]) {
        let o = self.xive.hcall(caller, opcode, args);
        (o.rc, o.rets)
    }
    fn notes(&self) -> Vec<u32> {
        std::mem::take(&mut *self.notes.lock())
    }
    /// The guest side of one interrupt on `server`: ack, then read the queue entry.
    fn ack(&self, server: u32) -> u16 {
        self.xive.tima_load(server, 2, 0x810, 2) as u16
    }
}

/// The guest's setup: a 4 KiB queue at prio 6 for each server, a source routed with
/// an EISN, PQ set to 00 through the ESB management page.
fn guest_setup(r: &Rig, lisn: u32, server: u32, eisn: u64) {
    for s in 0..2u64 {
        let q = 0x10_0000 + s * 0x1000;
        assert_eq!(
            r.h(
                s as u32,
                op::H_INT_SET_QUEUE_CONFIG,
                &[flags::EQ_ALWAYS_NOTIFY, s, 6, q, 12]
            )
            .0,
            rc::H_SUCCESS
        );
        r.xive.tima_store(s as u32, 2, 0x11, 1, 0xFF); // CPPR = 0xFF: accept all
    }
    assert_eq!(
        r.h(
            0,
            op::H_INT_SET_SOURCE_CONFIG,
            &[flags::SRC_SET_EISN, lisn.into(), server.into(), 6, eisn]
        )
        .0,
        rc::H_SUCCESS
    );
    assert_eq!(
        r.xive.esb_load(lisn, true, 0xC00, 8),
        u64::from(Pq::Off.bits())
    );
}

#[test]
fn device_interrupt_routed_acked_and_eoid() {
    let r = rig(2);
    r.xive.set_source(0x1000, 0).unwrap();
    guest_setup(&r, 0x1000, 1, 0x42);
    assert!(r.xive.trigger(0x1000));
    assert_eq!(r.notes(), vec![1], "vCPU 1 notified");
    assert_eq!(r.xive.pq(0x1000), Some(Pq::Pending));
    // Entry: generation 1, data 0x42.
    assert_eq!(r.mem.read_be32(0x10_1000).unwrap(), 0x8000_0042);
    assert_eq!(r.ack(1), 0x8006, "NSR EO, CPPR now 6");
    assert_eq!(r.ack(1), 0x0006, "nothing more");
    // Two more triggers before the EOI: one is queued in Q, the other coalesced.
    r.xive.trigger(0x1000);
    r.xive.trigger(0x1000);
    assert_eq!(r.xive.pq(0x1000), Some(Pq::Queued));
    assert!(r.notes().is_empty());
    // EOI through the management page forwards the queued event.
    assert_eq!(r.xive.esb_load(0x1000, true, 0, 8), 1);
    assert_eq!(r.mem.read_be32(0x10_1004).unwrap(), 0x8000_0042);
    // CPPR 6 masks priority 6 until the guest lowers it back.
    assert!(r.notes().is_empty());
    r.xive.tima_store(1, 2, 0x11, 1, 0xFF);
    assert_eq!(r.notes(), vec![1]);
    assert_eq!(r.ack(1), 0x8006);
    assert_eq!(r.xive.esb_load(0x1000, true, 0, 8), 0);
    assert_eq!(r.xive.pq(0x1000), Some(Pq::Reset));
}

#[test]
fn ipis_between_vcpus() {
    let r = rig(2);
    for ipi in 0..2u32 {
        r.xive.set_source(ipi.into(), 0).unwrap();
    }
    guest_setup(&r, 0, 0, 100);
    guest_setup(&r, 1, 1, 101);
    // vCPU 0 sends vCPU 1 an IPI by storing to IPI 1's trigger page, and back.
    r.xive.esb_store(1, false, 0, 8, 0);
    assert_eq!(r.notes(), vec![1]);
    assert_eq!(r.mem.read_be32(0x10_1000).unwrap(), 0x8000_0065);
    r.xive.esb_store(0, false, 0, 8, 0);
    assert_eq!(r.notes(), vec![0]);
    assert_eq!(r.mem.read_be32(0x10_0000).unwrap(), 0x8000_0064);
}

#[test]
fn masked_routing_and_off_source_drop_events() {
    let r = rig(1);
    r.xive.set_source(7, 0).unwrap();
    assert!(r.xive.trigger(7));
    assert_eq!(r.xive.pq(7), Some(Pq::Off), "new sources are off");
    r.xive.esb_load(7, true, 0xC00, 8);
    r.xive.trigger(7);
    assert_eq!(
        r.xive.pq(7),
        Some(Pq::Pending),
        "PQ moves, routing masked: dropped"
    );
    assert!(r.notes().is_empty());
    assert!(!r.xive.trigger(8), "unallocated source");
    assert_eq!(r.xive.esb_load(8, true, 0x800, 8), u64::MAX);
    assert_eq!(
        r.xive.esb_load(7, false, 0x800, 8),
        u64::MAX,
        "trigger page load"
    );
}

#[test]
fn lsi_refires_while_asserted() {
    let r = rig(2);
    r.xive.set_source(0x1001, 1).unwrap();
    guest_setup(&r, 0x1001, 0, 5);
    let (c, rets) = r.h(0, op::H_INT_GET_SOURCE_INFO, &[0, 0x1001]);
    assert_eq!(c, rc::H_SUCCESS);
    assert_eq!(rets[0], flags::SRC_H_INT_ESB | flags::SRC_LSI);
    assert!(r.xive.set_level(0x1001, true));
    assert_eq!(r.notes(), vec![0]);
    // EOI through H_INT_ESB while the line is still up: a second event.
    let (c, rets) = r.h(0, op::H_INT_ESB, &[0, 0x1001, 0, 0]);
    assert_eq!((c, rets[0]), (rc::H_SUCCESS, 1));
    assert_eq!(r.xive.queue_position(0, 6), Some((1, 2)));
    r.xive.set_level(0x1001, false);
    let (_, rets) = r.h(0, op::H_INT_ESB, &[0, 0x1001, 0, 0]);
    assert_eq!(rets[0], 0);
    assert_eq!(r.xive.pq(0x1001), Some(Pq::Reset));
}

#[test]
fn control_api_errno() {
    let r = rig(0);
    let e = |res: Result<(), nestio_xive::ControlError>| res.map_err(|e| e.errno());
    assert_eq!(
        e(r.xive
            .set_attr(group::CTRL, ctrl::NR_SERVERS, &4u32.to_ne_bytes())),
        Ok(())
    );
    assert_eq!(
        e(r.xive
            .set_attr(group::CTRL, ctrl::NR_SERVERS, &0u32.to_ne_bytes())),
        Err(errno::EINVAL)
    );
    assert_eq!(
        e(r.xive.set_attr(group::CTRL, ctrl::NR_SERVERS, &[0; 3])),
        Err(errno::EFAULT)
    );
    assert_eq!(
        e(r.xive.connect_vcpu(4)),
        Err(errno::EINVAL),
        "beyond NR_SERVERS"
    );
    r.xive.connect_vcpu(0).unwrap();
    assert_eq!(e(r.xive.connect_vcpu(0)), Err(errno::EEXIST));
    assert_eq!(
        e(r.xive
            .set_attr(group::CTRL, ctrl::NR_SERVERS, &2u32.to_ne_bytes())),
        Err(errno::EBUSY),
        "NR_SERVERS once a vCPU is connected"
    );
    assert_eq!(
        e(r.xive.set_attr(group::SOURCE, 0x2000, &0u64.to_ne_bytes())),
        Err(errno::E2BIG)
    );
    assert_eq!(
        e(r.xive.set_attr(group::SOURCE, 3, &0u64.to_ne_bytes())),
        Ok(())
    );
    assert_eq!(r.xive.pq(3), Some(Pq::Off));
    let cfg = |prio, server, masked| {
        SourceConfig {
            prio,
            server,
            masked,
            eisn: 9,
        }
        .encode()
        .to_ne_bytes()
    };
    assert_eq!(
        e(r.xive.set_attr(group::SOURCE_CONFIG, 4, &cfg(6, 0, false))),
        Err(errno::ENOENT)
    );
    assert_eq!(
        e(r.xive.set_attr(group::SOURCE_CONFIG, 3, &cfg(7, 0, false))),
        Err(errno::EINVAL)
    );
    assert_eq!(
        e(r.xive.set_attr(group::SOURCE_CONFIG, 3, &cfg(6, 3, false))),
        Err(errno::EINVAL),
        "unknown server"
    );
    assert_eq!(
        e(r.xive.set_attr(group::SOURCE_CONFIG, 3, &cfg(6, 0, false))),
        Ok(())
    );
    assert_eq!(r.xive.source_config(3).unwrap().eisn, 9);
    assert_eq!(e(r.xive.set_attr(group::SOURCE_SYNC, 3, &[])), Ok(()));
    assert_eq!(
        e(r.xive.set_attr(group::SOURCE_SYNC, 4, &[])),
        Err(errno::ENOENT)
    );
    let eq = |flags, qshift, qaddr| {
        EqConfig {
            flags,
            qshift,
            qaddr,
            qtoggle: 1,
            qindex: 0,
        }
        .to_bytes()
    };
    let attr = |server: u64, prio: u64| (server << 3) | prio;
    assert_eq!(
        e(r.xive
            .set_attr(group::EQ_CONFIG, attr(0, 7), &eq(1, 12, 0x1000))),
        Err(errno::EINVAL)
    );
    assert_eq!(
        e(r.xive
            .set_attr(group::EQ_CONFIG, attr(1, 6), &eq(1, 12, 0x1000))),
        Err(errno::ENOENT)
    );
    assert_eq!(
        e(r.xive
            .set_attr(group::EQ_CONFIG, attr(0, 6), &eq(0, 12, 0x1000))),
        Err(errno::EINVAL),
        "flags must be ALWAYS_NOTIFY"
    );
    assert_eq!(
        e(r.xive
            .set_attr(group::EQ_CONFIG, attr(0, 6), &eq(1, 16, 0x1000))),
        Err(errno::EINVAL),
        "alignment"
    );
    assert_eq!(
        e(r.xive
            .set_attr(group::EQ_CONFIG, attr(0, 6), &eq(1, 12, RAM as u64))),
        Err(errno::EINVAL),
        "not RAM"
    );
    assert_eq!(
        e(r.xive
            .set_attr(group::EQ_CONFIG, attr(0, 6), &eq(1, 12, 0x1000)[..63])),
        Err(errno::EFAULT)
    );
    assert_eq!(
        e(r.xive
            .set_attr(group::EQ_CONFIG, attr(0, 6), &eq(1, 12, 0x1000))),
        Ok(())
    );
    let mut out = [0u8; 64];
    r.xive
        .get_attr(group::EQ_CONFIG, attr(0, 6), &mut out)
        .unwrap();
    assert_eq!(
        EqConfig::from_bytes(&out).unwrap(),
        EqConfig {
            flags: 1,
            qshift: 12,
            qaddr: 0x1000,
            qtoggle: 1,
            qindex: 0
        }
    );
    assert_eq!(
        e(r.xive.set_attr(group::EQ_CONFIG, attr(0, 6), &eq(0, 0, 0))),
        Ok(()),
        "qshift 0 resets, any flags"
    );
    r.xive
        .get_attr(group::EQ_CONFIG, attr(0, 6), &mut out)
        .unwrap();
    assert_eq!(EqConfig::from_bytes(&out).unwrap(), EqConfig::default());
    assert_eq!(e(r.xive.set_attr(9, 0, &[])), Err(errno::ENXIO));
    assert_eq!(e(r.xive.set_attr(group::CTRL, 9, &[])), Err(errno::ENXIO));
    // RESET masks everything again.
    r.xive.esb_load(3, true, 0xC00, 8);
    r.xive.set_attr(group::CTRL, ctrl::RESET, &[]).unwrap();
    assert_eq!(r.xive.pq(3), Some(Pq::Off));
    assert!(r.xive.source_config(3).unwrap().masked);
}

#[test]
fn hcall_return_codes() {
    let r = rig(2);
    r.xive.set_source(0x1000, 0).unwrap();
    let h = |o, a: &[u64]| r.h(0, o, a).0;
    assert_eq!(
        r.h(0, op::H_INT_GET_SOURCE_INFO, &[0, 0x1000]),
        (rc::H_SUCCESS, [0, 0x6010020010000, 0x6010020000000, 16])
    );
    assert_eq!(h(op::H_INT_GET_SOURCE_INFO, &[1, 0x1000]), rc::H_PARAMETER);
    assert_eq!(h(op::H_INT_GET_SOURCE_INFO, &[0, 0x1001]), rc::H_P2);
    assert_eq!(
        h(op::H_INT_SET_SOURCE_CONFIG, &[4, 0x1000, 0, 6, 0]),
        rc::H_PARAMETER
    );
    assert_eq!(
        h(op::H_INT_SET_SOURCE_CONFIG, &[0, 0x1000, 0, 7, 0]),
        rc::H_P4
    );
    assert_eq!(
        h(op::H_INT_SET_SOURCE_CONFIG, &[0, 0x1000, 5, 6, 0]),
        rc::H_P3
    );
    assert_eq!(
        h(op::H_INT_SET_SOURCE_CONFIG, &[0, 0x1000, 1, 5, 0]),
        rc::H_SUCCESS
    );
    assert_eq!(
        r.h(0, op::H_INT_GET_SOURCE_CONFIG, &[0, 0x1000]),
        (rc::H_SUCCESS, [1, 5, 0, 0])
    );
    assert_eq!(
        h(op::H_INT_SET_SOURCE_CONFIG, &[1, 0x1000, 1, 5, 0]),
        rc::H_SUCCESS
    );
    assert_eq!(
        r.h(0, op::H_INT_GET_SOURCE_CONFIG, &[0, 0x1000]).1[1],
        0xFF,
        "masked"
    );
    assert_eq!(
        h(op::H_INT_SET_QUEUE_CONFIG, &[2, 0, 6, 0x1000, 12]),
        rc::H_PARAMETER
    );
    assert_eq!(
        h(op::H_INT_SET_QUEUE_CONFIG, &[1, 0, 7, 0x1000, 12]),
        rc::H_P3
    );
    assert_eq!(
        h(op::H_INT_SET_QUEUE_CONFIG, &[1, 9, 6, 0x1000, 12]),
        rc::H_P2
    );
    assert_eq!(
        h(op::H_INT_SET_QUEUE_CONFIG, &[1, 0, 6, 0x1800, 12]),
        rc::H_P4
    );
    assert_eq!(
        h(op::H_INT_SET_QUEUE_CONFIG, &[1, 0, 6, 0x1000, 13]),
        rc::H_P5
    );
    assert_eq!(
        h(op::H_INT_SET_QUEUE_CONFIG, &[1, 0, 6, RAM as u64, 12]),
        rc::H_P4
    );
    assert_eq!(
        h(op::H_INT_SET_QUEUE_CONFIG, &[1, 0, 6, 0x10000, 16]),
        rc::H_SUCCESS
    );
    assert_eq!(
        r.h(0, op::H_INT_GET_QUEUE_INFO, &[0, 1, 6]),
        (rc::H_SUCCESS, [0x6010040000000 + (14 << 17), 0, 0, 0])
    );
    assert_eq!(
        r.h(0, op::H_INT_GET_QUEUE_CONFIG, &[0, 0, 6]),
        (rc::H_SUCCESS, [1, 0x10000, 16, 0])
    );
    assert_eq!(
        r.h(0, op::H_INT_GET_QUEUE_CONFIG, &[1, 0, 6]),
        (rc::H_SUCCESS, [1 | 1 << 62, 0x10000, 16, 0])
    );
    assert_eq!(h(op::H_INT_GET_QUEUE_CONFIG, &[2, 0, 6]), rc::H_PARAMETER);
    assert_eq!(h(op::H_INT_ESB, &[2, 0x1000, 0, 0]), rc::H_PARAMETER);
    assert_eq!(h(op::H_INT_ESB, &[0, 0x1000, 0xFFF9, 0]), rc::H_P3);
    assert_eq!(
        r.h(0, op::H_INT_ESB, &[0, 0x1000, 0xC00, 0]),
        (rc::H_SUCCESS, [1, 0, 0, 0]),
        "old PQ 01"
    );
    assert_eq!(
        r.h(0, op::H_INT_ESB, &[1, 0x1000, 0xD00, 0]),
        (rc::H_SUCCESS, [u64::MAX, 0, 0, 0])
    );
    assert_eq!(r.h(0, op::H_INT_ESB, &[0, 0x1000, 0x800, 0]).1[0], 1);
    assert_eq!(h(op::H_INT_SYNC, &[0, 0x1000]), rc::H_SUCCESS);
    assert_eq!(h(op::H_INT_SYNC, &[0, 0x1fff]), rc::H_P2);
    assert_eq!(h(op::H_INT_SET_OS_REPORTING_LINE, &[0, 0x2040]), rc::H_P2);
    assert_eq!(
        h(op::H_INT_SET_OS_REPORTING_LINE, &[0, 0x2080]),
        rc::H_SUCCESS
    );
    assert_eq!(
        r.h(1, op::H_INT_GET_OS_REPORTING_LINE, &[0, 0]),
        (rc::H_SUCCESS, [0x2080, 0, 0, 0])
    );
    assert_eq!(h(op::H_INT_RESET, &[1]), rc::H_PARAMETER);
    assert_eq!(h(op::H_INT_RESET, &[0]), rc::H_SUCCESS);
    assert_eq!(
        r.h(0, op::H_INT_GET_QUEUE_CONFIG, &[0, 0, 6]),
        (rc::H_SUCCESS, [0; 4])
    );
    assert_eq!(h(0x3D4, &[]), rc::H_FUNCTION);
    r.xive.set_exploitation(false);
    assert_eq!(
        h(op::H_INT_GET_SOURCE_INFO, &[0, 0x1000]),
        rc::H_FUNCTION,
        "before CAS"
    );
}

#[test]
fn save_restore_mid_traffic_loses_no_interrupt() {
    let a = rig(2);
    for l in [0x1000u32, 0x1001, 0x1002] {
        a.xive.set_source(l.into(), 0).unwrap();
        guest_setup(&a, l, 1, u64::from(l));
    }
    // 0x1000 delivered and not EOId; 0x1001 delivered and queued again; 0x1002 idle.
    a.xive.trigger(0x1000);
    a.xive.trigger(0x1001);
    a.xive.trigger(0x1001);
    assert_eq!(a.ack(1), 0x8006);
    a.notes();
    let snap = a.xive.save();
    assert!(
        a.mem.take_dirty().contains(&(0x10_1000, 0x1000)),
        "EQ_SYNC marks the queue dirty"
    );
    // An event in the save window: recorded, not delivered.
    a.xive.trigger(0x1002);
    assert!(a.notes().is_empty());
    let snap2 = a.xive.save();
    assert_ne!(snap, snap2);
    let json = serde_json::to_string(&snap2).unwrap();
    let snap2: nestio_xive::migration::XiveSnapshot = serde_json::from_str(&json).unwrap();

    // Destination: same RAM contents (the dirty pages were sent).
    let b = rig(2);
    let mut page = vec![0u8; 0x2000];
    use nestio_xive::GuestMemory;
    a.mem.read(0x10_0000, &mut page).unwrap();
    b.mem.write(0x10_0000, &page).unwrap();
    b.xive.restore(&snap2).unwrap();
    assert_eq!(b.xive.pq(0x1000), Some(Pq::Pending));
    assert_eq!(b.xive.pq(0x1001), Some(Pq::Queued));
    assert_eq!(
        b.xive.pq(0x1002),
        Some(Pq::Pending),
        "re-triggered at restore"
    );
    assert_eq!(
        b.notes(),
        Vec::<u32>::new(),
        "vCPU 1 is at CPPR 6: the event waits in IPB"
    );
    assert_eq!(a.xive.os_ring(1), Some(0x0006_00FF_FF00_FFFF));
    assert_eq!(
        b.xive.os_ring(1),
        Some(0x0006_02FF_FF00_FF06),
        "IPB holds the new event"
    );
    assert_eq!(b.mem.read_be32(0x10_1000 + 8).unwrap(), 0x8000_1002);
    // The guest finishes: EOI 0x1000, 0x1001 (forwards the queued one), drops CPPR.
    b.xive.esb_load(0x1000, true, 0, 8);
    assert_eq!(b.xive.esb_load(0x1001, true, 0, 8), 1);
    b.xive.tima_store(1, 2, 0x11, 1, 0xFF);
    assert_eq!(b.notes(), vec![1]);
    assert_eq!(b.mem.read_be32(0x10_1000 + 12).unwrap(), 0x8000_1001);
    assert_eq!(
        b.xive.queue_position(1, 6),
        Some((1, 4)),
        "four events, none lost"
    );

    // In place: resume forwards the window's event too.
    a.xive.resume().unwrap();
    assert_eq!(a.xive.pq(0x1002), Some(Pq::Pending));
    assert_eq!(a.xive.queue_position(1, 6), Some((1, 3)));
    assert!(a.xive.resume().is_err());
}

#[test]
fn vp_state_round_trip_and_pending_priority_notifies() {
    let r = rig(2);
    assert_eq!(r.xive.vp_state(5).unwrap_err().errno(), errno::ENOENT);
    let vp = nestio_xive::vp::VpState::from_w01(0x00_FF_02_FF_FF_00_FF_FF);
    r.xive.set_vp_state(1, vp).unwrap();
    assert_eq!(r.notes(), vec![1], "IPB prio 6 beats CPPR 0xFF");
    let back = r.xive.vp_state(1).unwrap();
    assert_eq!(
        back.w01(),
        0x80_FF_02_FF_FF_00_FF_06,
        "NSR and PIPR recomputed"
    );
}
