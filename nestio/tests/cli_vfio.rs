//! `nestio device vfio`: without a kernel VFIO device on this host, the command must fail
//! cleanly, naming what is missing, and never create its socket.

use std::process::Command;

#[test]
fn device_vfio_without_a_group_fails_with_a_clear_message() {
    let dir = std::env::temp_dir().join(format!("nestio-cli-vfio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vfio.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args(["device", "vfio", "--group", "/nonexistent/vfio/7"])
        .args(["--device", "0000:00:01.0", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded without a device: {err}");
    assert!(
        err.contains("cannot open /dev/vfio/vfio")
            || err.contains("cannot open /nonexistent/vfio/7"),
        "unclear error: {err}"
    );
    assert!(
        !sock.exists(),
        "socket created although the device did not open"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
