//! Nesting levels as separate `nestio` processes (issue 6): an e1000 emulated at level 0
//! (`nestio device`), passed on by exporting levels (`nestio run --export`), used by the
//! innermost level's guest, whose RAM is a window of its parent's RAM (`--memory-from`).
//! The innermost guest is the `e1000ping` payload, or a Linux kernel whose own e1000
//! driver pings through two exporting levels (skipped loudly without a built kernel,
//! except under CI=true).

mod common;

use common::{child_level, e1000_level0, exporter, kvm_or_skip, s, stat, Dir, Level, NESTIO};

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// The level-0 device (with `device_extra` server options) at `s0` and `level1`
/// (`--guest hello` with `l1_extra`: its guest exits at once, the level keeps serving
/// its child) exporting it at `s1`. Returns `(device, level1, s1)`.
fn device_and_level1(
    dir: &Dir,
    device_extra: &[&str],
    l1_extra: &[&str],
) -> (Level, Level, PathBuf) {
    let (dev, s0) = e1000_level0(dir, device_extra);
    let s1 = dir.path("s1");
    let l1 = exporter(dir, "level1", &s0, &s1, None, "level1", l1_extra);
    (dev, l1, s1)
}

/// [`device_and_level1`], and `level2` (its memory from level 1's `s1.mem`) exporting
/// the device again at `s2`. Returns `(device, level1, level2, s2)`.
fn device_and_two_levels(
    dir: &Dir,
    l1_extra: &[&str],
    l2_cmdline: &str,
) -> (Level, Level, Level, PathBuf) {
    let (dev, l1, s1) = device_and_level1(dir, &[], l1_extra);
    let s2 = dir.path("s2");
    let l2 = exporter(
        dir,
        "level2",
        &s1,
        &s2,
        Some(&dir.path("s1.mem")),
        l2_cmdline,
        &[],
    );
    (dev, l1, l2, s2)
}

/// The innermost level: e1000ping on the parent's memory; returns (status, console).
fn ping(dir: &Dir, name: &str, device: &Path) -> (ExitStatus, String, String) {
    ping_with(dir, name, device, "irq=msi")
}

/// [`ping`] with the payload command line `cmdline`.
fn ping_with(dir: &Dir, name: &str, device: &Path, cmdline: &str) -> (ExitStatus, String, String) {
    child_level(
        dir,
        name,
        device,
        &["run", "--guest", "e1000ping", "--cmdline", cmdline],
    )
    .finish()
}

/// `nestio inspect --memory-from mem args...`.
fn nestio_inspect(mem: &Path, args: &[&str]) -> std::process::Output {
    Command::new(NESTIO)
        .args(["inspect", "--memory-from", &s(mem)])
        .args(args)
        .output()
        .unwrap()
}

/// `len` bytes at guest-physical `addr` of the memory behind `mem`.
fn inspect(mem: &Path, addr: &str, len: &str) -> std::process::Output {
    nestio_inspect(mem, &["--addr", addr, "--len", len])
}

/// The counters an exporting level prints when it ends (`nestio: level N export: k=v ...`).
fn export_stat(stderr: &str, key: &str) -> u64 {
    stat(stderr, " export: ", key)
}

/// Device DMA went to the innermost guest's pages by fd (no copy at this level), and
/// interrupt eventfds were handed down (so no interrupt passes through this process).
fn assert_zero_copy(level: &Level) {
    let e = level.stderr();
    assert!(export_stat(&e, "fd_maps") >= 1, "{e}");
    assert_eq!(export_stat(&e, "peer_maps"), 0, "{e}");
    assert_eq!(export_stat(&e, "copies"), 0, "{e}");
    assert_eq!(export_stat(&e, "copy_bytes"), 0, "{e}");
    assert_eq!(export_stat(&e, "refused_maps"), 0, "{e}");
    assert!(export_stat(&e, "set_irqs") >= 1, "{e}");
}

