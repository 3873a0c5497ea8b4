//! `nestio check e1000-ping` as /init runs it in the guest (issue 18), here against a
//! `nestio device e1000` process on the host: the driver in one process, the device in
//! another, the `user` network's gateway answering. With `--dma physical` the driver
//! locks its pages and maps them at their physical addresses (root: pagemap), as it
//! must for a noiommu device; the emulated e1000 accepts any IOVA, so the same command
//! is checked here end to end.

mod common;

use std::process::{Command, Stdio};

fn ping(dma: &str, tag: &str) -> (bool, String, String) {
    let dir = common::Dir::new("check", tag);
    let sock = dir.path("e1000.sock");
    // The check is started first: it must wait for the server's socket by itself.
    let check = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args([
            "check",
            "e1000-ping",
            "--count",
            "3",
            "--dma",
            dma,
            "--socket",
        ])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut server = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args(["device", "e1000", "--once", "--socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = check.wait_with_output().unwrap();
    // `--once`: the server ends when its one owner, the check, has gone.
    let st = server.wait().unwrap();
    assert!(st.success(), "nestio device e1000 --once: {st}");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn e1000_ping_at_a_fixed_iova_answers_3_of_3() {
    let (ok, out, err) = ping("iova", "iova");
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        out.matches("bytes from 10.0.2.2: icmp_seq=").count(),
        3,
        "{out}"
    );
    assert!(out.contains("NESTIO-E1000-PING: ok 3/3 median "), "{out}");
    assert!(!out.contains("pages locked"), "{out}");
}

#[test]
fn e1000_ping_with_physical_addresses_answers_3_of_3_as_root() {
    let (ok, out, err) = ping("physical", "phys");
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        assert!(!ok, "pinged without seeing physical addresses:\n{out}");
        assert!(err.contains("CAP_SYS_ADMIN"), "unclear error: {err}");
        eprintln!("SKIP: e1000_ping_with_physical_addresses_answers_3_of_3_as_root: not root (the refusal was checked)");
        return;
    }
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("NESTIO-E1000-PING: 34 pages locked at physical addresses"),
        "{out}"
    );
    assert!(out.contains("NESTIO-E1000-PING: ok 3/3 median "), "{out}");
}

#[test]
fn e1000_ping_without_a_server_fails_clearly() {
    let dir = common::Dir::new("check", "none");
    let out = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args([
            "check",
            "e1000-ping",
            "--connect-timeout",
            "0.2",
            "--socket",
        ])
        .arg(dir.path("nothing.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("connecting to") && err.contains("nothing.sock"),
        "{err}"
    );
}
