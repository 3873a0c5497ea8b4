//! `nestio run --cpus N` as a user runs it: the smptest payload brings up every vCPU.

mod common;

use std::process::Command;

use common::kvm_or_skip;

#[test]
fn run_cpus_starts_every_vcpu() {
    if !kvm_or_skip("run_cpus_starts_every_vcpu") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args([
            "run",
            "--guest",
            "smptest",
            "--cpus",
            "3",
            "--cmdline",
            "cpus=3",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the payload exits with the number of CPUs that ran code: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("3 of 3 cpus ran code; lapic_ids=7 "),
        "{text}"
    );

    let bad = Command::new(env!("CARGO_BIN_EXE_nestio"))
        .args(["run", "--guest", "smptest", "--cpus", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("1 to 32"), "{err}");
}
