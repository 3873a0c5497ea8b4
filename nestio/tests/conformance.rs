//! The vfio-user conformance suite against every device kind nestio serves: the sample
//! device, the e1000, the GPIO card and every device of an FSL-MC container, each
//! served by nestio's `Server` — every check applicable to the device passes. Then the
//! CLI: `nestio conformance --socket` against a `nestio device gpio` process (exit 0,
//! one line per check), and against a server whose device answers one check wrongly
//! (exit 1, that check FAILs).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestio_device_model::{Forwarding, RegionInfo, Result, VfioDevice};
use nestio_vfio_user::conformance::{self, Options, Report, Verdict, CHECKS};
use nestio_vfio_user::{Server, ServerConfig};

fn run_against(name: &str, dev: Arc<dyn VfioDevice>) -> Report {
    let server = Server::new(dev, ServerConfig::default());
    let report = conformance::run_in_process(&server, &Options::default())
        .expect("the suite runs and the session ends cleanly");
    eprintln!("{name}:\n{report}");
    let names: Vec<&str> = report.results.iter().map(|r| r.name).collect();
    assert_eq!(names, CHECKS, "{name}: every check runs once, in order");
    assert_eq!(report.failed(), 0, "{name}:\n{report}");
    assert_eq!(report.restricted(), 0, "{name}:\n{report}");
    report
}

/// The checks whose applicability depends on the device kind (a PCI config space,
/// eventfd interrupts, DMA alignment rules); every other check applies to every kind.
const KIND_SPECIFIC: [&str; 4] = [
    "region.write",
    "set_irqs.trigger",
    "set_irqs.mask",
    "dma.unaligned",
];

/// Every check but the [`KIND_SPECIFIC`] ones must pass (not be skipped); those in
/// `may_skip` may instead be N/A (never FAIL: `run_against` checked).
fn assert_core_passes_but(name: &str, r: &Report, may_skip: &[&str]) {
    for &check in CHECKS {
        if KIND_SPECIFIC.contains(&check) || may_skip.contains(&check) {
            continue;
        }
        assert!(
            r.verdict(check).is_some_and(Verdict::is_pass),
            "{name}: {check} must pass:\n{r}"
        );
    }
}

fn assert_core_passes(name: &str, r: &Report) {
    assert_core_passes_but(name, r, &[]);
}

/// A PCI device also round-trips its config space and fires its INTx eventfd.
fn assert_pci_passes(name: &str, r: &Report) {
    assert_core_passes(name, r);
    for check in ["region.write", "set_irqs.trigger", "set_irqs.mask"] {
        assert!(
            r.verdict(check).is_some_and(Verdict::is_pass),
            "{name}: {check} must pass:\n{r}"
        );
    }
}

#[test]
fn sample_device_conforms() {
    let r = run_against("sample", nestio_emulated::sample::sample_device().unwrap());
    assert_pci_passes("sample", &r);
}

#[test]
fn e1000_conforms() {
    let backend = nestio_net::open_backend("user", None).unwrap();
    let dev = nestio_emulated::e1000::E1000::new(nestio_emulated::e1000::E1000Config::new(backend))
        .unwrap();
    let r = run_against("e1000", dev);
    assert_pci_passes("e1000", &r);
}

#[test]
fn gpio_conforms() {
    let r = run_against(
        "gpio",
        Arc::new(nestio_emulated::gpio::Gpio::new(true).unwrap()),
    );
    assert_pci_passes("gpio", &r);
}

