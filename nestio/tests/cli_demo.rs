//! `nestio demo` and `nestio run` as a user runs them.

mod common;

use std::process::Command;

use common::kvm_or_skip;

#[test]
fn demo_pings_the_gateway_through_an_out_of_process_e1000() {
    if !kvm_or_skip("demo_pings_the_gateway_through_an_out_of_process_e1000") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .arg("demo")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("arp: 10.0.2.2 is at 52:55:0a:00:02:02"),
        "{text}"
    );
    assert!(text.contains("ping: echo reply from 10.0.2.2"), "{text}");
    assert!(
        text.contains(" us"),
        "round-trip time in the transcript: {text}"
    );
}

#[test]
fn run_returns_the_guest_status_and_rejects_bad_devices() {
    if !kvm_or_skip("run_returns_the_guest_status_and_rejects_bad_devices") {
        return;
    }
    let st = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args(["run", "--guest", "hello", "--memory", "16M"])
        .output()
        .unwrap();
    assert_eq!(
        st.status.code(),
        Some(42),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args(["run", "--guest", "hello", "--device", "pci=0000:00:01.0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("vfio-user=PATH"));
    let gone = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args([
            "run",
            "--guest",
            "hello",
            "--device",
            "vfio-user=/nonexistent/nestio.sock",
        ])
        .output()
        .unwrap();
    assert!(!gone.status.success());
    let err = String::from_utf8_lossy(&gone.stderr);
    assert!(
        err.contains("/nonexistent/nestio.sock"),
        "error names the socket: {err}"
    );
}