/// `--no-shared-memory`: the RAM fd never reached the device; its DMA came to this
/// level as messages (one peer mapping) and was copied here.
fn assert_copied(stderr: &str) {
    assert_eq!(export_stat(stderr, "fd_maps"), 0, "{stderr}");
    assert_eq!(export_stat(stderr, "peer_maps"), 1, "{stderr}");
    assert!(export_stat(stderr, "copies") >= 4, "{stderr}");
}

/// [`inspect`] by guest-virtual `addr`, through the page tables rooted at `cr3`.
fn inspect_va(mem: &Path, cr3: &str, addr: &str, len: &str) -> std::process::Output {
    nestio_inspect(mem, &["--cr3", cr3, "--addr", addr, "--len", len])
}

fn assert_pinged(st: ExitStatus, out: &str, err: &str) {
    assert!(st.success(), "innermost level failed ({st}): {out}\n{err}");
    assert!(out.contains("interrupts: MSI vector"), "{out}");
    assert!(
        out.contains("arp: 10.0.2.2 is at 52:55:0a:00:02:02"),
        "{out}"
    );
    assert!(out.contains("ping: echo reply from 10.0.2.2"), "{out}");
}

#[test]
fn level2_guest_pings_through_a_device_exported_by_level1() {
    let name = "level2_guest_pings_through_a_device_exported_by_level1";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("levels", "depth2");
    let (mut dev, mut l1, s1) = device_and_level1(&dir, &[], &[]);
    assert!(l1.stdout().contains("(64 MiB)"), "{}", l1.stdout());

    let (st, out, err) = ping(&dir, "level2", &s1);
    assert_pinged(st, &out, &err);

    // Level 1 ends once its child has gone, with its own guest's status (hello: 42),
    // and removes its sockets.
    let st1 = l1.wait();
    assert_eq!(st1.code(), Some(42), "{}", l1.stderr());
    assert!(
        !s1.exists() && !dir.path("s1.mem").exists(),
        "sockets removed"
    );
    assert!(dev.running(), "the device process survives its client");
}

#[test]
fn level2_guest_pings_through_copies_with_no_shared_memory() {
    let name = "level2_guest_pings_through_copies_with_no_shared_memory";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("levels", "copies");
    let (mut dev, mut l1, s1) = device_and_level1(&dir, &[], &["--no-shared-memory"]);
    let (st, out, err) = ping(&dir, "level2", &s1);
    assert_pinged(st, &out, &err);
    assert_eq!(l1.wait().code(), Some(42), "{}", l1.stderr());
    // Every device DMA (descriptors, frames, status write-backs) was a message copied by
    // level 1 within the child's window; the RAM fd never reached the device.
    let e = l1.stderr();
    assert_copied(&e);
    assert!(
        export_stat(&e, "copy_bytes") >= 2 * 42,
        "two frames received: {e}"
    );
    assert!(dev.running());
}