/// Every device of an FSL-MC container (the DPRC and its objects), each a non-PCI VFIO
/// device: objects without interrupts have no eventfd check, objects whose regions are
/// mmap-only (no READ flag) no region access check; the DPRC has both.
#[test]
fn fsl_mc_devices_conform() {
    use nestio_emulated::fsl_mc::{parse_object_list, FslMcContainer};
    let list = parse_object_list(nestio_emulated::fsl_mc::DEFAULT_OBJECTS).unwrap();
    let container = FslMcContainer::new(2, &list).unwrap();
    container.start_poller().unwrap();
    let mut triggered = 0;
    for dev in container.devices() {
        let name = format!("fsl-mc {}", dev.name());
        let r = run_against(&name, dev.clone());
        if dev.name().starts_with("dprc") {
            assert_core_passes(&name, &r);
            assert!(
                r.verdict("set_irqs.trigger").is_some_and(Verdict::is_pass),
                "{name}: the DPRC's irq fires:\n{r}"
            );
        } else {
            assert_core_passes_but(&name, &r, &["region.read", "region.bounds"]);
        }
        assert!(
            matches!(r.verdict("region.write"), Some(Verdict::NotApplicable(_))),
            "{name}: not PCI, no register writes:\n{r}"
        );
        if r.verdict("set_irqs.trigger").is_some_and(Verdict::is_pass) {
            triggered += 1;
        }
    }
    assert!(triggered > 0, "some FSL-MC object fires its irq eventfd");
}

// ---------------------------------------------------------------------------------
// The CLI

fn wait_listening(child: &mut std::process::Child, path: &std::path::Path) {
    let t0 = Instant::now();
    while !common::listening(child.id(), path) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the server exited early"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "nothing listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nestio conformance --socket path`: its output and its stdout (also printed).
fn cli_conformance(path: &Path) -> (std::process::Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args(["conformance", "--socket"])
        .arg(path)
        .output()
        .expect("run nestio conformance");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}");
    (out, text)
}

#[test]
fn cli_conformance_passes_against_nestio_device_gpio() {
    let path = std::env::temp_dir().join(format!("nestio-conf-gpio-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let mut server = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args(["device", "gpio", "--once", "--socket"])
        .arg(&path)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn nestio device gpio");
    wait_listening(&mut server, &path);
    let (out, text) = cli_conformance(&path);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("CONFORMANCE "))
            .count(),
        CHECKS.len() + 1,
        "one line per check and a summary:\n{text}"
    );
    assert!(text.contains("CONFORMANCE summary: pass "), "{text}");
    assert!(!text.contains(" FAIL "), "{text}");
    let st = server.wait().unwrap();
    assert!(
        st.success(),
        "nestio device gpio --once ends after the suite: {st}"
    );
    let _ = std::fs::remove_file(&path);
}

/// The sample device, with DEVICE_GET_REGION_INFO claiming a region is mmappable while
/// it has no fd to give: `region_info` must FAIL and the CLI exit 1.
struct MmapWithoutFd(Arc<dyn VfioDevice>);

impl Forwarding for MmapWithoutFd {
    fn forward_to(&self) -> &dyn VfioDevice {
        &*self.0
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let mut r = self.0.region_info(index)?;
        if index == 0 {
            // MMAP with no fd to send: the server passes the flag on without an fd,
            // which the spec forbids (MMAP means the reply carries the fd).
            r.flags |= nestio_device_model::region_flags::MMAP;
            r.fd = None;
        }
        Ok(r)
    }
}
nestio_device_model::impl_vfio_device_by_forwarding!(MmapWithoutFd);

#[test]
fn cli_conformance_fails_against_a_wrong_server() {
    let path = std::env::temp_dir().join(format!("nestio-conf-bad-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = nestio_vfio_user::bind(&path).unwrap();
    let dev: Arc<dyn VfioDevice> = Arc::new(MmapWithoutFd(
        nestio_emulated::sample::sample_device().unwrap(),
    ));
    let server = Server::new(dev, ServerConfig::default());
    let t = std::thread::spawn(move || server.serve_owners(listener, 1));
    let (out, text) = cli_conformance(&path);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed check exits 1:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains(" region_info "))
        .expect("a region_info line");
    assert!(line.contains("FAIL"), "{line}");
    assert!(
        line.contains("MMAP flag set but no file descriptor"),
        "{line}"
    );
    t.join().unwrap().unwrap();
    let _ = std::fs::remove_file(&path);
}
