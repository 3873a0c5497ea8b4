//! Helpers shared by the CLI tests that start `nestio` processes serving sockets.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// True when /dev/kvm exists. Without it the test prints a loud SKIP line, except in CI
/// (`CI=true`), where a missing /dev/kvm fails the test: KVM tests must run there.
pub fn kvm_or_skip(name: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{name}: /dev/kvm is missing and CI=true: KVM tests must run in CI");
    }
    eprintln!("SKIP: {name}: /dev/kvm is missing on this machine (KVM tests need it)");
    false
}

/// A per-test directory (sockets, logs) under the temp dir, named by test file `kind`,
/// `tag` and this process; removed on drop.
pub struct Dir(PathBuf);

impl Dir {
    /// A fresh, empty directory `nestio-<kind>-<tag>-<pid>`.
    pub fn new(kind: &str, tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("nestio-{kind}-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// True once a socket bound to `path` is listening in process `pid`'s network
/// namespace (see [`nestio_vfio_user::listening`]; a server started with
/// `ip netns exec` is found through its own pid).
pub fn listening(pid: u32, path: &Path) -> bool {
    nestio_vfio_user::listening(pid, path)
}