#[test]
fn level3_guest_pings_through_two_exporting_levels_and_inspect_reads_level2() {
    let name = "level3_guest_pings_through_two_exporting_levels_and_inspect_reads_level2";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("levels", "depth3");
    let (mut dev, mut l1, mut l2, s2) = device_and_two_levels(&dir, &[], "level2-marker");
    assert!(
        l2.stdout().contains("(32 MiB)"),
        "level 2's RAM is level 1's window: {}",
        l2.stdout()
    );

    // Level 2's memory, by level 2's GPA, through level 1's memory socket: the VMM wrote
    // level 2's payload command line at 0x7000.
    let o = inspect(&dir.path("s1.mem"), "0x7000", "32");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.starts_with("0000000000007000  6c 65 76 65 6c 32"),
        "{text}"
    );
    assert!(text.contains("|level2-marker."), "{text}");
    // The same bytes by guest-virtual address, through level 2's own page tables (the
    // payload's identity map rooted at 0x9000).
    let v = inspect_va(&dir.path("s1.mem"), "0x9000", "0x7000", "32");
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    assert_eq!(v.stdout, o.stdout, "virtual and physical views agree");
    // Distinct errors: a translation fault, a non-canonical address, and a copy that
    // runs off the end of level 2's 32 MiB (prints what it got, says how much).
    let f = inspect_va(&dir.path("s1.mem"), "0x9000", "0x100000000", "8");
    assert!(!f.status.success());
    let e = String::from_utf8_lossy(&f.stderr);
    assert!(e.contains("page walk") && e.contains("not present"), "{e}");
    let f = inspect_va(&dir.path("s1.mem"), "0x9000", "0x800000000000", "8");
    let e = String::from_utf8_lossy(&f.stderr);
    assert!(!f.status.success() && e.contains("canonical"), "{e}");
    let f = inspect_va(&dir.path("s1.mem"), "0x9000", "0x1fffff0", "32");
    let e = String::from_utf8_lossy(&f.stderr);
    assert!(
        !f.status.success() && e.contains("copy stopped after 16 bytes"),
        "{e}"
    );
    assert_eq!(String::from_utf8_lossy(&f.stdout).lines().count(), 1);
    // Level 3's window is 16 MiB: its last byte is readable, the next one is not.
    let o = inspect(&dir.path("s2.mem"), "0xffffff", "1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = inspect(&dir.path("s2.mem"), "0xffffff", "2");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("level 3") && err.contains("outside"), "{err}");

    let (st, out, err) = ping(&dir, "level3", &s2);
    assert_pinged(st, &out, &err);

    assert_eq!(l2.wait().code(), Some(42), "{}", l2.stderr());
    assert_eq!(l1.wait().code(), Some(42), "{}", l1.stderr());
    assert_zero_copy(&l2);
    assert_zero_copy(&l1);
    assert!(dev.running(), "the device process survives");
}

/// Isolation: level 2's guest (e1000ping `dma=outside`) points an RX and then a TX
/// descriptor's buffer at guest-physical `RAM size + 1 MiB`, outside its 32 MiB; in
/// level 1's terms that address is level-1 memory outside the window handed down.
///
/// Why this proves the memory outside stayed untouched: with shared memory the device's
/// DMA goes straight to the memfd through level 0's map table, and the only mappings in
/// it are those level 1's exporter forwarded after translating and checking them against
/// the window (`maps == fd_maps`, `refused_maps == 0`: level 2's VMM only ever asked for
/// its own RAM). The guest sees the device refuse both DMAs — PCI status "received
/// master abort" set after each step, no descriptor write-back — so the device found no
/// mapping at the address and wrote (RX) or read (TX) nothing there; no copy went
/// through level 1 either (`copies == 0`). Level 2's window itself ends where level 1's
/// memory socket says so: the same address is refused by `nestio inspect`.
/// Runs the isolation scenario with level 1 started with `extra`; returns level 1's
/// stderr (its export counters) after checking the guest saw both DMAs refused.
fn dma_outside_through_level1(tag: &str, extra: &[&str]) -> String {
    let dir = Dir::new("levels", tag);
    let (mut dev, mut l1, s1) = device_and_level1(&dir, &[], extra);
    // The target address is outside level 2's window as level 1 serves it.
    let o = inspect(&dir.path("s1.mem"), "0x2100000", "1");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("outside"), "{e}");

    let (st, out, err) = ping_with(&dir, "level2", &s1, "irq=msi dma=outside");
    // The device worked normally first, then refused both out-of-window DMAs.
    assert!(
        out.contains("ping: echo reply from 10.0.2.2"),
        "{out}\n{err}"
    );
    assert!(
        out.contains("dma outside: target gpa 0x2100000 (ram 0x2000000)"),
        "{out}"
    );
    for dir in ["RX", "TX"] {
        let line = format!("dma outside: {dir} fault: master abort, descriptor not written back");
        assert!(out.contains(&line), "{out}\n{err}");
    }
    assert_eq!(st.code(), Some(7), "both DMAs refused: {out}\n{err}");
    assert_eq!(l1.wait().code(), Some(42), "{}", l1.stderr());
    assert!(dev.running(), "the device process survives the faults");
    let e = l1.stderr();
    assert!(export_stat(&e, "maps") >= 1, "{e}");
    assert_eq!(export_stat(&e, "refused_maps"), 0, "{e}");
    e
}

