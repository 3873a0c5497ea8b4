//! An FSL-MC container passed on to level 2: `nestio device fsl-mc` at level 0, a level 1
//! (`nestio run --export`) exporting the whole container — the DPRC and every object,
//! each wrapped as the single-device export is — and level 2's `fslmctest` guest driving
//! it exactly as a level-1 guest does: scan, open every object, commands through the
//! mapped DPMCP portal (its fd passed down unchanged, so still no exit), bad statuses,
//! dpni.0's interrupt (eventfd passed down to level 0), container reset.

mod common;

use common::{kvm_or_skip, Dir, Level, NESTIO};

use std::path::{Path, PathBuf};
use std::process::Command;

const OBJECTS: [&str; 3] = ["dpni.0", "dpbp.0", "dpmcp.0"];

fn devices(base: &Path) -> Vec<String> {
    let mut v = vec![
        "--device".to_string(),
        format!("vfio-user={}", base.display()),
    ];
    for o in OBJECTS {
        v.push("--device".into());
        v.push(format!("vfio-user={}.{o}", base.display()));
    }
    v
}

#[test]
fn level2_guest_drives_a_container_exported_by_level1() {
    if !kvm_or_skip("level2_guest_drives_a_container_exported_by_level1") {
        return;
    }
    let dir = Dir::new("fslmc", "nested");
    let s0 = dir.path("mc0");
    let s1 = dir.path("mc1");
    let mut dev = Level::spawn(
        &dir,
        "device",
        &[
            "device",
            "fsl-mc",
            "--objects",
            "dpni:1,dpbp:1,dpmcp:1",
            "--socket",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([s0.display().to_string()])
        .collect::<Vec<_>>(),
    );
    dev.wait_for(&s0);
    for o in OBJECTS {
        dev.wait_for(&PathBuf::from(format!("{}.{o}", s0.display())));
    }

    let mut l1_args: Vec<String> = ["run", "--guest", "hello"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    l1_args.extend(devices(&s0));
    l1_args.extend(["--export".into(), format!("vfio-user={}", s1.display())]);
    let mut l1 = Level::spawn(&dir, "level1", &l1_args);
    l1.wait_for(&PathBuf::from(format!("{}.mem", s1.display())));
    for o in OBJECTS {
        l1.wait_for(&PathBuf::from(format!("{}.{o}", s1.display())));
    }

    let mut l2_args: Vec<String> = [
        "run",
        "--guest",
        "fslmctest",
        "--cmdline",
        "{fsl-mc}",
        "--memory-from",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    l2_args.push(format!("{}.mem", s1.display()));
    l2_args.extend(devices(&s1));
    let mut l2 = Level::spawn(&dir, "level2", &l2_args);
    let st = l2.wait();
    let out = l2.text();
    assert_eq!(st.code(), Some(0), "{out}");
    assert!(
        out.contains("fslmc: dprc.2 obj dpmcp.0 irqs=1 regions=1"),
        "{out}"
    );
    assert!(out.contains("fslmc: ok objects=3 opened=3 irqs=1"), "{out}");

    // Level 1 ends with its own guest's status once its child left; its counters show
    // the DPRC portal's trapped accesses crossing it (the DPMCP portal's did not).
    let st1 = l1.wait();
    assert_eq!(st1.code(), Some(42), "{}", l1.text());
    let t1 = l1.text();
    // fslmctest sends 9 commands through the DPRC's (trapped) portal, 8 word writes
    // and 8 word reads each; its ~25 commands through the DPMCP's mapped portal cross
    // no level at all.
    assert!(
        t1.contains("region_reads=72 region_writes=72"),
        "only the DPRC portal's accesses are forwarded: {t1}"
    );
    assert!(!s1.exists(), "export sockets removed");
    assert!(
        dev.child.try_wait().unwrap().is_none(),
        "the device process survives"
    );
}

#[test]
fn export_of_several_devices_must_be_one_fsl_mc_container() {
    let out = Command::new(NESTIO)
        .args([
            "run",
            "--guest",
            "hello",
            "--device",
            "vfio-user=/nonexistent/a",
            "--device",
            "vfio-user=/nonexistent/b",
            "--export",
            "vfio-user=/tmp/nestio-x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FSL-MC container") && err.contains("exactly one"),
        "{err}"
    );
}
