//! The FSL-MC container served over vfio-user, one socket per VFIO device (the DPRC at
//! PATH, objects at PATH.<type>.<id>), driven by nestio's `Client` only: scan the
//! container through the DPRC's portal, connect to and open every object, map every
//! mmappable portal and send commands through it, get the right MC status for bad
//! ones, receive an interrupt on an eventfd, reset the container.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nestio_device_model::{flags, region_flags, IrqAction, IrqData, VfioDevice};
use nestio_emulated::fsl_mc::driver::{MappedPortal, Mc, RegionPortal};
use nestio_emulated::fsl_mc::objects::{cmd, layout as l, ObjType, DPNI_IRQ_EVENT_LINK_CHANGED};
use nestio_emulated::fsl_mc::{
    parse_object_list, FslMcContainer, McStatus, Params, DEFAULT_OBJECTS,
};
use nestio_vfio_user::server::{Server, ServerConfig};
use nestio_vfio_user::Client;

/// Serve every device of `c` (one owner each) on `base` / `base.<name>`.
fn serve(c: &FslMcContainer, base: &Path) {
    c.start_poller().unwrap();
    for (i, dev) in c.devices().iter().enumerate() {
        let path = if i == 0 {
            base.to_path_buf()
        } else {
            PathBuf::from(format!("{}.{}", base.display(), dev.name()))
        };
        let listener = nestio_vfio_user::bind(&path).expect("bind");
        let dev: Arc<dyn VfioDevice> = dev.clone();
        std::thread::spawn(move || {
            let s = Server::new(dev, ServerConfig::default());
            let _ = s.serve_owners(listener, 1);
            let _ = std::fs::remove_file(&path);
        });
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a new fd or -1 (checked).
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Wait (up to 10 s) for the eventfd and return its counter.
fn wait(fd: &OwnedFd) -> u64 {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd.
    if unsafe { libc::poll(&mut p, 1, 10_000) } != 1 {
        return 0;
    }
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a local from a readable eventfd.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    assert_eq!(n, 8);
    v
}

#[test]
fn a_client_scans_opens_maps_commands_interrupts_and_resets_the_container() {
    let objs = parse_object_list(&format!("{DEFAULT_OBJECTS},dpmac:1")).unwrap();
    let c = FslMcContainer::new(3, &objs).unwrap();
    let base = std::env::temp_dir().join(format!("nestio-fslmc-{}.sock", std::process::id()));
    serve(&c, &base);

    let dprc = Client::connect(&base).expect("connect to the DPRC");
    let info = dprc.info();
    assert_eq!(info.flags, flags::FSL_MC | flags::RESET);
    let mut mc = Mc {
        io: RegionPortal {
            dev: &dprc,
            index: 0,
        },
    };
    assert_eq!(mc.container_id().unwrap(), 3);
    let t = mc.open(ObjType::Dprc, 3).unwrap();
    let n = mc.obj_count(t).unwrap();
    assert_eq!(n, 7);

    // Scan, connect to each object by the name the scan gives, open it through the
    // DPRC's portal; map each object's regions.
    let mut clients = Vec::new();
    let mut mapped = 0;
    for i in 0..n {
        let o = mc.obj(t, i).unwrap();
        let ty = ObjType::from_name(&o.ty).unwrap();
        let path = format!("{}.{}.{}", base.display(), o.ty, o.id);
        let oc = Client::connect(&path).unwrap_or_else(|e| panic!("connect {path}: {e}"));
        let vi = oc.info();
        assert_eq!(vi.flags, flags::FSL_MC);
        assert_eq!(
            (vi.num_regions, vi.num_irqs),
            (o.region_count as u32, o.irq_count as u32)
        );
        for r in 0..vi.num_regions {
            let ri = oc.region_info(r).unwrap();
            assert_eq!(ri.fd_offset, (r as u64) << 40);
            assert_ne!(ri.flags & region_flags::MMAP, 0);
            let fd = ri.fd.clone().expect("an fd to mmap");
            let _map = MappedPortal::new(&fd, ri.fd_offset, ri.size as usize).expect("mmap");
            mapped += 1;
        }
        let ot = mc.open(ty, o.id).unwrap();
        if ty.has_enable() {
            mc.call(cmd::ENABLE, ot, Params::default()).unwrap();
            assert!(mc.is_enabled(ot).unwrap());
        }
        clients.push((o, ty, ot, oc));
    }
    assert_eq!(
        mapped,
        2 + 2,
        "two DPMCP portals + the DPIO's two QBMan portals"
    );

    // Commands through a mapped DPMCP portal: plain stores, executed by the server's
    // poller without a single REGION_WRITE.
    let (_, _, _, mcp) = clients
        .iter()
        .find(|(_, t, _, _)| *t == ObjType::Dpmcp)
        .unwrap();
    let ri = mcp.region_info(0).unwrap();
    let mut pmc = Mc {
        io: MappedPortal::new(ri.fd.as_ref().unwrap(), ri.fd_offset, ri.size as usize).unwrap(),
    };
    assert_eq!(pmc.container_id().unwrap(), 3);
    let pt = pmc.open(ObjType::Dprc, 3).unwrap();
    assert_eq!(pmc.obj_count(pt).unwrap(), 7);
    // dpni.1 is open through the DPRC's portal: busy until closed there.
    let mut p = Params::default();
    p.set_u32(l::OBJ_OPEN_ID, 1);
    assert_eq!(
        pmc.status(ObjType::Dpni.open_cmd(), 0, p).unwrap(),
        McStatus::Busy
    );
    let (_, _, ni1, _) = clients
        .iter()
        .find(|(o, t, _, _)| *t == ObjType::Dpni && o.id == 1)
        .unwrap();
    mc.close(*ni1).unwrap();
    let pni = pmc.open(ObjType::Dpni, 1).unwrap();
    assert_eq!(
        pmc.status(cmd::GET_ATTR, pni, Params::default()).unwrap(),
        McStatus::Ok
    );
    // Bad ones: the other portal's token, a closed object, an open object, the parent.
    assert_eq!(
        pmc.status(cmd::DPRC_GET_OBJ_COUNT, t, Params::default())
            .unwrap(),
        McStatus::AuthErr
    );
    pmc.close(pni).unwrap();
    assert_eq!(
        pmc.status(cmd::GET_ATTR, pni, Params::default()).unwrap(),
        McStatus::AuthErr
    );
    let mut p = Params::default();
    p.set_u32(l::OBJ_OPEN_ID, 0);
    assert_eq!(
        pmc.status(ObjType::Dpni.open_cmd(), 0, p).unwrap(),
        McStatus::Busy
    );
    p.set_u32(l::OBJ_OPEN_ID, 1);
    assert_eq!(
        pmc.status(ObjType::Dprc.open_cmd(), 0, p).unwrap(),
        McStatus::NoPrivilege
    );
    assert_eq!(
        pmc.status(cmd::DPRC_ASSIGN, pt, Params::default()).unwrap(),
        McStatus::NoPrivilege
    );

    // An interrupt: dpni.0's link-change event, delivered to our eventfd.
    let (_, _, ni, nic) = clients
        .iter()
        .find(|(o, t, _, _)| *t == ObjType::Dpni && o.id == 0)
        .unwrap();
    let ev = eventfd();
    nic.set_irqs(
        0,
        IrqAction::Trigger,
        0,
        1,
        IrqData::Eventfd(vec![Some(ev.try_clone().unwrap())]),
    )
    .unwrap();
    // The ENABLE above left a link change pending: clear it before enabling.
    mc.clear_irq_status(*ni, 0, u32::MAX).unwrap();
    mc.irq_setup(*ni, 0, DPNI_IRQ_EVENT_LINK_CHANGED, true)
        .unwrap();
    mc.call(cmd::DISABLE, *ni, Params::default()).unwrap();
    assert_eq!(wait(&ev), 1, "link-change interrupt");
    assert_eq!(mc.irq_status(*ni, 0).unwrap(), DPNI_IRQ_EVENT_LINK_CHANGED);

    // Reset: refused on an object, the whole container on the DPRC.
    let e = nic.reset().unwrap_err();
    assert_eq!(e.errno(), libc::ENOTSUP, "{e}");
    dprc.reset().expect("container reset");
    for (o, ty, ot, _) in &clients {
        assert_eq!(
            mc.status(cmd::CLOSE, *ot, Params::default()).unwrap(),
            McStatus::AuthErr,
            "{}.{}'s token closed by the reset",
            o.ty,
            o.id
        );
        if ty.has_enable() {
            let t2 = mc.open(*ty, o.id).unwrap();
            assert!(!mc.is_enabled(t2).unwrap(), "disabled by the reset");
            mc.close(t2).unwrap();
        }
    }
    assert_eq!(mc.obj_count(t).unwrap(), 7);

    // Cost of one command each way (printed, not asserted: the host is shared).
    let n = 200;
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        assert_eq!(mc.container_id().unwrap(), 3);
    }
    let by_msg = t0.elapsed() / n;
    let t0 = std::time::Instant::now();
    for _ in 0..n {
        assert_eq!(pmc.container_id().unwrap(), 3);
    }
    let mapped = t0.elapsed() / n;
    eprintln!(
        "FSL-MC command: {by_msg:?} through REGION_WRITE+READ messages, {mapped:?} through the mapped portal (poller)"
    );
    std::thread::sleep(Duration::from_millis(1));
}