/// Isolation: level 2's guest (e1000ping `dma=outside`) points an RX and then a TX
/// descriptor's buffer at guest-physical `RAM size + 1 MiB`, outside its 32 MiB; in
/// level 1's terms that address is level-1 memory outside the window handed down.
///
/// Why this proves the memory outside stayed untouched: with shared memory the device's
/// DMA goes straight to the memfd through level 0's map table, and the only mappings in
/// it are those level 1's exporter forwarded after translating and checking them against
/// the window (`maps == fd_maps`, `refused_maps == 0`: level 2's VMM only ever asked for
/// its own RAM). The guest sees the device refuse both DMAs — PCI status "received
/// master abort" set after each step, no descriptor write-back — so the device found no
/// mapping at the address and wrote (RX) or read (TX) nothing there; no copy went
/// through level 1 either (`copies == 0`). Level 2's window itself ends where level 1's
/// memory socket says so: the same address is refused by `nestio inspect`.
#[test]
fn level2_guest_dma_outside_its_window_faults_and_touches_nothing() {
    let name = "level2_guest_dma_outside_its_window_faults_and_touches_nothing";
    if !kvm_or_skip(name) {
        return;
    }
    let e = dma_outside_through_level1("outside", &[]);
    assert_eq!(
        export_stat(&e, "fd_maps"),
        export_stat(&e, "maps"),
        "every map was the window, by fd: {e}"
    );
    assert_eq!(export_stat(&e, "peer_maps"), 0, "{e}");
    assert_eq!(
        export_stat(&e, "copies"),
        0,
        "no DMA went through level 1: {e}"
    );
}

/// The same with `--no-shared-memory`: the device holds one peer mapping covering the
/// window only, so DMA outside it faults at level 0 before any copy is asked of level
/// 1; the in-window DMA of the normal ping (descriptors, frames) were copies within it.
#[test]
fn level2_guest_dma_outside_its_window_faults_with_no_shared_memory() {
    let name = "level2_guest_dma_outside_its_window_faults_with_no_shared_memory";
    if !kvm_or_skip(name) {
        return;
    }
    let e = dma_outside_through_level1("outside-copies", &["--no-shared-memory"]);
    assert_copied(&e);
}

#[test]
fn a_level_without_its_parents_memory_is_refused() {
    let name = "a_level_without_its_parents_memory_is_refused";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("levels", "foreign");
    let (mut dev, mut l1, s1) = device_and_level1(&dir, &[], &[]);
    // A "child" with RAM of its own (no --memory-from): its DMA map names a file that is
    // not level 1's RAM, so level 1's exporter refuses it before it reaches the device.
    let dev1 = format!("vfio-user={}", s(&s1));
    let mut bad = Level::spawn(
        &dir,
        "intruder",
        &["run", "--guest", "e1000ping", "--device", &dev1],
    );
    let st = bad.wait();
    assert!(!st.success());
    let err = bad.stderr();
    assert!(err.contains("DMA_MAP of guest RAM refused"), "{err}");
    assert_eq!(l1.wait().code(), Some(42));
    assert_eq!(
        export_stat(&l1.stderr(), "refused_maps"),
        1,
        "{}",
        l1.stderr()
    );
    assert_eq!(
        export_stat(&l1.stderr(), "maps"),
        0,
        "nothing reached the device"
    );
    assert!(dev.running());
}

#[test]
fn a_dead_intermediate_level_ends_the_levels_below_with_an_error() {
    let name = "a_dead_intermediate_level_ends_the_levels_below_with_an_error";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("levels", "dead");
    let (mut dev, mut l1, mut l2, s2) = device_and_two_levels(&dir, &[], "l2");
    l1.child.kill().unwrap();
    l1.child.wait().unwrap();
    // Level 2's connection to level 1 is dead: level 2 answers level 3 with ENOTCONN.
    let (st, out, err) = ping(&dir, "level3", &s2);
    assert!(!st.success(), "level 3 must fail: {out}");
    assert!(
        err.contains("nestio: error:") && err.contains("not connected"),
        "a clear error: {err}"
    );
    // Level 2 ends too once its child has gone.
    let st2 = l2.wait();
    assert_eq!(st2.code(), Some(42), "{}", l2.stderr());
    assert!(dev.running(), "the device process survives a dead level");
}

