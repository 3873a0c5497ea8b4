//! The FSL-MC container in process: scan, open, commands, every refusal's MC status,
//! interrupts by eventfd, container reset, mmapped portals executed by the poller, and
//! portal writes racing from several threads.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use nestio_device_model::{flags, region_flags, IrqAction, IrqData, VfioDevice};
use nestio_emulated::fsl_mc::driver::{MappedPortal, Mc, McIoError, RegionPortal};
use nestio_emulated::fsl_mc::objects::{cmd, layout as l, ObjType, DPNI_IRQ_EVENT_LINK_CHANGED};
use nestio_emulated::fsl_mc::{
    parse_object_list, Command, FslMcContainer, Header, McStatus, Params, DEFAULT_OBJECTS,
};

fn container() -> FslMcContainer {
    let objs = parse_object_list(&format!("{DEFAULT_OBJECTS},dpmac:1,dpcon:1")).unwrap();
    FslMcContainer::new(2, &objs).unwrap()
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a new fd or -1 (checked).
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Read the eventfd's counter (0 when nothing was signalled).
fn take(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from a non-blocking eventfd.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        v
    } else {
        0
    }
}

fn wait_for(fd: &OwnedFd) -> u64 {
    for _ in 0..5000 {
        let v = take(fd);
        if v > 0 {
            return v;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    0
}

#[test]
fn scan_open_command_and_vfio_view() {
    let c = container();
    let dprc = c.dprc();
    let info = dprc.info();
    assert_eq!(info.flags, flags::FSL_MC | flags::RESET);
    assert_eq!((info.num_regions, info.num_irqs), (1, 1));
    let ri = dprc.region_info(0).unwrap();
    assert_eq!(
        ri.flags & region_flags::MMAP,
        0,
        "the DPRC portal is not mmappable"
    );
    assert!(ri.fd.is_none());
    let mut mc = Mc {
        io: RegionPortal {
            dev: &*dprc,
            index: 0,
        },
    };
    assert_eq!(mc.container_id().unwrap(), 2);
    assert_eq!(mc.api_version(ObjType::Dprc).unwrap(), (6, 6));
    assert_eq!(mc.api_version(ObjType::Dpni).unwrap(), (7, 0));
    let t = mc.open(ObjType::Dprc, 2).unwrap();
    assert_ne!(t, 0);
    let n = mc.obj_count(t).unwrap();
    assert_eq!(n as usize, c.objects().len());
    assert_eq!(n, 8);
    let mut seen = Vec::new();
    for i in 0..n {
        let o = mc.obj(t, i).unwrap();
        assert_eq!(o.vendor, 0x1957);
        let ty = ObjType::from_name(&o.ty).expect("known type");
        assert_eq!(o.irq_count, ty.irq_count());
        assert_eq!(o.region_count as usize, ty.regions().len());
        let dev = c.object(i as usize).unwrap();
        assert_eq!(dev.name(), format!("{}.{}", o.ty, o.id));
        let vi = dev.info();
        assert_eq!(vi.flags, flags::FSL_MC, "objects have no RESET flag");
        assert_eq!(vi.num_regions, o.region_count as u32);
        assert_eq!(vi.num_irqs, o.irq_count as u32);
        for r in 0..o.region_count {
            let (size, _kind, _fl, base) = mc.obj_region(t, &o.ty, o.id, r).unwrap();
            assert_eq!(size, 0x10000);
            assert_ne!(base, 0);
            let vr = dev.region_info(r as u32).unwrap();
            assert_eq!(vr.fd_offset, (r as u64) << 40, "region i at i << 40");
            assert_ne!(vr.flags & region_flags::MMAP, 0);
            assert!(vr.fd.is_some());
        }
        // Open, use, close every object.
        let ot = mc.open(ty, o.id).unwrap();
        let o2 = mc.obj(t, i).unwrap();
        assert_eq!(o2.state & 1, 1, "state shows OPEN");
        if ty.has_enable() {
            assert!(!mc.is_enabled(ot).unwrap());
            mc.call(cmd::ENABLE, ot, Params::default()).unwrap();
            assert!(mc.is_enabled(ot).unwrap());
            mc.call(cmd::DISABLE, ot, Params::default()).unwrap();
        }
        if ty != ObjType::Dpmcp {
            mc.call(cmd::GET_ATTR, ot, Params::default()).unwrap();
        }
        mc.call(cmd::RESET, ot, Params::default()).unwrap();
        mc.close(ot).unwrap();
        seen.push(o.ty);
    }
    for want in ["dpni", "dpio", "dpbp", "dpmcp", "dpmac", "dpcon"] {
        assert!(seen.iter().any(|s| s == want), "{want} in {seen:?}");
    }
    // dpni.0 <-> dpmac.0, link follows the dpni.
    let mut p = Params::default();
    p.set_u32(l::CONN_EP1_ID, 0);
    p.set_type_name(l::CONN_EP1_TYPE, "dpni");
    let r = mc.call(cmd::DPRC_GET_CONNECTION, t, p).unwrap().params;
    assert_eq!(r.type_name(l::CONN_EP2_TYPE).unwrap(), "dpmac");
    assert_eq!(r.u32(l::CONN_STATE), 0);
    p.set_u32(l::CONN_EP1_ID, 1);
    let r = mc.call(cmd::DPRC_GET_CONNECTION, t, p).unwrap().params;
    assert_eq!(r.u32(l::CONN_STATE), u32::MAX, "dpni.1 has no dpmac");
    mc.close(t).unwrap();
    assert!(c.commands_executed() > 30);
}

#[test]
fn every_refusal_has_its_mc_status() {
    let c = container();
    let dprc = c.dprc();
    let mut mc = Mc {
        io: RegionPortal {
            dev: &*dprc,
            index: 0,
        },
    };
    let st = |mc: &mut Mc<RegionPortal>, id, tok, p| mc.status(id, tok, p).unwrap();
    let t = mc.open(ObjType::Dprc, 2).unwrap();
    let none = Params::default();
    // Wrong and missing tokens.
    assert_eq!(
        st(&mut mc, cmd::DPRC_GET_OBJ_COUNT, 0, none),
        McStatus::AuthErr
    );
    assert_eq!(
        st(&mut mc, cmd::DPRC_GET_OBJ_COUNT, t ^ 0x40, none),
        McStatus::AuthErr
    );
    // Parent container, unknown container.
    let mut p = Params::default();
    p.set_u32(0, 1);
    assert_eq!(
        st(&mut mc, ObjType::Dprc.open_cmd(), 0, p),
        McStatus::NoPrivilege
    );
    p.set_u32(0, 77);
    assert_eq!(
        st(&mut mc, ObjType::Dprc.open_cmd(), 0, p),
        McStatus::ConfigErr
    );
    // No such object; already open.
    p.set_u32(0, 9);
    assert_eq!(
        st(&mut mc, ObjType::Dpni.open_cmd(), 0, p),
        McStatus::ConfigErr
    );
    let ni = mc.open(ObjType::Dpni, 0).unwrap();
    p.set_u32(0, 0);
    assert_eq!(st(&mut mc, ObjType::Dpni.open_cmd(), 0, p), McStatus::Busy);
    // Adding or removing objects of an assigned container.
    for id in [
        cmd::DPRC_ASSIGN,
        cmd::DPRC_UNASSIGN,
        cmd::DPRC_CREATE_CONT,
        cmd::DPRC_DESTROY_CONT,
    ] {
        assert_eq!(st(&mut mc, id, t, none), McStatus::NoPrivilege);
    }
    // Unknown command, unknown version, a DPRC command on an object.
    assert_eq!(
        st(&mut mc, nestio_emulated::fsl_mc::CmdId::v1(0x7ff), t, none),
        McStatus::UnsupportedOp
    );
    assert_eq!(
        st(
            &mut mc,
            nestio_emulated::fsl_mc::CmdId::v(0x15A, 5),
            t,
            none
        ),
        McStatus::UnsupportedOp
    );
    assert_eq!(
        st(&mut mc, cmd::DPRC_GET_OBJ_COUNT, ni, none),
        McStatus::UnsupportedOp
    );
    // Bad parameters.
    let mut p = Params::default();
    p.set_u32(l::GET_OBJ_INDEX, 99);
    assert_eq!(st(&mut mc, cmd::DPRC_GET_OBJ, t, p), McStatus::ConfigErr);
    let mut p = Params::default();
    p.set_type_name(l::REG_OBJ_TYPE, "dpni");
    assert_eq!(
        st(&mut mc, cmd::DPRC_GET_OBJ_REG_V3, t, p),
        McStatus::ConfigErr,
        "dpni has no region 0"
    );
    let mut p = Params::default();
    p.0[3] = u64::MAX; // type name without NUL
    p.0[4] = u64::MAX;
    assert_eq!(
        st(&mut mc, cmd::DPRC_GET_OBJ_REG_V3, t, p),
        McStatus::ConfigErr
    );
    let mut p = Params::default();
    p.set_u8(l::IRQ_INDEX, 3);
    assert_eq!(st(&mut mc, cmd::GET_IRQ_STATUS, ni, p), McStatus::ConfigErr);
    let mut p = Params::default();
    p.set_u32(l::RESET_CHILD_ID, 5);
    assert_eq!(
        st(&mut mc, cmd::DPRC_RESET_CONT_V2, t, p),
        McStatus::ConfigErr
    );
    // Invalid state: max frame length of an enabled DPNI.
    mc.call(cmd::ENABLE, ni, none).unwrap();
    let mut p = Params::default();
    p.set_u16(l::DPNI_MFL, 2000);
    assert_eq!(
        st(&mut mc, cmd::DPNI_SET_MAX_FRAME_LENGTH, ni, p),
        McStatus::InvalidState
    );
    mc.call(cmd::DISABLE, ni, none).unwrap();
    mc.call(cmd::DPNI_SET_MAX_FRAME_LENGTH, ni, p).unwrap();
    // A closed object's token.
    mc.close(ni).unwrap();
    assert_eq!(st(&mut mc, cmd::GET_ATTR, ni, none), McStatus::AuthErr);
    // A token opened on another portal (a DPMCP's) is not valid on this one.
    let mcp = c
        .devices()
        .iter()
        .find(|d| d.obj_type() == ObjType::Dpmcp)
        .unwrap()
        .clone();
    let mut mc2 = Mc {
        io: RegionPortal {
            dev: &*mcp,
            index: 0,
        },
    };
    let t2 = mc2.open(ObjType::Dprc, 2).unwrap();
    assert_eq!(mc2.obj_count(t2).unwrap(), 8);
    assert_eq!(
        st(&mut mc, cmd::DPRC_GET_OBJ_COUNT, t2, none),
        McStatus::AuthErr
    );
    // A header whose status is not READY is not a command: nothing runs.
    let before = c.commands_executed();
    let mut h = Header::command(cmd::DPRC_GET_OBJ_COUNT, t);
    h.status = McStatus::Ok as u8;
    let cmdw = Command {
        header: h,
        params: none,
    };
    dprc.region_write(0, 0, &cmdw.to_bytes()).unwrap();
    assert_eq!(c.commands_executed(), before);
    // Malformed accesses are VFIO errors, not panics.
    assert!(dprc.region_write(0, 0x10000 - 4, &[0; 8]).is_err());
    assert!(dprc.region_write(1, 0, &[0; 8]).is_err());
    assert!(dprc.region_read(0, u64::MAX, &mut [0; 8]).is_err());
    // Every DPRC token can be closed; then it is gone.
    mc.close(t).unwrap();
    assert_eq!(st(&mut mc, cmd::CLOSE, t, none), McStatus::AuthErr);
    // Tokens are bounded: a peer opening forever gets NO_RESOURCE, not unbounded state.
    let mut p = Params::default();
    p.set_u32(0, 2);
    let mut opened = 0;
    let last = loop {
        match st(&mut mc, ObjType::Dprc.open_cmd(), 0, p) {
            McStatus::Ok if opened < 5000 => opened += 1,
            s => break s,
        }
    };
    assert_eq!(last, McStatus::NoResource);
    assert!(
        (1000..=nestio_emulated::fsl_mc::MAX_TOKENS).contains(&opened),
        "{opened}"
    );
    // A container reset keeps the DPRC's own tokens (they still count).
    dprc.reset().unwrap();
    assert_eq!(
        st(&mut mc, ObjType::Dprc.open_cmd(), 0, p),
        McStatus::NoResource
    );
}

#[test]
fn interrupts_reset_and_object_reset_refused() {
    let c = container();
    let dprc = c.dprc();
    let ni_dev = c.object(0).unwrap();
    assert_eq!(ni_dev.obj_type(), ObjType::Dpni);
    let ev = eventfd();
    ni_dev
        .set_irqs(
            0,
            IrqAction::Trigger,
            0,
            1,
            IrqData::Eventfd(vec![Some(ev.try_clone().unwrap())]),
        )
        .unwrap();
    // Linux supports only ACTION_TRIGGER.
    assert!(ni_dev
        .set_irqs(0, IrqAction::Mask, 0, 1, IrqData::None)
        .is_err());
    let mut mc = Mc {
        io: RegionPortal {
            dev: &*dprc,
            index: 0,
        },
    };
    let t = mc.open(ObjType::Dprc, 2).unwrap();
    let ni = mc.open(ObjType::Dpni, 0).unwrap();
    // Disabled irq: the event is only recorded.
    mc.call(cmd::ENABLE, ni, Params::default()).unwrap();
    assert_eq!(take(&ev), 0);
    assert_eq!(mc.irq_status(ni, 0).unwrap(), DPNI_IRQ_EVENT_LINK_CHANGED);
    mc.clear_irq_status(ni, 0, u32::MAX).unwrap();
    // Enabled and unmasked: the link change signals the eventfd.
    mc.irq_setup(ni, 0, DPNI_IRQ_EVENT_LINK_CHANGED, true)
        .unwrap();
    mc.call(cmd::DISABLE, ni, Params::default()).unwrap();
    assert_eq!(take(&ev), 1);
    assert_eq!(mc.irq_status(ni, 0).unwrap(), 1);
    // A VFIO loopback trigger, as Linux's DATA_NONE.
    ni_dev
        .set_irqs(0, IrqAction::Trigger, 0, 1, IrqData::None)
        .unwrap();
    assert_eq!(take(&ev), 1);
    // Object reset through VFIO: refused; container reset: tokens closed, state cleared.
    let e = ni_dev.reset().unwrap_err();
    assert_eq!(e.errno(), libc::ENOTSUP);
    assert!(e.to_string().contains("dprc.2"), "{e}");
    mc.call(cmd::ENABLE, ni, Params::default()).unwrap();
    mc.reset_container(t, 2).unwrap();
    assert_eq!(
        mc.status(cmd::IS_ENABLED, ni, Params::default()).unwrap(),
        McStatus::AuthErr
    );
    let ni = mc.open(ObjType::Dpni, 0).unwrap();
    assert!(!mc.is_enabled(ni).unwrap());
    assert_eq!(mc.irq_status(ni, 0).unwrap(), 0);
    mc.call(cmd::ENABLE, ni, Params::default()).unwrap();
    dprc.reset().unwrap();
    assert_eq!(
        mc.status(cmd::IS_ENABLED, ni, Params::default()).unwrap(),
        McStatus::AuthErr
    );
    assert_eq!(mc.obj_count(t).unwrap(), 8, "the DPRC's own token survives");
}

#[test]
fn mmapped_portal_runs_without_region_writes_and_signals_completion() {
    let c = container();
    c.start_poller().unwrap();
    let mcp = c
        .devices()
        .iter()
        .find(|d| d.obj_type() == ObjType::Dpmcp)
        .unwrap()
        .clone();
    let ri = mcp.region_info(0).unwrap();
    let fd = ri.fd.clone().expect("mmappable");
    let mut mc = Mc {
        io: MappedPortal::new(&fd, ri.fd_offset, ri.size as usize).unwrap(),
    };
    let t = mc.open(ObjType::Dprc, 2).unwrap();
    assert_eq!(mc.obj_count(t).unwrap(), 8);
    // The DPMCP's completion interrupt.
    let ev = eventfd();
    mcp.set_irqs(
        0,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfd(vec![Some(ev.try_clone().unwrap())]),
    )
    .unwrap();
    let id = c
        .objects()
        .iter()
        .find(|o| o.ty == ObjType::Dpmcp)
        .unwrap()
        .id;
    let mt = mc.open(ObjType::Dpmcp, id).unwrap();
    mc.irq_setup(mt, 0, 1, true).unwrap();
    take(&ev);
    mc.obj_count(t).unwrap();
    assert!(wait_for(&ev) >= 1, "completion interrupt");
    // With MC_CMD_FLAG_INTR_DIS, no interrupt.
    let mut cm = Command::new(cmd::DPRC_GET_OBJ_COUNT, t, Params::default());
    cm.header.flags_sw = 1;
    let r = mc.io.send_raw(&cm);
    assert_eq!(r.header.status, 0);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(take(&ev), 0);
}

trait SendRaw {
    fn send_raw(&mut self, c: &Command) -> Command;
}
impl SendRaw for MappedPortal {
    fn send_raw(&mut self, c: &Command) -> Command {
        use nestio_emulated::fsl_mc::driver::PortalIo;
        self.send(c).unwrap()
    }
}

#[test]
fn racing_portal_writes_stay_consistent() {
    let c = Arc::new(container());
    c.start_poller().unwrap();
    let dprc = c.dprc();
    let t = Mc {
        io: RegionPortal {
            dev: &*dprc,
            index: 0,
        },
    }
    .open(ObjType::Dprc, 2)
    .unwrap();
    let mut threads = Vec::new();
    // Four threads send commands through the same non-mmapped portal. Each write runs
    // its command to completion under the portal's lock and a read never sees a
    // command in flight, so every thread reads a complete GET_OBJ answer — its own or
    // another thread's (a driver serialises write+read pairs itself, as Linux's mc_io
    // mutex does).
    for k in 0..4u32 {
        let dprc = dprc.clone();
        threads.push(std::thread::spawn(move || {
            let mut mc = Mc {
                io: RegionPortal {
                    dev: &*dprc,
                    index: 0,
                },
            };
            for i in 0..200u32 {
                let idx = (i + k) % 8;
                let o = mc.obj(t, idx).unwrap();
                assert!(!o.ty.is_empty());
            }
        }));
    }
    // Two threads store into the same mapped DPMCP portal without any coordination:
    // whatever mix the MC sees, every command ends with a real status.
    let mcp = c
        .devices()
        .iter()
        .find(|d| d.obj_type() == ObjType::Dpmcp)
        .unwrap()
        .clone();
    let ri = mcp.region_info(0).unwrap();
    let fd = ri.fd.clone().unwrap();
    for k in 0..2u64 {
        let fd = fd.clone();
        threads.push(std::thread::spawn(move || {
            let p = MappedPortal::new(&fd, 0, 0x10000).unwrap();
            for i in 0..300u64 {
                let mut prm = Params::default();
                prm.0[0] = (i * 0x9e37_79b9) ^ k;
                let id = if i % 3 == 0 {
                    cmd::DPRC_GET_CONT_ID
                } else {
                    cmd::GET_ATTR
                };
                p.post(&Command::new(id, (i % 7) as u16, prm));
                std::thread::yield_now();
            }
        }));
    }
    for th in threads {
        th.join().expect("no thread panicked");
    }
    // Let the poller drain, then the portal holds a final status.
    std::thread::sleep(Duration::from_millis(50));
    let p = MappedPortal::new(&fd, 0, 0x10000).unwrap();
    let st = p.read().header.mc_status();
    assert!(st.is_some() && st != Some(McStatus::Ready), "{st:?}");
    assert!(c.commands_executed() >= 800);
    let _ = McIoError::BadStatus { cmd: 0, status: 0 };
}
