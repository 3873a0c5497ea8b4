//! Shared helpers of the KVM tests.
#![allow(dead_code)]

pub mod child;
pub mod testdev;

use std::sync::Arc;

/// True when KVM can be used; otherwise prints a loud SKIP (or panics under CI=true).
pub fn kvm_or_skip(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: /dev/kvm is missing and CI=true: KVM tests must run in CI");
    }
    eprintln!("SKIP: {test}: /dev/kvm is missing, this KVM test did not run");
    false
}

/// A console buffer and its config value.
pub fn console() -> (nestio_vmm::ConsoleOutput, Arc<parking_lot::Mutex<Vec<u8>>>) {
    let b = Arc::new(parking_lot::Mutex::new(Vec::new()));
    (nestio_vmm::ConsoleOutput::Buffer(b.clone()), b)
}

/// The text in a console buffer.
pub fn text(b: &Arc<parking_lot::Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&b.lock()).into_owned()
}

/// The guest Linux from `linux/build.sh`: `(vmlinux, initramfs.cpio)`.
///
/// When the kernel was built before (`target/linux/out/paths.env` exists) or under
/// CI=true, runs `linux/build.sh` (a cached rebuild takes well under a second; it
/// refreshes the initramfs when `linux/init/init.c` changed) and returns its paths; a
/// failing build panics. Elsewhere, without a built kernel, prints a loud SKIP (the
/// first build takes minutes) and returns None.
pub fn guest_linux(test: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    use std::path::{Path, PathBuf};
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let paths_env = repo.join("target/linux/out/paths.env");
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if !paths_env.exists() && !ci {
        eprintln!(
            "SKIP: {test}: no guest kernel ({} missing); build it with linux/build.sh (first build ~4 min)",
            paths_env.display()
        );
        return None;
    }
    let out = std::process::Command::new(repo.join("linux/build.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run linux/build.sh");
    assert!(out.status.success(), "{test}: linux/build.sh failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{test}: linux/build.sh printed no {key}: {text}"))
    };
    Some((get("NESTIO_LINUX_VMLINUX="), get("NESTIO_LINUX_INITRAMFS=")))
}

/// An e1000 on the built-in `user` network, attached in process (no vfio-user hop).
pub fn local_e1000() -> nestio_vmm::DeviceConfig {
    let backend = nestio_net::open_backend("user", None).unwrap();
    let dev = nestio_emulated::e1000::E1000::new(
        nestio_emulated::e1000::E1000Config::new(backend).with_msi(true),
    )
    .unwrap();
    nestio_vmm::DeviceConfig::Local {
        name: "e1000".into(),
        device: dev,
    }
}
