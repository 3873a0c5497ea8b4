//! Level 1 of issue 18 for real: a nestio VM's Linux guest binds the e1000 that nestio
//! emulates to Linux's own `vfio-pci` (noiommu mode), from /init (`nestio.mode=vfio`).
//! With `NESTIO_LINUX_NESTIO` pointing at a static nestio, linux/build.sh also makes an
//! initramfs with /bin/nestio and the guest runs `nestio device vfio --probe` on the
//! bound device: KernelVfioDevice against a real kernel VFIO device.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nestio_vmm::{StopReason, Vm, VmConfig};

fn build_guest(test: &str) -> Option<(PathBuf, PathBuf, Option<PathBuf>)> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if !repo.join("target/linux/out/paths.env").exists() && !ci {
        eprintln!("SKIP: {test}: no guest kernel; build it with linux/build.sh");
        return None;
    }
    let out = std::process::Command::new(repo.join("linux/build.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run linux/build.sh");
    assert!(out.status.success(), "{test}: linux/build.sh failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(PathBuf::from)
    };
    Some((
        get("NESTIO_LINUX_VMLINUX=").expect("vmlinux"),
        get("NESTIO_LINUX_INITRAMFS=").expect("initramfs"),
        get("NESTIO_LINUX_INITRAMFS_VFIO="),
    ))
}

#[test]
fn guest_linux_binds_the_emulated_e1000_to_vfio_pci() {
    let name = "guest_linux_binds_the_emulated_e1000_to_vfio_pci";
    if !Path::new("/dev/kvm").exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name}: no /dev/kvm under CI"
        );
        eprintln!("SKIP: {name}: /dev/kvm is missing");
        return;
    }
    let Some((kernel, initrd, initrd_vfio)) = build_guest(name) else {
        return;
    };
    let with_nestio = initrd_vfio.is_some();
    let buf = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut cfg = VmConfig::linux(kernel, Some(initrd_vfio.unwrap_or(initrd)));
    cfg.console = nestio_vmm::ConsoleOutput::Buffer(buf.clone());
    cfg.cmdline
        .push_str(" nestio.mode=vfio vfio.enable_unsafe_noiommu_mode=1");
    let backend = nestio_net::open_backend("user", None).unwrap();
    let dev = nestio_emulated::e1000::E1000::new(nestio_emulated::e1000::E1000Config::new(backend))
        .unwrap();
    cfg.devices.push(nestio_vmm::DeviceConfig::Local {
        name: "e1000".into(),
        device: dev,
    });
    let mut vm = Vm::new(cfg).unwrap();
    let handle = vm.handle();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(180)).is_err() {
            handle.stop();
        }
    });
    let report = vm.run().unwrap();
    let _ = tx.send(());
    watchdog.join().unwrap();
    let out = String::from_utf8_lossy(&buf.lock()).into_owned();
    for l in out
        .lines()
        .filter(|l| l.contains("NESTIO") || l.contains("vfio"))
    {
        eprintln!("{name}: {l}");
    }
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console:\n{out}");
    assert!(
        out.contains("NESTIO-VFIO: bound 0000:00:01.0 group 0"),
        "{out}"
    );
    assert!(
        out.contains("/dev/vfio/noiommu-0"),
        "noiommu group node:\n{out}"
    );
    assert!(
        out.contains("vfio-pci 0000:00:01.0: Adding kernel taint for vfio-noiommu group"),
        "vfio-pci took the device in noiommu mode:\n{out}"
    );
    if with_nestio {
        assert!(out.contains("NESTIO-VFIO-PROBE: pci 8086:100e"), "{out}");
        // The same device through nestio's vfio-user server to a Client, in the guest.
        assert!(
            out.contains("NESTIO-VFIO-PROBE: client pci 8086:100e"),
            "{out}"
        );
        assert!(
            out.contains("NESTIO-VFIO-PROBE: client view matches"),
            "{out}"
        );
        assert!(out.contains("NESTIO-VFIO: probe exit 0"), "{out}");
        conformance::assert_guest_matches_host_e1000(&out);
    } else {
        eprintln!(
            "{name}: no static nestio in the initramfs (NESTIO_LINUX_NESTIO unset): bind only"
        );
    }
    let bad = nestio_vmm::linux::platform::kernel_problems(&out);
    assert!(bad.is_empty(), "bad kernel lines {bad:?} in:\n{out}");
}

/// The vfio-user conformance suite run inside the guest (`nestio conformance` against
/// `nestio device vfio --once` on the kernel-bound e1000, from /init) compared with the
/// same suite against nestio's own e1000 served on the host.
mod conformance {
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use nestio_vfio_user::conformance::{self, Options, CHECKS};
    use nestio_vfio_user::{Server, ServerConfig};

    /// The checks the host's emulated e1000 passes.
    fn host_e1000_passes() -> Vec<&'static str> {
        let backend = nestio_net::open_backend("user", None).unwrap();
        let dev =
            nestio_emulated::e1000::E1000::new(nestio_emulated::e1000::E1000Config::new(backend))
                .unwrap();
        let server = Arc::new(Server::new(dev, ServerConfig::default()));
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || server.serve_stream(b));
        let report = conformance::run(a, &Options::default()).unwrap();
        t.join().unwrap().unwrap();
        assert_eq!(report.failed(), 0, "host e1000:\n{report}");
        report.passed_names()
    }

    /// The guest printed one line per check (`CONFORMANCE TAG NAME detail`) and the
    /// summary `NESTIO-VFIO: conformance pass N fail 0 ...`; the checks it passed are the
    /// host e1000's, except those the kernel device reports RESTRICTED (noiommu).
    pub fn assert_guest_matches_host_e1000(out: &str) {
        let summary = out
            .lines()
            .find_map(|l| {
                l.find("NESTIO-VFIO: conformance pass ")
                    .map(|i| &l[i + "NESTIO-VFIO: conformance ".len()..])
            })
            .unwrap_or_else(|| panic!("no conformance summary in:\n{out}"));
        eprintln!("guest conformance: {summary}");
        assert!(
            summary.contains(" fail 0 "),
            "a check failed in the guest: {summary}\n{out}"
        );
        assert!(summary.contains("(exit 0, server exit 0)"), "{summary}");
        let mut guest_pass = Vec::new();
        let mut guest_restricted = Vec::new();
        for l in out.lines().filter(|l| l.contains("nestio: conformance:")) {
            eprintln!("guest: {l}");
        }
        for l in out.lines() {
            let w: Vec<&str> = l.split_whitespace().collect();
            let [_, tag, name, ..] = w[..] else { continue };
            if !l.starts_with("CONFORMANCE ") || !CHECKS.contains(&name) {
                continue;
            }
            eprintln!("guest: {l}");
            match tag {
                "PASS" => guest_pass.push(name),
                "RESTRICTED" => guest_restricted.push(name),
                "FAIL" => panic!("guest check {name} failed: {l}"),
                _ => {}
            }
        }
        let expected: Vec<&str> = host_e1000_passes()
            .into_iter()
            .filter(|n| !guest_restricted.contains(n))
            .collect();
        assert_eq!(
            guest_pass, expected,
            "checks passed in the guest (kernel vfio-pci e1000) vs on the host (emulated e1000), restricted in the guest: {guest_restricted:?}"
        );
    }
}
