//! nestio's vfio-user conformance suite (`nestio_vfio_user::conformance`, the suite
//! `nestio conformance --socket` runs) against an independent server: rust-vmm's
//! `vfio_user` 0.1.7 `Server` with the backend of tests/common/their.rs.
//!
//! This is interop with a real peer, and a check of the suite itself: where their server
//! breaks the spec (known bugs: the Error flag, desync after an unknown command or a
//! bad size, no argsz checks) the matching checks must FAIL, and those are listed here
//! as the expected failures. The list pins today's behaviour: it must be updated when
//! their server is fixed, or when the suite gains a check.

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::their;
use nestio_vfio_user::conformance::{self, Options, Report, Verdict, CHECKS};

fn run() -> Report {
    let mut their = their::start("conformance", true);
    let s = UnixStream::connect(&their.path).expect("connect to their server");
    let opts = Options {
        // Their server desyncs on some messages and then never answers: do not wait
        // 10 s for each such reply.
        reply_timeout: Duration::from_secs(2),
        irq_timeout: Duration::from_millis(500),
        ..Options::default()
    };
    let report = conformance::run(s, &opts).unwrap();
    eprintln!("rust-vmm vfio_user 0.1.7 server:\n{report}");
    let _ = their.join();
    report
}

#[test]
fn conformance_suite_against_rust_vmm_vfio_user_server() {
    let _g = common::guard("conformance_suite_against_rust_vmm_vfio_user_server");
    let r = run();
    let names: Vec<&str> = r.results.iter().map(|c| c.name).collect();
    assert_eq!(names, CHECKS);
    let failed: Vec<&str> = r
        .results
        .iter()
        .filter(|c| c.verdict.is_fail())
        .map(|c| c.name)
        .collect();
    eprintln!("failed: {failed:?}");
    let reason = |name: &str| match r.verdict(name) {
        Some(Verdict::Fail(why)) => why.clone(),
        v => panic!("{name} must fail against their server, got {v:?}:\n{r}"),
    };
    // What works: VERSION (they answer 0.0 <= our 0.2), bad indices refused, reads
    // inside the regions.
    for name in [
        "version",
        "region_info.bad_index",
        "irq_info.bad_index",
        "region.read",
    ] {
        assert!(
            r.verdict(name).is_some_and(Verdict::is_pass),
            "{name}:\n{r}"
        );
    }
    // A second VERSION is re-negotiated, not refused: allowed (N/A).
    assert!(
        matches!(r.verdict("version.repeat"), Some(Verdict::NotApplicable(_))),
        "{r}"
    );
    // Expected failures, each a known defect (or the test backend's shape):
    // - the backend of tests/common/their.rs is a PCI device with 3 regions (no config
    //   space region 7), as the other interop tests use it;
    assert!(reason("device_info").contains("no config space region"));
    // - no argsz check: a reply larger than the client's argsz (spec: argsz is the
    //   largest reply the client accepts);
    for name in ["device_info.argsz", "region_info.argsz", "irq_info"] {
        assert!(
            reason(name).contains("accepted (must be refused)"),
            "{name}"
        );
    }
    // - the fd of a region mmappable as a whole is never sent (MMAP without an fd);
    assert!(reason("region_info").contains("region 2: MMAP flag set but no file descriptor"));
    // - the backend's errno is lost: every error reply says EIO;
    assert!(reason("region.bounds").contains("refused with EIO (expected EINVAL)"));
    assert!(reason("set_irqs.validation").contains("two data types: refused with EIO"));
    // - and that SET_IRQS (DATA_NONE|DATA_BOOL with one data byte) desyncs the stream:
    //   every later reply belongs to no request, so every later check fails.
    let later = &CHECKS[CHECKS
        .iter()
        .position(|c| *c == "set_irqs.trigger")
        .unwrap()..];
    for name in later {
        assert!(reason(name).contains("connection lost"), "{name}");
    }
    let mut expected = vec![
        "device_info",
        "device_info.argsz",
        "region_info",
        "region_info.argsz",
        "region.bounds",
        "irq_info",
        "set_irqs.validation",
    ];
    expected.extend_from_slice(later);
    assert_eq!(failed, expected, "{r}");
}