#[test]
fn export_needs_exactly_one_device_and_a_window_that_fits() {
    // Refused before KVM or any socket is touched.
    let one = Command::new(NESTIO)
        .args([
            "run",
            "--guest",
            "hello",
            "--export",
            "vfio-user=/tmp/nestio-x",
        ])
        .output()
        .unwrap();
    assert!(!one.status.success());
    assert!(
        String::from_utf8_lossy(&one.stderr).contains("exactly one"),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let big = Command::new(NESTIO)
        .args([
            "run",
            "--guest",
            "hello",
            "--memory",
            "16M",
            "--device",
            "vfio-user=/nonexistent/s0",
            "--export",
            "vfio-user=/tmp/nestio-x",
            "--export-window",
            "16M",
        ])
        .output()
        .unwrap();
    assert!(!big.status.success());
    let err = String::from_utf8_lossy(&big.stderr);
    assert!(err.contains("export window"), "{err}");
    let gone = Command::new(NESTIO)
        .args([
            "run",
            "--guest",
            "hello",
            "--memory-from",
            "/nonexistent/s1.mem",
        ])
        .output()
        .unwrap();
    assert!(!gone.status.success());
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(err.contains("/nonexistent/s1.mem"), "{err}");
}

/// `(vmlinux, initramfs)` from linux/build.sh, or None after a loud SKIP.
fn guest_linux(test: &str) -> Option<(String, String)> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if !repo.join("target/linux/out/paths.env").exists() && !ci {
        eprintln!(
            "SKIP: {test}: no guest kernel (target/linux/out/paths.env missing); run linux/build.sh (first build ~4 min) or scripts/test.sh"
        );
        return None;
    }
    // A cached rebuild takes under a second; under CI it builds the kernel.
    let out = Command::new(repo.join("linux/build.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run linux/build.sh");
    assert!(out.status.success(), "{test}: linux/build.sh failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{test}: linux/build.sh printed no {key}: {text}"))
    };
    Some((get("NESTIO_LINUX_VMLINUX="), get("NESTIO_LINUX_INITRAMFS=")))
}

#[test]
fn linux_guest_pings_through_two_exporting_levels() {
    let name = "linux_guest_pings_through_two_exporting_levels";
    if !kvm_or_skip(name) {
        return;
    }
    let Some((kernel, initrd)) = guest_linux(name) else {
        return;
    };
    let dir = Dir::new("levels", "linux3");
    // 512 MiB at level 1, 256 MiB at level 2, 128 MiB for the Linux guest at level 3.
    let (mut dev, mut l1, mut l2, s2) =
        device_and_two_levels(&dir, &["--memory", "512M"], "level2");
    let mut l3 = child_level(
        &dir,
        "level3",
        &s2,
        &["run", "--kernel", &kernel, "--initrd", &initrd],
    );
    let st = l3.wait();
    let console = l3.stdout();
    assert!(
        st.success(),
        "Linux at level 3 failed ({st}): {console}\n{}",
        l3.stderr()
    );
    assert!(console.contains("NESTIO-PING: ok 3/3"), "{console}");
    assert!(console.contains("eth0: Intel(R) PRO/1000"), "{console}");
    let bad = nestio_vmm::linux::platform::kernel_problems(&console);
    assert!(
        bad.is_empty(),
        "kernel reported problems {bad:?}: {console}"
    );
    assert_eq!(l2.wait().code(), Some(42), "{}", l2.stderr());
    assert_eq!(l1.wait().code(), Some(42), "{}", l1.stderr());
    assert_zero_copy(&l2);
    assert_zero_copy(&l1);
    assert!(dev.running());
}

