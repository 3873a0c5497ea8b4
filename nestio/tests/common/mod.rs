//! Helpers shared by the CLI tests that start `nestio` processes serving sockets.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `nestio` binary under test.
pub const NESTIO: &str = env!("CARGO_BIN_EXE_nestio");

/// Hang guard only (a stuck process fails the test instead of blocking it forever).
pub const DEADLINE: Duration = Duration::from_secs(240);

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

/// A `nestio` process of a test (a device, a level of a nested stack); SIGKILLed on
/// drop. Its stdout and stderr go to files `<name>.out` and `<name>.err` in the test's
/// [`Dir`], so a failing assertion can show them.
pub struct Level {
    /// The process, for tests that kill or poll it themselves.
    pub child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Level {
    /// Start `nestio args...` as process `name` of the test in `dir`.
    pub fn spawn<S: AsRef<OsStr>>(dir: &Dir, name: &str, args: &[S]) -> Level {
        let out = dir.path(&format!("{name}.out"));
        let err = dir.path(&format!("{name}.err"));
        let child = Command::new(NESTIO)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .expect("spawn nestio");
        Level { child, out, err }
    }
    /// What it printed on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
    /// Both outputs, labelled, for assertion messages.
    pub fn text(&self) -> String {
        format!("stdout: {}\nstderr: {}", self.stdout(), self.stderr())
    }
    /// True while the process has not ended.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
    /// Wait for the process to end (killing it and failing after [`DEADLINE`]).
    pub fn wait(&mut self) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if t.elapsed() > DEADLINE {
                let _ = self.child.kill();
                panic!("a process did not end: {}", self.text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Wait for the process to end (as [`Level::wait`]): its status, stdout and stderr.
    pub fn finish(mut self) -> (ExitStatus, String, String) {
        let st = self.wait();
        (st, self.stdout(), self.stderr())
    }
    /// Wait until this process listens on the socket `path` while the process lives
    /// (the file alone appears before listen(), when a connect is still refused).
    pub fn wait_for(&mut self, path: &Path) {
        let t = Instant::now();
        while !listening(self.child.id(), path) {
            assert!(
                self.running(),
                "the process ended before binding {}: {}",
                path.display(),
                self.text()
            );
            assert!(
                t.elapsed() < DEADLINE,
                "nothing ever listened on {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    /// Wait until the console shows a whole line containing `text` (the serial console
    /// arrives byte by byte, so a prefix alone may be followed by the rest later).
    pub fn wait_for_output(&mut self, text: &str) {
        let t = Instant::now();
        let complete = |out: String| out.find(text).is_some_and(|at| out[at..].contains('\n'));
        while !complete(self.stdout()) {
            assert!(
                self.running(),
                "the process ended without printing {text:?}: {}",
                self.text()
            );
            assert!(t.elapsed() < DEADLINE, "{text:?} never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Level {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `key=N` from the first line of `stderr` containing `marker` (the `k=v` summaries a
/// level prints when it ends, e.g. `nestio: level N export: k=v ...`).
pub fn stat(stderr: &str, marker: &str, key: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} line in: {stderr}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in: {line}"))
}

/// Level 0 of a nesting test: `nestio device e1000` (MSI on, user network) at
/// `dir/s0`, with `extra` server options; waits until it listens.
pub fn e1000_level0(dir: &Dir, extra: &[&str]) -> (Level, PathBuf) {
    let sock = dir.path("s0");
    let sock_s = s(&sock);
    let mut args = vec![
        "device", "e1000", "--net", "user", "--msi", "on", "--socket", &sock_s,
    ];
    args.extend(extra);
    let mut d = Level::spawn(dir, "device", &args);
    d.wait_for(&sock);
    (d, sock)
}

/// An exporting level (`nestio run --guest hello`, its payload command line `cmdline`
/// when not empty) passing `device` on at `export`, optionally on its parent's memory.
/// Returns once its guest is done and it serves its child (`export.mem` exists).
pub fn exporter(
    dir: &Dir,
    name: &str,
    device: &Path,
    export: &Path,
    memory_from: Option<&Path>,
    cmdline: &str,
    extra: &[&str],
) -> Level {
    let dev = format!("vfio-user={}", s(device));
    let exp = format!("vfio-user={}", s(export));
    let mem = memory_from.map(s);
    let mut args = vec![
        "run", "--guest", "hello", "--device", &dev, "--export", &exp,
    ];
    if !cmdline.is_empty() {
        args.extend(["--cmdline", cmdline]);
    }
    if let Some(m) = &mem {
        args.extend(["--memory-from", m.as_str()]);
    }
    args.extend(extra);
    let mut l = Level::spawn(dir, name, &args);
    l.wait_for(&PathBuf::from(format!("{}.mem", s(export))));
    // Its guest is done, yet the level stays to serve its child.
    l.wait_for_output("hello from the guest");
    assert!(l.running(), "an exporting level waits for its child");
    l
}

/// A level using `device`, a parent level's export, on that parent's memory (a window
/// of it): `nestio args... --memory-from <device>.mem --device vfio-user=<device>` as
/// process `name` of the test in `dir`.
pub fn child_level(dir: &Dir, name: &str, device: &Path, args: &[&str]) -> Level {
    let dev = format!("vfio-user={}", s(device));
    let mem = format!("{}.mem", s(device));
    let mut all = args.to_vec();
    all.extend(["--memory-from", &mem, "--device", &dev]);
    Level::spawn(dir, name, &all)
}
