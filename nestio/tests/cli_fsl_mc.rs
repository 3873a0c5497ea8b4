//! `nestio device fsl-mc` as a user runs it: a separate, sandboxed process serving a
//! DPRC container, one socket per device, driven by nestio's vfio-user client: scan,
//! open, a command through a mapped DPMCP portal (executed by the device process's
//! portal poller under its seccomp allowlist), a bad token's status, then a clean exit.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nestio_device_model::{flags, VfioDevice};
use nestio_emulated::fsl_mc::driver::{MappedPortal, Mc, RegionPortal};
use nestio_emulated::fsl_mc::objects::{cmd, ObjType};
use nestio_emulated::fsl_mc::{McStatus, Params};
use nestio_vfio_user::Client;

#[test]
fn nestio_device_fsl_mc_serves_a_container_socket_per_device() {
    let base = std::env::temp_dir().join(format!("nestio-cli-fslmc-{}.sock", std::process::id()));
    let mcp_path = format!("{}.dpmcp.0", base.display());
    let ni_path = format!("{}.dpni.0", base.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args([
            "device",
            "fsl-mc",
            "--once",
            "--objects",
            "dpni:1,dpmcp:1",
            "--container-id",
            "4",
            "--socket",
        ])
        .arg(&base)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn nestio device fsl-mc");
    let t0 = Instant::now();
    for p in [base.to_str().unwrap(), &ni_path, &mcp_path] {
        while !common::listening(child.id(), std::path::Path::new(p)) {
            assert!(
                child.try_wait().unwrap().is_none(),
                "exited before listening on {p}"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "nothing listened on {p}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let dprc = Client::connect(&base).expect("connect the DPRC");
    assert_eq!(dprc.info().flags, flags::FSL_MC | flags::RESET);
    let mut mc = Mc {
        io: RegionPortal {
            dev: &dprc,
            index: 0,
        },
    };
    let t = mc.open(ObjType::Dprc, 4).unwrap();
    assert_eq!(mc.obj_count(t).unwrap(), 2);
    let o = mc.obj(t, 1).unwrap();
    assert_eq!((o.ty.as_str(), o.id), ("dpmcp", 0));
    let ni = Client::connect(&ni_path).expect("connect dpni.0");
    assert_eq!(ni.info().flags, flags::FSL_MC);
    let mcp = Client::connect(&mcp_path).expect("connect dpmcp.0");
    let ri = mcp.region_info(0).unwrap();
    let mut pmc = Mc {
        io: MappedPortal::new(
            ri.fd.as_ref().expect("mmappable"),
            ri.fd_offset,
            ri.size as usize,
        )
        .unwrap(),
    };
    let pt = pmc.open(ObjType::Dprc, 4).unwrap();
    let nt = pmc.open(ObjType::Dpni, 0).unwrap();
    pmc.call(cmd::ENABLE, nt, Params::default()).unwrap();
    assert!(pmc.is_enabled(nt).unwrap());
    assert_eq!(
        pmc.status(cmd::DPRC_GET_OBJ_COUNT, t, Params::default())
            .unwrap(),
        McStatus::AuthErr,
        "the DPRC portal's token is not valid on the DPMCP portal"
    );
    assert_eq!(pmc.obj_count(pt).unwrap(), 2);
    dprc.reset().unwrap();
    assert_eq!(ni.reset().unwrap_err().errno(), libc::ENOTSUP);
    drop((dprc, ni, mcp));
    let st = child.wait().unwrap();
    assert!(
        st.success(),
        "--once: exits cleanly after its clients: {st}"
    );
}
