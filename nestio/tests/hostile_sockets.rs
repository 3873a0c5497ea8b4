//! Issue 10 as a user meets it: hostile connections against `nestio device` and a
//! level's `--export` sockets (findings 3, 4, 5, 7), each as separate processes.

mod common;

use common::{kvm_or_skip, Dir};

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nestio_device_model::VfioDevice;
use nestio_vfio_user::{Client, ClientError};
use nestio_vmm::handoff::RamHandoff;

const NESTIO: &str = env!("CARGO_BIN_EXE_nestio");
const DEADLINE: Duration = Duration::from_secs(120);

/// A `nestio` process; killed on drop; stderr to a file.
struct Proc {
    child: Child,
    err: PathBuf,
}

impl Proc {
    fn spawn(dir: &Dir, name: &str, args: &[&str]) -> Proc {
        let err = dir.path(&format!("{name}.err"));
        let child = Command::new(NESTIO)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .expect("spawn nestio");
        Proc { child, err }
    }
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
    fn wait(&mut self) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(t.elapsed() < DEADLINE, "did not end: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn wait_for(&mut self, path: &Path) {
        let t = Instant::now();
        while !common::listening(self.child.id(), path) {
            assert!(
                self.running(),
                "ended before listening on {}: {}",
                path.display(),
                self.stderr()
            );
            assert!(
                t.elapsed() < DEADLINE,
                "never listened on {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sample(dir: &Dir, name: &str, sock: &Path) -> Proc {
    let mut p = Proc::spawn(
        dir,
        name,
        &["device", "sample", "--socket", sock.to_str().unwrap()],
    );
    p.wait_for(sock);
    p
}

/// Findings 3 and 5 through a real level: the `--export` socket survives a stray
/// connect, garbage and an early close and keeps waiting for its real child; a second
/// client while the child is connected is refused as busy; `PATH.mem` hands down a file
/// holding the child's window only (not the level's whole RAM).
#[test]
fn an_export_level_survives_bad_connections_and_hands_down_only_the_window() {
    let name = "an_export_level_survives_bad_connections_and_hands_down_only_the_window";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("hostile", "export");
    let s0 = dir.path("s0");
    let s1 = dir.path("s1");
    let mem = dir.path("s1.mem");
    let _dev = sample(&dir, "device", &s0);
    let mut l1 = Proc::spawn(
        &dir,
        "level1",
        &[
            "run",
            "--guest",
            "hello",
            "--memory",
            "64M",
            "--device",
            &format!("vfio-user={}", s0.display()),
            "--export",
            &format!("vfio-user={}", s1.display()),
        ],
    );
    l1.wait_for(&s1);
    l1.wait_for(&mem);

    // Finding 5: the handoff is the 32 MiB window, in a file of exactly that size.
    let h = RamHandoff::fetch(&mem).unwrap();
    assert_eq!(h.size, 32 << 20);
    let file = File::from(h.fd.try_clone().unwrap());
    assert_eq!(
        file.metadata().unwrap().len(),
        h.offset + h.size,
        "the handed-down file holds the window and nothing of the parent's other RAM"
    );
    assert_eq!(h.offset, 0);
    for p in [&s1, &mem] {
        let mode = std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", p.display());
    }

    // Finding 3: bad connections do not use up the level's one child session.
    drop(UnixStream::connect(&s1).unwrap());
    let mut g = UnixStream::connect(&s1).unwrap();
    let _ = g.write_all(&[0xffu8; 300]);
    drop(g);
    let mut cut = UnixStream::connect(&s1).unwrap();
    cut.write_all(&[1, 0, 1, 0, 64, 0]).unwrap();
    drop(cut);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        l1.running(),
        "the level ended on a bad connection: {}",
        l1.stderr()
    );
    let child = Client::connect(&s1).expect("the real child is served");
    let mut id = [0u8; 4];
    child
        .region_read(nestio_device_model::pci_index::CONFIG, 0, &mut id)
        .unwrap();
    assert_ne!(u32::from_le_bytes(id), 0xffff_ffff);
    let second = Client::connect(&s1)
        .err()
        .expect("a second client is refused");
    assert!(matches!(second, ClientError::Busy), "{second}");
    drop(child);
    let st = l1.wait();
    assert_eq!(st.code(), Some(42), "{}", l1.stderr());
    assert!(
        l1.stderr().contains("waiting for the level-2 child"),
        "{}",
        l1.stderr()
    );
}

/// Finding 3: `nestio run` against a device that has an owner says so, naming the
/// socket, instead of waiting with no message.
#[test]
fn nestio_run_against_a_busy_device_says_it_is_busy() {
    if !kvm_or_skip("nestio_run_against_a_busy_device_says_it_is_busy") {
        return;
    }
    let dir = Dir::new("hostile", "busy");
    let s0 = dir.path("s0");
    let _dev = sample(&dir, "device", &s0);
    let _owner = Client::connect(&s0).unwrap();
    let t0 = Instant::now();
    let mut run = Proc::spawn(
        &dir,
        "run",
        &[
            "run",
            "--guest",
            "hello",
            "--device",
            &format!("vfio-user={}", s0.display()),
        ],
    );
    let st = run.wait();
    assert!(!st.success());
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let err = run.stderr();
    assert!(err.contains(&*s0.to_string_lossy()), "{err}");
    assert!(err.contains("busy"), "{err}");
}

/// Findings 4 and 5 (sockets): a second `nestio device` on a live socket fails with a
/// message naming it, and the first keeps serving; the socket is owner-only.
#[test]
fn a_second_device_server_never_takes_over_a_live_socket() {
    let dir = Dir::new("hostile", "live");
    let s = dir.path("dev.sock");
    let mut first = sample(&dir, "first", &s);
    let mut second = Proc::spawn(
        &dir,
        "second",
        &["device", "sample", "--socket", s.to_str().unwrap()],
    );
    let st = second.wait();
    assert!(!st.success(), "the second server must not start");
    let err = second.stderr();
    assert!(err.contains(&*s.to_string_lossy()), "{err}");
    assert!(err.contains("live"), "{err}");
    assert!(first.running());
    let c = Client::connect(&s).expect("the first server still answers");
    assert!(c.info().num_regions > 0);
    let mode = std::fs::symlink_metadata(&s).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
}

/// Finding 7: a socket in a missing directory: the error names the path.
#[test]
fn a_socket_error_names_the_path() {
    let out = Command::new(NESTIO)
        .args(["device", "sample", "--socket", "/no/such/dir/s.sock"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/dir/s.sock"), "{err}");
}

/// Finding 3: `nestio run` against a server that accepts but never answers (a stuck or
/// foreign server) says what it is waiting for, naming the socket.
#[test]
fn nestio_run_says_what_it_waits_for() {
    if !kvm_or_skip("nestio_run_says_what_it_waits_for") {
        return;
    }
    let dir = Dir::new("hostile", "waits");
    let s0 = dir.path("mute.sock");
    // Listens (the kernel queues the connection) but never reads or answers.
    let _mute = std::os::unix::net::UnixListener::bind(&s0).unwrap();
    let mut run = Proc::spawn(
        &dir,
        "run",
        &[
            "run",
            "--guest",
            "hello",
            "--device",
            &format!("vfio-user={}", s0.display()),
        ],
    );
    let t0 = Instant::now();
    let want = format!("still waiting for the device server at {}", s0.display());
    while !run.stderr().contains(&want) {
        assert!(run.running(), "ended: {}", run.stderr());
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no notice: {}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
