//! Shared helpers of the KVM tests.
#![allow(dead_code)]

pub mod child;
pub mod testdev;

use std::sync::{Arc, Mutex};

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
pub fn console() -> (nestio_vmm::ConsoleOutput, Arc<Mutex<Vec<u8>>>) {
    let b = Arc::new(Mutex::new(Vec::new()));
    (nestio_vmm::ConsoleOutput::Buffer(b.clone()), b)
}

/// The text in a console buffer.
pub fn text(b: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&b.lock().unwrap()).into_owned()
}