/// The innermost level with `--viommu smmuv3`: its guest programs the SMMUv3 and puts
/// its rings and buffers at IOVA = GPA + 512 GiB (`smmu=`), so the DMA_MAPs that
/// cross level 1 carry IOVAs that are not the level-2 guest's addresses.
fn ping_through_smmuv3(dir: &Dir, name: &str, device: &Path) -> (ExitStatus, String, String) {
    ping_through_smmuv3_mode(dir, name, device, "smmuv3,mode=shadow")
}

fn ping_through_smmuv3_mode(
    dir: &Dir,
    name: &str,
    device: &Path,
    viommu: &str,
) -> (ExitStatus, String, String) {
    ping_through_smmuv3_cmdline(dir, name, device, viommu, "irq=msi smmu=0xe8000000")
}

fn ping_through_smmuv3_cmdline(
    dir: &Dir,
    name: &str,
    device: &Path,
    viommu: &str,
    cmdline: &str,
) -> (ExitStatus, String, String) {
    child_level(
        dir,
        name,
        device,
        &[
            "run",
            "--guest",
            "e1000ping",
            "--cmdline",
            cmdline,
            "--viommu",
            viommu,
        ],
    )
    .finish()
}

#[test]
fn level2_guest_pings_through_its_smmuv3_with_iova_not_gpa() {
    let name = "level2_guest_pings_through_its_smmuv3_with_iova_not_gpa";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("levels", "smmuv3");
    let (_dev, mut l1, s1) = device_and_level1(&dir, &[], &[]);
    let (st, out, err) = ping_through_smmuv3(&dir, "level2", &s1);
    assert_pinged(st, &out, &err);
    assert!(
        out.contains("smmu: translating sid 0x8 at 0xe8000000: IOVA = GPA + 0x8000000000"),
        "{out}"
    );
    // The level-0 device still DMAs straight into the level-2 guest's pages: the
    // shadow's maps crossed level 1 by fd, with nothing copied there.
    let st1 = l1.wait();
    assert_eq!(st1.code(), Some(42), "{}", l1.stderr());
    assert_zero_copy(&l1);
    assert!(export_stat(&l1.stderr(), "maps") >= 4, "{}", l1.stderr());
}

/// A level-0 e1000, a level-1 exporter, and a level-2 `--viommu smmuv3,mode=nested`
/// payload run with `guest` arguments: (level 0, level 1, the payload's status, stdout,
/// stderr), once it is checked that the level-2 VMM did not fall back to shadowing.
fn nested_smmuv3_at_depth2(dir: &Dir, guest: &str) -> (Level, Level, ExitStatus, String, String) {
    let (dev, l1, s1) = device_and_level1(dir, &[], &[]);
    let (st, out, err) =
        ping_through_smmuv3_cmdline(dir, "level2", &s1, "smmuv3,mode=nested", guest);
    assert!(!err.contains("shadow mode for it"), "no fallback: {err}");
    (dev, l1, st, out, err)
}

/// Issue 13 at depth 2: level 1 agreed the nested-IOMMU extension with level 0 and
/// offers it to level 2, forwarding BIND/INVALIDATE down and FAULT records up
/// (`nestio_nested::ForwardIommu`). The level-2 VMM asks for `mode=nested`, so the
/// level-0 device walks the level-2 guest's stage-1 tables itself (their addresses are
/// level-2 IPAs, resolved through level 0's map table, which level 1 filled with the
/// level-2 window by fd). `smmu_map=noinval` maps the rings with no invalidation at
/// all, so no VMM ever learns of the mappings: only a device walking the live tables
/// can ping (a shadowing VMM cannot: `crates/vmm/tests/smmuv3.rs`).
#[test]
fn level2_nested_smmuv3_walks_stage1_at_level0_through_a_level1_exporter() {
    let name = "level2_nested_smmuv3_walks_stage1_at_level0_through_a_level1_exporter";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("levels", "smmuv3-nested");
    let (_dev, mut l1, st, out, err) =
        nested_smmuv3_at_depth2(&dir, "irq=msi smmu=0xe8000000 smmu_map=noinval");
    assert_pinged(st, &out, &err);
    assert!(
        out.contains("smmu: translating sid 0x8 at 0xe8000000: IOVA = GPA + 0x8000000000"),
        "{out}"
    );
    let st1 = l1.wait();
    assert_eq!(st1.code(), Some(42), "{}", l1.stderr());
    // Nested: stage 2 is the level-2 RAM in one DMA_MAP (a shadow maps each page
    // range), re-issued to level 0 by fd, nothing copied at level 1.
    assert_eq!(export_stat(&l1.stderr(), "maps"), 1, "{}", l1.stderr());
    assert_zero_copy(&l1);
}

/// A page unmapped under the live RX ring of the level-2 guest: the level-0 device's
/// own stage-1 walk faults, level 0 sends the record (level 2's SID: the BIND level 1
/// forwarded carried it) to level 1, which relays it unchanged to level 2, whose VMM
/// puts it in its guest's event queue: F_TRANSLATION (0x10) with SID 8 and the
/// level-2 IOVA, and the device touched no byte of the buffer.
#[test]
fn level2_nested_smmuv3_device_faults_reach_the_level2_guests_event_queue() {
    let name = "level2_nested_smmuv3_device_faults_reach_the_level2_guests_event_queue";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("levels", "smmuv3-nested-fault");
    let (_dev, mut l1, st, out, err) =
        nested_smmuv3_at_depth2(&dir, "irq=msi smmu=0xe8000000 dma=unmap");
    assert_eq!(st.code(), Some(8), "{out}\n{err}");
    assert!(out.contains("buffer untouched"), "{out}");
    let iova = out
        .lines()
        .find_map(|l| l.strip_prefix("dma unmap: iova "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the unmapped IOVA")
        .to_string();
    // A level-2 IOVA (GPA + 512 GiB), not a level-2 or level-1 guest-physical address.
    assert!(iova.starts_with("0x80"), "{iova}");
    assert!(
        out.contains(&format!("dma unmap: event 0x10 sid 0x8 iova {iova} read 0")),
        "F_TRANSLATION for SID 8 at {iova}: {out}"
    );
    assert_eq!(l1.wait().code(), Some(42), "{}", l1.stderr());
}

/// Depth 3: each exporter forwards to the next (level 2 to level 1, level 1 to level
/// 0), so the level-0 device walks the level-3 guest's stage 1, whose IPAs crossed two
/// exporters' map translations by fd.
#[test]
fn level3_nested_smmuv3_walks_stage1_at_level0_through_two_exporters() {
    let name = "level3_nested_smmuv3_walks_stage1_at_level0_through_two_exporters";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("levels", "smmuv3-nested-depth3");
    let (_dev, mut l1, mut l2, s2) = device_and_two_levels(&dir, &[], "level2");
    let (st, out, err) = ping_through_smmuv3_cmdline(
        &dir,
        "level3",
        &s2,
        "smmuv3,mode=nested",
        "irq=msi smmu=0xe8000000 smmu_map=noinval",
    );
    assert_pinged(st, &out, &err);
    assert!(!err.contains("shadow mode for it"), "no fallback: {err}");
    assert_eq!(l2.wait().code(), Some(42), "{}", l2.stderr());
    assert_eq!(l1.wait().code(), Some(42), "{}", l1.stderr());
    for l in [&l1, &l2] {
        assert_eq!(export_stat(&l.stderr(), "maps"), 1, "{}", l.stderr());
        assert_zero_copy(l);
    }
}

#[test]
fn level2_nested_smmuv3_falls_back_to_shadow_when_level0_refuses_the_extension() {
    // Level 0 does not answer the nested-IOMMU extension (`--no-nested-iommu`), so
    // level 1, whose device's DMA happens in level 0, does not offer it either: a
    // level-2 VMM asking for mode=nested says so and shadows the device; the guest
    // still pings with IOVA != GPA.
    let name = "level2_nested_smmuv3_falls_back_to_shadow_when_level0_refuses_the_extension";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("levels", "smmuv3-fallback");
    let (_dev, mut l1, s1) = device_and_level1(&dir, &["--no-nested-iommu"], &[]);
    let (st, out, err) = ping_through_smmuv3_mode(&dir, "level2", &s1, "smmuv3,mode=nested");
    assert_pinged(st, &out, &err);
    assert!(
        err.contains("(capability not negotiated); shadow mode for it"),
        "{err}"
    );
    assert_eq!(l1.wait().code(), Some(42), "{}", l1.stderr());
}

/// Seed 002's passthrough interrupts at nesting depth 2: the e1000 emulated at level 0,
/// exported by level 1, used by a level-2 VM whose interrupt controller is the XIVE
/// (`--irqchip xive`, e1000ping `irq=xive`: the INTx source routed by hypercall to
/// vCPU 0's queue, acknowledged through the TIMA, EOId through the ESB). The device's
/// INTx eventfd and its unmask (resample) eventfd were handed down through level 1
/// unchanged at setup, so each interrupt goes device -> level-2 XIVE delivery thread
/// (which triggers the source) and each EOI goes level-2 XIVE -> device, with no
/// message and no other process in between: level 1 forwarded a fixed number of
/// SET_IRQS, whatever the number of interrupts (compared between a 1-ping and a
/// 12-ping run through two identical stacks).
#[test]
fn level2_xive_guest_takes_passthrough_interrupts_with_no_message_per_interrupt() {
    let name = "level2_xive_guest_takes_passthrough_interrupts_with_no_message_per_interrupt";
    if !kvm_or_skip(name) {
        return;
    }
    let run = |tag: &str, pings: u32| -> (u64, u64, u64) {
        let dir = Dir::new("levels", tag);
        let (_dev, mut l1, s1) = device_and_level1(&dir, &[], &[]);
        let cmdline = format!("irq=xive pings={pings}");
        let (st, out, err) = child_level(
            &dir,
            "level2",
            &s1,
            &[
                "run",
                "--guest",
                "e1000ping",
                "--cmdline",
                &cmdline,
                "--irqchip",
                "xive",
            ],
        )
        .finish();
        assert!(st.success(), "level 2 failed ({st}): {out}\n{err}");
        assert!(out.contains("interrupts: XIVE source"), "{out}");
        let last = format!("ping: echo reply from 10.0.2.2 seq={pings} ");
        let line = out
            .lines()
            .find(|l| l.starts_with(&last))
            .unwrap_or_else(|| panic!("no reply {pings}: {out}"));
        // "(rtt N tsc cycles; K interrupts, R with RXT0, ...)"
        let count = |what: &str| -> u64 {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words
                .iter()
                .position(|w| w.trim_end_matches(',') == what)
                .unwrap_or_else(|| panic!("{what} in {line}"));
            words[at - 1].parse().unwrap()
        };
        let (irqs, rx) = (count("interrupts"), count("with"));
        assert!(
            rx > u64::from(pings),
            "ARP + {pings} replies, each RXT0: {line}"
        );
        let st1 = l1.wait();
        assert_eq!(st1.code(), Some(42), "{}", l1.stderr());
        assert_zero_copy(&l1);
        (irqs, export_stat(&l1.stderr(), "set_irqs"), rx)
    };
    let (irqs1, set_irqs1, _) = run("xive-1", 1);
    let (irqs12, set_irqs12, rx12) = run("xive-12", 12);
    eprintln!(
        "{name}: 1 ping: {irqs1} interrupts, {set_irqs1} SET_IRQS crossed level 1; \
         12 pings: {irqs12} interrupts ({rx12} RX), {set_irqs12} SET_IRQS"
    );
    assert!(irqs12 >= irqs1 + 11, "{irqs1} -> {irqs12}");
    assert_eq!(
        set_irqs12, set_irqs1,
        "SET_IRQS crossing level 1 grew with the interrupts: a message per interrupt"
    );
    assert!(
        set_irqs12 < irqs12,
        "{set_irqs12} SET_IRQS for {irqs12} interrupts"
    );
}
